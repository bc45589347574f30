//! The edge agent's runtime against a real in-process lattice: the Workload
//! API on a Unix socket (peer credentials), renewal on the fake clock,
//! failover between caches, revocation reaching local processes, token
//! exchange (delegation) and its cascade.

use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::AUDIENCE;
use lattice::harness::{Lattice, Spec};
use lattice_edge_agent::workload::{WorkloadConfig, WorkloadRule, effective_uid};
use lattice_edge_agent::{Agent, AgentEvent};
use lattice_shared::proto as pb;
use lattice_shared::proto::workload_client::WorkloadClient;
use lattice_shared::proto::workload_update::Update;
use lattice_shared::revocation::Target;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(20);

/// `lattice-agent run` in process: its socket and how to stop it.
struct Running {
    socket: PathBuf,
    proxy: Option<std::net::SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), lattice_edge_agent::Error>>,
}

impl Running {
    async fn start(agent: Arc<Agent>) -> Running {
        let socket = agent
            .config()
            .workload
            .socket_path(&agent.config().data_dir);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(lattice_edge_agent::runtime::run(
            agent,
            Some(ready_tx),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let at = tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("runtime ready in time")
            .expect("runtime ready");
        Running {
            socket,
            proxy: at.proxy,
            stop: Some(stop_tx),
            task,
        }
    }

    async fn client(&self) -> WorkloadClient<Channel> {
        lattice_edge_agent::workload::connect(&self.socket)
            .await
            .expect("workload socket")
    }

    async fn stop(mut self) -> Result<(), lattice_edge_agent::Error> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("runtime stops in time")
            .expect("runtime task")
    }
}

fn quick(cfg: &mut lattice_edge_agent::Config) {
    cfg.renewal.check_interval_ms = 20;
}
/// A second Workload API socket of `agent` under `rules`, served until the
/// returned sender is dropped or sent to.
async fn extra_socket(
    l: &Lattice,
    agent: &Arc<Agent>,
    name: &str,
    rules: Vec<WorkloadRule>,
) -> (
    WorkloadClient<Channel>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), lattice_edge_agent::Error>>,
) {
    let config = WorkloadConfig {
        socket: None,
        allow: rules,
        disabled: false,
    };
    let path = l.dir.join(name);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (a, p) = (agent.clone(), path.clone());
    let served = tokio::spawn(async move {
        lattice_edge_agent::workload::serve(a, &config, &p, Some(ready_tx), async move {
            let _ = stop_rx.await;
        })
        .await
    });
    ready_rx.await.expect("socket ready");
    let client = lattice_edge_agent::workload::connect(&path)
        .await
        .expect("connect");
    (client, stop_tx, served)
}
async fn with_agent(spec: Spec) -> (Lattice, lattice_shared::clock::FakeClock, Arc<Agent>) {
    let (mut l, clock) = common::lattice_with(Spec {
        agents: vec![],
        ..spec
    })
    .await;
    let i = l
        .add_agent_with("eu", "agent-1", quick)
        .await
        .expect("agent");
    let a = l.agents[i].clone();
    (l, clock, a)
}

fn token_req(scopes: &[&str]) -> pb::WorkloadTokenRequest {
    pb::WorkloadTokenRequest {
        audience: AUDIENCE.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_secs: 0,
    }
}

async fn next_update(s: &mut tonic::Streaming<pb::WorkloadUpdate>) -> Update {
    tokio::time::timeout(WAIT, s.message())
        .await
        .expect("an update in time")
        .expect("stream ok")
        .expect("stream open")
        .update
        .expect("update set")
}

/// Claims of a token, checked by a third-party JWT library (jsonwebtoken)
/// against the lattice's JWKS, without any lattice code.
fn third_party_claims(jwks_json: &str, token: &str) -> serde_json::Value {
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(jwks_json).expect("jwks");
    let kid = jsonwebtoken::decode_header(token)
        .expect("header")
        .kid
        .expect("kid");
    let jwk = jwks.find(&kid).expect("key in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).expect("key");
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&[AUDIENCE]);
    // The fake clock starts at the real present; expiry holds either way.
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
        .expect("a standard library verifies it")
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_api_serves_tokens_and_certificate_to_allowed_uids_only() {
    let (l, _clock, agent) = with_agent(Spec::default()).await;
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;

    let t1 = w
        .fetch_token(token_req(&["read"]))
        .await
        .expect("token for our own uid")
        .into_inner();
    assert_eq!(t1.audience, AUDIENCE);
    let claims = third_party_claims(&agent.jwks().await.expect("jwks"), &t1.token);
    assert_eq!(claims["sub"], agent.id.as_str());
    let t2 = w
        .fetch_token(token_req(&["read"]))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(t1.jti, t2.jti, "a fresh token is served from memory");
    let t3 = w
        .fetch_token(token_req(&["read", "write"]))
        .await
        .expect("other scopes")
        .into_inner();
    assert_ne!(t1.jti, t3.jti, "other scopes, other token");

    let cert = w
        .fetch_certificate(pb::WorkloadCertificateRequest {})
        .await
        .expect("certificate")
        .into_inner();
    assert_eq!(cert.leaf, agent.chain().leaf);
    assert_eq!(cert.agent_id, agent.id.as_str());

    let refused = w
        .fetch_token(pb::WorkloadTokenRequest {
            audience: "has space".into(),
            ..token_req(&[])
        })
        .await
        .expect_err("bad audience");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // A second socket whose rules admit another uid only: our process is
    // refused by its kernel-reported credentials.
    let (mut o, stop_tx, served) = extra_socket(
        &l,
        &agent,
        "other.sock",
        vec![WorkloadRule {
            uid: Some(effective_uid().wrapping_add(1)),
            gid: None,
            audiences: vec!["*".into()],
            delegate: true,
        }],
    )
    .await;
    let denied = o
        .fetch_token(token_req(&["read"]))
        .await
        .expect_err("our uid is not allowed there");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(
        denied
            .message()
            .contains(&format!("uid {}", effective_uid())),
        "{}",
        denied.message()
    );
    let denied = o
        .fetch_certificate(pb::WorkloadCertificateRequest {})
        .await
        .expect_err("nor the certificate");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let _ = stop_tx.send(());
    served.await.expect("task").expect("served");
    assert!(
        !l.dir.join("other.sock").exists(),
        "the socket is removed on stop"
    );

    run.stop().await.expect("clean stop");
    assert!(!run_socket_exists(&agent), "socket removed at shutdown");
    assert!(
        agent.held_jtis().is_empty(),
        "tokens are dropped from memory at shutdown"
    );
}

fn run_socket_exists(agent: &Agent) -> bool {
    agent
        .config()
        .workload
        .socket_path(&agent.config().data_dir)
        .exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_pushes_renewed_tokens_and_certificates_on_the_fake_clock() {
    let (l, clock, agent) = with_agent(Spec::default()).await;
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;
    let mut s = w
        .watch(pb::WorkloadWatchRequest {
            audience: AUDIENCE.into(),
            scopes: vec!["read".into()],
        })
        .await
        .expect("watch")
        .into_inner();
    let Update::Certificate(c0) = next_update(&mut s).await else {
        panic!("the certificate comes first")
    };
    let Update::Token(t0) = next_update(&mut s).await else {
        panic!("then the token")
    };

    // Past the token's half-life (default 5 min): a new token is pushed.
    clock.advance(Duration::from_secs(151));
    l.caches[0].wait_fresh().await.expect("cache fresh");
    let Update::Token(t1) = next_update(&mut s).await else {
        panic!("a renewed token")
    };
    assert_ne!(t1.jti, t0.jti);
    assert!(t1.expires_at_unix > t0.expires_at_unix);

    // Past the certificate's half-life (1 h): a renewed certificate.
    clock.advance(Duration::from_secs(31 * 60));
    l.caches[0].wait_fresh().await.expect("cache fresh");
    let c1 = loop {
        match next_update(&mut s).await {
            Update::Certificate(c) => break c,
            Update::Token(_) | Update::RevokedJti(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(c1.not_after_unix > c0.not_after_unix);
    assert_ne!(c1.leaf, c0.leaf);
    assert_eq!(agent.chain().leaf, c1.leaf);
    run.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_loses_its_credentials_on_the_socket_within_the_bound() {
    let spec = Spec::default();
    let bound = spec.max_staleness;
    let (l, _clock, agent) = with_agent(spec).await;
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;
    let mut s = w
        .watch(pb::WorkloadWatchRequest {
            audience: AUDIENCE.into(),
            scopes: vec!["read".into()],
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(next_update(&mut s).await, Update::Certificate(_)));
    assert!(matches!(next_update(&mut s).await, Update::Token(_)));

    let t0 = Instant::now();
    l.revoke(Target::Agent(agent.id.clone())).expect("revoke");
    let why = loop {
        match next_update(&mut s).await {
            Update::IdentityRevoked(why) => break why,
            _ => continue,
        }
    };
    let took = t0.elapsed();
    assert!(why.contains("revoked"), "{why}");
    assert!(
        took < bound,
        "the socket learnt of the revocation in {took:?}, beyond the bound {bound:?}"
    );
    assert!(agent.held_jtis().is_empty(), "every token is gone");
    // The runtime stops by itself and removes its socket.
    let r = tokio::time::timeout(WAIT, run.task)
        .await
        .expect("stops after revocation")
        .expect("task");
    assert!(r.is_ok(), "{r:?}");
    assert!(!run_socket_exists(&agent));
    assert!(
        w.fetch_token(token_req(&["read"])).await.is_err(),
        "nothing is served any more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_fails_over_to_the_next_cache_when_one_is_killed() {
    let (mut l, _clock) = common::lattice_with(Spec {
        caches: vec![
            ("eu".into(), "cache-1".into()),
            ("eu".into(), "cache-2".into()),
        ],
        agents: vec![],
        ..Spec::default()
    })
    .await;
    let second = l.caches[1].addr();
    let i = l
        .add_agent_with("eu", "agent-1", |c| {
            quick(c);
            c.caches = vec![second];
        })
        .await
        .expect("agent");
    let agent = l.agents[i].clone();
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;
    let jwks = agent.jwks().await.expect("jwks");
    let before = w
        .fetch_token(token_req(&["read"]))
        .await
        .expect("token")
        .into_inner();
    assert_eq!(
        third_party_claims(&jwks, &before.token)["iss"],
        l.caches[0].id().as_str()
    );
    let mut events = agent.subscribe();

    l.stop_cache(0).await.expect("kill the first cache");
    let after = w
        .fetch_token(token_req(&["read", "write"]))
        .await
        .expect("served by the other cache")
        .into_inner();
    assert_eq!(
        third_party_claims(&jwks, &after.token)["iss"],
        l.caches[1].id().as_str(),
        "issued by the second cache"
    );
    assert_eq!(agent.current_cache(), second);
    let moved = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(AgentEvent::CacheChanged(a)) = events.recv().await {
                break a;
            }
        }
    })
    .await
    .expect("a CacheChanged event");
    assert_eq!(moved, second);

    // Revocations still reach the agent through the second cache.
    let held = agent.held_jtis();
    assert!(held.contains(&after.jti));
    let ev = l.revoke(Target::Jti(after.jti.clone())).expect("revoke");
    l.caches[1].wait_applied(ev.seq).await.expect("applied");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(AgentEvent::TokenRevoked { jti }) = events.recv().await
                && jti == after.jti
            {
                break;
            }
        }
    })
    .await
    .expect("the revocation followed the agent to the second cache");
    run.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delegation_narrows_and_revoking_a_parent_revokes_its_descendants() {
    let (l, _clock, agent) = with_agent(Spec::default()).await;
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;
    let jwks = agent.jwks().await.expect("jwks");
    let mut s = w
        .watch(pb::WorkloadWatchRequest {
            audience: AUDIENCE.into(),
            scopes: vec!["read".into(), "write".into()],
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(matches!(next_update(&mut s).await, Update::Certificate(_)));
    let Update::Token(parent) = next_update(&mut s).await else {
        panic!("token")
    };

    let delegate = |token: &str, actor: &str, scopes: &[&str]| pb::WorkloadDelegateRequest {
        subject_token: token.into(),
        actor: actor.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ttl_secs: 0,
    };
    let child = w
        .delegate(delegate(&parent.token, "planner", &["read"]))
        .await
        .expect("a narrower token")
        .into_inner();
    assert_eq!(child.delegation_depth, 1);
    let c = third_party_claims(&jwks, &child.token);
    assert_eq!(c["sub"], agent.id.as_str(), "on behalf of the agent");
    assert_eq!(c["act"]["sub"], format!("{}/planner", agent.id));
    assert_eq!(c["scope"], "read");
    assert_eq!(c["parent_jtis"], serde_json::json!([parent.jti]));
    assert!(c["exp"].as_i64().expect("exp") <= parent.expires_at_unix);

    let grandchild = w
        .delegate(delegate(&child.token, "summariser", &["read"]))
        .await
        .expect("two levels")
        .into_inner();
    let g = third_party_claims(&jwks, &grandchild.token);
    assert_eq!(g["act"]["sub"], format!("{}/summariser", agent.id));
    assert_eq!(g["act"]["act"]["sub"], format!("{}/planner", agent.id));
    assert_eq!(g["parent_jtis"], serde_json::json!([parent.jti, child.jti]));

    let too_deep = w
        .delegate(delegate(&grandchild.token, "third", &["read"]))
        .await
        .expect_err("policy allows two levels");
    assert_eq!(too_deep.code(), tonic::Code::PermissionDenied);

    let wider = w
        .delegate(delegate(&child.token, "x", &["read", "write"]))
        .await
        .expect_err("wider than the parent");
    assert_eq!(wider.code(), tonic::Code::PermissionDenied);
    assert!(
        wider.message().contains("only narrow"),
        "{}",
        wider.message()
    );

    let unknown = w
        .delegate(delegate("not.a.token", "x", &["read"]))
        .await
        .expect_err("not a token this agent holds");
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied);

    // Revoke the parent: the agent drops it and both descendants, and the
    // watcher hears that its token is gone, then gets a fresh one.
    let mut events = agent.subscribe();
    let ev = l.revoke(Target::Jti(parent.jti.clone())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    let mut gone = std::collections::HashSet::new();
    tokio::time::timeout(WAIT, async {
        while gone.len() < 3 {
            if let Ok(AgentEvent::TokenRevoked { jti }) = events.recv().await {
                gone.insert(jti);
            }
        }
    })
    .await
    .expect("all three dropped");
    assert!(gone.contains(&child.jti) && gone.contains(&grandchild.jti));
    assert!(matches!(next_update(&mut s).await, Update::RevokedJti(j) if j == parent.jti));
    let Update::Token(fresh) = next_update(&mut s).await else {
        panic!("a replacement token")
    };
    assert_ne!(fresh.jti, parent.jti);

    // The cache itself refuses to exchange a descendant of a revoked token.
    let refused = agent
        .cache_client(None)
        .expect("client")
        .exchange_token(pb::ExchangeTokenRequest {
            subject_token: child.token.clone(),
            actor: "again".into(),
            scopes: vec!["read".into()],
            ttl_secs: 0,
            claims: None,
        })
        .await
        .expect_err("revoked ancestry");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    run.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cannot_exchange_another_agents_token() {
    let (mut l, _clock) = common::lattice().await;
    let a = l.agents[0].clone();
    let j = l.add_agent("eu", "agent-2").await.expect("second agent");
    let b = l.agents[j].clone();
    let minted = a
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("mint");
    let refused = b
        .cache_client(None)
        .expect("client")
        .exchange_token(pb::ExchangeTokenRequest {
            subject_token: minted.token,
            actor: "thief".into(),
            scopes: vec!["read".into()],
            ttl_secs: 0,
            claims: None,
        })
        .await
        .expect_err("not the holder");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("not to the caller"));
}

/// A plain-HTTP upstream on loopback that records each request it gets and
/// answers with the Authorization header it saw echoed in a header and in
/// the body (as a careless API might).
async fn echo_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .or_else(|| head.lines().find_map(|l| l.strip_prefix("Authorization: ")))
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(buf);
                let body = format!("you sent: {auth}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-echo: {auth}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_injects_the_leased_key_and_the_client_never_sees_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const KEY: &[u8] = b"sk-live-PROXY-4c2e8a1f9b";
    let (mut l, _clock) = common::lattice_with(Spec {
        agents: vec![],
        secrets: vec!["openai".into()],
        ..Spec::default()
    })
    .await;
    let mut custodian = l
        .admin(
            "carol",
            &[lattice_shared::policy::AdminRole::SecretCustodian],
            &[],
        )
        .expect("custodian");
    custodian
        .put_secret(pb::PutSecretRequest {
            name: "openai".into(),
            value: KEY.to_vec(),
            regions: vec!["eu".into()],
            message: String::new(),
        })
        .await
        .expect("put");
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");

    let (upstream, mut received) = echo_upstream().await;
    let host = format!("127.0.0.1:{}", upstream.port());
    let i = l
        .add_agent_with("eu", "agent-1", |c| {
            quick(c);
            c.proxy = Some(lattice_edge_agent::proxy::ProxyConfig {
                listen: "127.0.0.1:0".parse().expect("addr"),
                upstreams: vec![lattice_edge_agent::proxy::Upstream {
                    host: host.clone(),
                    secret: "openai".into(),
                    header: "authorization".into(),
                    template: "Bearer {secret}".into(),
                    tls: false,
                    port: None,
                }],
                ..Default::default()
            });
        })
        .await
        .expect("agent");
    let agent = l.agents[i].clone();
    let run = Running::start(agent.clone()).await;
    let proxy = run.proxy.expect("proxy listening");

    let ask = |target: String, host_header: String| async move {
        let mut s = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect");
        let req = format!(
            "GET {target} HTTP/1.1\r\nhost: {host_header}\r\nauthorization: Bearer client-guess\r\nconnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        out
    };
    let got = ask(format!("http://{host}/v1/models?x=1"), host.clone()).await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !got.windows(KEY.len()).any(|w| w == KEY),
        "the client received the key: {text}"
    );
    assert!(text.contains("[REDACTED]"), "{text}");
    let upstream_saw = received.recv().await.expect("upstream got the request");
    let upstream_text = String::from_utf8_lossy(&upstream_saw).to_string();
    assert!(
        upstream_saw
            .windows(KEY.len() + 7)
            .any(|w| w == [b"Bearer ".as_slice(), KEY].concat().as_slice()),
        "the upstream got the injected key: {upstream_text}"
    );
    assert!(
        !upstream_text.contains("client-guess"),
        "the client's own header is not forwarded: {upstream_text}"
    );

    // A host that is not on the allowlist is refused and never contacted.
    let refused = ask(
        "http://evil.example.com/steal".into(),
        "evil.example.com".into(),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&refused).starts_with("HTTP/1.1 403"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    assert!(received.try_recv().is_err(), "nothing reached any upstream");

    // Each use and refusal is audited at the cache, stamped with the agent
    // (no event announces a report's arrival: polled).
    common::eventually(
        "proxy use and refusal reach the cache's audit trail",
        WAIT,
        async || {
            let events = l.audit.events();
            let reported = events.iter().filter(|e| {
                matches!(e, lattice_regional_cache::AuditEvent::Reported { agent: a, .. } if a == &agent.id)
            });
            let kinds: Vec<String> = reported
                .filter_map(|e| match e {
                    lattice_regional_cache::AuditEvent::Reported { kind, .. } => Some(kind.clone()),
                    _ => None,
                })
                .collect();
            kinds.iter().any(|k| k == "proxy_use") && kinds.iter().any(|k| k == "proxy_refused")
        },
    )
    .await;
    run.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posture_change_revokes_the_tokens_the_policy_no_longer_allows() {
    use lattice::harness::Audience;
    use lattice_shared::policy::{BundleFiles, Posture};
    const PAYMENTS: &str = "https://payments.example.com";
    let base = lattice::harness::lattice_bundle(
        &[
            Audience::new(AUDIENCE, &["read", "write"]),
            Audience::new(PAYMENTS, &["charge"]),
        ],
        &[],
    );
    let bundle = BundleFiles::from_files(
        base.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain(std::iter::once((
                "posture.cedar".to_string(),
                r#"@id("payments-need-a-patched-device")
forbid (
  principal,
  action in [Lattice::Action::"MintToken", Lattice::Action::"ExchangeToken"],
  resource == Lattice::Audience::"https://payments.example.com"
)
unless { context.posture has os_patched && context.posture.os_patched };
"#
                .to_string(),
            ))),
    )
    .expect("bundle");
    let (mut l, _clock) = common::lattice_with(Spec {
        agents: vec![],
        policy: Some(bundle),
        ..Spec::default()
    })
    .await;
    let i = l
        .add_agent_with("eu", "agent-1", |c| {
            c.posture = Posture {
                os_patched: Some(true),
                ..Posture::default()
            };
        })
        .await
        .expect("agent");
    let agent = l.agents[i].clone();
    let pay = agent
        .mint(PAYMENTS, &["charge".into()], None)
        .await
        .expect("patched: payments allowed");
    let api = agent
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("api");

    assert!(
        agent
            .set_posture(Posture {
                os_patched: Some(true),
                ..Posture::default()
            })
            .await
            .expect("same posture")
            .is_empty(),
        "nothing changes when the posture does not"
    );
    let before = l.cp().event_log().head();
    let revoked = agent
        .set_posture(Posture {
            os_patched: Some(false),
            ..Posture::default()
        })
        .await
        .expect("report");
    assert_eq!(revoked, vec![pay.jti.clone()], "only the payments token");
    assert!(
        !agent.held_jtis().contains(&pay.jti),
        "dropped at the agent"
    );
    assert!(agent.held_jtis().contains(&api.jti));

    // The cache asked the control plane; the revocation comes back to every
    // cache (the log head's watch channel announces the commit).
    tokio::time::timeout(
        WAIT,
        l.cp().event_log().subscribe().wait_for(|h| *h != before),
    )
    .await
    .expect("no revocation committed")
    .expect("the log is open");
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
    let exchange = |token: String| pb::ExchangeTokenRequest {
        subject_token: token,
        actor: "sub".into(),
        scopes: vec![],
        ttl_secs: 0,
        claims: Some(agent.claims()),
    };
    let refused = agent
        .cache_client(None)
        .expect("client")
        .exchange_token(pb::ExchangeTokenRequest {
            scopes: vec!["charge".into()],
            ..exchange(pay.token.clone())
        })
        .await
        .expect_err("revoked lattice-wide");
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    agent
        .cache_client(None)
        .expect("client")
        .exchange_token(pb::ExchangeTokenRequest {
            scopes: vec!["read".into()],
            ..exchange(api.token.clone())
        })
        .await
        .expect("the api token is untouched");
    let denied = agent
        .mint(PAYMENTS, &["charge".into()], None)
        .await
        .expect_err("unpatched: no new payments token");
    assert!(
        format!("{denied}").contains("payments-need-a-patched-device"),
        "{denied}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optional_token_cache_file_is_sealed_and_skips_tokens_revoked_meanwhile() {
    let (l, _clock) = common::lattice_with(Spec {
        agents: vec![],
        ..Spec::default()
    })
    .await;
    let id = Lattice::agent_id("eu", "cached");
    let mut cfg = l.agent_config("eu", "cached", l.caches[0].addr());
    cfg.token_cache = true;
    cfg.renewal.check_interval_ms = 20;
    cfg.join_token = Some(lattice_shared::secret::Secret::new(
        l.join_token(&id, None).expect("token"),
    ));
    let kept = lattice_edge_agent::TokenKey::new(AUDIENCE, &["read".into()], 0);
    let other = lattice_edge_agent::TokenKey::new(AUDIENCE, &["write".into()], 0);

    let agent = Arc::new(l.start_agent(cfg.clone()).await.expect("enrols"));
    let run = Running::start(agent.clone()).await;
    let t_kept = agent.token_for(&kept).await.expect("token");
    let t_other = agent.token_for(&other).await.expect("token");
    run.stop().await.expect("stop");
    assert!(agent.held_jtis().is_empty(), "memory is cleared at stop");
    drop(agent);

    let file = std::fs::read(cfg.data_dir.join("tokens.sealed")).expect("cache file written");
    assert!(
        !file
            .windows(t_kept.token.len())
            .any(|w| w == t_kept.token.as_bytes()),
        "no token in clear in the file"
    );

    // Revoked while the agent is down: never served again.
    let ev = l.revoke(Target::Jti(t_other.jti.clone())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");

    cfg.join_token = None;
    let agent = Arc::new(l.start_agent(cfg.clone()).await.expect("restarts"));
    let mut events = agent.subscribe();
    let run = Running::start(agent.clone()).await;
    let mut w = run.client().await;
    // The first heartbeat after the backlog promotes the loaded tokens.
    let deadline = Instant::now() + WAIT;
    while !agent.held_jtis().contains(&t_kept.jti) {
        assert!(Instant::now() < deadline, "loaded tokens never served");
        let _ = tokio::time::timeout(Duration::from_millis(200), events.recv()).await;
    }
    assert!(
        !agent.held_jtis().contains(&t_other.jti),
        "a token revoked while the agent was down is not loaded"
    );
    let again = w
        .fetch_token(token_req(&["read"]))
        .await
        .expect("token")
        .into_inner();
    assert_eq!(again.jti, t_kept.jti, "served from the sealed cache");
    run.stop().await.expect("stop");
}

/// `Delegate` authorizes before it looks the token up: a caller allowed to
/// delegate only for another audience gets the same answer for a token the
/// agent holds as for one it never saw, so it cannot learn what is held.
#[tokio::test]
async fn delegate_does_not_reveal_which_tokens_are_held() {
    let (l, _clock, agent) = with_agent(Spec::default()).await;
    let held = agent
        .token_for(&lattice_edge_agent::TokenKey::new(AUDIENCE, &[], 0))
        .await
        .expect("a held token");
    let (mut w, stop_tx, served) = extra_socket(
        &l,
        &agent,
        "narrow.sock",
        vec![WorkloadRule {
            uid: Some(effective_uid()),
            gid: None,
            audiences: vec!["https://other.example.com".into()],
            delegate: true,
        }],
    )
    .await;
    let ask = |token: &str| pb::WorkloadDelegateRequest {
        subject_token: token.into(),
        actor: "planner".into(),
        scopes: vec![],
        ttl_secs: 0,
    };
    let for_held = w
        .delegate(ask(&held.token))
        .await
        .expect_err("not this caller's audience");
    let for_unknown = w
        .delegate(ask("eyJ.never.seen"))
        .await
        .expect_err("not held");
    assert_eq!(for_held.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        (for_held.code(), for_held.message()),
        (for_unknown.code(), for_unknown.message()),
        "the answers tell held from unknown tokens"
    );
    let _ = stop_tx.send(());
    served.await.expect("joined").expect("served");
    l.shutdown().await;
}

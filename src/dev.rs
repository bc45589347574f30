//! `lattice dev`: a whole local lattice in one process, and a walkthrough of
//! enrolment, issuance and verification that prints what it does.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use lattice_shared::clock::SystemClock;
use lattice_shared::pki::{PrivateKey, TrustBundle, Usage};
use lattice_shared::proto as pb;
use lattice_shared::token::TokenVerifier;
use rustls_pki_types::CertificateDer;

use crate::harness::{Lattice, Spec};

pub struct Options {
    pub exit_after_demo: bool,
    pub data_dir: Option<std::path::PathBuf>,
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let clock = SystemClock::shared();
    let started = Instant::now();
    println!(
        "Lattice dev: control plane, two regional caches (eu, us) and one edge agent on 127.0.0.1"
    );
    let spec = Spec {
        agents: vec![],
        ..Spec::default()
    };
    let mut lattice = match &opts.data_dir {
        Some(d) => Lattice::start_in(d, spec, clock.clone()).await?,
        None => Lattice::start(spec, clock.clone()).await?,
    };
    println!("data directory: {}", lattice.dir.display());

    step(
        1,
        "control plane up: root CA created, its key sealed under a local key-encryption key",
    );
    println!(
        "    control plane   https://{}  ({})",
        lattice.cp().local_addr(),
        lattice.cp().id()
    );
    println!("    root CA         {}", lattice.root_pem().display());
    println!(
        "    admin identity  {}",
        lattice.cp().admin_files().dir.display()
    );

    step(
        2,
        "caches enrolled with one-time join tokens; each got an intermediate CA, a TLS and a JWT signing certificate",
    );
    for c in &lattice.caches {
        let ident = c.app().identity();
        println!(
            "    {:<42} https://{}  CA serial {}  kid {}",
            c.cfg.id.as_str(),
            c.addr(),
            &ident.ca.info().serial_hex[..16],
            ident.signer.kid()
        );
        println!(
            "    {:<42} JWKS https://{}/.well-known/jwks.json",
            "",
            c.addr()
        );
    }

    step(
        3,
        "policy as code: Cedar bundles, validated, tested, signed by the control plane and streamed to every cache",
    );
    let mut admin = lattice.bootstrap_admin()?;
    let history = admin
        .policy_history(pb::PolicyHistoryRequest {})
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    for v in &history.versions {
        println!("    {}", crate::admin::render_version(v));
    }
    // A second platform admin, while the default bundle lets one admin do it
    // alone; the example bundle puts this under the two-person rule.
    let bob_key = PrivateKey::generate_p256()?;
    let bob_cert = admin
        .issue_admin_certificate(pb::IssueAdminCertificateRequest {
            id: format!("spiffe://{}/admin/bob", crate::harness::TRUST_DOMAIN),
            roles: vec!["platform-admin".into()],
            regions: vec![],
            csr: bob_key.csr_der()?,
            ttl_secs: 3600,
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    println!("    a second admin, bob (platform-admin), has a certificate carrying his role");
    let mut bob = crate::admin::connect_with(
        lattice.cp_cfg.listen,
        bob_cert.root.clone(),
        vec![bob_cert.cert.clone()],
        &bob_key,
    )?;
    let example = crate::example_bundle();
    let (_, report) = lattice_shared::policy::check(&example, 0)
        .map_err(|e| anyhow::anyhow!("example bundle: {e}"))?;
    println!(
        "    deploy/policies/example: {} test cases pass (business hours, IP range, TTL cap by label, posture, separation of duties)",
        report.passed.len()
    );
    let v = admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(example.to_proto()),
            message: "example bundle".into(),
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    println!("    pushed: {}", crate::admin::render_version(&v));
    for c in &lattice.caches {
        c.wait_applied(v.seq).await?;
        println!(
            "    {:<42} verified the signature and enforces version {}",
            c.cfg.id.as_str(),
            c.app().policy_version()
        );
    }

    step(
        4,
        "join token for the edge agent (bound to its id and region, shown once, stored as a hash)",
    );
    let agent_id = Lattice::agent_id("eu", "agent-1");
    let token = lattice.join_token(&agent_id, None)?;
    println!("    {agent_id}: {}…", &token[..12]);

    step(
        5,
        "agent generates its key locally and enrols at the eu cache with a CSR",
    );
    let t = Instant::now();
    // A stand-in for an upstream API (plain HTTP on loopback) that echoes
    // the key it receives, as a careless API might: the proxy demo of step
    // 11 shows the calling process never sees it.
    let (upstream, upstream_saw) = demo_upstream().await?;
    lattice
        .add_agent_configured("eu", "agent-1", token, |c| {
            c.renewal.check_interval_ms = 200;
            c.proxy = Some(lattice_edge_agent::proxy::ProxyConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                upstreams: vec![lattice_edge_agent::proxy::Upstream {
                    host: upstream.to_string(),
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
        .context("agent enrolment")?;
    let agent = &lattice.agents[0];
    let chain = agent.chain();
    println!(
        "    enrolled in {:.1} ms; certificate valid until unix {}",
        t.elapsed().as_secs_f64() * 1e3,
        agent.not_after_unix()
    );
    let pem_dir = lattice.dir.join("agent-eu-agent-1");
    std::fs::create_dir_all(&pem_dir)?;
    let chain_path = pem_dir.join("chain.pem");
    std::fs::write(
        &chain_path,
        lattice_shared::pem::encode_certs([
            chain.leaf.as_slice(),
            chain.intermediate.as_slice(),
            chain.root.as_slice(),
        ]),
    )?;
    println!(
        "    certificate chain (leaf, eu intermediate, root): {}",
        chain_path.display()
    );
    let bundle = Arc::new(TrustBundle::new(
        lattice_shared::id::TrustDomain::new(crate::harness::TRUST_DOMAIN)?,
        chain.root.clone(),
    )?);
    bundle.verify(
        &chain.leaf,
        &[CertificateDer::from(chain.intermediate.as_slice())],
        clock.now(),
        Usage::TlsClient,
    )?;
    println!("    chain verified to the root with rustls-webpki");

    step(6, "agent mints a token over mTLS");
    let audience = "https://api.example.com";
    let t = Instant::now();
    let minted = agent.mint(audience, &["read".to_string()], None).await?;
    println!(
        "    minted in {:.2} ms, expires at unix {}",
        t.elapsed().as_secs_f64() * 1e3,
        minted.expires_at_unix
    );
    println!("    token: {}", minted.token);
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&agent.jwks().await?)?;
    let claims = TokenVerifier::new(jwks.clone(), bundle.clone(), clock.clone())
        .verify(&minted.token, audience)?;
    println!(
        "    claims: {}",
        serde_json::to_string_pretty(&claims)?.replace('\n', "\n    ")
    );

    step(
        7,
        "token verified offline against the JWKS (kid → key certified by the root for the issuing cache)",
    );
    println!(
        "    JWKS holds {} keys (one per cache); issuer {} matches the key's certificate",
        jwks.keys.len(),
        claims.iss
    );

    step(
        8,
        "context-aware decisions at the eu cache (each denial names the deciding policy)",
    );
    let agent = &lattice.agents[0];
    let (hour, weekday) = lattice_shared::policy::hour_and_weekday(clock.now());
    for (audience, scopes, why) in [
        (
            "https://payments.example.com",
            vec!["charge".to_string()],
            "high-assurance: needs os_patched posture",
        ),
        (
            "https://db.internal.example.com",
            vec!["read".to_string()],
            "only from 10.0.0.0/8; this agent calls from 127.0.0.1",
        ),
        (
            "https://reports.example.com",
            vec!["read".to_string()],
            "business hours only (Mon-Fri 08-18 UTC)",
        ),
    ] {
        let outcome = match agent.mint(audience, &scopes, None).await {
            Ok(m) => format!("allowed by version {}", m.policy_version),
            Err(e) => format!("{e}"),
        };
        println!("    {audience:<32} ({why}): {outcome}");
    }
    println!("    (now: weekday {weekday}, {hour:02}h UTC)");

    step(
        9,
        "two-person rule: under the example bundle a policy change waits for a second admin",
    );
    let pending = match admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(example.to_proto()),
            message: "re-release, approved".into(),
        })
        .await
    {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => s,
        Err(s) => return Err(crate::admin::refused(s)),
        Ok(_) => anyhow::bail!("the example bundle should put pushes under the two-person rule"),
    };
    let request_id = pending
        .metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    println!(
        "    bootstrap pushes: {:?}: {}",
        pending.code(),
        pending.message()
    );
    let approved = bob
        .approve(pb::ApproveRequest {
            request_id: request_id.clone(),
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    if let Some(pb::approve_response::Result::Policy(v)) = approved.result {
        println!(
            "    bob approves {request_id}: {}",
            crate::admin::render_version(&v)
        );
    }

    secret_step(&lattice).await?;
    let (mut workload, running, stop_runtime) = runtime_step(&lattice, upstream_saw).await?;
    revoke_secret_step(&lattice, running.proxy, &running.target).await?;

    step(
        13,
        "revoke the agent at the control plane and measure how fast every cache enforces it",
    );
    let mut watch = workload
        .watch(pb::WorkloadWatchRequest {
            audience: audience.into(),
            scopes: vec!["read".into()],
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    for _ in 0..2 {
        // The certificate, then the token.
        watch.message().await?;
    }
    let agent = lattice.agents[0].clone();
    let held = agent.held_jtis().len();
    let t0 = Instant::now();
    let ev = lattice.revoke(lattice_shared::revocation::Target::Agent(agent.id.clone()))?;
    println!(
        "    committed durably as sequence {} in {:.2} ms",
        ev.seq,
        t0.elapsed().as_secs_f64() * 1e3
    );
    let waits = lattice.caches.iter().map(|c| async move {
        c.wait_applied(ev.seq)
            .await
            .map(|()| (c.cfg.id.to_string(), t0.elapsed()))
    });
    for r in futures::future::join_all(waits).await {
        let (id, at) = r?;
        println!(
            "    {id:<42} enforcing after {:.2} ms (durable, acknowledged)",
            at.as_secs_f64() * 1e3
        );
    }
    let refused = agent
        .cache_client(None)?
        .mint_token(lattice_shared::proto::MintTokenRequest {
            audience: audience.into(),
            scopes: vec![],
            ttl_secs: 0,
            claims: None,
        })
        .await;
    match refused {
        Err(s) => println!(
            "    the agent's next mint is refused: {:?}: {}",
            s.code(),
            s.message()
        ),
        Ok(_) => anyhow::bail!("a revoked agent could still mint"),
    }
    let mut revoked = agent.revoked_signal();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), revoked.wait_for(|r| *r)).await;
    println!(
        "    the agent learnt it on its revocation stream: revoked = {}, dropped {held} held token(s) and its key",
        agent.is_revoked()
    );
    let told = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Ok(Some(u)) = watch.message().await {
            if let Some(pb::workload_update::Update::IdentityRevoked(why)) = u.update {
                return Some(why);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    // Told first; then the runtime stops and removes its socket.
    let elapsed = t0.elapsed();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), running.task).await;
    match told {
        Some(why) => println!(
            "    local processes watching the socket were told after {:.2} ms ({why}); the socket is gone: {}",
            elapsed.as_secs_f64() * 1e3,
            !running.socket.as_deref().is_some_and(Path::exists)
        ),
        None => anyhow::bail!("the workload socket did not report the revocation"),
    }
    drop(stop_runtime);
    println!(
        "    a cache that cannot prove freshness within L = {} ms refuses to mint (UNAVAILABLE, \"stale\")",
        lattice.caches[0].app().max_staleness().as_millis()
    );

    println!(
        "\nWalkthrough done in {:.2} s.",
        started.elapsed().as_secs_f64()
    );
    print_endpoints(&lattice, &lattice.dir);
    if opts.exit_after_demo {
        lattice.shutdown().await;
        return Ok(());
    }
    println!("\nServing until Ctrl-C.");
    tokio::signal::ctrl_c().await?;
    lattice.shutdown().await;
    Ok(())
}

/// Step 10: an upstream API key under the two-person rule, sealed to the eu
/// cache only, leased, then one version revoked.
async fn secret_step(lattice: &Lattice) -> anyhow::Result<()> {
    use lattice_shared::policy::AdminRole;
    step(
        10,
        "upstream API key: custodian carol stores it (dave approves), the eu cache receives it sealed to its own key, the agent leases it",
    );
    let mut carol = lattice.admin("carol", &[AdminRole::SecretCustodian], &[])?;
    let mut dave = lattice.admin("dave", &[AdminRole::SecretCustodian], &[])?;
    for demo_value in [b"sk-demo-first-0123456789", b"sk-demo-second-987654321"] {
        let waiting = carol
            .put_secret(pb::PutSecretRequest {
                name: "openai".into(),
                value: demo_value.to_vec(),
                regions: vec!["eu".into()],
                message: "walkthrough".into(),
            })
            .await;
        if let Err(s) = waiting {
            let r = approve(&mut dave, s).await?;
            if let Some(pb::approve_response::Result::Secret(v)) = r.result {
                println!(
                    "    v{} stored: fingerprint {}, DEK wrapped by KEK v{}, put by carol, approved by dave",
                    v.version, v.fingerprint, v.kek_version
                );
            }
        }
    }
    println!(
        "    sealed only to caches a custodian granted custody (HoldSecret, `lattice grant-custody`); enrolment alone makes a cache serve tokens, never hold secrets"
    );
    lattice
        .wait_all_applied(lattice.cp().event_log().head())
        .await?;
    for c in &lattice.caches {
        let held = c.app().secrets_held();
        println!("    {:<42} holds (sealed) {held:?}", c.cfg.id.as_str());
    }
    let agent = &lattice.agents[0];
    let lease = agent
        .lease_secret("openai", 0, Some(std::time::Duration::from_secs(300)))
        .await?;
    println!(
        "    agent leased v{} ({} bytes, fingerprint {}), lease {} until unix {}",
        lease.version,
        lease.value.len(),
        lease.fingerprint,
        lease.lease_id,
        lease.expires_at_unix
    );
    drop(lease);
    Ok(())
}

// Two-person requests: carol asks, dave approves, the approval runs it.
async fn approve(
    dave: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
    s: tonic::Status,
) -> anyhow::Result<pb::ApproveResponse> {
    if s.code() != tonic::Code::FailedPrecondition {
        return Err(crate::admin::refused(s));
    }
    let id = s
        .metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok(dave
        .approve(pb::ApproveRequest { request_id: id })
        .await
        .map_err(crate::admin::refused)?
        .into_inner())
}

/// Step 12: a secret version revoked: no cache leases it, and the agent's
/// proxy stops injecting it at once.
async fn revoke_secret_step(
    lattice: &Lattice,
    proxy: Option<std::net::SocketAddr>,
    target: &str,
) -> anyhow::Result<()> {
    use lattice_shared::policy::AdminRole;
    step(
        12,
        "carol revokes openai v2 (dave approves): no cache leases it, the proxy stops injecting it",
    );
    let mut carol = lattice.admin("carol", &[AdminRole::SecretCustodian], &[])?;
    let mut dave = lattice.admin("dave", &[AdminRole::SecretCustodian], &[])?;
    let agent = &lattice.agents[0];
    let revoke = carol
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::SecretVersion(
                    pb::SecretVersionRef {
                        name: "openai".into(),
                        version: 2,
                    },
                )),
                reason: "walkthrough".into(),
            }),
        })
        .await;
    let t0 = Instant::now();
    let seq = match revoke {
        Ok(r) => r.into_inner().seq,
        Err(s) => match approve(&mut dave, s).await?.result {
            Some(pb::approve_response::Result::Revoke(r)) => r.seq,
            _ => anyhow::bail!("the approval did not revoke"),
        },
    };
    for c in &lattice.caches {
        c.wait_applied(seq).await?;
    }
    println!(
        "    carol revokes v2, dave approves (sequence {seq}); every cache applied it {:.2} ms after carol asked",
        t0.elapsed().as_secs_f64() * 1e3
    );
    match agent.lease_secret("openai", 0, None).await {
        Err(e) => println!("    the agent's next lease is refused: {e}"),
        Ok(_) => anyhow::bail!("a revoked version could still be leased"),
    }
    if let Some(proxy) = proxy {
        let (status, body) = through_proxy(proxy, target).await?;
        println!("    the proxy's next request: {status}: {}", body.trim());
    }
    Ok(())
}

/// A loopback HTTP server that answers every request with the
/// Authorization header it received, in a header and in the body; the
/// headers it saw are kept for the walkthrough to check.
async fn demo_upstream()
-> anyhow::Result<(std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let saw = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = saw.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_string();
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                            .map(|(_, v)| v.trim().to_string())
                    })
                    .unwrap_or_default();
                if let Ok(mut g) = seen.lock() {
                    g.push(auth.clone());
                }
                let body = format!("you sent: {auth}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-echo: {auth}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok((addr, saw))
}

/// One GET through the proxy, as an AI-agent process would send it
/// (`target` in absolute form names the upstream); the status line and the
/// body.
async fn through_proxy(
    proxy: std::net::SocketAddr,
    target: &str,
) -> anyhow::Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy).await?;
    let host = target
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.lines().next().unwrap_or_default().to_string();
    let (head, mut rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, rest.to_string()));
    }
    // Chunked: size line, data, CRLF, until the last (empty) chunk.
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        body.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((status, body))
}

/// What `lattice-agent run` keeps running until the end of the walkthrough.
struct Running {
    socket: Option<std::path::PathBuf>,
    proxy: Option<std::net::SocketAddr>,
    /// The URL the demo calls through the proxy.
    target: String,
    task: tokio::task::JoinHandle<Result<(), lattice_edge_agent::Error>>,
}

/// Step 11: the agent runtime: the Workload API on a Unix socket, token
/// exchange for a sub-agent, and the credential-injecting proxy.
async fn runtime_step(
    lattice: &Lattice,
    upstream_saw: Arc<std::sync::Mutex<Vec<String>>>,
) -> anyhow::Result<(
    pb::workload_client::WorkloadClient<tonic::transport::Channel>,
    Running,
    tokio::sync::oneshot::Sender<()>,
)> {
    step(
        11,
        "agent runtime: Workload API on a Unix socket (callers known by uid), delegation to a sub-agent, credential-injecting proxy",
    );
    let agent = lattice.agents[0].clone();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(lattice_edge_agent::runtime::run(
        agent.clone(),
        Some(ready_tx),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let at = ready_rx.await.context("the agent runtime did not start")?;
    let socket = at.socket.clone().context("no workload socket")?;
    println!("    workload API     unix:{}", socket.display());
    let mut w = lattice_edge_agent::workload::connect(&socket).await?;
    let parent = w
        .fetch_token(pb::WorkloadTokenRequest {
            audience: "https://api.example.com".into(),
            scopes: vec!["read".into(), "write".into()],
            ttl_secs: 0,
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    println!(
        "    a local process (uid {}) fetched a token over the socket: jti {}, scopes read write",
        lattice_edge_agent::workload::effective_uid(),
        parent.jti
    );
    let child = w
        .delegate(pb::WorkloadDelegateRequest {
            subject_token: parent.token.clone(),
            actor: "planner".into(),
            scopes: vec!["read".into()],
            ttl_secs: 60,
        })
        .await
        .map_err(crate::admin::refused)?
        .into_inner();
    let claims = unverified_claims(&child.token)?;
    println!(
        "    delegated to sub-agent \"planner\" (RFC 8693 at the cache): scope {}, act {}, parent_jtis {}",
        claims["scope"], claims["act"], claims["parent_jtis"]
    );
    let wider = w
        .delegate(pb::WorkloadDelegateRequest {
            subject_token: child.token.clone(),
            actor: "greedy".into(),
            scopes: vec!["write".into()],
            ttl_secs: 0,
        })
        .await;
    if let Err(s) = wider {
        println!(
            "    a wider delegation is refused: {:?}: {}",
            s.code(),
            s.message()
        );
    } else {
        anyhow::bail!("a delegation widened the scopes");
    }
    let target = format!(
        "http://{}/v1/models",
        agent
            .config()
            .proxy
            .as_ref()
            .and_then(|p| p.upstreams.first())
            .map(|u| u.host.clone())
            .unwrap_or_default()
    );
    if let Some(proxy) = at.proxy {
        let upstream = upstream_saw.lock().map(|g| g.len()).unwrap_or_default();
        let (status, body) = through_proxy(proxy, &target).await?;
        let injected = upstream_saw
            .lock()
            .ok()
            .and_then(|g| g.get(upstream).cloned())
            .unwrap_or_default();
        println!("    proxy            http://{proxy}");
        println!(
            "    GET {target} through the proxy: {status}; the upstream received \"Bearer <key>\" ({} bytes, injected); the process received: {}",
            injected.len(),
            body.trim()
        );
    }
    Ok((
        w,
        Running {
            socket: at.socket,
            proxy: at.proxy,
            target,
            task,
        },
        stop_tx,
    ))
}

/// The claims of a JWT, for printing (the walkthrough verifies tokens
/// properly in step 7).
fn unverified_claims(token: &str) -> anyhow::Result<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    Ok(serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?,
    )?)
}

fn print_endpoints(lattice: &Lattice, dir: &Path) {
    println!("Endpoints:");
    println!("    control plane  {}", lattice.cp_cfg.listen);
    for c in &lattice.caches {
        println!("    {}  {}", c.cfg.id, c.addr());
    }
    println!(
        "Try: lattice status --control-plane {} --admin-dir {}",
        lattice.cp_cfg.listen,
        dir.join("cp/admin").display()
    );
}

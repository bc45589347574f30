//! The core promise: a revocation committed at the control plane is enforced
//! by every cache, within milliseconds normally and by L at the latest; a
//! cache that cannot prove freshness refuses to mint.

use crate::common;

use std::time::Duration;

use common::*;
use lattice::harness::{Lattice, Spec, WAIT};
use lattice_shared::clock::Clock;
use lattice_shared::id::SpiffeId;
use lattice_shared::proto as pb;
use lattice_shared::revocation::Target;
use tonic::Code;

fn agent_id(name: &str) -> SpiffeId {
    SpiffeId::parse(&Lattice::agent_id("eu", name)).expect("id")
}

fn code(e: &lattice_edge_agent::Error) -> Code {
    match e {
        lattice_edge_agent::Error::Refused { code, .. } => *code,
        _ => Code::Unknown,
    }
}

async fn wait_revoked(agent: &lattice_edge_agent::Agent) {
    let mut rx = agent.revoked_signal();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|r| *r))
        .await
        .expect("agent learns of its revocation")
        .expect("signal");
}

#[tokio::test]
async fn a_revoked_agent_cannot_mint_renew_or_enrol_and_forgets_its_credentials() {
    let (l, _clock) = lattice().await;
    let agent = l.agents[0].clone();
    let held = agent.mint(AUDIENCE, &[], None).await.expect("mint before");
    assert_eq!(agent.held_jtis(), vec![held.jti.clone()]);
    // Keep a client on the agent's existing connection to show it is cut too.
    let mut raw = agent.cache_client(None).expect("client");

    let base = l.cp().event_log().head();
    let ev = l.revoke(Target::Agent(agent.id.clone())).expect("revoke");
    assert_eq!(ev.seq, base + 1);
    l.wait_all_applied(ev.seq)
        .await
        .expect("every cache applies it");

    let s = raw
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("revoked");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("revoked"), "{s:?}");
    let csr = lattice_shared::pki::PrivateKey::generate_p256()
        .expect("k")
        .csr_der()
        .expect("csr");
    let s = raw
        .issue_certificate(pb::IssueCertificateRequest {
            csr,
            ..Default::default()
        })
        .await
        .expect_err("no renewal");
    assert_eq!(s.code(), Code::PermissionDenied);

    // The agent dropped everything it held.
    wait_revoked(&agent).await;
    assert!(agent.held_jtis().is_empty());
    assert!(matches!(
        agent.mint(AUDIENCE, &[], None).await,
        Err(lattice_edge_agent::Error::Revoked)
    ));

    // A fresh join token for the same id does not bring it back.
    let token = l.join_token(agent.id.as_str(), None).expect("token");
    let mut anon = raw_cache_client(&l, &l.clock, l.caches[0].addr(), "eu", None);
    let csr = lattice_shared::pki::PrivateKey::generate_p256()
        .expect("k")
        .csr_der()
        .expect("csr");
    let s = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: token,
            requested_id: String::new(),
            csr,
            ..Default::default()
        })
        .await
        .expect_err("no enrolment");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("revoked"), "{s:?}");

    // A new connection fails at the handshake.
    let fresh = agent
        .cache_client(Some(agent.current_cache()))
        .expect("client");
    assert!(
        fresh
            .clone()
            .ping(pb::PingRequest { payload: vec![] })
            .await
            .is_err()
    );
    l.shutdown().await;
}

#[tokio::test]
async fn token_serial_before_and_join_token_targets() {
    let spec = Spec {
        agents: vec![
            ("eu".into(), "a".into()),
            ("eu".into(), "b".into()),
            ("eu".into(), "c".into()),
        ],
        ..Spec::default()
    };
    let (l, clock) = lattice_with(spec).await;
    let (a, b, c) = (
        l.agents[0].clone(),
        l.agents[1].clone(),
        l.agents[2].clone(),
    );

    // One token: the agent drops it, the others stay.
    let t1 = a.mint(AUDIENCE, &[], None).await.expect("mint");
    let t2 = a.mint(AUDIENCE, &[], None).await.expect("mint");
    let mut events = a.subscribe();
    let ev = l.revoke(Target::Jti(t1.jti.clone())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(lattice_edge_agent::AgentEvent::TokenRevoked { jti }) = events.recv().await
                && jti == t1.jti
            {
                break;
            }
        }
    })
    .await
    .expect("agent drops the revoked token");
    assert_eq!(a.held_jtis(), vec![t2.jti.clone()]);
    a.mint(AUDIENCE, &[], None)
        .await
        .expect("the agent itself is not revoked");

    // One certificate, by serial.
    let serial = b.chain().info.serial_hex;
    let ev = l.revoke(Target::CertSerial(serial)).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    let e = b
        .cache_client(None)
        .expect("client")
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("serial revoked");
    assert_eq!(e.code(), Code::PermissionDenied);
    wait_revoked(&b).await;

    // Everything of `c` issued before now.
    clock.advance(Duration::from_secs(1));
    // 0 means "now" at the control plane: its clock, rounded up.
    let ev = l
        .revoke(Target::SubjectBefore {
            subject: c.id.clone(),
            issued_before_unix: 0,
        })
        .expect("revoke");
    match &ev.body {
        Some(pb::lattice_event::Body::Revocation(pb::Revocation {
            target: Some(pb::revocation::Target::SubjectBefore(sb)),
            ..
        })) => assert_eq!(sb.issued_before_unix, clock.now_unix() + 1),
        other => panic!("unexpected event {other:?}"),
    }
    l.wait_all_applied(ev.seq).await.expect("applied");
    l.caches[0].wait_fresh().await.expect("fresh");
    let e = c
        .cache_client(None)
        .expect("client")
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("cut off");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("cutoff"), "{e:?}");
    wait_revoked(&c).await;

    // A join token revoked before use.
    let token = l
        .join_token(&Lattice::agent_id("eu", "d"), None)
        .expect("token");
    let hash = lattice_shared::pki::sha256(token.as_bytes());
    let ev = l.revoke(Target::JoinToken(hash)).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    let mut anon = raw_cache_client(&l, &l.clock, l.caches[0].addr(), "eu", None);
    let csr = lattice_shared::pki::PrivateKey::generate_p256()
        .expect("k")
        .csr_der()
        .expect("csr");
    let s = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: token,
            requested_id: String::new(),
            csr,
            ..Default::default()
        })
        .await
        .expect_err("revoked token");
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("revoked"), "{s:?}");
    l.shutdown().await;
}

#[tokio::test]
async fn a_revoked_cache_leaves_every_jwks_and_its_agents_are_refused_elsewhere() {
    let spec = Spec {
        caches: vec![("eu".into(), "c1".into()), ("eu".into(), "c2".into())],
        agents: vec![("eu".into(), "a".into())],
        ..Spec::default()
    };
    let (l, clock) = lattice_with(spec).await;
    let c1 = l.caches[0].id();
    let c1_kid = l.caches[0].app().identity().signer.kid().to_owned();
    assert!(l.caches[1].app().jwks_json().contains(&c1_kid));
    // The agent enrolled at c1; its chain carries c1's intermediate.
    let chain = l.agents[0].chain();

    let ev = l.revoke(Target::Cache(c1.clone())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");

    assert!(
        !l.caches[1].app().jwks_json().contains(&c1_kid),
        "key left c2's JWKS"
    );
    // c1 refuses to mint at once, even for an agent certified by c2.
    let key2 = lattice_shared::pki::PrivateKey::generate_p256().expect("k");
    let token = l
        .join_token(&Lattice::agent_id("eu", "via-c2"), None)
        .expect("token");
    let mut anon = raw_cache_client(&l, &l.clock, l.caches[1].addr(), "eu", None);
    let enrolled = anon
        .enrol(pb::EnrolAgentRequest {
            join_token: token,
            requested_id: String::new(),
            csr: key2.csr_der().expect("csr"),
            ..Default::default()
        })
        .await
        .expect("enrols at c2")
        .into_inner()
        .chain
        .expect("chain");
    let mut at_c1 = raw_cache_client(
        &l,
        &l.clock,
        l.caches[0].addr(),
        "eu",
        Some((vec![enrolled.leaf, enrolled.intermediate], &key2)),
    );
    let s = at_c1
        .mint_token(mint_req(AUDIENCE))
        .await
        .expect_err("c1 revoked");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("this cache"), "{s:?}");
    // The agent enrolled at c1 learns its issuer is gone and forgets itself.
    wait_revoked(&l.agents[0]).await;
    // An agent certificate issued by c1's intermediate is refused at c2.
    let key = lattice_shared::pki::PrivateKey::generate_p256().expect("k");
    let ident = l.caches[0].app().identity();
    let leaf = ident
        .ca
        .issue(
            &key.csr_der().expect("csr"),
            &agent_id("other"),
            lattice_shared::pki::Profile::TlsClient,
            clock.now(),
            HOUR,
        )
        .expect("leaf");
    let mut at_c2 = raw_cache_client(
        &l,
        &l.clock,
        l.caches[1].addr(),
        "eu",
        Some((vec![leaf, chain.intermediate.clone()], &key)),
    );
    assert!(at_c2.mint_token(mint_req(AUDIENCE)).await.is_err());
    // The control plane no longer lists the key either.
    l.caches[1]
        .app()
        .refresh_jwks()
        .await
        .expect("refresh from the control plane");
    assert!(!l.caches[1].app().jwks_json().contains(&c1_kid));
    l.shutdown().await;
}

#[tokio::test]
async fn a_partitioned_cache_refuses_after_l_on_the_fake_clock_and_recovers_when_healed() {
    let spec = Spec {
        agents: vec![("eu".into(), "a".into()), ("us".into(), "b".into())],
        ..Spec::default()
    };
    let (l, clock) = lattice_with(spec).await;
    let (eu, us) = (&l.caches[0], &l.caches[1]);
    eu.partition();
    // Revocations committed meanwhile reach only the connected cache.
    let ev = l.revoke(Target::Jti("some-token".into())).expect("revoke");
    us.wait_applied(ev.seq).await.expect("us applies");
    assert!(eu.app().applied() < ev.seq, "eu is cut off");

    // Within L the partitioned cache still serves (its last proof is recent)...
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("within L");
    // ...and one tick past L it refuses, saying why.
    clock.advance(l.caches[0].app().max_staleness() + Duration::from_millis(1));
    let e = l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect_err("stale");
    assert_eq!(code(&e), Code::Unavailable, "{e}");
    assert!(e.to_string().contains("stale"), "{e}");
    // The other cache proves freshness again and keeps serving.
    us.wait_fresh().await.expect("us fresh");
    l.agents[1]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("us serves");

    eu.heal();
    eu.wait_applied(ev.seq).await.expect("eu catches up");
    eu.wait_fresh().await.expect("eu fresh again");
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("eu serves again");
    l.shutdown().await;
}

/// Issue #18: `Enrol` was the one issuing path without the freshness
/// check, so a cache cut off for longer than L still enrolled agents (it
/// cannot know their token or id was revoked meanwhile). It refuses now,
/// `UNAVAILABLE`, and the join token is not burned: the same token enrols
/// once the cache is fresh again.
#[tokio::test]
async fn a_stale_cache_enrols_no_one_and_keeps_the_join_token_usable() {
    let (l, clock) = lattice().await;
    let eu = &l.caches[0];
    let id = Lattice::agent_id("eu", "late");
    let token = l.join_token(&id, None).expect("token");
    let enrol = || async {
        let key = lattice_shared::pki::PrivateKey::generate_p256().expect("key");
        raw_cache_client(&l, &clock.shared(), eu.addr(), "eu", None)
            .enrol(pb::EnrolAgentRequest {
                join_token: token.clone(),
                csr: key.csr_der().expect("csr"),
                ..Default::default()
            })
            .await
    };
    eu.partition();
    clock.advance(eu.app().max_staleness() + Duration::from_millis(1));
    let e = enrol().await.expect_err("a stale cache enrols no one");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("stale"), "{e:?}");
    eu.heal();
    eu.wait_fresh().await.expect("fresh again");
    let enrolled = enrol()
        .await
        .expect("the token was not burned")
        .into_inner();
    assert!(enrolled.chain.is_some());
    l.shutdown().await;
}

#[tokio::test]
async fn a_partitioned_cache_refuses_after_l_in_real_time() {
    let spec = Spec {
        agents: vec![("eu".into(), "a".into()), ("us".into(), "b".into())],
        max_staleness: Duration::from_millis(300),
        ..Spec::default()
    };
    let l = Lattice::start(spec, lattice_shared::clock::SystemClock::shared())
        .await
        .expect("lattice");
    let started = std::time::Instant::now();
    l.caches[0].partition();
    // Poll until the refusal (bounded); a cache that never went stale fails here.
    let refused_at = eventually(
        "the partitioned cache refuses",
        Duration::from_secs(10),
        async || match l.agents[0].mint(AUDIENCE, &[], None).await {
            Err(e) if code(&e) == Code::Unavailable => Some(started.elapsed()),
            Ok(_) => None,
            Err(e) => panic!("unexpected error {e}"),
        },
    )
    .await;
    assert!(
        refused_at >= Duration::from_millis(300) - Duration::from_millis(300 / 5 + 20),
        "refused too early: {refused_at:?}"
    );
    // The silent link is detected as dead (no message for 3 ping periods,
    // at least 1 s), although TCP still looks open through the black hole.
    eventually(
        "a silent link is dropped",
        Duration::from_secs(10),
        async || !l.caches[0].app().connected(),
    )
    .await;
    l.agents[1]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("the other cache serves");
    l.caches[0].heal();
    l.caches[0].wait_fresh().await.expect("fresh again");
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("serves again");
    l.shutdown().await;
}

/// Issue #18: when the cache's existing connection was black-holed (a lost
/// NAT or conntrack entry, a load-balancer failover) while new connections
/// would have worked, the cache retried `Sync` over the same dead HTTP/2
/// connection and stayed stale until the socket was reset from outside. A
/// link found dead is re-dialled on a new connection: fresh again within
/// twice the silence timeout of the black hole starting, with no help.
#[tokio::test]
async fn a_black_holed_connection_is_replaced_by_a_new_one_without_help() {
    let spec = Spec {
        agents: vec![("eu".into(), "a".into())],
        max_staleness: Duration::from_millis(300),
        ..Spec::default()
    };
    let l = Lattice::start(spec, lattice_shared::clock::SystemClock::shared())
        .await
        .expect("lattice");
    let eu = &l.caches[0];
    eu.wait_fresh().await.expect("fresh");
    // The silence timeout: 3 ping periods (L/5 each), at least 1 s.
    let silence = (eu.app().max_staleness() / 5 * 3).max(Duration::from_secs(1));
    let started = std::time::Instant::now();
    eu.black_hole_existing_connections();
    eventually(
        "the cache notices its link is silent",
        Duration::from_secs(10),
        async || !eu.app().is_fresh(),
    )
    .await;
    let ev = l
        .revoke(Target::Jti("after-the-black-hole".into()))
        .expect("revoke");
    eventually(
        "fresh again over a new connection",
        Duration::from_secs(30),
        async || eu.app().is_fresh() && eu.app().applied() >= ev.seq,
    )
    .await;
    let took = started.elapsed();
    assert!(
        took <= 2 * silence,
        "fresh again {took:?} after the black hole (silence timeout {silence:?})"
    );
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("serves again");
    l.shutdown().await;
}

/// Issue #18: the cache awaited its sends to the stream inside the loop
/// that also runs the silence timer, so a link black-holed while the cache
/// sent a large audit backlog filled the queue, a ping's send never
/// returned, and the dead link was never given up (HTTP/2 keepalive ended
/// it some 20 s later). Now sends only queue: the link is given up within
/// the silence timeout (3 ping periods) and the backlog reaches the control
/// plane over a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_black_holed_during_an_audit_backlog_is_given_up_within_the_silence_timeout() {
    let spec = Spec {
        agents: vec![("eu".into(), "a".into())],
        max_staleness: Duration::from_millis(300),
        ..Spec::default()
    };
    let l = Lattice::start(spec, lattice_shared::clock::SystemClock::shared())
        .await
        .expect("lattice");
    let eu = &l.caches[0];
    eu.wait_fresh().await.expect("fresh");
    let silence = (eu.app().max_staleness() / 5 * 3).max(Duration::from_secs(1));
    // A backlog builds while the link is down.
    eu.link.set(lattice::faults::Mode::Drop);
    eventually("the link is down", WAIT, async || !eu.app().connected()).await;
    let outbox = eu.app().outbox();
    let record = |i: u64| lattice_regional_cache::AuditEvent::Refused {
        cache: eu.id(),
        agent: l.agents[0].id.clone(),
        source: "127.0.0.1".into(),
        request_id: format!("backlog-{i}"),
        action: "MintToken".into(),
        resource: "https://api.example.com".into(),
        // Records of 4 KiB: what is in flight outgrows HTTP/2's windows.
        reason: "x".repeat(4096),
        at_unix_ms: l.cp().now_ms(),
        policy_version: 1,
    };
    for i in 0..6_000 {
        let _ = outbox.record(record(i).to_record("eu"));
    }
    let last = outbox.flush_now().expect("written");
    let before = outbox.acked();
    eu.heal();
    eventually("the backlog flows", WAIT, async || outbox.acked() > before).await;
    // The connection carrying it turns into a black hole; new ones work.
    eu.black_hole_existing_connections();
    let started = std::time::Instant::now();
    assert!(outbox.acked() < last, "the backlog was still flowing");
    eventually(
        "the cache gives the dead link up",
        Duration::from_secs(30),
        async || !eu.app().connected(),
    )
    .await;
    let noticed = started.elapsed();
    eventually(
        "the whole backlog reaches the control plane",
        Duration::from_secs(60),
        async || outbox.acked() >= last,
    )
    .await;
    let drained = started.elapsed();
    // Within 3 silence timeouts (the cache's is 1 s here: 3 ping periods,
    // at least 1 s; the old code waited for HTTP/2 keepalive, ~20 s), and
    // the backlog resumes over the new connection.
    assert!(
        noticed <= 3 * silence,
        "the dead link was given up {noticed:?} after the black hole (silence timeout {silence:?})"
    );
    assert!(
        drained <= noticed + Duration::from_secs(10),
        "the backlog resumed over the new connection only {drained:?} after the black hole"
    );
    l.shutdown().await;
}

/// Issue #18: `WatchRevocations` was open to any identity and unlimited
/// per peer (each stream reads the backlog on the blocking pool). Only
/// agents of the cache's region follow it, at most 4 streams each.
#[tokio::test]
async fn only_the_regions_agents_watch_revocations_and_each_within_a_limit() {
    let clock = lattice_shared::clock::SystemClock::shared();
    let spec = Spec {
        agents: vec![("eu".into(), "a".into())],
        ..Spec::default()
    };
    let l = Lattice::start(spec, clock.clone()).await.expect("lattice");
    let (eu, us) = (l.caches[0].addr(), l.caches[1].addr());
    // An agent of the us region, enrolled at its cache, asks the eu cache.
    let key = lattice_shared::pki::PrivateKey::generate_p256().expect("key");
    let token = l
        .join_token(&Lattice::agent_id("us", "b"), None)
        .expect("token");
    let chain = raw_cache_client(&l, &clock, us, "us", None)
        .enrol(pb::EnrolAgentRequest {
            join_token: token,
            csr: key.csr_der().expect("csr"),
            ..Default::default()
        })
        .await
        .expect("enrols at us")
        .into_inner()
        .chain
        .expect("chain");
    let e = raw_cache_client(
        &l,
        &clock,
        eu,
        "eu",
        Some((vec![chain.leaf, chain.intermediate], &key)),
    )
    .watch_revocations(pb::WatchRevocationsRequest { after_seq: 0 })
    .await
    .expect_err("a us agent at the eu cache");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("agents of region eu"), "{e:?}");
    // The eu agent follows its cache already; more streams up to the limit.
    let watch = async |agent: usize| {
        l.agents[agent]
            .cache_client(Some(eu))
            .expect("client")
            .watch_revocations(pb::WatchRevocationsRequest { after_seq: 0 })
            .await
    };
    let mut open = Vec::new();
    let refused = loop {
        match watch(0).await {
            Ok(s) => open.push(s),
            Err(e) => break e,
        }
        assert!(open.len() <= lattice_regional_cache::MAX_WATCHES_PER_FOLLOWER);
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // The agent's own watcher holds one place (unless not yet connected).
    let max = lattice_regional_cache::MAX_WATCHES_PER_FOLLOWER;
    assert!(
        (max - 1..=max).contains(&open.len()),
        "{} opened",
        open.len()
    );
    // A stream that ends gives its place back.
    open.pop();
    eventually("a place is free again", WAIT, async || {
        watch(0).await.is_ok()
    })
    .await;
    l.shutdown().await;
}

#[tokio::test]
async fn delayed_and_dropped_links_still_deliver_everything_in_order() {
    let (l, _clock) = lattice().await;
    l.caches[0]
        .link
        .set(lattice::faults::Mode::Delay(Duration::from_millis(30)));
    l.caches[1].link.set(lattice::faults::Mode::Drop);
    let before = l.caches[1].app().applied();
    let mut last = 0;
    for i in 0..20 {
        last = l.revoke(Target::Jti(format!("t{i}"))).expect("revoke").seq;
    }
    l.caches[0]
        .wait_applied(last)
        .await
        .expect("delayed link delivers");
    assert_eq!(l.caches[1].app().applied(), before);
    l.caches[1].heal();
    l.caches[1]
        .wait_applied(last)
        .await
        .expect("dropped link reconnects and catches up");
    for c in &l.caches {
        let set = c.app().revocations();
        assert!((0..20).all(|i| set.is_jti_revoked(&format!("t{i}"))));
    }
    l.shutdown().await;
}

#[tokio::test]
async fn control_plane_restart_mid_stream_and_cache_restart_leave_no_gap() {
    let (mut l, _clock) = lattice().await;
    let base = l.cp().event_log().head();
    for i in 0..5 {
        l.revoke(Target::Jti(format!("a{i}"))).expect("revoke");
    }
    l.restart_cp().await.expect("cp restarts");
    assert_eq!(
        l.cp().event_log().head(),
        base + 5,
        "acknowledged revocations survived"
    );
    for i in 0..5 {
        l.revoke(Target::Jti(format!("b{i}"))).expect("revoke");
    }
    l.wait_all_applied(base + 10)
        .await
        .expect("caches reconnect and catch up");

    // A cache that is down while revocations happen resumes from its last
    // durable sequence.
    l.stop_cache(1).await.expect("stop");
    for i in 0..5 {
        l.revoke(Target::Jti(format!("c{i}"))).expect("revoke");
    }
    l.start_cache(1).await.expect("start");
    assert!(
        l.caches[1].app().applied() >= base + 10,
        "durable state kept across restart"
    );
    l.caches[1]
        .wait_applied(base + 15)
        .await
        .expect("catches up");
    l.caches[1].wait_fresh().await.expect("fresh");
    let set = l.caches[1].app().revocations();
    assert_eq!(
        set.len(),
        15,
        "each event applied once: no gap, no duplicate"
    );
    l.shutdown().await;
}

#[tokio::test]
async fn status_reports_each_cache() {
    let (l, _clock) = lattice().await;
    let ev = l.revoke(Target::Jti("x".into())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    let mut admin =
        lattice::admin::connect(l.cp().local_addr(), &l.cp().admin_files().dir).expect("admin");
    // Acks arrive just after the durable apply; wait for the control plane to see them.
    let status = eventually(
        "acks reach the control plane",
        Duration::from_secs(20),
        async || {
            let s = admin
                .status(pb::StatusRequest {})
                .await
                .expect("status")
                .into_inner();
            if s.caches.iter().all(|c| c.acked_seq == ev.seq) {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
    .await;
    assert_eq!(status.head_seq, ev.seq);
    assert_eq!(status.caches.len(), 2);
    assert!(
        status
            .caches
            .iter()
            .all(|c| c.connected && !c.revoked && c.last_contact_unix_ms > 0)
    );
    // Each cache reports the bound L it enforces: the control plane has no
    // setting of its own for it.
    let enforced = u64::try_from(l.caches[0].app().max_staleness().as_millis()).expect("ms");
    assert!(
        status.caches.iter().all(|c| c.max_staleness_ms == enforced),
        "{status:?}"
    );
    // Revocations through the Admin API are acknowledged with their sequence.
    let r = admin
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::AgentId(Lattice::agent_id(
                    "eu", "zz",
                ))),
                reason: "test".into(),
            }),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(r.seq, ev.seq + 1);
    let bad = admin
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::AgentId("nope".into())),
                reason: String::new(),
            }),
        })
        .await
        .expect_err("invalid");
    assert_eq!(bad.code(), Code::InvalidArgument);
    l.shutdown().await;
}

#[tokio::test]
async fn a_client_that_knows_a_cache_is_revoked_does_not_trust_it_again() {
    let spec = Spec {
        caches: vec![("eu".into(), "c1".into()), ("eu".into(), "c2".into())],
        agents: vec![],
        ..Spec::default()
    };
    let (l, clock) = lattice_with(spec).await;
    let known = std::sync::Arc::new(lattice_edge_agent::KnownRevocations::default());
    known.apply(&lattice_shared::revocation::Revocation {
        target: Target::Cache(l.caches[0].id()),
        reason: String::new(),
    });
    // An enrolment attempt (server-auth TLS only) to each cache.
    let enrol_at = |addr| {
        let tls = lattice_shared::tls::client_config_checked(
            bundle(&l),
            clock.shared(),
            lattice_shared::tls::ExpectedServer::CacheIn(
                lattice_shared::id::RegionId::new("eu").expect("region"),
            ),
            None,
            Some(known.clone()),
        )
        .expect("tls");
        let mut c = pb::cache_client::CacheClient::new(
            lattice_shared::net::channel(addr, tls).expect("channel"),
        );
        async move {
            c.enrol(pb::EnrolAgentRequest {
                join_token: "ljt_x".into(),
                requested_id: String::new(),
                csr: vec![],
                ..Default::default()
            })
            .await
        }
    };
    // c2 answers (with a precise refusal); c1 is never even talked to, so it
    // would never see a join token.
    let at_c2 = enrol_at(l.caches[1].addr()).await.expect_err("bad request");
    assert_eq!(at_c2.code(), Code::InvalidArgument, "{at_c2:?}");
    let at_c1 = enrol_at(l.caches[0].addr()).await.expect_err("refused");
    assert!(
        !matches!(at_c1.code(), Code::InvalidArgument | Code::PermissionDenied),
        "{at_c1:?}"
    );
    l.shutdown().await;
}

/// Revoking only a cache's signing or CA certificate (not the cache) makes
/// it renew at once, not at half-life: until it does, nothing it signs or
/// issues verifies.
#[tokio::test]
async fn a_cache_whose_signing_or_ca_certificate_is_revoked_renews_at_once() {
    let (l, _clock) = lattice_with(Spec {
        agents: vec![("eu".into(), "a".into()), ("eu".into(), "svc".into())],
        ..Spec::default()
    })
    .await;
    let cache = l.caches[0].app();
    let verifier = fresh_verifier(&l, 1).await;

    let old_signing = cache.identity().signing_serial.clone();
    let ev = l
        .revoke(Target::CertSerial(old_signing.clone()))
        .expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    eventually(
        "the cache renews its signing certificate",
        WAIT,
        async || {
            let now = cache.identity().signing_serial.clone();
            if now != old_signing {
                Ok(())
            } else {
                Err(format!("still {now}"))
            }
        },
    )
    .await;
    let t = l.agents[0].mint(AUDIENCE, &[], None).await.expect("mint");
    eventually(
        "a token signed with the new key verifies",
        WAIT,
        async || verifier.verify(&t.token, AUDIENCE).await,
    )
    .await;

    let old_ca = cache.identity().ca.info().serial_hex.clone();
    let ev = l
        .revoke(Target::CertSerial(old_ca.clone()))
        .expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    eventually("the cache renews its CA certificate", WAIT, async || {
        let now = cache.identity().ca.info().serial_hex.clone();
        if now != old_ca {
            Ok(())
        } else {
            Err(format!("still {now}"))
        }
    })
    .await;
}

/// An fsync that fails at the control plane (EIO, ENOSPC) leaves no phantom
/// commit: the revocation in flight is answered "outcome unknown", never
/// "failed"; nothing is acknowledged after it; no cache is told of it; and a
/// restart serves exactly what is on disk, as one gapless log.
#[tokio::test]
async fn an_fsync_failure_at_the_control_plane_leaves_no_phantom_commit_after_restart() {
    let spec = Spec {
        caches: vec![("eu".into(), "c1".into())],
        agents: vec![],
        ..Spec::default()
    };
    let (mut l, _clock) = lattice_with(spec).await;
    let revoke = |name: &str| pb::RevokeRequest {
        revocation: Some(pb::Revocation {
            target: Some(pb::revocation::Target::AgentId(Lattice::agent_id(
                "eu", name,
            ))),
            reason: "fault test".into(),
        }),
    };
    let revoked = |l: &Lattice, name: &str| {
        l.cp()
            .event_log()
            .revocations()
            .is_agent_revoked(&SpiffeId::parse(&Lattice::agent_id("eu", name)).expect("id"))
    };
    let mut admin = l.bootstrap_admin().expect("admin");
    let first = admin
        .revoke(revoke("a1"))
        .await
        .expect("revoke")
        .into_inner()
        .seq;
    eventually("the cache applies a1", WAIT, async || {
        l.caches[0].app().applied() == first
    })
    .await;

    l.cp_sled().inject_fsync_failure();
    let in_flight = admin.revoke(revoke("a2")).await.expect_err("fsync failed");
    assert_eq!(in_flight.code(), Code::Unavailable, "{in_flight:?}");
    assert!(in_flight.message().contains("unknown"), "{in_flight:?}");
    let after = admin.revoke(revoke("a3")).await.expect_err("store stopped");
    assert_eq!(after.code(), Code::Unavailable, "{after:?}");
    assert_eq!(l.cp().event_log().head(), first, "nothing announced");
    assert!(!revoked(&l, "a2") && !revoked(&l, "a3"));
    assert_eq!(l.caches[0].app().applied(), first, "no cache was told");

    l.restart_cp().await.expect("restart");
    let head = l.cp().event_log().head();
    assert!(
        head == first || head == first + 1,
        "only the write in flight may have reached the disk: head {head}"
    );
    assert_eq!(revoked(&l, "a2"), head == first + 1, "head and state agree");
    assert!(!revoked(&l, "a3"), "refused, so never written");
    let mut admin = l.bootstrap_admin().expect("admin");
    let next = admin
        .revoke(revoke("a4"))
        .await
        .expect("revoke")
        .into_inner()
        .seq;
    assert_eq!(next, head + 1, "one gapless log");
    eventually("the cache applies what is on disk", WAIT, async || {
        l.caches[0].app().applied() == next
    })
    .await;
    l.shutdown().await;
}

/// Request work that fills tokio's blocking pool (a burst of enrolments, of
/// admin calls) must not hold back the cache's persistence: a revocation
/// still becomes durable at the cache and is acknowledged.
#[test]
fn a_full_blocking_pool_does_not_hold_back_the_caches_persistence() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (l, _clock) = lattice().await;
        let cache = &l.caches[0];
        // Both blocking threads taken, and known to be.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Arc::new(std::sync::Mutex::new(held));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let hogs: Vec<_> = (0..2)
            .map(|_| {
                let (held, started_tx) = (held.clone(), started_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let _ = started_tx.send(());
                    // One waits on the lock, the other on the channel.
                    let _ = held.lock().map(|rx| rx.recv());
                })
            })
            .collect();
        for _ in 0..2 {
            started.recv().await.expect("a hog started");
        }
        let ev = tokio::task::block_in_place(|| l.revoke(Target::Jti("during-the-burst".into())))
            .expect("revoke");
        let applied = cache.wait_applied(ev.seq).await;
        let _ = release.send(());
        let _ = release.send(());
        for h in hogs {
            let _ = h.await;
        }
        applied.expect("the revocation is durable at the cache while the blocking pool is full");
        l.shutdown().await;
    });
}

//! The shared verifier a service embeds: a token minted at a cache verifies
//! offline; once revoked it is refused as soon as the verifier's cache has
//! passed the revocation on; a verifier that cannot prove it is fresh refuses
//! everything as stale, and serves again once fresh.

use crate::common;

use std::time::Duration;

use common::*;
use lattice::harness::{Lattice, Spec, WAIT};
use lattice_shared::revocation::Target;
use lattice_shared::token::TokenError;
use lattice_shared::verifier::{RevocationReason, Verifier, VerifyError};

async fn verifier(l: &Lattice, svc: usize) -> Verifier {
    fresh_verifier(l, svc).await
}

async fn wait_fresh(v: &Verifier) {
    tokio::time::timeout(WAIT, v.follower().wait_fresh())
        .await
        .expect("the verifier becomes fresh");
}

async fn wait_applied(v: &Verifier, seq: u64) {
    tokio::time::timeout(WAIT, v.follower().wait_applied(seq))
        .await
        .expect("the verifier applies the revocation");
}

/// Waits for `n` more notices (heartbeats come every second).
async fn notices(v: &Verifier, n: usize) {
    let mut rx = v.follower().subscribe();
    rx.borrow_and_update();
    for _ in 0..n {
        tokio::time::timeout(WAIT, rx.changed())
            .await
            .expect("a notice arrives")
            .expect("follower running");
    }
}

fn revoked(r: Result<lattice_shared::token::Claims, VerifyError>) -> RevocationReason {
    match r {
        Err(VerifyError::Revoked(reason)) => reason,
        other => panic!("expected a revocation, got {other:?}"),
    }
}

#[tokio::test]
async fn a_minted_token_verifies_until_it_or_its_agent_is_revoked() {
    let spec = Spec {
        caches: vec![("eu".into(), "cache-1".into())],
        agents: vec![("eu".into(), "a".into()), ("eu".into(), "svc".into())],
        ..Spec::default()
    };
    let (mut l, _clock) = lattice_with(spec).await;
    let v = verifier(&l, 1).await;
    let (agent, svc) = (l.agents[0].clone(), l.agents[1].clone());

    let t = agent.mint(AUDIENCE, &[], None).await.expect("mint");
    let claims = v.verify(&t.token, AUDIENCE).await.expect("verifies");
    assert_eq!(claims.sub, agent.id.to_string());
    assert_eq!(claims.jti, t.jti);

    // The token's own checks come first.
    let e = v
        .verify(&t.token, "https://other.example.com")
        .await
        .expect_err("wrong audience");
    assert!(
        matches!(e, VerifyError::Token(TokenError::Invalid(_))),
        "{e}"
    );
    let mut forged = t.token.clone();
    let last = forged.pop().expect("non-empty");
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let e = v.verify(&forged, AUDIENCE).await.expect_err("forged");
    assert!(matches!(e, VerifyError::Token(_)), "{e}");
    assert!(!e.is_unavailable());

    // RFC 8705: bound to the agent's certificate, not the service's.
    let (held, other) = (agent.chain(), svc.chain());
    v.verify_bound(&t.token, AUDIENCE, &[held.leaf, held.intermediate])
        .await
        .expect("the holder's certificate");
    let e = v
        .verify_bound(&t.token, AUDIENCE, &[other.leaf, other.intermediate])
        .await
        .expect_err("another certificate");
    assert!(matches!(e, VerifyError::NotBound(_)), "{e}");

    // A cache that starts after the verifier: its key is fetched on first use.
    l.add_cache("eu", "cache-2").await.expect("second cache");
    l.refresh_jwks().await.expect("caches learn its key");
    let cache2 = l.caches[1].addr();
    let token = l
        .join_token(&Lattice::agent_id("eu", "b"), None)
        .expect("token");
    let b = l
        .add_agent_configured("eu", "b", token, |cfg| cfg.cache = cache2)
        .await
        .expect("agent at cache-2");
    let tb = l.agents[b].mint(AUDIENCE, &[], None).await.expect("mint");
    let claims = v.verify(&tb.token, AUDIENCE).await.expect("new key");
    assert_eq!(claims.iss, Lattice::cache_id("eu", "cache-2"));

    // Revoking the token: refused once the follower has applied it.
    let ev = l.revoke(Target::Jti(t.jti.clone())).expect("revoke");
    wait_applied(&v, ev.seq).await;
    let e = v.verify(&t.token, AUDIENCE).await;
    assert_eq!(revoked(e), RevocationReason::Token(t.jti.clone()));

    // Revoking the agent: every token of it.
    let t2 = agent.mint(AUDIENCE, &[], None).await.expect("mint");
    v.verify(&t2.token, AUDIENCE).await.expect("verifies");
    let ev = l.revoke(Target::Agent(agent.id.clone())).expect("revoke");
    wait_applied(&v, ev.seq).await;
    let e = v.verify(&t2.token, AUDIENCE).await;
    assert_eq!(revoked(e), RevocationReason::Agent(agent.id.clone()));
    let e = v
        .verify(&t2.token, AUDIENCE)
        .await
        .expect_err("still revoked");
    assert!(e.to_string().contains("has been revoked"), "{e}");

    // Revoking the issuing cache: its tokens are refused too.
    let ev = l
        .revoke(Target::Cache(l.caches[1].id()))
        .expect("revoke cache-2");
    wait_applied(&v, ev.seq).await;
    let e = v.verify(&tb.token, AUDIENCE).await;
    assert_eq!(revoked(e), RevocationReason::Issuer(l.caches[1].id()));
    l.shutdown().await;
}

#[tokio::test]
async fn a_verifier_that_cannot_prove_freshness_refuses_as_stale_and_recovers() {
    let spec = Spec {
        caches: vec![("eu".into(), "cache-1".into())],
        agents: vec![("eu".into(), "a".into()), ("eu".into(), "svc".into())],
        ..Spec::default()
    };
    let (mut l, clock) = lattice_with(spec).await;
    let v = verifier(&l, 1).await;
    let limit = v.follower().max_staleness() + Duration::from_millis(1);
    let t = l.agents[0].mint(AUDIENCE, &[], None).await.expect("mint");
    v.verify(&t.token, AUDIENCE).await.expect("verifies");

    // The cache is cut from the control plane: its heartbeats go on, but
    // say it is stale, and so is the verifier once past L.
    l.caches[0].partition();
    clock.advance(limit);
    // A heartbeat sent before the jump may still be on its way; the one
    // after it reports the cache's staleness on the new clock.
    notices(&v, 2).await;
    let e = v.verify(&t.token, AUDIENCE).await.expect_err("stale");
    assert!(matches!(e, VerifyError::Stale { .. }), "{e}");
    assert!(e.is_unavailable());
    assert!(e.to_string().contains("stale"), "{e}");

    l.caches[0].heal();
    l.caches[0].wait_fresh().await.expect("cache fresh again");
    wait_fresh(&v).await;
    v.verify(&t.token, AUDIENCE)
        .await
        .expect("verifies again once fresh");

    // The cache goes away altogether; a revocation is committed meanwhile.
    l.stop_cache(0).await.expect("stop");
    let mut status = v.follower().subscribe();
    tokio::time::timeout(WAIT, status.wait_for(|s| !s.connected))
        .await
        .expect("the follower sees the stream end")
        .expect("follower running");
    let ev = l.revoke(Target::Jti(t.jti.clone())).expect("revoke");
    v.verify(&t.token, AUDIENCE)
        .await
        .expect("within L the verifier still decides");
    clock.advance(limit);
    let e = v.verify(&t.token, AUDIENCE).await.expect_err("stale");
    match e {
        VerifyError::Stale {
            staleness_ms: Some(ms),
            max_staleness_ms,
        } => assert!(ms > max_staleness_ms),
        other => panic!("expected stale, got {other:?}"),
    }

    // Back: the follower reconnects, resumes after what it holds and gets
    // the revocation it missed.
    l.start_cache(0).await.expect("start");
    l.caches[0]
        .wait_applied(ev.seq)
        .await
        .expect("cache catches up");
    l.caches[0].wait_fresh().await.expect("cache fresh");
    wait_applied(&v, ev.seq).await;
    wait_fresh(&v).await;
    let e = v.verify(&t.token, AUDIENCE).await;
    assert_eq!(revoked(e), RevocationReason::Token(t.jti.clone()));
    l.shutdown().await;
}

#[tokio::test]
async fn a_delegated_token_verifies_and_falls_with_its_parent() {
    let spec = Spec {
        caches: vec![("eu".into(), "cache-1".into())],
        agents: vec![("eu".into(), "a".into()), ("eu".into(), "svc".into())],
        ..Spec::default()
    };
    let (l, _clock) = lattice_with(spec).await;
    let v = verifier(&l, 1).await;
    let agent = l.agents[0].clone();
    let parent = agent
        .mint(AUDIENCE, &["read".into(), "write".into()], None)
        .await
        .expect("mint");
    let child = agent
        .delegate(&parent.token, "planner", &["read".into()], None)
        .await
        .expect("delegate");
    let grandchild = agent
        .delegate(child.token.as_str(), "summariser", &["read".into()], None)
        .await
        .expect("delegate again");
    for t in [&child, &grandchild] {
        let c = v
            .verify(t.token.as_str(), AUDIENCE)
            .await
            .expect("verifies");
        assert_eq!(c.sub, agent.id.to_string());
        assert_eq!(c.scope, "read");
        assert!(c.act.is_some());
    }

    let ev = l.revoke(Target::Jti(parent.jti.clone())).expect("revoke");
    wait_applied(&v, ev.seq).await;
    for t in [&child, &grandchild] {
        assert_eq!(
            revoked(v.verify(t.token.as_str(), AUDIENCE).await),
            RevocationReason::Parent(parent.jti.clone()),
            "revoking a parent revokes every token delegated from it"
        );
    }
}

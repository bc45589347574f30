//! The runbooks of `docs/runbooks/`, played against an in-process lattice
//! with the Admin RPCs their commands call; each reports its time to
//! containment (run with `--nocapture` to see it) and asserts that
//! containment holds.

use crate::common;

use std::time::{Duration, Instant};

use lattice::harness::{Spec, WAIT};
use lattice_shared::policy::AdminRole;
use lattice_shared::proto as pb;

fn revoke(target: pb::revocation::Target, reason: &str) -> pb::RevokeRequest {
    pb::RevokeRequest {
        revocation: Some(pb::Revocation {
            target: Some(target),
            reason: reason.into(),
        }),
    }
}

fn report(runbook: &str, took: Duration) {
    eprintln!(
        "runbook {runbook}: contained {:.1} ms after the command",
        took.as_secs_f64() * 1e3
    );
}

#[tokio::test]
async fn stolen_agent_key() {
    let (l, _clock) = common::lattice().await;
    let agent = l.agents[0].clone();
    agent
        .mint(common::AUDIENCE, &["read".into()], None)
        .await
        .expect("mints before");
    let mut admin = l.bootstrap_admin().expect("admin");
    let t0 = Instant::now();
    let seq = admin
        .revoke(revoke(
            pb::revocation::Target::AgentId(agent.id.to_string()),
            "device stolen",
        ))
        .await
        .expect("lattice revoke agent")
        .into_inner()
        .seq;
    l.wait_all_applied(seq)
        .await
        .expect("every cache applied it");
    // The thief's key: a fresh connection with the agent's certificate.
    let mut thief = agent
        .cache_client(Some(agent.current_cache()))
        .expect("client");
    // Polled: containment is a state of several parties that no one event
    // announces.
    common::eventually("contained: the stolen key is refused", WAIT, async || {
        thief
            .mint_token(common::mint_req(common::AUDIENCE))
            .await
            .is_err()
    })
    .await;
    report("stolen-agent-key", t0.elapsed());
}

#[tokio::test]
async fn compromised_cache() {
    let (mut l, _clock) = common::lattice_with(Spec {
        caches: vec![
            ("eu".into(), "cache-1".into()),
            ("eu".into(), "cache-2".into()),
            ("us".into(), "cache-1".into()),
        ],
        ..Spec::default()
    })
    .await;
    let agent = l.agents[0].clone();
    let token = agent
        .mint(common::AUDIENCE, &["read".into()], None)
        .await
        .expect("mint at the doomed cache");
    let bad = l.caches[0].id();
    let mut admin = l.bootstrap_admin().expect("admin");
    let t0 = Instant::now();
    let seq = admin
        .revoke(revoke(
            pb::revocation::Target::CacheId(bad.to_string()),
            "host compromised",
        ))
        .await
        .expect("lattice revoke cache")
        .into_inner()
        .seq;
    for c in &l.caches[1..] {
        c.wait_applied(seq).await.expect("applied");
    }
    // Its signing key has left every other cache's JWKS...
    for c in &l.caches[1..] {
        let jwks = c.app().jwks_json();
        assert!(
            !jwks.contains(&token.kid),
            "{} still publishes the revoked cache's key",
            c.id()
        );
    }
    // ...and an agent it certified is refused by the other cache of its
    // region.
    let mut elsewhere = agent
        .cache_client(Some(l.caches[1].addr()))
        .expect("client");
    common::eventually(
        "contained: an agent certified by the revoked cache is refused",
        WAIT,
        async || {
            elsewhere
                .mint_token(common::mint_req(common::AUDIENCE))
                .await
                .is_err()
        },
    )
    .await;
    report("compromised-cache", t0.elapsed());
    l.stop_cache(0).await.expect("taken down");

    // Step 4: a replacement holds no secret until a custodian grants it.
    l.add_cache_without_custody("eu", "cache-3")
        .await
        .expect("the replacement enrols");
    let id = lattice::harness::Lattice::cache_id("eu", "cache-3");
    let custody = |s: &pb::StatusResponse| {
        s.caches
            .iter()
            .find(|c| c.cache_id == id)
            .map(|c| c.custody.clone())
    };
    let status = admin.status(pb::StatusRequest {}).await.expect("status");
    assert_eq!(custody(status.get_ref()).as_deref(), Some("pending"));
    let mut carol = l
        .admin(
            "carol",
            &[lattice_shared::policy::AdminRole::SecretCustodian],
            &[],
        )
        .expect("custodian");
    carol
        .grant_custody(pb::GrantCustodyRequest {
            cache_id: id.clone(),
        })
        .await
        .expect("lattice grant-custody");
    let status = admin.status(pb::StatusRequest {}).await.expect("status");
    assert_eq!(custody(status.get_ref()).as_deref(), Some("granted"));
}

#[tokio::test]
async fn leaked_upstream_key() {
    let (l, _clock) = common::lattice_with(Spec {
        secrets: vec!["openai".into()],
        ..Spec::default()
    })
    .await;
    let mut carol = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("custodian");
    let put = |v: &[u8]| pb::PutSecretRequest {
        name: "openai".into(),
        value: v.to_vec(),
        regions: vec!["eu".into()],
        message: String::new(),
    };
    carol.put_secret(put(b"sk-leaked")).await.expect("v1");
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
    let agent = l.agents[0].clone();
    assert_eq!(
        agent
            .lease_secret("openai", 0, None)
            .await
            .expect("lease")
            .version,
        1
    );

    let t0 = Instant::now();
    // 1. the new key from the provider, 2. the leaked version revoked.
    carol.put_secret(put(b"sk-fresh")).await.expect("v2");
    let mut admin = l.bootstrap_admin().expect("admin");
    let seq = admin
        .revoke(revoke(
            pb::revocation::Target::SecretVersion(pb::SecretVersionRef {
                name: "openai".into(),
                version: 1,
            }),
            "leaked",
        ))
        .await
        .or(carol
            .revoke(revoke(
                pb::revocation::Target::SecretVersion(pb::SecretVersionRef {
                    name: "openai".into(),
                    version: 1,
                }),
                "leaked",
            ))
            .await)
        .expect("lattice secret revoke-version")
        .into_inner()
        .seq;
    l.wait_all_applied(seq).await.expect("applied");
    let refused = agent
        .lease_secret("openai", 1, None)
        .await
        .expect_err("the leaked version is never leased again");
    assert!(format!("{refused}").contains("revoked"), "{refused}");
    let active = agent.lease_secret("openai", 0, None).await.expect("lease");
    assert_eq!(active.version, 2);
    assert_eq!(active.value.as_slice(), b"sk-fresh");
    report("leaked-upstream-key", t0.elapsed());
}

#[tokio::test]
async fn lost_admin_certificate() {
    let (l, clock) = common::lattice().await;
    let mut lost = l
        .admin("carol", &[AdminRole::PlatformAdmin], &[])
        .expect("carol");
    lost.status(pb::StatusRequest {})
        .await
        .expect("works before");
    let mut admin = l.bootstrap_admin().expect("admin");
    let t0 = Instant::now();
    admin
        .revoke(revoke(
            pb::revocation::Target::SubjectBefore(pb::SubjectBefore {
                subject: format!("spiffe://{}/admin/carol", lattice::harness::TRUST_DOMAIN),
                issued_before_unix: 0,
            }),
            "laptop lost",
        ))
        .await
        .expect("lattice revoke before --subject carol --time now");
    // The same client (its connection is already open) is refused.
    let refused = lost
        .status(pb::StatusRequest {})
        .await
        .expect_err("the lost certificate opens nothing");
    assert!(
        matches!(
            refused.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::Unavailable
        ),
        "{refused:?}"
    );
    report("lost-admin-certificate", t0.elapsed());
    // A new certificate for carol, issued after the cut-off second, works.
    clock.advance(Duration::from_secs(2));
    let mut renewed = l
        .admin("carol", &[AdminRole::PlatformAdmin], &[])
        .expect("new certificate");
    renewed
        .status(pb::StatusRequest {})
        .await
        .expect("the new certificate works");
}

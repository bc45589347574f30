//! Policy as code, end to end over real mTLS: releases reach every cache in
//! order, tampered releases are refused, decisions follow the release in
//! force (cache invalidated), context-aware rules of the example bundle, and
//! separation of duties with the two-person rule at the Admin API.

use crate::common;

use std::time::{Duration, SystemTime};

use lattice::harness::{Audience, Lattice, Spec, audience_bundle};
use lattice_regional_cache::AuditEvent;
use lattice_shared::clock::FakeClock;
use lattice_shared::policy::{AdminRole, BundleFiles, Posture};
use lattice_shared::proto as pb;
use prost::Message;
use tonic::Code;

use common::{AUDIENCE, refusal};

#[test]
fn the_built_in_example_bundle_is_the_one_in_deploy() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/example");
    assert_eq!(
        BundleFiles::load_dir(&dir).expect("load"),
        lattice::example_bundle()
    );
    let (_, report) = lattice_shared::policy::check(&lattice::example_bundle(), 1).expect("passes");
    assert!(report.passed.len() >= 20, "{report}");
}

/// `files` with `name` replaced (or added).
fn with_file(files: &BundleFiles, name: &str, content: &str) -> BundleFiles {
    BundleFiles::from_files(
        files
            .iter()
            .filter(|(k, _)| *k != name)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .chain([(name.to_string(), content.to_string())]),
    )
    .expect("files")
}

/// The default lattice under the example bundle.
async fn example_lattice() -> Lattice {
    let spec = Spec {
        policy: Some(lattice::example_bundle()),
        ..Spec::default()
    };
    common::lattice_with(spec).await.0
}

const FORBID_API: &str = "@id(\"no-api\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"https://api.example.com\");\n";

#[tokio::test]
async fn a_new_release_takes_effect_at_every_cache_and_invalidates_cached_decisions() {
    let (l, _clock) = common::lattice().await;
    let agent = &l.agents[0];
    let before = agent
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("allowed");
    let v_before = l.cp().policy_version();
    assert_eq!(
        before.policy_version, v_before,
        "the token records the deciding version"
    );
    // The same request again is answered from the decision cache.
    agent
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("allowed");
    let eu = &l.caches[0];
    assert!(eu.app().cached_decisions() > 0);

    let forbidding = with_file(
        &audience_bundle(&[Audience::new(AUDIENCE, &["read"])]),
        "x.cedar",
        FORBID_API,
    );
    let v = l
        .cp()
        .release_policy(forbidding, "forbid api")
        .expect("release");
    l.wait_all_applied(v.seq).await.expect("applied");
    for c in &l.caches {
        assert_eq!(c.app().policy_version(), v.version);
    }
    let e = agent
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect_err("the cached allow must not outlive its release");
    let (code, msg) = refusal(&e);
    assert_eq!(code, Code::PermissionDenied);
    assert!(
        msg.contains("no-api") && msg.contains(&format!("version {}", v.version)),
        "the denial names the policy and the version: {msg}"
    );
    // The audit trail records the version of each decision.
    let events = l.audit.events();
    assert!(events.iter().any(
        |e| matches!(e, AuditEvent::Issued { policy_version, .. } if *policy_version == v_before)
    ));
    assert!(events.iter().any(|e| matches!(e, AuditEvent::Refused { policy_version, reason, .. } if *policy_version == v.version && reason.contains("no-api"))));
    l.shutdown().await;
}

#[tokio::test]
async fn a_tampered_release_is_refused_and_the_previous_one_stays_in_force() {
    let (mut l, _clock) = common::lattice().await;
    let in_force = l.caches[0].app().policy_version();
    let agent = &l.agents[0];
    agent
        .mint(AUDIENCE, &[], None)
        .await
        .expect("allowed before");

    // Take the signed release in force and change its bundle after signing:
    // the caches must refuse it (the signature no longer matches).
    let seq = l.cp().policy_history().last().expect("a release").seq;
    let ev = l.cp().event_log().get(seq).expect("read").expect("event");
    let Some(pb::lattice_event::Body::Policy(mut signed)) = ev.body else {
        panic!("not a policy event");
    };
    // Replayed: the genuine release in force, sent again, is not newer.
    let replayed = signed.clone();
    let mut release = pb::PolicyRelease::decode(signed.release.as_slice()).expect("decode");
    let files = with_file(
        &BundleFiles::from_proto(release.bundle.as_ref().expect("bundle")).expect("files"),
        "x.cedar",
        FORBID_API,
    );
    release.version += 1;
    release.bundle = Some(files.to_proto());
    release.bundle_sha256 = files.sha256().to_vec();
    signed.release = release.encode_to_vec();
    let now_ms = l.cp().now_ms();
    let bad = l
        .cp()
        .event_log()
        .append_policy(signed.clone(), now_ms)
        .expect("append");

    // And one signed by a key the root never certified for the control plane
    // (a cache's own JWT signing key would chain to the root, but its id is
    // not the control plane's; a self-made one does not chain at all).
    let forger = lattice_shared::pki::PrivateKey::generate_ed25519().expect("key");
    let td = lattice_shared::id::TrustDomain::new(lattice::harness::TRUST_DOMAIN).expect("td");
    let fake_root = lattice_shared::pki::Authority::new_root(
        &td,
        lattice_shared::pki::PrivateKey::generate_p256().expect("key"),
        l.clock.now(),
        Duration::from_secs(3600),
    )
    .expect("root");
    let cert = fake_root
        .issue(
            &forger.csr_der().expect("csr"),
            l.cp().id(),
            lattice_shared::pki::Profile::JwtSigning,
            l.clock.now(),
            Duration::from_secs(3600),
        )
        .expect("cert");
    let forged = lattice_shared::policy::sign::PolicySigner::new(forger, cert)
        .sign(&release)
        .expect("sign");
    let bad2 = l
        .cp()
        .event_log()
        .append_policy(forged, now_ms)
        .expect("append");

    let bad3 = l
        .cp()
        .event_log()
        .append_policy(replayed, now_ms)
        .expect("append");
    l.wait_all_applied(bad3.seq)
        .await
        .expect("the stream goes on");
    assert!(bad.seq < bad2.seq);
    for c in &l.caches {
        assert_eq!(
            c.app().policy_version(),
            in_force,
            "kept the previous release"
        );
    }
    l.agents[0]
        .mint(AUDIENCE, &[], None)
        .await
        .expect("still allowed under the release in force");

    // After a restart the cache restores the newest release that verifies.
    l.restart_cache(0).await.expect("restart");
    l.caches[0].wait_fresh().await.expect("fresh");
    assert_eq!(l.caches[0].app().policy_version(), in_force);

    // A genuine release after the forgeries is accepted.
    let v = l
        .cp()
        .release_policy(audience_bundle(&[Audience::new(AUDIENCE, &[])]), "genuine")
        .expect("release");
    l.wait_all_applied(v.seq).await.expect("applied");
    for c in &l.caches {
        assert_eq!(c.app().policy_version(), v.version);
    }
    l.shutdown().await;
}

#[tokio::test]
async fn rollback_is_an_ordered_event_that_both_caches_apply_even_after_a_partition() {
    let (l, _clock) = common::lattice().await;
    let (eu, us) = (&l.caches[0], &l.caches[1]);
    let a = audience_bundle(&[Audience::new(AUDIENCE, &["read"])]);
    let b = with_file(&a, "x.cedar", FORBID_API);
    let va = l.cp().release_policy(a.clone(), "A").expect("A");
    // The us cache misses B and the rollback while cut off.
    us.partition();
    let vb = l.cp().release_policy(b, "B").expect("B");
    eu.wait_applied(vb.seq).await.expect("eu applies B");
    assert!(
        l.agents[0]
            .mint(AUDIENCE, &["read".into()], None)
            .await
            .is_err()
    );

    let mut admin = l.bootstrap_admin().expect("admin");
    let rolled = admin
        .rollback_policy(pb::RollbackPolicyRequest {
            to_version: va.version,
            message: "undo B".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    assert_eq!(rolled.rollback_of, va.version);
    assert!(rolled.version > vb.version, "a rollback is a new version");
    assert_eq!(rolled.bundle_sha256, va.bundle_sha256, "with A's bundle");

    us.heal();
    l.wait_all_applied(rolled.seq).await.expect("both apply");
    for c in [eu, us] {
        let engine = c.app().policy_in_force().expect("a release");
        assert_eq!(engine.version(), rolled.version);
        assert_eq!(engine.sha256().to_vec(), va.bundle_sha256);
    }
    l.agents[0]
        .mint(AUDIENCE, &["read".into()], None)
        .await
        .expect("allowed again after the rollback");

    // The operator sees which release each cache enforces.
    let status = common::eventually("acks arrive", Duration::from_secs(20), async || {
        let s = admin
            .status(pb::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if s.caches.iter().all(|c| c.acked_seq >= rolled.seq) {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    assert_eq!(
        (status.policy_version, status.policy_seq),
        (rolled.version, rolled.seq)
    );
    assert!(
        status
            .caches
            .iter()
            .all(|c| c.policy_version == rolled.version),
        "{status:?}"
    );

    let history = admin
        .policy_history(pb::PolicyHistoryRequest {})
        .await
        .expect("history")
        .into_inner();
    let versions: Vec<u64> = history.versions.iter().map(|v| v.version).collect();
    assert!(
        versions.windows(2).all(|w| w[1] == w[0] + 1),
        "{versions:?}"
    );
    assert_eq!(history.current, rolled.version);
    l.shutdown().await;
}

#[tokio::test]
async fn pushes_are_validated_and_tested_at_the_control_plane() {
    let (l, _clock) = common::lattice().await;
    let mut admin = l.bootstrap_admin().expect("admin");
    let head = l.cp().event_log().head();
    let base = audience_bundle(&[Audience::new(AUDIENCE, &["read"])]);

    let typo = with_file(
        &base,
        "typo.cedar",
        "@id(\"typo\")\npermit(principal is Lattice::Agent, action == Lattice::Action::\"MintToken\", resource) when { principal.lables.isEmpty() };",
    );
    let s = admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(typo.to_proto()),
            message: String::new(),
        })
        .await
        .expect_err("schema violation");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("typo") && s.message().contains("lables"),
        "{}",
        s.message()
    );

    let failing = with_file(
        &base,
        "tests.json",
        r#"[{"name":"api is closed","principal":"spiffe://lattice.local/agent/eu/a","action":"MintToken","resource":"https://api.example.com","expect":"deny"}]"#,
    );
    let s = admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(failing.to_proto()),
            message: String::new(),
        })
        .await
        .expect_err("failing test");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("\"api is closed\" failed"),
        "{}",
        s.message()
    );

    // No bundle may take away every way to change policy: neither one that
    // permits no push, nor one that asks an approval no role may give.
    for lockout in [
        "@id(\"agents\")\npermit(principal is Lattice::Agent, action, resource);",
        "@id(\"two-person\")\npermit(principal in Lattice::Role::\"platform-admin\", action == Lattice::Action::\"PushPolicy\", resource) when { context.approvals >= 1 };",
    ] {
        let s = admin
            .push_policy(pb::PushPolicyRequest {
                bundle: Some(with_file(&base, "lattice.cedar", lockout).to_proto()),
                message: String::new(),
            })
            .await
            .expect_err("lockout");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(
            s.message().contains("no longer push policy"),
            "{}",
            s.message()
        );
    }

    // Oversized and malformed bundles never reach the compiler.
    let huge = pb::PushPolicyRequest {
        bundle: Some(pb::PolicyBundleFiles {
            files: vec![pb::PolicyFile {
                path: "huge.cedar".into(),
                content: "/".repeat(lattice_shared::policy::MAX_BUNDLE_BYTES + 100_000),
            }],
        }),
        message: String::new(),
    };
    let s = admin.push_policy(huge).await.expect_err("too large");
    assert!(
        matches!(
            s.code(),
            Code::ResourceExhausted | Code::OutOfRange | Code::InvalidArgument
        ),
        "{s:?}"
    );
    let s = admin
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(pb::PolicyBundleFiles {
                files: vec![pb::PolicyFile {
                    path: "../escape.cedar".into(),
                    content: String::new(),
                }],
            }),
            message: String::new(),
        })
        .await
        .expect_err("bad name");
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());

    assert_eq!(l.cp().event_log().head(), head, "nothing was released");
    l.shutdown().await;
}

/// Tuesday 2026-11-24 17:30 UTC: inside business hours, half an hour before
/// they end.
fn tuesday_evening() -> FakeClock {
    FakeClock::at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_541_400))
}

#[tokio::test]
async fn the_example_bundle_rules_hold_end_to_end() {
    let clock = tuesday_evening();
    assert_eq!(
        lattice_shared::policy::hour_and_weekday(lattice_shared::clock::Clock::now(&clock)),
        (17, 2)
    );
    let spec = Spec {
        agents: vec![
            ("eu".into(), "agent-1".into()),
            ("eu".into(), "batch-1".into()),
        ],
        policy: Some(lattice::example_bundle()),
        ..Spec::default()
    };
    let mut l = Lattice::start(spec, clock.shared()).await.expect("starts");
    let patched = l
        .add_agent_with("eu", "patched", |cfg| {
            cfg.posture = Posture {
                os_patched: Some(true),
                ..Posture::default()
            };
        })
        .await
        .expect("agent");
    let (plain, batch, patched) = (&l.agents[0], &l.agents[1], &l.agents[patched]);
    let denied_by = |r: Result<pb::MintTokenResponse, lattice_edge_agent::Error>, policy: &str| {
        let e = r.expect_err("denied");
        let (code, msg) = refusal(&e);
        assert_eq!(code, Code::PermissionDenied, "{msg}");
        assert!(msg.contains(policy), "{msg} should name {policy}");
    };

    // Posture: a high-assurance audience needs os_patched.
    let payments = "https://payments.example.com";
    denied_by(
        plain.mint(payments, &["charge".into()], None).await,
        "high-assurance-needs-patched-os",
    );
    patched
        .mint(payments, &["charge".into()], None)
        .await
        .expect("a patched device may");

    // IP range: the agents call from 127.0.0.1, outside 10.0.0.0/8.
    denied_by(
        plain
            .mint("https://db.internal.example.com", &["read".into()], None)
            .await,
        "internal-network-only",
    );

    // TTL cap by label: batch agents get at most 60 s.
    denied_by(
        batch
            .mint(AUDIENCE, &[], Some(Duration::from_secs(300)))
            .await,
        "batch-ttl-cap",
    );
    batch
        .mint(AUDIENCE, &[], Some(Duration::from_secs(60)))
        .await
        .expect("a short token is fine");
    plain
        .mint(AUDIENCE, &[], Some(Duration::from_secs(300)))
        .await
        .expect("other agents are not capped");

    // Business hours, on the caches' clock: allowed at 17:30, not at 18:01.
    let reports = "https://reports.example.com";
    plain
        .mint(reports, &["read".into()], None)
        .await
        .expect("17:30 on a Tuesday");
    clock.advance(Duration::from_secs(31 * 60));
    for c in &l.caches {
        c.wait_fresh().await.expect("fresh");
    }
    denied_by(
        plain.mint(reports, &["read".into()], None).await,
        "reports-business-hours",
    );
    l.shutdown().await;
}

#[tokio::test]
async fn separation_of_duties_and_the_two_person_rule_at_the_admin_api() {
    let l = example_lattice().await;
    let head = l.cp().event_log().head();
    let mut alice = l
        .admin("alice", &[AdminRole::PlatformAdmin], &[])
        .expect("alice");
    let mut bob = l
        .admin("bob", &[AdminRole::PlatformAdmin], &[])
        .expect("bob");
    let mut audrey = l
        .admin("audrey", &[AdminRole::Auditor], &[])
        .expect("audrey");
    let mut erin = l
        .admin("erin", &[AdminRole::RegionalOperator], &["eu"])
        .expect("erin");
    let mut carol = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("carol");

    let revoke = |id: String| pb::RevokeRequest {
        revocation: Some(pb::Revocation {
            target: Some(pb::revocation::Target::AgentId(id)),
            reason: "test".into(),
        }),
    };
    // Roles: an auditor reads but does not revoke; a regional operator acts
    // in its own region only; a secret custodian does not touch policy.
    audrey
        .status(pb::StatusRequest {})
        .await
        .expect("auditors read");
    let s = audrey
        .revoke(revoke(Lattice::agent_id("eu", "x")))
        .await
        .expect_err("auditor");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    erin.revoke(revoke(Lattice::agent_id("eu", "x")))
        .await
        .expect("eu operator revokes in eu");
    let s = erin
        .revoke(revoke(Lattice::agent_id("us", "y")))
        .await
        .expect_err("not in us");
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = carol
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(lattice::example_bundle().to_proto()),
            message: String::new(),
        })
        .await
        .expect_err("custodians do not push policy");
    assert_eq!(s.code(), Code::PermissionDenied);

    // Two-person rule: alice's push waits for a second platform admin.
    let bundle = with_file(
        &lattice::example_bundle(),
        "x.cedar",
        "@id(\"no-legacy\")\nforbid(principal, action == Lattice::Action::\"MintToken\", resource == Lattice::Audience::\"https://legacy.example.com\");\n",
    );
    let s = alice
        .push_policy(pb::PushPolicyRequest {
            bundle: Some(bundle.to_proto()),
            message: "close api".into(),
        })
        .await
        .expect_err("waits");
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    let id = s
        .metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .expect("the request id")
        .to_string();
    let listed = bob
        .list_pending(pb::ListPendingRequest {})
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed
            .requests
            .iter()
            .any(|r| r.request_id == id && r.action == "PushPolicy")
    );

    let approve = |id: &str| pb::ApproveRequest {
        request_id: id.to_string(),
    };
    let s = alice.approve(approve(&id)).await.expect_err("own request");
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = audrey
        .approve(approve(&id))
        .await
        .expect_err("auditors do not approve");
    assert_eq!(s.code(), Code::PermissionDenied);
    let s = carol
        .approve(approve(&id))
        .await
        .expect_err("a custodian's approval is not the one the rule asks for");
    assert_eq!(s.code(), Code::PermissionDenied);

    let done = bob
        .approve(approve(&id))
        .await
        .expect("bob approves")
        .into_inner();
    let Some(pb::approve_response::Result::Policy(v)) = done.result else {
        panic!("a policy release");
    };
    assert!(
        v.pushed_by.ends_with("/admin/alice") && v.approved_by.ends_with("/admin/bob"),
        "{v:?}"
    );
    // Both names are in the signed release the caches receive.
    let ev = l.cp().event_log().get(v.seq).expect("read").expect("event");
    let Some(pb::lattice_event::Body::Policy(signed)) = ev.body else {
        panic!("policy event");
    };
    let release = pb::PolicyRelease::decode(signed.release.as_slice()).expect("decode");
    assert_eq!(
        (release.pushed_by, release.approved_by),
        (v.pushed_by.clone(), v.approved_by.clone())
    );
    l.wait_all_applied(v.seq).await.expect("applied");

    let s = bob.approve(approve(&id)).await.expect_err("runs once");
    assert_eq!(s.code(), Code::NotFound);

    // The admin trail holds each decision, both admins of the approval.
    use lattice_control_plane::admin_trail::Outcome;
    let trail = l.cp().admin_trail(1000).expect("trail");
    let has = |admin: &str, action: &str, outcome: Outcome| {
        trail
            .iter()
            .any(|r| r.admin.ends_with(admin) && r.action == action && r.outcome == outcome)
    };
    assert!(has("/admin/audrey", "Revoke", Outcome::Denied));
    assert!(has("/admin/erin", "Revoke", Outcome::Allowed));
    assert!(has("/admin/alice", "PushPolicy", Outcome::Pending));
    assert!(has("/admin/carol", "Approve", Outcome::Denied));
    assert!(trail.iter().any(|r| {
        r.outcome == Outcome::Approved
            && r.admin.ends_with("/admin/alice")
            && r.approved_by
                .as_deref()
                .is_some_and(|b| b.ends_with("/admin/bob"))
            && r.request_id.as_deref() == Some(id.as_str())
            && r.policies.contains(&"policy-change-two-person".to_string())
    }));
    assert!(l.cp().event_log().head() > head);
    l.shutdown().await;
}

#[tokio::test]
async fn revoking_the_policy_signer_re_signs_the_policy_with_a_new_key() {
    let (l, _clock) = common::lattice().await;
    let before = l.cp().policy_version();
    let old = lattice_shared::pki::inspect(&l.cp().policy_signer_cert()).expect("cert");
    let ev = l
        .revoke(lattice_shared::revocation::Target::CertSerial(
            old.serial_hex.clone(),
        ))
        .expect("revoke");
    let resigned = l.cp().policy_history().last().cloned().expect("a release");
    assert!(
        resigned.seq > ev.seq && resigned.version == before + 1,
        "{resigned:?}"
    );
    let new = lattice_shared::pki::inspect(&l.cp().policy_signer_cert()).expect("cert");
    assert_ne!(new.serial_hex, old.serial_hex);
    l.wait_all_applied(resigned.seq).await.expect("applied");
    for c in &l.caches {
        assert_eq!(c.app().policy_version(), resigned.version);
    }
    let v = l
        .cp()
        .release_policy(audience_bundle(&[Audience::new(AUDIENCE, &[])]), "later")
        .expect("release");
    l.wait_all_applied(v.seq).await.expect("applied");
    for c in &l.caches {
        assert_eq!(
            c.app().policy_version(),
            v.version,
            "later releases still go in"
        );
    }
    l.shutdown().await;
}

#[tokio::test]
async fn approvals_do_not_overwrite_newer_policy_nor_run_for_revoked_requesters() {
    let l = example_lattice().await;
    let mut alice = l
        .admin("alice", &[AdminRole::PlatformAdmin], &[])
        .expect("alice");
    let mut bob = l
        .admin("bob", &[AdminRole::PlatformAdmin], &[])
        .expect("bob");
    let push = |m: &str| pb::PushPolicyRequest {
        bundle: Some(lattice::example_bundle().to_proto()),
        message: m.into(),
    };
    let id_of = |s: tonic::Status| {
        assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
        s.metadata()
            .get("lattice-approval-id")
            .and_then(|v| v.to_str().ok())
            .expect("id")
            .to_string()
    };
    let stale = id_of(alice.push_policy(push("stale")).await.expect_err("waits"));
    // Another release lands before the approval.
    l.cp()
        .release_policy(lattice::example_bundle(), "meanwhile")
        .expect("release");
    let s = bob
        .approve(pb::ApproveRequest { request_id: stale })
        .await
        .expect_err("policy moved on");
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("policy changed"), "{}", s.message());

    // A request whose maker is revoked meanwhile does not run.
    let revoked = id_of(
        alice
            .push_policy(push("then revoked"))
            .await
            .expect_err("waits"),
    );
    l.revoke(lattice_shared::revocation::Target::SubjectBefore {
        subject: lattice_shared::id::SpiffeId::parse(&format!(
            "spiffe://{}/admin/alice",
            lattice::harness::TRUST_DOMAIN
        ))
        .expect("id"),
        issued_before_unix: 0,
    })
    .expect("revoke");
    let s = bob
        .approve(pb::ApproveRequest {
            request_id: revoked,
        })
        .await
        .expect_err("requester revoked");
    assert_eq!(s.code(), Code::PermissionDenied, "{}", s.message());
    l.shutdown().await;
}

#[tokio::test]
async fn an_enrolment_denied_by_policy_does_not_burn_the_join_token() {
    let bundle = with_file(
        &audience_bundle(&[Audience::new(AUDIENCE, &[])]),
        "enrol.cedar",
        "@id(\"enrol-patched-only\")\nforbid(principal, action == Lattice::Action::\"Enrol\", resource) unless { context.posture has os_patched && context.posture.os_patched };",
    );
    let spec = Spec {
        agents: vec![],
        policy: Some(bundle),
        ..Spec::default()
    };
    let (mut l, _clock) = common::lattice_with(spec).await;
    let token = l
        .join_token(&Lattice::agent_id("eu", "p"), None)
        .expect("token");
    let e = l
        .add_agent_configured("eu", "p", token.clone(), |_| {})
        .await
        .expect_err("an unpatched device may not enrol");
    let e = e
        .downcast::<lattice_edge_agent::Error>()
        .expect("an agent error");
    let (code, msg) = refusal(&e);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("join token was not used"), "{msg}");
    assert!(
        !msg.contains("enrol-patched-only"),
        "no policy detail for an unauthenticated caller: {msg}"
    );
    l.add_agent_configured("eu", "p", token, |cfg| {
        cfg.posture.os_patched = Some(true);
    })
    .await
    .expect("the same token enrols a patched device");
    l.shutdown().await;
}

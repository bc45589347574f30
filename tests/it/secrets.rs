//! Upstream secrets end to end over real mTLS: envelopes reach only the
//! caches of a secret's regions, sealed to each; leases are Cedar decisions
//! with a bounded TTL and an audit fingerprint; no data file ever holds a
//! value; restarts, version revocation, rollback and grace, KEK and DEK
//! rotation, deletion, the two-person rule, and upstream key rotation
//! through a webhook rotator (including a failed check rolling back).

use crate::common;
use crate::common::refusal;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lattice::harness::{CpConfigFn, Lattice, Spec};
use lattice_regional_cache::AuditEvent;
use lattice_shared::policy::AdminRole;
use lattice_shared::proto as pb;
use lattice_shared::proto::admin_client::AdminClient;
use tonic::Code;
use tonic::transport::Channel;

const MARKER: &[u8] = b"sk-live-MARKER-7f3a9c1e5d";
const MARKER2: &[u8] = b"sk-live-SECOND-0b8e2d4f6a";

fn spec() -> Spec {
    Spec {
        agents: vec![
            ("eu".into(), "agent-1".into()),
            ("us".into(), "agent-2".into()),
        ],
        secrets: vec!["openai".into(), "anthropic".into()],
        ..Spec::default()
    }
}

fn custodian(l: &Lattice, name: &str) -> AdminClient<Channel> {
    l.admin(name, &[AdminRole::SecretCustodian], &[])
        .expect("custodian")
}

async fn put(
    admin: &mut AdminClient<Channel>,
    name: &str,
    value: &[u8],
    regions: &[&str],
) -> pb::SecretVersionInfo {
    admin
        .put_secret(pb::PutSecretRequest {
            name: name.into(),
            value: value.to_vec(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
            message: String::new(),
        })
        .await
        .expect("put")
        .into_inner()
}

/// Waits until every cache has applied everything the log holds now.
async fn settle(l: &Lattice) {
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `value` as it would appear stored raw, hex, or inside base64 (at each
/// of the three alignments, whole groups only) or JSON-escaped.
fn encodings(value: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine;
    let mut out = vec![value.to_vec(), hex::encode(value).into_bytes()];
    for k in 0..3 {
        let whole = (value.len() - k) / 3 * 3;
        for engine in [
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ] {
            out.push(engine.encode(&value[k..k + whole]).into_bytes());
        }
    }
    out
}

/// Whether `hay` holds `value` in any of its `encodings`.
fn holds(hay: &[u8], value: &[u8]) -> bool {
    encodings(value).iter().any(|e| contains(hay, e))
}

#[test]
fn the_plaintext_scan_sees_encoded_values() {
    use base64::Engine;
    let stored = format!(
        "{{\"x\":\"{}\"}}",
        base64::engine::general_purpose::STANDARD.encode([b"ab".as_slice(), MARKER].concat())
    );
    assert!(holds(stored.as_bytes(), MARKER));
    assert!(holds(hex::encode(MARKER).as_bytes(), MARKER));
    assert!(!holds(b"nothing here", MARKER));
}

#[tokio::test]
async fn a_secret_reaches_only_its_regions_and_is_leased_with_an_audited_fingerprint() {
    let (l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    let v = put(&mut carol, "openai", MARKER, &["eu"]).await;
    assert_eq!((v.version, v.state.as_str()), (1, "active"));
    assert_eq!(v.created_by, "spiffe://lattice.local/admin/carol");
    settle(&l).await;

    let eu = l.cache_in("eu").expect("eu");
    let us = l.cache_in("us").expect("us");
    assert_eq!(
        eu.app().secrets_held(),
        vec![("openai".to_string(), vec![1])]
    );
    assert!(
        us.app().secrets_held().is_empty(),
        "a cache outside the secret's regions holds nothing"
    );

    let lease = l.agents[0]
        .lease_secret("openai", 0, Some(Duration::from_secs(120)))
        .await
        .expect("lease");
    assert_eq!(&*lease.value, MARKER);
    assert_eq!(lease.version, 1);
    assert_eq!(lease.fingerprint, v.fingerprint);
    assert!(!lease.lease_id.is_empty());
    let now = lattice_shared::clock::unix_secs(l.clock.now());
    assert_eq!(lease.expires_at_unix, now + 120);
    assert!(!format!("{lease:?}").contains("MARKER"), "Debug redacts");

    // The audit record names the value by its keyed fingerprint only.
    let leased: Vec<_> = l
        .audit
        .events()
        .into_iter()
        .filter(|e| matches!(e, AuditEvent::Leased { .. }))
        .collect();
    assert_eq!(leased.len(), 1);
    match &leased[0] {
        AuditEvent::Leased {
            secret,
            version,
            fingerprint,
            lease_id,
            ..
        } => {
            assert_eq!((secret.as_str(), *version), ("openai", 1));
            assert_eq!(fingerprint, &v.fingerprint);
            assert_eq!(lease_id, &lease.lease_id);
        }
        _ => unreachable!(),
    }
    assert!(!format!("{:?}", l.audit.events()).contains("MARKER"));

    // The us agent's cache does not hold it.
    let e = l.agents[1]
        .lease_secret("openai", 0, None)
        .await
        .expect_err("not held in us");
    assert_eq!(refusal(&e).0, Code::NotFound);
    // A secret the policy does not list is refused by Cedar.
    let e = l.agents[0]
        .lease_secret("unlisted", 0, None)
        .await
        .expect_err("unlisted");
    let (code, msg) = refusal(&e);
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    // Bounds: at most 15 minutes, a valid name.
    let e = l.agents[0]
        .lease_secret("openai", 0, Some(Duration::from_secs(901)))
        .await
        .expect_err("too long");
    assert_eq!(refusal(&e).0, Code::InvalidArgument);
    let e = l.agents[0]
        .lease_secret("Not A Name", 0, None)
        .await
        .expect_err("bad name");
    assert_eq!(refusal(&e).0, Code::InvalidArgument);

    // Listing shows fingerprints and holders, never values.
    let list = carol
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.secrets.len(), 1);
    assert_eq!(
        list.secrets[0].holders,
        vec![eu.id().to_string()],
        "only the eu cache holds it"
    );
    assert!(!format!("{list:?}").contains("MARKER"));
    l.shutdown().await;
}

#[tokio::test]
async fn no_data_file_of_the_control_plane_or_a_cache_holds_a_value() {
    // Our own directory: it must outlive the lattice to be scanned.
    let tmp = tempfile::tempdir().expect("tempdir");
    let clock = lattice_shared::clock::FakeClock::new();
    let mut l = Lattice::start_in(tmp.path(), spec(), clock.shared())
        .await
        .expect("lattice");
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;
    put(&mut carol, "openai", MARKER2, &["*"]).await;
    settle(&l).await;
    for a in &l.agents {
        a.lease_secret("openai", 0, None).await.expect("lease");
    }
    // Restarts write their state again; then everything is flushed.
    l.restart_cache(0).await.expect("restart");
    l.restart_cp().await.expect("restart cp");
    settle(&l).await;
    l.shutdown().await;
    let all = files(tmp.path());
    assert!(all.len() > 10, "the data dirs hold files: {}", all.len());
    for f in all {
        let bytes = std::fs::read(&f).expect("read");
        for m in [MARKER, MARKER2] {
            assert!(
                !holds(&bytes, m),
                "{} holds a secret value in plaintext",
                f.display()
            );
        }
    }
}

#[tokio::test]
async fn a_restarted_cache_serves_from_its_sealed_envelopes() {
    let (mut l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["eu"]).await;
    settle(&l).await;
    let applied = l.caches[0].app().applied();
    l.restart_cache(0).await.expect("restart");
    // It resumes after what it holds: the envelope is not sent again.
    assert_eq!(l.caches[0].app().applied(), applied);
    assert_eq!(
        l.caches[0].app().secrets_held(),
        vec![("openai".to_string(), vec![1])],
        "restored from the local log"
    );
    l.caches[0].wait_fresh().await.expect("fresh");
    let lease = l.agents[0]
        .lease_secret("openai", 0, None)
        .await
        .expect("lease after restart");
    assert_eq!(&*lease.value, MARKER);
    l.shutdown().await;
}

#[tokio::test]
async fn revoking_a_version_makes_every_cache_refuse_it() {
    let (l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;
    put(&mut carol, "openai", MARKER2, &["*"]).await;
    settle(&l).await;
    // v1 is the previous version, leasable by name during its grace window.
    for a in &l.agents {
        let prev = a.lease_secret("openai", 1, None).await.expect("previous");
        assert_eq!(&*prev.value, MARKER);
        assert_eq!(
            &*a.lease_secret("openai", 0, None)
                .await
                .expect("active")
                .value,
            MARKER2
        );
    }
    let seq = carol
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::SecretVersion(
                    pb::SecretVersionRef {
                        name: "openai".into(),
                        version: 1,
                    },
                )),
                reason: "leaked in a log".into(),
            }),
        })
        .await
        .expect("revoke")
        .into_inner()
        .seq;
    l.wait_all_applied(seq).await.expect("applied");
    for a in &l.agents {
        let e = a
            .lease_secret("openai", 1, None)
            .await
            .expect_err("revoked");
        let (code, msg) = refusal(&e);
        assert_eq!(code, Code::PermissionDenied, "{msg}");
        assert!(msg.contains("revoked"), "{msg}");
        // The active version is untouched.
        a.lease_secret("openai", 0, None).await.expect("active");
    }
    assert!(
        l.audit.events().iter().any(|e| matches!(e, AuditEvent::Refused { reason, .. } if reason.contains("version 1 has been revoked"))),
        "a lease of a revoked version is audited"
    );
    // Revoking the active version stops every lease of the secret.
    let v2 = l
        .cp()
        .revoke(&lattice_shared::revocation::Revocation {
            target: lattice_shared::revocation::Target::SecretVersion {
                name: "openai".into(),
                version: 2,
            },
            reason: String::new(),
        })
        .expect("revoke v2");
    l.wait_all_applied(v2.seq).await.expect("applied");
    for a in &l.agents {
        let e = a
            .lease_secret("openai", 0, None)
            .await
            .expect_err("revoked");
        assert_eq!(refusal(&e).0, Code::PermissionDenied);
    }
    let versions = carol
        .secret_versions(pb::SecretVersionsRequest {
            name: "openai".into(),
        })
        .await
        .expect("versions")
        .into_inner();
    let states: Vec<&str> = versions.versions.iter().map(|v| v.state.as_str()).collect();
    assert_eq!(states, vec!["revoked", "revoked"]);
    // An unknown version is a clear NOT_FOUND.
    let e = carol
        .revoke(pb::RevokeRequest {
            revocation: Some(pb::Revocation {
                target: Some(pb::revocation::Target::SecretVersion(
                    pb::SecretVersionRef {
                        name: "openai".into(),
                        version: 9,
                    },
                )),
                reason: String::new(),
            }),
        })
        .await
        .expect_err("unknown version");
    assert_eq!(e.code(), Code::NotFound);
    l.shutdown().await;
}

#[tokio::test]
async fn rollback_activates_the_previous_version_within_its_grace_window() {
    // Shorter than the agents' certificates, which the clock must not outrun.
    let spec = Spec {
        cp_config: Some(CpConfigFn(Arc::new(|c| c.secret_grace_secs = 600))),
        ..spec()
    };
    let (l, clock) = common::lattice_with(spec).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["eu"]).await;
    put(&mut carol, "openai", MARKER2, &["eu"]).await;
    let r = carol
        .rollback_secret(pb::RollbackSecretRequest {
            name: "openai".into(),
        })
        .await
        .expect("rollback")
        .into_inner();
    let summary = r.summary.expect("summary");
    assert_eq!((summary.active, summary.previous), (1, 2));
    settle(&l).await;
    let lease = l.agents[0]
        .lease_secret("openai", 0, None)
        .await
        .expect("lease");
    assert_eq!((lease.value.as_slice(), lease.version), (MARKER, 1));
    // A lease of the previous version ends with its grace window.
    let grace = l.cp().config().secret_grace_secs;
    clock.advance(Duration::from_secs(grace - 60));
    l.caches[0].wait_fresh().await.expect("fresh");
    let prev = l.agents[0]
        .lease_secret("openai", 2, Some(Duration::from_secs(900)))
        .await
        .expect("previous");
    let now = lattice_shared::clock::unix_secs(l.clock.now());
    assert!(
        prev.expires_at_unix <= now + 60,
        "capped by the grace window"
    );
    clock.advance(Duration::from_secs(120));
    l.caches[0].wait_fresh().await.expect("fresh");
    let e = l.agents[0]
        .lease_secret("openai", 2, None)
        .await
        .expect_err("grace over");
    assert_eq!(refusal(&e).0, Code::FailedPrecondition);
    let e = carol
        .rollback_secret(pb::RollbackSecretRequest {
            name: "openai".into(),
        })
        .await
        .expect_err("grace over");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("grace window"), "{}", e.message());
    l.shutdown().await;
}

#[tokio::test]
async fn kek_rotation_rewraps_every_dek_and_every_version_stays_readable() {
    let (mut l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;
    put(&mut carol, "openai", MARKER2, &["*"]).await;
    put(&mut carol, "anthropic", b"sk-ant-third-value", &["us"]).await;
    let before = l.cp().secret_record("openai").expect("record");
    let r = carol
        .rotate_kms(pb::RotateKmsRequest {})
        .await
        .expect("rotate kms")
        .into_inner();
    assert_eq!(r.kek_version, 2);
    assert_eq!(
        r.rewrapped, 3,
        "two live versions of openai, one of anthropic"
    );
    assert!(r.kms.starts_with("local:"));
    let after = l.cp().secret_record("openai").expect("record");
    for v in [1, 2] {
        let (b, a) = (&before.versions[&v], &after.versions[&v]);
        assert_eq!(a.wrapped_dek.as_ref().map(|w| w.kek_version), Some(2));
        assert_eq!(a.ciphertext, b.ciphertext, "no ciphertext is touched");
        assert_ne!(a.wrapped_dek, b.wrapped_dek);
    }
    // Readable after a restart (the KEKs are reloaded from their files).
    l.restart_cp().await.expect("restart");
    assert_eq!(
        &*l.cp().open_secret_version("openai", 1).expect("v1"),
        MARKER
    );
    assert_eq!(
        &*l.cp().open_secret_version("openai", 2).expect("v2"),
        MARKER2
    );
    settle(&l).await;
    assert_eq!(
        &*l.agents[0]
            .lease_secret("openai", 0, None)
            .await
            .expect("lease")
            .value,
        MARKER2
    );

    // DEK rotation: new DEKs and ciphertexts, the same values, sealed again.
    let applied = l.cp().event_log().head();
    let r = carol
        .rekey_secret(pb::RekeySecretRequest {
            name: "openai".into(),
        })
        .await
        .expect("rekey")
        .into_inner();
    assert_eq!(r.summary.expect("summary").active, 2);
    let rekeyed = l.cp().secret_record("openai").expect("record");
    assert_ne!(
        rekeyed.versions[&2].ciphertext,
        after.versions[&2].ciphertext
    );
    assert_eq!(
        rekeyed.versions[&2].fingerprint,
        after.versions[&2].fingerprint
    );
    assert!(
        l.cp().event_log().head() > applied,
        "new envelopes streamed"
    );
    settle(&l).await;
    for a in &l.agents {
        let lease = a.lease_secret("openai", 0, None).await.expect("lease");
        assert_eq!(&*lease.value, MARKER2);
    }
    l.shutdown().await;
}

#[tokio::test]
async fn another_kek_gives_a_clear_error_not_a_value() {
    let (mut l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["eu"]).await;
    l.stop_cp().await.expect("stop");
    let kms_dir = l.dir.join("cp").join("kms");
    std::fs::rename(&kms_dir, l.dir.join("kms-original")).expect("move the KEKs away");
    // Missing KEKs are refused, never created afresh (issue #19).
    let e = l.restart_cp().await.expect_err("the KEKs are missing");
    assert!(
        format!("{e:#}").contains("kek-v00000001 is missing"),
        "{e:#}"
    );
    assert!(
        !kms_dir.join("kek-v00000001").exists(),
        "no KEK was generated"
    );
    // Another KEK directory of the same shape (another installation's).
    drop(lattice_shared::kms::LocalKms::open_or_create(&kms_dir).expect("another KEK"));
    l.restart_cp()
        .await
        .expect("a KEK directory with the expected versions opens");
    let e = l
        .cp()
        .open_secret_version("openai", 1)
        .expect_err("another KEK");
    let msg = e.to_string();
    assert!(msg.contains("wrong KEK"), "{msg}");
    // Rewrapping cannot proceed either, and says why.
    let e = carol
        .rotate_kms(pb::RotateKmsRequest {})
        .await
        .expect_err("cannot rewrap");
    assert_eq!(e.code(), Code::Internal);
    l.shutdown().await;
}

#[tokio::test]
async fn deleting_a_secret_withdraws_it_from_every_cache() {
    let (l, _clock) = common::lattice_with(spec()).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;
    settle(&l).await;
    let r = carol
        .delete_secret(pb::DeleteSecretRequest {
            name: "openai".into(),
        })
        .await
        .expect("delete")
        .into_inner();
    assert_eq!(r.versions_revoked, 1);
    settle(&l).await;
    for c in &l.caches {
        assert!(c.app().secrets_held().is_empty());
    }
    for a in &l.agents {
        let e = a
            .lease_secret("openai", 0, None)
            .await
            .expect_err("deleted");
        assert!(matches!(
            refusal(&e).0,
            Code::NotFound | Code::PermissionDenied
        ));
    }
    // A later put starts above every revoked version.
    let v = put(&mut carol, "openai", MARKER2, &["eu"]).await;
    assert_eq!(v.version, 2);
    settle(&l).await;
    assert_eq!(
        &*l.agents[0]
            .lease_secret("openai", 0, None)
            .await
            .expect("lease")
            .value,
        MARKER2
    );
    l.shutdown().await;
}

#[tokio::test]
async fn a_put_under_the_two_person_rule_waits_encrypted_and_runs_on_approval() {
    let spec = Spec {
        policy: Some(lattice::example_bundle()),
        ..spec()
    };
    let (l, _clock) = common::lattice_with(spec).await;
    let mut carol = custodian(&l, "carol");
    let mut dave = custodian(&l, "dave");
    let e = carol
        .put_secret(pb::PutSecretRequest {
            name: "openai".into(),
            value: MARKER.to_vec(),
            regions: vec!["eu".into()],
            message: String::new(),
        })
        .await
        .expect_err("waits");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let id = e
        .metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .expect("id")
        .to_string();
    // While it waits the value is stored only encrypted.
    let mut waiting = 0;
    for (_, v) in l
        .cp()
        .store()
        .scan_prefix("pending", b"", 100)
        .expect("scan")
    {
        assert!(!holds(&v, MARKER), "a waiting put holds the value");
        waiting += 1;
    }
    assert_eq!(waiting, 1, "the put waits in the pending table");
    // A platform admin may not approve a secret change.
    let e = l
        .bootstrap_admin()
        .expect("admin")
        .approve(pb::ApproveRequest {
            request_id: id.clone(),
        })
        .await
        .expect_err("wrong role");
    assert_eq!(e.code(), Code::PermissionDenied);
    let r = dave
        .approve(pb::ApproveRequest { request_id: id })
        .await
        .expect("approve")
        .into_inner();
    match r.result {
        Some(pb::approve_response::Result::Secret(v)) => {
            assert_eq!((v.version, v.state.as_str()), (1, "active"));
            assert_eq!(v.created_by, "spiffe://lattice.local/admin/carol");
            assert_eq!(v.approved_by, "spiffe://lattice.local/admin/dave");
        }
        other => panic!("expected a secret version, got {other:?}"),
    }
    assert_eq!(
        &*l.cp().open_secret_version("openai", 1).expect("open"),
        MARKER
    );

    // An approval runs what was asked: a rollback asked while v1 was the
    // previous version does not restore whatever is previous later.
    let waits = |r: Result<tonic::Response<pb::SecretVersionInfo>, tonic::Status>| {
        approval_id(&r.expect_err("waits for a second custodian"))
    };
    let id = waits(carol.put_secret(put_req("openai", MARKER2)).await);
    dave.approve(pb::ApproveRequest { request_id: id })
        .await
        .expect("v2");
    let rollback = approval_id(
        &carol
            .rollback_secret(pb::RollbackSecretRequest {
                name: "openai".into(),
            })
            .await
            .expect_err("waits"),
    );
    let id = waits(
        carol
            .put_secret(put_req("openai", b"sk-third-value-xyz"))
            .await,
    );
    dave.approve(pb::ApproveRequest { request_id: id })
        .await
        .expect("v3");
    let e = dave
        .approve(pb::ApproveRequest {
            request_id: rollback,
        })
        .await
        .expect_err("the previous version changed");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("changed since"), "{}", e.message());
    assert_eq!(l.cp().secret_record("openai").expect("rec").active, 3);
    l.shutdown().await;
}

fn put_req(name: &str, value: &[u8]) -> pb::PutSecretRequest {
    pb::PutSecretRequest {
        name: name.into(),
        value: value.to_vec(),
        regions: vec!["eu".into()],
        message: String::new(),
    }
}

fn approval_id(e: &tonic::Status) -> String {
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    e.metadata()
        .get("lattice-approval-id")
        .and_then(|v| v.to_str().ok())
        .expect("approval id")
        .to_string()
}

// ---------------------------------------------------------------------------
// Upstream key rotation through a webhook rotator.

#[derive(Default)]
struct Upstream {
    calls: Vec<(String, u64)>,
    fail: Option<String>,
    created: u32,
}

/// A local rotation webhook: creates keys `sk-rotated-N`, and fails the
/// step named in `fail`.
async fn webhook(up: Arc<Mutex<Upstream>>) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/rotate",
        post(move |raw: axum::body::Bytes| {
            let up = up.clone();
            async move {
                let body: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
                let step = body["step"].as_str().unwrap_or_default().to_string();
                let version = body["version"].as_u64().unwrap_or(0);
                let mut u = up.lock().expect("lock");
                u.calls.push((step.clone(), version));
                if u.fail.as_deref() == Some(step.as_str()) {
                    return (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "upstream says no".to_string(),
                    );
                }
                if step == "create" {
                    u.created += 1;
                    let v = format!("sk-rotated-{}", u.created);
                    return (
                        axum::http::StatusCode::OK,
                        serde_json::json!({ "value": v }).to_string(),
                    );
                }
                (axum::http::StatusCode::OK, "{}".to_string())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/rotate")
}

async fn rotate(
    admin: &mut AdminClient<Channel>,
    name: &str,
) -> (Vec<String>, Result<u64, tonic::Status>) {
    let mut stream = match admin
        .rotate_secret(pb::RotateSecretRequest { name: name.into() })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return (vec![], Err(e)),
    };
    let mut steps = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(p)) => {
                steps.push(p.step.clone());
                if p.done {
                    return (steps, Ok(p.new_version));
                }
            }
            Ok(None) => return (steps, Err(tonic::Status::unknown("ended without done"))),
            Err(s) => return (steps, Err(s)),
        }
    }
}

fn rotation_spec(url: String, every_secs: u64) -> Spec {
    Spec {
        cp_config: Some(CpConfigFn(Arc::new(move |c| {
            c.rotation = vec![lattice_control_plane::rotation::RotationConfig {
                secret: "openai".into(),
                webhook: url.clone(),
                every_secs,
                timeout_secs: 5,
            }];
        }))),
        ..spec()
    }
}

#[tokio::test]
async fn rotation_creates_checks_activates_and_revokes_the_old_key() {
    let up = Arc::new(Mutex::new(Upstream::default()));
    let url = webhook(up.clone()).await;
    let (l, _clock) = common::lattice_with(rotation_spec(url, 0)).await;
    let mut carol = custodian(&l, "carol");
    let old = put(&mut carol, "openai", MARKER, &["*"]).await;
    let (steps, result) = rotate(&mut carol, "openai").await;
    assert_eq!(result.expect("rotated"), 2);
    let mut distinct = steps.clone();
    distinct.dedup();
    assert_eq!(
        distinct,
        vec![
            "create",
            "pre-check",
            "activate",
            "post-check",
            "retire",
            "done"
        ]
    );
    let calls = up.lock().expect("lock").calls.clone();
    assert_eq!(
        calls,
        vec![
            ("create".to_string(), 0),
            ("pre-check".to_string(), 2),
            ("post-check".to_string(), 2),
            ("retire".to_string(), 1),
        ]
    );
    settle(&l).await;
    for a in &l.agents {
        let lease = a.lease_secret("openai", 0, None).await.expect("lease");
        assert_eq!(
            (lease.value.as_slice(), lease.version),
            (&b"sk-rotated-1"[..], 2)
        );
        let e = a
            .lease_secret("openai", 1, None)
            .await
            .expect_err("old key");
        assert_eq!(
            refusal(&e).0,
            Code::PermissionDenied,
            "the old key is revoked"
        );
    }
    let versions = carol
        .secret_versions(pb::SecretVersionsRequest {
            name: "openai".into(),
        })
        .await
        .expect("versions")
        .into_inner();
    assert_eq!(versions.versions[0].state, "revoked");
    assert_eq!(versions.versions[1].origin, "rotation");
    assert_ne!(versions.versions[1].fingerprint, old.fingerprint);
    // Without a rotator configured the command says what to do.
    put(&mut carol, "anthropic", b"sk-ant-x", &["eu"]).await;
    let (_, e) = rotate(&mut carol, "anthropic").await;
    let e = e.expect_err("no rotator");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("[[rotation]]"), "{}", e.message());
    l.shutdown().await;
}

#[tokio::test]
async fn a_failed_post_check_rolls_back_and_a_failed_pre_check_changes_nothing() {
    let up = Arc::new(Mutex::new(Upstream::default()));
    let url = webhook(up.clone()).await;
    let (l, _clock) = common::lattice_with(rotation_spec(url, 0)).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;

    up.lock().expect("lock").fail = Some("post-check".into());
    let (steps, result) = rotate(&mut carol, "openai").await;
    let e = result.expect_err("post-check fails");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("rolled back to version 1"),
        "{}",
        e.message()
    );
    assert!(steps.contains(&"rollback".to_string()), "{steps:?}");
    assert!(
        up.lock()
            .expect("lock")
            .calls
            .contains(&("retire".to_string(), 2)),
        "the failed new key is retired upstream"
    );
    settle(&l).await;
    for a in &l.agents {
        let lease = a.lease_secret("openai", 0, None).await.expect("lease");
        assert_eq!((lease.value.as_slice(), lease.version), (MARKER, 1));
        let e = a
            .lease_secret("openai", 2, None)
            .await
            .expect_err("new key");
        assert_eq!(
            refusal(&e).0,
            Code::PermissionDenied,
            "the failed key is revoked"
        );
    }

    up.lock().expect("lock").fail = Some("pre-check".into());
    let head = l.cp().event_log().head();
    let (_, result) = rotate(&mut carol, "openai").await;
    let e = result.expect_err("pre-check fails");
    assert!(e.message().contains("nothing changed"), "{}", e.message());
    assert_eq!(l.cp().event_log().head(), head, "no event was written");
    assert_eq!(l.cp().secret_record("openai").expect("rec").active, 1);

    // A leaked key: v1 is revoked, then rotated. Rolling back to a revoked
    // version would leave nothing to serve, so a failed post-check keeps
    // the new version and says so.
    l.cp()
        .revoke(&lattice_shared::revocation::Revocation {
            target: lattice_shared::revocation::Target::SecretVersion {
                name: "openai".into(),
                version: 1,
            },
            reason: "leaked".into(),
        })
        .expect("revoke v1");
    up.lock().expect("lock").fail = Some("post-check".into());
    let (_, result) = rotate(&mut carol, "openai").await;
    let e = result.expect_err("post-check fails");
    assert!(e.message().contains("stays active"), "{}", e.message());
    let rec = l.cp().secret_record("openai").expect("rec");
    assert_eq!(rec.active, 3, "the new version serves");
    settle(&l).await;
    let lease = l.agents[0]
        .lease_secret("openai", 0, None)
        .await
        .expect("the new key is leased");
    assert_eq!(lease.version, 3);
    l.shutdown().await;
}

#[tokio::test]
async fn a_scheduled_rotation_runs_when_the_active_version_is_old_enough() {
    let up = Arc::new(Mutex::new(Upstream::default()));
    let url = webhook(up.clone()).await;
    let (l, clock) = common::lattice_with(rotation_spec(url, 3600)).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["eu"]).await;
    let state = l.cp();
    state.run_due_rotations().await;
    assert_eq!(
        state.secret_record("openai").expect("rec").active,
        1,
        "not due yet"
    );
    clock.advance(Duration::from_secs(3601));
    state.run_due_rotations().await;
    let rec = state.secret_record("openai").expect("rec");
    assert_eq!(rec.active, 2, "due: rotated");
    assert_eq!(rec.versions[&2].created_by, state.id().to_string());
    // Just rotated: not due again.
    state.run_due_rotations().await;
    assert_eq!(state.secret_record("openai").expect("rec").active, 2);
    l.shutdown().await;
}

// ---------------------------------------------------------------------------
// KEKs in an HSM (SoftHSM2 through PKCS#11).

#[tokio::test]
async fn the_control_plane_keeps_its_keks_in_a_pkcs11_token() {
    use lattice_shared::kms::pkcs11::testing;
    // Runs in a child process pointed at a throwaway token (see `softhsm`);
    // skipped with a message when SoftHSM2 is absent, unless CI requires it.
    let Some(()) = testing::softhsm(
        "secrets::the_control_plane_keeps_its_keks_in_a_pkcs11_token",
        &["lattice-cp"],
    ) else {
        return;
    };
    let spec = Spec {
        cp_config: Some(CpConfigFn(Arc::new(|c| {
            c.kms = lattice_control_plane::KmsConfig {
                kind: lattice_control_plane::KmsKind::Pkcs11,
                dir: None,
                pkcs11: Some(testing::config("lattice-cp")),
            };
        }))),
        ..spec()
    };
    let (mut l, _clock) = common::lattice_with(spec).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["eu"]).await;
    settle(&l).await;
    assert_eq!(
        &*l.agents[0]
            .lease_secret("openai", 0, None)
            .await
            .expect("lease")
            .value,
        MARKER
    );
    let r = carol
        .rotate_kms(pb::RotateKmsRequest {})
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(
        (r.kms.as_str(), r.kek_version, r.rewrapped),
        ("pkcs11:lattice-cp", 2, 1)
    );
    l.restart_cp().await.expect("restart");
    assert_eq!(
        &*l.cp().open_secret_version("openai", 1).expect("open"),
        MARKER
    );
    assert!(
        !l.dir.join("cp").join("kms").exists(),
        "no KEK file is written when the KMS is PKCS#11"
    );
    l.shutdown().await;
}

/// An alert whose configured action is `rotate-secret` rotates the secret its
/// record names through the secret's rotator: here any lease of `openai`,
/// configured as a honeytoken, replaces it upstream.
#[tokio::test]
async fn an_alert_can_rotate_the_secret_it_names() {
    use lattice_control_plane::detect::{Action, HONEYTOKEN};
    let up = Arc::new(Mutex::new(Upstream::default()));
    let url = webhook(up.clone()).await;
    let spec = Spec {
        cp_config: Some(CpConfigFn(Arc::new(move |c| {
            c.rotation = vec![lattice_control_plane::rotation::RotationConfig {
                secret: "openai".into(),
                webhook: url.clone(),
                every_secs: 0,
                timeout_secs: 5,
            }];
            c.detect.honeytokens = vec!["openai".into()];
            c.detect.actions = [(HONEYTOKEN.to_string(), Action::RotateSecret)].into();
        }))),
        ..spec()
    };
    let (l, _clock) = common::lattice_with(spec).await;
    let mut carol = custodian(&l, "carol");
    put(&mut carol, "openai", MARKER, &["*"]).await;
    settle(&l).await;
    let mut alerts = l.cp().subscribe_alerts();
    l.agents[0]
        .lease_secret("openai", 1, None)
        .await
        .expect("lease");
    let alert = tokio::time::timeout(lattice::harness::WAIT, alerts.recv())
        .await
        .expect("an alert in time")
        .expect("alert");
    assert_eq!(alert.rule, HONEYTOKEN);
    assert_eq!(alert.secret, "openai");
    assert_eq!(alert.action, Action::RotateSecret);
    // The rotation runs in its own task (nothing signals its end to a
    // test but the record): polled.
    common::eventually(
        "the secret is rotated",
        lattice::harness::WAIT,
        async || l.cp().secret_record("openai").expect("record").active == 2,
    )
    .await;
    let steps: Vec<String> = up
        .lock()
        .expect("lock")
        .calls
        .iter()
        .map(|(s, _)| s.clone())
        .collect();
    assert_eq!(steps[..2], ["create".to_string(), "pre-check".to_string()]);
    l.shutdown().await;
}

//! The tamper-evident audit log over the Admin API: every admin decision is
//! a leaf; signed tree heads verify against the root; altering a stored
//! entry or head is detected; inclusion and consistency proofs verify and
//! fail when altered.

use crate::common;

use lattice::harness::Lattice;
use lattice_control_plane::audit_log;
use lattice_shared::merkle;
use lattice_shared::policy::AdminRole;
use lattice_shared::proto as pb;
use lattice_shared::proto::admin_client::AdminClient;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

async fn records(auditor: &mut AdminClient<Channel>) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let r = auditor
            .audit_entries(pb::AuditEntriesRequest {
                start: out.len() as u64,
                limit: 1000,
            })
            .await
            .expect("entries")
            .into_inner();
        if r.entries.is_empty() {
            return out;
        }
        out.extend(r.entries.into_iter().map(|e| e.record));
    }
}

/// Every head, a page of 2 at a time (so that paging is exercised).
async fn heads(auditor: &mut AdminClient<Channel>) -> Vec<pb::SignedTreeHead> {
    let mut out = Vec::new();
    let mut start_size = 0;
    loop {
        let page = auditor
            .audit_tree_heads(pb::AuditTreeHeadsRequest {
                start_size,
                limit: 2,
            })
            .await
            .expect("heads")
            .into_inner();
        assert!(
            page.heads.len() <= 2,
            "{} heads in a page of 2",
            page.heads.len()
        );
        out.extend(page.heads);
        if page.next_start_size == 0 {
            return out;
        }
        start_size = page.next_start_size;
    }
}

fn root_der(l: &Lattice) -> Vec<u8> {
    l.cp().root_cert_der().to_vec()
}

fn sign_head(l: &Lattice) {
    l.cp().sign_audit_head().expect("sign");
}

#[tokio::test]
async fn admin_decisions_are_leaves_under_signed_heads_and_tampering_is_detected() {
    let (l, _clock) = common::lattice().await;
    let mut auditor = l.admin("ann", &[AdminRole::Auditor], &[]).expect("auditor");
    // A platform admin may not read the audit log; the denial is recorded.
    let e = l
        .bootstrap_admin()
        .expect("admin")
        .audit_entries(pb::AuditEntriesRequest {
            start: 0,
            limit: 10,
        })
        .await
        .expect_err("no ReadAudit");
    assert_eq!(e.code(), Code::PermissionDenied);
    // Some admin decisions: allowed and denied.
    let mut admin = l.bootstrap_admin().expect("admin");
    admin
        .create_join_token(pb::CreateJoinTokenRequest {
            id: "spiffe://lattice.local/agent/eu/new-1".into(),
            ttl_secs: 60,
        })
        .await
        .expect("token");
    let _ = auditor
        .create_join_token(pb::CreateJoinTokenRequest {
            id: "spiffe://lattice.local/agent/eu/new-2".into(),
            ttl_secs: 60,
        })
        .await
        .expect_err("auditors read only");
    // A put refused before any encryption work is recorded too.
    let e = auditor
        .put_secret(pb::PutSecretRequest {
            name: "openai".into(),
            value: b"sk-never-stored".to_vec(),
            regions: vec!["eu".into()],
            message: String::new(),
        })
        .await
        .expect_err("auditors hold no secrets");
    assert_eq!(e.code(), Code::PermissionDenied);
    sign_head(&l);

    let recs = records(&mut auditor).await;
    let text: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect();
    assert!(
        text.iter().any(|t| t.contains("\"kind\":\"admin\"")
            && t.contains("CreateJoinToken")
            && t.contains("\"outcome\":\"allowed\"")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("ReadAudit") && t.contains("denied"))
    );
    assert!(
        text.iter()
            .any(|t| t.contains("admin/ann") && t.contains("denied"))
    );
    assert!(
        text.iter()
            .any(|t| t.contains("PutSecret") && t.contains("denied")),
        "{text:#?}"
    );
    assert!(!text.iter().any(|t| t.contains("sk-never-stored")));
    let hs = heads(&mut auditor).await;
    assert!(hs.len() >= 2, "the start head and ours");
    let td = lattice_shared::id::TrustDomain::new("lattice.local").expect("td");
    let v = audit_log::verify(&recs, &hs, &root_der(&l), &td).expect("verifies");
    assert_eq!(v.entries, recs.len() as u64);

    // Altering a stored entry: the recomputed tree no longer matches.
    let state = l.cp();
    // The allowed join token's entry (after the bootstrap admin's minting
    // and the first start's records): rewrite it as denied.
    let at = text
        .iter()
        .position(|t| t.contains("CreateJoinToken") && t.contains("\"outcome\":\"allowed\""))
        .expect("the join token's entry") as u64;
    let original = state
        .store()
        .get("audit_leaves", &at.to_be_bytes())
        .expect("get")
        .expect("the entry");
    let forged = String::from_utf8_lossy(&original).replace("allowed", "denied");
    assert_ne!(forged.as_bytes(), original.as_slice());
    state
        .store()
        .put("audit_leaves", &at.to_be_bytes(), forged.as_bytes())
        .expect("tamper");
    let err = audit_log::verify(&records(&mut auditor).await, &hs, &root_der(&l), &td)
        .expect_err("tampering is detected");
    assert!(err.contains("altered"), "{err}");
    state
        .store()
        .put("audit_leaves", &at.to_be_bytes(), &original)
        .expect("restore");

    // Altering a head: its signature no longer holds.
    let mut bad = hs.clone();
    let last = bad.len() - 1;
    let mut th = pb::TreeHead::decode(bad[last].tree_head.as_slice()).expect("head");
    th.root_hash[0] ^= 1;
    bad[last].tree_head = th.encode_to_vec();
    let err = audit_log::verify(&recs, &bad, &root_der(&l), &td).expect_err("forged head");
    assert!(err.contains("signature"), "{err}");
    // A head signed by anyone else (another lattice's root) is refused.
    let other = lattice_shared::pki::Authority::new_root(
        &td,
        lattice_shared::pki::PrivateKey::generate_p256().expect("key"),
        std::time::SystemTime::now(),
        std::time::Duration::from_secs(3600),
    )
    .expect("root");
    assert!(audit_log::verify(&recs, &hs, other.cert_der(), &td).is_err());
    l.shutdown().await;
}

#[tokio::test]
async fn proofs_verify_and_fail_when_altered() {
    let (l, _clock) = common::lattice().await;
    let mut auditor = l.admin("ann", &[AdminRole::Auditor], &[]).expect("auditor");
    let state = l.cp();
    for i in 0..5 {
        state
            .audit(&serde_json::json!({"kind": "test", "n": i}))
            .expect("append");
    }
    sign_head(&l);
    let first = state.audit_log().size();
    // A head is signed on its own every HEAD_EVERY entries.
    let before = heads(&mut auditor).await.len();
    for i in 0..audit_log::HEAD_EVERY {
        state
            .audit(&serde_json::json!({"kind": "test", "n": 100 + i}))
            .expect("append");
    }
    assert!(
        heads(&mut auditor).await.len() > before,
        "a head was signed"
    );
    sign_head(&l);
    let p = auditor
        .audit_proof(pb::AuditProofRequest {
            index: 2,
            tree_size: 0,
            first_size: first,
        })
        .await
        .expect("proof")
        .into_inner();
    let entry = p.entry.expect("entry");
    let head = pb::TreeHead::decode(p.head.expect("head").tree_head.as_slice()).expect("head");
    let first_head =
        pb::TreeHead::decode(p.first_head.expect("first").tree_head.as_slice()).expect("first");
    let h = |v: &Vec<u8>| <merkle::Hash>::try_from(v.as_slice()).expect("32 bytes");
    let path: Vec<merkle::Hash> = p.inclusion.iter().map(h).collect();
    let leaf = merkle::leaf_hash(&entry.record);
    let root = h(&head.root_hash);
    assert!(merkle::verify_inclusion(
        2,
        head.tree_size,
        &leaf,
        &path,
        &root
    ));
    let mut bad = path.clone();
    bad[0][0] ^= 1;
    assert!(!merkle::verify_inclusion(
        2,
        head.tree_size,
        &leaf,
        &bad,
        &root
    ));
    assert!(!merkle::verify_inclusion(
        3,
        head.tree_size,
        &leaf,
        &path,
        &root
    ));
    let cons: Vec<merkle::Hash> = p.consistency.iter().map(h).collect();
    assert!(merkle::verify_consistency(
        first_head.tree_size,
        head.tree_size,
        &h(&first_head.root_hash),
        &root,
        &cons
    ));
    let mut bad = cons.clone();
    let last = bad.len() - 1;
    bad[last][3] ^= 1;
    assert!(!merkle::verify_consistency(
        first_head.tree_size,
        head.tree_size,
        &h(&first_head.root_hash),
        &root,
        &bad
    ));
    // Out of range: a clear error.
    let e = auditor
        .audit_proof(pb::AuditProofRequest {
            index: 1_000_000,
            tree_size: 0,
            first_size: 0,
        })
        .await
        .expect_err("out of range");
    assert_eq!(e.code(), Code::InvalidArgument);
    l.shutdown().await;
}

/// The records the control plane's log holds from `cache`, as JSON.
fn cache_records(l: &Lattice, cache: &str) -> Vec<serde_json::Value> {
    let log = l.cp().audit_log();
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let page = log.entries(start, 1000).expect("entries");
        if page.is_empty() {
            return out;
        }
        start = page.last().map(|e| e.index + 1).unwrap_or(start);
        for e in page {
            let v: serde_json::Value = serde_json::from_slice(&e.record).expect("json");
            if v["cache"] == cache {
                out.push(v);
            }
        }
    }
}

/// Polls until `n` records of `cache` are in the log (no event to wait on
/// across the two processes' worth of tasks; bounded by a deadline).
async fn wait_records(l: &Lattice, cache: &str, n: usize) -> Vec<serde_json::Value> {
    let what = format!("{n} records of {cache} arrive");
    common::eventually(&what, lattice::harness::WAIT, async || {
        let got = cache_records(l, cache);
        if got.len() >= n {
            Ok(got)
        } else {
            Err(format!("only {} arrived", got.len()))
        }
    })
    .await
}

#[tokio::test]
async fn cache_records_reach_the_log_once_across_a_partition_and_a_restart() {
    let spec = lattice::harness::Spec {
        secrets: vec!["openai".into()],
        ..lattice::harness::Spec::default()
    };
    let (mut l, _clock) = common::lattice_with(spec).await;
    let eu = l.caches[0].id().to_string();
    let mut carol = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("custodian");
    carol
        .put_secret(pb::PutSecretRequest {
            name: "openai".into(),
            value: b"sk-audit-test-value".to_vec(),
            regions: vec!["eu".into()],
            message: String::new(),
        })
        .await
        .expect("put");
    l.wait_all_applied(l.cp().event_log().head())
        .await
        .expect("applied");
    let agent = l.agents[0].clone();
    agent
        .mint(common::AUDIENCE, &["read".into()], None)
        .await
        .expect("mint");
    agent.lease_secret("openai", 0, None).await.expect("lease");
    agent
        .mint("https://not-listed.example.com", &[], None)
        .await
        .expect_err("denied");
    let got = wait_records(&l, &eu, 3).await;
    let kinds: Vec<&str> = got.iter().filter_map(|v| v["kind"].as_str()).collect();
    assert_eq!(kinds, vec!["issued", "leased", "refused"]);
    assert_eq!(got[1]["secret"], "openai");
    assert!(
        !got.iter()
            .any(|v| v.to_string().contains("sk-audit-test-value")),
        "never the value"
    );
    assert_eq!(got[0]["agent"], agent.id.as_str());

    // Partitioned: records wait in the cache's outbox on disk.
    l.caches[0].partition();
    for _ in 0..3 {
        agent
            .mint(common::AUDIENCE, &["read".into()], None)
            .await
            .expect("mint while partitioned (still fresh on the fake clock)");
    }
    let outbox = l.caches[0].app().outbox();
    common::eventually(
        "records become durable",
        lattice::harness::WAIT,
        async || outbox.backlog() >= 3,
    )
    .await;
    drop(outbox); // it holds the cache's store, which a restart reopens
    assert_eq!(
        cache_records(&l, &eu).len(),
        3,
        "nothing crossed the partition"
    );
    l.caches[0].heal();
    wait_records(&l, &eu, 6).await;

    // The records sent together are stored together (one chunk): altering
    // one record inside a chunk is detected like any other alteration.
    sign_head(&l);
    let mut auditor = l.admin("ann", &[AdminRole::Auditor], &[]).expect("auditor");
    let hs = heads(&mut auditor).await;
    let td = lattice_shared::id::TrustDomain::new("lattice.local").expect("td");
    let state = l.cp();
    let (key, original) = state
        .store()
        .scan_prefix("audit_leaves", b"", usize::MAX)
        .expect("scan")
        .into_iter()
        // How records batch depends on timing; the partition's three
        // issuances travel together whatever else does.
        .find(|(_, v)| {
            v.first() == Some(&lattice_shared::chunk::CHUNK_V1)
                && lattice_shared::chunk::decode(v).is_ok_and(|r| r.len() >= 2)
                && v.windows(8).any(|w| w == b"\"issued\"")
        })
        .expect("a stored chunk of several records, one of them an issuance");
    audit_log::verify(&records(&mut auditor).await, &hs, &root_der(&l), &td)
        .expect("verifies before");
    // Same length, so the chunk still decodes: only the hashes tell.
    let at = original
        .windows(8)
        .position(|w| w == b"\"issued\"")
        .expect("an issued record in the chunk");
    let mut forged = original.clone();
    forged[at + 1..at + 7].copy_from_slice(b"ISSUED");
    state
        .store()
        .put("audit_leaves", &key, &forged)
        .expect("tamper");
    let err = audit_log::verify(&records(&mut auditor).await, &hs, &root_der(&l), &td)
        .expect_err("tampering inside a chunk is detected");
    assert!(err.contains("altered"), "{err}");
    state
        .store()
        .put("audit_leaves", &key, &original)
        .expect("restore");

    // A restart: the cache's numbering goes on and nothing is sent twice.
    agent
        .mint(common::AUDIENCE, &["read".into()], None)
        .await
        .expect("mint");
    l.restart_cache(0).await.expect("restart");
    l.caches[0].wait_fresh().await.expect("fresh");
    let agent = l.agents[0].clone();
    agent
        .mint(common::AUDIENCE, &["read".into()], None)
        .await
        .expect("mint after restart");
    let got = wait_records(&l, &eu, 8).await;
    let seqs: Vec<u64> = got.iter().filter_map(|v| v["cache_seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (1..=8).collect::<Vec<u64>>(),
        "each record once, in order"
    );
    // The ack follows the commit: the cache deletes what the log holds.
    common::eventually(
        "acked records are deleted",
        lattice::harness::WAIT,
        async || l.caches[0].app().outbox().backlog() == 0,
    )
    .await;
    l.shutdown().await;
}

/// Detection on the live stream: ordinary minting raises nothing; a lease
/// of a honeytoken raises an alert on `WatchAlerts`, in the log, and (as
/// configured) revokes the agent; its next attempt is a use after
/// revocation.
#[tokio::test]
async fn a_honeytoken_lease_raises_an_alert_and_revokes_the_agent() {
    use lattice::harness::{CpConfigFn, Spec};
    use lattice_control_plane::detect::{Action, HONEYTOKEN, USE_AFTER_REVOCATION};
    let (l, _clock) = common::lattice_with(Spec {
        secrets: vec!["openai".into(), "canary".into()],
        cp_config: Some(CpConfigFn(std::sync::Arc::new(|c| {
            c.detect.honeytokens = vec!["canary".into()];
            c.detect.actions = [(HONEYTOKEN.to_string(), Action::RevokeAgent)].into();
        }))),
        ..Spec::default()
    })
    .await;
    let mut custodian = l
        .admin("carol", &[AdminRole::SecretCustodian], &[])
        .expect("custodian");
    for (name, value) in [("openai", b"sk-real".as_slice()), ("canary", b"sk-canary")] {
        custodian
            .put_secret(pb::PutSecretRequest {
                name: name.into(),
                value: value.to_vec(),
                regions: vec!["eu".into()],
                message: String::new(),
            })
            .await
            .expect("put");
    }
    let head = l.cp().event_log().head();
    l.wait_all_applied(head).await.expect("applied");
    let mut auditor = l
        .admin("audrey", &[AdminRole::Auditor], &[])
        .expect("auditor");
    let mut alerts = auditor
        .watch_alerts(pb::WatchAlertsRequest {})
        .await
        .expect("watch alerts")
        .into_inner();

    let agent = l.agents[0].clone();
    for _ in 0..5 {
        agent
            .mint(common::AUDIENCE, &["read".into()], None)
            .await
            .expect("ordinary mint");
    }
    agent
        .lease_secret("openai", 0, None)
        .await
        .expect("ordinary lease");
    agent
        .lease_secret("canary", 0, None)
        .await
        .expect("the honeytoken leases");

    let first = next_alert(&mut alerts).await;
    assert_eq!(first.rule, HONEYTOKEN, "ordinary traffic raised {first:?}");
    assert_eq!(first.subject, agent.id.as_str());
    assert_eq!(first.action, "revoke-agent");
    assert!(first.detail.contains("canary"), "{}", first.detail);

    // The action: the agent is revoked and learns it.
    let mut revoked = agent.revoked_signal();
    tokio::time::timeout(lattice::harness::WAIT, revoked.wait_for(|r| *r))
        .await
        .expect("revoked in time")
        .expect("signal");
    // Its next attempt (straight to the cache) is refused as revoked: an
    // alert of its own once the record arrives.
    let _ = agent
        .cache_client(None)
        .expect("client")
        .mint_token(common::mint_req(common::AUDIENCE))
        .await
        .expect_err("revoked");
    let second = next_alert(&mut alerts).await;
    assert_eq!(second.rule, USE_AFTER_REVOCATION);

    // Both alerts are leaves of the tamper-evident log.
    let kinds: Vec<String> = records(&mut auditor)
        .await
        .iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(r).ok())
        .filter(|v| v["kind"] == "alert")
        .map(|v| v["rule"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        kinds,
        vec![HONEYTOKEN.to_string(), USE_AFTER_REVOCATION.to_string()]
    );
}

async fn next_alert(s: &mut tonic::Streaming<pb::AlertEvent>) -> pb::AlertEvent {
    tokio::time::timeout(lattice::harness::WAIT, s.message())
        .await
        .expect("an alert in time")
        .expect("stream ok")
        .expect("stream open")
}

/// A request id ties a cache's record to the caller's logs: the caller's
/// own (x-lattice-request-id) is kept, else the cache makes one; either way
/// it comes back in the response metadata and is in the record.
#[tokio::test]
async fn records_carry_the_request_id_and_the_source_address() {
    let (l, _clock) = common::lattice().await;
    let agent = l.agents[0].clone();
    let mut req = tonic::Request::new(common::mint_req(common::AUDIENCE));
    req.metadata_mut()
        .insert("x-lattice-request-id", "req-7f3a".parse().expect("ascii"));
    let r = agent
        .cache_client(None)
        .expect("client")
        .mint_token(req)
        .await
        .expect("mint");
    assert_eq!(
        r.metadata()
            .get("x-lattice-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-7f3a")
    );
    let jti = r.into_inner().jti;
    let r = agent
        .cache_client(None)
        .expect("client")
        .mint_token(common::mint_req(common::AUDIENCE))
        .await
        .expect("mint");
    let made = r
        .metadata()
        .get("x-lattice-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("an id is made")
        .to_string();
    let jti2 = r.into_inner().jti;
    let issued: Vec<(String, String, String)> = l
        .audit
        .events()
        .into_iter()
        .filter_map(|e| match e {
            lattice_regional_cache::AuditEvent::Issued {
                jti,
                request_id,
                source,
                ..
            } => Some((jti, request_id, source)),
            _ => None,
        })
        .collect();
    assert!(
        issued.contains(&(jti, "req-7f3a".into(), "127.0.0.1".into())),
        "{issued:?}"
    );
    assert!(
        issued.contains(&(jti2, made, "127.0.0.1".into())),
        "{issued:?}"
    );

    // A refusal carries the same: who, from where, what of what, which request.
    let mut req = tonic::Request::new(common::mint_req("https://not-listed.example.com"));
    req.metadata_mut()
        .insert("x-lattice-request-id", "req-deny-1".parse().expect("ascii"));
    agent
        .cache_client(None)
        .expect("client")
        .mint_token(req)
        .await
        .expect_err("denied by policy");
    let refused = l
        .audit
        .events()
        .into_iter()
        .find(|e| {
            matches!(e, lattice_regional_cache::AuditEvent::Refused { request_id, .. } if request_id == "req-deny-1")
        })
        .expect("the refusal is recorded with its request id");
    let v: serde_json::Value =
        serde_json::from_slice(&refused.to_record("eu")).expect("record is JSON");
    assert_eq!(v["kind"], "refused");
    assert_eq!(v["source"], "127.0.0.1");
    assert_eq!(v["action"], "MintToken");
    assert_eq!(v["resource"], "https://not-listed.example.com");
    assert_eq!(v["agent"], agent.id.as_str());
    assert_eq!(v["decision"], "deny");
    assert!(v["policy_version"].as_u64().is_some_and(|p| p > 0));
    assert!(
        v["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("policy:"))
    );
}

/// A control plane restored from a copy taken before its last audit acks
/// asks a cache for records the cache has already trimmed. The gap is
/// recorded as an `audit_gap` leaf and the stream that carries
/// revocations stays up: the cache keeps serving and its new records
/// arrive (the control plane used to end the stream on every batch, and
/// the cache went stale: issue #19).
#[tokio::test]
async fn a_control_plane_restored_before_its_last_audit_acks_records_the_gap_and_serves_on() {
    let (mut l, _clock) = common::lattice().await;
    let eu = l.caches[0].id().to_string();
    let agent = l.agents[0].clone();
    agent.mint(common::AUDIENCE, &[], None).await.expect("mint");
    let before = wait_records(&l, &eu, 1).await.len();
    let dir = l.cp_cfg.data_dir.clone();
    l.stop_cp().await.expect("stop");
    let backup = tempfile::tempdir().expect("tempdir");
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", from.display()))
            .arg(to)
            .status()
            .expect("cp");
        assert!(status.success());
    };
    copy(&dir, backup.path());
    l.restart_cp().await.expect("start");
    l.caches[0].wait_fresh().await.expect("fresh");
    // Records the control plane acks and the cache then trims.
    for _ in 0..20 {
        agent.mint(common::AUDIENCE, &[], None).await.expect("mint");
    }
    wait_records(&l, &eu, before + 20).await;
    let outbox = l.caches[0].app().outbox();
    common::eventually(
        "the cache's records are all acked",
        lattice::harness::WAIT,
        async || outbox.acked() >= *outbox.subscribe_durable().borrow(),
    )
    .await;

    // The control plane comes back from the copy: it lost those 20.
    l.stop_cp().await.expect("stop");
    std::fs::remove_dir_all(&dir).expect("clear");
    std::fs::create_dir_all(&dir).expect("mkdir");
    copy(backup.path(), &dir);
    l.restart_cp().await.expect("restored start");
    l.caches[0]
        .wait_fresh()
        .await
        .expect("fresh after the restore");
    for _ in 0..5 {
        agent
            .mint(common::AUDIENCE, &[], None)
            .await
            .expect("the cache serves on");
    }
    let got = wait_records(&l, &eu, before + 6).await;
    let gaps: Vec<_> = got.iter().filter(|v| v["kind"] == "audit_gap").collect();
    assert_eq!(gaps.len(), 1, "one gap recorded: {gaps:?}");
    let (from, to) = (
        gaps[0]["from"].as_u64().expect("from"),
        gaps[0]["to"].as_u64().expect("to"),
    );
    assert_eq!(
        to - from + 1,
        20,
        "the gap names the 20 records the restore lost"
    );
    assert_eq!(
        got.iter().filter(|v| v["kind"] == "issued").count(),
        before + 5,
        "every record the cache still held arrived"
    );
    assert!(l.caches[0].app().connected(), "the link stayed up");
    l.shutdown().await;
}

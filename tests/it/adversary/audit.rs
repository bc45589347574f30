//! A compromised cache forges audit records about agents and secrets beyond
//! its authority, to make the control plane's detection revoke or rotate
//! them. The control plane refuses those records (they are not appended as
//! facts about the agents), raises one alert naming the sender, and takes
//! no action outside the sender's region.

use lattice::harness::{CpConfigFn, Spec, WAIT};
use lattice_control_plane::detect::{
    Action, DENIAL_BURST, HONEYTOKEN, OUTSIDE_AUTHORITY, USE_AFTER_REVOCATION,
};
use lattice_shared::policy::AdminRole;
use lattice_shared::proto as pb;

use super::{A, B, US, spec};
use crate::common::*;

#[tokio::test]
async fn a_cache_cannot_report_records_about_another_regions_agents_or_secrets() {
    let (l, _clock) = lattice_with(Spec {
        secrets: vec!["canary".into()],
        cp_config: Some(CpConfigFn(std::sync::Arc::new(|c| {
            c.detect.honeytokens = vec!["canary".into()];
            c.detect.actions = [
                (HONEYTOKEN.to_string(), Action::RotateSecret),
                (DENIAL_BURST.to_string(), Action::RevokeAgent),
                (USE_AFTER_REVOCATION.to_string(), Action::RevokeAgent),
            ]
            .into();
        }))),
        ..spec()
    })
    .await;
    put_secret_applied(&l, "canary", b"sk-canary", &["eu"]).await;
    let mut auditor = l
        .admin("audrey", &[AdminRole::Auditor], &[])
        .expect("auditor");
    let mut alerts = auditor
        .watch_alerts(pb::WatchAlertsRequest {})
        .await
        .expect("watch alerts")
        .into_inner();

    // The us cache, compromised, reports an eu agent refusing as revoked
    // again and again, and its own agent leasing the eu-only honeytoken.
    let (a, b) = (l.agents[A].id.to_string(), l.agents[B].id.to_string());
    let now = l.cp().now_ms();
    let outbox = l.caches[US].app().outbox();
    for i in 0..12 {
        outbox.record(
            serde_json::json!({
                "kind": "refused", "agent": a, "reason": "agent revoked",
                "at_unix_ms": now + i,
            })
            .to_string()
            .into_bytes(),
        );
    }
    outbox.record(
        serde_json::json!({
            "kind": "leased", "agent": b, "secret": "canary",
            "fingerprint": "f", "at_unix_ms": now,
        })
        .to_string()
        .into_bytes(),
    );

    // All of them reach the control plane (the cache writes as records
    // come, so they may arrive in more than one batch).
    let last = outbox.flush_now().expect("written");
    eventually("the control plane holds every record", WAIT, async || {
        outbox.acked() >= last
    })
    .await;

    // What comes back is one alert about the us cache, and nothing the
    // forged records asked for.
    let alert = tokio::time::timeout(WAIT, alerts.message())
        .await
        .expect("an alert in time")
        .expect("stream ok")
        .expect("stream open");
    assert_eq!(
        (alert.rule.as_str(), alert.subject.as_str()),
        (OUTSIDE_AUTHORITY, l.caches[US].id().as_str()),
        "{alert:?}"
    );
    assert!(
        alert
            .detail
            .contains("refused as beyond the cache's authority"),
        "{}",
        alert.detail
    );
    assert!(
        !l.cp()
            .event_log()
            .revocations()
            .is_agent_revoked(&l.agents[A].id),
        "an eu agent revoked on the word of the us cache"
    );
    let canary = l.cp().secret_record("canary").expect("record");
    assert_eq!(canary.active, 1, "the honeytoken was rotated");
    // The forged records are not in the log as facts about the agents.
    let entries = auditor
        .audit_entries(pb::AuditEntriesRequest {
            start: 0,
            limit: 1000,
        })
        .await
        .expect("entries")
        .into_inner()
        .entries;
    let forged = entries
        .iter()
        .filter(|e| {
            let v: serde_json::Value = serde_json::from_slice(&e.record).unwrap_or_default();
            v["cache"] == l.caches[US].id().as_str() && (v["agent"] == a || v["secret"] == "canary")
        })
        .count();
    assert_eq!(forged, 0, "forged records stored as facts");
    l.shutdown().await;
}

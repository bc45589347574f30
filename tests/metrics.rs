//! The Prometheus metrics of the revocation path: propagation time per cache,
//! applied sequence, staleness, refusals by reason. (Its own test binary: the
//! metrics recorder is process-wide.)

#[path = "it/common/mod.rs"]
#[allow(dead_code)] // this binary uses only a few of the shared helpers
mod common;

use std::time::Duration;

use lattice_shared::revocation::Target;

#[tokio::test]
async fn revocation_metrics_are_exported() {
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("first recorder in this process");

    let (l, clock) = common::lattice().await;
    let ev = l.revoke(Target::Jti("m1".into())).expect("revoke");
    l.wait_all_applied(ev.seq).await.expect("applied");
    // A stale refusal.
    l.caches[0].partition();
    clock.advance(l.caches[0].app().max_staleness() + Duration::from_millis(1));
    assert!(l.agents[0].mint(common::AUDIENCE, &[], None).await.is_err());
    l.caches[0].app().publish_metrics();

    // Acks reach the control plane just after the durable apply.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = handle.render();
        if text.contains("lattice_revocation_propagation_seconds") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no propagation metric:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // The log also holds the two policy releases made at start.
    let applied = format!(
        "lattice_cache_applied_seq{{cache=\"spiffe://lattice.local/cache/eu/cache-1\"}} {}",
        ev.seq
    );
    let head = format!("lattice_cp_log_head {}", ev.seq);
    for needle in [
        "lattice_revocation_propagation_seconds",
        "cache=\"spiffe://lattice.local/cache/us/cache-1\"",
        applied.as_str(),
        "lattice_cache_staleness_seconds{cache=\"spiffe://lattice.local/cache/eu/cache-1\"}",
        "lattice_cache_refusals_total{reason=\"stale\",cache=\"spiffe://lattice.local/cache/eu/cache-1\"} 1",
        head.as_str(),
        "lattice_cache_policy_version 2",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    l.shutdown().await;
}

//! Structured logs (`tracing`) and Prometheus metrics, set up once per process.
//! Log fields that name the same thing everywhere, so that logs can be queried:
//! `peer_id`, `cache_id`, `region` (tracing field names are tokens, not constants).

use std::net::SocketAddr;

/// Installs the global subscriber. `RUST_LOG` filters (default `default_level`);
/// `json` selects JSON lines.
pub fn init_tracing(json: bool, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.compact().try_init()
    };
}

/// Serves Prometheus metrics on `listen` (path `/metrics`). Only the first
/// call in a process installs the recorder.
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<(), String> {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
    let builder = match listen {
        Some(addr) => builder.with_http_listener(addr),
        None => return Ok(()),
    };
    builder.install().map_err(|e| e.to_string())
}

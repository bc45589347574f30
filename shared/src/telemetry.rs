//! Structured logs (`tracing`) and Prometheus metrics, set up once per process.
//! Log fields that name the same thing everywhere, so that logs can be queried:
//! `peer_id`, `cache_id`, `region` (tracing field names are tokens, not constants).

use std::net::SocketAddr;
use std::time::Duration;

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
/// call in a process installs the recorder. The listener takes few
/// connections, each briefly (see [`serve_metrics`]).
pub fn install_metrics(listen: Option<SocketAddr>) -> Result<(), String> {
    let Some(addr) = listen else {
        return Ok(());
    };
    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|_| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| format!("metrics listener {addr}: {e}"))?;
    tokio::spawn(serve_metrics(listener, handle, MetricsLimits::default()));
    Ok(())
}

/// Caps of the metrics listener: scrapes are few and short.
#[derive(Debug, Clone, Copy)]
pub struct MetricsLimits {
    /// Connections open at once, and from one source address.
    pub max_connections: usize,
    pub max_per_source: usize,
    /// A connection's whole life (reading the request, rendering, writing).
    pub max_age: Duration,
}

impl Default for MetricsLimits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            max_per_source: 4,
            max_age: Duration::from_secs(10),
        }
    }
}

/// Serves `/metrics` from `handle` on `listener` behind the process's
/// connection budget and caps of its own; a connection over a cap is
/// closed at once, one that is slow or idle is closed after
/// `limits.max_age`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    limits: MetricsLimits,
) {
    use crate::admission::{Admission, AdmissionLimits};
    let own = Admission::new(AdmissionLimits {
        fd_limit: 0,
        max_connections: limits.max_connections,
        max_handshakes: limits.max_connections,
        max_handshakes_per_source: limits.max_per_source,
        max_anonymous: 0,
        max_anonymous_per_source: 0,
    });
    let process = Admission::process();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (Ok(permit), Ok(slot)) = (process.connection(), own.handshake(remote.ip())) else {
            metrics::counter!("lattice_connections_refused_total", "reason" => "metrics_limit")
                .increment(1);
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handle = handle.clone();
                    async move {
                        let (status, body) = if req.uri().path() == "/metrics" {
                            (hyper::StatusCode::OK, handle.render())
                        } else {
                            (
                                hyper::StatusCode::NOT_FOUND,
                                "not found; try /metrics\n".to_owned(),
                            )
                        };
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(http_body_util::Full::new(bytes_of(body)))
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.max_age)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(limits.max_age, conn).await;
        });
    }
}

fn bytes_of(s: String) -> hyper::body::Bytes {
    hyper::body::Bytes::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
        let mut c = tokio::net::TcpStream::connect(addr).await?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
            .await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn idle_connections_from_one_source_cannot_block_scrapes() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = MetricsLimits {
            max_connections: 16,
            max_per_source: 4,
            max_age: Duration::from_millis(500),
        };
        tokio::spawn(serve_metrics(listener, handle, limits));
        // 50 idle connections from another loopback address.
        let mut idle = Vec::new();
        for _ in 0..50 {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind("127.0.0.2:0".parse().expect("addr"))
                .expect("bind 127.0.0.2");
            idle.push(s.connect(addr).await.expect("connect"));
        }
        let page = tokio::time::timeout(Duration::from_secs(5), scrape(addr))
            .await
            .expect("a scrape is answered during the flood")
            .expect("scrape");
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        // Every idle connection is closed: over the cap at once, the rest
        // after their short life.
        for mut c in idle {
            let mut b = [0u8; 1];
            let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b))
                .await
                .expect("closed by the server");
            assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        }
    }
}

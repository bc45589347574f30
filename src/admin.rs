//! The operator's client for the control plane's `Admin` API, authenticated
//! with an admin certificate (the bootstrap one is written by the control
//! plane to `DATA/admin/`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use lattice_shared::clock::SystemClock;
use lattice_shared::pki::{PrivateKey, TrustBundle, inspect};
use lattice_shared::proto::admin_client::AdminClient;
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use tonic::transport::Channel;

/// Connects to the control plane at `addr` with the credential in `dir`
/// (`admin.crt`, `admin.key`, `root.crt`).
pub fn connect(addr: SocketAddr, dir: &Path) -> anyhow::Result<AdminClient<Channel>> {
    let root = lattice_shared::pem::read_certs(&dir.join("root.crt")).map_err(|e| anyhow!(e))?;
    let certs = lattice_shared::pem::read_certs(&dir.join("admin.crt")).map_err(|e| anyhow!(e))?;
    let key = lattice_shared::pem::read_key(&dir.join("admin.key")).map_err(|e| anyhow!(e))?;
    let info = inspect(&certs[0]).context("admin certificate")?;
    let id = info
        .id
        .ok_or_else(|| anyhow!("admin certificate carries no id"))?;
    let bundle = Arc::new(TrustBundle::new(
        id.trust_domain().clone(),
        root[0].clone(),
    )?);
    let key = PrivateKey::from_pkcs8(&key)?;
    let cert = ReloadableCert::new(certs, &key)?;
    let tls = lattice_shared::tls::client_config(
        bundle,
        SystemClock::shared(),
        ExpectedServer::ControlPlane,
        Some(cert),
    )?;
    Ok(AdminClient::new(lattice_shared::net::channel(addr, tls)?))
}

/// `lattice status` as text: the log head, then one line per cache with its
/// acknowledged sequence, lag, staleness, last contact and state.
pub fn render_status(r: &lattice_shared::proto::StatusResponse, now_ms: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trust domain {}; log head {}; {} outstanding join tokens; staleness bound {} ms",
        r.trust_domain, r.head_seq, r.join_tokens_outstanding, r.max_staleness_ms
    );
    let _ = writeln!(
        out,
        "{:<44} {:>8} {:>6} {:>12} {:>14}  state",
        "cache", "applied", "lag", "staleness", "last contact"
    );
    for c in &r.caches {
        let state = if c.revoked {
            "revoked"
        } else if !c.connected {
            "disconnected"
        } else if c.staleness_ms > r.max_staleness_ms {
            "stale"
        } else {
            "fresh"
        };
        let contact = if c.last_contact_unix_ms == 0 {
            "never".to_string()
        } else {
            format!("{} ms ago", (now_ms - c.last_contact_unix_ms).max(0))
        };
        let _ = writeln!(
            out,
            "{:<44} {:>8} {:>6} {:>9} ms {:>14}  {state}",
            c.cache_id,
            c.acked_seq,
            r.head_seq.saturating_sub(c.acked_seq),
            c.staleness_ms,
            contact
        );
    }
    out
}

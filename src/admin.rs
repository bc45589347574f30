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
    let key = PrivateKey::from_pkcs8(&key)?;
    connect_with(addr, root[0].clone(), certs, &key)
}

/// Connects with an admin certificate chain and key held in memory.
pub fn connect_with(
    addr: SocketAddr,
    root_der: Vec<u8>,
    certs: Vec<Vec<u8>>,
    key: &PrivateKey,
) -> anyhow::Result<AdminClient<Channel>> {
    let first = certs
        .first()
        .ok_or_else(|| anyhow!("no admin certificate"))?;
    let info = inspect(first).context("admin certificate")?;
    let id = info
        .id
        .ok_or_else(|| anyhow!("admin certificate carries no id"))?;
    let bundle = Arc::new(TrustBundle::new(id.trust_domain().clone(), root_der)?);
    let cert = ReloadableCert::new(certs, key)?;
    let tls = lattice_shared::tls::client_config(
        bundle,
        SystemClock::shared(),
        ExpectedServer::ControlPlane,
        Some(cert),
    )?;
    Ok(AdminClient::new(lattice_shared::net::channel(addr, tls)?))
}

/// `lattice status` as text: the log head and the policy in force, then one
/// line per cache with its acknowledged sequence, lag, staleness, last
/// contact, the policy version it enforces and its state.
pub fn render_status(r: &lattice_shared::proto::StatusResponse, now_ms: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "trust domain {}; log head {}; {} outstanding join tokens; policy v{} (event {})",
        r.trust_domain, r.head_seq, r.join_tokens_outstanding, r.policy_version, r.policy_seq
    );
    let _ = writeln!(
        out,
        "{:<44} {:>8} {:>6} {:>12} {:>10} {:>14} {:>7} {:>8}  state",
        "cache", "applied", "lag", "staleness", "bound L", "last contact", "policy", "custody"
    );
    for c in &r.caches {
        // Past the release's event yet enforcing an older one: it refused it.
        let refused = c.acked_seq >= r.policy_seq && c.policy_version < r.policy_version;
        let state = if c.revoked {
            "revoked"
        } else if !c.connected {
            "disconnected"
        } else if refused {
            "refused policy"
        } else if c.staleness_ms == 0 {
            "syncing"
        } else if c.staleness_ms > bound_ms(c, r) {
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
            "{:<44} {:>8} {:>6} {:>9} ms {:>7} ms {:>14} {:>7} {:>8}  {state}",
            c.cache_id,
            c.acked_seq,
            r.head_seq.saturating_sub(c.acked_seq),
            c.staleness_ms,
            bound_ms(c, r),
            contact,
            format!("v{}", c.policy_version),
            if c.custody.is_empty() {
                "-"
            } else {
                &c.custody
            }
        );
    }
    out
}

/// The staleness bound L a cache enforces, as it reported it; from a cache
/// or control plane that predates the report, the control plane's old
/// setting, else the caches' default.
fn bound_ms(
    c: &lattice_shared::proto::CacheStatus,
    r: &lattice_shared::proto::StatusResponse,
) -> u64 {
    [c.max_staleness_ms, r.max_staleness_ms]
        .into_iter()
        .find(|&ms| ms > 0)
        .unwrap_or(DEFAULT_MAX_STALENESS_MS)
}

/// The caches' default bound (`regional-cache`'s `max_staleness_ms`).
const DEFAULT_MAX_STALENESS_MS: u64 = 5000;

/// A gRPC refusal as a CLI error: the server's message and its code.
pub fn refused(s: tonic::Status) -> anyhow::Error {
    anyhow!("{} ({:?})", s.message(), s.code())
}

fn unix_ms_text(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// One policy version as a line.
pub fn render_version(v: &lattice_shared::proto::PolicyVersion) -> String {
    let mut line = format!(
        "v{:<4} {}  sha256:{}  by {}",
        v.version,
        unix_ms_text(v.released_at_unix_ms),
        hex::encode(&v.bundle_sha256).get(..16).unwrap_or(""),
        v.pushed_by
    );
    if !v.approved_by.is_empty() {
        line.push_str(&format!(", approved by {}", v.approved_by));
    }
    if v.rollback_of != 0 {
        line.push_str(&format!(" (rollback to v{})", v.rollback_of));
    }
    if !v.message.is_empty() {
        line.push_str(&format!(": {}", v.message));
    }
    line
}

/// `lattice policy history`.
pub fn render_history(h: &lattice_shared::proto::PolicyHistoryResponse) -> String {
    let mut out = String::new();
    for v in &h.versions {
        let mark = if v.version == h.current { "*" } else { " " };
        out.push_str(&format!("{mark} {}\n", render_version(v)));
    }
    out
}

/// `lattice pending`.
pub fn render_pending(p: &lattice_shared::proto::ListPendingResponse) -> String {
    if p.requests.is_empty() {
        return "no request waits for approval\n".into();
    }
    let mut out = String::new();
    for r in &p.requests {
        out.push_str(&format!(
            "{}  {} by {} (expires {}): {}\n",
            r.request_id,
            r.action,
            r.requested_by,
            unix_ms_text(r.expires_at_unix * 1000),
            r.summary
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_shared::proto as pb;

    #[test]
    fn status_shows_a_cache_that_refused_the_release_in_force() {
        let cache = |id: &str, acked, policy_version| pb::CacheStatus {
            cache_id: id.into(),
            acked_seq: acked,
            connected: true,
            staleness_ms: 10,
            policy_version,
            ..Default::default()
        };
        let r = pb::StatusResponse {
            head_seq: 9,
            max_staleness_ms: 5000,
            policy_version: 4,
            policy_seq: 7,
            caches: vec![
                cache("ok", 9, 4),
                cache("behind", 6, 3),
                cache("refused", 9, 3),
            ],
            ..Default::default()
        };
        let text = render_status(&r, 0);
        let line = |id: &str| {
            text.lines()
                .find(|l| l.starts_with(id))
                .unwrap_or_default()
                .to_string()
        };
        assert!(line("ok").ends_with("fresh"), "{text}");
        assert!(
            line("behind").ends_with("fresh"),
            "still catching up: {text}"
        );
        assert!(line("refused").ends_with("refused policy"), "{text}");
    }

    #[test]
    fn status_judges_each_cache_by_the_bound_it_reported() {
        let cache = |id: &str, max_staleness_ms| pb::CacheStatus {
            cache_id: id.into(),
            connected: true,
            staleness_ms: 300,
            max_staleness_ms,
            ..Default::default()
        };
        let r = pb::StatusResponse {
            caches: vec![cache("tight", 200), cache("loose", 5000)],
            ..Default::default()
        };
        let text = render_status(&r, 0);
        let line = |id: &str| text.lines().find(|l| l.starts_with(id)).unwrap_or_default();
        assert!(line("tight").ends_with("stale"), "{text}");
        assert!(line("tight").contains(" 200 ms"), "{text}");
        assert!(line("loose").ends_with("fresh"), "{text}");
    }
}

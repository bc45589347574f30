//! Where upstream keys come from ([`SecretSource`]), the proxy's cache of
//! leases, and what it audits ([`ProxyEvent`], [`ProxyAudit`]).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use zeroize::Zeroizing;

use super::{Inner, LEASE_REFRESH_MARGIN_SECS, metric};

/// A leased upstream key. The value is zeroized on drop and never shown by
/// `Debug`.
pub struct LeasedKey {
    pub value: Zeroizing<Vec<u8>>,
    pub fingerprint: String,
    pub expires_at_unix: i64,
    pub version: u64,
}

impl std::fmt::Debug for LeasedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasedKey")
            .field("value", &"[REDACTED]")
            .field("fingerprint", &self.fingerprint)
            .field("expires_at_unix", &self.expires_at_unix)
            .field("version", &self.version)
            .finish()
    }
}

/// Where upstream keys come from: the regional cache in production.
pub trait SecretSource: Send + Sync + 'static {
    /// Leases the active version of secret `name`. The error is a message fit
    /// for the calling process (it is returned in a 503 body).
    fn lease<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<LeasedKey, LeaseError>>;

    /// Changes whenever leases taken before may no longer be used (a
    /// secret version was revoked, the agent's posture changed): the proxy
    /// then drops its cached leases and leases again.
    fn generation(&self) -> u64 {
        0
    }
}

/// Why a lease failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseError {
    pub message: String,
    /// The source could not be reached (a current lease may still be used
    /// until it expires); otherwise it refused, and nothing is used.
    pub unreachable: bool,
}

impl From<String> for LeaseError {
    fn from(message: String) -> Self {
        Self {
            message,
            unreachable: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProxyEventKind {
    #[serde(rename = "proxy_use")]
    Use,
    #[serde(rename = "proxy_refused")]
    Refused,
}

impl ProxyEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyEventKind::Use => "proxy_use",
            ProxyEventKind::Refused => "proxy_refused",
        }
    }
}

/// One audited use or refusal. Never carries the key, only its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyEvent {
    pub kind: ProxyEventKind,
    /// The secret name for a use or a refused lease; the requested host
    /// otherwise (empty if the request named none).
    pub resource: String,
    /// `METHOD host /path`, without the query string.
    pub detail: String,
    /// Why it was refused; empty for a use.
    pub reason: String,
    /// The status returned to the caller.
    pub status: u16,
    pub fingerprint: Option<String>,
    pub key_version: Option<u64>,
    /// The calling process's uid, when known.
    pub local_caller: Option<u32>,
    pub request_id: String,
    pub at_unix_ms: i64,
}

/// Receives audit events; must not block.
pub trait ProxyAudit: Send + Sync + 'static {
    fn record(&self, e: ProxyEvent);
}

pub(super) struct CachedLease {
    pub(super) key: Arc<LeasedKey>,
    pub(super) refresh_at_unix: i64,
    /// The source's generation when leased.
    pub(super) generation: u64,
}

impl Inner {
    /// The cached lease of `secret`, or a new one when it is due for renewal.
    /// A failed renewal keeps using a lease that has not yet expired.
    pub(super) async fn lease(&self, secret: &str) -> Result<Arc<LeasedKey>, String> {
        let Some(slot) = self.leases.get(secret) else {
            return Err(format!("secret {secret} is not configured"));
        };
        let mut cached = slot.lock().await;
        let now = self.clock.now_unix();
        let generation = self.source.generation();
        if let Some(c) = cached.as_ref()
            && now < c.refresh_at_unix
            && c.generation == generation
        {
            return Ok(c.key.clone());
        }
        let timeout = Duration::from_secs(self.cfg.lease_timeout_secs);
        let leased = match tokio::time::timeout(timeout, self.source.lease(secret)).await {
            Ok(r) => r,
            Err(_) => Err(LeaseError {
                message: format!("no answer within {}s", self.cfg.lease_timeout_secs),
                unreachable: true,
            }),
        };
        let leased = leased.and_then(|k| {
            if k.value.is_empty() {
                Err(LeaseError::from("the leased value is empty".to_owned()))
            } else if k.expires_at_unix <= now {
                Err(LeaseError::from("the lease had already expired".to_owned()))
            } else {
                Ok(k)
            }
        });
        match leased {
            Ok(k) => {
                metrics::counter!(metric::LEASES, "result" => "ok").increment(1);
                let margin = LEASE_REFRESH_MARGIN_SECS.min((k.expires_at_unix - now) / 2);
                tracing::info!(secret, fingerprint = %k.fingerprint, version = k.version, expires_at_unix = k.expires_at_unix, "leased upstream key");
                let key = Arc::new(k);
                *cached = Some(CachedLease {
                    refresh_at_unix: key.expires_at_unix - margin,
                    key: key.clone(),
                    generation,
                });
                Ok(key)
            }
            Err(e) => {
                metrics::counter!(metric::LEASES, "result" => "error").increment(1);
                match cached.as_ref() {
                    // Only when the cache cannot be reached: a refusal
                    // (revoked, denied) stops the key at once.
                    Some(c)
                        if e.unreachable
                            && now < c.key.expires_at_unix
                            && c.generation == generation =>
                    {
                        tracing::warn!(secret, error = %e.message, "lease renewal failed; using the current lease until it expires");
                        Ok(c.key.clone())
                    }
                    _ => {
                        *cached = None;
                        tracing::warn!(secret, error = %e.message, "lease refused");
                        Err(e.message)
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leased_key_debug_hides_the_value() {
        let k = LeasedKey {
            value: Zeroizing::new(b"sk-very-secret".to_vec()),
            fingerprint: "fp".into(),
            expires_at_unix: 1,
            version: 2,
        };
        let d = format!("{k:?}");
        assert!(!d.contains("sk-very-secret"));
        assert!(d.contains("fp"));
    }
}

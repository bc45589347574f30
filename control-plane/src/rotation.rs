//! Rotation of an upstream key (the API key itself, not a DEK or KEK) through
//! a `Rotator`: create new → pre-check → activate → post-check → revoke old.
//! A failed pre-check changes nothing; a failed post-check activates the old
//! version again and revokes the new one. The rotator is also asked to retire
//! whichever upstream key lost. Triggered by `lattice secret rotate` (with
//! progress) or by the schedule in the control plane's configuration.
//!
//! The webhook rotator POSTs JSON to a configured URL:
//! `{"secret", "step": "create" | "pre-check" | "post-check" | "retire",
//! "version", "fingerprint"}`. For `create` it answers `{"value": "…"}`
//! (the new key); for the others any 2xx is success. The value only ever
//! travels from the webhook to the control plane.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use lattice_shared::clock::unix_secs;
use lattice_shared::proto as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::secrets::Origin;
use crate::{Error, State};

/// Largest webhook answer read.
const MAX_WEBHOOK_RESPONSE: usize = 128 * 1024;

/// One secret's rotator, from the control plane's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    pub secret: String,
    /// `http://` URL of the rotation webhook (loopback only: the answer
    /// carries a key, so it must not cross a network in clear).
    pub webhook: String,
    /// Rotate when the active version is this old (0: only on command).
    #[serde(default)]
    pub every_secs: u64,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

impl RotationConfig {
    pub fn validate(&self) -> Result<(), String> {
        lattice_shared::id::check_secret_name(&self.secret)?;
        webhook_uri(&self.webhook)?;
        if self.every_secs != 0 && self.every_secs < 60 {
            return Err("every_secs must be 0 (on command only) or at least 60".into());
        }
        if self.timeout_secs == 0 || self.timeout_secs > 300 {
            return Err("timeout_secs must be within 1..=300".into());
        }
        Ok(())
    }
}

fn webhook_uri(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("webhook {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(
                "https webhooks are not supported yet; run the rotator on this host (http://127.0.0.1:PORT/…)"
                    .into(),
            );
        }
        _ => return Err(format!("webhook {url:?} must be an http:// URL")),
    }
    let host = uri.host().unwrap_or_default();
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "webhook host {host:?} is not loopback: a key may not cross a network in clear"
        ));
    }
    Ok(uri)
}

/// Creates, checks and retires upstream keys.
pub trait Rotator: Send + Sync + std::fmt::Debug + 'static {
    /// A new upstream key.
    fn create<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, String>>;
    /// `step` is "pre-check" or "post-check".
    fn check<'a>(
        &'a self,
        secret: &'a str,
        step: &'a str,
        version: u64,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
    /// The upstream key of `version` is no longer needed.
    fn retire<'a>(
        &'a self,
        secret: &'a str,
        version: u64,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<(), String>>;
}

#[derive(Serialize)]
struct WebhookCall<'a> {
    secret: &'a str,
    step: &'a str,
    version: u64,
    fingerprint: &'a str,
}

#[derive(Deserialize)]
struct Created {
    value: String,
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// The webhook rotator (see the module doc).
pub struct WebhookRotator {
    uri: http::Uri,
    timeout: Duration,
    client: HttpClient,
}

impl std::fmt::Debug for WebhookRotator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRotator")
            .field("uri", &self.uri)
            .finish_non_exhaustive()
    }
}

impl WebhookRotator {
    pub fn new(cfg: &RotationConfig) -> Result<Self, String> {
        Ok(Self {
            uri: webhook_uri(&cfg.webhook)?,
            timeout: Duration::from_secs(cfg.timeout_secs),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
        })
    }

    async fn call(&self, body: &WebhookCall<'_>) -> Result<Zeroizing<Vec<u8>>, String> {
        use http_body_util::BodyExt;
        let json = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let req = http::Request::post(self.uri.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(json)))
            .map_err(|e| e.to_string())?;
        let step = body.step;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("webhook {step}: {e}"))?;
            let status = resp.status();
            let bytes = http_body_util::Limited::new(resp.into_body(), MAX_WEBHOOK_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("webhook {step}: reading the answer: {e}"))?
                .to_bytes();
            let body = Zeroizing::new(bytes.to_vec());
            if !status.is_success() {
                // A failure answer is a message, not a key: show its start.
                let msg: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                return Err(format!("webhook {step} answered {status}: {msg}"));
            }
            Ok(body)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| format!("webhook {step}: no answer within {:?}", self.timeout))?
    }
}

impl Rotator for WebhookRotator {
    fn create<'a>(&'a self, secret: &'a str) -> BoxFuture<'a, Result<Zeroizing<Vec<u8>>, String>> {
        Box::pin(async move {
            let body = self
                .call(&WebhookCall {
                    secret,
                    step: "create",
                    version: 0,
                    fingerprint: "",
                })
                .await?;
            let created: Created = serde_json::from_slice(&body)
                .map_err(|_| "webhook create: the answer is not {\"value\": \"…\"}".to_string())?;
            Ok(Zeroizing::new(created.value.into_bytes()))
        })
    }

    fn check<'a>(
        &'a self,
        secret: &'a str,
        step: &'a str,
        version: u64,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.call(&WebhookCall {
                secret,
                step,
                version,
                fingerprint,
            })
            .await
            .map(|_| ())
        })
    }

    fn retire<'a>(
        &'a self,
        secret: &'a str,
        version: u64,
        fingerprint: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        self.check(secret, "retire", version, fingerprint)
    }
}

#[derive(Clone)]
struct Entry {
    rotator: Arc<dyn Rotator>,
    every_secs: u64,
}

/// The rotators by secret, and which rotations are running.
#[derive(Default)]
pub struct Rotators {
    by_secret: RwLock<HashMap<String, Entry>>,
    running: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Rotators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .by_secret
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Rotators").field("secrets", &names).finish()
    }
}

impl Rotators {
    pub fn from_config(cfgs: &[RotationConfig]) -> Result<Self, Error> {
        let r = Self::default();
        for c in cfgs {
            let w = WebhookRotator::new(c)
                .map_err(|e| Error::Config(format!("rotation for {}: {e}", c.secret)))?;
            r.set(&c.secret, Arc::new(w), c.every_secs);
        }
        Ok(r)
    }

    /// Installs (or replaces) the rotator of `secret`.
    pub fn set(&self, secret: &str, rotator: Arc<dyn Rotator>, every_secs: u64) {
        self.by_secret
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                secret.to_string(),
                Entry {
                    rotator,
                    every_secs,
                },
            );
    }

    fn get(&self, secret: &str) -> Option<Entry> {
        self.by_secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(secret)
            .cloned()
    }

    fn scheduled(&self) -> Vec<(String, u64)> {
        self.by_secret
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, e)| e.every_secs > 0)
            .map(|(n, e)| (n.clone(), e.every_secs))
            .collect()
    }
}

impl Rotators {
    /// Whether a rotation of `secret` is running (other changes wait).
    pub fn is_running(&self, secret: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(secret)
    }
}

/// Marks a secret's rotation as running for as long as it lives.
struct Running<'a>(&'a Rotators, String);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

/// Reports one step (a closed progress channel only stops the reports).
async fn report(tx: &Option<mpsc::Sender<pb::RotationProgress>>, step: &str, detail: String) {
    tracing::info!(step, detail = %detail, "secret rotation");
    if let Some(tx) = tx {
        let _ = tx
            .send(pb::RotationProgress {
                step: step.into(),
                detail,
                ..Default::default()
            })
            .await;
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| Error::Corrupt("worker failed".into()))?
}

/// Rotates `secret`; returns the new active version. Steps go to `progress`.
pub(crate) async fn rotate(
    state: &Arc<State>,
    secret: &str,
    by: &str,
    approved_by: &str,
    progress: Option<mpsc::Sender<pb::RotationProgress>>,
) -> Result<u64, Error> {
    let entry = state.rotators.get(secret).ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "no rotator is configured for secret {secret} (add a [[rotation]] entry to the control plane's configuration)"
        ))
    })?;
    if !state
        .rotators
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(secret.to_string())
    {
        return Err(Error::FailedPrecondition(format!(
            "a rotation of secret {secret} is already running"
        )));
    }
    let _running = Running(&state.rotators, secret.to_string());
    let rec = {
        let (st, name) = (state.clone(), secret.to_string());
        blocking(move || st.secret_record(&name)).await?
    };
    let old = rec.active;
    let old_fp = rec
        .versions
        .get(&old)
        .map(|v| v.fingerprint.clone())
        .unwrap_or_default();
    let predicted = rec.versions.keys().next_back().map_or(1, |v| v + 1);
    metrics::counter!("lattice_cp_secret_rotations_started_total").increment(1);
    let fail = |m: String| {
        metrics::counter!("lattice_cp_secret_rotations_failed_total").increment(1);
        Error::FailedPrecondition(m)
    };

    report(
        &progress,
        "create",
        "asking the rotator for a new upstream key".into(),
    )
    .await;
    let value = entry.rotator.create(secret).await.map_err(|e| {
        fail(format!(
            "rotation of {secret}: create failed: {e}; nothing changed"
        ))
    })?;
    let staged = {
        let (st, name) = (state.clone(), secret.to_string());
        blocking(move || st.secrets.stage(&name, &value)).await?
    };
    let new_fp = staged.fingerprint.clone();
    report(
        &progress,
        "create",
        format!("new key staged, fingerprint {new_fp}"),
    )
    .await;

    report(
        &progress,
        "pre-check",
        "the rotator checks the new key".into(),
    )
    .await;
    if let Err(e) = entry
        .rotator
        .check(secret, "pre-check", predicted, &new_fp)
        .await
    {
        report(
            &progress,
            "rollback",
            format!("pre-check failed: {e}; the new key is discarded"),
        )
        .await;
        if let Err(r) = entry.rotator.retire(secret, predicted, &new_fp).await {
            tracing::warn!(secret, error = %r, "retiring the discarded upstream key failed");
        }
        return Err(fail(format!(
            "rotation of {secret}: pre-check failed: {e}; nothing changed"
        )));
    }

    let new = {
        let (st, name, by, ap) = (
            state.clone(),
            secret.to_string(),
            by.to_string(),
            approved_by.to_string(),
        );
        let regions = rec.regions.clone();
        blocking(move || {
            st.commit_secret(
                &name,
                &regions,
                staged,
                Origin {
                    by: &by,
                    approved_by: &ap,
                    kind: "rotation",
                },
            )
            .map(|(_, v)| v)
        })
        .await?
    };
    report(
        &progress,
        "activate",
        format!("version {new} is active; caches receive it now"),
    )
    .await;

    report(
        &progress,
        "post-check",
        "the rotator checks the key in service".into(),
    )
    .await;
    if let Err(e) = entry
        .rotator
        .check(secret, "post-check", new, &new_fp)
        .await
    {
        let (st, name) = (state.clone(), secret.to_string());
        if let Err(why) = blocking(move || st.restore_after_failed_rotation(&name, old, new)).await
        {
            report(
                &progress,
                "rollback",
                format!("post-check failed: {e}; {why}"),
            )
            .await;
            return Err(fail(format!(
                "rotation of {secret}: post-check failed: {e}; {why}"
            )));
        }
        report(
            &progress,
            "rollback",
            format!(
                "post-check failed: {e}; version {old} is active again and version {new} is revoked"
            ),
        )
        .await;
        if let Err(r) = entry.rotator.retire(secret, new, &new_fp).await {
            tracing::warn!(secret, error = %r, "retiring the failed upstream key failed");
        }
        return Err(fail(format!(
            "rotation of {secret}: post-check failed: {e}; rolled back to version {old}"
        )));
    }

    if old != 0 {
        report(&progress, "retire", format!("revoking version {old}")).await;
        let (st, name) = (state.clone(), secret.to_string());
        let revoked = blocking(move || st.revoke_replaced(&name, old, new)).await?;
        if revoked.is_none() {
            report(
                &progress,
                "retire",
                format!("secret {secret} changed meanwhile; version {old} is left as it is"),
            )
            .await;
        } else if let Err(e) = entry.rotator.retire(secret, old, &old_fp).await {
            report(
                &progress,
                "retire",
                format!("version {old} is revoked here, but the rotator could not retire its upstream key: {e}"),
            )
            .await;
        }
    }
    metrics::counter!("lattice_cp_secret_rotations_total").increment(1);
    if let Some(tx) = &progress {
        let _ = tx
            .send(pb::RotationProgress {
                step: "done".into(),
                detail: format!("secret {secret} rotated to version {new}"),
                done: true,
                ok: true,
                new_version: new,
            })
            .await;
    }
    Ok(new)
}

/// Runs the rotations whose schedule is due (active version older than
/// `every_secs`, by the control plane's clock).
pub(crate) async fn run_due(state: &Arc<State>) {
    let now = unix_secs(state.clock.now());
    for (secret, every) in state.rotators.scheduled() {
        let rec = {
            let (st, name) = (state.clone(), secret.clone());
            blocking(move || st.secret_record(&name)).await
        };
        let Ok(rec) = rec else {
            continue;
        };
        let since = rec
            .versions
            .get(&rec.active)
            .map(|v| v.created_at_unix)
            .unwrap_or(0)
            .max(rec.last_rotated_unix);
        if now - since < i64::try_from(every).unwrap_or(i64::MAX) {
            continue;
        }
        tracing::info!(secret = %secret, "scheduled rotation is due");
        let by = state.id.to_string();
        if let Err(e) = rotate(state, &secret, &by, "", None).await {
            tracing::error!(secret = %secret, error = %e, "scheduled rotation failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhooks_must_be_loopback_http() {
        assert!(webhook_uri("http://127.0.0.1:9000/rotate").is_ok());
        assert!(webhook_uri("http://localhost:9000/").is_ok());
        assert!(webhook_uri("http://[::1]:9000/").is_ok());
        assert!(webhook_uri("http://10.0.0.5/rotate").is_err());
        assert!(webhook_uri("https://rotator.example/").is_err());
        assert!(webhook_uri("ftp://127.0.0.1/").is_err());
        let mut c = RotationConfig {
            secret: "openai".into(),
            webhook: "http://127.0.0.1:1/".into(),
            every_secs: 30,
            timeout_secs: 10,
        };
        assert!(c.validate().is_err(), "too frequent");
        c.every_secs = 0;
        assert!(c.validate().is_ok());
        c.secret = "Bad Name".into();
        assert!(c.validate().is_err());
    }
}

//! Detection rules over the audit stream: every record a cache forwards is
//! looked at once, after it is durable in the log. A rule that fires raises
//! an alert: a leaf of the audit log itself (`kind` `alert`), a metric
//! (`lattice_alerts_total{rule}`), an event on `Admin.WatchAlerts`
//! (`lattice alerts watch`) and, when configured for the rule, an action
//! (revoking the agent).
//!
//! The rules run on the records' own times (the caches' clocks), so that a
//! replay of the same records raises the same alerts; state is per identity,
//! bounded, in memory (after a restart the baselines are learnt again).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The rules, by name.
pub const RATE_SPIKE: &str = "rate_spike";
pub const NEW_SOURCE: &str = "new_source";
pub const NEW_REGION: &str = "new_region";
pub const USE_AFTER_REVOCATION: &str = "use_after_revocation";
pub const DENIAL_BURST: &str = "denial_burst";
pub const HONEYTOKEN: &str = "honeytoken";
/// A cache's audit outbox passed 80 % of its capacity (its records could
/// not reach the control plane for a while; when full it drops records).
pub const AUDIT_BACKLOG: &str = "audit_backlog";
/// A cache sent records about agents or secrets beyond its authority
/// (another region's agent, a secret it does not hold): refused, not
/// appended; the alert names the cache.
pub const OUTSIDE_AUTHORITY: &str = "outside_authority";
pub const RULES: [&str; 8] = [
    RATE_SPIKE,
    NEW_SOURCE,
    NEW_REGION,
    USE_AFTER_REVOCATION,
    DENIAL_BURST,
    HONEYTOKEN,
    AUDIT_BACKLOG,
    OUTSIDE_AUTHORITY,
];

/// What an alert may set off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Record and notify only.
    None,
    /// Revoke the agent the alert is about, at once.
    RevokeAgent,
    /// Rotate the secret the alert's record names (a lease), through the
    /// secret's configured rotator (`[[rotation]]`); alerts that name no
    /// secret only record and notify.
    RotateSecret,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::None => "none",
            Action::RevokeAgent => "revoke-agent",
            Action::RotateSecret => "rotate-secret",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// A minute's credentials (issued, leased, delegated) above this many
    /// times the identity's own baseline is a spike...
    pub rate_spike_factor: f64,
    /// ...provided it is also at least this many.
    pub rate_spike_min_per_minute: u32,
    /// Minutes of history before an identity has a baseline.
    pub rate_baseline_minutes: u32,
    /// Refusals of one identity within a minute that make a burst.
    pub denial_burst: u32,
    /// Secrets that nobody legitimate ever leases: any lease is an alert.
    pub honeytokens: Vec<String>,
    /// Rule name → action (default: none for every rule).
    pub actions: BTreeMap<String, Action>,
    /// Identities tracked at most (the least recently seen go first).
    pub max_identities: u64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        Self {
            rate_spike_factor: 5.0,
            rate_spike_min_per_minute: 60,
            rate_baseline_minutes: 3,
            denial_burst: 10,
            honeytokens: Vec::new(),
            actions: BTreeMap::new(),
            max_identities: 100_000,
        }
    }
}

impl DetectConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate_spike_factor >= 1.0 && self.rate_spike_factor <= 1000.0) {
            return Err("detect.rate_spike_factor must be within 1..=1000".into());
        }
        if self.denial_burst == 0 || self.rate_spike_min_per_minute == 0 {
            return Err(
                "detect.denial_burst and detect.rate_spike_min_per_minute must be positive".into(),
            );
        }
        for rule in self.actions.keys() {
            if !RULES.contains(&rule.as_str()) {
                return Err(format!(
                    "detect.actions: unknown rule {rule:?} (one of {})",
                    RULES.join(", ")
                ));
            }
        }
        for h in &self.honeytokens {
            lattice_shared::id::check_secret_name(h)
                .map_err(|e| format!("detect.honeytokens: {e}"))?;
        }
        Ok(())
    }

    pub fn action(&self, rule: &str) -> Action {
        self.actions.get(rule).copied().unwrap_or(Action::None)
    }
}

/// One alert: which rule, about whom, why, and what the record said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: String,
    /// The agent the alert is about.
    pub subject: String,
    pub detail: String,
    /// Time of the record that raised it (the cache's clock).
    pub at_unix_ms: i64,
    /// The cache that sent the record.
    pub cache: String,
    /// The secret the record names ("" if none).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub secret: String,
    pub action: Action,
}

#[derive(Debug, Default)]
struct Identity {
    sources: HashSet<String>,
    regions: HashSet<String>,
    /// Minute of the current count, and the count.
    minute: i64,
    count: u32,
    /// Exponentially weighted minutes seen so far.
    baseline: f64,
    minutes: u32,
    spiked_minute: i64,
    denials: VecDeque<i64>,
    burst_until: i64,
    revoked_use_until: i64,
    /// Of a cache: until when further refused records raise no alert.
    outside_until: i64,
}

/// Window of the denial-burst and use-after-revocation rules.
const WINDOW_MS: i64 = 60_000;
/// Weight of the newest minute in the baseline.
const ALPHA: f64 = 0.3;

#[derive(Debug)]
pub struct Detector {
    cfg: DetectConfig,
    identities: moka::sync::Cache<String, Arc<Mutex<Identity>>>,
    honeytokens: HashSet<String>,
}

/// What the rules read of a cache's record, borrowed from its JSON (the
/// rest of the record is checked to be JSON and otherwise skipped).
#[derive(Debug, Default, Deserialize)]
pub struct Record<'a> {
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub agent: Cow<'a, str>,
    #[serde(default)]
    pub at_unix_ms: i64,
    #[serde(borrow, default)]
    pub source: Cow<'a, str>,
    #[serde(borrow, default)]
    pub region: Cow<'a, str>,
    #[serde(borrow, default)]
    pub secret: Cow<'a, str>,
    #[serde(borrow, default)]
    pub fingerprint: Cow<'a, str>,
    #[serde(borrow, default)]
    pub reason: Cow<'a, str>,
    /// Of an `outbox_pressure` record: records held, and the capacity.
    #[serde(default)]
    pub held: u64,
    #[serde(default)]
    pub max: u64,
    /// The cache that sent it: its certificate's id, set by the control
    /// plane, never read from the record.
    #[serde(skip)]
    pub cache: Cow<'a, str>,
    /// Its number at the sending cache, set by the control plane.
    #[serde(skip)]
    pub seq: u64,
    /// Fields only the control plane writes: a record that carries them is
    /// refused.
    /// Present whatever the value, `null` included.
    #[serde(default, rename = "cache", deserialize_with = "present")]
    pub claimed_cache: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "cache_seq", deserialize_with = "present")]
    pub claimed_cache_seq: Option<serde::de::IgnoredAny>,
}

/// `Some` for a field that is there at all (`Option`'s own reading turns
/// `null` into `None`, which would let a record carry `"cache":null`).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<serde::de::IgnoredAny>, D::Error> {
    <serde::de::IgnoredAny as serde::Deserialize>::deserialize(d).map(Some)
}

impl Detector {
    pub fn new(cfg: DetectConfig) -> Self {
        Self {
            identities: moka::sync::Cache::builder()
                .max_capacity(cfg.max_identities)
                .build(),
            honeytokens: cfg.honeytokens.iter().cloned().collect(),
            cfg,
        }
    }

    /// The alert for `n` records `cache` sent beyond its authority (the
    /// first at `seq`, refused because `why`); at most one a minute per
    /// cache (`None` meanwhile: the metric and the log still count them).
    pub fn outside_authority(
        &self,
        cache: &lattice_shared::id::SpiffeId,
        n: usize,
        seq: u64,
        why: &str,
        now_ms: i64,
    ) -> Option<Alert> {
        let slot = self
            .identities
            .get_with(cache.to_string(), Default::default);
        let mut id = slot.lock().unwrap_or_else(|p| p.into_inner());
        if now_ms < id.outside_until {
            return None;
        }
        id.outside_until = now_ms + WINDOW_MS;
        Some(Alert {
            rule: OUTSIDE_AUTHORITY.to_owned(),
            subject: cache.to_string(),
            detail: format!(
                "{n} records refused as beyond the cache's authority; record {seq}: {why}"
            ),
            at_unix_ms: now_ms,
            cache: cache.to_string(),
            secret: String::new(),
            action: self.cfg.action(OUTSIDE_AUTHORITY),
        })
    }

    /// Looks at one record from a cache; returns the alerts it raises.
    pub fn observe(&self, r: &Record<'_>) -> Vec<Alert> {
        let kind = &*r.kind;
        let agent = &*r.agent;
        if kind == "outbox_pressure" {
            // About the cache, not an agent.
            return vec![Alert {
                rule: AUDIT_BACKLOG.to_owned(),
                subject: r.cache.clone().into_owned(),
                detail: format!(
                    "audit outbox held {} of {} records: its records did not reach the control plane for a while; at capacity it drops new ones",
                    r.held, r.max
                ),
                at_unix_ms: r.at_unix_ms,
                cache: r.cache.clone().into_owned(),
                secret: String::new(),
                action: self.cfg.action(AUDIT_BACKLOG),
            }];
        }
        if agent.is_empty() {
            return Vec::new();
        }
        let at = r.at_unix_ms;
        let cache = &*r.cache;
        let mut out = Vec::new();
        let mut alert = |rule: &str, detail: String| {
            out.push(Alert {
                rule: rule.to_owned(),
                subject: agent.to_owned(),
                detail,
                at_unix_ms: at,
                cache: cache.to_owned(),
                secret: r.secret.clone().into_owned(),
                action: self.cfg.action(rule),
            })
        };
        let slot = match self.identities.get(agent) {
            Some(s) => s,
            None => self.identities.get_with(agent.to_owned(), Default::default),
        };
        let mut id = slot.lock().unwrap_or_else(|p| p.into_inner());
        let credential = matches!(kind, "issued" | "leased" | "delegated");

        if kind == "leased" && self.honeytokens.contains(&*r.secret) {
            alert(
                HONEYTOKEN,
                format!(
                    "leased honeytoken secret {} (fingerprint {})",
                    r.secret, r.fingerprint
                ),
            );
        }

        if credential {
            // Where from: learnt on first sight, alerted when new after.
            let first = id.sources.is_empty() && id.regions.is_empty();
            // (Looked up before inserting: no allocation for a known one.)
            let source = &*r.source;
            if !source.is_empty() && !id.sources.contains(source) {
                id.sources.insert(source.to_owned());
                if !first {
                    alert(
                        NEW_SOURCE,
                        format!("first request from source address {source}"),
                    );
                }
            }
            let region = &*r.region;
            if !region.is_empty() && !id.regions.contains(region) {
                id.regions.insert(region.to_owned());
                if !first {
                    alert(NEW_REGION, format!("first request in region {region}"));
                }
            }

            // Rate against the identity's own baseline, per minute.
            let minute = at.div_euclid(60_000);
            if minute != id.minute {
                if id.count > 0 || id.minutes > 0 {
                    let c = f64::from(id.count);
                    id.baseline = if id.minutes == 0 {
                        c
                    } else {
                        ALPHA * c + (1.0 - ALPHA) * id.baseline
                    };
                    id.minutes += 1;
                }
                id.minute = minute;
                id.count = 0;
            }
            id.count += 1;
            let limit = (self.cfg.rate_spike_factor * id.baseline.max(1.0))
                .max(f64::from(self.cfg.rate_spike_min_per_minute));
            if id.minutes >= self.cfg.rate_baseline_minutes
                && f64::from(id.count) > limit
                && id.spiked_minute != minute
            {
                id.spiked_minute = minute;
                alert(
                    RATE_SPIKE,
                    format!(
                        "{} credentials this minute against a baseline of {:.1} per minute",
                        id.count, id.baseline
                    ),
                );
            }
        }

        if kind == "refused" || kind == "proxy_refused" {
            let reason = &*r.reason;
            if kind == "refused" && reason.contains("revoked") && at >= id.revoked_use_until {
                id.revoked_use_until = at + WINDOW_MS;
                alert(USE_AFTER_REVOCATION, format!("refused: {reason}"));
            }
            id.denials.push_back(at);
            while id.denials.front().is_some_and(|t| *t <= at - WINDOW_MS) {
                id.denials.pop_front();
            }
            if id.denials.len() >= self.cfg.denial_burst as usize && at >= id.burst_until {
                id.burst_until = at + WINDOW_MS;
                alert(
                    DENIAL_BURST,
                    format!("{} refusals within a minute", id.denials.len()),
                );
            }
            let cap = self.cfg.denial_burst as usize * 2;
            while id.denials.len() > cap {
                id.denials.pop_front();
            }
        }
        out
    }
}

/// Records each alert in the audit log (durably), counts it, tells the
/// watchers, and carries out its action.
pub(crate) async fn raise(
    state: &Arc<crate::State>,
    alerts: Vec<Alert>,
) -> Result<(), crate::Error> {
    let leaves: Vec<Vec<u8>> = alerts
        .iter()
        .map(|a| {
            let mut v = serde_json::to_value(a).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("kind".into(), "alert".into());
                o.insert("raised_at_unix_ms".into(), state.clock.now_unix_ms().into());
            }
            v.to_string().into_bytes()
        })
        .collect();
    state.commit_audit(leaves, Vec::new()).await?;
    for a in alerts {
        metrics::counter!("lattice_alerts_total", "rule" => a.rule.clone()).increment(1);
        tracing::warn!(rule = %a.rule, subject = %a.subject, detail = %a.detail, cache = %a.cache, action = ?a.action, "alert");
        // Actions stay within the reporting cache's authority: its own
        // region's agents, the secrets it holds.
        let reporter = lattice_shared::id::SpiffeId::parse(&a.cache).ok();
        if a.action == Action::RotateSecret && !a.secret.is_empty() {
            let (st, cache, secret) = (state.clone(), a.cache.clone(), a.secret.clone());
            let holds = tokio::task::spawn_blocking(move || st.cache_holds_secret(&cache, &secret))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(false);
            if !holds {
                tracing::error!(rule = %a.rule, secret = %a.secret, cache = %a.cache, "alert action rotate-secret refused: the reporting cache does not hold the secret");
                let _ = state.alerts.send(a);
                continue;
            }
        }
        if a.action == Action::RotateSecret {
            if a.secret.is_empty() {
                tracing::warn!(rule = %a.rule, subject = %a.subject, "alert action rotate-secret: the record names no secret; nothing rotated");
            } else {
                // In its own task: a rotation calls the upstream and takes
                // seconds; the audit stream does not wait for it. The
                // rotation records its own steps in the audit log.
                let (st, secret, rule) = (state.clone(), a.secret.clone(), a.rule.clone());
                tokio::spawn(async move {
                    let by = format!("{}#alert:{rule}", st.id);
                    match crate::rotation::rotate(&st, &secret, &by, "", None).await {
                        Ok(v) => {
                            tracing::warn!(rule = %rule, secret = %secret, version = v, "alert action: secret rotated")
                        }
                        Err(e) => {
                            tracing::error!(rule = %rule, secret = %secret, error = %e, "alert action: rotation failed")
                        }
                    }
                });
            }
        }
        if a.action == Action::RevokeAgent {
            match lattice_shared::id::SpiffeId::parse(&a.subject) {
                Ok(id)
                    if id.role() == lattice_shared::id::Role::Agent
                        && reporter.as_ref().is_some_and(|c| {
                            c.trust_domain() == id.trust_domain() && c.region() == id.region()
                        }) =>
                {
                    let st = state.clone();
                    let reason = format!("alert {}: {}", a.rule, a.detail);
                    let r = tokio::task::spawn_blocking(move || {
                        st.revoke(&lattice_shared::revocation::Revocation {
                            target: lattice_shared::revocation::Target::Agent(id),
                            reason,
                        })
                    })
                    .await;
                    match r {
                        Ok(Ok(ev)) => {
                            tracing::warn!(rule = %a.rule, subject = %a.subject, seq = ev.seq, "alert action: agent revoked")
                        }
                        Ok(Err(e)) => {
                            tracing::error!(rule = %a.rule, subject = %a.subject, error = %e, "alert action failed")
                        }
                        Err(_) => tracing::error!("alert action worker failed"),
                    }
                }
                _ => {
                    tracing::error!(subject = %a.subject, cache = %a.cache, "alert action revoke-agent refused: not an agent of the reporting cache's region")
                }
            }
        }
        let _ = state.alerts.send(a);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "spiffe://t/agent/eu/a";

    fn rec(kind: &str, at: i64, extra: serde_json::Value) -> serde_json::Value {
        let mut v = serde_json::json!({
            "kind": kind, "agent": A, "at_unix_ms": at, "region": "eu",
            "source": "10.0.0.1", "cache": "spiffe://t/cache/eu/c",
        });
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            for (k, x) in e {
                o.insert(k.clone(), x.clone());
            }
        }
        v
    }

    fn observe(d: &Detector, v: &serde_json::Value) -> Vec<Alert> {
        let bytes = serde_json::to_vec(v).expect("json");
        let mut r: Record = serde_json::from_slice(&bytes).expect("record");
        r.cache = v["cache"].as_str().unwrap_or_default().to_owned().into();
        d.observe(&r)
    }

    fn rules(alerts: &[Alert]) -> Vec<&str> {
        alerts.iter().map(|a| a.rule.as_str()).collect()
    }

    /// Ten minutes of 20 mints a minute from one address.
    fn ordinary(d: &Detector, start_min: i64) -> Vec<Alert> {
        let mut out = Vec::new();
        for m in 0..10 {
            for i in 0..20 {
                let at = (start_min + m) * 60_000 + i * 1000;
                out.extend(observe(d, &rec("issued", at, serde_json::json!({}))));
            }
        }
        out
    }

    #[test]
    fn ordinary_traffic_raises_nothing() {
        let d = Detector::new(DetectConfig::default());
        assert!(ordinary(&d, 0).is_empty());
        // A few refusals, spread out, are not a burst.
        for i in 0..5 {
            let a = observe(
                &d,
                &rec(
                    "refused",
                    600_000 + i * 30_000,
                    serde_json::json!({"reason": "policy: no"}),
                ),
            );
            assert!(a.is_empty(), "{a:?}");
        }
    }

    #[test]
    fn a_rate_spike_against_the_identitys_own_baseline() {
        let d = Detector::new(DetectConfig::default());
        assert!(ordinary(&d, 0).is_empty());
        let mut alerts = Vec::new();
        for i in 0..200 {
            alerts.extend(observe(
                &d,
                &rec("issued", 10 * 60_000 + i * 100, serde_json::json!({})),
            ));
        }
        assert_eq!(rules(&alerts), vec![RATE_SPIKE], "once per minute");
        assert_eq!(alerts[0].subject, A);
    }

    #[test]
    fn a_new_source_address_or_region_after_learning() {
        let d = Detector::new(DetectConfig::default());
        assert!(ordinary(&d, 0).is_empty());
        let a = observe(
            &d,
            &rec(
                "issued",
                700_000,
                serde_json::json!({"source": "203.0.113.9"}),
            ),
        );
        assert_eq!(rules(&a), vec![NEW_SOURCE]);
        assert!(a[0].detail.contains("203.0.113.9"));
        let again = observe(
            &d,
            &rec(
                "issued",
                701_000,
                serde_json::json!({"source": "203.0.113.9"}),
            ),
        );
        assert!(again.is_empty(), "only the first time");
        let a = observe(
            &d,
            &rec("leased", 702_000, serde_json::json!({"region": "us"})),
        );
        assert_eq!(rules(&a), vec![NEW_REGION]);
    }

    #[test]
    fn use_after_revocation_and_denial_bursts() {
        let d = Detector::new(DetectConfig::default());
        let a = observe(
            &d,
            &rec(
                "refused",
                1000,
                serde_json::json!({"reason": "spiffe://t/agent/eu/a has been revoked"}),
            ),
        );
        assert_eq!(rules(&a), vec![USE_AFTER_REVOCATION]);
        let mut burst = Vec::new();
        for i in 1..12 {
            burst.extend(observe(
                &d,
                &rec(
                    "refused",
                    1000 + i * 1000,
                    serde_json::json!({"reason": "policy: forbidden by x"}),
                ),
            ));
        }
        assert_eq!(
            rules(&burst),
            vec![DENIAL_BURST],
            "one burst alert a minute"
        );
    }

    #[test]
    fn any_lease_of_a_honeytoken_with_its_configured_action() {
        let d = Detector::new(DetectConfig {
            honeytokens: vec!["canary".into()],
            actions: [(HONEYTOKEN.to_string(), Action::RevokeAgent)].into(),
            ..DetectConfig::default()
        });
        let quiet = observe(
            &d,
            &rec("leased", 1, serde_json::json!({"secret": "openai"})),
        );
        assert!(quiet.is_empty());
        let a = observe(
            &d,
            &rec("leased", 2, serde_json::json!({"secret": "canary"})),
        );
        assert_eq!(rules(&a), vec![HONEYTOKEN]);
        assert_eq!(a[0].action, Action::RevokeAgent);
        assert_eq!(a[0].secret, "canary", "the alert names the secret");
        let cfg: DetectConfig =
            serde_json::from_str(r#"{"actions": {"honeytoken": "rotate-secret"}}"#)
                .expect("config");
        assert_eq!(cfg.action(HONEYTOKEN), Action::RotateSecret);
        assert_eq!(cfg.action(RATE_SPIKE), Action::None);
    }

    #[test]
    fn a_cache_near_its_outbox_capacity_is_an_alert_about_the_cache() {
        let d = Detector::new(DetectConfig::default());
        let a = observe(
            &d,
            &serde_json::json!({"kind": "outbox_pressure", "held": 800_000, "max": 1_000_000,
                "at_unix_ms": 5, "cache": "spiffe://t/cache/eu/c"}),
        );
        assert_eq!(rules(&a), vec![AUDIT_BACKLOG]);
        assert_eq!(a[0].subject, "spiffe://t/cache/eu/c");
        assert!(a[0].detail.contains("800000 of 1000000"), "{}", a[0].detail);
    }

    #[test]
    fn configuration_is_checked() {
        assert!(DetectConfig::default().validate().is_ok());
        let bad = DetectConfig {
            actions: [("nope".to_string(), Action::None)].into(),
            ..DetectConfig::default()
        };
        assert!(
            bad.validate()
                .expect_err("unknown rule")
                .contains("unknown rule")
        );
    }
}

//! The agent's configuration (TOML file, then `LATTICE_AGENT_*` variables),
//! typed at load: the id is a [`SpiffeId`]; [`Config::validate`] checks what
//! types cannot (the id's role, bounds) before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use lattice_shared::id::{Role, SpiffeId};
use lattice_shared::proto as pb;
use serde::{Deserialize, Serialize};

use crate::{proxy, workload};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `spiffe://TD/agent/REGION/NAME` (parsed at load; the role is checked
    /// by [`Config::validate`]).
    pub id: SpiffeId,
    /// The cache of this agent's region.
    pub cache: SocketAddr,
    pub data_dir: PathBuf,
    /// PEM file with the root CA certificate.
    pub root_ca: PathBuf,
    /// One-time join token for the first start (LATTICE_AGENT_JOIN_TOKEN).
    pub join_token: Option<lattice_shared::secret::Secret>,
    /// Device posture this agent reports with each request, for policy
    /// (reported, not attested: a policy should weigh it accordingly).
    pub posture: lattice_shared::posture::Posture,
    /// The kind of work this agent does (reported), e.g. "inference".
    pub job_type: String,
    pub log_json: bool,
    /// Further caches of the agent's region, tried in this order after
    /// `cache` when it is unreachable or cannot serve (stale).
    pub caches: Vec<SocketAddr>,
    /// Renewal timing of `lattice-agent run`.
    pub renewal: RenewalConfig,
    /// The Workload API socket for local processes.
    pub workload: workload::WorkloadConfig,
    /// The credential-injecting proxy (off unless configured).
    pub proxy: Option<proxy::ProxyConfig>,
    /// Prometheus `/metrics` of `lattice-agent run` (off when unset).
    pub metrics_listen: Option<SocketAddr>,
    /// Keep held tokens across restarts in `DATA_DIR/tokens.sealed`,
    /// sealed with a key derived from the agent's private key. Off:
    /// tokens live in memory only.
    pub token_cache: bool,
}

/// When `run` renews certificates and tokens, and how it backs off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenewalConfig {
    /// How often the runtime checks what is due (ms).
    pub check_interval_ms: u64,
    /// Renewal happens at half-life minus a random share of the lifetime
    /// up to this fraction, so that a fleet does not renew in step.
    pub jitter: f64,
    /// Failed renewals are retried after 1 s, doubling up to this (ms).
    pub max_backoff_ms: u64,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            check_interval_ms: 1000,
            jitter: 0.1,
            max_backoff_ms: 60_000,
        }
    }
}

/// Most caches an agent may list.
pub const MAX_CACHES: usize = 8;

impl Default for Config {
    fn default() -> Self {
        Self {
            // A constant that parses: `lattice dev`'s first agent.
            id: SpiffeId::parse("spiffe://lattice.local/agent/eu/agent-1")
                .expect("a valid SPIFFE id"),
            cache: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: PathBuf::from("./data/agent"),
            root_ca: PathBuf::from("./data/cp/root.crt"),
            join_token: None,
            posture: lattice_shared::posture::Posture::default(),
            job_type: String::new(),
            log_json: false,
            caches: Vec::new(),
            renewal: RenewalConfig::default(),
            workload: workload::WorkloadConfig::default(),
            proxy: None,
            metrics_listen: None,
            token_cache: false,
        }
    }
}

impl Config {
    /// Checks what parsing cannot: the id's role and every bound.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.role() != Role::Agent {
            return Err(format!(
                "id: {} is not an agent id (spiffe://TD/agent/REGION/NAME)",
                self.id
            ));
        }
        if self.job_type.len() > lattice_shared::posture::MAX_JOB_TYPE {
            return Err(format!(
                "job_type must be at most {} bytes",
                lattice_shared::posture::MAX_JOB_TYPE
            ));
        }
        if self.caches.len() + 1 > MAX_CACHES {
            return Err(format!("at most {MAX_CACHES} caches (cache and caches)"));
        }
        let r = &self.renewal;
        if !(0.0..=0.4).contains(&r.jitter) {
            return Err("renewal.jitter must be within 0.0..=0.4".into());
        }
        if r.check_interval_ms == 0 || r.check_interval_ms > 60_000 {
            return Err("renewal.check_interval_ms must be within 1..=60000".into());
        }
        if r.max_backoff_ms < 1000 || r.max_backoff_ms > 3_600_000 {
            return Err("renewal.max_backoff_ms must be within 1000..=3600000".into());
        }
        self.workload
            .validate()
            .map_err(|e| format!("workload: {e}"))?;
        if let Some(p) = &self.proxy {
            p.validate().map_err(|e| format!("proxy: {e}"))?;
        }
        Ok(())
    }

    /// Every cache, in the order they are tried.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.cache];
        for c in &self.caches {
            if !v.contains(c) {
                v.push(*c);
            }
        }
        v
    }

    /// What the agent reports about itself with each request.
    pub fn claims(&self) -> pb::AgentClaims {
        pb::AgentClaims {
            posture: Some(self.posture.to_proto()),
            job_type: self.job_type.clone(),
        }
    }
}

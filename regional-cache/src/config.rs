//! The cache's configuration (TOML, `LATTICE_CACHE_*` environment
//! overrides): typed where a shared type parses with validation (the id is
//! a `SpiffeId`), and range-checked once by [`Config::validate`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lattice_shared::id::{HostName, RegionId, Role, SpiffeId};
use serde::{Deserialize, Serialize};

use crate::outbox;

/// No secret lease outlives 15 minutes.
pub const MAX_LEASE_TTL_SECS: u64 = 900;

/// Cache configuration (TOML, `LATTICE_CACHE_*` environment overrides).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `spiffe://TD/cache/REGION/NAME`.
    pub id: SpiffeId,
    pub listen: SocketAddr,
    /// DNS names and IP addresses the cache is reached by, asked for in its
    /// TLS certificate (DNS and IP SANs beside its SPIFFE id) so that
    /// standard clients (curl, PyJWT, grpcio) verify it trusting only
    /// `root.crt`; the first one names the `jwks_uri` of its discovery
    /// document. Default: the listen IP and `localhost`. A change takes
    /// effect at the next renewal.
    pub advertise: Vec<HostName>,
    pub data_dir: PathBuf,
    pub control_plane: SocketAddr,
    /// PEM file with the root CA certificate (`root.crt` of the control plane).
    pub root_ca: PathBuf,
    /// One-time join token, needed only for the first start. Prefer the
    /// environment (LATTICE_CACHE_JOIN_TOKEN) to a file.
    pub join_token: Option<lattice_shared::secret::Secret>,
    pub agent_cert_ttl_secs: u64,
    pub token_default_ttl_secs: u64,
    pub token_max_ttl_secs: u64,
    /// Secret leases: default and longest (at most 900 s).
    pub lease_default_ttl_secs: u64,
    pub lease_max_ttl_secs: u64,
    pub jwks_refresh_secs: u64,
    pub renew_check_secs: u64,
    /// L: the cache refuses to mint once it cannot prove it holds every
    /// revocation older than this. Pings go out every L/5.
    pub max_staleness_ms: u64,
    /// Audit records held on disk while the control plane is unreachable;
    /// past 80 % an `audit_backlog` alert follows, when full new records
    /// are dropped (counted).
    pub audit_outbox_max_records: u64,
    /// When a mint, exchange or lease is answered: once its audit record is
    /// durable (`durable`, the default), or at once with the record durable
    /// within the next group commit (`commit_delay`, 5 ms: a crash in that
    /// window loses the record of a credential handed out).
    pub audit_mode: AuditMode,
    pub metrics_listen: Option<SocketAddr>,
    pub log_json: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // A constant that parses (the tests of this module build it).
            id: SpiffeId::parse("spiffe://lattice.local/cache/eu/cache-1")
                .expect("a valid cache id"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            advertise: Vec::new(),
            data_dir: PathBuf::from("./data/cache"),
            control_plane: SocketAddr::from(([127, 0, 0, 1], 7443)),
            root_ca: PathBuf::from("./data/cp/root.crt"),
            join_token: None,
            agent_cert_ttl_secs: 3600,
            token_default_ttl_secs: 300,
            token_max_ttl_secs: 900,
            lease_default_ttl_secs: 300,
            lease_max_ttl_secs: 900,
            jwks_refresh_secs: 30,
            renew_check_secs: 60,
            max_staleness_ms: 5000,
            audit_outbox_max_records: outbox::MAX_EVENTS,
            audit_mode: AuditMode::Durable,
            metrics_listen: None,
            log_json: false,
        }
    }
}

/// When an issuing answer goes out relative to its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// After the record is durable in the outbox (group commit).
    Durable,
    /// At once; the record is durable within `outbox::FLUSH_DELAY`.
    CommitDelay,
}

impl AuditMode {
    /// How long the outbox writer gathers records before a commit.
    pub fn gather(self) -> Duration {
        match self {
            AuditMode::Durable => Duration::ZERO,
            AuditMode::CommitDelay => outbox::FLUSH_DELAY,
        }
    }
}

impl Config {
    /// The checks serde cannot make: the id's role and region, and the
    /// ranges. Returns the region the cache serves.
    pub fn validate(&self) -> Result<RegionId, String> {
        let id = &self.id;
        if id.role() != Role::Cache {
            return Err(format!(
                "id: {id} is not a cache id (spiffe://TD/cache/REGION/NAME)"
            ));
        }
        let region = id
            .region()
            .cloned()
            .ok_or_else(|| "cache id has no region".to_string())?;
        if self.token_default_ttl_secs == 0 || self.token_default_ttl_secs > self.token_max_ttl_secs
        {
            return Err("token_default_ttl_secs must be within 1..=token_max_ttl_secs".into());
        }
        if self.token_max_ttl_secs > 3600 {
            return Err("token_max_ttl_secs may not exceed 3600: tokens are short-lived".into());
        }
        if self.lease_default_ttl_secs == 0
            || self.lease_default_ttl_secs > self.lease_max_ttl_secs
            || self.lease_max_ttl_secs > MAX_LEASE_TTL_SECS
        {
            return Err(format!(
                "lease ttls must satisfy 1 <= lease_default_ttl_secs <= lease_max_ttl_secs <= {MAX_LEASE_TTL_SECS}"
            ));
        }
        if self.agent_cert_ttl_secs < 60 || self.agent_cert_ttl_secs > 86400 {
            return Err("agent_cert_ttl_secs must be within 60..=86400".into());
        }
        if self.max_staleness_ms < 50 || self.max_staleness_ms > 3_600_000 {
            return Err("max_staleness_ms must be within 50..=3600000".into());
        }
        if !(1000..=100_000_000).contains(&self.audit_outbox_max_records) {
            return Err("audit_outbox_max_records must be within 1000..=100000000".into());
        }
        if self.advertise.len() > lattice_shared::pki::MAX_HOST_NAMES {
            return Err(format!(
                "advertise: at most {} names",
                lattice_shared::pki::MAX_HOST_NAMES
            ));
        }
        if self.jwks_refresh_secs == 0 || self.renew_check_secs == 0 {
            return Err("jwks_refresh_secs and renew_check_secs must be positive".into());
        }
        Ok(region)
    }

    /// L, the staleness bound.
    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.max_staleness_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_parsed_with_the_config_and_its_role_checked() {
        let c: Config = serde_json::from_str(r#"{"id":"spiffe://t/cache/eu/c1"}"#).expect("parse");
        assert_eq!(c.validate().expect("valid").as_str(), "eu");
        assert!(serde_json::from_str::<Config>(r#"{"id":"not an id"}"#).is_err());
        let agent: Config =
            serde_json::from_str(r#"{"id":"spiffe://t/agent/eu/a"}"#).expect("parse");
        assert!(
            agent
                .validate()
                .expect_err("role")
                .contains("not a cache id")
        );
    }
}

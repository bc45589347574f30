//! The control plane's configuration: one TOML file with `LATTICE_CP_*`
//! environment overrides, parsed once into typed values (the trust domain
//! is a `TrustDomain` from the start) and checked before any port is bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lattice_shared::id::{HostName, Role, SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::{Error, detect, rotation};

/// Control-plane configuration (TOML, `LATTICE_CP_*` environment overrides).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub trust_domain: TrustDomain,
    /// Name in `spiffe://TD/cp/NAME`.
    pub name: String,
    pub listen: SocketAddr,
    /// DNS names and IP addresses the control plane is reached by, carried
    /// as DNS and IP SANs in its TLS certificate beside its SPIFFE id so that
    /// standard TLS clients verify it (default: the listen IP and
    /// `localhost`). No cache may claim these names, loopback ones excepted.
    pub advertise: Vec<HostName>,
    pub data_dir: PathBuf,
    pub root_ttl_days: u64,
    /// Lifetime of a cache's intermediate CA, TLS and signing certificates.
    pub cache_cert_ttl_hours: u64,
    pub join_token_default_ttl_secs: u64,
    pub join_token_max_ttl_secs: u64,
    pub admin_cert_ttl_days: u64,
    /// Heartbeat interval on each cache's sync stream.
    pub heartbeat_ms: u64,
    /// Retired: each cache reports the bound L it enforces (its own
    /// `max_staleness_ms`). Accepted and ignored, with a warning, for one
    /// release so that existing files still load.
    #[serde(skip_serializing)]
    pub max_staleness_ms: Option<u64>,
    pub metrics_listen: Option<SocketAddr>,
    pub log_json: bool,
    /// Where KEKs live (default: versioned key files in `DATA_DIR/kms`).
    pub kms: KmsConfig,
    /// How long a replaced secret version stays leasable (and can be
    /// rolled back to).
    pub secret_grace_secs: u64,
    /// Mint the bootstrap admin credential again at this start (the
    /// `--reissue-bootstrap` flag; never from a file). Refused while its
    /// certificate is revoked.
    #[serde(skip)]
    pub reissue_bootstrap: bool,
    /// Upstream key rotation: one rotator per secret.
    pub rotation: Vec<rotation::RotationConfig>,
    /// How often scheduled rotations are looked for.
    pub rotation_check_secs: u64,
    /// Detection rules over the caches' audit records.
    pub detect: detect::DetectConfig,
}

/// The KMS holding the KEKs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    pub kind: KmsKind,
    /// `local`: the KEK directory (default `DATA_DIR/kms`).
    pub dir: Option<PathBuf>,
    /// `pkcs11`: module, token and PIN (prefer LATTICE_CP_KMS__PKCS11__PIN).
    pub pkcs11: Option<lattice_shared::kms::pkcs11::Pkcs11Config>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmsKind {
    #[default]
    Local,
    Pkcs11,
}

impl KmsConfig {
    /// KEKs in key files the record counts (not in an HSM).
    pub fn is_local(&self) -> bool {
        self.kind == KmsKind::Local
    }

    /// Opens the KMS; `expected` is what the installation record vouches
    /// for (`None`: a first start, which may create KEK version 1).
    pub fn open(
        &self,
        data_dir: &Path,
        expected: Option<u32>,
    ) -> Result<Arc<dyn lattice_shared::kms::Kms>, Error> {
        Ok(match self.kind {
            KmsKind::Local => {
                let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("kms"));
                Arc::new(lattice_shared::kms::LocalKms::open(&dir, expected)?)
            }
            KmsKind::Pkcs11 => {
                let cfg = self.pkcs11.as_ref().ok_or_else(|| {
                    Error::Config("kms.kind = \"pkcs11\" needs a [kms.pkcs11] section".into())
                })?;
                Arc::new(lattice_shared::kms::pkcs11::Pkcs11Kms::open(cfg)?)
            }
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            // A constant that is a valid trust domain.
            trust_domain: TrustDomain::new("lattice.local").expect("a valid trust domain"),
            name: "main".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            advertise: Vec::new(),
            data_dir: PathBuf::from("./data/cp"),
            root_ttl_days: 3650,
            cache_cert_ttl_hours: 24,
            join_token_default_ttl_secs: 600,
            join_token_max_ttl_secs: 86400,
            admin_cert_ttl_days: 30,
            heartbeat_ms: 2000,
            max_staleness_ms: None,
            metrics_listen: None,
            log_json: false,
            kms: KmsConfig::default(),
            secret_grace_secs: 3600,
            reissue_bootstrap: false,
            rotation: Vec::new(),
            rotation_check_secs: 60,
            detect: detect::DetectConfig::default(),
        }
    }
}

impl Config {
    /// The control plane's own id, `spiffe://TD/cp/NAME`.
    pub fn id(&self) -> Result<SpiffeId, lattice_shared::id::IdError> {
        SpiffeId::new(&self.trust_domain, Role::ControlPlane, None, &self.name)
    }

    /// Checks what serde cannot; called before any port is bound.
    pub fn validate(&self) -> Result<(), String> {
        self.id().map_err(|e| format!("name: {e}"))?;
        if self.cache_cert_ttl_hours == 0 || self.cache_cert_ttl_hours > 24 * 30 {
            return Err("cache_cert_ttl_hours must be within 1..=720".into());
        }
        if self.heartbeat_ms < 10 || self.heartbeat_ms > 60_000 {
            return Err("heartbeat_ms must be within 10..=60000".into());
        }
        if self.join_token_default_ttl_secs == 0
            || self.join_token_default_ttl_secs > self.join_token_max_ttl_secs
        {
            return Err(
                "join_token_default_ttl_secs must be within 1..=join_token_max_ttl_secs".into(),
            );
        }
        if self.secret_grace_secs > 30 * 86400 {
            return Err("secret_grace_secs may not exceed 30 days".into());
        }
        if self.rotation_check_secs == 0 {
            return Err("rotation_check_secs must be positive".into());
        }
        for r in &self.rotation {
            r.validate()
                .map_err(|e| format!("rotation for {:?}: {e}", r.secret))?;
        }
        self.detect.validate()?;
        if self.advertise.len() > lattice_shared::pki::MAX_HOST_NAMES {
            return Err(format!(
                "advertise: at most {} names",
                lattice_shared::pki::MAX_HOST_NAMES
            ));
        }
        Ok(())
    }
}

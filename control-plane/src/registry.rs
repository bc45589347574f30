//! The registry of enrolled caches: each cache's certificates (intermediate
//! CA, TLS, token signing, newest last) and its HPKE key, issued from CSRs
//! and kept durably so the JWKS and secret distribution can read them.

use std::time::Duration;

use lattice_shared::clock::unix_secs;
use lattice_shared::id::{HostName, SpiffeId};
use lattice_shared::pki::{Profile, host_names, inspect};
use lattice_shared::store::JsonStore as _;
use serde::{Deserialize, Serialize};

use crate::{Error, State};

const T_CACHES: &str = "caches";
/// Signing certificates kept per cache (current and recent ones).
const MAX_SIGNING_CERTS: usize = 4;

/// An enrolled cache as the control plane records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRecord {
    pub id: SpiffeId,
    pub enrolled_at_unix: i64,
    #[serde(with = "lattice_shared::serde_b64")]
    pub ca_cert: Vec<u8>,
    #[serde(with = "lattice_shared::serde_b64")]
    pub tls_cert: Vec<u8>,
    /// Signing certificates still valid, newest last; older ones stay in the
    /// JWKS until they expire so tokens they signed remain verifiable.
    #[serde(with = "lattice_shared::serde_b64::vec")]
    pub signing_certs: Vec<Vec<u8>>,
    /// X25519 key the cache receives sealed secrets with (empty: none yet).
    #[serde(default, with = "lattice_shared::serde_b64")]
    pub hpke_public_key: Vec<u8>,
}

/// A cache's certificate requests, each checked as a CSR.
#[derive(Debug, Clone)]
pub struct CacheCsrs {
    pub ca_csr: Vec<u8>,
    pub tls_csr: Vec<u8>,
    /// The DNS and IP names `tls_csr` asks for, checked as names.
    pub tls_names: Vec<HostName>,
    pub signing_csr: Vec<u8>,
}

impl State {
    pub fn cache_record(&self, id: &SpiffeId) -> Result<Option<CacheRecord>, Error> {
        Ok(self.store.get_json(T_CACHES, id.as_str().as_bytes())?)
    }

    pub fn caches(&self) -> Result<Vec<CacheRecord>, Error> {
        self.store
            .scan_prefix(T_CACHES, b"", 100_000)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string())))
            .collect()
    }

    /// Issues a cache's three certificates and records them durably.
    pub fn certify_cache(
        &self,
        cache_id: &SpiffeId,
        csrs: &CacheCsrs,
        hpke_public_key: &[u8],
    ) -> Result<CacheRecord, Error> {
        if !hpke_public_key.is_empty() {
            lattice_shared::envelope::check_public_key(hpke_public_key).map_err(|_| {
                Error::InvalidArgument("hpke_public_key is not an X25519 public key".into())
            })?;
        }
        if self.log.revocations().is_cache_revoked(cache_id) {
            return Err(Error::Denied(format!("{cache_id} has been revoked")));
        }
        let now = self.clock.now();
        let ttl = Duration::from_secs(self.cfg.cache_cert_ttl_hours * 3600);
        let ca_cert = self
            .root
            .issue(&csrs.ca_csr, cache_id, Profile::IntermediateCa, now, ttl)?;
        self.check_cache_names(cache_id, &csrs.tls_names)?;
        let tls_cert =
            self.root
                .issue_server(&csrs.tls_csr, cache_id, &csrs.tls_names, now, ttl)?;
        let signing =
            self.root
                .issue(&csrs.signing_csr, cache_id, Profile::JwtSigning, now, ttl)?;
        let previous = self.cache_record(cache_id)?;
        let mut signing_certs: Vec<Vec<u8>> = previous
            .as_ref()
            .map(|r| r.signing_certs.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| inspect(c).map(|i| i.not_after > now).unwrap_or(false))
            .collect();
        signing_certs.push(signing);
        // Bounded whatever a cache does: the newest few stay verifiable.
        let excess = signing_certs.len().saturating_sub(MAX_SIGNING_CERTS);
        signing_certs.drain(..excess);
        let hpke_public_key = if hpke_public_key.is_empty() {
            previous
                .as_ref()
                .map(|p| p.hpke_public_key.clone())
                .unwrap_or_default()
        } else {
            hpke_public_key.to_vec()
        };
        let record = CacheRecord {
            id: cache_id.clone(),
            hpke_public_key,
            enrolled_at_unix: previous
                .map(|p| p.enrolled_at_unix)
                .unwrap_or_else(|| unix_secs(now)),
            ca_cert,
            tls_cert,
            signing_certs,
        };
        self.store
            .put_json(T_CACHES, cache_id.as_str().as_bytes(), &record)?;
        metrics::counter!("lattice_cp_cache_certifications_total").increment(1);
        Ok(record)
    }

    /// A cache may be named only by names no other server of the lattice
    /// holds, so that it cannot pose as the control plane or another cache
    /// to a standard client that checks host names (and, say, serve its own
    /// keys as another cache's JWKS). Loopback names are exempt: they name
    /// whatever runs on the client's own host. The first live holder keeps
    /// a name; a revoked or expired cache's names are free again.
    fn check_cache_names(&self, cache_id: &SpiffeId, names: &[HostName]) -> Result<(), Error> {
        let names: Vec<&HostName> = names.iter().filter(|n| !n.is_loopback()).collect();
        if names.is_empty() {
            return Ok(());
        }
        if let Some(n) = names.iter().find(|n| self.cfg.advertise.contains(n)) {
            return Err(Error::Denied(format!(
                "{cache_id} may not be named {n}: it names the control plane"
            )));
        }
        let now = self.clock.now();
        for other in self.caches()? {
            if &other.id == cache_id
                || self.log.revocations().is_cache_revoked(&other.id)
                || inspect(&other.tls_cert)?.not_after <= now
            {
                continue;
            }
            let held = host_names(&other.tls_cert)?;
            if let Some(n) = names.iter().find(|n| held.contains(n)) {
                return Err(Error::Denied(format!(
                    "{cache_id} may not be named {n}: {} holds that name",
                    other.id
                )));
            }
        }
        Ok(())
    }
}

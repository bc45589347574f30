//! The registry of enrolled caches: each cache's certificates (intermediate
//! CA, TLS, token signing, newest last), its HPKE key and its custody,
//! issued from CSRs and kept durably so the JWKS and secret distribution can
//! read them. Enrolment makes a cache an authority for tokens; only a
//! custodian's grant (`HoldSecret`) makes it a holder of secrets.

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
    /// Whether the cache may be sealed secrets. Records from before custody
    /// was a decision read as `Legacy` (held as they were).
    #[serde(default = "Custody::legacy")]
    pub custody: Custody,
}

/// A cache's custody of secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Custody {
    /// Enrolled before custody was a decision: a holder as before.
    Legacy,
    /// Enrolled, and no custodian has granted custody: sealed nothing.
    Pending,
    /// A custodian granted it (the admin, and whoever approved).
    Granted {
        by: String,
        #[serde(default)]
        approved_by: Option<String>,
        at_unix_ms: i64,
    },
}

impl Custody {
    fn legacy() -> Self {
        Custody::Legacy
    }
    /// Whether the cache is sealed the secrets of its region.
    pub fn holds(&self) -> bool {
        !matches!(self, Custody::Pending)
    }
    pub fn name(&self) -> &'static str {
        match self {
            Custody::Legacy => "legacy",
            Custody::Pending => "pending",
            Custody::Granted { .. } => "granted",
        }
    }
}

/// How a certification treats custody: a new enrolment (a new join token,
/// perhaps a new machine) waits for a custodian again; a renewal keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Certify {
    Enrolment,
    Renewal,
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
        how: Certify,
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
        let custody = match (how, previous.as_ref()) {
            (Certify::Renewal, Some(p)) => p.custody.clone(),
            _ => Custody::Pending,
        };
        let record = CacheRecord {
            id: cache_id.clone(),
            custody,
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

    /// Grants `cache_id` custody of the secrets of its region and seals
    /// them to it. Returns the record and how many secrets it now holds.
    pub fn grant_custody(
        &self,
        cache_id: &SpiffeId,
        by: &SpiffeId,
        approved_by: Option<&SpiffeId>,
    ) -> Result<(CacheRecord, u32), Error> {
        let Some(mut record) = self.cache_record(cache_id)? else {
            return Err(Error::NotFound(format!("{cache_id} is not enrolled")));
        };
        if self.log.revocations().is_cache_revoked(cache_id) {
            return Err(Error::FailedPrecondition(format!(
                "{cache_id} has been revoked"
            )));
        }
        if !matches!(record.custody, Custody::Granted { .. }) {
            record.custody = Custody::Granted {
                by: by.to_string(),
                approved_by: approved_by.map(|a| a.to_string()),
                at_unix_ms: self.clock.now_unix_ms(),
            };
            self.store
                .put_json(T_CACHES, cache_id.as_str().as_bytes(), &record)?;
        }
        self.reconcile_secrets()?;
        let held = self
            .secret_records()?
            .iter()
            .filter(|r| {
                !r.deleted
                    && r.published
                        .as_ref()
                        .is_some_and(|p| p.holders.iter().any(|h| h == cache_id.as_str()))
            })
            .count();
        Ok((record, u32::try_from(held).unwrap_or(u32::MAX)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_from_before_custody_read_as_legacy_holders() {
        let json = r#"{"id":"spiffe://t/cache/eu/c","enrolled_at_unix":1,"ca_cert":"","tls_cert":"","signing_certs":[]}"#;
        let r: CacheRecord = serde_json::from_str(json).expect("an old record");
        assert_eq!(r.custody, Custody::Legacy);
        assert!(r.custody.holds());
        assert!(!Custody::Pending.holds());
        let again: CacheRecord =
            serde_json::from_str(&serde_json::to_string(&r).expect("json")).expect("round trip");
        assert_eq!(again.custody, Custody::Legacy);
    }
}

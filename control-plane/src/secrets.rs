//! Upstream secrets (API keys) at the control plane. Each version is AEAD
//! ciphertext under its own DEK; the DEK is stored wrapped by the KMS's
//! current KEK. Distribution is reconciled: for every live version (active,
//! previous) and every cache that may hold it (enrolled, not revoked, with an
//! HPKE key, in one of the secret's regions) the log carries the DEK sealed
//! to that cache; a state event names the versions in force and the
//! holders, so a cache that is no longer one drops its envelopes.
//! Reconciliation is idempotent: it runs after every change and at start,
//! so a crash between an event and the record that notes it only repeats an
//! envelope.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use lattice_shared::clock::unix_secs;
use lattice_shared::envelope::{self, MAX_SECRET_VALUE_LEN};
use lattice_shared::id::check_secret_name;
use lattice_shared::kms::{Kms, KmsError, WrappedKey};
use lattice_shared::proto as pb;
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{JsonStore as _, SharedStore, Write};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, State};

const T_SECRETS: &str = "secrets";
const T_SECRET_KEYS: &str = "secret_keys";
const FP_KEY: &[u8] = b"fingerprint_key";
const AAD_FP: &str = "cp/secret-fingerprint-key";
/// Regions a secret may name.
pub const MAX_REGIONS: usize = 64;
/// Secrets one control plane holds.
pub const MAX_SECRETS: usize = 10_000;

impl From<KmsError> for Error {
    fn from(e: KmsError) -> Self {
        match e {
            KmsError::Unwrap { .. } | KmsError::NoSuchVersion { .. } => {
                Error::Corrupt(e.to_string())
            }
            other => Error::Kms(other.to_string()),
        }
    }
}

impl From<envelope::EnvelopeError> for Error {
    fn from(e: envelope::EnvelopeError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

/// One version of a secret as stored here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub created_at_unix: i64,
    pub created_by: String,
    #[serde(default)]
    pub approved_by: String,
    /// put, rotation, rekey
    pub origin: String,
    pub fingerprint: String,
    /// Binds the wrapped DEK to this version (random, chosen when staged).
    pub dek_id: String,
    /// Empty once retired: the value is shredded with its DEK.
    #[serde(with = "lattice_shared::serde_b64")]
    pub ciphertext: Vec<u8>,
    pub wrapped_dek: Option<WrappedKey>,
    /// Caches that were sent this version's DEK, as `ID#KEY` (see
    /// `seal_key`): a cache that re-enrols with a new key is sealed anew.
    #[serde(default)]
    pub sealed_for: BTreeSet<String>,
}

/// The state last published to the caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub active: u64,
    pub previous: u64,
    pub previous_until_unix: i64,
    pub holders: Vec<String>,
    pub deleted: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SecretRecord {
    pub name: String,
    /// Regions whose caches hold it; "*" is every region.
    pub regions: Vec<String>,
    pub versions: BTreeMap<u64, VersionRecord>,
    pub active: u64,
    pub previous: u64,
    pub previous_until_unix: i64,
    pub deleted: bool,
    pub last_rotated_unix: i64,
    pub published: Option<Published>,
}

impl SecretRecord {
    fn next_version(&self) -> u64 {
        self.versions.keys().next_back().map_or(1, |v| v + 1)
    }
    fn live(&self) -> impl Iterator<Item = u64> + '_ {
        [self.active, self.previous].into_iter().filter(|v| *v != 0)
    }
    /// Shreds versions that are neither active nor previous.
    fn shred_retired(&mut self) {
        let (a, p) = (self.active, self.previous);
        for (v, rec) in self.versions.iter_mut() {
            if *v != a && *v != p {
                rec.ciphertext.clear();
                rec.wrapped_dek = None;
                rec.sealed_for.clear();
            }
        }
    }
}

/// A value encrypted under a fresh DEK, the DEK wrapped: what a put waiting
/// for approval keeps (never the value itself).
#[derive(Clone, Serialize, Deserialize)]
pub struct Staged {
    pub dek_id: String,
    #[serde(with = "lattice_shared::serde_b64")]
    pub ciphertext: Vec<u8>,
    pub wrapped_dek: WrappedKey,
    pub fingerprint: String,
}

/// The KMS, the fingerprint key and the lock that orders secret changes.
pub struct Secrets {
    pub kms: Arc<dyn Kms>,
    fp_key: Zeroizing<Vec<u8>>,
    lock: Mutex<()>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("kms", &self.kms.describe())
            .finish_non_exhaustive()
    }
}

/// A holder as `sealed_for` records it: its id and which key it was sealed to.
fn seal_key(id: &str, public_key: &[u8]) -> String {
    format!(
        "{id}#{}",
        hex::encode(&lattice_shared::pki::sha256(public_key)[..8])
    )
}

fn dek_aad(name: &str, dek_id: &str) -> Vec<u8> {
    format!("lattice/dek/{name}/{dek_id}").into_bytes()
}

fn random_hex(n: usize) -> Result<String, Error> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| Error::Corrupt("random number generator failed".into()))?;
    Ok(hex::encode(b))
}

impl Secrets {
    pub fn open(
        store: &SharedStore,
        vault: &Arc<dyn KeyVault>,
        kms: Arc<dyn Kms>,
    ) -> Result<Self, Error> {
        let fp_key = match store.get(T_SECRET_KEYS, FP_KEY)? {
            Some(sealed) => vault.open(&sealed, AAD_FP)?,
            None => {
                let mut key = Zeroizing::new(vec![0u8; 32]);
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| Error::Corrupt("random number generator failed".into()))?;
                store.apply(vec![Write {
                    tree: T_SECRET_KEYS,
                    key: FP_KEY.to_vec(),
                    value: Some(vault.seal(&key, AAD_FP)?),
                }])?;
                key
            }
        };
        Ok(Self {
            kms,
            fp_key,
            lock: Mutex::new(()),
        })
    }

    /// Encrypts `value` under a new DEK and wraps the DEK.
    pub fn stage(&self, name: &str, value: &[u8]) -> Result<Staged, Error> {
        check_secret_name(name).map_err(Error::InvalidArgument)?;
        check_value(value)?;
        let dek = envelope::new_dek()?;
        let dek_id = random_hex(12)?;
        Ok(Staged {
            ciphertext: envelope::encrypt(&*dek, value, &envelope::value_aad(name))?,
            wrapped_dek: self.kms.wrap(&*dek, &dek_aad(name, &dek_id))?,
            fingerprint: envelope::fingerprint(&self.fp_key, value),
            dek_id,
        })
    }
}

pub fn check_value(value: &[u8]) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_SECRET_VALUE_LEN {
        return Err(Error::InvalidArgument(format!(
            "a secret value must be 1 to {MAX_SECRET_VALUE_LEN} bytes"
        )));
    }
    Ok(())
}

/// Region names as given to `secret put --regions`.
pub fn check_regions(regions: &[String]) -> Result<(), Error> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(Error::InvalidArgument(format!(
            "name 1 to {MAX_REGIONS} regions (\"*\" for every region)"
        )));
    }
    for r in regions {
        if r != "*" {
            lattice_shared::id::RegionId::new(r)
                .map_err(|e| Error::InvalidArgument(format!("region {r:?}: {e}")))?;
        }
    }
    Ok(())
}

/// How a change came about, for the version record.
pub struct Origin<'a> {
    pub by: &'a str,
    pub approved_by: &'a str,
    pub kind: &'a str,
}

impl State {
    fn load_secret(&self, name: &str) -> Result<Option<SecretRecord>, Error> {
        match self.store.get(T_SECRETS, name.as_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("secret {name}: {e}"))),
            None => Ok(None),
        }
    }

    fn live_secret(&self, name: &str) -> Result<SecretRecord, Error> {
        check_secret_name(name).map_err(Error::InvalidArgument)?;
        match self.load_secret(name)? {
            Some(r) if !r.deleted => Ok(r),
            _ => Err(Error::NotFound(format!("no secret named {name}"))),
        }
    }

    fn save_secret(&self, rec: &SecretRecord) -> Result<(), Error> {
        self.store.put_json(T_SECRETS, rec.name.as_bytes(), rec)?;
        Ok(())
    }

    pub fn secret_records(&self) -> Result<Vec<SecretRecord>, Error> {
        self.store
            .scan_prefix(T_SECRETS, b"", MAX_SECRETS + 1)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string())))
            .collect()
    }

    pub fn secret_record(&self, name: &str) -> Result<SecretRecord, Error> {
        self.live_secret(name)
    }

    /// Whether `cache` was sealed a live version of the secret `name` (it
    /// can have leased it). Reads the store.
    pub fn cache_holds_secret(&self, cache: &str, name: &str) -> Result<bool, Error> {
        let rec = match self.live_secret(name) {
            Ok(r) => r,
            Err(Error::NotFound(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let prefix = format!("{cache}#");
        Ok(rec.live().any(|v| {
            rec.versions
                .get(&v)
                .is_some_and(|vr| vr.sealed_for.iter().any(|h| h.starts_with(&prefix)))
        }))
    }

    /// Makes a staged value the new active version; the old active one
    /// becomes previous for the grace window.
    pub fn commit_secret(
        &self,
        name: &str,
        regions: &[String],
        staged: Staged,
        origin: Origin<'_>,
    ) -> Result<(SecretRecord, u64), Error> {
        check_regions(regions)?;
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = match self.load_secret(name)? {
            Some(r) => r,
            None => {
                if self.secret_records()?.len() >= MAX_SECRETS {
                    return Err(Error::FailedPrecondition(format!(
                        "this control plane already holds {MAX_SECRETS} secrets"
                    )));
                }
                SecretRecord {
                    name: name.to_string(),
                    ..SecretRecord::default()
                }
            }
        };
        let now = unix_secs(self.clock.now());
        // A deleted name starts again, at a version above every revoked one.
        rec.deleted = false;
        rec.regions = regions.to_vec();
        let version = rec.next_version();
        rec.versions.insert(
            version,
            VersionRecord {
                version,
                created_at_unix: now,
                created_by: origin.by.to_string(),
                approved_by: origin.approved_by.to_string(),
                origin: origin.kind.to_string(),
                fingerprint: staged.fingerprint,
                dek_id: staged.dek_id,
                ciphertext: staged.ciphertext,
                wrapped_dek: Some(staged.wrapped_dek),
                sealed_for: BTreeSet::new(),
            },
        );
        self.activate(&mut rec, version, now);
        if origin.kind == "rotation" {
            rec.last_rotated_unix = now;
        }
        self.reconcile(&mut rec)?;
        tracing::info!(
            secret = name,
            version,
            by = origin.by,
            origin = origin.kind,
            "secret version activated"
        );
        metrics::counter!("lattice_cp_secret_versions_total", "origin" => origin.kind.to_string())
            .increment(1);
        Ok((rec, version))
    }

    fn activate(&self, rec: &mut SecretRecord, version: u64, now: i64) {
        let revoked = self.log.revocations();
        let old = rec.active;
        rec.previous = if old != 0 && !revoked.is_secret_version_revoked(&rec.name, old) {
            old
        } else {
            0
        };
        rec.previous_until_unix = if rec.previous != 0 {
            now + i64::try_from(self.cfg.secret_grace_secs).unwrap_or(i64::MAX / 2)
        } else {
            0
        };
        rec.active = version;
        rec.shred_retired();
    }

    /// Activates the previous version again (within its grace window).
    /// `expected`: the previous version the caller saw (0: any); a change
    /// in between (a put) refuses the rollback rather than surprise.
    pub fn rollback_secret(&self, name: &str, expected: u64) -> Result<SecretRecord, Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.live_secret(name)?;
        let now = unix_secs(self.clock.now());
        let prev = rec.previous;
        if expected != 0 && prev != expected {
            return Err(Error::FailedPrecondition(format!(
                "secret {name} changed since the rollback was asked: the previous version is now {prev}, not {expected}; ask again"
            )));
        }
        if prev == 0 {
            return Err(Error::FailedPrecondition(format!(
                "secret {name} has no previous version to roll back to"
            )));
        }
        if self.log.revocations().is_secret_version_revoked(name, prev) {
            return Err(Error::FailedPrecondition(format!(
                "secret {name} version {prev} has been revoked; put a new value instead"
            )));
        }
        if now >= rec.previous_until_unix {
            return Err(Error::FailedPrecondition(format!(
                "the grace window of secret {name} version {prev} ended at unix {}; put a new value instead",
                rec.previous_until_unix
            )));
        }
        self.activate(&mut rec, prev, now);
        self.reconcile(&mut rec)?;
        tracing::info!(secret = name, version = prev, "secret rolled back");
        Ok(rec)
    }

    /// Revokes one version (every cache refuses it within the staleness
    /// bound); a revoked previous version is no longer kept.
    pub fn revoke_secret_version(
        &self,
        name: &str,
        version: u64,
        reason: &str,
    ) -> Result<pb::LatticeEvent, Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.live_secret(name)?;
        if !rec.versions.contains_key(&version) {
            return Err(Error::NotFound(format!(
                "secret {name} has no version {version}"
            )));
        }
        let ev = self.log.append_revocation(
            &lattice_shared::revocation::Revocation {
                target: lattice_shared::revocation::Target::SecretVersion {
                    name: name.to_string(),
                    version,
                },
                reason: reason.to_string(),
            },
            self.clock.now_unix_ms(),
        )?;
        metrics::counter!("lattice_cp_revocations_total").increment(1);
        tracing::info!(
            seq = ev.seq,
            secret = name,
            version,
            "secret version revoked"
        );
        if rec.previous == version {
            rec.previous = 0;
            rec.previous_until_unix = 0;
        }
        rec.shred_retired();
        self.reconcile(&mut rec)?;
        Ok(ev)
    }

    /// After a failed post-check: `old` is active again and `new` revoked,
    /// if nothing else changed the secret meanwhile and `old` can still
    /// serve (not revoked, not shredded); otherwise `new` stays and the
    /// error says why.
    pub fn restore_after_failed_rotation(
        &self,
        name: &str,
        old: u64,
        new: u64,
    ) -> Result<(), Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.live_secret(name)?;
        if rec.active != new {
            return Err(Error::FailedPrecondition(format!(
                "secret {name} changed during the rotation (active is now version {}); nothing was rolled back",
                rec.active
            )));
        }
        let usable = old != 0
            && !self.log.revocations().is_secret_version_revoked(name, old)
            && rec
                .versions
                .get(&old)
                .is_some_and(|v| v.wrapped_dek.is_some());
        if !usable {
            return Err(Error::FailedPrecondition(format!(
                "version {old} of secret {name} is revoked or gone, so version {new} stays active although its post-check failed; fix the upstream key and rotate again"
            )));
        }
        self.log.append_revocation(
            &lattice_shared::revocation::Revocation {
                target: lattice_shared::revocation::Target::SecretVersion {
                    name: name.to_string(),
                    version: new,
                },
                reason: "rotation post-check failed".into(),
            },
            self.clock.now_unix_ms(),
        )?;
        rec.active = old;
        rec.previous = 0;
        rec.previous_until_unix = 0;
        rec.shred_retired();
        self.reconcile(&mut rec)
    }

    /// The last step of a rotation: revokes `old` if `new` is still the
    /// active version (a put or rollback meanwhile leaves it alone).
    pub fn revoke_replaced(
        &self,
        name: &str,
        old: u64,
        new: u64,
    ) -> Result<Option<pb::LatticeEvent>, Error> {
        {
            let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
            let rec = self.live_secret(name)?;
            if rec.active != new || old == new {
                return Ok(None);
            }
        }
        // Between the check and the revocation only another rotation could
        // change the secret, and rotations of one secret do not overlap.
        self.revoke_secret_version(name, old, "rotated").map(Some)
    }

    /// DEK rotation: the live versions are re-encrypted under new DEKs and
    /// sealed again to every holder. The value and the KEK do not change.
    pub fn rekey_secret(&self, name: &str) -> Result<SecretRecord, Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.live_secret(name)?;
        let live: Vec<u64> = rec.live().collect();
        for v in live {
            let Some(vr) = rec.versions.get_mut(&v) else {
                continue;
            };
            let Some(wrapped) = vr.wrapped_dek.as_ref() else {
                continue;
            };
            let dek = self
                .secrets
                .kms
                .unwrap(wrapped, &dek_aad(name, &vr.dek_id))?;
            let value = envelope::decrypt(&dek, &vr.ciphertext, &envelope::value_aad(name))?;
            let staged = self.secrets.stage(name, &value)?;
            vr.ciphertext = staged.ciphertext;
            vr.wrapped_dek = Some(staged.wrapped_dek);
            vr.dek_id = staged.dek_id;
            vr.sealed_for.clear();
        }
        self.reconcile(&mut rec)?;
        tracing::info!(secret = name, "secret re-encrypted under new DEKs");
        Ok(rec)
    }

    /// Revokes every version, shreds them and withdraws the envelopes.
    pub fn delete_secret(&self, name: &str) -> Result<(u64, u32), Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut rec = self.live_secret(name)?;
        let mut seq = 0;
        let mut revoked = 0u32;
        let versions: Vec<u64> = rec.versions.keys().copied().collect();
        for v in versions {
            if self.log.revocations().is_secret_version_revoked(name, v) {
                continue;
            }
            let ev = self.log.append_revocation(
                &lattice_shared::revocation::Revocation {
                    target: lattice_shared::revocation::Target::SecretVersion {
                        name: name.to_string(),
                        version: v,
                    },
                    reason: "secret deleted".into(),
                },
                self.clock.now_unix_ms(),
            )?;
            seq = ev.seq;
            revoked += 1;
        }
        rec.deleted = true;
        rec.active = 0;
        rec.previous = 0;
        rec.previous_until_unix = 0;
        rec.shred_retired();
        self.reconcile(&mut rec)?;
        tracing::info!(secret = name, versions_revoked = revoked, "secret deleted");
        Ok((seq.max(self.log.head()), revoked))
    }

    /// KEK rotation: a new KEK version, and every stored DEK rewrapped under
    /// it. Ciphertexts and the caches' envelopes are untouched.
    pub fn rotate_kms(&self) -> Result<(u32, u32), Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        let kms = &self.secrets.kms;
        let version = kms.rotate()?;
        if self.cfg.kms.is_local()
            && let Err(e) = lattice_shared::install::update(&self.cfg.data_dir, |r| {
                r.kek_versions = r.kek_versions.max(version)
            })
        {
            tracing::error!(error = %e, kek_version = version, "recording the new KEK version in the installation record failed");
        }
        let mut rewrapped = 0u32;
        for mut rec in self.secret_records()? {
            let mut changed = false;
            for vr in rec.versions.values_mut() {
                if let Some(w) = vr.wrapped_dek.as_ref()
                    && w.kek_version != version
                {
                    let aad = dek_aad(&rec.name, &vr.dek_id);
                    vr.wrapped_dek = Some(lattice_shared::kms::rewrap(&**kms, w, &aad)?);
                    rewrapped += 1;
                    changed = true;
                }
            }
            if changed {
                self.save_secret(&rec)?;
            }
        }
        tracing::info!(kms = %kms.describe(), kek_version = version, rewrapped, "KEK rotated; DEKs rewrapped");
        metrics::counter!("lattice_cp_kek_rotations_total").increment(1);
        Ok((version, rewrapped))
    }

    /// Opens a live version (for rotation checks and tests); zeroized on drop.
    pub fn open_secret_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Zeroizing<Vec<u8>>, Error> {
        let rec = self.live_secret(name)?;
        let vr = rec
            .versions
            .get(&version)
            .filter(|v| v.wrapped_dek.is_some())
            .ok_or_else(|| {
                Error::NotFound(format!("secret {name} has no live version {version}"))
            })?;
        let wrapped = vr.wrapped_dek.as_ref().ok_or_else(|| {
            Error::NotFound(format!("secret {name} version {version} is shredded"))
        })?;
        let dek = self
            .secrets
            .kms
            .unwrap(wrapped, &dek_aad(name, &vr.dek_id))?;
        Ok(envelope::decrypt(
            &dek,
            &vr.ciphertext,
            &envelope::value_aad(name),
        )?)
    }

    /// Caches that may hold a secret of `regions`: (id, HPKE public key);
    /// only caches a custodian granted custody (or enrolled before custody).
    fn holders(&self, regions: &[String]) -> Result<Vec<(String, Vec<u8>)>, Error> {
        let revoked = self.log.revocations();
        let mut out: Vec<(String, Vec<u8>)> = self
            .caches()?
            .into_iter()
            .filter(|c| {
                c.custody.holds()
                    && !c.hpke_public_key.is_empty()
                    && !revoked.is_cache_revoked(&c.id)
            })
            .filter(|c| {
                regions
                    .iter()
                    .any(|r| r == "*" || c.id.region().is_some_and(|cr| cr.as_str() == r.as_str()))
            })
            .map(|c| (c.id.to_string(), c.hpke_public_key))
            .collect();
        out.sort();
        Ok(out)
    }

    /// Brings the caches in line with `rec` (see the module doc) and saves it.
    fn reconcile(&self, rec: &mut SecretRecord) -> Result<(), Error> {
        // The record first: after a crash between here and the last save,
        // the next reconcile sees what was meant and publishes it again.
        self.save_secret(rec)?;
        let holders = if rec.deleted {
            Vec::new()
        } else {
            self.holders(&rec.regions)?
        };
        let holder_ids: BTreeSet<String> = holders.iter().map(|(id, _)| id.clone()).collect();
        let holder_keys: BTreeSet<String> =
            holders.iter().map(|(id, pk)| seal_key(id, pk)).collect();
        let live: Vec<u64> = {
            let revoked = self.log.revocations();
            rec.live()
                .filter(|v| !revoked.is_secret_version_revoked(&rec.name, *v))
                .collect()
        };
        for v in live {
            let name = rec.name.clone();
            let Some(vr) = rec.versions.get_mut(&v) else {
                continue;
            };
            vr.sealed_for.retain(|c| holder_keys.contains(c));
            let Some(wrapped) = vr.wrapped_dek.as_ref() else {
                continue;
            };
            let missing: Vec<&(String, Vec<u8>)> = holders
                .iter()
                .filter(|(id, pk)| !vr.sealed_for.contains(&seal_key(id, pk)))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let dek = self
                .secrets
                .kms
                .unwrap(wrapped, &dek_aad(&name, &vr.dek_id))?;
            let mut seals = Vec::with_capacity(missing.len());
            let mut sealed_to = Vec::with_capacity(missing.len());
            for (id, pk) in &missing {
                // One bad key must not hold the others back.
                match envelope::seal_to(pk, &dek, &envelope::seal_aad(id, &name, v)) {
                    Ok((enc, sealed_dek)) => {
                        seals.push(pb::SealedDek {
                            cache_id: id.clone(),
                            enc,
                            sealed_dek,
                        });
                        sealed_to.push(seal_key(id, pk));
                    }
                    Err(e) => {
                        metrics::counter!("lattice_cp_secret_seal_failures_total").increment(1);
                        tracing::error!(cache_id = %id, secret = %name, version = v, error = %e, "cannot seal to this cache's key; it does not receive the secret");
                    }
                }
            }
            drop(dek);
            if seals.is_empty() {
                continue;
            }
            self.log.append_secret(
                pb::SecretEvent {
                    name: name.clone(),
                    change: Some(pb::secret_event::Change::Version(pb::SecretVersionSealed {
                        version: v,
                        ciphertext: vr.ciphertext.clone(),
                        seals,
                        fingerprint: vr.fingerprint.clone(),
                        created_at_unix: vr.created_at_unix,
                    })),
                },
                self.clock.now_unix_ms(),
            )?;
            vr.sealed_for.extend(sealed_to);
        }
        let state = Published {
            active: rec.active,
            previous: rec.previous,
            previous_until_unix: rec.previous_until_unix,
            holders: holder_ids.into_iter().collect(),
            deleted: rec.deleted,
        };
        if rec.published.as_ref() != Some(&state) {
            self.log.append_secret(
                pb::SecretEvent {
                    name: rec.name.clone(),
                    change: Some(pb::secret_event::Change::State(pb::SecretState {
                        active: state.active,
                        previous: state.previous,
                        previous_until_unix: state.previous_until_unix,
                        holders: state.holders.clone(),
                        deleted: state.deleted,
                    })),
                },
                self.clock.now_unix_ms(),
            )?;
            rec.published = Some(state);
        }
        self.save_secret(rec)
    }

    /// Reconciles every secret: at start, and when caches come or go.
    pub fn reconcile_secrets(&self) -> Result<(), Error> {
        let _g = self.secrets.lock.lock().unwrap_or_else(|p| p.into_inner());
        for mut rec in self.secret_records()? {
            if rec.deleted && rec.published.as_ref().is_some_and(|p| p.deleted) {
                continue;
            }
            self.reconcile(&mut rec)?;
        }
        Ok(())
    }

    /// What a version is to its secret: revoked, active, previous or retired.
    pub(crate) fn version_state(&self, rec: &SecretRecord, v: &VersionRecord) -> &'static str {
        if self
            .log
            .revocations()
            .is_secret_version_revoked(&rec.name, v.version)
        {
            "revoked"
        } else if v.version == rec.active {
            "active"
        } else if v.version == rec.previous {
            "previous"
        } else {
            "retired"
        }
    }
}

//! The cache's sealed secrets: the envelopes the control plane streamed to
//! this cache (value ciphertext and the DEK sealed to our X25519 key), kept
//! sealed in memory and at rest (they are events of the local log). A lease
//! opens one in memory; the value is zeroized when it is done.
//!
//! An opened DEK is kept in memory (zeroizing) for up to `DEK_CACHE_SECS`
//! and dropped with its version: opening costs two X25519 operations, more
//! than the rest of a lease. This widens nothing: the process holds the HPKE
//! private key, which opens every envelope, all the time anyway.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use lattice_shared::envelope::{self, EnvelopeError, HpkeKeyPair};
use lattice_shared::proto as pb;
use zeroize::Zeroizing;

/// How long an opened DEK is reused.
pub const DEK_CACHE_SECS: i64 = 60;

/// One version as this cache holds it: still sealed.
pub struct SealedVersion {
    pub ciphertext: Vec<u8>,
    pub enc: Vec<u8>,
    pub sealed_dek: Vec<u8>,
    pub fingerprint: String,
    /// The opened DEK and until when (unix seconds) it may be reused.
    dek: Mutex<Option<(Zeroizing<Vec<u8>>, i64)>>,
}

impl SealedVersion {
    pub fn new(
        ciphertext: Vec<u8>,
        enc: Vec<u8>,
        sealed_dek: Vec<u8>,
        fingerprint: String,
    ) -> Self {
        Self {
            ciphertext,
            enc,
            sealed_dek,
            fingerprint,
            dek: Mutex::new(None),
        }
    }
}

#[derive(Default)]
struct Entry {
    active: u64,
    previous: u64,
    previous_until_unix: i64,
    versions: BTreeMap<u64, Arc<SealedVersion>>,
}

/// Which version a lease may have, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// (version, end of its grace window for a previous version)
    Found(u64, Option<i64>),
    Unknown,
    /// The version exists here but is neither active nor previous.
    Retired(u64),
    /// A previous version past its grace window.
    GraceOver(u64),
}

#[derive(Default)]
pub struct SecretIndex {
    entries: RwLock<HashMap<String, Entry>>,
}

impl std::fmt::Debug for SecretIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.entries.read().map(|e| e.len()).unwrap_or(0);
        f.debug_struct("SecretIndex").field("secrets", &n).finish()
    }
}

impl SecretIndex {
    /// Applies one secret event addressed to `me` (our cache id).
    pub fn apply(&self, me: &str, ev: &pb::SecretEvent) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match &ev.change {
            Some(pb::secret_event::Change::Version(v)) => {
                let Some(seal) = v.seals.iter().find(|s| s.cache_id == me) else {
                    return;
                };
                entries.entry(ev.name.clone()).or_default().versions.insert(
                    v.version,
                    Arc::new(SealedVersion::new(
                        v.ciphertext.clone(),
                        seal.enc.clone(),
                        seal.sealed_dek.clone(),
                        v.fingerprint.clone(),
                    )),
                );
            }
            Some(pb::secret_event::Change::State(s)) => {
                if s.deleted || !s.holders.iter().any(|h| h == me) {
                    // Withdrawn from this cache: forget the envelopes.
                    entries.remove(&ev.name);
                    return;
                }
                let e = entries.entry(ev.name.clone()).or_default();
                e.active = s.active;
                e.previous = s.previous;
                e.previous_until_unix = s.previous_until_unix;
                e.versions
                    .retain(|v, _| *v == s.active || (*v == s.previous && s.previous != 0));
            }
            None => {}
        }
    }

    /// The version a lease of `name` gets (`version` 0: the active one).
    pub fn lookup(
        &self,
        name: &str,
        version: u64,
        now_unix: i64,
    ) -> (Lookup, Option<Arc<SealedVersion>>) {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let Some(e) = entries.get(name) else {
            return (Lookup::Unknown, None);
        };
        let want = if version == 0 { e.active } else { version };
        let Some(sealed) = e.versions.get(&want) else {
            return (Lookup::Unknown, None);
        };
        let found = if want == e.active && e.active != 0 {
            Lookup::Found(want, None)
        } else if want == e.previous && e.previous != 0 {
            if now_unix >= e.previous_until_unix {
                return (Lookup::GraceOver(want), None);
            }
            Lookup::Found(want, Some(e.previous_until_unix))
        } else {
            return (Lookup::Retired(want), None);
        };
        (found, Some(sealed.clone()))
    }

    /// Names and versions held (for status and tests).
    pub fn held(&self) -> Vec<(String, Vec<u64>)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = entries
            .iter()
            .map(|(n, e)| (n.clone(), e.versions.keys().copied().collect()))
            .collect();
        out.sort();
        out
    }
}

/// Opens a sealed version in memory: the DEK with our HPKE key (or the one
/// opened less than `DEK_CACHE_SECS` ago), then the value.
pub fn open(
    key: &HpkeKeyPair,
    me: &str,
    name: &str,
    version: u64,
    sealed: &SealedVersion,
    now_unix: i64,
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let cached = {
        let g = sealed.dek.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .filter(|(_, until)| now_unix < *until)
            .map(|(d, _)| d.clone())
    };
    let dek = match cached {
        Some(d) => d,
        None => {
            let d = key.open(
                &sealed.enc,
                &sealed.sealed_dek,
                &envelope::seal_aad(me, name, version),
            )?;
            *sealed.dek.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((d.clone(), now_unix + DEK_CACHE_SECS));
            d
        }
    };
    envelope::decrypt(&dek, &sealed.ciphertext, &envelope::value_aad(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "spiffe://td/cache/eu/c1";

    fn version_event(key: &HpkeKeyPair, name: &str, v: u64, value: &[u8]) -> pb::SecretEvent {
        let dek = envelope::new_dek().expect("dek");
        let ciphertext = envelope::encrypt(&*dek, value, &envelope::value_aad(name)).expect("enc");
        let (enc, sealed_dek) =
            envelope::seal_to(&key.public_bytes(), &*dek, &envelope::seal_aad(ME, name, v))
                .expect("seal");
        pb::SecretEvent {
            name: name.into(),
            change: Some(pb::secret_event::Change::Version(pb::SecretVersionSealed {
                version: v,
                ciphertext,
                seals: vec![pb::SealedDek {
                    cache_id: ME.into(),
                    enc,
                    sealed_dek,
                }],
                fingerprint: format!("fp{v}"),
                created_at_unix: 0,
            })),
        }
    }

    fn state_event(
        name: &str,
        active: u64,
        previous: u64,
        until: i64,
        holders: &[&str],
    ) -> pb::SecretEvent {
        pb::SecretEvent {
            name: name.into(),
            change: Some(pb::secret_event::Change::State(pb::SecretState {
                active,
                previous,
                previous_until_unix: until,
                holders: holders.iter().map(|h| h.to_string()).collect(),
                deleted: false,
            })),
        }
    }

    #[test]
    fn versions_states_grace_and_withdrawal() {
        let key = HpkeKeyPair::generate();
        let idx = SecretIndex::default();
        idx.apply(ME, &version_event(&key, "openai", 1, b"sk-one"));
        idx.apply(ME, &state_event("openai", 1, 0, 0, &[ME]));
        let (l, s) = idx.lookup("openai", 0, 100);
        assert_eq!(l, Lookup::Found(1, None));
        let value = open(&key, ME, "openai", 1, &s.expect("sealed"), 0).expect("open");
        assert_eq!(&*value, b"sk-one");

        idx.apply(ME, &version_event(&key, "openai", 2, b"sk-two"));
        idx.apply(ME, &state_event("openai", 2, 1, 200, &[ME]));
        assert_eq!(idx.lookup("openai", 0, 100).0, Lookup::Found(2, None));
        assert_eq!(idx.lookup("openai", 1, 100).0, Lookup::Found(1, Some(200)));
        assert_eq!(idx.lookup("openai", 1, 200).0, Lookup::GraceOver(1));
        assert_eq!(idx.lookup("openai", 7, 100).0, Lookup::Unknown);

        // A version sealed to another cache is not ours to hold.
        let other = pb::SecretEvent {
            name: "anthropic".into(),
            change: Some(pb::secret_event::Change::Version(pb::SecretVersionSealed {
                version: 1,
                seals: vec![pb::SealedDek {
                    cache_id: "spiffe://td/cache/us/c2".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        };
        idx.apply(ME, &other);
        assert_eq!(idx.lookup("anthropic", 0, 0).0, Lookup::Unknown);

        // A third version retires the first.
        idx.apply(ME, &version_event(&key, "openai", 3, b"sk-three"));
        idx.apply(ME, &state_event("openai", 3, 2, 300, &[ME]));
        assert_eq!(idx.lookup("openai", 1, 100).0, Lookup::Unknown);
        assert_eq!(idx.held(), vec![("openai".to_string(), vec![2, 3])]);

        // Withdrawn: no longer among the holders.
        idx.apply(
            ME,
            &state_event("openai", 3, 2, 300, &["spiffe://td/cache/us/c2"]),
        );
        assert!(idx.held().is_empty());
    }

    #[test]
    fn a_tampered_envelope_is_refused() {
        let key = HpkeKeyPair::generate();
        let idx = SecretIndex::default();
        idx.apply(ME, &version_event(&key, "openai", 1, b"sk-one"));
        idx.apply(ME, &state_event("openai", 1, 0, 0, &[ME]));
        let sealed = idx.lookup("openai", 0, 0).1.expect("sealed");
        let copy = |f: &dyn Fn(&mut Vec<u8>, &mut Vec<u8>)| {
            let (mut ct, mut sd) = (sealed.ciphertext.clone(), sealed.sealed_dek.clone());
            f(&mut ct, &mut sd);
            SealedVersion::new(ct, sealed.enc.clone(), sd, String::new())
        };
        let bad = copy(&|ct, _| ct[15] ^= 1);
        assert_eq!(
            open(&key, ME, "openai", 1, &bad, 0),
            Err(EnvelopeError::Open)
        );
        let bad = copy(&|_, sd| sd[0] ^= 1);
        assert_eq!(
            open(&key, ME, "openai", 1, &bad, 0),
            Err(EnvelopeError::Unseal)
        );
        // Presented as another version: the seal's AAD does not match.
        let fresh = copy(&|_, _| {});
        assert_eq!(
            open(&key, ME, "openai", 2, &fresh, 0),
            Err(EnvelopeError::Unseal)
        );
        let stranger = HpkeKeyPair::generate();
        assert_eq!(
            open(&stranger, ME, "openai", 1, &fresh, 0),
            Err(EnvelopeError::Unseal)
        );
    }

    #[test]
    fn an_opened_dek_is_reused_only_within_its_window() {
        let key = HpkeKeyPair::generate();
        let idx = SecretIndex::default();
        idx.apply(ME, &version_event(&key, "openai", 1, b"sk-one"));
        idx.apply(ME, &state_event("openai", 1, 0, 0, &[ME]));
        let sealed = idx.lookup("openai", 0, 0).1.expect("sealed");
        assert_eq!(
            &*open(&key, ME, "openai", 1, &sealed, 100).expect("open"),
            b"sk-one"
        );
        // Within the window the DEK is not unsealed again: a stranger's key
        // (which could not unseal it) still gets the value.
        let stranger = HpkeKeyPair::generate();
        assert_eq!(
            &*open(
                &stranger,
                ME,
                "openai",
                1,
                &sealed,
                100 + DEK_CACHE_SECS - 1
            )
            .expect("cached"),
            b"sk-one"
        );
        // After it, the envelope is opened again.
        assert_eq!(
            open(&stranger, ME, "openai", 1, &sealed, 100 + DEK_CACHE_SECS),
            Err(EnvelopeError::Unseal)
        );
        // A withdrawn version takes its DEK with it: once the last lease
        // using it is done, nothing holds it.
        let weak = Arc::downgrade(&sealed);
        drop(sealed);
        assert!(weak.upgrade().is_some(), "the index still holds it");
        idx.apply(
            ME,
            &state_event("openai", 1, 0, 0, &["spiffe://td/cache/us/c2"]),
        );
        assert!(idx.lookup("openai", 0, 100).1.is_none());
        assert!(weak.upgrade().is_none(), "dropped (and its DEK zeroized)");
    }
}

//! What the agent keeps on disk: its private key (sealed by the key vault)
//! and certificate chain in the store, checked before use, and the sealed
//! token cache file.

use std::sync::Arc;

use lattice_shared::clock::SharedClock;
use lattice_shared::id::SpiffeId;
use lattice_shared::pki::{PrivateKey, TrustBundle, Usage};
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{SharedStore, Write, to_json};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::tokens::{HeldToken, Loaded};
use crate::{Agent, Chain, Error, token_cache};

const T_IDENTITY: &str = "identity";
const AAD_KEY: &str = "agent/key";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredChain {
    #[serde(with = "lattice_shared::serde_b64")]
    leaf: Vec<u8>,
    #[serde(with = "lattice_shared::serde_b64")]
    intermediate: Vec<u8>,
}

/// The stored key and chain, if both are there and the chain still
/// verifies; `None` means the agent has to enrol.
pub(crate) fn load(
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
    bundle: &TrustBundle,
    id: &SpiffeId,
    clock: &SharedClock,
) -> Result<Option<(PrivateKey, Chain)>, Error> {
    let (Some(sealed), Some(chain)) = (
        store.get(T_IDENTITY, b"key")?,
        store.get(T_IDENTITY, b"chain")?,
    ) else {
        return Ok(None);
    };
    let key = PrivateKey::from_pkcs8(&vault.open(&sealed, AAD_KEY)?)?;
    let stored: StoredChain =
        serde_json::from_slice(&chain).map_err(|e| Error::Corrupt(e.to_string()))?;
    let chain = verify_chain(bundle, id, clock, stored.leaf, stored.intermediate);
    match chain {
        Ok(chain) => Ok(Some((key, chain))),
        Err(e) => {
            tracing::warn!(error = %e, "stored certificate is no longer valid; enrolling again");
            Ok(None)
        }
    }
}

/// Checks a chain from the cache with the standard verifier before use.
pub(crate) fn verify_chain(
    bundle: &TrustBundle,
    id: &SpiffeId,
    clock: &SharedClock,
    leaf: Vec<u8>,
    intermediate: Vec<u8>,
) -> Result<Chain, Error> {
    let info = bundle.verify(
        &leaf,
        &[CertificateDer::from(intermediate.as_slice())],
        clock.now(),
        Usage::TlsClient,
    )?;
    if info.id.as_ref() != Some(id) {
        return Err(Error::Corrupt(format!(
            "certificate names {:?}, not {id}",
            info.id
        )));
    }
    Ok(Chain {
        leaf,
        intermediate,
        root: bundle.root_der().to_vec(),
        info,
    })
}

pub(crate) fn persist(
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
    key: Option<&PrivateKey>,
    chain: &Chain,
) -> Result<(), Error> {
    let stored = StoredChain {
        leaf: chain.leaf.clone(),
        intermediate: chain.intermediate.clone(),
    };
    let mut writes = vec![Write {
        tree: T_IDENTITY,
        key: b"chain".to_vec(),
        value: Some(to_json(T_IDENTITY, &stored)?),
    }];
    if let Some(k) = key {
        writes.push(Write {
            tree: T_IDENTITY,
            key: b"key".to_vec(),
            value: Some(vault.seal(&k.pkcs8_der(), AAD_KEY)?),
        });
    }
    store.apply(writes)?;
    Ok(())
}

/// Removes the stored key and chain (the agent was revoked).
pub(crate) fn erase(store: &SharedStore) {
    let _ = store.apply(vec![
        Write {
            tree: T_IDENTITY,
            key: b"key".to_vec(),
            value: None,
        },
        Write {
            tree: T_IDENTITY,
            key: b"chain".to_vec(),
            value: None,
        },
    ]);
}

/// The tokens of the cache file still valid at `now`; a file that does not
/// open (another identity key, tampering) is removed.
pub(crate) fn load_token_cache(
    data_dir: &std::path::Path,
    key: &token_cache::CacheKey,
    now: i64,
) -> Vec<Loaded> {
    let path = token_cache::path(data_dir);
    let data = match token_cache::read(&path) {
        Ok(Some(d)) => d,
        Ok(None) => return Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "token cache unreadable; ignored");
            return Vec::new();
        }
    };
    match token_cache::open(key, &data) {
        Ok(entries) => entries
            .into_iter()
            .filter(|e| e.exp_unix > now)
            .map(|e| {
                (
                    e.jti.clone(),
                    HeldToken {
                        token: zeroize::Zeroizing::new(e.token.clone()),
                        audience: e.audience.clone(),
                        iat_unix: e.iat_unix,
                        exp_unix: e.exp_unix,
                        parent_jtis: e.parent_jtis.clone(),
                        depth: e.depth,
                    },
                    e.fresh_for.clone(),
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "token cache discarded");
            let _ = std::fs::remove_file(&path);
            Vec::new()
        }
    }
}

impl Agent {
    /// Writes the held tokens to the sealed cache file (when enabled).
    pub fn save_token_cache(&self) -> Result<(), Error> {
        // The lock is held through the write, so that a save sealed with
        // an older key cannot land after a newer one (renewal re-seals).
        let tokens = self.tokens();
        let Some(key) = tokens.cache_key.as_ref() else {
            return Ok(());
        };
        if self.is_revoked() {
            return Ok(());
        }
        let entries = tokens.entries(self.clock.now_unix());
        let sealed = token_cache::seal(key, &entries)?;
        token_cache::write(&token_cache::path(&self.cfg.data_dir), &sealed)
    }
}

//! The optional encrypted token cache file (`token_cache = true`): the
//! tokens the agent holds survive a restart without a round trip to the
//! cache, sealed with a key derived from the agent's own private key (HKDF
//! SHA-256, then ChaCha20-Poly1305, both from `ring`). A new identity key
//! (every certificate renewal) re-seals the file; a revoked agent deletes
//! it. Loaded tokens are served only after the revocation stream has
//! replayed its backlog, so a token revoked while the agent was down is
//! never served.

use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{Error, TokenKey};

pub const FILE_NAME: &str = "tokens.sealed";
const CONTEXT: &[u8] = b"lattice agent token cache v1";
const VERSION: u8 = 1;
/// Largest file read back.
const MAX_FILE: u64 = 16 * 1024 * 1024;

/// The sealing key; zeroized on drop.
pub struct CacheKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(<redacted>)")
    }
}

impl CacheKey {
    /// Derived from the agent's private key (PKCS#8 DER).
    pub fn derive(pkcs8: &[u8]) -> Self {
        struct Len32;
        impl hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, CONTEXT).extract(pkcs8);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit of 255 × 32.
        if let Ok(okm) = prk.expand(&[b"tokens"], Len32) {
            let _ = okm.fill(&mut out[..]);
        }
        CacheKey(out)
    }

    fn aead(&self) -> Result<LessSafeKey, Error> {
        UnboundKey::new(&aead::CHACHA20_POLY1305, &self.0[..])
            .map(LessSafeKey::new)
            .map_err(|_| Error::Corrupt("token cache key".into()))
    }
}

/// One held token as stored.
#[derive(Serialize, Deserialize)]
pub struct Entry {
    pub jti: String,
    pub token: String,
    pub audience: String,
    pub iat_unix: i64,
    pub exp_unix: i64,
    pub parent_jtis: Vec<String>,
    pub depth: u32,
    /// The key it is the newest token for, if any.
    pub fresh_for: Option<TokenKey>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.token.zeroize();
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// `version || nonce || ChaCha20-Poly1305(JSON entries)`.
pub fn seal(key: &CacheKey, entries: &[Entry]) -> Result<Vec<u8>, Error> {
    let json =
        Zeroizing::new(serde_json::to_vec(entries).map_err(|e| Error::Corrupt(e.to_string()))?);
    let mut nonce = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| Error::Corrupt("no randomness".into()))?;
    let mut buf = json.to_vec();
    key.aead()?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(CONTEXT),
            &mut buf,
        )
        .map_err(|_| Error::Corrupt("sealing the token cache failed".into()))?;
    let mut out = Vec::with_capacity(1 + 12 + buf.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&buf);
    use zeroize::Zeroize;
    buf.zeroize();
    Ok(out)
}

pub fn open(key: &CacheKey, data: &[u8]) -> Result<Vec<Entry>, Error> {
    if data.len() < 1 + 12 + 16 || data[0] != VERSION {
        return Err(Error::Corrupt("not a token cache file".into()));
    }
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&data[1..13]);
    let mut buf = Zeroizing::new(data[13..].to_vec());
    let plain = key
        .aead()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(CONTEXT),
            &mut buf[..],
        )
        .map_err(|_| Error::Corrupt("token cache does not open with this identity key".into()))?;
    serde_json::from_slice(plain).map_err(|e| Error::Corrupt(e.to_string()))
}

/// Writes the file atomically (temporary file, fsync, rename), mode 0600.
pub fn write(path: &Path, sealed: &[u8]) -> Result<(), Error> {
    lattice_shared::seal::write_file_atomic(path, sealed, true)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Reads the file if there is one.
pub fn read(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Config(format!("{}: {e}", path.display()))),
        Ok(m) if m.len() > MAX_FILE => {
            return Err(Error::Corrupt(format!(
                "{} is larger than {MAX_FILE} bytes",
                path.display()
            )));
        }
        Ok(_) => {}
    }
    std::fs::read(path)
        .map(Some)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(token: &str) -> Entry {
        Entry {
            jti: "j".into(),
            token: token.into(),
            audience: "a".into(),
            iat_unix: 1,
            exp_unix: 2,
            parent_jtis: vec![],
            depth: 0,
            fresh_for: None,
        }
    }

    #[test]
    fn sealed_with_the_identity_key_only() {
        let k1 = CacheKey::derive(b"identity key one");
        let k2 = CacheKey::derive(b"identity key two");
        let sealed = seal(&k1, &[entry("eyJ.secret-token.sig")]).expect("seal");
        assert!(
            !sealed
                .windows(b"secret-token".len())
                .any(|w| w == b"secret-token"),
            "no plaintext in the file"
        );
        let back = open(&k1, &sealed).expect("opens");
        assert_eq!(back[0].token, "eyJ.secret-token.sig");
        assert!(open(&k2, &sealed).is_err(), "another key cannot open it");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(open(&k1, &tampered).is_err(), "tampering is detected");
        assert!(open(&k1, &sealed[..10]).is_err());
    }
}

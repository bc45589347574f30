//! Key-encryption keys (KEKs) behind the `Kms` trait: the control plane wraps
//! every data-encryption key (DEK) with the current KEK version and keeps
//! older versions to unwrap what was wrapped before a rotation. Adapters: a
//! local key directory (default, one 0600 file per version) and PKCS#11
//! (`kms::pkcs11`, through `cryptoki`). A KEK never leaves its adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub mod pkcs11;

const KEK_LEN: usize = 32;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("KMS {kms}: no KEK version {version}")]
    NoSuchVersion { kms: String, version: u32 },
    #[error(
        "KMS {kms}: the wrapped key does not open under KEK version {version} (wrong KEK, or the data was tampered with)"
    )]
    Unwrap { kms: String, version: u32 },
    #[error("KMS {kms}: {path}: {source}")]
    Io {
        kms: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "KMS {kms}: key file {path} has the wrong size or permissions (want 32 bytes, mode 0600)"
    )]
    BadKeyFile { kms: String, path: PathBuf },
    #[error("KMS {kms}: {message}")]
    Backend { kms: String, message: String },
    #[error("random number generator failed")]
    Rng,
}

/// A DEK wrapped by one KEK version.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub kek_version: u32,
    #[serde(with = "crate::serde_b64")]
    pub bytes: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kek_version", &self.kek_version)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Wraps and unwraps DEKs. Calls may block (an HSM round trip): async
/// callers run them on the blocking pool.
pub trait Kms: Send + Sync + std::fmt::Debug + 'static {
    /// Where the KEKs live, for messages ("local:/path", "pkcs11:token").
    fn describe(&self) -> String;
    /// The version new wraps use.
    fn current_version(&self) -> Result<u32, KmsError>;
    /// Every version this KMS can unwrap with, oldest first.
    fn versions(&self) -> Result<Vec<u32>, KmsError>;
    /// Wraps `dek` under the current version; `aad` binds it to its use.
    fn wrap(&self, dek: &[u8], aad: &[u8]) -> Result<WrappedKey, KmsError>;
    fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError>;
    /// Creates a new KEK version and makes it current; returns it.
    fn rotate(&self) -> Result<u32, KmsError>;
}

/// Unwraps under its old version and wraps under the current one: a KEK
/// rotation touches wrapped DEKs only, never the data they encrypt.
pub fn rewrap(kms: &dyn Kms, wrapped: &WrappedKey, aad: &[u8]) -> Result<WrappedKey, KmsError> {
    let dek = kms.unwrap(wrapped, aad)?;
    kms.wrap(&dek, aad)
}

/// The AAD of one KEK version: a wrapped key names its version, and this
/// makes the name part of what is authenticated.
fn versioned_aad(version: u32, aad: &[u8]) -> Vec<u8> {
    let mut v = format!("lattice/kek/v{version}/").into_bytes();
    v.extend_from_slice(aad);
    v
}

/// KEKs in local files `kek-v00000001`, `kek-v00000002`, …, each 32 random
/// bytes, mode 0600, written once and never rewritten.
pub struct LocalKms {
    dir: PathBuf,
    keys: RwLock<BTreeMap<u32, LessSafeKey>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKms")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn file_name(version: u32) -> String {
    format!("kek-v{version:08}")
}

impl LocalKms {
    /// Opens the KEK directory, creating it with version 1 when empty.
    pub fn open_or_create(dir: &Path) -> Result<Self, KmsError> {
        Self::open(dir, None)
    }

    /// Opens the KEK directory. With `expected` (the versions an
    /// installation record vouches for), nothing is created: every version
    /// 1..=expected must be there. Either way the versions found must run
    /// from 1 without a gap (a deleted KEK is reported, never replaced).
    pub fn open(dir: &Path, expected: Option<u32>) -> Result<Self, KmsError> {
        let kms = Self {
            dir: dir.to_owned(),
            keys: RwLock::new(BTreeMap::new()),
            rng: SystemRandom::new(),
        };
        let io = |path: &Path, source| KmsError::Io {
            kms: kms.describe(),
            path: path.to_owned(),
            source,
        };
        if expected.is_none() {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
        let mut found = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries.collect::<Vec<_>>(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && expected.is_some() => Vec::new(),
            Err(e) => return Err(io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io(dir, e))?;
            let name = entry.file_name();
            let Some(v) = name
                .to_str()
                .and_then(|n| n.strip_prefix("kek-v"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let bytes = Zeroizing::new(std::fs::read(&path).map_err(|e| io(&path, e))?);
            if bytes.len() != KEK_LEN || !crate::seal::is_private(&path) {
                return Err(KmsError::BadKeyFile {
                    kms: kms.describe(),
                    path,
                });
            }
            found.insert(v, kms.key(&bytes)?);
        }
        let present: Vec<u32> = found.keys().copied().collect();
        *kms.keys.write().unwrap_or_else(|p| p.into_inner()) = found;
        let want = expected
            .unwrap_or(0)
            .max(present.last().copied().unwrap_or(0));
        let missing: Vec<String> = (1..=want)
            .filter(|v| !present.contains(v))
            .map(file_name)
            .collect();
        if !missing.is_empty() {
            return Err(KmsError::Backend {
                kms: kms.describe(),
                message: format!(
                    "KEK {} missing (versions 1..={want} are expected): every DEK wrapped by it \
                     is unreadable without it. Restore it from a backup of the KEK directory; \
                     it is never regenerated",
                    if missing.len() == 1 {
                        format!("file {} is", missing[0])
                    } else {
                        format!("files {} are", missing.join(", "))
                    }
                ),
            });
        }
        if present.is_empty() && expected.is_none() {
            kms.rotate()?;
        }
        Ok(kms)
    }

    fn key(&self, bytes: &[u8]) -> Result<LessSafeKey, KmsError> {
        let unbound =
            UnboundKey::new(&CHACHA20_POLY1305, bytes).map_err(|_| KmsError::Backend {
                kms: self.describe(),
                message: "bad key length".into(),
            })?;
        Ok(LessSafeKey::new(unbound))
    }
}

impl Kms for LocalKms {
    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }

    fn current_version(&self) -> Result<u32, KmsError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        keys.keys()
            .next_back()
            .copied()
            .ok_or(KmsError::NoSuchVersion {
                kms: self.describe(),
                version: 0,
            })
    }

    fn versions(&self) -> Result<Vec<u32>, KmsError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        Ok(keys.keys().copied().collect())
    }

    fn wrap(&self, dek: &[u8], aad: &[u8]) -> Result<WrappedKey, KmsError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let (&version, key) = keys.iter().next_back().ok_or(KmsError::NoSuchVersion {
            kms: self.describe(),
            version: 0,
        })?;
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| KmsError::Rng)?;
        let mut body = dek.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(versioned_aad(version, aad)),
            &mut body,
        )
        .map_err(|_| KmsError::Rng)?;
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&body);
        Ok(WrappedKey {
            kek_version: version,
            bytes,
        })
    }

    fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let version = wrapped.kek_version;
        let key = keys.get(&version).ok_or(KmsError::NoSuchVersion {
            kms: self.describe(),
            version,
        })?;
        let fail = || KmsError::Unwrap {
            kms: self.describe(),
            version,
        };
        if wrapped.bytes.len() < aead::NONCE_LEN + TAG_LEN {
            return Err(fail());
        }
        let (nonce, body) = wrapped.bytes.split_at(aead::NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| fail())?;
        let mut body = Zeroizing::new(body.to_vec());
        let len = key
            .open_in_place(nonce, Aad::from(versioned_aad(version, aad)), &mut body)
            .map_err(|_| fail())?
            .len();
        body.truncate(len);
        Ok(body)
    }

    fn rotate(&self) -> Result<u32, KmsError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let next = keys.keys().next_back().map_or(1, |v| v + 1);
        let mut fresh = Zeroizing::new(vec![0u8; KEK_LEN]);
        self.rng.fill(&mut fresh).map_err(|_| KmsError::Rng)?;
        let path = self.dir.join(file_name(next));
        crate::seal::write_private_file(&path, &fresh).map_err(|source| KmsError::Io {
            kms: self.describe(),
            path: path.clone(),
            source,
        })?;
        keys.insert(next, self.key(&fresh)?);
        Ok(next)
    }
}

/// Checks any `Kms`: the same tests run against every adapter.
#[cfg(any(test, feature = "dangerous-test-util"))]
pub fn conformance(kms: &dyn Kms) {
    let v1 = kms.current_version().expect("current version");
    let dek = [7u8; 32];
    let wrapped = kms.wrap(&dek, b"secret/a/1").expect("wrap");
    assert_eq!(wrapped.kek_version, v1);
    assert!(
        !wrapped.bytes.windows(8).any(|w| w == [7u8; 8]),
        "the DEK must not appear in its wrapping"
    );
    assert_eq!(&*kms.unwrap(&wrapped, b"secret/a/1").expect("unwrap"), &dek);
    // The AAD binds a wrapped key to its use.
    assert!(matches!(
        kms.unwrap(&wrapped, b"secret/b/1"),
        Err(KmsError::Unwrap { .. })
    ));
    // Tampering is detected.
    let mut tampered = wrapped.clone();
    let last = tampered.bytes.len() - 1;
    tampered.bytes[last] ^= 1;
    assert!(matches!(
        kms.unwrap(&tampered, b"secret/a/1"),
        Err(KmsError::Unwrap { .. })
    ));
    // Rotation: a new current version; the old one still unwraps; a rewrap
    // moves the DEK to the new version.
    let v2 = kms.rotate().expect("rotate");
    assert!(v2 > v1);
    assert_eq!(kms.current_version().expect("current"), v2);
    assert!(kms.versions().expect("versions").contains(&v1));
    assert_eq!(&*kms.unwrap(&wrapped, b"secret/a/1").expect("old"), &dek);
    let moved = rewrap(kms, &wrapped, b"secret/a/1").expect("rewrap");
    assert_eq!(moved.kek_version, v2);
    assert_eq!(&*kms.unwrap(&moved, b"secret/a/1").expect("new"), &dek);
    // A wrapped key claiming another version does not open.
    let mut relabelled = moved.clone();
    relabelled.kek_version = v1;
    assert!(kms.unwrap(&relabelled, b"secret/a/1").is_err());
    let unknown = WrappedKey {
        kek_version: v2 + 100,
        bytes: moved.bytes.clone(),
    };
    assert!(matches!(
        kms.unwrap(&unknown, b"secret/a/1"),
        Err(KmsError::NoSuchVersion { .. })
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_kms_conforms_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kms = LocalKms::open_or_create(dir.path()).expect("create");
        conformance(&kms);
        let wrapped = kms.wrap(b"0123456789abcdef", b"x").expect("wrap");
        let again = LocalKms::open_or_create(dir.path()).expect("reopen");
        assert_eq!(again.versions().expect("versions"), vec![1, 2]);
        assert_eq!(
            &*again.unwrap(&wrapped, b"x").expect("unwrap"),
            b"0123456789abcdef"
        );
    }

    #[test]
    fn another_kek_gives_a_clear_error() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ka = LocalKms::open_or_create(a.path()).expect("a");
        let kb = LocalKms::open_or_create(b.path()).expect("b");
        let wrapped = ka.wrap(b"dek bytes dek bytes", b"x").expect("wrap");
        let err = kb.unwrap(&wrapped, b"x").expect_err("other KEK");
        let msg = err.to_string();
        assert!(msg.contains("wrong KEK"), "{msg}");
        assert!(msg.contains("version 1"), "{msg}");
    }

    #[cfg(unix)]
    #[test]
    fn kek_files_are_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let kms = LocalKms::open_or_create(dir.path()).expect("create");
        kms.rotate().expect("rotate");
        for v in [1, 2] {
            let path = dir.path().join(file_name(v));
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let path = dir.path().join(file_name(2));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            LocalKms::open_or_create(dir.path()),
            Err(KmsError::BadKeyFile { .. })
        ));
    }
}

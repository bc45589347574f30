//! Sealing of private keys at rest. Nothing secret is ever written in
//! plaintext: keys are stored as AEAD ciphertext (ChaCha20-Poly1305, ring)
//! under a key-encryption key held by a [`KeyVault`]. The default vault is a
//! local 256-bit key file (mode 0600); a KMS or PKCS#11 vault plugs in behind
//! the same trait.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"LSK1";
const KEK_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {0} has the wrong size or permissions (want 32 bytes, mode 0600)")]
    BadKeyFile(PathBuf),
    #[error("sealed data is malformed or was sealed under another key")]
    Open,
    #[error("random number generator failed")]
    Rng,
}

/// Seals and opens small secrets (private keys, DEKs).
pub trait KeyVault: Send + Sync + std::fmt::Debug + 'static {
    /// `aad` binds the ciphertext to its purpose (e.g. "cache/ca-key").
    fn seal(&self, plaintext: &[u8], aad: &str) -> Result<Vec<u8>, SealError>;
    fn open(&self, sealed: &[u8], aad: &str) -> Result<Zeroizing<Vec<u8>>, SealError>;
}

/// A key-encryption key kept in a local file.
pub struct LocalKeyFile {
    key: LessSafeKey,
    rng: SystemRandom,
    path: PathBuf,
}

impl std::fmt::Debug for LocalKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKeyFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl LocalKeyFile {
    /// Opens the key file at `path`, creating it (mode 0600) if absent.
    pub fn open_or_create(path: &Path) -> Result<Self, SealError> {
        Self::open_inner(path, true)
    }

    /// Opens the key file at `path`; never creates one (an installation that
    /// exists must find its key, not get a new one).
    pub fn open(path: &Path) -> Result<Self, SealError> {
        Self::open_inner(path, false)
    }

    fn open_inner(path: &Path, create: bool) -> Result<Self, SealError> {
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        let rng = SystemRandom::new();
        let bytes: Zeroizing<Vec<u8>> = match std::fs::read(path) {
            Ok(b) => Zeroizing::new(b),
            Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
                let mut fresh = Zeroizing::new(vec![0u8; KEK_LEN]);
                rng.fill(&mut fresh).map_err(|_| SealError::Rng)?;
                write_private_file(path, &fresh).map_err(io)?;
                fresh
            }
            Err(e) => return Err(io(e)),
        };
        if bytes.len() != KEK_LEN || !is_private(path) {
            return Err(SealError::BadKeyFile(path.to_owned()));
        }
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| SealError::BadKeyFile(path.to_owned()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
            rng,
            path: path.to_owned(),
        })
    }
}

#[cfg(unix)]
pub(crate) fn is_private(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o077 == 0)
        .unwrap_or(false)
}
#[cfg(not(unix))]
pub(crate) fn is_private(_: &Path) -> bool {
    true
}

/// Writes `bytes` to a new file readable only by its owner, durably; fails
/// with `AlreadyExists` if `path` is there. A crash leaves no short file at
/// `path`: see [`write_file_atomic`].
pub fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_via_temp(path, bytes, true, false)
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old file
/// or the whole new one, never a short one: a temporary file beside it
/// (mode 0600 when `private`) is written and fsynced, renamed over `path`,
/// and the directory is fsynced.
pub fn write_file_atomic(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    write_via_temp(path, bytes, private, true)
}

fn write_via_temp(path: &Path, bytes: &[u8], private: bool, replace: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    if replace {
        std::fs::rename(&tmp, path)?;
    } else {
        // A hard link publishes the whole file and, unlike rename, refuses
        // to replace one that is there.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        linked?;
    }
    std::fs::File::open(dir)?.sync_all()
}

impl KeyVault for LocalKeyFile {
    fn seal(&self, plaintext: &[u8], aad: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Rng)?;
        let mut out = Vec::with_capacity(MAGIC.len() + nonce.len() + plaintext.len() + 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .map_err(|_| SealError::Open)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn open(&self, sealed: &[u8], aad: &str) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let header = MAGIC.len() + aead::NONCE_LEN;
        if sealed.len() < header + 16 || &sealed[..MAGIC.len()] != MAGIC {
            return Err(SealError::Open);
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[MAGIC.len()..header])
            .map_err(|_| SealError::Open)?;
        let mut body = Zeroizing::new(sealed[header..].to_vec());
        let len = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut body)
            .map_err(|_| SealError::Open)?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kill -9 of a process writing a key file leaves no short file behind
    /// (a short key file blocks the next start-up). The writer is this test
    /// binary run again as a child, killed as soon as the file shows up.
    #[test]
    fn a_writer_killed_mid_write_leaves_no_short_key_file() {
        const LEN: usize = 64 << 20;
        if let Some(path) = std::env::var_os("LATTICE_SEAL_CHILD_WRITE") {
            let _ = write_private_file(Path::new(&path), &vec![7u8; LEN]);
            return;
        }
        for round in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("kek.key");
            let mut child = std::process::Command::new(std::env::current_exe().expect("exe"))
                .args([
                    "--exact",
                    "seal::tests::a_writer_killed_mid_write_leaves_no_short_key_file",
                ])
                .env("LATTICE_SEAL_CHILD_WRITE", &path)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn the writer");
            let tmp = dir.path().join("kek.key.tmp");
            while !path.exists() && !tmp.exists() {
                if child.try_wait().expect("wait").is_some() {
                    break;
                }
                std::thread::yield_now();
            }
            child.kill().expect("kill -9");
            child.wait().expect("reap");
            if let Ok(m) = std::fs::metadata(&path) {
                assert_eq!(
                    m.len() as usize,
                    LEN,
                    "round {round}: a killed writer left a short key file"
                );
            }
        }
    }

    #[test]
    fn write_private_file_refuses_to_replace_and_write_file_atomic_replaces() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("admin.key");
        write_private_file(&path, b"one").expect("first write");
        let again = write_private_file(&path, b"two").expect_err("it is there");
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).expect("read"), b"one");
        assert!(is_private(&path));
        write_file_atomic(&path, b"three", false).expect("replace");
        assert_eq!(std::fs::read(&path).expect("read"), b"three");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, ["admin.key"], "no temporary file is left");
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        let v = LocalKeyFile::open_or_create(&path).expect("create");
        let sealed = v.seal(b"private key bytes", "cache/ca-key").expect("seal");
        assert!(
            !sealed.windows(7).any(|w| w == b"private"),
            "plaintext must not appear"
        );
        assert_eq!(
            &*v.open(&sealed, "cache/ca-key").expect("open"),
            b"private key bytes"
        );
        assert!(
            matches!(v.open(&sealed, "cache/tls-key"), Err(SealError::Open)),
            "aad binds"
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(matches!(
            v.open(&tampered, "cache/ca-key"),
            Err(SealError::Open)
        ));

        // Reopening the same file opens the same data; another key file does not.
        let again = LocalKeyFile::open_or_create(&path).expect("reopen");
        assert_eq!(
            &*again.open(&sealed, "cache/ca-key").expect("open"),
            b"private key bytes"
        );
        let other = LocalKeyFile::open_or_create(&dir.path().join("other")).expect("create");
        assert!(other.open(&sealed, "cache/ca-key").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn key_file_is_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("kek");
        LocalKeyFile::open_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            LocalKeyFile::open_or_create(&path),
            Err(SealError::BadKeyFile(_))
        ));
    }
}

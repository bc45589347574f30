//! The installation record: what a data directory vouches for.
//!
//! A data directory is initialised once, by a first start on an empty (or
//! absent) directory. From then on `installation.json` beside the store
//! names the component, the trust domain, the root's fingerprint and the
//! key versions expected. A later start that finds the record but not the
//! state it vouches for refuses, naming what is missing; nothing (root,
//! KEK, signing key, identity) is ever generated again over it. That is the
//! difference between "restore from backup" and silently becoming a new
//! installation that every cache then refuses.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The record's file name, in the data directory.
pub const RECORD_FILE: &str = "installation.json";

/// The version of the record's own format.
pub const RECORD_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// `control-plane`, `regional-cache` or `edge-agent`.
    pub component: String,
    pub trust_domain: String,
    /// SHA-256 of the root certificate (DER), hex.
    pub root_sha256: String,
    pub created_at_unix: u64,
    /// KEK versions of the local KMS that must be present (1..=this); 0
    /// when the KEKs are elsewhere (PKCS#11).
    #[serde(default)]
    pub kek_versions: u32,
}

/// What a data directory held before anything was opened in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Absent or empty: a first start initialises it.
    Fresh,
    /// Files but no record: a directory from before records (upgraded at
    /// start when its state is whole) or a damaged one (refused).
    Unrecorded,
    /// An initialised installation.
    Recorded(Record),
}

impl Found {
    /// Whether keys and identities may be created.
    pub fn may_create(&self) -> bool {
        matches!(self, Found::Fresh)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Looks at `dir` before anything is opened or created in it.
pub fn inspect(dir: &Path, component: &str) -> Result<Found, InstallError> {
    let path = dir.join(RECORD_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let record: Record = serde_json::from_slice(&bytes).map_err(|e| {
                InstallError::Refused(format!(
                    "{} is damaged ({e}); restore it from a backup of this data directory",
                    path.display()
                ))
            })?;
            if record.component != component {
                return Err(InstallError::Refused(format!(
                    "{} belongs to a {}, not a {component}: wrong data directory?",
                    dir.display(),
                    record.component
                )));
            }
            if record.format > RECORD_FORMAT {
                return Err(InstallError::Refused(format!(
                    "{} has format {}; this version reads up to {RECORD_FORMAT}",
                    path.display(),
                    record.format
                )));
            }
            Ok(Found::Recorded(record))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match std::fs::read_dir(dir) {
            Ok(mut entries) => Ok(if entries.next().is_none() {
                Found::Fresh
            } else {
                Found::Unrecorded
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Found::Fresh),
            Err(e) => Err(io(dir)(e)),
        },
        Err(e) => Err(io(&path)(e)),
    }
}

/// Refuses unless every one of `paths` (relative to `dir`) exists: the
/// state an installation record vouches for.
pub fn require(dir: &Path, paths: &[&str]) -> Result<(), InstallError> {
    let missing: Vec<&str> = paths
        .iter()
        .copied()
        .filter(|p| !dir.join(p).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(InstallError::Refused(format!(
        "{} is an initialised installation ({RECORD_FILE}) but {} missing: restore {} from a \
         backup of this data directory (docs/runbooks/restore-control-plane.md). Nothing is \
         created in its place; to start a new installation on purpose, use an empty directory",
        dir.display(),
        match missing.as_slice() {
            [one] => format!("{one} is"),
            many => format!("{} are", many.join(", ")),
        },
        if missing.len() == 1 { "it" } else { "them" }
    )))
}

/// Writes the record durably (temporary file, fsync, rename).
pub fn write(dir: &Path, record: &Record) -> Result<(), InstallError> {
    let path = dir.join(RECORD_FILE);
    let mut bytes =
        serde_json::to_vec_pretty(record).map_err(|e| InstallError::Refused(e.to_string()))?;
    bytes.push(b'\n');
    crate::seal::write_file_atomic(&path, &bytes, false).map_err(io(&path))
}

/// Rewrites the record in `dir` through `f` (a KEK rotation, say).
pub fn update(dir: &Path, f: impl FnOnce(&mut Record)) -> Result<(), InstallError> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let mut record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| InstallError::Refused(format!("{} is damaged ({e})", path.display())))?;
    f(&mut record);
    write(dir, &record)
}

/// SHA-256 of `der`, hex: the form `root_sha256` takes.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            format: RECORD_FORMAT,
            component: "control-plane".into(),
            trust_domain: "t".into(),
            root_sha256: fingerprint(b"root"),
            created_at_unix: 1,
            kek_versions: 1,
        }
    }

    #[test]
    fn fresh_unrecorded_and_recorded_directories_are_told_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            inspect(&dir.path().join("absent"), "control-plane").expect("absent"),
            Found::Fresh
        );
        assert_eq!(
            inspect(dir.path(), "control-plane").expect("empty"),
            Found::Fresh
        );
        std::fs::write(dir.path().join("db"), b"x").expect("write");
        assert_eq!(
            inspect(dir.path(), "control-plane").expect("files"),
            Found::Unrecorded
        );
        write(dir.path(), &record()).expect("record");
        assert_eq!(
            inspect(dir.path(), "control-plane").expect("recorded"),
            Found::Recorded(record())
        );
        let e = inspect(dir.path(), "regional-cache").expect_err("another component's");
        assert!(e.to_string().contains("belongs to a control-plane"), "{e}");
        std::fs::write(dir.path().join(RECORD_FILE), b"{not json").expect("damage");
        let e = inspect(dir.path(), "control-plane").expect_err("damaged");
        assert!(e.to_string().contains("is damaged"), "{e}");
    }

    #[test]
    fn missing_state_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"x").expect("write");
        require(dir.path(), &["db"]).expect("present");
        let e = require(dir.path(), &["db", "kek.key", "kms"]).expect_err("missing");
        assert!(e.to_string().contains("kek.key, kms are missing"), "{e}");
    }
}

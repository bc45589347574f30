//! Opening the control plane's data directory against its installation
//! record ([`lattice_shared::install`]): a first start on an empty
//! directory initialises it; every later start must find the store, the
//! key file, the KEKs and the root the record names, or it refuses. No
//! root or KEK is ever generated over an existing installation.

use std::path::Path;
use std::sync::Arc;

use lattice_shared::install::{self, Found, Record};
use lattice_shared::seal::LocalKeyFile;
use lattice_shared::store::SledStore;

use crate::Error;

pub const COMPONENT: &str = "control-plane";

/// The store and key file of a data directory, and what it held before.
#[derive(Debug)]
pub struct DataDir {
    pub store: Arc<SledStore>,
    pub vault: Arc<LocalKeyFile>,
    pub install: Found,
}

/// Opens `dir`'s store (`db`) and key file (`kek.key`); creates them only
/// in a fresh directory.
pub fn open_data_dir(dir: &Path) -> Result<DataDir, Error> {
    let found = install::inspect(dir, COMPONENT)?;
    if matches!(found, Found::Recorded(_)) {
        install::require(dir, &["db", "kek.key"])?;
    }
    if matches!(found, Found::Unrecorded) && !dir.join("kek.key").exists() {
        return Err(Error::Install(format!(
            "{} is not empty but holds no installation record and no kek.key: it is damaged or \
             not a control plane's data directory. Restore it from a backup, or start a new \
             installation on purpose in an empty directory",
            dir.display()
        )));
    }
    let store = SledStore::open(&dir.join("db"))?;
    let key = dir.join("kek.key");
    let vault = if found.may_create() {
        LocalKeyFile::open_or_create(&key)?
    } else {
        LocalKeyFile::open(&key)?
    };
    Ok(DataDir {
        store,
        vault: Arc::new(vault),
        install: found,
    })
}

/// Refuses a store whose root is not the one the record names.
pub(crate) fn check_root(found: &Found, td: &str, root_der: &[u8]) -> Result<(), Error> {
    let Found::Recorded(r) = found else {
        return Ok(());
    };
    if r.trust_domain != td {
        return Err(Error::Install(format!(
            "this installation is of trust domain {}, but the configuration says {td}",
            r.trust_domain
        )));
    }
    let have = install::fingerprint(root_der);
    if have != r.root_sha256 {
        return Err(Error::Install(format!(
            "the store's root CA (sha256 {have}) is not the one {} names (sha256 {}): this store \
             belongs to another installation. Restore this installation's own store",
            install::RECORD_FILE,
            r.root_sha256
        )));
    }
    Ok(())
}

/// The refusal when the store holds no root but must.
pub(crate) fn no_root(found: &Found, dir: &Path) -> Error {
    match found {
        Found::Recorded(r) => Error::Install(format!(
            "the store in {} holds no root CA, but {} says this control plane was initialised \
             (root sha256 {}): the store was lost or damaged. Restore the data directory from a \
             backup (docs/runbooks/restore-control-plane.md); no new root is created over it",
            dir.display(),
            install::RECORD_FILE,
            r.root_sha256
        )),
        _ => Error::Install(format!(
            "{} is not empty but its store holds no root CA and there is no {}: it is damaged or \
             not a control plane's data directory. Restore it from a backup, or start a new \
             installation on purpose in an empty directory",
            dir.display(),
            install::RECORD_FILE
        )),
    }
}

/// Writes the record after a first start (or for a directory from before
/// records, whose state was found whole), and after a KEK rotation.
pub(crate) fn record(
    dir: &Path,
    found: &Found,
    td: &str,
    root_der: &[u8],
    kek_versions: u32,
    now_unix: u64,
) -> Result<(), Error> {
    let created_at_unix = match found {
        Found::Recorded(r) => r.created_at_unix,
        Found::Unrecorded => {
            tracing::warn!(dir = %dir.display(), "no installation record: writing one for this data directory (it was made before records existed)");
            now_unix
        }
        Found::Fresh => now_unix,
    };
    install::write(
        dir,
        &Record {
            format: install::RECORD_FORMAT,
            component: COMPONENT.into(),
            trust_domain: td.into(),
            root_sha256: install::fingerprint(root_der),
            created_at_unix,
            kek_versions,
        },
    )?;
    Ok(())
}

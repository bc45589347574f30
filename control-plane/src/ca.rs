//! The root of trust: the root CA (its key sealed at rest), the control
//! plane's own TLS certificate (issued at each start, renewed at half-life),
//! admin certificates, and the bootstrap admin files an operator starts with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::{Role, SpiffeId, TrustDomain};
use lattice_shared::pem;
use lattice_shared::pki::{Authority, CertInfo, PrivateKey, Profile};
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{SharedStore, Write};
use lattice_shared::tls::ReloadableCert;

use crate::{Config, Error, State};

const T_IDENTITY: &str = "identity";

/// Files an operator needs: the root certificate and the bootstrap admin
/// credential (written once, mode 0600 for the key).
#[derive(Debug, Clone)]
pub struct AdminFiles {
    pub dir: PathBuf,
    pub root_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl AdminFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            root_pem: dir.join("root.crt"),
            cert_pem: dir.join("admin.crt"),
            key_pem: dir.join("admin.key"),
        }
    }
}

pub(crate) fn load_or_create_root(
    cfg: &Config,
    td: &TrustDomain,
    clock: &SharedClock,
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
) -> Result<Authority, Error> {
    const AAD: &str = "cp/root-key";
    match (
        store.get(T_IDENTITY, b"root_cert")?,
        store.get(T_IDENTITY, b"root_key")?,
    ) {
        (Some(cert), Some(sealed)) => {
            let key = PrivateKey::from_pkcs8(&vault.open(&sealed, AAD)?)?;
            Ok(Authority::from_parts(cert, key)?)
        }
        (None, None) => {
            let key = PrivateKey::generate_p256()?;
            let sealed = vault.seal(&key.pkcs8_der(), AAD)?;
            let root = Authority::new_root(
                td,
                key,
                clock.now(),
                Duration::from_secs(cfg.root_ttl_days * 86400),
            )?;
            store.apply(vec![
                Write {
                    tree: T_IDENTITY,
                    key: b"root_cert".to_vec(),
                    value: Some(root.cert_der().to_vec()),
                },
                Write {
                    tree: T_IDENTITY,
                    key: b"root_key".to_vec(),
                    value: Some(sealed),
                },
            ])?;
            tracing::info!(serial = %root.info().serial_hex, "created root CA");
            Ok(root)
        }
        _ => Err(Error::Corrupt(
            "root certificate and key are not both present".into(),
        )),
    }
}

pub(crate) fn issue_own_tls(
    root: &Authority,
    id: &SpiffeId,
    clock: &SharedClock,
    cert: &ReloadableCert,
) -> Result<CertInfo, Error> {
    let key = PrivateKey::generate_p256()?;
    let der = root.issue(
        &key.csr_der()?,
        id,
        Profile::TlsServerClient,
        clock.now(),
        Duration::from_secs(86400),
    )?;
    let info = lattice_shared::pki::inspect(&der)?;
    cert.replace(vec![der], &key)?;
    Ok(info)
}

impl State {
    pub(crate) fn renew_own_tls_if_due(&self) -> Result<(), Error> {
        let due = {
            let info = self.tls_info.lock().unwrap_or_else(|p| p.into_inner());
            past_half_life(self.clock.now(), info.not_before, info.not_after)
        };
        if due {
            let info = issue_own_tls(&self.root, &self.id, &self.clock, &self.tls_cert)?;
            *self.tls_info.lock().unwrap_or_else(|p| p.into_inner()) = info;
        }
        Ok(())
    }

    /// Writes the root certificate and a bootstrap admin credential to `files`
    /// unless a credential still in the first half of its life is there.
    pub fn ensure_admin_files(&self, files: &AdminFiles) -> Result<(), Error> {
        if let Ok(certs) = pem::read_certs(&files.cert_pem)
            && let Some(info) = certs
                .first()
                .and_then(|c| lattice_shared::pki::inspect(c).ok())
            && !past_half_life(self.clock.now(), info.not_before, info.not_after)
            && lattice_shared::policy::AdminAttributes::of_cert(&info)
                .is_ok_and(|a| !a.roles.is_empty())
        {
            return Ok(());
        }
        std::fs::create_dir_all(&files.dir)?;
        let admin_id = SpiffeId::new(&self.td, Role::Admin, None, "bootstrap")
            .map_err(|e| Error::Config(e.to_string()))?;
        let key = PrivateKey::generate_p256()?;
        let cert = self.issue_admin_cert(
            &key.csr_der()?,
            &admin_id,
            &lattice_shared::policy::AdminAttributes {
                roles: vec![lattice_shared::policy::AdminRole::PlatformAdmin],
                regions: vec![],
            },
            Duration::from_secs(self.cfg.admin_cert_ttl_days * 86400),
        )?;
        for p in [&files.key_pem, &files.cert_pem, &files.root_pem] {
            let _ = std::fs::remove_file(p);
        }
        let key_pem = zeroize::Zeroizing::new(pem::encode("PRIVATE KEY", &key.pkcs8_der()));
        lattice_shared::seal::write_private_file(&files.key_pem, key_pem.as_bytes())?;
        std::fs::write(&files.cert_pem, pem::encode("CERTIFICATE", &cert))?;
        std::fs::write(
            &files.root_pem,
            pem::encode("CERTIFICATE", self.root.cert_der()),
        )?;
        tracing::info!(dir = %files.dir.display(), id = %admin_id, "wrote bootstrap admin credential");
        Ok(())
    }

    /// An admin certificate for the key in `csr_der`, carrying `attrs`.
    pub fn issue_admin_cert(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        attrs: &lattice_shared::policy::AdminAttributes,
        ttl: Duration,
    ) -> Result<Vec<u8>, Error> {
        if id.role() != Role::Admin || id.trust_domain() != &self.td {
            return Err(Error::InvalidArgument(format!(
                "{id} is not an admin id of trust domain {}",
                self.td
            )));
        }
        if attrs.roles.is_empty() {
            return Err(Error::InvalidArgument(
                "an admin certificate needs at least one role".into(),
            ));
        }
        let ttl = ttl.min(Duration::from_secs(self.cfg.admin_cert_ttl_days * 86400));
        Ok(self.root.issue_with_org_unit(
            csr_der,
            id,
            Profile::TlsClient,
            self.clock.now(),
            ttl,
            Some(&attrs.to_org_unit()),
        )?)
    }
}

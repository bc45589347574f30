//! The root of trust: the root CA (its key sealed at rest), the control
//! plane's own TLS certificate (issued at each start, renewed at half-life),
//! admin certificates, and the bootstrap admin files an operator starts with.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::{HostName, Role, SpiffeId, TrustDomain};
use lattice_shared::pem;
use lattice_shared::pki::{Authority, CertInfo, PrivateKey, Profile};
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{JsonStore, SharedStore, Write};
use lattice_shared::tls::ReloadableCert;

use crate::{Config, Error, State};

const T_IDENTITY: &str = "identity";
/// The bootstrap admin minted once: which certificate, and when.
const BOOTSTRAP_KEY: &[u8] = b"bootstrap_admin";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BootstrapRecord {
    serial_hex: String,
    recorded_at_unix_ms: i64,
}

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

/// Whether the store holds a root CA (certificate or key).
pub(crate) fn has_root(store: &SharedStore) -> Result<bool, Error> {
    Ok(store.get(T_IDENTITY, b"root_cert")?.is_some()
        || store.get(T_IDENTITY, b"root_key")?.is_some())
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
    names: &[HostName],
    clock: &SharedClock,
    cert: &ReloadableCert,
) -> Result<CertInfo, Error> {
    let key = PrivateKey::generate_p256()?;
    let der = root.issue_server(
        &key.csr_der()?,
        id,
        names,
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
            let info = issue_own_tls(
                &self.root,
                &self.id,
                &self.cfg.advertise,
                &self.clock,
                &self.tls_cert,
            )?;
            *self.tls_info.lock().unwrap_or_else(|p| p.into_inner()) = info;
        }
        Ok(())
    }

    /// Writes the root certificate and the bootstrap admin credential to
    /// `files` on the first start only. The bootstrap admin is minted once
    /// and recorded in the store and the admin trail; later starts never
    /// mint it again (not past half-life, not when its files are gone),
    /// unless the operator asks (`reissue`), and never while its certificate
    /// is revoked: an admin revoked for cause stays revoked.
    pub fn ensure_admin_files(&self, files: &AdminFiles, reissue: bool) -> Result<(), Error> {
        let admin_id = SpiffeId::new(&self.td, Role::Admin, None, "bootstrap")
            .map_err(|e| Error::Config(e.to_string()))?;
        let minted: Option<BootstrapRecord> = self.store.get_json(T_IDENTITY, BOOTSTRAP_KEY)?;
        let on_disk = pem::read_certs(&files.cert_pem)
            .ok()
            .and_then(|certs| {
                certs
                    .first()
                    .and_then(|c| lattice_shared::pki::inspect(c).ok())
            })
            .filter(|info| {
                lattice_shared::policy::AdminAttributes::of_cert(info)
                    .is_ok_and(|a| !a.roles.is_empty())
            });
        let summary = match (&minted, &on_disk, reissue) {
            (Some(rec), _, false) => {
                let usable = on_disk.as_ref().is_some_and(|i| {
                    i.serial_hex == rec.serial_hex
                        && !past_half_life(self.clock.now(), i.not_before, i.not_after)
                });
                if !usable {
                    tracing::warn!(
                        dir = %files.dir.display(),
                        serial = %rec.serial_hex,
                        "the bootstrap admin credential is missing, replaced or past half-life; it is minted only once: issue admin certificates with `lattice admin-cert issue`, or start once with --reissue-bootstrap"
                    );
                }
                return Ok(());
            }
            // A data directory from before the record existed: adopt the
            // credential it holds rather than mint another.
            (None, Some(info), false) => {
                self.record_bootstrap(&info.serial_hex)?;
                return Ok(());
            }
            (None, None, false) => "bootstrap admin minted at the first start".to_string(),
            (_, _, true) => {
                let revoked = self.log.revocations();
                let standing = minted
                    .iter()
                    .map(|r| r.serial_hex.as_str())
                    .chain(on_disk.iter().map(|i| i.serial_hex.as_str()))
                    .find(|serial| revoked.is_serial_revoked(serial))
                    .map(str::to_owned);
                let cut = revoked.issued_before_cutoff(&admin_id, self.clock.now_unix());
                drop(revoked);
                if let Some(serial) = standing {
                    return Err(Error::FailedPrecondition(format!(
                        "the bootstrap admin's certificate {serial} is revoked; it is not re-issued (certify another admin with `lattice admin-cert issue`)"
                    )));
                }
                if cut {
                    return Err(Error::FailedPrecondition(format!(
                        "{admin_id} has a standing revocation; it is not re-issued (certify another admin with `lattice admin-cert issue`)"
                    )));
                }
                "bootstrap admin re-issued at the operator's request (--reissue-bootstrap)"
                    .to_string()
            }
        };
        std::fs::create_dir_all(&files.dir)?;
        let key = PrivateKey::generate_p256()?;
        let attrs = lattice_shared::policy::AdminAttributes {
            roles: vec![lattice_shared::policy::AdminRole::PlatformAdmin],
            regions: vec![],
        };
        let cert = self.issue_admin_cert(
            &key.csr_der()?,
            &admin_id,
            &attrs,
            Duration::from_secs(self.cfg.admin_cert_ttl_days * 86400),
        )?;
        let serial = lattice_shared::pki::inspect(&cert)?.serial_hex;
        for p in [&files.key_pem, &files.cert_pem, &files.root_pem] {
            let _ = std::fs::remove_file(p);
        }
        let key_pem = zeroize::Zeroizing::new(pem::encode("PRIVATE KEY", &key.pkcs8_der()));
        lattice_shared::seal::write_private_file(&files.key_pem, key_pem.as_bytes())?;
        let public = |path, der| {
            lattice_shared::seal::write_file_atomic(
                path,
                pem::encode("CERTIFICATE", der).as_bytes(),
                false,
            )
        };
        public(&files.cert_pem, &cert)?;
        public(&files.root_pem, self.root.cert_der())?;
        self.record_bootstrap(&serial)?;
        crate::admin_trail::record(
            self,
            &crate::admin_trail::AdminRecord {
                at_unix_ms: self.clock.now_unix_ms(),
                action: lattice_shared::policy::AdminAction::IssueAdminCertificate
                    .name()
                    .to_string(),
                admin: self.id.to_string(),
                outcome: crate::admin_trail::Outcome::Allowed,
                approved_by: None,
                request_id: None,
                policy_version: 0,
                policies: vec![],
                summary: format!(
                    "{summary}: {admin_id} serial {serial} roles {}",
                    attrs.to_org_unit()
                ),
            },
        )?;
        tracing::info!(dir = %files.dir.display(), id = %admin_id, serial = %serial, "wrote bootstrap admin credential");
        Ok(())
    }

    fn record_bootstrap(&self, serial_hex: &str) -> Result<(), Error> {
        let rec = BootstrapRecord {
            serial_hex: serial_hex.to_owned(),
            recorded_at_unix_ms: self.clock.now_unix_ms(),
        };
        Ok(self.store.put_json(T_IDENTITY, BOOTSTRAP_KEY, &rec)?)
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

//! The control plane: root of trust. It owns the root CA (key sealed at rest),
//! the one-time join tokens, the registry of enrolled caches and their signing
//! keys, and serves the `ControlPlane` (caches) and `Admin` (operators) APIs.

mod admin;
pub mod admin_trail;
pub mod approval;
pub mod audit_log;
pub mod detect;
pub mod event_log;
pub mod join;
pub mod policy;
pub mod rotation;
pub mod secrets;
mod service;
pub mod sync;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life, unix_secs};
use lattice_shared::id::{Role, SpiffeId, TrustDomain};
use lattice_shared::net::AuthGuardLayer;
use lattice_shared::pki::{Authority, CertInfo, PkiError, PrivateKey, Profile, TrustBundle};
use lattice_shared::proto::admin_server::AdminServer;
use lattice_shared::proto::control_plane_server::ControlPlaneServer;
use lattice_shared::seal::{KeyVault, SealError};
use lattice_shared::store::{SharedStore, StoreError, Write};
use lattice_shared::tls::ReloadableCert;
use lattice_shared::{limits, pem};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Key-encoding version of the control plane's store.
pub const SCHEMA_VERSION: u32 = 1;
const T_IDENTITY: &str = "identity";
const T_CACHES: &str = "caches";
/// Signing certificates kept per cache (current and recent ones).
const MAX_SIGNING_CERTS: usize = 4;

/// Control-plane configuration (TOML, `LATTICE_CP_*` environment overrides).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub trust_domain: String,
    /// Name in `spiffe://TD/cp/NAME`.
    pub name: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub root_ttl_days: u64,
    /// Lifetime of a cache's intermediate CA, TLS and signing certificates.
    pub cache_cert_ttl_hours: u64,
    pub join_token_default_ttl_secs: u64,
    pub join_token_max_ttl_secs: u64,
    pub admin_cert_ttl_days: u64,
    /// Heartbeat interval on each cache's sync stream.
    pub heartbeat_ms: u64,
    /// The staleness bound L that caches are configured with; `lattice status`
    /// calls a cache stale beyond it.
    pub max_staleness_ms: u64,
    pub metrics_listen: Option<SocketAddr>,
    pub log_json: bool,
    /// Where KEKs live (default: versioned key files in `DATA_DIR/kms`).
    pub kms: KmsConfig,
    /// How long a replaced secret version stays leasable (and can be
    /// rolled back to).
    pub secret_grace_secs: u64,
    /// Upstream key rotation: one rotator per secret.
    pub rotation: Vec<rotation::RotationConfig>,
    /// How often scheduled rotations are looked for.
    pub rotation_check_secs: u64,
    /// Detection rules over the caches' audit records.
    pub detect: detect::DetectConfig,
}

/// The KMS holding the KEKs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    pub kind: KmsKind,
    /// `local`: the KEK directory (default `DATA_DIR/kms`).
    pub dir: Option<PathBuf>,
    /// `pkcs11`: module, token and PIN (prefer LATTICE_CP_KMS__PKCS11__PIN).
    pub pkcs11: Option<lattice_shared::kms::pkcs11::Pkcs11Config>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmsKind {
    #[default]
    Local,
    Pkcs11,
}

impl KmsConfig {
    pub fn open(&self, data_dir: &Path) -> Result<Arc<dyn lattice_shared::kms::Kms>, Error> {
        Ok(match self.kind {
            KmsKind::Local => {
                let dir = self.dir.clone().unwrap_or_else(|| data_dir.join("kms"));
                Arc::new(lattice_shared::kms::LocalKms::open_or_create(&dir)?)
            }
            KmsKind::Pkcs11 => {
                let cfg = self.pkcs11.as_ref().ok_or_else(|| {
                    Error::Config("kms.kind = \"pkcs11\" needs a [kms.pkcs11] section".into())
                })?;
                Arc::new(lattice_shared::kms::pkcs11::Pkcs11Kms::open(cfg)?)
            }
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: "lattice.local".into(),
            name: "main".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            data_dir: PathBuf::from("./data/cp"),
            root_ttl_days: 3650,
            cache_cert_ttl_hours: 24,
            join_token_default_ttl_secs: 600,
            join_token_max_ttl_secs: 86400,
            admin_cert_ttl_days: 30,
            heartbeat_ms: 2000,
            max_staleness_ms: 5000,
            metrics_listen: None,
            log_json: false,
            kms: KmsConfig::default(),
            secret_grace_secs: 3600,
            rotation: Vec::new(),
            rotation_check_secs: 60,
            detect: detect::DetectConfig::default(),
        }
    }
}

impl Config {
    /// Checks what serde cannot; called before any port is bound.
    pub fn validate(&self) -> Result<(), String> {
        TrustDomain::new(&self.trust_domain).map_err(|e| format!("trust_domain: {e}"))?;
        SpiffeId::new(
            &TrustDomain::new(&self.trust_domain).map_err(|e| e.to_string())?,
            Role::ControlPlane,
            None,
            &self.name,
        )
        .map_err(|e| format!("name: {e}"))?;
        if self.cache_cert_ttl_hours == 0 || self.cache_cert_ttl_hours > 24 * 30 {
            return Err("cache_cert_ttl_hours must be within 1..=720".into());
        }
        if self.heartbeat_ms < 10 || self.heartbeat_ms > 60_000 {
            return Err("heartbeat_ms must be within 10..=60000".into());
        }
        if self.join_token_default_ttl_secs == 0
            || self.join_token_default_ttl_secs > self.join_token_max_ttl_secs
        {
            return Err(
                "join_token_default_ttl_secs must be within 1..=join_token_max_ttl_secs".into(),
            );
        }
        if self.secret_grace_secs > 30 * 86400 {
            return Err("secret_grace_secs may not exceed 30 days".into());
        }
        if self.rotation_check_secs == 0 {
            return Err("rotation_check_secs must be positive".into());
        }
        for r in &self.rotation {
            r.validate()
                .map_err(|e| format!("rotation for {:?}: {e}", r.secret))?;
        }
        self.detect.validate()?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Denied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("KMS: {0}")]
    Kms(String),
}

/// What the control plane is given from outside.
#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
    pub listener: TcpListener,
}

/// An enrolled cache as the control plane records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheRecord {
    pub id: SpiffeId,
    pub enrolled_at_unix: i64,
    #[serde(with = "b64")]
    pub ca_cert: Vec<u8>,
    #[serde(with = "b64")]
    pub tls_cert: Vec<u8>,
    /// Signing certificates still valid, newest last; older ones stay in the
    /// JWKS until they expire so tokens they signed remain verifiable.
    #[serde(with = "b64_vec")]
    pub signing_certs: Vec<Vec<u8>>,
    /// X25519 key the cache receives sealed secrets with (empty: none yet).
    #[serde(default, with = "b64")]
    pub hpke_public_key: Vec<u8>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}
mod b64_vec {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer, ser::SerializeSeq};
    pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&base64::engine::general_purpose::STANDARD.encode(x))?;
        }
        seq.end()
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
        Vec::<String>::deserialize(d)?
            .into_iter()
            .map(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// Shared state behind every handler.
#[derive(Debug)]
pub struct State {
    pub cfg: Config,
    pub td: TrustDomain,
    pub id: SpiffeId,
    pub clock: SharedClock,
    pub store: SharedStore,
    pub root: Authority,
    pub bundle: Arc<TrustBundle>,
    vault: Arc<dyn KeyVault>,
    tls_cert: Arc<ReloadableCert>,
    tls_info: std::sync::Mutex<CertInfo>,
    /// The ordered event log and the revocations derived from it.
    pub log: Arc<event_log::EventLog>,
    /// Policy releases and the engine in force.
    pub policy: policy::Policies,
    pub links: sync::Links,
    /// Upstream secrets: the KMS and what orders changes.
    pub secrets: secrets::Secrets,
    /// The tamper-evident audit log.
    pub audit_log: audit_log::AuditLog,
    audit_jobs: tokio::sync::mpsc::Sender<audit_log::Job>,
    /// Rotators of upstream keys, by secret name.
    pub rotators: rotation::Rotators,
    /// Detection rules over the audit stream, and the alerts they raise.
    pub detector: detect::Detector,
    pub alerts: tokio::sync::broadcast::Sender<detect::Alert>,
    /// Turns true when the control plane stops; long-lived streams end then.
    pub stopping: watch::Receiver<bool>,
}

/// Refuses revoked caches (and anything they issued) at the TLS handshake.
#[derive(Debug)]
struct RevocationCheck(Arc<event_log::EventLog>);

impl lattice_shared::tls::PeerCheck for RevocationCheck {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        self.0.revocations().check_cert(leaf, issuer)
    }
}

/// A running control plane.
#[derive(Debug)]
pub struct App {
    pub state: Arc<State>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    server: JoinHandle<()>,
    renewer: JoinHandle<()>,
}

pub(crate) fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
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

fn load_or_create_root(
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

impl App {
    pub async fn build(cfg: Config, deps: Deps) -> Result<App, Error> {
        cfg.validate().map_err(Error::Config)?;
        let td = TrustDomain::new(&cfg.trust_domain).map_err(|e| Error::Config(e.to_string()))?;
        let id = SpiffeId::new(&td, Role::ControlPlane, None, &cfg.name)
            .map_err(|e| Error::Config(e.to_string()))?;
        lattice_shared::store::check_schema(&*deps.store, "control-plane", SCHEMA_VERSION)?;
        let root = load_or_create_root(&cfg, &td, &deps.clock, &deps.store, &deps.vault)?;
        let bundle = Arc::new(TrustBundle::new(td.clone(), root.cert_der().to_vec())?);

        // The control plane's own TLS certificate: issued afresh at each start
        // and renewed at half-life; its key never touches the disk.
        let tls_cert = ReloadableCert::empty();
        let tls_info = issue_own_tls(&root, &id, &deps.clock, &tls_cert)?;

        let (log, released) = event_log::EventLog::open(deps.store.clone())?;
        let log = Arc::new(log);
        let policy = policy::Policies::open(
            &root,
            &id,
            &deps.clock,
            &deps.store,
            &deps.vault,
            &log,
            released,
        )?;
        let kms = cfg.kms.open(&cfg.data_dir)?;
        let secrets = secrets::Secrets::open(&deps.store, &deps.vault, kms)?;
        let rotators = rotation::Rotators::from_config(&cfg.rotation)?;
        let audit_log = audit_log::AuditLog::open(deps.store.clone())?;
        let (audit_jobs, audit_rx) = tokio::sync::mpsc::channel(1024);
        let (shutdown, mut rx) = watch::channel(false);
        let detector = detect::Detector::new(cfg.detect.clone());
        let state = Arc::new(State {
            detector,
            alerts: tokio::sync::broadcast::channel(1024).0,
            audit_log,
            audit_jobs,
            secrets,
            rotators,
            cfg,
            td,
            id,
            clock: deps.clock.clone(),
            store: deps.store,
            root,
            bundle: bundle.clone(),
            vault: deps.vault.clone(),
            tls_cert: tls_cert.clone(),
            tls_info: std::sync::Mutex::new(tls_info),
            log: log.clone(),
            policy,
            links: sync::Links::default(),
            stopping: rx.clone(),
        });
        std::fs::create_dir_all(&state.cfg.data_dir)?;
        let root_pem = state.cfg.data_dir.join("root.crt");
        std::fs::write(&root_pem, pem::encode("CERTIFICATE", state.root.cert_der()))?;
        state.ensure_admin_files(&AdminFiles::in_dir(&state.cfg.data_dir.join("admin")))?;
        tokio::spawn(audit_log::run_committer(Arc::downgrade(&state), audit_rx));
        // Finish any distribution a crash interrupted.
        state.reconcile_secrets()?;
        state
            .audit_log
            .sign_head(&state.policy.signer(), state.now_ms())?;

        let tls = lattice_shared::tls::server_config(
            bundle,
            deps.clock.clone(),
            tls_cert,
            Some(Arc::new(RevocationCheck(log))),
        )?;
        let addr = deps.listener.local_addr()?;
        let (kill, kill_rx) = watch::channel(false);
        let incoming = lattice_shared::net::tls_incoming(deps.listener, tls, kill_rx);
        let svc = service::Service {
            state: state.clone(),
        };
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
            .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
            .timeout(limits::RPC_TIMEOUT)
            .layer(AuthGuardLayer::new(service::OPEN_PATHS))
            .add_service(
                ControlPlaneServer::new(svc.clone())
                    .max_decoding_message_size(limits::MAX_MESSAGE_BYTES),
            )
            .add_service(
                AdminServer::new(svc).max_decoding_message_size(limits::MAX_ADMIN_MESSAGE_BYTES),
            );
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "control-plane server failed");
            }
        });
        let renewer = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                let mut rotations =
                    tokio::time::interval(Duration::from_secs(state.cfg.rotation_check_secs));
                let mut heads = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Err(e) = state.renew_own_tls_if_due() {
                                tracing::error!(error = %e, "renewing the control plane's TLS certificate failed");
                            }
                        }
                        _ = rotations.tick() => {
                            rotation::run_due(&state).await;
                        }
                        _ = heads.tick() => {
                            let st = state.clone();
                            let signed = tokio::task::spawn_blocking(move || {
                                st.audit_log.sign_head(&st.policy.signer(), st.now_ms())
                            })
                            .await;
                            if let Ok(Err(e)) = signed {
                                tracing::error!(error = %e, "signing an audit tree head failed");
                            }
                        }
                    }
                }
            })
        };
        tracing::info!(%addr, id = %state.id, "control plane listening");
        Ok(App {
            state,
            addr,
            shutdown,
            kill,
            server,
            renewer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn root_pem_path(&self) -> PathBuf {
        self.state.cfg.data_dir.join("root.crt")
    }
    pub fn admin_files(&self) -> AdminFiles {
        AdminFiles::in_dir(&self.state.cfg.data_dir.join("admin"))
    }

    /// Creates a one-time join token (the in-process form of the Admin call).
    pub fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: Option<Duration>,
    ) -> Result<join::NewJoinToken, Error> {
        join::create(&self.state, id, ttl)
    }

    /// Commits a revocation durably (the in-process form of `Admin.Revoke`).
    pub fn revoke(
        &self,
        r: &lattice_shared::revocation::Revocation,
    ) -> Result<lattice_shared::proto::LatticeEvent, Error> {
        self.state.revoke(r)
    }

    /// Releases a policy bundle as the control plane itself: the in-process
    /// form of `Admin.PushPolicy` for harnesses, without an admin decision.
    pub fn release_policy(
        &self,
        files: lattice_shared::policy::BundleFiles,
        message: &str,
    ) -> Result<lattice_shared::proto::PolicyVersion, Error> {
        self.state.release_policy(policy::NewRelease {
            files,
            message: message.into(),
            pushed_by: &self.state.id,
            approved_by: None,
            rollback_of: 0,
            lockout_check: None,
            base_version: None,
        })
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.renewer.abort();
        lattice_shared::net::stop_server(self.server, &self.kill).await;
    }
}

fn issue_own_tls(
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
    fn renew_own_tls_if_due(&self) -> Result<(), Error> {
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

    pub fn now_ms(&self) -> i64 {
        unix_ms(self.clock.now())
    }

    /// Releases policy, first replacing the signing key if its certificate
    /// has been revoked (caches refuse releases it signs).
    pub fn release_policy(
        &self,
        new: policy::NewRelease<'_>,
    ) -> Result<lattice_shared::proto::PolicyVersion, Error> {
        self.ensure_policy_signer()?;
        self.policy.release(&self.log, &self.clock, new)
    }

    /// True when a new signing key was made.
    fn ensure_policy_signer(&self) -> Result<bool, Error> {
        let info = lattice_shared::pki::inspect(&self.policy.signer_cert())?;
        if self.log.revocations().check_cert(&info, None).is_ok() {
            return Ok(false);
        }
        let signer = policy::load_or_create_signer(
            &self.root,
            &self.id,
            &self.clock,
            &self.store,
            &self.vault,
            true,
        )?;
        self.policy.replace_signer(signer);
        tracing::warn!(revoked_serial = %info.serial_hex, "policy signing certificate revoked; made a new signing key");
        Ok(true)
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

    /// Appends an audit record durably (a signed head follows at least every
    /// `audit_log::HEAD_EVERY` entries). Returns its index.
    pub fn audit(&self, record: &impl Serialize) -> Result<u64, Error> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Corrupt(e.to_string()))?;
        let (index, head_due) = self.audit_log.append(&bytes)?;
        if head_due {
            self.audit_log
                .sign_head(&self.policy.signer(), self.now_ms())?;
        }
        Ok(index)
    }

    /// Appends records (and `extra` writes) durably through the group
    /// committer, which merges concurrent batches into one write.
    pub async fn commit_audit(
        &self,
        records: Vec<Vec<u8>>,
        extra: Vec<Write>,
    ) -> Result<(), Error> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.audit_jobs
            .send(audit_log::Job {
                records,
                extra,
                reply,
            })
            .await
            .map_err(|_| Error::Corrupt("audit committer stopped".into()))?;
        done.await
            .map_err(|_| Error::Corrupt("audit committer stopped".into()))?
            .map_err(Error::Corrupt)
    }

    /// Validates and commits a revocation; durable when this returns.
    pub fn revoke(
        &self,
        r: &lattice_shared::revocation::Revocation,
    ) -> Result<lattice_shared::proto::LatticeEvent, Error> {
        use lattice_shared::revocation::Target;
        // What the caches will read back from the log: refuse here what
        // they would refuse there.
        lattice_shared::revocation::Revocation::try_from(&lattice_shared::proto::Revocation::from(
            r,
        ))
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        if let Target::SecretVersion { name, version } = &r.target {
            return self.revoke_secret_version(name, *version, &r.reason);
        }
        let foreign = match &r.target {
            Target::Agent(id) | Target::Cache(id) => Some(id),
            Target::SubjectBefore { subject, .. } => Some(subject),
            _ => None,
        };
        if let Some(id) = foreign
            && id.trust_domain() != &self.td
        {
            return Err(Error::InvalidArgument(format!(
                "{id} is not in trust domain {}",
                self.td
            )));
        }
        // "Everything issued before now" (cutoff 0) takes the commit time,
        // rounded up: everything issued up to this second is covered.
        let now_ms = self.now_ms();
        let resolved;
        let r = match &r.target {
            Target::SubjectBefore {
                subject,
                issued_before_unix: 0,
            } => {
                resolved = lattice_shared::revocation::Revocation {
                    target: Target::SubjectBefore {
                        subject: subject.clone(),
                        issued_before_unix: now_ms / 1000 + 1,
                    },
                    reason: r.reason.clone(),
                };
                &resolved
            }
            _ => r,
        };
        let ev = self.log.append_revocation(r, now_ms)?;
        metrics::counter!("lattice_cp_revocations_total").increment(1);
        tracing::info!(seq = ev.seq, target = %r.target, "revocation committed");
        if matches!(r.target, Target::Cache(_)) {
            // No longer a holder of any secret.
            self.reconcile_secrets()?;
        }
        // Revoking the policy signer must not leave the caches unable to take
        // any later release: re-sign the policy in force with a new key now.
        if self.ensure_policy_signer()? {
            let (info, files) = self.policy.get(&self.log, 0)?;
            self.policy.release(
                &self.log,
                &self.clock,
                policy::NewRelease {
                    files,
                    message: format!(
                        "v{} re-signed: the policy signing key was revoked",
                        info.version
                    ),
                    pushed_by: &self.id,
                    approved_by: None,
                    rollback_of: info.version,
                    lockout_check: None,
                    base_version: None,
                },
            )?;
        }
        Ok(ev)
    }

    pub fn cache_record(&self, id: &SpiffeId) -> Result<Option<CacheRecord>, Error> {
        match self.store.get(T_CACHES, id.as_str().as_bytes())? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    pub fn caches(&self) -> Result<Vec<CacheRecord>, Error> {
        self.store
            .scan_prefix(T_CACHES, b"", 100_000)?
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::Corrupt(e.to_string())))
            .collect()
    }

    /// Issues a cache's three certificates and records them durably.
    pub fn certify_cache(
        &self,
        cache_id: &SpiffeId,
        csrs: &lattice_shared::proto::CacheCsrs,
        hpke_public_key: &[u8],
    ) -> Result<CacheRecord, Error> {
        if !hpke_public_key.is_empty() {
            lattice_shared::envelope::check_public_key(hpke_public_key).map_err(|_| {
                Error::InvalidArgument("hpke_public_key is not an X25519 public key".into())
            })?;
        }
        if self.log.revocations().is_cache_revoked(cache_id) {
            return Err(Error::Denied(format!("{cache_id} has been revoked")));
        }
        let now = self.clock.now();
        let ttl = Duration::from_secs(self.cfg.cache_cert_ttl_hours * 3600);
        let ca_cert = self
            .root
            .issue(&csrs.ca_csr, cache_id, Profile::IntermediateCa, now, ttl)?;
        let tls_cert =
            self.root
                .issue(&csrs.tls_csr, cache_id, Profile::TlsServerClient, now, ttl)?;
        let signing =
            self.root
                .issue(&csrs.signing_csr, cache_id, Profile::JwtSigning, now, ttl)?;
        let previous = self.cache_record(cache_id)?;
        let mut signing_certs: Vec<Vec<u8>> = previous
            .as_ref()
            .map(|r| r.signing_certs.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                lattice_shared::pki::inspect(c)
                    .map(|i| i.not_after > now)
                    .unwrap_or(false)
            })
            .collect();
        signing_certs.push(signing);
        // Bounded whatever a cache does: the newest few stay verifiable.
        let excess = signing_certs.len().saturating_sub(MAX_SIGNING_CERTS);
        signing_certs.drain(..excess);
        let hpke_public_key = if hpke_public_key.is_empty() {
            previous
                .as_ref()
                .map(|p| p.hpke_public_key.clone())
                .unwrap_or_default()
        } else {
            hpke_public_key.to_vec()
        };
        let record = CacheRecord {
            id: cache_id.clone(),
            hpke_public_key,
            enrolled_at_unix: previous
                .map(|p| p.enrolled_at_unix)
                .unwrap_or_else(|| unix_secs(now)),
            ca_cert,
            tls_cert,
            signing_certs,
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.store
            .put(T_CACHES, cache_id.as_str().as_bytes(), &bytes)?;
        metrics::counter!("lattice_cp_cache_certifications_total").increment(1);
        Ok(record)
    }
}

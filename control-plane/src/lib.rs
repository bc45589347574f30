//! The control plane: root of trust. It owns the root CA (key sealed at rest),
//! the one-time join tokens, the registry of enrolled caches and their signing
//! keys, and serves the `ControlPlane` (caches) and `Admin` (operators) APIs.
//! This file builds and stops the [`App`]; each concern has its own module.

mod admin;
pub mod admin_trail;
mod api;
mod approval;
pub mod audit_log;
mod ca;
mod config;
pub mod detect;
mod error;
pub mod event_log;
pub mod install;
mod join;
mod policy;
mod registry;
mod revoke;
pub mod rotation;
mod secrets;
mod sync;
/// Parsers of peer input, for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub use crate::sync::fuzzing;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use lattice_shared::clock::SharedClock;
use lattice_shared::id::{HostName, SpiffeId, TrustDomain};
use lattice_shared::net::AuthGuardLayer;
use lattice_shared::pki::{Authority, CertInfo, TrustBundle};
use lattice_shared::proto::admin_server::AdminServer;
use lattice_shared::proto::control_plane_server::ControlPlaneServer;
use lattice_shared::seal::KeyVault;
use lattice_shared::store::{SharedStore, Write};
use lattice_shared::tls::ReloadableCert;
use lattice_shared::{limits, pem};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use ca::AdminFiles;
pub use config::{Config, KmsConfig, KmsKind};
pub use error::Error;
pub use join::NewJoinToken;
pub use policy::Released;
pub use registry::{CacheCsrs, CacheRecord};
pub use secrets::{SecretRecord, VersionRecord};

/// Key-encoding version of the control plane's store.
pub const SCHEMA_VERSION: u32 = 1;

/// What the control plane is given from outside.
#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
    pub listener: TcpListener,
    /// What the data directory held before it was opened
    /// ([`install::open_data_dir`]).
    pub install: lattice_shared::install::Found,
}

/// Shared state behind every handler.
#[derive(Debug)]
pub(crate) struct State {
    pub cfg: Config,
    pub td: TrustDomain,
    pub id: SpiffeId,
    pub clock: SharedClock,
    pub store: SharedStore,
    pub root: Authority,
    vault: Arc<dyn KeyVault>,
    tls_cert: Arc<ReloadableCert>,
    tls_info: std::sync::Mutex<CertInfo>,
    /// The ordered event log and the revocations derived from it.
    pub log: Arc<event_log::EventLog>,
    /// Policy releases and the engine in force.
    pub policy: policy::Policies,
    pub links: sync::Links,
    /// Freshness checkpoints for the caches to relay.
    pub checkpoints: sync::Checkpoints,
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
    /// Denied admin calls recorded per principal (a trail write each).
    pub denials: admin::DenialLimiter,
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
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    kill: watch::Sender<bool>,
    server: JoinHandle<()>,
    renewer: JoinHandle<()>,
}

impl App {
    pub async fn build(mut cfg: Config, deps: Deps) -> Result<App, Error> {
        cfg.validate().map_err(Error::Config)?;
        if cfg.advertise.is_empty() {
            cfg.advertise = HostName::defaults_for(deps.listener.local_addr()?);
        }
        if let Some(ms) = cfg.max_staleness_ms {
            tracing::warn!(
                max_staleness_ms = ms,
                "max_staleness_ms is retired at the control plane and ignored: each cache reports the bound it enforces (set it in the cache's configuration)"
            );
        }
        let td = cfg.trust_domain.clone();
        let id = cfg.id().map_err(|e| Error::Config(e.to_string()))?;
        lattice_shared::store::check_schema(&*deps.store, "control-plane", SCHEMA_VERSION)?;
        if !deps.install.may_create() && !ca::has_root(&deps.store)? {
            return Err(install::no_root(&deps.install, &cfg.data_dir));
        }
        let root = ca::load_or_create_root(&cfg, &td, &deps.clock, &deps.store, &deps.vault)?;
        install::check_root(&deps.install, td.as_str(), root.cert_der())?;
        let bundle = Arc::new(TrustBundle::new(td.clone(), root.cert_der().to_vec())?);

        // The control plane's own TLS certificate: issued afresh at each start
        // and renewed at half-life; its key never touches the disk.
        let tls_cert = ReloadableCert::empty();
        let tls_info = ca::issue_own_tls(&root, &id, &cfg.advertise, &deps.clock, &tls_cert)?;

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
        let kms = cfg.kms.open(
            &cfg.data_dir,
            match &deps.install {
                lattice_shared::install::Found::Fresh => None,
                lattice_shared::install::Found::Unrecorded => Some(0),
                lattice_shared::install::Found::Recorded(r) => Some(r.kek_versions),
            },
        )?;
        let kek_versions = if cfg.kms.is_local() {
            kms.current_version()
                .map_err(|e| Error::Kms(e.to_string()))?
        } else {
            0
        };
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
            vault: deps.vault.clone(),
            tls_cert: tls_cert.clone(),
            tls_info: std::sync::Mutex::new(tls_info),
            log: log.clone(),
            policy,
            links: sync::Links::default(),
            checkpoints: sync::Checkpoints::default(),
            stopping: rx.clone(),
            denials: admin::DenialLimiter::default(),
        });
        std::fs::create_dir_all(&state.cfg.data_dir)?;
        let root_pem = state.cfg.data_dir.join("root.crt");
        lattice_shared::seal::write_file_atomic(
            &root_pem,
            pem::encode("CERTIFICATE", state.root.cert_der()).as_bytes(),
            false,
        )?;
        state.ensure_admin_files(
            &AdminFiles::in_dir(&state.cfg.data_dir.join("admin")),
            state.cfg.reissue_bootstrap,
        )?;
        // From here on this directory is an installation: nothing in it is
        // generated again.
        install::record(
            &state.cfg.data_dir,
            &deps.install,
            state.td.as_str(),
            state.root.cert_der(),
            kek_versions,
            u64::try_from(lattice_shared::clock::unix_secs(state.clock.now())).unwrap_or(0),
        )?;
        tokio::spawn(audit_log::run_committer(Arc::downgrade(&state), audit_rx));
        // Finish any distribution a crash interrupted.
        state.reconcile_secrets()?;
        state
            .audit_log
            .sign_head(&state.policy.signer(), state.clock.now_unix_ms())?;

        let tls = lattice_shared::tls::server_config(
            bundle,
            deps.clock.clone(),
            tls_cert,
            Some(Arc::new(RevocationCheck(log))),
        )?;
        let addr = deps.listener.local_addr()?;
        let (kill, kill_rx) = watch::channel(false);
        let incoming = lattice_shared::net::tls_incoming(deps.listener, tls, kill_rx);
        let svc = api::Service {
            state: state.clone(),
        };
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
            .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(limits::HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(limits::HTTP2_KEEPALIVE_TIMEOUT))
            .timeout(limits::RPC_TIMEOUT)
            .layer(AuthGuardLayer::new(api::OPEN_PATHS))
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
                                st.audit_log.sign_head(&st.policy.signer(), st.clock.now_unix_ms())
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
    ) -> Result<NewJoinToken, Error> {
        join::create(&self.state, id, ttl)
    }

    /// Grants a cache custody of its region's secrets as the control plane
    /// itself, recorded as granted by `by`: the in-process form of
    /// `Admin.GrantCustody` for harnesses, without an admin decision.
    pub fn grant_custody(&self, cache_id: &SpiffeId, by: &SpiffeId) -> Result<u32, Error> {
        Ok(self.state.grant_custody(cache_id, by, None)?.1)
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
    ) -> Result<Released, Error> {
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

    /// The control plane's own id.
    pub fn id(&self) -> &SpiffeId {
        &self.state.id
    }
    pub fn config(&self) -> &Config {
        &self.state.cfg
    }
    pub fn root_cert_der(&self) -> &[u8] {
        self.state.root.cert_der()
    }
    /// Now on the control plane's clock, in Unix ms.
    pub fn now_ms(&self) -> i64 {
        self.state.clock.now_unix_ms()
    }
    /// The store, for tests that tamper with what it holds.
    pub fn store(&self) -> &SharedStore {
        &self.state.store
    }

    /// The ordered event log (head, events; tests append forged ones).
    pub fn event_log(&self) -> &event_log::EventLog {
        &self.state.log
    }

    /// The version of the policy in force.
    pub fn policy_version(&self) -> u64 {
        self.state.policy.current().version()
    }
    /// Every release, oldest first.
    pub fn policy_history(&self) -> Vec<Released> {
        self.state.policy.history()
    }
    /// The certificate (DER) policy releases are signed with now.
    pub fn policy_signer_cert(&self) -> Vec<u8> {
        self.state.policy.signer_cert()
    }

    /// The tamper-evident audit log (entries, size, heads).
    pub fn audit_log(&self) -> &audit_log::AuditLog {
        &self.state.audit_log
    }
    /// Appends an audit record durably; returns its index.
    pub fn audit(&self, record: &impl Serialize) -> Result<u64, Error> {
        self.state.audit(record)
    }
    /// Signs a tree head over the audit log as it stands.
    pub fn sign_audit_head(&self) -> Result<(), Error> {
        self.state
            .audit_log
            .sign_head(&self.state.policy.signer(), self.state.clock.now_unix_ms())
            .map(|_| ())
    }
    /// The oldest `limit` records of the admin trail.
    pub fn admin_trail(&self, limit: u32) -> Result<Vec<admin_trail::AdminRecord>, Error> {
        admin_trail::list(&self.state, limit)
    }
    /// Alerts raised from now on.
    pub fn subscribe_alerts(&self) -> tokio::sync::broadcast::Receiver<detect::Alert> {
        self.state.alerts.subscribe()
    }

    pub fn secret_record(&self, name: &str) -> Result<SecretRecord, Error> {
        self.state.secret_record(name)
    }
    /// The plaintext of a secret version (tests compare it with what caches serve).
    pub fn open_secret_version(
        &self,
        name: &str,
        version: u64,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, Error> {
        self.state.open_secret_version(name, version)
    }
    /// Runs the rotations that are due now (the timer's work, on demand).
    pub async fn run_due_rotations(&self) {
        rotation::run_due(&self.state).await;
    }

    /// An admin certificate for the key in `csr_der`, carrying `attrs`.
    pub fn issue_admin_cert(
        &self,
        csr_der: &[u8],
        id: &SpiffeId,
        attrs: &lattice_shared::policy::AdminAttributes,
        ttl: Duration,
    ) -> Result<Vec<u8>, Error> {
        self.state.issue_admin_cert(csr_der, id, attrs, ttl)
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.renewer.abort();
        lattice_shared::net::stop_server(self.server, &self.kill).await;
    }
}

impl State {
    /// Appends an audit record durably (a signed head follows at least every
    /// `audit_log::HEAD_EVERY` entries). Returns its index.
    pub fn audit(&self, record: &impl Serialize) -> Result<u64, Error> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Corrupt(e.to_string()))?;
        let (index, head_due) = self.audit_log.append(&bytes)?;
        if head_due {
            self.audit_log
                .sign_head(&self.policy.signer(), self.clock.now_unix_ms())?;
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
}

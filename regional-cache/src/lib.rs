//! The regional cache: near the agents. It holds an intermediate CA for its
//! region and a JWT signing key (both certified by the control plane, both
//! generated here and sealed at rest), enrols agents, renews their
//! certificates and mints short-lived, scope-limited tokens.
//!
//! This file builds and stops the cache ([`App`]) and answers the few
//! questions tests and the CLI ask of a running one.

mod api;
mod audit;
pub mod authz;
mod call;
mod config;
mod error;
mod identity;
mod issued;
mod ops;
pub mod outbox;
mod replica;
mod secrets;
mod sync;
mod watch;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lattice_shared::clock::SharedClock;
use lattice_shared::id::{HostName, RegionId, SpiffeId};
use lattice_shared::net::AuthGuardLayer;
use lattice_shared::pki::{CertInfo, TrustBundle};
use lattice_shared::policy::Engine;
use lattice_shared::proto::control_plane_client::ControlPlaneClient;
use lattice_shared::revocation::RevocationSet;
use lattice_shared::seal::KeyVault;
use lattice_shared::store::SharedStore;
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use lattice_shared::{limits, pem};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub use crate::audit::{AuditEvent, AuditSink};
use crate::authz::PolicyAuthorizer;
pub use crate::config::{AuditMode, Config, MAX_LEASE_TTL_SECS};
pub use crate::error::{Error, Refused};
pub use crate::identity::Identity;
use crate::replica::Replica;
pub use crate::watch::{
    MAX_PER_FOLLOWER as MAX_WATCHES_PER_FOLLOWER, MAX_STREAMS as MAX_WATCH_STREAMS,
};

/// Parsers of peer and disk input, for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub use crate::replica::fuzzing;

pub const SCHEMA_VERSION: u32 = 1;

/// A client of the control plane at `addr` on a new (lazily dialled)
/// channel.
fn cp_client(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<ControlPlaneClient<Channel>, Error> {
    Ok(ControlPlaneClient::new(
        lattice_shared::net::channel(addr, tls).map_err(|e| Error::ControlPlane(e.to_string()))?,
    )
    .max_decoding_message_size(limits::MAX_SYNC_MESSAGE_BYTES))
}

impl State {
    /// The control plane client (cheap: channels are shared handles).
    pub(crate) fn cp(&self) -> ControlPlaneClient<Channel> {
        self.cp.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the control plane channel by a new one, so that the next
    /// call dials a new TCP connection: a link found dead may sit on a flow
    /// that was black-holed (a lost NAT or conntrack entry, a load-balancer
    /// failover) while new connections would work, and the old channel
    /// would keep reusing it.
    pub(crate) fn redial_cp(&self) {
        match cp_client(self.cfg.control_plane, self.cp_tls.clone()) {
            Ok(c) => *self.cp.write().unwrap_or_else(|p| p.into_inner()) = c,
            Err(e) => tracing::warn!(error = %e, "re-dialling the control plane failed"),
        }
    }
}

#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
    pub listener: TcpListener,
    /// Receives a record of every issuance and refusal (the audit trail).
    pub audit: Option<Arc<dyn AuditSink>>,
}

#[derive(Debug)]
pub(crate) struct State {
    pub cfg: Config,
    pub id: SpiffeId,
    pub region: RegionId,
    pub clock: SharedClock,
    pub store: SharedStore,
    vault: Arc<dyn KeyVault>,
    pub bundle: Arc<TrustBundle>,
    identity: RwLock<Arc<Identity>>,
    tls_cert: Arc<ReloadableCert>,
    /// Signing certificates of every cache, as last fetched from the control plane.
    cp_signing: RwLock<Vec<Vec<u8>>>,
    /// Our own signing certificates still valid (the current one last).
    own_signing: RwLock<Vec<Vec<u8>>>,
    jwks_json: RwLock<Arc<String>>,
    /// Only our own signing keys (`/.well-known/issuer-jwks.json`).
    issuer_jwks_json: RwLock<Arc<String>>,
    /// The control plane, over a channel that [`State::redial_cp`] replaces
    /// when the link is found dead.
    cp: RwLock<ControlPlaneClient<Channel>>,
    cp_tls: Arc<rustls::ClientConfig>,
    /// The policy release in force, fed by the sync stream.
    pub policy: Arc<PolicyAuthorizer>,
    /// Freshness, revocations and secrets: the replica of the control
    /// plane's log.
    pub replica: Replica,
    /// Secrets' DEKs are sealed to this key (private half sealed at rest).
    pub hpke: lattice_shared::envelope::HpkeKeyPair,
    pub audit: Option<Arc<dyn AuditSink>>,
    /// Audit records on their way to the control plane (durable).
    pub outbox: Arc<outbox::Outbox>,
    /// The replica's persister and outbox acks run here, never on the
    /// blocking pool that request work shares.
    pub persist: lattice_shared::persist::Worker,
    /// Live tokens issued, for re-evaluation when an agent's claims change.
    pub issued: issued::Issued,
    /// Events each agent reported in the current window (`ReportAudit`).
    pub report_quota: moka::sync::Cache<SpiffeId, Arc<std::sync::Mutex<(u64, usize)>>>,
    /// Turns true when the cache stops; long-lived streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Woken when our own CA or signing certificate is revoked: renew now,
    /// not at the next check.
    pub renew_now: tokio::sync::Notify,
    /// Open `WatchRevocations` streams per follower.
    pub watchers: watch::Watchers,
}

/// Refuses revoked agents, certificates and issuing caches at the handshake.
#[derive(Debug)]
struct RevocationCheck(std::sync::Weak<State>);

impl lattice_shared::tls::PeerCheck for RevocationCheck {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        match self.0.upgrade() {
            Some(state) => state.replica.check_cert(leaf, issuer),
            None => Err("cache is shutting down".into()),
        }
    }
}

#[derive(Debug)]
pub struct App {
    state: Arc<State>,
    addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    kill: tokio::sync::watch::Sender<bool>,
    server: JoinHandle<()>,
    background: JoinHandle<()>,
    sync_task: JoinHandle<()>,
    outbox_writer: outbox::Writer,
}

impl App {
    pub async fn build(mut cfg: Config, deps: Deps) -> Result<App, Error> {
        let region = cfg.validate().map_err(Error::Config)?;
        if cfg.advertise.is_empty() {
            cfg.advertise = HostName::defaults_for(deps.listener.local_addr()?);
        }
        let id = cfg.id.clone();
        let root_der = pem::read_certs(&cfg.root_ca)
            .map_err(Error::Config)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("root_ca holds no certificate".into()))?;
        let bundle = Arc::new(TrustBundle::new(id.trust_domain().clone(), root_der)?);
        lattice_shared::store::check_schema(&*deps.store, "regional-cache", SCHEMA_VERSION)?;

        let tls_cert = ReloadableCert::empty();
        let hpke = identity::load_or_create_hpke(&deps.store, &deps.vault)?;
        let (identity, tls_der, tls_key) = match State::load_identity(&deps.store, &deps.vault)? {
            Some(loaded) => loaded,
            None => {
                let join_token = cfg.join_token.as_ref().ok_or(Error::NeedsJoinToken)?;
                identity::Enrolment {
                    id: &id,
                    names: &cfg.advertise,
                    control_plane: cfg.control_plane,
                    join_token,
                    bundle: &bundle,
                    clock: &deps.clock,
                    store: &deps.store,
                    vault: &deps.vault,
                    hpke: &hpke,
                }
                .run()
                .await?
            }
        };
        if deps.clock.now() > identity.tls.not_after {
            return Err(Error::Config(format!(
                "the stored certificates of {id} expired at {:?}; re-enrol with a new join token (remove {})",
                identity.tls.not_after,
                cfg.data_dir.display()
            )));
        }
        tls_cert.replace(vec![tls_der], &tls_key)?;
        drop(tls_key);

        let cp_tls = lattice_shared::tls::client_config(
            bundle.clone(),
            deps.clock.clone(),
            ExpectedServer::ControlPlane,
            Some(tls_cert.clone()),
        )?;
        let cp = RwLock::new(cp_client(cfg.control_plane, cp_tls.clone())?);
        let policy = Arc::new(PolicyAuthorizer::default());
        let own_signing = vec![identity.signing_cert.clone()];
        let replica = Replica::load(
            id.clone(),
            &deps.store,
            deps.clock.clone(),
            cfg.max_staleness(),
            Some(replica::PolicyTrust {
                root_der: bundle.root_der().to_vec(),
                trust_domain: bundle.trust_domain().clone(),
                authorizer: policy.clone(),
            }),
        )?;
        let outbox = Arc::new(outbox::Outbox::open(
            deps.store.clone(),
            cfg.audit_outbox_max_records,
            cfg.audit_mode.gather(),
            deps.clock.clone(),
        )?);
        // Before anything that could issue: every answer waits on it.
        let outbox_writer = outbox
            .start_writer()
            .map_err(|e| Error::Unavailable(format!("starting the audit writer: {e}")))?;
        let persist = lattice_shared::persist::Worker::start("cache-persist")
            .map_err(|e| Error::Unavailable(format!("starting the persister: {e}")))?;
        let (shutdown, mut rx) = tokio::sync::watch::channel(false);
        let state = Arc::new(State {
            outbox: outbox.clone(),
            persist,
            watchers: watch::Watchers::default(),
            report_quota: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(60))
                .build(),
            issued: issued::Issued::new(std::time::Duration::from_secs(
                cfg.token_max_ttl_secs.max(1),
            )),
            stopping: rx.clone(),
            renew_now: tokio::sync::Notify::new(),
            cfg,
            id,
            region,
            clock: deps.clock.clone(),
            store: deps.store,
            vault: deps.vault,
            bundle: bundle.clone(),
            identity: RwLock::new(Arc::new(identity)),
            tls_cert: tls_cert.clone(),
            cp_signing: RwLock::new(Vec::new()),
            own_signing: RwLock::new(own_signing),
            jwks_json: RwLock::new(Arc::new(String::new())),
            issuer_jwks_json: RwLock::new(Arc::new(String::new())),
            cp,
            cp_tls,
            policy,
            replica,
            hpke,
            audit: deps.audit,
        });
        state.rebuild_jwks();
        // The first JWKS fetch happens in the background task: a control
        // plane that is unreachable now must not delay serving.

        let tls = lattice_shared::tls::server_config(
            bundle,
            deps.clock.clone(),
            tls_cert,
            Some(Arc::new(RevocationCheck(Arc::downgrade(&state)))),
        )?;
        let addr = deps.listener.local_addr()?;
        let (kill, kill_rx) = tokio::sync::watch::channel(false);
        let incoming = lattice_shared::net::tls_incoming(deps.listener, tls, kill_rx);
        let routes = api::routes(state.clone(), addr.port());
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .max_concurrent_streams(limits::MAX_CONCURRENT_STREAMS)
            .http2_max_header_list_size(limits::MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(limits::HTTP2_KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(limits::HTTP2_KEEPALIVE_TIMEOUT))
            .timeout(limits::RPC_TIMEOUT)
            .layer(AuthGuardLayer::new(api::OPEN_PATHS))
            .add_routes(routes);
        let server = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(error = %e, "cache server failed");
            }
        });
        let background = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut renew =
                    tokio::time::interval(Duration::from_secs(state.cfg.renew_check_secs));
                let mut jwks =
                    tokio::time::interval(Duration::from_secs(state.cfg.jwks_refresh_secs));
                let mut publish = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = publish.tick() => sync::publish_metrics(&state),
                        _ = async { tokio::select! {
                            _ = renew.tick() => {},
                            _ = state.renew_now.notified() => {},
                        } } => {
                            if let Err(e) = state.renew_if_due().await {
                                tracing::warn!(error = %e, "certificate renewal failed; will retry");
                            }
                        }
                        _ = jwks.tick() => {
                            if let Err(e) = state.refresh_jwks().await {
                                tracing::debug!(error = %e, "JWKS refresh failed; will retry");
                            }
                        }
                    }
                }
            })
        };
        let sync_task = tokio::spawn(sync::run(state.clone()));
        tracing::info!(%addr, cache_id = %state.id, "cache listening");
        Ok(App {
            state,
            addr,
            shutdown,
            kill,
            server,
            background,
            sync_task,
            outbox_writer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.background.abort();
        self.sync_task.abort();
        let _ = self.sync_task.await;
        let _ = self.background.await;
        // Requests still in their grace period get their records written;
        // then what was recorded and not yet written goes to disk.
        lattice_shared::net::stop_server(self.server, &self.kill).await;
        let outbox = self.state.outbox.clone();
        let writer = self.outbox_writer;
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || {
            writer.stop();
            outbox.flush_now()
        })
        .await
        {
            tracing::error!(error = %e, "writing the last audit records failed");
        }
    }

    // What tests, the harness and the CLI may ask of a running cache.

    pub fn id(&self) -> &SpiffeId {
        &self.state.id
    }
    /// The current keys and certificates.
    pub fn identity(&self) -> Arc<Identity> {
        self.state.identity()
    }
    /// The server certificate and key this cache presents (the adversary
    /// tests play a compromised cache with it).
    pub fn server_cert(&self) -> Arc<ReloadableCert> {
        self.state.tls_cert.clone()
    }
    /// The JWKS this cache publishes.
    pub fn jwks_json(&self) -> Arc<String> {
        self.state.jwks_json()
    }
    /// Fetches every cache's signing keys from the control plane now.
    pub async fn refresh_jwks(&self) -> Result<(), Error> {
        self.state.refresh_jwks().await
    }
    /// Renews the certificates when past half-life; returns whether it did.
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        self.state.renew_if_due().await
    }
    /// The policy release in force (0: none yet).
    pub fn policy_version(&self) -> u64 {
        self.state.policy.version()
    }
    pub fn policy_in_force(&self) -> Option<Arc<Engine>> {
        self.state.policy.current()
    }
    /// Policy decisions currently cached.
    pub fn cached_decisions(&self) -> u64 {
        self.state.policy.cached_decisions()
    }
    /// L, the staleness bound this cache enforces.
    pub fn max_staleness(&self) -> Duration {
        self.state.replica.max_staleness()
    }
    /// The last sequence applied durably.
    pub fn applied(&self) -> u64 {
        self.state.replica.applied()
    }
    pub fn subscribe_applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.replica.subscribe_applied()
    }
    /// Sequences enforced in memory (ahead of `applied` until durable).
    pub fn subscribe_enforced(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.replica.subscribe_enforced()
    }
    pub fn subscribe_fresh(&self) -> tokio::sync::watch::Receiver<Option<Duration>> {
        self.state.replica.subscribe_fresh()
    }
    /// Whether the cache is fresh: its last proof is at most L old.
    pub fn is_fresh(&self) -> bool {
        self.state.replica.is_fresh()
    }
    /// Sends a freshness ping now instead of at the next tick.
    pub fn ping_now(&self) {
        self.state.replica.ping_now()
    }
    /// Whether the sync link to the control plane is up.
    pub fn connected(&self) -> bool {
        self.state.replica.connected()
    }
    pub fn revocations(&self) -> RevocationSet {
        self.state.replica.revocations()
    }
    /// The secrets (name, versions) held here, sealed.
    pub fn secrets_held(&self) -> Vec<(String, Vec<u64>)> {
        self.state.replica.secrets.held()
    }
    /// The audit outbox (records on their way to the control plane).
    pub fn outbox(&self) -> Arc<outbox::Outbox> {
        self.state.outbox.clone()
    }
    /// Publishes the staleness, applied-sequence and freshness gauges now.
    pub fn publish_metrics(&self) {
        sync::publish_metrics(&self.state);
    }
}

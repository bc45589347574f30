//! The in-process lattice: a control plane, N regional caches and M edge
//! agents on 127.0.0.1 with ephemeral ports, sled stores in one directory and
//! one shared clock. Each cache reaches the control plane through its own
//! fault proxy. `lattice dev`, the integration tests and the benchmarks all
//! build the same thing through the same `App::build` calls the binaries use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use lattice_control_plane as cp;
use lattice_edge_agent as agent;
use lattice_regional_cache as cache;
use lattice_shared::clock::SharedClock;
use lattice_shared::id::SpiffeId;
use lattice_shared::revocation::{Revocation, Target};
use lattice_shared::seal::LocalKeyFile;
use lattice_shared::store::{SharedStore, SledStore};
use tokio::net::TcpListener;

use crate::faults::{FaultProxy, Mode};

pub const TRUST_DOMAIN: &str = "lattice.local";
/// How long the harness waits for an expected event before failing.
pub const WAIT: Duration = Duration::from_secs(20);

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// (region, name) of each cache.
    pub caches: Vec<(String, String)>,
    /// (region, name) of each agent; an agent enrols at the first cache of
    /// its region.
    pub agents: Vec<(String, String)>,
    /// Audiences agents may mint for, with their scopes: the harness
    /// releases the default policy bundle with these as entity data.
    pub audiences: Vec<Audience>,
    /// Secrets every agent may lease (listed with the label "agents").
    pub secrets: Vec<String>,
    /// A bundle to release instead (then `audiences` and `secrets` are unused).
    pub policy: Option<lattice_shared::policy::BundleFiles>,
    /// L, the caches' staleness bound.
    pub max_staleness: Duration,
    /// Record every issuance in memory (`Lattice::audit`), for tests.
    pub record_audit: bool,
    /// Adjusts the control plane's configuration (KMS, rotation, grace).
    pub cp_config: Option<CpConfigFn>,
}

/// A change to the control plane's configuration.
#[derive(Clone)]
pub struct CpConfigFn(pub Arc<dyn Fn(&mut cp::Config) + Send + Sync>);

impl std::fmt::Debug for CpConfigFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CpConfigFn")
    }
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            caches: vec![
                ("eu".into(), "cache-1".into()),
                ("us".into(), "cache-1".into()),
            ],
            agents: vec![("eu".into(), "agent-1".into())],
            audiences: vec![Audience::new("https://api.example.com", &["read", "write"])],
            secrets: Vec::new(),
            policy: None,
            max_staleness: Duration::from_millis(cache::Config::default().max_staleness_ms),
            record_audit: true,
            cp_config: None,
        }
    }
}

/// An audience of the generated bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audience {
    pub name: String,
    pub scopes: Vec<String>,
}

impl Audience {
    pub fn new(name: &str, scopes: &[&str]) -> Self {
        Self {
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The default bundle with `audiences` as its entity data.
pub fn audience_bundle(audiences: &[Audience]) -> lattice_shared::policy::BundleFiles {
    lattice_bundle(audiences, &[])
}

/// The default bundle with these audiences and secrets (leasable by every
/// agent) as its entity data.
pub fn lattice_bundle(
    audiences: &[Audience],
    secrets: &[String],
) -> lattice_shared::policy::BundleFiles {
    let entities: Vec<serde_json::Value> = audiences
        .iter()
        .map(|a| {
            serde_json::json!({
                "uid": {"type": "Lattice::Audience", "id": a.name},
                "attrs": {"scopes": a.scopes, "labels": []},
                "parents": []
            })
        })
        .chain(secrets.iter().map(|s| {
            serde_json::json!({
                "uid": {"type": "Lattice::Secret", "id": s},
                "attrs": {"labels": ["agents"]},
                "parents": []
            })
        }))
        .collect();
    let default = lattice_shared::policy::default_bundle();
    lattice_shared::policy::BundleFiles::from_files(default.iter().map(|(k, v)| {
        let v = if k == lattice_shared::policy::ENTITIES_FILE {
            serde_json::Value::Array(entities.clone()).to_string()
        } else if k == lattice_shared::policy::TESTS_FILE {
            "[]".to_string()
        } else {
            v.to_string()
        };
        (k.to_string(), v)
    }))
    .expect("the default bundle's file names are valid") // same names as the default
}

/// Every issuance and refusal of every cache, in order (the tests' audit trail).
#[derive(Debug, Default)]
pub struct AuditLog(std::sync::Mutex<Vec<cache::AuditEvent>>);

impl AuditLog {
    pub fn events(&self) -> Vec<cache::AuditEvent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl cache::AuditSink for AuditLog {
    fn record(&self, event: cache::AuditEvent) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(event);
    }
}

fn open_store(dir: &Path) -> anyhow::Result<(Arc<SledStore>, Arc<LocalKeyFile>)> {
    // A restart's wait for sled's lock is the store's own (`SledStore::open`).
    let store =
        SledStore::open(&dir.join("db")).with_context(|| format!("opening {}", dir.display()))?;
    let vault = Arc::new(LocalKeyFile::open_or_create(&dir.join("kek.key"))?);
    Ok((store, vault))
}

async fn listener(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    // Rebinding the port of a server that just stopped can race its close.
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if tries < 100 && addr.port() != 0 => {
                tries += 1;
                tracing::debug!(error = %e, "port busy, retrying");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits until nothing else holds `store` (its tasks have ended), so that
/// sled's lock is free for a restart.
async fn release(store: SharedStore) -> anyhow::Result<()> {
    let weak = Arc::downgrade(&store);
    drop(store);
    for _ in 0..1000 {
        if weak.strong_count() == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(anyhow!("store still in use after shutdown"))
}

pub struct CacheNode {
    pub cfg: cache::Config,
    pub app: Option<cache::App>,
    store: Option<SharedStore>,
    /// The link from this cache to the control plane.
    pub link: FaultProxy,
}

impl CacheNode {
    pub fn app(&self) -> &cache::App {
        self.app.as_ref().expect("cache is running") // callers use running caches only
    }
    pub fn addr(&self) -> SocketAddr {
        self.cfg.listen
    }
    pub fn id(&self) -> SpiffeId {
        self.cfg.id.clone()
    }

    /// Waits until this cache has applied (durably) every event up to `seq`.
    pub async fn wait_applied(&self, seq: u64) -> anyhow::Result<()> {
        let mut rx = self.app().subscribe_applied();
        tokio::time::timeout(WAIT, rx.wait_for(|a| *a >= seq))
            .await
            .map_err(|_| anyhow!("{} did not apply {seq} within {WAIT:?}", self.cfg.id))?
            .map_err(|_| anyhow!("cache stopped"))?;
        Ok(())
    }

    /// Waits until this cache enforces every event up to `seq` (in memory;
    /// durability and the ack follow).
    pub async fn wait_enforced(&self, seq: u64) -> anyhow::Result<()> {
        let mut rx = self.app().subscribe_enforced();
        tokio::time::timeout(WAIT, rx.wait_for(|a| *a >= seq))
            .await
            .map_err(|_| anyhow!("{} did not enforce {seq} within {WAIT:?}", self.cfg.id))?
            .map_err(|_| anyhow!("cache stopped"))?;
        Ok(())
    }

    /// Waits until this cache is fresh on its own clock, pinging at once.
    pub async fn wait_fresh(&self) -> anyhow::Result<()> {
        let sync = self.app();
        let mut rx = sync.subscribe_fresh();
        let deadline = tokio::time::Instant::now() + WAIT;
        while !sync.is_fresh() {
            if tokio::time::Instant::now() > deadline {
                return Err(anyhow!(
                    "{} did not become fresh within {WAIT:?}",
                    self.cfg.id
                ));
            }
            sync.ping_now();
            let _ = tokio::time::timeout(Duration::from_millis(100), rx.changed()).await;
        }
        Ok(())
    }

    /// Silently cuts the link to the control plane.
    pub fn partition(&self) {
        self.link.set(Mode::BlackHole);
    }
    pub fn heal(&self) {
        self.link.set(Mode::Pass);
    }
    /// Silently cuts the connections to the control plane open now; new
    /// ones work (a lost NAT entry, a load-balancer failover).
    pub fn black_hole_existing_connections(&self) {
        self.link.black_hole_existing();
    }
}

pub struct Lattice {
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub clock: SharedClock,
    pub cp_cfg: cp::Config,
    pub cp: Option<cp::App>,
    cp_store: Option<Arc<SledStore>>,
    pub caches: Vec<CacheNode>,
    pub agents: Vec<Arc<agent::Agent>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    pub audit: Arc<AuditLog>,
    spec: Spec,
}

impl Lattice {
    /// Starts the whole lattice in a fresh temporary directory.
    pub async fn start(spec: Spec, clock: SharedClock) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("lattice-").tempdir()?;
        let dir = tmp.path().to_owned();
        let mut l = Self::start_in(&dir, spec, clock).await?;
        l._tmp = Some(tmp);
        Ok(l)
    }

    /// Starts the whole lattice with its data under `dir`.
    pub async fn start_in(dir: &Path, spec: Spec, clock: SharedClock) -> anyhow::Result<Self> {
        lattice_shared::tls::install_crypto_provider();
        let mut cp_cfg = cp::Config {
            trust_domain: lattice_shared::id::TrustDomain::new(TRUST_DOMAIN)?,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: dir.join("cp"),
            ..cp::Config::default()
        };
        if let Some(adjust) = &spec.cp_config {
            (adjust.0)(&mut cp_cfg);
        }
        let mut l = Lattice {
            dir: dir.to_owned(),
            _tmp: None,
            clock,
            cp_cfg,
            cp: None,
            cp_store: None,
            caches: Vec::new(),
            agents: Vec::new(),
            watchers: Vec::new(),
            audit: Arc::new(AuditLog::default()),
            spec: spec.clone(),
        };
        l.start_cp().await?;
        let bundle = spec
            .policy
            .clone()
            .unwrap_or_else(|| lattice_bundle(&spec.audiences, &spec.secrets));
        l.cp().release_policy(bundle, "harness")?;
        for (region, name) in &spec.caches {
            l.add_cache(region, name).await?;
        }
        l.refresh_jwks().await?;
        for (region, name) in &spec.agents {
            l.add_agent(region, name).await?;
        }
        Ok(l)
    }

    pub fn cp(&self) -> &cp::App {
        self.cp.as_ref().expect("control plane is running") // callers use it while it runs
    }

    pub fn root_pem(&self) -> PathBuf {
        self.cp_cfg.data_dir.join("root.crt")
    }

    /// The control plane's store, for fault injection.
    pub fn cp_sled(&self) -> &SledStore {
        self.cp_store.as_deref().expect("control plane is running") // callers use it while it runs
    }

    async fn start_cp(&mut self) -> anyhow::Result<()> {
        let data = cp::install::open_data_dir(&self.cp_cfg.data_dir)?;
        let store = data.store;
        let l = listener(self.cp_cfg.listen).await?;
        // Keep the port across restarts.
        self.cp_cfg.listen = l.local_addr()?;
        let app = cp::App::build(
            self.cp_cfg.clone(),
            cp::Deps {
                clock: self.clock.clone(),
                store: store.clone(),
                vault: data.vault,
                listener: l,
                install: data.install,
            },
        )
        .await?;
        self.cp = Some(app);
        self.cp_store = Some(store);
        Ok(())
    }

    pub async fn stop_cp(&mut self) -> anyhow::Result<()> {
        if let Some(app) = self.cp.take() {
            app.shutdown().await;
        }
        if let Some(s) = self.cp_store.take() {
            release(s).await?;
        }
        Ok(())
    }

    /// Stops and starts the control plane on the same port and data.
    pub async fn restart_cp(&mut self) -> anyhow::Result<()> {
        self.stop_cp().await?;
        self.start_cp().await
    }

    pub fn join_token(&self, id: &str, ttl: Option<Duration>) -> anyhow::Result<String> {
        let id = SpiffeId::parse(id)?;
        Ok(self.cp().create_join_token(&id, ttl)?.token.to_string())
    }

    pub fn cache_id(region: &str, name: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/cache/{region}/{name}")
    }
    pub fn agent_id(region: &str, name: &str) -> String {
        format!("spiffe://{TRUST_DOMAIN}/agent/{region}/{name}")
    }

    /// Enrols and starts a new cache (behind its own fault proxy to the
    /// control plane), waits until it is fresh and grants it custody of its
    /// region's secrets (as a platform team's custodian would; a fixture).
    pub async fn add_cache(&mut self, region: &str, name: &str) -> anyhow::Result<usize> {
        let i = self.add_cache_without_custody(region, name).await?;
        let id: SpiffeId = Self::cache_id(region, name).parse()?;
        let custodian = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/admin/harness"))?;
        self.cp().grant_custody(&id, &custodian)?;
        Ok(i)
    }

    /// [`Lattice::add_cache`] without the custody grant: the cache serves
    /// tokens and holds no secret.
    pub async fn add_cache_without_custody(
        &mut self,
        region: &str,
        name: &str,
    ) -> anyhow::Result<usize> {
        let token = self.join_token(&Self::cache_id(region, name), None)?;
        self.add_cache_with_token(region, name, token).await
    }

    /// Starts a stock cache that enrols with `token` (made by whoever), and
    /// waits until it is fresh; no custody is granted.
    pub async fn add_cache_with_token(
        &mut self,
        region: &str,
        name: &str,
        token: String,
    ) -> anyhow::Result<usize> {
        self.add_cache_named(region, name, token, Vec::new()).await
    }

    /// [`Lattice::add_cache_with_token`] for a cache that advertises `names`
    /// (its TLS certificate's DNS and IP names).
    pub async fn add_cache_named(
        &mut self,
        region: &str,
        name: &str,
        token: String,
        names: Vec<lattice_shared::id::HostName>,
    ) -> anyhow::Result<usize> {
        let id = Self::cache_id(region, name);
        let link = FaultProxy::start(self.cp_cfg.listen).await?;
        let cfg = cache::Config {
            id: id.parse()?,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: self.dir.join(format!("cache-{region}-{name}")),
            control_plane: link.addr(),
            root_ca: self.root_pem(),
            join_token: Some(lattice_shared::secret::Secret::new(token)),
            max_staleness_ms: u64::try_from(self.spec.max_staleness.as_millis())
                .unwrap_or(u64::MAX),
            advertise: names,
            ..cache::Config::default()
        };
        let mut node = CacheNode {
            cfg,
            app: None,
            store: None,
            link,
        };
        self.start_cache_node(&mut node).await?;
        node.wait_fresh().await?;
        self.caches.push(node);
        Ok(self.caches.len() - 1)
    }

    async fn start_cache_node(&self, node: &mut CacheNode) -> anyhow::Result<()> {
        let (store, vault) = open_store(&node.cfg.data_dir)?;
        let l = listener(node.cfg.listen).await?;
        node.cfg.listen = l.local_addr()?;
        let app = cache::App::build(
            node.cfg.clone(),
            cache::Deps {
                clock: self.clock.clone(),
                store: store.clone(),
                vault,
                listener: l,
                audit: self
                    .spec
                    .record_audit
                    .then(|| self.audit.clone() as Arc<dyn cache::AuditSink>),
            },
        )
        .await?;
        node.app = Some(app);
        node.store = Some(store);
        Ok(())
    }

    /// Has every running cache fetch the JWKS (all caches' keys) now.
    pub async fn refresh_jwks(&self) -> anyhow::Result<()> {
        for c in &self.caches {
            if let Some(app) = &c.app {
                app.refresh_jwks().await?;
            }
        }
        Ok(())
    }

    pub async fn stop_cache(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.caches[i];
        if let Some(app) = node.app.take() {
            app.shutdown().await;
        }
        if let Some(s) = node.store.take() {
            release(s).await?;
        }
        Ok(())
    }

    /// Starts cache `i` again on the same port and data (no join token is
    /// needed the second time). Its link keeps its fault mode.
    pub async fn start_cache(&mut self, i: usize) -> anyhow::Result<()> {
        let mut node = std::mem::replace(
            &mut self.caches[i],
            CacheNode {
                cfg: cache::Config::default(),
                app: None,
                store: None,
                link: FaultProxy::start(self.cp_cfg.listen).await?,
            },
        );
        node.cfg.join_token = None;
        let r = self.start_cache_node(&mut node).await;
        self.caches[i] = node;
        r
    }

    /// Stops and starts cache `i`.
    pub async fn restart_cache(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_cache(i).await?;
        self.start_cache(i).await
    }

    pub fn cache_in(&self, region: &str) -> anyhow::Result<&CacheNode> {
        self.caches
            .iter()
            .find(|c| c.id().region().map(|r| r.as_str()) == Some(region))
            .ok_or_else(|| anyhow!("no cache in region {region}"))
    }

    /// Commits a revocation at the control plane; returns the event.
    pub fn revoke(&self, target: Target) -> anyhow::Result<lattice_shared::proto::LatticeEvent> {
        Ok(self.cp().revoke(&Revocation {
            target,
            reason: "harness".into(),
        })?)
    }

    /// Waits until every running cache has applied `seq`.
    pub async fn wait_all_applied(&self, seq: u64) -> anyhow::Result<()> {
        for c in self.caches.iter().filter(|c| c.app.is_some()) {
            c.wait_applied(seq).await?;
        }
        Ok(())
    }

    /// The configuration an agent of `region` would use (not started).
    pub fn agent_config(&self, region: &str, name: &str, cache_addr: SocketAddr) -> agent::Config {
        agent::Config {
            id: SpiffeId::parse(&Self::agent_id(region, name)).expect("a valid agent id"),
            cache: cache_addr,
            data_dir: self.dir.join(format!("agent-{region}-{name}")),
            root_ca: self.root_pem(),
            join_token: None,
            ..agent::Config::default()
        }
    }

    pub async fn start_agent(&self, cfg: agent::Config) -> Result<agent::Agent, agent::Error> {
        let (store, vault) =
            open_store(&cfg.data_dir).map_err(|e| agent::Error::Config(e.to_string()))?;
        agent::Agent::start(
            cfg,
            agent::Deps {
                clock: self.clock.clone(),
                store,
                vault,
            },
        )
        .await
    }

    /// Creates a join token, enrols and starts an agent at its region's cache.
    pub async fn add_agent(&mut self, region: &str, name: &str) -> anyhow::Result<usize> {
        let token = self.join_token(&Self::agent_id(region, name), None)?;
        self.add_agent_with_token(region, name, token).await
    }

    /// Enrols and starts an agent at its region's cache with `token`; the
    /// agent follows its cache's revocation stream.
    pub async fn add_agent_with_token(
        &mut self,
        region: &str,
        name: &str,
        token: String,
    ) -> anyhow::Result<usize> {
        self.add_agent_configured(region, name, token, |_| {}).await
    }

    /// As [`Lattice::add_agent`], with the agent's configuration adjusted
    /// (its posture or job type, say) before it starts.
    pub async fn add_agent_with(
        &mut self,
        region: &str,
        name: &str,
        adjust: impl FnOnce(&mut agent::Config),
    ) -> anyhow::Result<usize> {
        let token = self.join_token(&Self::agent_id(region, name), None)?;
        self.add_agent_configured(region, name, token, adjust).await
    }

    /// Enrols and starts an agent with `token` and an adjusted configuration.
    pub async fn add_agent_configured(
        &mut self,
        region: &str,
        name: &str,
        token: String,
        adjust: impl FnOnce(&mut agent::Config),
    ) -> anyhow::Result<usize> {
        let cache_addr = self.cache_in(region)?.addr();
        let mut cfg = self.agent_config(region, name, cache_addr);
        cfg.join_token = Some(lattice_shared::secret::Secret::new(token));
        adjust(&mut cfg);
        let a = Arc::new(self.start_agent(cfg).await?);
        let watcher = a.clone();
        self.watchers.push(tokio::spawn(async move {
            watcher.watch_revocations(std::future::pending()).await;
        }));
        let mut watching = a.watching_signal();
        tokio::time::timeout(WAIT, watching.wait_for(|w| *w))
            .await
            .map_err(|_| anyhow!("{} did not open its revocation stream", a.id))??;
        self.agents.push(a);
        Ok(self.agents.len() - 1)
    }

    /// An Admin API client with the control plane's bootstrap admin
    /// credential (role platform-admin).
    pub fn bootstrap_admin(
        &self,
    ) -> anyhow::Result<lattice_shared::proto::admin_client::AdminClient<tonic::transport::Channel>>
    {
        crate::admin::connect(self.cp_cfg.listen, &self.cp().admin_files().dir)
    }

    /// An Admin API client for a new admin `name` with `roles` (and regions),
    /// certified directly by the control plane (no admin decision: a test
    /// fixture, as a platform team's own provisioning would be).
    pub fn admin(
        &self,
        name: &str,
        roles: &[lattice_shared::policy::AdminRole],
        regions: &[&str],
    ) -> anyhow::Result<lattice_shared::proto::admin_client::AdminClient<tonic::transport::Channel>>
    {
        let id = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/admin/{name}"))?;
        let key = lattice_shared::pki::PrivateKey::generate_p256()?;
        let cert = self.cp().issue_admin_cert(
            &key.csr_der()?,
            &id,
            &lattice_shared::policy::AdminAttributes {
                roles: roles.to_vec(),
                regions: regions.iter().map(|r| r.to_string()).collect(),
            },
            Duration::from_secs(86400),
        )?;
        crate::admin::connect_with(
            self.cp_cfg.listen,
            self.cp().root_cert_der().to_vec(),
            vec![cert],
            &key,
        )
    }

    /// Stops everything.
    pub async fn shutdown(mut self) {
        for w in self.watchers.drain(..) {
            w.abort();
            let _ = w.await;
        }
        self.agents.clear();
        for i in 0..self.caches.len() {
            let _ = self.stop_cache(i).await;
        }
        let _ = self.stop_cp().await;
    }
}

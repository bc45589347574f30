//! The edge agent: a device identity whose private key is generated here and
//! never leaves; enrolment at the regional cache with a one-time join token;
//! certificate renewal at half-life; tokens for local AI-agent processes.
//!
//! The agent talks only to caches of its own region, never to the control
//! plane.

pub mod proxy;
pub mod runtime;
pub mod token_cache;
pub mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lattice_shared::clock::{SharedClock, past_half_life};
use lattice_shared::id::{RegionId, Role, SpiffeId};
use lattice_shared::pem;
use lattice_shared::pki::{CertInfo, PkiError, PrivateKey, TrustBundle, Usage};
use lattice_shared::proto::{self as pb, cache_client::CacheClient};
use lattice_shared::revocation::Revocation;
use lattice_shared::seal::{KeyVault, SealError};
use lattice_shared::store::{SharedStore, StoreError, Write};
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

pub const SCHEMA_VERSION: u32 = 1;
const T_IDENTITY: &str = "identity";
const AAD_KEY: &str = "agent/key";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `spiffe://TD/agent/REGION/NAME`.
    pub id: String,
    /// The cache of this agent's region.
    pub cache: SocketAddr,
    pub data_dir: PathBuf,
    /// PEM file with the root CA certificate.
    pub root_ca: PathBuf,
    /// One-time join token for the first start (LATTICE_AGENT_JOIN_TOKEN).
    pub join_token: Option<lattice_shared::secret::Secret>,
    /// Device posture this agent reports with each request, for policy
    /// (reported, not attested: a policy should weigh it accordingly).
    pub posture: lattice_shared::policy::Posture,
    /// The kind of work this agent does (reported), e.g. "inference".
    pub job_type: String,
    pub log_json: bool,
    /// Further caches of the agent's region, tried in this order after
    /// `cache` when it is unreachable or cannot serve (stale).
    pub caches: Vec<SocketAddr>,
    /// Renewal timing of `lattice-agent run`.
    pub renewal: RenewalConfig,
    /// The Workload API socket for local processes.
    pub workload: workload::WorkloadConfig,
    /// The credential-injecting proxy (off unless configured).
    pub proxy: Option<proxy::ProxyConfig>,
    /// Prometheus `/metrics` of `lattice-agent run` (off when unset).
    pub metrics_listen: Option<SocketAddr>,
    /// Keep held tokens across restarts in `DATA_DIR/tokens.sealed`,
    /// sealed with a key derived from the agent's private key. Off:
    /// tokens live in memory only.
    pub token_cache: bool,
}

/// When `run` renews certificates and tokens, and how it backs off.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenewalConfig {
    /// How often the runtime checks what is due (ms).
    pub check_interval_ms: u64,
    /// Renewal happens at half-life minus a random share of the lifetime
    /// up to this fraction, so that a fleet does not renew in step.
    pub jitter: f64,
    /// Failed renewals are retried after 1 s, doubling up to this (ms).
    pub max_backoff_ms: u64,
}

impl Default for RenewalConfig {
    fn default() -> Self {
        Self {
            check_interval_ms: 1000,
            jitter: 0.1,
            max_backoff_ms: 60_000,
        }
    }
}

/// Most caches an agent may list.
pub const MAX_CACHES: usize = 8;

impl Default for Config {
    fn default() -> Self {
        Self {
            id: "spiffe://lattice.local/agent/eu/agent-1".into(),
            cache: SocketAddr::from(([127, 0, 0, 1], 8443)),
            data_dir: PathBuf::from("./data/agent"),
            root_ca: PathBuf::from("./data/cp/root.crt"),
            join_token: None,
            posture: lattice_shared::policy::Posture::default(),
            job_type: String::new(),
            log_json: false,
            caches: Vec::new(),
            renewal: RenewalConfig::default(),
            workload: workload::WorkloadConfig::default(),
            proxy: None,
            metrics_listen: None,
            token_cache: false,
        }
    }
}

impl Config {
    pub fn validate(&self) -> Result<SpiffeId, String> {
        let id = SpiffeId::parse(&self.id).map_err(|e| format!("id: {e}"))?;
        if id.role() != Role::Agent {
            return Err(format!(
                "id: {id} is not an agent id (spiffe://TD/agent/REGION/NAME)"
            ));
        }
        if self.job_type.len() > lattice_shared::policy::MAX_JOB_TYPE {
            return Err(format!(
                "job_type must be at most {} bytes",
                lattice_shared::policy::MAX_JOB_TYPE
            ));
        }
        if self.caches.len() + 1 > MAX_CACHES {
            return Err(format!("at most {MAX_CACHES} caches (cache and caches)"));
        }
        let r = &self.renewal;
        if !(0.0..=0.4).contains(&r.jitter) {
            return Err("renewal.jitter must be within 0.0..=0.4".into());
        }
        if r.check_interval_ms == 0 || r.check_interval_ms > 60_000 {
            return Err("renewal.check_interval_ms must be within 1..=60000".into());
        }
        if r.max_backoff_ms < 1000 || r.max_backoff_ms > 3_600_000 {
            return Err("renewal.max_backoff_ms must be within 1000..=3600000".into());
        }
        self.workload
            .validate()
            .map_err(|e| format!("workload: {e}"))?;
        if let Some(p) = &self.proxy {
            p.validate().map_err(|e| format!("proxy: {e}"))?;
        }
        Ok(id)
    }

    /// Every cache, in the order they are tried.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut v = vec![self.cache];
        for c in &self.caches {
            if !v.contains(c) {
                v.push(*c);
            }
        }
        v
    }

    /// What the agent reports about itself with each request.
    pub fn claims(&self) -> pb::AgentClaims {
        pb::AgentClaims {
            posture: Some(self.posture.to_proto()),
            job_type: self.job_type.clone(),
        }
    }
}

/// A leased secret value: zeroized on drop, redacted in `Debug`.
pub struct Lease {
    pub value: zeroize::Zeroizing<Vec<u8>>,
    pub lease_id: String,
    pub version: u64,
    pub expires_at_unix: i64,
    pub fingerprint: String,
    pub policy_version: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("value", &"<redacted>")
            .field("lease_id", &self.lease_id)
            .field("version", &self.version)
            .field("expires_at_unix", &self.expires_at_unix)
            .field("fingerprint", &self.fingerprint)
            .finish()
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
    #[error("cache refused: {message} ({code:?})")]
    Refused { code: tonic::Code, message: String },
    #[error("cache unreachable: {0}")]
    Transport(String),
    #[error("stored identity is corrupt: {0}")]
    Corrupt(String),
    #[error("this agent has been revoked; enrol again with a new join token")]
    Revoked,
    #[error(
        "this agent is not enrolled and has no join token: set LATTICE_AGENT_JOIN_TOKEN (from `lattice join-token create --id ...`)"
    )]
    NeedsJoinToken,
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        Error::Refused {
            code: s.code(),
            message: s.message().to_owned(),
        }
    }
}

#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredChain {
    leaf: String,
    intermediate: String,
}

/// The agent's certificate chain (DER) and what it says.
#[derive(Debug, Clone)]
pub struct Chain {
    pub leaf: Vec<u8>,
    pub intermediate: Vec<u8>,
    pub root: Vec<u8>,
    pub info: CertInfo,
}

/// What happens to the agent's credentials, for the runtime and the
/// Workload API's watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A new certificate is in use.
    CertificateRenewed,
    /// A fresh token for a kept audience (see [`Agent::keep`]).
    TokenRenewed(TokenKey),
    /// A token the agent served was revoked (itself, or one it descends from).
    TokenRevoked { jti: String },
    /// The agent itself was revoked: every credential is gone.
    IdentityRevoked(String),
    /// Requests now go to another cache.
    CacheChanged(SocketAddr),
}

/// What a token is for: the key of the agent's token cache.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenKey {
    pub audience: String,
    /// Sorted, without repeats.
    pub scopes: Vec<String>,
    pub ttl_secs: u64,
}

impl TokenKey {
    pub fn new(audience: &str, scopes: &[String], ttl_secs: u64) -> Self {
        let mut scopes = scopes.to_vec();
        scopes.sort_unstable();
        scopes.dedup();
        Self {
            audience: audience.to_owned(),
            scopes,
            ttl_secs,
        }
    }
}

/// A token as served to a local process.
#[derive(Clone)]
pub struct ServedToken {
    pub token: zeroize::Zeroizing<String>,
    pub jti: String,
    pub audience: String,
    pub iat_unix: i64,
    pub expires_at_unix: i64,
    pub delegation_depth: u32,
}

impl std::fmt::Debug for ServedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedToken")
            .field("jti", &self.jti)
            .field("audience", &self.audience)
            .field("expires_at_unix", &self.expires_at_unix)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Agent {
    pub id: SpiffeId,
    pub region: RegionId,
    cfg: Config,
    clock: SharedClock,
    store: SharedStore,
    vault: Arc<dyn KeyVault>,
    bundle: Arc<TrustBundle>,
    cert: Arc<ReloadableCert>,
    chain: RwLock<Chain>,
    /// The caches in the order they are tried, and the one in use.
    endpoints: Vec<SocketAddr>,
    current: std::sync::atomic::AtomicUsize,
    client: RwLock<CacheClient<Channel>>,
    /// One failover at a time.
    failing_over: tokio::sync::Mutex<()>,
    known: Arc<KnownRevocations>,
    /// Tokens handed out and not known revoked: jti → token.
    held: std::sync::Mutex<std::collections::HashMap<String, HeldToken>>,
    /// The newest token minted for each key, by jti.
    fresh: std::sync::Mutex<std::collections::HashMap<TokenKey, String>>,
    /// Keys the runtime keeps fresh, with how many watchers want each.
    kept: std::sync::Mutex<std::collections::HashMap<TokenKey, usize>>,
    /// Seals the token cache file (when `token_cache` is on).
    cache_key: std::sync::Mutex<Option<token_cache::CacheKey>>,
    /// Tokens read from the cache file, served once the revocation
    /// backlog has been replayed (see `promote_loaded`).
    loaded: std::sync::Mutex<Vec<(String, HeldToken, Option<TokenKey>)>>,
    /// Bumped when leases taken before may no longer be used.
    lease_generation: std::sync::atomic::AtomicU64,
    /// Reported with each request; starts as configured.
    claims: RwLock<pb::AgentClaims>,
    /// This certificate's share of lifetime renewed early (jitter).
    renew_early: std::sync::Mutex<f64>,
    events: tokio::sync::broadcast::Sender<AgentEvent>,
    revoked: tokio::sync::watch::Sender<bool>,
    /// True while the revocation stream from the cache is open.
    watching: tokio::sync::watch::Sender<bool>,
}

/// A token the agent has minted or had delegated, kept for its local
/// processes (memory only; zeroized when dropped).
struct HeldToken {
    token: zeroize::Zeroizing<String>,
    audience: String,
    iat_unix: i64,
    exp_unix: i64,
    /// The tokens it was delegated from (cascade).
    parent_jtis: Vec<String>,
    depth: u32,
}

impl HeldToken {
    fn served(&self, jti: &str) -> ServedToken {
        ServedToken {
            token: self.token.clone(),
            jti: jti.to_owned(),
            audience: self.audience.clone(),
            iat_unix: self.iat_unix,
            expires_at_unix: self.exp_unix,
            delegation_depth: self.depth,
        }
    }
}

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("audience", &self.audience)
            .field("iat_unix", &self.iat_unix)
            .field("exp_unix", &self.exp_unix)
            .finish_non_exhaustive()
    }
}

fn b64(d: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(d)
}
fn unb64(s: &str) -> Result<Vec<u8>, Error> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

/// A uniform random fraction in [0, 1).
fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// Errors worth trying another cache for: the cache is down, stopping or
/// stale.
fn worth_failover(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
    )
}

impl Agent {
    /// Loads the stored identity or enrols with the join token.
    pub async fn start(cfg: Config, deps: Deps) -> Result<Agent, Error> {
        let id = cfg.validate().map_err(Error::Config)?;
        let region = id
            .region()
            .cloned()
            .ok_or_else(|| Error::Config("agent id has no region".into()))?;
        let root = pem::read_certs(&cfg.root_ca)
            .map_err(Error::Config)?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Config("root_ca holds no certificate".into()))?;
        let bundle = Arc::new(TrustBundle::new(id.trust_domain().clone(), root)?);
        lattice_shared::store::check_schema(&*deps.store, "edge-agent", SCHEMA_VERSION)?;
        let endpoints = cfg.endpoints();

        let loaded = match (
            deps.store.get(T_IDENTITY, b"key")?,
            deps.store.get(T_IDENTITY, b"chain")?,
        ) {
            (Some(sealed), Some(chain)) => {
                let key = PrivateKey::from_pkcs8(&deps.vault.open(&sealed, AAD_KEY)?)?;
                let stored: StoredChain =
                    serde_json::from_slice(&chain).map_err(|e| Error::Corrupt(e.to_string()))?;
                let chain = verify_chain(
                    &bundle,
                    &id,
                    &deps.clock,
                    unb64(&stored.leaf)?,
                    unb64(&stored.intermediate)?,
                );
                match chain {
                    Ok(chain) => Some((key, chain)),
                    Err(e) => {
                        tracing::warn!(error = %e, "stored certificate is no longer valid; enrolling again");
                        None
                    }
                }
            }
            _ => None,
        };
        let (key, chain, first) = match loaded {
            Some((key, chain)) => (key, chain, 0),
            None => {
                let token = cfg.join_token.clone().ok_or(Error::NeedsJoinToken)?;
                let key = PrivateKey::generate_p256()?;
                let tls = lattice_shared::tls::client_config(
                    bundle.clone(),
                    deps.clock.clone(),
                    ExpectedServer::CacheIn(region.clone()),
                    None,
                )?;
                // The first cache that answers; a refusal is final (the
                // token may be spent), only an unreachable cache is skipped.
                let mut last = None;
                let mut enrolled = None;
                for (i, addr) in endpoints.iter().enumerate() {
                    let ch = lattice_shared::net::channel(*addr, tls.clone())
                        .map_err(|e| Error::Transport(e.to_string()))?;
                    let r = CacheClient::new(ch)
                        .enrol(pb::EnrolAgentRequest {
                            join_token: token.expose().to_owned(),
                            requested_id: id.to_string(),
                            csr: key.csr_der()?,
                            claims: Some(cfg.claims()),
                        })
                        .await;
                    match r {
                        Ok(resp) => {
                            enrolled = Some((i, resp.into_inner()));
                            break;
                        }
                        Err(s) if worth_failover(&s) && i + 1 < endpoints.len() => {
                            tracing::warn!(cache = %addr, error = %s.message(), "cache unavailable for enrolment; trying the next");
                            last = Some(s);
                        }
                        Err(s) => return Err(s.into()),
                    }
                }
                let (i, resp) = match enrolled {
                    Some(x) => x,
                    None => {
                        return Err(last
                            .map(Error::from)
                            .unwrap_or_else(|| Error::Transport("no cache configured".into())));
                    }
                };
                let c = resp
                    .chain
                    .ok_or_else(|| Error::Corrupt("no chain in response".into()))?;
                let chain = verify_chain(&bundle, &id, &deps.clock, c.leaf, c.intermediate)?;
                persist(&deps.store, &deps.vault, Some(&key), &chain)?;
                tracing::info!(agent_id = %id, cache = %endpoints[i], "enrolled at the cache");
                (key, chain, i)
            }
        };
        let cert = ReloadableCert::new(vec![chain.leaf.clone(), chain.intermediate.clone()], &key)?;
        let known = Arc::new(KnownRevocations::default());
        let client = new_client(
            endpoints[first],
            &bundle,
            &deps.clock,
            &region,
            &cert,
            &known,
        )?;
        let jitter = cfg.renewal.jitter;
        let claims = cfg.claims();
        let (cache_key, loaded) = if cfg.token_cache {
            let k = token_cache::CacheKey::derive(&key.pkcs8_der());
            let loaded = load_token_cache(&cfg.data_dir, &k, deps.clock.now_unix());
            (Some(k), loaded)
        } else {
            (None, Vec::new())
        };
        Ok(Agent {
            known,
            id,
            region,
            cfg,
            clock: deps.clock,
            store: deps.store,
            vault: deps.vault,
            bundle,
            cert,
            chain: RwLock::new(chain),
            endpoints,
            current: std::sync::atomic::AtomicUsize::new(first),
            client: RwLock::new(client),
            failing_over: tokio::sync::Mutex::new(()),
            held: std::sync::Mutex::new(std::collections::HashMap::new()),
            fresh: std::sync::Mutex::new(std::collections::HashMap::new()),
            kept: std::sync::Mutex::new(std::collections::HashMap::new()),
            claims: RwLock::new(claims),
            cache_key: std::sync::Mutex::new(cache_key),
            lease_generation: std::sync::atomic::AtomicU64::new(0),
            loaded: std::sync::Mutex::new(loaded),
            renew_early: std::sync::Mutex::new(random_fraction() * jitter),
            events: tokio::sync::broadcast::channel(256).0,
            revoked: tokio::sync::watch::channel(false).0,
            watching: tokio::sync::watch::channel(false).0,
        })
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn chain(&self) -> Chain {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes when leases taken before must not be used any more (a
    /// secret version revoked, the posture changed).
    pub fn lease_generation(&self) -> u64 {
        self.lease_generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn invalidate_leases(&self) {
        self.lease_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// What the agent reports about itself now.
    pub fn claims(&self) -> pb::AgentClaims {
        self.claims
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The device's posture changed: report it to the cache, which revokes
    /// the tokens it issued to this agent that the policy no longer allows
    /// (returned, and dropped here at once).
    pub async fn set_posture(
        &self,
        posture: lattice_shared::policy::Posture,
    ) -> Result<Vec<String>, Error> {
        let claims = {
            let mut c = self.claims.write().unwrap_or_else(|p| p.into_inner());
            c.posture = Some(posture.to_proto());
            c.clone()
        };
        self.invalidate_leases();
        let req = pb::ReportClaimsRequest {
            claims: Some(claims),
        };
        let r = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_claims(req).await }
            })
            .await?;
        let gone: std::collections::HashSet<&str> =
            r.revoked_jtis.iter().map(String::as_str).collect();
        self.drop_tokens(|jti, t| {
            gone.contains(jti) || t.parent_jtis.iter().any(|p| gone.contains(p.as_str()))
        });
        tracing::info!(agent_id = %self.id, revoked = r.revoked_jtis.len(), "posture reported");
        Ok(r.revoked_jtis)
    }

    /// Every change to the agent's credentials, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    fn emit(&self, e: AgentEvent) {
        let _ = self.events.send(e);
    }

    fn client(&self) -> CacheClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cache requests go to now.
    pub fn current_cache(&self) -> SocketAddr {
        self.endpoints[self
            .current
            .load(std::sync::atomic::Ordering::Acquire)
            .min(self.endpoints.len() - 1)]
    }

    fn client_for(&self, addr: SocketAddr) -> Result<CacheClient<Channel>, Error> {
        new_client(
            addr,
            &self.bundle,
            &self.clock,
            &self.region,
            &self.cert,
            &self.known,
        )
    }

    /// Whether the cache at `addr` answers and can serve now.
    async fn probe(&self, addr: SocketAddr) -> bool {
        let Ok(mut c) = self.client_for(addr) else {
            return false;
        };
        let ping = c.ping(pb::PingRequest { payload: vec![] });
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, ping).await,
            Ok(Ok(r)) if r.get_ref().serving
        )
    }

    fn switch_to(&self, i: usize) -> Result<(), Error> {
        let client = self.client_for(self.endpoints[i])?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        let before = self.current.swap(i, std::sync::atomic::Ordering::AcqRel);
        if before != i {
            metrics::counter!("lattice_agent_failovers_total").increment(1);
            tracing::warn!(agent_id = %self.id, from = %self.endpoints[before.min(self.endpoints.len() - 1)], to = %self.endpoints[i], "switched cache");
            self.emit(AgentEvent::CacheChanged(self.endpoints[i]));
        }
        Ok(())
    }

    /// Moves to the first cache in configured order that answers and
    /// serves, trying the failing one (`failed`) last. Returns whether the
    /// cache in use changed.
    pub async fn failover(&self, failed: usize) -> bool {
        let _one = self.failing_over.lock().await;
        let now = self.current.load(std::sync::atomic::Ordering::Acquire);
        if now != failed {
            return true; // someone else already moved
        }
        let order = (0..self.endpoints.len())
            .filter(|i| *i != failed)
            .chain(std::iter::once(failed));
        for i in order {
            if self.probe(self.endpoints[i]).await {
                return self.switch_to(i).is_ok() && i != failed;
            }
        }
        false
    }

    /// Moves back to an earlier cache in the configured order once it
    /// serves again (the runtime calls this now and then).
    pub async fn fail_back(&self) -> bool {
        let now = self.current.load(std::sync::atomic::Ordering::Acquire);
        for i in 0..now {
            if self.probe(self.endpoints[i]).await {
                let _one = self.failing_over.lock().await;
                return self.switch_to(i).is_ok();
            }
        }
        false
    }

    /// Runs one call at the cache in use, moving to the next serving cache
    /// and trying once more when this one is down, stopping or stale.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(CacheClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let at = self.current.load(std::sync::atomic::Ordering::Acquire);
        match f(self.client()).await {
            Ok(r) => Ok(r.into_inner()),
            Err(s) if worth_failover(&s) && self.endpoints.len() > 1 => {
                if self.failover(at).await {
                    Ok(f(self.client()).await?.into_inner())
                } else {
                    Err(s.into())
                }
            }
            Err(s) => Err(s.into()),
        }
    }

    pub async fn mint(
        &self,
        audience: &str,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<pb::MintTokenResponse, Error> {
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let req = pb::MintTokenRequest {
            audience: audience.to_owned(),
            scopes: scopes.to_vec(),
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
            claims: Some(self.claims()),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.mint_token(req).await }
            })
            .await?;
        self.hold(
            resp.jti.clone(),
            HeldToken {
                token: zeroize::Zeroizing::new(resp.token.clone()),
                audience: audience.to_owned(),
                iat_unix: self.clock.now_unix(),
                exp_unix: resp.expires_at_unix,
                parent_jtis: Vec::new(),
                depth: 0,
            },
        );
        Ok(resp)
    }

    /// Keeps a token in memory: expired ones go first, and the oldest when
    /// the agent holds [`MAX_HELD`] already.
    fn hold(&self, jti: String, t: HeldToken) {
        let now = self.clock.now_unix();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|_, h| h.exp_unix > now);
        if held.len() >= MAX_HELD
            && let Some(oldest) = held
                .iter()
                .min_by_key(|(_, h)| h.iat_unix)
                .map(|(j, _)| j.clone())
        {
            held.remove(&oldest);
        }
        held.insert(jti, t);
    }

    /// A token for `key`: the newest one while more than half of its life
    /// is left, else a fresh one.
    pub async fn token_for(&self, key: &TokenKey) -> Result<ServedToken, Error> {
        if let Some(t) = self.fresh_token(key) {
            return Ok(t);
        }
        let ttl = (key.ttl_secs > 0).then(|| Duration::from_secs(key.ttl_secs));
        let resp = self.mint(&key.audience, &key.scopes, ttl).await?;
        self.fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), resp.jti.clone());
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&resp.jti)
            .map(|h| h.served(&resp.jti))
            .ok_or(Error::Revoked)
    }

    /// The newest token for `key` if it is held and before half-life.
    fn fresh_token(&self, key: &TokenKey) -> Option<ServedToken> {
        let jti = self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()?;
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let h = held.get(&jti)?;
        let now = self.clock.now_unix();
        (now < h.iat_unix + (h.exp_unix - h.iat_unix) / 2).then(|| h.served(&jti))
    }

    /// Keeps a token for `key` fresh while the returned guard lives: the
    /// runtime renews it at half-life and announces it with
    /// [`AgentEvent::TokenRenewed`].
    pub fn keep(self: &Arc<Self>, key: TokenKey) -> KeepGuard {
        *self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_insert(0) += 1;
        KeepGuard {
            agent: self.clone(),
            key,
        }
    }

    /// Renews every kept token that is past half-life or gone; returns how
    /// many were renewed.
    pub async fn refresh_kept(&self) -> Result<usize, Error> {
        let keys: Vec<TokenKey> = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        let mut n = 0;
        let mut first_err = None;
        // Each key on its own: one the policy now denies does not hold up
        // the others.
        for key in keys {
            if self.fresh_token(&key).is_some() {
                continue;
            }
            match self.token_for(&key).await {
                Ok(_) => {
                    self.emit(AgentEvent::TokenRenewed(key));
                    n += 1;
                }
                Err(Error::Revoked) => return Err(Error::Revoked),
                Err(e) => {
                    tracing::warn!(audience = %key.audience, error = %e, "renewing a kept token failed");
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// A token delegated to the sub-agent `actor` from `subject_token`,
    /// which must be a token this agent holds (RFC 8693 at the cache).
    pub async fn delegate(
        &self,
        subject_token: &str,
        actor: &str,
        scopes: &[String],
        ttl: Option<Duration>,
    ) -> Result<ServedToken, Error> {
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let parent = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.iter()
                .find(|(_, h)| h.token.as_bytes() == subject_token.as_bytes())
                .map(|(jti, h)| (jti.clone(), h.parent_jtis.clone(), h.audience.clone()))
        };
        let Some((parent_jti, mut parent_jtis, audience)) = parent else {
            return Err(Error::Refused {
                code: tonic::Code::PermissionDenied,
                message: "the subject token is not one this agent holds (revoked, expired, or never served here)".into(),
            });
        };
        let req = pb::ExchangeTokenRequest {
            subject_token: subject_token.to_owned(),
            actor: actor.to_owned(),
            scopes: scopes.to_vec(),
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
            claims: Some(self.claims()),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.exchange_token(req).await }
            })
            .await?;
        parent_jtis.push(parent_jti);
        let held = HeldToken {
            token: zeroize::Zeroizing::new(resp.token),
            audience,
            iat_unix: self.clock.now_unix(),
            exp_unix: resp.expires_at_unix,
            parent_jtis,
            depth: resp.depth,
        };
        let served = held.served(&resp.jti);
        self.hold(resp.jti, held);
        Ok(served)
    }

    /// Leases an upstream secret (`version` 0: the active one) from the
    /// cache. The value is the caller's to drop (zeroized) by `expires_at`.
    pub async fn lease_secret(
        &self,
        name: &str,
        version: u64,
        ttl: Option<Duration>,
    ) -> Result<Lease, Error> {
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let req = pb::LeaseSecretRequest {
            name: name.to_owned(),
            version,
            ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
            claims: Some(self.claims()),
        };
        let r = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.lease_secret(req).await }
            })
            .await?;
        Ok(Lease {
            value: zeroize::Zeroizing::new(r.value),
            lease_id: r.lease_id,
            version: r.version,
            expires_at_unix: r.expires_at_unix,
            fingerprint: r.fingerprint,
            policy_version: r.policy_version,
        })
    }

    /// Sends audit events the agent recorded (its proxy's) to the cache.
    pub async fn report_audit(&self, events: Vec<pb::AgentAuditEvent>) -> Result<u32, Error> {
        let req = pb::ReportAuditRequest { events };
        Ok(self
            .call(|mut c| {
                let req = req.clone();
                async move { c.report_audit(req).await }
            })
            .await?
            .accepted)
    }

    /// The audience of a token this agent holds, if it holds it.
    pub fn held_audience(&self, token: &str) -> Option<String> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|h| h.token.as_bytes() == token.as_bytes())
            .map(|h| h.audience.clone())
    }

    /// The jtis of tokens the agent holds (not known to be revoked).
    pub fn held_jtis(&self) -> Vec<String> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn is_revoked(&self) -> bool {
        *self.revoked.borrow()
    }

    /// Whether the revocation stream from the cache is open.
    pub fn watching_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.watching.subscribe()
    }

    /// Resolves when the agent learns it has been revoked.
    pub fn revoked_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.revoked.subscribe()
    }

    /// Drops the held tokens `gone` selects and announces each.
    fn drop_tokens(&self, gone: impl Fn(&str, &HeldToken) -> bool) {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(j, h, _)| !gone(j, h));
        let dropped: Vec<String> = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = held
                .iter()
                .filter(|(j, h)| gone(j, h))
                .map(|(j, _)| j.clone())
                .collect();
            for j in &ids {
                held.remove(j);
            }
            ids
        };
        for jti in dropped {
            self.emit(AgentEvent::TokenRevoked { jti });
        }
    }

    /// Applies one revocation: drops affected tokens (and those delegated
    /// from them), and forgets the whole identity (key, certificate,
    /// tokens) when it is the target.
    pub fn apply_revocation(&self, r: &Revocation) {
        use lattice_shared::revocation::Target;
        self.known.apply(r);
        let chain = self.chain();
        let issuer = lattice_shared::pki::inspect(&chain.intermediate)
            .ok()
            .and_then(|i| i.id);
        let issued_at =
            lattice_shared::clock::unix_secs(chain.info.not_before + lattice_shared::pki::BACKDATE);
        let me = match &r.target {
            Target::Agent(id) => id == &self.id,
            Target::CertSerial(s) => s == &chain.info.serial_hex,
            Target::Cache(id) => issuer.as_ref() == Some(id),
            Target::SubjectBefore {
                subject,
                issued_before_unix,
            } => {
                if subject == &self.id {
                    self.drop_tokens(|_, t| t.iat_unix < *issued_before_unix);
                }
                subject == &self.id && issued_at < *issued_before_unix
            }
            Target::Jti(j) => {
                self.drop_tokens(|jti, t| jti == j || t.parent_jtis.iter().any(|p| p == j));
                false
            }
            Target::SecretVersion { .. } => {
                self.invalidate_leases();
                false
            }
            Target::JoinToken(_) => false,
        };
        if me && !self.is_revoked() {
            self.forget(&r.target.to_string());
            tracing::warn!(agent_id = %self.id, target = %r.target, "this agent was revoked; identity and tokens forgotten");
        }
    }

    /// Serves the tokens read from the cache file: called once the
    /// revocation stream has replayed its backlog (its first heartbeat), so
    /// that those revoked meanwhile are already gone.
    fn promote_loaded(&self) {
        let loaded = std::mem::take(&mut *self.loaded.lock().unwrap_or_else(|p| p.into_inner()));
        if loaded.is_empty() {
            return;
        }
        let n = loaded.len();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let mut fresh = self.fresh.lock().unwrap_or_else(|p| p.into_inner());
        for (jti, h, key) in loaded {
            if let Some(k) = key {
                fresh.insert(k, jti.clone());
            }
            held.insert(jti, h);
        }
        tracing::info!(agent_id = %self.id, tokens = n, "tokens from the cache file are served again");
    }

    /// Writes the held tokens to the sealed cache file (when enabled).
    pub fn save_token_cache(&self) -> Result<(), Error> {
        let key = self.cache_key.lock().unwrap_or_else(|p| p.into_inner());
        let Some(key) = key.as_ref() else {
            return Ok(());
        };
        if self.is_revoked() {
            return Ok(());
        }
        let now = self.clock.now_unix();
        let fresh: std::collections::HashMap<String, TokenKey> = self
            .fresh
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, j)| (j.clone(), k.clone()))
            .collect();
        let entry = |jti: &str, h: &HeldToken, fresh_for: Option<TokenKey>| token_cache::Entry {
            jti: jti.to_owned(),
            token: h.token.as_str().to_owned(),
            audience: h.audience.clone(),
            iat_unix: h.iat_unix,
            exp_unix: h.exp_unix,
            parent_jtis: h.parent_jtis.clone(),
            depth: h.depth,
            fresh_for,
        };
        let mut entries: Vec<token_cache::Entry> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| h.exp_unix > now)
            .map(|(j, h)| entry(j, h, fresh.get(j).cloned()))
            .collect();
        entries.extend(
            self.loaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, h, _)| h.exp_unix > now)
                .map(|(j, h, k)| entry(j, h, k.clone())),
        );
        let sealed = token_cache::seal(key, &entries)?;
        token_cache::write(&token_cache::path(&self.cfg.data_dir), &sealed)
    }

    /// Drops every credential and erases the stored identity.
    fn forget(&self, why: &str) {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let _ = std::fs::remove_file(token_cache::path(&self.cfg.data_dir));
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.fresh.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.cert.clear();
        let _ = self.store.apply(vec![
            Write {
                tree: T_IDENTITY,
                key: b"key".to_vec(),
                value: None,
            },
            Write {
                tree: T_IDENTITY,
                key: b"chain".to_vec(),
                value: None,
            },
        ]);
        // Told before the flag flips: the runtime stops on the flag.
        self.emit(AgentEvent::IdentityRevoked(format!("revoked: {why}")));
        self.revoked.send_replace(true);
    }

    /// Drops every token held in memory (at shutdown); the stored identity
    /// stays.
    pub fn drop_all_tokens(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.fresh.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Follows the cache's revocation stream until revoked or `stop`
    /// resolves, reconnecting with capped backoff (and moving to another
    /// cache when this one is down).
    pub async fn watch_revocations(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut after = 0u64;
        let mut backoff = Duration::from_millis(50);
        while !self.is_revoked() {
            let at = self.current.load(std::sync::atomic::Ordering::Acquire);
            let stream = self
                .client()
                .watch_revocations(pb::WatchRevocationsRequest { after_seq: after })
                .await;
            match stream {
                Ok(resp) => {
                    backoff = Duration::from_millis(50);
                    self.watching.send_replace(true);
                    let mut s = resp.into_inner();
                    loop {
                        // Heartbeats come every second: a silent stream is
                        // a dead link (no transport timeout covers it).
                        let msg = tokio::select! {
                            _ = &mut stop => return,
                            m = tokio::time::timeout(WATCH_SILENCE, s.message()) => m,
                        };
                        let Ok(Ok(Some(n))) = msg else {
                            tracing::warn!(agent_id = %self.id, "revocation stream ended or went silent; reconnecting");
                            break;
                        };
                        if self.current.load(std::sync::atomic::Ordering::Acquire) != at {
                            // Failed over: follow the cache in use.
                            break;
                        }
                        after = after.max(n.seq);
                        if n.revocation.is_none() {
                            // A heartbeat follows the backlog.
                            self.promote_loaded();
                        }
                        if let Some(r) = n
                            .revocation
                            .as_ref()
                            .and_then(|r| Revocation::try_from(r).ok())
                        {
                            self.apply_revocation(&r);
                        }
                        if self.is_revoked() {
                            return;
                        }
                    }
                    self.watching.send_replace(false);
                }
                Err(s) if worth_failover(&s) && self.endpoints.len() > 1 => {
                    if self.failover(at).await {
                        continue;
                    }
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn jwks(&self) -> Result<String, Error> {
        Ok(self
            .call(|mut c| async move { c.jwks(pb::JwksRequest {}).await })
            .await?
            .jwks_json)
    }

    /// A client for raw calls (benchmarks, tests) on the shared connection.
    pub fn cache_client(&self) -> CacheClient<Channel> {
        self.client()
    }

    /// A client of the cache at `addr` on a new connection, presenting
    /// this agent's certificate.
    pub fn cache_client_at(&self, addr: SocketAddr) -> Result<CacheClient<Channel>, Error> {
        self.client_for(addr)
    }

    /// A client on a new connection of its own.
    pub fn new_cache_client(&self) -> Result<CacheClient<Channel>, Error> {
        self.client_for(self.current_cache())
    }

    /// When the certificate should be renewed: half-life, minus this
    /// certificate's random early share (jitter).
    pub fn renewal_due_unix(&self) -> i64 {
        let info = self.chain().info;
        let nb = lattice_shared::clock::unix_secs(info.not_before);
        let na = lattice_shared::clock::unix_secs(info.not_after);
        let early = *self.renew_early.lock().unwrap_or_else(|p| p.into_inner());
        let life = (na - nb) as f64;
        nb + (life * (0.5 - early)) as i64
    }

    /// Renews the certificate with a fresh key once it is due (past
    /// half-life, less jitter).
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        let info = self.chain().info;
        if self.clock.now_unix() < self.renewal_due_unix()
            && !past_half_life(self.clock.now(), info.not_before, info.not_after)
        {
            return Ok(false);
        }
        if self.is_revoked() {
            return Err(Error::Revoked);
        }
        let key = PrivateKey::generate_p256()?;
        let req = pb::IssueCertificateRequest {
            csr: key.csr_der()?,
            claims: Some(self.claims()),
        };
        let resp = self
            .call(|mut c| {
                let req = req.clone();
                async move { c.issue_certificate(req).await }
            })
            .await?;
        let c = resp
            .chain
            .ok_or_else(|| Error::Corrupt("no chain in response".into()))?;
        let chain = verify_chain(&self.bundle, &self.id, &self.clock, c.leaf, c.intermediate)?;
        persist(&self.store, &self.vault, Some(&key), &chain)?;
        self.cert
            .replace(vec![chain.leaf.clone(), chain.intermediate.clone()], &key)?;
        {
            let mut ck = self.cache_key.lock().unwrap_or_else(|p| p.into_inner());
            if ck.is_some() {
                *ck = Some(token_cache::CacheKey::derive(&key.pkcs8_der()));
            }
        }
        if let Err(e) = self.save_token_cache() {
            tracing::warn!(error = %e, "re-sealing the token cache failed");
        }
        // New connections present the new certificate.
        let client = self.client_for(self.current_cache())?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        tracing::info!(agent_id = %self.id, not_after = ?chain.info.not_after, "certificate renewed");
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = chain;
        *self.renew_early.lock().unwrap_or_else(|p| p.into_inner()) =
            random_fraction() * self.cfg.renewal.jitter;
        metrics::counter!("lattice_agent_renewals_total").increment(1);
        self.emit(AgentEvent::CertificateRenewed);
        Ok(true)
    }

    /// Keeps the certificate fresh and follows revocations until `stop`
    /// resolves or the agent is revoked (no Workload API; see
    /// [`runtime::run`] for the whole runtime).
    pub async fn run_until(self: &Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        runtime::keep_fresh(self, stop).await;
    }

    /// When the current certificate expires.
    pub fn not_after_unix(&self) -> i64 {
        lattice_shared::clock::unix_secs(self.chain().info.not_after)
    }
}

/// A revocation stream without a message for this long is dead.
const WATCH_SILENCE: Duration = Duration::from_secs(3);

/// Tokens held in memory at most.
pub const MAX_HELD: usize = 4096;

/// How long a health probe of a cache may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Keeps a token fresh while it lives (see [`Agent::keep`]).
#[derive(Debug)]
pub struct KeepGuard {
    agent: Arc<Agent>,
    key: TokenKey,
}

impl Drop for KeepGuard {
    fn drop(&mut self) {
        let mut kept = self.agent.kept.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = kept.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                kept.remove(&self.key);
            }
        }
    }
}

/// The tokens of the cache file still valid at `now`; a file that does not
/// open (another identity key, tampering) is removed.
fn load_token_cache(
    data_dir: &std::path::Path,
    key: &token_cache::CacheKey,
    now: i64,
) -> Vec<(String, HeldToken, Option<TokenKey>)> {
    let path = token_cache::path(data_dir);
    let data = match token_cache::read(&path) {
        Ok(Some(d)) => d,
        Ok(None) => return Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "token cache unreadable; ignored");
            return Vec::new();
        }
    };
    match token_cache::open(key, &data) {
        Ok(entries) => entries
            .into_iter()
            .filter(|e| e.exp_unix > now)
            .map(|e| {
                (
                    e.jti.clone(),
                    HeldToken {
                        token: zeroize::Zeroizing::new(e.token.clone()),
                        audience: e.audience.clone(),
                        iat_unix: e.iat_unix,
                        exp_unix: e.exp_unix,
                        parent_jtis: e.parent_jtis.clone(),
                        depth: e.depth,
                    },
                    e.fresh_for.clone(),
                )
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "token cache discarded");
            let _ = std::fs::remove_file(&path);
            Vec::new()
        }
    }
}

/// The revocations this agent has heard of, applied to the caches it
/// connects to: a revoked cache (or its certificate) is not trusted again.
#[derive(Debug, Default)]
pub struct KnownRevocations(RwLock<lattice_shared::revocation::RevocationSet>);

impl KnownRevocations {
    pub fn apply(&self, r: &Revocation) {
        self.0.write().unwrap_or_else(|p| p.into_inner()).apply(r);
    }
}

impl lattice_shared::tls::PeerCheck for KnownRevocations {
    fn check(&self, leaf: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .check_cert(leaf, issuer)
    }
}

fn new_client(
    addr: SocketAddr,
    bundle: &Arc<TrustBundle>,
    clock: &SharedClock,
    region: &RegionId,
    cert: &Arc<ReloadableCert>,
    known: &Arc<KnownRevocations>,
) -> Result<CacheClient<Channel>, Error> {
    let tls = lattice_shared::tls::client_config_checked(
        bundle.clone(),
        clock.clone(),
        ExpectedServer::CacheIn(region.clone()),
        Some(cert.clone()),
        Some(known.clone()),
    )?;
    let ch =
        lattice_shared::net::channel(addr, tls).map_err(|e| Error::Transport(e.to_string()))?;
    Ok(CacheClient::new(ch))
}

/// Checks a chain from the cache with the standard verifier before use.
fn verify_chain(
    bundle: &TrustBundle,
    id: &SpiffeId,
    clock: &SharedClock,
    leaf: Vec<u8>,
    intermediate: Vec<u8>,
) -> Result<Chain, Error> {
    let info = bundle.verify(
        &leaf,
        &[CertificateDer::from(intermediate.as_slice())],
        clock.now(),
        Usage::TlsClient,
    )?;
    if info.id.as_ref() != Some(id) {
        return Err(Error::Corrupt(format!(
            "certificate names {:?}, not {id}",
            info.id
        )));
    }
    Ok(Chain {
        leaf,
        intermediate,
        root: bundle.root_der().to_vec(),
        info,
    })
}

fn persist(
    store: &SharedStore,
    vault: &Arc<dyn KeyVault>,
    key: Option<&PrivateKey>,
    chain: &Chain,
) -> Result<(), Error> {
    let stored = StoredChain {
        leaf: b64(&chain.leaf),
        intermediate: b64(&chain.intermediate),
    };
    let mut writes = vec![Write {
        tree: T_IDENTITY,
        key: b"chain".to_vec(),
        value: Some(serde_json::to_vec(&stored).map_err(|e| Error::Corrupt(e.to_string()))?),
    }];
    if let Some(k) = key {
        writes.push(Write {
            tree: T_IDENTITY,
            key: b"key".to_vec(),
            value: Some(vault.seal(&k.pkcs8_der(), AAD_KEY)?),
        });
    }
    store.apply(writes)?;
    Ok(())
}

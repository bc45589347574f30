//! The edge agent: a device identity whose private key is generated here and
//! never leaves; enrolment at the regional cache with a one-time join token;
//! certificate renewal at half-life; tokens for local AI-agent processes.
//!
//! The agent talks only to caches of its own region, never to the control
//! plane.

pub mod proxy;

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
}

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
        Ok(id)
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
    client: RwLock<CacheClient<Channel>>,
    known: Arc<KnownRevocations>,
    /// Tokens handed out and not known revoked: jti → token.
    held: std::sync::Mutex<std::collections::HashMap<String, HeldToken>>,
    revoked: tokio::sync::watch::Sender<bool>,
    /// True while the revocation stream from the cache is open.
    watching: tokio::sync::watch::Sender<bool>,
}

/// A token the agent has minted, kept for its local processes.
struct HeldToken {
    #[allow(dead_code)] // served to local processes by the agent runtime
    token: zeroize::Zeroizing<String>,
    iat_unix: i64,
}

impl std::fmt::Debug for HeldToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldToken")
            .field("iat_unix", &self.iat_unix)
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
        let (key, chain) = match loaded {
            Some(x) => x,
            None => {
                let token = cfg.join_token.clone().ok_or(Error::NeedsJoinToken)?;
                let key = PrivateKey::generate_p256()?;
                let tls = lattice_shared::tls::client_config(
                    bundle.clone(),
                    deps.clock.clone(),
                    ExpectedServer::CacheIn(region.clone()),
                    None,
                )?;
                let ch = lattice_shared::net::channel(cfg.cache, tls)
                    .map_err(|e| Error::Transport(e.to_string()))?;
                let resp = CacheClient::new(ch)
                    .enrol(pb::EnrolAgentRequest {
                        join_token: token.expose().to_owned(),
                        requested_id: id.to_string(),
                        csr: key.csr_der()?,
                        claims: Some(cfg.claims()),
                    })
                    .await?
                    .into_inner();
                let c = resp
                    .chain
                    .ok_or_else(|| Error::Corrupt("no chain in response".into()))?;
                let chain = verify_chain(&bundle, &id, &deps.clock, c.leaf, c.intermediate)?;
                persist(&deps.store, &deps.vault, Some(&key), &chain)?;
                tracing::info!(agent_id = %id, "enrolled at the cache");
                (key, chain)
            }
        };
        let cert = ReloadableCert::new(vec![chain.leaf.clone(), chain.intermediate.clone()], &key)?;
        let known = Arc::new(KnownRevocations::default());
        let client = new_client(&cfg, &bundle, &deps.clock, &region, &cert, &known)?;
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
            client: RwLock::new(client),
            held: std::sync::Mutex::new(std::collections::HashMap::new()),
            revoked: tokio::sync::watch::channel(false).0,
            watching: tokio::sync::watch::channel(false).0,
        })
    }

    pub fn chain(&self) -> Chain {
        self.chain.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn client(&self) -> CacheClient<Channel> {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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
        let resp = self
            .client()
            .mint_token(pb::MintTokenRequest {
                audience: audience.to_owned(),
                scopes: scopes.to_vec(),
                ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
                claims: Some(self.cfg.claims()),
            })
            .await?
            .into_inner();
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(
            resp.jti.clone(),
            HeldToken {
                token: zeroize::Zeroizing::new(resp.token.clone()),
                iat_unix: self.clock.now_unix(),
            },
        );
        Ok(resp)
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
        let r = self
            .client()
            .lease_secret(pb::LeaseSecretRequest {
                name: name.to_owned(),
                version,
                ttl_secs: ttl.map(|t| t.as_secs()).unwrap_or(0),
                claims: Some(self.cfg.claims()),
            })
            .await?
            .into_inner();
        Ok(Lease {
            value: zeroize::Zeroizing::new(r.value),
            lease_id: r.lease_id,
            version: r.version,
            expires_at_unix: r.expires_at_unix,
            fingerprint: r.fingerprint,
            policy_version: r.policy_version,
        })
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

    /// Applies one revocation: drops affected tokens, and forgets the whole
    /// identity (key, certificate, tokens) when it is the target.
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
                    self.held
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|_, t| t.iat_unix >= *issued_before_unix);
                }
                subject == &self.id && issued_at < *issued_before_unix
            }
            Target::Jti(j) => {
                self.held
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(j);
                false
            }
            Target::JoinToken(_) | Target::SecretVersion { .. } => false,
        };
        if me && !self.is_revoked() {
            self.forget();
            tracing::warn!(agent_id = %self.id, target = %r.target, "this agent was revoked; identity and tokens forgotten");
        }
    }

    /// Drops every credential and erases the stored identity.
    fn forget(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clear();
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
        self.revoked.send_replace(true);
    }

    /// Follows the cache's revocation stream until revoked or `stop`
    /// resolves, reconnecting with capped backoff.
    pub async fn watch_revocations(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut after = 0u64;
        let mut backoff = Duration::from_millis(50);
        while !self.is_revoked() {
            let stream = self
                .client()
                .watch_revocations(pb::WatchRevocationsRequest { after_seq: after })
                .await;
            if let Ok(resp) = stream {
                backoff = Duration::from_millis(50);
                self.watching.send_replace(true);
                let mut s = resp.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = &mut stop => return,
                        m = s.message() => m,
                    };
                    let Ok(Some(n)) = msg else { break };
                    after = after.max(n.seq);
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
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub async fn jwks(&self) -> Result<String, Error> {
        Ok(self
            .client()
            .jwks(pb::JwksRequest {})
            .await?
            .into_inner()
            .jwks_json)
    }

    /// A client for raw calls (benchmarks, tests) on the shared connection.
    pub fn cache_client(&self) -> CacheClient<Channel> {
        self.client()
    }

    /// A client on a new connection of its own.
    pub fn new_cache_client(&self) -> Result<CacheClient<Channel>, Error> {
        new_client(
            &self.cfg,
            &self.bundle,
            &self.clock,
            &self.region,
            &self.cert,
            &self.known,
        )
    }

    /// Renews the certificate with a fresh key once it is past half-life.
    pub async fn renew_if_due(&self) -> Result<bool, Error> {
        let info = self.chain().info;
        if !past_half_life(self.clock.now(), info.not_before, info.not_after) {
            return Ok(false);
        }
        let key = PrivateKey::generate_p256()?;
        let resp = self
            .client()
            .issue_certificate(pb::IssueCertificateRequest {
                csr: key.csr_der()?,
                claims: Some(self.cfg.claims()),
            })
            .await?
            .into_inner();
        let c = resp
            .chain
            .ok_or_else(|| Error::Corrupt("no chain in response".into()))?;
        let chain = verify_chain(&self.bundle, &self.id, &self.clock, c.leaf, c.intermediate)?;
        persist(&self.store, &self.vault, Some(&key), &chain)?;
        self.cert
            .replace(vec![chain.leaf.clone(), chain.intermediate.clone()], &key)?;
        // New connections present the new certificate.
        let client = new_client(
            &self.cfg,
            &self.bundle,
            &self.clock,
            &self.region,
            &self.cert,
            &self.known,
        )?;
        *self.client.write().unwrap_or_else(|p| p.into_inner()) = client;
        tracing::info!(agent_id = %self.id, not_after = ?chain.info.not_after, "certificate renewed");
        *self.chain.write().unwrap_or_else(|p| p.into_inner()) = chain;
        Ok(true)
    }

    /// Keeps the certificate fresh and follows revocations until `stop`
    /// resolves or the agent is revoked.
    pub async fn run_until(&self, stop: impl std::future::Future<Output = ()>) {
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let watcher = self.watch_revocations(async move {
            let mut rx = done_rx;
            let _ = rx.wait_for(|d| *d).await;
        });
        let renewer = async {
            tokio::pin!(stop);
            let mut revoked = self.revoked_signal();
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = revoked.wait_for(|r| *r) => break,
                    _ = tick.tick() => {
                        if let Err(e) = self.renew_if_due().await {
                            tracing::warn!(error = %e, "renewal failed; will retry");
                        }
                    }
                }
            }
            done_tx.send_replace(true);
        };
        tokio::join!(watcher, renewer);
    }

    /// When the current certificate expires.
    pub fn not_after_unix(&self) -> i64 {
        lattice_shared::clock::unix_secs(self.chain().info.not_after)
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
    cfg: &Config,
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
    let ch = lattice_shared::net::channel(cfg.cache, tls)
        .map_err(|e| Error::Transport(e.to_string()))?;
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

//! The edge agent: a device identity whose private key is generated here and
//! never leaves; enrolment at the regional cache with a one-time join token;
//! certificate renewal at half-life; tokens for local AI-agent processes.
//!
//! The agent talks only to caches of its own region, never to the control
//! plane. [`Agent`] is the identity and what hangs off it; the parts of its
//! work live in `caches` (which cache, failover), `tokens` (the token store),
//! `revocations` (the revocation stream), `renewal` and `identity_store`.

mod caches;
mod config;
mod error;
mod identity_store;
pub mod proxy;
mod renewal;
mod revocations;
pub mod runtime;
pub mod token_cache;
mod tokens;
pub mod workload;

pub use config::{Config, MAX_CACHES, RenewalConfig};
pub use error::Error;
pub use revocations::KnownRevocations;
pub use tokens::{KeepGuard, MAX_HELD, ServedToken, TokenKey};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lattice_shared::clock::SharedClock;
use lattice_shared::id::{RegionId, SpiffeId};
use lattice_shared::pem;
use lattice_shared::pki::{CertInfo, PrivateKey, TrustBundle};
use lattice_shared::proto::{self as pb, cache_client::CacheClient};
use lattice_shared::seal::KeyVault;
use lattice_shared::store::SharedStore;
use lattice_shared::tls::{ExpectedServer, ReloadableCert};
use tonic::transport::Channel;

use caches::{new_client, worth_failover};
use tokens::Tokens;

pub const SCHEMA_VERSION: u32 = 1;

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

#[derive(Debug)]
pub struct Deps {
    pub clock: SharedClock,
    pub store: SharedStore,
    pub vault: Arc<dyn KeyVault>,
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
    current: AtomicUsize,
    client: RwLock<CacheClient<Channel>>,
    /// One failover at a time.
    failing_over: tokio::sync::Mutex<()>,
    known: Arc<KnownRevocations>,
    /// Every token the agent holds, behind one lock.
    tokens: std::sync::Mutex<Tokens>,
    /// Bumped when leases taken before may no longer be used.
    lease_generation: AtomicU64,
    /// Reported with each request; starts as configured.
    claims: RwLock<pb::AgentClaims>,
    /// This certificate's share of lifetime renewed early (jitter).
    renew_early: std::sync::Mutex<f64>,
    events: tokio::sync::broadcast::Sender<AgentEvent>,
    revoked: tokio::sync::watch::Sender<bool>,
    /// True while the revocation stream from the cache is open.
    watching: tokio::sync::watch::Sender<bool>,
}

/// Enrols at the first cache that answers, with the join token: a new key,
/// its certificate from the cache, both stored. Returns which cache.
async fn enrol(
    cfg: &Config,
    deps: &Deps,
    bundle: &Arc<TrustBundle>,
    region: &RegionId,
    endpoints: &[SocketAddr],
) -> Result<(PrivateKey, Chain, usize), Error> {
    let id = &cfg.id;
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
    let chain = identity_store::verify_chain(bundle, id, &deps.clock, c.leaf, c.intermediate)?;
    identity_store::persist(&deps.store, &deps.vault, Some(&key), &chain)?;
    tracing::info!(agent_id = %id, cache = %endpoints[i], "enrolled at the cache");
    Ok((key, chain, i))
}

impl Agent {
    /// Loads the stored identity or enrols with the join token.
    pub async fn start(cfg: Config, deps: Deps) -> Result<Agent, Error> {
        cfg.validate().map_err(Error::Config)?;
        let id = cfg.id.clone();
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

        let stored = identity_store::load(&deps.store, &deps.vault, &bundle, &id, &deps.clock)?;
        let (key, chain, first) = match stored {
            Some((key, chain)) => (key, chain, 0),
            None => enrol(&cfg, &deps, &bundle, &region, &endpoints).await?,
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
            let loaded = identity_store::load_token_cache(&cfg.data_dir, &k, deps.clock.now_unix());
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
            current: AtomicUsize::new(first),
            client: RwLock::new(client),
            failing_over: tokio::sync::Mutex::new(()),
            tokens: std::sync::Mutex::new(Tokens::new(cache_key, loaded)),
            claims: RwLock::new(claims),
            lease_generation: AtomicU64::new(0),
            renew_early: std::sync::Mutex::new(lattice_shared::backoff::random_fraction() * jitter),
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
        self.lease_generation.load(Ordering::Acquire)
    }

    fn invalidate_leases(&self) {
        self.lease_generation.fetch_add(1, Ordering::AcqRel);
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
        posture: lattice_shared::posture::Posture,
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
            .call(req, |mut c, r| async move { c.report_claims(r).await })
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
            .call(req, |mut c, r| async move { c.lease_secret(r).await })
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
            .call(req, |mut c, r| async move { c.report_audit(r).await })
            .await?
            .accepted)
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

    pub async fn jwks(&self) -> Result<String, Error> {
        Ok(self
            .call(
                pb::JwksRequest {},
                |mut c, r| async move { c.jwks(r).await },
            )
            .await?
            .jwks_json)
    }
}

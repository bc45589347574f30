//! The verifier a service embeds: checks a lattice token offline against the
//! JWKS and refuses revoked ones, following one cache's `WatchRevocations`
//! stream under the caches' own freshness rule (design §4): when what it
//! knows of revocations is older than `L`, it refuses (fails closed).
//!
//! A token is confined to the cache whose key signed it (known from the
//! key's root-issued certificate in the JWKS, not from the token):
//! `iss` names that cache, and `sub` and every `act` agent are agents of its
//! trust domain and region ([`crate::token::check_confinement`]). A bound
//! token is presented with its holder's chain, which must verify to the
//! root and name `sub`; the leaf and its issuing CA are checked for
//! revocation. The revocation rule itself is the shared one,
//! [`RevocationSet::check_token`].
//!
//! Freshness is proven end to end, never taken from the cache
//! ([`crate::freshness`]): the follower chains the revocations it receives,
//! and a heartbeat relays the control plane's newest signed checkpoint the
//! cache has applied. When the checkpoint verifies to the root (signer not
//! revoked) and its chain matches the follower's own at the checkpoint's
//! head, the follower holds every revocation committed before the
//! checkpoint was made, and is fresh as of that time (its age read on wall
//! clocks, placed on the local monotonic clock). It is stale when
//! `monotonic() − fresh_as_of > L`, or before the first such checkpoint. A
//! cache that withholds a revocation or the checkpoints leaves its
//! followers stale; the staleness it reports is not used. Transit time is
//! not subtracted, so freshness is optimistic by one network latency and by
//! how far the follower's wall clock runs behind the control plane's.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::clock::SharedClock;
use crate::freshness::{Proof, Unproven};
use crate::id::SpiffeId;
use crate::limits::WATCH_SILENCE;
use crate::pki::{CertInfo, TrustBundle, Usage};
use crate::proto::{self as pb, cache_client::CacheClient};
pub use crate::revocation::RevocationReason;
use crate::revocation::{Revocation, RevocationSet};
use crate::token::{Claims, TokenError, TokenVerifier};

/// The caches' default `L`.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(5);
/// How often the JWKS is fetched again without a reason.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(60);
/// At most one extra JWKS fetch per this interval for tokens naming an
/// unknown `kid` (anyone can send such a token).
pub const DEFAULT_JWKS_REFETCH_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Reconnect backoff: doubling from the first to the second, ±50 % jitter.
pub const BACKOFF_MIN: Duration = Duration::from_millis(50);
pub const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bound on one JWKS fetch.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_JWKS_BYTES: usize = crate::limits::MAX_SYNC_MESSAGE_BYTES;
pub const MAX_JWKS_KEYS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Format, signature, audience, expiry or issuer: the token itself.
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("token is not bound to the presented client certificate: {0}")]
    NotBound(&'static str),
    #[error("{0}")]
    Revoked(RevocationReason),
    /// What the verifier knows of revocations is too old to decide: retry
    /// later. Not the token's fault.
    #[error(
        "revocation status is stale ({}, limit {max_staleness_ms} ms); try again later",
        describe_staleness(*.staleness_ms)
    )]
    Stale {
        /// `None`: never fresh.
        staleness_ms: Option<u64>,
        max_staleness_ms: u64,
    },
    /// The cache could not be asked (JWKS).
    #[error("cache unavailable: {0}")]
    Cache(String),
}

fn describe_staleness(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("last fresh {ms} ms ago"),
        None => "never fresh".into(),
    }
}

impl From<RevocationReason> for VerifyError {
    /// A token whose principals do not parse is malformed, not revoked.
    fn from(r: RevocationReason) -> Self {
        match r {
            RevocationReason::Unreadable(m) => VerifyError::Token(TokenError::Malformed(m)),
            r => VerifyError::Revoked(r),
        }
    }
}

impl VerifyError {
    /// True when the service should answer "unavailable" (HTTP 503, gRPC
    /// UNAVAILABLE) rather than "unauthenticated": the token may be fine.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, VerifyError::Stale { .. } | VerifyError::Cache(_))
    }

    /// The `outcome` label of `lattice_verifier_decisions_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            VerifyError::Token(TokenError::Expired) => "expired",
            VerifyError::Token(TokenError::UnknownKey(_)) => "unknown_key",
            VerifyError::Token(_) => "invalid",
            VerifyError::NotBound(_) => "not_bound",
            VerifyError::Revoked(_) => "revoked",
            VerifyError::Stale { .. } => "stale",
            VerifyError::Cache(_) => "unavailable",
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Following revocations.

/// What a follower knows, published on every notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FollowerStatus {
    /// Every revocation up to this sequence has been applied.
    pub applied_seq: u64,
    /// Local monotonic time as of which nothing revoked is missing; `None`:
    /// never fresh.
    pub fresh_as_of: Option<Duration>,
    /// The stream is open.
    pub connected: bool,
}

/// One notice from the wire, validated.
#[derive(Debug, Clone)]
struct Notice {
    seq: u64,
    /// The revocation, and its wire form (the chain hashes it).
    revocation: Option<(Revocation, pb::Revocation)>,
    checkpoint: Option<pb::FreshnessCheckpoint>,
}

impl Notice {
    fn from_wire(n: &pb::RevocationNotice) -> Result<Notice, String> {
        let revocation = match &n.revocation {
            Some(r) => Some((
                Revocation::try_from(r).map_err(|e| e.to_string())?,
                r.clone(),
            )),
            None => None,
        };
        Ok(Notice {
            seq: n.seq,
            revocation,
            checkpoint: n.checkpoint.clone(),
        })
    }
}

#[derive(Debug)]
struct FollowerState {
    bundle: Arc<TrustBundle>,
    set: RevocationSet,
    proof: Proof,
    status: FollowerStatus,
}

impl FollowerState {
    fn new(bundle: Arc<TrustBundle>) -> Self {
        Self {
            bundle,
            set: RevocationSet::default(),
            proof: Proof::default(),
            status: FollowerStatus::default(),
        }
    }

    /// Applies a notice received at local monotonic time `now` (wall clock
    /// `now_unix_ms`); for a heartbeat, what its checkpoint proved.
    fn on_notice(
        &mut self,
        now: Duration,
        now_unix_ms: i64,
        n: &Notice,
    ) -> Option<Result<Duration, Unproven>> {
        let mut proved = None;
        match &n.revocation {
            Some((r, wire)) => {
                // On a resume the cache may repeat what we hold.
                if n.seq > self.status.applied_seq {
                    self.set.apply(r);
                    self.proof.on_revocation(n.seq, wire);
                }
            }
            None => {
                if let Some(cp) = &n.checkpoint {
                    proved = Some(self.proof.on_checkpoint(
                        cp,
                        &self.bundle,
                        &self.set,
                        now,
                        now_unix_ms,
                    ));
                    self.status.fresh_as_of = self.proof.fresh_as_of();
                }
            }
        }
        self.status.applied_seq = self.status.applied_seq.max(n.seq);
        proved
    }

    /// How long ago the follower was last fresh; `None`: never.
    fn staleness(&self, now: Duration) -> Option<Duration> {
        self.status.fresh_as_of.map(|f| now.saturating_sub(f))
    }

    /// Freshness, then every revocation rule (the client certificate's and
    /// its issuing CA's too, when one is given). One read of the state
    /// decides.
    fn check(
        &self,
        now: Duration,
        max: Duration,
        claims: &Claims,
        signer_serial: Option<&str>,
        client_cert: Option<&ClientCert>,
    ) -> Result<(), VerifyError> {
        self.check_fresh(now, max)?;
        self.set.check_token(claims, signer_serial)?;
        if let Some(c) = client_cert {
            self.set
                .check_cert(&c.leaf, Some(&c.issuer))
                .map_err(|e| VerifyError::Revoked(RevocationReason::ClientCertificate(e)))?;
        }
        Ok(())
    }

    fn check_fresh(&self, now: Duration, max: Duration) -> Result<(), VerifyError> {
        let staleness = self.staleness(now);
        if staleness.is_none_or(|s| s > max) {
            return Err(VerifyError::Stale {
                staleness_ms: staleness.map(millis),
                max_staleness_ms: millis(max),
            });
        }
        Ok(())
    }
}

/// A client certificate a bound token was presented with, verified to the
/// root: the leaf and the cache CA that issued it.
#[derive(Debug, Clone)]
struct ClientCert {
    leaf: CertInfo,
    issuer: CertInfo,
}

#[derive(Debug)]
struct FollowerShared {
    clock: SharedClock,
    max_staleness: Duration,
    state: RwLock<FollowerState>,
    status: watch::Sender<FollowerStatus>,
}

impl FollowerShared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, FollowerState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn on_notice(&self, n: &Notice) {
        let now = self.clock.monotonic();
        let (status, proved) = {
            let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
            let proved = g.on_notice(now, self.clock.now_unix_ms(), n);
            (g.status, proved)
        };
        match proved {
            None => {}
            Some(Ok(_)) => {
                metrics::counter!("lattice_verifier_checkpoints_total", "outcome" => "fresh")
                    .increment(1);
            }
            Some(Err(e)) => {
                metrics::counter!("lattice_verifier_checkpoints_total", "outcome" => e.outcome())
                    .increment(1);
                // A mismatch is normal for a moment (a revocation still on
                // its way); lasting, it is a cache withholding one, and the
                // follower goes stale.
                tracing::debug!(error = %e, "checkpoint proves nothing");
            }
        }
        self.status.send_replace(status);
        self.publish_metrics(now);
    }

    fn set_connected(&self, connected: bool) {
        let status = {
            let mut g = self.state.write().unwrap_or_else(|p| p.into_inner());
            g.status.connected = connected;
            g.status
        };
        self.status.send_replace(status);
    }

    fn publish_metrics(&self, now: Duration) {
        let g = self.read();
        let staleness = g.staleness(now).map_or(f64::INFINITY, |s| s.as_secs_f64());
        metrics::gauge!("lattice_verifier_staleness_seconds").set(staleness);
        metrics::gauge!("lattice_verifier_applied_seq").set(g.status.applied_seq as f64);
    }
}

/// Aborts a background task when the last handle goes.
#[derive(Debug)]
struct TaskGuard(tokio::task::AbortHandle);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows one cache's revocation stream, reconnecting with capped backoff
/// and resuming after the last sequence it holds. Cheap to clone; the
/// background task ends when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct RevocationFollower {
    shared: Arc<FollowerShared>,
    _task: Arc<TaskGuard>,
}

impl RevocationFollower {
    /// Starts following on `client` (already configured for mTLS with a
    /// lattice identity). Must be called within a tokio runtime.
    pub fn start(
        client: CacheClient<Channel>,
        bundle: Arc<TrustBundle>,
        clock: SharedClock,
        max_staleness: Duration,
    ) -> RevocationFollower {
        let shared = Arc::new(FollowerShared {
            clock,
            max_staleness,
            state: RwLock::new(FollowerState::new(bundle)),
            status: watch::channel(FollowerStatus::default()).0,
        });
        let client = client.max_decoding_message_size(crate::limits::MAX_MESSAGE_BYTES);
        let task = tokio::spawn(follow(shared.clone(), client));
        RevocationFollower {
            shared,
            _task: Arc::new(TaskGuard(task.abort_handle())),
        }
    }

    pub fn status(&self) -> FollowerStatus {
        self.shared.read().status
    }

    /// Every status change (each notice, connect, disconnect): wait on this
    /// instead of sleeping.
    pub fn subscribe(&self) -> watch::Receiver<FollowerStatus> {
        self.shared.status.subscribe()
    }

    pub fn applied_seq(&self) -> u64 {
        self.status().applied_seq
    }

    pub fn max_staleness(&self) -> Duration {
        self.shared.max_staleness
    }

    /// How long ago the follower was last fresh; `None`: never.
    pub fn staleness(&self) -> Option<Duration> {
        self.shared.read().staleness(self.shared.clock.monotonic())
    }

    pub fn is_fresh(&self) -> bool {
        self.check_fresh().is_ok()
    }

    /// `Err(Stale)` when revocations may be missing.
    pub fn check_fresh(&self) -> Result<(), VerifyError> {
        let now = self.shared.clock.monotonic();
        self.shared
            .read()
            .check_fresh(now, self.shared.max_staleness)
    }

    /// Checks claims verified elsewhere: refuses when stale, then when any
    /// revocation rule applies (the signing key certificate is not checked
    /// here: [`Verifier`] does it).
    pub fn check(&self, claims: &Claims) -> Result<(), VerifyError> {
        self.check_with(claims, None, None)
    }

    fn check_with(
        &self,
        claims: &Claims,
        signer_serial: Option<&str>,
        client_cert: Option<&ClientCert>,
    ) -> Result<(), VerifyError> {
        let now = self.shared.clock.monotonic();
        self.shared.read().check(
            now,
            self.shared.max_staleness,
            claims,
            signer_serial,
            client_cert,
        )
    }

    /// Resolves once the follower is fresh (at a notice or at once).
    pub async fn wait_fresh(&self) {
        self.wait_until(|_| self.is_fresh()).await;
    }

    /// Resolves once every revocation up to `seq` has been applied.
    pub async fn wait_applied(&self, seq: u64) {
        self.wait_until(|s| s.applied_seq >= seq).await;
    }

    async fn wait_until(&self, mut done: impl FnMut(&FollowerStatus) -> bool) {
        let mut rx = self.subscribe();
        loop {
            if done(&rx.borrow_and_update()) {
                return;
            }
            // The sender lives in `shared`, which we hold: never closed.
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

async fn follow(shared: Arc<FollowerShared>, mut client: CacheClient<Channel>) {
    let mut backoff = Backoff::with(BACKOFF_MIN, BACKOFF_MAX, 0.5);
    let mut failures = 0u32;
    loop {
        let after = shared.read().status.applied_seq;
        match client
            .watch_revocations(pb::WatchRevocationsRequest { after_seq: after })
            .await
        {
            Ok(resp) => {
                shared.set_connected(true);
                tracing::info!(after_seq = after, "following revocations");
                let mut stream = resp.into_inner();
                let why = loop {
                    match tokio::time::timeout(WATCH_SILENCE, stream.message()).await {
                        Ok(Ok(Some(n))) => {
                            backoff.succeeded();
                            failures = 0;
                            match Notice::from_wire(&n) {
                                Ok(n) => shared.on_notice(&n),
                                Err(e) => {
                                    // A cache validated it already: only a newer
                                    // protocol gets here. Not skipped: the
                                    // stream is read again from before it, so
                                    // this verifier goes stale (fails closed)
                                    // until it is upgraded.
                                    metrics::counter!("lattice_verifier_invalid_notices_total")
                                        .increment(1);
                                    tracing::error!(seq = n.seq, error = %e, "a revocation this verifier cannot read; refusing to go on without it");
                                    break format!("unreadable revocation at seq {}: {e}", n.seq);
                                }
                            }
                        }
                        Ok(Ok(None)) => break "the cache ended the stream".to_owned(),
                        Ok(Err(s)) => break format!("{:?}: {}", s.code(), s.message()),
                        Err(_) => break format!("silent for {WATCH_SILENCE:?}"),
                    }
                };
                shared.set_connected(false);
                tracing::warn!(reason = %why, "revocation stream lost; reconnecting");
            }
            Err(s) => {
                failures = failures.saturating_add(1);
                // Once per outage at warn; the retries at debug.
                if failures == 1 {
                    tracing::warn!(code = ?s.code(), message = s.message(), "cannot open the revocation stream; retrying");
                } else {
                    tracing::debug!(code = ?s.code(), message = s.message(), failures, "revocation stream still unavailable");
                }
            }
        }
        metrics::counter!("lattice_verifier_watch_reconnects_total").increment(1);
        tokio::time::sleep(backoff.failed(Duration::ZERO)).await;
    }
}

// ---------------------------------------------------------------------------
// The verifier.

#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// `L`: refuse when revocation knowledge is older than this. Use the
    /// caches' value; a longer one weakens the revocation guarantee.
    pub max_staleness: Duration,
    pub jwks_refresh: Duration,
    pub jwks_refetch_min_interval: Duration,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            max_staleness: DEFAULT_MAX_STALENESS,
            jwks_refresh: DEFAULT_JWKS_REFRESH,
            jwks_refetch_min_interval: DEFAULT_JWKS_REFETCH_MIN_INTERVAL,
        }
    }
}

/// One fetched JWKS.
#[derive(Debug)]
struct Keys {
    tokens: TokenVerifier,
    /// kid → what the key's certificate says of its signer.
    signers: HashMap<String, Signer>,
    generation: u64,
}

/// The certificate of a signing key, as read from the JWKS `x5c` (the
/// token verifier verifies it to the root before any token it signed is
/// accepted).
#[derive(Debug, Clone)]
struct Signer {
    /// Serial (hex), for revocation checks.
    serial: String,
    /// The cache the root certified the key for: a token it signed is
    /// confined to that cache's trust domain and region.
    cache: Option<SpiffeId>,
}

#[derive(Debug, Clone)]
struct KeySource {
    client: CacheClient<Channel>,
    bundle: Arc<TrustBundle>,
    clock: SharedClock,
    keys: Arc<RwLock<Arc<Keys>>>,
}

impl KeySource {
    fn current(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn refresh(&self) -> Result<(), VerifyError> {
        let r = self.fetch().await;
        metrics::counter!("lattice_verifier_jwks_fetches_total",
            "outcome" => if r.is_ok() { "ok" } else { "failed" })
        .increment(1);
        let (jwks, signers) = r?;
        let mut g = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let generation = g.generation + 1;
        *g = Arc::new(Keys {
            tokens: TokenVerifier::new(jwks, self.bundle.clone(), self.clock.clone()),
            signers,
            generation,
        });
        Ok(())
    }

    async fn fetch(&self) -> Result<(JwkSet, HashMap<String, Signer>), VerifyError> {
        let unavailable = |m: String| VerifyError::Cache(m);
        let mut client = self.client.clone();
        let json = tokio::time::timeout(JWKS_TIMEOUT, client.jwks(pb::JwksRequest {}))
            .await
            .map_err(|_| unavailable("the JWKS request timed out".into()))?
            .map_err(|s| unavailable(format!("JWKS: {:?}: {}", s.code(), s.message())))?
            .into_inner()
            .jwks_json;
        if json.len() > MAX_JWKS_BYTES {
            return Err(unavailable("the JWKS is too large".into()));
        }
        let jwks: JwkSet = serde_json::from_str(&json)
            .map_err(|e| unavailable(format!("the JWKS is malformed: {e}")))?;
        if jwks.keys.len() > MAX_JWKS_KEYS {
            return Err(unavailable("the JWKS has too many keys".into()));
        }
        // Keys without a readable certificate stay in the set: the token
        // verifier refuses them.
        let signers = jwks
            .keys
            .iter()
            .filter_map(|k| {
                let kid = k.common.key_id.clone()?;
                let der = crate::serde_b64::decode(k.common.x509_chain.as_ref()?.first()?).ok()?;
                let info = crate::pki::inspect(&der).ok()?;
                let signer = Signer {
                    serial: info.serial_hex,
                    cache: info.id,
                };
                Some((kid, signer))
            })
            .collect();
        Ok((jwks, signers))
    }
}

#[derive(Debug)]
struct VerifierInner {
    keys: KeySource,
    follower: RevocationFollower,
    cfg: VerifierConfig,
    /// Local monotonic time of the last fetch for an unknown `kid`.
    last_refetch: tokio::sync::Mutex<Option<Duration>>,
    _refresher: TaskGuard,
}

/// Verifies lattice tokens for a service: offline signature and claims
/// checks against the JWKS, then revocations as followed from a cache.
/// Cheap to clone; background tasks end with the last clone.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<VerifierInner>,
}

impl Verifier {
    /// Fetches the JWKS (failing if the cache cannot be asked) and starts
    /// following revocations on `client`, which must present a lattice
    /// identity. The verifier refuses as stale until the first heartbeat:
    /// see [`RevocationFollower::wait_fresh`].
    pub async fn start(
        client: CacheClient<Channel>,
        bundle: Arc<TrustBundle>,
        clock: SharedClock,
        cfg: VerifierConfig,
    ) -> Result<Verifier, VerifyError> {
        let client = client.max_decoding_message_size(MAX_JWKS_BYTES);
        let keys = KeySource {
            client: client.clone(),
            bundle: bundle.clone(),
            clock: clock.clone(),
            keys: Arc::new(RwLock::new(Arc::new(Keys {
                tokens: TokenVerifier::new(JwkSet { keys: vec![] }, bundle.clone(), clock.clone()),
                signers: HashMap::new(),
                generation: 0,
            }))),
        };
        keys.refresh().await?;
        let refresher = {
            let keys = keys.clone();
            let every = cfg.jwks_refresh.max(Duration::from_secs(1));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await; // the first tick is now: just fetched
                loop {
                    tick.tick().await;
                    if let Err(e) = keys.refresh().await {
                        tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys held");
                    }
                }
            })
        };
        let follower = RevocationFollower::start(client, bundle, clock, cfg.max_staleness);
        Ok(Verifier {
            inner: Arc::new(VerifierInner {
                keys,
                follower,
                cfg,
                last_refetch: tokio::sync::Mutex::new(None),
                _refresher: TaskGuard(refresher.abort_handle()),
            }),
        })
    }

    pub fn follower(&self) -> &RevocationFollower {
        &self.inner.follower
    }

    /// Fetches the JWKS now.
    pub async fn refresh_jwks(&self) -> Result<(), VerifyError> {
        self.inner.keys.refresh().await
    }

    /// Verifies `token` for `audience`: signature, claims and the key's
    /// certification; then refuses when stale; then when revoked.
    pub async fn verify(&self, token: &str, audience: &str) -> Result<Claims, VerifyError> {
        self.record(self.decide(token, audience, None).await)
    }

    /// As [`Verifier::verify`], and the token must be bound (RFC 8705
    /// `cnf.x5t#S256`) to the client certificate the caller presented on
    /// this connection. `peer_chain` is that chain as presented (leaf first,
    /// then the issuing cache's CA: what rustls's `peer_certificates()`
    /// returns). The chain must verify to the root, the leaf must name the
    /// token's `sub`, and neither it nor the CA that issued it may be revoked.
    pub async fn verify_bound<C: AsRef<[u8]>>(
        &self,
        token: &str,
        audience: &str,
        peer_chain: &[C],
    ) -> Result<Claims, VerifyError> {
        let chain: Vec<&[u8]> = peer_chain.iter().map(AsRef::as_ref).collect();
        self.record(self.decide(token, audience, Some(&chain)).await)
    }

    fn record(&self, r: Result<Claims, VerifyError>) -> Result<Claims, VerifyError> {
        let outcome = match &r {
            Ok(_) => "accepted",
            Err(e) => e.outcome(),
        };
        metrics::counter!("lattice_verifier_decisions_total", "outcome" => outcome).increment(1);
        match &r {
            Ok(c) => tracing::debug!(outcome, sub = %c.sub, "token accepted"),
            Err(e) => tracing::debug!(outcome, error = %e, "token refused"),
        }
        if let Some(s) = self.inner.follower.staleness() {
            metrics::gauge!("lattice_verifier_staleness_seconds").set(s.as_secs_f64());
        }
        r
    }

    async fn decide(
        &self,
        token: &str,
        audience: &str,
        peer_chain: Option<&[&[u8]]>,
    ) -> Result<Claims, VerifyError> {
        let mut keys = self.inner.keys.current();
        let claims = match keys.tokens.verify(token, audience) {
            Err(TokenError::UnknownKey(_))
                if self.refetch_for_unknown_key(keys.generation).await =>
            {
                keys = self.inner.keys.current();
                keys.tokens.verify(token, audience)?
            }
            r => r?,
        };
        // Verified above, so the header decodes and names a key we hold,
        // whose certificate the root issued to a cache.
        let kid = jsonwebtoken::decode_header(token)
            .ok()
            .and_then(|h| h.kid)
            .unwrap_or_default();
        let signer = keys.signers.get(&kid);
        let cache = signer
            .and_then(|s| s.cache.as_ref())
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        crate::token::check_confinement(&claims, cache)?;
        let client_cert = match peer_chain {
            None => None,
            Some(chain) => Some(self.bound_certificate(&claims, chain)?),
        };
        self.inner.follower.check_with(
            &claims,
            signer.map(|s| s.serial.as_str()),
            client_cert.as_ref(),
        )?;
        Ok(claims)
    }

    /// The client certificate of a bound token: the chain verifies to the
    /// root (so its issuing CA is known for revocation checks), its leaf is
    /// the one `cnf` names and it names the token's subject.
    fn bound_certificate(
        &self,
        claims: &Claims,
        chain: &[&[u8]],
    ) -> Result<ClientCert, VerifyError> {
        let cnf = claims
            .cnf
            .as_ref()
            .ok_or(VerifyError::NotBound("the token carries no cnf"))?;
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(VerifyError::NotBound("no client certificate was presented"))?;
        let intermediates: Vec<rustls_pki_types::CertificateDer<'_>> = intermediates
            .iter()
            .map(|c| rustls_pki_types::CertificateDer::from(*c))
            .collect();
        let keys = &self.inner.keys;
        let (leaf, issuer) = keys
            .bundle
            .verify_path(leaf, &intermediates, keys.clock.now(), Usage::TlsClient)
            .map_err(|e| {
                tracing::debug!(error = %e, "a bound token's client certificate does not verify");
                VerifyError::NotBound("the client certificate chain does not verify")
            })?;
        if leaf.thumbprint_b64() != cnf.x5t_s256 {
            return Err(VerifyError::NotBound(
                "the token was issued for another certificate",
            ));
        }
        if leaf.id.as_ref().map(SpiffeId::as_str) != Some(claims.sub.as_str()) {
            return Err(VerifyError::NotBound(
                "the client certificate names another subject than the token",
            ));
        }
        // The scope rule admits agent leaves from a cache CA only.
        let issuer = issuer.ok_or(VerifyError::NotBound(
            "the client certificate was not issued by a cache",
        ))?;
        Ok(ClientCert { leaf, issuer })
    }

    /// Fetches the JWKS for a token naming a key we do not hold, at most
    /// once per `jwks_refetch_min_interval`. True when the keys changed
    /// since `seen` (worth verifying again).
    async fn refetch_for_unknown_key(&self, seen: u64) -> bool {
        // Concurrent callers queue here and reuse the first one's fetch.
        let mut last = self.inner.last_refetch.lock().await;
        if self.inner.keys.current().generation != seen {
            return true;
        }
        let now = self.inner.keys.clock.monotonic();
        if last.is_some_and(|t| now.saturating_sub(t) < self.inner.cfg.jwks_refetch_min_interval) {
            return false;
        }
        *last = Some(now);
        match self.inner.keys.refresh().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "JWKS fetch for an unknown key failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock as _, FakeClock};
    use crate::freshness::GENESIS;
    use crate::policy::sign::PolicySigner;
    use crate::revocation::Target;

    const L: Duration = Duration::from_secs(5);

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).expect("valid id")
    }

    fn claims() -> Claims {
        Claims {
            iss: "spiffe://t/cache/eu/c1".into(),
            sub: "spiffe://t/agent/eu/a".into(),
            aud: "https://api".into(),
            scope: "read".into(),
            jti: "j1".into(),
            iat: 1000,
            nbf: 1000,
            exp: 1300,
            cnf: None,
            act: None,
            parent_jtis: vec![],
        }
    }

    fn revoked(target: Target) -> RevocationSet {
        let mut set = RevocationSet::default();
        set.apply(&Revocation {
            target,
            reason: "test".into(),
        });
        set
    }

    /// A heartbeat relaying `checkpoint` (and a cache staleness of 0,
    /// which proves nothing).
    fn heartbeat(seq: u64, checkpoint: Option<pb::FreshnessCheckpoint>) -> Notice {
        Notice::from_wire(&pb::RevocationNotice {
            seq,
            revocation: None,
            cache_staleness_ms: 0,
            checkpoint,
        })
        .expect("a heartbeat is valid")
    }

    /// A follower on the fake clock's wall time, and a control-plane
    /// signer its root certified.
    fn follower(clock: &FakeClock) -> (FollowerState, PolicySigner) {
        let (bundle, signer) = crate::freshness::test_signer(clock.now());
        (FollowerState::new(Arc::new(bundle)), signer)
    }

    fn checkpoint(
        signer: &PolicySigner,
        head: u64,
        at_unix_ms: i64,
        chain: &crate::freshness::Link,
    ) -> Option<pb::FreshnessCheckpoint> {
        Some(crate::freshness::sign(signer, head, at_unix_ms, chain).expect("sign"))
    }

    /// A state fresh now, holding `set`.
    fn fresh_with(set: RevocationSet, now: Duration) -> FollowerState {
        let (mut st, _) = follower(&FakeClock::new());
        st.set = set;
        st.status.fresh_as_of = Some(now);
        st
    }

    /// The shared rule, as the verifier reports it.
    fn check_revocations(
        set: &RevocationSet,
        claims: &Claims,
        signer_serial: Option<&str>,
    ) -> Result<(), VerifyError> {
        Ok(set.check_token(claims, signer_serial)?)
    }

    fn reason(r: Result<(), VerifyError>) -> RevocationReason {
        match r {
            Err(VerifyError::Revoked(r)) => r,
            other => panic!("expected a revocation, got {other:?}"),
        }
    }

    #[test]
    fn stale_until_a_verified_checkpoint_then_by_its_age() {
        let clock = FakeClock::new();
        clock.advance(Duration::from_secs(100));
        let (mut st, signer) = follower(&clock);
        let ms = || clock.now_unix_ms();
        let e = st
            .check_fresh(clock.monotonic(), L)
            .expect_err("never heard");
        assert!(e.to_string().contains("never fresh"), "{e}");

        // A cache that says it is fresh, without a checkpoint, proves nothing.
        st.on_notice(clock.monotonic(), ms(), &heartbeat(3, None));
        assert!(st.check_fresh(clock.monotonic(), L).is_err());
        assert_eq!(st.status.applied_seq, 3);

        // Heard at m=100 s, a checkpoint made 2 s ago: fresh as of 98 s.
        let cp = checkpoint(&signer, 3, ms() - 2000, &GENESIS);
        assert_eq!(
            st.on_notice(clock.monotonic(), ms(), &heartbeat(3, cp)),
            Some(Ok(Duration::from_secs(98)))
        );
        assert_eq!(st.status.fresh_as_of, Some(Duration::from_secs(98)));
        clock.advance(Duration::from_secs(3));
        assert!(st.check_fresh(clock.monotonic(), L).is_ok(), "exactly L");
        clock.advance(Duration::from_millis(1));
        match st.check_fresh(clock.monotonic(), L) {
            Err(VerifyError::Stale {
                staleness_ms: Some(5001),
                max_staleness_ms: 5000,
            }) => {}
            other => panic!("expected stale, got {other:?}"),
        }

        // An older checkpoint does not move freshness back; a newer one
        // restores it.
        let old = checkpoint(&signer, 3, ms() - 60_000, &GENESIS);
        st.on_notice(clock.monotonic(), ms(), &heartbeat(3, old));
        assert_eq!(st.status.fresh_as_of, Some(Duration::from_secs(98)));
        let new = checkpoint(&signer, 4, ms() - 10, &GENESIS);
        st.on_notice(clock.monotonic(), ms(), &heartbeat(4, new));
        assert!(st.check_fresh(clock.monotonic(), L).is_ok());
        assert_eq!(st.status.applied_seq, 4);
    }

    #[test]
    fn a_withheld_revocation_leaves_the_follower_stale() {
        let clock = FakeClock::new();
        clock.advance(Duration::from_secs(100));
        let (mut st, signer) = follower(&clock);
        let ms = clock.now_unix_ms();
        let withheld: pb::Revocation = (&Revocation {
            target: Target::Jti("j1".into()),
            reason: String::new(),
        })
            .into();
        let chain = crate::freshness::next_link(&GENESIS, 2, &withheld);
        let cp = checkpoint(&signer, 2, ms, &chain);
        assert_eq!(
            st.on_notice(clock.monotonic(), ms, &heartbeat(2, cp)),
            Some(Err(Unproven::Mismatch(2)))
        );
        assert!(st.check_fresh(clock.monotonic(), L).is_err());
        // A checkpoint from before the revocation still proves the past.
        let before = checkpoint(&signer, 1, ms, &GENESIS);
        st.on_notice(clock.monotonic(), ms, &heartbeat(2, before));
        assert!(st.check_fresh(clock.monotonic(), L).is_ok());
        clock.advance(L + Duration::from_millis(1));
        assert!(st.check_fresh(clock.monotonic(), L).is_err());
    }

    #[test]
    fn revocation_notices_apply_once_and_do_not_move_freshness() {
        let agent = id("spiffe://t/agent/eu/a");
        let r = Revocation {
            target: Target::Agent(agent.clone()),
            reason: String::new(),
        };
        let notice = |seq| Notice {
            seq,
            revocation: Some((r.clone(), (&r).into())),
            checkpoint: None,
        };
        let (mut st, _) = follower(&FakeClock::new());
        st.on_notice(Duration::from_secs(10), 0, &notice(7));
        st.on_notice(Duration::from_secs(10), 0, &notice(7));
        assert_eq!(st.set.len(), 1, "a repeated notice is not applied twice");
        assert!(st.set.is_agent_revoked(&agent));
        assert_eq!(st.status.applied_seq, 7);
        assert_eq!(
            st.status.fresh_as_of, None,
            "backlog notices vouch for nothing"
        );
    }

    #[test]
    fn a_token_is_refused_when_it_or_any_parent_is_revoked() {
        use crate::token::Actor;
        let mut c = claims();
        let empty = RevocationSet::default();
        assert!(check_revocations(&empty, &c, None).is_ok());
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Jti("j1".into())),
                &c,
                None
            )),
            RevocationReason::Token("j1".into())
        );
        c.parent_jtis = vec!["p0".into(), "p1".into()];
        c.act = Some(Actor {
            sub: "spiffe://t/agent/eu/a/planner".into(),
            act: None,
        });
        assert!(check_revocations(&empty, &c, None).is_ok());
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Jti("p1".into())),
                &c,
                None
            )),
            RevocationReason::Parent("p1".into())
        );
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Jti("p0".into())),
                &c,
                None
            )),
            RevocationReason::Parent("p0".into())
        );
    }

    #[test]
    fn subjects_actors_issuers_and_signing_keys_are_checked() {
        use crate::token::Actor;
        let mut c = claims();
        let a = id("spiffe://t/agent/eu/a");
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Agent(a.clone())),
                &c,
                None
            )),
            RevocationReason::Agent(a.clone())
        );
        // The cutoff: issued strictly before it is refused.
        let cut = |t| {
            revoked(Target::SubjectBefore {
                subject: a.clone(),
                issued_before_unix: t,
            })
        };
        assert!(
            check_revocations(&cut(1000), &c, None).is_ok(),
            "iat == cutoff"
        );
        assert_eq!(
            reason(check_revocations(&cut(1001), &c, None)),
            RevocationReason::Cutoff(a.clone())
        );

        // A revoked actor deep in the chain.
        let deep = id("spiffe://t/agent/eu/deep");
        c.act = Some(Actor {
            sub: "spiffe://t/agent/eu/b/planner".into(),
            act: Some(Box::new(Actor {
                sub: format!("{deep}/summariser"),
                act: None,
            })),
        });
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Agent(deep.clone())),
                &c,
                None
            )),
            RevocationReason::Agent(deep)
        );

        let cache = id("spiffe://t/cache/eu/c1");
        assert_eq!(
            reason(check_revocations(
                &revoked(Target::Cache(cache.clone())),
                &c,
                None
            )),
            RevocationReason::Issuer(cache)
        );
        let serials = revoked(Target::CertSerial("0abc".into()));
        assert!(check_revocations(&serials, &c, Some("0def")).is_ok());
        assert_eq!(
            reason(check_revocations(&serials, &c, Some("0abc"))),
            RevocationReason::SigningKey("0abc".into())
        );

        c.sub = "not an id".into();
        assert!(matches!(
            check_revocations(&RevocationSet::default(), &c, None),
            Err(VerifyError::Token(TokenError::Malformed(_)))
        ));
    }

    #[test]
    fn stale_is_decided_before_revocations_and_is_unavailable() {
        let clock = FakeClock::new();
        clock.advance(Duration::from_secs(60));
        let mut st = fresh_with(revoked(Target::Jti("j1".into())), clock.monotonic());
        st.status.fresh_as_of = None;
        let e = st
            .check(clock.monotonic(), L, &claims(), None, None)
            .expect_err("never fresh");
        assert!(e.is_unavailable());
        assert_eq!(e.outcome(), "stale");
        st.status.fresh_as_of = Some(clock.monotonic());
        let e = st
            .check(clock.monotonic(), L, &claims(), None, None)
            .expect_err("revoked");
        assert!(!e.is_unavailable());
        assert_eq!(e.to_string(), "token j1 has been revoked");
    }

    #[test]
    fn a_revoked_client_certificate_or_its_issuing_ca_is_refused() {
        let mut leaf = CertInfo {
            id: Some(id("spiffe://t/agent/eu/a")),
            serial_hex: "aa".into(),
            not_before: std::time::UNIX_EPOCH,
            not_after: std::time::UNIX_EPOCH + Duration::from_secs(5000),
            is_ca: false,
            sha256: [0; 32],
            eku_client_auth: true,
            eku_server_auth: false,
            org_unit: None,
        };
        let mut issuer = leaf.clone();
        issuer.id = Some(id("spiffe://t/cache/eu/c1"));
        issuer.serial_hex = "ca".into();
        issuer.is_ca = true;
        let mut set = revoked(Target::CertSerial("aa".into()));
        set.apply(&Revocation {
            target: Target::CertSerial("ca".into()),
            reason: String::new(),
        });
        let now = Duration::from_secs(60);
        let st = fresh_with(set, now);
        assert!(st.check(now, L, &claims(), None, None).is_ok());
        let cert = |leaf: &CertInfo, issuer: &CertInfo| ClientCert {
            leaf: leaf.clone(),
            issuer: issuer.clone(),
        };
        let refused = |r| {
            matches!(
                r,
                Err(VerifyError::Revoked(RevocationReason::ClientCertificate(_)))
            )
        };
        assert!(refused(st.check(
            now,
            L,
            &claims(),
            None,
            Some(&cert(&leaf, &issuer))
        )));
        leaf.serial_hex = "bb".into();
        assert!(
            refused(st.check(now, L, &claims(), None, Some(&cert(&leaf, &issuer)))),
            "the issuing CA is revoked"
        );
        issuer.serial_hex = "cb".into();
        assert!(
            st.check(now, L, &claims(), None, Some(&cert(&leaf, &issuer)))
                .is_ok()
        );
    }
}

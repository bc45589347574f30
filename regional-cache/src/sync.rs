//! The cache's side of the `Sync` stream and its freshness.
//!
//! Events are applied in sequence order (a gap or a duplicate drops the
//! stream and resumes from the last durable sequence), enforced in memory at
//! once, made durable, then acked. Every L/5 the cache sends a ping stamped
//! with its own monotonic clock; when it has applied the head that the
//! control plane returns, it is fresh as of the ping's send time. It refuses
//! to mint when `now − fresh_as_of > L`. Only monotonic clocks are involved.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use lattice_shared::clock::SharedClock;
use lattice_shared::pki::CertInfo;
use lattice_shared::proto::{self as pb, sync_down::Msg as Down, sync_up::Msg as Up};
use lattice_shared::revocation::{Revocation, RevocationSet};
use lattice_shared::store::{SharedStore, Write};
use prost::Message;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::{Error, State};

const T_EVENTS: &str = "events";
const T_META: &str = "meta";
const APPLIED_KEY: &[u8] = b"applied_seq";
const MAX_PENDING: usize = 64;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the persister waits to gather batches into one fsync.
const PERSIST_DELAY: Duration = Duration::from_millis(2);
/// Largest batch accepted from the control plane.
const MAX_BATCH: usize = 1024;

/// Why a cache refuses to mint or renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Freshness older than L (or never fresh).
    Stale {
        staleness_ms: Option<u64>,
    },
    Revoked(String),
}

#[derive(Debug, Default)]
struct Inner {
    applied: u64,
    fresh_as_of: Option<Duration>,
    /// (ping send time, head the pong named), oldest first.
    pending: VecDeque<(Duration, u64)>,
    /// Pings in flight: id → our own send time (the echo is not trusted).
    pings: HashMap<u64, Duration>,
    revocations: RevocationSet,
    connected: bool,
}

/// What a cache needs to accept policy releases: the root that signs the
/// control plane's policy key, and where releases go into force.
#[derive(Debug, Clone)]
pub struct PolicyTrust {
    pub root_der: Vec<u8>,
    pub trust_domain: lattice_shared::id::TrustDomain,
    pub authorizer: Arc<crate::authz::PolicyAuthorizer>,
}

/// Freshness and revocations of one cache.
#[derive(Debug)]
pub struct Sync {
    cache_id: lattice_shared::id::SpiffeId,
    me: String,
    policy: Option<PolicyTrust>,
    inner: RwLock<Inner>,
    clock: SharedClock,
    max_staleness: Duration,
    applied_tx: watch::Sender<u64>,
    /// Highest sequence enforced in memory (may run ahead of `applied`).
    enforced_tx: watch::Sender<u64>,
    fresh_tx: watch::Sender<Option<Duration>>,
    notices: broadcast::Sender<(u64, pb::Revocation)>,
    ping_now: Notify,
    /// Envelopes of the secrets streamed to this cache (sealed).
    pub secrets: crate::secrets::SecretIndex,
}

use lattice_shared::eventlog::seq_key;

impl Sync {
    /// Replays the events held durably; the newest policy release that
    /// verifies goes into force.
    pub fn load(
        cache_id: lattice_shared::id::SpiffeId,
        store: &SharedStore,
        clock: SharedClock,
        max_staleness: Duration,
        policy: Option<PolicyTrust>,
    ) -> Result<Self, Error> {
        let applied = lattice_shared::eventlog::read_seq(&**store, T_META, APPLIED_KEY)?;
        let replayed = lattice_shared::eventlog::replay(&**store, T_EVENTS, applied)?;
        let revocations = replayed.revocations;
        let secrets = crate::secrets::SecretIndex::default();
        let me = cache_id.to_string();
        for (_, ev) in &replayed.secrets {
            secrets.apply(&me, ev);
        }
        if let Some(trust) = &policy {
            for (seq, signed) in replayed.policies.iter().rev() {
                match accept_release(trust, &revocations, 0, signed) {
                    Ok(engine) => {
                        tracing::info!(seq, version = engine.version(), "policy release restored");
                        trust.authorizer.install(engine);
                        break;
                    }
                    Err(e) => tracing::warn!(seq, error = %e, "stored policy release refused"),
                }
            }
        }
        Ok(Self {
            policy,
            cache_id,
            inner: RwLock::new(Inner {
                applied,
                revocations,
                ..Inner::default()
            }),
            clock,
            max_staleness,
            applied_tx: watch::channel(applied).0,
            enforced_tx: watch::channel(applied).0,
            fresh_tx: watch::channel(None).0,
            notices: broadcast::channel(1024).0,
            ping_now: Notify::new(),
            secrets,
            me,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn max_staleness(&self) -> Duration {
        self.max_staleness
    }
    pub fn applied(&self) -> u64 {
        self.read().applied
    }
    pub fn connected(&self) -> bool {
        self.read().connected
    }
    /// Without cloning the set (a lease asks this every time).
    pub fn is_secret_version_revoked(&self, name: &str, version: u64) -> bool {
        self.read()
            .revocations
            .is_secret_version_revoked(name, version)
    }
    pub fn revocations(&self) -> RevocationSet {
        self.read().revocations.clone()
    }
    /// Milliseconds since the cache was last known fresh (`None`: never).
    pub fn staleness_ms(&self) -> Option<u64> {
        let fresh = self.read().fresh_as_of?;
        Some(
            u64::try_from(self.clock.monotonic().saturating_sub(fresh).as_millis())
                .unwrap_or(u64::MAX),
        )
    }
    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }
    /// Sequences enforced in memory: a revocation is honoured from here on,
    /// before it is durable.
    pub fn subscribe_enforced(&self) -> watch::Receiver<u64> {
        self.enforced_tx.subscribe()
    }
    pub fn subscribe_fresh(&self) -> watch::Receiver<Option<Duration>> {
        self.fresh_tx.subscribe()
    }
    pub fn subscribe_notices(&self) -> broadcast::Receiver<(u64, pb::Revocation)> {
        self.notices.subscribe()
    }
    /// Sends a freshness ping now instead of at the next tick.
    pub fn ping_now(&self) {
        self.ping_now.notify_one();
    }

    pub fn is_fresh(&self) -> bool {
        let now = self.clock.monotonic();
        self.read()
            .fresh_as_of
            .is_some_and(|f| now.saturating_sub(f) <= self.max_staleness)
    }

    /// May this cache serve a credential to the holder of `cert` (issued by
    /// `issuer`) now? Freshness and revocations are read together.
    pub fn check(
        &self,
        cert: &CertInfo,
        issuer: Option<&CertInfo>,
        signer_serial: &str,
    ) -> Result<(), Refusal> {
        let now = self.clock.monotonic();
        let g = self.read();
        let staleness = g.fresh_as_of.map(|f| now.saturating_sub(f));
        if staleness.is_none_or(|s| s > self.max_staleness) {
            return Err(Refusal::Stale {
                staleness_ms: staleness.map(|s| u64::try_from(s.as_millis()).unwrap_or(u64::MAX)),
            });
        }
        if g.revocations.is_cache_revoked(&self.cache_id)
            || g.revocations.is_serial_revoked(signer_serial)
        {
            return Err(Refusal::Revoked(format!(
                "this cache ({}) or its signing key has been revoked",
                self.cache_id
            )));
        }
        g.revocations
            .check_cert(cert, issuer)
            .map_err(Refusal::Revoked)
    }

    /// The revocation rules alone (for the TLS handshake).
    pub fn check_cert(&self, cert: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        self.read().revocations.check_cert(cert, issuer)
    }

    pub fn is_join_token_revoked(&self, hash: &[u8; 32]) -> bool {
        self.read().revocations.is_join_token_revoked(hash)
    }
    /// Whether a token (or one it descends from) is revoked: the shared
    /// rule. Kept for the cache's exchange path until it switches to
    /// `RevocationSet::check_token` and its `RevocationReason`.
    pub fn check_token(&self, c: &lattice_shared::token::Claims) -> Result<(), String> {
        self.read()
            .revocations
            .check_token(c, None)
            .map_err(|r| r.to_string())
    }
    pub fn is_jti_revoked(&self, jti: &str) -> bool {
        self.read().revocations.is_jti_revoked(jti)
    }
    pub fn is_agent_revoked(&self, id: &lattice_shared::id::SpiffeId) -> bool {
        self.read().revocations.is_agent_revoked(id)
    }

    /// A policy release arrived: verify it and put it in force, or refuse
    /// it and keep the one in force. Either way the event is applied, so
    /// the stream goes on.
    fn on_release(&self, seq: u64, signed: &pb::SignedPolicy) {
        let Some(trust) = &self.policy else {
            return;
        };
        let current = trust.authorizer.version();
        let revocations = self.read().revocations.clone();
        match accept_release(trust, &revocations, current, signed) {
            Ok(engine) => {
                tracing::info!(seq, version = engine.version(), "policy release in force");
                metrics::counter!("lattice_cache_policy_releases_total", "outcome" => "accepted")
                    .increment(1);
                trust.authorizer.install(engine);
            }
            Err(e) => {
                tracing::error!(seq, kept_version = current, error = %e, "policy release refused; keeping the one in force");
                metrics::counter!("lattice_cache_policy_releases_total", "outcome" => "refused")
                    .increment(1);
            }
        }
    }

    fn on_pong(&self, pong: &pb::FreshnessPong) {
        let mut g = self.write();
        let Some(sent) = g.pings.remove(&pong.ping_id) else {
            return;
        };
        if g.pending.len() == MAX_PENDING {
            g.pending.pop_front();
        }
        g.pending.push_back((sent, pong.head_seq));
        self.advance_freshness(&mut g);
    }

    fn advance_freshness(&self, g: &mut Inner) {
        let mut changed = false;
        while let Some(&(sent, head)) = g.pending.front() {
            if head > g.applied {
                break;
            }
            g.pending.pop_front();
            if g.fresh_as_of.is_none_or(|f| sent > f) {
                g.fresh_as_of = Some(sent);
                changed = true;
            }
        }
        if changed {
            self.fresh_tx.send_replace(g.fresh_as_of);
        }
    }

    fn new_ping(&self, rng: &SystemRandom) -> pb::FreshnessPing {
        let mut id = [0u8; 8];
        let _ = rng.fill(&mut id);
        let id = u64::from_le_bytes(id);
        let sent = self.clock.monotonic();
        let mut g = self.write();
        if g.pings.len() >= MAX_PENDING {
            g.pings.clear(); // unanswered: the link is likely dead
        }
        g.pings.insert(id, sent);
        pb::FreshnessPing {
            ping_id: id,
            sent_mono_ms: u64::try_from(sent.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Applies a batch that must continue exactly where we are: enforce in
    /// memory, make durable, then count it as applied. Returns the new
    /// applied sequence.
    #[cfg(test)]
    fn apply_batch(&self, store: &SharedStore, events: &[pb::LatticeEvent]) -> Result<u64, Error> {
        let decoded = self.enforce(events, self.applied() + 1)?;
        self.persist(store, events, &decoded)
    }

    /// Checks that `events` start exactly at `first` (a gap or a duplicate
    /// is an error that forces a resync) and enforces them in memory at once,
    /// before they are durable: no I/O here.
    fn enforce(
        &self,
        events: &[pb::LatticeEvent],
        first: u64,
    ) -> Result<Vec<Option<Revocation>>, Error> {
        let mut decoded = Vec::with_capacity(events.len());
        for (i, ev) in events.iter().enumerate() {
            let want = first + i as u64;
            if ev.seq != want {
                return Err(Error::ControlPlane(format!(
                    "sequence gap: expected {want}, got {}",
                    ev.seq
                )));
            }
            let r = match &ev.body {
                Some(pb::lattice_event::Body::Revocation(r)) => {
                    Some(Revocation::try_from(r).map_err(|e| Error::ControlPlane(e.to_string()))?)
                }
                Some(pb::lattice_event::Body::Policy(p)) => {
                    self.on_release(ev.seq, p);
                    None
                }
                Some(pb::lattice_event::Body::Secret(e)) => {
                    self.secrets.apply(&self.me, e);
                    None
                }
                None => None,
            };
            decoded.push(r);
        }
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(decoded);
        };
        {
            let mut g = self.write();
            for r in decoded.iter().flatten() {
                g.revocations.apply(r);
            }
        }
        self.enforced_tx.send_if_modified(|e| {
            let grew = last > *e;
            *e = (*e).max(last);
            grew
        });
        Ok(decoded)
    }

    /// Makes enforced events durable, then counts them as applied (which is
    /// what freshness, acks and resumption use).
    fn persist(
        &self,
        store: &SharedStore,
        events: &[pb::LatticeEvent],
        decoded: &[Option<Revocation>],
    ) -> Result<u64, Error> {
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(self.applied());
        };
        let mut writes: Vec<Write> = events
            .iter()
            .map(|e| Write {
                tree: T_EVENTS,
                key: seq_key(e.seq).to_vec(),
                value: Some(e.encode_to_vec()),
            })
            .collect();
        writes.push(Write {
            tree: T_META,
            key: APPLIED_KEY.to_vec(),
            value: Some(last.to_be_bytes().to_vec()),
        });
        store.apply(writes)?;
        {
            let mut g = self.write();
            g.applied = last;
            self.advance_freshness(&mut g);
        }
        self.applied_tx.send_replace(last);
        for (ev, r) in events.iter().zip(decoded) {
            if let Some(r) = r {
                let _ = self.notices.send((ev.seq, r.into()));
            }
        }
        Ok(last)
    }
}

/// Stored revocations after `after`, in order (for `WatchRevocations`).
/// (revocations with their sequence, events scanned, last sequence scanned)
pub type Backlog = (Vec<(u64, pb::Revocation)>, usize, u64);

/// Also returns how many events were scanned and the last one's sequence
/// (events of other kinds may come between revocations).
pub fn revocations_after(store: &SharedStore, after: u64, limit: usize) -> Result<Backlog, Error> {
    let mut out = Vec::new();
    let scanned = store.scan_from(T_EVENTS, &seq_key(after.saturating_add(1)), limit)?;
    let n = scanned.len();
    let mut last = after;
    for (_, v) in scanned {
        let ev =
            pb::LatticeEvent::decode(v.as_slice()).map_err(|e| Error::Corrupt(e.to_string()))?;
        last = ev.seq;
        if let Some(pb::lattice_event::Body::Revocation(r)) = ev.body {
            out.push((ev.seq, r));
        }
    }
    Ok((out, n, last))
}

/// Verifies a release (signature, signer chain, signer not revoked, newer
/// than `current`) and compiles it.
fn accept_release(
    trust: &PolicyTrust,
    revocations: &RevocationSet,
    current: u64,
    signed: &pb::SignedPolicy,
) -> Result<lattice_shared::policy::Engine, String> {
    let verified =
        lattice_shared::policy::sign::verify(signed, &trust.root_der, &trust.trust_domain)
            .map_err(|e| e.to_string())?;
    revocations
        .check_cert(&verified.signer, None)
        .map_err(|e| format!("the policy signing certificate is revoked: {e}"))?;
    let version = verified.release.version;
    if version <= current {
        return Err(format!(
            "release {version} is not newer than the one in force ({current})"
        ));
    }
    lattice_shared::policy::Engine::compile(&verified.files, version).map_err(|e| e.to_string())
}

fn jittered(d: Duration, rng: &SystemRandom) -> Duration {
    let mut b = [0u8; 2];
    let _ = rng.fill(&mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..1
    d.mul_f64(0.5 + frac)
}

/// Publishes staleness (seconds since last fresh; +Inf before the first
/// proof) and the applied sequence.
pub fn publish_metrics(state: &State) {
    let id = state.id.to_string();
    let staleness = state
        .sync
        .staleness_ms()
        .map(|ms| ms as f64 / 1000.0)
        .unwrap_or(f64::INFINITY);
    metrics::gauge!("lattice_cache_staleness_seconds", "cache" => id.clone()).set(staleness);
    metrics::gauge!("lattice_cache_applied_seq", "cache" => id.clone())
        .set(state.sync.applied() as f64);
    metrics::gauge!("lattice_cache_fresh", "cache" => id).set(if state.sync.is_fresh() {
        1.0
    } else {
        0.0
    });
}

/// Runs the sync link until the task is aborted: connect, stream, and on any
/// error reconnect with capped, jittered backoff.
pub(crate) async fn run(state: Arc<State>) {
    let rng = SystemRandom::new();
    let mut backoff = BACKOFF_START;
    loop {
        match session(&state, &rng, &mut backoff).await {
            Ok(()) => {}
            Err(e) => {
                tracing::info!(cache_id = %state.id, error = %e, "sync link down; reconnecting")
            }
        }
        state.sync.write().connected = false;
        metrics::counter!("lattice_cache_sync_reconnects_total", "cache" => state.id.to_string())
            .increment(1);
        tokio::time::sleep(jittered(backoff, &rng)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session(
    state: &Arc<State>,
    rng: &SystemRandom,
    backoff: &mut Duration,
) -> Result<(), Error> {
    let sync = &state.sync;
    let ping_every = (sync.max_staleness / 5).max(Duration::from_millis(10));
    // Silence longer than this means the link is dead even if TCP says not.
    let liveness = (ping_every * 3).max(Duration::from_secs(1));
    let (up, up_rx) = mpsc::channel::<pb::SyncUp>(16);
    up.send(pb::SyncUp {
        msg: Some(Up::Hello(pb::SyncHello {
            resume_after: sync.applied(),
            audit_epoch: state.outbox.epoch(),
        })),
    })
    .await
    .map_err(|_| Error::ControlPlane("closed".into()))?;
    let mut down = tokio::time::timeout(
        liveness,
        state
            .cp
            .clone()
            .sync(tokio_stream::wrappers::ReceiverStream::new(up_rx)),
    )
    .await
    .map_err(|_| Error::ControlPlane("no answer to the sync request".into()))?
    .map_err(|s| Error::ControlPlane(format!("{} ({:?})", s.message(), s.code())))?
    .into_inner();
    sync.write().connected = true;
    *backoff = BACKOFF_START;
    tracing::info!(cache_id = %state.id, applied = sync.applied(), "sync link up");

    // Enforcement never waits for the disk: batches are enforced as they
    // arrive and handed to this persister, which writes them in order (many
    // at once under load: group commit) and acks what is durable.
    let (persist_tx, mut persist_rx) =
        mpsc::channel::<(Vec<pb::LatticeEvent>, Vec<Option<Revocation>>)>(64);
    let mut persister = {
        let state = state.clone();
        let up = up.clone();
        tokio::spawn(async move {
            while let Some((mut events, mut decoded)) = persist_rx.recv().await {
                // A short commit delay: what arrives meanwhile shares the
                // fsync, and the disk work stays out of the way of fanning the
                // event out. Enforcement has already happened.
                tokio::time::sleep(PERSIST_DELAY).await;
                while let Ok((e, d)) = persist_rx.try_recv() {
                    events.extend(e);
                    decoded.extend(d);
                }
                let st = state.clone();
                let last = tokio::task::spawn_blocking(move || {
                    st.sync.persist(&st.store, &events, &decoded)
                })
                .await
                .map_err(|_| Error::Corrupt("worker failed".into()))??;
                metrics::gauge!("lattice_cache_applied_seq", "cache" => state.id.to_string())
                    .set(last as f64);
                if up
                    .send(pb::SyncUp {
                        msg: Some(Up::Ack(pb::SyncAck {
                            seq: last,
                            policy_version: state.policy.version(),
                        })),
                    })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok::<(), Error>(())
        })
    };
    let mut next = sync.applied() + 1;
    let result = stream_loop(
        state,
        rng,
        &up,
        &mut down,
        &persist_tx,
        &mut persister,
        &mut next,
        ping_every,
        liveness,
    )
    .await;
    // Whatever was enforced gets persisted before the next session resumes
    // from the durable sequence.
    drop(persist_tx);
    if !persister.is_finished() {
        let _ = (&mut persister).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn stream_loop(
    state: &Arc<State>,
    rng: &SystemRandom,
    up: &mpsc::Sender<pb::SyncUp>,
    down: &mut tonic::Streaming<pb::SyncDown>,
    persist_tx: &mpsc::Sender<(Vec<pb::LatticeEvent>, Vec<Option<Revocation>>)>,
    persister: &mut tokio::task::JoinHandle<Result<(), Error>>,
    next: &mut u64,
    ping_every: Duration,
    liveness: Duration,
) -> Result<(), Error> {
    let sync = &state.sync;
    let mut tick = tokio::time::interval(ping_every);
    // Audit records go up in order from what the control plane holds;
    // it tells us that first thing (AuditAck).
    let mut audit_sent = state.outbox.acked();
    let mut audit_known = false;
    let mut durable = state.outbox.subscribe_durable();
    // Moved only by a message from the control plane: pings going out do not
    // prove the link works.
    let mut silent_after = tokio::time::Instant::now() + liveness;
    let mut revoke_sent = std::collections::HashSet::new();
    send_revoke_requests(state, up, &mut revoke_sent).await?;
    loop {
        tokio::select! {
            _ = state.issued.changed.notified() => {
                send_revoke_requests(state, up, &mut revoke_sent).await?;
            }
            _ = tokio::time::sleep_until(silent_after) => {
                return Err(Error::ControlPlane("silent link".into()));
            }
            _ = tick.tick() => {
                up.send(pb::SyncUp { msg: Some(Up::Ping(sync.new_ping(rng))) }).await.map_err(|_| Error::ControlPlane("closed".into()))?;
            }
            _ = sync.ping_now.notified() => {
                up.send(pb::SyncUp { msg: Some(Up::Ping(sync.new_ping(rng))) }).await.map_err(|_| Error::ControlPlane("closed".into()))?;
            }
            changed = durable.changed(), if audit_known => {
                if changed.is_err() {
                    return Err(Error::ControlPlane("audit outbox closed".into()));
                }
                send_audit(state, up, &mut audit_sent).await?;
            }
            done = &mut *persister => {
                return match done {
                    Ok(Err(e)) => Err(e),
                    _ => Err(Error::ControlPlane("persister stopped".into())),
                };
            }
            msg = down.message() => {
                let msg = msg
                    .map_err(|s| Error::ControlPlane(format!("{} ({:?})", s.message(), s.code())))?
                    .ok_or_else(|| Error::ControlPlane("stream ended".into()))?;
                silent_after = tokio::time::Instant::now() + liveness;
                match msg.msg {
                    Some(Down::Events(batch)) => {
                        if batch.events.len() > MAX_BATCH {
                            return Err(Error::ControlPlane("batch too large".into()));
                        }
                        let decoded = sync.enforce(&batch.events, *next)?;
                        *next += batch.events.len() as u64;
                        // Only a cache revocation changes the JWKS.
                        if decoded.iter().flatten().any(|r| matches!(r.target, lattice_shared::revocation::Target::Cache(_) | lattice_shared::revocation::Target::CertSerial(_))) {
                            state.after_events();
                        }
                        let revoked_jti = decoded.iter().flatten().any(|r| matches!(r.target, lattice_shared::revocation::Target::Jti(_)));
                        persist_tx.send((batch.events, decoded)).await.map_err(|_| Error::ControlPlane("persister stopped".into()))?;
                        if revoked_jti {
                            // Settles requests that came back; resends the rest.
                            send_revoke_requests(state, up, &mut revoke_sent).await?;
                        }
                    }
                    Some(Down::Pong(p)) => sync.on_pong(&p),
                    Some(Down::AuditAck(a)) => {
                        let outbox = state.outbox.clone();
                        tokio::task::spawn_blocking(move || outbox.ack(a.upto))
                            .await
                            .map_err(|_| Error::Corrupt("worker failed".into()))??;
                        audit_sent = audit_sent.max(a.upto);
                        audit_known = true;
                        send_audit(state, up, &mut audit_sent).await?;
                    }
                    Some(Down::Heartbeat(_)) | None => {}
                }
            }
        }
    }
}

/// Sends the revocations this cache asked for and has not yet seen come
/// back on the event stream.
async fn send_revoke_requests(
    state: &Arc<State>,
    up: &mpsc::Sender<pb::SyncUp>,
    sent: &mut std::collections::HashSet<String>,
) -> Result<(), Error> {
    let sync = &state.sync;
    while let Some(r) = state.issued.pending(|j| sync.is_jti_revoked(j), sent) {
        up.send(pb::SyncUp {
            msg: Some(Up::RevokeIssued(r)),
        })
        .await
        .map_err(|_| Error::ControlPlane("closed".into()))?;
    }
    Ok(())
}

/// Audit records in flight (sent, not acked) at most: the control plane
/// acks each batch on the same stream, so an unbounded window could fill
/// both directions at once and stall the link.
const AUDIT_WINDOW: u64 = 16 * crate::outbox::BATCH as u64;
/// Bytes of records per `AuditBatch`, well under the control plane's
/// message limit (`limits::MAX_MESSAGE_BYTES`).
const AUDIT_BATCH_BYTES: usize = lattice_shared::limits::MAX_MESSAGE_BYTES * 3 / 4;

/// Sends the durable audit records after `sent`, within the window; acks
/// and new records bring the rest.
async fn send_audit(
    state: &Arc<State>,
    up: &mpsc::Sender<pb::SyncUp>,
    sent: &mut u64,
) -> Result<(), Error> {
    while *sent < state.outbox.acked() + AUDIT_WINDOW {
        let outbox = state.outbox.clone();
        let after = *sent;
        let (first, mut records) = tokio::task::spawn_blocking(move || outbox.read_after(after))
            .await
            .map_err(|_| Error::Corrupt("worker failed".into()))??;
        if records.is_empty() {
            return Ok(());
        }
        // Under the control plane's message limit (one record at least; a
        // record is far smaller than the limit).
        let mut bytes = 0usize;
        let keep = records
            .iter()
            .take_while(|r| {
                bytes += r.len() + 8;
                bytes <= AUDIT_BATCH_BYTES
            })
            .count()
            .max(1);
        records.truncate(keep);
        let n = records.len() as u64;
        up.send(pb::SyncUp {
            msg: Some(Up::Audit(pb::AuditBatch { first, records })),
        })
        .await
        .map_err(|_| Error::ControlPlane("closed".into()))?;
        *sent = first + n - 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_shared::clock::FakeClock;
    use lattice_shared::store::MemStore;

    fn rev(seq: u64) -> pb::LatticeEvent {
        let r = Revocation {
            target: lattice_shared::revocation::Target::Jti(format!("j{seq}")),
            reason: String::new(),
        };
        pb::LatticeEvent {
            seq,
            committed_at_unix_ms: 0,
            body: Some(pb::lattice_event::Body::Revocation((&r).into())),
        }
    }

    #[test]
    fn gaps_and_duplicates_are_refused_and_nothing_is_applied() {
        let store: SharedStore = MemStore::shared();
        let clock = FakeClock::new();
        let s = Sync::load(
            lattice_shared::id::SpiffeId::parse("spiffe://t/cache/eu/c").expect("id"),
            &store,
            clock.shared(),
            Duration::from_secs(5),
            None,
        )
        .expect("load");
        assert_eq!(s.apply_batch(&store, &[rev(1), rev(2)]).expect("apply"), 2);
        assert!(s.apply_batch(&store, &[rev(4)]).is_err(), "gap");
        assert!(s.apply_batch(&store, &[rev(2)]).is_err(), "duplicate");
        assert_eq!(s.applied(), 2);
        let again = Sync::load(
            lattice_shared::id::SpiffeId::parse("spiffe://t/cache/eu/c").expect("id"),
            &store,
            clock.shared(),
            Duration::from_secs(5),
            None,
        )
        .expect("reload");
        assert_eq!(again.applied(), 2);
        assert!(again.revocations().is_jti_revoked("j2"));
    }

    #[test]
    fn freshness_needs_the_pong_head_applied_and_expires_after_l() {
        let store: SharedStore = MemStore::shared();
        let clock = FakeClock::new();
        let s = Sync::load(
            lattice_shared::id::SpiffeId::parse("spiffe://t/cache/eu/c").expect("id"),
            &store,
            clock.shared(),
            Duration::from_secs(5),
            None,
        )
        .expect("load");
        assert!(!s.is_fresh(), "never fresh before the first pong");
        let rng = SystemRandom::new();
        let ping = s.new_ping(&rng);
        clock.advance(Duration::from_secs(1));
        s.on_pong(&pb::FreshnessPong {
            ping_id: ping.ping_id,
            sent_mono_ms: 0,
            head_seq: 1,
        });
        assert!(!s.is_fresh(), "head 1 not yet applied");
        s.apply_batch(&store, &[rev(1)]).expect("apply");
        assert!(s.is_fresh());
        // Fresh as of the ping's send time, not the pong's arrival.
        clock.advance(Duration::from_secs(4));
        assert!(s.is_fresh(), "5 s after the ping: exactly L");
        clock.advance(Duration::from_millis(1));
        assert!(!s.is_fresh());
        // A pong for an unknown ping is ignored.
        s.on_pong(&pb::FreshnessPong {
            ping_id: 12345,
            sent_mono_ms: u64::MAX,
            head_seq: 0,
        });
        assert!(!s.is_fresh());
    }
}

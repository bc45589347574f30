//! The cache's replica of the control plane's log: revocations, policy
//! releases and secrets as applied, and the freshness they are proven by.
//! (The stream that feeds it is `sync.rs`.)
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
use lattice_shared::proto as pb;
use lattice_shared::revocation::{Revocation, RevocationSet};
use lattice_shared::store::{SharedStore, Write};
use prost::Message;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{Notify, broadcast, watch};

use crate::{Error, Refused};

const T_EVENTS: &str = "events";
const T_META: &str = "meta";
const APPLIED_KEY: &[u8] = b"applied_seq";
/// Revocations on their own, by sequence number, so that a follower's
/// backlog is read without decoding whole events (policy bundles are large).
const T_REVOCATIONS: &str = "revocations";
/// The highest sequence number the revocation index covers.
const REV_INDEXED_KEY: &[u8] = b"revocations_indexed";
const MAX_PENDING: usize = 64;

#[derive(Debug, Default)]
struct Inner {
    applied: u64,
    fresh_as_of: Option<Duration>,
    /// (ping send time, head the pong named), oldest first.
    pending: VecDeque<(Duration, u64)>,
    /// Checkpoints from the control plane by the head they state, oldest
    /// first, until applied.
    checkpoints: VecDeque<(u64, Arc<pb::FreshnessCheckpoint>)>,
    /// The newest checkpoint whose head is applied: what followers get.
    checkpoint: Option<Arc<pb::FreshnessCheckpoint>>,
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
pub struct Replica {
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
    pub(crate) ping_now: Notify,
    /// Envelopes of the secrets streamed to this cache (sealed).
    pub secrets: crate::secrets::SecretIndex,
}

use lattice_shared::eventlog::seq_key;

impl Replica {
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
        let secrets = crate::secrets::SecretIndex::default();
        let me = cache_id.to_string();
        let replayed = lattice_shared::eventlog::replay(&**store, T_EVENTS, applied, |_, ev| {
            secrets.apply(&me, ev)
        })?;
        let revocations = replayed.revocations;
        index_revocations(store, applied)?;
        if let Some(trust) = &policy {
            // The newest release that verifies; older ones are read only if
            // a newer one is refused.
            for &seq in replayed.policies.iter().rev() {
                let signed = lattice_shared::eventlog::read_policy(&**store, T_EVENTS, seq)?;
                match accept_release(trust, &revocations, 0, &signed) {
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
    pub(crate) fn set_connected(&self, up: bool) {
        self.write().connected = up;
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
    /// The newest control-plane checkpoint whose head this cache has
    /// applied, for its followers.
    pub fn checkpoint(&self) -> Option<Arc<pb::FreshnessCheckpoint>> {
        self.read().checkpoint.clone()
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

    /// Within L of the last proof (`now − fresh_as_of <= L`, on the
    /// monotonic clock, to the nanosecond).
    fn fresh(&self, g: &Inner) -> Result<(), Refused> {
        let staleness = g
            .fresh_as_of
            .map(|f| self.clock.monotonic().saturating_sub(f));
        if staleness.is_none_or(|s| s > self.max_staleness) {
            return Err(Refused::Stale {
                staleness_ms: staleness.map(|s| u64::try_from(s.as_millis()).unwrap_or(u64::MAX)),
                max_staleness_ms: u64::try_from(self.max_staleness.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(())
    }

    pub fn is_fresh(&self) -> bool {
        self.fresh(&self.read()).is_ok()
    }

    /// May this cache serve at all now: fresh, and neither it nor its
    /// signing key (`signer_serial`) revoked? `Ping` answers this, and
    /// [`Replica::can_serve_to`] starts with it.
    pub fn can_serve(&self, signer_serial: &str) -> Result<(), Refused> {
        self.serveable(&self.read(), signer_serial)
    }

    fn serveable(&self, g: &Inner, signer_serial: &str) -> Result<(), Refused> {
        self.fresh(g)?;
        if g.revocations.is_cache_revoked(&self.cache_id)
            || g.revocations.is_serial_revoked(signer_serial)
        {
            return Err(Refused::Revoked(format!(
                "this cache ({}) or its signing key has been revoked",
                self.cache_id
            )));
        }
        Ok(())
    }

    /// May this cache serve a credential to the holder of `cert` (issued by
    /// `issuer`) now? Freshness and revocations are read together.
    pub fn can_serve_to(
        &self,
        cert: &CertInfo,
        issuer: Option<&CertInfo>,
        signer_serial: &str,
    ) -> Result<(), Refused> {
        let g = self.read();
        self.serveable(&g, signer_serial)?;
        g.revocations
            .check_cert(cert, issuer)
            .map_err(Refused::Revoked)
    }

    /// The revocation rules alone (for the TLS handshake).
    pub fn check_cert(&self, cert: &CertInfo, issuer: Option<&CertInfo>) -> Result<(), String> {
        self.read().revocations.check_cert(cert, issuer)
    }

    pub fn is_join_token_revoked(&self, hash: &[u8; 32]) -> bool {
        self.read().revocations.is_join_token_revoked(hash)
    }
    /// Whether a token (or one it descends from) is revoked.
    pub fn check_token(
        &self,
        c: &lattice_shared::token::Claims,
    ) -> Result<(), lattice_shared::revocation::RevocationReason> {
        self.read().revocations.check_token(c, None)
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
    pub(crate) fn on_release(&self, seq: u64, signed: &pb::SignedPolicy) {
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

    pub(crate) fn on_pong(&self, pong: &pb::FreshnessPong) {
        let mut g = self.write();
        let Some(sent) = g.pings.remove(&pong.ping_id) else {
            return;
        };
        if g.pending.len() == MAX_PENDING {
            g.pending.pop_front();
        }
        g.pending.push_back((sent, pong.head_seq));
        // Relayed, not verified: followers verify it. Only its head is read.
        if let Some(cp) = &pong.checkpoint
            && let Ok(body) = pb::CheckpointBody::decode(cp.body.as_slice())
        {
            if g.checkpoints.len() == MAX_PENDING {
                g.checkpoints.pop_front();
            }
            g.checkpoints
                .push_back((body.head_seq, Arc::new(cp.clone())));
        }
        self.advance_freshness(&mut g);
    }

    fn advance_freshness(&self, g: &mut Inner) {
        while g.checkpoints.front().is_some_and(|(h, _)| *h <= g.applied) {
            g.checkpoint = g.checkpoints.pop_front().map(|(_, c)| c);
        }
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

    pub(crate) fn new_ping(&self, rng: &SystemRandom) -> pb::FreshnessPing {
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
        self.enforce(events, self.applied() + 1)?;
        self.persist(store, events)
    }

    /// Checks that `events` start exactly at `first` (a gap or a duplicate
    /// is an error that forces a resync) and enforces them in memory at once,
    /// before they are durable: no I/O here.
    pub(crate) fn enforce(
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
    pub(crate) fn persist(
        &self,
        store: &SharedStore,
        events: &[pb::LatticeEvent],
    ) -> Result<u64, Error> {
        let Some(last) = events.last().map(|e| e.seq) else {
            return Ok(self.applied());
        };
        let mut writes: Vec<Write> = events.iter().map(event_write).collect();
        writes.extend(events.iter().filter_map(index_write));
        writes.push(Write {
            tree: T_META,
            key: APPLIED_KEY.to_vec(),
            value: Some(last.to_be_bytes().to_vec()),
        });
        writes.push(Write {
            tree: T_META,
            key: REV_INDEXED_KEY.to_vec(),
            value: Some(last.to_be_bytes().to_vec()),
        });
        store.apply(writes)?;
        // Followers hear of the revocations before anything vouches for
        // them (a heartbeat that relays a checkpoint at `last`), and as the
        // control plane sent them: their revocation chain hashes these bytes.
        for ev in events {
            if let Some(pb::lattice_event::Body::Revocation(r)) = &ev.body {
                let _ = self.notices.send((ev.seq, r.clone()));
            }
        }
        {
            let mut g = self.write();
            g.applied = last;
            self.advance_freshness(&mut g);
        }
        self.applied_tx.send_replace(last);
        Ok(last)
    }
}

/// Stored revocations after `after`, in order (for `WatchRevocations`).
/// (revocations with their sequence, entries read, sequence read up to)
pub type Backlog = (Vec<(u64, pb::Revocation)>, usize, u64);

/// The stored form of an event.
fn event_write(e: &pb::LatticeEvent) -> Write {
    Write {
        tree: T_EVENTS,
        key: seq_key(e.seq).to_vec(),
        value: Some(e.encode_to_vec()),
    }
}

/// The index entry of a revocation event.
fn index_write(e: &pb::LatticeEvent) -> Option<Write> {
    match &e.body {
        Some(pb::lattice_event::Body::Revocation(r)) => Some(Write {
            tree: T_REVOCATIONS,
            key: seq_key(e.seq).to_vec(),
            value: Some(r.encode_to_vec()),
        }),
        _ => None,
    }
}

/// Brings the revocation index up to `applied` (a store written before the
/// index existed, once).
fn index_revocations(store: &SharedStore, applied: u64) -> Result<(), Error> {
    let mut indexed =
        lattice_shared::eventlog::read_seq(&**store, T_META, REV_INDEXED_KEY)?.min(applied);
    while indexed < applied {
        let batch = store.scan_from(T_EVENTS, &seq_key(indexed + 1), 1024)?;
        let mut writes = Vec::new();
        let mut upto = indexed;
        for (_, v) in &batch {
            let ev = lattice_shared::eventlog::decode(v)?;
            if ev.seq > applied {
                break;
            }
            upto = ev.seq;
            writes.extend(index_write(&ev));
        }
        if upto == indexed {
            return Err(Error::Corrupt(format!(
                "stored events end at {indexed} but {applied} are recorded as applied"
            )));
        }
        writes.push(Write {
            tree: T_META,
            key: REV_INDEXED_KEY.to_vec(),
            value: Some(upto.to_be_bytes().to_vec()),
        });
        store.apply(writes)?;
        indexed = upto;
    }
    Ok(())
}

/// Reads the revocation index: returns how many entries were read and the
/// sequence the answer is complete up to (revocations only: other events
/// between them are never read).
pub(crate) fn revocations_after(
    store: &SharedStore,
    after: u64,
    limit: usize,
) -> Result<Backlog, Error> {
    // Read first: what the index holds then is complete up to it.
    let indexed = lattice_shared::eventlog::read_seq(&**store, T_META, REV_INDEXED_KEY)?;
    let entries = store.scan_from(T_REVOCATIONS, &seq_key(after.saturating_add(1)), limit)?;
    let n = entries.len();
    let mut out = Vec::with_capacity(n);
    for (k, v) in entries {
        let seq = u64::from_be_bytes(
            k.as_slice()
                .try_into()
                .map_err(|_| Error::Corrupt("revocation index: bad key".into()))?,
        );
        let r = pb::Revocation::decode(v.as_slice())
            .map_err(|e| Error::Corrupt(format!("revocation index at {seq}: {e}")))?;
        out.push((seq, r));
    }
    let last = out.last().map_or(after, |(s, _)| *s);
    let upto = if n < limit { last.max(indexed) } else { last };
    Ok((out, n, upto))
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

/// The cache's handling of events from the control plane and from its own
/// disk, for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use lattice_shared::clock::SystemClock;
    use lattice_shared::store::MemStore;

    /// Decodes `bytes` as an `EventBatch` received on `Sync` and applies it
    /// as the sync loop does (enforce, then persist), then reloads the
    /// replica from what was stored. Never panics; errors are fine.
    pub fn apply_event_batch(bytes: &[u8]) {
        let Ok(batch) = pb::EventBatch::decode(bytes) else {
            return;
        };
        let store: SharedStore = MemStore::shared();
        let Some(replica) = new(&store) else { return };
        if replica.enforce(&batch.events, 1).is_ok() {
            let _ = replica.persist(&store, &batch.events);
        }
        let _ = new(&store);
    }

    /// Decodes `bytes` as a sequence of length-delimited `SyncDown`
    /// messages and handles each as the sync loop does: events are enforced
    /// and persisted, pongs answer a ping just sent, audit acks trim an
    /// outbox holding a few records. Never panics; errors are fine.
    pub fn sync_down(mut bytes: &[u8]) {
        use lattice_shared::proto::sync_down::Msg;
        let store: SharedStore = MemStore::shared();
        let Some(replica) = new(&store) else { return };
        let Ok(outbox) = crate::outbox::Outbox::open(
            store.clone(),
            64,
            crate::outbox::FLUSH_DELAY,
            SystemClock::shared(),
        ) else {
            return;
        };
        for i in 0..4u8 {
            outbox.record(vec![b'{', b'"', b'a' + i, b'"', b':', b'1', b'}']);
        }
        let _ = outbox.flush_now();
        let rng = SystemRandom::new();
        while let Ok(down) = pb::SyncDown::decode_length_delimited(&mut bytes) {
            match down.msg {
                Some(Msg::Events(batch)) => {
                    if replica
                        .enforce(&batch.events, replica.applied() + 1)
                        .is_ok()
                    {
                        let _ = replica.persist(&store, &batch.events);
                    }
                }
                Some(Msg::Pong(mut pong)) => {
                    pong.ping_id = replica.new_ping(&rng).ping_id;
                    replica.on_pong(&pong);
                    let _ = replica.checkpoint();
                    let _ = replica.staleness_ms();
                }
                Some(Msg::AuditAck(a)) => {
                    let _ = outbox.ack(a.upto);
                }
                Some(Msg::Heartbeat(_)) | None => {}
            }
            if bytes.is_empty() {
                break;
            }
        }
    }

    /// Loads a replica from a store whose event 1 holds `bytes` (a damaged
    /// or hostile data directory). Never panics; errors are fine.
    pub fn load_stored_event(bytes: &[u8]) {
        let store: SharedStore = MemStore::shared();
        let writes = vec![
            Write {
                tree: T_EVENTS,
                key: seq_key(1).to_vec(),
                value: Some(bytes.to_vec()),
            },
            Write {
                tree: T_META,
                key: APPLIED_KEY.to_vec(),
                value: Some(1u64.to_be_bytes().to_vec()),
            },
        ];
        if store.apply(writes).is_ok() {
            let _ = new(&store);
        }
    }

    fn new(store: &SharedStore) -> Option<Replica> {
        let id = lattice_shared::id::SpiffeId::parse("spiffe://fuzz.test/cache/eu/c1").ok()?;
        Replica::load(
            id,
            store,
            SystemClock::shared(),
            Duration::from_secs(5),
            None,
        )
        .ok()
    }
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

    fn other(seq: u64) -> pb::LatticeEvent {
        pb::LatticeEvent {
            seq,
            committed_at_unix_ms: 0,
            body: None,
        }
    }

    fn load(store: &SharedStore) -> Replica {
        Replica::load(
            lattice_shared::id::SpiffeId::parse("spiffe://t/cache/eu/c").expect("id"),
            store,
            FakeClock::new().shared(),
            Duration::from_secs(5),
            None,
        )
        .expect("load")
    }

    #[test]
    fn a_followers_backlog_reads_revocations_only() {
        let store: SharedStore = MemStore::shared();
        let s = load(&store);
        // Two revocations among 600 events.
        let events: Vec<_> = (1..=600)
            .map(|q| if q == 5 || q == 590 { rev(q) } else { other(q) })
            .collect();
        s.apply_batch(&store, &events).expect("apply");
        let (revs, read, upto) = revocations_after(&store, 0, 256).expect("backlog");
        assert_eq!(
            (revs.iter().map(|r| r.0).collect::<Vec<_>>(), read, upto),
            (vec![5, 590], 2, 600),
            "one read, two entries, complete to the head"
        );
        let (revs, _, upto) = revocations_after(&store, 5, 1).expect("page");
        assert_eq!(
            (revs[0].0, upto),
            (590, 590),
            "a full page ends at its last entry"
        );
    }

    #[test]
    fn a_store_from_before_the_index_is_indexed_at_load() {
        let store: SharedStore = MemStore::shared();
        // Written as a cache without the index wrote it.
        let mut writes: Vec<Write> = [rev(1), other(2), rev(3)].iter().map(event_write).collect();
        writes.push(Write {
            tree: T_META,
            key: APPLIED_KEY.to_vec(),
            value: Some(3u64.to_be_bytes().to_vec()),
        });
        store.apply(writes).expect("write");
        assert_eq!(
            revocations_after(&store, 0, 256).expect("before").0.len(),
            0
        );
        let _ = load(&store);
        let (revs, _, upto) = revocations_after(&store, 0, 256).expect("after");
        assert_eq!(
            (revs.iter().map(|r| r.0).collect::<Vec<_>>(), upto),
            (vec![1, 3], 3)
        );
    }

    #[test]
    fn gaps_and_duplicates_are_refused_and_nothing_is_applied() {
        let store: SharedStore = MemStore::shared();
        let clock = FakeClock::new();
        let s = Replica::load(
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
        let again = Replica::load(
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

    /// `Ping` says `serving` exactly when a mint would pass the freshness
    /// and self-revocation check: just past L (by less than a millisecond)
    /// and once the cache itself is revoked, both say no. (Before they
    /// shared `can_serve`, ping compared whole milliseconds and ignored
    /// self-revocation: this test failed at both points.)
    #[test]
    fn ping_and_the_mint_check_agree_past_l_and_when_the_cache_is_revoked() {
        let store: SharedStore = MemStore::shared();
        let clock = FakeClock::new();
        let me = lattice_shared::id::SpiffeId::parse("spiffe://t/cache/eu/c").expect("id");
        let s = Replica::load(
            me.clone(),
            &store,
            clock.shared(),
            Duration::from_secs(5),
            None,
        )
        .expect("load");
        let agree = |s: &Replica, what: &str| {
            assert_eq!(
                crate::api::ping_serving(s, "01"),
                s.can_serve("01").is_ok(),
                "{what}"
            );
        };
        agree(&s, "never fresh");
        let ping = s.new_ping(&SystemRandom::new());
        s.on_pong(&pb::FreshnessPong {
            ping_id: ping.ping_id,
            sent_mono_ms: 0,
            head_seq: 0,
            checkpoint: None,
        });
        assert!(crate::api::ping_serving(&s, "01"), "fresh");
        agree(&s, "fresh");
        clock.advance(Duration::from_secs(5));
        assert!(crate::api::ping_serving(&s, "01"), "exactly L");
        agree(&s, "exactly L");
        clock.advance(Duration::from_micros(500));
        assert!(
            !crate::api::ping_serving(&s, "01"),
            "half a millisecond past L"
        );
        agree(&s, "half a millisecond past L");

        // Fresh again, then the cache itself is revoked.
        let ping = s.new_ping(&SystemRandom::new());
        s.on_pong(&pb::FreshnessPong {
            ping_id: ping.ping_id,
            sent_mono_ms: 0,
            head_seq: 0,
            checkpoint: None,
        });
        agree(&s, "fresh again");
        let revoked = Revocation {
            target: lattice_shared::revocation::Target::Cache(me),
            reason: String::new(),
        };
        let ev = pb::LatticeEvent {
            seq: 1,
            committed_at_unix_ms: 0,
            body: Some(pb::lattice_event::Body::Revocation((&revoked).into())),
        };
        s.apply_batch(&store, &[ev]).expect("apply");
        assert!(!crate::api::ping_serving(&s, "01"), "revoked");
        agree(&s, "revoked");
    }

    /// A checkpoint as relayed: only its head is read.
    fn checkpoint(head: u64) -> pb::FreshnessCheckpoint {
        pb::FreshnessCheckpoint {
            body: pb::CheckpointBody {
                head_seq: head,
                ..Default::default()
            }
            .encode_to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn freshness_needs_the_pong_head_applied_and_expires_after_l() {
        let store: SharedStore = MemStore::shared();
        let clock = FakeClock::new();
        let s = Replica::load(
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
            checkpoint: Some(checkpoint(2)),
        });
        assert!(!s.is_fresh(), "head 1 not yet applied");
        s.apply_batch(&store, &[rev(1)]).expect("apply");
        assert!(s.is_fresh());
        assert_eq!(s.checkpoint(), None, "its checkpoint states head 2");
        s.apply_batch(&store, &[rev(2)]).expect("apply");
        assert_eq!(
            s.checkpoint().as_deref(),
            Some(&checkpoint(2)),
            "relayed once its head is applied"
        );
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
            checkpoint: None,
        });
        assert!(!s.is_fresh());
    }
}

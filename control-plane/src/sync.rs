//! The control plane's side of the `Sync` stream: every event after the
//! cache's durable sequence, in order, in bounded batches (the bounded
//! channel is the backpressure); pongs that carry the head; heartbeats; and
//! per-cache link status from the acks. Audit records that caches send up
//! the same stream are ingested by `audit_ingest`.

mod audit_ingest;
#[doc(hidden)]
pub use audit_ingest::fuzzing;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use lattice_shared::id::SpiffeId;
use lattice_shared::limits;
use lattice_shared::proto::{self as pb, sync_down::Msg as Down, sync_up::Msg as Up};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::State;

/// Events per batch on the stream.
pub const BATCH: usize = 256;
/// Messages queued towards one cache before the sender waits.
const QUEUE: usize = 16;
/// Pongs remembered per link to derive its staleness.
const PONGS: usize = 64;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the control plane knows of one cache's link.
#[derive(Debug, Clone, Default)]
pub struct Link {
    pub acked: u64,
    pub connected: bool,
    pub last_contact_ms: i64,
    /// Control-plane time of the latest pong whose head the cache has acked.
    pub fresh_at_ms: i64,
    /// The policy release the cache says it enforces (0: not reported).
    pub policy_version: u64,
    /// The staleness bound L the cache said it enforces (0: not reported).
    pub max_staleness_ms: u64,
    pongs: VecDeque<(i64, u64)>,
    /// Counts the cache's streams: an older one still open ends itself.
    stream: u64,
}

/// A checkpoint younger than this is sent again rather than signed anew:
/// one signature serves every pong in the window, at a cost to followers'
/// freshness of at most this much.
const CHECKPOINT_REUSE_MS: i64 = 100;

/// The latest freshness checkpoint ([`lattice_shared::freshness`]), shared
/// by every link.
#[derive(Debug, Default)]
pub struct Checkpoints {
    last: std::sync::Mutex<Option<(i64, Arc<pb::FreshnessCheckpoint>)>>,
}

impl Checkpoints {
    /// A checkpoint of the log as of now (or of at most
    /// [`CHECKPOINT_REUSE_MS`] ago); `None` when signing failed (logged: the
    /// caches' followers go stale, the caches themselves do not).
    pub fn current(&self, state: &State) -> Option<Arc<pb::FreshnessCheckpoint>> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // The time first, then the head: everything committed before the
        // time is at or below the head.
        let now = state.clock.now_unix_ms();
        if let Some((at, cp)) = last.as_ref()
            && (0..CHECKPOINT_REUSE_MS).contains(&(now - at))
        {
            return Some(cp.clone());
        }
        let (head, chain) = state.log.tip();
        match lattice_shared::freshness::sign(&state.policy.signer(), head, now, &chain) {
            Ok(cp) => {
                let cp = Arc::new(cp);
                *last = Some((now, cp.clone()));
                metrics::counter!("lattice_cp_checkpoints_signed_total").increment(1);
                Some(cp)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a freshness checkpoint");
                None
            }
        }
    }

    /// Forgets the checkpoint held (its signer was replaced).
    pub fn reset(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

#[derive(Debug, Default)]
pub struct Links {
    inner: std::sync::Mutex<HashMap<SpiffeId, Link>>,
    /// Held by a link's audit worker until it ends: a cache that reconnects
    /// reads its audit mark only once the previous worker's last commit is
    /// done, so nothing it resends is appended twice.
    audit: std::sync::Mutex<HashMap<SpiffeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Each cache's newest stream (its generation): an older stream ends as
    /// soon as a newer one opens, whatever it is waiting for.
    newest: std::sync::Mutex<HashMap<SpiffeId, tokio::sync::watch::Sender<u64>>>,
}

impl Links {
    fn update(&self, id: &SpiffeId, f: impl FnOnce(&mut Link)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(g.entry(id.clone()).or_default());
    }
    pub(crate) fn audit_lock(&self, id: &SpiffeId) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.audit.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(id.clone()).or_default().clone()
    }
    /// Says that `generation` is `id`'s newest stream; returns what tells
    /// that stream when a newer one opens.
    fn opened(&self, id: &SpiffeId, generation: u64) -> tokio::sync::watch::Receiver<u64> {
        let mut g = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        let tx = g
            .entry(id.clone())
            .or_insert_with(|| tokio::sync::watch::channel(0).0);
        // Never back: two opens may get here in either order.
        tx.send_if_modified(|g| {
            let newer = generation > *g;
            if newer {
                *g = generation;
            }
            newer
        });
        tx.subscribe()
    }
    pub fn get(&self, id: &SpiffeId) -> Option<Link> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
}

pub type SyncStream = ReceiverStream<Result<pb::SyncDown, Status>>;

/// The sending end of one cache's stream. No send waits past the moment a
/// newer stream from the same cache opens, nor longer than `silence` for a
/// cache that reads nothing: a stream whose connection is a black hole
/// never holds up its own timers, its audit worker (and with it the audit
/// lock its successor needs) or shutdown.
#[derive(Debug, Clone)]
pub(crate) struct Downlink {
    tx: mpsc::Sender<Result<pb::SyncDown, Status>>,
    generation: u64,
    newest: tokio::sync::watch::Receiver<u64>,
    silence: Duration,
}

impl Downlink {
    /// Queues `m` for the cache; `Err` says why the stream is over.
    pub(crate) async fn send(&self, m: Result<pb::SyncDown, Status>) -> Result<(), String> {
        tokio::select! {
            r = self.tx.send(m) => r.map_err(|_| "cache went away".to_string()),
            () = self.replaced() => Err(REPLACED.into()),
            () = tokio::time::sleep(self.silence) => Err(format!(
                "the cache read nothing for {:?}", self.silence
            )),
        }
    }

    /// Completes once a newer stream from the same cache has opened.
    pub(crate) async fn replaced(&self) {
        let mut newest = self.newest.clone();
        let generation = self.generation;
        if newest.wait_for(|&g| g > generation).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

const REPLACED: &str = "replaced by a newer stream from the same cache";

/// A cache receives its own sealed DEK and nothing sealed to another; a
/// version it may not hold reaches it without ciphertext (the sequence stays
/// contiguous).
fn only_for(e: &mut pb::LatticeEvent, cache: &str) {
    if let Some(pb::lattice_event::Body::Secret(pb::SecretEvent {
        change: Some(pb::secret_event::Change::Version(v)),
        ..
    })) = &mut e.body
    {
        v.seals.retain(|s| s.cache_id == cache);
        if v.seals.is_empty() {
            v.ciphertext.clear();
        }
    }
}

/// Tokens a cache issued and asks to have revoked (its policy re-evaluation
/// after an agent's claims changed). A cache can only deny with this, and
/// each revocation names the cache that asked.
async fn revoke_issued(
    state: &std::sync::Arc<State>,
    cache: &lattice_shared::id::SpiffeId,
    r: pb::RevokeIssued,
) -> Result<(), String> {
    const MAX: usize = lattice_shared::limits::MAX_REVOKE_BATCH;
    if r.jtis.is_empty() || r.jtis.len() > MAX {
        return Err(format!("1..={MAX} jtis"));
    }
    if r.reason.len() > 512 {
        return Err("reason longer than 512 bytes".into());
    }
    for j in &r.jtis {
        if j.is_empty()
            || j.len() > 128
            || !j
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!("{j:?} is not a token id"));
        }
    }
    let state = state.clone();
    let cache = cache.clone();
    tokio::task::spawn_blocking(move || {
        for j in r.jtis {
            // Resent requests and repeats are committed once.
            if state.log.revocations().is_jti_revoked(&j) {
                continue;
            }
            let rev = lattice_shared::revocation::Revocation {
                target: lattice_shared::revocation::Target::Jti(j),
                reason: format!("requested by {cache}: {}", r.reason),
            };
            if let Err(e) = state.revoke(&rev) {
                tracing::error!(error = %e, %cache, "revocation requested by a cache failed");
                return Err(e.to_string());
            }
        }
        Ok(())
    })
    .await
    .map_err(|_| "worker failed".to_string())?
}

pub(crate) async fn open(
    state: Arc<State>,
    cache: SpiffeId,
    mut inbound: Streaming<pb::SyncUp>,
) -> Result<SyncStream, Status> {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await {
        Ok(Ok(Some(pb::SyncUp {
            msg: Some(Up::Hello(h)),
        }))) => h,
        Ok(Ok(_)) => {
            return Err(Status::invalid_argument(
                "the stream must open with a hello",
            ));
        }
        Ok(Err(s)) => return Err(s),
        Err(_) => return Err(Status::deadline_exceeded("no hello within 10 s")),
    };
    let head = state.log.head();
    if hello.resume_after > head {
        return Err(Status::failed_precondition(format!(
            "cache holds sequence {} but the log ends at {head}: its data is from another control plane; re-enrol it",
            hello.resume_after
        )));
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        let id = cache.clone();
        let mut generation = 0;
        state.links.update(&id, |l| {
            l.stream += 1;
            generation = l.stream;
            l.connected = true;
            l.acked = l.acked.max(hello.resume_after);
            l.max_staleness_ms = hello.max_staleness_ms;
            l.last_contact_ms = state.clock.now_unix_ms();
        });
        let down = Downlink {
            tx,
            generation,
            newest: state.links.opened(&id, generation),
            // As long as the cache waits before it gives a silent link up.
            silence: (Duration::from_millis(state.cfg.heartbeat_ms) * 3)
                .max(Duration::from_secs(1)),
        };
        let mut stopping = state.stopping.clone();
        let reason = tokio::select! {
            r = serve(&state, &cache, hello.resume_after, hello.audit_epoch, inbound, &down) => r,
            // Also when `serve` waits on a cache that sends nothing.
            () = down.replaced() => REPLACED.into(),
            _ = lattice_shared::net::until_true(&mut stopping) => "control plane stopping".into(),
        };
        state.links.update(&id, |l| {
            if l.stream == generation {
                l.connected = false;
            }
        });
        tracing::info!(cache_id = %id, reason = %reason, "sync stream closed");
    });
    Ok(ReceiverStream::new(rx))
}

async fn serve(
    state: &Arc<State>,
    cache: &SpiffeId,
    resume_after: u64,
    audit_epoch: u64,
    mut inbound: Streaming<pb::SyncUp>,
    tx: &Downlink,
) -> String {
    let mut heads = state.log.subscribe();
    // Audit batches are committed by a worker of their own: events going
    // down never wait for an audit write. It tells the cache where its
    // records stand first (the cache sends none before), once the previous
    // stream's worker has finished its last commit. Not aborted with the
    // stream: it finishes the batches it was handed, then ends as the
    // channel closes.
    let audit_queued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (audit_tx, audit_rx) = mpsc::unbounded_channel();
    let mut audit_worker = tokio::spawn(audit_ingest::worker(
        state.clone(),
        cache.clone(),
        audit_epoch,
        audit_queued.clone(),
        audit_rx,
        tx.clone(),
    ));
    let mut sent = resume_after;
    let mut acked = resume_after;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(state.cfg.heartbeat_ms));
    let mut stopping = state.stopping.clone();
    loop {
        // Send everything up to the head, batch by batch; each send waits for
        // room, so a slow cache slows only its own stream.
        while sent < state.log.head() {
            let after = sent;
            // Recent events come from memory; older ones (a cache catching
            // up) from the store, off the async threads.
            let read = match state.log.recent_after(after, BATCH) {
                Some(b) => Ok(Ok(b)),
                None => {
                    let st = state.clone();
                    tokio::task::spawn_blocking(move || st.log.read_after(after, BATCH)).await
                }
            };
            let mut batch = match read {
                Ok(Ok(b)) if !b.is_empty() => b,
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return format!("reading the log failed: {e}"),
                Err(_) => return "log reader failed".into(),
            };
            // Bounded in bytes too (policy bundles are large): at least one.
            let mut bytes = 0usize;
            let keep = batch
                .iter()
                .take_while(|e| {
                    bytes += prost::Message::encoded_len(*e);
                    bytes <= limits::MAX_SYNC_BATCH_BYTES
                })
                .count()
                .max(1);
            batch.truncate(keep);
            let me = cache.as_str();
            for e in &mut batch {
                only_for(e, me);
            }
            sent = batch.last().map(|e| e.seq).unwrap_or(sent);
            let msg = pb::SyncDown {
                msg: Some(Down::Events(pb::EventBatch { events: batch })),
            };
            if let Err(why) = tx.send(Ok(msg)).await {
                return why;
            }
        }
        tokio::select! {
            _ = lattice_shared::net::until_true(&mut stopping) => {
                let _ = tx.send(Err(Status::unavailable("control plane stopping"))).await;
                return "control plane stopping".into();
            }
            changed = heads.changed() => {
                if changed.is_err() {
                    return "control plane stopping".into();
                }
            }
            ended = &mut audit_worker => {
                return ended.unwrap_or_else(|_| "audit worker failed".into());
            }
            _ = heartbeat.tick() => {
                let msg = pb::SyncDown { msg: Some(Down::Heartbeat(pb::Heartbeat { head_seq: state.log.head() })) };
                if let Err(why) = tx.send(Ok(msg)).await {
                    return why;
                }
                if state.log.revocations().is_cache_revoked(cache) {
                    let _ = tx.send(Err(Status::permission_denied(format!("{cache} has been revoked")))).await;
                    return "cache revoked".into();
                }
            }
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return "cache closed the stream".into(),
                    Err(s) => return format!("stream error: {s}"),
                };
                let now = state.clock.now_unix_ms();
                match msg.msg {
                    Some(Up::Ack(a)) => {
                        if a.seq > sent || a.seq < acked {
                            let _ = tx.send(Err(Status::invalid_argument(format!(
                                "ack {} outside ({acked}, {sent}]", a.seq
                            )))).await;
                            return "bad ack".into();
                        }
                        for (_, committed) in state.log.commit_times(acked, a.seq) {
                            let secs = (now - committed).max(0) as f64 / 1000.0;
                            metrics::histogram!("lattice_revocation_propagation_seconds", "cache" => cache.to_string()).record(secs);
                        }
                        acked = a.seq;
                        metrics::gauge!("lattice_cp_cache_acked_seq", "cache" => cache.to_string()).set(acked as f64);
                        state.links.update(cache, |l| {
                            l.acked = acked;
                            l.policy_version = a.policy_version;
                            l.last_contact_ms = now;
                            while l.pongs.front().is_some_and(|(_, h)| *h <= acked) {
                                if let Some((t, _)) = l.pongs.pop_front() {
                                    l.fresh_at_ms = t;
                                }
                            }
                        });
                    }
                    Some(Up::Ping(p)) => {
                        let head = state.log.head();
                        state.links.update(cache, |l| {
                            l.last_contact_ms = now;
                            if head <= l.acked {
                                l.fresh_at_ms = now;
                            } else {
                                if l.pongs.len() == PONGS {
                                    l.pongs.pop_front();
                                }
                                l.pongs.push_back((now, head));
                            }
                        });
                        let pong = pb::FreshnessPong { ping_id: p.ping_id, sent_mono_ms: p.sent_mono_ms, head_seq: head, checkpoint: state.checkpoints.current(state).map(|c| (*c).clone()) };
                        if let Err(why) = tx.send(Ok(pb::SyncDown { msg: Some(Down::Pong(pong)) })).await {
                            return why;
                        }
                    }
                    Some(Up::Audit(batch)) => {
                        let n = batch.records.len() as u64;
                        if audit_queued.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n > audit_ingest::MAX_QUEUED {
                            let _ = tx.send(Err(Status::resource_exhausted("too many audit records in flight"))).await;
                            return "audit flood".into();
                        }
                        if audit_tx.send(batch).is_err() {
                            return "audit worker stopped".into();
                        }
                    }
                    Some(Up::RevokeIssued(r)) => {
                        if let Err(e) = revoke_issued(state, cache, r).await {
                            let _ = tx.send(Err(Status::invalid_argument(format!("revoke_issued: {e}")))).await;
                            return format!("bad revoke request: {e}");
                        }
                    }
                    Some(Up::Hello(_)) | None => {
                        let _ = tx.send(Err(Status::invalid_argument("unexpected message"))).await;
                        return "protocol error".into();
                    }
                }
            }
        }
    }
}

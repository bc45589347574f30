//! The cache's side of the `Sync` stream: connect to the control plane,
//! feed events into the [`Replica`](crate::replica::Replica) (enforced at
//! once, persisted by a group-committing persister, then acked), send
//! freshness pings every L/5, and send audit records and revocation requests
//! up; on any error reconnect with capped, jittered backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lattice_shared::backoff::Backoff;
use lattice_shared::proto::{self as pb, sync_down::Msg as Down, sync_up::Msg as Up};
use ring::rand::SystemRandom;
use tokio::sync::mpsc;

use crate::{Error, State};

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long the persister waits to gather batches into one fsync.
const PERSIST_DELAY: Duration = Duration::from_millis(2);
/// Largest batch accepted from the control plane.
const MAX_BATCH: usize = 1024;

/// Publishes staleness (seconds since last fresh; +Inf before the first
/// proof) and the applied sequence.
pub(crate) fn publish_metrics(state: &State) {
    let id = state.id.to_string();
    let staleness = state
        .replica
        .staleness_ms()
        .map(|ms| ms as f64 / 1000.0)
        .unwrap_or(f64::INFINITY);
    metrics::gauge!("lattice_cache_staleness_seconds", "cache" => id.clone()).set(staleness);
    metrics::gauge!("lattice_cache_applied_seq", "cache" => id.clone())
        .set(state.replica.applied() as f64);
    metrics::gauge!("lattice_cache_fresh", "cache" => id).set(if state.replica.is_fresh() {
        1.0
    } else {
        0.0
    });
}

/// Runs the sync link until the task is aborted: connect, stream, and on any
/// error reconnect with capped, jittered backoff.
pub(crate) async fn run(state: Arc<State>) {
    let rng = SystemRandom::new();
    let mut backoff = Backoff::with(BACKOFF_START, BACKOFF_MAX, 0.5);
    loop {
        match session(&state, &rng, &mut backoff).await {
            Ok(()) => {}
            Err(e) => {
                tracing::info!(cache_id = %state.id, error = %e, "sync link down; reconnecting on a new connection");
                // The old connection may be a black-holed flow that new
                // ones avoid: never retry over it.
                state.redial_cp();
            }
        }
        state.replica.set_connected(false);
        metrics::counter!("lattice_cache_sync_reconnects_total", "cache" => state.id.to_string())
            .increment(1);
        tokio::time::sleep(backoff.failed(Duration::ZERO)).await;
    }
}

async fn session(
    state: &Arc<State>,
    rng: &SystemRandom,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let sync = &state.replica;
    let ping_every = (sync.max_staleness() / 5).max(Duration::from_millis(10));
    // Silence longer than this means the link is dead even if TCP says not.
    let liveness = (ping_every * 3).max(Duration::from_secs(1));
    let (up, up_rx) = mpsc::channel::<pb::SyncUp>(16);
    up.send(pb::SyncUp {
        msg: Some(Up::Hello(pb::SyncHello {
            resume_after: sync.applied(),
            audit_epoch: state.outbox.epoch(),
            max_staleness_ms: u64::try_from(sync.max_staleness().as_millis()).unwrap_or(u64::MAX),
        })),
    })
    .await
    .map_err(|_| Error::ControlPlane("closed".into()))?;
    let down = tokio::time::timeout(
        liveness,
        state
            .cp()
            .sync(tokio_stream::wrappers::ReceiverStream::new(up_rx)),
    )
    .await
    .map_err(|_| Error::ControlPlane("no answer to the sync request".into()))?
    .map_err(|s| Error::ControlPlane(format!("{} ({:?})", s.message(), s.code())))?
    .into_inner();
    sync.set_connected(true);
    backoff.succeeded();
    tracing::info!(cache_id = %state.id, applied = sync.applied(), "sync link up");

    // Nothing in the stream loop waits for the stream to take a message: it
    // queues, and this writer forwards. A black hole shows as silence from
    // the control plane; a control plane that keeps talking but takes
    // nothing from us for `STUCK_SENDS` silence periods is given up too.
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let out = Outgoing {
        tx: out_tx,
        ping_queued: Arc::new(AtomicBool::new(false)),
        sending_since: Arc::new(std::sync::Mutex::new(None)),
    };
    let writer = tokio::spawn(forward(out_rx, up, out.clone()));

    // Enforcement never waits for the disk: batches are enforced as they
    // arrive and handed to this persister, which writes them in order (many
    // at once under load: group commit) and acks what is durable.
    let (persist_tx, mut persist_rx) = mpsc::channel::<Vec<pb::LatticeEvent>>(64);
    let persister = {
        let state = state.clone();
        let up = out.clone();
        tokio::spawn(async move {
            while let Some(mut events) = persist_rx.recv().await {
                // A short commit delay: what arrives meanwhile shares the
                // fsync, and the disk work stays out of the way of fanning the
                // event out. Enforcement has already happened.
                tokio::time::sleep(PERSIST_DELAY).await;
                while let Ok(e) = persist_rx.try_recv() {
                    events.extend(e);
                }
                let st = state.clone();
                let last = state
                    .persist
                    .run(move || st.replica.persist(&st.store, &events))
                    .await
                    .map_err(|e| Error::Unavailable(e.to_string()))??;
                metrics::gauge!("lattice_cache_applied_seq", "cache" => state.id.to_string())
                    .set(last as f64);
                // Persisted whether or not the ack still goes out: a session
                // that ends drains what it enforced.
                let _ = up.send(pb::SyncUp {
                    msg: Some(Up::Ack(pb::SyncAck {
                        seq: last,
                        policy_version: state.policy.version(),
                    })),
                });
            }
            Ok::<(), Error>(())
        })
    };
    let mut link = Link {
        next: sync.applied() + 1,
        up: out,
        writer,
        down,
        persist_tx,
        persister,
        ping_every,
        liveness,
    };
    let result = stream_loop(state, rng, &mut link).await;
    // Whatever was enforced gets persisted before the next session resumes
    // from the durable sequence.
    let Link {
        persist_tx,
        mut persister,
        writer,
        ..
    } = link;
    drop(persist_tx);
    if !persister.is_finished() {
        let _ = (&mut persister).await;
    }
    writer.abort();
    result
}

/// One session's ends of the link, and where the event stream stands.
struct Link {
    up: Outgoing,
    /// Forwards `up` to the stream; ends with why the link is dead.
    writer: tokio::task::JoinHandle<Error>,
    down: tonic::Streaming<pb::SyncDown>,
    persist_tx: mpsc::Sender<Vec<pb::LatticeEvent>>,
    persister: tokio::task::JoinHandle<Result<(), Error>>,
    /// The sequence the next event must carry.
    next: u64,
    ping_every: Duration,
    /// Silence longer than this means the link is dead.
    liveness: Duration,
}

async fn stream_loop(state: &Arc<State>, rng: &SystemRandom, link: &mut Link) -> Result<(), Error> {
    let Link {
        up,
        writer,
        down,
        persist_tx,
        persister,
        next,
        ping_every,
        liveness,
    } = link;
    let (up, ping_every, liveness) = (&*up, *ping_every, *liveness);
    let sync = &state.replica;
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
    send_revoke_requests(state, up, &mut revoke_sent)?;
    loop {
        tokio::select! {
            _ = state.issued.changed.notified() => {
                send_revoke_requests(state, up, &mut revoke_sent)?;
            }
            _ = tokio::time::sleep_until(silent_after) => {
                return Err(Error::ControlPlane("silent link".into()));
            }
            dead = &mut *writer => {
                return Err(dead.unwrap_or_else(|_| Error::ControlPlane("sync writer failed".into())));
            }
            _ = tick.tick() => {
                if up.stuck_for().is_some_and(|d| d > liveness * STUCK_SENDS) {
                    return Err(Error::ControlPlane(format!(
                        "the control plane took no message from this cache for {:?}",
                        liveness * STUCK_SENDS
                    )));
                }
                up.ping(sync.new_ping(rng))?;
            }
            // Wakes the read branch as soon as the persister has room again.
            _ = persist_tx.reserve(), if persist_tx.capacity() == 0 => {}
            _ = sync.ping_now.notified() => up.ping(sync.new_ping(rng))?,
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
            // Read while the persister has room: a disk that falls behind
            // slows the stream down, and the timers keep running.
            msg = down.message(), if persist_tx.capacity() > 0 => {
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
                        // Room was checked before reading, and this loop is
                        // the one sender.
                        persist_tx.try_send(batch.events).map_err(|_| Error::ControlPlane("persister stopped".into()))?;
                        if revoked_jti {
                            // Settles requests that came back; resends the rest.
                            send_revoke_requests(state, up, &mut revoke_sent)?;
                        }
                    }
                    Some(Down::Pong(p)) => sync.on_pong(&p),
                    Some(Down::AuditAck(a)) => {
                        let outbox = state.outbox.clone();
                        state
                            .persist
                            .run(move || outbox.ack(a.upto))
                            .await
                            .map_err(|e| Error::Unavailable(e.to_string()))??;
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
/// back on the event stream (each once a session: `sent` bounds them).
fn send_revoke_requests(
    state: &Arc<State>,
    up: &Outgoing,
    sent: &mut std::collections::HashSet<String>,
) -> Result<(), Error> {
    let sync = &state.replica;
    while let Some(r) = state.issued.pending(|j| sync.is_jti_revoked(j), sent) {
        up.send(pb::SyncUp {
            msg: Some(Up::RevokeIssued(r)),
        })?;
    }
    Ok(())
}

/// The queue of what goes up. Bounded by what is put in it: audit records
/// by the window, revocation requests by the set of those sent, acks by the
/// persister's batches, pings to one waiting.
#[derive(Debug, Clone)]
struct Outgoing {
    tx: mpsc::UnboundedSender<pb::SyncUp>,
    /// A ping waits in the queue: another would prove nothing more.
    ping_queued: Arc<AtomicBool>,
    /// Since when the writer waits for the stream to take a message.
    sending_since: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

/// Silence periods a send may wait while the control plane still talks
/// (it reads nothing from this cache while it sends a long backlog down).
const STUCK_SENDS: u32 = 10;

impl Outgoing {
    fn send(&self, m: pb::SyncUp) -> Result<(), Error> {
        self.tx
            .send(m)
            .map_err(|_| Error::ControlPlane("closed".into()))
    }

    fn set_sending(&self, since: Option<tokio::time::Instant>) {
        *self.sending_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    /// How long the message being sent has waited, if one is.
    fn stuck_for(&self) -> Option<Duration> {
        self.sending_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    fn ping(&self, p: pb::FreshnessPing) -> Result<(), Error> {
        if self.ping_queued.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.send(pb::SyncUp {
            msg: Some(Up::Ping(p)),
        })
    }
}

/// Forwards the queue to the stream, noting since when a message waits for
/// the stream to take it. Returns when the stream is closed.
async fn forward(
    mut rx: mpsc::UnboundedReceiver<pb::SyncUp>,
    up: mpsc::Sender<pb::SyncUp>,
    out: Outgoing,
) -> Error {
    while let Some(m) = rx.recv().await {
        if matches!(m.msg, Some(Up::Ping(_))) {
            out.ping_queued.store(false, Ordering::SeqCst);
        }
        out.set_sending(Some(tokio::time::Instant::now()));
        let sent = up.send(m).await;
        out.set_sending(None);
        if sent.is_err() {
            break;
        }
    }
    Error::ControlPlane("closed".into())
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
async fn send_audit(state: &Arc<State>, up: &Outgoing, sent: &mut u64) -> Result<(), Error> {
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
        })?;
        *sent = first + n - 1;
    }
    Ok(())
}

//! The `WatchRevocations` stream: the stored backlog after the follower's
//! sequence, then live revocations as they are enforced, with a heartbeat
//! (carrying this cache's staleness) when nothing happens. It ends with the
//! cache. Only agents of this cache's region follow it (services that
//! verify tokens enrol as agents), at most [`MAX_PER_FOLLOWER`] streams
//! each and [`MAX_STREAMS`] in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lattice_shared::id::{Role, SpiffeId};

use lattice_shared::limits::WATCH_HEARTBEAT;
use lattice_shared::proto as pb;
use tonic::Status;

use crate::State;

pub(crate) type Notices =
    tokio_stream::wrappers::ReceiverStream<Result<pb::RevocationNotice, Status>>;

/// Streams one follower may hold open at once (a restart overlaps its
/// old stream for a moment).
pub const MAX_PER_FOLLOWER: usize = 4;
/// Streams open at once at this cache.
pub const MAX_STREAMS: usize = 20_000;

/// Open streams per follower.
#[derive(Debug, Default)]
pub(crate) struct Watchers(Arc<Mutex<HashMap<SpiffeId, usize>>>);

/// One open stream; its place is given back when the stream ends.
#[derive(Debug)]
pub(crate) struct Slot {
    of: Arc<Mutex<HashMap<SpiffeId, usize>>>,
    id: SpiffeId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.of.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                g.remove(&self.id);
            }
        }
    }
}

/// Who may follow this cache's revocations, and within which limits.
pub(crate) fn admit(state: &State, follower: &SpiffeId) -> Result<Slot, Status> {
    if follower.role() != Role::Agent
        || follower.trust_domain() != state.id.trust_domain()
        || follower.region() != Some(&state.region)
    {
        return Err(Status::permission_denied(format!(
            "WatchRevocations is for agents of region {}",
            state.region
        )));
    }
    let of = state.watchers.0.clone();
    let mut g = of.lock().unwrap_or_else(|p| p.into_inner());
    let total: usize = g.values().sum();
    let mine = g.get(follower).copied().unwrap_or(0);
    if mine >= MAX_PER_FOLLOWER {
        return Err(Status::resource_exhausted(format!(
            "at most {MAX_PER_FOLLOWER} revocation streams per follower"
        )));
    }
    if total >= MAX_STREAMS {
        return Err(Status::resource_exhausted(
            "this cache holds as many revocation streams as it serves; retry later or use another cache",
        ));
    }
    *g.entry(follower.clone()).or_default() += 1;
    drop(g);
    Ok(Slot {
        of,
        id: follower.clone(),
    })
}

/// Starts the stream of revocations after `after`; `slot` is held until it
/// ends.
pub(crate) fn watch(state: Arc<State>, after: u64, slot: Slot) -> Notices {
    // Subscribe before reading the backlog so that nothing falls between.
    let mut live = state.replica.subscribe_notices();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut stop_all = state.stopping.clone();
    let task = async move {
        let _slot = slot;
        let notice = |seq: u64, r: pb::Revocation| pb::RevocationNotice {
            seq,
            revocation: Some(r),
            cache_staleness_ms: state.replica.staleness_ms().unwrap_or(u64::MAX),
            checkpoint: None,
        };
        let mut last = after;
        loop {
            let st = state.clone();
            let from = last;
            let batch = match tokio::task::spawn_blocking(move || {
                crate::replica::revocations_after(&st.store, from, 256)
            })
            .await
            {
                Ok(Ok(b)) => b,
                _ => {
                    let _ = tx
                        .send(Err(Status::internal("reading revocations failed")))
                        .await;
                    return;
                }
            };
            let (batch, n, scanned_to) = batch;
            for (seq, r) in batch {
                if tx.send(Ok(notice(seq, r))).await.is_err() {
                    return;
                }
            }
            last = scanned_to;
            if n < 256 {
                break;
            }
        }
        let mut stopping = state.stopping.clone();
        let mut heartbeat = tokio::time::interval(WATCH_HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                // Queued revocations go before a heartbeat, so that a
                // heartbeat never vouches for one still queued behind it.
                biased;
                n = live.recv() => n,
                _ = lattice_shared::net::until_true(&mut stopping) => {
                    let _ = tx.send(Err(Status::unavailable("cache stopping"))).await;
                    return;
                }
                _ = heartbeat.tick() => {
                    // No revocation: tells followers how fresh this cache is.
                    let beat = pb::RevocationNotice {
                        seq: last,
                        revocation: None,
                        cache_staleness_ms: state.replica.staleness_ms().unwrap_or(u64::MAX),
                        checkpoint: state.replica.checkpoint().map(|c| (*c).clone()),
                    };
                    if tx.send(Ok(beat)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            match next {
                Ok((seq, r)) if seq > last => {
                    last = seq;
                    if tx.send(Ok(notice(seq, r))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx
                        .send(Err(Status::aborted(format!(
                            "fell behind; resume after {last}"
                        ))))
                        .await;
                    return;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    };
    // Ends with the cache even when blocked on a reader that reads nothing.
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = lattice_shared::net::until_true(&mut stop_all) => {}
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

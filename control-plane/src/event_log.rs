//! The ordered event log: contiguous sequence numbers from 1, each event
//! durable (with the new head, in one atomic write) before `append` returns.
//! The revocation set is derived from the log, so it can never disagree
//! with it after a restart.

use std::collections::VecDeque;
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use lattice_shared::eventlog;
use lattice_shared::freshness::{Link, next_link};
use lattice_shared::proto as pb;
use lattice_shared::revocation::{Revocation, RevocationSet};
use lattice_shared::store::{SharedStore, Write};
use prost::Message;
use tokio::sync::watch;

use crate::Error;

const T_EVENTS: &str = "events";
const T_META: &str = "meta";
const HEAD_KEY: &[u8] = b"log_head";
/// Commit times kept in memory to measure propagation on acks.
const RECENT: usize = 4096;

pub use lattice_shared::eventlog::seq_key;

#[derive(Debug)]
pub struct EventLog {
    store: SharedStore,
    append_lock: Mutex<()>,
    head: watch::Sender<u64>,
    revocations: RwLock<RevocationSet>,
    /// The head and the revocation chain at it, changed together.
    tip: Mutex<(u64, Link)>,
    /// The newest events, so that streams to many caches read memory, not disk.
    recent: Mutex<VecDeque<pb::LatticeEvent>>,
}

fn decode(bytes: &[u8]) -> Result<pb::LatticeEvent, Error> {
    Ok(eventlog::decode(bytes)?)
}

impl EventLog {
    /// Opens the log and replays it; refuses a log with a gap. Also returns
    /// the sequence numbers of the policy releases found ([`Self::policy_at`]).
    pub fn open(store: SharedStore) -> Result<(Self, Vec<u64>), Error> {
        let head = eventlog::read_seq(&*store, T_META, HEAD_KEY)?;
        let replayed = eventlog::replay(&*store, T_EVENTS, head, |_, _| {})?;
        let revocations = replayed.revocations;
        let log = Self {
            store,
            append_lock: Mutex::new(()),
            head: watch::channel(head).0,
            revocations: RwLock::new(revocations),
            tip: Mutex::new((head, replayed.revocation_chain)),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        };
        Ok((log, replayed.policies))
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The policy release stored at `seq`.
    pub fn policy_at(&self, seq: u64) -> Result<pb::SignedPolicy, Error> {
        Ok(eventlog::read_policy(&*self.store, T_EVENTS, seq)?)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// The committed head and the revocation chain at it.
    pub fn tip(&self) -> (u64, Link) {
        *self.tip.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn revocations(&self) -> RwLockReadGuard<'_, RevocationSet> {
        self.revocations.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a revocation durably; returns the committed event.
    pub fn append_revocation(
        &self,
        r: &Revocation,
        now_ms: i64,
    ) -> Result<pb::LatticeEvent, Error> {
        let ev = self.append(pb::lattice_event::Body::Revocation(r.into()), now_ms)?;
        Ok(ev)
    }

    /// Appends a signed policy release durably.
    pub fn append_policy(
        &self,
        p: pb::SignedPolicy,
        now_ms: i64,
    ) -> Result<pb::LatticeEvent, Error> {
        self.append(pb::lattice_event::Body::Policy(p), now_ms)
    }

    /// Appends a secret event (sealed envelopes or the versions in force).
    pub fn append_secret(
        &self,
        e: pb::SecretEvent,
        now_ms: i64,
    ) -> Result<pb::LatticeEvent, Error> {
        self.append(pb::lattice_event::Body::Secret(e), now_ms)
    }

    fn append(
        &self,
        body: pb::lattice_event::Body,
        now_ms: i64,
    ) -> Result<pb::LatticeEvent, Error> {
        let _guard = self.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.head() + 1;
        let event = pb::LatticeEvent {
            seq,
            committed_at_unix_ms: now_ms,
            body: Some(body),
        };
        self.store.apply(vec![
            Write {
                tree: T_EVENTS,
                key: seq_key(seq).to_vec(),
                value: Some(event.encode_to_vec()),
            },
            Write {
                tree: T_META,
                key: HEAD_KEY.to_vec(),
                value: Some(seq.to_be_bytes().to_vec()),
            },
        ])?;
        // Durable: now enforce here and announce.
        {
            let mut tip = self.tip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pb::lattice_event::Body::Revocation(r)) = &event.body {
                tip.1 = next_link(&tip.1, seq, r);
                if let Ok(r) = Revocation::try_from(r) {
                    self.revocations
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .apply(&r);
                }
            }
            tip.0 = seq;
        }
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(event.clone());
        }
        self.head.send_replace(seq);
        metrics::gauge!("lattice_cp_log_head").set(seq as f64);
        Ok(event)
    }

    /// One event by sequence number.
    pub fn get(&self, seq: u64) -> Result<Option<pb::LatticeEvent>, Error> {
        Ok(self
            .read_after(seq.saturating_sub(1), 1)?
            .into_iter()
            .find(|e| e.seq == seq))
    }

    /// Up to `limit` events after `after` from memory, when they are all
    /// there (`None`: read the store).
    pub fn recent_after(&self, after: u64, limit: usize) -> Option<Vec<pb::LatticeEvent>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let first = recent.front()?.seq;
        if after + 1 < first {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).ok()?;
        Some(recent.iter().skip(skip).take(limit).cloned().collect())
    }

    /// Up to `limit` events after `after`, in order.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<pb::LatticeEvent>, Error> {
        if let Some(events) = self.recent_after(after, limit) {
            return Ok(events);
        }
        self.store
            .scan_from(T_EVENTS, &seq_key(after + 1), limit)?
            .iter()
            .map(|(_, v)| decode(v))
            .collect()
    }

    /// Commit times (unix ms) of recent events in `(after, upto]`.
    pub fn commit_times(&self, after: u64, upto: u64) -> Vec<(u64, i64)> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent
            .iter()
            .filter(|e| e.seq > after && e.seq <= upto)
            .map(|e| (e.seq, e.committed_at_unix_ms))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lattice_shared::id::SpiffeId;
    use lattice_shared::revocation::Target;
    use lattice_shared::store::{FaultStore, MemStore, Store};

    fn rev(n: u32) -> Revocation {
        Revocation {
            target: Target::Agent(
                SpiffeId::parse(&format!("spiffe://t/agent/eu/a{n}")).expect("id"),
            ),
            reason: String::new(),
        }
    }

    #[test]
    fn sequences_are_contiguous_and_survive_reopen() {
        let store = MemStore::shared();
        let log = EventLog::open(store.clone()).expect("open").0;
        for n in 1..=5 {
            assert_eq!(
                log.append_revocation(&rev(n), 1000).expect("append").seq,
                u64::from(n)
            );
        }
        let events = log.read_after(2, 10).expect("read");
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let again = EventLog::open(store).expect("reopen").0;
        assert_eq!(again.head(), 5);
        assert_eq!(again.tip(), log.tip(), "the chain is replayed");
        assert_eq!(again.revocations().len(), 5);
    }

    #[test]
    fn a_failed_write_consumes_no_sequence_and_announces_nothing() {
        let store = FaultStore::new(MemStore::shared());
        let log = EventLog::open(store.clone()).expect("open").0;
        log.append_revocation(&rev(1), 1).expect("append");
        store.fail_next();
        assert!(log.append_revocation(&rev(2), 2).is_err());
        assert_eq!(log.head(), 1);
        assert!(
            !log.revocations()
                .is_agent_revoked(&SpiffeId::parse("spiffe://t/agent/eu/a2").expect("id"))
        );
        assert_eq!(log.append_revocation(&rev(3), 3).expect("append").seq, 2);
    }

    #[test]
    fn a_gap_is_refused_at_open() {
        let store = MemStore::shared();
        let log = EventLog::open(store.clone()).expect("open").0;
        for n in 1..=3 {
            log.append_revocation(&rev(n), 0).expect("append");
        }
        store.delete(T_EVENTS, &seq_key(2)).expect("delete");
        assert!(matches!(EventLog::open(store), Err(e) if e.to_string().contains("gap")));
    }
}

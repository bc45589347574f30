//! The cache's audit outbox: every issuance, lease and refusal becomes a
//! JSON record, numbered from 1 without gaps, written to the local store in
//! group commits (many records share one fsync), forwarded to the control plane on the `Sync` stream and
//! deleted once the control plane acks it. While partitioned it grows on
//! disk up to its capacity (`audit_outbox_max_records`, default
//! `MAX_EVENTS`); the control plane appends each number once, so a resend
//! after a crash or a reconnect duplicates nothing. When it passes 80 % of
//! its capacity it records an `outbox_pressure` record of its own (once,
//! again after it has drained below half), which the control plane turns
//! into an `audit_backlog` alert when it arrives; the gauges
//! `lattice_cache_audit_outbox_events` and `…_capacity` let Prometheus alert
//! while the link is still down (`deploy/prometheus/alerts.yml`).
//!
//! Records are stored in chunks (`lattice_shared::chunk`), one store value
//! per run of a group commit keyed by its first number; the highest acked
//! number is stored beside them, so a chunk the control plane holds only
//! part of stays until all of it is acked.
//!
//! Each record queued gets a [`Ticket`]; [`Outbox::wait_durable`] returns
//! once that record is on disk. In the default `audit_mode = "durable"` the
//! cache answers a mint, exchange or lease only then, and the writer starts
//! a commit as soon as a record is queued (what arrives during an fsync
//! goes into the next one). In `"commit_delay"` the answer goes out at once
//! and the writer gathers records for `FLUSH_DELAY` first: a crash within
//! that window loses the record of a credential already handed out.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use lattice_shared::limits::MAX_AUDIT_RECORD_BYTES;
use lattice_shared::store::{SharedStore, Write};
use tokio::sync::watch;

use crate::Error;

const T_OUTBOX: &str = "audit_outbox";
const T_META: &str = "meta";
const NEXT_KEY: &[u8] = b"audit_next";
const EPOCH_KEY: &[u8] = b"audit_epoch";
const ACKED_KEY: &[u8] = b"audit_acked";
/// Records held while the control plane is unreachable (default capacity).
pub const MAX_EVENTS: u64 = 1_000_000;
/// How long the writer gathers records into one durable batch in the
/// `commit_delay` audit mode.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// Records per `AuditBatch` sent up (also bounded by bytes).
pub const BATCH: usize = 512;

#[derive(Debug, Default)]
struct Inner {
    /// Recorded, not yet durable.
    pending: Vec<Vec<u8>>,
    /// The number the next durable record gets.
    next: u64,
    /// Highest number the control plane holds.
    acked: u64,
    dropped: u64,
    /// Past 80 % of the capacity, and not yet drained below half.
    pressured: bool,
    /// Stored chunks: first number → record count.
    chunks: BTreeMap<u64, u64>,
    /// Why the last write failed, until one succeeds.
    failing: Option<String>,
    /// Records ever queued since the outbox was opened (what a [`Ticket`]
    /// counts).
    queued: u64,
    /// The writer thread is to end.
    stop: bool,
}

/// A queued record's place: it is durable once the writer has made this
/// many of the records queued since opening durable (they are written in
/// the order they were queued, a failed write keeping its place).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an issuing path waits for its record to be durable"]
pub struct Ticket(u64);

/// How long the writer waits before writing again after a failed write.
const RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug)]
pub struct Outbox {
    store: SharedStore,
    max: u64,
    clock: lattice_shared::clock::SharedClock,
    epoch: u64,
    inner: Mutex<Inner>,
    /// Held for a whole flush: two at once would number the same records.
    flushing: Mutex<()>,
    /// Signalled when a record is queued (and at stop).
    wake: Condvar,
    /// How long the writer gathers records before a commit.
    gather: Duration,
    /// Highest durable number.
    durable: watch::Sender<u64>,
    /// How many of the records queued since opening are durable.
    written: watch::Sender<u64>,
}

fn key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn chunk_key(k: &[u8]) -> Result<u64, Error> {
    <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt("outbox key".into()))
}

impl Outbox {
    /// Opens the outbox of `store`, holding at most `max` records.
    /// `gather`: how long the writer waits for more records before a
    /// commit (zero: it commits at once).
    pub fn open(
        store: SharedStore,
        max: u64,
        gather: Duration,
        clock: lattice_shared::clock::SharedClock,
    ) -> Result<Self, Error> {
        let mut epoch = lattice_shared::eventlog::read_seq(&*store, T_META, EPOCH_KEY)?;
        if epoch == 0 {
            let mut b = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
                .map_err(|_| Error::Corrupt("random number generator failed".into()))?;
            epoch = u64::from_be_bytes(b).max(1);
            store.apply(vec![Write {
                tree: T_META,
                key: EPOCH_KEY.to_vec(),
                value: Some(epoch.to_be_bytes().to_vec()),
            }])?;
        }
        // Outboxes written before the numbers were derived stored the next
        // one; now it follows from what is stored (below).
        let stored_next = lattice_shared::eventlog::read_seq(&*store, T_META, NEXT_KEY)?;
        // The index of stored chunks (read once; the outbox is bounded).
        let mut chunks = BTreeMap::new();
        let mut from = 0u64;
        loop {
            let rows = store.scan_from(T_OUTBOX, &key(from), 64)?;
            let Some((last, _)) = rows.last() else { break };
            let last = chunk_key(last)?;
            for (k, v) in &rows {
                let n = lattice_shared::chunk::decode(v)
                    .map_err(|e| Error::Corrupt(e.to_string()))?
                    .len() as u64;
                chunks.insert(chunk_key(k)?, n);
            }
            from = last + 1;
        }
        // Acked numbers are stored; what is still stored before that mark
        // is a chunk only partly acked. Outboxes written before the mark
        // existed deleted each record as it was acked.
        let stored_acked = lattice_shared::eventlog::read_seq(&*store, T_META, ACKED_KEY)?;
        // The next number follows the last stored chunk, or the acked mark
        // once every chunk is gone: numbers never restart.
        let after_chunks = chunks.last_key_value().map_or(0, |(&s, &n)| s + n);
        let next = stored_next.max(after_chunks).max(stored_acked + 1).max(1);
        let acked = match chunks.first_key_value() {
            Some((&first, _)) => stored_acked.max(first - 1),
            None => next - 1,
        };
        if acked >= next {
            return Err(Error::Corrupt(format!(
                "audit outbox: acked {acked} is beyond the next number {next}"
            )));
        }
        metrics::gauge!("lattice_cache_audit_outbox_capacity").set(max as f64);
        Ok(Self {
            store,
            max,
            clock,
            epoch,
            inner: Mutex::new(Inner {
                next,
                acked,
                chunks,
                ..Inner::default()
            }),
            flushing: Mutex::new(()),
            wake: Condvar::new(),
            gather,
            durable: watch::channel(next - 1).0,
            written: watch::channel(0).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record for the next commit. `None`: it was dropped, and
    /// counted (too large, or the outbox is full).
    pub fn record(&self, json: Vec<u8>) -> Option<Ticket> {
        if json.len() > MAX_AUDIT_RECORD_BYTES {
            // Our records are a few hundred bytes; the control plane refuses
            // larger ones, which would stall the queue behind them.
            metrics::counter!("lattice_cache_audit_dropped_total").increment(1);
            tracing::error!(bytes = json.len(), "audit record too large; dropped");
            return None;
        }
        let ticket = {
            let mut g = self.lock();
            let held = g.next - 1 - g.acked + g.pending.len() as u64;
            if held >= self.max {
                g.dropped += 1;
                metrics::counter!("lattice_cache_audit_dropped_total").increment(1);
                if g.dropped == 1 || g.dropped.is_power_of_two() {
                    tracing::error!(
                        dropped = g.dropped,
                        "audit outbox full: records are being dropped"
                    );
                }
                return None;
            }
            g.pending.push(json);
            g.queued += 1;
            Ticket(g.queued)
        };
        self.wake.notify_one();
        Some(ticket)
    }

    /// Waits until the record of `ticket` is durable, at most `within`.
    pub async fn wait_durable(&self, ticket: Ticket, within: Duration) -> Result<(), String> {
        let mut rx = self.written.subscribe();
        match tokio::time::timeout(within, rx.wait_for(|&w| w >= ticket.0)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("audit unavailable: the audit writer stopped".into()),
            Err(_) => Err(match &self.lock().failing {
                Some(e) => format!("audit unavailable: writing audit records failed ({e})"),
                None => {
                    format!("audit unavailable: the audit record was not durable within {within:?}")
                }
            }),
        }
    }

    /// Writes what is pending in one durable batch. Returns the highest
    /// durable number.
    fn flush(&self) -> Result<u64, Error> {
        let _one = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        let (batch, first) = {
            let mut g = self.lock();
            (std::mem::take(&mut g.pending), g.next)
        };
        if batch.is_empty() {
            return Ok(first - 1);
        }
        let n = batch.len() as u64;
        let mut writes = Vec::new();
        let mut runs = Vec::new();
        let mut at = first;
        for run in lattice_shared::chunk::split(&batch) {
            writes.push(Write {
                tree: T_OUTBOX,
                key: key(at).to_vec(),
                value: Some(lattice_shared::chunk::encode(run)),
            });
            runs.push((at, run.len() as u64));
            at += run.len() as u64;
        }
        // One tree, so one sled batch. Numbers are taken only once the
        // batch is durable: a failed write leaves no gap and loses nothing.
        let batch_back = batch;
        match self.store.apply(writes) {
            Ok(()) => {
                drop(batch_back);
                let mut g = self.lock();
                g.failing = None;
                g.next = first + n;
                g.chunks.extend(runs);
                let held = g.next - 1 - g.acked;
                metrics::gauge!("lattice_cache_audit_outbox_events").set(held as f64);
                let pressure = held * 10 >= self.max * 8 && !g.pressured;
                if pressure {
                    g.pressured = true;
                    tracing::warn!(
                        held,
                        max = self.max,
                        "audit outbox is nearly full: the control plane has not taken records for a while"
                    );
                    // Forwarded with the rest: the control plane alerts on it.
                    let at = lattice_shared::clock::unix_millis(self.clock.now());
                    g.queued += 1;
                    g.pending.push(
                        format!(
                            "{{\"kind\":\"outbox_pressure\",\"held\":{held},\"max\":{},\"at_unix_ms\":{at},\"decision\":\"none\"}}",
                            self.max
                        )
                        .into_bytes(),
                    );
                }
                drop(g);
                self.written.send_modify(|w| *w += n);
                self.durable.send_replace(first + n - 1);
                Ok(first + n - 1)
            }
            Err(e) => {
                // Kept, in order, ahead of what came meanwhile: the next
                // flush writes them. Until then the cache issues nothing.
                let mut g = self.lock();
                let newer = std::mem::replace(&mut g.pending, batch_back);
                g.pending.extend(newer);
                g.failing = Some(e.to_string());
                Err(e.into())
            }
        }
    }

    /// Starts the writer, a thread of its own (persistence never waits for
    /// a pool that request work also uses): it commits what is queued as
    /// soon as something is, after gathering for `gather` first if that is
    /// not zero; what arrives during a commit goes into the next one. A
    /// failed write keeps its records and is tried again after
    /// `RETRY_DELAY` (the store itself stops for good if an fsync failed).
    pub fn start_writer(self: &Arc<Self>) -> std::io::Result<Writer> {
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("audit-outbox".into())
            .spawn(move || me.write_until_stopped())?;
        Ok(Writer {
            outbox: self.clone(),
            thread: Some(thread),
        })
    }

    fn write_until_stopped(&self) {
        loop {
            {
                let g = self.lock();
                let g = self
                    .wake
                    .wait_while(g, |g| g.pending.is_empty() && !g.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if g.stop {
                    return;
                }
            }
            if !self.gather.is_zero() {
                std::thread::sleep(self.gather);
            }
            if let Err(e) = self.flush() {
                tracing::error!(error = %e, "writing audit records failed; retrying");
                // The records are kept: try again shortly.
                let g = self.lock();
                let (g, _) = self
                    .wake
                    .wait_timeout_while(g, RETRY_DELAY, |g| !g.stop)
                    .unwrap_or_else(|p| p.into_inner());
                if g.stop {
                    return;
                }
            }
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn subscribe_durable(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    pub fn acked(&self) -> u64 {
        self.lock().acked
    }

    /// Durable records after `after`, at most `BATCH`: (first number, records).
    pub fn read_after(&self, after: u64) -> Result<(u64, Vec<Vec<u8>>), Error> {
        // The chunks holding `after + 1` onwards, as far as one batch goes.
        let starts: Vec<u64> = {
            let g = self.lock();
            let from = g
                .chunks
                .range(..=after + 1)
                .next_back()
                .map(|(&s, _)| s)
                .unwrap_or(after + 1);
            let mut held = 0u64;
            g.chunks
                .range(from..)
                .take_while(|&(&s, &n)| {
                    let more = held < BATCH as u64;
                    held += (s + n).saturating_sub(after + 1).min(n);
                    more
                })
                .map(|(&s, _)| s)
                .collect()
        };
        let mut out = Vec::new();
        let mut first = 0;
        for s in starts {
            let v = self
                .store
                .get(T_OUTBOX, &key(s))?
                .ok_or_else(|| Error::Corrupt(format!("audit outbox: chunk {s} is missing")))?;
            let records =
                lattice_shared::chunk::decode(&v).map_err(|e| Error::Corrupt(e.to_string()))?;
            for (n, r) in (s..).zip(records) {
                if n <= after || out.len() >= BATCH {
                    continue;
                }
                if out.is_empty() {
                    first = n;
                } else if n != first + out.len() as u64 {
                    return Err(Error::Corrupt(format!("audit outbox has a gap at {n}")));
                }
                out.push(r.to_vec());
            }
        }
        Ok((first, out))
    }

    /// The control plane holds everything up to `upto`: delete it here.
    pub fn ack(&self, upto: u64) -> Result<(), Error> {
        {
            let g = self.lock();
            if upto <= g.acked {
                return Ok(());
            }
            if upto >= g.next {
                return Err(Error::ControlPlane(format!(
                    "audit ack {upto} is beyond what this cache recorded"
                )));
            }
        }
        // Whole chunks the control plane now holds go; the mark keeps the
        // place inside a chunk it holds only part of.
        let done: Vec<u64> = {
            let g = self.lock();
            g.chunks
                .iter()
                .take_while(|&(&s, &n)| s + n - 1 <= upto)
                .map(|(&s, _)| s)
                .collect()
        };
        let mut writes: Vec<Write> = done
            .iter()
            .map(|&s| Write {
                tree: T_OUTBOX,
                key: key(s).to_vec(),
                value: None,
            })
            .collect();
        writes.push(Write {
            tree: T_META,
            key: ACKED_KEY.to_vec(),
            value: Some(upto.to_be_bytes().to_vec()),
        });
        // Not waited for: a mark lost in a crash only means resending what
        // the control plane then acks again at once (it appends each number
        // once), and the next group commit makes it durable anyway.
        self.store.apply_unsynced(writes)?;
        let mut g = self.lock();
        for s in done {
            g.chunks.remove(&s);
        }
        g.acked = g.acked.max(upto);
        if (g.next - 1 - g.acked) * 2 < self.max {
            g.pressured = false;
        }
        metrics::gauge!("lattice_cache_audit_outbox_events").set((g.next - 1 - g.acked) as f64);
        Ok(())
    }

    /// Records waiting for the control plane (durable, not acked).
    pub fn backlog(&self) -> u64 {
        let g = self.lock();
        g.next - 1 - g.acked
    }

    /// Writes whatever is pending now (at shutdown, and in tests).
    pub fn flush_now(&self) -> Result<u64, Error> {
        self.flush()
    }

    /// Whether a credential may be issued now: its audit record must be
    /// kept, so not while writes fail nor when the outbox is full.
    pub fn accepting(&self) -> Result<(), String> {
        let g = self.lock();
        if let Some(e) = &g.failing {
            return Err(format!(
                "audit unavailable: writing audit records failed ({e})"
            ));
        }
        let held = g.next - 1 - g.acked + g.pending.len() as u64;
        if held >= self.max {
            return Err(format!(
                "audit unavailable: the audit outbox is full ({held} records the control plane has not taken)"
            ));
        }
        Ok(())
    }
}

/// The running writer thread: stopped (what is queued is then written by
/// [`Outbox::flush_now`]) by [`Writer::stop`], or told to stop when dropped.
#[derive(Debug)]
pub struct Writer {
    outbox: Arc<Outbox>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn signal(&self) {
        self.outbox.lock().stop = true;
        self.outbox.wake.notify_all();
    }

    /// Stops the thread and waits for the commit it is in, if any.
    pub fn stop(mut self) {
        self.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.signal();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> lattice_shared::clock::SharedClock {
        lattice_shared::clock::FakeClock::new().shared()
    }

    #[test]
    fn a_nearly_full_outbox_records_its_pressure_once() {
        let store: SharedStore = std::sync::Arc::new(lattice_shared::store::MemStore::default());
        let o = Outbox::open(store, 100, FLUSH_DELAY, clock()).expect("open");
        let pressure = |o: &Outbox| -> usize {
            let (_, recs) = o.read_after(o.acked()).expect("read");
            recs.iter()
                .filter(|r| String::from_utf8_lossy(r).contains("outbox_pressure"))
                .count()
        };
        for _ in 0..79 {
            o.record(b"{}".to_vec());
        }
        o.flush_now().expect("flush");
        assert_eq!(pressure(&o), 0, "below 80 %");
        o.record(b"{}".to_vec());
        o.flush_now().expect("flush");
        o.flush_now().expect("the pressure record itself");
        assert_eq!(pressure(&o), 1, "at 80 %");
        for _ in 0..10 {
            o.record(b"{}".to_vec());
        }
        o.flush_now().expect("flush");
        assert_eq!(pressure(&o), 1, "once, not at every write");
        // Full: further records are dropped, not stored.
        for _ in 0..20 {
            o.record(b"{}".to_vec());
        }
        o.flush_now().expect("flush");
        assert_eq!(o.backlog(), 100);
        // Drained below half, then filling again: told again.
        o.ack(60).expect("ack");
        for _ in 0..45 {
            o.record(b"{}".to_vec());
        }
        o.flush_now().expect("flush");
        o.flush_now().expect("the pressure record itself");
        assert_eq!(pressure(&o), 2, "told again after draining");
    }

    /// Issue #18: under an fd flood, writes failed and 4,374 issuance
    /// records were dropped while the cache kept minting. A failed write
    /// keeps its records (written by the next flush) and the outbox says it
    /// cannot take more, so the cache refuses to issue; a full one too.
    #[test]
    fn a_failed_write_loses_no_record_and_stops_issuing_until_it_works() {
        let mem = lattice_shared::store::MemStore::shared();
        let faults = lattice_shared::store::FaultStore::new(mem);
        let store: SharedStore = faults.clone();
        let o = Outbox::open(store, 10, FLUSH_DELAY, clock()).expect("open");
        assert!(o.accepting().is_ok());
        o.record(b"{\"n\":1}".to_vec());
        faults.fail_next();
        assert!(o.flush_now().is_err());
        let e = o.accepting().expect_err("not while writes fail");
        assert!(e.contains("audit unavailable"), "{e}");
        o.record(b"{\"n\":2}".to_vec());
        o.flush_now().expect("the store works again");
        assert!(o.accepting().is_ok());
        let (first, recs) = o.read_after(0).expect("read");
        assert_eq!(first, 1);
        assert_eq!(recs, vec![b"{\"n\":1}".to_vec(), b"{\"n\":2}".to_vec()]);
        for _ in 0..8 {
            o.record(b"{}".to_vec());
        }
        o.flush_now().expect("flush");
        let e = o.accepting().expect_err("full");
        assert!(e.contains("full"), "{e}");
    }

    /// Issue #18 item 5: an answer that hands out a credential waits until
    /// its record is durable, so it waits through a failed write and past
    /// the records queued before it, and only those.
    #[tokio::test]
    async fn a_ticket_is_durable_only_once_its_record_is_written() {
        let mem = lattice_shared::store::MemStore::shared();
        let faults = lattice_shared::store::FaultStore::new(mem);
        let o = Outbox::open(faults.clone(), 10, Duration::ZERO, clock()).expect("open");
        let short = Duration::from_millis(20);
        let first = o.record(b"{\"n\":1}".to_vec()).expect("queued");
        let e = o
            .wait_durable(first, short)
            .await
            .expect_err("not yet written");
        assert!(e.contains("not durable"), "{e}");
        faults.fail_next();
        assert!(o.flush_now().is_err());
        let e = o
            .wait_durable(first, short)
            .await
            .expect_err("the write failed");
        assert!(e.contains("writing audit records failed"), "{e}");
        o.flush_now().expect("written");
        o.wait_durable(first, short).await.expect("durable now");
        // A record queued after a flush waits for the next one.
        let second = o.record(b"{\"n\":2}".to_vec()).expect("queued");
        assert!(o.wait_durable(second, short).await.is_err());
        o.wait_durable(first, short).await.expect("still durable");
        o.flush_now().expect("written");
        o.wait_durable(second, short).await.expect("durable now");
        // Dropped records have no ticket.
        assert!(o.record(vec![b' '; MAX_AUDIT_RECORD_BYTES + 1]).is_none());
    }

    /// The outbox's own pressure record takes a place in the queue too: a
    /// record queued after it is not durable when only the pressure record
    /// has been written.
    #[tokio::test]
    async fn the_pressure_record_counts_in_the_ticket_order() {
        let store: SharedStore = lattice_shared::store::MemStore::shared();
        let o = Outbox::open(store, 10, Duration::ZERO, clock()).expect("open");
        for _ in 0..8 {
            let _ = o.record(b"{}".to_vec());
        }
        o.flush_now()
            .expect("to 80 %: the pressure record is queued");
        o.flush_now().expect("the pressure record alone");
        let r = o.record(b"{\"after\":1}".to_vec()).expect("queued");
        let short = Duration::from_millis(20);
        assert!(o.wait_durable(r, short).await.is_err(), "not written yet");
        o.flush_now().expect("written");
        o.wait_durable(r, short).await.expect("durable now");
    }

    #[test]
    fn numbers_survive_restart_and_acks_delete() {
        let store: SharedStore = std::sync::Arc::new(lattice_shared::store::MemStore::default());
        let o = Outbox::open(store.clone(), MAX_EVENTS, FLUSH_DELAY, clock()).expect("open");
        for i in 0..5 {
            o.record(format!("{{\"n\":{i}}}").into_bytes());
        }
        assert_eq!(o.flush_now().expect("flush"), 5);
        let (first, recs) = o.read_after(0).expect("read");
        assert_eq!((first, recs.len()), (1, 5));
        o.ack(3).expect("ack");
        assert_eq!(o.backlog(), 2);
        // Reopened: numbering continues, acked records are gone.
        let o = Outbox::open(store.clone(), MAX_EVENTS, FLUSH_DELAY, clock()).expect("reopen");
        assert_eq!(o.acked(), 3);
        let (first, recs) = o.read_after(o.acked()).expect("read");
        assert_eq!((first, recs.len()), (4, 2));
        o.ack(5).expect("ack all");
        let o = Outbox::open(store, MAX_EVENTS, FLUSH_DELAY, clock()).expect("reopen");
        o.record(b"{}".to_vec());
        assert_eq!(o.flush_now().expect("flush"), 6, "numbers never restart");
        assert!(o.ack(9).is_err(), "an ack beyond what was recorded");
    }

    #[test]
    fn chunks_are_acked_in_part_and_read_from_the_middle() {
        let store: SharedStore = std::sync::Arc::new(lattice_shared::store::MemStore::default());
        let o = Outbox::open(store.clone(), MAX_EVENTS, FLUSH_DELAY, clock()).expect("open");
        // Three group commits: 1..=700, 701..=1400, 1401..=1500.
        for n in [700, 700, 100] {
            for i in 0..n {
                o.record(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(40)).into_bytes());
            }
            o.flush_now().expect("flush");
        }
        let chunks = store
            .scan_prefix(T_OUTBOX, b"", usize::MAX)
            .expect("scan")
            .len();
        assert!(
            chunks < 1500 / 10,
            "records share store values: {chunks} chunks"
        );
        // A batch starts anywhere, runs on across chunks, and stops at BATCH.
        let (first, recs) = o.read_after(650).expect("read");
        assert_eq!((first, recs.len()), (651, BATCH));
        // Acked in the middle of a chunk: the chunk stays until all of it is.
        o.ack(651).expect("ack");
        let o = Outbox::open(store.clone(), MAX_EVENTS, FLUSH_DELAY, clock()).expect("reopen");
        assert_eq!(o.acked(), 651);
        assert_eq!(o.backlog(), 1500 - 651);
        let (first, recs) = o.read_after(o.acked()).expect("read");
        assert_eq!(first, 652);
        assert!(String::from_utf8_lossy(&recs[0]).starts_with("{\"n\":651,"));
        o.ack(1500).expect("ack all");
        assert!(
            store
                .scan_prefix(T_OUTBOX, b"", usize::MAX)
                .expect("scan")
                .is_empty(),
            "every chunk deleted once acked"
        );
        assert_eq!(o.read_after(1500).expect("read").1.len(), 0);
    }

    #[test]
    fn an_outbox_of_one_record_per_key_still_opens() {
        // The layout before chunks: each record under its own number, no
        // stored ack mark (acked records were deleted one by one).
        let store: SharedStore = std::sync::Arc::new(lattice_shared::store::MemStore::default());
        let mut writes: Vec<Write> = (4..=6u64)
            .map(|n| Write {
                tree: T_OUTBOX,
                key: key(n).to_vec(),
                value: Some(format!("{{\"old\":{n}}}").into_bytes()),
            })
            .collect();
        writes.push(Write {
            tree: T_META,
            key: NEXT_KEY.to_vec(),
            value: Some(7u64.to_be_bytes().to_vec()),
        });
        store.apply(writes).expect("seed");
        let o = Outbox::open(store.clone(), MAX_EVENTS, FLUSH_DELAY, clock()).expect("open");
        assert_eq!((o.acked(), o.backlog()), (3, 3));
        let (first, recs) = o.read_after(3).expect("read");
        assert_eq!(first, 4);
        assert_eq!(
            recs,
            vec![
                b"{\"old\":4}".to_vec(),
                b"{\"old\":5}".to_vec(),
                b"{\"old\":6}".to_vec()
            ]
        );
        o.record(b"{\"new\":7}".to_vec());
        assert_eq!(o.flush_now().expect("flush"), 7);
        o.ack(5).expect("ack");
        let o = Outbox::open(store, MAX_EVENTS, FLUSH_DELAY, clock()).expect("reopen");
        let (first, recs) = o.read_after(o.acked()).expect("read");
        assert_eq!((first, recs.len()), (6, 2));
    }
}

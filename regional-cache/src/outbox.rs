//! The cache's audit outbox: every issuance, lease and refusal becomes a
//! JSON record, numbered from 1 without gaps, written to the local store in
//! group commits (one fsync per `FLUSH_DELAY` batch, so minting never waits
//! on the disk), forwarded to the control plane on the `Sync` stream and
//! deleted once the control plane acks it. While partitioned it grows on
//! disk up to `MAX_EVENTS`; the control plane appends each number once, so a
//! resend after a crash or a reconnect duplicates nothing.

use std::sync::Mutex;
use std::time::Duration;

use lattice_shared::store::{SharedStore, Write};
use tokio::sync::{Notify, watch};

use crate::Error;

const T_OUTBOX: &str = "audit_outbox";
const T_META: &str = "meta";
const NEXT_KEY: &[u8] = b"audit_next";
const EPOCH_KEY: &[u8] = b"audit_epoch";
/// Records held while the control plane is unreachable.
pub const MAX_EVENTS: u64 = 1_000_000;
/// How long the writer gathers records into one durable batch.
pub const FLUSH_DELAY: Duration = Duration::from_millis(5);
/// Records per `AuditBatch` sent up (also bounded by bytes).
pub const BATCH: usize = 512;
/// The control plane refuses larger records.
pub const MAX_RECORD_BYTES: usize = 16 * 1024;

#[derive(Debug, Default)]
struct Inner {
    /// Recorded, not yet durable.
    pending: Vec<Vec<u8>>,
    /// The number the next durable record gets.
    next: u64,
    /// Highest number the control plane holds.
    acked: u64,
    dropped: u64,
}

#[derive(Debug)]
pub struct Outbox {
    store: SharedStore,
    epoch: u64,
    inner: Mutex<Inner>,
    wake: Notify,
    /// Highest durable number.
    durable: watch::Sender<u64>,
}

fn key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

impl Outbox {
    pub fn open(store: SharedStore) -> Result<Self, Error> {
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
        let next = lattice_shared::eventlog::read_seq(&*store, T_META, NEXT_KEY)?.max(1);
        // What is still stored was not acked.
        let acked = store
            .scan_prefix(T_OUTBOX, b"", 1)?
            .first()
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_slice()).ok())
            .map(|k| u64::from_be_bytes(k) - 1)
            .unwrap_or(next - 1);
        Ok(Self {
            store,
            epoch,
            inner: Mutex::new(Inner {
                next,
                acked,
                ..Inner::default()
            }),
            wake: Notify::new(),
            durable: watch::channel(next - 1).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a record; it is durable within `FLUSH_DELAY` (or dropped, and
    /// counted, when the outbox is full).
    pub fn record(&self, json: Vec<u8>) {
        if json.len() > MAX_RECORD_BYTES {
            // Our records are a few hundred bytes; the control plane refuses
            // larger ones, which would stall the queue behind them.
            metrics::counter!("lattice_cache_audit_dropped_total").increment(1);
            tracing::error!(bytes = json.len(), "audit record too large; dropped");
            return;
        }
        {
            let mut g = self.lock();
            let held = g.next - 1 - g.acked + g.pending.len() as u64;
            if held >= MAX_EVENTS {
                g.dropped += 1;
                metrics::counter!("lattice_cache_audit_dropped_total").increment(1);
                if g.dropped == 1 || g.dropped.is_power_of_two() {
                    tracing::error!(
                        dropped = g.dropped,
                        "audit outbox full: records are being dropped"
                    );
                }
                return;
            }
            g.pending.push(json);
        }
        self.wake.notify_one();
    }

    /// Writes what is pending in one durable batch. Returns the highest
    /// durable number.
    fn flush(&self) -> Result<u64, Error> {
        let (batch, first) = {
            let mut g = self.lock();
            (std::mem::take(&mut g.pending), g.next)
        };
        if batch.is_empty() {
            return Ok(first - 1);
        }
        let n = batch.len() as u64;
        let mut writes: Vec<Write> = batch
            .into_iter()
            .enumerate()
            .map(|(i, v)| Write {
                tree: T_OUTBOX,
                key: key(first + i as u64).to_vec(),
                value: Some(v),
            })
            .collect();
        writes.push(Write {
            tree: T_META,
            key: NEXT_KEY.to_vec(),
            value: Some((first + n).to_be_bytes().to_vec()),
        });
        // Numbers are taken only once the batch is durable: a failed write
        // loses these records (counted) but leaves no gap.
        match self.store.apply(writes) {
            Ok(()) => {
                let mut g = self.lock();
                g.next = first + n;
                let held = g.next - 1 - g.acked;
                metrics::gauge!("lattice_cache_audit_outbox_events").set(held as f64);
                if held * 10 >= MAX_EVENTS * 8 {
                    tracing::warn!(held, max = MAX_EVENTS, "audit outbox is nearly full");
                }
                drop(g);
                self.durable.send_replace(first + n - 1);
                Ok(first + n - 1)
            }
            Err(e) => {
                metrics::counter!("lattice_cache_audit_dropped_total").increment(n);
                Err(e.into())
            }
        }
    }

    /// The writer: group-commits records as they come.
    pub async fn run_writer(self: std::sync::Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(FLUSH_DELAY).await;
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.flush()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "writing audit records failed"),
                Err(_) => tracing::error!("audit writer failed"),
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
        let rows = self.store.scan_from(T_OUTBOX, &key(after + 1), BATCH)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut first = 0;
        for (i, (k, v)) in rows.into_iter().enumerate() {
            let n = <[u8; 8]>::try_from(k.as_slice())
                .map(u64::from_be_bytes)
                .map_err(|_| Error::Corrupt("outbox key".into()))?;
            if i == 0 {
                first = n;
            } else if n != first + i as u64 {
                return Err(Error::Corrupt(format!("audit outbox has a gap at {n}")));
            }
            out.push(v);
        }
        Ok((first, out))
    }

    /// The control plane holds everything up to `upto`: delete it here.
    pub fn ack(&self, upto: u64) -> Result<(), Error> {
        let from = {
            let g = self.lock();
            if upto <= g.acked {
                return Ok(());
            }
            if upto >= g.next {
                return Err(Error::ControlPlane(format!(
                    "audit ack {upto} is beyond what this cache recorded"
                )));
            }
            g.acked + 1
        };
        let writes: Vec<Write> = (from..=upto)
            .map(|n| Write {
                tree: T_OUTBOX,
                key: key(n).to_vec(),
                value: None,
            })
            .collect();
        self.store.apply(writes)?;
        let mut g = self.lock();
        g.acked = g.acked.max(upto);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_survive_restart_and_acks_delete() {
        let store: SharedStore = std::sync::Arc::new(lattice_shared::store::MemStore::default());
        let o = Outbox::open(store.clone()).expect("open");
        for i in 0..5 {
            o.record(format!("{{\"n\":{i}}}").into_bytes());
        }
        assert_eq!(o.flush_now().expect("flush"), 5);
        let (first, recs) = o.read_after(0).expect("read");
        assert_eq!((first, recs.len()), (1, 5));
        o.ack(3).expect("ack");
        assert_eq!(o.backlog(), 2);
        // Reopened: numbering continues, acked records are gone.
        let o = Outbox::open(store.clone()).expect("reopen");
        assert_eq!(o.acked(), 3);
        let (first, recs) = o.read_after(o.acked()).expect("read");
        assert_eq!((first, recs.len()), (4, 2));
        o.ack(5).expect("ack all");
        let o = Outbox::open(store).expect("reopen");
        o.record(b"{}".to_vec());
        assert_eq!(o.flush_now().expect("flush"), 6, "numbers never restart");
        assert!(o.ack(9).is_err(), "an ack beyond what was recorded");
    }
}

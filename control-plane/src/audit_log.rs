//! The tamper-evident audit log: an append-only RFC 6962 Merkle tree whose
//! leaves are audit records (JSON, never a secret value). Each leaf is
//! durable before its append returns. Tree heads (size, root, time) are
//! signed with the control plane's certified signing key every
//! `HEAD_EVERY` entries and by a timer, and kept; anyone holding the root
//! certificate can check a head, and with the Admin API's proofs that an
//! entry is in it and that an older head is a prefix of a newer one.
//!
//! Entries are stored in chunks (`lattice_shared::chunk`): one store value
//! per committed batch, keyed by the index of its first entry, so a group
//! commit of thousands of records is a few store writes. A lone entry is
//! stored as it is.
//!
//! Every perfect subtree's hash is kept in memory (`merkle::Tree`: 64
//! bytes per entry), so a proof or the root of any prefix costs O(log² n)
//! lookups: fine for tens of millions of entries, not for billions (stored
//! subtree hashes are the scale path). Proofs and reads take the tree's
//! read lock for microseconds; only the writer waits for the disk, under
//! a lock of its own.
//!
//! Signed heads are kept under their size; the newest one's size is also
//! kept on its own (`audit_head_latest`), so neither start-up nor a proof
//! against the newest head reads them all, and heads are served a page at
//! a time.

use std::sync::{Mutex, RwLock};

use lattice_shared::chunk;
use lattice_shared::merkle::{self, Hash};
use lattice_shared::policy::sign::PolicySigner;
use lattice_shared::proto as pb;
use lattice_shared::store::{SharedStore, Write};
use prost::Message;

use crate::Error;

const T_LEAVES: &str = "audit_leaves";
const T_HEADS: &str = "audit_heads";
/// The size of the newest signed head, under [`LATEST`].
const T_HEAD_LATEST: &str = "audit_head_latest";
const LATEST: &[u8] = b"latest";
/// Domain separation of tree-head signatures.
pub const HEAD_CONTEXT: &[u8] = b"lattice audit tree head v1\0";
/// A head is signed at least every this many entries.
pub const HEAD_EVERY: u64 = 64;
/// Largest page of entries, or of heads, served.
pub const MAX_PAGE: u32 = 1000;

/// What readers see: changed only by the writer, after its write is durable.
#[derive(Debug, Default)]
struct Tree {
    leaves: merkle::Tree,
    /// Index of the first entry of each stored chunk, ascending.
    chunks: Vec<u64>,
    /// Size of the newest signed head.
    last_head: u64,
}

#[derive(Debug)]
pub struct AuditLog {
    store: SharedStore,
    /// Held by whoever writes (appends, heads) across its durable write.
    writer: Mutex<()>,
    tree: RwLock<Tree>,
}

fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn size_of_key(k: &[u8]) -> Result<u64, Error> {
    <[u8; 8]>::try_from(k)
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Corrupt("tree head key".into()))
}

fn decode_head(v: &[u8]) -> Result<pb::SignedTreeHead, Error> {
    pb::SignedTreeHead::decode(v).map_err(|e| Error::Corrupt(format!("tree head: {e}")))
}

impl AuditLog {
    /// Loads the leaves (they must run from 0 without a gap) and the size
    /// of the newest head.
    pub fn open(store: SharedStore) -> Result<Self, Error> {
        let mut leaves = merkle::Tree::default();
        let mut chunks = Vec::new();
        loop {
            let batch = store.scan_from(T_LEAVES, &key(leaves.len() as u64), 256)?;
            if batch.is_empty() {
                break;
            }
            for (k, v) in batch {
                if k.as_slice() != key(leaves.len() as u64) {
                    return Err(Error::Corrupt(format!(
                        "audit log has a gap at entry {}",
                        leaves.len()
                    )));
                }
                chunks.push(leaves.len() as u64);
                let records = chunk::decode(&v)
                    .map_err(|e| Error::Corrupt(format!("audit entry {}: {e}", leaves.len())))?;
                for r in records {
                    leaves.push(merkle::leaf_hash(r));
                }
            }
        }
        let last_head = match store.get(T_HEAD_LATEST, LATEST)? {
            Some(v) => size_of_key(&v)?,
            // Data from before the newest head was kept on its own: found
            // once by reading them all; kept on its own from the next head.
            None => match store.scan_prefix(T_HEADS, b"", usize::MAX)?.last() {
                Some((k, _)) => size_of_key(k)?,
                None => 0,
            },
        };
        // The newest head's size is kept on its own; it must name a stored
        // head that nothing follows, or the latest key is damaged.
        let newest_stored = match store.scan_from(T_HEADS, &key(last_head), 2)?.as_slice() {
            [] => None,
            [(k, _)] => Some(size_of_key(k)?),
            [_, (k, _), ..] => Some(size_of_key(k)?),
        };
        if newest_stored.is_some_and(|s| s != last_head)
            || (newest_stored.is_none() && last_head != 0)
        {
            return Err(Error::Corrupt(format!(
                "the newest signed audit head is recorded as covering {last_head} entries, \
                 but the stored heads {}",
                match newest_stored {
                    Some(s) => format!("go on to {s}"),
                    None => "do not include it".to_string(),
                }
            )));
        }
        if last_head > leaves.len() as u64 {
            return Err(Error::Corrupt(format!(
                "the newest signed audit head covers {last_head} entries; {} are stored",
                leaves.len()
            )));
        }
        Ok(Self {
            store,
            writer: Mutex::new(()),
            tree: RwLock::new(Tree {
                leaves,
                chunks,
                last_head,
            }),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, f: impl FnOnce(&mut Tree)) {
        f(&mut self.tree.write().unwrap_or_else(|p| p.into_inner()));
    }

    fn write_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.read().leaves.len() as u64
    }

    /// Appends one record durably; returns its index and whether a head is
    /// due.
    pub fn append(&self, record: &[u8]) -> Result<(u64, bool), Error> {
        self.append_batch(&[record.to_vec()], Vec::new())
    }

    /// Appends several records and `extra` writes in one durable batch;
    /// returns the first index and whether a head is due.
    pub fn append_batch(
        &self,
        records: &[Vec<u8>],
        extra: Vec<Write>,
    ) -> Result<(u64, bool), Error> {
        let _writing = self.write_lock();
        let first = self.size();
        let mut writes = Vec::new();
        let mut starts = Vec::new();
        let mut at = first;
        for run in chunk::split(records) {
            writes.push(Write {
                tree: T_LEAVES,
                key: key(at).to_vec(),
                value: Some(chunk::encode(run)),
            });
            starts.push(at);
            at += run.len() as u64;
        }
        writes.extend(extra);
        self.store.apply(writes)?;
        let hashes: Vec<Hash> = records.iter().map(|r| merkle::leaf_hash(r)).collect();
        let mut due = false;
        self.publish(|t| {
            t.chunks.extend(starts);
            for h in hashes {
                t.leaves.push(h);
            }
            due = t.leaves.len() as u64 - t.last_head >= HEAD_EVERY;
        });
        Ok((first, due))
    }

    /// Signs and keeps a head of the whole log, unless the newest head
    /// already covers it.
    pub fn sign_head(
        &self,
        signer: &PolicySigner,
        now_ms: i64,
    ) -> Result<Option<pb::SignedTreeHead>, Error> {
        let _writing = self.write_lock();
        let (size, root) = {
            let t = self.read();
            let size = t.leaves.len();
            if size as u64 == t.last_head && size != 0 {
                return Ok(None);
            }
            (
                size as u64,
                t.leaves.root(size).unwrap_or_else(merkle::empty_root),
            )
        };
        let head = pb::TreeHead {
            tree_size: size,
            root_hash: root.to_vec(),
            timestamp_unix_ms: now_ms,
        }
        .encode_to_vec();
        let signature = signer
            .sign_detached(HEAD_CONTEXT, &head)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let signed = pb::SignedTreeHead {
            tree_head: head,
            signature,
            signer_cert: signer.cert_der().to_vec(),
        };
        self.store.apply(vec![
            Write {
                tree: T_HEADS,
                key: key(size).to_vec(),
                value: Some(signed.encode_to_vec()),
            },
            Write {
                tree: T_HEAD_LATEST,
                key: LATEST.to_vec(),
                value: Some(key(size).to_vec()),
            },
        ])?;
        self.publish(|t| t.last_head = size);
        metrics::gauge!("lattice_cp_audit_tree_size").set(size as f64);
        Ok(Some(signed))
    }

    /// Signed heads of at least `start_size` entries, oldest first, at
    /// most `limit` (1..=[`MAX_PAGE`]), and the size to ask from for the
    /// next page (`None`: no more).
    pub fn heads(
        &self,
        start_size: u64,
        limit: u32,
    ) -> Result<(Vec<pb::SignedTreeHead>, Option<u64>), Error> {
        let limit = limit.clamp(1, MAX_PAGE) as usize;
        // Only heads that are durable: one being written may already be
        // visible in the store before its fsync.
        let durable = self.read().last_head;
        let mut page = self.store.scan_from(T_HEADS, &key(start_size), limit + 1)?;
        let mut cut = page.len();
        for (i, (k, _)) in page.iter().enumerate() {
            if size_of_key(k)? > durable {
                cut = i;
                break;
            }
        }
        page.truncate(cut);
        let next = if page.len() > limit {
            page.pop().map(|(k, _)| size_of_key(&k)).transpose()?
        } else {
            None
        };
        let heads = page
            .iter()
            .map(|(_, v)| decode_head(v))
            .collect::<Result<_, _>>()?;
        Ok((heads, next))
    }

    /// The head of `size` entries (0: the newest).
    pub fn head(&self, size: u64) -> Result<Option<(u64, pb::SignedTreeHead)>, Error> {
        let durable = self.read().last_head;
        let size = if size == 0 { durable } else { size };
        if size > durable {
            // Not signed yet, or being written and not yet durable.
            return Ok(None);
        }
        // Size 0 after that: an empty log's head, if one was signed.
        self.store
            .get(T_HEADS, &key(size))?
            .map(|v| decode_head(&v).map(|h| (size, h)))
            .transpose()
    }

    pub fn entries(&self, start: u64, limit: u32) -> Result<Vec<pb::AuditEntry>, Error> {
        let limit = limit.clamp(1, MAX_PAGE) as u64;
        // The chunks holding [start, end), read outside the lock.
        let (end, starts) = {
            let t = self.read();
            let end = start.saturating_add(limit).min(t.leaves.len() as u64);
            let i = t.chunks.partition_point(|&c| c <= start).saturating_sub(1);
            let starts: Vec<u64> = t.chunks[i.min(t.chunks.len())..]
                .iter()
                .copied()
                .take_while(|&c| c < end)
                .collect();
            (end, starts)
        };
        let mut out = Vec::new();
        for first in starts {
            let v = self
                .store
                .get(T_LEAVES, &key(first))?
                .ok_or_else(|| Error::Corrupt(format!("audit entry {first} is missing")))?;
            let records = chunk::decode(&v)
                .map_err(|e| Error::Corrupt(format!("audit entry {first}: {e}")))?;
            for (index, r) in (first..).zip(records) {
                if index >= start && index < end {
                    out.push(pb::AuditEntry {
                        index,
                        record: r.to_vec(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The audit path of entry `index` in the tree of `size` entries.
    pub fn inclusion(&self, index: u64, size: u64) -> Option<Vec<Hash>> {
        self.read()
            .leaves
            .inclusion_proof(usize::try_from(size).ok()?, usize::try_from(index).ok()?)
    }

    /// That the tree of `first` entries is a prefix of the tree of `size`.
    pub fn consistency(&self, first: u64, size: u64) -> Option<Vec<Hash>> {
        self.read()
            .leaves
            .consistency_proof(usize::try_from(size).ok()?, usize::try_from(first).ok()?)
    }
}

/// Records waiting for the group committer, with their reply.
pub struct Job {
    pub records: Vec<Vec<u8>>,
    pub extra: Vec<lattice_shared::store::Write>,
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Jobs merged into one durable write (one fsync for many caches' batches).
const MAX_JOBS: usize = 256;

/// The group committer: whatever arrives while a write is on disk goes into
/// the next one, in arrival order.
/// Holds the state weakly: the channel closes, and this ends, when the
/// control plane's state is dropped.
pub(crate) async fn run_committer(
    state: std::sync::Weak<crate::State>,
    mut rx: tokio::sync::mpsc::Receiver<Job>,
) {
    // The disk work on a thread of its own, not the blocking pool that
    // admin and request work share.
    let worker = match lattice_shared::persist::Worker::start("cp-audit-commit") {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "starting the audit committer's thread failed");
            while let Some(j) = rx.recv().await {
                let _ = j.reply.send(Err("audit committer unavailable".into()));
            }
            return;
        }
    };
    while let Some(first) = rx.recv().await {
        let Some(state) = state.upgrade() else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let mut records = Vec::new();
        let mut extra = Vec::new();
        let mut replies = Vec::with_capacity(jobs.len());
        for j in jobs {
            records.extend(j.records);
            extra.extend(j.extra);
            replies.push(j.reply);
        }
        let st = state.clone();
        let done = worker
            .run(move || {
                let (_, head_due) = st.audit_log.append_batch(&records, extra)?;
                if head_due {
                    st.audit_log
                        .sign_head(&st.policy.signer(), st.clock.now_unix_ms())?;
                }
                Ok::<(), Error>(())
            })
            .await;
        let result = match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("audit committer worker failed".to_string()),
        };
        for r in replies {
            let _ = r.send(result.clone());
        }
    }
}

/// What `lattice audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub heads: usize,
}

/// Checks one signed tree head offline: signature by the control plane's
/// signing key chained to `root_der`, and the head's time within that
/// certificate's validity (a head dated outside it was not signed by the
/// key while it was good). Returns the decoded head.
pub fn check_head(
    tree_head: &[u8],
    signature: &[u8],
    signer_cert: &[u8],
    root_der: &[u8],
    td: &lattice_shared::id::TrustDomain,
) -> Result<pb::TreeHead, String> {
    let signer = lattice_shared::policy::sign::check_signature(
        HEAD_CONTEXT,
        tree_head,
        signature,
        signer_cert,
        root_der,
        td,
    )
    .map_err(|e| e.to_string())?;
    let head = pb::TreeHead::decode(tree_head).map_err(|e| e.to_string())?;
    let unix_ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    };
    let (from, until) = (unix_ms(signer.not_before), unix_ms(signer.not_after));
    if head.timestamp_unix_ms < from || head.timestamp_unix_ms > until {
        return Err(format!(
            "signed at unix ms {}, outside its signer certificate's validity ({from}..{until})",
            head.timestamp_unix_ms
        ));
    }
    Ok(head)
}

/// Recomputes the tree from `records` (index order, from 0) and checks every
/// head: signature by the control plane's key chained to `root_der`, and
/// root equal to the recomputed root of its size.
pub fn verify(
    records: &[Vec<u8>],
    heads: &[pb::SignedTreeHead],
    root_der: &[u8],
    td: &lattice_shared::id::TrustDomain,
) -> Result<Verified, String> {
    // One pass over the entries: each head is checked when the growing tree
    // reaches its size.
    let mut frontier = merkle::Frontier::default();
    let mut next = records.iter();
    let mut last = 0u64;
    for (i, h) in heads.iter().enumerate() {
        let head = check_head(&h.tree_head, &h.signature, &h.signer_cert, root_der, td)
            .map_err(|e| format!("tree head #{i}: {e}"))?;
        if head.tree_size < last {
            return Err(format!("tree head #{i}: size {} shrinks", head.tree_size));
        }
        last = head.tree_size;
        let size = head.tree_size;
        while frontier.size() < size {
            match next.next() {
                Some(r) => frontier.push(merkle::leaf_hash(r)),
                None => {
                    return Err(format!(
                        "tree head #{i} covers {size} entries but the log holds {}",
                        records.len()
                    ));
                }
            }
        }
        if frontier.root().as_slice() != head.root_hash.as_slice() {
            return Err(format!(
                "tree head #{i} (size {size}): the entries do not hash to its root: the log was altered"
            ));
        }
    }
    Ok(Verified {
        entries: records.len() as u64,
        heads: heads.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head dated after its signer certificate expired does not verify
    /// offline, though its signature and chain are good.
    #[test]
    fn a_head_signed_outside_its_signer_certificates_validity_is_refused() {
        use std::time::{Duration, UNIX_EPOCH};
        let (td, root, signer) = test_signer(UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let log = AuditLog::open(lattice_shared::store::MemStore::shared()).expect("open");
        log.append(b"{}").expect("append");
        let t0_ms = 1_800_000_000_000;
        let good = log
            .sign_head(&signer, t0_ms + 60_000)
            .expect("sign")
            .expect("head");
        verify(&[b"{}".to_vec()], &[good], root.cert_der(), &td).expect("within validity");
        log.append(b"{}").expect("append");
        let late = log
            .sign_head(&signer, t0_ms + 2 * 3_600_000)
            .expect("sign")
            .expect("head");
        let e = verify(
            &[b"{}".to_vec(), b"{}".to_vec()],
            &[late],
            root.cert_der(),
            &td,
        )
        .expect_err("signed after its certificate expired");
        assert!(
            e.contains("outside its signer certificate's validity"),
            "{e}"
        );
    }

    #[test]
    fn chunked_entries_reopen_and_page_across_chunks() {
        let store: SharedStore = lattice_shared::store::MemStore::shared();
        let log = AuditLog::open(store.clone()).expect("open");
        log.append(b"{\"n\":0}").expect("lone entry");
        let batch: Vec<Vec<u8>> = (1..=2500)
            .map(|i| format!("{{\"n\":{i},\"pad\":\"{}\"}}", "p".repeat(i % 50)).into_bytes())
            .collect();
        let (first, _) = log.append_batch(&batch, Vec::new()).expect("batch");
        assert_eq!(first, 1);
        log.append(b"{\"n\":2501}").expect("lone entry");
        let stored = store
            .scan_prefix(T_LEAVES, b"", usize::MAX)
            .expect("scan")
            .len();
        assert!(stored < 2502 / 10, "entries share store values: {stored}");
        let root = log.read().leaves.root(2502).expect("root");

        let log = AuditLog::open(store).expect("reopen");
        assert_eq!(log.size(), 2502);
        assert_eq!(
            log.read().leaves.root(2502),
            Some(root),
            "same tree after reopening"
        );
        for (start, limit) in [(0u64, 3u32), (997, 10), (1500, 1000), (2499, 50)] {
            let page = log.entries(start, limit).expect("page");
            let want = (start..(start + u64::from(limit)).min(2502)).collect::<Vec<_>>();
            assert_eq!(page.iter().map(|e| e.index).collect::<Vec<_>>(), want);
            for e in &page {
                let v: serde_json::Value = serde_json::from_slice(&e.record).expect("json");
                assert_eq!(v["n"], e.index, "entry {} holds its own record", e.index);
            }
        }
        assert!(log.entries(2502, 10).expect("past the end").is_empty());
        let proof = log.inclusion(1234, 2502).expect("proof");
        let leaf = merkle::leaf_hash(&log.entries(1234, 1).expect("entry")[0].record);
        assert!(merkle::verify_inclusion(1234, 2502, &leaf, &proof, &root));
    }

    /// A root valid for a year from `t0` and a head signer certified from
    /// `t0` for an hour.
    fn test_signer(
        t0: std::time::SystemTime,
    ) -> (
        lattice_shared::id::TrustDomain,
        lattice_shared::pki::Authority,
        PolicySigner,
    ) {
        use lattice_shared::id::{SpiffeId, TrustDomain};
        use lattice_shared::pki::{Authority, PrivateKey, Profile};
        use std::time::Duration;
        let td = TrustDomain::new("t").expect("td");
        let root = Authority::new_root(
            &td,
            PrivateKey::generate_p256().expect("key"),
            t0,
            Duration::from_secs(86400 * 365),
        )
        .expect("root");
        let key = PrivateKey::generate_ed25519().expect("key");
        let id = SpiffeId::parse("spiffe://t/cp/main").expect("id");
        let cert = root
            .issue(
                &key.csr_der().expect("csr"),
                &id,
                Profile::JwtSigning,
                t0,
                Duration::from_secs(3600),
            )
            .expect("signer");
        (td, root, PolicySigner::new(key, cert))
    }

    fn size_of(h: &pb::SignedTreeHead) -> u64 {
        pb::TreeHead::decode(h.tree_head.as_slice())
            .expect("head")
            .tree_size
    }

    #[test]
    fn heads_are_served_a_page_at_a_time_and_the_newest_is_kept_on_its_own() {
        let store: SharedStore = lattice_shared::store::MemStore::shared();
        let (_, _, signer) = test_signer(std::time::SystemTime::now());
        let log = AuditLog::open(store.clone()).expect("open");
        for n in 1..=7u64 {
            log.append(b"{}").expect("append");
            log.sign_head(&signer, 1000).expect("sign").expect("head");
            assert_eq!(log.head(0).expect("newest").map(|h| h.0), Some(n));
        }
        let mut sizes = Vec::new();
        let mut start = 0;
        loop {
            let (page, next) = log.heads(start, 3).expect("page");
            assert!(page.len() <= 3);
            sizes.extend(page.iter().map(size_of));
            match next {
                Some(n) => start = n,
                None => break,
            }
        }
        assert_eq!(sizes, (1..=7).collect::<Vec<_>>());
        assert_eq!(
            log.heads(5, 0)
                .expect("page")
                .0
                .iter()
                .map(size_of)
                .collect::<Vec<_>>(),
            vec![5],
            "a limit of 0 is 1 here; the API turns 0 into the full page"
        );

        let log = AuditLog::open(store.clone()).expect("reopen");
        assert_eq!(log.head(0).expect("newest").map(|h| h.0), Some(7));
        // Data from before the newest head was kept on its own.
        store.delete(T_HEAD_LATEST, LATEST).expect("delete");
        let log = AuditLog::open(store.clone()).expect("reopen old data");
        assert_eq!(log.head(0).expect("newest").map(|h| h.0), Some(7));
        // A newest head past the stored entries is corruption, not a guess.
        store.put(T_HEAD_LATEST, LATEST, &key(99)).expect("put");
        assert!(matches!(AuditLog::open(store), Err(Error::Corrupt(_))));
    }

    /// A store whose writes wait until the test lets them through.
    #[derive(Debug)]
    struct Gated {
        inner: std::sync::Arc<lattice_shared::store::MemStore>,
        entered: std::sync::mpsc::SyncSender<()>,
        open: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        /// Applies first and then waits, as sled does (a write is visible
        /// before its fsync).
        visible_early: bool,
    }

    impl lattice_shared::store::Store for Gated {
        fn get(
            &self,
            t: &str,
            k: &[u8],
        ) -> Result<Option<Vec<u8>>, lattice_shared::store::StoreError> {
            self.inner.get(t, k)
        }
        fn apply(
            &self,
            w: Vec<lattice_shared::store::Write>,
        ) -> Result<(), lattice_shared::store::StoreError> {
            let pending = if self.visible_early {
                self.inner.apply(w)?;
                None
            } else {
                Some(w)
            };
            let _ = self.entered.send(());
            let _ = self.open.lock().expect("gate").recv();
            pending.map_or(Ok(()), |w| self.inner.apply(w))
        }
        fn compare_and_swap(
            &self,
            t: &'static str,
            k: &[u8],
            e: Option<&[u8]>,
            n: Option<&[u8]>,
        ) -> Result<bool, lattice_shared::store::StoreError> {
            self.inner.compare_and_swap(t, k, e, n)
        }
        fn scan_prefix(
            &self,
            t: &str,
            p: &[u8],
            l: usize,
        ) -> Result<lattice_shared::store::Entries, lattice_shared::store::StoreError> {
            self.inner.scan_prefix(t, p, l)
        }
        fn scan_from(
            &self,
            t: &str,
            s: &[u8],
            l: usize,
        ) -> Result<lattice_shared::store::Entries, lattice_shared::store::StoreError> {
            self.inner.scan_from(t, s, l)
        }
    }

    /// A log over a [`Gated`] store: the signal that a write reached the
    /// store, and the sender that lets it through.
    fn gated(
        mem: std::sync::Arc<lattice_shared::store::MemStore>,
        visible_early: bool,
    ) -> (
        std::sync::Arc<AuditLog>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
        let (release, gate) = std::sync::mpsc::channel();
        let store: SharedStore = std::sync::Arc::new(Gated {
            inner: mem,
            entered: entered_tx,
            open: std::sync::Mutex::new(gate),
            visible_early,
        });
        (
            std::sync::Arc::new(AuditLog::open(store).expect("open")),
            entered,
            release,
        )
    }

    #[test]
    fn proofs_and_reads_do_not_wait_for_a_write_on_disk() {
        let mem = lattice_shared::store::MemStore::shared();
        let seed = AuditLog::open(mem.clone()).expect("open");
        for i in 0..100u32 {
            seed.append(format!("{{\"n\":{i}}}").as_bytes())
                .expect("append");
        }
        let (log, entered, release) = gated(mem, false);
        let writer = {
            let log = log.clone();
            std::thread::spawn(move || log.append(b"{\"n\":100}").expect("append"))
        };
        entered.recv().expect("the write reached the disk");
        // The write is on its way to the disk: readers go on.
        let (done_tx, done) = std::sync::mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                let proof = log.inclusion(42, 100).is_some();
                let cons = log.consistency(10, 100).is_some();
                let page = log.entries(0, 5).map(|e| e.len()).unwrap_or(0);
                let _ = done_tx.send((proof, cons, page, log.size()));
            });
        }
        let seen = done.recv_timeout(std::time::Duration::from_secs(10));
        release.send(()).expect("release");
        assert_eq!(
            seen,
            Ok((true, true, 5, 100)),
            "readers waited for the disk"
        );
        assert_eq!(writer.join().expect("writer"), (100, true));
        assert_eq!(log.size(), 101);
    }

    #[test]
    fn a_head_visible_in_the_store_before_it_is_durable_is_not_served() {
        let mem = lattice_shared::store::MemStore::shared();
        let (_, _, signer) = test_signer(std::time::SystemTime::now());
        let seed = AuditLog::open(mem.clone()).expect("open");
        seed.append(b"{}").expect("append");
        seed.sign_head(&signer, 1000).expect("sign").expect("head");
        seed.append(b"{}").expect("append");
        let (log, entered, release) = gated(mem, true);
        let signing = {
            let log = log.clone();
            std::thread::spawn(move || log.sign_head(&signer, 2000).expect("sign").is_some())
        };
        entered.recv().expect("the head reached the disk");
        // Applied, not yet durable: a crash now could lose it.
        let page: Vec<u64> = log
            .heads(0, 10)
            .expect("heads")
            .0
            .iter()
            .map(size_of)
            .collect();
        let newest = log.head(0).expect("newest").map(|h| h.0);
        let by_size = log.head(2).expect("head 2").map(|h| h.0);
        release.send(()).expect("release");
        assert!(signing.join().expect("signer"));
        assert_eq!((page, newest, by_size), (vec![1], Some(1), None));
        assert_eq!(
            log.head(2).expect("head 2").map(|h| h.0),
            Some(2),
            "durable now"
        );
    }

    #[test]
    fn a_damaged_record_of_the_newest_head_is_corruption() {
        let store: SharedStore = lattice_shared::store::MemStore::shared();
        let (_, _, signer) = test_signer(std::time::SystemTime::now());
        let log = AuditLog::open(store.clone()).expect("open");
        for _ in 0..3 {
            log.append(b"{}").expect("append");
            log.sign_head(&signer, 1000).expect("sign").expect("head");
        }
        // Smaller than the real newest head: would hide heads 3 and 2.
        store.put(T_HEAD_LATEST, LATEST, &key(1)).expect("put");
        assert!(matches!(
            AuditLog::open(store.clone()),
            Err(Error::Corrupt(_))
        ));
        // Naming a head that is not stored.
        store.delete(T_HEADS, &key(3)).expect("delete");
        store.put(T_HEAD_LATEST, LATEST, &key(3)).expect("put");
        assert!(matches!(AuditLog::open(store), Err(Error::Corrupt(_))));
    }
}

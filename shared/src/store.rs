//! Durable key-value storage behind the [`Store`] trait.
//!
//! Every mutating call returns only once the write is on disk: the sled
//! implementation flushes sled and then `fsync`s its files, because sled's own
//! flush is `sync_file_range`, which neither empties the disk cache nor writes
//! metadata. Concurrent writers are group-committed: one fsync covers every
//! write applied before it started.
//!
//! Keys are namespaced by tree; components version their key encoding
//! ([`SCHEMA_KEY`]) so that data can outlive a change of backend.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("injected storage fault")]
    Injected,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A flush or fsync failed earlier: the store accepts no more writes,
    /// and the outcome of the writes in flight then is unknown.
    #[error("the store stopped after a failed fsync; the outcome of the write is unknown")]
    Stopped,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Backend(e.to_string())
    }
}

/// Key under tree `meta` that holds the key-encoding version of a component.
pub const SCHEMA_KEY: &[u8] = b"schema_version";

/// One write of an atomic batch: `None` deletes.
#[derive(Debug, Clone)]
pub struct Write {
    pub tree: &'static str,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Applies every write atomically; durable on return.
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError>;
    /// Applies every write atomically without waiting for the disk: the
    /// writes become durable with the next durable write (writes reach the
    /// disk in order), and a crash before that may lose them, all or
    /// nothing. Only for what can be recomputed or resent after a crash
    /// (an acknowledgement mark), never for what was promised to someone.
    fn apply_unsynced(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply(writes)
    }
    /// Replaces `expected` (`None`: absent) by `new` (`None`: delete) atomically.
    /// `Ok(false)` when the current value is not `expected`. Durable on `Ok(true)`.
    fn compare_and_swap(
        &self,
        tree: &'static str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError>;
    /// Entries whose key starts with `prefix`, in key order, at most `limit`.
    fn scan_prefix(&self, tree: &str, prefix: &[u8], limit: usize) -> Result<Entries, StoreError>;
    /// Entries with key `>= start`, in key order, at most `limit`.
    fn scan_from(&self, tree: &str, start: &[u8], limit: usize) -> Result<Entries, StoreError>;

    fn put(&self, tree: &'static str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.apply(vec![Write {
            tree,
            key: key.to_vec(),
            value: Some(value.to_vec()),
        }])
    }
    fn delete(&self, tree: &'static str, key: &[u8]) -> Result<(), StoreError> {
        self.apply(vec![Write {
            tree,
            key: key.to_vec(),
            value: None,
        }])
    }
}

pub type SharedStore = Arc<dyn Store>;

/// JSON records on any [`Store`] (`dyn Store` included): a value that does
/// not decode is [`StoreError::Corrupt`], naming the tree.
pub trait JsonStore: Store {
    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        tree: &str,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        self.get(tree, key)?
            .map(|bytes| {
                serde_json::from_slice(&bytes)
                    .map_err(|e| StoreError::Corrupt(format!("a record in {tree}: {e}")))
            })
            .transpose()
    }

    /// Durable on return, as [`Store::put`].
    fn put_json<T: serde::Serialize + ?Sized>(
        &self,
        tree: &'static str,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        self.put(tree, key, &to_json(tree, value)?)
    }
}

impl<S: Store + ?Sized> JsonStore for S {}

/// `value` as the bytes of a JSON record, for a [`Write`] of a batch.
pub fn to_json<T: serde::Serialize + ?Sized>(tree: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value)
        .map_err(|e| StoreError::Corrupt(format!("a record for {tree} does not encode: {e}")))
}

/// Checks or records the key-encoding version of a component's data.
pub fn check_schema(store: &dyn Store, component: &str, version: u32) -> Result<(), StoreError> {
    match store.get("meta", SCHEMA_KEY)? {
        None => store.apply(vec![Write {
            tree: "meta",
            key: SCHEMA_KEY.to_vec(),
            value: Some(format!("{component}:{version}").into_bytes()),
        }]),
        Some(v) if v == format!("{component}:{version}").as_bytes() => Ok(()),
        Some(v) => Err(StoreError::Corrupt(format!(
            "data directory holds {:?}, this binary reads {component}:{version}",
            String::from_utf8_lossy(&v)
        ))),
    }
}

// ---------------------------------------------------------------------------

/// sled, made durable by flush + fsync with group commit.
pub struct SledStore {
    db: sled::Db,
    dir: PathBuf,
    /// Incremented after each write is applied to sled.
    applied: AtomicU64,
    /// Held while syncing: the highest `applied` value known durable, and
    /// the handles of sled's files (opened once, fsynced in place).
    synced: Mutex<Synced>,
    fsyncs: AtomicU64,
    /// Set when a flush or fsync failed: nothing more is written or synced.
    failed: AtomicBool,
    /// Fault injection for tests: listing/opening fails this many more
    /// times; the next fsync fails.
    open_faults: AtomicU32,
    fsync_fault: AtomicBool,
}

/// How long a sync round keeps retrying when sled's files cannot be listed
/// or opened (EMFILE, say) before the store stops: the writes waiting are
/// already visible, so they are made durable or the store stops, never
/// reported failed.
const OPEN_RETRY_FOR: Duration = Duration::from_secs(5);

/// How long `open` waits for sled's lock on the directory.
const LOCK_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug)]
struct Synced {
    upto: u64,
    files: DirSync,
}

/// What a binary does when its store cannot make a write durable: the
/// store itself stops accepting writes; the binaries also exit, as
/// PostgreSQL does, because the kernel may already have dropped the dirty
/// pages (retrying the fsync would report success for data that is gone).
static FATAL_HOOK: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();

/// Installs what runs when a store fails to make a write durable (the
/// binaries: log and exit). Without one, the store only stops writing.
pub fn set_fatal_hook(hook: fn(&str)) {
    let _ = FATAL_HOOK.set(hook);
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore").field("dir", &self.dir).finish()
    }
}

impl SledStore {
    pub fn open(dir: &Path) -> Result<Arc<Self>, StoreError> {
        std::fs::create_dir_all(dir)?;
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            // Every write is flushed and fsynced before it returns; sled's
            // own periodic flusher would only add background work.
            .flush_every_ms(None);
        // sled's background threads let go of the directory's lock a moment
        // after the last handle is dropped, so a store reopened in the same
        // process (a restart, a test) may briefly find it held. A lock still
        // held after LOCK_WAIT belongs to someone else: say so.
        let started = Instant::now();
        let db = loop {
            // sled panics on some damaged files (an index out of bounds, an
            // uninitialised page): that is a damaged store, not a crash.
            let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
                .map_err(|p| {
                let why = p
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| p.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                StoreError::Corrupt(format!(
                    "the store at {} is damaged (sled failed reading it: {why}); restore the \
                         data directory from a backup",
                    dir.display()
                ))
            })?;
            match opened {
                Ok(db) => break db,
                // sled reports it only as text (ErrorKind::Other).
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    if started.elapsed() >= LOCK_WAIT {
                        return Err(StoreError::Backend(format!(
                            "the store at {} is in use by another process (its lock is held)",
                            dir.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let files = DirSync::open(dir)?;
        Ok(Arc::new(Self {
            db,
            dir: dir.to_owned(),
            applied: AtomicU64::new(0),
            synced: Mutex::new(Synced { upto: 0, files }),
            fsyncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            open_faults: AtomicU32::new(0),
            fsync_fault: AtomicBool::new(false),
        }))
    }

    /// For fault tests: the next `n` attempts to list or open the store's
    /// files fail (as under EMFILE), as if before any fsync.
    pub fn inject_open_failures(&self, n: u32) {
        self.open_faults.store(n, Ordering::SeqCst);
    }

    /// For fault tests: the next fsync fails (as on EIO or ENOSPC), after
    /// the write it was to make durable has been applied.
    pub fn inject_fsync_failure(&self) {
        self.fsync_fault.store(true, Ordering::SeqCst);
    }

    /// One round: flush sled, then fsync its files, retrying what failed
    /// before any fsync for up to [`OPEN_RETRY_FOR`].
    fn sync_round(&self, files: &mut DirSync) -> Result<(), StoreError> {
        self.db.flush()?;
        let started = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let injected_open = self
                .open_faults
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            let result = if injected_open {
                Err(SyncError::Open(std::io::Error::from_raw_os_error(24)))
            } else if self.fsync_fault.swap(false, Ordering::SeqCst) {
                Err(SyncError::Fsync(std::io::Error::from_raw_os_error(5)))
            } else {
                files.sync()
            };
            match result {
                Ok(()) => return Ok(()),
                Err(SyncError::Fsync(e)) => return Err(StoreError::Io(e)),
                // Nothing was lost yet: try again, but not for ever.
                Err(SyncError::Open(e)) if started.elapsed() < OPEN_RETRY_FOR => {
                    tracing::warn!(error = %e, dir = %self.dir.display(), "store files could not be listed or opened; retrying");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(SyncError::Open(e)) => return Err(StoreError::Io(e)),
            }
        }
    }

    /// How many fsync rounds ran (group commit makes this lower than writes).
    pub fn fsync_count(&self) -> u64 {
        self.fsyncs.load(Ordering::Relaxed)
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Refuses to write once a flush or fsync has failed.
    fn writable(&self) -> Result<(), StoreError> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(StoreError::Stopped);
        }
        Ok(())
    }

    /// Makes every write applied so far durable, sharing one fsync among the
    /// writers that wait here at the same time. A failure is never retried:
    /// the store stops (see [`set_fatal_hook`]).
    fn make_durable(&self) -> Result<(), StoreError> {
        let mine = self.applied.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        self.writable()?;
        if synced.upto >= mine {
            return Ok(());
        }
        let target = self.applied.load(Ordering::SeqCst);
        let result = self.sync_round(&mut synced.files);
        if let Err(e) = result {
            self.failed.store(true, Ordering::SeqCst);
            let why = format!(
                "{}: making writes durable failed ({e}); the store accepts no more writes \
                 and what the failed writes changed may or may not be on disk",
                self.dir.display()
            );
            tracing::error!(error = %e, dir = %self.dir.display(), "fsync failed: store stopped");
            if let Some(hook) = FATAL_HOOK.get() {
                hook(&why);
            }
            return Err(StoreError::Stopped);
        }
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        synced.upto = target;
        Ok(())
    }
}

/// The regular files below a directory (sled keeps a handful, plus blob
/// files for large pages), kept open and fsynced in place, then the
/// directories themselves so that new files' entries are durable too: a
/// commit opens no file, except once for a file it has not seen before. A
/// file sled removes meanwhile (an obsolete blob) needs no sync: its
/// removal is made durable by the directory's; its handle is dropped.
/// Why a [`DirSync`] round failed: before any fsync (nothing lost: the
/// round is retried) or in one (fatal).
#[derive(Debug)]
enum SyncError {
    Open(std::io::Error),
    Fsync(std::io::Error),
}

#[derive(Debug)]
struct DirSync {
    dir: rustix::fs::Dir,
    /// name → (inode, handle): a name that now names another file is
    /// reopened.
    files: HashMap<Vec<u8>, (u64, std::os::fd::OwnedFd)>,
    subdirs: HashMap<Vec<u8>, (u64, DirSync)>,
}

impl DirSync {
    fn open(path: &Path) -> std::io::Result<Self> {
        use rustix::fs::{Mode, OFlags};
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Self::from_fd(fd)
    }

    fn from_fd(fd: std::os::fd::OwnedFd) -> std::io::Result<Self> {
        Ok(Self {
            dir: rustix::fs::Dir::new(fd)?,
            files: HashMap::new(),
            subdirs: HashMap::new(),
        })
    }

    fn sync(&mut self) -> Result<(), SyncError> {
        self.scan().map_err(SyncError::Open)?;
        for (_, fd) in self.files.values() {
            rustix::fs::fsync(fd).map_err(|e| SyncError::Fsync(e.into()))?;
        }
        for (_, sub) in self.subdirs.values_mut() {
            sub.sync()?;
        }
        let dir = self.dir.fd().map_err(|e| SyncError::Open(e.into()))?;
        rustix::fs::fsync(dir).map_err(|e| SyncError::Fsync(e.into()))?;
        Ok(())
    }

    /// Lists the directory, opening what is new and dropping what is gone.
    fn scan(&mut self) -> std::io::Result<()> {
        use rustix::fs::{AtFlags, FileType, Mode, OFlags};
        use rustix::io::Errno;
        self.dir.rewind();
        let mut files = HashMap::with_capacity(self.files.len());
        let mut subdirs = HashMap::with_capacity(self.subdirs.len());
        while let Some(entry) = self.dir.read() {
            let entry = entry?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let dirfd = self.dir.fd()?;
            let mut ty = entry.file_type();
            if ty == FileType::Unknown {
                match rustix::fs::statat(dirfd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => ty = FileType::from_raw_mode(st.st_mode),
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let ino = entry.ino();
            match ty {
                FileType::RegularFile => {
                    let fd = match self.files.remove(name) {
                        Some((i, fd)) if i == ino => fd,
                        _ => match rustix::fs::openat(
                            dirfd,
                            entry.file_name(),
                            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                            Mode::empty(),
                        ) {
                            Ok(fd) => fd,
                            Err(Errno::NOENT) => continue,
                            Err(e) => return Err(e.into()),
                        },
                    };
                    files.insert(name.to_vec(), (ino, fd));
                }
                FileType::Directory => {
                    let sub = match self.subdirs.remove(name) {
                        Some((i, d)) if i == ino => d,
                        _ => match rustix::fs::openat(
                            dirfd,
                            entry.file_name(),
                            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
                            Mode::empty(),
                        ) {
                            Ok(fd) => DirSync::from_fd(fd)?,
                            Err(Errno::NOENT) => continue,
                            Err(e) => return Err(e.into()),
                        },
                    };
                    subdirs.insert(name.to_vec(), (ino, sub));
                }
                _ => {}
            }
        }
        self.files = files;
        self.subdirs = subdirs;
        Ok(())
    }

    /// Handles held (for tests: a commit opens nothing new).
    #[cfg(test)]
    fn handles(&self) -> usize {
        self.files.len()
            + self
                .subdirs
                .values()
                .map(|(_, d)| 1 + d.handles())
                .sum::<usize>()
    }
}

impl Store for SledStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.apply_unsynced(writes)?;
        self.make_durable()
    }

    fn apply_unsynced(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        use sled::Transactional;
        self.writable()?;
        // One tree: a batch is atomic in sled and far cheaper than a
        // transaction (which takes every tree's lock and buffers the writes).
        if let Some(first) = writes.first()
            && writes.iter().all(|w| w.tree == first.tree)
        {
            let tree = self.tree(first.tree)?;
            let mut batch = sled::Batch::default();
            for w in writes {
                match w.value {
                    Some(v) => batch.insert(w.key, v),
                    None => batch.remove(w.key),
                }
            }
            tree.apply_batch(batch)?;
            self.applied.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let mut names: Vec<&'static str> = writes.iter().map(|w| w.tree).collect();
        names.sort_unstable();
        names.dedup();
        let trees: Vec<sled::Tree> = names
            .iter()
            .map(|n| self.tree(n))
            .collect::<Result<_, _>>()?;
        let result: sled::transaction::TransactionResult<(), ()> =
            trees.as_slice().transaction(|txs| {
                for w in &writes {
                    // `names` holds every tree named in `writes`.
                    let idx = names.binary_search(&w.tree).unwrap_or(0);
                    match &w.value {
                        Some(v) => {
                            txs[idx].insert(w.key.as_slice(), v.as_slice())?;
                        }
                        None => {
                            txs[idx].remove(w.key.as_slice())?;
                        }
                    }
                }
                Ok(())
            });
        result.map_err(|e| StoreError::Backend(format!("{e:?}")))?;
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn compare_and_swap(
        &self,
        tree: &'static str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.writable()?;
        let swapped = self
            .tree(tree)?
            .compare_and_swap(key, expected, new)?
            .is_ok();
        if swapped {
            self.applied.fetch_add(1, Ordering::SeqCst);
            self.make_durable()?;
        }
        Ok(swapped)
    }

    fn scan_prefix(&self, tree: &str, prefix: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(tree)?.scan_prefix(prefix).take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan_from(&self, tree: &str, start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(tree)?.range(start..).take(limit) {
            let (k, v) = item?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------

type MemTree = BTreeMap<Vec<u8>, Vec<u8>>;

/// In-memory store for unit tests.
#[derive(Debug, Default)]
pub struct MemStore {
    trees: Mutex<BTreeMap<String, MemTree>>,
}

impl MemStore {
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }
}

impl Store for MemStore {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.get(tree).and_then(|t| t.get(key)).cloned())
    }
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        for w in writes {
            let t = g.entry(w.tree.to_owned()).or_default();
            match w.value {
                Some(v) => t.insert(w.key, v),
                None => t.remove(&w.key),
            };
        }
        Ok(())
    }
    fn compare_and_swap(
        &self,
        tree: &'static str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let mut g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        let t = g.entry(tree.to_owned()).or_default();
        if t.get(key).map(Vec::as_slice) != expected {
            return Ok(false);
        }
        match new {
            Some(v) => t.insert(key.to_vec(), v.to_vec()),
            None => t.remove(key),
        };
        Ok(true)
    }
    fn scan_prefix(&self, tree: &str, prefix: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.get(tree)
            .map(|t| {
                t.range(prefix.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
    fn scan_from(&self, tree: &str, start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        let g = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        Ok(g.get(tree)
            .map(|t| {
                t.range(start.to_vec()..)
                    .take(limit)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

// ---------------------------------------------------------------------------

/// Wraps a real store and fails the next write on demand, to test error paths.
#[derive(Debug)]
pub struct FaultStore<S: Store> {
    inner: Arc<S>,
    fail_next: AtomicBool,
}

impl<S: Store> FaultStore<S> {
    pub fn new(inner: Arc<S>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            fail_next: AtomicBool::new(false),
        })
    }
    /// The next mutating call fails with [`StoreError::Injected`] and writes nothing.
    pub fn fail_next(&self) {
        self.fail_next.store(true, Ordering::SeqCst);
    }
    fn check(&self) -> Result<(), StoreError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            Err(StoreError::Injected)
        } else {
            Ok(())
        }
    }
}

impl<S: Store> Store for FaultStore<S> {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(tree, key)
    }
    fn apply(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.apply(writes)
    }
    fn apply_unsynced(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.apply_unsynced(writes)
    }
    fn compare_and_swap(
        &self,
        tree: &'static str,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.compare_and_swap(tree, key, expected, new)
    }
    fn scan_prefix(&self, tree: &str, prefix: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.inner.scan_prefix(tree, prefix, limit)
    }
    fn scan_from(&self, tree: &str, start: &[u8], limit: usize) -> Result<Entries, StoreError> {
        self.inner.scan_from(tree, start, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn Store) {
        store.put("t", b"a", b"1").expect("put");
        store.put("t", b"ab", b"2").expect("put");
        store.put("u", b"a", b"3").expect("put");
        assert_eq!(store.get("t", b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(store.get("t", b"zz").expect("get"), None);
        let scanned = store.scan_prefix("t", b"a", 10).expect("scan");
        assert_eq!(scanned.len(), 2);
        let from = store.scan_from("t", b"ab", 10).expect("scan");
        assert_eq!(from.first().map(|e| e.0.as_slice()), Some(&b"ab"[..]));
        assert_eq!(store.scan_from("t", b"b", 10).expect("scan").len(), 0);
        assert_eq!(store.scan_prefix("t", b"a", 1).expect("scan").len(), 1);
        assert!(
            !store
                .compare_and_swap("t", b"a", Some(b"9"), Some(b"x"))
                .expect("cas")
        );
        assert!(
            store
                .compare_and_swap("t", b"a", Some(b"1"), Some(b"x"))
                .expect("cas")
        );
        assert!(
            store
                .compare_and_swap("t", b"new", None, Some(b"n"))
                .expect("cas")
        );
        assert!(
            !store
                .compare_and_swap("t", b"new", None, Some(b"n"))
                .expect("cas")
        );
        store
            .apply(vec![
                Write {
                    tree: "t",
                    key: b"a".to_vec(),
                    value: None,
                },
                Write {
                    tree: "u",
                    key: b"b".to_vec(),
                    value: Some(b"4".to_vec()),
                },
            ])
            .expect("apply");
        assert_eq!(store.get("t", b"a").expect("get"), None);
        assert_eq!(store.get("u", b"b").expect("get"), Some(b"4".to_vec()));
        // One tree (sled's batch path): inserts and deletes together.
        store
            .apply(vec![
                Write {
                    tree: "t",
                    key: b"ab".to_vec(),
                    value: None,
                },
                Write {
                    tree: "t",
                    key: b"c".to_vec(),
                    value: Some(b"5".to_vec()),
                },
            ])
            .expect("apply");
        assert_eq!(store.get("t", b"ab").expect("get"), None);
        assert_eq!(store.get("t", b"c").expect("get"), Some(b"5".to_vec()));
        store
            .apply_unsynced(vec![Write {
                tree: "u",
                key: b"lazy".to_vec(),
                value: Some(b"6".to_vec()),
            }])
            .expect("apply unsynced");
        assert_eq!(store.get("u", b"lazy").expect("get"), Some(b"6".to_vec()));
    }

    #[test]
    fn mem_store_semantics() {
        exercise(&*MemStore::shared());
    }

    #[test]
    fn sled_store_semantics_and_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            exercise(&*s);
            assert!(s.fsync_count() > 0, "durable writes must fsync");
        }
        let s = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get("u", b"b").expect("get"), Some(b"4".to_vec()));
        assert_eq!(s.get("t", b"new").expect("get"), Some(b"n".to_vec()));
    }

    #[test]
    fn a_store_reopened_right_after_it_was_dropped_opens() {
        // sled's background threads hold the directory's lock a moment
        // after the last handle goes (CI saw a reopen fail on it).
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..40u32 {
            let s = SledStore::open(dir.path()).expect("reopen at once");
            s.put("t", b"k", &i.to_be_bytes()).expect("put");
        }
    }

    #[test]
    fn a_store_held_by_someone_else_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let _held = SledStore::open(dir.path()).expect("open");
        let err = SledStore::open(dir.path()).expect_err("a second open must fail");
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
    }

    #[test]
    fn unsynced_writes_wait_for_the_next_durable_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            let before = s.fsync_count();
            s.apply_unsynced(vec![Write {
                tree: "t",
                key: b"mark".to_vec(),
                value: Some(b"1".to_vec()),
            }])
            .expect("unsynced");
            assert_eq!(s.fsync_count(), before, "an unsynced write must not fsync");
            s.put("t", b"durable", b"2").expect("put");
            assert_eq!(s.fsync_count(), before + 1);
        }
        let s = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get("t", b"mark").expect("get"), Some(b"1".to_vec()));
        assert_eq!(s.get("t", b"durable").expect("get"), Some(b"2".to_vec()));
    }

    #[test]
    fn concurrent_writers_share_fsyncs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path()).expect("open");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..25u32 {
                        s.put("t", format!("{t}-{i}").as_bytes(), b"v")
                            .expect("put");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("writer thread");
        }
        assert_eq!(s.scan_prefix("t", b"", 1000).expect("scan").len(), 200);
        assert!(s.fsync_count() <= 200);
    }

    #[test]
    fn commits_fsync_the_files_opened_once() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().expect("dir");
        let store = SledStore::open(dir.path()).expect("open");
        store.put("t", b"a", b"1").expect("put");
        let fds = |s: &SledStore| {
            let g = s.synced.lock().expect("lock");
            let mut v: Vec<i32> = g.files.files.values().map(|(_, f)| f.as_raw_fd()).collect();
            v.sort_unstable();
            (v, g.files.handles())
        };
        let (before, n) = fds(&store);
        assert!(n > 0, "sled's files are held");
        for i in 0..50u32 {
            store.put("t", &i.to_be_bytes(), b"x").expect("put");
        }
        assert_eq!(fds(&store).0, before, "no file was reopened");
        assert_eq!(store.fsync_count(), 51);
    }

    #[test]
    fn a_failed_fsync_stops_the_store_for_good() {
        let dir = tempfile::tempdir().expect("dir");
        let store = SledStore::open(dir.path()).expect("open");
        store.put("t", b"a", b"1").expect("put");
        // What a failed fsync leaves behind.
        store.failed.store(true, Ordering::SeqCst);
        assert!(matches!(
            store.put("t", b"b", b"2"),
            Err(StoreError::Stopped)
        ));
        assert!(matches!(
            store.compare_and_swap("t", b"a", Some(b"1"), Some(b"3")),
            Err(StoreError::Stopped)
        ));
        assert_eq!(store.get("t", b"b").expect("get"), None, "nothing applied");
        assert_eq!(
            store.get("t", b"a").expect("get").as_deref(),
            Some(&b"1"[..])
        );
    }

    #[test]
    fn a_write_whose_files_could_not_be_opened_is_retried_not_reported_failed() {
        // The write is visible once applied: reporting it failed while the
        // next durable write makes it durable would be a phantom commit.
        let dir = tempfile::tempdir().expect("dir");
        let store = SledStore::open(dir.path()).expect("open");
        store.put("t", b"a", b"1").expect("put");
        let before = store.fsync_count();
        store.inject_open_failures(3);
        store
            .put("t", b"b", b"2")
            .expect("made durable after the files could be opened again");
        assert_eq!(store.fsync_count(), before + 1);
        store.put("t", b"c", b"3").expect("the store goes on");
    }

    #[test]
    fn an_injected_fsync_failure_leaves_no_acknowledged_write_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            store.put("t", b"a", b"1").expect("put");
            store.inject_fsync_failure();
            assert!(
                matches!(store.put("t", b"b", b"2"), Err(StoreError::Stopped)),
                "the write in flight has an unknown outcome"
            );
            assert!(matches!(
                store.put("t", b"c", b"3"),
                Err(StoreError::Stopped)
            ));
            assert!(matches!(
                store.compare_and_swap("t", b"a", Some(b"1"), None),
                Err(StoreError::Stopped)
            ));
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            store.get("t", b"a").expect("get").as_deref(),
            Some(&b"1"[..])
        );
        assert_eq!(
            store.get("t", b"c").expect("get"),
            None,
            "refused, so never written"
        );
    }

    #[test]
    fn fault_store_fails_once_and_writes_nothing() {
        let f = FaultStore::new(MemStore::shared());
        f.fail_next();
        assert!(matches!(f.put("t", b"k", b"v"), Err(StoreError::Injected)));
        assert_eq!(f.get("t", b"k").expect("get"), None);
        f.put("t", b"k", b"v").expect("second write succeeds");
    }

    #[test]
    fn json_records_round_trip_and_garbage_is_corrupt() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Rec {
            name: String,
            n: u64,
        }
        let shared: SharedStore = MemStore::shared();
        let store: &dyn Store = &*shared;
        let r = Rec {
            name: "a".into(),
            n: 7,
        };
        assert_eq!(store.get_json::<Rec>("t", b"k").expect("get"), None);
        store.put_json("t", b"k", &r).expect("put");
        assert_eq!(shared.get_json::<Rec>("t", b"k").expect("get"), Some(r));
        assert_eq!(
            store.get("t", b"k").expect("get").as_deref(),
            Some(&br#"{"name":"a","n":7}"#[..])
        );
        store.put("t", b"bad", b"{not json").expect("put");
        assert!(matches!(
            store.get_json::<Rec>("t", b"bad"),
            Err(StoreError::Corrupt(m)) if m.contains("in t")
        ));
        let faulty = FaultStore::new(MemStore::shared());
        faulty.fail_next();
        assert!(matches!(
            faulty.put_json("t", b"k", &1u8),
            Err(StoreError::Injected)
        ));
        assert_eq!(faulty.get_json::<u8>("t", b"k").expect("get"), None);
    }

    #[test]
    fn schema_version_is_checked() {
        let s = MemStore::shared();
        check_schema(&*s, "cache", 1).expect("first records");
        check_schema(&*s, "cache", 1).expect("same passes");
        assert!(matches!(
            check_schema(&*s, "cache", 2),
            Err(StoreError::Corrupt(_))
        ));
    }
}

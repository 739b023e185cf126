//! The redb store: Raft log, vote, state tables, snapshots (the only module that imports redb).
//!
//! One redb file, `<data>/pickbox.redb`, holds the Raft log side (log, vote, committed, last purged),
//! the state machine side (the namespace tables behind `StateRead`/`StateWrite` plus the last
//! applied log id and membership, in the same transaction as the state they describe) and one local
//! table (the incarnation counter). Snapshot files live in `<data>/snapshots/`.
//!
//! Architecture invariant: this module knows nothing of openraft; Raft types arrive as opaque bytes
//! encoded by `raft/`. Durability: log writes commit `Immediate` (group commit, see `log`); apply
//! commits `None` and becomes durable with the next log commit of the same file, which is safe
//! because a crash then only loses state that the durable log replays, and `last_applied` is in the
//! same transaction as the state.

pub mod codec;
mod digest;
mod log;
mod snapshot;
mod tables;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable};

pub use log::{Done, LogWrite};
pub use snapshot::SnapshotInfo;
pub use tables::{ReadView, StateTxn};

use crate::state::{StoreFault, StoreResult};
use tables::{LOCAL, LOG, RAFT_META};

/// redb's page cache (read cache plus write buffer; redb's default is 1 GiB, which a 256 MiB write
/// filled and kept). Reads of file data are served by the kernel's page cache of the redb file
/// as well, so a small cache costs little.
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Map any redb (or I/O) error to a storage fault.
pub(crate) fn fault(e: impl std::fmt::Display) -> StoreFault {
    StoreFault(format!("redb: {e}"))
}

/// Counters of the store, for metrics and tests.
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Durable log commits (each one fsync).
    pub log_commits: AtomicU64,
    /// Entries written by those commits.
    pub log_entries: AtomicU64,
    /// Entry bytes written by those commits.
    pub log_bytes: AtomicU64,
    /// State machine write transactions (apply batches).
    pub apply_txns: AtomicU64,
    /// Set once a write failed; the store refuses further writes (fail-stop).
    pub failed: AtomicBool,
}

/// Reads that met a corrupt block (the reader got EIO; `tables::copy_block`). Process-wide, not
/// per `Store`, because a read view does not know its store: a node is one process with one store.
pub static CORRUPT_BLOCK_READS: AtomicU64 = AtomicU64::new(0);

/// A handle to the node's store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    snap_dir: PathBuf,
    writer: Mutex<Option<mpsc::Sender<LogWrite>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    current_snapshot: Mutex<Option<SnapshotInfo>>,
    snapshot_seq: AtomicU64,
    /// Metadata writes nobody waits for (committed): written with the next log commit instead of
    /// costing an fsync of their own.
    lazy_meta: log::LazyMeta,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread after it has written what was queued.
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.writer_thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Append piece `part` of log entry `index` to `out` (pieces arrive in key order; every piece but
/// the last is exactly `LOG_CHUNK_BYTES` long).
fn join_piece(out: &mut Vec<(u64, Vec<u8>)>, index: u64, part: u32, piece: &[u8]) -> StoreResult<()> {
    if let Some((i, bytes)) = out.last_mut() {
        if *i == index {
            let whole = bytes.len().is_multiple_of(tables::LOG_CHUNK_BYTES);
            if !whole || part as usize != bytes.len() / tables::LOG_CHUNK_BYTES {
                return Err(StoreFault(format!("log entry {index}: piece {part} out of order")));
            }
            bytes.extend_from_slice(piece);
            return Ok(());
        }
    }
    if part != 0 {
        return Err(StoreFault(format!("log entry {index} lacks its first piece")));
    }
    out.push((index, piece.to_vec()));
    Ok(())
}

/// The redb file inside a data directory.
pub const DB_FILE: &str = "pickbox.redb";

/// Whether `data_dir` holds a store already (a node that has run before).
pub fn exists(data_dir: &Path) -> bool {
    data_dir.join(DB_FILE).exists()
}

impl Store {
    /// Open (or create) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir).map_err(fault)?;
        let snap_dir = data_dir.join("snapshots");
        std::fs::create_dir_all(&snap_dir).map_err(fault)?;
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(data_dir.join(DB_FILE)).map_err(fault)?;
        {
            let txn = db.begin_write().map_err(fault)?;
            tables::create_all_tables(&txn)?;
            txn.commit().map_err(fault)?;
        }
        let db = Arc::new(db);
        let stats = Arc::new(StoreStats::default());
        let (tx, rx) = mpsc::channel();
        let lazy_meta = log::LazyMeta::default();
        let thread = {
            let db = db.clone();
            let stats = stats.clone();
            let lazy = lazy_meta.clone();
            std::thread::Builder::new()
                .name("pickbox-log-writer".into())
                .spawn(move || log::run(db, rx, stats, lazy))
                .map_err(fault)?
        };
        let current = snapshot::scan(&snap_dir)?;
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                snap_dir,
                writer: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(thread)),
                stats,
                current_snapshot: Mutex::new(current),
                snapshot_seq: AtomicU64::new(0),
                lazy_meta,
            }),
        })
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    // ---------------------------------------------------------------- log side

    /// Queue a log write; its `done` runs on the writer thread once it is durable or failed.
    pub fn submit(&self, op: LogWrite) {
        let op = match op {
            LogWrite::PutMeta { key, value, done: None } => {
                self.inner.lazy_meta.lock().unwrap_or_else(|e| e.into_inner()).insert(key, value);
                return;
            }
            op => op,
        };
        let sender = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = match sender {
            Some(s) => match s.send(op) {
                Ok(()) => return,
                Err(mpsc::SendError(op)) => op,
            },
            None => op,
        };
        // The writer is gone (closing); nothing can become durable any more.
        let err = || Err(StoreFault("store is closed".into()));
        match op {
            LogWrite::Append { done, .. }
            | LogWrite::Truncate { done, .. }
            | LogWrite::Purge { done, .. }
            | LogWrite::Sync { done } => done(err()),
            LogWrite::PutMeta { done, .. } => {
                if let Some(d) = done {
                    d(err())
                }
            }
        }
    }

    /// Queue a log write and wait until it is durable.
    pub async fn submit_wait(&self, make: impl FnOnce(Done) -> LogWrite) -> StoreResult<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(make(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.await.map_err(|_| StoreFault("log writer dropped a request".into()))?
    }

    /// Blocking variant of `submit_wait` for non-async callers.
    pub fn submit_blocking(&self, make: impl FnOnce(Done) -> LogWrite) -> StoreResult<()> {
        let (tx, rx) = mpsc::channel();
        self.submit(make(Box::new(move |r| {
            let _ = tx.send(r);
        })));
        rx.recv().map_err(|_| StoreFault("log writer dropped a request".into()))?
    }

    /// Make everything committed so far durable (one Immediate commit through the writer).
    pub fn sync_blocking(&self) -> StoreResult<()> {
        self.submit_blocking(|done| LogWrite::Sync { done })
    }

    /// Entries in `range` (by index), in order.
    pub fn read_log(&self, range: (Bound<u64>, Bound<u64>)) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let t = txn.open_table(LOG).map_err(fault)?;
        let start = match range.0 {
            Bound::Included(a) => Bound::Included((a, 0u32)),
            Bound::Excluded(a) => Bound::Excluded((a, u32::MAX)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.1 {
            Bound::Included(b) => Bound::Included((b, u32::MAX)),
            Bound::Excluded(b) => Bound::Excluded((b, 0u32)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for item in t.range::<(u64, u32)>((start, end)).map_err(fault)? {
            let (k, v) = item.map_err(fault)?;
            let (index, part) = k.value();
            join_piece(&mut out, index, part, v.value())?;
        }
        Ok(out)
    }

    /// The last entry in the log, if any.
    pub fn last_log(&self) -> StoreResult<Option<(u64, Vec<u8>)>> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let t = txn.open_table(LOG).map_err(fault)?;
        let Some(index) = t.last().map_err(fault)?.map(|(k, _)| k.value().0) else { return Ok(None) };
        let mut out = Vec::new();
        for item in t.range((index, 0u32)..=(index, u32::MAX)).map_err(fault)? {
            let (k, v) = item.map_err(fault)?;
            join_piece(&mut out, index, k.value().1, v.value())?;
        }
        Ok(out.pop())
    }

    /// The first entry in the log, if any.
    pub fn first_log_index(&self) -> StoreResult<Option<u64>> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let t = txn.open_table(LOG).map_err(fault)?;
        let first = t.first().map_err(fault)?.map(|(k, _)| k.value().0);
        Ok(first)
    }

    /// One Raft metadata value ("vote", "committed", "last_purged").
    pub fn raft_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let t = txn.open_table(RAFT_META).map_err(fault)?;
        Ok(t.get(key).map_err(fault)?.map(|v| v.value().to_vec()))
    }

    // ---------------------------------------------------------------- state side

    /// A consistent read-only view of the state.
    pub fn read(&self) -> StoreResult<ReadView> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        ReadView::open(&txn)
    }

    /// The state digest (hex SHA-256 of every replicated table, see `digest`) together with what
    /// `applied` reads from the same read transaction (raft/ decodes its last applied index), so
    /// the two always describe the same state. Blocking: reads every record.
    pub fn state_digest<T>(&self, applied: impl FnOnce(&ReadView) -> StoreResult<T>) -> StoreResult<(T, String)> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let view = ReadView::open(&txn)?;
        let a = applied(&view)?;
        Ok((a, digest::digest(&view)?))
    }

    /// Run `f` in one state write transaction; commit it if `f` succeeds (durably if `durable`),
    /// abort it otherwise. Blocking: call from a blocking thread.
    pub fn write_state<T>(&self, durable: bool, f: impl FnOnce(&mut StateTxn<'_>) -> StoreResult<T>) -> StoreResult<T> {
        if self.inner.stats.failed.load(Ordering::SeqCst) {
            return Err(StoreFault("store failed earlier; refusing writes".into()));
        }
        let mut txn = self.inner.db.begin_write().map_err(fault)?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(fault)?;
        let out = {
            let mut tables = StateTxn::open(&txn)?;
            f(&mut tables)?
        };
        txn.commit().map_err(fault)?;
        self.inner.stats.apply_txns.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Bump and return the node's incarnation counter (local, durable, never replicated).
    pub fn next_incarnation(&self) -> StoreResult<u64> {
        let mut txn = self.inner.db.begin_write().map_err(fault)?;
        txn.set_durability(Durability::Immediate).map_err(fault)?;
        let n = {
            let mut t = txn.open_table(LOCAL).map_err(fault)?;
            let n = t.get("incarnation").map_err(fault)?.map(|v| v.value()).unwrap_or(0) + 1;
            t.insert("incarnation", n).map_err(fault)?;
            n
        };
        txn.commit().map_err(fault)?;
        Ok(n)
    }

    // ---------------------------------------------------------------- snapshots

    /// The newest snapshot file, if any.
    pub fn current_snapshot(&self) -> Option<SnapshotInfo> {
        self.inner.current_snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The size in bytes of the newest snapshot file (about the size of the whole state).
    pub fn current_snapshot_bytes(&self) -> Option<u64> {
        std::fs::metadata(self.current_snapshot()?.path).ok().map(|m| m.len())
    }

    /// A fresh path in the snapshot directory to receive a snapshot into.
    pub fn receiving_path(&self) -> PathBuf {
        let n = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        self.inner.snap_dir.join(format!("recv-{}-{n}.part", std::process::id()))
    }

    /// Write every state table from one read transaction into `<snapshots>/<id>.snap` (temp file,
    /// fsync, rename) with the header `make_header` returns, then make it the only snapshot.
    /// Blocking.
    pub fn build_snapshot(
        &self,
        make_header: impl FnOnce(&ReadView) -> StoreResult<(String, Vec<u8>)>,
    ) -> StoreResult<SnapshotInfo> {
        let txn = self.inner.db.begin_read().map_err(fault)?;
        let view = ReadView::open(&txn)?;
        let (id, header) = make_header(&view)?;
        let info = snapshot::write(&self.inner.snap_dir, &id, &header, &view)?;
        self.set_current(info.clone());
        Ok(info)
    }

    /// Replace the whole state with the snapshot file at `src` (one Immediate transaction that also
    /// writes `sm_meta`), keep it as the current snapshot under `id`. Installing the same snapshot
    /// twice gives the same state. Blocking.
    /// The header (raft/'s snapshot metadata) of a received snapshot file, read before it is
    /// installed (size-bounded; the rest of the file is verified by `install_snapshot`).
    pub fn snapshot_header(&self, src: &Path) -> StoreResult<Vec<u8>> {
        snapshot::read_header(src)
    }

    pub fn install_snapshot(&self, src: &Path, id: &str, sm_meta: &[(&str, Vec<u8>)]) -> StoreResult<SnapshotInfo> {
        // Verified before it is adopted (see snapshot::adopt).
        let info = snapshot::adopt(&self.inner.snap_dir, src, id)?;
        if self.inner.stats.failed.load(Ordering::SeqCst) {
            return Err(StoreFault("store failed earlier; refusing writes".into()));
        }
        let mut txn = self.inner.db.begin_write().map_err(fault)?;
        txn.set_durability(Durability::Immediate).map_err(fault)?;
        tables::delete_state_tables(&txn)?;
        {
            let mut t = StateTxn::open(&txn)?;
            snapshot::load(&info.path, &mut t)?;
            for (k, v) in sm_meta {
                t.put_sm_meta(k, v)?;
            }
        }
        txn.commit().map_err(fault)?;
        self.set_current(info.clone());
        Ok(info)
    }

    /// Test hook: overwrite a stored block's bytes behind the state's back (disk corruption).
    #[cfg(test)]
    pub(crate) fn corrupt_block(&self, hash: &crate::state::Hash, bytes: &[u8]) {
        let txn = self.inner.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(tables::BLOCK_DATA).unwrap();
            t.insert(&hash[..], bytes).unwrap();
        }
        txn.commit().unwrap();
    }

    fn set_current(&self, info: SnapshotInfo) {
        let mut cur = self.inner.current_snapshot.lock().unwrap_or_else(|e| e.into_inner());
        snapshot::remove_others(&self.inner.snap_dir, &info.path);
        *cur = Some(info);
    }
}

#[cfg(test)]
mod tests;

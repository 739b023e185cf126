//! The store: Raft log, vote, state tables, snapshots (the only module that imports redb).
//!
//! The Raft log lives in append-only segment files under `<data>/log/` (`wal`). One redb file,
//! `<data>/pickbox.redb`, holds the Raft metadata (vote, committed, last purged), the state machine
//! side (the namespace tables behind `StateRead`/`StateWrite` plus the last applied log id and
//! membership, in the same transaction as the state they describe) and one local table
//! (incarnation counter, the log's purge mark). Snapshot files live in `<data>/snapshots/`.
//!
//! Architecture invariant: this module knows nothing of openraft; Raft types arrive as opaque bytes
//! encoded by `raft/`. Durability: log writes are group-committed (one fdatasync per batch, see
//! `log`); apply commits `None` and becomes durable with the next durable redb commit (at most
//! `STATE_FLUSH_MS`/`STATE_FLUSH_BYTES` later, and always before a purge), which is safe because a
//! crash then only loses state that the durable log replays, and `last_applied` is in the same
//! transaction as the state.

mod blobs;
pub mod codec;
mod digest;
mod log;
mod snapshot;
mod tables;
mod wal;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata};

pub use log::{Done, LogWrite, STATE_FLUSH_BYTES, STATE_FLUSH_MS};
pub use wal::SEGMENT_BYTES;
pub(crate) use blobs::{Located, LOCATE_BYTES_MIN};
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
    /// Durable log commits (each one fdatasync of the segment log).
    pub log_commits: AtomicU64,
    /// Entries written by those commits.
    pub log_entries: AtomicU64,
    /// Entry bytes written by those commits.
    pub log_bytes: AtomicU64,
    /// State machine write transactions (apply batches).
    pub apply_txns: AtomicU64,
    /// Durable redb commits (each makes the applied state durable).
    pub state_flushes: AtomicU64,
    /// Entries read back from the log file (ones the Raft entry cache no longer held).
    pub log_reads: AtomicU64,
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
    /// The log, and what the log writer shares with the state side.
    log: Arc<log::Shared>,
    snap_dir: PathBuf,
    writer: Mutex<Option<mpsc::Sender<LogWrite>>>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    stats: Arc<StoreStats>,
    /// The current snapshot: a pinned read transaction, written out only when asked for.
    pinned: Mutex<Option<Arc<PinnedSnapshot>>>,
    /// The newest snapshot file found at open (see `take_found_snapshot`).
    found_snapshot: Mutex<Option<SnapshotInfo>>,
    snapshot_seq: AtomicU64,
    /// Wakes the writeback thread (`writeback_loop`); dropped with the store, which ends it.
    writeback: mpsc::SyncSender<()>,
    /// Located blocks' files (log segments and packs).
    blobs: Arc<blobs::Blobs>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer thread after it has written what was queued.
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.writer_thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        // A clean close leaves everything durable: the state and the lazy metadata.
        if !self.stats.failed.load(Ordering::SeqCst) {
            self.log.writer_ended();
            if let Err(e) = self.log.wal.sync().and_then(|_| self.log.commit_meta(&Default::default(), None)) {
                tracing::error!(error = %e, "store: final sync at close failed");
            }
        }
    }
}

/// Starts the kernel's writeback of the redb file's dirty pages each time it is woken, without
/// waiting for it: the non-durable apply commits' pages then reach the disk while the log and apply
/// go on, and the next durable commit's fsync (which apply waits for, redb having one writer) finds
/// little left to write. A hint only: durability still comes from that fsync alone.
fn writeback_loop(file: std::fs::File, wake: mpsc::Receiver<()>) {
    while wake.recv().is_ok() {
        if let Err(e) = start_writeback(&file, 0, 0) {
            tracing::warn!(error = %e, "store: starting writeback of the state file failed");
        }
    }
}

/// Ask the kernel to start writing `file`'s dirty pages in `[from, from + len)` (`len` 0: to the
/// end of the file), without waiting for it. A hint: it makes nothing durable.
fn start_writeback(file: &std::fs::File, from: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
    let r = unsafe {
        libc::sync_file_range(file.as_raw_fd(), from as libc::off64_t, len as libc::off64_t, libc::SYNC_FILE_RANGE_WRITE)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
/// The segment log's directory inside a data directory.
pub const LOG_DIR: &str = "log";
/// Where a log is built while it is moved out of redb's LOG table (previous versions).
const LOG_MIGRATING_DIR: &str = "log.migrating";
/// LOCAL key: where the log is (absent: in redb's LOG table, previous versions).
const LOCAL_LOG_FORMAT: &str = "log_format";
/// `LOCAL_LOG_FORMAT` value: the log is in segment files under `LOG_DIR`.
const LOG_FORMAT_SEGMENTS: u64 = 1;
/// Entries moved out of the LOG table per append when migrating.
const MIGRATE_BATCH_ENTRIES: usize = 256;
/// redb reuses the pages freed inside its file but never shrinks the file; only
/// `Database::compact()` (live pages moved down, the free tail cut off) gives the space back.
/// `Store::open` compacts when at least this much of the file is free...
const COMPACT_MIN_FREE_BYTES: u64 = 64 * 1024 * 1024;
/// ... and at least this share of it: a file with little free space would pay for moving most of
/// its pages to give little back (compacting a 1 GiB file half free took 2.5-3 s at start).
const COMPACT_MIN_FREE_PERCENT: u64 = 25;
/// File space a stored block takes, for the cheap estimate that decides whether the exact free
/// space is worth measuring (redb's `stats()` reads every page of the file, ~1.5 s per 512 MiB of
/// live data from a cold cache, too much for every start): a head in its own 64 KiB page and a
/// tail of ~0.5 KiB in a shared 4 KiB leaf. A short block takes less, so the estimate errs towards
/// not compacting.
const COMPACT_EST_BLOCK_BYTES: u64 = 65 * 1024;
/// File space any other record takes (key, value, B-tree slack), for the same estimate.
const COMPACT_EST_RECORD_BYTES: u64 = 256;

#[cfg(test)]
thread_local! {
    /// Test override of `COMPACT_MIN_FREE_BYTES` for stores opened on this thread (keeps the
    /// compaction tests' files small).
    static COMPACT_MIN_FREE_BYTES_TEST: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Give the space freed inside the redb file back to the filesystem when enough of it is free
/// (`COMPACT_MIN_FREE_BYTES` and `COMPACT_MIN_FREE_PERCENT`). First a cheap estimate (row counts,
/// O(1) per table) rules out the usual start with little free; only then is the free space
/// measured exactly (redb's allocated pages against the file length) and the file compacted.
/// Crash safety is redb's: compact() is a series of ordinary copy-on-write commits (relocated
/// pages are written to free pages, the old ones freed only after the commit is durable, the file
/// cut only after the smaller layout is durable), so a crash leaves the last complete commit,
/// which holds the same records. An error is returned for the caller to log; nothing is lost.
fn compact_at_open(db: &mut Database, path: &Path) -> StoreResult<()> {
    use redb::TableHandle;
    let min_free = COMPACT_MIN_FREE_BYTES;
    #[cfg(test)]
    let min_free = COMPACT_MIN_FREE_BYTES_TEST.with(|c| c.get()).unwrap_or(min_free);
    let worth = |free: u64, file: u64| {
        free >= min_free && free.saturating_mul(100) >= file.saturating_mul(COMPACT_MIN_FREE_PERCENT)
    };
    let file_len = || std::fs::metadata(path).map(|m| m.len()).map_err(fault);
    let started = std::time::Instant::now();
    let before = file_len()?;
    let estimated_free = {
        let txn = db.begin_read().map_err(fault)?;
        let mut live = 0u64;
        for table in txn.list_tables().map_err(fault)? {
            let rows = txn.open_untyped_table(table.clone()).map_err(fault)?.len().map_err(fault)?;
            let blocks = table.name() == tables::BLOCK_DATA.name();
            let each = if blocks { COMPACT_EST_BLOCK_BYTES } else { COMPACT_EST_RECORD_BYTES };
            live = live.saturating_add(rows.saturating_mul(each));
        }
        before.saturating_sub(live)
    };
    if !worth(estimated_free, before) {
        return Ok(());
    }
    let free = {
        let txn = db.begin_write().map_err(fault)?;
        let stats = txn.stats().map_err(fault)?;
        txn.abort().map_err(fault)?;
        before.saturating_sub(stats.allocated_pages().saturating_mul(stats.page_size() as u64))
    };
    if !worth(free, before) {
        tracing::debug!(
            file_bytes = before,
            free_bytes = free,
            estimated_free_bytes = estimated_free,
            "store: state file not worth compacting"
        );
        return Ok(());
    }
    // compact() itself loops until no page can move lower, so one call compacts fully.
    db.compact().map_err(fault)?;
    let after = file_len()?;
    tracing::info!(
        before_bytes = before,
        after_bytes = after,
        free_bytes = free,
        ms = started.elapsed().as_millis() as u64,
        "store: compacted the state file"
    );
    Ok(())
}

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
        let db_path = data_dir.join(DB_FILE);
        let open_db = || Database::builder().set_cache_size(CACHE_BYTES).create(&db_path).map_err(fault);
        let mut db = open_db()?;
        {
            let txn = db.begin_write().map_err(fault)?;
            tables::create_all_tables(&txn)?;
            txn.commit().map_err(fault)?;
        }
        let blobs = blobs::Blobs::new(data_dir);
        let wal = open_log(data_dir, &db, &blobs)?;
        let started = std::time::Instant::now();
        let moved = tables::migrate_hash_keyed_blocks(&db)?;
        if moved > 0 {
            tracing::info!(blocks = moved, ms = started.elapsed().as_millis() as u64, "store: blocks of a previous version moved to id-keyed tables");
        }
        // Only here does the store hold the `Database` alone (compact() needs `&mut` and no live
        // transaction); a node start is also the moment users expect space back after deletes.
        if let Err(e) = compact_at_open(&mut db, &db_path) {
            // An optimisation only: the store opens anyway. redb refuses further writes after a
            // commit that failed half way until the file is reopened (which repairs it), so reopen.
            tracing::warn!(error = %e, "store: compacting the state file failed; going on uncompacted");
            drop(db);
            db = open_db()?;
        }
        let db = Arc::new(db);
        let stats = Arc::new(StoreStats::default());
        let shared = Arc::new(log::Shared::new(db.clone(), wal, stats.clone()));
        blobs.set_log(&shared);
        {
            let (b, d) = (blobs.clone(), db.clone());
            shared.wal.set_keep(wal::Keep { refers: Box::new(move |seg| b.refers(&d, seg)), packs_dir: blobs.packs_dir().to_path_buf() });
        }
        let (tx, rx) = mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("pickbox-log-writer".into())
                .spawn(move || log::run(shared, rx))
                .map_err(fault)?
        };
        let current = snapshot::scan(&snap_dir)?;
        let writeback = {
            let file = std::fs::File::open(data_dir.join(DB_FILE)).map_err(fault)?;
            let (tx, rx) = mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name("pickbox-writeback".into())
                .spawn(move || writeback_loop(file, rx))
                .map_err(fault)?;
            tx
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                log: shared,
                snap_dir,
                writer: Mutex::new(Some(tx)),
                writer_thread: Mutex::new(Some(thread)),
                stats,
                pinned: Mutex::new(None),
                found_snapshot: Mutex::new(current),
                snapshot_seq: AtomicU64::new(0),
                writeback,
                blobs,
            }),
        })
    }

    pub fn stats(&self) -> &StoreStats {
        &self.inner.stats
    }

    // ---------------------------------------------------------------- log side

    /// Let small appends be written by the thread that submits them while the writer thread is
    /// idle (`log::write_inline`): where the round waits for this write alone (a sole voter, a
    /// follower), the two hand-offs to the writer and back cost as much as the write. Raft turns
    /// it off while this node leads others: their leader sends them the entries from the thread
    /// that submits its own write, which must not wait for it.
    pub fn set_inline_appends(&self, on: bool) {
        self.inner.log.inline.store(on, Ordering::Relaxed);
    }

    /// Queue a log write; its `done` runs once it is durable or failed: on the writer thread, or
    /// before `submit` returns for an append written inline (`set_inline_appends`).
    pub fn submit(&self, op: LogWrite) {
        let op = match op {
            LogWrite::PutMeta { key, value, done: None } => {
                self.inner.log.lazy.lock().unwrap_or_else(|e| e.into_inner()).insert(key, value);
                return;
            }
            op => op,
        };
        let op = if self.inner.log.inline.load(Ordering::Relaxed) {
            match log::write_inline(&self.inner.log, op) {
                None => return,
                Some(op) => op,
            }
        } else {
            op
        };
        let sender = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = match sender {
            Some(s) => {
                self.inner.log.queued.fetch_add(1, Ordering::SeqCst);
                match s.send(op) {
                    Ok(()) => return,
                    Err(mpsc::SendError(op)) => {
                        self.inner.log.queued.fetch_sub(1, Ordering::SeqCst);
                        op
                    }
                }
            }
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

    /// Make everything so far durable: the log (fdatasync) and the state (an Immediate redb commit),
    /// through the writer.
    pub fn sync_blocking(&self) -> StoreResult<()> {
        self.submit_blocking(|done| LogWrite::Sync { done })
    }

    /// Entries in `range` (by index), in order.
    pub fn read_log(&self, range: (Bound<u64>, Bound<u64>)) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let rows = self.inner.log.wal.read_range(range)?;
        self.inner.stats.log_reads.fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(rows)
    }

    /// Where entry `index`'s payload lies in the log, if the record is live and durable: (segment,
    /// offset of the payload in the segment file, payload length). See store/blobs.rs.
    pub fn durable_record(&self, index: u64) -> Option<(u64, u64, u32)> {
        self.inner.log.wal.durable_record(index)
    }

    /// The last entry in the log, if any.
    pub fn last_log(&self) -> StoreResult<Option<(u64, Vec<u8>)>> {
        self.inner.log.wal.last()
    }

    /// Bytes the live log entries take on disk.
    pub fn log_bytes(&self) -> u64 {
        self.inner.log.wal.live_bytes()
    }

    /// The first entry in the log, if any.
    pub fn first_log_index(&self) -> StoreResult<Option<u64>> {
        Ok(self.inner.log.wal.first_index())
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
        self.view()
    }

    /// A read view, registered so that the packs it may read stay (store/blobs.rs).
    fn view(&self) -> StoreResult<ReadView> {
        let guard = self.inner.blobs.reader();
        Ok(ReadView::open(self.inner.db.begin_read().map_err(fault)?, Some((self.inner.blobs.clone(), guard))))
    }

    /// The state digest (hex SHA-256 of every replicated table, see `digest`) together with what
    /// `applied` reads from the same read transaction (raft/ decodes its last applied index), so
    /// the two always describe the same state. Blocking: reads every record.
    pub fn state_digest<T>(&self, applied: impl FnOnce(&ReadView) -> StoreResult<T>) -> StoreResult<(T, String)> {
        let view = self.view()?;
        let a = applied(&view)?;
        Ok((a, digest::digest(&view)?))
    }

    /// Run `f` in one state write transaction; commit it if `f` succeeds, abort it otherwise.
    /// The commit is durable if `durable`, or if the state has not been made durable for
    /// `STATE_FLUSH_MS` or `STATE_FLUSH_BYTES` of log (see `log` for why that is safe). Blocking:
    /// call from a blocking thread.
    pub fn write_state<T>(&self, durable: bool, f: impl FnOnce(&mut StateTxn<'_>) -> StoreResult<T>) -> StoreResult<T> {
        if self.inner.stats.failed.load(Ordering::SeqCst) {
            return Err(StoreFault("store failed earlier; refusing writes".into()));
        }
        let durable = durable || self.inner.log.state_flush_due();
        let mut txn = self.inner.db.begin_write().map_err(fault)?;
        txn.set_durability(if durable { Durability::Immediate } else { Durability::None }).map_err(fault)?;
        let blobs = &self.inner.blobs;
        let (out, unreferenced) = {
            let mut tables = StateTxn::open(&txn, Some(blobs.clone()));
            let out = f(&mut tables)?;
            let unreferenced = if durable && blobs.sweep_due() { Some(tables.unreferenced_packs()?) } else { None };
            (out, unreferenced)
        };
        if durable {
            self.inner.log.write_ready_meta(&txn)?;
        }
        txn.commit().map_err(fault)?;
        blobs.after_commit();
        self.inner.stats.apply_txns.fetch_add(1, Ordering::Relaxed);
        if durable {
            blobs.after_durable(unreferenced);
            self.inner.log.state_made_durable();
        } else if self.inner.log.writeback_due() {
            // Full: a writeback is under way already, which covers these pages too.
            let _ = self.inner.writeback.try_send(());
        }
        if let Some(seg) = blobs.take_compact() {
            self.compact_pack(seg);
        }
        Ok(out)
    }

    /// Copy the live blocks of mostly dead pack `seg` into the state file (store/blobs.rs), in a
    /// transaction of its own: a failure (an unreadable pack, a full disk) is logged and leaves
    /// the pack as it is, it never fails an apply. The next sweep queues the pack again.
    fn compact_pack(&self, seg: u64) {
        let blobs = &self.inner.blobs;
        let run = || -> StoreResult<u64> {
            let mut txn = self.inner.db.begin_write().map_err(fault)?;
            txn.set_durability(Durability::None).map_err(fault)?;
            let bytes = StateTxn::open(&txn, Some(blobs.clone())).compact_segment(seg)?;
            txn.commit().map_err(fault)?;
            Ok(bytes)
        };
        match run() {
            Ok(bytes) => tracing::info!(pack = seg, bytes, "store: mostly dead pack compacted (its live blocks copied into the state file)"),
            Err(e) => tracing::warn!(pack = seg, error = %e, "store: compacting a pack failed; it stays as it is"),
        }
        blobs.after_commit();
    }

    /// Whether the next `write_state` commit will be durable (`STATE_FLUSH_MS`/`STATE_FLUSH_BYTES`
    /// are due): an fsync, so a caller on an async thread moves that one to a blocking thread.
    pub fn state_flush_due(&self) -> bool {
        self.inner.log.state_flush_due()
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

    /// The current snapshot, if one was pinned since open (`pin_snapshot`, `install_snapshot`).
    pub fn current_snapshot(&self) -> Option<Arc<PinnedSnapshot>> {
        self.inner.pinned.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The newest snapshot file found in the snapshot directory at open, taken (the next call
    /// returns None). Only a received snapshot whose load into the state was interrupted is newer
    /// than the state (raft/ loads it again); any other is a written-out pinned snapshot of an
    /// earlier run, which `discard_found_snapshot` removes.
    pub fn take_found_snapshot(&self) -> Option<SnapshotInfo> {
        self.inner.found_snapshot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Remove a snapshot file `take_found_snapshot` returned that is not needed.
    pub fn discard_found_snapshot(&self, info: &SnapshotInfo) {
        if let Err(e) = std::fs::remove_file(&info.path) {
            tracing::warn!(path = %info.path.display(), error = %e, "could not remove an old snapshot file");
        }
    }

    /// A fresh path in the snapshot directory to receive a snapshot into.
    pub fn receiving_path(&self) -> PathBuf {
        let n = self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        self.inner.snap_dir.join(format!("recv-{}-{n}.part", std::process::id()))
    }

    /// Take a snapshot: pin a read transaction of the state as it is (O(1): nothing is copied)
    /// and make it the current snapshot, with the header `make_header` returns. Its file is written
    /// only when a follower needs it (`write_out`); until then redb keeps the pages it sees (the
    /// state file grows by what changes meanwhile; the next snapshot releases them). Copying the
    /// whole state at every snapshot (as this did before) cost as much as the state's size each
    /// time the log reached the snapshot policy's bound, however little had been written.
    /// The read transaction may see apply commits that are not durable yet: a durable commit
    /// right after it was opened covers them, so a crash never leaves a snapshot openraft was told
    /// about newer than the state (it panics at start otherwise). Blocking.
    pub fn pin_snapshot(
        &self,
        make_header: impl FnOnce(&ReadView) -> StoreResult<(String, Vec<u8>)>,
    ) -> StoreResult<Arc<PinnedSnapshot>> {
        let view = self.view()?;
        self.write_state(true, |_| Ok(()))?;
        let (id, header) = make_header(&view)?;
        Ok(self.set_current(id, header, view))
    }

    /// The file of `pin`: written from its read transaction at the first call (every state table
    /// streamed as records, temp file, fsync, rename), the same file afterwards. Callers wait for
    /// one another. Blocking: proportional to the state's size.
    pub fn write_out(&self, pin: &PinnedSnapshot) -> StoreResult<SnapshotInfo> {
        let mut file = pin.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(info) = &*file {
            return Ok(info.clone());
        }
        let view = pin.view.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(view) = view else {
            return Err(StoreFault(format!("snapshot {} was replaced before it was written out", pin.id)));
        };
        let started = std::time::Instant::now();
        let name = format!("{}_{}", pin.id, pin.seq);
        let info = match snapshot::write(&self.inner.snap_dir, &name, &pin.header, &view) {
            Ok(info) => info,
            Err(e) => {
                // The partial file goes; the view is kept for the next attempt (a full disk may
                // have room again by then).
                let _ = std::fs::remove_file(self.inner.snap_dir.join(format!("{name}.tmp")));
                *pin.view.lock().unwrap_or_else(|e| e.into_inner()) = Some(view);
                return Err(e);
            }
        };
        // The file holds the snapshot now: the pages the view kept can go.
        drop(view);
        tracing::info!(id = %pin.id, bytes = std::fs::metadata(&info.path).map(|m| m.len()).unwrap_or(0),
            ms = started.elapsed().as_millis() as u64, "snapshot written out (a follower needs it)");
        *file = Some(info.clone());
        Ok(info)
    }

    /// The header (raft/'s snapshot metadata) of a received snapshot file, read before it is
    /// installed (size-bounded; the rest of the file is verified by `install_snapshot`).
    pub fn snapshot_header(&self, src: &Path) -> StoreResult<Vec<u8>> {
        snapshot::read_header(src)
    }

    /// Replace the whole state with the snapshot file at `src` (verified first; one Immediate
    /// transaction that also writes `sm_meta`), make it the current snapshot under `id`, remove
    /// the file. Installing the same snapshot twice gives the same state. Blocking.
    pub fn install_snapshot(&self, src: &Path, id: &str, sm_meta: &[(&str, Vec<u8>)]) -> StoreResult<()> {
        // Verified before it is adopted (see snapshot::adopt).
        let info = snapshot::adopt(&self.inner.snap_dir, src, id)?;
        if self.inner.stats.failed.load(Ordering::SeqCst) {
            return Err(StoreFault("store failed earlier; refusing writes".into()));
        }
        let mut txn = self.inner.db.begin_write().map_err(fault)?;
        txn.set_durability(Durability::Immediate).map_err(fault)?;
        {
            // Every located block goes with the old state.
            let t = StateTxn::open(&txn, Some(self.inner.blobs.clone()));
            for seg in t.located_segments()? {
                self.inner.blobs.note_freed(seg);
            }
        }
        self.inner.blobs.note_replaced();
        tables::clear_state_tables(&txn)?;
        let unreferenced = {
            let mut t = StateTxn::open(&txn, Some(self.inner.blobs.clone()));
            snapshot::load(&info.path, &mut t)?;
            for (k, v) in sm_meta {
                t.put_sm_meta(k, v)?;
            }
            t.unreferenced_packs()?
        };
        txn.commit().map_err(fault)?;
        self.inner.blobs.after_commit();
        self.inner.blobs.after_durable(Some(unreferenced));
        self.inner.log.state_made_durable();
        // The state is the snapshot now (durable): it is pinned as such, like a snapshot taken
        // here, and the received file goes (a copy of the whole state on disk until the next
        // snapshot otherwise; written out again only if this node has to send it).
        let view = self.view()?;
        self.set_current(id.to_string(), info.header.clone(), view);
        if let Err(e) = std::fs::remove_file(&info.path) {
            tracing::warn!(path = %info.path.display(), error = %e, "could not remove an installed snapshot file");
        }
        Ok(())
    }

    /// Test hook: (located blocks, their bytes, segments holding them, packs on disk).
    #[cfg(test)]
    pub(crate) fn located_stats(&self) -> (u64, u64, Vec<u64>, Vec<u64>) {
        let txn = self.inner.db.begin_write().unwrap();
        let (blocks, bytes, segs) = StateTxn::open(&txn, None).located_stats().unwrap();
        txn.abort().unwrap();
        (blocks, bytes, segs, self.inner.blobs.packs_on_disk().unwrap())
    }

    /// Test hook: `(path, end of the last record)` of every log segment.
    #[cfg(test)]
    pub(crate) fn log_segment_files(&self) -> Vec<(PathBuf, u64)> {
        self.inner.log.wal.segment_files()
    }

    /// Test hook: overwrite a stored block's bytes behind the state's back (disk corruption).
    #[cfg(test)]
    pub(crate) fn corrupt_block(&self, hash: &crate::state::Hash, bytes: &[u8]) {
        let txn = self.inner.db.begin_write().unwrap();
        {
            let id = txn.open_table(tables::BLOCK_IDS).unwrap().get(&hash[..]).unwrap().unwrap().value();
            let mut t = txn.open_table(tables::BLOCK_DATA).unwrap();
            t.insert(id, bytes).unwrap();
        }
        txn.commit().unwrap();
    }

    /// Make `view` the current snapshot. The one it replaces goes when nothing holds it any more
    /// (a transfer may still read it).
    fn set_current(&self, id: String, header: Vec<u8>, view: ReadView) -> Arc<PinnedSnapshot> {
        let pin = Arc::new(PinnedSnapshot {
            id,
            header,
            view: Mutex::new(Some(view)),
            file: Mutex::new(None),
            seq: self.inner.snapshot_seq.fetch_add(1, Ordering::Relaxed),
        });
        *self.inner.pinned.lock().unwrap_or_else(|e| e.into_inner()) = Some(pin.clone());
        pin
    }
}

/// A snapshot: the header raft/ gave it and a read transaction of the state it covers, or, once
/// written out (or received), its file. Its file is removed when the last holder drops it (the
/// store when a newer snapshot replaces it, a transfer reading it).
pub struct PinnedSnapshot {
    pub id: String,
    /// raft/'s snapshot metadata.
    pub header: Vec<u8>,
    view: Mutex<Option<ReadView>>,
    file: Mutex<Option<SnapshotInfo>>,
    /// Makes the written-out file's name unique (two snapshots may cover the same entry).
    seq: u64,
}

impl PinnedSnapshot {
    /// Its file, if written out already (test hook).
    #[cfg(test)]
    pub(crate) fn file(&self) -> Option<SnapshotInfo> {
        self.file.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for PinnedSnapshot {
    fn drop(&mut self) {
        let file = self.file.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(info) = file {
            match std::fs::remove_file(&info.path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %info.path.display(), error = %e, "could not remove an old snapshot file"),
            }
        }
    }
}

/// Open the segment log of `data_dir`. A data directory of a previous version has its log in
/// redb's LOG table: it is moved into a new segment log first (built aside, synced, renamed into
/// place, then one durable commit empties the table and sets `LOCAL_LOG_FORMAT`; a crash before
/// that commit redoes the move, so either the old or the new log is complete at any point).
fn open_log(data_dir: &Path, db: &Database, blobs: &blobs::Blobs) -> StoreResult<wal::Wal> {
    let dir = data_dir.join(LOG_DIR);
    let aside = data_dir.join(LOG_MIGRATING_DIR);
    if aside.exists() {
        std::fs::remove_dir_all(&aside).map_err(fault)?;
    }
    let (old_entries, purged_upto, format) = {
        let txn = db.begin_read().map_err(fault)?;
        let log = txn.open_table(LOG).map_err(fault)?;
        let local = txn.open_table(LOCAL).map_err(fault)?;
        let purged = local.get(log::LOCAL_LOG_PURGED).map_err(fault)?.map(|v| v.value());
        let format = local.get(LOCAL_LOG_FORMAT).map_err(fault)?.map(|v| v.value());
        (!log.is_empty().map_err(fault)?, purged, format)
    };
    let sync_data_dir = || std::fs::File::open(data_dir).and_then(|d| d.sync_all()).map_err(fault);
    if format == Some(LOG_FORMAT_SEGMENTS) {
        if old_entries {
            return Err(StoreFault(
                "the redb LOG table has entries although the log is in segment files (was this data directory used by an older version?); refusing to start".into(),
            ));
        }
        if !dir.exists() {
            return Err(StoreFault(format!("the log directory {} is missing; refusing to start", dir.display())));
        }
    } else {
        if old_entries {
            migrate_log_table(db, &aside)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(fault)?;
            }
            std::fs::rename(&aside, &dir).map_err(fault)?;
        } else if !dir.exists() {
            std::fs::create_dir(&dir).map_err(fault)?;
        }
        sync_data_dir()?;
        let mut txn = db.begin_write().map_err(fault)?;
        txn.set_durability(Durability::Immediate).map_err(fault)?;
        if old_entries {
            txn.delete_table(LOG).map_err(fault)?;
            txn.open_table(LOG).map_err(fault)?;
        }
        txn.open_table(LOCAL).map_err(fault)?.insert(LOCAL_LOG_FORMAT, LOG_FORMAT_SEGMENTS).map_err(fault)?;
        txn.commit().map_err(fault)?;
        if old_entries {
            tracing::info!("log moved from the redb LOG table into {}", dir.display());
        }
    }
    // At open the last committed state is the durable one: what it refers to is what to keep.
    let packs_dir = blobs.packs_dir().to_path_buf();
    let referred: std::collections::HashSet<u64> = {
        let txn = db.begin_read().map_err(fault)?;
        let t = txn.open_table(tables::SEG_LIVE).map_err(fault)?;
        let mut set = std::collections::HashSet::new();
        for item in t.iter().map_err(fault)? {
            set.insert(item.map_err(fault)?.0.value());
        }
        set
    };
    wal::Wal::open_kept(&dir, purged_upto, wal::Keep { refers: Box::new(move |seg| referred.contains(&seg)), packs_dir })
}

/// Copy every entry of the LOG table into a new segment log in `aside`, durably.
fn migrate_log_table(db: &Database, aside: &Path) -> StoreResult<()> {
    let wal = wal::Wal::open(aside, None)?;
    let txn = db.begin_read().map_err(fault)?;
    let t = txn.open_table(LOG).map_err(fault)?;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::new();
    for item in t.iter().map_err(fault)? {
        let (k, v) = item.map_err(fault)?;
        let (index, part) = k.value();
        let new_entry = batch.last().is_none_or(|(i, _)| *i != index);
        if new_entry && batch.len() >= MIGRATE_BATCH_ENTRIES {
            wal.append(&batch)?;
            batch.clear();
        }
        join_piece(&mut batch, index, part, v.value())?;
    }
    wal.append(&batch)?;
    wal.sync()?;
    Ok(())
}

#[cfg(test)]
mod tests;

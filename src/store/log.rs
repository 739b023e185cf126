//! The log writer thread: group commit of Raft log appends, votes, truncations and purges.
//!
//! Every write to the log side goes through one queue, so writes are applied in submission order
//! (openraft requires serialized log IO). The thread takes everything queued, writes the entries
//! into the segment log (`wal`) with ONE fdatasync, makes a durable redb commit only if the batch
//! needs one (a vote, a purge, a sync), then reports completion to every submitter.
//!
//! Inline appends (`write_inline`, on a node that leads no one: a sole voter or a follower; see
//! `Store::set_inline_appends`): a small append submitted while the
//! writer has nothing queued or in hand is written by the submitting thread itself, under the same
//! `io` lock the writer holds for each batch, so the order is the same as through the queue. It
//! saves the two thread hand-offs per Raft round (to the writer and back), which cost as much as
//! the write itself on small machines.
//!
//! Durability of the state (the invariant the rest relies on): apply commits redb `Durability::None`
//! and the log no longer shares the redb file, so the state becomes durable only with a durable
//! (`Immediate`) redb commit: every `STATE_FLUSH_MS` or `STATE_FLUSH_BYTES` of log written (an
//! apply commit is then made `Immediate`, `Store::write_state`), at each purge, at `Sync`, and at
//! close. A crash loses at most the state applied since the last one; openraft re-applies it from
//! the log at start, which is why `last_purged <= durable last_applied` must hold: a purge first
//! makes the state durable (in the same commit that records `last_purged`), then deletes entries.
//! Lazy metadata (`committed`) is written to redb only once the log entries it refers to are
//! durable (`ready`), so a durable `committed` never points past the durable log (openraft
//! re-applies up to it at start and fails if entries are missing). A durable `last_applied` may be
//! ahead of the durable log on a follower (it applies committed entries before its own fsync);
//! openraft then purges up to `last_applied` at start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableTable, WriteTransaction};

use super::tables::{LOCAL, RAFT_META};
use super::wal::Wal;
use super::{fault, StoreStats};
use crate::state::{StoreFault, StoreResult};

/// Called once the operation is durable (or failed).
pub type Done = Box<dyn FnOnce(StoreResult<()>) + Send>;

/// Most operations taken into one batch.
const BATCH_OPS_MAX: usize = 4096;
/// Most entry bytes taken into one batch (a bound on the memory held by queued entries).
const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Log bytes written after which an apply commit is made durable (bounds the re-apply at start
/// after a crash).
pub const STATE_FLUSH_BYTES: u64 = 64 * 1024 * 1024;
/// Log bytes written after which the kernel is asked to start writing the state file's dirty
/// pages back (`Store::write_state`), so each durable commit's fsync has little left to write.
pub const STATE_WRITEBACK_BYTES: u64 = 8 * 1024 * 1024;
/// Time after which an apply commit is made durable.
pub const STATE_FLUSH_MS: u64 = 1000;
/// Largest append (entry bytes) that `write_inline` writes on the submitting thread; a larger
/// one goes to the writer, so a stream of large writes keeps overlapping its log writes with
/// apply. The same bound as a single `RWF_DSYNC` write.
pub const INLINE_APPEND_BYTES_MAX: usize = 256 * 1024;
/// LOCAL key: the highest index the log purged (the segment log's own record, so it can hide
/// purged entries still in its first segment and finish a purge a crash interrupted).
pub(super) const LOCAL_LOG_PURGED: &str = "log_purged_upto";

/// One write to the log side of the store.
pub enum LogWrite {
    /// Append (or overwrite) entries `index -> encoded entry` (contiguous indexes; an index at or
    /// below the last one replaces the log from there).
    Append { entries: Vec<(u64, Vec<u8>)>, done: Done },
    /// Set (Some) or delete (None) one Raft metadata key (vote, committed). Without `done` the
    /// write is lazy: it goes into the next durable redb commit after the log entries submitted
    /// before it are durable.
    PutMeta { key: &'static str, value: Option<Vec<u8>>, done: Option<Done> },
    /// Delete entries with index >= `from`.
    Truncate { from: u64, done: Done },
    /// Make the state durable, record `last_purged`, then delete entries with index <= `upto`.
    Purge { upto: u64, last_purged: Vec<u8>, done: Done },
    /// Make everything so far durable: the log and the state machine's non-durable commits.
    Sync { done: Done },
}

impl LogWrite {
    fn bytes(&self) -> usize {
        match self {
            LogWrite::Append { entries, .. } => entries.iter().map(|(_, b)| b.len()).sum(),
            _ => 0,
        }
    }

    fn finish(self, res: &Result<(), String>) {
        let r = || res.clone().map_err(StoreFault);
        match self {
            LogWrite::Append { done, .. }
            | LogWrite::Truncate { done, .. }
            | LogWrite::Purge { done, .. }
            | LogWrite::Sync { done } => done(r()),
            LogWrite::PutMeta { done, .. } => {
                if let Some(d) = done {
                    d(r())
                }
            }
        }
    }
}

/// Raft metadata writes by key.
pub(super) type MetaWrites = BTreeMap<&'static str, Option<Vec<u8>>>;

/// What the writer thread and the state side share.
pub(super) struct Shared {
    pub db: Arc<Database>,
    pub wal: Wal,
    pub stats: Arc<StoreStats>,
    /// Lazy metadata as submitted: the log entries it refers to may not be durable yet.
    pub lazy: Mutex<MetaWrites>,
    /// Lazy metadata whose log entries are durable: written by the next durable redb commit,
    /// whoever makes it.
    ready: Mutex<MetaWrites>,
    /// When the state was last made durable, and `stats.log_bytes` then.
    durable_at: Mutex<(Instant, u64)>,
    /// `stats.log_bytes` when the state file's writeback was last started.
    writeback_at: std::sync::atomic::AtomicU64,
    /// Held by whoever writes the log: the writer thread for each batch, `write_inline` for its
    /// append.
    io: Mutex<()>,
    /// Operations submitted to the writer's queue and not yet written (an inline append may go
    /// only when this is zero).
    pub(super) queued: AtomicUsize,
    /// Why the log failed, once it has: every later write fails with it.
    failed: Mutex<Option<String>>,
    /// Whether small appends may be written by the submitting thread (`Store::set_inline_appends`).
    pub(super) inline: AtomicBool,
    /// Test hook: the writer holds this lock while it handles a batch, so a test that holds it
    /// stalls the log (a slow or stuck disk).
    #[cfg(test)]
    pub stall: Mutex<()>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(db: Arc<Database>, wal: Wal, stats: Arc<StoreStats>) -> Shared {
        Shared {
            db,
            wal,
            stats,
            lazy: Mutex::default(),
            ready: Mutex::default(),
            durable_at: Mutex::new((Instant::now(), 0)),
            writeback_at: Default::default(),
            io: Mutex::new(()),
            queued: AtomicUsize::new(0),
            failed: Mutex::new(None),
            inline: AtomicBool::new(false),
            #[cfg(test)]
            stall: Mutex::new(()),
        }
    }

    /// Whether the next apply commit should be durable (`STATE_FLUSH_MS`, `STATE_FLUSH_BYTES`).
    pub fn state_flush_due(&self) -> bool {
        let (at, bytes) = *locked(&self.durable_at);
        at.elapsed() >= Duration::from_millis(STATE_FLUSH_MS)
            || self.stats.log_bytes.load(Ordering::Relaxed).saturating_sub(bytes) >= STATE_FLUSH_BYTES
    }

    /// Whether `STATE_WRITEBACK_BYTES` of log were written since the state file's writeback was
    /// last started (then it counts as started now). Called by the one state writer.
    pub fn writeback_due(&self) -> bool {
        let now = self.stats.log_bytes.load(Ordering::Relaxed);
        if now.saturating_sub(self.writeback_at.load(Ordering::Relaxed)) < STATE_WRITEBACK_BYTES {
            return false;
        }
        self.writeback_at.store(now, Ordering::Relaxed);
        true
    }

    /// Write the ready lazy metadata into `txn`, which the caller commits durably.
    pub fn write_ready_meta(&self, txn: &WriteTransaction) -> StoreResult<()> {
        let ready = std::mem::take(&mut *locked(&self.ready));
        if ready.is_empty() {
            return Ok(());
        }
        let mut meta = txn.open_table(RAFT_META).map_err(fault)?;
        put_meta(&mut meta, &ready)
    }

    /// The writer has ended: every append it took is durable, so is every lazy write's entry.
    pub fn writer_ended(&self) {
        let lazy = std::mem::take(&mut *locked(&self.lazy));
        locked(&self.ready).extend(lazy);
    }

    /// A durable redb commit happened: the state is durable up to here.
    pub fn state_made_durable(&self) {
        *locked(&self.durable_at) = (Instant::now(), self.stats.log_bytes.load(Ordering::Relaxed));
        self.stats.state_flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// One durable redb commit of `puts` (after the ready lazy metadata), and of the purge mark.
    /// It also makes every earlier apply commit durable.
    pub fn commit_meta(&self, puts: &MetaWrites, purged_upto: Option<u64>) -> StoreResult<()> {
        let mut txn = self.db.begin_write().map_err(fault)?;
        txn.set_durability(Durability::Immediate).map_err(fault)?;
        self.write_ready_meta(&txn)?;
        {
            let mut meta = txn.open_table(RAFT_META).map_err(fault)?;
            put_meta(&mut meta, puts)?;
            // Write something so the commit is never elided as empty.
            let n = meta.get("sync").map_err(fault)?.map(|v| v.value().len()).unwrap_or(0);
            let flip: &[u8] = if n == 0 { &[1] } else { &[] };
            meta.insert("sync", flip).map_err(fault)?;
            if let Some(upto) = purged_upto {
                let mut local = txn.open_table(LOCAL).map_err(fault)?;
                local.insert(LOCAL_LOG_PURGED, upto).map_err(fault)?;
            }
        }
        txn.commit().map_err(fault)?;
        self.state_made_durable();
        Ok(())
    }
}

fn put_meta(meta: &mut redb::Table<&str, &[u8]>, puts: &MetaWrites) -> StoreResult<()> {
    for (key, value) in puts {
        match value {
            Some(v) => {
                meta.insert(*key, v.as_slice()).map_err(fault)?;
            }
            None => {
                meta.remove(*key).map_err(fault)?;
            }
        }
    }
    Ok(())
}

pub(super) fn run(sh: Arc<Shared>, rx: Receiver<LogWrite>) {
    // An operation taken from the queue to learn whether the writer is idle.
    let mut next: Option<LogWrite> = None;
    loop {
        let first = match next.take() {
            Some(op) => op,
            None => match rx.recv() {
                Ok(op) => op,
                Err(_) => break,
            },
        };
        let io = locked(&sh.io);
        // Lazy metadata is taken before the queue is drained: every append it refers to was
        // queued before it (or written inline before it), so it is in this batch or an earlier
        // one, and durable once this batch's log writes are.
        let lazy_now = std::mem::take(&mut *locked(&sh.lazy));
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        let mut cut_short = false;
        loop {
            if batch.len() >= BATCH_OPS_MAX || bytes >= BATCH_BYTES_MAX {
                cut_short = true;
                break;
            }
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.bytes();
                    batch.push(op);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let lazy_now = if cut_short {
            // Its appends may still be queued: back it goes (unless set again meanwhile).
            let mut lazy = locked(&sh.lazy);
            for (k, v) in lazy_now {
                lazy.entry(k).or_insert(v);
            }
            MetaWrites::new()
        } else {
            lazy_now
        };
        #[cfg(test)]
        let _stalled = locked(&sh.stall);
        let n = batch.len();
        handle(&sh, batch, lazy_now);
        sh.queued.fetch_sub(n, Ordering::SeqCst);
        drop(io);
        match rx.try_recv() {
            Ok(op) => next = Some(op),
            // Idle: prepare the blocks the next small appends go to (after the completions, so
            // no submitter waits for it).
            Err(_) if locked(&sh.failed).is_none() => sh.wal.zero_ahead(),
            Err(_) => {}
        }
    }
}

/// Write `batch` (the caller holds `io`), then report to every submitter. The first failure
/// fails every later write.
fn handle(sh: &Shared, batch: Vec<LogWrite>, lazy_now: MetaWrites) {
    let failed = locked(&sh.failed).clone();
    let res = match failed {
        Some(why) => Err(format!("store failed earlier: {why}")),
        None => write_batch(sh, &batch, lazy_now).map_err(|e| e.0),
    };
    if let Err(why) = &res {
        let mut failed = locked(&sh.failed);
        if failed.is_none() {
            tracing::error!(error = %why, ops = batch.len(), "log write failed; the store stops accepting writes");
            sh.stats.failed.store(true, Ordering::SeqCst);
            *failed = Some(why.clone());
        }
    }
    for op in batch {
        op.finish(&res);
    }
}

/// Write a small append on the calling thread if the writer has nothing queued or in hand
/// (completion is reported before this returns); otherwise hand it back for the queue.
pub(super) fn write_inline(sh: &Shared, op: LogWrite) -> Option<LogWrite> {
    if !matches!(op, LogWrite::Append { .. }) || op.bytes() > INLINE_APPEND_BYTES_MAX {
        return Some(op);
    }
    // The writer holds `io` from taking a batch until it is written, and `queued` counts what it
    // has not written yet: with both free nothing submitted earlier is still unwritten.
    let Ok(io) = sh.io.try_lock() else { return Some(op) };
    if sh.queued.load(Ordering::SeqCst) != 0 {
        return Some(op);
    }
    #[cfg(test)]
    let Ok(_stalled) = sh.stall.try_lock() else { return Some(op) };
    let lazy_now = std::mem::take(&mut *locked(&sh.lazy));
    handle(sh, vec![op], lazy_now);
    if locked(&sh.failed).is_none() {
        sh.wal.zero_ahead();
    }
    drop(io);
    None
}

fn write_batch(sh: &Shared, batch: &[LogWrite], lazy_now: MetaWrites) -> StoreResult<()> {
    let mut puts = MetaWrites::new();
    let mut need_commit = false;
    let mut entries = 0u64;
    let mut entry_bytes = 0u64;
    // A batch with one append and no other log change can have that append made durable by its
    // own write (`Wal::append_durable`).
    let log_changes = batch.iter().filter(|op| !matches!(op, LogWrite::PutMeta { .. } | LogWrite::Sync { .. })).count();
    let single_append = log_changes == 1 && batch.iter().any(|op| matches!(op, LogWrite::Append { .. }));
    for op in batch {
        match op {
            LogWrite::Append { entries: es, .. } if single_append => {
                if sh.wal.append_durable(es)? {
                    sh.stats.log_commits.fetch_add(1, Ordering::Relaxed);
                }
                entries += es.len() as u64;
                entry_bytes += es.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            }
            LogWrite::Append { entries: es, .. } => {
                sh.wal.append(es)?;
                entries += es.len() as u64;
                entry_bytes += es.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            }
            LogWrite::PutMeta { key, value, .. } => {
                puts.insert(key, value.clone());
                need_commit = true;
            }
            LogWrite::Truncate { from, .. } => sh.wal.truncate(*from)?,
            LogWrite::Purge { upto, last_purged, .. } => {
                // last_purged <= durable last_applied: openraft purges only applied entries, and
                // this commit makes every apply so far durable before any entry goes.
                puts.insert("last_purged", Some(last_purged.clone()));
                sh.commit_meta(&puts, Some(*upto))?;
                puts.clear();
                sh.wal.purge(*upto)?;
            }
            LogWrite::Sync { .. } => need_commit = true,
        }
    }
    if sh.wal.sync()? {
        sh.stats.log_commits.fetch_add(1, Ordering::Relaxed);
    }
    sh.wal.release_cache();
    sh.stats.log_entries.fetch_add(entries, Ordering::Relaxed);
    sh.stats.log_bytes.fetch_add(entry_bytes, Ordering::Relaxed);
    if !lazy_now.is_empty() {
        let mut ready = locked(&sh.ready);
        ready.extend(lazy_now);
    }
    if need_commit || !puts.is_empty() {
        sh.commit_meta(&puts, None)?;
    }
    Ok(())
}

#[cfg(test)]
impl super::Store {
    /// Test hook: the log writer stalls (before its next batch) while the guard lives: a slow or
    /// stuck disk under this node's log.
    pub(crate) fn stall_log(&self) -> std::sync::MutexGuard<'_, ()> {
        locked(&self.inner.log.stall)
    }

    /// Test hook: the state was last made durable `ago` earlier than recorded (the flush
    /// interval passes without a test sleeping through it).
    pub(crate) fn age_durable_state(&self, ago: Duration) {
        let mut at = locked(&self.inner.log.durable_at);
        at.0 = at.0.checked_sub(ago).expect("the machine has been up longer than `ago`");
    }
}

//! The log writer thread: group commit of Raft log appends, votes, truncations and purges.
//!
//! Every write to the log side goes through one queue, so writes are applied in submission order
//! (openraft requires serialized log IO). The thread takes everything queued, writes it in ONE
//! `Durability::Immediate` transaction, then reports completion to every submitter. One fsync
//! therefore covers as many appends as arrived while the previous one was in flight.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use redb::{Database, Durability, ReadableTable};

use super::tables::{LOG, LOG_CHUNK_BYTES, RAFT_META};
use super::{fault, StoreStats};
use crate::state::{StoreFault, StoreResult};

/// Called once the operation is durable (or failed).
pub type Done = Box<dyn FnOnce(StoreResult<()>) + Send>;

/// Most operations taken into one commit.
const BATCH_OPS_MAX: usize = 4096;
/// Most entry bytes taken into one commit (a bound on the transaction's memory).
const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// One write to the log side of the store.
pub enum LogWrite {
    /// Append (or overwrite) entries `index -> encoded entry`.
    Append { entries: Vec<(u64, Vec<u8>)>, done: Done },
    /// Set (Some) or delete (None) one Raft metadata key (vote, committed). Without `done` the
    /// write is lazy: it goes into the next commit, whenever that happens.
    PutMeta { key: &'static str, value: Option<Vec<u8>>, done: Option<Done> },
    /// Delete entries with index >= `from`.
    Truncate { from: u64, done: Done },
    /// Delete entries with index <= `upto` and record `last_purged`.
    Purge { upto: u64, last_purged: Vec<u8>, done: Done },
    /// Make everything committed so far durable (also the state machine's non-durable commits).
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

/// Lazy metadata writes waiting for the next commit.
pub(super) type LazyMeta = Arc<Mutex<BTreeMap<&'static str, Option<Vec<u8>>>>>;

pub(super) fn run(db: Arc<Database>, rx: Receiver<LogWrite>, stats: Arc<StoreStats>, lazy: LazyMeta) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let mut bytes = first.bytes();
        let mut batch = vec![first];
        while batch.len() < BATCH_OPS_MAX && bytes < BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(op) => {
                    bytes += op.bytes();
                    batch.push(op);
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => break,
            }
        }
        let lazy_now = std::mem::take(&mut *lazy.lock().unwrap_or_else(|e| e.into_inner()));
        let res = match &failed {
            Some(why) => Err(format!("store failed earlier: {why}")),
            None => write_batch(&db, &lazy_now, &batch, &stats).map_err(|e| e.0),
        };
        if let Err(why) = &res {
            if failed.is_none() {
                tracing::error!(error = %why, ops = batch.len(), "log write failed; the store stops accepting writes");
                stats.failed.store(true, Ordering::SeqCst);
                failed = Some(why.clone());
            }
        }
        for op in batch {
            op.finish(&res);
        }
    }
}

fn write_batch(
    db: &Database,
    lazy: &BTreeMap<&'static str, Option<Vec<u8>>>,
    batch: &[LogWrite],
    stats: &StoreStats,
) -> StoreResult<()> {
    let mut txn = db.begin_write().map_err(fault)?;
    txn.set_durability(Durability::Immediate).map_err(fault)?;
    let mut entries = 0u64;
    let mut entry_bytes = 0u64;
    {
        let mut log = txn.open_table(LOG).map_err(fault)?;
        let mut meta = txn.open_table(RAFT_META).map_err(fault)?;
        for (key, value) in lazy {
            match value {
                Some(v) => {
                    meta.insert(*key, v.as_slice()).map_err(fault)?;
                }
                None => {
                    meta.remove(*key).map_err(fault)?;
                }
            }
        }
        for op in batch {
            match op {
                LogWrite::Append { entries: es, .. } => {
                    for (index, bytes) in es {
                        // An overwritten entry may have had more pieces.
                        log.retain_in((*index, 0u32)..=(*index, u32::MAX), |_, _| false).map_err(fault)?;
                        if bytes.is_empty() {
                            log.insert((*index, 0u32), &[][..]).map_err(fault)?;
                        }
                        for (part, piece) in bytes.chunks(LOG_CHUNK_BYTES).enumerate() {
                            log.insert((*index, part as u32), piece).map_err(fault)?;
                        }
                        entries += 1;
                        entry_bytes += bytes.len() as u64;
                    }
                }
                LogWrite::PutMeta { key, value, .. } => match value {
                    Some(v) => {
                        meta.insert(*key, v.as_slice()).map_err(fault)?;
                    }
                    None => {
                        meta.remove(*key).map_err(fault)?;
                    }
                },
                LogWrite::Truncate { from, .. } => {
                    log.retain_in((*from, 0u32).., |_, _| false).map_err(fault)?;
                }
                LogWrite::Purge { upto, last_purged, .. } => {
                    log.retain_in(..=(*upto, u32::MAX), |_, _| false).map_err(fault)?;
                    meta.insert("last_purged", last_purged.as_slice()).map_err(fault)?;
                }
                LogWrite::Sync { .. } => {
                    // Write something so the commit is never elided as empty.
                    let n = meta.get("sync").map_err(fault)?.map(|v| v.value().len()).unwrap_or(0);
                    let flip: &[u8] = if n == 0 { &[1] } else { &[] };
                    meta.insert("sync", flip).map_err(fault)?;
                }
            }
        }
    }
    txn.commit().map_err(fault)?;
    stats.log_commits.fetch_add(1, Ordering::Relaxed);
    stats.log_entries.fetch_add(entries, Ordering::Relaxed);
    stats.log_bytes.fetch_add(entry_bytes, Ordering::Relaxed);
    Ok(())
}

//! openraft storage traits over the store: log storage with group commit, the state machine,
//! file-backed snapshots.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use super::{Applied, Response, Touch, TypeConfig};
use crate::state::{Command, CommandResult, Digested, Ino, LockFence, NodeId, Op, StateRead, StoreFault, StoreResult};

use crate::store::codec::{blob_positions, decode, encode, encode_sized};
use crate::store::{Located, LOCATE_BYTES_MIN};
use crate::store::{LogWrite, PinnedSnapshot, StateTxn, Store};

type SE = StorageError<NodeId>;
type Ent = Entry<TypeConfig>;

const META_VOTE: &str = "vote";
const META_COMMITTED: &str = "committed";
const META_PURGED: &str = "last_purged";
const SM_APPLIED: &str = "applied";
const SM_MEMBERSHIP: &str = "membership";

fn log_err(what: &str, e: impl std::fmt::Display) -> SE {
    tracing::error!(error = %e, "storage fault while {what}; raft stops (fail-stop)");
    StorageIOError::write_logs(AnyError::error(format!("{what}: {e}"))).into()
}

fn sm_err(what: &str, e: impl std::fmt::Display) -> SE {
    tracing::error!(error = %e, "storage fault while {what}; raft stops (fail-stop)");
    StorageIOError::write_state_machine(AnyError::error(format!("{what}: {e}"))).into()
}

fn read_err(what: &str, e: impl std::fmt::Display) -> SE {
    tracing::error!(error = %e, "storage fault while {what}");
    StorageIOError::read_logs(AnyError::error(format!("{what}: {e}"))).into()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> StoreResult<T> + Send + 'static) -> StoreResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreFault(format!("blocking task failed: {e}")))?
}

/// Apply one command (its payload hashed beforehand): the pure state machine over the store
/// transaction.
fn apply_command(t: &mut StateTxn<'_>, cmd: &Digested<'_>) -> StoreResult<CommandResult> {
    crate::state::apply_digested(t, cmd)
}

/// Payload bytes in one apply call from which its hashing is split over two threads.
pub const PARALLEL_HASH_BYTES_MIN: usize = 1024 * 1024;

/// Hash the payload of every command of `entries` (apply's check, decision 5), one list per entry.
/// Done before apply's write transaction opens: the store has one writer at a time, so the log
/// writer can commit the next entry meanwhile. A large apply is hashed on two threads.
fn digest_entries(entries: &[Ent]) -> Vec<Vec<Digested<'_>>> {
    // This node's own batches, still in memory, carry the digests their proposers computed from
    // the same bytes (`Batch::digests`): only the others (read from the log, received from a peer)
    // are hashed here.
    let mut flat: Vec<Option<Digested<'_>>> = Vec::new();
    let mut cmds: Vec<&Command> = Vec::new();
    for e in entries {
        let EntryPayload::Normal(batch) = &e.payload else { continue };
        match batch.digests() {
            Some(digests) if digests.len() == batch.0.len() => {
                flat.extend(batch.0.iter().zip(digests).map(|(c, d)| Some(Digested::trusted(c, d))));
            }
            _ => {
                for c in batch.0.iter() {
                    cmds.push(c);
                    flat.push(None);
                }
            }
        }
    }
    let bytes: usize = cmds.iter().map(|c| c.op.payload().len()).sum();
    let hashed: Vec<Digested<'_>> = if cmds.len() > 1 && bytes >= PARALLEL_HASH_BYTES_MIN {
        // Split at half the bytes, so both threads get about the same work.
        let mut acc = 0;
        let mid = cmds.iter().position(|c| {
            acc += c.op.payload().len();
            acc * 2 >= bytes
        });
        let mid = mid.map_or(cmds.len() / 2, |m| (m + 1).min(cmds.len() - 1));
        let (a, b) = cmds.split_at(mid);
        std::thread::scope(|s| {
            let other = s.spawn(|| b.iter().map(|c| Digested::new(c)).collect::<Vec<_>>());
            let mut out: Vec<Digested<'_>> = a.iter().map(|c| Digested::new(c)).collect();
            match other.join() {
                Ok(rest) => out.extend(rest),
                // The hashing thread cannot fail short of a bug; hash here instead.
                Err(_) => out.extend(b.iter().map(|c| Digested::new(c))),
            }
            out
        })
    } else {
        cmds.iter().map(|c| Digested::new(c)).collect()
    };
    // The hashed ones fill the gaps, in order.
    let mut hashed = hashed.into_iter();
    let mut flat: Vec<Digested<'_>> = flat.into_iter().filter_map(|d| d.or_else(|| hashed.next())).collect();
    let mut out = Vec::with_capacity(entries.len());
    for e in entries.iter().rev() {
        let n = match &e.payload {
            EntryPayload::Normal(batch) => batch.0.len(),
            _ => 0,
        };
        out.push(flat.split_off(flat.len() - n));
    }
    out.reverse();
    out
}

// ------------------------------------------------------------------------------------------ log

/// Durable entries kept in memory until applied, at most this many encoded bytes: apply reads the
/// entries it just committed from here instead of reading (copying) and decoding them from the log.
/// Twice the full batches (BATCH_PAYLOAD_BYTES_MAX, plus encoding overhead) that can be in flight
/// plus one fit: the slower of two followers runs up to about two batches behind the faster one,
/// which was right at the edge of a bound of one times; once past it, that follower read every
/// entry back from the log for the rest of the write (1 to 3 of 6 measured 256 MiB writes, 7-20%
/// of the leader's CPU; none of 8 at twice). The payload is shared with the entries openraft holds
/// for those batches anyway (`Batch` is reference-counted), so this costs little memory of its
/// own (leader peak RSS 109-128 MiB in that write); before entries were shared, 16 MiB pushed
/// the peak RSS of a 256 MiB write of distinct data over 150 MiB.
pub const RECENT_BYTES_MAX: usize = 2 * (super::BATCHES_IN_FLIGHT_MAX + 1) * (super::BATCH_PAYLOAD_BYTES_MAX + 64 * 1024);

/// Entries in memory: `pending` (appended, not yet durable: the only readable copy) and `recent`
/// (durable, not yet applied; a copy of what the log holds, dropped when applied or when over
/// `RECENT_BYTES_MAX`, oldest first).
/// On a leader of others an applied entry stays in `recent` until every follower that is within
/// the cache has it (`followers`): their replication streams read it from here, not back from
/// the log (a 256 MiB write on a 3-node cluster read ~9% of all CPU back from the log for the
/// follower that answered second).
#[derive(Default)]
pub struct EntryCache {
    pending: BTreeMap<u64, (Ent, usize)>,
    recent: BTreeMap<u64, (Ent, usize)>,
    recent_bytes: usize,
    /// The highest index applied on this node.
    applied: u64,
    /// The highest index each follower has (leader of others only; empty elsewhere).
    followers: Vec<u64>,
}

/// The entry cache a `LogStore` and its `StateMachine` share.
pub type SharedEntryCache = Arc<Mutex<EntryCache>>;

impl EntryCache {
    /// Drop every entry with index >= `from` (truncate).
    fn drop_from(&mut self, from: u64) {
        let _ = self.pending.split_off(&from);
        let gone = self.recent.split_off(&from);
        self.recent_bytes -= gone.values().map(|(_, n)| n).sum::<usize>();
    }

    /// Drop every entry with index <= `upto` (purge, or applied).
    fn drop_upto(&mut self, upto: u64, pending_too: bool) {
        if pending_too {
            self.pending = self.pending.split_off(&(upto + 1));
        }
        let keep = self.recent.split_off(&(upto + 1));
        let gone = std::mem::replace(&mut self.recent, keep);
        self.recent_bytes -= gone.values().map(|(_, n)| n).sum::<usize>();
    }

    /// Drop the entries that are applied and that no follower within the cache still needs. A
    /// follower behind the cache's first entry reads from the log anyway and is not waited for.
    fn release(&mut self) {
        let Some(&first) = self.recent.keys().next() else { return };
        let mut upto = self.applied;
        for &m in &self.followers {
            if m.saturating_add(1) >= first {
                upto = upto.min(m);
            }
        }
        self.drop_upto(upto, false);
    }

    /// This node leads others, which have the log up to `matched` (one per follower); none when
    /// it does not.
    pub fn set_followers(&mut self, matched: impl IntoIterator<Item = u64>) {
        self.followers.clear();
        self.followers.extend(matched);
        self.release();
    }

    /// `id` became durable: move it from pending to recent (if it was not replaced meanwhile).
    fn durable(&mut self, id: &LogId<NodeId>, ok: bool) {
        if self.pending.get(&id.index).is_none_or(|(e, _)| e.log_id != *id) {
            return;
        }
        let Some((e, n)) = self.pending.remove(&id.index) else { return };
        if !ok {
            return;
        }
        if let Some((_, old)) = self.recent.insert(id.index, (e, n)) {
            self.recent_bytes -= old;
        }
        self.recent_bytes += n;
        while self.recent_bytes > RECENT_BYTES_MAX {
            let Some((_, (_, n))) = self.recent.pop_first() else { break };
            self.recent_bytes -= n;
        }
    }
}

/// Encoded bytes per command beyond its payload, about (header, caller, op fields), so that an
/// entry's encoding buffer is allocated once.
const COMMAND_OVERHEAD_BYTES: usize = 256;

/// About the encoded size of `e` (at least its payload bytes).
fn encoded_size_hint(e: &Ent) -> usize {
    match &e.payload {
        EntryPayload::Normal(batch) => {
            batch.0.iter().map(|c| c.op.payload().len() + COMMAND_OVERHEAD_BYTES).sum::<usize>() + COMMAND_OVERHEAD_BYTES
        }
        _ => COMMAND_OVERHEAD_BYTES,
    }
}

/// Raft log storage. Appends are queued to the store's writer thread (group commit); until they
/// are durable they stay readable from the cache's `pending`, and until applied from its `recent`.
#[derive(Clone)]
pub struct LogStore {
    store: Store,
    cache: Arc<Mutex<EntryCache>>,
}

impl LogStore {
    pub fn new(store: Store) -> Self {
        LogStore { store, cache: Default::default() }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry cache, shared (the replica tells it where the followers are).
    pub fn entry_cache(&self) -> SharedEntryCache {
        self.cache.clone()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Ent>, SE> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        // The cache first: an entry leaves `pending` only after it is in the log, so reading in this
        // order never misses one.
        let mut out: BTreeMap<u64, Ent> = BTreeMap::new();
        {
            let c = self.cache();
            for (k, (e, _)) in c.pending.range(bounds).chain(c.recent.range(bounds)) {
                out.entry(*k).or_insert_with(|| e.clone());
            }
        }
        // Everything asked for is in memory (the usual case for apply): skip the log.
        let lo = match bounds.0 {
            Bound::Included(a) => a,
            Bound::Excluded(a) => a.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let hi = match bounds.1 {
            Bound::Included(b) => Some(b.saturating_add(1)),
            Bound::Excluded(b) => Some(b),
            Bound::Unbounded => None,
        };
        if let Some(hi) = hi {
            if hi <= lo || out.len() as u64 == hi - lo {
                return Ok(out.into_values().collect());
            }
        }
        let rows = self.store.read_log(bounds).map_err(|e| read_err("reading the log", e))?;
        for (index, bytes) in rows {
            if out.contains_key(&index) {
                continue;
            }
            let e: Ent = decode(&bytes).map_err(|e| read_err("decoding a log entry", e))?;
            if e.log_id.index != index {
                return Err(read_err("reading the log", format!("entry at {index} has log id {}", e.log_id)));
            }
            out.insert(index, e);
        }
        Ok(out.into_values().collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SE> {
        let last_pending = self.cache().pending.values().next_back().map(|(e, _)| e.log_id);
        let last_purged: Option<LogId<NodeId>> = match self.store.raft_meta(META_PURGED).map_err(|e| read_err("reading last_purged", e))? {
            Some(b) => Some(decode(&b).map_err(|e| read_err("decoding last_purged", e))?),
            None => None,
        };
        let last_stored = match self.store.last_log().map_err(|e| read_err("reading the log", e))? {
            Some((_, b)) => Some(decode::<Ent>(&b).map_err(|e| read_err("decoding a log entry", e))?.log_id),
            None => None,
        };
        let last = last_pending.max(last_stored).or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SE> {
        let bytes = encode(vote).map_err(|e| log_err("encoding the vote", e))?;
        self.store
            .submit_wait(|done| LogWrite::PutMeta { key: META_VOTE, value: Some(bytes), done: Some(done) })
            .await
            .map_err(|e| log_err("saving the vote", e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SE> {
        match self.store.raft_meta(META_VOTE).map_err(|e| read_err("reading the vote", e))? {
            Some(b) => Ok(Some(decode(&b).map_err(|e| read_err("decoding the vote", e))?)),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SE> {
        // Not waited for: `committed` is an optimisation (faster re-apply after restart); it is
        // written, in order, with the next log commit.
        let value = match committed {
            Some(c) => Some(encode(&c).map_err(|e| log_err("encoding committed", e))?),
            None => None,
        };
        self.store.submit(LogWrite::PutMeta { key: META_COMMITTED, value, done: None });
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SE> {
        match self.store.raft_meta(META_COMMITTED).map_err(|e| read_err("reading committed", e))? {
            Some(b) => Ok(Some(decode(&b).map_err(|e| read_err("decoding committed", e))?)),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SE>
    where
        I: IntoIterator<Item = Ent> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut ids = Vec::new();
        // Encode before taking the cache lock (apply takes it too): an entry carries MiBs.
        let mut encoded = Vec::new();
        for e in entries {
            let bytes = encode_sized(&e, encoded_size_hint(&e)).map_err(|err| log_err("encoding a log entry", err))?;
            encoded.push((e, bytes));
        }
        {
            let mut cache = self.cache();
            for (e, bytes) in encoded {
                ids.push(e.log_id);
                rows.push((e.log_id.index, bytes));
                let n = rows[rows.len() - 1].1.len();
                cache.pending.insert(e.log_id.index, (e, n));
            }
        }
        let cache = self.cache.clone();
        self.store.submit(LogWrite::Append {
            entries: rows,
            done: Box::new(move |res| {
                {
                    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
                    for id in &ids {
                        c.durable(id, res.is_ok());
                    }
                }
                callback.log_io_completed(res.map_err(|e| io::Error::other(e.0)));
            }),
        });
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        self.cache().drop_from(log_id.index);
        self.store
            .submit_wait(|done| LogWrite::Truncate { from: log_id.index, done })
            .await
            .map_err(|e| log_err("truncating the log", e))
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SE> {
        self.cache().drop_upto(log_id.index, true);
        let last_purged = encode(&log_id).map_err(|e| log_err("encoding last_purged", e))?;
        // The store makes every earlier (non-durable) apply durable before any entry goes, so the
        // purged entries are covered by durable state (last_purged <= durable last_applied).
        self.store
            .submit_wait(|done| LogWrite::Purge { upto: log_id.index, last_purged, done })
            .await
            .map_err(|e| log_err("purging the log", e))
    }
}

// ------------------------------------------------------------------------------- snapshot file

/// Snapshot data: a file in the store's snapshot directory (never the whole state in RAM). A
/// snapshot this node took (`Store::pin_snapshot`) is only a pinned read transaction until its
/// data is read: the first read or seek writes it out (`Store::write_out`, on a blocking thread,
/// in the task that reads it: openraft's transfer to a follower, so applies go on meanwhile).
pub struct SnapshotFile {
    file: Lazy,
    path: PathBuf,
    /// A snapshot being received and not handed to `install_snapshot`: openraft drops it when
    /// a transfer is aborted (leader change, timeout), and its file goes with it.
    discard_on_drop: bool,
    /// Keeps the snapshot (and its file) alive while this reads it.
    _pin: Option<Arc<PinnedSnapshot>>,
}

type Opening = Pin<Box<dyn std::future::Future<Output = io::Result<(tokio::fs::File, PathBuf)>> + Send>>;

enum Lazy {
    Open(tokio::fs::File),
    /// Being written out and opened; a seek asked for meanwhile is started once it is open.
    Opening(Opening, Option<io::SeekFrom>),
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if !self.discard_on_drop {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed an unfinished snapshot transfer"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot remove an unfinished snapshot transfer"),
        }
    }
}

impl SnapshotFile {
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The data of `pin`, written out at the first read or seek.
    fn of(store: &Store, pin: Arc<PinnedSnapshot>) -> SnapshotFile {
        let (store, p) = (store.clone(), pin.clone());
        let opening: Opening = Box::pin(async move {
            let info = blocking(move || store.write_out(&p)).await.map_err(|e| io::Error::other(e.0))?;
            Ok((tokio::fs::File::open(&info.path).await?, info.path))
        });
        SnapshotFile { file: Lazy::Opening(opening, None), path: PathBuf::new(), discard_on_drop: false, _pin: Some(pin) }
    }

    /// Drive a pending write-out to the open file.
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut tokio::fs::File>> {
        if let Lazy::Opening(fut, seek) = &mut self.file {
            let (mut file, path) = std::task::ready!(fut.as_mut().poll(cx))?;
            if let Some(pos) = seek.take() {
                Pin::new(&mut file).start_seek(pos)?;
            }
            self.path = path;
            self.file = Lazy::Open(file);
        }
        match &mut self.file {
            Lazy::Open(f) => Poll::Ready(Ok(f)),
            Lazy::Opening(..) => unreachable!("opened above"),
        }
    }

    fn open_file(&mut self) -> io::Result<&mut tokio::fs::File> {
        match &mut self.file {
            Lazy::Open(f) => Ok(f),
            Lazy::Opening(..) => Err(io::Error::other("snapshot data not written out yet")),
        }
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let f = std::task::ready!(self.poll_open(cx))?;
        Pin::new(f).poll_read(cx, buf)
    }
}

// Only a received snapshot (always open) is written.
impl AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.open_file() {
            Ok(f) => Pin::new(f).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.open_file() {
            Ok(f) => Pin::new(f).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.open_file() {
            Ok(f) => Pin::new(f).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: io::SeekFrom) -> io::Result<()> {
        match &mut self.file {
            Lazy::Open(f) => Pin::new(f).start_seek(position),
            Lazy::Opening(_, seek) => {
                *seek = Some(position);
                Ok(())
            }
        }
    }
    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        let f = std::task::ready!(self.poll_open(cx))?;
        Pin::new(f).poll_complete(cx)
    }
}

// ----------------------------------------------------------------------------- state machine

/// Where apply sends `Applied` events: the one subscriber, if any (`Replica::subscribe_applied`),
/// and the index of the last event sent.
pub type AppliedSlot = Arc<EventSlot>;

/// The subscriber of `Applied` events and what has been sent to it. Only apply calls that touched
/// something send an event (most rounds touch nothing: local commands), so the subscriber is not
/// woken for nothing; `last_event` tells a waiter that nothing after it needs handling.
#[derive(Default)]
pub struct EventSlot {
    tx: Mutex<Option<Subscriber>>,
    /// The index of the last event sent (0: none). Stored before the apply call returns, so
    /// before openraft counts its entries as applied.
    last_event: AtomicU64,
}

/// Which touches a subscriber wants (`Replica::subscribe_applied`).
pub type TouchFilter = Box<dyn Fn(&Touch) -> bool + Send + Sync>;

struct Subscriber {
    tx: tokio::sync::mpsc::UnboundedSender<Applied>,
    wants: TouchFilter,
}

impl EventSlot {
    /// Send events to `tx` from now on (replacing any earlier subscriber), with only the touches
    /// `wants` keeps; an apply whose touches it all drops sends no event.
    pub fn subscribe(&self, tx: tokio::sync::mpsc::UnboundedSender<Applied>, wants: TouchFilter) {
        *self.tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(Subscriber { tx, wants });
    }

    /// The index of the last event sent (0 if none).
    pub fn last_event(&self) -> u64 {
        self.last_event.load(Ordering::Acquire)
    }

    fn listening(&self) -> bool {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// Where a proposer waits for its command's result.
pub type Reply = tokio::sync::oneshot::Sender<Result<CommandResult, super::ProposeError>>;

/// The proposers of this node waiting for their commands, by sequence number. Apply answers a
/// command of this node as soon as its transaction has committed, straight from openraft's
/// state-machine task: the proposer does not wait for openraft to take the apply result back to
/// its core, answer the client write, and for the batch's task to fan the results out (on a
/// follower, not for the leader's `Forward` reply either). Whoever takes a waiter out answers it
/// (apply with the result, or the batch's task with the result or the error): exactly once.
#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<std::collections::HashMap<u64, Reply>>,
    /// The last index applied by apply calls, stored before their proposers are answered: a
    /// proposer answered here may look at the applied index before openraft has counted the
    /// entry as applied (see `Replica::applied_index`).
    applied: AtomicU64,
}

impl Waiters {
    /// The last index applied by an apply call (0: none since start).
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// `reply` waits for the command numbered `seq` from this node.
    pub fn insert(&self, seq: u64, reply: Reply) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(seq, reply);
    }

    /// The waiter of `seq`, if nobody answered it yet.
    pub fn take(&self, seq: u64) -> Option<Reply> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&seq)
    }

    /// Answer the waiters of this node's (`me`) commands in `entries` with their `results`.
    fn answer(&self, me: NodeId, entries: &[Ent], results: &[Response]) {
        let mut answered = Vec::new();
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if waiting.is_empty() {
                return;
            }
            for (e, resp) in entries.iter().zip(results) {
                if let EntryPayload::Normal(batch) = &e.payload {
                    for (cmd, res) in batch.0.iter().zip(&resp.0) {
                        if cmd.origin == me {
                            if let Some(reply) = waiting.remove(&cmd.seq) {
                                answered.push((reply, res.clone()));
                            }
                        }
                    }
                }
            }
        }
        for (reply, res) in answered {
            // A proposer that gave up (deadline) has dropped its receiver.
            let _ = reply.send(Ok(res));
        }
    }
}

/// The replicated state machine over the store.
#[derive(Clone)]
pub struct StateMachine {
    store: Store,
    /// The log's entry cache: applied entries are dropped from it.
    log_cache: Option<Arc<Mutex<EntryCache>>>,
    /// This node and the subscriber to tell what remote commands touched.
    events: Option<(NodeId, AppliedSlot)>,
    /// This node and its proposers waiting for their commands.
    waiters: Option<(NodeId, Arc<Waiters>)>,
    /// Told after every apply call that may have released an advisory lock, from any node
    /// (waiting lock requests of that inode ask again then).
    lock_changes: Option<super::LockChanges>,
    /// This node and its lock fence as the state records it (`LockFences`), republished after
    /// every apply call that may change it and after a snapshot install.
    own_fence: Option<(NodeId, tokio::sync::watch::Sender<LockFence>)>,
}

impl StateMachine {
    pub fn new(store: Store) -> Self {
        StateMachine { store, log_cache: None, events: None, waiters: None, lock_changes: None, own_fence: None }
    }

    /// A state machine that drops what it applied from `log`'s in-memory entry cache.
    pub fn with_log(store: Store, log: &LogStore) -> Self {
        StateMachine { store, log_cache: Some(log.cache.clone()), events: None, waiters: None, lock_changes: None, own_fence: None }
    }

    /// Also answer the commands of `node` waiting in `waiters` as soon as they are applied.
    pub fn with_waiters(mut self, node: NodeId, waiters: Arc<Waiters>) -> Self {
        self.waiters = Some((node, waiters));
        self
    }

    /// Tell `changes` of every inode whose locks an apply call may have released.
    pub fn with_lock_changes(mut self, changes: super::LockChanges) -> Self {
        self.lock_changes = Some(changes);
        self
    }

    /// Publish `node`'s lock fence to `tx` (now, and whenever apply may change it).
    pub fn with_own_fence(mut self, node: NodeId, tx: tokio::sync::watch::Sender<LockFence>) -> Self {
        self.own_fence = Some((node, tx));
        self.publish_own_fence();
        self
    }

    /// Read this node's lock fence from the state and publish it if it changed. A read error is
    /// logged and the old value kept (the next change of it publishes again).
    fn publish_own_fence(&self) {
        let Some((node, tx)) = &self.own_fence else { return };
        let fence = match self.store.read().and_then(|v| v.lock_fences()) {
            Ok(f) => f.0.get(node).cloned().unwrap_or_default(),
            Err(e) => {
                tracing::error!(error = %e, "reading this node's lock fence");
                return;
            }
        };
        tx.send_if_modified(|old| {
            let changed = *old != fence;
            *old = fence;
            changed
        });
    }

    fn locks_changed(&self, what: super::LockChange) {
        if let Some(tx) = &self.lock_changes {
            // No receiver (nobody waits) is no error.
            let _ = tx.send(what);
        }
    }

    /// Hand `event` to the subscriber, if any, with the touches it wants (nothing if it wants
    /// none); never blocks (the channel is unbounded).
    fn send_event(&self, mut event: Applied) {
        if let Some((_, slot)) = &self.events {
            let mut tx = slot.tx.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(sub) = tx.as_ref() {
                event.touched.retain(|t| (sub.wants)(t));
                if event.touched.is_empty() {
                    return;
                }
                let index = event.index;
                if sub.tx.send(event).is_err() {
                    *tx = None;
                }
                slot.last_event.fetch_max(index, Ordering::AcqRel);
            }
        }
    }

    /// Also send an `Applied` event after each apply call in which commands from nodes other than
    /// `node` touched something, to the subscriber in `slot` (if any).
    pub fn with_events(mut self, node: NodeId, slot: AppliedSlot) -> Self {
        self.events = Some((node, slot));
        self
    }
}

/// What `cmd` (from another node) is about to touch, looked up in the state before it applies:
/// the touches, and the inodes that may become orphans (checked after it applied).
fn touches_before(t: &StateTxn<'_>, cmd: &Command) -> StoreResult<(Vec<Touch>, Vec<Ino>)> {
    let entry_ino = |parent: Ino, name: &[u8]| -> StoreResult<Option<Ino>> { Ok(t.entry(parent, name)?.map(|e| e.ino)) };
    let mut out = Vec::new();
    let mut victims = Vec::new();
    match &cmd.op {
        Op::MakeNode { parent, name, .. } | Op::MakeNodeUnmasked { parent, name, .. } | Op::Symlink { parent, name, .. } => {
            out.push(Touch::Entry { parent: *parent, name: name.clone(), old: None });
            out.push(Touch::Inode(*parent));
        }
        Op::Link { ino, new_parent, new_name } => {
            out.push(Touch::Entry { parent: *new_parent, name: new_name.clone(), old: None });
            out.push(Touch::Inode(*new_parent));
            out.push(Touch::Inode(*ino));
        }
        Op::Unlink { parent, name, .. } | Op::Rmdir { parent, name } => {
            let old = entry_ino(*parent, name)?;
            out.push(Touch::Entry { parent: *parent, name: name.clone(), old });
            out.push(Touch::Inode(*parent));
            if let Some(v) = old {
                out.push(Touch::Inode(v));
                victims.push(v);
            }
        }
        Op::Rename { parent, name, new_parent, new_name, .. } => {
            let src = entry_ino(*parent, name)?;
            let dst = entry_ino(*new_parent, new_name)?;
            out.push(Touch::Entry { parent: *parent, name: name.clone(), old: src });
            out.push(Touch::Entry { parent: *new_parent, name: new_name.clone(), old: dst });
            out.push(Touch::Inode(*parent));
            if new_parent != parent {
                out.push(Touch::Inode(*new_parent));
            }
            // The moved inode's ctime (and a directory's `..`) change; a replaced one loses a link.
            out.extend(src.map(Touch::Inode));
            if let Some(d) = dst {
                out.push(Touch::Inode(d));
                victims.push(d);
            }
        }
        Op::SetAttr { ino, .. }
        | Op::Write { ino, .. }
        | Op::Fallocate { ino, .. }
        | Op::SetXattr { ino, .. }
        | Op::RemoveXattr { ino, .. } => out.push(Touch::Inode(*ino)),
        Op::CopyRange { ino_out, .. } => out.push(Touch::Inode(*ino_out)),
        // Locks change no attributes the kernel caches (waiters hear of them through
        // `StateMachine::with_lock_changes`).
        Op::Init { .. }
        | Op::RegisterNode { .. }
        | Op::UnregisterNode { .. }
        | Op::Release { .. }
        | Op::Lock { .. }
        | Op::ReleaseLocks { .. }
        | Op::DropStaleLocks { .. }
        | Op::ExpireLocks { .. }
        | Op::AckLockExpiry { .. } => {}
    }
    Ok((out, victims))
}

/// Payload bytes of one apply call below which it runs inline on openraft's state-machine task
/// instead of on a blocking thread (see `apply`); at this size its hashing takes about 0.5 ms.
pub const INLINE_APPLY_BYTES_MAX: usize = 256 * 1024;

/// The inodes whose locks the commands of `entries` may have released (any lock command: a
/// change may be a downgrade or a split), or `Any` for a node's earlier runs, its removal or its
/// expired lease; each inode once. And whether they may have changed a node's lock fence
/// (`LockFences`: an expiry, an acknowledgement, a new run, a removal). An expiry of `me`'s
/// locks (this node) is logged here (its files are fenced by fs/fences.rs).
fn lock_changes(entries: &[Ent], me: Option<NodeId>) -> (Vec<super::LockChange>, bool) {
    let mut out = Vec::new();
    let mut fences = false;
    for e in entries {
        if let EntryPayload::Normal(batch) = &e.payload {
            for c in batch.0.iter() {
                fences |= matches!(
                    c.op,
                    Op::ExpireLocks { .. } | Op::AckLockExpiry { .. } | Op::DropStaleLocks { .. } | Op::UnregisterNode { .. }
                );
                let what = match c.op {
                    Op::Lock { ino, .. } | Op::ReleaseLocks { ino, .. } => super::LockChange::Inode(ino),
                    Op::ExpireLocks { node, incarnation } => {
                        if Some(node) == me {
                            tracing::warn!(
                                incarnation,
                                leader = c.origin,
                                "the leader did not hear from this node for the lock lease: its locks up to this incarnation expired (their files are fenced here)"
                            );
                        }
                        super::LockChange::Any
                    }
                    Op::DropStaleLocks { .. } | Op::UnregisterNode { .. } => super::LockChange::Any,
                    _ => continue,
                };
                if !out.contains(&what) {
                    out.push(what);
                }
            }
        }
    }
    (out, fences)
}

/// The payload bytes of the commands in `e`.
fn payload_bytes(e: &Ent) -> usize {
    match &e.payload {
        EntryPayload::Normal(batch) => batch.0.iter().map(|c| c.op.payload().len()).sum(),
        _ => 0,
    }
}

/// Where the log holds the data of `e`'s large writes, if its record is durable here: the store
/// then keeps those blocks where the log wrote them instead of writing them again
/// (store/blobs.rs). The offsets come from encoding `e` again (no copy), as `append` encoded it;
/// a length that does not match the record's means another encoding, and nothing is located.
fn located(store: &Store, e: &Ent) -> Vec<Located> {
    let EntryPayload::Normal(batch) = &e.payload else { return Vec::new() };
    let large = |c: &Command| matches!(&c.op, Op::Write { data, .. } if data.len() >= LOCATE_BYTES_MIN);
    if !batch.0.iter().any(large) {
        return Vec::new();
    }
    let Some((seg, off, len)) = store.durable_record(e.log_id.index) else { return Vec::new() };
    match blob_positions(e, LOCATE_BYTES_MIN) {
        Ok((total, found)) if total == len as usize => found
            .into_iter()
            .map(|(ptr, len, at)| Located { ptr, len, seg, off: off + at as u64 })
            .collect(),
        Ok((total, _)) => {
            tracing::warn!(index = e.log_id.index, encoded = total, record = len, "log record length differs from the entry's encoding; its blocks go to the state file");
            Vec::new()
        }
        Err(err) => {
            tracing::warn!(index = e.log_id.index, error = %err, "encoding an entry to locate its data failed; its blocks go to the state file");
            Vec::new()
        }
    }
}

/// Apply `entries` in one state transaction (touches listed for node `me`, if it listens):
/// their responses, and what commands from other nodes touched. Blocking (redb).
fn apply_entries(store: &Store, entries: &[Ent], me: Option<NodeId>) -> StoreResult<(Vec<Response>, Vec<Touch>)> {
    let digests = digest_entries(entries);
    store.write_state(false, |t| {
        let mut out = Vec::with_capacity(entries.len());
        let mut touched = Vec::new();
        let mut last = None;
        for (e, digested) in entries.iter().zip(&digests) {
            match &e.payload {
                EntryPayload::Blank => out.push(Response(Vec::new())),
                EntryPayload::Normal(batch) => {
                    t.set_located(located(store, e));
                    let mut results = Vec::with_capacity(batch.0.len());
                    for d in digested {
                        let cmd = d.command();
                        // A retry (result stored) changes nothing and was reported already.
                        let watch = match me {
                            Some(me) if cmd.origin != me && t.result(cmd.origin, cmd.seq)?.is_none() => {
                                Some((me, touches_before(t, cmd)?))
                            }
                            _ => None,
                        };
                        let res = apply_command(t, d)?;
                        if let (Some((me, (touches, victims))), true) = (watch, res.is_ok()) {
                            touched.extend(touches);
                            for v in victims {
                                if t.orphan(v)?.is_some_and(|o| o.pending.contains(&me)) {
                                    touched.push(Touch::Orphan(v));
                                }
                            }
                        }
                        results.push(res);
                    }
                    t.set_located(Vec::new());
                    out.push(Response(results));
                }
                EntryPayload::Membership(m) => {
                    let sm = StoredMembership::new(Some(e.log_id), m.clone());
                    t.put_sm_meta(SM_MEMBERSHIP, &encode(&sm)?)?;
                    out.push(Response(Vec::new()));
                }
            }
            last = Some(e.log_id);
        }
        t.put_sm_meta(SM_APPLIED, &encode(&last)?)?;
        Ok((out, touched))
    })
}

/// The last applied log id and the last applied membership.
type AppliedState = (Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>);

pub(super) fn read_applied(view: &crate::store::ReadView) -> StoreResult<AppliedState> {
    let applied = match view.sm_meta(SM_APPLIED)? {
        Some(b) => decode(&b)?,
        None => None,
    };
    let membership = match view.sm_meta(SM_MEMBERSHIP)? {
        Some(b) => decode(&b)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

/// At start, before openraft reads the state: if the current snapshot is newer than the state,
/// an install was interrupted (the received file is adopted, then loaded into the state in one
/// transaction: a crash or a stop during the load, minutes for a large state, left the new file
/// and the old state). openraft requires the snapshot to be no newer than what is applied (its
/// core panicked, and the node could not restart), and the log lacks what lies between (that is
/// why a snapshot was sent), so the snapshot is loaded again (installing is idempotent).
/// Returns whether it did. Blocking.
pub fn resume_snapshot_install(store: &Store) -> StoreResult<bool> {
    let Some(info) = store.take_found_snapshot() else { return Ok(false) };
    let meta: SnapshotMeta<NodeId, openraft::BasicNode> = decode(&info.header)?;
    let (applied, _) = read_applied(&store.read()?)?;
    if meta.last_log_id <= applied {
        // A snapshot written out for a follower in an earlier run: the state covers it.
        store.discard_found_snapshot(&info);
        return Ok(false);
    }
    tracing::warn!(
        id = %meta.snapshot_id,
        snapshot_last = ?meta.last_log_id,
        applied = ?applied,
        "the current snapshot is newer than the state (an install was interrupted): installing it again"
    );
    let sm_meta = vec![(SM_APPLIED, encode(&meta.last_log_id)?), (SM_MEMBERSHIP, encode(&meta.last_membership)?)];
    store.install_snapshot(&info.path, &meta.snapshot_id, &sm_meta)?;
    Ok(true)
}

fn snapshot_id(last: &Option<LogId<NodeId>>) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    match last {
        Some(l) => format!("{}-{}-{}-{ms}", l.leader_id.term, l.leader_id.node_id, l.index),
        None => format!("0-0-0-{ms}"),
    }
}

fn open_snapshot(store: &Store, pin: Arc<PinnedSnapshot>) -> Result<Snapshot<TypeConfig>, SE> {
    let meta: SnapshotMeta<NodeId, openraft::BasicNode> =
        decode(&pin.header).map_err(|e| sm_err("decoding a snapshot header", e))?;
    Ok(Snapshot { meta, snapshot: Box::new(SnapshotFile::of(store, pin)) })
}

/// Pin the state as it is as the current snapshot (see `Store::pin_snapshot`). Blocking.
fn pin_snapshot(store: &Store) -> StoreResult<Arc<PinnedSnapshot>> {
    store.pin_snapshot(|view| {
        let (last_log_id, last_membership) = read_applied(view)?;
        let snapshot_id = snapshot_id(&last_log_id);
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id: snapshot_id.clone() };
        Ok((snapshot_id, encode(&meta)?))
    })
}

/// Takes a snapshot: pins a read transaction (nothing is copied until a follower needs it).
pub struct SnapshotBuilder {
    store: Store,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SE> {
        let store = self.store.clone();
        let pin = blocking(move || pin_snapshot(&store)).await.map_err(|e| sm_err("building a snapshot", e))?;
        tracing::info!(id = %pin.id, "snapshot taken");
        open_snapshot(&self.store, pin)
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<AppliedState, SE> {
        let view = self.store.read().map_err(|e| sm_err("reading applied state", e))?;
        read_applied(&view).map_err(|e| sm_err("reading applied state", e))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, SE>
    where
        I: IntoIterator<Item = Ent> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Tests: a slow state machine (applies late behind the commit), see fuse-tests.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("raft-apply");
        let entries: Vec<Ent> = entries.into_iter().collect();
        let Some(last_index) = entries.last().map(|e| e.log_id.index) else {
            return Ok(Vec::new());
        };
        if let Some(c) = &self.log_cache {
            let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
            c.applied = c.applied.max(last_index);
            c.release();
        }
        // Touches are only computed when someone listens.
        let me = match &self.events {
            Some((node, slot)) if slot.listening() => Some(*node),
            _ => None,
        };
        // A small apply runs here, on openraft's state-machine task: its redb transaction costs
        // less than the two thread hand-offs of a blocking task. A large one (milliseconds of
        // hashing) or one whose commit is the durable state flush (an fsync) goes to a blocking
        // thread, so that it does not hold up the runtime's workers.
        let payload: usize = entries.iter().map(payload_bytes).sum();
        let (entries, (out, touched)) = if payload < INLINE_APPLY_BYTES_MAX && !self.store.state_flush_due() {
            apply_entries(&self.store, &entries, me).map(|r| (entries, r))
        } else {
            let store = self.store.clone();
            blocking(move || apply_entries(&store, &entries, me).map(|r| (entries, r))).await
        }
        .map_err(|e| sm_err("applying entries", e))?;
        // After the commit, never blocking: the channel is unbounded. An apply that touched
        // nothing of interest sends nothing (see `EventSlot`).
        if !touched.is_empty() {
            self.send_event(Applied { index: last_index, touched });
        }
        if self.lock_changes.is_some() || self.own_fence.is_some() {
            let (changes, fences) = lock_changes(&entries, self.waiters.as_ref().map(|(node, _)| *node));
            for what in changes {
                self.locks_changed(what);
            }
            if fences {
                self.publish_own_fence();
            }
        }
        if let Some((node, waiters)) = &self.waiters {
            // After the event (a waiter for the coherence watermark reads the applied index
            // first, then the last event's index) and before any proposer hears of its result
            // (whoever is answered sees this entry in `Replica::applied_index`).
            waiters.applied.fetch_max(last_index, Ordering::AcqRel);
            waiters.answer(*node, &entries, &out);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { store: self.store.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotFile>, SE> {
        let path = self.store.receiving_path();
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| sm_err("creating a snapshot file", e))?;
        Ok(Box::new(SnapshotFile { file: Lazy::Open(file), path, discard_on_drop: true, _pin: None }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        mut snapshot: Box<SnapshotFile>,
    ) -> Result<(), SE> {
        use tokio::io::AsyncWriteExt;
        // A snapshot taken here rather than received (openraft's storage suite installs those)
        // is written out first.
        std::future::poll_fn(|cx| snapshot.poll_open(cx).map_ok(|_| ()))
            .await
            .map_err(|e| sm_err("writing out a snapshot to install", e))?;
        let file = snapshot.open_file().map_err(|e| sm_err("installing a snapshot", e))?;
        file.flush().await.map_err(|e| sm_err("flushing a received snapshot", e))?;
        file.sync_all().await.map_err(|e| sm_err("syncing a received snapshot", e))?;
        let src = snapshot.path.clone();
        snapshot.discard_on_drop = false;
        drop(snapshot);
        // The file must cover what openraft says it does, checked before the state is replaced
        // (a mismatch is a storage error: the node stops with its state as it was; the received
        // file is removed at the next start).
        let (store, path) = (self.store.clone(), src.clone());
        let header = blocking(move || store.snapshot_header(&path)).await.map_err(|e| sm_err("reading a snapshot header", e))?;
        let header: SnapshotMeta<NodeId, openraft::BasicNode> =
            decode(&header).map_err(|e| sm_err("decoding a snapshot header", e))?;
        if header.last_log_id != meta.last_log_id {
            return Err(sm_err(
                "installing a snapshot",
                format!("file covers {:?}, meta says {:?}", header.last_log_id, meta.last_log_id),
            ));
        }
        let sm_meta = vec![
            (SM_APPLIED, encode(&meta.last_log_id).map_err(|e| sm_err("encoding", e))?),
            (SM_MEMBERSHIP, encode(&meta.last_membership).map_err(|e| sm_err("encoding", e))?),
        ];
        let id = meta.snapshot_id.clone();
        let store = self.store.clone();
        blocking(move || store.install_snapshot(&src, &id, &sm_meta))
            .await
            .map_err(|e| sm_err("installing a snapshot", e))?;
        tracing::info!(id = %meta.snapshot_id, last = ?meta.last_log_id, "snapshot installed");
        // The subscriber learns that everything up to the snapshot is here (its watermark moves
        // on, so opens do not wait); what changed is not listed, only that anything may have.
        if let Some(last) = meta.last_log_id {
            self.send_event(Applied { index: last.index, touched: vec![Touch::Everything] });
        }
        self.locks_changed(super::LockChange::Any);
        self.publish_own_fence();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SE> {
        if let Some(pin) = self.store.current_snapshot() {
            return Ok(Some(open_snapshot(&self.store, pin)?));
        }
        // None taken since this start: the state as it is serves (durable, and no newer than what
        // is applied), once something was applied.
        let store = self.store.clone();
        let pin = blocking(move || match read_applied(&store.read()?)?.0 {
            None => Ok(None),
            Some(_) => pin_snapshot(&store).map(Some),
        })
        .await
        .map_err(|e| sm_err("taking a snapshot", e))?;
        pin.map(|pin| open_snapshot(&self.store, pin)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId};

    use super::*;
    use crate::raft::{Batch, LockChange};
    use crate::state::{Caller, LockKind, Timespec};

    fn ent(index: u64, ops: Vec<Op>) -> Ent {
        let commands = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| Command {
                origin: 1,
                seq: index * 10 + i as u64,
                time: Timespec::default(),
                caller: Caller::root(),
                content_hash: op.content_hash(),
                op,
            })
            .collect();
        Ent { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Batch::new(commands)) }
    }

    /// Lock waiters hear of the inodes whose locks an apply may have released, each once, and of
    /// "any" for a node's earlier runs, its removal or its expired lease; other commands tell them
    /// nothing.
    #[test]
    fn lock_changes_name_the_inodes_whose_locks_may_have_gone() {
        let lock = |ino| Op::Lock { ino, incarnation: 1, owner: 2, kind: LockKind::Flock, typ: None, start: 0, end: 0, pid: 0 };
        let release = |ino| Op::ReleaseLocks { ino, incarnation: 1, owners: vec![2], kind: None };
        let entries = vec![
            ent(1, vec![lock(5), Op::Release { ino: 6 }, release(7)]),
            ent(2, vec![lock(5), lock(8)]),
            Ent { log_id: LogId::new(CommittedLeaderId::new(1, 1), 3), payload: EntryPayload::Blank },
        ];
        assert_eq!(
            lock_changes(&entries, None).0,
            vec![LockChange::Inode(5), LockChange::Inode(7), LockChange::Inode(8)]
        );
        let stale = ent(4, vec![Op::DropStaleLocks { incarnation: 3 }, lock(5)]);
        assert_eq!(lock_changes(&[stale], None), (vec![LockChange::Any, LockChange::Inode(5)], true));
        assert_eq!(lock_changes(&[ent(5, vec![Op::UnregisterNode { node: 2 }])], None), (vec![LockChange::Any], true));
        assert_eq!(lock_changes(&[ent(7, vec![Op::ExpireLocks { node: 2, incarnation: 4 }])], None), (vec![LockChange::Any], true));
        assert_eq!(lock_changes(&[ent(8, vec![Op::AckLockExpiry { epoch: 1 }])], None), (vec![], true), "fences change, no lock");
        assert_eq!(lock_changes(&[ent(6, vec![Op::RegisterNode { node: 2 }])], None), (vec![], false));
    }
}

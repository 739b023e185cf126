//! Raft: openraft type configuration, proposing commands, and the node's replica handle.
//!
//! API boundary: the rest of the crate proposes with `Replica::propose` and reads with
//! `Replica::read`; nothing outside this module knows openraft exists (the redb store below it is
//! openraft-agnostic and sees only bytes).

pub mod admin;
pub mod elect;
pub mod forward;
mod leases;
pub mod network;
pub mod storage;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use openraft::{BasicNode, Config, Raft, SnapshotPolicy};
use tokio::time::Instant;
use serde::{Deserialize, Serialize};

use crate::state::{Caller, Command, CommandResult, ContentDigest, HashedOp, LockFence, NodeId, Op, Outcome, StateRead, StoreFault, Timespec, ROOT_INO};
use crate::store::Store;
pub use network::{NoPeers, PeerTransport, RpcKind, TransportError};
use storage::{LogStore, SnapshotFile, StateMachine};

/// One Raft entry: the commands proposed together (group commit: one log write and one fsync for
/// everything that queued up while the previous entry was being committed). Shared, not copied:
/// openraft clones an entry's payload on its way from `client_write` through the log cache to
/// apply, and a batch carries up to `BATCH_PAYLOAD_BYTES_MAX` of file data. On the wire and in
/// the log it is encoded exactly as the list of its commands.
#[derive(Clone, Debug)]
pub struct Batch(pub Arc<Vec<Command>>, Option<Arc<Vec<ContentDigest>>>);

impl Batch {
    pub fn new(commands: Vec<Command>) -> Self {
        Batch(Arc::new(commands), None)
    }

    /// A batch this node's batcher made, with each command's digest as its proposer computed it
    /// (`HashedOp`). The digests are never encoded: a batch read from the log or received from a
    /// peer has none, and its apply hashes every command (`Digested::new`); this node's apply of
    /// its own in-memory batch uses them (`Digested::trusted`).
    fn with_digests(commands: Vec<Command>, digests: Vec<ContentDigest>) -> Self {
        debug_assert_eq!(commands.len(), digests.len());
        Batch(Arc::new(commands), Some(Arc::new(digests)))
    }

    /// The proposer's digests, if this batch was made in this process.
    pub(crate) fn digests(&self) -> Option<&[ContentDigest]> {
        self.1.as_deref().map(|d| d.as_slice())
    }
}

/// Two batches are equal when their commands are (the digests are derived from them).
impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for Batch {}

impl Serialize for Batch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_newtype_struct("Batch", self.0.as_slice())
    }
}

impl<'de> Deserialize<'de> for Batch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename = "Batch")]
        struct Wire(Vec<Command>);
        Ok(Batch::new(Wire::deserialize(d)?.0))
    }
}

/// What apply returns through Raft for one entry: one result per command of the batch (empty for
/// blank and membership entries).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Response(pub Vec<CommandResult>);

openraft::declare_raft_types!(
    /// The Raft types of pickbox.
    pub TypeConfig:
        D = Batch,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = SnapshotFile,
        AsyncRuntime = openraft::TokioRuntime,
);

/// Heartbeat period (loopback and LAN).
pub const HEARTBEAT_MS: u64 = 100;
/// Election timeout range.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 400;
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 800;
/// Entries per AppendEntries at most (openraft's limit counts entries)...
pub const PAYLOAD_ENTRIES_MAX: u64 = 64;
/// ...and about this many payload bytes (the network adapter refuses a larger message with a hint
/// to send fewer entries), because openraft 0.9 times an AppendEntries out (unpatched after
/// `heartbeat_interval`, 100 ms; with vendor/openraft patch 3, one with entries after twice
/// `election_timeout_max`, 1.6 s), and a timed-out message is sent again whole: 8 entries of
/// 1 MiB missed 100 ms over and over. Measured (debug, QUIC loopback, 40 x 1 MiB to a new learner,
/// before patch 3): 8 entries/message 2.2 s, 4 MiB/message 0.86-1.17 s, 2 MiB/message 0.94-1.18 s
/// (~50 ms a message). A single larger entry still goes alone (entries are at most
/// ~BATCH_PAYLOAD_BYTES_MAX).
pub const APPEND_ENTRIES_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Most commands in one Raft entry.
pub const BATCH_COMMANDS_MAX: usize = 256;
/// A batch takes no more commands once their payload bytes reach this (a single larger command
/// still goes alone).
pub const BATCH_PAYLOAD_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Batches (Raft entries) proposed and not yet applied, at most. Beyond the first, a batch goes in
/// flight only when it is full (BATCH_PAYLOAD_BYTES_MAX or BATCH_COMMANDS_MAX) and this node leads
/// (its log append and fsync then overlap the apply of the one before: sequential writes);
/// otherwise what arrives waits for the next batch, because for small ops more batches in flight
/// means smaller batches and more fsyncs. Measured (debug build, 64 tasks creating files): one in
/// flight gave ~9.5k creates/s in ~38 entries, two unconditionally ~6.5k/s in ~60 smaller entries.
pub const BATCHES_IN_FLIGHT_MAX: usize = 2;
/// Proposals waiting for the batcher; beyond this `propose` waits (back-pressure).
pub const PROPOSE_QUEUE_MAX: usize = 4096;
/// Snapshot after this many entries since the last one...
pub const SNAPSHOT_ENTRIES_MAX: u64 = 20_000;
/// ...or after this many bytes of log entries (or as many as the last snapshot holds, if more).
pub const SNAPSHOT_LOG_BYTES_MAX: u64 = 512 * 1024 * 1024;
/// Entries kept in the log behind a snapshot (for slow followers), bounding disk use.
pub const SNAPSHOT_LOG_KEEP_ENTRIES: u64 = 500;
/// Snapshot chunk per install_snapshot RPC.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// A snapshot chunk other than the last may take this long to reach the follower and be stored
/// (4 MiB: a link of at least ~400 KiB/s; the QUIC server waits as long for a request's bytes)...
pub const SNAPSHOT_CHUNK_TIMEOUT_MS: u64 = 10_000;
/// ...and the last one this long plus `SNAPSHOT_INSTALL_MS_PER_GIB` for every GiB of the snapshot
/// (`SnapshotInstallBound`), because the follower answers it only once it has installed the whole
/// snapshot (its state replaced in one transaction: time grows with the state's size).
/// openraft's default (`install_snapshot_timeout`, 200 ms, for every chunk) cut off each chunk of a
/// link under 20 MiB/s and every install slower than that, and the leader then started the whole
/// transfer again, for ever. A dead peer is still noticed at once: the QUIC connection fails after
/// `IDLE_TIMEOUT_MS` without traffic, and the call with it.
pub const SNAPSHOT_INSTALL_TIMEOUT_MS: u64 = 600_000;
/// Installing a snapshot took 5.9-7.0 s per GiB of file data here (`cargo bench --bench
/// snapshot`): with a fixed 10 min bound a state over ~85-100 GiB could never catch a follower
/// up. About twenty times that rate is allowed, for slower disks.
pub const SNAPSHOT_INSTALL_MS_PER_GIB: u64 = 120_000;
/// The outer bound openraft (`install_snapshot_timeout`) and the transport put on every snapshot
/// call; the network adapter bounds each chunk itself, sooner (see above).
pub const SNAPSHOT_CALL_TIMEOUT_CEILING_MS: u64 = 7 * 24 * 3600 * 1000;

/// How long the leader waits for the answer to a snapshot's last chunk: `base` plus `per_gib` for
/// every GiB of the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotInstallBound {
    pub base: Duration,
    pub per_gib: Duration,
}

impl Default for SnapshotInstallBound {
    fn default() -> Self {
        SnapshotInstallBound {
            base: Duration::from_millis(SNAPSHOT_INSTALL_TIMEOUT_MS),
            per_gib: Duration::from_millis(SNAPSHOT_INSTALL_MS_PER_GIB),
        }
    }
}

impl SnapshotInstallBound {
    /// The bound for a snapshot of `bytes` (capped at `SNAPSHOT_CALL_TIMEOUT_CEILING_MS`).
    pub fn for_bytes(&self, bytes: u64) -> Duration {
        let scaled = self.per_gib.mul_f64(bytes as f64 / (1u64 << 30) as f64);
        self.base.saturating_add(scaled).min(Duration::from_millis(SNAPSHOT_CALL_TIMEOUT_CEILING_MS))
    }
}
/// A read barrier waits at most this long (or the propose timeout, if shorter) for the read
/// index; then the read is served from the local replica (design decision 10: reads go on without
/// quorum). An election after a leader failure takes 0.4-0.8 s (the election timeout) plus a vote.
pub const READ_BARRIER_WAIT_MS: u64 = 1_000;
/// Sequence numbers: (incarnation << 40) | counter.
const SEQ_COUNTER_BITS: u32 = 40;
/// `propose` waits this much past its deadline for the batcher's answer, so that the batcher's
/// reason (no leader, no quorum) reaches the caller rather than a bare timeout.
const PROPOSE_GRACE_MS: u64 = 50;
/// Pause between attempts of the background bootstrap of a node restarted without quorum.
const BOOTSTRAP_RETRY_MS: u64 = 1000;

/// Why a proposal did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Apply rejected the command deterministically; nothing changed.
    #[error("rejected: {0}")]
    Fs(#[from] crate::state::Errno),
    /// No leader or no quorum within the configured wait, or the node is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The local store failed; the node is stopping (fail-stop).
    #[error("fatal: {0}")]
    Fatal(String),
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// How long a mutation waits for quorum before failing with EIO.
    pub propose_timeout: std::time::Duration,
    /// The address peers reach this node at (`host:port` of its QUIC endpoint); empty for a node
    /// without peers. Stored in the membership when the node bootstraps or joins.
    pub advertise_addr: String,
    /// Snapshot after this many log entries since the last snapshot (`SNAPSHOT_ENTRIES_MAX` by
    /// default; tests lower it).
    pub snapshot_entries: u64,
    /// Snapshot (and purge) when the log on disk holds more than this many bytes
    /// (`SNAPSHOT_LOG_BYTES_MAX` by default; tests lower it).
    pub snapshot_log_bytes: u64,
    /// Below this much free space in the data directory, snapshot every
    /// `SNAPSHOT_LOW_SPACE_INTERVAL_MS` while anything is applied (`SNAPSHOT_LOW_SPACE_FREE_BYTES`
    /// by default; tests raise it).
    pub snapshot_low_space_bytes: u64,
    /// How long a snapshot's last chunk may wait for the follower's install (tests lower it).
    pub snapshot_install: SnapshotInstallBound,
    /// The advisory locks of a member the leader has not heard from for this long expire
    /// (`leases`); None: they stay until it restarts or is removed.
    pub lock_lease: Option<Duration>,
}

impl ReplicaConfig {
    /// A single-node configuration with the default limits.
    pub fn new(node_id: NodeId, data_dir: PathBuf, propose_timeout: Duration) -> Self {
        ReplicaConfig {
            node_id,
            data_dir,
            propose_timeout,
            advertise_addr: String::new(),
            snapshot_entries: SNAPSHOT_ENTRIES_MAX,
            snapshot_log_bytes: SNAPSHOT_LOG_BYTES_MAX,
            snapshot_low_space_bytes: SNAPSHOT_LOW_SPACE_FREE_BYTES,
            snapshot_install: SnapshotInstallBound::default(),
            lock_lease: Some(Duration::from_millis(crate::config::LOCK_LEASE_MS_DEFAULT)),
        }
    }
}

/// What one apply call changed on behalf of commands from *other* nodes, for the filesystem
/// adapter: kernel cache invalidation, and releasing orphans this node does not hold open.
/// One `Applied` is sent per apply call that touched something (and per snapshot install), in log
/// order, before openraft counts the entries as applied. So once this node has applied entry `a`,
/// a subscriber that has handled the event with `index >= min(a, Replica::last_event_index())`
/// (read after `a`) has seen everything up to entry `a`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// The last log index this apply call covered.
    pub index: u64,
    pub touched: Vec<Touch>,
}

/// One thing a remote command touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Touch {
    /// Attributes, content or xattrs of this inode changed.
    Inode(crate::state::Ino),
    /// The entry `name` in directory `parent` was added, removed or replaced; `old` is the inode
    /// it named before the command, if any (so the kernel can be told it was deleted).
    Entry { parent: crate::state::Ino, name: Vec<u8>, old: Option<crate::state::Ino> },
    /// `ino` became an orphan (open-unlinked) that this node must release once it has no open
    /// handle on it.
    Orphan(crate::state::Ino),
    /// The whole state was replaced (a snapshot was installed): anything may have changed.
    Everything,
}

/// What an apply call may have released advisory locks of (`Replica::lock_changes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockChange {
    /// The locks of this inode.
    Inode(crate::state::Ino),
    /// Locks of any inode (a node's earlier runs', a removed node's or an expired lease's locks
    /// dropped, a snapshot installed).
    Any,
}

/// Where apply tells lock waiters what may have been released.
pub type LockChanges = tokio::sync::broadcast::Sender<LockChange>;

/// How many lock changes a waiter may fall behind before it just asks again (a lagging
/// receiver treats the gap as a change of its inode).
const LOCK_CHANGES_QUEUE: usize = 1_024;

/// A short summary of the replica's Raft state.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicaMetrics {
    pub node_id: NodeId,
    pub state: String,
    pub current_term: u64,
    pub current_leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub last_applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// Durable log commits (fsyncs) and the entries they carried: the group-commit ratio.
    pub log_commits: u64,
    pub log_entries: u64,
    pub log_bytes: u64,
    pub apply_txns: u64,
}

/// One node's replica: its Raft instance and its local store.
pub struct Replica {
    node_id: NodeId,
    cfg: ReplicaConfig,
    raft: Raft<TypeConfig>,
    store: Store,
    /// How this node reaches its peers (also for forwarding and admin calls).
    transport: Arc<dyn PeerTransport>,
    seqs: SeqGen,
    queue: tokio::sync::mpsc::Sender<Pending>,
    /// Where apply sends `Applied` events (the one subscriber).
    applied_tx: storage::AppliedSlot,
    /// This node's proposers waiting for their commands, answered by apply (`storage::Waiters`).
    waiters: Arc<storage::Waiters>,
    /// Read-index rounds shared by concurrent `read_barrier` callers.
    reads: forward::ReadRounds,
    /// The log's entry cache (`track_lease` tells it how far the followers are).
    log_cache: storage::SharedEntryCache,
    /// Batches submitted while another was in flight (pipelined), for tests and diagnosis.
    pipelined: AtomicU64,
    /// Told by apply whenever an advisory lock may have been released (`lock_changes`).
    lock_changes: LockChanges,
    /// When each peer last answered this node's Raft calls (the lock leases read it).
    contacts: Arc<network::Contacts>,
    /// This node's lock fence as the state records it (kept up to date by apply).
    own_fence: tokio::sync::watch::Sender<LockFence>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A proposal waiting for the batcher; it gets its sequence number when its batch is formed.
struct Pending {
    caller: Caller,
    op: Op,
    time: Timespec,
    /// The end of the caller's one wait (queue, forwarding, retries, local apply).
    deadline: Instant,
    /// `op.content_digest()`, computed by whoever made the op (`HashedOp`: a FUSE write on its fuser
    /// thread, others in the proposing task), never by the batcher, which is one task and would
    /// hash every batch serially on the write path.
    digest: ContentDigest,
    reply: tokio::sync::oneshot::Sender<Result<CommandResult, ProposeError>>,
}

/// Sequence numbers `(incarnation << 40) | counter`, assigned by the batcher in log order.
struct SeqGen {
    /// (incarnation, last counter used).
    state: Mutex<(u64, u64)>,
    /// Whether the incarnation is final (a joining node learns it only after catching up).
    ready: tokio::sync::watch::Sender<bool>,
}

impl SeqGen {
    fn new(incarnation: u64, ready: bool) -> Self {
        SeqGen { state: Mutex::new((incarnation, 0)), ready: tokio::sync::watch::channel(ready).0 }
    }

    fn incarnation(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// Use `incarnation` from now on (never lower than the current one) and mark it final.
    fn settle(&self, incarnation: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if incarnation > st.0 {
            *st = (incarnation, 0);
        }
        drop(st);
        self.ready.send_replace(true);
    }

    /// `n` consecutive sequence numbers.
    fn take(&self, n: usize) -> anyhow::Result<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = st.1 + 1;
        anyhow::ensure!(first + n as u64 <= 1 << SEQ_COUNTER_BITS, "sequence counter exhausted");
        st.1 += n as u64;
        Ok((st.0 << SEQ_COUNTER_BITS) | first)
    }
}

fn now() -> Timespec {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Timespec { sec: d.as_secs() as i64, nsec: d.subsec_nanos() }
}

/// The openraft configuration we run with.
pub fn raft_config(snapshot_entries: u64) -> anyhow::Result<Config> {
    let c = Config {
        cluster_name: "pickbox".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        max_payload_entries: PAYLOAD_ENTRIES_MAX,
        // Elections go through a pre-vote first (elect.rs, `drive_elections`), not openraft's timer.
        enable_elect: false,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_entries),
        max_in_snapshot_log_to_keep: SNAPSHOT_LOG_KEEP_ENTRIES,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        // The outer bound on every chunk's call; network.rs bounds each chunk itself, sooner.
        install_snapshot_timeout: SNAPSHOT_CALL_TIMEOUT_CEILING_MS,
        ..Default::default()
    };
    Ok(c.validate()?)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreFault> + Send + 'static,
) -> anyhow::Result<T> {
    Ok(tokio::task::spawn_blocking(f).await??)
}

impl Replica {
    /// Open the store, start Raft, bootstrap a fresh single-node cluster (Init + RegisterNode).
    pub async fn start(cfg: ReplicaConfig) -> anyhow::Result<Arc<Replica>> {
        Self::start_with(cfg, Arc::new(NoPeers)).await
    }

    /// `start` with a given peer transport. A fresh data dir bootstraps a single-voter cluster.
    /// A restarted node whose peers are down (no leader) still starts: it warns, serves reads
    /// from its replica, and registers itself and releases its orphans in the background once a
    /// leader appears.
    pub async fn start_with(cfg: ReplicaConfig, transport: Arc<dyn PeerTransport>) -> anyhow::Result<Arc<Replica>> {
        // With existing state the local incarnation counter alone is safe (it was bumped past every
        // incarnation this data dir used); a fresh one must first see the replicated `max_seq`.
        let existed = Self::has_state(&cfg.data_dir);
        let replica = Self::open(&cfg, transport, existed).await?;
        let fresh = !replica.raft.is_initialized().await?;
        if fresh {
            let mut members = BTreeMap::new();
            members.insert(cfg.node_id, BasicNode { addr: cfg.advertise_addr.clone() });
            replica.raft.initialize(members).await?;
            tracing::info!(node = cfg.node_id, "initialized a new single-voter cluster");
        }
        let handle = tokio::spawn(snapshot_monitor(Arc::downgrade(&replica)));
        replica.push_task(handle);
        let ready = async {
            replica.wait_ready().await?;
            replica.finish_start().await
        };
        match ready.await {
            Ok(()) => {}
            Err(e) if !fresh => {
                tracing::warn!(
                    node = cfg.node_id,
                    error = %e,
                    "no leader or no quorum yet (other nodes down?): starting anyway; reads are served \
                     from the local replica, writes fail with EIO until a quorum is back"
                );
                let handle = tokio::spawn(bootstrap_in_background(Arc::downgrade(&replica)));
                replica.push_task(handle);
            }
            Err(e) => {
                let _ = replica.shutdown().await;
                return Err(e);
            }
        }
        Ok(replica)
    }

    /// Start a node that joins an existing cluster: no bootstrap; it waits to be added as a learner
    /// by the leader (`add_learner`), then receives the log or a snapshot. Call `after_join` once
    /// it is admitted.
    pub async fn start_joining(cfg: ReplicaConfig, transport: Arc<dyn PeerTransport>) -> anyhow::Result<Arc<Replica>> {
        let existed = Self::has_state(&cfg.data_dir);
        let replica = Self::open(&cfg, transport, existed).await?;
        let handle = tokio::spawn(snapshot_monitor(Arc::downgrade(&replica)));
        replica.push_task(handle);
        Ok(replica)
    }

    fn push_task(&self, handle: tokio::task::JoinHandle<()>) {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }

    /// Open the store and start openraft (no membership action). `seqs_ready`: whether the local
    /// incarnation may be used before the replica has caught up.
    async fn open(
        cfg: &ReplicaConfig,
        transport: Arc<dyn PeerTransport>,
        seqs_ready: bool,
    ) -> anyhow::Result<Arc<Replica>> {
        let dir = cfg.data_dir.clone();
        let store = blocking(move || Store::open(&dir)).await?;
        let s2 = store.clone();
        let incarnation = blocking(move || {
            storage::resume_snapshot_install(&s2)?;
            s2.next_incarnation()
        })
        .await?;
        anyhow::ensure!(incarnation < (1 << (64 - SEQ_COUNTER_BITS)), "incarnation counter exhausted");
        let log = LogStore::new(store.clone());
        let log_cache = log.entry_cache();
        let applied_tx: storage::AppliedSlot = Default::default();
        let waiters: Arc<storage::Waiters> = Default::default();
        let lock_changes = tokio::sync::broadcast::Sender::new(LOCK_CHANGES_QUEUE);
        let own_fence = tokio::sync::watch::Sender::new(LockFence::default());
        let sm = StateMachine::with_log(store.clone(), &log)
            .with_events(cfg.node_id, applied_tx.clone())
            .with_waiters(cfg.node_id, waiters.clone())
            .with_lock_changes(lock_changes.clone())
            .with_own_fence(cfg.node_id, own_fence.clone());
        let contacts: Arc<network::Contacts> = Default::default();
        let network = network::Network::new(cfg.node_id, transport.clone())
            .snapshot_install(cfg.snapshot_install)
            .contacts(contacts.clone());
        let raft = Raft::new(cfg.node_id, Arc::new(raft_config(cfg.snapshot_entries)?), network, log, sm).await?;
        let (queue, rx) = tokio::sync::mpsc::channel(PROPOSE_QUEUE_MAX);
        let replica = Arc::new(Replica {
            node_id: cfg.node_id,
            cfg: cfg.clone(),
            raft,
            store,
            transport,
            seqs: SeqGen::new(incarnation, seqs_ready),
            queue,
            applied_tx,
            waiters,
            reads: Default::default(),
            log_cache,
            pipelined: AtomicU64::new(0),
            lock_changes,
            contacts,
            own_fence,
            tasks: Mutex::new(Vec::new()),
        });
        let batcher = tokio::spawn(batcher(Arc::downgrade(&replica), rx));
        replica.push_task(batcher);
        let lease = tokio::spawn(forward::track_lease(
            Arc::downgrade(&replica),
            replica.raft.server_metrics(),
            replica.raft.data_metrics(),
        ));
        replica.push_task(lease);
        let elections = tokio::spawn(elect::drive_elections(Arc::downgrade(&replica)));
        replica.push_task(elections);
        if let Some(lease) = replica.cfg.lock_lease {
            let expiry = tokio::spawn(leases::expire_locks(Arc::downgrade(&replica), replica.raft.server_metrics(), lease));
            replica.push_task(expiry);
        }
        Ok(replica)
    }

    /// Leader only: add `node` (reachable at `addr`) as a learner and wait until it has everything
    /// this node had applied once the learner was in the membership (openraft's own "blocking"
    /// returns while the learner may still lag by thousands of entries, and waits without a bound).
    /// Waits on the metrics channel (woken at each replication progress), at most the propose
    /// timeout or 10 s; fails at once if this node stops leading meanwhile.
    pub async fn add_learner(&self, node: NodeId, addr: String) -> anyhow::Result<()> {
        type Metrics = openraft::RaftMetrics<NodeId, BasicNode>;
        self.raft.add_learner(node, BasicNode { addr }, false).await?;
        // The answer comes once the membership entry is applied here, so this covers it.
        let target = self.applied_index().unwrap_or(0);
        let matched = move |m: &Metrics| -> Option<u64> {
            m.replication.as_ref().map(|r| r.get(&node).cloned().flatten().map_or(0, |l| l.index))
        };
        let timeout = self.cfg.propose_timeout.max(Duration::from_secs(10));
        let waited = self
            .raft
            .wait(Some(timeout))
            .metrics(move |m| matched(m).is_none_or(|i| i >= target), "learner caught up")
            .await;
        match waited {
            Ok(m) if matched(&m).is_some() => Ok(()),
            Ok(_) => anyhow::bail!("node {} stopped leading while learner {node} caught up", self.node_id),
            Err(openraft::metrics::WaitError::Timeout(..)) => {
                let at = matched(&self.raft.metrics().borrow()).unwrap_or(0);
                anyhow::bail!("learner {node} did not catch up within {timeout:?} ({at} < {target})")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Leader only: make exactly `voters` the voting members (joint consensus).
    pub async fn change_voters(&self, voters: std::collections::BTreeSet<NodeId>) -> anyhow::Result<()> {
        self.raft.change_membership(voters, false).await?;
        Ok(())
    }

    /// Wait for a leader and for the local state to catch up with the log.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let timeout = Some(self.cfg.propose_timeout.max(Duration::from_secs(5)));
        let m = self
            .raft
            .wait(timeout)
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await?;
        if let Some(last) = m.last_log_index {
            self.raft.wait(timeout).applied_index_at_least(Some(last), "local replica caught up").await?;
        }
        Ok(())
    }

    /// After the replica has caught up: settle the incarnation, then bootstrap the state.
    async fn finish_start(&self) -> anyhow::Result<()> {
        self.settle_incarnation().await?;
        self.bootstrap_state().await
    }

    /// `incarnation = max(local next incarnation, (replicated max_seq(self) >> 40) + 1)`: a node
    /// id reused with a fresh data dir must not reuse sequence numbers the cluster has seen. A
    /// higher value is persisted locally (by bumping the local counter up to it).
    async fn settle_incarnation(&self) -> anyhow::Result<()> {
        let replicated = {
            let view = self.store.read()?;
            view.max_seq(self.node_id)? >> SEQ_COUNTER_BITS
        };
        let mut inc = self.seqs.incarnation();
        while inc <= replicated {
            let store = self.store.clone();
            inc = blocking(move || store.next_incarnation()).await?;
        }
        anyhow::ensure!(inc < (1 << (64 - SEQ_COUNTER_BITS)), "incarnation counter exhausted");
        if inc != self.seqs.incarnation() {
            tracing::info!(node = self.node_id, incarnation = inc, "incarnation raised past the replicated sequence numbers");
        }
        self.seqs.settle(inc);
        Ok(())
    }

    /// First start: create the root and register this node. Restart: release every orphan this node
    /// held open and drop the advisory locks of its earlier runs (nothing is open or locked after a
    /// restart).
    async fn bootstrap_state(&self) -> anyhow::Result<()> {
        let view = self.store.read()?;
        let has_root = view.inode(ROOT_INO)?.is_some();
        let registered = view.meta()?.nodes.contains(&self.node_id);
        let held: Vec<_> =
            view.orphans()?.into_iter().filter(|(_, o)| o.pending.contains(&self.node_id)).map(|(i, _)| i).collect();
        let incarnation = self.incarnation();
        let mut stale_locks = false;
        for ino in view.locked_inodes()? {
            if view.locks(ino)?.iter().any(|l| l.owner.node == self.node_id && l.owner.incarnation != incarnation) {
                stale_locks = true;
                break;
            }
        }
        drop(view);
        if stale_locks {
            self.propose(Caller::root(), Op::DropStaleLocks { incarnation }).await?;
        }
        if !has_root {
            self.propose(Caller::root(), Op::Init { perm: 0o755, uid: 0, gid: 0 }).await?;
        }
        if !registered {
            self.propose(Caller::root(), Op::RegisterNode { node: self.node_id }).await?;
        }
        for ino in held {
            match self.propose(Caller::root(), Op::Release { ino }).await {
                Ok(_) | Err(ProposeError::Fs(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether `data_dir` holds a node's store already (it has run before: restart, not join).
    pub fn has_state(data_dir: &std::path::Path) -> bool {
        crate::store::exists(data_dir)
    }

    /// After `admin::join_cluster` admitted this node: wait until the local replica has caught
    /// up, then do what `start` does after its bootstrap (register, release held orphans).
    pub async fn after_join(&self) -> anyhow::Result<()> {
        self.wait_ready().await?;
        self.finish_start().await
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// How long a mutation waits for quorum before it fails.
    pub fn propose_timeout(&self) -> Duration {
        self.cfg.propose_timeout
    }

    /// This run of the node (raised at every start): part of its advisory locks' owner, so that
    /// locks of an earlier run can be told apart and dropped.
    pub fn incarnation(&self) -> u64 {
        self.seqs.incarnation()
    }

    /// Hears of every applied command (from any node) that may have released an advisory lock,
    /// from now on.
    pub fn lock_changes(&self) -> tokio::sync::broadcast::Receiver<LockChange> {
        self.lock_changes.subscribe()
    }

    /// This node's lock fence as the state records it (`state::LockFences`): active from the
    /// apply of an expiry of its locks until the apply of its acknowledgement (see fs/fences.rs).
    pub fn own_lock_fence(&self) -> tokio::sync::watch::Receiver<LockFence> {
        self.own_fence.subscribe()
    }

    /// Whether this node leads (as far as its Raft metrics tell).
    fn leads(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.current_leader == Some(self.node_id) && m.state == openraft::ServerState::Leader
    }

    /// Propose `op` for `caller`; returns after the command is committed and applied locally.
    /// One deadline (`propose_timeout`) covers the queue, forwarding to the leader with retries,
    /// and the local apply; past it the caller gets `Unavailable` (EIO).
    pub async fn propose(&self, caller: Caller, op: impl Into<HashedOp>) -> Result<Outcome, ProposeError> {
        self.propose_at(caller, op, None).await
    }

    /// `propose` with the command's time given (every timestamp the command sets comes from it)
    /// instead of this node's clock now (`None`): a setattr that carries the kernel's own ctime of
    /// a file it caches with the writeback cache is stored with that ctime, the one it shows.
    pub async fn propose_at(
        &self,
        caller: Caller,
        op: impl Into<HashedOp>,
        time: Option<Timespec>,
    ) -> Result<Outcome, ProposeError> {
        let time = time.unwrap_or_else(now);
        let timeout = self.cfg.propose_timeout;
        let deadline = Instant::now() + timeout;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (op, digest) = op.into().into_parts();
        let pending = Pending { caller, op, time, deadline, digest, reply: tx };
        let wait = async {
            self.queue
                .send(pending)
                .await
                .map_err(|_| ProposeError::Unavailable("replica is shutting down".into()))?;
            rx.await.map_err(|_| ProposeError::Unavailable("replica is shutting down".into()))?
        };
        match tokio::time::timeout_at(deadline + Duration::from_millis(PROPOSE_GRACE_MS), wait).await {
            Err(_) => {
                tracing::warn!(
                    node = self.node_id,
                    timeout_ms = timeout.as_millis() as u64,
                    leader = ?self.raft.metrics().borrow().current_leader,
                    "proposal still queued at its deadline (earlier batches are waiting for a leader or a \
                     quorum); failing it with EIO"
                );
                Err(ProposeError::Unavailable(format!("not committed within {timeout:?}")))
            }
            Ok(Ok(result)) => result.map_err(ProposeError::Fs),
            Ok(Err(e)) => Err(e),
        }
    }

    /// Receive an `Applied` event, with the touches `wants` keeps, after every apply call that
    /// touched something it wants, from now on; an apply call whose touches it all drops sends no
    /// event (and so is nothing to wait for: `last_event_index`). `wants` runs on openraft's
    /// state-machine task right after each apply: it must be quick and not block. There is one
    /// subscriber (the filesystem adapter); a second call replaces the first. The channel is
    /// unbounded because apply must never wait for the kernel (an invalidation can wait on a
    /// directory lock held by a FUSE request that waits for apply).
    pub fn subscribe_applied(
        &self,
        wants: impl Fn(&Touch) -> bool + Send + Sync + 'static,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Applied> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.applied_tx.subscribe(tx, Box::new(wants));
        rx
    }

    /// The index of the last `Applied` event sent (0 if none). Entries after it that are applied
    /// touched nothing a subscriber must handle: a waiter for "everything up to applied index `a`
    /// handled" waits for `min(a, last_event_index())`, read after `a`.
    pub fn last_event_index(&self) -> u64 {
        self.applied_tx.last_event()
    }

    /// Read index: returns once the local replica has applied everything the leader had
    /// committed when the call started (close-to-open consistency across nodes). On the leader it
    /// confirms leadership with a quorum; on a follower it asks the leader. Concurrent callers
    /// share rounds. Fails after `propose_timeout` without a leader (reads from the local replica
    /// still work). A node that is the only voter needs no round.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        if self.read_barrier_ready() {
            return Ok(());
        }
        let deadline = Instant::now() + self.cfg.propose_timeout.min(Duration::from_millis(READ_BARRIER_WAIT_MS));
        let index = self.coalesced_read_index(deadline).await?;
        self.wait_applied(index, deadline).await
    }

    /// Whether a read barrier started now would return at once, without waiting: this node is
    /// the only voter, or it leads with a valid lease and has applied up to the lease's read
    /// index. Lets a caller skip the asynchronous path (a task hand-off per lookup).
    pub fn read_barrier_ready(&self) -> bool {
        self.sole_voter()
            || self.leased_read_index().is_some_and(|index| self.applied_index().unwrap_or(0) >= index)
    }

    /// Whether `node` is in the current membership (voter or learner): the transport serves Raft
    /// RPCs only to members.
    pub fn is_member(&self, node: NodeId) -> bool {
        self.raft.metrics().borrow().membership_config.membership().get_node(&node).is_some()
    }

    /// Whether `node` is the leader this node follows (its committed vote): a catching-up node
    /// accepts it even when the membership in the log it has so far does not name it yet.
    pub fn follows(&self, node: NodeId) -> bool {
        self.raft.metrics().borrow().current_leader == Some(node)
    }

    /// Whether this node has any membership yet (a node waiting to be added as a learner has none,
    /// and must accept RPCs from a leader it does not know yet).
    pub fn has_membership(&self) -> bool {
        self.raft.metrics().borrow().membership_config.membership().nodes().next().is_some()
    }

    /// A consistent read view of the local replica (a redb read transaction).
    pub fn read(&self) -> Result<Box<dyn StateRead + Send>, StoreFault> {
        Ok(Box::new(self.store.read()?))
    }

    /// Resolves once Raft has stopped on its own (a storage fault while appending replicated
    /// entries or applying them: fail-stop; or its task ended), with the reason. Only
    /// `shutdown` stops Raft on purpose, so while the node serves, any stop is a failure: the
    /// node must stop too, even when no local request failed.
    pub async fn raft_stopped(&self) -> String {
        // Waits on the server metrics (vote, leader, membership: they change rarely), not on the
        // full metrics, which openraft sends after every pass of its loop (several per write):
        // a waiter there is woken, on another thread, several times per write. Raft's core holds
        // the only sender of the server metrics and drops it when it stops, for whatever reason,
        // after it has put the reason into the full metrics.
        let mut server = self.raft.server_metrics();
        loop {
            if let Err(e) = &self.raft.metrics().borrow().running_state {
                return e.to_string();
            }
            if server.changed().await.is_err() {
                break;
            }
        }
        match &self.raft.metrics().borrow().running_state {
            Err(e) => e.to_string(),
            Ok(()) => "the Raft task ended".into(),
        }
    }

    /// The index of the last entry applied locally. Apply answers this node's proposers before
    /// openraft counts their entries as applied in its metrics, so the index apply stored is
    /// taken too: a proposer that was answered sees its entry here.
    pub fn applied_index(&self) -> Option<u64> {
        let counted = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        match (counted, self.waiters.applied()) {
            (Some(c), a) => Some(c.max(a)),
            (None, 0) => None,
            (None, a) => Some(a),
        }
    }

    /// A summary of Raft and store state.
    pub fn metrics(&self) -> ReplicaMetrics {
        let m = self.raft.metrics().borrow().clone();
        let s = self.store.stats();
        ReplicaMetrics {
            node_id: self.node_id,
            state: format!("{:?}", m.state),
            current_term: m.current_term,
            current_leader: m.current_leader,
            last_log_index: m.last_log_index,
            last_applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            log_commits: s.log_commits.load(Ordering::Relaxed),
            log_entries: s.log_entries.load(Ordering::Relaxed),
            log_bytes: s.log_bytes.load(Ordering::Relaxed),
            apply_txns: s.apply_txns.load(Ordering::Relaxed),
        }
    }

    /// Ask for a snapshot now (it is built in the background).
    pub async fn trigger_snapshot(&self) -> anyhow::Result<()> {
        self.raft.trigger().snapshot().await?;
        Ok(())
    }

    /// Serve one encoded RPC from `peer` (the node id its certificate names; the server side of
    /// `PeerTransport`); returns the encoded reply.
    pub async fn handle_rpc(&self, peer: Option<NodeId>, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, StoreFault> {
        use crate::store::codec::{decode, encode};
        match kind {
            RpcKind::Forward => {
                let batch: Batch = decode(body)?;
                // A node forwards only its own commands: one member must not propose in another's
                // name (it could replay or pre-empt that node's sequence numbers).
                if let Some(c) = batch.0.iter().find(|c| Some(c.origin) != peer) {
                    tracing::warn!(?peer, origin = c.origin, "refused a forwarded batch carrying another node's commands");
                    return Err(StoreFault(format!("forwarded commands of origin {} from peer {peer:?}", c.origin)));
                }
                encode(&self.serve_forward(batch).await)
            }
            RpcKind::AppendEntries => encode(&self.raft.append_entries(decode(body)?).await),
            RpcKind::Vote => encode(&self.raft.vote(decode(body)?).await),
            RpcKind::PreVote => encode(&Ok::<bool, String>(elect::serve_pre_vote(self, decode(body)?).await)),
            RpcKind::InstallSnapshot => encode(&self.raft.install_snapshot(decode(body)?).await),
            RpcKind::ReadIndex => {
                let () = decode(body)?;
                encode(&self.serve_read_index().await)
            }
            RpcKind::Join | RpcKind::Remove | RpcKind::Status => admin::serve(self, kind, body).await,
        }
    }

    /// Flush and stop Raft and the store.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        let tasks: Vec<_> = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain(..).collect();
        for h in &tasks {
            h.abort();
        }
        // An aborted task is dropped at its next poll: wait for that, so none of them still holds
        // this replica (and its store) when shutdown returns. Never called from one of them.
        for h in tasks {
            let _ = h.await;
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown reported an error");
        }
        let store = self.store.clone();
        blocking(move || store.sync_blocking()).await?;
        Ok(())
    }
}

/// The next batch, filling up while earlier ones are in flight.
#[derive(Default)]
struct Forming {
    items: Vec<Pending>,
    /// Payload bytes of `items`.
    bytes: usize,
    /// A proposal that did not fit: it starts the batch after this one.
    carry: Option<Pending>,
}

impl Forming {
    /// Whether the batch has reached a limit (count, payload bytes, or the next one did not fit).
    fn full(&self) -> bool {
        self.carry.is_some() || self.items.len() >= BATCH_COMMANDS_MAX || self.bytes >= BATCH_PAYLOAD_BYTES_MAX
    }

    fn add(&mut self, p: Pending) {
        let len = p.op.payload().len();
        // A single larger command still goes alone.
        if !self.items.is_empty() && self.bytes + len > BATCH_PAYLOAD_BYTES_MAX {
            self.carry = Some(p);
            return;
        }
        self.bytes += len;
        self.items.push(p);
    }

    fn take(&mut self) -> Vec<Pending> {
        let items = std::mem::take(&mut self.items);
        self.bytes = 0;
        if let Some(p) = self.carry.take() {
            self.add(p);
        }
        items
    }
}

/// A batch the batcher has handed on and not yet seen finish.
struct InFlight {
    /// True while its only attempt is the one the batcher submitted, in order, to this node's
    /// Raft; false once it retries (or was forwarded): then nothing may be submitted behind it
    /// ahead of its retry.
    in_order: Arc<std::sync::atomic::AtomicBool>,
}

/// Takes queued proposals (up to the batch limits) into one Raft entry, numbers its commands
/// (ascending, in log order), gets it committed, answers each caller, repeats. Whatever arrives
/// while a batch is in flight forms the next one, so the number of log fsyncs adapts to the load.
/// A second batch goes in flight only when it is full and this node leads (see
/// `BATCHES_IN_FLIGHT_MAX`); it is submitted to Raft from this task, so entries reach the log in
/// the order their sequence numbers were given.
async fn batcher(replica: Weak<Replica>, mut rx: tokio::sync::mpsc::Receiver<Pending>) {
    use std::sync::atomic::AtomicBool;
    let mut ready = match replica.upgrade() {
        Some(r) => r.seqs.ready.subscribe(),
        None => return,
    };
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut in_flight: BTreeMap<u64, InFlight> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut forming = Forming::default();
    let mut closed = false;
    // Resolves (or fails) once the previous batch is finished: retries wait for it.
    let mut prev_done: Option<tokio::sync::oneshot::Receiver<()>> = None;
    loop {
        while !forming.full() {
            match rx.try_recv() {
                Ok(p) => forming.add(p),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let submit = !forming.items.is_empty()
            && (in_flight.is_empty()
                || (in_flight.len() < BATCHES_IN_FLIGHT_MAX
                    && forming.full()
                    && in_flight.values().all(|f| f.in_order.load(Ordering::SeqCst))
                    && replica.upgrade().is_some_and(|r| r.leads())));
        if !submit {
            if closed && forming.items.is_empty() {
                return;
            }
            tokio::select! {
                p = rx.recv(), if !closed && !forming.full() => match p {
                    Some(p) => forming.add(p),
                    None => closed = true,
                },
                Some(id) = done_rx.recv() => {
                    in_flight.remove(&id);
                }
            }
            continue;
        }
        let batch = forming.take();
        // A caller that already gave up (timed out) has been told EIO: do not apply its command.
        let now = Instant::now();
        let (live, expired): (Vec<_>, Vec<_>) = batch.into_iter().partition(|p| p.deadline > now);
        for p in expired {
            let _ = p.reply.send(Err(ProposeError::Unavailable(
                "not committed in time: queued behind earlier proposals waiting for a leader or a quorum".into(),
            )));
        }
        let mut batch = live;
        batch.retain(|p| !p.reply.is_closed());
        let Some(deadline) = batch.iter().map(|p| p.deadline).max() else { continue };
        let Some(r) = replica.upgrade() else { return };
        // A joining node numbers nothing before it knows its incarnation.
        if !*ready.borrow() && tokio::time::timeout_at(deadline, ready.wait_for(|r| *r)).await.is_err() {
            for p in batch {
                let _ = p.reply.send(Err(ProposeError::Unavailable("this node has not caught up with the cluster yet".into())));
            }
            continue;
        }
        let first_seq = match r.seqs.take(batch.len()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot number proposals");
                for p in batch {
                    let _ = p.reply.send(Err(ProposeError::Fatal(e.to_string())));
                }
                continue;
            }
        };
        // Each proposer is answered by the local apply of its command (`storage::Waiters`), or,
        // if that did not answer it, when the batch finishes (a snapshot install covered the
        // entry, or the batch failed).
        let mut cmds = Vec::with_capacity(batch.len());
        let mut digests = Vec::with_capacity(batch.len());
        for (i, p) in batch.into_iter().enumerate() {
            let seq = first_seq + i as u64;
            cmds.push(Command {
                origin: r.node_id,
                seq,
                time: p.time,
                caller: p.caller,
                content_hash: p.digest.hash,
                op: p.op,
            });
            digests.push(p.digest);
            r.waiters.insert(seq, p.reply);
        }
        let seqs = first_seq..first_seq + cmds.len() as u64;
        let batch = Batch::with_digests(cmds, digests);
        // The first attempt goes to this node's Raft from here, in numbering order (openraft's
        // API queue is FIFO); a forwarded batch is sent from its own task, with one in flight.
        let in_order = Arc::new(AtomicBool::new(false));
        let first = if r.leads() {
            match r.raft.client_write_ff(batch.clone()).await {
                Ok(rx) => {
                    in_order.store(true, Ordering::SeqCst);
                    Some(rx)
                }
                Err(_) => None,
            }
        } else {
            None
        };
        if !in_flight.is_empty() {
            r.pipelined.fetch_add(1, Ordering::Relaxed);
        }
        let id = next_id;
        next_id += 1;
        in_flight.insert(id, InFlight { in_order: in_order.clone() });
        let (my_done, next_prev) = tokio::sync::oneshot::channel();
        let after = prev_done.replace(next_prev);
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let order = forward::Order { first, after, in_order };
            match r.commit(batch, order, deadline).await {
                Ok(results) => {
                    for (seq, res) in seqs.zip(results) {
                        if let Some(reply) = r.waiters.take(seq) {
                            let _ = reply.send(Ok(res));
                        }
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    let fatal = matches!(e, ProposeError::Fatal(_));
                    for seq in seqs {
                        if let Some(reply) = r.waiters.take(seq) {
                            let err =
                                if fatal { ProposeError::Fatal(msg.clone()) } else { ProposeError::Unavailable(msg.clone()) };
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
            drop(r);
            let _ = my_done.send(());
            let _ = done_tx.send(id);
        });
    }
}

/// Retries what a restarted node does after catching up (settle the incarnation, register, release
/// its orphans) until a leader with a quorum lets it through.
async fn bootstrap_in_background(replica: Weak<Replica>) {
    loop {
        let Some(r) = replica.upgrade() else { return };
        let res = async {
            r.wait_ready().await?;
            r.finish_start().await
        }
        .await;
        match res {
            Ok(()) => {
                tracing::info!(node = r.node_id, "quorum reached: node bootstrap finished");
                return;
            }
            Err(e) => tracing::debug!(node = r.node_id, error = %e, "bootstrap still waiting for a quorum"),
        }
        drop(r);
        tokio::time::sleep(Duration::from_millis(BOOTSTRAP_RETRY_MS)).await;
    }
}

/// Keeps the log on disk bounded in bytes (openraft's own policy counts entries, and a few
/// thousand entries of 4 MiB writes are GiBs): when the live log holds more than
/// `snapshot_log_bytes`, or than the last snapshot if that is larger, it purges what the last
/// snapshot covers, or if it covers nothing more, triggers a new snapshot. The measure is the log
/// on disk, so it survives restarts (counting bytes appended since start never fired on a node
/// restarted before each 512 MiB: its log grew without bound). Waiting until the log holds as
/// many bytes as the last snapshot keeps the snapshot work at most about the write volume (a
/// snapshot copies the whole state), and the log's disk use at most about the state's size.
async fn snapshot_monitor(replica: std::sync::Weak<Replica>) {
    // The snapshot that was the last one when this monitor last asked for a new one, and when.
    let mut asked: Option<(Option<u64>, Instant)> = None;
    // When the monitor last asked for a snapshot because space was short.
    let mut low_space_asked: Option<Instant> = None;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(r) = replica.upgrade() else { return };
        if low_space(&r.cfg.data_dir, r.cfg.snapshot_low_space_bytes) {
            // The current snapshot keeps the pages of the state it covers; while the disk is short,
            // a newer one lets what removals and overwrites freed since be used again (and openraft
            // then purges the log behind it).
            let (snapshot, applied) = {
                let m = r.raft.metrics();
                let m = m.borrow();
                (m.snapshot.map(|l| l.index), m.last_applied.map(|l| l.index))
            };
            let recently = low_space_asked.is_some_and(|at: Instant| at.elapsed() < Duration::from_millis(SNAPSHOT_LOW_SPACE_INTERVAL_MS));
            if applied > snapshot && !recently {
                tracing::info!(free_below = r.cfg.snapshot_low_space_bytes, "data directory short of space; snapshotting");
                if r.raft.trigger().snapshot().await.is_err() {
                    return;
                }
                low_space_asked = Some(Instant::now());
            }
        }
        let held = r.store.log_bytes();
        let limit = r.cfg.snapshot_log_bytes;
        if held <= limit {
            continue;
        }
        let (snapshot, purged, applied, behind) = {
            let m = r.raft.metrics();
            let m = m.borrow();
            // The follower furthest behind (leader only), if any.
            let behind = followers_matched(&m.replication, r.node_id).min();
            (m.snapshot.map(|l| l.index), m.purged.map(|l| l.index), m.last_applied.map(|l| l.index), behind)
        };
        match log_plan(held, limit, snapshot, purged, applied, behind) {
            LogPlan::Purge(upto) => {
                tracing::debug!(bytes = held, limit, upto, "log bytes over the limit; purging what the last snapshot covers");
                if r.raft.trigger().purge_log(upto).await.is_err() {
                    return;
                }
            }
            LogPlan::Snapshot => {
                if asked.is_some_and(|(s, at)| s == snapshot && at.elapsed() < SNAPSHOT_RETRIGGER) {
                    continue;
                }
                tracing::info!(bytes = held, limit, "log bytes over the limit; snapshotting");
                if r.raft.trigger().snapshot().await.is_err() {
                    return;
                }
                asked = Some((snapshot, Instant::now()));
            }
            LogPlan::Wait => {}
        }
    }
}

/// The highest log index each follower has (0: none yet), from a leader's replication metrics;
/// nothing on a node that does not lead.
fn followers_matched(
    replication: &Option<std::collections::BTreeMap<NodeId, Option<openraft::LogId<NodeId>>>>,
    me: NodeId,
) -> impl Iterator<Item = u64> + '_ {
    replication.iter().flatten().filter(move |(id, _)| **id != me).map(|(_, l)| l.map_or(0, |l| l.index))
}

/// What `snapshot_monitor` does about a log of `held` bytes.
#[derive(Debug, PartialEq, Eq)]
enum LogPlan {
    /// Purge the log up to this index (covered by the last snapshot).
    Purge(u64),
    /// Take a snapshot: the last one lets nothing more go.
    Snapshot,
    /// Nothing: under the limit, or a follower still needs entries the last snapshot covers (a
    /// new snapshot would not let more go).
    Wait,
}

/// openraft keeps `SNAPSHOT_LOG_KEEP_ENTRIES` behind a snapshot, which may be GiBs: over the
/// limit, purge what the last snapshot covers, but not what a follower (`behind`: the lowest
/// index a follower has, leader only) still needs, since it would then need the whole state as
/// a snapshot; at twice the limit (a follower down) it is not waited for.
fn log_plan(held: u64, limit: u64, snapshot: Option<u64>, purged: Option<u64>, applied: Option<u64>, behind: Option<u64>) -> LogPlan {
    if held <= limit {
        return LogPlan::Wait;
    }
    let upto = match (snapshot, behind) {
        (Some(s), Some(b)) if held <= limit.saturating_mul(2) => Some(s.min(b)),
        (s, _) => s,
    };
    match upto {
        Some(u) if upto > purged => LogPlan::Purge(u),
        _ if upto < snapshot => LogPlan::Wait,
        _ if applied > snapshot => LogPlan::Snapshot,
        _ => LogPlan::Wait,
    }
}

/// Below this much free space in the data directory, `snapshot_monitor` takes a snapshot at most
/// every `SNAPSHOT_LOW_SPACE_INTERVAL_MS` when anything was applied since the last one: a snapshot
/// pins the pages of the state it covers (see `Store::pin_snapshot`), so what was freed since is
/// not reused until the next one.
pub const SNAPSHOT_LOW_SPACE_FREE_BYTES: u64 = 1024 * 1024 * 1024;
pub const SNAPSHOT_LOW_SPACE_INTERVAL_MS: u64 = 2_000;

/// Whether the file system of `dir` has less than `bytes` available.
fn low_space(dir: &std::path::Path, bytes: u64) -> bool {
    nix::sys::statvfs::statvfs(dir)
        .map(|v| (v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64) < bytes)
        .unwrap_or(false)
}

/// A snapshot the monitor asked for and that has not appeared after this long is asked for again.
const SNAPSHOT_RETRIGGER: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests;

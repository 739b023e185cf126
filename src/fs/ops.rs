//! The filesystem operations behind the FUSE adapter, free of fuser types.
//!
//! Reads are served from a local read view of the replica. Mutations become one `Op` each and are
//! proposed through Raft; they return once the command is committed and applied on this node.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{NAME_BYTES_MAX, READDIR_BATCH_MAX, SYMLINK_BYTES_MAX, XATTR_NAME_BYTES_MAX, XATTR_VALUE_BYTES_MAX};
use crate::raft::{LockChange, ProposeError, Replica};
use tokio::sync::broadcast::error::RecvError;
use crate::state::{
    Caller, Errno, FallocMode, FileKind, HashedOp, Ino, Inode, Lock, LockKind, LockOwner, LockType, Op, Outcome,
    RenameFlags, SetTime, StateRead, Timespec, XattrFlags,
};

use crate::state::content;
use super::coherence::{self, Coherence};
use super::errno::{FsError, FsResult};
use super::fences::Gate;
use super::handles::Handles;
use super::inflight::InFlight;
use super::locks::LockWaits;

/// Free space the data directory must keep beyond a write's own bytes; below it a growing write
/// fails with ENOSPC before it is proposed, so a full disk never fails an apply half-way.
pub const SPACE_RESERVE_BYTES: u64 = 64 * 1024 * 1024;
/// The "nearly full" warning is logged at most once per this many seconds.
const SPACE_WARN_INTERVAL_S: u64 = 10;
/// A deferred times setattr (see `defer_times`) is proposed at the latest this long after it
/// was answered, if no other proposal of this node carried it along before.
pub const DEFERRED_TIMES_MS: u64 = 20;
/// Most deferred times setattrs held at once; beyond that a setattr is proposed at once.
const DEFERRED_TIMES_MAX: usize = 1024;
/// Most inodes whose last change was this node's own write are remembered (cleared when full;
/// the cost is that a setattr is proposed at once instead of deferred).
const OWN_WRITES_MAX: usize = 4096;
/// `st_blksize`/`f_bsize` we report in statfs.
pub const STATFS_BLOCK_BYTES: u64 = 4096;
/// Cookie of `.` in readdir; `..` is `DOTDOT_COOKIE`; entries have cookies above both.
pub const DOT_COOKIE: u64 = 1;
pub const DOTDOT_COOKIE: u64 = 2;
/// Directory entries read from the state at a time: a FUSE readdir reply is one page (about 100
/// short names, or 25 with attributes), so reading a full READDIR_BATCH_MAX would be mostly waste.
const READDIR_CHUNK: usize = if READDIR_BATCH_MAX < 128 { READDIR_BATCH_MAX } else { 128 };

/// One readdir entry with its stable cookie (what the kernel passes back as the next offset).
#[derive(Clone, Debug)]
pub struct Listed {
    pub name: Vec<u8>,
    pub cookie: u64,
    pub ino: Ino,
    pub kind: FileKind,
}

/// What statfs reports, in `STATFS_BLOCK_BYTES` units.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    pub blocks: u64,
    pub blocks_free: u64,
    pub blocks_avail: u64,
    pub files: u64,
    pub files_free: u64,
}

/// What lseek looks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    Data,
    Hole,
}

/// The node's filesystem: the replica, the data directory (for free space) and the open handles.
pub struct Ops {
    pub(super) replica: Arc<Replica>,
    data_dir: PathBuf,
    pub handles: Arc<Handles>,
    /// Kernel cache invalidation for other nodes' changes, and its watermark.
    pub coherence: Arc<Coherence>,
    /// Writes proposed and not yet answered, per inode (flush and fsync wait for them).
    pub writes: Arc<InFlight>,
    /// When the "nearly full" warning was last logged (seconds since the epoch).
    space_warned_s: AtomicU64,
    /// Set to the reason once the store failed (fail-stop): the node watches it and stops.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// This node has (or may get) peers: other nodes change files behind the kernel's back.
    clustered: bool,
    /// How long the kernel may keep the entries and attributes we answer with, unasked.
    pub cache_ttl: std::time::Duration,
    /// The mtime this node's own last write gave an inode (see `defer_times`).
    own_writes: std::sync::Mutex<HashMap<Ino, Timespec>>,
    /// Answered times setattrs not proposed yet, in arrival order (one per inode, merged).
    deferred: std::sync::Mutex<Vec<Deferred>>,
    /// A task that proposes `deferred` after `DEFERRED_TIMES_MS` is scheduled.
    deferred_timer: std::sync::atomic::AtomicBool,
    /// The kernel leaves clearing setuid/setgid on truncate and fallocate to us
    /// (`FUSE_HANDLE_KILLPRIV_V2`, see `PickboxFs::init`).
    killpriv: std::sync::atomic::AtomicBool,
    /// Other nodes' orphans this node has yet to release (see `RELEASE_GATHER_MS`).
    releases: Arc<GatheredReleases>,
    /// Waiting lock requests and the lock owners of open handles (see fs/locks.rs).
    pub lock_waits: LockWaits,
    /// Changes of files in flight, for fencing them after lost locks (see fs/fences.rs).
    pub gate: Gate,
}

/// A SETLK/SETLKW as the kernel sent it (see `Ops::set_lock`).
#[derive(Clone, Debug)]
pub struct LockRequest {
    pub ino: Ino,
    /// The open handle it came through.
    pub fh: u64,
    /// The kernel's lock owner: a process (classic POSIX locks), an open file (OFD locks, flock).
    pub owner: u64,
    pub kind: LockKind,
    /// `None`: unlock.
    pub typ: Option<LockType>,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

/// A blocking lock request whose lock conflicts asks again after every applied command that may
/// have released a lock of its inode (`Replica::lock_changes`), and at the latest after this
/// long (a guard: no release goes unannounced).
const LOCK_RETRY_MS: u64 = 1_000;
/// A non-blocking lock request that met a conflict asks again when a drop of closed handles'
/// locks finished while it was proposed (the conflict may be gone), at most this often (drops
/// of other files' locks finish all the time on a busy node).
const RETRIES_AFTER_DROPS_MAX: u32 = 4;

/// A setattr of times answered before it is proposed (see `Ops::defer_times`).
#[derive(Clone, Debug)]
struct Deferred {
    caller: Caller,
    ino: Ino,
    atime: Option<Timespec>,
    mtime: Option<Timespec>,
    /// The kernel's ctime of the file, if it sent one: the command's time (so the stored ctime).
    ctime: Option<Timespec>,
    /// When the first setattr merged into this one was answered (the timer counts from it).
    at: Instant,
}

/// A removal of a name whose inode this node holds closed (see `Ops::claim_target`): the inode
/// is claimed (new opens of it here are refused) until the removal is applied, so the command
/// carries it as `expect_closed` and this node owes no Release for it. Dropping it ends the claim.
struct ClosedClaim {
    handles: Arc<Handles>,
    ino: Ino,
}

impl Drop for ClosedClaim {
    fn drop(&mut self) {
        self.handles.unclaim(self.ino);
    }
}

/// How long the kernel may cache attributes and entries by default. All changes made on this
/// node go through this mount, so the kernel's cache stays coherent; other nodes' changes are
/// invalidated explicitly (design decision 8, fs/coherence.rs).
pub const CACHE_TTL_DEFAULT: std::time::Duration = std::time::Duration::from_secs(1);
/// First and longest pause between attempts to settle a claim whose removal timed out (see
/// `Ops::settle`).
const SETTLE_RETRY_MS_MIN: u64 = 50;
const SETTLE_RETRY_MS_MAX: u64 = 2_000;

/// A name as the state accepts it: 1..=NAME_BYTES_MAX bytes, no `/` or NUL.
pub fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_BYTES_MAX {
        return Err(Errno::NameTooLong.into());
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::Inval.into());
    }
    Ok(())
}

impl Ops {
    /// The node's filesystem. Starts the coherence thread on the replica's applied events right
    /// away (before the mount), so no orphan another node creates from now on is missed.
    pub fn new(replica: Arc<Replica>, data_dir: PathBuf) -> Self {
        let handles = Arc::new(Handles::default());
        let coherence = Arc::new(Coherence::default());
        let releases = Arc::new(GatheredReleases::default());
        let hook = orphan_hook(&replica, &handles, &releases, &data_dir);
        if let Err(e) = coherence::start(&replica, coherence.clone(), handles.clone(), hook) {
            // Without it other nodes' changes reach the kernel only when its TTL expires, and
            // their orphans are released at this node's next start.
            tracing::error!(error = %e, "cannot start the cache invalidation thread");
        }
        Ops {
            replica,
            data_dir,
            handles,
            coherence,
            writes: Arc::new(InFlight::default()),
            space_warned_s: AtomicU64::new(0),
            fatal: tokio::sync::watch::Sender::new(None),
            clustered: false,
            cache_ttl: CACHE_TTL_DEFAULT,
            own_writes: std::sync::Mutex::new(HashMap::new()),
            deferred: std::sync::Mutex::new(Vec::new()),
            deferred_timer: std::sync::atomic::AtomicBool::new(false),
            killpriv: std::sync::atomic::AtomicBool::new(false),
            releases,
            lock_waits: LockWaits::default(),
            gate: Gate::default(),
        }
    }

    /// Mark this node as one of a cluster (it listens for peers, even if it has none yet): other
    /// nodes change files behind the kernel's back, so with the writeback cache the kernel's
    /// names of regular files are recorded for eviction (see fs/names.rs).
    pub fn clustered(mut self, clustered: bool) -> Self {
        self.clustered = clustered;
        self
    }

    /// How long the kernel may keep entries and attributes without asking again (`cache_ttl`).
    pub fn cache_ttl(mut self, ttl: std::time::Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// This node's id.
    pub fn node_id(&self) -> crate::state::NodeId {
        self.replica.node_id()
    }

    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// The errno for a failed request. A store fault or fatal proposal error also tells the node
    /// to stop (fail-stop: a node whose store failed must not go on serving doubtful state).
    pub fn errno_of(&self, e: &FsError) -> fuser::Errno {
        if let FsError::Store(_) | FsError::Fatal(_) = e {
            self.fatal.send_if_modified(|reason| {
                let first = reason.is_none();
                if first {
                    *reason = Some(e.to_string());
                }
                first
            });
        }
        e.errno()
    }

    /// Resolves with the reason once a request hit a store failure.
    pub fn watch_fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    fn view(&self) -> FsResult<Box<dyn StateRead + Send>> {
        Ok(self.replica.read()?)
    }

    fn inode_in(r: &dyn StateRead, ino: Ino) -> FsResult<Inode> {
        r.inode(ino)?.ok_or(FsError::Fs(Errno::NoEnt))
    }

    // ---- reads: served from the local replica, never proposed ----

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Inode> {
        check_name(name)?;
        let r = self.view()?;
        let dir = Self::inode_in(&*r, parent)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::NotDir.into());
        }
        let entry = r.entry(parent, name)?.ok_or(FsError::Fs(Errno::NoEnt))?;
        Ok(self.with_deferred(Self::inode_in(&*r, entry.ino)?))
    }

    /// The inode's attributes, with the times of a deferred setattr (see `defer_times`) that
    /// was answered already.
    pub fn getattr(&self, ino: Ino) -> FsResult<Inode> {
        Ok(self.with_deferred(self.stored_attr(ino)?))
    }

    /// The mode a regular file keeps when `caller` changes its size or allocation, if that drops
    /// anything: with `FUSE_HANDLE_KILLPRIV_V2` (see `PickboxFs::init`) the kernel leaves the
    /// setuid/setgid clearing of truncate and fallocate to the filesystem, and Linux clears
    /// setuid, and setgid of a group-executable file, unless the caller has CAP_FSETID (root
    /// here). Writes and copy_file_range clear them in apply (`kill_privs`).
    pub fn mode_without_privs(&self, caller: &Caller, ino: Ino) -> Option<u32> {
        if caller.uid == 0 {
            return None;
        }
        let inode = self.stored_attr(ino).ok()?;
        if inode.kind != FileKind::File {
            return None;
        }
        let mut perm = inode.perm & 0o7777;
        perm &= !libc::S_ISUID;
        if perm & libc::S_IXGRP != 0 {
            perm &= !libc::S_ISGID;
        }
        (perm != inode.perm & 0o7777).then_some(perm)
    }

    /// The kernel negotiated `FUSE_HANDLE_KILLPRIV_V2` (see `killpriv`).
    pub fn set_killpriv(&self, on: bool) {
        self.killpriv.store(on, Ordering::Relaxed);
    }

    fn killpriv(&self) -> bool {
        self.killpriv.load(Ordering::Relaxed)
    }

    /// The inode's attributes as the state holds them.
    fn stored_attr(&self, ino: Ino) -> FsResult<Inode> {
        Self::inode_in(&*self.view()?, ino)
    }

    pub fn readlink(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let inode = self.getattr(ino)?;
        if inode.kind != FileKind::Symlink {
            return Err(Errno::Inval.into());
        }
        Ok(inode.target)
    }

    pub fn read(&self, ino: Ino, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let r = self.view()?;
        let inode = Self::inode_in(&*r, ino)?;
        match inode.kind {
            FileKind::File => Ok(content::read_range(&*r, &inode, offset, u64::from(len))??),
            FileKind::Dir => Err(Errno::IsDir.into()),
            _ => Err(Errno::Inval.into()),
        }
    }

    /// List directory `ino` from after cookie `after`: `.` and `..` first, then entries in cookie
    /// order, each passed to `add` (with its inode when `plus`) until `add` answers "full".
    /// Entries are read from the state in chunks of `READDIR_CHUNK`, all from one read view.
    pub fn list_each(
        &self,
        ino: Ino,
        after: u64,
        plus: bool,
        mut add: impl FnMut(&Listed, Option<&Inode>) -> bool,
    ) -> FsResult<()> {
        let r = self.view()?;
        let dir = Self::inode_in(&*r, ino)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::NotDir.into());
        }
        if after < DOT_COOKIE {
            let me = Listed { name: b".".to_vec(), cookie: DOT_COOKIE, ino, kind: FileKind::Dir };
            if add(&me, plus.then_some(&dir)) {
                return Ok(());
            }
        }
        if after < DOTDOT_COOKIE {
            // The root's parent is the root itself (`Inode::parent` says so for directories).
            let up_ino = if dir.parent == 0 { ino } else { dir.parent };
            let up = if plus { r.inode(up_ino)? } else { None };
            let listed = Listed { name: b"..".to_vec(), cookie: DOTDOT_COOKIE, ino: up_ino, kind: FileKind::Dir };
            if add(&listed, up.as_ref()) {
                return Ok(());
            }
        }
        let mut cursor = after.max(DOTDOT_COOKIE);
        loop {
            let chunk = r.entries_after(ino, cursor, READDIR_CHUNK)?;
            let last_chunk = chunk.len() < READDIR_CHUNK;
            for (name, e) in chunk {
                cursor = e.cookie;
                let inode = if plus {
                    match r.inode(e.ino)? {
                        Some(inode) => Some(self.with_deferred(inode)),
                        None => {
                            // Cannot happen in a consistent state; skip rather than list a dangling name.
                            tracing::warn!(dir = ino, ino = e.ino, "directory entry without an inode");
                            continue;
                        }
                    }
                } else {
                    None
                };
                let listed = Listed { name, cookie: e.cookie, ino: e.ino, kind: e.kind };
                if add(&listed, inode.as_ref()) {
                    return Ok(());
                }
            }
            if last_chunk {
                return Ok(());
            }
        }
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Vec<u8>> {
        if name.len() > XATTR_NAME_BYTES_MAX {
            return Err(Errno::Range.into());
        }
        let r = self.view()?;
        Self::inode_in(&*r, ino)?;
        r.xattr(ino, name)?.ok_or(FsError::Fs(Errno::NoData))
    }

    /// The xattr names of `ino`, each followed by a NUL (the listxattr format).
    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<u8>> {
        let r = self.view()?;
        Self::inode_in(&*r, ino)?;
        let mut out = Vec::new();
        for name in r.xattr_names(ino)? {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    pub fn statfs(&self) -> FsResult<FsStats> {
        let meta = self.view()?.meta()?;
        let vfs = nix::sys::statvfs::statvfs(&self.data_dir).map_err(|e| FsError::Sys(e as i32))?;
        let frag = (vfs.fragment_size() as u64).max(1);
        let scale = |n: u64| n.saturating_mul(frag) / STATFS_BLOCK_BYTES;
        let files_free = vfs.files_free() as u64;
        Ok(FsStats {
            blocks: scale(vfs.blocks() as u64),
            blocks_free: scale(vfs.blocks_free() as u64),
            blocks_avail: scale(vfs.blocks_available() as u64),
            files: meta.inode_count.saturating_add(files_free),
            files_free,
        })
    }

    pub fn lseek(&self, ino: Ino, offset: u64, what: Seek) -> FsResult<u64> {
        let r = self.view()?;
        let inode = Self::inode_in(&*r, ino)?;
        let found = match what {
            Seek::Data => content::seek_data(&*r, &inode, offset)?,
            Seek::Hole => content::seek_hole(&*r, &inode, offset)?,
        };
        Ok(found?)
    }

    /// ENOSPC unless the data directory keeps `SPACE_RESERVE_BYTES` free beyond `bytes`.
    fn check_space(&self, bytes: u64) -> FsResult<()> {
        let vfs = nix::sys::statvfs::statvfs(&self.data_dir).map_err(|e| FsError::Sys(e as i32))?;
        let free = (vfs.blocks_available() as u64).saturating_mul(vfs.fragment_size() as u64);
        if free < SPACE_RESERVE_BYTES.saturating_add(bytes) {
            // Once per SPACE_WARN_INTERVAL_S, not once per refused write.
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let last = self.space_warned_s.swap(now, Ordering::Relaxed);
            if now.saturating_sub(last) >= SPACE_WARN_INTERVAL_S {
                tracing::warn!(free, bytes, reserve = SPACE_RESERVE_BYTES, "data directory nearly full: refusing growing writes (ENOSPC)");
            } else {
                self.space_warned_s.store(last, Ordering::Relaxed);
            }
            return Err(Errno::NoSpace.into());
        }
        Ok(())
    }

    // ---- opens: node-local ----

    /// Close-to-open across nodes (design decision 7): wait until the local replica has applied
    /// everything the leader had committed (read index), and, with `invalidated`, until the
    /// kernel has been told about every remote change up to there. Without quorum the read
    /// barrier fails: reads go on from the local replica (decision 10), so this only logs.
    /// Whether `catch_up(false)` would return at once (see `Replica::read_barrier_ready`).
    pub fn caught_up(&self) -> bool {
        self.replica.read_barrier_ready()
    }

    /// Whether `catch_up(true)` would return at once: `caught_up`, and the invalidation thread
    /// has handled every event up to what this node applied.
    pub fn caught_up_and_told(&self) -> bool {
        self.caught_up() && self.coherence.watermark() >= self.told_target()
    }

    /// The event index up to which the kernel must have been told of other nodes' changes for
    /// everything applied here: only applies that touched something send an event, so entries
    /// after the last event need no invalidation. The applied index is read first: every event
    /// up to it was sent before openraft counted it as applied.
    fn told_target(&self) -> u64 {
        let applied = self.replica.applied_index().unwrap_or(0);
        applied.min(self.replica.last_event_index())
    }

    pub async fn catch_up(&self, invalidated: bool) {
        if let Err(e) = self.replica.read_barrier().await {
            tracing::debug!(error = %e, "read barrier failed: serving from the local replica");
        }
        if invalidated {
            self.coherence.wait_for(self.told_target()).await;
        }
    }

    pub fn open(&self, ino: Ino, flags: i32) -> FsResult<u64> {
        let fh = self.register(ino, flags)?;
        let inode = match self.getattr(ino) {
            Ok(inode) => inode,
            Err(e) => {
                self.handles.release(fh);
                return Err(e);
            }
        };
        if inode.kind == FileKind::Dir && (flags & libc::O_ACCMODE) != libc::O_RDONLY {
            self.handles.release(fh);
            return Err(Errno::IsDir.into());
        }
        Ok(fh)
    }

    /// Record an open of `ino`, unless it is going away: a release of it is in progress here, or
    /// it is an orphan this node has already released (or never held), so another node's release
    /// could free it under the new handle. The state is read *after* the handle is registered,
    /// so a release that starts later sees the handle (see handles.rs).
    fn register(&self, ino: Ino, flags: i32) -> FsResult<u64> {
        let fh = self.handles.open_unless_claimed(ino, flags).ok_or(FsError::Fs(Errno::NoEnt))?;
        let alive = (|| -> FsResult<bool> {
            let r = self.view()?;
            Ok(match r.inode(ino)? {
                None => false,
                Some(inode) if inode.nlink == 0 && inode.kind != FileKind::Dir => {
                    r.orphan(ino)?.is_some_and(|o| o.pending.contains(&self.replica.node_id()))
                }
                Some(_) => true,
            })
        })();
        match alive {
            Ok(true) => Ok(fh),
            Ok(false) => {
                self.handles.release(fh);
                Err(Errno::NoEnt.into())
            }
            Err(e) => {
                self.handles.release(fh);
                Err(e)
            }
        }
    }

    /// The last close on this node of an orphan (open-unlinked) inode tells the cluster.
    pub async fn release(self: &Arc<Self>, fh: u64) {
        if let Some(rest) = self.release_handle(fh) {
            rest.await;
        }
    }

    /// Close handle `fh` now; if that leaves something to do (the last close of an inode another
    /// node's change marked stale, or of an orphan this node must release), the future that does
    /// it. A plain close needs no task (most closes).
    pub fn release_handle(self: &Arc<Self>, fh: u64) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let (ino, last) = self.handles.release(fh)?;
        if !last {
            return None;
        }
        let stale = self.handles.take_stale(ino);
        if !stale && !orphan_pending_here(&self.replica, ino) {
            return None;
        }
        let this = self.clone();
        Some(async move {
            if stale {
                // Sending notifications may block (kernel locks): not on a tokio worker.
                let coherence = this.coherence.clone();
                tokio::task::spawn_blocking(move || coherence.evict(ino));
            }
            release_unless_open(&this.replica, &this.handles, ino).await;
        })
    }

    /// After an unlink or a replacing rename (its outcome is the inode that lost a name): if that
    /// was its last name and the command did not carry it as `expect_closed` (it is open here,
    /// had other names when proposed, or another node's rename put it under the name meanwhile),
    /// it waits for this node's release: at once unless a handle here holds it (then its last
    /// close does). In the background: the removal itself is answered after one round.
    fn release_removed(&self, outcome: &Outcome, expect_closed: Option<Ino>) {
        let Outcome::Inode(removed) = outcome else { return };
        if removed.nlink != 0 || expect_closed == Some(removed.ino) {
            return;
        }
        let (replica, handles, ino) = (self.replica.clone(), self.handles.clone(), removed.ino);
        tokio::spawn(async move { release_unless_open(&replica, &handles, ino).await });
    }

    /// At start no handle is open, so every orphan still pending on this node can be released.
    pub async fn release_stale_orphans(&self) -> FsResult<usize> {
        let me = self.replica.node_id();
        let orphans = self.view()?.orphans()?;
        let mut released = 0;
        for (ino, orphan) in orphans {
            if orphan.pending.contains(&me) {
                self.replica.propose(Caller::root(), Op::Release { ino }).await?;
                released += 1;
            }
        }
        Ok(released)
    }

    // ---- mutations: one proposed command each ----

    /// Propose `op`, with any deferred times setattrs queued just before it (same batch; they
    /// come first, so a later change of the same inode wins).
    async fn propose(&self, caller: Caller, op: impl Into<HashedOp>) -> FsResult<Outcome> {
        self.propose_timed(caller, op, None).await
    }

    /// `propose`, the command stamped with `time` if given (see `Replica::propose_at`), with
    /// this node's clock otherwise.
    async fn propose_timed(&self, caller: Caller, op: impl Into<HashedOp>, time: Option<Timespec>) -> FsResult<Outcome> {
        let op = op.into();
        tracing::debug!(op = op_kind(op.op()), "proposing");
        // A change of a file whose locks this node lost fails here (fs/fences.rs); one that
        // passes is waited for before the expiry is acknowledged.
        let _pass = self.gate.pass(op.op(), |ino| self.handles.is_fenced(ino))?;
        let proposal = self.replica.propose_at(caller, op, time);
        let taken = std::mem::take(&mut *self.deferred());
        let releases = self.releases.take();
        if taken.is_empty() && releases.is_empty() {
            return Ok(proposal.await?);
        }
        // Polled in order, so the deferred setattrs and the releases join the proposal's batch.
        let ((), (), outcome) = tokio::join!(
            self.propose_all(taken),
            release_all(&self.replica, &self.handles, releases),
            proposal
        );
        Ok(outcome?)
    }

    /// The inode a command returned, or (for an outcome without one) the inode as read now.
    fn inode_of(&self, outcome: Outcome, ino: Ino) -> FsResult<Inode> {
        match outcome {
            Outcome::Inode(inode) | Outcome::Written { attr: inode, .. } => Ok(inode),
            Outcome::Done => self.getattr(ino),
        }
    }

    pub async fn make_node(
        &self,
        caller: Caller,
        parent: Ino,
        name: Vec<u8>,
        kind: FileKind,
        perm: u32,
        rdev: u32,
        umask: u32,
    ) -> FsResult<Inode> {
        check_name(&name)?;
        // Unmasked: apply masks it with the umask unless the parent has a default ACL.
        let op = Op::MakeNodeUnmasked { parent, name: name.clone(), kind, perm: perm & 0o7777, umask, rdev };
        match self.propose(caller, op).await? {
            Outcome::Inode(inode) => Ok(inode),
            Outcome::Done | Outcome::Written { .. } => self.lookup(parent, &name),
        }
    }

    /// create(2): make a regular file and open it. Without O_EXCL an existing file (created by a
    /// racing command) is opened instead, as open(O_CREAT) would.
    pub async fn create(&self, caller: Caller, parent: Ino, name: Vec<u8>, perm: u32, umask: u32, flags: i32) -> FsResult<(Inode, u64)> {
        let made = self.make_node(caller, parent, name.clone(), FileKind::File, perm, 0, umask).await;
        let inode = match made {
            Err(FsError::Fs(Errno::Exist)) if flags & libc::O_EXCL == 0 => self.lookup(parent, &name)?,
            other => other?,
        };
        let fh = self.register(inode.ino, flags)?;
        Ok((inode, fh))
    }

    pub async fn symlink(&self, caller: Caller, parent: Ino, name: Vec<u8>, target: Vec<u8>) -> FsResult<Inode> {
        check_name(&name)?;
        if target.len() > SYMLINK_BYTES_MAX {
            return Err(Errno::NameTooLong.into());
        }
        let op = Op::Symlink { parent, name: name.clone(), target };
        match self.propose(caller, op).await? {
            Outcome::Inode(inode) => Ok(inode),
            Outcome::Done | Outcome::Written { .. } => self.lookup(parent, &name),
        }
    }

    pub async fn link(&self, caller: Caller, ino: Ino, new_parent: Ino, new_name: Vec<u8>) -> FsResult<Inode> {
        check_name(&new_name)?;
        let outcome = self.propose(caller, Op::Link { ino, new_parent, new_name }).await?;
        self.inode_of(outcome, ino)
    }

    /// Claim the inode `(parent, name)` names for its removal, if this node can vouch that it does
    /// not hold it open (see `ClosedClaim`): a non-directory whose only name this is (a claim on
    /// an inode with other names would refuse opens through them) and that no handle here holds.
    /// An open racing with the removal is then ordered after it (ENOENT), even if the removal
    /// fails (a concurrent unlink without permission: that open fails spuriously). `None`: the
    /// removal carries no expectation, and this node releases the inode afterwards if needed.
    fn claim_target(&self, parent: Ino, name: &[u8]) -> FsResult<Option<ClosedClaim>> {
        let r = self.view()?;
        let Some(entry) = r.entry(parent, name)? else { return Ok(None) };
        if entry.kind == FileKind::Dir || r.inode(entry.ino)?.is_none_or(|i| i.nlink != 1) {
            return Ok(None);
        }
        drop(r);
        if !self.handles.claim_if_closed(entry.ino) {
            return Ok(None);
        }
        Ok(Some(ClosedClaim { handles: self.handles.clone(), ino: entry.ino }))
    }

    /// Propose a removal that carries `claim` as `expect_closed`, end the claim once its outcome
    /// is known, and release what it left pending on this node (`release_removed`).
    async fn propose_removal(&self, caller: Caller, op: Op, claim: Option<ClosedClaim>) -> FsResult<()> {
        let expect_closed = claim.as_ref().map(|c| c.ino);
        match self.propose(caller, op).await {
            Ok(outcome) => {
                drop(claim);
                self.release_removed(&outcome, expect_closed);
                Ok(())
            }
            Err(FsError::Unavailable(why)) => {
                if let Some(claim) = claim {
                    self.settle(claim);
                }
                Err(FsError::Unavailable(why))
            }
            Err(e) => Err(e),
        }
    }

    /// A removal that timed out may still be applied later (it reached a leader's log); until
    /// then its claim must hold, or an open here could be freed under its handle by the other
    /// nodes' releases. Once any later command of this node has been applied, the removal either
    /// was applied before it or never will be (its sequence number is stale). So propose a
    /// Release of the claimed inode (harmless: nothing unless it is an orphan waiting for this
    /// node, which it may be released from, being claimed), retrying until it is applied, and
    /// end the claim then.
    fn settle(&self, claim: ClosedClaim) {
        let replica = self.replica.clone();
        tokio::spawn(async move {
            let mut pause_ms = SETTLE_RETRY_MS_MIN;
            loop {
                match replica.propose(Caller::root(), Op::Release { ino: claim.ino }).await {
                    Ok(_) | Err(ProposeError::Fs(_)) | Err(ProposeError::Fatal(_)) => break,
                    Err(ProposeError::Unavailable(why)) => {
                        tracing::debug!(ino = claim.ino, %why, "claim of a removal with unknown outcome still held");
                        tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
                        pause_ms = (pause_ms * 2).min(SETTLE_RETRY_MS_MAX);
                    }
                }
            }
            drop(claim);
        });
    }

    pub async fn unlink(&self, caller: Caller, parent: Ino, name: Vec<u8>) -> FsResult<()> {
        check_name(&name)?;
        let claim = self.claim_target(parent, &name)?;
        let expect_closed = claim.as_ref().map(|c| c.ino);
        self.propose_removal(caller, Op::Unlink { parent, name, expect_closed }, claim).await
    }

    pub async fn rmdir(&self, caller: Caller, parent: Ino, name: Vec<u8>) -> FsResult<()> {
        check_name(&name)?;
        self.propose(caller, Op::Rmdir { parent, name }).await?;
        Ok(())
    }

    pub async fn rename(
        &self,
        caller: Caller,
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: RenameFlags,
    ) -> FsResult<()> {
        check_name(&name)?;
        check_name(&new_name)?;
        if flags.noreplace && flags.exchange {
            return Err(Errno::Inval.into());
        }
        // An exchange removes nothing; otherwise a replaced target may be open here (or be opened
        // while the rename is in flight): see `claim_target`.
        let claim = if flags.exchange { None } else { self.claim_target(new_parent, &new_name)? };
        let expect_closed = claim.as_ref().map(|c| c.ino);
        let op = Op::Rename { parent, name, new_parent, new_name, flags, expect_closed };
        self.propose_removal(caller, op, claim).await
    }

    /// Remember the mtime this node's write just gave `inode`.
    fn note_own_write(&self, inode: &Inode) {
        let mut m = self.own_writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if m.len() >= OWN_WRITES_MAX && !m.contains_key(&inode.ino) {
            m.clear();
        }
        m.insert(inode.ino, inode.mtime);
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, Vec<Deferred>> {
        self.deferred.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `inode` with the times a deferred setattr of it will give it (what it will hold).
    fn with_deferred(&self, mut inode: Inode) -> Inode {
        let deferred = self.deferred();
        if deferred.is_empty() {
            return inode;
        }
        if let Some(d) = deferred.iter().find(|d| d.ino == inode.ino) {
            inode.atime = d.atime.unwrap_or(inode.atime);
            inode.mtime = d.mtime.unwrap_or(inode.mtime);
            inode.ctime = d.ctime.unwrap_or(inode.ctime);
        }
        inode
    }

    /// The inode, if a setattr of only times (with the writeback cache) needs no Raft round:
    /// each given time is the one the inode holds already, counting a deferred setattr still
    /// waiting (see `defer_times`); the kernel sends its cached mtime again whenever it writes
    /// the inode back, for example around a rename. `Some(Err(ENOENT))` for an inode that is
    /// gone: the kernel writes back the times of an unlinked file when it evicts it, after the
    /// unlink freed it; inode numbers are never reused, so a proposal could only fail the same
    /// way.
    pub fn unchanged_times(&self, ino: Ino, atime: Option<&SetTime>, mtime: Option<&SetTime>) -> Option<FsResult<Inode>> {
        let inode = match self.getattr(ino) {
            Ok(inode) => inode,
            Err(FsError::Fs(Errno::NoEnt)) => return Some(Err(Errno::NoEnt.into())),
            Err(_) => return None,
        };
        let same = |given: Option<&SetTime>, have: &Timespec| match given {
            None => true,
            Some(SetTime::At(t)) => t == have,
            Some(SetTime::Now) => false,
        };
        (same(mtime, &inode.mtime) && same(atime, &inode.atime)).then_some(Ok(inode))
    }

    /// With the writeback cache the kernel owns mtime and ctime of a cached regular file: after
    /// writing the dirty pages back (WRITE, whose command sets mtime to the command's time) it
    /// sends its own mtime, taken at write(2), as a setattr, and close(2) waits for it; tar and
    /// cp -p then set both times explicitly. Such a setattr is answered at once (with the times
    /// it sets) and proposed later, together with the next proposal of this node (one log
    /// entry, one fsync: a create loop pays 2 rounds per file, not 3), or after
    /// `DEFERRED_TIMES_MS`, or at fsync or unmount. Only when its outcome is certain: explicit
    /// times (not "now") for a regular file whose last change was this node's own write (so the
    /// kernel holds it cached and shows its own mtime/ctime), set by its owner or root (allowed
    /// to set times). A crash in that window keeps the write's own mtime. `ctime`, the kernel's
    /// own (see `setattr`), becomes the stored ctime. Returns the inode to answer with, or
    /// `None`: propose now.
    pub fn defer_times(
        &self,
        caller: &Caller,
        ino: Ino,
        atime: Option<&SetTime>,
        mtime: Option<&SetTime>,
        ctime: Option<Timespec>,
    ) -> Option<Inode> {
        let explicit = |t: Option<&SetTime>| match t {
            None => Some(None),
            Some(SetTime::At(t)) => Some(Some(*t)),
            Some(SetTime::Now) => None,
        };
        let (atime, mtime) = (explicit(atime)?, explicit(mtime)?);
        if atime.is_none() && mtime.is_none() {
            return None;
        }
        let inode = self.stored_attr(ino).ok()?;
        if inode.kind != FileKind::File || !(caller.uid == 0 || caller.uid == inode.uid) {
            return None;
        }
        let own = self.own_writes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(&ino).copied();
        if own != Some(inode.mtime) {
            return None;
        }
        {
            let mut d = self.deferred();
            if let Some(e) = d.iter_mut().find(|e| e.ino == ino) {
                e.caller = caller.clone();
                e.atime = atime.or(e.atime);
                e.mtime = mtime.or(e.mtime);
                e.ctime = ctime.max(e.ctime);
            } else if d.len() < DEFERRED_TIMES_MAX {
                d.push(Deferred { caller: caller.clone(), ino, atime, mtime, ctime, at: Instant::now() });
            } else {
                return None;
            }
        }
        Some(self.with_deferred(inode))
    }

    /// True if the caller should run `deferred_timer` (no such task runs yet).
    pub fn arm_deferred_timer(&self) -> bool {
        !self.deferred_timer.swap(true, Ordering::AcqRel)
    }

    /// Proposes the deferred times setattrs once the oldest has waited `DEFERRED_TIMES_MS`
    /// (counted from it, not from when the timer started: a proposal may have taken the older
    /// ones along meanwhile), for as long as any are waiting.
    pub async fn deferred_timer(&self) {
        let oldest = || self.deferred().iter().map(|d| d.at).min();
        let window = || Duration::from_millis(DEFERRED_TIMES_MS);
        when_due(&self.deferred_timer, oldest, window, || self.propose_deferred()).await;
    }

    /// Propose every deferred times setattr now (the timer, fsync, unmount).
    pub async fn propose_deferred(&self) {
        let taken = std::mem::take(&mut *self.deferred());
        self.propose_all(taken).await;
    }

    /// Release now the other nodes' orphans gathered for a later release (at unmount).
    pub async fn release_gathered(&self) {
        release_all(&self.replica, &self.handles, self.releases.take()).await;
    }

    /// Propose `taken` (deferred setattrs) concurrently: each is queued on its first poll, in
    /// order, so they join the same batch as a proposal polled right after them.
    async fn propose_all(&self, taken: Vec<Deferred>) {
        let proposals = taken.into_iter().map(|d| async move {
            let (atime, mtime) = (d.atime.map(SetTime::At), d.mtime.map(SetTime::At));
            let op = Op::SetAttr { ino: d.ino, perm: None, uid: None, gid: None, size: None, atime, mtime };
            tracing::debug!(op = "SetAttr", ino = d.ino, "proposing deferred");
            if let Err(e) = self.replica.propose_at(d.caller, op, d.ctime).await {
                // ENOENT: the file was removed meanwhile; anything else keeps the write's mtime.
                tracing::debug!(ino = d.ino, error = %e, "deferred times not stored");
            }
        });
        futures::future::join_all(proposals).await;
    }

    #[allow(clippy::too_many_arguments)] // reason: one parameter per attribute setattr can change
    pub async fn setattr(
        &self,
        caller: Caller,
        ino: Ino,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
        ctime: Option<Timespec>,
    ) -> FsResult<Inode> {
        tracing::debug!(ino, ?perm, ?uid, ?gid, ?size, ?atime, ?mtime, ?ctime, "setattr");
        if perm.is_none() && uid.is_none() && gid.is_none() && size.is_none() && atime.is_none() && mtime.is_none() {
            // Nothing we store changes (for example only ctime was given): report the attributes.
            return self.getattr(ino);
        }
        // A truncate by a caller without CAP_FSETID clears setuid/setgid (with killpriv the
        // kernel leaves that to us; see `mode_without_privs`).
        let perm = match perm {
            None if size.is_some() && self.killpriv() => self.mode_without_privs(&caller, ino),
            given => given,
        };
        let op = Op::SetAttr { ino, perm: perm.map(|p| p & 0o7777), uid, gid, size, atime, mtime };
        // With the writeback cache the kernel sends its own ctime of a regular file with every
        // setattr of it, keeps showing that ctime whatever the reply says, and the command's time
        // is what apply stores as ctime: so the node that made the change, the other nodes, and
        // this node once its kernel forgets the inode all show the same ctime.
        let outcome = self.propose_timed(caller, op, ctime).await?;
        self.inode_of(outcome, ino)
    }

    /// `write_hashed` of `data` at `offset`, hashed here (the tests' way in).
    #[cfg(test)]
    pub async fn write(&self, caller: Caller, ino: Ino, offset: u64, data: Vec<u8>, append: bool) -> FsResult<u64> {
        self.write_hashed(caller, HashedOp::new(Op::Write { ino, offset, data, append })).await
    }

    /// Propose an `Op::Write` (data at `offset`, or at the end of the file when `append`: O_APPEND,
    /// the state decides where the end is, so concurrent appenders never overwrite each other),
    /// already hashed by the fuser thread that received the data.
    pub async fn write_hashed(&self, caller: Caller, op: HashedOp) -> FsResult<u64> {
        self.check_space(op.op().payload().len() as u64)?;
        match self.propose(caller, op).await? {
            Outcome::Written { len, attr } => {
                self.note_own_write(&attr);
                Ok(len)
            }
            other => {
                tracing::error!(?other, "write returned an unexpected outcome");
                Err(Errno::Io.into())
            }
        }
    }

    pub async fn fallocate(&self, caller: Caller, ino: Ino, offset: u64, len: u64, mode: FallocMode) -> FsResult<()> {
        if matches!(mode, FallocMode::Allocate { .. } | FallocMode::ZeroRange { .. }) {
            // Zeros are holes in the block map, so this needs little space; keep the reserve anyway.
            self.check_space(0)?;
        }
        if self.killpriv() {
            if let Some(perm) = self.mode_without_privs(&caller, ino) {
                let op = Op::SetAttr { ino, perm: Some(perm), uid: None, gid: None, size: None, atime: None, mtime: None };
                self.propose(caller.clone(), op).await?;
            }
        }
        self.propose(caller, Op::Fallocate { ino, offset, len, mode }).await?;
        Ok(())
    }

    pub async fn copy_range(
        &self,
        caller: Caller,
        ino_in: Ino,
        offset_in: u64,
        ino_out: Ino,
        offset_out: u64,
        len: u64,
    ) -> FsResult<u64> {
        // Copied blocks are shared by hash; only partial blocks at the edges take new space.
        self.check_space(0)?;
        let op = Op::CopyRange { ino_in, offset_in, ino_out, offset_out, len };
        match self.propose(caller, op).await? {
            Outcome::Written { len, .. } => Ok(len),
            other => {
                tracing::error!(?other, "copy_file_range returned an unexpected outcome");
                Err(Errno::Io.into())
            }
        }
    }

    pub async fn setxattr(&self, caller: Caller, ino: Ino, name: Vec<u8>, value: Vec<u8>, flags: XattrFlags) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
            return Err(Errno::Range.into());
        }
        if value.len() > XATTR_VALUE_BYTES_MAX {
            return Err(Errno::TooBig.into());
        }
        self.check_space(value.len() as u64)?;
        self.propose(caller, Op::SetXattr { ino, name, value, flags }).await?;
        Ok(())
    }

    pub async fn removexattr(&self, caller: Caller, ino: Ino, name: Vec<u8>) -> FsResult<()> {
        if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX {
            return Err(Errno::Range.into());
        }
        self.propose(caller, Op::RemoveXattr { ino, name }).await?;
        Ok(())
    }
}

impl Ops {
    /// The lock owner `owner` of this node's current run.
    fn lock_owner(&self, owner: u64) -> LockOwner {
        LockOwner { node: self.replica.node_id(), incarnation: self.replica.incarnation(), id: owner }
    }

    /// SETLK/SETLKW: take, change or drop a lock, cluster-wide (`Op::Lock`). A request whose lock
    /// conflicts gets EAGAIN, or, if it may wait (`interrupted` is given), waits until a lock may
    /// have been released anywhere and asks again, until it gets the lock or `interrupted` fires
    /// (`Ok(false)`: answer EINTR).
    pub async fn set_lock(
        &self,
        caller: Caller,
        req: LockRequest,
        mut interrupted: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> FsResult<bool> {
        let op = Op::Lock {
            ino: req.ino,
            incarnation: self.replica.incarnation(),
            owner: req.owner,
            kind: req.kind,
            typ: req.typ,
            start: req.start,
            end: req.end,
            pid: req.pid,
        };
        let mut changes = self.replica.lock_changes();
        let mut settled = false;
        let mut retries_after_drops = 0;
        loop {
            // Only releases applied from now on count (a fresh receiver starts at the tail).
            changes = changes.resubscribe();
            let drops_before = self.lock_waits.drops_done();
            // Only requests that take a lock: an unlock may run beside a drop of its owner.
            let requesting = match req.typ {
                Some(_) => Some(self.lock_waits.request(req.ino, req.owner).await),
                None => None,
            };
            let proposed = self.propose(caller.clone(), op.clone()).await;
            if proposed.is_ok() && req.typ.is_some() {
                self.lock_waits.took(req.fh, req.ino, req.owner);
            }
            drop(requesting);
            match proposed {
                Ok(_) => {
                    if req.typ.is_some() {
                        if self.clustered {
                            // What the previous holder wrote under the lock (on another node,
                            // committed before its unlock, so applied here before this lock)
                            // is not read from a stale page cache: the invalidations for
                            // everything applied so far are sent before the lock is granted.
                            self.coherence.wait_for(self.told_target()).await;
                        }
                    }
                    return Ok(true);
                }
                Err(FsError::Fs(Errno::Again)) => {
                    let Some(interrupted) = interrupted.as_mut() else {
                        // The conflict may be a lock of a file closed here just before, whose
                        // release is still under way (or was applied just after this request):
                        // ask again when it is done. A drop finished meanwhile does not use up
                        // the wait for a RELEASE still to come: the drop may have been another
                        // file's (seen with RELEASEs 20 ms late: 10 of 750 relocks failed).
                        let dropped = self.lock_waits.drops_done() != drops_before;
                        if dropped && retries_after_drops < RETRIES_AFTER_DROPS_MAX {
                            retries_after_drops += 1;
                            continue;
                        }
                        if !settled
                            && self.lock_waits.settle(req.ino, self.replica.propose_timeout(), || self.writes.any()).await
                        {
                            settled = true;
                            continue;
                        }
                        return Err(Errno::Again.into());
                    };
                    tracing::debug!(ino = req.ino, owner = req.owner, "lock request waits for a conflicting lock");
                    let released = async {
                        loop {
                            match changes.recv().await {
                                Ok(LockChange::Inode(ino)) if ino != req.ino => continue,
                                // This inode, any inode, or missed changes (lagged): ask again.
                                Ok(_) | Err(RecvError::Lagged(_)) => return true,
                                Err(RecvError::Closed) => return false,
                            }
                        }
                    };
                    tokio::select! {
                        open = released => {
                            if !open {
                                return Err(FsError::Unavailable("the node is stopping".into()));
                            }
                        }
                        _ = interrupted => return Ok(false),
                        _ = tokio::time::sleep(Duration::from_millis(LOCK_RETRY_MS)) => {}
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// GETLK: the first lock of another owner that would conflict with the one described, as the
    /// cluster had it when the request arrived (read index first, as an open).
    pub async fn get_lock(&self, ino: Ino, owner: u64, kind: LockKind, typ: LockType, start: u64, end: u64) -> FsResult<Option<Lock>> {
        self.catch_up(false).await;
        let owner = self.lock_owner(owner);
        Ok(self.view()?.locks(ino)?.conflict(&owner, kind, typ, start, end).cloned())
    }

    /// Whether the process `owner` (a FLUSH's lock owner) may hold POSIX locks on `ino` through
    /// this node: false without a look at the state when this run has taken no lock at all.
    pub fn may_hold_posix_locks(&self, ino: Ino, owner: u64) -> bool {
        if !self.lock_waits.ever_locked() {
            return false;
        }
        let (node, incarnation) = (self.replica.node_id(), self.replica.incarnation());
        match self.view().and_then(|v| Ok(v.locks(ino)?)) {
            Ok(table) => table.holds(node, incarnation, owner, Some(LockKind::Posix)),
            Err(_) => true,
        }
    }

    /// FLUSH (every close of a descriptor): the closing process's POSIX locks on `ino` go, as
    /// POSIX says (the kernel sends no unlock for them).
    pub async fn release_posix_locks(&self, ino: Ino, owner: u64) -> FsResult<()> {
        let op = Op::ReleaseLocks { ino, incarnation: self.replica.incarnation(), owners: vec![owner], kind: Some(LockKind::Posix) };
        self.propose(Caller::root(), op).await?;
        Ok(())
    }

    /// RELEASE (the last close of an open file): the flock and OFD locks that `owners` took through
    /// it on `ino` go (the kernel sends no unlock for them). Failures are logged: the locks then
    /// stay until this node restarts (it drops its earlier runs' locks at start) or is removed.
    pub async fn release_handle_locks(&self, ino: Ino, owners: Vec<u64>) {
        self.drop_handle_locks(ino, &owners).await;
        self.lock_waits.release_done(ino, &owners);
    }

    async fn drop_handle_locks(&self, ino: Ino, owners: &[u64]) {
        let incarnation = self.replica.incarnation();
        let node = self.replica.node_id();
        let held = match self.view().and_then(|v| Ok(v.locks(ino)?)) {
            Ok(table) => owners.iter().copied().filter(|o| table.holds(node, incarnation, *o, None)).collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!(ino, error = %e, "reading locks at a close");
                owners.to_vec()
            }
        };
        if held.is_empty() {
            return;
        }
        if let Err(e) = self.propose(Caller::root(), Op::ReleaseLocks { ino, incarnation, owners: held, kind: None }).await {
            tracing::warn!(ino, error = %e, "the locks of a closed file could not be released; they go when this node restarts");
        }
    }
}

/// The name of an op's variant, for logs (without its data).
fn op_kind(op: &Op) -> &'static str {
    match op {
        Op::Init { .. } => "Init",
        Op::RegisterNode { .. } => "RegisterNode",
        Op::UnregisterNode { .. } => "UnregisterNode",
        Op::MakeNode { .. } => "MakeNode",
        Op::MakeNodeUnmasked { .. } => "MakeNodeUnmasked",
        Op::Symlink { .. } => "Symlink",
        Op::Link { .. } => "Link",
        Op::Unlink { .. } => "Unlink",
        Op::Rmdir { .. } => "Rmdir",
        Op::Rename { .. } => "Rename",
        Op::SetAttr { .. } => "SetAttr",
        Op::Write { .. } => "Write",
        Op::Fallocate { .. } => "Fallocate",
        Op::CopyRange { .. } => "CopyRange",
        Op::SetXattr { .. } => "SetXattr",
        Op::RemoveXattr { .. } => "RemoveXattr",
        Op::Release { .. } => "Release",
        Op::Lock { .. } => "Lock",
        Op::ReleaseLocks { .. } => "ReleaseLocks",
        Op::DropStaleLocks { .. } => "DropStaleLocks",
        Op::ExpireLocks { .. } => "ExpireLocks",
        Op::AckLockExpiry { .. } => "AckLockExpiry",
    }
}

/// Release orphan `ino` for this node unless a handle here holds it (then its last close does).
/// The claim keeps new opens of `ino` out until the release is applied. Only an orphan waiting
/// for this node is claimed (a last close of an ordinary file must not refuse a concurrent
/// open); reading that before claiming is safe because every caller that can find it pending
/// (the last close, the releaser after an unlink, the coherence thread) reads after the removal
/// was applied, or is followed by one that does.
/// Whether `ino` is an orphan this node has yet to release.
fn orphan_pending_here(replica: &Replica, ino: Ino) -> bool {
    match replica.read().and_then(|r| r.orphan(ino)) {
        Ok(orphan) => orphan.is_some_and(|o| o.pending.contains(&replica.node_id())),
        Err(fault) => {
            tracing::error!(%fault, ino, "cannot read orphan record");
            false
        }
    }
}

async fn release_unless_open(replica: &Replica, handles: &Handles, ino: Ino) {
    if !orphan_pending_here(replica, ino) || !handles.claim_if_closed(ino) {
        return;
    }
    struct Claim<'a>(&'a Handles, Ino);
    impl Drop for Claim<'_> {
        fn drop(&mut self) {
            self.0.unclaim(self.1);
        }
    }
    let _claim = Claim(handles, ino);
    tracing::debug!(op = "Release", ino, "proposing");
    if let Err(e) = replica.propose(Caller::root(), Op::Release { ino }).await {
        tracing::warn!(ino, error = %e, "release of an open-unlinked inode failed; retried at next start");
    }
}

/// Other nodes' orphans are released at the latest this long after this node learnt of them,
/// all gathered in one batch, and earlier together with this node's next proposal (same log
/// entry): a stream of removals elsewhere costs this node at most one log entry per window, and
/// the releases stay off the path of other changes. Each entry is one more round that every
/// node must receive and apply, and a read index taken meanwhile waits for it: at 20 ms, the
/// releases of a cross-node visibility loop with removals landed in 17% of the samples and made
/// up its slowest tenth (a create seen on the other node, 4 runs of 200: p90 1.3-1.7 ms, p99
/// 2.5-2.9 ms; with this window and `when_due` p90 0.97-1.09 ms, p99 1.2-1.6 ms in 3 runs, 2.9
/// in one). Holding an orphan longer is safe (its blocks are freed later); where space is short
/// it is not kind, see `RELEASE_GATHER_LOW_SPACE_MS`.
pub const RELEASE_GATHER_MS: u64 = 1000;
/// The gather window while the data directory has less than `RELEASE_PROMPT_FREE_BYTES` free:
/// someone removing files to make room gets the space back at once.
pub const RELEASE_GATHER_LOW_SPACE_MS: u64 = 20;
/// Free space of the data directory below which orphans are released promptly.
pub const RELEASE_PROMPT_FREE_BYTES: u64 = 1024 * 1024 * 1024;

/// Other nodes' orphans waiting for this node's release (see `RELEASE_GATHER_MS`).
#[derive(Default)]
struct GatheredReleases {
    /// Each with when this node learnt of it, oldest first.
    inos: std::sync::Mutex<Vec<(Instant, Ino)>>,
    /// A task that releases `inos` once the oldest is due runs.
    timer: std::sync::atomic::AtomicBool,
}

impl GatheredReleases {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Ino)>> {
        self.inos.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn take(&self) -> Vec<Ino> {
        std::mem::take(&mut *self.lock()).into_iter().map(|(_, ino)| ino).collect()
    }
}

/// The timer of things gathered to be proposed later (deferred times setattrs, releases): waits
/// until the oldest gathered (`oldest`) is `window` old, runs `flush` (which takes them all),
/// and goes on while anything is gathered. With nothing left it disarms `armed`, unless
/// something arrived meanwhile that found it still armed (and so started no timer of its own).
async fn when_due<F, Fut>(
    armed: &std::sync::atomic::AtomicBool,
    oldest: impl Fn() -> Option<Instant>,
    window: impl Fn() -> Duration,
    flush: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        match oldest() {
            Some(at) => {
                let due = at + window();
                if Instant::now() < due {
                    tokio::time::sleep_until(due.into()).await;
                } else {
                    flush().await;
                }
            }
            None => {
                armed.store(false, Ordering::Release);
                if oldest().is_none() || armed.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    }
}

/// Release each of `inos` unless a handle here holds it; queued on the first poll, in order, so
/// they share a batch (with a proposal polled right after them, too).
async fn release_all(replica: &Replica, handles: &Handles, inos: Vec<Ino>) {
    futures::future::join_all(inos.into_iter().map(|ino| release_unless_open(replica, handles, ino))).await;
}

/// How long orphans may wait for their release (see `RELEASE_GATHER_MS`).
fn release_gather(data_dir: &std::path::Path) -> Duration {
    let free = nix::sys::statvfs::statvfs(data_dir)
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
        .unwrap_or(0);
    let ms = if free < RELEASE_PROMPT_FREE_BYTES { RELEASE_GATHER_LOW_SPACE_MS } else { RELEASE_GATHER_MS };
    Duration::from_millis(ms)
}

/// What the coherence thread does with an orphan another node created: release it on the
/// runtime unless a handle here holds it, gathered in `releases` with the others of the window
/// (see `RELEASE_GATHER_MS`) or until this node's next proposal takes them along. Holds the
/// replica weakly, so the thread does not keep it alive.
fn orphan_hook(
    replica: &Arc<Replica>,
    handles: &Arc<Handles>,
    releases: &Arc<GatheredReleases>,
    data_dir: &std::path::Path,
) -> coherence::OrphanHook {
    let weak = Arc::downgrade(replica);
    let (handles, releases, data_dir) = (handles.clone(), releases.clone(), data_dir.to_path_buf());
    let rt = tokio::runtime::Handle::try_current().ok();
    Arc::new(move |ino| {
        let Some(rt) = rt.as_ref() else { return };
        releases.lock().push((Instant::now(), ino));
        if releases.timer.swap(true, Ordering::AcqRel) {
            return;
        }
        let (weak, handles, releases, data_dir) = (weak.clone(), handles.clone(), releases.clone(), data_dir.clone());
        rt.spawn(async move {
            let oldest = || releases.lock().first().map(|(at, _)| *at);
            let flush = || async {
                let inos = releases.take();
                if let Some(replica) = weak.upgrade() {
                    release_all(&replica, &handles, inos).await;
                }
            };
            when_due(&releases.timer, oldest, || release_gather(&data_dir), flush).await;
        });
    })
}

#[cfg(test)]
mod tests {
    //! The operations against a real single-node replica in a temporary directory, without FUSE.

    use super::*;
    use crate::raft::ReplicaConfig;
    use crate::state::ROOT_INO;

    async fn ops() -> (Arc<Ops>, Arc<Replica>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = ReplicaConfig::new(1, dir.path().join("data"), std::time::Duration::from_secs(10));
        let replica = Replica::start(cfg).await.expect("replica starts");
        (Arc::new(Ops::new(replica.clone(), dir.path().to_path_buf())), replica, dir)
    }

    fn me() -> Caller {
        Caller { uid: 0, gid: 0, groups: Vec::new(), pid: 1 }
    }

    fn names(ops: &Ops, dir: Ino, after: u64, room: usize) -> Vec<(Vec<u8>, u64)> {
        let mut out = Vec::new();
        ops.list_each(dir, after, true, |e, inode| {
            if out.len() == room {
                return true;
            }
            assert!(inode.is_some());
            out.push((e.name.clone(), e.cookie));
            false
        })
        .expect("list");
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_write_read_list_and_cookies() {
        let (ops, replica, _dir) = ops().await;
        let (file, fh) = ops.create(me(), ROOT_INO, b"a".to_vec(), 0o644, 0, libc::O_RDWR).await.unwrap();
        assert_eq!(ops.write(me(), file.ino, 0, b"hello".to_vec(), false).await.unwrap(), 5);
        assert_eq!(ops.write(me(), file.ino, 0, b"!".to_vec(), true).await.unwrap(), 1);
        assert_eq!(ops.read(file.ino, 0, 100).unwrap(), b"hello!");
        ops.make_node(me(), ROOT_INO, b"d".to_vec(), FileKind::Dir, 0o755, 0, 0).await.unwrap();
        assert!(matches!(ops.lookup(ROOT_INO, &[b'x'; 256]), Err(FsError::Fs(Errno::NameTooLong))));

        let all = names(&ops, ROOT_INO, 0, usize::MAX);
        let listed: Vec<&[u8]> = all.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(listed, [&b"."[..], b"..", b"a", b"d"]);
        // Resuming after any returned cookie continues exactly behind it.
        for (i, (_, cookie)) in all.iter().enumerate() {
            assert_eq!(names(&ops, ROOT_INO, *cookie, usize::MAX), all[i + 1..].to_vec());
        }
        ops.release(fh).await;
        replica.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_unlinked_file_lives_until_last_release() {
        let (ops, replica, _dir) = ops().await;
        let (file, fh) = ops.create(me(), ROOT_INO, b"f".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.write(me(), file.ino, 0, b"data".to_vec(), false).await.unwrap();
        let fh2 = ops.open(file.ino, libc::O_RDONLY).unwrap();
        ops.unlink(me(), ROOT_INO, b"f".to_vec()).await.unwrap();
        assert!(matches!(ops.lookup(ROOT_INO, b"f"), Err(FsError::Fs(Errno::NoEnt))));
        assert_eq!(ops.read(file.ino, 0, 10).unwrap(), b"data");
        ops.release(fh).await;
        assert_eq!(ops.read(file.ino, 0, 10).unwrap(), b"data", "still open through fh2");
        ops.release(fh2).await;
        assert!(replica.read().unwrap().orphan(file.ino).unwrap().is_none(), "released on last close");
        assert!(matches!(ops.getattr(file.ino), Err(FsError::Fs(Errno::NoEnt))));
        replica.shutdown().await.unwrap();
    }

    /// Poll (with a deadline) until `ino` is gone from the state.
    async fn until_freed(ops: &Ops, ino: Ino) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while ops.getattr(ino).is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "inode {ino} never freed");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unlink_and_replacing_rename_free_closed_files() {
        let (ops, replica, _dir) = ops().await;
        // Unlink of a closed file on the only node frees it in the same command (it carries the
        // inode as expect_closed), otherwise the release follows at once when nothing is open.
        let (a, fh) = ops.create(me(), ROOT_INO, b"a".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        ops.unlink(me(), ROOT_INO, b"a".to_vec()).await.unwrap();
        until_freed(&ops, a.ino).await;
        // A rename over a closed file frees the replaced file.
        let (b, fh) = ops.create(me(), ROOT_INO, b"b".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        let (c, fh) = ops.create(me(), ROOT_INO, b"c".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        ops.rename(me(), ROOT_INO, b"c".to_vec(), ROOT_INO, b"b".to_vec(), RenameFlags::default()).await.unwrap();
        until_freed(&ops, b.ino).await;
        assert_eq!(ops.lookup(ROOT_INO, b"b").unwrap().ino, c.ino);
        // With a hard link left, unlink frees nothing; the last name then frees it.
        ops.link(me(), c.ino, ROOT_INO, b"d".to_vec()).await.unwrap();
        ops.unlink(me(), ROOT_INO, b"b".to_vec()).await.unwrap();
        assert_eq!(ops.getattr(c.ino).unwrap().nlink, 1);
        ops.unlink(me(), ROOT_INO, b"d".to_vec()).await.unwrap();
        until_freed(&ops, c.ino).await;
        assert!(replica.read().unwrap().orphans().unwrap().is_empty());
        replica.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn removal_of_a_closed_file_on_the_only_node_frees_it_at_once() {
        let (ops, replica, _dir) = ops().await;
        let (a, fh) = ops.create(me(), ROOT_INO, b"a".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        ops.unlink(me(), ROOT_INO, b"a".to_vec()).await.unwrap();
        // No poll: the Unlink itself freed it (no orphan record, no Release round).
        assert!(matches!(ops.getattr(a.ino), Err(FsError::Fs(Errno::NoEnt))));
        assert!(ops.open(a.ino, libc::O_RDONLY).is_err(), "claim ended, inode gone");
        let (b, fh) = ops.create(me(), ROOT_INO, b"b".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        let (c, fh) = ops.create(me(), ROOT_INO, b"c".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        ops.release(fh).await;
        ops.rename(me(), ROOT_INO, b"c".to_vec(), ROOT_INO, b"b".to_vec(), RenameFlags::default()).await.unwrap();
        assert!(matches!(ops.getattr(b.ino), Err(FsError::Fs(Errno::NoEnt))), "replaced file freed by the rename");
        assert_eq!(ops.lookup(ROOT_INO, b"b").unwrap().ino, c.ino);
        // A file open here still becomes an orphan that the last close releases.
        let fh = ops.open(c.ino, libc::O_RDONLY).unwrap();
        ops.unlink(me(), ROOT_INO, b"b".to_vec()).await.unwrap();
        assert!(replica.read().unwrap().orphan(c.ino).unwrap().is_some());
        assert!(ops.getattr(c.ino).is_ok());
        ops.release(fh).await;
        assert!(replica.read().unwrap().orphans().unwrap().is_empty());
        assert!(ops.open(c.ino, libc::O_RDONLY).is_err());
        replica.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_mtime_is_stored_with_the_next_proposal() {
        let (ops, replica, _dir) = ops().await;
        let (f, fh) = ops.create(me(), ROOT_INO, b"f".to_vec(), 0o644, 0, libc::O_RDWR).await.unwrap();
        let t = Timespec { sec: 1_000, nsec: 7 };
        assert!(ops.defer_times(&me(), f.ino, None, Some(&SetTime::At(t)), None).is_none(), "no own write yet");
        ops.write(me(), f.ino, 0, b"x".to_vec(), false).await.unwrap();
        let stranger = Caller { uid: 1000, gid: 1000, groups: Vec::new(), pid: 1 };
        assert!(ops.defer_times(&stranger, f.ino, None, Some(&SetTime::At(t)), None).is_none(), "only the owner or root");
        assert!(ops.defer_times(&me(), f.ino, None, Some(&SetTime::Now), None).is_none());
        let shown = ops.defer_times(&me(), f.ino, None, Some(&SetTime::At(t)), None).expect("deferred");
        assert_eq!(shown.mtime, t, "answered with the time it sets");
        assert_ne!(ops.stored_attr(f.ino).unwrap().mtime, t, "not stored yet");
        assert_eq!(ops.getattr(f.ino).unwrap().mtime, t, "but shown");
        assert!(matches!(ops.unchanged_times(f.ino, None, Some(&SetTime::At(t))), Some(Ok(_))), "the repeat is local");
        assert!(ops.unchanged_times(f.ino, None, Some(&SetTime::At(Timespec { sec: 5, nsec: 0 }))).is_none());
        // The next proposal carries it, before its own command.
        ops.make_node(me(), ROOT_INO, b"g".to_vec(), FileKind::File, 0o644, 0, 0).await.unwrap();
        assert_eq!(ops.getattr(f.ino).unwrap().mtime, t);
        // The timer path; a later write of the same inode wins over a deferred mtime.
        ops.write(me(), f.ino, 0, b"y".to_vec(), false).await.unwrap();
        ops.defer_times(&me(), f.ino, None, Some(&SetTime::At(t)), None).expect("deferred");
        ops.write(me(), f.ino, 1, b"z".to_vec(), false).await.unwrap();
        assert!(ops.getattr(f.ino).unwrap().mtime > t);
        ops.defer_times(&me(), f.ino, None, Some(&SetTime::At(t)), None).expect("deferred");
        // Explicit atime too (tar, cp -p), merged with the deferred mtime.
        // The kernel's ctime, when it sends one, is shown and stored (the later of two merged).
        let a = Timespec { sec: 2_000, nsec: 9 };
        let (c1, c2) = (Timespec { sec: 3_000, nsec: 1 }, Timespec { sec: 3_000, nsec: 2 });
        ops.defer_times(&me(), f.ino, Some(&SetTime::At(a)), None, Some(c2)).expect("deferred");
        let shown = ops.defer_times(&me(), f.ino, Some(&SetTime::At(a)), None, Some(c1)).expect("deferred");
        assert_eq!((shown.atime, shown.mtime, shown.ctime), (a, t, c2));
        ops.propose_deferred().await;
        let stored = ops.stored_attr(f.ino).unwrap();
        assert_eq!((stored.atime, stored.mtime, stored.ctime), (a, t, c2));
        // A setattr proposed at once stores the kernel's ctime too; without one, the command's time.
        let c3 = Timespec { sec: 4_000, nsec: 3 };
        let got = ops.setattr(me(), f.ino, Some(0o600), None, None, None, None, None, Some(c3)).await.unwrap();
        assert_eq!((got.ctime, ops.stored_attr(f.ino).unwrap().ctime), (c3, c3));
        let got = ops.setattr(me(), f.ino, Some(0o644), None, None, None, None, None, None).await.unwrap();
        assert!(got.ctime > c3, "this node's clock now");
        ops.release(fh).await;
        ops.unlink(me(), ROOT_INO, b"f".to_vec()).await.unwrap();
        assert!(matches!(ops.unchanged_times(f.ino, None, Some(&SetTime::At(t))), Some(Err(FsError::Fs(Errno::NoEnt)))));
        replica.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_open_of_an_inode_being_released() {
        let (ops, replica, _dir) = ops().await;
        let (f, fh) = ops.create(me(), ROOT_INO, b"f".to_vec(), 0o600, 0, libc::O_RDWR).await.unwrap();
        // A release in progress (claimed) keeps new opens out.
        ops.release(fh).await;
        assert!(ops.handles.claim_if_closed(f.ino));
        assert!(matches!(ops.open(f.ino, libc::O_RDONLY), Err(FsError::Fs(Errno::NoEnt))));
        ops.handles.unclaim(f.ino);
        let fh = ops.open(f.ino, libc::O_RDONLY).expect("opens again");
        // An orphan this node does not hold (it was open elsewhere: here simulated by the
        // unlink's own pending entry, released below) cannot be opened again after its release.
        ops.unlink(me(), ROOT_INO, b"f".to_vec()).await.unwrap();
        let fh2 = ops.open(f.ino, libc::O_RDONLY).expect("an orphan this node holds can be reopened");
        ops.release(fh).await;
        ops.release(fh2).await;
        until_freed(&ops, f.ino).await;
        assert!(matches!(ops.open(f.ino, libc::O_RDONLY), Err(FsError::Fs(Errno::NoEnt))));
        replica.shutdown().await.unwrap();
    }
}

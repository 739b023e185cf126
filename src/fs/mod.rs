//! The FUSE adapter (the only module that imports fuser): decode, call, reply; errno mapping.
//!
//! Architecture invariant: a fuser worker thread never waits for Raft. Reads are answered on the
//! worker thread from the local replica (a redb read transaction); every mutation copies what it
//! needs out of the request, moves its `Reply` into a tokio task, proposes there and answers once
//! the command is committed and applied. Each reply is answered exactly once (a reply dropped
//! unanswered, for example by a panicking task, makes fuser answer EIO).

mod attr;
mod caller;
mod coherence;
mod errno;
mod fences;
mod handles;
mod inflight;
mod locks;
mod mount;
mod names;
mod ops;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, RequestId, TimeOrNow, WriteFlags,
};

use crate::config::WRITE_BYTES_MAX;
use crate::state::{Caller, Errno, FallocMode, FileKind, HashedOp, LockKind, LockType, Op, RenameFlags, SetTime, XattrFlags};

pub use errno::{FsError, FsResult};
pub use mount::{
    abort_fuse_connection, check_mountpoint, clear_dying_predecessor, clear_mount_record, fuse_connection, is_mount_point, mount, record_mount,
    run_guard, Guard, Mounted,
};
pub use ops::{Ops, CACHE_TTL_DEFAULT};
use ops::LockRequest;

/// How long the end of the session waits for deferred times setattrs to be committed.
const DESTROY_DEFERRED_WAIT_MS: u64 = 10_000;
/// Inode numbers are never reused (they come from a counter in the state), so one generation.
const GENERATION: Generation = Generation(0);
/// How many background requests the kernel may have outstanding with us (fuser's default is 16).
/// Beyond that they wait in the kernel's background queue, in order, and a request the kernel
/// sends at once overtakes them. Writeback WRITEs are background requests answered only once
/// committed, so under a steady write 16 were always outstanding and the RELEASE of a file just
/// closed (which drops its flock and OFD locks) waited behind the queued writeback: the same
/// process's next lock request on the file could meet the lock it had just closed
/// (`LockWaits::settle` waits for such a RELEASE, but not forever). With this bound the queue
/// stays empty and the RELEASE reaches us before any later request. Measured with `settle`'s
/// wait turned off, rounds of open, flock, close, open, flock LOCK_NB on one file while `dd`
/// writes another, the rounds that met the closed lock (two runs each): debug build 6 and 12 of
/// 1,000 -> 0 and 0; release build 5 and 6 of 1,500 -> 1 and 1 (with 256; what is left is the
/// RELEASE's drop being applied after the request, see `LockWaits::drops_done`). What stays
/// outstanding is bounded by the kernel's dirty-page limit for a FUSE mount (1% of the dirty
/// limit; max_bytes 49 MB on the test host; at most 39 requests outstanding seen under `dd`),
/// not by this number, which only has to exceed it: the leader's peak RSS over a 256 MiB write
/// went 87-88 -> 95-116 MiB, the throughput unchanged (188, 195 -> 199, 185 MiB/s). Root only:
/// for others the kernel caps it (fs.fuse.max_user_bgreq).
const FUSE_MAX_BACKGROUND: u16 = 1024;

/// The FUSE filesystem of one node.
pub struct PickboxFs {
    ops: Arc<Ops>,
    rt: tokio::runtime::Handle,
    /// Ask the kernel for its writeback cache (when it offers it).
    want_writeback: bool,
    /// The kernel's writeback cache is on (decided in `init`).
    writeback: bool,
    /// Set by `mount` once the session exists; used to make the kernel write back dirty pages,
    /// and (the same slot, shared with `Ops::coherence`) to invalidate other nodes' changes.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl PickboxFs {
    pub fn new(ops: Arc<Ops>, rt: tokio::runtime::Handle, want_writeback: bool) -> Self {
        let notifier = ops.coherence.notifier.clone();
        PickboxFs { ops, rt, want_writeback, writeback: false, notifier }
    }

    /// Answer lseek SEEK_DATA/SEEK_HOLE from the local replica.
    fn answer_lseek(ops: &Ops, ino: INodeNo, offset: i64, whence: i32, reply: ReplyLseek) {
        // The kernel answers SEEK_SET/CUR/END itself and asks us only for SEEK_DATA/SEEK_HOLE.
        let what = match whence {
            libc::SEEK_DATA => self::ops::Seek::Data,
            libc::SEEK_HOLE => self::ops::Seek::Hole,
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(fuser::Errno::ENXIO);
        };
        match ops.lseek(ino.0, offset, what) {
            Ok(found) => match i64::try_from(found) {
                Ok(found) => reply.offset(found),
                Err(_) => reply.error(fuser::Errno::EOVERFLOW),
            },
            Err(e) => reply.error(ops.errno_of(&e)),
        }
    }

    /// Where `mount` puts the session's notifier.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    /// Answer a flush/fsync once every write to `ino` that came before it has been answered,
    /// i.e. is committed and applied (design decision 18).
    fn barrier(&self, ino: INodeNo, reply: ReplyEmpty) {
        match self.ops.writes.barrier(ino.0) {
            None => reply.ok(),
            Some(wait) => self.spawn(async move {
                wait.await;
                reply.ok();
            }),
        }
    }

    /// Run a mutation in a tokio task, so the fuser worker goes back to the kernel at once.
    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(fut);
    }
}

/// A lock type from the kernel: `Some(None)` for F_UNLCK, `None` if it is none of the three.
fn lock_type(typ: i32) -> Option<Option<LockType>> {
    match typ {
        libc::F_RDLCK => Some(Some(LockType::Read)),
        libc::F_WRLCK => Some(Some(LockType::Write)),
        libc::F_UNLCK => Some(None),
        _ => None,
    }
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// The caller of a request; `groups` reads /proc where group membership can decide the outcome.
fn who(req: &Request, groups: bool) -> Caller {
    caller::caller(req.uid(), req.gid(), req.pid(), groups)
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(at) => SetTime::At(attr::timespec_from_kernel(at)),
    })
}

fn fs_err(e: Errno) -> fuser::Errno {
    FsError::Fs(e).errno()
}

/// How a file is opened. A node that cannot have peers (no `--listen`) keeps the kernel's page
/// cache of the file across opens (FOPEN_KEEP_CACHE): every change reaches the file through
/// this kernel, which keeps its cache up to date, so a file opened again is read from memory.
/// In a cluster the kernel drops it at each open instead (close-to-open: another node may have
/// changed the file). With the writeback cache the kernel places an O_APPEND write at its own
/// idea of the end of file, which in a cluster may be stale (another node appended): such a
/// handle bypasses the page cache (direct I/O), so each append reaches Pickbox and lands at the
/// replicated end of file, atomically, as without the writeback cache.
fn open_flags(ops: &Ops, writeback: bool, flags: i32) -> FopenFlags {
    if !ops.is_clustered() {
        FopenFlags::FOPEN_KEEP_CACHE
    } else if writeback && flags & libc::O_APPEND != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// Open `ino` once this node has caught up (see `PickboxFs::open`). With the writeback cache
/// the kernel keeps the size of an inode it holds: if another node's change evicted this one
/// while the kernel was resolving the path to it, the kernel may still hold the old inode.
/// ESTALE makes the VFS look the path up again and retry the open once; before it goes out,
/// every name the kernel now knows the file by is dropped (on a blocking thread: a notification
/// waits for the kernel), so the retry's lookup finds no name bound to the old inode and gets
/// a fresh one. The eviction dropped only the names known when it ran: a lookup of another
/// name of the file (a hard link) answered meanwhile bound that name to the old inode, and the
/// retry's revalidation of that name would have kept it (found by fuse-tests/fsx.rs).
fn answer_open(
    ops: &Arc<Ops>,
    rt: &tokio::runtime::Handle,
    ino: INodeNo,
    flags: OpenFlags,
    writeback: bool,
    arrived: std::time::Instant,
    reply: ReplyOpen,
) {
    if ops.coherence.names.open_may_be_stale(ino.0, arrived) {
        tracing::debug!(ino = ino.0, "open raced another node's change: ESTALE, the kernel retries");
        let (coherence, handles) = (ops.coherence.clone(), ops.handles.clone());
        rt.spawn_blocking(move || {
            // A file closed here just before (its RELEASE not answered yet) is still held by the
            // kernel: the retry's lookup would bind to that inode again, with its old size.
            if handles.wait_for_closing(ino.0, Duration::from_millis(locks::RELEASE_AFTER_FLUSH_WAIT_MS)) {
                tracing::debug!(ino = ino.0, "open waited for the RELEASE of a closed handle");
            }
            coherence.evict(ino.0);
            coherence.names.estale_sent(ino.0);
            reply.error(fuser::Errno::ESTALE)
        });
        return;
    }
    match ops.open(ino.0, flags.0) {
        Ok(fh) => reply.opened(FileHandle(fh), open_flags(ops, writeback, flags.0)),
        Err(e) => reply.error(ops.errno_of(&e)),
    }
}

fn answer_lookup(ops: &Ops, parent: u64, name: &[u8], reply: ReplyEntry) {
    match ops.lookup(parent, name) {
        Ok(inode) => {
            known(ops, parent, name, &inode);
            reply.entry(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION)
        }
        // On a node that cannot have peers the kernel may remember that the name is absent (a
        // negative entry, for the entry TTL): whatever creates it goes through this kernel,
        // which drops that entry. Compilers probing include paths and shells searching PATH ask
        // for the same absent names again and again. In a cluster another node may create the
        // name at any time: no negative entries there (a lookup asks the leader first).
        Err(FsError::Fs(Errno::NoEnt)) if !ops.is_clustered() => reply.entry(&ops.cache_ttl, &attr::absent(), GENERATION),
        Err(e) => reply.error(ops.errno_of(&e)),
    }
}

/// The owner a lock request is recorded under. A flock lock belongs to the open file: the kernel
/// names its owner after the address of its `struct file`, which is free again once the file is
/// closed, and the next open file often gets the same address (seen in most rounds of a
/// close-and-reopen loop). The flock of the closed file is dropped only when its RELEASE comes,
/// after close(2) returned, so under that owner the new file's flock was taken as a change of the
/// old one and then dropped with it, silently. Our handle number names the open file as well
/// (dup and fork share it) and is never reused in this run. fcntl locks keep the kernel's owner
/// (a process, or for OFD locks the file: see SEMANTICS, Limits of locks).
fn lock_owner_of(flock: bool, fh: u64, kernel_owner: u64) -> u64 {
    if flock {
        fh
    } else {
        kernel_owner
    }
}

/// The kernel gets an entry for `inode` under `name` in `parent`: count it (and record the name
/// of a regular file; see fs/names.rs). Every answer that gives the kernel an entry calls this
/// before it is sent, so neither a FORGET nor a skipped notice can overtake it.
fn known(ops: &Ops, parent: u64, name: &[u8], inode: &crate::state::Inode) {
    ops.coherence.names.looked_up(inode.ino, parent, name, inode.kind == FileKind::File);
}

impl Filesystem for PickboxFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(WRITE_BYTES_MAX as u32) {
            let _ = config.set_max_write(nearest);
        }
        // Background requests (writeback WRITEs, RELEASE, readahead READs) beyond this many
        // unanswered wait in the kernel's own queue, and a request made after them but sent
        // at once (a lock, an open) overtakes them. See `FUSE_MAX_BACKGROUND`.
        if let Err(nearest) = config.set_max_background(FUSE_MAX_BACKGROUND) {
            let _ = config.set_max_background(nearest);
        }
        // Optional capabilities: readdirplus saves a lookup per listed name; parallel dirops
        // lets lookups and readdirs of one directory run concurrently; POSIX and flock locks
        // come to us (GETLK/SETLK/SETLKW, flock flagged), so they hold across nodes (without
        // them the kernel would keep locks node-local).
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "kernel does not offer capability");
            }
        }
        // The writeback cache: write(2) fills the page cache and the kernel sends the dirty pages
        // as large WRITEs (up to max_write) on fsync, close, memory pressure or after its dirty
        // expiry; the kernel then owns size, mtime and ctime of regular files and handles
        // O_APPEND and the setuid clearing on write itself (see `write`).
        if self.want_writeback {
            self.writeback = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE).is_ok();
            if !self.writeback {
                tracing::info!("kernel does not offer the writeback cache: writes go through");
            }
        }
        // We clear setuid/setgid where the kernel would (apply: writes and copy_file_range by
        // callers other than root; `Ops::mode_without_privs`: truncate, fallocate). In exchange
        // the kernel marks an inode without them S_NOSEC once its first write(2) checked it,
        // instead of sending a GETXATTR of security.capability before every write(2) (tens of
        // µs each, most of a small cached write's cost). The kernel still drops capabilities
        // itself at that check, and clears S_NOSEC whenever it refreshes the inode's attributes
        // (as after the invalidation for another node's change).
        // POSIX ACLs: the kernel checks access against them (they are the system.posix_acl_*
        // xattrs, cached by the kernel, dropped at an invalidation of the inode) and leaves to us
        // what apply does: keep mode and access ACL in step, and give what is created in a
        // directory with a default ACL that ACL instead of masking its mode with the umask. So
        // the kernel must pass the umask instead of applying it (DONT_MASK), and apply masks.
        if config.add_capabilities(InitFlags::FUSE_DONT_MASK).is_ok() && config.add_capabilities(InitFlags::FUSE_POSIX_ACL).is_err() {
            tracing::info!("kernel does not offer POSIX ACLs");
        }
        if self.writeback && config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2).is_ok() {
            self.ops.set_killpriv(true);
        }
        if self.ops.is_clustered() {
            // Only other nodes' changes need notices, so only then are counts of what the kernel
            // knows worth keeping.
            self.ops.coherence.names.enable_counts();
            if self.writeback {
                self.ops.coherence.names.enable();
            }
        }
        tracing::info!(writeback_cache = self.writeback, "FUSE session initialised");
        Ok(())
    }

    /// The session ends (unmount): store deferred times setattrs and release the other nodes'
    /// orphans gathered for later while the replica still runs (an orphan not released now is
    /// released at the next start). Runs on the session thread, not on the runtime, so it may
    /// block (bounded).
    fn destroy(&mut self) {
        let ops = self.ops.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            tokio::join!(ops.propose_deferred(), ops.release_gathered());
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_millis(DESTROY_DEFERRED_WAIT_MS)).is_err() {
            tracing::warn!("deferred times setattrs and gathered releases not stored before unmount");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // A name the kernel does not cache: answer from a replica that has caught up with the
        // leader (a file created on another node is found at once). Not waiting for the
        // invalidation watermark: the kernel holds the parent directory's lock during a lookup,
        // and the invalidation thread may need that lock (inval_entry), which would deadlock.
        let name = bytes(name);
        let parent = parent.0;
        // A single node, or a leader within its lease that has applied its read index: nothing
        // to wait for, answer here (a task hand-off costs more than the lookup).
        if self.ops.caught_up() {
            return answer_lookup(&self.ops, parent, &name, reply);
        }
        let ops = self.ops.clone();
        self.spawn(async move {
            ops.catch_up(false).await;
            answer_lookup(&ops, parent, &name, reply);
        });
    }

    // BATCH_FORGET: fuser's default calls `forget` for each inode.
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.ops.coherence.names.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ops.getattr(ino.0) {
            Ok(inode) => reply.attr(&self.ops.cache_ttl, &attr::file_attr(&inode)),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // ctime comes only from the kernel's own (see `Ops::setattr`); crtime/chgtime/bkuptime/
        // flags are macOS-only.
        let (atime, mtime) = (set_time(atime), set_time(mtime));
        let ctime = ctime.map(attr::timespec_from_kernel);
        if self.writeback && mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() && (atime.is_some() || mtime.is_some()) {
            // The kernel writing back the times the inode has (or will have, once a deferred
            // setattr is stored; see `unchanged_times`): answer locally, no Raft round.
            match self.ops.unchanged_times(ino.0, atime.as_ref(), mtime.as_ref()) {
                Some(Ok(inode)) => return reply.attr(&self.ops.cache_ttl, &attr::file_attr(&inode)),
                Some(Err(e)) => return reply.error(self.ops.errno_of(&e)),
                None => {}
            }
        }
        let caller = who(req, true);
        if self.writeback && mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() {
            // The kernel's mtime after writing back this node's write, or explicit times set
            // right after it: answered now, stored with the next proposal (`Ops::defer_times`).
            if let Some(inode) = self.ops.defer_times(&caller, ino.0, atime.as_ref(), mtime.as_ref(), ctime) {
                reply.attr(&self.ops.cache_ttl, &attr::file_attr(&inode));
                if self.ops.arm_deferred_timer() {
                    let ops = self.ops.clone();
                    self.spawn(async move { ops.deferred_timer().await });
                }
                return;
            }
        }
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.setattr(caller, ino.0, mode, uid, gid, size, atime, mtime, ctime).await {
                Ok(inode) => reply.attr(&ops.cache_ttl, &attr::file_attr(&inode)),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ops.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let Some(kind) = attr::kind_of_mode(mode) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.make_node(caller, parent.0, name.clone(), kind, mode, rdev, umask).await {
                Ok(inode) => {
                    known(&ops, parent.0, &name, &inode);
                    reply.entry(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION)
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.make_node(caller, parent.0, name.clone(), FileKind::Dir, mode, 0, umask).await {
                Ok(inode) => {
                    known(&ops, parent.0, &name, &inode);
                    reply.entry(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION)
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.unlink(caller, parent.0, name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.rmdir(caller, parent.0, name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        let (caller, name) = (who(req, true), bytes(link_name));
        let target = target.as_os_str().as_bytes().to_vec();
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.symlink(caller, parent.0, name.clone(), target).await {
                Ok(inode) => {
                    known(&ops, parent.0, &name, &inode);
                    reply.entry(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION)
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let known = fuser::RenameFlags::RENAME_NOREPLACE | fuser::RenameFlags::RENAME_EXCHANGE;
        if !known.contains(flags) {
            // RENAME_WHITEOUT (overlayfs) or an unknown flag.
            return reply.error(fuser::Errno::EINVAL);
        }
        let flags = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        let (caller, name, newname) = (who(req, true), bytes(name), bytes(newname));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.rename(caller, parent.0, name.clone(), newparent.0, newname.clone(), flags).await {
                Ok(()) => {
                    ops.coherence.names.renamed(parent.0, &name, newparent.0, &newname, flags.exchange);
                    reply.ok()
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn link(&self, req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (caller, name) = (who(req, true), bytes(newname));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.link(caller, ino.0, newparent.0, name.clone()).await {
                Ok(inode) => {
                    known(&ops, newparent.0, &name, &inode);
                    reply.entry(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION)
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        // O_TRUNC is not passed here: without FUSE_ATOMIC_O_TRUNC the kernel sends a setattr.
        // Close-to-open across nodes: catch up with the leader and let the kernel drop what other
        // nodes changed, then open. The kernel holds no directory lock while it waits for OPEN,
        // so waiting for the invalidation thread is safe here. Without FOPEN_KEEP_CACHE the
        // kernel also drops the file's page cache at open, so the content is read afresh.
        let writeback = self.writeback;
        let arrived = std::time::Instant::now();
        // A single node, or a leader within its lease whose kernel has been told of everything
        // it applied: nothing to wait for, answer here (a task hand-off costs as much as the
        // open itself).
        if self.ops.caught_up_and_told() {
            return answer_open(&self.ops, &self.rt, ino, flags, writeback, arrived, reply);
        }
        let ops = self.ops.clone();
        let rt = self.rt.clone();
        self.spawn(async move {
            ops.catch_up(true).await;
            answer_open(&ops, &rt, ino, flags, writeback, arrived, reply);
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.ops.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if data.len() > WRITE_BYTES_MAX {
            return reply.error(fuser::Errno::EINVAL);
        }
        // Without the writeback cache, `flags` are the file's current flags (including
        // fcntl(F_SETFL) changes), so they decide O_APPEND; the kernel's offset for an append is
        // its cached size, which may be stale, so the state appends at its own end. With the
        // writeback cache the kernel's size is the authority: it placed the data at its end of
        // file in the page cache already, so the offset it sends is final (appending again
        // would move the data). Page-cache writes (FUSE_WRITE_CACHE) carry no caller: uid/pid are
        // whoever triggered writeback. They are written as root, which the state does not treat
        // as a privilege-dropping write: with FUSE_HANDLE_KILLPRIV_V2 the kernel sends a write
        // to a setuid/setgid file that must drop them straight through, as the writer (apply's
        // `kill_privs` drops them), and caches only writes that drop nothing.
        // In a cluster an O_APPEND handle is direct I/O (see `open_flags`): its writes carry no
        // FUSE_WRITE_CACHE and append at the replicated end; the kernel's size of the file is then
        // a guess until it evicts the inode, which the last close makes it do.
        let cached = write_flags.contains(WriteFlags::FUSE_WRITE_CACHE);
        let append = flags.0 & libc::O_APPEND != 0 && (!self.writeback || (self.ops.is_clustered() && !cached));
        if append && self.writeback {
            self.ops.handles.mark_stale_if_open(ino.0);
        }
        let caller = if cached { Caller::root() } else { who(req, false) };
        // In flight from here (also while it is hashed: a lock request waiting for a RELEASE
        // queued behind writes looks at this, see `LockWaits::settle`).
        let ticket = self.ops.writes.start(ino.0);
        // Hashed here, on the fuser thread: concurrent writes hash on the fuser threads in
        // parallel instead of one after the other on the runtime's worker.
        let op = HashedOp::new(Op::Write { ino: ino.0, offset, data: data.to_vec(), append });
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.write_hashed(caller, op).await {
                Ok(len) => reply.written(len.min(u64::from(u32::MAX)) as u32),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
            drop(ticket);
        });
    }

    // flush, fsync and fsyncdir are barriers: a write, like every mutation, is answered only
    // after its command is committed by a quorum (durable in the Raft log) and applied on this
    // node. With the writeback cache the kernel writes the dirty pages of the file and waits for
    // their answers before it sends FSYNC (fuse_fsync: file_write_and_wait_range,
    // fuse_sync_writes) or FLUSH (fuse_flush: write_inode_now, fuse_sync_writes), and sends the
    // cached mtime/ctime as a setattr first (sync_inode_metadata / write_inode_now). On top, flush
    // and fsync wait for any write to the inode that is still in flight here, so neither can
    // answer before a write that arrived earlier. Directory changes are answered only once
    // applied, so fsyncdir is always satisfied.

    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // A RELEASE of the handle may follow in the background: a lock request that meets its
        // flock or OFD locks waits for it (`LockWaits::settle`), and so does an open that raced
        // another node's change (`answer_open`; only where the kernel keeps sizes itself).
        self.ops.lock_waits.flushed(fh.0);
        if self.ops.coherence.names.is_enabled() {
            self.ops.handles.flushed(fh.0);
        }
        // Every close of a descriptor: the closing process's POSIX locks on the file go (after
        // the writes before it, as a close on a local filesystem).
        if !self.ops.may_hold_posix_locks(ino.0, lock_owner.0) {
            return self.barrier(ino, reply);
        }
        let wait = self.ops.writes.barrier(ino.0);
        let ops = self.ops.clone();
        self.spawn(async move {
            if let Some(wait) = wait {
                wait.await;
            }
            match ops.release_posix_locks(ino.0, lock_owner.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // The kernel sent its mtime as a setattr just before (maybe deferred): store it first.
        // The barrier is taken here, so it covers only the writes that came before the fsync.
        let wait = self.ops.writes.barrier(ino.0);
        let ops = self.ops.clone();
        self.spawn(async move {
            ops.propose_deferred().await;
            if let Some(wait) = wait {
                wait.await;
            }
            reply.ok();
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Tests: a RELEASE that reaches us late (a busy node), see fs::handles::wait_for_closing.
        #[cfg(feature = "failpoints")]
        fail::fail_point!("fuse-release");
        // close(2) ignores release errors; answer now, tell the cluster (if this was the last
        // handle of an orphan) in the background.
        reply.ok();
        if let Some(rest) = self.ops.release_handle(fh.0) {
            self.spawn(rest);
        }
        // Its flock and OFD locks go with the open file (asynchronously, as the kernel sends
        // RELEASE after close(2) returned).
        if let Some((ino, owners)) = self.ops.lock_waits.closed(fh.0) {
            let ops = self.ops.clone();
            self.spawn(async move { ops.release_handle_locks(ino, owners).await });
        }
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        flock: bool,
        reply: ReplyLock,
    ) {
        let Some(Some(typ)) = lock_type(typ) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let kind = if flock { LockKind::Flock } else { LockKind::Posix };
        let owner = lock_owner_of(flock, fh.0, lock_owner.0);
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.get_lock(ino.0, owner, kind, typ, start, end).await {
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Ok(Some(l)) => {
                    // Another node's process id means nothing here: shown as 0.
                    let pid = if l.owner.node == ops.node_id() { l.pid } else { 0 };
                    let typ = match l.typ {
                        LockType::Read => libc::F_RDLCK,
                        LockType::Write => libc::F_WRLCK,
                    };
                    // The kernel takes no end beyond OFFSET_MAX (a lock to the end of file).
                    reply.locked(l.start, l.end.min(i64::MAX as u64), typ, pid)
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        flock: bool,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let Some(typ) = lock_type(typ) else {
            return reply.error(fuser::Errno::EINVAL);
        };
        let unique = req.unique().0;
        // A blocking request registers before it is proposed, so an interrupt that arrives at any
        // point after this finds it (or, if it came first, is found here).
        let wait = sleep && typ.is_some();
        let interrupted = match wait {
            false => None,
            true => match self.ops.lock_waits.wait(unique) {
                Some(rx) => Some(rx),
                None => return reply.error(fuser::Errno::EINTR),
            },
        };
        let request = LockRequest {
            ino: ino.0,
            fh: fh.0,
            owner: lock_owner_of(flock, fh.0, lock_owner.0),
            kind: if flock { LockKind::Flock } else { LockKind::Posix },
            typ,
            start,
            end,
            pid,
        };
        let caller = who(req, false);
        let ops = self.ops.clone();
        // An unlock in a cluster first makes the kernel write back this file's dirty pages (by
        // invalidating its page cache, which launders them with WRITEs our other workers serve),
        // so what was written under the lock is committed before another node can take it (as
        // NFS flushes at unlock). From a blocking task, never on this worker (crate-notes pitfall
        // 1), and only where this node holds the file open for writing.
        let write_back = match typ {
            None if self.writeback && self.ops.is_clustered() && self.ops.handles.is_open_for_write(ino.0) => {
                self.notifier.get().cloned()
            }
            _ => None,
        };
        self.spawn(async move {
            if let Some(notifier) = write_back {
                let laundered = tokio::task::spawn_blocking(move || notifier.inval_inode(ino, 0, 0)).await;
                if !matches!(laundered, Ok(Ok(()))) {
                    tracing::warn!(ino = ino.0, "cannot write back dirty pages before an unlock");
                }
                if let Some(wait) = ops.writes.barrier(ino.0) {
                    wait.await;
                }
            }
            let result = ops.set_lock(caller, request, interrupted).await;
            if wait {
                ops.lock_waits.done(unique);
            }
            match result {
                Ok(true) => reply.ok(),
                // The kernel restarts the call after the signal's handler if it may.
                Ok(false) => reply.error(fuser::Errno::EINTR),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn interrupt(&self, _req: &Request, unique: RequestId) -> Result<(), fuser::Errno> {
        // Only lock waits can be interrupted; anything else finishes on its own (the kernel
        // waits for its answer), so the interrupt needs no reply.
        self.ops.lock_waits.interrupt(unique.0);
        Ok(())
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Directory handles are stateless: offsets are stable cookies, not positions. Catch up
        // first, as `open` does, so a listing shows what other nodes did before it started
        // (answered here when there is nothing to wait for, as `open`).
        fn answer(ops: &Ops, ino: INodeNo, reply: ReplyOpen) {
            match ops.getattr(ino.0) {
                Ok(inode) if inode.kind == FileKind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
                Ok(_) => reply.error(fuser::Errno::ENOTDIR),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        }
        if self.ops.caught_up_and_told() {
            return answer(&self.ops, ino, reply);
        }
        let ops = self.ops.clone();
        self.spawn(async move {
            ops.catch_up(true).await;
            answer(&ops, ino, reply);
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let listed = self.ops.list_each(ino.0, offset, false, |e, _| {
            reply.add(INodeNo(e.ino), e.cookie, attr::file_type(e.kind), OsStr::from_bytes(&e.name))
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let listed = self.ops.list_each(ino.0, offset, true, |e, inode| match inode {
            Some(inode) => {
                let attr = attr::file_attr(inode);
                let full = reply.add(INodeNo(e.ino), e.cookie, OsStr::from_bytes(&e.name), &self.ops.cache_ttl, &attr, GENERATION);
                // The kernel takes a lookup for every entry but "." and "..".
                if !full && e.name != b"." && e.name != b".." {
                    known(&self.ops, ino.0, &e.name, inode);
                }
                full
            }
            None => false,
        });
        match listed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ops.statfs() {
            Ok(s) => {
                let bsize = ops::STATFS_BLOCK_BYTES as u32;
                let namelen = crate::config::NAME_BYTES_MAX as u32;
                reply.statfs(s.blocks, s.blocks_free, s.blocks_avail, s.files, s.files_free, bsize, namelen, bsize)
            }
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let flags = match flags & (libc::XATTR_CREATE | libc::XATTR_REPLACE) {
            0 => XattrFlags::Any,
            libc::XATTR_CREATE => XattrFlags::Create,
            libc::XATTR_REPLACE => XattrFlags::Replace,
            _ => return reply.error(fuser::Errno::EINVAL),
        };
        let (caller, name, value) = (who(req, true), bytes(name), value.to_vec());
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.setxattr(caller, ino.0, name, value, flags).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.ops.getxattr(ino.0, name.as_bytes()) {
            Ok(value) => reply_xattr(reply, &value, size),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.ops.listxattr(ino.0) {
            Ok(names) => reply_xattr(reply, &names, size),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.removexattr(caller, ino.0, name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // With default_permissions the kernel checks the mode bits itself; what is left for us is
        // whether the inode exists (F_OK).
        match self.ops.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(self.ops.errno_of(&e)),
        }
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        if let Some(kind) = attr::kind_of_mode(mode) {
            if kind != FileKind::File {
                return reply.error(fuser::Errno::EINVAL);
            }
        }
        let (caller, name) = (who(req, true), bytes(name));
        let ops = self.ops.clone();
        let writeback = self.writeback;
        self.spawn(async move {
            match ops.create(caller, parent.0, name.clone(), mode, umask, flags).await {
                Ok((inode, fh)) => {
                    known(&ops, parent.0, &name, &inode);
                    reply.created(&ops.cache_ttl, &attr::file_attr(&inode), GENERATION, FileHandle(fh), open_flags(&ops, writeback, flags))
                }
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn fallocate(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let mode = match mode & !libc::FALLOC_FL_KEEP_SIZE {
            0 => FallocMode::Allocate { keep_size },
            libc::FALLOC_FL_PUNCH_HOLE if keep_size => FallocMode::PunchHole,
            libc::FALLOC_FL_ZERO_RANGE => FallocMode::ZeroRange { keep_size },
            // PUNCH_HOLE without KEEP_SIZE, COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE.
            _ => return reply.error(fuser::Errno::EOPNOTSUPP),
        };
        let caller = who(req, false);
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.fallocate(caller, ino.0, offset, length, mode).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        // With the writeback cache the kernel may hold dirty pages of this file that the state
        // has not seen (it does not write them back before SEEK_DATA/SEEK_HOLE), so the answer
        // could call fresh data a hole. Only a file open for writing here can have dirty pages:
        // then first make the kernel write them back, by invalidating the file's page cache (it
        // launders dirty pages with WRITEs our other workers serve), from a blocking task outside
        // this worker and holding no lock (crate-notes pitfall 1), and answer afterwards.
        if self.writeback && self.ops.handles.is_open_for_write(ino.0) {
            if let Some(notifier) = self.notifier.get().cloned() {
                let ops = self.ops.clone();
                self.rt.spawn_blocking(move || {
                    if let Err(e) = notifier.inval_inode(ino, 0, 0) {
                        tracing::warn!(ino = ino.0, error = %e, "cannot write back dirty pages before lseek");
                    }
                    Self::answer_lseek(&ops, ino, offset, whence, reply);
                });
                return;
            }
        }
        Self::answer_lseek(&self.ops, ino, offset, whence, reply);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls are supported; ENOTTY is what isatty() (TCGETS) expects of a regular file.
        reply.error(fuser::Errno::ENOTTY);
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // The reply carries a u32 count: copy at most that much; the caller loops for the rest.
        let len = len.min(u64::from(u32::MAX) & !(crate::config::BLOCK_BYTES - 1));
        let caller = who(req, false);
        let ops = self.ops.clone();
        self.spawn(async move {
            match ops.copy_range(caller, ino_in.0, offset_in, ino_out.0, offset_out, len).await {
                Ok(n) => reply.written(n.min(u64::from(u32::MAX)) as u32),
                Err(e) => reply.error(ops.errno_of(&e)),
            }
        });
    }
}

/// Answer getxattr/listxattr: the size when asked for it (size 0), ERANGE if it does not fit.
fn reply_xattr(reply: ReplyXattr, value: &[u8], size: u32) {
    if size == 0 {
        reply.size(value.len() as u32);
    } else if value.len() > size as usize {
        reply.error(fs_err(Errno::Range));
    } else {
        reply.data(value);
    }
}

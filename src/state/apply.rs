//! `apply`: the pure, deterministic transition of the state by one command.
//!
//! Every operation first validates everything it needs (and may fail with an `Errno` then), and
//! only afterwards writes. So a failed command changes nothing but the recorded result, on every
//! replica alike. Store faults are not outcomes: they propagate and stop the node.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::config::{
    BLOCK_BYTES, FILE_BYTES_MAX, LINK_COUNT_MAX, LOCKS_PER_INODE_MAX, NAME_BYTES_MAX, RESULTS_RETAINED_PER_ORIGIN,
    SYMLINK_BYTES_MAX, WRITE_BYTES_MAX, XATTR_LIST_BYTES_MAX, XATTR_NAME_BYTES_MAX,
    XATTR_VALUE_BYTES_MAX,
};

use super::command::{
    Command, CommandResult, ContentDigest, FallocMode, Op, Outcome, RenameFlags, SetTime,
    XattrFlags,
};
use super::acl::{Acl, ACL_ACCESS_XATTR, ACL_DEFAULT_XATTR};
use super::content::{sha256, Blocks};
use super::error::Errno;
use super::locks::{self, LockKind, LockOwner, LockTable, LockType, FENCE_INODES_MAX};
use super::txn::{StateWrite, StoreFault, StoreResult};
use super::types::{
    DirEntry, FileKind, Hash, Ino, Inode, Meta, NodeId, Orphan, Timespec, ROOT_INO,
};

/// Set-user-ID bit.
pub const S_ISUID: u32 = 0o4000;
/// Set-group-ID bit.
pub const S_ISGID: u32 = 0o2000;
/// Sticky bit.
pub const S_ISVTX: u32 = 0o1000;
/// Group execute bit.
pub const S_IXGRP: u32 = 0o010;
/// Most blocks one block-aligned copy_file_range command shares (a shorter copy is legal).
pub const COPY_BLOCKS_MAX: u64 = 1024;
/// Every permission bit an inode keeps.
pub const PERM_MASK: u32 = 0o7777;

/// A command with its content digest: recomputed from its own payload (the one hash pass of
/// apply), so that the pass can run before the store's write transaction opens (outside the
/// store's one writer, overlapping a log commit) and apply still checks what it stores; or, for a
/// node's own in-memory batch, borrowed from its proposer (`trusted`).
pub struct Digested<'a> {
    cmd: &'a Command,
    digest: Cow<'a, ContentDigest>,
}

impl<'a> Digested<'a> {
    /// Hash `cmd`'s payload (for a write, each piece, then the hash of the piece hashes).
    pub fn new(cmd: &'a Command) -> Self {
        Digested { cmd, digest: Cow::Owned(cmd.op.content_digest()) }
    }

    /// `cmd` with the digest its proposer computed, in this process, from the very bytes `cmd`
    /// carries (`HashedOp`): a command that crossed no wire and no disk since it was hashed, so
    /// hashing it again could catch nothing the design checks for (corruption on the wire or on
    /// disk). Every command read from the log or received from a peer is hashed (`new`).
    pub fn trusted(cmd: &'a Command, digest: &'a ContentDigest) -> Self {
        Digested { cmd, digest: Cow::Borrowed(digest) }
    }

    pub fn command(&self) -> &'a Command {
        self.cmd
    }
}

/// Apply `cmd` to the state: deduplicate by `(origin, seq)`, check the content hash, run the op,
/// record the result. The returned result is what the waiting caller gets.
pub fn apply<S: StateWrite + ?Sized>(s: &mut S, cmd: &Command) -> StoreResult<CommandResult> {
    apply_digested(s, &Digested::new(cmd))
}

/// `apply` of a command whose payload was hashed beforehand (`Digested::new`).
pub fn apply_digested<S: StateWrite + ?Sized>(s: &mut S, d: &Digested<'_>) -> StoreResult<CommandResult> {
    let cmd = d.cmd;
    if let Some(first) = s.result(cmd.origin, cmd.seq)? {
        return Ok(first);
    }
    let max = s.max_seq(cmd.origin)?;
    if cmd.seq <= max {
        // An origin numbers its commands ascending in log order, so a seq at or below the highest
        // one applied with no stored result is either a batch that was given up (timed out, its
        // callers told EIO) and superseded by a later one, arriving late: applying it now would
        // reorder the origin's operations; or a retry whose result was pruned, which we cannot
        // tell from one that never applied. Neither may apply.
        return Ok(Err(Errno::Stale));
    }
    // One pass over the payload (done by `Digested::new`): checks it, and gives a write the
    // hashes of its whole blocks.
    let digest = &d.digest;
    let result = if !content_hash_matches(cmd, digest) {
        tracing::warn!(
            origin = cmd.origin,
            seq = cmd.seq,
            "content hash mismatch: command rejected"
        );
        Err(Errno::Io)
    } else {
        run(s, cmd, &digest.pieces)?
    };
    s.put_result(cmd.origin, cmd.seq, &result)?;
    if cmd.seq > max && cmd.seq >= RESULTS_RETAINED_PER_ORIGIN {
        // Results with seq <= new max - RETAINED are stale from now on.
        s.prune_results(cmd.origin, cmd.seq - RESULTS_RETAINED_PER_ORIGIN + 1)?;
    }
    Ok(result)
}

/// Does the command carry the content hash of its op? A write proposed by a build from before
/// write hashes were hashes of piece hashes carries SHA-256 of its data; such an entry may still
/// be replayed from a log, so it is accepted too (corrupted data matches neither). This costs a
/// second pass only when the first does not match.
fn content_hash_matches(cmd: &Command, digest: &ContentDigest) -> bool {
    digest.hash == cmd.content_hash
        || (matches!(cmd.op, Op::Write { .. }) && sha256(cmd.op.payload()) == cmd.content_hash)
}

/// Why an op stopped: a deterministic errno, or a store fault.
enum Fail {
    Errno(Errno),
    Store(StoreFault),
}

impl From<Errno> for Fail {
    fn from(e: Errno) -> Self {
        Fail::Errno(e)
    }
}

impl From<StoreFault> for Fail {
    fn from(f: StoreFault) -> Self {
        Fail::Store(f)
    }
}

type Step<T> = Result<T, Fail>;

fn run<S: StateWrite + ?Sized>(
    s: &mut S,
    cmd: &Command,
    pieces: &[Hash],
) -> StoreResult<CommandResult> {
    if cmd.op.fenced() && s.lock_fences()?.active(cmd.origin) {
        // Proposed by a node whose locks expired before it knew (see `LockFences`).
        tracing::debug!(origin = cmd.origin, seq = cmd.seq, "change of a node whose locks expired, not yet acknowledged: refused");
        return Ok(Err(Errno::Io));
    }
    let meta = s.meta()?;
    let mut tx = Tx {
        s,
        cmd,
        pieces,
        meta0: meta.clone(),
        meta,
        dirty: BTreeMap::new(),
        mutating: false,
    };
    match tx.op() {
        Ok(outcome) => {
            tx.flush()?;
            Ok(Ok(outcome))
        }
        // An errno after the first write would leave a partial command in the transaction:
        // treat it as a fault (the transaction is dropped and the node stops) rather than commit it.
        Err(Fail::Errno(e)) if tx.mutating => {
            debug_assert!(false, "errno {e:?} after the first write of {:?}", cmd.op);
            Err(StoreFault(format!("apply bug: errno {e:?} after the first write of a command")))
        }
        Err(Fail::Errno(e)) => Ok(Err(e)),
        Err(Fail::Store(f)) => Err(f),
    }
}

/// Check a name for a directory entry.
fn check_name(name: &[u8]) -> Result<(), Errno> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::Inval);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(Errno::NameTooLong);
    }
    Ok(())
}

fn is_dot(name: &[u8]) -> bool {
    name == b"." || name == b".."
}

/// One command's work: inodes are changed in `dirty` and written at the end; entries, blocks,
/// xattrs and orphans are written directly (only after validation).
struct Tx<'a, S: StateWrite + ?Sized> {
    s: &'a mut S,
    cmd: &'a Command,
    /// The checked piece hashes of a write's data (`ContentDigest::pieces`).
    pieces: &'a [Hash],
    meta0: Meta,
    meta: Meta,
    /// Changed inodes (`None` = freed).
    dirty: BTreeMap<Ino, Option<Inode>>,
    /// Set when validation is over; an errno after this point is a bug.
    mutating: bool,
}

impl<S: StateWrite + ?Sized> Tx<'_, S> {
    fn now(&self) -> Timespec {
        self.cmd.time
    }

    fn get(&self, ino: Ino) -> Step<Option<Inode>> {
        match self.dirty.get(&ino) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.s.inode(ino)?),
        }
    }

    fn need(&self, ino: Ino) -> Step<Inode> {
        self.get(ino)?.ok_or(Fail::Errno(Errno::NoEnt))
    }

    fn need_dir(&self, ino: Ino) -> Step<Inode> {
        let dir = self.need(ino)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::NotDir.into());
        }
        Ok(dir)
    }

    fn put(&mut self, inode: Inode) {
        self.dirty.insert(inode.ino, Some(inode));
    }

    fn begin(&mut self) {
        self.mutating = true;
    }

    fn cookie(&mut self) -> u64 {
        let c = self.meta.next_cookie;
        self.meta.next_cookie += 1;
        c
    }

    fn blocks(&mut self) -> Blocks<'_, S> {
        Blocks {
            s: &mut *self.s,
            meta: &mut self.meta,
        }
    }

    fn flush(&mut self) -> StoreResult<()> {
        for (ino, inode) in std::mem::take(&mut self.dirty) {
            match inode {
                Some(inode) => self.s.put_inode(&inode)?,
                None => self.s.del_inode(ino)?,
            }
        }
        if self.meta != self.meta0 {
            self.s.put_meta(&self.meta)?;
        }
        Ok(())
    }

    /// Set mtime and ctime of a directory whose entries changed.
    fn touch_dir(&mut self, ino: Ino) -> Step<()> {
        let mut dir = self.need(ino)?;
        dir.mtime = self.now();
        dir.ctime = self.now();
        self.put(dir);
        Ok(())
    }

    /// Change a directory's link count by `delta` (a subdirectory came or went).
    fn dir_nlink(&mut self, ino: Ino, delta: i32) -> Step<()> {
        let mut dir = self.need(ino)?;
        dir.nlink = dir.nlink.saturating_add_signed(delta);
        self.put(dir);
        Ok(())
    }

    fn op(&mut self) -> Step<Outcome> {
        let cmd = self.cmd;
        match &cmd.op {
            Op::Init { perm, uid, gid } => self.init(*perm, *uid, *gid),
            Op::RegisterNode { node } => self.register(*node),
            Op::UnregisterNode { node } => self.unregister(*node),
            Op::MakeNode {
                parent,
                name,
                kind,
                perm,
                rdev,
            } => self.make_node(*parent, name, *kind, *perm, *rdev, None),
            Op::MakeNodeUnmasked {
                parent,
                name,
                kind,
                perm,
                umask,
                rdev,
            } => self.make_node(*parent, name, *kind, *perm, *rdev, Some(*umask)),
            Op::Symlink {
                parent,
                name,
                target,
            } => self.symlink(*parent, name, target),
            Op::Link {
                ino,
                new_parent,
                new_name,
            } => self.link(*ino, *new_parent, new_name),
            Op::Unlink {
                parent,
                name,
                expect_closed,
            } => self.unlink(*parent, name, *expect_closed),
            Op::Rmdir { parent, name } => self.rmdir(*parent, name),
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
                expect_closed,
            } => self.rename(*parent, name, *new_parent, new_name, *flags, *expect_closed),
            Op::SetAttr {
                ino,
                perm,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => self.set_attr(*ino, *perm, *uid, *gid, *size, *atime, *mtime),
            Op::Write {
                ino,
                offset,
                data,
                append,
            } => self.write(*ino, *offset, data, *append),
            Op::Fallocate {
                ino,
                offset,
                len,
                mode,
            } => self.fallocate(*ino, *offset, *len, *mode),
            Op::CopyRange {
                ino_in,
                offset_in,
                ino_out,
                offset_out,
                len,
            } => self.copy_range(*ino_in, *offset_in, *ino_out, *offset_out, *len),
            Op::SetXattr {
                ino,
                name,
                value,
                flags,
            } => self.set_xattr(*ino, name, value, *flags),
            Op::RemoveXattr { ino, name } => self.remove_xattr(*ino, name),
            Op::Release { ino } => self.release(*ino),
            Op::Lock { ino, incarnation, owner, kind, typ, start, end, pid } => {
                let owner = LockOwner { node: cmd.origin, incarnation: *incarnation, id: *owner };
                self.lock(*ino, owner, *kind, *typ, *start, *end, *pid)
            }
            Op::ReleaseLocks { ino, incarnation, owners, kind } => self.release_locks(*ino, *incarnation, owners, *kind),
            Op::DropStaleLocks { incarnation } => {
                self.drop_locks(|t| t.drop_node(cmd.origin, Some(*incarnation)))?;
                // A new run holds nothing open from the run whose locks expired.
                self.lift_fence(cmd.origin, None)
            }
            Op::ExpireLocks { node, incarnation } => self.expire_locks(*node, *incarnation),
            Op::AckLockExpiry { epoch } => self.lift_fence(cmd.origin, Some(*epoch)),
        }
    }

    /// Drop `node`'s locks up to `incarnation` (a lease that ran out) and fence the node: its
    /// changes are refused until it acknowledges (see `LockFences`). An expiry that drops
    /// nothing fences nothing; one that comes before the node acknowledged an earlier one adds
    /// its inodes to the earlier one's.
    fn expire_locks(&mut self, node: NodeId, incarnation: u64) -> Step<Outcome> {
        let mut inodes = Vec::new();
        for ino in self.s.locked_inodes()? {
            let mut table = self.s.locks(ino)?;
            if table.expire_node(node, incarnation) {
                self.begin();
                self.s.put_locks(ino, &table)?;
                inodes.push(ino);
            }
        }
        if inodes.is_empty() {
            return Ok(Outcome::Done);
        }
        let mut fences = self.s.lock_fences()?;
        let fence = fences.0.entry(node).or_default();
        if fence.active {
            inodes.extend_from_slice(&fence.inodes);
            inodes.sort_unstable();
            inodes.dedup();
        } else {
            fence.all = false;
        }
        fence.epoch += 1;
        fence.active = true;
        fence.all |= inodes.len() > FENCE_INODES_MAX;
        inodes.truncate(FENCE_INODES_MAX);
        fence.inodes = inodes;
        self.s.put_lock_fences(&fences)?;
        Ok(Outcome::Done)
    }

    /// Lift `node`'s fence: for an acknowledgement only if it names the current epoch; for a new
    /// run of the node (`epoch: None`) whatever it is.
    fn lift_fence(&mut self, node: NodeId, epoch: Option<u64>) -> Step<Outcome> {
        let mut fences = self.s.lock_fences()?;
        let Some(fence) = fences.0.get_mut(&node) else { return Ok(Outcome::Done) };
        if !fence.active || epoch.is_some_and(|e| e != fence.epoch) {
            return Ok(Outcome::Done);
        }
        self.begin();
        fence.active = false;
        fence.inodes = Vec::new();
        fence.all = false;
        self.s.put_lock_fences(&fences)?;
        Ok(Outcome::Done)
    }

    /// Take, change or drop (`typ: None`) a lock: EAGAIN on a conflict with another owner.
    #[allow(clippy::too_many_arguments)]
    fn lock(
        &mut self,
        ino: Ino,
        owner: LockOwner,
        kind: LockKind,
        typ: Option<LockType>,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Step<Outcome> {
        self.need(ino)?;
        let (start, end) = match kind {
            LockKind::Flock => (0, u64::MAX),
            LockKind::Posix => locks::range(start, end).ok_or(Fail::Errno(Errno::Inval))?,
        };
        let mut table = self.s.locks(ino)?;
        match typ {
            None => table.unlock(&owner, kind, start, end),
            Some(typ) => {
                if table.set(owner, kind, typ, start, end, pid).is_err() {
                    return Err(Errno::Again.into());
                }
            }
        }
        // (An unlock may split a lock too.)
        if table.len() > LOCKS_PER_INODE_MAX {
            return Err(Errno::NoLocks.into());
        }
        self.begin();
        self.s.put_locks(ino, &table)?;
        Ok(Outcome::Done)
    }

    /// Drop the locks of some owners of the origin on `ino` (a close). Nothing to drop is no error,
    /// nor is an inode that is gone (its locks went with it).
    fn release_locks(&mut self, ino: Ino, incarnation: u64, owners: &[u64], kind: Option<LockKind>) -> Step<Outcome> {
        let mut table = self.s.locks(ino)?;
        let before = table.clone();
        match kind {
            None => table.release_ids(self.cmd.origin, incarnation, owners),
            Some(kind) => {
                for id in owners {
                    table.release_owner(&LockOwner { node: self.cmd.origin, incarnation, id: *id }, Some(kind));
                }
            }
        }
        if table != before {
            self.begin();
            self.s.put_locks(ino, &table)?;
        }
        Ok(Outcome::Done)
    }

    /// Drop the locks `node` holds under any incarnation but `keep` (all of them for `None`).
    /// Apply `drop` (true when it dropped something) to every inode's lock table.
    fn drop_locks(&mut self, mut drop: impl FnMut(&mut LockTable) -> bool) -> Step<Outcome> {
        for ino in self.s.locked_inodes()? {
            let mut table = self.s.locks(ino)?;
            if drop(&mut table) {
                self.begin();
                self.s.put_locks(ino, &table)?;
            }
        }
        Ok(Outcome::Done)
    }

    fn init(&mut self, perm: u32, uid: u32, gid: u32) -> Step<Outcome> {
        if self.meta.next_ino != 0 || self.get(ROOT_INO)?.is_some() {
            return Err(Errno::Exist.into());
        }
        self.begin();
        let t = self.now();
        let root = Inode {
            ino: ROOT_INO,
            kind: FileKind::Dir,
            parent: ROOT_INO,
            perm: perm & PERM_MASK,
            uid,
            gid,
            nlink: 2,
            size: 0,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            blocks: 0,
            target: Vec::new(),
        };
        self.put(root);
        self.meta.next_ino = ROOT_INO + 1;
        self.meta.next_cookie = 3;
        self.meta.inode_count = 1;
        Ok(Outcome::Done)
    }

    fn register(&mut self, node: NodeId) -> Step<Outcome> {
        self.begin();
        if !self.meta.nodes.contains(&node) {
            self.meta.nodes.push(node);
            self.meta.nodes.sort_unstable();
        }
        Ok(Outcome::Done)
    }

    fn unregister(&mut self, node: NodeId) -> Step<Outcome> {
        self.begin();
        self.meta.nodes.retain(|n| *n != node);
        // A removed node's lock holders are gone with it.
        self.drop_locks(|t| t.drop_node(node, None))?;
        let mut fences = self.s.lock_fences()?;
        if fences.0.remove(&node).is_some() {
            self.s.put_lock_fences(&fences)?;
        }
        for (ino, mut orphan) in self.s.orphans()? {
            if !orphan.pending.contains(&node) {
                continue;
            }
            orphan.pending.retain(|n| *n != node);
            if orphan.pending.is_empty() {
                self.free(ino)?;
            } else {
                self.s.put_orphan(ino, &orphan)?;
            }
        }
        Ok(Outcome::Done)
    }

    fn release(&mut self, ino: Ino) -> Step<Outcome> {
        let origin = self.cmd.origin;
        let Some(mut orphan) = self.s.orphan(ino)? else {
            // Not (or no longer) open-unlinked: nothing to release.
            return Ok(Outcome::Done);
        };
        if !orphan.pending.contains(&origin) {
            return Ok(Outcome::Done);
        }
        self.begin();
        orphan.pending.retain(|n| *n != origin);
        if orphan.pending.is_empty() {
            self.free(ino)?;
        } else {
            self.s.put_orphan(ino, &orphan)?;
        }
        Ok(Outcome::Done)
    }

    /// A new inode with owner, group and mode decided as Linux does (setgid directories).
    fn new_inode(&mut self, kind: FileKind, perm: u32, parent: &Inode) -> Inode {
        let caller = &self.cmd.caller;
        let mut perm = perm & PERM_MASK;
        let gid = if parent.perm & S_ISGID != 0 {
            if kind == FileKind::Dir {
                perm |= S_ISGID;
            } else if perm & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP)
                && caller.uid != 0
                && !caller.in_group(parent.gid)
            {
                perm &= !S_ISGID;
            }
            parent.gid
        } else {
            caller.gid
        };
        let ino = self.meta.next_ino;
        self.meta.next_ino += 1;
        self.meta.inode_count += 1;
        let t = self.now();
        Inode {
            ino,
            kind,
            parent: if kind == FileKind::Dir { parent.ino } else { 0 },
            perm,
            uid: caller.uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: 0,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            blocks: 0,
            target: Vec::new(),
        }
    }

    /// The checks every create-like op shares: parent is a directory, the name is free.
    fn check_create(&self, parent: Ino, name: &[u8]) -> Step<Inode> {
        let dir = self.need_dir(parent)?;
        check_name(name)?;
        if is_dot(name) || self.s.entry(parent, name)?.is_some() {
            return Err(Errno::Exist.into());
        }
        Ok(dir)
    }

    /// Enter a freshly made inode under `(parent, name)` and update the parent.
    fn enter_new(&mut self, parent: Ino, name: &[u8], inode: Inode) -> Step<Outcome> {
        let entry = DirEntry {
            ino: inode.ino,
            kind: inode.kind,
            cookie: self.cookie(),
        };
        self.s.put_entry(parent, name, &entry)?;
        if inode.kind == FileKind::Dir {
            self.dir_nlink(parent, 1)?;
        }
        self.touch_dir(parent)?;
        self.put(inode.clone());
        Ok(Outcome::Inode(inode))
    }

    /// `umask`: `None` for `MakeNode` (`perm` masked already, no ACL inherited), otherwise the
    /// caller's umask, applied unless the parent has a default ACL, which is inherited instead.
    fn make_node(
        &mut self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u32,
        rdev: u32,
        umask: Option<u32>,
    ) -> Step<Outcome> {
        let dir = self.check_create(parent, name)?;
        if kind == FileKind::Symlink {
            return Err(Errno::Inval.into());
        }
        if kind == FileKind::Dir && dir.nlink >= LINK_COUNT_MAX {
            return Err(Errno::TooManyLinks.into());
        }
        self.begin();
        // mkdir keeps only the permission bits and the sticky bit (setgid comes from the parent).
        let perm = if kind == FileKind::Dir {
            perm & (0o777 | S_ISVTX)
        } else {
            perm
        };
        let mut inode = self.new_inode(kind, perm, &dir);
        if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            inode.rdev = rdev;
        }
        let Some(umask) = umask else { return self.enter_new(parent, name, inode) };
        // A default ACL that does not decode (none is stored that way: set_xattr validates)
        // counts as none.
        let default = self.s.xattr(parent, ACL_DEFAULT_XATTR)?.and_then(|v| Acl::parse(&v).ok().map(|a| (a, v)));
        let Some((default, default_value)) = default else {
            inode.perm &= !(umask & 0o777);
            return self.enter_new(parent, name, inode);
        };
        let (bits, access) = default.inherit(inode.perm);
        inode.perm = (inode.perm & !0o777) | bits;
        if let Some(access) = access {
            self.s.put_xattr(inode.ino, ACL_ACCESS_XATTR, &access.encode())?;
        }
        if kind == FileKind::Dir {
            self.s.put_xattr(inode.ino, ACL_DEFAULT_XATTR, &default_value)?;
        }
        self.enter_new(parent, name, inode)
    }

    fn symlink(&mut self, parent: Ino, name: &[u8], target: &[u8]) -> Step<Outcome> {
        let dir = self.check_create(parent, name)?;
        if target.is_empty() {
            return Err(Errno::NoEnt.into());
        }
        if target.len() > SYMLINK_BYTES_MAX {
            return Err(Errno::NameTooLong.into());
        }
        if target.contains(&0) {
            return Err(Errno::Inval.into());
        }
        self.begin();
        let mut inode = self.new_inode(FileKind::Symlink, 0o777, &dir);
        inode.size = target.len() as u64;
        inode.target = target.to_vec();
        self.enter_new(parent, name, inode)
    }

    fn link(&mut self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Step<Outcome> {
        let mut inode = self.need(ino)?;
        self.check_create(new_parent, new_name)?;
        if inode.kind == FileKind::Dir {
            return Err(Errno::Perm.into());
        }
        if inode.nlink == 0 {
            // An open-unlinked inode cannot get a name back (Linux, without O_TMPFILE).
            return Err(Errno::NoEnt.into());
        }
        if inode.nlink >= LINK_COUNT_MAX {
            return Err(Errno::TooManyLinks.into());
        }
        self.begin();
        let entry = DirEntry {
            ino,
            kind: inode.kind,
            cookie: self.cookie(),
        };
        self.s.put_entry(new_parent, new_name, &entry)?;
        inode.nlink += 1;
        inode.ctime = self.now();
        self.put(inode.clone());
        self.touch_dir(new_parent)?;
        Ok(Outcome::Inode(inode))
    }

    /// A non-directory lost one name: drop its link count; at zero it becomes an orphan (if some
    /// node may hold it open) or is freed. Every registered node may hold it open, except the
    /// origin when it said it expected this very inode closed (`expect_closed`, see `Op::Unlink`).
    /// Returns the inode as it is afterwards.
    fn drop_name(&mut self, ino: Ino, expect_closed: Option<Ino>) -> Step<Inode> {
        let mut inode = self.need(ino)?;
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = self.now();
        let last = inode.nlink == 0;
        self.put(inode.clone());
        if !last {
            return Ok(inode);
        }
        let origin_open = expect_closed != Some(ino);
        let origin = self.cmd.origin;
        let mut pending: Vec<NodeId> = self
            .meta
            .nodes
            .iter()
            .copied()
            .filter(|n| *n != origin)
            .collect();
        if origin_open {
            pending.push(origin);
            pending.sort_unstable();
        }
        if pending.is_empty() {
            self.free(ino)?;
        } else {
            self.s.put_orphan(ino, &Orphan { pending })?;
        }
        Ok(inode)
    }

    /// Delete an inode with its xattrs, blocks and orphan record.
    fn free(&mut self, ino: Ino) -> Step<()> {
        let Some(mut inode) = self.get(ino)? else {
            return Ok(());
        };
        if inode.kind == FileKind::File {
            self.blocks().free_all(&mut inode)?;
        }
        for name in self.s.xattr_names(ino)? {
            self.s.del_xattr(ino, &name)?;
        }
        if self.s.orphan(ino)?.is_some() {
            self.s.del_orphan(ino)?;
        }
        if !self.s.locks(ino)?.is_empty() {
            self.s.put_locks(ino, &LockTable::default())?;
        }
        self.dirty.insert(ino, None);
        self.meta.inode_count = self.meta.inode_count.saturating_sub(1);
        Ok(())
    }

    fn unlink(&mut self, parent: Ino, name: &[u8], expect_closed: Option<Ino>) -> Step<Outcome> {
        self.need_dir(parent)?;
        check_name(name)?;
        if is_dot(name) {
            return Err(Errno::IsDir.into());
        }
        let entry = self
            .s
            .entry(parent, name)?
            .ok_or(Fail::Errno(Errno::NoEnt))?;
        if entry.kind == FileKind::Dir {
            return Err(Errno::IsDir.into());
        }
        self.begin();
        self.s.del_entry(parent, name)?;
        let removed = self.drop_name(entry.ino, expect_closed)?;
        self.touch_dir(parent)?;
        Ok(Outcome::Inode(removed))
    }

    fn is_empty_dir(&self, ino: Ino) -> Step<bool> {
        Ok(self.s.entries_after(ino, 0, 1)?.is_empty())
    }

    fn rmdir(&mut self, parent: Ino, name: &[u8]) -> Step<Outcome> {
        self.need_dir(parent)?;
        check_name(name)?;
        if name == b"." {
            return Err(Errno::Inval.into());
        }
        if name == b".." {
            return Err(Errno::NotEmpty.into());
        }
        let entry = self
            .s
            .entry(parent, name)?
            .ok_or(Fail::Errno(Errno::NoEnt))?;
        if entry.kind != FileKind::Dir {
            return Err(Errno::NotDir.into());
        }
        if !self.is_empty_dir(entry.ino)? {
            return Err(Errno::NotEmpty.into());
        }
        self.begin();
        self.s.del_entry(parent, name)?;
        self.free(entry.ino)?;
        self.dir_nlink(parent, -1)?;
        self.touch_dir(parent)?;
        Ok(Outcome::Done)
    }

    /// Is `dir` equal to `ancestor` or below it? Walks `parent` pointers up to the root.
    fn within(&self, dir: Ino, ancestor: Ino) -> Step<bool> {
        let mut at = dir;
        // The walk is bounded by the number of inodes; a longer walk means a cycle (corruption).
        for _ in 0..=self.meta.inode_count {
            if at == ancestor {
                return Ok(true);
            }
            if at == ROOT_INO {
                return Ok(false);
            }
            at = self.need(at)?.parent;
        }
        Err(StoreFault(format!("directory cycle above inode {dir}")).into())
    }

    fn rename(
        &mut self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        expect_closed: Option<Ino>,
    ) -> Step<Outcome> {
        if flags.exchange && flags.noreplace {
            return Err(Errno::Inval.into());
        }
        self.need_dir(parent)?;
        self.need_dir(new_parent)?;
        check_name(name)?;
        check_name(new_name)?;
        if is_dot(name) || is_dot(new_name) {
            // Linux says EBUSY; the kernel never sends these to a filesystem.
            return Err(Errno::Inval.into());
        }
        let src = self
            .s
            .entry(parent, name)?
            .ok_or(Fail::Errno(Errno::NoEnt))?;
        let dst = self.s.entry(new_parent, new_name)?;
        if flags.exchange && dst.is_none() {
            return Err(Errno::NoEnt.into());
        }
        if flags.noreplace && dst.is_some() {
            return Err(Errno::Exist.into());
        }
        // No directory may move into its own subtree.
        if src.kind == FileKind::Dir && self.within(new_parent, src.ino)? {
            return Err(Errno::Inval.into());
        }
        if let Some(dst) = &dst {
            if dst.kind == FileKind::Dir && self.within(parent, dst.ino)? {
                // The target is an ancestor of the source: for a plain rename it is not empty.
                let e = if flags.exchange {
                    Errno::Inval
                } else {
                    Errno::NotEmpty
                };
                return Err(e.into());
            }
        }
        if dst.is_some_and(|d| d.ino == src.ino) {
            // Two names of one inode: POSIX says do nothing and succeed.
            return Ok(Outcome::Done);
        }
        if flags.exchange {
            let dst = dst.expect("checked above");
            return self.exchange(parent, name, src, new_parent, new_name, dst);
        }
        if let Some(dst) = &dst {
            match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                (true, false) => return Err(Errno::NotDir.into()),
                (false, true) => return Err(Errno::IsDir.into()),
                (true, true) if !self.is_empty_dir(dst.ino)? => return Err(Errno::NotEmpty.into()),
                _ => {}
            }
        }
        let moves_dir = src.kind == FileKind::Dir && parent != new_parent;
        if moves_dir && dst.is_none() && self.need(new_parent)?.nlink >= LINK_COUNT_MAX {
            return Err(Errno::TooManyLinks.into());
        }
        self.begin();
        // The replaced target goes first.
        let mut replaced = None;
        if let Some(dst) = &dst {
            self.s.del_entry(new_parent, new_name)?;
            if dst.kind == FileKind::Dir {
                self.free(dst.ino)?;
                self.dir_nlink(new_parent, -1)?;
            } else {
                replaced = Some(self.drop_name(dst.ino, expect_closed)?);
            }
        }
        self.s.del_entry(parent, name)?;
        let entry = DirEntry {
            ino: src.ino,
            kind: src.kind,
            cookie: self.cookie(),
        };
        self.s.put_entry(new_parent, new_name, &entry)?;
        let mut inode = self.need(src.ino)?;
        inode.ctime = self.now();
        if moves_dir {
            inode.parent = new_parent;
        }
        self.put(inode);
        if moves_dir {
            self.dir_nlink(parent, -1)?;
            self.dir_nlink(new_parent, 1)?;
        }
        self.touch_dir(parent)?;
        self.touch_dir(new_parent)?;
        Ok(replaced.map_or(Outcome::Done, Outcome::Inode))
    }

    /// RENAME_EXCHANGE, after the shared checks. Both names stay where they are (with their
    /// cookies); the inodes behind them swap.
    fn exchange(
        &mut self,
        parent: Ino,
        name: &[u8],
        src: DirEntry,
        new_parent: Ino,
        new_name: &[u8],
        dst: DirEntry,
    ) -> Step<Outcome> {
        let src_dir = src.kind == FileKind::Dir;
        let dst_dir = dst.kind == FileKind::Dir;
        if parent != new_parent && src_dir != dst_dir {
            let gaining = if src_dir { new_parent } else { parent };
            if self.need(gaining)?.nlink >= LINK_COUNT_MAX {
                return Err(Errno::TooManyLinks.into());
            }
        }
        self.begin();
        self.s.put_entry(
            parent,
            name,
            &DirEntry {
                ino: dst.ino,
                kind: dst.kind,
                cookie: src.cookie,
            },
        )?;
        self.s.put_entry(
            new_parent,
            new_name,
            &DirEntry {
                ino: src.ino,
                kind: src.kind,
                cookie: dst.cookie,
            },
        )?;
        for (ino, to) in [(src.ino, new_parent), (dst.ino, parent)] {
            let mut inode = self.need(ino)?;
            inode.ctime = self.now();
            if inode.kind == FileKind::Dir {
                inode.parent = to;
            }
            self.put(inode);
        }
        if parent != new_parent && src_dir != dst_dir {
            let (gaining, losing) = if src_dir {
                (new_parent, parent)
            } else {
                (parent, new_parent)
            };
            self.dir_nlink(gaining, 1)?;
            self.dir_nlink(losing, -1)?;
        }
        self.touch_dir(parent)?;
        self.touch_dir(new_parent)?;
        Ok(Outcome::Done)
    }

    #[allow(clippy::too_many_arguments)] // reason: mirrors the fields of Op::SetAttr one to one
    fn set_attr(
        &mut self,
        ino: Ino,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    ) -> Step<Outcome> {
        let mut inode = self.need(ino)?;
        if let Some(size) = size {
            match inode.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(Errno::IsDir.into()),
                _ => return Err(Errno::Inval.into()),
            }
            if size > FILE_BYTES_MAX {
                return Err(Errno::FileTooBig.into());
            }
        }
        self.begin();
        let t = self.now();
        let caller = self.cmd.caller.clone();
        let any = perm.is_some()
            || uid.is_some()
            || gid.is_some()
            || size.is_some()
            || atime.is_some()
            || mtime.is_some();
        if let Some(uid) = uid {
            inode.uid = uid;
        }
        if let Some(gid) = gid {
            inode.gid = gid;
        }
        if (uid.is_some() || gid.is_some()) && perm.is_none() && inode.kind != FileKind::Dir {
            // chown drops setuid, and setgid when it means "setgid" (group execute set).
            inode.perm &= !S_ISUID;
            if inode.perm & S_IXGRP != 0 {
                inode.perm &= !S_ISGID;
            }
        }
        if let Some(perm) = perm {
            let mut perm = perm & PERM_MASK;
            if caller.uid != 0 && !caller.in_group(inode.gid) {
                perm &= !S_ISGID;
            }
            inode.perm = perm;
            // The access ACL follows a chmod (`posix_acl_chmod`).
            if let Some(mut acl) = self.s.xattr(ino, ACL_ACCESS_XATTR)?.and_then(|v| Acl::parse(&v).ok()) {
                acl.chmod(perm);
                self.s.put_xattr(ino, ACL_ACCESS_XATTR, &acl.encode())?;
            }
        }
        if let Some(size) = size {
            if size < inode.size {
                self.blocks().truncate(&mut inode, size)?;
            }
            if size != inode.size {
                inode.size = size;
                inode.mtime = t;
            }
        }
        let at = |x: SetTime| match x {
            SetTime::Now => t,
            SetTime::At(ts) => ts,
        };
        if let Some(a) = atime {
            inode.atime = at(a);
        }
        if let Some(m) = mtime {
            inode.mtime = at(m);
        }
        if any {
            inode.ctime = t;
        }
        self.put(inode.clone());
        Ok(Outcome::Inode(inode))
    }

    /// A regular file to change content of: IsDir for directories, Inval for other kinds.
    fn need_file(&self, ino: Ino) -> Step<Inode> {
        let inode = self.need(ino)?;
        match inode.kind {
            FileKind::File => Ok(inode),
            FileKind::Dir => Err(Errno::IsDir.into()),
            _ => Err(Errno::Inval.into()),
        }
    }

    /// After a write by `caller`: drop setuid, and setgid if group-executable (unless root).
    fn kill_privs(&self, inode: &mut Inode) {
        if self.cmd.caller.uid != 0 {
            inode.perm &= !S_ISUID;
            if inode.perm & S_IXGRP != 0 {
                inode.perm &= !S_ISGID;
            }
        }
    }

    fn write(&mut self, ino: Ino, offset: u64, data: &[u8], append: bool) -> Step<Outcome> {
        let mut inode = self.need_file(ino)?;
        if data.len() > WRITE_BYTES_MAX {
            return Err(Errno::Inval.into());
        }
        let proposed = offset;
        let offset = if append { inode.size } else { offset };
        let len = data.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= FILE_BYTES_MAX => {}
            _ => return Err(Errno::FileTooBig.into()),
        }
        if len == 0 {
            return Ok(Outcome::Written {
                len: 0,
                attr: inode,
            });
        }
        self.begin();
        // The pieces were cut at the proposed offset; an append that lands at another place
        // within a block is cut differently, and its blocks are hashed as they are stored.
        let pieces = (offset % BLOCK_BYTES == proposed % BLOCK_BYTES).then_some(self.pieces);
        self.blocks()
            .write_hashed(&mut inode, offset, data, pieces)?;
        self.finish_write(inode, offset + len, len)
    }

    fn finish_write(&mut self, mut inode: Inode, end: u64, len: u64) -> Step<Outcome> {
        inode.size = inode.size.max(end);
        inode.mtime = self.now();
        inode.ctime = self.now();
        self.kill_privs(&mut inode);
        // A write drops the file's capabilities, whoever writes (as Linux does). The writing
        // node's kernel drops them itself only if it checks at this write(2): it skips the check
        // on an inode it marked S_NOSEC until it refreshes the inode's attributes, which, after
        // another node set them, waits for that node's invalidation (a race the cluster test
        // `cluster_write_drops_capabilities_another_node_set` lost under load).
        if self.s.xattr(inode.ino, CAPABILITY_XATTR)?.is_some() {
            self.s.del_xattr(inode.ino, CAPABILITY_XATTR)?;
        }
        self.put(inode.clone());
        Ok(Outcome::Written { len, attr: inode })
    }

    fn fallocate(&mut self, ino: Ino, offset: u64, len: u64, mode: FallocMode) -> Step<Outcome> {
        let mut inode = self.need_file(ino)?;
        if len == 0 {
            return Err(Errno::Inval.into());
        }
        let end = match offset.checked_add(len) {
            Some(end) if end <= FILE_BYTES_MAX => end,
            _ => return Err(Errno::FileTooBig.into()),
        };
        self.begin();
        let (zero, keep_size) = match mode {
            FallocMode::Allocate { keep_size } => (false, keep_size),
            FallocMode::PunchHole => (true, true),
            FallocMode::ZeroRange { keep_size } => (true, keep_size),
        };
        if zero {
            let size = inode.size;
            self.blocks()
                .zero(&mut inode, offset.min(size), end.min(size))?;
        }
        if !keep_size && end > inode.size {
            inode.size = end;
        }
        inode.mtime = self.now();
        inode.ctime = self.now();
        self.put(inode.clone());
        Ok(Outcome::Inode(inode))
    }

    fn copy_range(
        &mut self,
        ino_in: Ino,
        offset_in: u64,
        ino_out: Ino,
        offset_out: u64,
        len: u64,
    ) -> Step<Outcome> {
        let src = self.need_file(ino_in)?;
        let mut dst = self.need_file(ino_out)?;
        // Shorten to the end of the source and to one command's data, as copy_file_range may.
        let mut n = if offset_in >= src.size {
            0
        } else {
            len.min(src.size - offset_in)
        };
        // Block-aligned copies share blocks without reading them, so they may be longer.
        let aligned =
            offset_in.is_multiple_of(BLOCK_BYTES) && offset_out.is_multiple_of(BLOCK_BYTES);
        n = n.min(if aligned {
            COPY_BLOCKS_MAX * BLOCK_BYTES
        } else {
            WRITE_BYTES_MAX as u64
        });
        if offset_out >= FILE_BYTES_MAX && n > 0 {
            return Err(Errno::FileTooBig.into());
        }
        n = n.min(FILE_BYTES_MAX.saturating_sub(offset_out));
        if ino_in == ino_out
            && offset_out < offset_in.saturating_add(n)
            && offset_in < offset_out.saturating_add(n)
        {
            return Err(Errno::Inval.into());
        }
        if n == 0 {
            return Ok(Outcome::Written { len: 0, attr: dst });
        }
        self.begin();
        let src = if ino_in == ino_out { dst.clone() } else { src };
        self.blocks()
            .copy(&src, offset_in, &mut dst, offset_out, n)?;
        self.finish_write(dst, offset_out + n, n)
    }

    fn check_xattr_name(name: &[u8]) -> Result<(), Errno> {
        // Linux: an empty name and an over-long name are both ERANGE.
        if name.is_empty() || name.len() > XATTR_NAME_BYTES_MAX || name.contains(&0) {
            return Err(Errno::Range);
        }
        Ok(())
    }

    fn set_xattr(
        &mut self,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        flags: XattrFlags,
    ) -> Step<Outcome> {
        let mut inode = self.need(ino)?;
        Self::check_xattr_name(name)?;
        if value.len() > XATTR_VALUE_BYTES_MAX {
            return Err(Errno::TooBig.into());
        }
        let exists = self.s.xattr(ino, name)?.is_some();
        match flags {
            XattrFlags::Create if exists => return Err(Errno::Exist.into()),
            XattrFlags::Replace if !exists => return Err(Errno::NoData.into()),
            _ => {}
        }
        if !exists {
            let names = self.s.xattr_names(ino)?;
            let list_bytes: usize =
                names.iter().map(|n| n.len() + 1).sum::<usize>() + name.len() + 1;
            if list_bytes > XATTR_LIST_BYTES_MAX {
                return Err(Errno::NoSpace.into());
            }
        }
        // An ACL must be valid; an access ACL sets the mode's rwx bits and is kept only if it
        // says more than they do (`posix_acl_update_mode`); a default ACL is for directories.
        let acl = if name == ACL_ACCESS_XATTR || name == ACL_DEFAULT_XATTR {
            let acl = Acl::parse(value)?;
            if name == ACL_DEFAULT_XATTR && inode.kind != FileKind::Dir {
                return Err(Errno::Access.into());
            }
            Some(acl)
        } else {
            None
        };
        self.begin();
        match acl {
            Some(acl) if name == ACL_ACCESS_XATTR => {
                inode.perm = (inode.perm & !0o777) | acl.mode_bits();
                let caller = &self.cmd.caller;
                if caller.uid != 0 && !caller.in_group(inode.gid) {
                    inode.perm &= !S_ISGID;
                }
                if !acl.is_mode_only() {
                    self.s.put_xattr(ino, name, &acl.encode())?;
                } else if exists {
                    self.s.del_xattr(ino, name)?;
                }
            }
            Some(acl) => self.s.put_xattr(ino, name, &acl.encode())?,
            None => self.s.put_xattr(ino, name, value)?,
        }
        inode.ctime = self.now();
        self.put(inode);
        Ok(Outcome::Done)
    }

    fn remove_xattr(&mut self, ino: Ino, name: &[u8]) -> Step<Outcome> {
        let mut inode = self.need(ino)?;
        Self::check_xattr_name(name)?;
        if self.s.xattr(ino, name)?.is_none() {
            return Err(Errno::NoData.into());
        }
        self.begin();
        self.s.del_xattr(ino, name)?;
        inode.ctime = self.now();
        self.put(inode);
        Ok(Outcome::Done)
    }
}

/// The extended attribute holding a file's capabilities, which a write removes.
const CAPABILITY_XATTR: &[u8] = b"security.capability";

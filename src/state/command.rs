//! Commands: every mutation of the namespace, as it travels through the Raft log.

use serde::{Deserialize, Serialize};

use super::content::{hash_of_hashes, piece_hashes, sha256};
use super::error::Errno;
use super::locks::{LockKind, LockType};
use super::types::{Caller, FileKind, Hash, Ino, Inode, NodeId, Timespec};

/// One mutation, decided completely by the proposing node so that apply is pure.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The node that proposed the command (and whose caller waits for the result).
    pub origin: NodeId,
    /// Per-origin sequence number; a repeated `(origin, seq)` applies once and returns the first result.
    pub seq: u64,
    /// The proposer's clock at proposal time; every timestamp the command sets comes from here.
    pub time: Timespec,
    /// Who asked.
    pub caller: Caller,
    /// The hash of the op's payload bytes (`Op::payload`), as `Op::content_hash` defines it; apply
    /// recomputes it and rejects a mismatch.
    pub content_hash: Hash,
    pub op: Op,
}

/// How a time attribute is set.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The command's time (`UTIME_NOW`).
    Now,
    /// An explicit time.
    At(Timespec),
}

/// Flags of rename (renameat2).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenameFlags {
    /// RENAME_NOREPLACE: fail with EEXIST if the target exists.
    pub noreplace: bool,
    /// RENAME_EXCHANGE: atomically swap source and target (both must exist).
    pub exchange: bool,
}

/// fallocate modes we support.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Plain allocation: extends the size if `offset + len` is beyond it.
    Allocate { keep_size: bool },
    /// FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: the range reads as zeros afterwards.
    PunchHole,
    /// FALLOC_FL_ZERO_RANGE (optionally with KEEP_SIZE).
    ZeroRange { keep_size: bool },
}

/// Flags of setxattr.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrFlags {
    /// Create or replace.
    Any,
    /// XATTR_CREATE: fail with EEXIST if it exists.
    Create,
    /// XATTR_REPLACE: fail with ENODATA if it does not exist.
    Replace,
}

/// The operation of a command. Names are bytes (any byte but `/` and NUL).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create the root directory; valid once, on an empty state.
    Init { perm: u32, uid: u32, gid: u32 },
    /// Add a node to `Meta::nodes` (idempotent).
    RegisterNode { node: NodeId },
    /// Remove a node from `Meta::nodes` and from every orphan's pending set.
    UnregisterNode { node: NodeId },
    /// Create a regular file, directory, fifo, socket or device. `perm` is already masked by the
    /// umask; owner is the caller, group follows setgid-directory inheritance.
    MakeNode { parent: Ino, #[serde(with = "serde_bytes")] name: Vec<u8>, kind: FileKind, perm: u32, rdev: u32 },
    /// Create a symlink.
    Symlink { parent: Ino, #[serde(with = "serde_bytes")] name: Vec<u8>, #[serde(with = "serde_bytes")] target: Vec<u8> },
    /// Add a hard link to `ino` at `(new_parent, new_name)`.
    Link { ino: Ino, new_parent: Ino, #[serde(with = "serde_bytes")] new_name: Vec<u8> },
    /// Remove a non-directory name. `expect_closed` is the inode the origin expects under the name
    /// and guarantees it does not hold open (no handle, new opens refused) until this command is
    /// applied. If the name names that inode, the origin is not among the nodes that must
    /// release it when its last name goes (freed at once if no other node is registered);
    /// otherwise (`None`, or another inode is under the name now: a rename from another node got
    /// in first) the origin may hold the removed inode open and must release it like any node.
    /// Returns the removed inode as it is afterwards.
    Unlink {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "expect_closed_wire")]
        expect_closed: Option<Ino>,
    },
    /// Remove an empty directory.
    Rmdir { parent: Ino, #[serde(with = "serde_bytes")] name: Vec<u8> },
    /// Rename; `expect_closed` as for Unlink, about a replaced target (which it returns, if any).
    Rename {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        new_parent: Ino,
        #[serde(with = "serde_bytes")]
        new_name: Vec<u8>,
        flags: RenameFlags,
        #[serde(with = "expect_closed_wire")]
        expect_closed: Option<Ino>,
    },
    /// Change attributes (chmod, chown, truncate, utimens). A chown by a non-root caller, or of a
    /// regular file, clears setuid/setgid as Linux does.
    SetAttr {
        ino: Ino,
        perm: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    /// Write `data` at `offset` (or at the end of the file when `append`). Payload: `data`.
    Write { ino: Ino, offset: u64, #[serde(with = "serde_bytes")] data: Vec<u8>, append: bool },
    /// fallocate.
    Fallocate { ino: Ino, offset: u64, len: u64, mode: FallocMode },
    /// copy_file_range within the namespace.
    CopyRange { ino_in: Ino, offset_in: u64, ino_out: Ino, offset_out: u64, len: u64 },
    /// setxattr. Payload: `value`.
    SetXattr { ino: Ino, #[serde(with = "serde_bytes")] name: Vec<u8>, #[serde(with = "serde_bytes")] value: Vec<u8>, flags: XattrFlags },
    /// removexattr.
    RemoveXattr { ino: Ino, #[serde(with = "serde_bytes")] name: Vec<u8> },
    /// The origin node no longer holds the orphan `ino` open.
    Release { ino: Ino },
    /// Create a regular file, directory, fifo, socket or device with `perm` as the caller asked
    /// (not masked): if the parent has a default ACL, the new inode inherits it (its mode cut by
    /// it, as Linux's `posix_acl_create`), otherwise `perm` is masked by `umask`. Owner and group
    /// as for `MakeNode` (which older logs hold: its `perm` was masked by the kernel).
    MakeNodeUnmasked {
        parent: Ino,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        kind: FileKind,
        perm: u32,
        umask: u32,
        rdev: u32,
    },
    /// Take, change or (`typ: None`) drop an advisory lock on `ino` (`[start, end]`, inclusive;
    /// a flock covers the whole file) for the lock owner `(origin, incarnation, owner)`: `owner`
    /// is the kernel's lock-owner id on the origin (a process for classic POSIX locks, an open
    /// file for OFD locks and flock), `incarnation` the origin's run (raised at each start).
    /// EAGAIN if a lock of another owner conflicts; ENOENT if `ino` is not live; EINVAL if
    /// `start > end`. `pid` is what F_GETLK reports.
    Lock {
        ino: Ino,
        incarnation: u64,
        owner: u64,
        kind: LockKind,
        typ: Option<LockType>,
        start: u64,
        end: u64,
        pid: u32,
    },
    /// Drop the locks (of `kind`, or of every kind) that the owners `owners` of `(origin,
    /// incarnation)` hold on `ino`: a close (FLUSH drops a process's POSIX locks, the last
    /// close of an open file its flock and OFD locks).
    ReleaseLocks { ino: Ino, incarnation: u64, owners: Vec<u64>, kind: Option<LockKind> },
    /// Drop every lock the origin holds under an incarnation other than `incarnation`: its
    /// earlier runs' locks, whose holders are gone (proposed at start).
    DropStaleLocks { incarnation: u64 },
    /// Drop every lock `node` holds under an incarnation up to `incarnation`: the leader has not
    /// heard from that node for the lock lease (`--lock-lease-ms`), so its holders are taken
    /// for gone (proposed by the leader, see `raft::leases`). A later run of the node, with a
    /// higher incarnation, keeps its locks.
    ExpireLocks { node: NodeId, incarnation: u64 },
    /// The origin has learnt that its locks expired (`LockFences`, epoch `epoch`) and fenced
    /// the open files of those inodes itself: its changes are accepted again. An acknowledgement
    /// of an earlier epoch lifts nothing.
    AckLockExpiry { epoch: u64 },
}

/// How `expect_closed` is encoded, so that log entries written before it existed still decode
/// (a data dir of the previous version keeps its log; see `store::wal`'s upgrade). The field
/// replaced `origin_open: bool`, one byte 0 or 1 in the log; an enum's variant index is one byte
/// too, so variants 0 and 1 are the old values and 2 carries the inode. Both old values decode to
/// `None`, which keeps the origin among the nodes that must release the inode: for the old
/// `false` more cautious than it was (the origin releases it at its next start, where it holds
/// nothing open), never less.
mod expect_closed_wire {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Ino;

    #[derive(Serialize, Deserialize)]
    enum Wire {
        /// `origin_open: false` of the previous version.
        LegacyNotOpen,
        /// `origin_open: true` of the previous version, and `None` now.
        MayBeOpen,
        Closed(Ino),
    }

    pub fn serialize<S: Serializer>(v: &Option<Ino>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => Wire::MayBeOpen,
            Some(ino) => Wire::Closed(*ino),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Ino>, D::Error> {
        Ok(match Wire::deserialize(d)? {
            Wire::LegacyNotOpen | Wire::MayBeOpen => None,
            Wire::Closed(ino) => Some(ino),
        })
    }
}

impl Op {
    /// The bytes covered by `Command::content_hash`: file data and xattr values; empty otherwise.
    pub fn payload(&self) -> &[u8] {
        match self {
            Op::Write { data, .. } => data,
            Op::SetXattr { value, .. } => value,
            Op::Symlink { target, .. } => target,
            Op::Init { .. }
            | Op::RegisterNode { .. }
            | Op::UnregisterNode { .. }
            | Op::MakeNode { .. }
            | Op::MakeNodeUnmasked { .. }
            | Op::Link { .. }
            | Op::Unlink { .. }
            | Op::Rmdir { .. }
            | Op::Rename { .. }
            | Op::SetAttr { .. }
            | Op::Fallocate { .. }
            | Op::CopyRange { .. }
            | Op::RemoveXattr { .. }
            | Op::Release { .. }
            | Op::Lock { .. }
            | Op::ReleaseLocks { .. }
            | Op::DropStaleLocks { .. }
            | Op::ExpireLocks { .. }
            | Op::AckLockExpiry { .. } => &[],
        }
    }

    /// Whether apply refuses this op from a node whose locks expired without its knowing
    /// (`LockFences`): every change of the namespace, of a file or of its attributes, and every
    /// lock taken. Not fenced: releasing what the node held (an unlock, `ReleaseLocks`,
    /// `Release`), the lifting of the fence, and the cluster's own bookkeeping.
    pub fn fenced(&self) -> bool {
        match self {
            Op::MakeNode { .. }
            | Op::MakeNodeUnmasked { .. }
            | Op::Symlink { .. }
            | Op::Link { .. }
            | Op::Unlink { .. }
            | Op::Rmdir { .. }
            | Op::Rename { .. }
            | Op::SetAttr { .. }
            | Op::Write { .. }
            | Op::Fallocate { .. }
            | Op::CopyRange { .. }
            | Op::SetXattr { .. }
            | Op::RemoveXattr { .. } => true,
            Op::Lock { typ, .. } => typ.is_some(),
            Op::Init { .. }
            | Op::RegisterNode { .. }
            | Op::UnregisterNode { .. }
            | Op::Release { .. }
            | Op::ReleaseLocks { .. }
            | Op::DropStaleLocks { .. }
            | Op::ExpireLocks { .. }
            | Op::AckLockExpiry { .. } => false,
        }
    }

    /// The file whose content, attributes or locks this op changes, for a node-local fence
    /// (`fs::fences`); `None` for namespace changes and bookkeeping.
    pub fn fenced_inode(&self) -> Option<Ino> {
        match self {
            Op::SetAttr { ino, .. }
            | Op::Write { ino, .. }
            | Op::Fallocate { ino, .. }
            | Op::SetXattr { ino, .. }
            | Op::RemoveXattr { ino, .. } => Some(*ino),
            Op::CopyRange { ino_out, .. } => Some(*ino_out),
            Op::Lock { ino, typ: Some(_), .. } => Some(*ino),
            _ => None,
        }
    }
}

/// An op's content hash, with the pieces it was made of (apply stores whole blocks under them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentDigest {
    /// What `Command::content_hash` must be.
    pub hash: Hash,
    /// For a write, SHA-256 of each piece of its data (`content::write_pieces` at its `offset`);
    /// empty for other ops.
    pub pieces: Vec<Hash>,
}

impl Op {
    /// `Command::content_hash` for this op: for a write, SHA-256 over the concatenated SHA-256
    /// hashes of its data cut at the file's block boundaries as seen from `offset`
    /// (`content::write_pieces`; for an append too, whose real offset only apply knows), so that
    /// apply checks the data and gets the hashes of the whole blocks it stores in one pass; for
    /// other ops, SHA-256 of the payload.
    pub fn content_hash(&self) -> Hash {
        self.content_digest().hash
    }

    /// The content hash and, for a write, its piece hashes (one pass over the data).
    pub fn content_digest(&self) -> ContentDigest {
        match self {
            Op::Write { offset, data, .. } => {
                let pieces = piece_hashes(*offset, data);
                ContentDigest {
                    hash: hash_of_hashes(&pieces),
                    pieces,
                }
            }
            _ => ContentDigest {
                hash: sha256(self.payload()),
                pieces: Vec::new(),
            },
        }
    }
}

/// An op with its content digest (`Op::content_digest`: the content hash and a write's piece
/// hashes), computed where the op is made: a FUSE write hashes its data on the fuser thread that
/// received it, so the hashing of concurrent writes runs on those threads instead of queueing on
/// the async runtime's worker. The digest travels with the command in this process only (see
/// `raft::Batch`), so this node's apply of its own proposal need not hash the bytes again.
#[derive(Clone, Debug)]
pub struct HashedOp {
    op: Op,
    digest: ContentDigest,
}

impl HashedOp {
    pub fn new(op: Op) -> HashedOp {
        let digest = op.content_digest();
        HashedOp { op, digest }
    }

    pub fn op(&self) -> &Op {
        &self.op
    }

    pub fn into_parts(self) -> (Op, ContentDigest) {
        (self.op, self.digest)
    }
}

impl From<Op> for HashedOp {
    fn from(op: Op) -> HashedOp {
        HashedOp::new(op)
    }
}

/// What a successful command returns to its caller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report (rmdir, rename without a replaced target, xattr changes, release,
    /// register).
    Done,
    /// The created, linked or changed inode, as it is after the command; for unlink and a
    /// replacing rename, the inode that lost a name (`nlink` 0: it is an orphan or freed).
    Inode(Inode),
    /// Bytes written or copied, and the file's attributes afterwards.
    Written { len: u64, attr: Inode },
}

/// The result apply records for `(origin, seq)` and returns through Raft.
pub type CommandResult = Result<Outcome, Errno>;

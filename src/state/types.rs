//! Plain data of the namespace: inodes, directory entries, credentials, times.

use serde::{Deserialize, Serialize};

/// Inode number. 1 is the root directory; new numbers come from `Meta::next_ino`.
pub type Ino = u64;
/// Raft node identity.
pub type NodeId = u64;
/// SHA-256 digest.
pub type Hash = [u8; 32];

/// The root directory's inode number.
pub const ROOT_INO: Ino = 1;

/// A point in time with nanosecond resolution, seconds since the Unix epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// What kind of object an inode is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

/// One inode: everything `stat` reports, plus the symlink target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: Ino,
    pub kind: FileKind,
    /// For a directory: the directory that contains it (the root's parent is itself). 0 for others
    /// (a non-directory may have several names).
    pub parent: Ino,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Logical size in bytes (for a symlink: the target length; for a directory: 0).
    pub size: u64,
    /// Device number for CharDev/BlockDev.
    pub rdev: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
    pub crtime: Timespec,
    /// Number of content blocks this file references (for `st_blocks`).
    pub blocks: u64,
    /// Symlink target bytes; empty for other kinds.
        #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
}

/// A directory entry: `(parent, name) -> DirEntry`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: Ino,
    pub kind: FileKind,
    /// Stable readdir cookie, unique within the parent, never reused; 1 and 2 are `.` and `..`.
    pub cookie: u64,
}

/// The credentials of the process that caused a command, decided by the proposing node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from /proc/PID/status on FUSE nodes; may be empty).
    pub groups: Vec<u32>,
    pub pid: u32,
}

impl Caller {
    pub fn root() -> Self {
        Caller { uid: 0, gid: 0, groups: Vec::new(), pid: 0 }
    }
    /// Is `gid` the caller's primary or a supplementary group?
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

/// Cluster-wide counters kept in the state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Next inode number to hand out.
    pub next_ino: Ino,
    /// Next directory cookie to hand out (global, so unique within every parent).
    pub next_cookie: u64,
    /// Nodes that have registered with the state; each must release an orphan before it is freed.
    pub nodes: Vec<NodeId>,
    /// Live inodes (including orphans).
    pub inode_count: u64,
    /// Distinct stored blocks.
    pub block_count: u64,
    /// Bytes of distinct stored blocks.
    pub block_bytes: u64,
}

/// An open-unlinked inode: no name refers to it, but some nodes may still have it open.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Orphan {
    /// Nodes that have not yet released the inode; it is freed when this becomes empty.
    pub pending: Vec<NodeId>,
}

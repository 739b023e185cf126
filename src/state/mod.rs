//! The replicated state machine: the whole namespace and the pure `apply` of commands.
//!
//! Architecture invariant: nothing here does I/O, reads a clock, or knows of FUSE, Raft or redb.
//! Storage is reached only through the `StateRead`/`StateWrite` traits.

pub mod acl;
pub mod apply;
pub mod check;
pub mod command;
pub mod content;
pub mod error;
pub mod locks;
pub mod mem;
pub mod txn;
pub mod types;

/// Unit and property tests; `tests::workload` gives other stores a random command stream.
#[cfg(test)]
pub(crate) mod tests;

pub use command::{Command, CommandResult, ContentDigest, FallocMode, HashedOp, Op, Outcome, RenameFlags, SetTime, XattrFlags};
pub use error::{Errno, FsResult};
pub use txn::{StateRead, StateWrite, StoreFault, StoreResult};
pub use types::{Caller, DirEntry, FileKind, Hash, Ino, Inode, Meta, NodeId, Orphan, Timespec, ROOT_INO};
pub use apply::{apply, apply_digested, Digested};
pub use check::check_invariants;
pub use content::{read_range, seek_data, seek_hole, sha256};
pub use locks::{Lock, LockFence, LockFences, LockKind, LockOwner, LockTable, LockType, FENCE_INODES_MAX};
pub use mem::MemState;

//! The storage interface of the state machine. `store/` implements it over redb tables and
//! `state::mem::MemState` over BTreeMaps (the reference model for tests). Apply sees nothing else.
//!
//! Errors of these methods are storage faults (I/O, corruption): they are not deterministic and
//! stop the node (fail-stop); deterministic failures are `Errno` values returned by apply.

use super::command::CommandResult;
use super::locks::{LockFences, LockTable};
use super::types::{DirEntry, Hash, Ino, Inode, Meta, NodeId, Orphan};

/// A storage fault: the store could not read or write. Never a deterministic outcome.
#[derive(Debug, thiserror::Error)]
#[error("storage fault: {0}")]
pub struct StoreFault(pub String);

pub type StoreResult<T> = Result<T, StoreFault>;

/// Read access to the state. Implemented by read transactions and write transactions alike.
pub trait StateRead {
    /// The inode `ino`, if it is live (named or orphaned).
    fn inode(&self, ino: Ino) -> StoreResult<Option<Inode>>;
    /// The entry `name` in directory `parent`.
    fn entry(&self, parent: Ino, name: &[u8]) -> StoreResult<Option<DirEntry>>;
    /// Entries of `parent` with cookie > `after`, in cookie order, at most `max` of them.
    fn entries_after(&self, parent: Ino, after: u64, max: usize) -> StoreResult<Vec<(Vec<u8>, DirEntry)>>;
    /// The hash of block `index` of file `ino`, if that block is stored (absent = a hole, zeros).
    fn block_hash(&self, ino: Ino, index: u64) -> StoreResult<Option<Hash>>;
    /// Stored blocks of `ino` with index in `[from, to)`, in index order.
    fn block_hashes(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Vec<(u64, Hash)>>;
    /// The index of the first stored block of `ino` in `[from, to)`: one lookup, whatever lies
    /// between (a sparse file may have a hole of 2^47 blocks).
    fn next_block(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Option<u64>>;
    /// The content of a stored block (its length may be less than BLOCK_BYTES: the rest is zeros).
    fn block_data(&self, hash: &Hash) -> StoreResult<Option<Vec<u8>>>;
    /// The read path's block access: append bytes `[from, from + max)` of the stored block (cut at
    /// its length) to `out` and return the block's whole length, after checking the whole block.
    /// `Ok(None)` if the block is missing or fails its check: the reader answers EIO, and the node
    /// goes on serving (corruption met by apply is a store fault instead). This default checks the
    /// bytes against their address (SHA-256); the redb store checks the 64-bit check value stored
    /// with every block instead, and copies from its pages without an intermediate buffer.
    fn read_block_into(&self, hash: &Hash, from: usize, max: usize, out: &mut Vec<u8>) -> StoreResult<Option<usize>> {
        let Some(data) = self.block_data(hash)? else { return Ok(None) };
        if super::content::sha256(&data) != *hash {
            return Ok(None);
        }
        let start = from.min(data.len());
        out.extend_from_slice(&data[start..data.len().min(from.saturating_add(max))]);
        Ok(Some(data.len()))
    }
    /// How many block-map slots reference this block (0 if unknown).
    fn block_refs(&self, hash: &Hash) -> StoreResult<u64>;
    /// One extended attribute.
    fn xattr(&self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>>;
    /// All extended attribute names of `ino`, in byte order.
    fn xattr_names(&self, ino: Ino) -> StoreResult<Vec<Vec<u8>>>;
    /// The orphan record of `ino`, if it is open-unlinked.
    fn orphan(&self, ino: Ino) -> StoreResult<Option<Orphan>>;
    /// All orphans.
    fn orphans(&self) -> StoreResult<Vec<(Ino, Orphan)>>;
    /// The advisory locks held on `ino` (empty if none).
    fn locks(&self, ino: Ino) -> StoreResult<LockTable>;
    /// Every inode with a lock held on it, ascending.
    fn locked_inodes(&self) -> StoreResult<Vec<Ino>>;
    /// The recorded result of `(origin, seq)`, if it is still retained.
    fn result(&self, origin: NodeId, seq: u64) -> StoreResult<Option<CommandResult>>;
    /// The highest sequence applied for `origin` (0 if none).
    fn max_seq(&self, origin: NodeId) -> StoreResult<u64>;
    /// The cluster counters. A fresh state returns `Meta::default()` (all zero).
    fn meta(&self) -> StoreResult<Meta>;
    /// The nodes whose locks expired (see `LockFences`); empty in a fresh state.
    fn lock_fences(&self) -> StoreResult<LockFences>;
}

/// Write access to the state, used only by apply inside one transaction.
pub trait StateWrite: StateRead {
    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()>;
    fn del_inode(&mut self, ino: Ino) -> StoreResult<()>;
    fn put_entry(&mut self, parent: Ino, name: &[u8], entry: &DirEntry) -> StoreResult<()>;
    fn del_entry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()>;
    fn put_block_hash(&mut self, ino: Ino, index: u64, hash: &Hash) -> StoreResult<()>;
    fn del_block_hash(&mut self, ino: Ino, index: u64) -> StoreResult<()>;
    /// Store block content (no-op if it is stored already).
    fn put_block_data(&mut self, hash: &Hash, data: &[u8]) -> StoreResult<()>;
    /// Set the reference count; the caller deletes the data when it reaches 0.
    fn put_block_refs(&mut self, hash: &Hash, refs: u64) -> StoreResult<()>;
    /// Delete a block's data and count; returns the bytes its data held.
    fn del_block(&mut self, hash: &Hash) -> StoreResult<u64>;
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()>;
    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()>;
    fn put_orphan(&mut self, ino: Ino, orphan: &Orphan) -> StoreResult<()>;
    fn del_orphan(&mut self, ino: Ino) -> StoreResult<()>;
    /// Store the locks of `ino` (an empty table removes its record).
    fn put_locks(&mut self, ino: Ino, locks: &LockTable) -> StoreResult<()>;
    /// Record the result of `(origin, seq)` and raise `max_seq(origin)` if `seq` is higher.
    fn put_result(&mut self, origin: NodeId, seq: u64, result: &CommandResult) -> StoreResult<()>;
    /// Forget the results of `origin` with sequence below `seq`.
    fn prune_results(&mut self, origin: NodeId, below: u64) -> StoreResult<()>;
    fn put_meta(&mut self, meta: &Meta) -> StoreResult<()>;
    fn put_lock_fences(&mut self, fences: &LockFences) -> StoreResult<()>;
}

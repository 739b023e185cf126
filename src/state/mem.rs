//! `MemState`: the state over BTreeMaps, the reference store for tests and the model of `store/`.
//!
//! It implements `StateRead` and `StateWrite` literally (no caching, no checks), so a difference
//! between it and the redb store under the same commands is a bug of the redb store.

use std::collections::BTreeMap;

use super::command::CommandResult;
use super::locks::{LockFences, LockTable};
use super::txn::{StateRead, StateWrite, StoreResult};
use super::types::{DirEntry, Hash, Ino, Inode, Meta, NodeId, Orphan};

/// The whole state in memory. Fields are public so that tests and `check` can inspect them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemState {
    pub inodes: BTreeMap<Ino, Inode>,
    pub entries: BTreeMap<(Ino, Vec<u8>), DirEntry>,
    pub block_map: BTreeMap<(Ino, u64), Hash>,
    pub blocks: BTreeMap<Hash, Vec<u8>>,
    pub block_refs: BTreeMap<Hash, u64>,
    pub xattrs: BTreeMap<(Ino, Vec<u8>), Vec<u8>>,
    pub orphans: BTreeMap<Ino, Orphan>,
    /// Advisory locks per inode; no empty tables.
    pub locks: BTreeMap<Ino, LockTable>,
    pub results: BTreeMap<(NodeId, u64), CommandResult>,
    pub max_seqs: BTreeMap<NodeId, u64>,
    pub meta: Meta,
    pub lock_fences: LockFences,
}

impl MemState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Equal apart from the deduplication table (results and max sequences): what a failed
    /// command must leave unchanged.
    pub fn same_namespace(&self, other: &MemState) -> bool {
        self.inodes == other.inodes
            && self.entries == other.entries
            && self.block_map == other.block_map
            && self.blocks == other.blocks
            && self.block_refs == other.block_refs
            && self.xattrs == other.xattrs
            && self.orphans == other.orphans
            && self.locks == other.locks
            && self.meta == other.meta
            && self.lock_fences == other.lock_fences
    }
}

impl StateRead for MemState {
    fn inode(&self, ino: Ino) -> StoreResult<Option<Inode>> {
        Ok(self.inodes.get(&ino).cloned())
    }

    fn entry(&self, parent: Ino, name: &[u8]) -> StoreResult<Option<DirEntry>> {
        Ok(self.entries.get(&(parent, name.to_vec())).copied())
    }

    fn entries_after(
        &self,
        parent: Ino,
        after: u64,
        max: usize,
    ) -> StoreResult<Vec<(Vec<u8>, DirEntry)>> {
        let mut found: Vec<(Vec<u8>, DirEntry)> = self
            .entries
            .range((parent, Vec::new())..)
            .take_while(|((p, _), _)| *p == parent)
            .filter(|(_, e)| e.cookie > after)
            .map(|((_, name), e)| (name.clone(), *e))
            .collect();
        found.sort_by_key(|(_, e)| e.cookie);
        found.truncate(max);
        Ok(found)
    }

    fn block_hash(&self, ino: Ino, index: u64) -> StoreResult<Option<Hash>> {
        Ok(self.block_map.get(&(ino, index)).copied())
    }

    fn block_hashes(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Vec<(u64, Hash)>> {
        if from >= to {
            return Ok(Vec::new());
        }
        Ok(self
            .block_map
            .range((ino, from)..(ino, to))
            .map(|((_, i), h)| (*i, *h))
            .collect())
    }

    fn next_block(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Option<u64>> {
        if from >= to {
            return Ok(None);
        }
        Ok(self.block_map.range((ino, from)..(ino, to)).next().map(|((_, i), _)| *i))
    }

    fn block_data(&self, hash: &Hash) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.blocks.get(hash).cloned())
    }

    fn block_refs(&self, hash: &Hash) -> StoreResult<u64> {
        Ok(self.block_refs.get(hash).copied().unwrap_or(0))
    }

    fn xattr(&self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        Ok(self.xattrs.get(&(ino, name.to_vec())).cloned())
    }

    fn xattr_names(&self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
        Ok(self
            .xattrs
            .range((ino, Vec::new())..)
            .take_while(|((i, _), _)| *i == ino)
            .map(|((_, name), _)| name.clone())
            .collect())
    }

    fn orphan(&self, ino: Ino) -> StoreResult<Option<Orphan>> {
        Ok(self.orphans.get(&ino).cloned())
    }

    fn orphans(&self) -> StoreResult<Vec<(Ino, Orphan)>> {
        Ok(self.orphans.iter().map(|(i, o)| (*i, o.clone())).collect())
    }

    fn locks(&self, ino: Ino) -> StoreResult<LockTable> {
        Ok(self.locks.get(&ino).cloned().unwrap_or_default())
    }

    fn locked_inodes(&self) -> StoreResult<Vec<Ino>> {
        Ok(self.locks.keys().copied().collect())
    }

    fn result(&self, origin: NodeId, seq: u64) -> StoreResult<Option<CommandResult>> {
        Ok(self.results.get(&(origin, seq)).cloned())
    }

    fn max_seq(&self, origin: NodeId) -> StoreResult<u64> {
        Ok(self.max_seqs.get(&origin).copied().unwrap_or(0))
    }

    fn meta(&self) -> StoreResult<Meta> {
        Ok(self.meta.clone())
    }

    fn lock_fences(&self) -> StoreResult<LockFences> {
        Ok(self.lock_fences.clone())
    }
}

impl StateWrite for MemState {
    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.inodes.insert(inode.ino, inode.clone());
        Ok(())
    }

    fn del_inode(&mut self, ino: Ino) -> StoreResult<()> {
        self.inodes.remove(&ino);
        Ok(())
    }

    fn put_entry(&mut self, parent: Ino, name: &[u8], entry: &DirEntry) -> StoreResult<()> {
        self.entries.insert((parent, name.to_vec()), *entry);
        Ok(())
    }

    fn del_entry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        self.entries.remove(&(parent, name.to_vec()));
        Ok(())
    }

    fn put_block_hash(&mut self, ino: Ino, index: u64, hash: &Hash) -> StoreResult<()> {
        self.block_map.insert((ino, index), *hash);
        Ok(())
    }

    fn del_block_hash(&mut self, ino: Ino, index: u64) -> StoreResult<()> {
        self.block_map.remove(&(ino, index));
        Ok(())
    }

    fn put_block_data(&mut self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        self.blocks.entry(*hash).or_insert_with(|| data.to_vec());
        Ok(())
    }

    fn put_block_refs(&mut self, hash: &Hash, refs: u64) -> StoreResult<()> {
        self.block_refs.insert(*hash, refs);
        Ok(())
    }

    fn del_block(&mut self, hash: &Hash) -> StoreResult<u64> {
        self.block_refs.remove(hash);
        Ok(self.blocks.remove(hash).map_or(0, |d| d.len() as u64))
    }

    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        self.xattrs.insert((ino, name.to_vec()), value.to_vec());
        Ok(())
    }

    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        self.xattrs.remove(&(ino, name.to_vec()));
        Ok(())
    }

    fn put_orphan(&mut self, ino: Ino, orphan: &Orphan) -> StoreResult<()> {
        self.orphans.insert(ino, orphan.clone());
        Ok(())
    }

    fn put_locks(&mut self, ino: Ino, locks: &LockTable) -> StoreResult<()> {
        if locks.is_empty() {
            self.locks.remove(&ino);
        } else {
            self.locks.insert(ino, locks.clone());
        }
        Ok(())
    }

    fn del_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans.remove(&ino);
        Ok(())
    }

    fn put_result(&mut self, origin: NodeId, seq: u64, result: &CommandResult) -> StoreResult<()> {
        self.results.insert((origin, seq), result.clone());
        let max = self.max_seqs.entry(origin).or_insert(0);
        if seq > *max {
            *max = seq;
        }
        Ok(())
    }

    fn prune_results(&mut self, origin: NodeId, below: u64) -> StoreResult<()> {
        let keep = self.results.split_off(&(origin, below));
        self.results.retain(|(o, _), _| *o != origin);
        self.results.extend(keep);
        Ok(())
    }

    fn put_meta(&mut self, meta: &Meta) -> StoreResult<()> {
        self.meta = meta.clone();
        Ok(())
    }

    fn put_lock_fences(&mut self, fences: &LockFences) -> StoreResult<()> {
        self.lock_fences = fences.clone();
        Ok(())
    }
}

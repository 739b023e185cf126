//! redb table definitions and the `StateRead`/`StateWrite` views over read and write transactions.

use std::borrow::Borrow;
use std::cell::OnceCell;
use std::sync::{Arc, OnceLock};

use redb::{
    ReadOnlyTable, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition, TableHandle,
    WriteTransaction,
};
use sha2::{Digest, Sha256};

use super::blobs::{locate, Blobs, Loc, Located, ReaderGuard, LOCATE_BYTES_MIN};
use super::codec::{decode, encode};
use super::fault;
use crate::state::{
    CommandResult, DirEntry, Hash, Ino, Inode, LockFences, LockTable, Meta, NodeId, Orphan, StateRead, StateWrite, StoreFault,
    StoreResult,
};

// --- Raft log side (written by the log writer thread only; the log itself is in `wal`).
/// The Raft log of previous versions: (index, part) -> consecutive pieces of the bincode entry,
/// each at most `LOG_CHUNK_BYTES`. Read once, to move it into the segment log
/// (`mod.rs::open_log`), and empty afterwards.
pub(super) const LOG: TableDefinition<(u64, u32), &[u8]> = TableDefinition::new("raft_log_chunks");
/// Largest piece of a log entry in one LOG record (page overhead stays within 64 KiB); also the
/// block head size below.
pub(super) const LOG_CHUNK_BYTES: usize = 64 * 1024 - 512;
/// Raft metadata: "vote", "committed", "last_purged", "sync" -> opaque bytes.
pub(super) const RAFT_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// Local, never replicated: "incarnation" -> counter, "log_purged_upto" -> the segment log's
/// purge mark, "log_format" -> where the log is (1: segment files).
pub(super) const LOCAL: TableDefinition<&str, u64> = TableDefinition::new("local");

// --- State machine side (written by apply and snapshot install).
/// State machine metadata from raft/: "applied", "membership" -> opaque bytes.
pub(super) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
pub(super) const INODES: TableDefinition<u64, &[u8]> = TableDefinition::new("inodes");
/// (parent, name) -> bincode DirEntry.
pub(super) const ENTRIES: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("entries");
/// (parent, cookie) -> name: the readdir order.
pub(super) const COOKIES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("entry_cookies");
/// (ino, block index) -> 32-byte SHA-256.
pub(super) const BLOCK_MAP: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("block_map");
// Blocks are stored under a node-local block id, allocated in the order blocks are first stored
// (the largest id in use plus one), not under their SHA-256: redb places pages roughly in
// allocation order, so a file written sequentially has its blocks in file order on disk and a cold
// sequential read becomes sequential disk reads (hash keys scattered them: ~1,000 disk reads per
// cold 256 MiB read, see docs/ARCHITECTURE.md). Ids are a storage detail like redb's page numbers:
// replicas may number the same block differently, so neither the state digest nor a snapshot
// carries them (`dump_state` emits blocks under their hash, `insert_raw` numbers them anew).
/// Block id -> the block's first `BLOCK_HEAD_BYTES` bytes (all of a shorter block) followed by the
/// 8-byte `block_check` of the whole block (little-endian), see `seal_block` and `check_block`.
pub(super) const BLOCK_DATA: TableDefinition<u64, &[u8]> = TableDefinition::new("block_heads");
/// Block id -> the bytes of a block beyond its first `BLOCK_HEAD_BYTES` (absent for shorter blocks).
/// redb gives a value larger than a page a page of the next power of two of its size: a whole
/// 64 KiB block in one value took a 128 KiB page, written in full (measured: 128 MiB of pwrite for
/// 64 MiB of distinct blocks); a head that fits a 64 KiB page plus a small tail writes ~64.5 KiB.
pub(super) const BLOCK_TAILS: TableDefinition<u64, &[u8]> = TableDefinition::new("block_tails_by_id");
/// SHA-256 -> block id (node-local, see above).
pub(super) const BLOCK_IDS: TableDefinition<&[u8], u64> = TableDefinition::new("block_ids");
/// Block id -> SHA-256, the reverse of BLOCK_IDS: a snapshot lists blocks in id order (the order
/// they lie on disk), so building it reads the block tables sequentially and the installing node
/// numbers them, and so lays them out, in the same order.
pub(super) const BLOCK_HASHES: TableDefinition<u64, &[u8]> = TableDefinition::new("block_hashes_by_id");
/// Tables of previous versions that kept blocks under their hash: SHA-256 -> head value, SHA-256 ->
/// tail value (same value formats as BLOCK_DATA and BLOCK_TAILS). `Store::open` moves their
/// records into the id-keyed tables (`migrate_hash_keyed_blocks`) and deletes them.
pub(super) const OLD_BLOCK_DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("block_data");
pub(super) const OLD_BLOCK_TAILS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("block_tails");
/// Block id -> where a located block's bytes are (`blobs::Loc`: log segment, offset, length, check
/// value), for a block kept where the log wrote it instead of in BLOCK_DATA/BLOCK_TAILS (see
/// store/blobs.rs). Node-local, like the ids: never in a snapshot or the digest.
pub(super) const BLOCK_LOCS: TableDefinition<u64, &[u8]> = TableDefinition::new("block_locations");
/// (segment, block id) -> length: the located blocks of each log segment or pack.
pub(super) const SEG_BLOCKS: TableDefinition<(u64, u64), u64> = TableDefinition::new("segment_blocks");
/// Segment -> bytes of its located blocks (absent: none).
pub(super) const SEG_LIVE: TableDefinition<u64, u64> = TableDefinition::new("segment_live_bytes");
/// SHA-256 -> reference count.
pub(super) const BLOCK_REFS: TableDefinition<&[u8], u64> = TableDefinition::new("block_refs");
/// (ino, name) -> value.
pub(super) const XATTRS: TableDefinition<(u64, &[u8]), &[u8]> = TableDefinition::new("xattrs");
/// ino -> bincode Orphan.
pub(super) const ORPHANS: TableDefinition<u64, &[u8]> = TableDefinition::new("orphans");
/// (origin, seq) -> bincode CommandResult.
pub(super) const RESULTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("results");
/// origin -> highest applied seq.
pub(super) const MAX_SEQ: TableDefinition<u64, u64> = TableDefinition::new("max_seq");
/// ino -> bincode LockTable (advisory locks held on the inode; no record when none).
pub(super) const LOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("locks");
/// "meta" -> bincode Meta.
pub(super) const FS_META: TableDefinition<&str, &[u8]> = TableDefinition::new("fs_meta");

const FS_META_KEY: &str = "meta";
/// "lock_fences" -> bincode LockFences (absent until a node's locks first expire).
const FS_LOCK_FENCES_KEY: &str = "lock_fences";

/// Defines the table set twice (owned read-only tables and write-transaction tables) so that one
/// generic body serves both views, and lists the tables a snapshot carries (id -> table).
macro_rules! state_tables {
    ($($id:literal $field:ident => $table:ident : $def:ident <$k:ty, $v:ty>),* $(,)?) => {
        /// A consistent read-only view of the state (one redb read transaction). Tables are
        /// opened on first use (each open is a lookup in redb's table tree): a lookup or getattr
        /// needs one or two of the sixteen, a READ five.
        pub struct ReadView {
            txn: ReadTransaction,
            sm_meta: OnceLock<ReadOnlyTable<&'static str, &'static [u8]>>,
            $( $field: OnceLock<ReadOnlyTable<$k, $v>>, )*
            /// Reads located blocks (None: a view of a store without any, in tests).
            blobs: Option<Arc<Blobs>>,
            /// Keeps the packs this view may read (dropped last, after the transaction).
            _reader: Option<ReaderGuard>,
        }

        impl ReadView {
            pub(super) fn open(txn: ReadTransaction, blobs: Option<(Arc<Blobs>, ReaderGuard)>) -> Self {
                let (blobs, reader) = match blobs {
                    Some((b, g)) => (Some(b), Some(g)),
                    None => (None, None),
                };
                ReadView { txn, sm_meta: OnceLock::new(), $( $field: OnceLock::new(), )* blobs, _reader: reader }
            }

            fn sm_meta_table(&self) -> StoreResult<&ReadOnlyTable<&'static str, &'static [u8]>> {
                lazy_table(&self.txn, &self.sm_meta, SM_META)
            }

            $( pub(super) fn $table(&self) -> StoreResult<&ReadOnlyTable<$k, $v>> {
                lazy_table(&self.txn, &self.$field, $def)
            } )*

            /// Benchmarks: open every table, as views did before they opened them on first use.
            #[cfg(test)]
            fn open_every_table(&self) -> StoreResult<()> {
                self.sm_meta_table()?;
                $( self.$table()?; )*
                Ok(())
            }
        }

        /// The state tables of one write transaction; apply writes through this. Tables are
        /// opened on first use, as in `ReadView`: a create or a small write touches four to six of
        /// the sixteen, and every table opened is also written back to redb's table tree at
        /// commit. A table never opened is unchanged by this transaction.
        pub struct StateTxn<'txn> {
            sm_meta: LazyTable<'txn, &'static str, &'static [u8]>,
            $( pub(super) $field: LazyTable<'txn, $k, $v>, )*
            /// Reads and keeps located blocks (None: every block goes to the state file).
            blobs: Option<Arc<Blobs>>,
            /// Memory of the entry being applied that the log holds durably (`set_located`).
            located: Vec<Located>,
        }

        impl<'txn> StateTxn<'txn> {
            pub(super) fn open(txn: &'txn WriteTransaction, blobs: Option<Arc<Blobs>>) -> Self {
                StateTxn { sm_meta: LazyTable::new(txn, SM_META), $( $field: LazyTable::new(txn, $def), )* blobs, located: Vec::new() }
            }

            // The same accessors as `ReadView`'s, so `impl_state_read!` serves both.
            fn sm_meta_table(&self) -> StoreResult<&Table<'txn, &'static str, &'static [u8]>> {
                self.sm_meta.table().map_err(fault)
            }

            $( #[allow(dead_code)]
            pub(super) fn $table(&self) -> StoreResult<&Table<'txn, $k, $v>> {
                self.$field.table().map_err(fault)
            } )*

            /// Benchmarks: open every table, as `open` did before tables were opened on first use.
            #[cfg(test)]
            fn open_every_table(&self) -> StoreResult<()> {
                self.sm_meta_table()?;
                $( self.$table()?; )*
                Ok(())
            }

            /// Insert one raw record of a snapshot (bytes as produced by redb's `as_bytes`).
            pub(super) fn insert_raw(&mut self, id: u8, key: &[u8], value: &[u8]) -> StoreResult<()> {
                #[allow(unreachable_patterns)] // the block tables' ids come first
                match id {
                    BLOCK_HEADS_ID => {
                        check_block_key(key)?;
                        self.put_block_head(key, value)?;
                    }
                    BLOCK_TAILS_ID => {
                        check_block_key(key)?;
                        let Some(id) = self.block_ids_table()?.get(key).map_err(fault)?.map(|v| v.value()) else {
                            return Err(StoreFault(format!("snapshot: tail of block {} without its head", hex::encode(key))));
                        };
                        self.block_tails.insert(id, value).map_err(fault)?;
                    }
                    BLOCK_IDS_ID | BLOCK_HASHES_ID | BLOCK_LOCS_ID | SEG_BLOCKS_ID | SEG_LIVE_ID => {
                        return Err(StoreFault("snapshot: a record of a node-local block table".into()))
                    }
                    $( $id => {
                        check_len::<$k>(key)?;
                        check_len::<$v>(value)?;
                        self.$field
                            .insert(<$k as redb::Value>::from_bytes(key), <$v as redb::Value>::from_bytes(value))
                            .map_err(fault)?;
                    } )*
                    other => return Err(StoreFault(format!("snapshot: unknown table id {other}"))),
                }
                Ok(())
            }
        }

        /// Empty every state table (before a snapshot install): delete it and create it again,
        /// since `StateTxn` creates only the tables it touches and a read view needs all of them
        /// (a snapshot has no records for an empty table).
        pub(super) fn clear_state_tables(txn: &WriteTransaction) -> StoreResult<()> {
            txn.delete_table(SM_META).map_err(fault)?;
            txn.open_table(SM_META).map_err(fault)?;
            $(
                txn.delete_table($def).map_err(fault)?;
                txn.open_table($def).map_err(fault)?;
            )*
            Ok(())
        }

        /// Create every table (so read views never meet a missing table).
        pub(super) fn create_all_tables(txn: &WriteTransaction) -> StoreResult<()> {
            txn.open_table(LOG).map_err(fault)?;
            txn.open_table(RAFT_META).map_err(fault)?;
            txn.open_table(LOCAL).map_err(fault)?;
            txn.open_table(SM_META).map_err(fault)?;
            $( txn.open_table($def).map_err(fault)?; )*
            Ok(())
        }

        /// Stream every state table of `view` to `emit(table id, key bytes, value bytes)`.
        pub(super) fn dump_state(
            view: &ReadView,
            order: BlockOrder,
            emit: &mut TableSink<'_>,
        ) -> StoreResult<()> {
            $(
                match $id {
                    BLOCK_HEADS_ID => dump_blocks(view, BLOCK_HEADS_ID, order, emit)?,
                    BLOCK_TAILS_ID => dump_blocks(view, BLOCK_TAILS_ID, order, emit)?,
                    BLOCK_IDS_ID | BLOCK_HASHES_ID | BLOCK_LOCS_ID | SEG_BLOCKS_ID | SEG_LIVE_ID => {}
                    _ => for item in view.$table()?.iter().map_err(fault)? {
                        let (k, v) = item.map_err(fault)?;
                        let kv = k.value();
                        let vv = v.value();
                        let kb = <$k as redb::Value>::as_bytes(&kv);
                        let vb = <$v as redb::Value>::as_bytes(&vv);
                        emit($id, kb.as_ref(), vb.as_ref())?;
                    },
                }
            )*
            Ok(())
        }

        /// Check a snapshot record's lengths before its bytes reach redb's decoders.
        pub(super) fn check_record(id: u8, key: &[u8], value: &[u8]) -> StoreResult<()> {
            #[allow(unreachable_patterns)] // the block tables' ids come first
            match id {
                BLOCK_HEADS_ID | BLOCK_TAILS_ID => check_block_key(key),
                BLOCK_IDS_ID | BLOCK_HASHES_ID | BLOCK_LOCS_ID | SEG_BLOCKS_ID | SEG_LIVE_ID => {
                    Err(StoreFault("snapshot: a record of a node-local block table".into()))
                }
                $( $id => { check_len::<$k>(key)?; check_len::<$v>(value) } )*
                other => Err(StoreFault(format!("snapshot: unknown table id {other}"))),
            }
        }

        impl_state_read!(ReadView);
        impl_state_read!(StateTxn<'_>);
    };
}

/// Fixed-width redb types must get exactly their width (their decoders would panic otherwise).
fn check_len<T: redb::Value>(bytes: &[u8]) -> StoreResult<()> {
    match T::fixed_width() {
        Some(w) if w != bytes.len() => Err(StoreFault(format!(
            "snapshot: record of {} bytes for a {w}-byte {}",
            bytes.len(),
            T::type_name().name()
        ))),
        _ => {
            if std::any::type_name::<T>() == "&str" && std::str::from_utf8(bytes).is_err() {
                // redb's &str decoder unwraps the UTF-8 check.
                Err(StoreFault("snapshot: a string key is not UTF-8".into()))
            } else if T::fixed_width().is_none() && std::any::type_name::<T>().contains('(') {
                // Variable-width tuple keys carry their own length prefixes; check them.
                check_tuple_u64_bytes(bytes)
            } else {
                Ok(())
            }
        }
    }
}

/// `(u64, &[u8])` is encoded by redb as the 8-byte u64 followed by the bytes (the last element of a
/// tuple has no length prefix); anything shorter would make `from_bytes` slice out of range.
fn check_tuple_u64_bytes(bytes: &[u8]) -> StoreResult<()> {
    if bytes.len() < 8 {
        return Err(StoreFault("snapshot: short tuple key".into()));
    }
    Ok(())
}

macro_rules! impl_state_read {
    ($ty:ty) => {
        impl $ty {
            /// The bytes of located block `id` (see store/blobs.rs), checked.
            fn located_block(&self, hash: &Hash, id: u64) -> StoreResult<Vec<u8>> {
                let Some(loc) = self.block_locs_table()?.get(id).map_err(fault)? else {
                    return Err(StoreFault(format!("block {} has id {id} but no stored bytes", hex::encode(hash))));
                };
                let loc = Loc::decode(loc.value())?;
                let blobs = self.blobs.as_ref().ok_or_else(|| StoreFault("a located block, but no log to read it from".into()))?;
                blobs.read(hash, &loc)
            }
        }

        impl StateRead for $ty {
            fn inode(&self, ino: Ino) -> StoreResult<Option<Inode>> {
                get_decoded(self.inodes_table()?, ino)
            }
            fn entry(&self, parent: Ino, name: &[u8]) -> StoreResult<Option<DirEntry>> {
                match self.entries_table()?.get((parent, name)).map_err(fault)? {
                    Some(v) => Ok(Some(decode(v.value())?)),
                    None => Ok(None),
                }
            }
            fn entries_after(&self, parent: Ino, after: u64, max: usize) -> StoreResult<Vec<(Vec<u8>, DirEntry)>> {
                let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
                let mut out = Vec::new();
                for item in self.cookies_table()?.range((parent, start)..=(parent, u64::MAX)).map_err(fault)? {
                    if out.len() >= max {
                        break;
                    }
                    let (k, name) = item.map_err(fault)?;
                    let name = name.value().to_vec();
                    let Some(e) = self.entry(parent, &name)? else {
                        return Err(StoreFault(format!(
                            "cookie index ({parent}, {}) names a missing entry",
                            k.value().1
                        )));
                    };
                    out.push((name, e));
                }
                Ok(out)
            }
            fn block_hash(&self, ino: Ino, index: u64) -> StoreResult<Option<Hash>> {
                match self.block_map_table()?.get((ino, index)).map_err(fault)? {
                    Some(v) => Ok(Some(to_hash(v.value())?)),
                    None => Ok(None),
                }
            }
            fn block_hashes(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Vec<(u64, Hash)>> {
                let mut out = Vec::new();
                if from >= to {
                    return Ok(out);
                }
                for item in self.block_map_table()?.range((ino, from)..(ino, to)).map_err(fault)? {
                    let (k, v) = item.map_err(fault)?;
                    out.push((k.value().1, to_hash(v.value())?));
                }
                Ok(out)
            }
            fn next_block(&self, ino: Ino, from: u64, to: u64) -> StoreResult<Option<u64>> {
                if from >= to {
                    return Ok(None);
                }
                match self.block_map_table()?.range((ino, from)..(ino, to)).map_err(fault)?.next() {
                    Some(item) => Ok(Some(item.map_err(fault)?.0.value().1)),
                    None => Ok(None),
                }
            }
            fn block_data(&self, hash: &Hash) -> StoreResult<Option<Vec<u8>>> {
                match with_block(self.block_ids_table()?, self.block_data_table()?, || self.block_tails_table(), hash, |head, tail| check_block(hash, head, tail))? {
                    Found::Stored(r) => r.map(Some),
                    Found::Missing => Ok(None),
                    Found::Elsewhere(id) => self.located_block(hash, id).map(Some),
                }
            }
            fn read_block_into(&self, hash: &Hash, from: usize, max: usize, out: &mut Vec<u8>) -> StoreResult<Option<usize>> {
                match with_block(self.block_ids_table()?, self.block_data_table()?, || self.block_tails_table(), hash, |head, tail| {
                    copy_block(hash, head, tail, from, max, out)
                })? {
                    Found::Stored(copied) => Ok(copied),
                    Found::Missing => Ok(None),
                    Found::Elsewhere(id) => {
                        let data = match self.located_block(hash, id) {
                            Ok(d) => d,
                            Err(e) => {
                                // Corrupt or unreadable: the reader gets EIO, the node goes on.
                                tracing::error!(block = %hex::encode(hash), error = %e, "reading a located block failed");
                                super::CORRUPT_BLOCK_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                return Ok(None);
                            }
                        };
                        let end = data.len().min(from.saturating_add(max));
                        out.extend_from_slice(&data[from.min(end)..end]);
                        Ok(Some(data.len()))
                    }
                }
            }
            fn block_refs(&self, hash: &Hash) -> StoreResult<u64> {
                Ok(self.block_refs_table()?.get(&hash[..]).map_err(fault)?.map(|v| v.value()).unwrap_or(0))
            }
            fn xattr(&self, ino: Ino, name: &[u8]) -> StoreResult<Option<Vec<u8>>> {
                Ok(self.xattrs_table()?.get((ino, name)).map_err(fault)?.map(|v| v.value().to_vec()))
            }
            fn xattr_names(&self, ino: Ino) -> StoreResult<Vec<Vec<u8>>> {
                let mut out = Vec::new();
                let empty: &[u8] = &[];
                let iter = match ino.checked_add(1) {
                    Some(next) => self.xattrs_table()?.range((ino, empty)..(next, empty)),
                    None => self.xattrs_table()?.range((ino, empty)..),
                }
                .map_err(fault)?;
                for item in iter {
                    let (k, _) = item.map_err(fault)?;
                    out.push(k.value().1.to_vec());
                }
                Ok(out)
            }
            fn orphan(&self, ino: Ino) -> StoreResult<Option<Orphan>> {
                get_decoded(self.orphans_table()?, ino)
            }
            fn orphans(&self) -> StoreResult<Vec<(Ino, Orphan)>> {
                let mut out = Vec::new();
                for item in self.orphans_table()?.iter().map_err(fault)? {
                    let (k, v) = item.map_err(fault)?;
                    out.push((k.value(), decode(v.value())?));
                }
                Ok(out)
            }
            fn locks(&self, ino: Ino) -> StoreResult<LockTable> {
                Ok(get_decoded(self.locks_table()?, ino)?.unwrap_or_default())
            }
            fn locked_inodes(&self) -> StoreResult<Vec<Ino>> {
                let mut out = Vec::new();
                for item in self.locks_table()?.iter().map_err(fault)? {
                    out.push(item.map_err(fault)?.0.value());
                }
                Ok(out)
            }
            fn result(&self, origin: NodeId, seq: u64) -> StoreResult<Option<CommandResult>> {
                match self.results_table()?.get((origin, seq)).map_err(fault)? {
                    Some(v) => Ok(Some(decode(v.value())?)),
                    None => Ok(None),
                }
            }
            fn max_seq(&self, origin: NodeId) -> StoreResult<u64> {
                Ok(self.max_seq_table()?.get(origin).map_err(fault)?.map(|v| v.value()).unwrap_or(0))
            }
            fn meta(&self) -> StoreResult<Meta> {
                match self.fs_meta_table()?.get(FS_META_KEY).map_err(fault)? {
                    Some(v) => decode(v.value()),
                    None => Ok(Meta::default()),
                }
            }
            fn lock_fences(&self) -> StoreResult<LockFences> {
                match self.fs_meta_table()?.get(FS_LOCK_FENCES_KEY).map_err(fault)? {
                    Some(v) => decode(v.value()),
                    None => Ok(LockFences::default()),
                }
            }
        }

        impl $ty {
            /// Opaque state-machine metadata written by raft/ (last applied log id, membership).
            pub fn sm_meta(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
                Ok(self.sm_meta_table()?.get(key).map_err(fault)?.map(|v| v.value().to_vec()))
            }
        }
    };
}

state_tables! {
    1 inodes => inodes_table: INODES<u64, &'static [u8]>,
    2 entries => entries_table: ENTRIES<(u64, &'static [u8]), &'static [u8]>,
    3 cookies => cookies_table: COOKIES<(u64, u64), &'static [u8]>,
    4 block_map => block_map_table: BLOCK_MAP<(u64, u64), &'static [u8]>,
    5 block_data => block_data_table: BLOCK_DATA<u64, &'static [u8]>, // BLOCK_HEADS_ID
    6 block_refs => block_refs_table: BLOCK_REFS<&'static [u8], u64>,
    7 xattrs => xattrs_table: XATTRS<(u64, &'static [u8]), &'static [u8]>,
    8 orphans => orphans_table: ORPHANS<u64, &'static [u8]>,
    9 results => results_table: RESULTS<(u64, u64), &'static [u8]>,
    10 max_seq => max_seq_table: MAX_SEQ<u64, u64>,
    11 fs_meta => fs_meta_table: FS_META<&'static str, &'static [u8]>,
    12 block_tails => block_tails_table: BLOCK_TAILS<u64, &'static [u8]>, // BLOCK_TAILS_ID
    13 block_ids => block_ids_table: BLOCK_IDS<&'static [u8], u64>, // BLOCK_IDS_ID
    14 block_hashes => block_hashes_table: BLOCK_HASHES<u64, &'static [u8]>, // BLOCK_HASHES_ID
    15 locks => locks_table: LOCKS<u64, &'static [u8]>,
    16 block_locs => block_locs_table: BLOCK_LOCS<u64, &'static [u8]>, // BLOCK_LOCS_ID
    17 seg_blocks => seg_blocks_table: SEG_BLOCKS<(u64, u64), u64>, // SEG_BLOCKS_ID
    18 seg_live => seg_live_table: SEG_LIVE<u64, u64>, // SEG_LIVE_ID
}

/// Table ids of the block tables in `state_tables!`. Snapshots and the state digest carry blocks
/// under their hash, in the records of previous versions: `BLOCK_HEADS_ID` (hash -> head value) and
/// `BLOCK_TAILS_ID` (hash -> tail value); the id table is node-local and never carried.
pub(super) const BLOCK_HEADS_ID: u8 = 5;
pub(super) const BLOCK_TAILS_ID: u8 = 12;
pub(super) const BLOCK_IDS_ID: u8 = 13;
pub(super) const BLOCK_HASHES_ID: u8 = 14;
/// Table ids of the located-block tables (store/blobs.rs): node-local, never carried.
pub(super) const BLOCK_LOCS_ID: u8 = 16;
pub(super) const SEG_BLOCKS_ID: u8 = 17;
pub(super) const SEG_LIVE_ID: u8 = 18;

/// The order in which `dump_state` lists blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BlockOrder {
    /// By hash: the same on every replica (the state digest).
    Hash,
    /// By node-local id, i.e. as stored (snapshots).
    Stored,
}

/// A snapshot's block record is keyed by a 32-byte SHA-256.
fn check_block_key(key: &[u8]) -> StoreResult<()> {
    if key.len() != 32 {
        return Err(StoreFault(format!("snapshot: block record keyed by {} bytes, not a 32-byte hash", key.len())));
    }
    Ok(())
}

/// Emits every stored block's head values (`which == BLOCK_HEADS_ID`) or tail values
/// (`BLOCK_TAILS_ID`) under the block's hash, the form snapshots and the digest have always had,
/// independent of the node-local ids, in hash or id order.
fn dump_blocks(view: &ReadView, which: u8, order: BlockOrder, emit: &mut TableSink<'_>) -> StoreResult<()> {
    let heads = view.block_data_table()?;
    let mut one = |hash: &[u8], id: u64| -> StoreResult<()> {
        if heads.get(id).map_err(fault)?.is_none() {
            // A located block: carried in the stored form, as if it were in the state file. The
            // heads pass reads and checks the whole block; the tails pass reads only the bytes
            // past the head (none for most blocks), not the whole block a second time.
            if which == BLOCK_HEADS_ID {
                let (head, _) = seal_block(&view.located_block(&to_hash(hash)?, id)?);
                return emit(which, hash, &head);
            }
            let tail = view.located_tail(hash, id)?;
            return if tail.is_empty() { Ok(()) } else { emit(which, hash, &tail) };
        }
        if which == BLOCK_HEADS_ID {
            let Some(head) = heads.get(id).map_err(fault)? else {
                return Err(StoreFault(format!("block {} has id {id} but no stored bytes", hex::encode(hash))));
            };
            emit(which, hash, head.value())
        } else if let Some(tail) = view.block_tails_table()?.get(id).map_err(fault)? {
            emit(which, hash, tail.value())
        } else {
            Ok(())
        }
    };
    match order {
        BlockOrder::Hash => {
            for item in view.block_ids_table()?.iter().map_err(fault)? {
                let (hash, id) = item.map_err(fault)?;
                one(hash.value(), id.value())?;
            }
        }
        BlockOrder::Stored => {
            for item in view.block_hashes_table()?.iter().map_err(fault)? {
                let (id, hash) = item.map_err(fault)?;
                one(hash.value(), id.value())?;
            }
        }
    }
    Ok(())
}

impl ReadView {
    /// The bytes of located block `id` past its head value (`seal_block`'s tail), unchecked: the
    /// caller read and checked the whole block before (`dump_blocks`).
    fn located_tail(&self, hash: &[u8], id: u64) -> StoreResult<Vec<u8>> {
        let Some(loc) = self.block_locs_table()?.get(id).map_err(fault)? else {
            return Err(StoreFault(format!("block {} has id {id} but no stored bytes", hex::encode(hash))));
        };
        let loc = Loc::decode(loc.value())?;
        if loc.len as usize <= BLOCK_HEAD_BYTES {
            return Ok(Vec::new());
        }
        let blobs = self.blobs.as_ref().ok_or_else(|| StoreFault("a located block, but no log to read it from".into()))?;
        blobs.read_bytes(hash, &loc, BLOCK_HEAD_BYTES as u32)
    }
}

/// Blocks moved per transaction by `migrate_hash_keyed_blocks` (at most ~64 MiB of block bytes).
pub(super) const MIGRATE_BATCH_BLOCKS: usize = 1024;

/// Moves the blocks of a data directory written by a previous version (hash-keyed `OLD_BLOCK_DATA`
/// and `OLD_BLOCK_TAILS`) into the id-keyed tables, `MIGRATE_BATCH_BLOCKS` per durable transaction,
/// then deletes the old tables. Blocks are numbered in block-map order (file by file, in file
/// order), so the moved data gets the layout new writes get; blocks no map entry names (none in
/// a consistent state) follow in hash order. Each transaction moves whole blocks (head, tail,
/// id), so a crash leaves every block in exactly one of the two forms and the next open goes on
/// from there. Returns how many blocks were moved. Runs before the store is shared.
pub(super) fn migrate_hash_keyed_blocks(db: &redb::Database) -> StoreResult<u64> {
    let has_old = {
        let txn = db.begin_read().map_err(fault)?;
        let found = txn.list_tables().map_err(fault)?.any(|t| t.name() == OLD_BLOCK_DATA.name() || t.name() == OLD_BLOCK_TAILS.name());
        found
    };
    if !has_old {
        return Ok(0);
    }
    // Every block is read and written once: minutes for a large store, so say why the start waits.
    tracing::info!("store: moving the blocks of a previous version to id-keyed tables (once)");
    let mut moved = 0u64;
    // Where the block-map scan goes on (None: from the start); `map_done` once it has ended.
    let mut cursor: Option<(u64, u64)> = None;
    let mut map_done = false;
    loop {
        let txn = db.begin_write().map_err(fault)?;
        let done = {
            let mut old_heads = txn.open_table(OLD_BLOCK_DATA).map_err(fault)?;
            let mut old_tails = txn.open_table(OLD_BLOCK_TAILS).map_err(fault)?;
            let mut t = StateTxn::open(&txn, None);
            let mut batch: Vec<Vec<u8>> = Vec::with_capacity(MIGRATE_BATCH_BLOCKS);
            let mut chosen = std::collections::HashSet::with_capacity(MIGRATE_BATCH_BLOCKS);
            if !map_done {
                let map = t.block_map_table()?;
                let range = match cursor {
                    None => map.range::<(u64, u64)>(..),
                    Some(c) => map.range::<(u64, u64)>((std::ops::Bound::Excluded(c), std::ops::Bound::Unbounded)),
                }
                .map_err(fault)?;
                map_done = true;
                for item in range {
                    let (k, v) = item.map_err(fault)?;
                    cursor = Some(k.value());
                    let hash = v.value();
                    if !chosen.contains(hash) && old_heads.get(hash).map_err(fault)?.is_some() {
                        chosen.insert(hash.to_vec());
                        batch.push(hash.to_vec());
                        if batch.len() == MIGRATE_BATCH_BLOCKS {
                            map_done = false;
                            break;
                        }
                    }
                }
            }
            if map_done && batch.len() < MIGRATE_BATCH_BLOCKS {
                for item in old_heads.iter().map_err(fault)? {
                    let (k, _) = item.map_err(fault)?;
                    if !chosen.contains(k.value()) {
                        batch.push(k.value().to_vec());
                        if batch.len() == MIGRATE_BATCH_BLOCKS {
                            break;
                        }
                    }
                }
            }
            for hash in &batch {
                let head = old_heads.remove(hash.as_slice()).map_err(fault)?.map(|v| v.value().to_vec());
                let tail = old_tails.remove(hash.as_slice()).map_err(fault)?.map(|v| v.value().to_vec());
                let Some(head) = head else { continue };
                t.insert_raw(BLOCK_HEADS_ID, hash, &head)?;
                if let Some(tail) = tail {
                    t.insert_raw(BLOCK_TAILS_ID, hash, &tail)?;
                }
            }
            moved += batch.len() as u64;
            if moved.is_multiple_of(MIGRATE_BATCH_BLOCKS as u64 * 64) {
                tracing::info!(blocks = moved, "store: moving blocks to id-keyed tables");
            }
            map_done && batch.len() < MIGRATE_BATCH_BLOCKS
        };
        if done {
            // Tails without a head cannot be placed (no block has them): they were garbage.
            let orphan_tails = txn.open_table(OLD_BLOCK_TAILS).map_err(fault)?.len().map_err(fault)?;
            if orphan_tails > 0 {
                tracing::warn!(count = orphan_tails, "store: block tails without a block head dropped while moving blocks to ids");
            }
            txn.delete_table(OLD_BLOCK_DATA).map_err(fault)?;
            txn.delete_table(OLD_BLOCK_TAILS).map_err(fault)?;
        }
        txn.commit().map_err(fault)?;
        if done {
            return Ok(moved);
        }
    }
}

impl StateTxn<'_> {
    /// From now on (until the next call), blocks stored from memory inside one of `located` are
    /// kept where the log holds them (store/blobs.rs).
    pub(crate) fn set_located(&mut self, located: Vec<Located>) {
        self.located = located;
    }

    /// Store block `hash` (bytes `data`) as a location: `data` lies at `off` of log segment `seg`.
    fn put_block_located(&mut self, hash: &Hash, data: &[u8], seg: u64, off: u64) -> StoreResult<()> {
        let existing = self.block_ids_table()?.get(&hash[..]).map_err(fault)?.map(|v| v.value());
        let id = match existing {
            Some(id) => {
                // Normally absent (see put_block_data): drop any earlier form of it.
                self.block_data.remove(id).map_err(fault)?;
                self.block_tails.remove(id).map_err(fault)?;
                self.unlocate(id)?;
                id
            }
            None => {
                let id = self.next_block_id()?;
                self.block_ids.insert(&hash[..], id).map_err(fault)?;
                self.block_hashes.insert(id, &hash[..]).map_err(fault)?;
                id
            }
        };
        let len = data.len() as u32;
        let loc = Loc { seg, off, len, check: block_check(&[data]) };
        self.block_locs.insert(id, &loc.encode()[..]).map_err(fault)?;
        self.seg_blocks.insert((seg, id), u64::from(len)).map_err(fault)?;
        let live = self.seg_live_table()?.get(seg).map_err(fault)?.map_or(0, |v| v.value());
        self.seg_live.insert(seg, live + u64::from(len)).map_err(fault)?;
        Ok(())
    }

    /// Forget block `id`'s location, if it has one; its length (0 if none).
    fn unlocate(&mut self, id: u64) -> StoreResult<u64> {
        let Some(loc) = self.block_locs.table_mut().map_err(fault)?.remove(id).map_err(fault)?.map(|v| v.value().to_vec()) else {
            return Ok(0);
        };
        let loc = Loc::decode(&loc)?;
        self.seg_blocks.remove((loc.seg, id)).map_err(fault)?;
        let live = self.seg_live_table()?.get(loc.seg).map_err(fault)?.map_or(0, |v| v.value()).saturating_sub(u64::from(loc.len));
        let blobs = self.blobs.clone();
        if live == 0 {
            self.seg_live.remove(loc.seg).map_err(fault)?;
            if let Some(b) = &blobs {
                b.note_freed(loc.seg);
            }
        } else {
            self.seg_live.insert(loc.seg, live).map_err(fault)?;
            if let Some(b) = &blobs {
                b.note_live(loc.seg, live);
            }
        }
        Ok(u64::from(loc.len))
    }

    /// Copy every located block of segment `seg` into the state file (compaction of a mostly dead
    /// pack; the pack is deleted once a durable commit no longer refers to it). Bytes copied.
    pub(super) fn compact_segment(&mut self, seg: u64) -> StoreResult<u64> {
        let mut ids = Vec::new();
        for item in self.seg_blocks_table()?.range((seg, 0)..=(seg, u64::MAX)).map_err(fault)? {
            ids.push(item.map_err(fault)?.0.value().1);
        }
        let mut copied = 0u64;
        for id in ids {
            let Some(hash) = self.block_hashes_table()?.get(id).map_err(fault)?.map(|v| v.value().to_vec()) else {
                return Err(StoreFault(format!("located block id {id} has no hash")));
            };
            let data = self.located_block(&to_hash(&hash)?, id)?;
            self.unlocate(id)?;
            let (head, tail) = seal_block(&data);
            self.block_data.insert(id, &head[..]).map_err(fault)?;
            if !tail.is_empty() {
                self.block_tails.insert(id, tail).map_err(fault)?;
            }
            copied += data.len() as u64;
        }
        Ok(copied)
    }

    /// Test hook: (located blocks, their bytes, segments holding them).
    #[cfg(test)]
    pub(super) fn located_stats(&self) -> StoreResult<(u64, u64, Vec<u64>)> {
        let blocks = self.block_locs_table()?.len().map_err(fault)?;
        let mut bytes = 0;
        for item in self.seg_live_table()?.iter().map_err(fault)? {
            bytes += item.map_err(fault)?.1.value();
        }
        Ok((blocks, bytes, self.located_segments()?))
    }

    /// The segments this transaction's state keeps located blocks in.
    pub(super) fn located_segments(&self) -> StoreResult<Vec<u64>> {
        let mut out = Vec::new();
        for item in self.seg_live_table()?.iter().map_err(fault)? {
            out.push(item.map_err(fault)?.0.value());
        }
        Ok(out)
    }

    /// The packs on disk this transaction's state refers to no more; the mostly dead ones it
    /// refers to are queued for compaction (`Blobs::note_live`).
    pub(super) fn unreferenced_packs(&self) -> StoreResult<Vec<u64>> {
        let Some(blobs) = self.blobs.clone() else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for seg in blobs.packs_on_disk()? {
            match self.seg_live_table()?.get(seg).map_err(fault)? {
                None => out.push(seg),
                Some(live) => blobs.note_live(seg, live.value()),
            }
        }
        Ok(out)
    }

    /// Store `head` as the head value of block `hash`, under the block's id if it has one, else
    /// under a new id (the one place a block is numbered: apply, snapshot install and the move of
    /// a previous version's blocks all come here). An id lookup is cheap (the id table is small
    /// and mostly cached); it keeps a second store of the same block from leaving the first
    /// copy's bytes behind under an unused id. Returns the id.
    fn put_block_head(&mut self, hash: &[u8], head: &[u8]) -> StoreResult<u64> {
        let existing = self.block_ids_table()?.get(hash).map_err(fault)?.map(|v| v.value());
        let id = match existing {
            Some(id) => {
                self.unlocate(id)?;
                id
            }
            None => {
                let id = self.next_block_id()?;
                self.block_ids.insert(hash, id).map_err(fault)?;
                self.block_hashes.insert(id, hash).map_err(fault)?;
                id
            }
        };
        self.block_data.insert(id, head).map_err(fault)?;
        Ok(id)
    }

    /// The id for a block stored now: one more than the largest in use (ids are node-local). Read
    /// from the reverse table, whose last leaf is a 4 KiB page (a head's is 64 KiB).
    fn next_block_id(&self) -> StoreResult<u64> {
        match self.block_hashes_table()?.last().map_err(fault)? {
            Some((k, _)) => k.value().checked_add(1).ok_or_else(|| StoreFault("block ids exhausted".into())),
            None => Ok(1),
        }
    }
}

/// A table of a write transaction, opened on first use (redb refuses to open a table twice in one
/// write transaction, so each is opened at most once and kept until the `StateTxn` is dropped,
/// before the commit). Reads need only `&self`; inserts and removals take `&mut self`.
pub struct LazyTable<'txn, K: redb::Key + 'static, V: redb::Value + 'static> {
    txn: &'txn WriteTransaction,
    def: TableDefinition<'static, K, V>,
    table: OnceCell<Table<'txn, K, V>>,
}

impl<'txn, K: redb::Key + 'static, V: redb::Value + 'static> LazyTable<'txn, K, V> {
    fn new(txn: &'txn WriteTransaction, def: TableDefinition<'static, K, V>) -> Self {
        LazyTable { txn, def, table: OnceCell::new() }
    }

    /// The table, opened now if this is its first use.
    pub(super) fn table(&self) -> Result<&Table<'txn, K, V>, redb::Error> {
        if let Some(t) = self.table.get() {
            return Ok(t);
        }
        // Not open (the cell is empty), so this is the transaction's only open of it; the cell is
        // not shared between threads, so nothing can fill it meanwhile.
        let _ = self.table.set(self.txn.open_table(self.def)?);
        self.table.get().ok_or_else(|| not_open(self.def))
    }

    /// The table for writing, opened now if this is its first use.
    pub(super) fn table_mut(&mut self) -> Result<&mut Table<'txn, K, V>, redb::Error> {
        self.table()?;
        let def = self.def;
        self.table.get_mut().ok_or_else(|| not_open(def))
    }

    pub(super) fn insert<'k, 'v>(
        &mut self,
        key: impl Borrow<K::SelfType<'k>>,
        value: impl Borrow<V::SelfType<'v>>,
    ) -> Result<(), redb::Error> {
        self.table_mut()?.insert(key, value)?;
        Ok(())
    }

    pub(super) fn remove<'k>(&mut self, key: impl Borrow<K::SelfType<'k>>) -> Result<(), redb::Error> {
        self.table_mut()?.remove(key)?;
        Ok(())
    }
}

/// Unreachable: `LazyTable::table` fills its cell or fails.
fn not_open<K: redb::Key + 'static, V: redb::Value + 'static>(def: TableDefinition<K, V>) -> redb::Error {
    redb::Error::Corrupted(format!("table {} did not open", def.name()))
}

/// The table of `cell`, opened in `txn` on first use. Two threads may race to open it; both
/// tables read the same snapshot, and the loser's is dropped.
fn lazy_table<'v, K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    cell: &'v OnceLock<ReadOnlyTable<K, V>>,
    def: TableDefinition<K, V>,
) -> StoreResult<&'v ReadOnlyTable<K, V>> {
    if let Some(t) = cell.get() {
        return Ok(t);
    }
    let _ = cell.set(txn.open_table(def).map_err(fault)?);
    cell.get().ok_or_else(|| StoreFault(format!("table {} did not open", def.name())))
}

fn get_decoded<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    key: u64,
) -> StoreResult<Option<T>> {
    match table.get(key).map_err(fault)? {
        Some(v) => Ok(Some(decode(v.value())?)),
        None => Ok(None),
    }
}

/// What `with_block` found.
enum Found<T> {
    /// In the state file: `f`'s result.
    Stored(T),
    /// Not stored at all.
    Missing,
    /// A located block (no bytes in the state file): its id.
    Elsewhere(u64),
}

/// Calls `f` with a stored block's head value and tail value (empty if it has none), borrowed
/// from redb's pages.
fn with_block<'t, T, Tails: ReadableTable<u64, &'static [u8]> + 't>(
    ids: &impl ReadableTable<&'static [u8], u64>,
    heads: &impl ReadableTable<u64, &'static [u8]>,
    tails: impl FnOnce() -> StoreResult<&'t Tails>,
    hash: &Hash,
    f: impl FnOnce(&[u8], &[u8]) -> T,
) -> StoreResult<Found<T>> {
    let Some(id) = ids.get(&hash[..]).map_err(fault)? else { return Ok(Found::Missing) };
    let id = id.value();
    let Some(head) = heads.get(id).map_err(fault)? else {
        return Ok(Found::Elsewhere(id));
    };
    let head = head.value();
    // Only a head of full length has a tail (see `seal_block`).
    let tail = if head.len() == BLOCK_HEAD_BYTES + BLOCK_CHECK_BYTES { tails()?.get(id).map_err(fault)? } else { None };
    Ok(Found::Stored(f(head, tail.as_ref().map_or(&[], |t| t.value()))))
}

fn to_hash(bytes: &[u8]) -> StoreResult<Hash> {
    bytes.try_into().map_err(|_| StoreFault(format!("block map holds a {}-byte hash", bytes.len())))
}

/// Bytes of the check value stored after every block's head.
const BLOCK_CHECK_BYTES: usize = 8;
/// Most block bytes stored in a BLOCK_DATA value: with the check value it stays within
/// `LOG_CHUNK_BYTES`, which fits a 64 KiB redb page with its key and page overhead.
const BLOCK_HEAD_BYTES: usize = LOG_CHUNK_BYTES - BLOCK_CHECK_BYTES;

/// The check value stored after a block's bytes: a 64-bit hash over the length and the bytes in four
/// independent multiply-rotate lanes. Measured per 256 MiB on this hardware: 15 ms, SHA-256 155 ms
/// (with SHA-NI), xxh3-64 11-14 ms, a plain memcpy 80-100 ms; xxh3 would not pay for changing every
/// stored check value (data files, snapshot records and the state digest all carry them). It
/// catches disk corruption, not forgery, and it does not cover the key (a value found under
/// another key would pass). The read path (`read_block_into`) relies on it alone; apply still
/// checks the SHA-256 address of every block it loads. Each lane step is a bijection of the lane
/// state for a fixed word, so a change of any single 8-byte word always changes the result.
/// `parts` are the block's bytes in order (head and tail as stored): the result is that of their
/// concatenation.
pub(super) fn block_check(parts: &[&[u8]]) -> u64 {
    const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0xD6E8_FEB8_6659_FD93];
    const WORDS_BYTES: usize = 32;
    fn mix(lanes: &mut [u64; 4], chunk: &[u8]) {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&chunk[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w)).wrapping_mul(K[i]).rotate_left(31);
        }
    }
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut lanes = [K[0] ^ len as u64, K[1], K[2], K[3]];
    // Bytes of a 32-byte chunk that straddles two parts (or the final remainder).
    let mut carry = [0u8; WORDS_BYTES];
    let mut held = 0usize;
    for part in parts {
        let mut part = *part;
        if held > 0 {
            let n = (WORDS_BYTES - held).min(part.len());
            carry[held..held + n].copy_from_slice(&part[..n]);
            held += n;
            part = &part[n..];
            if held < WORDS_BYTES {
                continue;
            }
            mix(&mut lanes, &carry);
        }
        let mut words = part.chunks_exact(WORDS_BYTES);
        for chunk in &mut words {
            mix(&mut lanes, chunk);
        }
        let rest = words.remainder();
        carry[..rest.len()].copy_from_slice(rest);
        held = rest.len();
    }
    for (i, byte) in carry[..held].iter().enumerate() {
        let lane = &mut lanes[i % 4];
        *lane = (*lane ^ u64::from(*byte)).wrapping_mul(K[i % 4]).rotate_left(31);
    }
    let mut h = len as u64;
    for (i, lane) in lanes.iter().enumerate() {
        h = (h ^ lane.wrapping_mul(K[(i + 1) % 4])).rotate_left(27).wrapping_mul(K[i]);
    }
    h ^ (h >> 32)
}

/// The stored form of a block: the head value (its first `BLOCK_HEAD_BYTES` bytes, then the check
/// value of all its bytes) and the tail value (the rest, empty for a short block).
fn seal_block(data: &[u8]) -> (Vec<u8>, &[u8]) {
    let (head, tail) = data.split_at(data.len().min(BLOCK_HEAD_BYTES));
    let mut v = Vec::with_capacity(head.len() + BLOCK_CHECK_BYTES);
    v.extend_from_slice(head);
    v.extend_from_slice(&block_check(&[data]).to_le_bytes());
    (v, tail)
}

/// Splits a stored head value into the block's first bytes and its check value; `None` if the
/// value is too short to hold one.
fn split_head(head: &[u8]) -> Option<(&[u8], u64)> {
    let split = head.len().checked_sub(BLOCK_CHECK_BYTES)?;
    let (first, check) = head.split_at(split);
    let mut c = [0u8; BLOCK_CHECK_BYTES];
    c.copy_from_slice(check);
    Some((first, u64::from_le_bytes(c)))
}

/// Whether a stored block (head value and tail value) matches the check value written with it;
/// logs an error line if not. Returns the block's bytes as two slices (head without the check
/// value, tail).
fn verified<'a>(hash: &Hash, head: &'a [u8], tail: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), String> {
    let why = match split_head(head) {
        None => "too short",
        Some((first, check)) if check == block_check(&[first, tail]) => return Ok((first, tail)),
        Some(_) => "check value mismatch",
    };
    tracing::error!(block = %hex::encode(hash), len = head.len() + tail.len(), why, "stored block is corrupt");
    Err(format!("block {} is corrupt ({why})", hex::encode(hash)))
}

/// A block read through the store must match the check value written with it; never hand out
/// damaged data. Returns the block's bytes (head without the check value, then the tail).
fn check_block(hash: &Hash, head: &[u8], tail: &[u8]) -> StoreResult<Vec<u8>> {
    let (first, tail) = verified(hash, head, tail).map_err(StoreFault)?;
    let mut data = Vec::with_capacity(first.len() + tail.len());
    data.extend_from_slice(first);
    data.extend_from_slice(tail);
    Ok(data)
}

/// `StateRead::read_block_into` over a stored block: check it, then append bytes
/// `[from, from + max)` (cut at its length) straight from redb's pages to `out`. A corrupt block
/// is `None` (logged by `verified`): the reader gets EIO and the node goes on.
fn copy_block(hash: &Hash, head: &[u8], tail: &[u8], from: usize, max: usize, out: &mut Vec<u8>) -> Option<usize> {
    let Ok((first, tail)) = verified(hash, head, tail) else {
        super::CORRUPT_BLOCK_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return None;
    };
    let len = first.len() + tail.len();
    let end = len.min(from.saturating_add(max));
    let from = from.min(end);
    if from < first.len() {
        out.extend_from_slice(&first[from..end.min(first.len())]);
    }
    if end > first.len() {
        out.extend_from_slice(&tail[from.max(first.len()) - first.len()..end - first.len()]);
    }
    Some(len)
}

/// A block written through the store must match its address (SHA-256).
fn check_address(hash: &Hash, data: &[u8]) -> StoreResult<()> {
    let actual: [u8; 32] = Sha256::digest(data).into();
    if &actual != hash {
        return Err(StoreFault(format!("block {} does not match its bytes (hash mismatch)", hex::encode(hash))));
    }
    Ok(())
}

/// Receives one record of a state table: table id, key bytes, value bytes.
pub(super) type TableSink<'a> = dyn FnMut(u8, &[u8], &[u8]) -> StoreResult<()> + 'a;

/// Receives one record: key bytes, value bytes.
pub(super) type RecordSink<'a> = dyn FnMut(&[u8], &[u8]) -> StoreResult<()> + 'a;

impl ReadView {
    /// Every state-machine metadata record, in key order (for the state digest).
    pub(super) fn each_sm_meta(&self, f: &mut RecordSink<'_>) -> StoreResult<()> {
        for item in self.sm_meta_table()?.iter().map_err(fault)? {
            let (k, v) = item.map_err(fault)?;
            f(k.value().as_bytes(), v.value())?;
        }
        Ok(())
    }
}

impl StateTxn<'_> {
    /// Set opaque state-machine metadata (same transaction as the state it describes).
    pub fn put_sm_meta(&mut self, key: &str, value: &[u8]) -> StoreResult<()> {
        self.sm_meta.insert(key, value).map_err(fault)?;
        Ok(())
    }
}

impl StateWrite for StateTxn<'_> {
    fn put_inode(&mut self, inode: &Inode) -> StoreResult<()> {
        self.inodes.insert(inode.ino, encode(inode)?.as_slice()).map_err(fault)?;
        Ok(())
    }
    fn del_inode(&mut self, ino: Ino) -> StoreResult<()> {
        self.inodes.remove(ino).map_err(fault)?;
        Ok(())
    }
    fn put_entry(&mut self, parent: Ino, name: &[u8], entry: &DirEntry) -> StoreResult<()> {
        if let Some(old) = self.entry(parent, name)? {
            if old.cookie != entry.cookie {
                self.cookies.remove((parent, old.cookie)).map_err(fault)?;
            }
        }
        self.entries.insert((parent, name), encode(entry)?.as_slice()).map_err(fault)?;
        self.cookies.insert((parent, entry.cookie), name).map_err(fault)?;
        Ok(())
    }
    fn del_entry(&mut self, parent: Ino, name: &[u8]) -> StoreResult<()> {
        if let Some(old) = self.entry(parent, name)? {
            self.cookies.remove((parent, old.cookie)).map_err(fault)?;
            self.entries.remove((parent, name)).map_err(fault)?;
        }
        Ok(())
    }
    fn put_block_hash(&mut self, ino: Ino, index: u64, hash: &Hash) -> StoreResult<()> {
        self.block_map.insert((ino, index), &hash[..]).map_err(fault)?;
        Ok(())
    }
    fn del_block_hash(&mut self, ino: Ino, index: u64) -> StoreResult<()> {
        self.block_map.remove((ino, index)).map_err(fault)?;
        Ok(())
    }
    fn put_block_data(&mut self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        // Apply stores a block only when its reference count is zero, and data and count change
        // in one transaction, so the block is normally not there; if it is, its bytes are
        // overwritten in place (same bytes, same id).
        // apply (state/content.rs) hashes the bytes to get `hash` just before this call, so in
        // release builds the check would hash every written byte a second time; debug builds and
        // tests keep it to catch a caller that passes a mismatched pair.
        if cfg!(debug_assertions) {
            check_address(hash, data)?;
        }
        if data.len() >= LOCATE_BYTES_MIN && self.blobs.is_some() {
            if let Some((seg, off)) = locate(&self.located, data) {
                return self.put_block_located(hash, data, seg, off);
            }
        }
        let (head, tail) = seal_block(data);
        let id = self.put_block_head(&hash[..], &head)?;
        if !tail.is_empty() {
            self.block_tails.insert(id, tail).map_err(fault)?;
        }
        Ok(())
    }
    fn put_block_refs(&mut self, hash: &Hash, refs: u64) -> StoreResult<()> {
        self.block_refs.insert(&hash[..], refs).map_err(fault)?;
        Ok(())
    }
    fn del_block(&mut self, hash: &Hash) -> StoreResult<u64> {
        let id = self.block_ids_table()?.get(&hash[..]).map_err(fault)?.map(|v| v.value());
        let mut freed = 0;
        if let Some(id) = id {
            self.block_ids.remove(&hash[..]).map_err(fault)?;
            self.block_hashes.remove(id).map_err(fault)?;
            // The removed values tell the block's length: no read (nor check) of its bytes.
            if let Some(head) = self.block_data.table_mut().map_err(fault)?.remove(id).map_err(fault)? {
                freed += head.value().len().saturating_sub(BLOCK_CHECK_BYTES) as u64;
            }
            if let Some(tail) = self.block_tails.table_mut().map_err(fault)?.remove(id).map_err(fault)? {
                freed += tail.value().len() as u64;
            }
            freed += self.unlocate(id)?;
        }
        self.block_refs.remove(&hash[..]).map_err(fault)?;
        Ok(freed)
    }
    fn put_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> StoreResult<()> {
        self.xattrs.insert((ino, name), value).map_err(fault)?;
        Ok(())
    }
    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> StoreResult<()> {
        self.xattrs.remove((ino, name)).map_err(fault)?;
        Ok(())
    }
    fn put_orphan(&mut self, ino: Ino, orphan: &Orphan) -> StoreResult<()> {
        self.orphans.insert(ino, encode(orphan)?.as_slice()).map_err(fault)?;
        Ok(())
    }
    fn del_orphan(&mut self, ino: Ino) -> StoreResult<()> {
        self.orphans.remove(ino).map_err(fault)?;
        Ok(())
    }
    fn put_locks(&mut self, ino: Ino, locks: &LockTable) -> StoreResult<()> {
        if locks.is_empty() {
            self.locks.remove(ino).map_err(fault)?;
        } else {
            self.locks.insert(ino, encode(locks)?.as_slice()).map_err(fault)?;
        }
        Ok(())
    }
    fn put_result(&mut self, origin: NodeId, seq: u64, result: &CommandResult) -> StoreResult<()> {
        self.results.insert((origin, seq), encode(result)?.as_slice()).map_err(fault)?;
        if seq > self.max_seq(origin)? {
            self.max_seq.insert(origin, seq).map_err(fault)?;
        }
        Ok(())
    }
    fn prune_results(&mut self, origin: NodeId, below: u64) -> StoreResult<()> {
        if below == 0 {
            return Ok(());
        }
        let results = self.results.table_mut().map_err(fault)?;
        results.retain_in((origin, 0u64)..(origin, below), |_, _| false).map_err(fault)?;
        Ok(())
    }
    fn put_meta(&mut self, meta: &Meta) -> StoreResult<()> {
        self.fs_meta.insert(FS_META_KEY, encode(meta)?.as_slice()).map_err(fault)?;
        Ok(())
    }
    fn put_lock_fences(&mut self, fences: &LockFences) -> StoreResult<()> {
        self.fs_meta.insert(FS_LOCK_FENCES_KEY, encode(fences)?.as_slice()).map_err(fault)?;
        Ok(())
    }
}

#[cfg(test)]
mod bench {
    use std::time::Instant;

    use super::super::tests::cmd;
    use super::super::Store;
    use crate::state::{apply, Command, FileKind, Inode, Op, StateRead, StateWrite, Timespec, ROOT_INO};

    /// Views opened per measurement.
    const VIEWS: u32 = 20_000;

    /// Prints what opening a read view and one lookup's reads cost (a fuser worker does this per
    /// LOOKUP/GETATTR), against a view that opens every table as `ReadView::open` used to.
    #[test]
    #[ignore = "benchmark: run in release with --ignored --nocapture"]
    fn read_view_open_cost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let root = Inode {
            ino: 1,
            kind: FileKind::Dir,
            parent: 0,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            rdev: 0,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            blocks: 0,
            target: Vec::new(),
        };
        store.write_state(false, |t| t.put_inode(&root)).unwrap();
        let time = |every_table: bool| {
            let t = Instant::now();
            for _ in 0..VIEWS {
                let v = store.read().unwrap();
                if every_table {
                    v.open_every_table().unwrap();
                }
                assert!(v.inode(1).unwrap().is_some());
                assert!(v.entry(1, b"x").unwrap().is_none());
            }
            t.elapsed() / VIEWS
        };
        let (mut lazy, mut eager) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            lazy.push(time(false));
            eager.push(time(true));
        }
        eprintln!("read view + lookup: tables on first use {lazy:?}; every table opened {eager:?}");
    }

    /// Files created and written (two apply transactions each) per variant.
    const FILES: usize = 10_000;

    /// Prints what one apply transaction costs (begin, apply, commit without fsync; one durable
    /// commit per `STATE_FLUSH_MS` as in a node) for a create and for a 4 KiB write, with tables
    /// opened on first use against every table opened first, as `StateTxn::open` used to. The
    /// variants alternate file by file so that a busy machine slows both alike; medians and p90.
    #[test]
    #[ignore = "benchmark: run in release with --ignored --nocapture"]
    fn apply_txn_cost() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut seq = 0u64;
        let mut cmd = |op: Op| {
            seq += 1;
            cmd(seq, op)
        };
        let init = cmd(Op::Init { perm: 0o755, uid: 0, gid: 0 });
        store.write_state(false, |t| apply(t, &init)).unwrap().unwrap();
        // [variant][create, write] -> durations; variant 0: tables on first use, 1: every table.
        let mut samples = vec![[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        for round in 0..2 * FILES {
            let every_table = round % 2 == 1;
            let name = format!("f{round}").into_bytes();
            let data: Vec<u8> = (0..4096usize).map(|i| (i ^ round) as u8).collect();
            let (kind, perm) = (FileKind::File, 0o644);
            let make = cmd(Op::MakeNode { parent: ROOT_INO, name: name.clone(), kind, perm, rdev: 0 });
            let run = |c: &Command| {
                let t = Instant::now();
                store
                    .write_state(false, |s| {
                        if every_table {
                            s.open_every_table()?;
                        }
                        s.put_sm_meta("applied", &c.seq.to_le_bytes())?;
                        apply(s, c)
                    })
                    .unwrap()
                    .unwrap();
                t.elapsed()
            };
            samples[round % 2][0].push(run(&make));
            let ino = store.read().unwrap().entry(ROOT_INO, &name).unwrap().unwrap().ino;
            samples[round % 2][1].push(run(&cmd(Op::Write { ino, offset: 0, data, append: false })));
        }
        for (variant, ops) in ["tables on first use", "every table opened"].iter().zip(&mut samples) {
            for (op, d) in ["create", "4 KiB write"].iter().zip(ops.iter_mut()) {
                d.sort();
                eprintln!("{variant}: {op} txn p50 {:?} p90 {:?}", d[d.len() / 2], d[d.len() * 9 / 10]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::cmd;
    use super::super::Store;
    use crate::state::{apply, FileKind, Hash, Meta, Op, StateRead, XattrFlags, ROOT_INO};

    /// A snapshot has no records for an empty table, and `StateTxn` creates only the tables it
    /// touches: after an install every table must still exist (read views open any of them) and
    /// read as empty, and later applies must work on it.
    #[test]
    fn snapshot_install_leaves_every_table_readable() {
        let da = tempfile::tempdir().unwrap();
        let a = Store::open(da.path()).unwrap();
        // Only a few tables get records: no blocks, xattrs, orphans or cookies of a file.
        a.write_state(false, |t| {
            t.put_sm_meta("applied", &1u64.to_le_bytes())?;
            apply(t, &cmd(1, Op::Init { perm: 0o755, uid: 0, gid: 0 }))
        })
        .unwrap()
        .unwrap();
        let pin = a.pin_snapshot(|_| Ok(("1-1-1-1".to_string(), b"header".to_vec()))).unwrap();
        let info = a.write_out(&pin).unwrap();

        let db = tempfile::tempdir().unwrap();
        let b = Store::open(db.path()).unwrap();
        // State the install must replace, in tables the snapshot has no records for.
        let make = |seq, name: &[u8]| {
            cmd(seq, Op::MakeNode { parent: ROOT_INO, name: name.to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 })
        };
        b.write_state(false, |t| {
            apply(t, &cmd(1, Op::Init { perm: 0o755, uid: 0, gid: 0 }))?.unwrap();
            apply(t, &make(2, b"x"))
        })
        .unwrap()
        .unwrap();
        let x = b.read().unwrap().entry(ROOT_INO, b"x").unwrap().unwrap().ino;
        b.write_state(false, |t| {
            apply(t, &cmd(3, Op::Write { ino: x, offset: 0, data: vec![7; 100_000], append: false }))?.unwrap();
            let (name, value) = (b"user.a".to_vec(), b"1".to_vec());
            apply(t, &cmd(4, Op::SetXattr { ino: x, name, value, flags: XattrFlags::Any }))
        })
        .unwrap()
        .unwrap();
        let hashes = b.read().unwrap().block_hashes(x, 0, 10).unwrap();
        assert_eq!(hashes.len(), 2, "the write stored two blocks");

        b.install_snapshot(&info.path, &info.id, &[("applied", 1u64.to_le_bytes().to_vec())]).unwrap();
        let v = b.read().unwrap();
        assert!(v.entry(ROOT_INO, b"x").unwrap().is_none());
        assert!(v.entries_after(ROOT_INO, 0, 10).unwrap().is_empty());
        assert!(v.inode(x).unwrap().is_none());
        assert!(v.block_hashes(x, 0, 10).unwrap().is_empty());
        for (_, h) in &hashes {
            let h: &Hash = h;
            assert!(v.block_data(h).unwrap().is_none());
            assert_eq!(v.block_refs(h).unwrap(), 0);
        }
        assert!(v.xattr_names(x).unwrap().is_empty());
        assert!(v.orphans().unwrap().is_empty());
        assert!(v.result(7, 3).unwrap().is_none());
        assert_eq!(v.max_seq(7).unwrap(), 1);
        assert_ne!(v.meta().unwrap(), Meta::default(), "fs meta comes from the snapshot");
        assert_eq!(v.sm_meta("applied").unwrap(), Some(1u64.to_le_bytes().to_vec()));
        drop(v);
        let applied = |v: &super::ReadView| v.sm_meta("applied");
        assert_eq!(b.state_digest(applied).unwrap(), a.state_digest(applied).unwrap());
        // Applies go on over the installed state, through tables opened on first use.
        b.write_state(false, |t| {
            apply(t, &make(2, b"y"))
        })
        .unwrap()
        .unwrap();
        assert!(b.read().unwrap().entry(ROOT_INO, b"y").unwrap().is_some());
    }
}

//! Located blocks: file data kept where the Raft log already wrote it, instead of a second copy in
//! the state file.
//!
//! Why. Every node wrote each byte of file data twice: into its log (durable before the entry is
//! acknowledged, design decision 6) and, at apply, into the state file's block tables. A 3-node
//! cluster on one disk wrote 5.9 bytes per byte of a sequential write (docs/ARCHITECTURE.md).
//!
//! How. At apply (`raft/storage.rs`), a write whose entry is durable in the local log tells the
//! state transaction where its data lies in the log (`Located`: the data's address in memory and
//! its offset in a segment file; the offsets come from encoding the entry again, which is
//! deterministic, checked against the record's length). A whole block of at least
//! `LOCATE_BYTES_MIN` stored from such data (`StateTxn::put_block_data`) is recorded as a
//! location (`BLOCK_LOCS`: segment, offset, length, check value) instead of its bytes; anything
//! else (small blocks, blocks merged from old and new bytes, snapshot installs) is stored in the
//! state file as before. The state digest and snapshots carry located blocks exactly as stored
//! ones (their bytes, under their hash): where a node keeps a block is a storage detail, like its id.
//!
//! Lifetime. `SEG_BLOCKS` lists the located blocks of each segment and `SEG_LIVE` their bytes. When
//! the log purges a segment the state still refers to, the segment file is moved to
//! `<data>/packs/` (`wal::Wal::retire`) and read from there. A pack whose blocks are all deleted is
//! deleted, but only after a durable state commit that no longer refers to it (a crash must not
//! bring back a reference to a deleted file) and once no read view older than that commit is
//! open (`Readers`). A pack that is mostly dead (live bytes under `PACK_COMPACT_LIVE_PERCENT` of a
//! segment) is compacted: its live blocks are copied into the state file (one pack per apply
//! transaction), so the space a pack holds stays within 4x its live data.
//!
//! Safety of the references. A location is recorded only for a record the log reports durable
//! (`Wal::durable_record`), of an entry being applied (so committed: Raft never truncates it). The
//! log never rewrites a durable record, and refuses to truncate a segment the state refers to.
//! Until the state's commit is durable, a crash loses the reference and replay records it again.
//! A segment purged while a non-durable commit had dropped its last reference is still kept
//! (`freed_since_durable`): the durable state may refer to it.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use redb::{Database, ReadableDatabase};

use super::{fault, log, tables};
use crate::state::{StoreFault, StoreResult};

/// The directory (under the data directory) of purged log segments the state still refers to.
pub(super) const PACKS_DIR: &str = "packs";
const PACK_SUFFIX: &str = ".pack";
/// The smallest block kept where the log wrote it; smaller ones go to the state file (a pack kept
/// alive by a few small blocks would hold much space for little data).
pub(crate) const LOCATE_BYTES_MIN: usize = 32 * 1024;
/// A pack whose live bytes fall under this share of a segment is compacted.
const PACK_COMPACT_LIVE_PERCENT: u64 = 25;

/// The file name of the pack of the segment starting at `first`.
pub(super) fn pack_name(first: u64) -> String {
    format!("{first:020}{PACK_SUFFIX}")
}

/// Where a located block's bytes are, and the check value of those bytes (`tables::block_check`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// The first index of the segment (its name, in the log or among the packs).
    pub seg: u64,
    pub off: u64,
    pub len: u32,
    pub check: u64,
}

impl Loc {
    pub const BYTES: usize = 28;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[0..8].copy_from_slice(&self.seg.to_le_bytes());
        b[8..16].copy_from_slice(&self.off.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..28].copy_from_slice(&self.check.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> StoreResult<Loc> {
        if b.len() != Self::BYTES {
            return Err(StoreFault(format!("block location of {} bytes", b.len())));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        Ok(Loc {
            seg: u64_at(0),
            off: u64_at(8),
            len: u32::from_le_bytes(b[16..20].try_into().unwrap_or_default()),
            check: u64_at(20),
        })
    }
}

/// Memory that holds the same bytes as a durable log record: `len` bytes at address `ptr` (a
/// write's data inside a command being applied) are at offset `off` of segment `seg`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Located {
    pub ptr: usize,
    pub len: usize,
    pub seg: u64,
    pub off: u64,
}

/// Where `data` lies in the log, if it lies wholly inside one of `located`.
pub(crate) fn locate(located: &[Located], data: &[u8]) -> Option<(u64, u64)> {
    let p = data.as_ptr() as usize;
    located
        .iter()
        .find(|l| p >= l.ptr && p + data.len() <= l.ptr + l.len)
        .map(|l| (l.seg, l.off + (p - l.ptr) as u64))
}

/// Open read views by the sweep generation they started in, and packs waiting for them.
#[derive(Default)]
struct Readers {
    generation: u64,
    open: BTreeMap<u64, usize>,
    /// (generation in which it was found unreferenced, pack).
    doomed: Vec<(u64, u64)>,
    /// (generation of the durable commit that dropped its last reference, segment): a view older
    /// than that commit may still read the segment, so the log keeps it (as a pack) meanwhile.
    settling: Vec<(u64, u64)>,
}

/// The located blocks' files: log segments and packs.
pub(crate) struct Blobs {
    packs_dir: PathBuf,
    /// Weak: the log holds this (through its `Keep`).
    log: OnceLock<Weak<log::Shared>>,
    /// Open pack files.
    files: Mutex<HashMap<u64, Arc<File>>>,
    readers: Mutex<Readers>,
    /// Segments whose last reference a commit not yet durable removed (the durable state may
    /// still refer to them), with the generation that commit ended (None: not committed yet).
    freed_since_durable: Mutex<HashMap<u64, Option<u64>>>,
    /// Some pack may have lost its last reference: look for unreferenced packs at the next
    /// durable commit.
    sweep_due: AtomicBool,
    /// Packs to compact, one per state transaction.
    compact_due: Mutex<Vec<u64>>,
}

/// Registered for as long as a read view is open (`Blobs::reader`).
pub(crate) struct ReaderGuard {
    blobs: Arc<Blobs>,
    generation: u64,
}

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        let mut r = self.blobs.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = r.open.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                r.open.remove(&self.generation);
            }
        }
        if !r.doomed.is_empty() || !r.settling.is_empty() {
            self.blobs.delete_doomed(&mut r);
        }
    }
}

impl Blobs {
    pub fn new(data_dir: &Path) -> Arc<Blobs> {
        Arc::new(Blobs {
            packs_dir: data_dir.join(PACKS_DIR),
            log: OnceLock::new(),
            files: Mutex::new(HashMap::new()),
            readers: Mutex::new(Readers::default()),
            freed_since_durable: Mutex::new(HashMap::new()),
            sweep_due: AtomicBool::new(true),
            compact_due: Mutex::new(Vec::new()),
        })
    }

    pub fn packs_dir(&self) -> &Path {
        &self.packs_dir
    }

    pub fn set_log(&self, log: &Arc<log::Shared>) {
        let _ = self.log.set(Arc::downgrade(log));
    }

    /// The open file of live log segment `seg`.
    fn segment_file(&self, seg: u64) -> Option<Arc<File>> {
        self.log.get().and_then(Weak::upgrade).and_then(|l| l.wal.segment_file(seg))
    }

    /// Register a read view about to open (before its read transaction begins).
    pub fn reader(self: &Arc<Self>) -> ReaderGuard {
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let generation = r.generation;
        *r.open.entry(generation).or_insert(0) += 1;
        ReaderGuard { blobs: self.clone(), generation }
    }

    /// The file of segment `seg`: the live log segment, else its pack.
    fn file(&self, seg: u64) -> StoreResult<Arc<File>> {
        if let Some(f) = self.segment_file(seg) {
            return Ok(f);
        }
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get(&seg) {
            return Ok(f.clone());
        }
        // The log may have moved it to the packs since the lookup above: it does so under its
        // state lock, and a second lookup orders this after the move.
        if let Some(f) = self.segment_file(seg) {
            return Ok(f);
        }
        let path = self.packs_dir.join(pack_name(seg));
        let f = Arc::new(File::open(&path).map_err(|e| StoreFault(format!("opening {}: {e}", path.display())))?);
        files.insert(seg, f.clone());
        Ok(f)
    }

    /// The bytes of a located block, checked against its check value (a mismatch is a fault,
    /// logged: never returned as data).
    pub fn read(&self, hash: &[u8], loc: &Loc) -> StoreResult<Vec<u8>> {
        let data = self.read_bytes(hash, loc, 0)?;
        if tables::block_check(&[&data]) != loc.check {
            tracing::error!(block = %hex::encode(hash), segment = loc.seg, offset = loc.off, len = loc.len, "located block is corrupt (check value mismatch)");
            return Err(StoreFault(format!("block {} is corrupt (check value mismatch)", hex::encode(hash))));
        }
        Ok(data)
    }

    /// Bytes `[from, len)` of a located block, unchecked (the check value covers the whole block):
    /// for a caller that checked the whole block already (a snapshot's tail record, see
    /// `tables::dump_blocks`).
    pub fn read_bytes(&self, hash: &[u8], loc: &Loc, from: u32) -> StoreResult<Vec<u8>> {
        let f = self.file(loc.seg)?;
        let mut data = vec![0u8; loc.len.saturating_sub(from) as usize];
        let at = loc.off + u64::from(from);
        f.read_exact_at(&mut data, at)
            .map_err(|e| StoreFault(format!("reading block {} at {at} of segment {}: {e}", hex::encode(hash), loc.seg)))?;
        Ok(data)
    }

    /// Whether `seg` is a pack (no longer a live log segment).
    pub fn is_pack(&self, seg: u64) -> bool {
        self.log.get().is_some() && self.segment_file(seg).is_none()
    }

    /// A state transaction removed the last located block of `seg`.
    pub fn note_freed(&self, seg: u64) {
        self.freed_since_durable.lock().unwrap_or_else(|e| e.into_inner()).insert(seg, None);
        self.sweep_due.store(true, Ordering::Release);
    }

    /// A state transaction left `seg` (a pack) with `live` bytes of located blocks.
    pub fn note_live(&self, seg: u64, live: u64) {
        if live * 100 < super::SEGMENT_BYTES * PACK_COMPACT_LIVE_PERCENT && self.is_pack(seg) {
            let mut due = self.compact_due.lock().unwrap_or_else(|e| e.into_inner());
            if !due.contains(&seg) {
                due.push(seg);
            }
        }
    }

    /// The state file was replaced wholesale (snapshot install): every pack may be unreferenced.
    pub fn note_replaced(&self) {
        self.sweep_due.store(true, Ordering::Release);
        self.compact_due.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// A pack to compact in this transaction, if any is due.
    pub fn take_compact(&self) -> Option<u64> {
        self.compact_due.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Whether the next durable commit should look for unreferenced packs.
    pub fn sweep_due(&self) -> bool {
        self.sweep_due.load(Ordering::Acquire)
    }

    /// The packs on disk.
    pub fn packs_on_disk(&self) -> StoreResult<Vec<u64>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.packs_dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreFault(format!("listing {}: {e}", self.packs_dir.display()))),
        };
        for ent in rd {
            let ent = ent.map_err(|e| StoreFault(format!("listing {}: {e}", self.packs_dir.display())))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            match name.strip_suffix(PACK_SUFFIX).filter(|n| n.len() == 20).and_then(|n| n.parse::<u64>().ok()) {
                Some(seg) => out.push(seg),
                None => tracing::warn!(file = %ent.path().display(), "unexpected file in the packs directory; ignored"),
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// A state transaction committed. If it removed the last reference to a segment, a new
    /// generation begins: views registered from now on see a state without that reference.
    pub fn after_commit(&self) {
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let mut freed = self.freed_since_durable.lock().unwrap_or_else(|e| e.into_inner());
        let mut bumped = false;
        for generation in freed.values_mut().filter(|g| g.is_none()) {
            *generation = Some(r.generation);
            bumped = true;
        }
        if bumped {
            r.generation += 1;
        }
    }

    /// A durable state commit happened (after `after_commit`); `unreferenced` are the packs it
    /// refers to no more (computed inside it, when a sweep was due). Each is deleted once every
    /// read view registered before the commit that dropped its last reference has closed.
    pub fn after_durable(&self, unreferenced: Option<Vec<u64>>) {
        let mut r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let freed: Vec<(u64, Option<u64>)> = self.freed_since_durable.lock().unwrap_or_else(|e| e.into_inner()).drain().collect();
        if unreferenced.is_some() {
            self.sweep_due.store(false, Ordering::Release);
        }
        let unreferenced = unreferenced.unwrap_or_default();
        if freed.is_empty() && unreferenced.is_empty() {
            return;
        }
        let current = r.generation;
        for &(seg, generation) in &freed {
            r.settling.push((generation.unwrap_or(current), seg));
        }
        for seg in unreferenced {
            if r.doomed.iter().any(|(_, s)| *s == seg) {
                continue;
            }
            // Freed by a commit of a known generation, else (a pack found at start, or one freed
            // before an earlier durable commit) by now at the latest.
            let generation = r.settling.iter().filter(|(_, s)| *s == seg).map(|(g, _)| *g).min().unwrap_or(current);
            r.doomed.push((generation, seg));
        }
        r.generation += 1;
        self.delete_doomed(&mut r);
    }

    /// Delete the doomed packs no open read view can still need.
    fn delete_doomed(&self, r: &mut Readers) {
        let oldest = r.open.keys().next().copied().unwrap_or(u64::MAX);
        r.settling.retain(|&(generation, _)| generation >= oldest);
        let mut removed = false;
        r.doomed.retain(|&(generation, seg)| {
            if generation >= oldest {
                return true;
            }
            self.files.lock().unwrap_or_else(|e| e.into_inner()).remove(&seg);
            let path = self.packs_dir.join(pack_name(seg));
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    removed = true;
                    tracing::debug!(pack = seg, "store: pack deleted (no block refers to it)");
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "store: deleting an unreferenced pack failed; trying again later");
                    true
                }
            }
        });
        if removed {
            if let Ok(d) = File::open(&self.packs_dir) {
                let _ = d.sync_all();
            }
        }
    }

    /// Whether the state may refer to blocks in segment `seg` (the log's `Keep`): the last
    /// committed state does, or a commit since the last durable one dropped its last reference,
    /// or a read view older than the durable commit that did is still open.
    pub fn refers(&self, db: &Database, seg: u64) -> bool {
        let keep = self.refers_now(db, seg);
        if keep {
            // It becomes a pack: the next durable commit checks whether it is still needed.
            self.sweep_due.store(true, Ordering::Release);
        }
        keep
    }

    fn refers_now(&self, db: &Database, seg: u64) -> bool {
        {
            let r = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            if r.settling.iter().any(|(_, s)| *s == seg)
                || self.freed_since_durable.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&seg)
            {
                return true;
            }
        }
        match referenced(db, seg) {
            Ok(r) => r,
            Err(e) => {
                // Keeping a file too many costs space until the next sweep; deleting one too
                // many loses data.
                tracing::warn!(segment = seg, error = %e, "store: could not tell whether the state refers to a log segment; keeping it");
                true
            }
        }
    }
}

/// Whether the last committed state refers to blocks in segment `seg`.
pub(super) fn referenced(db: &Database, seg: u64) -> StoreResult<bool> {
    let txn = db.begin_read().map_err(fault)?;
    let t = match txn.open_table(tables::SEG_LIVE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(fault(e)),
    };
    Ok(t.get(seg).map_err(fault)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_round_trip_and_bad_lengths_are_faults() {
        let l = Loc { seg: 7, off: 1 << 33, len: 65536, check: 0xDEAD_BEEF_0123_4567 };
        assert_eq!(Loc::decode(&l.encode()).unwrap(), l);
        assert!(Loc::decode(&l.encode()[..27]).is_err());
    }

    #[test]
    fn locate_finds_only_slices_wholly_inside_a_range() {
        let data = vec![1u8; 1000];
        let located = [Located { ptr: data.as_ptr() as usize, len: data.len(), seg: 5, off: 4096 }];
        assert_eq!(locate(&located, &data[100..300]), Some((5, 4196)));
        assert_eq!(locate(&located, &data[..]), Some((5, 4096)));
        let other = vec![1u8; 10];
        assert_eq!(locate(&located, &other), None);
        assert_eq!(locate(&[], &data), None);
    }
}

//! File content as blocks addressed by SHA-256: reads and seeks for adapters, block edits for apply.
//!
//! Block `i` of a file covers bytes `[i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES)`. A block is stored
//! in canonical form: its trailing zeros are cut off, so it is never longer than the file within
//! that block, and an all-zero block is not stored at all (a hole). Identical blocks are stored
//! once with a reference count (one reference per block-map slot).

use sha2::{Digest, Sha256};

use crate::config::BLOCK_BYTES;

use super::error::Errno;
use super::txn::{StateRead, StateWrite, StoreFault, StoreResult};
use super::types::{Hash, Inode, Meta};

/// How many block-map slots one seek probe asks the store for at most.
const SEEK_PROBE_BLOCKS_MAX: u64 = 4096;

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Hash {
    Sha256::digest(data).into()
}

/// The pieces a write's data is cut into for its content hash: at the file's block boundaries as
/// seen from `offset` (the first piece runs to the next boundary, the others are whole blocks, the
/// last may be short). The proposer knows the cut from `(offset, data)` alone, and apply writing at
/// that offset stores exactly these pieces as its whole blocks, so it can reuse their hashes.
pub fn write_pieces(offset: u64, data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let head = ((BLOCK_BYTES - offset % BLOCK_BYTES) as usize).min(data.len());
    let (first, rest) = data.split_at(head);
    std::iter::once(first)
        .filter(|p| !p.is_empty())
        .chain(rest.chunks(BLOCK_BYTES as usize))
}

/// SHA-256 of each piece of a write (`write_pieces`), in order.
pub fn piece_hashes(offset: u64, data: &[u8]) -> Vec<Hash> {
    write_pieces(offset, data).map(sha256).collect()
}

/// SHA-256 over the concatenated piece hashes: the content hash of a write.
pub fn hash_of_hashes(hashes: &[Hash]) -> Hash {
    let mut h = Sha256::new();
    for piece in hashes {
        h.update(piece);
    }
    h.finalize().into()
}

/// The canonical stored form of a block: without its trailing zeros (empty = a hole).
pub fn canonical(data: &[u8]) -> &[u8] {
    let end = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    &data[..end]
}

/// Bytes `[offset, offset + len)` of the file, cut at its size; holes read as zeros. A stored block
/// that is missing or fails its check (`StateRead::read_block_into`) is `Errno::Io`: corruption is
/// never returned as data. Each block is checked once, by the store, and its bytes are appended
/// straight to the output (no buffer per block, no zero-fill of what the blocks cover).
/// The caller bounds `len` (FUSE max_read, or a chunk size).
pub fn read_range<R: StateRead + ?Sized>(
    r: &R,
    inode: &Inode,
    offset: u64,
    len: u64,
) -> StoreResult<Result<Vec<u8>, Errno>> {
    if offset >= inode.size || len == 0 {
        return Ok(Ok(Vec::new()));
    }
    let end = inode.size.min(offset.saturating_add(len));
    let Ok(count) = usize::try_from(end - offset) else {
        return Ok(Err(Errno::Overflow));
    };
    let mut out = Vec::with_capacity(count);
    let first = offset / BLOCK_BYTES;
    let last = (end - 1) / BLOCK_BYTES;
    for (index, hash) in r.block_hashes(inode.ino, first, last + 1)? {
        let block_start = index * BLOCK_BYTES;
        let from = offset.max(block_start);
        let to = end.min(block_start + BLOCK_BYTES);
        // Zeros for a hole before this block; what the block lacks up to `to` is its trimmed
        // trailing zeros, filled by the next block's turn or at the end.
        out.resize((from - offset) as usize, 0);
        let within = (from - block_start) as usize;
        match r.read_block_into(&hash, within, (to - from) as usize, &mut out)? {
            Some(stored) if stored as u64 <= BLOCK_BYTES => {}
            _ => return Ok(Err(Errno::Io)),
        }
    }
    out.resize(count, 0);
    Ok(Ok(out))
}

/// SEEK_DATA: the first offset `>= offset` inside a stored block. A stored block counts as data
/// as a whole (up to the size). `NoSuchOffset` (ENXIO) when `offset >= size` or no data follows.
pub fn seek_data<R: StateRead + ?Sized>(
    r: &R,
    inode: &Inode,
    offset: u64,
) -> StoreResult<Result<u64, Errno>> {
    if offset >= inode.size {
        return Ok(Err(Errno::NoSuchOffset));
    }
    let end_index = inode.size.div_ceil(BLOCK_BYTES);
    Ok(match r.next_block(inode.ino, offset / BLOCK_BYTES, end_index)? {
        Some(index) => Ok(offset.max(index * BLOCK_BYTES)),
        None => Err(Errno::NoSuchOffset),
    })
}

/// SEEK_HOLE: the first offset `>= offset` in a hole, or the size (the implicit hole at the end).
/// `NoSuchOffset` (ENXIO) when `offset >= size`.
pub fn seek_hole<R: StateRead + ?Sized>(
    r: &R,
    inode: &Inode,
    offset: u64,
) -> StoreResult<Result<u64, Errno>> {
    if offset >= inode.size {
        return Ok(Err(Errno::NoSuchOffset));
    }
    let end_index = inode.size.div_ceil(BLOCK_BYTES);
    let mut from = offset / BLOCK_BYTES;
    let mut window = 64u64;
    while from < end_index {
        let to = end_index.min(from.saturating_add(window));
        let stored = r.block_hashes(inode.ino, from, to)?;
        // The first index in [from, to) that is not stored is a hole.
        let mut expect = from;
        for (index, _) in &stored {
            if *index != expect {
                break;
            }
            expect += 1;
        }
        if expect < to {
            return Ok(Ok(offset.max(expect * BLOCK_BYTES).min(inode.size)));
        }
        from = to;
        window = (window * 2).min(SEEK_PROBE_BLOCKS_MAX);
    }
    Ok(Ok(inode.size))
}

/// Block edits inside apply. They keep `inode.blocks`, the block reference counts and the block
/// counters of `meta` right; they never change `inode.size`. A missing or corrupt block met
/// here is a store fault: replicas must not diverge over local corruption.
pub(crate) struct Blocks<'a, S: StateWrite + ?Sized> {
    pub s: &'a mut S,
    pub meta: &'a mut Meta,
}

impl<S: StateWrite + ?Sized> Blocks<'_, S> {
    /// The stored bytes of block `index` (canonical, maybe empty for a hole), checked.
    fn load(&self, inode: &Inode, index: u64) -> StoreResult<Vec<u8>> {
        match self.s.block_hash(inode.ino, index)? {
            None => Ok(Vec::new()),
            Some(hash) => self.load_hash(&hash),
        }
    }

    fn load_hash(&self, hash: &Hash) -> StoreResult<Vec<u8>> {
        let data = self.s.block_data(hash)?.ok_or_else(|| {
            StoreFault(format!(
                "block {} is referenced but missing",
                hex::encode(hash)
            ))
        })?;
        if sha256(&data) != *hash {
            return Err(StoreFault(format!(
                "block {} does not match its hash",
                hex::encode(hash)
            )));
        }
        Ok(data)
    }

    fn add_ref(&mut self, hash: &Hash, data: &[u8]) -> StoreResult<()> {
        let refs = self.s.block_refs(hash)?;
        if refs == 0 {
            self.s.put_block_data(hash, data)?;
            self.meta.block_count += 1;
            self.meta.block_bytes += data.len() as u64;
        }
        self.s.put_block_refs(hash, refs + 1)
    }

    fn drop_ref(&mut self, hash: &Hash) -> StoreResult<()> {
        let refs = self.s.block_refs(hash)?;
        if refs <= 1 {
            let len = self.s.del_block(hash)?;
            self.meta.block_count = self.meta.block_count.saturating_sub(1);
            self.meta.block_bytes = self.meta.block_bytes.saturating_sub(len);
            Ok(())
        } else {
            self.s.put_block_refs(hash, refs - 1)
        }
    }

    /// Make block `index` hold `data` (any length up to BLOCK_BYTES; stored canonically).
    fn set(&mut self, inode: &mut Inode, index: u64, data: &[u8]) -> StoreResult<()> {
        debug_assert!(data.len() as u64 <= BLOCK_BYTES);
        let data = canonical(data);
        let new = if data.is_empty() {
            None
        } else {
            Some(sha256(data))
        };
        self.set_hashed(inode, index, data, new)
    }

    /// Make block `index` hold `data`, already canonical, whose hash is `new` (`None`: a hole).
    fn set_hashed(
        &mut self,
        inode: &mut Inode,
        index: u64,
        data: &[u8],
        new: Option<Hash>,
    ) -> StoreResult<()> {
        let old = self.s.block_hash(inode.ino, index)?;
        if old == new {
            return Ok(());
        }
        if let Some(hash) = new {
            self.add_ref(&hash, data)?;
            self.s.put_block_hash(inode.ino, index, &hash)?;
        } else {
            self.s.del_block_hash(inode.ino, index)?;
        }
        if let Some(hash) = old {
            self.drop_ref(&hash)?;
        }
        match (old.is_some(), new.is_some()) {
            (false, true) => inode.blocks += 1,
            (true, false) => inode.blocks = inode.blocks.saturating_sub(1),
            _ => {}
        }
        Ok(())
    }

    /// Write `data` at `offset`. The caller has checked the limits and raises the size.
    pub fn write(&mut self, inode: &mut Inode, offset: u64, data: &[u8]) -> StoreResult<()> {
        self.write_hashed(inode, offset, data, None)
    }

    /// Write `data` at `offset`, with `pieces` the hashes of `write_pieces(offset, data)` if the
    /// caller has them (checked against the command's content hash; for an offset with the same
    /// remainder modulo BLOCK_BYTES, which cuts alike): a block the write covers whole is then
    /// stored under its piece's hash without hashing it again. Blocks the write covers in part are
    /// merged with the old content and hashed as merged.
    pub fn write_hashed(
        &mut self,
        inode: &mut Inode,
        offset: u64,
        data: &[u8],
        pieces: Option<&[Hash]>,
    ) -> StoreResult<()> {
        let mut done = 0usize;
        // Each turn writes the next piece of `write_pieces(offset, data)`: the cuts are the same.
        let mut hashes = pieces.unwrap_or_default().iter();
        while done < data.len() {
            let known = hashes.next();
            let at = offset + done as u64;
            let index = at / BLOCK_BYTES;
            let within = (at % BLOCK_BYTES) as usize;
            let n = (BLOCK_BYTES as usize - within).min(data.len() - done);
            let piece = &data[done..done + n];
            done += n;
            if within == 0 && n == BLOCK_BYTES as usize {
                // A whole block: its piece is the block. A piece ending in a zero is not in
                // canonical form (its hash is not the stored block's), so it is hashed trimmed.
                match known {
                    Some(hash) if piece.last() != Some(&0) => {
                        debug_assert_eq!(*hash, sha256(piece), "piece hashes of another cut");
                        self.set_hashed(inode, index, piece, Some(*hash))?
                    }
                    _ => self.set(inode, index, piece)?,
                }
                continue;
            }
            let mut block = self.load(inode, index)?;
            if block.len() < within + n {
                block.resize(within + n, 0);
            }
            block[within..within + n].copy_from_slice(piece);
            self.set(inode, index, &block)?;
        }
        Ok(())
    }

    /// Make `[start, end)` read as zeros; whole blocks become holes.
    pub fn zero(&mut self, inode: &mut Inode, start: u64, end: u64) -> StoreResult<()> {
        if start >= end {
            return Ok(());
        }
        let first_full = start.div_ceil(BLOCK_BYTES);
        let end_full = end / BLOCK_BYTES;
        // Partial head block.
        if !start.is_multiple_of(BLOCK_BYTES) {
            let index = start / BLOCK_BYTES;
            self.zero_within(inode, index, start, end)?;
        }
        // Partial tail block (if it is not the head block, handled above).
        if !end.is_multiple_of(BLOCK_BYTES) && end / BLOCK_BYTES >= first_full {
            let index = end / BLOCK_BYTES;
            self.zero_within(inode, index, start, end)?;
        }
        if first_full < end_full {
            for (index, hash) in self.s.block_hashes(inode.ino, first_full, end_full)? {
                self.s.del_block_hash(inode.ino, index)?;
                self.drop_ref(&hash)?;
                inode.blocks = inode.blocks.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Zero the part of block `index` that lies in `[start, end)`.
    fn zero_within(
        &mut self,
        inode: &mut Inode,
        index: u64,
        start: u64,
        end: u64,
    ) -> StoreResult<()> {
        let mut block = self.load(inode, index)?;
        let block_start = index * BLOCK_BYTES;
        let from = start.max(block_start) - block_start;
        let to = (end.min(block_start + BLOCK_BYTES) - block_start).min(block.len() as u64);
        if from >= to {
            return Ok(());
        }
        block[from as usize..to as usize].fill(0);
        self.set(inode, index, &block)
    }

    /// Drop everything at or beyond `size` (a shrinking truncate): later growth reads zeros.
    pub fn truncate(&mut self, inode: &mut Inode, size: u64) -> StoreResult<()> {
        let keep = size.div_ceil(BLOCK_BYTES);
        for (index, hash) in self.s.block_hashes(inode.ino, keep, u64::MAX)? {
            self.s.del_block_hash(inode.ino, index)?;
            self.drop_ref(&hash)?;
            inode.blocks = inode.blocks.saturating_sub(1);
        }
        if !size.is_multiple_of(BLOCK_BYTES) {
            let index = size / BLOCK_BYTES;
            let within = (size % BLOCK_BYTES) as usize;
            let block = self.load(inode, index)?;
            if block.len() > within {
                self.set(inode, index, &block[..within])?;
            }
        }
        Ok(())
    }

    /// Drop every block of the file (it is being freed).
    pub fn free_all(&mut self, inode: &mut Inode) -> StoreResult<()> {
        self.truncate(inode, 0)
    }

    /// Point block `index` at an already stored block (or make it a hole), sharing it.
    fn share(&mut self, inode: &mut Inode, index: u64, new: Option<Hash>) -> StoreResult<()> {
        let old = self.s.block_hash(inode.ino, index)?;
        if old == new {
            return Ok(());
        }
        if let Some(hash) = new {
            let refs = self.s.block_refs(&hash)?;
            if refs == 0 {
                return Err(StoreFault(format!(
                    "block {} is mapped but has no references",
                    hex::encode(hash)
                )));
            }
            self.s.put_block_refs(&hash, refs + 1)?;
            self.s.put_block_hash(inode.ino, index, &hash)?;
        } else {
            self.s.del_block_hash(inode.ino, index)?;
        }
        if let Some(hash) = old {
            self.drop_ref(&hash)?;
        }
        match (old.is_some(), new.is_some()) {
            (false, true) => inode.blocks += 1,
            (true, false) => inode.blocks = inode.blocks.saturating_sub(1),
            _ => {}
        }
        Ok(())
    }

    /// Copy `n` bytes of `src` at `offset_in` to `dst` at `offset_out` (the ranges do not overlap
    /// if it is one file). Block-aligned whole blocks are shared by reference, not read; the rest
    /// is read and written. `src` must not be changed by the copy (distinct ranges).
    pub fn copy(
        &mut self,
        src: &Inode,
        offset_in: u64,
        dst: &mut Inode,
        offset_out: u64,
        n: u64,
    ) -> StoreResult<()> {
        let mut whole = 0u64;
        if offset_in.is_multiple_of(BLOCK_BYTES) && offset_out.is_multiple_of(BLOCK_BYTES) {
            whole = n / BLOCK_BYTES;
            let first_in = offset_in / BLOCK_BYTES;
            let first_out = offset_out / BLOCK_BYTES;
            let stored: std::collections::BTreeMap<u64, Hash> = self
                .s
                .block_hashes(src.ino, first_in, first_in + whole)?
                .into_iter()
                .collect();
            for k in 0..whole {
                self.share(dst, first_out + k, stored.get(&(first_in + k)).copied())?;
            }
        }
        let done = whole * BLOCK_BYTES;
        if done < n {
            let data = self.read(src, offset_in + done, n - done)?;
            self.write(dst, offset_out + done, &data)?;
        }
        Ok(())
    }

    /// Read for copy_file_range inside apply: corruption here is a store fault.
    pub fn read(&self, inode: &Inode, offset: u64, len: u64) -> StoreResult<Vec<u8>> {
        match read_range(&*self.s, inode, offset, len)? {
            Ok(data) => Ok(data),
            Err(e) => Err(StoreFault(format!(
                "reading inode {} for a copy: {e}",
                inode.ino
            ))),
        }
    }
}

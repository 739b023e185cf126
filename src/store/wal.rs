//! The Raft log as append-only segment files (a write-ahead log) under `<data>/log/`.
//!
//! Why not redb: a durable redb commit writes every page the state's non-durable commits dirtied
//! since the previous one (tens of 4 KiB pages, each its own pwrite) before its fsync, and its
//! copy-on-write pages double the bytes written. An append here is one pwrite into a preallocated
//! file and one fdatasync for everything queued (group commit, see `log`).
//!
//! Format. Segment `<first index, 20 digits>.seg` starts with a `SEGMENT_HEADER_BYTES` header
//! (magic, version, generation, first index, CRC32 of those), then records
//! `[u32 len][u32 crc32(generation, index, payload)][u64 index][u32 back]
//! [u32 crc32(generation, the 20 header bytes before it)][payload]`, little endian, the indexes
//! contiguous across segments. A new segment is preallocated to `SEGMENT_BYTES`, so an append
//! does not change the file size (no metadata to journal) and the space after the last record
//! reads as zeros: an all-zero header ends the records. The generation is random per segment and
//! inside both CRCs, so a record is never taken for one of another segment file.
//!
//! Batches. A batch is what is written into a segment between two points where everything in it
//! is durable: a sync (fdatasync), an `RWF_DSYNC` write, a cut (truncation, recovery), the
//! segment's creation. `back` is the number of records of the same batch before this one (0: the
//! first record written after such a point), so `index - back` is the first index of its batch.
//! The writer thread (`log`) acknowledges an entry only after the sync that ends its batch, and
//! writes the next batch only after that sync returned. Marking costs nothing at append time (the
//! writer knows whether unsynced records precede a record: `dirty`; no extra write or syscall).
//!
//! Version 1 segments (written by earlier builds: `[u32 len][u32 crc][u64 index][payload]`, no
//! `back`, no header CRC) are still read. One is never appended to: the next append after it
//! starts a version 2 segment (an empty one is replaced). If a version 1 segment is the last one
//! at open, its first bad record ends it as before (taken for a torn tail, cut).
//!
//! Recovery of the last segment (version 2). The scan stops at the first record that is not
//! valid (bad header CRC, bad length, wrong index, bad payload CRC, cut short) or all zeros: entry
//! `k` at offset `o`. Then the rest of the file is searched for an intact record of a LATER batch:
//! any offset whose header passes its CRC, whose index `i > k` fits in the bytes since `o`, whose
//! payload passes its CRC, and whose batch began after `k` (`i - back > k`); one sequential pass
//! (the bad record's length cannot be trusted, so every offset is a candidate). Found: refuse to
//! start (`StoreFault` naming the segment, `o`, `k` and the later record), cut nothing. Sound
//! because the file only grows between cuts, so a record of a batch that began after entry `k` was
//! written after entry `k`'s bytes were synced: they were durable, and a torn write cannot damage
//! durable bytes; so this is corruption of an entry that may have been acknowledged, and cutting
//! it could make this node lose entries Raft counted on. Not found: every intact record after `o`
//! belongs to the batch of entry `k` (its later pages reached the disk, an earlier one not), so
//! that batch was the one being written at the crash, never synced, never acknowledged: a torn
//! tail, cut at `o` (the valid records before it stay; they are a contiguous prefix, and keeping
//! unacknowledged entries is allowed). The ambiguous case: damage inside the last batch that
//! reached the disk, with no later batch written after it (e.g. the node stopped, then a sector of
//! that batch rotted) looks exactly like a crash during that batch; it is cut with a warning. Also
//! taken for a torn tail: damage to the second last batch when nothing of the last batch reached
//! the disk.
//!
//! Durability cost. posix_fallocate leaves "unwritten" extents on ext4: the first write into
//! such a block changes the extent tree, so each fdatasync after it also commits the journal. So
//! the blocks ahead of the active segment's tail are written with zeros before records reach them
//! (`ZERO_AHEAD_BYTES` at segment creation and at a cut, then `zero_ahead` on the writer thread
//! after small batches): an append then overwrites written blocks and its sync is a data flush
//! only. Large batches write past that frontier themselves (one journal commit per large batch is
//! cheap next to its data; zeroing ahead of them would double the bytes written). A batch that is
//! one write goes out with `RWF_DSYNC` (`append_durable`): one syscall, and the sync covers only
//! the bytes written, not the zero-fill in flight elsewhere in the file.
//!
//! Invariants: (1) after the last record of the active (last) segment there are only zeros: a
//! truncation, and the recovery of a torn tail, cut the file there, preallocate it again and sync
//! it; so stale records can never reappear behind a shorter new one, and within a segment the
//! records after the last cut were written in offset order (what recovery's batch rule relies on).
//! (2) A segment is fdatasynced before the next one is created, so after a crash only the last
//! segment can end in a torn batch; a bad record anywhere else, or a hole between segments, is
//! corruption and the log refuses to open. In the last segment, damage before the start of a
//! later batch is corruption too (see Recovery). (3) Segments are created as `.tmp`, synced,
//! renamed and the directory synced, so a segment file always has its header. (4) A record's
//! `back` never claims a later batch start than the truth (the writer resets its batch only at
//! the points listed under Batches), so a torn batch is never taken for corruption.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::state::{StoreFault, StoreResult};

/// Bytes preallocated per segment; the active segment rolls over when the next record does not
/// fit (a record larger than this gets a segment of its own, which then grows past it).
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of a segment's header.
const SEGMENT_HEADER_BYTES: u64 = 32;
/// Bytes of a record's header (length, payload CRC, index, batch distance, header CRC).
const RECORD_HEADER_BYTES: u64 = 24;
/// Bytes of a record's header in a version 1 segment (length, CRC, index; read only).
const RECORD_HEADER_BYTES_V1: u64 = 16;
/// Largest payload of a record: an encoded entry is at most one message (bounds what a corrupt
/// length can make recovery allocate).
pub const RECORD_PAYLOAD_BYTES_MAX: u64 = crate::config::MESSAGE_BYTES_MAX as u64;
const SEGMENT_MAGIC: &[u8; 8] = b"PBOXWAL\n";
/// The version new segments are written with: 2 has the batch distance and the header CRC.
const SEGMENT_VERSION: u32 = 2;
/// Segments of this version (no batch marks) are still read; they are never appended to.
const SEGMENT_VERSION_V1: u32 = 1;
const SEGMENT_SUFFIX: &str = ".seg";
const TMP_SUFFIX: &str = ".seg.tmp";
/// Records are gathered into one buffer of up to this many bytes per pwrite.
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;
/// A payload at least this long is written straight from the entry instead of being copied.
const DIRECT_PAYLOAD_BYTES_MIN: usize = 64 * 1024;
/// A payload whose block-aligned middle is at least this long has that middle written with
/// `O_DIRECT` (`write_payload`): no page-cache copy, no dirty pages for writeback to find later.
const UNBUFFERED_BYTES_MIN: usize = 1024 * 1024;
/// Alignment of an `O_DIRECT` write: its file offset, length and memory (the page size, a multiple
/// of every common logical block size).
const DIRECT_ALIGN: usize = 4096;
/// The aligned staging buffer of `O_DIRECT` writes: one full batch's payload at once; a larger
/// payload goes through it in pieces of this size.
const UNBUFFERED_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Bytes read at a time when recovery scans a segment.
const SCAN_BUFFER_BYTES: usize = 1024 * 1024;
/// The search for a later batch skips all-zero blocks of this many bytes at once (most of the
/// rest of a segment is zeros).
const ZERO_SKIP_BYTES: usize = 4096;
/// Bytes of zeros written ahead of the active segment's tail (see the module doc), at once.
const ZERO_AHEAD_BYTES: u64 = 1024 * 1024;
/// `zero_ahead` writes more zeros once fewer than this many bytes ahead of the tail are written.
const ZERO_AHEAD_LOW_BYTES: u64 = 256 * 1024;
/// `zero_ahead` does nothing after a batch of more record bytes than this (a stream writes its
/// blocks itself).
const ZERO_AHEAD_BATCH_BYTES_MAX: u64 = 64 * 1024;
/// A batch of at most this many bytes in one write is written with `RWF_DSYNC` instead of a write
/// and an fdatasync.
const DSYNC_WRITE_BYTES_MAX: usize = 256 * 1024;
/// The page size `release_cache` rounds to.
const PAGE_BYTES: u64 = 4096;
/// Log bytes behind the tail whose pages stay in the page cache (`release_cache`): entries a
/// follower a little behind still needs are read from memory.
const CACHE_KEEP_BYTES: u64 = 8 * 1024 * 1024;
/// Least range `release_cache` drops at once (one call per this many log bytes).
const CACHE_RELEASE_BYTES: u64 = 4 * 1024 * 1024;
/// Zero bytes for the zero-fill (a static, so no allocation per fill).
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

fn io_fault(what: &str, path: &Path, e: impl std::fmt::Display) -> StoreFault {
    StoreFault(format!("log {what} {}: {e}", path.display()))
}

fn crc(generation: u64, index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A fresh random generation (never 0).
fn new_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish() | 1
}

fn segment_header(version: u32, generation: u64, first: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..20].copy_from_slice(&generation.to_le_bytes());
    h[20..28].copy_from_slice(&first.to_le_bytes());
    let c = crc32fast::hash(&h[0..28]);
    h[28..32].copy_from_slice(&c.to_le_bytes());
    h
}

/// Bytes of a record header in a segment of `version`.
fn record_header_bytes(version: u32) -> u64 {
    if version == SEGMENT_VERSION_V1 {
        RECORD_HEADER_BYTES_V1
    } else {
        RECORD_HEADER_BYTES
    }
}

/// CRC32 of a (version 2) record header: the generation and the header's first 20 bytes.
fn header_crc(generation: u64, h: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(&generation.to_le_bytes());
    c.update(&h[0..20]);
    c.finalize()
}

/// A record's header as written (version 2): `back` is how many records of the same batch
/// precede it (see the module doc).
fn record_header(generation: u64, len: u32, crc: u32, index: u64, back: u32) -> [u8; RECORD_HEADER_BYTES as usize] {
    let mut h = [0u8; RECORD_HEADER_BYTES as usize];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h[8..16].copy_from_slice(&index.to_le_bytes());
    h[16..20].copy_from_slice(&back.to_le_bytes());
    let hc = header_crc(generation, &h);
    h[20..24].copy_from_slice(&hc.to_le_bytes());
    h
}

/// A parsed record header.
#[derive(Clone, Copy)]
struct RecordHeader {
    len: u32,
    /// CRC32 of (generation, index, payload).
    crc: u32,
    index: u64,
    /// Records of the same batch before this one (version 2; 0 in version 1, which has none).
    back: u32,
}

fn u64_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Parse the `record_header_bytes(version)` bytes of `b`; None if a version 2 header fails its
/// own CRC (version 1 headers have none: their CRC covers only the payload side).
fn parse_record_header(version: u32, generation: u64, b: &[u8]) -> Option<RecordHeader> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let (len, crc, index) = (u32_at(0), u32_at(4), u64_le(&b[8..16]));
    if version == SEGMENT_VERSION_V1 {
        return Some(RecordHeader { len, crc, index, back: 0 });
    }
    (header_crc(generation, b) == u32_at(20)).then_some(RecordHeader { len, crc, index, back: u32_at(16) })
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_fault("syncing directory", dir, e))
}

/// Give `file` `len` bytes of allocated space (zeros) if it is shorter. posix_fallocate, so that
/// appends inside it change no file size; a plain `set_len` (a sparse file) if the filesystem
/// cannot preallocate or has not that much room left (the writes themselves then report ENOSPC).
fn preallocate(file: &File, path: &Path, len: u64) -> StoreResult<()> {
    match nix::fcntl::posix_fallocate(file, 0, len as libc::off_t) {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "log segment: posix_fallocate failed; using a sparse file");
            let have = file.metadata().map_err(|e| io_fault("stat", path, e))?.len();
            if have < len {
                file.set_len(len).map_err(|e| io_fault("extending", path, e))?;
            }
            Ok(())
        }
    }
}

/// Write zeros over `[from, to)` of `file` (converting unwritten extents into written ones).
fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Write `buf` at `at` with `RWF_DSYNC`: durable on return, like a write and an fdatasync of that
/// range. `Ok(n)` is the bytes written (fewer than `buf.len()`: the caller writes and syncs the
/// rest the usual way); an error of kind `Unsupported` if the kernel or filesystem lacks it.
fn pwrite_dsync(file: &File, buf: &[u8], at: u64) -> std::io::Result<usize> {
    let iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    loop {
        // SAFETY: one iovec over `buf`, which outlives the call; the fd is open.
        let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, at as libc::off_t, libc::RWF_DSYNC) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => {
                return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, e))
            }
            _ => return Err(e),
        }
    }
}

/// One segment file and where its records are.
struct Segment {
    /// Index of its first record (also its name).
    first: u64,
    path: PathBuf,
    file: Arc<File>,
    generation: u64,
    /// Format version (`SEGMENT_VERSION`, or `SEGMENT_VERSION_V1` for a segment written by an
    /// earlier build, which is read but never appended to).
    version: u32,
    /// `(offset, payload length)` of entry `first + i` at `i`.
    records: Vec<(u64, u32)>,
    /// Where the next record goes.
    end: u64,
    /// Size of the file: `segment_bytes`, more if a record larger than that grew it.
    file_len: u64,
    /// Every block below this offset is written (records or zeros), none is an unwritten extent
    /// (best effort: only speed depends on it). Only the writer changes it.
    written: AtomicU64,
    /// The page cache holds none of the file below this offset that `release_cache` could drop.
    released: AtomicU64,
    /// A second handle on the file opened with `O_DIRECT`, at the first large payload (None: the
    /// filesystem refused it).
    unbuffered: OnceLock<Option<File>>,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    fn create(dir: &Path, first: u64, segment_bytes: u64) -> StoreResult<Segment> {
        let path = dir.join(segment_name(first));
        let tmp = dir.join(format!("{first:020}{TMP_SUFFIX}"));
        let generation = new_generation();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| io_fault("creating", &tmp, e))?;
        preallocate(&file, &tmp, segment_bytes)?;
        file.write_all_at(&segment_header(SEGMENT_VERSION, generation, first), 0).map_err(|e| io_fault("writing", &tmp, e))?;
        let written = zero_fill_after(&file, &tmp, SEGMENT_HEADER_BYTES, segment_bytes);
        file.sync_all().map_err(|e| io_fault("syncing", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io_fault("renaming", &tmp, e))?;
        sync_dir(dir)?;
        Ok(Segment {
            first,
            path,
            file: Arc::new(file),
            generation,
            version: SEGMENT_VERSION,
            records: Vec::new(),
            end: SEGMENT_HEADER_BYTES,
            file_len: segment_bytes,
            written: AtomicU64::new(written),
            released: AtomicU64::new(0),
            unbuffered: OnceLock::new(),
        })
    }

    /// Cut the file at `end` and preallocate it again, so that only zeros follow the last record
    /// (invariant 1); durable on return.
    fn cut(&mut self, end: u64, segment_bytes: u64) -> StoreResult<()> {
        self.file.set_len(end).map_err(|e| io_fault("truncating", &self.path, e))?;
        preallocate(&self.file, &self.path, segment_bytes)?;
        let written = zero_fill_after(&self.file, &self.path, end, segment_bytes.max(end));
        self.file.sync_all().map_err(|e| io_fault("syncing", &self.path, e))?;
        self.end = end;
        self.file_len = segment_bytes.max(end);
        self.written.store(written, Ordering::Relaxed);
        Ok(())
    }

    /// The segment's `O_DIRECT` handle, opened at the first call; None if the filesystem refuses
    /// `O_DIRECT` (tmpfs, some FUSE filesystems), logged once per segment.
    fn unbuffered(&self) -> Option<&File> {
        self.unbuffered
            .get_or_init(|| {
                use std::os::unix::fs::OpenOptionsExt;
                match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&self.path) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::info!(path = %self.path.display(), error = %e, "log segment: O_DIRECT refused; large entries go through the page cache");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// Read and check the record of `index` (live, in this segment).
    fn read(&self, index: u64) -> StoreResult<Vec<u8>> {
        let (off, len) = self.records[(index - self.first) as usize];
        let hb = record_header_bytes(self.version) as usize;
        let mut buf = vec![0u8; hb + len as usize];
        self.file.read_exact_at(&mut buf, off).map_err(|e| io_fault("reading", &self.path, e))?;
        let h = parse_record_header(self.version, self.generation, &buf);
        let payload = buf.split_off(hb);
        let ok = h.is_some_and(|h| h.len == len && h.index == index && h.crc == crc(self.generation, index, &payload));
        if !ok {
            return Err(StoreFault(format!(
                "log segment {}: record of entry {index} at offset {off} fails its check (disk corruption?)",
                self.path.display()
            )));
        }
        Ok(payload)
    }
}

/// Write `ZERO_AHEAD_BYTES` of zeros after `end` (not past `file_len`), so the next appends
/// overwrite written blocks; the caller syncs. Where the blocks are known written up to. A failure
/// (e.g. no room left on a sparse file) only costs speed: logged, and `end` is returned.
fn zero_fill_after(file: &File, path: &Path, end: u64, file_len: u64) -> u64 {
    let to = end.saturating_add(ZERO_AHEAD_BYTES).min(file_len);
    match write_zeros(file, end, to) {
        Ok(()) => to.max(end),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "log segment: zero-fill ahead of the tail failed");
            end
        }
    }
}

/// Reads a segment sequentially through a buffer (recovery).
struct Scanner<'a> {
    file: &'a File,
    file_len: u64,
    buf: Vec<u8>,
    buf_off: u64,
}

impl Scanner<'_> {
    /// `len` bytes at `off`, or None if the file ends first.
    fn bytes(&mut self, off: u64, len: usize) -> std::io::Result<Option<&[u8]>> {
        if off + len as u64 > self.file_len {
            return Ok(None);
        }
        let have = off >= self.buf_off && off + len as u64 <= self.buf_off + self.buf.len() as u64;
        if !have {
            let want = (len.max(SCAN_BUFFER_BYTES) as u64).min(self.file_len - off) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, off)?;
            self.buf_off = off;
        }
        let start = (off - self.buf_off) as usize;
        Ok(Some(&self.buf[start..start + len]))
    }
}

/// How the record scan of one segment ended.
enum ScanEnd {
    /// Zeros or the end of the file: a clean end.
    Clean,
    /// A record that is not valid (torn, corrupt, or not the next index): the reason.
    Bad(String),
}

/// Open an existing segment: check its header, find its records.
fn scan_segment(path: &Path, first: u64) -> StoreResult<(Segment, ScanEnd)> {
    let file = OpenOptions::new().read(true).write(true).open(path).map_err(|e| io_fault("opening", path, e))?;
    let file_len = file.metadata().map_err(|e| io_fault("stat", path, e))?.len();
    let mut header = [0u8; SEGMENT_HEADER_BYTES as usize];
    let bad_header = |why: &str| StoreFault(format!("log segment {}: {why}; refusing to start", path.display()));
    if file_len < SEGMENT_HEADER_BYTES {
        return Err(bad_header("shorter than its header"));
    }
    file.read_exact_at(&mut header, 0).map_err(|e| io_fault("reading", path, e))?;
    if &header[0..8] != SEGMENT_MAGIC {
        return Err(bad_header("not a log segment (bad magic)"));
    }
    if crc32fast::hash(&header[0..28]).to_le_bytes() != header[28..32] {
        return Err(bad_header("header fails its check"));
    }
    let u64_at = |i: usize| u64_le(&header[i..]);
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != SEGMENT_VERSION && version != SEGMENT_VERSION_V1 {
        return Err(bad_header(&format!(
            "version {version}, this build reads {SEGMENT_VERSION_V1} and {SEGMENT_VERSION}"
        )));
    }
    let generation = u64_at(12);
    if u64_at(20) != first {
        return Err(bad_header(&format!("header says first index {}, name says {first}", u64_at(20))));
    }
    let mut seg = Segment {
        first,
        path: path.to_path_buf(),
        file: Arc::new(file),
        generation,
        version,
        records: Vec::new(),
        end: SEGMENT_HEADER_BYTES,
        file_len,
        // Unknown: the open cuts the last segment (and zero-fills after the cut); older ones are
        // never written again.
        written: AtomicU64::new(0),
        released: AtomicU64::new(0),
        unbuffered: OnceLock::new(),
    };
    let file = seg.file.clone();
    let mut sc = Scanner { file: &file, file_len, buf: Vec::new(), buf_off: 0 };
    let hb = record_header_bytes(version);
    let end = loop {
        let off = seg.end;
        let index = seg.next_index();
        let read = |e| io_fault("reading", path, e);
        let Some(h) = sc.bytes(off, hb as usize).map_err(read)? else { break ScanEnd::Clean };
        if h.iter().all(|&b| b == 0) || (version == SEGMENT_VERSION_V1 && h[0..4] == [0; 4]) {
            break ScanEnd::Clean;
        }
        let Some(RecordHeader { len, crc: c, index: i, .. }) = parse_record_header(version, generation, h) else {
            break ScanEnd::Bad(format!("record header at offset {off} fails its check"));
        };
        if len == 0 || len as u64 > RECORD_PAYLOAD_BYTES_MAX {
            break ScanEnd::Bad(format!("record length {len} at offset {off} is out of bounds"));
        }
        if i != index {
            break ScanEnd::Bad(format!("record at offset {off} has index {i}, expected {index}"));
        }
        let Some(payload) = sc.bytes(off + hb, len as usize).map_err(read)? else {
            break ScanEnd::Bad(format!("record of entry {index} at offset {off} is cut short by the end of the file"));
        };
        if crc(generation, i, payload) != c {
            break ScanEnd::Bad(format!("record of entry {index} at offset {off} fails its check"));
        }
        seg.records.push((off, len));
        seg.end = off + hb + len as u64;
    };
    Ok((seg, end))
}

/// What `later_batch` found after the valid records of the last segment.
enum After {
    /// An intact record (entry `index` at `off`) of a batch that began at entry `batch_first`,
    /// after the entry where the valid records end: that entry was synced before it was written.
    LaterBatch { off: u64, index: u64, batch_first: u64 },
    /// No such record; `same_batch` intact records of the batch the valid records end in (a torn
    /// batch some of whose later pages reached the disk).
    Nothing { same_batch: u64 },
}

/// Look after the valid records of a version 2 segment (from `seg.end`, where entry
/// `seg.next_index()` would be) for an intact record of a later batch (see the module doc). The
/// bad record's length cannot be trusted, so every byte offset is a candidate, filtered cheaply:
/// its index must be one the bytes since `seg.end` can hold (each record takes more than a header),
/// then its header must pass its CRC (a false match is about one in 2^32), and only then is its
/// payload read and checked. One sequential pass over the rest of the file (zeros fail the index
/// test at once); after an intact record it goes on past that record.
fn later_batch(seg: &Segment) -> std::io::Result<After> {
    let hb = RECORD_HEADER_BYTES as usize;
    let (from, k) = (seg.end, seg.next_index());
    let mut same_batch = 0;
    let mut buf = Vec::new();
    let mut payload = Vec::new();
    // Entry k's record takes at least hb + 1 bytes from `from`: no later one starts before that.
    let mut p = from + hb as u64 + 1;
    while p + hb as u64 <= seg.file_len {
        let n = (SCAN_BUFFER_BYTES as u64).min(seg.file_len - p) as usize;
        buf.resize(n, 0);
        seg.file.read_exact_at(&mut buf, p)?;
        // Offsets in `buf` whose whole header is in it; the next read starts after them.
        let starts = n - hb + 1;
        // Whether the block at this offset in `buf` is all zeros (the last one looked at).
        let mut zero_block: Option<(usize, bool)> = None;
        let mut q = 0;
        while q < starts {
            // A header's index field (bytes 8..16) is never zero: skip the offsets whose field
            // lies in an all-zero block.
            let (field, bs) = (q + 8, (q + 8) / ZERO_SKIP_BYTES * ZERO_SKIP_BYTES);
            let be = (bs + ZERO_SKIP_BYTES).min(n);
            if field + 8 <= be {
                let zero = match zero_block {
                    Some((at, z)) if at == bs => z,
                    _ => {
                        let z = buf[bs..be] == ZEROS[..be - bs];
                        zero_block = Some((bs, z));
                        z
                    }
                };
                if zero {
                    // The first offset whose field reaches past this block.
                    q = be - 15;
                    continue;
                }
            }
            // The candidate offset in `buf`, and in the file.
            let c = q;
            q += 1;
            let at = p + c as u64;
            let index = u64_le(&buf[c + 8..c + 16]);
            // Entries k..index take at least hb + 1 bytes each before `at`.
            if index <= k || index - k > (at - from) / (hb as u64 + 1) {
                continue;
            }
            let Some(h) = parse_record_header(SEGMENT_VERSION, seg.generation, &buf[c..c + hb]) else {
                continue;
            };
            let len = h.len as usize;
            let end = at + (hb + len) as u64;
            if len == 0 || len as u64 > RECORD_PAYLOAD_BYTES_MAX || end > seg.file_len {
                continue;
            }
            let Some(batch_first) = index.checked_sub(h.back as u64) else { continue };
            let body = if c + hb + len <= n {
                &buf[c + hb..c + hb + len]
            } else {
                payload.resize(len, 0);
                seg.file.read_exact_at(&mut payload, at + hb as u64)?;
                &payload[..]
            };
            if crc(seg.generation, index, body) != h.crc {
                continue;
            }
            if batch_first > k {
                return Ok(After::LaterBatch { off: at, index, batch_first });
            }
            // A record of entry k's own batch: go on after it.
            same_batch += 1;
            q = c + hb + len;
        }
        // `q` may lie past `starts` (after a record): the next read starts there.
        p += q as u64;
    }
    Ok(After::Nothing { same_batch })
}

/// What readers and the writer share.
struct State {
    /// In index order; contiguous: each segment's `first` is the previous one's `next_index()`.
    segments: VecDeque<Segment>,
    /// The lowest live index: entries below it are purged (the first segment may still hold some).
    start: u64,
}

impl State {
    /// The index the next append continues at, if there is any segment.
    fn next_index(&self) -> Option<u64> {
        self.segments.back().map(|s| s.next_index())
    }

    /// Live indexes `[lo, hi)`.
    fn live(&self) -> Option<(u64, u64)> {
        let lo = self.start.max(self.segments.front()?.first);
        let hi = self.next_index()?;
        (lo < hi).then_some((lo, hi))
    }

    fn segment_of(&self, index: u64) -> &Segment {
        let i = self.segments.partition_point(|s| s.first <= index) - 1;
        &self.segments[i]
    }
}

/// The log. One writer (the log writer thread) calls `append`/`sync`/`truncate`/`purge`; any
/// thread reads.
pub(super) struct Wal {
    dir: PathBuf,
    /// `SEGMENT_BYTES` (smaller in tests).
    segment_bytes: u64,
    state: RwLock<State>,
    /// The active segment has writes not yet fdatasynced.
    dirty: AtomicBool,
    /// `RWF_DSYNC` writes work here (cleared at the first "unsupported").
    dsync_supported: AtomicBool,
    /// Record bytes of the last `append` (`zero_ahead` skips after a large one).
    last_append_bytes: AtomicU64,
    /// While `dirty`: the index of the first record written into the active segment since it
    /// was last synced (the current batch's first; records carry their distance to it).
    batch_first: AtomicU64,
    /// `O_DIRECT` writes work here (cleared at the first refusal).
    unbuffered_supported: AtomicBool,
    /// The aligned staging buffer of `O_DIRECT` writes (only the writer uses it).
    staging: Mutex<AlignedBuf>,
    /// Payload bytes written with `O_DIRECT` since open.
    unbuffered_bytes: AtomicU64,
    /// Every record with a lower index is durable (synced), as far as this process knows: the
    /// state may refer to a record's bytes (`durable_record`) only below it.
    durable_next: AtomicU64,
    /// Whether the state refers to bytes of the segment starting at this index (store/blobs.rs):
    /// such a segment is not deleted once its entries are purged but moved to `packs` (see
    /// `retire`). Set by the store; nothing is kept without it (tests, the log's migration).
    keep: RwLock<Option<Keep>>,
}

/// The store's answer to "does the state refer to this segment's bytes", and where such a
/// segment goes once its entries are purged.
pub(super) struct Keep {
    pub refers: Box<dyn Fn(u64) -> bool + Send + Sync>,
    pub packs_dir: PathBuf,
}

/// A heap buffer whose start is `DIRECT_ALIGN`-aligned, as `O_DIRECT` needs, allocated at first
/// use and then reused.
#[derive(Default)]
struct AlignedBuf {
    blocks: Vec<Block>,
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Block([u8; DIRECT_ALIGN]);

impl AlignedBuf {
    /// The first `len` bytes (a multiple of `DIRECT_ALIGN`, at most `UNBUFFERED_CHUNK_BYTES`),
    /// filled from `src`.
    fn fill(&mut self, src: &[u8]) -> &[u8] {
        debug_assert!(src.len() % DIRECT_ALIGN == 0 && src.len() <= UNBUFFERED_CHUNK_BYTES);
        if self.blocks.is_empty() {
            self.blocks = vec![Block([0; DIRECT_ALIGN]); UNBUFFERED_CHUNK_BYTES / DIRECT_ALIGN];
        }
        let n = src.len() / DIRECT_ALIGN;
        for (b, s) in self.blocks[..n].iter_mut().zip(src.chunks_exact(DIRECT_ALIGN)) {
            b.0.copy_from_slice(s);
        }
        // SAFETY: `Block` is `repr(C)` of one byte array with no padding (its size equals its
        // alignment), so `n` contiguous blocks are `n * DIRECT_ALIGN` initialised bytes, borrowed
        // for as long as `self`.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), n * DIRECT_ALIGN) }
    }
}

impl Wal {
    /// Open (or create) the log in `dir`. Entries up to `purged_upto` are purged (a purge that a
    /// crash interrupted is finished). A torn last batch in the last segment is cut (it was never
    /// acknowledged); any other damage, including damage in the last segment followed by an
    /// intact record of a later batch, is a `StoreFault` and nothing is changed (module doc).
    pub fn open(dir: &Path, purged_upto: Option<u64>) -> StoreResult<Wal> {
        Wal::open_with(dir, purged_upto, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, purged_upto: Option<u64>, segment_bytes: u64) -> StoreResult<Wal> {
        Wal::open_keeping(dir, purged_upto, segment_bytes, None)
    }

    /// `open`, keeping the purged segments `keep` names (the store's, see `Keep`).
    pub(super) fn open_kept(dir: &Path, purged_upto: Option<u64>, keep: Keep) -> StoreResult<Wal> {
        Wal::open_keeping(dir, purged_upto, SEGMENT_BYTES, Some(keep))
    }

    fn open_keeping(dir: &Path, purged_upto: Option<u64>, segment_bytes: u64, keep: Option<Keep>) -> StoreResult<Wal> {
        std::fs::create_dir_all(dir).map_err(|e| io_fault("creating", dir, e))?;
        let mut names = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(|e| io_fault("listing", dir, e))? {
            let ent = ent.map_err(|e| io_fault("listing", dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.ends_with(TMP_SUFFIX) {
                // A segment whose creation a crash interrupted: it never held a record.
                std::fs::remove_file(ent.path()).map_err(|e| io_fault("removing", &ent.path(), e))?;
                continue;
            }
            let first = name.strip_suffix(SEGMENT_SUFFIX).filter(|n| n.len() == 20).and_then(|n| n.parse::<u64>().ok());
            match first {
                Some(first) => names.push((first, ent.path())),
                None => tracing::warn!(file = %ent.path().display(), "unexpected file in the log directory; ignored"),
            }
        }
        names.sort();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let count = names.len();
        for (k, (first, path)) in names.into_iter().enumerate() {
            let last = k + 1 == count;
            if let Some(prev) = segments.back() {
                if prev.next_index() != first {
                    return Err(StoreFault(format!(
                        "log: segment {} ends before entry {}, the next segment starts at {first}: entries are missing; refusing to start",
                        prev.path.display(),
                        prev.next_index()
                    )));
                }
            }
            let (mut seg, end) = scan_segment(&path, first)?;
            if let ScanEnd::Bad(why) = &end {
                if !last {
                    return Err(StoreFault(format!(
                        "log segment {} (not the last one): {why}; refusing to start",
                        path.display()
                    )));
                }
            }
            if last && seg.version != SEGMENT_VERSION_V1 {
                // Torn tail or damage to synced records? Whatever follows the valid records tells.
                let (off, index) = (seg.end, seg.next_index());
                let why = match &end {
                    ScanEnd::Bad(why) => why.clone(),
                    ScanEnd::Clean => format!("the record header at offset {off} is zeros"),
                };
                match later_batch(&seg).map_err(|e| io_fault("reading", &path, e))? {
                    After::LaterBatch { off: later_off, index: later, batch_first } => {
                        return Err(StoreFault(format!(
                            "log segment {} (the last one): entry {index} at offset {off} is damaged ({why}), \
                             but entry {later} at offset {later_off} is intact and belongs to a batch that began at \
                             entry {batch_first}, written only after entry {index} was synced: acknowledged entries \
                             are damaged (disk corruption?); refusing to start",
                            path.display()
                        )));
                    }
                    After::Nothing { same_batch } if same_batch > 0 || matches!(end, ScanEnd::Bad(_)) => {
                        // The normal crash case: the last batch was never synced, so never
                        // acknowledged (or, indistinguishably, it was and is damaged: see the
                        // module doc).
                        tracing::warn!(segment = %path.display(), index, offset = off, reason = %why, intact_after = same_batch, "log: cutting a torn tail");
                    }
                    After::Nothing { .. } => {}
                }
            } else if let ScanEnd::Bad(why) = &end {
                // A version 1 segment has no batch marks: its first bad record is taken for a
                // torn tail, as the build that wrote it did.
                tracing::warn!(segment = %path.display(), index = seg.next_index(), reason = %why, "log: cutting a torn tail");
            }
            if last {
                // Zeros after the last record (invariant 1), whatever a crash left there.
                let end = seg.end;
                seg.cut(end, segment_bytes)?;
            }
            segments.push_back(seg);
        }
        let start = match (purged_upto, segments.front()) {
            (Some(p), _) => p + 1,
            (None, Some(s)) => s.first,
            (None, None) => 0,
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            segment_bytes,
            state: RwLock::new(State { segments, start }),
            dirty: AtomicBool::new(false),
            dsync_supported: AtomicBool::new(true),
            last_append_bytes: AtomicU64::new(0),
            batch_first: AtomicU64::new(0),
            unbuffered_supported: AtomicBool::new(true),
            staging: Mutex::new(AlignedBuf::default()),
            unbuffered_bytes: AtomicU64::new(0),
            durable_next: AtomicU64::new(0),
            keep: RwLock::new(keep),
        };
        // Finish a purge a crash interrupted.
        {
            let mut st = wal.write();
            wal.drop_purged(&mut st)?;
            // Every segment but the last was synced before the next was created, and the last
            // one's cut above synced it: all that is left is durable.
            wal.durable_next.store(st.next_index().unwrap_or(0), Ordering::Release);
        }
        Ok(wal)
    }

    /// Set how to tell segments the state refers to (see `Keep`).
    pub(super) fn set_keep(&self, keep: Keep) {
        *self.keep.write().unwrap_or_else(|e| e.into_inner()) = Some(keep);
    }

    /// Where the payload of entry `index` lies, if that record is live and durable: (the first
    /// index of its segment, the payload's offset in the segment file, its length). Bytes there
    /// stay as they are until the segment is deleted (records are never rewritten in place; only
    /// records not yet durable are ever cut).
    pub fn durable_record(&self, index: u64) -> Option<(u64, u64, u32)> {
        let st = self.read();
        if index >= self.durable_next.load(Ordering::Acquire) {
            return None;
        }
        let (lo, hi) = st.live()?;
        if index < lo || index >= hi {
            return None;
        }
        let seg = st.segment_of(index);
        let (off, len) = *seg.records.get((index - seg.first) as usize)?;
        Some((seg.first, off + RECORD_HEADER_BYTES, len))
    }

    /// The open file of the live segment starting at index `first`.
    pub fn segment_file(&self, first: u64) -> Option<Arc<File>> {
        let st = self.read();
        let i = st.segments.partition_point(|s| s.first < first);
        st.segments.get(i).filter(|s| s.first == first).map(|s| s.file.clone())
    }

    /// Remove a segment that leaves the log: moved to the packs directory if the state refers to
    /// its bytes, deleted otherwise. Called with the state lock held, so a reader finds the file
    /// either in the log or among the packs.
    fn retire(&self, seg: &Segment) -> StoreResult<()> {
        let keep = self.keep.read().unwrap_or_else(|e| e.into_inner());
        match keep.as_ref() {
            Some(k) if (k.refers)(seg.first) => {
                std::fs::create_dir_all(&k.packs_dir).map_err(|e| io_fault("creating", &k.packs_dir, e))?;
                let to = k.packs_dir.join(super::blobs::pack_name(seg.first));
                if to.exists() {
                    // Indexes only grow past a purge, so this is a bug; replacing would lose blocks.
                    return Err(StoreFault(format!("log: a pack {} exists already; refusing to replace it", to.display())));
                }
                seg.file.sync_data().map_err(|e| io_fault("syncing", &seg.path, e))?;
                std::fs::rename(&seg.path, &to).map_err(|e| io_fault("moving to the packs", &seg.path, e))?;
                sync_dir(&k.packs_dir)?;
                tracing::debug!(segment = seg.first, "log: purged segment kept as a pack (the state refers to its blocks)");
            }
            _ => std::fs::remove_file(&seg.path).map_err(|e| io_fault("removing", &seg.path, e))?,
        }
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Append entries (contiguous indexes). An index at or below the last one truncates from
    /// there first (openraft overwrites conflicting entries); into an empty log any index goes.
    /// (openraft never appends below its purge point; its storage suite does, and gets the
    /// entries back until the next open, which hides them behind the purge mark.) Not durable
    /// until `sync`.
    pub fn append(&self, entries: &[(u64, Vec<u8>)]) -> StoreResult<()> {
        self.append_with(entries, false).map(|_| ())
    }

    /// `append`, and durable on return: if nothing else awaits a sync and the records go out in
    /// one small write, that write is `RWF_DSYNC` (cheaper than a write and an fdatasync);
    /// otherwise the caller's next `sync` makes them durable. Whether they are durable already.
    pub fn append_durable(&self, entries: &[(u64, Vec<u8>)]) -> StoreResult<bool> {
        self.append_with(entries, true)
    }

    fn append_with(&self, entries: &[(u64, Vec<u8>)], dsync: bool) -> StoreResult<bool> {
        let Some(&(first_index, _)) = entries.first() else { return Ok(false) };
        for w in entries.windows(2) {
            if w[1].0 != w[0].0 + 1 {
                return Err(StoreFault(format!("log append: index {} follows {}", w[1].0, w[0].0)));
            }
        }
        for (index, payload) in entries {
            if payload.is_empty() || payload.len() as u64 > RECORD_PAYLOAD_BYTES_MAX {
                return Err(StoreFault(format!("log append: entry {index} has {} bytes", payload.len())));
            }
        }
        let live = self.read().live();
        match live {
            Some((_, hi)) if first_index < hi => self.truncate(first_index)?,
            Some((_, hi)) if first_index > hi => {
                return Err(StoreFault(format!("log append: entry {first_index} would leave a hole after {}", hi - 1)))
            }
            _ => {}
        }
        let mut st = self.write();
        // The first record of the current batch, if records written into the active segment
        // since its last sync (or RWF_DSYNC write, truncation, creation) await a sync.
        let was_dirty = self.dirty.load(Ordering::Acquire);
        let mut batch_first = was_dirty.then(|| self.batch_first.load(Ordering::Relaxed));
        if (st.live().is_none() && st.next_index() != Some(first_index)) || first_index < st.start {
            // Only purged entries (or none) are left: start afresh at this index.
            while let Some(seg) = st.segments.pop_front() {
                self.retire(&seg)?;
            }
            self.durable_next.store(first_index, Ordering::Release);
            st.segments.push_back(Segment::create(&self.dir, first_index, self.segment_bytes)?);
            st.start = first_index;
            batch_first = None;
        }
        // Only a first index among the active segment's records can be the batch's first (a
        // guard: a batch mark must never claim a later start than the truth, see the module doc).
        if let Some(seg) = st.segments.back() {
            batch_first = batch_first.filter(|&f| f >= seg.first && f < seg.next_index());
        }
        let record_bytes: u64 = entries.iter().map(|e| RECORD_HEADER_BYTES + e.1.len() as u64).sum();
        self.last_append_bytes.store(record_bytes, Ordering::Relaxed);
        // Anything written before the last write of this call (a full buffer, a large payload, a
        // roll-over) rules the RWF_DSYNC write out: it syncs only its own range.
        let mut earlier_writes = false;
        // From here records may reach the file: dirty even if a write fails half way, so the
        // next record is never marked as a batch's first while unsynced records precede it.
        self.dirty.store(true, Ordering::Release);
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_BUFFER_BYTES.min(record_bytes as usize));
        let mut buf_at = st.segments.back().map(|s| s.end).unwrap_or(SEGMENT_HEADER_BYTES);
        for (index, payload) in entries {
            let rec = RECORD_HEADER_BYTES + payload.len() as u64;
            let seg = st.segments.back_mut().ok_or_else(|| StoreFault("log append: no active segment".into()))?;
            let old_version = seg.version != SEGMENT_VERSION;
            if (seg.end + rec > self.segment_bytes || old_version) && !seg.records.is_empty() {
                // Roll over (also out of a segment of an older version, never appended to). The
                // full segment is synced first (invariant 2).
                flush(seg, &mut buf, buf_at)?;
                seg.file.sync_data().map_err(|e| io_fault("syncing", &seg.path, e))?;
                earlier_writes = true;
                let next = Segment::create(&self.dir, *index, self.segment_bytes)?;
                buf_at = next.end;
                st.segments.push_back(next);
                batch_first = None;
            } else if old_version {
                // An empty segment of an older version (nothing in `buf` yet, this is the first
                // record): a new one replaces it (same name: the rename replaces the file).
                let next = Segment::create(&self.dir, *index, self.segment_bytes)?;
                if let Some(old) = st.segments.pop_back() {
                    if old.path != next.path {
                        std::fs::remove_file(&old.path).map_err(|e| io_fault("removing", &old.path, e))?;
                    }
                }
                buf_at = next.end;
                st.segments.push_back(next);
                batch_first = None;
            }
            let seg = st.segments.back_mut().ok_or_else(|| StoreFault("log append: no active segment".into()))?;
            let first_of_batch = match batch_first {
                Some(f) => f,
                None => {
                    batch_first = Some(*index);
                    self.batch_first.store(*index, Ordering::Relaxed);
                    *index
                }
            };
            let back = u32::try_from(index - first_of_batch).unwrap_or(u32::MAX);
            let header =
                record_header(seg.generation, payload.len() as u32, crc(seg.generation, *index, payload), *index, back);
            buf.extend_from_slice(&header);
            if payload.len() >= DIRECT_PAYLOAD_BYTES_MIN {
                earlier_writes = true;
                flush(seg, &mut buf, buf_at)?;
                let at = seg.end + RECORD_HEADER_BYTES;
                self.write_payload(seg, payload, at).map_err(|e| io_fault("writing", &seg.path, e))?;
                buf_at = at + payload.len() as u64;
            } else {
                buf.extend_from_slice(payload);
            }
            seg.records.push((seg.end, payload.len() as u32));
            seg.end += rec;
            seg.file_len = seg.file_len.max(seg.end);
            seg.written.fetch_max(seg.end, Ordering::Relaxed);
            if buf.len() >= WRITE_BUFFER_BYTES {
                earlier_writes = true;
                flush(seg, &mut buf, buf_at)?;
                buf_at = seg.end;
            }
        }
        let Some(seg) = st.segments.back() else { return Ok(false) };
        let one_small_write = !earlier_writes && !buf.is_empty() && buf.len() <= DSYNC_WRITE_BYTES_MAX;
        if dsync && one_small_write && !was_dirty && self.dsync_supported.load(Ordering::Relaxed) {
            match pwrite_dsync(&seg.file, &buf, buf_at) {
                Ok(n) if n == buf.len() => {
                    // Durable: the next record starts a batch.
                    self.dirty.store(false, Ordering::Release);
                    self.durable_next.store(seg.next_index(), Ordering::Release);
                    return Ok(true);
                }
                Ok(n) => {
                    buf.drain(..n);
                    buf_at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                    tracing::info!(error = %e, "log: RWF_DSYNC writes unsupported here; using write + fdatasync");
                    self.dsync_supported.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io_fault("writing", &seg.path, e)),
            }
        }
        flush(seg, &mut buf, buf_at)?;
        return Ok(false);

        /// Write the gathered records at `at` (where the first of them goes).
        fn flush(seg: &Segment, buf: &mut Vec<u8>, at: u64) -> StoreResult<()> {
            if !buf.is_empty() {
                seg.file.write_all_at(buf, at).map_err(|e| io_fault("writing", &seg.path, e))?;
                buf.clear();
            }
            Ok(())
        }
    }

    /// Write a large payload at `at`. Its block-aligned middle, if at least `UNBUFFERED_BYTES_MIN`,
    /// goes out with `O_DIRECT` through the aligned staging buffer; the partial blocks at either
    /// end, and all of it where `O_DIRECT` is refused, through the page cache. A log is written
    /// once and read back rarely, so copying it into page-cache pages only costs CPU (that copy
    /// was the largest item of a node's CPU in a sequential write), dirties pages that writeback
    /// and `release_cache` must deal with, and pushes the state file's pages out. Durable, like
    /// any other write, only after the next sync: `O_DIRECT` bypasses the page cache, not the
    /// device's cache, and the fdatasync also commits the extent changes of preallocated blocks.
    /// The buffered and the direct parts never share a page, and the direct range holds no
    /// earlier record (it starts after this record's header), so no reader races it; the kernel
    /// writes back and drops any page of that range still cached (zero-fill) before the write.
    fn write_payload(&self, seg: &Segment, payload: &[u8], at: u64) -> std::io::Result<()> {
        let align = DIRECT_ALIGN as u64;
        let end = at + payload.len() as u64;
        let (lo, hi) = (at.div_ceil(align) * align, end / align * align);
        let direct = if hi > lo && (hi - lo) as usize >= UNBUFFERED_BYTES_MIN && self.unbuffered_supported.load(Ordering::Relaxed) {
            seg.unbuffered()
        } else {
            None
        };
        let Some(direct) = direct else { return seg.file.write_all_at(payload, at) };
        let (head, rest) = payload.split_at((lo - at) as usize);
        let (middle, tail) = rest.split_at((hi - lo) as usize);
        seg.file.write_all_at(head, at)?;
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let mut off = lo;
        for piece in middle.chunks(UNBUFFERED_CHUNK_BYTES) {
            match direct.write_all_at(staging.fill(piece), off) {
                Ok(()) => {
                    self.unbuffered_bytes.fetch_add(piece.len() as u64, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // Refused after the open succeeded (alignment rules of this device): the
                    // page cache from here on, starting again at this piece (writing again
                    // what of it may have reached the file does no harm).
                    tracing::info!(path = %seg.path.display(), error = %e, "log: O_DIRECT writes refused; large entries go through the page cache");
                    self.unbuffered_supported.store(false, Ordering::Relaxed);
                    seg.file.write_all_at(&middle[(off - lo) as usize..], off)?;
                    break;
                }
                Err(e) => return Err(e),
            }
            off += piece.len() as u64;
        }
        drop(staging);
        seg.file.write_all_at(tail, hi)
    }

    /// Payload bytes written with `O_DIRECT` since open.
    #[cfg(test)]
    fn unbuffered_bytes(&self) -> u64 {
        self.unbuffered_bytes.load(Ordering::Relaxed)
    }

    /// Make every append so far durable (one fdatasync; nothing if there is nothing new).
    /// Whether it synced.
    pub fn sync(&self) -> StoreResult<bool> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let active = self.read().segments.back().map(|s| (s.file.clone(), s.path.clone(), s.next_index()));
        if let Some((file, path, next)) = active {
            if let Err(e) = file.sync_data() {
                self.dirty.store(true, Ordering::Release);
                return Err(io_fault("syncing", &path, e));
            }
            // A record is listed (and so counted in `next`) only once its write returned, so
            // every record below `next` was written before this sync began.
            self.durable_next.store(next, Ordering::Release);
        }
        Ok(true)
    }

    /// Drop the pages of durable log records far behind the tail (more than `CACHE_KEEP_BYTES`)
    /// from the page cache, at least `CACHE_RELEASE_BYTES` at a time. The log is written once and
    /// read back rarely (entries are served from memory until applied; a lagging follower or a
    /// restart reads them from disk), so its pages would only push the state file's out, and
    /// pages freed here are what the next writes reuse. For the writer, right after a sync: every
    /// record is durable then, so every page below the tail is clean and the kernel drops it.
    pub fn release_cache(&self) {
        if self.dirty.load(Ordering::Acquire) {
            return;
        }
        let st = self.read();
        let Some(active) = st.segments.back() else { return };
        let tail = active.end;
        for seg in st.segments.iter() {
            let upto = if std::ptr::eq(seg, active) {
                tail.saturating_sub(CACHE_KEEP_BYTES) & !(PAGE_BYTES - 1)
            } else if tail >= CACHE_KEEP_BYTES {
                // An older segment (synced at its roll-over), wholly behind the kept range.
                seg.file_len
            } else {
                continue;
            };
            let from = seg.released.load(Ordering::Relaxed);
            if upto <= from || (upto - from < CACHE_RELEASE_BYTES && std::ptr::eq(seg, active)) {
                continue;
            }
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
            let r = unsafe {
                libc::posix_fadvise(seg.file.as_raw_fd(), from as libc::off_t, (upto - from) as libc::off_t, libc::POSIX_FADV_DONTNEED)
            };
            if r != 0 {
                // Only memory use depends on it.
                tracing::debug!(errno = r, path = %seg.path.display(), "log segment: dropping cached pages failed");
            }
            seg.released.store(upto, Ordering::Relaxed);
        }
    }

    /// Write zeros ahead of the active segment's tail once a small append came within
    /// `ZERO_AHEAD_LOW_BYTES` of where its written blocks end (see the module doc), and start
    /// their writeback without waiting for it. For the writer, when it has nothing queued. A
    /// failure only costs speed: logged, and no more zero-fill in this segment.
    pub fn zero_ahead(&self) {
        if self.last_append_bytes.load(Ordering::Relaxed) > ZERO_AHEAD_BATCH_BYTES_MAX {
            return;
        }
        let st = self.read();
        let Some(seg) = st.segments.back() else { return };
        let written = seg.written.load(Ordering::Relaxed).max(seg.end);
        if written >= seg.file_len || written - seg.end >= ZERO_AHEAD_LOW_BYTES {
            return;
        }
        let to = zero_fill_after(&seg.file, &seg.path, written, seg.file_len);
        if to == written {
            // Failed (logged): no more zero-fill in this segment.
            seg.written.store(seg.file_len, Ordering::Relaxed);
            return;
        }
        seg.written.store(to, Ordering::Relaxed);
        if let Err(e) = super::start_writeback(&seg.file, written, to - written) {
            tracing::debug!(error = %e, "log segment: starting writeback of the zero-fill failed");
        }
    }

    /// Delete entries with index >= `from`; durable on return.
    pub fn truncate(&self, from: u64) -> StoreResult<()> {
        let mut st = self.write();
        let Some(next) = st.next_index() else { return Ok(()) };
        if from >= next {
            return Ok(());
        }
        self.durable_next.fetch_min(from, Ordering::AcqRel);
        // Newest first, so a crash leaves a contiguous prefix.
        let mut removed = false;
        while st.segments.back().is_some_and(|s| s.first >= from) {
            let refers = self.keep.read().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|k| (k.refers)(st.segments[st.segments.len() - 1].first));
            if refers {
                // Only entries never committed are truncated, and the state refers only to
                // applied (committed) ones: this would be a bug, and cutting would lose data.
                return Err(StoreFault(format!("log truncate from {from}: the state refers to blocks in the segment to be removed; refusing")));
            }
            if let Some(seg) = st.segments.pop_back() {
                std::fs::remove_file(&seg.path).map_err(|e| io_fault("removing", &seg.path, e))?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        if let Some(seg) = st.segments.back_mut() {
            if from < seg.next_index() {
                let keep = (from - seg.first) as usize;
                let off = seg.records[keep].0;
                seg.records.truncate(keep);
                seg.cut(off, self.segment_bytes)?;
            }
        }
        // Whatever was not yet synced is either gone or synced by the cut.
        self.dirty.store(false, Ordering::Release);
        Ok(())
    }

    /// Purge entries with index <= `upto`: whole segments go once all their entries are purged.
    /// `upto` may lie beyond the last entry (after a snapshot install): then every segment goes,
    /// and the next append starts a fresh segment at its own index.
    pub fn purge(&self, upto: u64) -> StoreResult<()> {
        let mut st = self.write();
        st.start = st.start.max(upto.saturating_add(1));
        self.drop_purged(&mut st)
    }

    /// Delete the segments that hold only purged entries (oldest first: a crash leaves a suffix).
    fn drop_purged(&self, st: &mut State) -> StoreResult<()> {
        let mut removed = false;
        while st.segments.front().is_some_and(|s| s.next_index() <= st.start) {
            if let Some(seg) = st.segments.pop_front() {
                self.retire(&seg)?;
                removed = true;
            }
        }
        if st.segments.is_empty() {
            self.dirty.store(false, Ordering::Release);
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Live entries in `range`, in order.
    pub fn read_range(&self, range: (Bound<u64>, Bound<u64>)) -> StoreResult<Vec<(u64, Vec<u8>)>> {
        let st = self.read();
        let Some((lo, hi)) = st.live() else { return Ok(Vec::new()) };
        let a = match range.0 {
            Bound::Included(a) => a,
            Bound::Excluded(a) => a.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(lo);
        let b = match range.1 {
            Bound::Included(b) => b.saturating_add(1),
            Bound::Excluded(b) => b,
            Bound::Unbounded => u64::MAX,
        }
        .min(hi);
        let mut out = Vec::with_capacity(b.saturating_sub(a).min(1024) as usize);
        for index in a..b {
            out.push((index, st.segment_of(index).read(index)?));
        }
        Ok(out)
    }

    /// Bytes the live entries take in the segments (about what purging them all gives back).
    pub fn live_bytes(&self) -> u64 {
        let st = self.read();
        let Some((lo, _)) = st.live() else { return 0 };
        st.segments
            .iter()
            .map(|s| {
                let from = match lo.checked_sub(s.first) {
                    Some(k) if k > 0 => s.records.get(k as usize).map_or(s.end, |r| r.0),
                    _ => 0,
                };
                s.end.saturating_sub(from)
            })
            .sum()
    }

    /// The last live entry.
    pub fn last(&self) -> StoreResult<Option<(u64, Vec<u8>)>> {
        let st = self.read();
        let Some((_, hi)) = st.live() else { return Ok(None) };
        Ok(Some((hi - 1, st.segment_of(hi - 1).read(hi - 1)?)))
    }

    /// The first live index.
    pub fn first_index(&self) -> Option<u64> {
        self.read().live().map(|(lo, _)| lo)
    }

    /// `(path, end of the last record)` of every segment (tests corrupt them).
    #[cfg(test)]
    pub fn segment_files(&self) -> Vec<(PathBuf, u64)> {
        self.read().segments.iter().map(|s| (s.path.clone(), s.end)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Bound::{Excluded, Included, Unbounded};

    /// Small segments, so a few entries roll over.
    const TEST_SEGMENT_BYTES: u64 = 4096;

    fn open(dir: &Path, purged: Option<u64>) -> Wal {
        Wal::open_with(dir, purged, TEST_SEGMENT_BYTES).unwrap()
    }

    fn entry(i: u64, len: usize) -> Vec<u8> {
        (0..len).map(|j| (j as u64 * 7 + i) as u8).collect()
    }

    fn rows(range: std::ops::RangeInclusive<u64>, len: usize) -> Vec<(u64, Vec<u8>)> {
        range.map(|i| (i, entry(i, len))).collect()
    }

    fn all(w: &Wal) -> Vec<(u64, Vec<u8>)> {
        w.read_range((Unbounded, Unbounded)).unwrap()
    }

    fn indexes(w: &Wal) -> Vec<u64> {
        all(w).into_iter().map(|(i, _)| i).collect()
    }

    fn segment_count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(SEGMENT_SUFFIX))
            .count()
    }

    #[test]
    fn append_and_read_across_segments_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        assert_eq!(w.last().unwrap(), None);
        assert_eq!(w.first_index(), None);
        // 1000-byte entries: 4 per 4 KiB segment; one entry larger than a segment.
        let mut want = rows(1..=10, 1000);
        want.push((11, entry(11, 10_000)));
        want.extend(rows(12..=20, 300));
        w.append(&want[..5]).unwrap();
        w.append(&want[5..]).unwrap();
        assert!(w.sync().unwrap());
        assert!(segment_count(d.path()) >= 4, "rolled over: {}", segment_count(d.path()));
        assert_eq!(all(&w), want);
        assert_eq!(w.read_range((Included(3), Excluded(12))).unwrap(), want[2..11].to_vec());
        assert_eq!(w.read_range((Excluded(10), Included(12))).unwrap(), want[10..12].to_vec());
        assert_eq!(w.last().unwrap(), Some(want[19].clone()));
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), want);
        assert_eq!(w.first_index(), Some(1));
        // Appends go on after a reopen.
        w.append(&rows(21..=22, 5)).unwrap();
        w.sync().unwrap();
        assert_eq!(w.last().unwrap().unwrap().0, 22);
    }

    #[test]
    fn bad_appends_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(5..=6, 10)).unwrap();
        assert!(w.append(&rows(8..=8, 10)).is_err(), "a hole");
        assert!(w.append(&[(7, vec![1]), (9, vec![1])]).is_err(), "not contiguous");
        assert!(w.append(&[(7, Vec::new())]).is_err(), "empty entry");
        assert_eq!(indexes(&w), vec![5, 6]);
    }

    #[test]
    fn truncate_then_append_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=20, 1000)).unwrap();
        w.sync().unwrap();
        // Into an earlier segment.
        w.truncate(10).unwrap();
        assert_eq!(indexes(&w), (1..=9).collect::<Vec<_>>());
        // An append at or below the last index overwrites from there, with shorter entries (the
        // old records behind them must never come back).
        w.append(&rows(8..=9, 10)).unwrap();
        w.sync().unwrap();
        let mut want = rows(1..=7, 1000);
        want.extend(rows(8..=9, 10));
        assert_eq!(all(&w), want);
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), want);
        // At a segment's first entry, and everything.
        w.truncate(5).unwrap();
        assert_eq!(indexes(&w), vec![1, 2, 3, 4]);
        w.truncate(1).unwrap();
        assert_eq!(all(&w), vec![]);
        w.append(&rows(1..=3, 7)).unwrap();
        w.sync().unwrap();
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(1..=3, 7));
    }

    #[test]
    fn purge_partial_and_beyond_the_end() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=20, 1000)).unwrap();
        w.sync().unwrap();
        let before = segment_count(d.path());
        w.purge(6).unwrap();
        assert_eq!(w.first_index(), Some(7));
        assert_eq!(indexes(&w), (7..=20).collect::<Vec<_>>());
        assert!(segment_count(d.path()) < before, "whole segments deleted");
        drop(w);
        // Reopened with the purge mark: entries 5 and 6 may still be in a file, never visible.
        let w = open(d.path(), Some(6));
        assert_eq!(indexes(&w), (7..=20).collect::<Vec<_>>());
        // Beyond the last entry (a snapshot install): all goes, the next append starts there.
        w.purge(100).unwrap();
        assert_eq!(w.first_index(), None);
        assert_eq!(w.last().unwrap(), None);
        assert_eq!(segment_count(d.path()), 0);
        w.append(&rows(101..=103, 10)).unwrap();
        w.sync().unwrap();
        drop(w);
        let w = open(d.path(), Some(100));
        assert_eq!(all(&w), rows(101..=103, 10));
        // A purge a crash interrupted (mark written, segments still there) is finished at open.
        w.append(&rows(104..=120, 1000)).unwrap();
        w.sync().unwrap();
        let before = segment_count(d.path());
        drop(w);
        let w = open(d.path(), Some(115));
        assert_eq!(indexes(&w), (116..=120).collect::<Vec<_>>());
        assert!(segment_count(d.path()) < before);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_entries_survive() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=9, 300)).unwrap();
        w.sync().unwrap();
        let (path, end) = w.segment_files().pop().unwrap();
        let generation = w.read().segments.back().unwrap().generation;
        drop(w);
        // Half a record for entry 10 (a valid header says 300 bytes, 100 written), then garbage.
        let half = [&record_header(generation, 300, 12345, 10, 0)[..], &[0xAB; 100]].concat();
        overwrite(&path, end, &half);
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(1..=9, 300));
        // The tail is gone for good: a shorter entry 10 is not followed by anything stale.
        w.append(&rows(10..=10, 20)).unwrap();
        w.sync().unwrap();
        drop(w);
        let w = open(d.path(), None);
        let mut want = rows(1..=9, 300);
        want.push((10, entry(10, 20)));
        assert_eq!(all(&w), want);

        // Pure garbage after the last record.
        let (path, end) = w.segment_files().pop().unwrap();
        drop(w);
        overwrite(&path, end, &[0xFF; 64]);
        let w = open(d.path(), None);
        assert_eq!(all(&w), want);
    }

    #[test]
    fn damage_inside_the_only_batch_of_the_last_segment_is_taken_for_a_torn_tail() {
        // The ambiguous case (module doc): entries 1..=3 are one batch and nothing was written
        // after it, so damage to entry 2 looks exactly like a crash during that batch.
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=3, 200)).unwrap();
        w.sync().unwrap();
        let (path, _) = w.segment_files().pop().unwrap();
        drop(w);
        // Flip a payload byte of entry 2: entries 2 and 3 count as never acknowledged.
        let off = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 200 + RECORD_HEADER_BYTES + 5;
        overwrite(&path, off, &[0x5A ^ entry(2, 200)[5]]);
        let w = open(d.path(), None);
        assert_eq!(indexes(&w), vec![1]);
    }

    #[test]
    fn corrupt_record_in_an_older_segment_refuses_to_open() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=20, 1000)).unwrap();
        w.sync().unwrap();
        let files = w.segment_files();
        assert!(files.len() >= 3);
        drop(w);
        overwrite(&files[0].0, SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 1000 + RECORD_HEADER_BYTES + 10, &[0xEE; 8]);
        let err = Wal::open_with(d.path(), None, TEST_SEGMENT_BYTES).err().expect("must refuse");
        assert!(err.0.contains("not the last one") && err.0.contains("refusing to start"), "{}", err.0);
        assert!(err.0.contains("entry 2"), "names the entry: {}", err.0);

        // A missing middle segment is a hole.
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=20, 1000)).unwrap();
        w.sync().unwrap();
        let files = w.segment_files();
        drop(w);
        std::fs::remove_file(&files[1].0).unwrap();
        let err = Wal::open_with(d.path(), None, TEST_SEGMENT_BYTES).err().expect("must refuse");
        assert!(err.0.contains("missing"), "{}", err.0);

        // A corrupt length never allocates beyond the limit; in the last segment it is a torn tail.
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=2, 100)).unwrap();
        w.sync().unwrap();
        let (path, _) = w.segment_files().pop().unwrap();
        drop(w);
        overwrite(&path, SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 100, &u32::MAX.to_le_bytes());
        let w = open(d.path(), None);
        assert_eq!(indexes(&w), vec![1]);
    }

    /// Batches `[1..=3]`, `[4]` (one RWF_DSYNC write), `[5..=7]` (two appends, one sync) and
    /// `[8..=9]` of 100-byte entries in one segment, closed. The segment's path and
    /// `(index, offset)` of every record.
    fn four_batches(dir: &Path) -> (PathBuf, Vec<(u64, u64)>) {
        let w = open(dir, None);
        w.append(&rows(1..=3, 100)).unwrap();
        w.sync().unwrap();
        assert!(w.append_durable(&rows(4..=4, 100)).unwrap());
        w.append(&rows(5..=6, 100)).unwrap();
        w.append(&rows(7..=7, 100)).unwrap();
        w.sync().unwrap();
        w.append(&rows(8..=9, 100)).unwrap();
        w.sync().unwrap();
        let st = w.read();
        assert_eq!(st.segments.len(), 1);
        let seg = st.segments.back().unwrap();
        let offsets = seg.records.iter().enumerate().map(|(i, r)| (seg.first + i as u64, r.0)).collect();
        (seg.path.clone(), offsets)
    }

    fn offset_of(offsets: &[(u64, u64)], index: u64) -> u64 {
        offsets.iter().find(|r| r.0 == index).unwrap().1
    }

    /// Every file in `dir` and its bytes.
    fn dir_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect();
        v.sort();
        v
    }

    /// Flip the bits of the byte at `at` in `path`.
    fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
    }

    /// The `back` field (records of the same batch before it) of every record of `path`.
    fn batch_marks(path: &Path, offsets: &[(u64, u64)]) -> Vec<(u64, u32)> {
        let data = std::fs::read(path).unwrap();
        offsets
            .iter()
            .map(|&(i, off)| {
                let h = &data[off as usize..(off + RECORD_HEADER_BYTES) as usize];
                (i, u32::from_le_bytes([h[16], h[17], h[18], h[19]]))
            })
            .collect()
    }

    #[test]
    fn records_mark_their_batch_which_ends_at_each_sync() {
        let d = tempfile::tempdir().unwrap();
        let (path, offsets) = four_batches(d.path());
        let want = vec![(1, 0), (2, 1), (3, 2), (4, 0), (5, 0), (6, 1), (7, 2), (8, 0), (9, 1)];
        assert_eq!(batch_marks(&path, &offsets), want);
        // A truncation syncs (its cut): the records after it start a batch; so does a segment
        // created by a roll-over inside a batch (the full one was synced first).
        let w = open(d.path(), None);
        w.append(&rows(10..=11, 100)).unwrap();
        w.truncate(11).unwrap();
        w.append(&rows(11..=12, 100)).unwrap();
        w.append(&rows(13..=60, 100)).unwrap();
        w.sync().unwrap();
        let segs: Vec<_> = {
            let st = w.read();
            st.segments
                .iter()
                .map(|s| {
                    let offs: Vec<_> = s.records.iter().enumerate().map(|(i, r)| (s.first + i as u64, r.0)).collect();
                    (s.path.clone(), offs)
                })
                .collect()
        };
        assert!(segs.len() >= 2, "rolled over");
        let marks = batch_marks(&segs[0].0, &segs[0].1);
        assert_eq!(&marks[9..12], &[(10, 0), (11, 0), (12, 1)]);
        let seg2_first = segs[1].1[0].0;
        assert_eq!(marks.last().unwrap().1 as u64, marks.last().unwrap().0 - 11, "one batch from 11 on");
        let marks2 = batch_marks(&segs[1].0, &segs[1].1);
        assert!(marks2.iter().all(|&(i, b)| b as u64 == i - seg2_first), "{marks2:?}");
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(indexes(&w), (1..=60).collect::<Vec<_>>());
    }

    #[test]
    fn damage_before_a_later_batch_in_the_last_segment_refuses_to_open_and_cuts_nothing() {
        // Each case: how to damage the closed `four_batches` log, and the entry named.
        type Damage = fn(&Path, &[(u64, u64)]);
        let cases: [(&str, Damage, u64); 5] = [
            ("a payload byte of entry 2", |p, o| flip(p, offset_of(o, 2) + RECORD_HEADER_BYTES + 50), 2),
            ("the length of entry 4 (its own batch)", |p, o| overwrite(p, offset_of(o, 4), &7u32.to_le_bytes()), 4),
            ("the length of entry 5 (the first of its batch)", |p, o| overwrite(p, offset_of(o, 5), &[0xFF; 4]), 5),
            ("entry 6 all zeros (a bad sector)", |p, o| overwrite(p, offset_of(o, 6), &[0; 124]), 6),
            (
                // The penultimate batch is damaged and the last one torn at its first record:
                // entry 9 still proves the damaged batch was synced.
                "entry 7 and the header of entry 8",
                |p, o| {
                    flip(p, offset_of(o, 7) + RECORD_HEADER_BYTES + 3);
                    overwrite(p, offset_of(o, 8), &[0; 24]);
                },
                7,
            ),
        ];
        for (what, damage, index) in cases {
            let d = tempfile::tempdir().unwrap();
            let (path, offsets) = four_batches(d.path());
            damage(&path, &offsets);
            let before = dir_bytes(d.path());
            for _ in 0..2 {
                let err = Wal::open_with(d.path(), None, TEST_SEGMENT_BYTES).err().unwrap_or_else(|| panic!("{what}: opened"));
                let off = offset_of(&offsets, index);
                let msg = &err.0;
                assert!(msg.contains("refusing to start") && msg.contains("the last one"), "{what}: {msg}");
                assert!(msg.contains(&format!("entry {index} at offset {off}")), "{what}: names entry and offset: {msg}");
                assert!(msg.contains(&path.display().to_string()), "{what}: names the segment: {msg}");
                assert_eq!(dir_bytes(d.path()), before, "{what}: nothing cut or changed");
            }
        }
    }

    #[test]
    fn a_torn_last_batch_is_cut_and_appends_continue() {
        // Each case: the damage (the last batch [8..=9] torn, in any page order), and the
        // entries left.
        type Damage = fn(&Path, &[(u64, u64)]);
        let cases: [(&str, Damage, u64); 5] = [
            ("entry 8's payload, entry 9 intact", |p, o| flip(p, offset_of(o, 8) + RECORD_HEADER_BYTES + 99), 7),
            ("entry 8 never written, entry 9 intact", |p, o| overwrite(p, offset_of(o, 8), &[0; 124]), 7),
            ("entry 8's length, entry 9 intact", |p, o| overwrite(p, offset_of(o, 8), &1000u32.to_le_bytes()), 7),
            ("entry 9 half written", |p, o| overwrite(p, offset_of(o, 9) + 60, &[0; 64]), 8),
            (
                // The ambiguous case: nothing after batch [5..=7] reached the disk, so damage to
                // entry 6 looks like a crash during that batch (module doc).
                "entry 6, nothing after its batch",
                |p, o| {
                    overwrite(p, offset_of(o, 8), &[0; 248]);
                    flip(p, offset_of(o, 6) + RECORD_HEADER_BYTES);
                },
                5,
            ),
        ];
        for (what, damage, left) in cases {
            let d = tempfile::tempdir().unwrap();
            let (path, offsets) = four_batches(d.path());
            damage(&path, &offsets);
            let w = open(d.path(), None);
            assert_eq!(all(&w), rows(1..=left, 100), "{what}");
            let (_, end) = w.segment_files().pop().unwrap();
            assert!(tail_bytes(&path, end).iter().all(|&b| b == 0), "{what}: only zeros after the cut");
            // Appends go on (shorter entries: nothing stale may come back behind them).
            w.append(&rows(left + 1..=12, 10)).unwrap();
            w.sync().unwrap();
            drop(w);
            let w = open(d.path(), None);
            let mut want = rows(1..=left, 100);
            want.extend(rows(left + 1..=12, 10));
            assert_eq!(all(&w), want, "{what}");
        }
    }

    #[test]
    fn a_zeroed_range_over_many_records_is_told_apart_in_a_large_segment() {
        // Batch [1..=1500] of 1000-byte entries (past the 1 MiB scan buffer), then [1501..=1510];
        // 8 KiB read as zeros (a bad sector, or pages a crash never wrote) from inside entry 3.
        let setup = |d: &Path| {
            let w = Wal::open_with(d, None, 4 * ZERO_AHEAD_BYTES).unwrap();
            w.append(&rows(1..=1500, 1000)).unwrap();
            w.sync().unwrap();
            w.append(&rows(1501..=1510, 1000)).unwrap();
            w.sync().unwrap();
            let st = w.read();
            let seg = st.segments.back().unwrap();
            assert_eq!(st.segments.len(), 1);
            (seg.path.clone(), seg.records.clone())
        };
        let d = tempfile::tempdir().unwrap();
        let (path, records) = setup(d.path());
        overwrite(&path, records[2].0 + 500, &[0; 8192]);
        let before = dir_bytes(d.path());
        let err = Wal::open_with(d.path(), None, 4 * ZERO_AHEAD_BYTES).err().expect("must refuse");
        assert!(err.0.contains(&format!("entry 3 at offset {}", records[2].0)), "{}", err.0);
        assert!(err.0.contains("entry 1501"), "the later batch's first intact record: {}", err.0);
        assert_eq!(dir_bytes(d.path()), before);

        // The same inside the last batch, whose later records reached the disk: torn, cut.
        let d = tempfile::tempdir().unwrap();
        let (path, records) = setup(d.path());
        overwrite(&path, records[1502].0 + 500, &[0; 4096]);
        let w = Wal::open_with(d.path(), None, 4 * ZERO_AHEAD_BYTES).unwrap();
        assert_eq!(indexes(&w), (1..=1502).collect::<Vec<_>>());
    }

    #[test]
    fn the_later_batch_search_finds_a_record_at_any_offset_after_zeros() {
        // Zeros from entry 2 up to entry 21 (the first of a later batch), whose offset from where
        // the search starts (entry 2's + 25) sweeps 8164..=8204: its header before, across and
        // after the boundary of two zero-skip blocks, the first of them all zeros.
        for shift in 0..=40usize {
            let d = tempfile::tempdir().unwrap();
            let w = Wal::open_with(d.path(), None, 64 * 1024).unwrap();
            let mut batch = rows(1..=1, 100);
            batch.extend(rows(2..=19, 407));
            batch.push((20, entry(20, 407 + shift)));
            w.append(&batch).unwrap();
            w.sync().unwrap();
            w.append(&rows(21..=22, 407)).unwrap();
            w.sync().unwrap();
            let (path, offs) = {
                let st = w.read();
                let seg = st.segments.back().unwrap();
                (seg.path.clone(), seg.records.iter().map(|r| r.0).collect::<Vec<_>>())
            };
            drop(w);
            assert_eq!(offs[20] - (offs[1] + RECORD_HEADER_BYTES + 1), 8164 + shift as u64);
            overwrite(&path, offs[1], &vec![0; (offs[20] - offs[1]) as usize]);
            let err = Wal::open_with(d.path(), None, 64 * 1024).err().expect("must refuse");
            assert!(err.0.contains(&format!("entry 21 at offset {}", offs[20])), "shift {shift}: {}", err.0);
        }
    }

    /// A version 1 segment file as the previous build wrote it: header, records
    /// `[u32 len][u32 crc32(generation, index, payload)][u64 index][payload]`, zeros up to
    /// `TEST_SEGMENT_BYTES`.
    fn write_v1_segment(dir: &Path, first: u64, entries: &[(u64, Vec<u8>)]) -> PathBuf {
        let generation = 0x1234_5678_9abc_def1;
        let mut b = segment_header(SEGMENT_VERSION_V1, generation, first).to_vec();
        for (i, p) in entries {
            b.extend_from_slice(&(p.len() as u32).to_le_bytes());
            b.extend_from_slice(&crc(generation, *i, p).to_le_bytes());
            b.extend_from_slice(&i.to_le_bytes());
            b.extend_from_slice(p);
        }
        b.resize(TEST_SEGMENT_BYTES as usize, 0);
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(segment_name(first));
        std::fs::write(&path, b).unwrap();
        path
    }

    fn version_of(path: &Path) -> u32 {
        let b = std::fs::read(path).unwrap();
        u32::from_le_bytes([b[8], b[9], b[10], b[11]])
    }

    #[test]
    fn version_1_segments_still_open_and_are_never_appended_to() {
        let d = tempfile::tempdir().unwrap();
        let v1 = write_v1_segment(d.path(), 1, &rows(1..=3, 100));
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(1..=3, 100));
        // The next append starts a version 2 segment; the old one stays as it is.
        let old = std::fs::read(&v1).unwrap();
        w.append(&rows(4..=5, 100)).unwrap();
        w.sync().unwrap();
        assert_eq!(std::fs::read(&v1).unwrap(), old);
        let files = w.segment_files();
        assert_eq!(files.len(), 2);
        assert_eq!(version_of(&files[1].0), SEGMENT_VERSION);
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(1..=5, 100));
        // Truncated back into it, it is the last one again: still not written to.
        w.truncate(3).unwrap();
        w.append(&rows(3..=3, 10)).unwrap();
        w.sync().unwrap();
        assert_eq!(segment_count(d.path()), 2);
        drop(w);
        let w = open(d.path(), None);
        let mut want = rows(1..=2, 100);
        want.push((3, entry(3, 10)));
        assert_eq!(all(&w), want);
        drop(w);

        // A damaged record in a version 1 last segment: taken for a torn tail, as before.
        let d = tempfile::tempdir().unwrap();
        let v1 = write_v1_segment(d.path(), 1, &rows(1..=3, 100));
        flip(&v1, SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES_V1 + 100 + RECORD_HEADER_BYTES_V1 + 7);
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(1..=1, 100));
        drop(w);
        // In a version 1 segment that is not the last one: refused.
        let d = tempfile::tempdir().unwrap();
        let v1 = write_v1_segment(d.path(), 1, &rows(1..=3, 100));
        let w = open(d.path(), None);
        w.append(&rows(4..=4, 100)).unwrap();
        w.sync().unwrap();
        drop(w);
        flip(&v1, SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES_V1 + 7);
        let err = Wal::open_with(d.path(), None, TEST_SEGMENT_BYTES).err().expect("must refuse");
        assert!(err.0.contains("not the last one") && err.0.contains("entry 1"), "{}", err.0);

        // An empty version 1 segment (everything truncated) is replaced by a version 2 one.
        let d = tempfile::tempdir().unwrap();
        let v1 = write_v1_segment(d.path(), 7, &[]);
        let w = open(d.path(), None);
        assert_eq!(all(&w), vec![]);
        w.append(&rows(7..=8, 50)).unwrap();
        w.sync().unwrap();
        assert_eq!(segment_count(d.path()), 1);
        assert_eq!(version_of(&v1), SEGMENT_VERSION);
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), rows(7..=8, 50));
    }

    /// Overwrite `bytes` at `at` in `path` (damage a closed segment file).
    fn overwrite(path: &Path, at: u64, bytes: &[u8]) {
        OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
    }

    /// The bytes of `path` from `from` to its end.
    fn tail_bytes(path: &Path, from: u64) -> Vec<u8> {
        let data = std::fs::read(path).unwrap();
        data[from as usize..].to_vec()
    }

    #[test]
    fn zero_fill_ahead_never_touches_records() {
        // Segments large enough for several zero-fill steps.
        let d = tempfile::tempdir().unwrap();
        let seg_bytes = 4 * ZERO_AHEAD_BYTES;
        let w = Wal::open_with(d.path(), None, seg_bytes).unwrap();
        let written = |w: &Wal| w.read().segments.back().map(|s| s.written.load(Ordering::Relaxed)).unwrap();
        w.append(&rows(1..=1, 100)).unwrap();
        // A new segment comes with zeros written after its header.
        assert_eq!(written(&w), SEGMENT_HEADER_BYTES + ZERO_AHEAD_BYTES);
        // Small appends, each followed by the idle writer's zero fill: the written frontier keeps
        // ahead of the tail, up to the end of the file and never past it.
        let mut want = rows(1..=1, 100);
        for i in 2..=1500u64 {
            let e = (i, entry(i, 3000 + (i as usize % 7)));
            w.append(std::slice::from_ref(&e)).unwrap();
            w.sync().unwrap();
            want.push(e);
            w.zero_ahead();
            let (end, len) = w.read().segments.back().map(|s| (s.end, s.file_len)).unwrap();
            let wr = written(&w);
            assert!(wr >= end && wr <= len.max(end), "frontier {wr}, tail {end}, file {len}");
            if len == seg_bytes && end + ZERO_AHEAD_LOW_BYTES <= len {
                assert!(wr >= end + ZERO_AHEAD_LOW_BYTES, "kept ahead: frontier {wr}, tail {end}");
            }
        }
        assert!(w.segment_files().len() >= 2, "rolled over");
        for (path, end) in w.segment_files() {
            assert_eq!(std::fs::metadata(&path).unwrap().len(), seg_bytes);
            assert!(tail_bytes(&path, end).iter().all(|&b| b == 0), "only zeros after the last record");
        }
        assert_eq!(all(&w), want);
        drop(w);
        let w = Wal::open_with(d.path(), None, seg_bytes).unwrap();
        assert_eq!(all(&w), want);
        // After a large append the fill is left to the appends themselves.
        w.append(&[(1501, entry(1501, 200_000))]).unwrap();
        let before = written(&w);
        w.zero_ahead();
        assert_eq!(written(&w), before);
    }

    #[test]
    fn truncate_after_zero_fill_leaves_no_stale_records() {
        let d = tempfile::tempdir().unwrap();
        let seg_bytes = 2 * ZERO_AHEAD_BYTES;
        let w = Wal::open_with(d.path(), None, seg_bytes).unwrap();
        for i in 1..=50u64 {
            w.append(&rows(i..=i, 1000)).unwrap();
            w.zero_ahead();
        }
        w.sync().unwrap();
        w.truncate(20).unwrap();
        // Shorter entries at 20..: the old 1000-byte records after them must not come back.
        w.append(&rows(20..=21, 10)).unwrap();
        w.sync().unwrap();
        let mut want = rows(1..=19, 1000);
        want.extend(rows(20..=21, 10));
        let (path, end) = w.segment_files().pop().unwrap();
        assert!(tail_bytes(&path, end).iter().all(|&b| b == 0));
        drop(w);
        let w = Wal::open_with(d.path(), None, seg_bytes).unwrap();
        assert_eq!(all(&w), want);
    }

    #[test]
    fn append_durable_syncs_one_small_write_itself() {
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        // The first append creates the segment (synced) and is one small write.
        assert!(w.append_durable(&rows(1..=2, 100)).unwrap());
        assert!(!w.sync().unwrap(), "nothing left to sync");
        // Not after a plain append that awaits its sync: that one needs the fdatasync.
        w.append(&rows(3..=3, 100)).unwrap();
        assert!(!w.append_durable(&rows(4..=4, 100)).unwrap());
        assert!(w.sync().unwrap());
        // Not when the records roll over into a new segment (more than one write).
        assert!(!w.append_durable(&rows(5..=10, 1000)).unwrap());
        assert!(w.sync().unwrap());
        // Overwriting the tail (a truncation first) still works and is durable.
        assert!(w.append_durable(&rows(10..=10, 7)).unwrap());
        let mut want = rows(1..=9, 0);
        for (i, e) in want.iter_mut() {
            *e = entry(*i, if *i <= 4 { 100 } else { 1000 });
        }
        want.push((10, entry(10, 7)));
        assert_eq!(all(&w), want);
        drop(w);
        let w = open(d.path(), None);
        assert_eq!(all(&w), want);
    }

    #[test]
    fn records_of_another_generation_are_not_taken() {
        // A valid record copied from another segment file fails the generation check.
        let d = tempfile::tempdir().unwrap();
        let w = open(d.path(), None);
        w.append(&rows(1..=1, 100)).unwrap();
        w.sync().unwrap();
        let (path, end) = w.segment_files().pop().unwrap();
        drop(w);
        let other = [&record_header(12345, 100, crc(12345, 2, &entry(2, 100)), 2, 0)[..], &entry(2, 100)].concat();
        overwrite(&path, end, &other);
        let w = open(d.path(), None);
        assert_eq!(indexes(&w), vec![1]);
    }

    /// Append cost: 10,000 single small appends, each durable by itself (`append_durable`, as the
    /// writer does for a lone append), with the idle writer's zero fill. A measurement, not a
    /// check: `cargo test --lib store::wal::tests::append_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn append_cost() {
        let d = tempfile::tempdir().unwrap();
        let w = Wal::open(d.path(), None).unwrap();
        let n = 10_000u64;
        let t = std::time::Instant::now();
        for i in 1..=n {
            if !w.append_durable(&[(i, entry(i, 200))]).unwrap() {
                w.sync().unwrap();
            }
            w.zero_ahead();
        }
        let dsync = t.elapsed();
        let t = std::time::Instant::now();
        for i in n + 1..=2 * n {
            w.append(&[(i, entry(i, 200))]).unwrap();
            w.sync().unwrap();
            w.zero_ahead();
        }
        let fdatasync = t.elapsed();
        eprintln!(
            "append_cost: {n} appends of 200 bytes: append_durable {:.1} us each, append + sync {:.1} us each",
            dsync.as_secs_f64() * 1e6 / n as f64,
            fdatasync.as_secs_f64() * 1e6 / n as f64
        );
        // The open scans the rest of the 64 MiB segment for a later batch (`later_batch`).
        drop(w);
        let t = std::time::Instant::now();
        let w = Wal::open(d.path(), None).unwrap();
        eprintln!("append_cost: open after them: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        assert!(matches!(later_batch(w.read().segments.back().unwrap()).unwrap(), After::Nothing { same_batch: 0 }));
        eprintln!("append_cost: of which the search for a later batch: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(w.last().unwrap().unwrap().0, 2 * n);
    }

    /// Pages of `path` in `[from, from + len)` that are in the page cache (mincore).
    fn resident_pages(path: &Path, from: u64, len: u64) -> usize {
        use std::os::fd::AsRawFd;
        let f = File::open(path).unwrap();
        let pages = (len / PAGE_BYTES) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: a read-only shared mapping of `len` bytes of an open file, inside its size, only
        // passed to mincore (never dereferenced) and unmapped before return.
        unsafe {
            let p = libc::mmap(std::ptr::null_mut(), len as usize, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), from as libc::off_t);
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(libc::mincore(p, len as usize, vec.as_mut_ptr()), 0);
            libc::munmap(p, len as usize);
        }
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    /// Whether `dir` is on tmpfs, where the page cache is the storage (pages never leave it).
    fn on_tmpfs(dir: &Path) -> bool {
        nix::sys::statfs::statfs(dir).unwrap().filesystem_type() == nix::sys::statfs::TMPFS_MAGIC
    }

    #[test]
    fn durable_records_far_behind_the_tail_leave_the_page_cache() {
        let d = tempfile::tempdir().unwrap();
        if on_tmpfs(d.path()) {
            eprintln!("skipped: {} is on tmpfs, whose pages are its storage", d.path().display());
            return;
        }
        let w = Wal::open_with(d.path(), None, SEGMENT_BYTES).unwrap();
        let payload = 64 * 1024;
        // 16 MiB of records, synced as the writer does, releasing after each sync.
        let n = (16 * 1024 * 1024 / payload) as u64;
        for i in 1..=n {
            w.append(&[(i, entry(i, payload))]).unwrap();
            w.sync().unwrap();
            w.release_cache();
        }
        let path = w.segment_files()[0].0.clone();
        let end = w.read().segments.back().unwrap().end;
        let released = w.read().segments.back().unwrap().released.load(Ordering::Relaxed);
        assert!(released >= end - CACHE_KEEP_BYTES - CACHE_RELEASE_BYTES && released <= end - CACHE_KEEP_BYTES, "released {released} of {end}");
        let dropped = resident_pages(&path, 0, released);
        assert!(dropped <= 16, "{dropped} of {} pages released still cached", released / PAGE_BYTES);
        // The kept range behind the tail stays cached (written through the page cache). The
        // kernel may still reclaim a few of its pages itself (2,042 of 2,048 were left once, in
        // a CI run with the whole test suite alongside); dropping the range would leave none.
        let kept_from = end.div_ceil(PAGE_BYTES) * PAGE_BYTES - CACHE_KEEP_BYTES;
        let kept = resident_pages(&path, kept_from, CACHE_KEEP_BYTES);
        assert!(kept as u64 >= CACHE_KEEP_BYTES / PAGE_BYTES * 9 / 10, "only {kept} pages of the last 8 MiB cached");
        // Unsynced records are never dropped: nothing is released while the log is dirty.
        w.append(&[(n + 1, entry(n + 1, payload))]).unwrap();
        let before = w.read().segments.back().unwrap().released.load(Ordering::Relaxed);
        w.release_cache();
        assert_eq!(w.read().segments.back().unwrap().released.load(Ordering::Relaxed), before);
        w.sync().unwrap();
        // Every record reads back whole, dropped or not (from disk).
        let back = w.read_range((Unbounded, Unbounded)).unwrap();
        assert_eq!(back.len() as u64, n + 1);
        for (i, b) in back {
            assert_eq!(b, entry(i, payload), "entry {i}");
        }
    }

    #[test]
    fn large_payloads_bypass_the_page_cache_and_read_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let w = Wal::open_with(d.path(), None, SEGMENT_BYTES).unwrap();
        // Small records before and between, so the large ones start at unaligned offsets.
        let big = 3 * 1024 * 1024 + 4321;
        let sizes = [100, big, 7, UNBUFFERED_CHUNK_BYTES + 3 * 4096 + 5, 300, 64 * 1024];
        let rows: Vec<(u64, Vec<u8>)> = sizes.iter().enumerate().map(|(k, &n)| (k as u64 + 1, entry(k as u64 + 1, n))).collect();
        for r in &rows {
            w.append(std::slice::from_ref(r)).unwrap();
        }
        w.sync().unwrap();
        let path = w.segment_files()[0].0.clone();
        let direct_ok = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path).is_ok()
        };
        if direct_ok {
            // The aligned middles of the two large payloads went around the page cache.
            let middles = |n: usize| (n as u64 - 2 * DIRECT_ALIGN as u64) / DIRECT_ALIGN as u64 * DIRECT_ALIGN as u64;
            assert!(w.unbuffered_bytes() >= middles(sizes[1]) + middles(sizes[3]), "only {} bytes unbuffered", w.unbuffered_bytes());
            // On tmpfs the page cache is the storage itself: every page stays resident.
            if !on_tmpfs(d.path()) {
                let (off, len) = w.read().segments[0].records[1];
                let from = (off + RECORD_HEADER_BYTES).div_ceil(PAGE_BYTES) * PAGE_BYTES;
                let cached = resident_pages(&path, from, 2 * 1024 * 1024);
                assert!(cached <= 2, "{cached} pages of a {len}-byte payload's middle are in the page cache");
            }
        } else {
            assert_eq!(w.unbuffered_bytes(), 0);
        }
        assert_eq!(all(&w), rows);
        drop(w);
        let w = Wal::open_with(d.path(), None, SEGMENT_BYTES).unwrap();
        assert_eq!(all(&w), rows);
        // Appends go on after the reopen (the next record follows the last large one's tail).
        let more = (7, entry(7, big));
        w.append(std::slice::from_ref(&more)).unwrap();
        w.sync().unwrap();
        drop(w);
        let w = Wal::open_with(d.path(), None, SEGMENT_BYTES).unwrap();
        let mut want = rows.clone();
        want.push(more);
        assert_eq!(all(&w), want);
    }
}

//! Snapshot files: every state table streamed as length-prefixed records, never the whole state in RAM.
//!
//! Format: `PBSNAP02`, u32 header length, header (opaque bytes from raft/), then records
//! `[table id u8][key len u32][key][value len u32][value]` (key and value as redb encodes them;
//! blocks as `hash -> head value` and `hash -> tail value`, not under the node-local block ids,
//! see `tables::dump_state`),
//! then the trailer `[0xFF][record count u64][SHA-256 of every byte before the digest]`.
//! All integers little-endian. Files are written as `<id>.tmp`, fsynced, renamed to `<id>.snap`.
//! A received file (`recv-*.part`) is verified completely before it is renamed to `<id>.snap`;
//! `.part` and `.tmp` files left by a crash or an aborted receive are deleted at open (`scan`).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::fault;
use super::tables::{check_record, dump_state, BlockOrder, ReadView, StateTxn};
use crate::config::MESSAGE_BYTES_MAX;
use crate::state::{StoreFault, StoreResult};

/// v02: block values carry their check value (tables::BLOCK_DATA); a v01 file is refused.
const MAGIC: &[u8; 8] = b"PBSNAP02";
const END: u8 = 0xFF;

/// A snapshot file on disk.
#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub id: String,
    pub path: PathBuf,
    /// The header raft/ wrote (its snapshot metadata).
    pub header: Vec<u8>,
}

fn check_id(id: &str) -> StoreResult<()> {
    if id.is_empty() || id.len() > 200 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(StoreFault(format!("invalid snapshot id {id:?}")));
    }
    Ok(())
}

/// Writes through to `inner` while hashing.
struct HashWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashReader<R: Read> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> HashReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> StoreResult<()> {
        self.inner.read_exact(buf).map_err(|e| StoreFault(format!("snapshot truncated or unreadable: {e}")))?;
        self.hash.update(&*buf);
        Ok(())
    }
    fn u8(&mut self) -> StoreResult<u8> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }
    fn u32(&mut self) -> StoreResult<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> StoreResult<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn bytes(&mut self, buf: &mut Vec<u8>) -> StoreResult<()> {
        let len = self.u32()? as usize;
        if len > MESSAGE_BYTES_MAX {
            return Err(StoreFault(format!("snapshot record of {len} bytes exceeds the limit")));
        }
        buf.resize(len, 0);
        self.exact(buf)
    }
}

fn open_reader(path: &Path) -> StoreResult<(HashReader<BufReader<File>>, Vec<u8>)> {
    let f = File::open(path).map_err(fault)?;
    let mut r = HashReader { inner: BufReader::with_capacity(1 << 20, f), hash: Sha256::new() };
    let mut magic = [0u8; 8];
    r.exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(StoreFault(format!("{} is not a pickbox snapshot", path.display())));
    }
    let mut header = Vec::new();
    r.bytes(&mut header)?;
    Ok((r, header))
}

/// Read only the header of a snapshot file.
pub(super) fn read_header(path: &Path) -> StoreResult<Vec<u8>> {
    Ok(open_reader(path)?.1)
}

/// Walk every record, calling `each`; checks the trailer count and digest.
fn walk(path: &Path, mut each: impl FnMut(u8, &[u8], &[u8]) -> StoreResult<()>) -> StoreResult<u64> {
    let (mut r, _) = open_reader(path)?;
    let (mut k, mut v) = (Vec::new(), Vec::new());
    let mut count = 0u64;
    loop {
        let id = r.u8()?;
        if id == END {
            let n = r.u64()?;
            let digest: [u8; 32] = r.hash.clone().finalize().into();
            let mut stored = [0u8; 32];
            r.inner.read_exact(&mut stored).map_err(|e| StoreFault(format!("snapshot trailer: {e}")))?;
            if n != count || digest != stored {
                tracing::error!(path = %path.display(), "snapshot file is corrupt (count or digest mismatch)");
                return Err(StoreFault(format!("snapshot {} is corrupt", path.display())));
            }
            let mut extra = [0u8; 1];
            if r.inner.read(&mut extra).map_err(fault)? != 0 {
                return Err(StoreFault(format!("snapshot {} has trailing bytes", path.display())));
            }
            return Ok(count);
        }
        r.bytes(&mut k)?;
        r.bytes(&mut v)?;
        each(id, &k, &v)?;
        count += 1;
    }
}

/// Check a snapshot file completely (structure, record shapes, digest) before it touches the state.
pub(super) fn verify(path: &Path) -> StoreResult<u64> {
    walk(path, check_record)
}

/// Insert every record of a verified snapshot file into the (emptied) state tables.
pub(super) fn load(path: &Path, t: &mut StateTxn<'_>) -> StoreResult<u64> {
    walk(path, |id, k, v| t.insert_raw(id, k, v))
}

fn sync_dir(dir: &Path) -> StoreResult<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(fault)
}

/// Stream `view` into `<dir>/<id>.snap`.
pub(super) fn write(dir: &Path, id: &str, header: &[u8], view: &ReadView) -> StoreResult<SnapshotInfo> {
    check_id(id)?;
    let tmp = dir.join(format!("{id}.tmp"));
    let path = dir.join(format!("{id}.snap"));
    let f = File::create(&tmp).map_err(fault)?;
    let mut w = HashWriter { inner: BufWriter::with_capacity(1 << 20, f), hash: Sha256::new() };
    let io = |e: std::io::Error| StoreFault(format!("writing snapshot {}: {e}", tmp.display()));
    w.write_all(MAGIC).map_err(io)?;
    w.write_all(&(header.len() as u32).to_le_bytes()).map_err(io)?;
    w.write_all(header).map_err(io)?;
    let mut count = 0u64;
    dump_state(view, BlockOrder::Stored, &mut |id, k, v| {
        if k.len() > MESSAGE_BYTES_MAX || v.len() > MESSAGE_BYTES_MAX {
            return Err(StoreFault("state record larger than the snapshot record limit".into()));
        }
        w.write_all(&[id]).map_err(io)?;
        w.write_all(&(k.len() as u32).to_le_bytes()).map_err(io)?;
        w.write_all(k).map_err(io)?;
        w.write_all(&(v.len() as u32).to_le_bytes()).map_err(io)?;
        w.write_all(v).map_err(io)?;
        count += 1;
        Ok(())
    })?;
    w.write_all(&[END]).map_err(io)?;
    w.write_all(&count.to_le_bytes()).map_err(io)?;
    let digest: [u8; 32] = w.hash.clone().finalize().into();
    let mut inner = w.inner;
    inner.write_all(&digest).map_err(io)?;
    let f = inner.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io)?;
    sync_dir(dir)?;
    Ok(SnapshotInfo { id: id.to_string(), path, header: header.to_vec() })
}

/// Make `src` the snapshot file `<dir>/<id>.snap`: rename it if it is a file we are receiving,
/// copy it otherwise (a handle from elsewhere), keep it if it already is that file.
///
/// The file is verified completely (magic, record shapes, count, digest, no trailing bytes)
/// before the rename that adopts it: a bad file never takes the place of a snapshot (the current
/// one may have the same id) nor survives to be picked by `scan` at the next open. A refused file
/// we were receiving is deleted; the caller's state and current snapshot stay as they were.
pub(super) fn adopt(dir: &Path, src: &Path, id: &str) -> StoreResult<SnapshotInfo> {
    check_id(id)?;
    let path = dir.join(format!("{id}.snap"));
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    let refuse = |e: StoreFault| {
        tracing::error!(id, src = %src.display(), error = %e.0, "received snapshot refused");
        StoreFault(format!("snapshot {id} refused (current snapshot and state unchanged): {}", e.0))
    };
    if same(src, &path) {
        verify(&path).map_err(refuse)?;
    } else {
        let ours = src.parent().is_some_and(|p| same(p, dir))
            && src.extension().is_some_and(|e| e == "part");
        // The file the rename adopts: ours in place, otherwise a private copy (verified after
        // copying, so what is checked is what is kept).
        let staged = if ours {
            src.to_path_buf()
        } else {
            let tmp = dir.join(format!("{id}.tmp"));
            std::fs::copy(src, &tmp).map_err(fault)?;
            tmp
        };
        let checked = verify(&staged).and_then(|_| File::open(&staged).and_then(|f| f.sync_all()).map_err(fault));
        if let Err(e) = checked {
            if let Err(err) = std::fs::remove_file(&staged) {
                tracing::warn!(path = %staged.display(), error = %err, "could not remove a refused snapshot file");
            }
            return Err(refuse(e));
        }
        std::fs::rename(&staged, &path).map_err(fault)?;
        sync_dir(dir)?;
    }
    let header = read_header(&path)?;
    Ok(SnapshotInfo { id: id.to_string(), path, header })
}

/// Delete every snapshot file but `keep` (and leftover temp files).
pub(super) fn remove_others(dir: &Path, keep: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if (ext == "snap" || ext == "tmp") && p != keep {
            if let Err(err) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %err, "could not remove an old snapshot file");
            }
        }
    }
}

/// At open: find the newest complete snapshot, delete partial and older files.
pub(super) fn scan(dir: &Path) -> StoreResult<Option<SnapshotInfo>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(dir).map_err(fault)?.flatten() {
        let p = e.path();
        match p.extension().and_then(|e| e.to_str()) {
            Some("snap") => {
                let t = e.metadata().and_then(|m| m.modified()).map_err(fault)?;
                if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                    best = Some((t, p));
                }
            }
            Some("tmp") | Some("part") => {
                let _ = std::fs::remove_file(&p);
            }
            _ => {}
        }
    }
    let Some((_, path)) = best else { return Ok(None) };
    remove_others(dir, &path);
    let id = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
    let header = read_header(&path)?;
    Ok(Some(SnapshotInfo { id, path, header }))
}

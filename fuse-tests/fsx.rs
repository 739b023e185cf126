//! fsx-style random file operations checked against a reference directory on the local disk:
//! the kernel's own filesystem is the oracle. Every operation runs on the reference and on
//! Pickbox, their results (byte counts, errno) must agree, and then the files it touched are
//! read back and compared byte for byte (size and link count too).
//!
//! - `cluster_random_file_operations_agree_with_a_local_filesystem`: each operation on a random
//!   node of a 3-node cluster (open, operate, close), each check on another random node (open,
//!   read, close: close-to-open), with the kernel caches of all three nodes in play.
//! - `random_file_operations_through_open_descriptors_agree_with_a_local_filesystem`: one node,
//!   descriptors kept open across operations, renames and unlinks (one kernel: every view is
//!   coherent at once, open-unlinked files included).
//!
//! Operations: pwrite, O_APPEND write, O_TRUNC create, ftruncate and truncate(2), the fallocate
//! modes, copy_file_range (also within one file), writes through a shared mapping, rename, link,
//! unlink. Offsets favour 64 KiB block boundaries and the end of file.
//!
//! The namespace tests (`*_random_namespace_operations_*`) do the same for a small tree:
//! mkdir, rmdir, create, symlink (some through others, some dangling), link, unlink, renameat2
//! (plain, NOREPLACE, EXCHANGE), chmod (setuid, setgid, sticky), chown and utimensat (both also
//! of a symlink itself), setxattr and removexattr, comparing the whole tree (kinds, modes,
//! owners, link counts, contents, symlink targets, xattrs) after each step, in a cluster on a
//! random node; the times a utimensat set are checked on its node at once, and on the checking
//! node too unless they are a regular file's (those may follow up to 20 ms later, see
//! docs/SEMANTICS.md).
//!
//! The seed is random and printed; `PICKBOX_FSX_SEED=N` replays a run, `PICKBOX_FSX_STEPS=N`
//! sets its length.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cluster_harness::{Cluster, ClusterOptions, CONVERGE_TIMEOUT};
use crate::harness::{check, Node};

/// The names operations work on (a small set, so that operations keep meeting each other's files).
const NAMES: [&str; 4] = ["a", "b", "c", "d"];
/// Pickbox's block size: offsets near its multiples are favoured.
const BLOCK: u64 = 64 * 1024;
/// Files stay around this size (offsets and lengths are drawn below it, appends may pass it).
const SIZE_MAX: u64 = 9 * BLOCK + 1234;
/// Longest ordinary write.
const WRITE_MAX: u64 = 3 * BLOCK;
/// The range of the occasional large write.
const BIG_WRITE_MIN: u64 = 1024 * 1024;
const BIG_WRITE_MAX: u64 = 3 * 1024 * 1024 + 4321;
/// Descriptors the single-node test keeps open at once.
const SLOTS: usize = 4;
/// How many recent steps a failure message lists.
const HISTORY: usize = 40;

/// Where an operation acts: a name (opened for the operation and closed after it) or a slot's
/// open descriptor.
#[derive(Clone, Copy, Debug)]
enum Target {
    Name(&'static str),
    Slot(usize),
}

#[derive(Clone, Debug)]
enum Op {
    /// open(O_RDWR) into a slot (closing what the slot held).
    Open { slot: usize, name: &'static str },
    Close { slot: usize },
    /// open(O_WRONLY|O_CREAT|O_TRUNC).
    Create { name: &'static str },
    Write { at: Target, off: u64, data: Vec<u8> },
    Append { name: &'static str, data: Vec<u8> },
    Truncate { at: Target, len: u64 },
    Fallocate { at: Target, mode: i32, off: u64, len: u64 },
    CopyRange { src: &'static str, src_off: u64, dst: Target, dst_off: u64, len: u64 },
    /// Writes through a shared mapping of [0, off + data.len()), then msync(MS_SYNC).
    MapWrite { at: Target, off: u64, data: Vec<u8> },
    Rename { from: &'static str, to: &'static str },
    Link { from: &'static str, to: &'static str },
    Unlink { name: &'static str },
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { at, off, data } => write!(f, "write {at:?} off {off} len {}", data.len()),
            Op::Append { name, data } => write!(f, "append {name} len {}", data.len()),
            Op::MapWrite { at, off, data } => write!(f, "mmap write {at:?} off {off} len {}", data.len()),
            other => write!(f, "{other:?}"),
        }
    }
}

impl Op {
    /// The names whose content or existence the operation may change.
    fn touched(&self, slots: &[Option<&'static str>]) -> Vec<&'static str> {
        let of = |t: &Target| match t {
            Target::Name(n) => Some(*n),
            Target::Slot(s) => slots[*s],
        };
        match self {
            Op::Open { .. } | Op::Close { .. } => vec![],
            Op::Create { name } | Op::Append { name, .. } | Op::Unlink { name } => vec![name],
            Op::Write { at, .. } | Op::Truncate { at, .. } | Op::Fallocate { at, .. } | Op::MapWrite { at, .. } => {
                of(at).into_iter().collect()
            }
            Op::CopyRange { dst, .. } => of(dst).into_iter().collect(),
            Op::Rename { from, to } | Op::Link { from, to } => vec![from, to],
        }
    }
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}"))
}

/// One side of the comparison: a directory and the descriptors held open in it.
struct Side {
    dir: PathBuf,
    slots: Vec<Option<File>>,
}

impl Side {
    fn new(dir: PathBuf) -> Side {
        Side { dir, slots: (0..SLOTS).map(|_| None).collect() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Runs `f` on the descriptor `at` names: the slot's, or `name` opened with `opts` for the call.
    fn with_file<T>(&self, at: Target, opts: &OpenOptions, f: impl FnOnce(&File) -> io::Result<T>) -> Result<T, i32> {
        match at {
            Target::Slot(s) => f(self.slots[s].as_ref().expect("slot is open")).map_err(errno),
            Target::Name(n) => {
                let file = opts.open(self.path(n)).map_err(errno)?;
                let r = f(&file).map_err(errno);
                let closed = crate::cluster::close(file).map_err(errno);
                let v = r?;
                closed?;
                Ok(v)
            }
        }
    }

    /// Before an operation that opens no file (truncate(2), rename, link, unlink): in a cluster a
    /// name this node's kernel caches leads to what it named before another node's latest
    /// change until this node has applied that change, and the kernel answers some of these from
    /// its cached names (docs/SEMANTICS.md, changes by path without an open). Opening the
    /// directory catches up first, as an open of a file does.
    fn catch_up(&self) -> Result<(), i32> {
        File::open(&self.dir).map(drop).map_err(errno)
    }

    /// Runs `op`; Ok(bytes moved) or the errno.
    fn run(&mut self, op: &Op) -> Result<u64, i32> {
        let rw = || {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            o
        };
        let wo = || {
            let mut o = OpenOptions::new();
            o.write(true);
            o
        };
        match op {
            Op::Open { slot, name } => {
                self.slots[*slot] = None;
                self.slots[*slot] = Some(rw().open(self.path(name)).map_err(errno)?);
                Ok(0)
            }
            Op::Close { slot } => {
                let f = self.slots[*slot].take().expect("slot is open");
                crate::cluster::close(f).map_err(errno).map(|_| 0)
            }
            Op::Create { name } => {
                let f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(self.path(name));
                crate::cluster::close(f.map_err(errno)?).map_err(errno).map(|_| 0)
            }
            Op::Write { at, off, data } => {
                self.with_file(*at, &wo(), |f| f.write_all_at(data, *off)).map(|_| data.len() as u64)
            }
            Op::Append { name, data } => {
                let mut o = OpenOptions::new();
                o.append(true);
                self.with_file(Target::Name(name), &o, |mut f| io::Write::write_all(&mut f, data))
                    .map(|_| data.len() as u64)
            }
            Op::Truncate { at: Target::Name(name), len } => {
                self.catch_up()?;
                let p = CString::new(self.path(name).as_os_str().as_bytes()).unwrap();
                // SAFETY: p is a valid NUL-terminated path.
                check(unsafe { libc::truncate(p.as_ptr(), *len as libc::off_t) }).map_err(errno).map(|_| 0)
            }
            Op::Truncate { at, len } => self.with_file(*at, &wo(), |f| f.set_len(*len)).map(|_| 0),
            Op::Fallocate { at, mode, off, len } => self
                .with_file(*at, &wo(), |f| {
                    // SAFETY: fallocate on a descriptor we own.
                    check(unsafe { libc::fallocate(f.as_raw_fd(), *mode, *off as libc::off_t, *len as libc::off_t) })
                })
                .map(|_| 0),
            Op::CopyRange { src, src_off, dst, dst_off, len } => {
                let from = File::open(self.path(src)).map_err(errno)?;
                let r = self.with_file(*dst, &wo(), |to| copy_range(&from, *src_off, to, *dst_off, *len));
                drop(from);
                r
            }
            Op::MapWrite { at, off, data } => self.with_file(*at, &rw(), |f| map_write(f, *off, data)),
            Op::Rename { from, to } => {
                self.catch_up()?;
                fs::rename(self.path(from), self.path(to)).map_err(errno).map(|_| 0)
            }
            Op::Link { from, to } => {
                self.catch_up()?;
                fs::hard_link(self.path(from), self.path(to)).map_err(errno).map(|_| 0)
            }
            Op::Unlink { name } => {
                self.catch_up()?;
                fs::remove_file(self.path(name)).map_err(errno).map(|_| 0)
            }
        }
    }
}

/// copy_file_range until `len` bytes are copied or the source (as it ends now) ends; the total copied.
fn copy_range(from: &File, src_off: u64, to: &File, dst_off: u64, len: u64) -> io::Result<u64> {
    let (mut off_in, mut off_out) = (src_off as libc::loff_t, dst_off as libc::loff_t);
    let mut done = 0u64;
    // Up to the source's end as it is now: a copy to just past the end of the same file (through
    // another name) grows the source as it goes, and further calls would copy a few bytes each.
    let len = len.min(from.metadata()?.len().saturating_sub(src_off));
    while done < len {
        // SAFETY: both descriptors are open; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut off_in, to.as_raw_fd(), &mut off_out, (len - done) as usize, 0)
        };
        let n = check(n)? as u64;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

/// Writes `data` at `off` through a shared mapping of the file (which must be long enough: a
/// store past the end of file would be SIGBUS), then msync(MS_SYNC).
fn map_write(f: &File, off: u64, data: &[u8]) -> io::Result<u64> {
    let size = f.metadata()?.len();
    let end = off + data.len() as u64;
    if end > size || data.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ERANGE));
    }
    // SAFETY: a fresh shared mapping of [0, end) of a file at least that long; unmapped below.
    unsafe {
        let p = libc::mmap(std::ptr::null_mut(), end as usize, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0);
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(off as usize), data.len());
        let synced = check(libc::msync(p, end as usize, libc::MS_SYNC));
        libc::munmap(p, end as usize);
        synced?;
    }
    Ok(data.len() as u64)
}

/// What a file looks like from one side: content, and size and link count from fstat.
#[derive(PartialEq)]
struct Seen {
    size: u64,
    nlink: u64,
    data: Vec<u8>,
}

/// Opens `p`, reads it whole (by read(2), or through a mapping when `mapped`), closes it.
fn look(p: &Path, mapped: bool) -> Result<Seen, i32> {
    let mut f = File::open(p).map_err(errno)?;
    let md = f.metadata().map_err(errno)?;
    let data = if mapped && md.len() > 0 {
        // SAFETY: a read-only shared mapping of the file's length, copied out and unmapped at once.
        unsafe {
            let len = md.len() as usize;
            let m = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
            if m == libc::MAP_FAILED {
                return Err(errno(io::Error::last_os_error()));
            }
            let v = std::slice::from_raw_parts(m as *const u8, len).to_vec();
            libc::munmap(m, len);
            v
        }
    } else {
        let mut v = Vec::new();
        f.read_to_end(&mut v).map_err(errno)?;
        v
    };
    crate::cluster::close(f).map_err(errno)?;
    Ok(Seen { size: md.len(), nlink: md.nlink(), data })
}

/// Everything visible through a held descriptor: size from fstat, content by pread.
fn look_fd(f: &File) -> Result<Seen, i32> {
    let md = f.metadata().map_err(errno)?;
    let mut data = vec![0u8; md.len() as usize + 100];
    let mut got = 0;
    loop {
        let n = f.read_at(&mut data[got..], got as u64).map_err(errno)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    data.truncate(got);
    Ok(Seen { size: md.len(), nlink: md.nlink(), data })
}

/// Why two views differ, in a line.
fn differ(want: &Result<Seen, i32>, got: &Result<Seen, i32>) -> Option<String> {
    match (want, got) {
        (Ok(w), Ok(g)) if w == g => None,
        (Err(a), Err(b)) if a == b => None,
        (Ok(w), Ok(g)) => {
            let first = w.data.iter().zip(&g.data).position(|(a, b)| a != b);
            Some(format!(
                "reference size {} nlink {} ({} bytes read), pickbox size {} nlink {} ({} bytes read); first differing \
                 byte at {:?}",
                w.size,
                w.nlink,
                w.data.len(),
                g.size,
                g.nlink,
                g.data.len(),
                first
            ))
        }
        (w, g) => Some(format!(
            "reference {}, pickbox {}",
            w.as_ref().map(|s| format!("{} bytes", s.size)).unwrap_or_else(|e| format!("errno {e}")),
            g.as_ref().map(|s| format!("{} bytes", s.size)).unwrap_or_else(|e| format!("errno {e}"))
        )),
    }
}

fn listing(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

/// The random generator of operations, drawn against the reference's current state.
struct Gen {
    rng: StdRng,
    seed: u64,
    history: Vec<String>,
}

impl Gen {
    fn new(default_steps: usize) -> (Gen, usize) {
        let seed = std::env::var("PICKBOX_FSX_SEED").ok().map(|s| s.parse().expect("PICKBOX_FSX_SEED is a u64")).unwrap_or_else(
            || {
                let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
                t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
            },
        );
        let steps = std::env::var("PICKBOX_FSX_STEPS").ok().map(|s| s.parse().expect("PICKBOX_FSX_STEPS is a number"));
        eprintln!("fsx seed {seed} (replay with PICKBOX_FSX_SEED={seed})");
        (Gen::with_seed(seed), steps.unwrap_or(default_steps))
    }

    fn with_seed(seed: u64) -> Gen {
        Gen { rng: StdRng::seed_from_u64(seed), seed, history: Vec::new() }
    }

    fn name(&mut self) -> &'static str {
        NAMES[self.rng.random_range(0..NAMES.len())]
    }

    /// An offset that often sits at or next to a block boundary or the current size.
    fn offset(&mut self, size: u64) -> u64 {
        let r = &mut self.rng;
        match r.random_range(0..4) {
            0 => r.random_range(0..=SIZE_MAX),
            1 => {
                let b = r.random_range(0..=SIZE_MAX / BLOCK) * BLOCK;
                (b + r.random_range(0..3)).saturating_sub(r.random_range(0..3))
            }
            2 => (size + r.random_range(0..3)).saturating_sub(r.random_range(0..3)),
            _ => r.random_range(0..=size),
        }
    }

    fn length(&mut self, max: u64) -> u64 {
        let r = &mut self.rng;
        match r.random_range(0..4) {
            0 => r.random_range(1..=16),
            1 => BLOCK + r.random_range(0..3) - 1,
            _ => r.random_range(1..=max),
        }
    }

    fn bytes(&mut self, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        self.rng.fill(&mut v[..]);
        // Runs of zeros now and then: whole zero blocks are holes in Pickbox.
        if self.rng.random_bool(0.2) {
            let a = self.rng.random_range(0..v.len());
            let b = self.rng.random_range(a..=v.len());
            v[a..b].fill(0);
        }
        v
    }

    /// Where a data operation acts: a name, or (when `slots` has open ones) sometimes a held descriptor.
    fn target(&mut self, slots: &[Option<&'static str>]) -> Target {
        let open: Vec<usize> = (0..slots.len()).filter(|s| slots[*s].is_some()).collect();
        if !open.is_empty() && self.rng.random_bool(0.5) {
            Target::Slot(open[self.rng.random_range(0..open.len())])
        } else {
            Target::Name(self.name())
        }
    }

    /// The next operation. `size_of` gives the reference's size of a target (0 when missing);
    /// `slots` the names the held descriptors were opened under (empty: no descriptors).
    fn op(&mut self, slots: &[Option<&'static str>], size_of: impl Fn(Target) -> u64) -> Op {
        let with_slots = !slots.is_empty();
        loop {
            let kind = self.rng.random_range(0..100);
            let op = match kind {
                0..=24 => {
                    let at = self.target(slots);
                    let off = self.offset(size_of(at));
                    // Now and then a write of MiBs: the kernel sends it as 1 MiB WRITEs, which
                    // take the log's direct-I/O path and the apply's blocking-thread path.
                    let len = if self.rng.random_bool(0.03) {
                        self.rng.random_range(BIG_WRITE_MIN..=BIG_WRITE_MAX)
                    } else {
                        self.length(WRITE_MAX)
                    };
                    Op::Write { at, off, data: self.bytes(len) }
                }
                25..=31 => {
                    let len = self.length(WRITE_MAX / 2);
                    Op::Append { name: self.name(), data: self.bytes(len) }
                }
                32..=36 => Op::Create { name: self.name() },
                37..=44 => {
                    let at = self.target(slots);
                    let len = self.offset(size_of(at));
                    Op::Truncate { at, len }
                }
                45..=54 => {
                    let at = self.target(slots);
                    let modes = [
                        0,
                        libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        libc::FALLOC_FL_ZERO_RANGE,
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    ];
                    let mode = modes[self.rng.random_range(0..modes.len())];
                    let off = self.offset(size_of(at));
                    let len = self.length(WRITE_MAX);
                    Op::Fallocate { at, mode, off, len }
                }
                55..=64 => {
                    let src = self.name();
                    let src_off = self.offset(size_of(Target::Name(src)));
                    let dst = self.target(slots);
                    let dst_off = self.offset(size_of(dst));
                    let len = self.length(WRITE_MAX);
                    Op::CopyRange { src, src_off, dst, dst_off, len }
                }
                65..=71 => {
                    let at = self.target(slots);
                    let size = size_of(at);
                    if size == 0 {
                        continue;
                    }
                    let off = self.rng.random_range(0..size);
                    let len = self.rng.random_range(1..=(size - off).min(WRITE_MAX));
                    Op::MapWrite { at, off, data: self.bytes(len) }
                }
                72..=76 => Op::Rename { from: self.name(), to: self.name() },
                77..=80 => Op::Link { from: self.name(), to: self.name() },
                81..=85 => Op::Unlink { name: self.name() },
                86..=95 if with_slots => Op::Open { slot: self.rng.random_range(0..slots.len()), name: self.name() },
                _ if with_slots => {
                    let open: Vec<usize> = (0..slots.len()).filter(|s| slots[*s].is_some()).collect();
                    if open.is_empty() {
                        continue;
                    }
                    Op::Close { slot: open[self.rng.random_range(0..open.len())] }
                }
                _ => continue,
            };
            return op;
        }
    }

    fn record(&mut self, line: String) {
        self.history.push(line);
        if self.history.len() > HISTORY {
            self.history.remove(0);
        }
    }

    fn fail(&self, step: usize, what: String) -> ! {
        panic!(
            "fsx seed {} step {step}: {what}\nlast steps:\n  {}\n(replay with PICKBOX_FSX_SEED={})",
            self.seed,
            self.history.join("\n  "),
            self.seed
        );
    }
}

/// The reference's size of a name (0 when it does not exist).
fn size_at(dir: &Path, name: &str) -> u64 {
    fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0)
}

/// One operation on a random node of `on_nodes`, then a check of what it touched on another
/// random one (open, read, close).
fn cluster_file_step(c: &Cluster, g: &mut Gen, want: &mut Side, dir: &str, step: usize, on_nodes: &[u64]) {
    let op = name_op(g, want);
    let on = on_nodes[g.rng.random_range(0..on_nodes.len())];
    run_both(g, want, c.path(on, dir), &op, step, &format!("node {on}: "));
    let by = on_nodes[g.rng.random_range(0..on_nodes.len())];
    let mapped = g.rng.random_bool(0.25);
    for name in op.touched(&[]) {
        let diff = differ(&look(&want.path(name), false), &look(&c.path(by, &format!("{dir}/{name}")), mapped));
        if let Some(d) = diff {
            g.fail(step, format!("{name} read on node {by} (mapped {mapped}) after the step on node {on}: {d}"));
        }
    }
}

/// A name-only operation (no held descriptors), drawn against the reference.
fn name_op(g: &mut Gen, want: &Side) -> Op {
    g.op(&[], |t| match t {
        Target::Name(n) => size_at(&want.dir, n),
        Target::Slot(_) => unreachable!(),
    })
}

/// Runs `op` on the reference and in `dir` (`who` says where, for the history); both must give
/// the same result.
fn run_both(g: &mut Gen, want: &mut Side, dir: PathBuf, op: &Op, step: usize, who: &str) {
    let w = want.run(op);
    let got = Side::new(dir).run(op);
    g.record(format!("{step}: {who}{op} -> {w:?}"));
    if w != got {
        g.fail(step, format!("{who}{op}: reference {w:?}, pickbox {got:?}"));
    }
}

/// Every name in `dir` against the reference: the listing and each file's content, size and
/// link count.
fn full_check(g: &Gen, want: &Side, dir: &Path, step: usize, who: &str) {
    let (l, r) = (listing(&want.dir), listing(dir));
    if l != r {
        g.fail(step, format!("{who}: lists {r:?}, the reference {l:?}"));
    }
    for name in NAMES {
        if let Some(d) = differ(&look(&want.path(name), false), &look(&dir.join(name), false)) {
            g.fail(step, format!("{who}: {name}: {d}"));
        }
    }
}

/// `full_check` of node `k`.
fn cluster_full_check(c: &Cluster, g: &Gen, want: &Side, dir: &str, step: usize, k: u64) {
    full_check(g, want, &c.path(k, dir), step, &format!("full check on node {k}"));
}

#[test]
fn cluster_random_file_operations_agree_with_a_local_filesystem() {
    let mut c = Cluster::new(3);
    let (mut g, steps) = Gen::new(1000);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let mut want = Side::new(reference.path().to_path_buf());
    fs::create_dir(c.path(1, "fsx")).unwrap();
    let ids = c.ids();
    for step in 0..steps {
        cluster_file_step(&c, &mut g, &mut want, "fsx", step, &ids);
        if step % 50 == 49 || step + 1 == steps {
            for k in &ids {
                cluster_full_check(&c, &g, &want, "fsx", step, *k);
            }
        }
    }
    c.wait_converged(CONVERGE_TIMEOUT);
}

/// Writers at once in `cluster_concurrent_random_file_operations_agree_with_a_local_filesystem`.
const CONCURRENT_WRITERS: u64 = 4;

/// Several writers at once, each with files of its own (so each one's operations stay in order
/// and its reference stays exact), each operation on a random node: their commands share Raft
/// entries (the batcher), interleave in the log and in every node's invalidations. Writer i's
/// seed is the printed seed plus i.
#[test]
fn cluster_concurrent_random_file_operations_agree_with_a_local_filesystem() {
    let mut c = Cluster::new(3);
    let (g, steps) = Gen::new(300);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let ids = c.ids();
    let writers: Vec<(String, Side, Gen)> = (0..CONCURRENT_WRITERS)
        .map(|i| {
            let dir = format!("fsx{i}");
            fs::create_dir(c.path(1, &dir)).unwrap();
            let want = reference.path().join(&dir);
            fs::create_dir(&want).unwrap();
            (dir, Side::new(want), Gen::with_seed(g.seed.wrapping_add(i)))
        })
        .collect();
    let done: Vec<(String, Side, Gen)> = std::thread::scope(|scope| {
        let running: Vec<_> = writers
            .into_iter()
            .map(|(dir, mut want, mut g)| {
                let (c, ids) = (&c, &ids);
                scope.spawn(move || {
                    for step in 0..steps {
                        cluster_file_step(c, &mut g, &mut want, &dir, step, ids);
                    }
                    (dir, want, g)
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    c.wait_converged(CONVERGE_TIMEOUT);
    for (dir, want, g) in &done {
        for k in &ids {
            cluster_full_check(&c, g, want, dir, steps, *k);
        }
    }
}

/// A random workload on a cluster, for `with_restarts`.
trait Workload {
    /// One operation on a random node of `on`, checked on a random node of `on`.
    fn step(&mut self, c: &Cluster, g: &mut Gen, step: usize, on: &[u64]);
    /// Everything, on node `k`.
    fn check_all(&mut self, c: &Cluster, g: &Gen, step: usize, k: u64);
}

struct Files {
    want: Side,
}

impl Workload for Files {
    fn step(&mut self, c: &Cluster, g: &mut Gen, step: usize, on: &[u64]) {
        cluster_file_step(c, g, &mut self.want, "fsx", step, on);
    }
    fn check_all(&mut self, c: &Cluster, g: &Gen, step: usize, k: u64) {
        cluster_full_check(c, g, &self.want, "fsx", step, k);
    }
}

/// Steps between two restarts in `with_restarts`, and steps run while the node is down.
const STEPS_BETWEEN_RESTARTS: usize = 60;
const STEPS_WHILE_DOWN: usize = 25;
/// `--snapshot-entries` of the restart tests: the log is compacted under a stopped node, which
/// then catches up by snapshot.
const RESTART_SNAPSHOT_ENTRIES: u64 = 40;

/// Runs `work` while nodes are killed (`kill -9`) or stopped and started again, the leader too.
/// Every operation returned before the stop, so all of it must be on the restarted node once it
/// has caught up. At the end a fourth node joins and must have everything.
fn with_restarts(c: &mut Cluster, g: &mut Gen, steps: usize, work: &mut dyn Workload) {
    let ids = c.ids();
    let mut step = 0;
    while step < steps {
        for _ in 0..STEPS_BETWEEN_RESTARTS {
            work.step(c, g, step, &ids);
            step += 1;
        }
        let k = ids[g.rng.random_range(0..ids.len())];
        let kill = g.rng.random_bool(0.5);
        g.record(format!("{step}: {} node {k}", if kill { "kill -9" } else { "stop" }));
        if kill {
            // True when the process is stuck on its FUSE connection: the start clears it.
            let _stuck = c.kill9(k);
        } else {
            c.stop(k);
        }
        // The others elect a leader (if it was k) before operations go on: an operation that
        // times out (EIO) would leave its outcome unknown.
        c.wait_leader(Duration::from_secs(30), Some(k));
        let up: Vec<u64> = ids.iter().copied().filter(|i| *i != k).collect();
        for _ in 0..STEPS_WHILE_DOWN {
            work.step(c, g, step, &up);
            step += 1;
        }
        c.start(k);
        // A restarted node serves opens from what it has applied once a read index takes too
        // long (docs/SEMANTICS.md): wait until it has caught up.
        c.wait_converged(CONVERGE_TIMEOUT);
        g.record(format!("{step}: node {k} back"));
        work.check_all(c, g, step, k);
    }
    for k in &ids {
        work.check_all(c, g, step, *k);
    }
    // A node that joins now starts from a snapshot (the log was compacted long ago).
    let new = c.add_node();
    c.wait_converged(CONVERGE_TIMEOUT);
    g.record(format!("{step}: node {new} joined"));
    work.check_all(c, g, step, new);
}

#[test]
fn cluster_random_file_operations_survive_restarts() {
    let mut c = Cluster::with(ClusterOptions { snapshot_entries: Some(RESTART_SNAPSHOT_ENTRIES), ..ClusterOptions::default() });
    let (mut g, steps) = Gen::new(600);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    fs::create_dir(c.path(1, "fsx")).unwrap();
    let mut work = Files { want: Side::new(reference.path().to_path_buf()) };
    with_restarts(&mut c, &mut g, steps, &mut work);
}

/// A single node killed (`kill -9`) or stopped and started again every 60 operations, with a
/// snapshot every 40 entries: a sole voter writes its log on another path than a node of a
/// cluster (inline appends), and every operation returned before the stop must be there after.
#[test]
fn random_file_operations_survive_restarts_of_a_single_node() {
    let args = vec!["--snapshot-entries".into(), RESTART_SNAPSHOT_ENTRIES.to_string().into()];
    let mut node = Node::prepare(args, Some(crate::harness::Permit::acquire()), None, "pickbox-fuse-test-");
    node.spawn();
    let (mut g, steps) = Gen::new(400);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let mut want = Side::new(reference.path().to_path_buf());
    fs::create_dir(node.path("fsx")).unwrap();
    let mut step = 0;
    while step < steps {
        for _ in 0..STEPS_BETWEEN_RESTARTS {
            let op = name_op(&mut g, &want);
            run_both(&mut g, &mut want, node.path("fsx"), &op, step, "");
            step += 1;
        }
        let kill = g.rng.random_bool(0.5);
        g.record(format!("{step}: {}", if kill { "kill -9" } else { "stop" }));
        if kill {
            // True when the process is stuck on its FUSE connection: the start clears it.
            let _stuck = node.kill9();
        } else {
            node.stop();
        }
        node.spawn();
        full_check(&g, &want, &node.path("fsx"), step, "after the restart");
    }
}

#[test]
fn random_file_operations_through_open_descriptors_agree_with_a_local_filesystem() {
    let node = Node::start();
    let (mut g, steps) = Gen::new(3000);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let mut want = Side::new(reference.path().to_path_buf());
    fs::create_dir(node.path("fsx")).unwrap();
    let mut got_side = Side::new(node.path("fsx"));
    // The name each slot was opened under (the file may have been renamed or unlinked since).
    let mut slot_names: Vec<Option<&'static str>> = vec![None; SLOTS];
    for step in 0..steps {
        let op = g.op(&slot_names, |t| match t {
            Target::Name(n) => size_at(&want.dir, n),
            Target::Slot(s) => want.slots[s].as_ref().unwrap().metadata().unwrap().len(),
        });
        let w = want.run(&op);
        let got = got_side.run(&op);
        g.record(format!("{step}: {op} -> {w:?}"));
        if w != got {
            g.fail(step, format!("{op}: reference {w:?}, pickbox {got:?}"));
        }
        match (&op, &w) {
            (Op::Open { slot, name }, Ok(_)) => slot_names[*slot] = Some(name),
            (Op::Open { slot, .. }, Err(_)) | (Op::Close { slot }, _) => slot_names[*slot] = None,
            _ => {}
        }
        for name in op.touched(&slot_names) {
            let mapped = g.rng.random_bool(0.25);
            if let Some(d) = differ(&look(&want.path(name), false), &look(&got_side.path(name), mapped)) {
                g.fail(step, format!("{name} (mapped {mapped}): {d}"));
            }
        }
        // Every held descriptor sees what the reference's sees (open-unlinked files included).
        for s in 0..SLOTS {
            if let (Some(wf), Some(gf)) = (&want.slots[s], &got_side.slots[s]) {
                if let Some(d) = differ(&look_fd(wf), &look_fd(gf)) {
                    g.fail(step, format!("slot {s} (opened as {:?}): {d}", slot_names[s]));
                }
            }
        }
    }
    for s in 0..SLOTS {
        if slot_names[s].is_some() {
            want.run(&Op::Close { slot: s }).unwrap();
            if let Err(e) = got_side.run(&Op::Close { slot: s }) {
                g.fail(steps, format!("closing slot {s}: errno {e}"));
            }
        }
    }
    assert_eq!(listing(&want.dir), listing(&got_side.dir));
}

// ---- The namespace: directories, symlinks, hard links, renames, modes and xattrs ----

/// Path components: paths are one to three of these.
const PARTS: [&str; 3] = ["p", "q", "r"];
/// Symlink targets (relative; some lead nowhere, some through other symlinks or up a level).
const TARGETS: [&str; 5] = ["p", "q/r", "../p", "nowhere", "r"];
/// Modes chmod sets (setuid, setgid and sticky included).
const MODES: [u32; 6] = [0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777];
/// xattr names (user namespace: allowed on files and directories on ext4 too).
const XATTRS: [&str; 2] = ["user.k1", "user.k2"];
/// Owners chown gives (root, a regular user id, nobody), and groups.
const OWNERS: [u32; 3] = [0, 1000, 65534];
/// Times utimensat sets (seconds, nanoseconds): before the epoch, odd nanoseconds, far ahead.
const TIMES: [(i64, i64); 4] = [(1, 0), (-1_000_000, 999_999_999), (1_700_000_000, 123_456_789), (4_000_000_000, 1)];

#[derive(Clone, Debug)]
enum TreeOp {
    Mkdir(String, u32),
    Rmdir(String),
    /// open(O_WRONLY|O_CREAT|O_TRUNC, 0644), write, close.
    Create(String, Vec<u8>),
    Symlink(&'static str, String),
    Link(String, String),
    Unlink(String),
    /// renameat2 with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    Rename(String, String, u32),
    Chmod(String, u32),
    /// fchownat(uid, gid), of a symlink itself if the flag says so (AT_SYMLINK_NOFOLLOW).
    Chown(String, u32, u32, bool),
    /// utimensat(atime, mtime) with explicit times, of a symlink itself if the flag says so.
    Utimens(String, (i64, i64), (i64, i64), bool),
    SetXattr(String, &'static str, Vec<u8>),
    RemoveXattr(String, &'static str),
}

impl fmt::Display for TreeOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TreeOp::Create(p, data) => write!(f, "create {p} with {} bytes", data.len()),
            TreeOp::SetXattr(p, n, v) => write!(f, "setxattr {p} {n} ({} bytes)", v.len()),
            other => write!(f, "{other:?}"),
        }
    }
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn run_tree(root: &Path, op: &TreeOp) -> Result<(), i32> {
    let at = |p: &str| root.join(p);
    let r = match op {
        TreeOp::Mkdir(p, mode) => {
            let c = c_path(&at(p));
            // SAFETY: valid path.
            check(unsafe { libc::mkdir(c.as_ptr(), *mode) }).map(|_| ())
        }
        TreeOp::Rmdir(p) => fs::remove_dir(at(p)),
        TreeOp::Create(p, data) => (|| {
            let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(at(p))?;
            io::Write::write_all(&mut f, data)?;
            crate::cluster::close(f)
        })(),
        TreeOp::Symlink(target, p) => std::os::unix::fs::symlink(target, at(p)),
        TreeOp::Link(from, to) => fs::hard_link(at(from), at(to)),
        TreeOp::Unlink(p) => fs::remove_file(at(p)),
        TreeOp::Rename(from, to, flags) => {
            let (a, b) = (c_path(&at(from)), c_path(&at(to)));
            // SAFETY: valid paths.
            check(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), *flags) }).map(|_| ())
        }
        TreeOp::Chmod(p, mode) => {
            let c = c_path(&at(p));
            // SAFETY: valid path.
            check(unsafe { libc::chmod(c.as_ptr(), *mode) }).map(|_| ())
        }
        TreeOp::Chown(p, uid, gid, nofollow) => {
            let c = c_path(&at(p));
            let flags = if *nofollow { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
            // SAFETY: valid path.
            check(unsafe { libc::fchownat(libc::AT_FDCWD, c.as_ptr(), *uid, *gid, flags) }).map(|_| ())
        }
        TreeOp::Utimens(p, atime, mtime, nofollow) => {
            let c = c_path(&at(p));
            let ts = |(sec, nsec): (i64, i64)| libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec as libc::c_long };
            let times = [ts(*atime), ts(*mtime)];
            let flags = if *nofollow { libc::AT_SYMLINK_NOFOLLOW } else { 0 };
            // SAFETY: valid path and a two-element times array.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) }).map(|_| ())
        }
        TreeOp::SetXattr(p, name, value) => {
            let (c, n) = (c_path(&at(p)), CString::new(*name).unwrap());
            // SAFETY: valid pointers and lengths.
            check(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) }).map(|_| ())
        }
        TreeOp::RemoveXattr(p, name) => {
            let (c, n) = (c_path(&at(p)), CString::new(*name).unwrap());
            // SAFETY: valid paths.
            check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
        }
    };
    r.map_err(errno)
}

/// After a utimensat that succeeded: how the times `root` shows for its target differ from those
/// it set, if they do. The mtime always; the atime where `atime_kept` (Pickbox changes atime only
/// when asked to; the reference's relatime may change it on a read). Times are not part of the
/// tree comparison: each side stamps its own changes with its own clock.
fn times_differ(root: &Path, op: &TreeOp, atime_kept: bool) -> Option<String> {
    let TreeOp::Utimens(p, atime, mtime, _) = op else { return None };
    match utimens_target(root, op)? {
        Err(e) => Some(format!("{p}: stat after utimensat: {e}")),
        Ok(md) => {
            let (a, m) = ((md.atime(), md.atime_nsec()), (md.mtime(), md.mtime_nsec()));
            (m != *mtime || (atime_kept && a != *atime)).then(|| format!("{p}: atime {a:?} mtime {m:?}, set {atime:?} {mtime:?}"))
        }
    }
}

/// Whether a utimensat's target (under `root`) is a regular file: its times set by the owner
/// right after this node's own write may reach other nodes up to `DEFERRED_TIMES_MS` later
/// (docs/SEMANTICS.md), so only the node that set them checks them at once.
fn targets_a_file(root: &Path, op: &TreeOp) -> bool {
    utimens_target(root, op).is_some_and(|md| md.is_ok_and(|md| md.file_type().is_file()))
}

/// The metadata of what a utimensat under `root` acts on (the symlink itself or what it leads
/// to, as its flag says); `None` for another op.
fn utimens_target(root: &Path, op: &TreeOp) -> Option<io::Result<fs::Metadata>> {
    let TreeOp::Utimens(p, _, _, nofollow) = op else { return None };
    let path = root.join(p);
    Some(if *nofollow { fs::symlink_metadata(&path) } else { fs::metadata(&path) })
}

/// What the tree shows of one entry: kind, permission bits, owner, link count, and the content
/// of a file, the target of a symlink, the user xattrs of a file or directory.
#[derive(Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    content: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn user_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    XATTRS
        .iter()
        .filter_map(|n| crate::meta::getxattr(p, n).ok().map(|v| (n.to_string(), v)))
        .collect()
}

/// Every entry under `dir`, by path relative to `root` (directories listed by readdir: on a
/// cluster node each opendir catches up with the leader first).
fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, Entry>) {
    let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    for name in names {
        let p = dir.join(&name);
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = match fs::symlink_metadata(&p) {
            Ok(md) => md,
            Err(e) => panic!("lstat {rel} after readdir listed it: {e}"),
        };
        let ft = md.file_type();
        let (kind, content, xattrs) = if ft.is_dir() {
            ("dir", Vec::new(), user_xattrs(&p))
        } else if ft.is_symlink() {
            ("symlink", fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(), Vec::new())
        } else {
            ("file", fs::read(&p).unwrap_or_else(|e| panic!("read {rel}: {e}")), user_xattrs(&p))
        };
        out.insert(rel, Entry { kind, mode: md.mode() & 0o7777, uid: md.uid(), gid: md.gid(), nlink: md.nlink(), content, xattrs });
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

fn tree(root: &Path) -> std::collections::BTreeMap<String, Entry> {
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The first difference between two trees, in a line.
fn tree_differs(want: &std::collections::BTreeMap<String, Entry>, got: &std::collections::BTreeMap<String, Entry>) -> Option<String> {
    for (p, w) in want {
        match got.get(p) {
            None => return Some(format!("{p} missing (reference: {} mode {:o})", w.kind, w.mode)),
            Some(g) if g != w => {
                return Some(format!(
                    "{p}: reference {} mode {:o} owner {}:{} nlink {} {} bytes xattrs {:?}, pickbox {} mode {:o} owner {}:{} nlink {} {} bytes xattrs {:?}",
                    w.kind,
                    w.mode,
                    w.uid,
                    w.gid,
                    w.nlink,
                    w.content.len(),
                    w.xattrs.iter().map(|x| &x.0).collect::<Vec<_>>(),
                    g.kind,
                    g.mode,
                    g.uid,
                    g.gid,
                    g.nlink,
                    g.content.len(),
                    g.xattrs.iter().map(|x| &x.0).collect::<Vec<_>>()
                ))
            }
            _ => {}
        }
    }
    got.keys().find(|p| !want.contains_key(*p)).map(|p| format!("{p} exists only on pickbox"))
}

impl Gen {
    /// A path: often one that exists in the reference tree, otherwise any of up to three parts.
    fn tree_path(&mut self, existing: &[String]) -> String {
        if !existing.is_empty() && self.rng.random_bool(0.6) {
            return existing[self.rng.random_range(0..existing.len())].clone();
        }
        let depth = self.rng.random_range(1..=3);
        (0..depth).map(|_| PARTS[self.rng.random_range(0..PARTS.len())]).collect::<Vec<_>>().join("/")
    }

    fn tree_op(&mut self, existing: &[String]) -> TreeOp {
        let p = self.tree_path(existing);
        match self.rng.random_range(0..100) {
            0..=17 => TreeOp::Mkdir(p, if self.rng.random_bool(0.5) { 0o755 } else { 0o700 }),
            18..=27 => TreeOp::Rmdir(p),
            28..=41 => {
                let len = self.rng.random_range(0..=3) * 1000 + self.rng.random_range(0..100);
                let data = self.bytes(len.max(1));
                TreeOp::Create(p, data)
            }
            42..=48 => TreeOp::Symlink(TARGETS[self.rng.random_range(0..TARGETS.len())], p),
            49..=55 => TreeOp::Link(p, self.tree_path(existing)),
            56..=63 => TreeOp::Unlink(p),
            64..=79 => {
                let flags = [0, 0, libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE][self.rng.random_range(0..4)];
                TreeOp::Rename(p, self.tree_path(existing), flags)
            }
            80..=84 => TreeOp::Chmod(p, MODES[self.rng.random_range(0..MODES.len())]),
            85..=87 => {
                let (uid, gid) = (OWNERS[self.rng.random_range(0..OWNERS.len())], OWNERS[self.rng.random_range(0..OWNERS.len())]);
                TreeOp::Chown(p, uid, gid, self.rng.random_bool(0.3))
            }
            88..=90 => {
                let (a, m) = (TIMES[self.rng.random_range(0..TIMES.len())], TIMES[self.rng.random_range(0..TIMES.len())]);
                TreeOp::Utimens(p, a, m, self.rng.random_bool(0.3))
            }
            91..=95 => {
                let len = self.rng.random_range(0..100);
                TreeOp::SetXattr(p, XATTRS[self.rng.random_range(0..XATTRS.len())], self.bytes(len.max(1)))
            }
            _ => TreeOp::RemoveXattr(p, XATTRS[self.rng.random_range(0..XATTRS.len())]),
        }
    }
}

struct Tree {
    want_root: PathBuf,
}

impl Tree {
    /// Under a scratch directory of its own, one level down on both sides, so that a symlink to
    /// "../p" leads to the same (absent) place.
    fn new(scratch: &Path) -> Tree {
        let want_root = scratch.join("tree");
        fs::create_dir(&want_root).unwrap();
        Tree { want_root }
    }
}

impl Workload for Tree {
    fn step(&mut self, c: &Cluster, g: &mut Gen, step: usize, on_nodes: &[u64]) {
        let existing: Vec<String> = tree(&self.want_root).into_keys().collect();
        let op = g.tree_op(&existing);
        let on = on_nodes[g.rng.random_range(0..on_nodes.len())];
        let root = c.path(on, "tree");
        // A name the kernel caches may lead to what it named before another node's latest change
        // until this node has applied it (docs/SEMANTICS.md): an opendir catches up first, as
        // a program on this node that had just heard of that change would.
        drop(File::open(&root).unwrap());
        let w = run_tree(&self.want_root, &op);
        let got = run_tree(&root, &op);
        g.record(format!("{step}: node {on}: {op} -> {w:?}"));
        if w != got {
            g.fail(step, format!("node {on}: {op}: reference {w:?}, pickbox {got:?}"));
        }
        if got.is_ok() {
            if let Some(d) = times_differ(&root, &op, true) {
                g.fail(step, format!("node {on}, right after {op}: {d}"));
            }
        }
        let by = on_nodes[g.rng.random_range(0..on_nodes.len())];
        self.check_all(c, g, step, by);
        if got.is_ok() && !targets_a_file(&self.want_root, &op) {
            if let Some(d) = times_differ(&c.path(by, "tree"), &op, true) {
                g.fail(step, format!("node {by}, after {op} on node {on}: {d}"));
            }
        }
    }

    fn check_all(&mut self, c: &Cluster, g: &Gen, step: usize, k: u64) {
        if let Some(d) = tree_differs(&tree(&self.want_root), &tree(&c.path(k, "tree"))) {
            g.fail(step, format!("the tree on node {k}: {d}"));
        }
    }
}

#[test]
fn cluster_random_namespace_operations_agree_with_a_local_filesystem() {
    let mut c = Cluster::new(3);
    let (mut g, steps) = Gen::new(400);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let mut work = Tree::new(reference.path());
    fs::create_dir(c.path(1, "tree")).unwrap();
    let ids = c.ids();
    for step in 0..steps {
        work.step(&c, &mut g, step, &ids);
    }
    c.wait_converged(CONVERGE_TIMEOUT);
}

#[test]
fn cluster_random_namespace_operations_survive_restarts() {
    let mut c = Cluster::with(ClusterOptions { snapshot_entries: Some(RESTART_SNAPSHOT_ENTRIES), ..ClusterOptions::default() });
    let (mut g, steps) = Gen::new(300);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let mut work = Tree::new(reference.path());
    fs::create_dir(c.path(1, "tree")).unwrap();
    with_restarts(&mut c, &mut g, steps, &mut work);
}

#[test]
fn random_namespace_operations_agree_with_a_local_filesystem() {
    let node = Node::start();
    let (mut g, steps) = Gen::new(1000);
    let reference = tempfile::Builder::new().prefix("pickbox-fsx-ref-").tempdir().unwrap();
    let want_root = Tree::new(reference.path()).want_root;
    fs::create_dir(node.path("tree")).unwrap();
    let root = node.path("tree");
    for step in 0..steps {
        let existing: Vec<String> = tree(&want_root).into_keys().collect();
        let op = g.tree_op(&existing);
        let w = run_tree(&want_root, &op);
        let got = run_tree(&root, &op);
        g.record(format!("{step}: {op} -> {w:?}"));
        if w != got {
            g.fail(step, format!("{op}: reference {w:?}, pickbox {got:?}"));
        }
        if let (Ok(()), Some(d)) = (&got, times_differ(&root, &op, true)) {
            g.fail(step, format!("right after {op}: {d}"));
        }
        if let Some(d) = tree_differs(&tree(&want_root), &tree(&root)) {
            g.fail(step, format!("the tree after the step: {d}"));
        }
    }
}

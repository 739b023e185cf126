//! The kernel's writeback cache: small writes merged in the page cache, partial pages of
//! write-only files, O_APPEND decided by the kernel, close and fsync as barriers that commit the
//! dirty pages (also across kill -9), times kept by the kernel and persisted, shared mmap.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use crate::harness::{check, Node};

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 24) as u8).collect()
}

/// The node asked for the writeback cache and the kernel gave it (when the log says so at all).
fn assert_writeback_on(node: &Node) {
    if std::env::var("PICKBOX_WRITEBACK_CACHE").is_ok_and(|v| v == "0") {
        return; // the suite runs with the writeback cache switched off on purpose
    }
    let log = node.log();
    // The line may carry colour codes around the `=`.
    if let Some(line) = log.lines().find(|l| l.contains("FUSE session initialised")) {
        assert!(line.contains("true") && !line.contains("false"), "writeback cache not enabled: {line}");
    }
}

#[test]
fn small_writes_and_partial_pages_of_write_only_files() {
    let mut node = Node::start();
    assert_writeback_on(&node);
    let p = node.path("f");
    let mut expect = pattern(3 * 4096 + 123, 1);
    fs::write(&p, &expect).unwrap();

    // Write-only: the kernel must read the partial pages around these writes from us.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all_at(b"0123456789", 4090).unwrap();
    expect[4090..4100].copy_from_slice(b"0123456789");
    // Many tiny sequential writes, growing the file past its end.
    let mut w2 = OpenOptions::new().write(true).open(&p).unwrap();
    w2.seek(SeekFrom::Start(10_000)).unwrap();
    for i in 0..3000u32 {
        w2.write_all(&[(i % 251) as u8]).unwrap();
    }
    expect.resize(13_000, 0);
    for i in 0..3000usize {
        expect[10_000 + i] = (i % 251) as u8;
    }
    // Before any close or fsync: another descriptor and stat see everything.
    assert_eq!(fs::metadata(&p).unwrap().len(), 13_000);
    assert!(fs::read(&p).unwrap() == expect, "content through a second descriptor");
    drop((w, w2));
    node.restart();
    assert!(fs::read(&p).unwrap() == expect, "content after restart");
    assert_eq!(fs::metadata(&p).unwrap().len(), 13_000);
}

#[test]
fn o_append_is_placed_once() {
    let mut node = Node::start();
    let p = node.path("log");
    fs::write(&p, b"one\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"two\n").unwrap();
    b.write_all(b"three\n").unwrap();
    // pwrite on an O_APPEND descriptor appends on Linux.
    a.write_all_at(b"four\n", 0).unwrap();
    // O_APPEND switched on later with fcntl(F_SETFL).
    let mut c = OpenOptions::new().write(true).open(&p).unwrap();
    // SAFETY: fcntl on an open descriptor.
    check(unsafe { libc::fcntl(c.as_raw_fd(), libc::F_SETFL, libc::O_APPEND) }).unwrap();
    c.write_all(b"five\n").unwrap();
    b.sync_all().unwrap();
    drop((a, b, c));
    let want = "one\ntwo\nthree\nfour\nfive\n";
    assert_eq!(fs::read_to_string(&p).unwrap(), want);
    node.restart();
    assert_eq!(fs::read_to_string(&p).unwrap(), want);
}

#[test]
fn close_and_fsync_commit_dirty_pages_across_kill9() {
    let mut node = Node::start();
    // Closed without fsync: close (FLUSH) is a barrier too.
    let closed = pattern(200_000, 2);
    let mut f = File::create(node.path("closed")).unwrap();
    for chunk in closed.chunks(100) {
        f.write_all(chunk).unwrap();
    }
    drop(f);
    // fsync'ed and still open when the node dies.
    let synced = pattern(3 * 1024 * 1024 + 7, 3);
    let mut g = File::create(node.path("synced")).unwrap();
    for chunk in synced.chunks(4096) {
        g.write_all(chunk).unwrap();
    }
    g.sync_all().unwrap();
    // fdatasync after overwriting the middle.
    g.write_all_at(b"middle", 1_000_000).unwrap();
    g.sync_data().unwrap();
    let mut synced = synced;
    synced[1_000_000..1_000_006].copy_from_slice(b"middle");
    File::open(&node.mnt).unwrap().sync_all().unwrap();
    node.kill9();
    drop(g); // its mount is gone; the close fails quietly
    node.spawn();
    assert!(fs::read(node.path("closed")).unwrap() == closed, "closed file after kill -9");
    assert!(fs::read(node.path("synced")).unwrap() == synced, "fsync'ed file after kill -9");
}

#[test]
fn times_and_size_kept_by_the_kernel_persist() {
    let mut node = Node::start();
    let p = node.path("t");
    let mut f = File::create(&p).unwrap();
    f.write_all(&pattern(10_000, 4)).unwrap();
    let open_len = f.metadata().unwrap().len();
    drop(f);
    let before = fs::metadata(&p).unwrap();
    assert_eq!((open_len, before.len()), (10_000, 10_000));
    node.restart();
    let after = fs::metadata(&p).unwrap();
    assert_eq!(after.len(), 10_000);
    assert_eq!(
        (after.mtime(), after.mtime_nsec()),
        (before.mtime(), before.mtime_nsec()),
        "mtime shown before the restart is the one stored"
    );
    assert!(after.ctime() >= before.mtime());
}

/// (ctime, ctime_nsec) of `p` as stat shows it now.
fn ctime_of(p: &std::path::Path) -> (i64, i64) {
    let m = fs::metadata(p).unwrap();
    (m.ctime(), m.ctime_nsec())
}

#[test]
fn ctime_the_kernel_shows_is_the_one_stored() {
    // With the writeback cache the kernel keeps its own ctime of a regular file (from its coarse
    // clock) and sends it with every setattr of the file; the store must keep that ctime, not the
    // command's own time, or the file's ctime changes once the kernel forgets the inode (and
    // other nodes show another one meanwhile).
    let mut node = Node::start();
    assert_writeback_on(&node);
    let written = node.path("written");
    fs::write(&written, b"some data").unwrap();
    let chmodded = node.path("chmodded");
    fs::write(&chmodded, b"x").unwrap();
    fs::set_permissions(&chmodded, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let truncated = node.path("truncated");
    fs::write(&truncated, pattern(10_000, 2)).unwrap();
    OpenOptions::new().write(true).open(&truncated).unwrap().set_len(100).unwrap();
    let touched = node.path("touched");
    File::create(&touched).unwrap();
    File::open(&touched).unwrap().set_modified(std::time::SystemTime::now()).unwrap();
    let files = [&written, &chmodded, &truncated, &touched];
    let shown: Vec<_> = files.iter().map(|p| ctime_of(p)).collect();
    node.restart();
    let stored: Vec<_> = files.iter().map(|p| ctime_of(p)).collect();
    assert_eq!(stored, shown, "ctime (written, chmodded, truncated, touched) before and after the kernel forgot the files");
}

#[test]
fn shared_mmap_writes_reach_the_store() {
    let mut node = Node::start();
    let p = node.path("m");
    let len = 3 * 4096;
    fs::write(&p, vec![0u8; len]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    // SAFETY: a fresh shared mapping of `len` bytes of an open file; unmapped below.
    let addr = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
    };
    assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping is `len` bytes long and writable.
    let map = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len) };
    map[5000..5005].copy_from_slice(b"mmapd");
    // SAFETY: addr/len are the mapping made above.
    check(unsafe { libc::msync(addr, len, libc::MS_SYNC) }).unwrap();
    // SAFETY: as above; the slice is not used after this.
    check(unsafe { libc::munmap(addr, len) }).unwrap();
    let mut got = Vec::new();
    (&f).read_to_end(&mut got).unwrap();
    assert_eq!(&got[5000..5005], b"mmapd");
    node.kill9();
    drop(f);
    node.spawn();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), len);
    assert_eq!(&got[5000..5005], b"mmapd");
}

#[test]
fn seek_data_sees_dirty_pages() {
    let node = Node::start();
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(node.path("sparse")).unwrap();
    f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
    let seek = |off: i64, whence: i32| {
        // SAFETY: lseek on an open descriptor.
        check(unsafe { libc::lseek(f.as_raw_fd(), off, whence) }).unwrap()
    };
    // Not yet written back when lseek asks: the data must not be reported as a hole.
    assert_eq!(seek(0, libc::SEEK_DATA), 1 << 20);
    assert_eq!(seek(0, libc::SEEK_HOLE), 0);
    f.write_all_at(b"tail", 3 << 20).unwrap();
    // Holes are tracked per 64 KiB block.
    assert_eq!(seek((1 << 20) + 65536, libc::SEEK_DATA), 3 << 20);
    let mut got = [0u8; 4];
    f.read_exact_at(&mut got, 1 << 20).unwrap();
    assert_eq!(got, [7u8; 4]);
}

#[test]
fn clean_stop_writes_back_files_still_open() {
    let mut node = Node::start();
    let data = pattern(300_000, 5);
    let mut f = File::create(node.path("open")).unwrap();
    for chunk in data.chunks(1000) {
        f.write_all(chunk).unwrap();
    }
    // Still open, never fsync'ed: SIGTERM must write the dirty pages back before unmounting.
    node.restart();
    drop(f);
    assert!(fs::read(node.path("open")).unwrap() == data, "dirty data lost by a clean stop");
}

//! File content: create/write/read, O_APPEND, truncate, fallocate, SEEK_DATA/SEEK_HOLE,
//! copy_file_range, open-unlinked files.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;

use crate::harness::{check, errno_of, Node};

/// A deterministic pattern that differs at every offset within a block (catches misplaced blocks).
pub(crate) fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn create_write_read() {
    let node = Node::start();
    let p = node.path("hello.txt");
    fs::write(&p, b"hello pickbox\n").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"hello pickbox\n");
    let md = fs::metadata(&p).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 14);
    assert_eq!(md.nlink(), 1);

    // O_CREAT|O_EXCL on an existing name.
    let e = OpenOptions::new().write(true).create_new(true).open(&p);
    assert_eq!(errno_of(e), libc::EEXIST);

    // Overwrite in the middle, read back at offsets.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"PICK", 6).unwrap();
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, 4).unwrap();
    assert_eq!(&buf, b"o PICKbo");
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), b"hello PICKbox\n");

    // Creation mode honours the umask given by the caller (root's umask in this process is 022).
    let q = node.path("mode");
    let f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&q).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&q).unwrap().mode() & 0o7777, 0o640 & !crate::harness::umask());
}

#[test]
fn large_file_and_sparse_reads() {
    let node = Node::start();
    let p = node.path("big");
    let data = pattern(3 * 1024 * 1024 + 12345, 7);
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), data.len() as u64);
    assert!(fs::read(&p).unwrap() == data, "content differs after a 3 MiB write");

    // Write far past EOF: the gap reads as zeros.
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let far = 10 * 1024 * 1024;
    f.write_all_at(b"tail", far).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.metadata().unwrap().len(), far + 4);
    let mut gap = vec![1u8; 4096];
    f.read_exact_at(&mut gap, far - 4096).unwrap();
    assert!(gap.iter().all(|&b| b == 0), "hole does not read as zeros");
    // Unaligned read that crosses a block boundary.
    let mut b = vec![0u8; 100_000];
    f.read_exact_at(&mut b, 60_000).unwrap();
    assert!(b[..] == data[60_000..160_000]);
    // Read at EOF returns 0 bytes.
    let mut one = [0u8; 1];
    assert_eq!(f.read_at(&mut one, far + 4).unwrap(), 0);
}

/// Files may grow to the kernel's largest file size (2^63 - 1), sparse, and the kernel refuses
/// what goes beyond at the call. Pickbox's own limit used to be 2^50: a write past it
/// went into the kernel's page cache, failed at writeback (EIO at close), and the file kept its
/// new size in this node's kernel.
#[test]
fn sparse_files_reach_the_kernels_largest_file_size() {
    let node = Node::start();
    let largest: u64 = i64::MAX as u64;
    for (i, off) in [1u64 << 50, 1 << 62, largest - 5].into_iter().enumerate() {
        let p = node.path(&format!("sparse{i}"));
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.write_all_at(b"tail!", off).unwrap();
        crate::cluster::close(f).unwrap_or_else(|e| panic!("close after a write at {off}: {e}"));
        let f = File::open(&p).unwrap();
        assert_eq!(f.metadata().unwrap().len(), off + 5);
        let mut got = [0u8; 5];
        f.read_exact_at(&mut got, off).unwrap();
        assert_eq!(&got, b"tail!");
        let mut hole = [1u8; 8];
        f.read_exact_at(&mut hole, off / 2).unwrap();
        assert_eq!(hole, [0u8; 8], "the hole below {off} reads as zeros");
    }
    // Past the largest size the kernel refuses at the call (a write whose end overflows an
    // offset: EINVAL; fallocate: EFBIG), and nothing changes.
    let p = node.path("sparse2");
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    assert_eq!(errno_of(f.write_at(b"x", largest)), libc::EINVAL);
    // SAFETY: fallocate on a descriptor we own.
    let r = check(unsafe { libc::fallocate(f.as_raw_fd(), 0, (largest - 2) as libc::off_t, 10) });
    assert_eq!(errno_of(r), libc::EFBIG);
    crate::cluster::close(f).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), largest);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(1 << 62).unwrap();
    crate::cluster::close(f).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 1 << 62);
    fs::remove_file(&p).unwrap();
}

#[test]
fn identical_content_in_many_files() {
    // Deduplicated blocks must still read back correctly per file, and survive the removal of others.
    let node = Node::start();
    let data = pattern(200_000, 3);
    for i in 0..5 {
        fs::write(node.path(&format!("dup{i}")), &data).unwrap();
    }
    for i in 0..4 {
        fs::remove_file(node.path(&format!("dup{i}"))).unwrap();
    }
    assert!(fs::read(node.path("dup4")).unwrap() == data);
}

#[test]
fn o_append() {
    let node = Node::start();
    let p = node.path("log");
    fs::write(&p, b"one\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"two\n").unwrap();
    b.write_all(b"three\n").unwrap();
    a.write_all(b"four\n").unwrap();
    // pwrite on an O_APPEND fd appends on Linux as well.
    drop((a, b));
    assert_eq!(fs::read_to_string(&p).unwrap(), "one\ntwo\nthree\nfour\n");
}

#[test]
fn truncate_shrink_and_extend() {
    let node = Node::start();
    let p = node.path("t");
    let data = pattern(200_000, 1);
    fs::write(&p, &data).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.set_len(70_000).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 70_000);
    f.set_len(150_000).unwrap();
    let got = fs::read(&p).unwrap();
    assert_eq!(got.len(), 150_000);
    assert!(got[..70_000] == data[..70_000]);
    assert!(got[70_000..].iter().all(|&b| b == 0), "extended range must read as zeros");
    drop(f);
    // truncate(2) by path, and O_TRUNC.
    let c = crate::harness::cstr(&p);
    // SAFETY: valid path.
    check(unsafe { libc::truncate(c.as_ptr(), 10) }).unwrap();
    assert_eq!(fs::read(&p).unwrap(), &data[..10]);
    drop(OpenOptions::new().write(true).truncate(true).open(&p).unwrap());
    assert_eq!(fs::metadata(&p).unwrap().len(), 0);
    // Truncating a directory fails.
    let d = crate::harness::cstr(&node.mnt);
    // SAFETY: valid path.
    let r = check(unsafe { libc::truncate(d.as_ptr(), 0) });
    assert_eq!(errno_of(r), libc::EISDIR);
}

#[test]
fn fallocate_modes() {
    let node = Node::start();
    let p = node.path("fa");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    let fd = f.as_raw_fd();
    // Plain fallocate extends the size.
    // SAFETY: fd is open for writing.
    check(unsafe { libc::fallocate(fd, 0, 0, 100_000) }).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 100_000);
    // KEEP_SIZE does not.
    check(unsafe { libc::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, 0, 300_000) }).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 100_000);
    // Punch a hole: size stays, range reads as zeros, the rest is kept.
    let data = pattern(300_000, 9);
    f.write_all_at(&data, 0).unwrap();
    check(unsafe {
        libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 10_000, 150_000)
    })
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 300_000);
    let mut got = vec![0u8; 300_000];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got[..10_000] == data[..10_000]);
    assert!(got[10_000..160_000].iter().all(|&b| b == 0), "punched range must read as zeros");
    assert!(got[160_000..] == data[160_000..]);
    // PUNCH_HOLE without KEEP_SIZE is invalid (Linux rule).
    let r = check(unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE, 0, 10) });
    assert_eq!(errno_of(r), libc::EOPNOTSUPP);
    // posix_fallocate (mode 0 beyond EOF).
    let r = unsafe { libc::posix_fallocate(fd, 400_000, 1000) };
    assert_eq!(r, 0);
    assert_eq!(f.metadata().unwrap().len(), 401_000);
}

#[test]
fn seek_data_and_hole() {
    let node = Node::start();
    let p = node.path("sparse");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
    let second = 4 * 1024 * 1024u64;
    f.write_all_at(&[1u8; 4096], 0).unwrap();
    f.write_all_at(&[2u8; 4096], second).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    let size = second as i64 + 4096;
    // SAFETY: lseek on an open fd.
    let data0 = check(unsafe { libc::lseek(fd, 0, libc::SEEK_DATA) }).unwrap();
    assert_eq!(data0, 0);
    let hole0 = check(unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) }).unwrap();
    assert!(hole0 >= 4096 && hole0 <= second as i64, "first hole at {hole0}");
    let data1 = check(unsafe { libc::lseek(fd, hole0, libc::SEEK_DATA) }).unwrap();
    assert!(data1 > hole0 && data1 <= second as i64, "second data at {data1}, hole at {hole0}");
    let hole_end = check(unsafe { libc::lseek(fd, second as i64, libc::SEEK_HOLE) }).unwrap();
    assert_eq!(hole_end, size, "the implicit hole at EOF");
    let r = check(unsafe { libc::lseek(fd, size, libc::SEEK_DATA) });
    assert_eq!(errno_of(r), libc::ENXIO);
    let r = check(unsafe { libc::lseek(fd, size + 10, libc::SEEK_HOLE) });
    assert_eq!(errno_of(r), libc::ENXIO);
}

#[test]
fn copy_file_range_copies() {
    let node = Node::start();
    let src = node.path("src");
    let dst = node.path("dst");
    let data = pattern(500_000, 5);
    fs::write(&src, &data).unwrap();
    let fi = File::open(&src).unwrap();
    let fo = OpenOptions::new().write(true).create(true).truncate(true).open(&dst).unwrap();
    let mut off_in: libc::loff_t = 1000;
    let mut off_out: libc::loff_t = 10;
    let mut left = 300_000usize;
    while left > 0 {
        // SAFETY: both fds are open; offsets point at live locals.
        let n = check(unsafe {
            libc::copy_file_range(fi.as_raw_fd(), &mut off_in, fo.as_raw_fd(), &mut off_out, left, 0)
        })
        .unwrap();
        assert!(n > 0, "copy_file_range returned 0 before the end");
        left -= n as usize;
    }
    drop(fo);
    let got = fs::read(&dst).unwrap();
    assert_eq!(got.len(), 300_010);
    assert!(got[..10].iter().all(|&b| b == 0));
    assert!(got[10..] == data[1000..301_000]);
    // std::io::copy uses copy_file_range too; whole-file copy.
    let mut a = File::open(&src).unwrap();
    let mut b = File::create(node.path("dst2")).unwrap();
    std::io::copy(&mut a, &mut b).unwrap();
    drop(b);
    assert!(fs::read(node.path("dst2")).unwrap() == data);
}

#[test]
fn open_unlinked_file_stays_usable() {
    let node = Node::start();
    let p = node.path("ghost");
    let data = pattern(150_000, 11);
    fs::write(&p, &data).unwrap();
    let mut f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert!(fs::symlink_metadata(&p).is_err());
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert!(got == data, "content of the unlinked file changed");
    f.write_all(b"more").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut got = Vec::new();
    f.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), data.len() + 4);
    assert_eq!(&got[data.len()..], b"more");
    // A new file with the same name is a different file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    f.write_all_at(b"X", 0).unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    drop(f);

    // Replaced by rename while open: the old file stays readable through its fd.
    let a = node.path("a");
    let b = node.path("b");
    fs::write(&a, b"AAAA").unwrap();
    fs::write(&b, b"BBBB").unwrap();
    let fb = File::open(&b).unwrap();
    fs::rename(&a, &b).unwrap();
    let mut s = String::new();
    (&fb).read_to_string(&mut s).unwrap();
    assert_eq!(s, "BBBB");
    assert_eq!(fs::read(&b).unwrap(), b"AAAA");
}

#[test]
fn fsync_and_fdatasync_succeed() {
    let node = Node::start();
    let f = File::create(node.path("s")).unwrap();
    (&f).write_all(b"x").unwrap();
    f.sync_data().unwrap();
    f.sync_all().unwrap();
    let d = File::open(&node.mnt).unwrap();
    d.sync_all().unwrap();
}

/// Pages of `f` (of length `len`) the page cache holds now (mincore over a mapping that is never
/// touched, so it reads nothing in).
pub(crate) fn resident_pages(f: &File, len: usize) -> usize {
    // SAFETY: a shared read-only mapping of an open file, unmapped below; mincore writes one byte
    // per page into a vector of that many bytes.
    unsafe {
        let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0);
        assert_ne!(addr, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }
}

#[test]
fn a_single_node_keeps_a_files_page_cache_across_opens() {
    // Every change reaches a node without peers through its own kernel, so its kernel keeps a
    // file's pages when the file is opened again (FOPEN_KEEP_CACHE) instead of reading it anew.
    let node = Node::start();
    let p = node.path("cached");
    let data = vec![7u8; 64 * 1024];
    fs::write(&p, &data).unwrap();
    assert_eq!(fs::read(&p).unwrap(), data);
    let f = File::open(&p).unwrap();
    assert_eq!(resident_pages(&f, data.len()), 16, "pages dropped at open");
    // A change through this kernel is seen through the kept cache.
    OpenOptions::new().write(true).open(&p).unwrap().write_all_at(b"new", 100).unwrap();
    let mut got = Vec::new();
    File::open(&p).unwrap().read_to_end(&mut got).unwrap();
    assert_eq!(&got[100..103], b"new");
}

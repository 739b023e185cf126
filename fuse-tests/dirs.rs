//! Namespace: mknod, mkdir/rmdir, unlink, symlink/readlink, link counts, readdir under change,
//! sticky directories, setgid inheritance.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::harness::{as_user, as_user_groups, check, cstr, errno_of, lstat, Node, Permit, NOBODY, OTHER};

fn mknod(p: &Path, mode: u32, dev: u64) -> std::io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path.
    check(unsafe { libc::mknod(c.as_ptr(), mode, dev) }).map(|_| ())
}

#[test]
fn mknod_all_kinds() {
    let node = Node::start();
    let fifo = node.path("fifo");
    let sock = node.path("sock");
    let chr = node.path("chr");
    let blk = node.path("blk");
    let reg = node.path("reg");
    mknod(&fifo, libc::S_IFIFO | 0o644, 0).unwrap();
    mknod(&sock, libc::S_IFSOCK | 0o600, 0).unwrap();
    mknod(&chr, libc::S_IFCHR | 0o600, libc::makedev(1, 3)).unwrap();
    mknod(&blk, libc::S_IFBLK | 0o600, libc::makedev(7, 42)).unwrap();
    mknod(&reg, libc::S_IFREG | 0o600, 0).unwrap();
    let kind = |p: &Path| lstat(p).unwrap().st_mode & libc::S_IFMT;
    assert_eq!(kind(&fifo), libc::S_IFIFO);
    assert_eq!(kind(&sock), libc::S_IFSOCK);
    assert_eq!(kind(&chr), libc::S_IFCHR);
    assert_eq!(kind(&blk), libc::S_IFBLK);
    assert_eq!(kind(&reg), libc::S_IFREG);
    assert_eq!(lstat(&chr).unwrap().st_rdev, libc::makedev(1, 3));
    assert_eq!(lstat(&blk).unwrap().st_rdev, libc::makedev(7, 42));
    assert_eq!(lstat(&fifo).unwrap().st_mode & 0o7777, 0o644 & !crate::harness::umask());
    assert_eq!(errno_of(mknod(&fifo, libc::S_IFIFO | 0o644, 0)), libc::EEXIST);
    // A fifo on the mount works as a pipe (the kernel serves it; the node only stores the inode).
    let f2 = fifo.clone();
    let writer = std::thread::spawn(move || fs::write(&f2, b"through the fifo").unwrap());
    assert_eq!(fs::read(&fifo).unwrap(), b"through the fifo");
    writer.join().unwrap();
    // Non-root may not create device nodes.
    fs::set_permissions(&node.mnt, fs::Permissions::from_mode(0o777)).unwrap();
    let p = node.path("userdev");
    let r = as_user(NOBODY, NOBODY, || mknod(&p, libc::S_IFCHR | 0o600, libc::makedev(1, 3)));
    assert_eq!(r, Err(libc::EPERM));
}

#[test]
fn mkdir_rmdir_and_nlink() {
    let node = Node::start();
    let root_links = lstat(&node.mnt).unwrap().st_nlink;
    let d = node.path("d");
    fs::create_dir(&d).unwrap();
    assert_eq!(lstat(&d).unwrap().st_nlink, 2);
    assert_eq!(lstat(&node.mnt).unwrap().st_nlink, root_links + 1);
    fs::create_dir(d.join("sub1")).unwrap();
    fs::create_dir(d.join("sub2")).unwrap();
    fs::write(d.join("file"), b"").unwrap();
    assert_eq!(lstat(&d).unwrap().st_nlink, 4);
    assert_eq!(errno_of(fs::create_dir(&d)), libc::EEXIST);
    assert_eq!(errno_of(fs::remove_dir(&d)), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_dir(d.join("file"))), libc::ENOTDIR);
    assert_eq!(errno_of(fs::remove_file(d.join("sub1"))), libc::EISDIR);
    assert_eq!(errno_of(fs::create_dir(d.join("nope/deeper"))), libc::ENOENT);
    assert_eq!(errno_of(fs::create_dir(d.join("file/x"))), libc::ENOTDIR);
    fs::remove_dir(d.join("sub1")).unwrap();
    assert_eq!(lstat(&d).unwrap().st_nlink, 3);
    fs::remove_dir(d.join("sub2")).unwrap();
    fs::remove_file(d.join("file")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert_eq!(lstat(&node.mnt).unwrap().st_nlink, root_links);
    assert_eq!(errno_of(lstat(&d)), libc::ENOENT);
    // A deep tree.
    let mut p = node.mnt.clone();
    for i in 0..30 {
        p = p.join(format!("level{i}"));
        fs::create_dir(&p).unwrap();
    }
    fs::write(p.join("leaf"), b"deep").unwrap();
    assert_eq!(fs::read(p.join("leaf")).unwrap(), b"deep");
    fs::remove_dir_all(node.path("level0")).unwrap();
}

#[test]
fn unlink_removes_name() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"x").unwrap();
    fs::remove_file(&p).unwrap();
    assert_eq!(errno_of(fs::metadata(&p)), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_file(&p)), libc::ENOENT);
    assert!(fs::read_dir(&node.mnt).unwrap().next().is_none(), "root not empty after unlink");
}

#[test]
fn symlink_readlink() {
    let node = Node::start();
    fs::write(node.path("target"), b"t").unwrap();
    let l = node.path("link");
    std::os::unix::fs::symlink("target", &l).unwrap();
    assert_eq!(fs::read_link(&l).unwrap(), Path::new("target"));
    assert_eq!(fs::read(&l).unwrap(), b"t");
    let st = lstat(&l).unwrap();
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(st.st_size, 6);
    // Dangling and long targets.
    let long = "x/".repeat(2000) + "end";
    std::os::unix::fs::symlink(&long, node.path("long")).unwrap();
    assert_eq!(fs::read_link(node.path("long")).unwrap(), Path::new(&long));
    std::os::unix::fs::symlink("/nowhere", node.path("dangling")).unwrap();
    assert_eq!(errno_of(fs::metadata(node.path("dangling"))), libc::ENOENT);
    assert_eq!(errno_of(std::os::unix::fs::symlink("a", &l)), libc::EEXIST);
    // readlink on a non-link.
    assert_eq!(errno_of(fs::read_link(node.path("target"))), libc::EINVAL);
    // Symlinks to directories resolve.
    fs::create_dir(node.path("dir")).unwrap();
    fs::write(node.path("dir/in"), b"in").unwrap();
    std::os::unix::fs::symlink("dir", node.path("dirlink")).unwrap();
    assert_eq!(fs::read(node.path("dirlink/in")).unwrap(), b"in");
}

#[test]
fn hard_links_and_counts() {
    let node = Node::start();
    let a = node.path("a");
    fs::write(&a, b"shared").unwrap();
    fs::create_dir(node.path("d")).unwrap();
    fs::hard_link(&a, node.path("b")).unwrap();
    fs::hard_link(&a, node.path("d/c")).unwrap();
    let st = lstat(&a).unwrap();
    assert_eq!(st.st_nlink, 3);
    assert_eq!(lstat(&node.path("d/c")).unwrap().st_ino, st.st_ino);
    fs::write(node.path("b"), b"changed").unwrap();
    assert_eq!(fs::read(node.path("d/c")).unwrap(), b"changed");
    fs::remove_file(&a).unwrap();
    assert_eq!(lstat(&node.path("b")).unwrap().st_nlink, 2);
    fs::remove_file(node.path("b")).unwrap();
    assert_eq!(lstat(&node.path("d/c")).unwrap().st_nlink, 1);
    assert_eq!(fs::read(node.path("d/c")).unwrap(), b"changed");
    // Errors: link to a directory, existing name, missing source.
    assert_eq!(errno_of(fs::hard_link(node.path("d"), node.path("dl"))), libc::EPERM);
    fs::write(node.path("e"), b"").unwrap();
    assert_eq!(errno_of(fs::hard_link(node.path("d/c"), node.path("e"))), libc::EEXIST);
    assert_eq!(errno_of(fs::hard_link(node.path("missing"), node.path("m2"))), libc::ENOENT);
    // A link bumps ctime of the inode. With the writeback cache the kernel keeps a regular
    // file's ctime and sets it from its coarse clock (the tick before now), which may be
    // earlier than the fine-grained time the node stamped at creation: compare against the
    // coarse clock read before the link.
    let started = crate::harness::coarse_now();
    fs::hard_link(node.path("e"), node.path("e2")).unwrap();
    let after = lstat(&node.path("e")).unwrap();
    assert!((after.st_ctime, after.st_ctime_nsec) >= started, "link must set ctime");
    // Hard link to a symlink links the symlink itself (linkat without AT_SYMLINK_FOLLOW).
    std::os::unix::fs::symlink("e", node.path("sl")).unwrap();
    let c1 = cstr(&node.path("sl"));
    let c2 = cstr(&node.path("sl2"));
    // SAFETY: valid paths.
    check(unsafe { libc::linkat(libc::AT_FDCWD, c1.as_ptr(), libc::AT_FDCWD, c2.as_ptr(), 0) }).unwrap();
    assert_eq!(lstat(&node.path("sl2")).unwrap().st_mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(lstat(&node.path("sl")).unwrap().st_nlink, 2);
}

/// Reads a directory with getdents64 in small batches, calling `between` after each batch.
fn list_in_batches(dir: &Path, buf_bytes: usize, mut between: impl FnMut(usize)) -> Vec<OsString> {
    let f = File::open(dir).unwrap();
    let mut names = Vec::new();
    let mut buf = vec![0u8; buf_bytes];
    let mut batch = 0;
    loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, f.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        assert!(n >= 0, "getdents64: {}", std::io::Error::last_os_error());
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name[].
            let reclen = u16::from_ne_bytes([buf[off + 16], buf[off + 17]]) as usize;
            let name = &buf[off + 19..off + reclen];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            let name = &name[..end];
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
            off += reclen;
        }
        assert!(names.len() < 1_000_000, "readdir does not end: {} names so far", names.len());
        between(batch);
        batch += 1;
    }
    names
}

#[test]
fn readdir_many_entries_under_change() {
    let node = Node::start();
    let d = node.path("many");
    fs::create_dir(&d).unwrap();
    let stable: Vec<String> = (0..1500).map(|i| format!("stable-{i:05}")).collect();
    for n in &stable {
        File::create(d.join(n)).unwrap();
    }
    // A full listing: every entry exactly once, with d_type and inode.
    let all = list_in_batches(&d, 64 * 1024, |_| {});
    assert_eq!(all.len(), stable.len());
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), stable.len());
    assert_eq!(fs::read_dir(&d).unwrap().count(), stable.len());

    // While listing in small batches, add new names and remove names not in `stable`;
    // names present throughout must appear exactly once.
    for i in 0..200 {
        File::create(d.join(format!("churn-{i:05}"))).unwrap();
    }
    // Churn only during the first batches: a reader that keeps adding names behind its own
    // cursor may legitimately see each of them, and would never reach the end.
    let mut created = 0;
    let listed = list_in_batches(&d, 1024, |batch| {
        if batch >= 40 {
            return;
        }
        for k in 0..5 {
            let n = batch * 5 + k;
            fs::remove_file(d.join(format!("churn-{n:05}"))).unwrap();
            File::create(d.join(format!("new-{created:05}"))).unwrap();
            created += 1;
        }
    });
    let mut counts: HashMap<&OsString, usize> = HashMap::new();
    for n in &listed {
        *counts.entry(n).or_default() += 1;
    }
    for n in &stable {
        let c = counts.get(&OsString::from(n)).copied().unwrap_or(0);
        assert_eq!(c, 1, "{n} listed {c} times while the directory changed");
    }
    for (n, c) in counts {
        assert_eq!(c, 1, "{n:?} listed {c} times");
    }

    // rewinddir/seekdir via reopening yields the final content.
    let final_names = list_in_batches(&d, 4096, |_| {});
    assert_eq!(final_names.len(), stable.len() + created);
}

#[test]
fn readdir_reports_types() {
    let node = Node::start();
    fs::create_dir(node.path("d")).unwrap();
    fs::write(node.path("f"), b"").unwrap();
    std::os::unix::fs::symlink("f", node.path("l")).unwrap();
    let mut kinds = HashMap::new();
    for e in fs::read_dir(&node.mnt).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        kinds.insert(e.file_name().into_string().unwrap(), (t.is_dir(), t.is_file(), t.is_symlink()));
        assert_eq!(e.ino(), e.metadata().unwrap().ino(), "d_ino differs from st_ino");
    }
    assert_eq!(kinds["d"], (true, false, false));
    assert_eq!(kinds["f"], (false, true, false));
    assert_eq!(kinds["l"], (false, false, true));
}

#[test]
fn sticky_directory() {
    let node = Node::start();
    let d = node.path("tmp");
    fs::create_dir(&d).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).unwrap();
    let theirs = d.join("theirs");
    let r = as_user(NOBODY, NOBODY, || fs::write(&theirs, b"nobody's"));
    assert_eq!(r, Ok(()));
    // Another unprivileged user may not remove or rename it, though the dir is world-writable.
    let r = as_user(OTHER, OTHER, || fs::remove_file(&theirs));
    assert_eq!(r, Err(libc::EPERM));
    let r = as_user(OTHER, OTHER, || fs::rename(&theirs, d.join("stolen")));
    assert_eq!(r, Err(libc::EPERM));
    // The file's owner may; so may the directory's owner (root here, tested as root).
    let r = as_user(NOBODY, NOBODY, || fs::rename(&theirs, d.join("moved")));
    assert_eq!(r, Ok(()));
    let r = as_user(OTHER, OTHER, || fs::write(d.join("other"), b""));
    assert_eq!(r, Ok(()));
    let r = as_user(NOBODY, NOBODY, || fs::remove_file(d.join("other")));
    assert_eq!(r, Err(libc::EPERM));
    fs::remove_file(d.join("other")).unwrap();
    let r = as_user(NOBODY, NOBODY, || fs::remove_file(d.join("moved")));
    assert_eq!(r, Ok(()));
}

#[test]
fn setgid_directory_inheritance() {
    let node = Node::start();
    let d = node.path("shared");
    fs::create_dir(&d).unwrap();
    let c = cstr(&d);
    // SAFETY: valid path.
    check(unsafe { libc::chown(c.as_ptr(), 0, 4242) }).unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o2777)).unwrap();
    fs::write(d.join("f"), b"").unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    assert_eq!(lstat(&d.join("f")).unwrap().st_gid, 4242, "file gets the directory's group");
    let sub = lstat(&d.join("sub")).unwrap();
    assert_eq!(sub.st_gid, 4242, "subdirectory gets the directory's group");
    assert_ne!(sub.st_mode & libc::S_ISGID, 0, "subdirectory inherits setgid");
    // Also for another user who is not a member of the group.
    let r = as_user(NOBODY, NOBODY, || fs::write(d.join("n"), b""));
    assert_eq!(r, Ok(()));
    let st = lstat(&d.join("n")).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (NOBODY, 4242));
    // Without setgid the creator's group is used.
    let plain = node.path("plain");
    fs::create_dir(&plain).unwrap();
    fs::set_permissions(&plain, fs::Permissions::from_mode(0o777)).unwrap();
    let r = as_user(NOBODY, NOBODY, || fs::write(plain.join("n"), b""));
    assert_eq!(r, Ok(()));
    assert_eq!(lstat(&plain.join("n")).unwrap().st_gid, NOBODY);
    // A non-member creating a setgid file in the setgid dir: the kernel strips S_ISGID.
    let r = as_user_groups(NOBODY, NOBODY, &[], || {
        let p = d.join("sgid-by-nonmember");
        let c = cstr(&p);
        // SAFETY: valid path.
        let fd = check(unsafe { libc::open(c.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o2755) })?;
        // SAFETY: fd was just opened.
        unsafe { libc::close(fd) };
        Ok(())
    });
    assert_eq!(r, Ok(()));
    let st = lstat(&d.join("sgid-by-nonmember")).unwrap();
    assert_eq!(st.st_mode & libc::S_ISGID, 0, "setgid kept on a file created by a non-member");
}

#[test]
fn a_single_node_lets_the_kernel_remember_absent_names() {
    // A node without peers answers a lookup of an absent name with a negative entry, which the
    // kernel keeps for the entry TTL: asking again for the same absent name (include paths,
    // PATH) costs no request. Creating the name through the kernel replaces the entry.
    let mut node = Node::prepare(Vec::new(), Some(Permit::acquire()), None, "pickbox-fuse-test-");
    node.log_filter = Some("info,fuser::request=debug".into());
    node.spawn();
    let p = node.path("absent");
    let started = std::time::Instant::now();
    for _ in 0..3 {
        assert_eq!(errno_of(fs::metadata(&p)), libc::ENOENT);
    }
    let asked = node.log().lines().filter(|l| l.contains("LOOKUP name \"absent\"")).count();
    if started.elapsed() < std::time::Duration::from_millis(900) {
        // All three within the 1 s entry TTL: only the first reached Pickbox.
        assert_eq!(asked, 1, "lookups of the absent name that reached the filesystem");
    }
    fs::write(&p, b"here now").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"here now");
    fs::create_dir(node.path("d")).unwrap();
    assert_eq!(errno_of(fs::metadata(node.path("d/x"))), libc::ENOENT);
    std::os::unix::fs::symlink("target", node.path("d/x")).unwrap();
    assert_eq!(fs::read_link(node.path("d/x")).unwrap(), std::path::Path::new("target"));
}

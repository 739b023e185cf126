//! Process lifecycle: restart persistence (clean stop and kill -9 after fsync), external umount,
//! stale mounts after a crash, signals.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::Duration;

use crate::harness::{is_mounted, lstat, wait_until, Node, STOP_TIMEOUT};

/// Builds a small tree with every kind of metadata and returns a function that checks it.
fn populate(node: &Node) {
    fs::create_dir_all(node.path("dir/sub")).unwrap();
    fs::write(node.path("dir/sub/file"), b"persisted content").unwrap();
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(node.path("big"), &big).unwrap();
    fs::set_permissions(node.path("big"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("dir/sub/file", node.path("link")).unwrap();
    fs::hard_link(node.path("dir/sub/file"), node.path("hard")).unwrap();
    let c = crate::harness::cstr(&node.path("big"));
    let n = std::ffi::CString::new("user.k").unwrap();
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) }, 0);
    let times = [libc::timespec { tv_sec: 1_234_567_890, tv_nsec: 42 }; 2];
    // SAFETY: valid path and times.
    assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, 0);
}

fn verify(node: &Node) {
    assert_eq!(fs::read(node.path("dir/sub/file")).unwrap(), b"persisted content");
    let big = fs::read(node.path("big")).unwrap();
    assert_eq!(big.len(), 2_000_000);
    assert!(big.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8), "big file content changed");
    let st = lstat(&node.path("big")).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o640);
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_234_567_890, 42));
    assert_eq!(fs::read_link(node.path("link")).unwrap().to_str(), Some("dir/sub/file"));
    assert_eq!(fs::metadata(node.path("hard")).unwrap().nlink(), 2);
    let mut v = [0u8; 8];
    let c = crate::harness::cstr(&node.path("big"));
    let n = std::ffi::CString::new("user.k").unwrap();
    // SAFETY: buffer of the stated length.
    let len = unsafe { libc::getxattr(c.as_ptr(), n.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert_eq!(len, 1);
    assert_eq!(v[0], b'v');
}

#[test]
fn restart_after_clean_stop() {
    let mut node = Node::start();
    populate(&node);
    // Written and closed, but never fsync'ed: a clean stop must still keep it.
    let mut f = File::create(node.path("unsynced")).unwrap();
    f.write_all(b"no fsync").unwrap();
    drop(f);
    node.restart();
    verify(&node);
    assert_eq!(fs::read(node.path("unsynced")).unwrap(), b"no fsync");
    // New files after the restart get fresh inode numbers, distinct from the old ones.
    fs::write(node.path("after"), b"").unwrap();
    let inos: std::collections::HashSet<u64> =
        fs::read_dir(&node.mnt).unwrap().map(|e| e.unwrap().ino()).collect();
    assert_eq!(inos.len(), fs::read_dir(&node.mnt).unwrap().count(), "inode numbers reused");
    node.restart();
    verify(&node);
}

#[test]
fn sigint_stops_cleanly() {
    let mut node = Node::start();
    fs::write(node.path("x"), b"x").unwrap();
    node.signal(libc::SIGINT);
    let status = node.wait_exit(STOP_TIMEOUT).expect("node did not exit after SIGINT");
    assert!(status.success(), "exit status {status} after SIGINT");
    assert!(!is_mounted(&node.mnt));
    node.spawn();
    assert_eq!(fs::read(node.path("x")).unwrap(), b"x");
}

#[test]
fn restart_after_kill9_keeps_fsynced_data() {
    let mut node = Node::start();
    populate(&node);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(node.path("synced")).unwrap();
    f.write_all(b"fsync'ed before the crash").unwrap();
    f.sync_all().unwrap();
    // Also fsync the directories that got new entries (what a careful program does).
    File::open(&node.mnt).unwrap().sync_all().unwrap();
    for p in ["big", "dir/sub/file"] {
        File::open(node.path(p)).unwrap().sync_all().unwrap();
    }
    node.kill9();
    // The kernel mount is now stale; the next start must clean it up by itself.
    node.spawn();
    verify(&node);
    assert_eq!(fs::read(node.path("synced")).unwrap(), b"fsync'ed before the crash");
}

#[test]
fn stale_mount_is_cleaned_up_on_start() {
    let mut node = Node::start();
    fs::write(node.path("f"), b"f").unwrap();
    File::open(node.path("f")).unwrap().sync_all().unwrap();
    node.kill9();
    assert!(is_mounted(&node.mnt), "kill -9 should leave the mount behind");
    let e = crate::harness::statfs_errno(&node.mnt);
    assert_eq!(e, Some(libc::ENOTCONN), "a dead daemon's mount gives ENOTCONN");
    node.spawn();
    assert_eq!(fs::read(node.path("f")).unwrap(), b"f");
    // Exactly one mount at the mountpoint, not one stacked on the stale one.
    let n = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.split(' ').nth(4) == node.mnt.to_str())
        .count();
    assert_eq!(n, 1, "mounts stacked at {}", node.mnt.display());
    // The stale mount went only right before the new mount, after the replica had started: while
    // the node started, programs got ENOTCONN there, not the plain directory underneath.
    let log = node.log();
    let restart = &log[log.rfind("stale FUSE mount found: it is replaced when this node mounts").expect("stale mount seen at start")..];
    let started = restart.find("replica started").expect("replica started");
    let detached = restart.find("detaching the stale FUSE mount").expect("stale mount detached");
    assert!(started < detached, "detached before the replica started:\n{restart}");
    // One warning for the one stale mount (the node's log holds both starts).
    let warnings = log.lines().filter(|l| l.contains("WARN") && l.contains("stale FUSE mount")).count();
    assert_eq!(warnings, 1, "{log}");
}

#[test]
fn external_umount_stops_the_node() {
    let mut node = Node::start();
    fs::write(node.path("f"), b"before umount").unwrap();
    let st = Command::new("umount").arg(&node.mnt).status().expect("run umount");
    assert!(st.success(), "umount failed: {st}");
    let status = node.wait_exit(STOP_TIMEOUT).expect("node still running after an external umount");
    assert!(status.success(), "exit status {status} after an external umount");
    assert!(wait_until(Duration::from_secs(5), || !is_mounted(&node.mnt)));
    node.spawn();
    assert_eq!(fs::read(node.path("f")).unwrap(), b"before umount");
}

//! flock and fcntl record locks (node-local).

use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;

use crate::harness::{check, errno_of, wait_until, Node};

fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: f is open.
    check(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ())
}

#[test]
fn flock_conflicts_between_open_files() {
    let node = Node::start();
    let p = node.path("lock");
    fs::write(&p, b"").unwrap();
    let a = File::open(&p).unwrap();
    let b = File::open(&p).unwrap();
    flock(&a, libc::LOCK_EX).unwrap();
    assert_eq!(errno_of(flock(&b, libc::LOCK_EX | libc::LOCK_NB)), libc::EWOULDBLOCK);
    assert_eq!(errno_of(flock(&b, libc::LOCK_SH | libc::LOCK_NB)), libc::EWOULDBLOCK);
    flock(&a, libc::LOCK_UN).unwrap();
    flock(&b, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    flock(&a, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    assert_eq!(errno_of(flock(&a, libc::LOCK_EX | libc::LOCK_NB)), libc::EWOULDBLOCK);
    // Closing the holder releases its lock.
    drop(b);
    flock(&a, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    // A blocking waiter is woken when the holder unlocks.
    let c = File::open(&p).unwrap();
    let waiter = std::thread::spawn(move || flock(&c, libc::LOCK_EX).map(|_| c));
    // Wait until the kernel lists the waiter as blocked ("->" in /proc/locks), so the unlock
    // below really wakes a sleeping waiter rather than racing its first attempt.
    let blocked = wait_until(std::time::Duration::from_secs(10), || {
        fs::read_to_string("/proc/locks").map(|l| l.lines().any(|x| x.contains("-> FLOCK"))).unwrap_or(false)
    });
    assert!(blocked, "the blocking flock never showed up as a waiter in /proc/locks");
    flock(&a, libc::LOCK_UN).unwrap();
    let c = waiter.join().unwrap().unwrap();
    assert_eq!(errno_of(flock(&a, libc::LOCK_EX | libc::LOCK_NB)), libc::EWOULDBLOCK);
    drop(c);
}

fn lock_struct(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain data.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

fn fcntl_lock(f: &File, cmd: i32, kind: i32, start: i64, len: i64) -> std::io::Result<libc::flock> {
    let mut fl = lock_struct(kind, start, len);
    // SAFETY: f is open; fl is a valid flock.
    check(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) })?;
    Ok(fl)
}

#[test]
fn posix_record_locks_between_processes() {
    let node = Node::start();
    let p = node.path("rec");
    fs::write(&p, vec![0u8; 1000]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fcntl_lock(&f, libc::F_SETLK, libc::F_WRLCK, 100, 100).unwrap();
    let me = std::process::id() as i32;

    // A child process sees the conflict, the owner and the free ranges.
    // SAFETY: the child only makes syscalls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let code = (|| -> i32 {
            let g = match OpenOptions::new().read(true).write(true).open(&p) {
                Ok(g) => g,
                Err(_) => return 10,
            };
            match fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 150, 10) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) || e.raw_os_error() == Some(libc::EACCES) => {}
                _ => return 11,
            }
            match fcntl_lock(&g, libc::F_GETLK, libc::F_WRLCK, 0, 0) {
                Ok(fl) if fl.l_type == libc::F_WRLCK as i16 && fl.l_pid == me && fl.l_start == 100 && fl.l_len == 100 => {}
                _ => return 12,
            }
            // A range that does not overlap is free.
            if fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 200, 50).is_err() {
                return 13;
            }
            0
        })();
        // SAFETY: leave the child immediately.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status));
    assert_eq!(libc::WEXITSTATUS(status), 0, "child lock check failed at step {}", libc::WEXITSTATUS(status));

    // After the child exited its lock is gone; after we unlock, F_GETLK from here reports F_UNLCK.
    fcntl_lock(&f, libc::F_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    let fl = fcntl_lock(&f, libc::F_GETLK, libc::F_WRLCK, 0, 0).unwrap();
    assert_eq!(fl.l_type, libc::F_UNLCK as i16);
}

#[test]
fn ofd_locks_between_descriptions() {
    let node = Node::start();
    let p = node.path("ofd");
    fs::write(&p, vec![0u8; 100]).unwrap();
    let a = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let b = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fcntl_lock(&a, libc::F_OFD_SETLK, libc::F_RDLCK, 0, 50).unwrap();
    fcntl_lock(&b, libc::F_OFD_SETLK, libc::F_RDLCK, 0, 50).unwrap();
    let r = fcntl_lock(&b, libc::F_OFD_SETLK, libc::F_WRLCK, 10, 5);
    let e = errno_of(r);
    assert!(e == libc::EAGAIN || e == libc::EACCES, "got {e}");
    fcntl_lock(&a, libc::F_OFD_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    fcntl_lock(&b, libc::F_OFD_SETLK, libc::F_WRLCK, 10, 5).unwrap();
    let fl = fcntl_lock(&a, libc::F_OFD_GETLK, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!(fl.l_type, libc::F_WRLCK as i16);
    assert_eq!((fl.l_start, fl.l_len), (10, 5));
}

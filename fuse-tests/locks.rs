//! flock and fcntl record locks on one node (they are cluster-wide: Pickbox holds them in its
//! replicated state, so these go through the daemon; cluster.rs checks them across nodes).

use std::fs::{self, File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::time::Duration;

use crate::harness::{check, errno_of, wait_until, Node};

pub fn flock(f: &File, op: i32) -> std::io::Result<()> {
    // SAFETY: f is open.
    check(unsafe { libc::flock(f.as_raw_fd(), op) }).map(|_| ())
}

/// This thread's id.
pub fn gettid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() }
}

/// Whether thread `tid` of process `pid` is inside system call `nr` (blocked in it: its
/// /proc syscall file names the call while it sleeps there).
pub fn in_syscall(pid: u32, tid: i32, nr: libc::c_long) -> bool {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall"))
        .is_ok_and(|s| s.split_whitespace().next() == Some(nr.to_string().as_str()))
}

/// Start a blocking `flock(LOCK_EX)` of `p` on a thread; returns the thread and its id once it
/// is inside the call.
pub fn blocked_flock(p: &std::path::Path) -> std::thread::JoinHandle<std::io::Result<File>> {
    let c = File::open(p).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        flock(&c, libc::LOCK_EX).map(|_| c)
    });
    let tid = rx.recv().unwrap();
    let blocked = wait_until(Duration::from_secs(10), || waiter.is_finished() || in_syscall(std::process::id(), tid, libc::SYS_flock));
    assert!(blocked, "the blocking flock never showed up inside the call");
    assert!(!waiter.is_finished(), "the flock returned while another open file holds the lock");
    waiter
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
    // Closing the holder releases its lock: when the kernel's RELEASE arrives, which it sends
    // after close(2) returned (`flock_relock_right_after_close_under_writeback` relocks at once;
    // here the wait is bounded).
    drop(b);
    let taken = wait_until(Duration::from_secs(5), || flock(&a, libc::LOCK_EX | libc::LOCK_NB).is_ok());
    assert!(taken, "the closed file's shared lock was never released");
    // A blocking waiter is woken when the holder unlocks.
    let waiter = blocked_flock(&p);
    flock(&a, libc::LOCK_UN).unwrap();
    let c = waiter.join().unwrap().unwrap();
    assert_eq!(errno_of(flock(&a, libc::LOCK_EX | libc::LOCK_NB)), libc::EWOULDBLOCK);
    drop(c);
}

/// A process that closes a locked file and at once locks it through another open file gets the
/// lock, also while writeback keeps background requests outstanding: the RELEASE that drops the
/// closed file's flock is sent after close(2) returned. With fuser's default of 16 background
/// requests it waited in the kernel's queue behind the writeback (fails then: 6 and 12 of 1,000
/// rounds in a debug build without the daemon's wait for it, `RELEASE_AFTER_FLUSH_WAIT_MS`);
/// `FUSE_MAX_BACKGROUND` keeps that queue empty. The release's drop of the lock can still be
/// applied just after the new request (about 1 of 600 rounds): the request asks again then
/// (`LockWaits::drops_done`). And the new lock holds: it is not dropped with the closed one's.
#[test]
fn flock_relock_right_after_close_under_writeback() {
    // Without the wait 5-9 of 1,000 rounds failed in a debug build: 600 rounds keep the load
    // on the machine short and still fail without it nearly always.
    let node = Node::start();
    relock_rounds(&node.path("relock"), &node.path("big"), 64, 600);
}

/// The same with every RELEASE answered 20 ms late (a busy node): the request that meets the
/// closed file's lock waits for that RELEASE, also when a drop of another closed file's lock
/// (the previous round's) finished while it was proposed (that used to use up its one wait:
/// 10 of 750 rounds failed).
#[cfg(feature = "failpoints")]
#[test]
fn flock_relock_right_after_close_whose_release_is_late() {
    let mut node = Node::prepare(Vec::new(), Some(crate::harness::Permit::acquire()), None, "pickbox-fuse-test-");
    node.failpoints = Some("fuse-release=sleep(20)".into());
    node.spawn();
    relock_rounds(&node.path("relock"), &node.path("big"), 16, 200);
}

/// Rounds of: open file a, lock it (flock, then fcntl OFD locks for half as many rounds), close
/// it, open b and lock it without waiting (must succeed), open c and try (must fail: b holds
/// it), while another thread rewrites a `big_mib` MiB file `big` so that writeback keeps
/// background requests outstanding. Panics with the rounds that failed.
pub fn relock_rounds(p: &std::path::Path, big: &std::path::Path, big_mib: usize, rounds: usize) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    fs::write(p, b"").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = std::thread::spawn({
        let (stop, big) = (stop.clone(), big.to_path_buf());
        move || -> u64 {
            // Rewrites the file until told to stop (or the mount goes): its dirty pages keep
            // writeback busy.
            let chunk = vec![7u8; 1 << 20];
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut f) = File::create(&big) else { break };
                for _ in 0..big_mib {
                    if stop.load(Ordering::Relaxed) || f.write_all(&chunk).is_err() {
                        break;
                    }
                    written += 1;
                }
            }
            written
        }
    });
    // flock(2) and fcntl OFD locks: both belong to the open file and go at its RELEASE.
    let flock_ex = |f: &File, wait: bool| flock(f, libc::LOCK_EX | if wait { 0 } else { libc::LOCK_NB }).map(drop);
    let ofd_ex = |f: &File, wait: bool| {
        let cmd = if wait { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
        fcntl_lock(f, cmd, libc::F_WRLCK, 0, 0).map(drop)
    };
    let kinds: [(&str, &dyn Fn(&File, bool) -> std::io::Result<()>, usize); 2] =
        [("flock", &flock_ex, rounds), ("OFD", &ofd_ex, rounds / 2)];
    let (mut failed, mut lost) = (Vec::new(), Vec::new());
    let open = || OpenOptions::new().read(true).write(true).open(p).unwrap();
    for (name, lock_ex, rounds) in kinds {
        for round in 0..rounds {
            let a = open();
            lock_ex(&a, true).unwrap();
            drop(a);
            let b = open();
            if let Err(e) = lock_ex(&b, false) {
                failed.push((name, round, e.to_string()));
                continue;
            }
            // b holds the lock: another open file may not get it (the kernel often gives b the
            // closed a's address, which named the owner of both locks, and a's release dropped
            // b's lock with its own).
            let c = open();
            if lock_ex(&c, false).is_ok() {
                lost.push((name, round));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mib = writer.join().unwrap();
    assert!(mib > 0, "the writer wrote nothing");
    assert!(failed.is_empty(), "{} relocks right after a close met the closed file's lock: {failed:?}", failed.len());
    assert!(lost.is_empty(), "{} relocks lost their lock to the closed file's release: {lost:?}", lost.len());
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

pub fn fcntl_lock(f: &File, cmd: i32, kind: i32, start: i64, len: i64) -> std::io::Result<libc::flock> {
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

/// A process blocked waiting for a lock can be killed (the kernel interrupts the request it waits
/// in, which the daemon answers EINTR); it takes nothing with it, and leaves no lock behind.
#[test]
fn a_process_waiting_for_a_lock_can_be_killed() {
    let node = Node::start();
    let p = node.path("held");
    fs::write(&p, b"").unwrap();
    let holder = File::open(&p).unwrap();
    flock(&holder, libc::LOCK_EX).unwrap();
    let mut child = std::process::Command::new("flock").arg(&p).arg("true").spawn().expect("run flock(1)");
    let pid = child.id();
    let blocked = wait_until(Duration::from_secs(10), || in_syscall(pid, pid as i32, libc::SYS_flock));
    assert!(blocked, "flock(1) never blocked in flock(2)");
    // SAFETY: our own child.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let exited = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    assert!(exited, "the killed waiter never exited (stuck in its lock request)");
    // flock(1) -w: its timer's signal (a handler without SA_RESTART) interrupts the wait, the
    // call fails with EINTR, and flock(1) gives up with status 1 instead of waiting on.
    let st = std::process::Command::new("flock").args(["-w", "0.2"]).arg(&p).arg("true").status().expect("run flock(1)");
    assert_eq!(st.code(), Some(1), "flock -w did not time out: {st}");
    // The killed waiter took nothing: once the holder unlocks, the lock is free for others.
    flock(&holder, libc::LOCK_UN).unwrap();
    let other = File::open(&p).unwrap();
    flock(&other, libc::LOCK_EX | libc::LOCK_NB).unwrap();
}

/// fcntl locks through the daemon keep POSIX's rules: a process's locks go when it closes any
/// descriptor of the file, and ranges split and merge.
#[test]
fn posix_locks_go_at_any_close_and_split() {
    let node = Node::start();
    let p = node.path("split");
    fs::write(&p, vec![0u8; 100]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fcntl_lock(&f, libc::F_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    fcntl_lock(&f, libc::F_SETLK, libc::F_UNLCK, 40, 20).unwrap();
    // An OFD lock is another owner: it meets the process's lock on both sides of the hole.
    let g = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    fcntl_lock(&g, libc::F_OFD_SETLK, libc::F_WRLCK, 40, 20).unwrap();
    for (start, len) in [(39, 2), (59, 2)] {
        let e = errno_of(fcntl_lock(&g, libc::F_OFD_SETLK, libc::F_WRLCK, start, len));
        assert!(e == libc::EAGAIN || e == libc::EACCES, "{start}+{len}: got {e}");
    }
    // (An OFD query reports no pid: the kernel shows -1.)
    let fl = fcntl_lock(&g, libc::F_OFD_GETLK, libc::F_WRLCK, 0, 0).unwrap();
    assert_eq!((fl.l_type, fl.l_start, fl.l_len), (libc::F_WRLCK as i16, 0, 40));
    // Closing another descriptor of the file drops all of this process's locks on it.
    drop(File::open(&p).unwrap());
    fcntl_lock(&g, libc::F_OFD_SETLK, libc::F_WRLCK, 0, 100).unwrap();
    fcntl_lock(&g, libc::F_OFD_SETLK, libc::F_UNLCK, 0, 0).unwrap();
    drop(f);
}

/// A node killed while its processes hold locks drops them when it starts again (their holders
/// are gone): a lock of its earlier run does not block the processes of its new one.
#[test]
fn locks_of_a_killed_node_go_at_its_restart() {
    let mut node = Node::start();
    let p = node.path("crash-held");
    fs::write(&p, vec![0u8; 10]).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    flock(&f, libc::LOCK_EX).unwrap();
    fcntl_lock(&f, libc::F_SETLK, libc::F_WRLCK, 0, 5).unwrap();
    node.kill9();
    drop(f);
    node.spawn();
    let g = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    flock(&g, libc::LOCK_EX | libc::LOCK_NB).expect("the flock of the killed run is gone");
    // Another process (a child) takes the byte range: the dead run's record lock is gone too.
    // SAFETY: the child only makes syscalls and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = fcntl_lock(&g, libc::F_SETLK, libc::F_WRLCK, 0, 5).is_ok();
        // SAFETY: leave the child at once.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(libc::WEXITSTATUS(status), 0, "the record lock of the killed run is still held");
}

//! Starts and stops real `pickbox mount` processes on fresh temp dirs, and small syscall helpers.
//!
//! Every node a test starts is owned by a `Node`, whose `Drop` stops it by PID (SIGTERM, then
//! SIGKILL), lazily unmounts a mount left behind and removes the temp dirs, also when the test
//! panics. Waiting is always a polled condition with a deadline, never a fixed sleep.

use std::ffi::{CString, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a node may take to mount (debug build, shared 2-core machine).
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM or an external umount.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// A SIGKILLed node not gone after this long is stuck in the kernel on its FUSE connection (a
/// thread in a cache invalidation that waits for a directory lock a pending request holds); its
/// next start must clear it (`pickbox mount` aborts the connection of a dying predecessor).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long a restart may take to clear a stuck predecessor.
const DYING_WAIT: Duration = Duration::from_secs(15);
/// A node still running this long after its test started is killed (SIGKILL), so that a hung
/// FUSE request fails with ENOTCONN and the test fails instead of hanging the whole run.
const TEST_SECONDS_MAX_DEFAULT: u64 = 240;
/// Nodes running at once in this test process unless `PICKBOX_FUSE_TESTS_PARALLEL` says otherwise.
const PARALLEL_NODES_DEFAULT: usize = 2;

/// Counts running nodes so that `cargo test` (one thread per core or more) stays gentle.
static RUNNING: Mutex<usize> = Mutex::new(0);
static RUNNING_CHANGED: Condvar = Condvar::new();

fn parallel_nodes_max() -> usize {
    std::env::var("PICKBOX_FUSE_TESTS_PARALLEL")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(PARALLEL_NODES_DEFAULT)
}

/// Slots among the nodes allowed to run at once; released on drop.
pub struct Permit {
    slots: usize,
}

impl Permit {
    pub fn acquire() -> Permit {
        Permit::acquire_slots(1)
    }

    /// Takes `slots` slots at once (never one by one, so two clusters cannot each hold half and
    /// wait for the rest). More slots than the maximum are capped: such a user runs alone.
    pub fn acquire_slots(slots: usize) -> Permit {
        let max = parallel_nodes_max();
        let slots = slots.clamp(1, max);
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *running + slots > max {
            running = RUNNING_CHANGED.wait(running).unwrap_or_else(|e| e.into_inner());
        }
        *running += slots;
        Permit { slots }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        *running -= self.slots;
        RUNNING_CHANGED.notify_all();
    }
}

/// Fails the test with a clear message when FUSE tests cannot run here (they never pass silently).
pub fn require_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "fuse-tests need root (euid is {euid}): run them as root, e.g. `sudo -E cargo test --test fuse`"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "fuse-tests need /dev/fuse: load the fuse module or run in a container with --device /dev/fuse"
    );
}

/// The `pickbox` binary that cargo built for this test target.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pickbox"))
}

/// One node: its temp dir (mountpoint + data dir) and, while running, its process.
pub struct Node {
    dir: Option<tempfile::TempDir>,
    pub mnt: PathBuf,
    pub data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// A killed process that could not exit (stuck on its FUSE connection `.1`), until reaped.
    dying: Option<(Child, Option<u32>)>,
    /// Arguments after `mount MNT --data-dir DATA`, the same at every start.
    args: Vec<OsString>,
    starts: u32,
    /// The PID the watchdog may kill; None once reaped or dropped.
    watched: Arc<Mutex<Option<u32>>>,
    /// Mounts the test made itself (a small tmpfs as data dir), detached after the node stops.
    extra_mounts: Vec<PathBuf>,
    /// None for a node of a `Cluster`, which holds the permit for all its nodes.
    _permit: Option<Permit>,
    /// The node's RUST_LOG, if not the test process's (set before `spawn`).
    pub log_filter: Option<String>,
    /// The node's FAILPOINTS, if not the test process's (a build with `--features failpoints`;
    /// set before `spawn`).
    pub failpoints: Option<String>,
}

impl Node {
    /// Starts a node on a fresh data dir and waits until its mount is live.
    pub fn start() -> Node {
        Node::start_with_data_fs(None)
    }

    /// Starts a node whose data dir is a tmpfs of `bytes` (to fill the disk on purpose).
    pub fn start_on_tmpfs(bytes: u64) -> Node {
        Node::start_with_data_fs(Some(bytes))
    }

    fn start_with_data_fs(tmpfs_bytes: Option<u64>) -> Node {
        let mut node = Node::prepare(Vec::new(), Some(Permit::acquire()), tmpfs_bytes, "pickbox-fuse-test-");
        node.spawn();
        node
    }

    /// A node that is not started yet: its temp dir, the extra `mount` arguments, its watchdog.
    /// `permit` is None when the caller holds one for it (a cluster).
    pub fn prepare(args: Vec<OsString>, permit: Option<Permit>, tmpfs_bytes: Option<u64>, prefix: &str) -> Node {
        Node::prepare_with_limit(args, permit, tmpfs_bytes, prefix, TEST_SECONDS_MAX_DEFAULT)
    }

    /// Like `prepare`, with the watchdog's limit (`PICKBOX_FUSE_TEST_SECONDS_MAX` overrides it).
    pub fn prepare_with_limit(
        args: Vec<OsString>,
        permit: Option<Permit>,
        tmpfs_bytes: Option<u64>,
        prefix: &str,
        seconds_max: u64,
    ) -> Node {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create temp dir");
        // Other users (as_user) must be able to reach the mount whatever the umask made it.
        fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod temp dir");
        let mnt = dir.path().join("mnt");
        let data = dir.path().join("data");
        fs::create_dir(&mnt).expect("create mountpoint");
        fs::create_dir(&data).expect("create data dir");
        let log = dir.path().join("node.log");
        let mut extra_mounts = Vec::new();
        if let Some(bytes) = tmpfs_bytes {
            let st = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "pickbox-test-data"])
                .arg(&data)
                .status()
                .expect("run mount -t tmpfs");
            assert!(st.success(), "mount -t tmpfs failed: {st}");
            extra_mounts.push(data.clone());
        }
        let watched = Arc::new(Mutex::new(None));
        start_watchdog(Arc::clone(&watched), mnt.clone(), seconds_max);
        Node {
            dir: Some(dir),
            mnt,
            data,
            log,
            child: None,
            dying: None,
            args,
            starts: 0,
            watched,
            extra_mounts,
            _permit: permit,
            log_filter: None,
            failpoints: None,
        }
    }

    /// The mountpoint joined with `rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The node's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts the process (again) on the same data dir and mountpoint and waits for the mount.
    pub fn spawn(&mut self) {
        if let Err(e) = self.try_spawn(MOUNT_TIMEOUT) {
            panic!("{e}");
        }
    }

    /// Like `spawn`, but says why the node did not mount (it exited, or not within `timeout`).
    pub fn try_spawn(&mut self, timeout: Duration) -> Result<(), String> {
        self.spawn_process();
        self.wait_mounted(timeout)?;
        self.reap_dying()
    }

    /// After a start: the killed predecessor stuck on its connection must be gone now.
    fn reap_dying(&mut self) -> Result<(), String> {
        let Some((mut child, conn)) = self.dying.take() else { return Ok(()) };
        let pid = child.id();
        if wait_until(DYING_WAIT, || child.try_wait().expect("try_wait").is_some()) {
            eprintln!("node: the restart cleared pid {pid}, which was stuck on FUSE connection {conn:?}");
            Ok(())
        } else {
            self.dying = Some((child, conn));
            Err(format!("pid {pid}, killed and stuck on FUSE connection {conn:?}, is still there after the restart"))
        }
    }

    /// Starts the process without waiting for the mount.
    pub fn spawn_process(&mut self) {
        assert!(self.child.is_none(), "node already running");
        self.starts += 1;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open node log");
        let log2 = log.try_clone().expect("clone log fd");
        let mut cmd = Command::new(binary());
        // SAFETY: prctl is async-signal-safe. If the test process dies (timeout, ^C), the node
        // gets SIGTERM and unmounts instead of lingering.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd
            .arg("mount")
            .arg(&self.mnt)
            .arg("--data-dir")
            .arg(&self.data)
            .args(&self.args)
            .env(
                "RUST_LOG",
                self.log_filter.clone().unwrap_or_else(|| std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into())),
            )
            .env("RUST_BACKTRACE", "1")
            .envs(self.failpoints.iter().map(|f| ("FAILPOINTS", f)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("spawn pickbox");
        *self.watched.lock().unwrap_or_else(|e| e.into_inner()) = Some(child.id());
        self.child = Some(child);
    }

    /// Waits until the mount answers; fails if the process exits first or `timeout` passes.
    pub fn wait_mounted(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.wait_exit(Duration::ZERO) {
                return Err(format!("pickbox exited before mounting ({status}); log:\n{}", self.log_tail()));
            }
            if is_mounted(&self.mnt) && is_live(&self.mnt) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "mount {} not live after {:?}; log:\n{}",
                    self.mnt.display(),
                    timeout,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process runs (started and not yet reaped).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.wait_exit(Duration::ZERO).is_none()
    }

    /// Sends a signal to the running process.
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("node not running") as libc::pid_t;
        // SAFETY: kill has no memory preconditions; pid is our own child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }

    /// Waits for the process to exit, up to `timeout`; returns its status or None.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            // Stop the watchdog from signalling this PID before it is reaped and can be reused.
            let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(status) = child.try_wait().expect("try_wait") {
                *watched = None;
                self.child = None;
                return Some(status);
            }
            drop(watched);
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Clean stop: SIGTERM, expect exit status 0 and the mount gone.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(STOP_TIMEOUT);
        let status = status.unwrap_or_else(|| panic!("node did not exit after SIGTERM; log:\n{}", self.log_tail()));
        assert!(status.success(), "node exited with {status} after SIGTERM; log:\n{}", self.log_tail());
        assert!(!is_mounted(&self.mnt), "mount still present after a clean stop");
    }

    /// Crash: SIGKILL and reap; the kernel mount stays behind (stale) on purpose.
    ///
    /// A process that cannot exit (a thread stuck in the kernel on its FUSE connection, which only
    /// an abort of the connection ends) is kept aside: the next start must clear it.
    /// Returns whether it was left so.
    pub fn kill9(&mut self) -> bool {
        let conn = fuse_connection(&self.mnt);
        self.signal(libc::SIGKILL);
        match self.wait_exit(KILL_WAIT) {
            Some(status) => {
                assert_eq!(status.signal(), Some(libc::SIGKILL));
                false
            }
            None => {
                let child = self.child.take().expect("running");
                eprintln!(
                    "node: pid {} not gone {KILL_WAIT:?} after SIGKILL (stuck on FUSE connection {conn:?}); \
                     the next start must clear it",
                    child.id()
                );
                self.dying = Some((child, conn));
                true
            }
        }
    }

    /// Restart after a clean stop.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The node's whole log (all its starts).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the node's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(60);
        lines[from..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.watched.lock().map(|mut w| w.take());
        let panicking = std::thread::panicking();
        if self.child.is_some() {
            let conn = fuse_connection(&self.mnt);
            // A stalled node (a test's SIGSTOP) would not act on SIGTERM.
            self.signal(libc::SIGCONT);
            self.signal(libc::SIGTERM);
            if self.wait_exit(STOP_TIMEOUT).is_none() {
                self.signal(libc::SIGKILL);
                if self.wait_exit(KILL_WAIT).is_none() {
                    // Stuck on its connection: only an abort lets it finish exiting.
                    if let Some(c) = conn {
                        abort_fuse_connection(c);
                    }
                    let _ = self.wait_exit(STOP_TIMEOUT);
                }
            }
        }
        if let Some((mut child, conn)) = self.dying.take() {
            if child.try_wait().ok().flatten().is_none() {
                if let Some(c) = conn {
                    abort_fuse_connection(c);
                }
                let _ = child.kill();
                // Bounded: a process that still cannot exit must not hang the test run.
                if !wait_until(STOP_TIMEOUT, || child.try_wait().ok().flatten().is_some()) {
                    eprintln!("node: pid {} still there after its connection was aborted", child.id());
                }
            }
        }
        if is_mounted(&self.mnt) {
            lazy_unmount(&self.mnt);
        }
        // The log lives outside the data dir, so it survives this.
        let log_tail = if panicking { self.log_tail() } else { String::new() };
        for m in self.extra_mounts.drain(..) {
            lazy_unmount(&m);
        }
        if panicking {
            eprintln!("---- pickbox log ({}) ----\n{log_tail}", self.log.display());
        }
        if let Some(dir) = self.dir.take() {
            if std::env::var_os("PICKBOX_KEEP_TEST_DIRS").is_some() {
                eprintln!("keeping {}", dir.keep().display());
            } else {
                // The kernel may still hold the just-unmounted mountpoint for a moment (EBUSY).
                let path = dir.keep();
                let mut last = None;
                let removed = wait_until(Duration::from_secs(5), || match fs::remove_dir_all(&path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                    Err(e) => {
                        last = Some(e);
                        false
                    }
                });
                if !removed {
                    eprintln!("cannot remove {}: {last:?}", path.display());
                }
            }
        }
    }
}

/// Kills the watched PID if it is still running when the test's time is up.
fn start_watchdog(watched: Arc<Mutex<Option<u32>>>, mnt: PathBuf, seconds_max: u64) {
    let secs = std::env::var("PICKBOX_FUSE_TEST_SECONDS_MAX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(seconds_max);
    let deadline = Instant::now() + Duration::from_secs(secs);
    std::thread::spawn(move || loop {
        // Polls once a second until the Node is gone (only the watchdog holds the Arc then).
        std::thread::sleep(Duration::from_secs(1));
        if Arc::strong_count(&watched) == 1 {
            return;
        }
        if Instant::now() >= deadline {
            let guard = watched.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(pid) = *guard {
                eprintln!("watchdog: test ran over {secs} s: SIGKILL pickbox pid {pid} ({})", mnt.display());
                let conn = fuse_connection(&mnt);
                // SAFETY: the PID is not yet reaped (the lock keeps wait_exit from reaping it now).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                // Requests of the test blocked on the mount fail at once, also if the process
                // cannot finish exiting (a thread stuck on the connection).
                if let Some(c) = conn {
                    abort_fuse_connection(c);
                }
            }
            return;
        }
    });
}

/// Mountinfo lookups (nothing that could wait on the mount): whether `mnt` is a mountpoint, and
/// the FUSE connection number of the mount there.
pub use pickbox::fs::{fuse_connection, is_mount_point as is_mounted};

/// Aborts FUSE connection `conn` through fusectl: every request waiting on it fails with ENOTCONN.
pub fn abort_fuse_connection(conn: u32) {
    match pickbox::fs::abort_fuse_connection(conn) {
        Ok(()) => eprintln!("node: aborted FUSE connection {conn}"),
        Err(e) => eprintln!("node: cannot abort FUSE connection {conn}: {e}"),
    }
}

/// statfs's `f_type` of a FUSE filesystem (`FUSE_SUPER_MAGIC`).
pub const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Whether a live FUSE filesystem answers at `mnt`. statfs always reaches the daemon (the kernel
/// does not cache it), unlike stat, which a stale mount may still answer from the attribute cache.
/// The type matters: a restarting node detaches the stale mount a crash left before it mounts
/// again, so between a check of mountinfo (which still listed the stale mount) and this statfs the
/// mountpoint can be the plain directory underneath, whose statfs succeeds too.
pub fn is_live(mnt: &Path) -> bool {
    statfs(mnt).is_ok_and(|st| st.f_type == FUSE_SUPER_MAGIC)
}

/// The errno of statfs on `mnt`, or None if it succeeded.
pub fn statfs_errno(mnt: &Path) -> Option<i32> {
    statfs(mnt).err()
}

/// statfs(2) of `mnt`, or its errno.
fn statfs(mnt: &Path) -> Result<libc::statfs, i32> {
    let c = cstr(mnt);
    // SAFETY: zeroed statfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    match check(unsafe { libc::statfs(c.as_ptr(), &mut st) }) {
        Ok(_) => Ok(st),
        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// `umount -l`: detach the mount even if its daemon is gone.
pub fn lazy_unmount(mnt: &Path) {
    let c = cstr(mnt);
    // SAFETY: c is a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Waits until `cond` holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Turns a libc return value into a Result carrying errno.
pub fn check<T: PartialOrd + Default + Copy>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The errno of a failed result; panics if it succeeded.
pub fn errno_of<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("not an OS error: {e}")),
    }
}

/// lstat through libc, to see every field.
pub fn lstat(p: &Path) -> io::Result<libc::stat> {
    let c = cstr(p);
    // SAFETY: zeroed stat is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::lstat(c.as_ptr(), &mut st) })?;
    Ok(st)
}

/// Runs `f` as `uid:gid` (no supplementary groups) and returns Ok or its errno.
///
/// `f` runs on a fresh thread that alone switches credentials, so other test threads are not
/// affected. `f` returns `Ok(())` or the errno of the syscall that failed; a panic in `f` is
/// re-raised in the caller.
pub fn as_user(uid: u32, gid: u32, f: impl FnOnce() -> io::Result<()> + Send) -> Result<(), i32> {
    as_user_groups(uid, gid, &[], f)
}

/// Like `as_user` with supplementary groups.
///
/// Linux keeps credentials per thread; glibc's `setresuid` and friends broadcast a change to every
/// thread of the process, the raw system calls do not. So the raw calls on a thread of our own
/// change only that thread, which exits afterwards, and nothing is forked (forking this
/// multithreaded process and running arbitrary code in the child could deadlock on a lock some
/// other thread held at the fork). The FUSE request carries the thread's id and credentials, and
/// `/proc/<tid>/status` shows the thread's groups, so the filesystem sees exactly this caller.
pub fn as_user_groups(
    uid: u32,
    gid: u32,
    groups: &[u32],
    f: impl FnOnce() -> io::Result<()> + Send,
) -> Result<(), i32> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    let outcome = std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: raw credential system calls on this thread only; the pointer and length
                // describe `groups`, which outlives the call.
                let switched = unsafe {
                    libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0
                        && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                };
                if !switched {
                    return Err(io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
    });
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(e)) => panic!("as_user: could not switch to {uid}:{gid}: {e}"),
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(e.raw_os_error().unwrap_or_else(|| panic!("as_user: error without errno: {e}"))),
    }
}

/// The user and group every Debian system has.
pub const NOBODY: u32 = 65534;
/// A second unprivileged uid/gid that needs no passwd entry.
pub const OTHER: u32 = 65533;

/// This process's umask.
pub fn umask() -> u32 {
    // SAFETY: umask only swaps the process mask; it is set straight back.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

/// CLOCK_REALTIME_COARSE as (sec, nsec): the clock the kernel stamps inode times with.
pub fn coarse_now() -> (i64, i64) {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a timespec.
    check(unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) }).expect("clock_gettime");
    (ts.tv_sec, ts.tv_nsec)
}


//! Mounting and unmounting: session options, stale-mount cleanup, ordered unmount.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use nix::mount::{umount2, MntFlags};

use super::{Ops, PickboxFs};

/// fuser worker threads, each with its own /dev/fuse fd (clone_fd) and a 16 MiB buffer. At least
/// two, so a slow read never stalls every request (and notifications can never deadlock us).
const FUSE_THREADS: usize = 4;
/// The mount source (fsname) that marks our mounts in /proc/self/mountinfo.
const FS_NAME: &str = "pickbox";
/// Where fusectl lists FUSE connections.
const FUSECTL_DIR: &str = "/sys/fs/fuse/connections";
/// How long an unmount waits for the session to end before aborting the FUSE connection.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);
/// How often the unmount wait looks at the session thread.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long an unmount waits for the kernel to write back its dirty pages (syncfs) first.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// The kernel's readahead for the mount (its bdi's `read_ahead_kb`), raised from the default
/// 128 KiB. A READ is at most max_pages long, which follows max_write (WRITE_BYTES_MAX, 1 MiB), so
/// a sequential read then arrives as 1 MiB READs, and a window of one READ per worker thread
/// keeps every worker busy (the store's disk reads for one READ are serial). Measured on a cold
/// 256 MiB read (one mount, readahead changed between interleaved runs): 128 KiB 306-424 MiB/s,
/// 1 MiB 429-519, 2 MiB 483-532, 4 MiB 490-565, 8 MiB 460-556.
const READ_AHEAD_KIB: usize = FUSE_THREADS * crate::config::WRITE_BYTES_MAX / 1024;
/// Where the kernel lists backing devices, by "major:minor" of the mount's device.
const BDI_DIR: &str = "/sys/class/bdi";
/// Set to `0` to mount without the kernel's writeback cache (every write(2) then becomes one
/// FUSE WRITE, answered once committed), `1` (the default) to mount with it.
const WRITEBACK_ENV: &str = "PICKBOX_WRITEBACK_CACHE";

/// Whether to ask for the kernel's writeback cache. On by default, in a cluster too: the kernel
/// owns the size, mtime and ctime of a cached regular file and ignores the size Pickbox reports,
/// even after `inval_inode` (measured on 6.18), so after another node's change the coherence
/// thread drops every name the kernel knows the file by (fs/names.rs) and the kernel evicts the
/// inode once unused; a file held open here while another node changes it is evicted at its
/// last close (close-to-open; its size grows meanwhile if another node made it longer, see
/// coherence.rs), and O_APPEND handles use direct I/O (see `open_flags` in mod.rs).
fn want_writeback() -> bool {
    !matches!(std::env::var(WRITEBACK_ENV).as_deref(), Ok("0" | "false" | "off" | "no"))
}

/// A live mount: the background session and what is needed to take it down.
pub struct Mounted {
    session: BackgroundSession,
    mountpoint: PathBuf,
    /// The FUSE connection number (minor of the mount's device), for /sys/fs/fuse/connections.
    connection: Option<u32>,
}

/// Mount `ops` at `mountpoint` and serve it from background threads. Blocks for the INIT
/// handshake with the kernel: call it from a blocking context.
pub fn mount(ops: Arc<Ops>, rt: tokio::runtime::Handle, mountpoint: &Path) -> io::Result<Mounted> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("pickbox".into()),
        MountOption::Subtype("pickbox".into()),
        // The kernel checks permissions against the attributes we report.
        MountOption::DefaultPermissions,
        // Not AutoUnmount: it goes through fusermount3 and made unmount hang (crate-notes).
    ];
    config.acl = SessionACL::All; // allow_other
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    // The stale mount a crash left goes only now, right before the new mount: until here
    // programs using the mountpoint got ENOTCONN from it, where a detached mountpoint would have
    // let them read and write the plain directory underneath for the whole start (log replay,
    // joining) and have it hidden by the new mount.
    cleanup_stale_mount(mountpoint)?;
    // /proc/self/mountinfo lists the canonical path; resolve it before the mount exists.
    let mountpoint = mountpoint.canonicalize()?;
    rt.spawn(super::fences::follow_lock_expiries(Arc::downgrade(&ops), ops.replica.own_lock_fence()));
    let fs = PickboxFs::new(ops.clone(), rt, want_writeback());
    let notifier_slot = fs.notifier_slot();
    let session = Session::new(fs, &mountpoint, &config)?;
    let _ = notifier_slot.set(session.notifier());
    let session = session.spawn()?;
    let connection = find_mount(&mountpoint).map(|m| m.minor);
    // Before anything is opened: a file takes the bdi's readahead at open.
    raise_readahead(&mountpoint);
    tracing::info!(mountpoint = %mountpoint.display(), ?connection, "mounted");
    Ok(Mounted { session, mountpoint, connection })
}

/// Set the mount's readahead to `READ_AHEAD_KIB` (needs root; FUSE offers no INIT field for a
/// larger value than the kernel's default). Without it reads still work, in smaller requests:
/// a failure is only logged.
fn raise_readahead(mountpoint: &Path) {
    let dev = match std::fs::metadata(mountpoint) {
        Ok(meta) => std::os::unix::fs::MetadataExt::dev(&meta),
        Err(e) => {
            tracing::info!(error = %e, "cannot stat the mount to raise its readahead");
            return;
        }
    };
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let path = Path::new(BDI_DIR).join(format!("{major}:{minor}")).join("read_ahead_kb");
    match std::fs::write(&path, READ_AHEAD_KIB.to_string()) {
        Ok(()) => tracing::debug!(path = %path.display(), kib = READ_AHEAD_KIB, "readahead raised"),
        Err(e) => tracing::info!(error = %e, path = %path.display(), "cannot raise the readahead: reads use the kernel's default"),
    }
}

impl Mounted {
    /// The FUSE connection number, if it was found.
    pub fn connection(&self) -> Option<u32> {
        self.connection
    }

    /// The mountpoint, canonical (as mountinfo lists it).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Has the session ended (for example because someone ran `umount` on the mountpoint)?
    pub fn is_finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Unmount (lazily, if still mounted) and wait for the session threads to end. If they have
    /// not ended after `UNMOUNT_WAIT` (files still open through a lazily detached mount), abort
    /// the FUSE connection so no request can arrive after the replica shuts down.
    pub fn unmount_and_join(self) -> io::Result<()> {
        if find_mount(&self.mountpoint).is_some_and(|m| m.is_pickbox()) {
            // With the writeback cache the kernel may hold dirty pages of files still open; a
            // forced unmount would drop them, so have them written (and committed) first.
            sync_mount(&self.mountpoint);
            unmount(&self.mountpoint);
        }
        let deadline = Instant::now() + UNMOUNT_WAIT;
        while !self.session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(POLL_INTERVAL);
        }
        if !self.session.guard.is_finished() {
            match self.connection {
                Some(conn) => {
                    tracing::warn!(conn, "FUSE session still busy after unmount: aborting the connection");
                    abort_connection(conn);
                }
                None => tracing::warn!("FUSE session still busy after unmount; waiting"),
            }
        }
        let result = match self.session.join() {
            // The connection went away under a worker's read because we unmounted it (or aborted
            // it above): the end this function asked for, not a failure. Seen once in CI (kernel
            // 6.18, a SIGTERM 13 ms after mounting).
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
                tracing::warn!(error = %e, "FUSE session ended by the connection's abort after the unmount");
                Ok(())
            }
            other => other,
        };
        tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted");
        result
    }
}

/// syncfs(2) on the mount: the kernel writes back its dirty pages, which the session (still
/// running) commits. From a helper thread, so a stuck request cannot stall the unmount for long.
fn sync_mount(mountpoint: &Path) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let path = mountpoint.to_path_buf();
    let spawned = std::thread::Builder::new().name("pickbox-syncfs".into()).spawn(move || {
        let result = std::fs::File::open(&path).and_then(|dir| {
            // SAFETY: syncfs on a valid open descriptor.
            match unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
        let _ = done_tx.send(result);
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start syncfs before unmount");
        return;
    }
    match done_rx.recv_timeout(SYNC_WAIT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "syncfs before unmount failed"),
        Err(_) => tracing::warn!("syncfs before unmount did not finish in time: unmounting anyway"),
    }
}

/// Unmount our mount at `mountpoint`. A plain unmount fails with EBUSY while files are open; then
/// force it (for FUSE that aborts the connection: open files see ENOTCONN instead of hanging on a
/// node that is going away) and detach whatever is left.
fn unmount(mountpoint: &Path) {
    match umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => return,
        Err(e) => tracing::info!(error = %e, "plain unmount failed: forcing"),
    }
    if let Err(e) = umount2(mountpoint, MntFlags::MNT_FORCE) {
        tracing::info!(error = %e, "forced unmount failed: detaching");
    }
    if find_mount(mountpoint).is_some_and(|m| m.is_pickbox()) {
        if let Err(e) = umount2(mountpoint, MntFlags::MNT_DETACH) {
            tracing::warn!(error = %e, "lazy unmount failed");
        }
    }
}

/// Abort FUSE connection `conn` through fusectl (mounting fusectl first if needed): every request
/// waiting on it fails with ENOTCONN, and so does every later one on its mount.
pub fn abort_fuse_connection(conn: u32) -> io::Result<()> {
    if !connection_listed(conn) {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("fusectl does not list FUSE connection {conn}")));
    }
    let abort = Path::new(FUSECTL_DIR).join(conn.to_string()).join("abort");
    std::fs::write(&abort, b"1").map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", abort.display())))
}

/// `abort_fuse_connection`, a failure logged.
fn abort_connection(conn: u32) {
    if let Err(e) = abort_fuse_connection(conn) {
        tracing::error!(conn, error = %e, "cannot abort the FUSE connection");
    }
}

/// The FUSE connection of the FUSE mount at `mountpoint` (the innermost one there), read from
/// mountinfo only: nothing that could wait on the mount, whose daemon may be dead or stuck.
pub fn fuse_connection(mountpoint: &Path) -> Option<u32> {
    find_mount(mountpoint).filter(|m| m.fs_type.starts_with("fuse")).map(|m| m.minor)
}

/// Whether anything is mounted at `path` (mountinfo only, as `fuse_connection`).
pub fn is_mount_point(path: &Path) -> bool {
    find_mount(path).is_some()
}

/// The file in a node's data directory that names the process serving its mount and the mount's
/// FUSE connection: `PID CONNECTION`. Written after mounting, removed after a clean unmount.
const MOUNT_RECORD: &str = "mount.pid";
/// How long a start waits for a dying predecessor to be gone once its connection is aborted.
const DYING_WAIT: Duration = Duration::from_secs(10);

/// Record that this process serves the mount on FUSE connection `connection` (see
/// `clear_dying_predecessor`). A failure is logged: the record only helps a later start.
pub fn record_mount(data_dir: &Path, connection: Option<u32>) {
    let Some(conn) = connection else { return };
    let path = data_dir.join(MOUNT_RECORD);
    let tmp = data_dir.join(format!("{MOUNT_RECORD}.tmp"));
    let written = std::fs::write(&tmp, format!("{} {conn}\n", std::process::id())).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(error = %e, path = %path.display(), "cannot record the mount's process and connection");
    }
}

/// Remove the record after a clean unmount.
pub fn clear_mount_record(data_dir: &Path) {
    match std::fs::remove_file(data_dir.join(MOUNT_RECORD)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => tracing::warn!(error = %e, "cannot remove the mount record"),
        _ => {}
    }
}

fn read_mount_record(data_dir: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(data_dir.join(MOUNT_RECORD)).ok()?;
    let mut fields = text.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let conn = fields.next()?.parse().ok()?;
    Some((pid, conn))
}

/// Before anything touches the mountpoint or the store: if the process that last served this
/// node's mount was killed but cannot finish exiting, abort its FUSE connection and wait for it to
/// be gone.
///
/// A killed node can stay half-dead: one of its threads blocked in the kernel in a cache
/// invalidation (`fuse_reverse_inval_entry` waits for the directory's lock), which a lookup in
/// that directory holds while it waits for an answer the dead node will never send. The process
/// keeps its /dev/fuse descriptor, so the kernel never ends the connection on its own; every
/// request on the mount hangs, and the store's lock stays held, so a new start could neither look
/// at the mountpoint nor open the store. Aborting the connection (fusectl) fails the pending
/// requests with ENOTCONN; the invalidation then finishes, and the process with it.
pub fn clear_dying_predecessor(data_dir: &Path, mountpoint: &Path) {
    let Some((pid, conn)) = read_mount_record(data_dir) else { return };
    if pid == std::process::id() || !is_dying(pid) {
        return;
    }
    // The connection must still be this node's: mounted at our mountpoint (or detached: listed
    // by fusectl and mounted nowhere else).
    let listed = connection_listed(conn);
    let here = find_mount(mountpoint).is_some_and(|m| m.is_pickbox() && m.minor == conn);
    let ours = as_mountinfo_path(mountpoint);
    let elsewhere = mounts_of_connection(conn).iter().any(|p| ours.as_deref() != Some(p.as_path()));
    if !here && (elsewhere || !listed) {
        return;
    }
    tracing::warn!(
        pid,
        conn,
        "the previous process of this node was killed but is stuck in the kernel on its FUSE connection: aborting the connection"
    );
    abort_connection(conn);
    let deadline = Instant::now() + DYING_WAIT;
    while is_dying(pid) && Instant::now() < deadline {
        std::thread::sleep(POLL_INTERVAL);
    }
    if is_dying(pid) {
        tracing::error!(pid, "the previous process is still not gone {DYING_WAIT:?} after its connection was aborted");
    } else {
        tracing::info!(pid, "the previous process is gone");
    }
}

/// A child process that aborts the node's FUSE connection when the node's main thread ends
/// without stopping it first (a `kill -9`, the OOM killer).
///
/// A killed node can stay half-dead, stuck on its own connection (see `clear_dying_predecessor`);
/// until something aborts the connection, every program touching the mount hangs and the
/// node's store stays locked. The guard learns of the death from its parent-death signal
/// (`PR_SET_PDEATHSIG`, sent when the thread that spawned it ends: the node's main thread, which
/// ends at once on SIGKILL, while the stuck thread cannot). A clean stop kills the guard first.
/// If the guard dies too (a whole process group killed), the next start clears the connection.
pub struct Guard {
    child: std::process::Child,
}

/// The guard's parent-death signal (blocked in the guard and taken with sigwait).
const GUARD_SIGNAL: libc::c_int = libc::SIGUSR1;

impl Guard {
    /// Start `pickbox guard-mount` for `connection` at `mountpoint` (as mountinfo lists it:
    /// `Mounted::mountpoint`). Call from the main thread.
    pub fn spawn(connection: u32, mountpoint: &Path) -> io::Result<Guard> {
        use std::os::unix::process::CommandExt;
        // This very binary, even if its file was replaced or removed since (a rebuild while the
        // node runs): /proc/self/exe still names the running one.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("guard-mount")
            .arg("--connection")
            .arg(connection.to_string())
            .arg("--mountpoint")
            .arg(mountpoint)
            .arg("--parent")
            .arg(std::process::id().to_string())
            .stdin(std::process::Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec. The signal is blocked
        // before it can arrive (the mask survives exec), so the guard takes it with sigwait
        // instead of dying of it.
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, GUARD_SIGNAL);
                if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0
                    || libc::prctl(libc::PR_SET_PDEATHSIG, GUARD_SIGNAL as libc::c_ulong) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        tracing::debug!(pid = child.id(), connection, "mount guard started");
        Ok(Guard { child })
    }

    /// A clean stop: end the guard before the unmount, so it never aborts anything.
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guard process (`pickbox guard-mount`): wait for the parent-death signal, then abort
/// `connection` if it is still the node's mount at `mountpoint`.
pub fn run_guard(connection: u32, mountpoint: &Path, parent: u32) -> io::Result<()> {
    // SAFETY: plain libc signal-set calls on a local set.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, GUARD_SIGNAL);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // The parent may have ended before the signal was armed: then it is no longer our parent.
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 == parent {
        let mut sig = 0;
        // SAFETY: set is initialised; sig is a valid out-parameter.
        let rc = unsafe { libc::sigwait(&set, &mut sig) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    let here = find_mount(mountpoint).is_some_and(|m| m.is_pickbox() && m.minor == connection);
    if !here {
        return Ok(());
    }
    tracing::warn!(
        parent,
        connection,
        mountpoint = %mountpoint.display(),
        "the node ended without unmounting (killed?): aborting its FUSE connection, so the mount fails with ENOTCONN instead of hanging"
    );
    abort_connection(connection);
    Ok(())
}

/// Whether process `pid` is exiting (its main thread gone, or SIGKILL pending) while some of its
/// threads still run or sleep in the kernel.
fn is_dying(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z'));
    let kill_bit = 1u64 << (libc::SIGKILL - 1);
    let killed = ["SigPnd:", "ShdPnd:"]
        .iter()
        .any(|f| field(f).and_then(|v| u64::from_str_radix(v, 16).ok()).is_some_and(|m| m & kill_bit != 0));
    (zombie || killed) && live_threads(pid) > 0
}

/// Threads of `pid` that have not exited (any state but zombie or dead).
fn live_threads(pid: u32) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the command name, which is in parentheses and may hold anything.
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            state.is_some_and(|c| c != 'Z' && c != 'X')
        })
        .count()
}

/// Where FUSE connection `conn` is mounted (pickbox mounts only).
fn mounts_of_connection(conn: u32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo_lines(&text)
        .filter(|(_, m)| m.is_pickbox() && m.minor == conn)
        .map(|(point, _)| PathBuf::from(std::ffi::OsStr::from_bytes(&point)))
        .collect()
}

/// Whether fusectl lists connection `conn` (mounting fusectl first if it is not).
fn connection_listed(conn: u32) -> bool {
    let dir = Path::new(FUSECTL_DIR);
    if !dir.join(conn.to_string()).exists() && find_mount(dir).is_none() {
        let mounted = nix::mount::mount(Some("fusectl"), dir, Some("fusectl"), nix::mount::MsFlags::empty(), None::<&str>);
        if let Err(e) = mounted {
            tracing::warn!(error = %e, "cannot mount fusectl at {FUSECTL_DIR}");
        }
    }
    dir.join(conn.to_string()).exists()
}

/// Check `mountpoint` before a node starts: create it if missing; a live mount there (or not a
/// directory) is an error. A stale FUSE mount left by a crashed process stays until `mount`
/// replaces it.
pub fn check_mountpoint(mountpoint: &Path) -> io::Result<()> {
    prepare_mountpoint(mountpoint, false)
}

/// Like `check_mountpoint`, and lazily unmount a stale FUSE mount ("Transport endpoint is not
/// connected").
fn cleanup_stale_mount(mountpoint: &Path) -> io::Result<()> {
    prepare_mountpoint(mountpoint, true)
}

fn prepare_mountpoint(mountpoint: &Path, detach_stale: bool) -> io::Result<()> {
    let stale = || {
        if detach_stale {
            // The start's `check_mountpoint` already warned about it: one warning per stale mount.
            tracing::info!(mountpoint = %mountpoint.display(), "detaching the stale FUSE mount");
            umount2(mountpoint, MntFlags::MNT_DETACH).map_err(io::Error::from)
        } else {
            tracing::warn!(mountpoint = %mountpoint.display(), "stale FUSE mount found: it is replaced when this node mounts");
            Ok(())
        }
    };
    match std::fs::metadata(mountpoint) {
        Ok(meta) if meta.is_dir() => {
            if let Some(m) = find_mount(mountpoint) {
                if m.fs_type.starts_with("fuse") {
                    // stat may be answered from the kernel's attribute cache even after the daemon
                    // died; statfs always asks the daemon, so it tells a dead connection apart.
                    if let Err(nix::errno::Errno::ENOTCONN) = nix::sys::statfs::statfs(mountpoint) {
                        return stale();
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} is already a live {} mount", mountpoint.display(), m.fs_type),
                    ));
                }
            }
            Ok(())
        }
        Ok(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", mountpoint.display()))),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => stale(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir_all(mountpoint),
        Err(e) => Err(e),
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct MountInfo {
    minor: u32,
    fs_type: String,
    source: String,
}

impl MountInfo {
    /// A FUSE mount of ours (the kernel shows type `fuse` or `fuse.pickbox`, source `pickbox`).
    fn is_pickbox(&self) -> bool {
        self.fs_type.starts_with("fuse") && self.source == FS_NAME
    }
}

/// The innermost mount at exactly `path`, if any.
fn find_mount(path: &Path) -> Option<MountInfo> {
    let abs = as_mountinfo_path(path)?;
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text, abs.as_os_str().as_encoded_bytes())
}

/// `path` as mountinfo spells it (absolute, symbolic links resolved), without touching `path`
/// itself: on a mount whose daemon is dead or stuck, even a stat of it can hang. Its parent is
/// resolved instead.
fn as_mountinfo_path(path: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(path).ok()?;
    let resolved = abs.parent().zip(abs.file_name()).and_then(|(parent, name)| parent.canonicalize().ok().map(|p| p.join(name)));
    Some(resolved.unwrap_or(abs))
}

fn parse_mountinfo(text: &str, path: &[u8]) -> Option<MountInfo> {
    // Later lines are mounted on top of earlier ones at the same point.
    let all: Vec<_> = mountinfo_lines(text).collect();
    all.into_iter().rev().find_map(|(point, m)| (point == path).then_some(m))
}

/// Every well-formed line of mountinfo `text`: (mountpoint, what is mounted there).
fn mountinfo_lines(text: &str) -> impl Iterator<Item = (Vec<u8>, MountInfo)> + '_ {
    text.lines().filter_map(|line| {
        let mut fields = line.split(' ');
        let dev = fields.nth(2)?;
        let point = fields.nth(1)?;
        let (_, after) = line.split_once(" - ")?;
        let mut after = after.split(' ');
        let fs_type = after.next()?.to_string();
        let source = after.next()?.to_string();
        let minor = dev.split_once(':')?.1.parse().ok()?;
        Some((unescape(point.as_bytes()), MountInfo { minor, fs_type, source }))
    })
}

/// Undoes the octal escapes of a mountinfo field (the kernel writes space, tab, newline and
/// backslash as `\ooo`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        // `\ooo` with a value above 0o377 is not an escape the kernel writes: keep it as text
        // rather than wrap around in a u8.
        let value = octal.map(|d| d.iter().fold(0u32, |v, &c| v * 8 + u32::from(c - b'0')));
        if let (b'\\', Some(v)) = (field[i], value.and_then(|v| u8::try_from(v).ok())) {
            out.push(v);
            i += 4;
        } else {
            out.push(field[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
        40 22 0:45 / /tmp/pbx\\040mnt rw,nosuid,nodev,relatime shared:20 - fuse.pickbox pickbox rw,user_id=0\n";

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape(br"/tmp/a\040b"), b"/tmp/a b");
        // An escape at the very end of the field.
        assert_eq!(unescape(br"/tmp/a\134"), b"/tmp/a\\");
        assert_eq!(unescape(br"\011"), b"\t");
        // Not escapes: too short, not octal, or above 0o377 (which must not wrap around).
        assert_eq!(unescape(br"/x\04"), br"/x\04");
        assert_eq!(unescape(br"/x\09a"), br"/x\09a");
        assert_eq!(unescape(br"/x\777"), br"/x\777");
        assert_eq!(unescape(br"\"), br"\");
    }

    #[test]
    fn finds_escaped_mountpoint() {
        let m = parse_mountinfo(SAMPLE, b"/tmp/pbx mnt").expect("listed");
        assert_eq!(m, MountInfo { minor: 45, fs_type: "fuse.pickbox".into(), source: "pickbox".into() });
        assert!(m.is_pickbox());
        assert_eq!(parse_mountinfo(SAMPLE, b"/tmp/other"), None);
        assert_eq!(parse_mountinfo(SAMPLE, b"/").map(|m| m.fs_type), Some("ext4".into()));
    }

    #[test]
    fn mount_record_round_trips_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_mount_record(dir.path()), None);
        record_mount(dir.path(), Some(45));
        assert_eq!(read_mount_record(dir.path()), Some((std::process::id(), 45)));
        // Our own record never names a dying process (nothing is aborted).
        clear_dying_predecessor(dir.path(), &dir.path().join("mnt"));
        clear_mount_record(dir.path());
        assert_eq!(read_mount_record(dir.path()), None);
        std::fs::write(dir.path().join(MOUNT_RECORD), "12x 4\n").unwrap();
        assert_eq!(read_mount_record(dir.path()), None);
    }

    extern "C" fn sleep_forever(_: *mut libc::c_void) -> *mut libc::c_void {
        loop {
            // SAFETY: pause has no preconditions.
            unsafe { libc::pause() };
        }
    }

    /// A process whose main thread has exited while another still runs is dying (what a killed
    /// node stuck in the kernel looks like); a process that has fully exited, a running one and
    /// a PID that does not exist are not.
    #[test]
    fn a_zombie_with_a_live_thread_is_dying() {
        assert!(!is_dying(std::process::id()));
        assert!(!is_dying(u32::MAX));
        // SAFETY: the child calls only async-signal-safe libc functions (no allocation) before
        // it ends its main thread; the other thread only pauses.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            unsafe {
                let mut t: libc::pthread_t = std::mem::zeroed();
                if libc::pthread_create(&mut t, std::ptr::null(), sleep_forever, std::ptr::null_mut()) != 0 {
                    libc::_exit(1);
                }
                // Ends this thread only (pthread_exit would unwind through Rust frames: abort).
                libc::syscall(libc::SYS_exit, 0);
                libc::_exit(2);
            }
        }
        let pid_u = pid as u32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_dying(pid_u) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let dying = is_dying(pid_u);
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut status = 0;
        // Reap only once every thread is gone (waitpid returns then): a zombie without threads
        // first, checked before the reap.
        let deadline = Instant::now() + Duration::from_secs(10);
        while live_threads(pid_u) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let after_kill = is_dying(pid_u);
        // SAFETY: our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(dying, "main thread gone, one thread left: dying");
        assert!(!after_kill, "every thread gone: not dying");
    }
}

//! Entry only: parse the CLI, set up tracing, run.

use std::process::ExitCode;

use pickbox::cli::{self, LogFormat};
use tracing_subscriber::EnvFilter;

/// How long exit waits for tasks left in the async runtime after the node has stopped.
const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// Cores per async runtime worker thread (tokio's default is one worker per core). The work per
/// request is short and handed from thread to thread (fuser workers, openraft's tasks, the log
/// writer): fewer workers save wake-ups and cross-core hand-offs (measured on 2 cores, one worker
/// against two: about -20% CPU per create, +10..30% creates/s on one node and on three,
/// sequential write no worse). Half the cores, not one, so that the content hashing of
/// concurrent writes (done by the proposing tasks) still spreads over several cores on a larger
/// machine. tokio's TOKIO_WORKER_THREADS environment variable, if set, overrides this.
const CORES_PER_RUNTIME_WORKER: usize = 2;
/// tokio's environment variable for its worker count.
const TOKIO_WORKER_THREADS_ENV: &str = "TOKIO_WORKER_THREADS";

/// The log target of fuser's mount handling (see `main`).
const FUSER_MOUNT_LOG_TARGET: &str = "fuser::mnt";

/// glibc malloc arenas per core (see `limit_malloc_arenas`).
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS_PER_CORE: usize = 1;
/// Fewest glibc malloc arenas.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS_MIN: usize = 2;

/// glibc gives threads their own malloc arenas, up to 8 per core, and memory freed in one arena
/// is kept for it: a node's threads (FUSE workers copying write data, the log writer, tokio's
/// blocking threads, a snapshot build) each grew one. Measured on 2 cores, four 256 MiB sequential
/// writes in a row, the third during a snapshot: peak RSS 100, 101, 123, 129 MiB by default;
/// with 2 arenas 83, 84, 89, 94 MiB, at the same speed. Must run before any other thread starts.
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let arenas = (cores * MALLOC_ARENAS_PER_CORE).max(MALLOC_ARENAS_MIN);
    // MALLOC_ARENA_MAX in the environment, if set, decides instead.
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator parameter; called while this is the only thread.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, i32::try_from(arenas).unwrap_or(i32::MAX)) };
    }
}

/// Allocations of at least this many bytes are mapped on their own (glibc's `M_MMAP_THRESHOLD`),
/// and free heap beyond `MALLOC_TRIM_BYTES` at the top of an arena goes back to the system.
#[cfg(target_env = "gnu")]
const MALLOC_MMAP_BYTES: usize = 8 * 1024 * 1024;
#[cfg(target_env = "gnu")]
const MALLOC_TRIM_BYTES: usize = 2 * MALLOC_MMAP_BYTES;

/// Each fuser worker thread allocates a zeroed 16 MiB receive buffer (`vec![0; 16 MiB + 4 KiB]`).
/// Mapped on its own it costs only the pages a request touches; but glibc raises its mmap
/// threshold to the size of any mapped block freed (up to 32 MiB), and once something had freed
/// one of over 16 MiB before the FUSE workers started, a buffer came from the heap, zeroed page
/// by page: measured, 7 of 36 nodes of freshly started 3-node clusters idled at 31 MiB RSS (18 MiB
/// anonymous) instead of 15 (idle target: 20 MB). A fixed threshold (which also stops the dynamic
/// one) keeps such buffers mapped: 0 of 36; the trim threshold is what the dynamic rule would pair
/// with it. `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment decide instead.
#[cfg(target_env = "gnu")]
fn fix_malloc_thresholds() {
    let set = |env: &str, param: libc::c_int, bytes: usize| {
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only changes an allocator parameter; called while this is the only thread.
            unsafe { libc::mallopt(param, i32::try_from(bytes).unwrap_or(i32::MAX)) };
        }
    };
    set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, MALLOC_MMAP_BYTES);
    set("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, MALLOC_TRIM_BYTES);
}

fn main() -> ExitCode {
    #[cfg(target_env = "gnu")]
    limit_malloc_arenas();
    #[cfg(target_env = "gnu")]
    fix_malloc_thresholds();
    let cli = cli::parse();
    // Test builds only: fail points named in FAILPOINTS (e.g. `fuse-release=sleep(50)`).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // A node logs its lifecycle; the one-shot tools (cert, status, members) print their answer on
    // stdout and only warnings on stderr, unless RUST_LOG says otherwise.
    let is_node = cli.command.is_node();
    let default_level = if is_node { "info" } else { "warn" };
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // The node unmounts its own mount in order (sync, unmount, join); fuser's session then tries
    // again as it drops and warns "Unmount failed: Invalid argument" on every clean stop (it says
    // itself that this is not necessarily an error). Quiet unless RUST_LOG asks for that target.
    let rust_log = std::env::var(EnvFilter::DEFAULT_ENV).unwrap_or_default();
    if !rust_log.contains(FUSER_MOUNT_LOG_TARGET) {
        if let Ok(d) = format!("{FUSER_MOUNT_LOG_TARGET}=error").parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colours only on a terminal: a node's stderr usually goes to a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    // The mount guard is a small process waiting for a signal: no async runtime.
    if let cli::Command::GuardMount(args) = &cli.command {
        return match pickbox::fs::run_guard(args.connection, &args.mountpoint, args.parent) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pickbox guard-mount: {e}");
                ExitCode::FAILURE
            }
        };
    }

    let mut rt_builder = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os(TOKIO_WORKER_THREADS_ENV).is_none() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        rt_builder.worker_threads((cores / CORES_PER_RUNTIME_WORKER).max(1));
    }
    let runtime = match rt_builder.enable_all().thread_name("pickbox").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pickbox: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(pickbox::node::run(cli.command));
    // Tasks still parked in the runtime (Raft timers, idle blocking threads) must not hold up exit:
    // the replica is shut down and the store durable by now.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_WAIT);
    tracing::debug!("runtime stopped");
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if is_node {
                tracing::error!("{e:#}");
            }
            eprintln!("pickbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Wiring and lifecycle: store -> raft -> fs; ordered shutdown.
//!
//! Start: data dir, stale-mount cleanup, replica (store + Raft), release of orphans this node
//! left behind, mount. Stop on SIGINT/SIGTERM or when the mount goes away from outside
//! (`umount MOUNTPOINT`): unmount, join the FUSE session, then shut the replica down (which makes
//! the store durable). The replica outlives every FUSE request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{Command, MountArgs};
use crate::fs::{self, Ops};
use crate::raft::{Replica, ReplicaConfig};

/// How often the main task checks whether the FUSE session ended by itself.
const SESSION_POLL: Duration = Duration::from_millis(200);

/// Run one CLI command to completion.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mount(args) => run_mount(args).await,
    }
}

/// Why the node is stopping.
enum Stop {
    Signal(&'static str),
    Unmounted,
    /// A request hit a store failure.
    Fatal(String),
}

async fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    let data_dir: PathBuf = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
    fs::cleanup_stale_mount(&args.mountpoint)
        .with_context(|| format!("preparing mountpoint {}", args.mountpoint.display()))?;

    // Install the signal handlers before anything long-running, so an early SIGTERM is not lost.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let cfg = ReplicaConfig::new(args.node_id, data_dir.clone(), Duration::from_millis(args.propose_timeout_ms));
    let replica = Replica::start(cfg).await.context("starting the replica")?;
    tracing::info!(node_id = args.node_id, data_dir = %data_dir.display(), "replica started");

    let result = serve(&replica, &args, &data_dir, &mut sigint, &mut sigterm).await;

    // The replica is shut down whatever happened to the mount, so the store is left durable.
    let shutdown = replica.shutdown().await.context("shutting down the replica");
    tracing::info!("replica stopped");
    result.and(shutdown)
}

async fn serve(
    replica: &Arc<Replica>,
    args: &MountArgs,
    data_dir: &std::path::Path,
    sigint: &mut tokio::signal::unix::Signal,
    sigterm: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let ops = Arc::new(Ops::new(replica.clone(), data_dir.to_path_buf()));
    let mut fatal = ops.watch_fatal();
    // No handle is open before the mount, so orphans this node still holds (from a crash) go.
    match ops.release_stale_orphans().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(released = n, "released open-unlinked files left by the last run"),
        Err(e) => tracing::warn!(error = %e, "could not release leftover orphans; retried at next start"),
    }

    let rt = tokio::runtime::Handle::current();
    let mountpoint = args.mountpoint.clone();
    let mounted = tokio::task::spawn_blocking(move || fs::mount(ops, rt, &mountpoint))
        .await
        .context("mount task")?
        .with_context(|| format!("mounting at {}", args.mountpoint.display()))?;

    let mut tick = tokio::time::interval(SESSION_POLL);
    let stop = loop {
        tokio::select! {
            _ = sigint.recv() => break Stop::Signal("SIGINT"),
            _ = sigterm.recv() => break Stop::Signal("SIGTERM"),
            _ = tick.tick() => if mounted.is_finished() { break Stop::Unmounted },
            Ok(()) = fatal.changed() => {
                break Stop::Fatal(fatal.borrow().clone().unwrap_or_default())
            }
        }
    };
    match &stop {
        Stop::Signal(name) => tracing::info!(signal = name, "stopping"),
        Stop::Unmounted => tracing::info!("the mount went away (unmounted from outside): stopping"),
        Stop::Fatal(why) => tracing::error!(%why, "store failure: stopping the node (fail-stop)"),
    }

    tokio::task::spawn_blocking(move || mounted.unmount_and_join())
        .await
        .context("unmount task")?
        .context("FUSE session ended with an error")?;
    match stop {
        Stop::Fatal(why) => Err(anyhow::anyhow!("stopped after a store failure: {why}")),
        Stop::Signal(_) | Stop::Unmounted => Ok(()),
    }
}

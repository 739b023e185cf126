//! Wiring and lifecycle: store -> raft + transport -> fs; ordered shutdown; the operator commands.
//!
//! Start: data dir, mountpoint check, the QUIC endpoint (with `--listen`), the replica (bootstrap,
//! join or restart), release of orphans this node left behind, mount (which detaches a stale
//! mount a crash left, right before mounting). The replica's RPC handler
//! is attached as soon as the replica exists, because peers must reach a node that is still
//! catching up or waiting for a quorum. Stop on SIGINT/SIGTERM or when the mount goes away from
//! outside (`umount MOUNTPOINT`): unmount, join the FUSE session, shut the replica down (which
//! makes the store durable), then close the endpoint. The replica outlives every FUSE request.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cli::{CertCommand, ClientArgs, Command, MembersCommand, MountArgs, StatusArgs};
use crate::fs::{self, Ops};
use crate::raft::admin::{self, AdminError, MemberInfo, NodeStatus, ANY_NODE};
use crate::raft::network::PeerTransport;
use crate::raft::{ProposeError, Replica, ReplicaConfig};
use crate::state::StoreFault;
use crate::transport::{self, NodeCertPaths, NodeIdentity, QuicConfig, QuicTransport};

/// How often the main task checks whether the FUSE session ended by itself.
const SESSION_POLL: Duration = Duration::from_millis(200);
/// Pause between two attempts to get ready (find a leader and a quorum) after a restart or join.
const READY_RETRY_PAUSE_MS: u64 = 500;
/// How long a restarting node gives Raft to load its membership before it concludes there is none.
const MEMBERSHIP_LOAD_WAIT_MS: u64 = 1_000;
/// How often it looks meanwhile.
const MEMBERSHIP_POLL_MS: u64 = 20;
/// Pause between two attempts to finish an interrupted join (each attempt retries for up to
/// `admin::JOIN_DEADLINE_MS` itself).
const JOIN_RESUME_PAUSE_MS: u64 = 5_000;
/// Hex digits of the state digest shown in the status table (the JSON has all of it).
const DIGEST_HEX_SHOWN: usize = 16;

/// Run one CLI command to completion.
pub async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mount(args) => run_mount(args).await,
        Command::Cert(c) => run_cert(c),
        Command::Status(args) => run_status(args).await,
        Command::Members(c) => run_members(c).await,
        Command::GuardMount(a) => Ok(fs::run_guard(a.connection, &a.mountpoint, a.parent)?),
    }
}

/// Why the node is stopping.
enum Stop {
    Signal(&'static str),
    Unmounted,
    /// A request hit a store failure.
    Fatal(String),
}

/// The signals that stop a node; installed before anything long-running, so an early SIGTERM
/// is not lost.
struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
        })
    }

    /// The name of the next stop signal that arrives.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// How the replica starts, decided from the data dir and the flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartMode {
    /// No peers (no `--listen`): a single-node cluster, bootstrapped on the first start.
    Alone,
    /// First start without `--join`: bootstrap a new cluster with this node as its only voter.
    Bootstrap,
    /// First start with `--join`: become a member of the seed's cluster.
    Join,
    /// Existing state with peers: rejoin the cluster as the member this node is.
    Restart,
}

fn start_mode(args: &MountArgs) -> StartMode {
    match (&args.listen, Replica::has_state(&args.data_dir), &args.join) {
        (None, _, _) => StartMode::Alone,
        (Some(_), true, _) => StartMode::Restart,
        (Some(_), false, None) => StartMode::Bootstrap,
        (Some(_), false, Some(_)) => StartMode::Join,
    }
}

async fn run_mount(args: MountArgs) -> anyhow::Result<()> {
    let data_dir: PathBuf = args.data_dir.clone();
    // Decided before the data dir (and the store in it) is created.
    let mode = start_mode(&args);
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
    // A killed predecessor stuck on its FUSE connection would hang the mountpoint check and hold
    // the store's lock.
    let (d, m) = (data_dir.clone(), args.mountpoint.clone());
    tokio::task::spawn_blocking(move || fs::clear_dying_predecessor(&d, &m)).await.context("start-up check task")?;
    fs::check_mountpoint(&args.mountpoint)
        .with_context(|| format!("preparing mountpoint {}", args.mountpoint.display()))?;
    let mut signals = Signals::install()?;

    let net = match args.listen {
        Some(listen) => Some(bind_node_endpoint(&args, listen)?),
        None => None,
    };
    let mut cfg = ReplicaConfig::new(args.node_id, data_dir.clone(), Duration::from_millis(args.propose_timeout_ms));
    cfg.advertise_addr = args.advertise_addr();
    cfg.snapshot_entries = args.snapshot_entries;
    cfg.lock_lease = (args.lock_lease_ms > 0).then(|| Duration::from_millis(args.lock_lease_ms));
    if mode == StartMode::Restart && args.join.is_some() {
        tracing::info!(data_dir = %data_dir.display(), "existing state: restarting as a member; --join is ignored unless it never joined");
    }

    let replica = match open_replica(mode, cfg, net.as_ref()).await {
        Ok(r) => r,
        Err(e) => {
            close_endpoint(net.as_ref()).await;
            return Err(e);
        }
    };
    tracing::info!(node_id = args.node_id, data_dir = %data_dir.display(), ?mode, "replica started");

    // Getting ready can take long (catch-up, waiting for a quorum): a stop signal ends it.
    let mut finishing = None;
    let ready = tokio::select! {
        r = get_ready(mode, &replica, net.as_ref(), args.join.as_deref()) => r.map(Ok),
        name = signals.recv() => Ok(Err(name)),
    };
    let result = match ready {
        Ok(Ok(background)) => {
            finishing = background;
            tracing::info!(node_id = args.node_id, "replica ready");
            serve(&replica, &args, &data_dir, &mut signals).await
        }
        Ok(Err(name)) => {
            tracing::info!(signal = name, "stopping before the replica was ready");
            Ok(())
        }
        Err(e) => Err(e),
    };

    // The replica is shut down whatever happened to the mount, so the store is left durable; the
    // endpoint goes last, because Raft may still talk to peers until it has stopped.
    if let Some(h) = finishing {
        h.abort();
    }
    let shutdown = replica.shutdown().await.context("shutting down the replica");
    tracing::info!("replica stopped");
    close_endpoint(net.as_ref()).await;
    result.and(shutdown)
}

/// Load this node's certificates (`node<ID>` in `--certs`) and bind its QUIC endpoint.
fn bind_node_endpoint(args: &MountArgs, listen: SocketAddr) -> anyhow::Result<Arc<QuicTransport>> {
    let certs = args.certs.as_deref().context("--listen needs --certs")?;
    let name = transport::node_name(args.node_id);
    let identity = load_identity(certs, &name)?;
    transport::quic::install_crypto_provider();
    QuicTransport::bind(QuicConfig { node_id: args.node_id, listen, identity })
        .with_context(|| format!("starting the QUIC endpoint on {listen}"))
}

fn load_identity(certs: &Path, name: &str) -> anyhow::Result<NodeIdentity> {
    NodeIdentity::load(certs, &NodeCertPaths::in_dir(certs, name)).with_context(|| {
        format!(
            "loading the certificates for {name:?} from {} (create them with `pickbox cert create-node {name} --dir {}`)",
            certs.display(),
            certs.display()
        )
    })
}

async fn close_endpoint(net: Option<&Arc<QuicTransport>>) {
    if let Some(t) = net {
        t.shutdown().await;
    }
}

/// Open the store and start Raft; with peers, attach the replica to the endpoint at once.
///
/// A restart uses `start_joining` rather than `start_with`: `start_with` waits for a leader
/// before it returns, and in a multi-node cluster that needs the peers' RPCs, which can only be
/// served once the replica exists and is attached. For an initialised store the two are the same
/// (`start_with` initialises only a fresh store); `get_ready` then does the waiting.
async fn open_replica(
    mode: StartMode,
    cfg: ReplicaConfig,
    net: Option<&Arc<QuicTransport>>,
) -> anyhow::Result<Arc<Replica>> {
    let replica = match (mode, net) {
        (StartMode::Alone, _) | (_, None) => Replica::start(cfg).await,
        (StartMode::Bootstrap, Some(t)) => Replica::start_with(cfg, t.clone()).await,
        (StartMode::Join | StartMode::Restart, Some(t)) => Replica::start_joining(cfg, t.clone()).await,
    }
    .context("starting the replica")?;
    if let Some(t) = net {
        t.attach_replica(&replica);
        set_membership_authorizer(t, &replica);
    }
    Ok(replica)
}

/// Serve Raft RPCs only to peers in the membership (and admin RPCs as the authoriser decides).
fn set_membership_authorizer(t: &QuicTransport, replica: &Arc<Replica>) {
    t.set_authorizer(transport::membership_authorizer(Arc::downgrade(replica)));
}

/// Join (if asked), catch up and wait for a leader, then do the post-start bookkeeping. A
/// restarted node whose peers are down (no leader or no quorum) starts anyway, like
/// `Replica::start_with`: reads are served from its replica, writes fail with EIO until a quorum
/// is back, and the bookkeeping finishes in the returned background task.
async fn get_ready(
    mode: StartMode,
    replica: &Arc<Replica>,
    net: Option<&Arc<QuicTransport>>,
    join: Option<&str>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    match (mode, net, join) {
        (StartMode::Alone | StartMode::Bootstrap, _, _) => Ok(None),
        (StartMode::Join, Some(t), Some(seed)) => {
            join_cluster(replica, t.clone(), seed).await?;
            wait_ready(replica).await.map(|()| None)
        }
        (StartMode::Restart, Some(t), Some(seed)) if !has_membership_soon(replica).await => {
            // A store without any membership never finished joining: join again rather than
            // wait for a leader that does not know this node.
            tracing::info!(%seed, "existing store has no membership (an unfinished join): joining again");
            join_cluster(replica, t.clone(), seed).await?;
            wait_ready(replica).await.map(|()| None)
        }
        (StartMode::Restart, Some(t), seed) => {
            // A learner here was added by a join that stopped before the promotion: once ready
            // (a leader replicates to it, so it is still in the membership), it asks to be promoted.
            let learner = has_membership_soon(replica).await && replica.is_learner();
            let promote = learner.then(|| (t.clone(), seed.map(str::to_string)));
            match replica.after_join().await {
                Ok(()) => Ok(promote.map(|(t, seed)| tokio::spawn(resume_join(Arc::downgrade(replica), t, seed)))),
                Err(e) if is_fatal(&e) => Err(e.context("getting the replica ready")),
                Err(e) => {
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "no leader or no quorum yet (other nodes down?): starting anyway; reads are served \
                         from the local replica, writes fail with EIO until a quorum is back"
                    );
                    let weak = Arc::downgrade(replica);
                    Ok(Some(tokio::spawn(async move {
                        let Some(r) = weak.upgrade() else { return };
                        match wait_ready(&r).await {
                            Ok(()) => tracing::info!("quorum reached: node start finished"),
                            Err(e) => {
                                tracing::error!(error = %format!("{e:#}"), "finishing the node start failed");
                                return;
                            }
                        }
                        drop(r);
                        if let Some((t, seed)) = promote {
                            resume_join(weak, t, seed).await;
                        }
                    })))
                }
            }
        }
        (StartMode::Join | StartMode::Restart, _, _) => anyhow::bail!("joining needs --listen and --join"),
    }
}

/// Whether the replica has a membership, allowing Raft a moment to load it from the store (its
/// metrics start empty and are filled in by Raft's own task after start).
async fn has_membership_soon(replica: &Replica) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(MEMBERSHIP_LOAD_WAIT_MS);
    loop {
        if replica.has_membership() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(MEMBERSHIP_POLL_MS)).await;
    }
}

/// `admin::join_cluster` (which itself retries an unreachable seed or a busy leader for a while).
async fn join_cluster(replica: &Arc<Replica>, t: Arc<QuicTransport>, seed: &str) -> anyhow::Result<()> {
    let t: Arc<dyn PeerTransport> = t;
    admin::join_cluster(replica, t, seed).await.with_context(|| {
        format!(
            "joining the cluster through {seed} (starting again with the same --join retries the join)"
        )
    })?;
    tracing::info!(%seed, "joined the cluster as a voter");
    Ok(())
}

/// Background: `admin::resume_join` until this node is a voter, a final refusal, or the replica
/// is gone (the task is aborted at stop).
async fn resume_join(replica: std::sync::Weak<Replica>, t: Arc<QuicTransport>, seed: Option<String>) {
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let Some(r) = replica.upgrade() else { return };
        let t: Arc<dyn PeerTransport> = t.clone();
        match admin::resume_join(&r, t, seed.as_deref()).await {
            Ok(()) => {
                tracing::info!(attempt, "the interrupted join is complete: this node is a voter");
                return;
            }
            Err(e @ (AdminError::Refused(_) | AdminError::NotAMember(_))) => {
                tracing::error!(
                    error = %e,
                    "the cluster refused to promote this learner; it stays a learner (remove it with \
                     `pickbox members remove`, then join again)"
                );
                return;
            }
            Err(e) => tracing::warn!(attempt, error = %e, "promoting this learner failed for now; retrying"),
        }
        drop(r);
        tokio::time::sleep(Duration::from_millis(JOIN_RESUME_PAUSE_MS)).await;
    }
}

/// `Replica::after_join` until it succeeds: a restarted node may have to wait for its peers (a
/// whole cluster restarting, or a quorum lost). Store failures end the wait (fail-stop).
async fn wait_ready(replica: &Arc<Replica>) -> anyhow::Result<()> {
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match replica.after_join().await {
            Ok(()) => return Ok(()),
            Err(e) if is_fatal(&e) => return Err(e.context("getting the replica ready")),
            Err(e) => {
                // Each attempt waits several seconds itself, so this logs at most a few lines a minute.
                tracing::warn!(attempt, error = %format!("{e:#}"), "not ready yet (no leader or no quorum); still waiting");
                tokio::time::sleep(Duration::from_millis(READY_RETRY_PAUSE_MS)).await;
            }
        }
    }
}

/// Whether an error from starting the replica means the local store failed.
fn is_fatal(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StoreFault>() || matches!(c.downcast_ref::<ProposeError>(), Some(ProposeError::Fatal(_))))
}

async fn serve(
    replica: &Arc<Replica>,
    args: &MountArgs,
    data_dir: &std::path::Path,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    // In a cluster the kernel's writeback cache is off: it would keep its own file sizes and
    // ignore changes made on other nodes (see fs/mount.rs).
    let ops = Arc::new(
        Ops::new(replica.clone(), data_dir.to_path_buf())
            .clustered(args.listen.is_some())
            .cache_ttl(std::time::Duration::from_millis(args.cache_ttl_ms)),
    );
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
    tracing::info!(mountpoint = %args.mountpoint.display(), "mounted");
    fs::record_mount(data_dir, mounted.connection());
    // Spawned from this (the main) thread: its parent-death signal comes when this thread ends.
    let guard = mounted.connection().filter(|_| !args.no_mount_guard).and_then(|conn| match fs::Guard::spawn(conn, mounted.mountpoint()) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the mount guard: a kill -9 may leave the mount hanging until the next start");
            None
        }
    });

    let mut tick = tokio::time::interval(SESSION_POLL);
    // A store fault on a replicated entry stops Raft without failing any local request.
    let raft_stopped = replica.raft_stopped();
    tokio::pin!(raft_stopped);
    let stop = loop {
        tokio::select! {
            name = signals.recv() => break Stop::Signal(name),
            why = &mut raft_stopped => break Stop::Fatal(why),
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

    if let Some(g) = guard {
        g.stop();
    }
    tokio::task::spawn_blocking(move || mounted.unmount_and_join())
        .await
        .context("unmount task")?
        .context("FUSE session ended with an error")?;
    fs::clear_mount_record(data_dir);
    match stop {
        Stop::Fatal(why) => Err(anyhow::anyhow!("stopped after a store failure: {why}")),
        Stop::Signal(_) | Stop::Unmounted => Ok(()),
    }
}

fn run_cert(c: CertCommand) -> anyhow::Result<()> {
    match c {
        CertCommand::CreateCa { dir } => {
            transport::create_ca(&dir).context("creating the cluster CA")?;
            print_out(&format!("created {} and {}\n", dir.join("ca.pem").display(), dir.join("ca.key").display()))?;
        }
        CertCommand::CreateNode { name, dir } => {
            let paths = transport::create_node_cert(&dir, &name, &dir)
                .with_context(|| format!("creating the certificate for {name:?}"))?;
            print_out(&format!("created {} and {}\n", paths.cert.display(), paths.key.display()))?;
        }
    }
    Ok(())
}

/// Write a command's answer to stdout. A reader that went away (`pickbox status | head`) is not
/// an error; `print!` would panic there.
fn print_out(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::Error::new(e).context("writing to stdout")),
        _ => Ok(()),
    }
}

/// An operator's QUIC endpoint: a client with the certificate `--name` from `--certs`, bound to
/// an ephemeral port (loopback when the peer is on this machine).
async fn client_endpoint(args: &ClientArgs) -> anyhow::Result<Arc<QuicTransport>> {
    let identity = load_identity(&args.certs, &args.name)?;
    let ip: IpAddr = match tokio::net::lookup_host(&args.peer).await.ok().and_then(|mut a| a.next()) {
        Some(a) if a.ip().is_loopback() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        Some(SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        None => anyhow::bail!("--peer {:?}: not a reachable host:port", args.peer),
    };
    transport::quic::install_crypto_provider();
    QuicTransport::bind(QuicConfig { node_id: ANY_NODE, listen: SocketAddr::new(ip, 0), identity })
        .context("starting the client endpoint")
}

/// Run `f` with an operator endpoint and close the endpoint afterwards.
async fn with_client<T, F, Fut>(args: &ClientArgs, f: F) -> anyhow::Result<T>
where
    F: FnOnce(Arc<dyn PeerTransport>) -> Fut,
    Fut: std::future::Future<Output = Result<T, AdminError>>,
{
    let t = client_endpoint(args).await?;
    let out = f(t.clone()).await;
    t.shutdown().await;
    out.with_context(|| format!("asking the cluster at {}", args.peer))
}

/// One member in `status` output; every row has every key (null where unknown).
#[derive(Serialize, Debug)]
struct StatusRow {
    node_id: u64,
    addr: String,
    voter: bool,
    role: Option<String>,
    term: Option<u64>,
    leader: Option<u64>,
    last_log_index: Option<u64>,
    committed_index: Option<u64>,
    applied_index: Option<u64>,
    snapshot_index: Option<u64>,
    state_digest: Option<String>,
    /// Reads that met a corrupt stored block on that node since it started (JSON only).
    corrupt_block_reads: Option<u64>,
    /// The node lost its locks and the cluster refuses its changes until it acknowledges
    /// (JSON only; see SEMANTICS, Locks).
    lock_fenced: Option<bool>,
    /// Why the member did not answer.
    error: Option<String>,
}

impl StatusRow {
    fn new(m: MemberInfo, s: Result<NodeStatus, String>) -> StatusRow {
        let mut row = StatusRow {
            node_id: m.node_id,
            addr: m.addr,
            voter: m.voter,
            role: None,
            term: None,
            leader: None,
            last_log_index: None,
            committed_index: None,
            applied_index: None,
            snapshot_index: None,
            state_digest: None,
            corrupt_block_reads: None,
            lock_fenced: None,
            error: None,
        };
        match s {
            Ok(s) => {
                row.role = Some(s.role);
                row.term = Some(s.term);
                row.leader = s.leader;
                row.last_log_index = s.last_log_index;
                row.committed_index = s.committed_index;
                row.applied_index = s.applied_index;
                row.snapshot_index = s.snapshot_index;
                row.state_digest = Some(s.state_digest);
                row.corrupt_block_reads = Some(s.corrupt_block_reads);
                row.lock_fenced = Some(s.lock_fenced);
            }
            Err(e) => row.error = Some(e),
        }
        row
    }
}

/// A value or "-".
fn cell<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_string(), T::to_string)
}

fn voter_cell(voter: bool) -> &'static str {
    if voter {
        "voter"
    } else {
        "learner"
    }
}

fn status_table(rows: &[StatusRow]) -> String {
    let mut out = format!(
        "{:<5} {:<21} {:<7} {:<9} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9}  {}\n",
        "NODE", "ADDR", "MEMBER", "ROLE", "TERM", "LEADER", "LAST_LOG", "COMMITTED", "APPLIED", "SNAPSHOT", "DIGEST"
    );
    for r in rows {
        if let Some(e) = &r.error {
            out += &format!("{:<5} {:<21} {:<7} error: {e}\n", r.node_id, r.addr, voter_cell(r.voter));
            continue;
        }
        let digest: String = r.state_digest.as_deref().unwrap_or("-").chars().take(DIGEST_HEX_SHOWN).collect();
        out += &format!(
            "{:<5} {:<21} {:<7} {:<9} {:>5} {:>6} {:>9} {:>9} {:>9} {:>9}  {}\n",
            r.node_id,
            r.addr,
            voter_cell(r.voter),
            cell(&r.role),
            cell(&r.term),
            cell(&r.leader),
            cell(&r.last_log_index),
            cell(&r.committed_index),
            cell(&r.applied_index),
            cell(&r.snapshot_index),
            digest
        );
    }
    out
}

async fn run_status(args: StatusArgs) -> anyhow::Result<()> {
    let peer = args.client.peer.clone();
    let members = with_client(&args.client, |t| async move { admin::cluster_status(t, &peer).await }).await?;
    let rows: Vec<StatusRow> = members.into_iter().map(|(m, s)| StatusRow::new(m, s)).collect();
    if args.json {
        print_out(&(serde_json::to_string_pretty(&rows).context("encoding JSON")? + "\n"))
    } else {
        print_out(&status_table(&rows))
    }
}

fn members_table(members: &[MemberInfo]) -> String {
    let mut out = format!("{:<5} {:<21} {}\n", "NODE", "ADDR", "MEMBER");
    for m in members {
        out += &format!("{:<5} {:<21} {}\n", m.node_id, m.addr, voter_cell(m.voter));
    }
    out
}

async fn run_members(c: MembersCommand) -> anyhow::Result<()> {
    match c {
        MembersCommand::List { client, json } => {
            let peer = client.peer.clone();
            let members = with_client(&client, |t| async move { admin::cluster_status(t, &peer).await }).await?;
            let members: Vec<MemberInfo> = members.into_iter().map(|(m, _)| m).collect();
            if json {
                print_out(&(serde_json::to_string_pretty(&members).context("encoding JSON")? + "\n"))?;
            } else {
                print_out(&members_table(&members))?;
            }
        }
        MembersCommand::Remove { id, client } => {
            let peer = client.peer.clone();
            with_client(&client, |t| async move { admin::remove_member(t, &peer, id).await }).await?;
            print_out(&format!("removed node {id}\n"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(id: u64) -> NodeStatus {
        NodeStatus {
            node_id: id,
            role: "Leader".into(),
            term: 3,
            leader: Some(1),
            last_log_index: Some(42),
            committed_index: Some(42),
            applied_index: Some(41),
            snapshot_index: None,
            members: vec![],
            state_digest: "ab".repeat(32),
            corrupt_block_reads: 2,
            lock_fenced: false,
        }
    }

    fn member(id: u64) -> MemberInfo {
        MemberInfo { node_id: id, addr: format!("127.0.0.1:800{id}"), voter: id != 3 }
    }

    #[test]
    fn status_rows_table_and_json() {
        let rows = vec![
            StatusRow::new(member(1), Ok(status(1))),
            StatusRow::new(member(3), Err("unreachable: dial timed out".into())),
        ];
        let table = status_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("NODE"));
        for want in ["127.0.0.1:8001", "voter", "Leader", "42", "41", &"ab".repeat(DIGEST_HEX_SHOWN / 2)] {
            assert!(lines[1].contains(want), "{want:?} missing in {:?}", lines[1]);
        }
        assert!(!lines[1].contains(&"ab".repeat(DIGEST_HEX_SHOWN)), "digest is shortened in the table");
        assert!(lines[2].contains("learner") && lines[2].contains("error: unreachable: dial timed out"));

        let json: serde_json::Value = serde_json::from_str(&serde_json::to_string(&rows).unwrap()).unwrap();
        let arr = json.as_array().unwrap();
        assert_eq!(arr.len(), 2);
        assert_eq!(arr[0]["node_id"], 1);
        assert_eq!(arr[0]["applied_index"], 41);
        assert_eq!(arr[0]["snapshot_index"], serde_json::Value::Null);
        assert_eq!(arr[0]["state_digest"], "ab".repeat(32));
        assert_eq!(arr[0]["corrupt_block_reads"], 2);
        assert_eq!(arr[1]["corrupt_block_reads"], serde_json::Value::Null);
        assert_eq!(arr[0]["lock_fenced"], false);
        assert_eq!(arr[1]["lock_fenced"], serde_json::Value::Null);
        assert_eq!(arr[0]["error"], serde_json::Value::Null);
        assert_eq!(arr[1]["error"], "unreachable: dial timed out");
        // Every row has the same keys, answered or not.
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&arr[0]), keys(&arr[1]));
    }

    #[test]
    fn members_table_lists_each_member() {
        let t = members_table(&[member(1), member(3)]);
        assert_eq!(t.lines().count(), 3);
        assert!(t.lines().nth(2).unwrap().contains("learner"));
    }

    #[test]
    fn store_faults_are_fatal_timeouts_are_not() {
        assert!(is_fatal(&anyhow::Error::new(StoreFault("disk".into())).context("after join")));
        assert!(is_fatal(&anyhow::Error::new(ProposeError::Fatal("disk".into()))));
        assert!(!is_fatal(&anyhow::Error::new(ProposeError::Unavailable("no leader".into()))));
        assert!(!is_fatal(&anyhow::anyhow!("timeout waiting for a leader")));
    }
}

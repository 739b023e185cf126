//! A cluster of real `pickbox mount` processes on loopback (QUIC with mutual TLS), driven through
//! the `pickbox` command line exactly as an operator would: `cert`, `mount --listen --join`,
//! `status --json`, `members list|remove`.
//!
//! Every node is a `harness::Node`, so `Drop` stops each process this cluster started by its PID
//! and detaches its mount, also when the test panics. The cluster holds one permit of the
//! parallel-node budget for all its nodes.
//!
//! With `ClusterOptions::netns` each node runs in a network namespace of its own (`netns::Net`),
//! listening on its own address there, so that a test can cut nodes off (`isolate`) and `heal`;
//! the `pickbox` command-line calls then run in the namespace of the node they ask.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Read;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::harness::{binary, Node, Permit};
use crate::netns::{in_netns, Net};

/// How long a mutation waits for a quorum in test nodes before it fails with EIO, in ms.
pub const PROPOSE_TIMEOUT_MS: u64 = 3_000;
/// How long a node may take from start to a live mount (join, catch-up, promotion included).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes may take to agree on applied index and state digest once writes stop.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a change made on one node may take to be visible on another.
pub const VISIBLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Slots of the parallel-node budget a cluster takes (capped at the budget: a cluster may run
/// alone, but never beside more single nodes than the budget allows).
const CLUSTER_SLOTS: usize = 3;
/// Watchdog limit for a cluster node: cluster tests run longer than single-node ones.
const CLUSTER_TEST_SECONDS_MAX: u64 = 600;
/// How long one `pickbox status` / `members` / `cert` call may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two polls of the cluster's status (each poll is a process and a QUIC round).
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// The operator certificate the tests use for `status` and `members`.
const ADMIN_NAME: &str = "admin";
/// The UDP port every node listens on in netns mode (each node has an address of its own there).
const NETNS_PORT: u16 = 7000;

/// What a cluster starts with.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub propose_timeout_ms: u64,
    /// `--snapshot-entries`; None keeps the node's default.
    pub snapshot_entries: Option<u64>,
    /// Each node in a network namespace of its own (for partitions) instead of on loopback.
    pub netns: bool,
    /// Nodes whose data dir is a tmpfs of its own: node id -> its size in bytes (to fill a
    /// node's disk on purpose). Other nodes keep theirs on the temp dir's filesystem.
    pub data_tmpfs: BTreeMap<u64, u64>,
    /// Nodes run with their mount guard (`--no-mount-guard` when false).
    pub mount_guard: bool,
    /// `--lock-lease-ms`; None keeps the node's default.
    pub lock_lease_ms: Option<u64>,
    /// Every node's FAILPOINTS (needs a build with `--features failpoints`).
    pub failpoints: Option<String>,
    /// `--cache-ttl-ms` (how long the kernel keeps names and attributes unasked); None keeps
    /// the node's default.
    pub cache_ttl_ms: Option<u64>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            propose_timeout_ms: PROPOSE_TIMEOUT_MS,
            snapshot_entries: None,
            netns: false,
            data_tmpfs: BTreeMap::new(),
            mount_guard: true,
            lock_lease_ms: None,
            failpoints: None,
            cache_ttl_ms: None,
        }
    }
}

/// One row of `pickbox status --json`.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(default)]
pub struct MemberStatus {
    pub node_id: u64,
    pub addr: String,
    pub voter: bool,
    pub role: Option<String>,
    pub term: Option<u64>,
    pub leader: Option<u64>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub state_digest: Option<String>,
    /// Set when the member did not answer.
    pub error: Option<String>,
}

impl MemberStatus {
    pub fn is_leader(&self) -> bool {
        self.error.is_none() && self.role.as_deref().is_some_and(|r| r.eq_ignore_ascii_case("leader"))
    }
}

/// One row of `pickbox members list --json`.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub node_id: u64,
    pub addr: String,
    pub voter: bool,
}

pub struct Cluster {
    /// Declared first so that it drops first: every node stops before its certificates go.
    nodes: BTreeMap<u64, Node>,
    /// The namespaces in netns mode; after `nodes`, so that no node runs when they go.
    net: Option<Net>,
    ports: BTreeMap<u64, u16>,
    certs: PathBuf,
    opts: ClusterOptions,
    dir: tempfile::TempDir,
    /// When the cluster started, for the timing line `Drop` prints.
    created: Instant,
    _permit: Permit,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes themselves stop in their own Drop, right after this.
        let outcome = if std::thread::panicking() { "failed" } else { "passed" };
        // libtest names each test's thread after the test.
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("cluster: {test} {outcome} after {:?} with nodes {:?}", self.created.elapsed(), self.ids());
    }
}

impl Cluster {
    /// A cluster of `nodes` nodes with the default options.
    pub fn new(nodes: u64) -> Cluster {
        Cluster::with(ClusterOptions { nodes, ..ClusterOptions::default() })
    }

    /// Creates the CA and certificates, starts node 1 (it bootstraps the cluster), then every
    /// other node with `--join` node 1, each waited for until its mount is live.
    pub fn with(opts: ClusterOptions) -> Cluster {
        crate::harness::require_fuse();
        let permit = Permit::acquire_slots(CLUSTER_SLOTS);
        let dir = tempfile::Builder::new().prefix("pickbox-cluster-test-").tempdir().expect("create temp dir");
        let certs = dir.path().join("certs");
        cli_ok(&[OsString::from("cert"), "create-ca".into(), "--dir".into(), certs.clone().into()]);
        create_cert(&certs, ADMIN_NAME);
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            net: opts.netns.then(Net::new),
            ports: BTreeMap::new(),
            certs,
            opts: opts.clone(),
            dir,
            created: Instant::now(),
            _permit: permit,
        };
        for _ in 0..opts.nodes {
            cluster.add_node();
        }
        cluster
    }

    /// A scratch directory that lives as long as the cluster.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// Node `k`'s QUIC address.
    pub fn addr(&self, k: u64) -> String {
        match &self.net {
            Some(net) => format!("{}:{NETNS_PORT}", net.ip(k)),
            None => format!("127.0.0.1:{}", self.ports[&k]),
        }
    }

    /// Runs `f` in node `k`'s network namespace (netns mode), or as it is (loopback).
    fn in_node_net<T>(&self, k: u64, f: impl FnOnce() -> T) -> T {
        match &self.net {
            Some(net) => in_netns(&net.ns_path(k), f),
            None => f(),
        }
    }

    /// Starts node `k`'s process (in its namespace) and waits for its mount.
    fn spawn_node(&mut self, k: u64, timeout: Duration) -> Result<(), String> {
        let ns = self.net.as_ref().map(|net| net.ns_path(k));
        let node = self.nodes.get_mut(&k).unwrap_or_else(|| panic!("no node {k}"));
        match ns {
            Some(ns) => in_netns(&ns, || node.try_spawn(timeout)),
            None => node.try_spawn(timeout),
        }
    }

    /// Netns mode: cuts each node of `ks` off from every other node (a node alone on its side;
    /// the nodes not named still reach each other).
    pub fn isolate(&mut self, ks: &[u64]) {
        let net = self.net.as_mut().expect("isolate needs ClusterOptions::netns");
        for &k in ks {
            net.set_connected(k, false);
        }
        eprintln!("cluster: nodes {ks:?} cut off");
    }

    /// Netns mode: connects every node again.
    pub fn heal(&mut self) {
        let net = self.net.as_mut().expect("heal needs ClusterOptions::netns");
        let cut: Vec<u64> = self.nodes.keys().copied().filter(|&k| !net.is_connected(k)).collect();
        for &k in &cut {
            net.set_connected(k, true);
        }
        eprintln!("cluster: nodes {cut:?} connected again");
    }

    /// Netns mode: every node drops `percent`% of the UDP datagrams it sends (0: none).
    pub fn set_loss(&mut self, percent: u32) {
        let net = self.net.as_mut().expect("set_loss needs ClusterOptions::netns");
        for &k in self.nodes.keys() {
            net.set_loss(k, percent);
        }
        eprintln!("cluster: every node drops {percent}% of the datagrams it sends");
    }

    /// Netns mode: the datagrams each node's loss rule dropped so far.
    pub fn dropped(&self) -> BTreeMap<u64, u64> {
        let net = self.net.as_ref().expect("dropped needs ClusterOptions::netns");
        self.nodes.keys().map(|&k| (k, net.dropped(k))).collect()
    }

    /// The nodes cut off from the others right now.
    pub fn isolated(&self) -> BTreeSet<u64> {
        match &self.net {
            Some(net) => self.nodes.keys().copied().filter(|&k| !net.is_connected(k)).collect(),
            None => BTreeSet::new(),
        }
    }

    /// Every node this cluster started, running or not.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn node(&mut self, k: u64) -> &mut Node {
        self.nodes.get_mut(&k).unwrap_or_else(|| panic!("no node {k}"))
    }

    /// Node `k`'s mountpoint.
    pub fn mnt(&self, k: u64) -> &Path {
        &self.nodes[&k].mnt
    }

    /// `rel` under node `k`'s mountpoint.
    pub fn path(&self, k: u64, rel: &str) -> PathBuf {
        self.nodes[&k].path(rel)
    }

    /// The nodes whose process runs.
    pub fn running(&mut self) -> Vec<u64> {
        self.nodes.iter_mut().filter_map(|(&k, n)| n.is_running().then_some(k)).collect()
    }

    /// The `mount` arguments of node `k` after `--data-dir`.
    pub fn node_args(&self, k: u64, certs: &Path, join: Option<&str>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--node-id".into(),
            k.to_string().into(),
            "--listen".into(),
            self.addr(k).into(),
            "--certs".into(),
            certs.into(),
            "--propose-timeout-ms".into(),
            self.opts.propose_timeout_ms.to_string().into(),
        ];
        if let Some(n) = self.opts.snapshot_entries {
            args.extend(["--snapshot-entries".into(), n.to_string().into()]);
        }
        if let Some(ms) = self.opts.lock_lease_ms {
            args.extend(["--lock-lease-ms".into(), ms.to_string().into()]);
        }
        if let Some(ms) = self.opts.cache_ttl_ms {
            args.extend(["--cache-ttl-ms".into(), ms.to_string().into()]);
        }
        if let Some(seed) = join {
            args.extend(["--join".into(), seed.into()]);
        }
        if !self.opts.mount_guard {
            args.push("--no-mount-guard".into());
        }
        args
    }

    /// Starts one more node (the first one bootstraps, every later one joins through a running
    /// node) and waits until it is mounted; returns its id.
    pub fn add_node(&mut self) -> u64 {
        let k = self.nodes.keys().next_back().map_or(1, |last| last + 1);
        create_cert(&self.certs, &format!("node{k}"));
        match self.net.as_mut() {
            Some(net) => net.add_host(k),
            None => {
                self.ports.insert(k, free_udp_port());
            }
        }
        let seed = self.running().first().map(|&s| self.addr(s));
        let args = self.node_args(k, &self.certs.clone(), seed.as_deref());
        let mut node = Node::prepare_with_limit(
            args,
            None,
            self.opts.data_tmpfs.get(&k).copied(),
            &format!("pickbox-cluster-node{k}-"),
            CLUSTER_TEST_SECONDS_MAX,
        );
        node.failpoints = self.opts.failpoints.clone();
        self.nodes.insert(k, node);
        let started = Instant::now();
        if let Err(e) = self.spawn_node(k, JOIN_TIMEOUT) {
            panic!("node {k} did not join and mount: {e}");
        }
        eprintln!("cluster: node {k} mounted after {:?}", started.elapsed());
        k
    }

    /// A node `k` that is not part of this cluster's bookkeeping, started with `certs` and
    /// `--join` a running node: for tests of nodes that must be refused. The caller owns it.
    pub fn foreign_node(&mut self, k: u64, certs: &Path) -> Node {
        assert!(self.net.is_none(), "foreign_node runs on loopback only");
        self.ports.insert(k, free_udp_port());
        let seed = self.running().first().map(|&s| self.addr(s)).expect("a running node to join");
        let args = self.node_args(k, certs, Some(&seed));
        self.ports.remove(&k);
        Node::prepare_with_limit(args, None, None, &format!("pickbox-foreign-node{k}-"), CLUSTER_TEST_SECONDS_MAX)
    }

    /// kill -9 node `k` (its mount stays behind, stale, until it starts again).
    /// Returns whether the process was left stuck on its FUSE connection (see `Node::kill9`).
    pub fn kill9(&mut self, k: u64) -> bool {
        self.node(k).kill9()
    }

    /// Stall node `k` (SIGSTOP): alive, silent, its mount's requests queued until the returned
    /// guard is dropped (SIGCONT), which a panicking test does too, before it closes files of
    /// that mount (declare the guard after them).
    #[must_use = "the node runs again when the guard is dropped"]
    pub fn pause(&mut self, k: u64) -> Paused {
        let node = self.node(k);
        let pid = node.pid().expect("node running") as libc::pid_t;
        node.signal(libc::SIGSTOP);
        Paused(pid)
    }

    /// Clean stop of node `k` (SIGTERM; exit status 0; mount gone).
    pub fn stop(&mut self, k: u64) {
        self.node(k).stop();
    }

    /// Starts node `k` again on its data dir and waits for the mount.
    pub fn start(&mut self, k: u64) {
        let started = Instant::now();
        if let Err(e) = self.spawn_node(k, JOIN_TIMEOUT) {
            panic!("node {k} did not restart: {e}");
        }
        eprintln!("cluster: node {k} restarted and mounted after {:?}", started.elapsed());
    }

    /// Runs `pickbox ARGS --peer <a running node> --certs .. --name admin`, trying each running
    /// node in turn (those not cut off first; in netns mode from the asked node's namespace);
    /// returns the first success's stdout or every error.
    fn admin_cli(&mut self, args: &[&str]) -> Result<String, String> {
        let isolated = self.isolated();
        let mut order = self.running();
        order.sort_by_key(|k| isolated.contains(k));
        let mut errors = Vec::new();
        for k in order {
            let mut full: Vec<OsString> = args.iter().map(OsString::from).collect();
            full.extend([
                "--peer".into(),
                self.addr(k).into(),
                "--certs".into(),
                self.certs.clone().into(),
                "--name".into(),
                ADMIN_NAME.into(),
            ]);
            match self.in_node_net(k, || cli(&full)) {
                Ok(out) => return Ok(out),
                Err(e) => errors.push(format!("via node {k}: {e}")),
            }
        }
        Err(if errors.is_empty() { "no node runs".into() } else { errors.join("\n") })
    }

    /// `pickbox status --json`, one row per member.
    pub fn try_status(&mut self) -> Result<Vec<MemberStatus>, String> {
        let out = self.admin_cli(&["status", "--json"])?;
        serde_json::from_str(&out).map_err(|e| format!("status --json: {e}: {out}"))
    }

    pub fn status(&mut self) -> Vec<MemberStatus> {
        self.try_status().unwrap_or_else(|e| panic!("pickbox status failed: {e}"))
    }

    /// `pickbox members list --json`.
    pub fn members(&mut self) -> Vec<MemberInfo> {
        let out = self.admin_cli(&["members", "list", "--json"]).unwrap_or_else(|e| panic!("members list: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("members list --json: {e}: {out}"))
    }

    /// `pickbox members remove K`.
    pub fn remove_member(&mut self, k: u64) -> Result<(), String> {
        self.admin_cli(&["members", "remove", &k.to_string()]).map(|_| ())
    }

    /// Each member's (applied_index, state_digest) as `status` reports it.
    pub fn digests(&mut self) -> BTreeMap<u64, (Option<u64>, Option<String>)> {
        self.status().into_iter().map(|s| (s.node_id, (s.applied_index, s.state_digest))).collect()
    }

    /// Waits until a running node other than `not` reports itself leader; returns its id.
    pub fn wait_leader(&mut self, timeout: Duration, not: Option<u64>) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running();
            let last = match self.try_status() {
                Ok(rows) => {
                    let leader = rows
                        .iter()
                        .find(|s| s.is_leader() && Some(s.node_id) != not && running.contains(&s.node_id));
                    if let Some(l) = leader {
                        return l.node_id;
                    }
                    format!("{rows:#?}")
                }
                Err(e) => e,
            };
            assert!(Instant::now() < deadline, "no leader (other than {not:?}) after {timeout:?}; last status:\n{last}");
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    /// Waits until every running member reports the same applied index and state digest, and
    /// that index is the highest committed index any of them reports; returns (index, digest).
    pub fn wait_converged(&mut self, timeout: Duration) -> (u64, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.running();
            let last = match self.try_status() {
                Ok(rows) => {
                    if let Some(agreed) = converged(&rows, &running) {
                        return agreed;
                    }
                    format!("{rows:#?}")
                }
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "nodes {running:?} did not converge within {timeout:?}; last status:\n{last}"
            );
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }
}

/// (index, digest) if every running member answered with the same applied index and digest, and
/// none reports a higher committed index.
fn converged(rows: &[MemberStatus], running: &[u64]) -> Option<(u64, String)> {
    let live: Vec<&MemberStatus> = rows.iter().filter(|s| running.contains(&s.node_id)).collect();
    if live.is_empty() || live.iter().any(|s| s.error.is_some()) {
        return None;
    }
    let first = live[0];
    let index = first.applied_index?;
    let digest = first.state_digest.clone()?;
    let agree = live.iter().all(|s| s.applied_index == Some(index) && s.state_digest.as_deref() == Some(&digest));
    let committed = live.iter().filter_map(|s| s.committed_index).max().unwrap_or(0);
    (agree && committed <= index).then_some((index, digest))
}

/// A UDP port free on loopback right now (bound, read, released).
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    s.local_addr().expect("local addr").port()
}

/// `pickbox cert create-node NAME --dir DIR`.
pub fn create_cert(dir: &Path, name: &str) {
    cli_ok(&[OsString::from("cert"), "create-node".into(), name.into(), "--dir".into(), dir.into()]);
}

/// `pickbox cert create-ca --dir DIR`.
pub fn create_ca(dir: &Path) {
    cli_ok(&[OsString::from("cert"), "create-ca".into(), "--dir".into(), dir.into()]);
}

fn cli_ok(args: &[OsString]) -> String {
    cli(args).unwrap_or_else(|e| panic!("pickbox {args:?}: {e}"))
}

/// Runs a one-shot `pickbox` command with a deadline; Ok(stdout) or Err(why, with stderr).
pub fn cli(args: &[OsString]) -> Result<String, String> {
    let mut child = Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn pickbox: {e}"))?;
    // Read both pipes on threads, so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("wait: {e}"))? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(st) if st.success() => Ok(stdout),
        Some(st) => Err(format!("exit {st}: {}", stderr.trim())),
        None => Err(format!("no answer within {CLI_TIMEOUT:?}: {}", stderr.trim())),
    }
}

/// Polls `cond` until it holds; returns how long that took, or None after `timeout`.
/// A node stalled by `Cluster::pause`; dropping this lets it run again.
pub struct Paused(libc::pid_t);

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is the cluster's own running child.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

pub fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn converged_needs_every_running_member_to_agree() {
    let row = |id: u64, applied: u64, committed: u64, digest: &str| MemberStatus {
        node_id: id,
        applied_index: Some(applied),
        committed_index: Some(committed),
        state_digest: Some(digest.into()),
        ..MemberStatus::default()
    };
    let same = [row(1, 7, 7, "d"), row(2, 7, 7, "d"), row(3, 7, 7, "d")];
    assert_eq!(converged(&same, &[1, 2, 3]), Some((7, "d".into())));
    // A node behind, another digest at the same index, a higher commit not yet applied.
    assert_eq!(converged(&[row(1, 7, 7, "d"), row(2, 6, 7, "c")], &[1, 2]), None);
    assert_eq!(converged(&[row(1, 7, 7, "d"), row(2, 7, 7, "e")], &[1, 2]), None);
    assert_eq!(converged(&[row(1, 7, 8, "d"), row(2, 7, 7, "d")], &[1, 2]), None);
    // A stopped node's row is ignored; a running node that does not answer is not.
    let silent = MemberStatus { node_id: 3, error: Some("unreachable".into()), ..MemberStatus::default() };
    assert_eq!(converged(&[row(1, 7, 7, "d"), row(2, 7, 7, "d"), silent.clone()], &[1, 2]), Some((7, "d".into())));
    assert_eq!(converged(&[row(1, 7, 7, "d"), row(2, 7, 7, "d"), silent], &[1, 2, 3]), None);
    assert_eq!(converged(&[], &[1]), None);
}

//! Network namespaces for cluster tests that cut the network: one namespace per node host, each
//! with a veth pair into a bridge that lives in a namespace of its own, built with iproute2 (`ip`).
//!
//! Nothing is added to the root namespace: the test hosts' addresses (`SUBNET`.K) are reachable
//! only from inside these namespaces, and the bridge has no uplink, so no packet leaves them. A
//! partition takes a host's bridge port down (its packets are dropped silently, like a pulled
//! cable); healing brings it up again. Names carry this process's PID and a counter, so a run
//! never collides with another one; namespaces a crashed earlier run left behind (their PID no
//! longer runs) are deleted on the next start. `Drop` deletes every namespace this `Net` made,
//! which removes its veths and its bridge with it, also when the test panics.
//!
//! Processes are started in a host's namespace by switching only the calling thread's network
//! namespace around the spawn (`in_netns`): the mount namespace stays the test's, so the FUSE
//! mount a node makes is visible to the test, and the child's parent thread (the one
//! `PR_SET_PDEATHSIG` watches) is the test's own thread.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where `ip netns add` puts the namespace handles.
const NETNS_DIR: &str = "/run/netns";
/// Prefix of every namespace these tests make: `pbx-<pid>-<counter>-<host>`.
const NAME_PREFIX: &str = "pbx-";
/// The hosts' /24: host K has `SUBNET`.K. The namespaces are private (no route from the root
/// namespace, no uplink), so this never clashes with a real network.
const SUBNET: &str = "10.213.7";
/// The bridge's name inside the bridge namespace (interface names are per namespace).
const BRIDGE: &str = "br0";
/// A host's interface name inside its own namespace.
const HOST_IF: &str = "eth0";

/// Numbers the `Net`s of this process (several tests may build one each).
static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// One isolated network: a bridge namespace and a namespace per host.
pub struct Net {
    /// `pbx-<pid>-<counter>`; the namespaces are `<base>-br` and `<base>-<host>`.
    base: String,
    /// Host id -> whether its bridge port is up.
    hosts: BTreeMap<u64, bool>,
    bridge_made: bool,
}

impl Net {
    /// Makes the bridge namespace and its bridge; deletes what crashed earlier runs left.
    pub fn new() -> Net {
        require_ip();
        remove_stale_namespaces();
        let base = format!("{NAME_PREFIX}{}-{}", std::process::id(), NEXT_NET.fetch_add(1, Ordering::Relaxed));
        let mut net = Net { base, hosts: BTreeMap::new(), bridge_made: false };
        let br = net.bridge_ns();
        ip(&["netns", "add", &br]);
        net.bridge_made = true;
        ip(&["-n", &br, "link", "set", "lo", "up"]);
        ip(&["-n", &br, "link", "add", BRIDGE, "type", "bridge"]);
        ip(&["-n", &br, "link", "set", BRIDGE, "up"]);
        net
    }

    fn bridge_ns(&self) -> String {
        format!("{}-br", self.base)
    }

    fn host_ns(&self, k: u64) -> String {
        format!("{}-{k}", self.base)
    }

    /// Host `k`'s bridge port (in the bridge namespace).
    fn port(k: u64) -> String {
        format!("p{k}")
    }

    /// The handle of host `k`'s namespace (for `in_netns`).
    pub fn ns_path(&self, k: u64) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(self.host_ns(k))
    }

    /// Host `k`'s IPv4 address.
    pub fn ip(&self, k: u64) -> String {
        format!("{SUBNET}.{k}")
    }

    /// Makes host `k`: its namespace, a veth pair from it into the bridge, its address; up.
    pub fn add_host(&mut self, k: u64) {
        assert!((1..=254).contains(&k), "host {k} does not fit in {SUBNET}.0/24");
        assert!(!self.hosts.contains_key(&k), "host {k} exists");
        let (br, ns, port) = (self.bridge_ns(), self.host_ns(k), Net::port(k));
        ip(&["netns", "add", &ns]);
        self.hosts.insert(k, true);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        // Made inside the bridge namespace with its peer moved straight into the host's: the
        // root namespace never sees either end.
        ip(&["-n", &br, "link", "add", &port, "type", "veth", "peer", "name", HOST_IF, "netns", &ns]);
        ip(&["-n", &br, "link", "set", &port, "master", BRIDGE, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.ip(k)), "dev", HOST_IF]);
        ip(&["-n", &ns, "link", "set", HOST_IF, "up"]);
    }

    /// Cuts host `k` off (its bridge port down) or connects it again.
    pub fn set_connected(&mut self, k: u64, up: bool) {
        assert!(self.hosts.contains_key(&k), "no host {k}");
        ip(&["-n", &self.bridge_ns(), "link", "set", &Net::port(k), if up { "up" } else { "down" }]);
        self.hosts.insert(k, up);
    }

    /// Whether host `k`'s bridge port is up.
    pub fn is_connected(&self, k: u64) -> bool {
        self.hosts.get(&k).copied().unwrap_or(false)
    }

    /// Makes host `k` drop `percent`% of the UDP datagrams it sends, at random (an nftables rule
    /// in its namespace, with a counter); 0 takes the rule away.
    pub fn set_loss(&mut self, k: u64, percent: u32) {
        assert!(self.hosts.contains_key(&k), "no host {k}");
        assert!(percent < 100, "a loss of {percent}%");
        require_nft();
        let ns = self.host_ns(k);
        // Deleting a table that is not there fails; nothing else can.
        let _ = nft(&ns, &format!("delete table inet {LOSS_TABLE}"));
        if percent > 0 {
            for command in [
                format!("add table inet {LOSS_TABLE}"),
                format!("add chain inet {LOSS_TABLE} out {{ type filter hook output priority 0; policy accept; }}"),
                format!("add rule inet {LOSS_TABLE} out meta l4proto udp numgen random mod 100 < {percent} counter drop"),
            ] {
                nft(&ns, &command).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    /// How many datagrams host `k`'s loss rule has dropped so far.
    pub fn dropped(&self, k: u64) -> u64 {
        let out = nft(&self.host_ns(k), &format!("list table inet {LOSS_TABLE}")).unwrap_or_else(|e| panic!("{e}"));
        // "... counter packets N bytes M drop"
        let words: Vec<&str> = out.split_whitespace().collect();
        words
            .windows(2)
            .find(|w| w[0] == "packets")
            .and_then(|w| w[1].parse().ok())
            .unwrap_or_else(|| panic!("no packet counter in the loss table of host {k}: {out}"))
    }
}

/// The nftables table a host's loss rule lives in (in the host's own namespace).
const LOSS_TABLE: &str = "pbxloss";

/// Runs `nft` with `command` (one line of nft syntax) in namespace `ns`; its output.
fn nft(ns: &str, command: &str) -> Result<String, String> {
    ip_output(&["netns", "exec", ns, "nft", command])
}

/// Fails the test with a clear message when nftables is missing.
fn require_nft() {
    require_tool("nft", "--version", "lossy-link tests need `nft` (apt-get install nftables; scripts/test.sh installs it)");
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace removes its interfaces (a veth takes its peer along); a namespace
        // that a process still runs in lives on until it exits, but loses its name here.
        let mut names: Vec<String> = self.hosts.keys().map(|&k| self.host_ns(k)).collect();
        if self.bridge_made {
            names.push(self.bridge_ns());
        }
        for name in names {
            if let Err(e) = try_ip(&["netns", "del", &name]) {
                eprintln!("netns: cannot delete {name}: {e}");
            }
        }
    }
}

/// Runs `f` with the calling thread in the network namespace at `ns` (a `/run/netns` handle),
/// then switches the thread back, also if `f` panics. Processes `f` starts live in that
/// namespace; the mount namespace and everything else stay this process's.
pub fn in_netns<T>(ns: &std::path::Path, f: impl FnOnce() -> T) -> T {
    let target = File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    let own = File::open("/proc/thread-self/ns/net").expect("open /proc/thread-self/ns/net");
    setns_net(&target, ns);
    /// Switches the thread back when dropped.
    struct Back(File);
    impl Drop for Back {
        fn drop(&mut self) {
            setns_net(&self.0, std::path::Path::new("/proc/thread-self/ns/net (saved)"));
        }
    }
    let _back = Back(own);
    f()
}

fn setns_net(ns: &File, what: &std::path::Path) {
    // SAFETY: setns on a valid open namespace fd; it changes only this thread's network namespace.
    let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if r != 0 {
        panic!("setns({}, CLONE_NEWNET): {}", what.display(), std::io::Error::last_os_error());
    }
}

/// Fails the test with a clear message when iproute2 is missing (these tests never pass silently).
fn require_ip() {
    require_tool(
        "ip",
        "-V",
        "network-namespace tests need `ip` from iproute2 (apt-get install iproute2; scripts/test.sh installs it)",
    );
}

/// Fails the test with `message` unless `program arg` runs and succeeds.
fn require_tool(program: &str, arg: &str, message: &str) {
    let ok = Command::new(program).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(ok.is_ok_and(|s| s.success()), "{message}");
}

/// Deletes `pbx-<pid>-...` namespaces whose PID no longer runs (left by a run that crashed).
fn remove_stale_namespaces() {
    let Ok(entries) = fs::read_dir(NETNS_DIR) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(NAME_PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !PathBuf::from(format!("/proc/{pid}")).exists() {
            match try_ip(&["netns", "del", &name]) {
                Ok(()) => eprintln!("netns: deleted {name}, left by an earlier run"),
                Err(e) => eprintln!("netns: cannot delete stale {name}: {e}"),
            }
        }
    }
}

fn ip(args: &[&str]) {
    if let Err(e) = try_ip(args) {
        panic!("{e}");
    }
}

fn try_ip(args: &[&str]) -> Result<(), String> {
    ip_output(args).map(|_| ())
}

/// Runs `ip` with `args`; its output, or why it failed.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("ip {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

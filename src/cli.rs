//! clap commands (the only module that imports clap). Every option can also come from the
//! environment as `PICKBOX_<OPTION>` (`--data-dir` is `PICKBOX_DATA_DIR`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::raft::SNAPSHOT_ENTRIES_MAX;

/// How long a mutation waits for a quorum before it fails with EIO, unless configured.
pub const PROPOSE_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// The certificate name the operator commands (`status`, `members`) use unless told otherwise.
pub const OPERATOR_NAME_DEFAULT: &str = "admin";
/// Longest certificate name: it becomes a file name and a DNS name (a DNS label is at most 63).
pub const CERT_NAME_BYTES_MAX: usize = 63;

/// Pickbox: a distributed POSIX filesystem in which every change is a Raft entry.
#[derive(Parser, Debug)]
#[command(name = "pickbox", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PICKBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start a node and mount the filesystem at MOUNTPOINT (runs until SIGINT/SIGTERM or umount).
    Mount(MountArgs),
    /// Create the cluster CA and certificates for nodes and operators.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show every member's Raft and replica state (asks each member).
    Status(StatusArgs),
    /// List or remove cluster members.
    #[command(subcommand)]
    Members(MembersCommand),
    /// Internal: started by `mount` to end its FUSE connection if the node is killed while stuck
    /// on it (see fs/mount.rs `Guard`).
    #[command(hide = true)]
    GuardMount(GuardArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct GuardArgs {
    /// The FUSE connection (minor number of the mount's device).
    #[arg(long)]
    pub connection: u32,
    /// The node's mountpoint (the connection is aborted only while it is mounted there).
    #[arg(long)]
    pub mountpoint: PathBuf,
    /// The node's PID.
    #[arg(long)]
    pub parent: u32,
}

impl Command {
    /// Whether this command runs a node (long-lived, logs at info) rather than a one-shot tool.
    pub fn is_node(&self) -> bool {
        matches!(self, Command::Mount(_))
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Where to mount the filesystem.
    #[arg(env = "PICKBOX_MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Directory of this node's store (Raft log and state); created if missing.
    #[arg(long, env = "PICKBOX_DATA_DIR")]
    pub data_dir: PathBuf,

    /// This node's Raft identity (non-zero); with --listen its certificate is `node<ID>`.
    #[arg(long, env = "PICKBOX_NODE_ID", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: u64,

    /// How long a mutation waits for a quorum before failing with EIO, in milliseconds.
    #[arg(long, env = "PICKBOX_PROPOSE_TIMEOUT_MS", default_value_t = PROPOSE_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub propose_timeout_ms: u64,

    /// The advisory locks (flock, fcntl) held through a node that the leader has not heard from
    /// for this long, in milliseconds, expire, so that a node that died holding locks does not
    /// block the others until it restarts; 0: they stay until it restarts or is removed.
    #[arg(long, env = "PICKBOX_LOCK_LEASE_MS", default_value_t = crate::config::LOCK_LEASE_MS_DEFAULT)]
    pub lock_lease_ms: u64,

    /// Listen for peers (QUIC with mutual TLS) at this address, e.g. 127.0.0.1:8001. Without it
    /// the node runs alone, without peers.
    #[arg(long, env = "PICKBOX_LISTEN", requires = "certs")]
    pub listen: Option<SocketAddr>,

    /// The address peers reach this node at (host:port), if not the --listen address.
    #[arg(long, env = "PICKBOX_ADVERTISE", requires = "listen")]
    pub advertise: Option<String>,

    /// Directory with the cluster CA (`ca.pem`) and this node's `node<ID>.pem` / `node<ID>.key`.
    #[arg(long, env = "PICKBOX_CERTS")]
    pub certs: Option<PathBuf>,

    /// Join the cluster a node at this address (host:port) belongs to. Only used on the first
    /// start: a node with existing state restarts as the member it is.
    #[arg(long, env = "PICKBOX_JOIN", requires = "listen")]
    pub join: Option<String>,

    /// Do not start the mount guard (a small child process that aborts the FUSE connection if
    /// this node is killed, so the mount fails with ENOTCONN instead of possibly hanging until
    /// the next start). For tests of the next start's own recovery.
    #[arg(long, hide = true)]
    pub no_mount_guard: bool,

    /// How long the kernel may keep names and attributes it got from this node without asking
    /// again, in milliseconds. Changes made on other nodes are told to the kernel at once
    /// whatever this is; what no notice reaches (see docs/SEMANTICS.md) stays at most this long.
    /// For tests (a long value makes a missed notice visible).
    #[arg(long, hide = true, default_value_t = crate::fs::CACHE_TTL_DEFAULT.as_millis() as u64)]
    pub cache_ttl_ms: u64,

    /// Take a snapshot (and compact the log) after this many log entries.
    #[arg(long, env = "PICKBOX_SNAPSHOT_ENTRIES", default_value_t = SNAPSHOT_ENTRIES_MAX,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_entries: u64,
}

impl MountArgs {
    /// Where peers reach this node: --advertise, else --listen; empty without --listen.
    pub fn advertise_addr(&self) -> String {
        match (&self.advertise, &self.listen) {
            (Some(a), _) => a.clone(),
            (None, Some(l)) => l.to_string(),
            (None, None) => String::new(),
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a new cluster CA: DIR/ca.pem and DIR/ca.key (never overwrites).
    CreateCa {
        /// Directory to write the CA into (created if missing).
        #[arg(long, env = "PICKBOX_DIR")]
        dir: PathBuf,
    },
    /// Create a certificate signed by the CA in DIR: DIR/NAME.pem and DIR/NAME.key.
    CreateNode {
        /// `node<N>` for node N, or an operator name such as `admin`.
        #[arg(value_parser = parse_cert_name)]
        name: String,
        /// Directory holding the CA; the new certificate and key are written there too.
        #[arg(long, env = "PICKBOX_DIR")]
        dir: PathBuf,
    },
}

/// How an operator command reaches the cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// Address (host:port) of any node of the cluster.
    #[arg(long, env = "PICKBOX_PEER")]
    pub peer: String,

    /// Directory with `ca.pem` and the operator's NAME.pem / NAME.key.
    #[arg(long, env = "PICKBOX_CERTS")]
    pub certs: PathBuf,

    /// The operator certificate to use (DIR/NAME.pem).
    #[arg(long, env = "PICKBOX_NAME", default_value = OPERATOR_NAME_DEFAULT, value_parser = parse_cert_name)]
    pub name: String,
}

#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Print a JSON array (one object per member) instead of a table.
    #[arg(long, env = "PICKBOX_JSON")]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum MembersCommand {
    /// List the members (id, address, voter or learner).
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Print a JSON array instead of a table.
        #[arg(long, env = "PICKBOX_JSON")]
        json: bool,
    },
    /// Remove member ID from the cluster (from the voters and the membership); an ID that is not
    /// a member is an error.
    Remove {
        /// The node id to remove.
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A certificate name: it becomes a file name in the certificate directory and the DNS name in
/// the certificate, so only letters, digits, '-' and '_' are allowed.
fn parse_cert_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > CERT_NAME_BYTES_MAX {
        return Err(format!("must be 1 to {CERT_NAME_BYTES_MAX} characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') || s.starts_with('-') {
        return Err("only letters, digits, '-' and '_' (not first) are allowed".into());
    }
    Ok(s.to_string())
}

/// Parse the process arguments (exits with a usage message on error).
pub fn parse() -> Cli {
    Cli::parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// clap reads `PICKBOX_*` from the process environment, which `options_from_the_environment`
    /// changes: every parse in these tests holds this lock so none sees another test's variables.
    static ENV: Mutex<()> = Mutex::new(());

    fn parse_args(argv: &[&str]) -> Result<Cli, clap::Error> {
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        Cli::try_parse_from(argv)
    }

    fn mount(extra: &[&str]) -> Result<MountArgs, clap::Error> {
        let mut argv = vec!["pickbox", "mount", "/m", "--data-dir", "/d"];
        argv.extend_from_slice(extra);
        match parse_args(&argv)?.command {
            Command::Mount(m) => Ok(m),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn mount_defaults() {
        let cli = parse_args(&["pickbox", "mount", "/mnt/x", "--data-dir", "/var/lib/x"]).unwrap();
        let Command::Mount(m) = cli.command else { panic!("not mount") };
        assert_eq!(m.node_id, 1);
        assert_eq!(m.propose_timeout_ms, PROPOSE_TIMEOUT_MS_DEFAULT);
        assert_eq!(m.snapshot_entries, SNAPSHOT_ENTRIES_MAX);
        assert_eq!((m.listen, m.join.as_deref(), m.certs.as_deref()), (None, None, None));
        assert_eq!(m.advertise_addr(), "");
        assert_eq!(cli.log_format, LogFormat::Human);
    }

    #[test]
    fn rejects_node_zero() {
        assert!(mount(&["--node-id", "0"]).is_err());
    }

    #[test]
    fn cluster_mount_flags() {
        let m = mount(&[
            "--node-id", "2", "--listen", "127.0.0.1:8002", "--certs", "/c", "--join", "127.0.0.1:8001",
            "--snapshot-entries", "50",
        ])
        .unwrap();
        assert_eq!(m.listen, Some("127.0.0.1:8002".parse().unwrap()));
        assert_eq!(m.join.as_deref(), Some("127.0.0.1:8001"));
        assert_eq!(m.snapshot_entries, 50);
        // --advertise defaults to --listen.
        assert_eq!(m.advertise_addr(), "127.0.0.1:8002");
        let m = mount(&["--listen", "0.0.0.0:8002", "--certs", "/c", "--advertise", "host2:8002"]).unwrap();
        assert_eq!(m.advertise_addr(), "host2:8002");
    }

    #[test]
    fn mount_flag_dependencies() {
        use clap::error::ErrorKind;
        // --listen needs --certs; --join and --advertise need --listen.
        for bad in [
            &["--listen", "127.0.0.1:8001"][..],
            &["--join", "127.0.0.1:8001"],
            &["--join", "127.0.0.1:8001", "--certs", "/c"],
            &["--advertise", "h:1"],
        ] {
            assert_eq!(mount(bad).unwrap_err().kind(), ErrorKind::MissingRequiredArgument, "{bad:?}");
        }
        assert!(mount(&["--listen", "not-an-address", "--certs", "/c"]).is_err());
        assert!(mount(&["--snapshot-entries", "0"]).is_err());
    }

    #[test]
    fn cert_commands() {
        let cli = parse_args(&["pickbox", "cert", "create-ca", "--dir", "/c"]).unwrap();
        assert!(matches!(cli.command, Command::Cert(CertCommand::CreateCa { ref dir }) if dir == &PathBuf::from("/c")));
        let cli = parse_args(&["pickbox", "cert", "create-node", "node3", "--dir", "/c"]).unwrap();
        assert!(matches!(cli.command, Command::Cert(CertCommand::CreateNode { ref name, .. }) if name == "node3"));
        for bad in ["../x", "a/b", "", "-x", "a.b", &"n".repeat(CERT_NAME_BYTES_MAX + 1)] {
            assert!(parse_args(&["pickbox", "cert", "create-node", bad, "--dir", "/c"]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn operator_commands() {
        let cli = parse_args(&["pickbox", "status", "--peer", "127.0.0.1:8001", "--certs", "/c"]).unwrap();
        let Command::Status(s) = cli.command else { panic!("not status") };
        assert_eq!((s.client.peer.as_str(), s.client.name.as_str(), s.json), ("127.0.0.1:8001", "admin", false));
        assert!(!Command::Status(s).is_node());

        let cli =
            parse_args(&["pickbox", "members", "list", "--peer", "h:1", "--certs", "/c", "--json", "--name", "ops"])
                .unwrap();
        assert!(matches!(cli.command, Command::Members(MembersCommand::List { json: true, ref client })
            if client.name == "ops"));
        let cli = parse_args(&["pickbox", "members", "remove", "3", "--peer", "h:1", "--certs", "/c"]).unwrap();
        assert!(matches!(cli.command, Command::Members(MembersCommand::Remove { id: 3, .. })));
        // Status needs a peer and certificates; node 0 does not exist.
        assert!(parse_args(&["pickbox", "status", "--certs", "/c"]).is_err());
        assert!(parse_args(&["pickbox", "members", "remove", "0", "--peer", "h:1", "--certs", "/c"]).is_err());
    }

    #[test]
    fn options_from_the_environment() {
        let vars = [("PICKBOX_PEER", "127.0.0.1:8003"), ("PICKBOX_CERTS", "/env/certs"), ("PICKBOX_NAME", "ops")];
        let _env = ENV.lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
        let parsed = Cli::try_parse_from(["pickbox", "status"]);
        for (k, _) in vars {
            std::env::remove_var(k);
        }
        let Command::Status(s) = parsed.unwrap().command else { panic!("not status") };
        assert_eq!(s.client.peer, "127.0.0.1:8003");
        assert_eq!(s.client.certs, PathBuf::from("/env/certs"));
        assert_eq!(s.client.name, "ops");
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

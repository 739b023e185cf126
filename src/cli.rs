//! clap commands (the only module that imports clap). Every option can also come from the
//! environment as `PICKBOX_*`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// How long a mutation waits for a quorum before it fails with EIO, unless configured.
pub const PROPOSE_TIMEOUT_MS_DEFAULT: u64 = 10_000;

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
}

#[derive(clap::Args, Debug, Clone)]
pub struct MountArgs {
    /// Where to mount the filesystem.
    #[arg(env = "PICKBOX_MOUNTPOINT")]
    pub mountpoint: PathBuf,

    /// Directory of this node's store (Raft log and state); created if missing.
    #[arg(long, env = "PICKBOX_DATA_DIR")]
    pub data_dir: PathBuf,

    /// This node's Raft identity (non-zero).
    #[arg(long, env = "PICKBOX_NODE_ID", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub node_id: u64,

    /// How long a mutation waits for a quorum before failing with EIO, in milliseconds.
    #[arg(long, env = "PICKBOX_PROPOSE_TIMEOUT_MS", default_value_t = PROPOSE_TIMEOUT_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub propose_timeout_ms: u64,
}

/// Parse the process arguments (exits with a usage message on error).
pub fn parse() -> Cli {
    Cli::parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_defaults() {
        let cli = Cli::try_parse_from(["pickbox", "mount", "/mnt/x", "--data-dir", "/var/lib/x"]).unwrap();
        let Command::Mount(m) = cli.command;
        assert_eq!(m.node_id, 1);
        assert_eq!(m.propose_timeout_ms, PROPOSE_TIMEOUT_MS_DEFAULT);
        assert_eq!(cli.log_format, LogFormat::Human);
    }

    #[test]
    fn rejects_node_zero() {
        assert!(Cli::try_parse_from(["pickbox", "mount", "/m", "--data-dir", "/d", "--node-id", "0"]).is_err());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! Entry only: parse the CLI, set up tracing, run.

use std::process::ExitCode;

use pickbox::cli::{self, LogFormat};
use tracing_subscriber::EnvFilter;

/// How long exit waits for tasks left in the async runtime after the node has stopped.
const RUNTIME_SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

fn main() -> ExitCode {
    let cli = cli::parse();
    // A node logs its lifecycle; the one-shot tools (cert, status, members) print their answer on
    // stdout and only warnings on stderr, unless RUST_LOG says otherwise.
    let is_node = cli.command.is_node();
    let default_level = if is_node { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // Colours only on a terminal: a node's stderr usually goes to a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match cli.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("pickbox").build() {
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

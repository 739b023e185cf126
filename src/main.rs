//! Entry only: parse the CLI, set up tracing, run.

use std::process::ExitCode;

use pickbox::cli::{self, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
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
    match runtime.block_on(pickbox::node::run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("pickbox: {e:#}");
            ExitCode::FAILURE
        }
    }
}

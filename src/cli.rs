//! clap commands.

//! Pickbox: a distributed POSIX filesystem in which every change is a Raft entry.

pub mod cli;
pub mod config;
pub mod fs;
pub mod node;
pub mod raft;
pub mod state;
pub mod store;
pub mod transport;

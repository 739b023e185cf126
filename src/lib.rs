//! Pickbox: a distributed POSIX filesystem in which every change is a Raft entry.

pub mod config;
pub mod state;
pub mod raft;

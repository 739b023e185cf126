//! Wiring and lifecycle: store -> raft -> fs; ordered shutdown.

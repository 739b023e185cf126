//! End-to-end tests against real mounts: each test starts its own `pickbox mount` process(es).
//!
//! They need root and `/dev/fuse`; without them every test fails with a message saying so.
//! At most `PICKBOX_FUSE_TESTS_PARALLEL` (default 2) nodes run at once, whatever `--test-threads` is;
//! a cluster counts as that many (it runs alone). Cluster tests are named `cluster_*`
//! (`cargo test --test fuse cluster`).

mod harness;

mod cluster;
mod cluster_cache;
mod cluster_disk;
mod cluster_harness;
mod data;
mod dirs;
mod fsx;
mod lifecycle;
mod locks;
mod meta;
mod netns;
mod partition;
mod rename;
mod stress;
mod tools;
mod writeback;

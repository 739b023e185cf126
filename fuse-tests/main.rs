//! End-to-end tests against real mounts.

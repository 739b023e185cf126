//! The redb store: Raft log, vote, state tables, snapshots (the only module that imports redb).

//! Raft: openraft type configuration, proposing commands, and the node's replica handle.
//!
//! API boundary: the rest of the crate proposes with `Replica::propose` and reads with
//! `Replica::read`; nothing outside this module and `store/` knows openraft exists.
//! (Interface stub: the store/raft work replaces the bodies; the signatures are the contract.)

use std::path::PathBuf;
use std::sync::Arc;

use crate::state::{Caller, NodeId, Op, Outcome, StateRead, StoreFault};

/// Why a proposal did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Apply rejected the command deterministically; nothing changed.
    #[error("rejected: {0}")]
    Fs(#[from] crate::state::Errno),
    /// No leader or no quorum within the configured wait, or the node is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The local store failed; the node is stopping (fail-stop).
    #[error("fatal: {0}")]
    Fatal(String),
}

/// How to start a node.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub data_dir: PathBuf,
    /// How long a mutation waits for quorum before failing with EIO.
    pub propose_timeout: std::time::Duration,
}

/// One node's replica: its Raft instance and its local store.
pub struct Replica {
    node_id: NodeId,
}

impl Replica {
    /// Open the store, start Raft, bootstrap a fresh single-node cluster (Init + RegisterNode).
    pub async fn start(cfg: ReplicaConfig) -> anyhow::Result<Arc<Replica>> {
        Ok(Arc::new(Replica { node_id: cfg.node_id }))
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Propose `op` for `caller`; returns after the command is committed and applied locally.
    pub async fn propose(&self, caller: Caller, op: Op) -> Result<Outcome, ProposeError> {
        let _ = (caller, op);
        Err(ProposeError::Unavailable("not implemented".into()))
    }

    /// A consistent read view of the local replica (a redb read transaction).
    pub fn read(&self) -> Result<Box<dyn StateRead + Send>, StoreFault> {
        Err(StoreFault("not implemented".into()))
    }

    /// Flush and stop Raft and the store.
    pub async fn shutdown(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

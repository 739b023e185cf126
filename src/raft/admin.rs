//! Membership and status: joining a cluster, removing a member, reporting each node's state.
//!
//! Server side: `serve` answers the `Join`, `Remove` and `Status` RPCs (a non-leader forwards
//! `Join` and `Remove` to the leader). Client side: `join_cluster`, `remove_member` and
//! `cluster_status` talk to any node of a cluster through a `PeerTransport` (the CLI uses a
//! QUIC endpoint with an operator certificate; a joining node uses its own).
//! Target id `ANY_NODE` dials whichever CA-signed node answers at an address (a seed address
//! whose node id we do not know).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::network::{PeerTransport, RpcKind};
use super::Replica;
use crate::state::{NodeId, StoreFault};

/// Target id meaning "whichever CA-signed node answers at this address".
pub const ANY_NODE: NodeId = 0;

/// A node asks to become a member.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    pub node_id: NodeId,
    /// Where peers reach the joining node.
    pub addr: String,
}

/// One member as the membership records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    pub node_id: NodeId,
    pub addr: String,
    pub voter: bool,
}

/// What one node reports about itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: NodeId,
    /// Leader, Follower, Candidate, Learner.
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: Option<u64>,
    pub committed_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub members: Vec<MemberInfo>,
    /// Hex SHA-256 of the replicated state at `applied_index`: equal on every node that has
    /// applied the same entries.
    pub state_digest: String,
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No node could be reached, or none answered in time.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The cluster refused the request (the reason comes from the serving node).
    #[error("refused: {0}")]
    Refused(String),
}

/// Serve `Join`, `Remove` or `Status` on this node.
pub async fn serve(_replica: &Replica, _kind: RpcKind, _body: &[u8]) -> Result<Vec<u8>, StoreFault> {
    Err(StoreFault("STUB: admin RPCs not implemented yet".into()))
}

/// Ask the cluster at `seed_addr` to admit `replica` (reachable at `my_addr`): it is added as a
/// learner, catches up, and becomes a voter. Returns once it is a voter. Idempotent: a node that
/// is a member already returns at once.
pub async fn join_cluster(
    _replica: &Arc<Replica>,
    _transport: Arc<dyn PeerTransport>,
    _seed_addr: &str,
) -> Result<(), AdminError> {
    Err(AdminError::Refused("STUB".into()))
}

/// Remove `node` from the cluster at `seed_addr` (from the voters and the membership, and
/// release what it held open).
pub async fn remove_member(_transport: Arc<dyn PeerTransport>, _seed_addr: &str, _node: NodeId) -> Result<(), AdminError> {
    Err(AdminError::Refused("STUB".into()))
}

/// The status of every member of the cluster at `seed_addr` (asks the seed for the membership,
/// then each member); a member that does not answer is reported as an error string.
pub async fn cluster_status(
    _transport: Arc<dyn PeerTransport>,
    _seed_addr: &str,
) -> Result<Vec<(MemberInfo, Result<NodeStatus, String>)>, AdminError> {
    Err(AdminError::Refused("STUB".into()))
}

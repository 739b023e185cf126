//! QUIC + mutual TLS between nodes (the only module that imports quinn/rustls/rcgen); framing with size limits.
//!
//! Code map: `certs` creates and loads the cluster CA and node certificates; `frame` is the byte
//! layout of one RPC (pure, no I/O); `quic` is the endpoint (`QuicTransport`), which implements
//! `raft::network::PeerTransport` for outgoing calls and hands incoming requests to an
//! `RpcHandler`. `ReplicaHandler` serves them from a `Replica`; `membership_authorizer` decides
//! which authenticated peer may send which request (see its policy).
//!
//! The Replica needs the transport when it starts and the server needs the Replica, so the handler
//! is attached after start (`QuicTransport::attach`); requests that arrive before get a refusal.

pub mod certs;
pub mod frame;
pub mod quic;

use std::sync::{Arc, Weak};

pub use certs::{create_ca, create_node_cert, node_id_from_name, node_name, CertError, NodeCertPaths, NodeIdentity};
pub use quic::{QuicConfig, QuicTransport, SetupError, TransportStats};

use crate::raft::network::{BoxFuture, RpcKind};
use crate::raft::Replica;
use crate::state::NodeId;

/// Serves the requests that arrive from peers: the body of one request in, the reply body out, or
/// a reason for refusing it (sent back to the caller and logged).
pub trait RpcHandler: Send + Sync + 'static {
    /// `peer` is the node id in the caller's certificate name (`None` for an operator).
    fn handle(&self, peer: Option<NodeId>, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>>;
}

/// Decides whether an authenticated peer may make a request: `peer` is the node id in its
/// certificate name (`None` if the name is not `node<N>`). Called for every request, so a peer
/// removed from the membership is refused at once. Must be quick (no I/O).
pub trait PeerAuthorizer: Send + Sync + 'static {
    fn authorize(&self, peer: Option<NodeId>, kind: RpcKind) -> bool;
}

impl<F: Fn(Option<NodeId>, RpcKind) -> bool + Send + Sync + 'static> PeerAuthorizer for F {
    fn authorize(&self, peer: Option<NodeId>, kind: RpcKind) -> bool {
        self(peer, kind)
    }
}

/// Serves Raft RPCs from a replica. Holds it weakly: the replica owns the transport, and a
/// stopped replica must not be kept alive by its own server.
pub struct ReplicaHandler(pub Weak<Replica>);

impl ReplicaHandler {
    pub fn new(replica: &Arc<Replica>) -> Arc<Self> {
        Arc::new(ReplicaHandler(Arc::downgrade(replica)))
    }
}

impl RpcHandler for ReplicaHandler {
    fn handle(&self, peer: Option<NodeId>, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let replica = self.0.upgrade();
        Box::pin(async move {
            let Some(r) = replica else { return Err("replica stopped".into()) };
            r.handle_rpc(peer, kind, &body).await.map_err(|e| e.0)
        })
    }
}

/// The authorisation policy of a node's endpoint, from the replica's current Raft membership
/// (read for every request, so a removed member is refused at once). Peers are already
/// authenticated by then: every peer presents a certificate signed by the cluster CA. `node<N>`
/// below means a certificate whose name is `node<N>` (the peer is node N); any other name is an
/// operator certificate (for example `admin`, used by the CLI).
///
/// - `AppendEntries`, `Vote`, `InstallSnapshot`, `Forward`, `ReadIndex`: `node<N>` with N a member
///   (voter or learner). While this node has no membership yet (a fresh joiner, which the leader
///   must reach before the membership reaches it), any `node<N>`; and always the leader this node
///   follows (its committed vote): a joiner catching up from the start of the log holds an early
///   membership (node 1 alone, say) for a while, which need not name the current leader (it
///   refused the leader there, and the join never finished).
/// - `Join`: any `node<N>` (a node asking to join is not a member yet).
/// - `Status`, `Remove`: any CA-signed certificate, operators' included.
///
/// Once the replica has stopped (the weak reference is gone) nothing is served.
pub fn membership_authorizer(replica: Weak<Replica>) -> Arc<dyn PeerAuthorizer> {
    Arc::new(MembershipAuthorizer(replica))
}

struct MembershipAuthorizer(Weak<Replica>);

impl PeerAuthorizer for MembershipAuthorizer {
    fn authorize(&self, peer: Option<NodeId>, kind: RpcKind) -> bool {
        let Some(replica) = self.0.upgrade() else { return false };
        match kind {
            RpcKind::Status | RpcKind::Remove => true,
            RpcKind::Join => peer.is_some(),
            RpcKind::AppendEntries
            | RpcKind::Vote
            | RpcKind::PreVote
            | RpcKind::InstallSnapshot
            | RpcKind::Forward
            | RpcKind::ReadIndex => {
                peer.is_some_and(|n| !replica.has_membership() || replica.is_member(n) || replica.follows(n))
            }
        }
    }
}

impl QuicTransport {
    /// Serve incoming Raft RPCs from `replica`.
    pub fn attach_replica(&self, replica: &Arc<Replica>) {
        self.attach(ReplicaHandler::new(replica));
    }
}

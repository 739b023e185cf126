//! QUIC + mutual TLS between nodes (the only module that imports quinn/rustls/rcgen); framing with size limits.
//!
//! Code map: `certs` creates and loads the cluster CA and node certificates; `frame` is the byte
//! layout of one RPC (pure, no I/O); `quic` is the endpoint (`QuicTransport`), which implements
//! `raft::network::PeerTransport` for outgoing calls and hands incoming requests to an
//! `RpcHandler`. `ReplicaHandler` serves them from a `Replica`.
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
    fn handle(&self, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>>;
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
    fn handle(&self, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, String>> {
        let replica = self.0.upgrade();
        Box::pin(async move {
            let Some(r) = replica else { return Err("replica stopped".into()) };
            r.handle_rpc(kind, &body).await.map_err(|e| e.0)
        })
    }
}

impl QuicTransport {
    /// Serve incoming Raft RPCs from `replica`.
    pub fn attach_replica(&self, replica: &Arc<Replica>) {
        self.attach(ReplicaHandler::new(replica));
    }
}

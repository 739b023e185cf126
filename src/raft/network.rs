//! Raft RPCs to peers, behind a byte-level `PeerTransport` so the transport can be swapped.
//!
//! The RaftNetwork implementation encodes each RPC with bounded bincode and hands the bytes to the
//! transport; the receiving node decodes them in `Replica::handle_rpc`. Until the QUIC transport
//! exists, `NoPeers` answers every call with "unreachable".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use openraft::error::{InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{SnapshotInstallBound, TypeConfig};
use crate::state::NodeId;
use crate::store::codec::{decode, encode};

/// Which Raft RPC a message carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RpcKind {
    AppendEntries,
    Vote,
    InstallSnapshot,
    /// Would the receiver vote for the sender now? (body: `elect::PreVoteRequest`; reply:
    /// `Result<bool, String>`; changes nothing).
    PreVote,
    /// A follower hands a batch of commands to the leader (body: `Batch`; reply: `ForwardReply`).
    Forward,
    /// A follower asks the leader for its read index (body: `()`; reply: `Result<u64, String>`).
    ReadIndex,
    /// A node asks to join (body: `admin::JoinRequest`); served by the leader (others forward).
    Join,
    /// An operator removes a member (body: `NodeId`); served by the leader (others forward).
    Remove,
    /// This node's status (body: `()`; reply: `admin::NodeStatus`).
    Status,
}

/// Why a transport call failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached (no route, refused, timed out); Raft retries later.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// The peer answered with something we could not use.
    #[error("network error talking to {0}: {1}")]
    Network(NodeId, String),
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Delivers one encoded RPC to `target` (at `addr`) and returns the encoded reply.
pub trait PeerTransport: Send + Sync + 'static {
    fn call(&self, target: NodeId, addr: &str, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>>;

    /// Whether `target` can be reached now (a connection to it exists or can be made), without
    /// a request. Before a snapshot is sent: its data is written out at the first read.
    fn reachable(&self, _target: NodeId, _addr: &str) -> BoxFuture<Result<(), TransportError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A transport with no peers: a single-node cluster.
pub struct NoPeers;

impl PeerTransport for NoPeers {
    fn call(&self, target: NodeId, _addr: &str, _kind: RpcKind, _body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>> {
        Box::pin(async move { Err(TransportError::Unreachable(target, "no transport configured".into())) })
    }
}

/// When each peer last answered a Raft call of this node (any answer, errors included: the peer
/// process is alive and reachable). The leader's lock leases read it (`super::leases`).
#[derive(Default)]
pub struct Contacts(std::sync::Mutex<std::collections::HashMap<NodeId, std::time::Instant>>);

impl Contacts {
    fn heard(&self, peer: NodeId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(peer, std::time::Instant::now());
    }

    /// When `peer` last answered, if it ever did.
    pub fn last(&self, peer: NodeId) -> Option<std::time::Instant> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&peer).copied()
    }
}

/// openraft's network factory over a `PeerTransport`.
#[derive(Clone)]
pub struct Network {
    me: NodeId,
    transport: Arc<dyn PeerTransport>,
    snapshot_install: SnapshotInstallBound,
    contacts: Arc<Contacts>,
}

impl Network {
    pub fn new(me: NodeId, transport: Arc<dyn PeerTransport>) -> Self {
        Network { me, transport, snapshot_install: SnapshotInstallBound::default(), contacts: Arc::default() }
    }

    /// Record the peers' answers in `contacts`.
    pub fn contacts(mut self, contacts: Arc<Contacts>) -> Self {
        self.contacts = contacts;
        self
    }

    /// How long a snapshot's last chunk may wait for the follower's install.
    pub fn snapshot_install(mut self, bound: SnapshotInstallBound) -> Self {
        self.snapshot_install = bound;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            me: self.me,
            target,
            addr: node.addr.clone(),
            transport: self.transport.clone(),
            snapshot_install: self.snapshot_install,
            failures: 0,
            contacts: self.contacts.clone(),
        }
    }
}

/// One peer, as seen by a replication stream.
pub struct PeerClient {
    me: NodeId,
    target: NodeId,
    addr: String,
    transport: Arc<dyn PeerTransport>,
    snapshot_install: SnapshotInstallBound,
    /// Calls that failed in a row (transport errors, no answer in time): only the first is
    /// logged as a warning, and the first answer after them (openraft logs these errors at
    /// debug, vendor patch 4).
    failures: u64,
    contacts: Arc<Contacts>,
}

/// A replication stream whose peer cannot be reached (down, or still opening its store) waits
/// this long before its next call, doubling up to `RPC_BACKOFF_MAX_MS`, until a call succeeds.
pub const RPC_BACKOFF_MIN_MS: u64 = 20;
/// The longest wait between two calls to a peer that cannot be reached (openraft's default is a
/// constant 500 ms). It bounds how long after a restarted peer starts serving it is caught up:
/// measured with 500, a peer that took 0.85 s to open its store was reached 467 ms after it
/// served.
pub const RPC_BACKOFF_MAX_MS: u64 = 200;

/// A Raft call is given up this much before openraft's own deadline for it (`RPCOption`), so
/// that the client sees (and counts) a call that got no answer: openraft cancels one silently.
const CALL_DEADLINE_MARGIN_MS: u64 = 2;

/// The waits between calls to an unreachable peer: `RPC_BACKOFF_MIN_MS`, doubling, at most
/// `RPC_BACKOFF_MAX_MS`.
fn backoff_schedule() -> impl Iterator<Item = std::time::Duration> {
    let max = std::time::Duration::from_millis(RPC_BACKOFF_MAX_MS);
    std::iter::successors(Some(std::time::Duration::from_millis(RPC_BACKOFF_MIN_MS)), move |d| Some((*d * 2).min(max)))
}

impl PeerClient {
    async fn call<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &mut self,
        kind: RpcKind,
        req: &Req,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let body = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.0))))?;
        let reply = match self.transport.call(self.target, &self.addr, kind, body).await {
            Ok(reply) => {
                self.contacts.heard(self.target);
                if self.failures > 0 {
                    tracing::info!(target = self.target, failed_calls = self.failures, "peer answers again");
                    self.failures = 0;
                }
                reply
            }
            Err(e) => {
                self.failed(&e);
                return Err(match &e {
                    TransportError::Unreachable(..) => RPCError::Unreachable(Unreachable::new(&e)),
                    // A peer that does not accept this node (not a member to it, yet) or is too
                    // busy will not answer otherwise in a moment: back off as from an unreachable
                    // one (openraft retries a Network error at once: ~450 calls a second went to
                    // a joiner that refused the leader).
                    TransportError::Network(_, m) if is_lasting_refusal(m) => RPCError::Unreachable(Unreachable::new(&e)),
                    TransportError::Network(..) => RPCError::Network(NetworkError::new(&e)),
                });
            }
        };
        let res: Result<Resp, E> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&AnyError::error(e.0))))?;
        res.map_err(|e| RPCError::RemoteError(openraft::error::RemoteError::new(self.target, e)))
    }

    /// `call`, given up just before openraft's deadline in `option` (a Timeout, as openraft's).
    async fn call_within<Req: Serialize, Resp: DeserializeOwned, E: std::error::Error + DeserializeOwned>(
        &mut self,
        kind: RpcKind,
        action: openraft::network::RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, E>> {
        let ttl = option.hard_ttl().saturating_sub(std::time::Duration::from_millis(CALL_DEADLINE_MARGIN_MS));
        match tokio::time::timeout(ttl, self.call(kind, req)).await {
            Ok(r) => r,
            Err(_) => {
                self.failed(&format_args!("no answer within {ttl:?}"));
                Err(RPCError::Timeout(openraft::error::Timeout { action, id: self.me, target: self.target, timeout: ttl }))
            }
        }
    }

    /// A call that failed: a warning for the first of a run, debug for the others.
    fn failed(&mut self, e: &dyn std::fmt::Display) {
        if self.failures == 0 {
            tracing::warn!(target = self.target, error = %e, "calls to peer failing (retried; logged again when it answers)");
        } else {
            tracing::debug!(target = self.target, error = %e, failed_calls = self.failures + 1, "call to peer failed");
        }
        self.failures += 1;
    }
}

/// Commands cost at least this many bytes on the wire besides their payload (caller, hash, names).
const COMMAND_OVERHEAD_BYTES: usize = 256;

/// About how many bytes `e` takes encoded (payloads dominate; no encoding needed to know).
fn entry_bytes(e: &openraft::Entry<TypeConfig>) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(b) => b.0.iter().map(|c| c.op.payload().len() + COMMAND_OVERHEAD_BYTES).sum(),
        _ => COMMAND_OVERHEAD_BYTES,
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // openraft bounds each AppendEntries by a timeout (replication/mod.rs, vendor patch 3) and
        // its own limit counts entries, not bytes: refuse a message over the byte budget with a
        // hint of how many entries fit, and openraft resends fewer at once.
        if rpc.entries.len() > 1 {
            let bytes: usize = rpc.entries.iter().map(entry_bytes).sum();
            if bytes > super::APPEND_ENTRIES_BYTES_MAX {
                let mut fit = 0usize;
                let mut sum = 0usize;
                for e in &rpc.entries {
                    sum += entry_bytes(e);
                    if sum > super::APPEND_ENTRIES_BYTES_MAX {
                        break;
                    }
                    fit += 1;
                }
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit.max(1) as u64)));
            }
        }
        if rpc.entries.is_empty() {
            return self.call_within(RpcKind::AppendEntries, openraft::network::RPCTypes::AppendEntries, &rpc, &option).await;
        }
        // openraft 0.9 sends heartbeats through the same one-call-at-a-time stream as entries, and
        // a follower's election timer restarts only when a call arrives whole: entries on a slow
        // or lossy link left a follower without a word for longer than its election timeout, and
        // it called elections mid-transfer (15% of the datagrams lost: 3 of 4 runs of a 256 MiB
        // write failed with EIO after 4-8 elections; 4 of 4 passed, none). While this call is out, a
        // heartbeat of its own (same vote, same previous entry, no entries) goes every
        // `HEARTBEAT_MS`; Raft lets a follower take it at any time (no entries: nothing to
        // truncate; its commit index is bounded by the previous entry). Its answer is not needed.
        // Encoded once (the same bytes every interval); None only if encoding failed, then no
        // heartbeat goes (the call itself goes on as before).
        let keepalive = encode(&AppendEntriesRequest::<TypeConfig> {
            vote: rpc.vote.clone(),
            prev_log_id: rpc.prev_log_id.clone(),
            leader_commit: rpc.leader_commit.clone(),
            entries: Vec::new(),
        })
        .ok();
        let (transport, target, addr) = (self.transport.clone(), self.target, self.addr.clone());
        let call = self.call_within(RpcKind::AppendEntries, openraft::network::RPCTypes::AppendEntries, &rpc, &option);
        tokio::pin!(call);
        let every = std::time::Duration::from_millis(super::HEARTBEAT_MS);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                res = &mut call => return res,
                _ = tick.tick() => {
                    let Some(body) = keepalive.clone() else { continue };
                    let (transport, addr) = (transport.clone(), addr.clone());
                    tracing::debug!(target, "entries still on their way: heartbeat beside them");
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(every, transport.call(target, &addr, RpcKind::AppendEntries, body)).await;
                    });
                }
            }
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        // Every chunk gets a bound of its own (openraft's, `install_snapshot_timeout`, is only a
        // ceiling): a chunk other than the last is sent again soon if lost (openraft retries a
        // failed chunk a few times); the last one is answered only after the follower has
        // installed the whole snapshot, which takes time in proportion to its size.
        let (bound, what) = if rpc.done {
            (self.snapshot_install.for_bytes(rpc.offset + rpc.data.len() as u64), "installed")
        } else {
            (std::time::Duration::from_millis(super::SNAPSHOT_CHUNK_TIMEOUT_MS), "stored")
        };
        match tokio::time::timeout(bound, self.call(RpcKind::InstallSnapshot, &rpc)).await {
            Ok(res) => res,
            Err(_) => {
                let e = AnyError::error(format!("snapshot chunk at offset {} not {what} within {bound:?}", rpc.offset));
                Err(RPCError::Network(NetworkError::new(&e)))
            }
        }
    }

    /// openraft's chunked transfer, after checking that the peer can be reached: the first read
    /// of a snapshot writes it out (the whole state), which is wasted on a peer that is down (its
    /// replication stream retries every backoff, with each newer snapshot).
    async fn full_snapshot(
        &mut self,
        vote: openraft::Vote<NodeId>,
        snapshot: openraft::storage::Snapshot<TypeConfig>,
        cancel: impl Future<Output = openraft::error::ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<openraft::raft::SnapshotResponse<NodeId>, openraft::error::StreamingError<TypeConfig, openraft::error::Fatal<NodeId>>>
    {
        use openraft::network::snapshot_transport::{Chunked, SnapshotTransport};
        if let Err(e) = self.transport.reachable(self.target, &self.addr).await {
            return Err(openraft::error::StreamingError::Unreachable(Unreachable::new(&e)));
        }
        Chunked::send_snapshot(self, vote, snapshot, cancel, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call_within(RpcKind::Vote, openraft::network::RPCTypes::Vote, &rpc, &option).await
    }

    /// After an Unreachable error (a peer down, or still opening its store): a short first wait,
    /// so a restarted peer is caught up soon after it serves, growing to `RPC_BACKOFF_MAX_MS`.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(backoff_schedule())
    }
}

/// How a transport words its refusal of a request from a peer it does not accept.
pub const REFUSAL_NOT_AUTHORIZED: &str = "not authorized";
/// How a transport words its refusal of a request while it has too much in flight.
pub const REFUSAL_BUSY: &str = "node busy: too many request bytes in flight";

/// Whether a Network error's message is a refusal that a retry at once would meet again.
fn is_lasting_refusal(message: &str) -> bool {
    message.ends_with(REFUSAL_NOT_AUTHORIZED) || message.ends_with(REFUSAL_BUSY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refuses every call as `reason`.
    struct Refusing(&'static str);

    impl PeerTransport for Refusing {
        fn call(&self, target: NodeId, _addr: &str, _kind: RpcKind, _body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>> {
            let reason = self.0;
            Box::pin(async move { Err(TransportError::Network(target, format!("refused by peer: {reason}"))) })
        }
    }

    /// A peer that refuses this node (or is busy) is backed off from like an unreachable one;
    /// other refusals stay Network errors.
    #[tokio::test]
    async fn a_lasting_refusal_is_backed_off_from() {
        let rpc = VoteRequest::new(openraft::Vote::new(1, 1), None);
        let option = RPCOption::new(std::time::Duration::from_secs(5));
        for (reason, unreachable) in [(REFUSAL_NOT_AUTHORIZED, true), (REFUSAL_BUSY, true), ("garbled message: x", false)] {
            let mut client = Network::new(1, Arc::new(Refusing(reason))).new_client(2, &BasicNode { addr: "peer:2".into() }).await;
            let r = client.vote(rpc.clone(), option.clone()).await;
            match r {
                Err(RPCError::Unreachable(_)) => assert!(unreachable, "{reason}: backed off"),
                Err(RPCError::Network(_)) => assert!(!unreachable, "{reason}: retried at once"),
                other => panic!("{reason}: {other:?}"),
            }
        }
    }

    /// Never answers until `answer` is set; then answers every vote with a grant.
    struct Silent {
        answer: std::sync::atomic::AtomicBool,
    }

    impl PeerTransport for Silent {
        fn call(&self, _target: NodeId, _addr: &str, _kind: RpcKind, _body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>> {
            if !self.answer.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            let vote = openraft::Vote::new(1, 2);
            let granted: Result<VoteResponse<NodeId>, RaftError<NodeId>> = Ok(VoteResponse::new(vote, None, true));
            let reply = encode(&granted).expect("encodes");
            Box::pin(async move { Ok(reply) })
        }
    }

    /// A call that gets no answer ends as a Timeout just before openraft's deadline, so the
    /// client counts it (openraft would cancel it unseen); an answer ends the run of failures.
    /// On tokio's paused clock (it jumps to the next timer when every task waits): the order of
    /// the two deadlines is checked, not how fast a loaded machine gets there (on the wall clock
    /// it once took 54 ms in a CI run against a 50 ms deadline).
    #[tokio::test(start_paused = true)]
    async fn a_call_without_an_answer_times_out_in_the_client_and_is_counted() {
        let transport = Arc::new(Silent { answer: std::sync::atomic::AtomicBool::new(false) });
        let mut client = Network::new(1, transport.clone()).new_client(2, &BasicNode { addr: "peer:2".into() }).await;
        let rpc = VoteRequest::new(openraft::Vote::new(1, 1), None);
        let deadline = std::time::Duration::from_millis(50);
        for n in 1..=2 {
            let started = tokio::time::Instant::now();
            let r = tokio::time::timeout(deadline * 10, client.vote(rpc.clone(), RPCOption::new(deadline)))
                .await
                .expect("the client gave the call up itself");
            assert!(matches!(r, Err(RPCError::Timeout(_))), "{r:?}");
            assert!(started.elapsed() < deadline, "given up before openraft's deadline: {:?}", started.elapsed());
            assert_eq!(client.failures, n);
        }
        transport.answer.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = client.vote(rpc, RPCOption::new(deadline)).await.expect("granted");
        assert!(r.vote_granted);
        assert_eq!(client.failures, 0);
    }

    /// Records every AppendEntries it carries; answers one with entries after `entries_take`,
    /// one without at once.
    struct Recording {
        entries_take: std::time::Duration,
        seen: std::sync::Mutex<Vec<AppendEntriesRequest<TypeConfig>>>,
    }

    impl PeerTransport for Recording {
        fn call(&self, _target: NodeId, _addr: &str, kind: RpcKind, body: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>> {
            assert!(matches!(kind, RpcKind::AppendEntries), "{kind:?}");
            let req: AppendEntriesRequest<TypeConfig> = decode(&body).expect("an AppendEntries");
            let wait = if req.entries.is_empty() { std::time::Duration::ZERO } else { self.entries_take };
            self.seen.lock().unwrap().push(req);
            let ok: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = Ok(AppendEntriesResponse::Success);
            let reply = encode(&ok).expect("encodes");
            Box::pin(async move {
                tokio::time::sleep(wait).await;
                Ok(reply)
            })
        }
    }

    /// While entries are on their way for longer than a heartbeat interval, heartbeats of the
    /// same leader and previous entry go beside them (a follower would otherwise hear nothing
    /// for as long as the transfer takes, and call an election); a quick call sends none.
    #[tokio::test]
    async fn slow_entries_are_accompanied_by_heartbeats() {
        let heartbeat = std::time::Duration::from_millis(super::super::HEARTBEAT_MS);
        let leader = openraft::CommittedLeaderId::new(3, 1);
        let rpc = AppendEntriesRequest::<TypeConfig> {
            vote: openraft::Vote::new_committed(3, 1),
            prev_log_id: Some(openraft::LogId::new(leader, 7)),
            leader_commit: Some(openraft::LogId::new(leader, 6)),
            entries: (8..10)
                .map(|i| openraft::Entry { log_id: openraft::LogId::new(leader, i), payload: openraft::EntryPayload::Blank })
                .collect(),
        };
        for (takes, least, most) in [(heartbeat * 7 / 2, 2, 3), (std::time::Duration::ZERO, 0, 0)] {
            let transport = Arc::new(Recording { entries_take: takes, seen: Default::default() });
            let mut client = Network::new(1, transport.clone()).new_client(2, &BasicNode { addr: "peer:2".into() }).await;
            let r = client.append_entries(rpc.clone(), RPCOption::new(std::time::Duration::from_secs(5))).await;
            assert!(matches!(r, Ok(AppendEntriesResponse::Success)), "{r:?}");
            let seen = transport.seen.lock().unwrap();
            let first = &seen[0];
            assert_eq!(first.entries.len(), rpc.entries.len(), "the call itself goes first");
            let beats = &seen[1..];
            assert!((least..=most).contains(&beats.len()), "{} heartbeats while the entries took {takes:?}", beats.len());
            for b in beats {
                assert!(b.entries.is_empty(), "a heartbeat carries no entries");
                assert_eq!((&b.vote, &b.prev_log_id, &b.leader_commit), (&rpc.vote, &rpc.prev_log_id, &rpc.leader_commit));
            }
        }
    }

    #[test]
    fn the_backoff_doubles_from_the_minimum_to_the_maximum() {
        let ms: Vec<u64> = backoff_schedule().take(8).map(|d| d.as_millis() as u64).collect();
        assert_eq!(ms, [20, 40, 80, 160, 200, 200, 200, 200]);
    }
}

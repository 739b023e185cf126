//! Membership and status: joining a cluster, removing a member, reporting each node's state.
//!
//! Server side: `serve` answers the `Join`, `Remove` and `Status` RPCs (a non-leader forwards
//! `Join` and `Remove` to the leader). Client side: `join_cluster`, `remove_member` and
//! `cluster_status` talk to any node of a cluster through a `PeerTransport` (the CLI uses a
//! QUIC endpoint with an operator certificate; a joining node uses its own).
//! Target id `ANY_NODE` dials whichever CA-signed node answers at an address (a seed address
//! whose node id we do not know).
//!
//! Join, on the leader: a voter at the same address is done (registered if it is not yet);
//! otherwise add it as a learner, wait until it has everything the leader had applied when the
//! join started, promote it (`AddVoterIds`), propose `RegisterNode`. Remove, on the leader: drop it
//! from the voters and from the membership, then propose `UnregisterNode` (which frees the
//! open-unlinked files only it held); the last voter cannot be removed; a leader that removed
//! itself steps down and asks the remaining voters to finish. A non-leader forwards either request
//! once to the leader it knows and relays the answer; a forwarded request is not forwarded again
//! (the sender retries), so two nodes with stale views cannot bounce it between them. Who may
//! send which request is `transport::membership_authorizer`'s policy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, LogId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::network::{PeerTransport, RpcKind, TransportError};
use super::{ProposeError, Replica};
use crate::state::{Caller, NodeId, Op, StoreFault};
use crate::store::codec::{decode, encode};

/// How long `join_cluster` keeps trying (seed unreachable, no leader yet, learner catching up).
pub const JOIN_DEADLINE_MS: u64 = 60_000;
/// How long `remove_member` keeps trying (seed unreachable, no leader yet).
pub const REMOVE_DEADLINE_MS: u64 = 30_000;
/// First and largest pause between retries of an admin call.
pub const RETRY_BACKOFF_MIN_MS: u64 = 100;
pub const RETRY_BACKOFF_MAX_MS: u64 = 2_000;
/// How long `cluster_status` waits for each member's answer (a member hashes its whole state to
/// answer, so this grows with the data: measure before lowering it).
pub const STATUS_TIMEOUT_MS: u64 = 5_000;
/// How long the leader retries a membership change while another one is still in progress.
pub const MEMBERSHIP_BUSY_WAIT_MS: u64 = 10_000;
/// The state machine metadata key of the last applied log id (the same key as in `storage`).
const SM_APPLIED_KEY: &str = "applied";
/// The Raft metadata key of the committed log id (the same key as in `storage`).
const META_COMMITTED_KEY: &str = "committed";
/// An error reply starting with this is final: retrying the same request cannot succeed.
const FINAL: &str = "refused: ";
/// The end of the final reply to a `Remove` of a node that is neither in the membership nor
/// registered (`remove_member` turns it into `AdminError::NotAMember`).
const NOT_A_MEMBER: &str = "is not a member";

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
    /// Reads on this node that met a corrupt stored block (and answered EIO) since it started.
    pub corrupt_block_reads: u64,
    /// This node's locks expired and it has not acknowledged that yet: the cluster refuses its
    /// changes (see `state::LockFences`).
    pub lock_fenced: bool,
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
    /// `remove_member` of a node that is not a member (nor a removal left half done).
    #[error("node {0} is not a member")]
    NotAMember(NodeId),
}

/// A request a non-leader forwarded to the leader. A forwarded request is never forwarded again
/// (two nodes that each believe the other leads, during an election, would otherwise bounce it
/// back and forth); the sender retries instead. On the wire it is the plain request followed by
/// one byte, so a plain request never decodes as one (decoding rejects trailing bytes).
#[derive(Serialize, Deserialize)]
struct Forwarded<T> {
    req: T,
    hops: u8,
}

/// The request in `body` and whether a node forwarded it.
fn decode_request<T: DeserializeOwned>(body: &[u8]) -> Result<(T, bool), StoreFault> {
    match decode::<T>(body) {
        Ok(req) => Ok((req, false)),
        Err(plain) => match decode::<Forwarded<T>>(body) {
            Ok(f) => Ok((f.req, true)),
            Err(_) => Err(plain),
        },
    }
}

/// Serve `Join`, `Remove` or `Status` on this node. Replies are an encoded `Result<T, String>`
/// (`T` = `()` for `Join` and `Remove`, `NodeStatus` for `Status`); a body that does not decode
/// is refused as a fault.
pub async fn serve(replica: &Replica, kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, StoreFault> {
    match kind {
        RpcKind::Status => {
            let _: () = decode(body)?;
            encode(&status(replica).await)
        }
        RpcKind::Join => {
            let (req, forwarded) = decode_request::<JoinRequest>(body)?;
            match leader(replica) {
                Leader::Me => encode(&join_here(replica, &req).await),
                other => relay(replica, other, kind, &req, forwarded).await,
            }
        }
        RpcKind::Remove => {
            let (node, forwarded) = decode_request::<NodeId>(body)?;
            match leader(replica) {
                Leader::Me => encode(&remove_here(replica, node).await),
                other => relay(replica, other, kind, &node, forwarded).await,
            }
        }
        other => Err(StoreFault(format!("{other:?} is not an admin request"))),
    }
}

/// Who this node believes leads.
enum Leader {
    Me,
    Other(NodeId, String),
    Unknown,
}

fn leader(replica: &Replica) -> Leader {
    let m = replica.raft.metrics().borrow().clone();
    match m.current_leader {
        Some(l) if l == replica.node_id && m.state.is_leader() => Leader::Me,
        Some(l) if l != replica.node_id => match m.membership_config.membership().get_node(&l) {
            Some(n) => Leader::Other(l, n.addr.clone()),
            None => Leader::Unknown,
        },
        _ => Leader::Unknown,
    }
}

/// Hand a request to the leader and pass its encoded answer back unchanged.
async fn relay<T: Serialize>(
    replica: &Replica,
    leader: Leader,
    kind: RpcKind,
    req: &T,
    forwarded: bool,
) -> Result<Vec<u8>, StoreFault> {
    let (id, addr) = match leader {
        Leader::Other(id, addr) if !forwarded => (id, addr),
        Leader::Other(id, _) => {
            return encode(&Err::<(), _>(format!(
                "not the leader (node {id} is, as far as node {} knows); retry",
                replica.node_id
            )))
        }
        _ => return encode(&Err::<(), _>(format!("node {} knows no leader; retry", replica.node_id))),
    };
    let body = encode(&Forwarded { req, hops: 1 })?;
    match replica.transport.call(id, &addr, kind, body).await {
        Ok(answer) => Ok(answer),
        Err(e) => encode(&Err::<(), _>(format!("forwarding to the leader (node {id} at {addr}): {e}"))),
    }
}

/// The voters and every member's address, as this node's Raft knows them.
fn membership(replica: &Replica) -> (BTreeSet<NodeId>, BTreeMap<NodeId, String>) {
    let m = replica.raft.metrics().borrow().membership_config.clone();
    let voters = m.membership().voter_ids().collect();
    let nodes = m.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    (voters, nodes)
}

impl Replica {
    /// Whether this node is a voter in its current membership.
    pub fn is_voter(&self) -> bool {
        self.raft.metrics().borrow().membership_config.membership().voter_ids().any(|v| v == self.node_id)
    }

    /// Whether this node is in its current membership as a learner only: a join that stopped
    /// (crash, stop) after the leader added it and before the promotion (see `resume_join`).
    pub fn is_learner(&self) -> bool {
        self.is_member(self.node_id) && !self.is_voter()
    }
}

/// Apply a membership change on the leader, retrying while an earlier change is still in progress.
async fn change(replica: &Replica, changes: ChangeMembers<NodeId, openraft::BasicNode>) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(MEMBERSHIP_BUSY_WAIT_MS);
    loop {
        match replica.raft.change_membership(changes.clone(), false).await {
            Ok(_) => return Ok(()),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(e))))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(error = %e, "membership change waits for the previous one");
                tokio::time::sleep(Duration::from_millis(RETRY_BACKOFF_MIN_MS)).await;
            }
            Err(e) => return Err(format!("membership change {changes:?}: {e}")),
        }
    }
}

/// Propose `RegisterNode` (on the leader) unless `node` is registered already.
async fn ensure_registered(replica: &Replica, node: NodeId) -> Result<(), String> {
    let registered = replica.read().and_then(|v| v.meta()).map_err(|e| e.to_string())?.nodes.contains(&node);
    if registered {
        return Ok(());
    }
    match replica.propose(Caller::root(), Op::RegisterNode { node }).await {
        Ok(_) | Err(ProposeError::Fs(_)) => Ok(()),
        Err(e) => Err(format!("registering node {node}: {e}")),
    }
}

/// Leader: admit `req.node_id` as a learner, wait for it to catch up, make it a voter, register it.
/// Idempotent: a voter at the same address only gets registered if it is not yet.
async fn join_here(replica: &Replica, req: &JoinRequest) -> Result<(), String> {
    let node = req.node_id;
    if node == ANY_NODE {
        return Err(format!("{FINAL}node id {ANY_NODE} is reserved"));
    }
    if req.addr.is_empty() {
        return Err(format!("{FINAL}node {node} has no address to be reached at"));
    }
    let (voters, nodes) = membership(replica);
    match nodes.get(&node) {
        Some(addr) if voters.contains(&node) && *addr == req.addr => return ensure_registered(replica, node).await,
        Some(addr) if voters.contains(&node) => {
            return Err(format!("{FINAL}node {node} is a voter at {addr}; remove it before it joins at {}", req.addr))
        }
        Some(addr) if *addr != req.addr => {
            // A learner left behind by an earlier attempt from another address: openraft does
            // not replace a node's address when it is added again.
            change(replica, ChangeMembers::RemoveNodes([node].into())).await?;
        }
        _ => {}
    }
    tracing::info!(node = replica.node_id, joiner = node, addr = %req.addr, "adding a learner");
    replica.add_learner(node, req.addr.clone()).await.map_err(|e| format!("adding learner {node}: {e}"))?;
    tracing::info!(node = replica.node_id, joiner = node, "learner caught up; making it a voter");
    change(replica, ChangeMembers::AddVoterIds([node].into())).await?;
    ensure_registered(replica, node).await?;
    tracing::info!(node = replica.node_id, joiner = node, "node joined as a voter");
    Ok(())
}

/// Leader: remove `node` from the voters and from the membership, then unregister it (which frees
/// the open-unlinked files only it held). Refuses to remove the last voter, and a node that is
/// neither in the membership nor registered (final: "node N is not a member"). A removal left
/// half done (out of the membership but still registered: a leader change or a crash between the
/// steps) is finished, so retrying a failed removal always converges; a retry of a removal that
/// did take effect is answered "not a member", which `remove_member` accepts (see there).
async fn remove_here(replica: &Replica, node: NodeId) -> Result<(), String> {
    let (voters, nodes) = membership(replica);
    let registered = |replica: &Replica| -> Result<bool, String> {
        Ok(replica.read().and_then(|v| v.meta()).map_err(|e| e.to_string())?.nodes.contains(&node))
    };
    if !nodes.contains_key(&node) && !registered(replica)? {
        return Err(format!("{FINAL}node {node} {NOT_A_MEMBER}"));
    }
    if voters.contains(&node) {
        if voters.len() == 1 {
            return Err(format!("{FINAL}node {node} is the last voter; a cluster cannot remove all its voters"));
        }
        tracing::info!(node = replica.node_id, removed = node, "removing a voter");
        change(replica, ChangeMembers::RemoveVoters([node].into())).await?;
    }
    if membership(replica).1.contains_key(&node) {
        change(replica, ChangeMembers::RemoveNodes([node].into())).await?;
    }
    if !registered(replica)? {
        return Ok(());
    }
    if node != replica.node_id {
        return match replica.propose(Caller::root(), Op::UnregisterNode { node }).await {
            Ok(_) | Err(ProposeError::Fs(_)) => Ok(()),
            Err(e) => Err(format!("unregistering node {node}: {e}")),
        };
    }
    // This leader removed itself and stepped down: it can no longer commit, so it asks the
    // remaining voters (one of which is or will be the leader) to finish the removal.
    let rest: Vec<(NodeId, String)> = nodes.into_iter().filter(|(id, _)| *id != node && voters.contains(id)).collect();
    let body = encode(&node).map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(REMOVE_DEADLINE_MS);
    retry(deadline, "unregistering the removed leader", || async {
        let mut last = String::from("no remaining voter");
        for (id, addr) in &rest {
            match call::<()>(&*replica.transport, *id, addr, RpcKind::Remove, body.clone()).await {
                Ok(()) => return Ok(()),
                // An earlier round (whose answer was lost) finished it already.
                Err(AdminError::Refused(m)) if is_not_a_member(&m) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        Err(Attempt::Retry(last))
    })
    .await
    .map_err(|e| e.to_string())
}

/// This node's status; the digest and the applied index come from one read transaction.
pub(super) async fn status(replica: &Replica) -> Result<NodeStatus, String> {
    let m = replica.raft.metrics().borrow().clone();
    let store = replica.store.clone();
    let (applied, state_digest) = tokio::task::spawn_blocking(move || {
        store.state_digest(|view| match view.sm_meta(SM_APPLIED_KEY)? {
            Some(b) => Ok(decode::<Option<LogId<NodeId>>>(&b)?.map(|l| l.index)),
            None => Ok(None),
        })
    })
    .await
    .map_err(|e| format!("digest task: {e}"))?
    .map_err(|e| e.to_string())?;
    // `committed` is written lazily with the next log commit, so it may lag what was applied.
    let committed = match replica.store.raft_meta(META_COMMITTED_KEY) {
        Ok(Some(b)) => decode::<LogId<NodeId>>(&b).ok().map(|l| l.index),
        _ => None,
    };
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let members = membership
        .nodes()
        .map(|(id, n)| MemberInfo { node_id: *id, addr: n.addr.clone(), voter: voters.contains(id) })
        .collect();
    Ok(NodeStatus {
        node_id: replica.node_id,
        role: format!("{:?}", m.state),
        term: m.current_term,
        leader: m.current_leader,
        last_log_index: m.last_log_index,
        committed_index: committed.max(applied),
        applied_index: applied,
        snapshot_index: m.snapshot.map(|l| l.index),
        members,
        state_digest,
        corrupt_block_reads: crate::store::CORRUPT_BLOCK_READS.load(std::sync::atomic::Ordering::Relaxed),
        lock_fenced: replica.own_fence.borrow().active,
    })
}

// ------------------------------------------------------------------------------------- client

/// How one attempt of a retried call ended.
enum Attempt {
    /// Worth retrying (unreachable, no leader yet, catching up).
    Retry(String),
    /// Retrying cannot help.
    Final(AdminError),
}

/// One admin call: the transport's answer decoded as `Result<T, String>`.
async fn call<T: DeserializeOwned>(
    transport: &dyn PeerTransport,
    target: NodeId,
    addr: &str,
    kind: RpcKind,
    body: Vec<u8>,
) -> Result<T, AdminError> {
    let reply = transport.call(target, addr, kind, body).await.map_err(|e| match e {
        TransportError::Unreachable(..) => AdminError::Unreachable(e.to_string()),
        TransportError::Network(..) => AdminError::Refused(e.to_string()),
    })?;
    let answer: Result<T, String> =
        decode(&reply).map_err(|e| AdminError::Refused(format!("garbled answer from {addr}: {e}")))?;
    answer.map_err(AdminError::Refused)
}

/// Whether an admin error is worth retrying.
fn classify(e: AdminError) -> Attempt {
    match e {
        AdminError::Refused(m) if m.starts_with(FINAL) || m.contains("not authorized") => {
            Attempt::Final(AdminError::Refused(m))
        }
        // A TLS refusal (a certificate from another CA, or none) cannot heal by waiting; the
        // transport reports it as text from rustls, on either side of the handshake.
        AdminError::Refused(m) | AdminError::Unreachable(m) if is_certificate_refusal(&m) => {
            Attempt::Final(AdminError::Refused(m))
        }
        AdminError::Refused(m) | AdminError::Unreachable(m) => Attempt::Retry(m),
        e @ AdminError::NotAMember(_) => Attempt::Final(e),
    }
}

/// Whether an error reply is `remove_here`'s "node N is not a member".
fn is_not_a_member(m: &str) -> bool {
    m.starts_with(FINAL) && m.ends_with(NOT_A_MEMBER)
}

/// Whether a transport error says the TLS handshake refused a certificate.
fn is_certificate_refusal(m: &str) -> bool {
    m.contains("invalid peer certificate") || m.contains("peer sent no certificates")
}

/// Run `attempt` until it succeeds, fails finally, or `deadline` passes (backing off between tries).
async fn retry<T, F, Fut>(deadline: tokio::time::Instant, what: &str, mut attempt: F) -> Result<T, AdminError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>>,
{
    let mut pause = Duration::from_millis(RETRY_BACKOFF_MIN_MS);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Retry(why)) => {
                let now = tokio::time::Instant::now();
                if now + pause > deadline {
                    return Err(AdminError::Unreachable(format!("{what}: gave up; last error: {why}")));
                }
                tracing::info!(error = %why, retry_in_ms = pause.as_millis() as u64, "{what}: retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(RETRY_BACKOFF_MAX_MS));
            }
        }
    }
}

/// Ask the cluster at `seed_addr` to admit `replica` (reachable at its advertised address): it is
/// added as a learner, catches up, and becomes a voter. Returns once this node sees itself as a
/// voter. Idempotent: a node that is a voter already returns at once. Retries (with backoff) while
/// the seed is unreachable or the cluster has no leader, for at most `JOIN_DEADLINE_MS`.
pub async fn join_cluster(
    replica: &Arc<Replica>,
    transport: Arc<dyn PeerTransport>,
    seed_addr: &str,
) -> Result<(), AdminError> {
    join_through(replica, transport, &[seed_addr.to_string()]).await
}

/// Finish a join that stopped after this node was added as a learner (it crashed or was stopped
/// before the promotion; on restart it is a learner that nobody promotes). Asks the cluster to
/// `Join` this node again, which is idempotent on the leader: the learner is added again (a
/// no-op for openraft), catches up, is promoted and registered. A node that is no learner returns
/// at once. Seeds, tried in turn at every attempt: the leader this node knows, the other voters
/// of its membership, then `seed` (`--join`, if given). Same retries and deadline as `join_cluster`.
pub async fn resume_join(
    replica: &Arc<Replica>,
    transport: Arc<dyn PeerTransport>,
    seed: Option<&str>,
) -> Result<(), AdminError> {
    if !replica.is_learner() {
        return Ok(());
    }
    let (voters, nodes) = membership(replica);
    let leader = replica.raft.metrics().borrow().current_leader;
    let mut seeds: Vec<String> = Vec::new();
    let ids = leader.into_iter().chain(voters.iter().copied()).filter(|id| *id != replica.node_id);
    for addr in ids.filter_map(|id| nodes.get(&id).cloned()).chain(seed.map(str::to_string)) {
        if !seeds.contains(&addr) {
            seeds.push(addr);
        }
    }
    if seeds.is_empty() {
        return Err(AdminError::Refused("this learner knows no voter to ask for its promotion".into()));
    }
    tracing::info!(node = replica.node_id, ?seeds, "a learner since an unfinished join: asking to be promoted");
    join_through(replica, transport, &seeds).await
}

/// `join_cluster` through the first of `seeds` that takes the request at each attempt.
async fn join_through(
    replica: &Arc<Replica>,
    transport: Arc<dyn PeerTransport>,
    seeds: &[String],
) -> Result<(), AdminError> {
    if replica.is_voter() {
        return Ok(());
    }
    let req = JoinRequest { node_id: replica.node_id, addr: replica.cfg.advertise_addr.clone() };
    if req.addr.is_empty() {
        return Err(AdminError::Refused("this node has no advertise address for peers to reach it at".into()));
    }
    let body = encode(&req).map_err(|e| AdminError::Refused(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(JOIN_DEADLINE_MS);
    tracing::info!(node = req.node_id, ?seeds, addr = %req.addr, "asking the cluster to join");
    retry(deadline, "joining the cluster", || async {
        let mut last = String::from("no seed address");
        for seed in seeds {
            match call::<()>(&*transport, ANY_NODE, seed, RpcKind::Join, body.clone()).await.map_err(classify) {
                Ok(()) => return Ok(()),
                Err(Attempt::Retry(why)) => last = format!("{seed}: {why}"),
                Err(fin) => return Err(fin),
            }
        }
        Err(Attempt::Retry(last))
    })
    .await?;
    // The leader committed the membership that makes this node a voter; wait until it arrives.
    let left = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_secs(1));
    replica
        .raft
        .wait(Some(left))
        .metrics(|m| m.membership_config.membership().voter_ids().any(|v| v == m.id), "this node is a voter")
        .await
        .map_err(|e| AdminError::Unreachable(format!("admitted, but the membership did not arrive: {e}")))?;
    tracing::info!(node = req.node_id, "joined the cluster as a voter");
    Ok(())
}

/// Remove `node` from the cluster at `seed_addr` (from the voters and the membership, and
/// release what it held open). Retries while the seed is unreachable or there is no leader, for at
/// most `REMOVE_DEADLINE_MS`.
///
/// A node that is not a member is `AdminError::NotAMember` (an operator's typo must not pass for
/// a removal), except after a failed attempt of this same call: that attempt may have reached the
/// leader and removed the node before its answer was lost (a timeout, a leader change), so "not a
/// member" then means the removal took effect and the call succeeds. The state asked for holds in
/// both cases; only the report differs.
pub async fn remove_member(transport: Arc<dyn PeerTransport>, seed_addr: &str, node: NodeId) -> Result<(), AdminError> {
    let body = encode(&node).map_err(|e| AdminError::Refused(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(REMOVE_DEADLINE_MS);
    let attempted = std::sync::atomic::AtomicBool::new(false);
    retry(deadline, "removing a member", || async {
        match call::<()>(&*transport, ANY_NODE, seed_addr, RpcKind::Remove, body.clone()).await {
            Ok(()) => Ok(()),
            Err(AdminError::Refused(m)) if is_not_a_member(&m) => {
                if attempted.load(std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!(node, "not a member any more: an earlier attempt of this call removed it");
                    Ok(())
                } else {
                    Err(Attempt::Final(AdminError::NotAMember(node)))
                }
            }
            Err(e) => {
                attempted.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(classify(e))
            }
        }
    })
    .await
}

/// The status of every member of the cluster at `seed_addr` (asks the seed for the membership,
/// then each member, concurrently, each within `STATUS_TIMEOUT_MS`); a member that does not
/// answer is reported as an error string.
pub async fn cluster_status(
    transport: Arc<dyn PeerTransport>,
    seed_addr: &str,
) -> Result<Vec<(MemberInfo, Result<NodeStatus, String>)>, AdminError> {
    let unit = encode(&()).map_err(|e| AdminError::Refused(e.to_string()))?;
    let timeout = Duration::from_millis(STATUS_TIMEOUT_MS);
    let seed = tokio::time::timeout(
        timeout,
        call::<NodeStatus>(&*transport, ANY_NODE, seed_addr, RpcKind::Status, unit.clone()),
    )
    .await
    .map_err(|_| AdminError::Unreachable(format!("{seed_addr}: no answer within {timeout:?}")))??;
    let asks = seed.members.iter().map(|m| {
        let transport = transport.clone();
        let unit = unit.clone();
        async move {
            let r = tokio::time::timeout(
                timeout,
                call::<NodeStatus>(&*transport, m.node_id, &m.addr, RpcKind::Status, unit),
            )
            .await;
            let r = match r {
                Err(_) => Err(format!("no answer within {timeout:?}")),
                Ok(r) => r.map_err(|e| e.to_string()),
            };
            (m.clone(), r)
        }
    });
    Ok(futures::future::join_all(asks).await)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::raft::network::BoxFuture;

    /// Answers each call with the next scripted reply (a transport error or an encoded answer).
    struct Scripted(Mutex<Vec<Result<Result<(), String>, TransportError>>>);

    impl PeerTransport for Scripted {
        fn call(&self, _: NodeId, _: &str, kind: RpcKind, _: Vec<u8>) -> BoxFuture<Result<Vec<u8>, TransportError>> {
            assert_eq!(kind, RpcKind::Remove);
            let next = self.0.lock().unwrap().remove(0);
            Box::pin(async move { next.map(|answer| encode(&answer).unwrap()) })
        }
    }

    fn not_a_member(node: NodeId) -> Result<(), String> {
        Err(format!("{FINAL}node {node} {NOT_A_MEMBER}"))
    }

    async fn remove(script: Vec<Result<Result<(), String>, TransportError>>) -> Result<(), AdminError> {
        let t = Arc::new(Scripted(Mutex::new(script)));
        let out = remove_member(t.clone(), "seed:1", 7).await;
        assert!(t.0.lock().unwrap().is_empty(), "every scripted answer was used");
        out
    }

    #[tokio::test]
    async fn remove_of_a_non_member_is_an_error_unless_an_earlier_attempt_may_have_done_it() {
        let err = remove(vec![Ok(not_a_member(7))]).await.unwrap_err();
        assert!(matches!(err, AdminError::NotAMember(7)), "{err:?}");
        assert_eq!(err.to_string(), "node 7 is not a member");
        // The first attempt timed out (it may have removed the node); the retry finds it gone.
        let lost = TransportError::Unreachable(ANY_NODE, "no reply within 5s".into());
        remove(vec![Err(lost), Ok(not_a_member(7))]).await.unwrap();
        // A relayed answer that the leader lost: the same.
        remove(vec![Ok(Err("forwarding to the leader (node 1 at a:1): timed out".into())), Ok(not_a_member(7))])
            .await
            .unwrap();
        // Other final refusals stay errors.
        let err = remove(vec![Ok(Err(format!("{FINAL}node 7 is the last voter")))]).await.unwrap_err();
        assert!(err.to_string().contains("last voter"), "{err}");
        remove(vec![Ok(Ok(()))]).await.unwrap();
    }
}

//! Getting a batch committed by whichever node leads (locally, or forwarded to the leader over the
//! `Forward` RPC), and the read index (a leader round, or the `ReadIndex` RPC from a follower).
//!
//! Retries go to whoever leads now, with backoff, until the caller's one deadline. Retrying a
//! batch is exactly-once because apply deduplicates by `(origin, seq)`: a batch that committed
//! twice answers the second time with the first results.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Batch, ProposeError, Replica, RpcKind};
use crate::state::{CommandResult, NodeId};
use crate::store::codec::{decode, encode};

/// First pause before retrying when there is no usable leader; doubled after every failure...
pub const RETRY_BACKOFF_MIN_MS: u64 = 10;
/// ...up to this.
pub const RETRY_BACKOFF_MAX_MS: u64 = 200;

/// Why a node did not serve a `Forward` or `ReadIndex` request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// This node does not lead; `leader` is whom it believes leads.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    /// The leader could not commit or confirm leadership in time (no quorum).
    #[error("{0}")]
    Unavailable(String),
    /// The leader's Raft has stopped.
    #[error("leader stopped: {0}")]
    Fatal(String),
}

/// What the leader answers to a forwarded batch: the log index of the entry and one result per
/// command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub index: u64,
    pub results: Vec<CommandResult>,
}

/// A batch handed to this node's Raft (`client_write_ff`): its outcome arrives here.
pub(super) type LocalWrite = tokio::sync::oneshot::Receiver<openraft::raft::ClientWriteResult<super::TypeConfig>>;

/// How a batch keeps its place in the log (see `Replica::commit`).
pub(super) struct Order {
    /// The first attempt, already submitted by the batcher in numbering order, if this node led.
    pub first: Option<LocalWrite>,
    /// Finishes (either way) when the previous batch has finished; `None` for the first batch.
    pub after: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Cleared when this batch leaves its in-order first attempt (the batcher then submits
    /// nothing behind it until it has finished).
    pub in_order: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Reply of `RpcKind::Forward`.
pub type ForwardReply = Result<Forwarded, Refusal>;
/// Reply of `RpcKind::ReadIndex`: the index a reader must have applied.
pub type ReadIndexReply = Result<u64, Refusal>;

/// One try: retry (later, maybe elsewhere) with this reason, or give up with this error.
enum Attempt {
    Retry(String),
    Fail(ProposeError),
}

/// Doubling backoff between retries, bounded by a deadline.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: Duration::from_millis(RETRY_BACKOFF_MIN_MS) }
    }

    /// Sleep for the next pause (never past `deadline`); false once the deadline has passed.
    async fn wait(&mut self, deadline: Instant) -> bool {
        let until = (Instant::now() + self.next).min(deadline);
        tokio::time::sleep_until(until).await;
        self.next = (self.next * 2).min(Duration::from_millis(RETRY_BACKOFF_MAX_MS));
        Instant::now() < deadline
    }
}

/// How a call to the leader ended.
enum LeaderCall {
    Replied(Vec<u8>),
    /// Try again (maybe elsewhere): the call failed, or this node stopped believing in that
    /// leader while waiting (a dead leader's connection may only fail at the idle timeout).
    Retry(String),
    /// The caller's deadline passed.
    TimedOut,
}

impl Replica {
    /// Call `leader`, giving up early when this node's view of the leader changes (an election
    /// after the leader died), so the retry goes to the new leader instead of waiting for a dead
    /// connection until the deadline.
    async fn call_leader(&self, leader: NodeId, addr: &str, kind: RpcKind, body: Vec<u8>, deadline: Instant) -> LeaderCall {
        let call = self.transport.call(leader, addr, kind, body);
        tokio::pin!(call);
        // The server metrics carry the leader and change rarely (the full metrics change several
        // times per write, and each change would poll this select).
        let mut metrics = self.raft.server_metrics();
        loop {
            tokio::select! {
                r = &mut call => {
                    return match r {
                        Ok(bytes) => LeaderCall::Replied(bytes),
                        Err(e) => LeaderCall::Retry(format!("leader {leader}: {e}")),
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return LeaderCall::TimedOut,
                changed = metrics.changed() => {
                    if changed.is_err() {
                        return LeaderCall::Retry("raft stopped".into());
                    }
                    let now = metrics.borrow().current_leader;
                    if now != Some(leader) {
                        return LeaderCall::Retry(format!("leader changed from {leader} to {now:?} during the call"));
                    }
                }
            }
        }
    }

    /// The leader this node knows of and its address from the membership.
    fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.server_metrics();
        let m = metrics.borrow();
        let leader = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&leader).map(|n| n.addr.clone()).unwrap_or_default();
        Some((leader, addr))
    }

    /// Whether this node is the only voter (reads need no leader round: every write is committed
    /// and applied here before it is acknowledged).
    pub(super) fn sole_voter(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        let mut voters = m.membership_config.membership().voter_ids();
        voters.next() == Some(self.node_id) && voters.next().is_none()
    }

    /// Commit `batch` through the current leader (this node or a remote one), retrying across
    /// elections until `deadline`; returns once the entry is applied on this node. `order` keeps
    /// batches in numbering order in the log: every attempt but the batcher's own first one waits
    /// until the previous batch has finished.
    pub(super) async fn commit(&self, batch: Batch, order: Order, deadline: Instant) -> Result<Vec<CommandResult>, ProposeError> {
        let Order { mut first, mut after, in_order } = order;
        let n = batch.0.len();
        let mut backoff = Backoff::new();
        let mut body = None;
        let why = loop {
            if let Some(rx) = first.take() {
                match self.local_result(rx, deadline).await {
                    Ok(results) if results.len() == n => return Ok(results),
                    Ok(_) => {
                        tracing::error!(want = n, "apply returned the wrong number of results");
                        return Err(ProposeError::Fatal("apply returned the wrong number of results".into()));
                    }
                    Err(Attempt::Fail(ProposeError::Unavailable(reason))) => break reason,
                    Err(Attempt::Fail(e)) => return Err(e),
                    Err(Attempt::Retry(reason)) => {
                        tracing::debug!(node = self.node_id, %reason, "batch not committed yet; retrying");
                        in_order.store(false, Ordering::SeqCst);
                        if !backoff.wait(deadline).await {
                            break reason;
                        }
                        continue;
                    }
                }
            }
            if let Some(prev) = after.take() {
                // Either outcome of the receiver means the previous batch is finished.
                if tokio::time::timeout_at(deadline, prev).await.is_err() {
                    break "an earlier batch of this node is still not committed".to_string();
                }
            }
            let attempt = match self.leader() {
                None => Err(Attempt::Retry("no leader known (election in progress, or no quorum)".into())),
                Some((leader, _)) if leader == self.node_id => self.write_local(&batch, deadline).await,
                Some((leader, addr)) => {
                    if body.is_none() {
                        body = Some(encode(&batch).map_err(|e| ProposeError::Fatal(e.0))?);
                    }
                    let body = body.clone().unwrap_or_default();
                    self.write_remote(body, leader, &addr, deadline).await
                }
            };
            match attempt {
                Ok(results) if results.len() == n => return Ok(results),
                Ok(results) => {
                    tracing::error!(want = n, got = results.len(), "apply returned the wrong number of results");
                    return Err(ProposeError::Fatal("apply returned the wrong number of results".into()));
                }
                Err(Attempt::Fail(ProposeError::Unavailable(reason))) => break reason,
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry(reason)) => {
                    tracing::debug!(node = self.node_id, %reason, "batch not committed yet; retrying");
                    if !backoff.wait(deadline).await {
                        break reason;
                    }
                }
            }
        };
        tracing::warn!(
            node = self.node_id,
            commands = n,
            timeout_ms = self.cfg.propose_timeout.as_millis() as u64,
            reason = %why,
            "proposal not committed in time; failing it with EIO"
        );
        Err(ProposeError::Unavailable(format!("not committed in time: {why}")))
    }

    /// This node leads: append the batch and wait until it is applied (here).
    async fn write_local(&self, batch: &Batch, deadline: Instant) -> Result<Vec<CommandResult>, Attempt> {
        match self.raft.client_write_ff(batch.clone()).await {
            Ok(rx) => self.local_result(rx, deadline).await,
            Err(f) => {
                tracing::error!(error = %f, "raft stopped");
                Err(Attempt::Fail(ProposeError::Fatal(f.to_string())))
            }
        }
    }

    /// Wait for the outcome of a batch submitted to this node's Raft (`client_write_ff`).
    async fn local_result(&self, rx: LocalWrite, deadline: Instant) -> Result<Vec<CommandResult>, Attempt> {
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(Attempt::Fail(ProposeError::Unavailable(
                "this node leads but could not commit (no quorum: too few voters reachable)".into(),
            ))),
            Ok(Err(_)) => {
                tracing::error!("raft stopped before answering a write");
                Err(Attempt::Fail(ProposeError::Fatal("raft stopped".into())))
            }
            Ok(Ok(Ok(resp))) => Ok(resp.data.0),
            Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => {
                Err(Attempt::Retry(format!("this node stopped leading (new leader: {:?})", f.leader_id)))
            }
            Ok(Ok(Err(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Attempt::Retry(format!("membership change in progress: {e}")))
            }
        }
    }

    /// Another node leads: forward the encoded batch, then wait until this node has applied the
    /// entry (so the caller reads its own write here).
    async fn write_remote(
        &self,
        body: Vec<u8>,
        leader: NodeId,
        addr: &str,
        deadline: Instant,
    ) -> Result<Vec<CommandResult>, Attempt> {
        let reply = match self.call_leader(leader, addr, RpcKind::Forward, body, deadline).await {
            LeaderCall::Replied(bytes) => bytes,
            LeaderCall::Retry(why) => return Err(Attempt::Retry(why)),
            LeaderCall::TimedOut => {
                return Err(Attempt::Fail(ProposeError::Unavailable(format!(
                    "leader {leader} did not answer in time (no quorum, or unreachable)"
                ))))
            }
        };
        let reply: ForwardReply = decode(&reply)
            .map_err(|e| Attempt::Retry(format!("leader {leader} sent an undecodable reply: {}", e.0)))?;
        let done = reply.map_err(|r| Attempt::Retry(format!("node {leader}: {r}")))?;
        self.wait_applied(done.index, deadline).await.map_err(Attempt::Fail)?;
        Ok(done.results)
    }

    /// Wait until this node has applied `index`, at most until `deadline`.
    pub(super) async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ProposeError> {
        if self.applied_index().unwrap_or(0) >= index {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(Instant::now());
        self.raft.wait(Some(left)).applied_index_at_least(Some(index), "entry applied locally").await.map_err(|e| {
            ProposeError::Unavailable(format!("entry {index} committed but not applied on this node in time: {e}"))
        })?;
        Ok(())
    }

    /// Serve `Forward`: commit a follower's batch if this node leads.
    pub(super) async fn serve_forward(&self, batch: Batch) -> ForwardReply {
        let timeout = self.cfg.propose_timeout;
        match tokio::time::timeout(timeout, self.raft.client_write(batch)).await {
            Err(_) => Err(Refusal::Unavailable(format!("leader {} could not commit within {timeout:?} (no quorum)", self.node_id))),
            Ok(Ok(resp)) => Ok(Forwarded { index: resp.log_id.index, results: resp.data.0 }),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => Err(Refusal::NotLeader { leader: f.leader_id }),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Refusal::Unavailable(format!("membership change in progress: {e}")))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(Refusal::Fatal(f.to_string())),
        }
    }

    /// Serve `ReadIndex`: confirm leadership with a quorum and return the index a reader must
    /// have applied to see every write committed before this call.
    pub(super) async fn serve_read_index(&self) -> ReadIndexReply {
        self.local_read_index(Instant::now() + self.cfg.propose_timeout).await
    }

    /// This node's own read index if it leads: from its lease when a quorum acknowledged it
    /// recently (no round), otherwise confirmed with a heartbeat round.
    async fn local_read_index(&self, deadline: Instant) -> ReadIndexReply {
        if let Some(index) = self.leased_read_index() {
            return Ok(index);
        }
        match tokio::time::timeout_at(deadline, self.raft.get_read_log_id()).await {
            Err(_) => Err(Refusal::Unavailable(format!("leader {} could not confirm leadership in time (no quorum)", self.node_id))),
            Ok(Ok((read, applied))) => Ok(read.max(applied).map(|l| l.index).unwrap_or(0)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => Err(Refusal::NotLeader { leader: f.leader_id }),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                Err(Refusal::Unavailable(format!("leader {} has no quorum: {q}", self.node_id)))
            }
            Ok(Err(RaftError::Fatal(f))) => Err(Refusal::Fatal(f.to_string())),
        }
    }

    /// The read index from whoever leads, retrying across elections until `deadline`.
    async fn fetch_read_index(&self, deadline: Instant) -> Result<u64, String> {
        let mut backoff = Backoff::new();
        loop {
            let why = match self.leader() {
                None => "no leader known (election in progress, or no quorum)".to_string(),
                Some((leader, _)) if leader == self.node_id => match self.local_read_index(deadline).await {
                    Ok(i) => return Ok(i),
                    Err(r) => r.to_string(),
                },
                Some((leader, addr)) => {
                    let body = encode(&()).map_err(|e| e.0)?;
                    match self.call_leader(leader, &addr, RpcKind::ReadIndex, body, deadline).await {
                        LeaderCall::TimedOut => format!("leader {leader} did not answer in time"),
                        LeaderCall::Retry(why) => why,
                        LeaderCall::Replied(bytes) => match decode::<ReadIndexReply>(&bytes) {
                            Ok(Ok(i)) => return Ok(i),
                            Ok(Err(r)) => format!("node {leader}: {r}"),
                            Err(e) => format!("leader {leader} sent an undecodable reply: {}", e.0),
                        },
                    }
                }
            };
            if !backoff.wait(deadline).await {
                return Err(why);
            }
        }
    }

    /// The read index, shared between concurrent callers: one round at a time; a round serves
    /// every caller that arrived before it started, so a burst of barriers costs one or two
    /// rounds instead of one each.
    pub(super) async fn coalesced_read_index(&self, deadline: Instant) -> Result<u64, ProposeError> {
        let me = self.reads.arrived.fetch_add(1, Ordering::SeqCst) + 1;
        let unavailable = |why: String| ProposeError::Unavailable(format!("read barrier: {why}"));
        let _turn = tokio::time::timeout_at(deadline, self.reads.turn.lock())
            .await
            .map_err(|_| unavailable("timed out waiting for the leader round".into()))?;
        if let Some((covers, res)) = self.reads.last.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            if covers >= me {
                return res.map_err(unavailable);
            }
        }
        // Everyone who arrived until now is covered by the round we start now.
        let covers = self.reads.arrived.load(Ordering::SeqCst);
        let res = self.fetch_read_index(deadline).await;
        *self.reads.last.lock().unwrap_or_else(|e| e.into_inner()) = Some((covers, res.clone()));
        res.map_err(unavailable)
    }
}

impl Replica {
    /// The read index without a round, if this node leads and a quorum acknowledged it less than
    /// `LEADER_LEASE_MS` ago: the highest index a majority of voters has (the leader counts its
    /// own last log index), which is at least the commit index.
    pub(super) fn leased_read_index(&self) -> Option<u64> {
        let acked = (*self.reads.quorum_acked.lock().unwrap_or_else(|e| e.into_inner()))?;
        if acked.elapsed() >= Duration::from_millis(LEADER_LEASE_MS) {
            return None;
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        if m.state != openraft::ServerState::Leader || m.current_leader != Some(self.node_id) {
            return None;
        }
        let replication = m.replication.as_ref()?;
        let mut matched: Vec<u64> = m
            .membership_config
            .membership()
            .voter_ids()
            .map(|v| {
                if v == self.node_id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    replication.get(&v).cloned().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        if matched.is_empty() {
            return None;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let majority = matched[matched.len() / 2];
        // The metrics come from the end of the Raft core's last pass: an entry committed in that
        // pass may already be applied and answered (here, or on a follower that learned the
        // commit) while they still show the older progress. The core raises
        // `committed_index_now` before the commit leaves it, so the index covers every write
        // anyone has seen acknowledged.
        Some(majority.max(m.last_applied.map(|l| l.index).unwrap_or(0)).max(self.raft.committed_index_now()))
    }
}

/// A leader answers the read index from its own knowledge, without a heartbeat round, while a
/// quorum acknowledged it less than this long ago: half the minimum election timeout, so no other
/// node can have been elected meanwhile even with some clock drift (a lease read).
pub const LEADER_LEASE_MS: u64 = super::ELECTION_TIMEOUT_MIN_MS / 2;

/// Keeps `ReadRounds::quorum_acked` current: openraft reports "milliseconds since a quorum
/// acknowledged the leader" in its metrics, computed when the metrics were sent; this turns it
/// into an instant as soon as each report arrives. Only while this node leads a cluster with other
/// voters (the only case that reads the lease): otherwise it waits on the server metrics (vote,
/// leader, membership), which change rarely, rather than being woken by every metrics report
/// (several per write).
pub(super) async fn track_lease(
    replica: std::sync::Weak<Replica>,
    mut server: tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, openraft::BasicNode>>,
    mut data: tokio::sync::watch::Receiver<openraft::metrics::RaftDataMetrics<NodeId>>,
) {
    loop {
        let leads_others = {
            let s = server.borrow_and_update();
            let mut voters = s.membership_config.membership().voter_ids();
            let sole = voters.next() == Some(s.id) && voters.next().is_none();
            s.state == openraft::ServerState::Leader && s.current_leader == Some(s.id) && !sole
        };
        // A leader of others sends its entries to them from the thread that submits its own log
        // write: that write goes to the log writer thread. Elsewhere (a follower, whose answer
        // waits for its write anyway; a sole voter) small appends are written inline.
        match replica.upgrade() {
            Some(r) => r.store.set_inline_appends(!leads_others),
            None => return,
        }
        if !leads_others {
            match replica.upgrade() {
                Some(r) => {
                    *r.reads.quorum_acked.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    r.log_cache.lock().unwrap_or_else(|e| e.into_inner()).set_followers([]);
                }
                None => return,
            }
            if server.changed().await.is_err() {
                return;
            }
            continue;
        }
        tokio::select! {
            changed = server.changed() => if changed.is_err() { return },
            changed = data.changed() => {
                if changed.is_err() {
                    return;
                }
                let Some(r) = replica.upgrade() else { return };
                let d = data.borrow_and_update();
                let at = d.millis_since_quorum_ack.and_then(|ms| std::time::Instant::now().checked_sub(Duration::from_millis(ms)));
                *r.reads.quorum_acked.lock().unwrap_or_else(|e| e.into_inner()) = at;
                r.log_cache.lock().unwrap_or_else(|e| e.into_inner()).set_followers(super::followers_matched(&d.replication, r.node_id));
            }
        }
    }
}

/// State of read-index coalescing.
#[derive(Default)]
pub(super) struct ReadRounds {
    /// When a quorum last acknowledged this node as leader (see `track_lease`).
    quorum_acked: Mutex<Option<std::time::Instant>>,
    /// Callers that have asked so far (a caller's ticket is the count after its arrival).
    arrived: AtomicU64,
    /// One round at a time (FIFO).
    turn: tokio::sync::Mutex<()>,
    /// The last finished round: the highest ticket it covers, and its result.
    last: Mutex<Option<(u64, Result<u64, String>)>>,
}

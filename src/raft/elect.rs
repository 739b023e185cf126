//! Elections with a pre-vote (Raft thesis 9.6). openraft 0.9 lets a follower whose election
//! timer ran out raise its term at once; a node that comes back after a pause (a stopped process,
//! a slow disk, a healed partition) then makes the healthy leader step down on its first answer,
//! and every write waits for a new election: writes on the leader's mount stalled 0.6-0.9 s after
//! a follower had been stopped for 2 s (5-26 ms with the pre-vote). Here openraft's own
//! election timer is off (`enable_elect: false`) and `drive_elections` takes its place: when this
//! node has heard of no leader for an election timeout, it first asks the other voters whether
//! they would vote for it (`PreVoteRequest`, no term changes anywhere), and only with a quorum of
//! yes does it start a real election (`Trigger::elect`). A voter says yes only if it has itself
//! heard of no leader for the leader lease (a follower: the check openraft makes before it grants
//! a real vote; a leader: no quorum acknowledged it within the lease) and the candidate's log is
//! at least as up to date as its own.

use std::collections::BTreeSet;
use std::sync::Weak;
use std::time::Duration;

use openraft::{LogId, ServerState};
use serde::{Deserialize, Serialize};

use super::network::RpcKind;
use super::{NodeId, Replica, ELECTION_TIMEOUT_MAX_MS, ELECTION_TIMEOUT_MIN_MS};
use crate::store::codec::{decode, encode};

/// How often the driver looks at the election timer.
pub const ELECTION_TICK_MS: u64 = 20;
/// How long a pre-vote call may take (an unanswered peer counts as a no).
pub const PRE_VOTE_TIMEOUT_MS: u64 = ELECTION_TIMEOUT_MIN_MS / 2;

/// "Would you vote for `candidate`, whose last log entry is `last_log`, if it stood now?"
/// Answered with a `bool`; changes nothing on the voter.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log: Option<LogId<NodeId>>,
}

/// A voter's answer to a pre-vote: it has heard of no leader for the lease (`leader_silent`) and
/// the candidate's log is at least as up to date as its own (`LogId` orders by term, then index).
pub fn grants_pre_vote(leader_silent: bool, own_last_log: Option<&LogId<NodeId>>, candidate_last_log: Option<&LogId<NodeId>>) -> bool {
    leader_silent && candidate_last_log >= own_last_log
}

/// A follower has heard of no leader for `lease`: its vote was last confirmed (a leader's
/// message, or a vote it granted) at `heard`, if ever.
pub fn follower_hears_no_leader<I: Ord + Copy + std::ops::Add<Duration, Output = I>>(now: I, heard: Option<I>, lease: Duration) -> bool {
    heard.is_none_or(|h| now > h + lease)
}

/// A leader counts as silent once a quorum has not acknowledged it for `lease`
/// (`millis_since_quorum_ack` of openraft's metrics; its vote's own time is only its election's).
pub fn leader_is_silent(millis_since_quorum_ack: Option<u64>, lease: Duration) -> bool {
    millis_since_quorum_ack.is_none_or(|ms| u128::from(ms) > lease.as_millis())
}

/// Whether the nodes in `granted` are a majority of every configuration of `joint` (a joint
/// membership needs both).
pub fn is_quorum(joint: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    joint.iter().all(|voters| voters.intersection(granted).count() * 2 > voters.len())
}

/// An election timeout drawn from openraft's range, as its own timer does.
fn election_timeout() -> Duration {
    Duration::from_millis(rand::random_range(ELECTION_TIMEOUT_MIN_MS..ELECTION_TIMEOUT_MAX_MS))
}

/// What the driver needs of openraft's state, read in one pass of its core.
struct View {
    state: ServerState,
    voter: bool,
    /// When the current vote was last confirmed (by a leader's message, or granted).
    heard: Option<tokio::time::Instant>,
    vote_committed: bool,
    last_log: Option<LogId<NodeId>>,
    joint: Vec<BTreeSet<NodeId>>,
    /// The other voters and their addresses.
    peers: Vec<(NodeId, String)>,
}

async fn view(replica: &Replica) -> Option<View> {
    let me = replica.node_id;
    replica
        .raft
        .with_raft_state(move |st| {
            let membership = st.membership_state.effective().membership();
            let joint: Vec<BTreeSet<NodeId>> = membership.get_joint_config().clone();
            let voters: BTreeSet<NodeId> = joint.iter().flatten().copied().collect();
            let peers = voters
                .iter()
                .filter(|id| **id != me)
                .filter_map(|id| membership.get_node(id).map(|n| (*id, n.addr.clone())))
                .collect();
            View {
                state: st.server_state,
                voter: voters.contains(&me),
                heard: st.vote_last_modified(),
                vote_committed: st.vote_ref().is_committed(),
                last_log: st.log_ids.last().copied(),
                joint,
                peers,
            }
        })
        .await
        .ok()
}

/// openraft's leader lease (its `timer_config.leader_lease`: the longest election timeout): a
/// voter that heard of a leader within it refuses a real vote, and so a pre-vote.
pub const LEADER_LEASE: Duration = Duration::from_millis(ELECTION_TIMEOUT_MAX_MS);

/// Serve a pre-vote: see `grants_pre_vote`.
pub(super) async fn serve_pre_vote(replica: &Replica, req: PreVoteRequest) -> bool {
    let Some(v) = view(replica).await else { return false };
    let silent = match v.state {
        ServerState::Leader => leader_is_silent(replica.raft.metrics().borrow().millis_since_quorum_ack, LEADER_LEASE),
        _ => follower_hears_no_leader(tokio::time::Instant::now(), v.heard, LEADER_LEASE),
    };
    let granted = grants_pre_vote(silent, v.last_log.as_ref(), req.last_log.as_ref());
    tracing::debug!(candidate = req.candidate, granted, "pre-vote");
    granted
}

/// Stand for election, after a pre-vote, whenever openraft's own timer would have (it is off:
/// `raft_config`). Runs until the replica is gone.
pub async fn drive_elections(replica: Weak<Replica>) {
    let mut timeout = election_timeout();
    // The last pre-vote this node held (or its start): the next waits a new timeout from it.
    let mut last_try = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(ELECTION_TICK_MS)).await;
        let Some(replica) = replica.upgrade() else { return };
        let Some(v) = view(&replica).await else { continue };
        if v.state == ServerState::Leader || !v.voter {
            continue;
        }
        // The only voter stands at once, as with openraft's own timer (a single node's restart).
        if v.peers.is_empty() && v.joint.iter().all(|c| c.len() == 1) {
            if v.state != ServerState::Candidate {
                if let Err(e) = replica.raft.trigger().elect().await {
                    tracing::warn!(error = %e, "cannot start an election");
                }
            }
            continue;
        }
        let now = tokio::time::Instant::now();
        // openraft's rule: after a vote a leader confirmed (committed), its lease first.
        let wait = if v.vote_committed { LEADER_LEASE + timeout } else { timeout };
        let since = v.heard.map_or(last_try, |heard| heard.max(last_try));
        if now < since + wait {
            continue;
        }
        last_try = now;
        timeout = election_timeout();
        let mut granted: BTreeSet<NodeId> = [replica.node_id].into();
        if !v.peers.is_empty() {
            let body = match encode(&PreVoteRequest { candidate: replica.node_id, last_log: v.last_log }) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a pre-vote");
                    continue;
                }
            };
            let calls = v.peers.iter().map(|(id, addr)| {
                let (transport, body) = (replica.transport.clone(), body.clone());
                async move {
                    let call = transport.call(*id, addr, RpcKind::PreVote, body);
                    match tokio::time::timeout(Duration::from_millis(PRE_VOTE_TIMEOUT_MS), call).await {
                        Ok(Ok(reply)) => decode::<Result<bool, String>>(&reply).ok().and_then(|r| r.ok()).unwrap_or(false).then_some(*id),
                        _ => None,
                    }
                }
            });
            granted.extend(futures::future::join_all(calls).await.into_iter().flatten());
        }
        if !is_quorum(&v.joint, &granted) {
            tracing::debug!(?granted, "pre-vote lost: no election");
            continue;
        }
        tracing::info!(?granted, "pre-vote won: standing for election");
        if let Err(e) = replica.raft.trigger().elect().await {
            tracing::warn!(error = %e, "cannot start an election");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;
    use std::time::Instant;

    fn log(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn a_voter_that_hears_a_leader_or_has_a_longer_log_says_no() {
        let own = log(3, 10);
        // Heard of a leader within the lease: no, whatever the log.
        assert!(!grants_pre_vote(false, Some(&own), Some(&log(4, 1))));
        // Silent longer than the lease: yes for a log as long or longer, by term then index.
        assert!(grants_pre_vote(true, Some(&own), Some(&log(3, 10))));
        assert!(grants_pre_vote(true, Some(&own), Some(&log(3, 11))));
        assert!(grants_pre_vote(true, Some(&own), Some(&log(4, 2))));
        assert!(!grants_pre_vote(true, Some(&own), Some(&log(3, 9))));
        assert!(!grants_pre_vote(true, Some(&own), Some(&log(2, 50))));
        assert!(!grants_pre_vote(true, Some(&own), None));
        // An empty log against an empty log (a fresh cluster): yes.
        assert!(grants_pre_vote(true, None, None));
    }

    #[test]
    fn silence_is_the_lease_without_a_leader_or_a_quorum() {
        let lease = Duration::from_millis(800);
        let now = Instant::now() + Duration::from_secs(5);
        assert!(!follower_hears_no_leader(now, Some(now - Duration::from_millis(100)), lease));
        assert!(!follower_hears_no_leader(now, Some(now - lease), lease), "the lease's last instant");
        assert!(follower_hears_no_leader(now, Some(now - Duration::from_millis(900)), lease));
        assert!(follower_hears_no_leader(now, None, lease), "never heard of a leader");
        // A leader elected long ago but acknowledged by a quorum just now is not silent (its
        // vote's own time is its election's: openraft does not refresh it).
        assert!(!leader_is_silent(Some(30), lease));
        assert!(!leader_is_silent(Some(800), lease));
        assert!(leader_is_silent(Some(801), lease));
        assert!(leader_is_silent(None, lease), "never acknowledged");
    }

    #[test]
    fn a_quorum_is_a_majority_of_every_configuration() {
        let c = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        assert!(is_quorum(&[c(&[1])], &c(&[1])));
        assert!(is_quorum(&[c(&[1, 2, 3])], &c(&[1, 3])));
        assert!(!is_quorum(&[c(&[1, 2, 3])], &c(&[1])));
        assert!(!is_quorum(&[c(&[1, 2, 3, 4])], &c(&[1, 2])));
        assert!(is_quorum(&[c(&[1, 2, 3]), c(&[2, 3, 4])], &c(&[2, 3])));
        assert!(!is_quorum(&[c(&[1, 2, 3]), c(&[3, 4, 5])], &c(&[1, 2, 3])));
        assert!(!is_quorum(&[c(&[1, 2, 3])], &c(&[4, 5])), "non-voters do not count");
    }
}

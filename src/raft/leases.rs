//! Lock leases: the advisory locks of a node the leader has not heard from for the lease
//! (`ReplicaConfig::lock_lease`, `--lock-lease-ms`) expire, so that a node that died (or is cut
//! off) while its processes held locks does not keep every other node waiting until it starts
//! again or is removed. Like an NFSv4 lease: a node cut off but alive loses its locks as well,
//! and its processes are not told (the node logs it when it hears of the expiry).

use std::collections::BTreeMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::{Caller, Op, Replica};
use crate::state::{NodeId, StateRead};

/// How often the leader looks for expired leases: a quarter of the lease, within these bounds.
const CHECK_INTERVAL_MIN_MS: u64 = 100;
const CHECK_INTERVAL_MAX_MS: u64 = 5_000;

/// Runs on every node with peers; acts while this node leads. A member (voter or learner) other
/// than this node that has not answered one of its Raft calls for `lease` (counted from when this
/// node became leader at the earliest: it knows nothing of the time before) has its locks
/// expired by an `ExpireLocks` command, up to the highest incarnation it holds them under.
pub(super) async fn expire_locks(
    replica: Weak<Replica>,
    mut server: tokio::sync::watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, openraft::BasicNode>>,
    lease: Duration,
) {
    let every = (lease / 4).clamp(Duration::from_millis(CHECK_INTERVAL_MIN_MS), Duration::from_millis(CHECK_INTERVAL_MAX_MS));
    let mut leading_since: Option<Instant> = None;
    loop {
        let members = {
            let s = server.borrow_and_update();
            let leads = s.state == openraft::ServerState::Leader && s.current_leader == Some(s.id);
            leads.then(|| s.membership_config.membership().nodes().map(|(id, _)| *id).filter(|id| *id != s.id).collect::<Vec<_>>())
        };
        let Some(members) = members else {
            leading_since = None;
            if server.changed().await.is_err() {
                return;
            }
            continue;
        };
        let since = *leading_since.get_or_insert_with(Instant::now);
        tokio::select! {
            changed = server.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep(every) => {}
        }
        let Some(r) = replica.upgrade() else { return };
        if let Err(e) = expire_silent(&r, &members, since, lease).await {
            tracing::warn!(error = %e, "expiring the locks of silent nodes failed (tried again)");
        }
    }
}

/// One pass: expire the locks of the members in `members` silent for `lease`.
async fn expire_silent(r: &Replica, members: &[NodeId], since: Instant, lease: Duration) -> anyhow::Result<()> {
    let silent: Vec<NodeId> = members.iter().copied().filter(|n| silent_for(r, *n, since) >= lease).collect();
    if silent.is_empty() {
        return Ok(());
    }
    // The highest incarnation each silent member holds locks under, and how many locks.
    let mut held: BTreeMap<NodeId, (u64, usize)> = BTreeMap::new();
    {
        let view = r.store.read()?;
        for ino in view.locked_inodes()? {
            for l in view.locks(ino)?.iter() {
                if silent.contains(&l.owner.node) {
                    let e = held.entry(l.owner.node).or_insert((l.owner.incarnation, 0));
                    e.0 = e.0.max(l.owner.incarnation);
                    e.1 += 1;
                }
            }
        }
    }
    for (node, (incarnation, locks)) in held {
        // Heard from since the scan began? Then it keeps them.
        if silent_for(r, node, since) < lease {
            continue;
        }
        tracing::warn!(
            node,
            incarnation,
            locks,
            lease_ms = lease.as_millis() as u64,
            "node not heard from for the lock lease: its locks expire"
        );
        r.propose(Caller::root(), Op::ExpireLocks { node, incarnation }).await?;
    }
    Ok(())
}

/// How long this node, leading since `since`, has not heard from `node`.
fn silent_for(r: &Replica, node: NodeId, since: Instant) -> Duration {
    r.contacts.last(node).map_or(since, |t| t.max(since)).elapsed()
}

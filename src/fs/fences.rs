//! Lost locks on this node: what happens here when the leader expired this node's advisory
//! locks (a lease that ran out while it was cut off or stalled, see `raft::leases`).
//!
//! The state fences the node at once (`state::LockFences`): every change it proposes is refused
//! with EIO at apply until it acknowledges the expiry, since such a change may come from a
//! process that still believes it holds a lock another node's process has been given since.
//! When this node applies the expiry (`Replica::own_lock_fence`), `follow_lock_expiries`:
//! 1. fences the files here: every handle open on an inode this node held locks on is lost
//!    (`Handles::fence`), and while any of them is open, a write, truncate, attribute change,
//!    xattr change or lock request of that inode fails here with EIO, whichever descriptor it
//!    comes through (under the writeback cache the kernel sends dirty pages through any of the
//!    file's handles); a close after a refused write reports EIO too (the kernel's writeback
//!    error). At the last close the kernel forgets the inode, so no page the cluster refused
//!    stays cached;
//! 2. waits until every change of a file that passed this check before step 1 has finished
//!    (`Gate::drained`): its proposal was made before the node knew, and the state's fence
//!    refuses it, but only while the fence lasts;
//! 3. acknowledges the expiry (`Op::AckLockExpiry`), which lifts the state's fence: changes from
//!    this node are accepted again, and those of fenced files never get that far.
//!
//! As NFS does with lost locks, the holders are told by errors on what they do next through
//! the file, not by a signal.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use crate::state::{Caller, Errno, LockFence, Op};

use super::ops::Ops;

/// Wait before proposing an acknowledgement again after a failed one (no quorum, say).
const ACK_RETRY_MS: u64 = 500;

/// Counts the changes of files in flight, by the generation they passed the fence check in, so
/// that fencing can wait for the ones that passed before it.
#[derive(Default)]
pub struct Gate {
    t: Mutex<GateTable>,
    drained: tokio::sync::Notify,
}

#[derive(Default)]
struct GateTable {
    generation: u64,
    passes: BTreeMap<u64, usize>,
}

/// A change in flight that passed the fence check; dropping it ends it.
pub struct Pass<'a> {
    gate: &'a Gate,
    generation: u64,
}

impl Gate {
    /// Check a change of a file against the fence before it is proposed: EIO if `op` changes a
    /// fenced inode here (`Handles::is_fenced`, asked after the pass is counted, so a fence
    /// either refuses the change or waits for it). Ops that change no file's content, attributes
    /// or locks pass uncounted.
    pub fn pass<'a>(&'a self, op: &Op, fenced: impl FnOnce(u64) -> bool) -> Result<Option<Pass<'a>>, Errno> {
        let Some(ino) = op.fenced_inode() else { return Ok(None) };
        let pass = {
            let mut t = self.lock();
            let generation = t.generation;
            *t.passes.entry(generation).or_default() += 1;
            Pass { gate: self, generation }
        };
        if fenced(ino) {
            return Err(Errno::Io);
        }
        Ok(Some(pass))
    }

    /// Start a new generation (after fencing); returns the last one before it.
    pub fn advance(&self) -> u64 {
        let mut t = self.lock();
        t.generation += 1;
        t.generation - 1
    }

    /// Resolves once no pass of generation `upto` or earlier is in flight.
    pub async fn drained(&self, upto: u64) {
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().passes.range(..=upto).all(|(_, n)| *n == 0) {
                return;
            }
            notified.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateTable> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut t = self.gate.lock();
        let current = t.generation;
        if let Some(n) = t.passes.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                // The current generation's count stays (no allocation per change); only an
                // earlier one can be waited for.
                if self.generation < current {
                    t.passes.remove(&self.generation);
                }
                drop(t);
                self.gate.drained.notify_waiters();
            }
        }
    }
}

/// Follows this node's lock fence in the state (`rx`, from `Replica::own_lock_fence`): fences
/// the files here and acknowledges each expiry (see the module's doc). Holds the filesystem
/// weakly; ends when it or the replica is gone.
pub async fn follow_lock_expiries(ops: Weak<Ops>, mut rx: tokio::sync::watch::Receiver<LockFence>) {
    let mut acked = 0;
    loop {
        let fence: LockFence = rx.borrow_and_update().clone();
        if fence.active && fence.epoch != acked {
            let Some(ops) = ops.upgrade() else { return };
            let inodes = (!fence.all).then_some(fence.inodes.as_slice());
            let (files, handles) = ops.handles.fence(inodes);
            let upto = ops.gate.advance();
            tracing::warn!(
                epoch = fence.epoch,
                locked_inodes = fence.inodes.len(),
                open_files = files,
                handles,
                "this node's locks expired (the leader had not heard from it for the lock lease): their holders \
                 lost them; writes, attribute changes and lock requests of those files fail here with EIO until every \
                 descriptor open on them now is closed"
            );
            ops.gate.drained(upto).await;
            loop {
                match ops.replica.propose(Caller::root(), Op::AckLockExpiry { epoch: fence.epoch }).await {
                    Ok(_) => {
                        tracing::info!(epoch = fence.epoch, "lock expiry acknowledged: changes from this node are accepted again");
                        acked = fence.epoch;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(epoch = fence.epoch, error = %e, "acknowledging the lock expiry failed (tried again)");
                        tokio::time::sleep(Duration::from_millis(ACK_RETRY_MS)).await;
                        if rx.has_changed().unwrap_or(true) {
                            break;
                        }
                    }
                }
            }
            continue;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(ino: u64) -> Op {
        Op::Write { ino, offset: 0, data: vec![1], append: false }
    }

    #[tokio::test]
    async fn a_fence_waits_for_the_changes_that_passed_before_it() {
        let gate = Gate::default();
        let mkdir = Op::Rmdir { parent: 1, name: b"d".to_vec() };
        assert!(gate.pass(&mkdir, |_| true).unwrap().is_none(), "no file changed: not checked, not counted");
        assert_eq!(gate.pass(&write(5), |ino| ino == 5).err(), Some(Errno::Io));
        let before = gate.pass(&write(6), |_| false).unwrap().unwrap();
        let upto = gate.advance();
        let after = gate.pass(&write(7), |_| false).unwrap().unwrap();
        let drained = gate.drained(upto);
        tokio::pin!(drained);
        assert!(futures::poll!(drained.as_mut()).is_pending(), "a change that passed before the fence is in flight");
        drop(after);
        assert!(futures::poll!(drained.as_mut()).is_pending(), "a later change is not waited for, but this one is");
        drop(before);
        tokio::time::timeout(Duration::from_secs(30), drained).await.expect("drained once it finished");
        let refused = gate.pass(&write(8), |_| true);
        assert!(refused.is_err());
        gate.drained(gate.advance()).await;
    }
}

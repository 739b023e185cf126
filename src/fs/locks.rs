//! Node-local bookkeeping of cluster-wide advisory locks (flock and fcntl record locks).
//!
//! The locks themselves are replicated state (`state::locks`, changed by `Op::Lock` and
//! `Op::ReleaseLocks`): a lock taken through one node's mount conflicts with locks taken through
//! any other. What stays here is what only this node knows: which SETLKW requests are waiting (so
//! the kernel's FUSE_INTERRUPT can end their wait: a signal, or the waiter being killed), and
//! which lock owners took locks through which open handle (so the handle's last close drops its
//! flock and OFD locks: the kernel sends no unlock for them, only RELEASE).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::state::Ino;

/// Interrupts remembered for requests that are not (yet) waiting: an INTERRUPT can be read by one
/// fuser thread before another has started the SETLKW it names. Interrupts of requests that never
/// wait (any other request may be interrupted too) are forgotten oldest first.
const EARLY_INTERRUPTS_MAX: usize = 256;

/// See the module comment.
#[derive(Default)]
pub struct LockWaits {
    waiting: Mutex<Waiting>,
    /// Open handle -> (its inode, the lock owners that took a lock through it).
    by_handle: Mutex<HashMap<u64, (Ino, BTreeSet<u64>)>>,
    /// Whether any lock was taken through this node since it started (until then a close has
    /// no locks to drop, and does not look).
    ever_locked: AtomicBool,
    /// Inodes whose handle's locks are being dropped after a RELEASE (how many such handles).
    closing: Mutex<HashMap<Ino, usize>>,
    /// Notified whenever one of those drops is done.
    closed: tokio::sync::Notify,
}

#[derive(Default)]
struct Waiting {
    /// FUSE request id -> the sender that ends its wait.
    cancel: HashMap<u64, tokio::sync::oneshot::Sender<()>>,
    /// Request ids interrupted before they waited, oldest first.
    early: VecDeque<u64>,
}

impl LockWaits {
    /// Register request `unique` as a waiter: the receiver fires when the kernel interrupts it.
    /// `None` if it was interrupted already (answer EINTR).
    pub fn wait(&self, unique: u64) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = w.early.iter().position(|u| *u == unique) {
            w.early.remove(at);
            return None;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        w.cancel.insert(unique, tx);
        Some(rx)
    }

    /// Request `unique` no longer waits (answered).
    pub fn done(&self, unique: u64) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).cancel.remove(&unique);
    }

    /// The kernel interrupts request `unique`: end its wait, or remember it for when it waits.
    pub fn interrupt(&self, unique: u64) {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match w.cancel.remove(&unique) {
            Some(tx) => {
                let _ = tx.send(());
            }
            None => {
                if w.early.len() >= EARLY_INTERRUPTS_MAX {
                    w.early.pop_front();
                }
                w.early.push_back(unique);
            }
        }
    }

    /// Lock owner `owner` took (or changed) a lock on `ino` through handle `fh`.
    pub fn took(&self, fh: u64, ino: Ino, owner: u64) {
        self.ever_locked.store(true, Ordering::Release);
        let mut m = self.by_handle.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(fh).or_insert_with(|| (ino, BTreeSet::new())).1.insert(owner);
    }

    /// Handle `fh` is closed for good: the inode and the owners that took locks through it, if
    /// any; then the caller drops their locks and calls `release_done`.
    pub fn closed(&self, fh: u64) -> Option<(Ino, Vec<u64>)> {
        let (ino, owners) = self.by_handle.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh)?;
        *self.closing.lock().unwrap_or_else(|e| e.into_inner()).entry(ino).or_insert(0) += 1;
        Some((ino, owners.into_iter().collect()))
    }

    /// The locks of a handle of `ino` that `closed` returned are dropped (or failed to be).
    pub fn release_done(&self, ino: Ino) {
        let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = closing.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                closing.remove(&ino);
            }
        }
        drop(closing);
        self.closed.notify_waiters();
    }

    /// If locks of closed handles of `ino` are being dropped, wait until they are (at most
    /// `bound`) and return true. The kernel sends RELEASE after close(2) returned, so a process
    /// that closes a locked file and locks it again through another would otherwise meet its
    /// own lock for the length of a Raft round.
    pub async fn settle(&self, ino: Ino, bound: std::time::Duration) -> bool {
        let busy = || self.closing.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&ino);
        if !busy() {
            return false;
        }
        let _ = tokio::time::timeout(bound, async {
            loop {
                let done = self.closed.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                if !busy() {
                    return;
                }
                done.await;
            }
        })
        .await;
        true
    }

    /// Whether any lock was taken through this node since it started.
    pub fn ever_locked(&self) -> bool {
        self.ever_locked.load(Ordering::Acquire)
    }

    /// Requests waiting now (tests and metrics).
    pub fn waiting(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).cancel.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupt_ends_a_wait_or_is_kept_for_it() {
        let w = LockWaits::default();
        let mut rx = w.wait(7).expect("not interrupted");
        assert!(rx.try_recv().is_err(), "nothing fired yet");
        w.interrupt(7);
        assert!(rx.try_recv().is_ok(), "the interrupt ends the wait");
        // An interrupt that overtook its request.
        w.interrupt(9);
        assert!(w.wait(9).is_none(), "already interrupted");
        assert!(w.wait(9).is_some(), "remembered once only");
        w.done(9);
        assert_eq!(w.waiting(), 0);
        // Interrupts of requests that never wait do not pile up.
        for u in 100..100 + 2 * EARLY_INTERRUPTS_MAX as u64 {
            w.interrupt(u);
        }
        assert!(w.waiting.lock().unwrap().early.len() <= EARLY_INTERRUPTS_MAX);
        assert!(w.wait(100).is_some(), "the oldest was forgotten");
    }

    #[test]
    fn owners_are_remembered_per_handle_until_it_closes() {
        let w = LockWaits::default();
        assert!(!w.ever_locked());
        w.took(1, 10, 5);
        assert!(w.ever_locked());
        w.took(1, 10, 6);
        w.took(1, 10, 5);
        assert_eq!(w.closed(1), Some((10, vec![5, 6])));
        assert_eq!(w.closed(1), None);
        assert_eq!(w.closed(2), None);
    }

    #[tokio::test]
    async fn a_lock_request_waits_for_the_releases_of_closed_handles() {
        let w = std::sync::Arc::new(LockWaits::default());
        let bound = std::time::Duration::from_secs(10);
        assert!(!w.settle(10, bound).await, "nothing closing");
        w.took(1, 10, 5);
        w.took(2, 10, 6);
        assert!(w.closed(1).is_some() && w.closed(2).is_some());
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.settle(10, bound).await }
        });
        w.release_done(10);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one release still runs");
        w.release_done(10);
        assert!(tokio::time::timeout(bound, waiter).await.unwrap().unwrap());
        assert!(!w.settle(10, bound).await);
    }
}

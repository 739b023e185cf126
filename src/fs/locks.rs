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

/// How long after a FLUSH of a handle that took locks a conflicting non-blocking request on this
/// node waits for that handle's RELEASE. A FLUSH comes with every close(2) of a descriptor,
/// before it returns; when it was the last descriptor of the open file, the kernel sends the
/// RELEASE (which drops the file's flock and OFD locks) in the background, so it can arrive
/// after the process's next lock request: behind the writes queued before it, or read by
/// another worker thread. With fuser's default of 16 background requests the RELEASE waited in
/// the kernel's queue until the writeback ahead of it was committed, and without this wait 2-5
/// of 1,500 close-and-relock rounds under a concurrent write met the lock the process had just
/// closed; `FUSE_MAX_BACKGROUND` (fs/mod.rs) keeps that queue empty now, and this wait covers
/// what is left. It goes on while writes are in flight here (the RELEASE may be queued behind
/// them), this long after the last one was seen, and at most `RELEASE_AFTER_FLUSH_WAIT_MAX_MS`
/// after the flush. Long, because a RELEASE can still wait for a fuser thread to get the CPU:
/// with 100 ms, 1 of 600 rounds failed under a full CI run's load. When the close was not the
/// last (a dup is still open), the request gets its EWOULDBLOCK that much later.
pub const RELEASE_AFTER_FLUSH_WAIT_MS: u64 = 1_000;
/// See `RELEASE_AFTER_FLUSH_WAIT_MS`.
pub const RELEASE_AFTER_FLUSH_WAIT_MAX_MS: u64 = 3_000;
/// How often that wait looks whether writes are still in flight.
const RELEASE_WAIT_POLL_MS: u64 = 5;

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
    /// Handles that took locks and were flushed (a descriptor closed), with their inode and
    /// when, until their RELEASE: it may be on its way (`RELEASE_AFTER_FLUSH_WAIT_MS`).
    flushed: Mutex<HashMap<u64, (Ino, std::time::Instant)>>,
    /// Notified whenever one of those drops is done.
    closed: tokio::sync::Notify,
    /// How many of those drops are done (see `drops_done`).
    drops_done: std::sync::atomic::AtomicU64,
    /// Lock owners in use on an inode by requests in flight, and by drops after a RELEASE.
    owners: Mutex<OwnersInUse>,
}

/// See `LockWaits::request` and `LockWaits::closed`. An fcntl OFD lock is owned by its open file,
/// which the kernel names after the address of its `struct file`: a file opened right after
/// another was closed often gets the same address, so its locks have the closed file's owner
/// while the closed file's RELEASE (which drops that owner's locks) may still be on its way.
#[derive(Default)]
struct OwnersInUse {
    /// (inode, owner) -> lock requests in flight.
    requesting: HashMap<(Ino, u64), usize>,
    /// (inode, owner) -> drops after a RELEASE in flight.
    dropping: HashMap<(Ino, u64), usize>,
}

/// A lock request in flight (`LockWaits::request`), until dropped.
pub struct Requesting<'a> {
    waits: &'a LockWaits,
    key: (Ino, u64),
}

impl Drop for Requesting<'_> {
    fn drop(&mut self) {
        count_down(&mut self.waits.owners.lock().unwrap_or_else(|e| e.into_inner()).requesting, &self.key);
    }
}

/// Take one off `key`'s count in `counts`, forgetting the key at zero.
fn count_down<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
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

    /// A descriptor of handle `fh` was closed (FLUSH): if locks were taken through it, its
    /// RELEASE may follow (see `settle`).
    pub fn flushed(&self, fh: u64) {
        if !self.ever_locked() {
            return;
        }
        let ino = match self.by_handle.lock().unwrap_or_else(|e| e.into_inner()).get(&fh) {
            Some((ino, _)) => *ino,
            None => return,
        };
        self.flushed.lock().unwrap_or_else(|e| e.into_inner()).insert(fh, (ino, std::time::Instant::now()));
    }

    /// Handle `fh` is closed for good: the inode and the owners that took locks through it, if
    /// any; then the caller drops their locks and calls `release_done`.
    ///
    /// Owners that another open handle of the inode also took locks under, or that a lock request
    /// in flight uses, are left out: their locks are that handle's or request's now (the same
    /// owner names one lock; see `OwnersInUse`). Those returned are marked as being dropped until
    /// `release_done`, and a new request under one of them waits for that (`request`).
    pub fn closed(&self, fh: u64) -> Option<(Ino, Vec<u64>)> {
        let mut by_handle = self.by_handle.lock().unwrap_or_else(|e| e.into_inner());
        let Some((ino, owners)) = by_handle.remove(&fh) else {
            drop(by_handle);
            self.flushed.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh);
            return None;
        };
        let mut in_use = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        let owners: Vec<u64> = owners
            .into_iter()
            .filter(|o| {
                !in_use.requesting.contains_key(&(ino, *o))
                    && !by_handle.values().any(|(i, others)| *i == ino && others.contains(o))
            })
            .collect();
        for o in &owners {
            *in_use.dropping.entry((ino, *o)).or_insert(0) += 1;
        }
        drop(in_use);
        drop(by_handle);
        // Closing before no longer flushed: `settle` looks at both, and in between it would see
        // neither and let a request meet this handle's lock.
        *self.closing.lock().unwrap_or_else(|e| e.into_inner()).entry(ino).or_insert(0) += 1;
        self.flushed.lock().unwrap_or_else(|e| e.into_inner()).remove(&fh);
        Some((ino, owners))
    }

    /// A request for a lock under `owner` on `ino` is about to be proposed: wait while a drop of that
    /// owner's locks after a RELEASE is in flight (it must be applied first, or it would drop
    /// what this request takes), then count it as in flight until the returned guard is dropped.
    pub async fn request(&self, ino: Ino, owner: u64) -> Requesting<'_> {
        let key = (ino, owner);
        loop {
            let done = self.closed.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            {
                let mut in_use = self.owners.lock().unwrap_or_else(|e| e.into_inner());
                if !in_use.dropping.contains_key(&key) {
                    *in_use.requesting.entry(key).or_insert(0) += 1;
                    return Requesting { waits: self, key };
                }
            }
            done.await;
        }
    }

    /// The locks of a handle of `ino` that `closed` returned (`owners`) are dropped (or failed
    /// to be).
    pub fn release_done(&self, ino: Ino, owners: &[u64]) {
        {
            let mut in_use = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            for o in owners {
                count_down(&mut in_use.dropping, &(ino, *o));
            }
        }
        count_down(&mut self.closing.lock().unwrap_or_else(|e| e.into_inner()), &ino);
        self.drops_done.fetch_add(1, Ordering::AcqRel);
        self.closed.notify_waiters();
    }

    /// How many drops of closed handles' locks are done so far. A lock request reads it before
    /// it is proposed: a drop done since may have been applied after the request (both were in
    /// flight at once), so a conflict it met may be gone already, with nothing left for `settle`
    /// to wait for. Seen: 1 of 600 close-and-relock rounds, the RELEASE read 9 ms before the
    /// request and its drop still behind it.
    pub fn drops_done(&self) -> u64 {
        self.drops_done.load(Ordering::Acquire)
    }

    /// If locks of closed handles of `ino` are being dropped, or a handle of `ino` that took
    /// locks was flushed and its RELEASE may still come (`RELEASE_AFTER_FLUSH_WAIT_MS`;
    /// `writing`: whether writes are in flight on this node now), wait until the drops are done
    /// and those RELEASEs came or are no longer expected (at most `bound`), and return true. The
    /// kernel sends RELEASE after close(2) returned, so a process that closes a locked file and
    /// locks it again through another would otherwise meet its own lock.
    pub async fn settle(&self, ino: Ino, bound: std::time::Duration, writing: impl Fn() -> bool) -> bool {
        use std::time::{Duration, Instant};
        let grace = Duration::from_millis(RELEASE_AFTER_FLUSH_WAIT_MS);
        let cap = Duration::from_millis(RELEASE_AFTER_FLUSH_WAIT_MAX_MS);
        let poll = Duration::from_millis(RELEASE_WAIT_POLL_MS);
        /// What a request still waits for.
        enum Pending {
            /// The locks of a closed handle being dropped (until done).
            Drops,
            /// A RELEASE that may come until then.
            ReleaseUntil(Instant),
        }
        let mut writes_seen: Option<Instant> = None;
        let mut busy = || -> Option<Pending> {
            if self.closing.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&ino) {
                return Some(Pending::Drops);
            }
            let now = Instant::now();
            let flushed: Vec<Instant> = self
                .flushed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .filter(|(i, at)| *i == ino && now < *at + cap)
                .map(|(_, at)| *at)
                .collect();
            if flushed.is_empty() {
                return None;
            }
            if writing() {
                writes_seen = Some(now);
            }
            let until = flushed
                .into_iter()
                .map(|at| (writes_seen.map_or(at, |w| w.max(at)) + grace).min(at + cap))
                .max()
                .filter(|until| *until > now)?;
            // While writes are in flight the deadline moves on: look again soon.
            Some(Pending::ReleaseUntil(if writes_seen == Some(now) { until.min(now + poll) } else { until }))
        };
        if busy().is_none() {
            return false;
        }
        let _ = tokio::time::timeout(bound, async {
            loop {
                let done = self.closed.notified();
                tokio::pin!(done);
                done.as_mut().enable();
                match busy() {
                    None => return,
                    Some(Pending::Drops) => done.await,
                    Some(Pending::ReleaseUntil(until)) => {
                        let _ = tokio::time::timeout_at(until.into(), done).await;
                    }
                }
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

    /// An owner another open handle of the inode took locks under, or a request in flight uses,
    /// is not dropped with a closed handle; a request under an owner being dropped waits for the
    /// drop.
    #[tokio::test]
    async fn a_closed_handle_leaves_owners_in_use_and_their_requests_wait_for_its_drop() {
        let w = std::sync::Arc::new(LockWaits::default());
        w.took(1, 10, 5);
        w.took(2, 10, 5);
        w.took(5, 11, 7);
        w.took(3, 11, 7);
        assert_eq!(w.closed(1), Some((10, vec![])), "handle 2 locked under owner 5 too");
        w.release_done(10, &[]);
        assert_eq!(w.closed(3), Some((11, vec![])), "handle 5 locked under owner 7 too");
        w.release_done(11, &[]);
        let in_flight = w.request(10, 8).await;
        w.took(4, 10, 8);
        assert_eq!(w.closed(4), Some((10, vec![])), "a request under owner 8 is in flight");
        w.release_done(10, &[]);
        drop(in_flight);
        assert_eq!(w.closed(2), Some((10, vec![5])));
        let waiter = tokio::spawn({
            let w = w.clone();
            async move {
                let _r = w.request(10, 5).await;
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "owner 5 is being dropped");
        let other = w.request(10, 6).await;
        drop(other);
        w.release_done(10, &[5]);
        tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_lock_request_waits_for_the_releases_of_closed_handles() {
        let w = std::sync::Arc::new(LockWaits::default());
        let bound = std::time::Duration::from_secs(10);
        assert!(!w.settle(10, bound, || false).await, "nothing closing");
        w.took(1, 10, 5);
        w.took(2, 10, 6);
        assert!(w.closed(1).is_some() && w.closed(2).is_some());
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.settle(10, bound, || false).await }
        });
        w.release_done(10, &[]);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one release still runs");
        w.release_done(10, &[]);
        assert!(tokio::time::timeout(bound, waiter).await.unwrap().unwrap());
        assert!(!w.settle(10, bound, || false).await);
    }

    /// A flushed handle that took locks may have its RELEASE on the way: a request waits for it
    /// (ending as soon as it is handled), or for `RELEASE_AFTER_FLUSH_WAIT_MS` if none comes.
    #[tokio::test]
    async fn a_lock_request_waits_for_the_release_a_flush_announces() {
        let w = std::sync::Arc::new(LockWaits::default());
        let bound = std::time::Duration::from_secs(10);
        w.flushed(1);
        assert!(!w.settle(10, bound, || true).await, "a handle that took no lock announces nothing");
        w.took(1, 10, 5);
        w.flushed(1);
        assert!(!w.settle(11, bound, || true).await, "another inode does not wait");
        let waiter = tokio::spawn({
            let w = w.clone();
            async move { w.settle(10, bound, || true).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "waits for the RELEASE");
        let (ino, _) = w.closed(1).unwrap();
        w.release_done(ino, &[]);
        let waited = tokio::time::timeout(bound, waiter).await.expect("ends once the release is done").unwrap();
        assert!(waited);
        // A flush with no RELEASE after it (a dup still open): the wait ends at the grace, or
        // while writes stay in flight, at the cap.
        w.took(2, 10, 6);
        w.flushed(2);
        let t = std::time::Instant::now();
        assert!(w.settle(10, bound, || false).await);
        let took = t.elapsed();
        assert!(took >= std::time::Duration::from_millis(RELEASE_AFTER_FLUSH_WAIT_MS - 5) && took < bound, "{took:?}");
        assert!(!w.settle(10, bound, || false).await, "the flush is old news now");
        w.flushed(2);
        let t = std::time::Instant::now();
        assert!(w.settle(10, bound, || true).await);
        let took = t.elapsed();
        assert!(took >= std::time::Duration::from_millis(RELEASE_AFTER_FLUSH_WAIT_MAX_MS - 5) && took < bound, "{took:?}");
    }
}

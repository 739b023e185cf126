//! Open file handles of this node: fh -> (ino, open flags), and how often each inode is open.
//!
//! The open count decides when this node releases an orphan: at its last close, or at once when
//! nothing here holds it open. A release in progress "claims" the inode: an open that comes
//! after the claim is refused (the inode is going away), one that came before it makes the
//! claim fail (the last close releases instead). Claim and open take the same lock, so exactly
//! one of them wins and an orphan is never released under an open handle.
//!
//! It also knows which handles were flushed (a descriptor closed): the kernel sends their
//! RELEASE after close(2) returned, and until it is answered the kernel holds the inode (see
//! `wait_for_closing`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::state::Ino;

/// One open file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handle {
    pub ino: Ino,
    /// The flags given to open/create (O_APPEND, access mode, ...).
    pub flags: i32,
}

#[derive(Default)]
struct Table {
    next_fh: u64,
    handles: HashMap<u64, Handle>,
    open: HashMap<Ino, u32>,
    /// How many of them allow writing (only those can leave dirty pages in the kernel).
    writers: HashMap<Ino, u32>,
    /// Releases in progress per inode (a count: a last close and an unlink may both release).
    claims: HashMap<Ino, u32>,
    /// Open inodes whose kernel attributes went stale while open (another node changed them, or
    /// an append here went past the kernel's idea of the size): evict them at their last close.
    stale: HashSet<Ino>,
    /// Handles flushed (a descriptor closed) and not released yet, with their inode and when.
    flushed: HashMap<u64, (Ino, Instant)>,
    /// Fenced inodes (this node's locks on them expired, see `fs::fences`): the handles that
    /// were open when this node learnt of it and are not released yet.
    lost: HashMap<Ino, HashSet<u64>>,
}

impl Table {
    fn insert(&mut self, ino: Ino, flags: i32) -> u64 {
        self.next_fh += 1;
        let fh = self.next_fh;
        self.handles.insert(fh, Handle { ino, flags });
        *self.open.entry(ino).or_insert(0) += 1;
        if writes(flags) {
            *self.writers.entry(ino).or_insert(0) += 1;
        }
        fh
    }
}

fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

#[derive(Default)]
pub struct Handles {
    table: Mutex<Table>,
    /// Whether any inode is fenced (`Table::lost` is not empty), read without the lock by every
    /// change of a file (see `is_fenced`).
    any_lost: AtomicBool,
    /// Notified when a flushed handle is released.
    released: Condvar,
}

impl Handles {
    /// Record an open of `ino`; returns the new file handle (never 0).
    pub fn open(&self, ino: Ino, flags: i32) -> u64 {
        self.lock().insert(ino, flags)
    }

    /// `open`, unless a release of `ino` is in progress (then `None`: the inode is going away).
    pub fn open_unless_claimed(&self, ino: Ino, flags: i32) -> Option<u64> {
        let mut t = self.lock();
        if t.claims.contains_key(&ino) {
            return None;
        }
        Some(t.insert(ino, flags))
    }

    /// Claim `ino` for a release: fails if this node holds it open (its last close releases it).
    /// A successful claim must be ended with `unclaim` once the release has been applied.
    pub fn claim_if_closed(&self, ino: Ino) -> bool {
        let mut t = self.lock();
        if t.open.contains_key(&ino) {
            return false;
        }
        *t.claims.entry(ino).or_insert(0) += 1;
        true
    }

    pub fn unclaim(&self, ino: Ino) {
        let mut t = self.lock();
        match t.claims.get_mut(&ino) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                t.claims.remove(&ino);
            }
        }
    }

    /// Forget `fh`. Returns the inode and whether this was its last open handle on this node.
    pub fn release(&self, fh: u64) -> Option<(Ino, bool)> {
        let mut t = self.lock();
        let handle = t.handles.remove(&fh)?;
        if t.flushed.remove(&fh).is_some() {
            self.released.notify_all();
        }
        if let Some(lost) = t.lost.get_mut(&handle.ino) {
            lost.remove(&fh);
            if lost.is_empty() {
                t.lost.remove(&handle.ino);
                self.any_lost.store(!t.lost.is_empty(), Ordering::Release);
            }
        }
        if writes(handle.flags) {
            match t.writers.get_mut(&handle.ino) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    t.writers.remove(&handle.ino);
                }
            }
        }
        let last = match t.open.get_mut(&handle.ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                t.open.remove(&handle.ino);
                true
            }
        };
        Some((handle.ino, last))
    }

    /// A descriptor of `fh` was closed (FLUSH): if it was the last, its RELEASE follows.
    pub fn flushed(&self, fh: u64) {
        let mut t = self.lock();
        if let Some(ino) = t.handles.get(&fh).map(|h| h.ino) {
            t.flushed.insert(fh, (ino, Instant::now()));
        }
    }

    /// Block until every handle of `ino` flushed less than `after_flush` ago has been released,
    /// or is that old (a descriptor of it is still open: a dup, a forked child's copy, a
    /// mapping). Returns whether it waited. The kernel sends a RELEASE after close(2) returned
    /// and holds the inode until it is answered: meanwhile a lookup of the file's name binds to
    /// that inode, whose size the kernel keeps under the writeback cache, even when another
    /// node has changed the file since (see `answer_open` in fs/mod.rs).
    pub fn wait_for_closing(&self, ino: Ino, after_flush: Duration) -> bool {
        let mut t = self.lock();
        let mut waited = false;
        loop {
            let now = Instant::now();
            let flushed = t.flushed.values().filter(|(i, _)| *i == ino);
            let until = flushed.map(|(_, at)| *at + after_flush).filter(|u| *u > now).max();
            let Some(until) = until else { return waited };
            waited = true;
            t = self.released.wait_timeout(t, until - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Mark `ino` for eviction at its last close if it is open here; returns whether it is.
    pub fn mark_stale_if_open(&self, ino: Ino) -> bool {
        let mut t = self.lock();
        let open = t.open.contains_key(&ino);
        if open {
            t.stale.insert(ino);
        }
        open
    }

    /// At the last close of `ino`: was it marked stale (and the mark is now taken)?
    pub fn take_stale(&self, ino: Ino) -> bool {
        self.lock().stale.remove(&ino)
    }

    /// Fence the inodes in `inodes` (every open inode if `None`): each handle open on one of
    /// them now is lost, and the inode stays fenced (`is_fenced`) until all of them are released;
    /// at its last close the kernel is made to forget it (`mark_stale_if_open`), so that no page
    /// the cluster refused stays cached. Returns the inodes and handles fenced.
    pub fn fence(&self, inodes: Option<&[Ino]>) -> (usize, usize) {
        let mut t = self.lock();
        let t = &mut *t;
        let mut fenced = (0, 0);
        for (fh, h) in &t.handles {
            if inodes.is_some_and(|inos| inos.binary_search(&h.ino).is_err()) {
                continue;
            }
            let lost = t.lost.entry(h.ino).or_default();
            if lost.is_empty() {
                fenced.0 += 1;
            }
            if lost.insert(*fh) {
                fenced.1 += 1;
            }
            t.stale.insert(h.ino);
        }
        self.any_lost.store(!t.lost.is_empty(), Ordering::Release);
        fenced
    }

    /// Is `ino` fenced (see `fence`)? Without the lock while nothing is: a caller that must see
    /// a fence made before some event orders itself after that event by other means (the
    /// `fences::Gate` mutex, taken after `fence` returns and before this is asked).
    pub fn is_fenced(&self, ino: Ino) -> bool {
        self.any_lost.load(Ordering::Acquire) && self.lock().lost.contains_key(&ino)
    }

    /// Does this node hold `ino` open?
    pub fn is_open(&self, ino: Ino) -> bool {
        self.lock().open.contains_key(&ino)
    }

    /// Does this node hold `ino` open for writing?
    pub fn is_open_for_write(&self, ino: Ino) -> bool {
        self.lock().writers.contains_key(&ino)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding this lock cannot leave the table half-updated in a way that
        // matters more than losing the node, so recover the guard rather than poison every call.
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_inode_stays_fenced_until_its_handles_of_then_are_released() {
        let h = Handles::default();
        let a = h.open(7, libc::O_RDWR);
        let b = h.open(7, libc::O_RDONLY);
        let other = h.open(8, libc::O_RDWR);
        assert!(!h.is_fenced(7));
        assert_eq!(h.fence(Some(&[7, 9])), (1, 2), "inode 9 is not open here: nothing to fence");
        assert!(h.is_fenced(7) && !h.is_fenced(8) && !h.is_fenced(9));
        let later = h.open(7, libc::O_RDWR);
        h.release(a);
        assert!(h.is_fenced(7), "a handle of then is still open");
        h.release(b);
        assert!(!h.is_fenced(7), "only handles open at the fence count");
        assert!(h.take_stale(7), "the kernel forgets the inode at its last close");
        h.release(later);
        assert_eq!(h.fence(None), (1, 1), "every open inode");
        assert!(h.is_fenced(8));
        h.release(other);
        assert!(!h.is_fenced(8));
    }

    #[test]
    fn counts_opens_per_inode() {
        let h = Handles::default();
        let a = h.open(7, libc::O_RDONLY);
        let b = h.open(7, libc::O_WRONLY | libc::O_APPEND);
        assert_ne!(a, b);
        assert!(h.is_open(7));
        assert!(h.is_open_for_write(7));
        assert_eq!(h.release(b), Some((7, false)));
        assert!(!h.is_open_for_write(7));
        let b = h.open(7, libc::O_WRONLY | libc::O_APPEND);
        assert_eq!(h.release(a), Some((7, false)));
        assert_eq!(h.release(a), None);
        assert_eq!(h.release(b), Some((7, true)));
        assert!(!h.is_open(7));
    }

    #[test]
    fn stale_marks_only_open_inodes() {
        let h = Handles::default();
        assert!(!h.mark_stale_if_open(4));
        assert!(!h.take_stale(4));
        let fh = h.open(4, libc::O_RDONLY);
        assert!(h.mark_stale_if_open(4));
        assert_eq!(h.release(fh), Some((4, true)));
        assert!(h.take_stale(4));
        assert!(!h.take_stale(4), "taken once");
    }

    #[test]
    fn claim_and_open_exclude_each_other() {
        let h = Handles::default();
        let fh = h.open_unless_claimed(3, libc::O_RDONLY).expect("no claim");
        assert!(!h.claim_if_closed(3), "open here: the last close releases");
        assert_eq!(h.release(fh), Some((3, true)));
        assert!(h.claim_if_closed(3));
        assert!(h.claim_if_closed(3), "two releasers may claim at once");
        assert_eq!(h.open_unless_claimed(3, libc::O_RDONLY), None, "going away");
        h.unclaim(3);
        assert_eq!(h.open_unless_claimed(3, libc::O_RDONLY), None, "one claim left");
        h.unclaim(3);
        assert!(h.open_unless_claimed(3, libc::O_RDONLY).is_some());
    }

    #[test]
    fn waits_for_the_release_of_flushed_handles_only() {
        let h = std::sync::Arc::new(Handles::default());
        let long = Duration::from_secs(30);
        let kept = h.open(5, libc::O_RDONLY);
        assert!(!h.wait_for_closing(5, long), "open, not flushed: nothing to wait for");
        let other = h.open(6, libc::O_RDONLY);
        h.flushed(other);
        assert!(!h.wait_for_closing(5, long), "another inode's flush");
        let closing = h.open(5, libc::O_WRONLY);
        h.flushed(closing);
        // Released from another thread, most often while the waiter waits (if first, there is
        // nothing to wait for): the waiter returns at the release, long before its bound.
        let releaser = {
            let h = h.clone();
            std::thread::spawn(move || h.release(closing))
        };
        let start = Instant::now();
        h.wait_for_closing(5, long);
        assert!(start.elapsed() < long, "woken by the release, not by the bound");
        assert_eq!(releaser.join().unwrap(), Some((5, false)));
        assert!(!h.wait_for_closing(5, long), "released: nothing left to wait for");
        // A flush older than the bound (a dup closed while the file stays open) is not waited for.
        let start = Instant::now();
        h.flushed(kept);
        assert!(h.wait_for_closing(5, Duration::from_millis(50)));
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert!(!h.wait_for_closing(5, Duration::from_millis(50)));
    }
}

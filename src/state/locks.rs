//! Cluster-wide advisory locks: fcntl POSIX record locks, OFD locks and flock(2).
//!
//! Every node turns the kernel's FUSE SETLK/SETLKW/GETLK into commands that `apply` runs on
//! every replica, so everything here is a pure function of the table and the request: no clock,
//! no randomness, no hash-map iteration order. A `LockTable` holds all locks of one inode and
//! is stored as one encoded value; it is kept in one canonical form (see `LockTable`) so that
//! replicas that applied the same commands encode it to the same bytes.
//!
//! The semantics follow Linux (`posix_lock_inode` and `flock_lock_inode` in `fs/locks.c`):
//! a request of an owner never conflicts with that owner's own locks; a POSIX request replaces
//! the owner's coverage of its range (splitting what sticks out) and merges with the owner's
//! adjacent locks of the same type; flock locks are whole-file, one per owner, and live in a
//! namespace of their own. OFD locks are POSIX locks whose owner id names an open file rather
//! than a process, so they need no kind of their own: the owner id carries the difference.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{Ino, NodeId};

/// Who holds a lock: the node, the node's incarnation (raised at every start of that node), and
/// the kernel's lock-owner id on that node (per process for classic POSIX locks, per open file
/// for OFD locks and flock). Two requests are from the same owner iff all three are equal.
///
/// The incarnation is part of the identity so that a node that restarts (and whose kernel may
/// reuse owner ids) never inherits the locks of its previous run, and those stale locks can be
/// dropped wholesale (`LockTable::drop_node`). The derived order (node, incarnation, id) is the
/// owner part of the table's canonical order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockOwner {
    pub node: NodeId,
    pub incarnation: u64,
    pub id: u64,
}

/// flock(2) locks and fcntl record locks live in separate namespaces (as on Linux): they never
/// conflict with each other. OFD locks are `Posix` (they do conflict with classic POSIX locks).
///
/// The derived order (`Posix` before `Flock`) is the first key of the table's canonical order.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockKind {
    Posix,
    Flock,
}

/// Shared or exclusive: `F_RDLCK` / `LOCK_SH` and `F_WRLCK` / `LOCK_EX`. Unlocking is not a type
/// here but a separate call (`LockTable::unlock`), so a held lock always has one of these.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockType {
    Read,
    Write,
}

impl LockType {
    /// Two locks of different owners on a common byte conflict unless both are shared.
    fn conflicts_with(self, other: LockType) -> bool {
        self == LockType::Write || other == LockType::Write
    }
}

/// One held lock: `owner` holds `[start, end]` (inclusive; `end == u64::MAX` reaches to the end
/// of the file however it grows) of `kind` as `typ`. `pid` is only reported back (F_GETLK shows
/// the pid of a conflicting lock); it plays no part in conflicts or ownership.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lock {
    pub owner: LockOwner,
    pub kind: LockKind,
    pub typ: LockType,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

impl Lock {
    /// Whether the lock covers any byte of `[start, end]` (inclusive). Written without `+ 1` so
    /// ranges that end at `u64::MAX` cannot overflow.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    /// The lock's place in the canonical order of a `LockTable`.
    fn key(&self) -> (LockKind, LockOwner, u64) {
        (self.kind, self.owner, self.start)
    }
}

/// Validate a request's byte range: `Some((start, end))` when `start <= end`, `None` otherwise
/// (the caller answers EINVAL). The lock functions themselves treat an inverted range as empty
/// rather than fail, so that `apply` cannot panic on a bad command; checking with this first is
/// how the caller tells the client about it.
pub fn range(start: u64, end: u64) -> Option<(u64, u64)> {
    (start <= end).then_some((start, end))
}

/// The range a request really concerns: a flock lock always covers the whole file, whatever
/// range the caller passed; a POSIX range must not be inverted (`None`: an empty request).
fn effective(kind: LockKind, start: u64, end: u64) -> Option<(u64, u64)> {
    match kind {
        LockKind::Flock => Some((0, u64::MAX)),
        LockKind::Posix => range(start, end),
    }
}

/// Whether `b` starts right after `a` ends (no gap, no overlap). `a.end == u64::MAX` has no
/// successor, hence `checked_add`.
fn adjacent(a_end: u64, b_start: u64) -> bool {
    a_end.checked_add(1) == Some(b_start)
}

/// `locks` (one owner and kind, sorted by start, non-overlapping) with `[start, end]` cut out:
/// a lock inside the range goes, one sticking out keeps the part(s) outside it, with its type
/// and pid. The result is still sorted by start.
fn cut(locks: &[Lock], start: u64, end: u64) -> Vec<Lock> {
    let mut out = Vec::with_capacity(locks.len() + 1);
    for l in locks {
        if !l.overlaps(start, end) {
            out.push(*l);
            continue;
        }
        // `l.start < start` implies `start >= 1`; `l.end > end` implies `end < u64::MAX`.
        if l.start < start {
            out.push(Lock { end: start - 1, ..*l });
        }
        if l.end > end {
            out.push(Lock { start: end + 1, ..*l });
        }
    }
    out
}

/// All locks held on one inode, in canonical form so that equal states encode to equal bytes
/// on every replica:
///
/// - sorted by `(kind, owner, start)` (`Posix` before `Flock`, owners by `(node, incarnation,
///   id)`), so the locks of one owner and kind are contiguous;
/// - `start <= end` for every lock;
/// - the locks of one owner and kind do not overlap, and two of them that are adjacent
///   (`a.end + 1 == b.start`) have different types (same-type neighbours are merged);
/// - a flock lock covers `[0, u64::MAX]`, and an owner holds at most one.
///
/// Every method keeps this form; `check` verifies it (e.g. of a decoded value).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LockTable {
    locks: Vec<Lock>,
}

impl LockTable {
    /// Whether no lock is held: the caller can then delete the stored value instead of keeping
    /// an empty one (an absent table and an empty one mean the same).
    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// How many locks (distinct ranges) are held, e.g. for limits or statistics.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    /// The locks in canonical order (see `LockTable`), e.g. to answer or debug a query.
    pub fn iter(&self) -> impl Iterator<Item = &Lock> {
        self.locks.iter()
    }

    /// The index range of `owner`'s locks of `kind` (contiguous by the canonical order).
    fn group(&self, kind: LockKind, owner: &LockOwner) -> std::ops::Range<usize> {
        let lo = self.locks.partition_point(|l| (l.kind, l.owner) < (kind, *owner));
        let n = self.locks[lo..].iter().take_while(|l| l.kind == kind && l.owner == *owner).count();
        lo..lo + n
    }

    /// F_GETLK and the check before a SETLK: the first lock (canonical order) of ANOTHER owner,
    /// of the same kind, overlapping `[start, end]`, where it or the request is `Write`. `None`
    /// means the request could be granted now. For `Flock` the range is ignored (whole file);
    /// an inverted POSIX range is empty and conflicts with nothing.
    pub fn conflict(
        &self,
        owner: &LockOwner,
        kind: LockKind,
        typ: LockType,
        start: u64,
        end: u64,
    ) -> Option<&Lock> {
        let (start, end) = effective(kind, start, end)?;
        self.locks.iter().find(|l| {
            l.kind == kind && l.owner != *owner && l.overlaps(start, end) && l.typ.conflicts_with(typ)
        })
    }

    /// F_SETLK / F_OFD_SETLK / flock(2): take or change a lock. On conflict (see `conflict`) the
    /// table is left unchanged and the conflicting lock is returned (the caller answers EAGAIN,
    /// or keeps a SETLKW waiting). The owner's own locks never conflict, so an upgrade (Read ->
    /// Write) fails only because of other owners.
    ///
    /// Otherwise, as Linux's `posix_lock_file`: the owner's locks of `kind` overlapping
    /// `[start, end]` are cut away (the parts outside the range stay, with their type and pid),
    /// the new range is added, and it merges with the owner's same-type locks adjacent to it.
    /// A merged lock takes the new request's `pid` (the latest setter; Linux keeps the older
    /// one, which for one owner is normally the same process anyway).
    ///
    /// For `Flock` the range is ignored: the owner's single whole-file lock is replaced, which
    /// converts shared <-> exclusive. Unlike Linux, a conversion that conflicts keeps the old
    /// lock (Linux drops it first), as every failed `set` changes nothing. An inverted POSIX
    /// range (`start > end`) is an empty request: `Ok` and no change (check `range` first).
    pub fn set(
        &mut self,
        owner: LockOwner,
        kind: LockKind,
        typ: LockType,
        start: u64,
        end: u64,
        pid: u32,
    ) -> Result<(), Lock> {
        let Some((start, end)) = effective(kind, start, end) else {
            return Ok(());
        };
        if let Some(c) = self.conflict(&owner, kind, typ, start, end) {
            return Err(*c);
        }
        let g = self.group(kind, &owner);
        let pieces = cut(&self.locks[g.clone()], start, end);
        // Pieces before `at` end before `start`; those from `at` on start after `end`.
        let at = pieces.partition_point(|l| l.end < start);
        let mut new = Lock { owner, kind, typ, start, end, pid };
        let mut keep_left = at;
        if let Some(p) = at.checked_sub(1).and_then(|i| pieces.get(i)) {
            if p.typ == typ && adjacent(p.end, start) {
                new.start = p.start;
                keep_left = at - 1;
            }
        }
        let mut keep_right = at;
        if let Some(n) = pieces.get(at) {
            if n.typ == typ && adjacent(end, n.start) {
                new.end = n.end;
                keep_right = at + 1;
            }
        }
        let mut group = Vec::with_capacity(pieces.len() + 1);
        group.extend_from_slice(pieces.get(..keep_left).unwrap_or_default());
        group.push(new);
        group.extend_from_slice(pieces.get(keep_right..).unwrap_or_default());
        self.locks.splice(g, group);
        Ok(())
    }

    /// F_UNLCK / LOCK_UN: remove `owner`'s coverage of `[start, end]` for `kind`, splitting a
    /// lock that sticks out on one or both sides. Unlocking what is not held is a no-op, as in
    /// POSIX. For `Flock` the range is ignored (the owner's flock goes); an inverted POSIX range
    /// is empty (no-op).
    pub fn unlock(&mut self, owner: &LockOwner, kind: LockKind, start: u64, end: u64) {
        let Some((start, end)) = effective(kind, start, end) else {
            return;
        };
        let g = self.group(kind, owner);
        if g.is_empty() {
            return;
        }
        let pieces = cut(&self.locks[g.clone()], start, end);
        self.locks.splice(g, pieces);
    }

    /// Drop all of `owner`'s locks of `kind`, or of every kind when `None`: what a close does
    /// (FLUSH drops a process's POSIX locks; the last close of an open file its flock and OFD
    /// locks).
    pub fn release_owner(&mut self, owner: &LockOwner, kind: Option<LockKind>) {
        self.locks.retain(|l| !(l.owner == *owner && kind.is_none_or(|k| l.kind == k)));
    }

    /// Drop every lock, of any kind, whose owner is `(node, incarnation, id)` for an `id` in
    /// `ids`: one command releases all owners a node found gone at once. Duplicates and order in
    /// `ids` do not matter.
    pub fn release_ids(&mut self, node: NodeId, incarnation: u64, ids: &[u64]) {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        self.locks.retain(|l| {
            !(l.owner.node == node
                && l.owner.incarnation == incarnation
                && ids.binary_search(&l.owner.id).is_ok())
        });
    }

    /// Drop `node`'s locks whose incarnation is not `keep_incarnation` (all of the node's locks
    /// when `None`): a node that restarted, or left the cluster, no longer has the processes
    /// and open files that held them. Returns whether anything was dropped, so the caller can
    /// skip rewriting an unchanged table.
    pub fn drop_node(&mut self, node: NodeId, keep_incarnation: Option<u64>) -> bool {
        let before = self.locks.len();
        self.locks.retain(|l| l.owner.node != node || Some(l.owner.incarnation) == keep_incarnation);
        self.locks.len() != before
    }

    /// Drop `node`'s locks taken under an incarnation up to `incarnation` (an expired lease);
    /// returns whether anything was dropped.
    pub fn expire_node(&mut self, node: NodeId, incarnation: u64) -> bool {
        let before = self.locks.len();
        self.locks.retain(|l| l.owner.node != node || l.owner.incarnation > incarnation);
        self.locks.len() != before
    }

    /// Whether the owner `(node, incarnation, id)` holds any lock (of `kind`, or of any kind when
    /// `None`), e.g. to know whether a close must propose a release at all.
    pub fn holds(&self, node: NodeId, incarnation: u64, id: u64, kind: Option<LockKind>) -> bool {
        let owner = LockOwner { node, incarnation, id };
        self.locks.iter().any(|l| l.owner == owner && kind.is_none_or(|k| l.kind == k))
    }

    /// Verify the canonical form (see `LockTable`); the error names the first broken rule. For
    /// invariant checks and tests: every method keeps the form, so this only fails on a value
    /// that was built or decoded from something else.
    pub fn check(&self) -> Result<(), String> {
        for (i, l) in self.locks.iter().enumerate() {
            if l.start > l.end {
                return Err(format!("lock {i} has start {} > end {}", l.start, l.end));
            }
            if l.kind == LockKind::Flock && (l.start != 0 || l.end != u64::MAX) {
                return Err(format!("flock lock {i} does not cover the whole file: {l:?}"));
            }
            let Some(p) = i.checked_sub(1).and_then(|j| self.locks.get(j)) else {
                continue;
            };
            if p.key() >= l.key() {
                return Err(format!("locks {} and {i} are out of order: {p:?}, {l:?}", i - 1));
            }
            if p.kind == l.kind && p.owner == l.owner {
                if p.end >= l.start {
                    return Err(format!("locks {} and {i} of one owner overlap: {p:?}, {l:?}", i - 1));
                }
                if p.typ == l.typ && adjacent(p.end, l.start) {
                    return Err(format!("locks {} and {i} are adjacent and not merged: {p:?}, {l:?}", i - 1));
                }
            }
        }
        Ok(())
    }
}

/// At most this many inodes are named in a `LockFence`; a node that held locks on more fences
/// every inode it has open (`LockFence::all`).
pub const FENCE_INODES_MAX: usize = 4096;

/// Lost locks, per node: the nodes whose locks the leader expired (`Op::ExpireLocks`, a lease
/// that ran out while the node was silent) and whether each has learnt of it yet. While a node's
/// fence is active, the changes that node proposes are refused with EIO at apply
/// (`Op::fenced`): they were made by a node that may still have believed it held the lock, and
/// would otherwise overwrite what the lock's next holder wrote. The node lifts its fence with
/// `Op::AckLockExpiry` once it has fenced the open files of those inodes itself (`fs::fences`),
/// and a new run of the node (`Op::DropStaleLocks`) lifts it too.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LockFences(pub BTreeMap<NodeId, LockFence>);

/// One node's lost locks (see `LockFences`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct LockFence {
    /// Raised at each expiry that dropped a lock of the node; an acknowledgement names it, so a
    /// late one for an earlier expiry lifts nothing.
    pub epoch: u64,
    /// The node has not acknowledged this expiry yet.
    pub active: bool,
    /// The inodes the node held locks on when they expired (ascending, at most
    /// `FENCE_INODES_MAX`).
    pub inodes: Vec<Ino>,
    /// It held locks on more inodes than `inodes` names.
    pub all: bool,
}

impl LockFences {
    /// Whether `node`'s changes are refused (an expiry it has not acknowledged).
    pub fn active(&self, node: NodeId) -> bool {
        self.0.get(&node).is_some_and(|f| f.active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    use LockKind::{Flock, Posix};
    use LockType::{Read, Write};

    const A: LockOwner = LockOwner { node: 1, incarnation: 1, id: 7 };
    const B: LockOwner = LockOwner { node: 1, incarnation: 1, id: 8 };
    const C: LockOwner = LockOwner { node: 2, incarnation: 1, id: 7 };
    const MAX: u64 = u64::MAX;

    /// The (start, end, type) of `owner`'s locks of `kind`, in order.
    fn ranges(t: &LockTable, owner: &LockOwner, kind: LockKind) -> Vec<(u64, u64, LockType)> {
        t.iter().filter(|l| l.owner == *owner && l.kind == kind).map(|l| (l.start, l.end, l.typ)).collect()
    }

    fn lock(owner: LockOwner, kind: LockKind, typ: LockType, start: u64, end: u64, pid: u32) -> Lock {
        Lock { owner, kind, typ, start, end, pid }
    }

    #[test]
    fn read_locks_of_two_owners_coexist() {
        let mut t = LockTable::default();
        assert_eq!(t.set(A, Posix, Read, 0, 99, 1), Ok(()));
        assert_eq!(t.set(B, Posix, Read, 50, 149, 2), Ok(()));
        assert_eq!(t.conflict(&C, Posix, Read, 0, MAX), None);
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 99, Read)]);
        assert_eq!(ranges(&t, &B, Posix), vec![(50, 149, Read)]);
        t.check().unwrap();
    }

    #[test]
    fn write_conflicts_with_overlapping_read_and_write_of_another_owner() {
        let mut t = LockTable::default();
        t.set(A, Posix, Read, 0, 99, 1).unwrap();
        t.set(B, Posix, Write, 200, 299, 2).unwrap();
        // Write over another owner's read, on one shared byte.
        assert_eq!(t.set(C, Posix, Write, 99, 99, 3), Err(lock(A, Posix, Read, 0, 99, 1)));
        // Read and write over another owner's write.
        assert_eq!(t.set(C, Posix, Read, 150, 200, 3), Err(lock(B, Posix, Write, 200, 299, 2)));
        assert_eq!(t.set(A, Posix, Write, 299, 400, 1), Err(lock(B, Posix, Write, 200, 299, 2)));
        // Disjoint ranges (including the gap between them and right after) are free.
        assert_eq!(t.set(C, Posix, Write, 100, 199, 3), Ok(()));
        assert_eq!(t.set(C, Posix, Write, 300, MAX, 3), Ok(()));
        assert_eq!(ranges(&t, &C, Posix), vec![(100, 199, Write), (300, MAX, Write)]);
        t.check().unwrap();
    }

    #[test]
    fn conflict_returns_the_first_conflicting_lock_in_canonical_order() {
        let mut t = LockTable::default();
        t.set(C, Posix, Read, 0, 9, 3).unwrap();
        t.set(B, Posix, Read, 20, 29, 2).unwrap();
        t.set(B, Posix, Write, 5, 5, 2).unwrap_err();
        t.set(B, Posix, Read, 5, 5, 2).unwrap();
        // A write over everything meets B's locks first (B < C), and B's lowest one.
        assert_eq!(t.conflict(&A, Posix, Write, 0, MAX), Some(&lock(B, Posix, Read, 5, 5, 2)));
        // Past B's first lock, B's second still comes before C's (which overlaps 6..=9).
        assert_eq!(t.conflict(&A, Posix, Write, 6, MAX), Some(&lock(B, Posix, Read, 20, 29, 2)));
        assert_eq!(t.conflict(&A, Posix, Write, 0, 4), Some(&lock(C, Posix, Read, 0, 9, 3)));
        // Reads conflict with none of them, and an owner never conflicts with itself.
        assert_eq!(t.conflict(&A, Posix, Read, 0, MAX), None);
        assert_eq!(t.conflict(&C, Posix, Write, 0, 4), None);
        assert_eq!(t.conflict(&C, Posix, Write, 0, 5), Some(&lock(B, Posix, Read, 5, 5, 2)));
    }

    #[test]
    fn same_owner_needs_node_incarnation_and_id_equal() {
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 0, 9, 1).unwrap();
        for other in [LockOwner { node: 2, ..A }, LockOwner { incarnation: 2, ..A }, LockOwner { id: 8, ..A }]
        {
            assert!(t.conflict(&other, Posix, Read, 0, 0).is_some(), "{other:?}");
        }
        assert_eq!(t.conflict(&A, Posix, Write, 0, 0), None);
    }

    #[test]
    fn unlock_splits_a_lock() {
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 0, 99, 1).unwrap();
        t.unlock(&A, Posix, 10, 19);
        assert_eq!(
            t.iter().copied().collect::<Vec<_>>(),
            vec![lock(A, Posix, Write, 0, 9, 1), lock(A, Posix, Write, 20, 99, 1)]
        );
        // The hole is free for another owner; the rest is not.
        assert_eq!(t.conflict(&B, Posix, Write, 10, 19), None);
        assert!(t.conflict(&B, Posix, Write, 9, 10).is_some());
        // Unlocking what is not held (the hole, another owner, another kind) changes nothing.
        let before = t.clone();
        t.unlock(&A, Posix, 10, 19);
        t.unlock(&B, Posix, 0, MAX);
        t.unlock(&A, Flock, 0, MAX);
        assert_eq!(t, before);
        // Unlocking over several locks and past the end trims both.
        t.unlock(&A, Posix, 5, 50);
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 4, Write), (51, 99, Write)]);
        t.unlock(&A, Posix, 0, MAX);
        assert!(t.is_empty());
    }

    #[test]
    fn downgrade_of_the_middle_splits_into_three() {
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 0, 99, 1).unwrap();
        t.set(A, Posix, Read, 40, 59, 2).unwrap();
        assert_eq!(
            t.iter().copied().collect::<Vec<_>>(),
            vec![
                lock(A, Posix, Write, 0, 39, 1),
                lock(A, Posix, Read, 40, 59, 2),
                lock(A, Posix, Write, 60, 99, 1),
            ]
        );
        // Another owner may now read the middle, and only the middle.
        assert_eq!(t.set(B, Posix, Read, 40, 59, 3), Ok(()));
        assert!(t.set(B, Posix, Read, 39, 40, 3).is_err());
        // Upgrading the middle again is blocked by B's read and changes nothing.
        let before = t.clone();
        assert_eq!(t.set(A, Posix, Write, 40, 59, 2), Err(lock(B, Posix, Read, 40, 59, 3)));
        assert_eq!(t, before);
        // Once B is gone the upgrade merges the three back into one lock.
        t.release_owner(&B, None);
        assert_eq!(t.set(A, Posix, Write, 40, 59, 2), Ok(()));
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![lock(A, Posix, Write, 0, 99, 2)]);
        t.check().unwrap();
    }

    #[test]
    fn adjacent_same_type_locks_merge() {
        let mut t = LockTable::default();
        t.set(A, Posix, Read, 0, 9, 1).unwrap();
        t.set(A, Posix, Read, 20, 29, 1).unwrap();
        t.set(A, Posix, Read, 10, 19, 2).unwrap(); // bridges both neighbours
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![lock(A, Posix, Read, 0, 29, 2)]);
        // Overlapping same-type request extends the lock.
        t.set(A, Posix, Read, 25, 39, 2).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 39, Read)]);
        // A different type next to it does not merge; neither do another owner's or kind's.
        t.set(A, Posix, Write, 40, 49, 2).unwrap();
        t.set(B, Posix, Read, 50, 59, 3).unwrap();
        t.set(A, Flock, Read, 0, MAX, 2).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 39, Read), (40, 49, Write)]);
        // Gap of one byte: no merge.
        t.set(A, Posix, Write, 51, 60, 2).unwrap_err();
        t.set(A, Posix, Write, 61, 70, 2).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 39, Read), (40, 49, Write), (61, 70, Write)]);
        t.set(A, Posix, Write, 50, 50, 2).unwrap_err(); // B reads 50
        t.release_owner(&B, None);
        t.set(A, Posix, Write, 50, 60, 2).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 39, Read), (40, 70, Write)]);
        t.check().unwrap();
    }

    #[test]
    fn to_eof_ranges_do_not_overflow() {
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 100, MAX, 1).unwrap();
        t.set(A, Posix, Write, MAX, MAX, 1).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(100, MAX, Write)]);
        t.set(A, Posix, Read, MAX, MAX, 1).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(100, MAX - 1, Write), (MAX, MAX, Read)]);
        t.unlock(&A, Posix, MAX - 1, MAX);
        assert_eq!(ranges(&t, &A, Posix), vec![(100, MAX - 2, Write)]);
        t.set(A, Posix, Write, MAX - 1, MAX, 1).unwrap(); // adjacent: merges
        assert_eq!(ranges(&t, &A, Posix), vec![(100, MAX, Write)]);
        t.set(A, Posix, Read, 0, MAX, 1).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, MAX, Read)]);
        t.unlock(&A, Posix, 0, 0);
        t.unlock(&A, Posix, MAX, MAX);
        assert_eq!(ranges(&t, &A, Posix), vec![(1, MAX - 1, Read)]);
        assert!(t.conflict(&B, Posix, Write, MAX - 1, MAX).is_some());
        assert!(t.conflict(&B, Posix, Write, MAX, MAX).is_none());
        t.set(A, Posix, Read, 0, 0, 1).unwrap();
        t.set(A, Posix, Read, MAX, MAX, 1).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, MAX, Read)]);
        t.check().unwrap();
    }

    #[test]
    fn inverted_range_is_rejected_and_a_no_op() {
        assert_eq!(range(5, 4), None);
        assert_eq!(range(4, 4), Some((4, 4)));
        assert_eq!(range(0, MAX), Some((0, MAX)));
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 0, 9, 1).unwrap();
        let before = t.clone();
        assert_eq!(t.set(B, Posix, Write, 9, 0, 2), Ok(()));
        t.unlock(&A, Posix, MAX, 0);
        assert_eq!(t, before);
        assert_eq!(t.conflict(&B, Posix, Write, MAX, 0), None);
    }

    #[test]
    fn flock_and_posix_never_conflict() {
        let mut t = LockTable::default();
        t.set(A, Posix, Write, 0, MAX, 1).unwrap();
        assert_eq!(t.set(B, Flock, Write, 0, MAX, 2), Ok(()));
        assert_eq!(t.conflict(&B, Posix, Read, 0, 0), Some(&lock(A, Posix, Write, 0, MAX, 1)));
        assert_eq!(t.conflict(&A, Flock, Read, 0, MAX), Some(&lock(B, Flock, Write, 0, MAX, 2)));
        // One owner may hold both kinds; releasing one kind keeps the other.
        t.set(A, Flock, Read, 0, MAX, 1).unwrap_err();
        t.set(B, Posix, Read, 0, 0, 2).unwrap_err();
        t.release_owner(&B, Some(Posix));
        assert!(t.holds(B.node, B.incarnation, B.id, Some(Flock)));
        t.release_owner(&A, Some(Flock));
        assert!(t.holds(A.node, A.incarnation, A.id, Some(Posix)));
        assert!(!t.holds(A.node, A.incarnation, A.id, Some(Flock)));
        t.check().unwrap();
    }

    #[test]
    fn flock_shared_exclusive_and_conversion() {
        let mut t = LockTable::default();
        t.set(A, Flock, Read, 0, MAX, 1).unwrap();
        t.set(B, Flock, Read, 0, MAX, 2).unwrap();
        assert_eq!(t.set(C, Flock, Write, 0, MAX, 3), Err(lock(A, Flock, Read, 0, MAX, 1)));
        // Upgrade blocked by the other shared holder: A keeps its shared lock.
        let before = t.clone();
        assert_eq!(t.set(A, Flock, Write, 0, MAX, 1), Err(lock(B, Flock, Read, 0, MAX, 2)));
        assert_eq!(t, before);
        t.unlock(&B, Flock, 0, MAX);
        assert_eq!(t.set(A, Flock, Write, 0, MAX, 1), Ok(()));
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![lock(A, Flock, Write, 0, MAX, 1)]);
        assert!(t.set(B, Flock, Read, 0, MAX, 2).is_err());
        // Downgrade: one lock, now shared, and others may share it.
        t.set(A, Flock, Read, 0, MAX, 1).unwrap();
        assert_eq!(t.iter().copied().collect::<Vec<_>>(), vec![lock(A, Flock, Read, 0, MAX, 1)]);
        t.set(B, Flock, Read, 0, MAX, 2).unwrap();
        // The range passed for flock is irrelevant: always the whole file.
        t.set(C, Flock, Read, 10, 20, 3).unwrap();
        assert_eq!(ranges(&t, &C, Flock), vec![(0, MAX, Read)]);
        assert!(t.conflict(&A, Flock, Write, 500, 600).is_some());
        t.unlock(&C, Flock, 7, 7);
        assert!(!t.holds(C.node, C.incarnation, C.id, None));
        assert_eq!(t.len(), 2);
        t.check().unwrap();
    }

    #[test]
    fn release_owner_drops_only_that_owner() {
        let mut t = LockTable::default();
        t.set(A, Posix, Read, 0, 9, 1).unwrap();
        t.set(A, Posix, Write, 20, 29, 1).unwrap();
        t.set(A, Flock, Read, 0, MAX, 1).unwrap();
        t.set(B, Posix, Read, 0, 9, 2).unwrap();
        t.release_owner(&A, Some(Posix));
        assert!(ranges(&t, &A, Posix).is_empty());
        assert_eq!(ranges(&t, &A, Flock), vec![(0, MAX, Read)]);
        assert_eq!(ranges(&t, &B, Posix), vec![(0, 9, Read)]);
        t.set(A, Posix, Read, 0, 9, 1).unwrap();
        t.release_owner(&A, None);
        assert!(!t.holds(A.node, A.incarnation, A.id, None));
        assert!(t.holds(B.node, B.incarnation, B.id, None));
        t.release_owner(&B, None);
        assert!(t.is_empty());
    }

    #[test]
    fn release_ids_matches_node_incarnation_and_id() {
        let mut t = LockTable::default();
        let a_old = LockOwner { incarnation: 0, ..A };
        let a9 = LockOwner { id: 9, ..A };
        for (o, s) in [(A, 0), (B, 10), (C, 20), (a_old, 30), (a9, 40)] {
            t.set(o, Posix, Read, s, s + 9, 1).unwrap();
        }
        t.set(A, Flock, Read, 0, MAX, 1).unwrap();
        t.release_ids(1, 1, &[9, 7, 9, 100]);
        // A's locks of both kinds and a9's go; B (other id), C (other node), a_old (other
        // incarnation) stay.
        assert!(!t.holds(A.node, A.incarnation, A.id, None));
        assert!(!t.holds(a9.node, a9.incarnation, a9.id, None));
        for o in [B, C, a_old] {
            assert!(t.holds(o.node, o.incarnation, o.id, Some(Posix)), "{o:?}");
        }
        let before = t.clone();
        t.release_ids(1, 1, &[]);
        assert_eq!(t, before);
        t.check().unwrap();
    }

    #[test]
    fn expire_node_drops_up_to_the_incarnation() {
        let mut t = LockTable::default();
        let a_old = LockOwner { incarnation: 0, ..A };
        let a_new = LockOwner { incarnation: 2, ..A };
        t.set(A, Posix, Read, 0, 9, 1).unwrap();
        t.set(a_old, Flock, Read, 0, MAX, 1).unwrap();
        t.set(a_new, Posix, Read, 20, 29, 1).unwrap();
        t.set(C, Posix, Read, 0, 9, 1).unwrap();
        assert!(t.expire_node(A.node, A.incarnation));
        assert!(!t.holds(A.node, A.incarnation, A.id, None));
        assert!(!t.holds(a_old.node, a_old.incarnation, a_old.id, None));
        assert!(t.holds(a_new.node, a_new.incarnation, a_new.id, Some(Posix)), "a later run keeps its lock");
        assert!(t.holds(C.node, C.incarnation, C.id, Some(Posix)), "another node keeps its lock");
        assert!(!t.expire_node(A.node, A.incarnation), "nothing left to drop");
        t.check().unwrap();
        assert!(t.expire_node(A.node, 2));
        assert!(!t.holds(a_new.node, a_new.incarnation, a_new.id, None));
    }

    #[test]
    fn drop_node_keeps_the_current_incarnation() {
        let mut t = LockTable::default();
        let a_old = LockOwner { incarnation: 0, ..A };
        t.set(A, Posix, Read, 0, 9, 1).unwrap();
        t.set(a_old, Posix, Read, 0, 9, 1).unwrap();
        t.set(a_old, Flock, Read, 0, MAX, 1).unwrap();
        t.set(C, Posix, Read, 0, 9, 1).unwrap();
        assert!(t.drop_node(1, Some(1)));
        assert!(!t.holds(a_old.node, a_old.incarnation, a_old.id, None));
        assert!(t.holds(A.node, A.incarnation, A.id, Some(Posix)));
        assert!(t.holds(C.node, C.incarnation, C.id, Some(Posix)));
        assert!(!t.drop_node(1, Some(1)), "nothing left to drop");
        assert!(!t.drop_node(3, None), "a node without locks");
        assert!(t.drop_node(1, None));
        assert!(!t.holds(A.node, A.incarnation, A.id, None));
        assert_eq!(t.len(), 1);
        t.check().unwrap();
    }

    #[test]
    fn conflicting_upgrade_leaves_the_table_unchanged() {
        let mut t = LockTable::default();
        t.set(A, Posix, Read, 0, 99, 1).unwrap();
        t.set(A, Posix, Write, 200, 299, 1).unwrap();
        t.set(B, Posix, Read, 90, 109, 2).unwrap();
        let before = t.clone();
        assert_eq!(t.set(A, Posix, Write, 0, 299, 1), Err(lock(B, Posix, Read, 90, 109, 2)));
        assert_eq!(t, before);
        // An upgrade that stays clear of B's range succeeds and only converts that part.
        t.set(A, Posix, Write, 0, 89, 1).unwrap();
        assert_eq!(ranges(&t, &A, Posix), vec![(0, 89, Write), (90, 99, Read), (200, 299, Write)]);
        t.check().unwrap();
    }

    #[test]
    fn check_rejects_non_canonical_tables() {
        let bad = [
            vec![lock(B, Posix, Read, 0, 9, 1), lock(A, Posix, Read, 0, 9, 1)],
            vec![lock(A, Posix, Read, 0, 9, 1), lock(A, Posix, Write, 5, 19, 1)],
            vec![lock(A, Posix, Read, 0, 9, 1), lock(A, Posix, Read, 10, 19, 1)],
            vec![lock(A, Posix, Read, 9, 0, 1)],
            vec![lock(A, Flock, Read, 0, 9, 1)],
            vec![lock(A, Flock, Read, 0, MAX, 1), lock(A, Posix, Read, 0, 9, 1)],
        ];
        for locks in bad {
            assert!(LockTable { locks: locks.clone() }.check().is_err(), "{locks:?}");
        }
        let good = vec![
            lock(A, Posix, Read, 0, 9, 1),
            lock(A, Posix, Write, 10, 19, 1),
            lock(B, Posix, Read, 0, 9, 1),
            lock(A, Flock, Read, 0, MAX, 1),
        ];
        LockTable { locks: good }.check().unwrap();
    }

    // ---- Property test against a byte-map model ----

    /// The model's universe: 64 atoms, each a range of bytes that every request covers whole or
    /// not at all. Atoms 0..=31 are bytes 0..=31, atom 32 is the huge gap [32, MAX-31], atoms
    /// 33..=63 are bytes MAX-30..=MAX, so requests exercise offset 0, u64::MAX and adjacency
    /// at both ends.
    const ATOMS: usize = 64;

    fn atom_lo(a: usize) -> u64 {
        match a {
            0..=32 => a as u64,
            _ => MAX - (63 - a as u64),
        }
    }

    fn atom_hi(a: usize) -> u64 {
        match a {
            0..=31 => a as u64,
            32 => MAX - 31,
            _ => MAX - (63 - a as u64),
        }
    }

    /// Owners that each differ from the first in exactly one of node, incarnation, id.
    const OWNERS: [LockOwner; 4] = [
        LockOwner { node: 1, incarnation: 1, id: 7 },
        LockOwner { node: 1, incarnation: 1, id: 8 },
        LockOwner { node: 1, incarnation: 2, id: 7 },
        LockOwner { node: 2, incarnation: 1, id: 7 },
    ];

    #[derive(Clone, Debug)]
    enum Op {
        Set { o: usize, kind: LockKind, typ: LockType, a: usize, b: usize, pid: u32 },
        Unlock { o: usize, kind: LockKind, a: usize, b: usize },
        Release { o: usize, kind: Option<LockKind> },
        ReleaseIds { node: NodeId, incarnation: u64, ids: Vec<u64> },
        DropNode { node: NodeId, keep: Option<u64> },
    }

    fn arb_kind() -> impl Strategy<Value = LockKind> {
        // Mostly POSIX: its ranges are where the interesting cases are.
        prop_oneof![4 => Just(Posix), 1 => Just(Flock)]
    }

    fn arb_range() -> impl Strategy<Value = (usize, usize)> {
        (0..ATOMS, 0..ATOMS).prop_map(|(x, y)| (x.min(y), x.max(y)))
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (0..OWNERS.len(), arb_kind(), prop_oneof![Just(Read), Just(Write)], arb_range(), 1..4u32)
                .prop_map(|(o, kind, typ, (a, b), pid)| Op::Set { o, kind, typ, a, b, pid }),
            4 => (0..OWNERS.len(), arb_kind(), arb_range()).prop_map(|(o, kind, (a, b))| Op::Unlock { o, kind, a, b }),
            1 => (0..OWNERS.len(), proptest::option::of(arb_kind())).prop_map(|(o, kind)| Op::Release { o, kind }),
            1 => (1..3u64, 1..3u64, proptest::collection::vec(6..9u64, 0..3))
                .prop_map(|(node, incarnation, ids)| Op::ReleaseIds { node, incarnation, ids }),
            1 => (1..3u64, proptest::option::of(0..3u64)).prop_map(|(node, keep)| Op::DropNode { node, keep }),
        ]
    }

    /// Per (owner index, kind): each atom's (type, pid), if held.
    type Model = BTreeMap<(usize, LockKind), [Option<(LockType, u32)>; ATOMS]>;

    /// The model's conflict rule: another owner, same kind, a common atom, one of them Write.
    fn model_conflicts(m: &Model, o: usize, kind: LockKind, typ: LockType, a: usize, b: usize) -> bool {
        m.iter().any(|(&(p, k), atoms)| {
            p != o
                && k == kind
                && OWNERS[p] != OWNERS[o]
                && atoms[a..=b].iter().flatten().any(|&(t, _)| t.conflicts_with(typ))
        })
    }

    /// The table's (type, pid) of `owner`'s `kind` at `offset`.
    fn table_at(t: &LockTable, owner: &LockOwner, kind: LockKind, offset: u64) -> Option<(LockType, u32)> {
        let mut hits = t.iter().filter(|l| l.owner == *owner && l.kind == kind && l.overlaps(offset, offset));
        let first = hits.next().map(|l| (l.typ, l.pid));
        assert!(hits.next().is_none(), "two locks of one owner on byte {offset}");
        first
    }

    fn whole(kind: LockKind, a: usize, b: usize) -> (usize, usize) {
        match kind {
            Flock => (0, ATOMS - 1),
            Posix => (a, b),
        }
    }

    fn apply(t: &mut LockTable, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Set { o, kind, typ, a, b, pid } => {
                let (a, b) = whole(kind, a, b);
                let owner = OWNERS[o];
                let expect_conflict = model_conflicts(m, o, kind, typ, a, b);
                let before = t.clone();
                let seen = t.conflict(&owner, kind, typ, atom_lo(a), atom_hi(b)).copied();
                match t.set(owner, kind, typ, atom_lo(a), atom_hi(b), pid) {
                    Err(c) => {
                        prop_assert!(expect_conflict, "set refused without a model conflict: {c:?}");
                        prop_assert_eq!(Some(c), seen);
                        prop_assert!(
                            c.owner != owner && c.kind == kind && c.overlaps(atom_lo(a), atom_hi(b))
                        );
                        prop_assert!(c.typ.conflicts_with(typ));
                        prop_assert_eq!(&*t, &before);
                    }
                    Ok(()) => {
                        prop_assert!(!expect_conflict, "set granted despite a model conflict");
                        prop_assert_eq!(seen, None);
                        let atoms = m.entry((o, kind)).or_insert([None; ATOMS]);
                        for x in &mut atoms[a..=b] {
                            *x = Some((typ, pid));
                        }
                        // The same-type run containing the new range is one lock: it takes the pid.
                        let mut lo = a;
                        while lo > 0 && matches!(atoms[lo - 1], Some((t, _)) if t == typ) {
                            lo -= 1;
                        }
                        let mut hi = b;
                        while hi + 1 < ATOMS && matches!(atoms[hi + 1], Some((t, _)) if t == typ) {
                            hi += 1;
                        }
                        for x in &mut atoms[lo..=hi] {
                            *x = Some((typ, pid));
                        }
                    }
                }
            }
            Op::Unlock { o, kind, a, b } => {
                let (a, b) = whole(kind, a, b);
                t.unlock(&OWNERS[o], kind, atom_lo(a), atom_hi(b));
                if let Some(atoms) = m.get_mut(&(o, kind)) {
                    for x in &mut atoms[a..=b] {
                        *x = None;
                    }
                }
            }
            Op::Release { o, kind } => {
                t.release_owner(&OWNERS[o], kind);
                m.retain(|&(p, k), _| !(p == o && kind.is_none_or(|kind| kind == k)));
            }
            Op::ReleaseIds { node, incarnation, ref ids } => {
                t.release_ids(node, incarnation, ids);
                m.retain(|&(p, _), _| {
                    let w = OWNERS[p];
                    !(w.node == node && w.incarnation == incarnation && ids.contains(&w.id))
                });
            }
            Op::DropNode { node, keep } => {
                let expect = m.iter().any(|(&(p, _), atoms)| {
                    let w = OWNERS[p];
                    w.node == node && Some(w.incarnation) != keep && atoms.iter().any(Option::is_some)
                });
                prop_assert_eq!(t.drop_node(node, keep), expect);
                m.retain(|&(p, _), _| OWNERS[p].node != node || Some(OWNERS[p].incarnation) == keep);
            }
        }
        Ok(())
    }

    fn check_against_model(t: &LockTable, m: &Model) -> Result<(), TestCaseError> {
        if let Err(e) = t.check() {
            return Err(TestCaseError::fail(format!("not canonical: {e}: {t:?}")));
        }
        for (o, owner) in OWNERS.iter().enumerate() {
            for kind in [Posix, Flock] {
                let empty = [None; ATOMS];
                let atoms = m.get(&(o, kind)).unwrap_or(&empty);
                for (x, want) in atoms.iter().enumerate() {
                    prop_assert_eq!(
                        table_at(t, owner, kind, atom_lo(x)),
                        *want,
                        "owner {} {:?} atom {}",
                        o,
                        kind,
                        x
                    );
                    prop_assert_eq!(
                        table_at(t, owner, kind, atom_hi(x)),
                        *want,
                        "owner {} {:?} atom {}",
                        o,
                        kind,
                        x
                    );
                }
                prop_assert_eq!(
                    t.holds(owner.node, owner.incarnation, owner.id, Some(kind)),
                    atoms.iter().any(Option::is_some)
                );
            }
        }
        // Nothing outside the owners the model knows of.
        prop_assert!(t.iter().all(|l| OWNERS.contains(&l.owner)));
        prop_assert_eq!(t.is_empty(), m.values().all(|a| a.iter().all(Option::is_none)));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn table_matches_byte_model(ops in proptest::collection::vec(arb_op(), 1..60)) {
            let mut t = LockTable::default();
            let mut m = Model::new();
            for op in &ops {
                apply(&mut t, &mut m, op)?;
                check_against_model(&t, &m)?;
            }
        }
    }
}

//! Which inodes the kernel knows (the lookup count our answers gave it, less what it forgot),
//! and the names under which it knows them: another node's change of a regular file makes the
//! kernel evict the file by its names; after a snapshot install (the state replaced as a whole,
//! with no list of what changed) every recorded name that no longer leads to its inode is
//! invalidated.
//!
//! Counts: a notification about an inode the kernel does not hold, or about a name in a directory
//! it does not hold, does nothing (the kernel answers ENOENT), yet costs a write to /dev/fuse and
//! the kernel's lookup of the inode. A node that only replicates (a follower while another node
//! creates files) sent four such futile notifications per created file, ~65 us of CPU each time.
//! So in a cluster every answer that gives the kernel an entry counts, whatever the inode's kind,
//! and the coherence thread skips notices about inodes the kernel does not know (`knows`). The
//! count must never be below the kernel's: it goes up before the answer is sent, and only the
//! kernel's FORGET takes it down. An inode the kernel knows without a lookup is the root.
//!
//! Why: with the writeback cache the kernel owns the size, mtime and ctime of a cached regular
//! file and ignores what Pickbox reports, even after `inval_inode` (measured on 6.18, see
//! fs/mount.rs). FUSE evicts an inode as soon as nothing references it (`generic_delete_inode`),
//! so dropping every dentry of an inode that is not open makes the next lookup build it afresh
//! from the replica. The state has no reverse index (inode -> names), and what matters is the
//! kernel's view anyway: each answer that gives the kernel an entry (lookup, create, mknod, link,
//! readdirplus) adds one to the inode's lookup count and records the name; `forget` takes the
//! count down and drops the record at zero, so the table is bounded by the kernel's own cache.
//! A name that went stale (renamed or removed since) is harmless: invalidating it is a no-op or
//! a cache miss.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::{Ino, ROOT_INO};

/// Names kept per inode at most (hard links beyond these are not invalidated by name; their
/// dentries still expire with the entry TTL).
pub const NAMES_PER_INODE_MAX: usize = 16;
/// An open that arrives up to this long after the inode's eviction may have been resolved by the
/// kernel before it (path walk, then the OPEN request): the kernel may then hold the old inode,
/// with its old size, which no notification can correct while it is in use.
pub const OPEN_RACE_MS: u64 = 500;
/// After an ESTALE for an inode, the next raced open of it within this long is taken for the
/// VFS's retry and answered normally (the VFS retries an ESTALE open once, with a fresh lookup;
/// a second ESTALE would reach the caller).
pub const ESTALE_RETRY_MS: u64 = 1_000;

#[derive(Default)]
struct Known {
    /// The kernel's lookup count for the inode, as far as our answers tell.
    lookups: u64,
    /// A regular file (its names are dropped at another node's change of it).
    file: bool,
    names: Vec<(Ino, Vec<u8>)>,
    /// When another node's change last made us drop the kernel's names of this inode.
    evicted_at: Option<Instant>,
}

/// The kernel's lookup counts and names. Off (records nothing) unless enabled: only a node whose
/// files other nodes change needs them.
#[derive(Default)]
pub struct KernelNames {
    /// Lookup counts of every inode are kept (`knows` answers from them).
    counting: AtomicBool,
    /// The names of regular files are kept too (with the writeback cache).
    enabled: AtomicBool,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    inodes: HashMap<Ino, Known>,
    /// The reverse: which inode each recorded name belongs to (for renames).
    by_name: HashMap<(Ino, Vec<u8>), Ino>,
    /// Opens of an inode answered ESTALE whose retry has not come yet, and when the last was
    /// (see `open_may_be_stale`). Apart from `inodes`: the kernel may forget the inode between
    /// the ESTALE and its retry (the retry's lookup then records it afresh, and may meet another
    /// eviction), and the retry must still pass.
    estale: HashMap<Ino, (u32, Instant)>,
}

impl Table {
    fn unname(&mut self, parent: Ino, name: &[u8]) -> Option<Ino> {
        let ino = self.by_name.remove(&(parent, name.to_vec()))?;
        if let Some(known) = self.inodes.get_mut(&ino) {
            known.names.retain(|(p, n)| !(*p == parent && n == name));
        }
        Some(ino)
    }

    fn name(&mut self, ino: Ino, parent: Ino, name: &[u8]) {
        let Some(known) = self.inodes.get_mut(&ino) else { return };
        if known.names.len() < NAMES_PER_INODE_MAX && !known.names.iter().any(|(p, n)| *p == parent && n == name) {
            known.names.push((parent, name.to_vec()));
            if let Some(previous) = self.by_name.insert((parent, name.to_vec()), ino) {
                if previous != ino {
                    if let Some(k) = self.inodes.get_mut(&previous) {
                        k.names.retain(|(p, n)| !(*p == parent && n == name));
                    }
                }
            }
        }
    }
}

impl KernelNames {
    /// Keep the lookup count of every inode (before the session starts).
    pub fn enable_counts(&self) {
        self.counting.store(true, Ordering::Relaxed);
    }

    /// Keep the lookup counts and the names (before the session starts).
    pub fn enable(&self) {
        self.enable_counts();
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    fn is_counting(&self) -> bool {
        self.counting.load(Ordering::Relaxed)
    }

    /// The kernel got an entry for `ino` under `name` in `parent` (its lookup count goes up by
    /// one, the name is recorded); `file`: `ino` is a regular file. Call before the answer goes
    /// out, so that neither a FORGET nor a notice can overtake it.
    pub fn looked_up(&self, ino: Ino, parent: Ino, name: &[u8], file: bool) {
        if !self.is_counting() {
            return;
        }
        let mut t = self.lock();
        let known = t.inodes.entry(ino).or_default();
        known.lookups += 1;
        known.file = file;
        if self.is_enabled() {
            t.name(ino, parent, name);
        }
    }

    /// May the kernel hold `ino` (its attributes, pages, or entries in it if a directory)? Yes
    /// for the root, for an inode it has lookups of, and for every inode while counts are off.
    pub fn knows(&self, ino: Ino) -> bool {
        !self.is_counting() || ino == ROOT_INO || self.lock().inodes.contains_key(&ino)
    }

    /// The kernel forgot `n` lookups of `ino`.
    pub fn forget(&self, ino: Ino, n: u64) {
        if !self.is_counting() {
            return;
        }
        let mut t = self.lock();
        if let Some(known) = t.inodes.get_mut(&ino) {
            known.lookups = known.lookups.saturating_sub(n);
            if known.lookups == 0 {
                if let Some(known) = t.inodes.remove(&ino) {
                    for name in known.names {
                        t.by_name.remove(&name);
                    }
                }
            }
        }
    }

    /// This node renamed `name` in `parent` to `new_name` in `new_parent` (the kernel moved its
    /// dentry): follow it, so the new name is the one invalidated. With `exchange`, the inode
    /// that had the new name moves the other way.
    pub fn renamed(&self, parent: Ino, name: &[u8], new_parent: Ino, new_name: &[u8], exchange: bool) {
        if !self.is_enabled() {
            return;
        }
        let mut t = self.lock();
        let moved = t.unname(parent, name);
        let other = t.unname(new_parent, new_name);
        if let Some(ino) = moved {
            t.name(ino, new_parent, new_name);
        }
        if let (true, Some(ino)) = (exchange, other) {
            t.name(ino, parent, name);
        }
    }

    /// The names the kernel may have for `ino`, of whatever kind (empty if it holds none we know
    /// of): what the tests look at; the coherence thread asks `file_names` or `names_of_others`.
    #[cfg(test)]
    pub fn names(&self, ino: Ino) -> Vec<(Ino, Vec<u8>)> {
        if !self.is_enabled() {
            return Vec::new();
        }
        self.lock().inodes.get(&ino).map(|k| k.names.clone()).unwrap_or_default()
    }

    /// The names the kernel may have for `ino` if it is a regular file.
    pub fn file_names(&self, ino: Ino) -> Vec<(Ino, Vec<u8>)> {
        if !self.is_enabled() {
            return Vec::new();
        }
        self.lock().inodes.get(&ino).filter(|k| k.file).map(|k| k.names.clone()).unwrap_or_default()
    }

    /// Every recorded name of an inode other than a regular file: `(inode, parent, name)`
    /// (regular files are evicted by all their names instead, see `evict`).
    pub fn names_of_others(&self) -> Vec<(Ino, Ino, Vec<u8>)> {
        if !self.is_enabled() {
            return Vec::new();
        }
        let t = self.lock();
        t.inodes
            .iter()
            .filter(|(_, k)| !k.file)
            .flat_map(|(ino, k)| k.names.iter().map(move |(parent, name)| (*ino, *parent, name.clone())))
            .collect()
    }

    /// Every inode the kernel knows (by its lookup count).
    pub fn inodes(&self) -> Vec<Ino> {
        if !self.is_counting() {
            return Vec::new();
        }
        self.lock().inodes.keys().copied().collect()
    }

    /// The names to drop for another node's change of `ino` if it is a regular file (none for
    /// other kinds: dropping a directory's name would drop the kernel's whole cache below it);
    /// stamps the eviction (see `open_may_be_stale`).
    pub fn evict(&self, ino: Ino) -> Vec<(Ino, Vec<u8>)> {
        if !self.is_enabled() {
            return Vec::new();
        }
        let mut t = self.lock();
        let Some(known) = t.inodes.get_mut(&ino).filter(|k| k.file) else { return Vec::new() };
        known.evicted_at = Some(Instant::now());
        known.names.clone()
    }

    /// The ESTALE that `open_may_be_stale` asked for goes out now (it may have waited for a
    /// RELEASE first): its retry is owed from now on.
    pub fn estale_sent(&self, ino: Ino) {
        let now = Instant::now();
        self.lock().estale.entry(ino).or_insert((1, now)).1 = now;
    }

    /// Should an open of `ino` that arrived at `arrived` be answered ESTALE, so that the VFS
    /// looks the path up again and gets a fresh inode? Yes if the inode was evicted shortly
    /// before the open arrived or while it waited (the kernel may have resolved the path to the
    /// old inode first), unless an open of it was answered ESTALE just before and its retry has
    /// not come yet (this is the VFS's retry).
    pub fn open_may_be_stale(&self, ino: Ino, arrived: Instant) -> bool {
        if !self.is_enabled() {
            return false;
        }
        let mut t = self.lock();
        let raced = t.inodes.get(&ino).is_some_and(|known| {
            known.evicted_at.is_some_and(|at| at + Duration::from_millis(OPEN_RACE_MS) >= arrived)
        });
        if !raced {
            // Also the retry of an ESTALE when the kernel got a fresh inode for it (forgot the
            // old one, looked the name up again): nothing is owed any more.
            t.estale.remove(&ino);
            return false;
        }
        let now = Instant::now();
        let recent = |at: &Instant| now.duration_since(*at) < Duration::from_millis(ESTALE_RETRY_MS);
        t.estale.retain(|_, (_, at)| recent(at));
        if let Some((owed, _)) = t.estale.get_mut(&ino) {
            // The first raced open after an ESTALE is taken for its retry (a second ESTALE would
            // reach the caller), whatever evicted the inode meanwhile.
            *owed -= 1;
            if *owed == 0 {
                t.estale.remove(&ino);
            }
            return false;
        }
        let (owed, at) = t.estale.entry(ino).or_insert((0, now));
        *owed += 1;
        *at = now;
        true
    }

    /// Inodes recorded (for tests and status).
    pub fn len(&self) -> usize {
        self.lock().inodes.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_nothing_until_enabled() {
        let k = KernelNames::default();
        k.looked_up(5, 1, b"a", true);
        assert!(k.names(5).is_empty());
        assert_eq!(k.len(), 0);
    }

    #[test]
    fn knows_every_kind_it_gave_an_entry_for_until_forgotten() {
        let k = KernelNames::default();
        assert!(k.knows(7), "counts off: every inode may be known");
        k.enable_counts();
        assert!(k.knows(ROOT_INO), "the root needs no lookup");
        assert!(!k.knows(7));
        k.looked_up(7, ROOT_INO, b"dir", false);
        k.looked_up(7, ROOT_INO, b"dir", false);
        assert!(k.knows(7));
        assert!(k.names(7).is_empty(), "no names without the writeback cache");
        assert_eq!(k.inodes(), vec![7]);
        k.forget(7, 1);
        assert!(k.knows(7), "one lookup left");
        k.forget(7, 1);
        assert!(!k.knows(7));
        assert_eq!(k.len(), 0);
        // With names on, every kind gets its names recorded, but only a regular file's are
        // dropped by an eviction; the others are listed for a snapshot install.
        k.enable();
        k.looked_up(8, ROOT_INO, b"link", false);
        k.looked_up(9, ROOT_INO, b"file", true);
        assert!(k.knows(8) && k.knows(9));
        assert_eq!(k.names(8), vec![(ROOT_INO, b"link".to_vec())]);
        assert_eq!(k.names(9), vec![(ROOT_INO, b"file".to_vec())]);
        assert!(k.evict(8).is_empty() && k.file_names(8).is_empty(), "not a regular file");
        assert_eq!(k.file_names(9), vec![(ROOT_INO, b"file".to_vec())]);
        assert_eq!(k.evict(9), vec![(ROOT_INO, b"file".to_vec())]);
        assert_eq!(k.names_of_others(), vec![(8, ROOT_INO, b"link".to_vec())]);
    }

    #[test]
    fn counts_lookups_and_forgets_at_zero() {
        let k = KernelNames::default();
        k.enable();
        k.looked_up(5, 1, b"a", true);
        k.looked_up(5, 1, b"a", true);
        k.looked_up(5, 2, b"b", true);
        assert_eq!(k.names(5), vec![(1, b"a".to_vec()), (2, b"b".to_vec())]);
        k.forget(5, 2);
        assert_eq!(k.names(5).len(), 2, "one lookup left");
        k.forget(5, 1);
        assert!(k.names(5).is_empty());
        assert_eq!(k.len(), 0);
        k.forget(9, 3);
    }

    #[test]
    fn follows_renames_and_exchanges() {
        let k = KernelNames::default();
        k.enable();
        k.looked_up(5, 1, b"a", true);
        k.looked_up(6, 2, b"b", true);
        k.renamed(1, b"a", 3, b"c", false);
        assert_eq!(k.names(5), vec![(3, b"c".to_vec())]);
        k.renamed(3, b"c", 2, b"b", true);
        assert_eq!(k.names(5), vec![(2, b"b".to_vec())]);
        assert_eq!(k.names(6), vec![(3, b"c".to_vec())]);
        // A replacing rename: the replaced inode loses the name.
        k.renamed(2, b"b", 3, b"c", false);
        assert_eq!(k.names(5), vec![(3, b"c".to_vec())]);
        assert!(k.names(6).is_empty());
        k.forget(6, 1);
        k.forget(5, 1);
        assert_eq!(k.len(), 0);
        assert!(k.lock().by_name.is_empty());
    }

    #[test]
    fn an_open_racing_an_eviction_is_retried_once() {
        let k = KernelNames::default();
        k.enable();
        let before = Instant::now();
        assert!(!k.open_may_be_stale(5, before), "unknown inode");
        k.looked_up(5, 1, b"a", true);
        assert!(!k.open_may_be_stale(5, Instant::now()), "never evicted");
        assert_eq!(k.evict(5), vec![(1, b"a".to_vec())]);
        assert!(k.open_may_be_stale(5, before), "evicted after the open arrived");
        assert!(!k.open_may_be_stale(5, before), "the VFS's retry goes through");
        let long_after = Instant::now() + Duration::from_millis(OPEN_RACE_MS + 10);
        assert!(!k.open_may_be_stale(5, long_after), "evicted long before the open");
    }

    #[test]
    fn the_retry_passes_even_if_the_kernel_forgot_the_inode_in_between() {
        // Seen in the visibility benchmark: ESTALE, the kernel forgets the old inode, the retry's
        // lookup records it afresh, another remote change evicts it again before the retried
        // OPEN arrives. A second ESTALE would reach the application.
        let k = KernelNames::default();
        k.enable();
        let before = Instant::now();
        k.looked_up(5, 1, b"a", true);
        k.evict(5);
        assert!(k.open_may_be_stale(5, before));
        k.forget(5, 1);
        k.looked_up(5, 1, b"a", true);
        k.evict(5);
        assert!(!k.open_may_be_stale(5, before), "the VFS's retry goes through");
        // A later change races a later open: ESTALE again (the retry was consumed).
        k.evict(5);
        assert!(k.open_may_be_stale(5, Instant::now()), "a new race");
        assert!(!k.open_may_be_stale(5, Instant::now()), "and its retry");
    }

    #[test]
    fn bounds_names_per_inode() {
        let k = KernelNames::default();
        k.enable();
        for i in 0..(NAMES_PER_INODE_MAX as u64 + 5) {
            k.looked_up(5, 1, format!("n{i}").as_bytes(), true);
        }
        assert_eq!(k.names(5).len(), NAMES_PER_INODE_MAX);
    }
}

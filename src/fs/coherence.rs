//! Cross-node coherence of the kernel's caches (design decisions 7, 8, 16): a thread of its own
//! consumes the replica's `Applied` events, turns what other nodes' commands touched into FUSE
//! invalidations, hands remote orphans to the release logic, and publishes a watermark (the index
//! of the last event fully handled) that `open`/`opendir` wait for (close-to-open across nodes).
//! Only applies that touched something send an event, so this thread sleeps while the node only
//! runs its own commands; a waiter waits for the last event at or below the applied index
//! (`Replica::last_event_index`), not for the applied index itself.
//!
//! Why a dedicated OS thread: a notification is a synchronous write to /dev/fuse, and the kernel
//! takes the parent directory's lock for `inval_entry`/`delete` and page locks for `inval_inode`
//! (which may even send WRITEs to launder dirty pages). Such a write may block until a FUSE
//! request in flight finishes, so it must never run on a fuser worker (crate-notes pitfall 1:
//! deadlock) nor on a tokio worker (it would stall the tasks that answer those requests), and no
//! request path may wait for this thread while holding a directory lock (see `open` in mod.rs:
//! lookups do not wait for the watermark, only opens do).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use fuser::INodeNo;
use tokio::sync::watch;

use super::handles::Handles;
use super::names::KernelNames;
use crate::raft::{Applied, Replica, Touch};
use crate::state::Ino;

/// The page size of the kernel's page cache: a store of a file's last page starts here.
const STORE_PAGE_BYTES: u64 = 4096;

/// The watermark once nothing is tracked any more (the replica closed the event channel, or
/// never delivers events): waits pass at once rather than hang.
pub const WATERMARK_UNTRACKED: u64 = u64::MAX;
/// How long an open waits for the invalidations of entries already applied before it answers
/// anyway (with a warning): bounds the damage of a kernel notification stuck on a lock.
pub const INVAL_WAIT_MS: u64 = 5_000;
/// How long a gap between the applied index and the watermark may last while the thread is idle
/// (no event in the channel) before a waiter gives up on it: entries applied without an event
/// (a snapshot install) would otherwise stall every open for `INVAL_WAIT_MS`.
const IDLE_GAP_MS: u64 = 100;

/// One kernel notification, free of fuser types (so the mapping can be tested without a mount).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Forget the dentry `name` in `parent` (the next path walk looks it up again).
    Entry { parent: Ino, name: Vec<u8> },
    /// `name` in `parent`, which named `child`, is gone: drop the dentry and tell inotify.
    Delete { parent: Ino, child: Ino, name: Vec<u8> },
    /// Attributes and the whole page cache of `ino`.
    Inode(Ino),
}

/// What one `Applied` event asks of this node.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In order: entry notices first (in log order), then each touched inode once.
    pub notices: Vec<Notice>,
    /// Inodes other nodes' commands turned into orphans that this node must release.
    pub orphans: Vec<Ino>,
    /// The state was replaced as a whole (snapshot install): every regular file the kernel
    /// caches is evicted (names and directories expire with their TTL).
    pub everything: bool,
}

/// Map the touches of one `Applied` event to notifications. `name_now(parent, name)` tells which
/// inode the name has in the local replica now (after the event), `linked(ino)` whether an inode
/// still has a name (exists with a link count above zero). A name that is gone and whose inode
/// is gone or unlinked gets a `Delete`; every other change an `Entry`. A renamed (still linked)
/// inode must not get a `Delete`: the kernel clears its link count and marks a directory dead
/// (S_DEAD), which would break it under its new name on this node.
/// The parent directory's attributes (mtime, size, nlink) and a replaced or removed inode's (nlink,
/// ctime) changed too, so those inodes are invalidated as well.
pub fn plan(
    touched: &[Touch],
    mut name_now: impl FnMut(Ino, &[u8]) -> Option<Ino>,
    mut linked: impl FnMut(Ino) -> bool,
) -> Plan {
    let mut out = Plan::default();
    let mut inodes: Vec<Ino> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut inode = |ino: Ino, inodes: &mut Vec<Ino>| {
        if seen.insert(ino) {
            inodes.push(ino);
        }
    };
    for touch in touched {
        match touch {
            Touch::Inode(ino) => inode(*ino, &mut inodes),
            Touch::Entry { parent, name, old } => {
                match (old, name_now(*parent, name)) {
                    (Some(child), None) if !linked(*child) => {
                        out.notices.push(Notice::Delete { parent: *parent, child: *child, name: name.clone() })
                    }
                    _ => out.notices.push(Notice::Entry { parent: *parent, name: name.clone() }),
                }
                inode(*parent, &mut inodes);
                if let Some(old) = old {
                    inode(*old, &mut inodes);
                }
            }
            Touch::Orphan(ino) => {
                if !out.orphans.contains(ino) {
                    out.orphans.push(*ino);
                }
            }
            Touch::Everything => out.everything = true,
        }
    }
    out.notices.extend(inodes.into_iter().map(Notice::Inode));
    out
}

/// With the writeback cache the kernel keeps its own size, mtime and ctime of a cached regular
/// file whatever it is told (see fs/names.rs): after each `Inode` notice, also drop every name
/// the kernel knows the inode by, so that it evicts the inode once unused and the next lookup
/// reads the replica's attributes. `names(ino)` gives those names (none for other kinds).
pub fn with_evictions(notices: Vec<Notice>, mut names: impl FnMut(Ino) -> Vec<(Ino, Vec<u8>)>) -> Vec<Notice> {
    let mut out = Vec::with_capacity(notices.len());
    for notice in notices {
        let ino = match notice {
            Notice::Inode(ino) => Some(ino),
            _ => None,
        };
        out.push(notice);
        if let Some(ino) = ino {
            out.extend(names(ino).into_iter().map(|(parent, name)| Notice::Entry { parent, name }));
        }
    }
    out
}

/// The recorded names (`(inode, parent, name)`, see `KernelNames::names_of_others`) that no
/// longer lead to their inode in the replica (`name_now`), as entry touches naming that inode as
/// the old one, for `plan`.
pub fn stale_names(recorded: Vec<(Ino, Ino, Vec<u8>)>, mut name_now: impl FnMut(Ino, &[u8]) -> Option<Ino>) -> Vec<Touch> {
    recorded
        .into_iter()
        .filter(|(ino, parent, name)| name_now(*parent, name) != Some(*ino))
        .map(|(ino, parent, name)| Touch::Entry { parent, name, old: Some(ino) })
        .collect()
}

/// Whether a touch can lead to a notice the kernel needs (see `plan` and `for_kernel`): an entry
/// through its directory or the inode it named before, an inode through itself. Orphans and a
/// snapshot install are always handled.
pub fn wanted(touch: &Touch, knows: impl Fn(Ino) -> bool) -> bool {
    match touch {
        Touch::Inode(ino) => knows(*ino),
        Touch::Entry { parent, old, .. } => knows(*parent) || old.is_some_and(&knows),
        Touch::Orphan(_) | Touch::Everything => true,
    }
}

/// Drop the notices about what the kernel cannot hold: an inode it does not know, a name in a
/// directory it does not know (see fs/names.rs). The kernel would answer each with ENOENT, after
/// a write to /dev/fuse and a lookup of its inode table.
pub fn for_kernel(mut notices: Vec<Notice>, knows: impl Fn(Ino) -> bool) -> Vec<Notice> {
    notices.retain(|n| match n {
        Notice::Entry { parent, .. } | Notice::Delete { parent, .. } => knows(*parent),
        Notice::Inode(ino) => knows(*ino),
    });
    notices
}

/// The shared side of the coherence thread: the session's notifier, the watermark, counters.
pub struct Coherence {
    /// Set by `mount` once the session exists; before that the kernel caches nothing of ours.
    pub notifier: Arc<OnceLock<fuser::Notifier>>,
    watermark: watch::Sender<u64>,
    /// The thread is waiting for the next event (the channel is empty).
    idle: std::sync::atomic::AtomicBool,
    /// Notifications the kernel refused (other than ENOENT, which fuser maps to success).
    pub failures: AtomicU64,
    /// Notifications sent.
    pub sent: AtomicU64,
    /// The names the kernel knows regular files by (recorded only with the writeback cache in a
    /// cluster).
    pub names: KernelNames,
}

impl Default for Coherence {
    fn default() -> Self {
        Coherence {
            notifier: Arc::default(),
            watermark: watch::Sender::new(0),
            idle: std::sync::atomic::AtomicBool::new(false),
            failures: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            names: KernelNames::default(),
        }
    }
}

impl Coherence {
    /// The last log index whose remote changes the kernel has been told about.
    pub fn watermark(&self) -> u64 {
        *self.watermark.borrow()
    }

    fn advance(&self, index: u64) {
        self.watermark.send_if_modified(|w| {
            let newer = index > *w;
            if newer {
                *w = index;
            }
            newer
        });
    }

    /// Wait until every entry up to `index` has been handled, at most `INVAL_WAIT_MS`, or until
    /// the gap has lasted `IDLE_GAP_MS` with no event left to handle. Returns whether the
    /// watermark was reached.
    pub async fn wait_for(&self, index: u64) -> bool {
        if self.watermark() >= index {
            return true;
        }
        let mut rx = self.watermark.subscribe();
        let start = tokio::time::Instant::now();
        let mut idle_since: Option<tokio::time::Instant> = None;
        loop {
            match tokio::time::timeout(Duration::from_millis(IDLE_GAP_MS), rx.wait_for(|w| *w >= index)).await {
                // A closed channel cannot happen while `self` lives; treat it as reached.
                Ok(_) => return true,
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    if self.idle.load(Ordering::Acquire) {
                        let since = *idle_since.get_or_insert(now);
                        if now - since >= Duration::from_millis(IDLE_GAP_MS) {
                            tracing::debug!(index, watermark = self.watermark(), "entries applied without an event: not waiting for them");
                            return false;
                        }
                    } else {
                        idle_since = None;
                    }
                    if now - start >= Duration::from_millis(INVAL_WAIT_MS) {
                        tracing::warn!(index, watermark = self.watermark(), "kernel cache invalidation lags: answering anyway");
                        return false;
                    }
                }
            }
        }
    }

    /// Make the kernel drop what it caches of regular file `ino` (attributes, pages and every
    /// name we know it by), so it evicts the inode once nothing holds it. Blocking: call it from
    /// a thread that may block (not a fuser worker, not a tokio worker).
    pub fn evict(&self, ino: Ino) {
        let Some(notifier) = self.notifier.get() else { return };
        for notice in with_evictions(vec![Notice::Inode(ino)], |ino| self.names.file_names(ino)) {
            self.send(notifier, &notice);
        }
    }

    /// Send one notice; ENOENT (nothing cached) is success. Never fatal: a failure is logged and
    /// counted, and the kernel entry times out with its TTL anyway.
    fn send(&self, notifier: &fuser::Notifier, notice: &Notice) {
        let result = match notice {
            Notice::Entry { parent, name } => notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name)),
            Notice::Delete { parent, child, name } => {
                let name = OsStr::from_bytes(name);
                // `delete` fails (ENOTEMPTY) when the kernel still caches children of a removed
                // directory, or when its dentry names another inode: then plain invalidation.
                notifier
                    .delete(INodeNo(*parent), INodeNo(*child), name)
                    .or_else(|_| notifier.inval_entry(INodeNo(*parent), name))
            }
            // Offset 0, length 0: attributes and the page cache from offset 0 to the end
            // (a negative offset would invalidate attributes only).
            Notice::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
        };
        self.sent.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = result {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(?notice, error = %e, "kernel cache invalidation failed");
        }
    }
}

/// What the coherence thread calls for a remote orphan (on the runtime, asynchronously).
pub type OrphanHook = Arc<dyn Fn(Ino) + Send + Sync>;

/// Start the coherence thread on the replica's `Applied` events. Subscribes first and then reads
/// the applied index, so the watermark starts at an index whose events are either already handled
/// (nothing of ours was cached before) or still in the channel. The thread holds the replica
/// weakly and ends when the event channel closes; then the watermark becomes
/// `WATERMARK_UNTRACKED`.
pub fn start(
    replica: &Arc<Replica>,
    coherence: Arc<Coherence>,
    handles: Arc<Handles>,
    on_orphan: OrphanHook,
) -> std::io::Result<()> {
    // Only what the kernel may hold needs a notice (fs/names.rs): other touches are dropped
    // before they wake this thread. Orphans and a snapshot install always come.
    let kernel = coherence.clone();
    let mut rx = replica.subscribe_applied(move |touch| wanted(touch, |ino| kernel.names.knows(ino)));
    coherence.advance(replica.applied_index().unwrap_or(0));
    let weak: Weak<Replica> = Arc::downgrade(replica);
    std::thread::Builder::new().name("pickbox-inval".into()).spawn(move || {
        loop {
            coherence.idle.store(true, Ordering::Release);
            let Some(applied) = rx.blocking_recv() else { break };
            coherence.idle.store(false, Ordering::Release);
            // Tests: the kernel told of other nodes' changes late (a busy node).
            #[cfg(feature = "failpoints")]
            fail::fail_point!("coherence-event");
            handle(&weak, &coherence, &handles, &on_orphan, &applied);
            coherence.advance(applied.index);
        }
        tracing::debug!("applied-event channel closed: cache invalidation stops");
        coherence.advance(WATERMARK_UNTRACKED);
    })?;
    Ok(())
}

fn handle(replica: &Weak<Replica>, coherence: &Coherence, handles: &Handles, on_orphan: &OrphanHook, applied: &Applied) {
    if applied.touched.is_empty() {
        return;
    }
    let Some(replica) = replica.upgrade() else { return };
    let view = match replica.read() {
        Ok(view) => Some(view),
        Err(fault) => {
            // Without a view every removed name is invalidated instead of deleted: still coherent.
            tracing::error!(%fault, "cannot read the replica for cache invalidation");
            None
        }
    };
    let name_now = |parent: Ino, name: &[u8]| view.as_ref().and_then(|v| v.entry(parent, name).ok().flatten()).map(|e| e.ino);
    // A snapshot install says nothing of what changed: every name of a directory, symlink or
    // other non-file the kernel was given that no longer leads to its inode counts as a changed
    // entry (regular files are evicted whole below, by all their names). Without a view every
    // such name counts as changed (an invalidation is always safe).
    let stale = if applied.touched.contains(&Touch::Everything) {
        stale_names(coherence.names.names_of_others(), name_now)
    } else {
        Vec::new()
    };
    let touched: std::borrow::Cow<'_, [Touch]> = if stale.is_empty() {
        std::borrow::Cow::Borrowed(&applied.touched)
    } else {
        std::borrow::Cow::Owned(applied.touched.iter().cloned().chain(stale).collect())
    };
    let plan = plan(
        &touched,
        name_now,
        // Without an answer, assume linked: an `Entry` is always safe.
        |ino| match view.as_ref().map(|v| v.inode(ino)) {
            Some(Ok(None)) => false,
            Some(Ok(Some(inode))) => inode.nlink > 0,
            None | Some(Err(_)) => true,
        },
    );
    drop(view);
    let mut notices = plan.notices;
    if plan.everything {
        notices.extend(coherence.names.inodes().into_iter().map(Notice::Inode));
    }
    let notices = if coherence.names.is_enabled() {
        with_evictions(notices, |ino| {
            let names = coherence.names.evict(ino);
            // Held open here, the inode cannot be evicted now, and a lookup before its last
            // close would bind a new dentry to it with the old size: evict again at that close.
            if !names.is_empty() {
                handles.mark_stale_if_open(ino);
            }
            names
        })
    } else {
        notices
    };
    let notices = for_kernel(notices, |ino| coherence.names.knows(ino));
    // A regular file held open here keeps the kernel's size under the writeback cache (it
    // ignores the size we report; the inode cannot be evicted while open). Where another node
    // made it longer, store the file's last page (up to its end) into the kernel's cache with
    // FUSE_NOTIFY_STORE, which raises the kernel's size to that end (never lowers it: a store
    // that writes nothing changes no size), so a reader that keeps the file open (`tail -f`, a
    // lock holder) sees what was appended. Not for a file open for writing here: the kernel may
    // hold dirty bytes of that page, which the store would overwrite.
    let grown: Vec<(Ino, u64, Vec<u8>)> = if coherence.names.is_enabled() {
        let mut open: Vec<Ino> = applied
            .touched
            .iter()
            .filter_map(|t| if let Touch::Inode(ino) = t { Some(*ino) } else { None })
            .filter(|i| handles.is_open(*i) && !handles.is_open_for_write(*i))
            .collect();
        open.sort_unstable();
        open.dedup();
        match (open.is_empty(), replica.read()) {
            (false, Ok(view)) => open
                .into_iter()
                .filter_map(|ino| match view.inode(ino) {
                    Ok(Some(inode)) if inode.kind == crate::state::FileKind::File && inode.size > 0 => {
                        let start = (inode.size - 1) / STORE_PAGE_BYTES * STORE_PAGE_BYTES;
                        match crate::state::read_range(&*view, &inode, start, inode.size - start) {
                            Ok(Ok(tail)) => Some((ino, start, tail)),
                            _ => None,
                        }
                    }
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    } else {
        Vec::new()
    };
    if let Some(notifier) = coherence.notifier.get() {
        for notice in &notices {
            coherence.send(notifier, notice);
        }
        for (ino, start, tail) in grown {
            coherence.sent.fetch_add(1, Ordering::Relaxed);
            let end = start + tail.len() as u64;
            tracing::debug!(ino, end, "storing the last page of a file open here (its size)");
            if let Err(e) = notifier.store(INodeNo(ino), start, &tail) {
                coherence.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(ino, end, error = %e, "telling the kernel the new size of an open file failed");
            }
        }
    }
    for ino in plan.orphans {
        on_orphan(ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(parent: Ino, name: &str, old: Option<Ino>) -> Touch {
        Touch::Entry { parent, name: name.as_bytes().to_vec(), old }
    }

    #[test]
    fn maps_touches_to_notices() {
        // A remote rename a -> b over an existing b (inode 9), in directory 1; a write to 7;
        // an orphan 9 (b's old inode was open somewhere); a create of c; an unlink of d (11).
        let touched = vec![
            entry(1, "a", Some(7)),
            entry(1, "b", Some(9)),
            Touch::Inode(7),
            Touch::Orphan(9),
            entry(1, "c", None),
            Touch::Orphan(9),
            entry(1, "d", Some(11)),
        ];
        let now = |parent: Ino, name: &[u8]| match (parent, name) {
            (1, b"b") => Some(7),
            (1, b"c") => Some(10),
            _ => None,
        };
        // 7 was renamed (still linked), 9 and 11 lost their last name.
        let p = plan(&touched, now, |ino| ino == 7 || ino == 10);
        assert_eq!(
            p.notices,
            vec![
                Notice::Entry { parent: 1, name: b"a".to_vec() },
                Notice::Entry { parent: 1, name: b"b".to_vec() },
                Notice::Entry { parent: 1, name: b"c".to_vec() },
                Notice::Delete { parent: 1, child: 11, name: b"d".to_vec() },
                Notice::Inode(1),
                Notice::Inode(7),
                Notice::Inode(9),
                Notice::Inode(11),
            ]
        );
        assert_eq!(p.orphans, vec![9]);
    }

    #[test]
    fn inode_notices_are_followed_by_the_names_to_evict() {
        let notices = vec![Notice::Entry { parent: 1, name: b"x".to_vec() }, Notice::Inode(5), Notice::Inode(6)];
        let out = with_evictions(notices, |ino| if ino == 5 { vec![(1, b"a".to_vec()), (2, b"b".to_vec())] } else { vec![] });
        assert_eq!(
            out,
            vec![
                Notice::Entry { parent: 1, name: b"x".to_vec() },
                Notice::Inode(5),
                Notice::Entry { parent: 1, name: b"a".to_vec() },
                Notice::Entry { parent: 2, name: b"b".to_vec() },
                Notice::Inode(6),
            ]
        );
    }

    #[test]
    fn names_that_a_snapshot_install_changed_are_invalidated() {
        // Recorded: directory 7 as "a" in the root, symlink 8 as "l", directory 9 as "d" in 7.
        // Installed: 7 renamed to "b", "l" removed (8 gone), "d" unchanged.
        let recorded = vec![(7, 1, b"a".to_vec()), (8, 1, b"l".to_vec()), (9, 7, b"d".to_vec())];
        let now = |parent: Ino, name: &[u8]| match (parent, name) {
            (1, b"b") => Some(7),
            (7, b"d") => Some(9),
            _ => None,
        };
        let stale = stale_names(recorded, now);
        assert_eq!(stale, vec![entry(1, "a", Some(7)), entry(1, "l", Some(8))]);
        let p = plan(&stale, now, |ino| ino == 7 || ino == 9);
        assert_eq!(
            p.notices,
            vec![
                // Renamed: still linked, so no Delete (which would kill it under its new name).
                Notice::Entry { parent: 1, name: b"a".to_vec() },
                Notice::Delete { parent: 1, child: 8, name: b"l".to_vec() },
                Notice::Inode(1),
                Notice::Inode(7),
                Notice::Inode(8),
            ]
        );
    }

    #[test]
    fn a_snapshot_install_asks_for_everything() {
        let p = plan(&[Touch::Everything], |_, _| None, |_| true);
        assert!(p.everything);
        assert!(p.notices.is_empty());
        assert!(!plan(&[Touch::Inode(3)], |_, _| None, |_| true).everything);
    }

    #[test]
    fn notices_about_what_the_kernel_does_not_hold_are_dropped() {
        let notices = vec![
            Notice::Entry { parent: 1, name: b"a".to_vec() },
            Notice::Entry { parent: 5, name: b"b".to_vec() },
            Notice::Delete { parent: 5, child: 9, name: b"c".to_vec() },
            Notice::Delete { parent: 6, child: 9, name: b"d".to_vec() },
            Notice::Inode(5),
            Notice::Inode(9),
        ];
        let kept = for_kernel(notices, |ino| ino == 1 || ino == 6 || ino == 9);
        assert_eq!(
            kept,
            vec![
                Notice::Entry { parent: 1, name: b"a".to_vec() },
                Notice::Delete { parent: 6, child: 9, name: b"d".to_vec() },
                Notice::Inode(9),
            ],
            "a name counts by its directory, an inode by itself"
        );
    }

    #[test]
    fn only_touches_that_can_lead_to_a_needed_notice_are_wanted() {
        let knows = |ino: Ino| ino == 1 || ino == 7;
        assert!(wanted(&Touch::Inode(7), knows));
        assert!(!wanted(&Touch::Inode(8), knows));
        assert!(wanted(&entry(1, "a", None), knows), "a name in a directory the kernel holds");
        assert!(!wanted(&entry(5, "a", None), knows));
        assert!(wanted(&entry(5, "a", Some(7)), knows), "it replaced or removed an inode the kernel holds");
        assert!(!wanted(&entry(5, "a", Some(8)), knows));
        assert!(wanted(&Touch::Orphan(8), knows));
        assert!(wanted(&Touch::Everything, knows));
    }

    #[test]
    fn nothing_touched_nothing_sent() {
        assert_eq!(plan(&[], |_, _| None, |_| true), Plan::default());
    }

    #[tokio::test]
    async fn watermark_waits_and_is_monotone() {
        let c = Arc::new(Coherence::default());
        c.advance(5);
        assert!(c.wait_for(5).await);
        c.advance(3);
        assert_eq!(c.watermark(), 5);
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.wait_for(8).await }
        });
        c.advance(8);
        assert!(tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("resolves").unwrap());
        c.advance(WATERMARK_UNTRACKED);
        assert!(c.wait_for(1 << 60).await);
    }

    #[tokio::test]
    async fn an_idle_gap_is_not_waited_for() {
        // Entries applied without an event (a snapshot install) leave a gap nobody will close.
        let c = Coherence::default();
        c.idle.store(true, Ordering::Release);
        let start = std::time::Instant::now();
        assert!(!c.wait_for(10).await);
        assert!(start.elapsed() < Duration::from_millis(INVAL_WAIT_MS));
    }
}

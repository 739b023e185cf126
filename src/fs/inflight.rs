//! Writes in flight per inode, so that flush and fsync can be barriers (design decision 18).
//!
//! A write is registered on the fuser worker thread, before its proposal is spawned, and finishes
//! when its reply is sent. `barrier(ino)` covers exactly the writes registered before it: it
//! resolves once each of them has finished, whatever writes start later (no starvation by a
//! steady writer). With the writeback cache the kernel already waits for the replies of the dirty
//! pages it sends before FLUSH/FSYNC (`write_inode_now`, `fuse_sync_writes`), so the barrier
//! normally finds nothing in flight and costs one map lookup.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::state::Ino;

struct Pending {
    /// Tickets of writes still in flight.
    open: BTreeSet<u64>,
    /// Pinged whenever one of them finishes.
    done: watch::Sender<()>,
}

#[derive(Default)]
struct Table {
    /// The next ticket number (shared by all inodes, so numbers never restart).
    next: u64,
    inodes: HashMap<Ino, Pending>,
}

#[derive(Default)]
pub struct InFlight {
    table: Mutex<Table>,
}

/// One write in flight; finishing it (or dropping it, for example in a panicking task) ends it.
pub struct Ticket {
    owner: Arc<InFlight>,
    ino: Ino,
    n: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.owner.lock();
        if let Some(p) = t.inodes.get_mut(&self.ino) {
            p.open.remove(&self.n);
            if p.open.is_empty() {
                // Dropping the sender wakes every waiter; they then find no entry.
                t.inodes.remove(&self.ino);
            } else {
                p.done.send_replace(());
            }
        }
    }
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table stays consistent under a panic (each update is a single insert or remove).
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Register a write to `ino`; it is in flight until the ticket is dropped.
    pub fn start(self: &Arc<Self>, ino: Ino) -> Ticket {
        let mut t = self.lock();
        let n = t.next;
        t.next += 1;
        let p = t.inodes.entry(ino).or_insert_with(|| Pending { open: BTreeSet::new(), done: watch::Sender::new(()) });
        p.open.insert(n);
        Ticket { owner: Arc::clone(self), ino, n }
    }

    /// `None` if no write to `ino` is in flight; otherwise a future that resolves once every write
    /// to `ino` registered before this call has finished.
    pub fn barrier(self: &Arc<Self>, ino: Ino) -> Option<impl Future<Output = ()> + Send + 'static> {
        let upto = {
            let t = self.lock();
            t.inodes.get(&ino)?;
            t.next
        };
        let me = Arc::clone(self);
        Some(async move {
            loop {
                let mut rx = {
                    let t = me.lock();
                    match t.inodes.get(&ino) {
                        Some(p) if p.open.first().is_some_and(|&first| first < upto) => p.done.subscribe(),
                        _ => return,
                    }
                };
                // An error means the sender is gone (nothing in flight any more): look again.
                let _ = rx.changed().await;
            }
        })
    }

    /// Whether any write is in flight.
    pub fn any(&self) -> bool {
        !self.lock().inodes.is_empty()
    }

    /// How many writes to `ino` are in flight (for tests).
    #[cfg(test)]
    pub fn count(&self, ino: Ino) -> usize {
        self.lock().inodes.get(&ino).map_or(0, |p| p.open.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn barrier_waits_for_earlier_writes_only() {
        let w = Arc::new(InFlight::default());
        assert!(w.barrier(5).is_none());
        let a = w.start(5);
        let b = w.start(5);
        let other = w.start(6);
        let barrier = tokio::spawn(w.barrier(5).expect("writes in flight"));
        let later = w.start(5); // started after the barrier: not waited for
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!barrier.is_finished(), "b is still in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), barrier).await.expect("barrier resolves").unwrap();
        assert_eq!(w.count(5), 1);
        drop((later, other));
        assert_eq!(w.count(5), 0);
        assert!(w.barrier(5).is_none());
    }
}

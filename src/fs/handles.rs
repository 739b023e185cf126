//! Open file handles of this node: fh -> (ino, open flags), and how often each inode is open.
//!
//! The open count decides `origin_open` of unlink/rename (the inode becomes an orphan instead of
//! being freed) and when this node releases an orphan (its last close).

use std::collections::HashMap;
use std::sync::Mutex;

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
}

fn writes(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY
}

#[derive(Default)]
pub struct Handles {
    table: Mutex<Table>,
}

impl Handles {
    /// Record an open of `ino`; returns the new file handle (never 0).
    pub fn open(&self, ino: Ino, flags: i32) -> u64 {
        let mut t = self.lock();
        t.next_fh += 1;
        let fh = t.next_fh;
        t.handles.insert(fh, Handle { ino, flags });
        *t.open.entry(ino).or_insert(0) += 1;
        if writes(flags) {
            *t.writers.entry(ino).or_insert(0) += 1;
        }
        fh
    }

    /// Forget `fh`. Returns the inode and whether this was its last open handle on this node.
    pub fn release(&self, fh: u64) -> Option<(Ino, bool)> {
        let mut t = self.lock();
        let handle = t.handles.remove(&fh)?;
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
}

//! Who is calling: the request's uid/gid/pid plus the supplementary groups from /proc.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::state::Caller;

/// Most supplementary groups we carry in a command (Linux NGROUPS_MAX).
const GROUPS_MAX: usize = 65_536;
/// How long the groups read for one (pid, uid, gid) are reused. Reading /proc/PID/status costs
/// about 9 syscalls per request (4.6% CPU in a create loop); a process that issues many requests
/// in a row reads it once. A process that changes its supplementary groups without changing its
/// (fs)uid or gid is seen with its old groups for at most this long; a privilege drop that also
/// changes uid or gid (setgroups + setgid + setuid, the usual order) is a different key at once.
const GROUPS_CACHE_TTL_MS: u64 = 100;
/// Buffer for one read of /proc/PID/status (about 1.4 KB; a longer one is read on).
const STATUS_READ_BYTES: usize = 4096;
/// Most (pid, uid, gid) keys kept; when full, expired ones are dropped, then everything.
const GROUPS_CACHE_ENTRIES_MAX: usize = 1024;

/// Cached groups: (pid, uid, gid) -> (when read, groups).
type GroupsCache = HashMap<(u32, u32, u32), (Instant, Vec<u32>)>;

fn cache() -> &'static Mutex<GroupsCache> {
    static CACHE: OnceLock<Mutex<GroupsCache>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The caller of a request. `with_groups` reads `/proc/PID/status`; use it where group membership
/// decides the outcome (creating, changing attributes, namespace changes), not on the write path.
pub fn caller(uid: u32, gid: u32, pid: u32, with_groups: bool) -> Caller {
    let groups = if with_groups && pid != 0 { cached_groups(pid, uid, gid) } else { Vec::new() };
    Caller { uid, gid, groups, pid }
}

/// `groups_of(pid)`, reused for `GROUPS_CACHE_TTL_MS` per (pid, uid, gid). A key that includes
/// the request's uid and gid means a process that changed them (or a reused pid of another
/// user) is read afresh; the TTL bounds how long a reused pid of the same user or a bare
/// setgroups(2) can go unnoticed.
fn cached_groups(pid: u32, uid: u32, gid: u32) -> Vec<u32> {
    let ttl = Duration::from_millis(GROUPS_CACHE_TTL_MS);
    let key = (pid, uid, gid);
    let lock = || cache().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((at, groups)) = lock().get(&key) {
        if at.elapsed() < ttl {
            return groups.clone();
        }
    }
    // Read outside the lock: other requests need not wait for this one's /proc read.
    let groups = groups_of(pid);
    let mut c = lock();
    if c.len() >= GROUPS_CACHE_ENTRIES_MAX {
        c.retain(|_, (at, _)| at.elapsed() < ttl);
        if c.len() >= GROUPS_CACHE_ENTRIES_MAX {
            c.clear();
        }
    }
    c.insert(key, (Instant::now(), groups.clone()));
    groups
}

/// The supplementary groups of process `pid` (empty if it is gone or unreadable).
fn groups_of(pid: u32) -> Vec<u32> {
    use std::io::Read;
    // A /proc file reports size 0, so `read_to_string` would probe with growing reads (32, 32,
    // 64, ... bytes: 8 system calls for a 1.4 KB status); one 4 KiB buffer takes it in one.
    let mut status = Vec::with_capacity(STATUS_READ_BYTES);
    match std::fs::File::open(format!("/proc/{pid}/status")).and_then(|mut f| f.read_to_end(&mut status)) {
        Ok(_) => parse_groups(&String::from_utf8_lossy(&status)),
        Err(_) => Vec::new(),
    }
}

/// The `Groups:` line of a /proc status file.
fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|rest| rest.split_whitespace().filter_map(|g| g.parse().ok()).take(GROUPS_MAX).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_groups_line() {
        let status = "Name:\tbash\nUid:\t0\t0\t0\t0\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups("Name: x\n"), Vec::<u32>::new());
    }

    #[test]
    fn reads_own_process() {
        let me = caller(0, 0, std::process::id(), true);
        assert_eq!(me.pid, std::process::id());
        assert_eq!(me.groups, groups_of(std::process::id()), "cached read equals a fresh one");
        assert_eq!(caller(0, 0, std::process::id(), true).groups, me.groups);
        assert!(caller(0, 0, 0, true).groups.is_empty(), "no pid, no groups");
    }

    #[test]
    fn cache_stays_bounded() {
        let pid = std::process::id();
        for uid in 0..(GROUPS_CACHE_ENTRIES_MAX as u32 + 10) {
            cached_groups(pid, uid, 424_242);
        }
        assert!(cache().lock().unwrap().len() <= GROUPS_CACHE_ENTRIES_MAX);
    }
}

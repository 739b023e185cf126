//! Who is calling: the request's uid/gid/pid plus the supplementary groups from /proc.

use crate::state::Caller;

/// Most supplementary groups we carry in a command (Linux NGROUPS_MAX).
const GROUPS_MAX: usize = 65_536;

/// The caller of a request. `with_groups` reads `/proc/PID/status`; use it where group membership
/// decides the outcome (creating, changing attributes, namespace changes), not on the write path.
pub fn caller(uid: u32, gid: u32, pid: u32, with_groups: bool) -> Caller {
    let groups = if with_groups && pid != 0 { groups_of(pid) } else { Vec::new() };
    Caller { uid, gid, groups, pid }
}

/// The supplementary groups of process `pid` (empty if it is gone or unreadable).
fn groups_of(pid: u32) -> Vec<u32> {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => parse_groups(&status),
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
    }
}

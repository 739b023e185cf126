//! A full disk in a cluster: node 3's data dir is a small tmpfs, writes go through node 1 (whose
//! disk has room, so its own "nearly full" check never refuses them) until the replicated entries
//! fill node 3's store. Node 3 must stop (fail-stop) with its replica intact, nodes 1 and 2 must
//! go on, and node 3 must come back on a larger disk and converge.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::cluster::write_synced;
use crate::cluster_harness::{poll, Cluster, ClusterOptions, CONVERGE_TIMEOUT, VISIBLE_TIMEOUT};
use crate::harness::is_mounted;

const MIB: u64 = 1024 * 1024;
/// Node 3's data tmpfs: room to join and take some files, but less than the proposer-side
/// reserve (`SPACE_RESERVE_BYTES`, 64 MiB, src/fs/ops.rs), so that only replicated entries fill it.
const NODE3_TMPFS_BYTES: u64 = 48 * MIB;
/// Node 3's data tmpfs after the test enlarges it: room for everything the test writes.
const NODE3_TMPFS_LARGER_BYTES: u64 = 512 * MIB;
/// One file the test writes; distinct random content, so that no block is deduplicated.
const FILE_BYTES: usize = MIB as usize;
/// Files written through node 1 at most before node 3 must have stopped (a bound on the loop:
/// each file takes at least FILE_BYTES of node 3's tmpfs, twice that counting the log).
const FILL_FILES_MAX: u64 = 3 * NODE3_TMPFS_BYTES / MIB;
/// Files written through node 1 after node 3 stopped, each acknowledged by nodes 1 and 2.
const AFTER_FILES: u64 = 4;
/// How long node 3 may take to stop once its store failed (it notices on its own, no request).
const FAIL_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `len` bytes of xorshift64 output from `seed`: a different, incompressible content per seed.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Free bytes of the filesystem holding `p`.
fn free_bytes(p: &Path) -> u64 {
    let c = crate::harness::cstr(p);
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    crate::harness::check(unsafe { libc::statvfs(c.as_ptr(), &mut st) }).expect("statvfs");
    st.f_bavail as u64 * st.f_frsize as u64
}

/// The first line of `log` that contains `what`, or a note that none does.
fn first_line(log: &str, what: &str) -> String {
    log.lines().find(|l| l.contains(what)).map_or_else(|| format!("(no line with {what:?})"), str::to_string)
}

/// `mount -o remount,size=BYTES DIR`: grows a tmpfs in place, keeping its files.
fn resize_tmpfs(dir: &Path, bytes: u64) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,size={bytes}")])
        .arg(dir)
        .status()
        .expect("run mount -o remount");
    assert!(st.success(), "mount -o remount,size={bytes} {} failed: {st}", dir.display());
}

// A store fault on a replicated entry fails no local request: the node must notice that Raft
// stopped (node.rs `serve`, `Replica::raft_stopped`) and stop itself.
#[test]
fn cluster_disk_full_node_stops_and_rejoins() {
    let started = Instant::now();
    let mut c = Cluster::with(ClusterOptions {
        data_tmpfs: [(3, NODE3_TMPFS_BYTES)].into(),
        ..ClusterOptions::default()
    });
    let keep = random_bytes(FILE_BYTES, 0);
    write_synced(&c.path(1, "keep"), &keep).unwrap();
    c.wait_converged(CONVERGE_TIMEOUT);
    let data3 = c.node(3).data.clone();
    eprintln!("cluster up after {:?}; node 3 data tmpfs has {} MiB free", started.elapsed(), free_bytes(&data3) / MIB);

    // Fill node 3's disk with entries replicated from node 1.
    let fill_started = Instant::now();
    let mut written = 0u64;
    let exit = loop {
        if let Some(status) = c.node(3).wait_exit(Duration::ZERO) {
            break status;
        }
        if written >= FILL_FILES_MAX {
            // Node 3 did not stop during the writes: give it the fail-stop timeout to notice.
            let status = c.node(3).wait_exit(FAIL_STOP_TIMEOUT);
            let free = free_bytes(&data3);
            let first_fault = first_line(&c.node(3).log(), "storage fault");
            break status.unwrap_or_else(|| {
                panic!(
                    "node 3 still runs {FAIL_STOP_TIMEOUT:?} after {written} MiB were written through node 1 \
                     ({} KiB free on its disk); its first storage fault: {first_fault}",
                    free / 1024
                )
            });
        }
        let name = format!("fill-{written}");
        if let Err(e) = write_synced(&c.path(1, &name), &random_bytes(FILE_BYTES, written + 1)) {
            panic!("write {name} through node 1 failed: {e}; node 3 log:\n{}", c.node(3).log_tail());
        }
        written += 1;
    };
    let fill_took = fill_started.elapsed();
    let log3 = c.node(3).log();
    eprintln!(
        "node 3 stopped with {exit} after {written} files in {fill_took:?}; {} KiB free on its disk",
        free_bytes(&data3) / 1024
    );
    assert!(!log3.contains("panicked"), "node 3 panicked; log:\n{log3}");
    // It was the store's own ENOSPC on node 3 (replicated entries), not a refused proposal.
    assert!(log3.contains("No space left on device"), "node 3 stopped, but not on ENOSPC; log:\n{log3}");
    assert_eq!(exit.code(), Some(1), "node 3 must exit with status 1 after a store failure; log:\n{log3}");
    assert!(
        log3.contains("stopping the node (fail-stop)"),
        "node 3 did not log its fail-stop; log:\n{log3}"
    );
    assert!(!is_mounted(c.mnt(3)), "node 3 left its mount behind");

    // Nodes 1 and 2 go on: writes are acknowledged by both, reads see everything.
    let after_started = Instant::now();
    for i in 0..AFTER_FILES {
        write_synced(&c.path(1, &format!("after-{i}")), &random_bytes(FILE_BYTES, 1000 + i)).unwrap();
    }
    fs::write(c.path(2, "from-node-2"), b"node 2 still writes").unwrap();
    eprintln!("{AFTER_FILES} MiB written by nodes 1 and 2 in {:?}", after_started.elapsed());
    c.wait_converged(CONVERGE_TIMEOUT);
    for k in [1, 2] {
        assert!(fs::read(c.path(k, "keep")).unwrap() == keep, "node {k}: keep differs");
        let last = format!("after-{}", AFTER_FILES - 1);
        assert!(fs::read(c.path(k, &last)).unwrap() == random_bytes(FILE_BYTES, 1000 + AFTER_FILES - 1));
    }

    // More room, and node 3 starts from its replica and catches up.
    resize_tmpfs(&data3, NODE3_TMPFS_LARGER_BYTES);
    let restart_started = Instant::now();
    c.start(3);
    let (index, digest) = c.wait_converged(CONVERGE_TIMEOUT);
    let rows = c.status();
    assert_eq!(rows.len(), 3, "every node must report after the rejoin: {rows:#?}");
    eprintln!("node 3 caught up in {:?}: index {index}, digest {digest}", restart_started.elapsed());
    for s in &rows {
        assert_eq!(
            (s.applied_index, s.state_digest.as_deref()),
            (Some(index), Some(digest.as_str())),
            "node {} differs after the rejoin: {rows:#?}",
            s.node_id
        );
    }
    assert!(fs::read(c.path(3, "keep")).unwrap() == keep, "node 3: keep differs after the rejoin");
    let last_fill = format!("fill-{}", written - 1);
    assert!(
        fs::read(c.path(3, &last_fill)).unwrap() == random_bytes(FILE_BYTES, written),
        "node 3: {last_fill} differs after the rejoin"
    );
    assert!(fs::read(c.path(3, "after-0")).unwrap() == random_bytes(FILE_BYTES, 1000));
    assert_eq!(fs::read(c.path(3, "from-node-2")).unwrap(), b"node 2 still writes");
    // And node 3 takes writes again.
    write_synced(&c.path(3, "back"), b"node 3 is back").unwrap();
    let seen = poll(VISIBLE_TIMEOUT, || fs::read(c.path(1, "back")).is_ok_and(|d| d == b"node 3 is back"));
    assert!(seen.is_some(), "node 3's write not seen on node 1");
    eprintln!("cluster_disk: whole test {:?}", started.elapsed());
}

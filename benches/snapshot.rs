//! `cargo bench --bench snapshot`: how long a snapshot takes to take and to write out on a leader
//! (when a follower needs it) and to install
//! on a follower, per MiB of file data in the state, against copying the same snapshot file with
//! an fsync (the disk's own rate for those bytes) in the same run.
//!
//! Why it matters: a follower answers the last chunk of a snapshot only after it has installed
//! it, and the leader waits for that answer `SNAPSHOT_INSTALL_TIMEOUT_MS` plus
//! `SNAPSHOT_INSTALL_MS_PER_GIB` per GiB of snapshot; an install slower than that would be cut off
//! and begun again for ever. The figures here say how much margin that allowance leaves.
//!
//! Setup: a store with `BENCH_SNAPSHOT_MIB` (default 1024) MiB of distinct file data in 1 MiB
//! files, written through `apply` as a node does. Under `cargo test --all-targets` (no `--bench`)
//! it runs with 8 MiB, so the benchmark is kept working.

use std::path::Path;
use std::time::{Duration, Instant};

use pickbox::state::{apply, Caller, Command, FileKind, Op, Timespec, ROOT_INO};
use pickbox::store::Store;

const FILE_MIB: u64 = 1;

fn command(seq: u64, op: Op) -> Command {
    Command {
        origin: 1,
        seq,
        time: Timespec { sec: 1_700_000_000, nsec: 0 },
        caller: Caller::root(),
        content_hash: op.content_hash(),
        op,
    }
}

/// Distinct pseudo-random bytes (no two blocks alike, so every block is stored).
fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

fn populate(store: &Store, mib: u64) {
    let mut seq = 0;
    let mut run = |op: Op| {
        seq += 1;
        let cmd = command(seq, op);
        let out = store.write_state(false, |t| apply(t, &cmd)).expect("store fault");
        out.unwrap_or_else(|e| panic!("{:?}: {e:?}", cmd.op))
    };
    run(Op::Init { perm: 0o755, uid: 0, gid: 0 });
    let mut data = vec![0u8; (FILE_MIB << 20) as usize];
    for i in 0..mib / FILE_MIB {
        let name = format!("f{i}").into_bytes();
        let made = run(Op::MakeNode { parent: ROOT_INO, name, kind: FileKind::File, perm: 0o644, rdev: 0 });
        let ino = match made {
            pickbox::state::Outcome::Inode(inode) => inode.ino,
            other => panic!("make node: {other:?}"),
        };
        fill(&mut data, i + 1);
        run(Op::Write { ino, offset: 0, data: data.clone(), append: false });
    }
    // Durable, as a leader's state is before it snapshots (not part of the timings).
    store.write_state(true, |_| Ok(())).expect("durable commit");
}

fn copy_with_fsync(src: &Path, dst: &Path) -> Duration {
    let t = Instant::now();
    std::fs::copy(src, dst).expect("copy");
    std::fs::File::open(dst).and_then(|f| f.sync_all()).expect("fsync");
    t.elapsed()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let mib: u64 = if bench { std::env::var("BENCH_SNAPSHOT_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024) } else { 8 };
    let dir = tempfile::Builder::new().prefix("pickbox-snapshot-bench").tempdir_in(std::env::var("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| std::env::temp_dir())).expect("temp dir");
    let leader = Store::open(&dir.path().join("leader")).expect("open leader store");
    let t = Instant::now();
    populate(&leader, mib);
    let populated = t.elapsed();

    // Taking a snapshot pins a read transaction; a follower that needs it has it written out.
    let t = Instant::now();
    let pin = leader.pin_snapshot(|_| Ok(("bench-1".into(), b"header".to_vec()))).expect("take");
    let taken = t.elapsed();
    let t = Instant::now();
    let info = leader.write_out(&pin).expect("write out");
    let built = t.elapsed();
    let bytes = std::fs::metadata(&info.path).expect("snapshot file").len();

    let follower = Store::open(&dir.path().join("follower")).expect("open follower store");
    // Where a follower receives a snapshot (so the install adopts it by a rename, as for real);
    // written by a copy with fsync, which is also the baseline.
    let received = follower.receiving_path();
    let copied = copy_with_fsync(&info.path, &received);
    let t = Instant::now();
    follower.install_snapshot(&received, "bench-1", &[]).expect("install");
    let installed = t.elapsed();
    let digest = |s: &Store| s.state_digest(|_| Ok(())).expect("digest").1;
    assert_eq!(digest(&follower), digest(&leader), "installed state differs");

    let per_gib = |d: Duration| d.as_secs_f64() * 1024.0 / mib as f64;
    println!("snapshot of {mib} MiB of file data ({:.0} MiB file); populate {:.1} s", bytes as f64 / (1 << 20) as f64, populated.as_secs_f64());
    println!("  take    {:6.3} s (pins a read transaction; nothing is copied)", taken.as_secs_f64());
    println!("  write out (a follower needs it) {:6.2} s = {:6.1} s per GiB of data", built.as_secs_f64(), per_gib(built));
    println!("  install {:6.2} s = {:6.1} s per GiB of data", installed.as_secs_f64(), per_gib(installed));
    println!("  copy+fsync of the snapshot file (baseline) {:6.2} s", copied.as_secs_f64());
    println!(
        "  ratios to the baseline: write out {:.2}x, install {:.2}x; the leader allows {} s per GiB ({:.1}x this rate)",
        built.as_secs_f64() / copied.as_secs_f64(),
        installed.as_secs_f64() / copied.as_secs_f64(),
        pickbox::raft::SNAPSHOT_INSTALL_MS_PER_GIB / 1000,
        pickbox::raft::SNAPSHOT_INSTALL_MS_PER_GIB as f64 / 1000.0 / per_gib(installed),
    );
}

//! In-process tests of `Replica`: bootstrap, propose, read back, restart, snapshot, latency.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;
use crate::state::{read_range, Errno, FileKind, ROOT_INO};

fn cfg(dir: &std::path::Path) -> ReplicaConfig {
    ReplicaConfig::new(1, dir.to_path_buf(), Duration::from_secs(5))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

async fn make_file(r: &Replica, name: &[u8]) -> crate::state::Inode {
    let op = Op::MakeNode { parent: ROOT_INO, name: name.to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 };
    match r.propose(Caller::root(), op).await.unwrap() {
        Outcome::Inode(i) => i,
        other => panic!("unexpected {other:?}"),
    }
}

fn read_file(r: &Replica, name: &[u8]) -> Vec<u8> {
    let v = r.read().unwrap();
    let e = v.entry(ROOT_INO, name).unwrap().expect("entry");
    let inode = v.inode(e.ino).unwrap().expect("inode");
    read_range(&*v, &inode, 0, inode.size).unwrap().unwrap()
}

#[test]
fn replica_bootstraps_writes_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 199) as u8).collect();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let v = r.read().unwrap();
        assert!(v.inode(ROOT_INO).unwrap().is_some(), "Init was applied");
        assert_eq!(v.meta().unwrap().nodes, vec![1]);
        drop(v);
        let f = make_file(&r, b"f").await;
        let out = r.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await;
        assert!(matches!(out, Ok(Outcome::Written { len: 300_000, .. })), "{out:?}");
        assert_eq!(read_file(&r, b"f"), data);
        // A deterministic failure comes back as an errno and changes nothing.
        let dup = r
            .propose(Caller::root(), Op::MakeNode { parent: ROOT_INO, name: b"f".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 })
            .await;
        assert!(matches!(dup, Err(ProposeError::Fs(Errno::Exist))), "{dup:?}");
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert_eq!(read_file(&r, b"f"), data);
        // New proposals after a restart use a new incarnation and are not taken for retries.
        let g = make_file(&r, b"g").await;
        assert!(g.ino > 2);
        assert_eq!(r.read().unwrap().meta().unwrap().nodes, vec![1], "RegisterNode not repeated");
        r.shutdown().await.unwrap();
    });
}

#[test]
fn replica_recovers_after_crash_without_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = rt();
    let acked = runtime.block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let mut acked = Vec::new();
        for i in 0..20u32 {
            let name = format!("f{i}").into_bytes();
            make_file(&r, &name).await;
            acked.push(name);
        }
        acked
    });
    // Kill every task mid-flight: no shutdown, no final sync.
    runtime.shutdown_timeout(Duration::from_secs(2));
    // Give the store's writer thread a moment to let go of the file lock.
    let mut attempt = 0;
    let r = loop {
        match rt().block_on(Replica::start(cfg(dir.path()))) {
            Ok(r) => break r,
            Err(e) if attempt < 50 => {
                attempt += 1;
                eprintln!("reopen attempt {attempt}: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    };
    let v = r.read().unwrap();
    for name in &acked {
        assert!(v.entry(ROOT_INO, name).unwrap().is_some(), "acknowledged {:?} lost", String::from_utf8_lossy(name));
    }
}

/// Copies the data directory `from` (files and subdirectories) to `to`: taken while the replica
/// runs, what a crash at that moment would leave on disk, as far as the store's own syncs go (an
/// in-process "crash" cannot do that: redb makes pending non-durable commits durable when the
/// database is dropped).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// Creates `n` files named `prefix0..`, then has `r` build a snapshot and waits until it covers
/// them; returns the applied index it covers.
async fn files_then_snapshot(r: &Replica, prefix: &str, n: u32) -> u64 {
    for i in 0..n {
        make_file(r, format!("{prefix}{i}").as_bytes()).await;
    }
    snapshot_all(r).await
}

/// Has `r` build a snapshot and waits until it covers what was applied; returns that index.
async fn snapshot_all(r: &Replica) -> u64 {
    let applied = r.applied_index().unwrap();
    r.trigger_snapshot().await.unwrap();
    let t = Instant::now();
    while r.metrics().snapshot_index.is_none_or(|s| s < applied) {
        assert!(t.elapsed() < Duration::from_secs(10), "no snapshot: {:?}", r.metrics());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    applied
}

/// A snapshot is built from applied state, which may be newer than the last durable state commit
/// (apply commits are made durable about once a second): a crash right after the snapshot left a
/// snapshot file ahead of the durable state, which openraft refuses at start (its core panicked,
/// and the node could not restart; found by fuse-tests/fsx.rs
/// `cluster_random_file_operations_survive_restarts`). Building a snapshot now makes the state
/// durable first.
#[test]
fn a_crash_right_after_a_snapshot_leaves_the_state_as_new_as_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let applied = rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        // Apply commits are not durable for about a second from here.
        let applied = files_then_snapshot(&r, "c", 30).await;
        copy_dir(dir.path(), crashed.path());
        r.shutdown().await.unwrap();
        applied
    });
    // What the crash left: durable state as new as the snapshot.
    let store = Store::open(crashed.path()).unwrap();
    let (durable, _) = storage::read_applied(&store.read().unwrap()).unwrap();
    assert!(durable.is_some_and(|l| l.index >= applied), "durable state at {durable:?}, snapshot at {applied}");
    drop(store);
    rt().block_on(async {
        let r = Replica::start(cfg(crashed.path())).await.unwrap();
        for i in 0..30u32 {
            assert!(r.read().unwrap().entry(ROOT_INO, format!("c{i}").as_bytes()).unwrap().is_some());
        }
        make_file(&r, b"after").await;
        r.shutdown().await.unwrap();
    });
}

/// A received snapshot is adopted (renamed into place), then loaded into the state: a crash or a
/// stop during the load (minutes for a large state) left the new snapshot and the old state, and
/// the log lacks what lies between. At start the snapshot is loaded again. Simulated by putting a
/// newer snapshot of the same cluster into an older copy of the data directory.
#[test]
fn an_interrupted_snapshot_install_is_finished_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let older = tempfile::tempdir().unwrap();
    let snapshot = rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        // The data dir as it was: state and log up to here (a durable copy).
        files_then_snapshot(&r, "early", 10).await;
        copy_dir(dir.path(), older.path());
        files_then_snapshot(&r, "late", 20).await;
        // The snapshot as a follower receives it (written out; removed when the node stops).
        let pin = r.store.current_snapshot().unwrap();
        let info = r.store.write_out(&pin).unwrap();
        let bytes = std::fs::read(&info.path).unwrap();
        r.shutdown().await.unwrap();
        (pin.id.clone(), bytes)
    });
    // Adopted but not loaded: the newer file beside the older state (newest by mtime: `scan`).
    for e in std::fs::read_dir(older.path().join("snapshots")).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    std::fs::write(older.path().join("snapshots").join(format!("{}.snap", snapshot.0)), &snapshot.1).unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(older.path())).await.unwrap();
        for name in (0..10).map(|i| format!("early{i}")).chain((0..20).map(|i| format!("late{i}"))) {
            assert!(r.read().unwrap().entry(ROOT_INO, name.as_bytes()).unwrap().is_some(), "{name} missing");
        }
        make_file(&r, b"after").await;
        r.shutdown().await.unwrap();
    });
}

/// A snapshot keeps the pages of the state it covers (it is a pinned read transaction): while
/// the data directory is short of space, the node takes a newer one every couple of seconds once
/// something was applied, so that what removals freed is used again.
#[test]
fn a_node_short_of_space_snapshots_what_it_applied() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let mut c = cfg(dir.path());
        c.snapshot_low_space_bytes = u64::MAX;
        let r = Replica::start(c).await.unwrap();
        for round in 0..2 {
            make_file(&r, format!("f{round}").as_bytes()).await;
            let applied = r.applied_index().unwrap();
            let t = Instant::now();
            while r.metrics().snapshot_index.is_none_or(|s| s < applied) {
                assert!(t.elapsed() < Duration::from_secs(10), "round {round}: no snapshot of {applied}: {:?}", r.metrics());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        r.shutdown().await.unwrap();
    });
}

#[test]
fn snapshot_and_restart_from_it() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let applied = files_then_snapshot(&r, "s", 30).await;
        assert!(r.metrics().snapshot_index.unwrap() >= applied);
        r.shutdown().await.unwrap();
    });
    // Taking a snapshot copied nothing (no follower needed it).
    let snaps: Vec<_> = std::fs::read_dir(dir.path().join("snapshots")).unwrap().flatten().collect();
    assert!(snaps.is_empty(), "{snaps:?}");
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert!(r.metrics().snapshot_index.is_some());
        for i in 0..30u32 {
            assert!(r.read().unwrap().entry(ROOT_INO, format!("s{i}").as_bytes()).unwrap().is_some());
        }
        r.shutdown().await.unwrap();
    });
}

/// The log stays bounded in bytes on a node restarted more often than the limit's worth of
/// writes: the monitor measures the log on disk, not bytes appended since start (which never
/// reached the limit here, and the log grew without bound).
#[test]
fn the_log_is_bounded_in_bytes_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 1024 * 1024;
    let config = || ReplicaConfig { snapshot_log_bytes: limit, ..cfg(dir.path()) };
    // The same 200 KB rewritten: the state stays small (the limit is at least the last
    // snapshot's size), the log grows by 600 KB per round.
    let content = |round: u32, k: u32| -> Vec<u8> { (0..200_000u32).map(|i| (i.wrapping_mul(round * 3 + k + 1) % 251) as u8).collect() };
    for round in 0..4u32 {
        rt().block_on(async {
            let r = Replica::start(config()).await.unwrap();
            let ino = match r.read().unwrap().entry(ROOT_INO, b"f").unwrap() {
                Some(e) => e.ino,
                None => make_file(&r, b"f").await.ino,
            };
            for k in 0..3u32 {
                let op = Op::Write { ino, offset: 0, data: content(round, k), append: false };
                r.propose(Caller::root(), op).await.unwrap();
            }
            if round < 3 {
                // Each round alone stays under the limit.
                r.shutdown().await.unwrap();
                return;
            }
            assert!(r.store.log_bytes() > limit, "the rounds together are over the limit: {}", r.store.log_bytes());
            let t = Instant::now();
            while r.store.log_bytes() > limit {
                assert!(t.elapsed() < Duration::from_secs(20), "log still {} bytes: {:?}", r.store.log_bytes(), r.metrics());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(r.metrics().snapshot_index.is_some());
            r.shutdown().await.unwrap();
        });
    }
    rt().block_on(async {
        let r = Replica::start(config()).await.unwrap();
        assert_eq!(read_file(&r, b"f"), content(3, 2));
        r.shutdown().await.unwrap();
    });
}

#[test]
fn log_plan_purges_what_the_snapshot_covers_and_followers_have() {
    use LogPlan::*;
    let mb = 1 << 20;
    // Under the limit: nothing.
    assert_eq!(log_plan(mb, 2 * mb, Some(10), None, Some(20), None), Wait);
    // Over it, no snapshot yet: take one; one that covers everything applied: nothing to gain.
    assert_eq!(log_plan(3 * mb, 2 * mb, None, None, Some(20), None), Snapshot);
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(20), Some(20), Some(20), None), Wait);
    // The snapshot covers more than is purged (openraft keeps entries behind it): purge to it.
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(600), Some(100), Some(700), None), Purge(600));
    // Everything it covers is purged and more is applied: a new snapshot.
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(600), Some(600), Some(700), None), Snapshot);
    // A leader does not purge what a follower still needs, and then waits rather than snapshot.
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(600), Some(100), Some(700), Some(650)), Purge(600));
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(600), Some(100), Some(700), Some(400)), Purge(400));
    assert_eq!(log_plan(3 * mb, 2 * mb, Some(600), Some(400), Some(700), Some(400)), Wait);
    // ... unless the log holds twice the limit (that follower is down).
    assert_eq!(log_plan(5 * mb, 2 * mb, Some(600), Some(400), Some(700), Some(400)), Purge(600));
}

/// A batch carries its proposer's digests in memory only: encoded (the log, the wire) and
/// decoded it has none, so every node that gets it from disk or a peer hashes it again in apply.
#[test]
fn a_batchs_digests_never_leave_the_process() {
    let ops = [
        Op::Write { ino: 5, offset: 100, data: (0..200_000u32).map(|i| (i % 253) as u8).collect(), append: false },
        Op::MakeNode { parent: ROOT_INO, name: b"n".to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 },
    ];
    let (cmds, digests): (Vec<Command>, Vec<crate::state::ContentDigest>) = ops
        .iter()
        .enumerate()
        .map(|(i, op)| {
            let (op, digest) = crate::state::HashedOp::new(op.clone()).into_parts();
            let c = Command { origin: 1, seq: i as u64 + 1, time: Timespec { sec: 1, nsec: 0 }, caller: Caller::root(), content_hash: digest.hash, op };
            (c, digest)
        })
        .unzip();
    assert_eq!(digests[0], ops[0].content_digest());
    assert!(digests[0].pieces.len() > 1, "a write's digest keeps its piece hashes");
    let own = Batch::with_digests(cmds, digests.clone());
    assert_eq!(own.digests(), Some(digests.as_slice()));
    let bytes = crate::store::codec::encode(&own).unwrap();
    assert_eq!(bytes, crate::store::codec::encode(&Batch::new(own.0.to_vec())).unwrap(), "digests are not encoded");
    let back: Batch = crate::store::codec::decode(&bytes).unwrap();
    assert_eq!(back, own);
    assert_eq!(back.digests(), None);
}

/// Latency of sequential proposals and batching of concurrent ones (printed; run with --nocapture).
#[test]
fn propose_latency_and_batching() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let f = make_file(&r, b"lat").await;
        let n = 200u64;
        let before = r.metrics();
        let t = Instant::now();
        for i in 0..n {
            r.propose(Caller::root(), Op::Write { ino: f.ino, offset: i * 100, data: vec![7u8; 100], append: false })
                .await
                .unwrap();
        }
        let seq = t.elapsed();
        let t = Instant::now();
        for i in 0..n {
            let name = format!("m{i}").into_bytes();
            r.propose(Caller::root(), Op::MakeNode { parent: ROOT_INO, name, kind: FileKind::File, perm: 0o644, rdev: 0 })
                .await
                .unwrap();
        }
        eprintln!("sequential: {n} creates in {:?} ({:?}/create)", t.elapsed(), t.elapsed() / n as u32);
        let t = Instant::now();
        let mib: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        for i in 0..16u64 {
            let mut data = mib.clone();
            data[0] = i as u8;
            r.propose(Caller::root(), Op::Write { ino: f.ino, offset: (1 << 20) * i, data, append: false })
                .await
                .unwrap();
        }
        eprintln!("sequential: 16 x 1 MiB writes in {:?} ({:?}/MiB)", t.elapsed(), t.elapsed() / 16);
        let mid = r.metrics();
        let tasks = 64u64;
        let per = 20u64;
        let t = Instant::now();
        let mut hs = Vec::new();
        for k in 0..tasks {
            let r: Arc<Replica> = r.clone();
            hs.push(tokio::spawn(async move {
                for i in 0..per {
                    let name = format!("c{k}-{i}").into_bytes();
                    r.propose(
                        Caller::root(),
                        Op::MakeNode { parent: ROOT_INO, name, kind: FileKind::File, perm: 0o644, rdev: 0 },
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let conc = t.elapsed();
        let after = r.metrics();
        eprintln!(
            "sequential: {n} writes in {seq:?} ({:?}/write), {} log commits",
            seq / n as u32,
            mid.log_commits - before.log_commits
        );
        eprintln!(
            "concurrent: {} creates from {tasks} tasks in {conc:?} ({:.0}/s), {} entries in {} log commits ({:.1}/fsync), {} apply txns",
            tasks * per,
            (tasks * per) as f64 / conc.as_secs_f64(),
            after.log_entries - mid.log_entries,
            after.log_commits - mid.log_commits,
            (after.log_entries - mid.log_entries) as f64 / (after.log_commits - mid.log_commits) as f64,
            after.apply_txns - mid.apply_txns
        );
        assert!(after.log_commits - mid.log_commits < tasks * per);
        r.shutdown().await.unwrap();
    });
}

#[test]
fn restart_releases_orphans_held_by_this_node() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let f = make_file(&r, b"open-unlinked").await;
        r.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: b"still here".to_vec(), append: false })
            .await
            .unwrap();
        r.propose(Caller::root(), Op::Unlink { parent: ROOT_INO, name: b"open-unlinked".to_vec(), expect_closed: None })
            .await
            .unwrap();
        let v = r.read().unwrap();
        assert!(v.orphan(f.ino).unwrap().is_some(), "unlinked while open: an orphan");
        assert!(v.inode(f.ino).unwrap().is_some());
        drop(v);
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let v = r.read().unwrap();
        assert!(v.orphan(2).unwrap().is_none(), "released at restart");
        assert!(v.inode(2).unwrap().is_none(), "freed once every node released it");
        drop(v);
        r.shutdown().await.unwrap();
    });
}

/// A storage fault in apply stops Raft (fail-stop): the proposal fails, nothing limps on.
#[test]
fn corrupt_block_during_apply_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let f = make_file(&r, b"c").await;
        r.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: vec![5u8; 1000], append: false })
            .await
            .unwrap();
        let hash = r.read().unwrap().block_hash(f.ino, 0).unwrap().unwrap();
        r.store.corrupt_block(&hash, &[6u8; 1000]);
        // Reads report the corruption instead of returning wrong data.
        let v = r.read().unwrap();
        let inode = v.inode(f.ino).unwrap().unwrap();
        assert!(read_range(&*v, &inode, 0, 1000).is_err() || matches!(read_range(&*v, &inode, 0, 1000), Ok(Err(Errno::Io))));
        drop(v);
        // A partial overwrite must read the corrupt block: apply fails, Raft stops.
        let out = r.propose(Caller::root(), Op::Write { ino: f.ino, offset: 10, data: vec![1u8; 10], append: false }).await;
        assert!(matches!(out, Err(ProposeError::Fatal(_))), "{out:?}");
        let next = r.propose(Caller::root(), Op::RegisterNode { node: 9 }).await;
        assert!(matches!(next, Err(ProposeError::Fatal(_)) | Err(ProposeError::Unavailable(_))), "{next:?}");
        // Shutting a stopped node down still finishes.
        let _ = tokio::time::timeout(Duration::from_secs(5), r.shutdown()).await.expect("shutdown hung");
    });
}

/// An in-process network: calls the target replica's `handle_rpc` directly (bytes in, bytes out,
/// so the encoding of every RPC is exercised). A node can be cut off: every call from or to it
/// fails as unreachable.
#[derive(Default)]
struct MemNet {
    nodes: Mutex<std::collections::HashMap<NodeId, std::sync::Weak<Replica>>>,
    cut: Mutex<std::collections::HashSet<NodeId>>,
    /// Messages over this many bytes (to this node only, if one is given) arrive this much later
    /// (a slow transfer).
    slow: Mutex<Option<(usize, Duration, Option<NodeId>)>>,
}

impl MemNet {
    fn add(&self, id: NodeId, r: &Arc<Replica>) {
        self.nodes.lock().unwrap().insert(id, Arc::downgrade(r));
    }

    fn cut(&self, id: NodeId) {
        self.cut.lock().unwrap().insert(id);
    }

    fn heal(&self, id: NodeId) {
        self.cut.lock().unwrap().remove(&id);
    }

    /// From now on a message of more than `bytes` takes `delay` to arrive.
    fn slow(&self, bytes: usize, delay: Duration) {
        *self.slow.lock().unwrap() = Some((bytes, delay, None));
    }

    /// From now on a message of more than `bytes` to `target` takes `delay` to arrive.
    fn slow_to(&self, target: NodeId, bytes: usize, delay: Duration) {
        *self.slow.lock().unwrap() = Some((bytes, delay, Some(target)));
    }
}

/// One node's view of a `MemNet`.
struct MemTransport {
    me: NodeId,
    net: Arc<MemNet>,
}

impl MemTransport {
    fn on(net: &Arc<MemNet>, me: NodeId) -> Arc<MemTransport> {
        Arc::new(MemTransport { me, net: net.clone() })
    }
}

impl PeerTransport for MemTransport {
    fn call(&self, target: NodeId, _addr: &str, kind: RpcKind, body: Vec<u8>) -> network::BoxFuture<Result<Vec<u8>, TransportError>> {
        let cut = {
            let c = self.net.cut.lock().unwrap();
            c.contains(&self.me) || c.contains(&target)
        };
        let node = if cut { None } else { self.net.nodes.lock().unwrap().get(&target).and_then(|w| w.upgrade()) };
        let me = self.me;
        let delay = self
            .net
            .slow
            .lock()
            .unwrap()
            .and_then(|(bytes, d, to)| (body.len() > bytes && to.is_none_or(|to| to == target)).then_some(d));
        Box::pin(async move {
            let Some(r) = node else { return Err(TransportError::Unreachable(target, "cut off or not registered".into())) };
            if let Some(d) = delay {
                // Delivered only if the caller still waits then (a dropped call never arrives).
                tokio::time::sleep(d).await;
            }
            r.handle_rpc(Some(me), kind, &body).await.map_err(|e| TransportError::Network(target, e.0))
        })
    }
}

fn cfg_n(dir: &std::path::Path, id: NodeId, timeout: Duration) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(id, dir.to_path_buf(), timeout);
    c.advertise_addr = format!("mem:{id}");
    c
}

/// Node 1 bootstraps, nodes 2.. join as voters; returns every replica (index i = node i + 1).
async fn cluster(net: &Arc<MemNet>, dirs: &[tempfile::TempDir], timeout: Duration) -> Vec<Arc<Replica>> {
    let a = Replica::start_with(cfg_n(dirs[0].path(), 1, timeout), MemTransport::on(net, 1)).await.unwrap();
    net.add(1, &a);
    let mut all = vec![a.clone()];
    for (i, d) in dirs.iter().enumerate().skip(1) {
        let id = i as NodeId + 1;
        let r = Replica::start_joining(cfg_n(d.path(), id, timeout), MemTransport::on(net, id)).await.unwrap();
        net.add(id, &r);
        a.add_learner(id, format!("mem:{id}")).await.unwrap();
        all.push(r);
    }
    a.change_voters((1..=dirs.len() as NodeId).collect()).await.unwrap();
    for r in &all[1..] {
        r.after_join().await.unwrap();
    }
    all
}

async fn wait_applied_on(r: &Replica, target: u64) {
    let t = Instant::now();
    while r.applied_index().unwrap_or(0) < target {
        assert!(t.elapsed() < Duration::from_secs(10), "node {} stuck at {:?} < {target}", r.node_id(), r.applied_index());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn mk(name: &str) -> Op {
    Op::MakeNode { parent: ROOT_INO, name: name.as_bytes().to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 }
}

fn has(r: &Replica, name: &str) -> bool {
    r.read().unwrap().entry(ROOT_INO, name.as_bytes()).unwrap().is_some()
}

/// Create `name` through `r`, retrying failures (no quorum yet, an election) for up to `within`;
/// EEXIST counts as done (an earlier attempt that timed out may have committed it).
async fn propose_until_done(r: &Replica, name: &str, within: Duration) {
    let t = Instant::now();
    loop {
        match r.propose(Caller::root(), mk(name)).await {
            Ok(_) | Err(ProposeError::Fs(Errno::Exist)) => return,
            Err(e) => assert!(t.elapsed() < within, "no recovery: {e}"),
        }
    }
}

/// Start a node again on a data dir whose previous replica, in this process, was shut down. Its
/// database closes when openraft's last task of it has ended, after `shutdown` returned (a new
/// process never meets this): until then the open fails with "already open".
async fn restart_with(cfg: ReplicaConfig, transport: Arc<dyn PeerTransport>) -> Arc<Replica> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Replica::start_with(cfg.clone(), transport.clone()).await {
            Ok(r) => return r,
            Err(e) if format!("{e:#}").contains("already open") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => panic!("restart failed: {e:#}"),
        }
    }
}

async fn shutdown_all(rs: &[Arc<Replica>]) {
    for r in rs {
        let _ = tokio::time::timeout(Duration::from_secs(10), r.shutdown()).await;
    }
}

#[test]
fn two_nodes_replicate_over_encoded_rpcs() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let a = Replica::start_with(cfg(d1.path()), MemTransport::on(&net, 1)).await.unwrap();
        net.add(1, &a);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let f = make_file(&a, b"before-join").await;
        a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await.unwrap();

        let mut c2 = cfg(d2.path());
        c2.node_id = 2;
        let b = Replica::start_joining(c2, MemTransport::on(&net, 2)).await.unwrap();
        net.add(2, &b);
        a.add_learner(2, "mem:2".into()).await.unwrap();
        a.change_voters([1, 2].into_iter().collect()).await.unwrap();
        a.propose(Caller::root(), Op::RegisterNode { node: 2 }).await.unwrap();
        make_file(&a, b"after-join").await;

        let target = a.applied_index().unwrap();
        let t = Instant::now();
        while b.applied_index().unwrap_or(0) < target {
            assert!(t.elapsed() < Duration::from_secs(10), "follower stuck at {:?} < {target}", b.applied_index());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(read_file(&b, b"before-join"), data);
        assert!(b.read().unwrap().entry(ROOT_INO, b"after-join").unwrap().is_some());
        assert_eq!(b.read().unwrap().meta().unwrap(), a.read().unwrap().meta().unwrap());
        b.after_join().await.unwrap();
        // A follower forwards proposals to the leader.
        let fwd = b.propose(Caller::root(), Op::RegisterNode { node: 3 }).await;
        assert!(matches!(fwd, Ok(Outcome::Done)), "{fwd:?}");
        b.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    });
}

#[test]
fn learner_catches_up_by_snapshot_after_purge() {
    learner_catches_up_by_snapshot(300_000, None, SnapshotInstallBound::default());
}

/// A snapshot sent over a slow link (every chunk takes longer than openraft's default
/// `install_snapshot_timeout` of 200 ms: 4 MiB chunks at under 20 MiB/s) still arrives and
/// installs. Before, each chunk was cut off at 200 ms and the transfer restarted from the
/// beginning for ever: the learner never caught up.
#[test]
fn a_snapshot_over_a_slow_link_still_installs() {
    // Two snapshot chunks (SNAPSHOT_CHUNK_BYTES); every message over 1 MiB to the learner (the
    // chunks) takes 500 ms.
    learner_catches_up_by_snapshot(6 * 1024 * 1024, Some((1 << 20, Duration::from_millis(500))), SnapshotInstallBound::default());
}

/// The answer to a snapshot's last chunk comes only after the follower installed the whole
/// snapshot, so the leader waits for it in proportion to the snapshot's size: here the base bound
/// (300 ms) is shorter than the link's delay (500 ms), and only the allowance per GiB (6 MiB:
/// 2.3 s) lets the answer arrive. With a fixed bound a state whose install took longer than it
/// (~85-100 GiB here at 10 min) could never catch a follower up: each transfer was cut off and begun again.
#[test]
fn the_last_snapshot_chunk_waits_in_proportion_to_the_snapshot_size() {
    let bound = SnapshotInstallBound { base: Duration::from_millis(300), per_gib: Duration::from_secs(400) };
    learner_catches_up_by_snapshot(6 * 1024 * 1024, Some((1 << 20, Duration::from_millis(500))), bound);
}

/// A leader with a file of `data_len` bytes purges its log behind a snapshot; a new learner
/// (messages to it over `.0` bytes delayed by `.1`, if `slow`) must catch up by that snapshot.
fn learner_catches_up_by_snapshot(data_len: u32, slow: Option<(usize, Duration)>, install: SnapshotInstallBound) {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let leader_cfg = ReplicaConfig { snapshot_install: install, ..cfg(d1.path()) };
        let a = Replica::start_with(leader_cfg, MemTransport::on(&net, 1)).await.unwrap();
        net.add(1, &a);
        let f = make_file(&a, b"big").await;
        let data: Vec<u8> = (0..data_len).map(|i| (i % 239) as u8).collect();
        // In pieces a log entry can hold.
        for (k, piece) in data.chunks(1 << 20).enumerate() {
            let write = Op::Write { ino: f.ino, offset: (k << 20) as u64, data: piece.to_vec(), append: false };
            a.propose(Caller::root(), write).await.unwrap();
        }
        // Sequential proposals: one entry each, enough to purge past SNAPSHOT_LOG_KEEP_ENTRIES.
        for i in 0..(SNAPSHOT_LOG_KEEP_ENTRIES + 100) {
            a.propose(Caller::root(), Op::SetXattr { ino: f.ino, name: b"user.n".to_vec(), value: i.to_le_bytes().to_vec(), flags: crate::state::XattrFlags::Any })
                .await
                .unwrap();
        }
        a.trigger_snapshot().await.unwrap();
        let t = Instant::now();
        while a.metrics().purged_index.is_none() {
            assert!(t.elapsed() < Duration::from_secs(20), "no purge: {:?}", a.metrics());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some((bytes, delay)) = slow {
            net.slow_to(2, bytes, delay);
        }
        let mut c2 = cfg(d2.path());
        c2.node_id = 2;
        let b = Replica::start_joining(c2, MemTransport::on(&net, 2)).await.unwrap();
        net.add(2, &b);
        let added = a.add_learner(2, "mem:2".into()).await;
        let target = a.applied_index().unwrap();
        let t = Instant::now();
        while b.applied_index().unwrap_or(0) < target {
            assert!(t.elapsed() < Duration::from_secs(30), "learner stuck: {:?} (add_learner: {added:?})", b.metrics());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(added.is_ok(), "{added:?}");
        assert!(b.metrics().snapshot_index.is_some(), "caught up by snapshot: {:?}", b.metrics());
        assert_eq!(read_file(&b, b"big"), data);
        let want = (SNAPSHOT_LOG_KEEP_ENTRIES + 99).to_le_bytes().to_vec();
        assert_eq!(b.read().unwrap().xattr(f.ino, b"user.n").unwrap(), Some(want));
        // The received file went once installed (the installed state is the current snapshot).
        let snaps: Vec<_> = std::fs::read_dir(d2.path().join("snapshots")).unwrap().flatten().collect();
        assert!(snaps.is_empty(), "{snaps:?}");
        b.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    });
}

fn dirs(n: usize) -> Vec<tempfile::TempDir> {
    (0..n).map(|_| tempfile::tempdir().unwrap()).collect()
}

/// A follower's proposals go to the leader, are applied on every node, and the follower answers
/// only once it has applied them itself (read-your-writes). Prints forward latency and throughput.
#[test]
fn follower_proposals_are_forwarded_and_applied_everywhere() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let f = rs.iter().find(|r| r.metrics().current_leader != Some(r.node_id())).unwrap().clone();
        let n = 100u32;
        let t = Instant::now();
        for i in 0..n {
            let name = format!("fwd{i}");
            f.propose(Caller::root(), mk(&name)).await.unwrap();
            assert!(has(&f, &name), "read-your-writes on the origin");
        }
        let seq = t.elapsed();
        // Concurrent: many tasks through the follower.
        let (tasks, per) = (64u32, 10u32);
        let t = Instant::now();
        let mut hs = Vec::new();
        for k in 0..tasks {
            let f = f.clone();
            hs.push(tokio::spawn(async move {
                for i in 0..per {
                    f.propose(Caller::root(), mk(&format!("c{k}-{i}"))).await.unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let conc = t.elapsed();
        eprintln!(
            "forward: {n} sequential creates via a follower in {seq:?} ({:?}/create); {} concurrent from {tasks} tasks in {conc:?} ({:.0}/s)",
            seq / n,
            tasks * per,
            (tasks * per) as f64 / conc.as_secs_f64()
        );
        // A duplicate name is a deterministic errno through forwarding too.
        let dup = f.propose(Caller::root(), mk("fwd0")).await;
        assert!(matches!(dup, Err(ProposeError::Fs(Errno::Exist))), "{dup:?}");
        let target = f.applied_index().unwrap();
        for r in &rs {
            wait_applied_on(r, target).await;
            for i in 0..n {
                assert!(has(r, &format!("fwd{i}")), "node {} lacks fwd{i}", r.node_id());
            }
            assert!(has(r, "c63-9"));
        }
        shutdown_all(&rs).await;
    });
}

/// The leader goes away while a follower streams writes: every write that returned Ok is on the
/// survivors, and writes resume under the new leader.
#[test]
fn leader_loss_during_follower_writes_keeps_every_acknowledged_write() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let leader = rs[0].metrics().current_leader.unwrap();
        let f = rs.iter().find(|r| r.node_id() != leader).unwrap().clone();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut hs = Vec::new();
        for k in 0..4u32 {
            let (f, acked, stop) = (f.clone(), acked.clone(), stop.clone());
            hs.push(tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("w{k}-{i}");
                    if f.propose(Caller::root(), mk(&name)).await.is_ok() {
                        acked.lock().unwrap().push((name, Instant::now()));
                    }
                    i += 1;
                }
            }));
        }
        let t = Instant::now();
        while acked.lock().unwrap().len() < 40 {
            assert!(t.elapsed() < Duration::from_secs(20), "writes do not progress");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed = Instant::now();
        net.cut(leader);
        rs[leader as usize - 1].shutdown().await.unwrap();
        // Writes resume: some are acknowledged well after the old leader went away.
        let t = Instant::now();
        loop {
            let after = acked.lock().unwrap().iter().filter(|(_, at)| *at > killed).count();
            if after >= 20 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "writes did not resume ({after} after the leader loss)");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("failover: first write after the leader loss acknowledged {:?} later",
            acked.lock().unwrap().iter().filter(|(_, at)| *at > killed).map(|(_, at)| *at - killed).min().unwrap());
        stop.store(true, Ordering::Relaxed);
        for h in hs {
            h.await.unwrap();
        }
        let survivors: Vec<_> = rs.iter().filter(|r| r.node_id() != leader).cloned().collect();
        let target = survivors.iter().map(|r| r.applied_index().unwrap()).max().unwrap();
        for r in &survivors {
            wait_applied_on(r, target).await;
            for (name, _) in acked.lock().unwrap().iter() {
                assert!(has(r, name), "acknowledged {name} missing on node {}", r.node_id());
            }
        }
        shutdown_all(&survivors).await;
    });
}

/// The leader (per node 1's view, nodes numbered from 1 in order) and one follower.
fn leader_and_follower(rs: &[Arc<Replica>]) -> (Arc<Replica>, Arc<Replica>) {
    let leader = rs[0].metrics().current_leader.expect("a leader is known");
    let l = rs[leader as usize - 1].clone();
    let f = rs.iter().find(|r| r.node_id() != leader).expect("a follower").clone();
    (l, f)
}

/// A read barrier on a follower sees a write committed through the leader. Prints the cost.
#[test]
fn read_barrier_on_follower_sees_leader_write() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let (l, f) = leader_and_follower(&rs);
        for i in 0..20 {
            let name = format!("rb{i}");
            l.propose(Caller::root(), mk(&name)).await.unwrap();
            f.read_barrier().await.unwrap();
            assert!(has(&f, &name), "the barrier did not wait for {name}");
        }
        let n = 200u32;
        let t = Instant::now();
        for _ in 0..n {
            f.read_barrier().await.unwrap();
        }
        let on_follower = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            l.read_barrier().await.unwrap();
        }
        let on_leader = t.elapsed() / n;
        let t = Instant::now();
        let hs: Vec<_> = (0..n)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.read_barrier().await.unwrap() })
            })
            .collect();
        for h in hs {
            h.await.unwrap();
        }
        eprintln!(
            "read_barrier: follower {on_follower:?}/call, leader {on_leader:?}/call, {n} concurrent on a follower in {:?}",
            t.elapsed()
        );
        // Cut off from the others, the barrier fails within the timeout, then works once healed.
        net.cut(f.node_id());
        let t = Instant::now();
        let r = f.read_barrier().await;
        assert!(matches!(r, Err(ProposeError::Unavailable(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
        net.heal(f.node_id());
        let t = Instant::now();
        while let Err(e) = f.read_barrier().await {
            assert!(t.elapsed() < Duration::from_secs(20), "barrier does not recover: {e}");
        }
        shutdown_all(&rs).await;
    });
}

/// A follower hears about what remote commands touched: create, rename, unlink of an open file.
#[test]
fn applied_events_on_follower_for_remote_changes() {
    let ds = dirs(2);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let (l, f) = leader_and_follower(&rs);
        let mut events = f.subscribe_applied(|_| true);
        let Outcome::Inode(a) = l.propose(Caller::root(), mk("a")).await.unwrap() else { panic!() };
        let Outcome::Inode(b) = l.propose(Caller::root(), mk("b")).await.unwrap() else { panic!() };
        l.propose(
            Caller::root(),
            Op::Rename {
                parent: ROOT_INO,
                name: b"a".to_vec(),
                new_parent: ROOT_INO,
                new_name: b"b".to_vec(),
                flags: Default::default(),
                expect_closed: None,
            },
        )
        .await
        .unwrap();
        l.propose(Caller::root(), Op::Unlink { parent: ROOT_INO, name: b"b".to_vec(), expect_closed: None }).await.unwrap();
        // A local change is not reported.
        let Outcome::Inode(own) = f.propose(Caller::root(), mk("own")).await.unwrap() else { panic!() };
        // Only applies that touched something send an event: the last one sent is the target.
        let target = f.last_event_index();
        assert!(target > 0, "remote changes sent events");
        let mut touched = Vec::new();
        let mut last = 0;
        let t = Instant::now();
        while last < target {
            let left = Duration::from_secs(10).saturating_sub(t.elapsed());
            let ev = tokio::time::timeout(left, events.recv()).await.expect("no Applied event").unwrap();
            assert!(ev.index > last, "events in log order");
            last = ev.index;
            touched.extend(ev.touched);
        }
        let entry = |name: &str, old| Touch::Entry { parent: ROOT_INO, name: name.as_bytes().to_vec(), old };
        for want in [
            entry("a", None),
            entry("b", None),
            entry("a", Some(a.ino)),
            entry("b", Some(b.ino)),
            entry("b", Some(a.ino)),
            Touch::Inode(ROOT_INO),
            Touch::Inode(a.ino),
            Touch::Inode(b.ino),
            // Unlinked by node `leader`, not open there: this node must release it.
            Touch::Orphan(a.ino),
        ] {
            assert!(touched.contains(&want), "missing {want:?} in {touched:?}");
        }
        assert!(!touched.contains(&entry("own", None)), "own change reported: {touched:?}");
        assert!(!touched.contains(&Touch::Inode(own.ino)));
        // The apply of the local create touched nothing to report: it sent no event at all.
        assert!(events.try_recv().is_err(), "an event for an apply that touched nothing");
        assert_eq!(f.last_event_index(), last);
        shutdown_all(&rs).await;
    });
}

/// A filtered subscriber gets only the touches it wants, and an apply whose touches it all drops
/// sends no event and leaves `last_event_index` where it was (an open waits for nothing).
#[test]
fn a_filtered_subscriber_gets_only_what_it_wants() {
    let ds = dirs(2);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let (l, f) = leader_and_follower(&rs);
        let skipped = |t: &Touch| matches!(t, Touch::Entry { name, .. } if name.starts_with(b"skip"));
        let mut events = f.subscribe_applied(move |t| !skipped(t) && !matches!(t, Touch::Inode(_)));
        l.propose(Caller::root(), mk("kept")).await.unwrap();
        wait_applied_on(&f, l.applied_index().unwrap()).await;
        let kept_at = f.last_event_index();
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("no event").unwrap();
        assert_eq!(ev.index, kept_at);
        assert_eq!(ev.touched, vec![Touch::Entry { parent: ROOT_INO, name: b"kept".to_vec(), old: None }], "only the wanted touch");
        l.propose(Caller::root(), mk("skip-me")).await.unwrap();
        let target = l.applied_index().unwrap();
        wait_applied_on(&f, target).await;
        assert!(target > kept_at);
        assert_eq!(f.last_event_index(), kept_at, "an apply with nothing wanted counted as an event");
        assert!(events.try_recv().is_err(), "an event with nothing wanted in it");
        shutdown_all(&rs).await;
    });
}

/// Without quorum a proposal fails with Unavailable within the timeout; once the quorum is back
/// proposals work again without a restart, also through a follower.
#[test]
fn no_quorum_is_unavailable_then_recovers() {
    let ds = dirs(3);
    let timeout = Duration::from_secs(2);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, timeout).await;
        let leader = rs[0].metrics().current_leader.unwrap();
        let l = rs[leader as usize - 1].clone();
        let others: Vec<NodeId> = (1..=3).filter(|n| *n != leader).collect();
        l.propose(Caller::root(), mk("before")).await.unwrap();
        for n in &others {
            net.cut(*n);
        }
        let t = Instant::now();
        let r = l.propose(Caller::root(), mk("lost")).await;
        let took = t.elapsed();
        assert!(matches!(r, Err(ProposeError::Unavailable(_))), "{r:?}");
        assert!(took >= timeout && took < timeout + Duration::from_millis(500), "{took:?}");
        for n in &others {
            net.heal(*n);
        }
        propose_until_done(&l, "after", Duration::from_secs(15)).await;
        let f = rs.iter().find(|r| r.node_id() != l.metrics().current_leader.unwrap()).unwrap();
        f.propose(Caller::root(), mk("after-via-follower")).await.unwrap();
        shutdown_all(&rs).await;
    });
}

/// The leader replicates while its own log write is in flight (vendor/openraft/PATCHES.md): with
/// its log stalled, a write still commits on the followers' durable copies and the leader applies
/// and answers it. With both followers' logs stalled, the leader's durable copy alone is no
/// majority: nothing commits, the proposer gets EIO at its deadline; once the followers' logs
/// move again, writes go on.
#[test]
// The stall guards are held across awaits on purpose: they stop the log writer thread (a plain
// thread, not a task of this runtime) while the test proposes.
#[allow(clippy::await_holding_lock)]
fn leader_commits_on_follower_copies_while_its_own_log_stalls() {
    let ds = dirs(3);
    let timeout = Duration::from_secs(2);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, timeout).await;
        let (l, _) = leader_and_follower(&rs);
        let followers: Vec<Arc<Replica>> = rs.iter().filter(|r| r.node_id() != l.node_id()).cloned().collect();
        l.propose(Caller::root(), mk("before")).await.unwrap();
        {
            let _stalled = l.store.stall_log();
            l.propose(Caller::root(), mk("leader-log-stalled")).await.unwrap();
            assert!(has(&l, "leader-log-stalled"));
            let target = l.applied_index().unwrap();
            for f in &followers {
                wait_applied_on(f, target).await;
                assert!(has(f, "leader-log-stalled"), "node {}", f.node_id());
            }
        }
        {
            let _a = followers[0].store.stall_log();
            let _b = followers[1].store.stall_log();
            let t = Instant::now();
            let r = l.propose(Caller::root(), mk("no-majority")).await;
            assert!(matches!(r, Err(ProposeError::Unavailable(_))), "{r:?}");
            assert!(t.elapsed() >= timeout, "{:?}", t.elapsed());
            assert!(!has(&l, "no-majority"), "applied without a durable majority");
        }
        propose_until_done(&l, "after", Duration::from_secs(15)).await;
        assert!(has(&l, "after"));
        shutdown_all(&rs).await;
    });
}

/// An AppendEntries that carries entries may take longer than the heartbeat interval to arrive
/// (MiBs to a busy follower) and is not cut off at that interval: cut off there and sent again,
/// it never arrived, the write never committed, and the followers, hearing nothing, called an
/// election (vendor/openraft/PATCHES.md, 3).
#[test]
fn entries_slower_than_a_heartbeat_interval_still_reach_the_followers() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let (l, _) = leader_and_follower(&rs);
        let term = l.metrics().current_term;
        let f = make_file(&l, b"slow").await;
        // Between the heartbeat interval and the election timeout.
        let delay = Duration::from_millis(HEARTBEAT_MS * 2);
        assert!(delay.as_millis() < u128::from(ELECTION_TIMEOUT_MIN_MS));
        net.slow(64 * 1024, delay);
        let data: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 251) as u8).collect();
        let t = Instant::now();
        let out = l.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await;
        assert!(matches!(out, Ok(Outcome::Written { .. })), "{out:?} after {:?}", t.elapsed());
        let target = l.applied_index().unwrap();
        for r in &rs {
            wait_applied_on(r, target).await;
            assert_eq!(read_file(r, b"slow"), data, "node {}", r.node_id());
            assert_eq!(r.metrics().current_term, term, "node {}: an election happened", r.node_id());
        }
        shutdown_all(&rs).await;
    });
}

/// A leader whose second follower lags (its entries arrive later) commits with the first and
/// applies, and still sends the lagging one its entries from memory: none is read back from the
/// log (before, each entry applied before the lagging follower had it was read and decoded again).
#[test]
fn a_lagging_follower_gets_its_entries_from_memory() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let (l, lagging) = leader_and_follower(&rs);
        let slow = lagging.node_id();
        let f = make_file(&l, b"lag").await;
        net.slow_to(slow, 64 * 1024, Duration::from_millis(30));
        let reads_before = l.store.stats().log_reads.load(Ordering::Relaxed);
        let mut data = Vec::new();
        for k in 0..20u32 {
            let piece: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(k + 1) % 251) as u8).collect();
            l.propose(Caller::root(), Op::Write { ino: f.ino, offset: data.len() as u64, data: piece.clone(), append: false })
                .await
                .unwrap();
            data.extend_from_slice(&piece);
        }
        let target = l.applied_index().unwrap();
        for r in &rs {
            wait_applied_on(r, target).await;
        }
        assert_eq!(read_file(&lagging, b"lag"), data);
        let reads = l.store.stats().log_reads.load(Ordering::Relaxed) - reads_before;
        assert_eq!(reads, 0, "entries the leader read back from its log");
        shutdown_all(&rs).await;
    });
}

/// A restarted node whose peers are down starts anyway (reads work, writes fail), and finishes
/// its bootstrap once a quorum is back.
#[test]
fn restart_without_quorum_starts_and_recovers() {
    let ds = dirs(3);
    let timeout = Duration::from_secs(2);
    let runtime = rt();
    let orphan = runtime.block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, timeout).await;
        rs[0].propose(Caller::root(), mk("kept")).await.unwrap();
        // Node 2 holds a file open when it is unlinked: it must release it after its restart.
        let Outcome::Inode(o) = rs[1].propose(Caller::root(), mk("open")).await.unwrap() else { panic!() };
        rs[1].propose(Caller::root(), Op::Unlink { parent: ROOT_INO, name: b"open".to_vec(), expect_closed: None }).await.unwrap();
        let target = rs[1].applied_index().unwrap();
        for r in &rs {
            wait_applied_on(r, target).await;
        }
        shutdown_all(&rs).await;
        o.ino
    });
    runtime.block_on(async {
        let net = Arc::new(MemNet::default());
        let t = Instant::now();
        let a = restart_with(cfg_n(ds[1].path(), 2, timeout), MemTransport::on(&net, 2)).await;
        net.add(2, &a);
        eprintln!("restart without quorum returned in {:?}", t.elapsed());
        assert!(has(&a, "kept"), "reads work without quorum");
        let r = a.propose(Caller::root(), mk("nope")).await;
        assert!(matches!(r, Err(ProposeError::Unavailable(_))), "{r:?}");
        let b = restart_with(cfg_n(ds[2].path(), 3, timeout), MemTransport::on(&net, 3)).await;
        net.add(3, &b);
        propose_until_done(&a, "back", Duration::from_secs(20)).await;
        assert!(has(&a, "back"));
        // The background bootstrap released node 2's orphan once the quorum was back.
        let t = Instant::now();
        while a.read().unwrap().orphan(orphan).unwrap().is_some_and(|o| o.pending.contains(&2)) {
            assert!(t.elapsed() < Duration::from_secs(20), "orphan never released");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown_all(&[a, b]).await;
    });
}

/// Sequence numbers: a node id reused with a fresh data dir continues above what the cluster saw.
#[test]
fn reused_node_id_with_fresh_dir_gets_a_higher_incarnation() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds[..2], Duration::from_secs(5)).await;
        let old = &rs[1];
        for i in 0..3 {
            old.propose(Caller::root(), mk(&format!("o{i}"))).await.unwrap();
        }
        let max_before = rs[0].read().unwrap().max_seq(2).unwrap();
        // Removed from the membership (openraft refuses a member whose log goes backwards)...
        rs[0].change_voters([1].into_iter().collect()).await.unwrap();
        old.shutdown().await.unwrap();
        // ...node 2 comes back with an empty data dir (ds[2]) and joins again.
        let r = Replica::start_joining(cfg_n(ds[2].path(), 2, Duration::from_secs(5)), MemTransport::on(&net, 2)).await.unwrap();
        net.add(2, &r);
        rs[0].add_learner(2, "mem:2".into()).await.unwrap();
        r.after_join().await.unwrap();
        r.propose(Caller::root(), mk("fresh")).await.unwrap();
        assert!(has(&r, "fresh"), "not taken for a stale retry");
        // Read on the proposer, which applied its entry before answering: the leader may apply
        // it later (it does not wait for its own log flush before replicating, so the followers
        // can apply first).
        let max_after = r.read().unwrap().max_seq(2).unwrap();
        assert!(max_after >> SEQ_COUNTER_BITS > max_before >> SEQ_COUNTER_BITS, "{max_before:#x} -> {max_after:#x}");
        shutdown_all(&[rs[0].clone(), r]).await;
    });
}

/// A forwarded batch is served only if every command's origin is the forwarding peer: a member
/// cannot propose in another node's name.
#[test]
fn forward_refuses_commands_of_another_origin() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let cmd = |origin: NodeId, name: &[u8]| {
            let op = Op::MakeNode { parent: ROOT_INO, name: name.to_vec(), kind: FileKind::File, perm: 0o644, rdev: 0 };
            Command {
                origin,
                seq: 1,
                time: Timespec { sec: 1, nsec: 0 },
                caller: Caller::root(),
                content_hash: op.content_hash(),
                op,
            }
        };
        let forged = crate::store::codec::encode(&Batch::new(vec![cmd(3, b"forged")])).unwrap();
        assert!(r.handle_rpc(Some(2), RpcKind::Forward, &forged).await.is_err());
        assert!(r.handle_rpc(None, RpcKind::Forward, &forged).await.is_err());
        assert!(r.read().unwrap().entry(ROOT_INO, b"forged").unwrap().is_none(), "a forged command applied");
        let own = crate::store::codec::encode(&Batch::new(vec![cmd(3, b"own")])).unwrap();
        let reply = r.handle_rpc(Some(3), RpcKind::Forward, &own).await.unwrap();
        let reply: forward::ForwardReply = crate::store::codec::decode(&reply).unwrap();
        assert!(reply.is_ok(), "{reply:?}");
        assert!(r.read().unwrap().entry(ROOT_INO, b"own").unwrap().is_some());
        r.shutdown().await.unwrap();
    });
}

/// The seqs of `origin`'s commands in log order, read back from the durable log.
fn logged_seqs(r: &Replica, origin: NodeId) -> Vec<u64> {
    let rows = r.store.read_log((std::ops::Bound::Unbounded, std::ops::Bound::Unbounded)).unwrap();
    let mut seqs = Vec::new();
    for (_, bytes) in rows {
        let e: openraft::Entry<TypeConfig> = crate::store::codec::decode(&bytes).unwrap();
        if let openraft::EntryPayload::Normal(b) = e.payload {
            seqs.extend(b.0.iter().filter(|c| c.origin == origin).map(|c| c.seq));
        }
    }
    seqs
}

/// `n` concurrent 1 MiB writes (distinct data, writer k at offset k MiB) to a new file on `via`;
/// every one must succeed (none refused Stale); returns the file and the expected content.
async fn concurrent_large_writes(via: &Arc<Replica>, name: &[u8], n: u64) -> (crate::state::Inode, Vec<u8>) {
    let f = make_file(via, name).await;
    let mib = 1usize << 20;
    let expected: Vec<u8> = (0..n as usize * mib).map(|i| (i / 4093 % 251) as u8 ^ (i / mib) as u8).collect();
    let mut hs = Vec::new();
    for k in 0..n {
        let r = via.clone();
        let data = expected[k as usize * mib..(k as usize + 1) * mib].to_vec();
        hs.push(tokio::spawn(async move {
            r.propose(Caller::root(), Op::Write { ino: f.ino, offset: k << 20, data, append: false }).await
        }));
    }
    for (k, h) in hs.into_iter().enumerate() {
        let out = h.await.unwrap();
        assert!(matches!(out, Ok(Outcome::Written { len, .. }) if len == mib as u64), "write {k}: {out:?}");
    }
    (f, expected)
}

/// Many concurrent large writes: batches go two in flight (pipelined) on the leader, every write
/// applies (none Stale), the content is right, and the origin's seqs are ascending in the log.
#[test]
fn pipelined_large_writes_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let written = rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let (_, expected) = concurrent_large_writes(&r, b"big", 48).await;
        assert_eq!(read_file(&r, b"big"), expected);
        assert!(r.pipelined.load(Ordering::Relaxed) > 0, "no batch went in flight behind another");
        let seqs = logged_seqs(&r, 1);
        assert!(seqs.len() > 48);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seqs out of log order: {seqs:?}");
        // Small ops keep one batch in flight: none of these is pipelined.
        let before = r.pipelined.load(Ordering::Relaxed);
        let mut hs = Vec::new();
        for k in 0..32 {
            let r = r.clone();
            hs.push(tokio::spawn(async move { r.propose(Caller::root(), mk(&format!("s{k}"))).await }));
        }
        for h in hs {
            h.await.unwrap().unwrap();
        }
        assert_eq!(r.pipelined.load(Ordering::Relaxed), before, "small ops were pipelined");
        r.shutdown().await.unwrap();
        expected
    });
    // After a restart the state is the same.
    let expected = written;
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert_eq!(read_file(&r, b"big"), expected);
        r.shutdown().await.unwrap();
    });
}

/// In a cluster: concurrent large writes on the leader (pipelined) and on a follower (forwarded,
/// one batch in flight) all apply everywhere, each origin's seqs ascending in every node's log.
#[test]
fn pipelined_large_writes_in_a_cluster() {
    let ds = dirs(3);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(10)).await;
        let (leader, follower) = leader_and_follower(&rs);
        let (l, f) = tokio::join!(
            concurrent_large_writes(&leader, b"on-leader", 24),
            concurrent_large_writes(&follower, b"on-follower", 12)
        );
        let target = leader.applied_index().unwrap().max(follower.applied_index().unwrap());
        for r in &rs {
            wait_applied_on(r, target).await;
            assert_eq!(read_file(r, b"on-leader"), l.1, "node {}", r.node_id());
            assert_eq!(read_file(r, b"on-follower"), f.1, "node {}", r.node_id());
            for origin in [leader.node_id(), follower.node_id()] {
                let seqs = logged_seqs(r, origin);
                assert!(seqs.windows(2).all(|w| w[0] < w[1]), "node {}: seqs of {origin} out of order", r.node_id());
            }
        }
        assert!(leader.pipelined.load(Ordering::Relaxed) > 0, "the leader never pipelined");
        assert_eq!(follower.pipelined.load(Ordering::Relaxed), 0, "a follower pipelined forwarded batches");
        shutdown_all(&rs).await;
    });
}

/// openraft drops a snapshot being received when the transfer is aborted (leader change,
/// timeout) without calling install: its partial file must not stay behind until the next start.
#[test]
fn an_aborted_snapshot_transfer_leaves_no_file() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let store = crate::store::Store::open(dir.path()).unwrap();
        let mut sm = storage::StateMachine::new(store);
        let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
        let path = receiving.path().to_path_buf();
        receiving.write_all(b"the first chunk of a snapshot").await.unwrap();
        receiving.flush().await.unwrap();
        assert!(path.exists(), "the transfer writes into {}", path.display());
        drop(receiving);
        assert!(!path.exists(), "{} left behind", path.display());
        // A snapshot taken (what is sent to followers) is written out when first read, and its
        // file stays when a handle is dropped: the next reader gets the same bytes.
        let mut built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 0, "taking a snapshot writes nothing");
        let mut first = Vec::new();
        built.snapshot.read_to_end(&mut first).await.unwrap();
        let kept = built.snapshot.path().to_path_buf();
        assert!(first.starts_with(b"PBSNAP02"), "{} bytes", first.len());
        drop(built);
        assert!(kept.exists(), "{} was removed", kept.display());
        let mut current = sm.get_current_snapshot().await.unwrap().expect("the built snapshot");
        let mut again = Vec::new();
        current.snapshot.read_to_end(&mut again).await.unwrap();
        assert_eq!(again, first);
        assert_eq!(current.snapshot.path(), kept);
        drop(current);
        assert!(kept.exists(), "{} was removed", kept.display());
    });
}

/// A received snapshot whose header covers other entries than openraft's meta says is refused
/// before the state is replaced; the same file with the matching meta installs.
#[test]
fn a_snapshot_whose_header_mismatches_the_meta_is_refused() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, LogId};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    rt().block_on(async {
        let r = Replica::start(cfg(d1.path())).await.unwrap();
        make_file(&r, b"in-the-snapshot").await;
        r.shutdown().await.unwrap();
        drop(r);
        let mut source = storage::StateMachine::new(crate::store::Store::open(d1.path()).unwrap());
        let mut built = source.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let mut bytes = Vec::new();
        built.snapshot.read_to_end(&mut bytes).await.unwrap();
        let good = built.meta.clone();
        assert!(good.last_log_id.is_some());

        let mut target = storage::StateMachine::new(crate::store::Store::open(d2.path()).unwrap());
        let before = target.applied_state().await.unwrap().0;
        let mut bad = good.clone();
        let last = good.last_log_id.unwrap();
        bad.last_log_id = Some(LogId::new(CommittedLeaderId::new(last.leader_id.term, last.leader_id.node_id), last.index + 5));
        let mut receiving = target.begin_receiving_snapshot().await.unwrap();
        receiving.write_all(&bytes).await.unwrap();
        let err = target.install_snapshot(&bad, receiving).await.expect_err("a mismatching header");
        assert!(err.to_string().contains("meta says"), "{err}");
        assert_eq!(target.applied_state().await.unwrap().0, before, "state replaced");

        let mut receiving = target.begin_receiving_snapshot().await.unwrap();
        receiving.write_all(&bytes).await.unwrap();
        target.install_snapshot(&good, receiving).await.unwrap();
        assert_eq!(target.applied_state().await.unwrap().0, good.last_log_id);
    });
}

/// A small seeded generator (xorshift64*) for fault schedules: the same seed, the same schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// This node's applied index and state digest, from one read transaction.
async fn digest_of(r: &Replica) -> (Option<u64>, String) {
    let s = admin::status(r).await.unwrap();
    (s.applied_index, s.state_digest)
}

/// Every node proposes without pause while a seeded schedule cuts nodes off, heals them and
/// restarts any of them, the leader included (shutdown, then a new replica on the same data
/// directory). Nothing acknowledged is lost, and once the network heals every replica reaches the
/// same applied index with the same state digest. The seed is printed; `PICKBOX_CHAOS_SEED`
/// replays one. (A restart here is orderly; `kill -9` of a real process is in fuse-tests.)
#[test]
fn random_faults_lose_no_acknowledged_write_and_replicas_converge() {
    let seed = std::env::var("PICKBOX_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("chaos seed {seed} (PICKBOX_CHAOS_SEED={seed} replays this schedule)");
    let mut rng = Rng::new(seed);
    let ds = dirs(3);
    let timeout = Duration::from_secs(2);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        // None while a node restarts (a writer holding the old replica would keep its database open).
        let nodes: Arc<Mutex<Vec<Option<Arc<Replica>>>>> =
            Arc::new(Mutex::new(cluster(&net, &ds, timeout).await.into_iter().map(Some).collect()));
        // What acknowledged operations promise: the file exists with this content (None: a
        // write to it was not acknowledged, so any content), or it is gone.
        let acked: Arc<Mutex<Vec<(String, Option<Option<Vec<u8>>>)>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for k in 0..3usize {
            let (nodes, acked, stop) = (nodes.clone(), acked.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let Some(r) = nodes.lock().unwrap()[k].clone() else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let name = format!("n{}-{i}", k + 1);
                    i += 1;
                    // Create, write, and remove every fourth file again; whatever is not
                    // acknowledged may or may not have happened and is not checked.
                    let ino = match r.propose(Caller::root(), mk(&name)).await {
                        Ok(Outcome::Inode(n)) => n.ino,
                        Ok(other) => panic!("{name}: {other:?}"),
                        Err(ProposeError::Unavailable(_)) | Err(ProposeError::Fatal(_)) => {
                            // A node shut down for a restart answers at once: do not spin.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        Err(e) => panic!("{name}: {e}"),
                    };
                    let data = format!("{name} ").repeat(1 + (i as usize % 700)).into_bytes();
                    let write = Op::Write { ino, offset: 0, data: data.clone(), append: false };
                    let content = r.propose(Caller::root(), write).await.ok().map(|_| data);
                    let mut promise = Some(content);
                    if i % 4 == 0 {
                        let unlink = Op::Unlink { parent: ROOT_INO, name: name.clone().into_bytes(), expect_closed: None };
                        match r.propose(Caller::root(), unlink).await {
                            Ok(_) => promise = None,
                            Err(_) => continue,
                        }
                    }
                    acked.lock().unwrap().push((name, promise));
                }
            }));
        }
        let progress = |want: usize, what: String| {
            let acked = acked.clone();
            async move {
                let t = Instant::now();
                let from = acked.lock().unwrap().len();
                while acked.lock().unwrap().len() < from + want {
                    assert!(t.elapsed() < Duration::from_secs(30), "no progress {what}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        progress(20, "before any fault".into()).await;
        let mut cut: Vec<NodeId> = Vec::new();
        let mut restarts = 0;
        for round in 0..14 {
            let id = rng.below(3) as NodeId + 1;
            *net.slow.lock().unwrap() = None;
            match rng.below(6) {
                0 if cut.is_empty() => {
                    net.cut(id);
                    cut.push(id);
                    eprintln!("round {round}: cut node {id}");
                }
                4 if cut.is_empty() => {
                    // No quorum anywhere: every write waits, then fails.
                    let other = id % 3 + 1;
                    net.cut(id);
                    net.cut(other);
                    cut.extend([id, other]);
                    eprintln!("round {round}: cut nodes {id} and {other}");
                }
                5 => {
                    // Every message to one node arrives late (concurrent ones out of order).
                    let d = Duration::from_millis(1 + rng.below(20));
                    net.slow_to(id, 0, d);
                    eprintln!("round {round}: messages to node {id} take {d:?}");
                }
                1 => {
                    let old = nodes.lock().unwrap()[id as usize - 1].take().unwrap();
                    old.shutdown().await.unwrap();
                    drop(old);
                    let new = restart_with(cfg_n(ds[id as usize - 1].path(), id, timeout), MemTransport::on(&net, id)).await;
                    net.add(id, &new);
                    nodes.lock().unwrap()[id as usize - 1] = Some(new);
                    restarts += 1;
                    eprintln!("round {round}: restarted node {id}");
                }
                _ => {
                    for id in cut.drain(..) {
                        net.heal(id);
                    }
                    eprintln!("round {round}: healed; waiting for writes to go on");
                    progress(5, format!("after healing in round {round} (seed {seed})")).await;
                }
            }
            // The fault holds for a while (writes go on or wait meanwhile).
            tokio::time::sleep(Duration::from_millis(50 + rng.below(250))).await;
        }
        *net.slow.lock().unwrap() = None;
        for id in cut.drain(..) {
            net.heal(id);
        }
        progress(20, format!("after the last fault (seed {seed})")).await;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.unwrap();
        }
        let rs: Vec<Arc<Replica>> = nodes.lock().unwrap().iter().flatten().cloned().collect();
        // Converge: the same applied index and the same digest everywhere.
        let t = Instant::now();
        let target = loop {
            let mut ds = Vec::new();
            for r in &rs {
                ds.push(digest_of(r).await);
            }
            if ds.iter().all(|d| d == &ds[0]) {
                break ds[0].0.unwrap();
            }
            if t.elapsed() > Duration::from_secs(30) {
                let ms: Vec<_> = rs.iter().map(|r| r.metrics()).collect();
                panic!("replicas do not converge (seed {seed}): {ds:?}; {ms:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let acked = acked.lock().unwrap().clone();
        for r in &rs {
            let v = r.read().unwrap();
            for (name, promise) in &acked {
                let entry = v.entry(ROOT_INO, name.as_bytes()).unwrap();
                let node = r.node_id();
                match (promise, entry) {
                    (None, None) | (Some(None), Some(_)) => {}
                    (None, Some(_)) => panic!("{name}, removed with an acknowledgement, is back on node {node} (seed {seed})"),
                    (Some(_), None) => panic!("acknowledged {name} missing on node {node} (seed {seed})"),
                    (Some(Some(data)), Some(e)) => {
                        let inode = v.inode(e.ino).unwrap().expect("inode");
                        let got = read_range(&*v, &inode, 0, inode.size).unwrap().unwrap();
                        assert!(got == *data, "{name} on node {node}: {} bytes, not the {} acknowledged (seed {seed})", got.len(), data.len());
                    }
                }
            }
        }
        eprintln!("chaos: {} writes acknowledged, {restarts} restarts, converged at index {target}", acked.len());
        shutdown_all(&rs).await;
    });
}

/// Distinct bytes for test data: no two 64 KiB blocks alike (no deduplication), no zero byte (a
/// block is stored without its trailing zeros).
fn distinct(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8 | 1
        })
        .collect()
}

/// Snapshot everything applied, then purge the whole log (its segments leave the log).
async fn snapshot_and_purge_all(r: &Replica) {
    let applied = snapshot_all(r).await;
    r.raft.trigger().purge_log(applied).await.unwrap();
    let t = Instant::now();
    while r.store.first_log_index().unwrap().is_some_and(|f| f <= applied) {
        assert!(t.elapsed() < Duration::from_secs(10), "log not purged: first {:?}", r.store.first_log_index());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until the store's located blocks and packs satisfy `ok` (they change with durable
/// commits, which come at least every STATE_FLUSH_MS).
async fn await_located(r: &Replica, what: &str, ok: impl Fn(&(u64, u64, Vec<u64>, Vec<u64>)) -> bool) -> (u64, u64, Vec<u64>, Vec<u64>) {
    let t = Instant::now();
    loop {
        let s = r.store.located_stats();
        if ok(&s) {
            return s;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "{what}: located blocks, bytes, segments, packs = {s:?}");
        // Any proposal gives the store a state commit (where sweeps and compactions run).
        r.propose(Caller::root(), Op::RegisterNode { node: 1 }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whole blocks of a large write are kept where the log wrote them (no second copy in the state
/// file): they read back, survive a restart, outlive the log as a pack once their entries are
/// purged, and the pack goes once no block refers to it.
#[test]
fn large_writes_stay_in_the_log_and_their_packs_go_with_their_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let a = distinct(1, 1 << 20);
    let b = distinct(2, 1 << 20);
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let fa = make_file(&r, b"a").await;
        let fb = make_file(&r, b"b").await;
        r.propose(Caller::root(), Op::Write { ino: fa.ino, offset: 0, data: a.clone(), append: false }).await.unwrap();
        r.propose(Caller::root(), Op::Write { ino: fb.ino, offset: 0, data: b.clone(), append: false }).await.unwrap();
        // A small write stays in the state file.
        let fc = make_file(&r, b"c").await;
        r.propose(Caller::root(), Op::Write { ino: fc.ino, offset: 0, data: vec![7u8; 1000], append: false }).await.unwrap();
        let (blocks, bytes, segs, packs) = r.store.located_stats();
        assert_eq!((blocks, bytes), (32, 2 << 20), "the 64 KiB blocks of both 1 MiB writes are located");
        assert_eq!(segs.len(), 1, "{segs:?}");
        assert!(packs.is_empty(), "{packs:?}");
        assert_eq!(read_file(&r, b"a"), a);
        assert_eq!(read_file(&r, b"b"), b);
        assert_eq!(read_file(&r, b"c"), vec![7u8; 1000]);
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert_eq!(read_file(&r, b"a"), a);
        snapshot_and_purge_all(&r).await;
        let (_, _, segs, packs) = r.store.located_stats();
        assert_eq!(packs, segs, "the purged segment the state refers to became a pack");
        assert!(std::fs::read_dir(dir.path().join("log")).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().starts_with(&format!("{:020}", segs[0]))));
        assert_eq!(read_file(&r, b"a"), a, "read from the pack");
        assert_eq!(read_file(&r, b"b"), b);
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert_eq!(read_file(&r, b"b"), b, "read from the pack after a restart");
        // Deleting a: the pack is mostly dead (1 MiB of a 64 MiB segment): b's blocks are copied
        // into the state file and the pack goes.
        r.propose(Caller::root(), Op::Unlink { parent: ROOT_INO, name: b"a".to_vec(), expect_closed: None }).await.unwrap();
        let s = await_located(&r, "pack compacted", |s| s.0 == 0).await;
        assert_eq!((s.1, s.2.len()), (0, 0), "nothing located any more: {s:?}");
        // The current snapshot (pinned at start) may still need the pack; it goes once a newer
        // snapshot replaced that one.
        assert_eq!(s.3.len(), 1, "{s:?}");
        r.trigger_snapshot().await.unwrap();
        await_located(&r, "pack deleted", |s| s.3.is_empty()).await;
        assert_eq!(read_file(&r, b"b"), b, "read from the state file");
        assert!(r.read().unwrap().entry(ROOT_INO, b"a").unwrap().is_none());
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert_eq!(read_file(&r, b"b"), b);
        assert!(std::fs::read_dir(dir.path().join("packs")).unwrap().next().is_none(), "no pack left");
        r.shutdown().await.unwrap();
    });
}

/// Every node of a cluster keeps large writes where its own log wrote them; the replicas stay
/// identical (same state digest, same bytes read), and a learner that joins later gets the
/// located blocks through a snapshot built from them.
#[test]
fn located_blocks_replicate_and_digest_alike() {
    let ds = dirs(3);
    let data = distinct(3, 2 << 20);
    rt().block_on(async {
        let net = Arc::new(MemNet::default());
        let rs = cluster(&net, &ds, Duration::from_secs(5)).await;
        let leader = rs.iter().find(|r| r.metrics().current_leader == Some(r.node_id())).unwrap().clone();
        let f = make_file(&leader, b"big").await;
        for (k, piece) in data.chunks(1 << 20).enumerate() {
            let op = Op::Write { ino: f.ino, offset: (k << 20) as u64, data: piece.to_vec(), append: false };
            leader.propose(Caller::root(), op).await.unwrap();
        }
        let target = leader.applied_index().unwrap();
        let mut digests = Vec::new();
        for r in &rs {
            wait_applied_on(r, target).await;
            assert_eq!(read_file(r, b"big"), data, "node {}", r.node_id());
            digests.push(r.store.state_digest(|_| Ok(())).unwrap().1);
        }
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
        // The leader applies only what its own log holds durably.
        assert_eq!(leader.store.located_stats().0, 32, "the leader's 64 KiB blocks are located");
        shutdown_all(&rs).await;
    });
}

/// A crash with located blocks in both the durable state and in applies not yet durable: the
/// durable references still read, and the log replays the rest, locating their blocks again.
#[test]
fn located_blocks_survive_a_crash_before_the_state_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let (a, b) = (distinct(4, 1 << 20), distinct(5, 1 << 20));
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        let fa = make_file(&r, b"a").await;
        r.propose(Caller::root(), Op::Write { ino: fa.ino, offset: 0, data: a.clone(), append: false }).await.unwrap();
        let store = r.store.clone();
        tokio::task::spawn_blocking(move || store.sync_blocking()).await.unwrap().unwrap();
        // Apply commits are not durable for about a second from here.
        let fb = make_file(&r, b"b").await;
        r.propose(Caller::root(), Op::Write { ino: fb.ino, offset: 0, data: b.clone(), append: false }).await.unwrap();
        copy_dir(dir.path(), crashed.path());
        r.shutdown().await.unwrap();
    });
    rt().block_on(async {
        let r = Replica::start(cfg(crashed.path())).await.unwrap();
        assert_eq!(read_file(&r, b"a"), a);
        assert_eq!(read_file(&r, b"b"), b);
        assert_eq!(r.store.located_stats().0, 32, "both writes' blocks located after the replay");
        r.shutdown().await.unwrap();
    });
}

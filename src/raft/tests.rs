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

#[test]
fn snapshot_and_restart_from_it() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        for i in 0..30u32 {
            make_file(&r, format!("s{i}").as_bytes()).await;
        }
        let applied = r.applied_index().unwrap();
        r.trigger_snapshot().await.unwrap();
        let t = Instant::now();
        while r.metrics().snapshot_index.is_none_or(|s| s < applied) {
            assert!(t.elapsed() < Duration::from_secs(10), "no snapshot: {:?}", r.metrics());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(r.metrics().snapshot_index.unwrap() >= applied);
        r.shutdown().await.unwrap();
    });
    let snaps: Vec<_> = std::fs::read_dir(dir.path().join("snapshots")).unwrap().flatten().collect();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    rt().block_on(async {
        let r = Replica::start(cfg(dir.path())).await.unwrap();
        assert!(r.metrics().snapshot_index.is_some());
        for i in 0..30u32 {
            assert!(r.read().unwrap().entry(ROOT_INO, format!("s{i}").as_bytes()).unwrap().is_some());
        }
        r.shutdown().await.unwrap();
    });
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
        r.propose(Caller::root(), Op::Unlink { parent: ROOT_INO, name: b"open-unlinked".to_vec(), origin_open: true })
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

/// An in-process transport: calls the target replica's `handle_rpc` directly (bytes in, bytes out,
/// so the encoding of every RPC is exercised).
#[derive(Default)]
struct MemTransport {
    nodes: Mutex<std::collections::HashMap<NodeId, std::sync::Weak<Replica>>>,
}

impl PeerTransport for MemTransport {
    fn call(&self, target: NodeId, _addr: &str, kind: RpcKind, body: Vec<u8>) -> network::BoxFuture<Result<Vec<u8>, TransportError>> {
        let node = self.nodes.lock().unwrap().get(&target).and_then(|w| w.upgrade());
        Box::pin(async move {
            let Some(r) = node else { return Err(TransportError::Unreachable(target, "not registered".into())) };
            r.handle_rpc(kind, &body).await.map_err(|e| TransportError::Network(target, e.0))
        })
    }
}

#[test]
fn two_nodes_replicate_over_encoded_rpcs() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let net = Arc::new(MemTransport::default());
        let a = Replica::start_with(cfg(d1.path()), net.clone()).await.unwrap();
        net.nodes.lock().unwrap().insert(1, Arc::downgrade(&a));
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let f = make_file(&a, b"before-join").await;
        a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await.unwrap();

        let mut c2 = cfg(d2.path());
        c2.node_id = 2;
        let b = Replica::start_joining(c2, net.clone()).await.unwrap();
        net.nodes.lock().unwrap().insert(2, Arc::downgrade(&b));
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
        // A follower refuses proposals (forwarding comes with the transport).
        let refused = b.propose(Caller::root(), Op::RegisterNode { node: 3 }).await;
        assert!(matches!(refused, Err(ProposeError::Unavailable(_))), "{refused:?}");
        b.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    });
}

#[test]
fn learner_catches_up_by_snapshot_after_purge() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let net = Arc::new(MemTransport::default());
        let a = Replica::start_with(cfg(d1.path()), net.clone()).await.unwrap();
        net.nodes.lock().unwrap().insert(1, Arc::downgrade(&a));
        let f = make_file(&a, b"big").await;
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
        a.propose(Caller::root(), Op::Write { ino: f.ino, offset: 0, data: data.clone(), append: false }).await.unwrap();
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
        let mut c2 = cfg(d2.path());
        c2.node_id = 2;
        let b = Replica::start_joining(c2, net.clone()).await.unwrap();
        net.nodes.lock().unwrap().insert(2, Arc::downgrade(&b));
        a.add_learner(2, "mem:2".into()).await.unwrap();
        let target = a.applied_index().unwrap();
        let t = Instant::now();
        while b.applied_index().unwrap_or(0) < target {
            assert!(t.elapsed() < Duration::from_secs(20), "learner stuck: {:?}", b.metrics());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(b.metrics().snapshot_index.is_some(), "caught up by snapshot: {:?}", b.metrics());
        assert_eq!(read_file(&b, b"big"), data);
        let want = (SNAPSHOT_LOG_KEEP_ENTRIES + 99).to_le_bytes().to_vec();
        assert_eq!(b.read().unwrap().xattr(f.ino, b"user.n").unwrap(), Some(want));
        let snaps: Vec<_> = std::fs::read_dir(d2.path().join("snapshots")).unwrap().flatten().collect();
        assert_eq!(snaps.len(), 1, "{snaps:?}");
        b.shutdown().await.unwrap();
        a.shutdown().await.unwrap();
    });
}

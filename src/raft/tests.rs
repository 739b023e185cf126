//! In-process tests of `Replica`: bootstrap, propose, read back, restart, snapshot, latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::state::{read_range, Errno, FileKind, ROOT_INO};

fn cfg(dir: &std::path::Path) -> ReplicaConfig {
    ReplicaConfig { node_id: 1, data_dir: dir.to_path_buf(), propose_timeout: Duration::from_secs(5) }
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
        r.raft()
            .wait(Some(Duration::from_secs(10)))
            .snapshot(r.raft().metrics().borrow().last_applied.unwrap(), "snapshot built")
            .await
            .unwrap();
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

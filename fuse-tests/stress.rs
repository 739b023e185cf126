//! Load and bad conditions: concurrent writers, a full data disk.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::harness::{errno_of, Node};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn concurrent_writers_and_namespace_changes() {
    let node = Node::start();
    fs::create_dir(node.path("w")).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let p = node.path(&format!("w/file{t}"));
            s.spawn(move || {
                let f = OpenOptions::new().read(true).write(true).create_new(true).open(&p).unwrap();
                let data = pattern(2 * 1024 * 1024, t);
                // Out-of-order chunks at fixed offsets.
                for i in (0..32).rev() {
                    f.write_all_at(&data[i * 65536..(i + 1) * 65536], (i * 65536) as u64).unwrap();
                }
                f.sync_all().unwrap();
            });
        }
        let base = node.path("w");
        s.spawn(move || {
            for i in 0..100 {
                let d = base.join(format!("d{i}"));
                fs::create_dir(&d).unwrap();
                fs::rename(&d, base.join(format!("e{i}"))).unwrap();
            }
        });
    });
    for t in 0..4u8 {
        let got = fs::read(node.path(&format!("w/file{t}"))).unwrap();
        assert!(got == pattern(2 * 1024 * 1024, t), "file{t} content differs");
    }
    assert_eq!(fs::read_dir(node.path("w")).unwrap().count(), 104);
}

#[test]
fn full_disk_gives_enospc_and_keeps_the_replica() {
    // The data dir is a 192 MiB tmpfs; the node keeps a reserve free, so growing writes fail
    // with ENOSPC well before the store itself runs out of space.
    let mut node = Node::start_on_tmpfs(192 * 1024 * 1024);
    fs::write(node.path("keep"), b"written before the disk filled").unwrap();
    let chunk = pattern(1024 * 1024, 7);
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(node.path("fill")).unwrap();
    let mut written = 0usize;
    let err = loop {
        match f.write_all(&chunk).and_then(|_| f.sync_data()) {
            Ok(()) => written += chunk.len(),
            Err(e) => break e,
        }
        assert!(written < 1024 * 1024 * 1024, "1 GiB written to a 192 MiB tmpfs without ENOSPC");
    };
    drop(f);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "a full disk must give ENOSPC, got {err}");
    assert!(node.pid().is_some() && node.wait_exit(std::time::Duration::ZERO).is_none(), "node died on a full disk");
    // Reads and small namespace changes still work.
    assert_eq!(fs::read(node.path("keep")).unwrap(), b"written before the disk filled");
    let len = fs::metadata(node.path("fill")).unwrap().len() as usize;
    assert!(len >= written, "acknowledged writes lost: {len} < {written}");
    fs::create_dir(node.path("still-works")).unwrap();
    // With the kernel's writeback cache the error shows at fsync (and close), not at write(2).
    let big2 = File::create(node.path("big2")).and_then(|mut f| f.write_all(&chunk).and_then(|_| f.sync_all()));
    assert_eq!(errno_of(big2), libc::ENOSPC);
    // Everything acknowledged is there after a clean restart.
    node.restart();
    assert_eq!(fs::read(node.path("keep")).unwrap(), b"written before the disk filled");
    let got = fs::read(node.path("fill")).unwrap();
    assert!(got.len() >= written);
    assert!(got[..written].chunks(chunk.len()).all(|c| c == &chunk[..c.len()]), "fill content damaged");
    assert!(fs::metadata(node.path("still-works")).unwrap().is_dir());
}

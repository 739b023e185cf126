//! Unit and property tests of `apply` against `MemState`, with the invariants checked after every command.

use std::collections::BTreeMap;

use proptest::prelude::*;

use crate::config::{
    BLOCK_BYTES, FILE_BYTES_MAX, LINK_COUNT_MAX, NAME_BYTES_MAX, RESULTS_RETAINED_PER_ORIGIN,
};

use super::acl::encode_entries as acl_value;
use super::apply::S_ISGID;
use super::*;

const T0: i64 = 1_000_000;

fn ts(sec: i64) -> Timespec {
    Timespec { sec, nsec: 0 }
}

fn user(uid: u32, gid: u32) -> Caller {
    Caller {
        uid,
        gid,
        groups: Vec::new(),
        pid: 1,
    }
}

fn command(origin: NodeId, seq: u64, time: i64, caller: Caller, op: Op) -> Command {
    Command {
        origin,
        seq,
        time: ts(time),
        caller,
        content_hash: op.content_hash(),
        op,
    }
}

/// A test harness: one state, commands from node 1 as root unless said otherwise.
struct H {
    s: MemState,
    seq: BTreeMap<NodeId, u64>,
    time: i64,
}

impl H {
    /// An initialised state with node 1 registered.
    fn new() -> H {
        let mut h = H {
            s: MemState::new(),
            seq: BTreeMap::new(),
            time: T0,
        };
        h.ok(Op::Init {
            perm: 0o755,
            uid: 0,
            gid: 0,
        });
        h.ok(Op::RegisterNode { node: 1 });
        h
    }

    fn next(&mut self, origin: NodeId) -> u64 {
        let seq = self.seq.entry(origin).or_insert(0);
        *seq += 1;
        *seq
    }

    fn apply_checked(&mut self, cmd: &Command) -> CommandResult {
        let before = self.s.clone();
        let r = apply(&mut self.s, cmd).expect("no store fault");
        if let Err(e) = &r {
            assert!(
                self.s.same_namespace(&before),
                "failed command {:?} ({e:?}) changed the state",
                cmd.op
            );
        }
        check_invariants(&self.s).unwrap_or_else(|e| panic!("after {:?}: {e}", cmd.op));
        r
    }

    fn run_from(&mut self, origin: NodeId, caller: Caller, op: Op) -> CommandResult {
        self.time += 1;
        let seq = self.next(origin);
        let cmd = command(origin, seq, self.time, caller, op);
        self.apply_checked(&cmd)
    }

    fn run_as(&mut self, caller: Caller, op: Op) -> CommandResult {
        self.run_from(1, caller, op)
    }

    fn run(&mut self, op: Op) -> CommandResult {
        self.run_as(Caller::root(), op)
    }

    fn ok(&mut self, op: Op) -> Outcome {
        let d = format!("{op:?}");
        self.run(op).unwrap_or_else(|e| panic!("{d}: {e:?}"))
    }

    fn err(&mut self, op: Op) -> Errno {
        let d = format!("{op:?}");
        match self.run(op) {
            Ok(o) => panic!("{d} succeeded: {o:?}"),
            Err(e) => e,
        }
    }

    fn attr(&self, ino: Ino) -> Inode {
        self.s.inodes.get(&ino).cloned().expect("live inode")
    }

    fn lookup(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.s
            .entries
            .get(&(parent, name.as_bytes().to_vec()))
            .map(|e| e.ino)
    }

    fn mk(&mut self, parent: Ino, name: &str, kind: FileKind, perm: u32) -> Ino {
        match self.ok(Op::MakeNode {
            parent,
            name: name.into(),
            kind,
            perm,
            rdev: 0,
        }) {
            Outcome::Inode(i) => i.ino,
            o => panic!("{o:?}"),
        }
    }

    fn file(&mut self, parent: Ino, name: &str) -> Ino {
        self.mk(parent, name, FileKind::File, 0o644)
    }

    fn dir(&mut self, parent: Ino, name: &str) -> Ino {
        self.mk(parent, name, FileKind::Dir, 0o755)
    }

    fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) {
        self.ok(Op::Write {
            ino,
            offset,
            data: data.to_vec(),
            append: false,
        });
    }

    fn read(&self, ino: Ino) -> Vec<u8> {
        let inode = self.attr(ino);
        read_range(&self.s, &inode, 0, inode.size).unwrap().unwrap()
    }

    /// The inode `(parent, name)` names now, as a proposer that holds it closed expects it.
    fn closed(&self, parent: Ino, name: &str) -> Option<Ino> {
        self.s.entry(parent, name.as_bytes()).unwrap().map(|e| e.ino)
    }

    fn rename(&mut self, p: Ino, n: &str, np: Ino, nn: &str, flags: RenameFlags) -> CommandResult {
        let expect_closed = self.closed(np, nn);
        self.run(Op::Rename {
            parent: p,
            name: n.into(),
            new_parent: np,
            new_name: nn.into(),
            flags,
            expect_closed,
        })
    }

    fn unlink(&mut self, parent: Ino, name: &str) -> CommandResult {
        let expect_closed = self.closed(parent, name);
        self.run(Op::Unlink {
            parent,
            name: name.into(),
            expect_closed,
        })
    }

    fn chmod(&mut self, ino: Ino, perm: u32) -> Op {
        Op::SetAttr {
            ino,
            perm: Some(perm),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        }
    }
}

fn truncate(ino: Ino, size: u64) -> Op {
    Op::SetAttr {
        ino,
        perm: None,
        uid: None,
        gid: None,
        size: Some(size),
        atime: None,
        mtime: None,
    }
}

fn chown(ino: Ino, uid: Option<u32>, gid: Option<u32>) -> Op {
    Op::SetAttr {
        ino,
        perm: None,
        uid,
        gid,
        size: None,
        atime: None,
        mtime: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Init, register, dedup, content hash.

#[test]
fn init_creates_root_once() {
    let mut h = H::new();
    let root = h.attr(ROOT_INO);
    assert_eq!(
        (root.kind, root.parent, root.nlink, root.perm),
        (FileKind::Dir, ROOT_INO, 2, 0o755)
    );
    assert_eq!(h.s.meta.next_ino, 2);
    assert_eq!(h.s.meta.next_cookie, 3);
    assert_eq!(h.s.meta.inode_count, 1);
    assert_eq!(
        h.err(Op::Init {
            perm: 0o755,
            uid: 0,
            gid: 0
        }),
        Errno::Exist
    );
}

#[test]
fn register_and_unregister_are_idempotent() {
    let mut h = H::new();
    h.ok(Op::RegisterNode { node: 3 });
    h.ok(Op::RegisterNode { node: 3 });
    h.ok(Op::RegisterNode { node: 2 });
    assert_eq!(h.s.meta.nodes, vec![1, 2, 3]);
    h.ok(Op::UnregisterNode { node: 3 });
    h.ok(Op::UnregisterNode { node: 3 });
    assert_eq!(h.s.meta.nodes, vec![1, 2]);
}

#[test]
fn repeated_command_returns_first_result_and_changes_nothing() {
    // Origin 4: the helper numbers origin 1's commands from 1, below these explicit seqs.
    let mut h = H::new();
    let cmd = command(
        4,
        100,
        T0 + 5,
        Caller::root(),
        Op::MakeNode {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
        },
    );
    let first = apply(&mut h.s, &cmd).unwrap();
    assert!(first.is_ok());
    let after = h.s.clone();
    assert_eq!(apply(&mut h.s, &cmd).unwrap(), first);
    assert_eq!(h.s, after);
    // A failed result is remembered too.
    let bad = command(
        4,
        101,
        T0 + 6,
        Caller::root(),
        Op::Rmdir {
            parent: ROOT_INO,
            name: b"nope".to_vec(),
        },
    );
    assert_eq!(apply(&mut h.s, &bad).unwrap(), Err(Errno::NoEnt));
    h.dir(ROOT_INO, "nope");
    assert_eq!(apply(&mut h.s, &bad).unwrap(), Err(Errno::NoEnt));
}

#[test]
fn old_retries_are_stale_and_results_are_pruned() {
    let mut h = H::new();
    let op = Op::RegisterNode { node: 9 };
    let far = 10 + RESULTS_RETAINED_PER_ORIGIN;
    apply(&mut h.s, &command(5, 3, T0, Caller::root(), op.clone()))
        .unwrap()
        .unwrap();
    apply(&mut h.s, &command(5, far, T0, Caller::root(), op.clone()))
        .unwrap()
        .unwrap();
    // seq 3 is below the retained window and its result is gone.
    assert!(!h.s.results.contains_key(&(5, 3)));
    let before = h.s.clone();
    assert_eq!(
        apply(&mut h.s, &command(5, 4, T0, Caller::root(), op.clone())).unwrap(),
        Err(Errno::Stale)
    );
    assert_eq!(h.s, before, "a stale command records nothing");
    // Inside the window, an unseen seq below the highest is stale too (see the next test).
    assert_eq!(
        apply(&mut h.s, &command(5, far - 5, T0, Caller::root(), op)).unwrap(),
        Err(Errno::Stale)
    );
}

/// A batch that was given up and superseded by a later one must not apply when it arrives late:
/// a seq below the origin's highest with no stored result is `Stale` and changes nothing, while
/// a retry of an applied seq still gets its first result.
#[test]
fn late_superseded_command_is_stale_and_not_applied() {
    let mut h = H::new();
    let mk = |seq: u64, name: &str| {
        command(
            7,
            seq,
            T0 + 1,
            Caller::root(),
            Op::MakeNode {
                parent: ROOT_INO,
                name: name.as_bytes().to_vec(),
                kind: FileKind::File,
                perm: 0o644,
                rdev: 0,
            },
        )
    };
    // Seqs 10 and 11 formed a batch that timed out; 12 was proposed later and applied first.
    let later = apply(&mut h.s, &mk(12, "later")).unwrap();
    assert!(later.is_ok(), "{later:?}");
    let before = h.s.clone();
    assert_eq!(apply(&mut h.s, &mk(10, "late-a")).unwrap(), Err(Errno::Stale));
    assert_eq!(apply(&mut h.s, &mk(11, "late-b")).unwrap(), Err(Errno::Stale));
    assert_eq!(h.s, before, "a stale command changes nothing and records nothing");
    assert!(!h.s.entries.contains_key(&(ROOT_INO, b"late-a".to_vec())));
    // The duplicate rule still holds for the applied one.
    assert_eq!(apply(&mut h.s, &mk(12, "later")).unwrap(), later);
    // And the next seq applies.
    assert!(apply(&mut h.s, &mk(13, "next")).unwrap().is_ok());
}

#[test]
fn content_hash_mismatch_is_io_and_recorded() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let mut cmd = command(
        1,
        50,
        T0 + 9,
        Caller::root(),
        Op::Write {
            ino: f,
            offset: 0,
            data: b"hi".to_vec(),
            append: false,
        },
    );
    cmd.content_hash[0] ^= 1;
    let before = h.s.clone();
    assert_eq!(apply(&mut h.s, &cmd).unwrap(), Err(Errno::Io));
    assert!(h.s.same_namespace(&before));
    assert_eq!(h.s.results.get(&(1, 50)), Some(&Err(Errno::Io)));
}

/// `len` bytes that differ per `seed` (xorshift; zeros occur, as in real data).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn write_content_hash_is_hash_of_block_piece_hashes() {
    let b = BLOCK_BYTES as usize;
    let data = noise(2 * b + 200, 1);
    // At BLOCK_BYTES - 100 the cut is 100 | block | block | 100.
    let cuts = [0, 100, 100 + b, 100 + 2 * b, 200 + 2 * b];
    let mut hashes = Vec::new();
    for w in cuts.windows(2) {
        hashes.extend_from_slice(&sha256(&data[w[0]..w[1]]));
    }
    let op = |offset: u64, append: bool| Op::Write {
        ino: 5,
        offset,
        data: data.clone(),
        append,
    };
    assert_eq!(op(BLOCK_BYTES - 100, false).content_hash(), sha256(&hashes));
    // The cut depends on the offset within a block only, append or not.
    assert_eq!(op(7 * BLOCK_BYTES - 100, true).content_hash(), sha256(&hashes));
    let digest = op(BLOCK_BYTES - 100, false).content_digest();
    assert_eq!(digest.pieces.len(), 4);
    assert_eq!(digest.pieces[1], sha256(&data[100..100 + b]));
    // Aligned: whole blocks and a short tail.
    let mut aligned = Vec::new();
    for piece in data.chunks(b) {
        aligned.extend_from_slice(&sha256(piece));
    }
    assert_eq!(op(3 * BLOCK_BYTES, false).content_hash(), sha256(&aligned));
    assert_ne!(op(0, false).content_hash(), sha256(&data));
    // An empty write hashes nothing; other payloads are hashed as they are.
    let empty = Op::Write {
        ino: 5,
        offset: 3,
        data: Vec::new(),
        append: false,
    };
    assert_eq!(empty.content_hash(), sha256(b""));
    let xattr = Op::SetXattr {
        ino: 5,
        name: b"user.a".to_vec(),
        value: data.clone(),
        flags: XattrFlags::Any,
    };
    assert_eq!(xattr.content_hash(), sha256(&data));
    assert!(xattr.content_digest().pieces.is_empty());
}

#[test]
fn tampered_write_payload_is_rejected() {
    let b = BLOCK_BYTES as usize;
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.write(f, 0, &noise(4 * b, 2));
    let offset = BLOCK_BYTES - 100;
    let data = noise(3 * b + 50, 3);
    let good = command(
        1,
        100,
        T0 + 50,
        Caller::root(),
        Op::Write {
            ino: f,
            offset,
            data: data.clone(),
            append: false,
        },
    );
    type Tamper = (&'static str, fn(&mut Vec<u8>));
    let tampers: [Tamper; 5] = [
        ("a byte of a whole block", |d| d[100 + BLOCK_BYTES as usize + 7] ^= 0x40),
        ("a byte of the partial head", |d| d[3] ^= 1),
        ("a byte of the partial tail", |d| *d.last_mut().unwrap() ^= 0x80),
        ("two whole blocks swapped", |d| {
            let b = BLOCK_BYTES as usize;
            let (x, y) = d[100..100 + 2 * b].split_at_mut(b);
            x.swap_with_slice(y);
        }),
        ("the last byte lost", |d| {
            d.pop();
        }),
    ];
    for (seq, (what, tamper)) in (50u64..).zip(tampers) {
        let mut cmd = good.clone();
        cmd.seq = seq;
        let Op::Write { data, .. } = &mut cmd.op else {
            unreachable!()
        };
        tamper(data);
        assert_ne!(cmd.op, good.op, "{what}: the tamper changed nothing");
        let before = h.s.clone();
        assert_eq!(apply(&mut h.s, &cmd).unwrap(), Err(Errno::Io), "{what}");
        assert!(h.s.same_namespace(&before), "{what}: a rejected write changed the state");
        assert_eq!(h.s.results.get(&(1, seq)), Some(&Err(Errno::Io)), "{what}");
    }
    // The untampered command applies.
    assert!(apply(&mut h.s, &good).unwrap().is_ok());
    check_invariants(&h.s).unwrap();
    let mut want = noise(4 * b, 2);
    want[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    assert_eq!(h.read(f), want);
}

#[test]
fn write_with_a_plain_sha256_content_hash_still_applies() {
    // Entries proposed before write hashes were hashes of piece hashes may be replayed from a log.
    let b = BLOCK_BYTES as usize;
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let data = noise(2 * b + 9, 4);
    let op = Op::Write {
        ino: f,
        offset: 0,
        data: data.clone(),
        append: false,
    };
    let mut cmd = command(1, 60, T0 + 60, Caller::root(), op);
    cmd.content_hash = sha256(&data);
    assert!(apply(&mut h.s, &cmd).unwrap().is_ok());
    check_invariants(&h.s).unwrap();
    assert_eq!(h.read(f), data);
}

/// What each block of a file with `content` must be stored as: trailing zeros cut, all-zero blocks
/// not stored, keyed by SHA-256.
fn expected_blocks(content: &[u8]) -> BTreeMap<u64, Hash> {
    content
        .chunks(BLOCK_BYTES as usize)
        .enumerate()
        .filter_map(|(i, block)| {
            let block = super::content::canonical(block);
            (!block.is_empty()).then(|| (i as u64, sha256(block)))
        })
        .collect()
}

#[test]
fn writes_reusing_piece_hashes_store_what_block_merging_stores() {
    let b = BLOCK_BYTES as usize;
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    // `merged` gets every write as sub-writes that never cover a whole block, so every block goes
    // through load, merge and hash: how every write was stored before piece hashes were reused.
    let mut reused = h.s.clone();
    let mut merged = h.s.clone();
    let mut model: Vec<u8> = Vec::new();
    let (mut seq_r, mut seq_m) = (100u64, 100u64);
    // A block ending in zeros and an all-zero block (trimmed and a hole when covered whole).
    let mut zeros = noise(3 * b, 5);
    zeros[b - 10..b].fill(0);
    zeros[b..2 * b].fill(0);
    let dup = noise(b, 6);
    let mut twice = dup.clone();
    twice.extend_from_slice(&dup);
    // (offset, data, append): aligned, unaligned, ending at a boundary, zeros, appends whose
    // proposed offset cuts like the real one and ones that do not, identical blocks, rewrites.
    let writes: Vec<(u64, Vec<u8>, bool)> = vec![
        (0, noise(3 * b, 7), false),
        (BLOCK_BYTES - 100, noise(3 * b + 50, 8), false),
        (7, noise(b - 7, 9), false),
        (5 * BLOCK_BYTES, zeros.clone(), false),
        (5 * BLOCK_BYTES + 1, zeros, false),
        (0, noise(2 * b + 3, 10), true),
        (8 * BLOCK_BYTES + 3, noise(2 * b + 1, 11), true),
        (12 * BLOCK_BYTES, twice, false),
        (12 * BLOCK_BYTES, dup, false),
        (20 * BLOCK_BYTES + 1, noise(1 << 20, 12), false),
        (21 * BLOCK_BYTES, noise(1 << 20, 12), false),
        (3, vec![0; 2 * b], false),
        (0, noise(b + 1, 13), true),
    ];
    for (i, (offset, data, append)) in writes.into_iter().enumerate() {
        let time = T0 + 100 + i as i64;
        let at = if append { model.len() } else { offset as usize };
        // As proposed: one command, its pieces reused where they are whole blocks.
        seq_r += 1;
        let op = Op::Write {
            ino: f,
            offset,
            data: data.clone(),
            append,
        };
        let r = apply(&mut reused, &command(1, seq_r, time, Caller::root(), op)).unwrap();
        assert!(r.is_ok(), "write {i}: {r:?}");
        check_invariants(&reused).unwrap_or_else(|e| panic!("write {i}: {e}"));
        // Block by block, merged.
        let mut done = 0;
        while done < data.len() {
            let pos = at + done;
            let mut n = (b - pos % b).min(data.len() - done);
            if n == b {
                n -= 1;
            }
            seq_m += 1;
            let op = Op::Write {
                ino: f,
                offset: pos as u64,
                data: data[done..done + n].to_vec(),
                append: false,
            };
            let r = apply(&mut merged, &command(1, seq_m, time, Caller::root(), op)).unwrap();
            assert!(r.is_ok(), "write {i} at {pos}: {r:?}");
            done += n;
        }
        check_invariants(&merged).unwrap_or_else(|e| panic!("write {i}: {e}"));
        if model.len() < at + data.len() {
            model.resize(at + data.len(), 0);
        }
        model[at..at + data.len()].copy_from_slice(&data);
        assert!(reused.same_namespace(&merged), "write {i}: the states differ");
        let inode = &reused.inodes[&f];
        assert_eq!(inode.size, model.len() as u64);
        assert_eq!(read_range(&reused, inode, 0, inode.size).unwrap().unwrap(), model);
        let stored: BTreeMap<u64, Hash> = reused
            .block_map
            .range((f, 0)..=(f, u64::MAX))
            .map(|((_, index), hash)| (*index, *hash))
            .collect();
        assert_eq!(stored, expected_blocks(&model), "write {i}: block map");
        assert_eq!(inode.blocks, stored.len() as u64);
    }
    assert!(reused.block_refs.values().any(|r| *r > 1), "no identical blocks shared");
}

// ---------------------------------------------------------------------------------------------
// Create.

#[test]
fn make_node_sets_attributes_and_parent_times() {
    let mut h = H::new();
    let r = h.run_as(
        user(1000, 100),
        Op::MakeNode {
            parent: ROOT_INO,
            name: b"f".to_vec(),
            kind: FileKind::File,
            perm: 0o640,
            rdev: 7,
        },
    );
    let Ok(Outcome::Inode(f)) = r else {
        panic!("{r:?}")
    };
    let t = ts(h.time);
    assert_eq!(
        (f.uid, f.gid, f.perm, f.nlink, f.size, f.rdev),
        (1000, 100, 0o640, 1, 0, 0)
    );
    assert_eq!((f.atime, f.mtime, f.ctime, f.crtime), (t, t, t, t));
    let root = h.attr(ROOT_INO);
    assert_eq!((root.mtime, root.ctime, root.nlink), (t, t, 2));
    assert_eq!(h.s.entries[&(ROOT_INO, b"f".to_vec())].cookie, 3);
    let d = h.dir(ROOT_INO, "d");
    assert_eq!(h.attr(d).nlink, 2);
    assert_eq!(h.attr(d).parent, ROOT_INO);
    assert_eq!(h.attr(ROOT_INO).nlink, 3);
    let c = match h.ok(Op::MakeNode {
        parent: d,
        name: b"c".to_vec(),
        kind: FileKind::CharDev,
        perm: 0o600,
        rdev: 0x0103,
    }) {
        Outcome::Inode(i) => i,
        o => panic!("{o:?}"),
    };
    assert_eq!((c.kind, c.rdev), (FileKind::CharDev, 0x0103));
    h.mk(d, "fifo", FileKind::Fifo, 0o644);
    h.mk(d, "sock", FileKind::Socket, 0o644);
}

#[test]
fn names_are_checked() {
    let mut h = H::new();
    let mk = |name: &[u8]| Op::MakeNode {
        parent: ROOT_INO,
        name: name.to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
    };
    assert_eq!(h.err(mk(b"")), Errno::Inval);
    assert_eq!(h.err(mk(b"a/b")), Errno::Inval);
    assert_eq!(h.err(mk(b"a\0b")), Errno::Inval);
    assert_eq!(h.err(mk(b".")), Errno::Exist);
    assert_eq!(h.err(mk(b"..")), Errno::Exist);
    assert_eq!(
        h.err(mk(&vec![b'x'; NAME_BYTES_MAX + 1])),
        Errno::NameTooLong
    );
    h.ok(mk(&vec![b'x'; NAME_BYTES_MAX]));
    h.ok(mk(b"f"));
    assert_eq!(h.err(mk(b"f")), Errno::Exist);
    let f = h.lookup(ROOT_INO, "f").unwrap();
    let in_file = Op::MakeNode {
        parent: f,
        name: b"x".to_vec(),
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
    };
    assert_eq!(h.err(in_file), Errno::NotDir);
    let nowhere = Op::MakeNode {
        parent: 999,
        name: b"x".to_vec(),
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
    };
    assert_eq!(h.err(nowhere), Errno::NoEnt);
    let sym = Op::MakeNode {
        parent: ROOT_INO,
        name: b"s".to_vec(),
        kind: FileKind::Symlink,
        perm: 0o777,
        rdev: 0,
    };
    assert_eq!(h.err(sym), Errno::Inval);
}

#[test]
fn setgid_directories_pass_on_their_group() {
    let mut h = H::new();
    let d = h.mk(ROOT_INO, "d", FileKind::Dir, 0o2775);
    assert_eq!(
        h.attr(d).perm,
        0o775,
        "mkdir keeps no setgid bit of its own (Linux)"
    );
    h.ok(chown(d, Some(0), Some(50)));
    h.ok(h_chmod(d, 0o2775));
    assert_eq!(h.attr(d).perm & S_ISGID, S_ISGID);
    let mk = |name: &str, kind, perm| Op::MakeNode {
        parent: d,
        name: name.into(),
        kind,
        perm,
        rdev: 0,
    };
    // A member keeps setgid on a file; the group comes from the directory.
    let Ok(Outcome::Inode(a)) = h.run_as(
        Caller {
            uid: 7,
            gid: 8,
            groups: vec![50],
            pid: 1,
        },
        mk("a", FileKind::File, 0o2755),
    ) else {
        panic!()
    };
    assert_eq!((a.gid, a.perm), (50, 0o2755));
    // A non-member loses it.
    let Ok(Outcome::Inode(b)) = h.run_as(user(7, 8), mk("b", FileKind::File, 0o2755)) else {
        panic!()
    };
    assert_eq!((b.gid, b.perm), (50, 0o755));
    // A subdirectory inherits setgid.
    let Ok(Outcome::Inode(sub)) = h.run_as(user(7, 8), mk("sub", FileKind::Dir, 0o755)) else {
        panic!()
    };
    assert_eq!((sub.gid, sub.perm), (50, 0o2755));
    // Outside a setgid directory the caller's group is used.
    let Ok(Outcome::Inode(c)) = h.run_as(
        user(7, 8),
        Op::MakeNode {
            parent: ROOT_INO,
            name: b"c".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
        },
    ) else {
        panic!()
    };
    assert_eq!(c.gid, 8);
}

#[test]
fn symlink_targets_are_checked() {
    let mut h = H::new();
    let sym = |name: &str, target: Vec<u8>| Op::Symlink {
        parent: ROOT_INO,
        name: name.into(),
        target,
    };
    let Outcome::Inode(s) = h.ok(sym("s", b"/some/where".to_vec())) else {
        panic!()
    };
    assert_eq!(
        (s.kind, s.size, s.perm, s.nlink),
        (FileKind::Symlink, 11, 0o777, 1)
    );
    assert_eq!(h.err(sym("e", Vec::new())), Errno::NoEnt);
    assert_eq!(h.err(sym("l", vec![b'x'; 4096])), Errno::NameTooLong);
    h.ok(sym("m", vec![b'x'; 4095]));
    assert_eq!(h.err(sym("s", b"x".to_vec())), Errno::Exist);
}

// ---------------------------------------------------------------------------------------------
// Link, unlink, rmdir, orphans.

#[test]
fn link_counts_and_times() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let d = h.dir(ROOT_INO, "d");
    let Outcome::Inode(i) = h.ok(Op::Link {
        ino: f,
        new_parent: d,
        new_name: b"g".to_vec(),
    }) else {
        panic!()
    };
    let t = ts(h.time);
    assert_eq!((i.nlink, i.ctime), (2, t));
    assert_eq!((h.attr(d).mtime, h.attr(d).ctime), (t, t));
    assert_eq!(
        h.err(Op::Link {
            ino: f,
            new_parent: d,
            new_name: b"g".to_vec()
        }),
        Errno::Exist
    );
    assert_eq!(
        h.err(Op::Link {
            ino: d,
            new_parent: ROOT_INO,
            new_name: b"dd".to_vec()
        }),
        Errno::Perm
    );
    assert_eq!(
        h.err(Op::Link {
            ino: 999,
            new_parent: ROOT_INO,
            new_name: b"x".to_vec()
        }),
        Errno::NoEnt
    );
    assert_eq!(
        h.err(Op::Link {
            ino: f,
            new_parent: f,
            new_name: b"x".to_vec()
        }),
        Errno::NotDir
    );
    // Unlinking one name keeps the other.
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(h.attr(f).nlink, 1);
    assert_eq!(h.lookup(d, "g"), Some(f));
}

#[test]
fn link_count_limit() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.s.inodes.get_mut(&f).unwrap().nlink = LINK_COUNT_MAX;
    let cmd = command(
        1,
        999,
        T0,
        Caller::root(),
        Op::Link {
            ino: f,
            new_parent: ROOT_INO,
            new_name: b"g".to_vec(),
        },
    );
    assert_eq!(apply(&mut h.s, &cmd).unwrap(), Err(Errno::TooManyLinks));
}

#[test]
fn unlink_errors_and_freeing() {
    let mut h = H::new();
    let d = h.dir(ROOT_INO, "d");
    let f = h.file(d, "f");
    h.write(f, 0, b"data");
    h.ok(Op::SetXattr {
        ino: f,
        name: b"user.a".to_vec(),
        value: b"v".to_vec(),
        flags: XattrFlags::Any,
    });
    assert_eq!(h.unlink(ROOT_INO, "d"), Err(Errno::IsDir));
    assert_eq!(h.unlink(d, "."), Err(Errno::IsDir));
    assert_eq!(h.unlink(d, "nope"), Err(Errno::NoEnt));
    assert_eq!(h.unlink(999, "f"), Err(Errno::NoEnt));
    h.unlink(d, "f").unwrap();
    let t = ts(h.time);
    assert!(!h.s.inodes.contains_key(&f), "the only node: freed at once");
    assert!(h.s.blocks.is_empty() && h.s.xattrs.is_empty());
    assert_eq!((h.attr(d).mtime, h.attr(d).ctime), (t, t));
}

#[test]
fn open_unlinked_files_wait_for_every_node() {
    let mut h = H::new();
    h.ok(Op::RegisterNode { node: 2 });
    h.ok(Op::RegisterNode { node: 3 });
    let f = h.file(ROOT_INO, "f");
    h.write(f, 0, b"still here");
    h.unlink(ROOT_INO, "f").unwrap();
    assert_eq!(h.s.orphans[&f].pending, vec![2, 3]);
    assert_eq!(h.attr(f).nlink, 0);
    assert_eq!(h.read(f), b"still here");
    h.write(f, 0, b"STILL");
    assert_eq!(h.read(f), b"STILL here");
    // Node 1 did not hold it open: its release changes nothing.
    h.ok(Op::Release { ino: f });
    assert_eq!(h.s.orphans[&f].pending, vec![2, 3]);
    h.run_from(2, Caller::root(), Op::Release { ino: f })
        .unwrap();
    assert_eq!(h.s.orphans[&f].pending, vec![3]);
    h.ok(Op::UnregisterNode { node: 3 });
    assert!(!h.s.inodes.contains_key(&f));
    assert!(h.s.orphans.is_empty() && h.s.blocks.is_empty());
}

#[test]
fn no_expectation_keeps_the_origin_pending() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.ok(Op::Unlink {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        expect_closed: None,
    });
    assert_eq!(h.s.orphans[&f].pending, vec![1]);
    h.ok(Op::Release { ino: f });
    assert!(!h.s.inodes.contains_key(&f));
}

/// The origin expected inode `f` under the name, but another node's rename put `g` there first:
/// the removal takes `g`, which the origin may hold open, so the origin stays pending for it; the
/// outcome names the removed inode so the origin knows to release it.
#[test]
fn a_stale_expectation_keeps_the_origin_pending() {
    let mut h = H::new();
    h.ok(Op::RegisterNode { node: 2 });
    let f = h.file(ROOT_INO, "f");
    let g = h.file(ROOT_INO, "g");
    let x = h.file(ROOT_INO, "x");
    let rename = |name: &str, new_name: &str, expect_closed| Op::Rename {
        parent: ROOT_INO,
        name: name.into(),
        new_parent: ROOT_INO,
        new_name: new_name.into(),
        flags: RenameFlags::default(),
        expect_closed,
    };
    // Node 2 renames g over f, holding f closed: f waits for node 1 only.
    h.run_from(2, Caller::root(), rename("g", "f", Some(f))).unwrap();
    assert_eq!(h.s.orphans[&f].pending, vec![1]);
    // Node 1 unlinks "f" still expecting f there: it removes g, and stays pending for it.
    let removed = h.ok(Op::Unlink { parent: ROOT_INO, name: b"f".to_vec(), expect_closed: Some(f) });
    assert!(matches!(&removed, Outcome::Inode(i) if i.ino == g && i.nlink == 0), "{removed:?}");
    assert_eq!(h.s.orphans[&g].pending, vec![1, 2]);
    // The same for a replacing rename: node 1 moves x over "z" expecting z there, but node 2
    // moved y over it first.
    let z = h.file(ROOT_INO, "z");
    let y = h.file(ROOT_INO, "y");
    h.run_from(2, Caller::root(), rename("y", "z", Some(z))).unwrap();
    assert_eq!(h.s.orphans[&z].pending, vec![1]);
    let replaced = h.ok(rename("x", "z", Some(z)));
    assert!(matches!(&replaced, Outcome::Inode(i) if i.ino == y && i.nlink == 0), "{replaced:?}");
    assert_eq!(h.s.orphans[&y].pending, vec![1, 2]);
    // A matching expectation: only the other node is asked.
    let w = h.file(ROOT_INO, "w");
    h.ok(Op::Unlink { parent: ROOT_INO, name: b"w".to_vec(), expect_closed: Some(w) });
    assert_eq!(h.s.orphans[&w].pending, vec![2]);
    // An unlink of one of two names orphans nothing, whatever it expected.
    h.ok(Op::Link { ino: x, new_parent: ROOT_INO, new_name: b"x2".to_vec() });
    let kept = h.ok(Op::Unlink { parent: ROOT_INO, name: b"z".to_vec(), expect_closed: None });
    assert!(matches!(&kept, Outcome::Inode(i) if i.ino == x && i.nlink == 1), "{kept:?}");
    assert!(!h.s.orphans.contains_key(&x));
}

#[test]
fn rmdir_cases() {
    let mut h = H::new();
    let d = h.dir(ROOT_INO, "d");
    let e = h.dir(d, "e");
    h.file(ROOT_INO, "f");
    let rm = |p: Ino, n: &str| Op::Rmdir {
        parent: p,
        name: n.into(),
    };
    assert_eq!(h.err(rm(ROOT_INO, "f")), Errno::NotDir);
    assert_eq!(h.err(rm(ROOT_INO, "d")), Errno::NotEmpty);
    assert_eq!(h.err(rm(d, ".")), Errno::Inval);
    assert_eq!(h.err(rm(d, "..")), Errno::NotEmpty);
    assert_eq!(h.err(rm(d, "x")), Errno::NoEnt);
    assert_eq!(h.attr(d).nlink, 3);
    h.ok(rm(d, "e"));
    assert!(!h.s.inodes.contains_key(&e));
    assert_eq!(h.attr(d).nlink, 2);
    h.ok(rm(ROOT_INO, "d"));
    assert_eq!(h.attr(ROOT_INO).nlink, 2);
}

// ---------------------------------------------------------------------------------------------
// Rename.

#[test]
fn rename_moves_with_a_new_cookie_and_times() {
    let mut h = H::new();
    let d = h.dir(ROOT_INO, "d");
    let f = h.file(ROOT_INO, "f");
    h.file(ROOT_INO, "stay");
    let stay_cookie = h.s.entries[&(ROOT_INO, b"stay".to_vec())].cookie;
    let old_cookie = h.s.entries[&(ROOT_INO, b"f".to_vec())].cookie;
    h.rename(ROOT_INO, "f", d, "g", RenameFlags::default())
        .unwrap();
    let t = ts(h.time);
    assert_eq!(h.lookup(d, "g"), Some(f));
    assert_eq!(h.lookup(ROOT_INO, "f"), None);
    let new_cookie = h.s.entries[&(d, b"g".to_vec())].cookie;
    assert!(new_cookie > old_cookie);
    assert_eq!(
        h.s.entries[&(ROOT_INO, b"stay".to_vec())].cookie,
        stay_cookie
    );
    assert_eq!(h.attr(f).ctime, t);
    assert_eq!(
        (h.attr(d).mtime, h.attr(d).ctime, h.attr(ROOT_INO).mtime),
        (t, t, t)
    );
    assert_eq!(
        h.rename(ROOT_INO, "f", d, "x", RenameFlags::default()),
        Err(Errno::NoEnt)
    );
}

#[test]
fn rename_of_two_names_of_one_inode_does_nothing() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.ok(Op::Link {
        ino: f,
        new_parent: ROOT_INO,
        new_name: b"g".to_vec(),
    });
    let before = h.s.clone();
    h.rename(ROOT_INO, "f", ROOT_INO, "g", RenameFlags::default())
        .unwrap();
    assert!(h.s.same_namespace(&before));
    assert_eq!(h.attr(f).nlink, 2);
}

#[test]
fn rename_kind_conflicts() {
    let mut h = H::new();
    let a = h.dir(ROOT_INO, "a");
    h.dir(ROOT_INO, "b");
    h.file(b_of(&h), "inner");
    h.file(ROOT_INO, "f");
    h.dir(ROOT_INO, "empty");
    let none = RenameFlags::default();
    assert_eq!(
        h.rename(ROOT_INO, "a", ROOT_INO, "f", none),
        Err(Errno::NotDir)
    );
    assert_eq!(
        h.rename(ROOT_INO, "f", ROOT_INO, "a", none),
        Err(Errno::IsDir)
    );
    assert_eq!(
        h.rename(ROOT_INO, "a", ROOT_INO, "b", none),
        Err(Errno::NotEmpty)
    );
    assert_eq!(h.rename(ROOT_INO, "a", a, "x", none), Err(Errno::Inval));
    let sub = h.dir(a, "sub");
    assert_eq!(h.rename(ROOT_INO, "a", sub, "x", none), Err(Errno::Inval));
    // Target is an ancestor of the source.
    assert_eq!(
        h.rename(a, "sub", ROOT_INO, "a", none),
        Err(Errno::NotEmpty)
    );
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    assert_eq!(
        h.rename(ROOT_INO, "f", ROOT_INO, "empty", noreplace),
        Err(Errno::Exist)
    );
    let both = RenameFlags {
        noreplace: true,
        exchange: true,
    };
    assert_eq!(
        h.rename(ROOT_INO, "f", ROOT_INO, "g", both),
        Err(Errno::Inval)
    );
    let exchange = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_eq!(
        h.rename(ROOT_INO, "f", ROOT_INO, "missing", exchange),
        Err(Errno::NoEnt)
    );
    // Dir over an empty dir: replaced, link counts right.
    let root_nlink = h.attr(ROOT_INO).nlink;
    let empty = h.lookup(ROOT_INO, "empty").unwrap();
    h.rename(a, "sub", ROOT_INO, "empty", none).unwrap();
    assert!(!h.s.inodes.contains_key(&empty));
    assert_eq!(h.attr(ROOT_INO).nlink, root_nlink);
    assert_eq!(h.attr(a).nlink, 2);
    assert_eq!(h.attr(sub).parent, ROOT_INO);
}

fn b_of(h: &H) -> Ino {
    h.lookup(ROOT_INO, "b").unwrap()
}

#[test]
fn rename_moves_directories_between_parents() {
    let mut h = H::new();
    let p = h.dir(ROOT_INO, "p");
    let q = h.dir(ROOT_INO, "q");
    let d = h.dir(p, "d");
    h.rename(p, "d", q, "d", RenameFlags::default()).unwrap();
    assert_eq!(
        (h.attr(p).nlink, h.attr(q).nlink, h.attr(d).parent),
        (2, 3, q)
    );
}

#[test]
fn rename_replacing_the_last_name_frees_or_orphans() {
    let mut h = H::new();
    let a = h.file(ROOT_INO, "a");
    let b = h.file(ROOT_INO, "b");
    h.write(b, 0, b"bbb");
    h.rename(ROOT_INO, "a", ROOT_INO, "b", RenameFlags::default())
        .unwrap();
    assert!(!h.s.inodes.contains_key(&b) && h.s.blocks.is_empty());
    assert_eq!(h.lookup(ROOT_INO, "b"), Some(a));
    // With another node registered, the replaced inode is an orphan.
    h.ok(Op::RegisterNode { node: 2 });
    let c = h.file(ROOT_INO, "c");
    h.rename(ROOT_INO, "b", ROOT_INO, "c", RenameFlags::default())
        .unwrap();
    assert_eq!(h.s.orphans[&c].pending, vec![2]);
}

#[test]
fn rename_exchange_swaps() {
    let mut h = H::new();
    let p = h.dir(ROOT_INO, "p");
    let q = h.dir(ROOT_INO, "q");
    let d = h.dir(p, "x");
    let f = h.file(q, "y");
    let cx = h.s.entries[&(p, b"x".to_vec())].cookie;
    h.rename(
        p,
        "x",
        q,
        "y",
        RenameFlags {
            noreplace: false,
            exchange: true,
        },
    )
    .unwrap();
    assert_eq!(h.lookup(p, "x"), Some(f));
    assert_eq!(h.lookup(q, "y"), Some(d));
    assert_eq!(h.s.entries[&(p, b"x".to_vec())].cookie, cx);
    assert_eq!(
        (h.attr(d).parent, h.attr(p).nlink, h.attr(q).nlink),
        (q, 2, 3)
    );
    // Exchanging a directory with its own ancestor is refused.
    let inner = h.dir(d, "inner");
    assert_eq!(
        h.rename(
            d,
            "inner",
            q,
            "y",
            RenameFlags {
                noreplace: false,
                exchange: true
            }
        ),
        Err(Errno::Inval)
    );
    let _ = inner;
}

// ---------------------------------------------------------------------------------------------
// SetAttr.

#[test]
fn truncate_shrinks_and_grows_with_zeros() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let data: Vec<u8> = (0..(2 * BLOCK_BYTES + 100))
        .map(|i| (i % 251 + 1) as u8)
        .collect();
    h.write(f, 0, &data);
    assert_eq!(h.attr(f).blocks, 3);
    let cut = BLOCK_BYTES + 10;
    let Outcome::Inode(i) = h.ok(truncate(f, cut)) else {
        panic!()
    };
    assert_eq!(
        (i.size, i.blocks, i.mtime, i.ctime),
        (cut, 2, ts(h.time), ts(h.time))
    );
    h.ok(truncate(f, 3 * BLOCK_BYTES));
    let got = h.read(f);
    assert_eq!(&got[..cut as usize], &data[..cut as usize]);
    assert!(got[cut as usize..].iter().all(|b| *b == 0));
    assert_eq!(got.len() as u64, 3 * BLOCK_BYTES);
    let d = h.dir(ROOT_INO, "d");
    assert_eq!(h.err(truncate(d, 0)), Errno::IsDir);
    let Outcome::Inode(s) = h.ok(Op::Symlink {
        parent: ROOT_INO,
        name: b"s".to_vec(),
        target: b"t".to_vec(),
    }) else {
        panic!()
    };
    assert_eq!(h.err(truncate(s.ino, 0)), Errno::Inval);
    assert_eq!(h.err(truncate(f, FILE_BYTES_MAX + 1)), Errno::FileTooBig);
    assert_eq!(h.err(truncate(999, 0)), Errno::NoEnt);
}

#[test]
fn chown_and_chmod_clear_set_id_bits() {
    let mut h = H::new();
    let f = h.mk(ROOT_INO, "f", FileKind::File, 0o6755);
    h.ok(chown(f, Some(5), None));
    assert_eq!(
        h.attr(f).perm,
        0o755,
        "setuid and (group-executable) setgid cleared, even by root"
    );
    let g = h.mk(ROOT_INO, "g", FileKind::File, 0o6745);
    h.ok(chown(g, None, Some(5)));
    assert_eq!(
        h.attr(g).perm,
        0o2745,
        "setgid without group exec is mandatory locking: kept"
    );
    let d = h.mk(ROOT_INO, "d", FileKind::Dir, 0o755);
    h.ok(h_chmod(d, 0o6755));
    h.ok(chown(d, Some(5), Some(5)));
    assert_eq!(h.attr(d).perm, 0o6755, "directories keep them");
    // chmod by a non-member drops setgid.
    let u = h.file(ROOT_INO, "u");
    h.ok(chown(u, Some(1000), Some(50)));
    h.run_as(user(1000, 100), h_chmod(u, 0o2755)).unwrap();
    assert_eq!(h.attr(u).perm, 0o755);
    h.run_as(
        Caller {
            uid: 1000,
            gid: 100,
            groups: vec![50],
            pid: 0,
        },
        h_chmod(u, 0o2755),
    )
    .unwrap();
    assert_eq!(h.attr(u).perm, 0o2755);
    assert_eq!(h.attr(u).ctime, ts(h.time));
}

fn h_chmod(ino: Ino, perm: u32) -> Op {
    Op::SetAttr {
        ino,
        perm: Some(perm),
        uid: None,
        gid: None,
        size: None,
        atime: None,
        mtime: None,
    }
}

#[test]
fn set_times() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let op = Op::SetAttr {
        ino: f,
        perm: None,
        uid: None,
        gid: None,
        size: None,
        atime: Some(SetTime::At(ts(5))),
        mtime: Some(SetTime::Now),
    };
    let Outcome::Inode(i) = h.ok(op) else {
        panic!()
    };
    assert_eq!((i.atime, i.mtime, i.ctime), (ts(5), ts(h.time), ts(h.time)));
    // An explicit mtime wins over the truncate's.
    let op = Op::SetAttr {
        ino: f,
        perm: None,
        uid: None,
        gid: None,
        size: Some(10),
        atime: None,
        mtime: Some(SetTime::At(ts(7))),
    };
    let Outcome::Inode(i) = h.ok(op) else {
        panic!()
    };
    assert_eq!((i.size, i.mtime, i.ctime), (10, ts(7), ts(h.time)));
    let _ = h.chmod(f, 0);
}

// ---------------------------------------------------------------------------------------------
// Write, fallocate, copy.

#[test]
fn writes_across_blocks_append_and_dedup() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.write(f, BLOCK_BYTES - 2, b"abcd");
    let i = h.attr(f);
    assert_eq!((i.size, i.blocks), (BLOCK_BYTES + 2, 2));
    let mut want = vec![0u8; (BLOCK_BYTES + 2) as usize];
    want[(BLOCK_BYTES - 2) as usize..].copy_from_slice(b"abcd");
    assert_eq!(h.read(f), want);
    let Outcome::Written { len, attr } = h.ok(Op::Write {
        ino: f,
        offset: 0,
        data: b"xyz".to_vec(),
        append: true,
    }) else {
        panic!()
    };
    assert_eq!((len, attr.size), (3, BLOCK_BYTES + 5));
    // Identical blocks are stored once.
    let g = h.file(ROOT_INO, "g");
    let block = vec![7u8; BLOCK_BYTES as usize];
    h.write(g, 0, &block);
    h.write(g, BLOCK_BYTES, &block);
    assert_eq!(h.s.blocks.len(), 3);
    assert_eq!(h.s.block_refs[&sha256(&block)], 2);
    // A block of zeros is a hole.
    h.write(g, 0, &vec![0u8; BLOCK_BYTES as usize]);
    assert_eq!(h.attr(g).blocks, 1);
    let d = h.dir(ROOT_INO, "d");
    assert_eq!(
        h.err(Op::Write {
            ino: d,
            offset: 0,
            data: b"x".to_vec(),
            append: false
        }),
        Errno::IsDir
    );
    let p = h.mk(ROOT_INO, "p", FileKind::Fifo, 0o644);
    assert_eq!(
        h.err(Op::Write {
            ino: p,
            offset: 0,
            data: b"x".to_vec(),
            append: false
        }),
        Errno::Inval
    );
    assert_eq!(
        h.err(Op::Write {
            ino: f,
            offset: FILE_BYTES_MAX,
            data: b"x".to_vec(),
            append: false
        }),
        Errno::FileTooBig
    );
    let before = h.s.clone();
    h.write(f, 5, b"");
    assert!(
        h.s.same_namespace(&before),
        "an empty write changes nothing"
    );
}

#[test]
fn writes_by_others_clear_setuid() {
    let mut h = H::new();
    let f = h.mk(ROOT_INO, "f", FileKind::File, 0o6777);
    h.write(f, 0, b"root keeps");
    assert_eq!(h.attr(f).perm, 0o6777);
    h.run_as(
        user(5, 5),
        Op::Write {
            ino: f,
            offset: 0,
            data: b"x".to_vec(),
            append: false,
        },
    )
    .unwrap();
    assert_eq!(h.attr(f).perm, 0o777);
}

/// A write drops the file's capabilities (`security.capability`), whoever writes, root too
/// (a page-cache write reaches the state as root); other extended attributes stay.
#[test]
fn writes_drop_capabilities() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let caps = vec![1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (name, value) in [(&b"security.capability"[..], caps.clone()), (&b"user.keep"[..], b"1".to_vec())] {
        h.ok(Op::SetXattr { ino: f, name: name.to_vec(), value, flags: XattrFlags::Any });
    }
    h.write(f, 0, b"as root");
    assert!(!h.s.xattrs.contains_key(&(f, b"security.capability".to_vec())));
    assert_eq!(h.s.xattrs[&(f, b"user.keep".to_vec())], b"1");
    // A write to a file without them changes nothing else.
    h.write(f, 0, b"again");
    assert_eq!(h.s.xattrs[&(f, b"user.keep".to_vec())], b"1");
}

const NO_ID: u32 = u32::MAX;
const ACCESS: &[u8] = b"system.posix_acl_access";
const DEFAULT: &[u8] = b"system.posix_acl_default";

fn set_acl(h: &mut H, ino: Ino, name: &[u8], entries: &[(u16, u16, u32)]) -> CommandResult {
    h.run(Op::SetXattr { ino, name: name.to_vec(), value: acl_value(entries), flags: XattrFlags::Any })
}

/// Setting an access ACL sets the mode's rwx bits from it (the mask for the group bits) and is
/// kept only if it says more than the mode; a chmod then changes the ACL's owner, mask and
/// other entries. Invalid ACLs and a default ACL on a file are refused.
#[test]
fn an_access_acl_and_the_mode_follow_each_other() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.ok(Op::SetAttr { ino: f, perm: Some(0o2640), uid: None, gid: None, size: None, atime: None, mtime: None });
    let named = [(0x01, 6, NO_ID), (0x02, 7, 1000), (0x04, 4, NO_ID), (0x10, 7, NO_ID), (0x20, 5, NO_ID)];
    set_acl(&mut h, f, ACCESS, &named).unwrap();
    assert_eq!(h.attr(f).perm, 0o2675, "rwx bits from owner, mask, other; setgid kept for root");
    assert_eq!(h.s.xattrs[&(f, ACCESS.to_vec())], acl_value(&named));
    h.ok(Op::SetAttr { ino: f, perm: Some(0o640), uid: None, gid: None, size: None, atime: None, mtime: None });
    let chmodded = [(0x01, 6, NO_ID), (0x02, 7, 1000), (0x04, 4, NO_ID), (0x10, 4, NO_ID), (0x20, 0, NO_ID)];
    assert_eq!(h.s.xattrs[&(f, ACCESS.to_vec())], acl_value(&chmodded));
    // An ACL of the three base entries is the mode alone: it replaces the stored ACL.
    set_acl(&mut h, f, ACCESS, &[(0x01, 7, NO_ID), (0x04, 5, NO_ID), (0x20, 1, NO_ID)]).unwrap();
    assert_eq!(h.attr(f).perm, 0o751);
    assert!(!h.s.xattrs.contains_key(&(f, ACCESS.to_vec())));
    // A caller outside the file's group loses setgid, as with chmod.
    h.ok(Op::SetAttr { ino: f, perm: Some(0o2750), uid: Some(1000), gid: Some(50), size: None, atime: None, mtime: None });
    let r = h.run_as(user(1000, 1000), Op::SetXattr { ino: f, name: ACCESS.to_vec(), value: acl_value(&named), flags: XattrFlags::Any });
    assert_eq!(r.map(|_| ()), Ok(()));
    assert_eq!(h.attr(f).perm, 0o675);
    // Refused: an invalid ACL (a named entry without a mask), a default ACL on a file.
    let before = h.s.clone();
    assert_eq!(set_acl(&mut h, f, ACCESS, &[(0x01, 7, NO_ID), (0x02, 7, 5), (0x04, 5, NO_ID), (0x20, 1, NO_ID)]).map(|_| ()), Err(Errno::Inval));
    assert_eq!(set_acl(&mut h, f, DEFAULT, &[(0x01, 7, NO_ID), (0x04, 5, NO_ID), (0x20, 1, NO_ID)]).map(|_| ()), Err(Errno::Access));
    assert!(h.s.same_namespace(&before));
}

/// What is created in a directory with a default ACL gets that ACL (its mode cut by it, the
/// umask ignored), a directory the default ACL too; elsewhere the umask masks the mode.
#[test]
fn new_inodes_inherit_the_default_acl_or_take_the_umask() {
    let mut h = H::new();
    let d = h.mk(ROOT_INO, "d", FileKind::Dir, 0o755);
    let default = [(0x01, 7, NO_ID), (0x02, 7, 1000), (0x04, 5, NO_ID), (0x10, 7, NO_ID), (0x20, 5, NO_ID)];
    set_acl(&mut h, d, DEFAULT, &default).unwrap();
    let make = |parent, name: &str, kind, perm| Op::MakeNodeUnmasked { parent, name: name.as_bytes().to_vec(), kind, perm, umask: 0o077, rdev: 0 };
    let Outcome::Inode(f) = h.ok(make(d, "f", FileKind::File, 0o640)) else { panic!("inode") };
    assert_eq!(f.perm, 0o640, "umask ignored, mode cut by the default ACL");
    assert_eq!(h.s.xattrs[&(f.ino, ACCESS.to_vec())], acl_value(&[(0x01, 6, NO_ID), (0x02, 7, 1000), (0x04, 5, NO_ID), (0x10, 4, NO_ID), (0x20, 0, NO_ID)]));
    assert!(!h.s.xattrs.contains_key(&(f.ino, DEFAULT.to_vec())));
    let Outcome::Inode(sub) = h.ok(make(d, "sub", FileKind::Dir, 0o777)) else { panic!("inode") };
    assert_eq!(sub.perm, 0o775);
    assert_eq!(h.s.xattrs[&(sub.ino, DEFAULT.to_vec())], acl_value(&default));
    assert_eq!(h.s.xattrs[&(sub.ino, ACCESS.to_vec())], acl_value(&default));
    let Outcome::Inode(g) = h.ok(make(ROOT_INO, "g", FileKind::File, 0o666)) else { panic!("inode") };
    assert_eq!(g.perm, 0o600);
    assert!(!h.s.xattrs.keys().any(|(ino, _)| *ino == g.ino));
    // MakeNode (older logs): the mode as given, nothing inherited.
    let Outcome::Inode(old) = h.ok(Op::MakeNode { parent: d, name: b"old".to_vec(), kind: FileKind::File, perm: 0o666, rdev: 0 }) else { panic!("inode") };
    assert_eq!(old.perm, 0o666);
    assert!(!h.s.xattrs.keys().any(|(ino, _)| *ino == old.ino));
}

#[test]
fn fallocate_modes() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let data = vec![9u8; (2 * BLOCK_BYTES + 10) as usize];
    h.write(f, 0, &data);
    let fa = |offset, len, mode| Op::Fallocate {
        ino: f,
        offset,
        len,
        mode,
    };
    h.ok(fa(10, 2 * BLOCK_BYTES, FallocMode::PunchHole));
    let got = h.read(f);
    assert_eq!(got.len(), data.len());
    assert!(got[..10].iter().all(|b| *b == 9));
    assert!(got[10..(2 * BLOCK_BYTES + 10) as usize]
        .iter()
        .all(|b| *b == 0));
    assert_eq!(
        h.attr(f).blocks,
        1,
        "the whole middle block is a hole, the tail block is all zeros too"
    );
    let size = h.attr(f).size;
    h.ok(fa(size, 100, FallocMode::Allocate { keep_size: true }));
    assert_eq!(h.attr(f).size, size);
    h.ok(fa(size, 100, FallocMode::Allocate { keep_size: false }));
    assert_eq!(h.attr(f).size, size + 100);
    h.ok(fa(0, 5, FallocMode::ZeroRange { keep_size: false }));
    assert!(h.read(f)[..10].iter().all(|b| *b == 0 || *b == 9));
    assert_eq!(h.read(f)[..5], [0u8; 5]);
    h.ok(fa(
        size + 100,
        50,
        FallocMode::ZeroRange { keep_size: false },
    ));
    assert_eq!(h.attr(f).size, size + 150);
    assert_eq!(h.err(fa(0, 0, FallocMode::PunchHole)), Errno::Inval);
    assert_eq!(
        h.err(fa(
            FILE_BYTES_MAX,
            1,
            FallocMode::Allocate { keep_size: false }
        )),
        Errno::FileTooBig
    );
    assert_eq!(
        h.err(Op::Fallocate {
            ino: ROOT_INO,
            offset: 0,
            len: 1,
            mode: FallocMode::PunchHole
        }),
        Errno::IsDir
    );
}

#[test]
fn copy_range_copies_and_refuses_overlap() {
    let mut h = H::new();
    let a = h.file(ROOT_INO, "a");
    let b = h.file(ROOT_INO, "b");
    h.write(a, 0, b"0123456789");
    let cp = |ino_in, offset_in, ino_out, offset_out, len| Op::CopyRange {
        ino_in,
        offset_in,
        ino_out,
        offset_out,
        len,
    };
    let Outcome::Written { len, attr } = h.ok(cp(a, 2, b, 3, 100)) else {
        panic!()
    };
    assert_eq!((len, attr.size), (8, 11));
    assert_eq!(h.read(b), b"\0\0\x0023456789");
    assert_eq!(h.err(cp(a, 0, a, 5, 10)), Errno::Inval);
    let Outcome::Written { len, .. } = h.ok(cp(a, 0, a, 10, 5)) else {
        panic!()
    };
    assert_eq!(len, 5);
    assert_eq!(h.read(a), b"012345678901234");
    let Outcome::Written { len, .. } = h.ok(cp(a, 100, b, 0, 5)) else {
        panic!()
    };
    assert_eq!(len, 0);
    assert_eq!(h.err(cp(ROOT_INO, 0, b, 0, 5)), Errno::IsDir);
}

#[test]
fn aligned_copies_share_blocks() {
    let mut h = H::new();
    let a = h.file(ROOT_INO, "a");
    let b = h.file(ROOT_INO, "b");
    let data: Vec<u8> = (0..3 * BLOCK_BYTES + 10)
        .map(|i| (i % 13) as u8 + 1)
        .collect();
    h.write(a, 0, &data);
    h.write(a, BLOCK_BYTES, &vec![0u8; BLOCK_BYTES as usize]);
    let stored = h.s.blocks.len();
    let cp = Op::CopyRange {
        ino_in: a,
        offset_in: 0,
        ino_out: b,
        offset_out: BLOCK_BYTES,
        len: 10 * BLOCK_BYTES,
    };
    let Outcome::Written { len, attr } = h.ok(cp) else {
        panic!()
    };
    assert_eq!(
        (len, attr.size),
        (data.len() as u64, BLOCK_BYTES + data.len() as u64)
    );
    assert_eq!(
        h.s.blocks.len(),
        stored,
        "every block is shared (the tail by content)"
    );
    assert_eq!(attr.blocks, 3, "the hole stays a hole");
    assert_eq!(h.read(b)[BLOCK_BYTES as usize..], h.read(a)[..]);
}

// ---------------------------------------------------------------------------------------------
// Xattrs.

#[test]
fn xattr_cases() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let set = |name: &[u8], value: Vec<u8>, flags| Op::SetXattr {
        ino: f,
        name: name.to_vec(),
        value,
        flags,
    };
    h.ok(set(b"user.a", b"1".to_vec(), XattrFlags::Create));
    assert_eq!(h.attr(f).ctime, ts(h.time));
    assert_eq!(
        h.err(set(b"user.a", b"2".to_vec(), XattrFlags::Create)),
        Errno::Exist
    );
    assert_eq!(
        h.err(set(b"user.b", b"2".to_vec(), XattrFlags::Replace)),
        Errno::NoData
    );
    h.ok(set(b"user.a", b"2".to_vec(), XattrFlags::Replace));
    assert_eq!(h.s.xattrs[&(f, b"user.a".to_vec())], b"2");
    assert_eq!(
        h.err(set(b"", b"2".to_vec(), XattrFlags::Any)),
        Errno::Range
    );
    assert_eq!(
        h.err(set(&[b'n'; 256], b"2".to_vec(), XattrFlags::Any)),
        Errno::Range
    );
    assert_eq!(
        h.err(set(b"user.big", vec![1; 64 * 1024 + 1], XattrFlags::Any)),
        Errno::TooBig
    );
    h.ok(set(b"user.max", vec![1; 64 * 1024], XattrFlags::Any));
    assert_eq!(
        h.err(Op::RemoveXattr {
            ino: f,
            name: b"user.zz".to_vec()
        }),
        Errno::NoData
    );
    h.ok(Op::RemoveXattr {
        ino: f,
        name: b"user.a".to_vec(),
    });
    assert_eq!(
        h.err(Op::SetXattr {
            ino: 999,
            name: b"user.a".to_vec(),
            value: Vec::new(),
            flags: XattrFlags::Any
        }),
        Errno::NoEnt
    );
}

// ---------------------------------------------------------------------------------------------
// Content helpers.

#[test]
fn seek_data_and_hole() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.write(f, 2 * BLOCK_BYTES + 5, b"x");
    let i = h.attr(f);
    assert_eq!(seek_data(&h.s, &i, 0).unwrap(), Ok(2 * BLOCK_BYTES));
    assert_eq!(
        seek_data(&h.s, &i, 2 * BLOCK_BYTES + 3).unwrap(),
        Ok(2 * BLOCK_BYTES + 3)
    );
    assert_eq!(seek_hole(&h.s, &i, 0).unwrap(), Ok(0));
    assert_eq!(
        seek_hole(&h.s, &i, 2 * BLOCK_BYTES + 1).unwrap(),
        Ok(i.size)
    );
    assert_eq!(
        seek_data(&h.s, &i, i.size).unwrap(),
        Err(Errno::NoSuchOffset)
    );
    assert_eq!(
        seek_hole(&h.s, &i, i.size).unwrap(),
        Err(Errno::NoSuchOffset)
    );
    h.ok(truncate(f, 5 * BLOCK_BYTES));
    let i = h.attr(f);
    assert_eq!(
        seek_hole(&h.s, &i, 2 * BLOCK_BYTES).unwrap(),
        Ok(3 * BLOCK_BYTES)
    );
    assert_eq!(
        seek_data(&h.s, &i, 3 * BLOCK_BYTES).unwrap(),
        Err(Errno::NoSuchOffset)
    );
    // Works through a trait object too.
    let dyn_state: &dyn StateRead = &h.s;
    assert_eq!(seek_data(dyn_state, &i, 0).unwrap(), Ok(2 * BLOCK_BYTES));
}

#[test]
fn corrupt_blocks_read_as_io_errors() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.write(f, 0, b"precious");
    let hash = sha256(b"precious");
    h.s.blocks.insert(hash, b"tampered".to_vec());
    let i = h.attr(f);
    assert_eq!(read_range(&h.s, &i, 0, 8).unwrap(), Err(Errno::Io));
    // A write over a corrupt block is a store fault, never silently kept.
    let cmd = command(
        1,
        1000,
        T0,
        Caller::root(),
        Op::Write {
            ino: f,
            offset: 1,
            data: b"x".to_vec(),
            append: false,
        },
    );
    assert!(apply(&mut h.s, &cmd).is_err());
    // Removing the file frees the corrupt block: the removal goes through (that the store frees
    // it without reading it is checked by a store test).
    h.ok(Op::Unlink { parent: ROOT_INO, name: b"f".to_vec(), expect_closed: Some(f) });
    assert!(h.s.blocks.is_empty());
}

#[test]
fn cookies_stay_stable_and_are_never_reused() {
    let mut h = H::new();
    for n in ["a", "b", "c"] {
        h.file(ROOT_INO, n);
    }
    let listing = |h: &H| -> Vec<(Vec<u8>, u64)> {
        h.s.entries_after(ROOT_INO, 0, 100)
            .unwrap()
            .into_iter()
            .map(|(n, e)| (n, e.cookie))
            .collect()
    };
    assert_eq!(
        listing(&h),
        vec![(b"a".to_vec(), 3), (b"b".to_vec(), 4), (b"c".to_vec(), 5)]
    );
    h.unlink(ROOT_INO, "b").unwrap();
    h.file(ROOT_INO, "b");
    h.rename(ROOT_INO, "a", ROOT_INO, "z", RenameFlags::default())
        .unwrap();
    assert_eq!(
        listing(&h),
        vec![(b"c".to_vec(), 5), (b"b".to_vec(), 6), (b"z".to_vec(), 7)]
    );
    assert_eq!(
        h.s.entries_after(ROOT_INO, 5, 1).unwrap()[0].0,
        b"b".to_vec()
    );
}

#[test]
fn link_to_an_orphan_is_refused() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.ok(Op::Unlink {
        parent: ROOT_INO,
        name: b"f".to_vec(),
        expect_closed: None,
    });
    assert_eq!(
        h.err(Op::Link {
            ino: f,
            new_parent: ROOT_INO,
            new_name: b"g".to_vec()
        }),
        Errno::NoEnt
    );
}

#[test]
fn exchange_of_two_files_in_one_directory() {
    let mut h = H::new();
    let a = h.file(ROOT_INO, "a");
    let b = h.file(ROOT_INO, "b");
    h.rename(
        ROOT_INO,
        "a",
        ROOT_INO,
        "b",
        RenameFlags {
            noreplace: false,
            exchange: true,
        },
    )
    .unwrap();
    assert_eq!(
        (h.lookup(ROOT_INO, "a"), h.lookup(ROOT_INO, "b")),
        (Some(b), Some(a))
    );
    assert_eq!((h.attr(a).ctime, h.attr(b).ctime), (ts(h.time), ts(h.time)));
}

#[test]
fn subdirectory_count_limit() {
    let mut h = H::new();
    let d = h.dir(ROOT_INO, "d");
    h.s.inodes.get_mut(&d).unwrap().nlink = LINK_COUNT_MAX;
    let op = Op::MakeNode {
        parent: d,
        name: b"x".to_vec(),
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
    };
    assert_eq!(
        apply(&mut h.s, &command(1, 999, T0, Caller::root(), op)).unwrap(),
        Err(Errno::TooManyLinks)
    );
}

#[test]
fn huge_sparse_files_up_to_the_limit() {
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    h.write(f, FILE_BYTES_MAX - 1, b"z");
    let i = h.attr(f);
    assert_eq!((i.size, i.blocks), (FILE_BYTES_MAX, 1));
    assert_eq!(
        read_range(&h.s, &i, FILE_BYTES_MAX - 3, 10)
            .unwrap()
            .unwrap(),
        b"\0\0z"
    );
    assert_eq!(
        seek_data(&h.s, &i, 0).unwrap(),
        Ok((FILE_BYTES_MAX - 1) / BLOCK_BYTES * BLOCK_BYTES)
    );
    h.ok(truncate(f, 1));
    assert_eq!(h.attr(f).blocks, 0);
}

// ---------------------------------------------------------------------------------------------
// Property tests: random command sequences against invariants and a content model.

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const OFFSETS: [u64; 8] = [
    0,
    1,
    100,
    BLOCK_BYTES - 3,
    BLOCK_BYTES,
    BLOCK_BYTES + 7,
    2 * BLOCK_BYTES - 1,
    3 * BLOCK_BYTES,
];
const LENS: [u64; 6] = [0, 1, 5, 300, BLOCK_BYTES, BLOCK_BYTES + 3];

#[derive(Clone, Debug)]
enum A {
    Make {
        dir: usize,
        name: usize,
        kind: u8,
    },
    Link {
        file: usize,
        dir: usize,
        name: usize,
    },
    Unlink {
        dir: usize,
        name: usize,
        open: bool,
    },
    Rmdir {
        dir: usize,
        name: usize,
    },
    Rename {
        dir: usize,
        name: usize,
        dir2: usize,
        name2: usize,
        flags: u8,
        open: bool,
    },
    Write {
        file: usize,
        off: usize,
        len: usize,
        byte: u8,
        append: bool,
    },
    Truncate {
        file: usize,
        off: usize,
    },
    Falloc {
        file: usize,
        off: usize,
        len: usize,
        mode: u8,
    },
    Copy {
        f1: usize,
        f2: usize,
        off1: usize,
        off2: usize,
        len: usize,
    },
    Xattr {
        any: usize,
        name: usize,
        remove: bool,
    },
    Chmod {
        any: usize,
        perm: u32,
        uid: Option<u32>,
    },
    Release {
        any: usize,
    },
    Register {
        node: u64,
        on: bool,
    },
    Retry {
        back: usize,
    },
    /// A lock change (`typ` 0: unlock, 1: read, 2: write) by one of a few owners (incarnations 1
    /// and 2), or a close that drops an owner's locks, or a node's restart.
    Lock {
        any: usize,
        owner: u64,
        inc: u64,
        flock: bool,
        typ: u8,
        off: usize,
        len: usize,
    },
    Unlock {
        any: usize,
        owner: u64,
        posix_only: bool,
    },
    DropStale {
        inc: u64,
    },
    Expire {
        node: NodeId,
        inc: u64,
    },
    /// An acknowledgement of one of the fences' epochs (from whichever node runs it).
    Ack {
        any: usize,
    },
}

/// Lock actions, for both generators.
fn arb_lock() -> impl Strategy<Value = A> {
    prop_oneof![
        4 => (0usize..16, 0u64..3, 1u64..3, any::<bool>(), 0u8..3, 0..OFFSETS.len(), 0..LENS.len())
            .prop_map(|(any, owner, inc, flock, typ, off, len)| A::Lock { any, owner, inc, flock, typ, off, len }),
        1 => (0usize..16, 0u64..3, any::<bool>()).prop_map(|(any, owner, posix_only)| A::Unlock { any, owner, posix_only }),
        1 => (1u64..3).prop_map(|inc| A::DropStale { inc }),
        1 => (1u64..4, 1u64..3).prop_map(|(node, inc)| A::Expire { node, inc }),
        1 => (0usize..4).prop_map(|any| A::Ack { any }),
    ]
}

fn arb_a() -> impl Strategy<Value = A> {
    let i = || 0usize..16;
    let n = || 0usize..NAMES.len();
    prop_oneof![
        4 => (i(), n(), 0u8..4).prop_map(|(dir, name, kind)| A::Make { dir, name, kind }),
        2 => (i(), i(), n()).prop_map(|(file, dir, name)| A::Link { file, dir, name }),
        3 => (i(), n(), any::<bool>()).prop_map(|(dir, name, open)| A::Unlink { dir, name, open }),
        2 => (i(), n()).prop_map(|(dir, name)| A::Rmdir { dir, name }),
        4 => (i(), n(), i(), n(), 0u8..6, any::<bool>())
            .prop_map(|(dir, name, dir2, name2, flags, open)| A::Rename { dir, name, dir2, name2, flags, open }),
        5 => (i(), 0..OFFSETS.len(), 0..LENS.len(), 0u8..4, any::<bool>())
            .prop_map(|(file, off, len, byte, append)| A::Write { file, off, len, byte, append }),
        2 => (i(), 0..OFFSETS.len()).prop_map(|(file, off)| A::Truncate { file, off }),
        1 => (i(), 0..OFFSETS.len(), 0..LENS.len(), 0u8..5).prop_map(|(file, off, len, mode)| A::Falloc { file, off, len, mode }),
        1 => (i(), i(), 0..OFFSETS.len(), 0..OFFSETS.len(), 0..LENS.len())
            .prop_map(|(f1, f2, off1, off2, len)| A::Copy { f1, f2, off1, off2, len }),
        2 => (i(), 0usize..4, any::<bool>()).prop_map(|(any, name, remove)| A::Xattr { any, name, remove }),
        1 => (i(), prop_oneof![Just(0o755u32), Just(0o6755), Just(0o2644)], prop_oneof![Just(None), Just(Some(7u32))])
            .prop_map(|(any, perm, uid)| A::Chmod { any, perm, uid }),
        2 => i().prop_map(|any| A::Release { any }),
        1 => (1u64..4, any::<bool>()).prop_map(|(node, on)| A::Register { node, on }),
        2 => (0usize..64).prop_map(|back| A::Retry { back }),
        2 => arb_lock(),
    ]
}

fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    if items.is_empty() {
        None
    } else {
        Some(items[i % items.len()])
    }
}

/// Bytes for a write: a pattern with zeros in it, so dedup and trailing-zero trimming both happen.
fn pattern(len: u64, byte: u8) -> Vec<u8> {
    (0..len)
        .map(|i| if byte == 0 { 0 } else { ((i % 5) as u8) * byte })
        .collect()
}

struct Model {
    files: BTreeMap<Ino, Vec<u8>>,
}

impl Model {
    fn zero(&mut self, ino: Ino, start: u64, end: u64) {
        let f = self.files.get_mut(&ino).unwrap();
        let end = (end as usize).min(f.len());
        let start = (start as usize).min(end);
        f[start..end].fill(0);
    }

    fn grow(&mut self, ino: Ino, size: u64) {
        let f = self.files.get_mut(&ino).unwrap();
        if (f.len() as u64) < size {
            f.resize(size as usize, 0);
        }
    }
}

/// What a proposer puts in `expect_closed` for removing `(parent, name)`: nothing when it holds
/// the inode open, otherwise the inode the name has in `s`.
fn expect_closed(s: &MemState, parent: Ino, name: &str, open: bool) -> Option<Ino> {
    if open {
        return None;
    }
    s.entry(parent, name.as_bytes()).unwrap().map(|e| e.ino)
}

/// The command an action stands for in state `s` (None: nothing fits, or a retry).
fn to_op(s: &MemState, a: A) -> Option<Op> {
    let dirs: Vec<Ino> = s
        .inodes
        .values()
        .filter(|i| i.kind == FileKind::Dir)
        .map(|i| i.ino)
        .collect();
    let files: Vec<Ino> = s
        .inodes
        .values()
        .filter(|i| i.kind == FileKind::File)
        .map(|i| i.ino)
        .collect();
    let all: Vec<Ino> = s.inodes.keys().copied().chain([999]).collect();
    Some(match a {
        A::Make { dir, name, kind } => {
            let parent = pick(&dirs, dir).unwrap_or(ROOT_INO);
            let name = NAMES[name].into();
            match kind {
                0 => Op::MakeNodeUnmasked {
                    parent,
                    name,
                    kind: FileKind::File,
                    perm: 0o666,
                    umask: 0o022,
                    rdev: 0,
                },
                1 => Op::MakeNodeUnmasked {
                    parent,
                    name,
                    kind: FileKind::Dir,
                    perm: 0o777,
                    umask: 0o022,
                    rdev: 0,
                },
                2 => Op::Symlink {
                    parent,
                    name,
                    target: b"target".to_vec(),
                },
                _ => Op::MakeNode {
                    parent,
                    name,
                    kind: FileKind::Fifo,
                    perm: 0o600,
                    rdev: 0,
                },
            }
        }
        A::Link { file, dir, name } => Op::Link {
            ino: pick(&all, file).unwrap(),
            new_parent: pick(&dirs, dir).unwrap_or(ROOT_INO),
            new_name: NAMES[name].into(),
        },
        A::Unlink { dir, name, open } => {
            let parent = pick(&dirs, dir).unwrap_or(ROOT_INO);
            Op::Unlink {
                parent,
                name: NAMES[name].into(),
                expect_closed: expect_closed(s, parent, NAMES[name], open),
            }
        }
        A::Rmdir { dir, name } => Op::Rmdir {
            parent: pick(&dirs, dir).unwrap_or(ROOT_INO),
            name: NAMES[name].into(),
        },
        A::Rename {
            dir,
            name,
            dir2,
            name2,
            flags,
            open,
        } => {
            let new_parent = pick(&dirs, dir2).unwrap_or(ROOT_INO);
            Op::Rename {
                parent: pick(&dirs, dir).unwrap_or(ROOT_INO),
                name: NAMES[name].into(),
                new_parent,
                new_name: NAMES[name2].into(),
                flags: RenameFlags {
                    noreplace: flags == 3 || flags == 5,
                    exchange: flags == 4 || flags == 5,
                },
                expect_closed: expect_closed(s, new_parent, NAMES[name2], open),
            }
        }
        A::Write {
            file,
            off,
            len,
            byte,
            append,
        } => match pick(&files, file) {
            Some(ino) => Op::Write {
                ino,
                offset: OFFSETS[off],
                data: pattern(LENS[len], byte),
                append,
            },
            None => return None,
        },
        A::Truncate { file, off } => match pick(&files, file) {
            Some(ino) => truncate(ino, OFFSETS[off] + off as u64),
            None => return None,
        },
        A::Falloc {
            file,
            off,
            len,
            mode,
        } => match pick(&files, file) {
            Some(ino) => Op::Fallocate {
                ino,
                offset: OFFSETS[off],
                len: LENS[len],
                mode: match mode {
                    0 => FallocMode::Allocate { keep_size: false },
                    1 => FallocMode::Allocate { keep_size: true },
                    2 => FallocMode::PunchHole,
                    3 => FallocMode::ZeroRange { keep_size: false },
                    _ => FallocMode::ZeroRange { keep_size: true },
                },
            },
            None => return None,
        },
        A::Copy {
            f1,
            f2,
            off1,
            off2,
            len,
        } => match (pick(&files, f1), pick(&files, f2)) {
            (Some(ino_in), Some(ino_out)) => Op::CopyRange {
                ino_in,
                offset_in: OFFSETS[off1],
                ino_out,
                offset_out: OFFSETS[off2],
                len: LENS[len],
            },
            _ => return None,
        },
        A::Xattr { any, name, remove } => {
            let ino = pick(&all, any).unwrap();
            let name = [b"user.x".to_vec(), b"user.y".to_vec(), ACCESS.to_vec(), DEFAULT.to_vec()][name].clone();
            // ACLs: one with a named user and a mask (kept, inherited), inode 999 aside.
            let value = if name.starts_with(b"system.") {
                acl_value(&[(0x01, 7, NO_ID), (0x02, 6, 1000), (0x04, 5, NO_ID), (0x10, 7, NO_ID), (0x20, 1, NO_ID)])
            } else {
                b"v".to_vec()
            };
            if remove {
                Op::RemoveXattr { ino, name }
            } else {
                Op::SetXattr {
                    ino,
                    name,
                    value,
                    flags: XattrFlags::Any,
                }
            }
        }
        A::Chmod { any, perm, uid } => Op::SetAttr {
            ino: pick(&all, any).unwrap(),
            perm: Some(perm),
            uid,
            gid: None,
            size: None,
            atime: None,
            mtime: Some(SetTime::Now),
        },
        A::Release { any } => {
            let orphans: Vec<Ino> = s.orphans.keys().copied().collect();
            Op::Release {
                ino: pick(&orphans, any).or(pick(&all, any)).unwrap(),
            }
        }
        A::Register { node, on } => {
            if on {
                Op::RegisterNode { node }
            } else {
                Op::UnregisterNode { node }
            }
        }
        A::Lock { any, owner, inc, flock, typ, off, len } => {
            let start = OFFSETS[off];
            // Some locks run to the end of the file, some ranges are inverted (EINVAL).
            let end = if len == 0 { u64::MAX } else { start.wrapping_add(LENS[len]).wrapping_sub(1) };
            Op::Lock {
                ino: pick(&all, any).unwrap(),
                incarnation: inc,
                owner,
                kind: if flock { LockKind::Flock } else { LockKind::Posix },
                typ: [None, Some(LockType::Read), Some(LockType::Write)][typ as usize],
                start,
                end,
                pid: 40 + owner as u32,
            }
        }
        A::Unlock { any, owner, posix_only } => Op::ReleaseLocks {
            ino: pick(&all, any).unwrap(),
            incarnation: 1 + owner % 2,
            owners: vec![owner, owner + 1],
            kind: posix_only.then_some(LockKind::Posix),
        },
        A::DropStale { inc } => Op::DropStaleLocks { incarnation: inc },
        A::Expire { node, inc } => Op::ExpireLocks { node, incarnation: inc },
        A::Ack { any } => {
            let epochs: Vec<u64> = s.lock_fences.0.values().map(|f| f.epoch).collect();
            Op::AckLockExpiry { epoch: pick(&epochs, any).unwrap_or(1) }
        }
        A::Retry { .. } => return None,
    })
}

fn run_sequence(actions: Vec<A>) -> Result<(), TestCaseError> {
    let mut s = MemState::new();
    let mut replay = MemState::new();
    let mut history: Vec<(Command, CommandResult)> = Vec::new();
    let mut model = Model {
        files: BTreeMap::new(),
    };
    let mut seqs: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut time = T0;
    let mut setup = vec![
        Op::Init {
            perm: 0o755,
            uid: 0,
            gid: 0,
        },
        Op::RegisterNode { node: 1 },
    ];
    setup.reverse();
    let mut actions = actions.into_iter();
    loop {
        let (op, origin) = if let Some(op) = setup.pop() {
            (op, 1)
        } else {
            let Some(a) = actions.next() else { break };
            let origin = 1 + (time as u64 % 3);
            if let A::Retry { back } = a {
                if history.is_empty() {
                    continue;
                }
                let (cmd, first) = history[history.len() - 1 - back % history.len()].clone();
                let before = s.clone();
                let again = apply(&mut s, &cmd).unwrap();
                prop_assert_eq!(&again, &first, "retry of {:?}", cmd.op);
                prop_assert!(s == before, "a retry changed the state");
                continue;
            }
            let Some(op) = to_op(&s, a) else { continue };
            (op, origin)
        };
        time += 1;
        let seq = seqs.entry(origin).or_insert(0);
        *seq += 1;
        let caller = if time % 4 == 0 {
            user(1000, 100)
        } else {
            Caller::root()
        };
        let cmd = command(origin, *seq, time, caller, op);
        let before = s.clone();
        let r = apply(&mut s, &cmd).unwrap();
        prop_assert_eq!(apply(&mut replay, &cmd).unwrap(), r.clone());
        if let Err(e) = &r {
            prop_assert!(
                s.same_namespace(&before),
                "failed {:?} ({:?}) changed the state",
                cmd.op,
                e
            );
        }
        if let Err(why) = check_invariants(&s) {
            return Err(TestCaseError::fail(format!(
                "after {:?} -> {:?}: {why}",
                cmd.op, r
            )));
        }
        // Update the content model.
        if r.is_ok() {
            match (&cmd.op, &r) {
                (
                    Op::MakeNode {
                        kind: FileKind::File,
                        ..
                    }
                    | Op::MakeNodeUnmasked {
                        kind: FileKind::File,
                        ..
                    },
                    Ok(Outcome::Inode(i)),
                ) => {
                    model.files.insert(i.ino, Vec::new());
                }
                (
                    Op::Write {
                        ino,
                        offset,
                        data,
                        append,
                    },
                    _,
                ) => {
                    let f = model.files.get_mut(ino).unwrap();
                    let at = if *append { f.len() } else { *offset as usize };
                    if !data.is_empty() {
                        if f.len() < at + data.len() {
                            f.resize(at + data.len(), 0);
                        }
                        f[at..at + data.len()].copy_from_slice(data);
                    }
                }
                (
                    Op::SetAttr {
                        ino,
                        size: Some(size),
                        ..
                    },
                    _,
                ) => {
                    model.files.get_mut(ino).unwrap().resize(*size as usize, 0);
                }
                (
                    Op::Fallocate {
                        ino,
                        offset,
                        len,
                        mode,
                    },
                    _,
                ) => match mode {
                    FallocMode::Allocate { keep_size } => {
                        if !keep_size {
                            model.grow(*ino, offset + len);
                        }
                    }
                    FallocMode::PunchHole => model.zero(*ino, *offset, offset + len),
                    FallocMode::ZeroRange { keep_size } => {
                        model.zero(*ino, *offset, offset + len);
                        if !keep_size {
                            model.grow(*ino, offset + len);
                        }
                    }
                },
                (
                    Op::CopyRange {
                        ino_in,
                        offset_in,
                        ino_out,
                        offset_out,
                        ..
                    },
                    Ok(Outcome::Written { len, .. }),
                ) if *len > 0 => {
                    let data = model.files[ino_in]
                        [*offset_in as usize..(*offset_in + *len) as usize]
                        .to_vec();
                    let f = model.files.get_mut(ino_out).unwrap();
                    let at = *offset_out as usize;
                    if f.len() < at + data.len() {
                        f.resize(at + data.len(), 0);
                    }
                    f[at..at + data.len()].copy_from_slice(&data);
                }
                _ => {}
            }
        }
        model.files.retain(|ino, _| s.inodes.contains_key(ino));
        for (ino, want) in &model.files {
            let inode = &s.inodes[ino];
            prop_assert_eq!(inode.size, want.len() as u64);
            let got = read_range(&s, inode, 0, inode.size).unwrap().unwrap();
            prop_assert!(
                &got == want,
                "content of {} differs after {:?}",
                ino,
                cmd.op
            );
        }
        history.push((cmd, r));
    }
    if std::env::var("STATE_STATS").is_ok() {
        let oks = history.iter().filter(|(_, r)| r.is_ok()).count();
        eprintln!(
            "cmds {} ok {} inodes {} blocks {} orphans {}",
            history.len(),
            oks,
            s.inodes.len(),
            s.blocks.len(),
            s.orphans.len()
        );
    }
    prop_assert!(s == replay, "replicas diverged");
    Ok(())
}

/// Namespace-only actions, with deeper trees: renames, links and removals collide often.
fn arb_namespace() -> impl Strategy<Value = A> {
    let i = || 0usize..16;
    let n = || 0usize..NAMES.len();
    prop_oneof![
        4 => (i(), n(), prop_oneof![Just(0u8), Just(1u8), Just(1u8), Just(2u8)]).prop_map(|(dir, name, kind)| A::Make { dir, name, kind }),
        2 => (i(), i(), n()).prop_map(|(file, dir, name)| A::Link { file, dir, name }),
        2 => (i(), n(), any::<bool>()).prop_map(|(dir, name, open)| A::Unlink { dir, name, open }),
        2 => (i(), n()).prop_map(|(dir, name)| A::Rmdir { dir, name }),
        6 => (i(), n(), i(), n(), 0u8..6, any::<bool>())
            .prop_map(|(dir, name, dir2, name2, flags, open)| A::Rename { dir, name, dir2, name2, flags, open }),
        1 => i().prop_map(|any| A::Release { any }),
        1 => (1u64..4, any::<bool>()).prop_map(|(node, on)| A::Register { node, on }),
        1 => (0usize..64).prop_map(|back| A::Retry { back }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, max_shrink_iters: 4000, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_keep_invariants(actions in prop::collection::vec(arb_a(), 1..150)) {
        run_sequence(actions)?;
    }

    #[test]
    fn random_namespace_changes_keep_invariants(actions in prop::collection::vec(arb_namespace(), 1..200)) {
        run_sequence(actions)?;
    }
}

/// A deterministic random workload for twin tests of other stores (redb against `MemState`):
/// `len` commands from several origins, made against a `MemState` from `seed`, retries included.
pub(crate) fn workload(seed: u64, len: usize) -> Vec<Command> {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = arb_a();
    let mut s = MemState::new();
    let mut out: Vec<Command> = Vec::new();
    let mut seqs: BTreeMap<NodeId, u64> = BTreeMap::new();
    let mut time = T0;
    let mut push = |s: &mut MemState, origin: NodeId, time: i64, op: Op| {
        let seq = seqs.entry(origin).or_insert(0);
        *seq += 1;
        let caller = if time % 4 == 0 {
            user(1000, 100)
        } else {
            Caller::root()
        };
        let cmd = command(origin, *seq, time, caller, op);
        let _result = apply(s, &cmd).expect("MemState has no faults");
        cmd
    };
    for op in [
        Op::Init {
            perm: 0o755,
            uid: 0,
            gid: 0,
        },
        Op::RegisterNode { node: 1 },
    ] {
        time += 1;
        let cmd = push(&mut s, 1, time, op);
        out.push(cmd);
    }
    while out.len() < len {
        let a = strategy.new_tree(&mut runner).expect("strategy").current();
        if let A::Retry { back } = a {
            let again = out[out.len() - 1 - back % out.len()].clone();
            let _first = apply(&mut s, &again).expect("MemState has no faults");
            out.push(again);
            continue;
        }
        let Some(op) = to_op(&s, a) else { continue };
        time += 1;
        let origin = 1 + (time as u64 % 3);
        let cmd = push(&mut s, origin, time, op);
        out.push(cmd);
    }
    out
}

#[test]
fn workload_is_deterministic_and_valid() {
    let w = workload(11, 300);
    assert_eq!(w, workload(11, 300));
    let mut s = MemState::new();
    let mut ok = 0;
    let mut locked = 0;
    for c in &w {
        ok += usize::from(apply(&mut s, c).unwrap().is_ok());
        check_invariants(&s).unwrap();
        locked = locked.max(s.locks.values().map(|t| t.len()).sum::<usize>());
    }
    assert!(ok > 100, "most commands should apply ({ok})");
    assert!(s.inodes.len() > 3);
    assert!(locked >= 2, "the twin stores meet lock tables too ({locked} locks at most)");
}

/// Micro-benchmark of the write path's CPU without I/O: the proposer's content hash plus `apply`
/// on a `MemState`, for 256 MiB of distinct 1 MiB writes to one file, block-aligned and not.
/// Run: `cargo test --release --lib state::tests::bench_write_hashing -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn bench_write_hashing() {
    use std::time::{Duration, Instant};
    const WRITE_BYTES: usize = 1 << 20;
    const WRITES: u64 = 256;
    // The first round pays for first-touching the memory the states grow into: a warm-up.
    for (label, skew) in [("warm-up", 0u64), ("aligned", 0), ("unaligned +4097", 4097)] {
        let mut h = H::new();
        let f = h.file(ROOT_INO, "f");
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut data = vec![0u8; WRITE_BYTES];
        let (mut hashing, mut applying) = (Duration::ZERO, Duration::ZERO);
        for i in 0..WRITES {
            // Distinct data per write (xorshift), made outside the timed parts.
            for chunk in data.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
            }
            let op = Op::Write {
                ino: f,
                offset: skew + i * WRITE_BYTES as u64,
                data: data.clone(),
                append: false,
            };
            let t = Instant::now();
            let content_hash = op.content_hash();
            hashing += t.elapsed();
            let seq = h.next(1);
            let cmd = Command {
                origin: 1,
                seq,
                time: ts(T0),
                caller: Caller::root(),
                content_hash,
                op,
            };
            let t = Instant::now();
            let r = apply(&mut h.s, &cmd).expect("no store fault");
            applying += t.elapsed();
            assert!(r.is_ok(), "{r:?}");
        }
        let mib = (WRITES * WRITE_BYTES as u64) as f64 / f64::from(1u32 << 20);
        let total = hashing + applying;
        eprintln!(
            "{label}: {mib} MiB: propose hash {hashing:?}, apply {applying:?}, total {total:?} ({:.0} MiB/s)",
            mib / total.as_secs_f64()
        );
    }
}

/// `Op::Lock` from node `origin` for lock owner `owner` of its incarnation `inc`.
fn lock_op(ino: Ino, inc: u64, owner: u64, kind: LockKind, typ: Option<LockType>, start: u64, end: u64) -> Op {
    Op::Lock { ino, incarnation: inc, owner, kind, typ, start, end, pid: 100 + owner as u32 }
}

/// A node whose locks the leader expired is fenced: its changes (of the namespace, a file, its
/// attributes, a lock taken) are refused with EIO, changing nothing, until it acknowledges that
/// expiry; it may still unlock and release; other nodes are not fenced. An expiry that drops
/// nothing fences nothing; an acknowledgement of an earlier expiry lifts nothing; a second
/// expiry before the acknowledgement adds its inodes; a new run of the node (`DropStaleLocks`)
/// lifts the fence, and the node's removal drops its record.
#[test]
fn a_node_whose_locks_expired_is_fenced_until_it_acknowledges() {
    use LockKind::{Flock, Posix};
    use LockType::{Read, Write};
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let g = h.file(ROOT_INO, "g");
    let root = Caller::root();
    h.run_from(2, root.clone(), Op::RegisterNode { node: 2 }).unwrap();
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 1 }).unwrap();
    assert!(!h.s.lock_fences.active(2), "an expiry that dropped nothing fences nothing");
    h.run_from(2, root.clone(), lock_op(f, 1, 7, Flock, Some(Write), 0, 0)).unwrap();
    h.run_from(2, root.clone(), lock_op(g, 1, 8, Posix, Some(Read), 0, 9)).unwrap();
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 1 }).unwrap();
    assert_eq!(h.s.lock_fences.0[&2], LockFence { epoch: 1, active: true, inodes: vec![f, g], all: false });
    let write = Op::Write { ino: f, offset: 0, data: b"late".to_vec(), append: false };
    let mkdir = Op::MakeNode { parent: ROOT_INO, name: b"d".to_vec(), kind: FileKind::Dir, perm: 0o755, rdev: 0 };
    for op in [write.clone(), mkdir.clone(), truncate(g, 0), lock_op(f, 1, 7, Flock, Some(Write), 0, 0)] {
        let before = h.s.clone();
        assert_eq!(h.run_from(2, root.clone(), op.clone()), Err(Errno::Io), "{op:?} from the fenced node");
        assert!(h.s.same_namespace(&before));
    }
    // Releasing is no change of what others hold: allowed.
    h.run_from(2, root.clone(), lock_op(f, 1, 7, Flock, None, 0, 0)).unwrap();
    h.run_from(2, root.clone(), Op::ReleaseLocks { ino: g, incarnation: 1, owners: vec![8], kind: None }).unwrap();
    h.run_from(1, root.clone(), write.clone()).expect("another node is not fenced");
    h.run_from(2, root.clone(), Op::AckLockExpiry { epoch: 0 }).unwrap();
    assert!(h.s.lock_fences.active(2), "an acknowledgement of an earlier expiry lifts nothing");
    h.run_from(2, root.clone(), Op::AckLockExpiry { epoch: 1 }).unwrap();
    assert_eq!(h.s.lock_fences.0[&2], LockFence { epoch: 1, active: false, inodes: vec![], all: false });
    h.run_from(2, root.clone(), write.clone()).expect("acknowledged: accepted again");
    h.run_from(2, root.clone(), mkdir).unwrap();
    // Locks under two runs; the first expiry takes run 1's (f), a second one before the
    // acknowledgement run 2's too (g): the fence names both, and only its epoch lifts it.
    h.run_from(2, root.clone(), lock_op(f, 1, 7, Flock, Some(Write), 0, 0)).unwrap();
    h.run_from(2, root.clone(), lock_op(g, 2, 8, Posix, Some(Write), 0, 9)).unwrap();
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 1 }).unwrap();
    assert_eq!(h.s.lock_fences.0[&2].inodes, vec![f]);
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 2 }).unwrap();
    assert_eq!(h.s.lock_fences.0[&2], LockFence { epoch: 3, active: true, inodes: vec![f, g], all: false });
    h.run_from(2, root.clone(), Op::AckLockExpiry { epoch: 2 }).unwrap();
    assert!(h.s.lock_fences.active(2));
    // A new run of node 2 lifts the fence (it holds nothing of the old run open).
    h.run_from(2, root.clone(), Op::DropStaleLocks { incarnation: 3 }).unwrap();
    assert!(!h.s.lock_fences.active(2));
    h.run_from(2, root.clone(), write).unwrap();
    h.run_from(2, root.clone(), lock_op(f, 3, 7, Flock, Some(Write), 0, 0)).unwrap();
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 3 }).unwrap();
    assert!(h.s.lock_fences.active(2));
    h.run_from(1, root.clone(), Op::UnregisterNode { node: 2 }).unwrap();
    assert!(h.s.lock_fences.0.is_empty(), "a removed node's record goes");
}

/// Advisory locks are state: a lock from one node conflicts with another node's request (EAGAIN,
/// nothing changed), goes with a close (`ReleaseLocks`), with its node's earlier runs
/// (`DropStaleLocks`), with an expired lease up to an incarnation (`ExpireLocks`), with its
/// node's removal, and with the inode.
#[test]
fn locks_conflict_across_nodes_and_go_with_their_holders() {
    use LockKind::{Flock, Posix};
    use LockType::{Read, Write};
    let mut h = H::new();
    let f = h.file(ROOT_INO, "f");
    let root = Caller::root();
    h.run_from(2, root.clone(), Op::RegisterNode { node: 2 }).unwrap();
    // Node 1 (incarnation 1), process 7: a write lock on bytes 0..=99.
    h.run_from(1, root.clone(), lock_op(f, 1, 7, Posix, Some(Write), 0, 99)).unwrap();
    let before = h.s.clone();
    let r = h.run_from(2, root.clone(), lock_op(f, 1, 7, Posix, Some(Read), 50, 60));
    assert_eq!(r, Err(Errno::Again), "same owner id on another node is another owner");
    assert!(h.s.same_namespace(&before), "a refused lock changes nothing");
    h.run_from(2, root.clone(), lock_op(f, 1, 7, Posix, Some(Read), 100, 200)).unwrap();
    // flock and POSIX locks do not meet.
    h.run_from(2, root.clone(), lock_op(f, 1, 8, Flock, Some(Write), 0, 0)).unwrap();
    assert_eq!(h.run_from(1, root.clone(), lock_op(f, 1, 9, Flock, Some(Read), 0, 0)), Err(Errno::Again));
    // An invalid range, a missing inode.
    assert_eq!(h.run_from(1, root.clone(), lock_op(f, 1, 7, Posix, Some(Read), 9, 3)), Err(Errno::Inval));
    assert_eq!(h.run_from(1, root.clone(), lock_op(999, 1, 7, Posix, Some(Read), 0, 3)), Err(Errno::NoEnt));
    // Node 1's process closes the file: its POSIX locks go, node 2's stay.
    h.run_from(1, root.clone(), Op::ReleaseLocks { ino: f, incarnation: 1, owners: vec![7], kind: Some(Posix) }).unwrap();
    h.run_from(2, root.clone(), lock_op(f, 1, 7, Posix, Some(Write), 0, 99)).unwrap();
    let holders: Vec<_> = h.s.locks[&f].iter().map(|l| (l.owner.node, l.kind, l.start, l.end)).collect();
    assert_eq!(holders.len(), 3, "{holders:?}");
    assert!(holders.iter().all(|(node, ..)| *node == 2));
    // Node 2 restarts (incarnation 2): its earlier run's locks go.
    h.run_from(2, root.clone(), Op::DropStaleLocks { incarnation: 2 }).unwrap();
    assert!(!h.s.locks.contains_key(&f), "no empty table is stored");
    // The leader expires node 2's lease up to incarnation 1: its run 2 keeps its lock; up to 2,
    // it goes. Node 1's lock is not touched.
    h.run_from(2, root.clone(), lock_op(f, 2, 5, Flock, Some(Read), 0, 0)).unwrap();
    h.run_from(1, root.clone(), lock_op(f, 1, 6, Posix, Some(Read), 0, 9)).unwrap();
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 1 }).unwrap();
    assert_eq!(h.s.locks[&f].iter().filter(|l| l.owner.node == 2).count(), 1, "a later run's lock stays");
    h.run_from(1, root.clone(), Op::ExpireLocks { node: 2, incarnation: 2 }).unwrap();
    let holders: Vec<_> = h.s.locks[&f].iter().map(|l| l.owner.node).collect();
    assert_eq!(holders, vec![1], "node 2's lock expired, node 1's stays");
    h.run_from(1, root.clone(), Op::ReleaseLocks { ino: f, incarnation: 1, owners: vec![6], kind: None }).unwrap();
    assert!(!h.s.locks.contains_key(&f));
    // Locks go with a removed node and with a freed inode. (Node 2 first acknowledges the
    // expiry, which fenced it.)
    h.run_from(2, root.clone(), Op::AckLockExpiry { epoch: 1 }).unwrap();
    h.run_from(2, root.clone(), lock_op(f, 2, 1, Flock, Some(Read), 0, 0)).unwrap();
    h.run_from(1, root.clone(), Op::UnregisterNode { node: 2 }).unwrap();
    assert!(h.s.locks.is_empty());
    h.run_from(1, root.clone(), lock_op(f, 1, 3, Posix, Some(Write), 0, u64::MAX)).unwrap();
    h.unlink(ROOT_INO, "f").unwrap();
    assert!(h.s.locks.is_empty(), "the freed inode's locks went with it");
    // An inode holds at most LOCKS_PER_INODE_MAX locks: then ENOLCK, also for an unlock that
    // would split one.
    let g = h.file(ROOT_INO, "g");
    for i in 0..crate::config::LOCKS_PER_INODE_MAX as u64 {
        h.run_from(1, root.clone(), lock_op(g, 1, 3, Posix, Some(Write), 4 * i, 4 * i + 2)).unwrap();
    }
    let before = h.s.clone();
    assert_eq!(h.run_from(1, root.clone(), lock_op(g, 1, 3, Posix, Some(Write), 1 << 40, 1 << 41)), Err(Errno::NoLocks));
    assert_eq!(h.run_from(1, root.clone(), lock_op(g, 1, 3, Posix, None, 1, 1)), Err(Errno::NoLocks));
    assert!(h.s.same_namespace(&before));
    h.run_from(1, root.clone(), lock_op(g, 1, 3, Posix, None, 0, 2)).unwrap();
    assert_eq!(h.s.locks[&g].len(), crate::config::LOCKS_PER_INODE_MAX - 1);
}

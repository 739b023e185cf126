//! Everyday tools on a 3-node cluster: git (clone, status, commit, gc, fsck), tar, make, a C
//! compiler, sed and SQLite, each step on another node than the one before, with no waiting in between: a command that
//! returned on one node is complete for every command started afterwards on any other
//! (close-to-open and the read index), which is what people rely on when they use the same
//! checkout from several hosts. And SQLite's crash safety across a `kill -9` of the node.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use crate::cluster::write_synced;
use crate::cluster_harness::{Cluster, CONVERGE_TIMEOUT};

/// Runs `program args` in `dir` with a configuration of its own (no user or system git config),
/// asserts that it succeeded, and returns its standard output.
fn run(dir: &Path, program: &str, args: &[&dyn AsRef<OsStr>], home: &Path) -> String {
    let out = output(dir, program, args, home);
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert!(
        out.status.success(),
        "{program} {shown:?} in {} failed ({}):\n{}\n{}",
        dir.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `program args` in `dir` (as `run`) and returns how it ended, whatever that was.
fn output(dir: &Path, program: &str, args: &[&dyn AsRef<OsStr>], home: &Path) -> Output {
    Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .current_dir(dir)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "pickbox test")
        .env("GIT_AUTHOR_EMAIL", "test@pickbox.invalid")
        .env("GIT_COMMITTER_NAME", "pickbox test")
        .env("GIT_COMMITTER_EMAIL", "test@pickbox.invalid")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed? scripts/test.sh installs it): {e}"))
}

#[test]
fn cluster_git_make_and_a_compiler_work_across_nodes() {
    let mut c = Cluster::new(3);
    let home = c.scratch().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let git = |k: u64, args: &[&dyn AsRef<OsStr>]| run(&c.path(k, "clone"), "git", args, &home);

    // Clone this repository (a few hundred files, pack files, hooks, an index) through node 1.
    let source = Path::new(env!("CARGO_MANIFEST_DIR"));
    run(c.mnt(1), "git", &[&"clone", &"-q", &"--no-hardlinks", &source, &"clone"], &home);
    let head = git(1, &[&"rev-parse", &"HEAD"]);

    // Node 2 sees the same checkout: same HEAD, a clean work tree (the index's stat data match
    // what node 2 reports: same inode numbers, sizes and times on every node), sound objects.
    assert_eq!(git(2, &[&"rev-parse", &"HEAD"]), head);
    assert_eq!(git(2, &[&"status", &"--porcelain"]), "", "work tree not clean on node 2");
    git(2, &[&"fsck", &"--full", &"--no-progress"]);

    // A commit on node 2 (an edit, a new file, a removal), read on node 3.
    let mut readme = std::fs::read(c.path(2, "clone/README.md")).unwrap();
    readme.extend_from_slice(b"\nEdited through node 2.\n");
    write_synced(&c.path(2, "clone/README.md"), &readme).unwrap();
    write_synced(&c.path(2, "clone/NEW.txt"), b"new file\n").unwrap();
    git(2, &[&"rm", &"-q", &".gitignore"]);
    git(2, &[&"add", &"-A"]);
    git(2, &[&"commit", &"-q", &"-m", &"edited on node 2"]);
    assert_eq!(git(3, &[&"log", &"-1", &"--format=%s"]), "edited on node 2\n");
    assert_eq!(git(3, &[&"status", &"--porcelain"]), "", "work tree not clean on node 3");
    assert_eq!(std::fs::read(c.path(3, "clone/README.md")).unwrap(), readme);

    // gc on node 3 packs and prunes (renames, unlinks, mmap of pack files); node 1 checks it all.
    git(3, &[&"gc", &"-q", &"--prune=now"]);
    git(1, &[&"fsck", &"--full", &"--no-progress", &"--strict"]);
    assert_eq!(git(1, &[&"status", &"--porcelain"]), "", "work tree not clean on node 1");
    assert_eq!(git(1, &[&"rev-list", &"--count", &"HEAD"]), git(3, &[&"rev-list", &"--count", &"HEAD"]));
    assert!(git(1, &[&"count-objects", &"-v"]).contains("count: 0\n"), "loose objects left after gc");

    // An archive extracted through node 1 (modes and nanosecond-free mtimes set by utimensat)
    // compares equal through node 2: contents, sizes, modes, owners, times, symbolic links.
    let tarball = c.scratch().join("source.tar");
    run(source, "git", &[&"archive", &"-o", &tarball, &"HEAD"], &home);
    std::fs::create_dir(c.path(1, "extracted")).unwrap();
    run(&c.path(1, "extracted"), "tar", &[&"-xf", &tarball], &home);
    run(&c.path(2, "extracted"), "tar", &[&"-df", &tarball], &home);

    // A program written on node 1, built with make on node 2 (the compiler reads through node 2
    // and writes the executable through it), run from node 3. Then edited in place with sed on
    // node 1 (a new file renamed over the old one): make on node 3 sees the source newer than
    // the executable (nanosecond mtimes, the same on every node) and rebuilds.
    let program = b"#include <stdio.h>\nint main(void) { puts(\"hello from pickbox\"); return 0; }\n";
    write_synced(&c.path(1, "hello.c"), program).unwrap();
    write_synced(&c.path(1, "Makefile"), b"hello: hello.c\n\tcc -O0 -o hello hello.c\n").unwrap();
    run(c.mnt(2), "make", &[&"-s"], &home);
    let hello = |k: u64| run(c.mnt(k), &c.path(k, "hello").to_string_lossy(), &[], &home);
    assert_eq!(hello(3), "hello from pickbox\n");
    assert_eq!(output(c.mnt(3), "make", &[&"-q"], &home).status.code(), Some(0), "make on node 3: hello not up to date");
    run(c.mnt(1), "sed", &[&"-i", &"s/hello from pickbox/rebuilt on node 3/", &"hello.c"], &home);
    assert_eq!(output(c.mnt(3), "make", &[&"-q"], &home).status.code(), Some(1), "make on node 3 missed the edit on node 1");
    run(c.mnt(3), "make", &[&"-s"], &home);
    assert_eq!(hello(1), "rebuilt on node 3\n");

    c.wait_converged(CONVERGE_TIMEOUT);
}

/// A SQLite database (Python's sqlite3), in rollback-journal and in WAL mode, written through one
/// node and then, after it is closed there, checked and written through the next: the journal
/// files, byte-range locks (node-local, so one node at a time), fsyncs and the WAL's shared
/// memory map all work, and a database closed on one node opens intact on another.
#[test]
fn cluster_sqlite_databases_move_between_nodes() {
    const SCRIPT: &str = r#"
import sqlite3, sys
path, mode, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
db = sqlite3.connect(path)
assert db.execute("PRAGMA journal_mode=" + mode).fetchone()[0].upper() == mode
db.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
for i in range(rows // 10):
    with db:
        db.executemany("INSERT INTO t (v) VALUES (?)", [("row %d %s" % (i, "x" * (i % 50)),)] * 10)
print(db.execute("PRAGMA integrity_check").fetchone()[0], db.execute("SELECT count(*) FROM t").fetchone()[0])
db.close()
"#;
    let mut c = Cluster::new(3);
    let home = c.scratch().to_path_buf();
    for mode in ["DELETE", "WAL"] {
        let db = format!("{mode}.sqlite");
        let sql = |k: u64, rows: &str| run(c.mnt(k), "python3", &[&"-c", &SCRIPT, &db, &mode, &rows], &home);
        assert_eq!(sql(1, "1000"), "ok 1000\n", "{mode}: written on node 1");
        assert_eq!(sql(2, "0"), "ok 1000\n", "{mode}: read on node 2");
        assert_eq!(sql(2, "500"), "ok 1500\n", "{mode}: written on node 2");
        assert_eq!(sql(3, "0"), "ok 1500\n", "{mode}: read on node 3");
    }
    c.wait_converged(CONVERGE_TIMEOUT);
}

/// A program committing one SQLite row per transaction without pause (Python's sqlite3,
/// rollback journal, `synchronous=FULL`), printing the id of each row whose commit returned.
const SQLITE_WRITER: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
db.commit()
i = 0
while True:
    with db:
        db.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, "row %d" % i))
    print(i, flush=True)
    i += 1
"#;

/// Prints the integrity check's verdict and the table's row count, lowest and highest id.
const SQLITE_CHECK: &str = r#"
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(db.execute("PRAGMA integrity_check").fetchone()[0], *db.execute("SELECT count(*), min(id), max(id) FROM t").fetchone())
"#;

/// `SQLITE_WRITER` on `db`; its reported commits arrive on the channel (ids in order), which
/// closes when it ends.
fn sqlite_writer(db: &Path) -> (std::process::Child, std::sync::mpsc::Receiver<u64>) {
    use std::io::BufRead;
    let mut writer = Command::new("python3")
        .args([OsStr::new("-c"), OsStr::new(SQLITE_WRITER), db.as_os_str()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot run python3");
    let stdout = writer.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line.trim().parse::<u64>().expect("a row id")).is_err() {
                return;
            }
        }
    });
    (writer, rx)
}

/// Receives commits into `last` until the writer has reported `id`; false if it stopped or went
/// silent for `SQLITE_STALL` before that.
fn commits_until(rx: &std::sync::mpsc::Receiver<u64>, id: u64, last: &mut Option<u64>) -> bool {
    while last.is_none_or(|n| n < id) {
        match rx.recv_timeout(SQLITE_STALL) {
            Ok(n) => *last = Some(n),
            Err(_) => return false,
        }
    }
    true
}

/// Kills the writer (a commit in flight is cut off, as by a crash) and returns the last commit it
/// reported, `last` included.
fn stop_writer(mut writer: std::process::Child, rx: std::sync::mpsc::Receiver<u64>, last: Option<u64>) -> u64 {
    let _ = writer.kill();
    let _ = writer.wait();
    // Its output ends with it: the reported lines still in the pipe, then the channel closes.
    rx.iter().last().or(last).expect("the writer reported no commit")
}

/// Longest pause of the writer's commits tolerated: a leader election in a debug build on 2 cores.
const SQLITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs `SQLITE_CHECK` on `db` through `mnt` and asserts an intact database holding rows
/// 0..=`last` and at most the one being committed when the writer stopped.
fn assert_sqlite_intact(mnt: &Path, db: &Path, last: u64, home: &Path) {
    let out = run(mnt, "python3", &[&"-c", &SQLITE_CHECK, &db], home);
    let fields: Vec<&str> = out.split_whitespace().collect();
    assert_eq!(fields.first(), Some(&"ok"), "integrity check: {out}");
    let (count, min, max): (u64, u64, u64) = (fields[1].parse().unwrap(), fields[2].parse().unwrap(), fields[3].parse().unwrap());
    eprintln!("{count} rows; the writer reported {} commits", last + 1);
    assert_eq!((min, max), (0, count - 1), "rows missing in the middle: {out}");
    assert!(count == last + 1 || count == last + 2, "{count} rows, commits reported up to {last}");
}

/// SQLite's crash safety rests on fsync: a transaction whose commit returned must survive a crash
/// of the storage under it, and the database must open intact. Here the node is killed (-9) while
/// a program commits one row per transaction without pause; after the restart the database
/// passes its integrity check and holds every row whose commit returned (and at most the one
/// that was being committed), with no gap.
#[test]
fn sqlite_keeps_every_committed_transaction_across_a_kill9_of_the_node() {
    let mut node = crate::harness::Node::start();
    let home = node.mnt.parent().unwrap().to_path_buf();
    let db = node.path("crash.sqlite");
    let (writer, rx) = sqlite_writer(&db);
    let mut last = None;
    assert!(commits_until(&rx, 150, &mut last), "the writer stopped after commit {last:?}");
    node.kill9();
    let last = stop_writer(writer, rx, last);
    node.spawn();
    assert_sqlite_intact(&node.mnt, &db, last, &home);
}

/// The same program through a follower while the leader is killed (-9): its commits pause for
/// the election and go on, and the database, checked through the third node, holds every row
/// whose commit returned.
#[test]
fn cluster_sqlite_commits_go_on_through_a_leader_kill9() {
    let mut c = Cluster::new(3);
    let home = c.scratch().to_path_buf();
    let (writer, rx) = sqlite_writer(&c.path(2, "failover.sqlite"));
    let mut last = None;
    assert!(commits_until(&rx, 100, &mut last), "the writer stopped after commit {last:?}");
    c.kill9(1);
    let killed_at = last.unwrap_or_default();
    assert!(
        commits_until(&rx, killed_at + 100, &mut last),
        "commits stopped at {last:?} after the leader was killed at {killed_at}"
    );
    let last = stop_writer(writer, rx, last);
    assert_sqlite_intact(c.mnt(3), &c.path(3, "failover.sqlite"), last, &home);
}

//! rename and renameat2: replacing, RENAME_NOREPLACE, RENAME_EXCHANGE, and the error cases.

use std::fs;
use std::path::Path;

use crate::harness::{check, cstr, errno_of, lstat, Node};

fn renameat2(from: &Path, to: &Path, flags: u32) -> std::io::Result<()> {
    let a = cstr(from);
    let b = cstr(to);
    // SAFETY: valid paths.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) }).map(|_| ())
}

#[test]
fn rename_files_and_dirs() {
    let node = Node::start();
    let a = node.path("a");
    fs::write(&a, b"A").unwrap();
    let ino = lstat(&a).unwrap().st_ino;
    fs::rename(&a, node.path("b")).unwrap();
    assert_eq!(errno_of(lstat(&a)), libc::ENOENT);
    assert_eq!(lstat(&node.path("b")).unwrap().st_ino, ino, "rename keeps the inode");

    // Replace an existing file: the old target is gone.
    fs::write(node.path("c"), b"C").unwrap();
    fs::rename(node.path("b"), node.path("c")).unwrap();
    assert_eq!(fs::read(node.path("c")).unwrap(), b"A");
    assert_eq!(fs::read_dir(&node.mnt).unwrap().count(), 1);

    // Across directories; the moved directory's ".." and both parents' link counts follow.
    fs::create_dir_all(node.path("x/inner")).unwrap();
    fs::create_dir(node.path("y")).unwrap();
    fs::write(node.path("x/inner/f"), b"deep").unwrap();
    fs::rename(node.path("x/inner"), node.path("y/inner")).unwrap();
    assert_eq!(fs::read(node.path("y/inner/f")).unwrap(), b"deep");
    assert_eq!(lstat(&node.path("x")).unwrap().st_nlink, 2);
    assert_eq!(lstat(&node.path("y")).unwrap().st_nlink, 3);
    assert_eq!(lstat(&node.path("y/inner/..")).unwrap().st_ino, lstat(&node.path("y")).unwrap().st_ino);

    // A directory over an empty directory replaces it.
    fs::create_dir(node.path("empty")).unwrap();
    fs::rename(node.path("y/inner"), node.path("empty")).unwrap();
    assert_eq!(fs::read(node.path("empty/f")).unwrap(), b"deep");

    // Same name: a no-op that succeeds.
    fs::rename(node.path("c"), node.path("c")).unwrap();
    // Two hard links of one inode: rename is a no-op and both names stay.
    fs::hard_link(node.path("c"), node.path("c2")).unwrap();
    fs::rename(node.path("c"), node.path("c2")).unwrap();
    assert!(lstat(&node.path("c")).is_ok() && lstat(&node.path("c2")).is_ok());
}

#[test]
fn rename_error_cases() {
    let node = Node::start();
    fs::create_dir_all(node.path("d/sub")).unwrap();
    fs::write(node.path("d/sub/f"), b"").unwrap();
    fs::create_dir(node.path("full")).unwrap();
    fs::write(node.path("full/x"), b"").unwrap();
    fs::write(node.path("file"), b"").unwrap();

    // Directory onto a non-empty directory.
    let e = errno_of(fs::rename(node.path("d"), node.path("full")));
    assert!(e == libc::ENOTEMPTY || e == libc::EEXIST, "got {e}");
    // Directory onto a file, file onto a directory.
    assert_eq!(errno_of(fs::rename(node.path("d"), node.path("file"))), libc::ENOTDIR);
    assert_eq!(errno_of(fs::rename(node.path("file"), node.path("full"))), libc::EISDIR);
    // Into its own subtree.
    assert_eq!(errno_of(fs::rename(node.path("d"), node.path("d/sub/inside"))), libc::EINVAL);
    // Missing source, missing target directory.
    assert_eq!(errno_of(fs::rename(node.path("nope"), node.path("x"))), libc::ENOENT);
    assert_eq!(errno_of(fs::rename(node.path("file"), node.path("nope/x"))), libc::ENOENT);
    // "." and ".." cannot be renamed.
    let e = errno_of(fs::rename(node.path("d/."), node.path("z")));
    assert!(e == libc::EBUSY || e == libc::EINVAL, "got {e}");
    // Nothing changed.
    assert!(lstat(&node.path("d/sub/f")).is_ok());
    assert!(lstat(&node.path("full/x")).is_ok());
    assert!(lstat(&node.path("file")).is_ok());
}

#[test]
fn rename_noreplace() {
    let node = Node::start();
    fs::write(node.path("a"), b"a").unwrap();
    fs::write(node.path("b"), b"b").unwrap();
    let r = renameat2(&node.path("a"), &node.path("b"), libc::RENAME_NOREPLACE);
    assert_eq!(errno_of(r), libc::EEXIST);
    assert_eq!(fs::read(node.path("b")).unwrap(), b"b");
    renameat2(&node.path("a"), &node.path("c"), libc::RENAME_NOREPLACE).unwrap();
    assert_eq!(fs::read(node.path("c")).unwrap(), b"a");
    assert_eq!(errno_of(lstat(&node.path("a"))), libc::ENOENT);
}

#[test]
fn rename_exchange() {
    let node = Node::start();
    fs::write(node.path("f"), b"file").unwrap();
    fs::create_dir(node.path("d")).unwrap();
    fs::create_dir(node.path("other")).unwrap();
    fs::write(node.path("d/in"), b"in").unwrap();
    let f_ino = lstat(&node.path("f")).unwrap().st_ino;
    let d_ino = lstat(&node.path("d")).unwrap().st_ino;
    renameat2(&node.path("f"), &node.path("d"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(lstat(&node.path("f")).unwrap().st_ino, d_ino);
    assert_eq!(lstat(&node.path("d")).unwrap().st_ino, f_ino);
    assert_eq!(fs::read(node.path("f/in")).unwrap(), b"in");
    assert_eq!(fs::read(node.path("d")).unwrap(), b"file");

    // Across directories: a directory swaps parents, and the link counts follow.
    let root_links = lstat(&node.mnt).unwrap().st_nlink;
    fs::write(node.path("other/g"), b"g").unwrap();
    renameat2(&node.path("f"), &node.path("other/g"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(node.path("other/g/in")).unwrap(), b"in");
    assert_eq!(fs::read(node.path("f")).unwrap(), b"g");
    assert_eq!(lstat(&node.path("other")).unwrap().st_nlink, 3);
    assert_eq!(lstat(&node.mnt).unwrap().st_nlink, root_links - 1);
    assert_eq!(lstat(&node.path("other/g/..")).unwrap().st_ino, lstat(&node.path("other")).unwrap().st_ino);

    // Both names must exist.
    let r = renameat2(&node.path("f"), &node.path("missing"), libc::RENAME_EXCHANGE);
    assert_eq!(errno_of(r), libc::ENOENT);
    // Exchange with NOREPLACE is invalid.
    let r = renameat2(&node.path("f"), &node.path("d"), libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE);
    assert_eq!(errno_of(r), libc::EINVAL);
    // A directory cannot be exchanged into its own subtree.
    fs::create_dir_all(node.path("p/q")).unwrap();
    let r = renameat2(&node.path("p"), &node.path("p/q"), libc::RENAME_EXCHANGE);
    assert_eq!(errno_of(r), libc::EINVAL);
}

#[test]
fn rename_many_in_one_directory() {
    let node = Node::start();
    let d = node.path("r");
    fs::create_dir(&d).unwrap();
    for i in 0..200 {
        fs::write(d.join(format!("a{i}")), format!("{i}")).unwrap();
    }
    for i in 0..200 {
        fs::rename(d.join(format!("a{i}")), d.join(format!("b{i}"))).unwrap();
    }
    for i in 0..200 {
        assert_eq!(fs::read_to_string(d.join(format!("b{i}"))).unwrap(), format!("{i}"));
    }
    assert_eq!(fs::read_dir(&d).unwrap().count(), 200);
}

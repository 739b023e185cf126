//! Metadata: chmod, chown with setuid/setgid clearing, utimensat, statfs, xattrs, name limits,
//! permissions.

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::harness::{as_user, check, cstr, errno_of, lstat, Node, NOBODY, OTHER};

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path.
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(|_| ())
}

#[test]
fn chmod_sets_mode_and_ctime() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"x").unwrap();
    let before = lstat(&p).unwrap();
    for mode in [0o000, 0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777] {
        chmod(&p, mode);
        assert_eq!(lstat(&p).unwrap().st_mode & 0o7777, mode, "after chmod {mode:o}");
    }
    let after = lstat(&p).unwrap();
    assert!(
        (after.st_ctime, after.st_ctime_nsec) >= (before.st_ctime, before.st_ctime_nsec),
        "ctime must not go back"
    );
    fs::create_dir(node.path("d")).unwrap();
    chmod(&node.path("d"), 0o700);
    assert_eq!(lstat(&node.path("d")).unwrap().st_mode & 0o7777, 0o700);
    // A non-owner may not chmod.
    let r = as_user(NOBODY, NOBODY, || {
        let c = cstr(&p);
        // SAFETY: valid path.
        check(unsafe { libc::chmod(c.as_ptr(), 0o777) }).map(|_| ())
    });
    chmod(&p, 0o644);
    assert_eq!(r, Err(libc::EPERM));
}

#[test]
fn chown_and_suid_sgid_clearing() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"#!/bin/sh\n").unwrap();
    chown(&p, NOBODY, NOBODY).unwrap();
    let st = lstat(&p).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (NOBODY, NOBODY));

    // chown of a regular file clears setuid, and setgid when group-executable.
    chmod(&p, 0o6755);
    chown(&p, 0, 0).unwrap();
    assert_eq!(lstat(&p).unwrap().st_mode & 0o7777, 0o755, "setuid/setgid cleared by chown");

    // setgid without group-execute (mandatory-locking marker) survives; setuid does not.
    chmod(&p, 0o6745);
    chown(&p, NOBODY, NOBODY).unwrap();
    assert_eq!(lstat(&p).unwrap().st_mode & 0o7777, 0o2745);

    // -1 leaves an id unchanged.
    chown(&p, u32::MAX, 0).unwrap();
    let st = lstat(&p).unwrap();
    assert_eq!((st.st_uid, st.st_gid), (NOBODY, 0));

    // A directory keeps its setgid bit across chown.
    let d = node.path("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o2775);
    chown(&d, NOBODY, NOBODY).unwrap();
    assert_eq!(lstat(&d).unwrap().st_mode & 0o7777, 0o2775);

    // A non-root owner may not give a file away.
    let q = node.path("mine");
    fs::write(&q, b"").unwrap();
    chown(&q, NOBODY, NOBODY).unwrap();
    let r = as_user(NOBODY, NOBODY, || chown(&q, 0, u32::MAX));
    assert_eq!(r, Err(libc::EPERM));

    // lchown on a symlink changes the link, not the target.
    let l = node.path("link");
    std::os::unix::fs::symlink("mine", &l).unwrap();
    chown(&l, 12345, 12345).unwrap();
    assert_eq!(lstat(&l).unwrap().st_uid, 12345);
    assert_eq!(lstat(&q).unwrap().st_uid, NOBODY);

    // A write by a non-owner clears setuid (the kernel asks the filesystem to drop it).
    let w = node.path("w");
    fs::write(&w, b"").unwrap();
    chmod(&w, 0o4777);
    let r = as_user(NOBODY, NOBODY, || {
        let mut f = OpenOptions::new().write(true).open(&w)?;
        f.write_all(b"data")?;
        f.sync_all()
    });
    assert_eq!(r, Ok(()));
    assert_eq!(lstat(&w).unwrap().st_mode & 0o4000, 0, "setuid survived a write by another user");
}

#[test]
fn setuid_and_setgid_cleared_where_linux_clears_them() {
    // The kernel leaves this to Pickbox (FUSE_HANDLE_KILLPRIV_V2): a write, truncate, O_TRUNC
    // open or fallocate by a caller without CAP_FSETID clears setuid, and setgid when the file
    // is group-executable; root keeps them.
    let node = Node::start();
    // The files belong to root and the group of the user who changes them.
    let other = |rel: &str, mode: u32, change: fn(&Path) -> std::io::Result<()>| -> u32 {
        let p = node.path(rel);
        fs::write(&p, b"0123456789").unwrap();
        chown(&p, 0, NOBODY).unwrap();
        chmod(&p, mode);
        let r = as_user(NOBODY, NOBODY, || change(&p));
        assert_eq!(r, Ok(()), "{rel}");
        lstat(&p).unwrap().st_mode & 0o7777
    };
    let write = |p: &Path| {
        let mut f = OpenOptions::new().write(true).open(p)?;
        f.write_all(b"data")?;
        f.sync_all()
    };
    let truncate = |p: &Path| OpenOptions::new().write(true).open(p)?.set_len(3);
    let open_trunc = |p: &Path| OpenOptions::new().write(true).truncate(true).open(p).map(|_| ());
    let fallocate = |p: &Path| {
        let f = OpenOptions::new().write(true).open(p)?;
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 8192) }).map(|_| ())
    };
    assert_eq!(other("w", 0o6777, write), 0o0777, "write");
    assert_eq!(other("t", 0o6777, truncate), 0o0777, "truncate");
    assert_eq!(other("o", 0o6777, open_trunc), 0o0777, "open O_TRUNC");
    assert_eq!(other("a", 0o6777, fallocate), 0o0777, "fallocate");
    // setgid without group execute is not a privilege (mandatory-locking marker): kept.
    assert_eq!(other("g", 0o6767, truncate), 0o2767, "truncate of a setgid file without group execute");
    assert_eq!(other("h", 0o6767, write), 0o2767, "write to a setgid file without group execute");
    // Root (CAP_FSETID) keeps them.
    let p = node.path("root");
    fs::write(&p, b"x").unwrap();
    chmod(&p, 0o6755);
    write(&p).unwrap();
    truncate(&p).unwrap();
    fallocate(&p).unwrap();
    assert_eq!(lstat(&p).unwrap().st_mode & 0o7777, 0o6755, "root's changes keep setuid/setgid");
}

fn utimensat(p: &Path, times: [libc::timespec; 2], flags: i32) -> std::io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid path and a 2-element array.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), flags) }).map(|_| ())
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec { tv_sec: sec, tv_nsec: nsec }
}

#[test]
fn utimensat_now_omit_and_nanoseconds() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"x").unwrap();

    utimensat(&p, [ts(1_000_000_000, 123_456_789), ts(1_500_000_000, 987_654_321)], 0).unwrap();
    let st = lstat(&p).unwrap();
    assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000_000, 123_456_789));
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (1_500_000_000, 987_654_321));

    // UTIME_OMIT keeps atime; a new mtime; pre-1970 and far-future times too.
    utimensat(&p, [ts(0, libc::UTIME_OMIT), ts(-1_000, 5)], 0).unwrap();
    let st = lstat(&p).unwrap();
    assert_eq!((st.st_atime, st.st_atime_nsec), (1_000_000_000, 123_456_789));
    assert_eq!((st.st_mtime, st.st_mtime_nsec), (-1_000, 5));
    utimensat(&p, [ts(4_102_444_800, 1), ts(0, libc::UTIME_OMIT)], 0).unwrap();
    assert_eq!(lstat(&p).unwrap().st_atime, 4_102_444_800);

    // UTIME_NOW sets the current time.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    utimensat(&p, [ts(0, libc::UTIME_OMIT), ts(0, libc::UTIME_NOW)], 0).unwrap();
    let st = lstat(&p).unwrap();
    assert!((st.st_mtime - now).abs() <= 5, "UTIME_NOW mtime {} vs now {now}", st.st_mtime);
    assert_eq!(st.st_atime, 4_102_444_800);

    // A NULL times pointer means both now.
    let c = cstr(&p);
    // SAFETY: valid path; NULL times is allowed.
    check(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) }).unwrap();
    let st = lstat(&p).unwrap();
    assert!((st.st_atime - now).abs() <= 5);

    // AT_SYMLINK_NOFOLLOW changes the link's own times.
    let l = node.path("l");
    std::os::unix::fs::symlink("f", &l).unwrap();
    utimensat(&l, [ts(111, 0), ts(222, 0)], libc::AT_SYMLINK_NOFOLLOW).unwrap();
    assert_eq!(lstat(&l).unwrap().st_mtime, 222);
    assert_ne!(lstat(&p).unwrap().st_mtime, 222);

    // A non-owner without write access may not set explicit times, nor UTIME_NOW.
    chmod(&p, 0o644);
    let r = as_user(NOBODY, NOBODY, || utimensat(&p, [ts(1, 0), ts(1, 0)], 0));
    assert_eq!(r, Err(libc::EPERM));
    let r = as_user(NOBODY, NOBODY, || utimensat(&p, [ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)], 0));
    assert_eq!(r, Err(libc::EACCES));
}

#[test]
fn write_updates_mtime_and_reads_leave_atime() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"x").unwrap();
    utimensat(&p, [ts(1000, 0), ts(1000, 0)], 0).unwrap();
    let _ = fs::read(&p).unwrap();
    let st = lstat(&p).unwrap();
    assert_eq!(st.st_atime, 1000, "reads never change atime (docs/SEMANTICS.md)");
    let mut f = OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all(b"y").unwrap();
    f.sync_all().unwrap();
    drop(f);
    let st = lstat(&p).unwrap();
    assert!(st.st_mtime > 1000, "a write must move mtime");
    assert!(st.st_ctime > 1000, "a write must move ctime");
}

#[test]
fn statfs_reports_sane_values() {
    let node = Node::start();
    let c = cstr(&node.mnt);
    // SAFETY: zeroed statvfs is a valid out-parameter.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    check(unsafe { libc::statvfs(c.as_ptr(), &mut s) }).unwrap();
    assert!(s.f_bsize > 0);
    assert!(s.f_blocks > 0, "f_blocks is 0: df would show an empty filesystem");
    assert!(s.f_bfree <= s.f_blocks && s.f_bavail <= s.f_blocks);
    assert_eq!(s.f_namemax, 255);
}

#[test]
fn name_too_long() {
    let node = Node::start();
    let ok = "a".repeat(255);
    let long = "a".repeat(256);
    fs::write(node.path(&ok), b"").unwrap();
    assert!(fs::metadata(node.path(&ok)).is_ok());
    assert_eq!(errno_of(fs::write(node.path(&long), b"")), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::create_dir(node.path(&long))), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::metadata(node.path(&long))), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::rename(node.path(&ok), node.path(&long))), libc::ENAMETOOLONG);
    assert_eq!(errno_of(std::os::unix::fs::symlink("x", node.path(&long))), libc::ENAMETOOLONG);
    assert_eq!(errno_of(fs::hard_link(node.path(&ok), node.path(&long))), libc::ENAMETOOLONG);
    // A path over PATH_MAX (4096 bytes) is refused by the kernel before it reaches the node.
    let deep = format!("{}/x", ["d"; 2100].join("/"));
    assert_eq!(errno_of(fs::metadata(node.path(&deep))), libc::ENAMETOOLONG);
}

#[test]
fn names_are_bytes() {
    use std::os::unix::ffi::OsStrExt;
    let node = Node::start();
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9\x01\xff-\x7f");
    let p = node.mnt.join(name);
    fs::write(&p, b"bytes").unwrap();
    let names: Vec<_> = fs::read_dir(&node.mnt).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().any(|n| n == name), "non-UTF-8 name not listed: {names:?}");
    assert_eq!(fs::read(&p).unwrap(), b"bytes");
}

#[test]
fn permissions_are_enforced() {
    let node = Node::start();
    let p = node.path("secret");
    fs::write(&p, b"s").unwrap();
    chmod(&p, 0o600);
    let r = as_user(NOBODY, NOBODY, || fs::read(&p).map(|_| ()));
    assert_eq!(r, Err(libc::EACCES));
    let d = node.path("closed");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o755);
    let r = as_user(NOBODY, NOBODY, || fs::write(d.join("x"), b""));
    assert_eq!(r, Err(libc::EACCES));
    // access(2) as the other user.
    let r = as_user(NOBODY, NOBODY, || {
        let c = cstr(&p);
        // SAFETY: valid path.
        check(unsafe { libc::access(c.as_ptr(), libc::R_OK) }).map(|_| ())
    });
    assert_eq!(r, Err(libc::EACCES));
    let c = cstr(&p);
    // SAFETY: valid path.
    check(unsafe { libc::access(c.as_ptr(), libc::R_OK | libc::W_OK) }).unwrap();
}

pub(crate) fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> std::io::Result<()> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers and lengths.
    check(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), flags) })
        .map(|_| ())
}

pub(crate) fn getxattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    // SAFETY: size query with a NULL buffer, then a read into a buffer of that size.
    let len = check(unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; len as usize];
    let got = check(unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(got as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> std::io::Result<Vec<String>> {
    let c = cstr(p);
    // SAFETY: as in getxattr.
    let len = check(unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
    let mut buf = vec![0u8; len as usize];
    let got = check(unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })?;
    buf.truncate(got as usize);
    Ok(buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect())
}

#[test]
fn xattrs_set_get_list_remove() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"").unwrap();
    assert_eq!(listxattr(&p).unwrap(), Vec::<String>::new());
    setxattr(&p, "user.a", b"alpha", 0).unwrap();
    setxattr(&p, "user.b", b"", 0).unwrap();
    let big = vec![7u8; 60_000];
    setxattr(&p, "user.big", &big, 0).unwrap();
    setxattr(&p, "trusted.t", b"root only", 0).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"alpha");
    assert_eq!(getxattr(&p, "user.b").unwrap(), b"");
    assert!(getxattr(&p, "user.big").unwrap() == big);
    let mut names = listxattr(&p).unwrap();
    names.sort();
    assert_eq!(names, ["trusted.t", "user.a", "user.b", "user.big"]);

    assert_eq!(errno_of(setxattr(&p, "user.a", b"x", libc::XATTR_CREATE)), libc::EEXIST);
    assert_eq!(errno_of(setxattr(&p, "user.zz", b"x", libc::XATTR_REPLACE)), libc::ENODATA);
    setxattr(&p, "user.a", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&p, "user.a").unwrap(), b"replaced");
    assert_eq!(errno_of(getxattr(&p, "user.none")), libc::ENODATA);

    // A buffer too small gives ERANGE.
    let c = cstr(&p);
    let n = CString::new("user.a").unwrap();
    let mut small = [0u8; 2];
    // SAFETY: buffer of the stated length.
    let r = check(unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 2) });
    assert_eq!(errno_of(r), libc::ERANGE);

    let rm = |name: &str| {
        let n = CString::new(name).unwrap();
        // SAFETY: valid strings.
        check(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
    };
    rm("user.a").unwrap();
    assert_eq!(errno_of(rm("user.a")), libc::ENODATA);
    assert_eq!(errno_of(getxattr(&p, "user.a")), libc::ENODATA);
    let mut names = listxattr(&p).unwrap();
    names.sort();
    assert_eq!(names, ["trusted.t", "user.b", "user.big"]);

    // Directories carry xattrs too; a non-owner cannot set user.* on a file it cannot write.
    fs::create_dir(node.path("d")).unwrap();
    setxattr(&node.path("d"), "user.d", b"dir", 0).unwrap();
    assert_eq!(getxattr(&node.path("d"), "user.d").unwrap(), b"dir");
    chmod(&p, 0o644);
    let r = as_user(NOBODY, NOBODY, || setxattr(&p, "user.x", b"x", 0));
    assert_eq!(r, Err(libc::EACCES));
}

/// Runs `setfacl` with `args`, panicking on failure.
pub(crate) fn setfacl(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    acl_tool("setfacl", args);
}

/// The ACL of `p` as `getfacl -n --omit-header` prints it, one entry per line.
pub(crate) fn getfacl(p: &Path) -> Vec<String> {
    acl_tool("getfacl", &[&"-n", &"--omit-header", &p])
}

fn acl_tool(program: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<String> {
    let out = std::process::Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {:?}: {}", args.iter().map(|a| a.as_ref().to_owned()).collect::<Vec<_>>(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// An ACL xattr value as the kernel takes it: version 2, then `{tag, perm, id}` entries.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// Runs `script` with `sh` as root (a child process: the umask is per process, and the tests
/// run in parallel threads of one).
fn sh(script: &str) {
    let st = std::process::Command::new("sh").arg("-c").arg(script).status().unwrap();
    assert!(st.success(), "sh -c {script:?}: {st}");
}

#[test]
fn posix_acls_grant_access_and_follow_chmod() {
    let node = Node::start();
    let p = node.path("f");
    fs::write(&p, b"secret").unwrap();
    chmod(&p, 0o600);
    let read = |uid: u32| as_user(uid, uid, || fs::read(&p).map(|_| ()));
    assert_eq!(read(NOBODY), Err(libc::EACCES));
    // A named user entry grants what the mode does not; the mask becomes the group bits.
    setfacl(&[&"-m", &format!("u:{NOBODY}:r"), &p]);
    assert_eq!(read(NOBODY), Ok(()), "nobody reads through its ACL entry");
    assert_eq!(read(OTHER), Err(libc::EACCES), "others still may not");
    assert_eq!(lstat(&p).unwrap().st_mode & 0o777, 0o640);
    assert_eq!(getfacl(&p), ["user::rw-", &format!("user:{NOBODY}:r--"), "group::---", "mask::r--", "other::---"]);
    assert_eq!(as_user(NOBODY, NOBODY, || fs::write(&p, b"x")), Err(libc::EACCES), "the entry grants reading only");
    // chmod sets the mask: the named entry is cut by it.
    chmod(&p, 0o600);
    assert_eq!(getfacl(&p), ["user::rw-", &format!("user:{NOBODY}:r--\t#effective:---"), "group::---", "mask::---", "other::---"]);
    assert_eq!(read(NOBODY), Err(libc::EACCES));
    chmod(&p, 0o640);
    assert_eq!(read(NOBODY), Ok(()));
    // Removing the ACL leaves the mode.
    setfacl(&[&"-b", &p]);
    assert_eq!(getfacl(&p), ["user::rw-", "group::---", "other::---"], "the owning group entry was ---");
    assert_eq!(read(NOBODY), Err(libc::EACCES));
    assert_eq!(errno_of(getxattr(&p, "system.posix_acl_access")), libc::ENODATA);
}

#[test]
fn posix_default_acls_are_inherited_instead_of_the_umask() {
    let node = Node::start();
    let d = node.path("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o755);
    setfacl(&[&"-d", &"-m", &format!("u:{NOBODY}:rwx"), &d]);
    sh(&format!("umask 077 && touch {0}/f && mkdir {0}/sub && touch {1}", d.display(), node.path("g").display()));
    // touch asks for 0666: cut by the default ACL (other r-x), not by the umask.
    let f = d.join("f");
    assert_eq!(lstat(&f).unwrap().st_mode & 0o777, 0o664);
    assert_eq!(getfacl(&f), ["user::rw-", &format!("user:{NOBODY}:rwx\t#effective:rw-"), "group::r-x\t#effective:r--", "mask::rw-", "other::r--"]);
    assert_eq!(as_user(NOBODY, NOBODY, || fs::write(&f, b"by nobody")), Ok(()));
    assert_eq!(as_user(OTHER, OTHER, || fs::write(&f, b"by other")), Err(libc::EACCES));
    // A subdirectory inherits the default ACL as its own default and access ACL.
    let sub = d.join("sub");
    assert_eq!(lstat(&sub).unwrap().st_mode & 0o777, 0o775);
    let sub_acl = getfacl(&sub);
    assert!(sub_acl.contains(&format!("default:user:{NOBODY}:rwx")), "{sub_acl:?}");
    assert!(sub_acl.contains(&format!("user:{NOBODY}:rwx")), "{sub_acl:?}");
    // Elsewhere the umask applies.
    assert_eq!(lstat(&node.path("g")).unwrap().st_mode & 0o777, 0o600);
    assert_eq!(errno_of(getxattr(&node.path("g"), "system.posix_acl_access")), libc::ENODATA);
    // A default ACL only on directories; an invalid ACL is refused.
    let base = acl_xattr(&[(0x01, 7, u32::MAX), (0x04, 5, u32::MAX), (0x20, 5, u32::MAX)]);
    // (Linux refuses it before it reaches the filesystem here: EOPNOTSUPP; apply says EACCES.)
    let e = errno_of(setxattr(&node.path("g"), "system.posix_acl_default", &base, 0));
    assert!(e == libc::EACCES || e == libc::EOPNOTSUPP, "errno {e}");
    assert_eq!(errno_of(getxattr(&node.path("g"), "system.posix_acl_default")), libc::ENODATA);
    let no_mask = acl_xattr(&[(0x01, 7, u32::MAX), (0x02, 7, NOBODY), (0x04, 5, u32::MAX), (0x20, 5, u32::MAX)]);
    assert_eq!(errno_of(setxattr(&node.path("g"), "system.posix_acl_access", &no_mask, 0)), libc::EINVAL);
}

//! Conversions between state types and what FUSE reports: attributes, kinds, times.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::config::BLOCK_BYTES;
use crate::state::{FileKind, Inode, Timespec};

/// `st_blksize`: the preferred I/O size we report.
pub const BLKSIZE_BYTES: u32 = 4096;
/// The unit of `st_blocks`.
const STAT_BLOCK_BYTES: u64 = 512;

pub fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
    }
}

/// The kind named by the `S_IFMT` bits of a mknod mode; `None` for a kind mknod cannot make.
pub fn kind_of_mode(mode: u32) -> Option<FileKind> {
    match mode & libc::S_IFMT {
        // mknod(2) with no type bits creates a regular file.
        0 | libc::S_IFREG => Some(FileKind::File),
        libc::S_IFIFO => Some(FileKind::Fifo),
        libc::S_IFSOCK => Some(FileKind::Socket),
        libc::S_IFCHR => Some(FileKind::CharDev),
        libc::S_IFBLK => Some(FileKind::BlockDev),
        _ => None,
    }
}

pub fn system_time(t: Timespec) -> SystemTime {
    let nsec = Duration::from_nanos(u64::from(t.nsec.min(999_999_999)));
    let at = if t.sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(t.sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(t.sec.unsigned_abs()))
    };
    at.and_then(|at| at.checked_add(nsec)).unwrap_or(UNIX_EPOCH)
}

pub fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec { sec: d.as_secs().min(i64::MAX as u64) as i64, nsec: d.subsec_nanos() },
        Err(before) => {
            let d = before.duration();
            let mut sec = -(d.as_secs().min(i64::MAX as u64) as i64);
            let mut nsec = d.subsec_nanos();
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Timespec { sec, nsec }
        }
    }
}

/// A time the kernel sent (setattr), as fuser 0.18 decoded it. fuser turns the kernel's
/// `(sec < 0, nsec)` into `UNIX_EPOCH - (|sec| s + nsec ns)` (fuser src/time.rs
/// `system_time_from_time`, marked TODO there) instead of `sec s + nsec ns`; undo that here so
/// times before 1970 keep their exact value. Outgoing attributes are converted correctly.
pub fn timespec_from_kernel(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(_) => timespec(t),
        Err(before) => {
            let d = before.duration();
            Timespec { sec: -(d.as_secs().min(i64::MAX as u64) as i64), nsec: d.subsec_nanos() }
        }
    }
}

/// What `stat` reports for `inode`.
pub fn file_attr(inode: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(inode.ino),
        size: inode.size,
        blocks: inode.blocks.saturating_mul(BLOCK_BYTES / STAT_BLOCK_BYTES),
        atime: system_time(inode.atime),
        mtime: system_time(inode.mtime),
        ctime: system_time(inode.ctime),
        crtime: system_time(inode.crtime),
        kind: file_type(inode.kind),
        perm: (inode.perm & 0o7777) as u16,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: inode.rdev,
        blksize: BLKSIZE_BYTES,
        flags: 0,
    }
}

/// The attributes of a negative entry: node id 0 tells the kernel the name does not exist, for
/// as long as the entry's TTL (FUSE_LOOKUP).
pub fn absent() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: fuser::FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE_BYTES,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_including_before_the_epoch() {
        for t in [
            Timespec { sec: 0, nsec: 0 },
            Timespec { sec: 1_700_000_000, nsec: 123_456_789 },
            Timespec { sec: -1, nsec: 500_000_000 },
            Timespec { sec: -86_400, nsec: 0 },
        ] {
            assert_eq!(timespec(system_time(t)), t);
        }
    }

    #[test]
    fn kernel_times_before_the_epoch() {
        // What fuser 0.18 hands us for the kernel's (-1000 s, 5 ns).
        let decoded = UNIX_EPOCH - Duration::new(1000, 5);
        assert_eq!(timespec_from_kernel(decoded), Timespec { sec: -1000, nsec: 5 });
        let after = UNIX_EPOCH + Duration::new(1_500_000_000, 987_654_321);
        assert_eq!(timespec_from_kernel(after), Timespec { sec: 1_500_000_000, nsec: 987_654_321 });
    }

    #[test]
    fn mknod_kinds() {
        assert_eq!(kind_of_mode(libc::S_IFIFO | 0o644), Some(FileKind::Fifo));
        assert_eq!(kind_of_mode(0o644), Some(FileKind::File));
        assert_eq!(kind_of_mode(libc::S_IFDIR | 0o755), None);
    }
}

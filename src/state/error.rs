//! The deterministic errors that apply returns; adapters map them to errno values.

use serde::{Deserialize, Serialize};

/// Why a command failed. Apply returns the same error on every replica and changes nothing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Errno {
    /// No such file or directory.
    #[error("no such file or directory")]
    NoEnt,
    /// The name exists already.
    #[error("file exists")]
    Exist,
    /// A path component or target is not a directory.
    #[error("not a directory")]
    NotDir,
    /// The object is a directory where a non-directory was needed.
    #[error("is a directory")]
    IsDir,
    /// The directory is not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A name or path is longer than the limit.
    #[error("file name too long")]
    NameTooLong,
    /// An argument is invalid (for example renaming a directory into itself).
    #[error("invalid argument")]
    Inval,
    /// The operation is not permitted for this caller.
    #[error("operation not permitted")]
    Perm,
    /// Permission denied.
    #[error("permission denied")]
    Access,
    /// Cross-device link (reserved for operations across filesystems).
    #[error("cross-device link")]
    XDev,
    /// No space left (a limit of the state was reached).
    #[error("no space left on device")]
    NoSpace,
    /// An I/O error: a content hash mismatch, a corrupt record, or a lost quorum.
    #[error("input/output error")]
    Io,
    /// The extended attribute does not exist.
    #[error("no such attribute")]
    NoData,
    /// A buffer or value is out of range (xattr too large).
    #[error("result out of range")]
    Range,
    /// The file would become larger than the limit.
    #[error("file too large")]
    FileTooBig,
    /// Too many hard links.
    #[error("too many links")]
    TooManyLinks,
    /// The operation is not supported on this object.
    #[error("operation not supported")]
    NotSupported,
    /// Bad file descriptor or handle.
    #[error("bad file descriptor")]
    BadFd,
    /// The value is too large for the defined data type.
    #[error("value too large")]
    Overflow,
    /// An argument list or value is too long (an xattr value above the limit: E2BIG).
    #[error("argument list too long")]
    TooBig,
    /// No data or hole at or beyond this offset (SEEK_DATA/SEEK_HOLE at or past the end: ENXIO).
    #[error("no such device or address")]
    NoSuchOffset,
    /// Not applied: a retry of a command so old that its result was forgotten, or a command
    /// superseded by a later sequence number of its origin (it arrived late, out of order).
    #[error("stale command")]
    Stale,
    /// A lock request conflicts with a lock another owner holds (EAGAIN; a blocking request
    /// waits and asks again).
    #[error("resource temporarily unavailable")]
    Again,
    /// An inode holds `LOCKS_PER_INODE_MAX` locks already (ENOLCK).
    #[error("no locks available")]
    NoLocks,
}

pub type FsResult<T> = Result<T, Errno>;

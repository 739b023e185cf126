//! Why a FUSE request failed, and the one place that turns it into a Linux errno.

use fuser::Errno as Sys;

use crate::raft::ProposeError;
use crate::state::{Errno, StoreFault};

/// A failed FUSE request: a deterministic state error, a store fault, or a failed proposal.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Apply (or a local pre-check) rejected the request; nothing changed.
    #[error(transparent)]
    Fs(#[from] Errno),
    /// The local store could not be read.
    #[error(transparent)]
    Store(#[from] StoreFault),
    /// No leader or no quorum within the propose timeout, or the node is stopping.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The local store failed while applying; the node is stopping.
    #[error("fatal: {0}")]
    Fatal(String),
    /// An errno that the state machine has no variant for (decided by the adapter itself,
    /// for example ENXIO of a seek past the end or E2BIG of an oversized xattr value).
    #[error("errno {0}")]
    Sys(i32),
}

impl From<ProposeError> for FsError {
    fn from(e: ProposeError) -> Self {
        match e {
            ProposeError::Fs(errno) => FsError::Fs(errno),
            ProposeError::Unavailable(why) => FsError::Unavailable(why),
            ProposeError::Fatal(why) => FsError::Fatal(why),
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

impl FsError {
    /// The errno to answer the kernel with. Faults are logged here, once per failed request.
    pub fn errno(&self) -> Sys {
        match self {
            FsError::Fs(e) => errno_of(*e),
            FsError::Store(fault) => {
                tracing::error!(%fault, "store fault while serving a FUSE request");
                Sys::EIO
            }
            FsError::Unavailable(why) => {
                tracing::warn!(%why, "mutation failed: cluster unavailable (no leader or quorum)");
                Sys::EIO
            }
            FsError::Fatal(why) => {
                tracing::error!(%why, "mutation failed: fatal store error");
                Sys::EIO
            }
            FsError::Sys(code) => Sys::from_i32(*code),
        }
    }
}

/// The Linux errno of a state error. Exhaustive on purpose: a new variant must be mapped here.
pub fn errno_of(e: Errno) -> Sys {
    match e {
        Errno::NoEnt => Sys::ENOENT,
        Errno::Exist => Sys::EEXIST,
        Errno::NotDir => Sys::ENOTDIR,
        Errno::IsDir => Sys::EISDIR,
        Errno::NotEmpty => Sys::ENOTEMPTY,
        Errno::NameTooLong => Sys::ENAMETOOLONG,
        Errno::Inval => Sys::EINVAL,
        Errno::Perm => Sys::EPERM,
        Errno::Access => Sys::EACCES,
        Errno::XDev => Sys::EXDEV,
        Errno::NoSpace => Sys::ENOSPC,
        Errno::Io => Sys::EIO,
        Errno::NoData => Sys::ENODATA,
        Errno::Range => Sys::ERANGE,
        Errno::FileTooBig => Sys::EFBIG,
        Errno::TooManyLinks => Sys::EMLINK,
        Errno::NotSupported => Sys::EOPNOTSUPP,
        Errno::BadFd => Sys::EBADF,
        Errno::Overflow => Sys::EOVERFLOW,
        Errno::TooBig => Sys::E2BIG,
        Errno::NoSuchOffset => Sys::ENXIO,
        Errno::Again => Sys::EAGAIN,
        Errno::NoLocks => Sys::ENOLCK,
        Errno::Stale => {
            // A retry whose first result was forgotten: we cannot say whether it applied.
            tracing::warn!("a retried command was too old to deduplicate; answering EIO");
            Sys::EIO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_values_are_linux_values() {
        assert_eq!(errno_of(Errno::NoEnt).code(), libc::ENOENT);
        assert_eq!(errno_of(Errno::NotEmpty).code(), libc::ENOTEMPTY);
        assert_eq!(errno_of(Errno::NoData).code(), libc::ENODATA);
        assert_eq!(FsError::Unavailable("x".into()).errno().code(), libc::EIO);
        assert_eq!(FsError::Sys(libc::ENXIO).errno().code(), libc::ENXIO);
    }
}

//! Temporary stand-in for `crate::state::content` until it lands (same signatures).
//! Every call answers EOPNOTSUPP; replace the bodies with `pub use crate::state::content::*`.

use crate::state::{Errno, Inode, StateRead, StoreResult};

pub fn read_range(_r: &dyn StateRead, _inode: &Inode, _offset: u64, _len: u64) -> StoreResult<Result<Vec<u8>, Errno>> {
    Ok(Err(Errno::NotSupported))
}

pub fn seek_data(_r: &dyn StateRead, _inode: &Inode, _offset: u64) -> StoreResult<Result<u64, Errno>> {
    Ok(Err(Errno::NotSupported))
}

pub fn seek_hole(_r: &dyn StateRead, _inode: &Inode, _offset: u64) -> StoreResult<Result<u64, Errno>> {
    Ok(Err(Errno::NotSupported))
}

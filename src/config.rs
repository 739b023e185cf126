//! Validated configuration and every limit as a named constant (units last in names).

/// Longest file name in bytes (Linux NAME_MAX).
pub const NAME_BYTES_MAX: usize = 255;
/// Longest path in bytes, including the terminating NUL (Linux PATH_MAX).
pub const PATH_BYTES_MAX: usize = 4096;
/// Longest symlink target in bytes (PATH_MAX without the NUL).
pub const SYMLINK_BYTES_MAX: usize = PATH_BYTES_MAX - 1;
/// File content is stored in blocks of this size, addressed by SHA-256.
pub const BLOCK_BYTES: u64 = 64 * 1024;
/// Largest data payload of one write command (the kernel's FUSE max_write here is 1 MiB).
pub const WRITE_BYTES_MAX: usize = 1024 * 1024;
/// Largest file size we accept: the kernel's own limit for a FUSE file (MAX_LFS_FILESIZE,
/// 2^63 - 1), which it enforces (EFBIG, or EINVAL where an end would overflow an offset) before
/// a write, truncate, fallocate or copy_file_range reaches us. A lower limit here let the kernel take a write into its page
/// cache that the state then refused at writeback: the caller got EIO at close, and this node's
/// kernel kept the size the write gave it. Offsets and block indices (at most 2^47) stay far
/// from u64 overflow; every sum of offset and length is checked.
pub const FILE_BYTES_MAX: u64 = i64::MAX as u64;
/// Longest extended attribute name in bytes (Linux XATTR_NAME_MAX).
pub const XATTR_NAME_BYTES_MAX: usize = 255;
/// Largest extended attribute value in bytes (Linux XATTR_SIZE_MAX).
pub const XATTR_VALUE_BYTES_MAX: usize = 64 * 1024;
/// Largest total size of the names of one inode's xattrs (what listxattr can return).
pub const XATTR_LIST_BYTES_MAX: usize = 64 * 1024;
/// Most advisory locks (distinct ranges of all owners) held on one inode: the inode's lock table
/// is one stored value, rewritten at every lock change. A request that would hold more gets
/// ENOLCK.
pub const LOCKS_PER_INODE_MAX: usize = 4_096;
/// How long the leader goes without an answer from a member before that member's advisory
/// locks expire, unless configured (`--lock-lease-ms`; see `raft::leases`). Far above any
/// election or restart (seconds), so only a node that stays down or cut off loses its locks.
pub const LOCK_LEASE_MS_DEFAULT: u64 = 30_000;
/// Most hard links to one inode.
pub const LINK_COUNT_MAX: u32 = 65_000;
/// How many results of recent commands each origin node keeps for deduplicating retries.
pub const RESULTS_RETAINED_PER_ORIGIN: u64 = 16_384;
/// Largest encoded command or Raft message we decode (bincode limit); above WRITE_BYTES_MAX plus headers.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most directory entries returned by one readdir batch from the state.
pub const READDIR_BATCH_MAX: usize = 1024;

//! The state digest: one SHA-256 over every replicated table, to compare replicas.
//!
//! Input, in this order: a version tag, then every state-machine metadata record (table id 0: the
//! last applied log id and the membership, opaque bytes from raft/), then every record of every
//! state table in table-id and key order, each as `[table id u8][key len u32][key][value len
//! u32][value]` (little-endian, the bytes redb stores; blocks under their hash, see
//! `tables::dump_state`). Node-local tables (the Raft log, vote, committed index, incarnation
//! counter, block ids) are not part of it. Two stores that applied the same
//! entries, or installed a snapshot of them, therefore have equal digests; the bytes are read from
//! one read transaction, so the digest and the applied index it is reported with agree.

use sha2::{Digest, Sha256};

use super::fault;
use super::tables::{dump_state, BlockOrder, ReadView};
use crate::state::StoreResult;

/// Changes whenever the digest's input format does: digests of different versions never match
/// (v2: block values carry their check value, see tables::BLOCK_DATA).
const DIGEST_TAG: &[u8] = b"pickbox-state-digest-v2\0";
/// Table id used for the state-machine metadata records (real state tables start at 1).
const SM_META_TABLE_ID: u8 = 0;

fn record(h: &mut Sha256, id: u8, key: &[u8], value: &[u8]) -> StoreResult<()> {
    let klen = u32::try_from(key.len()).map_err(fault)?;
    let vlen = u32::try_from(value.len()).map_err(fault)?;
    h.update([id]);
    h.update(klen.to_le_bytes());
    h.update(key);
    h.update(vlen.to_le_bytes());
    h.update(value);
    Ok(())
}

/// Hex SHA-256 of the replicated state in `view`.
pub(super) fn digest(view: &ReadView) -> StoreResult<String> {
    let mut h = Sha256::new();
    h.update(DIGEST_TAG);
    view.each_sm_meta(&mut |k, v| record(&mut h, SM_META_TABLE_ID, k, v))?;
    dump_state(view, BlockOrder::Hash, &mut |id, k, v| record(&mut h, id, k, v))?;
    Ok(hex::encode(h.finalize()))
}

//! Bounded bincode encoding shared by the store and the Raft adapter.
//!
//! Every decode is size-limited (a hostile length prefix must not abort the process) and checks that
//! the whole input was consumed (bincode accepts trailing bytes silently).

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::MESSAGE_BYTES_MAX;
use crate::state::{StoreFault, StoreResult};

fn cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MESSAGE_BYTES_MAX }>()
}

/// Encode `v`; fails if it is larger than `MESSAGE_BYTES_MAX`. The buffer has exactly the
/// encoded size: a first pass counts the bytes (no copying), so a
/// large message (an AppendEntries with 1 MiB writes) is not copied again at every doubling of
/// a growing buffer (1.7% of a leader's CPU in a 3-node sequential write, and fresh pages to
/// fault in each time).
pub fn encode<T: Serialize + ?Sized>(v: &T) -> StoreResult<Vec<u8>> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(v, &mut size, cfg()).map_err(|e| StoreFault(format!("encode: {e}")))?;
    encode_sized(v, size.bytes_written)
}

/// `encode` into a buffer of `capacity` bytes first: a large value (a Raft entry carrying MiBs of
/// file data) is then written once, instead of being copied each time the buffer doubles.
pub fn encode_sized<T: Serialize + ?Sized>(v: &T, capacity: usize) -> StoreResult<Vec<u8>> {
    let mut out = Vec::with_capacity(capacity);
    bincode::serde::encode_into_std_write(v, &mut out, cfg()).map_err(|e| StoreFault(format!("encode: {e}")))?;
    Ok(out)
}

/// Where `encode(v)` puts the byte strings of at least `min` bytes that it copies whole from `v`'s
/// memory (bincode writes a byte string, such as a write's data, with one call, straight from its
/// buffer): `(address in memory, length, offset in the encoding)` of each, and the encoding's total
/// length. Nothing is copied. Encoding is deterministic, so these are the offsets in the bytes
/// `encode` (or `encode_sized`) produced from the same value.
pub fn blob_positions<T: Serialize + ?Sized>(v: &T, min: usize) -> StoreResult<(usize, Vec<(usize, usize, usize)>)> {
    struct Positions {
        at: usize,
        min: usize,
        found: Vec<(usize, usize, usize)>,
    }
    impl bincode::enc::write::Writer for Positions {
        fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
            if bytes.len() >= self.min {
                self.found.push((bytes.as_ptr() as usize, bytes.len(), self.at));
            }
            self.at += bytes.len();
            Ok(())
        }
    }
    let mut w = Positions { at: 0, min, found: Vec::new() };
    bincode::serde::encode_into_writer(v, &mut w, cfg()).map_err(|e| StoreFault(format!("encode: {e}")))?;
    Ok((w.at, w.found))
}

/// Decode exactly `bytes` as one `T`; a malformed or over-long input is a `StoreFault`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    let (v, used) = bincode::serde::decode_from_slice::<T, _>(bytes, cfg())
        .map_err(|e| StoreFault(format!("decode {}: {e}", std::any::type_name::<T>())))?;
    if used != bytes.len() {
        return Err(StoreFault(format!(
            "decode {}: {} trailing bytes",
            std::any::type_name::<T>(),
            bytes.len() - used
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_positions_are_where_encode_puts_the_bytes() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let v = (7u64, "name".to_string(), serde_bytes::ByteBuf::from(data.clone()), 3u8);
        let bytes = encode(&v).unwrap();
        let (total, found) = blob_positions(&v, 1000).unwrap();
        assert_eq!(total, bytes.len());
        assert_eq!(found.len(), 1, "one long byte string");
        let (ptr, len, at) = found[0];
        assert_eq!(ptr, v.2.as_ptr() as usize, "the address of the value's own buffer");
        assert_eq!(len, data.len());
        assert_eq!(&bytes[at..at + len], &data[..]);
    }

    #[test]
    fn trailing_bytes_and_hostile_lengths_are_faults() {
        let mut b = encode(&vec![1u8, 2, 3]).unwrap();
        assert_eq!(decode::<Vec<u8>>(&b).unwrap(), vec![1, 2, 3]);
        b.push(0);
        assert!(decode::<Vec<u8>>(&b).is_err());
        // A String claiming 2^40 bytes.
        let hostile = encode(&(1u64 << 40)).unwrap();
        assert!(decode::<String>(&hostile).is_err());
    }
}

#[cfg(test)]
mod bench {
    /// Prints what encoding and decoding a 1 MiB write command costs in this build profile.
    #[test]
    fn encode_cost_of_a_1mib_write() {
        use crate::state::{Caller, Command, Op, Timespec};
        let cmd = Command {
            origin: 1,
            seq: 1,
            time: Timespec::default(),
            caller: Caller::root(),
            content_hash: [0; 32],
            op: Op::Write { ino: 2, offset: 0, data: vec![7u8; 1 << 20], append: false },
        };
        let t = std::time::Instant::now();
        let b = super::encode(&cmd).unwrap();
        let enc = t.elapsed();
        assert_eq!(super::encode_sized(&cmd, (1 << 20) + 128).unwrap(), b, "encode_sized encodes the same bytes");
        let t = std::time::Instant::now();
        let back: Command = super::decode(&b).unwrap();
        eprintln!("1 MiB write command: encode {enc:?}, decode {:?}, {} bytes", t.elapsed(), b.len());
        assert_eq!(back, cmd);
    }
}

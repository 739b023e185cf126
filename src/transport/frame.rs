//! The byte layout of one RPC on one QUIC bidirectional stream (no I/O here, so it is testable alone).
//!
//! Request: `[MAGIC][VERSION][kind code][body length u32 LE]` then the body, then the sender
//! finishes the stream. The header comes first so that a server can authorise the peer for the
//! kind, refuse an oversized body and reserve memory for it before reading a byte of the body.
//! Reply: `[status]` then the payload: the handler's bytes (`STATUS_OK`) or a short UTF-8 reason
//! (`STATUS_REFUSED`). Kind codes 1..=15 are Raft RPCs; 16..=63 are reserved for application RPCs
//! (forwarding a proposal to the leader, read-index); a code we do not know is refused, not a crash.

use crate::config::MESSAGE_BYTES_MAX;
use crate::raft::network::RpcKind;

/// First byte of every request: tells a pickbox frame from random bytes.
pub const MAGIC: u8 = 0xB7;
/// Protocol version; a peer speaking another version is refused (2: the header declares the body
/// length; 3: removals carry the inode they expect, `expect_closed`, so the bodies of Raft and
/// forward RPCs of version 2 no longer decode the same).
pub const VERSION: u8 = 3;
/// Bytes before the body of a request.
pub const REQUEST_HEADER_BYTES: usize = 7;
/// Bytes before the payload of a reply.
pub const REPLY_HEADER_BYTES: usize = 1;
/// Largest request or reply on the wire: the largest message plus its header.
pub const FRAME_BYTES_MAX: usize = MESSAGE_BYTES_MAX + REQUEST_HEADER_BYTES;
/// Longest refusal reason we send or keep.
pub const REASON_BYTES_MAX: usize = 1024;
/// Reply status: the payload is the handler's answer.
pub const STATUS_OK: u8 = 0;
/// Reply status: the request was refused; the payload says why.
pub const STATUS_REFUSED: u8 = 1;
/// First kind code reserved for application RPCs (not Raft).
pub const APP_KIND_FIRST: u8 = 16;
/// Last kind code we will ever assign.
pub const KIND_LAST: u8 = 63;

/// The wire code of a Raft RPC kind. Exhaustive on purpose: a new `RpcKind` variant must get its
/// code here (Raft kinds below `APP_KIND_FIRST`, application kinds from it).
pub fn kind_code(kind: RpcKind) -> u8 {
    match kind {
        RpcKind::AppendEntries => 1,
        RpcKind::Vote => 2,
        RpcKind::InstallSnapshot => 3,
        RpcKind::PreVote => 4,
        RpcKind::Forward => 16,
        RpcKind::ReadIndex => 17,
        RpcKind::Join => 18,
        RpcKind::Remove => 19,
        RpcKind::Status => 20,
    }
}

/// The kind of a wire code, if we know it.
pub fn kind_from_code(code: u8) -> Option<RpcKind> {
    match code {
        1 => Some(RpcKind::AppendEntries),
        2 => Some(RpcKind::Vote),
        3 => Some(RpcKind::InstallSnapshot),
        4 => Some(RpcKind::PreVote),
        16 => Some(RpcKind::Forward),
        17 => Some(RpcKind::ReadIndex),
        18 => Some(RpcKind::Join),
        19 => Some(RpcKind::Remove),
        20 => Some(RpcKind::Status),
        _ => None,
    }
}

/// Why a request frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer bytes than a header.
    #[error("frame of {0} bytes is shorter than the {REQUEST_HEADER_BYTES}-byte header")]
    Short(usize),
    /// The first byte is not `MAGIC`: not a pickbox frame.
    #[error("bad magic byte {0:#04x}")]
    Magic(u8),
    /// A framing version we do not speak.
    #[error("unsupported frame version {0}")]
    Version(u8),
    /// A kind code we do not know (garbled, or a newer peer).
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// More bytes than `FRAME_BYTES_MAX`.
    #[error("message of {0} bytes is over the limit of {MESSAGE_BYTES_MAX}")]
    TooLong(usize),
    /// The body is not as long as the header says.
    #[error("body of {got} bytes, but the header declares {declared}")]
    Length { declared: usize, got: usize },
}

/// The kind and declared body length of a request header.
pub fn decode_header(h: &[u8; REQUEST_HEADER_BYTES]) -> Result<(RpcKind, usize), FrameError> {
    if h[0] != MAGIC {
        return Err(FrameError::Magic(h[0]));
    }
    if h[1] != VERSION {
        return Err(FrameError::Version(h[1]));
    }
    let kind = kind_from_code(h[2]).ok_or(FrameError::Kind(h[2]))?;
    let len = u32::from_le_bytes([h[3], h[4], h[5], h[6]]) as usize;
    if len > MESSAGE_BYTES_MAX {
        return Err(FrameError::TooLong(len));
    }
    Ok((kind, len))
}

/// A request header for `kind` and a body of `len` bytes.
pub fn encode_header(kind: RpcKind, len: usize) -> Result<[u8; REQUEST_HEADER_BYTES], FrameError> {
    if len > MESSAGE_BYTES_MAX {
        return Err(FrameError::TooLong(len));
    }
    let l = (len as u32).to_le_bytes();
    Ok([MAGIC, VERSION, kind_code(kind), l[0], l[1], l[2], l[3]])
}

/// Build a request frame in one buffer (the transport sends the header and the body as two
/// chunks instead, without copying the body).
#[cfg(test)]
pub fn encode_request(kind: RpcKind, body: &[u8]) -> Result<Vec<u8>, FrameError> {
    if body.len() > MESSAGE_BYTES_MAX {
        return Err(FrameError::TooLong(body.len()));
    }
    let mut f = Vec::with_capacity(REQUEST_HEADER_BYTES + body.len());
    f.extend_from_slice(&encode_header(kind, body.len())?);
    f.extend_from_slice(body);
    Ok(f)
}

/// Split a request frame into its kind and body (the body is the rest of `frame`, moved out).
pub fn decode_request(mut frame: Vec<u8>) -> Result<(RpcKind, Vec<u8>), FrameError> {
    if frame.len() < REQUEST_HEADER_BYTES {
        return Err(FrameError::Short(frame.len()));
    }
    if frame.len() > FRAME_BYTES_MAX {
        return Err(FrameError::TooLong(frame.len() - REQUEST_HEADER_BYTES));
    }
    let mut h = [0u8; REQUEST_HEADER_BYTES];
    h.copy_from_slice(&frame[..REQUEST_HEADER_BYTES]);
    let (kind, len) = decode_header(&h)?;
    frame.drain(..REQUEST_HEADER_BYTES);
    if frame.len() != len {
        return Err(FrameError::Length { declared: len, got: frame.len() });
    }
    Ok((kind, frame))
}

/// A reply carrying the handler's answer.
pub fn encode_ok(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(REPLY_HEADER_BYTES + payload.len());
    f.push(STATUS_OK);
    f.extend_from_slice(payload);
    f
}

/// A refusal, with its reason cut to `REASON_BYTES_MAX` (on a character boundary).
pub fn encode_refused(reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(REASON_BYTES_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut f = Vec::with_capacity(REPLY_HEADER_BYTES + end);
    f.push(STATUS_REFUSED);
    f.extend_from_slice(&reason.as_bytes()[..end]);
    f
}

/// A reply: the payload, or the peer's refusal reason.
pub fn decode_reply(mut frame: Vec<u8>) -> Result<Result<Vec<u8>, String>, String> {
    match frame.first().copied() {
        None => Err("empty reply".into()),
        Some(STATUS_OK) => {
            frame.drain(..REPLY_HEADER_BYTES);
            Ok(Ok(frame))
        }
        Some(STATUS_REFUSED) => {
            let end = frame.len().min(REPLY_HEADER_BYTES + REASON_BYTES_MAX);
            Ok(Err(String::from_utf8_lossy(&frame[REPLY_HEADER_BYTES..end]).into_owned()))
        }
        Some(s) => Err(format!("unknown reply status {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_headers_are_refused() {
        for kind in [RpcKind::AppendEntries, RpcKind::Vote, RpcKind::InstallSnapshot, RpcKind::PreVote] {
            assert!(kind_code(kind) < APP_KIND_FIRST);
            let f = encode_request(kind, b"abc").unwrap();
            assert_eq!(decode_request(f).unwrap(), (kind, b"abc".to_vec()));
        }
        assert_eq!(decode_request(vec![MAGIC, VERSION]), Err(FrameError::Short(2)));
        assert_eq!(decode_request(vec![0, VERSION, 1, 0, 0, 0, 0]), Err(FrameError::Magic(0)));
        assert_eq!(decode_request(vec![MAGIC, 9, 1, 0, 0, 0, 0]), Err(FrameError::Version(9)));
        assert_eq!(decode_request(vec![MAGIC, VERSION, 15, 0, 0, 0, 0]), Err(FrameError::Kind(15)));
        assert_eq!(
            decode_request(vec![MAGIC, VERSION, 1, 2, 0, 0, 0, 9]),
            Err(FrameError::Length { declared: 2, got: 1 })
        );
        let huge = (MESSAGE_BYTES_MAX as u32 + 1).to_le_bytes();
        let h = [MAGIC, VERSION, 1, huge[0], huge[1], huge[2], huge[3]];
        assert_eq!(decode_header(&h), Err(FrameError::TooLong(MESSAGE_BYTES_MAX + 1)));
        for kind in [RpcKind::Forward, RpcKind::ReadIndex, RpcKind::Join, RpcKind::Remove, RpcKind::Status] {
            assert!(kind_code(kind) >= APP_KIND_FIRST);
            assert_eq!(decode_header(&encode_header(kind, 5).unwrap()), Ok((kind, 5)));
        }
    }

    #[test]
    fn replies_round_trip_and_reasons_are_bounded() {
        assert_eq!(decode_reply(encode_ok(b"x")).unwrap(), Ok(b"x".to_vec()));
        let long = "é".repeat(REASON_BYTES_MAX);
        let r = decode_reply(encode_refused(&long)).unwrap().unwrap_err();
        assert!(r.len() <= REASON_BYTES_MAX && r.starts_with('é'));
        assert!(decode_reply(vec![]).is_err());
        assert!(decode_reply(vec![7]).is_err());
    }
}

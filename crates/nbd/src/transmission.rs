//! Sans-IO transmission phase: request header parsing and validation, reply encoding.
//!
//! [`parse_request`] turns 28 header bytes into a [`RequestHeader`]; [`decode`] checks it against
//! the negotiated [`Session`] and yields either a [`Command`] to execute or the error to answer
//! with (and how much payload to skip), or a verdict that the connection must be closed.
//! The `*_chunk`/`simple_reply` functions encode replies.

use crate::proto::*;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// A request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a request header; `None` if the magic is wrong (the stream is out of sync: close).
pub fn parse_request(b: &[u8; REQUEST_HEADER_LEN]) -> Option<RequestHeader> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != REQUEST_MAGIC {
        return None;
    }
    Some(RequestHeader {
        flags: u16::from_be_bytes([b[4], b[5]]),
        kind: u16::from_be_bytes([b[6], b[7]]),
        handle: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
        offset: u64::from_be_bytes(b[16..24].try_into().unwrap_or_default()),
        length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
    })
}

/// Encodes a request header (used by tests and fuzzers).
pub fn encode_request(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut b = [0u8; REQUEST_HEADER_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.handle.to_be_bytes());
    b[16..24].copy_from_slice(&h.offset.to_be_bytes());
    b[24..28].copy_from_slice(&h.length.to_be_bytes());
    b
}

/// What was negotiated, as far as request validation cares.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub allocation_context: Option<u32>,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    /// `len` payload bytes follow the header.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
        context: u32,
    },
}

/// Outcome of [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Ok(Command),
    /// Answer with `errno`; first read and discard `skip` payload bytes.
    Reject {
        errno: u32,
        skip: u32,
        reason: &'static str,
    },
    /// Close the connection (e.g. a write payload too large to accept).
    Close(&'static str),
}

fn allowed_flags(kind: u16, s: &Session) -> u16 {
    // FUA is valid on every command once NBD_FLAG_SEND_FUA is advertised (always, here).
    CMD_FLAG_FUA
        | match kind {
            CMD_READ if s.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Validates a request header against the session.
pub fn decode(h: &RequestHeader, s: &Session) -> Decoded {
    let reject = |errno, reason| Decoded::Reject {
        errno,
        skip: 0,
        reason,
    };
    let in_range = h
        .offset
        .checked_add(h.length as u64)
        .is_some_and(|end| end <= s.size);
    let bad_flags = h.flags & !allowed_flags(h.kind, s) != 0;
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.length);
    match h.kind {
        CMD_WRITE => {
            if len > MAX_PAYLOAD {
                return Decoded::Close("write payload over the maximum");
            }
            let errno = if bad_flags {
                Some((EINVAL, "bad flags for write"))
            } else if s.read_only {
                Some((EPERM, "write to a read-only export"))
            } else if !in_range {
                Some((ENOSPC, "write past the end of the export"))
            } else {
                None
            };
            match errno {
                Some((errno, reason)) => Decoded::Reject {
                    errno,
                    skip: len,
                    reason,
                },
                None => Decoded::Ok(Command::Write { offset, len, fua }),
            }
        }
        CMD_READ => {
            if bad_flags {
                reject(EINVAL, "bad flags for read")
            } else if len > MAX_PAYLOAD {
                if s.structured {
                    reject(EOVERFLOW, "read over the maximum payload")
                } else {
                    reject(EINVAL, "read over the maximum payload")
                }
            } else if !in_range {
                reject(EINVAL, "read past the end of the export")
            } else {
                Decoded::Ok(Command::Read {
                    offset,
                    len,
                    df: h.flags & CMD_FLAG_DF != 0,
                })
            }
        }
        CMD_DISC => Decoded::Ok(Command::Disconnect),
        CMD_FLUSH => {
            if bad_flags || offset != 0 || len != 0 {
                reject(EINVAL, "flush with flags, offset or length")
            } else {
                Decoded::Ok(Command::Flush)
            }
        }
        CMD_TRIM => {
            if bad_flags {
                reject(EINVAL, "bad flags for trim")
            } else if s.read_only {
                reject(EPERM, "trim on a read-only export")
            } else if !in_range {
                reject(EINVAL, "trim past the end of the export")
            } else {
                Decoded::Ok(Command::Trim { offset, len, fua })
            }
        }
        CMD_CACHE => {
            if bad_flags || !in_range {
                reject(EINVAL, "bad cache request")
            } else {
                Decoded::Ok(Command::Cache { offset, len })
            }
        }
        CMD_WRITE_ZEROES => {
            if bad_flags {
                reject(EINVAL, "bad flags for write zeroes")
            } else if s.read_only {
                reject(EPERM, "write zeroes on a read-only export")
            } else if !in_range {
                reject(ENOSPC, "write zeroes past the end of the export")
            } else {
                Decoded::Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
                    fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
                })
            }
        }
        CMD_BLOCK_STATUS => match s.allocation_context {
            None => reject(EINVAL, "block status without a metadata context"),
            Some(_) if bad_flags => reject(EINVAL, "bad flags for block status"),
            Some(_) if !in_range || len == 0 => reject(EINVAL, "block status outside the export"),
            Some(context) => Decoded::Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                context,
            }),
        },
        _ => reject(EINVAL, "unknown command"),
    }
}

/// A simple reply header (for reads, the data follows).
pub fn simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header; `length` payload bytes follow.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

fn done_flag(done: bool) -> u16 {
    if done { REPLY_FLAG_DONE } else { 0 }
}

/// `NBD_REPLY_TYPE_OFFSET_DATA` header plus offset; `data_len` data bytes follow.
pub fn offset_data_header(handle: u64, offset: u64, data_len: u32, done: bool) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len.saturating_add(8),
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn offset_hole_chunk(handle: u64, offset: u64, len: u32, done: bool) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..20].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_HOLE,
        handle,
        12,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&len.to_be_bytes());
    b
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(handle: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub fn error_chunk(handle: u64, errno: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    v.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    ));
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// The reply for a failed request: an error chunk with structured replies, else a simple reply.
pub fn error_reply(structured: bool, handle: u64, errno: u32, message: &str) -> Vec<u8> {
    if structured {
        error_chunk(handle, errno, message)
    } else {
        simple_reply(handle, errno).to_vec()
    }
}

/// The reply for a successful request without data (anything but READ and BLOCK_STATUS).
pub fn ok_reply(structured: bool, handle: u64) -> Vec<u8> {
    if structured {
        none_chunk(handle).to_vec()
    } else {
        simple_reply(handle, 0).to_vec()
    }
}

/// One `base:allocation` extent, as reported by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    pub flags: u32,
}

/// Turns device extents into block status descriptors for a request of `req_len` bytes: drops
/// empty extents, merges neighbours with equal flags, clips to the request (lengths fit in 32
/// bits), honours REQ_ONE. Never empty when `req_len > 0` and `extents` cover at least one byte.
pub fn descriptors(extents: &[Extent], req_len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut left = req_len as u64;
    for e in extents {
        if left == 0 {
            break;
        }
        let len = e.length.min(left);
        if len == 0 {
            continue;
        }
        left -= len;
        match out.last_mut() {
            Some(last) if last.1 == e.flags => last.0 += len as u32,
            _ => out.push((len as u32, e.flags)),
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn block_status_chunk(handle: u64, context: u32, descriptors: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut v = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    v.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    ));
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in descriptors {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn session() -> Session {
        Session {
            size: 1 << 20,
            read_only: false,
            structured: true,
            allocation_context: Some(1),
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind,
            handle: 0xdead_beef,
            offset,
            length,
        }
    }

    fn errno(d: Decoded) -> u32 {
        match d {
            Decoded::Reject { errno, .. } => errno,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn header_round_trip_and_bad_magic() {
        let h = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let mut b = encode_request(&h);
        assert_eq!(parse_request(&b), Some(h));
        b[0] ^= 1;
        assert_eq!(parse_request(&b), None);
    }

    #[test]
    fn validation() {
        let s = session();
        assert_eq!(
            decode(&req(CMD_READ, CMD_FLAG_DF, (1 << 20) - 1, 1), &s),
            Decoded::Ok(Command::Read {
                offset: (1 << 20) - 1,
                len: 1,
                df: true
            })
        );
        assert_eq!(errno(decode(&req(CMD_READ, 0, 1 << 20, 1), &s)), EINVAL);
        assert_eq!(errno(decode(&req(CMD_READ, 0, u64::MAX, 2), &s)), EINVAL);
        assert_eq!(
            errno(decode(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &s)),
            EOVERFLOW
        );
        let simple = Session {
            structured: false,
            ..s
        };
        assert_eq!(
            errno(decode(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &simple)),
            EINVAL
        );
        assert_eq!(
            errno(decode(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
            EINVAL
        );
        assert_eq!(
            decode(&req(CMD_WRITE, 0, 1 << 20, 4096), &s),
            Decoded::Reject {
                errno: ENOSPC,
                skip: 4096,
                reason: "write past the end of the export"
            }
        );
        assert!(matches!(
            decode(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &s),
            Decoded::Close(_)
        ));
        assert_eq!(
            errno(decode(&req(CMD_WRITE, CMD_FLAG_DF, 0, 1), &s)),
            EINVAL
        );
        let ro = Session {
            read_only: true,
            ..s
        };
        assert_eq!(errno(decode(&req(CMD_WRITE, 0, 0, 1), &ro)), EPERM);
        assert_eq!(errno(decode(&req(CMD_TRIM, 0, 0, 1), &ro)), EPERM);
        assert_eq!(errno(decode(&req(CMD_WRITE_ZEROES, 0, 0, 1), &ro)), EPERM);
        assert!(matches!(
            decode(&req(CMD_READ, 0, 0, 1), &ro),
            Decoded::Ok(_)
        ));
        assert_eq!(errno(decode(&req(CMD_FLUSH, 0, 1, 0), &s)), EINVAL);
        assert_eq!(
            decode(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &s),
            Decoded::Ok(Command::Flush)
        );
        assert_eq!(errno(decode(&req(99, 0, 0, 0), &s)), EINVAL);
        assert_eq!(errno(decode(&req(CMD_READ, 1 << 9, 0, 1), &s)), EINVAL);
        // Large non-payload requests are fine.
        assert!(matches!(
            decode(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &s),
            Decoded::Ok(Command::WriteZeroes { no_hole: true, .. })
        ));
        assert_eq!(errno(decode(&req(CMD_BLOCK_STATUS, 0, 0, 0), &s)), EINVAL);
        let no_meta = Session {
            allocation_context: None,
            ..s
        };
        assert_eq!(
            errno(decode(&req(CMD_BLOCK_STATUS, 0, 0, 512), &no_meta)),
            EINVAL
        );
        assert_eq!(
            decode(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &s),
            Decoded::Ok(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true,
                context: 1
            })
        );
    }

    #[test]
    fn reply_encoding() {
        let r = simple_reply(7, EIO);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &5u32.to_be_bytes());
        assert_eq!(&r[8..], &7u64.to_be_bytes());
        let e = error_chunk(9, EINVAL, "nope");
        assert_eq!(e.len(), 20 + 6 + 4);
        assert_eq!(&e[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e[16..20], &10u32.to_be_bytes());
        assert_eq!(&e[20..24], &22u32.to_be_bytes());
        assert_eq!(&e[24..26], &4u16.to_be_bytes());
        let d = offset_data_header(1, 4096, 512, true);
        assert_eq!(&d[16..20], &520u32.to_be_bytes());
        assert_eq!(&d[20..28], &4096u64.to_be_bytes());
        let h = offset_hole_chunk(1, 0, 512, false);
        assert_eq!(&h[4..6], &[0, 0]);
        assert_eq!(&h[16..20], &12u32.to_be_bytes());
        let b = block_status_chunk(3, 1, &[(512, 3), (1024, 0)]);
        assert_eq!(b.len(), 20 + 4 + 16);
        assert_eq!(&b[16..20], &20u32.to_be_bytes());
    }

    #[test]
    fn descriptor_merging_and_clipping() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(
            descriptors(&[e(100, 3), e(50, 3), e(0, 0), e(1 << 40, 0)], 1000, false),
            vec![(150, 3), (850, 0)]
        );
        assert_eq!(
            descriptors(&[e(100, 3), e(50, 0)], 1000, true),
            vec![(100, 3)]
        );
        assert_eq!(
            descriptors(&[e(1 << 40, 3)], u32::MAX, false),
            vec![(u32::MAX, 3)]
        );
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::array::uniform28(any::<u8>()),
                               size in any::<u64>(), ro in any::<bool>(), st in any::<bool>()) {
            if let Some(h) = parse_request(&bytes) {
                let s = Session { size, read_only: ro, structured: st, allocation_context: st.then_some(1) };
                let _ = decode(&h, &s);
            }
            let mut b = bytes;
            b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            let h = parse_request(&b).unwrap();
            let s = Session { size, read_only: ro, structured: st, allocation_context: None };
            if let Decoded::Ok(Command::Write { len, .. }) = decode(&h, &s) {
                prop_assert!(len <= MAX_PAYLOAD);
            }
        }

        #[test]
        fn descriptors_cover_at_most_the_request(lens in proptest::collection::vec((0u64..1<<34, 0u32..4), 1..20),
                                                 req in 1u32.., one in any::<bool>()) {
            let ext: Vec<Extent> = lens.iter().map(|(l, f)| Extent { length: *l, flags: *f }).collect();
            let d = descriptors(&ext, req, one);
            let total: u64 = d.iter().map(|x| x.0 as u64).sum();
            prop_assert!(total <= req as u64);
            prop_assert!(d.iter().all(|x| x.0 > 0));
            if one { prop_assert!(d.len() <= 1); }
            if ext.iter().any(|e| e.length > 0) { prop_assert!(!d.is_empty()); }
        }
    }
}

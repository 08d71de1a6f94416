//! Framing: a fixed 24-byte header followed by the payload.
//!
//! ```text
//! offset size field
//!  0     4    magic b"TDRP"
//!  4     2    protocol version (u16 LE): 0 for handshake messages, the negotiated version otherwise
//!  6     2    message type (u16 LE), see `MessageType`
//!  8     4    until version 9 frame flags (u32 LE, none defined, must be 0); from version 10
//!             the frame number on an established link (u32 LE, see `FrameCounter`)
//! 12     4    payload length N (u32 LE), at most `MAX_PAYLOAD`
//! 16     4    frame checksum: crc32c of header bytes [0, 16) followed by the N payload bytes
//! 20     4    header checksum: crc32c of header bytes [0, 20)
//! 24     N    payload
//! ```
//!
//! The header checksum lets a corrupted length or type be detected as soon as the header has
//! arrived, without waiting for a payload length that may never come.

use bytes::{Buf, Bytes, BytesMut};

use crate::message::{Message, MessageType};
use crate::version::ProtocolVersion;

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"TDRP";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 24;
/// Largest data block carried by one message (writes, read replies, resync data).
pub const MAX_DATA: usize = 32 << 20;
/// Largest payload of one frame: a full data block plus room for the fixed fields.
pub const MAX_PAYLOAD: usize = MAX_DATA + 4096;
/// Largest frame on the wire.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;
/// Largest payload of any handshake message (a Refused with the longest detail). A decoder
/// limited to this before the peer is authenticated never buffers more than a few KiB for a
/// stranger: see [`Decoder::set_max_payload`].
pub const MAX_HANDSHAKE_PAYLOAD: usize = 2048;
/// Frame flag bits defined so far (none).
pub const KNOWN_FRAME_FLAGS: u32 = 0;

/// Why bytes could not be turned into a frame or message. Once a [`Decoder`] returned one of
/// these the stream is out of step and the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad frame magic {found:02x?}: not a tandem replication stream")]
    BadMagic { found: [u8; 4] },
    #[error("frame header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderChecksum { stored: u32, computed: u32 },
    #[error("{ty} frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    FrameChecksum {
        ty: MessageType,
        stored: u32,
        computed: u32,
    },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: u32, max: u32 },
    #[error("unknown message type {code:#06x}")]
    UnknownType { code: u16 },
    #[error("unknown frame flags {flags:#x}")]
    UnknownFlags { flags: u32 },
    #[error("frame carries protocol version {found}, which this build does not speak")]
    UnsupportedVersion { found: u16 },
    #[error("{ty} frame carries protocol version {found}, expected {expected}")]
    WrongVersion {
        ty: MessageType,
        found: u16,
        expected: u16,
    },
    #[error("{ty} payload truncated")]
    Truncated { ty: MessageType },
    #[error("{ty} payload has {extra} unexpected trailing bytes")]
    TrailingBytes { ty: MessageType, extra: usize },
    #[error("invalid {ty}: {detail}")]
    Invalid { ty: MessageType, detail: String },
    #[error(
        "{ty} frame numbered {found} where frame {expected} was due: a frame was duplicated, \
         lost or reordered on the link"
    )]
    Sequence {
        ty: MessageType,
        expected: u32,
        found: u32,
    },
}

/// The numbers of the frames one end sends on an established link, or expects to receive
/// (protocol version 10 and later): 1 for the first frame after the handshake, one more
/// for each frame after it, wrapping at 2^32. The sender takes a number for each frame in
/// the order the frames go on the wire; the receiver checks every frame against the next
/// number, so a duplicated, lost or reordered frame is refused (`DecodeError::Sequence`)
/// before its message is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameCounter {
    next: u32,
}

impl Default for FrameCounter {
    fn default() -> Self {
        FrameCounter::new()
    }
}

impl FrameCounter {
    /// A counter for a link that just finished its handshake.
    pub const fn new() -> FrameCounter {
        FrameCounter { next: 1 }
    }

    /// The number of the next frame, not taken.
    pub fn peek(&self) -> u32 {
        self.next
    }

    /// Takes the number of the next frame.
    pub fn take(&mut self) -> u32 {
        let n = self.next;
        self.next = n.wrapping_add(1);
        n
    }

    /// Takes `n` numbers at once and returns the first of them.
    pub fn take_many(&mut self, n: u32) -> u32 {
        let first = self.next;
        self.next = first.wrapping_add(n);
        first
    }

    /// The receiving side: a frame of type `ty` numbered `found` arrived. It must be the
    /// next number (which it takes); anything else is the link's end.
    pub fn check(&mut self, ty: MessageType, found: u32) -> Result<(), DecodeError> {
        if found != self.next {
            return Err(DecodeError::Sequence {
                ty,
                expected: self.next,
                found,
            });
        }
        self.take();
        Ok(())
    }
}

/// One checked frame. `payload` shares the decoder's buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub version: u16,
    pub ty: MessageType,
    /// Frame flags (none defined; 0 from version 10, whose header carries `seq` there).
    pub flags: u32,
    /// The frame's number on an established link of version 10 or later, else 0.
    pub seq: u32,
    pub payload: Bytes,
}

impl Frame {
    /// Parse the payload into a message.
    pub fn message(&self) -> Result<Message, DecodeError> {
        Message::decode(self.ty, self.version, self.payload.clone())
    }
}

/// Appends a frame header for the payload made of `parts` (concatenated); the payload
/// itself is not appended. `word` is the field at offset 8: the frame flags until version 9,
/// the frame number from version 10.
pub(crate) fn write_header(
    out: &mut Vec<u8>,
    version: u16,
    ty: MessageType,
    word: u32,
    parts: &[&[u8]],
) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&version.to_le_bytes());
    h[6..8].copy_from_slice(&ty.code().to_le_bytes());
    h[8..12].copy_from_slice(&word.to_le_bytes());
    // The callers check the payload against MAX_PAYLOAD, which fits in u32.
    h[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&h[0..16]);
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
    }
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(&h);
}

struct Header {
    version: u16,
    ty: MessageType,
    flags: u32,
    seq: u32,
    len: usize,
    crc: u32,
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}
fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Streaming frame decoder: feed it bytes as they arrive, in chunks of any size, and take
/// frames out. Never panics on input; the first error is sticky.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    expected_version: Option<u16>,
    /// From version 10 on an established link: the number the next frame must carry.
    seq: Option<FrameCounter>,
    max_payload: usize,
    failed: Option<DecodeError>,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            buf: BytesMut::with_capacity(64 * 1024),
            expected_version: None,
            seq: None,
            max_payload: MAX_PAYLOAD,
            failed: None,
        }
    }

    /// A decoder that refuses payloads over `max` bytes (at most [`MAX_PAYLOAD`]).
    pub fn with_max_payload(max: usize) -> Decoder {
        Decoder {
            max_payload: max.min(MAX_PAYLOAD),
            ..Decoder::new()
        }
    }

    /// Changes the payload limit (at most [`MAX_PAYLOAD`]): e.g. [`MAX_HANDSHAKE_PAYLOAD`]
    /// until the handshake completed, then [`MAX_PAYLOAD`].
    pub fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max.min(MAX_PAYLOAD);
    }

    /// After the handshake: every non-handshake frame must carry this version, and from
    /// version 10 every frame the next number of a [`FrameCounter`] (the first frame after
    /// the handshake 1). Before it, any version this build speaks is accepted, and the frame
    /// flags must be 0.
    pub fn set_version(&mut self, v: ProtocolVersion) {
        self.expected_version = Some(v.number());
        self.seq = (v >= ProtocolVersion::V10).then(FrameCounter::new);
    }

    /// Append received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The receive buffer, for reading into it directly (e.g. `read_buf`) instead of
    /// [`Decoder::feed`].
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.try_frame() {
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
            ok => ok,
        }
    }

    /// The next complete frame parsed into a message.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        let Some(frame) = self.next_frame()? else {
            return Ok(None);
        };
        frame
            .message()
            .inspect_err(|e| self.failed = Some(e.clone()))
            .map(Some)
    }

    fn try_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        // Bad magic is reported as soon as the bytes that differ arrived.
        let n = self.buf.len().min(4);
        if self.buf[..n] != MAGIC[..n] {
            let mut found = [0u8; 4];
            found[..n].copy_from_slice(&self.buf[..n]);
            return Err(DecodeError::BadMagic { found });
        }
        if self.buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let h = self.parse_header()?;
        if self.buf.len() < HEADER_LEN + h.len {
            self.buf.reserve(HEADER_LEN + h.len - self.buf.len());
            return Ok(None);
        }
        let computed = crc32c::crc32c_append(
            crc32c::crc32c(&self.buf[0..16]),
            &self.buf[HEADER_LEN..HEADER_LEN + h.len],
        );
        if computed != h.crc {
            return Err(DecodeError::FrameChecksum {
                ty: h.ty,
                stored: h.crc,
                computed,
            });
        }
        if let Some(counter) = &mut self.seq {
            counter.check(h.ty, h.seq)?;
        }
        let mut whole = self.buf.split_to(HEADER_LEN + h.len);
        whole.advance(HEADER_LEN);
        Ok(Some(Frame {
            version: h.version,
            ty: h.ty,
            flags: h.flags,
            seq: h.seq,
            payload: whole.freeze(),
        }))
    }

    fn parse_header(&self) -> Result<Header, DecodeError> {
        let b = &self.buf[..HEADER_LEN];
        let stored = le32(&b[20..24]);
        let computed = crc32c::crc32c(&b[0..20]);
        if stored != computed {
            return Err(DecodeError::HeaderChecksum { stored, computed });
        }
        let version = le16(&b[4..6]);
        let code = le16(&b[6..8]);
        let word = le32(&b[8..12]);
        // From version 10 the field is the frame number (checked once the frame is whole).
        let (flags, seq) = if self.seq.is_some() {
            (0, word)
        } else {
            (word, 0)
        };
        let len = le32(&b[12..16]);
        let ty = MessageType::from_code(code).ok_or(DecodeError::UnknownType { code })?;
        if flags & !KNOWN_FRAME_FLAGS != 0 {
            return Err(DecodeError::UnknownFlags { flags });
        }
        if len as usize > self.max_payload {
            return Err(DecodeError::Oversized {
                len,
                max: self.max_payload as u32,
            });
        }
        check_version(ty, version, self.expected_version)?;
        Ok(Header {
            version,
            ty,
            flags,
            seq,
            len: len as usize,
            crc: le32(&b[16..20]),
        })
    }
}

/// Handshake frames carry version 0; the others a version this build speaks, and after the
/// handshake exactly the negotiated one.
pub(crate) fn check_version(
    ty: MessageType,
    found: u16,
    expected: Option<u16>,
) -> Result<(), DecodeError> {
    if ty.is_handshake() {
        if found != 0 {
            return Err(DecodeError::WrongVersion {
                ty,
                found,
                expected: 0,
            });
        }
        return Ok(());
    }
    if ProtocolVersion::from_number(found).is_none() {
        return Err(DecodeError::UnsupportedVersion { found });
    }
    match expected {
        Some(expected) if expected != found => Err(DecodeError::WrongVersion {
            ty,
            found,
            expected,
        }),
        _ => Ok(()),
    }
}

//! Encoding messages into frames.

use bytes::Bytes;

use crate::frame::{MAX_PAYLOAD, write_header};
use crate::message::{EncodeError, Message};
use crate::version::ProtocolVersion;

/// Encodes messages for one link. Handshake messages always carry frame version 0; every
/// other message the encoder's version (the negotiated one; [`ProtocolVersion::LATEST`] by
/// default).
#[derive(Debug, Clone, Copy)]
pub struct Encoder {
    version: ProtocolVersion,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new(ProtocolVersion::LATEST)
    }
}

impl Encoder {
    pub fn new(version: ProtocolVersion) -> Encoder {
        Encoder { version }
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// Appends the whole frame (header, fixed fields, bulk data) to `out`.
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if let Some(tail) = self.encode_vectored(msg, out)? {
            out.extend_from_slice(&tail);
        }
        Ok(())
    }

    /// Appends the header and fixed fields to `head` and returns the bulk data that must be
    /// sent right after it (a cheap clone of the message's `Bytes`), so a sender can use a
    /// vectored write instead of copying the data. The checksum covers both.
    pub fn encode_vectored(
        &self,
        msg: &Message,
        head: &mut Vec<u8>,
    ) -> Result<Option<Bytes>, EncodeError> {
        if self.version >= ProtocolVersion::V8
            && let Message::Write {
                seq,
                offset,
                flags,
                data,
            } = msg
            && crate::zeroes::is_zeroes(data)
        {
            // A zero-write travels without its data (see `zeroes`).
            let zero = Message::WriteZeroes {
                seq: *seq,
                offset: *offset,
                len: data.len() as u64,
                flags: *flags & crate::message::write_flags::FUA,
            };
            return self.encode_vectored(&zero, head);
        }
        let ty = msg.message_type();
        msg.validate()
            .map_err(|detail| EncodeError::Invalid { ty, detail })?;
        let mut fixed = Vec::with_capacity(64);
        let tail = msg.encode_payload(self.version, &mut fixed);
        let len = fixed.len() + tail.map_or(0, |t| t.len());
        if len > MAX_PAYLOAD {
            return Err(EncodeError::TooLarge {
                ty,
                len,
                max: MAX_PAYLOAD,
            });
        }
        let version = if ty.is_handshake() {
            0
        } else {
            self.version.number()
        };
        let tail_slice: &[u8] = tail.map_or(&[], |t| &t[..]);
        write_header(head, version, ty, 0, &[&fixed, tail_slice]);
        head.extend_from_slice(&fixed);
        Ok(tail.filter(|t| !t.is_empty()).cloned())
    }
}

/// Encodes one message with [`Encoder::default`].
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    Encoder::default().encode(msg, out)
}

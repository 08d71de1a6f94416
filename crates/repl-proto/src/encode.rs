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

    /// Appends the whole frame (header, fixed fields, bulk data) to `out`, unnumbered: for
    /// the handshake and links below version 10 (see [`Encoder::encode_seq`]).
    pub fn encode(&self, msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.encode_seq(msg, 0, out)
    }

    /// Appends the whole frame to `out`, numbered `seq` (the sender's
    /// [`crate::FrameCounter`] of an established link; ignored below version 10 and for
    /// handshake messages, whose frames carry 0).
    pub fn encode_seq(
        &self,
        msg: &Message,
        seq: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        if let Some(tail) = self.encode_vectored_seq(msg, seq, out)? {
            out.extend_from_slice(&tail);
        }
        Ok(())
    }

    /// [`Encoder::encode_vectored_seq`] unnumbered (handshake, links below version 10).
    pub fn encode_vectored(
        &self,
        msg: &Message,
        head: &mut Vec<u8>,
    ) -> Result<Option<Bytes>, EncodeError> {
        self.encode_vectored_seq(msg, 0, head)
    }

    /// Appends the header and fixed fields to `head` and returns the bulk data that must be
    /// sent right after it (a cheap clone of the message's `Bytes`), so a sender can use a
    /// vectored write instead of copying the data. The checksum covers both. `seq`: the
    /// frame's number on an established link of version 10 or later (ignored otherwise).
    pub fn encode_vectored_seq(
        &self,
        msg: &Message,
        seq: u32,
        head: &mut Vec<u8>,
    ) -> Result<Option<Bytes>, EncodeError> {
        if self.version >= ProtocolVersion::V8
            && let Message::Write {
                seq: write_seq,
                offset,
                flags,
                data,
            } = msg
            && crate::zeroes::is_zeroes(data)
        {
            // A zero-write travels without its data (see `zeroes`).
            let zero = Message::WriteZeroes {
                seq: *write_seq,
                offset: *offset,
                len: data.len() as u64,
                flags: *flags & crate::message::write_flags::FUA,
            };
            return self.encode_vectored_seq(&zero, seq, head);
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
        let (version, word) = if ty.is_handshake() {
            (0, 0)
        } else if self.version >= ProtocolVersion::V10 {
            (self.version.number(), seq)
        } else {
            (self.version.number(), 0)
        };
        let tail_slice: &[u8] = tail.map_or(&[], |t| &t[..]);
        write_header(head, version, ty, word, &[&fixed, tail_slice]);
        head.extend_from_slice(&fixed);
        Ok(tail.filter(|t| !t.is_empty()).cloned())
    }
}

/// Encodes one message with [`Encoder::default`].
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    Encoder::default().encode(msg, out)
}

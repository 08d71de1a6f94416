//! The replication wire protocol between tandem agents, without I/O.
//!
//! * [`frame`]: length-prefixed frames with a fixed 24-byte header (magic, version, type,
//!   flags, length, crc32c of the frame, crc32c of the header) and a streaming [`Decoder`]
//!   that accepts bytes in chunks of any size and hands out payloads as `Bytes` slices of its
//!   buffer.
//! * [`message`]: every [`Message`] with explicit type codes, hand-encoded little endian.
//! * [`mod@encode`]: the [`Encoder`], also vectored so bulk data is not copied.
//! * [`version`]: the version history ([`ProtocolVersion`]) and negotiation.
//! * [`zeroes`]: the shared buffer of zeros that marks a write as a zero-write.
//! * [`handshake`]: the authenticated handshake as state machines ([`Initiator`],
//!   [`Acceptor`]) binding a link to one cluster, one volume and both node ids.
//!
//! `docs/protocol.md` documents the wire format byte by byte. Nothing here panics on input;
//! every problem is a typed error.

pub mod encode;
pub mod frame;
pub mod handshake;
pub mod message;
pub mod version;
pub mod zeroes;

pub use encode::{Encoder, encode};
pub use frame::{
    DecodeError, Decoder, Frame, FrameCounter, HEADER_LEN, MAGIC, MAX_DATA, MAX_FRAME,
    MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD,
};
pub use handshake::{
    Acceptor, AcceptorConfig, ClusterSecret, Established, HandshakeError, HandshakeFailure,
    Initiator, InitiatorConfig, LocalVolume, Output, VolumeLookup,
};
pub use message::{
    ByteRange, ChecksumAlg, ChecksumPurpose, Digest, DisconnectReason, DiskState, EncodeError,
    Generation, Generations, Hello, LostWriter, Message, MessageType, NodeId, Nonce, PeerBitmap,
    QuorumInfo, RefuseReason, Role, StateReport, Status,
};
pub use version::{ProtocolVersion, VersionMismatch, VersionRange, negotiate};

#[cfg(test)]
mod tests;

//! Counters for status output and tests.

use std::collections::BTreeMap;
use std::fmt;

use tandem_repl_proto::{DecodeError, HandshakeError};

/// Why a connection did not become a link. Every refused or failed handshake is counted under
/// one of these, on the side that saw the failure, and logged with `tracing::warn!`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RefusalReason {
    /// No protocol version in common.
    VersionMismatch,
    /// The peer belongs to another cluster.
    WrongCluster,
    /// The volume is unknown here, or known with another uuid.
    WrongVolume,
    /// The initiator is not a peer of the volume here.
    UnknownNode,
    /// The initiator addressed another node id than ours.
    UnexpectedNode,
    /// A MAC did not verify: the peer does not know the cluster secret (or a replay).
    BadMac,
    /// A message out of turn during the handshake.
    UnexpectedMessage,
    /// A handshake message failed its field checks.
    Malformed,
    /// The peer sent `Refused`.
    RefusedByPeer,
    /// The first bytes are not a tandem replication stream (bad magic).
    Garbage,
    /// A frame header declared a payload above the handshake limit.
    Oversized,
    /// Any other framing error (checksums, unknown type, flags, version, layout).
    BadFrame,
    /// The handshake did not complete within the handshake timeout (e.g. a silent client).
    Timeout,
    /// The peer closed the connection before the handshake completed.
    Closed,
    /// A socket error during the handshake.
    Io,
    /// A peer with a higher node id dialed us: the lower node id dials (connection rule).
    WrongDirection,
    /// Too many handshakes in progress; the connection was closed at once.
    Busy,
    /// Our own problem (no randomness, the volume was removed meanwhile, shutting down).
    Internal,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::VersionMismatch => "version_mismatch",
            RefusalReason::WrongCluster => "wrong_cluster",
            RefusalReason::WrongVolume => "wrong_volume",
            RefusalReason::UnknownNode => "unknown_node",
            RefusalReason::UnexpectedNode => "unexpected_node",
            RefusalReason::BadMac => "bad_mac",
            RefusalReason::UnexpectedMessage => "unexpected_message",
            RefusalReason::Malformed => "malformed",
            RefusalReason::RefusedByPeer => "refused_by_peer",
            RefusalReason::Garbage => "garbage",
            RefusalReason::Oversized => "oversized",
            RefusalReason::BadFrame => "bad_frame",
            RefusalReason::Timeout => "timeout",
            RefusalReason::Closed => "closed",
            RefusalReason::Io => "io",
            RefusalReason::WrongDirection => "wrong_direction",
            RefusalReason::Busy => "busy",
            RefusalReason::Internal => "internal",
        }
    }

    pub(crate) fn of_handshake(e: &HandshakeError) -> RefusalReason {
        match e {
            HandshakeError::VersionMismatch(_) => RefusalReason::VersionMismatch,
            HandshakeError::WrongCluster { .. } => RefusalReason::WrongCluster,
            HandshakeError::WrongVolume { .. } => RefusalReason::WrongVolume,
            HandshakeError::UnknownNode { .. } => RefusalReason::UnknownNode,
            HandshakeError::UnexpectedNode { .. } => RefusalReason::UnexpectedNode,
            HandshakeError::BadMac => RefusalReason::BadMac,
            HandshakeError::UnexpectedMessage { .. } => RefusalReason::UnexpectedMessage,
            HandshakeError::Malformed(_) => RefusalReason::Malformed,
            HandshakeError::RefusedByPeer { .. } => RefusalReason::RefusedByPeer,
            HandshakeError::InvalidConfig(_) => RefusalReason::Internal,
        }
    }

    pub(crate) fn of_decode(e: &DecodeError) -> RefusalReason {
        match e {
            DecodeError::BadMagic { .. } => RefusalReason::Garbage,
            DecodeError::Oversized { .. } => RefusalReason::Oversized,
            _ => RefusalReason::BadFrame,
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of a transport's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Handshakes that failed, by reason (both directions: as acceptor and as dialer).
    pub refused_by_reason: BTreeMap<RefusalReason, u64>,
    /// TCP connections accepted on the listener.
    pub connections_accepted: u64,
    /// Dial attempts that did not reach a handshake (connect refused, unreachable, timeout).
    pub dial_failures: u64,
    /// Links established since start.
    pub links_established: u64,
    /// Links up right now.
    pub links_up: usize,
    /// Tasks of this transport still running (0 after `shutdown`).
    pub live_tasks: usize,
}

impl Stats {
    /// Refusals counted under `reason`.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused_by_reason.get(&reason).copied().unwrap_or(0)
    }
}

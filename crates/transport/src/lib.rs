//! The replication links of one node, over TCP with tokio.
//!
//! A [`Transport`] owns one listener and one TCP connection (a *link*) per volume and peer.
//! It runs the authenticated handshake of `tandem-repl-proto` on every connection, then a
//! reader (frames decoded with zero-copy `Bytes` payloads) and a writer (queued frames
//! batched into vectored writes, bulk data never copied; a frame for an idle link is written
//! by the sending thread itself, see `direct.rs`) per link, keeps links alive with
//! Ping/Pong and redials broken ones. It knows nothing of replication: it delivers
//! [`Event`]s (`PeerUp`, `PeerMessage`, `PeerDown`) in order per link through one bounded
//! channel, and sends what the consumer hands to [`Transport::send`].
//!
//! **Connection rule.** For every (volume, peer) the node with the *lower* node id dials and
//! the higher one accepts, so there is never more than one connection per pair: a higher id
//! that dials anyway is refused (`WrongDirection`). When an authenticated connection for a
//! pair arrives while the acceptor still holds an older link for it (the dialer restarted or
//! saw the old link die first), the newer one replaces it: the old link goes down
//! (`Superseded`) before the new one comes up.
//!
//! **Back-pressure.** Each link's send queue holds at most [`Limits::send_queue_frames`]
//! frames and [`Limits::send_queue_bytes`] bytes ([`Transport::send`] waits,
//! [`Transport::try_send`] fails with [`SendError::Full`]); the event channel holds
//! [`Limits::event_queue`] events, and a link whose event does not fit stops reading its
//! socket until the consumer catches up.
//!
//! See `docs/protocol.md`, section "Transport".

mod config;
mod direct;
mod link;
pub mod secret;
mod stats;
mod tasks;
mod transport;

use std::sync::Arc;
use std::time::Duration;

use tandem_repl_proto::{DecodeError, DisconnectReason, Message, NodeId};

pub use config::{
    Limits, MAX_ID_LEN, MAX_NODE_ID, PeerConfig, Timers, TransportConfig, VolumeConfig,
};
pub use secret::{
    SecretError, generate_secret_file, load_or_generate_secret_file, load_secret_file,
};
pub use stats::{RefusalReason, Stats};
pub use transport::{LinkInfo, Transport};

/// Identifies one link (one authenticated connection): unique for the life of a transport.
/// A reconnect gets a new id.
pub type LinkId = u64;

/// What the transport tells its consumer. For one (volume, peer) the events are strictly
/// ordered: `PeerUp{link}`, that link's messages in the order the peer sent them, then
/// `PeerDown{link}`; the next link's `PeerUp` comes after that `PeerDown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A link is authenticated and ready; [`Transport::send`] reaches the peer from now on.
    PeerUp {
        volume: Arc<str>,
        peer: NodeId,
        link: LinkId,
    },
    /// A message from the peer (never a handshake message, Disconnect, or a keepalive Ping/Pong
    /// (token with bit 63 set): the transport handles those. Ping/Pong with a smaller token
    /// are the consumer's and delivered here).
    PeerMessage {
        volume: Arc<str>,
        peer: NodeId,
        msg: Message,
    },
    /// The link is gone; messages queued for it are dropped. The dialing side reconnects by
    /// itself unless the volume or peer was removed or the transport shut down.
    PeerDown {
        volume: Arc<str>,
        peer: NodeId,
        link: LinkId,
        reason: DownReason,
    },
}

/// Why a link went down.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DownReason {
    #[error("the peer closed the connection")]
    Closed,
    #[error("socket error: {0}")]
    Io(String),
    #[error("bad frame from the peer: {0}")]
    Decode(DecodeError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("nothing received from the peer for {0:?}")]
    Timeout(Duration),
    #[error("could not write to the peer for {0:?}")]
    WriteStalled(Duration),
    #[error("the peer disconnected ({reason:?}): {detail:?}")]
    PeerDisconnected {
        reason: DisconnectReason,
        detail: String,
    },
    #[error("the volume or the peer was removed from the configuration")]
    Removed,
    #[error("replaced by a newer connection from the peer")]
    Superseded,
    #[error("the transport is shutting down")]
    Shutdown,
    #[error("could not encode a message: {0}")]
    Encode(String),
}

impl DownReason {
    /// The `Disconnect` reason to tell the peer when we close the link for this reason;
    /// `None` when the connection is already unusable or the peer closed it.
    pub(crate) fn disconnect(&self) -> Option<DisconnectReason> {
        Some(match self {
            DownReason::Decode(_) | DownReason::Protocol(_) => DisconnectReason::ProtocolError,
            DownReason::Timeout(_) => DisconnectReason::Timeout,
            DownReason::Removed => DisconnectReason::ConfigChanged,
            DownReason::Shutdown => DisconnectReason::Shutdown,
            DownReason::Superseded | DownReason::Encode(_) => DisconnectReason::Other,
            DownReason::Closed
            | DownReason::Io(_)
            | DownReason::WriteStalled(_)
            | DownReason::PeerDisconnected { .. } => return None,
        })
    }
}

/// Errors of [`Transport::start`] and the configuration calls.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid transport configuration: {0}")]
    Config(String),
    #[error("cannot listen for replication on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the transport is shut down")]
    ShutDown,
}

/// Why [`Transport::send`] did not queue a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no link to node {peer} for volume {volume:?}")]
    NotConnected { volume: String, peer: NodeId },
    #[error("link {link} to node {peer} for volume {volume:?} is gone")]
    StaleLink {
        volume: String,
        peer: NodeId,
        link: LinkId,
    },
    #[error("the send queue to node {peer} for volume {volume:?} is full")]
    Full { volume: String, peer: NodeId },
    #[error("cannot send this message: {0}")]
    Invalid(String),
}

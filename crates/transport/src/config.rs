//! Configuration of a [`Transport`](crate::Transport): who we are, whom we replicate with.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_repl_proto::{ClusterSecret, NodeId};

use crate::TransportError;

/// Highest node id the protocol allows.
pub const MAX_NODE_ID: NodeId = 31;
/// Longest cluster id, volume name or volume uuid, in bytes (a protocol limit).
pub const MAX_ID_LEN: usize = 255;

/// Everything a node needs to run its replication links.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The cluster this node belongs to; peers of other clusters are refused.
    pub cluster_id: String,
    /// The cluster secret (at least 16 bytes), see [`crate::secret`].
    pub secret: ClusterSecret,
    /// This node's id (0..=31), the same in every volume.
    pub node_id: NodeId,
    /// This node's name, for logs.
    pub node_name: String,
    /// Where to accept replication connections (port 0: any free port, see
    /// [`Transport::local_addr`](crate::Transport::local_addr)).
    pub listen: SocketAddr,
    pub timers: Timers,
    pub limits: Limits,
}

impl TransportConfig {
    /// A configuration with default timers and limits.
    pub fn new(
        cluster_id: impl Into<String>,
        secret: ClusterSecret,
        node_id: NodeId,
        node_name: impl Into<String>,
        listen: SocketAddr,
    ) -> TransportConfig {
        TransportConfig {
            cluster_id: cluster_id.into(),
            secret,
            node_id,
            node_name: node_name.into(),
            listen,
            timers: Timers::default(),
            limits: Limits::default(),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), TransportError> {
        check_id("cluster id", &self.cluster_id)?;
        if self.node_id > MAX_NODE_ID {
            return Err(TransportError::Config(format!(
                "node id {} is above {MAX_NODE_ID}",
                self.node_id
            )));
        }
        let t = &self.timers;
        for (name, d) in [
            ("dial_backoff_min", t.dial_backoff_min),
            ("handshake_timeout", t.handshake_timeout),
            ("ping_interval", t.ping_interval),
            ("ping_timeout", t.ping_timeout),
        ] {
            if d.is_zero() {
                return Err(TransportError::Config(format!("timer {name} must be > 0")));
            }
        }
        if t.dial_backoff_max < t.dial_backoff_min {
            return Err(TransportError::Config(
                "dial_backoff_max must be >= dial_backoff_min".into(),
            ));
        }
        let l = &self.limits;
        if l.send_queue_frames == 0 || l.event_queue == 0 || l.max_pending_handshakes == 0 {
            return Err(TransportError::Config("queue sizes must be > 0".into()));
        }
        if l.send_queue_bytes < (1 << 20) {
            return Err(TransportError::Config(
                "send_queue_bytes must be at least 1 MiB".into(),
            ));
        }
        Ok(())
    }
}

/// Timer values. The defaults suit a LAN; tests use short ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// First pause between dial attempts (doubled after each failure). Default 100 ms.
    pub dial_backoff_min: Duration,
    /// Longest pause between dial attempts. Default 2 s.
    pub dial_backoff_max: Duration,
    /// Connect plus handshake must finish within this, on both ends; a silent or slow peer
    /// is dropped. Default 5 s.
    pub handshake_timeout: Duration,
    /// A link that received nothing for this long sends a Ping (again every interval).
    /// Default 1 s.
    pub ping_interval: Duration,
    /// A link that received nothing for this long (or cannot write for this long) is down:
    /// `PeerDown{reason: Timeout}`. Default 5 s.
    pub ping_timeout: Duration,
    /// How long an orderly close waits for the queued frames and the `Disconnect` to be
    /// written. Default 1 s.
    pub close_grace: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            dial_backoff_min: Duration::from_millis(100),
            dial_backoff_max: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(5),
            close_grace: Duration::from_secs(1),
        }
    }
}

/// Queue bounds (back-pressure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Frames waiting in one link's send queue. Default 1024.
    pub send_queue_frames: usize,
    /// Bytes (bulk data plus a 64-byte allowance per frame) waiting in one link's send queue;
    /// a single frame larger than this still goes, alone. Default 64 MiB.
    pub send_queue_bytes: usize,
    /// Events waiting for the consumer, all links together. A link whose next event does not
    /// fit stops reading its socket until there is room (TCP then slows the peer). Default
    /// 1024.
    pub event_queue: usize,
    /// Accepted connections still in their handshake at once; more are closed at once
    /// (counted as `Busy`). Default 256.
    pub max_pending_handshakes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            send_queue_frames: 1024,
            send_queue_bytes: 64 << 20,
            event_queue: 1024,
            max_pending_handshakes: 256,
        }
    }
}

/// A peer of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub node_id: NodeId,
    /// The peer's node name, for logs.
    pub name: String,
    /// `host:port` of the peer's replication listener (resolved at every dial attempt).
    pub addr: String,
}

/// A replicated volume and the peers this node replicates it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    pub name: String,
    /// The volume's uuid: a peer that knows the same name with another uuid (another
    /// incarnation of the volume) is refused.
    pub uuid: String,
    pub peers: Vec<PeerConfig>,
}

impl VolumeConfig {
    pub(crate) fn validate(&self, local: NodeId) -> Result<(), TransportError> {
        check_id("volume name", &self.name)?;
        check_id("volume uuid", &self.uuid)?;
        let mut seen = 0u64;
        for p in &self.peers {
            if p.node_id > MAX_NODE_ID || p.node_id == local {
                return Err(TransportError::Config(format!(
                    "volume {:?}: peer node id {} must be at most {MAX_NODE_ID} and differ from ours ({local})",
                    self.name, p.node_id
                )));
            }
            if seen & (1 << p.node_id) != 0 {
                return Err(TransportError::Config(format!(
                    "volume {:?}: peer node id {} listed twice",
                    self.name, p.node_id
                )));
            }
            seen |= 1 << p.node_id;
        }
        Ok(())
    }
}

fn check_id(what: &str, s: &str) -> Result<(), TransportError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(TransportError::Config(format!(
            "{what} must be 1..={MAX_ID_LEN} bytes, got {}",
            s.len()
        )));
    }
    Ok(())
}

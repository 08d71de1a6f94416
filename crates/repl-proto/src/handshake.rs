//! The authenticated handshake, as sans-IO state machines for both ends of a link.
//!
//! ```text
//! initiator                                   acceptor
//!   Hello{versions, cluster, volume, uuid,
//!         from_node, to_node, nonce_i}  --->    checks versions, cluster, volume, node ids
//!                                       <---    Challenge{versions, chosen version, nonce_a}
//!   checks the chosen version
//!   Auth{mac_i}                         --->    checks mac_i
//!                                       <---    Welcome{mac_a}
//!   checks mac_a
//! ```
//!
//! `mac_x = HMAC-SHA256(cluster secret, label_x || transcript)`, where the transcript holds
//! the chosen version, both version ranges, the cluster id, the volume name and uuid, both node
//! ids and both nonces (see `docs/protocol.md` for the exact bytes). The labels differ per
//! direction, so one side's proof is never valid for the other; every proof covers both
//! nonces, so a recorded handshake is worthless against a fresh nonce. The secret never crosses
//! the wire. Any failure is a [`HandshakeFailure`]: a typed [`HandshakeError`] to log and,
//! where the peer should be told, a [`Message::Refused`] to send before closing.
//!
//! Nonces come from the caller (no RNG in here) and must be fresh random bytes for every
//! attempt; tests and the simulator pass fixed ones.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::message::{
    Hello, MAC_LEN, MAX_DETAIL_LEN, MAX_ID_LEN, MAX_NODE_ID, Message, MessageType, NodeId, Nonce,
    RefuseReason,
};
use crate::version::{ProtocolVersion, VersionMismatch, VersionRange, negotiate};

type HmacSha256 = Hmac<Sha256>;

const LABEL_INITIATOR: &[u8] = b"tandem-repl initiator proof\0";
const LABEL_ACCEPTOR: &[u8] = b"tandem-repl acceptor proof\0";
const LABEL_SESSION: &[u8] = b"tandem-repl session key\0";

/// Shortest accepted cluster secret, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// The cluster's shared secret. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl ClusterSecret {
    /// At least [`MIN_SECRET_LEN`] bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<ClusterSecret, HandshakeError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(HandshakeError::InvalidConfig(format!(
                "cluster secret has {} bytes, at least {MIN_SECRET_LEN} are required",
                bytes.len()
            )));
        }
        Ok(ClusterSecret(bytes))
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret(<{} bytes>)", self.0.len())
    }
}

/// What the initiator wants to connect to.
#[derive(Debug, Clone)]
pub struct InitiatorConfig {
    pub cluster_id: String,
    pub volume_name: String,
    pub volume_uuid: String,
    pub local_node: NodeId,
    pub peer_node: NodeId,
    pub versions: VersionRange,
    pub secret: ClusterSecret,
}

/// What the acceptor knows before it reads a Hello.
#[derive(Debug, Clone)]
pub struct AcceptorConfig {
    pub cluster_id: String,
    pub versions: VersionRange,
    pub secret: ClusterSecret,
}

/// A volume the acceptor serves, as found by a [`VolumeLookup`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVolume {
    pub volume_name: String,
    pub volume_uuid: String,
    /// Our node id in that volume.
    pub local_node: NodeId,
    /// Node ids allowed to connect for that volume.
    pub peers: Vec<NodeId>,
}

/// Finds the volume a Hello names. Implemented for slices and vectors of [`LocalVolume`]
/// and for closures.
pub trait VolumeLookup {
    fn lookup(&self, volume_name: &str) -> Option<LocalVolume>;
}

impl VolumeLookup for [LocalVolume] {
    fn lookup(&self, volume_name: &str) -> Option<LocalVolume> {
        self.iter().find(|v| v.volume_name == volume_name).cloned()
    }
}

impl VolumeLookup for Vec<LocalVolume> {
    fn lookup(&self, volume_name: &str) -> Option<LocalVolume> {
        self.as_slice().lookup(volume_name)
    }
}

impl<F: Fn(&str) -> Option<LocalVolume>> VolumeLookup for F {
    fn lookup(&self, volume_name: &str) -> Option<LocalVolume> {
        self(volume_name)
    }
}

/// An authenticated link, the result of a successful handshake.
#[derive(Clone, PartialEq, Eq)]
pub struct Established {
    pub version: ProtocolVersion,
    pub cluster_id: String,
    pub volume_name: String,
    pub volume_uuid: String,
    pub local_node: NodeId,
    pub peer_node: NodeId,
    /// HMAC-SHA256(secret, "tandem-repl session key\0" || transcript): the same on both ends,
    /// unknown to anyone without the secret, unique per handshake. Not used by version 1
    /// itself; available for channel binding or per-frame authentication later.
    pub session_key: [u8; 32],
}

impl fmt::Debug for Established {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Established")
            .field("version", &self.version)
            .field("cluster_id", &self.cluster_id)
            .field("volume_name", &self.volume_name)
            .field("volume_uuid", &self.volume_uuid)
            .field("local_node", &self.local_node)
            .field("peer_node", &self.peer_node)
            .finish_non_exhaustive()
    }
}

/// Why a handshake failed. Every variant is meant to be logged as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    VersionMismatch(#[from] VersionMismatch),
    #[error("wrong cluster: we are in cluster {ours:?}, the peer in {theirs:?}")]
    WrongCluster { ours: String, theirs: String },
    #[error(
        "wrong volume: the peer asked for volume {theirs_name:?} uuid {theirs_uuid:?}, {}",
        match ours_uuid { Some(u) => format!("ours has uuid {u:?}"), None => "we have no such volume".to_string() }
    )]
    WrongVolume {
        theirs_name: String,
        theirs_uuid: String,
        ours_uuid: Option<String>,
    },
    #[error("node {node} is not a peer of volume {volume:?} here")]
    UnknownNode { volume: String, node: NodeId },
    #[error("the peer addressed node {found}, but we are node {expected}")]
    UnexpectedNode { expected: NodeId, found: NodeId },
    #[error("bad MAC from the peer: it does not know the cluster secret, or this is a replay")]
    BadMac,
    #[error("unexpected {got} while {state}")]
    UnexpectedMessage {
        state: &'static str,
        got: MessageType,
    },
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("the peer refused the link ({reason:?}): {detail}")]
    RefusedByPeer {
        reason: RefuseReason,
        detail: String,
    },
    #[error("invalid handshake configuration: {0}")]
    InvalidConfig(String),
}

impl HandshakeError {
    /// The reason code to tell the peer, `None` when the peer is not to be told.
    pub fn refuse_reason(&self) -> Option<RefuseReason> {
        Some(match self {
            HandshakeError::VersionMismatch(_) => RefuseReason::VersionMismatch,
            HandshakeError::WrongCluster { .. } => RefuseReason::WrongCluster,
            HandshakeError::WrongVolume { .. } => RefuseReason::WrongVolume,
            HandshakeError::UnknownNode { .. } => RefuseReason::UnknownNode,
            HandshakeError::UnexpectedNode { .. } => RefuseReason::UnexpectedNode,
            HandshakeError::BadMac => RefuseReason::BadMac,
            HandshakeError::UnexpectedMessage { .. } => RefuseReason::UnexpectedMessage,
            HandshakeError::Malformed(_) => RefuseReason::ProtocolError,
            HandshakeError::RefusedByPeer { .. } | HandshakeError::InvalidConfig(_) => return None,
        })
    }

    /// Detail text for the peer: only what the peer told us or may know, never our own
    /// volume uuids or names the peer did not ask for.
    fn wire_detail(&self) -> String {
        let s = match self {
            HandshakeError::WrongVolume {
                theirs_name,
                theirs_uuid,
                ..
            } => format!("volume {theirs_name:?} with uuid {theirs_uuid:?} is not here"),
            HandshakeError::WrongCluster { theirs, .. } => {
                format!("this node is not in cluster {theirs:?}")
            }
            other => other.to_string(),
        };
        truncate(s, MAX_DETAIL_LEN)
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A failed handshake: the error to log and, if the peer should learn why, the message to
/// send before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{error}")]
pub struct HandshakeFailure {
    pub error: Box<HandshakeError>,
    pub send: Option<Message>,
}

/// What a state machine wants done after a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Send this to the peer.
    pub send: Option<Message>,
    /// The handshake completed (after `send` was sent, when both are set).
    pub established: Option<Established>,
}

/// The bound fields every MAC covers.
#[derive(Debug, Clone)]
struct Transcript {
    version: u16,
    initiator_versions: VersionRange,
    acceptor_versions: VersionRange,
    cluster_id: String,
    volume_name: String,
    volume_uuid: String,
    initiator_node: NodeId,
    acceptor_node: NodeId,
    initiator_nonce: Nonce,
    acceptor_nonce: Nonce,
}

impl Transcript {
    fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128 + 3 * MAX_ID_LEN);
        b.extend_from_slice(&self.version.to_le_bytes());
        for r in [self.initiator_versions, self.acceptor_versions] {
            b.extend_from_slice(&r.min.to_le_bytes());
            b.extend_from_slice(&r.max.to_le_bytes());
        }
        for s in [&self.cluster_id, &self.volume_name, &self.volume_uuid] {
            b.extend_from_slice(&(s.len() as u16).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        b.push(self.initiator_node);
        b.push(self.acceptor_node);
        b.extend_from_slice(&self.initiator_nonce);
        b.extend_from_slice(&self.acceptor_nonce);
        b
    }

    fn mac(&self, secret: &ClusterSecret, label: &[u8]) -> HmacSha256 {
        // HMAC accepts keys of any length.
        let mut m = match HmacSha256::new_from_slice(&secret.0) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        };
        m.update(label);
        m.update(&self.bytes());
        m
    }

    fn tag(&self, secret: &ClusterSecret, label: &[u8]) -> [u8; MAC_LEN] {
        self.mac(secret, label).finalize().into_bytes().into()
    }

    fn verify(&self, secret: &ClusterSecret, label: &[u8], tag: &[u8]) -> bool {
        // Constant-time comparison.
        self.mac(secret, label).verify_slice(tag).is_ok()
    }

    fn established(&self, secret: &ClusterSecret, initiator: bool) -> Established {
        let (local_node, peer_node) = if initiator {
            (self.initiator_node, self.acceptor_node)
        } else {
            (self.acceptor_node, self.initiator_node)
        };
        Established {
            // Only ever built from a negotiated version within our supported range.
            version: ProtocolVersion::from_number(self.version).unwrap_or(ProtocolVersion::LATEST),
            cluster_id: self.cluster_id.clone(),
            volume_name: self.volume_name.clone(),
            volume_uuid: self.volume_uuid.clone(),
            local_node,
            peer_node,
            session_key: self.tag(secret, LABEL_SESSION),
        }
    }
}

fn check_config_id(field: &str, s: &str) -> Result<(), HandshakeError> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(HandshakeError::InvalidConfig(format!(
            "{field} must be 1..={MAX_ID_LEN} bytes"
        )));
    }
    Ok(())
}

fn check_config_versions(v: VersionRange) -> Result<(), HandshakeError> {
    if !v.is_supported() {
        return Err(HandshakeError::InvalidConfig(format!(
            "version range {v} is not within what this build speaks ({})",
            VersionRange::SUPPORTED
        )));
    }
    Ok(())
}

fn refused(reason: RefuseReason, versions: VersionRange, detail: String) -> Message {
    Message::Refused {
        reason,
        min_version: versions.min,
        max_version: versions.max,
        detail,
    }
}

fn fail(error: HandshakeError, versions: VersionRange) -> HandshakeFailure {
    let send = error
        .refuse_reason()
        .map(|r| refused(r, versions, error.wire_detail()));
    HandshakeFailure {
        error: Box::new(error),
        send,
    }
}

/// Turns a peer's `Refused` into our error; a version refusal becomes a version mismatch that
/// names both ranges.
fn peer_refusal(
    ours: VersionRange,
    reason: RefuseReason,
    min: u16,
    max: u16,
    detail: String,
) -> HandshakeFailure {
    let error = match (reason, VersionRange::new(min, max)) {
        (RefuseReason::VersionMismatch, Some(theirs)) => {
            HandshakeError::VersionMismatch(VersionMismatch { ours, theirs })
        }
        _ => HandshakeError::RefusedByPeer { reason, detail },
    };
    HandshakeFailure {
        error: Box::new(error),
        send: None,
    }
}

fn unexpected(state: &'static str, msg: &Message, versions: VersionRange) -> HandshakeFailure {
    fail(
        HandshakeError::UnexpectedMessage {
            state,
            got: msg.message_type(),
        },
        versions,
    )
}

enum InitiatorState {
    AwaitChallenge,
    AwaitWelcome(Box<Transcript>),
    Done,
    Failed,
}

/// The connecting side.
pub struct Initiator {
    cfg: InitiatorConfig,
    nonce: Nonce,
    state: InitiatorState,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake; returns the machine and the Hello to send first.
    /// `nonce` must be fresh random bytes.
    pub fn new(cfg: InitiatorConfig, nonce: Nonce) -> Result<(Initiator, Message), HandshakeError> {
        check_config_versions(cfg.versions)?;
        check_config_id("cluster_id", &cfg.cluster_id)?;
        check_config_id("volume_name", &cfg.volume_name)?;
        check_config_id("volume_uuid", &cfg.volume_uuid)?;
        if cfg.local_node > MAX_NODE_ID
            || cfg.peer_node > MAX_NODE_ID
            || cfg.local_node == cfg.peer_node
        {
            return Err(HandshakeError::InvalidConfig(format!(
                "node ids {} and {} must differ and be at most {MAX_NODE_ID}",
                cfg.local_node, cfg.peer_node
            )));
        }
        let hello = Message::Hello(Box::new(Hello {
            min_version: cfg.versions.min,
            max_version: cfg.versions.max,
            from_node: cfg.local_node,
            to_node: cfg.peer_node,
            nonce,
            cluster_id: cfg.cluster_id.clone(),
            volume_name: cfg.volume_name.clone(),
            volume_uuid: cfg.volume_uuid.clone(),
        }));
        Ok((
            Initiator {
                cfg,
                nonce,
                state: InitiatorState::AwaitChallenge,
            },
            hello,
        ))
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, InitiatorState::Done)
    }

    /// Feeds one message from the acceptor.
    pub fn on_message(&mut self, msg: Message) -> Result<Output, HandshakeFailure> {
        let state = std::mem::replace(&mut self.state, InitiatorState::Failed);
        let r = self.step(state, msg);
        if let Ok(out) = &r
            && out.established.is_some()
        {
            self.state = InitiatorState::Done;
        }
        r
    }

    fn step(&mut self, state: InitiatorState, msg: Message) -> Result<Output, HandshakeFailure> {
        let ours = self.cfg.versions;
        if let Message::Refused {
            reason,
            min_version,
            max_version,
            detail,
        } = msg
        {
            return Err(peer_refusal(ours, reason, min_version, max_version, detail));
        }
        match (state, msg) {
            (
                InitiatorState::AwaitChallenge,
                msg @ Message::Challenge {
                    min_version,
                    max_version,
                    version,
                    nonce,
                },
            ) => {
                msg.validate()
                    .map_err(|d| fail(HandshakeError::Malformed(d), ours))?;
                let theirs = VersionRange {
                    min: min_version,
                    max: max_version,
                };
                let agreed = negotiate(ours, theirs).map_err(|e| fail(e.into(), ours))?;
                if agreed != version {
                    return Err(fail(
                        HandshakeError::Malformed(format!(
                            "the acceptor chose version {version}, the highest common is {agreed}"
                        )),
                        ours,
                    ));
                }
                let t = Transcript {
                    version,
                    initiator_versions: ours,
                    acceptor_versions: theirs,
                    cluster_id: self.cfg.cluster_id.clone(),
                    volume_name: self.cfg.volume_name.clone(),
                    volume_uuid: self.cfg.volume_uuid.clone(),
                    initiator_node: self.cfg.local_node,
                    acceptor_node: self.cfg.peer_node,
                    initiator_nonce: self.nonce,
                    acceptor_nonce: nonce,
                };
                let mac = t.tag(&self.cfg.secret, LABEL_INITIATOR);
                self.state = InitiatorState::AwaitWelcome(Box::new(t));
                Ok(Output {
                    send: Some(Message::Auth { mac }),
                    established: None,
                })
            }
            (InitiatorState::AwaitWelcome(t), Message::Welcome { mac }) => {
                if !t.verify(&self.cfg.secret, LABEL_ACCEPTOR, &mac) {
                    return Err(fail(HandshakeError::BadMac, ours));
                }
                Ok(Output {
                    send: None,
                    established: Some(t.established(&self.cfg.secret, true)),
                })
            }
            (state, msg) => {
                let name = match state {
                    InitiatorState::AwaitChallenge => "waiting for Challenge",
                    InitiatorState::AwaitWelcome(_) => "waiting for Welcome",
                    InitiatorState::Done => "already established",
                    InitiatorState::Failed => "already failed",
                };
                Err(unexpected(name, &msg, ours))
            }
        }
    }
}

enum AcceptorState {
    AwaitHello,
    AwaitAuth(Box<Transcript>),
    Done,
    Failed,
}

/// The listening side. `L` finds the volume a Hello asks for.
pub struct Acceptor<L> {
    cfg: AcceptorConfig,
    nonce: Nonce,
    volumes: L,
    state: AcceptorState,
}

impl<L> fmt::Debug for Acceptor<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Acceptor")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl<L: VolumeLookup> Acceptor<L> {
    /// `nonce` must be fresh random bytes.
    pub fn new(
        cfg: AcceptorConfig,
        volumes: L,
        nonce: Nonce,
    ) -> Result<Acceptor<L>, HandshakeError> {
        check_config_versions(cfg.versions)?;
        check_config_id("cluster_id", &cfg.cluster_id)?;
        Ok(Acceptor {
            cfg,
            nonce,
            volumes,
            state: AcceptorState::AwaitHello,
        })
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, AcceptorState::Done)
    }

    /// A `Refused` to send when the caller refuses for its own reasons (for example
    /// [`RefuseReason::AlreadyConnected`]).
    pub fn refusal(&self, reason: RefuseReason, detail: &str) -> Message {
        refused(
            reason,
            self.cfg.versions,
            truncate(detail.to_string(), MAX_DETAIL_LEN),
        )
    }

    /// Feeds one message from the initiator.
    pub fn on_message(&mut self, msg: Message) -> Result<Output, HandshakeFailure> {
        let state = std::mem::replace(&mut self.state, AcceptorState::Failed);
        let r = self.step(state, msg);
        if let Ok(out) = &r
            && out.established.is_some()
        {
            self.state = AcceptorState::Done;
        }
        r
    }

    fn step(&mut self, state: AcceptorState, msg: Message) -> Result<Output, HandshakeFailure> {
        let ours = self.cfg.versions;
        if let Message::Refused {
            reason,
            min_version,
            max_version,
            detail,
        } = msg
        {
            return Err(peer_refusal(ours, reason, min_version, max_version, detail));
        }
        match (state, msg) {
            (AcceptorState::AwaitHello, Message::Hello(h)) => {
                let t = self.check_hello(&h).map_err(|e| fail(e, ours))?;
                let challenge = Message::Challenge {
                    min_version: ours.min,
                    max_version: ours.max,
                    version: t.version,
                    nonce: self.nonce,
                };
                self.state = AcceptorState::AwaitAuth(Box::new(t));
                Ok(Output {
                    send: Some(challenge),
                    established: None,
                })
            }
            (AcceptorState::AwaitAuth(t), Message::Auth { mac }) => {
                if !t.verify(&self.cfg.secret, LABEL_INITIATOR, &mac) {
                    return Err(fail(HandshakeError::BadMac, ours));
                }
                Ok(Output {
                    send: Some(Message::Welcome {
                        mac: t.tag(&self.cfg.secret, LABEL_ACCEPTOR),
                    }),
                    established: Some(t.established(&self.cfg.secret, false)),
                })
            }
            (state, msg) => {
                let name = match state {
                    AcceptorState::AwaitHello => "waiting for Hello",
                    AcceptorState::AwaitAuth(_) => "waiting for Auth",
                    AcceptorState::Done => "already established",
                    AcceptorState::Failed => "already failed",
                };
                Err(unexpected(name, &msg, ours))
            }
        }
    }

    fn check_hello(&self, h: &Hello) -> Result<Transcript, HandshakeError> {
        Message::Hello(Box::new(h.clone()))
            .validate()
            .map_err(HandshakeError::Malformed)?;
        let theirs = VersionRange {
            min: h.min_version,
            max: h.max_version,
        };
        let version = negotiate(self.cfg.versions, theirs)?;
        if h.cluster_id != self.cfg.cluster_id {
            return Err(HandshakeError::WrongCluster {
                ours: self.cfg.cluster_id.clone(),
                theirs: h.cluster_id.clone(),
            });
        }
        let vol = self.volumes.lookup(&h.volume_name);
        let vol = match vol {
            Some(v) if v.volume_uuid == h.volume_uuid => v,
            other => {
                return Err(HandshakeError::WrongVolume {
                    theirs_name: h.volume_name.clone(),
                    theirs_uuid: h.volume_uuid.clone(),
                    ours_uuid: other.map(|v| v.volume_uuid),
                });
            }
        };
        if h.to_node != vol.local_node {
            return Err(HandshakeError::UnexpectedNode {
                expected: vol.local_node,
                found: h.to_node,
            });
        }
        if !vol.peers.contains(&h.from_node) {
            return Err(HandshakeError::UnknownNode {
                volume: vol.volume_name,
                node: h.from_node,
            });
        }
        Ok(Transcript {
            version,
            initiator_versions: theirs,
            acceptor_versions: self.cfg.versions,
            cluster_id: h.cluster_id.clone(),
            volume_name: h.volume_name.clone(),
            volume_uuid: h.volume_uuid.clone(),
            initiator_node: h.from_node,
            acceptor_node: h.to_node,
            initiator_nonce: h.nonce,
            acceptor_nonce: self.nonce,
        })
    }
}

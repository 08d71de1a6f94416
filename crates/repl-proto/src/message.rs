//! Messages and their payload encoding. Every layout is documented byte by byte in
//! `docs/protocol.md`; all integers are little endian, `str` is a u16 byte length followed by
//! UTF-8, `data` is the rest of the payload.
//!
//! The same constraints are checked when encoding and when decoding ([`Message::validate`]),
//! so this crate never sends what a peer of the same version would refuse.

use std::fmt;

use bytes::{BufMut, Bytes};

use crate::frame::{DecodeError, MAX_DATA, MAX_PAYLOAD};
use crate::version::ProtocolVersion;

/// A node's small id within a volume (DRBD's node-id), `0..=MAX_NODE_ID`.
pub type NodeId = u8;
/// Highest valid node id.
pub const MAX_NODE_ID: NodeId = 31;
/// A data generation identifier (DRBD's UUID); 0 means none.
pub type Generation = u64;
/// Bytes of a handshake nonce.
pub const NONCE_LEN: usize = 32;
/// A handshake nonce: random bytes chosen by the caller.
pub type Nonce = [u8; NONCE_LEN];
/// Bytes of an HMAC-SHA256 tag.
pub const MAC_LEN: usize = 32;
/// Bytes of one block digest.
pub const DIGEST_LEN: usize = 32;
/// A block digest (BLAKE3-256 in version 1).
pub type Digest = [u8; DIGEST_LEN];
/// Longest identifier string (cluster id, volume name, volume uuid), in bytes.
pub const MAX_ID_LEN: usize = 255;
/// Longest free-text detail in `Refused` / `Disconnect`, in bytes.
pub const MAX_DETAIL_LEN: usize = 1024;
/// Largest range one `ChecksumRequest` may cover.
pub const MAX_CHECKSUM_SPAN: u32 = 256 << 20;
/// Smallest and largest checksum block size.
pub const MIN_CHECKSUM_BLOCK: u32 = 512;
pub const MAX_CHECKSUM_BLOCK: u32 = 1 << 20;
/// Most ranges in one `OutOfSync` message.
pub const MAX_OOS_RANGES: usize = (MAX_PAYLOAD - 8) / 16;

macro_rules! wire_enum {
    ($(#[$m:meta])* $name:ident : $repr:ty { $($(#[$vm:meta])* $v:ident = $c:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v),+ }
        impl $name {
            /// Every variant, in code order.
            pub const ALL: &'static [$name] = &[$($name::$v),+];
            /// The code on the wire.
            pub const fn code(self) -> $repr { match self { $($name::$v => $c),+ } }
            /// The variant with this code.
            pub fn from_code(c: $repr) -> Option<$name> { match c { $($c => Some($name::$v),)+ _ => None } }
        }
    };
}

wire_enum! {
    /// Message type codes. `0x00xx` are handshake messages (frame version 0).
    MessageType: u16 {
        Hello = 0x0001,
        Challenge = 0x0002,
        Auth = 0x0003,
        Welcome = 0x0004,
        Refused = 0x0005,
        Ping = 0x0010,
        Pong = 0x0011,
        Disconnect = 0x0012,
        StateReport = 0x0013,
        Write = 0x0020,
        WriteAck = 0x0021,
        Trim = 0x0022,
        WriteZeroes = 0x0023,
        Flush = 0x0024,
        FlushAck = 0x0025,
        ReadRequest = 0x0026,
        ReadReply = 0x0027,
        Settled = 0x0028,
        TokenRequest = 0x0029,
        TokenGrant = 0x002A,
        ResyncBegin = 0x0030,
        ResyncEnd = 0x0031,
        ResyncRequest = 0x0032,
        ResyncData = 0x0033,
        ChecksumRequest = 0x0034,
        ChecksumReply = 0x0035,
        OutOfSync = 0x0036,
    }
}

impl MessageType {
    /// Handshake messages: the same layout in every protocol version.
    pub fn is_handshake(self) -> bool {
        self.code() < 0x0010
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

wire_enum! {
    /// Why a handshake was refused.
    RefuseReason: u16 {
        VersionMismatch = 1,
        WrongCluster = 2,
        WrongVolume = 3,
        /// The initiator's node id is not a peer of the volume here.
        UnknownNode = 4,
        /// The initiator addressed a node id that is not ours.
        UnexpectedNode = 5,
        BadMac = 6,
        UnexpectedMessage = 7,
        /// A link to that peer for that volume is already up.
        AlreadyConnected = 8,
        /// Malformed handshake traffic.
        ProtocolError = 9,
    }
}

wire_enum! {
    /// Why a side closes an established link.
    DisconnectReason: u16 {
        /// Orderly shutdown (agent stop, replica moved away).
        Shutdown = 1,
        /// Volume configuration changed (peer removed, protocol changed); reconnect later.
        ConfigChanged = 2,
        /// The generations show split brain; no automatic policy resolved it.
        SplitBrain = 3,
        /// The generations share no history.
        UnrelatedData = 4,
        /// The peer sent something malformed or unexpected.
        ProtocolError = 5,
        /// No traffic (not even Pong) within the keepalive timeout.
        Timeout = 6,
        /// Local backing storage failed; this replica detached.
        IoError = 7,
        /// Sizes are incompatible (peer too small).
        SizeMismatch = 8,
        /// Two Primaries outside a dual-primary window.
        TwoPrimaries = 9,
        Other = 255,
    }
}

wire_enum! {
    /// Role of a node for a volume.
    Role: u8 {
        Secondary = 0,
        Primary = 1,
    }
}

wire_enum! {
    /// Disk state (DRBD vocabulary, same codes as `tandem-meta`).
    DiskState: u8 {
        UpToDate = 1,
        Inconsistent = 2,
        Outdated = 3,
        Diskless = 4,
        Failed = 5,
    }
}

wire_enum! {
    /// Result of a request.
    Status: u8 {
        Ok = 0,
        IoError = 1,
        /// Offset or length outside the volume.
        OutOfRange = 2,
        NoSpace = 3,
        /// Refused by state: not UpToDate, no quorum, wrong role.
        NotPermitted = 4,
        NotSupported = 5,
    }
}

wire_enum! {
    /// Block digest algorithm of checksum requests.
    ChecksumAlg: u8 {
        /// BLAKE3 with 32-byte output, over the block's bytes.
        Blake3 = 1,
    }
}

wire_enum! {
    /// What a checksum request is for.
    ChecksumPurpose: u8 {
        /// Checksum-based resync: the target skips blocks whose digests match.
        Resync = 1,
        /// Online verify: differing blocks are marked out of sync.
        Verify = 2,
    }
}

impl ChecksumAlg {
    /// The digest of one block.
    pub fn digest(self, block: &[u8]) -> Digest {
        match self {
            ChecksumAlg::Blake3 => *blake3::hash(block).as_bytes(),
        }
    }
}

/// Flag bits of [`Message::Write`], [`Message::Trim`] and [`Message::WriteZeroes`].
pub mod write_flags {
    /// Durable on the peer before it acknowledges (NBD's FUA).
    pub const FUA: u32 = 1 << 0;
    /// WriteZeroes only: keep the range allocated (no hole punching).
    pub const NO_HOLE: u32 = 1 << 1;
}

/// Flag bits of [`Message::ResyncData`].
pub mod resync_flags {
    /// The range reads as zeros; no data follows (keeps thin targets thin).
    pub const ZERO: u32 = 1 << 0;
}

/// Flag bits of [`Message::OutOfSync`].
pub mod oos_flags {
    /// The last message of the bitmap exchange after a connect.
    pub const END_OF_BITMAP: u32 = 1 << 0;
    /// Since version 4, on an established link, from a diskless Primary: the ranges may be
    /// missing on the diskful node whose id is in bits 8..13 (`THIRD_NODE_SHIFT`), which it
    /// lost with these writes unacknowledged or unflushed there; the receiver marks them out of
    /// sync toward that node (the diskless Primary keeps no bitmap of its own).
    pub const THIRD_NODE: u32 = 1 << 1;
    /// Where the node id of `THIRD_NODE` sits.
    pub const THIRD_NODE_SHIFT: u32 = 8;
    /// The bits of that node id.
    pub const THIRD_NODE_MASK: u32 = 0x1f << THIRD_NODE_SHIFT;
}

/// Flag bits of [`StateReport::flags`] (DRBD's handshake flags, where they apply).
pub mod state_flags {
    /// Was Primary and was not demoted cleanly (crashed).
    pub const CRASHED_PRIMARY: u32 = 1 << 0;
    /// Was Primary and lost quorum.
    pub const PRIMARY_LOST_QUORUM: u32 = 1 << 1;
    /// Operator asked this side to discard its data (split-brain resolution).
    pub const DISCARD_MY_DATA: u32 = 1 << 2;
    /// This connect follows a short disconnect without a state change in between.
    pub const RECONNECT: u32 = 1 << 3;
    /// A dual-primary window (live migration) is open for the volume.
    pub const DUAL_PRIMARY: u32 = 1 << 4;
    /// I/O is suspended (lost quorum with on-no-quorum=suspend).
    pub const SUSPENDED: u32 = 1 << 5;
    /// Since version 5: the sender is one of the two Primaries of a dual-primary window
    /// (Primary to its consumer; its `role` is `Primary` only while it holds the write token).
    pub const WINDOW_MEMBER: u32 = 1 << 6;
    /// Since version 6, from a diskless Primary that has no peer holding its data, to a
    /// diskful peer: the receiver holds every write of the sender that completed, so if it is
    /// still at the sender's previous generation (`history[0]`) it may adopt `current` (the
    /// report that started `current` never reached it). Never sent on an older link (the
    /// encoder drops the bit there).
    pub const ADOPT_OFFER: u32 = 1 << 7;
    /// Since version 7: the sender, as a Primary with a disk, declares its writes `Settled`
    /// after flushes (a Primary without one always did, since version 4). Never sent on an
    /// older link (the encoder drops the bit there).
    pub const SETTLES: u32 = 1 << 8;
    pub const ALL: u32 = (1 << 9) - 1;
}

/// Identifier strings that bind a link, as sent by the initiator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Versions the initiator speaks.
    pub min_version: u16,
    pub max_version: u16,
    /// Initiator's node id.
    pub from_node: NodeId,
    /// The acceptor's node id, as the initiator knows it.
    pub to_node: NodeId,
    pub nonce: Nonce,
    pub cluster_id: String,
    pub volume_name: String,
    pub volume_uuid: String,
}

/// Data generations of a replica (DRBD's UUID set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    pub current: Generation,
    /// Bitmap generation toward the receiver of the report: our current generation when we
    /// were last in sync with it; 0 = none.
    pub bitmap: Generation,
    /// The previous two current generations, newest first.
    pub history: [Generation; 2],
}

/// Bitmap generation toward another peer (used by the generation comparison rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerBitmap {
    pub node: NodeId,
    pub generation: Generation,
}

/// Quorum as the sender sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuorumInfo {
    pub has_quorum: bool,
    /// Voters of the volume (diskful replicas + witnesses), the sender included.
    pub voters: u8,
    /// Voters the sender currently reaches, itself included.
    pub reachable: u8,
}

/// The sender's state; sent after the handshake and again on every change of role, disk
/// state, quorum or generations. `seq` grows with every report on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateReport {
    pub seq: u64,
    pub node_id: NodeId,
    pub role: Role,
    pub disk_state: DiskState,
    pub quorum: QuorumInfo,
    /// Bits of [`state_flags`].
    pub flags: u32,
    pub size_bytes: u64,
    pub generations: Generations,
    /// Bitmap generations toward the sender's other peers (at most 31).
    pub peer_bitmaps: Vec<PeerBitmap>,
    /// Since version 2 (0 on a version-1 link): diskful nodes (bit = node id) that lack writes
    /// a Primary completed without them. A Primary lists the diskful peers it wrote without;
    /// every other node relays the list of the Primary it is connected to. A node that finds
    /// itself listed becomes Outdated (it can no longer be promoted without force).
    pub outdated: u32,
    /// Since version 2: the current generation of the Primary whose list `outdated` is. A
    /// node whose own current generation is this one has caught up since (a sync target
    /// adopts its source's generation) and ignores the list.
    pub outdated_gen: u64,
    /// Since version 2: the Primary whose list `outdated` is (0 with an empty list). A node
    /// connected to that node ignores the list (that node's own reports are the authority).
    pub outdated_by: NodeId,
    /// Since version 3 (0 before): the sender's promotion epoch, one more than the highest
    /// epoch it had seen when it last became Primary (0: never). Of two sides of a split
    /// brain, the higher epoch became Primary more recently (`discard-younger-primary`).
    pub primary_epoch: u64,
    /// Since version 9 (none before): the Primary whose link the sender lost last at its
    /// current generation, and the highest write sequence number it had received from it.
    /// Two replicas that lost the same Primary compare these: the Primary numbers its writes
    /// once for all peers and sends them in that order, so the one that received the later
    /// write holds every write the Primary completed (see `docs/replication.md`).
    pub lost_writer: Option<LostWriter>,
}

/// The last writes a replica received from a Primary it lost ([`StateReport::lost_writer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LostWriter {
    /// The Primary's node id.
    pub node: NodeId,
    /// Its `primary_epoch` while it wrote them (one promotion numbers its writes once).
    pub epoch: u64,
    /// The highest sequence number of a `Write`, `Trim` or `WriteZeroes` received from it.
    pub seq: u64,
}

/// A range of bytes of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// Every message of the protocol. See `docs/protocol.md` for semantics and layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // --- handshake (frame version 0) ---
    Hello(Box<Hello>),
    /// Acceptor -> initiator: its version range, the chosen version, its nonce.
    Challenge {
        min_version: u16,
        max_version: u16,
        version: u16,
        nonce: Nonce,
    },
    /// Initiator -> acceptor: proof of the secret.
    Auth {
        mac: [u8; MAC_LEN],
    },
    /// Acceptor -> initiator: proof of the secret; the link is established.
    Welcome {
        mac: [u8; MAC_LEN],
    },
    /// Either side: the handshake failed. Carries the sender's version range.
    Refused {
        reason: RefuseReason,
        min_version: u16,
        max_version: u16,
        detail: String,
    },
    // --- link ---
    Ping {
        token: u64,
    },
    Pong {
        token: u64,
    },
    Disconnect {
        reason: DisconnectReason,
        detail: String,
    },
    StateReport(Box<StateReport>),
    // --- replicated I/O (one sequence space per link and direction) ---
    Write {
        seq: u64,
        offset: u64,
        flags: u32,
        data: Bytes,
    },
    /// Acknowledges a Write, Trim or WriteZeroes.
    WriteAck {
        seq: u64,
        status: Status,
    },
    Trim {
        seq: u64,
        offset: u64,
        len: u64,
        flags: u32,
    },
    WriteZeroes {
        seq: u64,
        offset: u64,
        len: u64,
        flags: u32,
    },
    /// Barrier + flush: every write of this link with a lower seq is durable when acked.
    Flush {
        seq: u64,
    },
    FlushAck {
        seq: u64,
        status: Status,
    },
    /// Read forwarded by a diskless node.
    ReadRequest {
        seq: u64,
        offset: u64,
        len: u32,
    },
    ReadReply {
        seq: u64,
        status: Status,
        data: Bytes,
    },
    /// Since version 4. A diskless Primary -> its diskful peers: every `Write` of this link
    /// with a lower seq is durable on every replica it was sent to (a flush covering it
    /// completed everywhere); the receiver no longer needs to mark it out of sync toward third
    /// nodes if the writer goes away.
    Settled {
        seq: u64,
    },
    /// Since version 5. A member of a dual-primary window -> the other member: give me the
    /// write token. `handoffs`: token hand-offs of this window the sender has seen.
    TokenRequest {
        handoffs: u64,
    },
    /// Since version 5. The token holder -> the other member, after its `StateReport` with
    /// role Secondary: the token is yours (`handoffs` counts this hand-off).
    TokenGrant {
        handoffs: u64,
    },
    // --- resync and verify ---
    /// Source -> target: a resync starts; on success the target adopts `generation`.
    ResyncBegin {
        generation: Generation,
        bytes: u64,
    },
    ResyncEnd {
        generation: Generation,
        status: Status,
    },
    /// Target -> source.
    ResyncRequest {
        id: u64,
        offset: u64,
        len: u32,
    },
    /// Source -> target.
    ResyncData {
        id: u64,
        offset: u64,
        status: Status,
        flags: u32,
        len: u32,
        data: Bytes,
    },
    ChecksumRequest {
        id: u64,
        offset: u64,
        len: u32,
        block_size: u32,
        alg: ChecksumAlg,
        purpose: ChecksumPurpose,
    },
    /// One digest per block of the request, in order.
    ChecksumReply {
        id: u64,
        offset: u64,
        block_size: u32,
        alg: ChecksumAlg,
        status: Status,
        digests: Vec<Digest>,
    },
    /// Ranges the sender knows differ between the two replicas.
    OutOfSync {
        flags: u32,
        ranges: Vec<ByteRange>,
    },
}

/// A message failed its field constraints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("invalid {ty}: {detail}")]
    Invalid { ty: MessageType, detail: String },
    #[error("{ty} payload of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        ty: MessageType,
        len: usize,
        max: usize,
    },
}

fn check(cond: bool, detail: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(detail()) }
}

fn check_id(field: &str, s: &str) -> Result<(), String> {
    check(!s.is_empty() && s.len() <= MAX_ID_LEN, || {
        format!("{field} must be 1..={MAX_ID_LEN} bytes, is {}", s.len())
    })
}

fn check_detail(s: &str) -> Result<(), String> {
    check(s.len() <= MAX_DETAIL_LEN, || {
        format!("detail longer than {MAX_DETAIL_LEN} bytes")
    })
}

fn check_node(field: &str, n: NodeId) -> Result<(), String> {
    check(n <= MAX_NODE_ID, || {
        format!("{field} {n} is above {MAX_NODE_ID}")
    })
}

fn check_range(offset: u64, len: u64) -> Result<(), String> {
    check(len > 0, || "length is 0".into())?;
    check(offset.checked_add(len).is_some(), || {
        format!("range {offset}+{len} overflows")
    })
}

fn check_data_len(len: u64) -> Result<(), String> {
    check(len <= MAX_DATA as u64, || {
        format!("length {len} exceeds {MAX_DATA}")
    })
}

fn check_flags(flags: u32, known: u32) -> Result<(), String> {
    check(flags & !known == 0, || format!("unknown flags {flags:#x}"))
}

fn check_versions(min: u16, max: u16) -> Result<(), String> {
    check(min >= 1 && min <= max, || {
        format!("bad version range {min}..={max}")
    })
}

fn check_block_size(bs: u32) -> Result<(), String> {
    check(
        bs.is_power_of_two() && (MIN_CHECKSUM_BLOCK..=MAX_CHECKSUM_BLOCK).contains(&bs),
        || {
            format!(
                "block size {bs} is not a power of two in {MIN_CHECKSUM_BLOCK}..={MAX_CHECKSUM_BLOCK}"
            )
        },
    )
}

/// Blocks of `block_size` covering `len` bytes.
pub fn blocks_for(len: u32, block_size: u32) -> u32 {
    len.div_ceil(block_size)
}

impl Message {
    pub fn message_type(&self) -> MessageType {
        use MessageType as T;
        match self {
            Message::Hello(_) => T::Hello,
            Message::Challenge { .. } => T::Challenge,
            Message::Auth { .. } => T::Auth,
            Message::Welcome { .. } => T::Welcome,
            Message::Refused { .. } => T::Refused,
            Message::Ping { .. } => T::Ping,
            Message::Pong { .. } => T::Pong,
            Message::Disconnect { .. } => T::Disconnect,
            Message::StateReport(_) => T::StateReport,
            Message::Write { .. } => T::Write,
            Message::WriteAck { .. } => T::WriteAck,
            Message::Trim { .. } => T::Trim,
            Message::WriteZeroes { .. } => T::WriteZeroes,
            Message::Flush { .. } => T::Flush,
            Message::FlushAck { .. } => T::FlushAck,
            Message::ReadRequest { .. } => T::ReadRequest,
            Message::ReadReply { .. } => T::ReadReply,
            Message::Settled { .. } => T::Settled,
            Message::TokenRequest { .. } => T::TokenRequest,
            Message::TokenGrant { .. } => T::TokenGrant,
            Message::ResyncBegin { .. } => T::ResyncBegin,
            Message::ResyncEnd { .. } => T::ResyncEnd,
            Message::ResyncRequest { .. } => T::ResyncRequest,
            Message::ResyncData { .. } => T::ResyncData,
            Message::ChecksumRequest { .. } => T::ChecksumRequest,
            Message::ChecksumReply { .. } => T::ChecksumReply,
            Message::OutOfSync { .. } => T::OutOfSync,
        }
    }

    /// Field constraints, checked on encode and after decode.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Message::Hello(h) => {
                check_versions(h.min_version, h.max_version)?;
                check_node("from_node", h.from_node)?;
                check_node("to_node", h.to_node)?;
                check(h.from_node != h.to_node, || {
                    "from_node equals to_node".into()
                })?;
                check_id("cluster_id", &h.cluster_id)?;
                check_id("volume_name", &h.volume_name)?;
                check_id("volume_uuid", &h.volume_uuid)
            }
            Message::Challenge {
                min_version,
                max_version,
                version,
                ..
            } => {
                check_versions(*min_version, *max_version)?;
                check((*min_version..=*max_version).contains(version), || {
                    format!("chosen version {version} outside {min_version}..={max_version}")
                })
            }
            Message::Auth { .. } | Message::Welcome { .. } => Ok(()),
            Message::Refused {
                min_version,
                max_version,
                detail,
                ..
            } => {
                check_versions(*min_version, *max_version)?;
                check_detail(detail)
            }
            Message::Ping { .. } | Message::Pong { .. } => Ok(()),
            Message::Disconnect { detail, .. } => check_detail(detail),
            Message::StateReport(s) => {
                check_node("node_id", s.node_id)?;
                check(s.quorum.reachable <= s.quorum.voters, || {
                    "more reachable voters than voters".into()
                })?;
                check_flags(s.flags, state_flags::ALL)?;
                check_node("outdated_by", s.outdated_by)?;
                check(s.peer_bitmaps.len() <= MAX_NODE_ID as usize, || {
                    "more than 31 peer bitmaps".into()
                })?;
                s.peer_bitmaps
                    .iter()
                    .try_for_each(|p| check_node("peer bitmap node", p.node))
            }
            Message::Write {
                offset,
                flags,
                data,
                ..
            } => {
                check_flags(*flags, write_flags::FUA)?;
                check_data_len(data.len() as u64)?;
                check_range(*offset, data.len() as u64)
            }
            Message::WriteAck { .. }
            | Message::Flush { .. }
            | Message::FlushAck { .. }
            | Message::Settled { .. }
            | Message::TokenRequest { .. }
            | Message::TokenGrant { .. } => Ok(()),
            Message::Trim {
                offset, len, flags, ..
            } => {
                check_flags(*flags, write_flags::FUA)?;
                check_range(*offset, *len)
            }
            Message::WriteZeroes {
                offset, len, flags, ..
            } => {
                check_flags(*flags, write_flags::FUA | write_flags::NO_HOLE)?;
                check_range(*offset, *len)
            }
            Message::ReadRequest { offset, len, .. }
            | Message::ResyncRequest { offset, len, .. } => {
                check_data_len(u64::from(*len))?;
                check_range(*offset, u64::from(*len))
            }
            Message::ReadReply { status, data, .. } => {
                check_data_len(data.len() as u64)?;
                check(*status == Status::Ok || data.is_empty(), || {
                    "data with a failed status".into()
                })
            }
            Message::ResyncBegin { .. } | Message::ResyncEnd { .. } => Ok(()),
            Message::ResyncData {
                offset,
                status,
                flags,
                len,
                data,
                ..
            } => {
                check_flags(*flags, resync_flags::ZERO)?;
                check_data_len(u64::from(*len))?;
                check_range(*offset, u64::from(*len))?;
                if *status != Status::Ok || flags & resync_flags::ZERO != 0 {
                    check(data.is_empty(), || {
                        "data with a failed status or ZERO flag".into()
                    })?;
                    check(*status == Status::Ok || *flags == 0, || {
                        "flags with a failed status".into()
                    })
                } else {
                    check(data.len() == *len as usize, || {
                        format!("{} data bytes for length {len}", data.len())
                    })
                }
            }
            Message::ChecksumRequest {
                offset,
                len,
                block_size,
                ..
            } => {
                check_block_size(*block_size)?;
                check(*len <= MAX_CHECKSUM_SPAN, || {
                    format!("length {len} exceeds {MAX_CHECKSUM_SPAN}")
                })?;
                check_range(*offset, u64::from(*len))
            }
            Message::ChecksumReply {
                block_size,
                status,
                digests,
                ..
            } => {
                check_block_size(*block_size)?;
                let max = (MAX_CHECKSUM_SPAN / MIN_CHECKSUM_BLOCK) as usize;
                check(digests.len() <= max, || format!("more than {max} digests"))?;
                check(*status == Status::Ok || digests.is_empty(), || {
                    "digests with a failed status".into()
                })
            }
            Message::OutOfSync { flags, ranges } => {
                check_flags(
                    *flags,
                    oos_flags::END_OF_BITMAP | oos_flags::THIRD_NODE | oos_flags::THIRD_NODE_MASK,
                )?;
                check(ranges.len() <= MAX_OOS_RANGES, || {
                    format!("more than {MAX_OOS_RANGES} ranges")
                })?;
                ranges.iter().try_for_each(|r| check_range(r.offset, r.len))
            }
        }
    }

    /// Writes the payload: the fixed part into `out`, and returns the bulk data that follows
    /// it, if any (so a sender can write it without copying). Call [`Message::validate`] first.
    pub(crate) fn encode_payload<'a>(
        &'a self,
        version: ProtocolVersion,
        out: &mut Vec<u8>,
    ) -> Option<&'a Bytes> {
        match self {
            Message::Hello(h) => {
                out.put_u16_le(h.min_version);
                out.put_u16_le(h.max_version);
                out.put_u8(h.from_node);
                out.put_u8(h.to_node);
                out.put_slice(&h.nonce);
                put_str(out, &h.cluster_id);
                put_str(out, &h.volume_name);
                put_str(out, &h.volume_uuid);
                None
            }
            Message::Challenge {
                min_version,
                max_version,
                version,
                nonce,
            } => {
                out.put_u16_le(*min_version);
                out.put_u16_le(*max_version);
                out.put_u16_le(*version);
                out.put_slice(nonce);
                None
            }
            Message::Auth { mac } | Message::Welcome { mac } => {
                out.put_slice(mac);
                None
            }
            Message::Refused {
                reason,
                min_version,
                max_version,
                detail,
            } => {
                out.put_u16_le(reason.code());
                out.put_u16_le(*min_version);
                out.put_u16_le(*max_version);
                put_str(out, detail);
                None
            }
            Message::Ping { token } | Message::Pong { token } => {
                out.put_u64_le(*token);
                None
            }
            Message::Disconnect { reason, detail } => {
                out.put_u16_le(reason.code());
                put_str(out, detail);
                None
            }
            Message::StateReport(s) => {
                out.put_u64_le(s.seq);
                out.put_u8(s.node_id);
                out.put_u8(s.role.code());
                out.put_u8(s.disk_state.code());
                out.put_u8(u8::from(s.quorum.has_quorum));
                out.put_u8(s.quorum.voters);
                out.put_u8(s.quorum.reachable);
                out.put_u8(s.peer_bitmaps.len() as u8);
                out.put_u8(0);
                let mut flags = s.flags;
                if version < ProtocolVersion::V7 {
                    flags &= !state_flags::SETTLES;
                }
                if version < ProtocolVersion::V6 {
                    flags &= !state_flags::ADOPT_OFFER;
                }
                out.put_u32_le(flags);
                out.put_u64_le(s.size_bytes);
                out.put_u64_le(s.generations.current);
                out.put_u64_le(s.generations.bitmap);
                out.put_u64_le(s.generations.history[0]);
                out.put_u64_le(s.generations.history[1]);
                for p in &s.peer_bitmaps {
                    out.put_u8(p.node);
                    out.put_u64_le(p.generation);
                }
                if version >= ProtocolVersion::V2 {
                    out.put_u32_le(s.outdated);
                    out.put_u64_le(s.outdated_gen);
                    out.put_u8(s.outdated_by);
                }
                if version >= ProtocolVersion::V3 {
                    out.put_u64_le(s.primary_epoch);
                }
                if version >= ProtocolVersion::V9 {
                    let l = s.lost_writer.unwrap_or_default();
                    out.put_u8(u8::from(s.lost_writer.is_some()));
                    out.put_u8(l.node);
                    out.put_u64_le(l.epoch);
                    out.put_u64_le(l.seq);
                }
                None
            }
            Message::Write {
                seq,
                offset,
                flags,
                data,
            } => {
                out.put_u64_le(*seq);
                out.put_u64_le(*offset);
                out.put_u32_le(*flags);
                Some(data)
            }
            Message::WriteAck { seq, status } | Message::FlushAck { seq, status } => {
                out.put_u64_le(*seq);
                out.put_u8(status.code());
                None
            }
            Message::Trim {
                seq,
                offset,
                len,
                flags,
            }
            | Message::WriteZeroes {
                seq,
                offset,
                len,
                flags,
            } => {
                out.put_u64_le(*seq);
                out.put_u64_le(*offset);
                out.put_u64_le(*len);
                out.put_u32_le(*flags);
                None
            }
            Message::Flush { seq }
            | Message::Settled { seq }
            | Message::TokenRequest { handoffs: seq }
            | Message::TokenGrant { handoffs: seq } => {
                out.put_u64_le(*seq);
                None
            }
            Message::ReadRequest { seq, offset, len } => {
                out.put_u64_le(*seq);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
                None
            }
            Message::ReadReply { seq, status, data } => {
                out.put_u64_le(*seq);
                out.put_u8(status.code());
                Some(data)
            }
            Message::ResyncBegin { generation, bytes } => {
                out.put_u64_le(*generation);
                out.put_u64_le(*bytes);
                None
            }
            Message::ResyncEnd { generation, status } => {
                out.put_u64_le(*generation);
                out.put_u8(status.code());
                None
            }
            Message::ResyncRequest { id, offset, len } => {
                out.put_u64_le(*id);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
                None
            }
            Message::ResyncData {
                id,
                offset,
                status,
                flags,
                len,
                data,
            } => {
                out.put_u64_le(*id);
                out.put_u64_le(*offset);
                out.put_u8(status.code());
                out.put_u32_le(*flags);
                out.put_u32_le(*len);
                Some(data)
            }
            Message::ChecksumRequest {
                id,
                offset,
                len,
                block_size,
                alg,
                purpose,
            } => {
                out.put_u64_le(*id);
                out.put_u64_le(*offset);
                out.put_u32_le(*len);
                out.put_u32_le(*block_size);
                out.put_u8(alg.code());
                out.put_u8(purpose.code());
                None
            }
            Message::ChecksumReply {
                id,
                offset,
                block_size,
                alg,
                status,
                digests,
            } => {
                out.put_u64_le(*id);
                out.put_u64_le(*offset);
                out.put_u32_le(*block_size);
                out.put_u8(alg.code());
                out.put_u8(status.code());
                out.put_u32_le(digests.len() as u32);
                for d in digests {
                    out.put_slice(d);
                }
                None
            }
            Message::OutOfSync { flags, ranges } => {
                out.put_u32_le(*flags);
                out.put_u32_le(ranges.len() as u32);
                for r in ranges {
                    out.put_u64_le(r.offset);
                    out.put_u64_le(r.len);
                }
                None
            }
        }
    }

    /// Parses a payload of type `ty`, encoded with protocol `version` (0 for handshake
    /// messages). Bulk data is a slice of `payload`, not a copy.
    pub fn decode(ty: MessageType, version: u16, payload: Bytes) -> Result<Message, DecodeError> {
        crate::frame::check_version(ty, version, None)?;
        let mut r = Reader {
            ty,
            buf: payload,
            pos: 0,
        };
        let msg = decode_v1(ty, version, &mut r)?;
        r.finish()?;
        msg.validate()
            .map_err(|detail| DecodeError::Invalid { ty, detail })?;
        Ok(msg)
    }
}

/// Version 1 layouts, and the fields later versions append (`version` is the frame's).
fn decode_v1(ty: MessageType, version: u16, r: &mut Reader) -> Result<Message, DecodeError> {
    use MessageType as T;
    Ok(match ty {
        T::Hello => {
            let min_version = r.u16()?;
            let max_version = r.u16()?;
            let from_node = r.u8()?;
            let to_node = r.u8()?;
            let nonce = r.array()?;
            Message::Hello(Box::new(Hello {
                min_version,
                max_version,
                from_node,
                to_node,
                nonce,
                cluster_id: r.str()?,
                volume_name: r.str()?,
                volume_uuid: r.str()?,
            }))
        }
        T::Challenge => Message::Challenge {
            min_version: r.u16()?,
            max_version: r.u16()?,
            version: r.u16()?,
            nonce: r.array()?,
        },
        T::Auth => Message::Auth { mac: r.array()? },
        T::Welcome => Message::Welcome { mac: r.array()? },
        T::Refused => Message::Refused {
            reason: r.code(RefuseReason::from_code, "reason")?,
            min_version: r.u16()?,
            max_version: r.u16()?,
            detail: r.str()?,
        },
        T::Ping => Message::Ping { token: r.u64()? },
        T::Pong => Message::Pong { token: r.u64()? },
        T::Disconnect => Message::Disconnect {
            reason: r.code(DisconnectReason::from_code, "reason")?,
            detail: r.str()?,
        },
        T::StateReport => {
            let seq = r.u64()?;
            let node_id = r.u8()?;
            let role = r.code8(Role::from_code, "role")?;
            let disk_state = r.code8(DiskState::from_code, "disk state")?;
            let has_quorum = match r.u8()? {
                0 => false,
                1 => true,
                v => return Err(r.invalid(format!("has_quorum {v} is not 0 or 1"))),
            };
            let voters = r.u8()?;
            let reachable = r.u8()?;
            let count = r.u8()?;
            if r.u8()? != 0 {
                return Err(r.invalid("reserved byte is not 0".into()));
            }
            let flags = r.u32()?;
            let size_bytes = r.u64()?;
            let generations = Generations {
                current: r.u64()?,
                bitmap: r.u64()?,
                history: [r.u64()?, r.u64()?],
            };
            let mut peer_bitmaps = Vec::with_capacity(count as usize);
            for _ in 0..count {
                peer_bitmaps.push(PeerBitmap {
                    node: r.u8()?,
                    generation: r.u64()?,
                });
            }
            let (outdated, outdated_gen, outdated_by) = if version >= ProtocolVersion::V2.number() {
                (r.u32()?, r.u64()?, r.u8()?)
            } else {
                (0, 0, 0)
            };
            let primary_epoch = if version >= ProtocolVersion::V3.number() {
                r.u64()?
            } else {
                0
            };
            let lost_writer = if version >= ProtocolVersion::V9.number() {
                let present = match r.u8()? {
                    0 => false,
                    1 => true,
                    v => return Err(r.invalid(format!("lost_writer presence {v} is not 0 or 1"))),
                };
                let l = LostWriter {
                    node: r.u8()?,
                    epoch: r.u64()?,
                    seq: r.u64()?,
                };
                present.then_some(l)
            } else {
                None
            };
            Message::StateReport(Box::new(StateReport {
                seq,
                node_id,
                role,
                disk_state,
                quorum: QuorumInfo {
                    has_quorum,
                    voters,
                    reachable,
                },
                flags,
                size_bytes,
                generations,
                peer_bitmaps,
                outdated,
                outdated_gen,
                outdated_by,
                primary_epoch,
                lost_writer,
            }))
        }
        T::Write => Message::Write {
            seq: r.u64()?,
            offset: r.u64()?,
            flags: r.u32()?,
            data: r.rest(),
        },
        T::WriteAck => Message::WriteAck {
            seq: r.u64()?,
            status: r.code8(Status::from_code, "status")?,
        },
        T::Trim => Message::Trim {
            seq: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
            flags: r.u32()?,
        },
        T::WriteZeroes => Message::WriteZeroes {
            seq: r.u64()?,
            offset: r.u64()?,
            len: r.u64()?,
            flags: r.u32()?,
        },
        T::Flush => Message::Flush { seq: r.u64()? },
        T::Settled => Message::Settled { seq: r.u64()? },
        T::TokenRequest => Message::TokenRequest { handoffs: r.u64()? },
        T::TokenGrant => Message::TokenGrant { handoffs: r.u64()? },
        T::FlushAck => Message::FlushAck {
            seq: r.u64()?,
            status: r.code8(Status::from_code, "status")?,
        },
        T::ReadRequest => Message::ReadRequest {
            seq: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        T::ReadReply => Message::ReadReply {
            seq: r.u64()?,
            status: r.code8(Status::from_code, "status")?,
            data: r.rest(),
        },
        T::ResyncBegin => Message::ResyncBegin {
            generation: r.u64()?,
            bytes: r.u64()?,
        },
        T::ResyncEnd => Message::ResyncEnd {
            generation: r.u64()?,
            status: r.code8(Status::from_code, "status")?,
        },
        T::ResyncRequest => Message::ResyncRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
        },
        T::ResyncData => Message::ResyncData {
            id: r.u64()?,
            offset: r.u64()?,
            status: r.code8(Status::from_code, "status")?,
            flags: r.u32()?,
            len: r.u32()?,
            data: r.rest(),
        },
        T::ChecksumRequest => Message::ChecksumRequest {
            id: r.u64()?,
            offset: r.u64()?,
            len: r.u32()?,
            block_size: r.u32()?,
            alg: r.code8(ChecksumAlg::from_code, "checksum algorithm")?,
            purpose: r.code8(ChecksumPurpose::from_code, "checksum purpose")?,
        },
        T::ChecksumReply => {
            let id = r.u64()?;
            let offset = r.u64()?;
            let block_size = r.u32()?;
            let alg = r.code8(ChecksumAlg::from_code, "checksum algorithm")?;
            let status = r.code8(Status::from_code, "status")?;
            let count = r.u32()? as usize;
            if count > r.remaining() / DIGEST_LEN {
                return Err(DecodeError::Truncated { ty });
            }
            let mut digests = Vec::with_capacity(count);
            for _ in 0..count {
                digests.push(r.array()?);
            }
            Message::ChecksumReply {
                id,
                offset,
                block_size,
                alg,
                status,
                digests,
            }
        }
        T::OutOfSync => {
            let flags = r.u32()?;
            let count = r.u32()? as usize;
            if count > r.remaining() / 16 {
                return Err(DecodeError::Truncated { ty });
            }
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                ranges.push(ByteRange {
                    offset: r.u64()?,
                    len: r.u64()?,
                });
            }
            Message::OutOfSync { flags, ranges }
        }
    })
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Validated to at most MAX_DETAIL_LEN bytes before encoding.
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

struct Reader {
    ty: MessageType,
    buf: Bytes,
    pos: usize,
}

impl Reader {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated { ty: self.ty });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_le_bytes)
    }

    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        if n > MAX_DETAIL_LEN {
            return Err(self.invalid(format!("string of {n} bytes")));
        }
        let b = self.take(n)?.to_vec();
        String::from_utf8(b).map_err(|_| self.invalid("string is not UTF-8".into()))
    }

    fn code<T>(&mut self, f: fn(u16) -> Option<T>, what: &str) -> Result<T, DecodeError> {
        let c = self.u16()?;
        f(c).ok_or_else(|| self.invalid(format!("unknown {what} code {c}")))
    }

    fn code8<T>(&mut self, f: fn(u8) -> Option<T>, what: &str) -> Result<T, DecodeError> {
        let c = self.u8()?;
        f(c).ok_or_else(|| self.invalid(format!("unknown {what} code {c}")))
    }

    /// The rest of the payload, shared with the frame.
    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }

    fn invalid(&self, detail: String) -> DecodeError {
        DecodeError::Invalid {
            ty: self.ty,
            detail,
        }
    }

    fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { ty: self.ty, extra }),
        }
    }
}

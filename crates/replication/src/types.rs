//! Inputs, outputs and persistent state of the engine.

use std::collections::BTreeMap;

use bytes::Bytes;
use tandem_repl_proto::{Digest, DisconnectReason, DiskState, Generation, Message, NodeId};

use crate::bitmap::Bitmap;
use crate::decide::{Rule, SyncDecision};

/// Nanoseconds on the driver's monotonic clock. The engine never reads a clock.
pub type Nanos = u64;
/// A consumer request id, chosen by the driver, echoed in [`Action::Complete`].
pub type RequestId = u64;
/// A local disk I/O id, chosen by the engine, echoed in the `Disk*Done` events.
pub type IoId = u64;

/// Replication protocol (DRBD's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Asynchronous: a write completes after the local write; the tail is lost on failover.
    A,
    /// Synchronous (default): a write completes when every connected replica has it.
    C,
}

/// One other node of the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConfig {
    pub node_id: NodeId,
    /// false: a witness (diskless voter).
    pub diskful: bool,
}

/// Static configuration of one node's engine for one volume.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_id: NodeId,
    /// false: this node is a witness (diskless voter, no data, never Primary).
    pub diskful: bool,
    pub peers: Vec<PeerConfig>,
    pub size_bytes: u64,
    pub protocol: Protocol,
    /// Bytes per out-of-sync bit (4096).
    pub bitmap_granularity: u32,
    /// Bytes per activity-log extent (4 MiB like DRBD).
    pub al_extent_bytes: u64,
    /// Hot extents kept before cold ones are evicted.
    pub al_extents: usize,
    /// Resync rate limit in bytes/s on the sync target; 0 = unlimited.
    pub resync_rate: u64,
    /// The dynamic resync controller (DRBD's `c-min-rate` in spirit): while the consumer does
    /// I/O on this volume (more than [`crate::APP_IO_THRESHOLD`] bytes within the last
    /// [`crate::APP_IO_WINDOW`] seen by the sync target: its own consumer's requests and the
    /// Primary's replicated writes), the resync runs at most at this rate, so it yields to
    /// the consumer; at full `resync_rate` again once the consumer is idle. 0 = never yield.
    pub resync_min_rate: u64,
    /// Largest resync request.
    pub resync_chunk: u32,
    /// Resync requests in flight.
    pub resync_max_inflight: usize,
    /// Engine-level keepalive: a Ping after this much silence; 0 (the default) disables it.
    /// Keepalive belongs to the transport (`tandem-transport` answers its own Ping/Pong and
    /// reports dead links as `PeerDown`). Independent of this setting the engine always sends
    /// the quorum *role-change barrier*: a `Ping` after each `StateReport` that follows a role
    /// change or a new link; a peer counts toward quorum only once it answered it.
    pub ping_interval: Nanos,
    /// With `ping_interval > 0`: a link silent for this long is closed with
    /// `Disconnect{Timeout}`.
    pub ping_timeout: Nanos,
    /// Entropy for new generation identifiers (the driver passes random bytes; the simulator
    /// a seeded value). Mixed with the node id, the clock and a counter.
    pub entropy: u64,
    /// Online verify: bytes compared per `ChecksumRequest` (1 MiB).
    pub verify_chunk: u32,
    /// Online verify: requests in flight.
    pub verify_max_inflight: usize,
    /// What a handshake that finds split brain does (both ends of a volume must use the same).
    pub after_split_brain: SplitBrainPolicy,
    /// Checksum-based resync (target side): compare digests of each chunk with the source's
    /// first and transfer only the blocks that differ (DRBD's `csums-alg`). Saves bandwidth
    /// when much of what is out of sync is in fact identical (full resyncs, lost bitmaps).
    pub resync_checksums: bool,
    /// The dual-primary window is open for this volume (live migration): a second node may
    /// become Primary while one is, and the two hand the write token back and forth (see
    /// `docs/replication.md`, "Dual-primary window"). Protocol C only. Changed while running
    /// with [`crate::Engine::set_allow_two_primaries`].
    pub allow_two_primaries: bool,
    /// What a Primary does with consumer requests while it has no quorum (DRBD's
    /// `on-no-quorum`). Changed while running with [`crate::Engine::set_on_no_quorum`].
    pub on_no_quorum: OnNoQuorum,
    /// A Primary flushes its peers on its own once one of them has acknowledged this many
    /// writes that no flush covers yet (DRBD closes an epoch with a barrier after
    /// `max-epoch-size` writes). Until a flush covers them, the Primary remembers each such
    /// write (to mark it out of sync should the peer crash), and the peers of a diskless
    /// Primary remember each of its writes (`Settled` comes after a flush): without this
    /// bound a consumer that never flushes would grow both without end.
    pub flush_after_writes: usize,
}

/// What a Primary without quorum does with consumer requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnNoQuorum {
    /// Fail them (EIO) once quorum cannot come back over the current links (the default).
    #[default]
    IoError,
    /// Hold them: nothing completes, nothing fails, until quorum is back (then they complete)
    /// or the node stops being Primary (then they fail). The consumer sees its I/O hang, as
    /// with a lost path to a SAN.
    Suspend,
}

/// The dynamic resync controller's window: consumer I/O is counted per window of this length
/// (100 ms); the current and the previous window decide whether the consumer is busy.
pub const APP_IO_WINDOW: Nanos = 100_000_000;
/// Consumer bytes within the current and previous [`APP_IO_WINDOW`] above which the resync
/// yields (64 KiB: a trickle of metadata writes does not slow a resync down).
pub const APP_IO_THRESHOLD: u64 = 64 << 10;

/// Automatic split-brain policy (DRBD's `after-sb-*` in spirit). Whatever the policy, data is
/// never merged: one side's changes since the split are discarded, or the link stays down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SplitBrainPolicy {
    /// Stay disconnected (`reconnect: false`) until an operator resolves it.
    #[default]
    Disconnect,
    /// The side that wrote nothing since the split (no out-of-sync bits toward the other)
    /// becomes sync target; if both wrote, disconnect.
    DiscardZeroChanges,
    /// This node's changes are discarded whenever it is in a split brain.
    DiscardNode(NodeId),
    /// The side that became Primary more recently (higher promotion epoch) discards its
    /// changes; the one that was Primary before the split keeps them. Equal epochs (both
    /// promoted having seen the same history) are not resolved: disconnect.
    DiscardYoungerPrimary,
}

impl Config {
    /// Defaults for everything but identity and size.
    pub fn new(node_id: NodeId, diskful: bool, peers: Vec<PeerConfig>, size_bytes: u64) -> Config {
        Config {
            node_id,
            diskful,
            peers,
            size_bytes,
            protocol: Protocol::C,
            bitmap_granularity: 4096,
            al_extent_bytes: 4 << 20,
            al_extents: 1237,
            resync_rate: 0,
            resync_min_rate: 0,
            resync_chunk: 128 << 10,
            resync_max_inflight: 8,
            ping_interval: 0,
            ping_timeout: 10_000_000_000,
            entropy: 0,
            verify_chunk: 1 << 20,
            verify_max_inflight: 4,
            after_split_brain: SplitBrainPolicy::Disconnect,
            resync_checksums: false,
            allow_two_primaries: false,
            on_no_quorum: OnNoQuorum::IoError,
            flush_after_writes: 16384,
        }
    }
}

/// The replica's persistent metadata, as the engine wants it stored ([`Action::PersistMeta`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub disk_state: DiskState,
    /// Role when written; still true at start means the node crashed as Primary.
    pub primary: bool,
    pub current: Generation,
    /// Previous current generations, newest first.
    pub history: [Generation; 2],
    /// Per diskful peer: our current generation when we were last in sync (0 = in sync).
    pub peer_bitmap_gens: BTreeMap<NodeId, Generation>,
    /// Promotion epoch: one more than the highest epoch this node had seen (its own and its
    /// peers' reports) when it last became Primary; 0 = never. Of two sides of a split brain
    /// the higher epoch became Primary more recently (`discard-younger-primary`).
    pub primary_epoch: u64,
}

/// Everything the driver persisted, handed back to [`crate::Engine::new`] at start.
#[derive(Debug, Clone)]
pub struct Persisted {
    pub meta: Meta,
    /// Out-of-sync bitmap per diskful peer.
    pub bitmaps: BTreeMap<NodeId, Bitmap>,
    /// Hot activity-log extents (extent numbers).
    pub activity_log: Vec<u64>,
}

impl Persisted {
    /// A new replica of a new volume: UpToDate at `generation`, which every replica of the
    /// volume shares (day 0: no initial sync), clear bitmaps, empty activity log. A witness
    /// gets `Diskless` and no bitmaps.
    pub fn new_volume(config: &Config, generation: Generation) -> Persisted {
        let mut bitmaps = BTreeMap::new();
        let mut gens = BTreeMap::new();
        if config.diskful {
            for p in config.peers.iter().filter(|p| p.diskful) {
                bitmaps.insert(
                    p.node_id,
                    Bitmap::new(config.size_bytes, config.bitmap_granularity),
                );
                gens.insert(p.node_id, 0);
            }
        }
        Persisted {
            meta: Meta {
                disk_state: if config.diskful {
                    DiskState::UpToDate
                } else {
                    DiskState::Diskless
                },
                primary: false,
                current: if config.diskful { generation } else { 0 },
                history: [0, 0],
                peer_bitmap_gens: gens,
                primary_epoch: 0,
            },
            bitmaps,
            activity_log: Vec::new(),
        }
    }
}

/// Inputs of [`crate::Engine::handle`].
#[derive(Debug, Clone)]
pub enum Event {
    /// Consumer write. `fua`: durable before completion.
    Write {
        id: RequestId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    /// Consumer flush: completes when every write completed before it is durable on every
    /// connected replica.
    Flush { id: RequestId },
    Read {
        id: RequestId,
        offset: u64,
        len: u32,
    },
    DiskWriteDone {
        io: IoId,
        result: Result<(), DiskError>,
    },
    DiskFlushDone {
        io: IoId,
        result: Result<(), DiskError>,
    },
    DiskReadDone {
        io: IoId,
        result: Result<Bytes, DiskError>,
    },
    /// A link to `peer` is established and authenticated. The driver delivers `PeerDown` for
    /// a previous link to the same peer before the `PeerUp` of a new one.
    PeerUp { peer: NodeId },
    /// A message from `peer`, in the order the link delivered them.
    PeerMessage { peer: NodeId, msg: Message },
    /// The link to `peer` is gone (any reason). Messages of that link not yet delivered are lost.
    PeerDown { peer: NodeId },
    /// Time passed (resync pacing, keepalive). Call often enough (e.g. every 10-100 ms).
    Tick,
    /// Change the resync rate (bytes/s, 0 = unlimited), effective immediately.
    SetResyncRate { bytes_per_sec: u64 },
    /// Change [`Config::resync_min_rate`] (the dynamic controller's floor) while running.
    SetResyncMinRate { bytes_per_sec: u64 },
    /// Completion of an [`Action::DiskChecksum`]: one digest per block, in order.
    DiskChecksumDone {
        io: IoId,
        result: Result<Vec<Digest>, DiskError>,
    },
    /// The local replica now has `size_bytes` (online resize). Grow: the driver extended
    /// the backing store (reading as zeros) and committed the size in its metadata before
    /// this event. Shrink: deliver this event first, then cut the backing store. The engine
    /// resizes its bitmaps (new blocks in sync: they read as zeros everywhere) and advertises
    /// the size to its peers in a `StateReport`. Consumer I/O is limited to
    /// [`crate::Engine::usable_size`].
    Resize { size_bytes: u64 },
    /// The local backing store failed (an I/O error outside the engine's own disk I/O, e.g.
    /// persisting metadata or a bitmap). The engine **detaches** the disk (DRBD's
    /// `on-io-error detach`): disk state `Failed`, never read or written again by this engine
    /// (the driver's restart with a healthy disk re-attaches it, Outdated until resynced);
    /// consumer writes go to the peers that hold our data, reads are forwarded to one of
    /// them. A `Disk*Done` with an error detaches the same way.
    DiskFailed { reason: String },
}

/// A local disk error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk I/O error: {0}")]
pub struct DiskError(pub String);

/// Why a consumer request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("this node is not Primary")]
    NotPrimary,
    #[error("no quorum: {reachable} of {voters} voters reachable (on-no-quorum=io-error)")]
    NoQuorum { reachable: u8, voters: u8 },
    #[error("request outside the volume")]
    OutOfRange,
    #[error("local data is not UpToDate")]
    NotUpToDate,
    #[error("I/O error: {0}")]
    Io(String),
    #[error("not supported")]
    NotSupported,
}

/// A successful consumer completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Done,
    Data(Bytes),
}

/// Log severity of [`Action::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// Outputs of the engine.
///
/// **Ordering contract.** The driver executes the actions of one `handle` call in order and
/// the calls in order:
/// * `PersistMeta`, `PersistBits`, `PersistActivityLog` must be **durable before the driver
///   starts any later action** (of this call or a later one). The engine relies on it: bits
///   and the activity log are persisted before the disk write they cover, the Inconsistent
///   state before the first resync write, a new generation before the writes made under it.
/// * `DiskWrite`, `DiskRead`, `DiskFlush` are started in order and may complete in any order;
///   each completion comes back as exactly one `Disk*Done` event. A `DiskFlush` must make
///   durable every write whose completion was reported before the flush was started.
/// * `Send` appends to the link's FIFO (a lost message breaks the link: `PeerDown`).
///   `Disconnect` closes the link after the messages already queued on it.
/// * `Complete` answers the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    DiskWrite {
        io: IoId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    DiskRead {
        io: IoId,
        offset: u64,
        len: u32,
    },
    DiskFlush {
        io: IoId,
    },
    /// Read `len` bytes at `offset` and digest them per `block_size` block (the last one may
    /// be short) with [`tandem_repl_proto::ChecksumAlg::Blake3`]; answer with
    /// [`Event::DiskChecksumDone`]. Online verify: the data never passes through the engine.
    /// Ordered like `DiskRead`.
    DiskChecksum {
        io: IoId,
        offset: u64,
        len: u32,
        block_size: u32,
    },
    Send {
        peer: NodeId,
        msg: Message,
    },
    /// Close the link to `peer`. `reconnect`: whether the driver should try again later
    /// (false after split brain or unrelated data: an operator must act).
    Disconnect {
        peer: NodeId,
        reason: DisconnectReason,
        reconnect: bool,
    },
    Complete {
        id: RequestId,
        result: Result<Reply, RequestError>,
    },
    PersistMeta(Meta),
    /// Set (or clear) `count` bits from `first` in the bitmap toward `peer`.
    PersistBits {
        peer: NodeId,
        set: bool,
        first: u64,
        count: u64,
    },
    /// The whole set of hot activity-log extents.
    PersistActivityLog(Vec<u64>),
    Log {
        level: Level,
        msg: String,
    },
}

/// Role of this node.
pub use tandem_repl_proto::Role;

/// Replication state toward one peer (DRBD's names where they apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplState {
    /// No link.
    Off,
    /// Link up, exchanging state and bitmaps.
    Connecting,
    /// In sync (or the link is to/from a witness).
    Established,
    SyncSource,
    SyncTarget,
    /// A resync is needed but waits (another resync runs, or no side has good data).
    PausedSync,
}

/// Per-peer status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub node_id: NodeId,
    pub diskful: bool,
    pub connected: bool,
    pub repl_state: ReplState,
    pub role: Option<Role>,
    pub disk_state: Option<DiskState>,
    /// Bytes our bitmap toward this peer marks out of sync.
    pub out_of_sync_bytes: u64,
    /// The decision of the last handshake and the rule that decided it.
    pub last_decision: Option<(SyncDecision, Rule)>,
    /// The split brain the last handshake with it found, until settled.
    pub split_brain: Option<SplitBrainStatus>,
}

/// A split brain with one peer, as status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainStatus {
    /// The rule that found it.
    pub rule: Rule,
    /// Bytes we wrote since the split (our out-of-sync bits toward the peer).
    pub our_bytes: u64,
    /// Bytes the peer wrote since the split (its bits toward us at that handshake).
    pub peer_bytes: u64,
    /// How it is being resolved (policy or manual), or `None`: disconnected, waiting for an
    /// operator.
    pub resolution: Option<String>,
}

/// A snapshot for `volume show` / `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub node_id: NodeId,
    pub role: Role,
    pub disk_state: DiskState,
    pub quorum: bool,
    pub voters: u8,
    pub reachable: u8,
    pub current_generation: Generation,
    pub peers: Vec<PeerStatus>,
    /// The configured resync rate limit (bytes/s, 0 = unlimited).
    pub resync_bytes_per_sec: u64,
    /// The dynamic controller's floor ([`Config::resync_min_rate`], 0 = never yields).
    pub resync_min_bytes_per_sec: u64,
    /// A resync into this replica runs and currently yields to consumer I/O (held at
    /// `resync_min_bytes_per_sec`).
    pub resync_yielding: bool,
    /// Bytes still to transfer into this replica by the running resync, if any.
    pub resync_bytes_left: Option<u64>,
    /// Bytes transferred so far by the running resync into this replica.
    pub resync_bytes_done: u64,
    /// Bytes out of sync when the running resync started.
    pub resync_bytes_total: u64,
    /// Bytes the most recent completed resync into this replica transferred.
    pub last_resync_bytes: u64,
    /// Bytes the most recent completed checksum-based resync found identical and skipped.
    pub last_resync_skipped_bytes: u64,
    pub crashed_primary: bool,
    pub activity_log_extents: usize,
    /// The online verify running from this node, if any.
    pub verify: Option<VerifyProgress>,
    /// The last online verify this node ran (since the engine started).
    pub last_verify: Option<VerifyResult>,
    /// This node discards its changes at its next split-brain handshake (manual resolution).
    pub discard_my_data: bool,
    /// Size of the local replica.
    pub size_bytes: u64,
    /// Size consumers may use: the smallest of the local replica and every connected
    /// diskful peer (see [`crate::Engine::usable_size`]).
    pub usable_size_bytes: u64,
    /// Why the local disk was detached (disk state `Failed`), if it was.
    pub disk_failure: Option<String>,
    /// The dual-primary window is allowed ([`Config::allow_two_primaries`]).
    pub allow_two_primaries: bool,
    /// This node is one of the two Primaries of an open dual-primary window.
    pub dual_primary: Option<DualPrimary>,
    /// The on-no-quorum policy in force.
    pub on_no_quorum: OnNoQuorum,
    /// Consumer requests held for quorum ([`OnNoQuorum::Suspend`]): I/O is suspended.
    pub suspended_requests: usize,
}

/// This node's part in a dual-primary window (both nodes are Primary to their consumers;
/// the one holding the write token is the replication Primary, the other forwards nothing
/// and waits for the token before it serves a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualPrimary {
    /// The other Primary.
    pub partner: NodeId,
    /// This node holds the write token (it is the replication Primary or may become it).
    pub write_token: bool,
}

/// Progress of a running online verify (this node is the verify source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProgress {
    /// Number of the run on this engine (1, 2, ...).
    pub run: u64,
    /// Peers compared with (connected UpToDate diskful peers in sync at the start, minus those
    /// lost since).
    pub peers: Vec<NodeId>,
    /// Start a resync of the differing blocks when done.
    pub resync: bool,
    /// The volume size.
    pub bytes_total: u64,
    /// Bytes compared so far.
    pub bytes_done: u64,
    /// Bytes found different so far (union over peers).
    pub different_bytes: u64,
    /// Nanoseconds since the start (driver clock).
    pub elapsed_nanos: u64,
}

/// Outcome of an online verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyResult {
    pub run: u64,
    /// Peers compared with until the end.
    pub peers: Vec<NodeId>,
    /// Bytes compared (with every peer still in the run).
    pub checked_bytes: u64,
    /// Bytes that differ on at least one peer (4 KiB blocks).
    pub different_bytes: u64,
    /// Per peer: bytes that differ from ours.
    pub different_by_peer: Vec<(NodeId, u64)>,
    /// The first differing byte ranges (offset, len), merged, at most [`VERIFY_RANGES_MAX`].
    pub ranges: Vec<(u64, u64)>,
    /// More differing ranges exist than `ranges` holds.
    pub ranges_truncated: bool,
    /// Resyncs started toward peers with differences (`resync` requested).
    pub resync_started: Vec<NodeId>,
    /// Why the run ended early (it did not cover the whole volume), if it did.
    pub error: Option<String>,
    pub elapsed_nanos: u64,
}

/// Differing ranges a verify result keeps.
pub const VERIFY_RANGES_MAX: usize = 32;

//! The per-volume replication engine: see the crate docs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use tandem_repl_proto::message::{oos_flags, resync_flags, state_flags, write_flags};
use tandem_repl_proto::zeroes;
use tandem_repl_proto::{
    ByteRange, DisconnectReason, DiskState, Generation, Generations, LostWriter, Message, NodeId,
    PeerBitmap, QuorumInfo, Role, StateReport, Status as WireStatus,
};

use crate::bitmap::Bitmap;
use crate::decide::{Rule, SideView, SyncDecision, decide, peer_is_newer};
use crate::quorum::has_majority;
use crate::types::*;

mod split_brain;
mod suspend;
mod verify;
mod window;
pub use split_brain::ResolveError;
pub use verify::VerifyError;
pub use window::WindowError;

/// Most ranges put in one `OutOfSync` message by the engine.
const OOS_CHUNK: usize = 4096;

/// Why a promotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteError {
    #[error("node {0} is Primary")]
    PrimaryElsewhere(NodeId),
    #[error("no quorum: {reachable} of {voters} voters reachable")]
    NoQuorum { reachable: u8, voters: u8 },
    #[error("local data is {0:?}, not UpToDate")]
    NotUpToDate(DiskState),
    #[error(
        "local data is Outdated: a Primary completed writes without this node; promoting it \
         would lose them (force only when those replicas are gone for good)"
    )]
    Outdated,
    #[error("a diskless node serves data only through an UpToDate diskful peer; none is connected")]
    NoDataPeer,
    #[error(
        "connected diskful peers {0} and {1} hold different data generations and neither is \
         known to be behind the other; promote after they resynced"
    )]
    DataPeersDiffer(NodeId, NodeId),
    #[error(
        "this node crashed as Primary and has not compared its data with a diskful peer yet \
         (its disk may be stale, e.g. re-attached after an I/O error); force only when no peer \
         will come back"
    )]
    CrashedPrimaryUnchecked,
    #[error(
        "node {0} is Primary and does not allow a dual-primary window (open it with \
         allow-two-primaries on every node of the volume)"
    )]
    WindowClosedOn(NodeId),
    #[error("node {0} is Primary and already has a second Primary (a window holds two at most)")]
    WindowFull(NodeId),
    #[error(
        "node {0} is Primary and this replica is not in sync with it (a second Primary must be \
         UpToDate, connected and without out-of-sync blocks toward it)"
    )]
    NotInSyncWith(NodeId),
}

/// Why a demotion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemoteError {
    #[error("{0} consumer requests are still in flight")]
    Busy(usize),
}

/// A peer broke the protocol: the engine disconnects it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unexpected {0} from node {1}")]
    Unexpected(&'static str, NodeId),
    #[error("node {peer}: {detail}")]
    Invalid { peer: NodeId, detail: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// What an ordered operation is.
#[derive(Debug, Clone)]
enum OpKind {
    ClientWrite {
        id: RequestId,
        data: Bytes,
        fua: bool,
    },
    ClientRead {
        id: RequestId,
    },
    PeerWrite {
        peer: NodeId,
        epoch: u64,
        seq: u64,
        data: Bytes,
        fua: bool,
        /// The writer's disk was detached when the write arrived: its own disk misses it
        /// (kept here, since the write may start after the link to the writer is gone).
        writer_detached: bool,
    },
    ResyncWrite {
        peer: NodeId,
        epoch: u64,
        id: u64,
        data: Option<Bytes>,
    },
    ResyncRead {
        peer: NodeId,
        epoch: u64,
        id: u64,
    },
    /// Online verify: our digests of a chunk (see `verify`).
    VerifyLocal {
        req: u64,
    },
    /// Checksum resync: our digests of a chunk we are about to resync.
    ResyncCheckLocal {
        peer: NodeId,
        epoch: u64,
        id: u64,
    },
    /// A peer's forwarded read (`ReadRequest`: its disk is detached or it is diskless).
    PeerRead {
        peer: NodeId,
        epoch: u64,
        seq: u64,
    },
    /// Digests of our copy for a peer's `ChecksumRequest`.
    ChecksumAnswer {
        peer: NodeId,
        epoch: u64,
        id: u64,
        block_size: u32,
    },
}

#[derive(Debug, Clone)]
struct Op {
    key: u64,
    offset: u64,
    len: u64,
    access: Access,
    kind: OpKind,
}

/// A consumer write past ordering.
#[derive(Debug)]
struct ClientWriteState {
    id: RequestId,
    local_done: bool,
    local_error: Option<String>,
    waiting: BTreeSet<NodeId>,
    /// Peers that acknowledged it with Ok (with a detached disk, one of them must hold our
    /// data for the write to succeed).
    ok_from: BTreeSet<NodeId>,
    extents: Vec<u64>,
}

/// A request of a diskless Primary waiting for a peer that holds its data (`suspend`).
#[derive(Debug, Clone, Copy)]
enum Parked {
    /// A write (its op stays active, so later overlapping ones wait): sent again.
    Write(u64),
    /// A flush: a new one is sent (it covers at least what the lost one did).
    Flush(RequestId),
    /// A forwarded read whose peer went: forwarded again.
    Read(u64),
}

#[derive(Debug)]
struct ClientFlushState {
    /// `None`: the engine's own flush (see [`Config::flush_after_writes`]); nobody waits
    /// for it.
    id: Option<RequestId>,
    local_done: bool,
    local_error: Option<String>,
    waiting: BTreeSet<NodeId>,
    /// Peers that made it durable (see `ClientWriteState::ok_from`).
    ok_from: BTreeSet<NodeId>,
    seq: u64,
    /// The peers it was sent to (a diskless Primary declares the writes before it `Settled`
    /// only when every peer that receives writes now was one of them).
    targets: BTreeSet<NodeId>,
}

#[derive(Debug)]
enum IoPurpose {
    Op(u64),
    ClientFlush { key: u64, upto: u64 },
    PeerFlush { peer: NodeId, epoch: u64, seq: u64 },
    ResyncFinishFlush { peer: NodeId, epoch: u64 },
    AlFlush { upto: u64 },
    DemoteFlush { upto: u64 },
}

#[derive(Debug)]
struct ResyncTarget {
    cursor: u64,
    inflight: BTreeMap<u64, (u64, u64)>,
    next_id: u64,
    tokens: u64,
    last_refill: Nanos,
    total: u64,
    done: u64,
    finishing: bool,
    /// Blocks (bits) a replicated write covered during this resync: current now, so resync
    /// data already in flight for them is stale and dropped.
    fenced: BTreeSet<u64>,
    /// The source confirmed with `ResyncBegin`. Only then do we become Inconsistent and may
    /// finish: if both ends decided from different snapshots and both think they are the
    /// target, our requests make the other end disconnect before either side gave up its
    /// good data.
    begun: bool,
    /// Our current generation when the handshake made us the target. Until `begun` we are
    /// UpToDate and may adopt a Primary's new generation (its writes reach us, maybe not the
    /// source): the decision was made on data we no longer have, so we compare again.
    decided_at: Generation,
    /// Checksum-based resync (`Config::resync_checksums`): chunks whose digests are being
    /// compared before any data is requested (see `verify.rs`, "checksum resync").
    checks: BTreeMap<u64, verify::ResyncCheck>,
    /// The source answered a checksum request with a refusal: plain resync from now on.
    no_checksums: bool,
    /// Bytes found identical by checksum and not transferred.
    skipped: u64,
    /// Blocks marked again by the source (`late_marks`) while resync data for them that it
    /// sent earlier (older) was still being written here: those writes must not clear them.
    /// Per block, how many such writes are still to complete (two requests for the same
    /// blocks can be in flight: each must leave the mark).
    remark: BTreeMap<u64, u32>,
    /// The source's `ResyncEnd` came while this resync was still finishing here (it took an
    /// UpToDate report of ours, from another resync into us, as the end): the end is
    /// confirmed already when it finishes.
    end_received: bool,
}

#[derive(Debug)]
struct Conn {
    epoch: u64,
    report: Option<StateReport>,
    bitmap_rx: Vec<ByteRange>,
    bitmap_done: bool,
    state: ReplState,
    decision: Option<(SyncDecision, Rule)>,
    pong: u64,
    barrier: u64,
    /// As sync source of this link's handshake resync: the token of the `Ping` sent right
    /// after our `ResyncBegin`. A report that arrives before its `Pong` may predate the
    /// peer's `ResyncBegin` (an UpToDate it was about to give up) and does not end the
    /// resync (simulator seed 390); its latest report is looked at again when the `Pong`
    /// comes (`end_deferred`: one arrived meanwhile). 0: none.
    begin_ping: u64,
    end_deferred: bool,
    last_rx: Nanos,
    last_tx: Nanos,
    /// Writes sent to this peer awaiting its ack: seq -> (offset, len).
    unacked: BTreeMap<u64, (u64, u64)>,
    /// Writes it acked that no FlushAck covers yet: seq -> (offset, len).
    unflushed: BTreeMap<u64, (u64, u64)>,
    /// Peer writes received from it and not yet completed (for its flush barriers).
    rx_inflight: BTreeSet<u64>,
    /// Its flushes waiting for earlier writes.
    rx_flush_wait: Vec<u64>,
    resync: Option<ResyncTarget>,
    /// We are its full-resync source by rule `NewMember` (every bit set toward it) and it has
    /// not asked for a block yet (it may be pulling from another replica, our link paused).
    full_marks: bool,
    /// Our disk is detached (Failed) and this peer holds our data: it was in sync when we
    /// detached (or its handshake since found it at our generation with nothing out of sync).
    /// Only such peers receive our writes, serve our reads and make a write succeed.
    /// A diskless Primary uses the same flag: the peers that hold the volume's current data.
    serves: bool,
    /// Writes received from this peer while it is a diskless Primary that it has not
    /// declared `Settled` yet (seq -> range): they may be missing on another diskful replica,
    /// so if the writer goes away, or starts a generation without a replica, they are marked
    /// out of sync toward it (the diskless Primary keeps no bitmap of its own).
    unsettled: BTreeMap<u64, (u64, u64)>,
    /// Writes received from this peer while it is a Primary with a disk of its own that it
    /// has not declared `Settled` yet (protocol version 7, see `Engine::keeps_unsettled`):
    /// marked toward the other diskful replicas only if the link to it goes down (it may have
    /// crashed with a write on its way to them). Its own bitmap covers everything else.
    unsettled_diskful: BTreeMap<u64, (u64, u64)>,
    /// The highest sequence number of a write received from it on this link (its writes are
    /// numbered once for all its peers): recorded in `Engine::lost_writer` when the link to
    /// it, as Primary, goes down.
    rx_write_seq: u64,
    /// We are its sync source: writes of a diskless Primary we applied since the handshake
    /// (that Primary may not write to it: the resync must fetch them, see `late_marks`).
    late: Vec<(u64, u64)>,
    /// The bitmap we sent at the link's start had bits: the peer decides on that.
    sent_bits: bool,
    /// As diskless Primary: a report of ours on this link carried `ADOPT_OFFER`.
    offered: bool,
    /// ... and a write was sent after it that this link did not carry (it was not
    /// established yet): if the peer adopts, it lacks that write.
    offer_missed: bool,
    /// As its sync source: it asked us for resync data or checksums on this link, or
    /// confirmed our online resync. A target that reports UpToDate without either finished
    /// from another replica: our bits toward it are not cleared then (see
    /// `resync_source_finished`).
    resync_asked: bool,
    /// This link's handshake found the peer's data newer than ours while the peer could not
    /// be our source (rule `SourceNotUpToDate`: it is Outdated, or Inconsistent): we lack
    /// writes it holds. We are not promoted, and as Primary we do not count it (simulator
    /// seed 9439).
    peer_newer: bool,
}

#[derive(Debug)]
struct Peer {
    cfg: PeerConfig,
    bitmap: Option<Bitmap>,
    conn: Option<Conn>,
    last_decision: Option<(SyncDecision, Rule)>,
    /// See [`SplitBrainStatus`].
    split_brain: Option<SplitBrainStatus>,
}

/// Blocks a Secondary received whole from the Primary over the current link to it. While
/// that link stays up every later write of the Primary reaches us on it, in order, so these
/// blocks are current: a resync from a Secondary source (which may not have applied the same
/// writes yet when it reads) must not overwrite them. The local stand-in for DRBD's dagtags.
#[derive(Debug)]
struct PrimaryFresh {
    primary: NodeId,
    epoch: u64,
    bits: Bitmap,
}

#[derive(Debug, Default)]
struct Extent {
    inflight: u32,
    last_done: u64,
    lru: u64,
}

/// The replication engine of one volume on one node.
#[derive(Debug)]
pub struct Engine {
    cfg: Config,
    now: Nanos,
    out: Vec<Action>,
    meta: Meta,
    role: Role,
    crashed_primary: bool,
    peers: BTreeMap<NodeId, Peer>,
    next_io: IoId,
    next_key: u64,
    next_seq: u64,
    report_seq: u64,
    epoch: u64,
    mint_count: u64,
    /// A diskful peer is not in sync: start a new generation before the next write.
    mint_pending: bool,
    /// Quorum was confirmed by a ping round trip since the last link loss: a new generation
    /// may start (see `quorum_confirmed`).
    mint_confirmed: bool,
    /// A ping round that confirms quorum is under way (`quorum_confirmed`): its token, and the
    /// writes that wait for it to start or to complete (keys of active ops).
    confirming: bool,
    confirm_token: u64,
    start_wait: VecDeque<(u64, RequestId, u64, Bytes, bool)>,
    complete_wait: Vec<u64>,
    /// Diskful peers we recorded as behind (bitmap generation older than our current) when
    /// we adopted a Primary's generation, although that Primary counted them in sync: they
    /// may have adopted the same generation over their own link to it, and hold its writes
    /// as we do. Writing without such a peer needs a new generation, as for one recorded at
    /// our current (`peers_needing_new_generation`). Memory only; emptied by `mint`.
    may_share_current: BTreeSet<NodeId>,
    /// As diskless Primary: the diskful peers that hold every write of ours that completed:
    /// in sync when we started a generation, given every write we sent since, and if their
    /// link broke, it broke with nothing unacknowledged or unflushed, or while it was the
    /// last peer holding our data (then what it did not acknowledge failed, and no flush
    /// completed over what it did not flush). Such a peer, back at one of our two previous
    /// generations, may adopt the current one (`ADOPT_OFFER`): after a blip that cut every
    /// peer, the reports with the generations we started at the first losses reached none.
    parent_complete: BTreeSet<NodeId>,
    /// As diskless Primary under `suspend`: requests in flight when the last peer holding our
    /// data went, in order; started again when one is back (see `suspend.rs`).
    parked: Vec<Parked>,
    ios: BTreeMap<IoId, IoPurpose>,
    active: BTreeMap<u64, Op>,
    waiting: VecDeque<Op>,
    quorum_wait: VecDeque<Event>,
    writes: BTreeMap<u64, ClientWriteState>,
    seq_to_key: BTreeMap<u64, u64>,
    flushes: BTreeMap<u64, ClientFlushState>,
    al: BTreeMap<u64, Extent>,
    al_ctr: u64,
    al_flushed: u64,
    al_lru: u64,
    al_flush_pending: bool,
    resync_rate: u64,
    resync_min_rate: u64,
    /// The `outdated` mask (and its generation) of our last reports (a change is reported at
    /// the next tick).
    sent_outdated: (u32, u64, NodeId),
    /// The outdated list we last knew from a Primary (a connected one's, or our own when we
    /// were Primary): relayed while no Primary is connected (see `outdated_mask`).
    sticky_outdated: (u32, u64, NodeId),
    /// Diskful peers whose last report said their disk is detached (kept while their link
    /// is down: see the resync writes in `dispatch`).
    detached_seen: BTreeSet<NodeId>,
    /// Consumer I/O seen, for the dynamic resync controller: (start of the current window,
    /// bytes in it, bytes in the previous window).
    app_io: (Nanos, u64, u64),
    last_resync_bytes: u64,
    last_resync_skipped: u64,
    /// See [`PrimaryFresh`].
    primary_fresh: Option<PrimaryFresh>,
    /// Online verify (`verify`).
    verify: verify::VerifyState,
    /// Manual split-brain resolution: discard our changes at the next split-brain handshake.
    discard_my_data: bool,
    /// A forced promotion accepted the crashed Primary's data unchecked.
    crashed_primary_checked: bool,
    /// Why the local disk was detached (disk state Failed).
    disk_failure: Option<String>,
    /// The disk state when it was detached (an Inconsistent disk stays Inconsistent in the
    /// persisted metadata).
    failed_from: DiskState,
    /// The metadata when the disk was detached (what later persists write, see
    /// `persist_meta`).
    detached_meta: Option<Meta>,
    /// Index in `out` at which the disk was detached in this call: later bitmap and
    /// activity-log persists are dropped (a detached disk is not written).
    detach_mark: Option<usize>,
    /// Completions the engine makes up itself (disk I/O on a detached disk fails at once),
    /// handled after the current event, in order.
    internal: VecDeque<Event>,
    /// Consumer reads forwarded to a peer (detached disk): request seq -> (op key, peer).
    fwd_reads: BTreeMap<u64, (u64, NodeId)>,
    next_read_seq: u64,
    /// The highest promotion epoch seen (ours and our peers' reports); a promotion goes one
    /// above it.
    primary_epoch_seen: u64,
    /// A diskful Secondary lost its link to this diskless Primary: it may lack that Primary's
    /// last writes (which another replica may have). Until the Primary is back (or a Primary
    /// is connected, or we are promoted, or a resync into us finished) we do not become sync
    /// target of a Secondary (its data may keep changing through writes we do not get), and our
    /// reports say we lost a Primary at our current generation (rule `EqualBitsLostPrimary`).
    /// In memory only: a restart loses it with everything else the node did not persist.
    lost_diskless: Option<NodeId>,
    /// The Primary whose link we lost last, its promotion epoch and the last write we
    /// received from it, with our current generation at the time: reported (protocol version
    /// 9) while we are still at that generation; a resync into us replaces it with the
    /// source's (our data is its data). Two replicas that lost the same Primary with bits
    /// toward each other, when no other rule decides, resync from the one that received the
    /// later write (rule `EqualBitsLaterWrites`): the Primary numbers its writes once and
    /// sends them to every peer in that order, so that one holds every write it completed
    /// (simulator seed 4896). Only for a Primary with a disk (detached or not). In memory
    /// only, like the unsettled writes it goes with.
    lost_writer: Option<(LostWriter, Generation)>,
    /// A resync into us finished and the source has not confirmed it yet (`ResyncEnd`; it may
    /// have sent us writes to fetch too, see `late`): other peers are told Inconsistent
    /// meanwhile, so a diskless Primary does not read from us too early. (source, link epoch)
    unconfirmed_source: Option<(NodeId, u64)>,
    /// A diskless Primary that demoted flushes its peers (seq, peers still to answer, all
    /// answered Ok so far) and declares its writes `Settled` when every one did.
    demote_flush: Option<(u64, BTreeSet<NodeId>, bool)>,
    /// This node is one of the two Primaries of a dual-primary window.
    window: Option<window::Window>,
    /// Writes and flushes that finished without quorum under `on-no-quorum=suspend`: their
    /// acknowledgement waits for quorum (see `engine/suspend.rs`).
    held: Vec<RequestId>,
}

fn gen_mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn overlaps(a_off: u64, a_len: u64, b_off: u64, b_len: u64) -> bool {
    a_off < b_off + b_len && b_off < a_off + a_len
}

fn conflicts(a: &Op, b: &Op) -> bool {
    (a.access == Access::Write || b.access == Access::Write)
        && overlaps(a.offset, a.len, b.offset, b.len)
}

impl Engine {
    /// Builds the engine from what the driver persisted. A node that was Primary when it
    /// stopped crashed: its activity-log extents are marked out of sync toward every peer
    /// and it starts as Secondary. The returned actions (persisting that) run first.
    pub fn new(cfg: Config, persisted: Persisted, now: Nanos) -> (Engine, Vec<Action>) {
        let mut peers = BTreeMap::new();
        let mut bitmaps = persisted.bitmaps;
        for p in &cfg.peers {
            let bitmap = (cfg.diskful && p.diskful).then(|| {
                bitmaps
                    .remove(&p.node_id)
                    .filter(|b| {
                        b.size_bytes() == cfg.size_bytes
                            && b.granularity() == u64::from(cfg.bitmap_granularity)
                    })
                    .unwrap_or_else(|| {
                        // Lost or mismatched bitmap: everything may differ.
                        let mut b = Bitmap::new(cfg.size_bytes, cfg.bitmap_granularity);
                        b.set_all();
                        b
                    })
            });
            peers.insert(
                p.node_id,
                Peer {
                    cfg: *p,
                    bitmap,
                    conn: None,
                    last_decision: None,
                    split_brain: None,
                },
            );
        }
        let mut e = Engine {
            resync_rate: cfg.resync_rate,
            resync_min_rate: cfg.resync_min_rate,
            primary_epoch_seen: persisted.meta.primary_epoch,
            sent_outdated: (0, 0, 0),
            sticky_outdated: (0, 0, 0),
            detached_seen: BTreeSet::new(),
            app_io: (0, 0, 0),
            cfg,
            now,
            out: Vec::new(),
            meta: persisted.meta,
            role: Role::Secondary,
            crashed_primary: false,
            peers,
            next_io: 1,
            next_key: 1,
            next_seq: 1,
            report_seq: 0,
            epoch: 0,
            mint_count: 0,
            mint_pending: false,
            mint_confirmed: false,
            confirming: false,
            confirm_token: 0,
            start_wait: VecDeque::new(),
            complete_wait: Vec::new(),
            may_share_current: BTreeSet::new(),
            parent_complete: BTreeSet::new(),
            parked: Vec::new(),
            ios: BTreeMap::new(),
            active: BTreeMap::new(),
            waiting: VecDeque::new(),
            quorum_wait: VecDeque::new(),
            writes: BTreeMap::new(),
            seq_to_key: BTreeMap::new(),
            flushes: BTreeMap::new(),
            al: BTreeMap::new(),
            al_ctr: 0,
            al_flushed: 0,
            al_lru: 0,
            al_flush_pending: false,
            last_resync_bytes: 0,
            last_resync_skipped: 0,
            primary_fresh: None,
            verify: Default::default(),
            discard_my_data: false,
            crashed_primary_checked: false,
            disk_failure: None,
            failed_from: DiskState::UpToDate,
            detached_meta: None,
            detach_mark: None,
            internal: VecDeque::new(),
            fwd_reads: BTreeMap::new(),
            next_read_seq: 1,
            lost_diskless: None,
            lost_writer: None,
            unconfirmed_source: None,
            demote_flush: None,
            window: None,
            held: Vec::new(),
        };
        if e.meta.disk_state == DiskState::Failed {
            // Re-attached after an I/O error detached this disk: it holds the data up to the
            // failure (and whatever the failure lost), never newer data. Not UpToDate until a
            // resync from a peer (rule `EqualInconsistent` or the generations); Outdated, not
            // Inconsistent, so an operator can still force it when it is the last copy.
            e.meta.disk_state = DiskState::Outdated;
            e.log(
                Level::Warn,
                "the disk was detached after an I/O error: Outdated until resynced from a peer"
                    .into(),
            );
            e.persist_meta();
        }
        if e.meta.primary && !e.cfg.diskful {
            // A diskless Primary that stopped without demoting: it has no data to be stale,
            // its peers hold everything (and mark what it may have left half written).
            e.meta.primary = false;
            e.log(
                Level::Warn,
                "was a diskless Primary when it stopped: starts as Secondary".into(),
            );
            e.persist_meta();
        }
        if e.meta.primary {
            e.crashed_primary = true;
            e.meta.primary = false;
            let ext = e.cfg.al_extent_bytes;
            let extents = persisted.activity_log;
            for x in &extents {
                let off = x * ext;
                if off >= e.cfg.size_bytes {
                    continue;
                }
                let len = ext.min(e.cfg.size_bytes - off);
                e.set_bits_toward_all(off, len, None);
            }
            e.log(
                Level::Warn,
                format!(
                    "crashed Primary: {} activity-log extents marked out of sync toward every peer",
                    extents.len()
                ),
            );
            e.out.push(Action::PersistActivityLog(Vec::new()));
            e.persist_meta();
        }
        let out = std::mem::take(&mut e.out);
        (e, out)
    }

    // ------------------------------------------------------------------ public API

    /// Feeds one event; returns the actions to execute (see [`Action`] for the contract).
    pub fn handle(&mut self, now: Nanos, event: Event) -> Vec<Action> {
        self.now = self.now.max(now);
        self.on_event(event);
        self.take_out()
    }

    /// The actions so far, after the made-up completions of a detached disk were handled.
    fn take_out(&mut self) -> Vec<Action> {
        loop {
            while let Some(ev) = self.internal.pop_front() {
                self.on_event(ev);
            }
            // A dual-primary token holder asked for the token hands it over once idle.
            self.maybe_hand_over();
            if self.internal.is_empty() {
                break;
            }
        }
        if self.failed() {
            // Nothing is persisted on a detached disk but its metadata (best effort).
            let mark = self.detach_mark.take().unwrap_or(0);
            let mut i = 0;
            self.out.retain(|a| {
                i += 1;
                i <= mark
                    || !matches!(
                        a,
                        Action::PersistBits { .. } | Action::PersistActivityLog(_)
                    )
            });
        }
        std::mem::take(&mut self.out)
    }

    /// The local disk is detached after an I/O error.
    fn failed(&self) -> bool {
        self.meta.disk_state == DiskState::Failed
    }

    /// Consumer I/O goes to the peers, not to a local disk: the disk is detached, or this
    /// node is diskless.
    fn forwards(&self) -> bool {
        self.failed() || !self.cfg.diskful
    }

    /// A diskless node that is Primary.
    fn diskless_primary(&self) -> bool {
        !self.cfg.diskful && self.role == Role::Primary
    }

    /// Disk I/O: started, or on a detached disk failed at once (completion queued). A
    /// diskless node has no disk: its flushes (nothing to make durable) succeed at once, the
    /// rest fails (never asked for).
    fn disk(&mut self, a: Action) {
        if self.cfg.diskful && !self.failed() {
            self.out.push(a);
            return;
        }
        if let (false, Action::DiskFlush { io }) = (self.cfg.diskful, &a) {
            let io = *io;
            self.internal
                .push_back(Event::DiskFlushDone { io, result: Ok(()) });
            return;
        }
        let err = || {
            DiskError(
                if self.cfg.diskful {
                    "disk detached"
                } else {
                    "no local disk"
                }
                .into(),
            )
        };
        let ev = match a {
            Action::DiskWrite { io, .. } => Event::DiskWriteDone {
                io,
                result: Err(err()),
            },
            Action::DiskFlush { io } => Event::DiskFlushDone {
                io,
                result: Err(err()),
            },
            Action::DiskRead { io, .. } => Event::DiskReadDone {
                io,
                result: Err(err()),
            },
            Action::DiskChecksum { io, .. } => Event::DiskChecksumDone {
                io,
                result: Err(err()),
            },
            other => return self.out.push(other),
        };
        self.internal.push_back(ev);
    }

    /// Makes this node Primary, or refuses with the reason.
    /// [`Engine::promote`], and an Outdated replica is declared UpToDate first (DRBD's
    /// `primary --force`): for an operator who knows the replicas with the newer writes are
    /// gone. Every other refusal stays.
    pub fn promote_forced(&mut self, now: Nanos) -> Result<Vec<Action>, PromoteError> {
        self.now = self.now.max(now);
        if self.cfg.diskful
            && self.role != Role::Primary
            && self.meta.disk_state == DiskState::Outdated
        {
            self.meta.disk_state = DiskState::UpToDate;
            self.log(
                Level::Warn,
                "forced promotion: Outdated data declared UpToDate (the writes it missed are lost)"
                    .into(),
            );
            self.persist_meta();
            let mut out = self.take_out();
            self.crashed_primary_checked = true;
            match self.promote(now) {
                Ok(a) => {
                    out.extend(a);
                    Ok(out)
                }
                Err(e) => {
                    // Still refused (quorum, another Primary): the actions so far stand.
                    self.out = out;
                    self.broadcast_report(false);
                    Err(e)
                }
            }
        } else {
            self.crashed_primary_checked = true;
            self.promote(now)
        }
    }

    pub fn promote(&mut self, now: Nanos) -> Result<Vec<Action>, PromoteError> {
        self.now = self.now.max(now);
        if self.window_member() && self.role != Role::Primary {
            // Primary to the consumer already; the write token comes when a request needs it.
            return Ok(self.take_out());
        }
        self.promote_checked()?;
        Ok(self.take_out())
    }

    /// [`Engine::promote`]'s checks and the promotion; actions go to `out`. A member of a
    /// dual-primary window calls it when the write token is here.
    fn promote_checked(&mut self) -> Result<(), PromoteError> {
        if self.role == Role::Primary {
            return Ok(());
        }
        if !self.cfg.diskful {
            return self.promote_diskless();
        }
        if self.meta.disk_state == DiskState::Outdated {
            return Err(PromoteError::Outdated);
        }
        if self.meta.disk_state != DiskState::UpToDate {
            return Err(PromoteError::NotUpToDate(self.meta.disk_state));
        }
        if self.peers.values().any(|p| {
            p.conn.as_ref().is_some_and(|c| {
                c.state == ReplState::SyncTarget
                    || (c.state == ReplState::PausedSync
                        && c.decision.is_some_and(|(d, _)| d.is_target()))
            })
        }) {
            // A handshake just decided that a peer has newer data for us (we become
            // Inconsistent when its resync begins).
            return Err(PromoteError::NotUpToDate(DiskState::Inconsistent));
        }
        if self
            .peers
            .values()
            .any(|p| p.conn.as_ref().is_some_and(|c| c.peer_newer))
        {
            // A handshake found a peer newer than us that cannot be our source (it is
            // Outdated or Inconsistent itself): we lack writes it holds (simulator seed 9439:
            // a crashed Primary back from metadata older than its detach was promoted next to
            // an Outdated peer holding the writes it had made through that peer).
            return Err(PromoteError::NotUpToDate(DiskState::Outdated));
        }
        // A crashed Primary's disk may be stale (its metadata may predate a detach it could
        // not record: its peers kept writing). It becomes Primary again only after a
        // handshake with a diskful peer decided (or a forced promotion).
        let has_diskful_peer = self.peers.values().any(|p| p.cfg.diskful);
        let compared = self
            .peers
            .values()
            .any(|p| p.cfg.diskful && p.conn.as_ref().is_some_and(|c| c.decision.is_some()));
        if self.crashed_primary && has_diskful_peer && !compared && !self.crashed_primary_checked {
            return Err(PromoteError::CrashedPrimaryUnchecked);
        }
        if let Some(p) = self
            .peers
            .values()
            .find(|p| peer_role(p) == Some(Role::Primary))
        {
            // With the dual-primary window open: a second Primary (without the write token).
            return self.join_window(p.cfg.node_id);
        }
        if let Some(member) = self.window_member_elsewhere() {
            return Err(PromoteError::PrimaryElsewhere(member));
        }
        let (reachable, voters, ok) = self.quorum();
        if !ok {
            return Err(PromoteError::NoQuorum { reachable, voters });
        }
        self.become_primary();
        Ok(())
    }

    /// The diskful peers whose data a diskless node can serve right now: connected,
    /// Established, UpToDate, not Primary, and not recorded as behind by another such peer
    /// (its report lists a bitmap generation toward it equal to its current one while it is
    /// itself newer). All of them must hold the same generation.
    fn data_peers(&self) -> Result<(Generation, [Generation; 2], Vec<NodeId>), PromoteError> {
        let cands: Vec<(NodeId, &StateReport)> = self
            .peers
            .values()
            .filter(|p| p.cfg.diskful)
            .filter_map(|p| {
                let c = p.conn.as_ref()?;
                let r = c.report.as_ref()?;
                (c.state == ReplState::Established
                    && r.disk_state == DiskState::UpToDate
                    && r.role != Role::Primary)
                    .then_some((p.cfg.node_id, r))
            })
            .collect();
        let behind = |id: NodeId, r: &StateReport| {
            cands.iter().any(|(o, or)| {
                *o != id
                    && or.generations.current != r.generations.current
                    && or
                        .peer_bitmaps
                        .iter()
                        .any(|b| b.node == id && b.generation == r.generations.current)
            })
        };
        let good: Vec<(NodeId, &StateReport)> = cands
            .iter()
            .filter(|(id, r)| !behind(*id, r))
            .copied()
            .collect();
        let Some((first, r0)) = good.first().copied() else {
            return Err(PromoteError::NoDataPeer);
        };
        if let Some((other, _)) = good
            .iter()
            .find(|(_, r)| r.generations.current != r0.generations.current)
        {
            return Err(PromoteError::DataPeersDiffer(first, *other));
        }
        Ok((
            r0.generations.current,
            r0.generations.history,
            good.iter().map(|(id, _)| *id).collect(),
        ))
    }

    /// A connected peer that is a member of a dual-primary window while we are not: it is
    /// Primary to its consumer even while its report says Secondary (the write token is on
    /// its way between the two members, or held by the other one), so it counts as a Primary
    /// for our promotion. Simulator seed 7674 (three diskful, slow disks): node 0 was
    /// promoted between node 1's report of the hand-off (Secondary) and node 2's report of
    /// the token it had just received (Primary): two Primaries with quorum.
    fn window_member_elsewhere(&self) -> Option<NodeId> {
        if self.window_member() {
            return None;
        }
        self.peers
            .values()
            .find(|p| {
                p.conn
                    .as_ref()
                    .and_then(|c| c.report.as_ref())
                    .is_some_and(|r| r.flags & state_flags::WINDOW_MEMBER != 0)
            })
            .map(|p| p.cfg.node_id)
    }

    /// A diskless node becomes Primary: it takes the generation of the data it serves from
    /// its UpToDate diskful peers (`data_peers`), writes to every connected diskful peer and
    /// reads through those that hold that data (as a Primary whose disk is detached does).
    fn promote_diskless(&mut self) -> Result<(), PromoteError> {
        if let Some(p) = self
            .peers
            .values()
            .find(|p| peer_role(p) == Some(Role::Primary))
        {
            return Err(PromoteError::PrimaryElsewhere(p.cfg.node_id));
        }
        if let Some(member) = self.window_member_elsewhere() {
            return Err(PromoteError::PrimaryElsewhere(member));
        }
        let (current, history, serving) = self.data_peers()?;
        let (reachable, voters, ok) = self.quorum();
        if !ok {
            return Err(PromoteError::NoQuorum { reachable, voters });
        }
        self.meta.current = current;
        self.meta.history = history;
        self.meta.peer_bitmap_gens.clear();
        for id in self.diskful_ids() {
            let theirs = self
                .conn(id)
                .and_then(|c| c.report.as_ref())
                .map(|r| r.generations.current);
            if let Some(g) = theirs.filter(|g| *g != current) {
                // Connected but behind: recorded, so it is listed as Outdated and does not
                // serve before it caught up.
                self.meta.peer_bitmap_gens.insert(id, g);
            }
            let serves = serving.contains(&id);
            if let Some(c) = self.conn_mut(id) {
                c.serves = serves;
            }
        }
        self.log(
            Level::Info,
            format!("diskless: serving generation {current:016x} through nodes {serving:?}"),
        );
        self.become_primary();
        Ok(())
    }

    fn become_primary(&mut self) {
        self.role = Role::Primary;
        self.primary_fresh = None;
        self.crashed_primary = false;
        self.set_lost_diskless(None);
        self.meta.primary = true;
        self.meta.primary_epoch = self.meta.primary_epoch.max(self.primary_epoch_seen) + 1;
        self.primary_epoch_seen = self.meta.primary_epoch;
        // A new generation is started lazily, at the first write, if some diskful peer is
        // not in sync then (DRBD does the same): a Primary that never writes never diverges.
        self.mint_pending = true;
        self.persist_meta();
        self.log(Level::Info, "promoted to Primary".into());
        self.broadcast_report(true);
    }

    /// Makes this node Secondary. Refused while consumer requests are in flight.
    pub fn demote(&mut self, now: Nanos) -> Result<Vec<Action>, DemoteError> {
        self.now = self.now.max(now);
        if self.role == Role::Secondary && !self.window_member() {
            return Ok(Vec::new());
        }
        let busy = self.busy_requests();
        if busy > 0 {
            return Err(DemoteError::Busy(busy));
        }
        self.leave_window();
        if self.role == Role::Secondary {
            self.broadcast_report(true);
        } else {
            self.become_secondary("demoted");
        }
        Ok(self.take_out())
    }

    /// Consumer requests in flight or queued.
    fn busy_requests(&self) -> usize {
        self.requests_in_flight() + self.window_pending()
    }

    /// Consumer requests in flight or queued, less those a dual-primary member queues for
    /// the write token.
    fn requests_in_flight(&self) -> usize {
        self.writes.len()
            + self.flushes.values().filter(|f| f.id.is_some()).count()
            + self.quorum_wait.len()
            + self.held.len()
            + self
                .active
                .values()
                .chain(self.waiting.iter())
                .filter(|o| {
                    matches!(
                        o.kind,
                        OpKind::ClientRead { .. } | OpKind::ClientWrite { .. }
                    )
                })
                .count()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The bitmap toward a diskful peer.
    pub fn bitmap(&self, peer: NodeId) -> Option<&Bitmap> {
        self.peers.get(&peer).and_then(|p| p.bitmap.as_ref())
    }

    /// Whether a write would be allowed to complete now (Primary with quorum).
    pub fn has_quorum(&self) -> bool {
        self.quorum().2
    }

    /// A status snapshot.
    pub fn status(&self) -> Status {
        let (reachable, voters, quorum) = self.quorum();
        let mut resync_left = None;
        let mut resync_done = 0;
        let mut resync_total = 0;
        let peers = self
            .peers
            .values()
            .map(|p| {
                if let Some(rs) = p.conn.as_ref().and_then(|c| c.resync.as_ref()) {
                    resync_left = Some(p.bitmap.as_ref().map_or(0, |b| b.out_of_sync_bytes()));
                    resync_done = rs.done;
                    resync_total = rs.total;
                }
                PeerStatus {
                    node_id: p.cfg.node_id,
                    diskful: p.cfg.diskful,
                    connected: p.conn.is_some(),
                    repl_state: p.conn.as_ref().map_or(ReplState::Off, |c| c.state),
                    role: p
                        .conn
                        .as_ref()
                        .and_then(|c| c.report.as_ref())
                        .map(|r| r.role),
                    disk_state: p
                        .conn
                        .as_ref()
                        .and_then(|c| c.report.as_ref())
                        .map(|r| r.disk_state),
                    out_of_sync_bytes: p.bitmap.as_ref().map_or(0, |b| b.out_of_sync_bytes()),
                    last_decision: p.last_decision,
                    split_brain: p.split_brain.clone(),
                }
            })
            .collect();
        let (verify, last_verify) = self.verify_status();
        Status {
            node_id: self.cfg.node_id,
            role: self.role,
            disk_state: self.meta.disk_state,
            quorum,
            voters,
            reachable,
            current_generation: self.meta.current,
            peers,
            resync_bytes_per_sec: self.resync_rate,
            resync_min_bytes_per_sec: self.resync_min_rate,
            resync_yielding: resync_left.is_some() && self.resync_yielding(),
            resync_bytes_left: resync_left,
            resync_bytes_done: resync_done,
            resync_bytes_total: resync_total,
            last_resync_bytes: self.last_resync_bytes,
            last_resync_skipped_bytes: self.last_resync_skipped,
            size_bytes: self.cfg.size_bytes,
            usable_size_bytes: self.usable_size(),
            crashed_primary: self.crashed_primary,
            activity_log_extents: self.al.len(),
            verify,
            last_verify,
            discard_my_data: self.discard_my_data,
            disk_failure: self.disk_failure.clone(),
            allow_two_primaries: self.cfg.allow_two_primaries,
            dual_primary: self.dual_primary_status(),
            on_no_quorum: self.cfg.on_no_quorum,
            suspended_requests: if self.suspends() {
                self.held.len() + self.quorum_wait.len() + self.parked.len()
            } else {
                0
            },
        }
    }

    // ------------------------------------------------------------------ helpers

    fn log(&mut self, level: Level, msg: String) {
        self.out.push(Action::Log { level, msg });
    }

    fn io(&mut self, purpose: IoPurpose) -> IoId {
        let io = self.next_io;
        self.next_io += 1;
        self.ios.insert(io, purpose);
        io
    }

    fn persist_meta(&mut self) {
        let mut m = self.meta.clone();
        if self.failed() {
            // The metadata of a detached disk describes that disk as it was when it was
            // detached (its generations, not those minted since: it has none of their
            // writes), marked Failed; half-synced data stays Inconsistent (a restart reads
            // Failed as Outdated: consistent data up to the failure).
            m = self.detached_meta.clone().unwrap_or(m);
            m.disk_state = if self.failed_from == DiskState::Inconsistent {
                DiskState::Inconsistent
            } else {
                DiskState::Failed
            };
        }
        self.out.push(Action::PersistMeta(m));
    }

    /// Detaches the local disk after an I/O error (DRBD's `on-io-error detach`): disk state
    /// Failed (persisted if the metadata can still be written; a restart reads it as
    /// Outdated), role and links kept. A Primary starts a new generation (its disk misses
    /// every write from now on; the peers record that it is behind) and from now on writes
    /// to, and reads from, the peers that hold its data. Links in a handshake or resync are
    /// closed: a Failed disk is never a resync source or target; they reconnect without one.
    fn detach(&mut self, reason: String) {
        if !self.cfg.diskful || self.failed() {
            return;
        }
        let was = self.meta.disk_state;
        let serving: Vec<(NodeId, bool)> = self
            .diskful_ids()
            .into_iter()
            .map(|id| {
                let clean = self.bitmap(id).is_none_or(|b| b.count() == 0)
                    && self.meta.peer_bitmap_gens.get(&id).copied().unwrap_or(0) == 0;
                (id, was == DiskState::UpToDate && self.in_sync(id) && clean)
            })
            .collect();
        self.failed_from = was;
        self.detached_meta = Some(self.meta.clone());
        self.meta.disk_state = DiskState::Failed;
        self.disk_failure = Some(reason.clone());
        self.detach_mark = Some(self.out.len());
        // The hot extents cover every write of ours our disk may not have made durable, among
        // them writes whose `Write` reached the peers before our Failed report (so they do
        // not mark them): the peers mark these extents out of sync toward us (an `OutOfSync`
        // on an established link, as verify findings). From now on nothing is written
        // locally (the persisted log stays as it was: a restart as crashed Primary resyncs
        // those extents too).
        let ext = self.cfg.al_extent_bytes;
        let size = self.cfg.size_bytes;
        let hot: Vec<ByteRange> = self
            .al
            .keys()
            .map(|x| x * ext)
            .filter(|off| *off < size)
            .map(|offset| ByteRange {
                offset,
                len: ext.min(size - offset),
            })
            .collect();
        self.al.clear();
        self.al_flush_pending = false;
        for (id, serves) in &serving {
            if let Some(c) = self.conn_mut(*id) {
                c.serves = *serves;
            }
        }
        if was == DiskState::UpToDate {
            for (id, _) in serving {
                self.recheck_serves(id);
            }
        }
        self.log(
            Level::Warn,
            format!(
                "local disk failed ({reason}): detached (was {was:?}); I/O goes to the peers \
                 that hold our data"
            ),
        );
        if self.role == Role::Primary {
            self.mint("local disk detached");
        }
        self.persist_meta();
        if !hot.is_empty() {
            let established =
                self.peers_where(true, |c| c.state == ReplState::Established && c.bitmap_done);
            for id in established {
                for chunk in hot.chunks(OOS_CHUNK) {
                    self.send(
                        id,
                        Message::OutOfSync {
                            flags: 0,
                            ranges: chunk.to_vec(),
                        },
                    );
                }
            }
        }
        self.end_verify_detached();
        let busy: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| {
                p.cfg.diskful
                    && p.conn.as_ref().is_some_and(|c| {
                        matches!(
                            c.state,
                            ReplState::Connecting
                                | ReplState::SyncSource
                                | ReplState::SyncTarget
                                | ReplState::PausedSync
                        )
                    })
            })
            .map(|p| p.cfg.node_id)
            .collect();
        for id in busy {
            self.disconnect(
                id,
                DisconnectReason::IoError,
                "local disk detached after an I/O error; reconnect without resync".into(),
            );
        }
        self.broadcast_report(false);
    }

    /// A detached (Failed) peer disk, as its last report says.
    fn peer_failed(&self, peer: NodeId) -> bool {
        self.conn(peer)
            .and_then(|c| c.report.as_ref())
            .is_some_and(|r| r.disk_state == DiskState::Failed)
    }

    /// With our disk detached: whether `peer` holds our data (see `Conn::serves`) and still
    /// has nothing out of sync from us.
    fn serves(&self, peer: NodeId) -> bool {
        self.conn(peer).is_some_and(|c| {
            c.serves
                && c.state == ReplState::Established
                && c.report
                    .as_ref()
                    .is_some_and(|r| r.disk_state == DiskState::UpToDate)
        }) && self.bitmap(peer).is_none_or(|b| b.count() == 0)
    }

    fn serving_peer(&self) -> Option<NodeId> {
        self.diskful_ids().into_iter().find(|id| self.serves(*id))
    }

    fn detached_error(&self) -> RequestError {
        if !self.cfg.diskful {
            return RequestError::Io(
                "diskless: no connected UpToDate diskful peer holds the data".into(),
            );
        }
        RequestError::Io(format!(
            "local disk detached ({}) and no UpToDate peer holds our data",
            self.disk_failure.as_deref().unwrap_or("I/O error")
        ))
    }

    /// Sets or clears `lost_diskless`; clearing it lets the links it held back (paused) compare
    /// again.
    fn set_lost_diskless(&mut self, lost: Option<NodeId>) {
        let was = self.lost_diskless;
        self.lost_diskless = lost;
        if was.is_none() || lost.is_some() {
            return;
        }
        self.log(
            Level::Info,
            format!(
                "the diskless Primary node {} we lost is settled",
                was.unwrap_or(0)
            ),
        );
        let paused = self.peers_where(true, |c| c.state == ReplState::PausedSync);
        for id in paused {
            self.disconnect(
                id,
                DisconnectReason::ConfigChanged,
                "no longer waiting for a lost diskless Primary; reconnect to compare".into(),
            );
        }
    }

    /// A diskless Primary lost a diskful peer (link down, disk detached): if another peer
    /// still holds the data, start a new generation now (the peers adopt it and mark what the
    /// lost one may lack, see `adopt_generation`), so it cannot look in sync when it comes
    /// back; otherwise at the next write that completes.
    fn diskless_lost_peer(&mut self, lost: NodeId, ranges: Vec<(u64, u64)>) {
        if !self.diskless_primary() {
            return;
        }
        // Writes it had not acknowledged, or not made durable (it may have crashed): the
        // peers that got them mark them toward it (its own resync fetches them later).
        let receivers: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| p.cfg.node_id != lost && self.receives_writes(p))
            .map(|p| p.cfg.node_id)
            .collect();
        let ranges: Vec<ByteRange> = ranges
            .into_iter()
            .map(|(offset, len)| ByteRange { offset, len })
            .collect();
        for id in receivers {
            for chunk in ranges.chunks(OOS_CHUNK) {
                self.send(
                    id,
                    Message::OutOfSync {
                        flags: oos_flags::THIRD_NODE
                            | (u32::from(lost) << oos_flags::THIRD_NODE_SHIFT),
                        ranges: chunk.to_vec(),
                    },
                );
            }
        }
        if self.peers_needing_new_generation().is_empty() {
            return;
        }
        if self.serving_peer().is_some() {
            self.mint_pending = false;
            self.mint("a diskful peer dropped out of a diskless Primary's writes");
            self.persist_meta();
            self.broadcast_report(false);
        } else {
            self.mint_pending = true;
        }
    }

    /// A diskless Primary's first report from a diskful peer on a new link: it is at our
    /// current generation although we recorded it behind (it dropped out of our writes), so
    /// it caught up through another replica while our link to it was down (an online resync
    /// of the writes we marked toward it). It may have missed our writes after that (its link
    /// to that replica may have broken too), at this same generation: nothing would tell. A
    /// new generation makes it behind again (recorded at its current one): it does not serve
    /// until a resync from a serving peer brought it to the new generation, now that our link
    /// to it is up and every write of ours reaches it.
    fn caught_up_elsewhere(&mut self, peer: NodeId, r: &StateReport) {
        let g = self.meta.peer_bitmap_gens.get(&peer).copied().unwrap_or(0);
        if g == 0 || g == self.meta.current || r.generations.current != self.meta.current {
            return;
        }
        self.log(
            Level::Warn,
            format!(
                "node {peer} reached our generation through another replica while away from us: \
                 behind until it resynced again"
            ),
        );
        self.behind_at_current(peer, "a diskful peer may lack writes at our generation");
    }

    /// As diskless Primary: `peer` is at our generation but may lack writes of it. Recorded
    /// behind at it, and a new generation started (the serving peers adopt it; none: at the
    /// next write, nobody would adopt it now), so it serves again only after a resync.
    fn behind_at_current(&mut self, peer: NodeId, why: &str) {
        self.meta.peer_bitmap_gens.insert(peer, self.meta.current);
        if let Some(c) = self.conn_mut(peer) {
            c.serves = false;
        }
        if self.serving_peer().is_some() {
            self.mint_pending = false;
            self.mint(why);
        } else {
            self.mint_pending = true;
        }
        self.persist_meta();
        self.broadcast_report(false);
    }

    /// As diskless Primary with quorum and without a peer that holds our data: whether our
    /// report to `peer` offers it our current generation (`parent_complete`, see there).
    /// Without quorum, another side may have promoted a Primary the peer must follow.
    fn offers_adoption(&self, peer: NodeId) -> bool {
        self.diskless_primary()
            && self.has_quorum()
            && self.parent_complete.contains(&peer)
            && self.serving_peer().is_none()
    }

    /// Sends a report to every peer we may offer our generation now and have not yet (we
    /// just gained quorum, or lost the last peer holding our data).
    fn send_offers(&mut self) {
        if !self.diskless_primary() {
            return;
        }
        let ids: Vec<NodeId> = self
            .parent_complete
            .iter()
            .copied()
            .filter(|id| self.conn(*id).is_some_and(|c| !c.offered))
            .filter(|id| self.offers_adoption(*id))
            .collect();
        for id in ids {
            self.report_seq += 1;
            let r = self.report_for(id);
            self.note_offer(id, &r);
            self.send(id, Message::StateReport(Box::new(r)));
        }
    }

    fn note_offer(&mut self, peer: NodeId, r: &StateReport) {
        if r.flags & state_flags::ADOPT_OFFER != 0
            && let Some(c) = self.conn_mut(peer)
        {
            c.offered = true;
        }
    }

    /// A peer we offered our generation (`ADOPT_OFFER`) reports it: it holds our data,
    /// whatever we recorded about it before (its bitmap generation goes). Unless a write left
    /// after the offer and before its link carried writes: then it is at our generation
    /// without that write, behind as in `caught_up_elsewhere`.
    fn took_offer(&mut self, peer: NodeId, r: &StateReport) {
        let Some((offered, missed)) = self.conn(peer).map(|c| (c.offered, c.offer_missed)) else {
            return;
        };
        if !offered || r.generations.current != self.meta.current {
            return;
        }
        if !missed {
            if self.parent_complete.contains(&peer)
                && self.meta.peer_bitmap_gens.remove(&peer).is_some()
            {
                self.persist_meta();
            }
            return;
        }
        if let Some(c) = self.conn_mut(peer) {
            c.offer_missed = false;
        }
        self.log(
            Level::Warn,
            format!(
                "node {peer} adopted our generation but missed a write: behind until it resynced"
            ),
        );
        self.behind_at_current(peer, "a diskful peer missed a write at our generation");
    }

    /// Whether we keep the writes of `writer` until it declares them `Settled`, and where:
    /// `Some(false)` in `Conn::unsettled` (a writer without a disk of its own, diskless or
    /// detached, keeps no bitmap: always), `Some(true)` in `Conn::unsettled_diskful` (a
    /// writer with a disk that settles, version 7, when another diskful replica may lack what
    /// it sent us should it crash with the write on its way: its activity log covers only its
    /// own disk).
    fn keeps_unsettled(&self, writer: NodeId) -> Option<bool> {
        if !self.peers[&writer].cfg.diskful || self.peer_failed(writer) {
            return Some(false);
        }
        let settles = self
            .conn(writer)
            .and_then(|c| c.report.as_ref())
            .is_some_and(|r| r.flags & state_flags::SETTLES != 0);
        let third = self
            .peers
            .values()
            .any(|p| p.cfg.diskful && p.cfg.node_id != writer);
        (settles && third).then_some(true)
    }

    /// Whether writes `peer` sent over its link `epoch` are still waiting for or on our disk.
    fn peer_writes_pending(&self, peer: NodeId, epoch: u64) -> bool {
        self.active.values().chain(self.waiting.iter()).any(|o| {
            matches!(o.kind, OpKind::PeerWrite { peer: p, epoch: e, .. } if p == peer && e == epoch)
        })
    }

    /// Ranges of writes from a Primary not yet settled: marked out of sync toward each of
    /// `ids`.
    fn mark_unsettled(&mut self, ranges: &[(u64, u64)], ids: &[NodeId]) {
        for &id in ids {
            for &(off, len) in ranges {
                self.set_bits(id, off, len);
            }
        }
    }

    /// A consumer read on a detached disk goes to a peer that holds our data (`ReadRequest`);
    /// none: it fails.
    fn forward_read(&mut self, key: u64) {
        let Some(op) = self.active.get(&key).cloned() else {
            return;
        };
        let OpKind::ClientRead { id } = op.kind else {
            return;
        };
        let Some(peer) = self.serving_peer() else {
            if self.parks() {
                self.note_suspending();
                self.parked.push(Parked::Read(key));
                return;
            }
            let err = self.detached_error();
            self.complete(id, Err(err));
            self.finish_op(key);
            return;
        };
        let seq = self.next_read_seq;
        self.next_read_seq += 1;
        self.fwd_reads.insert(seq, (key, peer));
        self.send(
            peer,
            Message::ReadRequest {
                seq,
                offset: op.offset,
                len: op.len as u32,
            },
        );
    }

    /// Our disk is detached: a peer linked since (no handshake resync) that now reports our
    /// generation, UpToDate, with nothing out of sync from us and no bitmap generation toward
    /// it (it adopted ours: it missed nothing) holds our data.
    /// Out-of-sync bits toward it do not matter when no other peer holds our data: they
    /// record what our (failed) disk has and it may lack, or writes it acknowledged that a
    /// crash may have lost; with no better copy anywhere its data is the volume's (they are
    /// cleared). It must not have missed a write we completed: then we started a new
    /// generation for it, or recorded it as behind (bitmap generation).
    fn recheck_serves(&mut self, peer: NodeId) {
        let gen_ok = self.meta.peer_bitmap_gens.get(&peer).copied().unwrap_or(0) == 0;
        let other = self
            .diskful_ids()
            .into_iter()
            .any(|id| id != peer && self.serves(id));
        let clean = self.bitmap(peer).is_none_or(|b| b.count() == 0);
        let current = self.meta.current;
        let eligible = self.conn(peer).is_some_and(|c| {
            c.state == ReplState::Established
                && !c.serves
                && c.report.as_ref().is_some_and(|r| {
                    r.disk_state == DiskState::UpToDate && r.generations.current == current
                })
        });
        if !(eligible && gen_ok && (clean || !other)) {
            return;
        }
        if !clean {
            self.clear_all_bits(peer);
            self.log(
                Level::Info,
                format!(
                    "node {peer} holds the only copy of our data: its out-of-sync marks are dropped"
                ),
            );
        }
        if let Some(c) = self.conn_mut(peer) {
            c.serves = true;
        }
        self.log(
            Level::Info,
            format!("node {peer} holds our data: our I/O goes to it"),
        );
        if self.parks() {
            self.unpark();
            self.recheck_quorum_wait();
        }
    }

    /// Reads forwarded to `peer` go to another peer (its link is gone or it refused).
    fn reroute_reads(&mut self, peer: NodeId) {
        let keys: Vec<(u64, u64)> = self
            .fwd_reads
            .iter()
            .filter(|(_, (_, p))| *p == peer)
            .map(|(s, (k, _))| (*s, *k))
            .collect();
        for (seq, key) in keys {
            self.fwd_reads.remove(&seq);
            self.forward_read(key);
        }
    }

    fn diskful_ids(&self) -> Vec<NodeId> {
        self.peers
            .values()
            .filter(|p| p.cfg.diskful)
            .map(|p| p.cfg.node_id)
            .collect()
    }

    /// (reachable voters incl. us, voters, definite quorum). A connected peer counts once it
    /// answered a Ping sent after our latest role change (so it has seen our role and did
    /// not refuse us).
    fn quorum(&self) -> (u8, u8, bool) {
        let voters = 1 + self.peers.len() as u8;
        let confirmed = self
            .peers
            .values()
            .filter(|p| {
                p.conn
                    .as_ref()
                    .is_some_and(|c| c.report.is_some() && c.pong >= c.barrier)
            })
            .count() as u8;
        let reachable = 1 + confirmed;
        (reachable, voters, has_majority(reachable, voters))
    }

    /// Quorum could still come: connected but unconfirmed peers would make it.
    fn quorum_possible(&self) -> bool {
        let voters = 1 + self.peers.len() as u8;
        let connected = self.peers.values().filter(|p| p.conn.is_some()).count() as u8;
        has_majority(1 + connected, voters)
    }

    /// Connected, decided in sync, same generation, UpToDate.
    fn in_sync(&self, peer: NodeId) -> bool {
        self.peers.get(&peer).is_some_and(|p| {
            p.conn.as_ref().is_some_and(|c| {
                c.state == ReplState::Established
                    && c.report.as_ref().is_some_and(|r| {
                        r.generations.current == self.meta.current
                            && r.disk_state == DiskState::UpToDate
                    })
            })
        })
    }

    /// Peers a Primary sends its writes to: connected diskful peers past the bitmap exchange
    /// that are not refusing (Established, SyncSource, SyncTarget, or still connecting:
    /// the handshake messages precede the writes on the link).
    fn receives_writes(&self, p: &Peer) -> bool {
        if self.failed() {
            return self.serves(p.cfg.node_id);
        }
        if !self.cfg.diskful {
            // A diskless Primary writes to every connected diskful peer that reported and is
            // not detached, in sync or not (one behind resyncs from another replica meanwhile
            // and must get our writes too); only those that hold our data make a write succeed.
            return p.cfg.diskful
                && !self.peer_failed(p.cfg.node_id)
                && p.conn.as_ref().is_some_and(|c| {
                    c.state == ReplState::Established
                        && c.report
                            .as_ref()
                            .is_some_and(|r| r.disk_state != DiskState::Diskless)
                });
        }
        p.cfg.diskful
            && !self.peer_failed(p.cfg.node_id)
            && p.conn.as_ref().is_some_and(|c| {
                matches!(
                    c.state,
                    ReplState::Established
                        | ReplState::SyncSource
                        | ReplState::SyncTarget
                        | ReplState::Connecting
                )
            })
    }

    fn set_bits(&mut self, peer: NodeId, offset: u64, len: u64) {
        let Some(b) = self.peers.get_mut(&peer).and_then(|p| p.bitmap.as_mut()) else {
            return;
        };
        let (first, count) = b.bits_touching(offset, len);
        if b.set_bits(first, count) > 0 {
            self.out.push(Action::PersistBits {
                peer,
                set: true,
                first,
                count,
            });
        }
    }

    fn set_bits_toward_all(&mut self, offset: u64, len: u64, except: Option<NodeId>) {
        for id in self.diskful_ids() {
            if Some(id) != except {
                self.set_bits(id, offset, len);
            }
        }
    }

    /// Diskful peers that would look equal to us after our next write unless we start a new
    /// generation first: not in sync, not receiving our writes, and not yet recorded as behind
    /// an older generation (bitmap generation 0, or our current: we lost it as Secondary and
    /// have not written since). A peer already recorded as behind keeps its bitmap generation
    /// and collects bits; minting again for it would only push generations out of the short
    /// history (peers that catch up elsewhere would then look unrelated). Except a peer that
    /// may have adopted our current generation from the same Primary as we did
    /// (`may_share_current`): at the same generation, with bits on both sides and each side's
    /// bitmap generation toward the other older than it, the handshake could not tell which
    /// side wrote since (rule `EqualBitsLowerNode` picks one).
    fn peers_needing_new_generation(&self) -> Vec<NodeId> {
        self.diskful_ids()
            .into_iter()
            .filter(|id| {
                !self.in_sync(*id)
                    && !self.peers.get(id).is_some_and(|p| self.receives_writes(p))
                    && (matches!(
                        self.meta.peer_bitmap_gens.get(id).copied().unwrap_or(0),
                        g if g == 0 || g == self.meta.current
                    ) || self.may_share_current.contains(id))
            })
            .collect()
    }

    fn mint(&mut self, why: &str) {
        self.mint_count += 1;
        let mut g = gen_mix(
            self.cfg.entropy
                ^ gen_mix(self.now)
                ^ (u64::from(self.cfg.node_id) << 56)
                ^ gen_mix(self.mint_count ^ self.meta.current),
        );
        if g == 0 {
            g = 1;
        }
        let old = self.meta.current;
        // A peer that may hold `old` (adopted from the same Primary as we did) and that we
        // recorded when we left the generation before it holds one of the two: recorded at
        // `old`, the handshake resyncs it by bitmap if it holds `old` (that Primary counted it
        // in sync: the likely case), in full if it stayed at the one before (our history).
        let prev = self.meta.history[0];
        for id in std::mem::take(&mut self.may_share_current) {
            let away = self.peers.get(&id).is_some_and(|p| p.conn.is_none());
            if away && prev != 0 && self.meta.peer_bitmap_gens.get(&id) == Some(&prev) {
                self.meta.peer_bitmap_gens.insert(id, old);
            }
        }
        if self.cfg.diskful {
            self.parent_complete.clear();
        } else {
            // Those in sync now join the ones that held everything before (no write since).
            let in_sync: Vec<NodeId> = self
                .diskful_ids()
                .into_iter()
                .filter(|id| self.in_sync(*id))
                .collect();
            self.parent_complete.extend(in_sync);
        }
        for id in self.diskful_ids() {
            if !self.in_sync(id) {
                let e = self.meta.peer_bitmap_gens.entry(id).or_insert(0);
                if *e == 0 {
                    *e = old;
                }
            }
        }
        self.meta.history = [old, self.meta.history[0]];
        self.meta.current = g;
        self.log(
            Level::Info,
            format!("new data generation {g:016x} (was {old:016x}): {why}"),
        );
    }

    fn report_for(&self, peer: NodeId) -> StateReport {
        let (reachable, voters, has_quorum) = self.quorum();
        // We declare our writes `Settled` in every role (see `Conn::unsettled_diskful`).
        let mut flags = state_flags::SETTLES;
        if self.crashed_primary {
            flags |= state_flags::CRASHED_PRIMARY;
        }
        if self.discard_my_data {
            flags |= state_flags::DISCARD_MY_DATA;
        }
        flags |= self.window_flags();
        if self.io_suspended() {
            flags |= state_flags::SUSPENDED;
        }
        if self.offers_adoption(peer) {
            flags |= state_flags::ADOPT_OFFER;
        }
        let (outdated, outdated_gen, outdated_by) = self.outdated_mask();
        StateReport {
            seq: self.report_seq,
            node_id: self.cfg.node_id,
            role: self.role,
            disk_state: self.disk_state_for(peer),
            quorum: QuorumInfo {
                has_quorum,
                voters,
                reachable,
            },
            flags,
            size_bytes: self.cfg.size_bytes,
            generations: Generations {
                current: self.meta.current,
                bitmap: self.meta.peer_bitmap_gens.get(&peer).copied().unwrap_or(0),
                history: self.meta.history,
            },
            peer_bitmaps: self
                .meta
                .peer_bitmap_gens
                .iter()
                .filter(|(id, g)| **id != peer && **g != 0)
                .map(|(id, g)| PeerBitmap {
                    node: *id,
                    generation: *g,
                })
                // Lost a diskless Primary at our current generation (see `lost_diskless`).
                .chain(
                    self.lost_diskless
                        .filter(|l| *l != peer && self.cfg.diskful)
                        .map(|node| PeerBitmap {
                            node,
                            generation: self.meta.current,
                        }),
                )
                .collect(),
            outdated,
            outdated_gen,
            outdated_by,
            primary_epoch: self.meta.primary_epoch,
            lost_writer: self.lost_writer_now(),
        }
    }

    /// Our `lost_writer` record while it still describes our data (we are at the generation
    /// we lost that Primary at); none otherwise.
    fn lost_writer_now(&self) -> Option<LostWriter> {
        match self.lost_writer {
            Some((l, g)) if self.cfg.diskful && g == self.meta.current => Some(l),
            _ => None,
        }
    }

    /// The `outdated` mask of our reports: as Primary, the diskful peers that are not
    /// connected and lack blocks we have (out-of-sync bits toward them: writes we did without
    /// them); otherwise the mask of the Primary we are connected to. (Not the bitmap
    /// generation: a Secondary that lost its Primary records one without any write.)
    /// With the mask: the generation it belongs to (the Primary's current one) and the
    /// Primary's node id.
    fn outdated_mask(&self) -> (u32, u64, NodeId) {
        if self.diskless_primary() {
            // No bitmaps: the peers we recorded as behind (bitmap generation) while another
            // peer holds our data. There is no handshake with us that would resync them.
            if self.serving_peer().is_none() {
                return (0, 0, 0);
            }
            let mask = self
                .diskful_ids()
                .into_iter()
                .filter(|id| {
                    self.meta.peer_bitmap_gens.get(id).copied().unwrap_or(0) != 0
                        && !self.serves(*id)
                })
                .fold(0, |m, id| m | 1u32 << id);
            return if mask == 0 {
                (0, 0, 0)
            } else {
                (mask, self.meta.current, self.cfg.node_id)
            };
        }
        if self.role == Role::Primary {
            // With a detached disk there is no handshake to tell a connected peer what it
            // missed: every peer with blocks out of sync is listed, connected or not, while
            // another peer holds our data (without one, the peer's copy is the best there is).
            // Also one we recorded as behind (bitmap generation) when we started a generation
            // for a write without it: the report of that generation goes out before the write
            // marks it, and a peer that relays it may be the last word that peer gets from
            // us (simulator seed 8062: it was promoted without our later writes).
            let failed = self.failed();
            let copy_elsewhere = failed && self.serving_peer().is_some();
            let mask = self
                .peers
                .values()
                .filter(|p| {
                    let id = p.cfg.node_id;
                    let behind = self.meta.peer_bitmap_gens.get(&id).copied().unwrap_or(0) != 0;
                    p.cfg.diskful
                        && (p.conn.is_none() || copy_elsewhere)
                        && (!failed || copy_elsewhere)
                        && !(failed && self.serves(id))
                        && (p.bitmap.as_ref().is_some_and(|b| b.count() > 0)
                            || (copy_elsewhere && behind))
                })
                .fold(0, |m, p| m | 1u32 << p.cfg.node_id);
            if mask == 0 {
                (0, 0, 0)
            } else {
                (mask, self.meta.current, self.cfg.node_id)
            }
        } else {
            // The list of the Primary we are connected to; without one, the last list we knew
            // (that Primary's, or ours when we were Primary): a Primary that wrote without a
            // node and then lost its links or demoted would otherwise take the knowledge with
            // it, and that node could be promoted by a majority that holds nobody who has the
            // writes (simulator seeds 3533 and 4896, three diskful: a dual-primary member
            // that wrote without node X demoted, or lost its partner; X was promoted and the
            // two met as a split brain). The receiver's generation check drops it once X
            // caught up.
            self.peers
                .values()
                .filter_map(|p| p.conn.as_ref()?.report.as_ref())
                .find(|r| r.role == Role::Primary)
                .map_or(self.sticky_outdated, |r| {
                    (r.outdated, r.outdated_gen, r.outdated_by)
                })
        }
    }

    /// A peer's report says that a Primary completed writes without us: an UpToDate
    /// Secondary that is not connected to any Primary becomes Outdated (persisted), so it is
    /// not promoted by mistake. A node connected to a Primary learns what it missed from that
    /// Primary's handshake instead (a relayed mask may be stale). Waits while a handshake is
    /// under way (it would be decided on our new state here and on the reported old one
    /// there); called on reports and ticks.
    fn check_outdated(&mut self) {
        let me = 1u32 << self.cfg.node_id;
        if !self.cfg.diskful
            || self.role == Role::Primary
            || self.meta.disk_state != DiskState::UpToDate
        {
            return;
        }
        let reports = || {
            self.peers
                .values()
                .filter_map(|p| p.conn.as_ref()?.report.as_ref())
        };
        // A list made at our own current generation is older than our catching up; one made
        // at a generation we went on from (in our history) is older than our data: its
        // Primary was stale (simulator seed 5218: a node promoted at a generation node 1 had
        // left listed node 1, and a relay outdated the only replica with the newer data).
        let current = self.meta.current;
        let history = self.meta.history;
        // A list of a node we are connected to is stale: that node's own reports and
        // handshake are the authority.
        let connected = |n: NodeId| self.peers.get(&n).is_some_and(|p| p.conn.is_some());
        // A Primary with a detached disk never resyncs us: its own list is the authority,
        // whatever our generation (we may have adopted its current one).
        // A diskless Primary's list too, unless we caught up with its generation since (a
        // resync from a replica that has it; its list may still name us until it noticed).
        let from_detached_primary = |r: &StateReport| {
            r.role == Role::Primary
                && r.outdated_by == r.node_id
                && (r.disk_state == DiskState::Failed
                    || (r.disk_state == DiskState::Diskless && r.outdated_gen != current))
        };
        let Some(by) = reports()
            .find(|r| {
                r.outdated & me != 0
                    && (from_detached_primary(r)
                        || (r.outdated_gen != current
                            && !history.contains(&r.outdated_gen)
                            && !connected(r.outdated_by)))
            })
            .map(|r| r.node_id)
        else {
            return;
        };
        if reports().any(|r| {
            r.role == Role::Primary
                && !matches!(r.disk_state, DiskState::Failed | DiskState::Diskless)
        }) || !self
            .peers_where(false, |c| c.state == ReplState::Connecting)
            .is_empty()
        {
            return;
        }
        self.meta.disk_state = DiskState::Outdated;
        self.persist_meta();
        self.log(
            Level::Warn,
            format!("Outdated: node {by} reports that a Primary completed writes without us"),
        );
        self.broadcast_report(false);
    }

    /// Sends our state to every connected peer; `barrier`: our role changed, peers count
    /// toward quorum again only after answering the Ping that follows.
    fn broadcast_report(&mut self, barrier: bool) {
        self.report_seq += 1;
        self.sent_outdated = self.outdated_mask();
        let ids: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| p.conn.is_some())
            .map(|p| p.cfg.node_id)
            .collect();
        for id in ids {
            let r = self.report_for(id);
            self.note_offer(id, &r);
            self.send(id, Message::StateReport(Box::new(r)));
            if barrier {
                let seq = self.report_seq;
                if let Some(c) = self.conn_mut(id) {
                    c.barrier = seq;
                }
                self.send(id, Message::Ping { token: seq });
            }
        }
    }

    fn send(&mut self, peer: NodeId, msg: Message) {
        let now = self.now;
        if let Some(c) = self.conn_mut(peer) {
            c.last_tx = now;
        }
        self.out.push(Action::Send { peer, msg });
    }

    fn conn_mut(&mut self, peer: NodeId) -> Option<&mut Conn> {
        self.peers.get_mut(&peer).and_then(|p| p.conn.as_mut())
    }

    fn conn(&self, peer: NodeId) -> Option<&Conn> {
        self.peers.get(&peer).and_then(|p| p.conn.as_ref())
    }

    fn become_secondary(&mut self, why: &str) {
        if self.role == Role::Primary {
            self.sticky_outdated = self.outdated_mask();
            // The peers' caches hold our last writes. Flush them, and settle the writes once
            // every peer made them durable (our own disk: `DemoteFlush` below).
            let targets: BTreeSet<NodeId> = self
                .peers
                .values()
                .filter(|p| self.receives_writes(p))
                .map(|p| p.cfg.node_id)
                .collect();
            let seq = self.next_seq;
            self.next_seq += 1;
            for &p in &targets {
                self.send(p, Message::Flush { seq });
            }
            self.demote_flush = (!targets.is_empty()).then_some((seq, targets, true));
        }
        self.role = Role::Secondary;
        // Our own unflushed writes are covered by the activity log only while the metadata
        // says Primary: flush first, then record the demotion (see DemoteFlush).
        let upto = self.al_ctr;
        let io = self.io(IoPurpose::DemoteFlush { upto });
        self.disk(Action::DiskFlush { io });
        self.log(Level::Info, format!("Secondary: {why}"));
        // Requests not yet started fail.
        let mut kept = VecDeque::new();
        for op in std::mem::take(&mut self.waiting) {
            match op.kind {
                OpKind::ClientWrite { id, .. } | OpKind::ClientRead { id } => {
                    self.complete(id, Err(RequestError::NotPrimary))
                }
                _ => kept.push_back(op),
            }
        }
        self.waiting = kept;
        for ev in std::mem::take(&mut self.quorum_wait) {
            if let Event::Write { id, .. } | Event::Flush { id } | Event::Read { id, .. } = ev {
                self.complete(id, Err(RequestError::NotPrimary));
            }
        }
        // Suspended acknowledgements: the writes may be lost (another Primary may win).
        self.fail_held(RequestError::NotPrimary);
        self.fail_parked(RequestError::NotPrimary);
        // Writes that waited for a quorum confirmation fail (no longer Primary).
        self.resolve_confirmation();
        self.broadcast_report(true);
    }

    fn complete(&mut self, id: RequestId, result: Result<Reply, RequestError>) {
        self.out.push(Action::Complete { id, result });
    }

    fn disconnect(&mut self, peer: NodeId, reason: DisconnectReason, detail: String) {
        let reconnect = !matches!(
            reason,
            DisconnectReason::SplitBrain | DisconnectReason::UnrelatedData
        );
        self.log(
            Level::Warn,
            format!("disconnecting node {peer}: {reason:?}: {detail}"),
        );
        self.send(peer, Message::Disconnect { reason, detail });
        self.out.push(Action::Disconnect {
            peer,
            reason,
            reconnect,
        });
        // The link is unusable from now on: behave as if it went down.
        self.peer_down(peer);
    }

    fn protocol_error(&mut self, err: ProtocolError) {
        let peer = match &err {
            ProtocolError::Unexpected(_, p) => *p,
            ProtocolError::Invalid { peer, .. } => *peer,
        };
        self.disconnect(peer, DisconnectReason::ProtocolError, err.to_string());
    }

    // ------------------------------------------------------------------ events

    fn on_event(&mut self, event: Event) {
        self.dispatch(event);
        // Whatever changed (quorum confirmed, a peer lost or back), a diskless Primary may
        // now offer its generation, or resume what it held for a peer holding its data
        // (such a peer can come back by several paths: a report, a finished resync).
        self.send_offers();
        if self.parks()
            && (!self.parked.is_empty() || !self.quorum_wait.is_empty())
            && self.serving_peer().is_some()
        {
            self.unpark();
            self.recheck_quorum_wait();
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Write { .. } | Event::Flush { .. } | Event::Read { .. } => {
                self.client_request(event)
            }
            Event::DiskWriteDone { io, result } => {
                if let Err(e) = &result {
                    self.detach(format!("write failed: {}", e.0));
                }
                self.disk_write_done(io, result)
            }
            Event::DiskReadDone { io, result } => {
                if let Err(e) = &result {
                    self.detach(format!("read failed: {}", e.0));
                }
                self.disk_read_done(io, result)
            }
            Event::DiskFlushDone { io, result } => {
                if let Err(e) = &result {
                    self.detach(format!("flush failed: {}", e.0));
                }
                self.disk_flush_done(io, result)
            }
            Event::DiskFailed { reason } => self.detach(reason),
            Event::PeerUp { peer } => self.peer_up(peer),
            Event::PeerDown { peer } => {
                if self.conn(peer).is_some() {
                    self.log(Level::Info, format!("link to node {peer} down"));
                    self.peer_down(peer);
                }
            }
            Event::PeerMessage { peer, msg } => {
                if self.conn(peer).is_none() {
                    return; // a late message of a closed link
                }
                let now = self.now;
                if let Some(c) = self.conn_mut(peer) {
                    c.last_rx = now;
                }
                if let Err(e) = self.peer_message(peer, msg) {
                    self.protocol_error(e);
                }
            }
            Event::Tick => self.tick(),
            Event::Resize { size_bytes } => self.resize(size_bytes),
            Event::SetResyncRate { bytes_per_sec } => {
                self.resync_rate = bytes_per_sec;
                self.log(
                    Level::Info,
                    format!("resync rate set to {bytes_per_sec} bytes/s"),
                );
                self.pump_resync();
            }
            Event::SetResyncMinRate { bytes_per_sec } => {
                self.resync_min_rate = bytes_per_sec;
                self.log(
                    Level::Info,
                    format!(
                        "resync minimum rate (yield to consumer I/O) set to {bytes_per_sec} bytes/s"
                    ),
                );
                self.pump_resync();
            }
            Event::DiskChecksumDone { io, result } => {
                if let Err(e) = &result {
                    self.detach(format!("read failed: {}", e.0));
                }
                self.disk_checksum_done(io, result)
            }
        }
    }

    /// Counts consumer I/O for the dynamic resync controller.
    fn note_app_io(&mut self, bytes: u64) {
        self.roll_app_io();
        self.app_io.1 = self.app_io.1.saturating_add(bytes);
    }

    fn roll_app_io(&mut self) {
        let now = self.now;
        let (start, cur, _) = self.app_io;
        let age = now.saturating_sub(start);
        if age >= 2 * APP_IO_WINDOW {
            self.app_io = (now, 0, 0);
        } else if age >= APP_IO_WINDOW {
            self.app_io = (start + APP_IO_WINDOW, 0, cur);
        }
    }

    /// Whether the consumer is doing I/O now (the dynamic resync controller yields).
    fn app_busy(&self) -> bool {
        let (start, cur, prev) = self.app_io;
        let age = self.now.saturating_sub(start);
        let recent = if age >= 2 * APP_IO_WINDOW {
            0
        } else if age >= APP_IO_WINDOW {
            cur
        } else {
            cur + prev
        };
        recent > APP_IO_THRESHOLD
    }

    /// Whether the dynamic controller holds the resync below `resync_rate` right now.
    fn resync_yielding(&self) -> bool {
        let (rate, min) = (self.resync_rate, self.resync_min_rate);
        min > 0 && (rate == 0 || min < rate) && self.app_busy()
    }

    /// The resync rate in force (bytes/s, 0 = unlimited): `resync_rate`, or the lower
    /// `resync_min_rate` while the consumer is busy.
    fn effective_resync_rate(&self) -> u64 {
        if self.resync_yielding() {
            self.resync_min_rate
        } else {
            self.resync_rate
        }
    }

    /// The local replica changed size (see [`Event::Resize`]).
    fn resize(&mut self, size_bytes: u64) {
        let old = self.cfg.size_bytes;
        if size_bytes == old {
            return;
        }
        self.cfg.size_bytes = size_bytes;
        for p in self.peers.values_mut() {
            if let Some(b) = p.bitmap.as_mut() {
                b.resize(size_bytes);
            }
        }
        self.log(
            Level::Info,
            format!(
                "resized from {old} to {size_bytes} bytes; usable now {}",
                self.usable_size()
            ),
        );
        // Peers learn the size from our report (StateReport carries size_bytes).
        self.broadcast_report(false);
        // A peer that waited in the handshake for equal sizes may go on now.
        let waiting = self.peers_where(false, |c| c.state == ReplState::Connecting);
        for peer in waiting {
            self.maybe_decide(peer);
        }
    }

    /// Size of the local replica.
    pub fn size_bytes(&self) -> u64 {
        self.cfg.size_bytes
    }

    /// Bytes consumers may read and write: the smallest size of the local replica and of
    /// every connected diskful peer that receives writes (as its last `StateReport` says), so
    /// a write past a peer's end is never sent to it. During a resize this stays at the old
    /// size until every connected replica has the new one.
    pub fn usable_size(&self) -> u64 {
        self.peers
            .values()
            .filter(|p| self.receives_writes(p))
            .filter_map(|p| p.conn.as_ref().and_then(|c| c.report.as_ref()))
            .map(|r| r.size_bytes)
            .fold(self.cfg.size_bytes, u64::min)
    }

    fn client_request(&mut self, ev: Event) {
        let (id, bytes) = match &ev {
            Event::Write { id, data, .. } => (*id, data.len() as u64),
            Event::Read { id, len, .. } => (*id, u64::from(*len)),
            Event::Flush { id } => (*id, 0),
            _ => return,
        };
        self.note_app_io(bytes);
        self.serve_request(id, ev);
    }

    fn serve_request(&mut self, id: RequestId, ev: Event) {
        if self.role != Role::Primary {
            if self.window_member() {
                return self.window_request(ev);
            }
            return self.complete(id, Err(RequestError::NotPrimary));
        }
        let Some(ev) = self.window_queues(ev) else {
            return;
        };
        if !self.quorum_wait.is_empty() {
            // Behind the requests that wait (for quorum, or for a peer holding our data): a
            // later write must not overtake an earlier overlapping one.
            self.quorum_wait.push_back(ev);
            self.recheck_quorum_wait();
            return;
        }
        if self.forwards() {
            if self.serving_peer().is_none() {
                if self.parks() {
                    self.note_suspending();
                    self.quorum_wait.push_back(ev);
                    return;
                }
                let err = self.detached_error();
                return self.complete(id, Err(err));
            }
        } else if self.meta.disk_state != DiskState::UpToDate {
            return self.complete(id, Err(RequestError::NotUpToDate));
        }
        let usable = self.usable_size();
        let out_of_range = match &ev {
            Event::Write { offset, data, .. } => {
                data.is_empty() || offset.saturating_add(data.len() as u64) > usable
            }
            Event::Read { offset, len, .. } => {
                *len == 0 || offset.saturating_add(u64::from(*len)) > usable
            }
            _ => false,
        };
        if out_of_range {
            return self.complete(id, Err(RequestError::OutOfRange));
        }
        let (reachable, voters, ok) = self.quorum();
        // Reads need quorum too: a Primary cut off from the majority may be stale (another
        // node may have been promoted and written since).
        if !ok {
            if self.quorum_possible() || self.suspends() {
                if self.suspends() && self.held.is_empty() && self.quorum_wait.is_empty() {
                    self.log(
                        Level::Warn,
                        "no quorum: consumer I/O suspended (on-no-quorum=suspend)".into(),
                    );
                }
                self.quorum_wait.push_back(ev);
            } else {
                self.complete(id, Err(RequestError::NoQuorum { reachable, voters }));
            }
            return;
        }
        self.start_client(ev);
    }

    fn start_client(&mut self, ev: Event) {
        match ev {
            Event::Write {
                id,
                offset,
                data,
                fua,
            } => {
                let len = data.len() as u64;
                self.enqueue(
                    offset,
                    len,
                    Access::Write,
                    OpKind::ClientWrite { id, data, fua },
                );
            }
            Event::Read { id, offset, len } => self.enqueue(
                offset,
                u64::from(len),
                Access::Read,
                OpKind::ClientRead { id },
            ),
            Event::Flush { id } => self.start_client_flush(Some(id)),
            _ => {}
        }
    }

    /// Before a Primary starts a new generation after losing a link, it confirms that it
    /// still has quorum with a ping round trip (as DRBD 9.0.20 does before a new current
    /// UUID). A partition cuts links one after another; a generation started between two of
    /// them, by a write that then failed for want of quorum, met the generation of the
    /// Primary the others promoted as a split brain (simulator seeds 1782, 3116 and 4458 with
    /// slow disks). True when no new generation is needed, or quorum was confirmed since the
    /// last link loss; otherwise a round starts (if none is under way) and the caller waits
    /// (`resolve_confirmation` resumes it).
    fn quorum_confirmed(&mut self) -> bool {
        if self.peers_needing_new_generation().is_empty() {
            return true;
        }
        if self.mint_confirmed {
            return true;
        }
        if self.confirming {
            return false;
        }
        let ids: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.conn.as_ref().is_some_and(|c| c.report.is_some()))
            .map(|(id, _)| *id)
            .collect();
        if ids.is_empty() {
            // Nobody to ask: the quorum we have is all there is.
            self.mint_confirmed = true;
            return true;
        }
        self.confirming = true;
        self.report_seq += 1;
        self.confirm_token = self.report_seq;
        let token = self.confirm_token;
        for id in ids {
            self.send(id, Message::Ping { token });
        }
        false
    }

    /// The confirmation round ends when enough peers answered for a majority (confirmed),
    /// or when the links left cannot make one (or we are no longer Primary): the writes that
    /// waited start or complete (or fail, or are held).
    fn resolve_confirmation(&mut self) {
        if !self.confirming {
            return;
        }
        let token = self.confirm_token;
        let answered = self
            .peers
            .values()
            .filter(|p| {
                p.conn
                    .as_ref()
                    .is_some_and(|c| c.report.is_some() && c.pong >= token && c.pong >= c.barrier)
            })
            .count() as u8;
        let voters = 1 + self.peers.len() as u8;
        let confirmed = has_majority(1 + answered, voters);
        if !confirmed && self.quorum_possible() && self.role == Role::Primary {
            return;
        }
        self.confirming = false;
        self.mint_confirmed = confirmed;
        for key in std::mem::take(&mut self.complete_wait) {
            self.try_complete_write(key);
        }
        for (key, id, offset, data, fua) in std::mem::take(&mut self.start_wait) {
            self.start_client_write(key, id, offset, data, fua);
        }
    }

    /// Writes wait for quorum confirmation; on each change, retry or fail them.
    fn recheck_quorum_wait(&mut self) {
        self.resolve_confirmation();
        self.release_held();
        if self.quorum_wait.is_empty() {
            return;
        }
        let (reachable, voters, ok) = self.quorum();
        if ok && !(self.parks() && self.serving_peer().is_none()) {
            for ev in std::mem::take(&mut self.quorum_wait) {
                self.start_client(ev);
            }
        } else if !self.quorum_possible() && !self.suspends() {
            for ev in std::mem::take(&mut self.quorum_wait) {
                if let Event::Write { id, .. } | Event::Flush { id } | Event::Read { id, .. } = ev {
                    self.complete(id, Err(RequestError::NoQuorum { reachable, voters }));
                }
            }
        }
    }

    /// Starts a flush of every peer that receives writes and of the local disk: the
    /// consumer's (`id`), or the engine's own (`None`), which bounds what the peers hold
    /// unflushed and leaves the local disk alone (the activity log bounds that side).
    fn start_client_flush(&mut self, id: Option<RequestId>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let key = self.next_key;
        self.next_key += 1;
        let targets: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| self.receives_writes(p))
            .map(|p| p.cfg.node_id)
            .collect();
        for &p in &targets {
            self.send(p, Message::Flush { seq });
        }
        self.flushes.insert(
            key,
            ClientFlushState {
                id,
                local_done: id.is_none(),
                local_error: None,
                waiting: targets.iter().copied().collect(),
                ok_from: BTreeSet::new(),
                seq,
                targets: targets.into_iter().collect(),
            },
        );
        if id.is_none() {
            self.try_complete_flush(key);
            return;
        }
        let upto = self.al_ctr;
        let io = self.io(IoPurpose::ClientFlush { key, upto });
        self.disk(Action::DiskFlush { io });
    }

    // ------------------------------------------------------------------ ordering

    fn enqueue(&mut self, offset: u64, len: u64, access: Access, kind: OpKind) {
        let key = self.next_key;
        self.next_key += 1;
        let op = Op {
            key,
            offset,
            len,
            access,
            kind,
        };
        let blocked = self.active.values().any(|a| conflicts(a, &op))
            || self.waiting.iter().any(|w| conflicts(w, &op));
        if blocked {
            self.waiting.push_back(op);
        } else {
            self.start_op(op);
        }
    }

    fn finish_op(&mut self, key: u64) {
        self.active.remove(&key);
        // Start waiting ops that no longer conflict with active ones or earlier waiters.
        let mut i = 0;
        while i < self.waiting.len() {
            let op = &self.waiting[i];
            let blocked = self.active.values().any(|a| conflicts(a, op))
                || self.waiting.iter().take(i).any(|w| conflicts(w, op));
            if blocked {
                i += 1;
            } else if let Some(op) = self.waiting.remove(i) {
                self.start_op(op);
            }
        }
    }

    fn start_op(&mut self, op: Op) {
        let key = op.key;
        match &op.kind {
            OpKind::ClientWrite { id, data, fua } => {
                let (id, data, fua) = (*id, data.clone(), *fua);
                self.active.insert(key, op.clone());
                self.start_client_write(key, id, op.offset, data, fua);
            }
            OpKind::ClientRead { .. } => {
                self.active.insert(key, op.clone());
                let io = self.io(IoPurpose::Op(key));
                self.disk(Action::DiskRead {
                    io,
                    offset: op.offset,
                    len: op.len as u32,
                });
            }
            OpKind::PeerWrite {
                peer,
                epoch,
                data,
                fua,
                writer_detached,
                ..
            } => {
                let (peer, data, fua) = (*peer, data.clone(), *fua);
                // Sent over the writer's current link: a write of an earlier link that
                // starts only now (it waited behind an overlapping one on a slow disk) is
                // older than what a resync since brings, and does not make blocks current.
                let live = self.conn(peer).is_some_and(|c| c.epoch == *epoch);
                self.active.insert(key, op.clone());
                // Bits toward diskful peers that will not get this write from its writer.
                for id in self.diskful_ids() {
                    if id != peer && !self.in_sync(id) {
                        self.set_bits(id, op.offset, op.len);
                    }
                }
                // As the write arrived: it may start only after an overlapping write ahead
                // of it, when the writer is gone (simulator seed 277 with a slow disk).
                let detached = *writer_detached || self.peer_failed(peer);
                if detached {
                    // A Primary with a detached disk: its own disk misses this write.
                    self.set_bits(peer, op.offset, op.len);
                }
                if !self.peers[&peer].cfg.diskful || detached {
                    // A write of a Primary without a disk of its own (diskless, or its disk
                    // detached): it writes only to the peers that serve it, so a peer we
                    // resync (or may resync: our bitmap went out at the link's start) does
                    // not get it from the Primary, and its resync walks the bitmaps of the
                    // handshake. Tell it (it fetches the blocks unless it got them directly).
                    let targets: Vec<NodeId> = self
                        .peers
                        .values()
                        .filter(|p| {
                            p.cfg.node_id != peer
                                && p.cfg.diskful
                                && p.conn.as_ref().is_some_and(|c| {
                                    matches!(c.state, ReplState::SyncSource | ReplState::Connecting)
                                })
                        })
                        .map(|p| p.cfg.node_id)
                        .collect();
                    for t in targets {
                        if let Some(c) = self.conn_mut(t) {
                            c.late.push((op.offset, op.len));
                        }
                        self.send(
                            t,
                            Message::OutOfSync {
                                flags: 0,
                                ranges: vec![ByteRange {
                                    offset: op.offset,
                                    len: op.len,
                                }],
                            },
                        );
                    }
                }
                if detached {
                    self.pass_on_detached_write(peer, op.offset, op.len);
                }
                if live {
                    self.mark_primary_fresh(peer, op.offset, op.len);
                    // Simulator seed 5670 with a slow disk: a write of the link before the
                    // last break started during the resync that followed and fenced its
                    // blocks; the resync skipped them and the newer data never came.
                    self.fence_resync(op.offset, op.len);
                }
                let io = self.io(IoPurpose::Op(key));
                self.disk(Action::DiskWrite {
                    io,
                    offset: op.offset,
                    data,
                    fua,
                });
            }
            OpKind::ResyncWrite {
                peer,
                epoch,
                id,
                data,
            } => {
                let (peer, epoch, id) = (*peer, *epoch, *id);
                if self.resync_fenced(peer, op.offset, op.len) {
                    // Part of it was overwritten by a newer replicated write meanwhile: drop
                    // it; its other blocks keep their bits and are requested again.
                    if let Some(rs) = self
                        .conn_mut(peer)
                        .filter(|c| c.epoch == epoch)
                        .and_then(|c| c.resync.as_mut())
                    {
                        rs.inflight.remove(&id);
                        rs.cursor = 0;
                    }
                    self.pump_resync();
                    return;
                }
                // A peer whose disk is detached gets nothing: what the resync changes here
                // is out of sync toward it, as the writes we apply from it are (the source
                // marked them toward it, we did not: a re-attached disk that resyncs from us
                // alone must get them too). Also while its link is down (simulator seed 1571,
                // three diskful: a detached Primary's last write reached one replica after
                // the links broke, the other got it by this resync, and the repaired disk
                // resynced from the other without it).
                for id in self.diskful_ids() {
                    if id != peer && (self.peer_failed(id) || self.detached_seen.contains(&id)) {
                        self.set_bits(id, op.offset, op.len);
                    }
                }
                let data = data
                    .clone()
                    // A range that reads as zeros on the source may stay a hole here.
                    .or_else(|| zeroes::zeroes(op.len as usize))
                    .unwrap_or_else(|| Bytes::from(vec![0u8; op.len as usize]));
                self.active.insert(key, op.clone());
                let io = self.io(IoPurpose::Op(key));
                self.disk(Action::DiskWrite {
                    io,
                    offset: op.offset,
                    data,
                    fua: false,
                });
            }
            OpKind::ResyncRead { .. } | OpKind::PeerRead { .. } => {
                self.active.insert(key, op.clone());
                let io = self.io(IoPurpose::Op(key));
                self.disk(Action::DiskRead {
                    io,
                    offset: op.offset,
                    len: op.len as u32,
                });
            }
            OpKind::VerifyLocal { req } => {
                let req = *req;
                self.start_verify_local(&op, req);
            }
            OpKind::ChecksumAnswer { block_size, .. } => {
                let block_size = *block_size;
                self.start_checksum_answer(&op, block_size);
            }
            OpKind::ResyncCheckLocal { .. } => {
                let g = self.cfg.bitmap_granularity;
                self.start_checksum_answer(&op, g);
            }
        }
    }

    /// A write of the Primary `peer`, whose disk is detached, is being applied here. It writes
    /// only to the peers that serve it; the peers it lists as outdated (in its report) do not
    /// get it, though they may look in sync to us (they caught up through us). Mark it toward
    /// them and, when we can, resync it to them online now (its own marks live in its memory
    /// only: a restart of the detached Primary loses them).
    fn pass_on_detached_write(&mut self, peer: NodeId, offset: u64, len: u64) {
        let mask = self
            .conn(peer)
            .and_then(|c| c.report.as_ref())
            .map_or(0, |r| r.outdated);
        let skipped: Vec<NodeId> = self
            .diskful_ids()
            .into_iter()
            .filter(|id| *id != peer && mask & (1u32 << id) != 0 && self.in_sync(*id))
            .collect();
        for id in skipped {
            self.set_bits(id, offset, len);
            if self.meta.disk_state == DiskState::UpToDate && self.role == Role::Secondary {
                self.resync_online(id, vec![ByteRange { offset, len }]);
            }
        }
    }

    /// The Primary `peer`, whose disk is detached, now lists the nodes in `mask` as outdated:
    /// it completed writes without them, maybe writes it sent us before this report (it
    /// decides to skip a peer before its report says so, see `pass_on_detached_write` for
    /// the writes after). Its writes we keep unsettled are all it may have skipped them with
    /// (it reports a changed list before it settles, see `report_outdated_change`): mark them
    /// toward those nodes and, when they look in sync to us, resync them there online
    /// (simulator seed 2063: a replica it skipped while that one finished an online resync
    /// later caught up from us without the write).
    fn newly_outdated_by_detached(&mut self, peer: NodeId, mask: u32) {
        if mask == 0 {
            return;
        }
        let ranges: Vec<(u64, u64)> = self
            .conn(peer)
            .map(|c| c.unsettled.values().copied().collect())
            .unwrap_or_default();
        if ranges.is_empty() {
            return;
        }
        let me = self.cfg.node_id;
        let ids: Vec<NodeId> = self
            .diskful_ids()
            .into_iter()
            .filter(|id| *id != peer && *id != me && mask & (1u32 << id) != 0)
            .collect();
        for id in ids {
            for &(off, len) in &ranges {
                self.set_bits(id, off, len);
            }
            if self.in_sync(id)
                && self.meta.disk_state == DiskState::UpToDate
                && self.role == Role::Secondary
            {
                let online = ranges
                    .iter()
                    .map(|&(offset, len)| ByteRange { offset, len })
                    .collect();
                self.resync_online(id, online);
            }
        }
    }

    /// Before a Primary with a detached disk declares writes `Settled`: a changed `outdated`
    /// list goes out first, so a peer still holds the writes it may have to mark toward the
    /// nodes newly listed (`newly_outdated_by_detached`). Not during a handshake (see
    /// `tick`): then the writes stay unsettled until a later flush. Returns whether
    /// `Settled` may be sent now.
    fn report_outdated_change(&mut self) -> bool {
        if !self.failed() || self.outdated_mask() == self.sent_outdated {
            return true;
        }
        let handshaking = !self
            .peers_where(false, |c| c.state == ReplState::Connecting)
            .is_empty();
        if handshaking {
            return false;
        }
        self.broadcast_report(false);
        true
    }

    /// A write of the Primary `peer` is being applied here: the blocks it covers completely
    /// are current for as long as the link to it stays up (see [`PrimaryFresh`]).
    fn mark_primary_fresh(&mut self, peer: NodeId, offset: u64, len: u64) {
        let Some(epoch) = self.conn(peer).map(|c| c.epoch) else {
            return;
        };
        if self.peer_failed(peer) {
            // A Primary with a detached disk may skip us with its next write.
            return;
        }
        let stale = self
            .primary_fresh
            .as_ref()
            .is_none_or(|f| f.primary != peer || f.epoch != epoch);
        if stale {
            self.primary_fresh = Some(PrimaryFresh {
                primary: peer,
                epoch,
                bits: Bitmap::new(self.cfg.size_bytes, self.cfg.bitmap_granularity),
            });
        }
        if let Some(f) = self.primary_fresh.as_mut() {
            let (first, count) = f.bits.bits_covered(offset, len);
            f.bits.set_bits(first, count);
        }
    }

    /// Starting a resync from `source`: if it is not the Primary we receive writes from, the
    /// blocks that Primary already gave us are current; clear their bits toward the source
    /// instead of fetching them (its copy may be older: it may not have applied the same
    /// writes yet). Writes that arrive during the resync are fenced by `fence_resync`.
    fn skip_primary_fresh(&mut self, source: NodeId) {
        let Some(f) = self.primary_fresh.as_ref() else {
            return;
        };
        let live = self.conn(f.primary).is_some_and(|c| c.epoch == f.epoch)
            && peer_role(&self.peers[&f.primary]) == Some(Role::Primary)
            && !self.peer_failed(f.primary);
        if f.primary == source || !live {
            return;
        }
        let Some(b) = self.peers.get_mut(&source).and_then(|p| p.bitmap.as_mut()) else {
            return;
        };
        let mut cleared = Vec::new();
        let mut bit = 0;
        while let Some(first) = f.bits.next_set(bit) {
            bit = first + 1;
            if b.test(first) {
                b.clear_bits(first, 1);
                cleared.push(first);
            }
        }
        if !cleared.is_empty() {
            self.log(
                Level::Info,
                format!(
                    "resync from node {source}: {} blocks already current from Primary node {}",
                    cleared.len(),
                    f.primary
                ),
            );
        }
        for first in cleared {
            self.out.push(Action::PersistBits {
                peer: source,
                set: false,
                first,
                count: 1,
            });
        }
    }

    /// A replicated write is being applied here: if we are a sync target, the blocks it
    /// covers completely are current now.
    fn fence_resync(&mut self, offset: u64, len: u64) {
        let mut persist = Vec::new();
        for p in self.peers.values_mut() {
            let Some(rs) = p.conn.as_mut().and_then(|c| c.resync.as_mut()) else {
                continue;
            };
            let Some(b) = p.bitmap.as_mut() else { continue };
            let (first, count) = b.bits_covered(offset, len);
            for bit in first..first + count {
                if b.test(bit) {
                    b.clear_bits(bit, 1);
                    rs.fenced.insert(bit);
                    persist.push((p.cfg.node_id, bit));
                }
            }
        }
        for (peer, bit) in persist {
            self.out.push(Action::PersistBits {
                peer,
                set: false,
                first: bit,
                count: 1,
            });
        }
    }

    /// The disk state we report to `peer` (and decide its handshake on): Inconsistent
    /// toward third nodes while a finished resync into us is unconfirmed.
    fn disk_state_for(&self, peer: NodeId) -> DiskState {
        match self.unconfirmed_source {
            Some((src, _)) if src != peer => DiskState::Inconsistent,
            _ => self.meta.disk_state,
        }
    }

    /// The source of the resync that finished into us confirmed it (or started another one,
    /// or is gone): every peer may see our real disk state now.
    fn confirm_resync(&mut self, peer: NodeId) {
        if self.unconfirmed_source.is_some_and(|(src, _)| src == peer) {
            self.unconfirmed_source = None;
            if self.meta.disk_state == DiskState::UpToDate {
                // Handshakes decided on the Inconsistent we told those peers found no good
                // data here and wait: compare again (see `disk_state_for`).
                let waiting = self.peers_where(true, |c| {
                    c.state == ReplState::PausedSync
                        && matches!(c.decision, Some((SyncDecision::NoGoodData, _)))
                });
                for id in waiting {
                    self.disconnect(
                        id,
                        DisconnectReason::ConfigChanged,
                        format!("node {peer} confirmed our resync; reconnect to compare"),
                    );
                }
            }
            self.broadcast_report(false);
        }
    }

    /// We lost a writer with `ranges` not settled (marked toward every diskful peer) while
    /// resyncs run: links in a resync are not closed to compare again, as established ones
    /// are, so the running resyncs take these blocks too, in the resync's direction (the
    /// source's copy is the one kept: a write it lacks was not acknowledged). A target
    /// fetches them from its source; a source tells its target (`OutOfSync`, as for late
    /// writes, see `Conn::late`). Found with `SimOptions::strict_end`, simulator seed 4136:
    /// a target kept marks toward its source for good, and a source clears its marks when
    /// the resync ends, so a write only it had would have stayed missing on the target.
    fn resync_lost_unsettled(&mut self, ranges: &[(u64, u64)]) {
        if ranges.is_empty() {
            return;
        }
        let byte_ranges: Vec<ByteRange> = ranges
            .iter()
            .map(|&(offset, len)| ByteRange { offset, len })
            .collect();
        let sources = self.peers_where(true, |c| {
            c.state == ReplState::SyncTarget && c.resync.as_ref().is_some_and(|rs| !rs.finishing)
        });
        for source in sources {
            // The ranges come from writes we applied: inside the volume.
            let _ = self.late_marks(source, &byte_ranges);
        }
        let targets = self.peers_where(true, |c| c.state == ReplState::SyncSource);
        for target in targets {
            if let Some(c) = self.conn_mut(target) {
                c.late.extend_from_slice(ranges);
            }
            for chunk in byte_ranges.chunks(OOS_CHUNK) {
                self.send(
                    target,
                    Message::OutOfSync {
                        flags: 0,
                        ranges: chunk.to_vec(),
                    },
                );
            }
        }
    }

    /// We answer a resync read of `target`: after it applies these blocks its data is ours
    /// there, so where we mark them out of sync toward a third diskful node, it must too
    /// (sent ahead of the data, on the same link). Simulator seed 9705 (three diskful and a
    /// witness): a diskless Primary crashed with two writes that reached node 1 only; node 1
    /// resynced them to node 2 (rule `EqualBitsLowerNode`), node 0 then resynced its older
    /// blocks to node 1 by the same rule, and node 2, which had not recorded that it now
    /// differed from node 0 there (only node 1 had), stayed different for good.
    fn pass_on_third_marks(&mut self, target: NodeId, offset: u64, len: u64) {
        if !self.cfg.diskful {
            return;
        }
        let mut msgs = Vec::new();
        for id in self.diskful_ids() {
            if id == target {
                continue;
            }
            let Some(b) = self.peers.get(&id).and_then(|p| p.bitmap.as_ref()) else {
                continue;
            };
            let g = b.granularity();
            let (first, count) = b.bits_touching(offset, len);
            let mut ranges: Vec<ByteRange> = Vec::new();
            for bit in first..first + count {
                if !b.test(bit) {
                    continue;
                }
                let start = (bit * g).max(offset);
                let end = ((bit + 1) * g).min(offset + len);
                match ranges.last_mut() {
                    Some(r) if r.offset + r.len == start => r.len = end - r.offset,
                    _ => ranges.push(ByteRange {
                        offset: start,
                        len: end - start,
                    }),
                }
            }
            if !ranges.is_empty() {
                msgs.push((id, ranges));
            }
        }
        for (id, ranges) in msgs {
            for chunk in ranges.chunks(OOS_CHUNK) {
                self.send(
                    target,
                    Message::OutOfSync {
                        flags: oos_flags::THIRD_NODE
                            | (u32::from(id) << oos_flags::THIRD_NODE_SHIFT),
                        ranges: chunk.to_vec(),
                    },
                );
            }
        }
    }

    /// Our sync source applied writes of a diskless Primary after the handshake: fetch those
    /// blocks too, except the ones that Primary gave us directly over the current link
    /// (ours are as new or newer).
    fn late_marks(&mut self, peer: NodeId, ranges: &[ByteRange]) -> Result<(), ProtocolError> {
        for r in ranges {
            if r.offset.saturating_add(r.len) > self.cfg.size_bytes || r.len == 0 {
                return Err(ProtocolError::Invalid {
                    peer,
                    detail: "out-of-sync range outside the volume".into(),
                });
            }
        }
        let fresh = self.primary_fresh.as_ref().filter(|f| {
            self.conn(f.primary).is_some_and(|c| c.epoch == f.epoch)
                && peer_role(&self.peers[&f.primary]) == Some(Role::Primary)
                && !self.peer_failed(f.primary)
        });
        let mut bits = Vec::new();
        if let Some(b) = self.peers.get(&peer).and_then(|p| p.bitmap.as_ref()) {
            for r in ranges {
                let (first, count) = b.bits_touching(r.offset, r.len);
                for bit in first..first + count {
                    if !fresh.is_some_and(|f| f.bits.test(bit)) {
                        bits.push(bit);
                    }
                }
            }
        }
        // Resync data received before this message (older than the write it reports) and
        // not written yet: its completion must leave these bits set.
        let g = self.cfg.bitmap_granularity as u64;
        let pending: Vec<(u64, u64)> = self
            .active
            .values()
            .chain(self.waiting.iter())
            .filter(|o| matches!(o.kind, OpKind::ResyncWrite { peer: p, .. } if p == peer))
            .map(|o| (o.offset, o.len))
            .collect();
        let mut persist = Vec::new();
        if let Some(p) = self.peers.get_mut(&peer)
            && let (Some(b), Some(rs)) = (
                p.bitmap.as_mut(),
                p.conn.as_mut().and_then(|c| c.resync.as_mut()),
            )
        {
            for bit in bits {
                // Every write pending now predates this mark.
                let older = pending
                    .iter()
                    .filter(|(off, len)| overlaps(*off, *len, bit * g, g))
                    .count() as u32;
                if older > 0 {
                    rs.remark.insert(bit, older);
                }
                rs.fenced.remove(&bit);
                if b.set_bits(bit, 1) > 0 {
                    rs.total += b.granularity();
                    persist.push(bit);
                }
            }
            rs.cursor = 0;
        }
        for bit in persist {
            self.out.push(Action::PersistBits {
                peer,
                set: true,
                first: bit,
                count: 1,
            });
        }
        self.pump_resync();
        Ok(())
    }

    fn resync_fenced(&self, peer: NodeId, offset: u64, len: u64) -> bool {
        let Some(p) = self.peers.get(&peer) else {
            return false;
        };
        let (Some(rs), Some(b)) = (p.conn.as_ref().and_then(|c| c.resync.as_ref()), &p.bitmap)
        else {
            return false;
        };
        let (first, count) = b.bits_touching(offset, len);
        rs.fenced.range(first..first + count).next().is_some()
    }

    fn start_client_write(&mut self, key: u64, id: RequestId, offset: u64, data: Bytes, fua: bool) {
        // Quorum and role are checked when the request arrives; a write that waited behind
        // others (an overlapping one, the dual-primary window's write token) may start after
        // they are gone: it fails before it touches the disk or starts a generation
        // (simulator seed 5110: an isolated window member wrote such a write locally under a
        // new generation, and the heal found a split brain). With on-no-quorum=suspend it
        // goes on and is held, as one in flight at the loss would be (no generation, below).
        let (reachable, voters, ok) = self.quorum();
        if (!ok && !self.suspends()) || self.role != Role::Primary {
            self.complete(id, Err(RequestError::NoQuorum { reachable, voters }));
            self.finish_op(key);
            return;
        }
        let len = data.len() as u64;
        // Without quorum (held under `suspend`) the write lands here but starts no
        // generation: the others may fail over meanwhile, and a generation of ours would
        // then be a split brain (simulator seed 1260 with slow disks). Its bits toward the
        // peers cover it; the generation starts when the held writes are acknowledged
        // (`release_held`) or with the next write under quorum. And a generation starts
        // only after a ping round trip confirmed quorum since the last link loss (see
        // `quorum_confirmed`): the write waits for it, still holding its place.
        if ok && self.mint_pending && !self.quorum_confirmed() {
            self.start_wait.push_back((key, id, offset, data, fua));
            return;
        }
        if self.mint_pending && ok {
            self.mint_pending = false;
            let missing = self.peers_needing_new_generation();
            if !missing.is_empty() {
                self.mint(&format!(
                    "first write without diskful nodes {missing:?} in sync"
                ));
                self.persist_meta();
                self.broadcast_report(false);
            }
        }
        // Activity log: hot extents persisted before the write.
        let ext = self.cfg.al_extent_bytes;
        let extents: Vec<u64> = if self.forwards() {
            Vec::new() // nothing is written locally
        } else {
            (offset / ext..=(offset + len - 1) / ext).collect()
        };
        let mut changed = false;
        for &x in &extents {
            self.al_lru += 1;
            let lru = self.al_lru;
            let e = self.al.entry(x).or_insert_with(|| {
                changed = true;
                Extent::default()
            });
            e.inflight += 1;
            e.lru = lru;
        }
        if changed {
            self.al_evict();
            let snap: Vec<u64> = self.al.keys().copied().collect();
            self.out.push(Action::PersistActivityLog(snap));
        }
        let waiting = self.replicate_write(key, offset, &data, fua);
        if self.failed() {
            // A detached Primary tells a connected peer it skipped at once, not at the next
            // tick: there is no handshake with us to tell it, and a handshake with the peer
            // that got the write could make it that peer's source meanwhile (simulator seed
            // 4548 with slow disks, three diskful: it overwrote an acknowledged write).
            self.report_outdated_change();
        }
        // Peers index pending writes by seq; keep key <-> seq through the state.
        self.writes.insert(
            key,
            ClientWriteState {
                id,
                local_done: false,
                local_error: None,
                waiting,
                ok_from: BTreeSet::new(),
                extents,
            },
        );
        let io = self.io(IoPurpose::Op(key));
        self.disk(Action::DiskWrite {
            io,
            offset,
            data,
            fua,
        });
    }

    /// Sends consumer write `key` to the peers that receive writes (marking it toward those
    /// that do not) under a new sequence number; returns the peers it waits for.
    fn replicate_write(
        &mut self,
        key: u64,
        offset: u64,
        data: &Bytes,
        fua: bool,
    ) -> BTreeSet<NodeId> {
        let len = data.len() as u64;
        // Bits toward diskful peers that will not get it.
        let mut waiting = BTreeSet::new();
        let ids = self.diskful_ids();
        let seq = self.next_seq;
        self.next_seq += 1;
        self.seq_to_key.insert(seq, key);
        for pid in ids {
            let receives = self
                .peers
                .get(&pid)
                .is_some_and(|p| self.receives_writes(p));
            if receives {
                waiting.insert(pid);
            } else {
                self.set_bits(pid, offset, len);
            }
        }
        // A diskless Primary has no bitmap: the replicas that get this write mark it toward
        // the diskful ones that do not (one may look in sync to them: it caught up through
        // them while our link to it was down or not reported yet).
        let missing: Vec<NodeId> = if self.cfg.diskful {
            Vec::new()
        } else {
            self.parent_complete.retain(|id| waiting.contains(id));
            for p in self.peers.values_mut() {
                if let Some(c) = p
                    .conn
                    .as_mut()
                    .filter(|_| !waiting.contains(&p.cfg.node_id))
                {
                    c.offer_missed |= c.offered;
                }
            }
            self.diskful_ids()
                .into_iter()
                .filter(|id| !waiting.contains(id))
                .collect()
        };
        for &pid in &waiting {
            for &m in &missing {
                self.send(
                    pid,
                    Message::OutOfSync {
                        flags: oos_flags::THIRD_NODE
                            | (u32::from(m) << oos_flags::THIRD_NODE_SHIFT),
                        ranges: vec![ByteRange { offset, len }],
                    },
                );
            }
            if let Some(c) = self.conn_mut(pid) {
                c.unacked.insert(seq, (offset, len));
            }
            self.send(
                pid,
                Message::Write {
                    seq,
                    offset,
                    flags: if fua { write_flags::FUA } else { 0 },
                    data: data.clone(),
                },
            );
        }
        waiting
    }

    fn al_evict(&mut self) {
        if self.forwards() {
            return; // nothing is written locally any more
        }
        while self.al.len() > self.cfg.al_extents {
            let victim = self
                .al
                .iter()
                .filter(|(_, e)| e.inflight == 0 && e.last_done <= self.al_flushed)
                .min_by_key(|(_, e)| e.lru)
                .map(|(x, _)| *x);
            match victim {
                Some(x) => {
                    self.al.remove(&x);
                }
                None => {
                    // Everything hot is busy or not yet durable: flush so extents become
                    // evictable; the log stays larger meanwhile.
                    if !self.al_flush_pending && self.al.values().any(|e| e.inflight == 0) {
                        self.al_flush_pending = true;
                        let upto = self.al_ctr;
                        let io = self.io(IoPurpose::AlFlush { upto });
                        self.disk(Action::DiskFlush { io });
                    }
                    break;
                }
            }
        }
    }
}

impl Engine {
    // ------------------------------------------------------------------ completions

    fn disk_write_done(&mut self, io: IoId, result: Result<(), DiskError>) {
        let Some(IoPurpose::Op(key)) = self.ios.remove(&io) else {
            return;
        };
        let Some(op) = self.active.get(&key).cloned() else {
            return;
        };
        match op.kind {
            OpKind::ClientWrite { .. } => {
                self.al_ctr += 1;
                let ctr = self.al_ctr;
                let failed = self.forwards();
                if let Some(w) = self.writes.get_mut(&key) {
                    w.local_done = true;
                    if let Err(e) = &result
                        && !failed
                    {
                        w.local_error = Some(e.0.clone());
                    }
                    for x in w.extents.clone() {
                        if let Some(e) = self.al.get_mut(&x) {
                            e.inflight -= 1;
                            e.last_done = ctr;
                        }
                    }
                }
                self.try_complete_write(key);
            }
            OpKind::PeerWrite {
                peer, epoch, seq, ..
            } => {
                let status = if result.is_ok() {
                    WireStatus::Ok
                } else {
                    WireStatus::IoError
                };
                self.finish_op(key);
                if self.conn(peer).is_some_and(|c| c.epoch == epoch) {
                    self.send(peer, Message::WriteAck { seq, status });
                    if let Some(c) = self.conn_mut(peer) {
                        c.rx_inflight.remove(&seq);
                    }
                    self.release_peer_flushes(peer);
                } else if result.is_ok() && !self.peer_writes_pending(peer, epoch) {
                    // The link to the writer went down while its writes were on their way to
                    // our disk: the flush we made when we lost it (see `peer_down`) did not
                    // cover them, and a crashed writer knew them as unflushed only in its
                    // memory. Make them durable now.
                    let upto = self.al_ctr;
                    let io = self.io(IoPurpose::AlFlush { upto });
                    self.disk(Action::DiskFlush { io });
                }
            }
            OpKind::ResyncWrite {
                peer, epoch, id, ..
            } => {
                self.finish_op(key);
                let ok = result.is_ok();
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                let Some(c) = p.conn.as_mut().filter(|c| c.epoch == epoch) else {
                    return;
                };
                let Some(rs) = c.resync.as_mut() else { return };
                rs.inflight.remove(&id);
                if ok {
                    rs.done += op.len;
                    if let Some(b) = p.bitmap.as_mut() {
                        let (first, count) = b.bits_covered(op.offset, op.len);
                        let mut cleared = Vec::new();
                        for bit in first..first + count {
                            let keep = match rs.remark.get_mut(&bit) {
                                Some(n) => {
                                    *n -= 1;
                                    if *n == 0 {
                                        rs.remark.remove(&bit);
                                    }
                                    true
                                }
                                None => false,
                            };
                            if !keep && b.test(bit) {
                                b.clear_bits(bit, 1);
                                cleared.push(bit);
                            }
                        }
                        // One persist per run of cleared bits.
                        let mut runs: Vec<(u64, u64)> = Vec::new();
                        for bit in cleared {
                            match runs.last_mut() {
                                Some((f, n)) if *f + *n == bit => *n += 1,
                                _ => runs.push((bit, 1)),
                            }
                        }
                        for (first, count) in runs {
                            self.out.push(Action::PersistBits {
                                peer,
                                set: false,
                                first,
                                count,
                            });
                        }
                    }
                } else {
                    self.disconnect(
                        peer,
                        DisconnectReason::IoError,
                        "local write of resync data failed".into(),
                    );
                    return;
                }
                self.pump_resync();
            }
            _ => {}
        }
    }

    fn try_complete_write(&mut self, key: u64) {
        let Some(w) = self.writes.get(&key) else {
            return;
        };
        // With a detached disk the peers hold the only copy: protocol C semantics.
        let peers_done =
            w.waiting.is_empty() || (self.cfg.protocol == Protocol::A && !self.forwards());
        if !(w.local_done && peers_done) {
            return;
        }
        if self.parks() && w.local_error.is_none() && !w.ok_from.iter().any(|p| self.serves(*p)) {
            // No peer that holds our data has it: sent again once one is back.
            self.note_suspending();
            self.seq_to_key.retain(|_, k| *k != key);
            self.parked.push(Parked::Write(key));
            self.unpark();
            return;
        }
        let (reachable, voters, ok) = self.quorum();
        // A write that would complete under a new generation waits for a ping round trip
        // that confirms quorum since the last link loss (`quorum_confirmed`).
        // (Tested last to first cost: nothing more per write while no generation is due.)
        let succeeds = || {
            self.role == Role::Primary
                && self.writes.get(&key).is_some_and(|w| {
                    w.local_error.is_none()
                        && (!self.forwards() || w.ok_from.iter().any(|p| self.serves(*p)))
                })
        };
        if ok && self.mint_pending && succeeds() && !self.quorum_confirmed() {
            if !self.complete_wait.contains(&key) {
                self.complete_wait.push(key);
            }
            return;
        }
        let Some(w) = self.writes.remove(&key) else {
            return;
        };
        self.seq_to_key.retain(|_, k| *k != key);
        let result = if let Some(e) = w.local_error {
            Err(RequestError::Io(e))
        } else if self.forwards() && !w.ok_from.iter().any(|p| self.serves(*p)) {
            Err(self.detached_error())
        } else if !ok && self.hold_completion(w.id) {
            // Acknowledged when quorum is back (on-no-quorum=suspend).
            self.finish_op(key);
            self.al_evict();
            return;
        } else if !ok || self.role != Role::Primary {
            Err(RequestError::NoQuorum { reachable, voters })
        } else {
            Ok(Reply::Done)
        };
        // A write that completes without a diskful peer that dropped out of it must be under
        // a new generation (persisted before the completion), or that peer would later look
        // equal to us.
        if result.is_ok() && self.mint_pending {
            let missing = self.peers_needing_new_generation();
            if !missing.is_empty() {
                self.mint_pending = false;
                self.mint(&format!(
                    "write completed without diskful nodes {missing:?}"
                ));
                self.persist_meta();
                self.broadcast_report(false);
            }
        }
        self.complete(w.id, result);
        self.finish_op(key);
        self.al_evict();
    }

    fn try_complete_flush(&mut self, key: u64) {
        let Some(f) = self.flushes.get(&key) else {
            return;
        };
        if !(f.local_done && f.waiting.is_empty()) {
            return;
        }
        if self.parks() && f.local_error.is_none() && !f.ok_from.iter().any(|p| self.serves(*p)) {
            let id = f.id;
            self.flushes.remove(&key);
            // The engine's own flush is not retried: the next bound starts another.
            if let Some(id) = id {
                self.note_suspending();
                self.parked.push(Parked::Flush(id));
                self.unpark();
            }
            return;
        }
        let Some(f) = self.flushes.remove(&key) else {
            return;
        };
        let (reachable, voters, ok) = self.quorum();
        let result = if let Some(e) = f.local_error {
            Err(RequestError::Io(e))
        } else if self.forwards() && !f.ok_from.iter().any(|p| self.serves(*p)) {
            Err(self.detached_error())
        } else if !ok && f.id.is_some_and(|id| self.hold_completion(id)) {
            return;
        } else if !ok || self.role != Role::Primary {
            Err(RequestError::NoQuorum { reachable, voters })
        } else {
            Ok(Reply::Done)
        };
        if result.is_ok() && self.role == Role::Primary {
            // Every write before this flush is durable on every peer that receives writes
            // (a peer that dropped out since was given a new generation, which its peers
            // adopted, marking what it may lack): its peers may forget them.
            let receivers: Vec<NodeId> = self
                .peers
                .values()
                .filter(|p| self.receives_writes(p))
                .map(|p| p.cfg.node_id)
                .collect();
            if receivers.iter().all(|id| f.targets.contains(id)) && self.report_outdated_change() {
                for id in receivers {
                    self.send(id, Message::Settled { seq: f.seq });
                }
            }
        }
        if let Some(id) = f.id {
            self.complete(id, result);
        }
    }

    /// After a peer's `WriteAck`: flushes on our own when it holds
    /// [`Config::flush_after_writes`] writes no flush covers yet (one such flush at a time).
    fn bound_unflushed(&mut self, peer: NodeId) {
        let many = self
            .conn(peer)
            .is_some_and(|c| c.unflushed.len() >= self.cfg.flush_after_writes.max(1));
        if many && self.role == Role::Primary && !self.flushes.values().any(|f| f.id.is_none()) {
            self.start_client_flush(None);
        }
    }

    fn disk_read_done(&mut self, io: IoId, result: Result<Bytes, DiskError>) {
        let Some(IoPurpose::Op(key)) = self.ios.remove(&io) else {
            return;
        };
        let Some(op) = self.active.get(&key).cloned() else {
            return;
        };
        if matches!(op.kind, OpKind::ClientRead { .. }) && result.is_err() && self.forwards() {
            // Detached: a peer that holds our data answers instead (the op stays active, so
            // the ordering holds until its reply).
            self.forward_read(key);
            return;
        }
        // Answer first, then release the ops that waited for this read: a waiting write of
        // the same blocks sends its `Write` on the same link, and it must arrive after the
        // (older) data read here, or the peer applies the older data last.
        self.answer_read(&op, result);
        self.finish_op(key);
    }

    fn answer_read(&mut self, op: &Op, result: Result<Bytes, DiskError>) {
        match op.kind {
            OpKind::ClientRead { id } => {
                let r = match result {
                    Ok(d) => Ok(Reply::Data(d)),
                    Err(e) => Err(RequestError::Io(e.0)),
                };
                self.complete(id, r);
            }
            OpKind::ResyncRead { peer, epoch, id } => {
                if self.conn(peer).is_none_or(|c| c.epoch != epoch) {
                    return;
                }
                if result.is_ok() {
                    self.pass_on_third_marks(peer, op.offset, op.len);
                }
                let msg = match result {
                    Ok(d) if d.iter().all(|b| *b == 0) => Message::ResyncData {
                        id,
                        offset: op.offset,
                        status: WireStatus::Ok,
                        flags: resync_flags::ZERO,
                        len: op.len as u32,
                        data: Bytes::new(),
                    },
                    Ok(d) => Message::ResyncData {
                        id,
                        offset: op.offset,
                        status: WireStatus::Ok,
                        flags: 0,
                        len: op.len as u32,
                        data: d,
                    },
                    Err(_) => Message::ResyncData {
                        id,
                        offset: op.offset,
                        status: WireStatus::IoError,
                        flags: 0,
                        len: op.len as u32,
                        data: Bytes::new(),
                    },
                };
                self.send(peer, msg);
            }
            OpKind::PeerRead { peer, epoch, seq } => {
                if self.conn(peer).is_none_or(|c| c.epoch != epoch) {
                    return;
                }
                let (status, data) = match result {
                    Ok(d) => (WireStatus::Ok, d),
                    Err(_) => (WireStatus::IoError, Bytes::new()),
                };
                self.send(peer, Message::ReadReply { seq, status, data });
            }
            _ => {}
        }
    }

    fn disk_flush_done(&mut self, io: IoId, result: Result<(), DiskError>) {
        let Some(purpose) = self.ios.remove(&io) else {
            return;
        };
        match purpose {
            IoPurpose::ClientFlush { key, upto } => {
                if result.is_ok() {
                    self.al_flushed = self.al_flushed.max(upto);
                }
                let failed = self.forwards();
                if let Some(f) = self.flushes.get_mut(&key) {
                    f.local_done = true;
                    if let Err(e) = result
                        && !failed
                    {
                        f.local_error = Some(e.0);
                    }
                }
                self.try_complete_flush(key);
                self.al_evict();
            }
            IoPurpose::DemoteFlush { upto } => {
                if result.is_ok() {
                    self.al_flushed = self.al_flushed.max(upto);
                    if self.role == Role::Secondary && self.meta.primary {
                        self.meta.primary = false;
                        self.persist_meta();
                        self.al.clear();
                        if self.cfg.diskful {
                            self.out.push(Action::PersistActivityLog(Vec::new()));
                        }
                    }
                }
            }
            IoPurpose::AlFlush { upto } => {
                self.al_flush_pending = false;
                if result.is_ok() {
                    self.al_flushed = self.al_flushed.max(upto);
                }
                self.al_evict();
            }
            IoPurpose::PeerFlush { peer, epoch, seq } => {
                if self.conn(peer).is_some_and(|c| c.epoch == epoch) {
                    let status = if result.is_ok() {
                        WireStatus::Ok
                    } else {
                        WireStatus::IoError
                    };
                    self.send(peer, Message::FlushAck { seq, status });
                }
            }
            IoPurpose::ResyncFinishFlush { peer, epoch } => {
                if self.conn(peer).is_none_or(|c| c.epoch != epoch) {
                    return;
                }
                if result.is_err() {
                    self.disconnect(peer, DisconnectReason::IoError, "flush failed".into());
                    return;
                }
                self.resync_target_finished(peer);
            }
            IoPurpose::Op(_) => {}
        }
    }

    // ------------------------------------------------------------------ links

    fn peer_up(&mut self, peer: NodeId) {
        if !self.peers.contains_key(&peer) {
            self.log(Level::Warn, format!("PeerUp for unknown node {peer}"));
            return;
        }
        if self.conn(peer).is_some() {
            self.peer_down(peer);
        }
        self.epoch += 1;
        let now = self.now;
        let conn = Conn {
            epoch: self.epoch,
            report: None,
            bitmap_rx: Vec::new(),
            bitmap_done: false,
            state: ReplState::Connecting,
            decision: None,
            full_marks: false,
            serves: false,
            pong: 0,
            barrier: 0,
            begin_ping: 0,
            end_deferred: false,
            last_rx: now,
            last_tx: now,
            unacked: BTreeMap::new(),
            unflushed: BTreeMap::new(),
            rx_inflight: BTreeSet::new(),
            rx_flush_wait: Vec::new(),
            resync: None,
            unsettled: BTreeMap::new(),
            unsettled_diskful: BTreeMap::new(),
            rx_write_seq: 0,
            late: Vec::new(),
            sent_bits: false,
            offered: false,
            offer_missed: false,
            resync_asked: false,
            peer_newer: false,
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.conn = Some(conn);
        }
        self.log(Level::Info, format!("link to node {peer} up"));
        self.report_seq += 1;
        let report = self.report_for(peer);
        let seq = self.report_seq;
        self.note_offer(peer, &report);
        self.send(peer, Message::StateReport(Box::new(report)));
        let diskful_pair = self.cfg.diskful && self.peers[&peer].cfg.diskful;
        if diskful_pair {
            let runs = self.bitmap_ranges(peer);
            let sent_bits = !runs.is_empty();
            if let Some(c) = self.conn_mut(peer) {
                c.sent_bits = sent_bits;
            }
            let mut chunks: Vec<Vec<ByteRange>> =
                runs.chunks(OOS_CHUNK).map(|c| c.to_vec()).collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            let last = chunks.len() - 1;
            for (i, ranges) in chunks.into_iter().enumerate() {
                let flags = if i == last {
                    oos_flags::END_OF_BITMAP
                } else {
                    0
                };
                self.send(peer, Message::OutOfSync { flags, ranges });
            }
        }
        if let Some(c) = self.conn_mut(peer) {
            c.barrier = seq;
        }
        self.send(peer, Message::Ping { token: seq });
    }

    fn peer_down(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(conn) = p.conn.take() else { return };
        let diskful = p.cfg.diskful;
        self.mint_confirmed = false;
        if conn.resync.as_ref().is_some_and(|rs| !rs.begun)
            && conn.decision.is_some_and(|(d, _)| d.is_target())
            && conn
                .report
                .as_ref()
                .is_some_and(|r| r.role == Role::Primary && r.disk_state == DiskState::UpToDate)
            && self.role != Role::Primary
            && self.meta.disk_state == DiskState::UpToDate
        {
            // A Primary with data we lack was about to resync us when the link dropped: we
            // are no source for anyone until a resync (simulator seed 8648: an isolated
            // Primary back, made the new Primary's target and cut off before the resync
            // began, became as an UpToDate Secondary with bits the source of a replica in
            // sync with the new Primary: its own write, never acknowledged, replaced the
            // acknowledged one there).
            self.meta.disk_state = DiskState::Outdated;
            self.persist_meta();
            self.log(
                Level::Warn,
                format!("Outdated: Primary node {peer} holds data we lack; its resync never began"),
            );
        }
        self.verify_peer_down(peer);
        self.reroute_reads(peer);
        self.confirm_resync(peer);
        if diskful && self.diskless_primary() {
            // Before the writes it leaves complete: they complete under the new generation.
            let lost: Vec<(u64, u64)> = conn
                .unacked
                .values()
                .chain(conn.unflushed.values())
                .copied()
                .collect();
            if !lost.is_empty() && self.serving_peer().is_some() {
                // Another peer holds our data: what this one lacks may have completed.
                self.parent_complete.remove(&peer);
            }
            self.diskless_lost_peer(peer, lost);
        }
        if let Some((_, waiting, all_ok)) = self.demote_flush.as_mut()
            && waiting.remove(&peer)
        {
            // It may lose what it did not flush: the others keep their marks.
            *all_ok = false;
            if waiting.is_empty() {
                self.demote_flush = None;
            }
        }
        if diskful && self.cfg.diskful {
            // Writes of a diskless Primary not settled yet may be lost on it (it may have
            // crashed before flushing them): mark them toward it.
            let ranges: Vec<(u64, u64)> = self
                .peers
                .values()
                .filter_map(|p| p.conn.as_ref())
                .flat_map(|c| c.unsettled.values().copied())
                .collect();
            self.mark_unsettled(&ranges, &[peer]);
        }
        let was_primary = conn
            .report
            .as_ref()
            .is_some_and(|r| r.role == Role::Primary);
        // A Primary whose disk was detached writes only to the peers serving it, like a
        // diskless one: what it wrote may be on some of them only.
        let detached = conn
            .report
            .as_ref()
            .is_some_and(|r| r.disk_state == DiskState::Failed);
        let without_disk = !diskful || detached;
        // A Primary with a disk (its writes kept only with a third replica, see
        // `keeps_unsettled`) may have crashed with a write on its way to the others: its
        // activity log covers its own disk, not theirs.
        let lost_unsettled = self.cfg.diskful
            && ((without_disk && was_primary)
                || !conn.unsettled.is_empty()
                || !conn.unsettled_diskful.is_empty());
        if lost_unsettled {
            // Its writes not yet settled may be missing on the other replicas (in flight,
            // unflushed), and theirs here: mark them toward every diskful peer; compare with
            // them again (both sides mark theirs, the handshake resyncs the union).
            let ranges: Vec<(u64, u64)> = conn
                .unsettled
                .values()
                .chain(conn.unsettled_diskful.values())
                .copied()
                .collect();
            let ids: Vec<NodeId> = self
                .diskful_ids()
                .into_iter()
                .filter(|id| *id != peer)
                .collect();
            self.mark_unsettled(&ranges, &ids);
            self.resync_lost_unsettled(&ranges);
            if was_primary && !diskful {
                self.lost_diskless = Some(peer);
            }
            let who = if !diskful {
                format!("the diskless Primary node {peer}")
            } else if detached {
                format!("the Primary node {peer} (its disk detached)")
            } else {
                format!("the writer node {peer}")
            };
            self.log(
                Level::Warn,
                format!("lost {who} with {} writes not settled", ranges.len()),
            );
            if !ranges.is_empty() {
                let established = self.peers_where(true, |c| c.state == ReplState::Established);
                for id in established {
                    self.disconnect(
                        id,
                        DisconnectReason::ConfigChanged,
                        format!("lost {who}; reconnect to compare"),
                    );
                }
            }
        }
        if self
            .primary_fresh
            .as_ref()
            .is_some_and(|f| f.primary == peer)
        {
            self.primary_fresh = None;
        }
        // Writes we acknowledged to a Primary are tracked as unflushed only in its memory; if
        // it is gone (maybe crashed), make them durable here now.
        let lost_writer = conn
            .report
            .as_ref()
            .is_some_and(|r| r.role == Role::Primary);
        if lost_writer && self.cfg.diskful {
            // Not for a diskless Primary: what its peers may lack is settled by its own
            // mechanism (`lost_diskless`: a replica that lost it waits for it before it
            // becomes anyone's target; simulator seed 1558 of three diskful and a witness).
            if let Some(r) = conn.report.as_ref().filter(|_| diskful) {
                let mut seq = conn.rx_write_seq;
                if let Some((l, g)) = self.lost_writer
                    && g == self.meta.current
                    && l.node == peer
                    && l.epoch == r.primary_epoch
                {
                    // The same Primary over an earlier link at this generation.
                    seq = seq.max(l.seq);
                }
                let record = LostWriter {
                    node: peer,
                    epoch: r.primary_epoch,
                    seq,
                };
                self.lost_writer = Some((record, self.meta.current));
            }
            let upto = self.al_ctr;
            let io = self.io(IoPurpose::AlFlush { upto });
            self.disk(Action::DiskFlush { io });
            // Its writes after the break (and those in flight) are missing here: record that
            // we left it at our current generation. Our reports then tell third nodes that we
            // may be behind that Primary (see `Rule::EqualBitsLostPrimary`), and a resync
            // target that copies our view learns the same.
            if diskful {
                let current = self.meta.current;
                let g = self.meta.peer_bitmap_gens.entry(peer).or_insert(0);
                if *g == 0 {
                    *g = current;
                    self.persist_meta();
                }
            }
        }
        if conn.full_marks && diskful {
            self.drop_full_marks(peer);
        }
        // Writes it did not ack, and writes it acked that no flush made durable there, may be
        // missing on it.
        for (_, (off, len)) in conn.unacked.iter().chain(conn.unflushed.iter()) {
            self.set_bits(peer, *off, *len);
        }
        if let Some(rs) = &conn.resync {
            self.log(
                Level::Warn,
                format!(
                    "resync from node {peer} interrupted after {} bytes",
                    rs.done
                ),
            );
        }
        // A Primary that lost a diskful peer starts a new generation at its next write, so
        // the handshake later knows who is newer; and a write that was waiting only for that
        // peer completes under it too (set first: before 2026-12-07 such a write completed
        // under the old generation, and a majority that never heard of it could promote the
        // lost peer as equal; simulator seed 13893 with slow disks, a stale read).
        if self.role == Role::Primary && diskful && self.cfg.diskful {
            self.mint_pending = true;
        }
        for key in self.writes.keys().copied().collect::<Vec<_>>() {
            if let Some(w) = self.writes.get_mut(&key)
                && w.waiting.remove(&peer)
            {
                self.try_complete_write(key);
            }
        }
        for key in self.flushes.keys().copied().collect::<Vec<_>>() {
            if let Some(f) = self.flushes.get_mut(&key)
                && f.waiting.remove(&peer)
            {
                self.try_complete_flush(key);
            }
        }
        if conn.report.is_some() {
            self.broadcast_report(false);
        }
        self.recheck_quorum_wait();
        self.window_peer_down(peer);
        if let Some(rs) = &conn.resync {
            // Links that waited for this resync (paused), or were decided while we were still
            // UpToDate (we are Inconsistent now, unless the source never confirmed it), must
            // compare again or they never resume.
            let begun = rs.begun;
            let stale: Vec<NodeId> = self
                .peers
                .values()
                .filter(|p| {
                    p.cfg.diskful
                        && p.conn.as_ref().is_some_and(|c| {
                            c.state == ReplState::PausedSync
                                || (begun && c.state == ReplState::Established)
                        })
                })
                .map(|p| p.cfg.node_id)
                .collect();
            for id in stale {
                self.disconnect(
                    id,
                    DisconnectReason::ConfigChanged,
                    format!("resync from node {peer} interrupted; reconnect to compare"),
                );
            }
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        self.check_outdated();
        // Not during a handshake: a report sent then would make the peer decide on a newer
        // state than the one we decide on.
        let handshaking = !self
            .peers_where(false, |c| c.state == ReplState::Connecting)
            .is_empty();
        if !handshaking && self.outdated_mask() != self.sent_outdated {
            self.broadcast_report(false);
        }
        if self.cfg.ping_interval > 0 {
            let ids: Vec<NodeId> = self.peers.keys().copied().collect();
            for id in ids {
                let Some(c) = self.conn(id) else { continue };
                if now.saturating_sub(c.last_rx) > self.cfg.ping_timeout {
                    self.disconnect(id, DisconnectReason::Timeout, "keepalive timeout".into());
                } else if now.saturating_sub(c.last_tx) >= self.cfg.ping_interval {
                    let token = self.report_seq;
                    self.send(id, Message::Ping { token });
                }
            }
        }
        self.pump_resync();
        self.pump_verify();
    }

    // ------------------------------------------------------------------ peer messages

    fn peer_message(&mut self, peer: NodeId, msg: Message) -> Result<(), ProtocolError> {
        match msg {
            Message::Ping { token } => self.send(peer, Message::Pong { token }),
            Message::Pong { token } => {
                let mut report = None;
                if let Some(c) = self.conn_mut(peer) {
                    let crossed = c.pong < c.begin_ping && token >= c.begin_ping;
                    c.pong = c.pong.max(token);
                    if crossed && std::mem::take(&mut c.end_deferred) {
                        report = c.report.clone();
                    }
                }
                // A report that said done came before this: its latest one was sent after it
                // saw our ResyncBegin.
                if let Some(r) = report
                    && self
                        .conn(peer)
                        .is_some_and(|c| c.state == ReplState::SyncSource)
                    && self.target_reports_done(peer, &r)
                {
                    self.resync_source_finished(peer);
                }
                self.recheck_quorum_wait();
            }
            Message::Disconnect { reason, detail } => {
                self.log(
                    Level::Warn,
                    format!("node {peer} disconnects: {reason:?}: {detail}"),
                );
                if reason == DisconnectReason::TwoPrimaries
                    && self.role == Role::Primary
                    && !self.has_quorum()
                {
                    self.force_secondary("another Primary holds the volume and we lost quorum");
                }
                self.peer_down(peer);
            }
            Message::StateReport(r) => self.on_report(peer, *r)?,
            Message::OutOfSync { flags, ranges } => {
                let done = self.conn(peer).is_some_and(|c| c.bitmap_done);
                let established = self
                    .conn(peer)
                    .is_some_and(|c| c.state == ReplState::Established);
                if done && flags == 0 && established && self.cfg.diskful {
                    // Verify findings of the peer (see `verify`).
                    return self.on_verify_findings(peer, &ranges);
                }
                if flags & oos_flags::THIRD_NODE != 0 && self.cfg.diskful {
                    // A diskless Primary lost a replica with these writes in doubt there.
                    let node = ((flags & oos_flags::THIRD_NODE_MASK) >> oos_flags::THIRD_NODE_SHIFT)
                        as NodeId;
                    // Or our sync source: where it marks the blocks it resyncs to us
                    // toward a third node, we differ from that node too (see
                    // `pass_on_third_marks`).
                    let from_source = self.peers[&peer].cfg.diskful
                        && self
                            .conn(peer)
                            .is_some_and(|c| c.resync.as_ref().is_some_and(|rs| rs.begun));
                    if (!self.peers[&peer].cfg.diskful || from_source)
                        && node != self.cfg.node_id
                        && node != peer
                        && self.peers.get(&node).is_some_and(|p| p.cfg.diskful)
                    {
                        let ranges: Vec<ByteRange> = ranges
                            .into_iter()
                            .filter(|r| r.offset.saturating_add(r.len) <= self.cfg.size_bytes)
                            .collect();
                        for r in &ranges {
                            self.set_bits(node, r.offset, r.len);
                        }
                        let resyncing = self.conn(node).is_some_and(|c| {
                            matches!(c.state, ReplState::SyncSource | ReplState::Connecting)
                        });
                        if resyncing {
                            // We resync it (or may): as a late write (see `late_marks`).
                            if let Some(c) = self.conn_mut(node) {
                                c.late.extend(ranges.iter().map(|r| (r.offset, r.len)));
                            }
                            self.send(node, Message::OutOfSync { flags: 0, ranges });
                        } else if self.in_sync(node)
                            && self.meta.disk_state == DiskState::UpToDate
                            && self.role == Role::Secondary
                        {
                            // It looks in sync with us but misses these writes (it caught
                            // up through us while the Primary could not reach it): resync
                            // them online, as verify findings.
                            self.resync_online(node, ranges);
                        }
                    }
                    return Ok(());
                }
                let target = self.conn(peer).is_some_and(|c| c.resync.is_some());
                if done && flags == 0 && target && self.cfg.diskful {
                    return self.late_marks(peer, &ranges);
                }
                if done || !self.cfg.diskful {
                    return Err(ProtocolError::Unexpected("OutOfSync", peer));
                }
                for r in &ranges {
                    if r.offset.saturating_add(r.len) > self.cfg.size_bytes {
                        let larger = self
                            .conn(peer)
                            .and_then(|c| c.report.as_ref())
                            .is_some_and(|rep| rep.size_bytes > self.cfg.size_bytes);
                        if larger {
                            // A resize under way: the peer grew first and has blocks out of
                            // sync past our end. Our bitmap cannot hold them: start over
                            // (the link comes back) until we have grown too.
                            self.disconnect(
                                peer,
                                DisconnectReason::SizeMismatch,
                                format!(
                                    "peer has {} bytes with blocks out of sync past our end \
                                     ({}); reconnecting once we have grown",
                                    self.conn(peer)
                                        .and_then(|c| c.report.as_ref())
                                        .map_or(0, |rep| rep.size_bytes),
                                    self.cfg.size_bytes
                                ),
                            );
                            return Ok(());
                        }
                        return Err(ProtocolError::Invalid {
                            peer,
                            detail: "out-of-sync range outside the volume".into(),
                        });
                    }
                }
                if let Some(c) = self.conn_mut(peer) {
                    c.bitmap_rx.extend(ranges);
                    if flags & oos_flags::END_OF_BITMAP != 0 {
                        c.bitmap_done = true;
                    }
                }
                self.maybe_decide(peer);
            }
            Message::Write {
                seq,
                offset,
                flags,
                data,
            } => {
                self.check_writer(peer)?;
                let len = data.len() as u64;
                self.note_app_io(len);
                if offset.saturating_add(len) > self.cfg.size_bytes {
                    self.send(
                        peer,
                        Message::WriteAck {
                            seq,
                            status: WireStatus::OutOfRange,
                        },
                    );
                    return Ok(());
                }
                let epoch = self.conn(peer).map_or(0, |c| c.epoch);
                let writer_detached = self.peer_failed(peer);
                let keep = self.keeps_unsettled(peer);
                if let Some(c) = self.conn_mut(peer) {
                    c.rx_inflight.insert(seq);
                    c.rx_write_seq = c.rx_write_seq.max(seq);
                    match keep {
                        Some(false) => {
                            c.unsettled.insert(seq, (offset, len));
                        }
                        Some(true) => {
                            c.unsettled_diskful.insert(seq, (offset, len));
                        }
                        None => {}
                    }
                }
                self.enqueue(
                    offset,
                    len,
                    Access::Write,
                    OpKind::PeerWrite {
                        peer,
                        epoch,
                        seq,
                        data,
                        fua: flags & write_flags::FUA != 0,
                        writer_detached,
                    },
                );
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
                // Version 8: a zero-write of the writer (see `tandem_repl_proto::zeroes`), a
                // write of zeros that may deallocate the range. Trim too: the replicas must
                // read the same afterwards.
                let keep_allocated = flags & write_flags::NO_HOLE != 0;
                let data = match zeroes::zeroes(len as usize) {
                    Some(z) if !keep_allocated => Some(z),
                    _ if len as usize <= tandem_repl_proto::MAX_DATA => {
                        Some(Bytes::from(vec![0u8; len as usize]))
                    }
                    _ => None,
                };
                let Some(data) = data else {
                    self.check_writer(peer)?;
                    self.send(
                        peer,
                        Message::WriteAck {
                            seq,
                            status: WireStatus::NotSupported,
                        },
                    );
                    return Ok(());
                };
                let flags = flags & write_flags::FUA;
                return self.peer_message(
                    peer,
                    Message::Write {
                        seq,
                        offset,
                        flags,
                        data,
                    },
                );
            }
            Message::WriteAck { seq, status } => {
                let Some(c) = self.conn_mut(peer) else {
                    return Ok(());
                };
                let Some(range) = c.unacked.remove(&seq) else {
                    return Err(ProtocolError::Invalid {
                        peer,
                        detail: format!("WriteAck for unknown seq {seq}"),
                    });
                };
                let ok = status == WireStatus::Ok;
                if ok {
                    c.unflushed.insert(seq, range);
                } else {
                    self.set_bits(peer, range.0, range.1);
                }
                if let Some(&key) = self.seq_to_key.get(&seq)
                    && let Some(w) = self.writes.get_mut(&key)
                {
                    w.waiting.remove(&peer);
                    if ok {
                        w.ok_from.insert(peer);
                    }
                    self.try_complete_write(key);
                }
                self.bound_unflushed(peer);
            }
            Message::TokenRequest { .. } | Message::TokenGrant { .. } => {
                self.token_message(peer, msg)?;
            }
            Message::Settled { seq } => {
                if let Some(c) = self.conn_mut(peer) {
                    c.unsettled = c.unsettled.split_off(&seq);
                    c.unsettled_diskful = c.unsettled_diskful.split_off(&seq);
                }
            }
            Message::Flush { seq } => {
                self.check_writer(peer)?;
                let pending = self
                    .conn(peer)
                    .is_some_and(|c| c.rx_inflight.iter().any(|s| *s < seq));
                if pending {
                    if let Some(c) = self.conn_mut(peer) {
                        c.rx_flush_wait.push(seq);
                    }
                } else {
                    self.peer_flush(peer, seq);
                }
            }
            Message::FlushAck { seq, status } => {
                let ok = status == WireStatus::Ok;
                let mut lost = Vec::new();
                if let Some(c) = self.conn_mut(peer) {
                    if ok {
                        c.unflushed.retain(|s, _| *s > seq);
                    } else {
                        // Its disk failed (it detaches): what it acked may not be durable
                        // there. It drops out of this flush like a lost link, the flush
                        // still needs every other replica.
                        let keep = c.unflushed.split_off(&(seq + 1));
                        lost = std::mem::replace(&mut c.unflushed, keep)
                            .into_values()
                            .collect();
                    }
                }
                for (off, len) in lost {
                    self.set_bits(peer, off, len);
                }
                if let Some((dseq, waiting, all_ok)) = self.demote_flush.as_mut()
                    && *dseq == seq
                    && waiting.remove(&peer)
                {
                    *all_ok &= ok;
                    if waiting.is_empty() {
                        let (dseq, _, all_ok) = self.demote_flush.take().expect("some");
                        if all_ok {
                            let ids: Vec<NodeId> = self
                                .peers
                                .values()
                                .filter(|p| p.cfg.diskful && p.conn.is_some())
                                .map(|p| p.cfg.node_id)
                                .collect();
                            for id in ids {
                                self.send(id, Message::Settled { seq: dseq });
                            }
                        }
                    }
                }
                for key in self.flushes.keys().copied().collect::<Vec<_>>() {
                    if let Some(f) = self.flushes.get_mut(&key)
                        && f.seq == seq
                    {
                        if ok {
                            f.ok_from.insert(peer);
                        }
                        f.waiting.remove(&peer);
                        self.try_complete_flush(key);
                    }
                }
            }
            Message::ReadRequest { seq, offset, len } => {
                // A peer whose disk is detached reads through us (ordered like its writes,
                // which precede the request on the link).
                let status = if !self.cfg.diskful || self.meta.disk_state != DiskState::UpToDate {
                    WireStatus::NotPermitted
                } else if len == 0 || offset.saturating_add(u64::from(len)) > self.cfg.size_bytes {
                    WireStatus::OutOfRange
                } else {
                    WireStatus::Ok
                };
                if status != WireStatus::Ok {
                    self.send(
                        peer,
                        Message::ReadReply {
                            seq,
                            status,
                            data: Bytes::new(),
                        },
                    );
                    return Ok(());
                }
                let epoch = self.conn(peer).map_or(0, |c| c.epoch);
                self.enqueue(
                    offset,
                    u64::from(len),
                    Access::Read,
                    OpKind::PeerRead { peer, epoch, seq },
                );
            }
            Message::ResyncBegin { generation, bytes } => {
                let state = self.conn(peer).map(|c| c.state);
                if state == Some(ReplState::Established)
                    && self.accept_online_resync(peer, generation)
                {
                    self.confirm_resync(peer);
                    return Ok(());
                }
                // A link paused because neither side had good data (not as a target that
                // waits for another resync) did not expect one either.
                let paused_not_target = state == Some(ReplState::PausedSync)
                    && self
                        .conn(peer)
                        .is_some_and(|c| !c.decision.is_some_and(|(d, _)| d.is_target()));
                if !matches!(state, Some(ReplState::SyncTarget | ReplState::PausedSync))
                    || paused_not_target
                {
                    // Both ends decided from different snapshots (generations changed during
                    // the handshake): compare again.
                    self.disconnect(
                        peer,
                        DisconnectReason::ConfigChanged,
                        format!(
                            "peer starts a resync toward us but we decided {state:?}; reconnect"
                        ),
                    );
                    return Ok(());
                }
                let decided_at = self
                    .conn(peer)
                    .and_then(|c| c.resync.as_ref())
                    .filter(|rs| !rs.begun)
                    .map(|rs| rs.decided_at);
                if decided_at.is_some_and(|g| g != self.meta.current) {
                    // We adopted a Primary's new generation since we decided (simulator seed
                    // 444): we hold writes the source may lack. Nothing was replaced yet.
                    self.disconnect(
                        peer,
                        DisconnectReason::ConfigChanged,
                        format!(
                            "peer starts a resync toward us, but our generation changed since \
                             the handshake ({:016x} -> {:016x}); reconnect to compare",
                            decided_at.unwrap_or(0),
                            self.meta.current
                        ),
                    );
                    return Ok(());
                }
                self.log(
                    Level::Info,
                    format!(
                        "node {peer} starts a resync of {bytes} bytes toward us (generation {generation:016x})"
                    ),
                );
                let confirmed = self
                    .conn_mut(peer)
                    .and_then(|c| c.resync.as_mut())
                    .map(|rs| rs.begun = true)
                    .is_some();
                // The source agrees: from now on our data is being replaced (persisted before
                // the first resync write: its data follows this message on the link).
                if confirmed && self.meta.disk_state != DiskState::Inconsistent {
                    self.meta.disk_state = DiskState::Inconsistent;
                    self.persist_meta();
                    self.broadcast_report(false);
                }
                self.pump_resync();
            }
            Message::ResyncEnd { status, .. } => {
                self.log(
                    Level::Info,
                    format!("node {peer} ends the resync: {status:?}"),
                );
                if status == WireStatus::Ok
                    && let Some(rs) = self.conn_mut(peer).and_then(|c| c.resync.as_mut())
                {
                    rs.end_received = true;
                }
                self.confirm_resync(peer);
            }
            Message::ResyncRequest { id, offset, len } => {
                if self.conn(peer).map(|c| c.state) != Some(ReplState::SyncSource) {
                    return Err(ProtocolError::Unexpected("ResyncRequest", peer));
                }
                if let Some(c) = self.conn_mut(peer) {
                    c.full_marks = false;
                    c.resync_asked = true;
                }
                if offset.saturating_add(u64::from(len)) > self.cfg.size_bytes || len == 0 {
                    return Err(ProtocolError::Invalid {
                        peer,
                        detail: "resync request outside the volume".into(),
                    });
                }
                let epoch = self.conn(peer).map_or(0, |c| c.epoch);
                self.enqueue(
                    offset,
                    u64::from(len),
                    Access::Read,
                    OpKind::ResyncRead { peer, epoch, id },
                );
            }
            Message::ResyncData {
                id,
                offset,
                status,
                flags,
                len,
                data,
            } => {
                let Some(c) = self.conn(peer) else {
                    return Ok(());
                };
                let epoch = c.epoch;
                let Some(rs) = c.resync.as_ref().filter(|rs| rs.begun) else {
                    return Err(ProtocolError::Unexpected("ResyncData", peer));
                };
                if rs.inflight.get(&id) != Some(&(offset, u64::from(len))) {
                    return Err(ProtocolError::Invalid {
                        peer,
                        detail: format!("ResyncData {id} does not match a request"),
                    });
                }
                if status != WireStatus::Ok {
                    self.disconnect(
                        peer,
                        DisconnectReason::IoError,
                        format!("resync source failed to read: {status:?}"),
                    );
                    return Ok(());
                }
                let data = (flags & resync_flags::ZERO == 0).then_some(data);
                self.enqueue(
                    offset,
                    u64::from(len),
                    Access::Write,
                    OpKind::ResyncWrite {
                        peer,
                        epoch,
                        id,
                        data,
                    },
                );
            }
            m @ Message::ChecksumRequest { .. } => {
                // A checksum-based resync pulls from us too.
                if let Some(c) = self.conn_mut(peer) {
                    c.full_marks = false;
                }
                self.on_checksum_request(peer, m)?
            }
            Message::ReadReply { seq, status, data } => {
                let Some((key, _)) = self
                    .fwd_reads
                    .get(&seq)
                    .copied()
                    .filter(|(_, p)| *p == peer)
                else {
                    return Err(ProtocolError::Unexpected("ReadReply", peer));
                };
                self.fwd_reads.remove(&seq);
                let Some(op) = self.active.get(&key).cloned() else {
                    return Ok(());
                };
                if status == WireStatus::Ok && data.len() as u64 == op.len {
                    if let OpKind::ClientRead { id } = op.kind {
                        self.complete(id, Ok(Reply::Data(data)));
                    }
                    self.finish_op(key);
                } else {
                    self.log(
                        Level::Warn,
                        format!("node {peer} could not serve a forwarded read: {status:?}"),
                    );
                    if let Some(c) = self.conn_mut(peer) {
                        c.serves = false;
                    }
                    self.forward_read(key);
                }
            }
            Message::ChecksumReply {
                id,
                offset,
                block_size,
                status,
                digests,
                ..
            } => self.on_checksum_reply(peer, id, offset, block_size, status, digests)?,
            Message::Hello(_)
            | Message::Challenge { .. }
            | Message::Auth { .. }
            | Message::Welcome { .. }
            | Message::Refused { .. } => {
                return Err(ProtocolError::Unexpected("handshake message", peer));
            }
        }
        Ok(())
    }

    /// Replicated writes are accepted only from a peer that reported itself Primary, after
    /// the handshake decision, on a diskful node.
    fn check_writer(&self, peer: NodeId) -> Result<(), ProtocolError> {
        let c = self
            .conn(peer)
            .ok_or(ProtocolError::Unexpected("write", peer))?;
        let primary = c.report.as_ref().is_some_and(|r| r.role == Role::Primary);
        let decided = matches!(
            c.state,
            ReplState::Established | ReplState::SyncTarget | ReplState::PausedSync
        );
        if !self.cfg.diskful || !primary || !decided || self.role == Role::Primary {
            return Err(ProtocolError::Unexpected("write from a non-Primary", peer));
        }
        Ok(())
    }

    fn peer_flush(&mut self, peer: NodeId, seq: u64) {
        let epoch = self.conn(peer).map_or(0, |c| c.epoch);
        let io = self.io(IoPurpose::PeerFlush { peer, epoch, seq });
        self.disk(Action::DiskFlush { io });
    }

    fn release_peer_flushes(&mut self, peer: NodeId) {
        let Some(c) = self.conn_mut(peer) else { return };
        let min_inflight = c.rx_inflight.iter().next().copied().unwrap_or(u64::MAX);
        let (ready, wait): (Vec<u64>, Vec<u64>) =
            c.rx_flush_wait.iter().partition(|s| **s <= min_inflight);
        c.rx_flush_wait = wait;
        for seq in ready {
            self.peer_flush(peer, seq);
        }
    }

    fn force_secondary(&mut self, why: &str) {
        if self.role == Role::Primary {
            self.log(Level::Warn, format!("forced to Secondary: {why}"));
            self.become_secondary(why);
        }
    }

    fn on_report(&mut self, peer: NodeId, r: StateReport) -> Result<(), ProtocolError> {
        if r.node_id != peer {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!("StateReport names node {}", r.node_id),
            });
        }
        let peer_diskful = self.peers[&peer].cfg.diskful;
        if peer_diskful == (r.disk_state == DiskState::Diskless) {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!(
                    "disk state {:?} for a diskful={peer_diskful} node",
                    r.disk_state
                ),
            });
        }
        self.primary_epoch_seen = self.primary_epoch_seen.max(r.primary_epoch);
        let Some(c) = self.conn_mut(peer) else {
            return Ok(());
        };
        if c.report.as_ref().is_some_and(|old| old.seq >= r.seq) {
            return Ok(());
        }
        let prev = c.report.replace(r.clone());
        // A node that becomes Primary at a generation a replica records as behind is stale:
        // we do not back it (below), nor relay its outdated list (it would outdate the
        // replica that holds the newer data).
        let stale_primary = if r.role == Role::Primary
            && self.role != Role::Primary
            && peer_diskful
            && prev.as_ref().is_none_or(|p| p.role != Role::Primary)
        {
            self.records_behind(peer, &r)
        } else {
            None
        };
        if let Some(q) = stale_primary {
            self.disconnect(
                peer,
                DisconnectReason::Other,
                format!(
                    "node {peer} became Primary at generation {:x}, which node {q} records as \
                     behind its own: it lacks writes node {q} holds; not backing it",
                    r.generations.current
                ),
            );
            return Ok(());
        }
        if r.role == Role::Primary {
            self.sticky_outdated = (r.outdated, r.outdated_gen, r.outdated_by);
        }
        if r.disk_state == DiskState::Failed {
            self.detached_seen.insert(peer);
        } else {
            self.detached_seen.remove(&peer);
        }
        let newly_failed = r.disk_state == DiskState::Failed
            && prev
                .as_ref()
                .is_none_or(|p| p.disk_state != DiskState::Failed);
        if newly_failed && peer_diskful && self.cfg.diskful {
            self.peer_detached(peer, &r);
        }
        if r.role == Role::Primary && r.disk_state == DiskState::Failed && self.cfg.diskful {
            let before = prev
                .as_ref()
                .filter(|p| p.role == Role::Primary && p.disk_state == DiskState::Failed)
                .map_or(0, |p| p.outdated);
            self.newly_outdated_by_detached(peer, r.outdated & !before);
        }
        if newly_failed && peer_diskful && self.diskless_primary() {
            self.log(
                Level::Warn,
                format!("node {peer} detached its disk (Failed)"),
            );
            self.reroute_reads(peer);
            let lost: Vec<(u64, u64)> = self
                .conn_mut(peer)
                .map(|c| {
                    let mut v: Vec<(u64, u64)> =
                        std::mem::take(&mut c.unflushed).into_values().collect();
                    v.extend(c.unacked.values().copied());
                    v
                })
                .unwrap_or_default();
            self.parent_complete.remove(&peer);
            self.diskless_lost_peer(peer, lost);
        }
        if prev.is_none() && peer_diskful && self.diskless_primary() {
            self.caught_up_elsewhere(peer, &r);
        }
        if peer_diskful && self.diskless_primary() {
            self.took_offer(peer, &r);
        }
        if self.lost_diskless.is_some()
            && (r.role == Role::Primary || self.lost_diskless == Some(peer))
        {
            // Connected to a Primary (it writes to us), or the one we lost is back.
            self.set_lost_diskless(None);
        }
        self.verify_on_report(peer, &r);
        self.check_outdated();
        if (r.role != Role::Primary || r.disk_state == DiskState::Failed)
            && self
                .primary_fresh
                .as_ref()
                .is_some_and(|f| f.primary == peer)
        {
            // Not Primary any more, or its disk detached: it writes only to the peers that
            // serve it, which need not include us, so what it gave us may be stale by now.
            self.primary_fresh = None;
        }
        // Two Primaries: the one already known keeps the volume.
        if r.role == Role::Primary && prev.as_ref().is_none_or(|p| p.role != Role::Primary) {
            if self.role == Role::Primary {
                if self.has_quorum() {
                    self.disconnect(
                        peer,
                        DisconnectReason::TwoPrimaries,
                        "we are Primary with quorum".into(),
                    );
                    return Ok(());
                }
                self.force_secondary(&format!("node {peer} is Primary and we have no quorum"));
            } else if let Some(other) = self
                .peers
                .values()
                .find(|p| p.cfg.node_id != peer && peer_role(p) == Some(Role::Primary))
                .filter(|p| !self.window_handoff(&r, p))
                .map(|p| p.cfg.node_id)
            {
                self.disconnect(
                    peer,
                    DisconnectReason::TwoPrimaries,
                    format!("node {other} is Primary"),
                );
                return Ok(());
            }
        }
        if (self.failed() || self.diskless_primary()) && peer_diskful {
            self.recheck_serves(peer);
        }
        let state = self.conn(peer).map(|c| c.state);
        match state {
            Some(ReplState::Connecting) => self.maybe_decide(peer),
            Some(ReplState::Established)
                if !peer_diskful
                    && self.cfg.diskful
                    && r.role == Role::Primary
                    && r.generations.current != self.meta.current =>
            {
                // A diskless Primary started a new generation (a diskful peer dropped out of
                // its writes): adopt it if it counts us in sync. It has no handshake that would
                // resync us otherwise; then another replica does.
                self.adopt_from_diskless(peer);
            }
            Some(ReplState::Established)
                if peer_diskful
                    && self.cfg.diskful
                    && r.generations.current != self.meta.current =>
            {
                {
                    // A Primary whose disk is detached (no handshake resync): only when it
                    // counts us in sync (no bitmap generation toward us) and did not write
                    // without us (not in its `outdated` list).
                    let me = 1u32 << self.cfg.node_id;
                    let with_us = r.disk_state != DiskState::Failed
                        || (r.generations.bitmap == 0 && r.outdated & me == 0);
                    if r.role == Role::Primary
                        && self.role == Role::Secondary
                        && self.meta.disk_state == DiskState::UpToDate
                        && r.generations.history[0] == self.meta.current
                        && with_us
                    {
                        self.adopt_generation(peer, &r);
                    } else if self.failed() || r.disk_state == DiskState::Failed {
                        // A detached disk has no data generation to compare.
                    } else if self.role == Role::Secondary || r.role == Role::Secondary {
                        // Diverged while connected (another link changed things): redo the
                        // handshake.
                        let in_flight_from_peer =
                            self.conn(peer).is_some_and(|c| !c.rx_inflight.is_empty());
                        if !in_flight_from_peer {
                            self.disconnect(
                                peer,
                                DisconnectReason::ConfigChanged,
                                "generations diverged; reconnect to compare".into(),
                            );
                        }
                    }
                }
            }
            Some(ReplState::Established)
                if peer_diskful
                    && (self.cfg.diskful || self.role == Role::Primary)
                    && r.disk_state == DiskState::UpToDate
                    && r.generations.current == self.meta.current =>
            {
                // We recorded it as behind since `g` only because its report still showed `g`
                // when we adopted a Primary's new generation; it adopted the same one over its
                // own link to that Primary (same generation, `g` its previous one) while our
                // link stayed established: it missed nothing.
                let g = self.meta.peer_bitmap_gens.get(&peer).copied().unwrap_or(0);
                if g != 0 && g != self.meta.current && r.generations.history.contains(&g) {
                    self.meta.peer_bitmap_gens.insert(peer, 0);
                    self.persist_meta();
                }
                let caught_up = prev.as_ref().is_none_or(|p| {
                    p.disk_state != DiskState::UpToDate
                        || p.generations.current != r.generations.current
                });
                if caught_up {
                    self.resync_what_it_missed(peer);
                }
            }
            Some(ReplState::SyncSource) if self.target_reports_done(peer, &r) => {
                self.resync_source_finished(peer);
            }
            Some(ReplState::SyncSource)
                if r.disk_state == DiskState::UpToDate
                    && self.conn(peer).is_some_and(|c| c.pong < c.begin_ping) =>
            {
                if let Some(c) = self.conn_mut(peer) {
                    c.end_deferred = true;
                }
            }
            _ => {}
        }
        if !peer_diskful
            && r.flags & state_flags::ADOPT_OFFER != 0
            && self
                .conn(peer)
                .is_some_and(|c| c.state == ReplState::Established)
        {
            // A diskless Primary that lost every peer holding its data offers us its
            // generation: we hold all of it (see `parent_complete`).
            self.adopt_from_diskless(peer);
        }
        if self.diskless_primary() && peer_diskful {
            // It may have caught up just now (bitmap generation reset above).
            self.recheck_serves(peer);
        }
        if self.conn(peer).is_some() {
            self.window_report(peer, &r);
        }
        Ok(())
    }

    /// As its sync source: `r` (its latest report) says the resync into `peer` is done:
    /// UpToDate at our generation, sent after it saw our `ResyncBegin` (handshake resync,
    /// `begin_ping`) or after it reported Inconsistent (online resync).
    fn target_reports_done(&self, peer: NodeId, r: &StateReport) -> bool {
        r.disk_state == DiskState::UpToDate
            && r.generations.current == self.meta.current
            && self.conn(peer).is_some_and(|c| c.pong >= c.begin_ping)
            && !self.online_resync_unconfirmed(peer)
    }

    /// `peer` became UpToDate at our generation over a link that stayed established (it
    /// resynced from another replica) while we hold bits toward it: writes it missed that its
    /// source did not know of (e.g. a Primary with a detached disk wrote only to us while it
    /// was Outdated, and that Primary's own marks were lost with its restart). Resync them
    /// now, as verify findings; were they stale, it only fetches blocks it already has.
    fn resync_what_it_missed(&mut self, peer: NodeId) {
        if !self.cfg.diskful || self.meta.disk_state != DiskState::UpToDate {
            return;
        }
        let bytes = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
        if bytes == 0 {
            return;
        }
        self.log(
            Level::Warn,
            format!(
                "node {peer} caught up elsewhere but misses {bytes} bytes we marked for it: \
                 resyncing them"
            ),
        );
        let ranges = self.bitmap_ranges(peer);
        self.resync_online(peer, ranges);
    }

    /// Our bits toward `peer` as byte ranges.
    fn bitmap_ranges(&self, peer: NodeId) -> Vec<ByteRange> {
        let size = self.cfg.size_bytes;
        self.bitmap(peer)
            .map(|b| {
                let g = b.granularity();
                b.runs()
                    .into_iter()
                    .map(|(f, n)| ByteRange {
                        offset: f * g,
                        len: (n * g).min(size - f * g),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `peer` looks in sync but misses `ranges` (marked toward it already): tell it, as
    /// verify findings, and resync them online.
    fn resync_online(&mut self, peer: NodeId, ranges: Vec<ByteRange>) {
        for chunk in ranges.chunks(OOS_CHUNK) {
            self.send(
                peer,
                Message::OutOfSync {
                    flags: 0,
                    ranges: chunk.to_vec(),
                },
            );
        }
        self.start_online_resync(peer);
    }

    /// `peer` reports its disk detached (Failed). A Primary drops it from its writes (the
    /// ones it acknowledged but no flush covered may be lost there: out of sync) and starts a
    /// new generation at its next write. A Secondary of a detached Primary records that the
    /// Primary's disk stays at our current generation (bitmap generation toward it) and, in
    /// `start_op`, marks every write it applies from it out of sync toward it: the Primary's
    /// re-attached disk then resyncs exactly those blocks from us.
    fn peer_detached(&mut self, peer: NodeId, r: &StateReport) {
        self.log(
            Level::Warn,
            format!("node {peer} detached its disk (Failed)"),
        );
        let lost: Vec<(u64, u64)> = self
            .conn_mut(peer)
            .map(|c| std::mem::take(&mut c.unflushed).into_values().collect())
            .unwrap_or_default();
        for (off, len) in lost {
            self.set_bits(peer, off, len);
        }
        if self.role == Role::Primary {
            self.mint_pending = true;
        }
        if r.role == Role::Primary && self.meta.disk_state == DiskState::UpToDate {
            let current = self.meta.current;
            let g = self.meta.peer_bitmap_gens.entry(peer).or_insert(0);
            if *g == 0 {
                *g = current;
                self.persist_meta();
            }
        }
        self.reroute_reads(peer);
    }

    /// Adopts the new generation of the diskless Primary `peer` (its last report) when it
    /// counts us in sync: its previous generation is ours, no bitmap generation toward us,
    /// not in its outdated list, and we are an UpToDate Secondary.
    ///
    /// With `ADOPT_OFFER` it counts us as holding all its data (see `parent_complete`): then
    /// also from either of its two previous generations, whatever it recorded about us before.
    fn adopt_from_diskless(&mut self, peer: NodeId) {
        let Some(r) = self.conn(peer).and_then(|c| c.report.clone()) else {
            return;
        };
        let me = 1u32 << self.cfg.node_id;
        // An offer counts only while no other Primary is connected (the offer may be older
        // than the sender being forced to Secondary by it).
        let offered = r.flags & state_flags::ADOPT_OFFER != 0
            && !self
                .peers
                .values()
                .any(|p| p.cfg.node_id != peer && peer_role(p) == Some(Role::Primary));
        let counts_us = if offered {
            r.generations.history.contains(&self.meta.current)
        } else {
            r.generations.history[0] == self.meta.current
                && r.generations.bitmap == 0
                && r.outdated & me == 0
        };
        if self.cfg.diskful
            && !self.peers[&peer].cfg.diskful
            && r.role == Role::Primary
            && self.role == Role::Secondary
            && self.meta.disk_state == DiskState::UpToDate
            && r.generations.current != self.meta.current
            && counts_us
        {
            if offered {
                self.log(
                    Level::Info,
                    format!(
                        "diskless Primary node {peer} offers its generation: we hold all its data"
                    ),
                );
            }
            self.adopt_generation(peer, &r);
        }
    }

    fn adopt_generation(&mut self, from: NodeId, r: &StateReport) {
        let old = self.meta.current;
        let mut behind = Vec::new();
        self.may_share_current.clear();
        for id in self.diskful_ids() {
            if id == from {
                continue;
            }
            let peer_current = self
                .conn(id)
                .and_then(|c| c.report.as_ref())
                .map(|r| r.generations.current);
            if peer_current != Some(r.generations.current) {
                behind.push(id);
                let e = self.meta.peer_bitmap_gens.entry(id).or_insert(0);
                if *e == 0 {
                    *e = old;
                }
                // The Primary does not record it as behind (or only at this very generation):
                // it may adopt this generation too, over its own link to the Primary, while
                // ours to it is down or its report lags.
                let theirs = r
                    .peer_bitmaps
                    .iter()
                    .find(|b| b.node == id)
                    .map_or(0, |b| b.generation);
                if theirs == 0 || theirs == r.generations.current {
                    self.may_share_current.insert(id);
                }
            }
        }
        // A diskless Primary keeps no bitmap: its writes not yet settled may be missing on the
        // replicas it started this generation without (they were in flight, or unflushed
        // there when it lost them). Persisted before the new generation.
        let unsettled: Vec<(u64, u64)> = self
            .conn(from)
            .map(|c| c.unsettled.values().copied().collect())
            .unwrap_or_default();
        self.mark_unsettled(&unsettled, &behind);
        self.meta.current = r.generations.current;
        self.meta.history = r.generations.history;
        self.persist_meta();
        self.log(
            Level::Info,
            format!(
                "adopted generation {:016x} of Primary node {from}",
                r.generations.current
            ),
        );
        self.broadcast_report(false);
    }

    /// A replica that records diskful `peer` (report `r`, attached disk) as behind at the
    /// generation it reports while itself at another one (this node, or a connected peer by
    /// its report): `peer` lacks writes that replica holds. Only Primaries start
    /// generations, and a replica records a peer behind only when it went on without it, so
    /// a node that becomes Primary at such a generation is stale, whatever quorum it finds.
    /// A voter that knows it does not back that promotion, as it refuses a second Primary
    /// (simulator seed 5218: a Primary's disk detached, node 1 adopted its new generation,
    /// node 2 missed it; the Primary came back from metadata that predated it (a crash of
    /// the failing disk), and node 2 was promoted with its vote while it also talked to
    /// node 1. Generations minted since then by the two sides were a split brain).
    fn records_behind(&self, peer: NodeId, r: &StateReport) -> Option<NodeId> {
        let g = r.generations.current;
        if g == 0 || r.disk_state != DiskState::UpToDate {
            return None;
        }
        if self.cfg.diskful
            && !self.failed()
            && self.meta.current != g
            && self.meta.peer_bitmap_gens.get(&peer) == Some(&g)
        {
            return Some(self.cfg.node_id);
        }
        self.peers
            .values()
            .filter(|p| p.cfg.node_id != peer && p.cfg.diskful)
            .find(|p| {
                p.conn
                    .as_ref()
                    .and_then(|c| c.report.as_ref())
                    .is_some_and(|q| {
                        q.disk_state != DiskState::Failed
                            && q.generations.current != g
                            && q.peer_bitmaps
                                .iter()
                                .any(|b| b.node == peer && b.generation == g)
                    })
            })
            .map(|p| p.cfg.node_id)
    }

    // ------------------------------------------------------------------ handshake decision

    fn maybe_decide(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let Some(c) = p.conn.as_ref() else { return };
        if c.state != ReplState::Connecting {
            return;
        }
        let Some(r) = c.report.clone() else { return };
        if !(self.cfg.diskful && p.cfg.diskful) {
            let peer_diskful = p.cfg.diskful;
            if let Some(c) = self.conn_mut(peer) {
                c.state = ReplState::Established;
            }
            if peer_diskful && self.diskless_primary() {
                self.recheck_serves(peer);
            }
            return;
        }
        if !c.bitmap_done {
            return;
        }
        if self.failed() || r.disk_state == DiskState::Failed {
            // A detached disk is never a resync source or target: the link only carries
            // I/O (a detached Primary's writes and reads to peers that hold its data).
            if let Some(c) = self.conn_mut(peer) {
                c.bitmap_rx.clear();
                c.state = ReplState::Established;
                c.serves = false;
                c.decision = None;
            }
            let whose = if self.failed() { "our" } else { "its" };
            self.log(
                Level::Info,
                format!("handshake with node {peer}: no resync, {whose} disk is detached (Failed)"),
            );
            if self.failed() {
                self.recheck_serves(peer);
            }
            return;
        }
        if r.size_bytes != self.cfg.size_bytes {
            // A resize under way (one side has the new size, the other not yet): the link
            // stays up and waits here; every StateReport of the peer (it sends one after its
            // resize) and our own resize try again. Writes in the meantime are limited to
            // the smaller size (`usable_size`) and still replicated.
            self.log(
                Level::Info,
                format!(
                    "handshake with node {peer} waits for equal sizes (peer {}, ours {})",
                    r.size_bytes, self.cfg.size_bytes
                ),
            );
            return;
        }
        let my_bits = p.bitmap.as_ref().is_some_and(|b| b.count() > 0);
        if my_bits != c.sent_bits {
            // Marks arrived since we sent our bitmap (e.g. a diskless Primary's): the peer
            // would decide on a different picture. Compare again.
            self.disconnect(
                peer,
                DisconnectReason::ConfigChanged,
                "out-of-sync bits changed during the handshake; reconnect to compare".into(),
            );
            return;
        }
        let me = SideView {
            node_id: self.cfg.node_id,
            current: self.meta.current,
            bitmap: self.meta.peer_bitmap_gens.get(&peer).copied().unwrap_or(0),
            history: self.meta.history,
            other_bitmaps: self
                .meta
                .peer_bitmap_gens
                .iter()
                .filter(|(id, g)| **id != peer && **g != 0)
                .map(|(_, g)| *g)
                .chain(self.lost_diskless.map(|_| self.meta.current))
                .collect(),
            // What the peer was told (it decides on that): the decision stays symmetric
            // while a finished resync into us is unconfirmed (simulator seed 390).
            up_to_date: self.disk_state_for(peer) == DiskState::UpToDate,
            primary: self.role == Role::Primary,
            crashed_primary: self.crashed_primary,
            has_bits: my_bits,
            lost_writer: self.lost_writer_now(),
            primary_epoch: self.meta.primary_epoch,
        };
        let other = SideView {
            node_id: peer,
            current: r.generations.current,
            bitmap: r.generations.bitmap,
            history: r.generations.history,
            other_bitmaps: r.peer_bitmaps.iter().map(|b| b.generation).collect(),
            up_to_date: r.disk_state == DiskState::UpToDate,
            primary: r.role == Role::Primary,
            crashed_primary: r.flags & state_flags::CRASHED_PRIMARY != 0,
            has_bits: !c.bitmap_rx.is_empty(),
            lost_writer: r.lost_writer,
            primary_epoch: r.primary_epoch,
        };
        let (mut d, rule) = decide(&me, &other);
        let peer_newer = rule == Rule::SourceNotUpToDate && peer_is_newer(&me, &other);
        if d == SyncDecision::SplitBrain {
            if let Some(resolved) = self.resolve_split_brain(peer, rule, r.flags, r.primary_epoch) {
                d = resolved;
            }
        } else {
            self.clear_split_brain(peer);
        }
        self.log(
            Level::Info,
            format!("handshake with node {peer}: {d:?} by rule {rule:?}"),
        );
        if let Some(p) = self.peers.get_mut(&peer) {
            p.last_decision = Some((d, rule));
        }
        // Compared now: whatever this handshake leaves it at is recorded as usual.
        self.may_share_current.remove(&peer);
        if let Some(c) = self.conn_mut(peer) {
            c.decision = Some((d, rule));
            c.peer_newer = peer_newer;
            if !d.is_source() {
                c.late.clear();
            }
        }
        match d {
            SyncDecision::NoSync => {
                // Identical: whatever we recorded about this peer is settled.
                if self
                    .meta
                    .peer_bitmap_gens
                    .get(&peer)
                    .is_some_and(|g| *g != 0)
                {
                    self.meta.peer_bitmap_gens.insert(peer, 0);
                    self.persist_meta();
                }
                self.set_state(peer, ReplState::Established)
            }
            SyncDecision::SplitBrain => {
                self.disconnect(
                    peer,
                    DisconnectReason::SplitBrain,
                    format!("split brain detected by rule {rule:?}; resolve manually"),
                );
            }
            SyncDecision::UnrelatedData => {
                self.disconnect(
                    peer,
                    DisconnectReason::UnrelatedData,
                    format!("unrelated data (rule {rule:?})"),
                );
            }
            SyncDecision::NoGoodData => {
                if peer_newer {
                    self.log(
                        Level::Warn,
                        format!(
                            "node {peer} holds newer data (generation {:x}) but is not UpToDate: \
                             we lack writes it has and are not promoted until a resync",
                            r.generations.current
                        ),
                    );
                    if self.role == Role::Primary {
                        // Stale: a replica holds writes we lack. As for a peer that would be
                        // our source: with quorum, it is not counted; without, we step down.
                        if self.has_quorum() {
                            self.disconnect(
                                peer,
                                DisconnectReason::Other,
                                "a Primary with quorum does not count a peer with newer data"
                                    .into(),
                            );
                            return;
                        }
                        self.force_secondary(&format!("node {peer} has newer data"));
                    }
                }
                self.set_state(peer, ReplState::PausedSync)
            }
            SyncDecision::BitmapSource | SyncDecision::FullSource => {
                self.merge_bits(peer, d == SyncDecision::FullSource);
                if let Some(c) = self.conn_mut(peer) {
                    c.full_marks = rule == Rule::NewMember;
                }
                let bytes = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
                let gen_now = self.meta.current;
                self.set_state(peer, ReplState::SyncSource);
                self.send(
                    peer,
                    Message::ResyncBegin {
                        generation: gen_now,
                        bytes,
                    },
                );
                // Its reports count as the end only once it answered this (see `begin_ping`).
                self.report_seq += 1;
                let token = self.report_seq;
                if let Some(c) = self.conn_mut(peer) {
                    c.begin_ping = token;
                }
                self.send(peer, Message::Ping { token });
            }
            SyncDecision::BitmapTarget | SyncDecision::FullTarget => {
                if self.role == Role::Primary {
                    if self.has_quorum() {
                        self.disconnect(
                            peer,
                            DisconnectReason::Other,
                            "a Primary with quorum cannot become sync target".into(),
                        );
                        return;
                    }
                    self.force_secondary(&format!("node {peer} has newer data"));
                }
                let busy = self.peers.values().any(|p| {
                    p.cfg.node_id != peer
                        && p.conn
                            .as_ref()
                            .is_some_and(|c| c.state == ReplState::SyncTarget)
                });
                if let Some(lost) = self.lost_diskless.filter(|_| r.role != Role::Primary) {
                    // The diskless Primary we lost may still be writing to the source, and
                    // we would not get those writes: wait until it is back (or settled).
                    self.log(
                        Level::Info,
                        format!(
                            "resync from node {peer} waits: we lost the diskless Primary node {lost}"
                        ),
                    );
                    self.set_state(peer, ReplState::PausedSync);
                    return;
                }
                if busy {
                    if d == SyncDecision::BitmapTarget {
                        self.fold_into_active_resync(peer, &r);
                    }
                    self.set_state(peer, ReplState::PausedSync);
                    return;
                }
                self.merge_bits(peer, d == SyncDecision::FullTarget);
                self.skip_primary_fresh(peer);
                // Inconsistent only once the source confirms (`ResyncBegin`), see `begun`.
                let total = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
                let now = self.now;
                let chunk = u64::from(self.cfg.resync_chunk);
                let decided_at = self.meta.current;
                if let Some(c) = self.conn_mut(peer) {
                    c.state = ReplState::SyncTarget;
                    c.resync = Some(ResyncTarget {
                        cursor: 0,
                        inflight: BTreeMap::new(),
                        next_id: 1,
                        tokens: chunk,
                        last_refill: now,
                        total,
                        done: 0,
                        finishing: false,
                        fenced: BTreeSet::new(),
                        begun: false,
                        decided_at,
                        checks: BTreeMap::new(),
                        no_checksums: false,
                        skipped: 0,
                        remark: BTreeMap::new(),
                        end_received: false,
                    });
                }
                self.log(
                    Level::Info,
                    format!("resync from node {peer}: {total} bytes out of sync"),
                );
                self.pump_resync();
            }
        }
    }

    fn set_state(&mut self, peer: NodeId, s: ReplState) {
        if let Some(c) = self.conn_mut(peer) {
            c.state = s;
        }
    }

    /// A new member we were to fully resync never pulled from us (its link paused: it was
    /// syncing from another replica) and its link is gone, typically because it finished
    /// elsewhere ("resync finished elsewhere; reconnect to compare"). When every other diskful
    /// replica is connected, Established, UpToDate at our generation and nothing is out of
    /// sync toward it, its source held our data, so the bits we set for the full resync mean
    /// nothing: drop them, or the next handshake resyncs the whole volume a second time by
    /// bitmap. Bits set later (writes while it is away) are real. Not when unsure: the marks
    /// stay, and at worst the volume is copied twice. A member that did not finish is still
    /// a new member at the next handshake (full resync again).
    fn drop_full_marks(&mut self, peer: NodeId) {
        if !self.cfg.diskful || self.meta.disk_state != DiskState::UpToDate {
            return;
        }
        let current = self.meta.current;
        let others_in_sync = self
            .peers
            .values()
            .filter(|p| p.cfg.diskful && p.cfg.node_id != peer)
            .all(|p| {
                p.bitmap.as_ref().is_some_and(|b| b.count() == 0)
                    && p.conn.as_ref().is_some_and(|c| {
                        c.state == ReplState::Established
                            && c.report.as_ref().is_some_and(|r| {
                                r.disk_state == DiskState::UpToDate
                                    && r.generations.current == current
                            })
                    })
            });
        let has_others = self
            .peers
            .values()
            .any(|p| p.cfg.diskful && p.cfg.node_id != peer);
        if !others_in_sync || !has_others {
            return;
        }
        if self.clear_all_bits(peer) {
            self.log(
                Level::Info,
                format!(
                    "node {peer} never pulled its full resync from us and our other replicas are \
                     in sync: its full-resync marks are dropped"
                ),
            );
        }
    }

    /// A second peer found us behind at the generation of the resync already running into
    /// us (its link pauses until that one ends, then reconnects to compare). The blocks it
    /// marked for us are fetched from the running source too: it holds the same generation,
    /// and these may be writes only that peer knew we lost (e.g. ones its Primary role ended
    /// with); the comparison after the resync could otherwise pick us as the source.
    fn fold_into_active_resync(&mut self, peer: NodeId, r: &StateReport) {
        let Some(source) = self
            .peers
            .values()
            .find(|p| {
                p.conn.as_ref().is_some_and(|c| {
                    // Not one already finishing (its last flush runs): that one ends without
                    // these bits, and the paused link compares again afterwards.
                    c.state == ReplState::SyncTarget
                        && c.resync.as_ref().is_some_and(|rs| !rs.finishing)
                        && c.report
                            .as_ref()
                            .is_some_and(|s| s.generations.current == r.generations.current)
                })
            })
            .map(|p| p.cfg.node_id)
        else {
            return;
        };
        let ranges = self
            .conn(peer)
            .map(|c| c.bitmap_rx.clone())
            .unwrap_or_default();
        let mut added = 0;
        let mut persist = Vec::new();
        if let Some(p) = self.peers.get_mut(&source)
            && let (Some(b), Some(rs)) = (
                p.bitmap.as_mut(),
                p.conn.as_mut().and_then(|c| c.resync.as_mut()),
            )
        {
            for range in &ranges {
                let (first, count) = b.bits_touching(range.offset, range.len);
                for bit in first..first + count {
                    if !rs.fenced.contains(&bit) && b.set_bits(bit, 1) > 0 {
                        added += b.granularity();
                        persist.push(bit);
                    }
                }
            }
            rs.total += added;
            rs.cursor = 0;
        }
        if added == 0 {
            return;
        }
        self.log(
            Level::Info,
            format!(
                "node {peer} also finds us behind: its {added} more bytes out of sync are \
                 fetched from node {source} too"
            ),
        );
        for bit in persist {
            self.out.push(Action::PersistBits {
                peer: source,
                set: true,
                first: bit,
                count: 1,
            });
        }
        self.pump_resync();
    }

    /// Our bits toward the peer become the union of both sides' (or everything).
    fn merge_bits(&mut self, peer: NodeId, full: bool) {
        let ranges = self
            .conn_mut(peer)
            .map(|c| std::mem::take(&mut c.bitmap_rx))
            .unwrap_or_default();
        if full {
            let size = self.cfg.size_bytes;
            self.set_bits(peer, 0, size);
        } else {
            for r in ranges {
                self.set_bits(peer, r.offset, r.len);
            }
        }
    }

    // ------------------------------------------------------------------ resync

    fn pump_resync(&mut self) {
        let now = self.now;
        let rate = self.effective_resync_rate();
        let chunk = u64::from(self.cfg.resync_chunk);
        let max_inflight = self.cfg.resync_max_inflight;
        let ids: Vec<NodeId> = self.peers.keys().copied().collect();
        let checksums = self.cfg.resync_checksums;
        for id in ids {
            let mut requests = Vec::new();
            let mut checks = Vec::new();
            let mut finish = None;
            {
                let Some(p) = self.peers.get_mut(&id) else {
                    continue;
                };
                let Some(c) = p.conn.as_mut() else { continue };
                let epoch = c.epoch;
                let Some(rs) = c.resync.as_mut() else {
                    continue;
                };
                let Some(b) = p.bitmap.as_ref() else { continue };
                if rate > 0 {
                    let dt = now.saturating_sub(rs.last_refill);
                    let add = (u128::from(rate) * u128::from(dt) / 1_000_000_000) as u64;
                    // Capped at 200 ms worth (at least a chunk): a bucket filled while
                    // unlimited, idle or at a higher rate must not burst.
                    let cap = chunk.max(rate / 5);
                    if add > 0 {
                        rs.tokens = rs.tokens.saturating_add(add);
                        rs.last_refill = now;
                    }
                    rs.tokens = rs.tokens.min(cap);
                } else {
                    rs.tokens = u64::MAX / 2;
                    rs.last_refill = now;
                }
                let g = b.granularity();
                while rs.inflight.len() < max_inflight && !rs.finishing {
                    let Some(first) = b.next_set(rs.cursor) else {
                        if rs.inflight.is_empty() && rs.begun {
                            if b.count() == 0 {
                                rs.finishing = true;
                                finish = Some(epoch);
                            } else {
                                rs.cursor = 0;
                                continue;
                            }
                        }
                        break;
                    };
                    let mut n = 1;
                    while (n + 1) * g <= chunk && b.test(first + n) {
                        n += 1;
                    }
                    let offset = first * g;
                    let len = (n * g).min(self.cfg.size_bytes - offset);
                    if rate > 0 && rs.tokens < len {
                        break;
                    }
                    rs.tokens = rs.tokens.saturating_sub(len);
                    rs.cursor = first + n;
                    let rid = rs.next_id;
                    rs.next_id += 1;
                    rs.inflight.insert(rid, (offset, len));
                    if checksums && !rs.no_checksums {
                        rs.checks.insert(rid, verify::ResyncCheck::new(offset, len));
                        checks.push((rid, offset, len, epoch));
                        requests.push(verify::resync_checksum_request(rid, offset, len, g));
                    } else {
                        requests.push(Message::ResyncRequest {
                            id: rid,
                            offset,
                            len: len as u32,
                        });
                    }
                }
            }
            for m in requests {
                self.send(id, m);
            }
            for (rid, offset, len, epoch) in checks {
                self.enqueue(
                    offset,
                    len,
                    Access::Read,
                    OpKind::ResyncCheckLocal {
                        peer: id,
                        epoch,
                        id: rid,
                    },
                );
            }
            if let Some(epoch) = finish {
                let io = self.io(IoPurpose::ResyncFinishFlush { peer: id, epoch });
                self.disk(Action::DiskFlush { io });
            }
        }
    }

    fn resync_target_finished(&mut self, peer: NodeId) {
        let Some(c) = self.conn_mut(peer) else { return };
        let Some(rs) = c.resync.take() else { return };
        let rule = c.decision.map(|(_, rule)| rule);
        c.state = ReplState::Established;
        let Some(r) = c.report.clone() else { return };
        self.last_resync_bytes = rs.done;
        self.last_resync_skipped = rs.skipped;
        self.crashed_primary = false;
        self.lost_diskless = None;
        // Only a diskless node reads from us without a handshake of its own. (Simulator seed
        // 3792: an end confirmed before we finished left us reporting Inconsistent to every
        // other peer for good, and one of them kept the whole volume marked toward us.)
        if self.peers.values().any(|p| !p.cfg.diskful) && !rs.end_received {
            let epoch = self.conn(peer).map_or(0, |c| c.epoch);
            self.unconfirmed_source = Some((peer, epoch));
        }
        let old_current = self.meta.current;
        self.meta.current = r.generations.current;
        self.meta.history = r.generations.history;
        self.meta.disk_state = DiskState::UpToDate;
        self.meta.peer_bitmap_gens.insert(peer, 0);
        self.split_brain_resynced(peer);
        // Toward third nodes: where the source recorded a node as behind, so are we now (our
        // data is its data). Where it lists none (in sync with it) we keep what we recorded
        // ourselves (it may know less than we do: e.g. writes that node lost in a crash that
        // only we saw), except our own "lost our Primary at this generation" mark: the
        // source's data includes that Primary's writes.
        for (id, g) in self.meta.peer_bitmap_gens.iter_mut() {
            if *id == peer {
                continue;
            }
            match r.peer_bitmaps.iter().find(|pb| pb.node == *id) {
                Some(pb) => *g = pb.generation,
                None if *g == old_current => *g = 0,
                None => {}
            }
        }
        // Likewise the last write of a lost Primary that our data holds is the source's.
        self.lost_writer = r.lost_writer.map(|l| (l, self.meta.current));
        // We came back without a promotion the source saw us in (rule
        // `EqualLostPromotion`): our data is now the source's, and our metadata takes that
        // promotion's epoch back, so the other replicas that recorded it do not copy the
        // whole volume to us once more.
        if rule == Some(Rule::EqualLostPromotion)
            && let Some(l) = r.lost_writer.filter(|l| l.node == self.cfg.node_id)
        {
            self.meta.primary_epoch = self.meta.primary_epoch.max(l.epoch);
            self.primary_epoch_seen = self.primary_epoch_seen.max(l.epoch);
        }
        self.persist_meta();
        self.log(
            Level::Info,
            format!(
                "resync from node {peer} done: {} bytes; UpToDate at generation {:016x}",
                rs.done, self.meta.current
            ),
        );
        // Links that waited (paused) must compare again: close them *before* announcing
        // UpToDate, or a paused source would take the report as the end of its own resync
        // and forget bits we never received from it.
        let paused = self.peers_where(false, |c| c.state == ReplState::PausedSync);
        for id in paused {
            self.disconnect(
                id,
                DisconnectReason::ConfigChanged,
                "resync finished elsewhere; reconnect to compare".into(),
            );
        }
        self.broadcast_report(false);
        // A diskless Primary may have started a generation while we were resyncing (it wrote
        // to us meanwhile, we hold its data): catch up with it.
        let diskless_primaries: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| !p.cfg.diskful && peer_role(p) == Some(Role::Primary))
            .map(|p| p.cfg.node_id)
            .collect();
        for id in diskless_primaries {
            self.adopt_from_diskless(id);
        }
        // A peer that caught up while we were behind (its report came while we could not
        // act on it, see `resync_what_it_missed`) may miss what we marked for it meanwhile:
        // e.g. a Primary's writes that reached it directly while it was a sync target.
        let current = self.meta.current;
        let caught_up: Vec<NodeId> = self
            .peers
            .values()
            .filter(|p| {
                p.cfg.diskful
                    && p.cfg.node_id != peer
                    && p.conn.as_ref().is_some_and(|c| {
                        c.state == ReplState::Established
                            && c.report.as_ref().is_some_and(|r| {
                                r.disk_state == DiskState::UpToDate
                                    && r.generations.current == current
                            })
                    })
            })
            .map(|p| p.cfg.node_id)
            .collect();
        for id in caught_up {
            self.resync_what_it_missed(id);
        }
    }

    /// Clears (and persists clearing) every out-of-sync bit toward `peer`; whether any was
    /// set.
    fn clear_all_bits(&mut self, peer: NodeId) -> bool {
        let Some(b) = self.peers.get_mut(&peer).and_then(|p| p.bitmap.as_mut()) else {
            return false;
        };
        if b.count() == 0 {
            return false;
        }
        let n = b.len();
        b.clear_all();
        self.out.push(Action::PersistBits {
            peer,
            set: false,
            first: 0,
            count: n,
        });
        true
    }

    fn resync_source_finished(&mut self, peer: NodeId) {
        // It asked us for nothing: it caught up from another replica (its link to us paused,
        // or the reports crossed). Our bits may name writes that replica did not know of.
        let elsewhere = self.conn(peer).is_some_and(|c| !c.resync_asked);
        if !elsewhere {
            self.clear_all_bits(peer);
        }
        let late = self
            .conn_mut(peer)
            .map(|c| std::mem::take(&mut c.late))
            .unwrap_or_default();
        if !late.is_empty() && self.meta.disk_state == DiskState::UpToDate {
            // Writes of a diskless Primary it may not have received (see `late`), told with
            // `OutOfSync` before its report may have crossed it: resync them online (it
            // fetches what it already marked; the rest it has).
            for (off, len) in late {
                self.set_bits(peer, off, len);
            }
            self.meta.peer_bitmap_gens.insert(peer, 0);
            self.persist_meta();
            self.set_state(peer, ReplState::Established);
            if self.start_online_resync(peer) {
                return;
            }
            self.clear_all_bits(peer);
        }
        self.meta.peer_bitmap_gens.insert(peer, 0);
        if self.meta.disk_state == DiskState::Outdated {
            // Only a split-brain resolution makes an Outdated node a sync source (the
            // decision requires good data otherwise): the writes we lacked were discarded.
            self.meta.disk_state = DiskState::UpToDate;
            self.log(
                Level::Info,
                format!("UpToDate again: our data was kept and node {peer} now has it"),
            );
            self.broadcast_report(false);
        }
        self.persist_meta();
        self.set_state(peer, ReplState::Established);
        let generation = self.meta.current;
        self.send(
            peer,
            Message::ResyncEnd {
                generation,
                status: WireStatus::Ok,
            },
        );
        self.log(Level::Info, format!("node {peer} is in sync"));
        if elsewhere {
            self.resync_what_it_missed(peer);
        }
    }
}

impl Engine {
    /// Peers (only diskful ones with `diskful_only`) whose connection satisfies `pred`.
    fn peers_where(&self, diskful_only: bool, pred: impl Fn(&Conn) -> bool) -> Vec<NodeId> {
        self.peers
            .values()
            .filter(|p| (!diskful_only || p.cfg.diskful) && p.conn.as_ref().is_some_and(&pred))
            .map(|p| p.cfg.node_id)
            .collect()
    }
}

fn peer_role(p: &Peer) -> Option<Role> {
    p.conn
        .as_ref()
        .and_then(|c| c.report.as_ref())
        .map(|r| r.role)
}

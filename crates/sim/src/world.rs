//! The simulated cluster, the schedule and the invariant checks.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use bytes::Bytes;
use tandem_repl_proto::{DiskState, FrameCounter, Message, NodeId, Role};
use tandem_replication::{
    Action, Bitmap, Config, DiskError, Engine, Event, Nanos, PeerConfig, Persisted, ReplState,
    Reply, RequestId,
};

use crate::disk::SimDisk;
use crate::model::{BLOCK, Model, block_bytes, parse_block};
use crate::rng::Rng;

const MS: Nanos = 1_000_000;
const US: Nanos = 1_000;

/// Which nodes a run has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Two diskful nodes and a witness (the standard small setup).
    TwoPlusWitness,
    /// Three diskful nodes.
    Three,
    /// Two diskful nodes, no witness (losing either stops writes).
    Two,
    /// Three diskful nodes and a witness (node 3), which the operator promotes like in
    /// `TwoPlusWitness`: a diskless Primary with three data peers.
    ThreePlusWitness,
}

/// Knobs of one run.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// None: chosen by the seed among the topologies the engine is proven on
    /// (`TwoPlusWitness` 80 %, `Two` 20 %). `Three` only when asked for.
    pub topology: Option<Topology>,
    /// Simulated time with workload and faults.
    pub active_ms: u64,
    pub size_blocks: u64,
    pub faults: bool,
    /// Trace lines kept for the failure report.
    pub trace_len: usize,
    /// Half of the seeds grow the volume online once during the active phase: every node
    /// gets the resize at its own time (a crashed node after its restart), from a separate
    /// random stream so the rest of a seed's schedule stays as it was.
    pub resize: bool,
    /// Run the scripted split-brain scenario instead of the random schedule (see
    /// `split_brain.rs`): two diskful nodes and a witness, a split made on purpose, resolved
    /// by a policy or by the manual resolution.
    pub split_brain: bool,
    /// Disk I/O errors among the faults (decided from a side stream): a diskful node's disk
    /// starts failing every read, write and flush (in half of them its metadata writes fail
    /// too, like a file system that shut down); its links may break meanwhile; the fault ends
    /// with a restart of that node on a healthy disk (what the failing disk had made durable,
    /// plus a random part of the rest, like a crash).
    pub disk_faults: bool,
    /// The operator promotes the witness (a diskless Primary, serving through the diskful
    /// nodes) in about a third of the promotions it makes, decided from a side stream.
    pub diskless_primary: bool,
    /// About a third of the seeds (side stream) open the dual-primary window on every node:
    /// the operator sometimes promotes a second node next to the Primary (and demotes one of
    /// the two later), and the consumer sends its requests to either of them. The model then
    /// orders overlapping writes by acknowledgement (the write token serializes them).
    pub dual_primary: bool,
    /// With the window open, the operator also promotes nodes that do not see the Primary
    /// (a racing promotion: refused by the voters or forced back for lack of quorum). Off by
    /// default; regression seeds use it.
    pub racing_promotions: bool,
    /// About a third of the seeds (side stream) run with `on-no-quorum=suspend`: a Primary
    /// without quorum holds its consumer's requests instead of failing them.
    pub suspend: bool,
    /// About a third of the seeds (side stream) set `flush_after_writes` to 1..8, so the
    /// Primaries flush on their own between (and during) the consumer's flushes.
    pub own_flushes: bool,
    /// A crash strikes at a random moment of the step (side stream), while the step's
    /// messages and disk writes are on their way, instead of before the step's requests; and
    /// it closes each link of the crashed node either at once (what was on its way is lost)
    /// or, in about half the cases, after the messages it had already sent arrive, as TCP
    /// delivers a dead process's send buffer before the FIN: a write on its way may reach one
    /// peer and not another.
    pub crash_in_flight: bool,
    /// The end also waits until no diskful replica holds out-of-sync bits toward another
    /// (what `volume show` lists as out of sync), and fails when they stay: marks nobody
    /// resolves (stale, or a difference the final comparison would not see yet). On by
    /// default since 2026-12-07 (it found seeds 1428, 3792 and 4136 of the three-diskful
    /// suites); off, the end comes as soon as everything is connected and UpToDate.
    pub strict_end: bool,
    /// Half of the seeds (side stream) get one to three slow-disk periods during the active
    /// phase: for 2-60 ms one diskful node's disk takes 10-200 times as long for every
    /// write, read, flush and digest it starts (a disk busy with something else, a RAID
    /// rebuild, a thin pool filling up). Nothing fails: the engine must keep every invariant
    /// and the cluster's requests going, only later. Timings only change when a period is
    /// on, so seeds without one keep their schedules.
    pub slow_disks: bool,
    /// Half of the link faults (side stream) duplicate or reorder a frame instead of losing
    /// one: the next frame on the link arrives a second time later, or is overtaken by the
    /// frames sent after it. Frames are numbered as on a real link (`FrameCounter`, protocol
    /// version 10) and the receiving end checks the numbers with the real code before a
    /// message reaches the engine: the fault must break the link, never deliver a message
    /// twice or out of order. Off, every link fault loses the frame (the schedules of the
    /// regression seeds found before).
    pub frame_faults: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            topology: None,
            resize: true,
            active_ms: 400,
            size_blocks: 128,
            faults: true,
            trace_len: 80,
            split_brain: false,
            disk_faults: true,
            diskless_primary: true,
            dual_primary: true,
            racing_promotions: false,
            suspend: true,
            own_flushes: true,
            crash_in_flight: true,
            strict_end: true,
            slow_disks: true,
            frame_faults: true,
        }
    }
}

/// What a passing run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// None: chosen by the seed among the topologies the engine is proven on
    /// (`TwoPlusWitness` 80 %, `Two` 20 %). `Three` only when asked for.
    pub topology: Option<Topology>,
    pub events: u64,
    pub writes_acked: u64,
    pub writes_failed: u64,
    pub reads_checked: u64,
    pub flushes_acked: u64,
    /// Online resizes applied (one per node of a growing run).
    pub resizes: u64,
    pub crashes: u64,
    /// Disk failures injected (each ends with a restart on a healthy disk).
    pub disk_failures: u64,
    /// Of those, the ones whose node was Primary when its disk failed.
    pub disk_failures_primary: u64,
    /// Consumer requests that completed while the Primary's disk was detached (Failed).
    pub detached_io_ok: u64,
    pub partitions: u64,
    pub link_breaks: u64,
    pub failovers: u64,
    /// Promotions of the witness (a diskless Primary).
    pub diskless_promotions: u64,
    /// Consumer requests completed by a diskless Primary.
    pub diskless_io_ok: u64,
    /// Generations a diskful node adopted from a diskless Primary's offer (`ADOPT_OFFER`,
    /// after a blip that cut the Primary from every peer holding its data).
    pub offers_taken: u64,
    /// Times a diskless Primary under `suspend` resumed requests it held while no peer held
    /// its data.
    pub diskless_resumes: u64,
    /// Seeds with the dual-primary window open, second Primaries promoted into it, and
    /// consumer requests completed by a member that did not hold the write token when they
    /// arrived (it fetched the token).
    pub window_seeds: u64,
    pub window_joins: u64,
    pub window_io_ok: u64,
    /// Seeds with on-no-quorum=suspend, and requests that were held for quorum there (seen
    /// suspended at least once) and completed.
    pub suspend_seeds: u64,
    pub suspended_io_ok: u64,
    /// Consumer requests issued while the cluster had been converged for a while; none of
    /// them may fail unless a fault, repair or role change came before its completion.
    pub healthy_io_ok: u64,
    pub resync_bytes: u64,
    /// Online verifies started / finished (every one must find 0 differences: the simulator
    /// never corrupts a replica behind the engine's back).
    pub verifies: u64,
    pub verifies_done: u64,
    pub verified_bytes: u64,
    /// Split-brain scenario: how it was resolved (`policy ...`, `manual ...`, `no split`).
    pub split_brain: Option<String>,
    /// The run used checksum-based resync (`Config::resync_checksums`).
    pub resync_checksums: bool,
    /// Bytes checksum-based resyncs found identical and did not transfer.
    pub resync_skipped_bytes: u64,
    /// Slow-disk periods of the run and the disk operations that started inside one (see
    /// [`SimOptions::slow_disks`]).
    pub slow_disk_periods: u64,
    pub slow_disk_ops: u64,
    /// Frames duplicated / reordered on a link (see [`SimOptions::frame_faults`]), and links
    /// the receiving end broke on a frame number it did not expect.
    pub frames_duplicated: u64,
    pub frames_reordered: u64,
    pub sequence_breaks: u64,
}

#[derive(Debug)]
pub(crate) enum Ev {
    Deliver {
        from: NodeId,
        to: NodeId,
        link: u64,
        /// The frame's number on the link (`FrameCounter`).
        seq: u32,
        msg: Message,
    },
    DiskWriteDone {
        node: NodeId,
        inc: u64,
        io: u64,
    },
    DiskReadDone {
        node: NodeId,
        inc: u64,
        io: u64,
        offset: u64,
        len: u32,
    },
    DiskFlushDone {
        node: NodeId,
        inc: u64,
        io: u64,
        marker: u64,
    },
    DiskChecksumDone {
        node: NodeId,
        inc: u64,
        io: u64,
        offset: u64,
        len: u32,
        block_size: u32,
    },
    Close {
        a: NodeId,
        b: NodeId,
        link: u64,
    },
    Reconnect {
        a: NodeId,
        b: NodeId,
    },
    /// Node `node` grows its replica to `blocks` (deferred until its restart when it is down).
    Resize {
        node: NodeId,
        blocks: u64,
    },
    /// Every link of `node` breaks (during a disk fault: the detached node reconnects).
    BreakLinks {
        node: NodeId,
    },
    /// The crash injected earlier in the step (see [`SimOptions::crash_in_flight`]).
    Crash {
        node: NodeId,
    },
    Step,
}

pub(crate) struct Node {
    pub(crate) id: NodeId,
    diskful: bool,
    pub(crate) cfg: Config,
    pub(crate) engine: Option<Engine>,
    inc: u64,
    pub(crate) disk: SimDisk,
    persisted: Persisted,
    /// Disk writes started, not completed: io -> (offset, data, fua).
    writes_in_flight: BTreeMap<u64, (u64, Bytes, bool)>,
    pub(crate) isolated: bool,
    /// The disk fails every I/O; `Some(true)`: its metadata writes fail too.
    disk_fault: Option<bool>,
    /// A persist failed during the current batch of actions (fed as `DiskFailed` after it).
    persist_failed: bool,
}

#[derive(Debug, Clone)]
enum Req {
    Write {
        w: u64,
        first: u64,
        n: u64,
        fua: bool,
    },
    Read {
        first: u64,
        n: u64,
    },
    Flush {
        marker: u64,
    },
}

/// What a link fault does to the next frame on the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameFault {
    /// Lost: the link breaks (what TCP does when it cannot deliver).
    Lose,
    /// Delivered, and a copy later (a sender's bug resending it).
    Duplicate,
    /// Delivered behind the frames sent after it (a sender's bug in ordering).
    Reorder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Crash(NodeId, Nanos),
    Isolate(NodeId, Nanos),
    Link,
    /// The node's disk fails until then; then it restarts on a healthy disk.
    Disk(NodeId, Nanos),
}

pub(crate) struct World {
    seed: u64,
    pub(crate) rng: Rng,
    pub(crate) now: Nanos,
    queue: BinaryHeap<Reverse<(Nanos, u64)>>,
    events: BTreeMap<u64, Ev>,
    next_ev: u64,
    pub(crate) nodes: Vec<Node>,
    /// Link generation per pair (a < b); None = down.
    pub(crate) links: BTreeMap<(NodeId, NodeId), Option<u64>>,
    link_gen: u64,
    fifo: BTreeMap<(NodeId, NodeId), Nanos>,
    drop_next: Option<(NodeId, NodeId)>,
    /// What happens to that frame.
    frame_fault: FrameFault,
    /// Side stream: the kind of each link fault (see [`SimOptions::frame_faults`]).
    frame_rng: Rng,
    /// Per direction (from, to): the link generation and the numbers of its frames, sent
    /// and expected.
    send_numbers: BTreeMap<(NodeId, NodeId), (u64, FrameCounter)>,
    recv_numbers: BTreeMap<(NodeId, NodeId), (u64, FrameCounter)>,
    model: Model,
    reqs: BTreeMap<RequestId, (NodeId, u64, Req)>,
    pub(crate) next_req: RequestId,
    pub(crate) next_write: u64,
    trace: VecDeque<String>,
    pub(crate) out: Outcome,
    fault: Fault,
    healthy_since: Option<Nanos>,
    opts: SimOptions,
    workload: bool,
    /// Resize randomness, separate from `rng` (see [`SimOptions::resize`]).
    resize_rng: Rng,
    /// The volume's size in blocks (every node converges to it).
    target_blocks: u64,
    /// Nodes that were down when their resize came: applied after their restart.
    resize_pending: Vec<NodeId>,
    /// Last verify run checked per node.
    seen_verify: BTreeMap<NodeId, u64>,
    /// Pairs (a < b) that must not reconnect (scripted cut, or refused for good).
    pub(crate) blocked: std::collections::BTreeSet<(NodeId, NodeId)>,
    /// The split-brain scenario, when running it.
    pub(crate) sb: Option<crate::split_brain::Scenario>,
    /// Disk-fault randomness, separate from `rng` (see [`SimOptions::disk_faults`]).
    disk_rng: Rng,
    /// Side stream: whether the operator promotes the witness.
    witness_rng: Rng,
    /// Side stream: when in the step a node crashes and which of its links deliver what it
    /// sent (see [`SimOptions::crash_in_flight`]).
    crash_rng: Rng,
    /// A crash injected for later in this step (`Ev::Crash`).
    pending_crash: Option<NodeId>,
    /// Side stream: the dual-primary window (see [`SimOptions::dual_primary`]).
    window_rng: Rng,
    /// The window is open on every node in this seed.
    window_open: bool,
    /// Requests sent to a window member without the token: id.
    window_reqs: std::collections::BTreeSet<RequestId>,
    /// on-no-quorum=suspend in this seed.
    suspend: bool,
    /// Requests outstanding on a node while its I/O was suspended.
    suspended_reqs: std::collections::BTreeSet<RequestId>,
    /// How long the operator waits before failing over from an isolated Primary (0 in most
    /// seeds): a short blip then heals under the same Primary.
    patience: Nanos,
    /// Since when the Primary has been isolated (for `patience`).
    primary_cut_since: Option<Nanos>,
    /// Faults, repairs, resizes and role changes so far (see `healthy_reqs`).
    disturbances: u64,
    /// Requests issued to a Primary of a cluster that had been converged (every link up and
    /// established, every disk UpToDate) for a while, with `disturbances` at the time.
    /// Liveness: such a request must not fail unless something happened meanwhile.
    healthy_reqs: BTreeMap<RequestId, u64>,
    /// Slow-disk periods: (node, from, until, factor) (see [`SimOptions::slow_disks`]).
    slow: Vec<(NodeId, Nanos, Nanos, u64)>,
}

/// Runs one seed. `Err` carries the seed, the violated invariant and a trace.
pub fn run(seed: u64, opts: &SimOptions) -> Result<Outcome, String> {
    let mut w = World::new(seed, opts.clone());
    let r = w.run_all();
    match r {
        Ok(()) => Ok(w.out),
        Err(e) => Err(format!(
            "SIM FAILURE seed={seed} topology={:?}: {e}\nreproduce: SIM_SEED={seed} cargo test -p tandem-sim\n{}last events:\n{}",
            w.out.topology,
            w.slow_periods(),
            w.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        )),
    }
}

pub(crate) fn key(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl World {
    fn new(seed: u64, opts: SimOptions) -> World {
        let mut rng = Rng::new(seed);
        // Always drawn, so pinning the topology keeps the rest of a seed's schedule.
        let roll = rng.range(0, 10);
        let topo = if opts.split_brain {
            Topology::TwoPlusWitness
        } else {
            opts.topology.unwrap_or(match roll {
                0..=7 => Topology::TwoPlusWitness,
                _ => Topology::Two,
            })
        };
        let diskful: Vec<bool> = match topo {
            Topology::TwoPlusWitness => vec![true, true, false],
            Topology::Three => vec![true, true, true],
            Topology::Two => vec![true, true],
            Topology::ThreePlusWitness => vec![true, true, true, false],
        };
        let size = opts.size_blocks * BLOCK;
        let gen0 = rng.next_u64() | 1;
        let sb = opts
            .split_brain
            .then(|| crate::split_brain::Scenario::new(&mut rng));
        let checksums = rng.chance(0.5);
        // Drawn from a side stream so that the main schedule of every seed (and so every
        // regression seed) stays what it was: the dynamic resync controller's floor in half
        // the seeds.
        let mut side = Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15);
        let resync_min_rate = if side.chance(0.5) {
            side.range(1, 64) << 20
        } else {
            0
        };
        let mut window_rng = Rng::new(seed ^ 0x2b1d_0a11_7e55_0003);
        let window_open = opts.dual_primary && !opts.split_brain && window_rng.chance(0.3);
        let mut suspend_rng = Rng::new(seed ^ 0x5e5b_e2d0_0000_0005);
        let suspend = opts.suspend && !opts.split_brain && suspend_rng.chance(0.3);
        let mut flush_rng = Rng::new(seed ^ 0xf1a5_4e11_0000_0006);
        let flush_after_writes =
            (opts.own_flushes && flush_rng.chance(0.3)).then(|| flush_rng.range(1, 9) as usize);
        let mut slow = Vec::new();
        let mut slow_rng = Rng::new(seed ^ 0x510d_d15c_0000_0008);
        if opts.slow_disks && !opts.split_brain && slow_rng.chance(0.5) {
            let disks: Vec<NodeId> = (0..diskful.len() as NodeId)
                .filter(|&n| diskful[n as usize])
                .collect();
            for _ in 0..slow_rng.range(1, 4) {
                let node = slow_rng.pick(&disks).expect("a diskful node");
                let from = slow_rng.range(0, opts.active_ms * MS);
                let until = from + slow_rng.range(2 * MS, 60 * MS);
                slow.push((node, from, until, slow_rng.range(10, 201)));
            }
        }
        let mut nodes = Vec::new();
        for (i, d) in diskful.iter().enumerate() {
            let peers = diskful
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(j, dj)| PeerConfig {
                    node_id: j as NodeId,
                    diskful: *dj,
                })
                .collect();
            let mut cfg = Config::new(i as NodeId, *d, peers, size);
            cfg.al_extent_bytes = 16 * BLOCK;
            cfg.al_extents = 3;
            cfg.resync_chunk = (8 * BLOCK) as u32;
            cfg.resync_max_inflight = 4;
            cfg.resync_rate = rng.range(20, 400) << 20;
            cfg.resync_min_rate = resync_min_rate;
            cfg.ping_interval = 0;
            cfg.entropy = rng.next_u64();
            if let Some(sb) = &sb {
                cfg.after_split_brain = sb.policy;
            }
            cfg.resync_checksums = checksums;
            cfg.allow_two_primaries = window_open;
            if suspend {
                cfg.on_no_quorum = tandem_replication::OnNoQuorum::Suspend;
            }
            if let Some(n) = flush_after_writes {
                cfg.flush_after_writes = n;
            }
            let persisted = Persisted::new_volume(&cfg, gen0);
            let (engine, _) = Engine::new(cfg.clone(), persisted.clone(), 0);
            nodes.push(Node {
                id: i as NodeId,
                diskful: *d,
                cfg,
                engine: Some(engine),
                inc: 1,
                disk: SimDisk::new(if *d { size } else { 0 }),
                persisted,
                writes_in_flight: BTreeMap::new(),
                isolated: false,
                disk_fault: None,
                persist_failed: false,
            });
        }
        let mut links = BTreeMap::new();
        for a in 0..nodes.len() as NodeId {
            for b in a + 1..nodes.len() as NodeId {
                links.insert((a, b), None);
            }
        }
        World {
            seed,
            rng,
            now: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            next_ev: 0,
            nodes,
            links,
            link_gen: 0,
            fifo: BTreeMap::new(),
            drop_next: None,
            frame_fault: FrameFault::Lose,
            frame_rng: Rng::new(seed ^ 0xf7a3_e5e9_0000_0009),
            send_numbers: BTreeMap::new(),
            recv_numbers: BTreeMap::new(),
            model: Model::new(opts.size_blocks, window_open),
            reqs: BTreeMap::new(),
            next_req: 1,
            next_write: 1,
            trace: VecDeque::new(),
            out: Outcome {
                topology: Some(topo),
                slow_disk_periods: slow.len() as u64,
                resync_checksums: checksums,
                window_seeds: u64::from(window_open),
                suspend_seeds: u64::from(suspend),
                ..Outcome::default()
            },
            fault: Fault::None,
            healthy_since: None,
            opts,
            workload: true,
            resize_rng: Rng::new(seed ^ 0x7e51_2e00_5eed_0001),
            target_blocks: size / BLOCK,
            resize_pending: Vec::new(),
            seen_verify: BTreeMap::new(),
            blocked: Default::default(),
            sb,
            disk_rng: Rng::new(seed ^ 0x0d15_cfa1_1ed0_0001),
            witness_rng: Rng::new(seed ^ 0x0d15_c1e5_5000_0001),
            crash_rng: Rng::new(seed ^ 0xc7a5_45e0_0000_0007),
            pending_crash: None,
            window_rng,
            window_open,
            window_reqs: Default::default(),
            suspend,
            suspended_reqs: Default::default(),
            patience: {
                let mut r = Rng::new(seed ^ 0x9a71_e0ce_0000_0004);
                if r.chance(0.3) {
                    r.range(2 * MS, 12 * MS)
                } else {
                    0
                }
            },
            primary_cut_since: None,
            disturbances: 0,
            healthy_reqs: BTreeMap::new(),
            slow,
        }
    }

    /// How long a disk operation of `node` that starts now takes: drawn from `lo..hi`, times
    /// the factor of a slow-disk period the node is in.
    fn disk_delay(&mut self, node: NodeId, lo: Nanos, hi: Nanos) -> Nanos {
        let d = self.rng.range(lo, hi);
        let now = self.now;
        match self
            .slow
            .iter()
            .find(|&&(n, from, until, _)| n == node && (from..until).contains(&now))
        {
            Some(&(_, _, _, factor)) => {
                self.out.slow_disk_ops += 1;
                d * factor
            }
            None => d,
        }
    }

    pub(crate) fn reqs_empty(&self) -> bool {
        self.reqs.is_empty()
    }

    pub(crate) fn tr(&mut self, s: String) {
        if self.trace.len() >= self.opts.trace_len {
            self.trace.pop_front();
        }
        self.trace.push_back(format!("{:>9}us {s}", self.now / US));
    }

    pub(crate) fn at(&mut self, t: Nanos, ev: Ev) {
        let id = self.next_ev;
        self.next_ev += 1;
        self.events.insert(id, ev);
        self.queue.push(Reverse((t, id)));
    }

    fn run_all(&mut self) -> Result<(), String> {
        let _ = self.seed;
        // Connect everything, make node 0 Primary once it has quorum.
        let pairs: Vec<_> = self.links.keys().copied().collect();
        for (a, b) in pairs {
            let t = self.rng.range(0, 50 * US);
            self.at(t, Ev::Reconnect { a, b });
        }
        self.at(100 * US, Ev::Step);
        let active_end = self.opts.active_ms * MS;
        if self.opts.resize && self.resize_rng.chance(0.5) {
            let at = self
                .resize_rng
                .range(20 * MS, active_end.max(40 * MS) - 10 * MS);
            let blocks = self.target_blocks + self.resize_rng.range(8, 65);
            self.target_blocks = blocks;
            self.model.grow(blocks);
            for node in 0..self.nodes.len() as NodeId {
                let t = at + self.resize_rng.range(0, 5 * MS);
                self.at(t, Ev::Resize { node, blocks });
            }
        }
        let deadline = active_end + 3000 * MS;
        while let Some(Reverse((t, id))) = self.queue.pop() {
            self.now = t;
            let ev = self.events.remove(&id).expect("scheduled event");
            self.out.events += 1;
            if self.now >= active_end && self.workload {
                self.workload = false;
                self.tr("end of active phase: no new faults or requests".into());
            }
            let is_step = matches!(ev, Ev::Step);
            self.dispatch(ev)?;
            self.check_primaries()?;
            if is_step {
                if let Some(sb) = &self.sb {
                    if sb.done() && self.reqs.is_empty() && self.converged() {
                        return self.sb_final_check();
                    }
                } else if !self.workload
                    && self.reqs.is_empty()
                    && self.fault == Fault::None
                    && self.converged()
                    && (!self.opts.strict_end || self.no_bits_left())
                {
                    return self.final_check();
                }
                if self.now > deadline {
                    return Err(format!(
                        "no convergence 3 s after the active phase; status:\n{}",
                        self.status_dump()
                    ));
                }
                self.at(self.now + MS, Ev::Step);
            }
        }
        Err("event queue ran dry".into())
    }

    /// One line per slow-disk period (for the failure report).
    fn slow_periods(&self) -> String {
        let mut s = String::new();
        for &(n, from, until, factor) in &self.slow {
            s.push_str(&format!(
                "slow disk: node {n} {}..{} us, {factor}x\n",
                from / US,
                until / US
            ));
        }
        s
    }

    fn status_dump(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            match &n.engine {
                Some(e) => s.push_str(&format!("  node {}: {:?}\n", n.id, e.status())),
                None => s.push_str(&format!("  node {}: down\n", n.id)),
            }
        }
        s
    }

    // ------------------------------------------------------------------ dispatch

    fn dispatch(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Step => self.step()?,
            Ev::Resize { node, blocks } => self.resize(node, blocks)?,
            Ev::Crash { node } => {
                if self.pending_crash == Some(node) {
                    self.pending_crash = None;
                    self.crash(node)?;
                }
            }
            Ev::BreakLinks { node } => {
                let detached = self.nodes[node as usize]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.status().disk_state == DiskState::Failed);
                if self.nodes[node as usize].disk_fault.is_some() && !detached {
                    // Only once the engine noticed: a link break before that is a second
                    // fault (a peer away while the only current copy fails).
                    let t = self.now + MS;
                    self.at(t, Ev::BreakLinks { node });
                } else if self.nodes[node as usize].disk_fault.is_some() {
                    self.tr(format!("fault: links of node {node} break (disk failing)"));
                    for m in 0..self.nodes.len() as NodeId {
                        if m != node {
                            self.break_link(node, m)?;
                        }
                    }
                }
            }
            Ev::Deliver {
                from,
                to,
                link,
                seq,
                msg,
            } => {
                if self.links.get(&key(from, to)).copied().flatten() != Some(link) {
                    return Ok(());
                }
                if self.drop_next == Some(key(from, to)) {
                    self.drop_next = None;
                    match self.frame_fault {
                        FrameFault::Lose => {
                            self.tr(format!(
                                "drop {} {from}->{to}: link breaks",
                                msg.message_type()
                            ));
                            self.break_link(from, to)?;
                            return Ok(());
                        }
                        FrameFault::Duplicate => {
                            self.out.frames_duplicated += 1;
                            self.tr(format!(
                                "frame {seq} {} {from}->{to} duplicated",
                                msg.message_type()
                            ));
                            self.deliver_later(from, to, link, seq, msg.clone());
                        }
                        FrameFault::Reorder => {
                            self.out.frames_reordered += 1;
                            self.tr(format!(
                                "frame {seq} {} {from}->{to} overtaken by what follows",
                                msg.message_type()
                            ));
                            self.deliver_later(from, to, link, seq, msg);
                            return Ok(());
                        }
                    }
                }
                // The receiving end checks the frame's number before anything reaches the
                // engine, as the transport's decoder does.
                let numbers = self
                    .recv_numbers
                    .entry((from, to))
                    .or_insert((link, FrameCounter::new()));
                if numbers.0 != link {
                    *numbers = (link, FrameCounter::new());
                }
                if let Err(e) = numbers.1.check(msg.message_type(), seq) {
                    self.out.sequence_breaks += 1;
                    // A link break of its own (after the fault that caused it ended).
                    self.disturbances += 1;
                    self.tr(format!("{from}->{to}: {e}: link breaks"));
                    self.break_link(from, to)?;
                    return Ok(());
                }
                self.tr(format!("{from}->{to} {}", short(&msg)));
                self.feed(to, Event::PeerMessage { peer: from, msg })?;
                self.check_verify(to)?;
            }
            Ev::DiskWriteDone { node, inc, io } => {
                let n = &mut self.nodes[node as usize];
                if n.inc != inc {
                    return Ok(());
                }
                if n.disk_fault.is_some() {
                    // A failing disk: the write errors out; maybe part of it reached the
                    // cache anyway (a restart keeps it or not, like any unflushed write).
                    if let Some((off, data, _)) = n.writes_in_flight.remove(&io)
                        && self.disk_rng.chance(0.5)
                    {
                        n.disk.complete_write(off, &data, false);
                    }
                    self.tr(format!("node {node} disk write FAILED"));
                    return self.feed(
                        node,
                        Event::DiskWriteDone {
                            io,
                            result: Err(DiskError("EIO (simulated)".into())),
                        },
                    );
                }
                if let Some((off, data, fua)) = n.writes_in_flight.remove(&io) {
                    n.disk.complete_write(off, &data, fua);
                    let first = off / BLOCK;
                    let w = parse_block(&data[..BLOCK as usize], first);
                    self.tr(format!(
                        "node {node} disk wrote blocks {first}+{} (first holds {w:?})",
                        data.len() as u64 / BLOCK
                    ));
                }
                self.feed(node, Event::DiskWriteDone { io, result: Ok(()) })?;
            }
            Ev::DiskReadDone {
                node,
                inc,
                io,
                offset,
                len,
            } => {
                let n = &self.nodes[node as usize];
                if n.inc != inc {
                    return Ok(());
                }
                if n.disk_fault.is_some() {
                    self.tr(format!("node {node} disk read FAILED"));
                    return self.feed(
                        node,
                        Event::DiskReadDone {
                            io,
                            result: Err(DiskError("EIO (simulated)".into())),
                        },
                    );
                }
                let o = offset as usize;
                let data = Bytes::copy_from_slice(&n.disk.data[o..o + len as usize]);
                self.feed(
                    node,
                    Event::DiskReadDone {
                        io,
                        result: Ok(data),
                    },
                )?;
            }
            Ev::DiskFlushDone {
                node,
                inc,
                io,
                marker,
            } => {
                let n = &mut self.nodes[node as usize];
                if n.inc != inc {
                    return Ok(());
                }
                if n.disk_fault.is_some() {
                    self.tr(format!("node {node} disk flush FAILED"));
                    return self.feed(
                        node,
                        Event::DiskFlushDone {
                            io,
                            result: Err(DiskError("EIO (simulated)".into())),
                        },
                    );
                }
                n.disk.complete_flush(marker);
                self.tr(format!("node {node} disk flush done (marker {marker})"));
                self.feed(node, Event::DiskFlushDone { io, result: Ok(()) })?;
            }
            Ev::DiskChecksumDone {
                node,
                inc,
                io,
                offset,
                len,
                block_size,
            } => {
                let n = &self.nodes[node as usize];
                if n.inc != inc {
                    return Ok(());
                }
                if n.disk_fault.is_some() {
                    return self.feed(
                        node,
                        Event::DiskChecksumDone {
                            io,
                            result: Err(DiskError("EIO (simulated)".into())),
                        },
                    );
                }
                let o = offset as usize;
                let digests = n.disk.data[o..o + len as usize]
                    .chunks(block_size as usize)
                    .map(|b| tandem_repl_proto::ChecksumAlg::Blake3.digest(b))
                    .collect();
                self.feed(
                    node,
                    Event::DiskChecksumDone {
                        io,
                        result: Ok(digests),
                    },
                )?;
                self.check_verify(node)?;
            }
            Ev::Close { a, b, link } => {
                if self.links.get(&key(a, b)).copied().flatten() == Some(link) {
                    self.break_link(a, b)?;
                }
            }
            Ev::Reconnect { a, b } => {
                let up = self.links.get(&key(a, b)).copied().flatten().is_some();
                let ok = |n: &Node| n.engine.is_some() && !n.isolated;
                if !up
                    && !self.blocked.contains(&key(a, b))
                    && ok(&self.nodes[a as usize])
                    && ok(&self.nodes[b as usize])
                {
                    self.link_gen += 1;
                    let g = self.link_gen;
                    self.links.insert(key(a, b), Some(g));
                    self.tr(format!("link {a}-{b} up"));
                    self.feed(a, Event::PeerUp { peer: b })?;
                    self.feed(b, Event::PeerUp { peer: a })?;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn feed(&mut self, node: NodeId, ev: Event) -> Result<(), String> {
        let now = self.now;
        let Some(e) = self.nodes[node as usize].engine.as_mut() else {
            return Ok(());
        };
        let actions = e.handle(now, ev);
        self.apply(node, actions)
    }

    /// Actions of an operator command (promote, demote, verify, window): requests in flight
    /// may fail across a role change.
    fn apply_operator(&mut self, node: NodeId, actions: Vec<Action>) -> Result<(), String> {
        self.disturbances += 1;
        self.apply(node, actions)
    }

    pub(crate) fn apply(&mut self, node: NodeId, actions: Vec<Action>) -> Result<(), String> {
        let cut = self.apply_actions(node, actions)?;
        for peer in cut {
            // A message the failed persist should have preceded was not sent: the link
            // breaks (TCP semantics), so the peer never applies what our disk may lack.
            self.break_link(node, peer)?;
        }
        if std::mem::take(&mut self.nodes[node as usize].persist_failed) {
            // The driver reports a failed persist; nothing after it was made durable (the
            // failing disk fails every later I/O of the batch too).
            self.tr(format!("node {node} metadata write FAILED"));
            self.feed(
                node,
                Event::DiskFailed {
                    reason: "metadata write failed: EIO (simulated)".into(),
                },
            )?;
        }
        Ok(())
    }

    fn apply_actions(&mut self, node: NodeId, actions: Vec<Action>) -> Result<Vec<NodeId>, String> {
        let mut cut = Vec::new();
        let mut failed_here = false;
        for a in actions {
            if failed_here && let Action::Send { peer, .. } = &a {
                if !cut.contains(peer) {
                    cut.push(*peer);
                }
                continue;
            }
            if self.nodes[node as usize].disk_fault == Some(true)
                && matches!(
                    a,
                    Action::PersistMeta(_)
                        | Action::PersistBits { .. }
                        | Action::PersistActivityLog(_)
                )
            {
                // A persist the engine relied on (not the best-effort metadata of an already
                // detached disk, which says Failed): what follows it must not reach the peers.
                if !self.nodes[node as usize].persist_failed
                    && !matches!(&a, Action::PersistMeta(m) if m.disk_state == DiskState::Failed)
                {
                    failed_here = true;
                }
                self.nodes[node as usize].persist_failed = true;
                continue;
            }
            match a {
                Action::DiskWrite {
                    io,
                    offset,
                    data,
                    fua,
                } => {
                    let inc = self.nodes[node as usize].inc;
                    // After a failed persist the driver does not start later disk I/O of the
                    // batch (it completes with an error at once): nothing reaches the disk.
                    if !failed_here {
                        self.nodes[node as usize]
                            .writes_in_flight
                            .insert(io, (offset, data, fua));
                    }
                    let t = self.now + self.disk_delay(node, 5 * US, 120 * US);
                    self.at(t, Ev::DiskWriteDone { node, inc, io });
                }
                Action::DiskRead { io, offset, len } => {
                    let inc = self.nodes[node as usize].inc;
                    let t = self.now + self.disk_delay(node, 5 * US, 80 * US);
                    self.at(
                        t,
                        Ev::DiskReadDone {
                            node,
                            inc,
                            io,
                            offset,
                            len,
                        },
                    );
                }
                Action::DiskFlush { io } => {
                    let n = &self.nodes[node as usize];
                    let (inc, marker) = (n.inc, n.disk.flush_marker());
                    let t = self.now + self.disk_delay(node, 20 * US, 300 * US);
                    self.at(
                        t,
                        Ev::DiskFlushDone {
                            node,
                            inc,
                            io,
                            marker,
                        },
                    );
                }
                Action::DiskChecksum {
                    io,
                    offset,
                    len,
                    block_size,
                } => {
                    let inc = self.nodes[node as usize].inc;
                    let t = self.now + self.disk_delay(node, 5 * US, 80 * US);
                    self.at(
                        t,
                        Ev::DiskChecksumDone {
                            node,
                            inc,
                            io,
                            offset,
                            len,
                            block_size,
                        },
                    );
                }
                Action::Send { peer, msg } => self.send(node, peer, msg),
                Action::Disconnect {
                    peer,
                    reason,
                    reconnect,
                } => {
                    self.tr(format!("node {node} disconnects {peer}: {reason:?}"));
                    if !reconnect && self.sb.is_some() {
                        // The scenario expects it: the pair stays apart until resolved.
                        self.blocked.insert(key(node, peer));
                        if let Some(sb) = self.sb.as_mut() {
                            sb.split_seen = true;
                        }
                    } else if !reconnect {
                        return Err(format!(
                            "node {node} refuses node {peer} for good ({reason:?}): split brain or unrelated data under at most one fault"
                        ));
                    }
                    if let Some(g) = self.links.get(&key(node, peer)).copied().flatten() {
                        let t1 = self.fifo.get(&(node, peer)).copied().unwrap_or(0);
                        let t2 = self.fifo.get(&(peer, node)).copied().unwrap_or(0);
                        let t = t1.max(t2).max(self.now) + 1;
                        self.at(
                            t,
                            Ev::Close {
                                a: node,
                                b: peer,
                                link: g,
                            },
                        );
                    }
                }
                Action::Complete { id, result } => self.completed(node, id, result)?,
                Action::PersistMeta(m) => self.nodes[node as usize].persisted.meta = m,
                Action::PersistBits {
                    peer,
                    set,
                    first,
                    count,
                } => {
                    let n = &mut self.nodes[node as usize];
                    let (size, g) = (n.cfg.size_bytes, n.cfg.bitmap_granularity);
                    let b = n
                        .persisted
                        .bitmaps
                        .entry(peer)
                        .or_insert_with(|| Bitmap::new(size, g));
                    if set {
                        b.set_bits(first, count);
                    } else {
                        b.clear_bits(first, count);
                    }
                }
                Action::PersistActivityLog(al) => {
                    self.nodes[node as usize].persisted.activity_log = al
                }
                Action::Log { level, msg } => {
                    if msg.contains("offers its generation") {
                        self.out.offers_taken += 1;
                    }
                    if msg.contains("a peer holds our data again") {
                        self.out.diskless_resumes += 1;
                    }
                    self.tr(format!("node {node} {level:?}: {msg}"))
                }
            }
        }
        Ok(cut)
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Message) {
        let Some(g) = self.links.get(&key(from, to)).copied().flatten() else {
            return;
        };
        let delay = self.rng.range(10 * US, 200 * US);
        let last = self.fifo.get(&(from, to)).copied().unwrap_or(0);
        let t = (self.now + delay).max(last + 1);
        self.fifo.insert((from, to), t);
        let numbers = self
            .send_numbers
            .entry((from, to))
            .or_insert((g, FrameCounter::new()));
        if numbers.0 != g {
            *numbers = (g, FrameCounter::new());
        }
        let seq = numbers.1.take();
        self.at(
            t,
            Ev::Deliver {
                from,
                to,
                link: g,
                seq,
                msg,
            },
        );
    }

    /// A frame fault: `msg` (frame `seq` of link `link`) arrives again behind everything on
    /// its way from `from` to `to` (timing from the frame-fault stream, so the rest of the
    /// schedule keeps its draws).
    fn deliver_later(&mut self, from: NodeId, to: NodeId, link: u64, seq: u32, msg: Message) {
        let delay = self.frame_rng.range(10 * US, 200 * US);
        let last = self.fifo.get(&(from, to)).copied().unwrap_or(0);
        let t = (self.now + delay).max(last + 1);
        self.fifo.insert((from, to), t);
        self.at(
            t,
            Ev::Deliver {
                from,
                to,
                link,
                seq,
                msg,
            },
        );
    }

    pub(crate) fn break_link(&mut self, a: NodeId, b: NodeId) -> Result<(), String> {
        if self.links.get(&key(a, b)).copied().flatten().is_none() {
            return Ok(());
        }
        self.links.insert(key(a, b), None);
        self.tr(format!("link {a}-{b} down"));
        self.feed(a, Event::PeerDown { peer: b })?;
        self.feed(b, Event::PeerDown { peer: a })?;
        let t = self.now + self.rng.range(MS, 8 * MS);
        self.at(t, Ev::Reconnect { a, b });
        Ok(())
    }

    // ------------------------------------------------------------------ consumer

    fn completed(
        &mut self,
        node: NodeId,
        id: RequestId,
        result: Result<Reply, tandem_replication::RequestError>,
    ) -> Result<(), String> {
        if self.sb_completed(node, id, &result)? {
            return Ok(());
        }
        let Some((rnode, _, req)) = self.reqs.remove(&id) else {
            return Err(format!("completion for unknown request {id}"));
        };
        if rnode != node {
            return Err(format!(
                "request {id} completed by node {node}, sent to {rnode}"
            ));
        }
        let ok = result.is_ok();
        if ok
            && self.nodes[node as usize]
                .engine
                .as_ref()
                .is_some_and(|e| e.status().disk_state == DiskState::Failed)
        {
            self.out.detached_io_ok += 1;
        }
        if ok && !self.nodes[node as usize].diskful {
            self.out.diskless_io_ok += 1;
        }
        if self.window_reqs.remove(&id) && ok {
            self.out.window_io_ok += 1;
        }
        if self.suspended_reqs.remove(&id) && ok {
            self.out.suspended_io_ok += 1;
        }
        if let Some(at) = self.healthy_reqs.remove(&id) {
            if let (Err(e), true) = (&result, at == self.disturbances) {
                return Err(format!(
                    "liveness: request {id} failed on node {node} in a converged cluster with nothing happening: {e}"
                ));
            }
            if ok {
                self.out.healthy_io_ok += 1;
            }
        }
        if ok && !matches!(req, Req::Read { .. }) {
            // Invariant 4: nothing completes without quorum (engine view and ground truth).
            let e = self.nodes[node as usize].engine.as_ref().expect("live");
            let voters = self.nodes.len();
            let up = 1 + self
                .links
                .iter()
                .filter(|((a, b), g)| g.is_some() && (*a == node || *b == node))
                .count();
            // A window member that handed the write token over right after this completion
            // (same batch) is Secondary now, waiting for its peers' answers to the role
            // change: its engine view no longer says quorum, the ground truth still must.
            let handed_over = e.role() != Role::Primary && e.status().dual_primary.is_some();
            if (!e.has_quorum() && !handed_over) || up * 2 <= voters {
                return Err(format!(
                    "invariant 4: request {id} completed on node {node} without quorum ({up} of {voters} reachable)"
                ));
            }
        }
        match req {
            Req::Write { w, first, n, fua } => {
                self.tr(format!(
                    "write w{w} blocks {first}+{n} -> {}",
                    if ok { "ok" } else { "failed" }
                ));
                if ok {
                    self.out.writes_acked += 1;
                    self.model.write_acked(w, first, n, fua);
                } else {
                    self.out.writes_failed += 1;
                    self.model.write_failed(w, first, n);
                }
            }
            Req::Flush { marker } => {
                if ok {
                    self.out.flushes_acked += 1;
                    self.model.flush_done(marker);
                }
            }
            Req::Read { first, n } => {
                for b in first..first + n {
                    self.model.blocks[b as usize].reads_in_flight -= 1;
                }
                if let Ok(Reply::Data(d)) = result {
                    self.out.reads_checked += 1;
                    for b in first..first + n {
                        let o = ((b - first) * BLOCK) as usize;
                        let got = parse_block(&d[o..o + BLOCK as usize], b);
                        match got {
                            Some(w) if self.model.allowed(b, w) => {}
                            _ => {
                                let blk = &self.model.blocks[b as usize];
                                return Err(format!(
                                    "invariant 5/1: read of block {b} on node {node} returned {got:?}; allowed: acked w{} (durable w{}) or {:?}",
                                    blk.acked, blk.durable, blk.possible
                                ));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn primary(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.engine.as_ref().is_some_and(|e| e.role() == Role::Primary))
            .map(|n| n.id)
    }

    /// Nodes that are Primary to their consumer: the Primary, and with the dual-primary
    /// window the members (one of them may be between hand-offs).
    fn consumer_primaries(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.role() == Role::Primary || e.status().dual_primary.is_some())
            })
            .map(|n| n.id)
            .collect()
    }

    pub(crate) fn workload_step(&mut self) -> Result<(), String> {
        let target = if self.window_open {
            let c = self.consumer_primaries();
            self.window_rng.pick(&c)
        } else {
            self.primary()
        };
        let Some(p) = target else {
            return Ok(());
        };
        let inflight = self.reqs.values().filter(|(n, _, _)| *n == p).count();
        let nreq = self.rng.range(0, 4);
        for _ in 0..nreq {
            if inflight >= 8 {
                break;
            }
            let id = self.next_req;
            self.next_req += 1;
            // Within what the Primary may use (the smallest connected replica while a resize
            // is under way).
            let blocks = self.nodes[p as usize]
                .engine
                .as_ref()
                .map_or(0, |e| e.usable_size() / BLOCK);
            let r = self.rng.range(0, 100);
            let (ev, req) = if r < 60 {
                let n = self.rng.range(1, 9).min(blocks);
                let first = self.rng.range(0, blocks - n + 1);
                if (first..first + n).any(|b| self.model.blocks[b as usize].reads_in_flight > 0) {
                    continue;
                }
                let w = self.next_write;
                self.next_write += 1;
                let mut data = Vec::with_capacity((n * BLOCK) as usize);
                for b in first..first + n {
                    data.extend_from_slice(&block_bytes(w, b));
                }
                let fua = self.rng.chance(0.1);
                self.model.issue_write(w, first, n);
                (
                    Event::Write {
                        id,
                        offset: first * BLOCK,
                        data: Bytes::from(data),
                        fua,
                    },
                    Req::Write { w, first, n, fua },
                )
            } else if r < 85 {
                let n = self.rng.range(1, 5).min(blocks);
                let first = self.rng.range(0, blocks - n + 1);
                if (first..first + n).any(|b| self.model.blocks[b as usize].writes_in_flight > 0) {
                    continue;
                }
                for b in first..first + n {
                    self.model.blocks[b as usize].reads_in_flight += 1;
                }
                (
                    Event::Read {
                        id,
                        offset: first * BLOCK,
                        len: (n * BLOCK) as u32,
                    },
                    Req::Read { first, n },
                )
            } else {
                (
                    Event::Flush { id },
                    Req::Flush {
                        marker: self.model.ack_counter,
                    },
                )
            };
            let inc = self.nodes[p as usize].inc;
            self.reqs.insert(id, (p, inc, req));
            let now = self.now;
            let settled = self.fault == Fault::None
                && !self.window_open
                && self.healthy_since.is_some_and(|t| now >= t + 2 * MS)
                && self.converged();
            if settled {
                self.healthy_reqs.insert(id, self.disturbances);
            }
            let without_token = self.nodes[p as usize]
                .engine
                .as_ref()
                .and_then(|e| e.status().dual_primary)
                .is_some_and(|d| !d.write_token);
            if without_token {
                self.window_reqs.insert(id);
            }
            self.feed(p, ev)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ schedule

    fn step(&mut self) -> Result<(), String> {
        for i in 0..self.nodes.len() {
            self.feed(i as NodeId, Event::Tick)?;
        }
        if self.suspend {
            for n in 0..self.nodes.len() as NodeId {
                let held = self.nodes[n as usize]
                    .engine
                    .as_ref()
                    .is_some_and(|e| e.status().suspended_requests > 0);
                if held {
                    let ids: Vec<RequestId> = self
                        .reqs
                        .iter()
                        .filter(|(_, (node, _, _))| *node == n)
                        .map(|(id, _)| *id)
                        .collect();
                    self.suspended_reqs.extend(ids);
                }
            }
        }
        if self.sb.is_some() {
            return self.sb_step();
        }
        self.operator()?;
        if self.workload {
            self.faults()?;
            self.workload_step()?;
        } else {
            self.end_faults()?;
        }
        Ok(())
    }

    /// Promotes a node when none is Primary with quorum; sometimes switches over on purpose
    /// or tries a promotion that must be refused.
    fn operator(&mut self) -> Result<(), String> {
        let primary = self.primary();
        let usable = |n: &Node| n.diskful && n.engine.is_some() && !n.isolated;
        let up = |n: &Node| n.engine.is_some() && !n.isolated;
        let primary_ok = primary.is_some_and(|p| up(&self.nodes[p as usize]));
        // A window member between hand-offs (no replication Primary for a moment) still
        // serves its consumer: no failover then.
        let member_ok = self.window_open
            && self
                .consumer_primaries()
                .iter()
                .any(|m| up(&self.nodes[*m as usize]));
        if !primary_ok && member_ok {
            return Ok(());
        }
        if primary.is_some() && !primary_ok {
            // An isolated Primary: a patient operator gives the network a moment.
            let now = self.now;
            let since = *self.primary_cut_since.get_or_insert(now);
            if now < since + self.patience {
                return Ok(());
            }
        } else {
            self.primary_cut_since = None;
        }
        if !primary_ok {
            // Failover (or first promotion): the old Primary is crashed or isolated.
            let cands: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| usable(n) && Some(n.id) != primary)
                .map(|n| n.id)
                .collect();
            let mut pick = self.rng.pick(&cands);
            if self.opts.diskless_primary && self.witness_rng.chance(0.35) {
                // A diskless Primary: the witness, when it is up.
                if let Some(w) = self.nodes.iter().find(|n| {
                    !n.diskful
                        && up(n)
                        && n.engine.as_ref().is_some_and(|e| e.role() != Role::Primary)
                }) {
                    pick = Some(w.id);
                }
            }
            if let Some(c) = pick {
                let now = self.now;
                let e = self.nodes[c as usize].engine.as_mut().expect("live");
                match e.promote(now) {
                    Ok(actions) => {
                        self.tr(format!("operator: promoted node {c}"));
                        if !self.nodes[c as usize].diskful {
                            self.out.diskless_promotions += 1;
                        }
                        if primary.is_some() || self.out.writes_acked > 0 {
                            self.out.failovers += 1;
                        }
                        self.apply_operator(c, actions)?;
                    }
                    Err(e) => self.tr(format!("operator: promote {c} refused: {e}")),
                }
            }
            return Ok(());
        }
        let p = primary.expect("checked");
        if self.workload && self.fault == Fault::None && self.rng.chance(0.004) {
            // A promotion that must be refused: another Primary is up and connected.
            let cands: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| {
                    usable(n)
                        && n.id != p
                        && self.links.get(&key(n.id, p)).copied().flatten().is_some()
                })
                .map(|n| n.id)
                .collect();
            if let Some(c) = self.rng.pick(&cands) {
                let now = self.now;
                let connected_long = self.healthy_since.is_some_and(|t| now > t + MS);
                let e = self.nodes[c as usize].engine.as_mut().expect("live");
                if connected_long {
                    let was_member = e.status().dual_primary.is_some();
                    match e.promote(now) {
                        Ok(actions) if e.status().dual_primary.is_some() => {
                            if !was_member {
                                self.tr(format!(
                                    "operator: node {c} joined the dual-primary window"
                                ));
                                self.out.window_joins += 1;
                            }
                            self.apply_operator(c, actions)?;
                        }
                        Ok(actions) => {
                            self.apply_operator(c, actions)?;
                            return Err(format!(
                                "invariant 3: node {c} was promoted while node {p} is Primary and connected"
                            ));
                        }
                        Err(err) => self.tr(format!("operator: bad promote of {c} refused: {err}")),
                    }
                }
            }
        }
        if self.window_open && self.workload {
            self.window_operator(p)?;
        }
        // Online verify from the Primary while healthy, sometimes with resync of findings.
        if self.workload && self.fault == Fault::None && self.converged() && self.rng.chance(0.01) {
            let now = self.now;
            let resync = self.rng.chance(0.5);
            let e = self.nodes[p as usize].engine.as_mut().expect("live");
            match e.start_verify(now, resync) {
                Ok(actions) => {
                    self.tr(format!("operator: verify from node {p} (resync {resync})"));
                    self.out.verifies += 1;
                    self.apply_operator(p, actions)?;
                }
                Err(err) => self.tr(format!("operator: verify refused: {err}")),
            }
        }
        // Planned switchover: only while everything is connected and in sync (promoting a
        // node that missed writes is an operator error the engine cannot see without fencing).
        if self.workload && self.fault == Fault::None && self.converged() && self.rng.chance(0.003)
        {
            let now = self.now;
            let e = self.nodes[p as usize].engine.as_mut().expect("live");
            match e.demote(now) {
                Ok(actions) => {
                    self.tr(format!("operator: demoted node {p} (switchover)"));
                    self.apply_operator(p, actions)?;
                }
                Err(err) => self.tr(format!("operator: demote {p} refused: {err}")),
            }
        }
        Ok(())
    }

    pub(crate) fn converged(&self) -> bool {
        let links_up = self.links.values().all(|g| g.is_some());
        let sized = self
            .nodes
            .iter()
            .all(|n| n.cfg.size_bytes == self.target_blocks * BLOCK);
        links_up
            && sized
            && self.nodes.iter().all(|n| {
                let Some(e) = &n.engine else { return false };
                let s = e.status();
                !n.isolated
                    && (!n.diskful || s.disk_state == DiskState::UpToDate)
                    && s.peers
                        .iter()
                        .all(|p| p.connected && p.repl_state == ReplState::Established)
            })
    }

    /// No diskful replica holds out-of-sync bits toward another (see
    /// [`SimOptions::strict_end`]).
    fn no_bits_left(&self) -> bool {
        self.nodes.iter().filter(|n| n.diskful).all(|n| {
            n.engine.as_ref().is_some_and(|e| {
                e.status()
                    .peers
                    .iter()
                    .all(|p| !p.diskful || p.out_of_sync_bytes == 0)
            })
        })
    }

    fn faults(&mut self) -> Result<(), String> {
        let now = self.now;
        if self.fault != Fault::None {
            // A repair or heal may follow (restart, reconnects): requests of the settled
            // time may fail across it.
            self.disturbances += 1;
        }
        match self.fault {
            Fault::Crash(n, until) if now >= until => {
                if self.pending_crash == Some(n) {
                    self.pending_crash = None;
                    self.crash(n)?;
                }
                self.restart(n)?;
                self.fault = Fault::None;
                self.healthy_since = None;
            }
            Fault::Isolate(n, until) if now >= until => {
                self.tr(format!("heal partition of node {n}"));
                self.nodes[n as usize].isolated = false;
                for m in 0..self.nodes.len() as NodeId {
                    if m != n {
                        let t = self.now + self.rng.range(10 * US, MS);
                        self.at(t, Ev::Reconnect { a: n, b: m });
                    }
                }
                self.fault = Fault::None;
                self.healthy_since = None;
            }
            Fault::Link if self.drop_next.is_none() => {
                self.fault = Fault::None;
                self.healthy_since = None;
            }
            Fault::Disk(n, until) if now >= until => {
                // Repair: the node restarts on a healthy disk (the agent restarted after the
                // file system was fixed); what the failing disk did not make durable may be
                // gone, like in a crash.
                self.tr(format!("disk of node {n} repaired: restart"));
                self.nodes[n as usize].disk_fault = None;
                self.crash(n)?;
                let t = self.now + self.rng.range(MS, 5 * MS);
                self.fault = Fault::Crash(n, t);
                self.healthy_since = None;
            }
            Fault::None => {
                if self.converged() {
                    if self.healthy_since.is_none() {
                        self.healthy_since = Some(now);
                    }
                } else {
                    self.healthy_since = None;
                }
                let ready = self.healthy_since.is_some_and(|t| now >= t + 2 * MS);
                if self.opts.faults && ready && self.rng.chance(0.05) {
                    self.inject()?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn end_faults(&mut self) -> Result<(), String> {
        match self.fault {
            Fault::Crash(_, _) | Fault::Isolate(_, _) => {
                // Heal now.
                let until = self.now;
                self.fault = match self.fault {
                    Fault::Crash(n, _) => Fault::Crash(n, until),
                    Fault::Isolate(n, _) => Fault::Isolate(n, until),
                    f => f,
                };
                self.faults()
            }
            Fault::Link => {
                self.drop_next = None;
                self.fault = Fault::None;
                Ok(())
            }
            Fault::Disk(n, _) => {
                self.fault = Fault::Disk(n, self.now);
                self.faults()
            }
            Fault::None => Ok(()),
        }
    }

    fn inject(&mut self) -> Result<(), String> {
        self.disturbances += 1;
        if self.opts.disk_faults && self.disk_rng.chance(0.25) {
            let cands: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| n.diskful && n.engine.is_some())
                .map(|n| n.id)
                .collect();
            if let Some(n) = self.disk_rng.pick(&cands) {
                let dur = self.disk_rng.range(2 * MS, 40 * MS);
                let meta = self.disk_rng.chance(0.5);
                self.out.disk_failures += 1;
                if self.primary() == Some(n) {
                    self.out.disk_failures_primary += 1;
                }
                self.tr(format!(
                    "fault: DISK of node {n} fails (metadata writes fail too: {meta})"
                ));
                self.nodes[n as usize].disk_fault = Some(meta);
                if self.disk_rng.chance(0.5) {
                    let t = self.now + self.disk_rng.range(0, dur);
                    self.at(t, Ev::BreakLinks { node: n });
                }
                self.fault = Fault::Disk(n, self.now + dur);
                return Ok(());
            }
        }
        let n = self.rng.range(0, self.nodes.len() as u64) as NodeId;
        let dur = self.rng.range(2 * MS, 40 * MS);
        match self.rng.range(0, 3) {
            0 => {
                self.out.crashes += 1;
                if self.opts.crash_in_flight {
                    let t = self.now + self.crash_rng.range(0, MS);
                    self.pending_crash = Some(n);
                    self.at(t, Ev::Crash { node: n });
                } else {
                    self.crash(n)?;
                }
                self.fault = Fault::Crash(n, self.now + dur);
            }
            1 => {
                self.out.partitions += 1;
                self.tr(format!("partition: node {n} isolated"));
                self.nodes[n as usize].isolated = true;
                for m in 0..self.nodes.len() as NodeId {
                    if m != n {
                        self.break_link(n, m)?;
                    }
                }
                self.fault = Fault::Isolate(n, self.now + dur);
            }
            _ => {
                let pairs: Vec<_> = self.links.keys().copied().collect();
                let l = self.rng.pick(&pairs).expect("links");
                self.out.link_breaks += 1;
                self.frame_fault = if self.opts.frame_faults {
                    match self.frame_rng.range(0, 4) {
                        0 => FrameFault::Duplicate,
                        1 => FrameFault::Reorder,
                        _ => FrameFault::Lose,
                    }
                } else {
                    FrameFault::Lose
                };
                let what = match self.frame_fault {
                    FrameFault::Lose => "is lost",
                    FrameFault::Duplicate => "is duplicated",
                    FrameFault::Reorder => "is reordered",
                };
                self.tr(format!(
                    "fault: next message on link {}-{} {what}",
                    l.0, l.1
                ));
                self.drop_next = Some(l);
                self.fault = Fault::Link;
            }
        }
        Ok(())
    }

    fn crash(&mut self, n: NodeId) -> Result<(), String> {
        self.tr(format!("CRASH node {n}"));
        let was_primary = self.nodes[n as usize]
            .engine
            .as_ref()
            .is_some_and(|e| e.role() == Role::Primary);
        {
            let node = &mut self.nodes[n as usize];
            node.engine = None;
            node.inc += 1;
            let inflight: Vec<(u64, Vec<u8>)> = node
                .writes_in_flight
                .values()
                .map(|(o, d, _)| (*o, d.to_vec()))
                .collect();
            node.writes_in_flight.clear();
            if node.diskful {
                let mut rng = Rng::new(self.rng.next_u64());
                if let Ok(b) = std::env::var("SIM_DEBUG_BLOCK") {
                    let b: usize = b.parse().unwrap_or(0);
                    eprintln!(
                        "{} crash node {n}: block {b} data {:?} durable {:?}",
                        self.now,
                        parse_block(&node.disk.data[b * 4096..(b + 1) * 4096], b as u64),
                        parse_block(&node.disk.durable[b * 4096..(b + 1) * 4096], b as u64)
                    );
                }
                node.disk.crash(&mut rng, &inflight);
            }
        }
        // Requests in flight on the crashed node are lost: their writes may or may not be there.
        let lost: Vec<RequestId> = self
            .reqs
            .iter()
            .filter(|(_, (node, _, _))| *node == n)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some((_, _, req)) = self.reqs.remove(&id) {
                match req {
                    Req::Write { w, first, n, .. } => self.model.write_failed(w, first, n),
                    Req::Read { first, n } => {
                        for b in first..first + n {
                            self.model.blocks[b as usize].reads_in_flight -= 1;
                        }
                    }
                    Req::Flush { .. } => {}
                }
            }
        }
        if was_primary {
            self.model.primary_crashed();
        }
        for m in 0..self.nodes.len() as NodeId {
            if m == n {
                continue;
            }
            let link = self.links.get(&key(n, m)).copied().flatten();
            match link {
                Some(g) if self.opts.crash_in_flight && self.crash_rng.chance(0.5) => {
                    // What it sent still arrives, then the link closes.
                    let sent = self.fifo.get(&(n, m)).copied().unwrap_or(0);
                    let t = sent.max(self.now) + 1;
                    self.tr(format!("link {n}-{m} closes after what node {n} sent"));
                    self.at(
                        t,
                        Ev::Close {
                            a: n,
                            b: m,
                            link: g,
                        },
                    );
                }
                _ => self.break_link(n, m)?,
            }
        }
        Ok(())
    }

    /// Grows node `n` like the driver does: the backing store (zeros, durable) and the
    /// persisted bitmaps first, then the engine learns the size.
    fn resize(&mut self, n: NodeId, blocks: u64) -> Result<(), String> {
        let size = blocks * BLOCK;
        let node = &mut self.nodes[n as usize];
        if node.cfg.size_bytes >= size {
            return Ok(());
        }
        if node.engine.is_none() {
            if !self.resize_pending.contains(&n) {
                self.resize_pending.push(n);
            }
            return Ok(());
        }
        if node.diskful {
            node.disk.grow(size);
        }
        node.cfg.size_bytes = size;
        for b in node.persisted.bitmaps.values_mut() {
            b.resize(size);
        }
        self.out.resizes += 1;
        self.disturbances += 1;
        self.tr(format!("RESIZE node {n} to {blocks} blocks"));
        self.feed(n, Event::Resize { size_bytes: size })
    }

    fn restart(&mut self, n: NodeId) -> Result<(), String> {
        if let Some(i) = self.resize_pending.iter().position(|x| *x == n) {
            self.resize_pending.remove(i);
            let t = self.now + self.rng_resize_delay();
            let blocks = self.target_blocks;
            self.at(t, Ev::Resize { node: n, blocks });
        }
        self.tr(format!("RESTART node {n}"));
        // A link of the crash still closing (`SimOptions::crash_in_flight`) is gone now.
        for m in 0..self.nodes.len() as NodeId {
            if m != n {
                self.break_link(n, m)?;
            }
        }
        let node = &mut self.nodes[n as usize];
        let (engine, actions) = Engine::new(node.cfg.clone(), node.persisted.clone(), self.now);
        node.engine = Some(engine);
        self.apply(n, actions)?;
        for m in 0..self.nodes.len() as NodeId {
            if m != n {
                let t = self.now + self.rng.range(10 * US, MS);
                self.at(t, Ev::Reconnect { a: n, b: m });
            }
        }
        Ok(())
    }

    fn rng_resize_delay(&mut self) -> Nanos {
        self.resize_rng.range(0, 3 * MS)
    }

    // ------------------------------------------------------------------ invariants

    /// Invariant 6: an online verify never finds a difference (nothing corrupts replicas
    /// here; a write during verify must not be reported as one).
    fn check_verify(&mut self, node: NodeId) -> Result<(), String> {
        let Some(e) = self.nodes[node as usize].engine.as_ref() else {
            return Ok(());
        };
        let st = e.status();
        if let Some(v) = &st.verify
            && v.different_bytes > 0
        {
            return Err(format!(
                "invariant 6: verify {} on node {node} finds {} bytes different",
                v.run, v.different_bytes
            ));
        }
        if let Some(r) = st.last_verify
            && self.seen_verify.get(&node) != Some(&r.run)
        {
            self.seen_verify.insert(node, r.run);
            if r.different_bytes > 0 {
                // What each diskful node holds in the first differing block.
                let b = r.ranges.first().map_or(0, |(off, _)| off / BLOCK);
                let held: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.diskful && n.disk.data.len() as u64 >= (b + 1) * BLOCK)
                    .map(|n| {
                        let at = (b * BLOCK) as usize;
                        let w = parse_block(&n.disk.data[at..at + BLOCK as usize], b);
                        format!("node {} {w:?}", n.id)
                    })
                    .collect();
                return Err(format!(
                    "invariant 6: verify {} on node {node} found {} bytes different: {:?} (block {b}: {})",
                    r.run,
                    r.different_bytes,
                    r.ranges,
                    held.join(", ")
                ));
            }
            self.out.verifies_done += 1;
            self.out.verified_bytes += r.checked_bytes;
            self.tr(format!(
                "node {node} verify {} done: {} bytes compared{}",
                r.run,
                r.checked_bytes,
                r.error
                    .map(|e| format!(", ended early: {e}"))
                    .unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// With the window open: sometimes promote a second node next to the Primary, sometimes
    /// demote one of the two members (refused while it has requests in flight).
    fn window_operator(&mut self, p: NodeId) -> Result<(), String> {
        let members: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.status().dual_primary.is_some())
            })
            .map(|n| n.id)
            .collect();
        let now = self.now;
        if members.is_empty() {
            if self.fault != Fault::None || !self.window_rng.chance(0.02) {
                return Ok(());
            }
            // Like a migration target: connected to the Primary for a while. (A promotion
            // of a node that does not see the Primary is the racing-promotion case the
            // window does not change; see the `operator` failover.)
            let racing = self.opts.racing_promotions;
            let connected_long = self.healthy_since.is_some_and(|t| now > t + MS);
            if !racing && (!connected_long || !self.nodes[p as usize].diskful) {
                return Ok(());
            }
            let cands: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|n| {
                    n.diskful
                        && n.engine.is_some()
                        && !n.isolated
                        && n.id != p
                        && (racing || self.links.get(&key(n.id, p)).copied().flatten().is_some())
                })
                .map(|n| n.id)
                .collect();
            let Some(c) = self.window_rng.pick(&cands) else {
                return Ok(());
            };
            let e = self.nodes[c as usize].engine.as_mut().expect("live");
            match e.promote(now) {
                Ok(actions) => {
                    // Candidates are not members (there are none): a join, or a plain
                    // promotion if the Primary went away meanwhile.
                    if e.status().dual_primary.is_some() {
                        self.out.window_joins += 1;
                        self.tr(format!("operator: node {c} joined the dual-primary window"));
                    } else {
                        self.tr(format!("operator: promoted node {c} (no window)"));
                    }
                    self.apply_operator(c, actions)?;
                }
                Err(e) => self.tr(format!("operator: window promote of {c} refused: {e}")),
            }
        } else if self.window_rng.chance(0.01) {
            let Some(m) = self.window_rng.pick(&members) else {
                return Ok(());
            };
            let e = self.nodes[m as usize].engine.as_mut().expect("live");
            match e.demote(now) {
                Ok(actions) => {
                    self.tr(format!("operator: node {m} left the dual-primary window"));
                    self.apply_operator(m, actions)?;
                }
                Err(e) => self.tr(format!("operator: demote of member {m} refused: {e}")),
            }
        }
        Ok(())
    }

    fn check_primaries(&self) -> Result<(), String> {
        let members: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.status().dual_primary.is_some())
            })
            .map(|n| n.id)
            .collect();
        if members.len() > 2 || (!members.is_empty() && !self.window_open) {
            return Err(format!(
                "invariant 3: nodes {members:?} are dual-primary members (window open: {})",
                self.window_open
            ));
        }
        let with_quorum: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|n| {
                n.engine
                    .as_ref()
                    .is_some_and(|e| e.role() == Role::Primary && e.has_quorum())
            })
            .map(|n| n.id)
            .collect();
        if with_quorum.len() > 1 {
            return Err(format!(
                "invariant 3: nodes {with_quorum:?} are Primary with quorum at the same time"
            ));
        }
        Ok(())
    }

    fn final_check(&mut self) -> Result<(), String> {
        // Invariant 2: every UpToDate replica is byte-identical.
        let disks: Vec<(NodeId, &SimDisk)> = self
            .nodes
            .iter()
            .filter(|n| n.diskful)
            .map(|n| (n.id, &n.disk))
            .collect();
        let (first_id, first) = disks[0];
        for (id, d) in &disks[1..] {
            if d.data != first.data {
                let b = d
                    .data
                    .chunks(BLOCK as usize)
                    .zip(first.data.chunks(BLOCK as usize))
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                return Err(format!(
                    "invariant 2: replicas {first_id} and {id} differ after resync (first differing block {b}: {:?} vs {:?})",
                    parse_block(&first.data[b * 4096..(b + 1) * 4096], b as u64),
                    parse_block(&d.data[b * 4096..(b + 1) * 4096], b as u64)
                ));
            }
        }
        // Invariants 1/5 over the whole volume, on the replica's contents.
        if first.data.len() as u64 != self.target_blocks * BLOCK {
            return Err(format!(
                "resize: replica {first_id} has {} bytes, the volume {}",
                first.data.len(),
                self.target_blocks * BLOCK
            ));
        }
        for b in 0..self.target_blocks {
            let o = (b * BLOCK) as usize;
            let got = parse_block(&first.data[o..o + BLOCK as usize], b);
            let ok = got.is_some_and(|w| self.model.allowed(b, w));
            if !ok {
                let blk = &self.model.blocks[b as usize];
                return Err(format!(
                    "invariant 1/5: block {b} holds {got:?} at the end; allowed: acked w{} (durable w{}) or {:?}",
                    blk.acked, blk.durable, blk.possible
                ));
            }
        }
        self.out.resync_bytes = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref())
            .map(|e| e.status().last_resync_bytes)
            .sum();
        self.out.resync_skipped_bytes = self
            .nodes
            .iter()
            .filter_map(|n| n.engine.as_ref())
            .map(|e| e.status().last_resync_skipped_bytes)
            .sum();
        Ok(())
    }
}

fn short(m: &Message) -> String {
    match m {
        Message::Write {
            seq, offset, data, ..
        } => {
            format!(
                "Write seq={seq} blocks {}+{}",
                offset / BLOCK,
                data.len() as u64 / BLOCK
            )
        }
        Message::StateReport(r) => format!(
            "StateReport {:?} {:?} gen={:016x} bm={:016x} q={}",
            r.role, r.disk_state, r.generations.current, r.generations.bitmap, r.quorum.has_quorum
        ),
        Message::ResyncRequest { id, offset, len } => {
            format!(
                "ResyncRequest id={id} blocks {}+{}",
                offset / BLOCK,
                u64::from(*len) / BLOCK
            )
        }
        Message::ResyncData {
            id, offset, len, ..
        } => {
            format!(
                "ResyncData id={id} blocks {}+{}",
                offset / BLOCK,
                u64::from(*len) / BLOCK
            )
        }
        Message::OutOfSync { ranges, flags } => {
            // The first few ranges in blocks, e.g. "8+2".
            let shown: Vec<String> = ranges
                .iter()
                .take(4)
                .map(|r| format!("{}+{}", r.offset / BLOCK, r.len.div_ceil(BLOCK)))
                .collect();
            format!(
                "OutOfSync {} ranges [{}] flags={flags}",
                ranges.len(),
                shown.join(" ")
            )
        }
        other => format!("{:?}", other.message_type()),
    }
}

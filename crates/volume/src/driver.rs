//! The engine loop of one volume on one node.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem_blockdev::{BlockDevice, FileDevice, completions};
use tandem_meta::ReplicaFiles;
use tandem_repl_proto::{ChecksumAlg, DiskState, Message, NodeId};
use tandem_replication::{
    Action, Config, DiskError, Engine, Event, IoId, Level, OnNoQuorum, PeerConfig, PeerStatus,
    Protocol, Reply, RequestError, RequestId, Role, SplitBrainPolicy, Status,
};
use tandem_transport::{LinkId, SendError};

use crate::VolumeError;
use crate::device::ReplicatedDevice;
use crate::node::NodeReplication;
use crate::store::ReplicaStore;

/// Period of the engine's `Tick` (resync pacing).
const TICK: Duration = Duration::from_millis(20);
/// Disk worker threads per volume.
const DISK_WORKERS: usize = 4;
/// Largest read or write done on the loop thread instead of the workers.
const INLINE_MAX: usize = 64 * 1024;
/// The outbox is sent when it holds this many messages (else at the end of the drain)...
const OUTBOX_FRAMES: usize = 64;
/// ... or this many bytes of bulk data.
const OUTBOX_BYTES: usize = 256 * 1024;

/// Another node of the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePeer {
    pub node_id: NodeId,
    pub name: String,
    /// `host:port` of the peer's replication listener.
    pub addr: String,
    /// false: a witness (diskless voter).
    pub diskful: bool,
}

/// Per-volume options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeOptions {
    pub protocol: Protocol,
    /// Resync rate limit in bytes/s (0 = unlimited).
    pub resync_rate: u64,
    /// The dynamic resync controller's floor: the rate while the consumer does I/O (bytes/s,
    /// 0 = never yield). See [`tandem_replication::Config::resync_min_rate`].
    pub resync_min_rate: u64,
    /// What a handshake that finds split brain does.
    pub after_split_brain: SplitBrainPolicy,
    /// Checksum-based resync: transfer only blocks whose digests differ.
    pub resync_checksums: bool,
    /// The dual-primary window is open (live migration: a second node may be Primary). See
    /// [`tandem_replication::Config::allow_two_primaries`]; protocol C only.
    pub allow_two_primaries: bool,
    /// What a Primary without quorum does with consumer requests (fail them, or hold them
    /// until quorum is back). See [`tandem_replication::Config::on_no_quorum`].
    pub on_no_quorum: OnNoQuorum,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            protocol: Protocol::C,
            resync_rate: 0,
            resync_min_rate: 0,
            after_split_brain: SplitBrainPolicy::Disconnect,
            resync_checksums: false,
            allow_two_primaries: false,
            on_no_quorum: OnNoQuorum::IoError,
        }
    }
}

/// What a [`VolumeDriver`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeSpec {
    /// Volume name (the replica's file names and the transport's volume key).
    pub name: String,
    pub uuid: String,
    /// The pool directory holding `name.data`, `name.meta`, `name.bitmap` (and `name.al`).
    pub dir: PathBuf,
    /// false: this node is a witness (only `name.meta` is kept, created if missing).
    pub diskful: bool,
    /// Volume size; a diskful replica must match its metadata.
    pub size_bytes: u64,
    pub peers: Vec<VolumePeer>,
    pub options: VolumeOptions,
}

/// The status for the agent's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    /// The role shown to operators and acted on by the agent: `Primary` when the engine is
    /// the replication Primary, and also when this node is one of the two Primaries of a
    /// dual-primary window without the write token (`dual_primary`: it is Primary to its
    /// consumer). The engine's own (replication) role is `engine.role`.
    pub role: Role,
    pub disk_state: DiskState,
    pub quorum: bool,
    pub peers: Vec<PeerStatus>,
    /// Sum of the out-of-sync bytes toward every diskful peer.
    pub out_of_sync_bytes: u64,
    pub resync_rate: u64,
    /// A resync into this replica currently yields to consumer I/O (runs at the floor).
    pub resync_yielding: bool,
    pub resync_bytes_left: Option<u64>,
    pub last_resync_bytes: u64,
    /// The online verify running from this node, if any.
    pub verify: Option<tandem_replication::VerifyProgress>,
    /// The last online verify this node ran since the driver started.
    pub last_verify: Option<tandem_replication::VerifyResult>,
    /// The engine's full snapshot.
    pub engine: Status,
    /// Set when the driver stopped on a fatal error (a witness's metadata could not be
    /// persisted).
    pub failed: Option<String>,
    /// Why the local disk was detached (disk state Failed): the backing store's I/O error.
    pub disk_failure: Option<String>,
    /// The dual-primary window is open on this node's engine.
    pub allow_two_primaries: bool,
    /// This node is one of the two Primaries of an open dual-primary window (partner, and
    /// whether this node holds the write token).
    pub dual_primary: Option<tandem_replication::DualPrimary>,
    /// The on-no-quorum policy the engine applies.
    pub on_no_quorum: OnNoQuorum,
    /// Consumer requests held for quorum ([`OnNoQuorum::Suspend`]): I/O is suspended while
    /// this is above 0.
    pub suspended_requests: usize,
}

/// Where the outcome of a consumer request goes: a caller blocked on a channel
/// ([`crate::ReplicatedDevice`]'s blocking calls), or a callback run on the loop thread (its
/// asynchronous writes: the NBD server answers the client from there).
pub(crate) enum Completion {
    Channel(SyncSender<Result<Reply, RequestError>>),
    Callback(Box<dyn FnOnce(Result<Reply, RequestError>) + Send>),
}

impl Completion {
    pub(crate) fn complete(self, r: Result<Reply, RequestError>) {
        match self {
            Completion::Channel(c) => {
                let _ = c.send(r);
            }
            Completion::Callback(f) => f(r),
        }
    }
}

/// Inputs of the loop.
pub(crate) enum Input {
    Consumer(ConsumerOp, Completion),
    Disk(Event),
    Transport(tandem_transport::Event),
    Promote(SyncSender<Result<(), VolumeError>>),
    PromoteForced(SyncSender<Result<(), VolumeError>>),
    Demote(SyncSender<Result<(), VolumeError>>),
    Status(SyncSender<Status>),
    SetResyncRate(u64),
    SetResyncMinRate(u64),
    Verify(bool, SyncSender<Result<(), VolumeError>>),
    Resolve(bool, SyncSender<Result<(), VolumeError>>),
    SetSplitBrainPolicy(SplitBrainPolicy),
    SetResyncChecksums(bool),
    SetAllowTwoPrimaries(bool, SyncSender<Result<(), VolumeError>>),
    SetOnNoQuorum(OnNoQuorum, SyncSender<Result<(), VolumeError>>),
    Resize(u64, SyncSender<Result<(), VolumeError>>),
    Stop,
}

/// Where the inputs of one volume go, and who runs them ("combining"): the thread that
/// delivers an input (an NBD connection task, the transport's router, a disk worker) runs
/// the engine itself when no other thread does, instead of waking the loop thread. This saves
/// a thread hand-off per input: a replicated 4 KiB write otherwise wakes the loop thread on
/// the Primary twice (request, acknowledgement) and on the Secondary once.
///
/// * Inputs are queued in arrival order and run in that order by whichever thread holds the
///   loop's lock; a thread that finds the lock taken leaves its input to the holder, which
///   looks at the queue again after unlocking (so no input is stranded).
/// * Such threads never block on the network: a send that finds a link's queue full is
///   kept in the loop's backlog for that peer (later sends queue behind it) and the loop
///   thread, which may block, sends it. Metadata persists (fsync) run inside
///   `tokio::task::block_in_place` on runtime workers.
/// * The loop thread keeps the 20 ms tick, flushes backlogs, and runs inputs from threads of
///   a current-thread runtime (which must not block).
/// * Messages to peers wait in the loop's outbox until the queued inputs are run (or the
///   outbox is large, or something must not overtake them: see [`Loop::flush_outbox`]), so
///   the messages to one peer that one drain produces leave with one `sendmsg`
///   ([`tandem_transport::Transport::try_send_batch_on`]).
#[derive(Default)]
pub(crate) struct Inbox {
    queue: Mutex<Queue>,
    /// Wakes the loop thread.
    wake: Condvar,
    /// The loop; `None` once stopped.
    lp: Mutex<Option<Loop>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Input>,
    /// Set when the loop stopped (why); later inputs are refused.
    stopped: Option<String>,
    /// The loop thread has work only it may do (a backlog to send).
    loop_work: bool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// May this thread run the loop (and so possibly block briefly, inside `block_in_place`)?
/// Not on a current-thread runtime, whose only thread must not block.
fn may_run_here() -> bool {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread,
        Err(_) => true,
    }
}

/// Runs `f`, which may block (file sync), telling a multi-threaded runtime first if this
/// is one of its workers.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Inbox {
    /// Queues `input` and runs the queue here if no other thread does. `Err` gives the
    /// input back when the loop has stopped.
    pub(crate) fn send(&self, input: Input) -> Result<(), Input> {
        {
            let mut q = lock(&self.queue);
            if q.stopped.is_some() {
                return Err(input);
            }
            q.items.push_back(input);
        }
        if may_run_here() {
            self.run_queued();
        } else {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Queues `inputs` in order and runs the queue here if no other thread does: one drain
    /// for all of them (their messages to a peer leave together). `Err` gives the inputs
    /// back when the loop has stopped.
    pub(crate) fn send_many(&self, inputs: Vec<Input>) -> Result<(), Vec<Input>> {
        {
            let mut q = lock(&self.queue);
            if q.stopped.is_some() {
                return Err(inputs);
            }
            q.items.extend(inputs);
        }
        if may_run_here() {
            self.run_queued();
        } else {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Drains the queue while this thread can take the loop's lock. The completions of a
    /// drain of several inputs are a group (`tandem_blockdev::completions`): the NBD server
    /// answers the writes it completed (a batch of acknowledgements) with one `sendmsg`,
    /// after the lock is released. A single input (queue depth 1) is answered at once.
    fn run_queued(&self) {
        loop {
            let several = lock(&self.queue).items.len() > 1;
            let drained = completions::group_if(several, || {
                let mut g = match self.lp.try_lock() {
                    Ok(g) => g,
                    Err(std::sync::TryLockError::WouldBlock) => return false,
                    Err(std::sync::TryLockError::Poisoned(e)) => {
                        // A thread panicked while running the engine: its state is not to be
                        // trusted, the volume stops (as the loop thread's death did before).
                        let mut g = e.into_inner();
                        self.stop(
                            &mut g,
                            Some("a thread panicked while running the engine".into()),
                        );
                        return false;
                    }
                };
                self.drain(&mut g);
                true
            });
            // An input queued while we held the lock, by a thread that then left it to us.
            if !drained || lock(&self.queue).items.is_empty() {
                return;
            }
        }
    }

    /// Runs queued inputs in order (the caller holds the loop's lock).
    fn drain(&self, slot: &mut Option<Loop>) {
        loop {
            let Some(lp) = slot.as_mut() else { return };
            let input = {
                let mut q = lock(&self.queue);
                match q.items.pop_front() {
                    Some(i) => {
                        lp.more_inputs = !q.items.is_empty();
                        i
                    }
                    None => break,
                }
            };
            if let Input::Stop = input {
                self.stop(slot, None);
                return;
            }
            if let Err(e) = lp.step(input) {
                self.stop(slot, Some(e.to_string()));
                return;
            }
        }
        if let Some(lp) = slot.as_mut() {
            lp.more_inputs = false;
            lp.flush_outbox();
        }
        if slot.as_ref().is_some_and(Loop::backlog_waiting) {
            lock(&self.queue).loop_work = true;
            self.wake.notify_one();
        }
    }

    /// Stops the loop: `error` is the fatal error, if any. Every waiting and queued
    /// request fails; later inputs are refused.
    fn stop(&self, slot: &mut Option<Loop>, error: Option<String>) {
        let Some(mut lp) = slot.take() else { return };
        // What was sent before the stop leaves before the links close.
        lp.flush_outbox();
        if let Some(e) = &error {
            tracing::error!(volume = %lp.name, "replication driver stops: {e}");
            *lp.failed.lock().expect("failed") = Some(e.clone());
        }
        let reason = lp
            .failed
            .lock()
            .expect("failed")
            .clone()
            .unwrap_or_else(|| "the volume driver stopped".into());
        lp.fail_pending(&reason);
        let queued = {
            let mut q = lock(&self.queue);
            q.stopped = Some(reason.clone());
            std::mem::take(&mut q.items)
        };
        for input in queued {
            if let Input::Consumer(_, c) = input {
                c.complete(Err(RequestError::Io(reason.clone())));
            }
        }
        drop(lp);
        self.wake.notify_all();
    }
}

/// The loop thread: ticks, backlogged sends, and inputs no other thread ran.
fn loop_thread(inbox: &Inbox) {
    let mut next_tick = Instant::now() + TICK;
    loop {
        {
            let mut q = lock(&inbox.queue);
            loop {
                if q.stopped.is_some() {
                    return;
                }
                if !q.items.is_empty() || q.loop_work || Instant::now() >= next_tick {
                    break;
                }
                let wait = next_tick.saturating_duration_since(Instant::now());
                q = inbox
                    .wake
                    .wait_timeout(q, wait)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            q.loop_work = false;
        }
        if !completions::group(|| loop_round(inbox, &mut next_tick)) {
            return;
        }
    }
}

/// One round of the loop thread under the loop's lock: inputs, backlog, tick, inputs.
/// `false` when the loop has stopped.
fn loop_round(inbox: &Inbox, next_tick: &mut Instant) -> bool {
    let mut g = match inbox.lp.lock() {
        Ok(g) => g,
        Err(e) => {
            let mut g = e.into_inner();
            inbox.stop(
                &mut g,
                Some("a thread panicked while running the engine".into()),
            );
            return false;
        }
    };
    inbox.drain(&mut g);
    let r = match g.as_mut() {
        None => return false,
        Some(lp) => lp.flush_backlog().and_then(|_| lp.tick(next_tick)),
    };
    if let Err(e) = r {
        inbox.stop(&mut g, Some(e.to_string()));
        return false;
    }
    inbox.drain(&mut g);
    true
}

/// A consumer request without its id (the loop assigns ids).
pub(crate) enum ConsumerOp {
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Read { offset: u64, len: u32 },
}

enum DiskJob {
    Write {
        io: IoId,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Read {
        io: IoId,
        offset: u64,
        len: u32,
    },
    Flush {
        io: IoId,
    },
    Checksum {
        io: IoId,
        offset: u64,
        len: u32,
        block_size: u32,
    },
}

/// One replicated volume on this node. Dropping it stops the loop without demoting (like a
/// crash of this volume's driver: metadata that says Primary stays so, the next start
/// resyncs the activity log); call [`VolumeDriver::demote`] first for an orderly stop.
pub struct VolumeDriver {
    name: String,
    /// The engine's usable size (what the block device exposes).
    size: Arc<AtomicU64>,
    tx: Arc<Inbox>,
    thread: Option<JoinHandle<()>>,
    node: Arc<NodeReplication>,
    failed: Arc<Mutex<Option<String>>>,
    last_status: Arc<Mutex<Option<Status>>>,
}

impl std::fmt::Debug for VolumeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeDriver")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl VolumeDriver {
    /// Opens the replica, builds the engine from its files and starts the loop thread and
    /// the volume's links. Call from a tokio runtime or not (it blocks on file I/O only).
    pub fn start(
        node: &Arc<NodeReplication>,
        spec: VolumeSpec,
    ) -> Result<VolumeDriver, VolumeError> {
        if node.routes.lock().expect("routes").contains_key(&spec.name) {
            return Err(VolumeError::Config(format!(
                "volume {} already has a driver on this node",
                spec.name
            )));
        }
        let mut entropy = [0u8; 8];
        getrandom::fill(&mut entropy)
            .map_err(|e| VolumeError::Config(format!("no OS randomness: {e}")))?;
        let mut cfg = Config::new(
            node.node_id,
            spec.diskful,
            spec.peers
                .iter()
                .map(|p| PeerConfig {
                    node_id: p.node_id,
                    diskful: p.diskful,
                })
                .collect(),
            spec.size_bytes,
        );
        cfg.protocol = spec.options.protocol;
        cfg.resync_rate = spec.options.resync_rate;
        cfg.resync_min_rate = spec.options.resync_min_rate;
        cfg.after_split_brain = spec.options.after_split_brain;
        cfg.resync_checksums = spec.options.resync_checksums;
        cfg.allow_two_primaries = spec.options.allow_two_primaries;
        cfg.on_no_quorum = spec.options.on_no_quorum;
        cfg.entropy = u64::from_le_bytes(entropy);

        let device = if spec.diskful {
            let files = ReplicaFiles::new(&spec.dir, &spec.name);
            files
                .recover()
                .map_err(|e| VolumeError::Meta(e.to_string()))?;
            let dev = FileDevice::open(&files.data())
                .map_err(|e| VolumeError::Data(format!("{}: {e}", files.data().display())))?;
            if dev.size() != spec.size_bytes {
                return Err(VolumeError::Data(format!(
                    "{} is {} bytes, the volume has {}",
                    files.data().display(),
                    dev.size(),
                    spec.size_bytes
                )));
            }
            Some(Arc::new(dev))
        } else {
            None
        };
        let (store, persisted) =
            ReplicaStore::open(&spec.dir, &spec.name, &spec.uuid, &node.node_name, &cfg)?;

        let tx = Arc::new(Inbox::default());
        node.routes
            .lock()
            .expect("routes")
            .insert(spec.name.clone(), tx.clone());
        let failed = Arc::new(Mutex::new(None));
        let last_status = Arc::new(Mutex::new(None));

        let clock = Instant::now();
        let (engine, first) = Engine::new(cfg, persisted, 0);
        let usable = Arc::new(AtomicU64::new(engine.usable_size()));
        let workers = device
            .as_ref()
            .map(|d| start_workers(&spec.name, d.clone(), tx.clone()));
        let mut lp = Loop {
            name: spec.name.clone(),
            device: device.clone(),
            usable: usable.clone(),
            engine,
            store,
            clock,
            node: node.clone(),
            workers,
            inline_done: Vec::new(),
            links: HashMap::new(),
            peers: spec.peers.clone(),
            uuid: spec.uuid.clone(),
            removed: BTreeMap::new(),
            pending: HashMap::new(),
            next_id: 1,
            failed: failed.clone(),
            last_status: last_status.clone(),
            demote_waiters: Vec::new(),
            store_failed: None,
            spec_diskful: spec.diskful,
            backlog: BTreeMap::new(),
            outbox: BTreeMap::new(),
            outbox_frames: 0,
            outbox_bytes: 0,
            batch: VecDeque::new(),
            more_inputs: false,
        };
        let r = lp.execute(first).and_then(|_| lp.drain_inline());
        lp.flush_outbox();
        if let Err(e) = r {
            node.routes.lock().expect("routes").remove(&spec.name);
            return Err(e);
        }
        lp.configure_transport()?;
        *lock(&tx.lp) = Some(lp);
        let inbox = tx.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vol-{}", spec.name))
            .spawn(move || loop_thread(&inbox))
            .map_err(|e| VolumeError::Config(format!("cannot start the loop thread: {e}")))?;
        Ok(VolumeDriver {
            name: spec.name,
            size: usable,
            tx,
            thread: Some(thread),
            node: node.clone(),
            failed,
            last_status,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The volume as a block device for the NBD server: every call blocks until the engine
    /// completed it (see [`ReplicatedDevice`]).
    pub fn block_device(&self) -> Arc<dyn BlockDevice> {
        Arc::new(self.replicated_device())
    }

    /// Like [`VolumeDriver::block_device`], typed.
    pub fn replicated_device(&self) -> ReplicatedDevice {
        ReplicatedDevice::new(self.name.clone(), self.size.clone(), self.tx.clone())
    }

    fn call<T>(&self, make: impl FnOnce(SyncSender<T>) -> Input) -> Result<T, VolumeError> {
        let (rtx, rrx) = sync_channel(1);
        let stopped = || {
            VolumeError::Stopped(
                self.failed
                    .lock()
                    .expect("failed")
                    .clone()
                    .unwrap_or_else(|| "stopped".into()),
            )
        };
        self.tx.send(make(rtx)).map_err(|_| stopped())?;
        rrx.recv().map_err(|_| stopped())
    }

    /// Makes this node Primary (refused with a typed reason).
    pub fn promote(&self) -> Result<(), VolumeError> {
        self.call(Input::Promote)?
    }

    /// [`VolumeDriver::promote`], declaring Outdated local data UpToDate first (the
    /// operator's `volume promote --force`; see `Engine::promote_forced`).
    pub fn promote_forced(&self) -> Result<(), VolumeError> {
        self.call(Input::PromoteForced)?
    }

    /// Makes this node Secondary (refused while consumer requests are in flight).
    pub fn demote(&self) -> Result<(), VolumeError> {
        self.call(Input::Demote)?
    }

    /// Starts an online verify from this node (see `docs/replication.md`, "Online verify");
    /// `resync`: resync the differing blocks toward each peer when done. Returns once started;
    /// progress and result are in [`VolumeDriver::status`].
    pub fn verify(&self, resync: bool) -> Result<(), VolumeError> {
        self.call(|r| Input::Verify(resync, r))?
    }

    /// Split-brain resolution on this node: `discard` makes it the victim (its changes since
    /// the split are discarded at the next handshake, see `Engine::discard_my_data`); every
    /// node involved then reconnects the links it closed for good after the split brain.
    pub fn resolve_split_brain(&self, discard: bool) -> Result<(), VolumeError> {
        self.call(|r| Input::Resolve(discard, r))?
    }

    /// Turns checksum-based resync on or off (from the next chunk).
    pub fn set_resync_checksums(&self, on: bool) -> Result<(), VolumeError> {
        self.tx
            .send(Input::SetResyncChecksums(on))
            .map_err(|_| VolumeError::Stopped("stopped".into()))
    }

    /// Changes the split-brain policy (from the next handshake).
    pub fn set_split_brain_policy(&self, policy: SplitBrainPolicy) -> Result<(), VolumeError> {
        self.tx
            .send(Input::SetSplitBrainPolicy(policy))
            .map_err(|_| VolumeError::Stopped("stopped".into()))
    }

    /// Changes the resync rate (bytes/s, 0 = unlimited) while running.
    pub fn set_resync_rate(&self, bytes_per_sec: u64) -> Result<(), VolumeError> {
        self.tx
            .send(Input::SetResyncRate(bytes_per_sec))
            .map_err(|_| VolumeError::Stopped("stopped".into()))
    }

    /// Changes the dynamic resync controller's floor (bytes/s, 0 = never yield) while
    /// running.
    pub fn set_resync_min_rate(&self, bytes_per_sec: u64) -> Result<(), VolumeError> {
        self.tx
            .send(Input::SetResyncMinRate(bytes_per_sec))
            .map_err(|_| VolumeError::Stopped("stopped".into()))
    }

    /// Opens or closes the dual-primary window (live migration) while running. Refused
    /// (`VolumeError::Window`) on a protocol A volume, and when closing while this node is
    /// one of two Primaries.
    pub fn set_allow_two_primaries(&self, on: bool) -> Result<(), VolumeError> {
        self.call(|r| Input::SetAllowTwoPrimaries(on, r))?
    }

    /// Changes the on-no-quorum policy while running. Back to [`OnNoQuorum::IoError`], the
    /// requests held for quorum now fail (the engine's rule); returns once the engine applied
    /// it.
    pub fn set_on_no_quorum(&self, policy: OnNoQuorum) -> Result<(), VolumeError> {
        self.call(|r| Input::SetOnNoQuorum(policy, r))?
    }

    /// Resizes the local replica online (see [`tandem_meta::ReplicaFiles::resize`] for the
    /// file steps and their crash safety) and tells the engine, which advertises the size to
    /// the peers. Consumers stay connected; the block device's size (for new connections)
    /// follows the engine's usable size: the smallest connected diskful replica.
    pub fn resize(&self, size_bytes: u64) -> Result<(), VolumeError> {
        self.call(|r| Input::Resize(size_bytes, r))?
    }

    /// Size of the volume the block device exposes now (the engine's usable size).
    pub fn usable_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Snapshot for the agent's report. After a fatal error it returns the last snapshot
    /// with `failed` set.
    pub fn status(&self) -> Result<VolumeStatus, VolumeError> {
        let failed = self.failed.lock().expect("failed").clone();
        let st = match self.call(Input::Status) {
            Ok(s) => s,
            Err(e) => match self.last_status.lock().expect("status").clone() {
                Some(s) => s,
                None => return Err(e),
            },
        };
        let role = if st.dual_primary.is_some() {
            Role::Primary
        } else {
            st.role
        };
        Ok(VolumeStatus {
            role,
            disk_state: st.disk_state,
            quorum: st.quorum,
            out_of_sync_bytes: st.peers.iter().map(|p| p.out_of_sync_bytes).sum(),
            resync_rate: st.resync_bytes_per_sec,
            resync_yielding: st.resync_yielding,
            resync_bytes_left: st.resync_bytes_left,
            last_resync_bytes: st.last_resync_bytes,
            verify: st.verify.clone(),
            last_verify: st.last_verify.clone(),
            peers: st.peers.clone(),
            disk_failure: st.disk_failure.clone(),
            allow_two_primaries: st.allow_two_primaries,
            dual_primary: st.dual_primary,
            on_no_quorum: st.on_no_quorum,
            suspended_requests: st.suspended_requests,
            engine: st,
            failed,
        })
    }

    /// Stops the loop (pending consumer requests fail) and removes the volume from the
    /// transport (peers see the links close). No demotion: see the type's documentation.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.node.routes.lock().expect("routes").remove(&self.name);
        let _rt = self.node.runtime.enter();
        self.node.transport.remove_volume(&self.name);
    }
}

impl Drop for VolumeDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn start_workers(name: &str, dev: Arc<FileDevice>, done: Arc<Inbox>) -> Sender<DiskJob> {
    let (tx, rx) = std::sync::mpsc::channel::<DiskJob>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..DISK_WORKERS {
        let rx = rx.clone();
        let dev = dev.clone();
        let done = done.clone();
        let _ = std::thread::Builder::new()
            .name(format!("vol-{name}-disk{i}"))
            .spawn(move || {
                loop {
                    let job = match rx.lock().expect("disk queue").recv() {
                        Ok(j) => j,
                        Err(_) => return,
                    };
                    let ev = run_job(&*dev, job);
                    if done.send(Input::Disk(ev)).is_err() {
                        return;
                    }
                }
            });
    }
    tx
}

fn disk_err(e: tandem_blockdev::BlockError) -> DiskError {
    DiskError(e.to_string())
}

fn run_job(dev: &dyn BlockDevice, job: DiskJob) -> Event {
    match job {
        DiskJob::Write {
            io,
            offset,
            data,
            fua,
        } => {
            let mut r = if tandem_repl_proto::zeroes::is_zeroes(&data) {
                // A zero-write (trim, write-zeroes): a hole where the storage can punch one.
                dev.write_zeroes(offset, data.len() as u64, true)
            } else {
                dev.write_at(&data, offset)
            }
            .map_err(disk_err);
            if r.is_ok() && fua {
                r = dev.flush().map_err(disk_err);
            }
            Event::DiskWriteDone { io, result: r }
        }
        DiskJob::Read { io, offset, len } => {
            let mut buf = vec![0u8; len as usize];
            let r = dev
                .read_at(&mut buf, offset)
                .map(|_| Bytes::from(buf))
                .map_err(disk_err);
            Event::DiskReadDone { io, result: r }
        }
        DiskJob::Flush { io } => Event::DiskFlushDone {
            io,
            result: dev.flush().map_err(disk_err),
        },
        DiskJob::Checksum {
            io,
            offset,
            len,
            block_size,
        } => {
            let mut buf = vec![0u8; len as usize];
            let r = dev
                .read_at(&mut buf, offset)
                .map(|_| {
                    buf.chunks(block_size.max(1) as usize)
                        .map(|b| ChecksumAlg::Blake3.digest(b))
                        .collect()
                })
                .map_err(disk_err);
            Event::DiskChecksumDone { io, result: r }
        }
    }
}

struct Loop {
    name: String,
    /// The replica's data file (diskful only); small reads and writes that need not wait
    /// (page cache) run on the loop thread with it: two thread hand-offs less per request.
    device: Option<Arc<FileDevice>>,
    /// Shared with [`ReplicatedDevice`]: the engine's usable size.
    usable: Arc<AtomicU64>,
    engine: Engine,
    store: ReplicaStore,
    clock: Instant,
    node: Arc<NodeReplication>,
    workers: Option<Sender<DiskJob>>,
    /// Completions of requests done on the loop thread, fed to the engine after the actions
    /// that issued them (as if a disk worker had been very fast).
    inline_done: Vec<Event>,
    /// Current link per connected peer (from its PeerUp).
    links: HashMap<NodeId, LinkId>,
    peers: Vec<VolumePeer>,
    uuid: String,
    /// Peers taken out of the transport configuration by a `Disconnect` action, and
    /// whether they come back once their link is down.
    removed: BTreeMap<NodeId, bool>,
    pending: HashMap<RequestId, Completion>,
    next_id: RequestId,
    failed: Arc<Mutex<Option<String>>>,
    last_status: Arc<Mutex<Option<Status>>>,
    /// A persist (`V.meta`, `V.bitmap`, `V.al`) of a diskful replica failed: the backing
    /// store is failing. Sticky: later persists are skipped and the engine is told
    /// (`Event::DiskFailed`: it detaches the disk and keeps serving through its peers).
    store_failed: Option<String>,
    spec_diskful: bool,
    /// `demote()` callers waiting until the demotion is recorded in the metadata (the engine
    /// records it after a local flush), with when they started waiting.
    demote_waiters: Vec<(Instant, SyncSender<Result<(), VolumeError>>)>,
    /// Messages per peer that found the link's send queue full, in order, for the loop
    /// thread to send (it may wait for room; the threads that run inputs never do).
    backlog: BTreeMap<NodeId, VecDeque<(LinkId, Message)>>,
    /// Messages per peer not handed to the transport yet, in order, with the link they are
    /// meant for (see [`Loop::flush_outbox`]).
    outbox: BTreeMap<NodeId, VecDeque<(LinkId, Message)>>,
    /// Messages in the outbox, and their bulk data bytes.
    outbox_frames: usize,
    outbox_bytes: usize,
    /// Scratch for one run of messages to one link.
    batch: VecDeque<Message>,
    /// More inputs are queued behind the one running (set by [`Inbox::drain`]).
    more_inputs: bool,
}

/// Longest a `demote()` waits for the demotion to reach the metadata (the flush before it).
const DEMOTE_PERSIST_WAIT: Duration = Duration::from_secs(30);

impl Loop {
    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// Changes the volume's links (a removed peer's link closes after what is queued on
    /// it): the outbox goes first.
    fn configure_transport(&mut self) -> Result<(), VolumeError> {
        self.flush_outbox();
        let vc = tandem_transport::VolumeConfig {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            peers: self
                .peers
                .iter()
                .filter(|p| !self.removed.contains_key(&p.node_id))
                .map(|p| tandem_transport::PeerConfig {
                    node_id: p.node_id,
                    name: p.name.clone(),
                    addr: p.addr.clone(),
                })
                .collect(),
        };
        // The transport spawns its dialers on the runtime.
        let _rt = self.node.runtime.enter();
        self.node
            .transport
            .set_volume(vc)
            .map_err(|e| VolumeError::Transport(e.to_string()))
    }

    /// Runs one input and what follows from it; `Err` is fatal (the volume stops).
    fn step(&mut self, input: Input) -> Result<(), VolumeError> {
        let r = self.input(input).and_then(|_| self.drain_inline());
        self.settle_demotes();
        self.usable
            .store(self.engine.usable_size(), Ordering::Release);
        r
    }

    /// The engine's tick, when due.
    fn tick(&mut self, next_tick: &mut Instant) -> Result<(), VolumeError> {
        if Instant::now() < *next_tick {
            return Ok(());
        }
        *next_tick = Instant::now() + TICK;
        let now = self.now();
        let a = self.engine.handle(now, Event::Tick);
        let r = self.execute(a).and_then(|_| self.drain_inline());
        self.settle_demotes();
        r
    }

    /// Fails every request still waiting (the loop stops with `reason`).
    fn fail_pending(&mut self, reason: &str) {
        *self.last_status.lock().expect("status") = Some(self.engine.status());
        for (_, c) in self.pending.drain() {
            c.complete(Err(RequestError::Io(reason.to_string())));
        }
    }

    /// Answers `demote()` callers once the demotion is persisted, or after
    /// [`DEMOTE_PERSIST_WAIT`] with an error (the flush before it did not complete).
    fn settle_demotes(&mut self) {
        if self.demote_waiters.is_empty() {
            return;
        }
        let recorded = !self.engine.meta().primary;
        let role_back = format!("{:?}", self.engine.role()) == "Primary";
        for (since, r) in std::mem::take(&mut self.demote_waiters) {
            if recorded || role_back {
                // Promoted again meanwhile: the demotion itself did happen.
                let _ = r.send(Ok(()));
            } else if since.elapsed() >= DEMOTE_PERSIST_WAIT {
                let _ = r.send(Err(VolumeError::Stopped(
                    "demoted, but the flush before recording it in the metadata did not complete"
                        .into(),
                )));
            } else {
                self.demote_waiters.push((since, r));
            }
        }
    }

    fn input(&mut self, input: Input) -> Result<(), VolumeError> {
        let now = self.now();
        let forced = matches!(input, Input::PromoteForced(_));
        let actions = match input {
            Input::Consumer(op, c) => {
                let id = self.next_id;
                self.next_id += 1;
                self.pending.insert(id, c);
                let ev = match op {
                    ConsumerOp::Write { offset, data, fua } => Event::Write {
                        id,
                        offset,
                        data,
                        fua,
                    },
                    ConsumerOp::Flush => Event::Flush { id },
                    ConsumerOp::Read { offset, len } => Event::Read { id, offset, len },
                };
                self.engine.handle(now, ev)
            }
            Input::Disk(ev) => self.engine.handle(now, ev),
            Input::Transport(ev) => return self.transport_event(ev),
            Input::Promote(r) | Input::PromoteForced(r) => {
                let res = if forced {
                    self.engine.promote_forced(now)
                } else {
                    self.engine.promote(now)
                };
                match res {
                    Ok(a) => {
                        let res = self.execute(a);
                        let _ = r.send(res.clone());
                        return res;
                    }
                    Err(e) => {
                        let _ = r.send(Err(e.into()));
                        return Ok(());
                    }
                }
            }
            Input::Demote(r) => match self.engine.demote(now) {
                Ok(a) => {
                    let res = self.execute(a);
                    if res.is_ok() && self.engine.meta().primary {
                        // Answered once the metadata says Secondary (see `settle_demotes`),
                        // so a stop right after `demote()` is not a crash as Primary.
                        self.demote_waiters.push((Instant::now(), r));
                    } else {
                        let _ = r.send(res.clone());
                    }
                    return res;
                }
                Err(e) => {
                    let _ = r.send(Err(e.into()));
                    return Ok(());
                }
            },
            Input::Status(r) => {
                let _ = r.send(self.engine.status());
                return Ok(());
            }
            Input::SetResyncRate(b) => self
                .engine
                .handle(now, Event::SetResyncRate { bytes_per_sec: b }),
            Input::SetResyncMinRate(b) => self
                .engine
                .handle(now, Event::SetResyncMinRate { bytes_per_sec: b }),
            Input::SetSplitBrainPolicy(p) => {
                self.engine.set_split_brain_policy(p);
                return Ok(());
            }
            Input::SetResyncChecksums(on) => {
                self.engine.set_resync_checksums(on);
                return Ok(());
            }
            Input::SetAllowTwoPrimaries(on, r) => {
                let a = self.engine.set_allow_two_primaries(now, on);
                return self.run_admin(a, &r);
            }
            Input::SetOnNoQuorum(policy, r) => {
                let a = self.engine.set_on_no_quorum(now, policy);
                return self.run_admin(Ok::<_, VolumeError>(a), &r);
            }
            Input::Resolve(discard, r) => {
                let res = if discard {
                    match self.engine.discard_my_data(now) {
                        Ok(a) => self.execute(a),
                        Err(e) => Err(e.into()),
                    }
                } else {
                    Ok(())
                };
                let res = res.and_then(|()| {
                    // Links closed for good (split brain) come back.
                    let gone: Vec<NodeId> = self
                        .removed
                        .iter()
                        .filter(|(_, back)| !**back)
                        .map(|(p, _)| *p)
                        .collect();
                    if gone.is_empty() {
                        return Ok(());
                    }
                    for p in gone {
                        tracing::info!(volume = %self.name, peer = p, "reconnecting after split brain");
                        self.removed.remove(&p);
                    }
                    self.configure_transport()
                });
                let _ = r.send(res.clone());
                return match res {
                    Err(VolumeError::Resolve(_)) => Ok(()),
                    other => other,
                };
            }
            Input::Verify(resync, r) => {
                let a = self.engine.start_verify(now, resync);
                return self.run_admin(a, &r);
            }
            Input::Resize(size, r) => {
                let res = self.resize(size);
                let _ = r.send(res.clone());
                return res.or_else(|e| match e {
                    // A refused or failed resize leaves the replica as it was: keep running.
                    VolumeError::Config(_) | VolumeError::Data(_) | VolumeError::Meta(_) => Ok(()),
                    e => Err(e),
                });
            }
            Input::Stop => return Ok(()),
        };
        self.execute(actions)
    }

    /// Grow: files first (committed in the metadata), then the engine. Shrink: the engine
    /// first (no request past the new end from now on), then the files.
    fn resize(&mut self, size: u64) -> Result<(), VolumeError> {
        let old = self.engine.size_bytes();
        if size == old {
            // A shrink whose file steps failed after the engine shrank: finish them.
            if self.store.size_bytes() != size {
                self.store.resize(size)?;
                if let Some(d) = &self.device {
                    d.set_size(size);
                }
            }
            return Ok(());
        }
        if size < old {
            let a = self
                .engine
                .handle(self.now(), Event::Resize { size_bytes: size });
            self.execute(a)?;
        }
        self.store.resize(size)?;
        if let Some(d) = &self.device {
            d.set_size(size);
        }
        if size > old {
            let a = self
                .engine
                .handle(self.now(), Event::Resize { size_bytes: size });
            self.execute(a)?;
        }
        tracing::info!(volume = %self.name, from = old, to = size,
            usable = self.engine.usable_size(), "replica resized");
        Ok(())
    }

    fn transport_event(&mut self, ev: tandem_transport::Event) -> Result<(), VolumeError> {
        use tandem_transport::Event as T;
        match ev {
            T::PeerUp { peer, link, .. } => {
                if self.links.contains_key(&peer) {
                    // Never happens (the transport orders PeerDown first); keep the contract.
                    self.links.remove(&peer);
                    let now = self.now();
                    let a = self.engine.handle(now, Event::PeerDown { peer });
                    self.execute(a)?;
                }
                self.links.insert(peer, link);
                let now = self.now();
                let a = self.engine.handle(now, Event::PeerUp { peer });
                self.execute(a)
            }
            T::PeerMessage { peer, msg, .. } => {
                if !self.links.contains_key(&peer) {
                    return Ok(());
                }
                let now = self.now();
                let a = self.engine.handle(now, Event::PeerMessage { peer, msg });
                self.execute(a)
            }
            T::PeerDown {
                peer, link, reason, ..
            } => {
                if self.links.get(&peer) != Some(&link) {
                    return Ok(());
                }
                tracing::info!(volume = %self.name, peer, "link down: {reason}");
                self.links.remove(&peer);
                self.backlog.remove(&peer);
                if let Some(q) = self.outbox.remove(&peer) {
                    self.outbox_frames -= q.len();
                    self.outbox_bytes -= q.iter().map(|(_, m)| bulk_len(m)).sum::<usize>();
                }
                let now = self.now();
                let a = self.engine.handle(now, Event::PeerDown { peer });
                self.execute(a)?;
                if self.removed.get(&peer) == Some(&true) {
                    self.removed.remove(&peer);
                    self.configure_transport()?;
                }
                Ok(())
            }
        }
    }

    /// An admin call's outcome: its actions run and the caller learns how that went (a
    /// failure to execute them also stops the loop); a refusal by the engine only goes to the
    /// caller.
    fn run_admin<E: Into<VolumeError>>(
        &mut self,
        actions: Result<Vec<Action>, E>,
        reply: &SyncSender<Result<(), VolumeError>>,
    ) -> Result<(), VolumeError> {
        match actions {
            Ok(a) => {
                let res = self.execute(a);
                let _ = reply.send(res.clone());
                res
            }
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                Ok(())
            }
        }
    }

    /// Executes actions in order, per the ordering contract. A persist that fails on a
    /// diskful replica detaches its disk: nothing after it in the batch touches the disk (the
    /// ordering could not be kept), later persists are skipped, and the engine gets
    /// `Event::DiskFailed` after the batch. A witness's failing metadata stops the loop.
    fn execute(&mut self, actions: Vec<Action>) -> Result<(), VolumeError> {
        let mut newly_failed = None;
        let mut cut: Vec<NodeId> = Vec::new();
        let mut cut_sends = false;
        for a in actions {
            let syncs = match &a {
                Action::PersistMeta(_) => true,
                Action::PersistBits { .. } | Action::PersistActivityLog(_) => {
                    self.store_failed.is_none()
                }
                _ => false,
            };
            if syncs {
                // Messages that came before a file sync do not wait for it (as they did
                // before the outbox).
                self.flush_outbox();
            }
            let persist = match &a {
                Action::PersistMeta(m) => Some(blocking(|| self.store.persist_meta(m))),
                Action::PersistBits {
                    peer,
                    set,
                    first,
                    count,
                } if self.store_failed.is_none() => Some(blocking(|| {
                    self.store.persist_bits(*peer, *set, *first, *count)
                })),
                Action::PersistActivityLog(ext) if self.store_failed.is_none() => {
                    Some(blocking(|| self.store.persist_al(ext)))
                }
                Action::PersistBits { .. } | Action::PersistActivityLog(_) => Some(Ok(())),
                Action::DiskWrite { io, .. }
                | Action::DiskRead { io, .. }
                | Action::DiskFlush { io }
                | Action::DiskChecksum { io, .. }
                    if self.store_failed.is_some() =>
                {
                    let io = *io;
                    let err = || DiskError("backing store failed".into());
                    self.inline_done.push(match a {
                        Action::DiskWrite { .. } => Event::DiskWriteDone {
                            io,
                            result: Err(err()),
                        },
                        Action::DiskRead { .. } => Event::DiskReadDone {
                            io,
                            result: Err(err()),
                        },
                        Action::DiskFlush { .. } => Event::DiskFlushDone {
                            io,
                            result: Err(err()),
                        },
                        _ => Event::DiskChecksumDone {
                            io,
                            result: Err(err()),
                        },
                    });
                    continue;
                }
                _ => None,
            };
            if cut_sends && let Action::Send { peer, .. } = &a {
                // A message the failed persist had to precede (e.g. a write whose activity
                // log did not reach the disk): not sent, and the link breaks (TCP
                // semantics), so no peer applies what our disk may lack unrecorded.
                if !cut.contains(peer) {
                    cut.push(*peer);
                }
                continue;
            }
            match persist {
                Some(Ok(())) => continue,
                Some(Err(e)) if self.spec_diskful => {
                    // Metadata of a detached disk is written when it can be (it says Failed);
                    // a failure then changes nothing.
                    if self.store_failed.is_none() {
                        tracing::error!(volume = %self.name, "backing store failed: {e}; detaching the disk");
                        self.store_failed = Some(e.to_string());
                        newly_failed = Some(e.to_string());
                        // A persist the engine relied on (not the best-effort metadata of an
                        // already detached disk, which says Failed): what follows it in the
                        // batch must not reach the peers either.
                        cut_sends = !matches!(
                            &a,
                            Action::PersistMeta(m) if m.disk_state == DiskState::Failed
                        );
                    }
                    continue;
                }
                Some(Err(e)) => return Err(e),
                None => {}
            }
            match a {
                Action::PersistMeta(_)
                | Action::PersistBits { .. }
                | Action::PersistActivityLog(_) => {}
                Action::DiskWrite {
                    io,
                    offset,
                    data,
                    fua,
                } => self.disk(DiskJob::Write {
                    io,
                    offset,
                    data,
                    fua,
                }),
                Action::DiskRead { io, offset, len } => {
                    self.disk(DiskJob::Read { io, offset, len })
                }
                Action::DiskFlush { io } => self.disk(DiskJob::Flush { io }),
                Action::DiskChecksum {
                    io,
                    offset,
                    len,
                    block_size,
                } => self.disk(DiskJob::Checksum {
                    io,
                    offset,
                    len,
                    block_size,
                }),
                Action::Send { peer, msg } => self.send(peer, msg),
                Action::Disconnect {
                    peer,
                    reason,
                    reconnect,
                } => {
                    tracing::warn!(volume = %self.name, peer, ?reason, reconnect, "disconnecting");
                    if self.links.contains_key(&peer) {
                        // The transport has no per-link close: take the peer out of the
                        // volume's configuration (queued frames go first, then the peer
                        // sees Disconnect{ConfigChanged}); it comes back after PeerDown
                        // when `reconnect`.
                        self.removed.insert(peer, reconnect);
                        self.configure_transport()?;
                    } else if !reconnect {
                        self.removed.insert(peer, false);
                        self.configure_transport()?;
                    }
                }
                Action::Complete { id, result } => {
                    if let Some(c) = self.pending.remove(&id) {
                        c.complete(result);
                    }
                }
                Action::Log { level, msg } => match level {
                    Level::Info => tracing::info!(volume = %self.name, "{msg}"),
                    Level::Warn => tracing::warn!(volume = %self.name, "{msg}"),
                },
            }
        }
        if !cut.is_empty() {
            for peer in cut {
                if self.links.contains_key(&peer) {
                    self.removed.insert(peer, true);
                }
            }
            self.configure_transport()?;
        }
        if let Some(reason) = newly_failed {
            let now = self.now();
            let a = self.engine.handle(now, Event::DiskFailed { reason });
            self.execute(a)?;
        }
        Ok(())
    }

    /// Feeds the completions of inline disk requests to the engine (their actions may issue
    /// more).
    fn drain_inline(&mut self) -> Result<(), VolumeError> {
        while !self.inline_done.is_empty() {
            for ev in std::mem::take(&mut self.inline_done) {
                let now = self.now();
                let a = self.engine.handle(now, ev);
                self.execute(a)?;
            }
        }
        Ok(())
    }

    /// Small requests that the page cache can serve without waiting run here: buffered
    /// writes of at most [`INLINE_MAX`] bytes without FUA, and reads that preadv2 with
    /// RWF_NOWAIT serves from the cache; everything else goes to the workers.
    fn try_inline(&mut self, job: DiskJob) -> Option<DiskJob> {
        let Some(dev) = self.device.clone() else {
            return Some(job);
        };
        let inline = match &job {
            DiskJob::Write {
                data, fua: false, ..
            } => {
                data.len() <= INLINE_MAX
                    && dev.quick_writes()
                    && !tandem_repl_proto::zeroes::is_zeroes(data)
            }
            DiskJob::Read { len, .. } => *len as usize <= INLINE_MAX,
            _ => false,
        };
        if inline && !self.more_inputs {
            // The messages of this input (a Primary's Write to its peers) leave before the
            // local write instead of after it: the round trip overlaps the local copy, as
            // before the outbox. With more inputs queued, their messages go together at the
            // end of the drain instead.
            self.flush_outbox();
        }
        match job {
            DiskJob::Write {
                io,
                offset,
                data,
                fua: false,
            } if data.len() <= INLINE_MAX
                && dev.quick_writes()
                && !tandem_repl_proto::zeroes::is_zeroes(&data) =>
            {
                // A small buffered write lands in the page cache (the same bet the
                // single-replica NBD path makes); RWF_NOWAIT is not used for writes because
                // ext4 refuses it for buffered writes (EOPNOTSUPP), which would send every
                // write to the workers.
                let result = dev.write_at(&data, offset).map_err(disk_err);
                self.inline_done.push(Event::DiskWriteDone { io, result });
                None
            }
            DiskJob::Read { io, offset, len } if len as usize <= INLINE_MAX => {
                let mut buf = vec![0u8; len as usize];
                match dev.try_read_at_nowait(&mut buf, offset) {
                    Ok(true) => {
                        self.inline_done.push(Event::DiskReadDone {
                            io,
                            result: Ok(Bytes::from(buf)),
                        });
                        None
                    }
                    _ => Some(DiskJob::Read { io, offset, len }),
                }
            }
            job => Some(job),
        }
    }

    fn disk(&mut self, job: DiskJob) {
        let Some(job) = self.try_inline(job) else {
            return;
        };
        let job = match &self.workers {
            Some(w) => match w.send(job) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => job,
        };
        // A witness has no disk (the engine never asks), or the workers are gone.
        let err = || Err(DiskError("no local disk".into()));
        let ev = match job {
            DiskJob::Write { io, .. } => Event::DiskWriteDone { io, result: err() },
            DiskJob::Flush { io } => Event::DiskFlushDone { io, result: err() },
            DiskJob::Read { io, .. } => Event::DiskReadDone {
                io,
                result: Err(DiskError("no local disk".into())),
            },
            DiskJob::Checksum { io, .. } => Event::DiskChecksumDone {
                io,
                result: Err(DiskError("no local disk".into())),
            },
        };
        let now = self.now();
        let a = self.engine.handle(now, ev);
        if let Err(e) = self.execute(a) {
            *self.failed.lock().expect("failed") = Some(e.to_string());
        }
    }

    /// Puts `msg` into the outbox for the current link to `peer` (nothing when there is
    /// none: its PeerDown is on the way).
    fn send(&mut self, peer: NodeId, msg: Message) {
        let Some(&link) = self.links.get(&peer) else {
            return;
        };
        self.outbox_frames += 1;
        self.outbox_bytes += bulk_len(&msg);
        self.outbox.entry(peer).or_default().push_back((link, msg));
        if self.outbox_frames >= OUTBOX_FRAMES || self.outbox_bytes >= OUTBOX_BYTES {
            self.flush_outbox();
        }
    }

    /// Hands the outbox to the transport, per peer in order: behind that peer's backlog if
    /// it has one, else with [`tandem_transport::Transport::try_send_batch_on`] per run of
    /// messages for one link (what finds the link's queue full starts the backlog).
    ///
    /// Called at the end of every drain of the inputs and of the loop thread's tick, and
    /// before whatever must not overtake messages sent before it: a change of the
    /// transport configuration (`Disconnect`, the cut after a failed persist, reconnects:
    /// [`Loop::configure_transport`]), a file sync (`Persist*`), the loop's stop; and before
    /// a small disk request run inline on this thread when no other input is queued (see
    /// [`Loop::try_inline`]: latency). Other actions (disk I/O, completions) do not depend
    /// on the network.
    fn flush_outbox(&mut self) {
        if self.outbox_frames == 0 {
            return;
        }
        self.outbox_frames = 0;
        self.outbox_bytes = 0;
        let t = self.node.transport.clone();
        for (&peer, q) in self.outbox.iter_mut() {
            if let Some(b) = self.backlog.get_mut(&peer).filter(|b| !b.is_empty()) {
                // Behind earlier messages that wait for room.
                b.extend(q.drain(..));
                continue;
            }
            while let Some(&(link, _)) = q.front() {
                let run = q.iter().take_while(|(l, _)| *l == link).count();
                self.batch.clear();
                self.batch.extend(q.drain(..run).map(|(_, m)| m));
                loop {
                    match t.try_send_batch_on(&self.name, peer, link, &mut self.batch) {
                        Ok(()) => break,
                        Err(SendError::Full { .. }) => {
                            // Back-pressure: the loop thread sends the rest when there is
                            // room; later messages queue behind it.
                            let b = self.backlog.entry(peer).or_default();
                            b.extend(self.batch.drain(..).map(|m| (link, m)));
                            b.extend(q.drain(..));
                            break;
                        }
                        Err(e @ SendError::Invalid(_)) => {
                            tracing::debug!(volume = %self.name, peer, "send: {e}");
                            self.batch.pop_front();
                        }
                        Err(e) => {
                            // The link is gone (its PeerDown is on the way): so is the run.
                            tracing::debug!(volume = %self.name, peer, "send: {e}");
                            break;
                        }
                    }
                }
            }
        }
        self.batch.clear();
    }

    fn backlog_waiting(&self) -> bool {
        self.backlog.values().any(|b| !b.is_empty())
    }

    /// Sends the backlog, waiting for room (loop thread only: it is not a runtime thread,
    /// and the transport's event routing never waits for it, so this cannot deadlock).
    fn flush_backlog(&mut self) -> Result<(), VolumeError> {
        let t = self.node.transport.clone();
        for (peer, b) in self.backlog.iter_mut() {
            while let Some((link, msg)) = b.pop_front() {
                let r = self
                    .node
                    .runtime
                    .block_on(t.send_on(&self.name, *peer, link, msg));
                if let Err(e) = r {
                    // The link is gone (its PeerDown is on the way): so is the rest.
                    tracing::debug!(volume = %self.name, peer, "send: {e}");
                    b.clear();
                }
            }
        }
        self.backlog.retain(|_, b| !b.is_empty());
        Ok(())
    }
}

/// Bulk data bytes of a message (what makes it large).
fn bulk_len(msg: &Message) -> usize {
    match msg {
        Message::Write { data, .. }
        | Message::ReadReply { data, .. }
        | Message::ResyncData { data, .. } => data.len(),
        _ => 0,
    }
}

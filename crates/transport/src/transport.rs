//! The `Transport` handle and the shared registry of volumes, peers and links.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_repl_proto::{LocalVolume, Message, NodeId, ProtocolVersion};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::config::{PeerConfig, TransportConfig, VolumeConfig};
use crate::direct::{BatchError, Direct, Sent};
use crate::link;
use crate::stats::{RefusalReason, Stats};
use crate::tasks::{Tasks, lock};
use crate::{DownReason, Event, LinkId, SendError, TransportError};

/// A frame waiting in a link's send queue, with the byte budget it holds.
pub(crate) struct Outgoing {
    pub msg: Message,
    /// Leading bytes of the encoded frame already written (by a direct send).
    pub skip: usize,
    /// The frame's number, when a direct send wrote part of it (the writer numbers the
    /// others as it encodes them).
    pub seq: Option<u32>,
    pub _permit: Option<OwnedSemaphorePermit>,
}

/// The registry entry of an established link.
pub(crate) struct LinkSlot {
    pub id: LinkId,
    pub tx: mpsc::Sender<Outgoing>,
    pub bytes: Arc<Semaphore>,
    /// Writes frames from the sender's thread while the link is idle.
    pub direct: Arc<Direct>,
    /// Tells the link task to close, with a reason; dropped = `Removed`.
    pub close: Option<oneshot::Sender<DownReason>>,
    /// Becomes true after the link task delivered its `PeerDown`.
    pub done: watch::Receiver<bool>,
    pub remote: SocketAddr,
    pub version: ProtocolVersion,
}

pub(crate) struct PeerState {
    pub cfg: PeerConfig,
    /// Unique per configuration of this peer; a dialer of an older one stops.
    pub epoch: u64,
    pub link: Option<LinkSlot>,
    /// Dropping it stops the dialer (only when we dial this peer).
    pub _dialer: Option<watch::Sender<()>>,
}

pub(crate) struct VolState {
    pub uuid: String,
    pub peers: BTreeMap<NodeId, PeerState>,
}

#[derive(Default)]
pub(crate) struct State {
    pub volumes: HashMap<Arc<str>, VolState>,
    pub closed: bool,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub refused: BTreeMap<RefusalReason, u64>,
    pub accepted: u64,
    pub dial_failures: u64,
    pub established: u64,
}

pub(crate) struct Inner {
    pub cfg: TransportConfig,
    pub local_addr: SocketAddr,
    pub state: Mutex<State>,
    pub counters: Mutex<Counters>,
    pub events: mpsc::Sender<Event>,
    pub shutdown: watch::Sender<bool>,
    pub tasks: Tasks,
    pub next_id: AtomicU64,
    pub handshakes: Arc<Semaphore>,
}

/// A link's queue, its byte budget and its direct sender.
type SlotSender = (mpsc::Sender<Outgoing>, Arc<Semaphore>, Arc<Direct>);

/// Where [`Inner::install`] left a new link.
pub(crate) enum Install {
    Installed(Arc<str>),
    /// The volume or peer is gone (or the transport closed): drop the connection.
    Gone(&'static str),
    /// An older link holds the slot; it was taken out and must be closed first.
    Replace(LinkSlot),
}

impl Inner {
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn count_refusal(&self, reason: RefusalReason) {
        *lock(&self.counters).refused.entry(reason).or_default() += 1;
    }

    pub(crate) fn count_dial_failure(&self) {
        lock(&self.counters).dial_failures += 1;
    }

    /// The acceptor's view of a volume, for the handshake.
    pub(crate) fn lookup(&self, name: &str) -> Option<LocalVolume> {
        let st = lock(&self.state);
        let v = st.volumes.get(name)?;
        Some(LocalVolume {
            volume_name: name.to_string(),
            volume_uuid: v.uuid.clone(),
            local_node: self.cfg.node_id,
            peers: v.peers.keys().copied().collect(),
        })
    }

    /// Address and volume uuid for a dial attempt; `None` when this dialer is obsolete.
    pub(crate) fn dial_target(
        &self,
        volume: &str,
        peer: NodeId,
        epoch: u64,
    ) -> Option<(String, String, String)> {
        let st = lock(&self.state);
        if st.closed {
            return None;
        }
        let v = st.volumes.get(volume)?;
        let p = v.peers.get(&peer).filter(|p| p.epoch == epoch)?;
        Some((p.cfg.addr.clone(), v.uuid.clone(), p.cfg.name.clone()))
    }

    /// Puts `slot` into the registry for (volume, peer) if the configuration still matches
    /// (`epoch`: the dialer's; `None` for accepted links).
    pub(crate) fn install(
        &self,
        volume: &str,
        uuid: &str,
        peer: NodeId,
        epoch: Option<u64>,
        slot: &mut Option<LinkSlot>,
    ) -> Install {
        let mut st = lock(&self.state);
        if st.closed {
            return Install::Gone("the transport is shutting down");
        }
        let Some(name) = st.volumes.get_key_value(volume).map(|(k, _)| k.clone()) else {
            return Install::Gone("the volume was removed");
        };
        let Some(v) = st.volumes.get_mut(volume) else {
            return Install::Gone("the volume was removed");
        };
        if v.uuid != uuid {
            return Install::Gone("the volume's uuid changed");
        }
        let Some(p) = v.peers.get_mut(&peer) else {
            return Install::Gone("the peer was removed from the volume");
        };
        if let Some(e) = epoch
            && p.epoch != e
        {
            return Install::Gone("the peer's configuration changed");
        }
        if let Some(old) = p.link.take() {
            return Install::Replace(old);
        }
        p.link = slot.take();
        Install::Installed(name)
    }

    /// Removes the link `id` from the registry, if it is still there.
    pub(crate) fn uninstall(&self, volume: &str, peer: NodeId, id: LinkId) {
        let mut st = lock(&self.state);
        if let Some(p) = st
            .volumes
            .get_mut(volume)
            .and_then(|v| v.peers.get_mut(&peer))
            && p.link.as_ref().is_some_and(|l| l.id == id)
        {
            p.link = None;
        }
    }

    /// A message the transport may send for the consumer.
    fn check(msg: &Message) -> Result<(), SendError> {
        let ty = msg.message_type();
        if ty.is_handshake() {
            return Err(SendError::Invalid(format!(
                "{ty} belongs to the handshake, which the transport runs itself"
            )));
        }
        msg.validate()
            .map_err(|d| SendError::Invalid(format!("invalid {ty}: {d}")))
    }

    fn slot_sender(
        &self,
        volume: &str,
        peer: NodeId,
        link: Option<LinkId>,
        msg: &Message,
    ) -> Result<SlotSender, SendError> {
        Self::check(msg)?;
        self.slot(volume, peer, link)
    }

    fn slot(
        &self,
        volume: &str,
        peer: NodeId,
        link: Option<LinkId>,
    ) -> Result<SlotSender, SendError> {
        let st = lock(&self.state);
        let slot = st
            .volumes
            .get(volume)
            .and_then(|v| v.peers.get(&peer))
            .and_then(|p| p.link.as_ref());
        match (slot, link) {
            (Some(s), Some(l)) if s.id != l => Err(SendError::StaleLink {
                volume: volume.to_string(),
                peer,
                link: l,
            }),
            (Some(s), _) => Ok((s.tx.clone(), s.bytes.clone(), s.direct.clone())),
            (None, Some(l)) => Err(SendError::StaleLink {
                volume: volume.to_string(),
                peer,
                link: l,
            }),
            (None, None) => Err(SendError::NotConnected {
                volume: volume.to_string(),
                peer,
            }),
        }
    }

    fn permits_for(&self, msg: &Message) -> u32 {
        let cost = link::frame_cost(msg).min(self.cfg.limits.send_queue_bytes);
        u32::try_from(cost).unwrap_or(u32::MAX)
    }

    async fn send(
        &self,
        volume: &str,
        peer: NodeId,
        link: Option<LinkId>,
        msg: Message,
    ) -> Result<(), SendError> {
        let (tx, bytes, direct) = self.slot_sender(volume, peer, link, &msg)?;
        let msg = match direct.try_send(msg, &tx) {
            Sent::Done => return Ok(()),
            Sent::Queue(m) => m,
        };
        let gone = || SendError::NotConnected {
            volume: volume.to_string(),
            peer,
        };
        // Already counted as pending: no direct send overtakes it while it waits for room.
        let queued = async {
            let permit = bytes
                .acquire_many_owned(self.permits_for(&msg))
                .await
                .map_err(|_| gone())?;
            tx.send(Outgoing {
                msg,
                skip: 0,
                seq: None,
                _permit: Some(permit),
            })
            .await
            .map_err(|_| gone())
        }
        .await;
        if queued.is_err() {
            direct.unqueued();
        }
        queued
    }

    fn try_send(
        &self,
        volume: &str,
        peer: NodeId,
        link: Option<LinkId>,
        msg: Message,
    ) -> Result<(), SendError> {
        let (tx, bytes, direct) = self.slot_sender(volume, peer, link, &msg)?;
        let msg = match direct.try_send(msg, &tx) {
            Sent::Done => return Ok(()),
            Sent::Queue(m) => m,
        };
        let full = || SendError::Full {
            volume: volume.to_string(),
            peer,
        };
        let permit = bytes
            .try_acquire_many_owned(self.permits_for(&msg))
            .map_err(|_| {
                direct.unqueued();
                full()
            })?;
        tx.try_send(Outgoing {
            msg,
            skip: 0,
            seq: None,
            _permit: Some(permit),
        })
        .map_err(|e| {
            direct.unqueued();
            match e {
                mpsc::error::TrySendError::Full(_) => full(),
                mpsc::error::TrySendError::Closed(_) => SendError::NotConnected {
                    volume: volume.to_string(),
                    peer,
                },
            }
        })
    }
}

impl Inner {
    fn try_send_batch(
        &self,
        volume: &str,
        peer: NodeId,
        link: Option<LinkId>,
        msgs: &mut VecDeque<Message>,
    ) -> Result<(), SendError> {
        // The valid messages up to the first invalid one go out; the invalid one is refused
        // after them.
        let valid = msgs
            .iter()
            .position(|m| Self::check(m).is_err())
            .unwrap_or(msgs.len());
        if valid > 0 {
            let (tx, bytes, direct) = self.slot(volume, peer, link)?;
            direct
                .try_send_batch(msgs, valid, &tx, &bytes, |m| self.permits_for(m))
                .map_err(|e| match e {
                    BatchError::Full => SendError::Full {
                        volume: volume.to_string(),
                        peer,
                    },
                    BatchError::Closed => SendError::NotConnected {
                        volume: volume.to_string(),
                        peer,
                    },
                })?;
        }
        match msgs.front() {
            Some(m) => Self::check(m),
            None => Ok(()),
        }
    }
}

/// One established link, for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub volume: String,
    pub peer: NodeId,
    pub peer_name: String,
    pub link: LinkId,
    pub remote: SocketAddr,
    pub version: ProtocolVersion,
}

/// The replication links of one node. Create it with [`Transport::start`]; stop it with
/// [`Transport::shutdown`] (dropping it aborts every task at once, without the orderly
/// `Disconnect`). Share it with `Arc` when several tasks send.
pub struct Transport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("node_id", &self.inner.cfg.node_id)
            .field("local_addr", &self.inner.local_addr)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Binds the listener and starts accepting. Returns the transport and the receiver of
    /// its events (bounded: [`crate::Limits::event_queue`]); the consumer must keep reading it.
    pub async fn start(
        cfg: TransportConfig,
    ) -> Result<(Transport, mpsc::Receiver<Event>), TransportError> {
        cfg.validate()?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| TransportError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        Self::start_on(cfg, listener)
    }

    /// Like [`Transport::start`] on a listener the caller already bound (e.g. bound at
    /// process start to report its address early); `cfg.listen` is only used in errors.
    /// Must be called inside a tokio runtime.
    pub fn start_with_listener(
        cfg: TransportConfig,
        listener: std::net::TcpListener,
    ) -> Result<(Transport, mpsc::Receiver<Event>), TransportError> {
        cfg.validate()?;
        let bind_err = |source| TransportError::Bind {
            addr: cfg.listen,
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let listener = TcpListener::from_std(listener).map_err(bind_err)?;
        Self::start_on(cfg, listener)
    }

    fn start_on(
        cfg: TransportConfig,
        listener: TcpListener,
    ) -> Result<(Transport, mpsc::Receiver<Event>), TransportError> {
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let (events, rx) = mpsc::channel(cfg.limits.event_queue);
        let inner = Arc::new(Inner {
            local_addr,
            state: Mutex::new(State::default()),
            counters: Mutex::new(Counters::default()),
            events,
            shutdown: watch::Sender::new(false),
            tasks: Tasks::new(),
            next_id: AtomicU64::new(1),
            handshakes: Arc::new(Semaphore::new(cfg.limits.max_pending_handshakes)),
            cfg,
        });
        tracing::info!(
            node = inner.cfg.node_id,
            name = %inner.cfg.node_name,
            addr = %local_addr,
            "replication listener up"
        );
        inner
            .tasks
            .spawn(link::listener_loop(inner.clone(), listener));
        Ok((Transport { inner }, rx))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.cfg.node_id
    }

    /// Adds a volume or changes its peers. Links to peers that stay are kept (a changed
    /// address is used from the next dial on); links to removed peers go down with
    /// [`DownReason::Removed`]; a changed uuid replaces every link of the volume.
    pub fn set_volume(&self, vol: VolumeConfig) -> Result<(), TransportError> {
        vol.validate(self.inner.cfg.node_id)?;
        let me = self.inner.cfg.node_id;
        let mut dialers = Vec::new();
        let mut dropped = Vec::new();
        {
            let mut st = lock(&self.inner.state);
            if st.closed {
                return Err(TransportError::ShutDown);
            }
            let name: Arc<str> = Arc::from(vol.name.as_str());
            if let Some(old) = st.volumes.get(vol.name.as_str())
                && old.uuid != vol.uuid
                && let Some(old) = st.volumes.remove(vol.name.as_str())
            {
                dropped.extend(old.peers.into_values());
            }
            let v = st.volumes.entry(name.clone()).or_insert_with(|| VolState {
                uuid: vol.uuid.clone(),
                peers: BTreeMap::new(),
            });
            let keep: Vec<NodeId> = vol.peers.iter().map(|p| p.node_id).collect();
            let gone: Vec<NodeId> = v
                .peers
                .keys()
                .copied()
                .filter(|id| !keep.contains(id))
                .collect();
            for id in gone {
                dropped.extend(v.peers.remove(&id));
            }
            for p in vol.peers {
                if let Some(existing) = v.peers.get_mut(&p.node_id) {
                    existing.cfg = p;
                    continue;
                }
                let epoch = self.inner.next_id();
                let dialer = (p.node_id > me).then(|| {
                    let (tx, rx) = watch::channel(());
                    dialers.push((name.clone(), p.node_id, epoch, rx));
                    tx
                });
                v.peers.insert(
                    p.node_id,
                    PeerState {
                        cfg: p,
                        epoch,
                        link: None,
                        _dialer: dialer,
                    },
                );
            }
        }
        // Dropping a peer's state closes its link (Removed) and stops its dialer.
        drop(dropped);
        for (volume, peer, epoch, cancel) in dialers {
            self.inner.tasks.spawn(link::dialer(
                self.inner.clone(),
                volume,
                peer,
                epoch,
                cancel,
            ));
        }
        Ok(())
    }

    /// Removes a volume: its links go down with [`DownReason::Removed`] (the peers see a
    /// `Disconnect{ConfigChanged}`). Returns whether it was configured.
    pub fn remove_volume(&self, name: &str) -> bool {
        let removed = lock(&self.inner.state).volumes.remove(name);
        removed.is_some()
    }

    /// Names of the configured volumes.
    pub fn volumes(&self) -> Vec<String> {
        let st = lock(&self.inner.state);
        let mut v: Vec<String> = st.volumes.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    /// Queues `msg` for the current link to `peer` for `volume`, waiting while the queue is
    /// full. Fails when there is no link, or the message is invalid or a handshake message.
    /// Messages on one link arrive in the order they were queued.
    pub async fn send(&self, volume: &str, peer: NodeId, msg: Message) -> Result<(), SendError> {
        self.inner.send(volume, peer, None, msg).await
    }

    /// Like [`Transport::send`], but only onto link `link` (from its `PeerUp`): fails with
    /// [`SendError::StaleLink`] once that link is gone, so a message meant for a previous
    /// connection never reaches the next one.
    pub async fn send_on(
        &self,
        volume: &str,
        peer: NodeId,
        link: LinkId,
        msg: Message,
    ) -> Result<(), SendError> {
        self.inner.send(volume, peer, Some(link), msg).await
    }

    /// Like [`Transport::send`] without waiting: [`SendError::Full`] when the queue is full.
    pub fn try_send(&self, volume: &str, peer: NodeId, msg: Message) -> Result<(), SendError> {
        self.inner.try_send(volume, peer, None, msg)
    }

    /// Like [`Transport::send_on`] without waiting.
    pub fn try_send_on(
        &self,
        volume: &str,
        peer: NodeId,
        link: LinkId,
        msg: Message,
    ) -> Result<(), SendError> {
        self.inner.try_send(volume, peer, Some(link), msg)
    }

    /// Sends several messages to `peer` on link `link` (from its `PeerUp`) without waiting,
    /// in order, like [`Transport::try_send_on`] on each but cheaper: while the link is
    /// idle, small frames go out together with one `sendmsg` (up to 64 frames or 256 KiB
    /// per call of the system). Each message is taken off the front of `msgs` once it is
    /// written or queued. On an error the message it is about stays at the front with every
    /// later one: [`SendError::Full`] (queue them again later, behind the first),
    /// [`SendError::Invalid`] (only that message is refused: the ones before it went out),
    /// [`SendError::StaleLink`] or [`SendError::NotConnected`] (the link is gone).
    pub fn try_send_batch_on(
        &self,
        volume: &str,
        peer: NodeId,
        link: LinkId,
        msgs: &mut VecDeque<Message>,
    ) -> Result<(), SendError> {
        self.inner.try_send_batch(volume, peer, Some(link), msgs)
    }

    /// The current link to `peer` for `volume`, if one is up.
    pub fn link(&self, volume: &str, peer: NodeId) -> Option<LinkId> {
        let st = lock(&self.inner.state);
        st.volumes
            .get(volume)?
            .peers
            .get(&peer)?
            .link
            .as_ref()
            .map(|l| l.id)
    }

    /// Every established link.
    pub fn links(&self) -> Vec<LinkInfo> {
        let st = lock(&self.inner.state);
        let mut out = Vec::new();
        for (name, v) in &st.volumes {
            for (id, p) in &v.peers {
                if let Some(l) = &p.link {
                    out.push(LinkInfo {
                        volume: name.to_string(),
                        peer: *id,
                        peer_name: p.cfg.name.clone(),
                        link: l.id,
                        remote: l.remote,
                        version: l.version,
                    });
                }
            }
        }
        out.sort_by(|a, b| (&a.volume, a.peer).cmp(&(&b.volume, b.peer)));
        out
    }

    /// Counters: refusals by reason, connections, links, live tasks.
    pub fn stats(&self) -> Stats {
        let links_up = {
            let st = lock(&self.inner.state);
            st.volumes
                .values()
                .flat_map(|v| v.peers.values())
                .filter(|p| p.link.is_some())
                .count()
        };
        let c = lock(&self.inner.counters);
        Stats {
            refused_by_reason: c.refused.clone(),
            connections_accepted: c.accepted,
            dial_failures: c.dial_failures,
            links_established: c.established,
            links_up,
            live_tasks: self.inner.tasks.live(),
        }
    }

    /// Closes every link (each peer gets a `Disconnect{Shutdown}`, queued frames are written
    /// within [`crate::Timers::close_grace`]), stops the listener and the dialers, and waits
    /// until every task has ended (aborting what is still running after the grace period).
    /// The consumer gets `PeerDown{Shutdown}` for each link if its channel has room.
    pub async fn shutdown(&self) {
        let peers: Vec<PeerState> = {
            let mut st = lock(&self.inner.state);
            st.closed = true;
            let mut all = Vec::new();
            for (_, v) in st.volumes.drain() {
                for (_, mut p) in v.peers {
                    if let Some(close) = p.link.as_mut().and_then(|l| l.close.take()) {
                        let _ = close.send(DownReason::Shutdown);
                    }
                    all.push(p);
                }
            }
            all
        };
        drop(peers);
        self.inner.shutdown.send_replace(true);
        if let Some(mut set) = self.inner.tasks.take() {
            let grace = self.inner.cfg.timers.close_grace * 2;
            let drained =
                tokio::time::timeout(grace, async { while set.join_next().await.is_some() {} })
                    .await;
            if drained.is_err() {
                tracing::warn!("replication tasks still running after {grace:?}; aborting them");
                set.abort_all();
                while set.join_next().await.is_some() {}
            }
        }
        tracing::info!(
            node = self.inner.cfg.node_id,
            "replication transport shut down"
        );
    }
}

impl Drop for Transport {
    /// Aborts every task without telling the peers (they see the connections close). The
    /// registry is left as it is, so no link starts an orderly close in the meantime.
    fn drop(&mut self) {
        lock(&self.inner.state).closed = true;
        if let Some(mut set) = self.inner.tasks.take() {
            set.abort_all();
        }
        self.inner.shutdown.send_replace(true);
    }
}

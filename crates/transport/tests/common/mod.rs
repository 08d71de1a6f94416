//! Helpers for the transport tests: nodes with short timers, event waits with deadlines,
//! captured logs, raw protocol clients, a fault-injecting TCP proxy.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use tandem_repl_proto::{
    ClusterSecret, Decoder, Encoder, Established, HandshakeError, Initiator, InitiatorConfig,
    MAX_HANDSHAKE_PAYLOAD, Message, NodeId, VersionRange,
};
use tandem_transport::{Event, PeerConfig, Timers, Transport, TransportConfig, VolumeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub const WAIT: Duration = Duration::from_secs(10);
pub const CLUSTER: &str = "test-cluster";

// ----- logs -----------------------------------------------------------------------------

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Captures every log line of the process (tests filter by their own volume names).
pub fn init_logs() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing_subscriber::fmt()
            .with_writer(|| Capture)
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
    });
}

/// WARN lines containing every one of `needles`.
pub fn warn_lines_with(needles: &[&str]) -> Vec<String> {
    let logs = String::from_utf8_lossy(&LOGS.lock().unwrap()).to_string();
    logs.lines()
        .filter(|l| l.contains("WARN") && needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Polls until a WARN line with all `needles` was logged.
pub async fn expect_warn(needles: &[&str]) -> String {
    eventually(&format!("a warning with {needles:?}"), || {
        warn_lines_with(needles).into_iter().next()
    })
    .await
}

// ----- nodes ----------------------------------------------------------------------------

pub fn secret() -> ClusterSecret {
    ClusterSecret::new(b"test secret: 32 bytes long, ok!!".to_vec()).unwrap()
}

pub fn fast_timers() -> Timers {
    Timers {
        dial_backoff_min: Duration::from_millis(20),
        dial_backoff_max: Duration::from_millis(200),
        handshake_timeout: Duration::from_millis(1000),
        ping_interval: Duration::from_millis(100),
        ping_timeout: Duration::from_millis(800),
        close_grace: Duration::from_millis(300),
    }
}

pub fn config(id: NodeId, listen: SocketAddr) -> TransportConfig {
    let mut c = TransportConfig::new(CLUSTER, secret(), id, format!("node{id}"), listen);
    c.timers = fast_timers();
    c
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub struct Node {
    pub t: Arc<Transport>,
    pub rx: mpsc::Receiver<Event>,
    /// Events received while waiting for another one, in arrival order.
    pending: VecDeque<Event>,
}

impl Node {
    pub async fn start(id: NodeId) -> Node {
        Node::start_with(config(id, loopback())).await
    }

    pub async fn start_with(cfg: TransportConfig) -> Node {
        init_logs();
        let (t, rx) = Transport::start(cfg).await.unwrap();
        Node {
            t: Arc::new(t),
            rx,
            pending: VecDeque::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.t.node_id()
    }

    pub fn peer(&self) -> PeerConfig {
        PeerConfig {
            node_id: self.id(),
            name: format!("node{}", self.id()),
            addr: self.t.local_addr().to_string(),
        }
    }

    /// The next event, failing after [`WAIT`].
    pub async fn next(&mut self) -> Event {
        if let Some(e) = self.pending.pop_front() {
            return e;
        }
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(e)) => e,
            Ok(None) => panic!("node {}: event channel closed", self.id()),
            Err(_) => panic!("node {}: no event within {WAIT:?}", self.id()),
        }
    }

    /// The first event that matches; the others stay queued for later calls, so the order
    /// of the events of one link is kept.
    pub async fn wait_for(&mut self, what: &str, mut f: impl FnMut(&Event) -> bool) -> Event {
        if let Some(i) = self.pending.iter().position(&mut f) {
            return self.pending.remove(i).unwrap();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) if f(&e) => return e,
                Ok(Some(e)) => self.pending.push_back(e),
                Ok(None) => panic!(
                    "node {}: event channel closed waiting for {what}",
                    self.id()
                ),
                Err(_) => panic!("node {}: no {what} within {WAIT:?}", self.id()),
            }
        }
    }

    /// Waits for PeerUp from `peer` on `volume`; returns the link id.
    pub async fn up(&mut self, volume: &str, peer: NodeId) -> u64 {
        match self
            .wait_for(&format!("PeerUp {volume}/{peer}"), |e| {
                matches!(e, Event::PeerUp { volume: v, peer: p, .. } if &**v == volume && *p == peer)
            })
            .await
        {
            Event::PeerUp { link, .. } => link,
            _ => unreachable!(),
        }
    }

    /// Waits for PeerDown from `peer` on `volume`; returns the event.
    pub async fn down(&mut self, volume: &str, peer: NodeId) -> Event {
        self.wait_for(&format!("PeerDown {volume}/{peer}"), |e| {
            matches!(e, Event::PeerDown { volume: v, peer: p, .. } if &**v == volume && *p == peer)
        })
        .await
    }

    /// Waits for a message from `peer` on `volume`.
    pub async fn message(&mut self, volume: &str, peer: NodeId) -> Message {
        match self
            .wait_for(&format!("a message {volume}/{peer}"), |e| {
                matches!(e, Event::PeerMessage { volume: v, peer: p, .. } if &**v == volume && *p == peer)
            })
            .await
        {
            Event::PeerMessage { msg, .. } => msg,
            _ => unreachable!(),
        }
    }

    /// Events already queued, without waiting.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut v: Vec<Event> = self.pending.drain(..).collect();
        while let Ok(e) = self.rx.try_recv() {
            v.push(e);
        }
        v
    }
}

pub fn volume(name: &str, uuid: &str, peers: &[&Node]) -> VolumeConfig {
    VolumeConfig {
        name: name.into(),
        uuid: uuid.into(),
        peers: peers.iter().map(|n| n.peer()).collect(),
    }
}

/// Polls `f` until it returns `Some`, failing after [`WAIT`].
pub async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn write(seq: u64, data: Bytes) -> Message {
    Message::Write {
        seq,
        offset: seq * 4096,
        flags: 0,
        data,
    }
}

/// `len` bytes that depend on `seed`.
pub fn pattern(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Checks that a link works both ways by exchanging one Flush each way.
pub async fn ping_pong(a: &mut Node, b: &mut Node, volume: &str, seq: u64) {
    a.t.send(volume, b.id(), Message::Flush { seq })
        .await
        .unwrap();
    assert_eq!(b.message(volume, a.id()).await, Message::Flush { seq });
    b.t.send(
        volume,
        a.id(),
        Message::FlushAck {
            seq,
            status: tandem_repl_proto::Status::Ok,
        },
    )
    .await
    .unwrap();
    assert_eq!(
        a.message(volume, b.id()).await,
        Message::FlushAck {
            seq,
            status: tandem_repl_proto::Status::Ok
        }
    );
}

// ----- raw clients ----------------------------------------------------------------------

pub fn initiator(volume: &str, uuid: &str, from: NodeId, to: NodeId) -> InitiatorConfig {
    InitiatorConfig {
        cluster_id: CLUSTER.into(),
        volume_name: volume.into(),
        volume_uuid: uuid.into(),
        local_node: from,
        peer_node: to,
        versions: VersionRange::SUPPORTED,
        secret: secret(),
    }
}

/// What a raw initiator saw.
#[derive(Debug)]
pub enum RawOutcome {
    Established(Established),
    /// The acceptor refused; `error` is our handshake machine's reading of it.
    Refused {
        msg: Message,
        error: HandshakeError,
    },
    /// Our machine failed (e.g. a bad MAC from the acceptor).
    Failed(HandshakeError),
    /// The connection closed without a refusal.
    Closed,
}

/// Runs a handshake as initiator over a raw socket. Returns the outcome and the socket.
pub async fn raw_handshake(addr: SocketAddr, cfg: InitiatorConfig) -> (RawOutcome, TcpStream) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut ini, hello) = Initiator::new(cfg, [7u8; 32]).unwrap();
    send_raw(&mut s, &hello).await;
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    let deadline = Instant::now() + WAIT;
    loop {
        let msg = match dec.next_message().unwrap() {
            Some(m) => m,
            None => {
                let n = tokio::time::timeout_at(deadline, s.read_buf(dec.buffer_mut()))
                    .await
                    .expect("acceptor answered in time")
                    .unwrap_or(0);
                if n == 0 {
                    return (RawOutcome::Closed, s);
                }
                continue;
            }
        };
        let refused = matches!(msg, Message::Refused { .. }).then(|| msg.clone());
        match ini.on_message(msg) {
            Ok(out) => {
                if let Some(m) = out.send {
                    send_raw(&mut s, &m).await;
                }
                if let Some(e) = out.established {
                    return (RawOutcome::Established(e), s);
                }
            }
            Err(f) => {
                return match refused {
                    Some(msg) => (
                        RawOutcome::Refused {
                            msg,
                            error: *f.error,
                        },
                        s,
                    ),
                    None => (RawOutcome::Failed(*f.error), s),
                };
            }
        }
    }
}

pub async fn send_raw(s: &mut TcpStream, msg: &Message) {
    let mut buf = Vec::new();
    Encoder::default().encode(msg, &mut buf).unwrap();
    s.write_all(&buf).await.unwrap();
}

/// Reads until EOF (or a reset), returning the bytes; fails if the peer keeps the
/// connection open past [`WAIT`].
pub async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let r = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the connection was not closed within {WAIT:?}");
    out
}

/// The last message that decodes from what an established link of `version` sent (its
/// frames numbered from 1 since protocol version 10): the `Disconnect` of a link that went
/// down in order.
pub fn last_link_message(
    bytes: &[u8],
    version: tandem_repl_proto::ProtocolVersion,
) -> Option<Message> {
    let mut dec = Decoder::new();
    dec.set_version(version);
    dec.feed(bytes);
    let mut last = None;
    while let Ok(Some(m)) = dec.next_message() {
        last = Some(m);
    }
    last
}

/// Decodes the frames of `bytes` (handshake limits).
pub fn frames(bytes: &[u8]) -> Vec<Message> {
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    dec.feed(bytes);
    let mut v = Vec::new();
    while let Ok(Some(m)) = dec.next_message() {
        v.push(m);
    }
    v
}

// ----- proxy ----------------------------------------------------------------------------

/// A TCP proxy in front of `target` that can cut every current connection, or freeze them
/// (keep the sockets open but forward nothing).
pub struct Proxy {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    freeze: tokio::sync::watch::Sender<u64>,
    held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind(loopback()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let held: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let (freeze, _) = tokio::sync::watch::channel(0u64);
        let accept = {
            let conns = conns.clone();
            let held = held.clone();
            let freeze = freeze.clone();
            tokio::spawn(async move {
                while let Ok((mut a, _)) = l.accept().await {
                    let Ok(mut b) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let held = held.clone();
                    let mut frozen = freeze.subscribe();
                    frozen.borrow_and_update();
                    conns.lock().unwrap().push(tokio::spawn(async move {
                        let freeze_now = tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut a, &mut b) => false,
                            r = frozen.changed() => r.is_ok(),
                        };
                        if freeze_now {
                            held.lock().unwrap().push((a, b));
                        }
                    }));
                }
            })
        };
        Proxy {
            addr,
            conns,
            freeze,
            held,
            accept,
        }
    }

    /// Drops every current connection (both sockets closed at once).
    pub fn cut(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Stops forwarding on every current connection but keeps the sockets open; new
    /// connections are forwarded normally.
    pub fn freeze(&self) {
        self.freeze.send_modify(|v| *v += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        self.held.lock().unwrap().clear();
    }
}

//! Connections: the listener, dialers, the handshake on a socket, and an established link's
//! reader and writer.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tandem_repl_proto::{
    Acceptor, AcceptorConfig, DecodeError, Decoder, DisconnectReason, Encoder, Established,
    FrameCounter, HandshakeFailure, Initiator, InitiatorConfig, MAX_HANDSHAKE_PAYLOAD, MAX_PAYLOAD,
    Message, NodeId, RefuseReason, VersionRange,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio::time::{Instant, sleep, sleep_until, timeout};

use crate::direct::Direct;
use crate::secret::random_bytes;
use crate::stats::RefusalReason;
use crate::tasks::{AbortOnDrop, lock};
use crate::transport::{Inner, Install, LinkSlot, Outgoing};
use crate::{DownReason, Event};

/// Frames written with one vectored write at most.
const MAX_BATCH_FRAMES: usize = 64;
/// Bytes gathered into one vectored write at most (a larger single frame goes alone).
const MAX_BATCH_BYTES: usize = 4 << 20;
/// Bulk data up to this size is copied next to its header instead of taking its own iovec.
const INLINE_DATA: usize = 4096;
/// Longest `detail` we put into a Disconnect or Refused.
const MAX_DETAIL: usize = 512;

/// Bytes a message is accounted for in a send queue.
pub(crate) fn frame_cost(msg: &Message) -> usize {
    64 + match msg {
        Message::Write { data, .. }
        | Message::ReadReply { data, .. }
        | Message::ResyncData { data, .. } => data.len(),
        Message::ChecksumReply { digests, .. } => digests.len() * 32,
        Message::OutOfSync { ranges, .. } => ranges.len() * 16,
        _ => 0,
    }
}

fn truncate(s: &str) -> String {
    let mut end = s.len().min(MAX_DETAIL);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// A handshake that did not complete: what to count, log and (maybe) tell the peer.
struct Failure {
    reason: RefusalReason,
    text: String,
    send: Option<Message>,
}

impl Failure {
    fn new(reason: RefusalReason, text: impl Into<String>) -> Failure {
        Failure {
            reason,
            text: text.into(),
            send: None,
        }
    }

    fn timeout(d: Duration) -> Failure {
        Failure::new(
            RefusalReason::Timeout,
            format!("handshake not completed within {d:?}"),
        )
    }
}

impl From<HandshakeFailure> for Failure {
    fn from(f: HandshakeFailure) -> Failure {
        Failure {
            reason: RefusalReason::of_handshake(&f.error),
            text: f.error.to_string(),
            send: f.send,
        }
    }
}

impl From<DecodeError> for Failure {
    fn from(e: DecodeError) -> Failure {
        let text = e.to_string();
        let v = VersionRange::SUPPORTED;
        Failure {
            reason: RefusalReason::of_decode(&e),
            send: Some(Message::Refused {
                reason: RefuseReason::ProtocolError,
                min_version: v.min,
                max_version: v.max,
                detail: truncate(&text),
            }),
            text,
        }
    }
}

fn io_failure(e: std::io::Error) -> Failure {
    Failure::new(RefusalReason::Io, format!("socket error: {e}"))
}

/// The next handshake message from the socket.
async fn read_message(stream: &mut TcpStream, dec: &mut Decoder) -> Result<Message, Failure> {
    loop {
        if let Some(m) = dec.next_message()? {
            return Ok(m);
        }
        let n = stream
            .read_buf(dec.buffer_mut())
            .await
            .map_err(io_failure)?;
        if n == 0 {
            return Err(Failure::new(
                RefusalReason::Closed,
                format!(
                    "the peer closed the connection during the handshake ({} bytes of an incomplete frame received)",
                    dec.buffered()
                ),
            ));
        }
    }
}

async fn write_message(stream: &mut TcpStream, msg: &Message) -> Result<(), Failure> {
    write_frame(stream, Encoder::default(), 0, msg).await
}

/// Writes one frame numbered `seq` (0: a handshake frame).
async fn write_frame(
    stream: &mut TcpStream,
    enc: Encoder,
    seq: u32,
    msg: &Message,
) -> Result<(), Failure> {
    let mut buf = Vec::with_capacity(128);
    enc.encode_seq(msg, seq, &mut buf)
        .map_err(|e| Failure::new(RefusalReason::Internal, e.to_string()))?;
    stream.write_all(&buf).await.map_err(io_failure)
}

/// Best effort: tell the peer why, then close.
async fn send_refusal(stream: &mut TcpStream, msg: &Message, grace: Duration) {
    send_closing(stream, Encoder::default(), 0, msg, grace).await;
}

/// Best effort: send `msg` as frame `seq` with `enc`, then close.
async fn send_closing(
    stream: &mut TcpStream,
    enc: Encoder,
    seq: u32,
    msg: &Message,
    grace: Duration,
) {
    let _ = timeout(grace, async {
        let _ = write_frame(stream, enc, seq, msg).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

fn nonce() -> Result<[u8; 32], Failure> {
    random_bytes::<32>().map_err(|e| {
        Failure::new(
            RefusalReason::Internal,
            format!("no randomness from the OS: {e}"),
        )
    })
}

// ---------------------------------------------------------------------------------------
// Accepting side

pub(crate) async fn listener_loop(inner: Arc<Inner>, listener: TcpListener) {
    let mut shut = inner.shutdown.subscribe();
    loop {
        if *shut.borrow_and_update() {
            return;
        }
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, addr)) => {
                    lock(&inner.counters).accepted += 1;
                    match inner.handshakes.clone().try_acquire_owned() {
                        Ok(permit) => {
                            inner.tasks.spawn(accept_conn(inner.clone(), stream, addr, permit));
                        }
                        Err(_) => {
                            inner.count_refusal(RefusalReason::Busy);
                            tracing::warn!(peer = %addr, reason = "busy",
                                "refused replication connection: too many handshakes in progress");
                        }
                    }
                }
                Err(e) => {
                    // E.g. out of file descriptors: keep the listener, try again shortly.
                    tracing::warn!(error = %e, "accepting a replication connection failed");
                    tokio::select! {
                        _ = sleep(Duration::from_millis(100)) => {}
                        _ = shut.changed() => return,
                    }
                }
            },
            _ = shut.changed() => return,
        }
    }
}

async fn accept_conn(
    inner: Arc<Inner>,
    mut stream: TcpStream,
    addr: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let t = inner.cfg.timers;
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    let mut volume: Option<String> = None;
    let mut shut = inner.shutdown.subscribe();
    if *shut.borrow_and_update() {
        return;
    }
    let r = tokio::select! {
        r = timeout(t.handshake_timeout, accept_handshake(&inner, &mut stream, &mut dec, &mut volume)) => {
            r.unwrap_or_else(|_| Err(Failure::timeout(t.handshake_timeout)))
        }
        _ = shut.changed() => return,
    };
    drop(permit);
    match r {
        Ok(est) => run_link(inner, stream, dec, est, addr, None).await,
        Err(f) => {
            inner.count_refusal(f.reason);
            tracing::warn!(
                peer = %addr,
                volume = volume.as_deref().unwrap_or("-"),
                reason = f.reason.as_str(),
                "refused replication connection: {}",
                f.text
            );
            if let Some(m) = &f.send {
                send_refusal(&mut stream, m, t.close_grace).await;
            }
        }
    }
}

async fn accept_handshake(
    inner: &Arc<Inner>,
    stream: &mut TcpStream,
    dec: &mut Decoder,
    volume: &mut Option<String>,
) -> Result<Established, Failure> {
    let lookup = {
        let inner = inner.clone();
        move |name: &str| inner.lookup(name)
    };
    let cfg = AcceptorConfig {
        cluster_id: inner.cfg.cluster_id.clone(),
        versions: VersionRange::SUPPORTED,
        secret: inner.cfg.secret.clone(),
    };
    let mut acc = Acceptor::new(cfg, lookup, nonce()?)
        .map_err(|e| Failure::new(RefusalReason::Internal, e.to_string()))?;
    loop {
        let msg = read_message(stream, dec).await?;
        let from = match &msg {
            Message::Hello(h) => {
                *volume = Some(h.volume_name.clone());
                Some(h.from_node)
            }
            _ => None,
        };
        let out = acc.on_message(msg)?;
        // The Hello passed every check; now the connection rule: the lower id dials.
        if let Some(from) = from
            && from > inner.cfg.node_id
        {
            let text = format!(
                "node {from} dialed node {}, but the lower node id dials",
                inner.cfg.node_id
            );
            return Err(Failure {
                reason: RefusalReason::WrongDirection,
                send: Some(acc.refusal(RefuseReason::ProtocolError, &text)),
                text,
            });
        }
        if let Some(m) = &out.send {
            write_message(stream, m).await?;
        }
        if let Some(est) = out.established {
            return Ok(est);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Dialing side

enum DialError {
    Connect(String),
    Handshake(Failure),
}

/// Dials `peer` for `volume` until the peer or the volume is removed or the transport shuts
/// down: backoff from `dial_backoff_min` doubling to `dial_backoff_max`, reset after a link
/// was established.
pub(crate) async fn dialer(
    inner: Arc<Inner>,
    volume: Arc<str>,
    peer: NodeId,
    epoch: u64,
    mut cancel: watch::Receiver<()>,
) {
    let t = inner.cfg.timers;
    let mut backoff = t.dial_backoff_min;
    // The last failure logged at warn: an identical one right after is logged at debug only.
    let mut last_failure: Option<String> = None;
    loop {
        if cancel.has_changed().is_err() || *inner.shutdown.borrow() {
            return;
        }
        let Some((addr, uuid, peer_name)) = inner.dial_target(&volume, peer, epoch) else {
            return;
        };
        let attempt = dial_once(&inner, &volume, &uuid, peer, &addr);
        let r = tokio::select! {
            r = attempt => r,
            _ = cancel.changed() => return,
        };
        let (reason, text) = match r {
            Ok((stream, dec, est, remote)) => {
                last_failure = None;
                backoff = t.dial_backoff_min;
                run_link(inner.clone(), stream, dec, est, remote, Some(epoch)).await;
                tokio::select! {
                    _ = sleep(t.dial_backoff_min) => {}
                    _ = cancel.changed() => return,
                }
                continue;
            }
            Err(DialError::Connect(e)) => {
                inner.count_dial_failure();
                ("connect", format!("cannot connect: {e}"))
            }
            Err(DialError::Handshake(f)) => {
                inner.count_refusal(f.reason);
                (f.reason.as_str(), format!("handshake failed: {}", f.text))
            }
        };
        if last_failure.as_deref() == Some(text.as_str()) {
            tracing::debug!(peer = %addr, volume = %volume, node = peer, reason,
                "replication dial failed again, next try in {backoff:?}: {text}");
        } else {
            tracing::warn!(peer = %addr, volume = %volume, node = peer, peer_name = %peer_name,
                reason, "replication dial failed, next try in {backoff:?}: {text}");
            last_failure = Some(text);
        }
        tokio::select! {
            _ = sleep(backoff) => {}
            _ = cancel.changed() => return,
        }
        backoff = (backoff * 2).min(t.dial_backoff_max);
    }
}

async fn dial_once(
    inner: &Arc<Inner>,
    volume: &str,
    uuid: &str,
    peer: NodeId,
    addr: &str,
) -> Result<(TcpStream, Decoder, Established, SocketAddr), DialError> {
    let t = inner.cfg.timers;
    let mut stream = match timeout(t.handshake_timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(DialError::Connect(e.to_string())),
        Err(_) => {
            return Err(DialError::Connect(format!(
                "no connection within {:?}",
                t.handshake_timeout
            )));
        }
    };
    let _ = stream.set_nodelay(true);
    let remote = stream
        .peer_addr()
        .map_err(|e| DialError::Connect(e.to_string()))?;
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    let r = timeout(
        t.handshake_timeout,
        dial_handshake(inner, &mut stream, &mut dec, volume, uuid, peer),
    )
    .await
    .unwrap_or_else(|_| Err(Failure::timeout(t.handshake_timeout)));
    match r {
        Ok(est) => Ok((stream, dec, est, remote)),
        Err(f) => {
            if let Some(m) = &f.send {
                send_refusal(&mut stream, m, t.close_grace).await;
            }
            Err(DialError::Handshake(f))
        }
    }
}

async fn dial_handshake(
    inner: &Arc<Inner>,
    stream: &mut TcpStream,
    dec: &mut Decoder,
    volume: &str,
    uuid: &str,
    peer: NodeId,
) -> Result<Established, Failure> {
    let cfg = InitiatorConfig {
        cluster_id: inner.cfg.cluster_id.clone(),
        volume_name: volume.to_string(),
        volume_uuid: uuid.to_string(),
        local_node: inner.cfg.node_id,
        peer_node: peer,
        versions: VersionRange::SUPPORTED,
        secret: inner.cfg.secret.clone(),
    };
    let (mut ini, hello) = Initiator::new(cfg, nonce()?)
        .map_err(|e| Failure::new(RefusalReason::Internal, e.to_string()))?;
    write_message(stream, &hello).await?;
    loop {
        let msg = read_message(stream, dec).await?;
        let out = ini.on_message(msg)?;
        if let Some(m) = &out.send {
            write_message(stream, m).await?;
        }
        if let Some(est) = out.established {
            return Ok(est);
        }
    }
}

// ---------------------------------------------------------------------------------------
// An established link

/// Runs an authenticated connection until it goes down: registers it, delivers `PeerUp`,
/// its messages and `PeerDown` in that order.
pub(crate) async fn run_link(
    inner: Arc<Inner>,
    stream: TcpStream,
    mut dec: Decoder,
    est: Established,
    remote: SocketAddr,
    epoch: Option<u64>,
) {
    let t = inner.cfg.timers;
    let peer = est.peer_node;
    let id = inner.next_id();
    let (tx, rx) = mpsc::channel::<Outgoing>(inner.cfg.limits.send_queue_frames);
    let bytes = Arc::new(Semaphore::new(inner.cfg.limits.send_queue_bytes));
    let direct = match Direct::new(stream.as_raw_fd(), Encoder::new(est.version)) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            tracing::warn!(peer = %remote, volume = %est.volume_name, node = peer,
                "dropping replication connection: cannot duplicate its socket: {e}");
            return;
        }
    };
    let (close_tx, mut close_rx) = oneshot::channel::<DownReason>();
    let (done_tx, done_rx) = watch::channel(false);
    let mut slot = Some(LinkSlot {
        id,
        tx: tx.clone(),
        bytes,
        direct: direct.clone(),
        close: Some(close_tx),
        done: done_rx,
        remote,
        version: est.version,
    });

    // Register; an older link of the same pair is closed first (its PeerDown before our
    // PeerUp).
    let volume = loop {
        match inner.install(&est.volume_name, &est.volume_uuid, peer, epoch, &mut slot) {
            Install::Installed(name) => break name,
            Install::Gone(why) => {
                tracing::info!(peer = %remote, volume = %est.volume_name, node = peer,
                    "dropping authenticated replication connection: {why}");
                return;
            }
            Install::Replace(mut old) => {
                if let Some(c) = old.close.take() {
                    let _ = c.send(DownReason::Superseded);
                }
                let mut done = old.done.clone();
                // Its queue sender must go, or its writer waits for more frames.
                drop(old);
                let _ = timeout(t.close_grace * 2, done.wait_for(|d| *d)).await;
            }
        }
    };
    // The writer runs before PeerUp is reported, so that a link reported up can always tell
    // its peer why it goes down. A transport already shutting down never reports this link
    // up; the peer (whose side may be up) still hears why.
    let mut stream = stream;
    if *inner.shutdown.borrow() {
        let bye = Message::Disconnect {
            reason: DisconnectReason::Shutdown,
            detail: truncate(&DownReason::Shutdown.to_string()),
        };
        // The first frame of the established link (the peer may have it up already).
        let first = FrameCounter::new().peek();
        send_closing(
            &mut stream,
            Encoder::new(est.version),
            first,
            &bye,
            t.close_grace,
        )
        .await;
        inner.uninstall(&volume, peer, id);
        let _ = done_tx.send(true);
        return;
    }
    dec.set_version(est.version);
    dec.set_max_payload(MAX_PAYLOAD);
    let (rd, wr) = stream.into_split();
    let (wres_tx, mut wres_rx) = oneshot::channel();
    let enc = Encoder::new(est.version);
    let wdirect = direct.clone();
    let writer = inner.tasks.spawn(async move {
        let r = writer_loop(wr, rx, enc, t.ping_timeout, &wdirect).await;
        wdirect.close();
        let _ = wres_tx.send(r);
    });
    let Some(handle) = writer else {
        // Shutdown began between the check above and the spawn: the write half is gone.
        inner.uninstall(&volume, peer, id);
        let _ = done_tx.send(true);
        return;
    };
    lock(&inner.counters).established += 1;
    tracing::info!(peer = %remote, volume = %volume, node = peer, link = id,
        version = %est.version, "replication link up");
    let _ = inner
        .events
        .send(Event::PeerUp {
            volume: volume.clone(),
            peer,
            link: id,
        })
        .await;
    let mut writer_done = false;
    let reason = {
        {
            let _abort = AbortOnDrop(handle);
            let reason = {
                let reader = reader_loop(&inner, rd, &mut dec, &volume, peer, &tx, &direct);
                tokio::pin!(reader);
                tokio::select! {
                    r = &mut reader => r,
                    r = &mut wres_rx => {
                        writer_done = true;
                        match r {
                            Ok(Err(reason)) => reason,
                            _ => DownReason::Io("the writer stopped".into()),
                        }
                    }
                    r = &mut close_rx => r.unwrap_or(DownReason::Removed),
                }
            };
            // No more sends onto this link; tell the peer why (after what is queued), let
            // the writer drain within the grace period.
            inner.uninstall(&volume, peer, id);
            direct.close();
            if !writer_done && let Some(r) = reason.disconnect() {
                let bye = Message::Disconnect {
                    reason: r,
                    detail: truncate(&reason.to_string()),
                };
                queue_control(&direct, &tx, bye);
            }
            drop(tx);
            if !writer_done {
                let _ = timeout(t.close_grace, &mut wres_rx).await;
            }
            reason
        }
    };
    inner.uninstall(&volume, peer, id);
    match &reason {
        DownReason::Shutdown
        | DownReason::Removed
        | DownReason::Superseded
        | DownReason::PeerDisconnected {
            reason: DisconnectReason::Shutdown | DisconnectReason::ConfigChanged,
            ..
        } => {
            tracing::info!(peer = %remote, volume = %volume, node = peer, link = id,
                "replication link closed: {reason}")
        }
        _ => tracing::warn!(peer = %remote, volume = %volume, node = peer, link = id,
            "replication link down: {reason}"),
    }
    let down = Event::PeerDown {
        volume,
        peer,
        link: id,
        reason,
    };
    if *inner.shutdown.borrow() {
        let _ = inner.events.try_send(down);
    } else {
        let _ = inner.events.send(down).await;
    }
    let _ = done_tx.send(true);
}

/// Tokens of the transport's own keepalive Ping/Pong have this bit set; the transport answers
/// and swallows only those. Ping/Pong with a token below it belong to the consumer (the
/// replication engine's quorum barrier) and are delivered as `PeerMessage` like any message.
pub(crate) const KEEPALIVE_TOKEN: u64 = 1 << 63;

/// Reads frames and delivers them in order; answers keepalive Pings, sends Pings when the peer is
/// silent and declares the link dead after `ping_timeout` without a byte.
async fn reader_loop(
    inner: &Inner,
    mut rd: OwnedReadHalf,
    dec: &mut Decoder,
    volume: &Arc<str>,
    peer: NodeId,
    tx: &mpsc::Sender<Outgoing>,
    direct: &Direct,
) -> DownReason {
    let t = inner.cfg.timers;
    let mut last_rx = Instant::now();
    let mut last_ping = last_rx;
    let mut token: u64 = 0;
    loop {
        loop {
            let msg = match dec.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => return DownReason::Decode(e),
            };
            match msg {
                Message::Ping { token } if token & KEEPALIVE_TOKEN != 0 => {
                    // A full queue means traffic is flowing anyway; the peer sees it.
                    queue_control(direct, tx, Message::Pong { token });
                }
                Message::Pong { token } if token & KEEPALIVE_TOKEN != 0 => {}
                Message::Disconnect { reason, detail } => {
                    return DownReason::PeerDisconnected { reason, detail };
                }
                m if m.message_type().is_handshake() => {
                    return DownReason::Protocol(format!(
                        "{} on an established link",
                        m.message_type()
                    ));
                }
                msg => {
                    let ev = Event::PeerMessage {
                        volume: volume.clone(),
                        peer,
                        msg,
                    };
                    if inner.events.send(ev).await.is_err() {
                        return DownReason::Shutdown;
                    }
                }
            }
        }
        let buf = dec.buffer_mut();
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let deadline = last_rx + t.ping_timeout;
        let next_ping = last_rx.max(last_ping) + t.ping_interval;
        tokio::select! {
            biased;
            r = rd.read_buf(dec.buffer_mut()) => match r {
                Ok(0) => return DownReason::Closed,
                Ok(_) => last_rx = Instant::now(),
                Err(e) => return DownReason::Io(e.to_string()),
            },
            _ = sleep_until(deadline.min(next_ping)) => {
                let now = Instant::now();
                if now >= deadline {
                    return DownReason::Timeout(t.ping_timeout);
                }
                if now >= next_ping {
                    token = token.wrapping_add(1);
                    let msg = Message::Ping { token: token | KEEPALIVE_TOKEN };
                    queue_control(direct, tx, msg);
                    last_ping = now;
                }
            }
        }
    }
}

enum Seg {
    Head(Range<usize>),
    Data(Bytes),
}

/// Takes frames off the queue, encodes a batch (headers and small fields into one buffer,
/// bulk data as its own `Bytes`) and writes it with vectored writes. Ends when every sender
/// is gone (after writing what was queued) or on an error.
async fn writer_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Outgoing>,
    enc: Encoder,
    stall: Duration,
    direct: &Direct,
) -> Result<(), DownReason> {
    let mut heads: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut segs: Vec<Seg> = Vec::with_capacity(2 * MAX_BATCH_FRAMES);
    let mut batch: Vec<Outgoing> = Vec::with_capacity(MAX_BATCH_FRAMES);
    loop {
        let Some(first) = rx.recv().await else {
            let _ = timeout(stall, wr.shutdown()).await;
            return Ok(());
        };
        let mut bytes = frame_cost(&first.msg);
        batch.push(first);
        while batch.len() < MAX_BATCH_FRAMES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(o) => {
                    bytes += frame_cost(&o.msg);
                    batch.push(o);
                }
                Err(_) => break,
            }
        }
        heads.clear();
        segs.clear();
        // Numbers for the frames no direct send started, in queue (= wire) order.
        let fresh = batch.iter().filter(|o| o.seq.is_none()).count();
        let mut next = direct.take_numbers(fresh as u32);
        for o in &batch {
            let start = heads.len();
            let seq = o.seq.unwrap_or_else(|| {
                let s = next;
                next = next.wrapping_add(1);
                s
            });
            let tail = enc
                .encode_vectored_seq(&o.msg, seq, &mut heads)
                .map_err(|e| DownReason::Encode(e.to_string()))?;
            // A direct send wrote the start of this frame: skip it (only ever the first
            // frame of a batch: nothing is queued behind a partial direct send's rest).
            let mut skip = o.skip;
            let head_skip = skip.min(heads.len() - start);
            skip -= head_skip;
            push_head(&mut segs, start + head_skip..heads.len());
            if let Some(data) = tail {
                let data = data.slice(skip.min(data.len())..);
                if data.len() <= INLINE_DATA {
                    let s = heads.len();
                    heads.extend_from_slice(&data);
                    push_head(&mut segs, s..heads.len());
                } else {
                    segs.push(Seg::Data(data));
                }
            }
        }
        write_segments(&mut wr, &heads, &segs, stall).await?;
        direct.written(batch.len());
        // Releases the byte budget of the batch.
        batch.clear();
    }
}

/// Queues a frame of the link itself (keepalive, the closing Disconnect) without waiting; a
/// full queue drops it (traffic is flowing anyway, or the link is going down).
fn queue_control(direct: &Direct, tx: &mpsc::Sender<Outgoing>, msg: Message) {
    direct.queuing();
    let o = Outgoing {
        msg,
        skip: 0,
        seq: None,
        _permit: None,
    };
    if tx.try_send(o).is_err() {
        direct.unqueued();
    }
}

fn push_head(segs: &mut Vec<Seg>, r: Range<usize>) {
    if r.is_empty() {
        return;
    }
    if let Some(Seg::Head(prev)) = segs.last_mut()
        && prev.end == r.start
    {
        prev.end = r.end;
        return;
    }
    segs.push(Seg::Head(r));
}

async fn write_segments(
    wr: &mut OwnedWriteHalf,
    heads: &[u8],
    segs: &[Seg],
    stall: Duration,
) -> Result<(), DownReason> {
    let mut slices: Vec<IoSlice<'_>> = segs
        .iter()
        .map(|s| match s {
            Seg::Head(r) => IoSlice::new(&heads[r.clone()]),
            Seg::Data(b) => IoSlice::new(b),
        })
        .collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = match timeout(stall, wr.write_vectored(rest)).await {
            Err(_) => return Err(DownReason::WriteStalled(stall)),
            Ok(Err(e)) => return Err(DownReason::Io(e.to_string())),
            Ok(Ok(0)) => return Err(DownReason::Io("the socket accepted no bytes".into())),
            Ok(Ok(n)) => n,
        };
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

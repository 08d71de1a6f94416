//! Async NBD server (tokio) over the sans-IO codec in [`crate::handshake`] and
//! [`crate::transmission`].
//!
//! Per connection: the connection task runs the handshake, then reads request headers (and write
//! payloads) and hands requests to a fixed pool of I/O threads, so many requests are in flight at
//! once. Small cached reads are served inline (`RWF_NOWAIT`); small writes to a device with quick
//! writes that arrive together are handed over as one batch, run back to back by one thread. A
//! worker sends its replies straight on the socket when the writer task is idle and the socket
//! has room; otherwise replies go over a channel to the connection's writer task, which writes
//! whatever has queued up with one vectored write (replies leave out of order, payloads are never
//! copied). In-flight work per connection is bounded (count and bytes) by semaphores whose
//! permits travel with the reply and are released once it is written: a client that stops
//! reading replies stops being read from.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_blockdev::{BlockDevice, BlockError, Bytes, ErrorKind, StartWrite, completions};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tracing::{debug, warn};

use crate::handshake::{Catalog, ExportInfo, Handshake, HandshakeError, Negotiated, Progress};
use crate::proto;
use crate::transmission::{self as tx, Command, Decoded, REQUEST_HEADER_LEN, Session};

/// One exported device.
pub struct Export {
    /// Export name clients ask for (the volume name).
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN (true when every connection shares one backing store
    /// whose flush covers all connections' completed writes).
    pub multi_conn: bool,
}

/// Where the server looks up exports; the agent implements it over its replica table, so exports
/// can come and go while the server runs.
pub trait ExportRegistry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<Export>>;
    /// Names for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
}

/// Most requests in flight per connection.
pub const MAX_INFLIGHT_REQUESTS: usize = 128;
/// Most payload bytes (read and write data) in flight per connection.
pub const MAX_INFLIGHT_BYTES: usize = 128 << 20;
/// Accounting unit for the byte budget.
const BYTE_UNIT: usize = 1024;
/// Reads at least this long look for holes first and answer them with `OFFSET_HOLE` chunks.
const HOLE_SCAN_MIN: u32 = 64 << 10;
/// Upper bound of one vectored write batch.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_SLICES: usize = 512;

struct ConnEntry {
    export: Option<String>,
    /// Who is connected: `pid 1234 (qemu-io)` for a unix socket peer, `host:port` for TCP.
    peer: String,
    kill: watch::Sender<bool>,
}

/// The server: shared by every listener; counts connections per export.
pub struct Server {
    registry: Arc<dyn ExportRegistry>,
    conns: Mutex<HashMap<u64, ConnEntry>>,
    next_id: AtomicU64,
    shutdown: watch::Sender<bool>,
    workers: WorkerPool,
}

impl Server {
    /// A server with [`default_workers`] I/O threads.
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Arc<Self> {
        Self::with_workers(registry, default_workers())
    }

    /// A server whose device I/O runs on `workers` dedicated threads (shared by all
    /// connections). Few threads beat many: requests queue instead of contending for the CPU
    /// and the file's locks.
    pub fn with_workers(registry: Arc<dyn ExportRegistry>, workers: usize) -> Arc<Self> {
        Arc::new(Server {
            registry,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shutdown: watch::channel(false).0,
            workers: WorkerPool::new(workers.max(1)),
        })
    }

    /// Accepts clients until the listener fails (or [`Server::shutdown`]); each client runs in
    /// its own task.
    pub async fn serve_unix(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
    ) -> std::io::Result<()> {
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            match accepted {
                Ok((stream, _)) => {
                    let fd = stream.as_raw_fd();
                    let peer = unix_peer(&stream);
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, Some(fd), peer);
                }
                Err(e) => transient_accept_error(e).await?,
            }
        }
    }

    pub async fn serve_tcp(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        let mut stop = self.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = stop.wait_for(|s| *s) => return Ok(()),
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Err(e) = stream.set_nodelay(true) {
                        warn!(%peer, "nbd: cannot set TCP_NODELAY: {e}");
                    }
                    let fd = stream.as_raw_fd();
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, Some(fd), peer.to_string());
                }
                Err(e) => transient_accept_error(e).await?,
            }
        }
    }

    /// Clients currently connected to (past the handshake of) `export`.
    pub fn connections(&self, export: &str) -> u32 {
        self.lock()
            .values()
            .filter(|c| c.export.as_deref() == Some(export))
            .count() as u32
    }

    /// Who is connected to `export` (one entry per connection): `pid N (command)` for unix
    /// socket clients, `host:port` for TCP ones.
    pub fn clients(&self, export: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|c| c.export.as_deref() == Some(export))
            .map(|c| c.peer.clone())
            .collect();
        v.sort();
        v
    }

    /// All open client connections, including those still in the handshake.
    pub fn total_connections(&self) -> u32 {
        self.lock().len() as u32
    }

    /// Closes every connection to `export` (e.g. before the volume is deleted). Requests already
    /// running finish and get their replies first.
    pub fn disconnect_export(&self, export: &str) {
        for c in self.lock().values() {
            if c.export.as_deref() == Some(export) {
                c.kill.send_replace(true);
            }
        }
    }

    /// Stops the listeners and closes every connection (after in-flight requests finish).
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
        for c in self.lock().values() {
            c.kill.send_replace(true);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ConnEntry>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `fd`: the socket under `write`, when there is one: I/O workers then send replies on it
    /// themselves while the writer task is idle (see [`Direct`]).
    fn spawn_connection<R, W>(self: &Arc<Self>, read: R, write: W, fd: Option<RawFd>, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (kill_tx, kill_rx) = watch::channel(*self.shutdown.borrow());
        self.lock().insert(
            id,
            ConnEntry {
                export: None,
                peer: peer.clone(),
                kill: kill_tx,
            },
        );
        let server = self.clone();
        tokio::spawn(async move {
            let _guard = ConnGuard {
                server: server.clone(),
                id,
            };
            match run_connection(&server, id, read, write, fd, kill_rx).await {
                Ok(()) => debug!(conn = id, %peer, "nbd: client disconnected"),
                Err(e) => warn!(conn = id, %peer, "nbd: closing client connection: {e}"),
            }
        });
    }

    fn set_export(&self, id: u64, export: &str) {
        if let Some(c) = self.lock().get_mut(&id) {
            c.export = Some(export.to_string());
        }
    }
}

/// `pid N (command)` of a unix socket peer (SO_PEERCRED), `unix` when unknown.
fn unix_peer(stream: &tokio::net::UnixStream) -> String {
    match stream.peer_cred().ok().and_then(|c| c.pid()) {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm.is_empty() {
                format!("pid {pid}")
            } else {
                format!("pid {pid} ({comm})")
            }
        }
        None => "unix".to_string(),
    }
}

async fn transient_accept_error(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::ConnectionAborted
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::Interrupted => Ok(()),
        _ if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            // EMFILE / ENFILE: back off instead of spinning; connections will close.
            warn!("nbd: accept: {e}; retrying shortly");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            Ok(())
        }
        _ => Err(e),
    }
}

/// Default number of I/O worker threads: four per CPU, between 8 and 64.
pub fn default_workers() -> usize {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cpus * 4).clamp(8, 64)
}

type Job = Box<dyn FnOnce() + Send>;

/// Fixed set of threads running device I/O, fed through one queue. The threads exit when the
/// last handle (the server and its connections) is dropped.
#[derive(Clone)]
struct WorkerPool {
    queue: std::sync::mpsc::Sender<Job>,
}

impl WorkerPool {
    fn new(n: usize) -> WorkerPool {
        let (queue, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-io-{i}"))
                .spawn(move || {
                    loop {
                        let job = {
                            let guard = rx.lock().unwrap_or_else(|e| e.into_inner());
                            guard.recv()
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                warn!("nbd: cannot start I/O thread {i}: {e}");
            }
        }
        WorkerPool { queue }
    }

    fn submit(&self, job: Job) {
        if let Err(e) = self.queue.send(job) {
            // No worker thread could be started at all; run the job here rather than lose it.
            (e.0)();
        }
    }
}

/// Removes the connection from the table when its task ends (however it ends).
struct ConnGuard {
    server: Arc<Server>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.server.lock().remove(&self.id);
    }
}

/// Why a client connection was closed by the server.
#[derive(Debug, Error)]
pub enum ConnError {
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("client closed the connection during the handshake")]
    HandshakeEof,
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
    #[error("client closed the connection in the middle of a request")]
    Truncated,
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("sending replies failed: {0}")]
    Writer(io::Error),
}

struct RegistryCatalog<'a>(&'a dyn ExportRegistry);

impl Catalog for RegistryCatalog<'_> {
    type Handle = Arc<Export>;
    fn lookup(&self, name: &str) -> Option<(Arc<Export>, ExportInfo)> {
        let e = self.0.lookup(name)?;
        let info = ExportInfo {
            name: e.name.clone(),
            description: e.description.clone(),
            size: e.device.size(),
            read_only: e.read_only,
            multi_conn: e.multi_conn,
        };
        Some((e, info))
    }
    fn list(&self) -> Vec<String> {
        self.0.list()
    }
}

async fn run_connection<R, W>(
    server: &Arc<Server>,
    id: u64,
    mut read: R,
    mut write: W,
    fd: Option<RawFd>,
    mut kill: watch::Receiver<bool>,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut hs = Handshake::new();
    let catalog = RegistryCatalog(&*server.registry);
    let mut buf = vec![0u8; 16 << 10];
    let negotiated: Box<Negotiated<Arc<Export>>> = loop {
        let out = hs.take_output();
        if !out.is_empty() {
            write.write_all(&out).await?;
        }
        let n = tokio::select! {
            r = read.read(&mut buf) => r?,
            _ = kill.wait_for(|k| *k) => return Ok(()),
        };
        if n == 0 {
            return Err(ConnError::HandshakeEof);
        }
        match hs.feed(&buf[..n], &catalog)? {
            Progress::NeedMore => {}
            Progress::Abort => {
                write.write_all(&hs.take_output()).await?;
                let _ = write.shutdown().await;
                return Ok(());
            }
            Progress::Done(n) => {
                // Counted before the client can see the handshake finish.
                server.set_export(id, &n.info.name);
                write.write_all(&hs.take_output()).await?;
                break n;
            }
        }
    };
    debug!(conn = id, export = %negotiated.info.name, structured = negotiated.structured,
           "nbd: client entered transmission");
    let leftover = hs.take_leftover();
    let reader = BufReader::with_capacity(256 << 10, io::Cursor::new(leftover).chain(read));
    transmission(reader, write, fd, *negotiated, kill, server.workers.clone()).await
}

/// A piece of an encoded reply.
enum Part {
    Head { buf: [u8; 32], len: u8 },
    Data(Vec<u8>),
}

impl Part {
    fn head(bytes: &[u8]) -> Part {
        if bytes.len() > 32 {
            return Part::Data(bytes.to_vec());
        }
        let mut buf = [0u8; 32];
        buf[..bytes.len()].copy_from_slice(bytes);
        Part::Head {
            buf,
            len: bytes.len() as u8,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Part::Head { buf, len } => &buf[..*len as usize],
            Part::Data(v) => v,
        }
    }
}

/// One reply (or the replies of one batch) on its way to the writer, holding the in-flight
/// permits the requests consumed.
struct Out {
    parts: Vec<Part>,
    /// `None` only for the empty message that wakes the writer task for a `front` reply.
    _permits: Option<Permits>,
    /// The other requests' permits when `parts` holds the replies of a batch.
    _more: Vec<Permits>,
}

impl Out {
    fn one(parts: Vec<Part>, permits: Permits) -> Out {
        Out {
            parts,
            _permits: Some(permits),
            _more: Vec::new(),
        }
    }

    /// Returns the data buffers to the pool (the permits go when `self` is dropped).
    fn recycle(self, pool: &BufPool) {
        for p in self.parts {
            if let Part::Data(v) = p {
                pool.put(v);
            }
        }
    }
}

struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// Recycles data buffers within a connection so steady-state I/O neither allocates nor zeroes.
#[derive(Default)]
struct BufPool {
    inner: Mutex<(Vec<Vec<u8>>, usize)>,
}

const POOL_MAX_BUFFERS: usize = 64;
const POOL_MAX_BYTES: usize = 64 << 20;

impl BufPool {
    fn get(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (bufs, bytes) = &mut *g;
            match bufs.iter().rposition(|b| b.capacity() >= len) {
                Some(i) => {
                    let b = bufs.swap_remove(i);
                    *bytes -= b.capacity();
                    Some(b)
                }
                None => None,
            }
        };
        match found {
            Some(mut b) => {
                if b.len() >= len {
                    b.truncate(len);
                } else {
                    b.resize(len, 0);
                }
                b
            }
            None => vec![0u8; len],
        }
    }

    /// An empty buffer with room for `len` bytes (a recycled one, or a new one that is not
    /// zero-filled).
    fn get_empty(&self, len: usize) -> Vec<u8> {
        let found = {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let (bufs, bytes) = &mut *g;
            bufs.iter().rposition(|b| b.capacity() >= len).map(|i| {
                let b = bufs.swap_remove(i);
                *bytes -= b.capacity();
                b
            })
        };
        match found {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(len),
        }
    }

    /// `buf` as [`Bytes`] that returns to this pool when its last reference drops: a write
    /// handed to an asynchronous device (which keeps it until the write is done everywhere)
    /// recycles its buffer too, so steady 1 MiB writes neither allocate nor fault in pages
    /// (a fresh 1 MiB buffer per write cost page faults, zeroing and `madvise` trimming: about
    /// a third of the replicated 1M write path's CPU).
    fn bytes(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn put(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap < 4096 {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (bufs, bytes) = &mut *g;
        if bufs.len() < POOL_MAX_BUFFERS && *bytes + cap <= POOL_MAX_BYTES {
            *bytes += cap;
            bufs.push(b);
        }
    }
}

/// A pooled buffer behind a [`Bytes`] ([`BufPool::bytes`]).
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

struct Shared {
    export: Arc<Export>,
    session: Session,
    pool: Arc<BufPool>,
    direct: Option<Direct>,
    /// Replies to asynchronous writes completed in the device's current completion group,
    /// sent together when it ends (see [`reply_grouped`]).
    held: Mutex<Vec<Out>>,
}

/// Replies sent by the I/O workers straight onto the socket, saving the hop through the writer
/// task (a thread wake-up per reply at low queue depth).
///
/// A worker sends with a non-blocking `sendmsg` while holding `state`, and only when the writer
/// task is not writing (`busy`), so replies never interleave. What does not fit goes to the
/// writer task: untouched replies through the channel as usual; the rest of a partly sent one in
/// `front`, which the writer sends before anything else (and no worker sends meanwhile). The
/// writer task sets `closed` before the socket can be closed, so the fd is never used after.
struct Direct {
    fd: RawFd,
    state: Mutex<DirectState>,
}

#[derive(Default)]
struct DirectState {
    busy: bool,
    closed: bool,
    /// A reply a worker sent in part, and how many of its bytes are out.
    front: Option<(Out, usize)>,
}

impl Direct {
    fn lock(&self) -> std::sync::MutexGuard<'_, DirectState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Largest reply a worker sends itself; larger ones (1 MiB reads) rarely fit the socket buffer
/// at once and go to the writer task, which waits for room without holding a thread.
const DIRECT_MAX: usize = 256 << 10;

/// Sends a reply from an I/O worker: directly on the socket when possible, else via the writer.
fn reply(sh: &Shared, out_tx: &mpsc::UnboundedSender<Out>, out: Out) {
    let Some(d) = &sh.direct else {
        let _ = out_tx.send(out);
        return;
    };
    let total: usize = out.parts.iter().map(|p| p.bytes().len()).sum();
    let mut st = d.lock();
    if st.busy || st.closed || total > DIRECT_MAX {
        drop(st);
        let _ = out_tx.send(out);
        return;
    }
    match send_nonblocking(d.fd, &out.parts) {
        Ok(n) if n == total => {
            drop(st);
            out.recycle(&sh.pool);
        }
        Ok(n) if n > 0 => {
            // The socket is full mid-reply: the writer task sends the rest first, when the
            // client reads again.
            st.front = Some((out, n));
            st.busy = true;
            drop(st);
            let _ = out_tx.send(Out {
                parts: Vec::new(),
                _permits: None,
                _more: Vec::new(),
            });
        }
        // Nothing sent (socket full, or an error the writer task will meet and report).
        _ => {
            drop(st);
            let _ = out_tx.send(out);
        }
    }
}

/// Sends the reply to an asynchronous write. Inside a completion group of the device
/// (`tandem_blockdev::completions`: a replicated volume completes every write a batch of
/// acknowledgements covers in one), the reply is held and the connection's held replies go
/// out together when the group ends: one `sendmsg` and one wake-up of the client instead of
/// one per write. Outside a group it goes out at once.
fn reply_grouped(sh: &Arc<Shared>, out_tx: &mpsc::UnboundedSender<Out>, out: Out) {
    let first = {
        let mut held = lock_held(sh);
        held.push(out);
        held.len() == 1
    };
    // The first reply held registers the send; later ones ride along (also those of another
    // thread's group, whichever ends first sends them).
    if first {
        let (sh2, tx2) = (sh.clone(), out_tx.clone());
        if completions::after_group(Box::new(move || send_held(&sh2, &tx2))).is_err() {
            send_held(sh, out_tx);
        }
    }
}

fn lock_held(sh: &Shared) -> std::sync::MutexGuard<'_, Vec<Out>> {
    sh.held.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends every held reply as one.
fn send_held(sh: &Shared, out_tx: &mpsc::UnboundedSender<Out>) {
    let held = std::mem::take(&mut *lock_held(sh));
    let mut it = held.into_iter();
    let Some(mut all) = it.next() else { return };
    for out in it {
        all.parts.extend(out.parts);
        all._more.extend(out._permits);
        all._more.extend(out._more);
    }
    reply(sh, out_tx, all);
}

/// One non-blocking `sendmsg` of `parts`; bytes sent (0 when the socket buffer is full).
fn send_nonblocking(fd: RawFd, parts: &[Part]) -> io::Result<usize> {
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|p| p.bytes())
        .filter(|b| !b.is_empty())
        .take(1024)
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast_mut().cast(),
            iov_len: b.len(),
        })
        .collect();
    if iov.is_empty() {
        return Ok(0);
    }
    loop {
        // SAFETY: a zeroed msghdr is valid (no name, no control data); it points at `iov`,
        // whose entries point at buffers `parts` keeps alive for the call and that the kernel
        // only reads. `fd` is the connection's socket, open while the caller holds the
        // `Direct` lock with `closed` unset.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_ptr().cast_mut();
            msg.msg_iovlen = iov.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(0),
            _ => return Err(e),
        }
    }
}

async fn transmission<R, W>(
    mut reader: BufReader<R>,
    write: W,
    fd: Option<RawFd>,
    neg: Negotiated<Arc<Export>>,
    mut kill: watch::Receiver<bool>,
    workers: WorkerPool,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared {
        session: Session {
            size: neg.info.size,
            read_only: neg.info.read_only,
            structured: neg.structured,
            allocation_context: neg.allocation_context,
        },
        export: neg.export,
        pool: Arc::new(BufPool::default()),
        direct: fd.map(|fd| Direct {
            fd,
            state: Mutex::new(DirectState::default()),
        }),
        held: Mutex::new(Vec::new()),
    });
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Out>();
    let (werr_tx, mut werr_rx) = oneshot::channel::<io::Error>();
    let writer = tokio::spawn(writer_loop(write, out_rx, shared.clone(), werr_tx));
    let count = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES / BYTE_UNIT));

    // Small writes on a device with quick writes are collected while the next request is
    // already buffered, then run back to back by one worker (one hand-off and one reply wake-up
    // per batch instead of per request, and no threads contending for the file's lock).
    let batching = shared.export.device.quick_writes();
    let async_writes = shared.export.device.async_writes();
    let mut batch: Vec<Queued> = Vec::new();
    let mut batch_bytes = 0usize;
    // Writes to a device with asynchronous writes found together in the read buffer: started
    // with one call once the buffer holds no further request (a replicated volume then sends
    // their frames to a peer together).
    let mut started: Vec<StartWrite> = Vec::new();
    let result: Result<(), ConnError> = async {
        loop {
            if !batch.is_empty() && !next_request_buffered(reader.buffer()) {
                submit_batch(&workers, &shared, &out_tx, &mut batch);
                batch_bytes = 0;
            }
            if !started.is_empty() && !next_request_buffered(reader.buffer()) {
                shared
                    .export
                    .device
                    .start_writes(std::mem::take(&mut started));
            }
            let mut hdr = [0u8; REQUEST_HEADER_LEN];
            let got = tokio::select! {
                r = read_header(&mut reader, &mut hdr) => r?,
                _ = kill.wait_for(|k| *k) => return Ok(()),
                e = &mut werr_rx => return Err(match e {
                    Ok(e) => ConnError::Writer(e),
                    Err(_) => ConnError::Protocol("reply writer stopped"),
                }),
            };
            if !got {
                return Ok(());
            }
            let Some(h) = tx::parse_request(&hdr) else {
                return Err(ConnError::BadMagic(u32::from_be_bytes([
                    hdr[0], hdr[1], hdr[2], hdr[3],
                ])));
            };
            let decoded = tx::decode(&h, &shared.session);
            let cost = match decoded {
                Decoded::Ok(Command::Read { len, .. } | Command::Write { len, .. }) => {
                    (len as usize).div_ceil(BYTE_UNIT).max(1)
                }
                _ => 1,
            };
            let short = count.available_permits() == 0
                || bytes.available_permits() < cost.min(MAX_INFLIGHT_BYTES / BYTE_UNIT);
            if short && !batch.is_empty() {
                // Waiting for permits while holding queued writes' permits could wait forever.
                submit_batch(&workers, &shared, &out_tx, &mut batch);
                batch_bytes = 0;
            }
            let is_write = matches!(decoded, Decoded::Ok(Command::Write { .. }));
            if !started.is_empty() && (short || !async_writes || !is_write) {
                // The same for writes not started yet; and whatever else comes runs after
                // the writes before it were started.
                shared
                    .export
                    .device
                    .start_writes(std::mem::take(&mut started));
            }
            let permits = tokio::select! {
                p = acquire(&count, &bytes, cost) => p,
                _ = kill.wait_for(|k| *k) => return Ok(()),
            };
            match decoded {
                Decoded::Close(reason) => return Err(ConnError::Protocol(reason)),
                Decoded::Reject {
                    errno,
                    skip,
                    reason,
                } => {
                    debug!(
                        handle = h.handle,
                        kind = h.kind,
                        offset = h.offset,
                        length = h.length,
                        errno,
                        "nbd: rejecting request: {reason}"
                    );
                    if skip > 0 {
                        let n = tokio::io::copy(
                            &mut (&mut reader).take(skip as u64),
                            &mut tokio::io::sink(),
                        )
                        .await?;
                        if n != skip as u64 {
                            return Err(ConnError::Truncated);
                        }
                    }
                    let reply = tx::error_reply(shared.session.structured, h.handle, errno, reason);
                    let _ = out_tx.send(Out::one(vec![Part::Data(reply)], permits));
                }
                Decoded::Ok(Command::Disconnect) => return Ok(()),
                Decoded::Ok(cmd) => {
                    let payload = match cmd {
                        Command::Write { len, .. } => {
                            // Read into spare capacity: a buffer that is not recycled (an
                            // asynchronous write keeps it) is never zero-filled first.
                            let len = len as usize;
                            let mut buf = shared.pool.get_empty(len);
                            while buf.len() < len {
                                let want = (len - buf.len()) as u64;
                                match (&mut reader).take(want).read_buf(&mut buf).await {
                                    Ok(0) => return Err(ConnError::Truncated),
                                    Ok(_) => {}
                                    Err(e) => return Err(e.into()),
                                }
                            }
                            Some(buf)
                        }
                        _ => None,
                    };
                    let handle = h.handle;
                    if let (true, Command::Write { offset, fua, .. }, Some(data)) =
                        (async_writes, &cmd, &payload)
                        && !data.is_empty()
                    {
                        // Started from here and answered by the device's completion: no
                        // worker thread waits for the write.
                        let (sh, out) = (shared.clone(), out_tx.clone());
                        let (offset, fua) = (*offset, *fua);
                        let data = shared.pool.bytes(payload.unwrap_or_default());
                        started.push(StartWrite {
                            data,
                            offset,
                            fua,
                            done: Box::new(move |r| {
                                let part = status_part(sh.session.structured, handle, r);
                                reply_grouped(&sh, &out, Out::one(vec![part], permits));
                            }),
                        });
                        if started.len() >= BATCH_MAX_WRITES {
                            shared
                                .export
                                .device
                                .start_writes(std::mem::take(&mut started));
                        }
                        continue;
                    }
                    let (payload, inline) = try_inline(&shared, &cmd, handle, payload);
                    if let Some(parts) = inline {
                        let _ = out_tx.send(Out::one(parts, permits));
                        continue;
                    }
                    if let (
                        true,
                        Command::Write {
                            offset, fua: false, ..
                        },
                        Some(data),
                    ) = (batching, &cmd, &payload)
                        && data.len() <= BATCH_WRITE_MAX
                    {
                        batch_bytes += data.len();
                        batch.push(Queued {
                            handle,
                            offset: *offset,
                            data: payload.unwrap_or_default(),
                            permits,
                        });
                        if batch.len() >= BATCH_MAX_WRITES || batch_bytes >= BATCH_MAX_BYTES {
                            submit_batch(&workers, &shared, &out_tx, &mut batch);
                            batch_bytes = 0;
                        }
                        continue;
                    }
                    let shared = shared.clone();
                    let out_tx = out_tx.clone();
                    workers.submit(Box::new(move || {
                        let parts = execute(&shared, cmd, handle, payload);
                        reply(&shared, &out_tx, Out::one(parts, permits));
                    }));
                }
            }
        }
    }
    .await;

    // Queued writes run and are answered like every request already read.
    if !batch.is_empty() {
        submit_batch(&workers, &shared, &out_tx, &mut batch);
    }
    if !started.is_empty() {
        shared.export.device.start_writes(started);
    }
    // Let running requests finish and their replies go out, then close.
    drop(out_tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if result.is_ok() => return Err(ConnError::Writer(e)),
        Ok(Err(_)) => {}
        Err(e) => warn!("nbd: reply writer task failed: {e}"),
    }
    result
}

/// Most writes per batch, and most payload bytes.
const BATCH_MAX_WRITES: usize = 64;
const BATCH_MAX_BYTES: usize = 1 << 20;
/// Largest write that joins a batch; larger ones run on their own worker, concurrently.
const BATCH_WRITE_MAX: usize = 64 << 10;

/// A small write waiting for its batch to be submitted.
struct Queued {
    handle: u64,
    offset: u64,
    data: Vec<u8>,
    permits: Permits,
}

/// Whether the next request (header and, for a write, its payload) is already in the read
/// buffer, so reading it will not wait for the client.
fn next_request_buffered(buf: &[u8]) -> bool {
    if buf.len() < REQUEST_HEADER_LEN {
        return false;
    }
    let kind = u16::from_be_bytes([buf[6], buf[7]]);
    if kind != proto::CMD_WRITE {
        return true;
    }
    let len = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]) as usize;
    buf.len() - REQUEST_HEADER_LEN >= len
}

/// Hands the queued writes to one worker, which writes them in order and sends all their
/// replies at once.
fn submit_batch(
    workers: &WorkerPool,
    shared: &Arc<Shared>,
    out_tx: &mpsc::UnboundedSender<Out>,
    batch: &mut Vec<Queued>,
) {
    let jobs = std::mem::take(batch);
    if jobs.is_empty() {
        return;
    }
    let shared = shared.clone();
    let out_tx = out_tx.clone();
    workers.submit(Box::new(move || {
        let dev = &*shared.export.device;
        let structured = shared.session.structured;
        let mut parts = Vec::with_capacity(jobs.len());
        let mut more = Vec::with_capacity(jobs.len());
        for q in jobs {
            let r = dev.write_at(&q.data, q.offset);
            shared.pool.put(q.data);
            parts.push(status_part(structured, q.handle, r));
            more.push(q.permits);
        }
        let out = Out {
            parts,
            _permits: None,
            _more: more,
        };
        reply(&shared, &out_tx, out);
    }));
}

/// The reply to a request that returns no data: OK or the device error.
fn status_part(structured: bool, handle: u64, r: tandem_blockdev::Result<()>) -> Part {
    match r {
        Ok(()) if structured => Part::head(&tx::none_chunk(handle)),
        Ok(()) => Part::head(&tx::simple_reply(handle, 0)),
        Err(e) => {
            warn!("nbd: device error: {e}");
            Part::Data(tx::error_reply(
                structured,
                handle,
                nbd_errno(&e),
                &e.to_string(),
            ))
        }
    }
}

async fn acquire(count: &Arc<Semaphore>, bytes: &Arc<Semaphore>, cost: usize) -> Permits {
    // The semaphores are never closed, so acquiring cannot fail; fall back to fresh permits
    // from a throwaway semaphore rather than panicking if that ever changed.
    let c = match count.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => fallback_permit(1),
    };
    let cost = cost.min(MAX_INFLIGHT_BYTES / BYTE_UNIT) as u32;
    let b = match bytes.clone().acquire_many_owned(cost).await {
        Ok(p) => p,
        Err(_) => fallback_permit(cost),
    };
    Permits {
        _count: c,
        _bytes: b,
    }
}

fn fallback_permit(n: u32) -> OwnedSemaphorePermit {
    let s = Arc::new(Semaphore::new(n as usize));
    match s.try_acquire_many_owned(n) {
        Ok(p) => p,
        Err(_) => unreachable!("a fresh semaphore has the permits"),
    }
}

/// Reads one request header. `Ok(false)` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    hdr: &mut [u8; REQUEST_HEADER_LEN],
) -> Result<bool, ConnError> {
    let mut got = 0;
    while got < hdr.len() {
        let n = r.read(&mut hdr[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(ConnError::Truncated)
            };
        }
        got += n;
    }
    Ok(true)
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    werr: oneshot::Sender<io::Error>,
) -> io::Result<()> {
    let mut batch: Vec<Out> = Vec::new();
    let result: io::Result<()> = async {
        while let Some(first) = rx.recv().await {
            let mut size: usize = first.parts.iter().map(|p| p.bytes().len()).sum();
            let mut slices = first.parts.len();
            batch.push(first);
            while size < BATCH_BYTES && slices < BATCH_SLICES {
                match rx.try_recv() {
                    Ok(out) => {
                        size += out.parts.iter().map(|p| p.bytes().len()).sum::<usize>();
                        slices += out.parts.len();
                        batch.push(out);
                    }
                    Err(_) => break,
                }
            }
            let mut sent = 0;
            if let Some(d) = &shared.direct {
                // Workers stop sending directly until this batch is out; a reply one of them
                // sent in part goes first, from where it stopped.
                let mut st = d.lock();
                st.busy = true;
                if let Some((f, n)) = st.front.take() {
                    batch.insert(0, f);
                    sent = n;
                }
            }
            write_all_vectored(&mut w, &batch, sent).await?;
            for out in batch.drain(..) {
                out.recycle(&shared.pool);
            }
            if let Some(d) = &shared.direct {
                d.lock().busy = false;
            }
        }
        if let Some(d) = &shared.direct {
            d.lock().closed = true;
        }
        w.flush().await?;
        let _ = w.shutdown().await;
        Ok(())
    }
    .await;
    // From here on the socket may close: no worker may send on it any more.
    if let Some(d) = &shared.direct {
        d.lock().closed = true;
    }
    if let Err(e) = &result {
        let _ = werr.send(io::Error::new(e.kind(), e.to_string()));
    }
    result
}

/// Writes `batch` except its first `sent` bytes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    batch: &[Out],
    sent: usize,
) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = batch
        .iter()
        .flat_map(|o| o.parts.iter())
        .map(|p| IoSlice::new(p.bytes()))
        .filter(|s| !s.is_empty())
        .collect();
    let mut rest: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut rest, sent);
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// Largest read or write tried inline on the connection's task.
const INLINE_MAX: u32 = 64 << 10;

/// Small reads and (non-FUA) writes whose data is in the page cache complete in a couple of
/// microseconds: cheaper than handing them to a worker thread and back. They are tried with
/// `RWF_NOWAIT` right here; anything that would block (cache miss, writeback throttling, FUA)
/// goes to the worker pool as before. Returns the payload back when the request was not done.
fn try_inline(
    sh: &Shared,
    cmd: &Command,
    handle: u64,
    payload: Option<Vec<u8>>,
) -> (Option<Vec<u8>>, Option<Vec<Part>>) {
    let dev = &*sh.export.device;
    match *cmd {
        Command::Read { offset, len, .. } if len > 0 && len <= INLINE_MAX => {
            let mut buf = sh.pool.get(len as usize);
            match dev.try_read_at_nowait(&mut buf, offset) {
                Ok(true) => {
                    let head = if sh.session.structured {
                        Part::head(&tx::offset_data_header(handle, offset, len, true))
                    } else {
                        Part::head(&tx::simple_reply(handle, 0))
                    };
                    (payload, Some(vec![head, Part::Data(buf)]))
                }
                // Would block, or failed: the worker retries and reports errors the usual way.
                Ok(false) | Err(_) => {
                    sh.pool.put(buf);
                    (payload, None)
                }
            }
        }
        Command::Write {
            offset,
            len,
            fua: false,
        } if len <= INLINE_MAX => {
            let Some(buf) = payload else {
                return (None, None);
            };
            match dev.try_write_at_nowait(&buf, offset) {
                Ok(true) => {
                    sh.pool.put(buf);
                    (
                        None,
                        Some(vec![status_part(sh.session.structured, handle, Ok(()))]),
                    )
                }
                Ok(false) | Err(_) => (Some(buf), None),
            }
        }
        _ => (payload, None),
    }
}

/// NBD error value for a device error.
fn nbd_errno(e: &BlockError) -> u32 {
    match e.kind {
        ErrorKind::OutOfRange => proto::EINVAL,
        ErrorKind::NoSpace => proto::ENOSPC,
        ErrorKind::Unsupported => proto::EINVAL,
        _ => proto::EIO,
    }
}

/// Runs one request on a blocking thread and encodes its reply.
fn execute(sh: &Shared, cmd: Command, handle: u64, payload: Option<Vec<u8>>) -> Vec<Part> {
    let dev = &*sh.export.device;
    let structured = sh.session.structured;
    let status = |r: tandem_blockdev::Result<()>| vec![status_part(structured, handle, r)];
    let fua_flush = |fua: bool| if fua { dev.flush() } else { Ok(()) };
    match cmd {
        Command::Read { offset, len, df } => read(sh, handle, offset, len, df),
        Command::Write { offset, fua, .. } => {
            let buf = payload.unwrap_or_default();
            let r = dev.write_at(&buf, offset).and_then(|()| fua_flush(fua));
            sh.pool.put(buf);
            status(r)
        }
        Command::Flush => status(dev.flush()),
        Command::Trim { offset, len, fua } => {
            let r = match dev.trim(offset, len as u64) {
                // TRIM is advisory: a store that cannot discard has done its job.
                Err(e) if e.kind == ErrorKind::Unsupported => Ok(()),
                other => other,
            };
            status(r.and_then(|()| fua_flush(fua)))
        }
        Command::Cache { .. } => status(Ok(())),
        Command::WriteZeroes {
            offset,
            len,
            fua,
            no_hole,
            fast,
        } => {
            if fast && no_hole {
                // Keeping the range allocated may mean writing zeroes by hand on this store; we
                // cannot promise that is faster than a write, so fail fast as the spec asks.
                return vec![Part::Data(tx::error_reply(
                    structured,
                    handle,
                    proto::ENOTSUP,
                    "fast zero with NO_HOLE is not supported",
                ))];
            }
            let r = dev
                .write_zeroes(offset, len as u64, !no_hole)
                .and_then(|()| fua_flush(fua));
            status(r)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
            context,
        } => match dev.block_status(offset, len as u64) {
            Ok(extents) => {
                let ext: Vec<tx::Extent> = extents
                    .iter()
                    .map(|e| tx::Extent {
                        length: e.length,
                        flags: (if e.hole { proto::STATE_HOLE } else { 0 })
                            | (if e.zero { proto::STATE_ZERO } else { 0 }),
                    })
                    .collect();
                let mut d = tx::descriptors(&ext, len, req_one);
                if d.is_empty() {
                    // The device said nothing useful: "allocated, contents unknown" is always safe.
                    d.push((len, 0));
                }
                vec![Part::Data(tx::block_status_chunk(handle, context, &d))]
            }
            Err(e) => status(Err(e)),
        },
        Command::Disconnect => Vec::new(),
    }
}

fn read(sh: &Shared, handle: u64, offset: u64, len: u32, df: bool) -> Vec<Part> {
    let dev = &*sh.export.device;
    let err = |e: BlockError| {
        warn!("nbd: device error: {e}");
        vec![Part::Data(tx::error_reply(
            sh.session.structured,
            handle,
            nbd_errno(&e),
            &e.to_string(),
        ))]
    };
    if !sh.session.structured {
        let mut buf = sh.pool.get(len as usize);
        return match dev.read_at(&mut buf, offset) {
            Ok(()) => vec![Part::head(&tx::simple_reply(handle, 0)), Part::Data(buf)],
            Err(e) => {
                sh.pool.put(buf);
                err(e)
            }
        };
    }
    if len == 0 {
        return vec![Part::head(&tx::none_chunk(handle))];
    }
    let sparse = if !df && len >= HOLE_SCAN_MIN {
        sparse_read(sh, handle, offset, len)
    } else {
        None
    };
    if let Some(parts) = sparse {
        return parts;
    }
    let mut buf = sh.pool.get(len as usize);
    match dev.read_at(&mut buf, offset) {
        // The whole chunk is in memory, so no error can follow: it may carry the DONE flag.
        Ok(()) => vec![
            Part::head(&tx::offset_data_header(handle, offset, len, true)),
            Part::Data(buf),
        ],
        Err(e) => {
            sh.pool.put(buf);
            err(e)
        }
    }
}

/// A structured read that answers known-zero extents with `OFFSET_HOLE` chunks. `None` when the
/// range has no zero extent (or block status failed): the caller does a plain read.
fn sparse_read(sh: &Shared, handle: u64, offset: u64, len: u32) -> Option<Vec<Part>> {
    let dev = &*sh.export.device;
    let extents = dev.block_status(offset, len as u64).ok()?;
    if !extents.iter().any(|e| e.zero) {
        return None;
    }
    // (offset, length, zero) pieces covering the request; the tail the device did not describe
    // is read as data.
    let end = offset + len as u64;
    let mut pieces: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    for e in &extents {
        if pos >= end {
            break;
        }
        let l = e.length.min(end - pos);
        if l == 0 {
            continue;
        }
        match pieces.last_mut() {
            Some(last) if last.2 == e.zero => last.1 += l,
            _ => pieces.push((pos, l, e.zero)),
        }
        pos += l;
    }
    if pos < end {
        match pieces.last_mut() {
            Some(last) if !last.2 => last.1 += end - pos,
            _ => pieces.push((pos, end - pos, false)),
        }
    }
    let mut parts = Vec::with_capacity(pieces.len() * 2);
    let n = pieces.len();
    for (i, (off, l, zero)) in pieces.into_iter().enumerate() {
        let done = i + 1 == n;
        if zero {
            parts.push(Part::head(&tx::offset_hole_chunk(
                handle, off, l as u32, done,
            )));
        } else {
            let mut buf = sh.pool.get(l as usize);
            if let Err(e) = dev.read_at(&mut buf, off) {
                warn!("nbd: device error: {e}");
                sh.pool.put(buf);
                return Some(vec![Part::Data(tx::error_reply(
                    true,
                    handle,
                    nbd_errno(&e),
                    &e.to_string(),
                ))]);
            }
            parts.push(Part::head(&tx::offset_data_header(
                handle, off, l as u32, done,
            )));
            parts.push(Part::Data(buf));
        }
    }
    Some(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pooled_write_buffer_returns_when_its_last_reference_drops() {
        let pool = Arc::new(BufPool::default());
        let mut buf = pool.get_empty(1 << 20);
        buf.resize(1 << 20, 7);
        let ptr = buf.as_ptr();
        let data = pool.bytes(buf);
        let kept = data.slice(4096..8192); // e.g. a device keeping part of it
        drop(data);
        assert_eq!(pool.inner.lock().unwrap().0.len(), 0, "still referenced");
        assert_eq!(kept[0], 7);
        drop(kept);
        let again = pool.get_empty(1 << 20);
        assert_eq!(again.as_ptr(), ptr, "the same buffer, recycled");
        assert!(again.is_empty());
    }
}

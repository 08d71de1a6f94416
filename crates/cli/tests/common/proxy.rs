//! A fault-injecting TCP proxy in front of an agent's replication listener, for partition
//! tests. The agent advertises the proxy's address (`repl_advertise`), so its peers dial the
//! proxy, which forwards to the agent's real listener.
//!
//! The lower node id dials the higher one, so one node's proxy carries links from several
//! dialers. The proxy reads the dialer's first frame (the handshake's `Hello`, decoded with
//! `tandem-repl-proto`), which names the dialing node, the node it wants and the volume, and
//! only then connects to the agent. A [`Net`] holds the proxies of one cluster and the faults
//! they share, per node: *isolated* (a link with that node at either end is cut, both sockets
//! shut down, and new ones are refused right after their `Hello`) or *frozen* (a black hole:
//! its links stay open but nothing is forwarded, so only keepalive timeouts notice; new ones
//! are held without an answer). The controller link is HTTP and never passes through a proxy.
//! Everything is torn down on drop (every socket shut down, every thread joined).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tandem_repl_proto::{Decoder, MAX_HANDSHAKE_PAYLOAD, Message};

/// How long a client may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection the proxy saw, identified by its `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkRecord {
    /// The dialing node (`Hello::from_node`).
    pub from: u8,
    /// The node the dialer wants (`Hello::to_node`).
    pub to: u8,
    pub volume: String,
    /// Refused at once because one end was isolated.
    pub refused: bool,
    /// Held without an answer because one end was frozen.
    pub held: bool,
}

/// Faults shared by the proxies of one [`Net`].
#[derive(Default)]
struct Faults {
    isolated: BTreeSet<u8>,
    frozen: BTreeSet<u8>,
    /// Pairs (lower id first) cut from each other only.
    pairs: BTreeSet<(u8, u8)>,
}

impl Faults {
    fn cut(&self, a: u8, b: u8) -> bool {
        self.isolated.contains(&a)
            || self.isolated.contains(&b)
            || self.pairs.contains(&(a.min(b), a.max(b)))
    }
    fn frozen(&self, a: u8, b: u8) -> bool {
        self.frozen.contains(&a) || self.frozen.contains(&b)
    }
}

/// The faults and a condition variable notified on every change (and on teardown).
type SharedFaults = Arc<(Mutex<Faults>, Condvar)>;

struct Conn {
    id: u64,
    from: u8,
    sockets: [TcpStream; 2],
    closed: Arc<AtomicBool>,
}

struct Shared {
    /// Node id of the agent behind this proxy.
    node: u8,
    target: SocketAddr,
    faults: SharedFaults,
    stop: AtomicBool,
    /// Forwarded connections still open.
    conns: Mutex<Vec<Conn>>,
    next_id: Mutex<u64>,
    /// Every socket ever accepted or opened, shut down on drop (wakes blocked threads).
    sockets: Mutex<Vec<TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    records: Mutex<Vec<LinkRecord>>,
}

impl Shared {
    fn faults(&self) -> MutexGuard<'_, Faults> {
        lock(&self.faults.0)
    }

    /// Shuts down every forwarded connection that `pred` selects.
    fn cut_where(&self, pred: impl Fn(&Conn) -> bool) -> usize {
        let mut conns = lock(&self.conns);
        let mut n = 0;
        conns.retain(|c| {
            if pred(c) {
                c.closed.store(true, Ordering::SeqCst);
                for s in &c.sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
                n += 1;
                false
            } else {
                true
            }
        });
        drop(conns);
        self.faults.1.notify_all();
        n
    }

    /// Blocks while a link between `from` and this node is frozen; false when it should end
    /// instead (closed, or the proxy stops).
    fn wait_unfrozen(&self, from: u8, closed: &AtomicBool) -> bool {
        let mut f = self.faults();
        loop {
            if closed.load(Ordering::SeqCst) || self.stop.load(Ordering::SeqCst) {
                return false;
            }
            if !f.frozen(from, self.node) {
                return true;
            }
            // The timeout is a safety net only: every change notifies.
            f = self
                .faults
                .1
                .wait_timeout(f, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::spawn(f);
        lock(&self.threads).push(h);
    }
}

/// A proxy in front of one agent's replication listener.
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    fn start(node: u8, target: SocketAddr, faults: SharedFaults) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            node,
            target,
            faults,
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            next_id: Mutex::new(0),
            sockets: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
            records: Mutex::new(Vec::new()),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = conn else { continue };
                if let Ok(c) = client.try_clone() {
                    lock(&s.sockets).push(c);
                }
                let s2 = s.clone();
                s.spawn(move || handle(s2, client));
            }
        });
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// Node id of the agent behind this proxy.
    pub fn node(&self) -> u8 {
        self.shared.node
    }

    /// Every connection seen so far, in arrival order.
    pub fn records(&self) -> Vec<LinkRecord> {
        lock(&self.shared.records).clone()
    }

    /// Dialers of the forwarded connections open right now.
    pub fn open_from(&self) -> Vec<u8> {
        let mut v: Vec<u8> = lock(&self.shared.conns).iter().map(|c| c.from).collect();
        v.sort();
        v
    }
}

/// Reads the first frame; returns its bytes as read and the `Hello`, or None (garbage, EOF,
/// timeout, another message first).
fn read_hello(client: &mut TcpStream) -> Option<(Vec<u8>, tandem_repl_proto::Hello)> {
    client.set_read_timeout(Some(HELLO_TIMEOUT)).ok()?;
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_message() {
            Ok(Some(Message::Hello(h))) => {
                client.set_read_timeout(None).ok()?;
                return Some((raw, *h));
            }
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) => {}
        }
        let n = client.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
        dec.feed(&buf[..n]);
    }
}

fn handle(s: Arc<Shared>, mut client: TcpStream) {
    let Some((raw, hello)) = read_hello(&mut client) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let from = hello.from_node;
    let record = |refused, held| LinkRecord {
        from,
        to: hello.to_node,
        volume: hello.volume_name.clone(),
        refused,
        held,
    };
    let refuse = |s: &Shared, client: &TcpStream| {
        lock(&s.records).push(record(true, false));
        let _ = client.shutdown(Shutdown::Both);
    };
    if s.faults().cut(from, s.node) {
        return refuse(&s, &client);
    }
    if s.faults().frozen(from, s.node) {
        // A black hole: no answer; the dialer's handshake times out. Closed once the fault is
        // gone (the dialer has long given up) or at teardown.
        lock(&s.records).push(record(false, true));
        let closed = AtomicBool::new(false);
        s.wait_unfrozen(from, &closed);
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(mut server) = TcpStream::connect(s.target) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    if let Ok(c) = server.try_clone() {
        lock(&s.sockets).push(c);
    }
    if server.write_all(&raw).is_err() {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        return;
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let closed = Arc::new(AtomicBool::new(false));
    // Check and register under the connection lock: `Net::isolate` first records the fault,
    // then cuts under this lock, so no connection slips between the two.
    let id = {
        let mut conns = lock(&s.conns);
        if s.stop.load(Ordering::SeqCst) || s.faults().cut(from, s.node) {
            drop(conns);
            let _ = server.shutdown(Shutdown::Both);
            return refuse(&s, &client);
        }
        let id = {
            let mut n = lock(&s.next_id);
            *n += 1;
            *n
        };
        conns.push(Conn {
            id,
            from,
            sockets: [c2, s2],
            closed: closed.clone(),
        });
        lock(&s.records).push(record(false, false));
        id
    };
    let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (sh, cl) = (s.clone(), closed.clone());
    s.spawn(move || pump(sh, id, from, cl, c3, s3));
    pump(s, id, from, closed, server, client);
}

/// Copies `src` to `dst` (not while the link is frozen) until either ends; then closes the
/// whole connection.
fn pump(
    s: Arc<Shared>,
    id: u64,
    from_node: u8,
    closed: Arc<AtomicBool>,
    mut src: TcpStream,
    mut dst: TcpStream,
) {
    let mut buf = vec![0u8; 256 << 10];
    while s.wait_unfrozen(from_node, &closed) {
        match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                // Bytes that arrive after a freeze are held until the heal (as TCP would
                // retransmit them), never delivered during it.
                if !s.wait_unfrozen(from_node, &closed) || dst.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
    s.cut_where(|c| c.id == id);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
        s.faults.1.notify_all();
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        s.cut_where(|_| true);
        for sock in lock(&s.sockets).iter() {
            let _ = sock.shutdown(Shutdown::Both);
        }
        loop {
            let batch: Vec<JoinHandle<()>> = lock(&s.threads).drain(..).collect();
            if batch.is_empty() {
                break;
            }
            for h in batch {
                let _ = h.join();
            }
        }
    }
}

/// The proxies of one cluster and the faults they share.
pub struct Net {
    faults: SharedFaults,
    pub proxies: Vec<Proxy>,
}

impl Net {
    pub fn new() -> Net {
        Net {
            faults: Arc::default(),
            proxies: Vec::new(),
        }
    }

    /// Starts a proxy for node `node` whose agent listens on `target`; returns its address.
    pub fn add(&mut self, node: u8, target: SocketAddr) -> SocketAddr {
        let p = Proxy::start(node, target, self.faults.clone());
        let a = p.addr;
        self.proxies.push(p);
        a
    }

    pub fn proxy(&self, node: u8) -> &Proxy {
        self.proxies
            .iter()
            .find(|p| p.node() == node)
            .unwrap_or_else(|| panic!("no proxy for node {node}"))
    }

    /// Cuts `node` off from every peer: its open links are shut down (both directions, at
    /// once) and new ones are refused until [`Net::heal`]. Returns how many links were cut.
    pub fn isolate(&self, node: u8) -> usize {
        lock(&self.faults.0).isolated.insert(node);
        self.proxies
            .iter()
            .map(|p| p.shared.cut_where(|c| c.from == node || p.node() == node))
            .sum()
    }

    /// Cuts the links between `a` and `b` only (both keep their other links) until
    /// [`Net::heal`]. Returns how many links were cut.
    pub fn cut_pair(&self, a: u8, b: u8) -> usize {
        lock(&self.faults.0).pairs.insert((a.min(b), a.max(b)));
        self.proxies
            .iter()
            .map(|p| {
                p.shared
                    .cut_where(|c| (c.from == a && p.node() == b) || (c.from == b && p.node() == a))
            })
            .sum()
    }

    /// Makes `node` a black hole until [`Net::heal`]: its open links stay open but carry
    /// nothing (TCP back-pressure holds what the ends write); new ones get no answer.
    pub fn freeze(&self, node: u8) {
        lock(&self.faults.0).frozen.insert(node);
        self.faults.1.notify_all();
    }

    /// Lets every link through again: frozen links resume with what their ends wrote
    /// meanwhile, dialers reconnect on their own.
    pub fn heal(&self) {
        let mut f = lock(&self.faults.0);
        f.isolated.clear();
        f.frozen.clear();
        f.pairs.clear();
        drop(f);
        self.faults.1.notify_all();
    }

    /// Every link record of every proxy.
    pub fn records(&self) -> Vec<LinkRecord> {
        self.proxies.iter().flat_map(|p| p.records()).collect()
    }

    /// Open forwarded links as (dialer, acceptor) pairs, sorted.
    pub fn open_links(&self) -> Vec<(u8, u8)> {
        let mut v: Vec<(u8, u8)> = self
            .proxies
            .iter()
            .flat_map(|p| p.open_from().into_iter().map(move |f| (f, p.node())))
            .collect();
        v.sort();
        v
    }
}

impl Default for Net {
    fn default() -> Self {
        Net::new()
    }
}

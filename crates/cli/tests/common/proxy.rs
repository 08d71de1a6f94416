//! A fault-injecting TCP proxy in front of an agent's replication listener, for partition
//! tests. The agent advertises the proxy's address (`repl_advertise`), so its peers dial the
//! proxy, which forwards to the agent's real listener.
//!
//! The lower node id dials the higher one, so one node's proxy carries links from several
//! dialers. The proxy reads the dialer's first frame (the handshake's `Hello`, decoded with
//! `tandem-repl-proto`), which names the dialing node, the node it wants and the volume, and
//! only then connects to the agent. A [`Net`] holds the proxies of one cluster and a set of
//! isolated nodes: a link is refused (closed right after its `Hello`) or cut (both sockets shut
//! down) when either end is isolated. The controller link is HTTP and never passes through a
//! proxy. Everything is torn down on drop (every socket shut down, every thread joined).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
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
}

struct Conn {
    id: u64,
    from: u8,
    sockets: [TcpStream; 2],
}

struct Shared {
    /// Node id of the agent behind this proxy.
    node: u8,
    target: SocketAddr,
    isolated: Arc<Mutex<BTreeSet<u8>>>,
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
    fn blocked(&self, set: &BTreeSet<u8>, from: u8) -> bool {
        set.contains(&from) || set.contains(&self.node)
    }

    /// Shuts down every forwarded connection that `pred` selects.
    fn cut_where(&self, pred: impl Fn(&Conn) -> bool) -> usize {
        let mut conns = lock(&self.conns);
        let mut n = 0;
        conns.retain(|c| {
            if pred(c) {
                for s in &c.sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
                n += 1;
                false
            } else {
                true
            }
        });
        n
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
    fn start(node: u8, target: SocketAddr, isolated: Arc<Mutex<BTreeSet<u8>>>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            node,
            target,
            isolated,
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
    let record = |refused| LinkRecord {
        from: hello.from_node,
        to: hello.to_node,
        volume: hello.volume_name.clone(),
        refused,
    };
    let refuse = |s: &Shared, client: &TcpStream| {
        lock(&s.records).push(record(true));
        let _ = client.shutdown(Shutdown::Both);
    };
    if s.blocked(&lock(&s.isolated), hello.from_node) {
        return refuse(&s, &client);
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
    // Check and register under the connection lock: `Net::isolate` first adds the node to the
    // set, then cuts under this lock, so no connection slips between the two.
    let id = {
        let mut conns = lock(&s.conns);
        if s.stop.load(Ordering::SeqCst) || s.blocked(&lock(&s.isolated), hello.from_node) {
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
            from: hello.from_node,
            sockets: [c2, s2],
        });
        lock(&s.records).push(record(false));
        id
    };
    let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let sh = s.clone();
    s.spawn(move || pump(sh, id, c3, s3));
    pump(s, id, server, client);
}

/// Copies `from` to `to` until either ends; then closes the whole connection.
fn pump(s: Arc<Shared>, id: u64, mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    s.cut_where(|c| c.id == id);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::SeqCst);
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

/// The proxies of one cluster and the set of isolated nodes they share.
pub struct Net {
    isolated: Arc<Mutex<BTreeSet<u8>>>,
    pub proxies: Vec<Proxy>,
}

impl Net {
    pub fn new() -> Net {
        Net {
            isolated: Arc::default(),
            proxies: Vec::new(),
        }
    }

    /// Starts a proxy for node `node` whose agent listens on `target`; returns its address.
    pub fn add(&mut self, node: u8, target: SocketAddr) -> SocketAddr {
        let p = Proxy::start(node, target, self.isolated.clone());
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
        lock(&self.isolated).insert(node);
        self.proxies
            .iter()
            .map(|p| p.shared.cut_where(|c| c.from == node || p.node() == node))
            .sum()
    }

    /// Lets every link through again (dialers reconnect on their own).
    pub fn heal(&self) {
        lock(&self.isolated).clear();
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

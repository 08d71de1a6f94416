//! End to end with real processes: wrong peers on the agents' replication ports (garbage, a
//! well-formed handshake from another cluster, the right cluster with a wrong secret, a wrong
//! volume, an unknown node, a connection that says nothing, a real transport without the
//! secret that keeps redialing) are refused, each with a logged reason, while a replicated
//! volume keeps serving writes through its Primary.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::repl::*;
use common::*;
use tandem_repl_proto::{
    ClusterSecret, Decoder, Encoder, Initiator, InitiatorConfig, MAX_HANDSHAKE_PAYLOAD, Message,
    RefuseReason, VersionRange,
};

/// Longer than the agent's handshake timeout (5 s).
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

/// What a raw initiator saw.
#[derive(Debug)]
enum Outcome {
    Established,
    /// The agent sent `Refused` (then closed).
    Refused(RefuseReason, String),
    /// Our handshake machine failed without a refusal.
    Failed(String),
    /// Closed without a refusal.
    Closed,
}

impl Outcome {
    fn describe(&self) -> String {
        match self {
            Outcome::Established => "the handshake completed".into(),
            Outcome::Refused(r, detail) => format!("refused ({r:?}): {detail}"),
            Outcome::Failed(e) => format!("our handshake failed: {e}"),
            Outcome::Closed => "closed without a refusal".into(),
        }
    }
}

fn send(s: &mut TcpStream, msg: &Message) {
    let mut buf = Vec::new();
    Encoder::default().encode(msg, &mut buf).unwrap();
    s.write_all(&buf).unwrap();
}

/// Runs a handshake as initiator over a plain socket.
fn handshake(addr: SocketAddr, cfg: InitiatorConfig) -> (Outcome, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    let (mut ini, hello) = Initiator::new(cfg, [0x5a; 32]).unwrap();
    send(&mut s, &hello);
    let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
    let mut buf = [0u8; 4096];
    loop {
        let msg = match dec.next_message() {
            Ok(Some(m)) => m,
            Ok(None) => {
                match s.read(&mut buf) {
                    Ok(0) => return (Outcome::Closed, s),
                    Ok(n) => dec.feed(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        panic!("the agent neither answered nor closed within {CLOSE_WITHIN:?}")
                    }
                    Err(_) => return (Outcome::Closed, s),
                }
                continue;
            }
            Err(e) => return (Outcome::Failed(format!("undecodable answer: {e}")), s),
        };
        if let Message::Refused { reason, detail, .. } = &msg {
            return (Outcome::Refused(*reason, detail.clone()), s);
        }
        match ini.on_message(msg) {
            Ok(out) => {
                if let Some(m) = out.send {
                    send(&mut s, &m);
                }
                if out.established.is_some() {
                    return (Outcome::Established, s);
                }
            }
            Err(f) => return (Outcome::Failed(f.error.to_string()), s),
        }
    }
}

/// Reads until the agent closes the connection; fails if it stays open.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(CLOSE_WITHIN)).unwrap();
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!(
                    "the agent kept the connection open for {:?}",
                    start.elapsed()
                )
            }
            Err(_) => return out,
        }
    }
}

/// Waits until `node`'s agent logged a refusal of the connection from `client` with `reason`
/// and `text`.
fn refusal_logged(c: &Cluster, node: &str, client: SocketAddr, reason: &str, text: &str) {
    let client = client.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = c.agent_log(node);
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("refused replication connection"))
            .collect();
        if refusals.iter().any(|l| {
            l.contains(&format!("peer={client} "))
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains(text)
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} did not log the refusal of {client} ({reason}, {text:?}); its refusals:\n{}",
            refusals.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many links `node`'s agent logged up, down (failure) and closed (orderly).
fn link_events(c: &Cluster, node: &str) -> [usize; 3] {
    let log = c.agent_log(node);
    [
        log.matches("replication link up").count(),
        log.matches("replication link down").count(),
        log.matches("replication link closed").count(),
    ]
}

/// Refusals for a bad MAC on volume `pv` that `node`'s agent logged so far.
fn bad_macs(c: &Cluster, node: &str) -> usize {
    c.agent_log(node)
        .lines()
        .filter(|l| {
            l.contains("refused replication connection")
                && l.contains("reason=\"bad_mac\"")
                && l.contains("volume=\"pv\"")
        })
        .count()
}

/// qemu-io rounds through the Primary in a thread until stopped: each writes a pattern to one
/// of 16 MiB-spaced 64 KiB blocks, flushes and reads it back with pattern verification.
struct Writer {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<u64, String>>>,
}

const SLOTS: u64 = 16;

fn block(i: u64) -> (u64, u64, u8) {
    ((i % SLOTS) << 20, 65536, (i % 250 + 1) as u8)
}

impl Writer {
    fn start(uri: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (s, r) = (stop.clone(), rounds.clone());
        let handle = std::thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                let b = [block(i)];
                let mut cmds = writes(&b);
                cmds.extend(reads(&b));
                let out = qemu_io_within(&uri, &cmds, Duration::from_secs(60));
                if !out.ok() {
                    return Err(format!("round {i}: {cmds:?}: {}", out.text));
                }
                i += 1;
                r.store(i, Ordering::SeqCst);
            }
            Ok(i)
        });
        Writer {
            stop,
            rounds,
            handle: Some(handle),
        }
    }

    fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }

    /// Stops; returns the number of rounds, all of which succeeded.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        match self.handle.take().unwrap().join() {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => panic!("a write through the Primary failed: {e}"),
            Err(_) => panic!("the writer thread panicked"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn wrong_peers_are_refused_and_the_volume_keeps_serving() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    const SIZE: u64 = 32 << 20;
    c.json(&["volume", "create", "pv", "32MiB", "--replicas", "2"]);
    let v = c.wait_json(&["volume", "show", "pv"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uuid = v["uuid"].as_str().unwrap().to_string();
    let nodes = c.repl_nodes();
    assert_eq!(nodes.len(), 3);
    let state = c.node_dir(&nodes[0].0).join("state");
    let cluster_id = std::fs::read_to_string(state.join("cluster_id"))
        .unwrap()
        .trim()
        .to_string();
    let secret = tandem_transport::load_secret_file(&state.join("cluster_secret")).unwrap();
    let lowest = nodes[0].1;

    // Link changes each agent logged so far (links up, down, closed); none may follow.
    let links_before: std::collections::HashMap<String, [usize; 3]> = nodes
        .iter()
        .map(|(name, _, _)| (name.clone(), link_events(&c, name)))
        .collect();
    for (name, n) in &links_before {
        assert!(n[0] >= 2, "{name}: {n:?} links up: {}", c.agent_log(name));
    }

    let writer = Writer::start(c.connect("pv"));
    wait_until(Duration::from_secs(60), "the first writes", || {
        (writer.rounds() >= 2).then_some(())
    });

    // (e) A connection to every agent that never says anything: closed after the handshake
    // timeout. Opened first; checked at the end.
    let silent: Vec<(String, TcpStream)> = nodes
        .iter()
        .map(|(name, _, addr)| (name.clone(), TcpStream::connect(addr).unwrap()))
        .collect();

    for (name, id, addr) in &nodes {
        let addr: SocketAddr = addr.parse().unwrap();

        // (a) Random bytes: a Refused{ProtocolError} and the close.
        let mut s = TcpStream::connect(addr).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(*id);
        let garbage: Vec<u8> = (0..4096)
            .map(|i| {
                if i < 4 {
                    return b"JUNK"[i];
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        s.write_all(&garbage).unwrap();
        let back = read_to_close(&mut s);
        let mut dec = Decoder::with_max_payload(MAX_HANDSHAKE_PAYLOAD);
        dec.feed(&back);
        assert!(
            matches!(
                dec.next_message(),
                Ok(Some(Message::Refused {
                    reason: RefuseReason::ProtocolError,
                    ..
                }))
            ),
            "{name}: garbage should get a Refused(ProtocolError), got {back:?}"
        );
        refusal_logged(
            &c,
            name,
            s.local_addr().unwrap(),
            "garbage",
            "bad frame magic",
        );

        if *id == lowest {
            // Every handshake below dials it from a lower id; the lowest node accepts nobody.
            continue;
        }
        let cfg = |cluster: &str, secret: ClusterSecret, volume: &str, uuid: &str, from: u8| {
            InitiatorConfig {
                cluster_id: cluster.into(),
                volume_name: volume.into(),
                volume_uuid: uuid.into(),
                local_node: from,
                peer_node: *id,
                versions: VersionRange::SUPPORTED,
                secret,
            }
        };
        let other_secret =
            ClusterSecret::new(b"a secret of another cluster, 32+".to_vec()).unwrap();
        let cases: Vec<(&str, InitiatorConfig, RefuseReason, &str, String)> = vec![
            (
                "(b) another cluster",
                cfg(
                    "e2e-other-cluster",
                    other_secret.clone(),
                    "pv",
                    &uuid,
                    lowest,
                ),
                RefuseReason::WrongCluster,
                "wrong_cluster",
                "e2e-other-cluster".into(),
            ),
            (
                // Impersonates the lowest node, a real peer that dials this one.
                "(c) the right cluster, a wrong secret",
                cfg(&cluster_id, other_secret.clone(), "pv", &uuid, lowest),
                RefuseReason::BadMac,
                "bad_mac",
                "bad MAC".into(),
            ),
            (
                "(d) a volume this node does not have",
                cfg(&cluster_id, secret.clone(), "pv-nope", "no-uuid", lowest),
                RefuseReason::WrongVolume,
                "wrong_volume",
                "pv-nope".into(),
            ),
            (
                "(d) the volume's name with another uuid",
                cfg(
                    &cluster_id,
                    secret.clone(),
                    "pv",
                    "uuid-of-another-pv",
                    lowest,
                ),
                RefuseReason::WrongVolume,
                "wrong_volume",
                "uuid-of-another-pv".into(),
            ),
            (
                "a node that is not a peer of the volume",
                cfg(&cluster_id, secret.clone(), "pv", &uuid, 30),
                RefuseReason::UnknownNode,
                "unknown_node",
                "node 30".into(),
            ),
        ];
        for (what, cfg, wire, logged, text) in cases {
            let (outcome, mut s) = handshake(addr, cfg);
            match &outcome {
                Outcome::Refused(r, detail) if *r == wire => {
                    assert!(
                        !detail.is_empty(),
                        "{name}: {what}: a refusal without a reason"
                    )
                }
                other => panic!(
                    "{name}: {what}: expected a refusal {wire:?}, got: {}",
                    other.describe()
                ),
            }
            read_to_close(&mut s);
            refusal_logged(&c, name, s.local_addr().unwrap(), logged, &text);
        }
    }

    // (f) A real transport that knows the cluster id and the volume but not the secret,
    // posing as the lowest node and dialing the highest one again and again (with its
    // backoff): refused every time, never a link.
    let (target, target_id, target_addr) = nodes.last().unwrap().clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let before_rogue = bad_macs(&c, &target);
    let mut cfg = tandem_transport::TransportConfig::new(
        cluster_id.clone(),
        ClusterSecret::new(b"the rogue's own secret, 32 bytes".to_vec()).unwrap(),
        lowest,
        "rogue",
        "127.0.0.1:0".parse().unwrap(),
    );
    cfg.timers.dial_backoff_max = Duration::from_millis(400);
    let (rogue, mut events) = rt
        .block_on(tandem_transport::Transport::start(cfg))
        .unwrap();
    {
        let _rt = rt.enter();
        rogue
            .set_volume(tandem_transport::VolumeConfig {
                name: "pv".into(),
                uuid: uuid.clone(),
                peers: vec![tandem_transport::PeerConfig {
                    node_id: target_id,
                    name: target.clone(),
                    addr: target_addr.clone(),
                }],
            })
            .unwrap();
    }
    wait_until(
        Duration::from_secs(30),
        "the rogue transport to be refused 4 times",
        || {
            (rogue
                .stats()
                .refused(tandem_transport::RefusalReason::RefusedByPeer)
                >= 4)
                .then_some(())
        },
    );
    rt.block_on(rogue.shutdown());
    while let Ok(e) = events.try_recv() {
        assert!(
            !matches!(e, tandem_transport::Event::PeerUp { .. }),
            "the rogue got a link: {e:?}"
        );
    }
    assert_eq!(rogue.stats().links_up, 0);
    let logged = bad_macs(&c, &target) - before_rogue;
    assert!(
        logged >= 4,
        "{target} logged {logged} bad-MAC refusals of the rogue"
    );
    drop(rt);

    for (name, mut s) in silent {
        let local = s.local_addr().unwrap();
        let back = read_to_close(&mut s);
        assert!(
            back.is_empty() || back.starts_with(b"TDRP"),
            "{name}: {back:?}"
        );
        refusal_logged(&c, &name, local, "timeout", "");
    }

    // The volume served all along: more rounds after the last refusal, none failed.
    let after = writer.rounds();
    wait_until(
        Duration::from_secs(60),
        "more writes after the refusals",
        || (writer.rounds() >= after + 2).then_some(()),
    );
    let rounds = writer.finish();
    assert!(rounds >= after + 2);
    eprintln!("{rounds} write rounds through {primary}, {after} of them before the last refusal");

    // The latest pattern of every slot reads back through the Primary, and the two data
    // files are identical.
    let latest: Vec<(u64, u64, u8)> = (rounds.saturating_sub(SLOTS)..rounds).map(block).collect();
    c.wait_json(
        &["volume", "show", "pv"],
        "in sync after the writes",
        in_sync,
    );
    qemu_io_ok(&c.connect("pv"), &reads(&latest));
    same_files(&c, &primary, &secondary, "pv");
    let data = std::fs::read(c.node_dir(&primary).join("pool/pv.data")).unwrap();
    assert_eq!(data.len() as u64, SIZE);
    for (o, l, p) in &latest {
        assert!(
            data[*o as usize..(*o + *l) as usize].iter().all(|b| b == p),
            "{primary}: block at {o} does not hold pattern {p}"
        );
    }
    // The good links were never replaced or dropped.
    for (name, _, _) in &nodes {
        assert_eq!(
            link_events(&c, name),
            links_before[name],
            "{name}: a good link went down or was replaced (links up, down, closed)"
        );
        assert!(!c.agent_log(name).contains("panicked"), "{name} panicked");
    }
}

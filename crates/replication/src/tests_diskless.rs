//! A diskless Primary (a witness promoted): three real engines (nodes 0 and 1 diskful, node 2
//! diskless) wired by an in-memory network with FIFO links and instant in-memory disks, so
//! the tests see what reaches each replica's data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use tandem_repl_proto::{DiskState, Message, NodeId, Role};

use crate::*;

pub(crate) const SIZE: u64 = 1 << 20;
pub(crate) const W: NodeId = 2;

pub(crate) struct Node {
    pub(crate) e: Engine,
    pub(crate) data: Vec<u8>,
}

/// Also used by `tests_window`.
pub(crate) struct Net {
    pub(crate) nodes: Vec<Node>,
    /// Messages in flight, in send order (FIFO per link and overall).
    /// `None`: the sender closes the link here (after what it sent before, like TCP).
    q: VecDeque<(NodeId, NodeId, Option<Message>)>,
    links: BTreeSet<(NodeId, NodeId)>,
    /// Links that stay down until `heal`.
    cut: BTreeSet<(NodeId, NodeId)>,
    disk: VecDeque<(NodeId, Event)>,
    pub(crate) done: BTreeMap<RequestId, Result<Reply, RequestError>>,
    pub(crate) now: Nanos,
    pub(crate) log: Vec<String>,
}

pub(crate) fn key(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl Net {
    pub(crate) fn new() -> Net {
        Net::with_config(|_| {})
    }

    /// Nodes 0 and 1 diskful, node 2 (`W`) diskless; `tune` adjusts each node's config.
    pub(crate) fn with_config(tune: impl Fn(&mut Config)) -> Net {
        let mut nodes = Vec::new();
        for id in 0..3u8 {
            let diskful = id != W;
            let peers = (0..3u8)
                .filter(|p| *p != id)
                .map(|p| PeerConfig {
                    node_id: p,
                    diskful: p != W,
                })
                .collect();
            let mut cfg = Config::new(id, diskful, peers, SIZE);
            tune(&mut cfg);
            let p = Persisted::new_volume(&cfg, 77);
            let (e, _) = Engine::new(cfg, p, 0);
            nodes.push(Node {
                e,
                data: vec![0; SIZE as usize],
            });
        }
        let mut net = Net {
            nodes,
            q: VecDeque::new(),
            links: BTreeSet::new(),
            cut: BTreeSet::new(),
            disk: VecDeque::new(),
            done: BTreeMap::new(),
            now: 1,
            log: Vec::new(),
        };
        net.run();
        net
    }

    pub(crate) fn feed(&mut self, n: NodeId, ev: Event) {
        self.now += 1_000;
        let a = self.nodes[n as usize].e.handle(self.now, ev);
        self.apply(n, a);
    }

    pub(crate) fn apply(&mut self, n: NodeId, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::DiskWrite {
                    io, offset, data, ..
                } => {
                    let d = &mut self.nodes[n as usize].data;
                    d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    self.disk
                        .push_back((n, Event::DiskWriteDone { io, result: Ok(()) }));
                }
                Action::DiskRead { io, offset, len } => {
                    let d = &self.nodes[n as usize].data;
                    let b = Bytes::copy_from_slice(
                        &d[offset as usize..(offset + u64::from(len)) as usize],
                    );
                    self.disk
                        .push_back((n, Event::DiskReadDone { io, result: Ok(b) }));
                }
                Action::DiskFlush { io } => {
                    self.disk
                        .push_back((n, Event::DiskFlushDone { io, result: Ok(()) }));
                }
                Action::DiskChecksum { .. } => panic!("no checksums in these tests"),
                Action::Send { peer, msg } => {
                    if self.links.contains(&key(n, peer)) {
                        self.q.push_back((n, peer, Some(msg)));
                    }
                }
                Action::Disconnect { peer, .. } => {
                    if self.links.contains(&key(n, peer)) {
                        self.q.push_back((n, peer, None));
                    }
                }
                Action::Complete { id, result } => {
                    self.done.insert(id, result);
                }
                Action::Log { msg, .. } => self.log.push(format!("node {n}: {msg}")),
                Action::PersistMeta(_)
                | Action::PersistBits { .. }
                | Action::PersistActivityLog(_) => {}
            }
        }
    }

    pub(crate) fn break_link(&mut self, a: NodeId, b: NodeId) {
        if !self.links.remove(&key(a, b)) {
            return;
        }
        self.q.retain(|(f, t, _)| key(*f, *t) != key(a, b));
        self.feed(a, Event::PeerDown { peer: b });
        self.feed(b, Event::PeerDown { peer: a });
    }

    /// Cuts the link between `a` and `b` until `heal`.
    pub(crate) fn cut_link(&mut self, a: NodeId, b: NodeId) {
        self.cut.insert(key(a, b));
        self.break_link(a, b);
    }

    /// Cuts every link of `n` until `heal`.
    pub(crate) fn isolate(&mut self, n: NodeId) {
        for m in 0..3u8 {
            if m != n {
                self.cut.insert(key(n, m));
                self.break_link(n, m);
            }
        }
    }

    pub(crate) fn heal(&mut self) {
        self.cut.clear();
        self.run();
    }

    /// Delivers everything, reconnecting links that are not cut, until nothing moves.
    pub(crate) fn run(&mut self) {
        for _ in 0..100_000 {
            if let Some((n, ev)) = self.disk.pop_front() {
                self.feed(n, ev);
                continue;
            }
            if let Some((from, to, msg)) = self.q.pop_front() {
                match msg {
                    Some(msg) => self.feed(to, Event::PeerMessage { peer: from, msg }),
                    None => self.break_link(from, to),
                }
                continue;
            }
            let down: Vec<(NodeId, NodeId)> = [(0, 1), (0, 2), (1, 2)]
                .into_iter()
                .filter(|l| !self.links.contains(l) && !self.cut.contains(l))
                .collect();
            if let Some(&(a, b)) = down.first() {
                self.links.insert((a, b));
                self.feed(a, Event::PeerUp { peer: b });
                self.feed(b, Event::PeerUp { peer: a });
                continue;
            }
            // Ticks: outdated masks, resync pacing.
            let before = (self.q.len(), self.disk.len());
            for n in 0..3u8 {
                self.feed(n, Event::Tick);
            }
            if (self.q.len(), self.disk.len()) == before {
                return;
            }
        }
        panic!("the network did not settle:\n{}", self.log.join("\n"));
    }

    fn write(&mut self, id: RequestId, offset: u64, fill: u8, len: usize) {
        self.feed(
            W,
            Event::Write {
                id,
                offset,
                data: Bytes::from(vec![fill; len]),
                fua: false,
            },
        );
    }

    pub(crate) fn result(&self, id: RequestId) -> &Result<Reply, RequestError> {
        self.done
            .get(&id)
            .unwrap_or_else(|| panic!("request {id} not completed:\n{}", self.log.join("\n")))
    }

    fn promote_witness(&mut self) {
        let a = self.nodes[W as usize]
            .e
            .promote(self.now)
            .expect("promote witness");
        self.apply(W, a);
        self.run();
        assert_eq!(self.nodes[W as usize].e.role(), Role::Primary);
    }

    pub(crate) fn at(&self, n: NodeId, offset: u64, len: usize) -> &[u8] {
        &self.nodes[n as usize].data[offset as usize..offset as usize + len]
    }

    pub(crate) fn assert_replicas_identical(&self) {
        assert!(
            self.nodes[0].data == self.nodes[1].data,
            "replicas differ:\n{}",
            self.log.join("\n")
        );
        for n in 0..2 {
            let s = self.nodes[n].e.status();
            assert_eq!(
                s.disk_state,
                DiskState::UpToDate,
                "node {n}:\n{}",
                self.log.join("\n")
            );
            assert!(
                s.peers
                    .iter()
                    .all(|p| p.repl_state == ReplState::Established && p.out_of_sync_bytes == 0),
                "node {n}: {:?}",
                s.peers
            );
        }
    }
}

#[test]
fn a_witness_is_not_promoted_without_an_up_to_date_diskful_peer() {
    let mut net = Net::new();
    // Alone: nothing to serve data from.
    net.isolate(W);
    assert_eq!(
        net.nodes[W as usize].e.promote(net.now).unwrap_err(),
        PromoteError::NoDataPeer
    );
    net.heal();
    // Node 1 Primary: refused as for any node.
    let a = net.nodes[1].e.promote(net.now).expect("promote 1");
    net.apply(1, a);
    net.run();
    assert_eq!(
        net.nodes[W as usize].e.promote(net.now).unwrap_err(),
        PromoteError::PrimaryElsewhere(1)
    );
    let a = net.nodes[1].e.demote(net.now).expect("demote 1");
    net.apply(1, a);
    net.run();
    net.promote_witness();
    assert!(
        PromoteError::NoDataPeer
            .to_string()
            .contains("UpToDate diskful peer")
    );
}

#[test]
fn a_diskless_primary_writes_to_both_diskful_peers_and_forwards_reads() {
    let mut net = Net::new();
    net.promote_witness();
    net.write(1, 8192, 0xab, 8192);
    net.run();
    assert!(net.result(1).is_ok(), "{:?}", net.result(1));
    assert!(net.at(0, 8192, 8192).iter().all(|b| *b == 0xab));
    assert!(net.at(1, 8192, 8192).iter().all(|b| *b == 0xab));
    net.feed(W, Event::Flush { id: 2 });
    net.run();
    assert!(net.result(2).is_ok());
    // A read is forwarded (the witness has no data of its own).
    net.feed(
        W,
        Event::Read {
            id: 3,
            offset: 4096,
            len: 8192,
        },
    );
    net.run();
    match net.result(3) {
        Ok(Reply::Data(d)) => {
            assert!(d[..4096].iter().all(|b| *b == 0));
            assert!(d[4096..].iter().all(|b| *b == 0xab));
        }
        other => panic!("read: {other:?}"),
    }
    assert!(
        net.log
            .iter()
            .any(|l| l.contains("diskless: serving generation"))
    );
    net.assert_replicas_identical();
    // Demotion as usual; a diskful node can take over and sees the data.
    let a = net.nodes[W as usize].e.demote(net.now).expect("demote");
    net.apply(W, a);
    net.run();
    let a = net.nodes[0].e.promote(net.now).expect("promote 0");
    net.apply(0, a);
    net.run();
}

#[test]
fn a_read_goes_to_the_other_peer_when_the_first_one_refuses() {
    let mut net = Net::new();
    net.promote_witness();
    net.write(1, 0, 0x11, 4096);
    net.run();
    assert!(net.result(1).is_ok());
    // Node 0 drops out: the read goes to node 1.
    net.isolate(0);
    net.feed(
        W,
        Event::Read {
            id: 2,
            offset: 0,
            len: 4096,
        },
    );
    net.run();
    match net.result(2) {
        Ok(Reply::Data(d)) => assert!(d.iter().all(|b| *b == 0x11)),
        other => panic!("read: {other:?}"),
    }
    net.heal();
    net.assert_replicas_identical();
}

#[test]
fn a_peer_lost_mid_write_resyncs_only_what_it_missed() {
    let mut net = Net::new();
    net.promote_witness();
    for i in 0..4u64 {
        net.write(10 + i, i * 65536, 0x20 + i as u8, 4096);
    }
    // Flushed everywhere: settled, never resynced.
    net.feed(W, Event::Flush { id: 15 });
    net.run();
    assert!(net.result(15).is_ok());
    // A write is sent to both peers; node 1 is cut off before it gets it.
    net.write(20, 303_104, 0x77, 4096);
    net.isolate(1);
    net.run();
    assert!(net.result(20).is_ok(), "completes on node 0 alone");
    // More writes while node 1 is away.
    net.write(21, 200_704, 0x78, 8192);
    net.feed(W, Event::Flush { id: 22 });
    net.run();
    assert!(net.result(21).is_ok() && net.result(22).is_ok());
    assert!(net.at(1, 303_104, 4096).iter().all(|b| *b == 0));
    // Node 1 is listed as Outdated by the diskless Primary, so it is not promoted by mistake.
    let mask = net.nodes[W as usize].e.status();
    assert_eq!(mask.role, Role::Primary);
    net.heal();
    net.assert_replicas_identical();
    assert!(net.at(1, 303_104, 4096).iter().all(|b| *b == 0x77));
    assert!(net.at(1, 200_704, 8192).iter().all(|b| *b == 0x78));
    let s = net.nodes[1].e.status();
    assert!(
        s.last_resync_bytes == 3 * 4096,
        "node 1 resynced {} bytes, expected only the blocks it missed",
        s.last_resync_bytes
    );
    // And the witness serves through both again: a write reaches node 1 directly.
    net.write(30, 0, 0x99, 4096);
    net.run();
    assert!(net.result(30).is_ok());
    assert!(net.at(1, 0, 4096).iter().all(|b| *b == 0x99));
}

#[test]
fn a_diskless_primary_that_lost_every_diskful_peer_fails_io() {
    let mut net = Net::new();
    net.promote_witness();
    net.isolate(0);
    net.isolate(1);
    net.write(1, 0, 0x55, 4096);
    net.feed(
        W,
        Event::Read {
            id: 2,
            offset: 0,
            len: 4096,
        },
    );
    net.feed(W, Event::Flush { id: 3 });
    net.run();
    for id in 1..=3 {
        assert!(
            net.result(id).is_err(),
            "request {id}: {:?}",
            net.result(id)
        );
    }
    assert!(net.at(0, 0, 4096).iter().all(|b| *b == 0));
    net.heal();
}

#[test]
fn a_write_in_flight_when_the_last_data_peer_goes_fails() {
    let mut net = Net::new();
    net.promote_witness();
    net.isolate(1);
    net.run();
    net.write(1, 0, 0x55, 4096);
    // Node 0 goes before it acknowledged: nothing persisted the write for the consumer.
    net.isolate(0);
    net.run();
    assert!(net.result(1).is_err(), "{:?}", net.result(1));
    net.heal();
    net.assert_replicas_identical();
}

#[test]
fn replicas_converge_when_the_diskless_primary_vanishes_mid_write() {
    let mut net = Net::new();
    net.promote_witness();
    net.write(1, 0, 0x01, 4096);
    net.feed(W, Event::Flush { id: 2 });
    net.run();
    // Two writes in flight; node 0 gets both, node 1 only the first, then the Primary is
    // gone (crashed).
    net.write(3, 65536, 0x03, 4096);
    net.write(4, 131072, 0x04, 4096);
    let keep: Vec<_> = net.q.iter().cloned().collect();
    net.q.clear();
    let mut to1 = 0;
    for (f, t, m) in keep {
        let is_write = matches!(m, Some(Message::Write { .. }));
        if t == 1 && is_write {
            to1 += 1;
            if to1 > 1 {
                continue;
            }
        }
        net.q.push_back((f, t, m));
    }
    // Deliver the writes, not the acks back to the witness.
    while let Some((f, t, m)) = net.q.pop_front() {
        match m {
            Some(msg) if t != W => net.feed(t, Event::PeerMessage { peer: f, msg }),
            None => net.break_link(f, t),
            _ => {}
        }
        while let Some((n, ev)) = net.disk.pop_front() {
            net.feed(n, ev);
        }
        net.q.retain(|(_, t, _)| *t != W);
    }
    assert!(net.at(0, 131072, 4096).iter().all(|b| *b == 0x04));
    assert!(net.at(1, 131072, 4096).iter().all(|b| *b == 0));
    net.isolate(W);
    net.run();
    // Waiting for the lost Primary: the two replicas do not resync from each other yet.
    net.heal();
    assert!(
        net.nodes[0].data == net.nodes[1].data,
        "replicas differ after the diskless Primary vanished:\n{}",
        net.log.join("\n")
    );
    net.assert_replicas_identical();
}

/// Known bug (found 2026-12-06, not fixed): the witness as a diskless Primary loses both links
/// at once (a network blip around its host). At the first link's loss it still sees the other
/// data peer serving and starts a new generation for it, but the report carrying that
/// generation never reaches it (its link is gone too). After the heal both data peers are at
/// the old generation, none at the Primary's: none serves, and every request fails with EIO
/// until the node is demoted and promoted again. Needs a rule for a generation no peer
/// adopted (e.g. mint only once a serving peer confirmed it, or reuse the parent while no
/// write completed under the new one) that the simulator then checks.
#[test]
#[ignore = "known bug: a diskless Primary stays without a serving peer after losing both at once"]
fn a_diskless_primary_serves_again_after_a_blip_around_it() {
    let mut net = Net::new();
    net.promote_witness();
    net.isolate(W);
    net.run();
    net.heal();
    net.write(1, 0, 0x55, 4096);
    net.run();
    assert!(
        net.result(1).is_ok(),
        "{:?}\n{}",
        net.result(1),
        net.log.join("\n")
    );
}

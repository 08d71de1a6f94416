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
    pub(crate) q: VecDeque<(NodeId, NodeId, Option<Message>)>,
    links: BTreeSet<(NodeId, NodeId)>,
    /// Links that stay down until `heal`.
    cut: BTreeSet<(NodeId, NodeId)>,
    disk: VecDeque<(NodeId, Event)>,
    /// Nodes whose disk is slow: their completions wait in `held` until `release_disk`.
    slow: BTreeSet<NodeId>,
    held: VecDeque<(NodeId, Event)>,
    pub(crate) done: BTreeMap<RequestId, Result<Reply, RequestError>>,
    pub(crate) now: Nanos,
    pub(crate) log: Vec<String>,
    /// What each node persisted last: metadata and bitmaps (for a restart).
    pub(crate) meta: Vec<Option<Meta>>,
    pub(crate) bits: Vec<BTreeMap<NodeId, Bitmap>>,
    pub(crate) al: Vec<Vec<u64>>,
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
        Net::with_nodes(3, tune)
    }

    /// `count` nodes: node 2 (`W`) diskless, the others diskful.
    pub(crate) fn with_nodes(count: u8, tune: impl Fn(&mut Config)) -> Net {
        let mut nodes = Vec::new();
        let mut bits = Vec::new();
        for id in 0..count {
            let diskful = id != W;
            let peers = (0..count)
                .filter(|p| *p != id)
                .map(|p| PeerConfig {
                    node_id: p,
                    diskful: p != W,
                })
                .collect();
            let mut cfg = Config::new(id, diskful, peers, SIZE);
            tune(&mut cfg);
            let p = Persisted::new_volume(&cfg, 77);
            bits.push(p.bitmaps.clone());
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
            slow: BTreeSet::new(),
            held: VecDeque::new(),
            done: BTreeMap::new(),
            now: 1,
            log: Vec::new(),
            meta: vec![None; count as usize],
            bits,
            al: vec![Vec::new(); count as usize],
        };
        net.run();
        net
    }

    /// Node `n`'s disk completes nothing until `release_disk(n)` (a slow disk).
    pub(crate) fn hold_disk(&mut self, n: NodeId) {
        self.slow.insert(n);
    }

    /// Node `n`'s disk completes what it held, in order, and is fast again.
    pub(crate) fn release_disk(&mut self, n: NodeId) {
        self.slow.remove(&n);
        let (mine, rest) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(m, _)| *m == n);
        self.held = rest;
        self.disk.extend::<VecDeque<_>>(mine);
    }

    /// A disk completion of node `n`: next, or held while its disk is slow.
    fn disk_done(&mut self, n: NodeId, ev: Event) {
        if self.slow.contains(&n) {
            self.held.push_back((n, ev));
        } else {
            self.disk.push_back((n, ev));
        }
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
                    self.disk_done(n, Event::DiskWriteDone { io, result: Ok(()) });
                }
                Action::DiskRead { io, offset, len } => {
                    let d = &self.nodes[n as usize].data;
                    let b = Bytes::copy_from_slice(
                        &d[offset as usize..(offset + u64::from(len)) as usize],
                    );
                    self.disk_done(n, Event::DiskReadDone { io, result: Ok(b) });
                }
                Action::DiskFlush { io } => {
                    self.disk_done(n, Event::DiskFlushDone { io, result: Ok(()) });
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
                Action::PersistMeta(m) => self.meta[n as usize] = Some(m),
                Action::PersistBits {
                    peer,
                    set,
                    first,
                    count,
                } => {
                    if let Some(b) = self.bits[n as usize].get_mut(&peer) {
                        if set {
                            b.set_bits(first, count);
                        } else {
                            b.clear_bits(first, count);
                        }
                    }
                }
                Action::PersistActivityLog(extents) => self.al[n as usize] = extents,
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
        for m in 0..self.count() {
            if m != n {
                self.cut.insert(key(n, m));
                self.break_link(n, m);
            }
        }
    }

    /// Ends the cut of the link between `a` and `b` and brings it up, delivering nothing
    /// else (`step` does, one at a time).
    pub(crate) fn uncut(&mut self, a: NodeId, b: NodeId) {
        self.cut.remove(&key(a, b));
        if self.links.insert(key(a, b)) {
            self.feed(a, Event::PeerUp { peer: b });
            self.feed(b, Event::PeerUp { peer: a });
        }
    }

    /// Delivers one disk completion or message; false when there was none.
    pub(crate) fn step(&mut self) -> bool {
        if let Some((n, ev)) = self.disk.pop_front() {
            self.feed(n, ev);
            return true;
        }
        match self.q.pop_front() {
            Some((from, to, Some(msg))) => self.feed(to, Event::PeerMessage { peer: from, msg }),
            Some((from, to, None)) => self.break_link(from, to),
            None => return false,
        }
        true
    }

    /// Delivers the first message in flight from `from` to `to` (FIFO per link), leaving the
    /// others where they are; false when there is none.
    pub(crate) fn deliver(&mut self, from: NodeId, to: NodeId) -> bool {
        let Some(i) = self
            .q
            .iter()
            .position(|(f, t, m)| (*f, *t) == (from, to) && m.is_some())
        else {
            return false;
        };
        let Some((_, _, Some(msg))) = self.q.remove(i) else {
            return false;
        };
        self.feed(to, Event::PeerMessage { peer: from, msg });
        true
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
            let count = self.count();
            let down: Vec<(NodeId, NodeId)> = (0..count)
                .flat_map(|a| (a + 1..count).map(move |b| (a, b)))
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
            for n in 0..self.count() {
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

    fn count(&self) -> u8 {
        self.nodes.len() as u8
    }

    pub(crate) fn at(&self, n: NodeId, offset: u64, len: usize) -> &[u8] {
        &self.nodes[n as usize].data[offset as usize..offset as usize + len]
    }

    pub(crate) fn assert_replicas_identical(&self) {
        let diskful: Vec<usize> = (0..self.nodes.len()).filter(|n| *n != W as usize).collect();
        for &n in &diskful[1..] {
            assert!(
                self.nodes[0].data == self.nodes[n].data,
                "replicas 0 and {n} differ:\n{}",
                self.log.join("\n")
            );
        }
        for n in diskful {
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

/// A diskless Primary whose consumer never flushes flushes on its own after
/// `flush_after_writes` writes and then declares them `Settled`: its peers forget them. When
/// it vanishes, they mark nothing toward each other for them (with the default bound the
/// same three writes are still unsettled and are marked).
#[test]
fn a_diskless_primarys_own_flush_lets_its_peers_forget_its_writes() {
    for (bound, marked) in [(3, 0), (4096, 3 * 4096)] {
        let mut net = Net::with_config(|c| c.flush_after_writes = bound);
        net.promote_witness();
        for id in 1..=3 {
            net.write(id, id * 65536, id as u8, 4096);
            net.run();
            assert!(net.result(id).is_ok());
        }
        net.isolate(W);
        let toward_1 = net.nodes[0]
            .e
            .status()
            .peers
            .iter()
            .find(|p| p.node_id == 1)
            .map(|p| p.out_of_sync_bytes);
        assert_eq!(
            toward_1,
            Some(marked),
            "bound {bound}:\n{}",
            net.log.join("\n")
        );
        net.heal();
        net.assert_replicas_identical();
    }
}

/// The witness as a diskless Primary loses both links at once (a network blip around its
/// host). At the first loss it still sees the other data peer serving and starts a new
/// generation for it, but the report carrying that generation never reaches it (its link is
/// gone too). After the heal both data peers are at the old generation: the Primary offers
/// its generation (`ADOPT_OFFER`) to the peer that holds all its data, which adopts it and
/// serves again (before the fix: no peer served, EIO until demote and promote).
#[test]
fn a_diskless_primary_serves_again_after_a_blip_around_it() {
    let mut net = Net::new();
    net.promote_witness();
    net.isolate(W);
    net.run();
    net.heal();
    net.write(1, 0, 0x55, 4096);
    net.run();
    net.assert_ok(1);
    assert!(net.log.iter().any(|l| l.contains("adopted generation")));
    net.assert_replicas_identical();
}

impl Net {
    fn assert_ok(&self, id: RequestId) {
        assert!(
            self.result(id).is_ok(),
            "request {id}: {:?}\n{}",
            self.result(id),
            self.log.join("\n")
        );
    }

    fn read(&mut self, id: RequestId, offset: u64, len: u32) -> Vec<u8> {
        self.feed(W, Event::Read { id, offset, len });
        self.run();
        match self.result(id) {
            Ok(Reply::Data(d)) => d.to_vec(),
            other => panic!("read {id}: {other:?}\n{}", self.log.join("\n")),
        }
    }
}

/// The same blip while the consumer writes: a write acknowledged before it, one acknowledged
/// and not flushed, and one in flight to both peers when the links break (it fails). After
/// the heal the Primary serves again and the acknowledged writes read back. (Here the write
/// in flight makes the peers compare and resync; the peer that ends the resync adopts the
/// Primary's generation without the offer.)
#[test]
fn a_diskless_primary_serves_again_after_a_blip_during_writes() {
    let mut net = Net::new();
    net.promote_witness();
    net.write(1, 0, 0x11, 4096);
    net.feed(W, Event::Flush { id: 2 });
    net.run();
    assert!(net.result(1).is_ok() && net.result(2).is_ok());
    net.write(3, 4096, 0x33, 4096);
    net.run();
    assert!(net.result(3).is_ok());
    // In flight to both peers: lost with the links.
    net.write(4, 8192, 0x44, 4096);
    net.isolate(W);
    net.run();
    assert!(net.result(4).is_err(), "{:?}", net.result(4));
    net.heal();
    net.write(5, 12288, 0x55, 4096);
    net.run();
    net.assert_ok(5);
    let d = net.read(6, 0, 16384);
    assert!(d[..4096].iter().all(|b| *b == 0x11));
    assert!(d[4096..8192].iter().all(|b| *b == 0x33));
    assert!(d[12288..].iter().all(|b| *b == 0x55));
    net.assert_replicas_identical();
}

/// Three data peers: the blip makes the Primary start a generation at each of the first two
/// losses; the peers are two generations behind and still adopt the current one from the
/// offer (either previous generation counts).
#[test]
fn a_diskless_primary_with_three_data_peers_serves_again_after_a_blip() {
    let mut net = Net::with_nodes(4, |_| {});
    net.promote_witness();
    net.write(1, 0, 0x11, 4096);
    net.run();
    assert!(net.result(1).is_ok());
    net.isolate(W);
    net.run();
    net.heal();
    net.write(2, 4096, 0x22, 4096);
    net.run();
    net.assert_ok(2);
    let d = net.read(3, 0, 8192);
    assert!(d[..4096].iter().all(|b| *b == 0x11));
    assert!(d[4096..].iter().all(|b| *b == 0x22));
    net.assert_replicas_identical();
}

/// The offer races a write: the Primary offers its generation to node 1 while no peer serves,
/// then node 0 comes back at that generation and a write goes to it before node 1's link
/// carries writes. Node 1 adopts from the offer but lacks the write: it must not serve until
/// it resynced it (the Primary records it behind and starts a new generation).
#[test]
fn a_peer_that_took_the_offer_but_missed_a_write_does_not_serve_it_stale() {
    let mut net = Net::with_nodes(4, |_| {});
    net.promote_witness();
    // Node 0 alone with the Primary sees its next generation; nodes 0 and 1 do not talk.
    net.cut_link(0, 1);
    net.cut_link(0, 3);
    net.cut_link(W, 3);
    // The new generation's report reaches node 0 only, its answer does not come back.
    let q: Vec<_> = net.q.drain(..).collect();
    for (f, t, m) in q {
        match m {
            Some(msg) if f == W && t == 0 => net.feed(0, Event::PeerMessage { peer: f, msg }),
            other => net.q.push_back((f, t, other)),
        }
    }
    net.q.retain(|(f, t, _)| !(*f == 0 && *t == W));
    net.cut_link(W, 0);
    net.cut_link(W, 1);
    net.run();
    let wgen = net.nodes[W as usize].e.meta().current;
    assert_ne!(net.nodes[1].e.meta().current, wgen);
    // The Primary's links come up; its offer to node 1 waits in flight.
    for p in [1, 0, 3] {
        net.links.insert(key(W, p));
        net.feed(W, Event::PeerUp { peer: p });
        net.feed(p, Event::PeerUp { peer: W });
    }
    // The Primary talks with nodes 0 and 3 (quorum; node 0 takes the offer too): node 0
    // serves, and a write goes to nodes 0 and 3, not to node 1.
    loop {
        let q: Vec<_> = net.q.drain(..).collect();
        let mut moved = false;
        for (f, t, m) in q {
            match m {
                Some(msg) if key(f, t) == key(0, W) || key(f, t) == key(3, W) => {
                    moved = true;
                    net.feed(t, Event::PeerMessage { peer: f, msg });
                }
                other => net.q.push_back((f, t, other)),
            }
        }
        while let Some((n, ev)) = net.disk.pop_front() {
            moved = true;
            net.feed(n, ev);
        }
        if !moved {
            break;
        }
    }
    assert_eq!(
        net.nodes[0].e.meta().current,
        net.nodes[W as usize].e.meta().current,
        "{}",
        net.log.join("\n")
    );
    net.write(2, 0, 0x77, 4096);
    // Everything else now (node 1 takes the offer), then the heal of the other links.
    net.run();
    assert!(net.result(2).is_ok(), "{:?}", net.result(2));
    net.heal();
    let d = net.read(3, 0, 4096);
    assert!(d.iter().all(|b| *b == 0x77));
    assert!(
        net.log
            .iter()
            .any(|l| l.contains("adopted our generation but missed a write")),
        "{}",
        net.log.join("\n")
    );
    net.assert_replicas_identical();
    assert!(net.at(1, 0, 4096).iter().all(|b| *b == 0x77));
}

/// Simulator seed 277 with slow disks (a Primary with a detached disk serves through its
/// peers like a diskless one): it wrote to node 1, whose disk was slow; the link broke and
/// came back with that write still on node 1's disk, and the Primary's next write overlapped
/// it, so it waited behind it and started only after node 1 had lost that Primary for good.
/// A replica marks the writes of a detached Primary toward it (its own disk misses them)
/// when they start, and looked at the link, gone by then: the second write was not marked
/// and the Primary, back after its repair, never got it.
#[test]
fn a_detached_primarys_write_that_starts_after_its_link_is_gone_is_marked_toward_it() {
    const BLOCK: usize = 4096;
    let mut net = Net::new();
    let a = net.nodes[0].e.promote(net.now).expect("promote 0");
    net.apply(0, a);
    net.run();
    net.feed(
        0,
        Event::DiskFailed {
            reason: "EIO (test)".into(),
        },
    );
    net.run();
    net.hold_disk(1);
    let write = |net: &mut Net, id: RequestId, blocks: usize, fill: u8| {
        net.feed(
            0,
            Event::Write {
                id,
                offset: 0,
                data: Bytes::from(vec![fill; blocks * BLOCK]),
                fua: false,
            },
        );
        net.run();
    };
    write(&mut net, 1, 1, 0xB1);
    // The link breaks and comes back; write 1 is still on node 1's disk.
    net.break_link(0, 1);
    net.run();
    // Overlaps write 1 at block 0 and goes on to block 1: it waits behind it on node 1.
    write(&mut net, 2, 2, 0xB2);
    net.isolate(0);
    net.run();
    net.release_disk(1);
    net.run();
    assert!(
        net.at(1, BLOCK as u64, BLOCK).iter().all(|b| *b == 0xB2),
        "write 2 reached node 1's disk\n{}",
        net.log.join("\n")
    );
    let bits = net.nodes[1].e.bitmap(0).expect("a bitmap toward node 0");
    assert!(
        bits.test(0) && bits.test(1),
        "node 1 must mark both writes toward node 0, whose disk misses them\n{}",
        net.log.join("\n")
    );
}

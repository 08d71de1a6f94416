//! Three diskful replicas (nodes 0, 1 and 3) and a witness (node 2) on the in-memory network
//! of `tests_diskless`: generations when Secondaries that do not see each other follow the
//! same Primary.

use bytes::Bytes;
use tandem_repl_proto::{DiskState, Message, NodeId, Role};

use crate::tests_diskless::{Net, SIZE, W};
use crate::*;

const BLOCK: usize = 4096;

fn three() -> Net {
    let mut net = Net::with_nodes(4, |_| {});
    net.run();
    net
}

fn promote(net: &mut Net, n: NodeId) {
    let a = net.nodes[n as usize]
        .e
        .promote(net.now)
        .unwrap_or_else(|e| panic!("promote {n}: {e:?}\n{}", net.log.join("\n")));
    net.apply(n, a);
    net.run();
    assert_eq!(net.nodes[n as usize].e.role(), Role::Primary);
}

fn demote(net: &mut Net, n: NodeId) {
    let a = net.nodes[n as usize]
        .e
        .demote(net.now)
        .unwrap_or_else(|e| panic!("demote {n}: {e:?}\n{}", net.log.join("\n")));
    net.apply(n, a);
    net.run();
}

/// Three diskful nodes, node 0 Primary with block 0 written (0xA0) everywhere.
fn primary_0_with_a_write() -> Net {
    let mut net = three();
    promote(&mut net, 0);
    write_ok(&mut net, 0, 1, 0, 0xA0);
    net
}

/// `primary_0_with_a_write`, then node 0's disk detaches (it keeps serving through nodes 1
/// and 3).
fn detached_primary_0() -> Net {
    let mut net = primary_0_with_a_write();
    detach(&mut net, 0);
    net.run();
    net
}

/// Node `n`'s disk state is `state` (the log if not).
fn assert_disk_state(net: &Net, n: NodeId, state: DiskState) {
    assert_eq!(
        net.nodes[n as usize].e.status().disk_state,
        state,
        "node {n}\n{}",
        net.log.join("\n")
    );
}

/// Node `n`'s disk fails (it detaches and keeps serving through its peers).
fn detach(net: &mut Net, n: NodeId) {
    net.feed(
        n,
        Event::DiskFailed {
            reason: "EIO (test)".into(),
        },
    );
}

/// Hands node `n` a write of one block of `fill` at `offset` (nothing delivered yet).
fn start_write(net: &mut Net, n: NodeId, id: RequestId, offset: u64, fill: u8) {
    net.feed(
        n,
        Event::Write {
            id,
            offset,
            data: Bytes::from(vec![fill; BLOCK]),
            fua: false,
        },
    );
}

fn write_ok(net: &mut Net, n: NodeId, id: RequestId, offset: u64, fill: u8) {
    start_write(net, n, id, offset, fill);
    net.run();
    assert!(
        net.result(id).is_ok(),
        "write {id} on node {n}: {:?}\n{}",
        net.result(id),
        net.log.join("\n")
    );
}

/// Simulator seed 209 (three diskful nodes, disk faults): the Primary's disk detached and
/// both other replicas adopted its new generation G while the link between them was down,
/// each recording the other as behind at the generation before G. Then one of them became
/// Primary and wrote alone. Already recording the other as behind, it did not start a new
/// generation; at the reconnect both were at G with bits on both sides, and rule
/// `EqualBitsLowerNode` made the other one (lower node id) the source: the acknowledged
/// write was overwritten. It now starts a new generation (the detached Primary counted the
/// other one in sync, so that one may hold G too), and the handshake knows who is newer.
#[test]
fn a_primary_writing_without_a_peer_that_adopted_the_same_generation_starts_a_new_one() {
    let mut net = primary_0_with_a_write();
    let g0 = net.nodes[0].e.meta().current;

    // Nodes 1 and 3 stop seeing each other; node 0's disk fails: both adopt its generation.
    net.cut_link(1, 3);
    detach(&mut net, 0);
    net.run();
    let g = net.nodes[0].e.meta().current;
    assert_ne!(g, g0, "a detached Primary starts a new generation");
    for n in [1, 3] {
        assert_eq!(net.nodes[n].e.meta().current, g, "node {n} adopted it");
    }
    // The detached Primary writes through both (each marks it toward the other).
    write_ok(&mut net, 0, 2, 4 * BLOCK as u64, 0xB0);
    demote(&mut net, 0);

    // Node 3 becomes Primary and writes alone (node 0's disk is detached, node 1 is cut).
    promote(&mut net, 3);
    write_ok(&mut net, 3, 3, 8 * BLOCK as u64, 0xC3);
    let g3 = net.nodes[3].e.meta().current;
    assert_ne!(
        g3,
        g,
        "node 1 may hold generation {g:x} too: a write without it needs a new one\n{}",
        net.log.join("\n")
    );
    demote(&mut net, 3);

    // The link comes back between two Secondaries: node 3's write must survive.
    net.heal();
    for n in [1u8, 3] {
        assert_eq!(
            net.at(n, 8 * BLOCK as u64, BLOCK),
            &[0xC3; BLOCK][..],
            "node {n} lost node 3's acknowledged write\n{}",
            net.log.join("\n")
        );
        assert_eq!(net.at(n, 4 * BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
        assert_eq!(net.nodes[n as usize].e.meta().current, g3, "node {n}");
    }
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
    // Node 1 did hold generation g: only the marked blocks move.
    assert_eq!(
        last_decision(&net, 1, 3),
        Some((SyncDecision::BitmapTarget, Rule::PeerBitmapIsOurCurrent))
    );
}

/// Node `n`'s status of its link to `peer`.
fn peer_status(net: &Net, n: NodeId, peer: NodeId) -> Option<PeerStatus> {
    net.nodes[n as usize]
        .e
        .status()
        .peers
        .into_iter()
        .find(|p| p.node_id == peer)
}

fn last_decision(net: &Net, n: NodeId, peer: NodeId) -> Option<(SyncDecision, Rule)> {
    peer_status(net, n, peer).and_then(|p| p.last_decision)
}

/// As above, but the other replica missed the detached Primary's new generation (its link
/// to that Primary broke before the report arrived): the new Primary's generation still
/// makes it the target (in full: it holds the generation before, in the new one's history).
#[test]
fn a_peer_that_did_not_adopt_the_same_generation_is_still_found_behind() {
    let mut net = primary_0_with_a_write();
    let g0 = net.nodes[0].e.meta().current;

    net.cut_link(1, 3);
    detach(&mut net, 0);
    // Node 1 loses node 0 before its report with the new generation arrives.
    net.cut_link(0, 1);
    net.run();
    let g = net.nodes[0].e.meta().current;
    assert_eq!(net.nodes[3].e.meta().current, g);
    assert_eq!(net.nodes[1].e.meta().current, g0, "node 1 missed it");
    demote(&mut net, 0);

    promote(&mut net, 3);
    write_ok(&mut net, 3, 3, 8 * BLOCK as u64, 0xC3);
    assert_ne!(net.nodes[3].e.meta().current, g);
    demote(&mut net, 3);

    net.heal();
    for n in [1u8, 3] {
        assert_eq!(net.at(n, 8 * BLOCK as u64, BLOCK), &[0xC3; BLOCK][..]);
    }
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
    assert_eq!(
        last_decision(&net, 1, 3).map(|(d, _)| d),
        Some(SyncDecision::FullTarget)
    );
}

fn repl_state(net: &Net, n: NodeId, peer: NodeId) -> Option<ReplState> {
    peer_status(net, n, peer).map(|p| p.repl_state)
}

/// Simulator seed 444 (three diskful nodes, disk faults): a handshake made node 3 the sync
/// target of node 1 (same generation, bits on both sides). Before node 1's `ResyncBegin`
/// arrived, the Primary (its disk detached, writing only to the peers that serve it) started
/// a new generation without node 1; node 3, still UpToDate, adopted it and applied the
/// Primary's next write, which node 1 never got. The resync then ran anyway: the write
/// fenced its block (current here), the resync ended with node 3 "in sync" with node 1 at
/// node 1's older generation, and that block differed for good. A target whose generation
/// changed since it decided now refuses the `ResyncBegin` and compares again.
#[test]
fn a_sync_target_that_adopted_a_new_generation_before_the_resync_began_compares_again() {
    let mut net = primary_0_with_a_write();
    net.cut_link(1, 3);
    detach(&mut net, 0);
    net.run();
    // Written through nodes 1 and 3 and flushed there; each marks it toward the other.
    write_ok(&mut net, 0, 2, 4 * BLOCK as u64, 0xB0);
    net.feed(0, Event::Flush { id: 3 });
    net.run();
    assert!(net.result(3).is_ok());
    let g = net.nodes[0].e.meta().current;

    // The detached Primary loses both; it gets node 3 back, node 1 not.
    net.cut_link(0, 1);
    net.cut_link(0, 3);
    net.run();
    net.uncut(0, 3);
    net.run();

    // Nodes 1 and 3 meet: both lost that Primary at g and hold bits: node 3 (the higher id)
    // is the target. Stop once it decided, before node 1's ResyncBegin reaches it.
    net.uncut(1, 3);
    while repl_state(&net, 3, 1) != Some(ReplState::SyncTarget) {
        assert!(
            net.step(),
            "node 3 never became target:\n{}",
            net.log.join("\n")
        );
    }
    assert_eq!(net.nodes[3].e.meta().current, g);

    // The Primary writes (a new generation: node 1 is not in sync, once nodes 2 and 3
    // confirmed quorum); its report and the write reach node 3 before node 1's ResyncBegin
    // does.
    start_write(&mut net, 0, 4, 8 * BLOCK as u64, 0xC4);
    for (from, to) in [(0, 3), (0, 2), (3, 0), (2, 0)] {
        assert!(
            net.deliver(from, to),
            "{from}->{to}\n{}",
            net.log.join("\n")
        );
    }
    assert_ne!(net.nodes[0].e.meta().current, g);
    net.run();
    assert!(
        net.result(4).is_ok(),
        "{:?}\n{}",
        net.result(4),
        net.log.join("\n")
    );
    assert_ne!(net.nodes[0].e.meta().current, g);
    // The resync that never began left node 3 UpToDate: its link to the Primary it serves
    // stays up.
    assert!(
        !net.log
            .iter()
            .any(|l| l.starts_with("node 3: disconnecting node 0")),
        "{}",
        net.log.join("\n")
    );

    net.heal();
    for n in [1u8, 3] {
        assert_eq!(
            net.at(n, 8 * BLOCK as u64, BLOCK),
            &[0xC4; BLOCK][..],
            "node {n} lacks the write acknowledged through node 3\n{}",
            net.log.join("\n")
        );
        assert_eq!(net.at(n, 4 * BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
    }
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
}

/// Node 0 writes `fill` at `off` and loses every link (a crash) once the write reached node 1
/// (sent first) and before its copy for node 3 arrived.
fn write_reaching_node_1_only(net: &mut Net, id: RequestId, off: u64, fill: u8) {
    start_write(net, 0, id, off, fill);
    while net.at(1, off, BLOCK) != [fill; BLOCK] {
        assert!(net.step(), "the write never reached node 1");
    }
    assert!(net.at(3, off, BLOCK) == [0; BLOCK], "node 3 has it too");
    net.isolate(0);
    net.run();
}

/// Simulator seed 102 (three diskful nodes, disk faults): a Primary whose disk was detached
/// writes only to the replicas serving it. Its links broke while a write was on its way:
/// node 1 got it, node 3 did not, and the write failed. Both stayed at one generation with
/// nothing marked between them and differed for good at that block. A detached Primary's
/// writes are now kept unsettled on its peers like a diskless Primary's: node 1 marks the
/// write toward node 3 when it loses the Primary, and the two compare again.
#[test]
fn a_write_of_a_detached_primary_that_reached_one_replica_is_resynced_to_the_other() {
    let mut net = detached_primary_0();
    write_ok(&mut net, 0, 2, 4 * BLOCK as u64, 0xB0);

    // The next write reaches node 1, then node 0 loses every link.
    let off = 8 * BLOCK as u64;
    write_reaching_node_1_only(&mut net, 3, off, 0xC0);
    assert!(net.result(3).is_err(), "the write did not complete");
    net.heal();
    assert!(
        net.at(1, off, BLOCK) == net.at(3, off, BLOCK),
        "nodes 1 and 3 differ at the failed write's block\n{}",
        net.log.join("\n")
    );
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
    assert_eq!(net.at(3, 4 * BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
}

/// A healthy (diskful) Primary crashes with a write on its way: node 1 got it, node 3 did
/// not. The two survivors must not stay different at that block: once one of them is
/// Primary, the other follows it there too.
#[test]
fn a_write_of_a_crashed_primary_that_reached_one_replica_does_not_leave_the_others_different() {
    let mut net = primary_0_with_a_write();
    net.feed(0, Event::Flush { id: 2 });
    net.run();

    // Node 0 crashes (gone for good here) with the write on node 1 only.
    let off = 8 * BLOCK as u64;
    write_reaching_node_1_only(&mut net, 3, off, 0xC0);
    promote(&mut net, 1);
    write_ok(&mut net, 1, 4, 12 * BLOCK as u64, 0xD1);
    net.run();
    assert!(
        net.at(1, off, BLOCK) == net.at(3, off, BLOCK),
        "nodes 1 and 3 differ at the crashed Primary's last write\n{}",
        net.log.join("\n")
    );
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
}

/// The other side of the above: writes a flush made durable everywhere are `Settled`, also
/// by a Primary that demotes without a consumer flush; losing that Primary afterwards marks
/// nothing and reconnects nothing.
#[test]
fn settled_writes_of_a_lost_primary_are_not_resynced() {
    for demote_first in [false, true] {
        let mut net = primary_0_with_a_write();
        write_ok(&mut net, 0, 2, 4 * BLOCK as u64, 0xA1);
        if demote_first {
            demote(&mut net, 0);
        } else {
            net.feed(0, Event::Flush { id: 3 });
            net.run();
            assert!(net.result(3).is_ok());
        }
        net.isolate(0);
        net.run();
        for (n, peer) in [(1, 3), (3, 1)] {
            assert!(
                !net.log
                    .iter()
                    .any(|l| l.starts_with(&format!("node {n}: lost the writer"))),
                "demote first: {demote_first}\n{}",
                net.log.join("\n")
            );
            assert_eq!(repl_state(&net, n, peer), Some(ReplState::Established));
            assert_eq!(
                peer_status(&net, n, peer).map(|p| p.out_of_sync_bytes),
                Some(0)
            );
        }
    }
}

/// Protocol version 8: a replica applies the Primary's `WriteZeroes` (how a zero-write of
/// `tandem_repl_proto::zeroes` travels) as a disk write of the shared zero buffer (its driver
/// punches a hole), or of ordinary zeros with `NO_HOLE`, and acknowledges it.
#[test]
fn a_replica_applies_write_zeroes_as_a_zero_write() {
    use tandem_repl_proto::message::write_flags;
    use tandem_repl_proto::zeroes::is_zeroes;
    for (flags, hole) in [(0, true), (write_flags::NO_HOLE, false)] {
        let mut net = primary_0_with_a_write();
        net.now += 1_000;
        let msg = Message::WriteZeroes {
            seq: 1_000,
            offset: 0,
            len: 2 * BLOCK as u64,
            flags,
        };
        let actions = net.nodes[1]
            .e
            .handle(net.now, Event::PeerMessage { peer: 0, msg });
        let writes: Vec<&Bytes> = actions
            .iter()
            .filter_map(|a| match a {
                Action::DiskWrite {
                    offset: 0, data, ..
                } => Some(data),
                _ => None,
            })
            .collect();
        assert_eq!(writes.len(), 1, "{actions:?}");
        assert_eq!(writes[0].len(), 2 * BLOCK);
        assert!(writes[0].iter().all(|b| *b == 0));
        assert_eq!(is_zeroes(writes[0]), hole, "flags {flags}");
        assert!(
            !actions.iter().any(|a| matches!(
                a,
                Action::Send {
                    msg: Message::WriteAck { .. },
                    ..
                }
            )),
            "acknowledged only once on disk: {actions:?}"
        );
        net.apply(1, actions);
        assert!(net.at(1, 0, 2 * BLOCK).iter().all(|b| *b == 0));
    }
}

/// Simulator seed 31764 (two diskful nodes, found once crashes struck with messages in
/// flight): the Primary crashed right after its write reached a Secondary, before that write
/// was on the Secondary's disk. The flush the Secondary makes when it loses its Primary did
/// not cover it (a flush covers only writes completed before it starts); the write stayed in
/// its cache, the Secondary was promoted, and a later crash lost the block nobody else knew
/// about. Writes of a lost writer that complete afterwards are flushed too now.
#[test]
fn a_write_of_a_lost_primary_that_lands_after_the_loss_is_made_durable() {
    let mut net = three();
    promote(&mut net, 0);
    net.now += 1_000;
    let msg = Message::Write {
        seq: 1_000,
        offset: 0,
        flags: 0,
        data: Bytes::from(vec![0xB1; BLOCK]),
    };
    let actions = net.nodes[1]
        .e
        .handle(net.now, Event::PeerMessage { peer: 0, msg });
    let io = actions
        .iter()
        .find_map(|a| match a {
            Action::DiskWrite { io, .. } => Some(*io),
            _ => None,
        })
        .expect("the write goes to disk");
    // The Primary is gone before the write completes.
    let flushes = |a: &[Action]| {
        a.iter()
            .filter(|a| matches!(a, Action::DiskFlush { .. }))
            .count()
    };
    net.now += 1_000;
    let down = net.nodes[1].e.handle(net.now, Event::PeerDown { peer: 0 });
    assert_eq!(
        flushes(&down),
        1,
        "a flush when the Primary is lost: {down:?}"
    );
    net.now += 1_000;
    let done = net.nodes[1]
        .e
        .handle(net.now, Event::DiskWriteDone { io, result: Ok(()) });
    assert_eq!(
        flushes(&done),
        1,
        "the write that landed after the loss is flushed: {done:?}"
    );
}

/// Node `n` restarts (a crash, or its driver restarted after a disk repair) from what it
/// persisted last and what its disk holds; its links break (the ones not cut come back at
/// the next `run`).
fn restart(net: &mut Net, n: NodeId, tune: impl Fn(&mut Config)) {
    for m in 0..net.nodes.len() as NodeId {
        if m != n {
            net.break_link(n, m);
        }
    }
    let count = net.nodes.len() as NodeId;
    let peers = (0..count)
        .filter(|p| *p != n)
        .map(|p| PeerConfig {
            node_id: p,
            diskful: p != W,
        })
        .collect();
    let mut cfg = Config::new(n, n != W, peers, SIZE);
    tune(&mut cfg);
    let meta = net.meta[n as usize]
        .clone()
        .unwrap_or_else(|| net.nodes[n as usize].e.meta().clone());
    let bitmaps = net.bits[n as usize].clone();
    let persisted = Persisted {
        meta,
        bitmaps,
        activity_log: net.al[n as usize].clone(),
    };
    let (e, a) = Engine::new(cfg, persisted, net.now);
    net.nodes[n as usize].e = e;
    net.apply(n, a);
}

/// Simulator seed 4585 (three diskful nodes, disk faults): the Primary's disk detached; it
/// wrote through the replica that served it (node 3 here) while another one (node 1) was
/// away. Node 1 came back and resynced those blocks from node 3, and one more write that the
/// Primary made through node 3 during that resync (a late mark). Node 3 had marked every
/// such write toward the detached disk, node 1 none of what it got through the resync. The
/// repaired disk then resynced from node 1 alone and came back UpToDate without those
/// writes (in the simulator it went on to overwrite node 3's copy). A sync target now marks
/// what it receives through the resync toward a peer whose disk is detached, as it marks the
/// writes it applies from that peer.
#[test]
fn a_sync_target_marks_what_it_resyncs_toward_a_detached_disk() {
    // Activity-log extents of 16 blocks: the detached Primary's hot extent (block 0) is
    // marked toward it at the detach; the later writes lie outside it.
    let small_al = |c: &mut Config| c.al_extent_bytes = 16 * BLOCK as u64;
    let mut net = Net::with_nodes(4, small_al);
    net.run();
    promote(&mut net, 0);
    write_ok(&mut net, 0, 1, 0, 0xA0);
    detach(&mut net, 0);
    net.run();

    // Node 1 is away: the detached Primary writes through node 3 only.
    net.cut_link(0, 1);
    net.cut_link(1, 3);
    net.run();
    write_ok(&mut net, 0, 2, 64 * BLOCK as u64, 0xB0);

    // Node 1 comes back and resyncs from node 3; once that resync runs, the Primary writes
    // again (through node 3 only: node 1 does not hold its data yet).
    net.uncut(0, 1);
    net.uncut(1, 3);
    while net.nodes[1].e.status().disk_state != DiskState::Inconsistent {
        assert!(
            net.step(),
            "node 1 never became a sync target:\n{}",
            net.log.join("\n")
        );
    }
    assert_eq!(repl_state(&net, 1, 3), Some(ReplState::SyncTarget));
    write_ok(&mut net, 0, 3, 80 * BLOCK as u64, 0xC0);
    for off in [64, 80] {
        assert!(net.at(1, off * BLOCK as u64, BLOCK) == net.at(3, off * BLOCK as u64, BLOCK));
    }
    demote(&mut net, 0);
    // The Primary listed node 1 as outdated (it wrote without it); a new handshake with
    // node 3 makes it UpToDate again.
    net.break_link(1, 3);
    net.run();
    assert_disk_state(&net, 1, DiskState::UpToDate);

    // The disk is repaired: node 0 restarts and meets node 1 first (node 3 is cut off).
    net.cut_link(0, 3);
    restart(&mut net, 0, small_al);
    net.run();
    assert_disk_state(&net, 0, DiskState::UpToDate);
    for (off, fill) in [(0, 0xA0), (64, 0xB0), (80, 0xC0)] {
        assert!(
            net.at(0, off * BLOCK as u64, BLOCK) == [fill; BLOCK],
            "node 0 resynced from node 1 lacks the write at block {off}\n{}",
            net.log.join("\n")
        );
    }
    net.heal();
    assert!(net.nodes[0].data == net.nodes[1].data);
    assert!(net.nodes[1].data == net.nodes[3].data);
}

/// Simulator seed 485 of `three_diskful_disk_fault_seeds` (no disk fault is needed): the
/// Primary's write reaches node 1 but not node 3 when it crashes (the write fails). Nodes 1
/// and 3 stayed connected "in sync" with nothing recording the difference but the crashed
/// Primary's activity log; node 1 was promoted, the old Primary resynced its hot extents from
/// both, and node 3 kept its own block for good. Fixed by keeping a diskful Primary's writes
/// unsettled on its peers (protocol version 7, see
/// `a_write_of_a_crashed_primary_that_reached_one_replica_does_not_leave_the_others_different`).
#[test]
fn a_crashed_primarys_write_that_reached_one_secondary_is_resynced_to_the_other() {
    let small_al = |c: &mut Config| c.al_extent_bytes = 16 * BLOCK as u64;
    let mut net = Net::with_nodes(4, small_al);
    net.run();
    promote(&mut net, 0);
    write_ok(&mut net, 0, 1, 0, 0xA0);
    // Node 1 gets the write, node 3 not: node 0 crashes.
    let off = 32 * BLOCK as u64;
    write_reaching_node_1_only(&mut net, 2, off, 0xB0);
    restart(&mut net, 0, small_al);
    net.run();
    promote(&mut net, 1);
    write_ok(&mut net, 1, 3, 64 * BLOCK as u64, 0xC1);
    // The old Primary meets node 3 first, then node 1.
    net.uncut(0, 3);
    net.run();
    net.heal();
    assert!(
        net.nodes[0].data == net.nodes[1].data && net.nodes[1].data == net.nodes[3].data,
        "replicas differ (block 32: node 0 {:x}, node 1 {:x}, node 3 {:x})\n{}",
        net.at(0, off, 1)[0],
        net.at(1, off, 1)[0],
        net.at(3, off, 1)[0],
        net.log.join("\n")
    );
}

/// Node 0 Primary, node 1 cut off: the first write without node 1 starts a new generation
/// (once nodes 2 and 3 confirmed quorum); node 3 adopts it and applies the write (marked for
/// node 1), but a report it sent meanwhile (its link to the witness broke and came back)
/// still showed the old generation, so node 0 closes their link to compare again.
fn write_while_node_1_is_away() -> Net {
    let mut net = primary_0_with_a_write();
    net.isolate(1);
    while net.step() {}
    let g = net.nodes[0].e.meta().current;
    start_write(&mut net, 0, 2, BLOCK as u64, 0xB0);
    while net.nodes[0].e.meta().current == g {
        assert!(net.step(), "no new generation:\n{}", net.log.join("\n"));
    }
    net.break_link(2, 3);
    net.uncut(2, 3);
    while net.step() {}
    net
}

/// Simulator seed 390 (three diskful nodes and a witness): the Primary started a new
/// generation; node 3 adopted it, but its report that still showed the old one made the
/// Primary reconnect it, and the handshake (rule `EqualBitsPrimary`) made node 3 the target
/// of the writes it missed meanwhile. Before the Primary's `ResyncBegin` reached node 3, node
/// 3 sent a report (here: its link to the witness broke) that still said UpToDate. The
/// Primary, already answering node 3's `ResyncRequest`, took that report as the end of the
/// resync and confirmed it (`ResyncEnd`) before node 3 had finished. In the simulator the
/// confirmation arrived before the data; node 3 finished afterwards and, the confirmation
/// spent, told third nodes Inconsistent for good (and with node 1 never agreed who is
/// source). A source now counts a report as the end only once the target answered the
/// `Ping` it sends right after `ResyncBegin`.
#[test]
fn a_report_sent_before_the_resync_began_does_not_end_it() {
    let mut net = write_while_node_1_is_away();
    assert_eq!(repl_state(&net, 3, 0), Some(ReplState::Off));
    net.uncut(0, 3);
    while repl_state(&net, 3, 0) != Some(ReplState::SyncTarget) {
        assert!(
            net.step(),
            "node 3 never became target:\n{}",
            net.log.join("\n")
        );
    }
    assert_eq!(
        last_decision(&net, 3, 0),
        Some((SyncDecision::BitmapTarget, Rule::EqualBitsPrimary))
    );
    // Node 3 reports (UpToDate still) before the Primary's ResyncBegin reaches it.
    net.cut_link(2, 3);
    net.heal();
    let at = |prefix: &str| {
        net.log
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?}:\n{}", net.log.join("\n")))
    };
    assert!(
        at("node 0: node 3 is in sync") > at("node 3: resync from node 0 done"),
        "node 0 ended the resync before node 3 had the data:\n{}",
        net.log.join("\n")
    );
    assert_eq!(net.nodes[3].data, net.nodes[0].data);
    assert_eq!(net.nodes[1].data, net.nodes[0].data);
    for n in [0u8, 1, 2] {
        assert_eq!(
            peer_status(&net, n, 3).and_then(|p| p.disk_state),
            Some(tandem_repl_proto::DiskState::UpToDate),
            "node {n} sees node 3\n{}",
            net.log.join("\n")
        );
    }
}

/// Simulator seed 390, the other half: a node whose resync just finished tells third nodes
/// Inconsistent until its source confirms the end (so a diskless Primary does not read from
/// it too early), but decided its own handshakes on its real state (UpToDate). Node 3 here
/// finished a resync from the Primary and met node 1 before the confirmation: node 1, seeing
/// it Inconsistent, became source (rule `EqualInconsistent`); node 3, UpToDate with writes
/// marked for node 1 since node 1 was away, became source too (`EqualBitsPeerMissedWrites`).
/// Both refused the other's `ResyncBegin` and reconnected (for good in the simulator, whose
/// confirmation was lost). A node now decides on the disk state it reported to that peer.
#[test]
fn a_node_decides_on_the_disk_state_it_reported_to_the_peer() {
    let mut net = write_while_node_1_is_away();
    net.cut_link(0, 3);
    // Node 1 catches up from the Primary alone.
    net.uncut(0, 1);
    net.run();
    let g = net.nodes[0].e.meta().current;
    assert_eq!(net.nodes[1].e.meta().current, g);
    assert_eq!(net.at(1, BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
    // Node 3 resyncs the write from the Primary; just done, it meets node 1.
    net.uncut(0, 3);
    while !net
        .log
        .iter()
        .any(|l| l.starts_with("node 3: resync from node 0 done"))
    {
        assert!(net.step(), "node 3 never finished:\n{}", net.log.join("\n"));
    }
    assert_eq!(net.nodes[3].e.meta().current, g);
    net.uncut(1, 3);
    while [repl_state(&net, 1, 3), repl_state(&net, 3, 1)].contains(&Some(ReplState::Connecting)) {
        assert!(net.step(), "no decision:\n{}", net.log.join("\n"));
    }
    let d1 = last_decision(&net, 1, 3).map(|(d, _)| d);
    let d3 = last_decision(&net, 3, 1).map(|(d, _)| d);
    assert_eq!(
        d1.map(SyncDecision::mirror),
        d3,
        "nodes 1 and 3 disagree\n{}",
        net.log.join("\n")
    );
    net.heal();
    assert!(
        !net.log
            .iter()
            .any(|l| l.contains("peer starts a resync toward us but we decided")),
        "{}",
        net.log.join("\n")
    );
    for n in [1u8, 3] {
        assert_eq!(net.nodes[n as usize].data, net.nodes[0].data, "node {n}");
    }
    for (n, p) in [(1u8, 3u8), (3, 1), (0, 3), (2, 3)] {
        assert_eq!(
            peer_status(&net, n, p).and_then(|s| s.disk_state),
            Some(tandem_repl_proto::DiskState::UpToDate),
            "node {n} sees node {p}\n{}",
            net.log.join("\n")
        );
        assert_eq!(repl_state(&net, n, p), Some(ReplState::Established));
    }
}

/// Node 3 has just finished a resync from the Primary (node 0) at a new generation and, its
/// source's confirmation still on the way, meets node 1, which stayed at the generation
/// before: both decide on node 3 being Inconsistent, "the newer side is not UpToDate" (rule
/// `SourceNotUpToDate`), and the link waits (`PausedSync`, `NoGoodData`).
fn no_good_data_while_unconfirmed() -> Net {
    let mut net = write_while_node_1_is_away();
    net.uncut(0, 3);
    while !net
        .log
        .iter()
        .any(|l| l.starts_with("node 3: resync from node 0 done"))
    {
        assert!(net.step(), "node 3 never finished:\n{}", net.log.join("\n"));
    }
    assert_ne!(net.nodes[1].e.meta().current, net.nodes[3].e.meta().current);
    net.uncut(1, 3);
    while [repl_state(&net, 1, 3), repl_state(&net, 3, 1)].contains(&Some(ReplState::Connecting)) {
        assert!(net.step(), "no decision:\n{}", net.log.join("\n"));
    }
    for (n, p) in [(1, 3), (3, 1)] {
        assert_eq!(
            last_decision(&net, n, p),
            Some((SyncDecision::NoGoodData, Rule::SourceNotUpToDate)),
            "node {n}\n{}",
            net.log.join("\n")
        );
    }
    net
}

/// Found with the previous fix (seed 2205 of the three-witness topology, which deciding on
/// the reported state made fail): links that decided on the Inconsistent a node reported
/// while its resync was unconfirmed wait for good data that never shows up unless they compare
/// again. The confirmation now makes them reconnect.
#[test]
fn links_that_found_no_good_data_compare_again_once_the_resync_is_confirmed() {
    let mut net = no_good_data_while_unconfirmed();
    // Node 1 still sees neither the Primary nor the witness: only node 3 can bring it along.
    net.run();
    assert_eq!(
        repl_state(&net, 1, 3),
        Some(ReplState::Established),
        "{}",
        net.log.join("\n")
    );
    assert_eq!(net.nodes[1].e.meta().current, net.nodes[3].e.meta().current);
    assert_eq!(net.nodes[1].data, net.nodes[3].data);
    assert_eq!(net.at(1, BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
}

/// Seed 2205 of the three-witness topology: the two ends of such a link decided from
/// different snapshots (node 0 finished its resync between its report and its decision), one
/// became source, the other waited with no good data and took the `ResyncBegin` silently, as a
/// target waiting for another resync does: both waited for good. A link paused without a
/// target decision now treats a `ResyncBegin` as a mismatch and compares again.
#[test]
fn a_resync_begin_on_a_link_that_found_no_good_data_makes_it_compare_again() {
    let mut net = no_good_data_while_unconfirmed();
    let generation = net.nodes[3].e.meta().current;
    net.feed(
        1,
        Event::PeerMessage {
            peer: 3,
            msg: tandem_repl_proto::Message::ResyncBegin {
                generation,
                bytes: 0,
            },
        },
    );
    assert!(
        net.log.iter().any(|l| l.starts_with(
            "node 1: disconnecting node 3: ConfigChanged: peer starts a resync toward us"
        )),
        "{}",
        net.log.join("\n")
    );
}

/// Simulator seeds 1154 and 1513 of `three_diskful_disk_fault_seeds`: node 0 wrote a block
/// that node 3 acknowledged but never made durable, then handed the dual-primary write token
/// to node 3, whose disk failed as it became Primary (metadata writes too: its last durable
/// state says Secondary, UpToDate, no bits). Node 0 marked the write toward node 3 (its flush
/// never came back) and, meeting it again as a detached Primary, recorded it at its current
/// generation. Repaired, node 3 came back at that generation without the block, and rule
/// `EqualBitsLostPrimary` made node 0 (it "lost its Primary", node 3) the target: node 3's
/// stale block overwrote the acknowledged write. Toward the lost Primary itself that rule
/// now needs bits on the Primary's side. Since seed 2595 node 3 is found back without the
/// promotion node 0 lost it in (its epoch is older) and gets the whole volume from node 0
/// (rule `EqualLostPromotion`).
#[test]
fn a_lost_primary_back_without_the_writes_we_marked_for_it_is_our_target() {
    let (mut net, durable) = token_to_a_failing_disk();
    let off = durable.off;
    // Node 3, a detached Primary, meets its peers again (nothing holds its data).
    net.heal();
    assert_eq!(
        net.nodes[0].e.meta().peer_bitmap_gens.get(&3).copied(),
        Some(net.nodes[0].e.meta().current),
        "node 0 lost its Primary node 3 at its generation\n{}",
        net.log.join("\n")
    );
    // Repaired, node 3 restarts from its last durable state; its cache lost the write.
    net.cut_link(1, 3);
    durable.restart(&mut net);
    net.run();
    assert_eq!(
        last_decision(&net, 0, 3),
        Some((SyncDecision::FullSource, Rule::EqualLostPromotion)),
        "{}",
        net.log.join("\n")
    );
    net.heal();
    for n in [0u8, 1, 3] {
        assert_eq!(
            net.at(n, off, BLOCK),
            &[0xB0; BLOCK][..],
            "node {n} lost the acknowledged write\n{}",
            net.log.join("\n")
        );
    }
    assert!(net.nodes[0].data == net.nodes[1].data && net.nodes[1].data == net.nodes[3].data);
}

/// What node 3 of [`token_to_a_failing_disk`] had made durable before its disk and metadata
/// began to fail, and the block its cache loses.
struct Durable {
    meta: Meta,
    bits: std::collections::BTreeMap<NodeId, Bitmap>,
    al: Vec<u64>,
    /// The block node 3 acknowledged but never made durable, and what its disk held there.
    off: u64,
    before: Vec<u8>,
}

impl Durable {
    /// Repaired, node 3 restarts from its last durable state; its cache lost the write.
    fn restart(self, net: &mut Net) {
        let off = self.off as usize;
        net.meta[3] = Some(self.meta);
        net.bits[3] = self.bits;
        net.al[3] = self.al;
        net.nodes[3].data[off..off + BLOCK].copy_from_slice(&self.before);
        restart(net, 3, window);
    }
}

fn window(c: &mut Config) {
    c.allow_two_primaries = true;
}

/// Simulator seed 2595's situation on four nodes with the dual-primary window open: node 0
/// writes, node 3 (a second Primary) acknowledges a write at 8 blocks that stays in its
/// cache, its metadata writes begin to fail, its consumer's write takes the token from
/// node 0, and its disk detaches while it is cut off (a detached Primary nobody holds the
/// data of). Returns the net and what node 3 had made durable.
fn token_to_a_failing_disk() -> (Net, Durable) {
    let mut net = Net::with_nodes(4, window);
    net.run();
    promote(&mut net, 0);
    write_ok(&mut net, 0, 1, 0, 0xA0);
    net.feed(0, Event::Flush { id: 2 });
    net.run();
    // Node 3 joins the window (a second Primary without the write token).
    let a = net.nodes[3]
        .e
        .promote(net.now)
        .unwrap_or_else(|e| panic!("node 3 joins: {e:?}\n{}", net.log.join("\n")));
    net.apply(3, a);
    net.run();
    // Node 3's last durable state: its metadata writes fail from here on.
    let meta = net.meta[3]
        .clone()
        .unwrap_or_else(|| net.nodes[3].e.meta().clone());
    let off = 8 * BLOCK as u64;
    let durable = Durable {
        meta,
        bits: net.bits[3].clone(),
        al: net.al[3].clone(),
        off,
        before: net.at(3, off, BLOCK).to_vec(),
    };
    // Node 0 writes; node 3 acknowledges it (in its cache only, as it turns out).
    write_ok(&mut net, 0, 3, off, 0xB0);
    // Node 3's consumer writes: it asks for the token, node 0 flushes its peers and hands
    // it over. Node 3 becomes Primary; its flush's answer never reaches node 0.
    start_write(&mut net, 3, 4, 16 * BLOCK as u64, 0xC3);
    while net.nodes[3].e.role() != Role::Primary {
        assert!(
            net.step(),
            "node 3 never got the token\n{}",
            net.log.join("\n")
        );
    }
    net.isolate(3);
    detach(&mut net, 3);
    net.run();
    (net, durable)
}

/// Simulator seed 4896 (three diskful nodes, disk faults), directed: a Primary whose disk
/// detached writes to both other replicas; the link to node 1 breaks with a write on its way
/// there, the Primary completes it with node 3's ack (quorum with node 3 and the witness),
/// then loses every link. Both survivors hold writes of it that are not settled and mark
/// them toward each other, so both have bits and both lost the same Primary: until protocol
/// version 9 rule `EqualBitsLowerNode` made node 1, without the write, the source. Each now
/// reports the last write it received from the lost Primary, and node 3 (the later one) is
/// the source (`EqualBitsLaterWrites`).
#[test]
fn the_survivor_that_received_a_lost_primarys_later_write_is_the_source() {
    let mut net = detached_primary_0();
    write_ok(&mut net, 0, 2, 4 * BLOCK as u64, 0xB0);

    // Write 3 is on its way to nodes 1 and 3 when the link to node 1 breaks (its copy is
    // lost); node 3 applies and acknowledges it, and node 0 completes it.
    let off = 8 * BLOCK as u64;
    start_write(&mut net, 0, 3, off, 0xC0);
    net.cut_link(0, 1);
    while !net.done.contains_key(&3) {
        assert!(
            net.step(),
            "write 3 never completed\n{}",
            net.log.join("\n")
        );
    }
    assert!(net.result(3).is_ok(), "{:?}", net.result(3));
    assert_eq!(
        net.at(1, off, BLOCK),
        &[0u8; BLOCK][..],
        "node 1 never got it"
    );
    // Then node 0 loses every link; the two survivors compare.
    net.isolate(0);
    net.run();
    assert_eq!(
        last_decision(&net, 3, 1),
        Some((SyncDecision::BitmapSource, Rule::EqualBitsLaterWrites)),
        "{}",
        net.log.join("\n")
    );
    for n in [1u8, 3] {
        assert_eq!(
            net.at(n, off, BLOCK),
            &[0xC0; BLOCK][..],
            "node {n} lacks the acknowledged write\n{}",
            net.log.join("\n")
        );
        assert_eq!(net.at(n, 4 * BLOCK as u64, BLOCK), &[0xB0; BLOCK][..]);
    }
    assert!(net.nodes[1].data == net.nodes[3].data);
}

/// Simulator seed 2063 (three diskful nodes, disk faults): a Primary with a detached disk
/// wrote without node 3, which it still took for the target of an online resync (node 3's
/// report that the resync had ended was on its way), and listed node 3 as outdated only in
/// a report it sent after the write had been flushed and declared `Settled`. Node 1, which
/// applied the write, had already forgotten it by then; node 3 looked in sync to it (the
/// resync had ended there), and the two stayed different at that block for good. A changed
/// outdated list now goes out before `Settled`, and node 1 marks the writes it keeps
/// unsettled toward the nodes newly listed.
#[test]
fn a_detached_primarys_write_without_a_replica_is_marked_toward_it_before_it_settles() {
    let mut net = detached_primary_0();

    // While nodes 1 and 3 do not see each other, each marks the Primary's writes toward
    // the other; when they meet again, node 3 resyncs from node 1.
    net.cut_link(1, 3);
    net.run();
    write_ok(&mut net, 0, 10, 12 * BLOCK as u64, 0xB0);
    net.uncut(1, 3);
    // Until node 3 is in sync again but node 0 has not heard it yet.
    let seen_by_0 = |net: &Net| peer_status(net, 0, 3).and_then(|p| p.disk_state);
    while !(net.nodes[3].e.status().disk_state == DiskState::UpToDate
        && seen_by_0(&net) == Some(DiskState::Inconsistent))
    {
        assert!(net.step(), "node 3 never resynced\n{}", net.log.join("\n"));
    }

    // The write and a flush behind it go to node 1 only.
    let off = 8 * BLOCK as u64;
    start_write(&mut net, 0, 2, off, 0xC0);
    net.feed(0, Event::Flush { id: 3 });
    net.run();
    assert!(net.result(2).is_ok() && net.result(3).is_ok());
    net.heal();
    assert!(
        net.at(3, off, BLOCK) == [0xC0; BLOCK],
        "node 3 lacks the detached Primary's write\n{}",
        net.log.join("\n")
    );
    assert!(net.nodes[1].data == net.nodes[3].data);
    // Outdated while the detached Primary's list names it; once that Primary is gone, a
    // handshake with node 1 makes it UpToDate again.
    assert_eq!(net.nodes[3].e.status().disk_state, DiskState::Outdated);
    demote(&mut net, 0);
    net.break_link(1, 3);
    net.run();
    assert_eq!(net.nodes[3].e.status().disk_state, DiskState::UpToDate);
    assert!(net.nodes[1].data == net.nodes[3].data);
}

/// Simulator seed 8062 (three diskful nodes, disk faults): a Primary with a detached disk lost
/// its link to node 3 and started a new generation for its next write. Node 1 adopted it and
/// relayed it to node 3, which took it for diverged generations and closed that link: the
/// Primary's report of the generation went out before its write marked node 3, so it did
/// not list node 3 as outdated, and that relayed report was the last word node 3 got before
/// the Primary went down. Node 3 stayed UpToDate at the older generation and was promoted
/// later without the writes node 1 held (a split brain at the next meeting). A detached
/// Primary now lists the nodes it recorded as behind too.
#[test]
fn a_replica_a_detached_primary_wrote_without_learns_it_is_outdated_from_the_first_relay() {
    let mut net = detached_primary_0();
    // Nothing unflushed: losing node 3 leaves the Primary no bits toward it.
    net.feed(0, Event::Flush { id: 9 });
    net.run();
    net.cut_link(0, 3);
    net.run();
    start_write(&mut net, 0, 2, 8 * BLOCK as u64, 0xC0);
    // Until node 3 hears of the new generation from node 1 (and closes that link to compare
    // again); then it is cut off with the Primary gone.
    let heard = |net: &Net| {
        net.log
            .iter()
            .any(|l| l.starts_with("node 3:") && l.contains("generations diverged"))
    };
    while !heard(&net) {
        assert!(
            net.step(),
            "node 3 never heard of it\n{}",
            net.log.join("\n")
        );
    }
    net.isolate(0);
    net.isolate(3);
    net.run();
    assert_disk_state(&net, 3, DiskState::Outdated);
}

/// Simulator seed 5110 (three diskful nodes, in the dual-primary window): a write that waited
/// behind an overlapping one started after its Primary had been cut off from every peer. It
/// failed, but it was written locally under a new generation ("first write without diskful
/// nodes in sync"), and the heal found a split brain. A write that starts without quorum now
/// fails before it touches the disk.
#[test]
fn a_write_that_starts_after_quorum_is_gone_fails_without_touching_the_disk() {
    let mut net = primary_0_with_a_write();
    let generation = net.nodes[0].e.meta().current;
    // Write 3 waits behind write 2 (same block); node 0 is cut off before either completes.
    start_write(&mut net, 0, 2, 4 * BLOCK as u64, 0xB0);
    start_write(&mut net, 0, 3, 4 * BLOCK as u64, 0xC0);
    net.isolate(0);
    net.run();
    assert!(net.result(2).is_err() && net.result(3).is_err());
    assert!(
        net.at(0, 4 * BLOCK as u64, BLOCK) != [0xC0; BLOCK],
        "the write that started without quorum reached the disk\n{}",
        net.log.join("\n")
    );
    assert_eq!(net.nodes[0].e.meta().current, generation);
}

/// Simulator seeds 3533 and 4896 (three diskful, slow disks): a Primary that wrote without a
/// node and then demoted (or lost its links) took with it the knowledge that the node is
/// behind, and a majority without anyone holding the writes promoted that node (split
/// brain). A Secondary relays the last outdated list it knew from a Primary while no
/// Primary is connected: here the witness tells node 3, which then refuses promotion.
#[test]
fn the_outdated_list_outlives_the_primary_that_made_it() {
    let mut net = primary_0_with_a_write();
    net.isolate(3);
    net.run();
    write_ok(&mut net, 0, 2, BLOCK as u64, 0xB2);
    demote(&mut net, 0);
    net.isolate(0);
    net.isolate(1);
    net.run();
    net.uncut(3, W);
    net.run();
    assert_disk_state(&net, 3, DiskState::Outdated);
    assert!(matches!(
        net.nodes[3].e.promote(net.now),
        Err(PromoteError::Outdated)
    ));
}

/// Simulator seed 2595 of `three_diskful_disk_fault_seeds` with slow disks: as in
/// `a_lost_primary_back_without_the_writes_we_marked_for_it_is_our_target`, node 3 took the
/// write token as its disk failed (metadata too) and its cache lost a write of node 0 it
/// had acknowledged. Node 1 was promoted while node 3 was down; node 3 came back from its
/// last durable metadata (Secondary, no bits) and met node 1 first: equal generations and
/// no bits on either side, node 1 counted it in sync (`EqualNoBits`) though it lacked the
/// write node 1 held. Node 3 then marked node 1's writes toward node 0 (their link was
/// down), and at their handshake rule `EqualBitsLostPrimary` (node 0 had lost node 3 as its
/// Primary, node 3 had bits) made node 0, the one that knew what node 3 lacked, the target:
/// node 3's stale block overwrote the acknowledged write on node 0. Node 3 reports an older
/// promotion epoch than the one its peers lost it in: it is the full target of each peer
/// that recorded that (rule `EqualLostPromotion`); after the first such resync its
/// metadata holds that epoch again and the others find it in sync as usual.
#[test]
fn a_primary_back_without_its_promotion_is_resynced_in_full_by_the_peer_that_saw_it() {
    let (mut net, durable) = token_to_a_failing_disk();
    let off = durable.off;
    // Node 3, a detached Primary, meets its peers again (nothing holds its data), then goes.
    net.heal();
    net.isolate(3);
    net.run();
    for n in [0u8, 1] {
        assert_eq!(
            net.nodes[n as usize]
                .e
                .meta()
                .peer_bitmap_gens
                .get(&3)
                .copied(),
            Some(net.nodes[n as usize].e.meta().current),
            "node {n} lost its Primary node 3 at its generation\n{}",
            net.log.join("\n")
        );
    }
    demote(&mut net, 0);
    promote(&mut net, 1);
    // Repaired, node 3 restarts from its last durable state; its cache lost the write. It
    // meets the new Primary first.
    durable.restart(&mut net);
    net.uncut(1, 3);
    net.uncut(2, 3);
    net.run();
    assert_eq!(
        last_decision(&net, 1, 3),
        Some((SyncDecision::FullSource, Rule::EqualLostPromotion)),
        "{}",
        net.log.join("\n")
    );
    // The new Primary writes; node 3 marks it toward node 0 (their link is down).
    write_ok(&mut net, 1, 5, 24 * BLOCK as u64, 0xD1);
    net.heal();
    assert_ne!(
        last_decision(&net, 0, 3).map(|(_, rule)| rule),
        Some(Rule::EqualLostPromotion),
        "one full resync is enough\n{}",
        net.log.join("\n")
    );
    for n in [0u8, 1, 3] {
        assert_eq!(
            net.at(n, off, BLOCK),
            &[0xB0; BLOCK][..],
            "node {n} lost the acknowledged write\n{}",
            net.log.join("\n")
        );
    }
    net.assert_replicas_identical();
}

/// Simulator seeds 9705 and 8960 (three diskful nodes and a witness): the diskless Primary
/// crashed with a write (not acknowledged) that reached node 1 only, and a write every
/// replica had, neither settled. Each replica marked what it kept unsettled toward the
/// others, and the handshakes resynced the unions by rule `EqualBitsLowerNode`: node 1 gave
/// its block to node 3, then node 0 gave its own (older) block to node 1. Node 3 now
/// differed from node 0 there, but only node 1 had marked that (toward node 0), and the two
/// stayed different for good. A sync source now passes its marks toward third nodes on to
/// the target, with the blocks it resyncs.
#[test]
fn a_sync_target_marks_toward_third_nodes_what_its_source_marked() {
    let mut net = three();
    promote(&mut net, W);
    write_ok(&mut net, W, 1, 0, 0x01);
    net.feed(W, Event::Flush { id: 2 });
    net.run();
    // Everywhere, not settled.
    write_ok(&mut net, W, 3, 16 * BLOCK as u64, 0xA1);
    // Reaches node 1 only; then the diskless Primary is gone (its answers with it).
    let off = 8 * BLOCK as u64;
    start_write(&mut net, W, 4, off, 0xB0);
    net.q
        .retain(|(_, t, m)| !(matches!(m, Some(Message::Write { .. })) && (*t == 0 || *t == 3)));
    while net.at(1, off, BLOCK) != [0xB0; BLOCK] {
        net.q.retain(|(_, t, _)| *t != W);
        assert!(net.step(), "the write never reached node 1");
    }
    // Node 0 is cut off from the others: nodes 1 and 3 compare first.
    net.cut_link(0, 1);
    net.cut_link(0, 3);
    net.isolate(W);
    net.run();
    restart(&mut net, W, |_| {});
    net.uncut(W, 1);
    net.uncut(W, 3);
    net.run();
    assert!(
        net.at(3, off, BLOCK) == [0xB0; BLOCK],
        "node 1 gave node 3 its block\n{}",
        net.log.join("\n")
    );
    // Then node 0 with node 1 (node 0 is the source: lower node id), then with node 3.
    net.uncut(W, 0);
    net.uncut(0, 1);
    net.run();
    assert!(
        net.at(1, off, BLOCK) == net.at(0, off, BLOCK),
        "node 0 gave node 1 its block\n{}",
        net.log.join("\n")
    );
    net.heal();
    net.assert_replicas_identical();
}

/// Simulator seed 7674 (three diskful nodes, slow disks): nodes 1 and 2 formed a
/// dual-primary window and handed the write token back and forth. Node 0 saw the old
/// holder's report of the hand-off (Secondary) before the new holder's report (Primary),
/// saw no Primary, and was promoted: two Primaries with quorum. A peer that is a window
/// member is Primary to its consumer whatever its report's role: promotion next to it is
/// refused (`PrimaryElsewhere`).
#[test]
fn no_promotion_next_to_a_window_member_while_the_token_is_handed_over() {
    let mut net = Net::with_nodes(4, |c| c.allow_two_primaries = true);
    net.run();
    promote(&mut net, 0);
    let a = net.nodes[1]
        .e
        .promote(net.now)
        .expect("node 1 joins the window");
    net.apply(1, a);
    net.run();
    assert_eq!(
        net.nodes[1].e.role(),
        Role::Secondary,
        "member without the token"
    );
    // Node 1's consumer writes: the token moves from node 0 to node 1. Node 3 hears of
    // node 0's hand-over, not yet of node 1's promotion.
    start_write(&mut net, 1, 1, 0, 0xA1);
    let mut held = Vec::new();
    loop {
        let (to3, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut net.q)
            .into_iter()
            .partition(|(f, t, _)| (*f, *t) == (1, 3));
        held.extend(to3);
        net.q = rest.into();
        if !net.step() {
            break;
        }
    }
    assert_eq!(net.nodes[0].e.role(), Role::Secondary);
    assert_eq!(
        net.nodes[1].e.role(),
        Role::Primary,
        "{}",
        net.log.join("\n")
    );
    let r = net.nodes[3].e.promote(net.now);
    assert!(
        matches!(r, Err(PromoteError::PrimaryElsewhere(_))),
        "node 3 promoted next to the window: {r:?}\n{}",
        net.log.join("\n")
    );
    net.q.extend(held);
    net.run();
    assert_eq!(net.nodes[3].e.role(), Role::Secondary);
}

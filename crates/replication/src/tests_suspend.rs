//! `on-no-quorum=suspend`: three real engines (nodes 0 and 1 diskful, node 2 a witness) on the
//! in-memory network of `tests_diskless`.

use bytes::Bytes;
use tandem_repl_proto::{NodeId, Role};

use crate::tests_diskless::{Net, W};
use crate::*;

/// Node 0 Primary, on-no-quorum=suspend everywhere.
fn suspending() -> Net {
    primary_0(Net::with_config(|c| c.on_no_quorum = OnNoQuorum::Suspend))
}

/// `net` connected, node 0 promoted.
fn primary_0(mut net: Net) -> Net {
    net.run();
    let a = net.nodes[0].e.promote(net.now).expect("promote 0");
    net.apply(0, a);
    net.run();
    net
}

/// The witness (node 2) as a diskless Primary, on-no-quorum=suspend everywhere.
fn witness_primary_suspending() -> Net {
    let mut net = Net::with_config(|c| c.on_no_quorum = OnNoQuorum::Suspend);
    net.run();
    let a = net.nodes[W as usize].e.promote(net.now).expect("promote W");
    net.apply(W, a);
    net.run();
    net
}

fn write(net: &mut Net, id: RequestId, offset: u64, fill: u8) {
    write_on(net, 0, id, offset, fill);
}

/// A 4 KiB consumer write of `fill` bytes fed to node `n`.
fn write_on(net: &mut Net, n: NodeId, id: RequestId, offset: u64, fill: u8) {
    net.feed(
        n,
        Event::Write {
            id,
            offset,
            data: Bytes::from(vec![fill; 4096]),
            fua: false,
        },
    );
}

fn suspended(net: &Net) -> usize {
    net.nodes[0].e.status().suspended_requests
}

#[test]
fn requests_wait_for_quorum_and_complete_when_it_is_back() {
    let mut net = suspending();
    net.isolate(0);
    // Arrives without quorum: held, neither started nor failed.
    write(&mut net, 1, 0, 0x11);
    net.feed(0, Event::Flush { id: 2 });
    net.run();
    assert!(!net.done.contains_key(&1) && !net.done.contains_key(&2));
    assert_eq!(suspended(&net), 2);
    assert!(net.log.iter().any(|l| l.contains("consumer I/O suspended")));
    net.heal();
    assert!(net.result(1).is_ok() && net.result(2).is_ok());
    assert_eq!(suspended(&net), 0);
    assert!(net.at(1, 0, 4096).iter().all(|b| *b == 0x11));
    net.assert_replicas_identical();
}

#[test]
fn a_write_in_flight_when_quorum_goes_is_acknowledged_only_when_it_is_back() {
    let mut net = suspending();
    // Started with quorum; the links go before the peers answer.
    write(&mut net, 1, 8192, 0x22);
    net.isolate(0);
    net.run();
    assert!(
        !net.done.contains_key(&1),
        "acknowledged without quorum: {:?}",
        net.done.get(&1)
    );
    assert_eq!(suspended(&net), 1);
    // The operator cannot demote with I/O held; switching to io-error fails it.
    assert!(matches!(
        net.nodes[0].e.demote(net.now),
        Err(DemoteError::Busy(1))
    ));
    let a = net.nodes[0]
        .e
        .set_on_no_quorum(net.now, OnNoQuorum::IoError);
    net.apply(0, a);
    assert!(matches!(net.result(1), Err(RequestError::NoQuorum { .. })));
    // And back to suspend: the next one waits again, and completes after the heal.
    let a = net.nodes[0]
        .e
        .set_on_no_quorum(net.now, OnNoQuorum::Suspend);
    net.apply(0, a);
    write(&mut net, 2, 8192, 0x23);
    net.run();
    assert!(!net.done.contains_key(&2));
    net.heal();
    assert!(net.result(2).is_ok());
    net.assert_replicas_identical();
}

#[test]
fn held_requests_fail_when_another_primary_took_over() {
    let mut net = suspending();
    net.isolate(0);
    write(&mut net, 1, 0, 0x33);
    net.run();
    assert_eq!(suspended(&net), 1);
    // Node 1 has quorum with the witness: it becomes Primary and writes.
    let a = net.nodes[1].e.promote(net.now).expect("promote 1");
    net.apply(1, a);
    net.run();
    assert_eq!(net.nodes[1].e.role(), Role::Primary);
    // Node 0 meets it without quorum: it gives up the role, its held write fails.
    net.heal();
    assert!(matches!(net.result(1), Err(RequestError::NotPrimary)));
    assert_eq!(net.nodes[0].e.role(), Role::Secondary);
    assert_eq!(suspended(&net), 0);
    assert!(net.nodes[W as usize].e.status().quorum);
}

/// A diskless Primary under `suspend` cut off from both data peers at once (a blip): the
/// write, flush and read in flight and a write that arrives meanwhile wait instead of failing,
/// and complete once a peer holds its data again; the data is on both replicas.
#[test]
fn a_diskless_primary_holds_its_io_through_a_blip_around_it() {
    let mut net = witness_primary_suspending();
    write_on(&mut net, W, 1, 0, 0x11);
    net.run();
    assert!(net.result(1).is_ok());
    // In flight when the links go: a write, a flush, a read.
    write_on(&mut net, W, 2, 4096, 0x22);
    net.feed(W, Event::Flush { id: 3 });
    net.feed(
        W,
        Event::Read {
            id: 4,
            offset: 0,
            len: 4096,
        },
    );
    net.isolate(W);
    net.run();
    // Arrives during the blip.
    write_on(&mut net, W, 5, 8192, 0x55);
    net.run();
    for id in 2..=5 {
        assert!(
            !net.done.contains_key(&id),
            "request {id} completed during the blip: {:?}\n{}",
            net.done.get(&id),
            net.log.join("\n")
        );
    }
    assert_eq!(net.nodes[W as usize].e.status().suspended_requests, 4);
    assert!(net.log.iter().any(|l| l.contains("no peer holds our data")));
    net.heal();
    for id in 2..=5 {
        assert!(
            net.result(id).is_ok(),
            "request {id}: {:?}\n{}",
            net.result(id),
            net.log.join("\n")
        );
    }
    match net.result(4) {
        Ok(Reply::Data(d)) => assert!(d.iter().all(|b| *b == 0x11)),
        other => panic!("read: {other:?}"),
    }
    assert_eq!(net.nodes[W as usize].e.status().suspended_requests, 0);
    for n in 0..2 {
        assert!(net.at(n, 4096, 4096).iter().all(|b| *b == 0x22));
        assert!(net.at(n, 8192, 4096).iter().all(|b| *b == 0x55));
    }
    net.assert_replicas_identical();
}

/// The same blip, then the operator goes back to `io-error`: what waits fails at once.
#[test]
fn back_to_io_error_fails_what_a_diskless_primary_holds() {
    let mut net = witness_primary_suspending();
    write_on(&mut net, W, 1, 0, 0x11);
    net.isolate(W);
    net.run();
    net.feed(W, Event::Flush { id: 2 });
    net.run();
    assert!(!net.done.contains_key(&1) && !net.done.contains_key(&2));
    let now = net.now;
    let a = net.nodes[W as usize]
        .e
        .set_on_no_quorum(now, OnNoQuorum::IoError);
    net.apply(W, a);
    assert!(net.result(1).is_err(), "{:?}", net.result(1));
    assert!(net.result(2).is_err(), "{:?}", net.result(2));
    assert_eq!(net.nodes[W as usize].e.status().suspended_requests, 0);
    net.heal();
    net.assert_replicas_identical();
}

/// Node 0 is cut off: node 1 is promoted with the witness and writes request `id` (4 KiB of
/// `fill` at `offset`) under its own generation; then every link heals, without a split
/// brain.
fn failover_to_node_1_and_heal(net: &mut Net, id: RequestId, offset: u64, fill: u8) {
    net.cut_link(0, W);
    net.uncut(1, W);
    net.run();
    let a = net.nodes[1]
        .e
        .promote(net.now)
        .expect("promote 1 with the witness");
    net.apply(1, a);
    net.run();
    write_on(net, 1, id, offset, fill);
    net.run();
    assert!(net.result(id).is_ok(), "{:?}", net.result(id));
    net.heal();
    assert!(
        !net.log.iter().any(|l| l.contains("split brain")),
        "{}",
        net.log.join("\n")
    );
}

/// Simulator seeds 1782, 3116 and 4458 (three diskful, slow disks): a partition cut a
/// Primary's links one after another; between two of them a write started a new generation
/// with the quorum still there, then failed for want of it, and the generation met the one
/// of the Primary the others promoted as a split brain. A Primary now confirms quorum with a
/// ping round trip before it starts a generation (node 0 here, io-error): the partition
/// completes before the witness answers, the write fails without a generation, and after the
/// failover node 0 is the new Primary's target.
#[test]
fn a_primary_confirms_quorum_before_a_new_generation() {
    let mut net = primary_0(Net::new());
    let before = net.nodes[0].e.meta().current;
    net.cut_link(0, 1);
    net.run();
    // The write waits for the witness's answer; the partition goes on before it comes.
    write(&mut net, 1, 0, 0x31);
    assert!(!net.done.contains_key(&1));
    assert_eq!(net.nodes[0].e.meta().current, before);
    net.isolate(0);
    net.run();
    assert!(matches!(net.result(1), Err(RequestError::NoQuorum { .. })));
    assert_eq!(net.nodes[0].e.meta().current, before, "no generation");
    assert!(net.at(0, 0, 4096).iter().all(|b| *b == 0), "never written");
    // Node 1 takes over with the witness and writes under its own generation.
    failover_to_node_1_and_heal(&mut net, 2, 4096, 0x32);
    assert_eq!(net.nodes[0].e.role(), Role::Secondary);
    assert!(net.at(0, 4096, 4096).iter().all(|b| *b == 0x32));
    net.assert_replicas_identical();

    // With quorum confirmed, the write goes through under a new generation.
    write_on(&mut net, 1, 3, 8192, 0x33);
    net.run();
    assert!(net.result(3).is_ok(), "{:?}", net.result(3));
}

/// Simulator seed 1260 (three diskful, slow disks): under `suspend` a write that waited
/// behind an overlapping one and starts after quorum is gone lands locally and is held; it
/// starts no generation (the others may fail over meanwhile).
#[test]
fn a_write_that_starts_without_quorum_under_suspend_starts_no_generation() {
    let mut net = suspending();
    let before = net.nodes[0].e.meta().current;
    net.hold_disk(0);
    write(&mut net, 1, 0, 0x41);
    net.run();
    // Overlaps write 1: waits behind it.
    write(&mut net, 2, 0, 0x42);
    net.run();
    net.isolate(0);
    net.run();
    // Write 1 completes without quorum (held); write 2 starts.
    net.release_disk(0);
    net.run();
    assert!(
        !net.done.contains_key(&1) && !net.done.contains_key(&2),
        "{:?} {:?}\n{}",
        net.done.get(&1),
        net.done.get(&2),
        net.log.join("\n")
    );
    assert!(
        net.at(0, 0, 4096).iter().all(|b| *b == 0x42),
        "write 2 started"
    );
    assert_eq!(net.nodes[0].e.meta().current, before);
    // Node 1 takes over with the witness and writes; node 0 comes back as its target.
    failover_to_node_1_and_heal(&mut net, 3, 8192, 0x43);
    assert!(net.done.get(&2).is_some_and(|r| r.is_err()));
    net.assert_replicas_identical();
}

/// Simulator seed 13893 (slow disks): a write on the Primary waited only for node 1's
/// acknowledgement (slow disk there) when a partition cut node 1 and then the witness. The
/// write completed under the old generation with the witness still counted, so the witness
/// and node 1, a majority that never saw it, could promote node 1's stale copy. Now it
/// completes only under a new generation, after the witness confirmed quorum: here it
/// fails.
#[test]
fn a_write_waiting_for_a_lost_peer_completes_only_after_quorum_is_confirmed() {
    let mut net = primary_0(Net::new());
    net.hold_disk(1);
    write(&mut net, 1, 0, 0x51);
    net.run();
    assert!(!net.done.contains_key(&1), "waits for node 1");
    net.isolate(0);
    net.run();
    assert!(
        matches!(net.result(1), Err(RequestError::NoQuorum { .. })),
        "{:?}\n{}",
        net.result(1),
        net.log.join("\n")
    );
}

//! The dual-primary window: three real engines (nodes 0 and 1 diskful, node 2 a witness) on
//! the in-memory network of `tests_diskless`, consumers writing on both Primaries.

use bytes::Bytes;
use tandem_repl_proto::{NodeId, Role};

use crate::tests_diskless::{Net, W};
use crate::*;

fn open_window() -> Net {
    let mut net = Net::with_config(|c| c.allow_two_primaries = true);
    net.run();
    net
}

fn promote(net: &mut Net, n: NodeId) -> Result<(), PromoteError> {
    let a = net.nodes[n as usize].e.promote(net.now)?;
    net.apply(n, a);
    net.run();
    Ok(())
}

fn demote(net: &mut Net, n: NodeId) -> Result<(), DemoteError> {
    let a = net.nodes[n as usize].e.demote(net.now)?;
    net.apply(n, a);
    net.run();
    Ok(())
}

fn write(net: &mut Net, n: NodeId, id: RequestId, offset: u64, fill: u8, len: usize) {
    net.feed(
        n,
        Event::Write {
            id,
            offset,
            data: Bytes::from(vec![fill; len]),
            fua: false,
        },
    );
}

fn read(net: &mut Net, n: NodeId, id: RequestId, offset: u64, len: u32) -> Vec<u8> {
    net.feed(n, Event::Read { id, offset, len });
    net.run();
    match net.result(id) {
        Ok(Reply::Data(d)) => d.to_vec(),
        other => panic!("read {id} on node {n}: {other:?}\n{}", net.log.join("\n")),
    }
}

fn dual(net: &Net, n: NodeId) -> Option<DualPrimary> {
    net.nodes[n as usize].e.status().dual_primary
}

/// Node 0 Primary, node 1 second Primary.
fn two_primaries() -> Net {
    let mut net = open_window();
    promote(&mut net, 0).expect("promote 0");
    promote(&mut net, 1).expect("promote 1 into the window");
    assert_eq!(
        dual(&net, 0),
        Some(DualPrimary {
            partner: 1,
            write_token: true
        })
    );
    assert_eq!(
        dual(&net, 1),
        Some(DualPrimary {
            partner: 0,
            write_token: false
        })
    );
    net
}

fn roles(net: &Net) -> Vec<Role> {
    net.nodes.iter().map(|n| n.e.role()).collect()
}

#[test]
fn a_second_primary_needs_the_window_open_on_both_nodes() {
    // Closed everywhere: refused as always.
    let mut net = Net::new();
    net.run();
    promote(&mut net, 0).unwrap();
    assert_eq!(promote(&mut net, 1), Err(PromoteError::PrimaryElsewhere(0)));
    // Open only on the candidate: the Primary does not allow it.
    let a = net.nodes[1]
        .e
        .set_allow_two_primaries(net.now, true)
        .unwrap();
    net.apply(1, a);
    net.run();
    assert_eq!(promote(&mut net, 1), Err(PromoteError::WindowClosedOn(0)));
    // Open on the Primary too.
    let a = net.nodes[0]
        .e
        .set_allow_two_primaries(net.now, true)
        .unwrap();
    net.apply(0, a);
    net.run();
    promote(&mut net, 1).expect("join");
    assert_eq!(dual(&net, 1).map(|d| d.partner), Some(0));
    assert_eq!(dual(&net, 0).map(|d| d.partner), Some(1));
    // The witness cannot be a third one, and nobody closes the window under two Primaries.
    assert_eq!(promote(&mut net, W), Err(PromoteError::PrimaryElsewhere(0)));
    assert_eq!(
        net.nodes[0].e.set_allow_two_primaries(net.now, false),
        Err(WindowError::TwoPrimaries(1))
    );
    // One replication Primary at any time.
    assert_eq!(
        roles(&net),
        vec![Role::Primary, Role::Secondary, Role::Secondary]
    );
}

#[test]
fn a_second_primary_must_be_in_sync_with_the_first() {
    let mut net = open_window();
    promote(&mut net, 0).unwrap();
    net.cut_link(0, 1);
    write(&mut net, 0, 1, 0, 0xaa, 4096);
    net.run();
    assert!(net.result(1).is_ok());
    net.heal();
    // Reconnected and resynced by now: in sync again, so it may join.
    promote(&mut net, 1).expect("join after the resync");
    // Now cut it off again while it is the second Primary, and let the first write on.
    net.cut_link(0, 1);
    assert_eq!(
        dual(&net, 1),
        None,
        "the member without the token leaves the window"
    );
    assert_eq!(dual(&net, 0), None);
    write(&mut net, 1, 2, 0, 0xbb, 4096);
    net.run();
    assert_eq!(net.result(2), &Err(RequestError::NotPrimary));
    write(&mut net, 0, 3, 8192, 0xcc, 4096);
    net.run();
    assert!(
        net.result(3).is_ok(),
        "the token holder goes on with the witness"
    );
    net.heal();
    // Node 1 is behind node 0 until the resync ran; then they agree.
    net.assert_replicas_identical();
}

#[test]
fn writes_on_both_primaries_hand_the_token_over_and_every_replica_agrees() {
    let mut net = two_primaries();
    // A write on the member without the token: it asks, node 0 hands over (it is idle).
    write(&mut net, 1, 1, 0, 0x11, 8192);
    net.run();
    assert!(net.result(1).is_ok());
    assert_eq!(
        roles(&net),
        vec![Role::Secondary, Role::Primary, Role::Secondary]
    );
    assert_eq!(dual(&net, 1).map(|d| d.write_token), Some(true));
    assert_eq!(dual(&net, 0).map(|d| d.write_token), Some(false));
    assert_eq!(net.at(0, 0, 8192), &[0x11; 8192][..]);
    // Both consumers at once, overlapping ranges, before anything is delivered: node 0's
    // requests wait for the token, node 1's run first; every replica applies the same order.
    let mut id = 10;
    for round in 0..5u8 {
        for n in [0u8, 1] {
            id += 1;
            let fill = 0x20 + round * 2 + n;
            write(&mut net, n, id, 4096 * u64::from(round), fill, 8192);
        }
    }
    net.run();
    for i in 11..=id {
        assert!(net.result(i).is_ok(), "write {i}: {:?}", net.result(i));
    }
    net.assert_replicas_identical();
    // Reads on either Primary see the same data (the one without the token fetches it first).
    let a = read(&mut net, 0, 100, 0, 32768);
    let b = read(&mut net, 1, 101, 0, 32768);
    assert_eq!(a, b);
    assert_eq!(a, net.at(1, 0, 32768));
    // A flush on either one completes.
    net.feed(1, Event::Flush { id: 102 });
    net.feed(0, Event::Flush { id: 103 });
    net.run();
    assert!(net.result(102).is_ok() && net.result(103).is_ok());
    assert!(
        net.log
            .iter()
            .filter(|l| l.contains("write token from"))
            .count()
            >= 3,
        "the token went back and forth:\n{}",
        net.log.join("\n")
    );
    // Never two replication Primaries, and the witness saw no two Primaries.
    assert!(roles(&net).iter().filter(|r| **r == Role::Primary).count() <= 1);
    assert!(
        !net.log.iter().any(|l| l.contains("TwoPrimaries")),
        "{}",
        net.log.join("\n")
    );
}

/// Simulator seed 34 with slow disks: the token holder was asked for the token while its
/// disk still held a write, and a request of its own consumer arrived before that write
/// completed. The queued request counted as in flight, so the holder never handed over and
/// both members' requests waited for good.
#[test]
fn a_holder_asked_for_the_token_hands_it_over_once_its_slow_write_completes() {
    let mut net = two_primaries();
    net.hold_disk(0);
    write(&mut net, 0, 1, 0, 0x01, 4096);
    net.run();
    // The other member asks for the token; node 0's write is still on its disk.
    write(&mut net, 1, 2, 4096, 0x02, 4096);
    net.run();
    // Node 0's consumer sends another request: queued behind the hand-over.
    write(&mut net, 0, 3, 8192, 0x03, 4096);
    net.run();
    assert!(!net.done.contains_key(&1) && !net.done.contains_key(&2) && !net.done.contains_key(&3));
    net.release_disk(0);
    net.run();
    for id in 1..=3 {
        assert!(
            net.done.get(&id).is_some_and(|r| r.is_ok()),
            "write {id}: {:?}\n{}",
            net.done.get(&id),
            net.log.join("\n")
        );
    }
    // Node 1 got the token for write 2 and node 0 got it back for write 3.
    assert_eq!(dual(&net, 0).map(|d| d.write_token), Some(true));
    assert_eq!(net.at(1, 0, 4096), &[0x01; 4096][..]);
    assert_eq!(net.at(0, 4096, 4096), &[0x02; 4096][..]);
    assert_eq!(net.at(1, 8192, 4096), &[0x03; 4096][..]);
    net.assert_replicas_identical();
}

#[test]
fn the_migration_hand_off_leaves_one_plain_primary() {
    let mut net = two_primaries();
    write(&mut net, 0, 1, 0, 0x01, 4096);
    net.run();
    // The destination takes over (a first write), the source's consumer goes away.
    write(&mut net, 1, 2, 4096, 0x02, 4096);
    net.run();
    assert!(net.result(2).is_ok());
    demote(&mut net, 0).expect("the source leaves");
    assert_eq!(dual(&net, 0), None);
    assert_eq!(dual(&net, 1), None, "a window of one is no window");
    assert_eq!(
        roles(&net),
        vec![Role::Secondary, Role::Primary, Role::Secondary]
    );
    write(&mut net, 1, 3, 8192, 0x03, 4096);
    net.run();
    assert!(net.result(3).is_ok());
    // Now the window can close, and a promotion elsewhere is refused again.
    let a = net.nodes[1]
        .e
        .set_allow_two_primaries(net.now, false)
        .unwrap();
    net.apply(1, a);
    net.run();
    assert_eq!(promote(&mut net, 0), Err(PromoteError::WindowClosedOn(1)));
    net.assert_replicas_identical();
}

#[test]
fn the_source_leaving_before_it_handed_over_gives_the_other_the_token() {
    let mut net = two_primaries();
    // Node 0 (token holder, idle) leaves: node 1 becomes the replication Primary at once.
    demote(&mut net, 0).expect("leave");
    assert_eq!(
        roles(&net),
        vec![Role::Secondary, Role::Primary, Role::Secondary]
    );
    write(&mut net, 1, 1, 0, 0x05, 4096);
    net.run();
    assert!(net.result(1).is_ok());
    // A member without the token that leaves: the holder simply goes on.
    let mut net = two_primaries();
    demote(&mut net, 1).expect("leave");
    assert_eq!(dual(&net, 0), None);
    assert_eq!(
        roles(&net),
        vec![Role::Primary, Role::Secondary, Role::Secondary]
    );
    net.assert_replicas_identical();
}

//! `on-no-quorum=suspend`: three real engines (nodes 0 and 1 diskful, node 2 a witness) on the
//! in-memory network of `tests_diskless`.

use bytes::Bytes;
use tandem_repl_proto::Role;

use crate::tests_diskless::{Net, W};
use crate::*;

fn suspending() -> Net {
    let mut net = Net::with_config(|c| c.on_no_quorum = OnNoQuorum::Suspend);
    net.run();
    let a = net.nodes[0].e.promote(net.now).expect("promote 0");
    net.apply(0, a);
    net.run();
    net
}

fn write(net: &mut Net, id: RequestId, offset: u64, fill: u8) {
    net.feed(
        0,
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

//! Engine tests driven by hand: ordering, protocol C completion, quorum, promotion refusals,
//! bad peer input. The simulator (`tandem-sim`) covers the combinations.

use bytes::Bytes;
use tandem_repl_proto::{DisconnectReason, Message, Role};

use crate::*;

const SIZE: u64 = 1 << 20;

fn engine(id: u8, peers: &[(u8, bool)]) -> Engine {
    engine_with(id, peers, |_| {})
}

fn engine_with(id: u8, peers: &[(u8, bool)], set: impl FnOnce(&mut Config)) -> Engine {
    let peers = peers
        .iter()
        .map(|(n, d)| PeerConfig {
            node_id: *n,
            diskful: *d,
        })
        .collect();
    let mut cfg = Config::new(id, true, peers, SIZE);
    set(&mut cfg);
    let p = Persisted::new_volume(&cfg, 77);
    Engine::new(cfg, p, 0).0
}

/// Feeds PeerUp and a minimal handshake from `peer` (same generation, no bits) and its Pong.
fn connect(e: &mut Engine, peer: u8, diskful: bool, role: Role) -> Vec<Action> {
    let mut out = e.handle(1, Event::PeerUp { peer });
    let report = tandem_repl_proto::StateReport {
        role,
        disk_state: if diskful {
            tandem_repl_proto::DiskState::UpToDate
        } else {
            tandem_repl_proto::DiskState::Diskless
        },
        generations: tandem_repl_proto::Generations {
            current: if diskful { 77 } else { 0 },
            ..Default::default()
        },
        ..report_of(peer)
    };
    out.extend(e.handle(
        2,
        Event::PeerMessage {
            peer,
            msg: Message::StateReport(Box::new(report)),
        },
    ));
    if diskful {
        out.extend(e.handle(
            3,
            Event::PeerMessage {
                peer,
                msg: Message::OutOfSync {
                    flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                    ranges: vec![],
                },
            },
        ));
    }
    // Answer every Ping we sent.
    let tokens: Vec<u64> = out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                peer: p,
                msg: Message::Ping { token },
            } if *p == peer => Some(*token),
            _ => None,
        })
        .collect();
    for token in tokens {
        out.extend(e.handle(
            4,
            Event::PeerMessage {
                peer,
                msg: Message::Pong { token },
            },
        ));
    }
    out
}

/// Feeds the Pongs to the Pings among `a` (a Primary confirming quorum before a new
/// generation, see `Engine::quorum_confirmed`); returns `a` with what followed.
fn with_pongs(e: &mut Engine, now: u64, mut a: Vec<Action>) -> Vec<Action> {
    let pings: Vec<(u8, u64)> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send {
                peer,
                msg: Message::Ping { token },
            } => Some((*peer, *token)),
            _ => None,
        })
        .collect();
    for (peer, token) in pings {
        a.extend(e.handle(
            now,
            Event::PeerMessage {
                peer,
                msg: Message::Pong { token },
            },
        ));
    }
    a
}

/// A `StateReport` of `peer`: Secondary, UpToDate at generation 77, volume size `SIZE`, no
/// bitmaps, nothing outdated; tests change what they need with struct update syntax.
fn report_of(peer: u8) -> tandem_repl_proto::StateReport {
    tandem_repl_proto::StateReport {
        seq: 1,
        node_id: peer,
        role: Role::Secondary,
        disk_state: tandem_repl_proto::DiskState::UpToDate,
        quorum: Default::default(),
        flags: 0,
        size_bytes: SIZE,
        generations: tandem_repl_proto::Generations {
            current: 77,
            ..Default::default()
        },
        peer_bitmaps: vec![],
        outdated: 0,
        outdated_gen: 0,
        outdated_by: 0,
        primary_epoch: 0,
        lost_writer: None,
    }
}

/// A report of node 1 (as [`report_of`]) with sequence number `seq` and `disk_state`.
fn report_from_1(seq: u64, disk_state: tandem_repl_proto::DiskState) -> Event {
    Event::PeerMessage {
        peer: 1,
        msg: Message::StateReport(Box::new(tandem_repl_proto::StateReport {
            seq,
            disk_state,
            ..report_of(1)
        })),
    }
}

fn disk_writes(a: &[Action]) -> Vec<(IoId, u64)> {
    a.iter()
        .filter_map(|a| match a {
            Action::DiskWrite { io, offset, .. } => Some((*io, *offset)),
            _ => None,
        })
        .collect()
}

fn sent_writes(a: &[Action], to: u8) -> Vec<(u64, u64)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: Message::Write { seq, offset, .. },
            } if *peer == to => Some((*seq, *offset)),
            _ => None,
        })
        .collect()
}

fn completions(a: &[Action]) -> Vec<(RequestId, bool)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Complete { id, result } => Some((*id, result.is_ok())),
            _ => None,
        })
        .collect()
}

fn write(id: u64, offset: u64, len: usize) -> Event {
    Event::Write {
        id,
        offset,
        data: Bytes::from(vec![id as u8; len]),
        fua: false,
    }
}

/// Node 0 Primary with diskful peer 1 and witness 2, all connected.
fn primary() -> Engine {
    primary_with(|_| {})
}

fn primary_with(set: impl FnOnce(&mut Config)) -> Engine {
    let mut e = engine_with(0, &[(1, true), (2, false)], set);
    connect(&mut e, 1, true, Role::Secondary);
    connect(&mut e, 2, false, Role::Secondary);
    e.promote(5).expect("promote");
    // Pongs for the role-change pings.
    for peer in [1, 2] {
        e.handle(
            6,
            Event::PeerMessage {
                peer,
                msg: Message::Pong { token: u64::MAX },
            },
        );
    }
    e
}

#[test]
fn protocol_c_completes_after_local_and_peer() {
    let mut e = primary();
    let a = e.handle(10, write(1, 0, 4096));
    let w = disk_writes(&a);
    let s = sent_writes(&a, 1);
    assert_eq!(w.len(), 1);
    assert_eq!(s.len(), 1);
    assert!(completions(&a).is_empty());
    let a = e.handle(
        11,
        Event::DiskWriteDone {
            io: w[0].0,
            result: Ok(()),
        },
    );
    assert!(completions(&a).is_empty(), "peer has not acked yet");
    let a = e.handle(
        12,
        Event::PeerMessage {
            peer: 1,
            msg: Message::WriteAck {
                seq: s[0].0,
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    assert_eq!(completions(&a), vec![(1, true)]);
}

/// Runs write `id` (4 KiB at block `id`) to completion: local disk and peer 1's ack. Returns
/// the flushes sent to peer 1 on the way (their seq) and the local disk flushes (their io).
fn write_acked(e: &mut Engine, id: u64) -> (Vec<u64>, Vec<IoId>) {
    let mut out = e.handle(10 + id, write(id, id * 4096, 4096));
    let s = sent_writes(&out, 1);
    for (io, _) in disk_writes(&out) {
        out.extend(e.handle(10 + id, Event::DiskWriteDone { io, result: Ok(()) }));
    }
    out.extend(e.handle(
        10 + id,
        Event::PeerMessage {
            peer: 1,
            msg: Message::WriteAck {
                seq: s[0].0,
                status: tandem_repl_proto::Status::Ok,
            },
        },
    ));
    assert_eq!(completions(&out), vec![(id, true)], "write {id} completes");
    let flushes = out
        .iter()
        .filter_map(|a| match a {
            Action::Send {
                peer: 1,
                msg: Message::Flush { seq },
            } => Some(*seq),
            _ => None,
        })
        .collect();
    let local = out
        .iter()
        .filter_map(|a| match a {
            Action::DiskFlush { io } => Some(*io),
            _ => None,
        })
        .collect();
    (flushes, local)
}

#[test]
fn a_primary_whose_consumer_never_flushes_flushes_its_peers_itself() {
    let mut e = primary_with(|c| c.flush_after_writes = 4);
    for id in 1..=3 {
        assert_eq!(write_acked(&mut e, id), (vec![], vec![]), "write {id}");
    }
    // The fourth write the peer acknowledged without a flush: the engine flushes the peer
    // (its own disk has the activity log), and nobody is told about that flush.
    let (flushes, local) = write_acked(&mut e, 4);
    assert_eq!(flushes.len(), 1, "one flush of peer 1");
    assert_eq!(local, vec![], "no flush of the local disk");
    // While it runs, no second one starts.
    assert_eq!(write_acked(&mut e, 5).0, vec![]);
    let out = e.handle(
        20,
        Event::PeerMessage {
            peer: 1,
            msg: Message::FlushAck {
                seq: flushes[0],
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    assert_eq!(completions(&out), vec![], "no consumer waits for it");
    // The flush covered writes 1 to 4 (forgotten now); write 5 was sent after it and counts
    // toward the next one, due with the fourth uncovered write.
    for id in 6..=7 {
        assert_eq!(write_acked(&mut e, id).0, vec![], "write {id}");
    }
    assert_eq!(
        write_acked(&mut e, 8).0.len(),
        1,
        "write 8 starts the next flush"
    );
}

#[test]
fn overlapping_write_is_held_back_until_the_first_completes() {
    let mut e = primary();
    let a1 = e.handle(10, write(1, 0, 8192));
    let a2 = e.handle(10, write(2, 4096, 4096));
    let a3 = e.handle(10, write(3, 65536, 4096));
    assert_eq!(disk_writes(&a1).len(), 1);
    assert!(disk_writes(&a2).is_empty(), "overlapping write must wait");
    assert!(sent_writes(&a2, 1).is_empty());
    assert_eq!(disk_writes(&a3).len(), 1, "independent write proceeds");
    let io = disk_writes(&a1)[0].0;
    let seq1 = sent_writes(&a1, 1)[0].0;
    e.handle(11, Event::DiskWriteDone { io, result: Ok(()) });
    let a = e.handle(
        12,
        Event::PeerMessage {
            peer: 1,
            msg: Message::WriteAck {
                seq: seq1,
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    assert_eq!(completions(&a), vec![(1, true)]);
    // Now the held-back write starts, with a higher sequence number than the first.
    let s = sent_writes(&a, 1);
    assert_eq!(s.len(), 1);
    assert!(s[0].0 > seq1);
    assert_eq!(disk_writes(&a).len(), 1);
}

#[test]
fn secondary_applies_overlapping_writes_in_arrival_order() {
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 0, true, Role::Primary);
    let msg = |seq, offset| Event::PeerMessage {
        peer: 0,
        msg: Message::Write {
            seq,
            offset,
            flags: 0,
            data: Bytes::from(vec![seq as u8; 4096]),
        },
    };
    let a1 = e.handle(10, msg(5, 0));
    let a2 = e.handle(10, msg(6, 0));
    assert_eq!(disk_writes(&a1).len(), 1);
    assert!(disk_writes(&a2).is_empty());
    let a = e.handle(
        11,
        Event::DiskWriteDone {
            io: disk_writes(&a1)[0].0,
            result: Ok(()),
        },
    );
    assert_eq!(
        disk_writes(&a).len(),
        1,
        "second write starts after the first"
    );
}

#[test]
fn primary_without_quorum_fails_writes() {
    let mut e = primary();
    e.handle(20, Event::PeerDown { peer: 1 });
    assert!(e.has_quorum(), "witness keeps quorum");
    e.handle(21, Event::PeerDown { peer: 2 });
    assert!(!e.has_quorum());
    let a = e.handle(22, write(9, 0, 4096));
    assert_eq!(completions(&a), vec![(9, false)]);
    assert!(disk_writes(&a).is_empty(), "nothing written without quorum");
    let a = e.handle(
        23,
        Event::Read {
            id: 10,
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(completions(&a), vec![(10, false)], "no stale reads either");
}

#[test]
fn promotion_refusals_are_typed() {
    let mut e = engine(0, &[(1, true), (2, false)]);
    assert!(matches!(e.promote(1), Err(PromoteError::NoQuorum { .. })));
    connect(&mut e, 1, true, Role::Primary);
    connect(&mut e, 2, false, Role::Secondary);
    assert_eq!(e.promote(2), Err(PromoteError::PrimaryElsewhere(1)));
}

#[test]
fn writes_while_a_peer_is_away_set_bits_and_mint() {
    let mut e = primary();
    let gen_before = e.meta().current;
    e.handle(20, Event::PeerDown { peer: 1 });
    let a = e.handle(21, write(1, 8192, 4096));
    // The new generation waits until the witness confirmed quorum.
    assert!(!a.iter().any(|x| matches!(x, Action::DiskWrite { .. })));
    assert_eq!(e.meta().current, gen_before);
    let a = with_pongs(&mut e, 22, a);
    assert!(a.iter().any(|x| matches!(x, Action::PersistMeta(_))));
    // Bits and the new generation are persisted before the disk write.
    let pos = |f: &dyn Fn(&Action) -> bool| a.iter().position(f).expect("present");
    let bits = pos(&|x| {
        matches!(
            x,
            Action::PersistBits {
                peer: 1,
                set: true,
                ..
            }
        )
    });
    let meta = pos(&|x| matches!(x, Action::PersistMeta(_)));
    let dw = pos(&|x| matches!(x, Action::DiskWrite { .. }));
    assert!(bits < dw && meta < dw);
    assert_ne!(e.meta().current, gen_before);
    assert_eq!(e.meta().peer_bitmap_gens[&1], gen_before);
    assert_eq!(e.bitmap(1).map(|b| b.count()), Some(1));
}

#[test]
fn bad_peer_input_disconnects_that_peer() {
    let mut e = primary();
    let a = e.handle(
        30,
        Event::PeerMessage {
            peer: 1,
            msg: Message::WriteAck {
                seq: 999,
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Disconnect {
            peer: 1,
            reason: DisconnectReason::ProtocolError,
            reconnect: true
        }
    )));
    // A Secondary refuses writes from a peer that is not Primary.
    let mut s = engine(1, &[(0, true), (2, false)]);
    connect(&mut s, 0, true, Role::Secondary);
    let a = s.handle(
        10,
        Event::PeerMessage {
            peer: 0,
            msg: Message::Write {
                seq: 1,
                offset: 0,
                flags: 0,
                data: Bytes::from_static(&[1; 512]),
            },
        },
    );
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Disconnect { peer: 0, .. }))
    );
    assert!(disk_writes(&a).is_empty());
}

#[test]
fn crashed_primary_marks_its_activity_log() {
    let cfg = Config::new(
        0,
        true,
        vec![PeerConfig {
            node_id: 1,
            diskful: true,
        }],
        SIZE,
    );
    let mut p = Persisted::new_volume(&cfg, 5);
    p.meta.primary = true;
    p.activity_log = vec![0];
    let (e, actions) = Engine::new(cfg.clone(), p, 0);
    assert_eq!(e.role(), Role::Secondary);
    assert!(e.status().crashed_primary);
    assert_eq!(
        e.bitmap(1).map(|b| b.out_of_sync_bytes()),
        Some(cfg.al_extent_bytes.min(SIZE))
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::PersistMeta(m) if !m.primary))
    );
}

/// PeerUp, a StateReport (same generation, UpToDate Secondary) and a bitmap with one block
/// out of sync from `peer`: with no bits of our own we are its sync target
/// (`EqualBitsOneSide`).
fn connect_as_target(e: &mut Engine, peer: u8) -> Vec<Action> {
    connect_marked(e, peer, 0)
}

/// Feeds PeerUp and a handshake from `peer` (UpToDate at our generation) whose bitmap marks
/// the block at `offset` out of sync toward us.
fn connect_marked(e: &mut Engine, peer: u8, offset: u64) -> Vec<Action> {
    connect_marked_as(e, peer, offset, Role::Secondary)
}

/// [`connect_marked`] from a peer in `role`.
fn connect_marked_as(e: &mut Engine, peer: u8, offset: u64, role: Role) -> Vec<Action> {
    let mut out = e.handle(1, Event::PeerUp { peer });
    for msg in [
        Message::StateReport(Box::new(tandem_repl_proto::StateReport {
            role,
            ..report_of(peer)
        })),
        Message::OutOfSync {
            flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
            ranges: vec![tandem_repl_proto::ByteRange { offset, len: 4096 }],
        },
    ] {
        out.extend(e.handle(2, Event::PeerMessage { peer, msg }));
    }
    out
}

/// Node 0 with diskful peers 1 and 2, resyncing from node 1 (which confirmed).
fn resyncing_from_node_1() -> Engine {
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect_as_target(&mut e, 1);
    e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 4096,
            },
        },
    );
    e
}

/// `peer` (connected, as [`report_of`]) reports that it became Primary.
fn reports_primary(e: &mut Engine, peer: u8) -> Vec<Action> {
    e.handle(
        20,
        Event::PeerMessage {
            peer,
            msg: Message::StateReport(Box::new(tandem_repl_proto::StateReport {
                seq: 2,
                role: Role::Primary,
                ..report_of(peer)
            })),
        },
    )
}

fn disconnects(a: &[Action]) -> Vec<(u8, DisconnectReason)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Disconnect { peer, reason, .. } => Some((*peer, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn sync_target_stays_up_to_date_until_the_source_confirms() {
    use tandem_repl_proto::DiskState;
    let mut e = engine(0, &[(1, true), (2, true)]);
    let out = connect_as_target(&mut e, 1);
    assert_eq!(
        e.status().peers[0].last_decision,
        Some((SyncDecision::BitmapTarget, Rule::EqualBitsOneSide))
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: Message::ResyncRequest { .. },
            ..
        }
    )));
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
    // The other end decided "target" too (a different snapshot): its request breaks the link
    // and we still hold good data.
    let out = e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncRequest {
                id: 1,
                offset: 0,
                len: 4096,
            },
        },
    );
    assert_eq!(
        disconnects(&out),
        vec![(1, DisconnectReason::ProtocolError)]
    );
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
    // With a source that confirms, we become Inconsistent (persisted) before its data.
    connect_as_target(&mut e, 2);
    let out = e.handle(
        5,
        Event::PeerMessage {
            peer: 2,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 4096,
            },
        },
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::PersistMeta(m) if m.disk_state == DiskState::Inconsistent
    )));
    assert_eq!(e.status().disk_state, DiskState::Inconsistent);
}

/// Simulator seed 8648 (three diskful): a target of the Primary whose link drops before the
/// resync began holds data the Primary replaces: Outdated, so it is nobody's source (it was
/// the source of a replica in sync with that Primary, its unacknowledged block replacing an
/// acknowledged one there). A Secondary source's interrupted resync leaves it UpToDate.
#[test]
fn a_target_of_the_primary_cut_off_before_the_resync_began_is_outdated() {
    use tandem_repl_proto::DiskState;
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect_marked_as(&mut e, 1, 0, Role::Primary);
    assert_eq!(
        e.status().peers[0].last_decision,
        Some((SyncDecision::BitmapTarget, Rule::EqualBitsPrimary))
    );
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
    let out = e.handle(3, Event::PeerDown { peer: 1 });
    assert!(out.iter().any(|a| matches!(
        a,
        Action::PersistMeta(m) if m.disk_state == DiskState::Outdated
    )));
    assert_eq!(e.status().disk_state, DiskState::Outdated);
    assert!(e.promote(4).is_err(), "an Outdated node is not promoted");
    // Once the resync began, the target is Inconsistent and a lost link leaves it so.
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect_marked_as(&mut e, 1, 0, Role::Primary);
    e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 4096,
            },
        },
    );
    e.handle(4, Event::PeerDown { peer: 1 });
    assert_eq!(e.status().disk_state, DiskState::Inconsistent);
    // A Secondary source that goes before it began: we keep our data as it was.
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect_as_target(&mut e, 1);
    e.handle(3, Event::PeerDown { peer: 1 });
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
}

#[test]
fn interrupted_resync_makes_paused_links_compare_again() {
    let mut e = resyncing_from_node_1();
    // A second source while the first resync runs: paused.
    connect_as_target(&mut e, 2);
    assert_eq!(e.status().peers[1].repl_state, ReplState::PausedSync);
    let out = e.handle(4, Event::PeerDown { peer: 1 });
    assert_eq!(
        disconnects(&out),
        vec![(2, DisconnectReason::ConfigChanged)]
    );
}

#[test]
fn a_second_source_finding_us_behind_adds_its_bits_to_the_running_resync() {
    let mut e = resyncing_from_node_1();
    // Node 2 (same generation) marked block 2 for us: its link pauses, and the block is
    // fetched from node 1 as part of the running resync.
    let out = connect_marked(&mut e, 2, 8192);
    assert_eq!(e.status().peers[1].repl_state, ReplState::PausedSync);
    assert!(
        e.bitmap(1).unwrap().test(2),
        "block 2 is out of sync toward node 1"
    );
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            peer: 1,
            msg: Message::ResyncRequest { offset: 8192, .. }
        }
    )));
}

/// Node 1 reports block 2 different (an `OutOfSync` on the established link, as verify
/// findings): we mark it toward node 1.
fn mark_block_2_for_node_1(e: &mut Engine) {
    e.handle(
        10,
        Event::PeerMessage {
            peer: 1,
            msg: Message::OutOfSync {
                flags: 0,
                ranges: vec![tandem_repl_proto::ByteRange {
                    offset: 8192,
                    len: 4096,
                }],
            },
        },
    );
}

#[test]
fn a_peer_that_caught_up_elsewhere_gets_the_blocks_we_marked_for_it() {
    use tandem_repl_proto::DiskState;
    let mut e = primary();
    // Block 2 marked for node 1 (as by a write it did not get) over an established link.
    mark_block_2_for_node_1(&mut e);
    assert_eq!(e.bitmap(1).unwrap().count(), 1);
    // It goes Outdated and comes back UpToDate at our generation (resynced from another
    // replica): we resync our bits to it online.
    e.handle(11, report_from_1(2, DiskState::Outdated));
    let out = e.handle(12, report_from_1(3, DiskState::UpToDate));
    assert_eq!(resync_begins(&out), 1);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            peer: 1,
            msg: Message::OutOfSync { flags: 0, ranges }
        } if ranges.len() == 1 && ranges[0].offset == 8192
    )));
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncSource);
    // It takes the resync and fetches the block from us: in sync.
    e.handle(15, report_from_1(6, DiskState::Inconsistent));
    e.handle(
        16,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncRequest {
                id: 1,
                offset: 8192,
                len: 4096,
            },
        },
    );
    e.handle(17, report_from_1(7, DiskState::UpToDate));
    assert_eq!(e.status().peers[0].repl_state, ReplState::Established);
    assert_eq!(e.bitmap(1).unwrap().count(), 0);
}

#[test]
fn a_source_the_target_never_asked_keeps_its_bits() {
    use tandem_repl_proto::DiskState;
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect(&mut e, 1, true, Role::Secondary);
    // Block 2 marked for node 1, then a new link: we are its sync source.
    mark_block_2_for_node_1(&mut e);
    e.handle(11, Event::PeerDown { peer: 1 });
    connect(&mut e, 1, true, Role::Secondary);
    assert_eq!(
        e.status().peers[0].last_decision,
        Some((SyncDecision::BitmapSource, Rule::EqualBitsOneSide))
    );
    // It resyncs from another replica instead (our link paused on its side) and reports
    // UpToDate without asking us for anything: our bit stays and goes to it online.
    e.handle(12, report_from_1(5, DiskState::Inconsistent));
    let out = e.handle(13, report_from_1(6, DiskState::UpToDate));
    assert_eq!(e.bitmap(1).unwrap().count(), 1);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::Send {
            peer: 1,
            msg: Message::ResyncBegin { bytes: 4096, .. }
        }
    )));
}

// ------------------------------------------------------------------ online verify

fn checksum_jobs(a: &[Action]) -> Vec<(IoId, u64, u32)> {
    a.iter()
        .filter_map(|a| match a {
            Action::DiskChecksum {
                io, offset, len, ..
            } => Some((*io, *offset, *len)),
            _ => None,
        })
        .collect()
}

fn checksum_requests(a: &[Action], to: u8) -> Vec<(u64, u64, u32)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg:
                    Message::ChecksumRequest {
                        id, offset, len, ..
                    },
            } if *peer == to => Some((*id, *offset, *len)),
            _ => None,
        })
        .collect()
}

fn digests(len: u32, fill: u8) -> Vec<tandem_repl_proto::Digest> {
    vec![[fill; 32]; (len as usize).div_ceil(4096)]
}

/// Runs a verify on `e` against peer 1 until it ends; the peer's digests come from `peer`
/// (ours are all `[0; 32]`). Returns every action.
fn run_verify(
    e: &mut Engine,
    resync: bool,
    peer: impl Fn(u64, u32) -> Vec<tandem_repl_proto::Digest>,
) -> Vec<Action> {
    let mut all = Vec::new();
    let mut pending = e.start_verify(20, resync).expect("verify starts");
    let mut t = 21;
    while !pending.is_empty() {
        let batch = std::mem::take(&mut pending);
        for (io, _, len) in checksum_jobs(&batch) {
            pending.extend(e.handle(
                t,
                Event::DiskChecksumDone {
                    io,
                    result: Ok(digests(len, 0)),
                },
            ));
        }
        for (id, offset, len) in checksum_requests(&batch, 1) {
            pending.extend(e.handle(
                t,
                Event::PeerMessage {
                    peer: 1,
                    msg: Message::ChecksumReply {
                        id,
                        offset,
                        block_size: 4096,
                        alg: tandem_repl_proto::ChecksumAlg::Blake3,
                        status: tandem_repl_proto::Status::Ok,
                        digests: peer(offset, len),
                    },
                },
            ));
        }
        t += 1;
        all.extend(batch);
    }
    all
}

#[test]
fn verify_of_identical_replicas_finds_nothing() {
    let mut e = primary();
    run_verify(&mut e, false, |_, len| digests(len, 0));
    let st = e.status();
    assert!(st.verify.is_none());
    let r = st.last_verify.expect("a result");
    assert_eq!(r.checked_bytes, SIZE);
    assert_eq!(r.different_bytes, 0);
    assert!(r.ranges.is_empty() && r.error.is_none());
    assert_eq!(r.peers, vec![1]);
    assert_eq!(e.bitmap(1).unwrap().count(), 0);
}

#[test]
fn verify_marks_and_reports_exactly_the_differing_blocks() {
    let mut e = primary();
    // Blocks 3 and 4 of the volume differ on the peer.
    let a = run_verify(&mut e, false, |offset, len| {
        let mut d = digests(len, 0);
        for b in [3u64, 4] {
            if b * 4096 >= offset && b * 4096 < offset + u64::from(len) {
                d[((b * 4096 - offset) / 4096) as usize] = [9; 32];
            }
        }
        d
    });
    let r = e.status().last_verify.unwrap();
    assert_eq!(r.checked_bytes, SIZE);
    assert_eq!(r.different_bytes, 8192);
    assert_eq!(r.ranges, vec![(3 * 4096, 8192)]);
    assert_eq!(r.different_by_peer, vec![(1, 8192)]);
    // Persisted out-of-sync bits toward the peer, and the peer is told.
    assert!(a.iter().any(|x| matches!(
        x,
        Action::PersistBits {
            peer: 1,
            set: true,
            first: 3,
            count: 2
        }
    )));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send { peer: 1, msg: Message::OutOfSync { flags: 0, ranges } }
            if ranges == &vec![tandem_repl_proto::ByteRange { offset: 3 * 4096, len: 8192 }]
    )));
    assert_eq!(e.bitmap(1).unwrap().out_of_sync_bytes(), 8192);
    assert_eq!(e.status().peers[0].repl_state, ReplState::Established);
    // Without --resync nothing else happens.
    assert!(!a.iter().any(|x| matches!(
        x,
        Action::Send {
            msg: Message::ResyncBegin { .. },
            ..
        }
    )));
}

#[test]
fn verify_with_resync_starts_an_online_resync_of_the_findings() {
    let mut e = primary();
    let a = run_verify(&mut e, true, |_, len| {
        let mut d = digests(len, 0);
        d[7] = [1; 32];
        d
    });
    let r = e.status().last_verify.unwrap();
    assert_eq!(r.resync_started, vec![1]);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            peer: 1,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 4096
            }
        }
    )));
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncSource);
    // A stale UpToDate report (sent before the peer saw ResyncBegin) does not end it.
    e.handle(40, report_from_1(5, tandem_repl_proto::DiskState::UpToDate));
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncSource);
    e.handle(
        41,
        report_from_1(6, tandem_repl_proto::DiskState::Inconsistent),
    );
    // It fetches the block from us (a target that asked nothing caught up elsewhere and
    // keeps our bits, see `resync_source_finished`).
    e.handle(
        41,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncRequest {
                id: 1,
                offset: 7 * 4096,
                len: 4096,
            },
        },
    );
    e.handle(42, report_from_1(7, tandem_repl_proto::DiskState::UpToDate));
    assert_eq!(e.status().peers[0].repl_state, ReplState::Established);
    assert_eq!(e.bitmap(1).unwrap().count(), 0);
}

#[test]
fn a_write_during_verify_is_ordered_around_the_checksums() {
    let mut e = primary();
    // A write in flight when verify starts: the chunk waits for it.
    let w = e.handle(10, write(1, 8192, 4096));
    let wio = disk_writes(&w)[0].0;
    let wseq = sent_writes(&w, 1)[0].0;
    let a = e.start_verify(11, false).unwrap();
    assert!(
        checksum_jobs(&a).is_empty(),
        "waits for the write in flight"
    );
    assert!(checksum_requests(&a, 1).is_empty());
    e.handle(
        12,
        Event::DiskWriteDone {
            io: wio,
            result: Ok(()),
        },
    );
    let a = e.handle(
        13,
        Event::PeerMessage {
            peer: 1,
            msg: Message::WriteAck {
                seq: wseq,
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    let jobs = checksum_jobs(&a);
    let reqs = checksum_requests(&a, 1);
    assert_eq!((jobs.len(), reqs.len()), (1, 1));
    // A write arriving now waits until our digests are taken, so the peer gets it after
    // the ChecksumRequest.
    let w2 = e.handle(14, write(2, 8192, 4096));
    assert!(disk_writes(&w2).is_empty() && sent_writes(&w2, 1).is_empty());
    let a = e.handle(
        15,
        Event::DiskChecksumDone {
            io: jobs[0].0,
            result: Ok(digests(jobs[0].2, 0)),
        },
    );
    assert_eq!(disk_writes(&a).len(), 1);
    assert_eq!(sent_writes(&a, 1).len(), 1);
    let a = e.handle(
        16,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ChecksumReply {
                id: reqs[0].0,
                offset: 0,
                block_size: 4096,
                alg: tandem_repl_proto::ChecksumAlg::Blake3,
                status: tandem_repl_proto::Status::Ok,
                digests: digests(reqs[0].2, 0),
            },
        },
    );
    assert!(a.is_empty() || e.status().last_verify.is_some());
    assert_eq!(e.status().last_verify.unwrap().different_bytes, 0);
}

#[test]
fn a_secondary_answers_checksums_behind_earlier_writes() {
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 0, true, Role::Primary);
    let a = e.handle(
        10,
        Event::PeerMessage {
            peer: 0,
            msg: Message::Write {
                seq: 1,
                offset: 0,
                flags: 0,
                data: Bytes::from(vec![5u8; 4096]),
            },
        },
    );
    let wio = disk_writes(&a)[0].0;
    let a = e.handle(
        11,
        Event::PeerMessage {
            peer: 0,
            msg: Message::ChecksumRequest {
                id: 9,
                offset: 0,
                len: 65536,
                block_size: 4096,
                alg: tandem_repl_proto::ChecksumAlg::Blake3,
                purpose: tandem_repl_proto::ChecksumPurpose::Verify,
            },
        },
    );
    assert!(checksum_jobs(&a).is_empty(), "behind the write");
    let a = e.handle(
        12,
        Event::DiskWriteDone {
            io: wio,
            result: Ok(()),
        },
    );
    let jobs = checksum_jobs(&a);
    assert_eq!(jobs, vec![(jobs[0].0, 0, 65536)]);
    let a = e.handle(
        13,
        Event::DiskChecksumDone {
            io: jobs[0].0,
            result: Ok(digests(65536, 3)),
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send { peer: 0, msg: Message::ChecksumReply { id: 9, status: tandem_repl_proto::Status::Ok, digests, .. } }
            if digests.len() == 16
    )));
    // Findings of the Primary's verify mark our bits; its ResyncBegin makes us sync target.
    let a = e.handle(
        14,
        Event::PeerMessage {
            peer: 0,
            msg: Message::OutOfSync {
                flags: 0,
                ranges: vec![tandem_repl_proto::ByteRange {
                    offset: 4096,
                    len: 4096,
                }],
            },
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::PersistBits {
            peer: 0,
            set: true,
            first: 1,
            count: 1
        }
    )));
    let a = e.handle(
        15,
        Event::PeerMessage {
            peer: 0,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 4096,
            },
        },
    );
    assert!(disconnects(&a).is_empty());
    assert_eq!(
        e.status().disk_state,
        tandem_repl_proto::DiskState::Inconsistent
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            peer: 0,
            msg: Message::ResyncRequest {
                offset: 4096,
                len: 4096,
                ..
            }
        }
    )));
}

#[test]
fn verify_refusals_are_typed() {
    let mut e = engine(0, &[(1, true), (2, false)]);
    assert_eq!(e.start_verify(1, false).unwrap_err(), VerifyError::NoPeer);
    connect(&mut e, 1, true, Role::Primary);
    assert_eq!(
        e.start_verify(2, false).unwrap_err(),
        VerifyError::PrimaryElsewhere(1)
    );
    let mut p = primary();
    p.start_verify(3, false).unwrap();
    assert!(matches!(
        p.start_verify(4, false),
        Err(VerifyError::Running { .. })
    ));
    // The peer goes away mid-run: the run ends with the reason.
    p.handle(5, Event::PeerDown { peer: 1 });
    let r = p.status().last_verify.unwrap();
    assert!(
        r.error.unwrap().contains("no peer left"),
        "{:?}",
        p.status()
    );
}

// ------------------------------------------------------------------ split brain

/// Node 0 with diskful peer 1 and witness 2 after a split: we are at generation 20 (wrote
/// `our_blocks` blocks since generation 10, when we last were in sync with node 1).
fn split_node(policy: SplitBrainPolicy, our_blocks: u64) -> Engine {
    split_node_at(policy, our_blocks, 0)
}

/// [`split_node`] whose last promotion had epoch `epoch`.
fn split_node_at(policy: SplitBrainPolicy, our_blocks: u64, epoch: u64) -> Engine {
    let peers = vec![
        PeerConfig {
            node_id: 1,
            diskful: true,
        },
        PeerConfig {
            node_id: 2,
            diskful: false,
        },
    ];
    let mut cfg = Config::new(0, true, peers, SIZE);
    cfg.after_split_brain = policy;
    let mut p = Persisted::new_volume(&cfg, 10);
    p.meta.current = 20;
    p.meta.history = [10, 0];
    p.meta.peer_bitmap_gens.insert(1, 10);
    p.meta.primary_epoch = epoch;
    if our_blocks > 0 {
        p.bitmaps.get_mut(&1).unwrap().set_bits(0, our_blocks);
    }
    Engine::new(cfg, p, 0).0
}

/// The handshake with node 1, which wrote `peer_blocks` blocks (from block 100) since
/// generation 10 and is now at generation 30; `flags` of its report.
fn split_handshake(e: &mut Engine, peer_blocks: u64, flags: u32) -> Vec<Action> {
    split_handshake_at(e, peer_blocks, flags, 0)
}

/// [`split_handshake`] with a peer whose last promotion had epoch `epoch`.
fn split_handshake_at(e: &mut Engine, peer_blocks: u64, flags: u32, epoch: u64) -> Vec<Action> {
    let mut out = e.handle(1, Event::PeerUp { peer: 1 });
    out.extend(e.handle(
        2,
        Event::PeerMessage {
            peer: 1,
            msg: Message::StateReport(Box::new(tandem_repl_proto::StateReport {
                flags,
                generations: tandem_repl_proto::Generations {
                    current: 30,
                    bitmap: 10,
                    history: [10, 0],
                },
                primary_epoch: epoch,
                ..report_of(1)
            })),
        },
    ));
    let ranges = if peer_blocks > 0 {
        vec![tandem_repl_proto::ByteRange {
            offset: 100 * 4096,
            len: peer_blocks * 4096,
        }]
    } else {
        vec![]
    };
    out.extend(e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::OutOfSync {
                flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                ranges,
            },
        },
    ));
    out
}

fn resync_begins(a: &[Action]) -> usize {
    a.iter()
        .filter(|x| {
            matches!(
                x,
                Action::Send {
                    peer: 1,
                    msg: Message::ResyncBegin { .. }
                }
            )
        })
        .count()
}

#[test]
fn split_brain_disconnect_policy_stays_split_and_shows_both_sides_changes() {
    let mut e = split_node(SplitBrainPolicy::Disconnect, 2);
    let a = split_handshake(&mut e, 3, 0);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Disconnect {
            peer: 1,
            reason: DisconnectReason::SplitBrain,
            reconnect: false
        }
    )));
    let p = &e.status().peers[0];
    assert_eq!(
        p.last_decision,
        Some((SyncDecision::SplitBrain, Rule::SplitBrainSameBitmap))
    );
    let sb = p.split_brain.clone().expect("split brain shown");
    assert_eq!((sb.our_bytes, sb.peer_bytes), (8192, 3 * 4096));
    assert_eq!(sb.resolution, None);
    assert_eq!(resync_begins(&a), 0);
    // Nothing was merged: our data and state are untouched.
    assert_eq!(
        e.status().disk_state,
        tandem_repl_proto::DiskState::UpToDate
    );
    assert!(disk_writes(&a).is_empty());
}

#[test]
fn split_brain_discard_node_policy_picks_the_named_victim() {
    // We are the victim: bitmap sync target of the union of both sides' blocks.
    let mut e = split_node(SplitBrainPolicy::DiscardNode(0), 2);
    let a = split_handshake(&mut e, 3, 0);
    assert!(disconnects(&a).is_empty());
    let p = &e.status().peers[0];
    assert_eq!(p.repl_state, ReplState::SyncTarget);
    assert_eq!(
        p.out_of_sync_bytes,
        5 * 4096,
        "union of both sides' changes"
    );
    assert!(
        p.split_brain
            .as_ref()
            .unwrap()
            .resolution
            .as_ref()
            .unwrap()
            .contains("discard-node 0")
    );
    // The peer is the victim: we are source.
    let mut e = split_node(SplitBrainPolicy::DiscardNode(1), 2);
    let a = split_handshake(&mut e, 3, 0);
    assert_eq!(resync_begins(&a), 1);
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncSource);
    // A third node named: not this pair's business, stays split.
    let mut e = split_node(SplitBrainPolicy::DiscardNode(7), 2);
    let a = split_handshake(&mut e, 3, 0);
    assert_eq!(disconnects(&a), vec![(1, DisconnectReason::SplitBrain)]);
}

#[test]
fn split_brain_discard_zero_changes_only_when_one_side_wrote_nothing() {
    // We wrote nothing since the split: we are the target.
    let mut e = split_node(SplitBrainPolicy::DiscardZeroChanges, 0);
    let a = split_handshake(&mut e, 3, 0);
    assert!(disconnects(&a).is_empty());
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncTarget);
    // The peer wrote nothing: we are the source.
    let mut e = split_node(SplitBrainPolicy::DiscardZeroChanges, 2);
    let a = split_handshake(&mut e, 0, 0);
    assert_eq!(resync_begins(&a), 1);
    // Both wrote: disconnect, nothing merged.
    let mut e = split_node(SplitBrainPolicy::DiscardZeroChanges, 2);
    let a = split_handshake(&mut e, 3, 0);
    assert_eq!(disconnects(&a), vec![(1, DisconnectReason::SplitBrain)]);
    assert_eq!(
        e.status().peers[0].split_brain.as_ref().unwrap().resolution,
        None
    );
}

#[test]
fn split_brain_discard_younger_primary_keeps_the_older_primarys_changes() {
    // We became Primary before the peer did (epoch 3 < 4): we keep ours, the peer resyncs.
    let mut e = split_node_at(SplitBrainPolicy::DiscardYoungerPrimary, 2, 3);
    let a = split_handshake_at(&mut e, 3, 0, 4);
    assert!(disconnects(&a).is_empty());
    assert_eq!(resync_begins(&a), 1);
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncSource);
    let why = e.status().peers[0].split_brain.clone().unwrap().resolution;
    assert!(
        why.as_deref()
            .is_some_and(|w| w.contains("node 1 became Primary more recently")),
        "{why:?}"
    );
    // We are the younger one: bitmap target of the union of both sides' changes.
    let mut e = split_node_at(SplitBrainPolicy::DiscardYoungerPrimary, 2, 5);
    let a = split_handshake_at(&mut e, 3, 0, 4);
    assert!(disconnects(&a).is_empty());
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncTarget);
    assert_eq!(e.status().peers[0].out_of_sync_bytes, 5 * 4096);
    // Same epoch (or an old peer that sends none, against ours of 0): cannot tell, split.
    let mut e = split_node_at(SplitBrainPolicy::DiscardYoungerPrimary, 2, 4);
    let a = split_handshake_at(&mut e, 3, 0, 4);
    assert_eq!(disconnects(&a), vec![(1, DisconnectReason::SplitBrain)]);
}

#[test]
fn a_promotion_takes_an_epoch_above_every_one_seen() {
    let mut e = engine(0, &[(1, true), (2, false)]);
    connect(&mut e, 1, true, Role::Secondary);
    connect(&mut e, 2, false, Role::Secondary);
    // Node 1 was Primary at epoch 5 once (its report says so).
    e.handle(
        5,
        Event::PeerMessage {
            peer: 1,
            msg: Message::StateReport(Box::new(tandem_repl_proto::StateReport {
                seq: 2,
                primary_epoch: 5,
                ..report_of(1)
            })),
        },
    );
    assert_eq!(e.meta().primary_epoch, 0);
    let a = e.promote(6).expect("promote");
    assert_eq!(e.meta().primary_epoch, 6);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::PersistMeta(m) if m.primary_epoch == 6)),
        "the epoch is persisted with the role"
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send { peer: 1, msg: Message::StateReport(r) } if r.primary_epoch == 6
    )));
}

#[test]
fn manual_resolution_discards_the_victims_changes() {
    use tandem_repl_proto::message::state_flags::DISCARD_MY_DATA;
    // On the victim: its reports say so, its next split-brain handshake makes it target.
    let mut e = split_node(SplitBrainPolicy::Disconnect, 2);
    e.discard_my_data(1).unwrap();
    assert!(e.status().discard_my_data);
    let a = split_handshake(&mut e, 3, 0);
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send { peer: 1, msg: Message::StateReport(r) } if r.flags & DISCARD_MY_DATA != 0
    )));
    assert!(disconnects(&a).is_empty());
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncTarget);
    // On the survivor: the victim's flag makes it source, whatever the policy.
    let mut e = split_node(SplitBrainPolicy::Disconnect, 2);
    let a = split_handshake(&mut e, 3, DISCARD_MY_DATA);
    assert_eq!(resync_begins(&a), 1);
    assert!(
        e.status().peers[0]
            .split_brain
            .as_ref()
            .unwrap()
            .resolution
            .as_ref()
            .unwrap()
            .contains("node 1 discards")
    );
    // Both asked to discard: nothing to keep, stays split.
    let mut e = split_node(SplitBrainPolicy::Disconnect, 2);
    e.discard_my_data(1).unwrap();
    let a = split_handshake(&mut e, 3, DISCARD_MY_DATA);
    assert_eq!(disconnects(&a), vec![(1, DisconnectReason::SplitBrain)]);
    // Refusals.
    let mut p = primary();
    assert_eq!(p.discard_my_data(9).unwrap_err(), ResolveError::Primary);
}

#[test]
fn a_primary_with_quorum_is_never_an_automatic_victim() {
    let mut e = split_node(SplitBrainPolicy::DiscardNode(0), 2);
    connect(&mut e, 2, false, Role::Secondary);
    e.promote(4).unwrap();
    e.handle(
        5,
        Event::PeerMessage {
            peer: 2,
            msg: Message::Pong { token: u64::MAX },
        },
    );
    assert!(e.has_quorum());
    let a = split_handshake(&mut e, 3, 0);
    assert_eq!(disconnects(&a), vec![(1, DisconnectReason::SplitBrain)]);
    assert_eq!(e.role(), Role::Primary);
}

// ------------------------------------------------------------------ checksum-based resync

#[test]
fn checksum_resync_transfers_only_the_blocks_whose_digests_differ() {
    let peers = vec![
        PeerConfig {
            node_id: 1,
            diskful: true,
        },
        PeerConfig {
            node_id: 2,
            diskful: false,
        },
    ];
    let mut cfg = Config::new(0, true, peers, SIZE);
    cfg.resync_checksums = true;
    let p = Persisted::new_volume(&cfg, 77);
    let mut e = Engine::new(cfg, p, 0).0;
    // The peer marks 8 blocks out of sync: we are the bitmap target.
    let mut out = e.handle(1, Event::PeerUp { peer: 1 });
    for msg in [
        Message::StateReport(Box::new(tandem_repl_proto::StateReport {
            seq: 1,
            node_id: 1,
            role: Role::Secondary,
            disk_state: tandem_repl_proto::DiskState::UpToDate,
            quorum: Default::default(),
            flags: 0,
            size_bytes: SIZE,
            generations: tandem_repl_proto::Generations {
                current: 77,
                ..Default::default()
            },
            peer_bitmaps: vec![],
            outdated: 0,
            outdated_gen: 0,
            outdated_by: 0,
            primary_epoch: 0,
            lost_writer: None,
        })),
        Message::OutOfSync {
            flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
            ranges: vec![tandem_repl_proto::ByteRange {
                offset: 0,
                len: 8 * 4096,
            }],
        },
        Message::ResyncBegin {
            generation: 77,
            bytes: 8 * 4096,
        },
    ] {
        out.extend(e.handle(2, Event::PeerMessage { peer: 1, msg }));
    }
    assert_eq!(e.status().peers[0].repl_state, ReplState::SyncTarget);
    // Digests first, no data request yet.
    let req = out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                peer: 1,
                msg:
                    Message::ChecksumRequest {
                        id,
                        offset: 0,
                        len,
                        purpose: tandem_repl_proto::ChecksumPurpose::Resync,
                        ..
                    },
            } => Some((*id, *len)),
            _ => None,
        })
        .expect("a checksum request");
    assert_eq!(req.1, 8 * 4096);
    assert!(!out.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: Message::ResyncRequest { .. },
            ..
        }
    )));
    let jobs = checksum_jobs(&out);
    assert_eq!(jobs.len(), 1);
    let mut a = e.handle(
        3,
        Event::DiskChecksumDone {
            io: jobs[0].0,
            result: Ok(digests(8 * 4096, 0)),
        },
    );
    // The source's blocks 2 and 3 differ.
    let mut remote = digests(8 * 4096, 0);
    remote[2] = [1; 32];
    remote[3] = [1; 32];
    a.extend(e.handle(
        4,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ChecksumReply {
                id: req.0,
                offset: 0,
                block_size: 4096,
                alg: tandem_repl_proto::ChecksumAlg::Blake3,
                status: tandem_repl_proto::Status::Ok,
                digests: remote,
            },
        },
    ));
    let data_reqs: Vec<(u64, u64, u32)> = a
        .iter()
        .filter_map(|x| match x {
            Action::Send {
                peer: 1,
                msg: Message::ResyncRequest { id, offset, len },
            } => Some((*id, *offset, *len)),
            _ => None,
        })
        .collect();
    assert_eq!(data_reqs.len(), 1, "{a:?}");
    assert_eq!((data_reqs[0].1, data_reqs[0].2), (2 * 4096, 2 * 4096));
    assert_eq!(e.bitmap(1).unwrap().count(), 2, "identical blocks cleared");
    // The data lands; the resync ends having transferred 8 KiB and skipped 24 KiB.
    let a = e.handle(
        5,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ResyncData {
                id: data_reqs[0].0,
                offset: 2 * 4096,
                status: tandem_repl_proto::Status::Ok,
                flags: 0,
                len: 2 * 4096,
                data: Bytes::from(vec![7u8; 2 * 4096]),
            },
        },
    );
    let (io, _) = disk_writes(&a)[0];
    let a = e.handle(6, Event::DiskWriteDone { io, result: Ok(()) });
    let flush = a
        .iter()
        .find_map(|x| match x {
            Action::DiskFlush { io } => Some(*io),
            _ => None,
        })
        .expect("finishing flush");
    e.handle(
        7,
        Event::DiskFlushDone {
            io: flush,
            result: Ok(()),
        },
    );
    let st = e.status();
    assert_eq!(st.disk_state, tandem_repl_proto::DiskState::UpToDate);
    assert_eq!(
        (st.last_resync_bytes, st.last_resync_skipped_bytes),
        (8192, 6 * 4096)
    );
}

#[test]
fn checksum_resync_falls_back_to_data_when_the_source_refuses() {
    let peers = vec![PeerConfig {
        node_id: 1,
        diskful: true,
    }];
    let mut cfg = Config::new(0, true, peers, SIZE);
    cfg.resync_checksums = true;
    let p = Persisted::new_volume(&cfg, 77);
    let mut e = Engine::new(cfg, p, 0).0;
    let out = connect_as_target(&mut e, 1);
    let id = out
        .iter()
        .find_map(|a| match a {
            Action::Send {
                msg: Message::ChecksumRequest { id, .. },
                ..
            } => Some(*id),
            _ => None,
        })
        .expect("a checksum request");
    let a = e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ChecksumReply {
                id,
                offset: 0,
                block_size: 4096,
                alg: tandem_repl_proto::ChecksumAlg::Blake3,
                status: tandem_repl_proto::Status::NotSupported,
                digests: vec![],
            },
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            msg: Message::ResyncRequest {
                offset: 0,
                len: 4096,
                ..
            },
            ..
        }
    )));
}

#[test]
fn resync_checksum_requests_are_refused_outside_a_resync() {
    let mut e = engine(0, &[(1, true), (2, false)]);
    let req = |id| Event::PeerMessage {
        peer: 1,
        msg: Message::ChecksumRequest {
            id,
            offset: 0,
            len: 4096,
            block_size: 4096,
            alg: tandem_repl_proto::ChecksumAlg::Blake3,
            purpose: tandem_repl_proto::ChecksumPurpose::Resync,
        },
    };
    connect(&mut e, 1, true, Role::Secondary);
    let a = e.handle(5, req(1));
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Send {
            msg: Message::ChecksumReply {
                status: tandem_repl_proto::Status::NotPermitted,
                ..
            },
            ..
        }
    )));
}

fn report_from(peer: u8, seq: u64, size: u64, role: Role) -> Event {
    Event::PeerMessage {
        peer,
        msg: Message::StateReport(Box::new(tandem_repl_proto::StateReport {
            seq,
            node_id: peer,
            role,
            disk_state: tandem_repl_proto::DiskState::UpToDate,
            quorum: Default::default(),
            flags: 0,
            size_bytes: size,
            generations: tandem_repl_proto::Generations {
                current: 77,
                ..Default::default()
            },
            peer_bitmaps: vec![],
            outdated: 0,
            outdated_gen: 0,
            outdated_by: 0,
            primary_epoch: 0,
            lost_writer: None,
        })),
    }
}

fn sent_report_sizes(a: &[Action], to: u8) -> Vec<u64> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: Message::StateReport(r),
            } if *peer == to => Some(r.size_bytes),
            _ => None,
        })
        .collect()
}

#[test]
fn resize_is_advertised_and_usable_size_is_the_smallest_connected() {
    let mut e = primary();
    assert_eq!(e.usable_size(), SIZE);
    let a = e.handle(
        10,
        Event::Resize {
            size_bytes: 2 * SIZE,
        },
    );
    assert_eq!(
        sent_report_sizes(&a, 1),
        vec![2 * SIZE],
        "peers learn the size"
    );
    assert_eq!(sent_report_sizes(&a, 2), vec![2 * SIZE]);
    assert!(
        !a.iter().any(|x| matches!(x, Action::Disconnect { .. })),
        "{a:?}"
    );
    assert_eq!(e.size_bytes(), 2 * SIZE);
    // Peer 1 still has the old size: nothing past it is written or sent.
    assert_eq!(e.usable_size(), SIZE);
    let a = e.handle(11, write(1, SIZE, 4096));
    assert_eq!(
        a.iter()
            .find_map(|x| match x {
                Action::Complete { id: 1, result } => Some(result.clone()),
                _ => None,
            })
            .unwrap(),
        Err(RequestError::OutOfRange)
    );
    assert!(sent_writes(&a, 1).is_empty() && disk_writes(&a).is_empty());
    // Peer 1 grew: the new area is usable and writes to it are replicated.
    let a = e.handle(12, report_from(1, 5, 2 * SIZE, Role::Secondary));
    assert!(!a.iter().any(|x| matches!(x, Action::Disconnect { .. })));
    assert_eq!(e.usable_size(), 2 * SIZE);
    assert_eq!(e.status().usable_size_bytes, 2 * SIZE);
    let a = e.handle(13, write(2, 2 * SIZE - 4096, 4096));
    assert_eq!(
        sent_writes(&a, 1),
        vec![(sent_writes(&a, 1)[0].0, 2 * SIZE - 4096)]
    );
    assert_eq!(disk_writes(&a).len(), 1);
    // Past the new end: refused.
    let a = e.handle(14, write(3, 2 * SIZE, 4096));
    assert!(completions(&a).contains(&(3, false)));
    // A witness's size never limits the volume.
    e.handle(15, report_from(2, 9, 4096, Role::Secondary));
    assert_eq!(e.usable_size(), 2 * SIZE);
}

#[test]
fn grown_area_is_in_sync_and_writes_there_set_bits_while_a_peer_is_away() {
    let mut e = primary();
    e.handle(
        10,
        Event::Resize {
            size_bytes: 2 * SIZE,
        },
    );
    e.handle(11, report_from(1, 5, 2 * SIZE, Role::Secondary));
    assert_eq!(e.bitmap(1).unwrap().size_bytes(), 2 * SIZE);
    assert_eq!(
        e.bitmap(1).unwrap().count(),
        0,
        "no resync of the grown area"
    );
    e.handle(12, Event::PeerDown { peer: 1 });
    // Alone (with the witness) the usable size is the local one.
    assert_eq!(e.usable_size(), 2 * SIZE);
    let a = e.handle(13, write(1, SIZE + 8192, 4096));
    let a = with_pongs(&mut e, 14, a);
    let persisted: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            Action::PersistBits {
                peer: 1,
                set: true,
                first,
                count,
            } => Some((*first, *count)),
            _ => None,
        })
        .collect();
    assert_eq!(persisted, vec![((SIZE + 8192) / 4096, 1)]);
    assert_eq!(e.bitmap(1).unwrap().count(), 1);
}

#[test]
fn handshake_between_different_sizes_waits_instead_of_disconnecting() {
    let mut e = engine(0, &[(1, true)]);
    let mut out = e.handle(1, Event::PeerUp { peer: 1 });
    out.extend(e.handle(2, report_from(1, 1, 2 * SIZE, Role::Secondary)));
    out.extend(e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::OutOfSync {
                flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                ranges: vec![],
            },
        },
    ));
    assert!(
        !out.iter().any(|x| matches!(x, Action::Disconnect { .. })),
        "{out:?}"
    );
    let st = e.status();
    assert_eq!(st.peers[0].repl_state, ReplState::Connecting);
    // Our resize to the same size completes the handshake.
    e.handle(
        4,
        Event::Resize {
            size_bytes: 2 * SIZE,
        },
    );
    assert_eq!(e.status().peers[0].repl_state, ReplState::Established);
}

#[test]
fn out_of_sync_ranges_past_our_end_from_a_larger_peer_reconnect() {
    let mut e = engine(0, &[(1, true)]);
    e.handle(1, Event::PeerUp { peer: 1 });
    e.handle(2, report_from(1, 1, 2 * SIZE, Role::Secondary));
    let a = e.handle(
        3,
        Event::PeerMessage {
            peer: 1,
            msg: Message::OutOfSync {
                flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                ranges: vec![tandem_repl_proto::ByteRange {
                    offset: SIZE + 4096,
                    len: 4096,
                }],
            },
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::Disconnect {
            peer: 1,
            reason: DisconnectReason::SizeMismatch,
            reconnect: true
        }
    )));
}

/// Plays the sync source and the disk for `out` and everything it leads to, at `now`: every
/// `ResyncRequest` is answered (zeros), every disk I/O completes. Returns the bytes resynced.
fn serve(e: &mut Engine, now: u64, out: Vec<Action>) -> u64 {
    let mut done = 0;
    let mut todo = out;
    while !todo.is_empty() {
        let mut next = Vec::new();
        for a in todo {
            let ev = match a {
                Action::Send {
                    msg: Message::ResyncRequest { id, offset, len },
                    ..
                } => {
                    done += u64::from(len);
                    Event::PeerMessage {
                        peer: 1,
                        msg: Message::ResyncData {
                            id,
                            offset,
                            status: tandem_repl_proto::Status::Ok,
                            flags: tandem_repl_proto::message::resync_flags::ZERO,
                            len,
                            data: Bytes::new(),
                        },
                    }
                }
                Action::DiskWrite { io, .. } => Event::DiskWriteDone { io, result: Ok(()) },
                Action::DiskFlush { io } => Event::DiskFlushDone { io, result: Ok(()) },
                _ => continue,
            };
            next.extend(e.handle(now, ev));
        }
        todo = next;
    }
    done
}

/// A sync target (16 MiB volume, all out of sync) of a Primary (peer 1), unlimited rate and a
/// 1 MiB/s floor; `busy`: the Primary forwards its consumer's writes (128 KiB every 50 ms) for
/// the first second. Returns the bytes resynced by 1 s and by 1.3 s.
fn resync_under_consumer_writes(busy: bool) -> (u64, u64) {
    const MS: u64 = 1_000_000;
    const VOL: u64 = 16 << 20;
    let peers = vec![
        PeerConfig {
            node_id: 1,
            diskful: true,
        },
        PeerConfig {
            node_id: 2,
            diskful: false,
        },
    ];
    let cfg = Config::new(0, true, peers, VOL);
    let p = Persisted::new_volume(&cfg, 77);
    let mut e = Engine::new(cfg, p, 0).0;
    e.handle(
        0,
        Event::SetResyncMinRate {
            bytes_per_sec: 1 << 20,
        },
    );
    let mut seq = 0;
    let mut write = |e: &mut Engine, now: u64| {
        seq += 1;
        let out = e.handle(
            now,
            Event::PeerMessage {
                peer: 1,
                msg: Message::Write {
                    seq,
                    offset: 0,
                    flags: 0,
                    data: Bytes::from(vec![1; 128 << 10]),
                },
            },
        );
        serve(e, now, out)
    };
    let mut out = e.handle(1, Event::PeerUp { peer: 1 });
    let report = tandem_repl_proto::StateReport {
        role: Role::Primary,
        size_bytes: VOL,
        ..report_of(1)
    };
    for msg in [
        Message::StateReport(Box::new(report)),
        Message::OutOfSync {
            flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
            ranges: vec![tandem_repl_proto::ByteRange {
                offset: 0,
                len: VOL,
            }],
        },
        Message::ResyncBegin {
            generation: 77,
            bytes: VOL,
        },
    ] {
        out.extend(e.handle(2, Event::PeerMessage { peer: 1, msg }));
    }
    // What the handshake asked for goes out before any consumer write is seen: one window
    // of requests at full speed (8 x 128 KiB) when the consumer is busy.
    let mut done = if busy {
        let first = requested(&out);
        assert_eq!(first, 1 << 20);
        let w = write(&mut e, 2);
        w + serve(&mut e, 2, out)
    } else {
        serve(&mut e, 2, out)
    };
    let mut now = 2;
    while now < 1000 * MS {
        now += 50 * MS;
        if busy {
            write(&mut e, now);
        }
        assert_eq!(
            e.status().resync_yielding,
            busy && e.status().resync_bytes_left.is_some(),
            "at {now}"
        );
        let out = e.handle(now, Event::Tick);
        done += serve(&mut e, now, out);
    }
    let during = done;
    // The consumer stops: two windows later the resync runs at full speed again.
    while now < 1300 * MS {
        now += 50 * MS;
        let out = e.handle(now, Event::Tick);
        done += serve(&mut e, now, out);
    }
    assert!(!e.status().resync_yielding);
    assert_eq!(e.status().resync_bytes_left, None, "{:#?}", e.status());
    (during, done)
}

/// Bytes asked for by `ResyncRequest`s in `a`.
fn requested(a: &[Action]) -> u64 {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                msg: Message::ResyncRequest { len, .. },
                ..
            } => Some(u64::from(*len)),
            _ => None,
        })
        .sum()
}

#[test]
fn dynamic_resync_controller_yields_to_consumer_writes() {
    const VOL: u64 = 16 << 20;
    // Idle consumer: the whole volume at once (unlimited).
    let (during, after) = resync_under_consumer_writes(false);
    assert_eq!((during, after), (VOL, VOL));
    // Busy consumer: after the handshake's first window (1 MiB), held to the 1 MiB/s floor
    // (plus at most one 200 ms bucket) for the second the consumer writes.
    let (during, after) = resync_under_consumer_writes(true);
    let floor = 1 << 20;
    assert!(
        during >= (1 << 20) + floor * 8 / 10
            && during <= (1 << 20) + floor + floor / 5 + (128 << 10),
        "{during} bytes resynced in the second the consumer wrote"
    );
    // Full speed once the consumer is idle: the rest within 0.3 s (the writes at offset 0
    // may have made a chunk be fetched twice).
    assert!(after >= VOL, "{after}");
}

/// `outdated` masks of the `StateReport`s sent to `to` in `a`.
fn sent_outdated(a: &[Action], to: u8) -> Vec<u32> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: Message::StateReport(r),
            } if *peer == to => Some(r.outdated),
            _ => None,
        })
        .collect()
}

#[test]
fn a_primary_reports_the_peers_it_wrote_without_as_outdated() {
    let mut e = primary();
    // Away but not written without: not listed.
    let a = e.handle(20, Event::PeerDown { peer: 1 });
    assert!(sent_outdated(&a, 2).iter().all(|m| *m == 0), "{a:?}");
    let a = e.handle(21, Event::Tick);
    assert!(sent_outdated(&a, 2).is_empty());
    // A write completed without node 1: the witness hears it at once or at the next tick.
    let a = e.handle(22, write(1, 8192, 4096));
    let mut a = with_pongs(&mut e, 22, a);
    a.extend(e.handle(23, Event::Tick));
    assert_eq!(sent_outdated(&a, 2).last(), Some(&(1 << 1)), "{a:?}");
    // Said once, not at every tick.
    assert!(sent_outdated(&e.handle(24, Event::Tick), 2).is_empty());
}

/// Node 1 (a Secondary) reaches only the witness, which relays that the Primary (node 0)
/// wrote without it.
fn outdated_secondary() -> Engine {
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 2, false, Role::Secondary);
    let report = tandem_repl_proto::StateReport {
        seq: 2,
        disk_state: tandem_repl_proto::DiskState::Diskless,
        generations: Default::default(),
        outdated: 1 << 1,
        outdated_gen: 0x99,
        ..report_of(2)
    };
    let a = e.handle(
        10,
        Event::PeerMessage {
            peer: 2,
            msg: Message::StateReport(Box::new(report)),
        },
    );
    assert!(a.iter().any(|x| matches!(
        x,
        Action::PersistMeta(m) if m.disk_state == tandem_repl_proto::DiskState::Outdated
    )));
    e
}

#[test]
fn a_relayed_mask_outdates_a_secondary_and_blocks_its_promotion() {
    use tandem_repl_proto::DiskState;
    let mut e = outdated_secondary();
    assert_eq!(e.status().disk_state, DiskState::Outdated);
    assert_eq!(e.promote(11).unwrap_err(), PromoteError::Outdated);
    // Forced: declared UpToDate, then promoted with the witness's vote.
    let a = e.promote_forced(12).expect("forced promotion");
    assert!(a.iter().any(|x| matches!(
        x,
        Action::PersistMeta(m) if m.disk_state == DiskState::UpToDate && m.primary
    )));
    assert_eq!(e.role(), Role::Primary);
}

#[test]
fn an_outdated_node_is_up_to_date_again_after_resync_and_ignores_relays_near_a_primary() {
    use tandem_repl_proto::DiskState;
    // Connected to the Primary, a relayed mask naming us is stale: ignored.
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 0, true, Role::Primary);
    connect(&mut e, 2, false, Role::Secondary);
    let report = tandem_repl_proto::StateReport {
        seq: 2,
        disk_state: DiskState::Diskless,
        generations: Default::default(),
        outdated: 1 << 1,
        outdated_gen: 0x99,
        ..report_of(2)
    };
    e.handle(
        10,
        Event::PeerMessage {
            peer: 2,
            msg: Message::StateReport(Box::new(report)),
        },
    );
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
    // An Outdated node meeting an UpToDate peer of its generation is its sync target (rule
    // EqualInconsistent; here nothing differs) and UpToDate once that resync ends.
    let mut e = outdated_secondary();
    connect(&mut e, 0, true, Role::Secondary);
    assert_eq!(
        e.status().peers[0].last_decision,
        Some((SyncDecision::BitmapTarget, Rule::EqualInconsistent))
    );
    assert_eq!(e.status().disk_state, DiskState::Outdated);
    let out = e.handle(
        20,
        Event::PeerMessage {
            peer: 0,
            msg: Message::ResyncBegin {
                generation: 77,
                bytes: 0,
            },
        },
    );
    let mut out = out;
    out.extend(e.handle(21, Event::Tick));
    serve(&mut e, 21, out);
    assert_eq!(e.status().disk_state, DiskState::UpToDate);
}

/// Node 1, in sync with node 0, meets node 3, a new member (no data): it becomes its
/// full-resync source (`NewMember`), every bit toward it set.
fn source_of_new_member() -> Engine {
    let mut e = engine(1, &[(0, true), (2, false), (3, true)]);
    connect(&mut e, 0, true, Role::Primary);
    connect(&mut e, 2, false, Role::Secondary);
    e.handle(1, Event::PeerUp { peer: 3 });
    let report = tandem_repl_proto::StateReport {
        disk_state: tandem_repl_proto::DiskState::Inconsistent,
        generations: Default::default(),
        ..report_of(3)
    };
    for msg in [
        Message::StateReport(Box::new(report)),
        Message::OutOfSync {
            flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
            ranges: vec![],
        },
    ] {
        e.handle(2, Event::PeerMessage { peer: 3, msg });
    }
    assert_eq!(
        e.status().peers[2].last_decision,
        Some((SyncDecision::FullSource, Rule::NewMember))
    );
    assert_eq!(e.bitmap(3).map(|b| b.out_of_sync_bytes()), Some(SIZE));
    e
}

#[test]
fn full_resync_marks_of_a_new_member_that_synced_elsewhere_are_dropped() {
    // It never pulled from us (paused: it synced from node 0) and drops the link to compare
    // again: our marks go, so the next handshake does not copy everything a second time.
    let mut e = source_of_new_member();
    let a = e.handle(10, Event::PeerDown { peer: 3 });
    assert!(a.iter().any(|x| matches!(
        x,
        Action::PersistBits {
            peer: 3,
            set: false,
            ..
        }
    )));
    assert_eq!(e.bitmap(3).map(|b| b.count()), Some(0));
    // It did pull from us: the marks are its resync's progress and stay.
    let mut e = source_of_new_member();
    e.handle(
        10,
        Event::PeerMessage {
            peer: 3,
            msg: Message::ResyncRequest {
                id: 1,
                offset: 0,
                len: 4096,
            },
        },
    );
    e.handle(11, Event::PeerDown { peer: 3 });
    assert_eq!(e.bitmap(3).map(|b| b.out_of_sync_bytes()), Some(SIZE));
    // Our other replica not in sync: unsure where it synced from, the marks stay.
    let mut e = source_of_new_member();
    e.handle(10, Event::PeerDown { peer: 0 });
    e.handle(11, Event::PeerDown { peer: 3 });
    assert_eq!(e.bitmap(3).map(|b| b.out_of_sync_bytes()), Some(SIZE));
}

// ------------------------------------------------------------------ disk failure (detach)

fn sent_read_requests(a: &[Action], to: u8) -> Vec<(u64, u64, u32)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Send {
                peer,
                msg: Message::ReadRequest { seq, offset, len },
            } if *peer == to => Some((*seq, *offset, *len)),
            _ => None,
        })
        .collect()
}

fn touches_disk(a: &[Action]) -> bool {
    a.iter().any(|a| {
        matches!(
            a,
            Action::DiskWrite { .. }
                | Action::DiskRead { .. }
                | Action::DiskFlush { .. }
                | Action::DiskChecksum { .. }
                | Action::PersistBits { .. }
                | Action::PersistActivityLog(_)
        )
    })
}

fn ack(seq: u64) -> Message {
    Message::WriteAck {
        seq,
        status: tandem_repl_proto::Status::Ok,
    }
}

#[test]
fn a_local_write_error_detaches_and_the_primary_keeps_serving_through_its_peer() {
    let mut e = primary();
    let a = e.handle(10, write(1, 0, 4096));
    let (io, _) = disk_writes(&a)[0];
    let (seq, _) = sent_writes(&a, 1)[0];
    let a = e.handle(
        11,
        Event::DiskWriteDone {
            io,
            result: Err(DiskError("EIO".into())),
        },
    );
    assert!(completions(&a).is_empty(), "waits for the peer, no error");
    let st = e.status();
    assert_eq!(st.disk_state, tandem_repl_proto::DiskState::Failed);
    assert!(st.disk_failure.as_deref().unwrap().contains("EIO"));
    assert_eq!(st.role, Role::Primary);
    // The metadata says Failed (a restart must not trust the disk) and the new generation.
    let meta = a
        .iter()
        .find_map(|a| match a {
            Action::PersistMeta(m) => Some(m.clone()),
            _ => None,
        })
        .expect("meta persisted");
    assert_eq!(meta.disk_state, tandem_repl_proto::DiskState::Failed);
    assert_eq!(meta.current, 77, "the detached disk's own generation");
    assert_ne!(
        e.status().current_generation,
        77,
        "a detached Primary starts a new generation"
    );
    // The report tells the peer.
    assert!(a.iter().any(|a| matches!(a,
        Action::Send { peer: 1, msg: Message::StateReport(r) }
            if r.disk_state == tandem_repl_proto::DiskState::Failed)));
    let a = e.handle(
        12,
        Event::PeerMessage {
            peer: 1,
            msg: ack(seq),
        },
    );
    assert_eq!(completions(&a), vec![(1, true)]);

    // Writes go to the peer only.
    let a = e.handle(13, write(2, 8192, 4096));
    assert!(!touches_disk(&a), "{a:?}");
    let (seq, _) = sent_writes(&a, 1)[0];
    assert!(completions(&a).is_empty());
    let a = e.handle(
        14,
        Event::PeerMessage {
            peer: 1,
            msg: ack(seq),
        },
    );
    assert_eq!(completions(&a), vec![(2, true)]);

    // Reads are forwarded.
    let a = e.handle(
        15,
        Event::Read {
            id: 3,
            offset: 8192,
            len: 4096,
        },
    );
    assert!(!touches_disk(&a), "{a:?}");
    let r = sent_read_requests(&a, 1);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].1, r[0].2), (8192, 4096));
    let a = e.handle(
        16,
        Event::PeerMessage {
            peer: 1,
            msg: Message::ReadReply {
                seq: r[0].0,
                status: tandem_repl_proto::Status::Ok,
                data: Bytes::from(vec![2u8; 4096]),
            },
        },
    );
    assert!(a.iter().any(|a| matches!(a,
        Action::Complete { id: 3, result: Ok(Reply::Data(d)) } if d[..] == [2u8; 4096][..])));

    // A flush needs the peer's.
    let a = e.handle(17, Event::Flush { id: 4 });
    assert!(!touches_disk(&a));
    let a = e.handle(
        18,
        Event::PeerMessage {
            peer: 1,
            msg: Message::FlushAck {
                seq: a
                    .iter()
                    .find_map(|a| match a {
                        Action::Send {
                            msg: Message::Flush { seq },
                            ..
                        } => Some(*seq),
                        _ => None,
                    })
                    .unwrap(),
                status: tandem_repl_proto::Status::Ok,
            },
        },
    );
    assert_eq!(completions(&a), vec![(4, true)]);
    assert!(matches!(
        e.promote(19),
        Ok(v) if v.is_empty()
    ));
}

#[test]
fn a_detached_primary_without_an_up_to_date_peer_fails_io() {
    let mut e = primary();
    e.handle(
        10,
        Event::DiskFailed {
            reason: "xfs shut down".into(),
        },
    );
    e.handle(11, Event::PeerDown { peer: 1 });
    let a = e.handle(12, write(1, 0, 4096));
    assert!(!touches_disk(&a));
    let c: Vec<_> = a
        .iter()
        .filter_map(|a| match a {
            Action::Complete { id, result } => Some((*id, result.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(c.len(), 1);
    let err = c[0].1.clone().unwrap_err();
    assert!(
        matches!(&err, RequestError::Io(m) if m.contains("xfs shut down")),
        "{err}"
    );
    let a = e.handle(
        13,
        Event::Read {
            id: 2,
            offset: 0,
            len: 4096,
        },
    );
    assert_eq!(completions(&a), vec![(2, false)]);
}

#[test]
fn a_failed_disk_is_never_a_resync_target_and_never_written() {
    // Secondary 1 of Primary 0; its disk fails, the link breaks and comes back with bits on
    // the Primary's side (it wrote without us): no resync, no disk I/O, still Failed.
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 0, true, Role::Primary);
    e.handle(
        10,
        Event::DiskFailed {
            reason: "EIO".into(),
        },
    );
    e.handle(11, Event::PeerDown { peer: 0 });
    let mut all = e.handle(12, Event::PeerUp { peer: 0 });
    let r = tandem_repl_proto::StateReport {
        role: Role::Primary,
        generations: tandem_repl_proto::Generations {
            current: 99,
            bitmap: 77,
            history: [77, 0],
        },
        ..report_of(0)
    };
    all.extend(e.handle(
        13,
        Event::PeerMessage {
            peer: 0,
            msg: Message::StateReport(Box::new(r)),
        },
    ));
    all.extend(e.handle(
        14,
        Event::PeerMessage {
            peer: 0,
            msg: Message::OutOfSync {
                flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                ranges: vec![tandem_repl_proto::ByteRange {
                    offset: 0,
                    len: 8192,
                }],
            },
        },
    ));
    // A ResyncBegin anyway (an older peer): refused.
    all.extend(e.handle(
        15,
        Event::PeerMessage {
            peer: 0,
            msg: Message::ResyncBegin {
                generation: 99,
                bytes: 8192,
            },
        },
    ));
    // A replicated write: refused without touching the disk.
    all.extend(e.handle(
        16,
        Event::PeerMessage {
            peer: 0,
            msg: Message::Write {
                seq: 1,
                offset: 0,
                flags: 0,
                data: Bytes::from(vec![1u8; 4096]),
            },
        },
    ));
    assert!(!touches_disk(&all), "{all:?}");
    assert!(!all.iter().any(|a| matches!(
        a,
        Action::Send {
            msg: Message::ResyncRequest { .. },
            ..
        }
    )));
    assert!(!all.iter().any(|a| matches!(a,
        Action::PersistMeta(m) if m.disk_state != tandem_repl_proto::DiskState::Failed)));
    assert_eq!(e.status().disk_state, tandem_repl_proto::DiskState::Failed);
    assert!(matches!(
        e.promote(17),
        Err(PromoteError::NotUpToDate(
            tandem_repl_proto::DiskState::Failed
        ))
    ));
}

#[test]
fn a_restart_reads_a_failed_disk_as_outdated() {
    let cfg = Config::new(
        0,
        true,
        vec![PeerConfig {
            node_id: 1,
            diskful: true,
        }],
        SIZE,
    );
    let mut p = Persisted::new_volume(&cfg, 77);
    p.meta.disk_state = tandem_repl_proto::DiskState::Failed;
    let (e, out) = Engine::new(cfg, p, 0);
    assert_eq!(
        e.status().disk_state,
        tandem_repl_proto::DiskState::Outdated
    );
    assert!(out.iter().any(|a| matches!(a,
        Action::PersistMeta(m) if m.disk_state == tandem_repl_proto::DiskState::Outdated)));
}

#[test]
fn a_secondary_serves_forwarded_reads_and_marks_a_detached_primarys_writes() {
    let mut e = engine(1, &[(0, true), (2, false)]);
    connect(&mut e, 0, true, Role::Primary);
    let failed = tandem_repl_proto::StateReport {
        seq: 2,
        role: Role::Primary,
        disk_state: tandem_repl_proto::DiskState::Failed,
        generations: tandem_repl_proto::Generations {
            current: 99,
            bitmap: 0,
            history: [77, 0],
        },
        ..report_of(0)
    };
    let a = e.handle(
        10,
        Event::PeerMessage {
            peer: 0,
            msg: Message::StateReport(Box::new(failed)),
        },
    );
    // Adopted the new generation, recorded that the Primary's disk stays at 77.
    let meta = a
        .iter()
        .filter_map(|a| match a {
            Action::PersistMeta(m) => Some(m.clone()),
            _ => None,
        })
        .last()
        .expect("meta");
    assert_eq!(meta.current, 99);
    assert_eq!(meta.peer_bitmap_gens.get(&0), Some(&77));
    let a = e.handle(
        11,
        Event::PeerMessage {
            peer: 0,
            msg: Message::Write {
                seq: 1,
                offset: 4096,
                flags: 0,
                data: Bytes::from(vec![5u8; 4096]),
            },
        },
    );
    assert!(a.iter().any(|a| matches!(
        a,
        Action::PersistBits {
            peer: 0,
            set: true,
            ..
        }
    )));
    assert_eq!(e.bitmap(0).unwrap().out_of_sync_bytes(), 4096);
    let (io, _) = disk_writes(&a)[0];
    e.handle(12, Event::DiskWriteDone { io, result: Ok(()) });
    let a = e.handle(
        13,
        Event::PeerMessage {
            peer: 0,
            msg: Message::ReadRequest {
                seq: 7,
                offset: 4096,
                len: 4096,
            },
        },
    );
    let io = a
        .iter()
        .find_map(|a| match a {
            Action::DiskRead { io, .. } => Some(*io),
            _ => None,
        })
        .expect("read");
    let a = e.handle(
        14,
        Event::DiskReadDone {
            io,
            result: Ok(Bytes::from(vec![5u8; 4096])),
        },
    );
    assert!(a.iter().any(|a| matches!(a,
        Action::Send { peer: 0, msg: Message::ReadReply { seq: 7, status: tandem_repl_proto::Status::Ok, data } }
            if data.len() == 4096)));
}

#[test]
fn a_crashed_primary_is_promoted_again_only_after_comparing_with_a_diskful_peer() {
    let cfg = Config::new(
        0,
        true,
        vec![
            PeerConfig {
                node_id: 1,
                diskful: true,
            },
            PeerConfig {
                node_id: 2,
                diskful: false,
            },
        ],
        SIZE,
    );
    let mut p = Persisted::new_volume(&cfg, 77);
    p.meta.primary = true;
    let (mut e, _) = Engine::new(cfg.clone(), p.clone(), 0);
    // Quorum through the witness alone: its metadata may predate writes node 1 took.
    connect(&mut e, 2, false, Role::Secondary);
    assert_eq!(e.promote(10), Err(PromoteError::CrashedPrimaryUnchecked));
    // After the handshake with node 1 (same generation, nothing out of sync): accepted.
    connect(&mut e, 1, true, Role::Secondary);
    assert!(e.promote(11).is_ok());
    assert_eq!(e.role(), Role::Primary);
    // Forced: accepted without the peer.
    let (mut e, _) = Engine::new(cfg, p, 0);
    connect(&mut e, 2, false, Role::Secondary);
    assert!(e.promote_forced(12).is_ok());
    assert_eq!(e.role(), Role::Primary);
}

/// Feeds `PeerUp` of diskful `peer`, its `report` and an empty bitmap, then answers our Pings.
fn connect_reporting(
    e: &mut Engine,
    peer: u8,
    report: tandem_repl_proto::StateReport,
) -> Vec<Action> {
    let mut out = e.handle(1, Event::PeerUp { peer });
    out.extend(e.handle(
        2,
        Event::PeerMessage {
            peer,
            msg: Message::StateReport(Box::new(report)),
        },
    ));
    out.extend(e.handle(
        3,
        Event::PeerMessage {
            peer,
            msg: Message::OutOfSync {
                flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
                ranges: vec![],
            },
        },
    ));
    with_pongs(e, 4, out)
}

/// Simulator seed 9439 (three diskful, disk faults, slow disks): a Primary's disk detached and
/// it wrote through its peers under a new generation its failing metadata never recorded;
/// repaired, it came back from older metadata, UpToDate at the generation before. Its peer
/// node 1 held the newer writes but was Outdated (it had missed later ones), so the handshake
/// found no source (`SourceNotUpToDate`) and node 1's vote made a majority: the stale node was
/// promoted and wrote, a split brain with the replicas that held the writes. A handshake that
/// finds the peer newer blocks the promotion even when that peer cannot be our source.
#[test]
fn a_node_whose_peer_holds_newer_data_is_not_promoted_even_if_that_peer_is_outdated() {
    use tandem_repl_proto::{DiskState, Generations};
    let mut e = engine(0, &[(1, true), (2, true)]);
    // Node 1 went on from our generation 77 to 88 and records us behind at 77; it is Outdated.
    let report = tandem_repl_proto::StateReport {
        disk_state: DiskState::Outdated,
        generations: Generations {
            current: 88,
            bitmap: 77,
            history: [77, 0],
        },
        ..report_of(1)
    };
    connect_reporting(&mut e, 1, report);
    assert_eq!(
        e.status()
            .peers
            .iter()
            .find(|p| p.node_id == 1)
            .and_then(|p| p.last_decision),
        Some((SyncDecision::NoGoodData, Rule::SourceNotUpToDate))
    );
    // Two of three voters: quorum is there, but our data is older than node 1's.
    assert_eq!(
        e.promote(10),
        Err(PromoteError::NotUpToDate(
            tandem_repl_proto::DiskState::Outdated
        ))
    );
    assert_eq!(e.role(), Role::Secondary);
}

/// Simulator seed 5218 (three diskful, disk faults): Primary node 0's disk detached, node 1
/// adopted its new generation (recording node 2 behind at the one before), node 2 missed it;
/// node 0 came back from metadata older than its detach and node 2 was promoted with node 0's
/// vote at the older generation, while node 0 also talked to node 1. Node 2 then wrote under a
/// generation of its own: a split brain with node 1. A voter that knows a replica which
/// records the new Primary behind at the generation it reports does not back it.
#[test]
fn a_voter_does_not_back_a_primary_that_another_replica_records_behind() {
    use tandem_repl_proto::{Generations, PeerBitmap};
    let mut e = engine(0, &[(1, true), (2, true)]);
    // Node 2: Secondary at our generation 77.
    connect(&mut e, 2, true, Role::Secondary);
    // Node 1 went on to generation 88 without node 2 (it records node 2 behind at 77).
    let report = tandem_repl_proto::StateReport {
        generations: Generations {
            current: 88,
            bitmap: 77,
            history: [77, 0],
        },
        peer_bitmaps: vec![PeerBitmap {
            node: 2,
            generation: 77,
        }],
        ..report_of(1)
    };
    connect_reporting(&mut e, 1, report);
    // Node 2 is promoted (at 77): we do not count for it.
    let a = reports_primary(&mut e, 2);
    assert_eq!(disconnects(&a), vec![(2, DisconnectReason::Other)]);
    // A Primary that node 1 does not record behind (here: one at node 1's generation, say
    // after a resync from it) is backed as usual.
    let mut e = engine(0, &[(1, true), (2, true)]);
    connect(&mut e, 2, true, Role::Secondary);
    connect_reporting(
        &mut e,
        1,
        tandem_repl_proto::StateReport {
            peer_bitmaps: vec![PeerBitmap {
                node: 2,
                generation: 66,
            }],
            ..report_of(1)
        },
    );
    let a = reports_primary(&mut e, 2);
    assert_eq!(disconnects(&a), vec![]);
}

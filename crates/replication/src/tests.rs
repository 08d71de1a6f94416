//! Engine tests driven by hand: ordering, protocol C completion, quorum, promotion refusals,
//! bad peer input. The simulator (`tandem-sim`) covers the combinations.

use bytes::Bytes;
use tandem_repl_proto::{DisconnectReason, Message, Role};

use crate::*;

const SIZE: u64 = 1 << 20;

fn engine(id: u8, peers: &[(u8, bool)]) -> Engine {
    let peers = peers
        .iter()
        .map(|(n, d)| PeerConfig {
            node_id: *n,
            diskful: *d,
        })
        .collect();
    let cfg = Config::new(id, true, peers, SIZE);
    let p = Persisted::new_volume(&cfg, 77);
    Engine::new(cfg, p, 0).0
}

/// Feeds PeerUp and a minimal handshake from `peer` (same generation, no bits) and its Pong.
fn connect(e: &mut Engine, peer: u8, diskful: bool, role: Role) -> Vec<Action> {
    let mut out = e.handle(1, Event::PeerUp { peer });
    let report = tandem_repl_proto::StateReport {
        seq: 1,
        node_id: peer,
        role,
        disk_state: if diskful {
            tandem_repl_proto::DiskState::UpToDate
        } else {
            tandem_repl_proto::DiskState::Diskless
        },
        quorum: Default::default(),
        flags: 0,
        size_bytes: SIZE,
        generations: tandem_repl_proto::Generations {
            current: if diskful { 77 } else { 0 },
            ..Default::default()
        },
        peer_bitmaps: vec![],
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
    let mut e = engine(0, &[(1, true), (2, false)]);
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
    let mut out = e.handle(1, Event::PeerUp { peer });
    let report = tandem_repl_proto::StateReport {
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
    };
    for msg in [
        Message::StateReport(Box::new(report)),
        Message::OutOfSync {
            flags: tandem_repl_proto::message::oos_flags::END_OF_BITMAP,
            ranges: vec![tandem_repl_proto::ByteRange {
                offset: 0,
                len: 4096,
            }],
        },
    ] {
        out.extend(e.handle(2, Event::PeerMessage { peer, msg }));
    }
    out
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

#[test]
fn interrupted_resync_makes_paused_links_compare_again() {
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
    // A second source while the first resync runs: paused.
    connect_as_target(&mut e, 2);
    assert_eq!(e.status().peers[1].repl_state, ReplState::PausedSync);
    let out = e.handle(4, Event::PeerDown { peer: 1 });
    assert_eq!(
        disconnects(&out),
        vec![(2, DisconnectReason::ConfigChanged)]
    );
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

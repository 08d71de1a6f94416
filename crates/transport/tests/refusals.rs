//! Wrong peers and bad input on the replication port: each is refused with the right reason
//! (counted and logged), while an established link on the same listener keeps working and
//! the listener keeps accepting good peers.

mod common;

use common::*;
use tandem_repl_proto::{HandshakeError, Message, RefuseReason};
use tandem_transport::{Event, RefusalReason, TransportConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Node 1 (dialer) and node 2 (acceptor, the node under test) with an established link on
/// volume `vol`; node 2 also lists nodes 0 and 3 as peers of `vol`.
async fn pair(vol: &str, uuid: &str) -> (Node, Node) {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    let mut cfg = volume(vol, uuid, &[&a]);
    for extra in [0u8, 3] {
        cfg.peers.push(tandem_transport::PeerConfig {
            node_id: extra,
            name: format!("node{extra}"),
            // Node 0 dials us; node 3 we would dial: nobody listens there.
            addr: "127.0.0.1:9".into(),
        });
    }
    b.t.set_volume(cfg).unwrap();
    a.t.set_volume(volume(vol, uuid, &[&b])).unwrap();
    a.up(vol, 2).await;
    b.up(vol, 1).await;
    (a, b)
}

/// The established link is still the same one and carries messages both ways; node 2 saw
/// no PeerDown.
async fn still_good(a: &mut Node, b: &mut Node, vol: &str, link: u64, seq: u64) {
    assert_eq!(
        b.t.link(vol, 1),
        Some(link),
        "the good link was not replaced"
    );
    ping_pong(a, b, vol, seq).await;
    for e in b.drain() {
        assert!(
            !matches!(e, Event::PeerDown { .. }),
            "unexpected event on node 2: {e:?}"
        );
    }
}

/// The raw peer's link ended with `last` from node 2: a `Disconnect{ProtocolError}`; node
/// 2's link `link` to node 1 is untouched. Shuts both transports down.
async fn told_protocol_error_and_the_good_link_stays(
    last: Option<Message>,
    mut a: Node,
    mut b: Node,
    vol: &str,
    link: u64,
) {
    assert!(
        matches!(
            last,
            Some(Message::Disconnect {
                reason: tandem_repl_proto::DisconnectReason::ProtocolError,
                ..
            })
        ),
        "{last:?}"
    );
    still_good(&mut a, &mut b, vol, link, 1).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_peers_are_refused_with_the_right_reason_and_the_good_link_keeps_working() {
    let vol = "refuse-vol";
    let uuid = "uuid-refuse";
    let (mut a, mut b) = pair(vol, uuid).await;
    let link = b.t.link(vol, 1).unwrap();
    let addr = b.t.local_addr();

    type Case = (
        &'static str,
        tandem_repl_proto::InitiatorConfig,
        RefuseReason,
        RefusalReason,
        &'static str,
    );
    let mut wrong_secret = initiator(vol, uuid, 0, 2);
    wrong_secret.secret =
        tandem_repl_proto::ClusterSecret::new(b"another secret of 32 bytes .....".to_vec())
            .unwrap();
    let mut wrong_cluster = initiator(vol, uuid, 0, 2);
    wrong_cluster.cluster_id = "other-cluster".into();
    let cases: Vec<Case> = vec![
        (
            "wrong secret",
            wrong_secret,
            RefuseReason::BadMac,
            RefusalReason::BadMac,
            "bad MAC",
        ),
        (
            "wrong cluster id",
            wrong_cluster,
            RefuseReason::WrongCluster,
            RefusalReason::WrongCluster,
            "other-cluster",
        ),
        (
            "wrong volume uuid",
            initiator(vol, "uuid-of-another-incarnation", 0, 2),
            RefuseReason::WrongVolume,
            RefusalReason::WrongVolume,
            "uuid-of-another-incarnation",
        ),
        (
            "unknown volume",
            initiator("refuse-nope", uuid, 0, 2),
            RefuseReason::WrongVolume,
            RefusalReason::WrongVolume,
            "we have no such volume",
        ),
        (
            "unknown node id",
            initiator(vol, uuid, 9, 2),
            RefuseReason::UnknownNode,
            RefusalReason::UnknownNode,
            "node 9 is not a peer",
        ),
        (
            "addressed to another node id",
            initiator(vol, uuid, 0, 5),
            RefuseReason::UnexpectedNode,
            RefusalReason::UnexpectedNode,
            "we are node 2",
        ),
        (
            "higher node id dialing",
            initiator(vol, uuid, 3, 2),
            RefuseReason::ProtocolError,
            RefusalReason::WrongDirection,
            "the lower node id dials",
        ),
    ];
    for (i, (what, cfg, wire, counted, text)) in cases.into_iter().enumerate() {
        let before = b.t.stats().refused(counted);
        let (outcome, mut sock) = raw_handshake(addr, cfg).await;
        let client = sock.local_addr().unwrap().to_string();
        match outcome {
            RawOutcome::Refused {
                msg: Message::Refused { reason, .. },
                error,
            } => {
                assert_eq!(reason, wire, "{what}: refusal reason on the wire");
                if wire == RefuseReason::BadMac {
                    assert!(matches!(error, HandshakeError::RefusedByPeer { .. }));
                }
            }
            other => panic!("{what}: expected a refusal, got {other:?}"),
        }
        read_to_close(&mut sock).await;
        assert_eq!(
            b.t.stats().refused(counted),
            before + 1,
            "{what}: counted as {counted}"
        );
        let line = expect_warn(&[
            "refused replication connection",
            &format!("reason=\"{}\"", counted.as_str()),
            &format!("peer={client}"),
            text,
        ])
        .await;
        if counted != RefusalReason::WrongVolume || what == "wrong volume uuid" {
            assert!(
                line.contains(&format!("volume=\"{vol}\"")),
                "{what}: {line}"
            );
        }
        // The good link is untouched, before and after every refusal.
        still_good(&mut a, &mut b, vol, link, i as u64).await;
    }
    assert_eq!(b.t.stats().links_up, 1);
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transport_with_the_wrong_secret_is_refused_and_retries() {
    let vol = "refuse-secret";
    let uuid = "uuid-secret";
    let (mut a, mut b) = pair(vol, uuid).await;
    let link = b.t.link(vol, 1).unwrap();
    // Node 0 knows the cluster id and volume but not the secret.
    let mut cfg: TransportConfig = config(0, loopback());
    cfg.secret =
        tandem_repl_proto::ClusterSecret::new(b"not the secret, also long enough".to_vec())
            .unwrap();
    let mut bad = Node::start_with(cfg).await;
    bad.t.set_volume(volume(vol, uuid, &[&b])).unwrap();
    eventually("two bad MACs on node 2", || {
        (b.t.stats().refused(RefusalReason::BadMac) >= 2).then_some(())
    })
    .await;
    // The bad node learns it was refused, and never gets a link.
    eventually("node 0 saw the refusal", || {
        (bad.t.stats().refused(RefusalReason::RefusedByPeer) >= 1).then_some(())
    })
    .await;
    assert!(bad.drain().is_empty(), "no PeerUp for the bad node");
    assert_eq!(b.t.link(vol, 0), None);
    expect_warn(&[
        "refused replication connection",
        "reason=\"bad_mac\"",
        &format!("volume=\"{vol}\""),
    ])
    .await;
    still_good(&mut a, &mut b, vol, link, 1).await;
    bad.t.shutdown().await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_broken_clients_are_closed_and_the_listener_keeps_accepting() {
    let vol = "garbage-vol";
    let uuid = "uuid-garbage";
    let (mut a, mut b) = pair(vol, uuid).await;
    let link = b.t.link(vol, 1).unwrap();
    let addr = b.t.local_addr();

    // 1. Not our protocol at all: a Refused{ProtocolError} (harmless) and the close.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let back = read_to_close(&mut s).await;
    assert!(
        matches!(
            frames(&back).as_slice(),
            [Message::Refused {
                reason: RefuseReason::ProtocolError,
                ..
            }]
        ),
        "{back:?}"
    );
    eventually("garbage counted", || {
        (b.t.stats().refused(RefusalReason::Garbage) == 1).then_some(())
    })
    .await;
    expect_warn(&[
        "refused replication connection",
        "reason=\"garbage\"",
        "bad frame magic",
    ])
    .await;
    still_good(&mut a, &mut b, vol, link, 1).await;

    // 2. A valid header declaring a 1 GiB payload: refused before any payload is buffered.
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(b"TDRP");
    h[6..8].copy_from_slice(&1u16.to_le_bytes()); // Hello
    h[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let crc = crc32c::crc32c(&h[0..20]);
    h[20..24].copy_from_slice(&crc.to_le_bytes());
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&h).await.unwrap();
    read_to_close(&mut s).await;
    eventually("oversized counted", || {
        (b.t.stats().refused(RefusalReason::Oversized) == 1).then_some(())
    })
    .await;
    expect_warn(&["refused replication connection", "reason=\"oversized\""]).await;
    still_good(&mut a, &mut b, vol, link, 2).await;

    // 3. A truncated Hello, then the client closes.
    let (_, hello) =
        tandem_repl_proto::Initiator::new(initiator(vol, uuid, 0, 2), [1; 32]).unwrap();
    let mut bytes = Vec::new();
    tandem_repl_proto::encode(&hello, &mut bytes).unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&bytes[..30]).await.unwrap();
    s.shutdown().await.unwrap();
    read_to_close(&mut s).await;
    eventually("closed counted", || {
        (b.t.stats().refused(RefusalReason::Closed) == 1).then_some(())
    })
    .await;
    still_good(&mut a, &mut b, vol, link, 3).await;

    // 4. A truncated Hello, then silence; 5. a client that never sends a byte. Both are
    // dropped at the handshake deadline.
    let mut truncated = TcpStream::connect(addr).await.unwrap();
    truncated.write_all(&bytes[..30]).await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Meanwhile the good link works.
    still_good(&mut a, &mut b, vol, link, 4).await;
    read_to_close(&mut truncated).await;
    read_to_close(&mut silent).await;
    eventually("timeouts counted", || {
        (b.t.stats().refused(RefusalReason::Timeout) == 2).then_some(())
    })
    .await;
    expect_warn(&["refused replication connection", "reason=\"timeout\""]).await;

    // 6. A valid frame of the wrong kind first.
    let mut s = TcpStream::connect(addr).await.unwrap();
    send_raw(&mut s, &Message::Auth { mac: [0; 32] }).await;
    let back = read_to_close(&mut s).await;
    assert!(matches!(
        frames(&back).as_slice(),
        [Message::Refused {
            reason: RefuseReason::UnexpectedMessage,
            ..
        }]
    ));

    // The listener still accepts good peers: a new volume links up, and the old link works.
    a.t.set_volume(volume("garbage-vol-2", "uuid-g2", &[&b]))
        .unwrap();
    b.t.set_volume(volume("garbage-vol-2", "uuid-g2", &[&a]))
        .unwrap();
    a.up("garbage-vol-2", 2).await;
    b.up("garbage-vol-2", 1).await;
    ping_pong(&mut a, &mut b, "garbage-vol-2", 5).await;
    still_good(&mut a, &mut b, vol, link, 6).await;
    let s = b.t.stats();
    assert_eq!(s.links_up, 2, "{s:?}");
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicated_frame_on_an_established_link_takes_it_down_before_delivery() {
    // A raw client completes a real handshake as node 0 and sends its first frame twice
    // (what a sender's bug in resending a partly written frame would do): the first copy is
    // delivered, the second never reaches the consumer; the link goes down with the
    // sequence error and the link to node 1 is untouched.
    let vol = "dup-frame";
    let uuid = "uuid-df";
    let (a, mut b) = pair(vol, uuid).await;
    let link = b.t.link(vol, 1).unwrap();
    let (outcome, mut s) = raw_handshake(b.t.local_addr(), initiator(vol, uuid, 0, 2)).await;
    let RawOutcome::Established(est) = outcome else {
        panic!("{outcome:?}");
    };
    b.up(vol, 0).await;
    let enc = tandem_repl_proto::Encoder::new(est.version);
    let mut bytes = Vec::new();
    enc.encode_seq(&Message::Ping { token: 41 }, 1, &mut bytes)
        .unwrap();
    let once = bytes.clone();
    bytes.extend_from_slice(&once);
    enc.encode_seq(&Message::Ping { token: 43 }, 2, &mut bytes)
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    assert_eq!(b.message(vol, 0).await, Message::Ping { token: 41 });
    match b.next().await {
        Event::PeerDown {
            peer: 0, reason, ..
        } => assert!(
            matches!(
                &reason,
                tandem_transport::DownReason::Decode(tandem_repl_proto::DecodeError::Sequence {
                    expected: 2,
                    found: 1,
                    ..
                })
            ),
            "{reason:?}"
        ),
        other => panic!("expected node 0's link down right after its first Ping, got {other:?}"),
    }
    let last = last_link_message(&read_to_close(&mut s).await, est.version);
    told_protocol_error_and_the_good_link_stays(last, a, b, vol, link).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_9_peer_neither_numbers_nor_gets_numbered_frames() {
    // A peer of the previous release (versions 1..=9): the link runs version 9, whose frames
    // carry 0 where version 10 numbers them, both ways, and nothing is checked.
    let vol = "v9-peer";
    let uuid = "uuid-v9";
    let (_a, mut b) = pair(vol, uuid).await;
    let mut cfg = initiator(vol, uuid, 0, 2);
    cfg.versions = tandem_repl_proto::VersionRange::new(1, 9).unwrap();
    let (outcome, mut s) = raw_handshake(b.t.local_addr(), cfg).await;
    let RawOutcome::Established(est) = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(est.version, tandem_repl_proto::ProtocolVersion::V9);
    b.up(vol, 0).await;
    // The same unnumbered frame twice: a version-9 link takes both.
    let mut bytes = Vec::new();
    tandem_repl_proto::Encoder::new(est.version)
        .encode(&Message::Ping { token: 41 }, &mut bytes)
        .unwrap();
    let once = bytes.clone();
    bytes.extend_from_slice(&once);
    s.write_all(&bytes).await.unwrap();
    assert_eq!(b.message(vol, 0).await, Message::Ping { token: 41 });
    assert_eq!(b.message(vol, 0).await, Message::Ping { token: 41 });
    // Node 2's frames to it: version 9, the field at offset 8 is 0.
    for token in [1, 2] {
        b.t.send(vol, 0, Message::Pong { token }).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 2 * tandem_repl_proto::HEADER_LEN + 16 {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .expect("node 2's frames")
            .unwrap();
        assert!(n > 0, "closed");
        got.extend_from_slice(&buf[..n]);
    }
    let mut dec = tandem_repl_proto::Decoder::new();
    dec.set_version(est.version);
    dec.feed(&got);
    for token in [1, 2] {
        let f = dec.next_frame().unwrap().expect("a whole frame");
        assert_eq!((f.version, f.flags, f.seq), (9, 0, 0));
        assert_eq!(f.message().unwrap(), Message::Pong { token });
    }
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_on_an_established_link_takes_down_only_that_link() {
    // A raw client completes a real handshake as node 0, then sends garbage: that link goes
    // down with a decode error, node 2 tells it why, the link to node 1 is untouched.
    let vol = "garbage-link";
    let uuid = "uuid-gl";
    let (a, mut b) = pair(vol, uuid).await;
    let link = b.t.link(vol, 1).unwrap();
    let (outcome, mut s) = raw_handshake(b.t.local_addr(), initiator(vol, uuid, 0, 2)).await;
    assert!(matches!(outcome, RawOutcome::Established(_)), "{outcome:?}");
    b.up(vol, 0).await;
    s.write_all(&[0xde; 64]).await.unwrap();
    match b.down(vol, 0).await {
        Event::PeerDown { reason, .. } => assert!(
            matches!(reason, tandem_transport::DownReason::Decode(_)),
            "{reason:?}"
        ),
        _ => unreachable!(),
    }
    let back = read_to_close(&mut s).await;
    // Everything node 2 sent on that link decodes; the last frame is the Disconnect.
    let last = last_link_message(&back, tandem_repl_proto::ProtocolVersion::LATEST);
    told_protocol_error_and_the_good_link_stays(last, a, b, vol, link).await;
}

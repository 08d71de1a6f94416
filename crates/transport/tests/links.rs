//! Links between in-process transports on loopback: establishment, ordered exchange (with
//! 1 MiB payloads), back-pressure, breaks and reconnects, keepalive timeouts, removal,
//! shutdown.

mod common;

use std::sync::Arc;

use common::*;
use tandem_repl_proto::{DisconnectReason, Message, Status};
use tandem_transport::{DownReason, Event, SendError, Transport, VolumeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_exchange_in_order_with_large_payloads() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    // The acceptor first, so the dialer's first attempt succeeds (no WrongVolume refusal).
    b.t.set_volume(volume("two", "uuid-two", &[&a])).unwrap();
    a.t.set_volume(volume("two", "uuid-two", &[&b])).unwrap();
    let la = a.up("two", 2).await;
    let lb = b.up("two", 1).await;
    assert_eq!(a.t.link("two", 2), Some(la));
    assert_eq!(b.t.link("two", 1), Some(lb));
    let info = a.t.links();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].remote, b.t.local_addr(), "node 1 dialed node 2");

    // Both directions at once; every 10th write carries 1 MiB.
    const N: u64 = 200;
    let size = |i: u64| {
        if i.is_multiple_of(10) {
            1 << 20
        } else {
            100 + i as usize
        }
    };
    let ta = a.t.clone();
    let sender_a = tokio::spawn(async move {
        for i in 0..N {
            ta.send("two", 2, write(i, pattern(i, size(i))))
                .await
                .unwrap();
        }
    });
    let tb = b.t.clone();
    let sender_b = tokio::spawn(async move {
        for i in 0..N {
            tb.send(
                "two",
                1,
                Message::WriteAck {
                    seq: i,
                    status: Status::Ok,
                },
            )
            .await
            .unwrap();
        }
    });
    for i in 0..N {
        match b.message("two", 1).await {
            Message::Write { seq, data, .. } => {
                assert_eq!(seq, i, "in order");
                assert_eq!(data.len(), size(i));
                assert!(data == pattern(i, size(i)), "payload {i} intact");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for i in 0..N {
        assert_eq!(
            a.message("two", 2).await,
            Message::WriteAck {
                seq: i,
                status: Status::Ok
            }
        );
    }
    sender_a.await.unwrap();
    sender_b.await.unwrap();
    assert!(a.drain().is_empty() && b.drain().is_empty(), "nothing else");
    let s = b.t.stats();
    assert_eq!(s.links_up, 1);
    assert!(s.refused_by_reason.is_empty(), "{s:?}");
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounded_queues_apply_back_pressure_without_losing_order() {
    // Small queues: the sender must wait for the slow consumer, nothing is lost or reordered.
    let mut ca = config(1, loopback());
    ca.limits.send_queue_bytes = 2 << 20;
    ca.limits.send_queue_frames = 4;
    let mut cb = config(2, loopback());
    cb.limits.event_queue = 2;
    let mut a = Node::start_with(ca).await;
    let mut b = Node::start_with(cb).await;
    a.t.set_volume(volume("bp", "uuid-bp", &[&b])).unwrap();
    b.t.set_volume(volume("bp", "uuid-bp", &[&a])).unwrap();
    a.up("bp", 2).await;
    b.up("bp", 1).await;
    const N: u64 = 48;
    let ta = a.t.clone();
    let sender = tokio::spawn(async move {
        let mut full_seen = false;
        for i in 0..N {
            let msg = write(i, pattern(i, 1 << 20));
            match ta.try_send("bp", 2, msg.clone()) {
                Ok(()) => {}
                Err(SendError::Full { .. }) => {
                    full_seen = true;
                    ta.send("bp", 2, msg).await.unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
        full_seen
    });
    for i in 0..N {
        match b.message("bp", 1).await {
            Message::Write { seq, data, .. } => {
                assert_eq!(seq, i);
                assert!(data == pattern(i, 1 << 20));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        sender.await.unwrap(),
        "the send queue filled up at least once"
    );
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn direct_and_queued_sends_from_a_plain_thread_keep_order_when_the_socket_fills() {
    // A sender thread outside the runtime (like a volume's engine loop) sends frames of
    // many sizes (direct sends up to 256 KiB, queued above) to a peer that reads late: the
    // socket buffer fills, direct sends stop part-way or not at all, and the rest must queue
    // behind. Every frame arrives whole and in order.
    let mut a = Node::start(1).await;
    let mut cb = config(2, loopback());
    cb.limits.event_queue = 2;
    let mut b = Node::start_with(cb).await;
    a.t.set_volume(volume("dq", "uuid-dq", &[&b])).unwrap();
    b.t.set_volume(volume("dq", "uuid-dq", &[&a])).unwrap();
    a.up("dq", 2).await;
    b.up("dq", 1).await;
    const N: u64 = 400;
    let size = |i: u64| match i % 7 {
        0 => 1 << 20,
        1 => 200 * 1024 + i as usize,
        2 => 64 * 1024 - 3,
        3 => 4096,
        4 => 130 * 1024 + 11,
        _ => 40 + i as usize,
    };
    let ta = a.t.clone();
    let rt = tokio::runtime::Handle::current();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let full_seen = full.clone();
    let sender = std::thread::spawn(move || {
        for i in 0..N {
            let msg = write(i, pattern(i, size(i)));
            match ta.try_send("dq", 2, msg.clone()) {
                Ok(()) => {}
                Err(SendError::Full { .. }) => {
                    full_seen.store(true, std::sync::atomic::Ordering::Release);
                    rt.block_on(ta.send("dq", 2, msg)).unwrap();
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    // Read nothing until the sender's queue is full: the receiver's event queue (2) and
    // socket buffers are full by then, so direct sends met a full socket.
    expect_in_order_once_full(a, b, "dq", &full, sender, N, size).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_sends_keep_order_through_full_sockets_and_full_queues() {
    // Like the test above with `try_send_batch_on`: batches of 1 to 80 frames of many sizes
    // (several frames per direct sendmsg, large ones through the writer) from a plain
    // thread to a peer that reads late; what finds the queue full is sent with `send_on`
    // before the next batch (the volume driver's backlog). Every frame arrives whole and in
    // order.
    let mut a = Node::start(1).await;
    let mut cb = config(2, loopback());
    cb.limits.event_queue = 2;
    let mut b = Node::start_with(cb).await;
    a.t.set_volume(volume("bq", "uuid-bq", &[&b])).unwrap();
    b.t.set_volume(volume("bq", "uuid-bq", &[&a])).unwrap();
    let link = a.up("bq", 2).await;
    b.up("bq", 1).await;
    const N: u64 = 3000;
    let size = |i: u64| match i % 13 {
        0 => 1 << 20,
        1 => 200 * 1024 + i as usize,
        2..=7 => 4096,
        _ => 40 + (i % 300) as usize,
    };
    let ta = a.t.clone();
    let rt = tokio::runtime::Handle::current();
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let full_seen = full.clone();
    let sender = std::thread::spawn(move || {
        let mut i = 0;
        let mut batch = std::collections::VecDeque::new();
        while i < N {
            let n = (i % 80 + 1).min(N - i);
            batch.extend((i..i + n).map(|j| write(j, pattern(j, size(j)))));
            i += n;
            match ta.try_send_batch_on("bq", 2, link, &mut batch) {
                Ok(()) => assert!(batch.is_empty()),
                Err(SendError::Full { .. }) => {
                    full_seen.store(true, std::sync::atomic::Ordering::Release);
                    for m in batch.drain(..) {
                        rt.block_on(ta.send_on("bq", 2, link, m)).unwrap();
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    });
    expect_in_order_once_full(a, b, "bq", &full, sender, N, size).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_refuses_a_stale_link_and_an_invalid_message_without_losing_the_others() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    a.t.set_volume(volume("bs", "uuid-bs", &[&b])).unwrap();
    b.t.set_volume(volume("bs", "uuid-bs", &[&a])).unwrap();
    let link = a.up("bs", 2).await;
    b.up("bs", 1).await;
    let mut batch: std::collections::VecDeque<Message> =
        [write(1, pattern(1, 4096)), write(2, pattern(2, 10))].into();
    let r = a.t.try_send_batch_on("bs", 2, link + 1000, &mut batch);
    assert!(matches!(r, Err(SendError::StaleLink { .. })), "{r:?}");
    assert_eq!(batch.len(), 2, "nothing taken for a stale link");
    // A handshake message in the middle: the ones before it go out, it stays in front.
    batch.push_back(Message::Ping { token: 0 });
    batch.push_back(Message::Auth { mac: [0; 32] });
    batch.push_back(write(3, pattern(3, 100)));
    let r = a.t.try_send_batch_on("bs", 2, link, &mut batch);
    assert!(matches!(r, Err(SendError::Invalid(_))), "{r:?}");
    assert_eq!(batch.len(), 2);
    assert!(matches!(batch.pop_front(), Some(Message::Auth { .. })));
    a.t.try_send_batch_on("bs", 2, link, &mut batch).unwrap();
    assert!(batch.is_empty());
    for want in [1, 2] {
        assert!(matches!(b.message("bs", 1).await, Message::Write { seq, .. } if seq == want));
    }
    assert_eq!(b.message("bs", 1).await, Message::Ping { token: 0 });
    assert!(matches!(
        b.message("bs", 1).await,
        Message::Write { seq: 3, .. }
    ));
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_full_mesh() {
    let mut n = vec![
        Node::start(1).await,
        Node::start(2).await,
        Node::start(3).await,
    ];
    for i in 0..3 {
        let peers: Vec<&Node> = (0..3).filter(|j| *j != i).map(|j| &n[j]).collect();
        let v = volume("three", "uuid-three", &peers);
        n[i].t.set_volume(v).unwrap();
    }
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let peer = n[j].id();
                n[i].up("three", peer).await;
            }
        }
    }
    // Every node sends 50 numbered messages to each other node.
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let to = n[j].id();
                for s in 0..50 {
                    let msg = write(s, pattern(s * 10 + i as u64, 4096 + s as usize));
                    n[i].t.send("three", to, msg).await.unwrap();
                }
            }
        }
    }
    for node in n.iter_mut() {
        let mut next = std::collections::BTreeMap::new();
        for _ in 0..100 {
            match node.next().await {
                Event::PeerMessage {
                    peer,
                    msg: Message::Write { seq, data, .. },
                    ..
                } => {
                    let e = next.entry(peer).or_insert(0u64);
                    assert_eq!(seq, *e, "in order per link");
                    assert!(data == pattern(seq * 10 + (peer - 1) as u64, 4096 + seq as usize));
                    *e += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![50, 50]);
        assert_eq!(node.t.stats().links_up, 2);
    }
    for node in &n {
        node.t.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_peer_gives_peer_down_and_reconnects_when_it_returns() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    let b_addr = b.t.local_addr();
    a.t.set_volume(volume("rc", "uuid-rc", &[&b])).unwrap();
    b.t.set_volume(volume("rc", "uuid-rc", &[&a])).unwrap();
    let first = a.up("rc", 2).await;
    b.up("rc", 1).await;

    // The acceptor stops in order: the dialer hears why, and redials.
    b.t.shutdown().await;
    match a.down("rc", 2).await {
        Event::PeerDown { link, reason, .. } => {
            assert_eq!(link, first);
            assert_eq!(
                reason,
                DownReason::PeerDisconnected {
                    reason: DisconnectReason::Shutdown,
                    detail: "the transport is shutting down".into(),
                }
            );
        }
        _ => unreachable!(),
    }
    assert!(matches!(
        a.t.send("rc", 2, Message::Flush { seq: 1 }).await,
        Err(SendError::NotConnected { .. })
    ));
    drop(b);
    let mut b = Node::start_with(config(2, b_addr)).await;
    b.t.set_volume(volume("rc", "uuid-rc", &[&a])).unwrap();
    let second = a.up("rc", 2).await;
    assert_ne!(second, first);
    b.up("rc", 1).await;
    ping_pong(&mut a, &mut b, "rc", 1).await;
    assert!(
        matches!(
            a.t.try_send_on("rc", 2, first, Message::Flush { seq: 2 }),
            Err(SendError::StaleLink { .. })
        ),
        "a message meant for the old link never reaches the new one"
    );

    // The dialer dies without a word (dropped: tasks aborted, sockets closed).
    let a_id = a.id();
    drop(a);
    match b.down("rc", a_id).await {
        Event::PeerDown { reason, .. } => {
            assert!(
                matches!(reason, DownReason::Closed | DownReason::Io(_)),
                "{reason:?}"
            )
        }
        _ => unreachable!(),
    }
    let mut a = Node::start(1).await;
    a.t.set_volume(volume("rc", "uuid-rc", &[&b])).unwrap();
    a.up("rc", 2).await;
    b.up("rc", 1).await;
    ping_pong(&mut a, &mut b, "rc", 3).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_connection_reconnects() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    let proxy = Proxy::start(b.t.local_addr()).await;
    let mut via_proxy = b.peer();
    via_proxy.addr = proxy.addr.to_string();
    a.t.set_volume(VolumeConfig {
        name: "cut".into(),
        uuid: "uuid-cut".into(),
        peers: vec![via_proxy],
    })
    .unwrap();
    b.t.set_volume(volume("cut", "uuid-cut", &[&a])).unwrap();
    for round in 0..3u64 {
        a.up("cut", 2).await;
        b.up("cut", 1).await;
        ping_pong(&mut a, &mut b, "cut", round).await;
        proxy.cut();
        for (n, peer) in [(&mut a, 2), (&mut b, 1)] {
            match n.down("cut", peer).await {
                Event::PeerDown { reason, .. } => assert!(
                    matches!(reason, DownReason::Closed | DownReason::Io(_)),
                    "{reason:?}"
                ),
                _ => unreachable!(),
            }
        }
    }
    a.up("cut", 2).await;
    b.up("cut", 1).await;
    ping_pong(&mut a, &mut b, "cut", 99).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_link_times_out_on_both_sides_and_reconnects() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    let proxy = Proxy::start(b.t.local_addr()).await;
    let mut via_proxy = b.peer();
    via_proxy.addr = proxy.addr.to_string();
    a.t.set_volume(VolumeConfig {
        name: "frozen".into(),
        uuid: "uuid-frozen".into(),
        peers: vec![via_proxy],
    })
    .unwrap();
    b.t.set_volume(volume("frozen", "uuid-frozen", &[&a]))
        .unwrap();
    a.up("frozen", 2).await;
    b.up("frozen", 1).await;
    // Idle for several ping intervals: keepalive holds the link.
    let idle_until = tokio::time::Instant::now() + fast_timers().ping_timeout * 2;
    while tokio::time::Instant::now() < idle_until {
        assert!(
            a.drain().is_empty() && b.drain().is_empty(),
            "an idle link stays up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The network goes silent without closing anything.
    proxy.freeze();
    for (n, peer) in [(&mut a, 2), (&mut b, 1)] {
        match n.down("frozen", peer).await {
            Event::PeerDown { reason, .. } => {
                assert_eq!(reason, DownReason::Timeout(fast_timers().ping_timeout))
            }
            _ => unreachable!(),
        }
    }
    a.up("frozen", 2).await;
    b.up("frozen", 1).await;
    ping_pong(&mut a, &mut b, "frozen", 1).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removing_a_volume_closes_its_links_and_re_adding_reconnects() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    a.t.set_volume(volume("rm", "uuid-rm", &[&b])).unwrap();
    b.t.set_volume(volume("rm", "uuid-rm", &[&a])).unwrap();
    a.t.set_volume(volume("stay", "uuid-stay", &[&b])).unwrap();
    b.t.set_volume(volume("stay", "uuid-stay", &[&a])).unwrap();
    a.up("rm", 2).await;
    b.up("rm", 1).await;
    a.up("stay", 2).await;
    b.up("stay", 1).await;

    assert!(a.t.remove_volume("rm"));
    match a.down("rm", 2).await {
        Event::PeerDown { reason, .. } => assert_eq!(reason, DownReason::Removed),
        _ => unreachable!(),
    }
    match b.down("rm", 1).await {
        Event::PeerDown { reason, .. } => assert!(
            matches!(
                reason,
                DownReason::PeerDisconnected {
                    reason: DisconnectReason::ConfigChanged,
                    ..
                }
            ),
            "{reason:?}"
        ),
        _ => unreachable!(),
    }
    assert!(matches!(
        a.t.send("rm", 2, Message::Flush { seq: 1 }).await,
        Err(SendError::NotConnected { .. })
    ));
    assert_eq!(a.t.volumes(), vec!["stay".to_string()]);
    // The other volume's link is untouched.
    ping_pong(&mut a, &mut b, "stay", 1).await;
    assert!(a.drain().is_empty() && b.drain().is_empty());

    a.t.set_volume(volume("rm", "uuid-rm", &[&b])).unwrap();
    a.up("rm", 2).await;
    b.up("rm", 1).await;
    ping_pong(&mut a, &mut b, "rm", 2).await;

    // Removing the peer from the volume closes the link too.
    a.t.set_volume(VolumeConfig {
        name: "rm".into(),
        uuid: "uuid-rm".into(),
        peers: vec![],
    })
    .unwrap();
    match a.down("rm", 2).await {
        Event::PeerDown { reason, .. } => assert_eq!(reason, DownReason::Removed),
        _ => unreachable!(),
    }
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_sends_are_refused_locally() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    a.t.set_volume(volume("inv", "uuid-inv", &[&b])).unwrap();
    b.t.set_volume(volume("inv", "uuid-inv", &[&a])).unwrap();
    a.up("inv", 2).await;
    b.up("inv", 1).await;
    for msg in [
        Message::Auth { mac: [0; 32] },
        Message::Trim {
            seq: 1,
            offset: 0,
            len: 0,
            flags: 0,
        },
    ] {
        assert!(matches!(
            a.t.send("inv", 2, msg).await,
            Err(SendError::Invalid(_))
        ));
    }
    assert!(matches!(
        a.t.send("nope", 2, Message::Flush { seq: 1 }).await,
        Err(SendError::NotConnected { .. })
    ));
    // The link is unaffected.
    ping_pong(&mut a, &mut b, "inv", 1).await;
    a.t.shutdown().await;
    b.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_ends_every_task() {
    let mut a = Node::start(1).await;
    let mut b = Node::start(2).await;
    let mut c = Node::start(3).await;
    for (n, peers) in [(&a, [&b, &c]), (&b, [&a, &c]), (&c, [&a, &b])] {
        n.t.set_volume(volume("sd", "uuid-sd", &peers)).unwrap();
    }
    for n in [&a, &b, &c] {
        eventually("a full mesh", || (n.t.stats().links_up == 2).then_some(())).await;
    }
    assert!(a.t.stats().live_tasks > 0);
    // Also a connection stuck in its handshake.
    let _silent = tokio::net::TcpStream::connect(a.t.local_addr())
        .await
        .unwrap();
    eventually("the silent connection accepted", || {
        (a.t.stats().connections_accepted >= 1).then_some(())
    })
    .await;
    let start = tokio::time::Instant::now();
    for n in [&a, &b, &c] {
        n.t.shutdown().await;
    }
    assert!(start.elapsed() < WAIT);
    for n in [&mut a, &mut b, &mut c] {
        let s = n.t.stats();
        assert_eq!(s.live_tasks, 0, "node {}: {s:?}", n.id());
        assert_eq!(s.links_up, 0);
        assert!(n.t.set_volume(volume("x", "y", &[])).is_err());
        // Every link reported down (there was room in the channel).
        let downs = n
            .drain()
            .into_iter()
            .filter(|e| matches!(e, Event::PeerDown { .. }))
            .count();
        assert!(downs >= 1, "node {}", n.id());
    }
}

#[tokio::test]
async fn configuration_is_checked() {
    init_logs();
    let mut bad = config(40, loopback());
    assert!(Transport::start(bad.clone()).await.is_err());
    bad.node_id = 1;
    bad.cluster_id = String::new();
    assert!(Transport::start(bad).await.is_err());
    let n = Node::start(1).await;
    let me = n.peer();
    assert!(
        n.t.set_volume(VolumeConfig {
            name: "v".into(),
            uuid: "u".into(),
            peers: vec![me],
        })
        .is_err(),
        "we are not our own peer"
    );
    assert!(
        n.t.set_volume(VolumeConfig {
            name: "".into(),
            uuid: "u".into(),
            peers: vec![],
        })
        .is_err()
    );
    let _ = Arc::clone(&n.t);
    n.t.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_connection_from_the_same_peer_supersedes_the_old_link() {
    // The dialer restarted while the acceptor still holds the old connection: the new
    // authenticated connection replaces it, PeerDown(old) strictly before PeerUp(new).
    let mut b = Node::start(2).await;
    let a = Node::start(1).await;
    b.t.set_volume(volume("sup", "uuid-sup", &[&a])).unwrap();
    let addr = b.t.local_addr();
    let (first, mut old) = raw_handshake(addr, initiator("sup", "uuid-sup", 1, 2)).await;
    assert!(matches!(first, RawOutcome::Established(_)), "{first:?}");
    let old_link = b.up("sup", 1).await;
    let (second, _new) = raw_handshake(addr, initiator("sup", "uuid-sup", 1, 2)).await;
    assert!(matches!(second, RawOutcome::Established(_)), "{second:?}");
    match b.next().await {
        Event::PeerDown { link, reason, .. } => {
            assert_eq!(link, old_link);
            assert_eq!(reason, DownReason::Superseded);
        }
        other => panic!("expected PeerDown of the old link first, got {other:?}"),
    }
    match b.next().await {
        Event::PeerUp { link, .. } => assert_ne!(link, old_link),
        other => panic!("expected PeerUp, got {other:?}"),
    }
    // The old connection was told and closed.
    let bytes = read_to_close(&mut old).await;
    let last = last_link_message(&bytes, tandem_repl_proto::ProtocolVersion::LATEST);
    assert!(
        matches!(
            last,
            Some(Message::Disconnect {
                reason: DisconnectReason::Other,
                ..
            })
        ),
        "{last:?}"
    );
    assert_eq!(b.t.stats().links_up, 1);
    b.t.shutdown().await;
    a.t.shutdown().await;
}

/// Waits until `sender` found its queue full (the peer read nothing so far), then reads `n`
/// Write frames on `b`: each whole, intact and in order; nothing else; shuts both down.
async fn expect_in_order_once_full(
    a: Node,
    mut b: Node,
    vol: &str,
    full: &std::sync::atomic::AtomicBool,
    sender: std::thread::JoinHandle<()>,
    n: u64,
    size: impl Fn(u64) -> usize,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !full.load(std::sync::atomic::Ordering::Acquire) {
        assert!(
            !sender.is_finished(),
            "the sender never found its queue full"
        );
        assert!(std::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    for i in 0..n {
        match b.message(vol, 1).await {
            Message::Write { seq, data, .. } => {
                assert_eq!(seq, i, "in order");
                assert_eq!(data.len(), size(i), "frame {i} whole");
                assert!(data == pattern(i, size(i)), "payload {i} intact");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::task::spawn_blocking(move || sender.join().unwrap())
        .await
        .unwrap();
    assert!(b.drain().is_empty(), "nothing else");
    a.t.shutdown().await;
    b.t.shutdown().await;
}

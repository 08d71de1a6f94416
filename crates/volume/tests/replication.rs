//! The driver on real loopback transports and real files: replication, flush, crash and
//! bitmap resync, restart, quorum with a witness.

mod common;

use common::*;
use tandem_volume::{DiskState, ReplState, Role};

/// Waits until node `id` sees every peer connected and in sync, and has quorum.
fn wait_in_sync(c: &Cluster, id: u8) {
    wait_for(20, &format!("node {id} connected and in sync"), || {
        let s = c.d(id).status().unwrap();
        (s.quorum
            && s.disk_state != DiskState::Inconsistent
            && s.out_of_sync_bytes == 0
            && s.peers
                .iter()
                .all(|p| p.connected && p.repl_state == ReplState::Established))
        .then_some(())
    });
}

fn promote(c: &Cluster, id: u8) {
    wait_for(20, &format!("promotion of node {id}"), || {
        match c.d(id).promote() {
            Ok(()) => Some(()),
            Err(e) => {
                eprintln!("promote: {e}");
                None
            }
        }
    });
    assert_eq!(c.d(id).status().unwrap().role, Role::Primary);
}

#[test]
fn writes_replicate_flush_crash_resync_and_restart() {
    let size = 64 * MIB;
    let mut c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    promote(&c, 1);
    let dev = c.d(1).block_device();

    // Writes land byte-identical on both replicas.
    let mut expect = vec![0u8; size as usize];
    fn write(
        dev: &dyn tandem_blockdev::BlockDevice,
        expect: &mut [u8],
        seed: u64,
        off: u64,
        len: usize,
    ) {
        let p = pattern(seed, len);
        dev.write_at(&p, off).unwrap();
        expect[off as usize..off as usize + len].copy_from_slice(&p);
    }
    write(&*dev, &mut expect, 1, 0, 4096);
    write(&*dev, &mut expect, 2, 5 * MIB + 512, 100_000);
    write(&*dev, &mut expect, 3, size - 4096, 4096);
    write(&*dev, &mut expect, 4, 5 * MIB + 4096, 8192); // overlaps write 2
    dev.flush().unwrap();
    assert!(c.data(1) == expect, "node 1 data differs");
    assert!(c.data(2) == expect, "node 2 data differs");
    let mut buf = vec![0u8; 100_000];
    dev.read_at(&mut buf, 5 * MIB + 512).unwrap();
    assert!(buf == expect[(5 * MIB + 512) as usize..][..100_000]);

    // A flush completes only after the peer flushed: kill the peer right after it and its
    // file holds the data.
    write(&*dev, &mut expect, 5, 9 * MIB, 65536);
    dev.flush().unwrap();
    c.crash(2);
    assert!(c.data(2) == expect, "node 2 lacks flushed data");

    // Keep writing without node 2 (quorum with the witness).
    let written_meanwhile = 10 * 65536u64;
    for i in 0..10u64 {
        write(
            &*dev,
            &mut expect,
            100 + i,
            20 * MIB + i * 512 * 1024,
            65536,
        );
    }
    dev.flush().unwrap();
    let s1 = c.d(1).status().unwrap();
    assert_eq!(s1.out_of_sync_bytes, written_meanwhile, "{s1:?}");

    // Node 2 comes back from its files and resyncs only what was written meanwhile.
    c.restart(2);
    wait_in_sync(&c, 2);
    wait_in_sync(&c, 1);
    let s2 = c.d(2).status().unwrap();
    assert_eq!(s2.disk_state, DiskState::UpToDate);
    assert!(
        s2.last_resync_bytes >= written_meanwhile
            && s2.last_resync_bytes <= written_meanwhile + MIB
            && s2.last_resync_bytes < size / 16,
        "resynced {} bytes for {written_meanwhile} written",
        s2.last_resync_bytes
    );
    dev.flush().unwrap();
    assert!(c.data(2) == expect, "node 2 differs after resync");
    assert!(c.data(1) == expect, "node 1 differs after resync");

    // Node 1 (Primary) crashes and restarts from its files: its data is kept.
    drop(dev);
    c.crash(1);
    c.restart(1);
    wait_in_sync(&c, 1);
    // It restarted as a crashed Primary: the activity-log extents (4 MiB each) from `V.al`
    // resynced from node 2, not the whole volume.
    let s1 = c.d(1).status().unwrap();
    assert!(
        s1.last_resync_bytes > 0 && s1.last_resync_bytes < size,
        "crashed Primary resynced {} bytes",
        s1.last_resync_bytes
    );
    promote(&c, 1);
    let dev = c.d(1).block_device();
    let mut all = vec![0u8; size as usize];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == expect, "node 1 lost data across its restart");
    dev.write_at(&pattern(999, 4096), 4096).unwrap();
    dev.flush().unwrap();
    expect[4096..8192].copy_from_slice(&pattern(999, 4096));
    assert!(c.data(1) == expect && c.data(2) == expect);
}

#[test]
fn witness_keeps_quorum_and_losing_two_stops_writes() {
    let size = 16 * MIB;
    let mut c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    promote(&c, 1);
    let dev = c.d(1).block_device();
    dev.write_at(&pattern(1, 4096), 0).unwrap();
    dev.flush().unwrap();

    // Witness gone: still writable.
    c.crash(3);
    wait_for(20, "node 1 to see the witness gone", || {
        let s = c.d(1).status().unwrap();
        s.peers
            .iter()
            .any(|p| p.node_id == 3 && !p.connected)
            .then_some(())
    });
    dev.write_at(&pattern(2, 4096), 8192).unwrap();
    dev.flush().unwrap();
    assert!(c.d(1).status().unwrap().quorum);

    // Peer gone too: writes fail with the quorum error.
    c.crash(2);
    let err = wait_for(20, "a write to fail for lack of quorum", || {
        dev.write_at(&pattern(3, 4096), 16384).err()
    });
    let msg = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(msg.contains("no quorum"), "{msg}");
    assert_eq!(err.errno(), libc_eio());
    assert!(!c.d(1).status().unwrap().quorum);
    // Reads fail too (a Primary cut off from the majority may be stale).
    let mut b = vec![0u8; 4096];
    assert!(dev.read_at(&mut b, 0).is_err());
}

fn libc_eio() -> i32 {
    5
}

#[test]
fn two_diskful_without_witness_replicate_and_refuse_a_second_primary() {
    let size = 8 * MIB;
    let c = Cluster::start(2, 0, size);
    wait_in_sync(&c, 1);
    wait_in_sync(&c, 2);
    promote(&c, 1);
    // The engine has no cluster-wide two-phase promotion: a refusal needs node 2 to have
    // seen node 1's new role (racing promotions are only stopped by quorum and voters).
    wait_for(20, "node 2 to see node 1 Primary", || {
        let s = c.d(2).status().unwrap();
        s.peers
            .iter()
            .any(|p| p.node_id == 1 && p.role == Some(Role::Primary))
            .then_some(())
    });
    let err = c.d(2).promote().unwrap_err();
    assert!(err.to_string().contains("Primary"), "{err}");
    let dev = c.d(1).block_device();
    dev.write_at(&pattern(7, 3 * 4096), 4096).unwrap();
    dev.write_zeroes(5000, 3000, true).unwrap();
    dev.trim(0, 4096).unwrap();
    dev.flush().unwrap();
    assert!(c.data(1) == c.data(2));
    // A Secondary refuses consumer I/O.
    let e = c.d(2).block_device().write_at(&[1; 512], 0).unwrap_err();
    assert!(format!("{:?}", e).contains("not Primary"), "{e:?}");
    // Orderly switchover. `demote()` returns once the demotion is in the metadata, so a
    // stop right after it is not a crash as Primary.
    assert_eq!(c.meta(1).role, tandem_meta::Role::Primary);
    c.d(1).demote().unwrap();
    assert_eq!(c.meta(1).role, tandem_meta::Role::Secondary);
    promote(&c, 2);
    let dev2 = c.d(2).block_device();
    let mut b = vec![0u8; 3 * 4096];
    dev2.read_at(&mut b, 4096).unwrap();
    let mut want = pattern(7, 3 * 4096);
    want[5000 - 4096..8000 - 4096].fill(0);
    assert!(b == want);
}

#[test]
fn online_resize_grows_every_replica_and_the_usable_size_follows_the_smallest() {
    let size = 8 * MIB;
    let mut c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    promote(&c, 1);
    let dev = c.d(1).block_device();
    let head = pattern(1, 64 * 1024);
    dev.write_at(&head, 0).unwrap();
    assert_eq!(dev.size(), size);

    // Node 1 grows first: its peer still has the old size, so nothing changes for consumers.
    c.d(1).resize(2 * size).unwrap();
    assert_eq!(c.meta(1).size_bytes, 2 * size);
    assert_eq!(std::fs::metadata(c.data_path(1)).unwrap().len(), 2 * size);
    assert_eq!(dev.size(), size, "usable: the smallest connected replica");
    let err = dev.write_at(&pattern(2, 4096), size).unwrap_err();
    assert_eq!(err.kind, tandem_blockdev::ErrorKind::OutOfRange, "{err}");
    // Node 2 and the witness grow: the new area becomes usable without reconnecting.
    c.d(2).resize(2 * size).unwrap();
    c.d(3).resize(2 * size).unwrap();
    wait_for(10, "usable size grows on node 1", || {
        (c.d(1).usable_size() == 2 * size).then_some(())
    });
    assert_eq!(dev.size(), 2 * size);
    let tail = pattern(3, 8192);
    dev.write_at(&tail, 2 * size - 8192).unwrap();
    dev.flush().unwrap();
    let s1 = c.d(1).status().unwrap();
    assert_eq!(s1.out_of_sync_bytes, 0, "the grown area needs no resync");
    assert!(
        s1.peers.iter().all(|p| p.connected),
        "no link dropped during the resize: {:?}",
        s1.peers
    );
    wait_in_sync(&c, 2);
    assert_eq!(c.data(1), c.data(2));
    assert_eq!(c.data(1).len() as u64, 2 * size);

    // Writes into the new area while node 2 is away set bits and resync after its restart.
    c.crash(2);
    let more = pattern(4, 12288);
    dev.write_at(&more, size + 4096).unwrap();
    assert_eq!(c.d(1).status().unwrap().out_of_sync_bytes, 12288);
    c.restart(2);
    wait_in_sync(&c, 1);
    wait_in_sync(&c, 2);
    assert_eq!(c.data(1), c.data(2));
    let d = c.data(2);
    assert_eq!(&d[..head.len()], &head[..]);
    assert_eq!(
        &d[(size + 4096) as usize..(size + 4096) as usize + more.len()],
        &more[..]
    );
    assert_eq!(&d[(2 * size - 8192) as usize..], &tail[..]);
}

#[test]
fn many_async_writes_beyond_the_send_queue_arrive_in_order_on_both_replicas() {
    // 200 MiB of 1 MiB writes started without waiting, mostly disjoint (so they are in
    // flight together), some overlapping the one before: far more than a link's send queue
    // holds (64 MiB), so sends find it full and wait in the driver's backlog for the loop
    // thread while later writes keep arriving. Every write completes and both replicas hold
    // the same data, the later write of each overlap on both.
    let size = 256 * MIB;
    let c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    promote(&c, 1);
    let dev = c.d(1).block_device();
    assert!(dev.async_writes());
    let (tx, rx) = std::sync::mpsc::channel();
    let mut expect = vec![0u8; size as usize];
    const N: u64 = 200;
    // The data is made first, so the writes are started faster than the link drains.
    let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
    for i in 0..N {
        let off = match writes.last() {
            Some((prev, _)) if i % 25 == 24 => prev + 4096,
            _ => ((i * 37) % 240) * MIB,
        };
        writes.push((off, pattern(1000 + i, MIB as usize)));
    }
    for (i, (off, data)) in (0..N).zip(writes) {
        expect[off as usize..(off + MIB) as usize].copy_from_slice(&data);
        let tx = tx.clone();
        dev.start_write(
            data.into(),
            off,
            i % 16 == 15,
            Box::new(move |r| tx.send((i, r.map_err(|e| e.to_string()))).unwrap()),
        );
    }
    let mut done = std::collections::BTreeSet::new();
    for _ in 0..N {
        let (i, r) = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a write did not complete");
        r.unwrap_or_else(|e| panic!("write {i}: {e}"));
        assert!(done.insert(i), "write {i} completed twice");
    }
    dev.flush().unwrap();
    assert!(c.data(1) == expect, "node 1 data differs");
    assert!(c.data(2) == expect, "node 2 data differs");
    let s = c.d(1).status().unwrap();
    assert!(s.peers.iter().all(|p| p.connected), "{:?}", s.peers);
}

/// The driver completes asynchronous writes that one drain of several inputs completes (a
/// batch of acknowledgements) inside a completion group (`tandem_blockdev::completions`), so
/// the NBD server answers them with one `sendmsg`; every hook registered in a group runs. A
/// drain of a single input (queue depth 1) completes outside a group, so which writes are
/// grouped depends on how the acknowledgements arrive: of 4 x 64 writes started together,
/// some must be.
#[test]
fn async_write_completions_of_a_batch_run_inside_completion_groups() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tandem_blockdev::{StartWrite, completions};
    let size = 8 * MIB;
    let c = Cluster::start(2, 0, size);
    wait_in_sync(&c, 1);
    promote(&c, 1);
    let dev = c.d(1).block_device();
    let hooks = std::sync::Arc::new(AtomicUsize::new(0));
    let mut grouped = 0;
    const N: u64 = 64;
    for round in 0..4u64 {
        let (tx, rx) = std::sync::mpsc::channel();
        let writes = (0..N)
            .map(|i| {
                let (tx, hooks) = (tx.clone(), hooks.clone());
                StartWrite {
                    data: pattern(round * N + i, 4096).into(),
                    offset: i * 8192,
                    fua: false,
                    done: Box::new(move |r| {
                        let in_group = completions::after_group(Box::new(move || {
                            hooks.fetch_add(1, SeqCst);
                        }))
                        .is_ok();
                        tx.send((i, in_group, r.map_err(|e| e.to_string())))
                            .unwrap();
                    }),
                }
            })
            .collect();
        dev.start_writes(writes);
        for _ in 0..N {
            let (i, in_group, r) = rx
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a write did not complete");
            r.unwrap_or_else(|e| panic!("write {i}: {e}"));
            grouped += usize::from(in_group);
        }
    }
    assert!(
        grouped > 0,
        "no completion of 4 x {N} writes ran inside a group"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while hooks.load(SeqCst) < grouped {
        assert!(
            std::time::Instant::now() < deadline,
            "{} hooks of {grouped} ran",
            hooks.load(SeqCst)
        );
        std::thread::yield_now();
    }
    assert_eq!(hooks.load(SeqCst), grouped, "a hook ran twice");
}

#[test]
fn dual_primary_window_opens_and_closes_while_running_and_is_refused_on_protocol_a() {
    let size = 8 * MIB;
    let mut c = Cluster::start(2, 0, size);
    wait_in_sync(&c, 1);
    for id in 1..=2 {
        let s = c.d(id).status().unwrap();
        assert!(!s.allow_two_primaries && s.dual_primary.is_none());
        c.d(id).set_allow_two_primaries(true).unwrap();
        // Repeating is harmless.
        c.d(id).set_allow_two_primaries(true).unwrap();
        let s = c.d(id).status().unwrap();
        assert!(s.allow_two_primaries, "node {id}");
        assert_eq!(s.dual_primary, None, "node {id}: nobody Primary yet");
    }
    c.d(1).set_allow_two_primaries(false).unwrap();
    assert!(!c.d(1).status().unwrap().allow_two_primaries);

    // The option given at start reaches the engine.
    c.options.allow_two_primaries = true;
    c.crash(2);
    c.restart(2);
    assert!(c.d(2).status().unwrap().allow_two_primaries);
    drop(c);

    // Protocol A: refused, with the engine's reason.
    let mut c = Cluster::start(2, 0, size);
    c.options.protocol = tandem_volume::Protocol::A;
    c.crash(1);
    c.restart(1);
    let err = c.d(1).set_allow_two_primaries(true).unwrap_err();
    assert!(
        matches!(
            err,
            tandem_volume::VolumeError::Window(tandem_volume::WindowError::ProtocolA)
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("protocol C"), "{err}");
    assert!(!c.d(1).status().unwrap().allow_two_primaries);
    // Closing an already closed window is fine on protocol A too.
    c.d(1).set_allow_two_primaries(false).unwrap();
}

/// Starts a write of `data` at `off` on its own thread; its outcome arrives on the channel.
fn write_in_background(
    dev: &std::sync::Arc<dyn tandem_blockdev::BlockDevice>,
    data: Vec<u8>,
    off: u64,
) -> std::sync::mpsc::Receiver<Result<(), String>> {
    let dev = dev.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(
            dev.write_at(&data, off)
                .map_err(|e| format!("{e} ({})", e.errno())),
        );
    });
    rx
}

/// Waits until node `id` holds at least one consumer request for quorum.
fn wait_suspended(c: &Cluster, id: u8) -> usize {
    wait_for(
        20,
        &format!("node {id} to hold a request for quorum"),
        || {
            let n = c.d(id).status().unwrap().suspended_requests;
            (n > 0).then_some(n)
        },
    )
}

#[test]
fn on_no_quorum_suspend_holds_writes_until_quorum_is_back_and_io_error_fails_them() {
    let size = 16 * MIB;
    let mut c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    promote(&c, 1);
    let s = c.d(1).status().unwrap();
    assert_eq!(s.on_no_quorum, tandem_volume::OnNoQuorum::IoError);
    assert_eq!(s.suspended_requests, 0);
    // Changed while running; repeating is harmless.
    for _ in 0..2 {
        c.d(1)
            .set_on_no_quorum(tandem_volume::OnNoQuorum::Suspend)
            .unwrap();
    }
    assert_eq!(
        c.d(1).status().unwrap().on_no_quorum,
        tandem_volume::OnNoQuorum::Suspend
    );
    let dev = c.d(1).block_device();
    dev.write_at(&pattern(1, 4096), 0).unwrap();
    dev.flush().unwrap();

    // Both peers gone: a write neither completes nor fails while quorum is missing. (Issued
    // only once node 1 saw both links go: while one of them is still up, node 1 still has
    // quorum with it and the write rightly completes.)
    c.crash(3);
    c.crash(2);
    wait_for(20, "node 1 to see both peers gone", || {
        let s = c.d(1).status().unwrap();
        (!s.quorum && s.peers.iter().all(|p| !p.connected)).then_some(())
    });
    let held = write_in_background(&dev, pattern(2, 8192), MIB);
    assert!(wait_suspended(&c, 1) >= 1);
    let s = c.d(1).status().unwrap();
    assert!(!s.quorum, "{s:?}");
    assert!(held.try_recv().is_err(), "the held write returned");
    // Demotion is refused while requests are held.
    let err = c.d(1).demote().unwrap_err();
    assert!(err.to_string().contains("in flight"), "{err}");

    // Quorum back (node 2): the write completes, and reaches node 2.
    c.restart(2);
    let r = held
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the held write completes once quorum is back");
    assert_eq!(r, Ok(()));
    assert_eq!(c.d(1).status().unwrap().suspended_requests, 0);
    dev.flush().unwrap();
    wait_for(20, "node 2 UpToDate and in sync with node 1", || {
        let s = c.d(2).status().unwrap();
        (s.disk_state == DiskState::UpToDate
            && s.peers.iter().any(|p| {
                p.node_id == 1 && p.repl_state == ReplState::Established && p.out_of_sync_bytes == 0
            }))
        .then_some(())
    });
    wait_for(20, "node 2 to hold the write", || {
        (c.data(2)[MIB as usize..][..8192] == pattern(2, 8192)[..]).then_some(())
    });

    // Quorum gone again; back to io-error, the held write fails (EIO) and new ones too.
    c.crash(2);
    wait_for(20, "node 1 to see node 2 gone", || {
        (!c.d(1).status().unwrap().quorum).then_some(())
    });
    let held = write_in_background(&dev, pattern(3, 4096), 2 * MIB);
    wait_suspended(&c, 1);
    c.d(1)
        .set_on_no_quorum(tandem_volume::OnNoQuorum::IoError)
        .unwrap();
    let r = held
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the held write fails once the policy is io-error");
    let e = r.unwrap_err();
    assert!(e.contains("(5)"), "EIO expected: {e}");
    let s = c.d(1).status().unwrap();
    assert_eq!(s.suspended_requests, 0);
    assert_eq!(s.on_no_quorum, tandem_volume::OnNoQuorum::IoError);
    drop(dev);

    // The option given at start reaches the engine.
    c.options.on_no_quorum = tandem_volume::OnNoQuorum::Suspend;
    c.restart(2);
    assert_eq!(
        c.d(2).status().unwrap().on_no_quorum,
        tandem_volume::OnNoQuorum::Suspend
    );
}

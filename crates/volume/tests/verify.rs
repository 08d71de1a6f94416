//! Online verify on real loopback transports and real files: a healthy pair finds nothing
//! while a consumer keeps writing; a block corrupted behind the driver's back in the
//! Secondary's `V.data` is found exactly, marked, and repaired by `verify(resync = true)`.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use tandem_volume::{DiskState, ReplState, Role, VerifyResult};

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

/// Starts a verify on node `id` and waits for a result newer than `after`.
fn verify(c: &Cluster, id: u8, resync: bool, after: u64) -> VerifyResult {
    c.d(id).verify(resync).expect("verify starts");
    wait_for(60, "verify result", || {
        let s = c.d(id).status().unwrap();
        s.last_verify
            .filter(|r| r.run > after && s.verify.is_none())
    })
}

#[test]
fn verify_finds_a_corrupted_block_and_resync_repairs_it() {
    let size = 32 * MIB;
    let c = Cluster::start(2, 1, size);
    for id in 1..=3 {
        wait_in_sync(&c, id);
    }
    wait_for(20, "promotion of node 1", || c.d(1).promote().ok());
    assert_eq!(c.d(1).status().unwrap().role, Role::Primary);
    let dev = c.d(1).block_device();
    for i in 0..16u64 {
        dev.write_at(&pattern(i, 256 << 10), i * (2 * MIB)).unwrap();
    }
    dev.flush().unwrap();

    // Healthy, with a consumer writing all the time: no difference.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (dev.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let off = (i * 7919 * 4096) % (size - 65536);
                dev.write_at(&pattern(i + 100, 65536), off).unwrap();
                i += 1;
            }
            i
        })
    };
    let r = verify(&c, 1, false, 0);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert_eq!(r.error, None);
    assert_eq!(r.checked_bytes, size);
    assert_eq!(r.different_bytes, 0, "{r:?}");
    dev.flush().unwrap();

    // Corrupt one 4 KiB block of the Secondary behind its back.
    let bad = 5 * MIB + 3 * 4096;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(c.data_path(2))
        .unwrap();
    f.write_all_at(&[0xa5; 4096], bad).unwrap();
    f.sync_all().unwrap();
    let r = verify(&c, 1, false, r.run);
    assert_eq!(r.different_bytes, 4096, "{r:?}");
    assert_eq!(r.ranges, vec![(bad, 4096)]);
    // Marked on both sides, shown as out of sync; nothing repaired yet.
    wait_for(10, "bits on both sides", || {
        (c.d(1).status().unwrap().out_of_sync_bytes == 4096
            && c.d(2).status().unwrap().out_of_sync_bytes == 4096)
            .then_some(())
    });
    assert_ne!(c.data(1), c.data(2));

    // Verify with resync repairs it; a second verify finds nothing; files identical.
    let r = verify(&c, 1, true, r.run);
    assert_eq!(r.different_bytes, 4096);
    assert_eq!(r.resync_started, vec![2]);
    wait_in_sync(&c, 1);
    wait_in_sync(&c, 2);
    assert_eq!(c.d(2).status().unwrap().last_resync_bytes, 4096);
    let r = verify(&c, 1, false, r.run);
    assert_eq!(r.different_bytes, 0, "{r:?}");
    dev.flush().unwrap();
    assert!(c.data(1) == c.data(2), "replicas differ after the repair");
}

/// Checksum-based resync, measured: a Secondary that lost its bitmap file must compare the
/// whole volume, but only the block written while it was down is transferred.
#[test]
fn checksum_resync_after_a_lost_bitmap_transfers_only_what_differs() {
    let size = 16 * MIB;
    let mut c = Cluster::start(2, 1, size);
    c.options.resync_checksums = true;
    for id in 1..=3 {
        c.d(id).set_resync_checksums(true).unwrap();
        wait_in_sync(&c, id);
    }
    wait_for(20, "promotion of node 1", || c.d(1).promote().ok());
    let dev = c.d(1).block_device();
    for i in 0..8u64 {
        dev.write_at(&pattern(i, MIB as usize), i * (2 * MIB))
            .unwrap();
    }
    dev.flush().unwrap();
    wait_in_sync(&c, 2);

    c.crash(2);
    dev.write_at(&pattern(99, 4096), 3 * MIB + 8192).unwrap();
    dev.flush().unwrap();
    let bitmap = tandem_meta::ReplicaFiles::new(c.data_path(2).parent().unwrap(), VOL).bitmap();
    std::fs::remove_file(&bitmap).unwrap();
    c.restart(2);
    wait_in_sync(&c, 2);
    wait_in_sync(&c, 1);
    let st = c.d(2).status().unwrap();
    let moved = st.last_resync_bytes;
    let skipped = st.engine.last_resync_skipped_bytes;
    eprintln!(
        "checksum resync after a lost bitmap: {moved} bytes transferred, {skipped} bytes skipped (volume {size})"
    );
    assert!((4096..=64 * 1024).contains(&moved), "transferred {moved}");
    assert!(skipped >= size - 64 * 1024, "skipped {skipped}");
    dev.flush().unwrap();
    assert!(c.data(1) == c.data(2), "replicas differ after the resync");
}

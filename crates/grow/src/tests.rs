//! Unit and property tests on in-memory devices.

use proptest::prelude::*;
use tandem_blockdev::{BlockDevice, MemDevice};

use crate::*;

const MIB: u64 = 1 << 20;

/// A fake ext4 superblock at `offset` with `blocks` 4 KiB blocks.
fn put_ext4(dev: &MemDevice, offset: u64, blocks: u32) {
    let mut sb = [0u8; 1024];
    sb[4..8].copy_from_slice(&blocks.to_le_bytes());
    sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes());
    sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
    sb[0x60..0x64].copy_from_slice(&0x40u32.to_le_bytes());
    dev.write_at(&sb, offset + 1024).unwrap();
}

/// An MBR with one primary partition (type 0x83) at `start` of `sectors`.
fn mbr_disk(size: u64, start: u32, sectors: u32) -> MemDevice {
    let dev = MemDevice::new(size);
    let mut s = [0u8; 512];
    s[446 + 4] = 0x83;
    s[446 + 8..446 + 12].copy_from_slice(&start.to_le_bytes());
    s[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    dev.write_at(&s, 0).unwrap();
    put_ext4(&dev, start as u64 * 512, sectors / 8);
    dev
}

#[test]
fn detects_filesystems() {
    let mut b = vec![0u8; 8192];
    assert!(
        matches!(detect_filesystem(&b), Filesystem::Unknown { found } if found.contains("zero"))
    );
    b[0..4].copy_from_slice(b"XFSB");
    b[4..8].copy_from_slice(&4096u32.to_be_bytes());
    b[8..16].copy_from_slice(&1000u64.to_be_bytes());
    assert_eq!(
        detect_filesystem(&b),
        Filesystem::Xfs {
            block_size: 4096,
            data_blocks: 1000,
            size_bytes: 4_096_000
        }
    );
    let mut s = vec![0u8; 8192];
    s[4086..4096].copy_from_slice(b"SWAPSPACE2");
    assert!(
        matches!(detect_filesystem(&s), Filesystem::Unknown { found } if found.contains("swap"))
    );
}

#[test]
fn mbr_primary_plan_apply_undo_in_memory() {
    let dev = mbr_disk(64 * MIB, 2048, 16384);
    let before = {
        let mut b = vec![0u8; 512];
        dev.read_at(&mut b, 0).unwrap();
        b
    };
    let plan = plan(&dev, 64 * MIB).unwrap();
    assert!(!plan.nothing_to_do);
    let mut saved = None;
    let out = apply(&dev, &plan, &mut |r| {
        saved = Some(r.clone());
        Ok(())
    })
    .unwrap();
    let ApplyOutcome::Applied(rec) = out else {
        panic!()
    };
    assert_eq!(saved.as_ref(), Some(&rec));
    let p = probe(&dev).unwrap();
    let Table::Mbr(m) = p.table else { panic!() };
    assert_eq!(m.partitions[0].end_lba(), 64 * 2048 - 1);
    assert!(crate::plan(&dev, 64 * MIB).unwrap().nothing_to_do);
    let json = rec.to_json();
    let back = UndoRecord::from_json(&json).unwrap();
    assert_eq!(undo(&dev, &back).unwrap(), 1);
    let mut now = vec![0u8; 512];
    dev.read_at(&mut now, 0).unwrap();
    assert_eq!(now, before);
}

#[test]
fn apply_refuses_changed_device_and_failed_undo_save() {
    let dev = mbr_disk(64 * MIB, 2048, 16384);
    let plan = plan(&dev, 64 * MIB).unwrap();
    let err = apply(&dev, &plan, &mut |_| {
        Err(std::io::Error::other("disk full"))
    })
    .unwrap_err();
    assert!(matches!(err, GrowError::SaveUndo(_)), "{err}");
    // Nothing written: still the same plan.
    assert!(!crate::plan(&dev, 64 * MIB).unwrap().nothing_to_do);
    // Someone changes the MBR after planning.
    dev.write_at(&[0x12, 0x34, 0x56, 0x78], 440).unwrap();
    let err = apply(&dev, &plan, &mut |_| Ok(())).unwrap_err();
    assert!(
        matches!(
            err,
            GrowError::Changed {
                offset: 0,
                len: 512
            }
        ),
        "{err}"
    );
}

#[test]
fn undo_refuses_foreign_bytes() {
    let dev = mbr_disk(64 * MIB, 2048, 16384);
    let plan = plan(&dev, 64 * MIB).unwrap();
    let ApplyOutcome::Applied(rec) = apply(&dev, &plan, &mut |_| Ok(())).unwrap() else {
        panic!()
    };
    dev.write_at(&[1, 2, 3, 4], 440).unwrap();
    let err = undo(&dev, &rec).unwrap_err();
    assert!(matches!(err, GrowError::UndoMismatch { .. }), "{err}");
}

#[test]
fn mbr_refuses_past_2_tib() {
    let dev = mbr_disk(64 * MIB, 2048, 16384);
    let err = plan(&dev, 3 << 40).unwrap_err();
    assert!(matches!(err, GrowError::MbrLimit { .. }), "{err}");
    assert!(err.to_string().contains("2 TiB"), "{err}");
    // Exactly 2 TiB is still fine: the last sector is 2^32 - 1.
    let p = plan(&dev, 2 << 40).unwrap();
    assert!(p.steps.iter().any(|s| matches!(
        s,
        Step::GrowPartition {
            new_end_lba: 0xFFFF_FFFF,
            ..
        }
    )));
}

#[test]
fn unknown_mbr_is_refused() {
    let dev = MemDevice::new(MIB);
    let mut s = [0u8; 512];
    s[446] = 0x33; // bad boot flag
    s[446 + 4] = 0x83;
    s[510] = 0x55;
    s[511] = 0xAA;
    dev.write_at(&s, 0).unwrap();
    let err = plan(&dev, 2 * MIB).unwrap_err();
    assert!(matches!(err, GrowError::UnknownTable(_)), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random bytes (with a 55 AA signature and a protective entry half the time) never panic
    /// probe or plan.
    #[test]
    fn garbage_never_panics(
        data in proptest::collection::vec(any::<u8>(), 0..70_000),
        sig in any::<bool>(),
        ee in any::<bool>(),
        gpt in any::<bool>(),
        extra in 0u64..1_000_000,
    ) {
        let mut data = data;
        if sig && data.len() >= 512 {
            data[510] = 0x55;
            data[511] = 0xAA;
            if ee { data[446 + 4] = 0xEE; }
        }
        if gpt && data.len() >= 1024 {
            data[512..520].copy_from_slice(b"EFI PART");
        }
        let dev = MemDevice::new(data.len() as u64);
        if !data.is_empty() { dev.write_at(&data, 0).unwrap(); }
        let _ = probe(&dev);
        if let Ok(p) = plan(&dev, data.len() as u64 + extra) {
            let _ = p.to_string();
            let _ = p.to_json();
        }
    }

    /// A valid MBR disk with random bytes flipped in its table sector never panics either.
    #[test]
    fn mutated_mbr_never_panics(flips in proptest::collection::vec((446usize..512, any::<u8>()), 1..8)) {
        let dev = mbr_disk(MIB, 64, 1024);
        let mut s = [0u8; 512];
        dev.read_at(&mut s, 0).unwrap();
        for (at, v) in flips { s[at] = v; }
        dev.write_at(&s, 0).unwrap();
        if let Ok(p) = plan(&dev, 4 * MIB) {
            let _ = p.to_string();
        }
    }
}

#[test]
fn grow_unknown_filesystem_only_when_asked_and_never_past_a_known_one() {
    // One primary partition holding nothing known.
    let dev = MemDevice::new(64 * MIB);
    let mut s = [0u8; 512];
    s[446 + 4] = 0x8e; // LVM
    s[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    s[446 + 12..446 + 16].copy_from_slice(&16384u32.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xAA;
    dev.write_at(&s, 0).unwrap();
    let err = plan(&dev, 64 * MIB).unwrap_err();
    assert!(matches!(err, GrowError::NoFilesystem { .. }), "{err}");
    let opts = PlanOptions {
        grow_unknown_filesystem: true,
    };
    let p = plan_with(&dev, 64 * MIB, opts).unwrap();
    assert!(!p.nothing_to_do);
    assert!(matches!(p.target.filesystem, Filesystem::Unknown { .. }));
    assert!(p.steps.iter().any(|s| matches!(
        s,
        Step::GrowPartition {
            new_end_lba: 131071,
            ..
        }
    )));
    assert!(
        !p.steps
            .iter()
            .any(|s| matches!(s, Step::ResizeFilesystem { .. })),
        "no filesystem step for an unknown filesystem"
    );
    // A known filesystem in an earlier partition: still refused, option or not.
    let dev = mbr_disk(64 * MIB, 2048, 16384);
    let mut s = [0u8; 512];
    dev.read_at(&mut s, 0).unwrap();
    let e = 446 + 16;
    s[e + 4] = 0x82; // swap, empty
    s[e + 8..e + 12].copy_from_slice(&20480u32.to_le_bytes());
    s[e + 12..e + 16].copy_from_slice(&8192u32.to_le_bytes());
    dev.write_at(&s, 0).unwrap();
    let err = plan_with(&dev, 64 * MIB, opts).unwrap_err();
    assert!(matches!(err, GrowError::FilesystemNotLast { .. }), "{err}");
}

//! The grow on images built and checked with the real tools: sgdisk, parted, mkfs.ext4, e2fsck.
//! A missing tool fails the test with a pointer at ./scripts/test (which installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use tandem_blockdev::{BlockDevice, FileDevice};
use tandem_grow::{ApplyOutcome, Filesystem, GrowError, Step, Table, UndoRecord};

const MIB: u64 = 1 << 20;

/// Finds `name` on PATH or in the sbin directories; fails the test when missing.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path
        .split(':')
        .map(PathBuf::from)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "`{name}` not found: run ./scripts/test, which installs the test tools \
         (gdisk, parted, e2fsprogs)"
    );
}

/// Runs a tool, fails the test with its output when it exits non-zero; returns stdout.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Img {
    fn new(size: u64) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        Img { _dir: dir, path }
    }
    fn p(&self) -> &str {
        self.path.to_str().unwrap()
    }
    fn grow_to(&self, size: u64) {
        run("truncate", &["-s", &size.to_string(), self.p()]);
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
    fn dev(&self) -> FileDevice {
        FileDevice::open(&self.path).unwrap()
    }
    /// ext4 with 4 KiB blocks in `[offset, offset + len)`.
    fn mkfs_ext4(&self, offset: u64, len: u64) {
        let blocks = (len / 4096).to_string();
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                &format!("offset={offset}"),
                self.p(),
                &blocks,
            ],
        );
    }
    /// Copies `[offset, offset + len)` to its own file and runs `e2fsck -fn` on it.
    fn e2fsck(&self, offset: u64, len: u64) {
        let dev = self.dev();
        let mut buf = vec![0u8; len as usize];
        dev.read_at(&mut buf, offset).unwrap();
        let part = self.path.with_extension("part");
        std::fs::write(&part, &buf).unwrap();
        run("e2fsck", &["-fn", part.to_str().unwrap()]);
        std::fs::remove_file(&part).unwrap();
    }
}

fn save_to(path: &Path) -> impl FnMut(&UndoRecord) -> std::io::Result<()> + '_ {
    move |r| std::fs::write(path, r.to_json())
}

fn sgdisk_info(img: &Img, n: u32) -> String {
    run("sgdisk", &["-i", &n.to_string(), img.p()])
}

const DISK_GUID: &str = "11111111-2222-3333-4444-555555555555";
const PART_GUID: &str = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE";

/// 64 MiB GPT: partition 1 (16 MiB at 1 MiB), partition 2 "data root" to the end, with legacy
/// BIOS bootable (bit 2) and hidden (bit 62) set and a fixed unique GUID.
fn gpt_image() -> Img {
    let img = Img::new(64 * MIB);
    run(
        "sgdisk",
        &[
            "-o",
            "-U",
            DISK_GUID,
            "-n",
            "1:2048:+16M",
            "-t",
            "1:8300",
            "-u",
            "1:99999999-8888-7777-6666-555555555555",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
            "-c",
            "2:data root",
            "-A",
            "2:set:2",
            "-A",
            "2:set:62",
            "-u",
            &format!("2:{PART_GUID}"),
            img.p(),
        ],
    );
    img
}

#[test]
fn gpt_ext4_grow_apply_verify_undo() {
    let img = gpt_image();
    // Partition 2: LBA 34816..131038 (sgdisk ends it on the last usable LBA).
    let (p2_start, p2_end) = (34816u64, 131038u64);
    img.mkfs_ext4(p2_start * 512, (p2_end - p2_start + 1) * 512);
    let before = img.bytes();
    let info_before = sgdisk_info(&img, 2);

    img.grow_to(128 * MIB);
    let dev = img.dev();
    let probe = tandem_grow::probe(&dev).unwrap();
    let Table::Gpt(g) = &probe.table else {
        panic!("expected GPT, got {probe:?}")
    };
    assert_eq!(g.partitions.len(), 2);
    let p2 = &g.partitions[1];
    assert_eq!((p2.first_lba, p2.last_lba), (p2_start, p2_end));
    assert_eq!(p2.attributes, (1 << 62) | (1 << 2));
    assert_eq!(p2.name, "data root");
    assert_eq!(p2.unique_guid.to_string(), PART_GUID);
    assert!(
        matches!(&p2.filesystem, Filesystem::Ext { variant, block_size: 4096, .. } if variant == "ext4")
    );
    assert_eq!(g.backup_header_lba, 131071);
    assert!(g.backup_header_valid);

    let plan = tandem_grow::plan(&dev, dev.size()).unwrap();
    let text = plan.to_string();
    println!("{text}");
    // 128 MiB = 262144 sectors: backup header 262143, entries 262111..262142, last usable
    // 262110; partition 2 starts at 34816 (aligned to 2048), so its end is rounded down to
    // 262144 - 2048 - 1 = 260095.
    assert!(plan.steps.contains(&Step::MoveGptBackup {
        old_header_lba: 131071,
        new_header_lba: 262143,
        new_entries_lba: 262111,
        entries_sectors: 32,
        entries_bytes: 16384,
    }));
    assert!(plan.steps.contains(&Step::SetGptLastUsable {
        old_lba: 131038,
        new_lba: 262110,
        added_bytes: (262110 - 131038) * 512,
    }));
    assert!(plan.steps.iter().any(|s| matches!(
        s,
        Step::GrowPartition {
            number: 2,
            new_end_lba: 260095,
            alignment_sectors: 2048,
            ..
        }
    )));
    assert!(text.contains("grow gpt partition 2"), "{text}");
    assert!(text.contains("MiB"), "{text}");

    let undo_path = img.path.with_extension("undo.json");
    let out = tandem_grow::apply(&dev, &plan, &mut save_to(&undo_path)).unwrap();
    let ApplyOutcome::Applied(record) = out else {
        panic!("expected a write")
    };
    let saved = UndoRecord::from_json(&std::fs::read_to_string(&undo_path).unwrap()).unwrap();
    assert_eq!(saved, record);

    let verify = run("sgdisk", &["-v", img.p()]);
    assert!(verify.contains("No problems found"), "{verify}");
    let info = sgdisk_info(&img, 2);
    assert!(
        info.contains(&format!("Partition unique GUID: {PART_GUID}")),
        "{info}"
    );
    assert!(info.contains("Partition name: 'data root'"), "{info}");
    assert!(info.contains("Attribute flags: 4000000000000004"), "{info}");
    assert!(info.contains("First sector: 34816 "), "{info}");
    assert!(info.contains("Last sector: 260095 "), "{info}");
    assert_eq!(
        info.lines().next(),
        info_before.lines().next(),
        "type GUID changed"
    );
    let info1 = sgdisk_info(&img, 1);
    assert!(
        info1.contains("99999999-8888-7777-6666-555555555555"),
        "{info1}"
    );
    let p = run("sgdisk", &["-p", img.p()]);
    assert!(p.contains(DISK_GUID), "{p}");
    // The filesystem is untouched and clean.
    img.e2fsck(p2_start * 512, (p2_end - p2_start + 1) * 512);

    // Idempotent: plan again -> nothing to do; applying the old plan again writes nothing.
    let again = tandem_grow::plan(&dev, dev.size()).unwrap();
    assert!(again.nothing_to_do, "{again}");
    assert!(again.to_string().contains("nothing to do"));
    let mut called = false;
    let out = tandem_grow::apply(&dev, &plan, &mut |_| {
        called = true;
        Ok(())
    })
    .unwrap();
    assert_eq!(out, ApplyOutcome::NothingToDo);
    assert!(!called);

    // Undo: byte-identical to the original image, the grown area zero again.
    assert_eq!(
        tandem_grow::undo(&dev, &saved).unwrap(),
        saved.regions.len()
    );
    let after = img.bytes();
    assert_eq!(after.len() as u64, 128 * MIB);
    assert!(
        after[..MIB as usize] == before[..MIB as usize],
        "first MiB differs"
    );
    let old_end = before.len();
    assert!(
        after[old_end - MIB as usize..old_end] == before[old_end - MIB as usize..],
        "last MiB of the old disk differs"
    );
    assert!(after[..old_end] == before[..], "old area differs");
    assert!(
        after[old_end..].iter().all(|&b| b == 0),
        "new area not zero"
    );
    // Undo again: nothing left to restore.
    assert_eq!(tandem_grow::undo(&dev, &saved).unwrap(), 0);
}

/// `parted -m unit s print` lines of the partitions: (number, start, end).
fn parted_parts(img: &Img) -> Vec<(u32, u64, u64)> {
    let out = run("parted", &["-m", "-s", img.p(), "unit", "s", "print"]);
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let n = f.first()?.parse().ok()?;
            let s = f.get(1)?.trim_end_matches('s').parse().ok()?;
            let e = f.get(2)?.trim_end_matches('s').parse().ok()?;
            Some((n, s, e))
        })
        .collect()
}

fn parted_mklabel(img: &Img, parts: &[&str]) {
    let mut args = vec!["-s", img.p(), "mklabel", "msdos"];
    args.extend_from_slice(parts);
    run("parted", &args);
}

fn assert_undo_identical(img: &Img, before: &[u8], record: &UndoRecord) {
    let dev = img.dev();
    assert!(tandem_grow::undo(&dev, record).unwrap() > 0);
    let after = img.bytes();
    assert!(
        after[..before.len()] == before[..],
        "old area differs after undo"
    );
    assert!(after[before.len()..].iter().all(|&b| b == 0));
}

fn apply_ok(img: &Img, plan: &tandem_grow::Plan) -> UndoRecord {
    let undo_path = img.path.with_extension("undo.json");
    match tandem_grow::apply(&img.dev(), plan, &mut save_to(&undo_path)).unwrap() {
        ApplyOutcome::Applied(r) => r,
        ApplyOutcome::NothingToDo => panic!("nothing written"),
    }
}

#[test]
fn mbr_primary_grow() {
    let img = Img::new(64 * MIB);
    parted_mklabel(
        &img,
        &[
            "mkpart", "primary", "ext4", "1MiB", "20MiB", "mkpart", "primary", "ext4", "20MiB",
            "100%", "set", "2", "boot", "on",
        ],
    );
    assert_eq!(
        parted_parts(&img),
        vec![(1, 2048, 40959), (2, 40960, 131071)]
    );
    img.mkfs_ext4(40960 * 512, (131072 - 40960) * 512);
    let before = img.bytes();
    img.grow_to(100 * MIB);
    let dev = img.dev();
    let probe = tandem_grow::probe(&dev).unwrap();
    let Table::Mbr(m) = &probe.table else {
        panic!("expected MBR: {probe:?}")
    };
    assert_eq!(m.partitions.len(), 2);
    assert!(m.partitions[1].bootable && !m.partitions[0].bootable);
    assert_eq!(m.partitions[1].type_byte, 0x83);
    let plan = tandem_grow::plan(&dev, dev.size()).unwrap();
    println!("{plan}");
    // 100 MiB = 204800 sectors; start 40960 is 2048-aligned: end 204799.
    assert!(plan.steps.iter().any(|s| matches!(s, Step::GrowPartition { number: 2, kind, new_end_lba: 204799, .. } if kind == "primary")));
    let record = apply_ok(&img, &plan);
    assert_eq!(
        parted_parts(&img),
        vec![(1, 2048, 40959), (2, 40960, 204799)]
    );
    let print = run("parted", &["-m", "-s", img.p(), "print"]);
    assert!(print.contains("boot"), "{print}");
    img.e2fsck(40960 * 512, (131072 - 40960) * 512);
    assert!(tandem_grow::plan(&dev, dev.size()).unwrap().nothing_to_do);
    drop(dev);
    assert_undo_identical(&img, &before, &record);
    assert_eq!(
        parted_parts(&img),
        vec![(1, 2048, 40959), (2, 40960, 131071)]
    );
}

#[test]
fn mbr_extended_logical_grow() {
    let img = Img::new(64 * MIB);
    parted_mklabel(
        &img,
        &[
            "mkpart", "primary", "ext4", "1MiB", "10MiB", "mkpart", "extended", "10MiB", "100%",
            "mkpart", "logical", "ext4", "11MiB", "30MiB", "mkpart", "logical", "ext4", "31MiB",
            "100%",
        ],
    );
    assert_eq!(
        parted_parts(&img),
        vec![
            (1, 2048, 20479),
            (2, 20480, 131071),
            (5, 22528, 61439),
            (6, 63488, 131071)
        ]
    );
    img.mkfs_ext4(63488 * 512, (131072 - 63488) * 512);
    let before = img.bytes();
    img.grow_to(96 * MIB);
    let dev = img.dev();
    let probe = tandem_grow::probe(&dev).unwrap();
    let Table::Mbr(m) = &probe.table else {
        panic!("expected MBR: {probe:?}")
    };
    let numbers: Vec<u32> = m.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 2, 5, 6]);
    let plan = tandem_grow::plan(&dev, dev.size()).unwrap();
    println!("{plan}");
    // 96 MiB = 196608 sectors; logical 6 starts at 63488 (2048-aligned): end 196607.
    assert!(plan.steps.iter().any(|s| matches!(s, Step::GrowPartition { number: 2, kind, new_end_lba: 196607, .. } if kind == "extended")));
    assert!(plan.steps.iter().any(|s| matches!(s, Step::GrowPartition { number: 6, kind, new_end_lba: 196607, .. } if kind == "logical")));
    assert!(
        plan.steps
            .iter()
            .any(|s| matches!(s, Step::UpdateEbrLink { .. }))
    );
    let record = apply_ok(&img, &plan);
    assert_eq!(
        parted_parts(&img),
        vec![
            (1, 2048, 20479),
            (2, 20480, 196607),
            (5, 22528, 61439),
            (6, 63488, 196607)
        ]
    );
    img.e2fsck(63488 * 512, (131072 - 63488) * 512);
    assert!(tandem_grow::plan(&dev, dev.size()).unwrap().nothing_to_do);
    drop(dev);
    assert_undo_identical(&img, &before, &record);
    assert_eq!(
        parted_parts(&img),
        vec![
            (1, 2048, 20479),
            (2, 20480, 131071),
            (5, 22528, 61439),
            (6, 63488, 131071)
        ]
    );
}

#[test]
fn bare_ext4_has_no_table_writes() {
    let img = Img::new(32 * MIB);
    img.mkfs_ext4(0, 32 * MIB);
    img.grow_to(48 * MIB);
    let dev = img.dev();
    let plan = tandem_grow::plan(&dev, dev.size()).unwrap();
    assert_eq!(plan.table, "none");
    assert!(plan.nothing_to_do);
    assert_eq!(
        plan.steps,
        vec![Step::ResizeFilesystem {
            filesystem: "ext4".into(),
            offset_bytes: 0,
            old_bytes: 32 * MIB,
            available_bytes: 48 * MIB,
            done_by_this_crate: false,
        }]
    );
    assert_eq!(
        tandem_grow::apply(&dev, &plan, &mut |_| Ok(())).unwrap(),
        ApplyOutcome::NothingToDo
    );
}

#[test]
fn refuses_filesystem_not_in_last_partition() {
    let img = gpt_image();
    img.mkfs_ext4(2048 * 512, 16 * MIB);
    img.grow_to(96 * MIB);
    let dev = img.dev();
    let err = tandem_grow::plan(&dev, dev.size()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GrowError::FilesystemNotLast { .. }), "{msg}");
    assert!(msg.contains("partition 1 holds ext4"), "{msg}");
    assert!(msg.contains("partition 2 (the last one"), "{msg}");
    assert!(msg.contains("all zero"), "{msg}");
}

#[test]
fn refuses_last_partition_without_filesystem() {
    let img = gpt_image();
    let dev = img.dev();
    let err = tandem_grow::plan(&dev, 96 * MIB).unwrap_err();
    assert!(matches!(err, GrowError::NoFilesystem { .. }), "{err}");
}

#[test]
fn refuses_shrink() {
    let img = gpt_image();
    img.mkfs_ext4(34816 * 512, (131039 - 34816) * 512);
    let dev = img.dev();
    let err = tandem_grow::plan(&dev, 32 * MIB).unwrap_err();
    assert!(matches!(err, GrowError::Shrink { .. }), "{err}");
    assert!(err.to_string().contains("67108864 B (64.00 MiB)"), "{err}");
}

#[test]
fn refuses_corrupt_gpt_as_unknown_table() {
    let img = gpt_image();
    img.mkfs_ext4(34816 * 512, (131039 - 34816) * 512);
    // Flip a byte of the primary header's disk GUID: its CRC no longer matches.
    let dev = img.dev();
    let mut b = [0u8; 1];
    dev.read_at(&mut b, 512 + 60).unwrap();
    b[0] ^= 0xFF;
    dev.write_at(&b, 512 + 60).unwrap();
    let probe = tandem_grow::probe(&dev).unwrap();
    assert!(matches!(probe.table, Table::Unknown { .. }), "{probe:?}");
    let err = tandem_grow::plan(&dev, 96 * MIB).unwrap_err();
    assert!(matches!(err, GrowError::UnknownTable(_)), "{err}");
    assert!(err.to_string().contains("CRC"), "{err}");
}

#[test]
fn plan_against_larger_target_then_apply_after_block_grow() {
    let img = gpt_image();
    img.mkfs_ext4(34816 * 512, (131039 - 34816) * 512);
    let dev = img.dev();
    let plan = tandem_grow::plan(&dev, 128 * MIB).unwrap();
    let err = tandem_grow::apply(&dev, &plan, &mut |_| Ok(())).unwrap_err();
    assert!(matches!(err, GrowError::DeviceTooSmall { .. }), "{err}");
    drop(dev);
    img.grow_to(128 * MIB);
    apply_ok(&img, &plan);
    let verify = run("sgdisk", &["-v", img.p()]);
    assert!(verify.contains("No problems found"), "{verify}");
}

#[test]
fn plan_json_snapshot() {
    let img = gpt_image();
    img.mkfs_ext4(34816 * 512, (131039 - 34816) * 512);
    img.grow_to(128 * MIB);
    let dev = img.dev();
    let plan = tandem_grow::plan(&dev, dev.size()).unwrap();
    let snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/plan_gpt.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&snapshot, plan.to_json() + "\n").unwrap();
    }
    let v: serde_json::Value = serde_json::from_str(&plan.to_json()).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&snapshot).unwrap()).unwrap();
    assert_eq!(v, expected, "actual:\n{}", plan.to_json());
}

/// A real sgdisk GPT with random bytes changed in its first 34 sectors and its backup: probe
/// and plan never panic, and whatever plan comes out applies to a copy without panicking.
#[test]
fn mutated_gpt_never_panics() {
    use proptest::prelude::*;
    use tandem_blockdev::MemDevice;

    let img = gpt_image();
    img.mkfs_ext4(34816 * 512, (131039 - 34816) * 512);
    let original = img.bytes();
    let len = original.len();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(200));
    let flips = proptest::collection::vec(
        (
            prop_oneof![0usize..34 * 512, len - 33 * 512..len],
            any::<u8>(),
        ),
        1..6,
    );
    runner
        .run(&flips, |flips| {
            let dev = MemDevice::new(len as u64 + 8 * MIB);
            dev.write_at(&original[..34 * 512], 0).unwrap();
            dev.write_at(&original[34816 * 512..34816 * 512 + 8192], 34816 * 512)
                .unwrap();
            dev.write_at(&original[len - 33 * 512..], (len - 33 * 512) as u64)
                .unwrap();
            for (at, v) in flips {
                dev.write_at(&[v], at as u64).unwrap();
            }
            if let Ok(plan) = tandem_grow::plan(&dev, dev.size()) {
                let _ = plan.to_string();
                let _ = tandem_grow::apply(&dev, &plan, &mut |_| Ok(()));
            }
            Ok(())
        })
        .unwrap();
}

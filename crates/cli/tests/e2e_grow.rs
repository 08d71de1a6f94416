//! `tandem volume grow` on a real `tandem up` cluster, checked with the real tools: disk images
//! built with sgdisk / parted, mkfs.ext4 / mkfs.ext3 / mkfs.xfs and real files, copied into
//! volumes with nbdcopy, grown, copied out and checked with `sgdisk -v` / `sgdisk -i`,
//! `parted -m`, `e2fsck -fn` / `xfs_repair -n`, `dumpe2fs -h` / `xfs_db` and file checksums.
//!
//! The block layer (`volume resize`, POST /v1/volumes/{name}/resize) is built on another
//! branch: until it is merged, the volumes are created at the grown size (`VOLUME`) and a
//! smaller image (`IMAGE`) is copied in, so the partition table's backup and the filesystem
//! end where the image ended. Once resize exists, set `VOLUME` to `IMAGE` in each test: the
//! grow then also runs the block step. `grow_from_smaller_volume_needs_resize` does that
//! already and is ignored until then.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::repl::{diskful, in_sync, same_files};
use common::*;

const MIB: u64 = 1 << 20;

// ----- images --------------------------------------------------------------------------------

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

fn sha256(path: &Path) -> String {
    check(Command::new(tool("sha256sum")).arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Real files for a filesystem: (relative path, sha256).
fn make_files(root: &Path) -> Vec<(String, String)> {
    std::fs::create_dir_all(root.join("etc/deep")).unwrap();
    let files = [
        ("big.bin", 3 * MIB as usize + 123),
        ("etc/hosts", 77),
        ("etc/deep/cfg.bin", 300 << 10),
        ("empty", 0),
    ];
    files
        .iter()
        .enumerate()
        .map(|(i, (name, len))| {
            let p = root.join(name);
            std::fs::write(&p, pattern(i as u32 + 7, *len)).unwrap();
            (name.to_string(), sha256(&p))
        })
        .collect()
}

fn create_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// A filesystem of `kind` (`ext4`, `ext3`, `xfs`) in its own image file of `len` bytes,
/// holding the files of `files_dir`.
fn make_fs(work: &Path, kind: &str, len: u64, files_dir: &Path) -> PathBuf {
    let part = work.join(format!("fs-{kind}.img"));
    create_file(&part, len);
    match kind {
        "ext4" | "ext3" => {
            check(
                Command::new(tool(&format!("mkfs.{kind}")))
                    .args(["-q", "-F", "-b", "4096", "-d"])
                    .arg(files_dir)
                    .arg(&part),
            );
        }
        "xfs" => {
            check(Command::new(tool("mkfs.xfs")).args(["-q", "-f"]).arg(&part));
            let mnt = work.join("xfs-fill");
            std::fs::create_dir_all(&mnt).unwrap();
            check(
                Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(&part)
                    .arg(&mnt),
            );
            let guard = Umount(mnt.clone());
            check(
                Command::new("cp")
                    .arg("-a")
                    .arg(format!("{}/.", files_dir.display()))
                    .arg(&mnt),
            );
            drop(guard);
        }
        other => panic!("unknown fs {other}"),
    }
    part
}

/// Copies `src` into `img` at byte `offset`.
fn put(img: &Path, offset: u64, src: &Path) {
    check(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", img.display()))
            .args([
                "bs=1M",
                "conv=notrunc,sparse",
                "oflag=seek_bytes",
                "status=none",
            ])
            .arg(format!("seek={offset}")),
    );
}

/// Copies `[offset, offset + len)` of `img` into its own file.
fn cut(img: &Path, offset: u64, len: u64, out: &Path) {
    check(
        Command::new("dd")
            .arg(format!("if={}", img.display()))
            .arg(format!("of={}", out.display()))
            .args(["bs=1M", "iflag=skip_bytes,count_bytes", "status=none"])
            .arg(format!("skip={offset}"))
            .arg(format!("count={len}")),
    );
}

fn sector_of(info: &str, key: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no '{key}' in:\n{info}"))
}

const PART_GUID: &str = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE";
const DISK_GUID: &str = "11111111-2222-3333-4444-555555555555";

/// A GPT image: partition 1 (16 MiB at 1 MiB, empty), partition 2 "data root" to the end with
/// attribute bits 2 and 62 and a fixed unique GUID, holding a `kind` filesystem with the files.
/// Returns (partition 2 first sector, last sector).
fn gpt_image(work: &Path, img: &Path, size: u64, kind: &str, files_dir: &Path) -> (u64, u64) {
    create_file(img, size);
    check(
        Command::new(tool("sgdisk"))
            .args(["-o", "-U", DISK_GUID])
            .args(["-n", "1:2048:+16M", "-t", "1:ef02"])
            .args(["-n", "2:0:0", "-t", "2:8300", "-c", "2:data root"])
            .args(["-u", &format!("2:{PART_GUID}")])
            .args(["-A", "2:set:2", "-A", "2:set:62"])
            .arg(img),
    );
    let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(img));
    let (first, last) = (
        sector_of(&info, "First sector: "),
        sector_of(&info, "Last sector: "),
    );
    let fs = make_fs(work, kind, (last + 1 - first) * 512, files_dir);
    put(img, first * 512, &fs);
    (first, last)
}

/// The new end of a partition starting at `start` grown up to `max_end` (1 MiB alignment for
/// partitions on a MiB boundary, as parted and sgdisk create them).
fn aligned_end(start: u64, max_end: u64) -> u64 {
    let a = (1u64 << start.trailing_zeros()).min(2048);
    (max_end + 1) / a * a - 1
}

struct Umount(PathBuf);
impl Drop for Umount {
    fn drop(&mut self) {
        let st = Command::new("umount").arg(&self.0).status();
        if !st.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Filesystem size in bytes as its own tools read it.
fn fs_bytes(kind: &str, part: &Path) -> u64 {
    if kind == "xfs" {
        let out = check(
            Command::new(tool("xfs_db"))
                .args(["-r", "-c", "sb 0", "-c", "p dblocks blocksize"])
                .arg(part),
        );
        let val = |k: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = ")))
                .unwrap_or_else(|| panic!("{k} in {out}"))
                .trim()
                .parse()
                .unwrap()
        };
        val("dblocks") * val("blocksize")
    } else {
        let out = check(Command::new(tool("dumpe2fs")).arg("-h").arg(part));
        let val = |k: &str| -> u64 {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} in {out}"))
                .trim()
                .parse()
                .unwrap()
        };
        val("Block count:") * val("Block size:")
    }
}

/// Checks the filesystem in `part` with the read-only tools and compares every file.
fn check_fs(work: &Path, kind: &str, part: &Path, files: &[(String, String)]) {
    if kind == "xfs" {
        check(
            Command::new(tool("xfs_repair"))
                .args(["-n", "-f"])
                .arg(part),
        );
    } else {
        check(Command::new(tool("e2fsck")).arg("-fn").arg(part));
    }
    let mnt = work.join(format!(
        "check-{}",
        part.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&mnt).unwrap();
    check(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(part)
            .arg(&mnt),
    );
    let _guard = Umount(mnt.clone());
    for (name, sum) in files {
        assert_eq!(
            &sha256(&mnt.join(name)),
            sum,
            "{name} differs after the grow"
        );
    }
}

// ----- cluster helpers -------------------------------------------------------------------------

fn work_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tgrow")
        .tempdir_in("/tmp")
        .unwrap()
}

/// Creates volume `name` of `size` bytes and copies `img` to its start.
fn volume_with(c: &Cluster, name: &str, size: u64, img: &Path) -> String {
    c.tandem(&["volume", "create", name, &size.to_string()]);
    let uri = c.connect(name);
    check(Command::new(tool("nbdcopy")).arg(img).arg(&uri));
    uri
}

/// The whole volume copied out into `out`.
fn copy_out(c: &Cluster, name: &str, out: &Path) {
    let uri = c.connect(name);
    let _ = std::fs::remove_file(out);
    check(Command::new("nbdcopy").arg(&uri).arg(out));
}

fn data_file(c: &Cluster, name: &str) -> PathBuf {
    c.node_dir("node1")
        .join("pool")
        .join(format!("{name}.data"))
}

fn grow(c: &Cluster, args: &[&str]) -> Output {
    run(c.cli().args(["volume", "grow"]).args(args))
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "grow failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn journal(c: &Cluster, name: &str) -> serde_json::Value {
    c.json(&["volume", "show", name])["grow"].clone()
}

/// Checks a grown GPT volume: table, partition 2's identity and end, filesystem, files.
fn check_gpt(
    work: &Path,
    c: &Cluster,
    name: &str,
    kind: &str,
    volume: u64,
    first: u64,
    files: &[(String, String)],
) -> u64 {
    let out = work.join(format!("{name}-out.img"));
    copy_out(c, name, &out);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), volume);
    let v = check(Command::new("sgdisk").arg("-v").arg(&out));
    assert!(v.contains("No problems found"), "{v}");
    let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(&out));
    let n = volume / 512;
    let end = aligned_end(first, n - 34);
    assert_eq!(sector_of(&info, "First sector: "), first, "{info}");
    assert_eq!(sector_of(&info, "Last sector: "), end, "{info}");
    assert!(
        info.contains(&format!("Partition unique GUID: {PART_GUID}")),
        "{info}"
    );
    assert!(
        info.contains("Partition GUID code: 0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
        "{info}"
    );
    assert!(info.contains("Attribute flags: 4000000000000004"), "{info}");
    assert!(info.contains("Partition name: 'data root'"), "{info}");
    let p = check(Command::new("sgdisk").arg("-p").arg(&out));
    assert!(
        p.contains(&format!("Disk identifier (GUID): {DISK_GUID}")),
        "{p}"
    );
    let part_bytes = (end + 1 - first) * 512;
    let part = work.join(format!("{name}-p2.img"));
    cut(&out, first * 512, part_bytes, &part);
    check_fs(work, kind, &part, files);
    let fs = fs_bytes(kind, &part);
    assert!(
        fs <= part_bytes && fs + 4 * MIB > part_bytes,
        "{kind} is {fs} B in a partition of {part_bytes} B"
    );
    fs
}

// ----- tests -------------------------------------------------------------------------------------

#[test]
fn grow_gpt_ext4_plan_then_grow() {
    // Sizes (one place): the image, the volume as created, the grow's target.
    const IMAGE: u64 = 64 * MIB;
    const VOLUME: u64 = 128 * MIB;
    const TARGET: u64 = 128 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let img = w.join("gpt.img");
    let (first, last) = gpt_image(w, &img, IMAGE, "ext4", &w.join("files"));
    let c = Cluster::start(1);
    volume_with(&c, "g1", VOLUME, &img);

    // --plan: every layer with bytes, sectors and IEC units; nothing changes.
    let before = sha256(&data_file(&c, "g1"));
    let plan = ok(&grow(&c, &["g1", "128MiB", "--plan"]));
    assert!(plan.contains("ok      no consumers"), "{plan}");
    assert!(
        plan.contains("ok      filesystem clean: e2fsck -fn: clean"),
        "{plan}"
    );
    assert!(plan.contains("1. block layer [already done]"), "{plan}");
    assert!(
        plan.contains(&format!(
            "{TARGET} B (128.00 MiB) = {} sectors",
            TARGET / 512
        )),
        "{plan}"
    );
    let new_end = aligned_end(first, TARGET / 512 - 34);
    assert!(
        plan.contains(&format!("end LBA {last} -> {new_end}")),
        "{plan}"
    );
    assert!(plan.contains("3. filesystem [to do]: ext4"), "{plan}");
    assert!(plan.contains("Nothing was changed (--plan)"), "{plan}");
    let pj = c.json(&["volume", "grow", "g1", "134217728", "--plan"]);
    assert_eq!(pj["ok"], true);
    assert_eq!(pj["changes_nothing"], true);
    assert_eq!(pj["target_sectors"], TARGET / 512);
    assert_eq!(pj["steps"][1]["plan"]["table"], "gpt");
    assert_eq!(pj["steps"][1]["plan"]["target"]["partition"], 2);
    assert_eq!(pj["steps"][2]["kind"], "ext4");
    assert_eq!(
        pj["steps"][2]["new_bytes"],
        (new_end + 1 - first) * 512,
        "{pj:#}"
    );
    assert_eq!(
        sha256(&data_file(&c, "g1")),
        before,
        "--plan changed the volume"
    );
    // Units: an ambiguous size is refused, naming both meanings.
    let e = failed(&grow(&c, &["g1", "128M"]));
    assert!(e.contains("MiB") && e.contains("MB"), "{e}");
    assert!(journal(&c, "g1").is_null());

    // The grow.
    let out = ok(&run(c
        .cli()
        .args(["-o", "json", "volume", "grow", "g1", "128MiB"])));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(r["steps"][0]["state"], "already done", "{r:#}");
    assert_eq!(r["steps"][1]["state"], "done", "{r:#}");
    assert_eq!(r["steps"][3]["state"], "done", "{r:#}");
    let fs = check_gpt(w, &c, "g1", "ext4", VOLUME, first, &files);
    assert_eq!(r["filesystem_new_bytes"], fs, "{r:#}");
    assert!(r["filesystem_old_bytes"].as_u64().unwrap() < fs / 2 + MIB);
    assert!(journal(&c, "g1").is_null(), "journal left behind");
    let v = c.json(&["volume", "show", "g1"]);
    assert_eq!(v["replicas"][0]["last_resync_bytes"], 0, "{v:#}");

    // Again: every layer is done already; the table stays as it is.
    let again = ok(&grow(&c, &["g1", "128MiB", "--plan"]));
    assert!(again.contains("partition table: nothing to do"), "{again}");
    assert!(again.contains("3. filesystem [already done]"), "{again}");
}

#[test]
fn grow_gpt_xfs() {
    // mkfs.xfs wants at least 300 MB.
    const IMAGE: u64 = 320 * MIB;
    const VOLUME: u64 = 512 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let img = w.join("gpt-xfs.img");
    let (first, _) = gpt_image(w, &img, IMAGE, "xfs", &w.join("files"));
    let c = Cluster::start(1);
    // The volume is only as large as the image: the grow's block step resizes it first.
    volume_with(&c, "x1", IMAGE, &img);
    let out = ok(&grow(&c, &["x1", &format!("{VOLUME}")]));
    assert!(out.contains("xfs_growfs"), "{out}");
    assert_eq!(c.json(&["volume", "show", "x1"])["size_bytes"], VOLUME);
    let fs = check_gpt(w, &c, "x1", "xfs", VOLUME, first, &files);
    assert!(fs > IMAGE, "xfs is {fs} B");
    assert!(journal(&c, "x1").is_null());
}

/// An MBR with one primary partition (ext3, boot flag) and an MBR with an extended partition
/// and two logical ones (ext4 in the last), grown at the same time.
#[test]
fn grow_mbr_primary_and_logical_at_the_same_time() {
    const IMAGE: u64 = 64 * MIB;
    const VOLUME: u64 = 96 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let parted = |img: &Path, args: &[&str]| {
        check(
            Command::new(tool("parted"))
                .args(["-s", "-a", "none"])
                .arg(img)
                .args(args),
        );
    };
    let parts = |img: &Path| -> Vec<(u32, u64, u64)> {
        check(
            Command::new("parted")
                .args(["-s", "-m"])
                .arg(img)
                .args(["unit", "s", "print"]),
        )
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let n = f.first()?.parse().ok()?;
            let s = f.get(1)?.trim_end_matches('s').parse().ok()?;
            let e = f.get(2)?.trim_end_matches('s').parse().ok()?;
            Some((n, s, e))
        })
        .collect()
    };
    // Primary: 2048 .. end, ext3, boot flag.
    let prim = w.join("mbr1.img");
    create_file(&prim, IMAGE);
    parted(
        &prim,
        &[
            "mklabel", "msdos", "mkpart", "primary", "2048s", "100%", "set", "1", "boot", "on",
        ],
    );
    let (_, p1s, p1e) = parts(&prim)[0];
    let fs = make_fs(w, "ext3", (p1e + 1 - p1s) * 512, &w.join("files"));
    put(&prim, p1s * 512, &fs);
    // Extended: primary 1 (8 MiB), extended 2 to the end, logical 5 (8 MiB), logical 6 ext4.
    let ext = w.join("mbr2.img");
    create_file(&ext, IMAGE);
    parted(
        &ext,
        &[
            "mklabel", "msdos", "mkpart", "primary", "2048s", "18431s", "mkpart", "extended",
            "18432s", "100%", "mkpart", "logical", "20480s", "36863s", "mkpart", "logical",
            "38912s", "100%",
        ],
    );
    let (_, l6s, l6e) = *parts(&ext).iter().find(|p| p.0 == 6).unwrap();
    let fs = make_fs(w, "ext4", (l6e + 1 - l6s) * 512, &w.join("files"));
    put(&ext, l6s * 512, &fs);

    let c = Cluster::start(1);
    volume_with(&c, "m1", VOLUME, &prim);
    volume_with(&c, "m2", VOLUME, &ext);
    // Two grows at once, as separate processes.
    let spawn = |name: &str| {
        let mut cmd = c.cli();
        cmd.args(["volume", "grow", name, &VOLUME.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        cmd.spawn().unwrap()
    };
    let a = spawn("m1");
    let b = spawn("m2");
    ok(&a.wait_with_output().unwrap());
    ok(&b.wait_with_output().unwrap());

    let n = VOLUME / 512;
    let out1 = w.join("m1-out.img");
    copy_out(&c, "m1", &out1);
    let p = parts(&out1);
    assert_eq!(p.len(), 1, "{p:?}");
    let end = aligned_end(p1s, n - 1);
    assert_eq!(p[0], (1, p1s, end));
    let pr = check(
        Command::new("parted")
            .args(["-s", "-m"])
            .arg(&out1)
            .args(["unit", "s", "print"]),
    );
    assert!(pr.contains("boot"), "boot flag lost: {pr}");
    let part = w.join("m1-p1.img");
    cut(&out1, p1s * 512, (end + 1 - p1s) * 512, &part);
    check_fs(w, "ext3", &part, &files);
    let fsb = fs_bytes("ext3", &part);
    assert!(fsb + 4 * MIB > (end + 1 - p1s) * 512, "ext3 is {fsb} B");

    let out2 = w.join("m2-out.img");
    copy_out(&c, "m2", &out2);
    let p = parts(&out2);
    let end6 = aligned_end(l6s, n - 1);
    assert_eq!(
        p,
        [
            (1, 2048, 18431),
            (2, 18432, end6),
            (5, 20480, 36863),
            (6, l6s, end6)
        ],
        "extended and last logical end on the new end"
    );
    let part = w.join("m2-p6.img");
    cut(&out2, l6s * 512, (end6 + 1 - l6s) * 512, &part);
    check_fs(w, "ext4", &part, &files);
    assert!(fs_bytes("ext4", &part) + 4 * MIB > (end6 + 1 - l6s) * 512);
    assert!(journal(&c, "m1").is_null() && journal(&c, "m2").is_null());
}

/// Bare ext4 (no table) grows to fill the volume; refused while a writer is connected (the
/// message names the node), a table whose last partition is not the filesystem is refused with
/// an explanation and left untouched.
#[test]
fn grow_bare_ext4_refusals() {
    const IMAGE: u64 = 48 * MIB;
    const VOLUME: u64 = 80 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let bare = make_fs(w, "ext4", IMAGE, &w.join("files"));
    // GPT: ext4 in partition 1, swap in the last partition 2.
    let swapimg = w.join("swap.img");
    create_file(&swapimg, IMAGE);
    check(
        Command::new("sgdisk")
            .args([
                "-o",
                "-n",
                "1:2048:+24M",
                "-t",
                "1:8300",
                "-n",
                "2:0:0",
                "-t",
                "2:8200",
            ])
            .arg(&swapimg),
    );
    let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(&swapimg));
    let s2 = sector_of(&info, "First sector: ");
    let e2 = sector_of(&info, "Last sector: ");
    let fs1 = make_fs(w, "ext4", 24 * MIB, &w.join("files"));
    put(&swapimg, 2048 * 512, &fs1);
    let sw = w.join("swap-part.img");
    create_file(&sw, (e2 + 1 - s2) * 512);
    check(Command::new(tool("mkswap")).arg(&sw));
    put(&swapimg, s2 * 512, &sw);

    // GPT: partition 1 empty, swap in the last partition 2 (no filesystem tandem grows).
    let onlyswap = w.join("onlyswap.img");
    create_file(&onlyswap, IMAGE);
    check(
        Command::new("sgdisk")
            .args([
                "-o",
                "-n",
                "1:2048:+24M",
                "-t",
                "1:8300",
                "-n",
                "2:0:0",
                "-t",
                "2:8200",
            ])
            .arg(&onlyswap),
    );
    put(&onlyswap, s2 * 512, &sw);

    // Bare ext4 with a damaged inode (the file's inode cleared with debugfs).
    let damaged = w.join("damaged.img");
    std::fs::copy(&bare, &damaged).unwrap();
    check(
        Command::new(tool("debugfs"))
            .args(["-w", "-R", "clri /big.bin"])
            .arg(&damaged),
    );

    let c = Cluster::start(1);
    let uri = volume_with(&c, "b1", VOLUME, &bare);
    volume_with(&c, "d1", VOLUME, &damaged);

    // A filesystem that is not clean: refused before anything is written.
    let before = sha256(&data_file(&c, "d1"));
    let e = failed(&grow(&c, &["d1", &VOLUME.to_string()]));
    assert!(e.contains("filesystem clean: e2fsck -fn exited 4"), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    assert_eq!(sha256(&data_file(&c, "d1")), before);
    assert!(journal(&c, "d1").is_null());
    volume_with(&c, "s1", VOLUME, &swapimg);
    volume_with(&c, "u1", VOLUME, &onlyswap);

    // Swap in the last partition, no filesystem elsewhere: the partition grows, the command
    // stops there and says so.
    let out = ok(&grow(&c, &["u1", &VOLUME.to_string()]));
    assert!(out.contains("skipped"), "{out}");
    assert!(out.contains("Linux swap"), "{out}");
    let o = w.join("u1-out.img");
    copy_out(&c, "u1", &o);
    let v = check(Command::new("sgdisk").arg("-v").arg(&o));
    assert!(v.contains("No problems found"), "{v}");
    let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(&o));
    assert_eq!(
        sector_of(&info, "Last sector: "),
        aligned_end(s2, VOLUME / 512 - 34)
    );
    let sig = std::fs::read(&o).unwrap();
    let at = (s2 * 512 + 4086) as usize;
    assert_eq!(&sig[at..at + 10], b"SWAPSPACE2", "swap signature moved");

    // Not the last partition: refused, explained, nothing written.
    let before = sha256(&data_file(&c, "s1"));
    let e = failed(&grow(&c, &["s1", &VOLUME.to_string()]));
    assert!(e.contains("not in the last partition"), "{e}");
    assert!(e.contains("swap"), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    assert_eq!(sha256(&data_file(&c, "s1")), before);
    assert!(journal(&c, "s1").is_null());

    // A writer is connected: refused, naming the node; the plan says the same.
    // qemu-io reads its commands from stdin: it holds the export open until stdin closes.
    let mut holder = Command::new(tool("qemu-io"));
    holder
        .args(["-f", "raw", &uri])
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    die_with_parent(&mut holder);
    let mut holder = holder.spawn().unwrap();
    c.wait_json(&["volume", "show", "b1"], "the writer's connection", |v| {
        v["replicas"][0]["connections"].as_u64().unwrap_or(0) >= 1
    });
    let e = failed(&grow(&c, &["b1", &VOLUME.to_string()]));
    assert!(e.contains("no consumers"), "{e}");
    assert!(e.contains("node node1 has 1 consumer connection"), "{e}");
    // ...and which client it is: the holder's pid and command, as the agent sees the socket.
    assert!(e.contains(&format!("pid {} (qemu-io)", holder.id())), "{e}");
    assert!(e.contains("nothing was changed"), "{e}");
    let e = failed(&grow(&c, &["b1", &VOLUME.to_string(), "--plan"]));
    assert!(e.contains("REFUSED no consumers"), "{e}");
    assert!(journal(&c, "b1").is_null());
    drop(holder.stdin.take());
    assert!(holder.wait().unwrap().success());

    // The writer left: the grow goes through; the filesystem fills the volume.
    let out = ok(&grow(&c, &["b1", &VOLUME.to_string()]));
    assert!(out.contains("resize2fs"), "{out}");
    let o = w.join("b1-out.img");
    copy_out(&c, "b1", &o);
    check_fs(w, "ext4", &o, &files);
    assert_eq!(fs_bytes("ext4", &o), VOLUME);
}

/// A grow stopped after each step as a crash would (TANDEM_GROW_FAIL_AFTER), with the
/// controller or the agent killed in between; then resumed or undone.
#[test]
fn grow_interrupted_then_resumed_or_undone() {
    const IMAGE: u64 = 64 * MIB;
    const VOLUME: u64 = 128 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let img = w.join("gpt.img");
    let (first, last) = gpt_image(w, &img, IMAGE, "ext4", &w.join("files"));
    let mut c = Cluster::start(1);
    for v in ["i1", "i2", "i3", "i4", "i5", "i6", "i7", "i8"] {
        volume_with(&c, v, VOLUME, &img);
    }
    let target = VOLUME.to_string();
    let crash = |c: &Cluster, name: &str, step: &str| {
        let out = run(c
            .cli()
            .env("TANDEM_GROW_FAIL_AFTER", step)
            .args(["volume", "grow", name, &target]));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&out.status),
            Some(libc::SIGKILL),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // The original table regions: sectors 0..34 and the old backup at the image's end.
    let orig = std::fs::read(&img).unwrap();
    let table_same_as_original = |c: &Cluster, name: &str| {
        let o = w.join(format!("{name}-undone.img"));
        copy_out(c, name, &o);
        let now = std::fs::read(&o).unwrap();
        assert_eq!(now[..34 * 512], orig[..34 * 512], "primary GPT differs");
        let tail = (IMAGE - 33 * 512) as usize;
        assert_eq!(
            now[tail..IMAGE as usize],
            orig[tail..],
            "old backup GPT differs"
        );
        assert!(
            now[IMAGE as usize..].iter().all(|&b| b == 0),
            "grown area not zero"
        );
        let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(&o));
        assert_eq!(sector_of(&info, "Last sector: "), last);
        let part = w.join(format!("{name}-p2.img"));
        cut(&o, first * 512, (last + 1 - first) * 512, &part);
        check_fs(w, "ext4", &part, &files);
    };

    // i1: stopped after the journal was written; shown in `volume show`; undo removes it.
    crash(&c, "i1", "journal");
    let j = journal(&c, "i1");
    assert_eq!(j["target_bytes"], VOLUME, "{j:#}");
    assert_eq!(j["steps_done"], serde_json::json!([]));
    assert!(j["undo"].is_null());
    let show = c.tandem(&["volume", "show", "i1"]);
    assert!(show.contains("Grow in progress"), "{show}");
    // A grow to another size is refused while this one is unfinished.
    let e = failed(&grow(&c, &["i1", "100MiB"]));
    assert!(e.contains("unfinished grow"), "{e}");
    let out = ok(&grow(&c, &["i1", "--undo"]));
    assert!(
        out.contains("partition table had not been changed"),
        "{out}"
    );
    assert!(journal(&c, "i1").is_null());
    table_same_as_original(&c, "i1");

    // i2: stopped after the partition table; the controller is killed and restarted (the
    // journal is in its store); the grow resumes and finishes.
    crash(&c, "i2", "partition");
    c.kill_controller(libc::SIGKILL);
    c.restart_controller();
    c.wait_json(&["volume", "show", "i2"], "node1 back", |v| {
        v["replicas"][0]["disk_state"] == "UpToDate"
    });
    let j = journal(&c, "i2");
    assert_eq!(
        j["steps_done"],
        serde_json::json!(["block", "partition"]),
        "{j:#}"
    );
    assert!(j["undo"].is_string(), "{j:#}");
    let out = ok(&grow(&c, &["i2", &target]));
    assert!(out.contains("Resuming the grow"), "{out}");
    assert!(out.contains("partition table  already done"), "{out}");
    check_gpt(w, &c, "i2", "ext4", VOLUME, first, &files);
    assert!(journal(&c, "i2").is_null());

    // i3: stopped after e2fsck -f; the agent is killed and restarted; undo puts the old table
    // back (the filesystem was not resized yet).
    crash(&c, "i3", "fsck");
    assert_eq!(
        journal(&c, "i3")["steps_done"],
        serde_json::json!(["block", "partition", "fsck"])
    );
    c.stop_agent("node1", libc::SIGKILL);
    c.restart_agent("node1");
    c.wait_export("i3");
    let out = ok(&grow(&c, &["i3", "--undo"]));
    assert!(out.contains("old partition table is back"), "{out}");
    assert!(journal(&c, "i3").is_null());
    table_same_as_original(&c, "i3");
    // Undo again: nothing to undo.
    let out = ok(&grow(&c, &["i3", "--undo"]));
    assert!(out.contains("nothing to undo"), "{out}");

    // i4: stopped after the partition table, undone: the whole volume is byte for byte the
    // image again (e2fsck had not run), then grown for real.
    crash(&c, "i4", "partition");
    ok(&grow(&c, &["i4", "--undo"]));
    let o = w.join("i4-undone.img");
    copy_out(&c, "i4", &o);
    let now = std::fs::read(&o).unwrap();
    assert!(
        now[..IMAGE as usize] == orig[..],
        "volume differs from the image after undo"
    );
    assert!(now[IMAGE as usize..].iter().all(|&b| b == 0));
    ok(&grow(&c, &["i4", &target]));
    check_gpt(w, &c, "i4", "ext4", VOLUME, first, &files);

    // i5: SIGTERM while e2fsck -f runs (a stand-in e2fsck first on PATH that waits for it):
    // the tool is stopped, the temporary FUSE view is unmounted, exit 130; the journal says
    // what is done, and the grow then resumes.
    let bin = w.join("slow-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let marker = w.join("e2fsck-started");
    let real = check(Command::new("sh").args(["-c", "command -v e2fsck"]))
        .trim()
        .to_string();
    let script = bin.join("e2fsck");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = \"-f\" ]; then touch {}; exec sleep 120; fi\nexec {real} \"$@\"\n",
            marker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = c.cli();
    cmd.env("PATH", path)
        .args(["volume", "grow", "i5", &target])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let child = cmd.spawn().unwrap();
    let view_mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("tandem-grow:i5 "))
    };
    wait_until(Duration::from_secs(60), "e2fsck -f to start", || {
        marker.exists().then_some(())
    });
    assert!(
        view_mounted(),
        "the FUSE view is not mounted while e2fsck runs"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        !view_mounted(),
        "the FUSE view is still mounted after SIGTERM"
    );
    assert_eq!(
        journal(&c, "i5")["steps_done"],
        serde_json::json!(["block", "partition"])
    );
    let out = ok(&grow(&c, &["i5", &target]));
    assert!(out.contains("Resuming the grow"), "{out}");
    check_gpt(w, &c, "i5", "ext4", VOLUME, first, &files);

    // i6: stopped after the block step (the table untouched), resumed.
    crash(&c, "i6", "block");
    let j = journal(&c, "i6");
    assert_eq!(j["steps_done"], serde_json::json!(["block"]), "{j:#}");
    assert!(j["undo"].is_null(), "{j:#}");
    let out = ok(&grow(&c, &["i6", &target]));
    assert!(out.contains("Resuming the grow"), "{out}");
    check_gpt(w, &c, "i6", "ext4", VOLUME, first, &files);

    // i7, i8: killed in the middle of writing the table (the new backup GPT at the new end
    // written, the primary not yet): the table is still valid (the primary names the old
    // backup), the undo record is in the journal; i7 is undone (the whole volume equals the
    // image again), i8 resumed (apply completes the remaining regions).
    for v in ["i7", "i8"] {
        crash(&c, v, "partition-write");
        let j = journal(&c, v);
        assert_eq!(j["steps_done"], serde_json::json!(["block"]), "{j:#}");
        assert!(j["undo"].is_string(), "{j:#}");
        let o = w.join(format!("{v}-half.img"));
        copy_out(&c, v, &o);
        let now = std::fs::read(&o).unwrap();
        assert!(
            now[IMAGE as usize..].iter().any(|&b| b != 0),
            "nothing written at the new end"
        );
        assert_eq!(
            now[..34 * 512],
            orig[..34 * 512],
            "primary GPT already changed"
        );
        let sv = check(Command::new("sgdisk").arg("-v").arg(&o));
        assert!(!sv.contains("Invalid partition data"), "{sv}");
    }
    let out = ok(&grow(&c, &["i7", "--undo"]));
    assert!(out.contains("1 region(s)"), "{out}");
    let o = w.join("i7-undone.img");
    copy_out(&c, "i7", &o);
    let now = std::fs::read(&o).unwrap();
    assert!(
        now[..IMAGE as usize] == orig[..],
        "volume differs from the image after undo"
    );
    assert!(
        now[IMAGE as usize..].iter().all(|&b| b == 0),
        "the new end is not zero again"
    );
    let out = ok(&grow(&c, &["i8", &target]));
    assert!(out.contains("Resuming the grow"), "{out}");
    check_gpt(w, &c, "i8", "ext4", VOLUME, first, &files);
}

/// Two replicas and a witness: the preflight checks the replication links, the table and the
/// filesystem are written through the Primary's export (replicated), both replicas end
/// identical and nothing was resynced.
#[test]
fn grow_replicated_gpt_ext4() {
    const IMAGE: u64 = 64 * MIB;
    const VOLUME: u64 = 128 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let img = w.join("gpt.img");
    let (first, _) = gpt_image(w, &img, IMAGE, "ext4", &w.join("files"));
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = replicated_with_image(&c, "r2", VOLUME, &img);
    let before = resynced(&v);
    let plan = ok(&grow(&c, &["r2", &VOLUME.to_string(), "--plan"]));
    assert!(
        plan.contains("ok      replicas connected: every replication link Established"),
        "{plan}"
    );
    assert!(plan.contains("ok      at most one Primary"), "{plan}");
    ok(&grow(&c, &["r2", &VOLUME.to_string()]));
    check_gpt(w, &c, "r2", "ext4", VOLUME, first, &files);
    let nodes: Vec<&str> = diskful(&v)
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 2);
    same_files(&c, nodes[0], nodes[1], "r2");
    // The grow caused no resync: every replica's last resync is the one before the grow
    // (normally none: 0), nothing is out of sync, no resync runs.
    let v = c.json(&["volume", "show", "r2"]);
    assert!(in_sync(&v), "{v:#}");
    assert_eq!(resynced(&v), before, "a resync ran during the grow: {v:#}");
}

/// Starts from a volume smaller than the target, with two replicas: the block layer grows
/// first (every replica), then table and filesystem; the grown area is not resynced (file
/// pools: 0 bytes). Needs `volume resize` (POST /v1/volumes/{name}/resize, branch `resize`).
#[test]
fn grow_from_smaller_volume_needs_resize() {
    const IMAGE: u64 = 64 * MIB;
    const VOLUME: u64 = IMAGE;
    const TARGET: u64 = 128 * MIB;
    let work = work_dir();
    let w = work.path();
    let files = make_files(&w.join("files"));
    let img = w.join("gpt.img");
    let (first, _) = gpt_image(w, &img, IMAGE, "ext4", &w.join("files"));
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    replicated_with_image(&c, "r1", VOLUME, &img);
    let out = grow(&c, &["r1", "128MiB", "--plan"]);
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        !plan.contains("has no volume resize"),
        "this controller has no POST /v1/volumes/{{name}}/resize: merge branch `resize` first:\n{plan}"
    );
    let plan = ok(&out);
    assert!(plan.contains("1. block layer [to do]"), "{plan}");
    ok(&grow(&c, &["r1", &TARGET.to_string()]));
    let v = c.json(&["volume", "show", "r1"]);
    assert_eq!(v["size_bytes"], TARGET);
    for r in v["replicas"].as_array().unwrap() {
        assert_eq!(r["last_resync_bytes"], 0, "resync of the grown area: {v:#}");
    }
    check_gpt(w, &c, "r1", "ext4", TARGET, first, &files);
}

/// Creates a 2-replica volume `name` of `size` bytes, waits for its links (so the image is
/// replicated as it is written, nothing resynced), copies `img` in through the Primary's
/// export with nbdcopy and waits until the replicas are in sync.
fn replicated_with_image(c: &Cluster, name: &str, size: u64, img: &Path) -> serde_json::Value {
    c.tandem(&[
        "volume",
        "create",
        name,
        &size.to_string(),
        "--replicas",
        "2",
    ]);
    c.wait_json(&["volume", "show", name], "replicas connected", in_sync);
    let uri = c.connect(name);
    check(Command::new(tool("nbdcopy")).arg(img).arg(&uri));
    c.wait_json(&["volume", "show", name], "replicas in sync", in_sync)
}

/// Every replica's `last_resync_bytes`, by node.
fn resynced(v: &serde_json::Value) -> Vec<(String, u64)> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["last_resync_bytes"].as_u64().unwrap(),
            )
        })
        .collect()
}

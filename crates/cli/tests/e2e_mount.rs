//! `tandem volume mount`: the FUSE file view of a volume of a real `tandem up` cluster, checked
//! with real tools (qemu-img, sgdisk, e2fsck, mount -o loop, dd, qemu-io).

mod common;

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2] ^ seed)
        .collect()
}

fn sha256(path: &Path) -> String {
    check(Command::new(tool("sha256sum")).arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// A GPT image: partition 1 (8 MiB, empty), partition 2 (the rest) with ext4 holding
/// `hello.bin`. Returns (partition 2 first sector, sector count, sha256 of hello.bin).
fn build_image(dir: &Path, img: &Path, size: u64) -> (u64, u64, String) {
    std::fs::File::create(img).unwrap().set_len(size).unwrap();
    check(
        Command::new(tool("sgdisk"))
            .args([
                "-n",
                "1:2048:+8M",
                "-t",
                "1:8300",
                "-n",
                "2:0:0",
                "-t",
                "2:8300",
            ])
            .arg(img),
    );
    let info = check(Command::new("sgdisk").args(["-i", "2"]).arg(img));
    let sector = |key: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{key}' in sgdisk -i 2: {info}"))
    };
    let (first, last) = (sector("First sector: "), sector("Last sector: "));
    let src = dir.join("hello.bin");
    std::fs::write(&src, pattern(42, 300 << 10)).unwrap();
    let part = dir.join("part2.img");
    std::fs::File::create(&part)
        .unwrap()
        .set_len((last + 1 - first) * 512)
        .unwrap();
    check(
        Command::new(tool("mkfs.ext4"))
            .args(["-F", "-q"])
            .arg(&part),
    );
    check(
        Command::new(tool("debugfs"))
            .arg("-w")
            .arg("-R")
            .arg(format!("write {} hello.bin", src.display()))
            .arg(&part),
    );
    let data = std::fs::read(&part).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.seek(SeekFrom::Start(first * 512)).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    (first, last + 1 - first, sha256(&src))
}

/// Is `dir` a mount point (any mount namespace view this process has)?
fn mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(dir.as_str()))
}

/// A running `tandem volume mount`; on drop (also when the test fails) the directory is
/// unmounted and the process killed.
struct MountProc {
    child: Child,
    dir: PathBuf,
    stdout: BufReader<std::process::ChildStdout>,
}

impl MountProc {
    fn start(c: &Cluster, args: &[&str], dir: &Path) -> MountProc {
        let mut cmd = c.cli();
        cmd.args(args)
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        MountProc {
            child,
            dir: dir.to_path_buf(),
            stdout,
        }
    }

    /// Reads stdout lines until `last` matches one; returns everything read. Fails with the
    /// process's stderr if it exits first.
    fn read_until(&mut self, last: impl Fn(&str) -> bool) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            if n == 0 {
                let out = self.child.wait().unwrap();
                let mut err = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err)
                    .unwrap();
                panic!("tandem volume mount exited ({out}) early: stdout:\n{all}\nstderr:\n{err}");
            }
            all.push_str(&line);
            if last(line.trim_end()) {
                return all;
            }
        }
    }

    /// Waits for the process to exit by itself; returns its status and stderr.
    fn wait_exit(&mut self, what: &str) -> (std::process::ExitStatus, String) {
        let st = wait_until(Duration::from_secs(30), what, || {
            self.child.try_wait().unwrap()
        });
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (st, err)
    }
}

impl Drop for MountProc {
    fn drop(&mut self) {
        if mounted(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loop mount, lazily unmounted on drop.
struct LoopMount(PathBuf);
impl Drop for LoopMount {
    fn drop(&mut self) {
        if mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn mount_shows_volume_and_partitions_to_real_tools() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the FUSE view needs the fuse kernel module (./scripts/test installs fuse3)"
    );
    tool("fusermount3");
    let mut c = Cluster::start(1);
    c.tandem(&["volume", "create", "fv", "64MiB"]);
    let uri = c.connect("fv");

    let tmp = tempfile::Builder::new()
        .prefix("tmnt")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("disk.img");
    let (p2_first, p2_sectors, hello_sha) = build_image(tmp.path(), &img, 64 * MIB);
    check(
        Command::new(tool("qemu-img"))
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&img)
            .arg(&uri),
    );

    let dir = tmp.path().join("view");
    std::fs::create_dir(&dir).unwrap();
    let dir = dir.canonicalize().unwrap();
    let mut m = MountProc::start(&c, &["-o", "json", "volume", "mount", "fv"], &dir);
    let json = m.read_until(|l| l == "}");
    let v: serde_json::Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert!(
        mounted(&dir),
        "not in /proc/mounts after the JSON was printed"
    );

    // What it shows, in JSON and in the directory.
    assert_eq!(v["volume"], "fv");
    assert_eq!(v["table"], "gpt");
    assert_eq!(v["read_only"], false);
    assert_eq!(v["uri"], uri.as_str());
    let files = v["files"].as_array().unwrap();
    let got: Vec<(String, u64, u64)> = files
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["offset_bytes"].as_u64().unwrap(),
                f["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("fv".to_string(), 0, 64 * MIB),
            ("fv-part1".to_string(), 2048 * 512, 8 * MIB),
            ("fv-part2".to_string(), p2_first * 512, p2_sectors * 512),
        ]
    );
    assert_eq!(
        files[2]["path"].as_str().unwrap(),
        dir.join("fv-part2").to_str().unwrap()
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["fv", "fv-part1", "fv-part2"]);
    for (name, _, size) in &got {
        assert_eq!(
            std::fs::metadata(dir.join(name)).unwrap().len(),
            *size,
            "{name}"
        );
    }

    // The partition table and the filesystem as the real tools see them.
    let out = check(Command::new(tool("sgdisk")).arg("-v").arg(dir.join("fv")));
    assert!(out.contains("No problems found"), "{out}");
    check(
        Command::new(tool("e2fsck"))
            .arg("-fn")
            .arg(dir.join("fv-part2")),
    );
    let lmnt = tmp.path().join("loop");
    std::fs::create_dir(&lmnt).unwrap();
    let lmnt = lmnt.canonicalize().unwrap();
    check(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(dir.join("fv-part2"))
            .arg(&lmnt),
    );
    let lguard = LoopMount(lmnt.clone());
    assert_eq!(sha256(&lmnt.join("hello.bin")), hello_sha);
    check(Command::new("umount").arg(&lmnt));
    drop(lguard);

    // A write through the whole-volume file reaches the export (read by another client).
    let src = tmp.path().join("ab.bin");
    std::fs::write(&src, vec![0xABu8; 64 << 10]).unwrap();
    let off = 2048 * 512 + MIB; // inside partition 1
    check(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", dir.join("fv").display()))
            .arg("bs=65536")
            .arg(format!("seek={}", off / 65536))
            .args(["conv=notrunc,fsync", "status=none"]),
    );
    let out = check(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c"])
            .arg(format!("read -P 0xab {off} 65536"))
            .arg(&uri),
    );
    assert!(
        out.contains("read 65536/65536") && !out.contains("verification failed"),
        "{out}"
    );
    // ...and the bytes around it are untouched (zeroes of the empty partition 1).
    let out = check(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("read -P 0 {} 65536", off + 65536))
            .arg(&uri),
    );
    assert!(!out.contains("verification failed"), "{out}");

    // The agent is killed and restarted under the mount: the view redials the export and
    // I/O goes on through the same open file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("fv"))
        .unwrap();
    c.stop_agent("node1", libc::SIGKILL);
    c.restart_agent("node1");
    let mut back = vec![0u8; 65536];
    f.read_exact_at(&mut back, off).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xAB),
        "data after the agent restart differs"
    );
    f.write_all_at(&[0xCDu8; 4096], off).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let uri = c.wait_export("fv");
    let out = check(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("read -P 0xcd {off} 4096"))
            .arg(&uri),
    );
    assert!(!out.contains("verification failed"), "{out}");

    // SIGTERM: unmounts cleanly and exits 0; no mount and no process left.
    // SAFETY: kill with a pid we own.
    assert_eq!(unsafe { libc::kill(m.child.id() as i32, libc::SIGTERM) }, 0);
    let (st, err) = m.wait_exit("tandem volume mount to exit after SIGTERM");
    assert!(st.success(), "exit {st}: {err}");
    assert!(err.contains("unmounted"), "{err}");
    assert!(!mounted(&dir), "still mounted after SIGTERM");
    assert!(
        !Path::new(&format!("/proc/{}", m.child.id())).exists(),
        "process still there"
    );
    drop(m);

    // A read-only view (table output) ends when unmounted from outside.
    let mut m = MountProc::start(&c, &["volume", "mount", "fv", "--read-only"], &dir);
    let text = m.read_until(|l| l.starts_with("Serving until"));
    assert!(text.contains("read-only"), "{text}");
    assert!(text.contains("fv-part2"), "{text}");
    let part1 = text
        .lines()
        .find(|l| l.trim_start().starts_with("fv-part1 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(part1.ends_with("8388608 B (8.00 MiB)"), "{part1}");
    let meta = std::fs::metadata(dir.join("fv")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    let out = run(Command::new("dd")
        .arg(format!("if={}", src.display()))
        .arg(format!("of={}", dir.join("fv").display()))
        .args(["bs=4096", "count=1", "conv=notrunc", "status=none"]));
    assert!(!out.status.success(), "write to a read-only view succeeded");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(Command::new("fusermount3").arg("-u").arg(&dir));
    let (st, err) = m.wait_exit("tandem volume mount to exit after fusermount3 -u");
    assert!(st.success(), "exit {st}: {err}");
    assert!(!mounted(&dir));
}

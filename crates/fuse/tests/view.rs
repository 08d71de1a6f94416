//! The file view mounted for real (kernel FUSE) over tandem's NBD server in-process, driven by
//! real tools: sgdisk, e2fsck, mount -o loop, dd, truncate, sha256sum.

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_blockdev::FileDevice;
use tandem_fuse::{Options, Unmounted};
use tandem_nbd::{Export, ExportRegistry, Server};
use tandem_nbd_client::Client;

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(60);

fn tool(name: &str) -> &str {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed; ./scripts/test installs every test tool (apt-get)"
    );
    name
}

fn need_fuse() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the FUSE tests need the fuse kernel module (./scripts/test installs fuse3)"
    );
    tool("fusermount3");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

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

/// A GPT disk image: partition 1 (8 MiB, empty), partition 2 (the rest) holding ext4 with
/// `hello.bin` (300 KiB of a pattern). Returns (partition 2 offset, size, sha256 of hello.bin).
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
    let first = sector("First sector: ");
    let last = sector("Last sector: ");
    let (off, len) = (first * 512, (last + 1 - first) * 512);

    let src = dir.join("hello.bin");
    std::fs::write(&src, pattern(42, 300 << 10)).unwrap();
    let part = dir.join("part2.img");
    std::fs::File::create(&part).unwrap().set_len(len).unwrap();
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
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&data).unwrap();
    f.sync_all().unwrap();
    std::fs::remove_file(&part).unwrap();
    (off, len, sha256(&src))
}

#[derive(Default)]
struct Registry(Mutex<HashMap<String, Arc<Export>>>);
impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.0.lock().unwrap().get(name).cloned()
    }
    fn list(&self) -> Vec<String> {
        self.0.lock().unwrap().keys().cloned().collect()
    }
}

/// tandem's NBD server serving `file` as export `vol` on a unix socket.
struct NbdServer {
    sock: PathBuf,
    server: Arc<Server>,
    _rt: tokio::runtime::Runtime,
}

impl NbdServer {
    fn start(file: &Path, sock: PathBuf, read_only: bool) -> NbdServer {
        let reg = Arc::new(Registry::default());
        reg.0.lock().unwrap().insert(
            "vol".into(),
            Arc::new(Export {
                name: "vol".into(),
                description: String::new(),
                device: Arc::new(FileDevice::open(file).unwrap()),
                read_only,
                multi_conn: true,
            }),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::with_workers(reg, 2);
        let l = rt.block_on(async { tokio::net::UnixListener::bind(&sock).unwrap() });
        rt.spawn(server.clone().serve_unix(l));
        NbdServer {
            sock,
            server,
            _rt: rt,
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// The view mounted on `dir`, served by a thread; unmounted on drop even when the test failed.
struct Mount {
    dir: PathBuf,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Mount {
    fn new(sock: &Path, dir: &Path, read_only: bool) -> (Mount, tandem_fuse::Layout) {
        need_fuse();
        let client = Client::connect_unix(sock, "vol").unwrap();
        let m = tandem_fuse::mount(
            client,
            "vol",
            dir,
            &Options {
                read_only,
                fsname: None,
            },
        )
        .unwrap();
        let layout = m.layout().clone();
        let dir = m.dir().to_path_buf();
        assert!(tandem_fuse::is_mounted(&dir));
        let thread = std::thread::spawn(move || m.run());
        (
            Mount {
                dir,
                thread: Some(thread),
            },
            layout,
        )
    }

    /// Unmounts and waits for the serving thread to end.
    fn unmount(&mut self) {
        assert_eq!(tandem_fuse::unmount(&self.dir).unwrap(), Unmounted::Done);
        let t = self.thread.take().unwrap();
        let start = Instant::now();
        while !t.is_finished() {
            assert!(start.elapsed() < DEADLINE, "the session did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap().unwrap();
        assert!(!tandem_fuse::is_mounted(&self.dir));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if tandem_fuse::is_mounted(&self.dir) {
            let _ = tandem_fuse::unmount(&self.dir);
        }
    }
}

/// A loop mount, lazily unmounted on drop.
struct LoopMount(PathBuf);
impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn gpt_ext4_image_through_the_view() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("disk.img");
    let size = 64 * MIB;
    let (p2_off, p2_len, hello_sha) = build_image(tmp.path(), &img, size);
    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), false);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, layout) = Mount::new(&srv.sock, &mnt, false);
    assert_eq!(layout.table, "gpt");

    // What it shows: the volume and both partitions, with exact sizes.
    assert_eq!(names(&mnt), ["vol", "vol-part1", "vol-part2"]);
    let len = |n: &str| std::fs::metadata(mnt.join(n)).unwrap().len();
    assert_eq!(len("vol"), size);
    assert_eq!(len("vol-part1"), 8 * MIB);
    assert_eq!(len("vol-part2"), p2_len);
    let meta = std::fs::metadata(mnt.join("vol")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(meta.is_file());

    // Real tools read the truth.
    let v = check(Command::new("sgdisk").arg("-v").arg(mnt.join("vol")));
    assert!(v.contains("No problems found"), "{v}");
    check(
        Command::new(tool("e2fsck"))
            .arg("-fn")
            .arg(mnt.join("vol-part2")),
    );
    // The partition file starts where the partition does.
    let mut a = vec![0u8; 8192];
    let mut b = vec![0u8; 8192];
    std::fs::File::open(mnt.join("vol-part2"))
        .unwrap()
        .read_exact_at(&mut a, 1024)
        .unwrap();
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut b, p2_off + 1024)
        .unwrap();
    assert!(a == b, "vol-part2 does not map to the partition's bytes");
    assert_eq!(&a[56..58], &[0x53, 0xEF], "ext4 superblock magic");

    // mount -o loop,ro of the partition file; the file put into the image reads back intact.
    let lmnt = tmp.path().join("loop");
    std::fs::create_dir(&lmnt).unwrap();
    check(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(mnt.join("vol-part2"))
            .arg(&lmnt),
    );
    let lguard = LoopMount(lmnt.clone());
    assert_eq!(sha256(&lmnt.join("hello.bin")), hello_sha);
    check(Command::new("umount").arg(&lmnt));
    drop(lguard);

    // A write through the partition file lands at the partition's offset on the export.
    let src = tmp.path().join("w.bin");
    let wdata = pattern(9, 64 << 10);
    std::fs::write(&src, &wdata).unwrap();
    check(
        Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", mnt.join("vol-part1").display()))
            .args(["bs=4096", "seek=3", "conv=notrunc,fsync", "status=none"]),
    );
    let other = Client::connect_unix(&srv.sock, "vol").unwrap();
    let mut back = vec![0u8; wdata.len()];
    other.read(&mut back, 2048 * 512 + 3 * 4096).unwrap();
    assert!(
        back == wdata,
        "write through vol-part1 not visible on the export"
    );

    // The set of files is fixed.
    let e = std::fs::File::create(mnt.join("new")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::remove_file(mnt.join("vol-part1")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = std::fs::rename(mnt.join("vol-part1"), mnt.join("x")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    assert_eq!(names(&mnt), ["vol", "vol-part1", "vol-part2"]);

    // Sizes are fixed: truncate and writes past the end are refused, the file is unchanged.
    let t = run(Command::new("truncate")
        .args(["-s", "1M"])
        .arg(mnt.join("vol-part1")));
    assert!(!t.status.success(), "truncate succeeded");
    assert_eq!(len("vol-part1"), 8 * MIB);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("vol-part1"))
        .unwrap();
    let e = f.write_at(b"x", 8 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // A write straddling the end is cut short.
    assert_eq!(f.write_at(&[7u8; 100], 8 * MIB - 10).unwrap(), 10);
    let mut tail = [0u8; 10];
    other.read(&mut tail, 2048 * 512 + 8 * MIB - 10).unwrap();
    assert_eq!(tail, [7u8; 10]);
    // The byte after partition 1 (the gap before partition 2) is untouched.
    let mut after = [1u8; 1];
    other.read(&mut after, 2048 * 512 + 8 * MIB).unwrap();
    assert_eq!(after, [0]);
    // fsync is an NBD FLUSH and succeeds.
    f.sync_all().unwrap();
    drop(f);

    view.unmount();
    assert!(names(&mnt).is_empty(), "files visible after unmount");
}

#[test]
fn read_only_view_refuses_writes() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, pattern(3, (4 * MIB) as usize)).unwrap();
    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), false);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, layout) = Mount::new(&srv.sock, &mnt, true);
    assert_eq!(layout.table, "none");
    assert_eq!(names(&mnt), ["vol"]);
    let meta = std::fs::metadata(mnt.join("vol")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    // Root ignores mode bits; the read-only mount itself refuses.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("vol"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    let data = std::fs::read(mnt.join("vol")).unwrap();
    assert!(
        data == pattern(3, (4 * MIB) as usize),
        "read-only view reads wrong bytes"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some(&*mnt.canonicalize().unwrap().to_string_lossy()))
        .expect("mount listed");
    assert!(line.starts_with("tandem:vol "), "{line}");
    assert!(line.contains(" ro,") || line.contains(" ro "), "{line}");
    view.unmount();
}

#[test]
fn read_only_export_forces_a_read_only_view() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(MIB).unwrap();
    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), true);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, _) = Mount::new(&srv.sock, &mnt, false);
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("vol"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    view.unmount();
}

#[test]
fn busy_view_is_detached_lazily_and_serves_open_files_until_closed() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::write(&img, pattern(11, (2 * MIB) as usize)).unwrap();
    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), false);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, _) = Mount::new(&srv.sock, &mnt, false);
    let f = std::fs::File::open(mnt.join("vol")).unwrap();

    // Busy: detached from the tree at once, the session keeps serving the open file.
    assert_eq!(tandem_fuse::unmount(&view.dir).unwrap(), Unmounted::Lazy);
    assert!(!tandem_fuse::is_mounted(&view.dir));
    assert!(names(&mnt).is_empty());
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, MIB).unwrap();
    assert_eq!(buf, pattern(11, (2 * MIB) as usize)[MIB as usize..][..4096]);
    let t = view.thread.take().unwrap();
    assert!(!t.is_finished(), "session ended while a file was open");

    // The last close releases the mount and ends the session.
    drop(f);
    let start = Instant::now();
    while !t.is_finished() {
        assert!(
            start.elapsed() < DEADLINE,
            "session did not end after the last close"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.join().unwrap().unwrap();
}

/// `partx -g -o NR,START,SECTORS,TYPE`: the partitions as the kernel would number them.
fn partx(img: &Path) -> Vec<(u32, u64, u64, String)> {
    check(
        Command::new(tool("partx"))
            .args(["-g", "-o", "NR,START,SECTORS,TYPE"])
            .arg(img),
    )
    .lines()
    .map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
            f[3].to_string(),
        )
    })
    .collect()
}

#[test]
fn mbr_logical_partitions_numbered_like_linux_and_resize2fs_through_the_view() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("mbr.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    check(Command::new(tool("parted")).arg("-s").arg(&img).args([
        "mklabel", "msdos", "mkpart", "primary", "ext4", "1MiB", "9MiB", "mkpart", "extended",
        "9MiB", "63MiB", "mkpart", "logical", "ext4", "10MiB", "20MiB", "mkpart", "logical",
        "ext4", "21MiB", "62MiB",
    ]));
    let linux = partx(&img);
    // A marker at the start of partition 6 that nothing may overwrite.
    let p6 = linux.iter().find(|p| p.0 == 6).expect("partition 6").1 * 512;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&pattern(77, 4096), p6)
        .unwrap();

    // The bytes right after partition 5 (EBR space), to check they stay untouched.
    let mut gap = vec![0u8; 4096];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut gap, 20 * MIB)
        .unwrap();

    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), false);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, layout) = Mount::new(&srv.sock, &mnt, false);
    assert_eq!(layout.table, "mbr");
    // Every partition partx lists except the extended container, same numbers and ranges.
    let want: Vec<(String, u64, u64)> = linux
        .iter()
        .filter(|p| p.3 != "0x5" && p.3 != "0xf")
        .map(|p| (format!("vol-part{}", p.0), p.1 * 512, p.2 * 512))
        .collect();
    assert_eq!(want.len(), 3, "{linux:?}");
    let got: Vec<(String, u64, u64)> = layout.files[1..]
        .iter()
        .map(|f| (f.name.clone(), f.offset_bytes, f.size_bytes))
        .collect();
    assert_eq!(got, want);
    assert_eq!(names(&mnt), ["vol", "vol-part1", "vol-part5", "vol-part6"]);

    // The grow flow's filesystem step with the real tools through the view: a 4 MiB ext4 in
    // the 10 MiB partition 5, grown by resize2fs to fill it.
    let p5 = mnt.join("vol-part5");
    check(
        Command::new(tool("mkfs.ext4"))
            .args(["-F", "-q", "-b", "1024"])
            .arg(&p5)
            .arg("4096"),
    );
    check(Command::new("e2fsck").arg("-fn").arg(&p5));
    check(Command::new(tool("resize2fs")).arg(&p5));
    check(Command::new("e2fsck").arg("-fn").arg(&p5));
    let h = check(Command::new(tool("dumpe2fs")).arg("-h").arg(&p5));
    let count: u64 = h
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{h}"));
    assert_eq!(
        count * 1024,
        10 * MIB,
        "resize2fs did not fill the partition"
    );
    // Nothing outside partition 5 changed.
    let mut b = vec![0u8; 4096];
    std::fs::File::open(mnt.join("vol-part6"))
        .unwrap()
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert!(b == pattern(77, 4096), "partition 6 was overwritten");
    let mut after = vec![1u8; 4096];
    std::fs::File::open(mnt.join("vol"))
        .unwrap()
        .read_exact_at(&mut after, 20 * MIB)
        .unwrap();
    assert!(after == gap, "bytes after partition 5 changed");
    view.unmount();
    // The filesystem is in the image at partition 5's offset (the server's file).
    let mut sb = [0u8; 2];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut sb, want[1].1 + 1024 + 56)
        .unwrap();
    assert_eq!(sb, [0x53, 0xEF]);
}

#[test]
fn xfs_created_checked_and_grown_through_the_view() {
    let tmp = tempfile::Builder::new()
        .prefix("tfuse")
        .tempdir_in("/tmp")
        .unwrap();
    let img = tmp.path().join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(512 * MIB)
        .unwrap();
    check(
        Command::new(tool("sgdisk"))
            .args(["-n", "1:2048:0", "-t", "1:8300"])
            .arg(&img),
    );
    let srv = NbdServer::start(&img, tmp.path().join("nbd.sock"), false);
    let mnt = tmp.path().join("view");
    std::fs::create_dir(&mnt).unwrap();
    let (mut view, layout) = Mount::new(&srv.sock, &mnt, false);
    let part = mnt.join("vol-part1");
    let part_bytes = layout.files[1].size_bytes;

    // A 300 MiB xfs in the ~511 MiB partition, made through the view.
    check(
        Command::new(tool("mkfs.xfs"))
            .args(["-q", "-d", "size=300m"])
            .arg(&part),
    );
    check(Command::new("xfs_repair").arg("-n").arg(&part));

    // Loop-mounted read-write: a file goes in, then xfs_growfs fills the partition.
    let lmnt = tmp.path().join("loop");
    std::fs::create_dir(&lmnt).unwrap();
    check(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(&part)
            .arg(&lmnt),
    );
    let lguard = LoopMount(lmnt.clone());
    let data = tmp.path().join("data.bin");
    std::fs::write(&data, pattern(5, 1 << 20)).unwrap();
    let want = sha256(&data);
    std::fs::copy(&data, lmnt.join("data.bin")).unwrap();
    check(Command::new(tool("xfs_growfs")).arg(&lmnt));
    let info = check(Command::new("xfs_info").arg(&lmnt));
    // "data     =                       bsize=4096   blocks=130560, imaxpct=25"
    let line = info
        .lines()
        .find(|l| l.starts_with("data "))
        .unwrap_or_else(|| panic!("{info}"));
    let field = |k: &str| -> u64 {
        line.split([' ', ','])
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let fs_bytes = field("bsize=") * field("blocks=");
    assert!(
        fs_bytes > 500 * MIB && fs_bytes <= part_bytes,
        "xfs is {fs_bytes} bytes after xfs_growfs, partition {part_bytes}"
    );
    check(Command::new("umount").arg(&lmnt));
    drop(lguard);
    check(Command::new("xfs_repair").arg("-n").arg(&part));
    check(
        Command::new("mount")
            .args(["-o", "loop,ro"])
            .arg(&part)
            .arg(&lmnt),
    );
    let lguard = LoopMount(lmnt.clone());
    assert_eq!(sha256(&lmnt.join("data.bin")), want);
    check(Command::new("umount").arg(&lmnt));
    drop(lguard);
    view.unmount();
}

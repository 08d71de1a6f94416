//! The client against real servers: nbdkit (memory plugin), qemu-nbd (a raw temp file) and
//! tandem's own server in-process, over unix sockets and TCP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_blockdev::{BlockDevice, FileDevice};
use tandem_nbd::{Export, ExportRegistry, Server};
use tandem_nbd_client::{Client, NbdError, NbdUri};

const MIB: u64 = 1 << 20;
const DEADLINE: Duration = Duration::from_secs(30);

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run ./scripts/test once (it installs the test tools)"
    );
}

/// A child process killed on drop.
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects until the server accepts (it has just been started), with a deadline.
fn connect_when_up(uri: &NbdUri, child: &mut Child) -> Client {
    let start = Instant::now();
    loop {
        match Client::connect(uri) {
            Ok(c) => return c,
            Err(NbdError::Connect { .. }) if start.elapsed() < DEADLINE => {
                if let Some(st) = child.try_wait().unwrap() {
                    panic!("the server exited early: {st}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to {uri}: {e}"),
        }
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// Read/write/flush/zero/trim round trip every server must pass.
fn exercise(c: &Client, size: u64) {
    assert_eq!(c.size(), size);
    assert!(!c.read_only());
    // Unaligned write straddling a 4 KiB boundary, read back exactly.
    let data = pattern(7, 10_000);
    c.write(&data, 4000, false).unwrap();
    let mut back = vec![0u8; 10_000];
    c.read(&mut back, 4000).unwrap();
    assert_eq!(back, data);
    // FUA write, flush.
    if c.flags().can_fua() {
        c.write(&pattern(9, 512), 0, true).unwrap();
        let mut b = vec![0u8; 512];
        c.read(&mut b, 0).unwrap();
        assert_eq!(b, pattern(9, 512));
    }
    c.flush().unwrap();
    // A write larger than one request is split and still lands in order.
    let big = pattern(3, (c.max_request() as usize) + 8192);
    if (big.len() as u64) < size {
        c.write(&big, size - big.len() as u64, false).unwrap();
        let mut b = vec![0u8; big.len()];
        c.read(&mut b, size - big.len() as u64).unwrap();
        assert!(b == big, "large split write did not read back");
    }
    // WRITE_ZEROES where advertised.
    if c.flags().can_write_zeroes() {
        c.write_zeroes(4096, 4096, false).unwrap();
        let mut b = vec![1u8; 4096];
        c.read(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // Bytes before the zeroed range are untouched.
        let mut b = vec![0u8; 96];
        c.read(&mut b, 4000).unwrap();
        assert_eq!(&b[..], &data[..96]);
    }
    if c.flags().can_trim() {
        c.trim(0, 4096).unwrap();
    }
    // Out of range is refused locally with a clear error, the connection stays usable.
    let mut b = vec![0u8; 512];
    let e = c.read(&mut b, size - 256).unwrap_err();
    assert!(matches!(e, NbdError::OutOfRange { .. }), "{e}");
    c.read(&mut b, size - 512).unwrap();
}

#[test]
fn nbdkit_memory_over_unix_and_tcp() {
    need("nbdkit");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbdkit.sock");
    let mut child = Proc(
        Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-U"])
            .arg(&sock)
            .args(["memory", "64M"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uri = NbdUri::Unix {
        socket: sock.clone(),
        export: String::new(),
    };
    let c = connect_when_up(&uri, &mut child.0);
    assert!(c.flags().can_flush() && c.flags().can_trim() && c.flags().can_multi_conn());
    exercise(&c, 64 * MIB);

    // A second connection sees the first one's (flushed) writes: multi-conn.
    let c2 = Client::connect_uri(&format!("nbd+unix:///?socket={}", sock.display())).unwrap();
    let mut b = vec![0u8; 100];
    c2.read(&mut b, 8200).unwrap();
    assert_eq!(&b[..], &pattern(7, 10_000)[4200..4300]);
    drop(c);
    drop(c2);
    drop(child);

    // TCP on an ephemeral loopback port chosen by us (nbdkit has no "port 0").
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Proc(
        Command::new("nbdkit")
            .args(["--exit-with-parent", "-f", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(["memory", "8M"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uri = NbdUri::parse(&format!("nbd://127.0.0.1:{port}/")).unwrap();
    let c = connect_when_up(&uri, &mut child.0);
    exercise(&c, 8 * MIB);
}

#[test]
fn qemu_nbd_raw_file_and_unknown_export() {
    need("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let sock = dir.path().join("qemu.sock");
    let mut child = Proc(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-t",
                "-e",
                "4",
                "-x",
                "disk",
                "--cache=none",
                "-k",
            ])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uri = NbdUri::Unix {
        socket: sock.clone(),
        export: "disk".into(),
    };
    let c = connect_when_up(&uri, &mut child.0);
    exercise(&c, 32 * MIB);
    c.flush().unwrap();
    // The data is in the file qemu-nbd serves.
    let file = std::fs::read(&img).unwrap();
    assert_eq!(&file[8192..4000 + 10_000], &pattern(7, 10_000)[4192..]);

    // Asking for an export the server does not have: refused with the server's message.
    let e = Client::connect_unix(&sock, "nope").unwrap_err();
    match &e {
        NbdError::Refused {
            export,
            kind,
            message,
            ..
        } => {
            assert_eq!(export, "nope");
            assert!(kind.contains("NBD_REP_ERR_UNKNOWN"), "{e}");
            assert!(message.contains("nope"), "server message missing: {e}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let text = e.to_string();
    assert!(text.contains("nope") && text.contains("UNKNOWN"), "{text}");
}

#[test]
fn qemu_nbd_read_only_export() {
    need("qemu-nbd");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    std::fs::write(&img, pattern(5, MIB as usize)).unwrap();
    let sock = dir.path().join("qemu-ro.sock");
    let mut child = Proc(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-r", "-x", "ro", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let uri = NbdUri::Unix {
        socket: sock,
        export: "ro".into(),
    };
    let c = connect_when_up(&uri, &mut child.0);
    assert!(c.read_only());
    let mut b = vec![0u8; 4096];
    c.read(&mut b, 8192).unwrap();
    assert_eq!(&b[..], &pattern(5, MIB as usize)[8192..8192 + 4096]);
    assert!(matches!(c.write(&b, 0, false), Err(NbdError::ReadOnly)));
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

/// tandem's server in-process on a sparse temp file, unix socket and TCP.
struct Tandem {
    _dir: tempfile::TempDir,
    file: PathBuf,
    sock: PathBuf,
    port: u16,
    server: Arc<Server>,
    _rt: tokio::runtime::Runtime,
}

impl Tandem {
    fn start(size: u64) -> Tandem {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vol.img");
        let dev = Arc::new(FileDevice::create(&file, size).unwrap());
        let reg = Arc::new(Registry::default());
        reg.0.lock().unwrap().insert(
            "vol".into(),
            Arc::new(Export {
                name: "vol".into(),
                description: "test volume".into(),
                device: dev,
                read_only: false,
                multi_conn: true,
            }),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::with_workers(reg, 2);
        let sock = dir.path().join("nbd.sock");
        let (ul, tl) = rt.block_on(async {
            (
                tokio::net::UnixListener::bind(&sock).unwrap(),
                tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            )
        });
        let port = tl.local_addr().unwrap().port();
        rt.spawn(server.clone().serve_unix(ul));
        rt.spawn(server.clone().serve_tcp(tl));
        Tandem {
            _dir: dir,
            file,
            sock,
            port,
            server,
            _rt: rt,
        }
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

#[test]
fn tandem_server_unix_tcp_errors_and_threads() {
    let t = Tandem::start(64 * MIB);
    let c = Client::connect_uri(&format!("nbd+unix:///vol?socket={}", t.sock.display())).unwrap();
    assert!(c.flags().can_flush() && c.flags().can_fua() && c.flags().can_write_zeroes());
    exercise(&c, 64 * MIB);
    c.flush().unwrap();
    let file = std::fs::read(&t.file).unwrap();
    assert_eq!(&file[8192..4000 + 10_000], &pattern(7, 10_000)[4192..]);

    // TCP sees the same data.
    let ct = Client::connect_uri(&format!("nbd://127.0.0.1:{}/vol", t.port)).unwrap();
    let mut b = vec![0u8; 1000];
    ct.read(&mut b, 8200).unwrap();
    assert_eq!(&b[..], &pattern(7, 10_000)[4200..5200]);

    // Unknown export: tandem's refusal and its message.
    let e = Client::connect_unix(&t.sock, "missing").unwrap_err();
    assert!(
        matches!(&e, NbdError::Refused { kind, .. } if kind.contains("UNKNOWN")),
        "{e}"
    );
    assert!(e.to_string().contains("missing"), "{e}");

    // Many threads share one client: every thread's data reads back.
    let c = Arc::new(c);
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let c = c.clone();
            std::thread::spawn(move || {
                let off = (i as u64 + 1) * MIB;
                for round in 0..20u8 {
                    let data = pattern(i ^ round, 65536);
                    c.write(&data, off, false).unwrap();
                    let mut back = vec![0u8; 65536];
                    c.read(&mut back, off).unwrap();
                    assert!(back == data, "thread {i} round {round}: data mismatch");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(c);
    // After DISC the server has no connection left open (it counts them).
    let start = Instant::now();
    while t.server.connections("vol") > 1 {
        assert!(
            start.elapsed() < DEADLINE,
            "server still counts connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(ct);
    while t.server.connections("vol") > 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "server still counts connections"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn grow_probe_runs_over_nbd() {
    need("sgdisk");
    let t = Tandem::start(64 * MIB);
    // A GPT with two partitions written by sgdisk straight into the exported file.
    let st = Command::new("sgdisk")
        .args(["-n", "1:2048:+8M", "-n", "2:0:0"])
        .arg(&t.file)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let c = Client::connect_unix(&t.sock, "vol").unwrap();
    let probe = tandem_grow::probe(&c as &dyn BlockDevice).unwrap();
    let tandem_grow::Table::Gpt(g) = probe.table else {
        panic!("expected GPT, got {:?}", probe.table)
    };
    assert_eq!(g.partitions.len(), 2);
    assert_eq!(g.partitions[0].first_lba, 2048);
    assert_eq!(g.partitions[0].last_lba, 2048 + 8 * 2048 - 1);
    assert!(g.backup_header_valid);
}

#[test]
fn reconnects_after_the_server_drops_the_connection() {
    let t = Tandem::start(16 * MIB);
    let plain = Client::connect_unix(&t.sock, "vol").unwrap();
    let c = Client::connect_unix(&t.sock, "vol")
        .unwrap()
        .with_reconnect(Duration::from_secs(20));
    let data = pattern(21, 65536);
    c.write(&data, MIB, false).unwrap();

    // The server closes every connection of the export (as an agent restart would).
    t.server.disconnect_export("vol");
    let start = Instant::now();
    while t.server.connections("vol") > 0 {
        assert!(start.elapsed() < DEADLINE, "connections not closed");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Without reconnecting: the first request fails, later ones say why the connection is gone.
    let mut b = vec![0u8; 4096];
    let e = plain.read(&mut b, 0).unwrap_err();
    assert!(matches!(e, NbdError::Io(_)), "{e}");
    let e = plain.read(&mut b, 0).unwrap_err();
    assert!(matches!(e, NbdError::Broken(_)), "{e}");

    // With reconnecting: the request is resent on a new connection, data intact.
    let mut back = vec![0u8; data.len()];
    c.read(&mut back, MIB).unwrap();
    assert!(back == data, "data read after reconnect differs");
    c.write(&pattern(22, 4096), 0, true).unwrap();
    c.flush().unwrap();
    assert_eq!(t.server.connections("vol"), 1);

    // A server that stays away: the request fails once the window has passed.
    let c = c.with_reconnect(Duration::from_millis(300));
    t.server.shutdown();
    let start = Instant::now();
    loop {
        match c.read(&mut b, 0) {
            Ok(()) => {
                assert!(start.elapsed() < DEADLINE, "server still answering");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(NbdError::Broken(why)) => {
                assert!(why.contains("reconnecting"), "{why}");
                break;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
}

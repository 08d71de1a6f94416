//! Test harness: the NBD server in-process on sparse temp files, real clients as subprocesses.
#![allow(dead_code)]

pub mod raw;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_blockdev::{BlockDevice, FileDevice};
use tandem_nbd::{Export, ExportRegistry, Server};
use wait_timeout::ChildExt;

pub const MIB: u64 = 1 << 20;
/// Deadline for any one client process or awaited condition.
pub const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Default)]
pub struct Registry {
    exports: Mutex<HashMap<String, Arc<Export>>>,
}

impl Registry {
    pub fn add(&self, e: Export) {
        self.exports
            .lock()
            .unwrap()
            .insert(e.name.clone(), Arc::new(e));
    }
}

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.exports.lock().unwrap().get(name).cloned()
    }
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exports.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
}

/// A running server with two exports: `disk` (read-write, multi-conn) and `ro` (read-only),
/// both sparse files of `size` bytes, on a unix socket and on TCP 127.0.0.1.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub server: Arc<Server>,
    pub disk: Arc<FileDevice>,
    pub ro: Arc<FileDevice>,
    pub sock: PathBuf,
    pub port: u16,
    pub size: u64,
    /// More exports can be added while the server runs.
    pub registry: Arc<Registry>,
    unix_task: tokio::task::JoinHandle<std::io::Result<()>>,
    tcp_task: tokio::task::JoinHandle<std::io::Result<()>>,
    // Last, so the server tasks are gone before the temp dir.
    rt: tokio::runtime::Runtime,
}

impl Harness {
    pub fn start(size: u64) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let disk = Arc::new(FileDevice::create(&dir.path().join("disk.img"), size).unwrap());
        let ro = Arc::new(FileDevice::create(&dir.path().join("ro.img"), size).unwrap());
        // Known content in the read-only export.
        ro.write_at(&vec![0x42u8; 65536], 0).unwrap();
        let registry = Arc::new(Registry::default());
        registry.add(Export {
            name: "disk".into(),
            description: "test disk".into(),
            device: disk.clone(),
            read_only: false,
            multi_conn: true,
        });
        registry.add(Export {
            name: "ro".into(),
            description: "read-only test disk".into(),
            device: ro.clone(),
            read_only: true,
            multi_conn: false,
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = Server::new(registry.clone());
        let sock = dir.path().join("nbd.sock");
        let (unix_task, tcp_task, port) = rt.block_on(async {
            let ul = tokio::net::UnixListener::bind(&sock).unwrap();
            let tl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = tl.local_addr().unwrap().port();
            (
                tokio::spawn(server.clone().serve_unix(ul)),
                tokio::spawn(server.clone().serve_tcp(tl)),
                port,
            )
        });
        Harness {
            dir,
            server,
            disk,
            ro,
            sock,
            port,
            size,
            registry,
            unix_task,
            tcp_task,
            rt,
        }
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Both accept loops are still running.
    pub fn alive(&self) -> bool {
        !self.unix_task.is_finished() && !self.tcp_task.is_finished()
    }

    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        wait_for(what, &mut cond)
    }

    /// Extents of the `disk` file as (length, hole) after merging.
    pub fn disk_is_hole(&self, offset: u64, len: u64) -> bool {
        let st = self.disk.block_status(offset, len).unwrap();
        st.iter().all(|e| e.hole) && st.iter().map(|e| e.length).sum::<u64>() == len
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Polls `cond` until it holds, failing the test after [`TIMEOUT`].
pub fn wait_for(what: &str, cond: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn on_path(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// A command for a client tool; fails the test if the tool is missing.
pub fn tool(name: &str) -> Command {
    assert!(
        on_path(name),
        "{name} is not installed; ./scripts/test installs the NBD test clients \
         (libnbd-bin, python3-libnbd, qemu-utils, fio)"
    );
    let mut c = Command::new(name);
    // Python-based tools (nbdsh) must find the system python that has python3-libnbd, not a
    // python from a version manager earlier on PATH.
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"));
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent;
    // it makes the kernel kill the client if the test process dies, so no client outlives us.
    unsafe {
        c.pre_exec(|| {
            libc_prctl_pdeathsig();
            Ok(())
        });
    }
    c
}

fn libc_prctl_pdeathsig() {
    // SAFETY: plain syscall with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
}

/// The system python with python3-libnbd (not whatever python3 is first on PATH).
pub fn python() -> Command {
    let mut c = tool("/usr/bin/python3");
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3-libnbd is not installed; ./scripts/test installs it"
    );
    c.arg("-c");
    c
}

/// Kills the child when dropped (test failure or timeout).
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion (killed after [`TIMEOUT`]).
pub fn output(cmd: &mut Command) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut g = ChildGuard(child);
    let mut out = g.0.stdout.take().unwrap();
    let mut err = g.0.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = match g.0.wait_timeout(TIMEOUT).unwrap() {
        Some(s) => s,
        None => panic!("{desc} did not finish within {TIMEOUT:?}"),
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let o = output(cmd);
    assert!(
        o.status.success(),
        "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        o.stdout,
        o.stderr
    );
    o.stdout
}

/// `qemu-io` commands against an NBD URI; asserts success and no verification failure.
pub fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = run(&mut c);
    assert!(
        !out.contains("fail") && !out.contains("error") && !out.contains("Error"),
        "qemu-io reported a problem:\n{out}"
    );
    out
}

/// A well-behaved libnbd client that connects, then waits for the test to let it write, flush
/// and read back 64 KiB at `offset`. Used to prove other clients keep being served.
pub struct Witness {
    child: ChildGuard,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    offset: u64,
}

const WITNESS: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
off = int(sys.argv[2])
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() != "go":
        break
    buf = bytes([(off >> 16) & 0xff]) * 65536
    h.pwrite(buf, off)
    h.flush()
    assert h.pread(65536, off) == buf
    print("OK", flush=True)
h.shutdown()
"#;

impl Witness {
    pub fn connect(uri: &str, offset: u64) -> Witness {
        let mut c = python();
        c.args([WITNESS, uri, &offset.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = ChildGuard(c.spawn().unwrap());
        let stdin = child.0.stdin.take().unwrap();
        let stdout = child.0.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut w = Witness {
            child,
            stdin,
            lines: rx,
            offset,
        };
        w.expect("READY");
        w
    }

    fn expect(&mut self, what: &str) {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(l) if l == what => {}
            other => panic!("witness client: expected {what}, got {other:?}"),
        }
    }

    /// One write/flush/read round trip on the already open connection.
    pub fn round_trip(&mut self) {
        writeln!(self.stdin, "go").unwrap();
        self.stdin.flush().unwrap();
        self.expect("OK");
    }

    pub fn finish(mut self) {
        self.round_trip();
        writeln!(self.stdin, "stop").unwrap();
        self.stdin.flush().unwrap();
        let status = self.child.0.wait_timeout(TIMEOUT).unwrap().expect("exit");
        assert!(status.success(), "witness exited with {status}");
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn sha256(path: &Path) -> String {
    let out = run(tool("sha256sum").arg(path));
    out.split_whitespace().next().unwrap().to_string()
}

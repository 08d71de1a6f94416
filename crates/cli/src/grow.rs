//! `tandem volume grow NAME SIZE [--plan]` and `tandem volume grow NAME --undo`: one checked
//! command through every layer of a volume (see `docs/grow.md`):
//!
//! 1. preflight (controller state: replicas UpToDate and connected, at most one Primary, no
//!    consumer, pool space; the filesystem checked clean on a read-only FUSE view);
//! 2. block layer: `POST /v1/volumes/{name}/resize` (done already when the volume is at least
//!    the target size);
//! 3. partition table: `tandem_grow::apply` over an NBD connection to the volume, after the
//!    undo record is in the controller's grow journal;
//! 4. filesystem: ext2/3/4 with `e2fsck -f -y -C 0` then `resize2fs` on the partition file of a
//!    FUSE view; xfs with `xfs_growfs` on a temporary loop mount of that file.
//!
//! The journal (`/v1/volumes/{name}/grow`) is written before the table changes and updated
//! after every step: re-running the command resumes, `--undo` puts the old table back.
//! `TANDEM_GROW_FAIL_AFTER=journal|block|partition-write|partition|fsck` stops the command with
//! SIGKILL after that step (`partition-write`: after the first region of the table was written
//! and flushed, in the middle of the apply), as a crash would (for the tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::{Value, json};
use tandem_api::{ConnectInfo, DiskState, GrowJournal, Node, NodeState, Pool, Role, Volume};
use tandem_grow::{ApplyOutcome, Filesystem, Plan, UndoRecord};
use tandem_nbd_client::Client as NbdClient;
use tandem_types::{format_size, parse_size};

use crate::client::{Client, ClientError};

const SECTOR: u64 = 512;
/// How long I/O waits for the export to come back when the connection broke.
const RECONNECT: Duration = Duration::from_secs(60);
/// Agents report their consumer connections with every sync (at most 5 s apart): a count
/// seen once may be stale (a client that just left, e.g. the previous grow's own view).
const CONSUMER_SETTLE: Duration = Duration::from_secs(8);
/// The last partition grows even when it holds no filesystem tandem knows (LVM PV, swap...):
/// the grow then stops after the partition step and says so.
const PLAN_OPTIONS: tandem_grow::PlanOptions = tandem_grow::PlanOptions {
    grow_unknown_filesystem: true,
};
/// Environment variable of the fault injection (tests).
pub const FAIL_AFTER_ENV: &str = "TANDEM_GROW_FAIL_AFTER";

fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `N B (X MiB) = S sectors`.
fn sz(bytes: u64) -> String {
    format!("{} = {} sectors", format_size(bytes), bytes / SECTOR)
}

/// Stops the process as a crash would, when the fault injection names `step`.
fn fail_point(step: &str) {
    if std::env::var(FAIL_AFTER_ENV).ok().as_deref() == Some(step) {
        eprintln!("{FAIL_AFTER_ENV}={step}: stopping after this step as a crash would (SIGKILL)");
        // SAFETY: signalling this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

fn now_unix() -> u64 {
    crate::now_unix()
}

// ----- interruption: Ctrl-C / SIGTERM / SIGHUP --------------------------------------------------

/// Temporary mounts of this process (FUSE views and loop mounts), unmounted by the signal
/// thread when the command is interrupted.
static MOUNTS: std::sync::Mutex<Vec<(PathBuf, bool)>> = std::sync::Mutex::new(Vec::new());
/// The external tool running now (0: none), sent SIGTERM on interruption.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Set once a signal arrived: the main thread stops at its next tool or step and waits for
/// the signal thread to clean up and exit.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Parks the calling thread for good when the command was interrupted (the signal thread
/// exits the process).
fn stop_if_interrupted() {
    while INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Write end of the self-pipe the signal handler writes to.
static SIG_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIG_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    let b = sig as u8;
    // SAFETY: write(2) is async-signal-safe; fd is the pipe's write end (or -1: EBADF).
    unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
}

fn register_mount(dir: &Path, fuse: bool) {
    if let Ok(mut m) = MOUNTS.lock() {
        m.push((dir.to_path_buf(), fuse));
    }
}

fn unregister_mount(dir: &Path) {
    if let Ok(mut m) = MOUNTS.lock() {
        m.retain(|(d, _)| d != dir);
    }
}

/// Installs handlers for SIGINT, SIGTERM and SIGHUP: the running tool gets SIGTERM, the
/// temporary mounts are removed (innermost first), then the process exits with 130. Handlers
/// (unlike blocked masks) are reset in the tools this command starts.
fn handle_interruption() {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    SIG_PIPE.store(fds[1], std::sync::atomic::Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: installing a handler that only calls write(2).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let rd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reading one byte into a valid buffer from our pipe.
        while unsafe { libc::read(rd, (&mut b as *mut u8).cast(), 1) } != 1 {}
        INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
        eprintln!(
            "interrupted (signal {b}): stopping the running tool and removing temporary mounts"
        );
        let child = CHILD.load(std::sync::atomic::Ordering::SeqCst);
        if child > 0 {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while CHILD.load(std::sync::atomic::Ordering::SeqCst) == child
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mounts: Vec<(PathBuf, bool)> = MOUNTS.lock().map(|m| m.clone()).unwrap_or_default();
        for (dir, fuse) in mounts.iter().rev() {
            if *fuse {
                let _ = tandem_fuse::unmount(dir);
            } else {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
            let _ = std::fs::remove_dir(dir);
        }
        eprintln!(
            "the grow journal in the controller says which steps are done: `tandem volume show` shows it; re-run the grow to resume or use --undo"
        );
        std::process::exit(130);
    });
}

/// Runs `cmd` to its end, registered as the running tool.
fn status_of(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    let mut child = cmd.spawn()?;
    CHILD.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let st = child.wait();
    CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
    stop_if_interrupted();
    st
}

/// Like [`status_of`], capturing stdout and stderr.
fn output_of(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = cmd.spawn()?;
    CHILD.store(child.id() as i32, std::sync::atomic::Ordering::SeqCst);
    let out = child.wait_with_output();
    CHILD.store(0, std::sync::atomic::Ordering::SeqCst);
    stop_if_interrupted();
    out
}

/// The volume as the partition step writes it; with the fault injection
/// `partition-write` the process is killed after the first flushed write (the middle of an
/// apply: one region written, the others not).
struct TableDevice {
    inner: NbdClient,
    crash_after_first_write: bool,
    written: std::sync::atomic::AtomicBool,
}

impl TableDevice {
    fn new(inner: NbdClient) -> Self {
        TableDevice {
            inner,
            crash_after_first_write: std::env::var(FAIL_AFTER_ENV).ok().as_deref()
                == Some("partition-write"),
            written: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl tandem_blockdev::BlockDevice for TableDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_blockdev::Result<()> {
        tandem_blockdev::BlockDevice::read_at(&self.inner, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_blockdev::Result<()> {
        tandem_blockdev::BlockDevice::write_at(&self.inner, buf, offset)?;
        self.written
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> tandem_blockdev::Result<()> {
        tandem_blockdev::BlockDevice::flush(&self.inner)?;
        if self.crash_after_first_write && self.written.load(std::sync::atomic::Ordering::SeqCst) {
            fail_point("partition-write");
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> tandem_blockdev::Result<()> {
        tandem_blockdev::BlockDevice::trim(&self.inner, offset, len)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_deallocate: bool,
    ) -> tandem_blockdev::Result<()> {
        tandem_blockdev::BlockDevice::write_zeroes(&self.inner, offset, len, may_deallocate)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> tandem_blockdev::Result<Vec<tandem_blockdev::Extent>> {
        tandem_blockdev::BlockDevice::block_status(&self.inner, offset, len)
    }
}

// ----- controller calls ----------------------------------------------------------------------

fn volume_path(name: &str) -> String {
    format!("/v1/volumes/{}", seg(name))
}

fn get_journal(client: &Client, name: &str) -> Result<Option<GrowJournal>> {
    match client.get::<GrowJournal>(&format!("{}/grow", volume_path(name))) {
        Ok(j) => Ok(Some(j)),
        Err(ClientError::Api { status: 404, error }) if error.code == "no_grow" => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn put_journal(client: &Client, j: &mut GrowJournal) -> Result<()> {
    j.updated_unix = now_unix();
    let _: GrowJournal = client
        .put(&format!("{}/grow", volume_path(&j.volume)), j)
        .context("writing the grow journal to the controller")?;
    Ok(())
}

fn delete_journal(client: &Client, name: &str) -> Result<()> {
    let () = client
        .delete(&format!("{}/grow", volume_path(name)))
        .context("removing the grow journal from the controller")?;
    Ok(())
}

/// The grow journal of a volume, for `volume show` (`None` also when the controller has no
/// grow endpoint).
pub fn journal_for_show(client: &Client, name: &str) -> Option<GrowJournal> {
    get_journal(client, name).ok().flatten()
}

/// Lines `volume show` prints for a grow journal left behind.
pub fn journal_text(j: &GrowJournal) -> String {
    let mut s = format!(
        "\nGrow in progress (journal in the controller): to {} from {}, started {}s ago\n  done: {}\n  not done: {}\n",
        format_size(j.target_bytes),
        format_size(j.start_bytes),
        now_unix().saturating_sub(j.started_unix),
        if j.steps_done.is_empty() {
            "nothing".to_string()
        } else {
            j.steps_done.join(", ")
        },
        not_done(j).join(", "),
    );
    if let Some(e) = &j.last_error {
        s.push_str(&format!("  last error: {e}\n"));
    }
    s.push_str(&format!(
        "  `tandem volume grow {} {}` resumes it, `tandem volume grow {} --undo` puts the old partition table back{}\n",
        j.volume,
        j.target_bytes,
        j.volume,
        if j.undo.is_some() {
            ""
        } else {
            " (not changed yet)"
        }
    ));
    s
}

const STEPS: [&str; 4] = ["block", "partition", "fsck", "filesystem"];

fn not_done(j: &GrowJournal) -> Vec<String> {
    STEPS
        .iter()
        .filter(|s| !j.steps_done.iter().any(|d| d == *s))
        .map(|s| s.to_string())
        .collect()
}

fn layer_name(step: &str) -> &str {
    match step {
        "block" => "block layer",
        "partition" => "partition table",
        "fsck" => "filesystem check (e2fsck -f)",
        "filesystem" => "filesystem resize",
        other => other,
    }
}

fn layers_status(j: &GrowJournal) -> String {
    let done: Vec<&str> = j.steps_done.iter().map(|s| layer_name(s)).collect();
    let todo: Vec<String> = not_done(j)
        .iter()
        .map(|s| layer_name(s).to_string())
        .collect();
    format!(
        "done: {}; not done: {}",
        if done.is_empty() {
            "nothing".to_string()
        } else {
            done.join(", ")
        },
        if todo.is_empty() {
            "nothing".to_string()
        } else {
            todo.join(", ")
        }
    )
}

fn connect_info(client: &Client, name: &str) -> Result<ConnectInfo> {
    Ok(client.get(&format!("{}/connect", volume_path(name)))?)
}

fn nbd_connect(info: &ConnectInfo, name: &str) -> Result<NbdClient> {
    Ok(NbdClient::connect_uri(&info.uri)
        .with_context(|| format!("connecting to the export of volume '{name}' ({})", info.uri))?
        .with_reconnect(RECONNECT))
}

// ----- preflight -----------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
}

fn check(check: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        check,
        ok,
        detail: detail.into(),
    }
}

/// Checks of the controller's state. `consumers` is checked with a settle time (see
/// [`CONSUMER_SETTLE`]).
fn state_checks(client: &Client, v: &Volume, target: u64) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    out.push(check(
        "volume ready",
        v.state == tandem_api::VolumeState::Ready,
        format!("state {:?}", v.state).to_lowercase(),
    ));
    let nodes: Vec<Node> = client.get("/v1/nodes")?;
    let offline: Vec<String> = v
        .replicas
        .iter()
        .filter(|r| {
            nodes
                .iter()
                .find(|n| n.name == r.node)
                .is_none_or(|n| n.state != NodeState::Online)
        })
        .map(|r| r.node.clone())
        .collect();
    let mut bad_disk = Vec::new();
    for r in &v.replicas {
        let want = if r.diskless {
            DiskState::Diskless
        } else {
            DiskState::UpToDate
        };
        if r.disk_state != want || r.out_of_sync_bytes != 0 {
            bad_disk.push(format!(
                "{} is {:?}{}",
                r.node,
                r.disk_state,
                if r.out_of_sync_bytes != 0 {
                    format!(" with {} out of sync", format_size(r.out_of_sync_bytes))
                } else {
                    String::new()
                }
            ));
        }
    }
    out.push(check(
        "replicas UpToDate",
        bad_disk.is_empty(),
        if bad_disk.is_empty() {
            format!(
                "{} replica(s): {}",
                v.replicas.len(),
                v.replicas
                    .iter()
                    .map(|r| format!("{} {:?}", r.node, r.disk_state))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            bad_disk.join("; ")
        },
    ));
    let mut unconnected: Vec<String> = offline
        .iter()
        .map(|n| format!("node {n} is offline"))
        .collect();
    if v.replicas.len() > 1 {
        for r in &v.replicas {
            if r.peers.is_empty() {
                unconnected.push(format!("{} reports no replication peers yet", r.node));
            }
            for p in &r.peers {
                if p.repl_state != "Established" {
                    unconnected.push(format!("{} -> {}: {}", r.node, p.node, p.repl_state));
                }
            }
        }
    }
    out.push(check(
        "replicas connected",
        unconnected.is_empty(),
        if unconnected.is_empty() {
            if v.replicas.len() > 1 {
                "every replication link Established".to_string()
            } else {
                "one replica, its node online".to_string()
            }
        } else {
            unconnected.join("; ")
        },
    ));
    let primaries: Vec<&str> = v
        .replicas
        .iter()
        .filter(|r| r.role == Role::Primary)
        .map(|r| r.node.as_str())
        .collect();
    out.push(check(
        "at most one Primary",
        primaries.len() <= 1,
        if primaries.is_empty() {
            "no Primary".to_string()
        } else {
            format!("Primary: {}", primaries.join(", "))
        },
    ));
    let grow_by = target.saturating_sub(v.size_bytes);
    if grow_by > 0 {
        let pools: Vec<Pool> = client.get("/v1/pools")?;
        let mut short = Vec::new();
        let mut fine = Vec::new();
        for r in v.replicas.iter().filter(|r| !r.diskless) {
            match pools.iter().find(|p| p.node == r.node && p.name == r.pool) {
                Some(p) if p.free_bytes >= grow_by => fine.push(format!(
                    "{}:{} {} free",
                    r.node,
                    r.pool,
                    format_size(p.free_bytes)
                )),
                Some(p) => short.push(format!(
                    "{}:{} has {} free, the grow needs {}",
                    r.node,
                    r.pool,
                    format_size(p.free_bytes),
                    format_size(grow_by)
                )),
                None => short.push(format!("{}:{} is not reported", r.node, r.pool)),
            }
        }
        out.push(check(
            "pool space",
            short.is_empty(),
            if short.is_empty() {
                format!("+{} on {}", format_size(grow_by), fine.join(", "))
            } else {
                short.join("; ")
            },
        ));
    } else {
        out.push(check(
            "pool space",
            true,
            "the block layer is already large enough: nothing to allocate",
        ));
    }
    Ok(out)
}

/// Consumers connected to the volume's exports: waits up to [`CONSUMER_SETTLE`] for a count
/// to drop to 0 (reports lag), then names every node that still has some.
fn consumer_check(client: &Client, name: &str) -> Result<Check> {
    let deadline = Instant::now() + CONSUMER_SETTLE;
    loop {
        let v: Volume = client.get(&volume_path(name))?;
        let held: Vec<String> = v
            .replicas
            .iter()
            .filter(|r| r.connections > 0)
            .map(|r| {
                format!(
                    "node {} has {} consumer connection(s) to the export of '{name}'{}{}",
                    r.node,
                    r.connections,
                    if r.role == Role::Primary {
                        " (Primary)"
                    } else {
                        ""
                    },
                    if r.clients.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", r.clients.join(", "))
                    }
                )
            })
            .collect();
        if held.is_empty() {
            return Ok(check(
                "no consumers",
                true,
                "no client has the volume open (the filesystem step is offline)",
            ));
        }
        if Instant::now() >= deadline {
            return Ok(check(
                "no consumers",
                false,
                format!(
                    "{}; the filesystem step is offline: stop the VM or client using it (or unmount `tandem volume mount`), then grow",
                    held.join("; ")
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ----- FUSE view -------------------------------------------------------------------------------

/// A FUSE view of the volume mounted on a temporary directory, served by a thread; unmounted
/// and removed on drop (also on errors).
struct View {
    dir: Option<tempfile::TempDir>,
    server: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    files: Vec<tandem_fuse::FileEntry>,
}

impl View {
    fn mount(info: &ConnectInfo, name: &str, read_only: bool) -> Result<View> {
        let nbd = nbd_connect(info, name)?;
        let dir = tempfile::Builder::new()
            .prefix("tandem-grow-")
            .tempdir_in(std::env::temp_dir())
            .context("creating a temporary directory for the FUSE view")?;
        let mounted = tandem_fuse::mount(
            nbd,
            name,
            dir.path(),
            &tandem_fuse::Options {
                read_only,
                fsname: Some(format!("tandem-grow:{name}")),
            },
        )
        .with_context(|| format!("mounting the FUSE view of '{name}'"))?;
        let files = mounted.layout().files.clone();
        register_mount(dir.path(), true);
        let server = std::thread::spawn(move || mounted.run());
        Ok(View {
            dir: Some(dir),
            server: Some(server),
            files,
        })
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/"))
    }

    /// The file of the range at `offset` (a partition, or the whole volume at 0).
    fn file_at(&self, partition: Option<u32>, offset: u64) -> Result<(PathBuf, u64)> {
        let f = self
            .files
            .iter()
            .find(|f| f.partition == partition && f.offset_bytes == offset)
            .ok_or_else(|| {
                anyhow!(
                    "the FUSE view shows no file for {} at byte offset {offset}",
                    match partition {
                        Some(n) => format!("partition {n}"),
                        None => "the whole volume".to_string(),
                    }
                )
            })?;
        Ok((self.dir().join(&f.name), f.size_bytes))
    }

    fn close(&mut self) -> Result<()> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let r = tandem_fuse::unmount(dir.path());
        unregister_mount(dir.path());
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
        // TempDir removes the (now empty) directory.
        drop(dir);
        r.map(|_| ()).map_err(Into::into)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            eprintln!("warning: cleaning up the FUSE view: {e:#}");
        }
    }
}

/// A loop mount of a file on a temporary directory, unmounted on drop.
struct LoopMount {
    dir: Option<tempfile::TempDir>,
}

impl LoopMount {
    fn mount(file: &Path) -> Result<LoopMount> {
        let dir = tempfile::Builder::new()
            .prefix("tandem-grow-xfs-")
            .tempdir_in(std::env::temp_dir())?;
        run_tool(
            Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(file)
                .arg(dir.path()),
            "mount -o loop",
            false,
        )?;
        register_mount(dir.path(), false);
        Ok(LoopMount { dir: Some(dir) })
    }
    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/"))
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            unregister_mount(dir.path());
            let st = Command::new("umount").arg(dir.path()).status();
            if !st.is_ok_and(|s| s.success()) {
                eprintln!(
                    "warning: umount {} failed; detaching it lazily",
                    dir.path().display()
                );
                let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
            }
        }
    }
}

/// Runs a tool. `show` = its output goes to the terminal (stderr in JSON mode), else it is
/// captured and quoted in the error. Returns (exit code, captured output).
fn run_tool(cmd: &mut Command, what: &str, show: bool) -> Result<(i32, String)> {
    cmd.stdin(Stdio::null());
    if show {
        cmd.stdout(std::io::stderr()).stderr(Stdio::inherit());
        let st = status_of(cmd).with_context(|| format!("starting {what} (is it installed?)"))?;
        let code = st.code().unwrap_or(-1);
        if code != 0 && what != "e2fsck" {
            bail!("{what} failed ({st})");
        }
        Ok((code, String::new()))
    } else {
        let out = output_of(cmd).with_context(|| format!("starting {what} (is it installed?)"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let code = out.status.code().unwrap_or(-1);
        if code != 0 && what != "e2fsck -fn" {
            bail!("{what} failed ({}): {}", out.status, tail(&text));
        }
        Ok((code, text))
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// The filesystem checked on a read-only view, changing nothing.
fn fs_check(info: &ConnectInfo, name: &str, plan: &Plan) -> Result<(Check, f64)> {
    let started = Instant::now();
    let fs = &plan.target.filesystem;
    let kind = match fs {
        Filesystem::Ext { .. } => "ext",
        Filesystem::Xfs { .. } => "xfs",
        Filesystem::Unknown { .. } => {
            return Ok((
                check("filesystem clean", true, "no known filesystem: not checked"),
                0.0,
            ));
        }
    };
    let mut view = View::mount(info, name, true)?;
    let (file, _) = view.file_at(plan.target.partition, plan.target.offset_bytes)?;
    let c = if kind == "ext" {
        let (code, text) = run_tool(
            Command::new("e2fsck").arg("-fn").arg(&file),
            "e2fsck -fn",
            false,
        )?;
        if code == 0 {
            check(
                "filesystem clean",
                true,
                format!("e2fsck -fn: clean ({})", fs.name()),
            )
        } else {
            check(
                "filesystem clean",
                false,
                format!(
                    "e2fsck -fn exited {code}: the {} needs repair first (`tandem volume mount` and `e2fsck -f` on the partition file):\n{}",
                    fs.name(),
                    tail(&text)
                ),
            )
        }
    } else {
        let out = output_of(
            Command::new("xfs_repair")
                .args(["-n", "-f"])
                .arg(&file)
                .stdin(Stdio::null()),
        )
        .context("starting xfs_repair (is xfsprogs installed?)")?;
        if out.status.success() {
            check("filesystem clean", true, "xfs_repair -n: clean")
        } else {
            check(
                "filesystem clean",
                false,
                format!(
                    "xfs_repair -n exited {}: the xfs needs repair first:\n{}",
                    out.status,
                    tail(&format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ))
                ),
            )
        }
    };
    view.close()?;
    Ok((c, started.elapsed().as_secs_f64()))
}

// ----- the command -----------------------------------------------------------------------------

pub fn run(
    client: &Client,
    json: bool,
    name: &str,
    size: Option<&str>,
    plan_only: bool,
    undo: bool,
    timeout: u64,
) -> Result<()> {
    // The NBD socket may close under us (agent restart): see EPIPE, do not die of SIGPIPE.
    // SAFETY: changing one signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    handle_interruption();
    if undo {
        if size.is_some() || plan_only {
            bail!("--undo takes only the volume name");
        }
        return run_undo(client, json, name);
    }
    let Some(size) = size else {
        bail!("give the size to grow to, e.g. `tandem volume grow {name} 20GiB` (or --undo)");
    };
    let target = parse_size(size).with_context(|| format!("invalid size '{size}'"))?;
    if target % SECTOR != 0 {
        bail!(
            "the size must be a multiple of 512 bytes: {} is not",
            format_size(target)
        );
    }
    let started = Instant::now();
    let v: Volume = client.get(&volume_path(name))?;
    let journal = get_journal(client, name)?;
    if let Some(j) = &journal
        && j.target_bytes != target
    {
        bail!(
            "volume {name} has an unfinished grow to {} ({}): re-run `tandem volume grow {name} {}` to finish it, or `tandem volume grow {name} --undo`",
            format_size(j.target_bytes),
            layers_status(j),
            j.target_bytes
        );
    }
    if target < v.size_bytes {
        bail!(
            "refusing to shrink: volume {name} is {}, the target {} is smaller",
            format_size(v.size_bytes),
            format_size(target)
        );
    }

    // Preflight: the controller's view first, before this command opens any connection.
    let mut checks = state_checks(client, &v, target)?;
    checks.push(consumer_check(client, name)?);
    let resize_needed = v.size_bytes < target;
    if resize_needed {
        let has = resize_endpoint(client);
        checks.push(check(
            "block layer can grow",
            has,
            if has {
                format!(
                    "volume {} -> {} via POST /v1/volumes/{name}/resize",
                    format_size(v.size_bytes),
                    format_size(target)
                )
            } else {
                format!(
                    "the volume is {} and must become {}, but this controller has no volume resize (POST /v1/volumes/{{name}}/resize): the block layer cannot grow yet",
                    format_size(v.size_bytes),
                    format_size(target)
                )
            },
        ));
    }
    let info = connect_info(client, name)?;
    let nbd = nbd_connect(&info, name)?;
    let plan = tandem_grow::plan_with(&nbd, target, PLAN_OPTIONS)
        .map_err(|e| anyhow!("volume {name} cannot grow (nothing was changed): {e}"))?;
    drop(nbd);
    let mut fs_check_secs = 0.0;
    let resuming = journal.is_some();
    if resuming {
        checks.push(check(
            "filesystem clean",
            true,
            "resuming a grow: the filesystem step runs e2fsck -f / xfs_growfs itself",
        ));
    } else if checks.iter().all(|c| c.ok) || plan_only {
        let (c, secs) = fs_check(&info, name, &plan)?;
        fs_check_secs = secs;
        checks.push(c);
    }
    if plan_only {
        return print_plan(json, name, &v, target, &plan, &checks, journal.as_ref());
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    if !failed.is_empty() {
        bail!(
            "volume {name} cannot grow (nothing was changed):\n{}",
            failed
                .iter()
                .map(|c| format!("  {}: {}", c.check, c.detail))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    let mut j = journal.unwrap_or_else(|| GrowJournal {
        volume: name.to_string(),
        volume_uuid: v.uuid.clone(),
        target_bytes: target,
        start_bytes: v.size_bytes,
        table: plan.table.clone(),
        partition: plan.target.partition,
        fs_offset_bytes: plan.target.offset_bytes,
        filesystem: plan.target.filesystem.name().to_string(),
        old_partition_bytes: plan.target.old_bytes,
        steps_done: Vec::new(),
        undo: None,
        last_error: None,
        started_unix: now_unix(),
        updated_unix: now_unix(),
    });
    if resuming && !json {
        println!(
            "Resuming the grow of volume {name} to {} ({}).",
            format_size(target),
            layers_status(&j)
        );
    }
    j.last_error = None;
    put_journal(client, &mut j)?;
    fail_point("journal");

    let mut report = GrowReport {
        volume: name.to_string(),
        target_bytes: target,
        target_sectors: target / SECTOR,
        table: plan.table.clone(),
        partition: plan.target.partition,
        filesystem: plan.target.filesystem.name().to_string(),
        filesystem_old_bytes: plan.target.filesystem.size_bytes().unwrap_or(0),
        filesystem_new_bytes: 0,
        steps: Vec::new(),
        fs_check_secs,
        fsck_secs: 0.0,
        resize_secs: 0.0,
        total_secs: 0.0,
    };
    let result = execute(client, json, name, &info, &v, &mut j, &mut report, timeout);
    match result {
        Ok(()) => {
            report.total_secs = started.elapsed().as_secs_f64();
            delete_journal(client, name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        Err(e) => {
            let msg = format!("{e:#}");
            j.last_error = Some(msg.clone());
            let saved = put_journal(client, &mut j);
            bail!(
                "growing volume {name} to {} failed: {msg}\n{}.\nThe grow journal {}: re-run `tandem volume grow {name} {target}` to resume, or `tandem volume grow {name} --undo` to put the old partition table back{}.",
                format_size(target),
                layers_status(&j),
                match saved {
                    Ok(()) => "is kept in the controller".to_string(),
                    Err(e) => format!(
                        "could not be updated ({e:#}); its last saved state is in the controller"
                    ),
                },
                if j.undo.is_none() {
                    " (it was not changed)"
                } else {
                    ""
                }
            )
        }
    }
}

/// Whether the controller offers `POST /v1/volumes/{name}/resize` (read from its OpenAPI
/// document, without calling it).
fn resize_endpoint(client: &Client) -> bool {
    client
        .get::<Value>("/openapi.json")
        .ok()
        .and_then(|d| d.get("paths").cloned())
        .is_some_and(|p| p.get("/v1/volumes/{name}/resize").is_some())
}

#[derive(Debug, Serialize)]
struct StepReport {
    layer: &'static str,
    /// `done`, `already done`, `skipped`.
    state: String,
    detail: String,
}

#[derive(Debug, Serialize)]
struct GrowReport {
    volume: String,
    target_bytes: u64,
    target_sectors: u64,
    table: String,
    partition: Option<u32>,
    filesystem: String,
    filesystem_old_bytes: u64,
    filesystem_new_bytes: u64,
    steps: Vec<StepReport>,
    /// Seconds of the read-only check in the preflight (e2fsck -fn / xfs_repair -n).
    fs_check_secs: f64,
    /// Seconds of e2fsck -f in the filesystem step.
    fsck_secs: f64,
    /// Seconds of resize2fs / xfs_growfs.
    resize_secs: f64,
    total_secs: f64,
}

impl GrowReport {
    fn step(&mut self, layer: &'static str, state: &str, detail: String) {
        self.steps.push(StepReport {
            layer,
            state: state.to_string(),
            detail,
        });
    }

    fn text(&self) -> String {
        let mut s = format!(
            "Grew volume {} to {}.\n",
            self.volume,
            sz(self.target_bytes)
        );
        for st in &self.steps {
            s.push_str(&format!(
                "  {:<16} {:<13} {}\n",
                st.layer, st.state, st.detail
            ));
        }
        s.push_str(&format!(
            "Time: {:.2}s in all; filesystem check (preflight, read-only) {:.2}s, e2fsck -f {:.2}s, resize {:.2}s.\n",
            self.total_secs, self.fs_check_secs, self.fsck_secs, self.resize_secs
        ));
        s
    }
}

fn done(j: &GrowJournal, step: &str) -> bool {
    j.steps_done.iter().any(|s| s == step)
}

fn mark(client: &Client, j: &mut GrowJournal, step: &str) -> Result<()> {
    stop_if_interrupted();
    if !done(j, step) {
        j.steps_done.push(step.to_string());
    }
    put_journal(client, j)?;
    fail_point(step);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn execute(
    client: &Client,
    json: bool,
    name: &str,
    info: &ConnectInfo,
    v: &Volume,
    j: &mut GrowJournal,
    report: &mut GrowReport,
    timeout: u64,
) -> Result<()> {
    let target = j.target_bytes;
    let say = |s: String| {
        if !json {
            println!("{s}");
        }
    };

    // 1. Block layer.
    if v.size_bytes >= target {
        report.step(
            "block layer",
            "already done",
            format!("volume is {}", sz(v.size_bytes)),
        );
    } else {
        say(format!(
            "block layer: growing every replica and the volume from {} to {}",
            format_size(v.size_bytes),
            format_size(target)
        ));
        block_resize(client, name, target, timeout).context("block layer")?;
        report.step(
            "block layer",
            "done",
            format!("{} -> {}", sz(v.size_bytes), sz(target)),
        );
    }
    mark(client, j, "block")?;

    // 2. Partition table, over NBD.
    let nbd = wait_export_size(info, name, target, timeout).context("partition table")?;
    let plan = tandem_grow::plan_with(&nbd, target, PLAN_OPTIONS)
        .map_err(|e| anyhow!("partition table: planning on the grown volume: {e}"))?;
    let dev = TableDevice::new(nbd);
    if plan.nothing_to_do {
        report.step(
            "partition table",
            "already done",
            format!("{}: nothing to change", plan.table),
        );
    } else {
        say(format!(
            "partition table ({}): writing {} (the undo record goes to the controller first)",
            plan.table,
            format_size(plan.write_bytes)
        ));
        let mut save = |rec: &UndoRecord| -> std::io::Result<()> {
            // A resumed apply keeps the first record: it holds the bytes from before the grow.
            if j.undo.is_none() {
                j.undo = Some(rec.to_json());
            }
            put_journal(client, j).map_err(|e| std::io::Error::other(format!("{e:#}")))
        };
        let outcome = tandem_grow::apply(&dev, &plan, &mut save)
            .map_err(|e| anyhow!("partition table: {e}"))?;
        report.step(
            "partition table",
            match outcome {
                ApplyOutcome::NothingToDo => "already done",
                ApplyOutcome::Applied(_) => "done",
            },
            partition_detail(&plan),
        );
    }
    drop(dev);
    mark(client, j, "partition")?;

    // 3. Filesystem, through the FUSE view.
    let fs = plan.target.filesystem.clone();
    match &fs {
        Filesystem::Ext { .. } => {
            if !done(j, "fsck") {
                say(format!(
                    "filesystem: e2fsck -f -y -C 0 on {} (progress below)",
                    fs.name()
                ));
                let mut view = View::mount(info, name, false).context("filesystem")?;
                let (file, _) = view.file_at(plan.target.partition, plan.target.offset_bytes)?;
                let t = Instant::now();
                let mut cmd = Command::new("e2fsck");
                cmd.args(["-f", "-y", "-C", "0"]).arg(&file);
                let (code, _) = run_tool(&mut cmd, "e2fsck", true).context("filesystem")?;
                report.fsck_secs = t.elapsed().as_secs_f64();
                view.close()?;
                if !(0..=2).contains(&code) {
                    bail!(
                        "filesystem: e2fsck -f -y exited {code}: errors left uncorrected; the filesystem was not resized"
                    );
                }
                report.step(
                    "filesystem",
                    "checked",
                    format!(
                        "e2fsck -f -y: exit {code}{} in {:.2}s",
                        if code == 0 {
                            " (clean)"
                        } else {
                            " (errors corrected)"
                        },
                        report.fsck_secs
                    ),
                );
                mark(client, j, "fsck")?;
            }
            say("filesystem: resize2fs".to_string());
            let mut view = View::mount(info, name, false).context("filesystem")?;
            let (file, size) = view.file_at(plan.target.partition, plan.target.offset_bytes)?;
            let t = Instant::now();
            let mut cmd = Command::new("resize2fs");
            if !json {
                cmd.arg("-p");
            }
            cmd.arg(&file);
            run_tool(&mut cmd, "resize2fs", true).context("filesystem")?;
            report.resize_secs = t.elapsed().as_secs_f64();
            view.close()?;
            report.filesystem_new_bytes = fs_size_after(info, name, &plan)?;
            report.step(
                "filesystem",
                "done",
                format!(
                    "resize2fs: {} -> {} (partition {})",
                    format_size(report.filesystem_old_bytes),
                    format_size(report.filesystem_new_bytes),
                    format_size(size)
                ),
            );
        }
        Filesystem::Xfs { .. } => {
            say("filesystem: xfs_growfs on a temporary loop mount".to_string());
            let mut view = View::mount(info, name, false).context("filesystem")?;
            let (file, size) = view.file_at(plan.target.partition, plan.target.offset_bytes)?;
            let t = Instant::now();
            {
                let m = LoopMount::mount(&file).context("filesystem")?;
                run_tool(Command::new("xfs_growfs").arg(m.path()), "xfs_growfs", true)
                    .context("filesystem")?;
            }
            report.resize_secs = t.elapsed().as_secs_f64();
            view.close()?;
            report.filesystem_new_bytes = fs_size_after(info, name, &plan)?;
            report.step(
                "filesystem",
                "done",
                format!(
                    "xfs_growfs: {} -> {} (partition {})",
                    format_size(report.filesystem_old_bytes),
                    format_size(report.filesystem_new_bytes),
                    format_size(size)
                ),
            );
        }
        Filesystem::Unknown { found } => {
            report.step(
                "filesystem",
                "skipped",
                format!("{found}: not a filesystem tandem grows; the partition grew, grow what is in it yourself"),
            );
        }
    }
    mark(client, j, "filesystem")?;
    Ok(())
}

fn partition_detail(plan: &Plan) -> String {
    let grown = plan.steps.iter().find_map(|s| match s {
        tandem_grow::Step::GrowPartition {
            number,
            old_end_lba,
            new_end_lba,
            old_bytes,
            new_bytes,
            ..
        } => Some(format!(
            "partition {number}: end LBA {old_end_lba} -> {new_end_lba}, {} -> {}",
            format_size(*old_bytes),
            format_size(*new_bytes)
        )),
        _ => None,
    });
    format!(
        "{}: {} written{}",
        plan.table,
        format_size(plan.write_bytes),
        grown.map(|g| format!("; {g}")).unwrap_or_default()
    )
}

/// The filesystem's size read back from its superblock after the resize.
fn fs_size_after(info: &ConnectInfo, name: &str, plan: &Plan) -> Result<u64> {
    let nbd = nbd_connect(info, name)?;
    let fs = tandem_grow::probe_filesystem(&nbd, plan.target.offset_bytes, plan.target.new_bytes)
        .map_err(|e| anyhow!("reading the filesystem back: {e}"))?;
    let new = fs.size_bytes().unwrap_or(0);
    let old = plan.target.filesystem.size_bytes().unwrap_or(0);
    if new <= old && old < plan.target.new_bytes {
        bail!(
            "filesystem: the resize ran but the superblock still says {} (was {})",
            format_size(new),
            format_size(old)
        );
    }
    Ok(new)
}

/// `POST /v1/volumes/{name}/resize`, then waits until the volume and every replica report
/// the size and the volume is ready.
fn block_resize(client: &Client, name: &str, target: u64, timeout: u64) -> Result<()> {
    let path = format!("{}/resize", volume_path(name));
    match client.post::<_, Value>(&path, &json!({"size_bytes": target, "allow_shrink": false})) {
        Ok(_) => {}
        Err(ClientError::Api { status: 404, error })
            if error.message.contains("no such endpoint") =>
        {
            bail!(
                "this controller has no volume resize (POST {path}): the block layer cannot grow; nothing was changed"
            );
        }
        Err(e) => return Err(e.into()),
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let v: Value = client.get(&volume_path(name))?;
        let replicas_ok = v["replicas"].as_array().is_some_and(|rs| {
            rs.iter().all(|r| {
                r.get("size_bytes")
                    .and_then(Value::as_u64)
                    .is_none_or(|s| s == target)
                    || r["diskless"].as_bool() == Some(true)
            })
        });
        if v["size_bytes"].as_u64() == Some(target) && v["state"] == "ready" && replicas_ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the volume did not reach {} within {timeout}s (`tandem volume show {name}` shows its replicas)",
                format_size(target)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Connects to the export once it shows at least `target` bytes.
fn wait_export_size(
    info: &ConnectInfo,
    name: &str,
    target: u64,
    timeout: u64,
) -> Result<NbdClient> {
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        let nbd = nbd_connect(info, name)?;
        if nbd.size() >= target {
            return Ok(nbd);
        }
        if Instant::now() > deadline {
            bail!(
                "the export of '{name}' is {} after {timeout}s, the grow needs {}",
                format_size(nbd.size()),
                format_size(target)
            );
        }
        drop(nbd);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn print_plan(
    json: bool,
    name: &str,
    v: &Volume,
    target: u64,
    plan: &Plan,
    checks: &[Check],
    journal: Option<&GrowJournal>,
) -> Result<()> {
    let ok = checks.iter().all(|c| c.ok);
    let block_state = if v.size_bytes >= target {
        "already done"
    } else {
        "to do"
    };
    let fs = &plan.target.filesystem;
    let fs_new = plan.target.new_bytes;
    let (fs_state, fs_tools) = match fs {
        Filesystem::Ext { .. } => (
            "to do",
            "e2fsck -f -y -C 0, then resize2fs, on the partition file of a FUSE view",
        ),
        Filesystem::Xfs { .. } => (
            "to do",
            "xfs_growfs on a temporary loop mount of the partition file of a FUSE view",
        ),
        Filesystem::Unknown { .. } => ("skipped", "not a filesystem tandem grows"),
    };
    let fs_state = if fs.size_bytes().is_some_and(|s| s >= fs_new) {
        "already done"
    } else {
        fs_state
    };
    if json {
        let doc = json!({
            "volume": name,
            "current_bytes": v.size_bytes,
            "target_bytes": target,
            "target_sectors": target / SECTOR,
            "ok": ok,
            "changes_nothing": true,
            "resuming": journal,
            "preflight": checks,
            "steps": [
                {"layer": "block", "state": block_state, "from_bytes": v.size_bytes, "to_bytes": target,
                 "from_sectors": v.size_bytes / SECTOR, "to_sectors": target / SECTOR},
                {"layer": "partition_table", "state": if plan.nothing_to_do { "already done" } else { "to do" },
                 "plan": serde_json::to_value(plan)?},
                {"layer": "filesystem", "state": fs_state, "kind": fs.name(), "tools": fs_tools,
                 "offset_bytes": plan.target.offset_bytes,
                 "old_bytes": fs.size_bytes(), "new_bytes": fs_new, "new_sectors": fs_new / SECTOR},
            ],
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let mut s = format!(
            "Plan: grow volume {name} from {} to {}\n",
            sz(v.size_bytes),
            sz(target)
        );
        if let Some(j) = journal {
            s.push_str(&format!(
                "An unfinished grow is recorded ({}); running the command resumes it.\n",
                layers_status(j)
            ));
        }
        s.push_str("\nPreflight:\n");
        for c in checks {
            s.push_str(&format!(
                "  {:<7} {}: {}\n",
                if c.ok { "ok" } else { "REFUSED" },
                c.check,
                c.detail
            ));
        }
        s.push_str("\nSteps:\n");
        s.push_str(&format!(
            "  1. block layer [{block_state}]: every replica's backing store, then the volume: {} -> {} (+{})\n",
            sz(v.size_bytes),
            sz(target),
            format_size(target.saturating_sub(v.size_bytes))
        ));
        s.push_str(&format!(
            "  2. partition table [{}]:\n",
            if plan.nothing_to_do {
                "already done"
            } else {
                "to do"
            }
        ));
        for line in plan.to_string().lines() {
            s.push_str(&format!("       {line}\n"));
        }
        s.push_str(&format!(
            "  3. filesystem [{fs_state}]: {} at byte offset {}: {} -> {}; {fs_tools}\n",
            fs.name(),
            plan.target.offset_bytes,
            fs.size_bytes().map(sz).unwrap_or_else(|| "?".into()),
            sz(fs_new)
        ));
        s.push_str(if ok {
            "\nNothing was changed (--plan). Run without --plan to grow.\n"
        } else {
            "\nNothing was changed (--plan). The grow would be REFUSED (see the preflight).\n"
        });
        print!("{s}");
    }
    if !ok {
        bail!("the preflight refuses the grow of {name}");
    }
    Ok(())
}

// ----- undo ------------------------------------------------------------------------------------

fn run_undo(client: &Client, json: bool, name: &str) -> Result<()> {
    let Some(j) = get_journal(client, name)? else {
        let msg = format!("volume {name} has no grow in progress: nothing to undo");
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"volume": name, "undone": false, "message": msg})
                )?
            );
        } else {
            println!("{msg}.");
        }
        return Ok(());
    };
    let c = consumer_check(client, name)?;
    if !c.ok {
        bail!("undo refused: {}", c.detail);
    }
    let mut restored = 0usize;
    let mut restored_bytes = 0u64;
    if let Some(text) = &j.undo {
        let rec = UndoRecord::from_json(text).map_err(|e| anyhow!("{e}"))?;
        let info = connect_info(client, name)?;
        let nbd = nbd_connect(&info, name)?;
        let fs = tandem_grow::probe_filesystem(&nbd, j.fs_offset_bytes, nbd.size())
            .map_err(|e| anyhow!("reading the filesystem: {e}"))?;
        if let Some(fs_bytes) = fs.size_bytes()
            && fs_bytes > j.old_partition_bytes
        {
            bail!(
                "undo refused: the filesystem was already grown to {}, past the old partition's {}; putting the old table back would cut it off. Finish the grow instead: `tandem volume grow {name} {}`",
                format_size(fs_bytes),
                format_size(j.old_partition_bytes),
                j.target_bytes
            );
        }
        restored = tandem_grow::undo(&nbd, &rec).map_err(|e| anyhow!("undo: {e}"))?;
        restored_bytes = rec.regions.iter().map(|r| r.old.len() as u64).sum::<u64>();
    }
    delete_journal(client, name)?;
    let block = if j.steps_done.iter().any(|s| s == "block") && j.start_bytes < j.target_bytes {
        format!(
            "the block layer stays at {} (volumes do not shrink)",
            format_size(j.target_bytes)
        )
    } else {
        "the block layer was not changed by this grow".to_string()
    };
    let table = match (&j.undo, restored) {
        (None, _) => "the partition table had not been changed".to_string(),
        (Some(_), 0) => "the partition table already held the old bytes".to_string(),
        (Some(_), n) => format!(
            "the old partition table is back ({n} region(s) of {} restored byte for byte)",
            format_size(restored_bytes)
        ),
    };
    let msg = format!(
        "Undid the grow of volume {name} to {}: {table}; the filesystem was not resized; {block}. The grow journal is removed.",
        format_size(j.target_bytes)
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "volume": name,
                "undone": true,
                "target_bytes": j.target_bytes,
                "regions_restored": restored,
                "table_changed": j.undo.is_some(),
                "steps_done": j.steps_done,
                "message": msg,
            }))?
        );
    } else {
        println!("{msg}");
    }
    Ok(())
}

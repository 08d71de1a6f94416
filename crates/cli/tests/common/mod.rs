//! Harness for end-to-end tests: a real `tandem up` cluster (controller and agents as separate
//! processes) in its own directory with its own ports, torn down on drop even when the test
//! fails, plus helpers to run the CLI and real NBD clients.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Fails (never skips) when a client tool is missing: `./scripts/test` installs them.
pub fn tool(name: &str) -> &str {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed; ./scripts/test installs every test tool (apt-get)"
    );
    name
}

#[path = "../../src/ports.rs"]
mod ports;

/// A free port for a daemon that binds it later (the same chooser `tandem up` uses: below the
/// ephemeral range, never handed out twice while the test runs, not even to another test).
pub fn free_port() -> u16 {
    ports::free_port().expect("a free port")
}

/// Makes a spawned process receive SIGKILL when the test thread that spawned it dies.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl only; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command and panics with its output unless it succeeds; returns stdout.
pub fn check(cmd: &mut Command) -> String {
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

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub port: u16,
    pub nodes: u32,
    up: Option<Child>,
    /// Daemons the test restarted by hand; killed on drop.
    extra: Vec<Child>,
    pub up_output: String,
    /// Extra arguments of `tandem up` (e.g. `--experimental-replication`).
    pub up_args: Vec<String>,
}

impl Cluster {
    pub fn start(nodes: u32) -> Cluster {
        Self::start_with(nodes, &[])
    }

    /// Like [`Cluster::start`] with extra arguments for `tandem up`.
    pub fn start_with(nodes: u32, up_args: &[&str]) -> Cluster {
        // Short path: unix socket paths are limited to 107 bytes.
        let dir = tempfile::Builder::new()
            .prefix("tdm")
            .tempdir_in("/tmp")
            .unwrap();
        let mut c = Cluster {
            dir,
            url: String::new(),
            port: free_port(),
            nodes,
            up: None,
            extra: Vec::new(),
            up_output: String::new(),
            up_args: up_args.iter().map(|s| s.to_string()).collect(),
        };
        c.up();
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Starts `tandem up` on this cluster's directory and waits for it to be ready.
    pub fn up(&mut self) {
        assert!(self.up.is_none());
        let mut cmd = Command::new(TANDEM);
        cmd.args(["up", "--dir"])
            .arg(self.dir.path())
            .args([
                "--nodes",
                &self.nodes.to_string(),
                "--port",
                &self.port.to_string(),
            ])
            .args(&self.up_args)
            .env("TANDEM_LOG", "info,tandem=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn tandem up");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {line}"));
            }
        });
        self.up = Some(child);
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                    if line.starts_with("Ctrl-C stops") {
                        break;
                    }
                }
                Err(_) => panic!("tandem up did not become ready:\n{seen}\n{}", self.logs()),
            }
        }
        let first = seen.lines().next().unwrap_or_default();
        self.url = first
            .strip_prefix("controller: ")
            .unwrap_or_else(|| panic!("first line: {first}"))
            .to_string();
        self.up_output = seen;
        // Keep draining so `up` never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
    }

    /// Stops `tandem up` with SIGINT (as Ctrl-C would) and waits for it; returns its exit status.
    pub fn down(&mut self) -> std::process::ExitStatus {
        let mut child = self.up.take().expect("cluster is up");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("tandem up did not stop within 60s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The CLI pointed at this cluster.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(TANDEM);
        cmd.env("TANDEM_CONTROLLER", &self.url).stdin(Stdio::null());
        cmd
    }

    /// Runs `tandem <args>`, asserts success, returns stdout.
    pub fn tandem(&self, args: &[&str]) -> String {
        check(self.cli().args(args))
    }

    /// Runs `tandem -o json <args>` and parses stdout.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = check(self.cli().args(["-o", "json"]).args(args));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    }

    /// Runs `tandem <args>`, asserts it fails with `code` (a stable API error code or a
    /// part of the message) on stderr, returns stderr.
    pub fn refused(&self, args: &[&str], code: &str) -> String {
        let out = run(self.cli().args(args));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !out.status.success(),
            "{args:?} must be refused: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(err.contains(code), "{args:?}: expected {code}: {err}");
        err
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.path().join(node)
    }

    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        std::fs::read_to_string(self.node_dir(node).join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Restarts an agent by hand, as an operator would, with its config from `tandem up`.
    pub fn restart_agent(&mut self, node: &str) {
        let mut cmd = Command::new(TANDEM);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_dir(node).join("agent.log"))
            .unwrap();
        cmd.args(["agent", "run", "--config"])
            .arg(self.node_dir(node).join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        self.extra.push(cmd.spawn().unwrap());
    }

    pub fn controller_dir(&self) -> PathBuf {
        self.path().join("controller")
    }

    pub fn controller_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.controller_dir().join("controller.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Sends `signal` to the controller and waits until the process is gone (or a zombie
    /// waiting for `tandem up` to reap it).
    pub fn kill_controller(&self, signal: i32) {
        let pid = self.controller_pid().expect("controller.pid");
        // SAFETY: signalling a daemon of this test's cluster.
        unsafe { libc::kill(pid, signal) };
        wait_pid_exit(pid, "the controller to exit");
    }

    /// Starts the controller by hand (as an operator would after it died) with the config
    /// `tandem up` wrote, and waits until it answers.
    pub fn restart_controller(&mut self) {
        let dir = self.controller_dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("controller.log"))
            .unwrap();
        let mut cmd = Command::new(TANDEM);
        cmd.args(["controller", "run", "--config"])
            .arg(dir.join("controller.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        self.extra.push(cmd.spawn().unwrap());
        wait_until(Duration::from_secs(30), "the controller to answer", || {
            run(self.cli().args(["node", "list"]))
                .status
                .success()
                .then_some(())
        });
    }

    /// Waits until `tandem -o json <args>` satisfies `f` (returns the last value).
    pub fn wait_json(
        &self,
        args: &[&str],
        what: &str,
        mut f: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = run(self.cli().args(["-o", "json"]).args(args));
            if out.status.success()
                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            {
                if f(&v) {
                    return v;
                }
                last = v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last `tandem {args:?}`:\n{last:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `node` is online and serves `volume` (nbdinfo can open the export).
    pub fn wait_export(&self, volume: &str) -> String {
        let uri = self.connect(volume);
        wait_until(Duration::from_secs(30), "export to come back", || {
            let ok = Command::new("nbdinfo")
                .arg("--size")
                .arg(&uri)
                .output()
                .ok()?
                .status
                .success();
            ok.then_some(())
        });
        uri
    }

    pub fn connect(&self, volume: &str) -> String {
        self.tandem(&["volume", "connect", volume])
            .trim()
            .to_string()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for entry in walk(self.path()) {
            if entry.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&entry).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                s.push_str(&format!(
                    "==> {} <==\n{}\n",
                    entry.display(),
                    lines[lines.len().saturating_sub(40)..].join("\n")
                ));
            }
        }
        s
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("cluster logs:\n{}", self.logs());
        }
        for c in &mut self.extra {
            // SAFETY: our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        if self.up.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.down()));
        }
        for c in &mut self.extra {
            let deadline = Instant::now() + Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

pub mod proxy;
pub mod repl;

/// Waits until process `pid` is gone (or a zombie waiting to be reaped).
pub fn wait_pid_exit(pid: i32, what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        // A zombie leader is not enough: its other threads may still be exiting (one in the
        // middle of a disk write) and hold the process's files, such as the agent's state
        // lock, until the last of them is gone.
        let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count())
            .unwrap_or(0);
        match state {
            None | Some("X") => Some(()),
            Some("Z") if threads <= 1 => Some(()),
            _ => None,
        }
    });
}

impl Cluster {
    /// Sends `signal` to `node`'s agent (SIGTERM: an orderly stop) and waits until it is gone.
    pub fn stop_agent(&self, node: &str, signal: i32) {
        let pid = self.agent_pid(node).expect("agent.pid");
        // SAFETY: signalling an agent of this test's cluster.
        unsafe { libc::kill(pid, signal) };
        wait_pid_exit(pid, &format!("the agent of {node} to exit"));
    }

    /// Waits until the controller shows `node` online (an agent stopped in an orderly way
    /// shows offline until its restarted agent syncs).
    pub fn wait_online(&self, node: &str) {
        self.wait_json(&["node", "list"], &format!("{node} online"), |l| {
            l.as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == node && n["state"] == "online")
        });
    }

    /// Sets a top-level key of `node`'s `agent.toml` (takes effect at the agent's next start).
    pub fn set_agent_config(&self, node: &str, key: &str, value: toml::Value) {
        let path = self.node_dir(node).join("agent.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let mut table: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        table.insert(key.to_string(), value);
        std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    }

    /// `node list -o json` as (name, node id, replication address), sorted by node id.
    pub fn repl_nodes(&self) -> Vec<(String, u8, String)> {
        let nodes = self.json(&["node", "list"]);
        let mut v: Vec<(String, u8, String)> = nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["name"].as_str().unwrap().to_string(),
                    n["node_id"].as_u64().expect("node id") as u8,
                    n["repl_addr"].as_str().expect("repl_addr").to_string(),
                )
            })
            .collect();
        v.sort_by_key(|n| n.1);
        v
    }

    /// The agent log of `node` (the agents `tandem up` started and the ones restarted by hand
    /// append to the same file).
    /// ANSI colour codes are removed (the daemons log with them).
    pub fn agent_log(&self, node: &str) -> String {
        strip_ansi(
            &std::fs::read_to_string(self.node_dir(node).join("agent.log")).unwrap_or_default(),
        )
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(ch);
    }
    out
}

//! End to end with real processes and real clients: `tandem volume resize` online, on a single
//! replica and on 2 replicas + witness, with an NBD client connected (qemu-io in interactive
//! mode), a second resize while a resync runs, an agent killed during a resize, shrink refusals
//! (GPT partition past the new end) and an allowed shrink, and a pool that cannot hold it.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};

use common::repl::{diskful, in_sync, node_of, qemu_io_ok, reads, same_files, writes};
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A qemu-io process in interactive mode: one NBD connection held open across the resize.
struct Interactive {
    child: Child,
}

impl Interactive {
    fn open(uri: &str) -> Interactive {
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw", uri])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        Interactive {
            child: cmd.spawn().expect("spawn qemu-io"),
        }
    }

    fn send(&mut self, cmds: &[String]) {
        let stdin = self.child.stdin.as_mut().unwrap();
        for c in cmds {
            writeln!(stdin, "{c}").unwrap();
        }
        stdin.flush().unwrap();
    }

    /// Quits and returns everything it printed.
    fn finish(mut self) -> String {
        self.send(&["quit".to_string()]);
        drop(self.child.stdin.take());
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    }
}

fn nbdinfo_size(uri: &str) -> u64 {
    check(Command::new(tool("nbdinfo")).args(["--size", uri]))
        .trim()
        .parse()
        .unwrap()
}

fn data_file(c: &Cluster, node: &str, volume: &str) -> std::path::PathBuf {
    c.node_dir(node).join("pool").join(format!("{volume}.data"))
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// Connections the volume's replicas report.
fn connections(v: &Value) -> u64 {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["connections"].as_u64().unwrap_or(0))
        .sum()
}

/// Every replica reports `size` (and exports it where exported); the pools' provisioned space
/// follows the controller's volume size.
fn assert_size_everywhere(c: &Cluster, volume: &str, size: u64) -> Value {
    let v = c.json(&["volume", "show", volume]);
    assert_eq!(v["size_bytes"], size, "{v:#}");
    for r in v["replicas"].as_array().unwrap() {
        assert_eq!(r["size_bytes"], size, "{v:#}");
        if !r["export_size_bytes"].is_null() {
            assert_eq!(r["export_size_bytes"], size, "{v:#}");
        }
    }
    let pools = c.json(&["pool", "list"]);
    for r in diskful(&v) {
        let node = r["node"].as_str().unwrap();
        let pool = pools
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["node"] == node)
            .unwrap_or_else(|| panic!("no pool on {node}: {pools:#}"));
        assert_eq!(pool["provisioned_bytes"], size, "{pools:#}");
        assert_eq!(file_len(&data_file(c, node, volume)), size);
        // Sparse: the grown area takes no space.
        let alloc = r["allocated_bytes"].as_u64().unwrap();
        assert!(alloc < size / 2, "{node} allocated {alloc} of {size}");
    }
    v
}

fn resize_json(c: &Cluster, volume: &str, size: &str, extra: &[&str]) -> Value {
    let mut args = vec!["volume", "resize", volume, size, "--timeout", "120"];
    args.extend_from_slice(extra);
    c.json(&args)
}

/// Runs the CLI expecting failure; returns stderr.
fn fails(c: &Cluster, args: &[&str]) -> String {
    let out = run(c.cli().args(args));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "{args:?} should fail: {}{err}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

#[test]
fn single_replica_grows_online_with_a_client_connected() {
    let c = Cluster::start(1);
    let v = c.json(&["volume", "create", "solo", "64MiB"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let uri = c.connect("solo");
    let head = [(0, 65536, 0x31), (64 * MIB - 65536, 65536, 0x32)];
    qemu_io_ok(&uri, &writes(&head));

    let mut q = Interactive::open(&uri);
    q.send(&["length".to_string()]);
    c.wait_json(&["volume", "show", "solo"], "the client connected", |v| {
        connections(v) == 1
    });
    let text = c.tandem(&["volume", "resize", "solo", "128MiB", "--timeout", "60s"]);
    assert!(
        text.contains("Grew volume solo from 67108864 B (64.00 MiB) to 134217728 B (128.00 MiB)"),
        "{text}"
    );
    assert!(
        text.contains(
            "resync of the grown area: 0 B (sparse files read as zeros on every replica)"
        ),
        "{text}"
    );
    assert!(text.contains("1 NBD client(s) connected"), "{text}");
    // The connected client keeps its size and keeps working.
    q.send(&[
        "length".to_string(),
        "write -P 0x33 1048576 4096".to_string(),
        "flush".to_string(),
    ]);
    let out = q.finish();
    assert_eq!(out.matches("64 MiB").count(), 2, "{out}");
    assert!(!out.contains("failed") && !out.contains("rror"), "{out}");
    // New connections see the new size; the new area reads as zeros and takes writes.
    assert_eq!(nbdinfo_size(&uri), 128 * MIB);
    let tail = [(128 * MIB - 65536, 65536, 0x34)];
    qemu_io_ok(&uri, &writes(&tail));
    let mut checks = reads(&head);
    checks.extend(reads(&tail));
    checks.extend(reads(&[(MIB, 4096, 0x33), (64 * MIB, 64 * MIB - 65536, 0)]));
    qemu_io_ok(&uri, &checks);
    let v = assert_size_everywhere(&c, "solo", 128 * MIB);
    let op = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| o["kind"] == "resize")
        .unwrap();
    assert_eq!(op["state"], "done", "{v:#}");
    assert_eq!(op["progress"], 1.0);
    // The same size again: nothing to do.
    let text = c.tandem(&["volume", "resize", "solo", "128MiB"]);
    assert!(text.contains("already has 134217728 B"), "{text}");
    // A pool that cannot hold it: refused with its code, nothing changed.
    let err = fails(&c, &["volume", "resize", "solo", "64TiB"]);
    assert!(err.contains("no_capacity"), "{err}");
    // Shrink without --allow-shrink: refused.
    let err = fails(&c, &["volume", "resize", "solo", "32MiB"]);
    assert!(err.contains("shrink_refused"), "{err}");
    assert_size_everywhere(&c, "solo", 128 * MIB);
}

#[test]
fn two_replicas_grow_online_identically_without_resync() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "pair", "64MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let v = c.wait_json(&["volume", "show", "pair"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.connect("pair");
    let head = [
        (0, 65536, 0x41),
        (5 * MIB, 131072, 0x42),
        (64 * MIB - 4096, 4096, 0x43),
    ];
    qemu_io_ok(&uri, &writes(&head));

    let mut q = Interactive::open(&uri);
    q.send(&["length".to_string()]);
    c.wait_json(&["volume", "show", "pair"], "the client connected", |v| {
        connections(v) == 1
    });
    let r = resize_json(&c, "pair", "128MiB", &[]);
    assert_eq!(r["old_size_bytes"], 64 * MIB, "{r:#}");
    assert_eq!(r["size_bytes"], 128 * MIB, "{r:#}");
    assert_eq!(r["grown_area_resync_bytes"], 0, "{r:#}");
    assert_eq!(r["connected_clients"], 1, "{r:#}");
    assert_eq!(r["operation"]["state"], "done", "{r:#}");
    for rep in r["replicas"].as_array().unwrap() {
        assert_eq!(rep["size_bytes"], 128 * MIB, "{r:#}");
        if rep["diskless"] == false {
            assert_eq!(rep["old_size_bytes"], 64 * MIB, "{r:#}");
        }
    }
    q.send(&[
        "length".to_string(),
        "write -P 0x44 1048576 4096".to_string(),
        "flush".to_string(),
    ]);
    let out = q.finish();
    assert_eq!(out.matches("64 MiB").count(), 2, "{out}");
    assert!(!out.contains("failed") && !out.contains("rror"), "{out}");

    assert_eq!(nbdinfo_size(&uri), 128 * MIB);
    let tail = [(128 * MIB - 131072, 131072, 0x45), (64 * MIB, 4096, 0x46)];
    qemu_io_ok(&uri, &writes(&tail));
    let mut checks = reads(&head);
    checks.extend(reads(&tail));
    checks.extend(reads(&[(MIB, 4096, 0x44)]));
    qemu_io_ok(&uri, &checks);
    let v = c.wait_json(
        &["volume", "show", "pair"],
        "in sync after the resize",
        in_sync,
    );
    for r in diskful(&v) {
        assert_eq!(r["last_resync_bytes"], 0, "no resync ran: {v:#}");
        assert_eq!(r["out_of_sync_bytes"], 0, "{v:#}");
    }
    assert_eq!(node_of(&v, "Primary"), primary);
    same_files(&c, &primary, &secondary, "pair");
    assert_size_everywhere(&c, "pair", 128 * MIB);
    let logs = c.logs();
    assert!(
        !logs.contains("SizeMismatch"),
        "a link dropped for the size"
    );

    // An allowed shrink (nothing partition- or filesystem-like on the volume).
    let r = resize_json(&c, "pair", "96MiB", &["--allow-shrink"]);
    assert_eq!(r["size_bytes"], 96 * MIB, "{r:#}");
    assert_eq!(nbdinfo_size(&uri), 96 * MIB);
    qemu_io_ok(&uri, &reads(&head));
    c.wait_json(
        &["volume", "show", "pair"],
        "in sync after the shrink",
        in_sync,
    );
    same_files(&c, &primary, &secondary, "pair");
    assert_size_everywhere(&c, "pair", 96 * MIB);
}

/// Lets node `secondary` miss `blocks` (its agent stopped), then restarts it: a resync runs.
fn start_resync(
    c: &mut Cluster,
    volume: &str,
    secondary: &str,
    uri: &str,
    blocks: &[(u64, u64, u8)],
) {
    c.stop_agent(secondary, libc::SIGTERM);
    qemu_io_ok(uri, &writes(blocks));
    c.restart_agent(secondary);
    c.wait_json(&["volume", "show", volume], "a resync running", |v| {
        diskful(v).iter().any(|r| {
            r["node"] == secondary && r["resync_bytes_left"].as_u64().is_some_and(|l| l > 0)
        })
    });
}

#[test]
fn a_second_resize_during_a_resync_supersedes_the_first_and_converges() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&[
        "volume",
        "create",
        "rs",
        "64MiB",
        "--replicas",
        "2",
        "--resync-rate",
        "1MiB",
    ]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let v = c.wait_json(&["volume", "show", "rs"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.connect("rs");
    let missed = [(8 * MIB, 6 * MIB, 0x51)];
    start_resync(&mut c, "rs", &secondary, &uri, &missed);

    // First resize in the background, the second while it (and the resync) still run.
    let mut first = c.cli();
    first
        .args(["volume", "resize", "rs", "128MiB", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut first);
    let first = first.spawn().unwrap();
    c.wait_json(
        &["volume", "show", "rs"],
        "the first resize recorded",
        |v| v["size_bytes"] == 128 * MIB,
    );
    let v = c.json(&["volume", "show", "rs"]);
    assert!(
        diskful(&v)
            .iter()
            .any(|r| r["resync_bytes_left"].as_u64().is_some_and(|l| l > 0)),
        "the resync still runs: {v:#}"
    );
    let r = resize_json(&c, "rs", "192MiB", &[]);
    assert_eq!(r["size_bytes"], 192 * MIB, "{r:#}");
    assert_eq!(r["operation"]["state"], "done", "{r:#}");
    let out = first.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            || text.contains("resized to 201326592 B (192.00 MiB) by another request"),
        "first resize: {text}"
    );
    // The resync finishes by itself; every layer agrees on the final size.
    let v = c.wait_json(
        &["volume", "show", "rs"],
        "in sync after both resizes",
        in_sync,
    );
    let resizes: Vec<&Value> = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "resize")
        .collect();
    assert_eq!(resizes.len(), 2, "{v:#}");
    assert!(
        resizes[0]["state"] == "superseded" || resizes[0]["state"] == "done",
        "{v:#}"
    );
    assert_eq!(resizes[1]["state"], "done", "{v:#}");
    let sec = diskful(&v)
        .into_iter()
        .find(|r| r["node"] == secondary.as_str())
        .unwrap()
        .clone();
    let resynced = sec["last_resync_bytes"].as_u64().unwrap();
    assert!(
        (6 * MIB..=8 * MIB).contains(&resynced),
        "only the missed blocks resync, not the grown area: {resynced}"
    );
    assert_size_everywhere(&c, "rs", 192 * MIB);
    same_files(&c, &primary, &secondary, "rs");
    assert_eq!(nbdinfo_size(&uri), 192 * MIB);
    let tail = [(192 * MIB - MIB, MIB, 0x52)];
    qemu_io_ok(&uri, &writes(&tail));
    let mut checks = reads(&missed);
    checks.extend(reads(&tail));
    qemu_io_ok(&uri, &checks);
}

#[test]
fn an_agent_killed_during_a_resize_converges_after_its_restart() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "kr", "64MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let v = c.wait_json(&["volume", "show", "kr"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.connect("kr");
    let head = [(0, MIB, 0x61)];
    qemu_io_ok(&uri, &writes(&head));

    let mut resize = c.cli();
    resize
        .args([
            "-o",
            "json",
            "volume",
            "resize",
            "kr",
            "128MiB",
            "--timeout",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut resize);
    let resize = resize.spawn().unwrap();
    c.wait_json(&["volume", "show", "kr"], "the resize accepted", |v| {
        v["size_bytes"] == 128 * MIB
    });
    c.stop_agent(&secondary, libc::SIGKILL);
    // The Primary grows alone (with the witness it keeps quorum) and writes into the new area
    // while the Secondary is away: those blocks are out of sync toward it.
    c.wait_json(&["volume", "show", "kr"], "the Primary grown", |v| {
        v["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["node"] == primary.as_str() && r["export_size_bytes"] == 128 * MIB)
    });
    let grown = [(100 * MIB, MIB, 0x62)];
    qemu_io_ok(&uri, &writes(&grown));
    c.restart_agent(&secondary);
    let out = resize.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["size_bytes"], 128 * MIB, "{r:#}");
    let v = c.wait_json(
        &["volume", "show", "kr"],
        "in sync after the restart",
        in_sync,
    );
    assert_eq!(node_of(&v, "Primary"), primary, "{v:#}");
    assert_size_everywhere(&c, "kr", 128 * MIB);
    same_files(&c, &primary, &secondary, "kr");
    let mut checks = reads(&head);
    checks.extend(reads(&grown));
    qemu_io_ok(&uri, &checks);
}

fn gpt_image(dir: &std::path::Path, size: u64, partition: &str) -> std::path::PathBuf {
    let img = dir.join("gpt.img");
    let _ = std::fs::remove_file(&img);
    std::fs::File::create(&img).unwrap().set_len(size).unwrap();
    check(
        Command::new(tool("sgdisk"))
            .args(["-o", "-n", partition, "-t", "1:8300"])
            .arg(&img),
    );
    img
}

#[test]
fn shrink_is_refused_past_a_partition_and_allowed_before_it() {
    let c = Cluster::start(1);
    c.json(&["volume", "create", "gp", "64MiB"]);
    let uri = c.connect("gp");
    // A GPT whose partition runs to the end of the disk, copied in with nbdcopy.
    let img = gpt_image(c.path(), 64 * MIB, "1:2048:0");
    check(Command::new(tool("nbdcopy")).arg(&img).arg(&uri));
    let err = fails(&c, &["volume", "resize", "gp", "32MiB"]);
    assert!(err.contains("shrink_refused"), "{err}");
    let err = fails(&c, &["volume", "resize", "gp", "32MiB", "--allow-shrink"]);
    assert!(
        err.contains("shrink refused: GPT partition 1") && err.contains("past the new end"),
        "{err}"
    );
    assert_size_everywhere(&c, "gp", 64 * MIB);
    // A partition of 16 MiB: shrinking to 48 MiB keeps it.
    let img = gpt_image(c.path(), 64 * MIB, "1:2048:+16M");
    check(Command::new(tool("nbdcopy")).arg(&img).arg(&uri));
    let data = [(20 * MIB, MIB, 0x71)];
    qemu_io_ok(&uri, &writes(&data));
    let text = c.tandem(&["volume", "resize", "gp", "48MiB", "--allow-shrink"]);
    assert!(text.contains("Shrank volume gp"), "{text}");
    assert!(text.contains("sgdisk -e"), "{text}");
    assert_eq!(nbdinfo_size(&uri), 48 * MIB);
    assert_size_everywhere(&c, "gp", 48 * MIB);
    qemu_io_ok(&uri, &reads(&data));
    // The partition table still reads (the primary header and entries are at the start).
    let copy = c.path().join("copy.img");
    check(Command::new(tool("nbdcopy")).arg(&uri).arg(&copy));
    let p = check(Command::new(tool("sgdisk")).arg("-p").arg(&copy));
    assert!(p.contains("8300"), "{p}");
}

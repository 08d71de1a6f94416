//! End to end through `tandem up`: real controller and agent processes, the real CLI, and real
//! NBD clients (nbdinfo, qemu-img, qemu-io, nbdcopy, fio).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn volume_show(c: &Cluster, name: &str) -> serde_json::Value {
    c.json(&["volume", "show", name])
}

/// The port chooser never hands out a port twice in one process, and while this process lives
/// another process cannot take the ports it handed out (their bytes in the shared lock file
/// stay locked): two clusters starting side by side never pick the same port.
#[test]
fn free_ports_are_unique_and_reserved_against_other_processes() {
    let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
    let unique: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
    let lock = std::env::temp_dir().join("tandem-ports.lock");
    let script = format!(
        "import fcntl,sys\nf=open({lock:?},'r+')\nfree=[]\nfor p in [{}]:\n  try:\n    fcntl.lockf(f, fcntl.LOCK_EX|fcntl.LOCK_NB, 1, p, 0)\n    free.append(p)\n  except OSError:\n    pass\nprint(len(free))\n",
        ports
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "another process could lock ports this one handed out"
    );
}

#[test]
fn up_serves_a_volume_end_to_end() {
    let c = Cluster::start(3);
    // The first line is the controller URL, then what to type next.
    assert!(
        c.up_output.starts_with("controller: http://127.0.0.1:"),
        "{}",
        c.up_output
    );
    assert!(
        c.up_output.contains("tandem volume create demo 1GiB"),
        "{}",
        c.up_output
    );
    for f in [
        "controller/controller.toml",
        "controller/controller.pid",
        "node1/agent.toml",
        "node3/agent.pid",
    ] {
        assert!(c.path().join(f).is_file(), "{f} missing");
    }

    let nodes = c.json(&["node", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["state"] == "online"), "{nodes:?}");

    let pools = c.json(&["pool", "list"]);
    let pools = pools.as_array().unwrap();
    assert_eq!(pools.len(), 3);
    for p in pools {
        assert!(p["capacity_bytes"].as_u64().unwrap() > 0, "{p}");
        assert!(p["free_bytes"].as_u64().unwrap() <= p["capacity_bytes"].as_u64().unwrap());
    }

    let v = c.json(&["volume", "create", "demo", "64MiB"]);
    assert_eq!(v["name"], "demo");
    assert_eq!(v["size_bytes"], 64 << 20);
    assert_eq!(v["state"], "ready");

    let v = volume_show(&c, "demo");
    for key in [
        "name",
        "size_bytes",
        "protocol",
        "quorum",
        "replicas",
        "operations",
    ] {
        assert!(v.get(key).is_some(), "volume show lacks {key}: {v}");
    }
    assert_eq!(v["quorum"], true);
    let r = &v["replicas"][0];
    for key in [
        "node",
        "pool",
        "diskless",
        "role",
        "disk_state",
        "repl_state",
        "out_of_sync_bytes",
        "resync_bytes_per_sec",
        "last_resync_bytes",
    ] {
        assert!(r.get(key).is_some(), "replica lacks {key}: {r}");
    }
    assert_eq!(r["disk_state"], "UpToDate");
    let node = r["node"].as_str().unwrap().to_string();

    let listed = c.json(&["volume", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1);

    // The URI as printed is accepted by nbdinfo and qemu-img.
    let uri = c.connect("demo");
    assert!(uri.starts_with("nbd+unix:///demo?socket="), "{uri}");
    let json_uri = c.json(&["volume", "connect", "demo"]);
    assert_eq!(json_uri["uri"], uri.as_str());
    let info: serde_json::Value =
        serde_json::from_str(&check(Command::new(tool("nbdinfo")).args(["--json", &uri]))).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 64 << 20, "{info}");
    for flag in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(export[flag], true, "{flag}: {info}");
    }
    assert_eq!(export["is_read_only"], false, "{info}");
    let qi = check(Command::new(tool("qemu-img")).args(["info", "--output=json", &uri]));
    let qi: serde_json::Value = serde_json::from_str(&qi).unwrap();
    assert_eq!(qi["virtual-size"], 64 << 20, "{qi}");

    // The replica's files are in the chosen node's pool; delete removes them.
    let pool_dir = c.node_dir(&node).join("pool");
    let before: Vec<_> = std::fs::read_dir(&pool_dir).unwrap().flatten().collect();
    assert!(
        !before.is_empty(),
        "no replica files in {}",
        pool_dir.display()
    );
    c.tandem(&["volume", "delete", "demo"]);
    assert_eq!(c.json(&["volume", "list"]).as_array().unwrap().len(), 0);
    let after: Vec<_> = std::fs::read_dir(&pool_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("demo"))
        .collect();
    assert!(after.is_empty(), "replica files left behind: {after:?}");
    let out = run(c.cli().args(["volume", "show", "demo"]));
    assert!(!out.status.success());
}

#[test]
fn cli_refuses_bad_input_with_clear_messages() {
    let c = Cluster::start(1);
    let fail = |args: &[&str]| {
        let out = run(c.cli().args(args));
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?} should fail with exit 1"
        );
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
            "{err}"
        );
        assert!(err.starts_with("error: "), "{err}");
        err
    };
    let err = fail(&["volume", "create", "v", "1G"]);
    assert!(
        err.contains("1GiB") && err.contains("1GB"),
        "ambiguous unit must name both: {err}"
    );
    let err = fail(&["volume", "create", "v", "10Q"]);
    assert!(err.contains("unknown unit"), "{err}");
    let err = fail(&["volume", "create", "../etc", "1MiB"]);
    assert!(err.contains("name"), "{err}");
    let err = fail(&["volume", "create", "v", "1000"]);
    assert!(err.contains("512"), "size must be a multiple of 512: {err}");
    let err = fail(&["volume", "show", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = fail(&["volume", "connect", "nosuch"]);
    assert!(err.contains("nosuch"), "{err}");

    // Sizes in both unit families are exact.
    let v = c.json(&["volume", "create", "dec", "1.024MB"]);
    assert_eq!(v["size_bytes"], 1_024_000, "{v}");
    let v = c.json(&["volume", "create", "bin", "1MiB"]);
    assert_eq!(v["size_bytes"], 1 << 20, "{v}");
}

#[test]
fn controller_unreachable_is_a_clear_error() {
    let port = free_port();
    let out = run(Command::new(TANDEM).args([
        "--controller",
        &format!("http://127.0.0.1:{port}"),
        "volume",
        "list",
    ]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the controller"), "{err}");
    assert!(err.contains("tandem up"), "{err}");
}

#[test]
fn real_clients_read_and_write_a_volume() {
    let c = Cluster::start(2);
    let size: u64 = 128 << 20;
    c.tandem(&["volume", "create", "data", "128MiB"]);
    let uri = c.connect("data");

    // Fresh volume: one hole over the whole device.
    let map = check(Command::new(tool("nbdinfo")).args(["--map", "--json", &uri]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(map.as_array().unwrap().len(), 1, "{map}");
    assert_eq!(map[0]["type"], 3, "hole,zero expected: {map}");

    // qemu-io patterns at many offsets including the very last sector and byte.
    let offsets = [
        0u64,
        512,
        4096,
        65536 + 512,
        1 << 20,
        77 << 20,
        size - 4096,
        size - 512,
    ];
    let mut script = Vec::new();
    for (i, off) in offsets.iter().enumerate() {
        script.push("-c".to_string());
        script.push(format!("write -P {} {off} 512", 0x11 + i));
    }
    script.extend([
        "-c".into(),
        "flush".into(),
        "-c".into(),
        format!("write -P 0x7e {} 1", size - 1),
    ]);
    check(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw"])
            .args(&script)
            .arg(&uri),
    );
    let mut script = Vec::new();
    for (i, off) in offsets.iter().enumerate() {
        let len = if *off == size - 512 { 511 } else { 512 };
        script.push("-c".to_string());
        script.push(format!("read -P {} {off} {len}", 0x11 + i));
    }
    script.extend(["-c".into(), format!("read -P 0x7e {} 1", size - 1)]);
    let out = check(
        Command::new("qemu-io")
            .args(["-f", "raw"])
            .args(&script)
            .arg(&uri),
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // The map now shows data where we wrote.
    let map = check(Command::new("nbdinfo").args(["--map", "--json", &uri]));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(
        map.as_array().unwrap().iter().any(|e| e["type"] == 0),
        "{map}"
    );

    // qemu-img convert in and out, compare.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let mut data = vec![0u8; size as usize];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for chunk in data.chunks_mut(8).step_by(3) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    data[(40 << 20)..(60 << 20)].fill(0); // a zero region for convert to skip
    std::fs::write(&src, &data).unwrap();
    check(
        Command::new(tool("qemu-img"))
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    check(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );
    let out_file = dir.path().join("out.raw");
    check(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&uri)
            .arg(&out_file),
    );
    assert!(
        std::fs::read(&out_file).unwrap() == data,
        "qemu-img convert out differs"
    );

    // nbdcopy round trip with checksums.
    let out2 = dir.path().join("out2.raw");
    check(Command::new(tool("nbdcopy")).arg(&uri).arg(&out2));
    assert_eq!(sha256(&out2), sha256(&src));
    check(Command::new(tool("nbdcopy")).arg("--").arg(&out2).arg(&uri));
    check(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(&uri),
    );

    // fio's nbd engine with verification.
    let fio = check(Command::new(tool("fio")).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=16m",
        "--iodepth=32",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--do_verify=1",
        "--randrepeat=0",
        "--output-format=json",
    ]));
    let fio: serde_json::Value =
        serde_json::from_str(fio.trim_start_matches(|ch| ch != '{')).unwrap();
    assert_eq!(fio["jobs"][0]["error"], 0, "{fio}");

    // Several connections at once, each writing its own region; then everything verifies.
    let children: Vec<_> = (0..4u64)
        .map(|i| {
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P {} {} 4M", 0xa0 + i, (96 << 20) + i * (4 << 20)),
                ])
                .arg(&uri)
                .output()
        })
        .collect();
    for ch in children {
        assert!(ch.unwrap().status.success());
    }
    for i in 0..4u64 {
        let out = check(
            Command::new("qemu-io")
                .args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("read -P {} {} 4M", 0xa0 + i, (96 << 20) + i * (4 << 20)),
                ])
                .arg(&uri),
        );
        assert!(!out.contains("verification failed"), "{out}");
    }
}

fn sha256(path: &std::path::Path) -> String {
    check(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn agent_killed_and_restarted_keeps_flushed_data() {
    let mut c = Cluster::start(1);
    c.tandem(&["volume", "create", "keep", "32MiB"]);
    let uri = c.connect("keep");
    check(
        Command::new(tool("qemu-io"))
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x5a 0 4M",
                "-c",
                "write -P 0xa5 28M 4M",
                "-c",
                "flush",
            ])
            .arg(&uri),
    );

    let pid = c.agent_pid("node1").expect("agent.pid");
    // SAFETY: the agent process of this test's cluster.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_until(Duration::from_secs(10), "agent to die", || {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (st.is_empty() || st.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
            .then_some(())
    });

    c.restart_agent("node1");
    let uri = c.wait_export("keep");
    let out = check(
        Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                "read -P 0x5a 0 4M",
                "-c",
                "read -P 0xa5 28M 4M",
                "-c",
                "read -P 0 4M 24M",
            ])
            .arg(&uri),
    );
    assert!(!out.contains("verification failed"), "{out}");
    let v = c.json(&["volume", "show", "keep"]);
    assert_eq!(v["replicas"][0]["disk_state"], "UpToDate");
}

#[test]
fn up_again_reuses_state_and_ctrl_c_stops_everything() {
    let mut c = Cluster::start(2);
    c.tandem(&["volume", "create", "persist", "16MiB"]);
    let uri = c.connect("persist");
    check(
        Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "write -P 0x42 1M 1M"])
            .arg(&uri),
    );
    let pids: Vec<i32> = ["node1", "node2"]
        .iter()
        .filter_map(|n| c.agent_pid(n))
        .collect();
    assert_eq!(pids.len(), 2);

    let status = c.down();
    assert!(status.success(), "tandem up exited with {status}");
    for pid in &pids {
        // SAFETY: existence check only.
        assert!(
            unsafe { libc::kill(*pid, 0) } != 0,
            "agent {pid} still running after Ctrl-C"
        );
    }
    assert!(
        !c.path().join("node1/agent.pid").exists(),
        "pid file left behind"
    );
    assert!(
        !c.path().join("controller/controller.pid").exists(),
        "pid file left behind"
    );

    c.up();
    let v = c.json(&["volume", "list"]);
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "persist");
    let uri = c.wait_export("persist");
    let out = check(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x42 1M 1M"])
            .arg(&uri),
    );
    assert!(!out.contains("verification failed"), "{out}");
}

//! End to end with real processes: `tandem up --experimental-replication`, a volume with two
//! replicas placed on two nodes plus a witness on the third, every placement reported; writes
//! through the Primary reach both data files; a killed Secondary catches up by a bitmap resync.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

#[test]
fn two_replicas_and_a_witness_over_three_nodes() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    // Every node has a node id and a replication address.
    let nodes = c.json(&["node", "list"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let mut ids: Vec<u64> = nodes
        .iter()
        .map(|n| n["node_id"].as_u64().expect("node id"))
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{nodes:?}");
    for n in nodes {
        let a = n["repl_addr"].as_str().expect("repl addr");
        assert!(a.starts_with("127.0.0.1:") && !a.ends_with(":0"), "{a}");
    }

    let v = c.json(&["volume", "create", "mirror", "16MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let v = c.wait_json(
        &["volume", "show", "mirror"],
        "all three placements reported",
        |v: &Value| {
            v["replicas"].as_array().unwrap().iter().all(|r| {
                r["disk_state"] == "UpToDate"
                    || (r["diskless"] == true && r["disk_state"] == "Diskless")
            })
        },
    );
    let reps = v["replicas"].as_array().unwrap();
    assert_eq!(reps.len(), 3, "{v:#}");
    let diskful: Vec<&str> = reps
        .iter()
        .filter(|r| r["diskless"] == false)
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    let witness: Vec<&str> = reps
        .iter()
        .filter(|r| r["diskless"] == true)
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(diskful.len(), 2, "{v:#}");
    assert_eq!(witness.len(), 1, "{v:#}");
    assert!(!diskful.contains(&witness[0]));
    assert_eq!(v["quorum"], true);
    // Files on the two diskful nodes only (the agent tests check the metadata's node id).
    for n in ["node1", "node2", "node3"] {
        let pool = c.node_dir(n).join("pool");
        let has = pool.join("mirror.meta").exists();
        assert_eq!(has, diskful.contains(&n), "{n}: {}", pool.display());
        let secret = c.node_dir(n).join("state/cluster_secret");
        assert!(secret.exists(), "{}", secret.display());
    }
    let text = c.tandem(&["volume", "show", "mirror"]);
    assert!(text.contains("(diskless)"), "{text}");
    c.tandem(&["volume", "delete", "mirror"]);
}

fn diskful(v: &Value) -> Vec<&Value> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["diskless"] == false)
        .collect()
}

/// Both diskful replicas UpToDate and connected, no out-of-sync bytes, the Primary has quorum.
fn in_sync(v: &Value) -> bool {
    let d = diskful(v);
    d.len() == 2
        && d.iter().all(|r| {
            r["disk_state"] == "UpToDate"
                && r["out_of_sync_bytes"] == 0
                && r["peers"].as_array().is_some_and(|p| {
                    !p.is_empty() && p.iter().all(|p| p["repl_state"] == "Established")
                })
        })
        && d.iter()
            .any(|r| r["role"] == "Primary" && r["quorum"] == true)
}

fn node_of<'a>(v: &'a Value, role: &str) -> &'a str {
    diskful(v)
        .into_iter()
        .find(|r| r["role"] == role)
        .and_then(|r| r["node"].as_str())
        .unwrap_or_else(|| panic!("no {role}: {v:#}"))
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = check(cmd.arg(uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    out
}

fn same_files(c: &Cluster, a: &str, b: &str, volume: &str) {
    let fa = std::fs::read(c.node_dir(a).join("pool").join(format!("{volume}.data"))).unwrap();
    let fb = std::fs::read(c.node_dir(b).join("pool").join(format!("{volume}.data"))).unwrap();
    assert_eq!(fa.len(), fb.len());
    let first = fa.iter().zip(&fb).position(|(x, y)| x != y);
    assert!(first.is_none(), "{a} and {b} differ at byte {first:?}");
}

#[test]
fn replicated_writes_and_resync_after_a_secondary_crash() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    const SIZE: u64 = 64 << 20;
    let v = c.json(&["volume", "create", "r", "64MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let v = c.wait_json(
        &["volume", "show", "r"],
        "both replicas UpToDate and connected, a Primary with quorum",
        in_sync,
    );
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();

    // `volume connect` points at the Primary.
    let uri = c.connect("r");
    assert!(
        uri.contains(&primary) && !uri.contains(&secondary),
        "{uri} should name {primary}'s socket"
    );
    let offsets: Vec<u64> = vec![0, 1 << 20, 17 << 20, SIZE - 65536];
    let mut cmds: Vec<String> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} 65536", 0x21 + i))
        .collect();
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    let reads: Vec<String> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| format!("read -P {} {o} 65536", 0x21 + i))
        .collect();
    qemu_io(&uri, &reads);
    // The Secondary serves only through its driver, which refuses I/O (not Primary).
    let sec_uri = c
        .tandem(&["volume", "connect", "r", "--node", &secondary])
        .trim()
        .to_string();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 4096", "-c", "flush"])
        .arg(&sec_uri));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("error") || text.contains("failed"),
        "a write through the Secondary must fail: {text}"
    );
    c.wait_json(&["volume", "show", "r"], "in sync after writes", in_sync);
    same_files(&c, &primary, &secondary, "r");

    // Kill the Secondary's agent: the Primary and the witness keep quorum, writes go on.
    let pid = c.agent_pid(&secondary).expect("agent.pid");
    // SAFETY: signalling an agent of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid_exit(pid, "the agent to die");
    let more: Vec<u64> = vec![8 << 20, 40 << 20];
    let mut cmds: Vec<String> = more
        .iter()
        .enumerate()
        .map(|(i, o)| format!("write -P {} {o} 131072", 0x61 + i))
        .collect();
    cmds.push("flush".into());
    qemu_io(&uri, &cmds);
    // Reports arrive with each agent's sync (long poll): wait until the Primary reports the
    // blocks the Secondary missed, so the in-sync state below is not an old report.
    c.wait_json(
        &["volume", "show", "r"],
        "the Primary to report out-of-sync blocks toward the dead Secondary",
        |v| {
            diskful(v).iter().any(|r| {
                r["node"] == primary.as_str()
                    && r["quorum"] == true
                    && r["out_of_sync_bytes"].as_u64().unwrap_or(0) > 0
            })
        },
    );

    c.restart_agent(&secondary);
    let v = c.wait_json(
        &["volume", "show", "r"],
        "the restarted Secondary UpToDate again after a resync",
        |v| {
            in_sync(v)
                && diskful(v).iter().any(|r| {
                    r["node"] == secondary.as_str()
                        && r["last_resync_bytes"].as_u64().unwrap_or(0) > 0
                })
        },
    );
    assert_eq!(node_of(&v, "Primary"), primary, "{v:#}");
    same_files(&c, &primary, &secondary, "r");
    let sec = diskful(&v)
        .into_iter()
        .find(|r| r["node"] == secondary.as_str())
        .unwrap()
        .clone();
    let resynced = sec["last_resync_bytes"].as_u64().unwrap();
    assert!(
        resynced > 0 && resynced < SIZE / 8,
        "last_resync_bytes {resynced}: {v:#}"
    );
    let reads: Vec<String> = more
        .iter()
        .enumerate()
        .map(|(i, o)| format!("read -P {} {o} 131072", 0x61 + i))
        .collect();
    qemu_io(&uri, &reads);
    eprintln!("{}", c.tandem(&["volume", "show", "r"]));

    // Delete: drivers stop, files go (the witness's metadata too); a new volume of the same
    // name replicates again.
    let witness = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["diskless"] == true)
        .and_then(|r| r["node"].as_str())
        .unwrap()
        .to_string();
    c.tandem(&["volume", "delete", "r"]);
    wait_until(Duration::from_secs(60), "the volume to be gone", || {
        let out = run(c.cli().args(["volume", "show", "r"]));
        (!out.status.success()).then_some(())
    });
    for n in [&primary, &secondary] {
        let f = c.node_dir(n).join("pool/r.meta");
        wait_until(Duration::from_secs(30), "replica files removed", || {
            (!f.exists()).then_some(())
        });
    }
    let wm = c.node_dir(&witness).join("state/witness/r.meta");
    wait_until(Duration::from_secs(30), "witness metadata removed", || {
        (!wm.exists()).then_some(())
    });
    let v = c.json(&["volume", "create", "r", "16MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    c.wait_json(&["volume", "show", "r"], "the new volume in sync", in_sync);
}

#[test]
fn primary_agent_orderly_restart_is_primary_again() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    c.json(&["volume", "create", "p", "16MiB", "--replicas", "2"]);
    let v = c.wait_json(&["volume", "show", "p"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.connect("p");
    qemu_io(&uri, &["write -P 0x42 0 65536".into(), "flush".into()]);

    // An orderly stop (SIGTERM: the agent demotes, then stops the driver); the restarted
    // agent promotes the designated Primary again and the data is still there.
    let pid = c.agent_pid(&primary).expect("agent.pid");
    // SAFETY: signalling an agent of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_pid_exit(pid, "the agent to exit");
    c.restart_agent(&primary);
    let v = c.wait_json(&["volume", "show", "p"], "Primary again and in sync", |v| {
        in_sync(v) && node_of_opt(v, "Primary") == Some(primary.as_str())
    });
    assert_eq!(node_of(&v, "Secondary"), secondary);
    let uri = c.wait_export("p");
    qemu_io(
        &uri,
        &[
            "read -P 0x42 0 65536".into(),
            "write -P 0x43 65536 65536".into(),
            "flush".into(),
        ],
    );
    same_files(&c, &primary, &secondary, "p");
}

fn node_of_opt<'a>(v: &'a Value, role: &str) -> Option<&'a str> {
    diskful(v)
        .into_iter()
        .find(|r| r["role"] == role)
        .and_then(|r| r["node"].as_str())
}

#[test]
fn resync_rate_limit_is_set_at_creation_and_changed_while_resyncing() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&[
        "volume",
        "create",
        "t",
        "64MiB",
        "--replicas",
        "2",
        "--resync-rate",
        "1MiB",
    ]);
    assert_eq!(v["resync_rate_bytes_per_sec"], 1 << 20, "{v:#}");
    let v = c.wait_json(&["volume", "show", "t"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.connect("t");

    // 16 MiB written while the Secondary is down: at 1 MiB/s its resync takes ~16 s.
    let pid = c.agent_pid(&secondary).expect("agent.pid");
    // SAFETY: signalling an agent of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid_exit(pid, "the agent to die");
    qemu_io(&uri, &["write -P 0x33 0 16M".into(), "flush".into()]);
    c.wait_json(
        &["volume", "show", "t"],
        "the Primary to count 16 MiB out of sync",
        |v| {
            diskful(v).iter().any(|r| {
                r["node"] == primary.as_str()
                    && r["out_of_sync_bytes"].as_u64().unwrap_or(0) >= 16 << 20
            })
        },
    );
    c.restart_agent(&secondary);
    // The throttled resync is seen running, with a measured rate and an ETA.
    let v = c.wait_json(
        &["volume", "show", "t"],
        "a throttled resync in progress with rate and ETA",
        |v| {
            diskful(v).iter().any(|r| {
                r["node"] == secondary.as_str()
                    && r["resync_bytes_left"].as_u64().unwrap_or(0) > 0
                    && r["resync_bytes_per_sec"].as_u64().unwrap_or(0) > 0
                    && r["resync_eta_secs"].as_u64().is_some()
            })
        },
    );
    eprintln!("{v:#}");
    let text = c.tandem(&["volume", "show", "t"]);
    assert!(
        text.contains("Resync:    limit 1048576 B (1.00 MiB)/s"),
        "{text}"
    );
    assert!(
        text.contains("16.00 MiB)/s while the consumer does I/O"),
        "{text}"
    );
    // The dynamic controller: with a floor below the limit, a consumer writing through the
    // Primary (64 KiB every 20 ms, until the yield is seen) makes the resync yield, and says so.
    let out = c.tandem(&["volume", "set", "t", "--resync-min-rate", "256KiB"]);
    assert!(
        out.contains("256.00 KiB)/s while the consumer does I/O"),
        "{out}"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (uri, stop) = (uri.clone(), stop.clone());
        let cmds: Vec<String> = (0..50)
            .flat_map(|i| {
                [
                    format!("write -P 0x44 {} 64k", (32 << 20) + i * (64 << 10)),
                    "sleep 20".into(),
                ]
            })
            .collect();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                qemu_io(&uri, &cmds);
            }
        })
    };
    // Stops the writer also when the wait below fails.
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let guard = StopOnDrop(stop);
    c.wait_json(
        &["volume", "show", "t"],
        "the resync to yield to the consumer's writes",
        |v| {
            v["resync_min_rate_bytes_per_sec"] == 256 << 10
                && diskful(v).iter().any(|r| {
                    r["node"] == secondary.as_str()
                        && r["resync_bytes_left"].as_u64().unwrap_or(0) > 0
                        && r["resync_yielding"] == true
                })
        },
    );
    drop(guard);
    writer.join().unwrap();
    // Lifting the limit while it runs lets it finish.
    let out = c.tandem(&["volume", "set", "t", "--resync-rate", "unlimited"]);
    assert!(out.contains("unlimited"), "{out}");
    let v = c.wait_json(
        &["volume", "show", "t"],
        "the resync to finish after the limit is lifted",
        |v| {
            in_sync(v)
                && diskful(v).iter().any(|r| {
                    r["node"] == secondary.as_str()
                        && r["last_resync_bytes"].as_u64().unwrap_or(0) >= 16 << 20
                })
        },
    );
    assert_eq!(v["resync_rate_bytes_per_sec"], 0);
    let resynced = diskful(&v)
        .into_iter()
        .find(|r| r["node"] == secondary.as_str())
        .unwrap()["last_resync_bytes"]
        .as_u64()
        .unwrap();
    assert!(resynced < 32 << 20, "only what was missed: {resynced}");
    same_files(&c, &primary, &secondary, "t");
    // Bad rates are refused before anything is sent.
    let out = run(c.cli().args(["volume", "set", "t", "--resync-rate", "10G"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("GiB"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Bytes the data file of `volume` on `node` occupies on disk.
fn allocated(c: &Cluster, node: &str, volume: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let f = c.node_dir(node).join("pool").join(format!("{volume}.data"));
    std::fs::metadata(&f).unwrap().blocks() * 512
}

/// Trim and write-zeroes through the Primary's export (qemu-io over NBD) reach every replica
/// as zeros: trim and write-zeroes that may unmap punch holes in both data files (thin
/// volumes stay thin), write-zeroes with `NO_HOLE` keeps the range allocated; the data files
/// end byte-identical.
#[test]
fn trim_and_write_zeroes_reach_every_replica_as_holes() {
    use common::repl::{diskful_nodes, in_sync, qemu_io_ok, same_files};
    const MIB: u64 = 1 << 20;
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    c.json(&["volume", "create", "z", "32MiB", "--replicas", "2"]);
    let v = c.wait_json(&["volume", "show", "z"], "replicas in sync", in_sync);
    let nodes = diskful_nodes(&v);
    let uri = c.connect("z");
    let cmds = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    qemu_io_ok(&uri, &cmds(&["write -P 0x5a 0 16M", "flush"]));
    for n in &nodes {
        let a = allocated(&c, n, "z");
        assert!(
            a >= 16 * MIB,
            "{n}: {a} bytes allocated after 16 MiB written"
        );
    }
    qemu_io_ok(
        &uri,
        &cmds(&[
            "discard 0 8M",
            "write -z -u 8M 4M",
            "write -z 12M 2M",
            "flush",
            "read -P 0 0 14M",
            "read -P 0x5a 14M 2M",
        ]),
    );
    for n in &nodes {
        // 2 MiB of kept zeros and 2 MiB of data; 12 MiB punched.
        let a = allocated(&c, n, "z");
        assert!(
            (4 * MIB..7 * MIB).contains(&a),
            "{n}: {a} bytes allocated, want about 4 MiB after trimming 12 of 16"
        );
    }
    same_files(&c, &nodes[0], &nodes[1], "z");
}

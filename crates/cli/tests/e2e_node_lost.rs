//! End to end with real processes: an agent killed for good, `tandem node lost`: every
//! affected volume gets its replica count back on the remaining nodes with a full resync of a
//! new member, and the data is identical.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn replicas(v: &Value) -> &Vec<Value> {
    v["replicas"].as_array().unwrap()
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = check(cmd.arg(uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

#[test]
fn node_lost_restores_the_replica_count_elsewhere_with_a_full_resync() {
    const SIZE: u64 = 32 << 20;
    let c = Cluster::start_with(4, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "r", "32MiB", "--replicas", "2"]);
    let primary = v["primary_node"].as_str().unwrap().to_string();
    let lost = replicas(&v)
        .iter()
        .find(|r| r["diskless"] == false && r["node"] != primary.as_str())
        .and_then(|r| r["node"].as_str())
        .unwrap()
        .to_string();
    let used: Vec<String> = replicas(&v)
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    let spare = ["node1", "node2", "node3", "node4"]
        .into_iter()
        .find(|n| !used.iter().any(|u| u == n))
        .unwrap()
        .to_string();
    c.wait_json(&["volume", "show", "r"], "in sync", |v| {
        replicas(v)
            .iter()
            .all(|r| r["disk_state"] == "UpToDate" || r["disk_state"] == "Diskless")
            && replicas(v).iter().any(|r| r["role"] == "Primary")
    });
    let uri = c.connect("r");
    qemu_io(
        &uri,
        &["write -P 0x3c 1M 4M", "write -P 0x3d 30M 1M", "flush"],
    );

    // The Secondary's host dies for good.
    let pid = c.agent_pid(&lost).expect("agent.pid");
    // SAFETY: signalling an agent of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_pid_exit(pid, "the agent to die");
    // Declaring a node lost while it is online is refused.
    let out = run(c.cli().args(["node", "lost", &primary]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("online"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.wait_json(&["node", "list"], "the node offline", |n| {
        n.as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == lost.as_str() && n["state"] == "offline")
    });
    // Writes go on meanwhile (Primary + witness keep quorum).
    qemu_io(&uri, &["write -P 0x3e 8M 1M", "flush"]);

    // One command: replan and wait until the volume is whole again.
    let out = c.tandem(&["node", "lost", &lost]);
    eprintln!("{out}");
    assert!(out.contains(&format!("new replica on {spare}")), "{out}");
    assert!(out.contains("r: in sync"), "{out}");
    let v = c.wait_json(&["volume", "show", "r"], "the new replica in sync", |v| {
        replicas(v).iter().any(|r| {
            r["node"] == spare.as_str()
                && r["disk_state"] == "UpToDate"
                && r["last_resync_bytes"].as_u64().unwrap_or(0) > 0
        })
    });
    eprintln!("{}", c.tandem(&["volume", "show", "r"]));
    let nodes: Vec<&str> = replicas(&v)
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes.len(), 3, "two diskful + witness again: {v:#}");
    assert!(!nodes.contains(&lost.as_str()), "{v:#}");
    assert_eq!(
        replicas(&v)
            .iter()
            .filter(|r| r["diskless"] == false)
            .count(),
        2
    );
    let new = replicas(&v)
        .iter()
        .find(|r| r["node"] == spare.as_str())
        .unwrap();
    assert_eq!(
        new["last_resync_bytes"].as_u64().unwrap(),
        SIZE,
        "a new member receives the whole volume: {v:#}"
    );
    let node_list = c.json(&["node", "list"]);
    assert!(
        !node_list
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == lost.as_str()),
        "{node_list:#}"
    );
    // A node that holds replicas cannot simply be removed.
    let out = run(c.cli().args(["node", "remove", &primary]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node_in_use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The data: identical files, patterns read back, writes replicate to the new member.
    let file = |n: &str| std::fs::read(c.node_dir(n).join("pool/r.data")).unwrap();
    assert!(file(&primary) == file(&spare), "replicas differ");
    qemu_io(
        &uri,
        &[
            "read -P 0x3c 1M 4M",
            "read -P 0x3e 8M 1M",
            "read -P 0x3d 30M 1M",
            "write -P 0x3f 12M 1M",
            "flush",
        ],
    );
    wait_until(
        Duration::from_secs(30),
        "the new write on the new member",
        || (file(&primary) == file(&spare)).then_some(()),
    );
    // The node-lost operation finished: its steps completed as the new member got in sync.
    let v = c.wait_json(
        &["volume", "show", "r"],
        "the node-lost operation done",
        |v| {
            v["operations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["kind"] == "node-lost" && o["state"] == "done")
        },
    );
    let op = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == "node-lost")
        .unwrap();
    assert_eq!(op["progress"].as_f64(), Some(1.0), "{op:#}");
    // Online verify of the restored pair finds no difference.
    let r = c.json(&["volume", "verify", "r"]);
    assert_eq!(r["checked_bytes"], SIZE, "{r:#}");
    assert_eq!(r["different_bytes"], 0, "{r:#}");
}

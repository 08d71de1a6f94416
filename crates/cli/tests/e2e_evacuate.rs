//! End to end with real processes: `tandem node evacuate` moves a volume's witness and then
//! its Primary replica off nodes while the data stays readable, the emptied nodes can be
//! removed, and a node whose volume has nowhere to go is refused per volume.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn replicas(v: &Value) -> &Vec<Value> {
    v["replicas"].as_array().unwrap()
}

fn nodes_of(v: &Value) -> Vec<String> {
    replicas(v)
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect()
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

/// (Primary, Secondary, witness) of a fresh 2-replica volume from `volume create -o json`.
fn placed(v: &Value) -> (String, String, String) {
    let primary = v["primary_node"].as_str().unwrap().to_string();
    let node = |f: &dyn Fn(&Value) -> bool| {
        replicas(v)
            .iter()
            .find(|r| f(r))
            .and_then(|r| r["node"].as_str())
            .unwrap()
            .to_string()
    };
    let witness = node(&|r| r["diskless"] == true);
    let secondary = node(&|r| r["diskless"] == false && r["node"] != primary.as_str());
    (primary, secondary, witness)
}

/// The nodes of an `n`-node cluster (node1..) holding nothing of `v`.
fn free_nodes(v: &Value, n: usize) -> Vec<String> {
    (1..=n)
        .map(|i| format!("node{i}"))
        .filter(|name| !nodes_of(v).contains(name))
        .collect()
}

/// Decommissions a host: its agent stops for good (else it registers again) and the
/// controller sees the node offline (`node remove` refuses an online node).
fn stop_agent(c: &Cluster, node: &str) {
    let pid = c.agent_pid(node).expect("agent.pid");
    // SAFETY: signalling an agent of this test's cluster.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_pid_exit(pid, "the agent to stop");
    c.wait_json(&["node", "list"], "the node offline", |n| {
        n.as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == node && n["state"] == "offline")
    });
}

/// `volume move VOLUME --from FROM --to TO --no-wait`, then waits until the new replica on
/// TO is resyncing (bytes left), i.e. the move is half-way.
fn start_move(c: &Cluster, volume: &str, from: &str, to: &str) {
    c.tandem(&[
        "volume",
        "move",
        volume,
        "--from",
        from,
        "--to",
        to,
        "--no-wait",
    ]);
    c.wait_json(
        &["volume", "show", volume],
        "the new replica resyncing",
        |v| {
            replicas(v)
                .iter()
                .any(|r| r["node"] == to && r["resync_bytes_left"].as_u64() > Some(0))
        },
    );
}

fn whole(v: &Value) -> bool {
    replicas(v).iter().all(|r| {
        if r["diskless"] == true {
            r["disk_state"] == "Diskless"
        } else {
            r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0
        }
    }) && replicas(v).iter().any(|r| r["role"] == "Primary")
}

fn evacuate_done(v: &Value) -> bool {
    v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "evacuate")
        .all(|o| o["state"] == "done")
}

#[test]
fn evacuate_moves_the_witness_then_the_primary_replica_and_the_nodes_can_go() {
    const SIZE: u64 = 32 << 20;
    const WRITTEN: u64 = 5 << 20;
    let c = Cluster::start_with(5, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "r", "32MiB", "--replicas", "2"]);
    let (primary, secondary, witness) = placed(&v);
    c.wait_json(&["volume", "show", "r"], "in sync", whole);
    qemu_io(
        &c.connect("r"),
        &["write -P 0x51 0 4M", "write -P 0x52 31M 1M", "flush"],
    );

    // The witness's node first: the witness moves to a node without a placement.
    let out = c.tandem(&["node", "evacuate", &witness]);
    eprintln!("{out}");
    assert!(out.contains("new witness on"), "{out}");
    assert!(out.contains("r: moved"), "{out}");
    let v = c.wait_json(&["volume", "show", "r"], "the witness moved", |v| {
        whole(v) && evacuate_done(v) && !nodes_of(v).contains(&witness)
    });
    assert_eq!(replicas(&v).len(), 3, "{v:#}");
    assert_eq!(
        replicas(&v)
            .iter()
            .filter(|r| r["diskless"] == true)
            .count(),
        1,
        "{v:#}"
    );
    stop_agent(&c, &witness);
    c.tandem(&["node", "remove", &witness]);
    let used = nodes_of(&v);
    let spare = ["node1", "node2", "node3", "node4", "node5"]
        .into_iter()
        .find(|n| *n != witness && !used.iter().any(|u| u == n))
        .unwrap()
        .to_string();

    // The Primary's node: a new replica on the spare node, the Primary moves to the replica
    // that stays, the old one is deleted.
    let out = c.tandem(&["node", "evacuate", &primary]);
    eprintln!("{out}");
    assert!(out.contains(&format!("new replica on {spare}")), "{out}");
    assert!(out.contains("Primary moves to"), "{out}");
    assert!(out.contains("r: moved"), "{out}");
    let v = c.wait_json(
        &["volume", "show", "r"],
        "whole without the Primary's node",
        |v| whole(v) && evacuate_done(v) && !nodes_of(v).contains(&primary),
    );
    eprintln!("{}", c.tandem(&["volume", "show", "r"]));
    assert_eq!(replicas(&v).len(), 3, "two diskful + witness: {v:#}");
    let new = replicas(&v)
        .iter()
        .find(|r| r["node"] == spare.as_str())
        .expect("a replica on the spare node");
    assert_eq!(new["diskless"], false, "{v:#}");
    // A full resync copied the whole volume to the new member: the 5 MiB of data, the rest
    // as zero ranges that stay holes (protocol version 8), so it is as thin as its source.
    // (Its `last_resync_bytes` is not checked: the driver restarts when the old member
    // leaves, and that counter lives in the driver.)
    let allocated = new["allocated_bytes"].as_u64().unwrap();
    assert!(
        (WRITTEN..WRITTEN + (1 << 20)).contains(&allocated),
        "the new member holds the data and stays thin ({allocated} of {SIZE} bytes): {v:#}"
    );
    // Once: the replica that stays (a paused source) dropped its full-resync marks when the
    // new member finished from the Primary, instead of copying the volume a second time.
    let log = c.agent_log(&spare);
    let copies: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("resync from node") && l.contains(&format!("done: {SIZE} bytes")))
        .collect();
    assert_eq!(copies.len(), 1, "whole-volume resyncs into {spare}:\n{log}");
    assert_eq!(
        v["primary_node"].as_str(),
        Some(secondary.as_str()),
        "{v:#}"
    );
    let ops: Vec<&Value> = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "evacuate")
        .collect();
    assert_eq!(ops.len(), 2, "{v:#}");
    assert!(
        ops.iter().all(|o| o["progress"].as_f64() == Some(1.0)),
        "{v:#}"
    );
    // The old node deleted its copy; the two replicas are identical.
    wait_until(
        std::time::Duration::from_secs(30),
        "the evacuated node's replica deleted",
        || (!c.node_dir(&primary).join("pool/r.meta").exists()).then_some(()),
    );
    let left: Vec<_> = std::fs::read_dir(c.node_dir(&primary).join("pool"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
    let diskful: Vec<String> = replicas(&v)
        .iter()
        .filter(|r| r["diskless"] == false)
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    let file = |n: &str| std::fs::read(c.node_dir(n).join("pool/r.data")).unwrap();
    assert!(file(&diskful[0]) == file(&diskful[1]), "replicas differ");
    let uri = c.connect("r");
    qemu_io(
        &uri,
        &[
            "read -P 0x51 0 4M",
            "read -P 0x52 31M 1M",
            "write -P 0x53 8M 1M",
            "flush",
        ],
    );
    // Nothing left there: the host is decommissioned and the node removed.
    stop_agent(&c, &primary);
    c.tandem(&["node", "remove", &primary]);

    // Three nodes left, all holding a placement of r: the secondary's replica has nowhere to
    // go, so evacuating it is refused for that volume, with the reason, and nothing changes.
    let out = run(c.cli().args(["node", "evacuate", &secondary]));
    let (stdout, err) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success(), "{stdout}{err}");
    assert!(err.contains("could not move: r"), "{err}");
    assert!(stdout.contains("not moved"), "{stdout}");
    let after = c.json(&["volume", "show", "r"]);
    assert_eq!(nodes_of(&after), nodes_of(&v), "nothing changed: {after:#}");
}

/// `tandem volume move`: the Primary's replica moves to a node without one, online, with a
/// consumer's data intact; the witness moves too; refusals name what is wrong.
#[test]
fn volume_move_moves_the_primary_replica_and_the_witness_online() {
    const SIZE: u64 = 32 << 20;
    const WRITTEN: u64 = 5 << 20;
    let c = Cluster::start_with(5, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "m", "32MiB", "--replicas", "2"]);
    let (primary, secondary, witness) = placed(&v);
    let free = free_nodes(&v, 5);
    assert_eq!(free.len(), 2);
    c.wait_json(&["volume", "show", "m"], "in sync", whole);
    qemu_io(
        &c.connect("m"),
        &["write -P 0x61 0 4M", "write -P 0x62 31M 1M", "flush"],
    );

    // Refusals, each with its code, and nothing changes.
    let refused = |args: &[&str], code: &str| {
        let out = run(c.cli().args(["volume", "move", "m"]).args(args));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(err.contains(code), "{args:?}: {err}");
    };
    refused(&["--from", &free[0], "--to", &free[1]], "no_replica");
    refused(&["--from", &primary, "--to", &secondary], "already_placed");
    refused(&["--from", &primary, "--to", &primary], "same_node");
    refused(
        &["--from", &primary, "--to", &format!("{}:nopool", free[0])],
        "no pool 'nopool'",
    );
    assert_eq!(nodes_of(&c.json(&["volume", "show", "m"])), nodes_of(&v));

    // The Primary's replica moves; the Primary moves to the replica that stays.
    let out = c.tandem(&["volume", "move", "m", "--from", &primary, "--to", &free[0]]);
    eprintln!("{out}");
    assert!(out.contains("Moved: volume m is on"), "{out}");
    let v = c.wait_json(&["volume", "show", "m"], "whole after the move", whole);
    assert!(!nodes_of(&v).contains(&primary), "{v:#}");
    assert!(nodes_of(&v).contains(&free[0]), "{v:#}");
    assert_eq!(
        v["primary_node"].as_str(),
        Some(secondary.as_str()),
        "{v:#}"
    );
    let op = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| o["kind"] == "move")
        .expect("a move operation");
    assert_eq!(op["state"], "done", "{v:#}");
    let new = replicas(&v)
        .iter()
        .find(|r| r["node"] == free[0].as_str())
        .unwrap();
    let allocated = new["allocated_bytes"].as_u64().unwrap();
    assert!(
        (WRITTEN..WRITTEN + (1 << 20)).contains(&allocated),
        "the moved replica holds the data and stays thin ({allocated} of {SIZE} bytes): {v:#}"
    );
    wait_until(
        std::time::Duration::from_secs(30),
        "the old replica deleted",
        || (!c.node_dir(&primary).join("pool/m.meta").exists()).then_some(()),
    );
    let file = |n: &str| std::fs::read(c.node_dir(n).join("pool/m.data")).unwrap();
    assert!(file(&secondary) == file(&free[0]), "replicas differ");
    qemu_io(
        &c.connect("m"),
        &["read -P 0x61 0 4M", "read -P 0x62 31M 1M"],
    );

    // The witness moves to the node the replica left.
    let out = c.tandem(&["volume", "move", "m", "--from", &witness, "--to", &primary]);
    assert!(out.contains(&format!("{primary} (witness)")), "{out}");
    let v = c.wait_json(
        &["volume", "show", "m"],
        "whole after the witness move",
        whole,
    );
    assert!(!nodes_of(&v).contains(&witness), "{v:#}");
    assert_eq!(replicas(&v).len(), 3, "{v:#}");
}

/// The controller is SIGKILLed while a move's new replica resyncs (held to 8 MiB/s) and
/// started again on its store: the stored operation resumes where it was (the Primary moves,
/// the old replica goes) without any command.
#[test]
fn controller_killed_during_a_move_resumes_it_after_a_restart() {
    let mut c = Cluster::start_with(4, &["--experimental-replication"]);
    let v = c.json(&[
        "volume",
        "create",
        "k",
        "64MiB",
        "--replicas",
        "2",
        "--resync-rate",
        "8MiB",
    ]);
    let primary = v["primary_node"].as_str().unwrap().to_string();
    let spare = free_nodes(&v, 4).remove(0);
    c.wait_json(&["volume", "show", "k"], "in sync", whole);
    qemu_io(&c.connect("k"), &["write -P 0x71 0 8M", "flush"]);
    start_move(&c, "k", &primary, &spare);
    c.kill_controller(libc::SIGKILL);
    c.restart_controller();
    let v = c.wait_json(&["volume", "show", "k"], "the move finished", |v| {
        whole(v)
            && !nodes_of(v).contains(&primary)
            && v["operations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|o| o["kind"] == "move" && o["state"] == "done")
    });
    assert!(nodes_of(&v).contains(&spare), "{v:#}");
    assert_ne!(v["primary_node"].as_str(), Some(primary.as_str()), "{v:#}");
    let moves = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["kind"] == "move")
        .count();
    assert_eq!(moves, 1, "one operation, resumed: {v:#}");
    wait_until(
        std::time::Duration::from_secs(30),
        "the old replica deleted",
        || (!c.node_dir(&primary).join("pool/k.meta").exists()).then_some(()),
    );
    qemu_io(&c.connect("k"), &["read -P 0x71 0 8M"]);
}

/// `tandem volume abort` undoes a move whose new replica is still resyncing: the new copy is
/// dropped and deleted, the volume stays where it was with its Primary and data; operations
/// that cannot be undone are refused.
#[test]
fn volume_abort_undoes_a_move_before_the_old_copy_leaves() {
    let c = Cluster::start_with(4, &["--experimental-replication"]);
    c.json(&[
        "volume",
        "create",
        "a",
        "64MiB",
        "--replicas",
        "2",
        "--resync-rate",
        "4MiB",
    ]);
    let v = c.wait_json(&["volume", "show", "a"], "in sync", whole);
    let primary = v["primary_node"].as_str().unwrap().to_string();
    let spare = free_nodes(&v, 4).remove(0);
    qemu_io(&c.connect("a"), &["write -P 0x81 0 4M", "flush"]);
    let out = run(c.cli().args(["volume", "abort", "a"]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no_operation"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_move(&c, "a", &primary, &spare);
    let out = c.tandem(&["volume", "abort", "a"]);
    eprintln!("{out}");
    assert!(out.contains("Aborted the move of volume a"), "{out}");
    let mut orig = nodes_of(&v);
    orig.sort();
    let v = c.wait_json(&["volume", "show", "a"], "back where it was", |v| {
        let mut now = nodes_of(v);
        now.sort();
        whole(v) && now == orig
    });
    assert_eq!(v["primary_node"].as_str(), Some(primary.as_str()), "{v:#}");
    let op = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| o["kind"] == "move")
        .unwrap();
    assert_eq!(op["state"], "aborted", "{v:#}");
    wait_until(
        std::time::Duration::from_secs(30),
        "the new copy deleted",
        || (!c.node_dir(&spare).join("pool/a.meta").exists()).then_some(()),
    );
    qemu_io(&c.connect("a"), &["read -P 0x81 0 4M"]);
    // Nothing running any more.
    let out = run(c.cli().args(["volume", "abort", "a"]));
    assert!(!out.status.success());
}

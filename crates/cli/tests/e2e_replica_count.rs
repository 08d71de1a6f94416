//! End to end with real processes: `tandem volume add-replica` / `remove-replica` change a
//! volume's replica count online, 1 -> 2 -> 3 -> 2 -> 1 on three nodes, with the witness
//! following the count (added at 2, turned into the third replica, added back on the node
//! that gave up its replica, dropped at 1), while the data written in between stays readable
//! and the replicas end identical.

mod common;

use common::repl::*;
use common::*;
use serde_json::Value;

const VOL: &str = "rc";

fn replicas(v: &Value) -> &Vec<Value> {
    v["replicas"].as_array().unwrap()
}

/// `n` diskful replicas UpToDate with nothing out of sync, every link Established, the
/// witness (if any) Diskless, and one Primary (when replicated).
fn settled(v: &Value, n: usize, witness: bool) -> bool {
    let all = replicas(v);
    let d = diskful(v);
    let w = all.iter().filter(|r| r["diskless"] == true).count();
    d.len() == n
        && w == usize::from(witness)
        && d.iter()
            .all(|r| r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0)
        && all
            .iter()
            .filter(|r| r["diskless"] == true)
            .all(|r| r["disk_state"] == "Diskless")
        && (all.len() == 1
            || all.iter().all(|r| {
                r["peers"].as_array().is_some_and(|p| {
                    p.len() == all.len() - 1 && p.iter().all(|p| p["repl_state"] == "Established")
                })
            }) && d.iter().filter(|r| r["role"] == "Primary").count() == 1)
        && v["operations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["state"] == "done")
}

/// Writes `pattern` at `offset` (MiB) through the volume's export and reads back every
/// pattern written so far.
fn write_and_check(c: &Cluster, written: &mut Vec<(u64, u64, u8)>, offset: u64, pattern: u8) {
    written.push((offset << 20, 1 << 20, pattern));
    let uri = c.connect(VOL);
    let mut cmds = writes(&written[written.len() - 1..]);
    cmds.push("flush".into());
    cmds.extend(reads(written));
    qemu_io_ok(&uri, &cmds);
}

/// A consumer holding the volume's export open (qemu-io sleeping) until dropped.
struct HeldOpen(std::process::Child);

impl HeldOpen {
    fn start(c: &Cluster) -> HeldOpen {
        let child = std::process::Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "sleep 120000", &c.connect(VOL)])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-io");
        let held = HeldOpen(child);
        c.wait_json(&["volume", "show", VOL], "the consumer connected", |v| {
            replicas(v).iter().any(|r| r["connections"] == 1)
        });
        held
    }
}

impl Drop for HeldOpen {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn data_file(c: &Cluster, node: &str) -> std::path::PathBuf {
    c.node_dir(node).join("pool").join(format!("{VOL}.data"))
}

#[test]
fn replica_count_goes_up_to_three_and_back_to_one_online() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", VOL, "32MiB", "--replicas", "1"]);
    let first = diskful(&v)[0]["node"].as_str().unwrap().to_string();
    let mut written = Vec::new();
    write_and_check(&c, &mut written, 0, 0x11);

    // A consumer connected to the single replica's file export: refused (its connection
    // would bypass replication), then allowed once it is gone.
    let held = HeldOpen::start(&c);
    c.refused(&["volume", "add-replica", VOL], "in_use");
    drop(held);
    c.wait_json(&["volume", "show", VOL], "no consumer", |v| {
        replicas(v)[0]["connections"] == 0
    });

    // 1 -> 2: a new replica on another node, resynced fully, and a witness on the third.
    let out = c.tandem(&["volume", "add-replica", VOL]);
    eprintln!("{out}");
    assert!(out.contains("add a witness on"), "{out}");
    let v = c.wait_json(&["volume", "show", VOL], "2 replicas + witness", |v| {
        settled(v, 2, true)
    });
    assert_eq!(v["replica_count"], 2, "{v:#}");
    assert_eq!(node_of(&v, "Primary"), first, "the Primary stays: {v:#}");
    let second = node_of(&v, "Secondary").to_string();
    let witness = witness_of(&v).to_string();
    assert!(
        replica(&v, &second)["last_resync_bytes"].as_u64().unwrap() > 0,
        "the new replica was resynced: {v:#}"
    );
    write_and_check(&c, &mut written, 8, 0x22);

    // Refusals: nothing left to place on by name, the witness is no replica to remove,
    // the Primary's replica goes only after a promote.
    c.refused(
        &["volume", "add-replica", VOL, "--to", &second],
        "already_placed",
    );
    c.refused(&["volume", "remove-replica", VOL, &witness], "is_witness");
    c.refused(&["volume", "remove-replica", VOL, &first], "is_primary");

    // 2 -> 3: no free node left, so the witness's node turns its witness into the replica.
    let out = c.tandem(&["volume", "add-replica", VOL]);
    eprintln!("{out}");
    assert!(
        out.contains(&format!("remove the witness on {witness}")),
        "{out}"
    );
    let v = c.wait_json(&["volume", "show", VOL], "3 replicas", |v| {
        settled(v, 3, false)
    });
    assert_eq!(v["replica_count"], 3, "{v:#}");
    c.refused(&["volume", "add-replica", VOL], "too_many");
    write_and_check(&c, &mut written, 16, 0x33);
    let verify = c.json(&["volume", "verify", VOL]);
    assert_eq!(verify["checked_bytes"], 32u64 << 20, "{verify:#}");
    assert_eq!(verify["different_bytes"], 0, "{verify:#}");

    // 3 -> 2: the replica on `second` goes; a witness is needed again and only that node is
    // free, so it takes it once its data file is gone.
    let out = c.tandem(&["volume", "remove-replica", VOL, &second]);
    eprintln!("{out}");
    let v = c.wait_json(&["volume", "show", VOL], "2 replicas + witness", |v| {
        settled(v, 2, true)
    });
    assert_eq!(witness_of(&v), second, "{v:#}");
    assert!(!data_file(&c, &second).exists(), "its data file is deleted");
    write_and_check(&c, &mut written, 24, 0x44);
    let others: Vec<String> = diskful(&v)
        .iter()
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    same_files(&c, &others[0], &others[1], VOL);

    // 2 -> 1: the Secondary goes, and the witness with it; not while a consumer is
    // connected to the replica that stays.
    let secondary = node_of(&v, "Secondary").to_string();
    let held = HeldOpen::start(&c);
    c.refused(&["volume", "remove-replica", VOL, &secondary], "in_use");
    drop(held);
    c.wait_json(&["volume", "show", VOL], "no consumer", |v| {
        replicas(v).iter().all(|r| r["connections"] == 0)
    });
    c.tandem(&["volume", "remove-replica", VOL, &secondary]);
    let v = c.wait_json(&["volume", "show", VOL], "1 replica", |v| {
        settled(v, 1, false)
    });
    assert_eq!(v["replica_count"], 1, "{v:#}");
    assert!(!data_file(&c, &secondary).exists());
    c.refused(&["volume", "remove-replica", VOL, &first], "last_replica");
    written.push((30 << 20, 1 << 20, 0x55));
    let uri = c.connect(VOL);
    let mut cmds = writes(&written[written.len() - 1..]);
    cmds.extend(reads(&written));
    qemu_io_ok(&uri, &cmds);

    let ops: Vec<String> = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| format!("{} {}", o["kind"], o["state"]))
        .collect();
    assert_eq!(
        ops.iter().filter(|o| o.contains("replica")).count(),
        4,
        "{ops:?}"
    );
}

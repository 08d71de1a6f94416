//! End to end with real processes: the witness as a diskless Primary. A 3-node cluster
//! (2 diskful replicas + the witness); `volume promote --node WITNESS`; qemu-io writes and reads
//! through the witness's own NBD export (forwarded to the diskful replicas); one diskful agent is
//! SIGKILLed while a writer runs through the witness, the writes go on, the agent comes back and
//! resyncs only what it missed; the Primary moves to a diskful node and the data reads back
//! there; both replicas' data files are byte-identical.

mod common;

use std::process::{Command, Stdio};

use common::repl::{nodes_of_kind, qemu_io_ok, replica, same_files};
use common::*;
use serde_json::Value;

/// `primary` is Primary with quorum; both diskful replicas UpToDate, linked, nothing out of
/// sync.
fn settled(v: &Value, primary: &str, diskful: &[String]) -> bool {
    let p = replica(v, primary);
    p["role"] == "Primary"
        && p["quorum"] == true
        && diskful.iter().all(|n| {
            let r = replica(v, n);
            r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0 && linked(r)
        })
}

/// Every link of replica `r` (as its own agent reported it) is Established.
fn linked(r: &Value) -> bool {
    r["peers"]
        .as_array()
        .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["repl_state"] == "Established"))
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_ok(uri, &cmds.iter().map(|c| c.to_string()).collect::<Vec<_>>())
}

/// Creates `name` (16 MiB, 2 replicas + witness) and waits until its replicas are in sync:
/// (diskful nodes, witness node, first Primary).
fn create_in_sync(c: &Cluster, name: &str) -> (Vec<String>, String, String) {
    let v = c.json(&["volume", "create", name, "16MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let diskful = nodes_of_kind(&v, false);
    let w = nodes_of_kind(&v, true).pop().expect("a witness");
    assert_eq!(diskful.len(), 2, "{v:#}");
    let first = v["primary_node"]
        .as_str()
        .expect("primary_node")
        .to_string();
    // The witness's own report too: the controller refuses to promote a witness whose last
    // report shows no link to an UpToDate replica (`no_data_peer`), and the agents report on
    // their own schedule (CI run of 2026-12-07: promoted 0.3 s after the diskful side settled).
    c.wait_json(&["volume", "show", name], "replicas in sync", |v| {
        settled(v, &first, &diskful) && linked(replica(v, &w))
    });
    (diskful, w, first)
}

#[test]
fn witness_serves_the_volume_as_a_diskless_primary() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let (diskful, w, _first) = create_in_sync(&c, "d");

    // The witness becomes Primary (the diskful Primary demotes first).
    c.tandem(&["volume", "promote", "d", "--node", &w]);
    let v = c.wait_json(&["volume", "show", "d"], "the witness Primary", |v| {
        settled(v, &w, &diskful)
    });
    assert_eq!(replica(&v, &w)["diskless"], true);
    assert_eq!(replica(&v, &w)["disk_state"], "Diskless");
    assert_eq!(v["primary_node"], w.as_str());

    // Writes and reads through the witness's own export.
    let cj = c.json(&["volume", "connect", "d", "--node", &w]);
    let uri = cj["uri"].as_str().expect("uri").to_string();
    assert!(uri.contains(&w), "{uri} should be the witness's socket");
    let uri = cj["tcp_uri"].as_str().map(str::to_string).unwrap_or(uri);
    qemu_io(&uri, &["write -P 0x11 0 1M", "flush"]);
    qemu_io(&uri, &["read -P 0x11 0 1M"]);

    // A writer through the witness; one diskful agent dies meanwhile.
    let lost = diskful[1].clone();
    let kept = diskful[0].clone();
    let mut cmds: Vec<String> = Vec::new();
    for i in 0..256u64 {
        cmds.push(format!("write -P 0x22 {} 4k", 4 * 1024 * 1024 + i * 8192));
    }
    cmds.push("flush".into());
    let mut writer = Command::new(tool("qemu-io"));
    writer.args(["-f", "raw"]);
    for cmd in &cmds {
        writer.arg("-c").arg(cmd);
    }
    let writer = die_with_parent(
        writer
            .arg(&uri)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .spawn()
    .unwrap();
    c.stop_agent(&lost, libc::SIGKILL);
    let out = writer.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.to_lowercase().contains("error"),
        "writes go on: {text}"
    );
    // More writes while it is down.
    qemu_io(&uri, &["write -P 0x33 8M 1M", "flush"]);
    qemu_io(&uri, &["read -P 0x22 4M 4k", "read -P 0x33 8M 1M"]);

    // It comes back and resyncs only what it missed.
    c.restart_agent(&lost);
    let v = c.wait_json(
        &["volume", "show", "d"],
        "the killed replica back, resynced and in sync",
        |v| {
            // (Its last report before the kill said UpToDate: wait for the resync it reports.)
            replica(v, &lost)["last_resync_bytes"].as_u64().unwrap_or(0) > 0
                && settled(v, &w, &diskful)
        },
    );
    let resynced = replica(&v, &lost)["last_resync_bytes"].as_u64().unwrap();
    assert!(
        ((1 << 20)..(8 << 20)).contains(&resynced),
        "the restarted replica resyncs what it missed (1 MiB + what was in flight), not 16 MiB: {resynced}"
    );

    // The Primary moves to a diskful node: the data reads back there.
    c.tandem(&["volume", "promote", "d", "--node", &kept]);
    c.wait_json(&["volume", "show", "d"], "a diskful Primary again", |v| {
        settled(v, &kept, &diskful)
    });
    let uri_p = c.wait_export("d");
    assert!(uri_p.contains(&kept), "{uri_p}");
    qemu_io(
        &uri_p,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x22 4M 4k",
            "read -P 0x33 8M 1M",
        ],
    );
    let v = c.json(&["volume", "show", "d"]);
    assert_eq!(replica(&v, &w)["role"], "Secondary", "{v:#}");
    same_files(&c, &kept, &lost, "d");
}

#[test]
fn opening_the_witness_export_auto_promotes_it_and_closing_demotes_it() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let (diskful, w, first) = create_in_sync(&c, "a");
    // Nobody holds Primary: the consumer decides where the volume is Primary.
    c.tandem(&["volume", "demote", "a", "--node", &first]);
    let uri = |n: &str| {
        c.tandem(&["volume", "connect", "a", "--node", n])
            .trim()
            .to_string()
    };
    let uri_w = uri(&w);
    assert!(uri_w.contains(&w), "{uri_w} should be the witness's socket");

    // A consumer on the witness: promoted by the open, demoted after the close.
    qemu_io(
        &uri_w,
        &["write -P 0x5a 1M 64k", "flush", "read -P 0x5a 1M 64k"],
    );
    let v = c.wait_json(&["volume", "show", "a"], "auto-demote after close", |v| {
        v["replicas"]
            .as_array()
            .is_some_and(|rs| rs.iter().all(|r| r["role"] == "Secondary"))
    });
    assert!(v["primary_node"].is_null(), "{v:#}");

    // A diskful node opened the same way reads what went through the witness.
    qemu_io(&uri(&diskful[0]), &["read -P 0x5a 1M 64k"]);
    c.wait_json(&["volume", "show", "a"], "in sync, nobody Primary", |v| {
        diskful.iter().all(|n| {
            let r = replica(v, n);
            r["role"] == "Secondary" && r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0
        }) && replica(v, &w)["role"] == "Secondary"
    });
    same_files(&c, &diskful[0], &diskful[1], "a");
}

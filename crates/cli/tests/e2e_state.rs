//! End to end with real processes (`tandem up`): state export/import, rebuilding a lost
//! controller store from the agents, operations that retry and survive a controller restart,
//! and `tandem status [--watch]`.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `volume list -o json` without the operation history (which a rebuild cannot know).
fn without_operations(list: &Value) -> Value {
    let mut list = list.clone();
    for v in list.as_array_mut().unwrap() {
        v.as_object_mut().unwrap().remove("operations");
    }
    list
}

fn all_ready(list: &Value, n: usize) -> bool {
    let a = list.as_array().unwrap();
    a.len() == n
        && a.iter().all(|v| {
            v["state"] == "ready"
                && v["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|r| r["disk_state"] == "UpToDate")
        })
}

fn create_some(c: &Cluster) {
    c.tandem(&["volume", "create", "alpha", "16MiB", "--nodes", "node1"]);
    c.tandem(&["volume", "create", "beta", "32MiB", "--nodes", "node2"]);
    c.tandem(&["volume", "create", "gamma", "1GiB"]);
}

#[test]
fn state_export_import_round_trip_after_wiping_the_store() {
    let mut c = Cluster::start(2);
    create_some(&c);
    let before = c.json(&["volume", "list"]);
    assert!(all_ready(&before, 3), "{before:#}");
    let status = c.json(&["status"]);
    let file = c.path().join("state.json");
    let out = c.tandem(&["state", "export", file.to_str().unwrap()]);
    assert!(out.contains("3 volume(s)"), "{out}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(doc["format_version"], 1);
    assert_eq!(doc["cluster_id"], status["cluster_id"]);
    assert_eq!(doc["volumes"].as_array().unwrap().len(), 3);

    // Stop, wipe the controller's store, start again, import.
    c.down();
    std::fs::remove_dir_all(c.controller_dir().join("store")).unwrap();
    c.up();
    let out = c.tandem(&["state", "import", file.to_str().unwrap()]);
    assert!(out.contains("Imported the state of cluster"), "{out}");
    // Identical, operation history included (the agents report the same replicas).
    let after = c.wait_json(&["volume", "list"], "the same volume list", |v| {
        *v == before
    });
    assert_eq!(after, before);
    let status2 = c.json(&["status"]);
    assert_eq!(status2["cluster_id"], status["cluster_id"]);

    // A document that conflicts with the store is refused with a clear message...
    let mut bad = doc.clone();
    bad["volumes"][0]["uuid"] = Value::from("11111111-2222-4333-8444-555555555555");
    let bad_file = c.path().join("bad.json");
    std::fs::write(&bad_file, serde_json::to_string(&bad).unwrap()).unwrap();
    let out = run(c
        .cli()
        .args(["state", "import", bad_file.to_str().unwrap()]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exists with uuid")
            && err.contains("--replace")
            && err.contains("import_conflict"),
        "{err}"
    );
    // ...and so is a document of another format version.
    let mut v2 = doc.clone();
    v2["format_version"] = Value::from(2);
    std::fs::write(&bad_file, serde_json::to_string(&v2).unwrap()).unwrap();
    let out = run(c
        .cli()
        .args(["state", "import", bad_file.to_str().unwrap()]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("format_version 2"), "{err}");
    assert_eq!(c.json(&["volume", "list"]), before);
}

#[test]
fn controller_rebuilds_its_state_from_the_agents() {
    let mut c = Cluster::start(3);
    create_some(&c);
    let before = c.json(&["volume", "list"]);
    assert!(all_ready(&before, 3), "{before:#}");
    let cluster = c.json(&["status"])["cluster_id"].clone();

    c.down();
    std::fs::remove_dir_all(c.controller_dir().join("store")).unwrap();
    c.up();

    // uuids, sizes, nodes, pools, replica states: identical.
    let after = c.wait_json(&["volume", "list"], "the rebuilt volume list", |v| {
        without_operations(v) == without_operations(&before)
    });
    // What a rebuild cannot know (the operation history) is replaced by an `adopt` record.
    for v in after.as_array().unwrap() {
        let ops = v["operations"].as_array().unwrap();
        assert_eq!(ops.len(), 1, "{v:#}");
        assert_eq!(
            (ops[0]["kind"].as_str(), ops[0]["state"].as_str()),
            (Some("adopt"), Some("done"))
        );
    }
    let status = c.json(&["status"]);
    assert_eq!(
        status["cluster_id"], cluster,
        "the rebuilt controller keeps the cluster id"
    );
    assert_eq!(status["issues"], Value::Array(vec![]), "{status:#}");
    // The rebuilt cluster works: create and delete still do.
    c.tandem(&["volume", "create", "delta", "8MiB"]);
    c.tandem(&["volume", "delete", "alpha"]);
    let names: Vec<String> = c
        .json(&["volume", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["beta", "delta", "gamma"]);
}

#[test]
fn a_failing_create_retries_with_backoff_and_resumes_after_a_controller_crash() {
    let mut c = Cluster::start(1);
    // A stray data file without metadata: the agent refuses to overwrite it.
    let stray = c.node_dir("node1").join("pool/stuck.data");
    std::fs::write(&stray, b"not ours").unwrap();
    c.tandem(&["volume", "create", "stuck", "16MiB", "--no-wait"]);
    let v = c.wait_json(&["volume", "show", "stuck"], "a second attempt", |v| {
        let op = &v["operations"][0];
        op["state"] == "retrying" && op["attempts"].as_u64() >= Some(2)
    });
    let op = &v["operations"][0];
    assert_eq!(op["kind"], "create");
    assert!(
        op["last_error"]
            .as_str()
            .unwrap()
            .contains("exists without metadata"),
        "{op:#}"
    );
    assert!(op["next_retry_unix"].as_u64().is_some(), "{op:#}");
    assert!(op["retry_history"].as_array().unwrap().len() >= 2, "{op:#}");
    let table = c.tandem(&["volume", "show", "stuck"]);
    assert!(
        table.contains("retrying")
            && table.contains("NEXT RETRY")
            && table.contains("failed attempts"),
        "{table}"
    );
    let attempts = op["attempts"].as_u64().unwrap();

    // The controller dies in the middle; restarted, it resumes the operation.
    c.kill_controller(libc::SIGKILL);
    c.restart_controller();
    let v = c.json(&["volume", "show", "stuck"]);
    let op = &v["operations"][0];
    assert!(op["attempts"].as_u64().unwrap() >= attempts, "{op:#}");
    assert!(op["retry_history"].as_array().unwrap().len() >= 2, "{op:#}");
    // The cause goes away: the next attempt succeeds.
    std::fs::remove_file(&stray).unwrap();
    let v = c.wait_json(
        &["volume", "show", "stuck"],
        "the volume to become ready",
        |v| v["state"] == "ready" && v["operations"][0]["state"] == "done",
    );
    let op = &v["operations"][0];
    assert_eq!(op["progress"], 1.0);
    assert_eq!(op["last_error"], Value::Null);
    assert!(op["attempts"].as_u64().unwrap() > attempts, "{op:#}");
    c.wait_export("stuck");
}

#[test]
fn status_shows_everything_and_watch_streams_snapshots() {
    let c = Cluster::start(2);
    c.tandem(&["volume", "create", "seen", "16MiB"]);
    let table = c.tandem(&["status"]);
    for want in [
        "node1",
        "node2",
        "node1/default",
        "%",
        "[",
        "seen",
        "UpToDate",
        "QUORUM",
    ] {
        assert!(table.contains(want), "{want}: {table}");
    }
    let s = c.json(&["status"]);
    assert_eq!(s["volumes"][0]["operations"][0]["kind"], "create");
    assert!(s["issues"].is_array());

    // --watch in a pipe: snapshots separated by blank lines, no escape codes.
    let text = watch_output(&c, &["status", "--watch"], |t| {
        t.matches("Cluster ").count() >= 2
    });
    assert!(!text.contains('\u{1b}'), "escape codes in a pipe: {text:?}");
    assert!(text.contains("\n\nCluster "), "{text}");
    // -o json --watch: one JSON document per line.
    let text = watch_output(&c, &["-o", "json", "status", "--watch"], |t| {
        t.lines().count() >= 2
    });
    for line in text.lines().take(2) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["cluster_id"], s["cluster_id"]);
    }
}

/// Runs `tandem <args>` until its stdout satisfies `enough`, then stops it (as Ctrl-C would).
fn watch_output(c: &Cluster, args: &[&str], enough: impl Fn(&str) -> bool) -> String {
    let mut child = c
        .cli()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = String::new();
    while !enough(&text) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                let _ = child.kill();
                panic!("`tandem {args:?}` printed too little: {text}");
            }
        }
    }
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
    text
}

//! The controller's REST API over real HTTP against the real server and redb store.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tandem_api::{
    ClusterStatus, ConnectInfo, DiskState, Node, NodeState, Pool, Volume, VolumeState,
};

fn create(s: &Server, name: &str, size: u64) -> Volume {
    let (status, v) = s.post("/v1/volumes", &json!({"name": name, "size_bytes": size}));
    assert_eq!(status, 201, "{v}");
    serde_json::from_value(v).unwrap()
}

#[test]
fn agent_sync_registers_node_and_pools() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let st: ClusterStatus = s.get_ok("/v1/status");
    assert_eq!(d.cluster_id, st.cluster_id);
    assert!(d.revision > 0, "a registered node has a desired revision");
    assert!(d.replicas.is_empty());
    let nodes: Vec<Node> = s.get_ok("/v1/nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].name, "n1");
    assert_eq!(nodes[0].state, NodeState::Online);
    assert_eq!(
        nodes[0].nbd_socket.as_deref(),
        Some("/run/tandem/n1/nbd.sock")
    );
    let pools: Vec<Pool> = s.get_ok("/v1/pools");
    assert_eq!(pools.len(), 1);
    assert_eq!(
        (pools[0].node.as_str(), pools[0].name.as_str()),
        ("n1", "default")
    );
    assert_eq!(pools[0].capacity_bytes, 100 * GIB);
    assert_eq!(pools[0].free_bytes, 50 * GIB);
    // A second report updates the live values.
    let mut r = report("n1", d.revision);
    r.pools[0].free_bytes = 40 * GIB;
    let d2 = s.sync(&r, 0);
    assert_eq!(
        d2.revision, d.revision,
        "a report alone does not change the desired state"
    );
    let pools: Vec<Pool> = s.get_ok("/v1/pools");
    assert_eq!(pools[0].free_bytes, 40 * GIB);
    let (code, v) = s.get("/v1/health");
    assert_eq!((code, v), (200, json!({"status": "ok"})));
}

#[test]
fn volume_lifecycle_create_ready_connect_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d1 = s.sync(&report("n1", 0), 0);
    let mut r2 = report("n2", 0);
    r2.pools[0].free_bytes = 80 * GIB;
    let d2 = s.sync(&r2, 0);

    let v = create(&s, "demo", GIB);
    assert_eq!(v.state, VolumeState::Creating);
    assert_eq!(v.replica_count, 1);
    assert_eq!(v.replicas.len(), 1);
    assert_eq!(
        v.replicas[0].node, "n2",
        "placed on the pool with the most free space"
    );
    assert_eq!(v.replicas[0].disk_state, DiskState::Unknown);
    assert_eq!(v.replicas[0].repl_state, "StandAlone");
    assert!(!v.quorum);
    assert_eq!(v.operations[0].kind, "create");
    assert_eq!(v.operations[0].state, "running");

    // n1's desired state did not change; n2's did and names the replica.
    assert_eq!(s.sync(&report("n1", d1.revision), 0).revision, d1.revision);
    r2.applied_revision = d2.revision;
    let d = s.sync(&r2, 0);
    assert_ne!(d.revision, d2.revision);
    assert_eq!(d.replicas.len(), 1);
    let want = &d.replicas[0];
    assert_eq!(
        (
            want.volume.as_str(),
            want.volume_uuid.as_str(),
            want.pool.as_str(),
            want.size_bytes,
            want.present
        ),
        ("demo", v.uuid.as_str(), "default", GIB, true)
    );
    let pools: Vec<Pool> = s.get_ok("/v1/pools");
    let p2 = pools.iter().find(|p| p.node == "n2").unwrap();
    assert_eq!(p2.provisioned_bytes, GIB);

    let (code, e) = s.get("/v1/volumes/demo/connect");
    assert_api_error(code, &e, 409, "not_ready");

    // The agent created it.
    r2.applied_revision = d.revision;
    r2.replicas = vec![replica("demo", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&r2, 0);
    let v: Volume = s.get_ok("/v1/volumes/demo");
    assert_eq!(v.state, VolumeState::Ready);
    assert!(v.quorum);
    assert_eq!(v.replicas[0].disk_state, DiskState::UpToDate);
    assert_eq!(v.operations[0].state, "done");
    assert_eq!(v.operations[0].progress, 1.0);
    let list: Vec<Volume> = s.get_ok("/v1/volumes");
    assert_eq!(list, vec![v.clone()]);

    let c: ConnectInfo = s.get_ok("/v1/volumes/demo/connect");
    assert_eq!(c.uri, "nbd+unix:///demo?socket=/run/tandem/n2/nbd.sock");
    assert_eq!(c.tcp_uri.as_deref(), Some("nbd://127.0.0.1:10809/demo"));
    assert_eq!((c.node.as_str(), c.export.as_str()), ("n2", "demo"));
    let c: ConnectInfo = s.get_ok("/v1/volumes/demo/connect?node=n2");
    assert_eq!(c.node, "n2");
    let (code, e) = s.get("/v1/volumes/demo/connect?node=n1");
    assert_api_error(code, &e, 409, "no_replica");
    let (code, e) = s.get("/v1/volumes/demo/connect?node=ghost");
    assert_api_error(code, &e, 404, "not_found");

    // In use: refused unless forced.
    r2.replicas[0].connections = 1;
    s.sync(&r2, 0);
    let (code, e) = s.delete("/v1/volumes/demo");
    assert_api_error(code, &e, 409, "in_use");
    let (code, v) = s.delete("/v1/volumes/demo?force=true");
    assert_eq!(code, 202, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(v.state, VolumeState::Deleting);
    assert_eq!(v.operations.last().unwrap().kind, "delete");
    let (code, _) = s.delete("/v1/volumes/demo");
    assert_eq!(code, 202, "deleting again is accepted");
    let (code, e) = s.post("/v1/volumes", &json!({"name": "demo", "size_bytes": GIB}));
    assert_api_error(code, &e, 409, "already_exists");

    // The agent learns present: false.
    let d = s.sync(&r2, 0);
    assert_eq!(d.replicas.len(), 1);
    assert!(!d.replicas[0].present);
    // A report that predates the delete (stale applied revision) keeps the volume.
    let mut stale = r2.clone();
    stale.replicas.clear();
    s.sync(&stale, 0);
    let v: Volume = s.get_ok("/v1/volumes/demo");
    assert_eq!(v.state, VolumeState::Deleting);
    // The agent applied it: the volume is gone.
    r2.applied_revision = d.revision;
    r2.replicas.clear();
    let d = s.sync(&r2, 0);
    assert!(d.replicas.is_empty());
    let (code, e) = s.get("/v1/volumes/demo");
    assert_api_error(code, &e, 404, "not_found");
    let list: Vec<Volume> = s.get_ok("/v1/volumes");
    assert!(list.is_empty());
    // And the name is free again, with a new identity.
    let again = create(&s, "demo", GIB);
    assert_ne!(again.uuid, v.uuid);
}

#[test]
fn long_poll_holds_and_returns_promptly_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);

    // Nothing changes: held until wait_ms passes.
    let t = Instant::now();
    let same = s.sync(&report("n1", d.revision), 300);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(same.revision, d.revision);

    // A change wakes the held request.
    let t = Instant::now();
    std::thread::scope(|scope| {
        let poll = scope.spawn(|| s.sync(&report("n1", d.revision), 25_000));
        // Give the poll a moment to be held (the test is valid either way: if the volume is
        // created first, the poll answers at once).
        std::thread::sleep(Duration::from_millis(100));
        create(&s, "lp", GIB);
        let got = poll.join().unwrap();
        assert_ne!(got.revision, d.revision);
        assert_eq!(got.replicas.len(), 1);
        assert_eq!(got.replicas[0].volume, "lp");
    });
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[test]
fn restart_keeps_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let v = create(&s, "keep", 4 * GIB);
    let mut r = report("n1", d.revision);
    r.replicas = vec![replica("keep", &v.uuid, 4 * GIB, DiskState::UpToDate)];
    s.sync(&r, 0);
    let before: ClusterStatus = s.get_ok("/v1/status");
    s.stop();
    assert!(dir.path().join("state.redb").exists());

    let s = Server::start(dir.path());
    let after: ClusterStatus = s.get_ok("/v1/status");
    assert_eq!(after.cluster_id, before.cluster_id);
    assert_eq!(after.volumes, before.volumes);
    assert_eq!(after.pools, before.pools);
    assert_eq!(after.nodes.len(), 1);
    assert_eq!(after.nodes[0].name, "n1");
    assert_eq!(after.volumes[0].state, VolumeState::Ready);
    // The agent's next sync sees the same desired revision: nothing to redo.
    let d2 = s.sync(&r, 0);
    assert_eq!(d2.cluster_id, before.cluster_id);
    assert_eq!(d2.replicas.len(), 1);
    let c: ConnectInfo = s.get_ok("/v1/volumes/keep/connect");
    assert_eq!(c.uri, "nbd+unix:///keep?socket=/run/tandem/n1/nbd.sock");
}

#[test]
fn placement_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let (code, e) = s.post("/v1/volumes", &json!({"name": "v", "size_bytes": GIB}));
    assert_api_error(code, &e, 409, "no_nodes");
    s.sync(&report("n1", 0), 0);
    let (code, e) = s.post(
        "/v1/volumes",
        &json!({"name": "v", "size_bytes": 200 * GIB}),
    );
    assert_api_error(code, &e, 409, "no_capacity");
    let (code, e) = s.post(
        "/v1/volumes",
        &json!({"name": "v", "size_bytes": GIB, "pool": "fast"}),
    );
    assert_api_error(code, &e, 409, "no_capacity");
    assert!(e["message"].as_str().unwrap().contains("fast"));
    let (code, e) = s.post(
        "/v1/volumes",
        &json!({"name": "v", "size_bytes": GIB, "nodes": ["n9"]}),
    );
    assert_api_error(code, &e, 404, "not_found");
    let (code, e) = s.post(
        "/v1/volumes",
        &json!({"name": "v", "size_bytes": GIB, "replicas": 2}),
    );
    assert_api_error(code, &e, 400, "unsupported");
    assert!(e["message"].as_str().unwrap().contains("later release"));
    let (code, e) = s.post("/v1/volumes", &json!({"name": "v", "size_bytes": 1000}));
    assert_api_error(code, &e, 400, "invalid_size");
    assert!(e["message"].as_str().unwrap().contains("512"), "{e}");

    // Pinning to a node and pool works; protocol defaults to C and is kept when given.
    let mut r2 = report("n2", 0);
    r2.pools.push(pool("fast", 10 * GIB));
    s.sync(&r2, 0);
    let (code, v) = s.post(
        "/v1/volumes",
        &json!({"name": "pinned", "size_bytes": GIB, "nodes": ["n2"], "pool": "fast", "protocol": "A"}),
    );
    assert_eq!(code, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(
        (v.replicas[0].node.as_str(), v.replicas[0].pool.as_str()),
        ("n2", "fast")
    );
    assert_eq!(v.protocol, tandem_api::Protocol::A);
    let v = create(&s, "plain", GIB);
    assert_eq!(v.protocol, tandem_api::Protocol::C);
    // Space promised to a replica not yet created counts: the next one goes elsewhere.
    let a = create(&s, "a", 40 * GIB);
    let b = create(&s, "b", 40 * GIB);
    assert_ne!(a.replicas[0].node, b.replicas[0].node);
}

#[test]
fn offline_nodes_get_no_volumes() {
    let dir = tempfile::tempdir().unwrap();
    // Offline as soon as a sync has finished.
    let s = Server::start_with(dir.path(), 0);
    s.sync(&report("n1", 0), 0);
    wait_for("node offline", || {
        let nodes: Vec<Node> = s.get_ok("/v1/nodes");
        nodes[0].state == NodeState::Offline
    });
    let (code, e) = s.post("/v1/volumes", &json!({"name": "v", "size_bytes": GIB}));
    assert_api_error(code, &e, 409, "no_nodes");
    // While its long poll is held, the node is in contact: online.
    let cur = s.sync(&report("n1", 0), 0).revision;
    let sr = &s;
    std::thread::scope(|scope| {
        let poll = scope.spawn(move || sr.sync(&report("n1", cur), 3_000));
        wait_for("node online during its long poll", || {
            let nodes: Vec<Node> = s.get_ok("/v1/nodes");
            nodes[0].state == NodeState::Online
        });
        create(&s, "during-poll", GIB);
        let d = poll.join().unwrap();
        assert_eq!(d.replicas.len(), 1);
    });
    wait_for("node offline again", || {
        let nodes: Vec<Node> = s.get_ok("/v1/nodes");
        nodes[0].state == NodeState::Offline
    });
    let mut w = report("w1", 0);
    w.role = tandem_api::NodeRole::Witness;
    w.pools.clear();
    s.sync(&w, 0);
    let (code, e) = s.post("/v1/volumes", &json!({"name": "v", "size_bytes": GIB}));
    assert_api_error(code, &e, 409, "no_nodes");
}

#[test]
fn refuses_non_loopback_listen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for listen in ["0.0.0.0:0", "192.0.2.1:7450", "[::]:0"] {
        let cfg = tandem_controller::Config {
            listen: listen.into(),
            data_dir: dir.path().to_path_buf(),
            offline_after_secs: 10,
            experimental_replication: false,
        };
        let err = rt
            .block_on(tandem_controller::run(cfg, async {}))
            .expect_err(listen);
        let msg = err.to_string();
        assert!(msg.contains("loopback"), "{listen}: {msg}");
    }
    let cfg = tandem_controller::Config {
        listen: "not an address".into(),
        data_dir: dir.path().to_path_buf(),
        offline_after_secs: 10,
        experimental_replication: false,
    };
    assert!(rt.block_on(tandem_controller::run(cfg, async {})).is_err());
}

/// `base` changed by `f`, as a body for the table (leaked: it lives as long as the test).
fn doc(base: &Value, f: impl Fn(&mut Value)) -> &'static [u8] {
    let mut d = base.clone();
    f(&mut d);
    serde_json::to_string(&d).unwrap().leak().as_bytes()
}

/// method, path, content type, body, expected status, expected code.
type Case<'a> = (&'a str, &'a str, Option<&'a str>, &'a [u8], u16, &'a str);

#[test]
fn malformed_requests_get_api_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    s.sync(&report("n1", 0), 0);
    let j = Some("application/json");
    let vol = "/v1/volumes";
    let sync = "/v1/agents/n1/sync";
    let good_report = serde_json::to_string(&report("n1", 0)).unwrap();
    let other_node = serde_json::to_string(&report("n2", 0)).unwrap();
    let big = vec![b' '; 3 << 20];
    let deep = "[".repeat(10_000);
    let long_name = format!(r#"{{"name":"{}","size_bytes":1048576}}"#, "x".repeat(64));
    let st = "/v1/state";
    let base = json!({
        "format_version": 1,
        "cluster_id": "6d1f4a52-0d0e-4a53-9a35-3f1a4f0c9b1e",
        "nodes": [{"name": "n1", "address": "127.0.0.1", "role": "diskful"}],
        "volumes": [{
            "name": "v1", "uuid": "0b8e3f3c-6a7b-4c55-8f31-2d6f0f7b9a10", "size_bytes": 1048576,
            "protocol": "C", "replica_count": 1, "state": "ready",
            "placements": [{"node": "n1", "pool": "default", "diskless": false}]
        }]
    });
    let doc_ok = doc(&base, |_: &mut Value| {});
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("POST", vol, j, b"{", 400, "invalid_json"),
        ("POST", vol, j, b"not json", 400, "invalid_json"),
        ("POST", vol, j, b"", 400, "missing_body"),
        ("POST", vol, None, b"", 400, "missing_body"),
        ("POST", vol, j, b"\xff\xfe", 400, "invalid_json"),
        ("POST", vol, j, deep.as_bytes(), 422, "invalid_body"),
        ("POST", vol, j, b"null", 422, "invalid_body"),
        ("POST", vol, j, b"[]", 422, "invalid_body"),
        ("POST", vol, j, b"{}", 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a"}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"size_bytes":1048576}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"bogus":1}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":-1}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1e30}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":18446744073709551616}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":"1GiB"}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1.5}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":7,"size_bytes":1048576}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"protocol":"B"}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"replicas":-1}"#, 422, "invalid_body"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":0}"#, 400, "invalid_size"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1000}"#, 400, "invalid_size"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":18446744073709551615}"#, 400, "invalid_size"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":9223372036854775808}"#, 400, "invalid_size"),
        ("POST", vol, j, br#"{"name":"../x","size_bytes":1048576}"#, 400, "invalid_name"),
        ("POST", vol, j, br#"{"name":"","size_bytes":1048576}"#, 400, "invalid_name"),
        ("POST", vol, j, br#"{"name":"a/b","size_bytes":1048576}"#, 400, "invalid_name"),
        ("POST", vol, j, "{\"name\":\"\u{e4}\",\"size_bytes\":1048576}".as_bytes(), 400, "invalid_name"),
        ("POST", vol, j, long_name.as_bytes(), 400, "invalid_name"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"pool":"../p"}"#, 400, "invalid_name"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"nodes":["x y"]}"#, 400, "invalid_name"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"nodes":[]}"#, 400, "bad_request"),
        ("POST", vol, j, br#"{"name":"a","size_bytes":1048576,"replicas":0}"#, 400, "unsupported"),
        ("POST", vol, Some("text/plain"), br#"{"name":"a","size_bytes":1048576}"#, 415, "unsupported_media_type"),
        ("POST", vol, Some("application/x-www-form-urlencoded"), b"name=a", 415, "unsupported_media_type"),
        ("POST", vol, j, &big, 413, "bad_request"),
        ("GET", "/v1/volumes/..%2Fx", None, b"", 400, "invalid_name"),
        ("GET", "/v1/volumes/%FF", None, b"", 400, "bad_request"),
        ("GET", "/v1/volumes/.hidden", None, b"", 400, "invalid_name"),
        ("GET", "/v1/volumes/nope", None, b"", 404, "not_found"),
        ("GET", "/v1/volumes/nope/connect", None, b"", 404, "not_found"),
        ("GET", "/v1/volumes/nope/connect?node=..%2Fy", None, b"", 400, "invalid_name"),
        ("GET", "/v1/volumes/nope/connect?nod=x", None, b"", 400, "bad_request"),
        ("DELETE", "/v1/volumes/nope", None, b"", 404, "not_found"),
        ("DELETE", "/v1/volumes/nope?force=maybe", None, b"", 400, "bad_request"),
        ("DELETE", "/v1/volumes/nope?bogus=1", None, b"", 400, "bad_request"),
        ("GET", "/v1/nope", None, b"", 404, "not_found"),
        ("GET", "/", None, b"", 404, "not_found"),
        ("GET", "/v2/volumes", None, b"", 404, "not_found"),
        ("GET", "/v1/volumes/a/b/c", None, b"", 404, "not_found"),
        ("POST", "/v1/nodes", j, b"{}", 422, "invalid_body"),
        ("POST", "/v1/nodes", j, br#"{"name":"a","address":"h","bogus":1}"#, 422, "invalid_body"),
        ("POST", "/v1/nodes", j, br#"{"name":"a/b","address":"h"}"#, 400, "invalid_name"),
        ("POST", "/v1/nodes", j, br#"{"name":"a","address":"h:80"}"#, 400, "invalid_address"),
        ("POST", "/v1/nodes", j, br#"{"name":"a","address":""}"#, 400, "invalid_address"),
        ("POST", "/v1/volumes/nope/move", j, b"{}", 422, "invalid_body"),
        ("POST", "/v1/volumes/nope/move", j, br#"{"from_node":"a","to_node":"b","x":1}"#, 422, "invalid_body"),
        ("POST", "/v1/volumes/nope/move", j, br#"{"from_node":"../a","to_node":"b"}"#, 400, "invalid_name"),
        ("POST", "/v1/volumes/nope/move", j, br#"{"from_node":"a","to_node":"b","to_pool":"p/q"}"#, 400, "invalid_name"),
        ("POST", "/v1/volumes/nope/move", j, br#"{"from_node":"a","to_node":"b"}"#, 404, "not_found"),
        ("PUT", vol, j, b"{}", 405, "method_not_allowed"),
        ("DELETE", "/v1/health", None, b"", 405, "method_not_allowed"),
        ("GET", sync, None, b"", 405, "method_not_allowed"),
        ("POST", sync, j, other_node.as_bytes(), 400, "bad_request"),
        ("POST", "/v1/agents/..%2F/sync", j, good_report.as_bytes(), 400, "invalid_name"),
        ("POST", "/v1/agents/n1/sync?wait_ms=-1", j, good_report.as_bytes(), 400, "bad_request"),
        ("POST", "/v1/agents/n1/sync?wait_ms=soon", j, good_report.as_bytes(), 400, "bad_request"),
        ("POST", sync, j, br#"{"node":"n1"}"#, 422, "invalid_body"),
        ("PUT", st, j, b"{}", 405, "method_not_allowed"),
        ("DELETE", "/v1/reconcile", None, b"", 405, "method_not_allowed"),
        ("POST", st, j, b"", 400, "missing_body"),
        ("POST", st, j, b"{", 400, "invalid_json"),
        ("POST", st, Some("text/plain"), doc_ok, 415, "unsupported_media_type"),
        ("POST", st, j, b"[]", 422, "invalid_body"),
        ("POST", st, j, b"{}", 422, "invalid_body"),
        ("POST", st, j, br#"{"format_version":1}"#, 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["bogus"] = json!(1)), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["bogus"] = json!(1)), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["nodes"][0]["bogus"] = json!(1)), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["format_version"] = json!("1")), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["format_version"] = json!(-1)), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["size_bytes"] = json!(-5)), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["size_bytes"] = json!("1GiB")), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["state"] = json!("exploded")), 422, "invalid_body"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["format_version"] = json!(0)), 400, "unsupported_format_version"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["format_version"] = json!(2)), 400, "unsupported_format_version"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["cluster_id"] = json!("")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["cluster_id"] = json!("../x")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["size_bytes"] = json!(0)), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["size_bytes"] = json!(1000)), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["size_bytes"] = json!(u64::MAX)), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["name"] = json!("a/b")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["uuid"] = json!("not-a-uuid")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["replica_count"] = json!(0)), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["placements"] = json!([])), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["placements"][0]["node"] = json!("ghost")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["placements"][0]["pool"] = json!("../p")), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| { let v = d["volumes"][0].clone(); d["volumes"].as_array_mut().unwrap().push(v) }), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| { let mut v = d["volumes"][0].clone(); v["name"] = json!("other"); d["volumes"].as_array_mut().unwrap().push(v) }), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| { let n = d["nodes"][0].clone(); d["nodes"].as_array_mut().unwrap().push(n) }), 400, "invalid_state"),
        ("POST", st, j, doc(&base, |d: &mut Value| d["volumes"][0]["operations"] = json!([{"kind":"create","state":"done","progress":7.0,"last_error":null}])), 400, "invalid_state"),
        ("POST", "/v1/state?replace=perhaps", j, doc_ok, 400, "bad_request"),
        ("POST", "/v1/state?bogus=1", j, doc_ok, 400, "bad_request"),
        // Well-formed, but the store (node n1 of another cluster id) conflicts.
        ("POST", st, j, doc_ok, 409, "import_conflict"),
    ];
    for (method, path, ct, body, want_status, want_code) in &cases {
        let (status, text) = s.raw(&request(method, path, *ct, body));
        let what = format!(
            "{method} {path} {:?}",
            String::from_utf8_lossy(&body[..body.len().min(80)])
        );
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{what}: status {status}, body is not JSON ({e}): {text:?}")
        });
        assert!((400..500).contains(&status), "{what}: {status} {v}");
        let e: tandem_api::ApiError = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{what}: not an ApiError ({e}): {v}"));
        assert_eq!(
            (status, e.code.as_str()),
            (*want_status, *want_code),
            "{what}: {}",
            e.message
        );
        assert!(!e.message.is_empty(), "{what}");
        let (h, _) = s.get("/v1/health");
        assert_eq!(h, 200, "server stopped answering after {what}");
    }
    // Nothing was created by any of it.
    let list: Vec<Volume> = s.get_ok("/v1/volumes");
    assert!(list.is_empty(), "{list:?}");
    // Garbage that is not even HTTP gets a 400 or a closed connection, never a crash.
    let mut stream = std::net::TcpStream::connect(s.addr).unwrap();
    use std::io::Write;
    let _ = stream.write_all(b"\x00\x01\x02 garbage\r\n\r\n");
    drop(stream);
    assert_eq!(s.get("/v1/health").0, 200);
}

#[test]
fn agent_errors_show_in_operations() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let v = create(&s, "bad", GIB);
    assert_eq!(v.operations[0].kind, "create");
    assert_eq!(v.operations[0].attempts, 1);
    assert_eq!(v.operations[0].steps.len(), 2);
    // A report from before the agent saw the create shows the error, but is no attempt.
    let mut r = report("n1", d.revision);
    let mut rep = replica("bad", &v.uuid, GIB, DiskState::Failed);
    rep.last_error = Some("fallocate: No space left on device".into());
    rep.on_disk = false;
    r.replicas = vec![rep];
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/bad");
    assert_eq!(v.state, VolumeState::Creating);
    assert_eq!(v.operations[0].state, "running");
    assert_eq!(
        v.operations[0].last_error.as_deref(),
        Some("fallocate: No space left on device")
    );
    assert_eq!(v.replicas[0].disk_state, DiskState::Failed);
    // The agent's retry succeeded.
    r.replicas = vec![replica("bad", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/bad");
    assert_eq!(v.state, VolumeState::Ready);
    assert_eq!(v.operations[0].state, "done");
    assert_eq!(v.operations[0].progress, 1.0);
    assert_eq!(v.operations[0].last_error, None);
    assert!(v.operations[0].finished_unix.is_some());
}

#[test]
fn shutdown_ends_held_long_polls() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let url = s.url("/v1/agents/n1/sync?wait_ms=30000");
    let body = serde_json::to_string(&report("n1", d.revision)).unwrap();
    let poll = std::thread::spawn(move || {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        http.post(&url)
            .header("content-type", "application/json")
            .send(body)
            .map(|r| r.status().as_u16())
    });
    // Let the poll get held (valid either way: it may also answer before the stop).
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    s.stop();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    let r = poll.join().unwrap();
    assert!(matches!(r, Ok(200) | Err(_)), "{r:?}");
}

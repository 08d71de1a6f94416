//! Node ids, the cluster secret, multi-replica placement with witnesses and the desired
//! state's peer lists (controller with `experimental_replication`).

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::json;
use tandem_api::{DesiredState, DiskState, Node, NodeRole, Volume};

fn nodes(s: &Server) -> Vec<Node> {
    s.get_ok("/v1/nodes")
}

/// Registers `names` with the given free space each (GiB), returns their desired states.
fn register(s: &Server, names: &[(&str, u64)]) -> Vec<DesiredState> {
    names
        .iter()
        .map(|(n, free)| {
            let mut r = report(n, 0);
            r.pools[0].free_bytes = free * GIB;
            s.sync(&r, 0)
        })
        .collect()
}

fn create(s: &Server, body: serde_json::Value) -> (u16, serde_json::Value) {
    s.post("/v1/volumes", &body)
}

#[test]
fn node_ids_are_unique_and_stable_across_restart_and_secret_too() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let ds = register(&s, &[("n1", 10), ("n2", 10), ("n3", 10)]);
    let ids: Vec<u8> = ds.iter().map(|d| d.node_id.expect("node id")).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 3, "{ids:?}");
    let secret = ds[0].cluster_secret.clone().expect("secret");
    assert_eq!(secret.len(), 64);
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(
        ds.iter()
            .all(|d| d.cluster_secret.as_ref() == Some(&secret))
    );
    let before: Vec<(String, Option<u8>)> =
        nodes(&s).into_iter().map(|n| (n.name, n.node_id)).collect();
    // Repeated reports keep the id.
    let again = s.sync(&report("n2", ds[1].revision), 0);
    assert_eq!(again.node_id, Some(ids[1]));
    s.stop();

    let s = Server::start(dir.path());
    let after: Vec<(String, Option<u8>)> =
        nodes(&s).into_iter().map(|n| (n.name, n.node_id)).collect();
    assert_eq!(before, after, "node ids survive a restart");
    let d = s.sync(&report("n1", 0), 0);
    assert_eq!(d.node_id, Some(ids[0]));
    assert_eq!(
        d.cluster_secret.as_deref(),
        Some(secret.as_str()),
        "secret is stable"
    );
    // A new node gets an id nobody has.
    let d4 = s.sync(&report("n4", 0), 0);
    assert!(!ids.contains(&d4.node_id.unwrap()));
    let n1 = nodes(&s).into_iter().find(|n| n.name == "n1").unwrap();
    assert_eq!(n1.repl_addr.as_deref(), Some("127.0.0.1:7802"));
}

#[test]
fn multi_replica_refused_without_experimental_flag() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    register(&s, &[("n1", 10), ("n2", 10), ("n3", 10)]);
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("unsupported")),
        "{v}"
    );
}

#[test]
fn two_replicas_get_a_witness_and_desired_peers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    let ds = register(&s, &[("n1", 30), ("n2", 10), ("n3", 20)]);
    let id = |i: usize| ds[i].node_id.unwrap();
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(status, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let placed: Vec<(&str, &str, bool)> = v
        .replicas
        .iter()
        .map(|r| (r.node.as_str(), r.pool.as_str(), r.diskless))
        .collect();
    assert_eq!(
        placed,
        vec![
            ("n1", "default", false),
            ("n3", "default", false),
            ("n2", "", true)
        ],
        "the two nodes with most free space, witness on the third"
    );
    assert_eq!(v.replica_count, 2);
    assert_eq!(v.operations[0].steps.len(), 4);

    let d1 = s.sync(&report("n1", 0), 0);
    let r1 = d1.replicas.iter().find(|r| r.volume == "a").unwrap();
    assert!(!r1.diskless);
    assert!(
        r1.primary,
        "the first diskful placement is the designated Primary"
    );
    assert_eq!(r1.pool, "default");
    assert_eq!(r1.node_id, Some(id(0)));
    let peers: Vec<(&str, u8, bool, Option<&str>)> = r1
        .peers
        .iter()
        .map(|p| {
            (
                p.node.as_str(),
                p.node_id,
                p.diskless,
                p.repl_addr.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        peers,
        vec![
            ("n3", id(2), false, Some("127.0.0.1:7802")),
            ("n2", id(1), true, Some("127.0.0.1:7802")),
        ]
    );
    let d2 = s.sync(&report("n2", 0), 0);
    let w = d2.replicas.iter().find(|r| r.volume == "a").unwrap();
    assert!(w.diskless && w.pool.is_empty() && w.present);
    assert!(!w.primary);
    assert_eq!(w.peers.len(), 2);
    assert!(w.peers.iter().all(|p| !p.diskless));

    // All three report: Ready, quorum, the witness shown diskless.
    let mut r1 = report("n1", d1.revision);
    r1.replicas = vec![replica("a", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&r1, 0);
    let d3 = s.sync(&report("n3", 0), 0);
    assert!(d3.replicas.iter().all(|r| !r.primary), "n3 is a Secondary");
    let mut r3 = report("n3", d3.revision);
    r3.replicas = vec![replica("a", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&r3, 0);
    let mut r2 = report("n2", d2.revision);
    let mut wr = replica("a", &v.uuid, GIB, DiskState::Diskless);
    wr.pool = String::new();
    wr.diskless = true;
    wr.on_disk = false;
    r2.replicas = vec![wr];
    s.sync(&r2, 0);
    let v: Volume = s.get_ok("/v1/volumes/a");
    assert_eq!(v.state, tandem_api::VolumeState::Ready);
    assert!(v.quorum);
    assert_eq!(v.operations[0].state, "done", "{:?}", v.operations[0]);
    let witness = v.replicas.iter().find(|r| r.node == "n2").unwrap();
    assert!(witness.diskless);
    assert_eq!(witness.disk_state, DiskState::Diskless);
    // `volume connect` points at the Primary.
    let ci: tandem_api::ConnectInfo = s.get_ok("/v1/volumes/a/connect");
    assert_eq!(ci.node, "n1");

    // A peer's new replication address reaches the others' desired state.
    let before = s.sync(&report("n1", 0), 0).revision;
    let mut r3 = report("n3", 0);
    r3.repl_addr = Some("127.0.0.1:9999".into());
    r3.replicas = vec![replica("a", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&r3, 0);
    let d1 = s.sync(&report("n1", 0), 0);
    assert!(d1.revision > before);
    let p3 = d1.replicas[0]
        .peers
        .iter()
        .find(|p| p.node == "n3")
        .unwrap();
    assert_eq!(p3.repl_addr.as_deref(), Some("127.0.0.1:9999"));

    // Delete: the volume is forgotten only when every placement is gone.
    let (status, v) = s.delete("/v1/volumes/a");
    assert_eq!(status, 202, "{v}");
    let d1 = s.sync(&report("n1", 0), 0);
    assert!(!d1.replicas[0].present);
    s.sync(&report("n1", d1.revision), 0);
    let (status, _) = s.get("/v1/volumes/a");
    assert_eq!(status, 200, "n2 and n3 still have to delete theirs");
    for n in ["n2", "n3"] {
        let d = s.sync(&report(n, 0), 0);
        assert!(d.replicas.iter().all(|r| !r.present));
        s.sync(&report(n, d.revision), 0);
    }
    let (status, _) = s.get("/v1/volumes/a");
    assert_eq!(status, 404);
}

#[test]
fn three_replicas_no_witness_and_witness_role_preferred() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    register(&s, &[("n1", 30), ("n2", 10), ("n3", 20)]);
    let mut w = report("w1", 0);
    w.role = NodeRole::Witness;
    w.pools.clear();
    s.sync(&w, 0);
    let (status, v) = create(&s, json!({"name": "b", "size_bytes": GIB, "replicas": 3}));
    assert_eq!(status, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(v.replicas.len(), 3);
    assert!(v.replicas.iter().all(|r| !r.diskless));
    let (status, v) = create(&s, json!({"name": "c", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(status, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let witness: Vec<&str> = v
        .replicas
        .iter()
        .filter(|r| r.diskless)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(witness, vec!["w1"], "a node of role witness is preferred");
}

#[test]
fn refusals_and_pinning() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    register(&s, &[("n1", 10)]);
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["code"], "no_nodes");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("need 2") && msg.contains("found 1"), "{msg}");

    register(&s, &[("n2", 20)]);
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!((status, v["code"].as_str()), (409, Some("no_nodes")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("witness"), "{v}");
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 4}));
    assert_eq!(
        (status, v["code"].as_str()),
        (400, Some("bad_request")),
        "{v}"
    );

    register(&s, &[("n3", 30), ("n4", 40)]);
    // Pinned to n1 and n2 although n3 and n4 have more space; the witness elsewhere.
    let (status, v) = create(
        &s,
        json!({"name": "a", "size_bytes": GIB, "replicas": 2, "nodes": ["n1", "n2"]}),
    );
    assert_eq!(status, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let diskful: BTreeSet<&str> = v
        .replicas
        .iter()
        .filter(|r| !r.diskless)
        .map(|r| r.node.as_str())
        .collect();
    assert_eq!(diskful, BTreeSet::from(["n1", "n2"]));
    let w = v.replicas.iter().find(|r| r.diskless).unwrap();
    assert!(w.node == "n3" || w.node == "n4");
    // Pinned to fewer nodes than replicas.
    let (status, v) = create(
        &s,
        json!({"name": "b", "size_bytes": GIB, "replicas": 3, "nodes": ["n1", "n2"]}),
    );
    assert_eq!((status, v["code"].as_str()), (409, Some("no_nodes")), "{v}");
    // No pool can hold it on enough nodes.
    let (status, v) = create(
        &s,
        json!({"name": "b", "size_bytes": GIB, "replicas": 2, "pool": "fast"}),
    );
    assert_eq!(
        (status, v["code"].as_str()),
        (409, Some("no_capacity")),
        "{v}"
    );
}

#[test]
fn state_export_import_keeps_node_ids_and_diskless_placements() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    register(&s, &[("n1", 30), ("n2", 20), ("n3", 10)]);
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(status, 201, "{v}");
    let doc: serde_json::Value = s.get_ok("/v1/state");
    let ids: Vec<(String, Option<u8>)> =
        nodes(&s).into_iter().map(|n| (n.name, n.node_id)).collect();
    s.stop();

    let dir2 = tempfile::tempdir().unwrap();
    let s2 = Server::start_experimental(dir2.path());
    let (status, v) = s2.post("/v1/state", &doc);
    assert_eq!(status, 200, "{v}");
    let ids2: Vec<(String, Option<u8>)> = nodes(&s2)
        .into_iter()
        .map(|n| (n.name, n.node_id))
        .collect();
    assert_eq!(ids, ids2);
    let v: Volume = s2.get_ok("/v1/volumes/a");
    assert_eq!(v.replicas.iter().filter(|r| r.diskless).count(), 1);
    // A node registering after the import gets an id nobody has.
    let d = s2.sync(&report("n9", 0), 0);
    assert!(!ids.iter().any(|(_, i)| *i == d.node_id));
}

#[test]
fn rebuild_adopts_every_replica_of_a_volume_reported_by_several_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let uuid = "0b7f3c1e-8d4a-4b52-9f0e-2a6c1d9e7f10";
    for n in ["n1", "n2"] {
        let mut r = report(n, 0);
        r.replicas = vec![replica("a", uuid, GIB, DiskState::UpToDate)];
        s.sync(&r, 0);
    }
    let v: Volume = s.get_ok("/v1/volumes/a");
    let placed: Vec<&str> = v.replicas.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(placed, vec!["n1", "n2"], "{v:?}");
    assert_eq!(v.replica_count, 2);
    let st: tandem_api::ClusterStatus = s.get_ok("/v1/status");
    assert!(st.issues.is_empty(), "{:?}", st.issues);
    // Each now learns the other as its peer.
    let d = s.sync(&report("n1", 0), 0);
    assert_eq!(d.replicas[0].peers.len(), 1);
    assert_eq!(d.replicas[0].peers[0].node, "n2");
}

#[test]
fn promote_and_demote_move_the_primary_and_refuse_what_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    register(&s, &[("n1", 30), ("n2", 10), ("n3", 20)]);
    let (status, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(status, 201, "{v}");
    let (status, single) = create(&s, json!({"name": "one", "size_bytes": GIB}));
    assert_eq!(status, 201, "{single}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(v.primary_node.as_deref(), Some("n1"));
    // What each node reports (state, consumers, quorum); every sync re-sends it.
    let reports = std::cell::RefCell::new(std::collections::BTreeMap::new());
    let send = |node: &str| {
        let (state, connections, quorum) = reports.borrow()[node];
        let mut r = report(node, 0);
        let mut rep = replica("a", &v.uuid, GIB, state);
        rep.connections = connections;
        rep.quorum = Some(quorum);
        if node == "n2" {
            rep.pool = String::new();
            rep.diskless = true;
            rep.on_disk = false;
        }
        r.replicas = vec![rep];
        s.sync(&r, 0)
    };
    let up = |node: &str, state: DiskState, connections: u32| {
        reports
            .borrow_mut()
            .insert(node.to_string(), (state, connections, true));
        send(node);
    };
    let primary_of = |node: &str| {
        let d = send(node);
        d.replicas.iter().find(|r| r.volume == "a").unwrap().primary
    };
    up("n1", DiskState::UpToDate, 1);
    up("n2", DiskState::Diskless, 0);
    up("n3", DiskState::Inconsistent, 0);

    let promote = |node: &str, force: bool| {
        s.post(
            "/v1/volumes/a/promote",
            &json!({"node": node, "force": force}),
        )
    };
    // Refusals, each with its stable code; nothing changes.
    // A witness: only while it reaches an UpToDate diskful replica (its report lists none).
    let (st, e) = promote("n2", false);
    assert_api_error(st, &e, 409, "no_data_peer");
    let (st, e) = promote("n3", false);
    assert_api_error(st, &e, 409, "not_up_to_date");
    assert!(
        e["message"].as_str().unwrap().contains("Inconsistent"),
        "{e}"
    );
    up("n3", DiskState::UpToDate, 0);
    let (st, e) = promote("n3", false);
    assert_api_error(st, &e, 409, "in_use");
    assert!(e["message"].as_str().unwrap().contains("n1"), "{e}");
    let (st, e) = promote("nope", false);
    assert_api_error(st, &e, 404, "not_found");
    let (st, e) = s.post("/v1/volumes/one/promote", &json!({"node": "n1"}));
    assert_api_error(st, &e, 409, "not_replicated");
    let (st, e) = s.post("/v1/volumes/a/promote", &json!({"node": "n3", "extra": 1}));
    assert_api_error(st, &e, 422, "invalid_body");
    assert!(primary_of("n1") && !primary_of("n3"));

    // --force moves it: n1 is asked to demote, n3 to promote; connect follows.
    let (st, v2) = promote("n3", true);
    assert_eq!(st, 200, "{v2}");
    assert_eq!(v2["primary_node"], "n3");
    assert!(!primary_of("n1") && primary_of("n3"));
    let ci: tandem_api::ConnectInfo = s.get_ok("/v1/volumes/a/connect");
    assert_eq!(ci.node, "n3");
    // Repeating is harmless.
    let (st, _) = promote("n3", false);
    assert_eq!(st, 200);

    // Demoting another node changes nothing; demoting the Primary leaves none.
    let (st, v3) = s.post("/v1/volumes/a/demote", &json!({"node": "n1"}));
    assert_eq!(st, 200, "{v3}");
    assert_eq!(v3["primary_node"], "n3");
    let (st, v3) = s.post("/v1/volumes/a/demote", &json!({"node": "n3"}));
    assert_eq!(st, 200, "{v3}");
    assert!(v3["primary_node"].is_null(), "{v3}");
    assert!(!primary_of("n1") && !primary_of("n3"));

    // A node without quorum is refused.
    reports
        .borrow_mut()
        .insert("n1".into(), (DiskState::UpToDate, 0, false));
    send("n1");
    let (st, e) = promote("n1", false);
    assert_api_error(st, &e, 409, "no_quorum");

    // The choice survives export/import.
    up("n1", DiskState::UpToDate, 0);
    let (st, _) = promote("n1", false);
    assert_eq!(st, 200);
    let doc: serde_json::Value = s.get_ok("/v1/state");
    let a = doc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "a")
        .unwrap();
    assert_eq!(a["primary_node"], "n1");
    assert_eq!(a["primary_explicit"], true);
}

#[test]
fn volume_set_changes_the_resync_rate_for_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    register(&s, &[("n1", 30), ("n2", 10), ("n3", 20)]);
    let (status, v) = create(
        &s,
        json!({"name": "a", "size_bytes": GIB, "replicas": 2, "resync_rate_bytes_per_sec": 1000}),
    );
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["resync_rate_bytes_per_sec"], 1000);
    let rate_of = |node: &str| {
        let d = s.sync(&report(node, 0), 0);
        d.replicas[0].resync_rate_bytes_per_sec
    };
    assert_eq!(rate_of("n1"), 1000);
    let before = s.sync(&report("n2", 0), 0).revision;
    let (st, v) = s.patch(
        "/v1/volumes/a",
        &json!({"resync_rate_bytes_per_sec": 50 << 20}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["resync_rate_bytes_per_sec"], 50 << 20);
    for n in ["n1", "n2", "n3"] {
        assert_eq!(rate_of(n), 50 << 20, "{n}");
    }
    assert!(s.sync(&report("n2", 0), 0).revision > before);
    // Bad bodies and names.
    let (st, e) = s.patch("/v1/volumes/a", &json!({"resync_rate": 1}));
    assert_api_error(st, &e, 422, "invalid_body");
    let (st, e) = s.patch("/v1/volumes/a", &json!({"resync_rate_bytes_per_sec": -1}));
    assert_api_error(st, &e, 422, "invalid_body");
    let (st, e) = s.patch("/v1/volumes/nope", &json!({}));
    assert_api_error(st, &e, 404, "not_found");
    let doc: serde_json::Value = s.get_ok("/v1/state");
    assert_eq!(doc["volumes"][0]["resync_rate_bytes_per_sec"], 50 << 20);
}

#[test]
fn equal_pools_share_replicas_evenly_and_every_pair_gets_a_witness() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_experimental(dir.path());
    // Three pools with the same free space (as pools on one filesystem report it).
    register(&s, &[("n1", 100), ("n2", 100), ("n3", 100)]);
    let mut diskful: std::collections::BTreeMap<String, u32> = Default::default();
    for i in 0..12 {
        let (st, v) = create(
            &s,
            json!({"name": format!("v{i}"), "size_bytes": 10 * GIB, "replicas": 2}),
        );
        assert_eq!(st, 201, "{v}");
        let v: Volume = serde_json::from_value(v).unwrap();
        let nodes: BTreeSet<&str> = v.replicas.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(
            nodes.len(),
            3,
            "two diskful + a witness on distinct nodes: {v:?}"
        );
        assert_eq!(v.replicas.iter().filter(|r| r.diskless).count(), 1);
        for r in v.replicas.iter().filter(|r| !r.diskless) {
            *diskful.entry(r.node.clone()).or_default() += 1;
        }
    }
    assert_eq!(
        diskful.values().copied().collect::<Vec<_>>(),
        vec![8, 8, 8],
        "24 diskful replicas over 3 equal pools: {diskful:?}"
    );
}

#[test]
fn node_remove_refuses_a_node_that_holds_replicas_or_is_online() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_opts(dir.path(), 1, true);
    register(&s, &[("n1", 30), ("n2", 20), ("n3", 10), ("n4", 5)]);
    let (st, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(st, 201, "{v}");
    for n in ["n1", "n2", "n3"] {
        let (st, e) = s.delete(&format!("/v1/nodes/{n}"));
        assert_api_error(st, &e, 409, "node_in_use");
        assert!(e["message"].as_str().unwrap().contains("a"), "{e}");
    }
    // n4 holds nothing, but its agent still syncs: it would come back at once.
    let (st, e) = s.delete("/v1/nodes/n4");
    assert_api_error(st, &e, 409, "node_online");
    wait_for("n4 offline", || {
        nodes(&s)
            .iter()
            .any(|n| n.name == "n4" && n.state == tandem_api::NodeState::Offline)
    });
    let (st, e) = s.delete("/v1/nodes/n4");
    assert_eq!(st, 204, "{e}");
    assert!(nodes(&s).iter().all(|n| n.name != "n4"));
    let (st, e) = s.delete("/v1/nodes/n4");
    assert_api_error(st, &e, 404, "not_found");
    let (st, e) = s.delete("/v1/nodes/bad%2Fname");
    assert_eq!(st, 400, "{e}");
}

#[test]
fn an_offline_nodes_last_report_is_not_shown_as_its_replica_state() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_opts(dir.path(), 1, true);
    register(&s, &[("n1", 30), ("n2", 20), ("n3", 10)]);
    let (st, v) = create(&s, json!({"name": "a", "size_bytes": GIB, "replicas": 2}));
    assert_eq!(st, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let mut r = report("n2", 0);
    let mut rep = replica("a", &v.uuid, GIB, DiskState::UpToDate);
    rep.role = tandem_api::Role::Primary;
    r.replicas = vec![rep];
    s.sync(&r, 0);
    let shown = |s: &Server| {
        let v: Volume = s.get_ok("/v1/volumes/a");
        let r = v.replicas.iter().find(|r| r.node == "n2").unwrap().clone();
        (r.role, r.disk_state)
    };
    assert_eq!(shown(&s), (tandem_api::Role::Primary, DiskState::UpToDate));
    // n2 stops syncing: once it is offline its old report no longer speaks for it.
    wait_for("n2 shown Unknown once offline", || {
        shown(&s) == (tandem_api::Role::Unknown, DiskState::Unknown)
    });
    assert!(
        nodes(&s)
            .iter()
            .any(|n| n.name == "n2" && n.state == tandem_api::NodeState::Offline)
    );
}

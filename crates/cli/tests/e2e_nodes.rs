//! End to end with real processes: `tandem node add` declares a node before its agent
//! exists; the agent started later on that host takes the declared role; a witness node
//! never gets data; an agent reporting another address than declared is refused.

mod common;

use common::*;
use serde_json::Value;

fn node<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name}: {list:#}"))
}

/// Writes an agent config for a new host `name` next to the cluster's own (own state dir,
/// pool, sockets and ports), from node1's.
fn new_host(c: &Cluster, name: &str, address: &str) {
    let dir = c.node_dir(name);
    std::fs::create_dir_all(dir.join("pool")).unwrap();
    let text = std::fs::read_to_string(c.node_dir("node1").join("agent.toml")).unwrap();
    let mut t: toml::Table = text.parse().unwrap();
    let s = |p: std::path::PathBuf| toml::Value::String(p.display().to_string());
    t.insert("node".into(), toml::Value::String(name.into()));
    t.insert("address".into(), toml::Value::String(address.into()));
    t.insert("state_dir".into(), s(dir.join("state")));
    t.insert("nbd_socket".into(), s(dir.join("nbd.sock")));
    t.insert(
        "nbd_tcp".into(),
        toml::Value::String(format!("127.0.0.1:{}", free_port())),
    );
    t.insert(
        "repl_listen".into(),
        toml::Value::String(format!("127.0.0.1:{}", free_port())),
    );
    let mut pool = toml::Table::new();
    pool.insert("name".into(), toml::Value::String("default".into()));
    pool.insert("path".into(), s(dir.join("pool")));
    t.insert(
        "pools".into(),
        toml::Value::Array(vec![toml::Value::Table(pool)]),
    );
    std::fs::write(dir.join("agent.toml"), toml::to_string(&t).unwrap()).unwrap();
}

#[test]
fn node_add_declares_a_witness_node_that_its_agent_joins() {
    let mut c = Cluster::start_with(2, &["--experimental-replication"]);
    let out = c.tandem(&["node", "add", "node3", "127.0.0.1", "--witness"]);
    assert!(out.contains("Node node3 added"), "{out}");
    let list = c.json(&["node", "list"]);
    let n3 = node(&list, "node3");
    assert_eq!(n3["role"], "witness", "{list:#}");
    assert_eq!(n3["state"], "offline", "no agent yet: {list:#}");
    assert!(n3["node_id"].as_u64().is_some(), "{list:#}");
    // Repeating it is harmless; other values, bad names and addresses are refused.
    c.tandem(&["node", "add", "node3", "127.0.0.1", "--witness"]);
    for (args, code) in [
        (vec!["node3", "127.0.0.2", "--witness"], "node_exists"),
        (vec!["node3", "127.0.0.1"], "node_exists"),
        (vec!["bad/name", "127.0.0.1"], "invalid_name"),
        (vec!["node5", "127.0.0.1:80"], "invalid_address"),
        (vec!["node5", "a b"], "invalid_address"),
    ] {
        let out = run(c.cli().args(["node", "add"]).args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(code), "{args:?}: {err}");
    }

    // The host's agent starts (its own config says diskful): it joins as the declared witness.
    new_host(&c, "node3", "127.0.0.1");
    c.restart_agent("node3");
    let list = c.wait_json(&["node", "list"], "node3 online", |l| {
        node(l, "node3")["state"] == "online"
    });
    assert_eq!(node(&list, "node3")["role"], "witness", "{list:#}");
    assert_eq!(node(&list, "node3")["node_id"], n3["node_id"], "{list:#}");
    // Two replicas and the witness on node3; three replicas cannot be placed (node3 holds no
    // data).
    let v = c.json(&["volume", "create", "w", "16MiB", "--replicas", "2"]);
    let on3: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["node"] == "node3")
        .collect();
    assert_eq!(on3.len(), 1, "{v:#}");
    assert_eq!(
        on3[0]["diskless"], true,
        "the witness node got a witness: {v:#}"
    );
    let out = run(c
        .cli()
        .args(["volume", "create", "x", "16MiB", "--replicas", "3"]));
    assert!(
        !out.status.success(),
        "three diskful replicas need three diskful nodes"
    );

    // A node declared with another address: its agent is refused and it stays offline.
    c.tandem(&["node", "add", "node4", "10.9.9.9"]);
    new_host(&c, "node4", "127.0.0.1");
    c.restart_agent("node4");
    wait_until(
        std::time::Duration::from_secs(30),
        "node4's agent to log the refusal",
        || {
            c.agent_log("node4")
                .contains("was added with address 10.9.9.9")
                .then_some(())
        },
    );
    let list = c.json(&["node", "list"]);
    assert_eq!(node(&list, "node4")["state"], "offline", "{list:#}");
}

/// An agent stopped in an orderly way (SIGTERM) tells the controller last, so its node shows
/// offline at once instead of after `offline_after_secs` (10 s) without contact; it is
/// online again as soon as its agent syncs again.
#[test]
fn an_agent_that_stops_shows_its_node_offline_at_once() {
    let mut c = Cluster::start(2);
    c.wait_json(&["node", "list"], "both nodes online", |l| {
        l.as_array().unwrap().iter().all(|n| n["state"] == "online")
    });
    c.stop_agent("node2", libc::SIGTERM);
    let list = c.json(&["node", "list"]);
    assert_eq!(node(&list, "node2")["state"], "offline", "{list:#}");
    assert_eq!(node(&list, "node1")["state"], "online", "{list:#}");
    assert!(
        c.agent_log("node2")
            .contains("told the controller this agent stops"),
        "{}",
        c.agent_log("node2")
    );
    c.restart_agent("node2");
    c.wait_online("node2");
}

//! End to end with real processes: `tandem up --experimental-replication`, a volume with two
//! replicas placed on two nodes plus a witness on the third, every placement reported.
//! (The replicas are not kept in sync yet: that arrives with the replication driver.)

mod common;

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

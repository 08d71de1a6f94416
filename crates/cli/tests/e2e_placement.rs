//! End to end with real processes: placement of many replicated volumes over three agents
//! whose pools share one filesystem (equal free space): replicas spread evenly, every pair of
//! diskful replicas gets a witness on the third node, all of them come up in sync.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

#[test]
fn twenty_volumes_with_two_replicas_spread_over_three_nodes_each_with_a_witness() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let mut diskful: BTreeMap<String, u32> = BTreeMap::new();
    let mut witness: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..20 {
        let name = format!("p{i:02}");
        let v = c.json(&["volume", "create", &name, "16MiB", "--replicas", "2"]);
        assert_eq!(v["state"], "ready", "{v:#}");
        let reps = v["replicas"].as_array().unwrap();
        assert_eq!(reps.len(), 3, "{v:#}");
        let mut nodes: Vec<&str> = reps.iter().map(|r| r["node"].as_str().unwrap()).collect();
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), 3, "distinct nodes: {v:#}");
        for r in reps {
            let n = r["node"].as_str().unwrap().to_string();
            if r["diskless"] == true {
                *witness.entry(n).or_default() += 1;
            } else {
                *diskful.entry(n).or_default() += 1;
            }
        }
    }
    eprintln!("diskful per node {diskful:?}, witnesses per node {witness:?}");
    assert_eq!(diskful.values().sum::<u32>(), 40);
    assert_eq!(
        witness.values().sum::<u32>(),
        20,
        "every volume got a witness"
    );
    for (n, k) in &diskful {
        assert!(
            (13..=14).contains(k),
            "{n} holds {k} of 40 replicas: {diskful:?}"
        );
    }
    // Every volume comes up: both diskful replicas UpToDate and connected, one Primary.
    let in_sync = |v: &Value| {
        v.as_array().is_some_and(|vols| {
            vols.len() == 20
                && vols.iter().all(|v| {
                    let reps = v["replicas"].as_array().unwrap();
                    reps.iter().filter(|r| r["role"] == "Primary").count() == 1
                        && reps.iter().all(|r| {
                            (r["diskless"] == false
                                && r["disk_state"] == "UpToDate"
                                && r["repl_state"] == "Established")
                                || (r["diskless"] == true && r["disk_state"] == "Diskless")
                        })
                })
        })
    };
    c.wait_json(&["volume", "list"], "all 20 volumes in sync", in_sync);
}

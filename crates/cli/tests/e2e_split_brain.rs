//! End to end with real processes: a real split brain of a 2-replica volume + witness, made
//! with the fault-injecting proxies of `common::proxy` (as in `e2e_partition.rs`):
//!
//! 1. the link between the two diskful nodes A (Primary) and B is cut; A keeps quorum with the
//!    witness and writes (B misses it);
//! 2. A is cut off completely; B + witness have quorum; B is promoted and writes;
//! 3. heal: the handshake finds split brain (rule `SplitBrainSameBitmap`).
//!
//! With the default policy (`disconnect`) it is shown in `volume show` (per pair, with what
//! each side wrote since the split), the data is not merged, and
//! `volume resolve-split-brain --discard A` makes A resync from B: both data files end
//! identical to B's side. With `--after-split-brain discard-node:A` it resolves by itself;
//! with `discard-younger-primary` (B demoted before the heal) B, promoted after A, discards.

mod common;

use std::time::Duration;

use common::repl::*;
use common::*;
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

/// Makes a split brain of volume `name` (created with `extra` options); returns (A, B): A
/// wrote 0xa1 at 8 MiB (256 KiB), B wrote 0xb2 at 16 MiB (128 KiB) after the split. Leaves
/// the network healed.
fn split_brain(p: &Proxied, name: &str, extra: &[&str]) -> (String, String) {
    let c = &p.c;
    let mut args = vec!["volume", "create", name, "64MiB", "--replicas", "2"];
    args.extend_from_slice(extra);
    c.json(&args);
    let v = c.wait_json(&["volume", "show", name], "in sync", in_sync);
    let a = node_of(&v, "Primary").to_string();
    let b = node_of(&v, "Secondary").to_string();
    let uri_a = c.connect(name);
    qemu_io_ok(&uri_a, &writes(&[(0, 64 * KIB, 0x11)]));
    c.wait_json(&["volume", "show", name], "in sync after writes", in_sync);

    // 1. A-B cut: A keeps quorum through the witness and writes.
    assert!(p.net.cut_pair(p.ids[&a], p.ids[&b]) >= 1);
    c.wait_json(&["volume", "show", name], "A and B apart", |v| {
        peer(replica(v, &a), &b)["repl_state"] != "Established" && replica(v, &a)["quorum"] == true
    });
    qemu_io_ok(&uri_a, &writes(&[(8 * MIB, 256 * KIB, 0xa1)]));

    // 2. A cut off; B + witness have quorum; B is promoted and writes.
    p.net.isolate(p.ids[&a]);
    c.wait_json(&["volume", "show", name], "B with quorum, A without", |v| {
        replica(v, &b)["quorum"] == true && replica(v, &a)["quorum"] == false
    });
    c.tandem(&["volume", "promote", name, "--node", &b, "--force"]);
    let uri_b = check(c.cli().args(["volume", "connect", name, "--node", &b]))
        .trim()
        .to_string();
    qemu_io_ok(&uri_b, &writes(&[(16 * MIB, 128 * KIB, 0xb2)]));

    // 3. Heal.
    p.net.heal();
    (a, b)
}

#[test]
fn split_brain_is_shown_not_merged_and_resolved_with_one_command() {
    let p = Proxied::start();
    let c = &p.c;
    let (a, b) = split_brain(&p, "sb", &[]);
    let v = c.wait_json(
        &["volume", "show", "sb"],
        "split brain reported on both sides",
        |v| {
            peer(replica(v, &a), &b)["repl_state"] == "SplitBrain"
                && peer(replica(v, &b), &a)["repl_state"] == "SplitBrain"
        },
    );
    eprintln!("split brain:\n{}", c.tandem(&["volume", "show", "sb"]));
    // Each side reports what it and the other wrote since the split.
    let sa = &replica(&v, &a)["split_brain"][0];
    assert_eq!(sa["peer"], b.as_str(), "{v:#}");
    assert_eq!(sa["rule"], "SplitBrainSameBitmap", "{v:#}");
    assert!(sa["our_bytes"].as_u64().unwrap() >= 256 * KIB, "{sa:#}");
    assert!(sa["peer_bytes"].as_u64().unwrap() >= 128 * KIB, "{sa:#}");
    assert_eq!(sa["resolution"], Value::Null);
    let text = c.tandem(&["volume", "show", "sb"]);
    assert!(text.contains("SPLIT BRAIN"), "{text}");
    // Not merged: each side has only its own writes.
    assert!(
        data_at(c, &a, "sb", 8 * MIB, 256 * KIB)
            .iter()
            .all(|x| *x == 0xa1)
    );
    assert!(
        data_at(c, &a, "sb", 16 * MIB, 128 * KIB)
            .iter()
            .all(|x| *x == 0)
    );
    assert!(
        data_at(c, &b, "sb", 16 * MIB, 128 * KIB)
            .iter()
            .all(|x| *x == 0xb2)
    );
    assert!(
        data_at(c, &b, "sb", 8 * MIB, 256 * KIB)
            .iter()
            .all(|x| *x == 0)
    );

    // Refusals: the witness has no data; a node that is not part of it.
    let w = witness_of(&v).to_string();
    let out = run(c
        .cli()
        .args(["volume", "resolve-split-brain", "sb", "--discard", &w]));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no diskful replica"));

    // One command: A's changes are discarded, A resyncs from B.
    let out = c.tandem(&[
        "volume",
        "resolve-split-brain",
        "sb",
        "--discard",
        &a,
        "--timeout",
        "120s",
    ]);
    eprintln!("resolve-split-brain:\n{out}");
    assert!(out.contains("resolved"), "{out}");
    let v = c.wait_json(
        &["volume", "show", "sb"],
        "in sync after the resolution",
        in_sync,
    );
    assert_eq!(node_of(&v, "Primary"), b, "{v:#}");
    assert!(
        replica(&v, &a)["split_brain"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{v:#}"
    );
    same_files(c, &a, &b, "sb");
    assert!(
        data_at(c, &a, "sb", 16 * MIB, 128 * KIB)
            .iter()
            .all(|x| *x == 0xb2)
    );
    assert!(
        data_at(c, &a, "sb", 8 * MIB, 256 * KIB)
            .iter()
            .all(|x| *x == 0)
    );
    assert!(data_at(c, &a, "sb", 0, 64 * KIB).iter().all(|x| *x == 0x11));
    // Nothing left to resolve.
    let out = run(c
        .cli()
        .args(["volume", "resolve-split-brain", "sb", "--discard", &a]));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no split brain"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn discard_node_policy_resolves_a_split_brain_by_itself() {
    let p = Proxied::start();
    let c = &p.c;
    // The policy names A (the Primary at creation): set with `volume set` once A is known.
    let (a, b) = split_brain_with_policy(
        &p,
        "sp",
        |a| format!("discard-node:{a}"),
        false,
        "policy discard-node",
    );
    let v = c.wait_json(
        &["volume", "show", "sp"],
        "in sync after the automatic resolution",
        in_sync,
    );
    assert_eq!(node_of(&v, "Primary"), b, "{v:#}");
    same_files(c, &a, &b, "sp");
    assert!(
        data_at(c, &a, "sp", 16 * MIB, 128 * KIB)
            .iter()
            .all(|x| *x == 0xb2)
    );
    assert!(
        data_at(c, &a, "sp", 8 * MIB, 256 * KIB)
            .iter()
            .all(|x| *x == 0)
    );
    let log = c.agent_log(&a);
    assert!(
        log.contains("policy discard-node"),
        "{a} logged no policy resolution"
    );
}

/// Like [`split_brain`], setting `--after-split-brain` to `policy(A)` before the heal and,
/// with `demote_b`, demoting B before the heal too (a Primary with quorum is never a policy's
/// victim); returns once A's agent logged `resolved` (what the policy logs).
fn split_brain_with_policy(
    p: &Proxied,
    name: &str,
    policy: impl Fn(&str) -> String,
    demote_b: bool,
    resolved: &str,
) -> (String, String) {
    let c = &p.c;
    c.json(&["volume", "create", name, "64MiB", "--replicas", "2"]);
    let v = c.wait_json(&["volume", "show", name], "in sync", in_sync);
    let a = node_of(&v, "Primary").to_string();
    let b = node_of(&v, "Secondary").to_string();
    let policy = policy(&a);
    let v = c.json(&["volume", "set", name, "--after-split-brain", &policy]);
    assert_eq!(v["after_split_brain"], policy);
    let uri_a = c.connect(name);
    assert!(p.net.cut_pair(p.ids[&a], p.ids[&b]) >= 1);
    c.wait_json(&["volume", "show", name], "A and B apart", |v| {
        peer(replica(v, &a), &b)["repl_state"] != "Established" && replica(v, &a)["quorum"] == true
    });
    qemu_io_ok(&uri_a, &writes(&[(8 * MIB, 256 * KIB, 0xa1)]));
    p.net.isolate(p.ids[&a]);
    c.wait_json(&["volume", "show", name], "B with quorum, A without", |v| {
        replica(v, &b)["quorum"] == true && replica(v, &a)["quorum"] == false
    });
    c.tandem(&["volume", "promote", name, "--node", &b, "--force"]);
    let uri_b = check(c.cli().args(["volume", "connect", name, "--node", &b]))
        .trim()
        .to_string();
    qemu_io_ok(&uri_b, &writes(&[(16 * MIB, 128 * KIB, 0xb2)]));
    if demote_b {
        c.tandem(&["volume", "demote", name, "--node", &b]);
        c.wait_json(&["volume", "show", name], "no Primary", |v| {
            node_of_opt(v, "Primary").is_none()
        });
    }
    p.net.heal();
    wait_until(Duration::from_secs(60), "the policy to resolve it", || {
        c.agent_log(&a).contains(resolved).then_some(())
    });
    (a, b)
}

#[test]
fn discard_younger_primary_policy_keeps_the_old_primarys_writes() {
    let p = Proxied::start();
    let c = &p.c;
    // B was promoted (by force) after A: B is the younger Primary and discards its writes.
    let (a, b) = split_brain_with_policy(
        &p,
        "sy",
        |_| "discard-younger-primary".to_string(),
        true,
        "policy discard-younger-primary",
    );
    c.wait_json(&["volume", "show", "sy"], "in sync, no Primary", |v| {
        diskful(v)
            .iter()
            .all(|r| r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0)
            && peer(replica(v, &a), &b)["repl_state"] == "Established"
    });
    same_files(c, &a, &b, "sy");
    assert!(
        data_at(c, &b, "sy", 8 * MIB, 256 * KIB)
            .iter()
            .all(|x| *x == 0xa1),
        "A's writes since the split are on B"
    );
    assert!(
        data_at(c, &b, "sy", 16 * MIB, 128 * KIB)
            .iter()
            .all(|x| *x == 0),
        "B's writes since the split are discarded"
    );
    let log = c.agent_log(&b);
    assert!(
        log.contains(&format!("node {} became Primary more recently", p.id(&b))),
        "{b} logged no policy resolution naming itself"
    );
}

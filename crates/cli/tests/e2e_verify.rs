//! End to end with real processes: `tandem volume verify` of a 2-replica volume (+ witness).
//! A healthy volume has no difference (verify while a consumer writes is covered by
//! `crates/volume/tests/verify.rs` and the simulator's invariant 6); a 4 KiB
//! block corrupted behind tandem's back in the Secondary's `V.data` is reported exactly, marked
//! out of sync and shown in `volume show`; `--resync` repairs it; a second verify finds nothing
//! and the data files are byte-identical.

mod common;

use std::os::unix::fs::FileExt;

use common::repl::*;
use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn verify(c: &Cluster, args: &[&str]) -> Value {
    let mut a = vec!["volume", "verify"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--timeout", "120s"]);
    c.json(&a)
}

#[test]
fn verify_finds_the_corrupted_block_and_resync_repairs_it() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    c.json(&["volume", "create", "vv", "32MiB", "--replicas", "2"]);
    let v = c.wait_json(&["volume", "show", "vv"], "in sync", in_sync);
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let uri = c.wait_export("vv");
    qemu_io_ok(
        &uri,
        &writes(&[
            (0, MIB, 0x11),
            (5 * MIB, 2 * MIB, 0x22),
            (31 * MIB, MIB, 0x33),
        ]),
    );

    // Healthy: nothing differs, the whole volume is compared; the result is kept.
    let r = verify(&c, &["vv"]);
    assert_eq!(r["state"], "done", "{r:#}");
    assert_eq!(
        r["node"],
        primary.as_str(),
        "verified from the Primary: {r:#}"
    );
    assert_eq!(r["peers"], serde_json::json!([secondary.as_str()]), "{r:#}");
    assert_eq!(r["checked_bytes"], 32 * MIB);
    assert_eq!(r["different_bytes"], 0);
    assert_eq!(r["ranges"], serde_json::json!([]));
    let v = c.json(&["volume", "show", "vv"]);
    assert_eq!(v["last_verify"]["id"], r["id"], "{v:#}");
    let op = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == r["id"])
        .expect("the verify operation");
    assert_eq!(op["kind"], "verify");
    assert_eq!(op["state"], "done");
    assert_eq!(op["progress"], 1.0);

    // Corrupt one block of the Secondary's data file behind tandem's back.
    let bad = 5 * MIB + 3 * 4096;
    let data = c.node_dir(&secondary).join("pool").join("vv.data");
    let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
    f.write_all_at(&[0xee; 4096], bad).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let r = verify(&c, &["vv"]);
    assert_eq!(r["state"], "done", "{r:#}");
    assert_eq!(r["different_bytes"], 4096, "{r:#}");
    assert_eq!(
        r["ranges"],
        serde_json::json!([{ "offset": bad, "len": 4096 }]),
        "{r:#}"
    );
    assert_eq!(r["resync_started"], serde_json::json!([]));
    // Marked out of sync on both sides and shown; not repaired without --resync.
    let v = c.wait_json(
        &["volume", "show", "vv"],
        "the finding marked on both replicas",
        |v| diskful(v).iter().all(|r| r["out_of_sync_bytes"] == 4096),
    );
    assert_eq!(v["last_verify"]["different_bytes"], 4096);
    let text = c.tandem(&["volume", "show", "vv"]);
    assert!(
        text.contains("Last verify:") && text.contains(&format!("{bad}+4096")),
        "{text}"
    );
    let human = check(c.cli().args(["volume", "verify", "vv"]));
    assert!(
        human.contains("4096 B different") || human.contains("4096 (4.00 KiB) different"),
        "{human}"
    );

    // --resync repairs it from the Primary.
    let r = verify(&c, &["vv", "--resync"]);
    assert_eq!(r["different_bytes"], 4096, "{r:#}");
    assert_eq!(r["resync_started"], serde_json::json!([secondary.as_str()]));
    let v = c.wait_json(
        &["volume", "show", "vv"],
        "in sync after the repair",
        in_sync,
    );
    assert_eq!(replica(&v, &secondary)["last_resync_bytes"], 4096, "{v:#}");
    let r = verify(&c, &["vv"]);
    assert_eq!(r["different_bytes"], 0, "{r:#}");
    same_files(&c, &primary, &secondary, "vv");
    qemu_io_ok(&uri, &reads(&[(5 * MIB, 2 * MIB, 0x22)]));
}

#[test]
fn verify_is_refused_for_a_single_replica() {
    let c = Cluster::start_with(1, &["--experimental-replication"]);
    c.json(&["volume", "create", "one", "16MiB"]);
    let out = run(c.cli().args(["volume", "verify", "one"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to compare"), "{err}");
}

//! End to end with real processes: network partitions of a 2-replica volume + witness on three
//! nodes. Every agent advertises (`repl_advertise`) a fault-injecting proxy in front of its
//! replication listener (`common::proxy`); the proxy reads each dialer's `Hello` to know which
//! node a link belongs to, so it can cut one node off from all its peers and heal. The agents'
//! links to the controller (HTTP) are not cut.
//!
//! * The Secondary cut off: the Primary keeps quorum with the witness and keeps writing; after
//!   the heal the Secondary resyncs only what it missed.
//! * The Primary cut off: writes through it fail (no quorum); the other diskful node is
//!   promoted and takes writes; after the heal the old Primary is Secondary and resyncs from
//!   the new one, without split brain.
//! * The Primary black-holed (links open, nothing forwarded; only keepalive timeouts notice):
//!   a write through it fails once its links time out, it does not hang and does not
//!   complete; after the heal it has quorum again and the replicas converge.
//! * The Primary cut off with `--on-no-quorum suspend`: a write through it is held (status
//!   shows it), neither completed nor failed, and does not reach the Secondary; after the heal
//!   it completes and the replicas converge.
//! * The witness as a diskless Primary cut off from both replicas at once and healed: it
//!   serves again by itself (no demote/promote), data before and after reads back.

mod common;

use std::time::Duration;

use common::repl::*;
use common::*;
use serde_json::Value;

const SIZE: u64 = 64 << 20;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

impl Proxied {
    /// Creates a 64 MiB volume with 2 replicas and waits until it is in sync and every link
    /// between its three placements runs through the proxies.
    fn volume(&self, name: &str) -> Value {
        let v = self
            .c
            .json(&["volume", "create", name, "64MiB", "--replicas", "2"]);
        assert_eq!(v["state"], "ready", "{v:#}");
        let v = self
            .c
            .wait_json(&["volume", "show", name], "in sync", in_sync);
        let mut all: Vec<u8> = self.ids.values().copied().collect();
        all.sort();
        let pairs = vec![(all[0], all[1]), (all[0], all[2]), (all[1], all[2])];
        wait_until(
            Duration::from_secs(30),
            "the three links to run through the proxies",
            || (self.net.open_links() == pairs).then_some(()),
        );
        for r in self.net.records() {
            assert!(r.from < r.to, "{r:?}: the lower node id dials");
        }
        v
    }

    fn show(&self, name: &str) -> Value {
        self.c.json(&["volume", "show", name])
    }
}

fn established(r: &Value, node: &str) -> bool {
    peer(r, node)["repl_state"] == "Established"
}

/// No agent logged a split-brain decision (rules `SplitBrain...`).
fn no_split_brain(c: &Cluster) {
    for n in ["node1", "node2", "node3"] {
        let log = c.agent_log(n);
        let sb: Vec<&str> = log
            .lines()
            .filter(|l| l.to_lowercase().contains("splitbrain") || l.contains("split brain"))
            .collect();
        assert!(sb.is_empty(), "{n} logged split brain:\n{}", sb.join("\n"));
    }
}

/// The latest sync decision `node`'s engine logged for its link to node id `peer` (e.g.
/// "BitmapTarget by rule EqualBitsPrimary").
fn last_decision(c: &Cluster, node: &str, peer: u8) -> String {
    let needle = format!("handshake with node {peer}: ");
    c.agent_log(node)
        .lines()
        .rev()
        .find_map(|l| l.split_once(needle.as_str()).map(|(_, d)| d.to_string()))
        .unwrap_or_else(|| panic!("{node} logged no handshake decision with node {peer}"))
}

#[test]
fn secondary_cut_off_primary_keeps_writing_and_the_secondary_resyncs_what_it_missed() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("ps");
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let witness = witness_of(&v).to_string();
    let uri = c.connect("ps");
    assert!(uri.contains(&primary), "{uri}");
    let before = [(0, 64 * KIB, 0x11), (MIB, 64 * KIB, 0x12)];
    qemu_io_ok(&uri, &writes(&before));
    c.wait_json(&["volume", "show", "ps"], "in sync after writes", in_sync);
    let resync_before = replica(&p.show("ps"), &secondary)["last_resync_bytes"]
        .as_u64()
        .unwrap();

    // Cut the Secondary off: both its links (to the Primary and to the witness) go down.
    let sec_id = p.id(&secondary);
    assert_eq!(p.net.isolate(sec_id), 2, "the Secondary's two links");
    let v = c.wait_json(
        &["volume", "show", "ps"],
        "the Primary with quorum (witness), the Secondary without",
        |v| {
            let pr = replica(v, &primary);
            let se = replica(v, &secondary);
            pr["role"] == "Primary"
                && pr["quorum"] == true
                && established(pr, &witness)
                && !established(pr, &secondary)
                && se["quorum"] == false
                && se["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|x| x["repl_state"] != "Established")
        },
    );
    eprintln!("Secondary cut off:\n{v:#}");

    // The Primary keeps writing.
    let during = [
        (8 * MIB, 128 * KIB, 0x61),
        (20 * MIB, 128 * KIB, 0x62),
        (40 * MIB, 256 * KIB, 0x63),
    ];
    let written: u64 = during.iter().map(|b| b.1).sum();
    qemu_io_ok(&uri, &writes(&during));
    qemu_io_ok(&uri, &reads(&during));
    let v = c.wait_json(
        &["volume", "show", "ps"],
        "the Primary to report what the Secondary missed",
        |v| {
            peer(replica(v, &primary), &secondary)["out_of_sync_bytes"]
                .as_u64()
                .unwrap_or(0)
                >= written
        },
    );
    let oos = peer(replica(&v, &primary), &secondary)["out_of_sync_bytes"]
        .as_u64()
        .unwrap();
    assert!(oos <= written + MIB, "out of sync {oos}, written {written}");
    // Nothing reached the Secondary, and its agent kept trying: links refused by the proxies.
    for (o, l, _) in &during {
        assert!(
            data_at(c, &secondary, "ps", *o, *l).iter().all(|b| *b == 0),
            "a write reached the cut-off Secondary at {o}"
        );
    }
    wait_until(
        Duration::from_secs(30),
        "a reconnect of the Secondary refused",
        || {
            p.net
                .records()
                .iter()
                .any(|r| r.refused && (r.from == sec_id || r.to == sec_id))
                .then_some(())
        },
    );

    // Heal: the Secondary reconnects and resyncs what it missed, nothing more.
    p.net.heal();
    let v = c.wait_json(
        &["volume", "show", "ps"],
        "the Secondary UpToDate again after a resync",
        |v| {
            in_sync(v)
                && replica(v, &secondary)["last_resync_bytes"]
                    .as_u64()
                    .is_some_and(|b| b != resync_before && b > 0)
        },
    );
    assert_eq!(node_of(&v, "Primary"), primary, "{v:#}");
    let resynced = replica(&v, &secondary)["last_resync_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        resynced >= written && resynced <= written + MIB && resynced < SIZE / 8,
        "last_resync_bytes {resynced}, written while cut off {written}: {v:#}"
    );
    eprintln!(
        "written while the Secondary was cut off: {written}, out of sync on the Primary: {oos}, resynced: {resynced}"
    );
    // A bitmap resync from the Primary, decided on both ends.
    let d = last_decision(c, &secondary, p.id(&primary));
    assert!(d.starts_with("BitmapTarget "), "{secondary}: {d}");
    let d = last_decision(c, &primary, sec_id);
    assert!(d.starts_with("BitmapSource "), "{primary}: {d}");
    same_files(c, &primary, &secondary, "ps");
    qemu_io_ok(&uri, &reads(&before));
    qemu_io_ok(&uri, &reads(&during));
    no_split_brain(c);
    eprintln!("{}", c.tandem(&["volume", "show", "ps"]));
}

#[test]
fn primary_cut_off_writes_fail_the_other_side_is_promoted_and_the_old_primary_resyncs() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("pp");
    let old = node_of(&v, "Primary").to_string();
    let new = node_of(&v, "Secondary").to_string();
    let witness = witness_of(&v).to_string();
    let old_uri = c.connect("pp");
    assert!(old_uri.contains(&old), "{old_uri}");
    let before = [(0, 64 * KIB, 0x21), (8 * MIB, 64 * KIB, 0x22)];
    qemu_io_ok(&old_uri, &writes(&before));
    c.wait_json(&["volume", "show", "pp"], "in sync after writes", in_sync);

    // Cut the Primary off. A write right away must not complete (its peers are gone), nor
    // one after the Primary saw that it lost quorum; reads fail too.
    let old_id = p.id(&old);
    assert_eq!(p.net.isolate(old_id), 2, "the Primary's two links");
    let lost = [(12 * MIB, 64 * KIB, 0x77)];
    let r = qemu_io_within(&old_uri, &writes(&lost), Duration::from_secs(60));
    assert!(
        !r.ok(),
        "a write through the cut-off Primary completed: {}",
        r.text
    );
    eprintln!("write through the cut-off Primary: {}", r.text.trim());
    let v = c.wait_json(
        &["volume", "show", "pp"],
        "the old Primary without quorum, the other side with",
        |v| {
            let o = replica(v, &old);
            let n = replica(v, &new);
            o["quorum"] == false
                && n["quorum"] == true
                && established(n, &witness)
                && !established(n, &old)
        },
    );
    eprintln!("Primary cut off:\n{v:#}");
    let lost2 = [(16 * MIB, 64 * KIB, 0x78)];
    let r = qemu_io_within(&old_uri, &writes(&lost2), Duration::from_secs(60));
    assert!(
        !r.ok(),
        "a write through the Primary without quorum completed: {}",
        r.text
    );
    let r = qemu_io_within(&old_uri, &reads(&before), Duration::from_secs(60));
    assert!(
        !r.ok(),
        "a read through the Primary without quorum completed: {}",
        r.text
    );

    // Promote the other diskful node; writes through it succeed. (`promote` refuses while
    // consumers are connected to the old Primary: wait until its report no longer counts the
    // qemu-io runs above.)
    c.wait_json(
        &["volume", "show", "pp"],
        "no consumer left on the old Primary",
        |v| replica(v, &old)["connections"] == 0,
    );
    let out = run(c.cli().args(["volume", "promote", "pp", "--node", &new]));
    assert!(
        out.status.success(),
        "promote {new} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = c.wait_json(&["volume", "show", "pp"], "the new Primary", |v| {
        let n = replica(v, &new);
        n["role"] == "Primary" && n["quorum"] == true
    });
    eprintln!("after promote:\n{v:#}");
    assert_eq!(v["primary_node"], new.as_str(), "{v:#}");
    let new_uri = c.connect("pp");
    assert!(
        new_uri.contains(&new),
        "connect should point at {new}: {new_uri}"
    );
    let after = [
        (8 * MIB, 64 * KIB, 0x31),
        (30 * MIB, 128 * KIB, 0x32),
        (50 * MIB, 64 * KIB, 0x33),
    ];
    qemu_io_ok(&new_uri, &writes(&after));
    qemu_io_ok(&new_uri, &reads(&after));
    qemu_io_ok(&new_uri, &reads(&before[..1]));

    // Heal: the old Primary ends Secondary and resyncs from the new one, no split brain.
    p.net.heal();
    let v = c.wait_json(
        &["volume", "show", "pp"],
        "in sync with the new Primary, the old one Secondary after a resync",
        |v| {
            in_sync(v)
                && replica(v, &new)["role"] == "Primary"
                && replica(v, &old)["role"] == "Secondary"
                && replica(v, &old)["last_resync_bytes"]
                    .as_u64()
                    .is_some_and(|b| b > 0)
        },
    );
    eprintln!("healed:\n{v:#}");
    for r in v["replicas"].as_array().unwrap() {
        assert!(
            r["disk_state"] == "UpToDate" || r["disk_state"] == "Diskless",
            "{v:#}"
        );
    }
    let resynced = replica(&v, &old)["last_resync_bytes"].as_u64().unwrap();
    let written: u64 = after.iter().map(|b| b.1).sum();
    assert!(
        resynced >= written && resynced < SIZE / 8,
        "last_resync_bytes {resynced}, written on the new Primary {written}: {v:#}"
    );
    eprintln!("written on the new Primary: {written}, resynced into the old one: {resynced}");
    no_split_brain(c);
    let d = last_decision(c, &old, p.id(&new));
    assert!(d.starts_with("BitmapTarget "), "{old}: {d}");
    let d = last_decision(c, &new, old_id);
    assert!(d.starts_with("BitmapSource "), "{new}: {d}");
    same_files(c, &old, &new, "pp");
    // What the new Primary wrote reads back; what failed on the old one never appears.
    qemu_io_ok(&new_uri, &reads(&after));
    qemu_io_ok(&new_uri, &reads(&before[..1]));
    let zeros: Vec<(u64, u64, u8)> = lost.iter().chain(&lost2).map(|b| (b.0, b.1, 0)).collect();
    qemu_io_ok(&new_uri, &reads(&zeros));
    eprintln!("{}", c.tandem(&["volume", "show", "pp"]));
}

#[test]
fn primary_black_holed_writes_fail_instead_of_hanging_and_it_recovers_after_the_heal() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("pf");
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let witness = witness_of(&v).to_string();
    let uri = c.connect("pf");
    let before = [(0, 64 * KIB, 0x41)];
    qemu_io_ok(&uri, &writes(&before));
    c.wait_json(&["volume", "show", "pf"], "in sync after writes", in_sync);

    // A black hole around the Primary: its links stay open but carry nothing, so only the
    // keepalive timeouts notice. A write through it must fail once quorum is gone, not hang
    // and not complete.
    let pid = p.id(&primary);
    p.net.freeze(pid);
    let lost = [(12 * MIB, 64 * KIB, 0x51)];
    let t0 = std::time::Instant::now();
    let r = qemu_io_within(&uri, &writes(&lost), Duration::from_secs(60));
    assert!(
        !r.ok(),
        "a write through the black-holed Primary completed: {}",
        r.text
    );
    eprintln!(
        "write through the black-holed Primary failed after {:?}: {}",
        t0.elapsed(),
        r.text.trim()
    );
    c.wait_json(
        &["volume", "show", "pf"],
        "the Primary without quorum, the Secondary with the witness",
        |v| {
            let pr = replica(v, &primary);
            let se = replica(v, &secondary);
            pr["quorum"] == false
                && se["quorum"] == true
                && established(se, &witness)
                && !established(se, &primary)
        },
    );
    assert!(
        data_at(c, &secondary, "pf", lost[0].0, lost[0].1)
            .iter()
            .all(|b| *b == 0),
        "the failed write reached the Secondary"
    );
    assert!(
        p.net.records().iter().any(|r| r.held),
        "no reconnect was held by the black hole: {:?}",
        p.net.records()
    );

    // Heal: the links come back, the Primary regains quorum and writes again; the replicas
    // converge (whatever the failed write left on the Primary is resynced or was never there).
    p.net.heal();
    c.wait_json(&["volume", "show", "pf"], "in sync after the heal", |v| {
        in_sync(v) && node_of_opt(v, "Primary") == Some(primary.as_str())
    });
    let after = [(20 * MIB, 64 * KIB, 0x52)];
    qemu_io_ok(&uri, &writes(&after));
    qemu_io_ok(&uri, &reads(&after));
    qemu_io_ok(&uri, &reads(&before));
    c.wait_json(&["volume", "show", "pf"], "in sync after writes", in_sync);
    no_split_brain(c);
    same_files(c, &primary, &secondary, "pf");
}

/// Only the link between the two diskful nodes breaks; both keep the witness. The Primary
/// writes with the witness's vote, the witness relays that the Secondary missed those writes,
/// and the Secondary turns Outdated: `volume promote` of it is refused (it would lose the
/// writes), until the heal resyncs it and it is UpToDate again.
#[test]
fn secondary_that_missed_writes_is_outdated_and_not_promoted() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("po");
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let witness = witness_of(&v).to_string();
    let uri = c.connect("po");
    assert_eq!(p.net.cut_pair(p.id(&primary), p.id(&secondary)), 1);
    c.wait_json(
        &["volume", "show", "po"],
        "the pair apart, both with the witness",
        |v| {
            let pr = replica(v, &primary);
            let se = replica(v, &secondary);
            !established(pr, &secondary)
                && established(pr, &witness)
                && established(se, &witness)
                && pr["quorum"] == true
        },
    );
    // Nothing written yet: the Secondary is still UpToDate.
    assert_eq!(replica(&p.show("po"), &secondary)["disk_state"], "UpToDate");
    qemu_io_ok(&uri, &writes(&[(4 * MIB, 64 * KIB, 0x71)]));
    let v = c.wait_json(
        &["volume", "show", "po"],
        "the Secondary to learn it is Outdated",
        |v| replica(v, &secondary)["disk_state"] == "Outdated",
    );
    eprintln!("Secondary Outdated:\n{v:#}");
    let out = run(c
        .cli()
        .args(["volume", "promote", "po", "--node", &secondary]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "promoting Outdated data must be refused"
    );
    assert!(err.contains("Outdated"), "{err}");
    assert!(
        c.agent_log(&secondary).contains("Outdated: node"),
        "the Secondary logs why it is Outdated"
    );
    // Heal: the Secondary resyncs what it missed and is UpToDate again.
    p.net.heal();
    let v = c.wait_json(&["volume", "show", "po"], "in sync after the heal", in_sync);
    assert_eq!(replica(&v, &secondary)["disk_state"], "UpToDate");
    assert!(
        replica(&v, &secondary)["last_resync_bytes"]
            .as_u64()
            .unwrap()
            >= 64 * KIB
    );
    assert_eq!(
        data_at(c, &secondary, "po", 4 * MIB, 64 * KIB),
        vec![0x71; 64 * KIB as usize]
    );
    same_files(c, &primary, &secondary, "po");
    no_split_brain(c);
}

#[test]
fn primary_cut_off_with_on_no_quorum_suspend_holds_a_write_until_the_heal() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("ps2");
    let primary = node_of(&v, "Primary").to_string();
    let secondary = node_of(&v, "Secondary").to_string();
    let v = c.json(&["volume", "set", "ps2", "--on-no-quorum", "suspend"]);
    assert_eq!(v["on_no_quorum"], "suspend", "{v:#}");
    let text = c.tandem(&["volume", "set", "ps2", "--on-no-quorum", "suspend"]);
    assert!(text.contains("on no quorum: suspend"), "{text}");
    c.wait_json(
        &["volume", "show", "ps2"],
        "both diskful replicas to apply suspend",
        |v| {
            diskful(v)
                .iter()
                .all(|r| r["on_no_quorum"] == "suspend" && r["suspended_requests"] == 0)
        },
    );
    let uri = c.connect("ps2");
    assert!(uri.contains(&primary), "{uri}");
    let before = [(0, 64 * KIB, 0x81)];
    qemu_io_ok(&uri, &writes(&before));
    c.wait_json(&["volume", "show", "ps2"], "in sync after writes", in_sync);

    // Cut the Primary off, then write through it: the write neither completes nor fails.
    let pid = p.id(&primary);
    assert_eq!(p.net.isolate(pid), 2, "the Primary's two links");
    c.wait_json(
        &["volume", "show", "ps2"],
        "the Primary without quorum",
        |v| replica(v, &primary)["quorum"] == false,
    );
    let held = [(24 * MIB, 128 * KIB, 0x82)];
    let (tx, rx) = std::sync::mpsc::channel();
    let (u, cmds) = (uri.clone(), writes(&held));
    let writer = std::thread::spawn(move || {
        let _ = tx.send(qemu_io_within(&u, &cmds, Duration::from_secs(180)));
    });
    let v = c.wait_json(
        &["volume", "show", "ps2"],
        "the Primary to hold the write for quorum",
        |v| {
            replica(v, &primary)["suspended_requests"]
                .as_u64()
                .is_some_and(|n| n >= 1)
        },
    );
    eprintln!("write held:\n{v:#}");
    assert_eq!(replica(&v, &primary)["role"], "Primary", "{v:#}");
    let text = c.tandem(&["volume", "show", "ps2"]);
    assert!(
        text.contains(&format!("{primary}: I/O suspended: ")) && text.contains("for quorum"),
        "{text}"
    );
    assert!(text.contains("On no quorum: suspend"), "{text}");
    assert!(
        rx.try_recv().is_err(),
        "qemu-io returned while the write was held"
    );
    assert!(
        data_at(c, &secondary, "ps2", held[0].0, held[0].1)
            .iter()
            .all(|b| *b == 0),
        "the held write reached the cut-off Secondary"
    );
    // Heal: quorum comes back, the held write completes (success, no error), and reaches
    // the Secondary.
    p.net.heal();
    let r = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the held write completes after the heal");
    writer.join().unwrap();
    assert!(r.ok(), "the held write failed: {}", r.text);
    let v = c.wait_json(
        &["volume", "show", "ps2"],
        "in sync after the heal, nothing held",
        |v| {
            in_sync(v)
                && replica(v, &primary)["suspended_requests"] == 0
                && replica(v, &primary)["role"] == "Primary"
        },
    );
    eprintln!("healed:\n{v:#}");
    qemu_io_ok(&uri, &reads(&held));
    qemu_io_ok(&uri, &reads(&before));
    assert!(
        data_at(c, &secondary, "ps2", held[0].0, held[0].1)
            .iter()
            .all(|b| *b == 0x82),
        "the held write did not reach the Secondary"
    );
    same_files(c, &primary, &secondary, "ps2");
    no_split_brain(c);
    let v = c.json(&["volume", "set", "ps2", "--on-no-quorum", "io-error"]);
    assert_eq!(v["on_no_quorum"], "io-error", "{v:#}");

    // The policy at creation; refused for one replica and for a value that is no policy
    // (nothing created either way).
    let v = c.json(&[
        "volume",
        "create",
        "ps3",
        "16MiB",
        "--replicas",
        "2",
        "--on-no-quorum",
        "suspend",
    ]);
    assert_eq!(v["on_no_quorum"], "suspend", "{v:#}");
    for (args, want) in [
        (
            vec![
                "volume",
                "create",
                "ps4",
                "16MiB",
                "--on-no-quorum",
                "suspend",
            ],
            "not_replicated",
        ),
        (
            vec![
                "volume",
                "create",
                "ps4",
                "16MiB",
                "--replicas",
                "2",
                "--on-no-quorum",
                "hang",
            ],
            "use io-error or suspend",
        ),
    ] {
        let out = run(c.cli().args(&args));
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && text.contains(want),
            "{args:?}: {text}"
        );
    }
    let list = c.json(&["volume", "list"]);
    assert!(
        list.as_array().unwrap().iter().all(|v| v["name"] != "ps4"),
        "{list:#}"
    );
}

/// The witness as a diskless Primary, cut off from both diskful replicas at once (a blip
/// around its host) and healed: it serves again on its own, without demote and promote (the
/// replica that holds all its data adopts its generation from its offer, protocol version 6),
/// and the data written before and after the blip reads back; no split brain.
#[test]
fn diskless_primary_serves_again_after_a_blip_around_it() {
    let p = Proxied::start();
    let c = &p.c;
    let v = p.volume("pw");
    let w = witness_of(&v).to_string();
    c.tandem(&["volume", "promote", "pw", "--node", &w]);
    let serving = |v: &Value| {
        replica(v, &w)["role"] == "Primary"
            && replica(v, &w)["quorum"] == true
            && diskful(v).iter().all(|r| {
                r["disk_state"] == "UpToDate" && established(r, &w) && r["out_of_sync_bytes"] == 0
            })
    };
    c.wait_json(&["volume", "show", "pw"], "the witness Primary", serving);
    let cj = c.json(&["volume", "connect", "pw", "--node", &w]);
    let uri = cj["uri"].as_str().expect("uri").to_string();
    let before = [(0, 256 * KIB, 0x91)];
    qemu_io_ok(&uri, &writes(&before));

    // The blip: both of the witness's links go down together.
    assert_eq!(p.net.isolate(p.id(&w)), 2, "the witness's two links");
    c.wait_json(
        &["volume", "show", "pw"],
        "the witness without its peers",
        |v| {
            let r = replica(v, &w);
            r["role"] == "Primary"
                && r["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|x| x["repl_state"] != "Established")
        },
    );
    // The witness's engine logs each peer it serves through ("node N holds our data").
    let routed = || {
        c.agent_log(&w)
            .matches("holds our data: our I/O goes to it")
            .count()
    };
    let routed_before = routed();
    p.net.heal();
    let v = c.wait_json(
        &["volume", "show", "pw"],
        "the witness Primary with its peers again after the heal",
        serving,
    );
    eprintln!("after the heal:\n{v:#}");
    wait_until(
        Duration::from_secs(30),
        "the witness to route its I/O to a peer again",
        || (routed() > routed_before).then_some(()),
    );

    // I/O through the witness works again, no demote/promote in between.
    let after = [(8 * MIB, 256 * KIB, 0x92)];
    qemu_io_ok(&uri, &writes(&after));
    qemu_io_ok(&uri, &reads(&before));
    qemu_io_ok(&uri, &reads(&after));
    c.wait_json(&["volume", "show", "pw"], "in sync after writes", serving);
    let d = diskful_nodes(&p.show("pw"));
    same_files(c, &d[0], &d[1], "pw");
    for (o, l, pat) in before.iter().chain(after.iter()) {
        assert!(
            data_at(c, &d[0], "pw", *o, *l).iter().all(|b| b == pat),
            "{} holds pattern {pat:#x} at {o}+{l}",
            d[0]
        );
    }
    no_split_brain(c);
}

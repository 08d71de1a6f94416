//! End to end with real processes: failover. A checker (libnbd, `tests/tools/acked_writes.py`)
//! writes numbered blocks through the Primary, 16 in flight, and records every acknowledged
//! write; the Primary's agent is SIGKILLed mid-stream; `tandem volume promote` makes the other
//! diskful node Primary; every acknowledged write reads back from it. The old Primary comes
//! back as Secondary and resyncs; `volume demote`/`promote` switch the role back and forth; an
//! agent restarted while the controller is down serves its replicated volume again from its
//! local copy of the desired state. With three replicas, the two survivors of a Primary killed
//! mid-write end identical.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::repl::{diskful_nodes, same_files};
use common::*;
use serde_json::Value;

const BLOCK: usize = 4096;
/// Blocks the checker cycles through (8 MiB): each is rewritten several times.
const BLOCKS: u64 = 2048;

fn replica<'a>(v: &'a Value, node: &str) -> &'a Value {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no replica on {node}: {v:#}"))
}

/// `node` is Primary with quorum, `other` Secondary, both UpToDate, connected, nothing out of
/// sync (as both agents report it).
fn settled(v: &Value, primary: &str, other: &str) -> bool {
    let p = replica(v, primary);
    let s = replica(v, other);
    let linked = |r: &Value| {
        r["peers"]
            .as_array()
            .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["repl_state"] == "Established"))
    };
    p["role"] == "Primary"
        && p["quorum"] == true
        && s["role"] == "Secondary"
        && [p, s]
            .iter()
            .all(|r| r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0 && linked(r))
}

fn signal_and_wait(pid: i32, signal: i32) {
    // SAFETY: signalling a daemon of this test's cluster.
    unsafe { libc::kill(pid, signal) };
    wait_pid_exit(pid, "the process to exit");
}

/// The sequence number a block holds (`None`: never written, all zeros); panics on a torn or
/// foreign block.
fn seq_of(block: &[u8], index: u64) -> Option<u64> {
    if block.iter().all(|b| *b == 0) {
        return None;
    }
    let head = std::str::from_utf8(&block[..28]).unwrap_or("");
    let seq: u64 = head
        .strip_prefix("tandem-seq=")
        .and_then(|s| s.strip_suffix(';'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("block {index} holds something else: {:?}", &block[..32]));
    let unit = format!("tandem-seq={seq:016};");
    let want: Vec<u8> = unit.bytes().cycle().take(BLOCK).collect();
    assert!(
        block == want.as_slice(),
        "block {index} is torn (seq {seq})"
    );
    assert_eq!(seq % BLOCKS, index, "block {index} holds write {seq}");
    Some(seq)
}

/// Copies the export at `uri` into `file` (nbdcopy) and returns its bytes.
fn copy_out(uri: &str, file: &Path) -> Vec<u8> {
    check(Command::new(tool("nbdcopy")).arg(uri).arg(file));
    std::fs::read(file).unwrap()
}

/// What the checker saw: per block the seqs issued and the last acknowledged one.
struct Checked {
    issued: BTreeMap<u64, Vec<u64>>,
    acked: BTreeMap<u64, u64>,
}

/// Runs the checker (`tests/tools/acked_writes.py`) against the export of volume `vol` on
/// `primary` and SIGKILLs that node's agent mid-stream (every block rewritten a few times,
/// the controller has seen the consumer); returns what the checker issued and saw
/// acknowledged before it saw the Primary die.
fn write_until_primary_killed(c: &Cluster, vol: &str, primary: &str) -> Checked {
    let python = "/usr/bin/python3";
    assert!(
        Path::new(python).exists(),
        "{python} is missing; ./scripts/test installs python3-libnbd"
    );
    let checker = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/acked_writes.py");
    let uri = c.connect(vol);
    assert!(
        uri.contains(primary),
        "{uri} should name {primary}'s socket"
    );
    let mut child = die_with_parent(
        Command::new(python)
            .arg(&checker)
            .arg(&uri)
            .arg(BLOCKS.to_string())
            .arg("1000000")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut issued: BTreeMap<u64, Vec<u64>> = BTreeMap::new(); // block -> seqs issued
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new(); // block -> last acknowledged seq
    let mut n_acked = 0u64;
    let mut killed = false;
    let mut end = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let (kind, rest) = line.split_at(1);
        let rest = rest.trim();
        match kind {
            "I" => {
                let seq: u64 = rest.parse().unwrap();
                issued.entry(seq % BLOCKS).or_default().push(seq);
            }
            "A" => {
                let seq: u64 = rest.parse().unwrap();
                let e = acked.entry(seq % BLOCKS).or_default();
                *e = (*e).max(seq);
                n_acked += 1;
                if n_acked >= 3 * BLOCKS && n_acked.is_multiple_of(256) && !killed {
                    let v = c.json(&["volume", "show", vol]);
                    if replica(&v, primary)["connections"].as_u64().unwrap_or(0) > 0 {
                        signal_and_wait(c.agent_pid(primary).expect("agent.pid"), libc::SIGKILL);
                        killed = true;
                    }
                }
            }
            _ => {
                end = Some(line.clone());
                break;
            }
        }
    }
    let status = child.wait().unwrap();
    assert!(
        killed,
        "the checker ended before the kill: {end:?} {status}"
    );
    let end = end.unwrap_or_default();
    assert!(
        end.starts_with('E'),
        "the checker should see the Primary die: {end}"
    );
    eprintln!("{n_acked} writes acknowledged before the Primary died; checker: {end}");
    Checked { issued, acked }
}

/// Every acknowledged write reads back from `uri` (the new Primary); blocks written in flight
/// at the kill hold either their last acknowledged write or one issued after it.
fn check_acknowledged(c: &Cluster, uri: &str, checked: &Checked, copy: &str) {
    let data = copy_out(uri, &c.path().join(copy));
    let mut blocks = 0;
    for b in 0..BLOCKS {
        let got = seq_of(&data[b as usize * BLOCK..(b as usize + 1) * BLOCK], b);
        let last = checked.acked.get(&b).copied();
        match (got, last) {
            (None, None) => {}
            (None, Some(a)) => panic!("block {b}: acknowledged write {a} lost (zeros)"),
            (Some(g), last) => {
                let later_issued = checked
                    .issued
                    .get(&b)
                    .is_some_and(|i| i.contains(&g) && Some(g) > last);
                assert!(
                    Some(g) == last || later_issued,
                    "block {b}: holds write {g}, last acknowledged {last:?}"
                );
            }
        }
        if last.is_some() {
            blocks += 1;
        }
    }
    assert_eq!(blocks, BLOCKS, "every block had an acknowledged write");
}

#[test]
fn primary_killed_mid_write_promote_the_other_no_acknowledged_write_lost() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "f", "32MiB", "--replicas", "2"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let p = v["primary_node"]
        .as_str()
        .expect("primary_node")
        .to_string();
    let s = diskful_nodes(&v)
        .into_iter()
        .find(|n| *n != p)
        .expect("a second diskful replica");
    c.wait_json(&["volume", "show", "f"], "replicas in sync", |v| {
        settled(v, &p, &s)
    });

    // The checker writes through the Primary until it fails.
    let checked = write_until_primary_killed(&c, "f", &p);

    // Promote the survivor. Its old Primary still has a consumer in its last report, so this
    // needs --force (the operator knows the node is dead).
    let out = run(c.cli().args(["volume", "promote", "f", "--node", &s]));
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "promotion must be refused without --force"
    );
    assert!(text.contains("--force") && text.contains(&p), "{text}");
    let text = c.tandem(&["volume", "promote", "f", "--node", &s, "--force"]);
    assert!(text.contains("Primary"), "{text}");

    let uri_s = c.connect("f");
    assert!(uri_s.contains(&s), "connect follows the Primary: {uri_s}");
    check_acknowledged(&c, &uri_s, &checked, "after-failover.img");

    // New writes on the new Primary while the old one is down.
    let qemu_io = |uri: &str, cmds: &[&str]| {
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        let out = check(cmd.arg(uri));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        out
    };
    qemu_io(&uri_s, &["write -P 0x5a 16M 1M", "flush"]);

    // The old Primary comes back as Secondary (it crashed as Primary) and catches up.
    c.restart_agent(&p);
    let v = c.wait_json(
        &["volume", "show", "f"],
        "the old Primary back as an UpToDate Secondary",
        |v| settled(v, &s, &p),
    );
    assert_eq!(v["primary_node"], s.as_str());
    let resynced = replica(&v, &p)["last_resync_bytes"].as_u64().unwrap();
    assert!(
        ((1 << 20)..(16 << 20)).contains(&resynced),
        "the old Primary resyncs what it missed (1 MiB + its activity log), not 32 MiB: {resynced}"
    );
    same_files(&c, &p, &s, "f");

    // Switch back in an orderly way: demote, then promote.
    c.tandem(&["volume", "demote", "f", "--node", &s]);
    let v = c.json(&["volume", "show", "f"]);
    assert!(v["primary_node"].is_null(), "{v:#}");
    assert_eq!(replica(&v, &s)["role"], "Secondary");
    c.tandem(&["volume", "promote", "f", "--node", &p]);
    c.wait_json(
        &["volume", "show", "f"],
        "the old Primary Primary again",
        |v| settled(v, &p, &s),
    );
    let uri = c.wait_export("f");
    assert!(uri.contains(&p), "{uri}");
    qemu_io(
        &uri,
        &["read -P 0x5a 16M 1M", "write -P 0x6b 20M 64k", "flush"],
    );

    // The data plane does not wait for the controller: with the controller dead, the
    // Primary's agent stops (orderly) and starts again; it serves the volume from its local
    // copy of the desired state, Primary again, data intact, writes replicated.
    c.kill_controller(libc::SIGKILL);
    signal_and_wait(c.agent_pid(&p).expect("agent.pid"), libc::SIGTERM);
    c.restart_agent(&p);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let served = || {
        let out = Command::new(tool("qemu-io"))
            .args(["-f", "raw", "-c", "read -P 0x6b 20M 64k", "-c"])
            .arg("write -P 0x7c 24M 64k")
            .arg(&uri)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success()
            && !text.contains("error")
            && !text.contains("failed")
            && text.contains("wrote"))
        .then_some(())
    };
    while served().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted agent does not serve the export again without the controller:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    qemu_io(&uri, &["flush"]);
    // Replicated to the Secondary: the same bytes in its data file.
    let sec_file = c.node_dir(&s).join("pool/f.data");
    wait_until(
        Duration::from_secs(30),
        "the write on the Secondary",
        || {
            let d = std::fs::read(&sec_file).ok()?;
            let at = 24 << 20;
            d[at..at + 65536].iter().all(|b| *b == 0x7c).then_some(())
        },
    );
}

/// A consumer holding an NBD connection open (libnbd) until dropped.
struct Holder(std::process::Child);

impl Holder {
    fn open(uri: &str) -> Holder {
        let mut child = die_with_parent(
            Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n\
                     h.pwrite(b'h' * 4096, 0)\nprint('open', flush=True)\nsys.stdin.read()\n",
                ])
                .arg(uri)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
        .spawn()
        .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "open",
            "the holder could not open and write {uri}"
        );
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn auto_promote_on_open_and_auto_demote_on_last_close() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "a", "16MiB", "--replicas", "2"]);
    let p = v["primary_node"].as_str().unwrap().to_string();
    let s = diskful_nodes(&v).into_iter().find(|n| *n != p).unwrap();
    c.wait_json(&["volume", "show", "a"], "in sync", |v| settled(v, &p, &s));
    // Nobody held Primary: the consumer decides where the volume is Primary.
    c.tandem(&["volume", "demote", "a", "--node", &p]);
    let uri = |n: &str| {
        c.tandem(&["volume", "connect", "a", "--node", n])
            .trim()
            .to_string()
    };
    let (uri_p, uri_s) = (uri(&p), uri(&s));
    let qemu_io = |uri: &str, cmds: &[&str]| {
        let mut cmd = Command::new(tool("qemu-io"));
        cmd.args(["-f", "raw"]);
        for c in cmds {
            cmd.arg("-c").arg(c);
        }
        let out = run(cmd.arg(uri));
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let ok = |text: &str| !text.contains("error") && !text.contains("failed");

    // Opening the export on the Secondary promotes it; closing demotes it again.
    let out = qemu_io(&uri_s, &["write -P 0x11 1M 64k", "flush"]);
    assert!(ok(&out), "{out}");
    let v = c.wait_json(&["volume", "show", "a"], "auto-demote after close", |v| {
        replica(v, &s)["role"] == "Secondary" && replica(v, &p)["role"] == "Secondary"
    });
    assert!(v["primary_node"].is_null(), "{v:#}");
    // The other node, the same way; it reads what the first wrote.
    let out = qemu_io(&uri_p, &["read -P 0x11 1M 64k", "write -P 0x22 2M 64k"]);
    assert!(ok(&out) && out.contains("read 65536"), "{out}");

    // While a consumer holds the volume on one node, an open on the other cannot promote:
    // its I/O fails and the refusal is reported.
    let holder = Holder::open(&uri_p);
    c.wait_json(&["volume", "show", "a"], "the holder's node Primary", |v| {
        replica(v, &p)["role"] == "Primary" && replica(v, &p)["connections"] == 1
    });
    let out = qemu_io(&uri_s, &["write -P 0x33 3M 64k"]);
    assert!(!ok(&out), "a second Primary must be refused: {out}");
    let v = c.wait_json(&["volume", "show", "a"], "the refusal reported", |v| {
        replica(v, &s)["role_error"]
            .as_str()
            .is_some_and(|e| e.contains("auto-promote"))
    });
    eprintln!("{}", replica(&v, &s)["role_error"]);
    assert_eq!(replica(&v, &s)["role"], "Secondary");
    drop(holder);
    c.wait_json(
        &["volume", "show", "a"],
        "auto-demote after the holder left",
        |v| replica(v, &p)["role"] == "Secondary",
    );
    // Now the other node can have it; nothing of the refused write landed.
    let out = qemu_io(
        &uri_s,
        &[
            "read -P 0 3M 64k",
            "read -P 0x22 2M 64k",
            "read -P 0x68 0 4k",
        ],
    );
    assert!(
        ok(&out) && !out.contains("Pattern verification failed"),
        "{out}"
    );
    c.wait_json(&["volume", "show", "a"], "in sync, nobody Primary", |v| {
        [&p, &s].iter().all(|n| {
            let r = replica(v, n);
            r["role"] == "Secondary" && r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0
        })
    });
    same_files(&c, &p, &s, "a");
}

/// `a` and `b` UpToDate, linked to each other (Established both ways) with nothing out of sync
/// between them.
fn pair_in_sync(v: &Value, a: &str, b: &str) -> bool {
    let toward = |from: &str, to: &str| {
        let r = replica(v, from);
        r["disk_state"] == "UpToDate"
            && r["peers"].as_array().is_some_and(|p| {
                p.iter().any(|p| {
                    p["node"] == to
                        && p["repl_state"] == "Established"
                        && p["out_of_sync_bytes"] == 0
                })
            })
    };
    toward(a, b) && toward(b, a)
}

/// Three diskful replicas: the Primary is SIGKILLed with writes on their way to both
/// Secondaries (a write may reach one and not the other). Every acknowledged write reads back
/// from the promoted survivor, and the two survivors end byte-identical once they are in sync
/// with each other (before protocol version 7 nothing marked such a write between them); the
/// old Primary comes back and all three end identical.
#[test]
fn three_replicas_primary_killed_mid_write_the_survivors_end_identical() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "t", "32MiB", "--replicas", "3"]);
    assert_eq!(v["state"], "ready", "{v:#}");
    let p = v["primary_node"]
        .as_str()
        .expect("primary_node")
        .to_string();
    let others: Vec<String> = diskful_nodes(&v).into_iter().filter(|n| *n != p).collect();
    assert_eq!(others.len(), 2, "{v:#}");
    let (s1, s2) = (&others[0], &others[1]);
    c.wait_json(&["volume", "show", "t"], "three replicas in sync", |v| {
        pair_in_sync(v, &p, s1) && pair_in_sync(v, &p, s2) && pair_in_sync(v, s1, s2)
    });

    let checked = write_until_primary_killed(&c, "t", &p);
    c.tandem(&["volume", "promote", "t", "--node", s1, "--force"]);
    let uri = c.connect("t");
    assert!(
        uri.contains(s1.as_str()),
        "connect follows the Primary: {uri}"
    );
    check_acknowledged(&c, &uri, &checked, "after-failover.img");

    c.wait_json(&["volume", "show", "t"], "the survivors in sync", |v| {
        replica(v, s1)["role"] == "Primary" && pair_in_sync(v, s1, s2)
    });
    same_files(&c, s1, s2, "t");

    c.restart_agent(&p);
    c.wait_json(&["volume", "show", "t"], "all three in sync again", |v| {
        pair_in_sync(v, s1, &p) && pair_in_sync(v, s2, &p) && pair_in_sync(v, s1, s2)
    });
    same_files(&c, s1, &p, "t");
    same_files(&c, s1, s2, "t");
}

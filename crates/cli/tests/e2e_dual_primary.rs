//! End to end with real processes: the dual-primary window for a live migration. A 3-node
//! cluster (2 diskful replicas + witness); a consumer (libnbd) holds the source's export open;
//! with the window closed the destination's export cannot write; `volume set NAME
//! --allow-two-primaries on`; the destination opens its export while the source's stays open
//! (both are Primary, one holds the write token), both write overlapping ranges in turn and
//! read each other's writes, the source closes (the destination is the only Primary), the
//! window closes, and both replicas' data files are byte-identical.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use common::repl::{diskful_nodes, qemu_io_within, replica, same_files};
use common::*;
use serde_json::Value;

/// The migration, driven step by step: each step prints a line and waits for one on stdin.
const MIGRATION: &str = r#"
import nbd, sys

def step(name):
    print(name, flush=True)
    sys.stdin.readline()

M = 1 << 20
src = nbd.NBD()
src.connect_uri(sys.argv[1])
src.pwrite(b'\xa1' * M, 0)
src.flush()
step('source-open')

dst = nbd.NBD()
dst.connect_uri(sys.argv[2])
step('both-open')

# The destination reads what the source wrote (it fetches the write token for that).
assert dst.pread(M, 0) == b'\xa1' * M, 'destination read stale data'
# Both write, in turn, overlapping ranges: the last write of each byte wins everywhere.
for i in range(16):
    src.pwrite(bytes([i]) * 65536, 2 * M)
    dst.pwrite(bytes([0x80 + i]) * 65536, 2 * M + 32768)
want = bytes([15]) * 32768 + bytes([0x8f]) * 65536
for h in (src, dst):
    assert h.pread(len(want), 2 * M) == want, 'the two Primaries disagree'
src.flush()
dst.flush()

# The source VM stops: its consumer goes away.
src.shutdown()
step('source-closed')

dst.pwrite(b'\xc3' * 65536, 4 * M)
dst.flush()
assert dst.pread(65536, 4 * M) == b'\xc3' * 65536
dst.shutdown()
print('done', flush=True)
"#;

struct Migration {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Migration {
    fn start(src: &str, dst: &str) -> Migration {
        let python = "/usr/bin/python3";
        assert!(
            std::path::Path::new(python).exists(),
            "{python} is missing; ./scripts/test installs python3-libnbd"
        );
        let mut child = die_with_parent(
            Command::new(python)
                .args(["-c", MIGRATION, src, dst])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
        .spawn()
        .unwrap();
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        Migration { child, stdin, out }
    }

    /// Waits for the script to reach `step` (it failed if it printed anything else).
    fn at(&mut self, step: &str, c: &Cluster) {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        if line.trim() != step {
            let status = self.child.wait().unwrap();
            panic!(
                "the migration did not reach {step:?} (got {line:?}, {status}):\n{}",
                c.logs()
            );
        }
    }

    fn go_on(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both diskful replicas UpToDate, linked, nothing out of sync.
fn replicas_in_sync(v: &Value, diskful: &[String]) -> bool {
    diskful.iter().all(|n| {
        let r = replica(v, n);
        r["disk_state"] == "UpToDate"
            && r["out_of_sync_bytes"] == 0
            && r["peers"].as_array().is_some_and(|p| {
                !p.is_empty() && p.iter().all(|p| p["repl_state"] == "Established")
            })
    })
}

#[test]
fn live_migration_through_the_dual_primary_window() {
    let c = Cluster::start_with(3, &["--experimental-replication"]);
    let v = c.json(&["volume", "create", "m", "16MiB", "--replicas", "2"]);
    let diskful = diskful_nodes(&v);
    assert_eq!(diskful.len(), 2, "{v:#}");
    let first = v["primary_node"].as_str().unwrap().to_string();
    c.wait_json(&["volume", "show", "m"], "replicas in sync", |v| {
        replicas_in_sync(v, &diskful) && replica(v, &first)["role"] == "Primary"
    });
    // Nobody holds Primary: the consumers decide (auto-promote on open).
    c.tandem(&["volume", "demote", "m", "--node", &first]);
    let (src, dst) = (diskful[0].clone(), diskful[1].clone());
    let uri = |n: &str| {
        c.tandem(&["volume", "connect", "m", "--node", n])
            .trim()
            .to_string()
    };
    let (uri_src, uri_dst) = (uri(&src), uri(&dst));

    let mut m = Migration::start(&uri_src, &uri_dst);
    m.at("source-open", &c);
    c.wait_json(&["volume", "show", "m"], "the source Primary", |v| {
        replica(v, &src)["role"] == "Primary" && replica(v, &dst)["role"] == "Secondary"
    });

    // Window closed: the destination cannot become Primary, its writes fail.
    let closed = qemu_io_within(
        &uri_dst,
        &["write -P 0x66 8M 4k".to_string()],
        std::time::Duration::from_secs(60),
    );
    assert!(
        !closed.ok(),
        "a write on the destination succeeded with the window closed: {closed:?}"
    );

    // Open the window; every engine must have it before the destination opens.
    c.tandem(&["volume", "set", "m", "--allow-two-primaries", "on"]);
    c.wait_json(&["volume", "show", "m"], "window open everywhere", |v| {
        v["allow_two_primaries"] == true
            && v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["allow_two_primaries"] == true)
    });
    m.go_on();
    m.at("both-open", &c);
    let v = c.wait_json(&["volume", "show", "m"], "two Primaries", |v| {
        let (s, d) = (replica(v, &src), replica(v, &dst));
        s["role"] == "Primary"
            && d["role"] == "Primary"
            && s["dual_primary_partner"] == dst.as_str()
            && d["dual_primary_partner"] == src.as_str()
    });
    let tokens = [&src, &dst]
        .iter()
        .filter(|n| replica(&v, n)["write_token"] == true)
        .count();
    assert_eq!(tokens, 1, "exactly one write token: {v:#}");
    // The window cannot close under two Primaries.
    c.refused(
        &["volume", "set", "m", "--allow-two-primaries", "off"],
        "two_primaries",
    );

    m.go_on();
    m.at("source-closed", &c);
    // The source left the window (auto-demote on its last close): the destination is the one
    // Primary, a plain one.
    c.wait_json(&["volume", "show", "m"], "the destination alone", |v| {
        let (s, d) = (replica(v, &src), replica(v, &dst));
        s["role"] == "Secondary"
            && d["role"] == "Primary"
            && s["dual_primary_partner"].is_null()
            && d["dual_primary_partner"].is_null()
    });
    m.go_on();
    m.at("done", &c);
    assert!(m.child.wait().unwrap().success());

    // The token really moved: the destination's engine received it at least once per round of
    // the alternating writes.
    let handoffs = c
        .agent_log(&dst)
        .matches("dual-primary: write token from")
        .count();
    assert!(
        handoffs >= 16,
        "{handoffs} token hand-offs to {dst}, expected one per round at least"
    );

    c.wait_json(
        &["volume", "show", "m"],
        "in sync after the migration",
        |v| replicas_in_sync(v, &diskful),
    );
    c.tandem(&["volume", "set", "m", "--allow-two-primaries", "off"]);
    c.wait_json(&["volume", "show", "m"], "window closed", |v| {
        v["allow_two_primaries"] == false
    });
    same_files(&c, &src, &dst, "m");
    let data = std::fs::read(c.node_dir(&src).join("pool").join("m.data")).unwrap();
    assert!(data[4 << 20..(4 << 20) + 65536].iter().all(|b| *b == 0xc3));
    assert!(data[2 << 20..(2 << 20) + 32768].iter().all(|b| *b == 15));
    assert!(
        data[(2 << 20) + 32768..(2 << 20) + 98304]
            .iter()
            .all(|b| *b == 0x8f)
    );
}

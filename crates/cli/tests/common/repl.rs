//! Helpers for tests of replicated volumes: reading `volume show -o json`, qemu-io with a
//! deadline, comparing the diskful replicas' data files.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use super::proxy::Net;
use super::{Cluster, tool};

pub fn diskful(v: &Value) -> Vec<&Value> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["diskless"] == false)
        .collect()
}

/// The nodes holding data (diskful replicas) of `volume show -o json`.
pub fn diskful_nodes(v: &Value) -> Vec<String> {
    nodes_of_kind(v, false)
}

/// The nodes of the volume's diskless (`true`: the witness) or diskful placements.
pub fn nodes_of_kind(v: &Value, diskless: bool) -> Vec<String> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["diskless"] == diskless)
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect()
}

pub fn replica<'a>(v: &'a Value, node: &str) -> &'a Value {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == node)
        .unwrap_or_else(|| panic!("no replica on {node}: {v:#}"))
}

/// Both diskful replicas UpToDate, every link of every placement Established, nothing out of
/// sync, a Primary with quorum.
pub fn in_sync(v: &Value) -> bool {
    let d = diskful(v);
    let all = v["replicas"].as_array().unwrap();
    d.len() == 2
        && d.iter()
            .all(|r| r["disk_state"] == "UpToDate" && r["out_of_sync_bytes"] == 0)
        && all.iter().all(|r| {
            r["peers"].as_array().is_some_and(|p| {
                p.len() == all.len() - 1
                    && p.iter()
                        .all(|p| p["repl_state"] == "Established" && p["out_of_sync_bytes"] == 0)
            })
        })
        && d.iter()
            .filter(|r| r["role"] == "Primary" && r["quorum"] == true)
            .count()
            == 1
}

pub fn node_of_opt<'a>(v: &'a Value, role: &str) -> Option<&'a str> {
    diskful(v)
        .into_iter()
        .find(|r| r["role"] == role)
        .and_then(|r| r["node"].as_str())
}

pub fn node_of<'a>(v: &'a Value, role: &str) -> &'a str {
    node_of_opt(v, role).unwrap_or_else(|| panic!("no {role}: {v:#}"))
}

pub fn witness_of(v: &Value) -> &str {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["diskless"] == true)
        .and_then(|r| r["node"].as_str())
        .unwrap_or_else(|| panic!("no witness: {v:#}"))
}

/// What one qemu-io run did.
#[derive(Debug)]
pub struct QemuIo {
    pub success: bool,
    /// stdout and stderr.
    pub text: String,
}

impl QemuIo {
    /// Exit status 0 and no failed command (qemu-io prints failures, e.g. "write failed:
    /// Input/output error", and "Pattern verification failed").
    pub fn ok(&self) -> bool {
        let t = self.text.to_lowercase();
        self.success && !t.contains("failed") && !t.contains("error")
    }
}

/// Runs qemu-io with `cmds` against `uri`; fails the test if it does not exit within
/// `timeout` (I/O that hangs instead of completing or failing).
pub fn qemu_io_within(uri: &str, cmds: &[String], timeout: Duration) -> QemuIo {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    super::die_with_parent(&mut cmd);
    let child = cmd.spawn().expect("spawn qemu-io");
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.expect("qemu-io output"),
        Err(_) => {
            // SAFETY: our own child, not yet reaped (the waiter thread is still waiting).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = waiter.join();
            panic!("qemu-io {cmds:?} on {uri} did not finish within {timeout:?} (I/O hangs)");
        }
    };
    let _ = waiter.join();
    QemuIo {
        success: out.status.success(),
        text: String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr),
    }
}

/// qemu-io that must succeed (every command, every pattern check).
pub fn qemu_io_ok(uri: &str, cmds: &[String]) -> String {
    let r = qemu_io_within(uri, cmds, Duration::from_secs(60));
    assert!(r.ok(), "qemu-io {cmds:?} on {uri} failed: {}", r.text);
    r.text
}

/// `write -P` commands for `(offset, len, pattern)` plus a flush.
pub fn writes(blocks: &[(u64, u64, u8)]) -> Vec<String> {
    let mut v: Vec<String> = blocks
        .iter()
        .map(|(o, l, p)| format!("write -P {p} {o} {l}"))
        .collect();
    v.push("flush".into());
    v
}

/// `read -P` commands checking `(offset, len, pattern)`.
pub fn reads(blocks: &[(u64, u64, u8)]) -> Vec<String> {
    blocks
        .iter()
        .map(|(o, l, p)| format!("read -P {p} {o} {l}"))
        .collect()
}

/// The data files of `volume` on nodes `a` and `b` are byte-identical.
pub fn same_files(c: &Cluster, a: &str, b: &str, volume: &str) {
    let fa = std::fs::read(c.node_dir(a).join("pool").join(format!("{volume}.data"))).unwrap();
    let fb = std::fs::read(c.node_dir(b).join("pool").join(format!("{volume}.data"))).unwrap();
    assert_eq!(fa.len(), fb.len());
    let first = fa.iter().zip(&fb).position(|(x, y)| x != y);
    assert!(first.is_none(), "{a} and {b} differ at byte {first:?}");
}

/// The peer entry for `node` in one replica of `volume show -o json`.
pub fn peer<'a>(r: &'a Value, node: &str) -> &'a Value {
    r["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node)
        .unwrap_or_else(|| panic!("no peer {node} in {r:#}"))
}

/// `len` bytes at `offset` of `volume`'s data file on `node` (default pool).
pub fn data_at(c: &Cluster, node: &str, volume: &str, offset: u64, len: u64) -> Vec<u8> {
    let f = std::fs::read(c.node_dir(node).join("pool").join(format!("{volume}.data"))).unwrap();
    f[offset as usize..(offset + len) as usize].to_vec()
}

/// A 3-node replication cluster whose agents advertise fault proxies (`super::proxy`), for
/// partition and split-brain tests; node name -> node id in `ids`.
pub struct Proxied {
    // Field order = drop order: the cluster (daemons) first, then the proxies.
    pub c: Cluster,
    pub net: Net,
    pub ids: BTreeMap<String, u8>,
}

impl Proxied {
    pub fn start() -> Proxied {
        let mut c = Cluster::start_with(3, &["--experimental-replication"]);
        let mut net = Net::new();
        let mut ids = BTreeMap::new();
        let mut want = BTreeMap::new();
        for (name, id, addr) in c.repl_nodes() {
            let proxy = net.add(id, addr.parse().unwrap());
            // An orderly stop, the config key, a start by hand (as an operator would).
            c.stop_agent(&name, libc::SIGTERM);
            c.set_agent_config(
                &name,
                "repl_advertise",
                toml::Value::String(proxy.to_string()),
            );
            c.restart_agent(&name);
            ids.insert(name.clone(), id);
            want.insert(name, proxy.to_string());
        }
        c.wait_json(
            &["node", "list"],
            "every agent online and advertising its proxy",
            |v| {
                v.as_array().unwrap().iter().all(|n| {
                    n["state"] == "online"
                        && want.get(n["name"].as_str().unwrap()).map(String::as_str)
                            == n["repl_addr"].as_str()
                })
            },
        );
        Proxied { c, net, ids }
    }

    pub fn id(&self, node: &str) -> u8 {
        self.ids[node]
    }
}

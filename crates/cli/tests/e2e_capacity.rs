//! End to end with real processes: a pool that runs full. The agent reports the pool's
//! capacity and free space live (a filesystem filling up is noticed without any command);
//! writes that do not fit fail with ENOSPC to the consumer, not EIO, and nothing written
//! before is lost; new placements avoid the full pool; freeing space makes writes work again.
//! The small pool is a tmpfs mounted by the test (root, as `./scripts/test` runs).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted for the test, unmounted on drop (also when the test fails).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size_mib: u64) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir));
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (./scripts/test runs as root in CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn pool<'a>(pools: &'a Value, name: &str) -> Option<&'a Value> {
    pools.as_array()?.iter().find(|p| p["name"] == name)
}

fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(uri));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let ok = out.status.success() && !text.contains("failed") && !text.contains("error");
    (ok, text)
}

#[test]
fn a_full_pool_gives_enospc_keeps_data_and_is_avoided_by_placement() {
    let mut c = Cluster::start(1);
    let small_dir = c.path().join("small");
    let _tmpfs = Tmpfs::mount(&small_dir, 48);
    // Add the pool to the agent's configuration and restart it.
    c.stop_agent("node1", libc::SIGTERM);
    let text = std::fs::read_to_string(c.node_dir("node1").join("agent.toml")).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let mut pools = table["pools"].as_array().unwrap().clone();
    let mut small = toml::Table::new();
    small.insert("name".into(), "small".into());
    small.insert("path".into(), small_dir.display().to_string().into());
    pools.push(toml::Value::Table(small));
    c.set_agent_config("node1", "pools", toml::Value::Array(pools));
    c.restart_agent("node1");
    let pools = c.wait_json(&["pool", "list"], "the small pool reported", |p| {
        pool(p, "small").is_some_and(|s| s["capacity_bytes"].as_u64() == Some(48 * MIB))
    });
    eprintln!("{pools:#}");

    let v = c.json(&["volume", "create", "thin", "40MiB", "--pool", "small"]);
    assert_eq!(v["replicas"][0]["pool"], "small", "{v:#}");
    let uri = c.wait_export("thin");

    // Something else fills the filesystem under the pool: noticed without any command.
    std::fs::write(small_dir.join("filler"), vec![7u8; 30 * MIB as usize]).unwrap();
    c.wait_json(&["pool", "list"], "the free space drop reported", |p| {
        pool(p, "small").is_some_and(|s| s["free_bytes"].as_u64().unwrap_or(u64::MAX) < 20 * MIB)
    });

    // What fits is written; what does not fails with ENOSPC, not EIO.
    let (ok, out) = qemu_io(&uri, &["write -P 0x44 0 8M", "flush"]);
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&uri, &["write -P 0x55 8M 24M"]);
    assert!(!ok, "24 MiB cannot fit into the ~10 MiB left: {out}");
    assert!(
        out.contains("No space left on device"),
        "the consumer sees ENOSPC: {out}"
    );
    // Nothing written before is lost; the export still serves.
    let (ok, out) = qemu_io(&uri, &["read -P 0x44 0 8M"]);
    assert!(ok, "{out}");

    // New placements avoid the full pool.
    let v = c.json(&["volume", "create", "other", "16MiB"]);
    assert_eq!(v["replicas"][0]["pool"], "default", "{v:#}");

    // Space freed: writes work again, no restart.
    std::fs::remove_file(small_dir.join("filler")).unwrap();
    let (ok, out) = qemu_io(
        &uri,
        &["write -P 0x66 8M 16M", "flush", "read -P 0x44 0 8M"],
    );
    assert!(ok, "{out}");
    let (ok, out) = qemu_io(&uri, &["read -P 0x66 8M 16M"]);
    assert!(ok, "{out}");
    for v in ["thin", "other"] {
        c.tandem(&["volume", "delete", v]);
    }
}

//! End to end with real processes: the Primary's backing store fails under a consumer and
//! the volume keeps serving from its peer (DRBD's `on-io-error detach`).
//!
//! The Primary's pool is an XFS file system on a loop device, mounted by the test (root, as
//! `./scripts/test` runs). `xfs_io -x -c 'shutdown -f'` shuts that file system down: from then
//! on every read, write and fsync of the replica's files fails with EIO, like a dead disk.
//! The consumer (qemu-io through the Primary's NBD export) keeps writing and reading without
//! an error; `volume show` reports the replica `Failed` with the I/O error; data written after
//! the failure reads back. The repair: the agent stopped, the file system unmounted and
//! mounted again (its log replayed), the agent started: the replica re-attaches (its metadata
//! says Failed, or, when the shut-down file system kept none of it, it is a crashed Primary
//! whose peer recorded that it stayed behind), resyncs from the peer, and `volume verify` finds
//! no difference.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::repl::*;
use common::*;

const MIB: u64 = 1 << 20;

/// An XFS image on a loop device mounted at a directory; unmounted (lazily) on drop, also
/// when the test fails. The loop device goes with the mount (`-o loop` sets autoclear).
struct XfsMount {
    image: PathBuf,
    dir: PathBuf,
}

impl XfsMount {
    fn create(image: &Path, dir: &Path) -> XfsMount {
        let f = std::fs::File::create(image).unwrap();
        // mkfs.xfs wants at least 300 MiB; the image is sparse.
        f.set_len(320 * MIB).unwrap();
        drop(f);
        check(Command::new(tool("mkfs.xfs")).args(["-q"]).arg(image));
        std::fs::create_dir_all(dir).unwrap();
        let m = XfsMount {
            image: image.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        m.mount();
        m
    }

    fn mount(&self) {
        let out = run(Command::new("mount")
            .args(["-t", "xfs", "-o", "loop"])
            .arg(&self.image)
            .arg(&self.dir));
        assert!(
            out.status.success(),
            "mounting an XFS loop image needs root and loop devices (./scripts/test runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Unmounts, waiting while the file system is still busy (the killed agent's files are
    /// being released).
    fn umount(&self) {
        wait_until(Duration::from_secs(30), "the XFS pool to unmount", || {
            let out = run(Command::new("umount").arg(&self.dir));
            out.status.success().then_some(())
        });
    }

    /// The file system shuts down as after a fatal I/O error: every later I/O fails (EIO).
    fn shutdown(&self) {
        check(
            Command::new(tool("xfs_io"))
                .args(["-x", "-c", "shutdown -f"])
                .arg(&self.dir),
        );
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[test]
fn a_failing_primary_disk_detaches_and_the_volume_keeps_serving_from_its_peer() {
    let mut c = Cluster::start_with(3, &["--experimental-replication"]);
    // node1's pool on XFS: stop the agent, mount over its (empty) pool, start it again.
    let pool = c.node_dir("node1").join("pool");
    c.stop_agent("node1", libc::SIGTERM);
    let xfs = XfsMount::create(&c.path().join("node1-xfs.img"), &pool);
    c.restart_agent("node1");
    c.wait_online("node1");

    c.json(&[
        "volume",
        "create",
        "df",
        "64MiB",
        "--replicas",
        "2",
        "--nodes",
        "node1,node2",
    ]);
    let v = c.wait_json(&["volume", "show", "df"], "in sync", in_sync);
    if node_of(&v, "Primary") != "node1" {
        c.tandem(&["volume", "promote", "df", "--node", "node1"]);
    }
    let v = c.wait_json(&["volume", "show", "df"], "node1 Primary, in sync", |v| {
        in_sync(v) && replica(v, "node1")["role"] == "Primary"
    });
    eprintln!("{v:#}");
    let uri = c.connect("df");
    assert!(uri.contains("node1"), "the export of node1: {uri}");

    let before = [(0, MIB, 0x11), (9 * MIB, 64 * 1024, 0x12)];
    qemu_io_ok(&uri, &writes(&before));
    qemu_io_ok(&uri, &reads(&before));

    // The Primary's disk dies.
    xfs.shutdown();
    assert!(
        std::fs::read(pool.join("df.data")).is_err(),
        "the file system is shut down: reads of the data file fail"
    );

    // The consumer does not notice: writes (some overwrite data from before) and reads
    // succeed, also data written before the failure reads back (from the peer).
    let after = [
        (MIB / 2, MIB, 0x21),
        (20 * MIB, 2 * MIB, 0x22),
        (63 * MIB, MIB, 0x23),
    ];
    qemu_io_ok(&uri, &writes(&after));
    let expect = [
        (0, MIB / 2, 0x11),
        (MIB / 2, MIB, 0x21),
        (9 * MIB, 64 * 1024, 0x12),
        (20 * MIB, 2 * MIB, 0x22),
        (63 * MIB, MIB, 0x23),
    ];
    qemu_io_ok(&uri, &reads(&expect));

    let v = c.wait_json(
        &["volume", "show", "df"],
        "node1's disk Failed with the I/O error, still Primary; node2 UpToDate",
        |v| {
            let r1 = replica(v, "node1");
            let r2 = replica(v, "node2");
            r1["disk_state"] == "Failed"
                && r1["role"] == "Primary"
                && r1["disk_error"].as_str().is_some_and(|e| !e.is_empty())
                && r2["disk_state"] == "UpToDate"
        },
    );
    let err = replica(&v, "node1")["disk_error"]
        .as_str()
        .unwrap()
        .to_string();
    eprintln!("node1 disk_error: {err}");
    assert!(
        err.to_lowercase().contains("input/output error") || err.contains("os error 5"),
        "the backing store's EIO: {err}"
    );
    let text = strip_ansi(&c.tandem(&["volume", "show", "df"]));
    assert!(
        text.contains("Failed") && text.contains("disk detached after an I/O error"),
        "{text}"
    );
    // Still serving, more rounds after the state is reported.
    let later = [(30 * MIB, 4 * MIB, 0x31)];
    qemu_io_ok(&uri, &writes(&later));
    qemu_io_ok(&uri, &reads(&later));
    qemu_io_ok(&uri, &reads(&expect));
    // What the peer holds is what the consumer wrote.
    for (o, l, p) in expect.iter().chain(later.iter()) {
        assert!(
            data_at(&c, "node2", "df", *o, *l).iter().all(|b| b == p),
            "node2 holds pattern {p:#x} at {o}+{l}"
        );
    }

    // Repair: stop the agent, remount (the log replays), start it. The replica resyncs from
    // node2; the controller makes node1 Primary again.
    c.stop_agent("node1", libc::SIGKILL);
    xfs.umount();
    xfs.mount();
    c.restart_agent("node1");
    let v = c.wait_json(&["volume", "show", "df"], "node1 resynced", |v| {
        in_sync(v)
            && replica(v, "node1")["disk_state"] == "UpToDate"
            && replica(v, "node1")["disk_error"].is_null()
    });
    eprintln!("{v:#}");
    assert!(
        replica(&v, "node1")["last_resync_bytes"].as_u64().unwrap() > 0,
        "node1 resynced what it missed: {v:#}"
    );
    same_files(&c, "node1", "node2", "df");
    let r = c.json(&["volume", "verify", "df", "--timeout", "120s"]);
    assert_eq!(r["state"], "done", "{r:#}");
    assert_eq!(r["different_bytes"], 0, "{r:#}");
    let uri = c.wait_export("df");
    qemu_io_ok(&uri, &reads(&expect));
    qemu_io_ok(&uri, &reads(&later));
}

//! Interoperability with real NBD clients: nbdinfo, nbdcopy, nbdsh/python libnbd, qemu-io,
//! qemu-img and fio's nbd engine, over the unix socket and TCP.

mod common;

use std::process::Stdio;

use common::*;
use tandem_blockdev::BlockDevice;

fn nbdinfo_json(uri: &str) -> serde_json::Value {
    let out = run(tool("nbdinfo").args(["--json", uri]));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{out}"))
}

fn export0(v: &serde_json::Value) -> &serde_json::Value {
    &v["exports"][0]
}

#[test]
fn nbdinfo_json_reports_size_and_flags() {
    let h = Harness::start(64 * MIB);
    for uri in [h.unix_uri("disk"), h.tcp_uri("disk")] {
        let v = nbdinfo_json(&uri);
        let e = export0(&v);
        assert_eq!(e["export-size"], 64 * MIB, "{v:#}");
        assert_eq!(e["export-name"], "disk");
        assert_eq!(e["description"], "test disk");
        for (flag, want) in [
            ("is_read_only", false),
            ("can_multi_conn", true),
            ("can_trim", true),
            ("can_zero", true),
            ("can_fast_zero", true),
            ("can_fua", true),
            ("can_flush", true),
            ("can_df", true),
            ("can_cache", true),
        ] {
            assert_eq!(e[flag], want, "{flag} in {v:#}");
        }
        assert_eq!(e["block_size_minimum"], 1, "{v:#}");
        assert_eq!(e["block_size_preferred"], 4096, "{v:#}");
        assert_eq!(e["block_size_maximum"], 32 * MIB, "{v:#}");
        assert_eq!(v["protocol"], "newstyle-fixed", "{v:#}");
        assert_eq!(v["TLS"], false);
    }
    let v = nbdinfo_json(&h.unix_uri("ro"));
    let e = export0(&v);
    assert_eq!(e["is_read_only"], true, "{v:#}");
    assert_eq!(e["can_multi_conn"], false, "{v:#}");
    assert_eq!(e["can_trim"], false, "{v:#}");
    assert_eq!(e["can_zero"], false, "{v:#}");

    // --list enumerates both exports (NBD_OPT_LIST, then NBD_OPT_INFO on each).
    let list = run(tool("nbdinfo").args(["--list", "--json", &h.unix_uri("")]));
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> = v["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["disk", "ro"], "{v:#}");

    // An unknown export is refused cleanly.
    let o = output(tool("nbdinfo").arg(h.unix_uri("nope")));
    assert!(!o.status.success());
    assert!(h.alive());
}

/// `nbdinfo --map` lines as (offset, length, type) where type is e.g. "hole,zero" or "data".
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    let out = run(tool("nbdinfo").args(["--map", uri]));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f.get(3).copied().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn map_shows_holes_then_data_and_trim_makes_holes() {
    let h = Harness::start(16 * MIB);
    let uri = h.unix_uri("disk");
    assert_eq!(map(&uri), vec![(0, 16 * MIB, "hole,zero".to_string())]);

    qemu_io(&uri, &["write -P 0xab 4M 1M".into()]);
    assert_eq!(
        map(&uri),
        vec![
            (0, 4 * MIB, "hole,zero".to_string()),
            (4 * MIB, MIB, "data".to_string()),
            (5 * MIB, 11 * MIB, "hole,zero".to_string()),
        ]
    );

    // TRIM punches the hole again (qemu-io discard sends NBD_CMD_TRIM).
    qemu_io(&uri, &["discard 4M 1M".into(), "read -P 0 4M 1M".into()]);
    assert_eq!(map(&uri), vec![(0, 16 * MIB, "hole,zero".to_string())]);
    assert!(h.disk_is_hole(0, 16 * MIB));

    // Over TCP as well.
    qemu_io(&h.tcp_uri("disk"), &["write -P 0x11 0 64k".into()]);
    assert_eq!(map(&h.tcp_uri("disk"))[0], (0, 65536, "data".to_string()));
}

#[test]
fn qemu_io_patterns_at_many_offsets_including_the_last_byte() {
    let size = 32 * MIB + 4096; // not a power of two
    let h = Harness::start(size);
    for uri in [h.unix_uri("disk"), h.tcp_uri("disk")] {
        let mut writes = Vec::new();
        let mut reads = Vec::new();
        // Disjoint ranges: aligned, unaligned, crossing 64 KiB, large, and the tail of the
        // export down to its very last byte.
        let cases: Vec<(u64, u64)> = vec![
            (0, 512),
            (512, 4096),
            (8195, 5),
            (65536 - 7, 17),
            (MIB, MIB),
            (7 * MIB + 123, 300_000),
            (16 * MIB, 4 * MIB),
            (size - 8192, 4096),
            (size - 4096, 3584),
            (size - 512, 511),
            (size - 1, 1),
        ];
        for (i, (off, len)) in cases.iter().enumerate() {
            let p = 0x10 + i as u64;
            writes.push(format!("write -P {p:#x} {off} {len}"));
            reads.push(format!("read -P {p:#x} {off} {len}"));
        }
        qemu_io(&uri, &writes);
        let out = qemu_io(&uri, &reads);
        assert_eq!(out.matches("read ").count(), cases.len(), "{out}");
        // Writes with FUA, flush, and a read of data never written.
        qemu_io(
            &uri,
            &[
                "write -f -P 0x77 2M 64k".into(),
                "flush".into(),
                "read -P 0x77 2M 64k".into(),
                format!("read -P 0 {} 4096", 24 * MIB),
            ],
        );
    }
    // Past the end fails (qemu-io checks the size itself; the server agrees, see bad_input.rs).
    let o = output(tool("qemu-io").args([
        "-f",
        "raw",
        "-c",
        &format!("read {size} 512"),
        &h.unix_uri("disk"),
    ]));
    assert!(
        o.stdout.contains("error") || !o.status.success() || o.stderr.contains("rror"),
        "{}",
        o.stdout
    );
}

#[test]
fn qemu_img_convert_into_and_out_of_the_export() {
    let size = 24 * MIB;
    let h = Harness::start(size);
    let src = h.path("src.raw");
    // Source: data, a hole, data, zeroes written explicitly.
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern_bytes(3 * MIB as usize, 1), 0)
            .unwrap();
        f.write_all_at(&pattern_bytes(2 * MIB as usize + 777, 2), 10 * MIB)
            .unwrap();
        f.write_all_at(&vec![0u8; MIB as usize], 20 * MIB).unwrap();
        f.write_all_at(&pattern_bytes(4096, 3), size - 4096)
            .unwrap();
    }
    // Dirty the export first so the zero/hole handling of convert matters.
    qemu_io(&h.unix_uri("disk"), &["write -P 0xee 0 24M".into()]);
    let uri = h.unix_uri("disk");
    run(tool("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri));

    let out = h.path("out.raw");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &h.tcp_uri("disk")])
        .arg(&out));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&out));
    assert_eq!(sha256(&src), sha256(&out));

    // And into qcow2, which reads block status to skip holes.
    let q = h.path("out.qcow2");
    run(tool("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", &uri])
        .arg(&q));
    run(tool("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&q));
}

#[test]
fn nbdcopy_round_trip_with_checksums() {
    let size = 40 * MIB;
    let h = Harness::start(size);
    let src = h.path("src.raw");
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pattern_bytes(5 * MIB as usize, 7), MIB)
            .unwrap();
        f.write_all_at(&pattern_bytes(MIB as usize, 8), 30 * MIB)
            .unwrap();
        f.write_all_at(&pattern_bytes(1000, 9), size - 1000)
            .unwrap();
    }
    let want = sha256(&src);
    // Into the export over the unix socket (multi-conn, several requests in flight), out over TCP.
    run(tool("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(h.unix_uri("disk")));
    let out = h.path("out.raw");
    run(tool("nbdcopy").arg(h.tcp_uri("disk")).arg(&out));
    assert_eq!(sha256(&out), want);
    // nbdcopy skips holes it learns from block status: the hole at 10M stayed a hole.
    assert!(h.disk_is_hole(10 * MIB, 10 * MIB));
    // Also through a pipe (stdout), a different request pattern.
    let o = output(
        tool("sh")
            .arg("-c")
            .arg(format!("nbdcopy '{}' - | sha256sum", h.unix_uri("disk"))),
    );
    assert!(o.status.success(), "{}", o.stderr);
    assert_eq!(o.stdout.split_whitespace().next().unwrap(), want);
}

#[test]
fn fio_nbd_engine_randwrite_with_crc32c_verify() {
    let h = Harness::start(64 * MIB);
    for uri in [h.unix_uri("disk"), h.tcp_uri("disk")] {
        let o = run(tool("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ]));
        let v: serde_json::Value = serde_json::from_str(&o[o.find('{').unwrap()..]).unwrap();
        let job = &v["jobs"][0];
        assert_eq!(job["error"], 0, "{job:#}");
        assert_eq!(job["write"]["io_bytes"], 16 * MIB, "{job:#}");
        assert!(
            job["read"]["io_bytes"].as_u64().unwrap() >= 16 * MIB,
            "{job:#}"
        );
    }
    // Mixed sizes and a read-write job.
    run(tool("fio").args([
        "--name=mixed",
        "--ioengine=nbd",
        &format!("--uri={}", h.unix_uri("disk")),
        "--rw=randrw",
        "--bssplit=4k/50:64k/30:1m/20",
        "--iodepth=16",
        "--size=32M",
        "--offset=32M",
        "--verify=crc32c",
        "--verify_state_save=0",
        "--verify_fatal=1",
    ]));
}

#[test]
fn concurrent_connections_write_disjoint_regions() {
    let h = Harness::start(64 * MIB);
    let n = 8u64;
    let mut children = Vec::new();
    for i in 0..n {
        let uri = if i % 2 == 0 {
            h.unix_uri("disk")
        } else {
            h.tcp_uri("disk")
        };
        let mut c = tool("qemu-io");
        c.args(["-f", "raw"]);
        for k in 0..8u64 {
            let off = i * 8 * MIB + k * MIB;
            c.args(["-c", &format!("aio_write -P {:#x} {off} 1M", 0x40 + i)]);
        }
        c.args(["-c", "aio_flush", &uri]);
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        children.push(ChildGuard(c.spawn().unwrap()));
    }
    // While they run, the server counts the connections.
    let mut peak = 0;
    for mut c in children {
        peak = peak.max(h.server.connections("disk"));
        let out = c.0.wait_with_output_ref();
        assert!(out.0.success(), "qemu-io failed: {}", out.1);
    }
    assert!(peak <= n as u32);
    h.wait_for("all connections closed", || {
        h.server.connections("disk") == 0
    });
    // Verify every region from one more connection, with libnbd and several requests in flight.
    let script = format!(
        r#"
import nbd
h = nbd.NBD()
h.connect_uri("{}")
assert h.can_multi_conn()
for i in range({n}):
    want = bytes([0x40 + i]) * (8 << 20)
    assert h.pread(8 << 20, i * (8 << 20)) == want, i
print("verified")
"#,
        h.unix_uri("disk")
    );
    assert_eq!(run(python().arg(script)).trim(), "verified");
}

trait WaitOut {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String);
}

impl WaitOut for std::process::Child {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, String) {
        use std::io::Read;
        use wait_timeout::ChildExt;
        let mut out = String::new();
        if let Some(mut s) = self.stdout.take() {
            let _ = s.read_to_string(&mut out);
        }
        if let Some(mut s) = self.stderr.take() {
            let _ = s.read_to_string(&mut out);
        }
        let st = self
            .wait_timeout(TIMEOUT)
            .unwrap()
            .expect("client timed out");
        (st, out)
    }
}

#[test]
fn write_zeroes_trim_block_status_and_reads_with_libnbd() {
    let h = Harness::start(16 * MIB);
    let script = r#"
import nbd, sys, errno
uri = sys.argv[1]

def connect(structured=True):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h

def status(h, off, count, flags=0):
    ext = []
    def cb(meta, offset, entries, err):
        assert meta == nbd.CONTEXT_BASE_ALLOCATION
        ext.extend(zip(entries[0::2], entries[1::2]))
    h.block_status(count, off, cb, flags=flags)
    return ext

h = connect()
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
M = 1 << 20
data = bytes(range(256)) * 4096
h.pwrite(data, 0)
h.pwrite(data, 2 * M, flags=nbd.CMD_FLAG_FUA)
assert status(h, 0, M) == [(M, 0)], status(h, 0, M)

# WRITE_ZEROES with NO_HOLE reads zero (allocation: see write_zeroes_no_hole_keeps_allocation).
h.zero(M, 0, flags=nbd.CMD_FLAG_NO_HOLE)
assert h.pread(M, 0) == bytes(M)

# WRITE_ZEROES without NO_HOLE: reads zero, becomes a hole.
h.zero(M, 2 * M)
assert h.pread(M, 2 * M) == bytes(M)
st = status(h, 2 * M, M)
assert st == [(M, nbd.STATE_HOLE | nbd.STATE_ZERO)], st

# FAST_ZERO: fine when a hole is allowed, ENOTSUP with NO_HOLE.
h.pwrite(data, 4 * M)
h.zero(M, 4 * M, flags=nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(M, 4 * M) == bytes(M)
try:
    h.zero(M, 4 * M, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    raise SystemExit("fast zero with NO_HOLE should fail")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e

# TRIM makes a hole.
h.pwrite(data, 6 * M)
h.trim(M, 6 * M)
assert status(h, 6 * M, M) == [(M, nbd.STATE_HOLE | nbd.STATE_ZERO)]

# Block status: REQ_ONE returns one extent; a range mixing data and holes.
h.pwrite(data[:65536], 8 * M)
st = status(h, 7 * M, 2 * M)
assert st[0] == (M, 3) and st[1] == (65536, 0) and st[2][1] == 3, st
assert status(h, 7 * M, 2 * M, nbd.CMD_FLAG_REQ_ONE) == [(M, 3)]

# Structured reads of sparse ranges (hole chunks), DF reads, unaligned reads.
buf = h.pread(2 * M, 7 * M)
assert buf == bytes(M) + data[:65536] + bytes(M - 65536)
def chunks(off, count, flags):
    got = []
    out = bytearray(count)
    def cb(sub, offset, status, err):
        got.append((offset, len(sub), status))
        if status == nbd.READ_DATA:
            out[offset - off:offset - off + len(sub)] = sub
        return 0
    h.pread_structured(count, off, cb, flags=flags)
    return got, bytes(out)
got, same = chunks(7 * M, 2 * M, 0)
assert same == buf and any(c[2] == nbd.READ_HOLE for c in got), got
got, same = chunks(7 * M, 2 * M, nbd.CMD_FLAG_DF)
assert same == buf and len(got) == 1 and got[0][2] == nbd.READ_DATA, got
assert h.pread(1000, 8 * M + 3) == data[3:1003]

# CACHE and FLUSH.
h.cache(M, 0)
h.flush()

# Many requests in flight on one connection, completed out of order.
cookies = [h.aio_pwrite(bytes([i]) * 65536, 10 * M + i * 65536) for i in range(64)]
assert h.aio_in_flight() > 1
while h.aio_in_flight() > 0:
    h.poll(-1)
assert all(h.aio_command_completed(c) for c in cookies)
for i in range(64):
    assert h.pread(65536, 10 * M + i * 65536) == bytes([i]) * 65536
h.shutdown()

# Simple replies (no structured replies negotiated) work too.
h = connect(structured=False)
assert not h.get_structured_replies_negotiated()
assert h.pread(65536, 8 * M) == data[:65536]
assert h.pread(4096, 6 * M) == bytes(4096)
h.pwrite(b"x" * 4096, 15 * M)
assert h.pread(4096, 15 * M) == b"x" * 4096
h.shutdown()
print("ok")
"#;
    let out = run(python().arg(script).arg(h.unix_uri("disk")));
    assert_eq!(out.trim(), "ok");
    // The file itself agrees.
    assert!(h.disk_is_hole(2 * MIB, MIB));
    assert!(h.disk_is_hole(6 * MIB, MIB));
    let mut b = vec![0u8; 4096];
    h.disk.read_at(&mut b, 15 * MIB).unwrap();
    assert_eq!(b, vec![b'x'; 4096]);
}

#[test]
fn nbdsh_reads_read_only_export_and_writes_fail() {
    let h = Harness::start(4 * MIB);
    let out = run(tool("nbdsh").args([
        "-u",
        &h.unix_uri("ro"),
        "-c",
        r#"
import errno
assert h.is_read_only()
assert h.pread(65536, 0) == b"\x42" * 65536
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    print("write", e.errnum == errno.EPERM)
print("done")
"#,
    ]));
    // libnbd refuses the write itself because READ_ONLY is set; either way no data changed.
    assert!(out.contains("done"), "{out}");
    let mut b = vec![0u8; 512];
    h.ro.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![0x42; 512]);
}

/// Runs python code with `h` connected (libnbd) to `uri`.
fn py(uri: &str, code: &str) {
    let script = format!(
        "import nbd, sys\nh = nbd.NBD()\nh.connect_uri(sys.argv[1])\n{code}\nh.shutdown()\nprint('ok')\n"
    );
    assert_eq!(run(python().arg(script).arg(uri)).trim(), "ok");
}

#[test]
fn write_zeroes_no_hole_keeps_allocation() {
    let h = Harness::start(16 * MIB);
    let uri = h.unix_uri("disk");
    let m4 = 4 * MIB;
    py(&uri, "h.pwrite(b'\\x01' * (4 << 20), 0)\nh.flush()");
    let written = h.disk.allocated_bytes().unwrap();
    assert!(written >= m4, "{written}");
    // NO_HOLE: reads back zero, and the blocks stay allocated.
    py(
        &uri,
        "h.zero(4 << 20, 0, flags=nbd.CMD_FLAG_NO_HOLE)\nassert h.pread(4 << 20, 0) == bytes(4 << 20)",
    );
    let kept = h.disk.allocated_bytes().unwrap();
    assert!(kept >= m4, "NO_HOLE deallocated: {kept} < {m4}");
    // Without NO_HOLE the server punches a hole.
    py(
        &uri,
        "h.zero(4 << 20, 0)\nassert h.pread(4 << 20, 0) == bytes(4 << 20)",
    );
    let punched = h.disk.allocated_bytes().unwrap();
    assert!(punched + m4 <= kept, "not deallocated: {punched} vs {kept}");
    assert!(h.disk_is_hole(0, m4));
}

/// A file whose writes complete asynchronously, on a thread of their own (like a replicated
/// volume's, answered when the peers acknowledged): counts how writes reached it.
struct AsyncFile {
    file: std::sync::Arc<tandem_blockdev::FileDevice>,
    started: std::sync::atomic::AtomicU64,
    blocking: std::sync::atomic::AtomicU64,
    /// The number of writes in each `start_writes` call.
    batches: std::sync::Mutex<Vec<usize>>,
}

impl AsyncFile {
    /// A 16 MiB file exported as `name`, behind an `Arc<dyn BlockDevice>` as the agent
    /// exports a replicated volume.
    fn export(h: &Harness, name: &str) -> std::sync::Arc<AsyncFile> {
        let dev = std::sync::Arc::new(AsyncFile {
            file: std::sync::Arc::new(
                tandem_blockdev::FileDevice::create(&h.path(&format!("{name}.img")), 16 * MIB)
                    .unwrap(),
            ),
            started: Default::default(),
            blocking: Default::default(),
            batches: Default::default(),
        });
        let device: std::sync::Arc<dyn BlockDevice> = dev.clone();
        h.registry.add(tandem_nbd::Export {
            name: name.into(),
            description: "asynchronous writes".into(),
            device,
            read_only: false,
            multi_conn: true,
        });
        dev
    }
}

impl BlockDevice for AsyncFile {
    fn size(&self) -> u64 {
        self.file.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.blocking
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.file.write_at(buf, offset)
    }
    fn flush(&self) -> tandem_blockdev::Result<()> {
        self.file.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> tandem_blockdev::Result<()> {
        self.file.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, d: bool) -> tandem_blockdev::Result<()> {
        self.file.write_zeroes(offset, len, d)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> tandem_blockdev::Result<Vec<tandem_blockdev::Extent>> {
        self.file.block_status(offset, len)
    }
    fn async_writes(&self) -> bool {
        true
    }
    fn start_write(
        &self,
        data: tandem_blockdev::Bytes,
        offset: u64,
        fua: bool,
        done: tandem_blockdev::WriteDone,
    ) {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.file.clone();
        std::thread::spawn(move || {
            let r = file
                .write_at(&data, offset)
                .and_then(|()| if fua { file.flush() } else { Ok(()) });
            done(r)
        });
    }
    fn start_writes(&self, writes: Vec<tandem_blockdev::StartWrite>) {
        self.batches.lock().unwrap().push(writes.len());
        for w in writes {
            self.start_write(w.data, w.offset, w.fua, w.done);
        }
    }
}

#[test]
fn writes_to_an_async_device_are_started_not_run_on_a_worker() {
    let h = Harness::start(16 * MIB);
    let dev = AsyncFile::export(&h, "async");
    let uri = h.unix_uri("async");
    let cmds: Vec<String> = (0..8u64)
        .map(|i| format!("write -P {} {} 4k", i + 1, i * 65536))
        .chain(std::iter::once("write -f -P 9 1M 64k".to_string()))
        .chain((0..8u64).map(|i| format!("read -P {} {} 4k", i + 1, i * 65536)))
        .chain(std::iter::once("read -P 9 1M 64k".to_string()))
        .collect();
    let out = qemu_io(&uri, &cmds);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        dev.started.load(Relaxed),
        9,
        "writes started asynchronously"
    );
    assert_eq!(
        dev.blocking.load(Relaxed),
        0,
        "no write ran as a blocking write_at"
    );
}

/// Writes that arrive together (here: eight in one socket write) are handed to the device in
/// one `start_writes` call, so a replicated volume sends their frames to a peer together.
#[test]
fn writes_found_together_are_started_together() {
    use tandem_nbd::proto::CMD_WRITE;
    use tandem_nbd::transmission::{RequestHeader, encode_request};
    let h = Harness::start(16 * MIB);
    let dev = AsyncFile::export(&h, "async");
    let mut r = common::raw::Raw::go(&h, "async", false);
    let mut wire = Vec::new();
    for i in 0..8u64 {
        wire.extend_from_slice(&encode_request(&RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            handle: i + 1,
            offset: i * 65536,
            length: 4096,
        }));
        wire.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    r.send(&wire);
    let mut handles: Vec<u64> = (0..8)
        .map(|_| {
            let (err, handle) = r.simple();
            assert_eq!(err, 0, "write {handle} failed");
            handle
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (1..=8).collect::<Vec<u64>>());
    for i in 0..8u64 {
        assert_eq!(
            r.simple_read(100 + i, i * 65536, 4096),
            vec![i as u8 + 1; 4096]
        );
    }
    let batches = dev.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().sum::<usize>(), 8, "{batches:?}");
    assert!(
        batches.iter().any(|n| *n > 1),
        "writes read together were started one by one: {batches:?}"
    );
}

/// A device whose writes complete only when the test says so: each write lands in memory at
/// once and its completion is held (like a replicated volume's, waiting for its peers).
struct HeldWrites {
    mem: tandem_blockdev::MemDevice,
    held: std::sync::Mutex<Vec<tandem_blockdev::WriteDone>>,
}

impl BlockDevice for HeldWrites {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.mem.write_at(buf, offset)
    }
    fn flush(&self) -> tandem_blockdev::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> tandem_blockdev::Result<()> {
        self.mem.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, d: bool) -> tandem_blockdev::Result<()> {
        self.mem.write_zeroes(offset, len, d)
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> tandem_blockdev::Result<Vec<tandem_blockdev::Extent>> {
        self.mem.block_status(offset, len)
    }
    fn async_writes(&self) -> bool {
        true
    }
    fn start_write(
        &self,
        data: tandem_blockdev::Bytes,
        offset: u64,
        _fua: bool,
        done: tandem_blockdev::WriteDone,
    ) {
        self.mem.write_at(&data, offset).unwrap();
        self.held.lock().unwrap().push(done);
    }
}

/// Replies to writes a device completes inside a completion group are held until the group
/// ends and then all sent (a replicated volume completes the writes one batch of
/// acknowledgements covers in one group: one `sendmsg` for their replies); a completion
/// outside any group is answered at once.
#[test]
fn replies_to_writes_completed_in_a_group_are_sent_when_it_ends() {
    use std::io::Read;
    use tandem_blockdev::completions;
    use tandem_nbd::proto::CMD_WRITE;
    use tandem_nbd::transmission::{RequestHeader, encode_request};
    let h = Harness::start(16 * MIB);
    let dev = std::sync::Arc::new(HeldWrites {
        mem: tandem_blockdev::MemDevice::new(16 * MIB),
        held: Default::default(),
    });
    let device: std::sync::Arc<dyn BlockDevice> = dev.clone();
    h.registry.add(tandem_nbd::Export {
        name: "held".into(),
        description: "completions held by the test".into(),
        device,
        read_only: false,
        multi_conn: true,
    });
    let mut r = common::raw::Raw::go(&h, "held", false);
    let mut wire = Vec::new();
    for i in 0..9u64 {
        wire.extend_from_slice(&encode_request(&RequestHeader {
            flags: 0,
            kind: CMD_WRITE,
            handle: i + 1,
            offset: i * 4096,
            length: 4096,
        }));
        wire.extend(std::iter::repeat_n(i as u8 + 1, 4096));
    }
    r.send(&wire);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while dev.held.lock().unwrap().len() < 9 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never started"
        );
        std::thread::yield_now();
    }
    let mut dones = std::mem::take(&mut *dev.held.lock().unwrap());
    let last = dones.pop().unwrap();
    let mut peek = [0u8; 16];
    completions::group(|| {
        for done in dones {
            done(Ok(()));
        }
        r.s.set_nonblocking(true).unwrap();
        let early = r.s.read(&mut peek);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a reply left before the group ended: {early:?}"
        );
        r.s.set_nonblocking(false).unwrap();
    });
    let mut handles: Vec<u64> = (0..8)
        .map(|_| r.simple())
        .map(|(e, h)| {
            assert_eq!(e, 0, "write {h} failed");
            h
        })
        .collect();
    handles.sort_unstable();
    assert_eq!(handles, (1..=8).collect::<Vec<u64>>());
    // Outside a group: answered by the completion itself.
    last(Ok(()));
    assert_eq!(r.simple(), (0, 9));
    r.s.set_nonblocking(true).unwrap();
    let extra = r.s.read(&mut peek);
    assert!(
        matches!(&extra, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a reply came twice: {extra:?}"
    );
}

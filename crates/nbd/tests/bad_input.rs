//! Bad input from raw sockets. Every case proves both halves: the misbehaving client gets the
//! protocol's error (or its connection closed), and a concurrent well-behaved client (a libnbd
//! process connected before the bad input) keeps being served, as does a fresh qemu-io.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use common::raw::*;
use common::*;
use tandem_blockdev::BlockDevice;
use tandem_nbd::proto::*;
use tandem_nbd::transmission::{RequestHeader, encode_request};

/// Runs `bad` between two round trips of a witness client connected before it, waits for the
/// server to drop the bad connection(s), then checks a fresh client and the accept loops.
fn with_witness(h: &Harness, bad: impl FnOnce(&Harness)) {
    let mut w = Witness::connect(&h.unix_uri("disk"), 48 * MIB);
    w.round_trip();
    let baseline = h.server.total_connections();
    assert_eq!(h.server.connections("disk"), 1);
    bad(h);
    h.wait_for("the bad connection to be dropped", || {
        h.server.total_connections() == baseline
    });
    // The witness's connection survived and still works.
    assert_eq!(h.server.connections("disk"), 1);
    w.round_trip();
    // A new client over TCP works as well.
    qemu_io(
        &h.tcp_uri("disk"),
        &[
            "write -P 0x3c 40M 64k".into(),
            "read -P 0x3c 40M 64k".into(),
        ],
    );
    assert!(h.alive(), "accept loops still running");
    w.finish();
    h.wait_for("witness gone", || h.server.connections("disk") == 0);
}

#[test]
fn bad_option_magic_closes_only_that_connection() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        let mut bad = b"IHAVEOPX".to_vec();
        bad.extend_from_slice(&OPT_LIST.to_be_bytes());
        bad.extend_from_slice(&0u32.to_be_bytes());
        r.send(&bad);
        r.assert_closed();
    });
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "disk", false);
        let mut hdr = encode_request(&RequestHeader {
            flags: 0,
            kind: CMD_READ,
            handle: 1,
            offset: 0,
            length: 512,
        });
        hdr[..4].copy_from_slice(&0x1256_0953u32.to_be_bytes());
        r.send(&hdr);
        r.assert_closed();
    });
}

#[test]
fn clients_without_fixed_newstyle_or_with_unknown_flags_are_refused() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        for flags in [0u32, FLAG_C_NO_ZEROES, 0x8000_0001] {
            let mut r = Raw::connect(h);
            r.send(&flags.to_be_bytes());
            r.assert_closed();
        }
    });
}

#[test]
fn truncated_handshakes_are_cleaned_up() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        // Gone right after connecting, after half the client flags, mid option header, and mid
        // option data.
        drop(UnixStream::connect(&h.sock).unwrap());
        let mut r = Raw::connect(h);
        r.send(&[0, 0]);
        drop(r);
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        r.send(b"IHAVE");
        drop(r);
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&100u32.to_be_bytes());
        opt.extend_from_slice(&[0; 10]);
        r.send(&opt);
        drop(r);
        // Server side half-close mid-handshake: we stop writing but keep reading.
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        r.s.shutdown(std::net::Shutdown::Write).unwrap();
        r.assert_closed();
    });
}

#[test]
fn wrong_option_lengths_get_errors_and_the_connection_goes_on() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        r.option(OPT_LIST, &[1, 2, 3, 4]);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        r.option(OPT_STRUCTURED_REPLY, &[0]);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        // Name length pointing past the option data.
        let mut d = go_data("disk");
        d[..4].copy_from_slice(&1000u32.to_be_bytes());
        r.option(OPT_GO, &d);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        // Trailing garbage after the info request list.
        let mut d = go_data("disk");
        d.push(7);
        r.option(OPT_INFO, &d);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        // Too short to hold anything.
        r.option(OPT_GO, &[0, 0]);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        // Meta context before structured replies, then with a truncated query.
        r.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        r.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.opt_reply().1, REP_ACK);
        let mut d = 4u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&100u32.to_be_bytes());
        d.extend_from_slice(b"base:");
        r.option(OPT_SET_META_CONTEXT, &d);
        assert_eq!(r.opt_reply().1, REP_ERR_INVALID);
        // Unknown options and unknown exports.
        r.option(4242, &[1, 2, 3]);
        assert_eq!(
            r.opt_reply(),
            (4242, REP_ERR_UNSUP, b"option not supported".to_vec())
        );
        r.option(OPT_STARTTLS, &[]);
        assert_eq!(r.opt_reply().1, REP_ERR_UNSUP);
        r.option(OPT_INFO, &go_data("nope"));
        assert_eq!(r.opt_reply().1, REP_ERR_UNKNOWN);
        r.option(OPT_GO, &go_data(""));
        assert_eq!(r.opt_reply().1, REP_ERR_UNKNOWN);
        // After all that, GO works and so does I/O (structured reply to a read).
        r.option(OPT_GO, &go_data("disk"));
        while r.opt_reply().1 != REP_ACK {}
        r.request(CMD_READ, 0, 9, 0, 4096);
        let (flags, kind, handle, p) = r.chunk();
        assert_eq!(
            (flags, kind, handle),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 9)
        );
        assert_eq!(p.len(), 8 + 4096);
        r.request(CMD_DISC, 0, 10, 0, 0);
        r.assert_closed();

        // An absurd option length ends the connection instead of buffering it.
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(1u32 << 30).to_be_bytes());
        r.send(&opt);
        r.assert_closed();

        // NBD_OPT_EXPORT_NAME for an unknown export: the server must hang up.
        let mut r = Raw::connect(h);
        r.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
        r.option(OPT_EXPORT_NAME, b"nope");
        r.assert_closed();
    });
}

#[test]
fn requests_past_the_end_get_errors() {
    let size = 64 * MIB;
    let h = Harness::start(size);
    with_witness(&h, |h| {
        // Simple replies.
        let mut r = Raw::go(h, "disk", false);
        r.request(CMD_READ, 0, 1, size - 512, 1024);
        assert_eq!(r.simple(), (EINVAL, 1));
        r.request(CMD_READ, 0, 2, u64::MAX - 100, 512);
        assert_eq!(r.simple(), (EINVAL, 2));
        r.request(CMD_TRIM, 0, 3, size, 1);
        assert_eq!(r.simple(), (EINVAL, 3));
        r.request(CMD_WRITE, 0, 4, size - 100, 4096);
        r.send(&[0xaa; 4096]);
        assert_eq!(r.simple(), (ENOSPC, 4));
        r.request(CMD_WRITE_ZEROES, 0, 5, size, 512);
        assert_eq!(r.simple(), (ENOSPC, 5));
        r.request(CMD_BLOCK_STATUS, 0, 6, 0, 512);
        assert_eq!(r.simple(), (EINVAL, 6), "no metadata context negotiated");
        // The last byte is fine, and the connection is in sync.
        h.disk.write_at(&[0x99], size - 1).unwrap();
        assert_eq!(r.simple_read(7, size - 1, 1), vec![0x99]);
        // Structured replies: error chunks.
        let mut r = Raw::go(h, "disk", true);
        r.request(CMD_READ, 0, 11, size, 512);
        r.error_chunk(11, EINVAL);
        r.request(CMD_WRITE, 0, 12, size, 512);
        r.send(&[0; 512]);
        r.error_chunk(12, ENOSPC);
        r.request(CMD_READ, 0, 13, size - 1, 1);
        let (flags, kind, handle, p) = r.chunk();
        assert_eq!(
            (flags, kind, handle),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 13)
        );
        assert_eq!(p, [&(size - 1).to_be_bytes()[..], &[0x99]].concat());
    });
}

#[test]
fn lengths_over_the_maximum() {
    let h = Harness::start(128 * MIB);
    with_witness(&h, |h| {
        let over = MAX_PAYLOAD + 1;
        let mut r = Raw::go(h, "disk", false);
        r.request(CMD_READ, 0, 1, 0, over);
        assert_eq!(r.simple(), (EINVAL, 1));
        assert_eq!(r.simple_read(2, 0, 512), vec![0; 512]);
        let mut r2 = Raw::go(h, "disk", true);
        r2.request(CMD_READ, 0, 3, 0, over);
        r2.error_chunk(3, EOVERFLOW);
        // Requests without payload may be larger than the maximum.
        r2.request(CMD_TRIM, 0, 4, 0, 64 << 20);
        let (flags, kind, handle, _) = r2.chunk();
        assert_eq!((flags, kind, handle), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 4));
        // A write whose payload is over the maximum ends the connection.
        r.request(CMD_WRITE, 0, 5, 0, 64 << 20);
        // The server may already have closed after the header: a failed
        // write of the start of the payload (EPIPE/ECONNRESET) is expected.
        let _ = r.s.write_all(&[0; 4096]);
        r.assert_closed();
    });
}

#[test]
fn unknown_commands_and_bad_flags_get_einval_and_the_connection_stays() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "disk", false);
        r.request(42, 0, 1, 0, 0);
        assert_eq!(r.simple(), (EINVAL, 1));
        r.request(CMD_READ, CMD_FLAG_NO_HOLE, 2, 0, 512);
        assert_eq!(r.simple(), (EINVAL, 2));
        r.request(CMD_READ, CMD_FLAG_DF, 3, 0, 512);
        assert_eq!(r.simple(), (EINVAL, 3), "DF without structured replies");
        r.request(CMD_FLUSH, 0, 4, 1, 0);
        assert_eq!(r.simple(), (EINVAL, 4));
        r.request(CMD_WRITE, CMD_FLAG_REQ_ONE, 5, 0, 512);
        r.send(&[1; 512]);
        assert_eq!(r.simple(), (EINVAL, 5));
        assert_eq!(
            r.simple_read(6, 0, 512),
            vec![0; 512],
            "rejected write not applied"
        );
        r.request(CMD_FLUSH, 0, 7, 0, 0);
        assert_eq!(r.simple(), (0, 7));
    });
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "ro", false);
        r.request(CMD_WRITE, 0, 1, 0, 4096);
        r.send(&[0xee; 4096]);
        assert_eq!(r.simple(), (EPERM, 1));
        r.request(CMD_TRIM, 0, 2, 0, 4096);
        assert_eq!(r.simple(), (EPERM, 2));
        r.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
        assert_eq!(r.simple(), (EPERM, 3));
        assert_eq!(r.simple_read(4, 0, 4096), vec![0x42; 4096]);
        let mut b = vec![0u8; 4096];
        h.ro.read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![0x42; 4096]);
    });
}

#[test]
fn client_disconnecting_mid_request() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        // Header and part of a write payload, then gone.
        let mut r = Raw::go(h, "disk", false);
        r.request(CMD_WRITE, 0, 1, 8 * MIB, 1 << 20);
        r.send(&[0x5a; 1000]);
        drop(r);
        // Half a request header, then gone.
        let mut r = Raw::go(h, "disk", true);
        r.send(&REQUEST_MAGIC.to_be_bytes());
        drop(r);
        // Many reads in flight, then gone without reading replies.
        let mut r = Raw::go(h, "disk", true);
        for i in 0..64 {
            r.request(CMD_READ, 0, i, 0, 1 << 20);
        }
        drop(r);
    });
    // The partial write was never applied.
    assert!(h.disk_is_hole(8 * MIB, MIB));
}

#[test]
fn disc_answers_outstanding_requests_then_closes() {
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "disk", false);
        for i in 0..32u64 {
            r.request(CMD_WRITE, CMD_FLAG_FUA, i, i * 65536, 65536);
            r.send(&vec![i as u8; 65536]);
        }
        r.request(CMD_DISC, 0, 99, 0, 0);
        let mut seen: Vec<u64> = (0..32)
            .map(|_| r.simple())
            .map(|(e, hd)| {
                assert_eq!(e, 0);
                hd
            })
            .collect();
        r.assert_closed();
        seen.sort();
        assert_eq!(seen, (0..32).collect::<Vec<_>>());
    });
    let mut b = vec![0u8; 65536];
    h.disk.read_at(&mut b, 31 * 65536).unwrap();
    assert_eq!(b, vec![31u8; 65536]);
}

#[test]
fn pipelined_small_writes_then_disc_are_all_applied_and_answered() {
    // Small non-FUA writes sent back to back reach the server together, so they are run as
    // batches; a DISC right behind them must still see every one applied and answered, and
    // reads and a flush in between are answered too.
    let h = Harness::start(64 * MIB);
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "disk", false);
        let mut burst = Vec::new();
        for i in 0..100u64 {
            burst.extend_from_slice(&encode_request(&RequestHeader {
                flags: 0,
                kind: CMD_WRITE,
                handle: i,
                offset: 20 * MIB + i * 8192,
                length: 4096,
            }));
            burst.extend_from_slice(&[(i % 251) as u8 + 1; 4096]);
            if i == 50 {
                burst.extend_from_slice(&encode_request(&RequestHeader {
                    flags: 0,
                    kind: CMD_FLUSH,
                    handle: 1000,
                    offset: 0,
                    length: 0,
                }));
            }
        }
        burst.extend_from_slice(&encode_request(&RequestHeader {
            flags: 0,
            kind: CMD_DISC,
            handle: 2000,
            offset: 0,
            length: 0,
        }));
        r.send(&burst);
        let mut seen: Vec<u64> = (0..101)
            .map(|_| {
                let (e, hd) = r.simple();
                assert_eq!(e, 0, "handle {hd}");
                hd
            })
            .collect();
        r.assert_closed();
        seen.sort();
        let mut want: Vec<u64> = (0..100).collect();
        want.push(1000);
        assert_eq!(seen, want);
    });
    for i in 0..100u64 {
        let mut b = vec![0u8; 8192];
        h.disk.read_at(&mut b, 20 * MIB + i * 8192).unwrap();
        assert!(
            b[..4096].iter().all(|x| *x == (i % 251) as u8 + 1),
            "write {i}"
        );
        assert!(b[4096..].iter().all(|x| *x == 0), "after write {i}");
    }
}

#[test]
fn replies_to_a_client_that_reads_them_late_arrive_whole_and_in_one_piece_each() {
    // Large reads run on the I/O workers, which send their replies straight on the socket while
    // it has room; a client that does not read for a while fills it mid-reply, and the rest must
    // follow before any other reply.
    let h = Harness::start(64 * MIB);
    let data = pattern_bytes(32 << 20, 7);
    h.disk.write_at(&data, 0).unwrap();
    with_witness(&h, |h| {
        let mut r = Raw::go(h, "disk", false);
        const LEN: u32 = 128 << 10;
        let n = 96u64;
        for i in 0..n {
            r.request(CMD_READ, 0, i, (i * 331 * 1024) % (31 << 20), LEN);
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut seen = Vec::new();
        for _ in 0..n {
            let (e, hd) = r.simple();
            assert_eq!(e, 0);
            let got = r.read_n(LEN as usize);
            let off = ((hd * 331 * 1024) % (31 << 20)) as usize;
            assert!(got == data[off..off + LEN as usize], "reply {hd}");
            seen.push(hd);
        }
        seen.sort();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
        r.request(CMD_DISC, 0, 999, 0, 0);
        r.assert_closed();
    });
}

#[test]
fn connection_counting_disconnect_export_and_shutdown() {
    let h = Harness::start(64 * MIB);
    let mut a = Raw::go(&h, "disk", false);
    let mut b = Raw::go(&h, "disk", true);
    let mut c = Raw::go(&h, "ro", false);
    h.wait_for("three connections", || h.server.total_connections() == 3);
    assert_eq!(h.server.connections("disk"), 2);
    assert_eq!(h.server.connections("ro"), 1);
    assert_eq!(h.server.connections("nope"), 0);
    h.server.disconnect_export("disk");
    a.assert_closed();
    b.assert_closed();
    h.wait_for("disk connections gone", || {
        h.server.connections("disk") == 0
    });
    assert_eq!(c.simple_read(1, 0, 512), vec![0x42; 512]);
    h.server.shutdown();
    c.assert_closed();
    h.wait_for("accept loops stop", || !h.alive());
    h.wait_for("all connections gone", || h.server.total_connections() == 0);
}

#!/usr/bin/python3
"""Writes numbered 4 KiB blocks to an NBD export, many in flight, and records which were
acknowledged, for the failover test (crates/cli/tests/e2e_failover.rs).

Usage: acked_writes.py URI BLOCKS MAX_WRITES

Write number `seq` goes to block `seq % BLOCKS`; at most 16 writes are in flight and they
never share a block (16 < BLOCKS). Every block written carries its sequence number repeated
over the whole 4 KiB (see `block()`), so a reader can tell which write it holds and whether it
is torn. Prints, flushed line by line:
  I seq      before the write is submitted
  A seq      after the server acknowledged it (NBD reply without error)
  E message  when a write fails or the connection dies; then it exits (status 0)
  D          after MAX_WRITES acknowledged writes
Runs under Debian's /usr/bin/python3 (the libnbd binding, package python3-libnbd).
"""

import sys

import nbd

BLOCK = 4096
IN_FLIGHT = 16


def block(seq):
    unit = b"tandem-seq=%016d;" % seq  # 28 bytes
    data = unit * (BLOCK // len(unit) + 1)
    return data[:BLOCK]


def main():
    uri, blocks, max_writes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert blocks > IN_FLIGHT
    h = nbd.NBD()
    h.connect_uri(uri)
    out = sys.stdout
    cookies = {}
    seq = 0
    acked = 0
    try:
        while acked < max_writes:
            while len(cookies) < IN_FLIGHT and seq < max_writes:
                buf = nbd.Buffer.from_bytearray(bytearray(block(seq)))
                out.write("I %d\n" % seq)
                out.flush()
                cookie = h.aio_pwrite(buf, (seq % blocks) * BLOCK)
                cookies[cookie] = (seq, buf)
                seq += 1
            h.poll(-1)
            for cookie in sorted(cookies):
                # True once completed; raises nbd.Error if the write failed.
                if h.aio_command_completed(cookie):
                    done, _ = cookies.pop(cookie)
                    out.write("A %d\n" % done)
                    out.flush()
                    acked += 1
        out.write("D\n")
        out.flush()
    except nbd.Error as e:
        out.write("E %s\n" % str(e).replace("\n", " "))
        out.flush()


if __name__ == "__main__":
    main()

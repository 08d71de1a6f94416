//! A raw NBD client over a unix socket, for tests that need exact control over the bytes
//! on the wire (bad input, several requests in one write).

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use tandem_nbd::proto::*;
use tandem_nbd::transmission::{RequestHeader, encode_request};

use super::{Harness, TIMEOUT};

pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    /// Connects and reads the server greeting.
    pub fn connect(h: &Harness) -> Raw {
        let s = UnixStream::connect(&h.sock).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut r = Raw { s };
        let g = r.read_n(18);
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(
            &g[16..],
            &(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()
        );
        r
    }

    /// Connects, negotiates (optionally structured replies and base:allocation) and GOes.
    pub fn go(h: &Harness, export: &str, structured: bool) -> Raw {
        let mut r = Raw::connect(h);
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            r.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r.opt_reply().1, REP_ACK);
        }
        r.option(OPT_GO, &go_data(export));
        loop {
            let (_, t, _) = r.opt_reply();
            if t == REP_ACK {
                break;
            }
            assert_eq!(t, REP_INFO);
        }
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.send(&v);
    }

    pub fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (opt, kind, self.read_n(len as usize))
    }

    pub fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        self.send(&encode_request(&RequestHeader {
            flags,
            kind,
            handle,
            offset,
            length,
        }));
    }

    /// A simple reply: (error, handle).
    pub fn simple(&mut self) -> (u32, u64) {
        let b = self.read_n(16);
        assert_eq!(&b[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes(b[4..8].try_into().unwrap()),
            u64::from_be_bytes(b[8..16].try_into().unwrap()),
        )
    }

    /// A structured reply chunk: (flags, type, handle, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let b = self.read_n(20);
        assert_eq!(&b[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([b[4], b[5]]);
        let kind = u16::from_be_bytes([b[6], b[7]]);
        let handle = u64::from_be_bytes(b[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
        (flags, kind, handle, self.read_n(len as usize))
    }

    /// Expects a final error chunk for `handle` with `errno`.
    pub fn error_chunk(&mut self, handle: u64, errno: u32) {
        let (flags, kind, hd, p) = self.chunk();
        assert_eq!(
            (flags, kind, hd),
            (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle)
        );
        assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), errno);
        let msg_len = u16::from_be_bytes([p[4], p[5]]) as usize;
        assert_eq!(p.len(), 6 + msg_len);
    }

    /// The server closed the connection (after sending whatever it still had queued).
    pub fn assert_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("connection was not closed: {e}"),
            }
        }
    }

    /// A good read of `len` bytes at `offset` on a simple-reply connection.
    pub fn simple_read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(CMD_READ, 0, handle, offset, len);
        assert_eq!(self.simple(), (0, handle));
        self.read_n(len as usize)
    }
}

pub fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

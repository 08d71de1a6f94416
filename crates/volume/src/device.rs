//! The volume as a blocking [`BlockDevice`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;

use bytes::Bytes;
use tandem_blockdev::{BlockDevice, BlockError, ErrorKind, Extent, Result, StartWrite, WriteDone};
use tandem_replication::{Reply, RequestError};

use crate::driver::{Completion, ConsumerOp, Inbox, Input};

/// Largest single write submitted for `write_zeroes` and `trim`.
const ZERO_CHUNK: u64 = tandem_repl_proto::zeroes::MAX_ZEROES as u64;

/// A [`BlockDevice`] over a [`crate::VolumeDriver`]: each call submits a consumer request to
/// the engine loop and blocks the calling thread until the engine completes it.
///
/// * Errors: `NotPrimary`, `NoQuorum`, `NotUpToDate` and I/O errors map to
///   [`ErrorKind::Io`] (EIO for NBD) with the engine's reason as the message;
///   `OutOfRange` to [`ErrorKind::OutOfRange`], `NotSupported` to [`ErrorKind::Unsupported`].
/// * `write_zeroes` and `trim` are replicated writes of zeros in 1 MiB pieces. With
///   `may_deallocate` (always for `trim`) the pieces are zero-writes
///   (`tandem_repl_proto::zeroes`): every replica punches a hole (protocol version 8 sends
///   no data for them); without it every replica writes the zeros and keeps them allocated.
///   Either way the range reads as zeros on every replica afterwards.
/// * `block_status` reports everything as allocated data (safe: never claims zeroes).
#[derive(Debug, Clone)]
pub struct ReplicatedDevice {
    /// Shared: every write's completion carries it (for its error message).
    name: Arc<str>,
    /// The engine's usable size, updated by the driver's loop (online resize).
    size: Arc<AtomicU64>,
    tx: Arc<Inbox>,
}

impl ReplicatedDevice {
    pub(crate) fn new(name: String, size: Arc<AtomicU64>, tx: Arc<Inbox>) -> Self {
        ReplicatedDevice {
            name: name.into(),
            size,
            tx,
        }
    }

    fn submit(&self, op: ConsumerOp, what: &'static str, offset: u64, len: u64) -> Result<Reply> {
        let (rtx, rrx) = sync_channel(1);
        let name = &self.name;
        self.tx
            .send(Input::Consumer(op, Completion::Channel(rtx)))
            .map_err(|_| stopped(name, what, offset, len))?;
        let r = rrx.recv().map_err(|_| stopped(name, what, offset, len))?;
        r.map_err(|e| request_error(name, e, what, offset, len))
    }

    /// Zeros `[offset, offset + len)` on every replica in pieces of [`ZERO_CHUNK`], as
    /// zero-writes (holes) when `deallocate`, else as ordinary writes of zeros.
    fn zero_range(
        &self,
        what: &'static str,
        offset: u64,
        len: u64,
        deallocate: bool,
    ) -> Result<()> {
        let allocated = (!deallocate).then(|| Bytes::from(vec![0u8; len.min(ZERO_CHUNK) as usize]));
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK) as usize;
            let data = match &allocated {
                Some(z) => z.slice(..n),
                None => tandem_repl_proto::zeroes::zeroes(n).expect("at most MAX_ZEROES"),
            };
            let op = ConsumerOp::Write {
                offset: pos,
                data,
                fua: false,
            };
            self.submit(op, what, pos, n as u64)?;
            pos += n as u64;
        }
        Ok(())
    }
}

fn fail(kind: ErrorKind, msg: String, op: &'static str, offset: u64, len: u64) -> BlockError {
    BlockError {
        kind,
        op,
        offset,
        len,
        source: Some(std::io::Error::other(msg)),
    }
}

fn stopped(volume: &str, op: &'static str, offset: u64, len: u64) -> BlockError {
    let msg = format!("volume {volume}: the replication driver stopped");
    fail(ErrorKind::Io, msg, op, offset, len)
}

/// The block error for the engine's refusal or failure of a request.
fn request_error(
    volume: &str,
    e: RequestError,
    op: &'static str,
    offset: u64,
    len: u64,
) -> BlockError {
    let kind = match e {
        RequestError::OutOfRange => ErrorKind::OutOfRange,
        RequestError::NotSupported => ErrorKind::Unsupported,
        RequestError::NotPrimary
        | RequestError::NoQuorum { .. }
        | RequestError::NotUpToDate
        | RequestError::Io(_) => ErrorKind::Io,
    };
    fail(kind, format!("volume {volume}: {e}"), op, offset, len)
}

impl BlockDevice for ReplicatedDevice {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(u32::MAX as usize / 2 + 1);
            let off = offset + done as u64;
            let r = self.submit(
                ConsumerOp::Read {
                    offset: off,
                    len: n as u32,
                },
                "read",
                off,
                n as u64,
            )?;
            match r {
                Reply::Data(d) if d.len() == n => buf[done..done + n].copy_from_slice(&d),
                _ => {
                    return Err(BlockError {
                        kind: ErrorKind::Io,
                        op: "read",
                        offset: off,
                        len: n as u64,
                        source: Some(std::io::Error::other(format!(
                            "volume {}: the engine returned no data of the requested length",
                            self.name
                        ))),
                    });
                }
            }
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.submit(
            ConsumerOp::Write {
                offset,
                data: Bytes::copy_from_slice(buf),
                fua: false,
            },
            "write",
            offset,
            buf.len() as u64,
        )
        .map(|_| ())
    }

    fn flush(&self) -> Result<()> {
        self.submit(ConsumerOp::Flush, "flush", 0, 0).map(|_| ())
    }

    fn async_writes(&self) -> bool {
        true
    }

    /// Hands the write (its buffer, without a copy) to the engine loop and returns; `done`
    /// runs on the loop thread when the engine completes it (FUA included: the engine makes
    /// it durable everywhere before completing).
    fn start_write(&self, data: Bytes, offset: u64, fua: bool, done: WriteDone) {
        self.start_writes(vec![StartWrite {
            data,
            offset,
            fua,
            done,
        }]);
    }

    /// Hands every write to the engine loop at once: one drain runs them all, so their
    /// `Write` frames to a peer leave in one `sendmsg`.
    fn start_writes(&self, writes: Vec<StartWrite>) {
        let mut inputs = Vec::with_capacity(writes.len());
        for w in writes {
            let (offset, len) = (w.offset, w.data.len() as u64);
            if let Err(e) = self.check_range("write", offset, len) {
                (w.done)(Err(e));
                continue;
            }
            if len == 0 {
                (w.done)(Ok(()));
                continue;
            }
            let name = self.name.clone();
            let done = w.done;
            let completion = Completion::Callback(Box::new(
                move |r: std::result::Result<Reply, RequestError>| {
                    done(
                        r.map(|_| ())
                            .map_err(|e| request_error(&name, e, "write", offset, len)),
                    )
                },
            ));
            let op = ConsumerOp::Write {
                offset,
                data: w.data,
                fua: w.fua,
            };
            inputs.push(Input::Consumer(op, completion));
        }
        if inputs.is_empty() {
            return;
        }
        if let Err(inputs) = self.tx.send_many(inputs) {
            for input in inputs {
                if let Input::Consumer(_, c) = input {
                    c.complete(Err(RequestError::Io(
                        "the replication driver stopped".into(),
                    )));
                }
            }
        }
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range("trim", offset, len)?;
        self.zero_range("trim", offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_deallocate: bool) -> Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        self.zero_range("write_zeroes", offset, len, may_deallocate)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range("block_status", offset, len)?;
        // Never claims zeroes: this replica may be behind its peers.
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

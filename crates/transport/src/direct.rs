//! Direct sends: a frame for an idle link is written by the sending thread itself, with one
//! non-blocking `sendmsg`, instead of being queued for the link's writer task.
//!
//! The engine loops of the volumes run on threads of their own; handing each frame to a
//! writer task on the runtime costs a wake-up of a runtime worker per frame (a futex and a
//! context switch, tens of microseconds on a virtual machine), which is most of what a
//! replicated 4 KiB write waits for beyond the copies. When nothing is queued on the link,
//! the frame goes out at once; otherwise (or when the socket buffer is full) it is queued
//! behind the others, so frames still leave in the order they were sent.
//!
//! Ordering rule: `pending` counts the frames promised to the writer (queued or being written).
//! A direct send happens only while it is zero, under the same lock every enqueuer takes to
//! raise it, and the writer lowers it only after the frames are written.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use bytes::Bytes;
use tandem_repl_proto::{Encoder, Message};
use tokio::sync::mpsc;

use crate::link::frame_cost;
use crate::tasks::lock;
use crate::transport::Outgoing;

/// Largest frame sent directly; larger ones go through the writer (whose vectored writes of
/// several frames amortise the syscall anyway).
pub(crate) const DIRECT_MAX: usize = 256 * 1024;

#[derive(Default)]
struct State {
    /// Frames queued for the writer or being written by it.
    pending: usize,
    /// The writer is gone (or going): nothing more is written directly.
    closed: bool,
}

/// The direct-send side of one established link.
pub(crate) struct Direct {
    /// A duplicate of the socket, so the descriptor stays valid however the link's tasks end.
    fd: OwnedFd,
    enc: Encoder,
    state: Mutex<State>,
}

/// What [`Direct::try_send`] did with a frame.
pub(crate) enum Sent {
    /// Written whole.
    Done,
    /// Not written (link busy, socket full, too large): queue it as usual. It is already
    /// counted as pending (call [`Direct::unqueued`] if queueing fails), so nothing sent
    /// later overtakes it.
    Queue(Message),
}

impl Direct {
    /// `fd`: the link's socket (duplicated here).
    pub(crate) fn new(fd: RawFd, enc: Encoder) -> io::Result<Direct> {
        // SAFETY: `dup` of a descriptor the caller keeps open for the call; the result is a
        // new descriptor we own (checked for failure before it is wrapped).
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(dup) };
        Ok(Direct {
            fd,
            enc,
            state: Mutex::new(State::default()),
        })
    }

    /// Writes `msg` now if the link is idle and the socket takes it whole or in part (the rest
    /// is queued first thing for the writer); otherwise hands it back to be queued.
    pub(crate) fn try_send(&self, msg: Message, tx: &mpsc::Sender<Outgoing>) -> Sent {
        if frame_cost(&msg) > DIRECT_MAX {
            // Large frames go to the writer (encoded there: the checksum over the payload is
            // computed once).
            lock(&self.state).pending += 1;
            return Sent::Queue(msg);
        }
        let mut head = Vec::with_capacity(64);
        let encoded = self
            .enc
            .encode_vectored(&msg, &mut head)
            .ok()
            .filter(|t| head.len() + t.as_ref().map_or(0, Bytes::len) <= DIRECT_MAX);
        let mut st = lock(&self.state);
        // Unencodable frames (the writer reports them) and large ones are queued.
        let Some(tail) = encoded.filter(|_| st.pending == 0 && !st.closed) else {
            st.pending += 1;
            return Sent::Queue(msg);
        };
        let total = head.len() + tail.as_ref().map_or(0, Bytes::len);
        // Socket full (0 bytes), or an error the writer will meet and report.
        let n = send_nonblocking(self.fd.as_raw_fd(), &head, tail.as_deref()).unwrap_or_default();
        if n == total {
            return Sent::Done;
        }
        st.pending += 1;
        if n == 0 {
            return Sent::Queue(msg);
        }
        // Part of the frame is on the wire: the rest goes before anything else. The queue is
        // empty (pending was 0), so there is room.
        if tx
            .try_send(Outgoing {
                msg,
                skip: n,
                _permit: None,
            })
            .is_err()
        {
            // The writer is gone: the link breaks, the peer sees a truncated frame.
            st.pending -= 1;
            st.closed = true;
        }
        Sent::Done
    }

    /// Counts a frame about to be queued without a direct attempt (call before queueing it;
    /// [`Direct::unqueued`] if queueing then fails).
    pub(crate) fn queuing(&self) {
        lock(&self.state).pending += 1;
    }

    /// A counted frame was not queued after all.
    pub(crate) fn unqueued(&self) {
        let mut st = lock(&self.state);
        st.pending = st.pending.saturating_sub(1);
    }

    /// The writer wrote `n` queued frames.
    pub(crate) fn written(&self, n: usize) {
        let mut st = lock(&self.state);
        st.pending = st.pending.saturating_sub(n);
    }

    /// No more direct writes (the writer ends; what it wrote last must stay last).
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
    }
}

/// One non-blocking `sendmsg` of `head` then `tail`; bytes written (0 when the socket buffer
/// is full).
fn send_nonblocking(fd: RawFd, head: &[u8], tail: Option<&[u8]>) -> io::Result<usize> {
    let mut iov = [
        libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        },
    ];
    let mut count = 1;
    if let Some(t) = tail.filter(|t| !t.is_empty()) {
        iov[1] = libc::iovec {
            iov_base: t.as_ptr().cast_mut().cast(),
            iov_len: t.len(),
        };
        count = 2;
    }
    loop {
        // SAFETY: a zeroed msghdr is valid (no name, no control data); it points at `iov`,
        // whose entries point at `head` and `tail`, alive for the call and only read by the
        // kernel. `fd` is a descriptor `Direct` owns.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = count as _;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

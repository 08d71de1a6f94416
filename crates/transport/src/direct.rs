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
//!
//! Frame numbers (protocol version 10): the link's [`FrameCounter`] lives under the same lock.
//! A direct send takes numbers for the frames it wrote (in whole or in part; the rest of a
//! partial one is queued with its number), the writer for the frames it encodes, while they
//! are pending: so numbers are taken in the order the frames go on the wire.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tandem_repl_proto::{Encoder, FrameCounter, Message};
use tokio::sync::{Semaphore, mpsc};

use crate::link::frame_cost;
use crate::tasks::lock;
use crate::transport::Outgoing;

/// Largest frame sent directly; larger ones go through the writer (whose vectored writes of
/// several frames amortise the syscall anyway).
pub(crate) const DIRECT_MAX: usize = 256 * 1024;
/// Frames written with one direct `sendmsg` of a batch at most.
pub(crate) const BATCH_FRAMES: usize = 64;
/// Bytes written with one direct `sendmsg` of a batch at most.
pub(crate) const BATCH_BYTES: usize = 256 * 1024;

#[derive(Default)]
struct State {
    /// Frames queued for the writer or being written by it.
    pending: usize,
    /// The writer is gone (or going): nothing more is written directly.
    closed: bool,
    /// Numbers of the frames sent on the link.
    numbers: FrameCounter,
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
        let mut st = lock(&self.state);
        if frame_cost(&msg) > DIRECT_MAX || st.pending > 0 || st.closed {
            // Large frames go to the writer (encoded there: the checksum over the payload is
            // computed once); a busy link keeps its order.
            st.pending += 1;
            return Sent::Queue(msg);
        }
        // Encoded under the lock: the frame's number is the next one only if it goes now.
        let seq = st.numbers.peek();
        let mut head = Vec::with_capacity(64);
        let encoded = self
            .enc
            .encode_vectored_seq(&msg, seq, &mut head)
            .ok()
            .filter(|t| head.len() + t.as_ref().map_or(0, Bytes::len) <= DIRECT_MAX);
        // Unencodable frames (the writer reports them) and large ones are queued.
        let Some(tail) = encoded else {
            st.pending += 1;
            return Sent::Queue(msg);
        };
        let total = head.len() + tail.as_ref().map_or(0, Bytes::len);
        // Socket full (0 bytes), or an error the writer will meet and report.
        let n = send_nonblocking(self.fd.as_raw_fd(), &head, tail.as_deref()).unwrap_or_default();
        if n == total {
            st.numbers.take();
            return Sent::Done;
        }
        st.pending += 1;
        if n == 0 {
            return Sent::Queue(msg);
        }
        // Part of the frame is on the wire: the rest goes before anything else, with the
        // number it was encoded with. The queue is empty (pending was 0), so there is room.
        st.numbers.take();
        if tx
            .try_send(Outgoing {
                msg,
                skip: n,
                seq: Some(seq),
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

    /// Sends the first `n` messages of `msgs` in order, taking each off the front once it is
    /// written or queued: while the link is idle, runs of up to [`BATCH_FRAMES`] frames
    /// (each at most [`DIRECT_MAX`], together at most [`BATCH_BYTES`]) go out with one
    /// non-blocking `sendmsg` each; a frame the socket took in part is queued first thing
    /// with the bytes already written skipped (like [`Direct::try_send`]); everything from
    /// the first frame that is not written (socket full, link busy, frame too large) is
    /// queued behind, in order, each with its share of the byte budget `bytes`
    /// (`permits(msg)` permits). Queueing happens under the state lock, so the batch stays
    /// together in the queue.
    ///
    /// Stops at the first message that finds no room (`Err(Full)`) or no writer
    /// (`Err(Closed)`): it and the rest stay at the front of `msgs`.
    pub(crate) fn try_send_batch(
        &self,
        msgs: &mut VecDeque<Message>,
        mut n: usize,
        tx: &mpsc::Sender<Outgoing>,
        bytes: &Arc<Semaphore>,
        permits: impl Fn(&Message) -> u32,
    ) -> Result<(), BatchError> {
        n = n.min(msgs.len());
        let mut heads: Vec<u8> = Vec::new();
        // Per encoded frame: its header range in `heads` and its bulk data.
        let mut frames: Vec<(Range<usize>, Option<Bytes>)> = Vec::new();
        while n > 0 {
            heads.clear();
            frames.clear();
            let mut total = 0;
            let mut st = lock(&self.state);
            // Encoded under the lock, numbered from the link's next number: they go now or
            // are queued for the writer (which numbers them again).
            let first_seq = st.numbers.peek();
            if st.pending == 0 && !st.closed {
                for msg in msgs.iter().take(n.min(BATCH_FRAMES)) {
                    if frame_cost(msg) > DIRECT_MAX {
                        break;
                    }
                    let start = heads.len();
                    let seq = first_seq.wrapping_add(frames.len() as u32);
                    let Ok(tail) = self.enc.encode_vectored_seq(msg, seq, &mut heads) else {
                        // The writer meets the error again and reports it.
                        heads.truncate(start);
                        break;
                    };
                    let len = heads.len() - start + tail.as_ref().map_or(0, Bytes::len);
                    if len > DIRECT_MAX || total + len > BATCH_BYTES {
                        heads.truncate(start);
                        break;
                    }
                    total += len;
                    frames.push((start..heads.len(), tail));
                }
            }
            if !frames.is_empty() {
                // Socket full (0 bytes), or an error the writer will meet and report.
                let written = send_frames(self.fd.as_raw_fd(), &heads, &frames).unwrap_or_default();
                if written == total {
                    st.numbers.take_many(frames.len() as u32);
                    msgs.drain(..frames.len());
                    n -= frames.len();
                    continue;
                }
                // Frames written whole, then the one the socket stopped in.
                let mut done = 0;
                let mut at = 0;
                for (h, t) in &frames {
                    let len = h.len() + t.as_ref().map_or(0, Bytes::len);
                    if at + len > written {
                        break;
                    }
                    at += len;
                    done += 1;
                }
                st.numbers.take_many(done as u32);
                msgs.drain(..done);
                n -= done;
                let skip = written - at;
                if skip > 0 {
                    // Part of this frame is on the wire: the rest goes before anything else,
                    // with its number. The queue is empty (pending was 0), so there is room.
                    let msg = msgs.pop_front().expect("the frame written in part");
                    n -= 1;
                    st.pending += 1;
                    let o = Outgoing {
                        msg,
                        skip,
                        seq: Some(st.numbers.take()),
                        _permit: None,
                    };
                    if tx.try_send(o).is_err() {
                        // The writer is gone: the link breaks, the peer sees a truncated
                        // frame.
                        st.pending -= 1;
                        st.closed = true;
                        return Err(BatchError::Closed);
                    }
                }
            }
            // The rest goes to the writer, behind whatever it has.
            while n > 0 {
                let msg = msgs.front().expect("n counts messages of msgs");
                let Ok(permit) = bytes.clone().try_acquire_many_owned(permits(msg)) else {
                    return Err(BatchError::Full);
                };
                let o = Outgoing {
                    msg: msgs.pop_front().expect("checked above"),
                    skip: 0,
                    seq: None,
                    _permit: Some(permit),
                };
                st.pending += 1;
                if let Err(e) = tx.try_send(o) {
                    st.pending -= 1;
                    let (o, err) = match e {
                        mpsc::error::TrySendError::Full(o) => (o, BatchError::Full),
                        mpsc::error::TrySendError::Closed(o) => (o, BatchError::Closed),
                    };
                    msgs.push_front(o.msg);
                    return Err(err);
                }
                n -= 1;
            }
        }
        Ok(())
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

    /// The writer takes numbers for `n` frames it is about to write (pending frames, so no
    /// direct send takes any meanwhile); returns the first.
    pub(crate) fn take_numbers(&self, n: u32) -> u32 {
        lock(&self.state).numbers.take_many(n)
    }

    /// No more direct writes (the writer ends; what it wrote last must stay last).
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
    }
}

/// Why [`Direct::try_send_batch`] stopped.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BatchError {
    /// The send queue has no room (frames or bytes).
    Full,
    /// The writer is gone.
    Closed,
}

/// One non-blocking `sendmsg` of several encoded frames (header from `heads`, then bulk
/// data); bytes written (0 when the socket buffer is full).
fn send_frames(
    fd: RawFd,
    heads: &[u8],
    frames: &[(Range<usize>, Option<Bytes>)],
) -> io::Result<usize> {
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(2 * frames.len());
    for (h, t) in frames {
        iov.push(libc::iovec {
            iov_base: heads[h.clone()].as_ptr().cast_mut().cast(),
            iov_len: h.len(),
        });
        if let Some(t) = t.as_ref().filter(|t| !t.is_empty()) {
            iov.push(libc::iovec {
                iov_base: t.as_ptr().cast_mut().cast(),
                iov_len: t.len(),
            });
        }
    }
    sendmsg_nonblocking(fd, &mut iov)
}

/// One non-blocking `sendmsg` of `iov`; bytes written (0 when the socket buffer is full).
fn sendmsg_nonblocking(fd: RawFd, iov: &mut [libc::iovec]) -> io::Result<usize> {
    loop {
        // SAFETY: a zeroed msghdr is valid (no name, no control data); it points at `iov`,
        // whose entries point at buffers the caller keeps alive for the call and that the
        // kernel only reads. `fd` is a descriptor `Direct` owns.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
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
    sendmsg_nonblocking(fd, &mut iov[..count])
}

#[cfg(test)]
mod tests {
    //! The batch path over a real socket pair with a small send buffer: what the socket does
    //! not take must be queued exactly (the frame it stopped in with the bytes written
    //! skipped, then the rest), so that a writer finishing the queue produces the frames
    //! whole and in order.

    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use tandem_repl_proto::{Decoder, MAX_PAYLOAD, ProtocolVersion};

    use super::*;

    fn write(seq: u64, len: usize) -> Message {
        Message::Write {
            seq,
            offset: seq * 4096,
            flags: 0,
            data: Bytes::from((0..len).map(|i| (i as u64 ^ seq) as u8).collect::<Vec<_>>()),
        }
    }

    fn ack(seq: u64) -> Message {
        Message::WriteAck {
            seq,
            status: tandem_repl_proto::Status::Ok,
        }
    }

    fn set_sndbuf(s: &UnixStream, bytes: libc::c_int) {
        // SAFETY: setsockopt on a descriptor `s` owns, with a pointer to a live c_int and
        // its size.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    struct Pair {
        direct: Direct,
        /// The link's socket (for the test's writer) and the peer's end.
        ours: UnixStream,
        theirs: UnixStream,
        tx: mpsc::Sender<Outgoing>,
        rx: mpsc::Receiver<Outgoing>,
        bytes: Arc<Semaphore>,
        /// The peer's decoder, checking frame numbers across the whole stream.
        dec: Arc<std::sync::Mutex<Decoder>>,
    }

    fn pair(sndbuf: libc::c_int, frames: usize, budget: usize) -> Pair {
        let (ours, theirs) = UnixStream::pair().unwrap();
        set_sndbuf(&ours, sndbuf);
        // A broken test fails instead of hanging.
        ours.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let direct = Direct::new(ours.as_raw_fd(), Encoder::new(ProtocolVersion::LATEST)).unwrap();
        let (tx, rx) = mpsc::channel(frames);
        let mut dec = Decoder::with_max_payload(MAX_PAYLOAD);
        dec.set_version(ProtocolVersion::LATEST);
        Pair {
            direct,
            ours,
            theirs,
            tx,
            rx,
            bytes: Arc::new(Semaphore::new(budget)),
            dec: Arc::new(std::sync::Mutex::new(dec)),
        }
    }

    fn permits(m: &Message) -> u32 {
        frame_cost(m) as u32
    }

    /// Plays the writer: encodes the queued frames (skipping what a direct send wrote) and
    /// writes them, blocking, onto the socket; returns the `skip` of each frame taken.
    fn run_writer(p: &mut Pair) -> Vec<usize> {
        let enc = Encoder::new(ProtocolVersion::LATEST);
        let mut skips = Vec::new();
        while let Ok(o) = p.rx.try_recv() {
            let mut buf = Vec::new();
            let seq = o.seq.unwrap_or_else(|| p.direct.take_numbers(1));
            enc.encode_seq(&o.msg, seq, &mut buf).unwrap();
            (&p.ours).write_all(&buf[o.skip..]).unwrap();
            skips.push(o.skip);
            p.direct.written(1);
        }
        skips
    }

    /// Reads `n` messages from the peer's end (on its own thread: the writer blocks until
    /// it reads).
    fn reader(p: &Pair, n: usize) -> std::thread::JoinHandle<Vec<Message>> {
        let mut s = p.theirs.try_clone().unwrap();
        let dec = p.dec.clone();
        std::thread::spawn(move || {
            // One decoder for the whole stream: it checks the frame numbers across reads.
            let mut dec = dec.lock().unwrap();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                while let Some(m) = dec.next_message().unwrap() {
                    out.push(m);
                }
                if out.len() >= n {
                    return out;
                }
                let k = s.read(&mut buf).unwrap();
                assert!(k > 0, "the socket closed after {} messages", out.len());
                dec.buffer_mut().extend_from_slice(&buf[..k]);
            }
        })
    }

    #[test]
    fn a_batch_larger_than_the_socket_buffer_is_written_in_part_and_the_rest_queued_in_order() {
        // 4 KiB writes with their headers do not line up with what the socket takes: the
        // direct sendmsg stops inside a frame.
        let mut p = pair(16 * 1024, 1024, 64 << 20);
        let sent: Vec<Message> = (0..200).map(|i| write(i, 4096)).collect();
        let mut msgs: VecDeque<Message> = sent.iter().cloned().collect();
        let n = msgs.len();
        p.direct
            .try_send_batch(&mut msgs, n, &p.tx, &p.bytes, permits)
            .unwrap();
        assert!(msgs.is_empty(), "every message written or queued");
        let queued = p.rx.len();
        assert!(queued > 0 && queued < 200, "{queued} of 200 queued");
        assert_eq!(
            lock(&p.direct.state).pending,
            queued,
            "queued frames are pending"
        );

        // Until the writer drained them, later sends queue behind (the link is busy).
        let mut later: VecDeque<Message> = (200..210).map(ack).collect();
        p.direct
            .try_send_batch(&mut later, 10, &p.tx, &p.bytes, permits)
            .unwrap();
        assert_eq!(p.rx.len(), queued + 10);

        let read = reader(&p, 210);
        let skips = run_writer(&mut p);
        assert!(
            skips[0] > 0,
            "the first queued frame was written in part: {skips:?}"
        );
        assert!(skips[1..].iter().all(|s| *s == 0), "{skips:?}");
        let got = read.join().unwrap();
        let want: Vec<Message> = sent.into_iter().chain((200..210).map(ack)).collect();
        assert!(got == want, "every frame whole and in order");
        assert_eq!(lock(&p.direct.state).pending, 0);

        // Idle again: a small batch goes out directly, nothing queued.
        let mut again: VecDeque<Message> = (300..310).map(ack).collect();
        let read = reader(&p, 10);
        p.direct
            .try_send_batch(&mut again, 10, &p.tx, &p.bytes, permits)
            .unwrap();
        assert_eq!(p.rx.len(), 0, "written directly");
        assert!(read.join().unwrap() == (300..310).map(ack).collect::<Vec<_>>());
    }

    #[test]
    fn a_large_frame_goes_to_the_writer_and_the_frames_after_it_queue_behind() {
        let mut p = pair(1 << 20, 1024, 64 << 20);
        let sent = vec![
            ack(1),
            write(2, 100),
            write(3, DIRECT_MAX + 1),
            ack(4),
            write(5, 4096),
        ];
        let mut msgs: VecDeque<Message> = sent.iter().cloned().collect();
        p.direct
            .try_send_batch(&mut msgs, 5, &p.tx, &p.bytes, permits)
            .unwrap();
        assert!(msgs.is_empty());
        assert_eq!(
            p.rx.len(),
            3,
            "the large frame and the two after it are queued"
        );
        let read = reader(&p, 5);
        assert_eq!(run_writer(&mut p), [0, 0, 0]);
        assert!(read.join().unwrap() == sent);
    }

    #[test]
    fn a_full_queue_stops_the_batch_and_hands_back_the_rest_in_order() {
        // A tiny socket buffer and a queue of 3 frames: the batch stops with `Full`, the
        // caller keeps the rest and sends it (with whatever came after) once the writer made
        // room, as the volume driver's backlog does.
        let mut p = pair(4096, 3, 64 << 20);
        let mut first: VecDeque<Message> = (0..64).map(|i| write(i, 4096)).collect();
        assert_eq!(
            p.direct
                .try_send_batch(&mut first, 64, &p.tx, &p.bytes, permits),
            Err(BatchError::Full)
        );
        assert!(
            !first.is_empty() && first.len() < 64,
            "{} left",
            first.len()
        );
        assert_eq!(p.rx.len(), 3, "the queue is full");
        let mut later: VecDeque<Message> = (100..105).map(ack).collect();
        assert_eq!(
            p.direct
                .try_send_batch(&mut later, 5, &p.tx, &p.bytes, permits),
            Err(BatchError::Full)
        );
        assert_eq!(later.len(), 5, "nothing taken from a full queue");

        let read = reader(&p, 69);
        let mut rest: VecDeque<Message> = first.into_iter().chain(later).collect();
        let mut rounds = 0;
        loop {
            run_writer(&mut p);
            let n = rest.len();
            match p
                .direct
                .try_send_batch(&mut rest, n, &p.tx, &p.bytes, permits)
            {
                Ok(()) => break,
                Err(BatchError::Full) => rounds += 1,
                Err(e) => panic!("{e:?}"),
            }
        }
        run_writer(&mut p);
        let want: Vec<Message> = (0..64)
            .map(|i| write(i, 4096))
            .chain((100..105).map(ack))
            .collect();
        assert!(
            read.join().unwrap() == want,
            "every frame whole and in order ({rounds} more rounds)"
        );
    }

    #[test]
    fn a_byte_budget_without_room_stops_the_batch_like_a_full_queue() {
        // Room for 2 frames' worth of bytes only (and a socket that takes little).
        let mut p = pair(4096, 1024, 2 * frame_cost(&write(0, 4096)));
        let mut msgs: VecDeque<Message> = (0..64).map(|i| write(i, 4096)).collect();
        assert_eq!(
            p.direct
                .try_send_batch(&mut msgs, 64, &p.tx, &p.bytes, permits),
            Err(BatchError::Full)
        );
        let queued = p.rx.len();
        assert!(
            queued <= 3,
            "at most the partly written frame and 2 more: {queued}"
        );
        assert_eq!(lock(&p.direct.state).pending, queued);
        let read = reader(&p, 64 - msgs.len());
        run_writer(&mut p);
        let got = read.join().unwrap();
        assert!(
            got[..]
                == (0..got.len() as u64)
                    .map(|i| write(i, 4096))
                    .collect::<Vec<_>>()[..]
        );
        assert_eq!(
            p.bytes.available_permits(),
            2 * frame_cost(&write(0, 4096)),
            "budget back"
        );
    }
}

//! Block devices: the storage a replica's data lives on.
//!
//! [`BlockDevice`] is synchronous and `Send + Sync`: every method may be called from many threads
//! at once (positional I/O, no shared cursor). Async front ends run it on blocking threads; the
//! replication engine and the simulator call it directly. Implementations:
//!
//! * [`FileDevice`]: a (sparse) regular file; TRIM punches holes, block status comes from
//!   `SEEK_DATA`/`SEEK_HOLE`, FLUSH is `fdatasync`.
//! * [`MemDevice`]: an in-memory device that tracks allocation, for unit tests and the simulator.

pub mod completions;
mod file;
mod mem;

pub use file::FileDevice;
pub use mem::MemDevice;

pub use bytes::Bytes;
use thiserror::Error;

/// What went wrong, for matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request reaches past the end of the device.
    OutOfRange,
    /// The backing store failed (EIO and friends).
    Io,
    /// The backing store is full.
    NoSpace,
    /// The device does not support the operation.
    Unsupported,
}

/// A block device error: a kind, the operation and range it happened on, and the OS error if any.
#[derive(Debug, Error)]
#[error("{op} at offset {offset} length {len}: {kind:?}{}", source.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
pub struct BlockError {
    pub kind: ErrorKind,
    pub op: &'static str,
    pub offset: u64,
    pub len: u64,
    #[source]
    pub source: Option<std::io::Error>,
}

impl BlockError {
    pub fn new(kind: ErrorKind, op: &'static str, offset: u64, len: u64) -> Self {
        BlockError {
            kind,
            op,
            offset,
            len,
            source: None,
        }
    }

    pub fn io(op: &'static str, offset: u64, len: u64, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            _ => ErrorKind::Io,
        };
        BlockError {
            kind,
            op,
            offset,
            len,
            source: Some(err),
        }
    }

    /// The errno a front end should report for this error.
    pub fn errno(&self) -> i32 {
        match self.kind {
            ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::NoSpace => libc::ENOSPC,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::Io => libc::EIO,
        }
    }
}

pub type Result<T> = std::result::Result<T, BlockError>;

/// One run of the device with uniform allocation state, as reported by [`BlockDevice::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

/// A device of fixed size addressed in bytes. All methods are positional and thread-safe.
/// Called once with the outcome of a write started with [`BlockDevice::start_write`]. A device
/// that completes several writes at once may call them inside a [`completions::group`].
pub type WriteDone = Box<dyn FnOnce(Result<()>) + Send>;

/// One write of a batch handed to [`BlockDevice::start_writes`].
pub struct StartWrite {
    pub data: Bytes,
    pub offset: u64,
    pub fua: bool,
    pub done: WriteDone,
}

pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` from `offset`. The whole range must lie inside the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`. Not durable until [`BlockDevice::flush`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Discards a range: afterwards it reads as zeroes and, where the store can, is deallocated.
    fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Makes a range read as zeroes. With `may_deallocate` the store may punch a hole; without it
    /// the range stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_deallocate: bool) -> Result<()>;

    /// Allocation map of `[offset, offset+len)`: consecutive extents covering at least the first
    /// byte of the range and at most the range (may stop early, never empty for `len > 0`).
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Like [`BlockDevice::read_at`], but only if it can complete without waiting for the
    /// backing store (the data is cached). `Ok(false)`: it would block and nothing was read; the
    /// caller retries with `read_at` on a thread that may block. The default never tries.
    fn try_read_at_nowait(&self, _buf: &mut [u8], _offset: u64) -> Result<bool> {
        Ok(false)
    }

    /// Like [`BlockDevice::write_at`], but only if it can complete without blocking.
    /// `Ok(false)`: it would block; the caller retries with `write_at` (part of the range may
    /// already hold the new data, which the retry writes again).
    fn try_write_at_nowait(&self, _buf: &[u8], _offset: u64) -> Result<bool> {
        Ok(false)
    }

    /// True when a small [`BlockDevice::write_at`] normally completes without waiting (it lands
    /// in memory, e.g. the page cache), so a front end may run several back to back on one
    /// thread instead of spreading them over threads (fewer thread hand-offs, no contention on
    /// the file). False (the default) when a write waits for something slow, such as a
    /// replication round trip: such writes must run concurrently.
    fn quick_writes(&self) -> bool {
        false
    }

    /// True when [`BlockDevice::start_write`] returns without waiting for the write (it is
    /// carried out elsewhere and `done` runs there): a front end then starts writes from its
    /// connection task instead of parking a thread on each. False (the default): writes block.
    fn async_writes(&self) -> bool {
        false
    }

    /// Starts a write of `data` at `offset` (with `fua`: durable when `done` reports success)
    /// and calls `done` with the outcome. Devices with [`BlockDevice::async_writes`] return at
    /// once and run `done` on another thread; the default writes (and flushes) right here.
    /// `data` may be kept (without a copy) until the write is done; a front end that pools its
    /// buffers gets one back when the last reference drops ([`Bytes::from_owner`]).
    fn start_write(&self, data: Bytes, offset: u64, fua: bool, done: WriteDone) {
        let r = self
            .write_at(&data, offset)
            .and_then(|()| if fua { self.flush() } else { Ok(()) });
        done(r);
    }

    /// Starts several writes, in order, as if by [`BlockDevice::start_write`] one after the
    /// other. A device may take them in one go (a replicated volume runs them in one drain
    /// of its engine, so their messages to a peer leave together); the default starts each.
    fn start_writes(&self, writes: Vec<StartWrite>) {
        for w in writes {
            self.start_write(w.data, w.offset, w.fua, w.done);
        }
    }

    /// Checks that `[offset, offset+len)` lies inside the device.
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(BlockError::new(ErrorKind::OutOfRange, op, offset, len)),
        }
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn flush(&self) -> Result<()> {
        (**self).flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        (**self).trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_deallocate: bool) -> Result<()> {
        (**self).write_zeroes(offset, len, may_deallocate)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        (**self).block_status(offset, len)
    }
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        (**self).try_read_at_nowait(buf, offset)
    }
    fn try_write_at_nowait(&self, buf: &[u8], offset: u64) -> Result<bool> {
        (**self).try_write_at_nowait(buf, offset)
    }
    fn quick_writes(&self) -> bool {
        (**self).quick_writes()
    }
    fn async_writes(&self) -> bool {
        (**self).async_writes()
    }
    fn start_write(&self, data: Bytes, offset: u64, fua: bool, done: WriteDone) {
        (**self).start_write(data, offset, fua, done)
    }
    fn start_writes(&self, writes: Vec<StartWrite>) {
        (**self).start_writes(writes)
    }
    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        (**self).check_range(op, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A device answering every optional method differently from the trait's defaults and
    /// recording which ones ran, to check that `Arc<dyn BlockDevice>` forwards them all
    /// (method resolution picks the `Arc` impl before the inner one's).
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<&'static str>>,
    }

    impl Recorder {
        fn note(&self, what: &'static str) {
            self.calls.lock().unwrap().push(what);
        }
    }

    impl BlockDevice for Recorder {
        fn size(&self) -> u64 {
            self.note("size");
            4096
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
            self.note("read_at");
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> Result<()> {
            self.note("write_at");
            Ok(())
        }
        fn flush(&self) -> Result<()> {
            self.note("flush");
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> Result<()> {
            self.note("trim");
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
            self.note("write_zeroes");
            Ok(())
        }
        fn block_status(&self, _: u64, len: u64) -> Result<Vec<Extent>> {
            self.note("block_status");
            Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }])
        }
        fn try_read_at_nowait(&self, _: &mut [u8], _: u64) -> Result<bool> {
            self.note("try_read_at_nowait");
            Ok(true)
        }
        fn try_write_at_nowait(&self, _: &[u8], _: u64) -> Result<bool> {
            self.note("try_write_at_nowait");
            Ok(true)
        }
        fn quick_writes(&self) -> bool {
            self.note("quick_writes");
            true
        }
        fn async_writes(&self) -> bool {
            self.note("async_writes");
            true
        }
        fn start_write(&self, _: Bytes, _: u64, _: bool, done: WriteDone) {
            self.note("start_write");
            done(Ok(()));
        }
        fn check_range(&self, _: &'static str, _: u64, _: u64) -> Result<()> {
            self.note("check_range");
            Ok(())
        }
    }

    #[test]
    fn arc_forwards_every_method_to_the_device() {
        let inner = Arc::new(Recorder::default());
        let dev: Arc<dyn BlockDevice> = inner.clone();
        let mut buf = [0u8; 8];
        assert_eq!(dev.size(), 4096);
        dev.read_at(&mut buf, 0).unwrap();
        dev.write_at(&buf, 0).unwrap();
        dev.flush().unwrap();
        dev.trim(0, 8).unwrap();
        dev.write_zeroes(0, 8, true).unwrap();
        dev.block_status(0, 8).unwrap();
        assert!(dev.try_read_at_nowait(&mut buf, 0).unwrap());
        assert!(dev.try_write_at_nowait(&buf, 0).unwrap());
        assert!(dev.quick_writes());
        assert!(dev.async_writes());
        let done = Arc::new(Mutex::new(false));
        let d = done.clone();
        dev.start_write(
            Bytes::from(vec![1; 8]),
            0,
            true,
            Box::new(move |r| *d.lock().unwrap() = r.is_ok()),
        );
        assert!(*done.lock().unwrap());
        dev.check_range("read", 0, 1 << 40).unwrap();
        let calls = inner.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "size",
                "read_at",
                "write_at",
                "flush",
                "trim",
                "write_zeroes",
                "block_status",
                "try_read_at_nowait",
                "try_write_at_nowait",
                "quick_writes",
                "async_writes",
                "start_write",
                "check_range",
            ]
        );
    }
}

//! A block device backed by a regular (normally sparse) file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::{BlockDevice, BlockError, ErrorKind, Extent, Result};

/// The largest piece a buffered write hands the kernel in one call. The page cache sizes the
/// folio it allocates for a write by the write's length: a 1 MiB `pwrite` leaves 1 MiB folios
/// behind (ext4 has large folios since Linux 6.16), and every later 4 KiB write into such a folio
/// walks all of its 256 buffer heads. Measured on a 2-replica volume filled with 1 MiB writes:
/// `ext4_block_write_begin` took 40-55 % of each diskful agent's CPU during 4 KiB random writes
/// (none after the cache was dropped). Writing in 64 KiB pieces keeps folios at 16 blocks: 4 KiB
/// random writes used 38 % less CPU, 1 MiB writes 4-8 % more for the extra calls
/// (docs/PERFORMANCE.md, 2026-12-07 07:00).
pub const WRITE_CHUNK: usize = 64 << 10;

/// A regular file used as a block device. The device size is the file length at open time,
/// changed only by [`FileDevice::set_size`] (online resize).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: AtomicU64,
    /// Set once the filesystem answered `EOPNOTSUPP` to an `RWF_NOWAIT` write (ext4 does for
    /// buffered writes on some kernels): later non-blocking writes are not even tried.
    nowait_write_unsupported: AtomicBool,
}

impl FileDevice {
    /// Opens an existing file read-write.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(FileDevice::new(file, path, size))
    }

    /// Creates a new sparse file of `size` bytes; fails if it exists.
    pub fn create(path: &Path, size: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size)?;
        file.sync_all()?;
        Ok(FileDevice::new(file, path, size))
    }

    fn new(file: File, path: &Path, size: u64) -> Self {
        FileDevice {
            file,
            path: path.to_path_buf(),
            size: AtomicU64::new(size),
            nowait_write_unsupported: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the size the device exposes (requests past it fail with `OutOfRange`). The file
    /// itself is not touched: the caller grows it before (grow) or truncates it after (shrink).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Bytes actually allocated on the backing filesystem.
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    fn fallocate(&self, op: &'static str, mode: i32, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate on a valid, open file descriptor with plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(BlockError::io(
                op,
                offset,
                len,
                std::io::Error::last_os_error(),
            ))
        }
    }

    fn write_zero_buffer(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = WRITE_CHUNK as u64;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.file
                .write_all_at(&zeros[..n as usize], offset + done)
                .map_err(|e| BlockError::io("write_zeroes", offset + done, n, e))?;
            done += n;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: i32) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a valid fd; we use the returned offset only, never the file cursor
        // (all I/O is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

/// Outcome of one `preadv2`/`pwritev2` with `RWF_NOWAIT`.
enum NoWait {
    Done(usize),
    WouldBlock,
    Unsupported,
}

impl FileDevice {
    fn nowait(
        &self,
        op: &'static str,
        write: bool,
        ptr: *mut u8,
        len: usize,
        offset: u64,
    ) -> Result<NoWait> {
        let iov = libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len,
        };
        // SAFETY: `iov` points at a live buffer of `len` bytes owned by the caller for the
        // duration of the call (for writes it is only read by the kernel); the fd is valid.
        let n = unsafe {
            if write {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    offset as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            } else {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    offset as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            }
        };
        if n >= 0 {
            return Ok(NoWait::Done(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(NoWait::WouldBlock),
            Some(libc::EOPNOTSUPP) => Ok(NoWait::Unsupported),
            _ => Err(BlockError::io(op, offset, len as u64, e)),
        }
    }
}

impl BlockDevice for FileDevice {
    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool> {
        self.check_range("read", offset, buf.len() as u64)?;
        match self.nowait("read", false, buf.as_mut_ptr(), buf.len(), offset)? {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock | NoWait::Unsupported => Ok(false),
        }
    }

    fn try_write_at_nowait(&self, buf: &[u8], offset: u64) -> Result<bool> {
        self.check_range("write", offset, buf.len() as u64)?;
        if self.nowait_write_unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match self.nowait("write", true, buf.as_ptr().cast_mut(), buf.len(), offset)? {
            NoWait::Done(n) => Ok(n == buf.len()),
            NoWait::WouldBlock => Ok(false),
            NoWait::Unsupported => {
                self.nowait_write_unsupported.store(true, Ordering::Relaxed);
                Ok(false)
            }
        }
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Buffered writes land in the page cache (unless writeback throttles them).
    fn quick_writes(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| BlockError::io("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len() as u64)?;
        // One `pwrite` per `WRITE_CHUNK` bytes at most: see its comment.
        for (i, piece) in buf.chunks(WRITE_CHUNK).enumerate() {
            let at = offset + (i * WRITE_CHUNK) as u64;
            self.file
                .write_all_at(piece, at)
                .map_err(|e| BlockError::io("write", at, piece.len() as u64, e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io("flush", 0, 0, e))
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range("trim", offset, len)?;
        self.fallocate(
            "trim",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_deallocate: bool) -> Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        let mode = if may_deallocate {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate("write_zeroes", mode, offset, len) {
            Err(e) if e.kind == ErrorKind::Unsupported => self.write_zero_buffer(offset, len),
            other => other,
        }
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range("block_status", offset, len)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        let err = |e| BlockError::io("block_status", offset, len, e);
        while pos < end && out.len() < 1024 {
            let data = self
                .seek(pos, libc::SEEK_DATA)
                .map_err(err)?
                .unwrap_or(u64::MAX);
            if data > pos {
                // [pos, data) is a hole.
                let hole_end = data.min(end);
                out.push(Extent {
                    length: hole_end - pos,
                    hole: true,
                    zero: true,
                });
                pos = hole_end;
                continue;
            }
            let hole = self
                .seek(pos, libc::SEEK_HOLE)
                .map_err(err)?
                .unwrap_or(self.size());
            let data_end = hole.min(end).max(pos + 1);
            out.push(Extent {
                length: data_end - pos,
                hole: false,
                zero: false,
            });
            pos = data_end;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_round_trip_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        let dev = FileDevice::create(&path, 16 << 20).unwrap();
        assert_eq!(dev.size(), 16 << 20);
        let st = dev.block_status(0, 16 << 20).unwrap();
        assert_eq!(
            st,
            vec![Extent {
                length: 16 << 20,
                hole: true,
                zero: true
            }]
        );

        let data = vec![0xabu8; 1 << 20];
        dev.write_at(&data, 4 << 20).unwrap();
        dev.flush().unwrap();
        let mut back = vec![0u8; 1 << 20];
        dev.read_at(&mut back, 4 << 20).unwrap();
        assert_eq!(back, data);

        let st = dev.block_status(0, 16 << 20).unwrap();
        assert_eq!(
            st[0],
            Extent {
                length: 4 << 20,
                hole: true,
                zero: true
            }
        );
        assert_eq!(
            st[1],
            Extent {
                length: 1 << 20,
                hole: false,
                zero: false
            }
        );
        assert!(st[2].hole);
        assert_eq!(st.iter().map(|e| e.length).sum::<u64>(), 16 << 20);

        dev.trim(4 << 20, 1 << 20).unwrap();
        dev.read_at(&mut back, 4 << 20).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        assert_eq!(dev.block_status(0, 16 << 20).unwrap().len(), 1);

        dev.write_at(&data, 0).unwrap();
        dev.write_zeroes(0, 1 << 20, false).unwrap();
        dev.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        assert!(
            !dev.block_status(0, 4096).unwrap()[0].hole,
            "NO_HOLE keeps allocation"
        );
    }

    #[test]
    fn nowait_io_round_trips_or_declines() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(&dir.path().join("d"), 1 << 20).unwrap();
        let data = vec![0x3cu8; 8192];
        // Either it completes without blocking, or it declines and leaves the work to write_at.
        if !dev.try_write_at_nowait(&data, 4096).unwrap() {
            dev.write_at(&data, 4096).unwrap();
        }
        let mut back = vec![0u8; 8192];
        if !dev.try_read_at_nowait(&mut back, 4096).unwrap() {
            dev.read_at(&mut back, 4096).unwrap();
        }
        assert_eq!(back, data);
        // Cached data written just now reads without blocking on any kernel that has RWF_NOWAIT.
        let mut again = vec![0u8; 4096];
        if dev.try_read_at_nowait(&mut again, 4096).unwrap() {
            assert!(again.iter().all(|b| *b == 0x3c));
        }
        assert_eq!(
            dev.try_read_at_nowait(&mut again, (1 << 20) - 100)
                .unwrap_err()
                .kind,
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn a_write_larger_than_a_chunk_lands_whole_and_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(&dir.path().join("d"), 1 << 20).unwrap();
        // Three chunks and a bit, at an offset that is not chunk- or even block-aligned, with
        // a pattern that differs every byte and every chunk: a piece written at the wrong
        // offset, twice or not at all shows.
        let len = 3 * WRITE_CHUNK + 1000;
        let at = 5 * 512 + 7;
        let data: Vec<u8> = (0..len)
            .map(|i| (i % 251) as u8 ^ (i / WRITE_CHUNK) as u8)
            .collect();
        dev.write_at(&data, at).unwrap();
        let mut back = vec![0u8; len + 2];
        dev.read_at(&mut back, at - 1).unwrap();
        assert_eq!(back[0], 0, "the byte before the write is untouched");
        assert_eq!(back[len + 1], 0, "the byte after the write is untouched");
        assert!(back[1..=len] == data[..], "the write reads back as written");
    }

    #[test]
    fn out_of_range_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = FileDevice::create(&dir.path().join("d"), 4096).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(
            dev.read_at(&mut buf, 4096 - 511).unwrap_err().kind,
            ErrorKind::OutOfRange
        );
        assert_eq!(
            dev.write_at(&buf, u64::MAX).unwrap_err().kind,
            ErrorKind::OutOfRange
        );
        assert_eq!(dev.trim(0, 4097).unwrap_err().kind, ErrorKind::OutOfRange);
        dev.read_at(&mut buf, 4096 - 512).unwrap();
    }

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d");
        {
            let dev = FileDevice::create(&path, 8192).unwrap();
            dev.write_at(b"hello", 8187).unwrap();
            dev.flush().unwrap();
        }
        let dev = FileDevice::open(&path).unwrap();
        let mut buf = [0u8; 5];
        dev.read_at(&mut buf, 8187).unwrap();
        assert_eq!(&buf, b"hello");
        assert!(
            FileDevice::create(&path, 1).is_err(),
            "create refuses to overwrite"
        );
    }
}

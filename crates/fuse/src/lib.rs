//! The FUSE file view (see `docs/fuse.md`): a directory holding the volume (`NAME`) and every
//! partition in it (`NAME-partN`) as regular files, so host tools (`e2fsck`, `resize2fs`,
//! `mount -o loop`, `sgdisk`, backups) work on them.
//!
//! All I/O goes through an NBD client of the volume's export
//! ([`tandem_nbd_client::Client`]), like any other consumer's, so writes are replicated. Files
//! are opened with `direct_io`: the kernel keeps no page cache for them, every read and write
//! reaches the export. `fsync` is an NBD FLUSH; writes on files opened with `O_SYNC`/`O_DSYNC`
//! carry FUA. File sizes are fixed (truncate is refused); the partition table is probed once,
//! at mount time, with `tandem-grow`'s probe.
//!
//! Mounting uses the kernel's FUSE directly as root and `fusermount3` otherwise (the `fuser`
//! crate without libfuse).

mod layout;

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, Session, TimeOrNow,
};
use tandem_nbd_client::{Client, NbdError};
use thiserror::Error;

pub use layout::{FileEntry, Layout, layout};

const ROOT_INO: u64 = fuser::FUSE_ROOT_ID;
/// Attributes never change behind the kernel's back (sizes are fixed while mounted).
const TTL: Duration = Duration::from_secs(60);
const BLKSIZE: u32 = 4096;

#[derive(Debug, Error)]
pub enum FuseError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("probing the partition table: {0}")]
    Probe(#[from] tandem_grow::GrowError),
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "FUSE is not available: {0} (install the `fuse3` package, e.g. with ./scripts/test, and make /dev/fuse available)"
    )]
    Unavailable(String),
    #[error("mounting on {dir}: {source}")]
    Mount {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {dir}: {message}")]
    Unmount { dir: PathBuf, message: String },
}

/// Options of a mount.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Files are 0400 and every write is refused (also forced when the export is read-only).
    pub read_only: bool,
    /// The `fsname` shown in `/proc/mounts` (default: `tandem:VOLUME`).
    pub fsname: Option<String>,
}

/// The filesystem: a fixed list of files over one NBD connection.
struct View {
    client: Arc<Client>,
    files: Vec<FileEntry>,
    read_only: bool,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

impl View {
    fn file(&self, ino: u64) -> Option<&FileEntry> {
        ino.checked_sub(2)
            .and_then(|i| self.files.get(usize::try_from(i).ok()?))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let t = self.mounted_at;
        let (kind, perm, size, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 0o555, 0, 2)
        } else {
            let f = self.file(ino)?;
            let perm = if self.read_only { 0o400 } else { 0o600 };
            (FileType::RegularFile, perm, f.size_bytes, 1)
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        })
    }
}

impl View {
    fn fixed_errno(&self) -> i32 {
        if self.read_only {
            libc::EROFS
        } else {
            libc::EPERM
        }
    }
}

fn errno_of(e: &NbdError) -> i32 {
    let errno = e.errno();
    tracing::warn!("NBD I/O failed: {e}");
    errno
}

impl Filesystem for View {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent != ROOT_INO {
            return reply.error(libc::ENOENT);
        }
        match self.files.iter().position(|f| OsStr::new(&f.name) == name) {
            Some(i) => {
                let attr = self.attr(i as u64 + 2).expect("file exists");
                reply.entry(&TTL, &attr, 0)
            }
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(libc::ENOENT);
        };
        // The size is the volume's or the partition's: resizing goes through `tandem volume
        // resize/grow`, never through a truncate here. Other attribute changes (times, mode,
        // owner) are accepted and not kept.
        if let Some(s) = size
            && s != attr.size
        {
            return reply.error(if self.read_only {
                libc::EROFS
            } else {
                libc::EPERM
            });
        }
        reply.attr(&TTL, &attr)
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(libc::EISDIR);
        }
        if self.read_only && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO)
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        if offset >= f.size_bytes {
            return reply.data(&[]);
        }
        let len = (size as u64).min(f.size_bytes - offset) as usize;
        let mut buf = vec![0u8; len];
        match self.client.read(&mut buf, f.offset_bytes + offset) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        if self.read_only {
            return reply.error(libc::EROFS);
        }
        let Ok(offset) = u64::try_from(offset) else {
            return reply.error(libc::EINVAL);
        };
        if data.is_empty() {
            return reply.written(0);
        }
        if offset >= f.size_bytes {
            return reply.error(libc::ENOSPC);
        }
        // A write reaching past the end is cut short, like on a block device.
        let len = (data.len() as u64).min(f.size_bytes - offset) as usize;
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let at = f.offset_bytes + offset;
        let res = if sync && self.client.flags().can_fua() {
            self.client.write(&data[..len], at, true)
        } else {
            self.client
                .write(&data[..len], at, false)
                .and_then(|()| if sync { self.client.flush() } else { Ok(()) })
        };
        match res {
            Ok(()) => reply.written(len as u32),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        // close(): nothing buffered here (direct_io); durability is fsync's job.
        reply.ok()
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        if self.read_only {
            return reply.ok();
        }
        match self.client.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let Some(f) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        if self.read_only {
            return reply.error(libc::EROFS);
        }
        let (Ok(offset), Ok(length)) = (u64::try_from(offset), u64::try_from(length)) else {
            return reply.error(libc::EINVAL);
        };
        let Some(end) = offset.checked_add(length) else {
            return reply.error(libc::EINVAL);
        };
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if end > f.size_bytes && !keep_size {
            // Would grow the file.
            return reply.error(libc::EPERM);
        }
        let end = end.min(f.size_bytes);
        if !(punch || zero) {
            // Plain allocation inside the file: the space exists already.
            return reply.ok();
        }
        if end <= offset {
            return reply.ok();
        }
        if !self.client.flags().can_write_zeroes() {
            return reply.error(libc::EOPNOTSUPP);
        }
        // Punching a hole must leave zeroes: WRITE_ZEROES (the export may deallocate).
        match self
            .client
            .write_zeroes(f.offset_bytes + offset, end - offset, zero && !punch)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_of(&e)),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == ROOT_INO {
            reply.opened(0, 0)
        } else {
            reply.error(libc::ENOTDIR)
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT_INO {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
        ];
        for (i, f) in self.files.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, &f.name));
        }
        let skip = usize::try_from(offset).unwrap_or(0);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            // The offset given is the one of the next entry.
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok()
    }

    // The set of files is fixed: creating, removing and renaming are refused with EPERM (EROFS
    // on a read-only view) instead of fuser's default ENOSYS ("Function not implemented").
    fn mknod(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_errno())
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_errno())
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.fixed_errno())
    }

    fn unlink(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.fixed_errno())
    }

    fn rmdir(&mut self, _req: &Request<'_>, _parent: u64, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.fixed_errno())
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _name: &OsStr,
        _newparent: u64,
        _newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.fixed_errno())
    }

    fn symlink(
        &mut self,
        _req: &Request<'_>,
        _parent: u64,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_errno())
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _newparent: u64,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.fixed_errno())
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let total = self.files.first().map(|f| f.size_bytes).unwrap_or(0);
        reply.statfs(
            total.div_ceil(BLKSIZE as u64),
            0,
            0,
            self.files.len() as u64,
            0,
            BLKSIZE,
            255,
            BLKSIZE,
        )
    }
}

/// A mounted view; [`Mounted::run`] serves it until it is unmounted.
pub struct Mounted {
    session: Session<View>,
    dir: PathBuf,
    layout: Layout,
    read_only: bool,
}

impl Mounted {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Serves kernel requests until the directory is unmounted ([`unmount`], `fusermount3 -u`,
    /// `umount`). Requests are handled one at a time. A connection the kernel aborted
    /// (`ECONNABORTED` from `/dev/fuse`, seen after a lazy unmount once the last open file
    /// closed) is an end like `ENODEV`: the mount is gone either way.
    pub fn run(mut self) -> io::Result<()> {
        match self.session.run() {
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r,
        }
    }
}

/// Checks what a mount needs, with messages that say how to get it.
pub fn check_available() -> Result<(), FuseError> {
    if !Path::new("/dev/fuse").exists() {
        return Err(FuseError::Unavailable("/dev/fuse does not exist".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && which("fusermount3").is_none() {
        return Err(FuseError::Unavailable(
            "fusermount3 is not installed (needed to mount without root)".into(),
        ));
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

/// Probes the export's partition table and mounts the view of volume `volume` on `dir`. The
/// directory is mounted when this returns; call [`Mounted::run`] to serve it.
pub fn mount(
    client: Client,
    volume: &str,
    dir: &Path,
    opts: &Options,
) -> Result<Mounted, FuseError> {
    check_available()?;
    if !dir.is_dir() {
        return Err(FuseError::NotADirectory(dir.to_path_buf()));
    }
    let dir = dir.canonicalize().map_err(|source| FuseError::Mount {
        dir: dir.to_path_buf(),
        source,
    })?;
    let client = Arc::new(client);
    let layout = layout(volume, &*client)?;
    let read_only = opts.read_only || client.read_only();
    let view = View {
        client,
        files: layout.files.clone(),
        read_only,
        // SAFETY: getuid/getgid have no preconditions.
        uid: unsafe { libc::getuid() },
        gid: unsafe { libc::getgid() },
        mounted_at: SystemTime::now(),
    };
    let mut options = vec![
        MountOption::FSName(
            opts.fsname
                .clone()
                .unwrap_or_else(|| format!("tandem:{volume}")),
        ),
        MountOption::Subtype("tandem".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        MountOption::NoAtime,
    ];
    options.push(if read_only {
        MountOption::RO
    } else {
        MountOption::RW
    });
    let session = Session::new(view, &dir, &options).map_err(|source| FuseError::Mount {
        dir: dir.clone(),
        source,
    })?;
    Ok(Mounted {
        session,
        dir,
        layout,
        read_only,
    })
}

/// How [`unmount`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmounted {
    /// The mount is gone.
    Done,
    /// The directory was busy (open files, a loop device): it was detached from the tree and
    /// the view keeps serving until the last user closes it.
    Lazy,
}

/// Unmounts `dir` (as root with umount2, otherwise with `fusermount3 -u`); when it is busy,
/// detaches it lazily instead.
pub fn unmount(dir: &Path) -> Result<Unmounted, FuseError> {
    let err = |message: String| FuseError::Unmount {
        dir: dir.to_path_buf(),
        message,
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| err("path contains a NUL byte".into()))?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(Unmounted::Done);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(err(e.to_string()));
        }
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(Unmounted::Lazy);
        }
        return Err(err(io::Error::last_os_error().to_string()));
    }
    let run = |lazy: bool| {
        let mut cmd = std::process::Command::new("fusermount3");
        cmd.arg("-u");
        if lazy {
            cmd.arg("-z");
        }
        cmd.arg("--").arg(dir).output()
    };
    let out = run(false).map_err(|e| err(format!("running fusermount3: {e}")))?;
    if out.status.success() {
        return Ok(Unmounted::Done);
    }
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    if text.contains("busy") {
        let out = run(true).map_err(|e| err(format!("running fusermount3: {e}")))?;
        if out.status.success() {
            return Ok(Unmounted::Lazy);
        }
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    Err(err(text.trim().to_string()))
}

/// Whether `dir` is a mount point listed in `/proc/self/mountinfo`.
pub fn is_mounted(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|m| unescape_mount_path(m) == dir.as_os_str().to_string_lossy())
            .unwrap_or(false)
    })
}

/// `/proc` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) =
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

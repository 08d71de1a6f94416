//! A small blocking NBD client (protocol: `doc/proto.md` of the NetworkBlockDevice/nbd project).
//!
//! * Transports: unix socket and TCP, from an [`NbdUri`] (`nbd+unix:///NAME?socket=PATH`,
//!   `nbd://HOST:PORT/NAME`).
//! * Handshake: fixed newstyle (with `NO_ZEROES` when offered), `NBD_OPT_GO` with the export
//!   name asking for `NBD_INFO_BLOCK_SIZE`; servers that answer `NBD_REP_ERR_UNSUP` to GO get
//!   the old `NBD_OPT_EXPORT_NAME`. A refusal (`NBD_REP_ERR_*`) is reported with the server's
//!   message ([`NbdError::Refused`]).
//! * Transmission: READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE), DISC; simple replies
//!   only (structured replies are never requested). Requests larger than the server's maximum
//!   block size (32 MiB when it does not say) are split.
//!
//! [`Client`] holds one connection behind a mutex: every method takes `&self` and may be called
//! from many threads; requests are serialised. A transport error (the connection broke, or the
//! server sent something unparseable) poisons the connection: every later call fails with
//! [`NbdError::Broken`] instead of reading a reply that belongs to another request. With
//! [`Client::with_reconnect`] the client instead redials the same URI (for a time window) and
//! resends the request, so a consumer survives a server restart.
//!
//! [`Client`] implements [`tandem_blockdev::BlockDevice`], so code written against a device
//! (for example `tandem-grow`'s partition probe) runs over NBD unchanged.

mod uri;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tandem_blockdev::{BlockDevice, BlockError, ErrorKind, Extent};
use thiserror::Error;

pub use uri::{DEFAULT_PORT, NbdUri};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Largest request sent when the server does not announce a maximum block size.
const DEFAULT_MAX_REQUEST: u32 = 32 << 20;
/// Largest option reply accepted (a server message or an info block).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Transmission flags the server announced for the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags(pub u16);

impl Flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
    pub fn read_only(self) -> bool {
        self.has(Self::READ_ONLY)
    }
    pub fn can_flush(self) -> bool {
        self.has(Self::SEND_FLUSH)
    }
    pub fn can_fua(self) -> bool {
        self.has(Self::SEND_FUA)
    }
    pub fn can_trim(self) -> bool {
        self.has(Self::SEND_TRIM)
    }
    pub fn can_write_zeroes(self) -> bool {
        self.has(Self::SEND_WRITE_ZEROES)
    }
    pub fn can_multi_conn(self) -> bool {
        self.has(Self::CAN_MULTI_CONN)
    }
}

/// Everything that can go wrong, phrased for an operator.
#[derive(Debug, Error)]
pub enum NbdError {
    #[error("invalid NBD URI '{uri}': {reason}")]
    Uri { uri: String, reason: String },
    #[error("cannot connect to the NBD server at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the NBD server: {0}")]
    Io(#[from] io::Error),
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    /// The server answered the export request with `NBD_REP_ERR_*`.
    #[error("the NBD server refused export '{export}': {kind}{}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        export: String,
        /// The reply type (`NBD_REP_ERR_*`, bit 31 set).
        code: u32,
        /// Its name, e.g. `NBD_REP_ERR_UNKNOWN`.
        kind: &'static str,
        /// The server's own message (may be empty).
        message: String,
    },
    /// The server answered a command with an error.
    #[error("NBD {op} at offset {offset} length {len} failed: {} (errno {errno})", errno_name(*errno))]
    Command {
        op: &'static str,
        offset: u64,
        len: u64,
        errno: u32,
    },
    #[error(
        "NBD {op} at offset {offset} length {len} reaches past the end of the export ({size} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("the export does not support {0}")]
    Unsupported(&'static str),
    #[error("the export is read-only")]
    ReadOnly,
    #[error("the NBD connection broke earlier ({0}); reconnect")]
    Broken(String),
}

impl NbdError {
    /// The errno a file-system front end should answer for this error.
    pub fn errno(&self) -> i32 {
        match self {
            NbdError::Command { errno, .. } => match *errno {
                1 => libc::EPERM,
                5 => libc::EIO,
                12 => libc::ENOMEM,
                22 => libc::EINVAL,
                28 => libc::ENOSPC,
                75 => libc::EOVERFLOW,
                95 => libc::EOPNOTSUPP,
                108 => libc::ESHUTDOWN,
                _ => libc::EIO,
            },
            NbdError::OutOfRange { .. } => libc::EINVAL,
            NbdError::Unsupported(_) => libc::EOPNOTSUPP,
            NbdError::ReadOnly => libc::EROFS,
            _ => libc::EIO,
        }
    }
}

fn errno_name(e: u32) -> &'static str {
    match e {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => "unknown error",
    }
}

fn rep_err_name(code: u32) -> &'static str {
    match code & !REP_FLAG_ERROR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN (no such export)",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        10 => "NBD_REP_ERR_EXT_HEADER_REQD",
        _ => "unknown NBD_REP_ERR",
    }
}

pub type Result<T> = std::result::Result<T, NbdError>;

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

struct Conn {
    stream: Box<dyn Stream>,
    next_handle: u64,
    /// Why the connection cannot be used any more (it is redialed when reconnecting is on).
    broken: Option<String>,
    /// [`Client::disconnect`] was called: never redial.
    closed: bool,
}

/// One connection to one export.
pub struct Client {
    conn: Mutex<Conn>,
    uri: NbdUri,
    /// How long to keep redialing after the connection broke (None: fail at once).
    reconnect: Option<Duration>,
    export: String,
    size: u64,
    flags: Flags,
    max_request: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("export", &self.export)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

impl Client {
    /// Connects to the server and export an NBD URI names.
    pub fn connect(uri: &NbdUri) -> Result<Client> {
        let (stream, size, flags, max_block) = open(uri)?;
        Ok(Client::new(stream, uri.clone(), size, flags, max_block))
    }

    /// Parses `uri` and connects.
    pub fn connect_uri(uri: &str) -> Result<Client> {
        Client::connect(&NbdUri::parse(uri)?)
    }

    pub fn connect_unix(socket: &std::path::Path, export: &str) -> Result<Client> {
        Client::connect(&NbdUri::Unix {
            socket: socket.to_path_buf(),
            export: export.to_string(),
        })
    }

    /// `host`, `port`: as in `nbd://HOST:PORT/EXPORT` (names are resolved).
    pub fn connect_tcp(host: &str, port: u16, export: &str) -> Result<Client> {
        Client::connect(&NbdUri::Tcp {
            host: host.to_string(),
            port,
            export: export.to_string(),
        })
    }

    /// When the connection breaks (server restarted, connection closed), redial the same URI
    /// for up to `window` and resend the request that failed, instead of failing every later
    /// call. Requests wait meanwhile. The export must come back with the same size. Resending
    /// is safe: reads and writes are idempotent, and a FLUSH on the new connection covers the
    /// writes the server acknowledged before (NBD_FLAG_CAN_MULTI_CONN semantics of tandem's
    /// exports; with other servers a write acknowledged but not flushed before a server crash
    /// may be lost, as with any NBD client).
    pub fn with_reconnect(mut self, window: Duration) -> Client {
        self.reconnect = Some(window);
        self
    }

    /// The URI this client dials.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    fn new(
        stream: Box<dyn Stream>,
        uri: NbdUri,
        size: u64,
        flags: u16,
        max_block: Option<u32>,
    ) -> Client {
        let max_request = match max_block {
            Some(m) if m >= 512 => m.min(DEFAULT_MAX_REQUEST),
            _ => DEFAULT_MAX_REQUEST,
        };
        Client {
            conn: Mutex::new(Conn {
                stream,
                next_handle: 1,
                broken: None,
                closed: false,
            }),
            export: uri.export().to_string(),
            uri,
            reconnect: None,
            size,
            flags: Flags(flags),
            max_request,
        }
    }

    pub fn export(&self) -> &str {
        &self.export
    }
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn flags(&self) -> Flags {
        self.flags
    }
    pub fn read_only(&self) -> bool {
        self.flags.read_only()
    }
    /// Largest single request sent (larger calls are split).
    pub fn max_request(&self) -> u32 {
        self.max_request
    }

    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(NbdError::OutOfRange {
                op,
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check("READ", offset, buf.len() as u64)?;
        let max = self.max_request as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let off = offset + done as u64;
            self.request(
                CMD_READ,
                0,
                off,
                n as u32,
                &[],
                Some(&mut buf[done..done + n]),
            )?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` the server makes it durable before answering.
    pub fn write(&self, buf: &[u8], offset: u64, fua: bool) -> Result<()> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        self.check("WRITE", offset, buf.len() as u64)?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        let max = self.max_request as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let off = offset + done as u64;
            self.request(CMD_WRITE, flags, off, n as u32, &buf[done..done + n], None)?;
            done += n;
        }
        Ok(())
    }

    fn fua_flag(&self) -> Result<u16> {
        if self.flags.can_fua() {
            Ok(CMD_FLAG_FUA)
        } else {
            Err(NbdError::Unsupported("FUA"))
        }
    }

    /// Makes every completed write durable. A server that does not advertise FLUSH has no
    /// volatile cache to flush, so this succeeds at once there.
    pub fn flush(&self) -> Result<()> {
        if !self.flags.can_flush() {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[], None)
    }

    /// Discards a range (the server may ignore it; afterwards the content is unspecified unless
    /// the server documents otherwise).
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        if !self.flags.can_trim() {
            return Err(NbdError::Unsupported("TRIM"));
        }
        self.check("TRIM", offset, len)?;
        self.ranged(CMD_TRIM, 0, offset, len)
    }

    /// Makes a range read as zeroes; with `no_hole` the server must keep it allocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, no_hole: bool) -> Result<()> {
        if self.read_only() {
            return Err(NbdError::ReadOnly);
        }
        if !self.flags.can_write_zeroes() {
            return Err(NbdError::Unsupported("WRITE_ZEROES"));
        }
        self.check("WRITE_ZEROES", offset, len)?;
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len)
    }

    fn ranged(&self, cmd: u16, flags: u16, offset: u64, len: u64) -> Result<()> {
        // Lengths are 32-bit on the wire; stay block aligned when splitting.
        const CHUNK: u64 = 1 << 30;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.request(cmd, flags, offset + done, n as u32, &[], None)?;
            done += n;
        }
        Ok(())
    }

    /// Sends NBD_CMD_DISC and closes the connection. Dropping the client does the same.
    pub fn disconnect(&self) {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if c.closed {
            return;
        }
        c.closed = true;
        if c.broken.is_none() {
            let h = c.next_handle;
            let _ = send_request(&mut c.stream, CMD_DISC, 0, h, 0, 0, &[]);
            let _ = c.stream.flush();
        }
        c.broken = Some("disconnected".into());
    }

    fn request(
        &self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        mut read_into: Option<&mut [u8]>,
    ) -> Result<()> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(why) = c.broken.clone() {
                match self.reconnect {
                    Some(window) if !c.closed => self.redial(&mut c, &why, window)?,
                    _ => return Err(NbdError::Broken(why)),
                }
            }
            let handle = c.next_handle;
            c.next_handle = c.next_handle.wrapping_add(1);
            match exchange(
                &mut c.stream,
                cmd,
                flags,
                handle,
                offset,
                len,
                payload,
                read_into.as_deref_mut(),
            ) {
                Ok(0) => return Ok(()),
                Ok(errno) => {
                    return Err(NbdError::Command {
                        op: cmd_name(cmd),
                        offset,
                        len: len as u64,
                        errno,
                    });
                }
                Err(e) => {
                    c.broken = Some(e.to_string());
                    if self.reconnect.is_none() {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Dials the URI again until it answers with the same export size or `window` passed.
    fn redial(&self, c: &mut Conn, why: &str, window: Duration) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match open(&self.uri) {
                Ok((stream, size, flags, _)) => {
                    if size != self.size {
                        return Err(NbdError::Broken(format!(
                            "{why}; the export came back with {size} bytes instead of {}",
                            self.size
                        )));
                    }
                    if flags & Flags::READ_ONLY != 0 && !self.flags.read_only() {
                        return Err(NbdError::Broken(format!(
                            "{why}; the export came back read-only"
                        )));
                    }
                    c.stream = stream;
                    c.broken = None;
                    return Ok(());
                }
                Err(e) if start.elapsed() >= window => {
                    return Err(NbdError::Broken(format!(
                        "{why}; reconnecting to {} for {window:?} failed: {e}",
                        self.uri
                    )));
                }
                Err(_) => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.disconnect();
    }
}

type Opened = (Box<dyn Stream>, u64, u16, Option<u32>);

/// Dials `uri` and negotiates its export: (stream, size, transmission flags, max block size).
fn open(uri: &NbdUri) -> Result<Opened> {
    let s: Box<dyn Stream> =
        match uri {
            NbdUri::Unix { socket, .. } => Box::new(UnixStream::connect(socket).map_err(
                |source| NbdError::Connect {
                    target: socket.display().to_string(),
                    source,
                },
            )?),
            NbdUri::Tcp { host, port, .. } => {
                let target = if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                };
                let t = TcpStream::connect(&target)
                    .map_err(|source| NbdError::Connect { target, source })?;
                t.set_nodelay(true)?;
                Box::new(t)
            }
        };
    handshake(s, uri.export())
}

fn handshake(mut s: Box<dyn Stream>, export: &str) -> Result<Opened> {
    let magic = read_u64(&mut s)?;
    if magic != NBDMAGIC {
        return Err(NbdError::Protocol(format!(
            "not an NBD server (greeting {magic:#018x})"
        )));
    }
    let second = read_u64(&mut s)?;
    if second != IHAVEOPT {
        return Err(NbdError::Protocol(
            "the server speaks the oldstyle handshake, which is not supported".into(),
        ));
    }
    let hflags = read_u16(&mut s)?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol(
            "the server does not offer fixed newstyle negotiation".into(),
        ));
    }
    let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
    let cflags: u32 = FLAG_FIXED_NEWSTYLE as u32 | if no_zeroes { 2 } else { 0 };
    s.write_all(&cflags.to_be_bytes())?;

    // NBD_OPT_GO: name length, name, and the information requests.
    let mut data = Vec::with_capacity(8 + export.len());
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(&mut s, OPT_GO, &data)?;

    let mut size_flags: Option<(u64, u16)> = None;
    let mut max_block: Option<u32> = None;
    loop {
        let (rtype, payload) = read_option_reply(&mut s, OPT_GO)?;
        match rtype {
            REP_ACK => break,
            REP_INFO => {
                if payload.len() < 2 {
                    return Err(NbdError::Protocol("NBD_REP_INFO too short".into()));
                }
                let itype = u16::from_be_bytes([payload[0], payload[1]]);
                match itype {
                    INFO_EXPORT if payload.len() == 12 => {
                        let size = u64::from_be_bytes(payload[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes([payload[10], payload[11]]);
                        size_flags = Some((size, flags));
                    }
                    INFO_BLOCK_SIZE if payload.len() == 14 => {
                        let max = u32::from_be_bytes(payload[10..14].try_into().unwrap());
                        max_block = Some(max);
                    }
                    INFO_EXPORT | INFO_BLOCK_SIZE => {
                        return Err(NbdError::Protocol(format!(
                            "NBD_REP_INFO type {itype} with {} bytes",
                            payload.len()
                        )));
                    }
                    _ => {} // NAME, DESCRIPTION, future types: ignore.
                }
            }
            t if t == REP_FLAG_ERROR | 1 => {
                // NBD_REP_ERR_UNSUP: a server without GO; fall back to EXPORT_NAME, whose
                // failure is a disconnect (no message).
                return export_name(s, export, no_zeroes);
            }
            t if t & REP_FLAG_ERROR != 0 => {
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    code: t,
                    kind: rep_err_name(t),
                    message: String::from_utf8_lossy(&payload).trim().to_string(),
                });
            }
            t => {
                return Err(NbdError::Protocol(format!(
                    "unexpected reply type {t:#x} to NBD_OPT_GO"
                )));
            }
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| {
        NbdError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
    })?;
    Ok((s, size, flags, max_block))
}

fn export_name(mut s: Box<dyn Stream>, export: &str, no_zeroes: bool) -> Result<Opened> {
    send_option(&mut s, OPT_EXPORT_NAME, export.as_bytes())?;
    let size = read_u64(&mut s).map_err(|e| match e {
        NbdError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => NbdError::Refused {
            export: export.to_string(),
            code: 0,
            kind: "disconnected after NBD_OPT_EXPORT_NAME",
            message: "the export probably does not exist".into(),
        },
        e => e,
    })?;
    let flags = read_u16(&mut s)?;
    if !no_zeroes {
        let mut z = [0u8; 124];
        s.read_exact(&mut z)?;
    }
    Ok((s, size, flags, None))
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        _ => "command",
    }
}

/// One request and its simple reply. `Ok(errno)`: the server's answer (0 = success). `Err`:
/// the connection is no longer usable.
#[allow(clippy::too_many_arguments)]
fn exchange(
    s: &mut Box<dyn Stream>,
    cmd: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
    read_into: Option<&mut [u8]>,
) -> Result<u32> {
    send_request(s, cmd, flags, handle, offset, len, payload)?;
    let mut hdr = [0u8; 16];
    s.read_exact(&mut hdr)?;
    let magic = u32::from_be_bytes(hdr[0..4].try_into().unwrap());
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "reply magic {magic:#010x} (structured replies were not negotiated)"
        )));
    }
    let errno = u32::from_be_bytes(hdr[4..8].try_into().unwrap());
    let got = u64::from_be_bytes(hdr[8..16].try_into().unwrap());
    if got != handle {
        return Err(NbdError::Protocol(format!(
            "reply for handle {got}, expected {handle}"
        )));
    }
    if errno == 0
        && let Some(buf) = read_into
    {
        s.read_exact(buf)?;
    }
    Ok(errno)
}

fn send_request(
    s: &mut Box<dyn Stream>,
    cmd: u16,
    flags: u16,
    handle: u64,
    offset: u64,
    len: u32,
    payload: &[u8],
) -> Result<()> {
    let mut req = [0u8; 28];
    req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    req[4..6].copy_from_slice(&flags.to_be_bytes());
    req[6..8].copy_from_slice(&cmd.to_be_bytes());
    req[8..16].copy_from_slice(&handle.to_be_bytes());
    req[16..24].copy_from_slice(&offset.to_be_bytes());
    req[24..28].copy_from_slice(&len.to_be_bytes());
    if payload.is_empty() {
        s.write_all(&req)?;
    } else if payload.len() <= 64 << 10 {
        let mut v = Vec::with_capacity(28 + payload.len());
        v.extend_from_slice(&req);
        v.extend_from_slice(payload);
        s.write_all(&v)?;
    } else {
        s.write_all(&req)?;
        s.write_all(payload)?;
    }
    s.flush()?;
    Ok(())
}

fn send_option(s: &mut Box<dyn Stream>, opt: u32, data: &[u8]) -> Result<()> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)?;
    s.flush()?;
    Ok(())
}

fn read_option_reply(s: &mut Box<dyn Stream>, opt: u32) -> Result<(u32, Vec<u8>)> {
    let magic = read_u64(s)?;
    if magic != REPLY_MAGIC {
        return Err(NbdError::Protocol(format!(
            "option reply magic {magic:#018x}"
        )));
    }
    let got = read_u32(s)?;
    if got != opt {
        return Err(NbdError::Protocol(format!(
            "reply to option {got}, expected {opt}"
        )));
    }
    let rtype = read_u32(s)?;
    let len = read_u32(s)?;
    if len > MAX_OPTION_REPLY {
        return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((rtype, payload))
}

fn read_u64(s: &mut Box<dyn Stream>) -> Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}
fn read_u32(s: &mut Box<dyn Stream>) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u16(s: &mut Box<dyn Stream>) -> Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn block_error(op: &'static str, offset: u64, len: u64, e: NbdError) -> BlockError {
    let kind = match &e {
        NbdError::OutOfRange { .. } => ErrorKind::OutOfRange,
        NbdError::Unsupported(_) => ErrorKind::Unsupported,
        NbdError::Command { errno: 28, .. } => ErrorKind::NoSpace,
        NbdError::Command { errno: 95, .. } => ErrorKind::Unsupported,
        _ => ErrorKind::Io,
    };
    let mut b = BlockError::new(kind, op, offset, len);
    b.source = Some(io::Error::other(e));
    b
}

impl BlockDevice for Client {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.read(buf, offset)
            .map_err(|e| block_error("read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> tandem_blockdev::Result<()> {
        self.write(buf, offset, false)
            .map_err(|e| block_error("write", offset, buf.len() as u64, e))
    }

    fn flush(&self) -> tandem_blockdev::Result<()> {
        Client::flush(self).map_err(|e| block_error("flush", 0, 0, e))
    }

    fn trim(&self, offset: u64, len: u64) -> tandem_blockdev::Result<()> {
        Client::trim(self, offset, len).map_err(|e| block_error("trim", offset, len, e))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_deallocate: bool,
    ) -> tandem_blockdev::Result<()> {
        Client::write_zeroes(self, offset, len, !may_deallocate)
            .map_err(|e| block_error("write_zeroes", offset, len, e))
    }

    /// Block status is not queried over the wire (it needs structured replies): the whole range
    /// is reported as allocated data, which is always a correct answer.
    fn block_status(&self, offset: u64, len: u64) -> tandem_blockdev::Result<Vec<Extent>> {
        self.check("block_status", offset, len)
            .map_err(|e| block_error("block_status", offset, len, e))?;
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }
}

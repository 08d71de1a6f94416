//! Free TCP ports for daemons that bind them a moment later (`tandem up` writes them into the
//! agents' configs; the end-to-end tests include this file for their controllers' ports).
//!
//! A port is taken below the kernel's ephemeral range when possible: a port the kernel handed
//! out (`bind(0)`) is soon handed out again, e.g. as the source port of some outgoing
//! connection, and then the daemon's bind fails; below that range only another explicit bind
//! can take it. Between choosing a port and the daemon binding it, nobody else may choose it:
//! not this process (a set of the ports it handed out) and not another process doing the same
//! (a one-byte record lock at offset `port` of a shared lock file, held until this process
//! exits; the kernel drops it with the process).

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

struct Handed {
    ports: BTreeSet<u16>,
    lock: Option<File>,
}

static HANDED: Mutex<Handed> = Mutex::new(Handed {
    ports: BTreeSet::new(),
    lock: None,
});

/// A TCP port on 127.0.0.1 that is free now and that no other caller of this function, in this
/// process or another one on this machine, gets while this process lives.
pub fn free_port() -> io::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let mut handed = HANDED.lock().unwrap_or_else(|e| e.into_inner());
    if handed.lock.is_none() {
        let path = std::env::temp_dir().join("tandem-ports.lock");
        handed.lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok();
    }
    if low > 12000 {
        use std::hash::{BuildHasher, Hasher};
        for attempt in 0..256u32 {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u32(attempt);
            let port = 10000 + (h.finish() % u64::from(low - 10000)) as u16;
            if handed.ports.contains(&port) {
                continue;
            }
            if let Some(lock) = &handed.lock
                && !lock_byte(lock, port)
            {
                continue;
            }
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                handed.ports.insert(port);
                return Ok(port);
            }
            // Someone else holds the port for good; leave the lock byte held (harmless).
        }
    }
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if handed.ports.insert(port) {
            return Ok(port);
        }
    }
}

/// Takes an exclusive record lock on byte `offset` of `file` without waiting; false when
/// another process holds it (or locking is not possible there).
fn lock_byte(file: &File, offset: u16) -> bool {
    // SAFETY: a zeroed flock is a valid value; the fields the call reads are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = libc::off_t::from(offset);
    fl.l_len = 1;
    // SAFETY: fcntl(F_SETLK) on an open descriptor with a valid flock struct.
    unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &fl) == 0 }
}

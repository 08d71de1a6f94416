//! `tandem volume mount NAME DIR`: the FUSE file view of a volume (see `docs/fuse.md`). The
//! view is an NBD client of the volume's export, like any consumer; it runs in the foreground
//! until Ctrl-C / SIGTERM (then unmounts) or until DIR is unmounted from outside.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use tandem_api::ConnectInfo;
use tandem_fuse::{FileEntry, Options, Unmounted};
use tandem_nbd_client::Client as NbdClient;
use tandem_types::format_size;

use crate::client::Client;

/// How long I/O waits for the export to come back after the connection broke (agent restart)
/// before it fails with EIO.
const RECONNECT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Serialize)]
struct MountInfo<'a> {
    volume: &'a str,
    node: &'a str,
    uri: &'a str,
    dir: String,
    read_only: bool,
    table: &'a str,
    files: Vec<FileInfo<'a>>,
    warnings: &'a [String],
}

#[derive(Serialize)]
struct FileInfo<'a> {
    name: &'a str,
    path: String,
    size_bytes: u64,
    offset_bytes: u64,
    partition: Option<u32>,
}

fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Blocks SIGINT/SIGTERM/SIGHUP in this thread (and the threads it starts) and returns the set,
/// for a dedicated thread to `sigwait` on.
fn block_signals() -> libc::sigset_t {
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask only changes
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

pub fn run(
    client: &Client,
    json: bool,
    name: &str,
    dir: &Path,
    node: Option<&str>,
    read_only: bool,
) -> Result<()> {
    // Before any thread exists, so every thread inherits the mask and only the waiter below
    // takes the signals.
    let set = block_signals();
    // main() restores SIGPIPE's default for client commands; this one writes to an NBD
    // socket that may close under it (agent restart) and must see EPIPE, not die.
    // SAFETY: changing one signal's disposition; no handler runs.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    let mut path = format!("/v1/volumes/{}/connect", segment(name));
    if let Some(n) = node {
        path.push_str(&format!("?node={}", segment(n)));
    }
    let info: ConnectInfo = client.get(&path)?;
    let nbd = NbdClient::connect_uri(&info.uri)
        .with_context(|| format!("connecting to the export of volume '{name}'"))?
        .with_reconnect(RECONNECT);
    let mounted = tandem_fuse::mount(
        nbd,
        name,
        dir,
        &Options {
            read_only,
            fsname: None,
        },
    )
    .with_context(|| format!("mounting volume '{name}' on {}", dir.display()))?;
    let dir = mounted.dir().to_path_buf();
    let layout = mounted.layout().clone();

    let out = MountInfo {
        volume: name,
        node: &info.node,
        uri: &info.uri,
        dir: dir.display().to_string(),
        read_only: mounted.read_only(),
        table: &layout.table,
        files: layout
            .files
            .iter()
            .map(|f: &FileEntry| FileInfo {
                name: &f.name,
                path: dir.join(&f.name).display().to_string(),
                size_bytes: f.size_bytes,
                offset_bytes: f.offset_bytes,
                partition: f.partition,
            })
            .collect(),
        warnings: &layout.warnings,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "Mounted volume {name} (node {}, partition table: {}) on {}{}:",
            info.node,
            layout.table,
            dir.display(),
            if mounted.read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        let width = out.files.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &out.files {
            println!("  {:width$}  {}", f.name, format_size(f.size_bytes));
        }
        for w in &layout.warnings {
            println!("warning: {w}");
        }
        println!(
            "Serving until Ctrl-C, SIGTERM or `fusermount3 -u {}`.",
            dir.display()
        );
    }
    std::io::stdout().flush()?;

    // The signal waiter unmounts; the kernel then ends the session loop below.
    let waiter_dir = dir.clone();
    std::thread::spawn(move || {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: set is a valid, initialised signal set; sig is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            match tandem_fuse::unmount(&waiter_dir) {
                Ok(Unmounted::Done) => {}
                Ok(Unmounted::Lazy) => eprintln!(
                    "{} is busy (open files or a loop device): detached; serving until the last user closes it",
                    waiter_dir.display()
                ),
                Err(e) => eprintln!("error: {e}"),
            }
        }
    });
    mounted
        .run()
        .with_context(|| format!("serving {}", dir.display()))?;
    eprintln!("{} unmounted", dir.display());
    Ok(())
}

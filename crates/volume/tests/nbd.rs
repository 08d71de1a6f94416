//! The driver's block device served by the real NBD server on a unix socket, driven by
//! qemu-io; the written data must land byte-identical in both replicas.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use tandem_nbd::{Export, ExportRegistry, Server};

struct One(Arc<Export>);

impl ExportRegistry for One {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        (name == self.0.name).then(|| self.0.clone())
    }
    fn list(&self) -> Vec<String> {
        vec![self.0.name.clone()]
    }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("qemu-io").is_file()))
        .unwrap_or(false);
    assert!(
        on_path,
        "qemu-io is not installed; ./scripts/test installs the NBD test clients (qemu-utils)"
    );
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let out = c.output().expect("cannot run qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success()
            && !text.contains("fail")
            && !text.contains("error")
            && !text.contains("Error"),
        "qemu-io {cmds:?} reported a problem:\n{text}"
    );
    text
}

#[test]
fn qemu_io_through_nbd_lands_on_both_replicas() {
    let size = 16 * MIB;
    let c = Cluster::start(2, 1, size);
    wait_for(20, "promotion", || c.d(1).promote().ok());
    let export = Arc::new(Export {
        name: VOL.into(),
        description: "replicated".into(),
        device: c.d(1).block_device(),
        read_only: false,
        multi_conn: true,
    });
    let server = Server::new(Arc::new(One(export)));
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("nbd.sock");
    let listener = {
        let _g = c.rt.enter();
        tokio::net::UnixListener::bind(&sock).unwrap()
    };
    c.rt.spawn(server.clone().serve_unix(listener));
    let uri = format!("nbd+unix:///{VOL}?socket={}", Path::new(&sock).display());

    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 1M",
            "write -P 0x33 3000 5000",
            "write -f -P 0x77 8M 64k",
            "write -z 10M 128k",
            "flush",
        ],
    );
    let out = qemu_io(
        &uri,
        &[
            "read -P 0x5a 0 3000",
            "read -P 0x33 3000 5000",
            "read -P 0x5a 8000 1040576",
            "read -P 0x77 8M 64k",
            "read -P 0 10M 128k",
            "read -P 0 12M 4k",
        ],
    );
    assert_eq!(out.matches("read ").count(), 6, "{out}");
    let (a, b) = (c.data(1), c.data(2));
    assert!(a == b, "replicas differ after NBD writes");
    assert!(a[..3000].iter().all(|&x| x == 0x5a));
    assert!(a[3000..8000].iter().all(|&x| x == 0x33));
    server.shutdown();
}

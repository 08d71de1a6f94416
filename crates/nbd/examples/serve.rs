//! Serves one file over NBD for manual testing and benchmarks:
//! `cargo run --release -p tandem-nbd --example serve -- FILE SOCKET [EXPORT]`.

use std::sync::Arc;

use tandem_blockdev::FileDevice;
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

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let workers = std::env::var("NBD_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(tandem_nbd::server::default_workers);
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: serve FILE SOCKET [EXPORT]");
        std::process::exit(2);
    }
    let device = Arc::new(FileDevice::open(std::path::Path::new(&args[1]))?);
    let name = args.get(3).cloned().unwrap_or_else(|| "bench".into());
    let server = Server::with_workers(
        Arc::new(One(Arc::new(Export {
            name,
            description: String::new(),
            device,
            read_only: false,
            multi_conn: true,
        }))),
        workers,
    );
    let _ = std::fs::remove_file(&args[2]);
    let listener = tokio::net::UnixListener::bind(&args[2])?;
    server.serve_unix(listener).await
}

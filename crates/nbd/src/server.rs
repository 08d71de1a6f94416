//! Async NBD server (tokio) over the sans-IO codec. STUB API.

use std::sync::Arc;

use tandem_blockdev::BlockDevice;

/// One exported device.
pub struct Export {
    /// Export name clients ask for (the volume name).
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// Advertise NBD_FLAG_CAN_MULTI_CONN (true when every connection shares one backing store
    /// whose flush covers all connections' completed writes).
    pub multi_conn: bool,
}

/// Where the server looks up exports; the agent implements it over its replica table, so exports
/// can come and go while the server runs.
pub trait ExportRegistry: Send + Sync + 'static {
    fn lookup(&self, name: &str) -> Option<Arc<Export>>;
    /// Names for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
}

/// The server: shared by every listener; counts connections per export.
pub struct Server {
    #[allow(dead_code)]
    registry: Arc<dyn ExportRegistry>,
}

impl Server {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Arc<Self> {
        Arc::new(Server { registry })
    }

    /// Accepts clients until the listener fails; each client runs in its own task.
    pub async fn serve_unix(
        self: Arc<Self>,
        _listener: tokio::net::UnixListener,
    ) -> std::io::Result<()> {
        unimplemented!("stub")
    }

    pub async fn serve_tcp(
        self: Arc<Self>,
        _listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        unimplemented!("stub")
    }

    /// Clients currently connected to (past the handshake of) `export`.
    pub fn connections(&self, _export: &str) -> u32 {
        0
    }
}

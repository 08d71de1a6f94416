//! The agent: one per host. Owns the host's pools and the replicas in them, exports every
//! replica over NBD under its volume name, and syncs with the controller.
//!
//! * Start: take `state_dir/agent.lock` (flock), scan every pool directory for replicas
//!   (`tandem_meta` file layout), recover interrupted creations/deletions, open and export
//!   every healthy replica. A replica whose metadata is unreadable is reported Failed with its
//!   error, never served and never deleted.
//! * Data plane: the NBD server (`tandem_nbd`) looks exports up in the replica table, so they
//!   appear and disappear while it runs. It never waits for the controller.
//! * Control plane: a loop posts an [`tandem_api::AgentReport`] to
//!   `{controller}/v1/agents/{node}/sync?wait_ms=5000` and applies the returned
//!   [`tandem_api::DesiredState`]: creates replicas listed `present: true`, deletes those
//!   listed `present: false` with the same volume uuid, never touches anything unlisted.
//!   The first cluster id seen is remembered in `state_dir/cluster_id`; a controller of
//!   another cluster is refused. The node id the controller assigned is kept in
//!   `state_dir/node_id` (and written into new replicas' metadata), the cluster secret in
//!   `state_dir/cluster_secret` (mode 0600, never replaced once written).
//! * Replication (experimental): the agent binds `repl_listen` at start and reports the bound
//!   address; once it has a node id, a cluster and the cluster secret, and the controller
//!   wants a replica with peers here, the listener is handed to one
//!   `tandem_volume::NodeReplication` and each such replica runs a `VolumeDriver` (see `repl`).

mod repl;
mod replicas;
mod sync;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tandem_api::NodeRole;
use tandem_nbd::server::Server;
use tracing::{error, info, warn};

/// `agent.toml`. Every key is also a flag of `tandem agent run`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Node name, unique in the cluster.
    pub node: String,
    /// Controller base URL, e.g. `http://127.0.0.1:7450`.
    pub controller: String,
    /// Address peers and TCP clients reach this node on.
    #[serde(default = "default_address")]
    pub address: String,
    #[serde(default)]
    pub role: NodeRole,
    /// Agent-local state (identity, lock file).
    pub state_dir: PathBuf,
    /// Unix socket for NBD clients.
    pub nbd_socket: PathBuf,
    /// Optional `host:port` for NBD over TCP (must be loopback without TLS).
    #[serde(default)]
    pub nbd_tcp: Option<String>,
    /// `host:port` to listen on for replication links from peers (default: `address` port 0,
    /// i.e. a port the system picks; the bound address is reported to the controller).
    #[serde(default)]
    pub repl_listen: Option<String>,
    /// `host:port` peers should dial to reach this node's replication listener, when it is not
    /// the bound address (NAT, a forwarding proxy). Default: the bound address.
    #[serde(default)]
    pub repl_advertise: Option<String>,
    /// Threads running NBD requests against the volumes (shared by all exports). A replicated
    /// write holds its thread for a network round trip, so this bounds the replicated
    /// requests in flight on this node (default 64).
    #[serde(default = "default_nbd_io_threads")]
    pub nbd_io_threads: usize,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

fn default_nbd_io_threads() -> usize {
    DEFAULT_NBD_IO_THREADS
}

/// Default of [`Config::nbd_io_threads`].
pub const DEFAULT_NBD_IO_THREADS: usize = 64;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Directory holding the pool's data and metadata files.
    pub path: PathBuf,
}

fn default_address() -> String {
    "127.0.0.1".to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(
        "another agent is already running with state directory {0} (lock file is held); stop it first"
    )]
    Locked(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

impl AgentError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        AgentError::Io {
            context: context.into(),
            source,
        }
    }
}

/// How long shutdown waits for NBD clients' in-flight requests before flushing anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Name of the lock file in `state_dir`.
pub const LOCK_FILE: &str = "agent.lock";
/// Name of the file in `state_dir` remembering the cluster this agent belongs to.
pub const CLUSTER_ID_FILE: &str = "cluster_id";
/// Name of the file in `state_dir` holding the node id the controller assigned.
pub const NODE_ID_FILE: &str = "node_id";
/// Name of the file in `state_dir` holding the cluster secret (hex, mode 0600).
pub const CLUSTER_SECRET_FILE: &str = "cluster_secret";
/// Name of the file in `state_dir` holding the last desired state applied (without the
/// secret): replicated volumes restart from it when the controller is unreachable.
pub const DESIRED_FILE: &str = "desired.json";

/// State shared by the sync loop and the NBD registry.
pub(crate) struct Agent {
    pub config: Config,
    pub table: replicas::SharedTable,
    pub server: Arc<Server>,
    pub cluster_id: Mutex<Option<String>>,
    /// Actual TCP address (when `nbd_tcp` asks for port 0, the port picked).
    pub nbd_tcp_bound: Option<String>,
    /// The replication listener, bound at start; taken by the replication transport.
    pub repl_listener: Mutex<Option<std::net::TcpListener>>,
    /// The address peers reach the replication listener on (reported to the controller).
    pub repl_addr: Option<String>,
    /// The node id the controller assigned (persisted in `state_dir/node_id`).
    pub node_id: Mutex<Option<u8>>,
    /// Diskless placements (witnesses) the controller wants here: nothing on disk.
    pub diskless: replicas::DisklessSet,
    /// Replication transport and volume drivers of multi-replica volumes (shared with the
    /// NBD registry for auto-promote).
    pub repl: Arc<repl::Replication>,
}

impl Agent {
    pub fn ctx(&self) -> replicas::Ctx<'_> {
        replicas::Ctx {
            node: &self.config.node,
            node_id: *self.node_id.lock().unwrap_or_else(|p| p.into_inner()),
            pools: &self.config.pools,
            table: &self.table,
            server: &self.server,
            diskless: &self.diskless,
            repl: &self.repl,
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    validate(&config)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        AgentError::io(
            format!("creating state directory {}", config.state_dir.display()),
            e,
        )
    })?;
    let lock = lock_state_dir(&config.state_dir)?;
    info!(node = %config.node, state_dir = %config.state_dir.display(), "agent starting");

    let table: replicas::SharedTable = Arc::new(RwLock::new(replicas::Table::default()));
    {
        let (pools, table) = (config.pools.clone(), table.clone());
        tokio::task::spawn_blocking(move || replicas::scan(&pools, &table))
            .await
            .map_err(|e| AgentError::Other(format!("pool scan failed: {e}")))?;
    }
    let cluster_id = load_cluster_id(&config.state_dir, &table)?;
    let node_id = load_node_id(&config.state_dir)?;
    let (repl_listener, repl_addr) = bind_repl(&config)?;
    info!(addr = %repl_addr, node_id = ?node_id, "replication listener bound (accepting once the node has an id, a cluster and a multi-replica volume)");

    let repl = Arc::new(repl::Replication::default());
    let server = Server::with_workers(
        Arc::new(replicas::Registry(table.clone(), repl.clone())),
        config.nbd_io_threads.clamp(1, 1024),
    );
    let unix = bind_unix(&config.nbd_socket)?;
    let tcp = match &config.nbd_tcp {
        Some(addr) => Some(bind_tcp(addr).await?),
        None => None,
    };
    let nbd_tcp_bound = tcp
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| a.to_string());

    let mut listeners = Vec::new();
    listeners.push(spawn_listener(
        "unix",
        tokio::spawn(server.clone().serve_unix(unix)),
    ));
    info!(socket = %config.nbd_socket.display(), "serving NBD on unix socket");
    if let Some(l) = tcp {
        info!(
            addr = nbd_tcp_bound.as_deref().unwrap_or("?"),
            "serving NBD on TCP"
        );
        listeners.push(spawn_listener(
            "tcp",
            tokio::spawn(server.clone().serve_tcp(l)),
        ));
    }

    let agent = Arc::new(Agent {
        config,
        table: table.clone(),
        server,
        cluster_id: Mutex::new(cluster_id),
        nbd_tcp_bound,
        repl_listener: Mutex::new(Some(repl_listener)),
        repl_addr: Some(repl_addr),
        node_id: Mutex::new(node_id),
        diskless: Default::default(),
        repl,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sync_task = tokio::spawn(sync::sync_loop(agent.clone(), stop_rx.clone()));
    let promote_task = tokio::spawn(sync::promote_loop(agent.clone(), stop_rx));

    shutdown.await;
    info!("agent shutting down");
    let _ = stop_tx.send(true);
    // Stop accepting and close client connections once their in-flight requests are answered.
    agent.server.shutdown();
    if let Err(e) = sync_task.await {
        error!("sync loop ended abnormally: {e}");
    }
    let _ = promote_task.await;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while agent.server.total_connections() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if agent.server.total_connections() > 0 {
        warn!(
            connections = agent.server.total_connections(),
            "NBD connections still open after the grace period"
        );
    }
    for l in &listeners {
        l.abort();
    }
    // Replicated volumes: demote a Primary, stop the drivers, close the links.
    agent.repl.shutdown(&agent).await;
    {
        let table = table.clone();
        let _ = tokio::task::spawn_blocking(move || replicas::flush_all(&table)).await;
    }
    // Last: the controller shows the node offline now, not after `offline_after_secs`.
    {
        let agent = agent.clone();
        let _ = tokio::task::spawn_blocking(move || sync::leave(&agent)).await;
    }
    match std::fs::remove_file(&agent.config.nbd_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", agent.config.nbd_socket.display()),
    }
    drop(lock);
    info!("agent stopped");
    Ok(())
}

fn validate(config: &Config) -> Result<(), AgentError> {
    tandem_types::validate_name("node", &config.node)
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let mut seen = std::collections::HashSet::new();
    for p in &config.pools {
        tandem_types::validate_name("pool", &p.name)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        if !seen.insert(p.name.as_str()) {
            return Err(AgentError::Config(format!(
                "pool '{}' is configured twice",
                p.name
            )));
        }
    }
    if config.controller.is_empty() {
        return Err(AgentError::Config("controller URL is empty".into()));
    }
    Ok(())
}

/// Watches a listener task and logs how it ended; returns the handle to abort it.
fn spawn_listener(
    kind: &'static str,
    h: tokio::task::JoinHandle<std::io::Result<()>>,
) -> tokio::task::AbortHandle {
    let abort = h.abort_handle();
    tokio::spawn(async move {
        match h.await {
            Ok(Ok(())) => info!("NBD {kind} listener stopped"),
            Ok(Err(e)) => error!("NBD {kind} listener failed: {e}"),
            Err(e) if e.is_panic() => error!("NBD {kind} listener panicked"),
            Err(_) => {} // aborted at shutdown
        }
    });
    abort
}

/// An exclusive flock on `state_dir/agent.lock`, held for the life of the returned file.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File, AgentError> {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let path = state_dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| AgentError::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a valid open file descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(AgentError::Locked(state_dir.to_path_buf()));
        }
        return Err(AgentError::io(format!("locking {}", path.display()), e));
    }
    // The pid, for operators; the lock itself is what counts.
    let _ = f
        .set_len(0)
        .and_then(|_| writeln!(f, "{}", std::process::id()));
    Ok(f)
}

/// The remembered cluster id, or the one recorded in the replicas' metadata when the state
/// directory was lost.
fn load_cluster_id(
    state_dir: &Path,
    table: &replicas::SharedTable,
) -> Result<Option<String>, AgentError> {
    let path = state_dir.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Some(s.trim().to_string())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("reading {}", path.display()), e)),
    }
    let ids = replicas::cluster_ids(table);
    if let Some(first) = ids.first() {
        if ids.iter().any(|i| i != first) {
            warn!("replicas carry different cluster ids; adopting none until a controller is seen");
            return Ok(None);
        }
        info!(cluster_id = %first, "adopting the cluster id recorded in the replicas' metadata");
        save_cluster_id(state_dir, first)?;
        return Ok(Some(first.clone()));
    }
    Ok(None)
}

pub(crate) fn save_cluster_id(state_dir: &Path, id: &str) -> Result<(), AgentError> {
    let path = state_dir.join(CLUSTER_ID_FILE);
    let tmp = state_dir.join(format!("{CLUSTER_ID_FILE}.tmp"));
    let r = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{id}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    })();
    r.map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
}

/// Binds the NBD unix socket (mode 0660), replacing a stale socket file but never a live one
/// or a file that is not a socket.
fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, AgentError> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(AgentError::Config(format!(
                    "NBD socket {} is in use by another process",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                AgentError::io(format!("removing stale socket {}", path.display()), e)
            })?;
            info!(socket = %path.display(), "removed stale NBD socket");
        }
        Ok(_) => {
            return Err(AgentError::Config(format!(
                "NBD socket path {} exists and is not a socket",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("checking {}", path.display()), e)),
    }
    let l = tokio::net::UnixListener::bind(path)
        .map_err(|e| AgentError::io(format!("binding NBD socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| AgentError::io(format!("chmod {}", path.display()), e))?;
    Ok(l)
}

/// Binds NBD over TCP; only loopback addresses (no TLS yet).
async fn bind_tcp(addr: &str) -> Result<tokio::net::TcpListener, AgentError> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| AgentError::Config(format!("nbd_tcp '{addr}': {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(AgentError::Config(format!(
            "nbd_tcp '{addr}' resolves to no address"
        )));
    }
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(AgentError::Config(format!(
            "nbd_tcp '{addr}' ({a}) is not a loopback address: NBD over TCP is only served on loopback until TLS is supported"
        )));
    }
    tokio::net::TcpListener::bind(addrs[0])
        .await
        .map_err(|e| AgentError::io(format!("binding NBD TCP {addr}"), e))
}

/// Binds the replication listener (`repl_listen`, default `address:0`); returns it and the
/// address to advertise (`repl_advertise`, else the configured `address` when bound to an
/// unspecified IP, else the bound address).
fn bind_repl(config: &Config) -> Result<(std::net::TcpListener, String), AgentError> {
    let wanted = config
        .repl_listen
        .clone()
        .unwrap_or_else(|| format!("{}:0", config.address));
    let l = std::net::TcpListener::bind(&wanted)
        .map_err(|e| AgentError::io(format!("binding replication listener {wanted}"), e))?;
    let bound = l
        .local_addr()
        .map_err(|e| AgentError::io("replication listener address", e))?;
    let advertised = if let Some(a) = &config.repl_advertise {
        a.clone()
    } else if bound.ip().is_unspecified() {
        if config.address.contains(':') && !config.address.starts_with('[') {
            format!("[{}]:{}", config.address, bound.port())
        } else {
            format!("{}:{}", config.address, bound.port())
        }
    } else {
        bound.to_string()
    };
    Ok((l, advertised))
}

/// The node id remembered from the controller, if any.
fn load_node_id(state_dir: &Path) -> Result<Option<u8>, AgentError> {
    let path = state_dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => match s.trim().parse::<u8>() {
            Ok(id) => Ok(Some(id)),
            Err(e) => {
                warn!(
                    "{}: not a node id ({e}); waiting for the controller's",
                    path.display()
                );
                Ok(None)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::io(format!("reading {}", path.display()), e)),
    }
}

/// Writes `text` to `state_dir/name` crash-safely (temporary file, fsync, rename) with `mode`.
fn write_state_file(state_dir: &Path, name: &str, text: &str, mode: u32) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = state_dir.join(name);
    let tmp = state_dir.join(format!("{name}.tmp"));
    let r = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    })();
    r.map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn save_node_id(state_dir: &Path, id: u8) -> Result<(), AgentError> {
    write_state_file(state_dir, NODE_ID_FILE, &format!("{id}\n"), 0o644)
}

/// Stores the cluster secret the controller handed out, unless a secret is already stored:
/// an agent never replaces its secret silently (a different one is logged as an error and
/// ignored; remove the file by hand to take the controller's). Returns whether it was written.
pub(crate) fn store_cluster_secret(state_dir: &Path, hex: &str) -> Result<bool, AgentError> {
    let hex = hex.trim();
    if hex.len() < 32 || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(AgentError::Other(
            "the controller sent a cluster secret that is not hex of at least 16 bytes".into(),
        ));
    }
    let path = state_dir.join(CLUSTER_SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(have) if have.trim().eq_ignore_ascii_case(hex) => return Ok(false),
        Ok(_) => {
            return Err(AgentError::Other(format!(
                "{} holds a different cluster secret than the controller's; keeping it (remove \
                 the file to take the controller's secret)",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("reading {}", path.display()), e)),
    }
    write_state_file(state_dir, CLUSTER_SECRET_FILE, &format!("{hex}\n"), 0o600)?;
    Ok(true)
}

//! `tandem controller run` and `tandem agent run`: load the TOML config (every key also a flag),
//! write a pid file beside it, run until SIGINT/SIGTERM.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ControllerCmd {
    /// Run the controller in the foreground.
    Run(ControllerRunArgs),
    /// Print the OpenAPI document of the REST API.
    Openapi,
}

#[derive(Args, Debug)]
pub struct ControllerRunArgs {
    /// TOML config file; `controller.pid` is written beside it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `host:port` to serve the REST API on (overrides the config).
    #[arg(long)]
    pub listen: Option<String>,
    /// State store directory (overrides the config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Seconds without sync after which an agent shows offline (overrides the config).
    #[arg(long)]
    pub offline_after_secs: Option<u64>,
    /// Allow volumes with 2 or 3 replicas before the agents replicate (the replicas are NOT
    /// kept in sync yet; for developing the replication driver). Sets
    /// `experimental_replication = true`.
    #[arg(long)]
    pub experimental_replication: bool,
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent in the foreground.
    Run(AgentRunArgs),
}

#[derive(Args, Debug)]
pub struct AgentRunArgs {
    /// TOML config file; `agent.pid` is written beside it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Node name (overrides the config).
    #[arg(long)]
    pub node: Option<String>,
    /// Controller URL (overrides the config).
    #[arg(long = "controller-url")]
    pub controller_url: Option<String>,
    /// Address peers reach this node on (overrides the config).
    #[arg(long)]
    pub address: Option<String>,
    /// Agent state directory (overrides the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Unix socket for NBD (overrides the config).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// `host:port` for NBD over TCP (overrides the config).
    #[arg(long)]
    pub nbd_tcp: Option<String>,
    /// `host:port` to listen on for replication links (overrides the config; default
    /// `ADDRESS:0`).
    #[arg(long)]
    pub repl_listen: Option<String>,
    /// `host:port` peers dial to reach this node's replication listener (overrides the config;
    /// default: the bound address).
    #[arg(long)]
    pub repl_advertise: Option<String>,
    /// Threads running NBD requests (overrides the config; default 64): bounds the
    /// replicated requests in flight on this node.
    #[arg(long)]
    pub nbd_io_threads: Option<usize>,
    /// Add a pool: NAME=DIR (repeatable; adds to the config's pools).
    #[arg(long = "pool")]
    pub pools: Vec<String>,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

/// Removes the pid file when the daemon ends normally.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: PathBuf) -> Result<Self> {
        std::fs::write(&path, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(PidFile(path))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn controller(cmd: &ControllerCmd) -> Result<()> {
    let args = match cmd {
        ControllerCmd::Openapi => {
            println!("{}", tandem_controller::openapi_json());
            return Ok(());
        }
        ControllerCmd::Run(a) => a,
    };
    init_logging();
    let mut config: tandem_controller::Config = match &args.config {
        Some(p) => read_toml(p)?,
        None => {
            let (Some(listen), Some(data_dir)) = (&args.listen, &args.data_dir) else {
                bail!("give --config FILE, or at least --listen and --data-dir");
            };
            toml::from_str(&format!("listen = {listen:?}\ndata_dir = {data_dir:?}\n"))?
        }
    };
    if let Some(v) = &args.listen {
        config.listen = v.clone();
    }
    if let Some(v) = &args.data_dir {
        config.data_dir = v.clone();
    }
    if let Some(v) = args.offline_after_secs {
        config.offline_after_secs = v;
    }
    if args.experimental_replication {
        config.experimental_replication = true;
    }
    let _pid = match &args.config {
        Some(p) => Some(PidFile::write(sibling(p, "controller.pid"))?),
        None => None,
    };
    runtime()?
        .block_on(tandem_controller::run(config, shutdown_signal()))
        .context("controller failed")
}

pub fn agent(cmd: &AgentCmd) -> Result<()> {
    let AgentCmd::Run(args) = cmd;
    keep_large_buffers();
    init_logging();
    let mut config: tandem_agent::Config = match &args.config {
        Some(p) => read_toml(p)?,
        None => {
            let (Some(node), Some(state_dir), Some(sock)) =
                (&args.node, &args.state_dir, &args.nbd_socket)
            else {
                bail!("give --config FILE, or at least --node, --state-dir and --nbd-socket");
            };
            toml::from_str(&format!(
                "node = {node:?}\ncontroller = {:?}\nstate_dir = {state_dir:?}\nnbd_socket = {sock:?}\n",
                tandem_api::DEFAULT_CONTROLLER_URL
            ))?
        }
    };
    if let Some(v) = &args.node {
        config.node = v.clone();
    }
    if let Some(v) = &args.controller_url {
        config.controller = v.clone();
    }
    if let Some(v) = &args.address {
        config.address = v.clone();
    }
    if let Some(v) = &args.state_dir {
        config.state_dir = v.clone();
    }
    if let Some(v) = &args.nbd_socket {
        config.nbd_socket = v.clone();
    }
    if let Some(v) = &args.nbd_tcp {
        config.nbd_tcp = Some(v.clone());
    }
    if let Some(v) = &args.repl_listen {
        config.repl_listen = Some(v.clone());
    }
    if let Some(v) = &args.repl_advertise {
        config.repl_advertise = Some(v.clone());
    }
    if let Some(v) = args.nbd_io_threads {
        config.nbd_io_threads = v;
    }
    for p in &args.pools {
        let Some((name, dir)) = p.split_once('=') else {
            bail!("--pool takes NAME=DIR, got '{p}'");
        };
        config.pools.push(tandem_agent::PoolConfig {
            name: name.to_string(),
            path: PathBuf::from(dir),
        });
    }
    let _pid = match &args.config {
        Some(p) => Some(PidFile::write(sibling(p, "agent.pid"))?),
        None => None,
    };
    runtime()?
        .block_on(tandem_agent::run(config, shutdown_signal()))
        .context("agent failed")
}

fn sibling(config: &Path, name: &str) -> PathBuf {
    config
        .parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Replication payloads (a consumer write's size, typically up to 1-4 MiB) are allocated and
/// freed at the write rate. With glibc's defaults a buffer that size may be `mmap`ed and
/// unmapped, or its arena trimmed, each time: fresh pages are faulted in and zeroed by the
/// kernel for every payload (about 8 % of a Secondary's CPU at 1 MiB writes). Buffers up to
/// 4 MiB stay in the heap, and up to 64 MiB of freed memory at an arena's top is kept.
fn keep_large_buffers() {
    // SAFETY: mallopt only sets allocator parameters; called before the agent starts threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

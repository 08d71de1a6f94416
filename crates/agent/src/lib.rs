//! Agent. STUB: config and entry point the CLI codes against.

use std::future::Future;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tandem_api::NodeRole;

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
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
}

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
    #[error("{0}")]
    Other(String),
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    _config: Config,
    _shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    Err(AgentError::Other("stub".into()))
}

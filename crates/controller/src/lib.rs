//! Controller. STUB: config and entry point the CLI codes against.

use std::future::Future;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `controller.toml`. Every key is also a flag of `tandem controller run`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `host:port` of the REST API (loopback only for now).
    pub listen: String,
    /// Directory for the state store.
    pub data_dir: PathBuf,
    /// An agent that has not synced for this long is shown offline.
    #[serde(default = "default_offline_after_secs")]
    pub offline_after_secs: u64,
}

fn default_offline_after_secs() -> u64 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{0}")]
    Other(String),
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    _config: Config,
    _shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    Err(ControllerError::Other("stub".into()))
}

/// The OpenAPI document of the REST API, as committed in `docs/openapi.json`.
pub fn openapi_json() -> String {
    String::new()
}

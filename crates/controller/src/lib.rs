//! The controller: the cluster's desired state (nodes, pools, volumes, placements,
//! operations) in a [`tandem_store::StateStore`], a REST API under `/v1`, and the agent sync
//! endpoint through which agents report what they have and learn what they should have.
//!
//! * [`state`]: records, their API views, and the state transitions;
//! * [`http`]: routes, extractors (every error is an `ApiError` JSON body), OpenAPI document.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use utoipa::OpenApi;

pub mod error;
pub mod grow;
pub mod http;
pub mod ops;
pub mod state;
pub mod transfer;

pub use error::Failure;

/// Name of the state store file inside `data_dir`.
pub const STATE_FILE: &str = "state.redb";

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
    /// Allow volumes with more than one replica (`replicas` 2 or 3). The agents replicate
    /// them with the experimental replication driver (2 diskful + witness tested end to end;
    /// 3 diskful are known to be unreliable, see `docs/replication.md`).
    #[serde(default)]
    pub experimental_replication: bool,
}

fn default_offline_after_secs() -> u64 {
    10
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("cannot resolve listen address '{listen}': {source}")]
    Resolve {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to listen on {addr} (from '{listen}'): the REST API has no authentication yet, \
         so it listens on loopback only (e.g. 127.0.0.1:{port})"
    )]
    NotLoopback {
        listen: String,
        addr: SocketAddr,
        port: u16,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Store(#[from] tandem_store::StoreError),
    #[error("cannot load the controller state: {0}")]
    State(String),
    #[error("server error: {0}")]
    Serve(#[source] std::io::Error),
}

/// Resolves and binds `listen`, refusing anything but loopback.
pub async fn bind(listen: &str) -> Result<TcpListener, ControllerError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(listen)
        .await
        .map_err(|source| ControllerError::Resolve {
            listen: listen.to_string(),
            source,
        })?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(ControllerError::Resolve {
            listen: listen.to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        });
    };
    if let Some(bad) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(ControllerError::NotLoopback {
            listen: listen.to_string(),
            addr: *bad,
            port: bad.port(),
        });
    }
    TcpListener::bind(first)
        .await
        .map_err(|source| ControllerError::Bind {
            addr: first.to_string(),
            source,
        })
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let listener = bind(&config.listen).await?;
    run_with_listener(config, listener, shutdown).await
}

/// Like [`run`] on an already bound listener (tests bind `127.0.0.1:0`; `config.listen` is
/// then ignored). The listener must be on loopback.
pub async fn run_with_listener(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let addr = listener.local_addr().map_err(ControllerError::Serve)?;
    if !addr.ip().is_loopback() {
        return Err(ControllerError::NotLoopback {
            listen: config.listen.clone(),
            addr,
            port: addr.port(),
        });
    }
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ControllerError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let path = config.data_dir.join(STATE_FILE);
    let store = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || tandem_store::RedbStore::open(path))
            .await
            .map_err(|e| ControllerError::State(e.to_string()))??
    };
    let ctl = state::Controller::open(
        Arc::new(store),
        Duration::from_secs(config.offline_after_secs),
    )
    .map_err(|f| ControllerError::State(f.message))?
    .with_experimental_replication(config.experimental_replication);
    if config.experimental_replication {
        tracing::warn!(
            "experimental_replication is on: volumes may have several replicas, replicated by \
             the agents' experimental driver (3 diskful replicas are not reliable yet)"
        );
    }
    tracing::info!(%addr, state = %path.display(), cluster_id = ctl.cluster_id(), "controller listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ctl = Arc::new(ctl);
    tokio::spawn(retry_timer(Arc::clone(&ctl), stop_rx.clone()));
    let app = http::router(http::AppState {
        ctl,
        stopping: stop_rx,
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("controller shutting down");
            let _ = stop_tx.send(true);
        })
        .await
        .map_err(ControllerError::Serve)
}

/// How often the controller looks for operations whose retry is due.
pub const RETRY_TICK: Duration = Duration::from_millis(500);

/// Starts due retries of operations (see [`ops`]) until the server stops. Also resumes
/// operations persisted by a previous run: their retry times are in the store.
async fn retry_timer(ctl: Arc<state::Controller>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RETRY_TICK) => {}
            _ = stop.changed() => return,
        }
        let c = Arc::clone(&ctl);
        match tokio::task::spawn_blocking(move || c.retry_due()).await {
            Ok(Ok(_)) => {}
            // A concurrent write won the compare-and-swap: try again next tick.
            Ok(Err(f)) if f.code == "conflict" => {}
            Ok(Err(f)) => {
                tracing::warn!(code = f.code, "retrying operations failed: {}", f.message)
            }
            Err(e) => tracing::error!("retry task failed: {e}"),
        }
    }
}

/// The OpenAPI document of the REST API, as committed in `docs/openapi.json`.
pub fn openapi_json() -> String {
    let mut s = http::ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the OpenAPI document: {e}\"}}"));
    s.push('\n');
    s
}

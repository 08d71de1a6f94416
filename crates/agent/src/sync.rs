//! The control-plane loop: report, receive the desired state (long poll), apply, repeat.
//! HTTP is blocking (`ureq`) and runs on blocking threads; the loop itself is a tokio task that
//! stops promptly at shutdown (a request in flight is abandoned, an apply in progress finishes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_api::{AgentReport, DesiredState};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::Agent;

/// How long the controller may hold a sync request when nothing changed.
pub(crate) const WAIT_MS: u64 = 5000;
/// The long poll while replication drivers run: their state (resync, peers, quorum) changes
/// without a desired-state change, so report it more often.
pub(crate) const REPL_WAIT_MS: u64 = 1000;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// A controller that answers an unchanged revision faster than this is not long-polling;
/// pace the loop so it does not spin.
const MIN_POLL: Duration = Duration::from_millis(250);

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(
            Duration::from_millis(WAIT_MS) + Duration::from_secs(10),
        ))
        .http_status_as_error(false)
        .build()
        .into()
}

fn post_sync(
    http: &ureq::Agent,
    url: &str,
    wait_ms: u64,
    report: &AgentReport,
) -> Result<DesiredState, String> {
    let mut resp = http
        .post(url)
        .query("wait_ms", wait_ms.to_string())
        .send_json(report)
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        return Err(format!("{url}: controller answered {status}: {body}"));
    }
    resp.body_mut()
        .read_json::<DesiredState>()
        .map_err(|e| format!("{url}: bad desired state: {e}"))
}

/// Tells the controller this agent stops (its node shows offline at once); best effort,
/// a few seconds at most. Blocking.
pub(crate) fn leave(agent: &Agent) {
    let url = format!(
        "{}/v1/agents/{}/leave",
        agent.config.controller.trim_end_matches('/'),
        agent.config.node
    );
    let http: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3)))
        .http_status_as_error(false)
        .build()
        .into();
    match http.post(&url).send_empty() {
        Ok(r) if r.status().is_success() => info!("told the controller this agent stops"),
        Ok(r) => debug!("{url}: controller answered {}", r.status()),
        Err(e) => debug!("{url}: {e}"),
    }
}

/// Sleeps `d` unless the agent stops first; returns false when stopping.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.changed() => false,
    }
}

pub(crate) async fn sync_loop(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    let http = http_agent();
    let url = format!(
        "{}/v1/agents/{}/sync",
        agent.config.controller.trim_end_matches('/'),
        agent.config.node
    );
    let mut applied_revision = 0u64;
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    // Set while the controller belongs to another cluster: report nothing to it.
    let mut foreign = false;
    let mut secret_warned = false;
    // The data plane does not wait for the controller: replicated volumes come back from the
    // last desired state this agent applied.
    if let Some(last) = load_desired(&agent) {
        info!(
            revision = last.revision,
            "starting replicated volumes from the last desired state (before asking the controller)"
        );
        crate::repl::start_wanted(&agent, &last).await;
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || {
            a.repl.promote_pending(&|v| a.server.connections(v))
        })
        .await;
    }
    let mut saved_revision = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let report = {
            let agent = agent.clone();
            match tokio::task::spawn_blocking(move || {
                build_report(&agent, applied_revision, foreign)
            })
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    error!("building the report failed: {e}");
                    if !pause(BACKOFF_MAX, &mut stop).await {
                        return;
                    }
                    continue;
                }
            }
        };
        let started = Instant::now();
        let request = {
            let (http, url) = (http.clone(), url.clone());
            let wait_ms = if agent.repl.active() {
                REPL_WAIT_MS
            } else {
                WAIT_MS
            };
            tokio::task::spawn_blocking(move || post_sync(&http, &url, wait_ms, &report))
        };
        let result = tokio::select! {
            r = request => r.map_err(|e| format!("sync request task: {e}")).and_then(|r| r),
            _ = stop.changed() => return,
        };
        let desired = match result {
            Ok(d) => d,
            Err(e) => {
                if failing {
                    debug!("controller sync failed: {e}");
                } else {
                    warn!("controller sync failed (retrying, NBD keeps serving): {e}");
                    failing = true;
                }
                if !pause(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if failing {
            info!("controller reachable again");
            failing = false;
        }
        backoff = BACKOFF_MIN;

        // One cluster only.
        let known = agent
            .cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match known {
            Some(id) if id != desired.cluster_id => {
                if !foreign {
                    error!(
                        ours = %id,
                        theirs = %desired.cluster_id,
                        "controller {} belongs to another cluster; refusing its desired state and reporting nothing to it",
                        agent.config.controller
                    );
                    foreign = true;
                }
                if !pause(BACKOFF_MAX, &mut stop).await {
                    return;
                }
                continue;
            }
            Some(_) => {}
            None => {
                if desired.cluster_id.is_empty() {
                    warn!("controller sent an empty cluster id; ignoring its desired state");
                    if !pause(BACKOFF_MAX, &mut stop).await {
                        return;
                    }
                    continue;
                }
                if let Err(e) = crate::save_cluster_id(&agent.config.state_dir, &desired.cluster_id)
                {
                    error!("cannot remember the cluster id: {e}");
                    if !pause(BACKOFF_MAX, &mut stop).await {
                        return;
                    }
                    continue;
                }
                info!(cluster_id = %desired.cluster_id, "joined cluster");
                *agent.cluster_id.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(desired.cluster_id.clone());
            }
        }
        if foreign {
            info!("controller belongs to our cluster again");
            foreign = false;
        }

        // Identity and credentials for replication.
        if let Some(id) = desired.node_id {
            let mut have = agent.node_id.lock().unwrap_or_else(|p| p.into_inner());
            if *have != Some(id) {
                if let Some(old) = *have {
                    warn!(
                        old,
                        new = id,
                        "the controller assigned this node a different node id"
                    );
                }
                match crate::save_node_id(&agent.config.state_dir, id) {
                    Ok(()) => {
                        info!(node_id = id, "node id assigned by the controller");
                        *have = Some(id);
                    }
                    Err(e) => error!("cannot remember the node id: {e}"),
                }
            }
        }
        if let Some(secret) = desired.cluster_secret.as_deref() {
            match crate::store_cluster_secret(&agent.config.state_dir, secret) {
                Ok(true) => info!("cluster secret stored"),
                Ok(false) => {}
                Err(e) if !secret_warned => {
                    error!("{e}");
                    secret_warned = true;
                }
                Err(_) => {}
            }
        }

        // Apply (always: idempotent, and retries failed steps). Not cancelled by shutdown.
        let changed = desired.revision != applied_revision;
        if changed {
            debug!(revision = desired.revision, "applying desired state");
        }
        let revision = desired.revision;
        if saved_revision != Some(revision) {
            let a = agent.clone();
            let d = desired.clone();
            match tokio::task::spawn_blocking(move || save_desired(&a, &d)).await {
                Ok(Ok(())) => saved_revision = Some(revision),
                Ok(Err(e)) => warn!("cannot keep a local copy of the desired state: {e}"),
                Err(e) => warn!("saving the desired state: {e}"),
            }
        }
        crate::repl::stop_unwanted(&agent, &desired).await;
        let desired = Arc::new(desired);
        {
            let (agent, desired) = (agent.clone(), desired.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || {
                agent.ctx().apply(&desired);
                crate::repl::delete_witnesses(&agent, &desired);
            })
            .await
            {
                error!("applying the desired state failed: {e}");
            }
        }
        crate::repl::start_wanted(&agent, &desired).await;
        {
            let agent = agent.clone();
            let _ = tokio::task::spawn_blocking(move || {
                agent.repl.promote_pending(&|v| agent.server.connections(v))
            })
            .await;
        }
        applied_revision = revision;
        if !changed && started.elapsed() < MIN_POLL && !pause(MIN_POLL, &mut stop).await {
            return;
        }
    }
}

/// Writes the desired state (without the cluster secret) to `state_dir/desired.json`,
/// atomically (temp file, fsync, rename, fsync of the directory).
fn save_desired(agent: &Agent, desired: &DesiredState) -> std::io::Result<()> {
    let mut d = desired.clone();
    d.cluster_secret = None;
    let bytes = serde_json::to_vec_pretty(&d).map_err(std::io::Error::other)?;
    let dir = &agent.config.state_dir;
    let tmp = dir.join(format!("{}.tmp", crate::DESIRED_FILE));
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(crate::DESIRED_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The desired state kept by [`save_desired`], if there is one of this agent's cluster.
fn load_desired(agent: &Agent) -> Option<DesiredState> {
    let path = agent.config.state_dir.join(crate::DESIRED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!("reading {}: {e}", path.display());
            return None;
        }
    };
    let d: DesiredState = match serde_json::from_slice(&bytes) {
        Ok(d) => d,
        Err(e) => {
            warn!("ignoring {}: {e}", path.display());
            return None;
        }
    };
    let ours = agent
        .cluster_id
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if ours.as_deref() != Some(d.cluster_id.as_str()) {
        warn!(
            "ignoring {}: it is of cluster {}, this agent belongs to {:?}",
            path.display(),
            d.cluster_id,
            ours
        );
        return None;
    }
    Some(d)
}

fn build_report(agent: &Agent, applied_revision: u64, foreign: bool) -> AgentReport {
    let ctx = agent.ctx();
    let c = &agent.config;
    AgentReport {
        node: c.node.clone(),
        address: c.address.clone(),
        role: c.role,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        nbd_socket: Some(c.nbd_socket.display().to_string()),
        nbd_tcp: agent.nbd_tcp_bound.clone(),
        pools: if foreign {
            Vec::new()
        } else {
            ctx.report_pools()
        },
        replicas: if foreign {
            Vec::new()
        } else {
            ctx.report_replicas()
        },
        applied_revision,
        cluster_id: agent
            .cluster_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
        repl_addr: agent.repl_addr.clone(),
    }
}

/// How often a replica the controller wants Primary is promoted again after a refusal.
const PROMOTE_RETRY: Duration = Duration::from_millis(500);

/// Retries pending promotions on a short timer (the sync loop may wait on a long poll).
pub(crate) async fn promote_loop(agent: Arc<Agent>, mut stop: watch::Receiver<bool>) {
    loop {
        if !pause(PROMOTE_RETRY, &mut stop).await {
            return;
        }
        let a = agent.clone();
        let _ = tokio::task::spawn_blocking(move || {
            a.repl.promote_pending(&|v| a.server.connections(v))
        })
        .await;
    }
}

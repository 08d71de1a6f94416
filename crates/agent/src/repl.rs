//! Replication of multi-replica volumes (experimental): one [`NodeReplication`] per agent
//! (on the listener bound at start), one [`VolumeDriver`] per desired replica that has peers.
//! A diskful replica is exported over NBD through its driver's block device instead of the
//! raw file; a diskless placement (witness) runs a diskless voter keeping only its metadata in
//! `state_dir/witness/`. A change of a replica's peers restarts its driver. The placement the
//! controller marks `primary` is promoted until the engine accepts it; a Primary the controller
//! no longer marks is demoted. The refusal, if any, is reported (`role_error`). The volume's
//! dual-primary window (`allow_two_primaries`) is opened and closed on the running driver (a
//! refused close is retried at every reconcile); a node that is one of the two Primaries of a
//! window counts as Primary here and in the report (`dual_primary_partner`, `write_token`),
//! whether or not it holds the write token. The volume's on-no-quorum policy
//! (`on_no_quorum`: `io-error` or `suspend`) goes into the engine's configuration at start and
//! is changed on the running driver; the report carries it with the requests held for quorum
//! (`suspended_requests`). Single-replica volumes are not touched (raw `FileDevice` exports).
//!
//! The last desired state is kept in `state_dir/desired.json` (without the cluster secret, which
//! has its own file): an agent restarted while the controller is unreachable starts the drivers
//! of its replicated volumes from it, so the data plane never waits for the controller.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_api::{DesiredReplica, DesiredState, DiskState, PeerReplState, ReplicaReport, Role};
use tandem_nbd::server::Export;
use tandem_volume::{
    NodeConfig, NodeReplication, OnNoQuorum, Protocol, VolumeDriver, VolumeOptions, VolumePeer,
    VolumeSpec,
};
use tracing::{debug, error, info, warn};

use crate::Agent;
use crate::replicas::{read, write};

/// Directory (under `state_dir`) holding witnesses' metadata.
pub(crate) const WITNESS_DIR: &str = "witness";

struct Running {
    driver: Arc<VolumeDriver>,
    /// A witness's NBD export (its driver's block device: a diskless Primary serves the
    /// volume by forwarding to the diskful replicas). Diskful replicas are exported through
    /// the table's entry instead.
    export: Option<Arc<Export>>,
    /// What the driver was started with; a different desired spec restarts it.
    spec: VolumeSpec,
    primary: bool,
    /// `primary` came from `volume promote --force` (promote Outdated data).
    force_primary: bool,
    /// Node name of each peer id (for reports).
    peer_names: BTreeMap<u8, String>,
    /// Last refusal of the role the controller asks for (logged once, reported).
    last_refusal: Option<String>,
    /// Resync progress sample (when, bytes done) and the rate measured from the previous
    /// one, for `resync_bytes_per_sec` and the ETA.
    resync_sample: Option<(std::time::Instant, u64)>,
    resync_rate: u64,
    /// When a consumer opening the export here promoted it (auto-promote); demoted again
    /// when the last consumer is gone (after [`AUTO_GRACE`]), unless the controller wants it
    /// Primary.
    auto: Option<std::time::Instant>,
    /// The last auto-promote refusal and when (reported for [`AUTO_REFUSAL_SHOWN`]).
    auto_refusal: Option<(std::time::Instant, String)>,
    /// The controller's latest verify request started here (see [`AgentVerify`]).
    verify: Option<AgentVerify>,
    /// The last split-brain resolution carried out here (its id) and its refusal, if any.
    resolved: Option<(String, Option<String>)>,
    /// The last refusal to open or close the dual-primary window (logged once; retried at
    /// every reconcile).
    window_refusal: Option<String>,
}

/// The engine's split-brain policy for the API's string (`disconnect`,
/// `discard-zero-changes`, `discard-younger-primary`, `discard-node:NODE`), node names resolved
/// through `ids`.
pub(crate) fn split_brain_policy(
    s: &str,
    ids: &BTreeMap<String, u8>,
) -> Result<tandem_volume::SplitBrainPolicy, String> {
    use tandem_volume::SplitBrainPolicy as P;
    match s {
        "" | "disconnect" => Ok(P::Disconnect),
        "discard-zero-changes" => Ok(P::DiscardZeroChanges),
        "discard-younger-primary" => Ok(P::DiscardYoungerPrimary),
        other => match other.strip_prefix("discard-node:") {
            Some(n) => ids.get(n).map(|id| P::DiscardNode(*id)).ok_or_else(|| {
                format!("split-brain policy names node '{n}', not one of the volume's")
            }),
            None => Err(format!("unknown split-brain policy '{other}'")),
        },
    }
}

/// A verify the controller asked for (`DesiredReplica::verify`), as this agent started it.
#[derive(Debug, Clone)]
struct AgentVerify {
    /// The operation id.
    id: String,
    /// This node's name.
    node: String,
    resync: bool,
    /// The engine's last verify run number before this one started: the first newer run is
    /// this verify.
    before: u64,
    started_unix: u64,
    /// The engine refused to start it.
    refused: Option<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The report of verify `v` from the driver's status.
fn verify_report(
    v: &AgentVerify,
    st: &tandem_volume::VolumeStatus,
    names: &BTreeMap<u8, String>,
    size: u64,
) -> tandem_api::VerifyReport {
    let name = |id: &u8| {
        names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("node-id-{id}"))
    };
    let mut r = tandem_api::VerifyReport {
        id: v.id.clone(),
        node: v.node.clone(),
        state: "running".into(),
        resync: v.resync,
        peers: Vec::new(),
        total_bytes: size,
        checked_bytes: 0,
        different_bytes: 0,
        ranges: Vec::new(),
        ranges_truncated: false,
        resync_started: Vec::new(),
        bytes_per_sec: 0,
        eta_secs: None,
        error: None,
        started_unix: v.started_unix,
        finished_unix: None,
    };
    if let Some(e) = &v.refused {
        r.state = "failed".into();
        r.error = Some(name_nodes(e, names));
        r.finished_unix = Some(v.started_unix);
        return r;
    }
    if let Some(p) = st.verify.as_ref().filter(|p| p.run > v.before) {
        r.peers = p.peers.iter().map(name).collect();
        r.total_bytes = p.bytes_total;
        r.checked_bytes = p.bytes_done;
        r.different_bytes = p.different_bytes;
        let secs = p.elapsed_nanos as f64 / 1e9;
        if secs > 0.0 {
            r.bytes_per_sec = (p.bytes_done as f64 / secs) as u64;
        }
        if r.bytes_per_sec > 0 {
            r.eta_secs = Some((p.bytes_total - p.bytes_done).div_ceil(r.bytes_per_sec));
        }
        return r;
    }
    match st.last_verify.as_ref().filter(|l| l.run > v.before) {
        Some(l) => {
            r.state = if l.error.is_some() { "failed" } else { "done" }.into();
            r.peers = l.peers.iter().map(name).collect();
            r.checked_bytes = l.checked_bytes;
            r.different_bytes = l.different_bytes;
            r.ranges = l
                .ranges
                .iter()
                .map(|(offset, len)| tandem_api::ByteRange {
                    offset: *offset,
                    len: *len,
                })
                .collect();
            r.ranges_truncated = l.ranges_truncated;
            r.resync_started = l.resync_started.iter().map(name).collect();
            let secs = l.elapsed_nanos as f64 / 1e9;
            if secs > 0.0 {
                r.bytes_per_sec = (l.checked_bytes as f64 / secs) as u64;
            }
            r.error = l.error.as_ref().map(|e| name_nodes(e, names));
            r.finished_unix = Some(v.started_unix + l.elapsed_nanos / 1_000_000_000);
        }
        None => {
            // Neither running nor finished: the driver restarted and lost it.
            r.state = "failed".into();
            r.error = Some("the replication driver restarted during the verify".into());
        }
    }
    r
}

/// How long an auto-promote refusal stays in the reports.
const AUTO_REFUSAL_SHOWN: std::time::Duration = std::time::Duration::from_secs(60);

/// How long an auto-promoted replica stays Primary without a counted consumer: the NBD
/// server counts a connection only after its handshake, which the promotion is part of.
const AUTO_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long an open waits for its auto-promotion (DRBD's auto-promote-timeout): longer than
/// the other node's auto-demote takes after its consumer closed (grace + the 500 ms loop).
const AUTO_PROMOTE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The engine names peers by node id ("node 0 is Primary"); operators know them by name:
/// "node 0" becomes "node1 (node id 0)" for every peer in `names`.
fn name_nodes(msg: &str, names: &BTreeMap<u8, String>) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("node ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 5..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits]
            .parse::<u8>()
            .ok()
            .and_then(|id| names.get(&id).map(|n| (id, n)))
        {
            Some((id, name)) if digits > 0 => {
                out.push_str(&format!("{name} (node id {id})"));
                rest = &after[digits..];
            }
            _ => {
                out.push_str("node ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether two specs differ in more than the options a running driver takes without a
/// restart (resync rate and floor, split-brain policy, checksum resync, the dual-primary
/// window, the on-no-quorum policy, size).
fn needs_restart(want: &VolumeSpec, have: &VolumeSpec) -> bool {
    let mut w = want.clone();
    w.options.resync_rate = have.options.resync_rate;
    w.options.resync_min_rate = have.options.resync_min_rate;
    w.options.after_split_brain = have.options.after_split_brain;
    w.options.resync_checksums = have.options.resync_checksums;
    w.options.allow_two_primaries = have.options.allow_two_primaries;
    w.options.on_no_quorum = have.options.on_no_quorum;
    // The size changes online (`VolumeDriver::resize`).
    w.size_bytes = have.size_bytes;
    w != *have
}

/// The agent's replication state.
#[derive(Default)]
pub(crate) struct Replication {
    node: Mutex<Option<Arc<NodeReplication>>>,
    drivers: Mutex<BTreeMap<String, Running>>,
    node_failed: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replication {
    fn node(&self) -> Option<Arc<NodeReplication>> {
        lock(&self.node).clone()
    }

    /// The NBD export of a witness's driver for `volume`, if one runs here.
    pub(crate) fn witness_export(&self, volume: &str) -> Option<Arc<Export>> {
        lock(&self.drivers).get(volume)?.export.clone()
    }

    /// Volumes exported through a witness's driver here.
    pub(crate) fn witness_exports(&self) -> Vec<String> {
        lock(&self.drivers)
            .iter()
            .filter(|(_, r)| r.export.is_some())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Whether any replication driver runs.
    pub(crate) fn active(&self) -> bool {
        !lock(&self.drivers).is_empty()
    }

    /// Fills the replication fields of a report row from the running driver, if any.
    pub(crate) fn fill_report(&self, r: &mut ReplicaReport) {
        let (driver, names) = {
            let d = lock(&self.drivers);
            match d.get(&r.volume) {
                Some(run) if run.spec.uuid == r.volume_uuid => {
                    (run.driver.clone(), run.peer_names.clone())
                }
                _ => return,
            }
        };
        let st = match driver.status() {
            Ok(s) => s,
            Err(e) => {
                r.last_error = Some(format!("replication driver: {e}"));
                return;
            }
        };
        r.role = match format!("{:?}", st.role).as_str() {
            "Primary" => Role::Primary,
            _ => Role::Secondary,
        };
        r.disk_state = match format!("{:?}", st.disk_state).as_str() {
            "UpToDate" => DiskState::UpToDate,
            "Inconsistent" => DiskState::Inconsistent,
            "Outdated" => DiskState::Outdated,
            "Diskless" => DiskState::Diskless,
            _ => DiskState::Failed,
        };
        r.disk_error = st.disk_failure.clone();
        r.quorum = Some(st.quorum);
        r.out_of_sync_bytes = st.out_of_sync_bytes;
        r.last_resync_bytes = st.last_resync_bytes;
        r.resync_bytes_left = st.resync_bytes_left;
        r.resync_yielding = st.resync_yielding;
        {
            // Measured rate: bytes done between two reports at least a second apart.
            let now = std::time::Instant::now();
            let done = st.engine.resync_bytes_done;
            let mut d = lock(&self.drivers);
            if let Some(run) = d.get_mut(&r.volume) {
                if st.resync_bytes_left.is_none() {
                    run.resync_sample = None;
                    run.resync_rate = 0;
                } else {
                    match run.resync_sample {
                        Some((t, d0)) if done >= d0 => {
                            let secs = now.duration_since(t).as_secs_f64();
                            if secs >= 1.0 {
                                run.resync_rate = ((done - d0) as f64 / secs) as u64;
                                run.resync_sample = Some((now, done));
                            }
                        }
                        _ => run.resync_sample = Some((now, done)),
                    }
                }
                r.resync_bytes_per_sec = run.resync_rate;
                r.resync_eta_secs = match (st.resync_bytes_left, run.resync_rate) {
                    (Some(left), rate) if rate > 0 => Some(left.div_ceil(rate)),
                    _ => None,
                };
            }
        }
        let peer_name = |id: u8| {
            names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("node-id-{id}"))
        };
        r.peers = st
            .peers
            .iter()
            .map(|p| PeerReplState {
                node: peer_name(p.node_id),
                repl_state: if !p.connected
                    && p.split_brain
                        .as_ref()
                        .is_some_and(|s| s.resolution.is_none())
                {
                    "SplitBrain".into()
                } else {
                    format!("{:?}", p.repl_state)
                },
                out_of_sync_bytes: p.out_of_sync_bytes,
            })
            .collect();
        r.split_brain = st
            .peers
            .iter()
            .filter_map(|p| {
                p.split_brain
                    .as_ref()
                    .map(|s| tandem_api::SplitBrainReport {
                        peer: peer_name(p.node_id),
                        rule: format!("{:?}", s.rule),
                        our_bytes: s.our_bytes,
                        peer_bytes: s.peer_bytes,
                        resolution: s.resolution.as_ref().map(|m| name_nodes(m, &names)),
                    })
            })
            .collect();
        r.discard_pending = st.engine.discard_my_data;
        r.allow_two_primaries = st.allow_two_primaries;
        r.dual_primary_partner = st.dual_primary.map(|dp| peer_name(dp.partner));
        r.write_token = st.dual_primary.is_some_and(|dp| dp.write_token);
        r.on_no_quorum = Some(api_on_no_quorum(st.on_no_quorum));
        r.suspended_requests = st.suspended_requests as u64;
        r.last_resync_skipped_bytes = st.engine.last_resync_skipped_bytes;
        if let Some((_, Some(e))) = lock(&self.drivers)
            .get(&r.volume)
            .and_then(|run| run.resolved.clone())
        {
            r.last_error = Some(e);
        }
        if let Some(v) = lock(&self.drivers)
            .get(&r.volume)
            .and_then(|run| run.verify.clone())
        {
            r.verify = Some(verify_report(&v, &st, &names, r.size_bytes));
        }
        if let Some(f) = st.failed {
            r.last_error = Some(format!("replication driver failed: {f}"));
        }
        r.role_error = lock(&self.drivers).get(&r.volume).and_then(|run| {
            run.last_refusal.clone().or_else(|| {
                run.auto_refusal
                    .as_ref()
                    .filter(|(t, _)| t.elapsed() < AUTO_REFUSAL_SHOWN)
                    .map(|(_, m)| m.clone())
            })
        });
    }

    /// Auto-promote: a consumer opens the export of `volume` here (NBD_OPT_GO). A diskful
    /// Secondary tries to become Primary, for up to [`AUTO_PROMOTE_WAIT`] while the engine
    /// refuses (another node still Primary, e.g. a VM just stopped there and its node has not
    /// auto-demoted yet; no quorum yet; not UpToDate). A refusal that outlasts the wait is
    /// reported as `role_error`, and the consumer's I/O fails with EIO. Blocking; inside a
    /// multi-threaded runtime the wait runs under `block_in_place`.
    pub(crate) fn consumer_opens(&self, volume: &str) {
        let multi = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi {
            tokio::task::block_in_place(|| self.auto_promote(volume));
        } else {
            self.auto_promote(volume);
        }
    }

    fn auto_promote(&self, volume: &str) {
        let deadline = std::time::Instant::now() + AUTO_PROMOTE_WAIT;
        loop {
            // Diskful replicas and witnesses alike: a witness becomes a diskless Primary.
            let driver = match lock(&self.drivers).get(volume) {
                Some(run) => run.driver.clone(),
                _ => return,
            };
            let is_primary = driver
                .status()
                .map(|s| format!("{:?}", s.role) == "Primary")
                .unwrap_or(true);
            if is_primary {
                return;
            }
            let res = driver.promote();
            let mut d = lock(&self.drivers);
            let Some(run) = d.get_mut(volume) else {
                return;
            };
            match res {
                Ok(()) => {
                    info!(volume, "auto-promoted: a consumer opened the export");
                    run.auto = Some(std::time::Instant::now());
                    run.last_refusal = None;
                    run.auto_refusal = None;
                    return;
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    let msg = name_nodes(&format!("auto-promote: {e}"), &run.peer_names);
                    info!(volume, "{msg}");
                    run.auto_refusal = Some((std::time::Instant::now(), msg));
                    return;
                }
                Err(_) => {}
            }
            drop(d);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Brings every replica to the role wanted: Primary when the controller marks it so or
    /// when it was auto-promoted and consumers are still connected (`connections`), else
    /// Secondary (auto-demote after the last consumer left). Demotions run first, so a
    /// switchover between two replicas on this node cannot meet itself. Blocking (driver
    /// calls).
    pub(crate) fn promote_pending(&self, connections: &dyn Fn(&str) -> u32) {
        let forced: std::collections::BTreeSet<String> = lock(&self.drivers)
            .iter()
            .filter(|(_, r)| r.primary && r.force_primary)
            .map(|(n, _)| n.clone())
            .collect();
        let all: Vec<(String, Arc<VolumeDriver>, bool)> = {
            let mut d = lock(&self.drivers);
            d.iter_mut()
                .map(|(n, r)| {
                    if r.auto.is_some_and(|t| t.elapsed() >= AUTO_GRACE) && connections(n) == 0 {
                        if !r.primary {
                            info!(volume = %n, "the last consumer left: auto-demote");
                        }
                        r.auto = None;
                    }
                    (n.clone(), r.driver.clone(), r.primary || r.auto.is_some())
                })
                .collect()
        };
        let mut todo: Vec<(String, Arc<VolumeDriver>, bool)> = all
            .into_iter()
            .filter(|(_, driver, want)| {
                let is_primary = driver
                    .status()
                    .map(|s| format!("{:?}", s.role) == "Primary")
                    .unwrap_or(false);
                is_primary != *want
            })
            .collect();
        todo.sort_by_key(|(_, _, want)| *want);
        for (name, driver, want) in todo {
            // The driver's errors read "promotion refused: ..." / "demotion refused: ...".
            let res = if want && forced.contains(&name) {
                driver.promote_forced()
            } else if want {
                driver.promote()
            } else {
                driver.demote()
            };
            let mut d = lock(&self.drivers);
            let Some(run) = d.get_mut(&name) else {
                continue;
            };
            match res {
                Ok(()) => {
                    info!(volume = %name, "{}", if want { "promoted to Primary" } else { "demoted to Secondary" });
                    run.last_refusal = None;
                }
                Err(e) => {
                    let msg = name_nodes(&e.to_string(), &run.peer_names);
                    if run.last_refusal.as_deref() != Some(msg.as_str()) {
                        info!(volume = %name, "{msg} (retrying)");
                        run.last_refusal = Some(msg);
                    } else {
                        debug!(volume = %name, "{msg}");
                    }
                }
            }
        }
        // A role that needs no change any more (e.g. the controller changed its mind, or a
        // peer demoted) clears its refusal. Driver calls outside the table lock.
        let refused: Vec<(String, Arc<VolumeDriver>, bool)> = lock(&self.drivers)
            .iter()
            .filter(|(_, r)| r.last_refusal.is_some())
            .map(|(n, r)| (n.clone(), r.driver.clone(), r.primary))
            .collect();
        for (name, driver, want) in refused {
            let settled = driver
                .status()
                .map(|s| (format!("{:?}", s.role) == "Primary") == want)
                .unwrap_or(false);
            if settled && let Some(run) = lock(&self.drivers).get_mut(&name) {
                run.last_refusal = None;
            }
        }
    }

    /// Demotes (when Primary) and stops every driver, then closes the transport.
    pub(crate) async fn shutdown(&self, agent: &Arc<Agent>) {
        let names: Vec<String> = lock(&self.drivers).keys().cloned().collect();
        for name in names {
            stop_driver(agent, &name).await;
        }
        let node = lock(&self.node).take();
        if let Some(node) = node {
            node.shutdown().await;
        }
    }
}

/// Takes the driver of `name` out of the table, its export away, demotes and stops it.
async fn stop_driver(agent: &Arc<Agent>, name: &str) {
    let Some(run) = lock(&agent.repl.drivers).remove(name) else {
        return;
    };
    if run.spec.diskful {
        let mut t = write(&agent.table);
        for e in t.entries.values_mut().filter(|e| e.volume == name) {
            if e.replicated {
                e.export = None;
                e.replicated = false;
            }
        }
    }
    let name = name.to_string();
    let res = tokio::task::spawn_blocking(move || {
        let driver = run.driver;
        if let Ok(s) = driver.status()
            && format!("{:?}", s.role) == "Primary"
            && let Err(e) = driver.demote()
        {
            warn!(volume = %name, "demote before stopping refused: {e}");
        }
        match Arc::try_unwrap(driver) {
            Ok(d) => d.stop(),
            Err(d) => {
                // A report still holds it: dropping the last reference stops it.
                warn!(volume = %name, "driver still referenced; it stops when released");
                drop(d);
            }
        }
        info!(volume = %name, "replication driver stopped");
    })
    .await;
    if let Err(e) = res {
        error!("stopping a replication driver: {e}");
    }
}

/// The spec the desired replica asks for, or why not yet.
fn spec_for(agent: &Agent, d: &DesiredReplica) -> Result<VolumeSpec, String> {
    // A diskful driver starts at the size its replica has on disk (the metadata's); a
    // different desired size is applied online afterwards (`apply_size`).
    let (dir, size_bytes): (PathBuf, u64) = if d.diskless {
        (agent.config.state_dir.join(WITNESS_DIR), d.size_bytes)
    } else {
        let t = read(&agent.table);
        let e = t
            .entries
            .get(&(d.pool.clone(), d.volume.clone()))
            .filter(|e| e.ghost.is_none() && e.device.is_some())
            .filter(|e| e.meta.as_ref().map(|m| m.volume_uuid.as_str()) == Some(&d.volume_uuid))
            .ok_or("replica not on disk (yet)")?;
        let size = e.meta.as_ref().map_or(d.size_bytes, |m| m.size_bytes);
        (e.files.dir().to_path_buf(), size)
    };
    let mut peers = Vec::new();
    for p in &d.peers {
        let addr = p
            .repl_addr
            .clone()
            .ok_or_else(|| format!("peer {} has not reported its replication address", p.node))?;
        peers.push(VolumePeer {
            node_id: p.node_id,
            name: p.node.clone(),
            addr,
            diskful: !p.diskless,
        });
    }
    Ok(VolumeSpec {
        name: d.volume.clone(),
        uuid: d.volume_uuid.clone(),
        dir,
        diskful: !d.diskless,
        size_bytes,
        peers,
        options: VolumeOptions {
            protocol: match d.protocol {
                tandem_api::Protocol::C => Protocol::C,
                tandem_api::Protocol::A => Protocol::A,
            },
            resync_rate: d.resync_rate_bytes_per_sec,
            resync_min_rate: d.resync_min_rate_bytes_per_sec,
            after_split_brain: {
                let mut ids: BTreeMap<String, u8> = d
                    .peers
                    .iter()
                    .map(|p| (p.node.clone(), p.node_id))
                    .collect();
                if let Some(me) = d.node_id {
                    ids.insert(agent.config.node.clone(), me);
                }
                split_brain_policy(&d.after_split_brain, &ids).unwrap_or_else(|e| {
                    warn!(volume = %d.volume, "{e}; using disconnect");
                    tandem_volume::SplitBrainPolicy::Disconnect
                })
            },
            resync_checksums: d.resync_checksums,
            allow_two_primaries: d.allow_two_primaries,
            on_no_quorum: engine_on_no_quorum(d.on_no_quorum),
        },
    })
}

/// The engine's on-no-quorum policy for the API's.
fn engine_on_no_quorum(p: tandem_api::OnNoQuorum) -> OnNoQuorum {
    match p {
        tandem_api::OnNoQuorum::IoError => OnNoQuorum::IoError,
        tandem_api::OnNoQuorum::Suspend => OnNoQuorum::Suspend,
    }
}

/// The API's on-no-quorum policy for the engine's.
fn api_on_no_quorum(p: OnNoQuorum) -> tandem_api::OnNoQuorum {
    match p {
        OnNoQuorum::IoError => tandem_api::OnNoQuorum::IoError,
        OnNoQuorum::Suspend => tandem_api::OnNoQuorum::Suspend,
    }
}

fn wanted(desired: &DesiredState) -> impl Iterator<Item = &DesiredReplica> {
    desired
        .replicas
        .iter()
        .filter(|d| d.present && !d.peers.is_empty())
}

/// Before applying a desired state: stops drivers of replicas no longer wanted (deleted,
/// single-replica again, other uuid) or whose peers changed, so files are closed before a
/// delete touches them.
pub(crate) async fn stop_unwanted(agent: &Arc<Agent>, desired: &DesiredState) {
    let stale: Vec<String> = {
        let d = lock(&agent.repl.drivers);
        d.iter()
            .filter(|(name, run)| {
                match wanted(desired).find(|w| &w.volume == *name) {
                    None => true,
                    Some(w) => match spec_for(agent, w) {
                        // Restart on any change of what the driver was started with,
                        // except options it takes while running.
                        Ok(spec) => needs_restart(&spec, &run.spec),
                        // Peer address unknown now: keep running with the old one. A
                        // witness becoming a replica (or back) stops at once: the new kind's
                        // files are only set up once the old driver is gone.
                        Err(_) => w.volume_uuid != run.spec.uuid || w.diskless == run.spec.diskful,
                    },
                }
            })
            .map(|(n, _)| n.clone())
            .collect()
    };
    for name in stale {
        info!(volume = %name, "stopping replication driver (desired state changed)");
        stop_driver(agent, &name).await;
    }
}

/// The volume uuid of the witness metadata kept here for `volume`, if any.
fn witness_uuid(agent: &Agent, volume: &str) -> Option<String> {
    let dir = agent.config.state_dir.join(WITNESS_DIR);
    tandem_meta::ReplicaFiles::new(&dir, volume)
        .read_meta()
        .ok()
        .map(|m| m.volume_uuid)
}

/// Removes a witness's files (it has no data: only metadata and maybe an activity log).
fn remove_witness(agent: &Agent, volume: &str, uuid: &str) {
    let dir = agent.config.state_dir.join(WITNESS_DIR);
    let files = tandem_meta::ReplicaFiles::new(&dir, volume);
    for p in [
        files.meta(),
        files.bitmap(),
        dir.join(format!("{volume}.al")),
    ] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(volume, "removing {}: {e}", p.display()),
        }
    }
    info!(volume, uuid, "witness removed");
}

/// Removes the witness files of placements the controller lists `present: false` (same uuid)
/// once no driver runs for them. Call after [`stop_unwanted`].
pub(crate) fn delete_witnesses(agent: &Agent, desired: &DesiredState) {
    for d in desired.replicas.iter().filter(|d| d.diskless && !d.present) {
        if lock(&agent.repl.drivers).contains_key(&d.volume) {
            continue;
        }
        if witness_uuid(agent, &d.volume).as_deref() == Some(d.volume_uuid.as_str()) {
            remove_witness(agent, &d.volume, &d.volume_uuid);
        }
    }
}

/// After applying a desired state: starts the node's transport when identity and secret are
/// known, and a driver for every wanted replica without one.
pub(crate) async fn start_wanted(agent: &Arc<Agent>, desired: &DesiredState) {
    if wanted(desired).next().is_none() {
        return;
    }
    let Some(node) = ensure_node(agent).await else {
        return;
    };
    for d in wanted(desired) {
        apply_size(agent, d).await;
        if let Some(run) = lock(&agent.repl.drivers).get_mut(&d.volume) {
            run.primary = d.primary;
            run.force_primary = d.force_primary;
            let rate = d.resync_rate_bytes_per_sec;
            if run.spec.options.resync_rate != rate {
                match run.driver.set_resync_rate(rate) {
                    Ok(()) => {
                        info!(volume = %d.volume, bytes_per_sec = rate, "resync rate limit set (0: unlimited)");
                        run.spec.options.resync_rate = rate;
                    }
                    Err(e) => warn!(volume = %d.volume, "setting the resync rate: {e}"),
                }
            }
            let min = d.resync_min_rate_bytes_per_sec;
            if run.spec.options.resync_min_rate != min {
                match run.driver.set_resync_min_rate(min) {
                    Ok(()) => {
                        info!(volume = %d.volume, bytes_per_sec = min, "resync minimum rate set (0: never yield to consumer I/O)");
                        run.spec.options.resync_min_rate = min;
                    }
                    Err(e) => warn!(volume = %d.volume, "setting the resync minimum rate: {e}"),
                }
            }
            if let Ok(spec) = spec_for(agent, d)
                && spec.options.after_split_brain != run.spec.options.after_split_brain
            {
                let p = spec.options.after_split_brain;
                match run.driver.set_split_brain_policy(p) {
                    Ok(()) => {
                        info!(volume = %d.volume, policy = ?p, "split-brain policy set");
                        run.spec.options.after_split_brain = p;
                    }
                    Err(e) => warn!(volume = %d.volume, "setting the split-brain policy: {e}"),
                }
            }
            if run.spec.options.resync_checksums != d.resync_checksums {
                match run.driver.set_resync_checksums(d.resync_checksums) {
                    Ok(()) => {
                        info!(volume = %d.volume, on = d.resync_checksums, "checksum-based resync set");
                        run.spec.options.resync_checksums = d.resync_checksums;
                    }
                    Err(e) => warn!(volume = %d.volume, "setting checksum-based resync: {e}"),
                }
            }
            if run.spec.options.allow_two_primaries != d.allow_two_primaries {
                let on = d.allow_two_primaries;
                match run.driver.set_allow_two_primaries(on) {
                    Ok(()) => {
                        // The engine logs "dual-primary window opened/closed" itself.
                        debug!(volume = %d.volume, on, "dual-primary window set");
                        run.spec.options.allow_two_primaries = on;
                        run.window_refusal = None;
                    }
                    // E.g. closing while this node is still one of two Primaries: the spec
                    // keeps the old value, so the next reconcile tries again.
                    Err(e) => {
                        let msg = format!(
                            "{} the dual-primary window: {}",
                            if on { "opening" } else { "closing" },
                            name_nodes(&e.to_string(), &run.peer_names)
                        );
                        if run.window_refusal.as_deref() != Some(msg.as_str()) {
                            warn!(volume = %d.volume, "{msg} (retrying)");
                            run.window_refusal = Some(msg);
                        } else {
                            debug!(volume = %d.volume, "{msg}");
                        }
                    }
                }
            }
            let policy = engine_on_no_quorum(d.on_no_quorum);
            if run.spec.options.on_no_quorum != policy {
                match run.driver.set_on_no_quorum(policy) {
                    Ok(()) => {
                        // The engine logs "on-no-quorum set to ..." itself.
                        debug!(volume = %d.volume, policy = %d.on_no_quorum, "on-no-quorum policy set");
                        run.spec.options.on_no_quorum = policy;
                    }
                    Err(e) => warn!(volume = %d.volume, "setting the on-no-quorum policy: {e}"),
                }
            }
            if let Some(want) = &d.resolve_split_brain
                && run.resolved.as_ref().map(|r| &r.0) != Some(&want.id)
            {
                if want.discard
                    && run
                        .driver
                        .status()
                        .is_ok_and(|s| format!("{:?}", s.role) == "Primary")
                    && let Err(e) = run.driver.demote()
                {
                    warn!(volume = %d.volume, "demote before discarding our data: {e}");
                }
                let res = run.driver.resolve_split_brain(want.discard);
                match &res {
                    Ok(()) => info!(volume = %d.volume, discard = want.discard, id = %want.id,
                        "split-brain resolution: {}", if want.discard { "discarding our changes since the split" } else { "reconnecting" }),
                    Err(e) => {
                        warn!(volume = %d.volume, id = %want.id, "split-brain resolution refused: {e}")
                    }
                }
                run.resolved = Some((want.id.clone(), res.err().map(|e| e.to_string())));
            }
            if let Some(want) = &d.verify
                && run.verify.as_ref().map(|v| &v.id) != Some(&want.id)
            {
                let before = run
                    .driver
                    .status()
                    .ok()
                    .and_then(|s| s.last_verify.map(|l| l.run))
                    .unwrap_or(0);
                let refused = match run.driver.verify(want.resync) {
                    Ok(()) => {
                        info!(volume = %d.volume, id = %want.id, resync = want.resync, "online verify started");
                        None
                    }
                    Err(e) => {
                        warn!(volume = %d.volume, id = %want.id, "online verify refused: {e}");
                        Some(e.to_string())
                    }
                };
                run.verify = Some(AgentVerify {
                    id: want.id.clone(),
                    node: agent.config.node.clone(),
                    resync: want.resync,
                    before,
                    started_unix: unix_now(),
                    refused,
                });
            }
            continue;
        }
        let spec = match spec_for(agent, d) {
            Ok(s) => s,
            Err(why) => {
                debug!(volume = %d.volume, "replication driver not started yet: {why}");
                continue;
            }
        };
        if !spec.diskful {
            if let Err(e) = std::fs::create_dir_all(&spec.dir) {
                error!(volume = %d.volume, "witness directory {}: {e}", spec.dir.display());
                continue;
            }
            // A witness of an older volume of the same name (deleted while this agent was
            // away) holds no data: replace it.
            if let Some(old) = witness_uuid(agent, &d.volume)
                && old != d.volume_uuid
            {
                remove_witness(agent, &d.volume, &old);
            }
        }
        let (node2, spec2) = (node.clone(), spec.clone());
        let started =
            match tokio::task::spawn_blocking(move || VolumeDriver::start(&node2, spec2)).await {
                Ok(r) => r,
                Err(e) => {
                    error!(volume = %d.volume, "starting the replication driver: {e}");
                    continue;
                }
            };
        let driver = match started {
            Ok(drv) => Arc::new(drv),
            Err(e) => {
                warn!(volume = %d.volume, "replication driver did not start: {e}");
                continue;
            }
        };
        info!(volume = %d.volume, diskful = spec.diskful, primary = d.primary,
            peers = spec.peers.len(), "replication driver started");
        if spec.diskful {
            let mut t = write(&agent.table);
            if let Some(e) = t.entries.get_mut(&(d.pool.clone(), d.volume.clone())) {
                e.export = Some(Arc::new(Export {
                    name: d.volume.clone(),
                    description: format!(
                        "tandem volume {} ({}), replicated",
                        d.volume, d.volume_uuid
                    ),
                    device: driver.block_device(),
                    read_only: false,
                    // Every connection goes through the one engine loop of this volume.
                    multi_conn: true,
                }));
                e.replicated = true;
            }
        }
        let peer_names = spec
            .peers
            .iter()
            .map(|p| (p.node_id, p.name.clone()))
            .collect();
        let started_now = d.clone();
        let export = (!spec.diskful).then(|| {
            Arc::new(Export {
                name: d.volume.clone(),
                description: format!(
                    "tandem volume {} ({}), diskless (served by the diskful replicas)",
                    d.volume, d.volume_uuid
                ),
                device: driver.block_device(),
                read_only: false,
                multi_conn: true,
            })
        });
        lock(&agent.repl.drivers).insert(
            d.volume.clone(),
            Running {
                export,
                driver,
                spec,
                primary: d.primary,
                force_primary: d.force_primary,
                peer_names,
                last_refusal: None,
                resync_sample: None,
                resync_rate: 0,
                auto: None,
                auto_refusal: None,
                verify: None,
                resolved: None,
                window_refusal: None,
            },
        );
        apply_size(agent, &started_now).await;
    }
}

/// Online resize of a running driver to the desired size: the driver grows (or shrinks) the
/// replica's files and tells its engine; the table's metadata and device follow, and an
/// error stays in the replica's `last_error` (starting with "resize", which the controller's
/// resize operation shows) until an attempt succeeds.
async fn apply_size(agent: &Arc<Agent>, d: &DesiredReplica) {
    let (driver, have) = match lock(&agent.repl.drivers).get(&d.volume) {
        Some(run) if run.spec.uuid == d.volume_uuid => (run.driver.clone(), run.spec.size_bytes),
        _ => return,
    };
    if have == d.size_bytes {
        return;
    }
    let want = d.size_bytes;
    let drv = driver.clone();
    let res = match tokio::task::spawn_blocking(move || drv.resize(want)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let key = (d.pool.clone(), d.volume.clone());
    match res {
        Ok(()) => {
            info!(volume = %d.volume, from = have, to = want,
                usable = driver.usable_size(), "replica resized online");
            if let Some(run) = lock(&agent.repl.drivers).get_mut(&d.volume) {
                run.spec.size_bytes = want;
            }
            if !d.diskless {
                let mut t = write(&agent.table);
                if let Some(e) = t.entries.get_mut(&key) {
                    if let Some(m) = e.meta.as_mut() {
                        m.size_bytes = want;
                    }
                    if let Some(dev) = &e.device {
                        dev.set_size(want);
                    }
                    if e.last_error
                        .as_deref()
                        .is_some_and(|s| s.starts_with("resize"))
                    {
                        e.last_error = None;
                    }
                }
            }
        }
        Err(err) => {
            warn!(volume = %d.volume, from = have, to = want, "online resize failed: {err}");
            if !d.diskless {
                let mut t = write(&agent.table);
                if let Some(e) = t.entries.get_mut(&key) {
                    e.last_error = Some(format!(
                        "resize to {}: {err}",
                        tandem_types::format_size(want)
                    ));
                }
            }
        }
    }
}

/// The node's replication endpoint, started on first need.
async fn ensure_node(agent: &Arc<Agent>) -> Option<Arc<NodeReplication>> {
    if let Some(n) = agent.repl.node() {
        return Some(n);
    }
    let node_id = (*lock(&agent.node_id))?;
    let cluster_id = lock(&agent.cluster_id).clone()?;
    let secret_path = agent.config.state_dir.join(crate::CLUSTER_SECRET_FILE);
    let secret = match tandem_transport::load_secret_file(&secret_path) {
        Ok(s) => s,
        Err(e) => {
            note_node_failure(agent, format!("cluster secret: {e}"));
            return None;
        }
    };
    let listen = agent
        .repl_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let cfg = NodeConfig {
        cluster_id,
        secret,
        node_id,
        node_name: agent.config.node.clone(),
        listen,
        timers: Default::default(),
        limits: Default::default(),
    };
    let listener = lock(&agent.repl_listener).take();
    let started = match listener {
        Some(l) => NodeReplication::start_with_listener(cfg, l).await,
        None => NodeReplication::start(cfg).await,
    };
    match started {
        Ok(n) => {
            info!(node_id, addr = %n.local_addr(), "replication transport started");
            *lock(&agent.repl.node) = Some(n.clone());
            Some(n)
        }
        Err(e) => {
            note_node_failure(agent, e.to_string());
            None
        }
    }
}

fn note_node_failure(agent: &Agent, msg: String) {
    let mut f = lock(&agent.repl.node_failed);
    if f.as_deref() != Some(msg.as_str()) {
        error!("replication cannot start: {msg}");
        *f = Some(msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_name_peers() {
        let names: BTreeMap<u8, String> = [(0, "node1".to_string()), (2, "node3".to_string())]
            .into_iter()
            .collect();
        assert_eq!(
            name_nodes("promotion refused: node 0 is Primary", &names),
            "promotion refused: node1 (node id 0) is Primary"
        );
        assert_eq!(
            name_nodes("node 2 and node 7 and node 20, nodes", &names),
            "node3 (node id 2) and node 7 and node 20, nodes"
        );
        assert_eq!(name_nodes("no quorum: 1 of 3", &names), "no quorum: 1 of 3");
    }
}

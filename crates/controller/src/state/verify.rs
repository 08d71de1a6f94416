//! `volume verify`: an operation that asks the agent of the verify source (the Primary, else
//! an UpToDate diskful replica) to compare its replica with the others online, follows the
//! progress it reports, and keeps the result as the volume's `last_verify`.

use tandem_api::{
    DesiredVerify, DiskState, NodeState, Operation, ReplicaReport, VerifyReport, VerifyRequest,
};
use tandem_types::validate_name;

use super::{Controller, VolumeRecord};
use crate::error::Failure;
use crate::ops;

/// Operation kind of a verify.
pub(crate) const VERIFY: &str = "verify";
/// Finished verify operations kept with the volume (older ones are dropped at the next start).
const VERIFY_HISTORY: usize = 4;

/// The verify a volume's agent should run (kept with the volume while its operation runs).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct VerifyRecord {
    /// The operation id.
    pub id: String,
    /// The verify source.
    pub node: String,
    pub resync: bool,
}

impl Controller {
    /// `POST /v1/volumes/{name}/verify`: starts an online verify and returns its operation.
    /// Refused while one runs, for a single-replica volume, and when no diskful replica is
    /// online and UpToDate.
    pub fn start_verify(&self, name: &str, req: &VerifyRequest) -> Result<Operation, Failure> {
        validate_name("volume", name)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let diskful: Vec<&str> = v
            .placements
            .iter()
            .filter(|p| !p.diskless)
            .map(|p| p.node.as_str())
            .collect();
        if diskful.len() < 2 {
            return Err(Failure::conflict(
                "not_replicated",
                format!(
                    "volume '{name}' has a single diskful replica: there is nothing to compare it with"
                ),
            ));
        }
        if let Some(op) = v
            .operations
            .iter()
            .rev()
            .find(|o| o.kind == VERIFY && !ops::is_finished(o))
        {
            return Err(Failure::conflict(
                "verify_running",
                format!(
                    "a verify of volume '{name}' is already running (operation {}, {:.0} %)",
                    op.id,
                    op.progress * 100.0
                ),
            ));
        }
        let usable = |node: &str| {
            self.liveness(node).0 == NodeState::Online
                && nodes
                    .get(node)
                    .and_then(|n| n.replica(&v.name, &v.uuid))
                    .is_some_and(|r| r.disk_state == DiskState::UpToDate)
        };
        // The Primary when there is one (its writes are ordered with the verify); a node
        // reporting Primary counts even if the controller wants none.
        let reported_primary = diskful.iter().copied().find(|n| {
            nodes
                .get(*n)
                .and_then(|r| r.replica(&v.name, &v.uuid))
                .is_some_and(|r| r.role == tandem_api::Role::Primary)
        });
        let source = reported_primary
            .or(v.desired_primary())
            .filter(|n| usable(n))
            .or_else(|| diskful.iter().copied().find(|n| usable(n)))
            .map(str::to_string)
            .ok_or_else(|| {
                Failure::conflict(
                    "not_ready",
                    format!("no replica of volume '{name}' is online and UpToDate to verify from"),
                )
            })?;
        let now = super::now_unix();
        let op = ops::new(
            VERIFY,
            vec![ops::step(
                format!(
                    "verify from {source} against the other replicas{}",
                    if req.resync {
                        ", then resync differences"
                    } else {
                        ""
                    }
                ),
                Some(&source),
                ops::RUNNING,
            )],
            now,
        );
        v.verify_request = Some(VerifyRecord {
            id: op.id.clone(),
            node: source.clone(),
            resync: req.resync,
        });
        // Keep the last few finished verifies in the history, not every one ever run.
        let finished: Vec<String> = v
            .operations
            .iter()
            .filter(|o| o.kind == VERIFY && ops::is_finished(o))
            .map(|o| o.id.clone())
            .collect();
        if finished.len() > VERIFY_HISTORY {
            let drop = &finished[..finished.len() - VERIFY_HISTORY];
            v.operations.retain(|o| !drop.contains(&o.id));
        }
        v.operations.push(op.clone());
        self.write_volume(rev, &v)?;
        tracing::info!(volume = name, node = %source, resync = req.resync, id = %op.id, "verify started");
        Ok(op)
    }

    /// What the node's agent should run for `v` (only the verify source gets it).
    pub(crate) fn desired_verify(v: &VolumeRecord, node: &str) -> Option<DesiredVerify> {
        let r = v.verify_request.as_ref().filter(|r| r.node == node)?;
        v.operations
            .iter()
            .any(|o| o.id == r.id && !ops::is_finished(o))
            .then(|| DesiredVerify {
                id: r.id.clone(),
                resync: r.resync,
            })
    }

    /// Follows a running verify from the report of `node` (`current`: the report reflects
    /// the desired state of this revision). Returns whether `v` changed.
    pub(crate) fn verify_progress(
        v: &mut VolumeRecord,
        node: &str,
        report: &ReplicaReport,
        current: bool,
        now: u64,
    ) {
        let Some(req) = v.verify_request.clone().filter(|r| r.node == node) else {
            return;
        };
        let Some(op) = v
            .operations
            .iter_mut()
            .find(|o| o.id == req.id && !ops::is_finished(o))
        else {
            return;
        };
        let rep = report.verify.as_ref().filter(|r| r.id == req.id);
        match rep {
            Some(r) if r.state == "running" => {
                if r.total_bytes > 0 {
                    // Capped below 1.0: done is when the agent says so.
                    op.progress = (r.checked_bytes as f64 / r.total_bytes as f64).min(0.99);
                }
                op.eta_secs = r.eta_secs;
            }
            Some(r) if r.state == "done" => {
                ops::step_done(op, 0, now);
                tracing::info!(volume = %v.name, node, checked = r.checked_bytes,
                    different = r.different_bytes, "verify done");
                v.last_verify = Some(r.clone());
                v.verify_request = None;
            }
            Some(r) => {
                let err = r
                    .error
                    .clone()
                    .unwrap_or_else(|| format!("verify {}", r.state));
                ops::abort(op, &err, now);
                tracing::warn!(volume = %v.name, node, "verify failed: {err}");
                v.last_verify = Some(r.clone());
                v.verify_request = None;
            }
            None if current => {
                let err = format!(
                    "the agent on node '{node}' did not start the verify (its replication \
                     driver is not running or restarted); run it again"
                );
                ops::abort(op, &err, now);
                v.verify_request = None;
            }
            None => {}
        }
    }
}

/// The verify report of a replica view: the agent's running one, if any.
pub(crate) fn live_verify(report: Option<&ReplicaReport>) -> Option<VerifyReport> {
    report.and_then(|r| r.verify.clone())
}

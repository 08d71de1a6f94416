//! Split brain: the volume's automatic policy (`after_split_brain`) and the one-command manual
//! resolution `volume resolve-split-brain NAME --discard NODE`.

use tandem_api::{DesiredResolve, DiskState, NodeState, ReplicaReport, ResolveSplitBrain, Volume};
use tandem_types::validate_name;

use super::{Controller, Placement, VolumeRecord};
use crate::error::Failure;
use crate::ops;

/// Operation kind of a manual split-brain resolution.
pub(crate) const RESOLVE: &str = "resolve-split-brain";

/// A resolution the agents carry out (kept with the volume; agents act on each id once).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ResolveRecord {
    pub id: String,
    /// The node whose changes since the split are discarded.
    pub victim: String,
}

/// Checks a policy string against the volume's placements.
pub(crate) fn validate_policy(policy: &str, placements: &[Placement]) -> Result<(), Failure> {
    match policy {
        "disconnect" | "discard-zero-changes" | "discard-younger-primary" => Ok(()),
        other => match other.strip_prefix("discard-node:") {
            Some(n) if placements.iter().any(|p| p.node == n && !p.diskless) => Ok(()),
            Some(n) => Err(Failure::bad_request(
                "invalid_policy",
                format!(
                    "after_split_brain names node '{n}', which holds no diskful replica of the volume"
                ),
            )),
            None => Err(Failure::bad_request(
                "invalid_policy",
                format!(
                    "unknown after_split_brain policy '{other}': use disconnect, \
                     discard-zero-changes, discard-younger-primary or discard-node:NODE"
                ),
            )),
        },
    }
}

/// Whether a report shows an unresolved split brain (with `peer`, when given).
fn split_with(r: &ReplicaReport, peer: Option<&str>) -> bool {
    r.split_brain
        .iter()
        .any(|s| s.resolution.is_none() && peer.is_none_or(|p| s.peer == p))
        || r.peers
            .iter()
            .any(|p| p.repl_state == "SplitBrain" && peer.is_none_or(|n| p.node == n))
}

impl Controller {
    /// `POST /v1/volumes/{name}/resolve-split-brain`: `discard`'s changes since the split are
    /// discarded; it becomes sync target of the others, which keep theirs.
    pub fn resolve_split_brain(
        &self,
        name: &str,
        req: &ResolveSplitBrain,
    ) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        validate_name("node", &req.discard)?;
        let victim = req.discard.as_str();
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        if !v.placements.iter().any(|p| p.node == victim && !p.diskless) {
            return Err(Failure::conflict(
                "no_replica",
                format!("volume '{name}' has no diskful replica on node '{victim}'"),
            ));
        }
        let report = |node: &str| {
            nodes
                .get(node)
                .filter(|_| self.liveness(node).0 == NodeState::Online)
                .and_then(|n| n.replica(&v.name, &v.uuid))
        };
        let split: Vec<String> = v
            .placements
            .iter()
            .filter(|p| report(&p.node).is_some_and(|r| split_with(r, None)))
            .map(|p| p.node.clone())
            .collect();
        let victim_split = report(victim).is_some_and(|r| split_with(r, None))
            || v.placements
                .iter()
                .any(|p| report(&p.node).is_some_and(|r| split_with(r, Some(victim))));
        if split.is_empty() || !victim_split {
            return Err(Failure::conflict(
                "no_split_brain",
                if split.is_empty() {
                    format!(
                        "volume '{name}' has no split brain: no replica reports one (nothing to discard)"
                    )
                } else {
                    format!(
                        "node '{victim}' is not part of the split brain of volume '{name}' (reported by: {})",
                        split.join(", ")
                    )
                },
            ));
        }
        let keeper = v.placements.iter().find(|p| {
            !p.diskless
                && p.node != victim
                && report(&p.node).is_some_and(|r| r.disk_state == DiskState::UpToDate)
        });
        if keeper.is_none() {
            return Err(Failure::conflict(
                "only_up_to_date",
                format!(
                    "discarding the changes of node '{victim}' would drop the only UpToDate data of \
                     volume '{name}': no other replica is online and UpToDate"
                ),
            ));
        }
        if report(victim).is_some_and(|r| r.role == tandem_api::Role::Primary)
            || v.desired_primary() == Some(victim)
        {
            // The victim must not be Primary: the controller stops wanting it so (its agent
            // demotes it; consumers there lose the volume, as they must: its data goes).
            v.primary_node = v
                .placements
                .iter()
                .find(|p| !p.diskless && p.node != victim)
                .map(|p| p.node.clone());
            v.primary_explicit = true;
        }
        let now = super::now_unix();
        let op = ops::new(
            RESOLVE,
            vec![ops::step(
                format!(
                    "discard the changes of {victim} since the split; resync it from the others"
                ),
                Some(victim),
                ops::RUNNING,
            )],
            now,
        );
        v.resolve = Some(ResolveRecord {
            id: op.id.clone(),
            victim: victim.to_string(),
        });
        v.operations.push(op);
        self.write_volume(rev, &v)?;
        tracing::warn!(volume = name, victim, "split brain: resolution started");
        Ok(self.volume_view(&v, &nodes))
    }

    /// The resolution an agent should carry out for `v`.
    pub(crate) fn desired_resolve(v: &VolumeRecord, node: &str) -> Option<DesiredResolve> {
        let r = v.resolve.as_ref()?;
        let open = v
            .operations
            .iter()
            .any(|o| o.kind == RESOLVE && !ops::is_finished(o));
        (open && v.placements.iter().any(|p| p.node == node && !p.diskless)).then(|| {
            DesiredResolve {
                id: r.id.clone(),
                discard: r.victim == node,
            }
        })
    }

    /// Follows a resolution from the victim's report: done when it no longer waits to discard,
    /// is UpToDate, nothing out of sync and no split brain is reported.
    pub(crate) fn resolve_progress(
        v: &mut VolumeRecord,
        node: &str,
        report: &ReplicaReport,
        now: u64,
    ) {
        if v.resolve.as_ref().is_none_or(|r| r.victim != node) {
            return;
        }
        let Some(op) = v
            .operations
            .iter_mut()
            .find(|o| o.kind == RESOLVE && !ops::is_finished(o))
        else {
            return;
        };
        let settled = !report.discard_pending
            && report.disk_state == DiskState::UpToDate
            && report.out_of_sync_bytes == 0
            && report.split_brain.is_empty()
            && report.peers.iter().all(|p| p.repl_state == "Established");
        if settled {
            ops::step_done(op, 0, now);
            tracing::info!(volume = %v.name, node, "split brain resolved");
        } else if let Some(e) = &report.last_error {
            op.last_error = Some(e.clone());
        }
    }
}

//! The scripted split-brain scenario (`SimOptions::split_brain`), over the real engine on two
//! diskful nodes (0, 1) and a witness (2):
//!
//! 1. warm-up: node 0 Primary, the model-checked workload writes and reads;
//! 2. the 0-1 link is cut; node 0 keeps quorum through the witness and writes;
//! 3. node 0 is cut off and demoted; node 1 (behind, Outdated: the witness relayed that node 0
//!    wrote without it) is promoted with `promote_forced` and the witness's vote and
//!    (usually) writes: a real split brain, or, when it writes nothing, none;
//! 4. heal. The seed chose the volume's policy (`disconnect`, `discard-zero-changes`,
//!    `discard-younger-primary`, `discard-node:N`). Under `discard-younger-primary` node 1
//!    (promoted after node 0) is demoted before the heal and must be the policy's victim. If
//!    the pair stays split, the checker verifies nothing was merged and then runs the manual
//!    resolution on a victim the seed chose.
//!
//! Checked at the end: both replicas are byte-identical and equal to the kept side's data as it
//! was at the split (never a mix of both sides).

use std::collections::BTreeSet;

use bytes::Bytes;
use tandem_repl_proto::{NodeId, Role};
use tandem_replication::{Event, Nanos, RequestError, RequestId, SplitBrainPolicy};

use crate::model::{BLOCK, block_bytes};
use crate::rng::Rng;
use crate::world::{Ev, World, key};

const MS: Nanos = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    PrimaryWrites,
    PromoteOther,
    OtherWrites,
    Healing,
    Resolving,
    Done,
}

pub(crate) struct Scenario {
    pub(crate) policy: SplitBrainPolicy,
    /// The victim of the manual resolution if the pair stays split.
    manual_victim: NodeId,
    /// Node 1 writes after its promotion (false: no split brain at all).
    other_writes: bool,
    phase: Phase,
    /// A node refused its peer for good (split brain).
    pub(crate) split_seen: bool,
    pending: BTreeSet<RequestId>,
    /// Both diskful nodes' data when the split was complete.
    snap: Vec<Vec<u8>>,
    keep: Option<NodeId>,
}

impl Scenario {
    pub(crate) fn new(rng: &mut Rng) -> Scenario {
        let policy = match rng.range(0, 4) {
            0 => SplitBrainPolicy::Disconnect,
            1 => SplitBrainPolicy::DiscardZeroChanges,
            2 => SplitBrainPolicy::DiscardYoungerPrimary,
            _ => SplitBrainPolicy::DiscardNode(rng.range(0, 2) as NodeId),
        };
        Scenario {
            policy,
            manual_victim: rng.range(0, 2) as NodeId,
            other_writes: rng.chance(0.85),
            phase: Phase::Warmup,
            split_seen: false,
            pending: BTreeSet::new(),
            snap: Vec::new(),
            keep: None,
        }
    }

    pub(crate) fn done(&self) -> bool {
        self.phase == Phase::Done
    }
}

impl World {
    fn sb(&mut self) -> &mut Scenario {
        self.sb.as_mut().expect("split-brain scenario")
    }

    fn role(&self, n: NodeId) -> Option<Role> {
        self.nodes[n as usize].engine.as_ref().map(|e| e.role())
    }

    /// A scripted write of `n` blocks from `first` on `node`, outside the model.
    fn sb_write(&mut self, node: NodeId, first: u64, n: u64) -> Result<(), String> {
        let id = self.next_req;
        self.next_req += 1;
        let w = self.next_write;
        self.next_write += 1;
        let mut data = Vec::with_capacity((n * BLOCK) as usize);
        for b in first..first + n {
            data.extend_from_slice(&block_bytes(w, b));
        }
        self.sb().pending.insert(id);
        self.tr(format!(
            "scenario: write w{w} blocks {first}+{n} on node {node}"
        ));
        self.feed(
            node,
            Event::Write {
                id,
                offset: first * BLOCK,
                data: Bytes::from(data),
                fua: false,
            },
        )
    }

    fn sb_writes(&mut self, node: NodeId) -> Result<(), String> {
        let blocks = self.size_blocks();
        for _ in 0..self.rng.range(1, 5) {
            let n = self.rng.range(1, 9).min(blocks);
            let first = self.rng.range(0, blocks - n + 1);
            self.sb_write(node, first, n)?;
        }
        Ok(())
    }

    fn size_blocks(&self) -> u64 {
        self.nodes[0].disk.data.len() as u64 / BLOCK
    }

    /// Completion of a scripted write: true when it was one.
    pub(crate) fn sb_completed(
        &mut self,
        node: NodeId,
        id: RequestId,
        result: &Result<tandem_replication::Reply, RequestError>,
    ) -> Result<bool, String> {
        let Some(sb) = self.sb.as_mut() else {
            return Ok(false);
        };
        if !sb.pending.remove(&id) {
            return Ok(false);
        }
        if let Err(e) = result {
            return Err(format!(
                "split-brain scenario: scripted write {id} on node {node} failed: {e}"
            ));
        }
        Ok(true)
    }

    fn try_promote(&mut self, n: NodeId) -> Result<bool, String> {
        let now = self.now;
        let Some(e) = self.nodes[n as usize].engine.as_mut() else {
            return Ok(false);
        };
        // Forced, as an operator must: node 1 learned through the witness that node 0 wrote
        // without it (Outdated), and a plain promotion is refused.
        match e.promote_forced(now) {
            Ok(a) => {
                self.tr(format!("scenario: promoted node {n} (forced)"));
                self.apply(n, a)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    fn demote(&mut self, n: NodeId) -> Result<(), String> {
        let now = self.now;
        if let Some(e) = self.nodes[n as usize].engine.as_mut()
            && e.role() == Role::Primary
        {
            let a = e
                .demote(now)
                .map_err(|e| format!("scenario: demote {n}: {e}"))?;
            self.tr(format!("scenario: demoted node {n}"));
            self.apply(n, a)?;
        }
        Ok(())
    }

    fn reconnect(&mut self, a: NodeId, b: NodeId) {
        self.blocked.remove(&key(a, b));
        let t = self.now + self.rng.range(10_000, MS);
        self.at(t, Ev::Reconnect { a, b });
    }

    pub(crate) fn sb_step(&mut self) -> Result<(), String> {
        let phase = self.sb().phase;
        let pending = !self.sb().pending.is_empty();
        match phase {
            Phase::Warmup => {
                if self.role(0) != Some(Role::Primary) {
                    self.try_promote(0)?;
                    return Ok(());
                }
                if self.now < 20 * MS {
                    return self.workload_step();
                }
                if !self.reqs_empty() || !self.converged() {
                    return Ok(());
                }
                self.tr("scenario: cut link 0-1".into());
                self.blocked.insert(key(0, 1));
                self.break_link(0, 1)?;
                self.sb_writes(0)?;
                self.sb().phase = Phase::PrimaryWrites;
            }
            Phase::PrimaryWrites if !pending => {
                self.tr("scenario: node 0 cut off and demoted".into());
                self.nodes[0].isolated = true;
                self.break_link(0, 2)?;
                self.demote(0)?;
                self.sb().phase = Phase::PromoteOther;
            }
            Phase::PromoteOther if self.try_promote(1)? => {
                if self.sb().other_writes {
                    self.sb_writes(1)?;
                }
                self.sb().phase = Phase::OtherWrites;
            }
            Phase::OtherWrites if !pending => {
                self.sb().snap = vec![
                    self.nodes[0].disk.data.clone(),
                    self.nodes[1].disk.data.clone(),
                ];
                if !self.sb().other_writes
                    || self.sb().policy == SplitBrainPolicy::DiscardYoungerPrimary
                {
                    // It wrote nothing: no split brain; as a Secondary it resyncs from node 0
                    // (a Primary with quorum never becomes sync target). Under
                    // discard-younger-primary it is the younger Primary (promoted after node
                    // 0): demoted, it is the victim the policy picks.
                    self.demote(1)?;
                }
                self.tr("scenario: heal".into());
                self.nodes[0].isolated = false;
                self.reconnect(0, 1);
                self.reconnect(0, 2);
                self.sb().phase = Phase::Healing;
            }
            Phase::Healing => {
                // Both ends refused each other and the link is down (as the agents' resolution
                // reconnects every node involved, not just the victim).
                let both_split = self.links.get(&key(0, 1)).copied().flatten().is_none()
                    && [0u8, 1].iter().all(|n| {
                        self.nodes[*n as usize].engine.as_ref().is_some_and(|e| {
                            e.status()
                                .peers
                                .iter()
                                .any(|p| p.diskful && p.split_brain.is_some())
                        })
                    });
                if self.sb().split_seen && both_split {
                    // Nothing merged: both sides still hold exactly their own data.
                    for n in [0u8, 1] {
                        let snap = &self.sb.as_ref().expect("scenario").snap[n as usize];
                        if self.nodes[n as usize].disk.data != *snap {
                            return Err(format!(
                                "split brain: node {n}'s data changed before any resolution (merged?)"
                            ));
                        }
                    }
                    let victim = self.sb().manual_victim;
                    self.tr(format!(
                        "scenario: manual resolution, node {victim} discards"
                    ));
                    self.demote(victim)?;
                    let now = self.now;
                    let e = self.nodes[victim as usize].engine.as_mut().expect("live");
                    let a = e
                        .discard_my_data(now)
                        .map_err(|e| format!("discard_my_data refused: {e}"))?;
                    self.apply(victim, a)?;
                    self.sb().keep = Some(1 - victim);
                    self.out.split_brain = Some(format!("manual: node {victim} discards"));
                    self.reconnect(0, 1);
                    self.sb().phase = Phase::Resolving;
                } else if !self.sb().split_seen && self.converged() {
                    let (keep, how) = match (self.sb().other_writes, self.sb().policy) {
                        (false, _) => (0, "no split brain (node 1 wrote nothing)".to_string()),
                        (true, SplitBrainPolicy::DiscardNode(0)) => {
                            (1, "policy discard-node 0".to_string())
                        }
                        (true, SplitBrainPolicy::DiscardYoungerPrimary) => (
                            0,
                            "policy discard-younger-primary: node 1 discards".to_string(),
                        ),
                        (true, p) => {
                            return Err(format!(
                                "split brain resolved by itself under policy {p:?}: both sides wrote and node 1 is Primary with quorum"
                            ));
                        }
                    };
                    self.sb().keep = Some(keep);
                    self.out.split_brain = Some(how);
                    self.sb().phase = Phase::Done;
                }
            }
            Phase::Resolving if self.converged() => self.sb().phase = Phase::Done,
            _ => {}
        }
        Ok(())
    }

    /// Both replicas identical and equal to the kept side's data at the split.
    pub(crate) fn sb_final_check(&mut self) -> Result<(), String> {
        let sb = self.sb.as_ref().expect("scenario");
        let keep = sb.keep.ok_or("scenario ended without a kept side")?;
        let (d0, d1) = (&self.nodes[0].disk.data, &self.nodes[1].disk.data);
        if d0 != d1 {
            let b = d0
                .chunks(BLOCK as usize)
                .zip(d1.chunks(BLOCK as usize))
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Err(format!(
                "split brain: replicas differ after the resolution (first block {b})"
            ));
        }
        if *d0 != sb.snap[keep as usize] {
            let other = &sb.snap[1 - keep as usize];
            let b = d0
                .chunks(BLOCK as usize)
                .zip(sb.snap[keep as usize].chunks(BLOCK as usize))
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            let from_other = d0[b * BLOCK as usize..(b + 1) * BLOCK as usize]
                == other[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            return Err(format!(
                "split brain: the replicas are not node {keep}'s data (block {b} differs{})",
                if from_other {
                    ": it holds the discarded side's write (merged)"
                } else {
                    ""
                }
            ));
        }
        Ok(())
    }
}

//! Split brain: automatic policies applied at the handshake, the manual resolution
//! (`discard_my_data`), and what status shows about it.
//!
//! `decide` detects split brain (rules `SplitBrain*`): both sides wrote since they last were in
//! sync. Without a resolution the link is closed for good (`Disconnect{SplitBrain}`,
//! `reconnect: false`) and the data is never merged. A resolution picks a *victim*: its
//! changes since the split are discarded, it becomes sync target of the other side (bitmap-based
//! when both sides recorded the split against the same generation, rules
//! `SplitBrainSameBitmap` / `SplitBrainCrossedBitmaps`: the union of both bitmaps covers every
//! block either side wrote; full for `SplitBrainCommonAncestor`). Both ends run the same pure
//! choice on the same inputs (both bitmaps are exchanged before the decision, the policy is the
//! volume's), so they agree on the direction without another round trip.

use super::*;

impl Engine {
    /// Manual resolution on the victim: this node's changes since a split brain are to be
    /// discarded. Its next handshake that finds split brain makes it sync target (its reports
    /// carry `DISCARD_MY_DATA`); other handshakes are unaffected. Refused on a witness and on
    /// the Primary (demote it first). Also clears the refusal to reconnect: the driver should
    /// reconnect its links after this (`Action`s are empty; the driver owns the links).
    pub fn discard_my_data(&mut self, now: Nanos) -> Result<Vec<Action>, ResolveError> {
        self.now = self.now.max(now);
        if !self.cfg.diskful {
            return Err(ResolveError::Diskless);
        }
        if self.role == Role::Primary {
            return Err(ResolveError::Primary);
        }
        if !self.discard_my_data {
            self.discard_my_data = true;
            self.log(
                Level::Warn,
                "split brain resolution: this node discards its changes since the split at the next handshake"
                    .into(),
            );
            self.broadcast_report(false);
        }
        Ok(self.take_out())
    }

    /// Changes the split-brain policy (applies from the next handshake).
    pub fn set_split_brain_policy(&mut self, policy: SplitBrainPolicy) {
        if self.cfg.after_split_brain != policy {
            self.cfg.after_split_brain = policy;
        }
    }

    /// Turns checksum-based resync on or off (`Config::resync_checksums`), from the next
    /// chunk a resync target requests.
    pub fn set_resync_checksums(&mut self, on: bool) {
        self.cfg.resync_checksums = on;
    }

    /// Whether this node will discard its data at the next split-brain handshake.
    pub fn discards_my_data(&self) -> bool {
        self.discard_my_data
    }

    /// The handshake found split brain: applies the manual resolution or the volume's policy.
    /// Returns the decision to carry out instead (`None`: stay split, disconnect for good),
    /// and records what status shows.
    pub(super) fn resolve_split_brain(
        &mut self,
        peer: NodeId,
        rule: Rule,
        peer_flags: u32,
        peer_epoch: u64,
    ) -> Option<SyncDecision> {
        let g = self.cfg.bitmap_granularity;
        let our_bytes = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
        // The peer's bits as it sent them (ranges may overlap block boundaries: count blocks).
        let peer_bytes = self.conn(peer).map_or(0, |c| {
            let mut b = Bitmap::new(self.cfg.size_bytes, g);
            for r in &c.bitmap_rx {
                b.set_range(r.offset, r.len);
            }
            b.out_of_sync_bytes()
        });
        let me = self.cfg.node_id;
        let peer_discards = peer_flags & state_flags::DISCARD_MY_DATA != 0;
        // Some(true): we keep our data (source); Some(false): we are the victim (target).
        let choice: Option<(bool, String)> = if peer_discards != self.discard_my_data {
            Some((
                peer_discards,
                format!(
                    "manual resolution: node {} discards its changes",
                    if peer_discards { peer } else { me }
                ),
            ))
        } else if peer_discards {
            None // both asked to discard: nothing to keep, an operator must choose
        } else {
            match self.cfg.after_split_brain {
                SplitBrainPolicy::Disconnect => None,
                SplitBrainPolicy::DiscardNode(n) if n == me || n == peer => Some((
                    n == peer,
                    format!("policy discard-node {n}: node {n} discards its changes"),
                )),
                SplitBrainPolicy::DiscardNode(_) => None,
                SplitBrainPolicy::DiscardYoungerPrimary => {
                    let ours = self.meta.primary_epoch;
                    let (younger, epoch, older) = if ours > peer_epoch {
                        (me, ours, peer_epoch)
                    } else {
                        (peer, peer_epoch, ours)
                    };
                    (ours != peer_epoch).then(|| {
                        (
                            younger == peer,
                            format!(
                                "policy discard-younger-primary: node {younger} became Primary \
                                 more recently (epoch {epoch} > {older}) and discards its changes"
                            ),
                        )
                    })
                }
                SplitBrainPolicy::DiscardZeroChanges => match (our_bytes == 0, peer_bytes == 0) {
                    (false, false) => None,
                    (true, true) => Some((
                        me < peer,
                        "policy discard-zero-changes: neither side wrote; the lower node id keeps its generation".into(),
                    )),
                    (ours, _) => Some((
                        !ours,
                        format!(
                            "policy discard-zero-changes: node {} wrote nothing since the split",
                            if ours { me } else { peer }
                        ),
                    )),
                },
            }
        };
        // A Primary with quorum is never made a victim automatically.
        let choice =
            choice.filter(|(keep, _)| *keep || !(self.role == Role::Primary && self.has_quorum()));
        let full = rule == Rule::SplitBrainCommonAncestor;
        let decision = choice.as_ref().map(|(keep, _)| match (keep, full) {
            (true, false) => SyncDecision::BitmapSource,
            (true, true) => SyncDecision::FullSource,
            (false, false) => SyncDecision::BitmapTarget,
            (false, true) => SyncDecision::FullTarget,
        });
        let resolution = choice.map(|(_, why)| why);
        self.log(
            Level::Warn,
            format!(
                "split brain with node {peer} (rule {rule:?}): we wrote {our_bytes} bytes, it wrote {peer_bytes} bytes since the split; {}",
                resolution.clone().unwrap_or_else(|| format!(
                    "policy {:?} does not resolve it: disconnected, data not merged",
                    self.cfg.after_split_brain
                ))
            ),
        );
        if let Some(p) = self.peers.get_mut(&peer) {
            p.split_brain = Some(SplitBrainStatus {
                rule,
                our_bytes,
                peer_bytes,
                resolution,
            });
        }
        decision
    }

    /// After a handshake without split brain: what status showed about an old one is settled.
    pub(super) fn clear_split_brain(&mut self, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && p.split_brain
                .as_ref()
                .is_some_and(|s| s.resolution.is_none())
        {
            p.split_brain = None;
        }
    }

    /// A resync as target finished: a discard request is fulfilled.
    pub(super) fn split_brain_resynced(&mut self, source: NodeId) {
        if self.discard_my_data {
            self.discard_my_data = false;
            self.log(
                Level::Info,
                format!("split brain resolved: our data is node {source}'s again"),
            );
        }
        if let Some(p) = self.peers.get_mut(&source) {
            p.split_brain = None;
        }
    }
}

/// Why a split-brain resolution was refused by the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("a witness has no data to discard")]
    Diskless,
    #[error("this node is Primary: demote it before discarding its data")]
    Primary,
}

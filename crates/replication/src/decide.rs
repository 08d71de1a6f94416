//! The handshake decision: given both sides' generations, who (if anyone) resyncs from whom.
//! Pure and symmetric: `decide(a, b)` is the mirror image of `decide(b, a)`, so both ends of
//! a link reach the same conclusion independently. In the spirit of DRBD's `uuid_compare`,
//! rules are evaluated in a fixed order and the one that decided is returned for logs/status.

use tandem_repl_proto::{Generation, LostWriter, NodeId};

/// One side's input to the decision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SideView {
    pub node_id: NodeId,
    pub current: Generation,
    /// Bitmap generation toward the other side (0 = in sync / none).
    pub bitmap: Generation,
    pub history: [Generation; 2],
    /// Bitmap generations toward third nodes.
    pub other_bitmaps: Vec<Generation>,
    /// Disk is UpToDate (false: Inconsistent).
    pub up_to_date: bool,
    pub primary: bool,
    /// Was Primary and crashed (not demoted cleanly) before this start.
    pub crashed_primary: bool,
    /// Has out-of-sync bits toward the other side.
    pub has_bits: bool,
    /// The Primary this side lost at its current generation and the last write it received
    /// from it.
    pub lost_writer: Option<LostWriter>,
    /// The promotion epoch its metadata holds (`Meta::primary_epoch`: one more than the
    /// highest it had seen when it last became Primary, 0 = never).
    pub primary_epoch: u64,
}

/// What the local side does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Identical, nothing to transfer.
    NoSync,
    /// Local side sends the blocks in the merged bitmap.
    BitmapSource,
    /// Local side receives the blocks in the merged bitmap.
    BitmapTarget,
    /// Local side sends everything.
    FullSource,
    /// Local side receives everything.
    FullTarget,
    /// Both sides changed data independently: disconnect, an operator picks the victim.
    SplitBrain,
    /// No common history: a replica of something else.
    UnrelatedData,
    /// Neither side has good data to give (both Inconsistent).
    NoGoodData,
}

impl SyncDecision {
    /// The mirror image (what the other side decides).
    pub fn mirror(self) -> SyncDecision {
        use SyncDecision::*;
        match self {
            BitmapSource => BitmapTarget,
            BitmapTarget => BitmapSource,
            FullSource => FullTarget,
            FullTarget => FullSource,
            other => other,
        }
    }
    pub fn is_source(self) -> bool {
        matches!(self, SyncDecision::BitmapSource | SyncDecision::FullSource)
    }
    pub fn is_target(self) -> bool {
        matches!(self, SyncDecision::BitmapTarget | SyncDecision::FullTarget)
    }
}

/// The rule that decided, in evaluation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Both Inconsistent.
    BothInconsistent,
    /// One side is a new member of an existing volume (Inconsistent, no generation at all:
    /// it never held data of this volume): it receives everything.
    NewMember,
    /// Equal current generations, no bits anywhere, both UpToDate.
    EqualNoBits,
    /// Equal current generations, exactly one side Inconsistent (interrupted resync): it is
    /// the target.
    EqualInconsistent,
    /// Equal generations: one side lost the other as its Primary in a promotion the other
    /// no longer holds (its metadata failed as it was promoted; it came back from older
    /// metadata, after a crash that may have cost its cache writes it had acknowledged,
    /// which no side may know all of): that side is the source, in full.
    EqualLostPromotion,
    /// Equal generations with bits: the Primary is the source.
    EqualBitsPrimary,
    /// Equal generations with bits: the crashed Primary is the target (its activity-log
    /// regions may have lost acknowledged writes that the peer has).
    EqualBitsCrashedPrimary,
    /// Equal generations with bits: one side lost its link to a Primary at this generation
    /// (it may lack that Primary's last writes), the other did not: the other is the source.
    EqualBitsLostPrimary,
    /// Equal generations with bits: only one side has a bitmap generation toward the other
    /// (it recorded that the other side missed writes, and the other side caught up through
    /// a third node since, which may not have known all of them): it is the source.
    EqualBitsPeerMissedWrites,
    /// Equal generations, only one side has bits: it is the source.
    EqualBitsOneSide,
    /// Equal generations, both have bits, nothing above decided: both sides lost the same
    /// Primary (same promotion) and one received a later write of it: it is the source (it
    /// holds every write that Primary completed; the other may lack the last ones).
    EqualBitsLaterWrites,
    /// Equal generations, both have bits: the lower node id is the source.
    EqualBitsLowerNode,
    /// The other side's bitmap generation toward us is our current: we are behind, bitmap.
    PeerBitmapIsOurCurrent,
    /// Our bitmap generation toward the other side is its current: it is behind, bitmap.
    OurBitmapIsPeerCurrent,
    /// Our current is a bitmap generation of the other side toward a third node: full.
    PeerThirdBitmapIsOurCurrent,
    /// The other side's current is one of our bitmap generations toward a third node: full.
    OurThirdBitmapIsPeerCurrent,
    /// Our current is in the other side's history: we are behind, full.
    OurCurrentInPeerHistory,
    /// The other side's current is in our history: it is behind, full.
    PeerCurrentInOurHistory,
    /// Equal non-zero bitmap generations, different currents: both wrote since the split.
    SplitBrainSameBitmap,
    /// Each side's bitmap generation is the other's current.
    SplitBrainCrossedBitmaps,
    /// A common ancestor exists somewhere: split brain.
    SplitBrainCommonAncestor,
    /// Nothing in common.
    Unrelated,
    /// The generations say the other side is newer but it is not UpToDate; wait.
    SourceNotUpToDate,
}

impl Rule {
    /// The same rule seen from the other side.
    pub fn mirror(self) -> Rule {
        use Rule::*;
        match self {
            PeerBitmapIsOurCurrent => OurBitmapIsPeerCurrent,
            OurBitmapIsPeerCurrent => PeerBitmapIsOurCurrent,
            PeerThirdBitmapIsOurCurrent => OurThirdBitmapIsPeerCurrent,
            OurThirdBitmapIsPeerCurrent => PeerThirdBitmapIsOurCurrent,
            OurCurrentInPeerHistory => PeerCurrentInOurHistory,
            PeerCurrentInOurHistory => OurCurrentInPeerHistory,
            other => other,
        }
    }
}

fn nz(g: Generation) -> bool {
    g != 0
}

/// Decides what `me` does toward `peer`. Symmetric: see the module docs.
pub fn decide(me: &SideView, peer: &SideView) -> (SyncDecision, Rule) {
    use SyncDecision::*;
    if !me.up_to_date && !peer.up_to_date {
        return (NoGoodData, Rule::BothInconsistent);
    }
    let new_member = |s: &SideView| !s.up_to_date && s.current == 0;
    if new_member(me) {
        return (FullTarget, Rule::NewMember);
    }
    if new_member(peer) {
        return (FullSource, Rule::NewMember);
    }
    if me.current == peer.current && nz(me.current) {
        if me.up_to_date != peer.up_to_date {
            let d = if me.up_to_date {
                BitmapSource
            } else {
                BitmapTarget
            };
            return (d, Rule::EqualInconsistent);
        }
        // `s` lost `other` as its Primary (promotion epoch `l.epoch`, at this generation,
        // still recorded behind: bitmap generation toward it our current) and `other` reports
        // an older epoch: that promotion never reached its metadata. A promotion is durable
        // before the Primary's first write, so its disk holds no write of it; and its
        // metadata failed (the disk detached at the promotion), so it came back from a crash
        // of a failing disk whose cache may have lost writes it had acknowledged as a
        // Secondary. Only the Primary of that moment knew those, and it may not be `s` (or
        // anyone still up): its bits, or ours, are no measure. Simulator seed 2595: the new
        // Primary found it equal without bits and counted it in sync; the old one, holding
        // the marks, then became its target by `EqualBitsLostPrimary`.
        let lost_promotion = |s: &SideView, other: &SideView| {
            !other.primary
                && s.bitmap == s.current
                && s.lost_writer
                    .is_some_and(|l| l.node == other.node_id && l.epoch > other.primary_epoch)
        };
        if lost_promotion(me, peer) != lost_promotion(peer, me) {
            return (
                if lost_promotion(me, peer) {
                    FullSource
                } else {
                    FullTarget
                },
                Rule::EqualLostPromotion,
            );
        }
        if !me.has_bits && !peer.has_bits {
            return (NoSync, Rule::EqualNoBits);
        }
        if me.primary != peer.primary {
            return (
                if me.primary {
                    BitmapSource
                } else {
                    BitmapTarget
                },
                Rule::EqualBitsPrimary,
            );
        }
        if me.crashed_primary != peer.crashed_primary {
            // Unlike DRBD (which makes the crashed Primary the source, for protocols A/B):
            // with protocol C every acknowledged write is on the peers, while the crashed
            // node lost its volatile cache. Its activity-log regions are fetched from the peer.
            return (
                if me.crashed_primary {
                    BitmapTarget
                } else {
                    BitmapSource
                },
                Rule::EqualBitsCrashedPrimary,
            );
        }
        // A side that lost its link to a Primary at this generation (its bitmap generation
        // toward the peer or a third node is its own current) may lack that Primary's last
        // writes; the other side is the better source. When that Primary is the peer itself
        // (neither Primary now nor a crashed one), what we may lack from it are its bits
        // toward us: without any, it holds nothing we lack (simulator seed 1154: its disk
        // failed with its metadata, it restarted at our generation without the writes we
        // marked toward it, and we must be its source).
        let lost_primary = |s: &SideView, other: &SideView| {
            nz(s.current)
                && ((s.bitmap == s.current && other.has_bits)
                    || s.other_bitmaps.contains(&s.current))
        };
        if lost_primary(me, peer) != lost_primary(peer, me) {
            return (
                if lost_primary(me, peer) {
                    BitmapTarget
                } else {
                    BitmapSource
                },
                Rule::EqualBitsLostPrimary,
            );
        }
        let knows_missed = |s: &SideView| s.has_bits && nz(s.bitmap) && s.bitmap != s.current;
        if knows_missed(me) != knows_missed(peer) {
            return (
                if knows_missed(me) {
                    BitmapSource
                } else {
                    BitmapTarget
                },
                Rule::EqualBitsPeerMissedWrites,
            );
        }
        if me.has_bits != peer.has_bits {
            return (
                if me.has_bits {
                    BitmapSource
                } else {
                    BitmapTarget
                },
                Rule::EqualBitsOneSide,
            );
        }
        // Bits on both sides and nothing above tells: if both lost the same Primary, the one
        // that received its later write holds every write it completed (simulator seed 4896).
        // Last, so that it only replaces the arbitrary pick below: a record is kept until
        // the generation changes or a resync replaces our data, and knowledge of missed
        // writes above is more precise (seed 1662, where both had been back with that
        // Primary since).
        if let (Some(a), Some(b)) = (me.lost_writer, peer.lost_writer)
            && a.node == b.node
            && a.epoch == b.epoch
            && a.seq != b.seq
        {
            return (
                if a.seq > b.seq {
                    BitmapSource
                } else {
                    BitmapTarget
                },
                Rule::EqualBitsLaterWrites,
            );
        }
        return (
            if me.node_id < peer.node_id {
                BitmapSource
            } else {
                BitmapTarget
            },
            Rule::EqualBitsLowerNode,
        );
    }
    let (d, r) = decide_by_lineage(me, peer);
    // The source must have good data.
    if (d.is_target() && !peer.up_to_date) || (d.is_source() && !me.up_to_date) {
        return (NoGoodData, Rule::SourceNotUpToDate);
    }
    (d, r)
}

/// Whether the peer holds newer data than `me` by the generations alone (it would be our
/// source if it were UpToDate). Meant for a decision by rule `SourceNotUpToDate`, which does
/// not say which side is the newer one: when it is the peer, we lack writes it holds (an
/// Outdated peer is still newer than us), and must not be promoted nor, as Primary, count
/// it as a voter (simulator seed 9439).
pub fn peer_is_newer(me: &SideView, peer: &SideView) -> bool {
    me.current != peer.current && decide_by_lineage(me, peer).0.is_target()
}

fn decide_by_lineage(me: &SideView, peer: &SideView) -> (SyncDecision, Rule) {
    use SyncDecision::*;
    let behind = nz(peer.bitmap) && peer.bitmap == me.current;
    let ahead = nz(me.bitmap) && me.bitmap == peer.current;
    if behind && ahead {
        // Each side believes the other one is behind: both wrote.
        return (SplitBrain, Rule::SplitBrainCrossedBitmaps);
    }
    if behind {
        return (BitmapTarget, Rule::PeerBitmapIsOurCurrent);
    }
    if ahead {
        return (BitmapSource, Rule::OurBitmapIsPeerCurrent);
    }
    let behind3 = nz(me.current) && peer.other_bitmaps.contains(&me.current);
    let ahead3 = nz(peer.current) && me.other_bitmaps.contains(&peer.current);
    if behind3 && !ahead3 {
        return (FullTarget, Rule::PeerThirdBitmapIsOurCurrent);
    }
    if ahead3 && !behind3 {
        return (FullSource, Rule::OurThirdBitmapIsPeerCurrent);
    }
    let mine_in_peer = nz(me.current) && peer.history.contains(&me.current);
    let peer_in_mine = nz(peer.current) && me.history.contains(&peer.current);
    if mine_in_peer && !peer_in_mine {
        return (FullTarget, Rule::OurCurrentInPeerHistory);
    }
    if peer_in_mine && !mine_in_peer {
        return (FullSource, Rule::PeerCurrentInOurHistory);
    }
    if nz(me.bitmap) && me.bitmap == peer.bitmap {
        return (SplitBrain, Rule::SplitBrainSameBitmap);
    }
    let ancestors = |s: &SideView| {
        let mut v = vec![s.current, s.bitmap, s.history[0], s.history[1]];
        v.extend(&s.other_bitmaps);
        v.retain(|g| nz(*g));
        v
    };
    let a = ancestors(me);
    if ancestors(peer).iter().any(|g| a.contains(g)) {
        return (SplitBrain, Rule::SplitBrainCommonAncestor);
    }
    (UnrelatedData, Rule::Unrelated)
}

#[cfg(test)]
mod tests {
    use super::SyncDecision::*;
    use super::*;

    fn side(id: NodeId, current: u64, bitmap: u64, history: [u64; 2]) -> SideView {
        SideView {
            node_id: id,
            current,
            bitmap,
            history,
            up_to_date: true,
            ..SideView::default()
        }
    }

    /// A side at generation 10 with bits toward the other that lost Primary `writer` (in
    /// its promotion `epoch`) after receiving its write `seq`.
    fn lost(id: NodeId, writer: NodeId, epoch: u64, seq: u64) -> SideView {
        SideView {
            other_bitmaps: vec![10],
            has_bits: true,
            lost_writer: Some(LostWriter {
                node: writer,
                epoch,
                seq,
            }),
            ..side(id, 10, 0, [0, 0])
        }
    }

    /// (name, me, peer, expected decision for me, rule)
    fn cases() -> Vec<(&'static str, SideView, SideView, SyncDecision, Rule)> {
        let a = side(1, 10, 0, [0, 0]);
        let b = side(2, 10, 0, [0, 0]);
        let mut crashed = a.clone();
        crashed.crashed_primary = true;
        crashed.has_bits = true;
        let mut b_bits = b.clone();
        b_bits.has_bits = true;
        let mut a_primary = a.clone();
        a_primary.primary = true;
        a_primary.has_bits = true;
        let mut a_incons = a.clone();
        a_incons.up_to_date = false;
        let mut a_bits = a.clone();
        a_bits.has_bits = true;
        let mut b_incons = b.clone();
        b_incons.up_to_date = false;
        let mut third_a = side(1, 20, 0, [10, 0]);
        third_a.other_bitmaps = vec![5];
        let mut missed_a = a_bits.clone();
        missed_a.bitmap = 7;
        let mut lost_primary_b = b_bits.clone();
        lost_primary_b.other_bitmaps = vec![10];
        let mut lost_primary_a = missed_a.clone();
        lost_primary_a.bitmap = 10;
        // Node 2 lost node 1 as its Primary in epoch 7 (recorded behind at generation 10);
        // node 1 is back from metadata of epoch 6, with or without bits of its own.
        let lost_promotion_b = SideView {
            bitmap: 10,
            lost_writer: Some(LostWriter {
                node: 1,
                epoch: 7,
                seq: 3,
            }),
            ..b.clone()
        };
        let back_without_promotion = SideView {
            primary_epoch: 6,
            has_bits: true,
            ..a.clone()
        };
        let back_with_promotion = SideView {
            primary_epoch: 7,
            ..back_without_promotion.clone()
        };
        let mut stale_incons_source = side(2, 20, 10, [10, 0]);
        stale_incons_source.up_to_date = false;
        vec![
            (
                "day0 equal",
                a.clone(),
                b.clone(),
                NoSync,
                Rule::EqualNoBits,
            ),
            (
                "crashed primary is target",
                crashed.clone(),
                b.clone(),
                BitmapTarget,
                Rule::EqualBitsCrashedPrimary,
            ),
            (
                "peer of crashed primary is source",
                b.clone(),
                crashed,
                BitmapSource,
                Rule::EqualBitsCrashedPrimary,
            ),
            (
                "primary with bits",
                a_primary,
                b_bits.clone(),
                BitmapSource,
                Rule::EqualBitsPrimary,
            ),
            (
                "one side bits",
                a.clone(),
                b_bits.clone(),
                BitmapTarget,
                Rule::EqualBitsOneSide,
            ),
            (
                "peer caught up elsewhere, we know what it missed",
                missed_a.clone(),
                b_bits.clone(),
                BitmapSource,
                Rule::EqualBitsPeerMissedWrites,
            ),
            (
                "peer lost its Primary at this generation",
                missed_a,
                lost_primary_b.clone(),
                BitmapSource,
                Rule::EqualBitsLostPrimary,
            ),
            (
                "we lost the peer as our Primary at this generation",
                lost_primary_a,
                b_bits.clone(),
                BitmapTarget,
                Rule::EqualBitsLostPrimary,
            ),
            (
                "back without the promotion we lost it in: full target, bits or not",
                back_without_promotion.clone(),
                lost_promotion_b.clone(),
                FullTarget,
                Rule::EqualLostPromotion,
            ),
            (
                "back without the promotion, no bits anywhere",
                SideView {
                    has_bits: false,
                    ..back_without_promotion
                },
                lost_promotion_b.clone(),
                FullTarget,
                Rule::EqualLostPromotion,
            ),
            (
                "back with the promotion we lost it in: it may hold writes we lack",
                back_with_promotion,
                SideView {
                    has_bits: true,
                    ..lost_promotion_b
                },
                BitmapSource,
                Rule::EqualBitsLostPrimary,
            ),
            (
                "both bits lower id",
                a_bits,
                b_bits,
                BitmapSource,
                Rule::EqualBitsLowerNode,
            ),
            (
                "both lost the same Primary: the later write decides",
                lost(1, 3, 7, 65),
                lost(2, 3, 7, 66),
                BitmapTarget,
                Rule::EqualBitsLaterWrites,
            ),
            (
                "both lost the same Primary with the same last write: lower node",
                lost(1, 3, 7, 66),
                lost(2, 3, 7, 66),
                BitmapSource,
                Rule::EqualBitsLowerNode,
            ),
            (
                "lost it in different promotions: not comparable",
                lost(1, 3, 6, 65),
                lost(2, 3, 7, 1),
                BitmapSource,
                Rule::EqualBitsLowerNode,
            ),
            (
                "lost different Primaries: not comparable",
                lost(1, 3, 7, 65),
                lost(2, 4, 7, 66),
                BitmapSource,
                Rule::EqualBitsLowerNode,
            ),
            (
                "interrupted resync target",
                a_incons.clone(),
                b.clone(),
                BitmapTarget,
                Rule::EqualInconsistent,
            ),
            (
                "both inconsistent",
                a_incons,
                b_incons,
                NoGoodData,
                Rule::BothInconsistent,
            ),
            (
                "a new member receives everything",
                SideView {
                    up_to_date: false,
                    ..side(1, 0, 0, [0, 0])
                },
                side(2, 20, 10, [10, 0]),
                FullTarget,
                Rule::NewMember,
            ),
            (
                "peer wrote while we were away",
                side(1, 10, 0, [0, 0]),
                side(2, 20, 10, [10, 0]),
                BitmapTarget,
                Rule::PeerBitmapIsOurCurrent,
            ),
            (
                "we wrote while peer was away",
                side(1, 20, 10, [10, 0]),
                side(2, 10, 0, [0, 0]),
                BitmapSource,
                Rule::OurBitmapIsPeerCurrent,
            ),
            (
                "peer knows us only through a third node",
                side(1, 5, 0, [0, 0]),
                third_a.clone(),
                FullTarget,
                Rule::PeerThirdBitmapIsOurCurrent,
            ),
            (
                "our current in peer history",
                side(1, 10, 0, [0, 0]),
                side(2, 30, 0, [20, 10]),
                FullTarget,
                Rule::OurCurrentInPeerHistory,
            ),
            (
                "peer current in our history",
                side(1, 30, 0, [20, 10]),
                side(2, 10, 0, [0, 0]),
                FullSource,
                Rule::PeerCurrentInOurHistory,
            ),
            (
                "split brain: both wrote after the split",
                side(1, 30, 10, [10, 0]),
                side(2, 40, 10, [10, 0]),
                SplitBrain,
                Rule::SplitBrainSameBitmap,
            ),
            (
                "split brain: common ancestor further back",
                side(1, 30, 0, [20, 7]),
                side(2, 40, 0, [25, 7]),
                SplitBrain,
                Rule::SplitBrainCommonAncestor,
            ),
            (
                "unrelated",
                side(1, 30, 0, [20, 0]),
                side(2, 40, 0, [25, 0]),
                UnrelatedData,
                Rule::Unrelated,
            ),
            (
                "newer side not up to date",
                side(1, 10, 0, [0, 0]),
                stale_incons_source,
                NoGoodData,
                Rule::SourceNotUpToDate,
            ),
            (
                "zero generations never match",
                side(1, 0, 0, [0, 0]),
                side(2, 5, 0, [0, 0]),
                UnrelatedData,
                Rule::Unrelated,
            ),
        ]
    }

    #[test]
    fn decision_table() {
        for (name, me, peer, want, rule) in cases() {
            assert_eq!(decide(&me, &peer), (want, rule), "case {name}");
        }
    }

    #[test]
    fn decision_is_symmetric_on_table() {
        for (name, me, peer, _, _) in cases() {
            let (d1, r1) = decide(&me, &peer);
            let (d2, r2) = decide(&peer, &me);
            assert_eq!(d1.mirror(), d2, "case {name}");
            assert_eq!(r1.mirror(), r2, "case {name}");
        }
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn arb_side(id: NodeId) -> impl Strategy<Value = SideView> {
            (
                0u64..5,
                0u64..5,
                [0u64..5, 0u64..5],
                proptest::collection::vec(0u64..5, 0..2),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                any::<bool>(),
                proptest::option::of((0u8..3, 0u64..2, 0u64..3)),
                0u64..3,
            )
                .prop_map(move |(c, b, h, o, u, p, cp, hb, lw, pe)| SideView {
                    node_id: id,
                    current: c,
                    bitmap: b,
                    history: h,
                    other_bitmaps: o,
                    up_to_date: u,
                    primary: p,
                    crashed_primary: cp,
                    has_bits: hb,
                    lost_writer: lw.map(|(node, epoch, seq)| LostWriter { node, epoch, seq }),
                    primary_epoch: pe,
                })
        }

        proptest! {
            #[test]
            fn symmetric(a in arb_side(1), b in arb_side(2)) {
                let (d1, r1) = decide(&a, &b);
                let (d2, r2) = decide(&b, &a);
                prop_assert_eq!(d1.mirror(), d2);
                prop_assert_eq!(r1.mirror(), r2);
            }

            #[test]
            fn source_is_up_to_date(a in arb_side(1), b in arb_side(2)) {
                let (d, _) = decide(&a, &b);
                if d.is_source() { prop_assert!(a.up_to_date); }
                if d.is_target() { prop_assert!(b.up_to_date); }
            }
        }
    }
}

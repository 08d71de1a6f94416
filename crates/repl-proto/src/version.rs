//! Protocol versions and their negotiation.
//!
//! Each side announces the inclusive range of versions it speaks; both use the highest version
//! in both ranges. No common version refuses the link with [`VersionMismatch`], which names both
//! ranges. The framing (`frame`) and the handshake messages are the same in every version, so
//! the negotiation itself never depends on the version being negotiated.

use std::fmt;

/// The version history of the replication protocol. One variant per version, never removed
/// or renumbered; `docs/protocol.md` has the same table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u16)]
pub enum ProtocolVersion {
    /// Version 1: initial. Framing with a 24-byte header (two crc32c checksums), the
    /// authenticated four-message handshake, and every message of `docs/protocol.md`.
    V1 = 1,
    /// Version 2: `StateReport` carries the `outdated` node mask (4 bytes after the peer
    /// bitmaps), so a node that missed writes a Primary completed without it learns that it
    /// is Outdated. A version-1 link omits it (reads as 0).
    V2 = 2,
    /// Version 3: `StateReport` carries `primary_epoch` (8 bytes after the outdated fields),
    /// which orders promotions for the `discard-younger-primary` split-brain policy. A
    /// version-2 link omits it (reads as 0: the policy cannot tell, the link stays split).
    V3 = 3,
    /// Version 4: the `Settled` message (type `0x0028`): a diskless Primary tells its diskful
    /// peers which of its writes are durable on every replica, so they know which writes to
    /// mark out of sync toward each other if the Primary goes away. A version-3 peer does not
    /// know the type (the link breaks): a diskless Primary needs version 4 on its links.
    V4 = 4,
    /// Version 5: the dual-primary window: `TokenRequest` (`0x0029`) and `TokenGrant`
    /// (`0x002a`) move the write token between the two Primaries, and `StateReport` flag bit
    /// 6 (`WINDOW_MEMBER`) marks a member. A version-4 peer refuses both (the link breaks): a
    /// dual-primary window needs version 5 on the links of the volume.
    V5 = 5,
    /// Version 6: `StateReport` flag bit 7 (`ADOPT_OFFER`): a diskless Primary that lost every
    /// peer holding its data tells a returning peer that it holds all of it at the previous
    /// generation and may adopt the current one. The encoder never sets the bit on an older
    /// link (such a peer then waits for the operator's demote/promote, as before).
    V6 = 6,
    /// Version 7: `StateReport` flag bit 8 (`SETTLES`): the sender declares its writes
    /// `Settled` when it is a Primary with a disk too (until version 6 only a Primary without
    /// one did). A replica with another diskful peer keeps such a Primary's writes until they
    /// are settled, to mark them toward that peer if the Primary goes away. The encoder never
    /// sets the bit on an older link (a receiver then keeps nothing, as before).
    V7 = 7,
    /// Version 8: a zero-write (a `Write` whose data is the shared zero buffer, see
    /// `zeroes`) travels as a `WriteZeroes` frame without data, and the receiver applies
    /// `Trim` and `WriteZeroes` like a write of zeros that may deallocate the range (until
    /// version 7 it answered them `NotSupported`). On an older link the zeros go as a `Write`.
    V8 = 8,
    /// Version 9: `StateReport` carries `lost_writer` (17 bytes after `primary_epoch`): the
    /// Primary whose link the sender lost at its current generation and the last write
    /// sequence number received from it. Two replicas that lost the same Primary, both with
    /// writes of it not settled, resync from the one that received the later write (until
    /// version 8 the lower node id was the source, and a write the Primary completed on the
    /// other one only was lost). A version-8 link omits it (reads as none: the old rule).
    V9 = 9,
    /// Version 10: frame numbers. The header field at offset 8 (frame flags until version 9,
    /// none defined, always 0) carries the frame's number on the established link: 1 for the
    /// first frame after the handshake, one more for each frame after it (wrapping at 2^32).
    /// The receiver refuses a frame with another number (`DecodeError::Sequence`), so a
    /// frame duplicated, lost or reordered by a sender's bug breaks the link instead of
    /// reaching the engine, which relies on in-order exactly-once delivery per link. On an
    /// older link the field stays 0 and is not checked.
    V10 = 10,
}

impl ProtocolVersion {
    /// Every version this build speaks, oldest first.
    pub const ALL: &'static [ProtocolVersion] = &[
        ProtocolVersion::V1,
        ProtocolVersion::V2,
        ProtocolVersion::V3,
        ProtocolVersion::V4,
        ProtocolVersion::V5,
        ProtocolVersion::V6,
        ProtocolVersion::V7,
        ProtocolVersion::V8,
        ProtocolVersion::V9,
        ProtocolVersion::V10,
    ];
    /// The newest version this build speaks.
    pub const LATEST: ProtocolVersion = ProtocolVersion::V10;
    /// The oldest version this build speaks.
    pub const OLDEST: ProtocolVersion = ProtocolVersion::V1;

    /// The number on the wire.
    pub const fn number(self) -> u16 {
        self as u16
    }

    /// The known version with this number.
    pub fn from_number(n: u16) -> Option<ProtocolVersion> {
        Self::ALL.iter().copied().find(|v| v.number() == n)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// An inclusive range of protocol version numbers, as announced on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    /// Everything this build speaks.
    pub const SUPPORTED: VersionRange = VersionRange {
        min: ProtocolVersion::OLDEST.number(),
        max: ProtocolVersion::LATEST.number(),
    };

    /// A range; `None` unless `1 <= min <= max` (version 0 does not exist).
    pub fn new(min: u16, max: u16) -> Option<VersionRange> {
        (min >= 1 && min <= max).then_some(VersionRange { min, max })
    }

    pub fn contains(&self, v: u16) -> bool {
        self.min <= v && v <= self.max
    }

    /// True when every version of the range is one this build knows.
    pub fn is_supported(&self) -> bool {
        self.min >= 1 && self.min <= self.max && VersionRange::SUPPORTED.covers(self)
    }

    fn covers(&self, other: &VersionRange) -> bool {
        self.min <= other.min && other.max <= self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}..={}", self.min, self.max)
        }
    }
}

/// No version in common.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours}, the peer speaks {theirs}")]
pub struct VersionMismatch {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// The highest version in both ranges.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, VersionMismatch> {
    let hi = ours.max.min(theirs.max);
    let lo = ours.min.max(theirs.min);
    if lo <= hi {
        Ok(hi)
    } else {
        Err(VersionMismatch { ours, theirs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn r(min: u16, max: u16) -> VersionRange {
        VersionRange::new(min, max).unwrap()
    }

    #[test]
    fn picks_highest_common() {
        assert_eq!(negotiate(r(1, 3), r(2, 5)), Ok(3));
        assert_eq!(negotiate(r(2, 5), r(1, 3)), Ok(3));
        assert_eq!(negotiate(r(1, 1), r(1, 1)), Ok(1));
        assert_eq!(negotiate(r(1, 9), r(4, 4)), Ok(4));
    }

    #[test]
    fn refuses_disjoint_naming_both() {
        let e = negotiate(r(1, 2), r(3, 4)).unwrap_err();
        assert_eq!(e.ours, r(1, 2));
        assert_eq!(e.theirs, r(3, 4));
        assert_eq!(
            e.to_string(),
            "no common protocol version: we speak 1..=2, the peer speaks 3..=4"
        );
    }

    #[test]
    fn history_is_consistent() {
        assert_eq!(ProtocolVersion::LATEST.number(), 10);
        assert_eq!(ProtocolVersion::from_number(1), Some(ProtocolVersion::V1));
        assert_eq!(ProtocolVersion::from_number(2), Some(ProtocolVersion::V2));
        assert_eq!(ProtocolVersion::from_number(3), Some(ProtocolVersion::V3));
        assert_eq!(ProtocolVersion::from_number(4), Some(ProtocolVersion::V4));
        assert_eq!(ProtocolVersion::from_number(5), Some(ProtocolVersion::V5));
        assert_eq!(ProtocolVersion::from_number(6), Some(ProtocolVersion::V6));
        assert_eq!(ProtocolVersion::from_number(7), Some(ProtocolVersion::V7));
        assert_eq!(ProtocolVersion::from_number(8), Some(ProtocolVersion::V8));
        assert_eq!(ProtocolVersion::from_number(9), Some(ProtocolVersion::V9));
        assert_eq!(ProtocolVersion::from_number(10), Some(ProtocolVersion::V10));
        assert_eq!(ProtocolVersion::from_number(0), None);
        assert!(VersionRange::SUPPORTED.is_supported());
        assert!(!r(1, 11).is_supported());
        assert_eq!(VersionRange::new(0, 1), None);
        assert_eq!(VersionRange::new(3, 2), None);
        for w in ProtocolVersion::ALL.windows(2) {
            assert_eq!(w[0].number() + 1, w[1].number());
        }
    }

    proptest! {
        #[test]
        fn negotiation_is_symmetric_and_maximal(a in 1u16..20, b in 0u16..20, c in 1u16..20, d in 0u16..20) {
            let x = r(a, a + b);
            let y = r(c, c + d);
            let one = negotiate(x, y);
            let two = negotiate(y, x);
            prop_assert_eq!(one.is_ok(), two.is_ok());
            if let Ok(v) = one {
                prop_assert_eq!(Ok(v), two);
                prop_assert!(x.contains(v) && y.contains(v));
                prop_assert!(!(v + 1..=x.max).any(|w| y.contains(w)));
            } else {
                prop_assert!(!(x.min..=x.max).any(|w| y.contains(w)));
            }
        }
    }
}

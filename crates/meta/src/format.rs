//! Encoding and decoding of the metadata record (format version 1). Pure functions, no I/O.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TNDMMETA"
//! 8       4     format version (u32 LE) = 1
//! 12      4     body length N (u32 LE)
//! 16      8     sequence number (u64 LE), +1 on every write
//! 24      N     body (fields below, in order)
//! 24+N    4     crc32c (u32 LE) of bytes [0, 24+N)
//! ```
//!
//! Integers are little endian; a `str` is a u16 LE byte length followed by that many UTF-8 bytes.

use crate::{MetaError, Result};

pub const MAGIC: [u8; 8] = *b"TNDMMETA";
/// The newest format version this code reads and the one it writes.
pub const FORMAT_VERSION: u32 = 2;
/// Upper bound of a metadata file; larger files are refused before they are read.
pub const MAX_META_LEN: usize = 64 * 1024;
pub const MAX_STRING_LEN: usize = 255;
/// Highest node id + 1 (node ids are 0..=31, as in DRBD 9).
pub const MAX_NODE_ID: u8 = 31;
pub const MAX_PEER_SLOTS: u8 = 31;
/// Peer slot not assigned to a peer.
pub const NO_PEER: u8 = 0xff;
pub const DEFAULT_BITMAP_GRANULARITY: u32 = 4096;
pub const DEFAULT_PEER_SLOTS: u8 = 3;

const HEADER_LEN: usize = 24;
const CRC_LEN: usize = 4;
/// Flag bit: the replica was Primary when it last wrote metadata and has not been demoted
/// cleanly since (DRBD's "crashed primary"). Maintained by the replication engine.
pub const FLAG_CRASHED_PRIMARY: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_CRASHED_PRIMARY;

/// A data generation identifier (DRBD's "UUID"): 64 random bits, 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct GenerationId(pub u64);

impl GenerationId {
    pub const NONE: GenerationId = GenerationId(0);

    /// A fresh random generation (never 0).
    pub fn random() -> Self {
        let v = uuid::Uuid::new_v4().as_u64_pair();
        GenerationId((v.0 ^ v.1) | 1)
    }

    pub fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl std::fmt::Display for GenerationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

/// The generation every replica of a new volume starts with, derived from the volume uuid so
/// that replicas created independently on sparse (all-zero) files agree that they hold the same
/// data: day-0 needs no initial sync (DRBD's `new-current-uuid --clear-bitmap`).
pub fn initial_generation(volume_uuid: &str) -> GenerationId {
    // FNV-1a 64 over the uuid text; stable across versions and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"tandem-gen0:".iter().chain(volume_uuid.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    GenerationId(h | 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Secondary,
    Primary,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Secondary => 0,
            Role::Primary => 1,
        }
    }
    fn from_code(c: u8) -> Result<Self> {
        match c {
            0 => Ok(Role::Secondary),
            1 => Ok(Role::Primary),
            _ => Err(MetaError::invalid(
                "metadata",
                format!("unknown role code {c}"),
            )),
        }
    }
}

/// Persisted disk state (DRBD vocabulary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskState {
    /// Contains the newest data of its generation.
    #[default]
    UpToDate,
    /// Being synced to; contents are not usable on their own.
    Inconsistent,
    /// Consistent but known to miss writes another replica has.
    Outdated,
    /// No local data (witness / diskless client).
    Diskless,
    /// Detached after an I/O error.
    Failed,
}

impl DiskState {
    fn code(self) -> u8 {
        match self {
            DiskState::UpToDate => 1,
            DiskState::Inconsistent => 2,
            DiskState::Outdated => 3,
            DiskState::Diskless => 4,
            DiskState::Failed => 5,
        }
    }
    fn from_code(c: u8) -> Result<Self> {
        Ok(match c {
            1 => DiskState::UpToDate,
            2 => DiskState::Inconsistent,
            3 => DiskState::Outdated,
            4 => DiskState::Diskless,
            5 => DiskState::Failed,
            _ => {
                return Err(MetaError::invalid(
                    "metadata",
                    format!("unknown disk state code {c}"),
                ));
            }
        })
    }
}

/// One peer slot: which peer it belongs to, the generation its out-of-sync bitmap started at,
/// and where that bitmap lives in the bitmap file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSlot {
    /// Peer node id, or [`NO_PEER`] for a free slot.
    pub node_id: u8,
    /// DRBD's bitmap UUID: the current generation when the peer was last in sync (0: none).
    pub bitmap_gen: GenerationId,
    /// Byte offset of this slot's region in the bitmap file.
    pub bitmap_offset: u64,
    /// Byte length of this slot's region.
    pub bitmap_bytes: u64,
}

impl PeerSlot {
    pub fn is_free(&self) -> bool {
        self.node_id == NO_PEER
    }
}

/// Everything a replica persists about itself, besides its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaMeta {
    /// Incremented by every write; lets a reader pick the newer of two copies (block-device
    /// pools will keep two alternating slots; files are replaced by rename).
    pub seq: u64,
    /// The cluster this replica belongs to (empty: not yet bound).
    pub cluster_id: String,
    pub volume_name: String,
    /// Identity of the volume, different for a volume re-created under the same name.
    pub volume_uuid: String,
    pub size_bytes: u64,
    /// This node's name and its small integer id within the volume (0..=31).
    pub node_name: String,
    pub node_id: u8,
    pub role: Role,
    pub disk_state: DiskState,
    /// `FLAG_*` bits; unknown bits are refused.
    pub flags: u32,
    /// Current data generation.
    pub current_gen: GenerationId,
    /// The two previous current generations, newest first.
    pub history_gen: [GenerationId; 2],
    /// Bytes of data per bitmap bit.
    pub bitmap_granularity: u32,
    /// Peer slots; the length is the slot capacity.
    pub peers: Vec<PeerSlot>,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// Since format version 2 (0 when reading version 1): the replication engine's promotion
    /// epoch (orders promotions for the `discard-younger-primary` split-brain policy).
    pub primary_epoch: u64,
}

impl ReplicaMeta {
    /// Metadata of a brand-new replica: Secondary, UpToDate (a new sparse file reads as zeros on
    /// every replica), generation [`initial_generation`], `slots` free peer slots whose bitmap
    /// regions follow each other in the bitmap file as [`crate::Bitmap::create`] lays them out.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cluster_id: &str,
        volume_name: &str,
        volume_uuid: &str,
        size_bytes: u64,
        node_name: &str,
        node_id: u8,
        slots: u8,
        now_unix_ms: u64,
    ) -> Self {
        let granularity = DEFAULT_BITMAP_GRANULARITY;
        let peers = (0..slots)
            .map(|i| {
                let (offset, bytes) = crate::Bitmap::region(size_bytes, granularity, i);
                PeerSlot {
                    node_id: NO_PEER,
                    bitmap_gen: GenerationId::NONE,
                    bitmap_offset: offset,
                    bitmap_bytes: bytes,
                }
            })
            .collect();
        ReplicaMeta {
            seq: 0,
            cluster_id: cluster_id.to_string(),
            volume_name: volume_name.to_string(),
            volume_uuid: volume_uuid.to_string(),
            size_bytes,
            node_name: node_name.to_string(),
            node_id,
            role: Role::Secondary,
            disk_state: DiskState::UpToDate,
            flags: 0,
            current_gen: initial_generation(volume_uuid),
            history_gen: [GenerationId::NONE; 2],
            bitmap_granularity: granularity,
            peers,
            created_unix_ms: now_unix_ms,
            updated_unix_ms: now_unix_ms,
            primary_epoch: 0,
        }
    }

    /// Checks the invariants every valid record satisfies (used by encode and decode).
    pub fn validate(&self) -> Result<()> {
        let bad = |r: String| Err(MetaError::invalid("metadata", r));
        for (name, s) in [
            ("cluster id", &self.cluster_id),
            ("volume name", &self.volume_name),
            ("volume uuid", &self.volume_uuid),
            ("node name", &self.node_name),
        ] {
            if s.len() > MAX_STRING_LEN {
                return bad(format!("{name} longer than {MAX_STRING_LEN} bytes"));
            }
        }
        if self.volume_name.is_empty() {
            return bad("empty volume name".into());
        }
        if self.node_id > MAX_NODE_ID {
            return bad(format!("node id {} > {MAX_NODE_ID}", self.node_id));
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return bad(format!("unknown flags {:#x}", self.flags & !KNOWN_FLAGS));
        }
        if !self.bitmap_granularity.is_power_of_two() || self.bitmap_granularity < 512 {
            return bad(format!(
                "bitmap granularity {} is not a power of two >= 512",
                self.bitmap_granularity
            ));
        }
        if self.peers.len() > usize::from(MAX_PEER_SLOTS) {
            return bad(format!(
                "{} peer slots (at most {MAX_PEER_SLOTS})",
                self.peers.len()
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.node_id != NO_PEER && p.node_id > MAX_NODE_ID {
                return bad(format!(
                    "peer slot {i}: node id {} > {MAX_NODE_ID}",
                    p.node_id
                ));
            }
            if p.node_id == self.node_id {
                return bad(format!("peer slot {i}: peer node id equals own node id"));
            }
            if p.bitmap_offset.checked_add(p.bitmap_bytes).is_none() {
                return bad(format!("peer slot {i}: bitmap region overflows"));
            }
        }
        Ok(())
    }

    /// Serializes into the framed, checksummed file image.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut body = Vec::with_capacity(256);
        put_str(&mut body, &self.cluster_id);
        put_str(&mut body, &self.volume_name);
        put_str(&mut body, &self.volume_uuid);
        body.extend_from_slice(&self.size_bytes.to_le_bytes());
        put_str(&mut body, &self.node_name);
        body.push(self.node_id);
        body.push(self.role.code());
        body.push(self.disk_state.code());
        body.push(0); // reserved
        body.extend_from_slice(&self.flags.to_le_bytes());
        body.extend_from_slice(&self.current_gen.0.to_le_bytes());
        body.extend_from_slice(&self.history_gen[0].0.to_le_bytes());
        body.extend_from_slice(&self.history_gen[1].0.to_le_bytes());
        body.extend_from_slice(&self.bitmap_granularity.to_le_bytes());
        body.push(self.peers.len() as u8); // validated <= MAX_PEER_SLOTS
        for p in &self.peers {
            body.push(p.node_id);
            body.extend_from_slice(&p.bitmap_gen.0.to_le_bytes());
            body.extend_from_slice(&p.bitmap_offset.to_le_bytes());
            body.extend_from_slice(&p.bitmap_bytes.to_le_bytes());
        }
        body.extend_from_slice(&self.created_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.updated_unix_ms.to_le_bytes());
        body.extend_from_slice(&self.primary_epoch.to_le_bytes());

        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        if out.len() > MAX_META_LEN {
            return Err(MetaError::TooLarge {
                what: "metadata",
                len: out.len() as u64,
                max: MAX_META_LEN as u64,
            });
        }
        Ok(out)
    }

    /// Parses a file image. Checks, in order: magic, version (newer versions are refused with
    /// [`MetaError::UnsupportedVersion`]), length, checksum, then every field.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        const WHAT: &str = "metadata";
        if buf.len() < MAGIC.len() || buf[..MAGIC.len()] != MAGIC {
            return Err(MetaError::BadMagic { what: WHAT });
        }
        if buf.len() < HEADER_LEN {
            return Err(MetaError::Truncated {
                what: WHAT,
                needed: HEADER_LEN,
                have: buf.len(),
            });
        }
        let mut r = Reader { buf, pos: 8 };
        let version = r.u32()?;
        if version == 0 {
            return Err(MetaError::InvalidVersion {
                what: WHAT,
                found: version,
            });
        }
        if version > FORMAT_VERSION {
            return Err(MetaError::UnsupportedVersion {
                what: WHAT,
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let body_len = r.u32()? as usize;
        let total = HEADER_LEN + body_len + CRC_LEN;
        if total > MAX_META_LEN {
            return Err(MetaError::TooLarge {
                what: WHAT,
                len: total as u64,
                max: MAX_META_LEN as u64,
            });
        }
        if buf.len() < total {
            return Err(MetaError::Truncated {
                what: WHAT,
                needed: total,
                have: buf.len(),
            });
        }
        if buf.len() > total {
            return Err(MetaError::invalid(
                WHAT,
                format!("{} trailing bytes after the checksum", buf.len() - total),
            ));
        }
        let crc_at = HEADER_LEN + body_len;
        let mut crc_bytes = [0u8; 4];
        crc_bytes.copy_from_slice(&buf[crc_at..total]);
        let stored = u32::from_le_bytes(crc_bytes);
        let computed = crc32c::crc32c(&buf[..crc_at]);
        if stored != computed {
            return Err(MetaError::Checksum {
                what: WHAT,
                stored,
                computed,
            });
        }
        let seq = r.u64()?;
        // Parse the body only (the reader must not run into the checksum).
        let mut r = Reader {
            buf: &buf[..crc_at],
            pos: HEADER_LEN,
        };
        let cluster_id = r.str()?;
        let volume_name = r.str()?;
        let volume_uuid = r.str()?;
        let size_bytes = r.u64()?;
        let node_name = r.str()?;
        let node_id = r.u8()?;
        let role = Role::from_code(r.u8()?)?;
        let disk_state = DiskState::from_code(r.u8()?)?;
        let reserved = r.u8()?;
        if reserved != 0 {
            return Err(MetaError::invalid(WHAT, "reserved byte is not zero"));
        }
        let flags = r.u32()?;
        let current_gen = GenerationId(r.u64()?);
        let history_gen = [GenerationId(r.u64()?), GenerationId(r.u64()?)];
        let bitmap_granularity = r.u32()?;
        let slots = r.u8()?;
        if slots > MAX_PEER_SLOTS {
            return Err(MetaError::invalid(
                WHAT,
                format!("{slots} peer slots (at most {MAX_PEER_SLOTS})"),
            ));
        }
        let mut peers = Vec::with_capacity(usize::from(slots));
        for _ in 0..slots {
            peers.push(PeerSlot {
                node_id: r.u8()?,
                bitmap_gen: GenerationId(r.u64()?),
                bitmap_offset: r.u64()?,
                bitmap_bytes: r.u64()?,
            });
        }
        let created_unix_ms = r.u64()?;
        let updated_unix_ms = r.u64()?;
        let primary_epoch = if version >= 2 { r.u64()? } else { 0 };
        if r.pos != crc_at {
            return Err(MetaError::invalid(
                WHAT,
                format!("{} unparsed bytes in the body", crc_at - r.pos),
            ));
        }
        let meta = ReplicaMeta {
            seq,
            cluster_id,
            volume_name,
            volume_uuid,
            size_bytes,
            node_name,
            node_id,
            role,
            disk_state,
            flags,
            current_gen,
            history_gen,
            bitmap_granularity,
            peers,
            created_unix_ms,
            updated_unix_ms,
            primary_epoch,
        };
        meta.validate()?;
        Ok(meta)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Lengths are validated <= MAX_STRING_LEN before encoding.
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(MetaError::Truncated {
                what: "metadata body",
                needed: self.pos.saturating_add(n),
                have: self.buf.len(),
            }),
        }
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str(&mut self) -> Result<String> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        let len = usize::from(u16::from_le_bytes(a));
        if len > MAX_STRING_LEN {
            return Err(MetaError::invalid(
                "metadata",
                format!("string of {len} bytes (at most {MAX_STRING_LEN})"),
            ));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| MetaError::invalid("metadata", "string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> ReplicaMeta {
        let mut m = ReplicaMeta::new(
            "cluster-1",
            "vm-101-disk-0",
            "6f1c2a8e-0000-4000-8000-000000000001",
            10 << 30,
            "node-a",
            2,
            3,
            1_700_000_000_000,
        );
        m.seq = 7;
        m.peers[1].node_id = 0;
        m.peers[1].bitmap_gen = GenerationId(0xdead_beef);
        m.history_gen = [GenerationId(5), GenerationId(9)];
        m.role = Role::Primary;
        m.disk_state = DiskState::Outdated;
        m.flags = FLAG_CRASHED_PRIMARY;
        m
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode().unwrap();
        assert_eq!(&bytes[..8], b"TNDMMETA");
        assert_eq!(ReplicaMeta::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn defaults_of_a_new_replica() {
        let m = ReplicaMeta::new("c", "v", "u", 1 << 20, "n", 0, 3, 1);
        assert_eq!(m.role, Role::Secondary);
        assert_eq!(m.disk_state, DiskState::UpToDate);
        assert_eq!(m.bitmap_granularity, 4096);
        assert_eq!(m.peers.len(), 3);
        assert!(m.peers.iter().all(|p| p.is_free()));
        assert_eq!(m.current_gen, initial_generation("u"));
        assert_ne!(initial_generation("u"), initial_generation("v"));
        assert!(!m.current_gen.is_none());
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = sample().encode().unwrap();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    ReplicaMeta::decode(&b).is_err(),
                    "flip of byte {i} bit {bit} not detected"
                );
            }
        }
    }

    #[test]
    fn checksum_corruption_is_reported_as_such() {
        let mut bytes = sample().encode().unwrap();
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        assert!(matches!(
            ReplicaMeta::decode(&bytes),
            Err(MetaError::Checksum { .. })
        ));
    }

    #[test]
    fn truncation_is_detected() {
        let bytes = sample().encode().unwrap();
        for len in 0..bytes.len() {
            assert!(ReplicaMeta::decode(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut bytes = sample().encode().unwrap();
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        // Even with a valid checksum for the new version, the version check comes first.
        let n = bytes.len();
        let crc = crc32c::crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let err = ReplicaMeta::decode(&bytes).unwrap_err();
        assert!(matches!(
            err,
            MetaError::UnsupportedVersion {
                found: 3,
                supported: 2,
                ..
            }
        ));
        assert!(err.to_string().contains("newer"), "{err}");
    }

    #[test]
    fn version_1_without_the_primary_epoch_still_reads() {
        let mut m = sample();
        m.primary_epoch = 9;
        let v2 = m.encode().unwrap();
        // The same metadata as version 1 wrote it: no epoch at the end of the body.
        let body_len = u32::from_le_bytes(v2[12..16].try_into().unwrap()) - 8;
        let mut v1 = v2[..HEADER_LEN + body_len as usize].to_vec();
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        v1[12..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let read = ReplicaMeta::decode(&v1).unwrap();
        assert_eq!(read.primary_epoch, 0);
        assert_eq!(
            read,
            ReplicaMeta {
                primary_epoch: 0,
                ..m.clone()
            }
        );
        // And version 2 keeps it.
        assert_eq!(ReplicaMeta::decode(&v2).unwrap().primary_epoch, 9);
    }

    #[test]
    fn invalid_contents_with_valid_checksum_are_refused() {
        let mut m = sample();
        m.node_id = 40;
        assert!(m.encode().is_err());
        let mut m = sample();
        m.peers[0].node_id = m.node_id;
        assert!(m.encode().is_err());
        let mut m = sample();
        m.volume_name = "x".repeat(300);
        assert!(m.encode().is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = ReplicaMeta::decode(&bytes);
        }

        #[test]
        fn random_bytes_after_a_valid_header_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..400),
            version in 0u32..3,
        ) {
            let mut b = Vec::new();
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&(body.len() as u32).to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&body);
            let crc = crc32c::crc32c(&b);
            b.extend_from_slice(&crc.to_le_bytes());
            let _ = ReplicaMeta::decode(&b);
        }

        #[test]
        fn mutated_valid_records_never_panic(idx in 0usize..200, val in any::<u8>()) {
            let mut b = sample().encode().unwrap();
            let i = idx % b.len();
            b[i] = val;
            // Re-seal so that the field parser (not only the checksum) sees garbage.
            let n = b.len();
            let crc = crc32c::crc32c(&b[..n - 4]);
            b[n - 4..].copy_from_slice(&crc.to_le_bytes());
            let _ = ReplicaMeta::decode(&b);
        }
    }
}

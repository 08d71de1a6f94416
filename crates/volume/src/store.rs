//! The engine's persistent state mapped onto a replica's pool files.
//!
//! * [`Meta`] → `V.meta` ([`ReplicaMeta`], replaced atomically): `disk_state`, `primary` as
//!   the role, `current`/`history` generations, and per diskful peer a peer slot holding its
//!   node id and bitmap generation.
//! * Per-peer bitmaps → `V.bitmap` (the peer's slot region; every `PersistBits` is a pwrite
//!   plus fdatasync).
//! * Activity log → `V.al` (this crate, see [`crate::al`]).
//!
//! A diskful peer without a slot yet (first start of a replica created by the agent) gets the
//! first free slot, its region cleared and bitmap generation 0, which is what
//! `Persisted::new_volume` means: every replica of a new volume starts in sync. A witness keeps
//! only `V.meta` (no data, no bitmap) and an empty activity log.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_meta::{
    Bitmap as MetaBitmap, GenerationId, NO_PEER, ReplicaFiles, ReplicaMeta, Role as MetaRole,
};
use tandem_repl_proto::{DiskState, NodeId};
use tandem_replication::{Bitmap, Config, Meta, Persisted};

use crate::VolumeError;
use crate::al::{AL_SUFFIX, ActivityLogFile};

/// The open metadata, bitmap and activity-log files of one replica.
#[derive(Debug)]
pub(crate) struct ReplicaStore {
    files: ReplicaFiles,
    meta: ReplicaMeta,
    bitmap: Option<MetaBitmap>,
    al: ActivityLogFile,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn meta_err(e: tandem_meta::MetaError) -> VolumeError {
    VolumeError::Meta(e.to_string())
}

fn to_meta_disk(d: DiskState) -> tandem_meta::DiskState {
    match d {
        DiskState::UpToDate => tandem_meta::DiskState::UpToDate,
        DiskState::Inconsistent => tandem_meta::DiskState::Inconsistent,
        DiskState::Outdated => tandem_meta::DiskState::Outdated,
        DiskState::Diskless => tandem_meta::DiskState::Diskless,
        DiskState::Failed => tandem_meta::DiskState::Failed,
    }
}

fn from_meta_disk(d: tandem_meta::DiskState) -> DiskState {
    match d {
        tandem_meta::DiskState::UpToDate => DiskState::UpToDate,
        tandem_meta::DiskState::Inconsistent => DiskState::Inconsistent,
        tandem_meta::DiskState::Outdated => DiskState::Outdated,
        tandem_meta::DiskState::Diskless => DiskState::Diskless,
        tandem_meta::DiskState::Failed => DiskState::Failed,
    }
}

impl ReplicaStore {
    /// Opens the replica `volume` in `dir` for an engine configured by `cfg` and returns what
    /// the engine needs to start. `V.meta` must exist; a witness whose `V.meta` is missing
    /// gets one (Diskless).
    pub(crate) fn open(
        dir: &Path,
        volume: &str,
        volume_uuid: &str,
        node_name: &str,
        cfg: &Config,
    ) -> Result<(ReplicaStore, Persisted), VolumeError> {
        let files = ReplicaFiles::new(dir, volume);
        files.recover().map_err(meta_err)?;
        let mut meta = match files.read_meta() {
            Ok(m) => m,
            Err(e) if e.is_not_found() && !cfg.diskful => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| VolumeError::Meta(format!("{}: {e}", dir.display())))?;
                let mut m = ReplicaMeta::new(
                    "",
                    volume,
                    volume_uuid,
                    cfg.size_bytes,
                    node_name,
                    cfg.node_id,
                    0,
                    now_ms(),
                );
                m.disk_state = tandem_meta::DiskState::Diskless;
                m.current_gen = GenerationId::NONE;
                files.write_meta(&mut m).map_err(meta_err)?;
                m
            }
            Err(e) => return Err(meta_err(e)),
        };
        if meta.volume_uuid != volume_uuid {
            return Err(VolumeError::Config(format!(
                "replica {volume} in {} belongs to volume uuid {}, not {volume_uuid}",
                dir.display(),
                meta.volume_uuid
            )));
        }
        if cfg.diskful && meta.size_bytes != cfg.size_bytes {
            return Err(VolumeError::Config(format!(
                "replica {volume}: metadata says {} bytes, the volume has {}",
                meta.size_bytes, cfg.size_bytes
            )));
        }
        // The agent creates replicas before node ids are assigned: adopt ours.
        meta.node_id = cfg.node_id;
        meta.node_name = node_name.to_string();

        let mut bitmap = None;
        let mut bitmaps = BTreeMap::new();
        let mut gens = BTreeMap::new();
        if cfg.diskful {
            let mut bm = match MetaBitmap::open(&files.bitmap()) {
                Ok(b) => Some(b),
                Err(e) if e.is_not_found() => None,
                Err(e) => {
                    tracing::warn!(volume, "bitmap file: {e}; recreating it (full resync)");
                    None
                }
            };
            if bm.as_ref().is_some_and(|b| {
                b.size_bytes() != cfg.size_bytes
                    || b.granularity() != cfg.bitmap_granularity
                    || usize::from(b.slots()) < meta.peers.len()
            }) {
                bm = None;
            }
            let recreated = bm.is_none();
            let mut bm = match bm {
                Some(b) => b,
                None => {
                    let slots = meta
                        .peers
                        .len()
                        .max(cfg.peers.iter().filter(|p| p.diskful).count())
                        .max(usize::from(tandem_meta::DEFAULT_PEER_SLOTS))
                        as u8;
                    if meta.peers.len() < usize::from(slots) {
                        meta.peers.resize(
                            usize::from(slots),
                            tandem_meta::PeerSlot {
                                node_id: NO_PEER,
                                bitmap_gen: GenerationId::NONE,
                                bitmap_offset: 0,
                                bitmap_bytes: 0,
                            },
                        );
                    }
                    for (i, s) in meta.peers.iter_mut().enumerate() {
                        let (o, l) =
                            MetaBitmap::region(cfg.size_bytes, cfg.bitmap_granularity, i as u8);
                        s.bitmap_offset = o;
                        s.bitmap_bytes = l;
                    }
                    MetaBitmap::create(
                        &files.bitmap(),
                        volume_uuid,
                        cfg.size_bytes,
                        cfg.bitmap_granularity,
                        slots,
                    )
                    .map_err(meta_err)?
                }
            };
            // A recreated bitmap file lost what the old one said: a peer that already had a
            // slot may differ anywhere, so all its bits are set (full resync toward it).
            if recreated {
                for i in 0..meta.peers.len() {
                    if !meta.peers[i].is_free() {
                        let bits = bm.bits();
                        bm.set_bits(i as u8, 0, bits).map_err(meta_err)?;
                    }
                }
            }
            for p in cfg.peers.iter().filter(|p| p.diskful) {
                let slot = match meta.peers.iter().position(|s| s.node_id == p.node_id) {
                    Some(i) => i,
                    None => {
                        let i = meta.peers.iter().position(|s| s.is_free()).ok_or_else(|| {
                            VolumeError::Config(format!(
                                "replica {volume}: no free peer slot for node {}",
                                p.node_id
                            ))
                        })?;
                        let bits = bm.bits();
                        bm.clear_bits(i as u8, 0, bits).map_err(meta_err)?;
                        meta.peers[i].node_id = p.node_id;
                        meta.peers[i].bitmap_gen = GenerationId::NONE;
                        i
                    }
                };
                let mut b = Bitmap::new(cfg.size_bytes, cfg.bitmap_granularity);
                for bit in 0..bm.bits() {
                    if bm.test(slot as u8, bit).map_err(meta_err)? {
                        b.set_bits(bit, 1);
                    }
                }
                bitmaps.insert(p.node_id, b);
                gens.insert(p.node_id, meta.peers[slot].bitmap_gen.0);
            }
            bitmap = Some(bm);
        }
        // Peers no longer configured free their slots.
        for s in meta.peers.iter_mut() {
            if !s.is_free()
                && !cfg
                    .peers
                    .iter()
                    .any(|p| p.diskful && p.node_id == s.node_id)
            {
                s.node_id = NO_PEER;
                s.bitmap_gen = GenerationId::NONE;
            }
        }
        meta.updated_unix_ms = now_ms();
        files.write_meta(&mut meta).map_err(meta_err)?;

        let al_path = dir.join(format!("{volume}{AL_SUFFIX}"));
        let (al, activity_log) = ActivityLogFile::open(&al_path, cfg.al_extents)
            .map_err(|e| VolumeError::Meta(format!("{}: {e}", al_path.display())))?;
        let persisted = Persisted {
            meta: Meta {
                disk_state: from_meta_disk(meta.disk_state),
                primary: meta.role == MetaRole::Primary,
                current: meta.current_gen.0,
                history: [meta.history_gen[0].0, meta.history_gen[1].0],
                peer_bitmap_gens: gens,
                primary_epoch: meta.primary_epoch,
            },
            bitmaps,
            activity_log: if cfg.diskful {
                activity_log
            } else {
                Vec::new()
            },
        };
        Ok((
            ReplicaStore {
                files,
                meta,
                bitmap,
                al,
            },
            persisted,
        ))
    }

    fn slot(&self, peer: NodeId) -> Result<u8, VolumeError> {
        self.meta
            .peers
            .iter()
            .position(|s| s.node_id == peer)
            .map(|i| i as u8)
            .ok_or_else(|| VolumeError::Meta(format!("no peer slot for node {peer}")))
    }

    /// `PersistMeta`: durable when this returns.
    pub(crate) fn persist_meta(&mut self, m: &Meta) -> Result<(), VolumeError> {
        self.meta.disk_state = to_meta_disk(m.disk_state);
        self.meta.role = if m.primary {
            MetaRole::Primary
        } else {
            MetaRole::Secondary
        };
        self.meta.current_gen = GenerationId(m.current);
        self.meta.history_gen = [GenerationId(m.history[0]), GenerationId(m.history[1])];
        self.meta.primary_epoch = m.primary_epoch;
        for (peer, gen_) in &m.peer_bitmap_gens {
            if self.bitmap.is_none() {
                // A witness has no peer slots: what a diskless Primary records about its
                // peers lives in its memory only (it re-learns it from them when promoted).
                break;
            }
            let i = self.slot(*peer)?;
            self.meta.peers[usize::from(i)].bitmap_gen = GenerationId(*gen_);
        }
        self.meta.updated_unix_ms = now_ms();
        self.files.write_meta(&mut self.meta).map_err(meta_err)
    }

    /// `PersistBits`: durable when this returns.
    pub(crate) fn persist_bits(
        &mut self,
        peer: NodeId,
        set: bool,
        first: u64,
        count: u64,
    ) -> Result<(), VolumeError> {
        let slot = self.slot(peer)?;
        let bm = self
            .bitmap
            .as_mut()
            .ok_or_else(|| VolumeError::Meta("a witness has no bitmap".into()))?;
        if set {
            bm.set_bits(slot, first, count).map_err(meta_err)?;
        } else {
            bm.clear_bits(slot, first, count).map_err(meta_err)?;
        }
        Ok(())
    }

    /// Size committed in the metadata.
    pub(crate) fn size_bytes(&self) -> u64 {
        self.meta.size_bytes
    }

    /// Online resize of the replica's files (a witness only records the size).
    pub(crate) fn resize(&mut self, size: u64) -> Result<(), VolumeError> {
        if self.bitmap.is_none() && !self.files.data().exists() {
            self.meta.size_bytes = size;
            self.meta.updated_unix_ms = now_ms();
            return self.files.write_meta(&mut self.meta).map_err(meta_err);
        }
        self.meta.updated_unix_ms = now_ms();
        let relaid = self
            .files
            .resize(&mut self.meta, self.bitmap.as_ref(), size)
            .map_err(meta_err)?;
        if relaid.is_some() {
            self.bitmap = relaid;
        }
        Ok(())
    }

    /// `PersistActivityLog`: durable when this returns.
    pub(crate) fn persist_al(&mut self, extents: &[u64]) -> Result<(), VolumeError> {
        self.al
            .write(extents)
            .map_err(|e| VolumeError::Meta(format!("{}: {e}", self.al.path().display())))
    }
}

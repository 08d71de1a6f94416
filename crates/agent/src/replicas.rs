//! The agent's replica table: what is on disk in each pool, what is exported, and how the
//! desired state from the controller is applied to it. Everything here is blocking (file I/O);
//! callers run it on blocking threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tandem_api::{
    DesiredReplica, DesiredState, DiskState, PoolKind, PoolReport, ReplicaReport, Role,
};
use tandem_blockdev::{BlockDevice, FileDevice};
use tandem_meta::{Bitmap, DEFAULT_PEER_SLOTS, MetaError, ReplicaFiles, ReplicaMeta};
use tandem_nbd::server::{Export, ExportRegistry, Server};
use tracing::{debug, error, info, warn};

use crate::PoolConfig;

/// One row of the table: a replica found on disk, or a replica the controller asked for that
/// could not be created (`ghost`, no committed files).
pub(crate) struct Entry {
    pub pool: String,
    pub volume: String,
    pub files: ReplicaFiles,
    pub meta: Option<ReplicaMeta>,
    pub device: Option<Arc<FileDevice>>,
    pub export: Option<Arc<Export>>,
    #[allow(dead_code)] // used by replication next
    pub bitmap: Option<Bitmap>,
    pub disk_state: DiskState,
    pub last_error: Option<String>,
    /// Failed creation: only a report row, nothing on disk.
    pub ghost: Option<DesiredReplica>,
    /// `export` goes through a replication driver (see `crate::repl`), not the raw file.
    pub replicated: bool,
}

impl Entry {
    fn failed(pool: &str, files: ReplicaFiles, err: String) -> Self {
        Entry {
            pool: pool.to_string(),
            volume: files.volume().to_string(),
            files,
            meta: None,
            device: None,
            export: None,
            bitmap: None,
            disk_state: DiskState::Failed,
            last_error: Some(err),
            ghost: None,
            replicated: false,
        }
    }

    fn uuid(&self) -> Option<&str> {
        self.meta
            .as_ref()
            .map(|m| m.volume_uuid.as_str())
            .or(self.ghost.as_ref().map(|g| g.volume_uuid.as_str()))
    }
}

/// (pool, volume) -> entry.
#[derive(Default)]
pub(crate) struct Table {
    pub entries: BTreeMap<(String, String), Entry>,
}

impl Table {
    fn exported(&self, volume: &str) -> Option<&Entry> {
        self.entries
            .values()
            .find(|e| e.volume == volume && e.export.is_some())
    }
}

pub(crate) type SharedTable = Arc<RwLock<Table>>;

/// Diskless placements by volume name (nothing on disk; rebuilt from every desired state).
pub(crate) type DisklessSet = Mutex<BTreeMap<String, DesiredReplica>>;

pub(crate) fn read(t: &SharedTable) -> std::sync::RwLockReadGuard<'_, Table> {
    t.read().unwrap_or_else(|p| p.into_inner())
}
pub(crate) fn write(t: &SharedTable) -> std::sync::RwLockWriteGuard<'_, Table> {
    t.write().unwrap_or_else(|p| p.into_inner())
}

/// The NBD server's view of the table: exports appear and disappear with replicas.
pub(crate) struct Registry(pub SharedTable, pub Arc<crate::repl::Replication>);

impl ExportRegistry for Registry {
    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let found = {
            let t = read(&self.0);
            t.exported(name)
                .and_then(|e| Some((e.export.clone()?, e.replicated)))
        };
        // A witness exports its driver's device (a diskless Primary when a consumer opens it).
        let (export, replicated) = match found {
            Some(f) => f,
            None => (self.1.witness_export(name)?, true),
        };
        if replicated {
            // A consumer opens a replicated volume here: auto-promote (DRBD's auto-promote).
            self.1.consumer_opens(name);
        }
        Some(export)
    }
    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = read(&self.0)
            .entries
            .values()
            .filter(|e| e.export.is_some())
            .map(|e| e.volume.clone())
            .collect();
        for n in self.1.witness_exports() {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        names
    }
}

fn api_disk_state(s: tandem_meta::DiskState) -> DiskState {
    match s {
        tandem_meta::DiskState::UpToDate => DiskState::UpToDate,
        tandem_meta::DiskState::Inconsistent => DiskState::Inconsistent,
        tandem_meta::DiskState::Outdated => DiskState::Outdated,
        tandem_meta::DiskState::Diskless => DiskState::Diskless,
        tandem_meta::DiskState::Failed => DiskState::Failed,
    }
}

fn api_role(r: tandem_meta::Role) -> Role {
    match r {
        tandem_meta::Role::Primary => Role::Primary,
        tandem_meta::Role::Secondary => Role::Secondary,
    }
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn make_export(volume: &str, uuid: &str, device: &Arc<FileDevice>) -> Arc<Export> {
    Arc::new(Export {
        name: volume.to_string(),
        description: format!("tandem volume {volume} ({uuid})"),
        device: device.clone(),
        read_only: false,
        // One shared file descriptor: FLUSH (fdatasync) covers every connection's writes.
        multi_conn: true,
    })
}

/// Opens one replica from its files (after recovering interrupted operations). Returns `None`
/// when nothing of the replica is left.
pub(crate) fn load(pool: &str, dir: &Path, volume: &str) -> Option<Entry> {
    let files = ReplicaFiles::new(dir, volume);
    match files.recover() {
        Ok(rec) => {
            if rec.finished_create {
                info!(volume, pool, "completed an interrupted replica creation");
            }
            if rec.undid_delete {
                info!(volume, pool, "rolled back an interrupted replica deletion");
            }
            for p in &rec.removed {
                info!(volume, pool, path = %p.display(), "removed leftover of an interrupted operation");
            }
        }
        Err(e) => {
            error!(volume, pool, "recovery failed: {e}");
            return Some(Entry::failed(pool, files, format!("recovery: {e}")));
        }
    }
    let meta = match files.read_meta() {
        Ok(m) => m,
        Err(e) if e.is_not_found() => {
            if files.data().exists() {
                let msg = format!(
                    "{} has no metadata file {}: not served and not deleted; remove or restore it by hand",
                    files.data().display(),
                    files.meta().display()
                );
                warn!(volume, pool, "{msg}");
                return Some(Entry::failed(pool, files, msg));
            }
            return None;
        }
        Err(e) => {
            let msg = format!("metadata {}: {e}", files.meta().display());
            error!(volume, pool, "{msg}; replica not served");
            return Some(Entry::failed(pool, files, msg));
        }
    };
    if meta.volume_name != volume {
        let msg = format!(
            "metadata {} belongs to volume '{}'",
            files.meta().display(),
            meta.volume_name
        );
        error!(volume, pool, "{msg}; replica not served");
        let mut e = Entry::failed(pool, files, msg);
        e.meta = Some(meta);
        return Some(e);
    }
    let device = match FileDevice::open(&files.data()) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            let msg = format!("data file {}: {e}", files.data().display());
            error!(volume, pool, "{msg}; replica not served");
            let mut en = Entry::failed(pool, files, msg);
            en.meta = Some(meta);
            return Some(en);
        }
    };
    if device.size() != meta.size_bytes {
        let msg = format!(
            "data file {} is {} bytes, metadata says {}",
            files.data().display(),
            device.size(),
            meta.size_bytes
        );
        error!(volume, pool, "{msg}; replica not served");
        let mut en = Entry::failed(pool, files, msg);
        en.meta = Some(meta);
        return Some(en);
    }
    let mut last_error = None;
    let bitmap = match Bitmap::open(&files.bitmap()) {
        Ok(b) => Some(b),
        Err(e) if e.is_not_found() => {
            // Nothing used the bitmaps yet (no peers): an all-clear bitmap is correct.
            warn!(volume, pool, "bitmap file missing; recreating it");
            match Bitmap::create(
                &files.bitmap(),
                &meta.volume_uuid,
                meta.size_bytes,
                meta.bitmap_granularity,
                meta.peers.len() as u8,
            ) {
                Ok(b) => Some(b),
                Err(e) => {
                    last_error = Some(format!("bitmap: {e}"));
                    None
                }
            }
        }
        Err(e) => {
            warn!(volume, pool, "bitmap: {e}");
            last_error = Some(format!("bitmap {}: {e}", files.bitmap().display()));
            None
        }
    };
    // A replica with diskful peers is served only through its replication driver
    // (`crate::repl`), never from the raw file: writes there would bypass the peers and the
    // out-of-sync bitmaps.
    let export = if meta.peers.iter().any(|p| !p.is_free()) {
        debug!(
            volume,
            pool, "replica has peers: exported once its replication driver runs"
        );
        None
    } else {
        Some(make_export(volume, &meta.volume_uuid, &device))
    };
    Some(Entry {
        pool: pool.to_string(),
        volume: volume.to_string(),
        files,
        disk_state: api_disk_state(meta.disk_state),
        meta: Some(meta),
        device: Some(device),
        export,
        bitmap,
        last_error,
        ghost: None,
        replicated: false,
    })
}

/// A replicated replica whose peers all left the volume (`volume remove-replica` down to
/// one; its driver is stopped): when UpToDate, its peer slots are freed and the raw file is
/// exported again; otherwise it stays unserved with the reason in `last_error`.
fn single_again(e: &mut Entry) {
    let mut meta = match e.files.read_meta() {
        Ok(m) => m,
        Err(err) => {
            e.last_error = Some(format!("metadata: {err}"));
            return;
        }
    };
    e.disk_state = api_disk_state(meta.disk_state);
    if meta.disk_state != tandem_meta::DiskState::UpToDate {
        e.last_error = Some(format!(
            "the only replica left is {:?}, not UpToDate: not served (it was not in sync when \
             its peers left)",
            meta.disk_state
        ));
        e.meta = Some(meta);
        return;
    }
    let used: Vec<u8> = (0u8..)
        .zip(&meta.peers)
        .filter(|(_, p)| !p.is_free())
        .map(|(i, _)| i)
        .collect();
    if !used.is_empty() {
        for p in meta.peers.iter_mut() {
            p.node_id = tandem_meta::NO_PEER;
            p.bitmap_gen = tandem_meta::GenerationId::NONE;
        }
        if let Err(err) = e.files.write_meta(&mut meta) {
            e.last_error = Some(format!("metadata: {err}"));
            return;
        }
        if let Some(b) = e.bitmap.as_mut() {
            for slot in used {
                if let Err(err) = b.clear_range(slot, 0, meta.size_bytes) {
                    warn!(volume = %e.volume, "clearing the bitmap of a freed peer slot: {err}");
                }
            }
        }
    }
    info!(volume = %e.volume, pool = %e.pool, "single replica again: served from its file");
    e.export = e
        .device
        .as_ref()
        .map(|dev| make_export(&e.volume, &meta.volume_uuid, dev));
    e.meta = Some(meta);
    e.last_error = None;
}

/// Inserts an entry; a volume already exported from another pool keeps its export and the new
/// entry is marked Failed.
fn insert(table: &mut Table, mut e: Entry) {
    if e.export.is_some()
        && let Some(other) = table.exported(&e.volume)
        && other.pool != e.pool
    {
        let msg = format!(
            "volume '{}' also has a replica in pool '{}'; this one is not served",
            e.volume, other.pool
        );
        error!(volume = %e.volume, pool = %e.pool, "{msg}");
        e.export = None;
        e.disk_state = DiskState::Failed;
        e.last_error = Some(msg);
    }
    table.entries.insert((e.pool.clone(), e.volume.clone()), e);
}

/// Scans every pool directory (creating missing ones) and fills the table.
pub(crate) fn scan(pools: &[PoolConfig], table: &SharedTable) {
    for pool in pools {
        if let Err(e) = std::fs::create_dir_all(&pool.path) {
            error!(pool = %pool.name, path = %pool.path.display(), "cannot create pool directory: {e}");
            continue;
        }
        let names = match ReplicaFiles::scan(&pool.path) {
            Ok(n) => n,
            Err(e) => {
                error!(pool = %pool.name, "cannot scan pool: {e}");
                continue;
            }
        };
        for name in names {
            if let Err(e) = tandem_types::validate_name("volume", &name) {
                warn!(pool = %pool.name, "ignoring file(s) of '{name}': {e}");
                continue;
            }
            if let Some(entry) = load(&pool.name, &pool.path, &name) {
                let mut t = write(table);
                insert(&mut t, entry);
            }
        }
    }
    let t = read(table);
    info!(
        replicas = t.entries.len(),
        exported = t.entries.values().filter(|e| e.export.is_some()).count(),
        "pools scanned"
    );
}

/// Everything `apply` and `report` need.
pub(crate) struct Ctx<'a> {
    pub node: &'a str,
    /// The node id the controller assigned, if known.
    pub node_id: Option<u8>,
    pub pools: &'a [PoolConfig],
    pub table: &'a SharedTable,
    pub server: &'a Server,
    pub diskless: &'a DisklessSet,
    pub repl: &'a crate::repl::Replication,
}

impl Ctx<'_> {
    fn pool_dir(&self, name: &str) -> Option<&PathBuf> {
        self.pools.iter().find(|p| p.name == name).map(|p| &p.path)
    }

    fn connections(&self, volume: &str) -> u32 {
        self.server.connections(volume)
    }

    /// Applies a desired state whose cluster id was already checked. Idempotent.
    pub fn apply(&self, desired: &DesiredState) {
        // Ghost rows live only as long as the controller keeps asking for them.
        {
            let mut t = write(self.table);
            t.entries.retain(|_, e| {
                e.ghost.is_none()
                    || desired
                        .replicas
                        .iter()
                        .any(|d| d.present && d.volume == e.volume && d.pool == e.pool)
            });
        }
        // Diskless placements: nothing on disk, only remembered and reported.
        {
            let mut dl = self.diskless.lock().unwrap_or_else(|p| p.into_inner());
            dl.clear();
            for d in desired.replicas.iter().filter(|d| d.diskless && d.present) {
                dl.insert(d.volume.clone(), d.clone());
            }
        }
        for d in &desired.replicas {
            if d.diskless {
                continue;
            }
            if d.present {
                self.ensure_present(&desired.cluster_id, d);
            } else {
                self.ensure_absent(d);
            }
        }
    }

    fn set_ghost(&self, d: &DesiredReplica, err: String) {
        warn!(volume = %d.volume, pool = %d.pool, "cannot create replica: {err}");
        let dir = self.pool_dir(&d.pool).cloned().unwrap_or_default();
        let mut e = Entry::failed(&d.pool, ReplicaFiles::new(&dir, &d.volume), err);
        e.ghost = Some(d.clone());
        write(self.table)
            .entries
            .insert((d.pool.clone(), d.volume.clone()), e);
    }

    fn ensure_present(&self, cluster_id: &str, d: &DesiredReplica) {
        if let Err(e) = tandem_types::validate_name("volume", &d.volume) {
            return self.set_ghost(d, e.to_string());
        }
        {
            let mut t = write(self.table);
            // Already here (in this or another pool)?
            let existing = t
                .entries
                .values_mut()
                .find(|e| e.volume == d.volume && e.ghost.is_none());
            if let Some(e) = existing {
                let uuid = e.uuid().map(str::to_string);
                match uuid {
                    // Replicated replicas are resized by their running driver
                    // (`crate::repl`); the others here, files and export together.
                    Some(u)
                        if u == d.volume_uuid
                            && e.pool == d.pool
                            && !e.replicated
                            && e.device.is_some()
                            && e.meta
                                .as_ref()
                                .is_some_and(|m| m.size_bytes != d.size_bytes) =>
                    {
                        match resize_entry(e, d.size_bytes) {
                            Ok(()) => {
                                info!(volume = %d.volume, pool = %d.pool,
                                    size = d.size_bytes, "replica resized");
                                if e.last_error
                                    .as_deref()
                                    .is_some_and(|s| s.starts_with("resize"))
                                {
                                    e.last_error = None;
                                }
                            }
                            Err(err) => {
                                warn!(volume = %d.volume, pool = %d.pool, "resize failed: {err}");
                                e.last_error = Some(format!(
                                    "resize to {}: {err}",
                                    tandem_types::format_size(d.size_bytes)
                                ));
                            }
                        }
                    }
                    Some(u)
                        if u == d.volume_uuid
                            && e.pool == d.pool
                            && d.peers.is_empty()
                            && !e.replicated
                            && e.export.is_none()
                            && e.device.is_some() =>
                    {
                        single_again(e);
                    }
                    Some(u) if u == d.volume_uuid && e.pool == d.pool => {}
                    Some(u) if u == d.volume_uuid => {
                        e.last_error = Some(format!(
                            "controller wants this replica in pool '{}'; moving is not supported yet",
                            d.pool
                        ));
                    }
                    Some(u) => {
                        e.last_error = Some(format!(
                            "a replica of an older volume '{}' (uuid {u}) is still here; the new one (uuid {}) is not created until it is deleted",
                            d.volume, d.volume_uuid
                        ));
                    }
                    None => {
                        // Failed replica with unreadable metadata: keep it and its error.
                    }
                }
                return;
            }
        }
        let Some(dir) = self.pool_dir(&d.pool).cloned() else {
            return self.set_ghost(d, format!("no pool named '{}' on this node", d.pool));
        };
        match self.create(cluster_id, &dir, d) {
            Ok(entry) => {
                info!(volume = %d.volume, pool = %d.pool, size = d.size_bytes, uuid = %d.volume_uuid, "replica created");
                let mut t = write(self.table);
                t.entries.remove(&(d.pool.clone(), d.volume.clone()));
                insert(&mut t, entry);
            }
            Err(err) => self.set_ghost(d, err),
        }
    }

    /// Creates a replica: `V.data.creating` (sparse), `V.bitmap`, then `V.meta` (the commit
    /// point), then renames the data file to `V.data`. A crash anywhere is resolved by
    /// [`ReplicaFiles::recover`] on the next start (or right here on the next attempt).
    fn create(&self, cluster_id: &str, dir: &Path, d: &DesiredReplica) -> Result<Entry, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("pool directory {}: {e}", dir.display()))?;
        let files = ReplicaFiles::new(dir, &d.volume);
        files.recover().map_err(|e| format!("recovery: {e}"))?;
        if files.meta().exists() {
            // Appeared since the scan (or an earlier attempt committed): load what is there.
            return load(&self.pool_name(dir), dir, &d.volume)
                .ok_or_else(|| "replica vanished while loading".to_string());
        }
        if files.data().exists() {
            return Err(format!(
                "{} exists without metadata; refusing to overwrite it (remove it by hand)",
                files.data().display()
            ));
        }
        let cleanup = |files: &ReplicaFiles| {
            let _ = std::fs::remove_file(files.data_creating());
            let _ = std::fs::remove_file(files.bitmap());
        };
        let dev = FileDevice::create(&files.data_creating(), d.size_bytes)
            .map_err(|e| format!("creating {}: {e}", files.data_creating().display()))?;
        drop(dev);
        // One bitmap slot per diskful peer (a witness holds no data to be out of sync with).
        let diskful_peers: Vec<u8> = d
            .peers
            .iter()
            .filter(|p| !p.diskless)
            .map(|p| p.node_id)
            .collect();
        let slots = u8::try_from(diskful_peers.len())
            .unwrap_or(u8::MAX)
            .max(DEFAULT_PEER_SLOTS);
        let mut meta = ReplicaMeta::new(
            cluster_id,
            &d.volume,
            &d.volume_uuid,
            d.size_bytes,
            self.node,
            d.node_id.or(self.node_id).unwrap_or(0),
            slots,
            now_ms(),
        );
        for (slot, id) in meta.peers.iter_mut().zip(&diskful_peers) {
            slot.node_id = *id;
        }
        if d.join {
            // A new member of an existing volume holds none of its data: Inconsistent and
            // without a generation, so its peers resync everything into it (rule NewMember).
            meta.disk_state = tandem_meta::DiskState::Inconsistent;
            meta.current_gen = tandem_meta::GenerationId::NONE;
        }
        if let Err(e) = meta.validate() {
            let _ = std::fs::remove_file(files.data_creating());
            return Err(format!("metadata for this placement: {e}"));
        }
        let r: Result<(), MetaError> = (|| {
            Bitmap::create(
                &files.bitmap(),
                &d.volume_uuid,
                d.size_bytes,
                meta.bitmap_granularity,
                slots,
            )?;
            files.write_meta(&mut meta)
        })();
        if let Err(e) = r {
            cleanup(&files);
            return Err(format!("writing metadata: {e}"));
        }
        // Committed. Finish the rename (recover() does exactly that).
        files
            .recover()
            .map_err(|e| format!("finishing creation: {e}"))?;
        load(&d.pool, dir, &d.volume).ok_or_else(|| "replica vanished after creation".to_string())
    }

    fn pool_name(&self, dir: &Path) -> String {
        self.pools
            .iter()
            .find(|p| p.path == dir)
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    fn ensure_absent(&self, d: &DesiredReplica) {
        let key = {
            let t = read(self.table);
            t.entries
                .iter()
                .find(|(_, e)| e.volume == d.volume && e.uuid() == Some(d.volume_uuid.as_str()))
                .map(|(k, e)| (k.clone(), e.ghost.is_some()))
        };
        let Some((key, ghost)) = key else {
            debug!(volume = %d.volume, uuid = %d.volume_uuid, "delete: no replica with this uuid here");
            return;
        };
        if ghost {
            write(self.table).entries.remove(&key);
            return;
        }
        // Take the export away so no new client finds it, then make sure nobody is connected.
        let (export, files) = {
            let mut t = write(self.table);
            let Some(e) = t.entries.get_mut(&key) else {
                return;
            };
            let n = self.connections(&d.volume);
            if n > 0 {
                e.last_error = Some(format!(
                    "delete refused: {n} NBD connection(s) to '{}' are open",
                    d.volume
                ));
                warn!(volume = %d.volume, "delete refused: {n} connection(s) open");
                return;
            }
            (e.export.take(), e.files.clone())
        };
        let n = self.connections(&d.volume);
        if n > 0 {
            let mut t = write(self.table);
            if let Some(e) = t.entries.get_mut(&key) {
                e.export = export;
                e.last_error = Some(format!(
                    "delete refused: {n} NBD connection(s) to '{}' are open",
                    d.volume
                ));
            }
            return;
        }
        match delete_files(&files) {
            Ok(()) => {
                info!(volume = %d.volume, pool = %key.0, uuid = %d.volume_uuid, "replica deleted");
                write(self.table).entries.remove(&key);
            }
            Err(err) => {
                error!(volume = %d.volume, "delete failed: {err}");
                // Reload whatever is left, with the error.
                let mut t = write(self.table);
                t.entries.remove(&key);
                let dir = files.dir().to_path_buf();
                drop(t);
                let entry = load(&key.0, &dir, &d.volume);
                let mut t = write(self.table);
                if let Some(mut e) = entry {
                    e.last_error = Some(format!("delete failed: {err}"));
                    insert(&mut t, e);
                }
            }
        }
    }

    pub fn report_pools(&self) -> Vec<PoolReport> {
        self.pools
            .iter()
            .map(|p| {
                let (capacity_bytes, free_bytes) = statvfs(&p.path).unwrap_or_else(|e| {
                    warn!(pool = %p.name, "statvfs {}: {e}", p.path.display());
                    (0, 0)
                });
                PoolReport {
                    name: p.name.clone(),
                    kind: PoolKind::Dir,
                    path: p.path.display().to_string(),
                    capacity_bytes,
                    free_bytes,
                }
            })
            .collect()
    }

    pub fn report_replicas(&self) -> Vec<ReplicaReport> {
        let diskless: Vec<ReplicaReport> = self
            .diskless
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|d| ReplicaReport {
                volume: d.volume.clone(),
                volume_uuid: d.volume_uuid.clone(),
                pool: String::new(),
                size_bytes: d.size_bytes,
                export_size_bytes: None,
                allocated_bytes: 0,
                role: Role::Secondary,
                disk_state: DiskState::Diskless,
                disk_error: None,
                connections: self.connections(&d.volume),
                last_error: None,
                on_disk: false,
                diskless: true,
                peers: Vec::new(),
                out_of_sync_bytes: 0,
                resync_bytes_per_sec: 0,
                resync_yielding: false,
                last_resync_bytes: 0,
                quorum: None,
                role_error: None,
                resync_bytes_left: None,
                resync_eta_secs: None,
                verify: None,
                split_brain: Vec::new(),
                discard_pending: false,
                last_resync_skipped_bytes: 0,
                clients: self.server.clients(&d.volume),
                allow_two_primaries: false,
                dual_primary_partner: None,
                write_token: false,
                on_no_quorum: None,
                suspended_requests: 0,
            })
            .collect();
        let t = read(self.table);
        let mut out: Vec<ReplicaReport> = t
            .entries
            .values()
            .map(|e| ReplicaReport {
                volume: e.volume.clone(),
                volume_uuid: e.uuid().unwrap_or_default().to_string(),
                pool: e.pool.clone(),
                size_bytes: e
                    .meta
                    .as_ref()
                    .map(|m| m.size_bytes)
                    .or(e.ghost.as_ref().map(|g| g.size_bytes))
                    .unwrap_or(0),
                export_size_bytes: e.export.as_ref().map(|x| x.device.size()),
                allocated_bytes: e
                    .device
                    .as_ref()
                    .and_then(|d| d.allocated_bytes().ok())
                    .unwrap_or(0),
                role: e
                    .meta
                    .as_ref()
                    .map(|m| api_role(m.role))
                    .unwrap_or(Role::Unknown),
                disk_state: e.disk_state,
                disk_error: None,
                connections: if e.export.is_some() {
                    self.connections(&e.volume)
                } else {
                    0
                },
                last_error: e.last_error.clone(),
                on_disk: e.ghost.is_none(),
                diskless: false,
                peers: Vec::new(),
                out_of_sync_bytes: 0,
                resync_bytes_per_sec: 0,
                resync_yielding: false,
                last_resync_bytes: 0,
                quorum: None,
                role_error: None,
                resync_bytes_left: None,
                resync_eta_secs: None,
                verify: None,
                split_brain: Vec::new(),
                discard_pending: false,
                last_resync_skipped_bytes: 0,
                clients: if e.export.is_some() {
                    self.server.clients(&e.volume)
                } else {
                    Vec::new()
                },
                allow_two_primaries: false,
                dual_primary_partner: None,
                write_token: false,
                on_no_quorum: None,
                suspended_requests: 0,
            })
            .collect();
        drop(t);
        out.extend(diskless);
        for r in &mut out {
            self.repl.fill_report(r);
        }
        out
    }
}

/// Resizes a replica served from its raw file (or not served: a replicated replica whose
/// driver is not running). Grow: the files first (committed in `V.meta`), then the device
/// exposes the new size to new connections. Shrink: the device first (requests past the new
/// end fail from now on), then the files. Connected NBD clients keep the size they
/// negotiated until they reconnect.
fn resize_entry(e: &mut Entry, size: u64) -> Result<(), String> {
    let Some(meta) = e.meta.as_mut() else {
        return Err("no metadata".into());
    };
    let old = meta.size_bytes;
    if size < old
        && let Some(dev) = &e.device
    {
        dev.set_size(size);
    }
    let mut m = meta.clone();
    m.updated_unix_ms = now_ms();
    let res = e.files.resize(&mut m, e.bitmap.as_ref(), size);
    match res {
        Ok(relaid) => {
            *meta = m;
            if relaid.is_some() {
                e.bitmap = relaid;
            }
            if let Some(dev) = &e.device {
                dev.set_size(size);
            }
            Ok(())
        }
        Err(err) => {
            if let Some(dev) = &e.device {
                dev.set_size(old);
            }
            Err(err.to_string())
        }
    }
}

/// Deletes a replica's files: rename the data away, remove the metadata (the commit point),
/// then the rest. A crash in between is resolved by [`ReplicaFiles::recover`].
fn delete_files(files: &ReplicaFiles) -> Result<(), String> {
    let dir = files.dir();
    let sync = || tandem_meta::sync_dir(dir).map_err(|e| e.to_string());
    if files.data().exists() {
        std::fs::rename(files.data(), files.data_deleting())
            .map_err(|e| format!("rename {}: {e}", files.data().display()))?;
        sync()?;
    }
    std::fs::remove_file(files.meta())
        .map_err(|e| format!("remove {}: {e}", files.meta().display()))?;
    sync()?;
    // The activity log (`V.al`, kept by the replication driver) goes with the replica.
    let al = files.meta().with_extension("al");
    for p in [files.bitmap(), files.data_deleting(), al] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("remove {}: {e}", p.display())),
        }
    }
    sync()
}

/// (capacity, free for unprivileged users) of the filesystem holding `path`.
fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    Ok((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Flushes every open device (shutdown).
pub(crate) fn flush_all(table: &SharedTable) {
    let devices: Vec<(String, Arc<FileDevice>)> = read(table)
        .entries
        .values()
        .filter_map(|e| e.device.clone().map(|d| (e.volume.clone(), d)))
        .collect();
    for (v, d) in devices {
        if let Err(e) = d.flush() {
            error!(volume = %v, "flush at shutdown failed: {e}");
        }
    }
}

/// Cluster ids recorded in replica metadata (to adopt one when the state dir was lost).
pub(crate) fn cluster_ids(table: &SharedTable) -> Vec<String> {
    read(table)
        .entries
        .values()
        .filter_map(|e| e.meta.as_ref().map(|m| m.cluster_id.clone()))
        .filter(|c| !c.is_empty())
        .collect()
}

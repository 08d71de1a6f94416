//! Files of a replica in a pool directory, crash-safe metadata replacement and recovery of
//! interrupted creations and deletions.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::format::{MAX_META_LEN, ReplicaMeta};
use crate::{BITMAP_SUFFIX, DATA_SUFFIX, META_SUFFIX, MetaError, Result};

const TMP_SUFFIX: &str = ".tmp";
const CREATING_SUFFIX: &str = ".creating";
const DELETING_SUFFIX: &str = ".deleting";

/// The file names of one replica (volume `V`) in a pool directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaFiles {
    dir: PathBuf,
    volume: String,
}

/// What [`ReplicaFiles::recover`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovery {
    /// A creation had committed its metadata but not yet renamed `V.data.creating` to `V.data`;
    /// the rename was completed.
    pub finished_create: bool,
    /// A deletion had renamed `V.data` to `V.data.deleting` but not yet removed the metadata;
    /// the rename was undone (the replica still exists).
    pub undid_delete: bool,
    /// Leftovers of uncommitted creations or committed deletions that were removed.
    pub removed: Vec<PathBuf>,
    /// `V.data` exists without `V.meta`: never removed automatically; an operator decides.
    pub orphan_data: bool,
    /// An interrupted resize was resolved: `V.data` longer than the metadata's size was cut
    /// to it, or `V.bitmap` laid out for another size was laid out again for it.
    pub fixed_resize: bool,
}

impl ReplicaFiles {
    pub fn new(dir: &Path, volume: &str) -> Self {
        ReplicaFiles {
            dir: dir.to_path_buf(),
            volume: volume.to_string(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn volume(&self) -> &str {
        &self.volume
    }

    fn with(&self, suffix: &str) -> PathBuf {
        self.dir.join(format!("{}{suffix}", self.volume))
    }

    /// `V.data`: the volume's bytes.
    pub fn data(&self) -> PathBuf {
        self.with(DATA_SUFFIX)
    }
    /// `V.meta`: the metadata; its existence is the existence of the replica.
    pub fn meta(&self) -> PathBuf {
        self.with(META_SUFFIX)
    }
    /// `V.bitmap`: the per-peer out-of-sync bitmaps.
    pub fn bitmap(&self) -> PathBuf {
        self.with(BITMAP_SUFFIX)
    }
    /// `V.meta.tmp`: the next metadata while it is written.
    pub fn meta_tmp(&self) -> PathBuf {
        self.with(&format!("{META_SUFFIX}{TMP_SUFFIX}"))
    }
    /// `V.bitmap.tmp`: a new bitmap file while it is written.
    pub fn bitmap_tmp(&self) -> PathBuf {
        self.with(&format!("{BITMAP_SUFFIX}{TMP_SUFFIX}"))
    }
    /// `V.data.creating`: the data file of a replica whose metadata is not written yet.
    pub fn data_creating(&self) -> PathBuf {
        self.with(&format!("{DATA_SUFFIX}{CREATING_SUFFIX}"))
    }
    /// `V.data.deleting`: the data file of a replica being deleted.
    pub fn data_deleting(&self) -> PathBuf {
        self.with(&format!("{DATA_SUFFIX}{DELETING_SUFFIX}"))
    }

    /// Volume names that have any replica file in `dir` (metadata, data, or a transient name).
    /// Callers validate the names before using them.
    pub fn scan(dir: &Path) -> Result<Vec<String>> {
        let suffixes = [
            format!("{META_SUFFIX}{TMP_SUFFIX}"),
            format!("{DATA_SUFFIX}{CREATING_SUFFIX}"),
            format!("{DATA_SUFFIX}{DELETING_SUFFIX}"),
            META_SUFFIX.to_string(),
            DATA_SUFFIX.to_string(),
        ];
        let mut names = std::collections::BTreeSet::new();
        let rd = std::fs::read_dir(dir).map_err(|e| MetaError::io(dir, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| MetaError::io(dir, e))?;
            let Some(fname) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if let Some(v) = suffixes
                .iter()
                .find_map(|s| fname.strip_suffix(s.as_str()))
                .filter(|v| !v.is_empty())
            {
                names.insert(v.to_string());
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Brings the files into a state without transient names, following the rule "the replica
    /// exists if and only if `V.meta` exists". Never removes `V.data`.
    pub fn recover(&self) -> Result<Recovery> {
        let mut rec = Recovery::default();
        let meta_exists = exists(&self.meta())?;
        let data_exists = exists(&self.data())?;
        for tmp in [self.meta_tmp(), self.bitmap_tmp()] {
            if remove_if_exists(&tmp)? {
                rec.removed.push(tmp);
            }
        }
        if meta_exists {
            if !data_exists && exists(&self.data_creating())? {
                rename(&self.data_creating(), &self.data())?;
                rec.finished_create = true;
            } else if !data_exists && exists(&self.data_deleting())? {
                rename(&self.data_deleting(), &self.data())?;
                rec.undid_delete = true;
            }
        } else {
            for leftover in [self.data_creating(), self.data_deleting()] {
                if remove_if_exists(&leftover)? {
                    rec.removed.push(leftover);
                }
            }
            if data_exists {
                rec.orphan_data = true;
            } else if remove_if_exists(&self.bitmap())? {
                rec.removed.push(self.bitmap());
            }
        }
        if meta_exists && exists(&self.data())? {
            rec.fixed_resize = self.recover_resize()?;
        }
        if !rec.removed.is_empty() || rec.finished_create || rec.undid_delete {
            sync_dir(&self.dir)?;
        }
        Ok(rec)
    }

    /// The metadata's size is the committed one (see [`ReplicaFiles::resize`]): a longer data
    /// file (a grow not committed, or a shrink committed but not truncated yet) is cut to it,
    /// and a bitmap laid out for another size is laid out again. An unreadable metadata or
    /// bitmap is left to the caller (it reports them).
    fn recover_resize(&self) -> Result<bool> {
        let Ok(meta) = self.read_meta() else {
            return Ok(false);
        };
        let mut fixed = false;
        let data = self.data();
        let len = std::fs::metadata(&data)
            .map_err(|e| MetaError::io(&data, e))?
            .len();
        if len > meta.size_bytes {
            let f = OpenOptions::new()
                .write(true)
                .open(&data)
                .map_err(|e| MetaError::io(&data, e))?;
            f.set_len(meta.size_bytes)
                .and_then(|_| f.sync_all())
                .map_err(|e| MetaError::io(&data, e))?;
            fixed = true;
        }
        if let Ok(b) = crate::Bitmap::open(&self.bitmap())
            && b.size_bytes() != meta.size_bytes
        {
            b.relayout(meta.size_bytes)?;
            fixed = true;
        }
        Ok(fixed)
    }

    /// Resizes the replica to `new_size` bytes; `meta` is its current metadata and `bitmap`
    /// its open bitmap file, if the caller holds one (it is replaced: use the returned one).
    /// Order (the metadata is the commit point, [`ReplicaFiles::recover`] resolves a crash
    /// at any step):
    /// 1. grow only: `V.data` extended (sparse, reads as zeros), fsync;
    /// 2. `V.bitmap` laid out for the new size (`V.bitmap.tmp`, fsync, rename, fsync dir);
    /// 3. `V.meta` with the new size and bitmap offsets: **commit point**;
    /// 4. shrink only: `V.data` truncated, fsync.
    ///
    /// The caller must not let anyone write past the old end before this returns (grow), and
    /// must stop every access past the new end before calling it (shrink).
    pub fn resize(
        &self,
        meta: &mut ReplicaMeta,
        bitmap: Option<&crate::Bitmap>,
        new_size: u64,
    ) -> Result<Option<crate::Bitmap>> {
        let old = meta.size_bytes;
        let data = self.data();
        let set_len = |len: u64| -> Result<()> {
            let f = OpenOptions::new()
                .write(true)
                .open(&data)
                .map_err(|e| MetaError::io(&data, e))?;
            f.set_len(len)
                .and_then(|_| f.sync_all())
                .map_err(|e| MetaError::io(&data, e))
        };
        if new_size > old {
            set_len(new_size)?;
        }
        let relaid = match bitmap {
            Some(b) => Some(b.relayout(new_size)?),
            None if exists(&self.bitmap())? => {
                Some(crate::Bitmap::open(&self.bitmap())?.relayout(new_size)?)
            }
            None => None,
        };
        meta.size_bytes = new_size;
        for (i, slot) in meta.peers.iter_mut().enumerate() {
            let (o, l) = crate::Bitmap::region(new_size, meta.bitmap_granularity, i as u8);
            slot.bitmap_offset = o;
            slot.bitmap_bytes = l;
        }
        self.write_meta(meta)?;
        if new_size < old {
            set_len(new_size)?;
        }
        Ok(relaid)
    }

    /// Reads and decodes `V.meta`.
    pub fn read_meta(&self) -> Result<ReplicaMeta> {
        read_meta(&self.meta())
    }

    /// Replaces `V.meta` atomically with `meta`, after incrementing its sequence number.
    pub fn write_meta(&self, meta: &mut ReplicaMeta) -> Result<()> {
        meta.seq = meta.seq.wrapping_add(1);
        write_meta(&self.meta(), meta)
    }
}

/// Reads and decodes a metadata file. Files larger than [`MAX_META_LEN`] are refused unread.
pub fn read_meta(path: &Path) -> Result<ReplicaMeta> {
    let f = File::open(path).map_err(|e| MetaError::io(path, e))?;
    let len = f.metadata().map_err(|e| MetaError::io(path, e))?.len();
    if len > MAX_META_LEN as u64 {
        return Err(MetaError::TooLarge {
            what: "metadata",
            len,
            max: MAX_META_LEN as u64,
        });
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(MAX_META_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| MetaError::io(path, e))?;
    ReplicaMeta::decode(&buf)
}

/// Writes `meta` to `path` so that a crash at any point leaves either the old or the new file:
/// write `path.tmp`, fsync it, rename it over `path`, fsync the directory.
pub fn write_meta(path: &Path, meta: &ReplicaMeta) -> Result<()> {
    let bytes = meta.encode()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(TMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    write_file_atomic(path, &tmp, &bytes)
}

pub(crate) fn write_file_atomic(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)
            .map_err(|e| MetaError::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| MetaError::io(tmp, e))?;
        f.sync_all().map_err(|e| MetaError::io(tmp, e))?;
    }
    rename(tmp, path)?;
    sync_dir(parent(path))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// fsyncs a directory so that renames, creations and removals in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| MetaError::io(dir, e))
}

fn exists(p: &Path) -> Result<bool> {
    match std::fs::symlink_metadata(p) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(MetaError::io(p, e)),
    }
}

fn remove_if_exists(p: &Path) -> Result<bool> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(MetaError::io(p, e)),
    }
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|e| MetaError::io(from, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: &str) -> ReplicaMeta {
        ReplicaMeta::new("c", v, "uuid-1", 1 << 20, "n", 0, 3, 1)
    }

    #[test]
    fn write_read_round_trip_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let f = ReplicaFiles::new(dir.path(), "vol");
        let mut m = meta("vol");
        f.write_meta(&mut m).unwrap();
        assert_eq!(m.seq, 1);
        assert_eq!(f.read_meta().unwrap(), m);
        m.size_bytes = 2 << 20;
        f.write_meta(&mut m).unwrap();
        assert_eq!(f.read_meta().unwrap().seq, 2);
        assert!(!f.meta_tmp().exists());
        assert_eq!(f.meta(), dir.path().join("vol.meta"));
        assert_eq!(f.data(), dir.path().join("vol.data"));
        assert_eq!(f.bitmap(), dir.path().join("vol.bitmap"));
    }

    #[test]
    fn torn_temp_file_leaves_old_version_readable() {
        let dir = tempfile::tempdir().unwrap();
        let f = ReplicaFiles::new(dir.path(), "vol");
        let mut m = meta("vol");
        f.write_meta(&mut m).unwrap();
        // A crash while writing the next version: a partial temp file, never renamed.
        let mut next = m.clone();
        next.size_bytes = 4 << 20;
        next.seq += 1;
        let bytes = next.encode().unwrap();
        for cut in [0, 1, 10, bytes.len() / 2, bytes.len() - 1] {
            std::fs::write(f.meta_tmp(), &bytes[..cut]).unwrap();
            assert_eq!(f.read_meta().unwrap(), m, "cut {cut}");
            assert!(read_meta(&f.meta_tmp()).is_err());
        }
        let rec = f.recover().unwrap();
        assert_eq!(rec.removed, vec![f.meta_tmp()]);
        assert_eq!(f.read_meta().unwrap(), m);
    }

    #[test]
    fn corrupt_and_oversized_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = ReplicaFiles::new(dir.path(), "vol");
        let mut m = meta("vol");
        f.write_meta(&mut m).unwrap();
        let mut bytes = std::fs::read(f.meta()).unwrap();
        bytes[30] ^= 1;
        std::fs::write(f.meta(), &bytes).unwrap();
        assert!(matches!(f.read_meta(), Err(MetaError::Checksum { .. })));
        std::fs::write(f.meta(), vec![0u8; MAX_META_LEN + 1]).unwrap();
        assert!(matches!(f.read_meta(), Err(MetaError::TooLarge { .. })));
        std::fs::remove_file(f.meta()).unwrap();
        assert!(f.read_meta().unwrap_err().is_not_found());
    }

    #[test]
    fn recovery_follows_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        // Crash during create before the metadata: leftovers removed.
        let a = ReplicaFiles::new(dir.path(), "a");
        std::fs::write(a.data_creating(), b"x").unwrap();
        std::fs::write(a.bitmap(), b"x").unwrap();
        let rec = a.recover().unwrap();
        assert_eq!(rec.removed.len(), 2);
        assert!(!a.data_creating().exists() && !a.bitmap().exists());

        // Crash during create after the metadata: rename completed.
        let b = ReplicaFiles::new(dir.path(), "b");
        std::fs::write(b.data_creating(), b"x").unwrap();
        b.write_meta(&mut meta("b")).unwrap();
        assert!(b.recover().unwrap().finished_create);
        assert!(b.data().exists() && !b.data_creating().exists());

        // Crash during delete before the metadata was removed: rename undone.
        let c = ReplicaFiles::new(dir.path(), "c");
        std::fs::write(c.data_deleting(), b"x").unwrap();
        c.write_meta(&mut meta("c")).unwrap();
        assert!(c.recover().unwrap().undid_delete);
        assert!(c.data().exists());

        // Crash during delete after the metadata was removed: leftover removed.
        let d = ReplicaFiles::new(dir.path(), "d");
        std::fs::write(d.data_deleting(), b"x").unwrap();
        assert_eq!(d.recover().unwrap().removed, vec![d.data_deleting()]);

        // Data without metadata: reported, kept.
        let e = ReplicaFiles::new(dir.path(), "e.data");
        std::fs::write(e.data(), b"x").unwrap();
        assert!(e.recover().unwrap().orphan_data);
        assert!(e.data().exists());

        let names = ReplicaFiles::scan(dir.path()).unwrap();
        assert_eq!(names, vec!["b", "c", "e.data"]);
    }

    /// A replica of `size` with a bitmap of 3 slots, slot 0 assigned.
    fn replica(dir: &Path, size: u64) -> (ReplicaFiles, ReplicaMeta, crate::Bitmap) {
        let f = ReplicaFiles::new(dir, "vol");
        let mut m = ReplicaMeta::new("c", "vol", "uuid-1", size, "n", 0, 3, 1);
        m.peers[0].node_id = 1;
        std::fs::File::create(f.data())
            .unwrap()
            .set_len(size)
            .unwrap();
        let b = crate::Bitmap::create(&f.bitmap(), "uuid-1", size, 4096, 3).unwrap();
        f.write_meta(&mut m).unwrap();
        (f, m, b)
    }

    fn len(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().len()
    }

    #[test]
    fn resize_grows_and_shrinks_keeping_bits() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut m, mut b) = replica(dir.path(), 1 << 20);
        b.set_bits(0, 3, 2).unwrap();
        b.set_bits(1, 255, 1).unwrap();
        let b = f.resize(&mut m, Some(&b), 4 << 20).unwrap().unwrap();
        assert_eq!(len(&f.data()), 4 << 20);
        assert_eq!(b.size_bytes(), 4 << 20);
        assert_eq!(b.bits(), 1024);
        assert_eq!(b.count(0), 2);
        assert!(b.test(0, 3).unwrap() && b.test(0, 4).unwrap() && b.test(1, 255).unwrap());
        let back = f.read_meta().unwrap();
        assert_eq!(back.size_bytes, 4 << 20);
        assert_eq!(
            (back.peers[1].bitmap_offset, back.peers[1].bitmap_bytes),
            crate::Bitmap::region(4 << 20, 4096, 1)
        );
        assert!(!f.bitmap_tmp().exists());
        // Reopened from disk: the same.
        let b2 = crate::Bitmap::open(&f.bitmap()).unwrap();
        assert_eq!((b2.count(0), b2.count(1)), (2, 1));
        // Shrink to 4 blocks: bit 4 and 255 are past the end.
        let b = f.resize(&mut m, Some(&b2), 4 * 4096).unwrap().unwrap();
        assert_eq!(len(&f.data()), 4 * 4096);
        assert_eq!((b.bits(), b.count(0), b.count(1)), (4, 1, 0));
        assert_eq!(f.recover().unwrap(), Recovery::default());
    }

    #[test]
    fn crash_during_resize_resumes_at_the_committed_size() {
        // Grow interrupted after the data file grew: cut back.
        let dir = tempfile::tempdir().unwrap();
        let (f, _m, mut b) = replica(dir.path(), 1 << 20);
        b.set_bits(0, 7, 1).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.data())
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let rec = f.recover().unwrap();
        assert!(rec.fixed_resize);
        assert_eq!(len(&f.data()), 1 << 20);
        // Interrupted after the bitmap was laid out (and a temp file left), before the
        // metadata: the bitmap goes back to the committed size with its bits.
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.data())
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let big = b.relayout(2 << 20).unwrap();
        assert_eq!(big.size_bytes(), 2 << 20);
        std::fs::write(f.bitmap_tmp(), b"partial").unwrap();
        let rec = f.recover().unwrap();
        assert!(rec.fixed_resize);
        assert!(!f.bitmap_tmp().exists());
        let b = crate::Bitmap::open(&f.bitmap()).unwrap();
        assert_eq!(b.size_bytes(), 1 << 20);
        assert!(b.test(0, 7).unwrap());
        assert_eq!(len(&f.data()), 1 << 20);
        // Shrink committed, truncation not done: finished.
        let mut m = f.read_meta().unwrap();
        m.size_bytes = 1 << 19;
        for (i, s) in m.peers.iter_mut().enumerate() {
            let (o, l) = crate::Bitmap::region(1 << 19, 4096, i as u8);
            s.bitmap_offset = o;
            s.bitmap_bytes = l;
        }
        f.write_meta(&mut m).unwrap();
        assert!(f.recover().unwrap().fixed_resize);
        assert_eq!(len(&f.data()), 1 << 19);
        assert_eq!(
            crate::Bitmap::open(&f.bitmap()).unwrap().size_bytes(),
            1 << 19
        );
        assert!(!f.recover().unwrap().fixed_resize);
    }
}

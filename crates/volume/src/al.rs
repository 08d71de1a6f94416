//! The activity-log file `V.al` (tandem-meta has none): the set of hot extents the engine
//! asked to persist with `PersistActivityLog`.
//!
//! ```text
//! The file holds two slots of SLOT bytes each (slot = seq % 2); a record is
//! offset  size  field
//! 0       8     magic "TNDMAL01"
//! 8       8     seq (u64 LE), incremented by every write
//! 16      4     extent count N (u32 LE)
//! 20      8*N   extent numbers (u64 LE)
//! 20+8N   4     crc32c (u32 LE) of bytes [0, 20+8N)
//! ```
//!
//! A write goes to the slot the previous record does not occupy (pwrite + fdatasync), so a
//! torn write only ever damages the record being written; reading takes the valid record with
//! the highest seq. A missing file or no valid record is an empty activity log (the file is
//! written before the first write to a cold extent, so no extent can be hot without a record).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TNDMAL01";
const HEADER: usize = 20;

/// Suffix of the activity-log file next to `V.meta`.
pub const AL_SUFFIX: &str = ".al";

/// An open activity-log file.
#[derive(Debug)]
pub struct ActivityLogFile {
    file: File,
    path: PathBuf,
    seq: u64,
    slot_bytes: u64,
}

impl ActivityLogFile {
    /// Opens (creating if missing) `path`, sized for at most `max_extents` extents, and
    /// returns it with the extents of its newest valid record.
    pub fn open(path: &Path, max_extents: usize) -> std::io::Result<(ActivityLogFile, Vec<u64>)> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !existed {
            // The file's directory entry must survive a crash before any record counts on it.
            file.sync_all()?;
            if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tandem_meta::sync_dir(dir).map_err(|e| std::io::Error::other(e.to_string()))?;
            }
        }
        let slot_bytes = ((HEADER + 8 * max_extents + 4) as u64).div_ceil(4096) * 4096;
        let mut best: Option<(u64, Vec<u64>)> = None;
        let len = file.metadata()?.len();
        // The file is always sized to two slots before a record is written: its length gives
        // the slot size it was written with.
        let cur_slot = if len >= 2 * 4096 { len / 2 } else { slot_bytes };
        for slot in 0..2u64 {
            if let Some((seq, ext)) = read_record(&file, slot * cur_slot, cur_slot)?
                && best.as_ref().is_none_or(|(s, _)| seq > *s)
            {
                best = Some((seq, ext));
            }
        }
        let (seq, extents) = best.unwrap_or((0, Vec::new()));
        let mut al = ActivityLogFile {
            file,
            path: path.to_path_buf(),
            seq,
            slot_bytes: cur_slot.max(slot_bytes),
        };
        if al.slot_bytes != cur_slot && seq > 0 {
            // Rewrite both slots in the larger layout.
            al.file.set_len(2 * al.slot_bytes)?;
            al.write(&extents)?;
            al.write(&extents)?;
        }
        Ok((al, extents))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the set of hot extents, durably (returns after fdatasync).
    pub fn write(&mut self, extents: &[u64]) -> std::io::Result<()> {
        let need = (HEADER + 8 * extents.len() + 4) as u64;
        if need > self.slot_bytes {
            // More extents than configured: grow the slots (rare; the layout is re-derived
            // from the file size when reading).
            self.slot_bytes = need.div_ceil(4096) * 4096;
            self.file.set_len(2 * self.slot_bytes)?;
        }
        let seq = self.seq + 1;
        let mut buf = Vec::with_capacity(need as usize);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        for e in extents {
            buf.extend_from_slice(&e.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        if self.file.metadata()?.len() < 2 * self.slot_bytes {
            self.file.set_len(2 * self.slot_bytes)?;
        }
        self.file.write_all_at(&buf, (seq % 2) * self.slot_bytes)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
    }
}

fn read_record(file: &File, offset: u64, max: u64) -> std::io::Result<Option<(u64, Vec<u64>)>> {
    let mut head = [0u8; HEADER];
    if file.read_exact_at(&mut head, offset).is_err() {
        return Ok(None);
    }
    if &head[0..8] != MAGIC {
        return Ok(None);
    }
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    let n = u64::from(u32::from_le_bytes(
        head[16..20].try_into().expect("4 bytes"),
    ));
    let total = HEADER as u64 + 8 * n + 4;
    if total > max {
        return Ok(None);
    }
    let mut buf = vec![0u8; total as usize];
    if file.read_exact_at(&mut buf, offset).is_err() {
        return Ok(None);
    }
    let body = total as usize - 4;
    let stored = u32::from_le_bytes(buf[body..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[..body]) != stored {
        return Ok(None);
    }
    let extents = buf[HEADER..body]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    Ok(Some((seq, extents)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_alternating_slots_and_torn_record() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.al");
        let (mut al, e) = ActivityLogFile::open(&p, 16).unwrap();
        assert!(e.is_empty());
        al.write(&[1, 2, 3]).unwrap();
        al.write(&[4]).unwrap();
        drop(al);
        let (mut al, e) = ActivityLogFile::open(&p, 16).unwrap();
        assert_eq!(e, vec![4]);
        al.write(&[7, 8]).unwrap();
        let slot = al.slot_bytes;
        let seq = al.seq;
        drop(al);
        // Tear the newest record: the previous one wins.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xff; 4], (seq % 2) * slot + 24).unwrap();
        let (_, e) = ActivityLogFile::open(&p, 16).unwrap();
        assert_eq!(e, vec![4]);
    }
}

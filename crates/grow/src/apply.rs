//! Applying a plan with an undo record, and undoing it.

use serde::{Deserialize, Serialize};
use tandem_blockdev::BlockDevice;

use crate::GrowError;
use crate::crc::crc32;
use crate::plan::Plan;
use crate::probe::read_vec;

/// Version of the [`UndoRecord`] format.
pub const UNDO_FORMAT: u32 = 1;

/// The bytes a plan overwrites, as they were before: enough to put the old table back byte for
/// byte. Serializable so the caller can persist it (JSON, hex data) before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoRecord {
    pub format: u32,
    /// The target size of the plan it belongs to.
    pub target_bytes: u64,
    /// In write order; [`undo`] restores in reverse.
    pub regions: Vec<UndoRegion>,
}

/// One region: its old bytes and the CRC-32 of the bytes the plan writes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoRegion {
    pub offset: u64,
    #[serde(with = "hex")]
    pub old: Vec<u8>,
    pub new_crc32: u32,
}

impl UndoRecord {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(s: &str) -> Result<UndoRecord, GrowError> {
        let r: UndoRecord =
            serde_json::from_str(s).map_err(|e| GrowError::BadUndoRecord(e.to_string()))?;
        if r.format != UNDO_FORMAT {
            return Err(GrowError::BadUndoRecord(format!(
                "format {} is not {UNDO_FORMAT}",
                r.format
            )));
        }
        Ok(r)
    }
}

mod hex {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(b.len() * 2);
        for x in b {
            out.push_str(&format!("{x:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        let s = s.as_bytes();
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of hex digits"));
        }
        s.chunks(2)
            .map(|c| {
                let hi = (c[0] as char).to_digit(16);
                let lo = (c[1] as char).to_digit(16);
                match (hi, lo) {
                    (Some(h), Some(l)) => Ok((h * 16 + l) as u8),
                    _ => Err(serde::de::Error::custom("not a hex digit")),
                }
            })
            .collect()
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Every region already holds the new bytes (or the plan has none): nothing written.
    NothingToDo,
    /// The table was written; the record undoes it.
    Applied(UndoRecord),
}

/// Applies `plan` to `dev`.
///
/// Every region is first read: holding the new bytes (already applied, e.g. a resumed apply),
/// the bytes seen when planning, or (for regions that were past the device's end when planning)
/// anything. Any other content means the device changed since the plan: nothing is written.
/// Then `save_undo` gets the [`UndoRecord`] (old bytes: those seen when planning, or read now
/// for regions the plan could not read) and must persist it; if it fails nothing is written.
/// Then the regions are written in the plan's order, each followed by a flush.
pub fn apply(
    dev: &dyn BlockDevice,
    plan: &Plan,
    save_undo: &mut dyn FnMut(&UndoRecord) -> std::io::Result<()>,
) -> Result<ApplyOutcome, GrowError> {
    if plan.writes.is_empty() {
        return Ok(ApplyOutcome::NothingToDo);
    }
    if dev.size() < plan.target_bytes {
        return Err(GrowError::DeviceTooSmall {
            device: dev.size(),
            target: plan.target_bytes,
        });
    }
    let mut regions = Vec::new();
    let mut pending = Vec::new();
    for w in &plan.writes {
        let cur = read_vec(dev, w.offset, w.new.len() as u64)?;
        let done = cur == w.new;
        match &w.old {
            Some(old) if !done && &cur != old => {
                return Err(GrowError::Changed {
                    offset: w.offset,
                    len: w.new.len() as u64,
                });
            }
            _ => {}
        }
        let old = match &w.old {
            Some(old) => old.clone(),
            None => cur,
        };
        regions.push(UndoRegion {
            offset: w.offset,
            old,
            new_crc32: crc32(&w.new),
        });
        if !done {
            pending.push(w);
        }
    }
    if pending.is_empty() {
        return Ok(ApplyOutcome::NothingToDo);
    }
    let record = UndoRecord {
        format: UNDO_FORMAT,
        target_bytes: plan.target_bytes,
        regions,
    };
    save_undo(&record).map_err(GrowError::SaveUndo)?;
    for w in pending {
        dev.write_at(&w.new, w.offset)?;
        dev.flush()?;
    }
    Ok(ApplyOutcome::Applied(record))
}

/// Puts the old table back from `record`. Every region must hold either the bytes the plan
/// wrote (CRC-32 matches) or already the old bytes; otherwise nothing is written. Returns the
/// number of regions written (0: already undone).
pub fn undo(dev: &dyn BlockDevice, record: &UndoRecord) -> Result<usize, GrowError> {
    if record.format != UNDO_FORMAT {
        return Err(GrowError::BadUndoRecord(format!(
            "format {} is not {UNDO_FORMAT}",
            record.format
        )));
    }
    let mut todo = Vec::new();
    for r in &record.regions {
        let cur = read_vec(dev, r.offset, r.old.len() as u64)?;
        if cur == r.old {
            continue;
        }
        if crc32(&cur) != r.new_crc32 {
            return Err(GrowError::UndoMismatch {
                offset: r.offset,
                len: r.old.len() as u64,
            });
        }
        todo.push(r);
    }
    for r in todo.iter().rev() {
        dev.write_at(&r.old, r.offset)?;
        dev.flush()?;
    }
    Ok(todo.len())
}

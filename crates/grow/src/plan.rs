//! Planning the partition-table layer of a grow.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;
use tandem_blockdev::BlockDevice;
use tandem_types::format_size;

use crate::GrowError;
use crate::crc::crc32;
use crate::fs::Filesystem;
use crate::probe::{
    GptTable, MbrKind, MbrTable, Probe, SECTOR, Table, le32, le64, probe, read_vec,
};

/// Largest alignment a partition end is rounded to: 2048 sectors = 1 MiB.
pub const MAX_ALIGNMENT_SECTORS: u64 = 2048;
/// MBR entries hold 32-bit sector numbers and counts: nothing may reach past 2^32 sectors (2 TiB).
pub const MBR_MAX_SECTORS: u64 = 1 << 32;

/// Which layer a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    PartitionTable,
    Filesystem,
}

/// One step of a plan. Sector numbers are LBAs of 512 bytes; ranges are inclusive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Step {
    /// Write the backup GPT (entry array, then header) at the new end of the device.
    MoveGptBackup {
        old_header_lba: u64,
        new_header_lba: u64,
        new_entries_lba: u64,
        entries_sectors: u64,
        entries_bytes: u64,
    },
    /// Zero the old backup GPT (entry array and header) that now lies inside the usable area.
    WipeOldGptBackup {
        first_lba: u64,
        last_lba: u64,
        bytes: u64,
    },
    /// Raise the last usable LBA in both GPT headers.
    SetGptLastUsable {
        old_lba: u64,
        new_lba: u64,
        added_bytes: u64,
    },
    /// Make the protective MBR's 0xEE entry cover the grown disk.
    UpdateProtectiveMbr { old_sectors: u64, new_sectors: u64 },
    /// Move the end of a partition. `kind`: gpt, primary, extended or logical.
    GrowPartition {
        number: u32,
        kind: String,
        start_lba: u64,
        old_end_lba: u64,
        new_end_lba: u64,
        old_sectors: u64,
        new_sectors: u64,
        old_bytes: u64,
        new_bytes: u64,
        alignment_sectors: u64,
    },
    /// Update the link entry in the EBR before the last logical partition so that it still
    /// spans that logical partition.
    UpdateEbrLink {
        ebr_lba: u64,
        old_sectors: u64,
        new_sectors: u64,
    },
    /// The filesystem can now grow into the space. NOT done by this crate.
    ResizeFilesystem {
        filesystem: String,
        offset_bytes: u64,
        old_bytes: u64,
        available_bytes: u64,
        done_by_this_crate: bool,
    },
}

impl Step {
    pub fn layer(&self) -> Layer {
        match self {
            Step::ResizeFilesystem { .. } => Layer::Filesystem,
            _ => Layer::PartitionTable,
        }
    }
}

fn sectors_and_size(sectors: u64) -> String {
    format!("{sectors} sectors = {}", format_size(sectors * SECTOR))
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::MoveGptBackup {
                old_header_lba,
                new_header_lba,
                new_entries_lba,
                entries_sectors,
                entries_bytes,
            } => write!(
                f,
                "move the backup GPT header from LBA {old_header_lba} to LBA {new_header_lba} (byte offset {}); \
                 its entry array ({entries_bytes} B in {entries_sectors} sectors) to LBA {new_entries_lba}..{}",
                new_header_lba * SECTOR,
                new_entries_lba + entries_sectors - 1
            ),
            Step::WipeOldGptBackup {
                first_lba,
                last_lba,
                bytes,
            } => write!(
                f,
                "zero the old backup GPT at LBA {first_lba}..{last_lba} ({}) at byte offset {}",
                format_size(*bytes),
                first_lba * SECTOR
            ),
            Step::SetGptLastUsable {
                old_lba,
                new_lba,
                added_bytes,
            } => write!(
                f,
                "set the last usable LBA from {old_lba} to {new_lba} (+{}); recompute both headers' CRC32s",
                format_size(*added_bytes)
            ),
            Step::UpdateProtectiveMbr {
                old_sectors,
                new_sectors,
            } => write!(
                f,
                "protective MBR entry (type 0xEE) from {} to {}",
                sectors_and_size(*old_sectors),
                sectors_and_size(*new_sectors)
            ),
            Step::GrowPartition {
                number,
                kind,
                start_lba,
                old_end_lba,
                new_end_lba,
                old_sectors,
                new_sectors,
                old_bytes: _,
                new_bytes: _,
                alignment_sectors,
            } => write!(
                f,
                "grow {kind} partition {number} (start LBA {start_lba}): end LBA {old_end_lba} -> {new_end_lba}, \
                 size {} -> {} (+{}; end aligned to {alignment_sectors} sectors)",
                sectors_and_size(*old_sectors),
                sectors_and_size(*new_sectors),
                format_size((new_sectors - old_sectors) * SECTOR)
            ),
            Step::UpdateEbrLink {
                ebr_lba,
                old_sectors,
                new_sectors,
            } => write!(
                f,
                "EBR link at LBA {ebr_lba}: span {} -> {}",
                sectors_and_size(*old_sectors),
                sectors_and_size(*new_sectors)
            ),
            Step::ResizeFilesystem {
                filesystem,
                offset_bytes,
                old_bytes,
                available_bytes,
                done_by_this_crate: _,
            } => write!(
                f,
                "filesystem {filesystem} at byte offset {offset_bytes}: {} now, {} available \
                 (+{}); resizing it is the next layer, not done by tandem-grow",
                format_size(*old_bytes),
                format_size(*available_bytes),
                format_size(available_bytes.saturating_sub(*old_bytes))
            ),
        }
    }
}

/// Where the filesystem that grows lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Partition number, `None` without a table.
    pub partition: Option<u32>,
    pub offset_bytes: u64,
    /// Bytes of the partition (or device) before and after the grow.
    pub old_bytes: u64,
    pub new_bytes: u64,
    pub filesystem: Filesystem,
}

/// One byte range the apply step writes, with what it held when planned (when it was inside
/// the device then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Write {
    pub offset: u64,
    pub new: Vec<u8>,
    pub old: Option<Vec<u8>>,
}

/// A grow plan: steps to print, and the exact writes that [`crate::apply`] performs.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The device's size when planned.
    pub device_bytes: u64,
    /// The size the table is grown to; the device must be at least this large to apply.
    pub target_bytes: u64,
    pub sector_size: u64,
    pub target_sectors: u64,
    /// `gpt`, `mbr` or `none`.
    pub table: String,
    pub target: Target,
    /// True when the partition-table layer is already grown (no write needed). The filesystem
    /// step may still be listed.
    pub nothing_to_do: bool,
    pub steps: Vec<Step>,
    /// Bytes the apply step writes (sum of all regions).
    pub write_bytes: u64,
    #[serde(skip)]
    pub(crate) writes: Vec<Write>,
}

impl Plan {
    /// JSON for `-o json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "device: {} now, target {} ({} sectors of {} B); table: {}",
            format_size(self.device_bytes),
            format_size(self.target_bytes),
            self.target_sectors,
            self.sector_size,
            self.table
        )?;
        let where_ = match self.target.partition {
            Some(n) => format!("partition {n}"),
            None => "the whole device".to_string(),
        };
        writeln!(
            f,
            "filesystem: {} in {where_} at byte offset {}",
            self.target.filesystem.describe(),
            self.target.offset_bytes
        )?;
        if self.nothing_to_do {
            writeln!(f, "partition table: nothing to do (already grown)")?;
        }
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(f, "  {}. {s}", i + 1)?;
        }
        if !self.nothing_to_do {
            writeln!(
                f,
                "apply writes {} in {} regions; the old bytes are kept in an undo record first",
                format_size(self.write_bytes),
                self.writes.len()
            )?;
        }
        Ok(())
    }
}

/// The alignment the end of a partition starting at `start_lba` is kept to: the largest power
/// of two dividing the start, at most [`MAX_ALIGNMENT_SECTORS`].
pub fn alignment_of(start_lba: u64) -> u64 {
    if start_lba == 0 {
        return MAX_ALIGNMENT_SECTORS;
    }
    (1u64 << start_lba.trailing_zeros()).min(MAX_ALIGNMENT_SECTORS)
}

/// New end LBA for a partition at `start_lba` whose end may be at most `max_end`: the largest
/// `e <= max_end` with `(e + 1)` a multiple of the alignment. `None` if that is before the start.
pub fn aligned_end(start_lba: u64, max_end: u64) -> Option<u64> {
    let a = alignment_of(start_lba);
    let e = ((max_end + 1) / a * a).checked_sub(1)?;
    (e >= start_lba).then_some(e)
}

/// Plans growing the table on `dev` to `target_bytes` (the device may already be that large,
/// or grow later; apply checks).
pub fn plan(dev: &dyn BlockDevice, target_bytes: u64) -> Result<Plan, GrowError> {
    let p = probe(dev)?;
    plan_from_probe(dev, &p, target_bytes)
}

/// Like [`plan`] with a probe already made of `dev`.
pub fn plan_from_probe(
    dev: &dyn BlockDevice,
    p: &Probe,
    target_bytes: u64,
) -> Result<Plan, GrowError> {
    plan_from_probe_with(dev, p, target_bytes, PlanOptions::default())
}

/// Choices of [`plan_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Grow the last partition even when it holds no filesystem this crate knows (LVM PV,
    /// swap, btrfs, nothing...), as long as no other partition holds a known one (that is
    /// still [`GrowError::FilesystemNotLast`]). The plan then has no filesystem step.
    pub grow_unknown_filesystem: bool,
}

/// Like [`plan`], with options.
pub fn plan_with(
    dev: &dyn BlockDevice,
    target_bytes: u64,
    opts: PlanOptions,
) -> Result<Plan, GrowError> {
    let p = probe(dev)?;
    plan_from_probe_with(dev, &p, target_bytes, opts)
}

/// Like [`plan_from_probe`], with options.
pub fn plan_from_probe_with(
    dev: &dyn BlockDevice,
    p: &Probe,
    target_bytes: u64,
    opts: PlanOptions,
) -> Result<Plan, GrowError> {
    if target_bytes < p.device_bytes {
        return Err(GrowError::Shrink {
            current: p.device_bytes,
            target: target_bytes,
        });
    }
    let n = target_bytes / SECTOR;
    let mut b = Builder {
        grow_unknown: opts.grow_unknown_filesystem,
        ..Builder::default()
    };
    let target = match &p.table {
        Table::Unknown { reason } => return Err(GrowError::UnknownTable(reason.clone())),
        Table::None { filesystem } => {
            if !filesystem.is_known() {
                return Err(GrowError::NoFilesystem {
                    place: "the device (no partition table)".into(),
                    found: filesystem.describe(),
                });
            }
            Target {
                partition: None,
                offset_bytes: 0,
                old_bytes: p.device_bytes,
                new_bytes: target_bytes,
                filesystem: filesystem.clone(),
            }
        }
        Table::Gpt(g) => plan_gpt(dev, g, n, &mut b)?,
        Table::Mbr(m) => plan_mbr(dev, m, n, &mut b)?,
    };
    if let Some(fs_bytes) = target.filesystem.size_bytes() {
        if fs_bytes > target.old_bytes {
            return Err(GrowError::FilesystemLargerThanPartition {
                filesystem: target.filesystem.describe(),
                partition_bytes: target.old_bytes,
            });
        }
        if fs_bytes < target.new_bytes {
            b.steps.push(Step::ResizeFilesystem {
                filesystem: target.filesystem.name().to_string(),
                offset_bytes: target.offset_bytes,
                old_bytes: fs_bytes,
                available_bytes: target.new_bytes,
                done_by_this_crate: false,
            });
        }
    }
    let steps = std::mem::take(&mut b.steps);
    let writes = b.finish(dev)?;
    Ok(Plan {
        device_bytes: p.device_bytes,
        target_bytes,
        sector_size: SECTOR,
        target_sectors: n,
        table: p.table.kind().to_string(),
        target,
        nothing_to_do: writes.is_empty(),
        write_bytes: writes.iter().map(|w| w.new.len() as u64).sum(),
        steps,
        writes,
    })
}

/// Collects sector-granular writes in priority groups; later groups are written later, and a
/// sector set twice keeps the later value in the group that set it first.
#[derive(Default)]
struct Builder {
    /// [`PlanOptions::grow_unknown_filesystem`].
    grow_unknown: bool,
    steps: Vec<Step>,
    /// byte offset -> (group, bytes); regions never overlap after `set`.
    bytes: BTreeMap<u64, (u32, Vec<u8>)>,
}

impl Builder {
    /// Records `data` at `offset` in write group `group`, replacing overlapping bytes set before.
    fn set(&mut self, group: u32, offset: u64, data: &[u8]) {
        let end = offset + data.len() as u64;
        // Split existing regions that overlap [offset, end).
        let overlapping: Vec<u64> = self
            .bytes
            .range(..end)
            .filter(|(o, (_, d))| **o + d.len() as u64 > offset)
            .map(|(o, _)| *o)
            .collect();
        for o in overlapping {
            if let Some((g, d)) = self.bytes.remove(&o) {
                let d_end = o + d.len() as u64;
                if o < offset {
                    self.bytes
                        .insert(o, (g, d[..(offset - o) as usize].to_vec()));
                }
                if d_end > end {
                    self.bytes
                        .insert(end, (g, d[(end - o) as usize..].to_vec()));
                }
            }
        }
        self.bytes.insert(offset, (group, data.to_vec()));
    }

    /// Coalesces adjacent regions of a group, drops bytes that already hold the new value, and
    /// reads the old bytes of every region inside the device.
    fn finish(self, dev: &dyn BlockDevice) -> Result<Vec<Write>, GrowError> {
        let mut merged: Vec<(u32, u64, Vec<u8>)> = Vec::new();
        for (o, (g, d)) in self.bytes {
            match merged.last_mut() {
                Some((lg, lo, ld)) if *lg == g && *lo + ld.len() as u64 == o => {
                    ld.extend_from_slice(&d)
                }
                _ => merged.push((g, o, d)),
            }
        }
        merged.sort_by_key(|(g, o, _)| (*g, *o));
        let mut out = Vec::new();
        for (_, offset, new) in merged {
            let inside = offset + new.len() as u64 <= dev.size();
            let old = if inside {
                Some(read_vec(dev, offset, new.len() as u64)?)
            } else {
                None
            };
            if old.as_deref() == Some(&new[..]) {
                continue;
            }
            out.push(Write { offset, new, old });
        }
        Ok(out)
    }
}

// Write groups, in the order apply writes them (each followed by a flush): the new backup GPT
// first (while the primary still points at the old one, both stay valid), then the primary's
// entries and header, then the MBR sectors, and last the wipe of the old backup.
const G_BACKUP: u32 = 1;
const G_PRIMARY_ENTRIES: u32 = 2;
const G_PRIMARY_HEADER: u32 = 3;
const G_EBR: u32 = 4;
const G_MBR: u32 = 5;
const G_WIPE: u32 = 6;

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes a GPT header's CRC over its `header_size` bytes.
fn seal_header(h: &mut [u8]) {
    let size = (le32(h, 12) as usize).clamp(92, SECTOR as usize);
    h[16..20].fill(0);
    let c = crc32(&h[..size]);
    put_u32(h, 16, c);
}

fn refuse_not_last(
    place: String,
    last_fs: &Filesystem,
    others: Vec<(u32, &Filesystem)>,
) -> GrowError {
    let known: Vec<String> = others
        .iter()
        .filter(|(_, f)| f.is_known())
        .map(|(n, f)| format!("partition {n} holds {}", f.describe()))
        .collect();
    if known.is_empty() {
        GrowError::NoFilesystem {
            place,
            found: last_fs.describe(),
        }
    } else {
        GrowError::FilesystemNotLast {
            last: place,
            found: last_fs.describe(),
            others: known.join("; "),
        }
    }
}

fn plan_gpt(
    dev: &dyn BlockDevice,
    g: &GptTable,
    n: u64,
    b: &mut Builder,
) -> Result<Target, GrowError> {
    let es = g.entries_sectors();
    let last = g
        .partitions
        .iter()
        .max_by_key(|p| p.last_lba)
        .ok_or(GrowError::NoPartitions)?;
    if !last.filesystem.is_known() {
        let e = refuse_not_last(
            format!(
                "partition {} (the last one, LBA {}..{})",
                last.number, last.first_lba, last.last_lba
            ),
            &last.filesystem,
            g.partitions
                .iter()
                .filter(|p| p.number != last.number)
                .map(|p| (p.number, &p.filesystem))
                .collect(),
        );
        if !(b.grow_unknown && matches!(e, GrowError::NoFilesystem { .. })) {
            return Err(e);
        }
    }
    if g.backup_header_lba >= n {
        return Err(GrowError::Shrink {
            current: (g.backup_header_lba + 1) * SECTOR,
            target: n * SECTOR,
        });
    }
    let new_backup = n - 1;
    let new_entries_backup = n - 1 - es;
    let new_last_usable = n - 2 - es;
    if new_last_usable < g.last_usable_lba {
        return Err(GrowError::Shrink {
            current: (g.last_usable_lba + es + 2) * SECTOR,
            target: n * SECTOR,
        });
    }
    let a = alignment_of(last.first_lba);
    let new_end = match aligned_end(last.first_lba, new_last_usable) {
        Some(e) if e > last.last_lba => e,
        _ => last.last_lba,
    };

    // Entry array with the grown partition.
    let mut entries = g.entries.clone();
    let at = (last.number as usize - 1) * g.entry_size as usize;
    put_u64(&mut entries, at + 40, new_end);
    let entries_crc = crc32(&entries);

    let mut primary = g.header_sector.clone();
    put_u64(&mut primary, 32, new_backup);
    put_u64(&mut primary, 48, new_last_usable);
    put_u32(&mut primary, 88, entries_crc);
    seal_header(&mut primary);

    let mut backup = primary.clone();
    put_u64(&mut backup, 24, new_backup);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, new_entries_backup);
    seal_header(&mut backup);

    // The old backup area: wipe it when it was a valid backup and is not where the new one goes.
    if g.backup_header_valid && g.backup_header_lba != new_backup {
        let old_hdr = read_vec(dev, g.backup_header_lba * SECTOR, SECTOR)?;
        let old_entries_lba = le64(&old_hdr, 72);
        let first = if old_entries_lba > g.last_usable_lba && old_entries_lba < g.backup_header_lba
        {
            old_entries_lba
        } else {
            g.backup_header_lba
        };
        let sectors = g.backup_header_lba - first + 1;
        b.set(
            G_WIPE,
            first * SECTOR,
            &vec![0u8; (sectors * SECTOR) as usize],
        );
        b.steps.push(Step::WipeOldGptBackup {
            first_lba: first,
            last_lba: g.backup_header_lba,
            bytes: sectors * SECTOR,
        });
    }
    // New backup: entries padded to whole sectors, then the header sector.
    let mut area = entries.clone();
    area.resize((es * SECTOR) as usize, 0);
    area.extend_from_slice(&backup);
    b.set(G_BACKUP, new_entries_backup * SECTOR, &area);
    if g.backup_header_lba != new_backup || !g.backup_header_valid {
        b.steps.insert(
            0,
            Step::MoveGptBackup {
                old_header_lba: g.backup_header_lba,
                new_header_lba: new_backup,
                new_entries_lba: new_entries_backup,
                entries_sectors: es,
                entries_bytes: g.entry_count as u64 * g.entry_size as u64,
            },
        );
    }
    if new_last_usable != g.last_usable_lba {
        b.steps.push(Step::SetGptLastUsable {
            old_lba: g.last_usable_lba,
            new_lba: new_last_usable,
            added_bytes: (new_last_usable - g.last_usable_lba) * SECTOR,
        });
    }
    b.set(G_PRIMARY_ENTRIES, g.entries_lba * SECTOR, &entries);
    b.set(G_PRIMARY_HEADER, SECTOR, &primary);

    // Protective MBR: keep a whole-disk 0xEE entry whole-disk.
    if let Some((start, count)) = g.protective_mbr {
        let old_whole = (g.backup_header_lba).min(0xFFFF_FFFF);
        let new_whole = (n - 1).min(0xFFFF_FFFF);
        if start == 1 && count == old_whole && count != new_whole {
            let mut mbr = read_vec(dev, 0, SECTOR)?;
            for i in 0..4 {
                let e = 446 + 16 * i;
                if mbr[e + 4] == 0xEE {
                    let c = new_end_chs(&mbr[e + 5..e + 8], old_whole, new_whole);
                    put_u32(&mut mbr, e + 12, new_whole as u32);
                    mbr[e + 5..e + 8].copy_from_slice(&c);
                }
            }
            b.set(G_MBR, 0, &mbr);
            b.steps.push(Step::UpdateProtectiveMbr {
                old_sectors: count,
                new_sectors: new_whole,
            });
        }
    }
    let old_sectors = last.last_lba - last.first_lba + 1;
    let new_sectors = new_end - last.first_lba + 1;
    if new_end != last.last_lba {
        b.steps.push(Step::GrowPartition {
            number: last.number,
            kind: "gpt".into(),
            start_lba: last.first_lba,
            old_end_lba: last.last_lba,
            new_end_lba: new_end,
            old_sectors,
            new_sectors,
            old_bytes: old_sectors * SECTOR,
            new_bytes: new_sectors * SECTOR,
            alignment_sectors: a,
        });
    }
    Ok(Target {
        partition: Some(last.number),
        offset_bytes: last.first_lba * SECTOR,
        old_bytes: old_sectors * SECTOR,
        new_bytes: new_sectors * SECTOR,
        filesystem: last.filesystem.clone(),
    })
}

/// CHS address of `lba` for an MBR entry, with the usual 255 heads x 63 sectors geometry;
/// past 1024 cylinders the conventional maximum (1023, 254, 63).
pub fn chs(lba: u64) -> [u8; 3] {
    chs_with(lba, 255, 63)
}

/// CHS address of `lba` with `heads` x `sectors` geometry.
pub fn chs_with(lba: u64, heads: u64, sectors: u64) -> [u8; 3] {
    let (c, h, s) = if lba >= 1024 * heads * sectors {
        (1023u64, heads - 1, sectors)
    } else {
        (
            lba / (heads * sectors),
            (lba / sectors) % heads,
            lba % sectors + 1,
        )
    };
    [
        h as u8,
        (s as u8) | (((c >> 2) & 0xC0) as u8),
        (c & 0xFF) as u8,
    ]
}

/// The end CHS for a new end LBA, in the geometry the entry's old end CHS was written with
/// (parted uses 4 x 32 on small images, fdisk 255 x 63); 255 x 63 when none matches.
fn new_end_chs(old: &[u8], old_end: u64, new_end: u64) -> [u8; 3] {
    const GEOMETRIES: [(u64, u64); 6] =
        [(255, 63), (4, 32), (16, 63), (64, 32), (128, 32), (255, 32)];
    for (h, s) in GEOMETRIES {
        if old.get(0..3) == Some(&chs_with(old_end, h, s)[..]) {
            return chs_with(new_end, h, s);
        }
    }
    chs(new_end)
}

fn plan_mbr(
    dev: &dyn BlockDevice,
    m: &MbrTable,
    n: u64,
    b: &mut Builder,
) -> Result<Target, GrowError> {
    let last = m
        .partitions
        .iter()
        .filter(|p| p.kind != MbrKind::Extended)
        .max_by_key(|p| p.end_lba())
        .ok_or(GrowError::NoPartitions)?;
    let last_fs = last.filesystem.clone().unwrap_or(Filesystem::Unknown {
        found: "nothing".into(),
    });
    if !last_fs.is_known() {
        let e = refuse_not_last(
            format!(
                "partition {} (the last one, LBA {}..{})",
                last.number,
                last.start_lba,
                last.end_lba()
            ),
            &last_fs,
            m.partitions
                .iter()
                .filter(|p| p.number != last.number)
                .filter_map(|p| p.filesystem.as_ref().map(|f| (p.number, f)))
                .collect(),
        );
        if !(b.grow_unknown && matches!(e, GrowError::NoFilesystem { .. })) {
            return Err(e);
        }
    }
    if n > MBR_MAX_SECTORS {
        return Err(GrowError::MbrLimit { target: n * SECTOR });
    }
    if n <= last.end_lba() {
        return Err(GrowError::Shrink {
            current: (last.end_lba() + 1) * SECTOR,
            target: n * SECTOR,
        });
    }
    let a = alignment_of(last.start_lba);
    let new_end = match aligned_end(last.start_lba, n - 1) {
        Some(e) if e > last.end_lba() => e,
        _ => last.end_lba(),
    };
    let old_sectors = last.sectors;
    let new_sectors = new_end - last.start_lba + 1;
    let target = Target {
        partition: Some(last.number),
        offset_bytes: last.start_lba * SECTOR,
        old_bytes: old_sectors * SECTOR,
        new_bytes: new_sectors * SECTOR,
        filesystem: last_fs,
    };
    if new_end == last.end_lba() {
        return Ok(target);
    }
    let mut mbr = read_vec(dev, 0, SECTOR)?;
    let set_entry = |sector: &mut [u8], slot: usize, sectors: u64, end: u64, base: u64| {
        let e = 446 + 16 * slot;
        let start = le32(sector, e + 8) as u64;
        let old_end = (base + start + le32(sector, e + 12) as u64).saturating_sub(1);
        let new_chs = new_end_chs(&sector[e + 5..e + 8], old_end, end);
        put_u32(sector, e + 12, sectors as u32);
        sector[e + 5..e + 8].copy_from_slice(&new_chs);
    };
    if last.kind == MbrKind::Logical {
        let ext = m
            .partitions
            .iter()
            .find(|p| p.kind == MbrKind::Extended)
            .ok_or(GrowError::NoPartitions)?;
        if new_end > ext.end_lba() {
            let ext_new = new_end - ext.start_lba + 1;
            set_entry(&mut mbr, ext.slot, ext_new, new_end, 0);
            b.steps.push(Step::GrowPartition {
                number: ext.number,
                kind: "extended".into(),
                start_lba: ext.start_lba,
                old_end_lba: ext.end_lba(),
                new_end_lba: new_end,
                old_sectors: ext.sectors,
                new_sectors: ext_new,
                old_bytes: ext.sectors * SECTOR,
                new_bytes: ext_new * SECTOR,
                alignment_sectors: a,
            });
            b.set(G_MBR, 0, &mbr);
        }
        let mut ebr = read_vec(dev, last.table_lba * SECTOR, SECTOR)?;
        set_entry(&mut ebr, 0, new_sectors, new_end, last.table_lba);
        b.set(G_EBR, last.table_lba * SECTOR, &ebr);
        // The EBR linking to this one: its second entry spans this EBR up to the end of its
        // logical partition; keep it spanning when it did.
        let prev = m
            .partitions
            .iter()
            .filter(|p| p.kind == MbrKind::Logical && p.table_lba < last.table_lba)
            .max_by_key(|p| p.table_lba);
        if let Some(prev) = prev {
            let mut pe = read_vec(dev, prev.table_lba * SECTOR, SECTOR)?;
            let link_start = le32(&pe, 462 + 8) as u64;
            let link_sectors = le32(&pe, 462 + 12) as u64;
            if ext.start_lba + link_start == last.table_lba
                && link_sectors == last.end_lba() - last.table_lba + 1
            {
                let new_link = new_end - last.table_lba + 1;
                set_entry(&mut pe, 1, new_link, new_end, ext.start_lba);
                b.set(G_EBR, prev.table_lba * SECTOR, &pe);
                b.steps.push(Step::UpdateEbrLink {
                    ebr_lba: prev.table_lba,
                    old_sectors: link_sectors,
                    new_sectors: new_link,
                });
            }
        }
        b.steps.push(Step::GrowPartition {
            number: last.number,
            kind: "logical".into(),
            start_lba: last.start_lba,
            old_end_lba: last.end_lba(),
            new_end_lba: new_end,
            old_sectors,
            new_sectors,
            old_bytes: old_sectors * SECTOR,
            new_bytes: new_sectors * SECTOR,
            alignment_sectors: a,
        });
    } else {
        set_entry(&mut mbr, last.slot, new_sectors, new_end, 0);
        b.set(G_MBR, 0, &mbr);
        b.steps.push(Step::GrowPartition {
            number: last.number,
            kind: "primary".into(),
            start_lba: last.start_lba,
            old_end_lba: last.end_lba(),
            new_end_lba: new_end,
            old_sectors,
            new_sectors,
            old_bytes: old_sectors * SECTOR,
            new_bytes: new_sectors * SECTOR,
            alignment_sectors: a,
        });
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_rule() {
        assert_eq!(alignment_of(2048), 2048);
        assert_eq!(alignment_of(4096), 2048);
        assert_eq!(alignment_of(34), 2);
        assert_eq!(alignment_of(63), 1);
        // The field report's disk: 733980728 sectors, GPT with 32 entry sectors.
        let last_usable = 733_980_728 - 34;
        assert_eq!(aligned_end(2048, last_usable), Some(733_980_671));
        assert_eq!(aligned_end(63, 1000), Some(1000));
        assert_eq!(aligned_end(2048, 3000), None);
    }

    #[test]
    fn chs_encoding() {
        assert_eq!(chs(0), [0, 1, 0]);
        assert_eq!(chs(2048), [32, 33, 0]);
        assert_eq!(chs(u32::MAX as u64), [0xFE, 0xFF, 0xFF]);
    }
}

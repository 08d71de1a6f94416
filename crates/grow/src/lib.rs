//! The partition-table layer of a volume grow (see `docs/grow.md`).
//!
//! * [`probe`]: what a device holds: GPT (with its protective MBR), MBR (primaries, extended
//!   partition and the EBR chain of logical ones) or no table, and the filesystem (ext2/3/4,
//!   xfs, unknown) at the start of every partition. Never panics on garbage.
//! * [`plan`]: the steps to grow the table to a target size: the backup GPT moved to the new
//!   end, the last usable LBA raised, the last partition grown to the new end (end rounded down
//!   to the partition's alignment), MBR primary or extended + last logical grown; refused with
//!   an explanation when the filesystem is not in the last partition, the target shrinks, the
//!   table is not understood or an MBR would pass 2 TiB. Prints with exact sizes; JSON via serde.
//! * [`apply`]: writes the plan after handing the caller an [`UndoRecord`] to persist;
//!   idempotent. [`undo`] restores the old table byte for byte.
//!
//! The filesystem itself is not resized here.

mod apply;
mod crc;
mod fs;
mod guid;
mod plan;
mod probe;
#[cfg(test)]
mod tests;

pub use apply::{ApplyOutcome, UNDO_FORMAT, UndoRecord, UndoRegion, apply, undo};
pub use crc::crc32;
pub use fs::{Filesystem, detect as detect_filesystem, probe_filesystem};
pub use guid::Guid;
pub use plan::{
    Layer, MAX_ALIGNMENT_SECTORS, MBR_MAX_SECTORS, Plan, PlanOptions, Step, Target, aligned_end,
    alignment_of, chs, plan, plan_from_probe, plan_from_probe_with, plan_with,
};
pub use probe::{
    GptPartition, GptTable, MbrKind, MbrPartition, MbrTable, Probe, SECTOR, Table, probe,
};

use tandem_types::format_size;
use thiserror::Error;

/// Why a probe, plan, apply or undo stopped. Messages name sizes in bytes and IEC units.
#[derive(Debug, Error)]
pub enum GrowError {
    #[error("device I/O: {0}")]
    Device(#[from] tandem_blockdev::BlockError),
    #[error("refusing to shrink: the table/device covers {} but the target is {}", format_size(*current), format_size(*target))]
    Shrink { current: u64, target: u64 },
    #[error("partition table not understood, refusing to change it: {0}")]
    UnknownTable(String),
    #[error("the partition table has no partition")]
    NoPartitions,
    #[error(
        "the filesystem is not in the last partition: {last} holds {found}, but {others}; only the last partition can grow into the new space"
    )]
    FilesystemNotLast {
        last: String,
        found: String,
        others: String,
    },
    #[error("{place} holds {found}: nothing this crate knows how to grow (ext2/3/4, xfs)")]
    NoFilesystem { place: String, found: String },
    #[error("the filesystem {filesystem} is larger than its partition ({}); refusing", format_size(*partition_bytes))]
    FilesystemLargerThanPartition {
        filesystem: String,
        partition_bytes: u64,
    },
    #[error("an MBR partition table cannot describe sectors past 2^32 (2 TiB with 512 B sectors); the target is {}: convert the disk to GPT first (not done by tandem-grow)", format_size(*target))]
    MbrLimit { target: u64 },
    #[error("the device is {} but the plan needs {}: grow the block layer first", format_size(*device), format_size(*target))]
    DeviceTooSmall { device: u64, target: u64 },
    #[error(
        "the device changed since the plan was made: {len} bytes at offset {offset} hold neither the old nor the new table; nothing written, plan again"
    )]
    Changed { offset: u64, len: u64 },
    #[error(
        "undo refused: {len} bytes at offset {offset} hold neither the applied nor the old table; nothing written"
    )]
    UndoMismatch { offset: u64, len: u64 },
    #[error("undo record unusable: {0}")]
    BadUndoRecord(String),
    #[error("saving the undo record failed, nothing written: {0}")]
    SaveUndo(std::io::Error),
}

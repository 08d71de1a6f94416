//! The on-disk format of one replica in a directory pool (documented in `docs/metadata.md`).
//!
//! A replica of volume `V` in a pool directory is three files:
//!
//! * `V.data`: the volume's bytes, a sparse regular file of exactly the volume size.
//! * `V.meta`: the replica's metadata ([`ReplicaMeta`]): versioned, checksummed, replaced
//!   atomically (write `V.meta.tmp`, fsync, rename over `V.meta`, fsync the directory).
//! * `V.bitmap`: the per-peer out-of-sync bitmaps ([`Bitmap`]), one dense region per peer slot.
//!
//! `V.meta` is the commit point of a replica's existence: a replica exists if and only if its
//! metadata file exists. Transient names used while creating or deleting (`V.data.creating`,
//! `V.data.deleting`, `V.meta.tmp`, `V.bitmap.tmp`) are resolved by [`ReplicaFiles::recover`].

mod bitmap;
mod format;
mod io;

pub use bitmap::{BITMAP_HEADER_LEN, BITMAP_MAGIC, BITMAP_VERSION, Bitmap};
pub use format::{
    DEFAULT_BITMAP_GRANULARITY, DEFAULT_PEER_SLOTS, DiskState, FORMAT_VERSION, GenerationId, MAGIC,
    MAX_META_LEN, MAX_PEER_SLOTS, MAX_STRING_LEN, NO_PEER, PeerSlot, ReplicaMeta, Role,
    initial_generation,
};
pub use io::{Recovery, ReplicaFiles, read_meta, sync_dir, write_meta};

use std::path::PathBuf;

/// Suffix of a replica's metadata file; the part of the file name before it is the volume name.
pub const META_SUFFIX: &str = ".meta";
pub const DATA_SUFFIX: &str = ".data";
pub const BITMAP_SUFFIX: &str = ".bitmap";

/// Everything that can be wrong with metadata or bitmap files. Never a panic.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a tandem {what} file (bad magic)")]
    BadMagic { what: &'static str },
    #[error(
        "{what} format version {found} is newer than this tandem understands (up to {supported}); upgrade tandem"
    )]
    UnsupportedVersion {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    #[error("{what} format version {found} is invalid")]
    InvalidVersion { what: &'static str, found: u32 },
    #[error(
        "{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt"
    )]
    Checksum {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{what} is truncated: need {needed} bytes, have {have}")]
    Truncated {
        what: &'static str,
        needed: usize,
        have: usize,
    },
    #[error("{what} is too large: {len} bytes (at most {max})")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

impl MetaError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        MetaError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        MetaError::Invalid {
            what,
            reason: reason.into(),
        }
    }

    /// True when the file simply does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, MetaError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

pub type Result<T> = std::result::Result<T, MetaError>;

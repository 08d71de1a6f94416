//! Filesystem detection by superblock magic.

use serde::Serialize;
use tandem_blockdev::BlockDevice;

use crate::GrowError;

/// What lies at the start of a partition (or of the bare device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Filesystem {
    /// ext2, ext3 or ext4 (`variant` says which, from the feature flags).
    Ext {
        variant: String,
        block_size: u64,
        block_count: u64,
        size_bytes: u64,
    },
    /// XFS: the data section's block count.
    Xfs {
        block_size: u64,
        data_blocks: u64,
        size_bytes: u64,
    },
    /// Anything else; `found` says what was seen (a known non-growable signature, zeroes, or
    /// unrecognised bytes).
    Unknown { found: String },
}

impl Filesystem {
    /// Bytes the filesystem covers, when known.
    pub fn size_bytes(&self) -> Option<u64> {
        match self {
            Filesystem::Ext { size_bytes, .. } | Filesystem::Xfs { size_bytes, .. } => {
                Some(*size_bytes)
            }
            Filesystem::Unknown { .. } => None,
        }
    }

    pub fn is_known(&self) -> bool {
        !matches!(self, Filesystem::Unknown { .. })
    }

    /// Short name: `ext4`, `xfs`, `unknown`.
    pub fn name(&self) -> &str {
        match self {
            Filesystem::Ext { variant, .. } => variant,
            Filesystem::Xfs { .. } => "xfs",
            Filesystem::Unknown { .. } => "unknown",
        }
    }

    /// One line for messages: `ext4 (16384 blocks of 4096 B = ...)`.
    pub fn describe(&self) -> String {
        match self {
            Filesystem::Ext {
                variant,
                block_size,
                block_count,
                size_bytes,
            } => format!(
                "{variant} ({block_count} blocks of {block_size} B = {})",
                tandem_types::format_size(*size_bytes)
            ),
            Filesystem::Xfs {
                block_size,
                data_blocks,
                size_bytes,
            } => format!(
                "xfs ({data_blocks} data blocks of {block_size} B = {})",
                tandem_types::format_size(*size_bytes)
            ),
            Filesystem::Unknown { found } => format!("no recognised filesystem ({found})"),
        }
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]) as u64)
        .unwrap_or(0)
}
fn le32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as u64)
        .unwrap_or(0)
}
fn be32(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as u64)
        .unwrap_or(0)
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_be_bytes(a)
        })
        .unwrap_or(0)
}

/// Bytes read for detection: the first 68 KiB (btrfs keeps its superblock at 64 KiB).
const PROBE_LEN: u64 = 68 * 1024;

/// Detects the filesystem in `[offset, offset + len)` of `dev`. Reads at most 68 KiB; never
/// reads outside the range or the device.
pub fn probe_filesystem(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
) -> Result<Filesystem, GrowError> {
    let end = offset.saturating_add(len).min(dev.size());
    let n = end.saturating_sub(offset).min(PROBE_LEN) as usize;
    let mut buf = vec![0u8; n];
    if n > 0 {
        dev.read_at(&mut buf, offset)?;
    }
    Ok(detect(&buf))
}

/// Detection on the first bytes of a partition.
pub fn detect(buf: &[u8]) -> Filesystem {
    // ext2/3/4: superblock at 1024, magic 0xEF53 at +0x38.
    if le16(buf, 1024 + 0x38) == 0xEF53 {
        let sb = &buf[1024..];
        let log = le32(sb, 0x18);
        let compat = le32(sb, 0x5C);
        let incompat = le32(sb, 0x60);
        if log <= 6 {
            let block_size = 1024u64 << log;
            let mut block_count = le32(sb, 0x04);
            if incompat & 0x80 != 0 {
                block_count |= le32(sb, 0x150) << 32;
            }
            let variant = if incompat & (0x40 | 0x80 | 0x200) != 0 {
                "ext4"
            } else if compat & 0x4 != 0 {
                "ext3"
            } else {
                "ext2"
            };
            if let Some(size_bytes) = block_count.checked_mul(block_size) {
                return Filesystem::Ext {
                    variant: variant.to_string(),
                    block_size,
                    block_count,
                    size_bytes,
                };
            }
        }
        return Filesystem::Unknown {
            found: "ext superblock magic with an impossible block size or count".into(),
        };
    }
    if buf.get(0..4) == Some(b"XFSB") {
        let block_size = be32(buf, 4);
        let data_blocks = be64(buf, 8);
        if (512..=65536).contains(&block_size)
            && block_size.is_power_of_two()
            && let Some(size_bytes) = data_blocks.checked_mul(block_size)
        {
            return Filesystem::Xfs {
                block_size,
                data_blocks,
                size_bytes,
            };
        }
        return Filesystem::Unknown {
            found: "xfs superblock magic with an impossible block size or count".into(),
        };
    }
    let found = if buf.get(4086..4096) == Some(b"SWAPSPACE2") {
        "Linux swap signature (not growable here)".to_string()
    } else if buf.get(512..520) == Some(b"LABELONE") {
        "LVM2 physical volume label (not growable here)".to_string()
    } else if buf.get(0x10040..0x10048) == Some(b"_BHRfS_M") {
        "btrfs superblock (not supported)".to_string()
    } else if buf.is_empty() {
        "empty range".to_string()
    } else if buf.iter().all(|&b| b == 0) {
        format!("the first {} bytes are all zero", buf.len())
    } else {
        "no known superblock magic".to_string()
    };
    Filesystem::Unknown { found }
}

//! Which files a volume shows: the whole volume, then one file per partition that
//! `tandem-grow`'s probe finds (the extended MBR container is not shown; logical partitions are
//! numbered like Linux does, 5, 6, ...).

use serde::Serialize;
use tandem_blockdev::BlockDevice;
use tandem_grow::{MbrKind, SECTOR, Table};

use crate::FuseError;

/// One file of the view: a byte range of the volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// File name inside the mount directory (`NAME` or `NAME-partN`).
    pub name: String,
    /// Where the range starts on the volume.
    pub offset_bytes: u64,
    /// File size.
    pub size_bytes: u64,
    /// Partition number (`None` for the whole volume).
    pub partition: Option<u32>,
}

/// What the view shows for one volume.
#[derive(Debug, Clone, Serialize)]
pub struct Layout {
    /// Partition table kind: `gpt`, `mbr`, `none` or `unknown`.
    pub table: String,
    pub files: Vec<FileEntry>,
    /// Partitions left out or cut short, and tables not understood.
    pub warnings: Vec<String>,
}

/// Probes `dev` (once) and lays out the files for volume `volume`.
pub fn layout(volume: &str, dev: &dyn BlockDevice) -> Result<Layout, FuseError> {
    let size = dev.size();
    let probe = tandem_grow::probe(dev)?;
    let mut files = vec![FileEntry {
        name: volume.to_string(),
        offset_bytes: 0,
        size_bytes: size,
        partition: None,
    }];
    let mut warnings = Vec::new();
    // (number, first sector, sector count)
    let parts: Vec<(u32, u64, u64)> = match &probe.table {
        Table::Gpt(g) => g
            .partitions
            .iter()
            .map(|p| {
                (
                    p.number,
                    p.first_lba,
                    (p.last_lba + 1).saturating_sub(p.first_lba),
                )
            })
            .collect(),
        Table::Mbr(m) => m
            .partitions
            .iter()
            .filter(|p| p.kind != MbrKind::Extended)
            .map(|p| (p.number, p.start_lba, p.sectors))
            .collect(),
        Table::Unknown { reason } => {
            warnings.push(format!(
                "partition table not understood, showing the whole volume only: {reason}"
            ));
            Vec::new()
        }
        Table::None { .. } => Vec::new(),
    };
    for (number, first, sectors) in parts {
        let offset = first.saturating_mul(SECTOR);
        let want = sectors.saturating_mul(SECTOR);
        if sectors == 0 {
            continue;
        }
        if offset >= size {
            warnings.push(format!(
                "partition {number} starts at byte {offset}, past the end of the volume ({size} bytes): not shown"
            ));
            continue;
        }
        let len = want.min(size - offset);
        if len < want {
            warnings.push(format!(
                "partition {number} reaches past the end of the volume: shown cut to {len} of {want} bytes"
            ));
        }
        files.push(FileEntry {
            name: format!("{volume}-part{number}"),
            offset_bytes: offset,
            size_bytes: len,
            partition: Some(number),
        });
    }
    Ok(Layout {
        table: probe.table.kind().to_string(),
        files,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_blockdev::MemDevice;

    fn mbr_entry(mbr: &mut [u8], slot: usize, ty: u8, start: u32, sectors: u32) {
        let at = 446 + 16 * slot;
        mbr[at + 4] = ty;
        mbr[at + 8..at + 12].copy_from_slice(&start.to_le_bytes());
        mbr[at + 12..at + 16].copy_from_slice(&sectors.to_le_bytes());
    }

    #[test]
    fn no_table_is_the_whole_volume() {
        let dev = MemDevice::new(1 << 20);
        let l = layout("v", &dev).unwrap();
        assert_eq!(l.table, "none");
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.files[0].size_bytes, 1 << 20);
    }

    #[test]
    fn mbr_with_logical_partitions_numbered_like_linux() {
        let dev = MemDevice::new(64 << 20);
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr_entry(&mut mbr, 0, 0x83, 2048, 8192);
        mbr_entry(&mut mbr, 1, 0x05, 16384, 65536);
        dev.write_at(&mbr, 0).unwrap();
        // EBR 1 at 16384: logical at +2048, link to the next EBR at +32768 (relative).
        let mut ebr = vec![0u8; 512];
        ebr[510] = 0x55;
        ebr[511] = 0xAA;
        mbr_entry(&mut ebr, 0, 0x83, 2048, 4096);
        mbr_entry(&mut ebr, 1, 0x05, 32768, 8192);
        dev.write_at(&ebr, 16384 * 512).unwrap();
        let mut ebr2 = vec![0u8; 512];
        ebr2[510] = 0x55;
        ebr2[511] = 0xAA;
        mbr_entry(&mut ebr2, 0, 0x83, 2048, 2048);
        dev.write_at(&ebr2, (16384 + 32768) * 512).unwrap();

        let l = layout("disk", &dev).unwrap();
        assert_eq!(l.table, "mbr");
        let names: Vec<_> = l.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["disk", "disk-part1", "disk-part5", "disk-part6"]);
        assert_eq!(l.files[1].offset_bytes, 2048 * 512);
        assert_eq!(l.files[1].size_bytes, 8192 * 512);
        assert_eq!(l.files[2].offset_bytes, (16384 + 2048) * 512);
        assert_eq!(l.files[2].size_bytes, 4096 * 512);
        assert_eq!(l.files[3].offset_bytes, (16384 + 32768 + 2048) * 512);
        assert_eq!(l.files[3].size_bytes, 2048 * 512);
        assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    }

    #[test]
    fn untrusted_table_shows_the_whole_volume_with_a_warning() {
        // A partition reaching past the device: the probe does not trust the table.
        let dev = MemDevice::new(8 << 20);
        let mut mbr = vec![0u8; 512];
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        mbr_entry(&mut mbr, 0, 0x83, 2048, 1 << 20);
        dev.write_at(&mbr, 0).unwrap();
        let l = layout("v", &dev).unwrap();
        assert_eq!(l.table, "unknown");
        assert_eq!(l.files.len(), 1);
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(
            l.warnings[0].contains("past the device"),
            "{:?}",
            l.warnings
        );
    }
}

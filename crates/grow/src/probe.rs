//! Probing a device: partition table (GPT, MBR with extended/logical chain, none) and the
//! filesystem at the start of every partition.

use serde::Serialize;
use tandem_blockdev::BlockDevice;

use crate::GrowError;
use crate::crc::crc32;
use crate::fs::{Filesystem, probe_filesystem};
use crate::guid::Guid;

/// Logical sector size. Only 512 is supported.
pub const SECTOR: u64 = 512;

/// Largest GPT entry array accepted (bytes); the standard one is 16 KiB.
const MAX_GPT_ENTRIES_BYTES: u64 = 1 << 20;
/// Longest EBR chain followed.
const MAX_LOGICAL: usize = 256;

/// What a device holds.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub device_bytes: u64,
    pub sector_size: u64,
    pub table: Table,
}

/// The partition table.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Table {
    /// No partition table; `filesystem` is what starts at offset 0.
    None {
        filesystem: Filesystem,
    },
    Gpt(GptTable),
    Mbr(MbrTable),
    /// Something table-like that this crate does not understand or trust; `reason` says why.
    Unknown {
        reason: String,
    },
}

impl Table {
    pub fn kind(&self) -> &'static str {
        match self {
            Table::None { .. } => "none",
            Table::Gpt(_) => "gpt",
            Table::Mbr(_) => "mbr",
            Table::Unknown { .. } => "unknown",
        }
    }
}

/// A GUID partition table as read from its primary header (LBA 1).
#[derive(Debug, Clone, Serialize)]
pub struct GptTable {
    pub disk_guid: Guid,
    /// Where the primary header says the backup header is.
    pub backup_header_lba: u64,
    /// Whether a valid backup header (CRC, signature, pointing back at LBA 1) sits there.
    pub backup_header_valid: bool,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub entries_lba: u64,
    pub entry_count: u32,
    pub entry_size: u32,
    pub partitions: Vec<GptPartition>,
    /// The protective MBR's 0xEE entry: start LBA and sector count.
    pub protective_mbr: Option<(u64, u64)>,
    #[serde(skip)]
    pub(crate) header_sector: Vec<u8>,
    #[serde(skip)]
    pub(crate) entries: Vec<u8>,
}

impl GptTable {
    /// Sectors the entry array occupies.
    pub fn entries_sectors(&self) -> u64 {
        (self.entry_count as u64 * self.entry_size as u64).div_ceil(SECTOR)
    }
}

/// One used GPT entry.
#[derive(Debug, Clone, Serialize)]
pub struct GptPartition {
    /// 1-based number as sgdisk shows it (entry index + 1).
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    /// Attribute bits (bit 0 required/platform, bit 1 no block IO protocol, bit 2 legacy BIOS
    /// bootable, 48..63 type specific, e.g. 60 read-only, 62 hidden, 63 no automount).
    pub attributes: u64,
    pub name: String,
    pub filesystem: Filesystem,
}

/// An MBR (DOS) table with its primary entries and the logical partitions of the extended one.
#[derive(Debug, Clone, Serialize)]
pub struct MbrTable {
    pub disk_signature: u32,
    pub partitions: Vec<MbrPartition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MbrKind {
    Primary,
    Extended,
    Logical,
}

/// One MBR partition. Primaries are numbered 1-4 by slot, logicals 5, 6, ... in chain order.
#[derive(Debug, Clone, Serialize)]
pub struct MbrPartition {
    pub number: u32,
    pub kind: MbrKind,
    pub type_byte: u8,
    pub bootable: bool,
    pub start_lba: u64,
    pub sectors: u64,
    /// The sector holding this partition's entry: 0 for primaries and the extended one, the
    /// EBR's LBA for logicals.
    pub table_lba: u64,
    /// Slot of the entry in that sector (0-3).
    pub slot: usize,
    /// `None` for the extended partition.
    pub filesystem: Option<Filesystem>,
}

impl MbrPartition {
    pub fn end_lba(&self) -> u64 {
        (self.start_lba + self.sectors).saturating_sub(1)
    }
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
        .unwrap_or(0)
}
fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut g = [0u8; 16];
    if let Some(s) = b.get(at..at + 16) {
        g.copy_from_slice(s);
    }
    Guid(g)
}

pub(crate) fn read_vec(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<Vec<u8>, GrowError> {
    let mut buf = vec![0u8; len as usize];
    dev.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Probes `dev`: table, partitions and the filesystem in each.
pub fn probe(dev: &dyn BlockDevice) -> Result<Probe, GrowError> {
    let device_bytes = dev.size();
    let table = probe_table(dev)?;
    Ok(Probe {
        device_bytes,
        sector_size: SECTOR,
        table,
    })
}

fn probe_table(dev: &dyn BlockDevice) -> Result<Table, GrowError> {
    let size = dev.size();
    let sectors = size / SECTOR;
    if sectors < 1 {
        return Ok(Table::None {
            filesystem: probe_filesystem(dev, 0, size)?,
        });
    }
    let mbr = read_vec(dev, 0, SECTOR)?;
    let signed = mbr[510] == 0x55 && mbr[511] == 0xAA;
    let entries: Vec<RawEntry> = (0..4)
        .map(|i| RawEntry::parse(&mbr, 446 + 16 * i))
        .collect();
    if signed && entries.iter().any(|e| e.type_byte == 0xEE) {
        return match parse_gpt(dev, &mbr) {
            Ok(gpt) => Ok(Table::Gpt(gpt)),
            Err(reason) => Ok(Table::Unknown { reason }),
        };
    }
    // Without a protective MBR, a GPT header at LBA 1 is still a GPT that we refuse to guess at.
    if sectors > 1 {
        let h = read_vec(dev, SECTOR, SECTOR)?;
        if &h[0..8] == b"EFI PART" {
            return Ok(Table::Unknown {
                reason: "a GPT header at LBA 1 but no protective MBR (0xEE entry) in sector 0"
                    .into(),
            });
        }
    }
    if !signed {
        return Ok(Table::None {
            filesystem: probe_filesystem(dev, 0, size)?,
        });
    }
    match parse_mbr(dev, &mbr, &entries) {
        Ok(t) => Ok(Table::Mbr(t)),
        Err(reason) => {
            // A boot sector of a filesystem (FAT, NTFS) also ends in 55 AA; tell what it is.
            let fs = probe_filesystem(dev, 0, size)?;
            if fs.is_known() {
                Ok(Table::None { filesystem: fs })
            } else {
                Ok(Table::Unknown {
                    reason: format!("sector 0 ends in 55 AA but is no valid MBR: {reason}"),
                })
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct RawEntry {
    boot: u8,
    type_byte: u8,
    start: u64,
    sectors: u64,
}

impl RawEntry {
    fn parse(b: &[u8], at: usize) -> RawEntry {
        RawEntry {
            boot: b.get(at).copied().unwrap_or(0),
            type_byte: b.get(at + 4).copied().unwrap_or(0),
            start: le32(b, at + 8) as u64,
            sectors: le32(b, at + 12) as u64,
        }
    }
    fn used(&self) -> bool {
        self.type_byte != 0
    }
}

pub(crate) fn is_extended(t: u8) -> bool {
    matches!(t, 0x05 | 0x0F | 0x85)
}

/// Validates a GPT header sector read at `lba`. Returns the parsed fields or why not.
struct Header {
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn parse_header(b: &[u8], lba: u64) -> Result<Header, String> {
    if b.get(0..8) != Some(b"EFI PART") {
        return Err(format!("no GPT signature at LBA {lba}"));
    }
    let header_size = le32(b, 12);
    if !(92..=SECTOR as u32).contains(&header_size) {
        return Err(format!(
            "GPT header at LBA {lba}: header size {header_size} is not 92..512"
        ));
    }
    let mut copy = b[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    let crc = crc32(&copy);
    if crc != le32(b, 16) {
        return Err(format!(
            "GPT header at LBA {lba}: CRC {:08x} does not match the stored {:08x}",
            crc,
            le32(b, 16)
        ));
    }
    let h = Header {
        my_lba: le64(b, 24),
        alternate_lba: le64(b, 32),
        first_usable: le64(b, 40),
        last_usable: le64(b, 48),
        disk_guid: guid_at(b, 56),
        entries_lba: le64(b, 72),
        entry_count: le32(b, 80),
        entry_size: le32(b, 84),
        entries_crc: le32(b, 88),
    };
    if h.my_lba != lba {
        return Err(format!(
            "GPT header at LBA {lba} says it is at LBA {}",
            h.my_lba
        ));
    }
    if h.entry_size < 128 || !h.entry_size.is_power_of_two() {
        return Err(format!(
            "GPT header at LBA {lba}: entry size {} not supported",
            h.entry_size
        ));
    }
    let bytes = h.entry_count as u64 * h.entry_size as u64;
    if bytes == 0 || bytes > MAX_GPT_ENTRIES_BYTES {
        return Err(format!(
            "GPT header at LBA {lba}: entry array of {bytes} bytes not supported"
        ));
    }
    if h.first_usable > h.last_usable {
        return Err(format!(
            "GPT header at LBA {lba}: first usable LBA after last usable LBA"
        ));
    }
    Ok(h)
}

fn parse_gpt(dev: &dyn BlockDevice, mbr: &[u8]) -> Result<GptTable, String> {
    let sectors = dev.size() / SECTOR;
    let io = |e: GrowError| e.to_string();
    if sectors < 3 {
        return Err("protective MBR on a device too small for a GPT".into());
    }
    let protective = (0..4)
        .map(|i| RawEntry::parse(mbr, 446 + 16 * i))
        .find(|e| e.type_byte == 0xEE)
        .map(|e| (e.start, e.sectors));
    let header_sector = read_vec(dev, SECTOR, SECTOR).map_err(io)?;
    let h = parse_header(&header_sector, 1).map_err(|e| format!("primary {e}"))?;
    let entries_sectors = (h.entry_count as u64 * h.entry_size as u64).div_ceil(SECTOR);
    if h.entries_lba < 2 || h.entries_lba.saturating_add(entries_sectors) > sectors {
        return Err(format!(
            "primary GPT entry array at LBA {} is outside the device",
            h.entries_lba
        ));
    }
    if h.entries_lba + entries_sectors > h.first_usable {
        return Err("primary GPT entry array overlaps the usable area".into());
    }
    let entries_len = h.entry_count as u64 * h.entry_size as u64;
    let entries = read_vec(dev, h.entries_lba * SECTOR, entries_len).map_err(io)?;
    if crc32(&entries) != h.entries_crc {
        return Err("primary GPT entry array CRC does not match its header".into());
    }
    if h.last_usable >= sectors {
        return Err(format!(
            "primary GPT header: last usable LBA {} is past the device's {sectors} sectors",
            h.last_usable
        ));
    }
    if h.alternate_lba <= h.last_usable || h.alternate_lba == 1 {
        return Err(format!(
            "primary GPT header: backup header LBA {} is inside the usable area",
            h.alternate_lba
        ));
    }
    let backup_header_valid = if h.alternate_lba < sectors {
        let b = read_vec(dev, h.alternate_lba * SECTOR, SECTOR).map_err(io)?;
        match parse_header(&b, h.alternate_lba) {
            Ok(bh) => bh.alternate_lba == 1 && bh.disk_guid == h.disk_guid,
            Err(_) => false,
        }
    } else {
        false
    };
    let mut partitions = Vec::new();
    for i in 0..h.entry_count as usize {
        let at = i * h.entry_size as usize;
        let e = &entries[at..at + 128];
        let type_guid = guid_at(e, 0);
        if type_guid.is_zero() {
            continue;
        }
        let first_lba = le64(e, 32);
        let last_lba = le64(e, 40);
        if first_lba > last_lba || first_lba < h.first_usable || last_lba > h.last_usable {
            return Err(format!(
                "GPT partition {}: sectors {first_lba}..{last_lba} outside the usable area {}..{}",
                i + 1,
                h.first_usable,
                h.last_usable
            ));
        }
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        let start = first_lba * SECTOR;
        let len = (last_lba - first_lba + 1) * SECTOR;
        let filesystem = probe_filesystem(dev, start, len).map_err(io)?;
        partitions.push(GptPartition {
            number: i as u32 + 1,
            type_guid,
            unique_guid: guid_at(e, 16),
            first_lba,
            last_lba,
            attributes: le64(e, 48),
            name,
            filesystem,
        });
    }
    check_overlaps(
        partitions
            .iter()
            .map(|p| (p.number, p.first_lba, p.last_lba)),
    )?;
    Ok(GptTable {
        disk_guid: h.disk_guid,
        backup_header_lba: h.alternate_lba,
        backup_header_valid,
        first_usable_lba: h.first_usable,
        last_usable_lba: h.last_usable,
        entries_lba: h.entries_lba,
        entry_count: h.entry_count,
        entry_size: h.entry_size,
        partitions,
        protective_mbr: protective,
        header_sector,
        entries,
    })
}

fn check_overlaps(parts: impl Iterator<Item = (u32, u64, u64)>) -> Result<(), String> {
    let mut v: Vec<(u32, u64, u64)> = parts.collect();
    v.sort_by_key(|p| p.1);
    for w in v.windows(2) {
        if w[1].1 <= w[0].2 {
            return Err(format!("partitions {} and {} overlap", w[0].0, w[1].0));
        }
    }
    Ok(())
}

fn parse_mbr(dev: &dyn BlockDevice, mbr: &[u8], entries: &[RawEntry]) -> Result<MbrTable, String> {
    let sectors = dev.size() / SECTOR;
    let io = |e: GrowError| e.to_string();
    let mut partitions = Vec::new();
    let mut extended = None;
    for (slot, e) in entries.iter().enumerate() {
        if e.boot != 0 && e.boot != 0x80 {
            return Err(format!(
                "entry {}: boot flag {:#04x} is neither 0 nor 0x80",
                slot + 1,
                e.boot
            ));
        }
        if !e.used() {
            continue;
        }
        if e.start == 0 || e.sectors == 0 {
            return Err(format!("entry {}: empty or at sector 0", slot + 1));
        }
        if e.start + e.sectors > sectors {
            return Err(format!(
                "entry {}: sectors {}..{} reach past the device's {sectors} sectors",
                slot + 1,
                e.start,
                e.start + e.sectors - 1
            ));
        }
        let kind = if is_extended(e.type_byte) {
            if extended.is_some() {
                return Err("more than one extended partition".into());
            }
            extended = Some(*e);
            MbrKind::Extended
        } else {
            MbrKind::Primary
        };
        let filesystem = match kind {
            MbrKind::Extended => None,
            _ => Some(probe_filesystem(dev, e.start * SECTOR, e.sectors * SECTOR).map_err(io)?),
        };
        partitions.push(MbrPartition {
            number: slot as u32 + 1,
            kind,
            type_byte: e.type_byte,
            bootable: e.boot == 0x80,
            start_lba: e.start,
            sectors: e.sectors,
            table_lba: 0,
            slot,
            filesystem,
        });
    }
    if let Some(ext) = extended {
        let ext_end = ext.start + ext.sectors; // exclusive
        let mut ebr_lba = ext.start;
        let mut number = 5;
        let mut seen = Vec::new();
        loop {
            if seen.contains(&ebr_lba) || seen.len() >= MAX_LOGICAL {
                return Err("the EBR chain loops or is too long".into());
            }
            seen.push(ebr_lba);
            if ebr_lba < ext.start || ebr_lba >= ext_end {
                return Err(format!(
                    "EBR at LBA {ebr_lba} lies outside the extended partition"
                ));
            }
            let ebr = read_vec(dev, ebr_lba * SECTOR, SECTOR).map_err(io)?;
            if ebr[510] != 0x55 || ebr[511] != 0xAA {
                if ebr_lba == ext.start {
                    // An extended partition without any logical one.
                    break;
                }
                return Err(format!("EBR at LBA {ebr_lba} has no 55 AA signature"));
            }
            let l = RawEntry::parse(&ebr, 446);
            let link = RawEntry::parse(&ebr, 462);
            if l.used() {
                let start = ebr_lba + l.start;
                if l.start == 0 || l.sectors == 0 || start + l.sectors > ext_end {
                    return Err(format!(
                        "logical partition {number} (EBR at LBA {ebr_lba}) lies outside the extended partition"
                    ));
                }
                let filesystem =
                    probe_filesystem(dev, start * SECTOR, l.sectors * SECTOR).map_err(io)?;
                partitions.push(MbrPartition {
                    number,
                    kind: MbrKind::Logical,
                    type_byte: l.type_byte,
                    bootable: l.boot == 0x80,
                    start_lba: start,
                    sectors: l.sectors,
                    table_lba: ebr_lba,
                    slot: 0,
                    filesystem: Some(filesystem),
                });
                number += 1;
            }
            if !link.used() {
                break;
            }
            if !is_extended(link.type_byte) {
                return Err(format!("EBR at LBA {ebr_lba}: second entry is not a link"));
            }
            ebr_lba = ext.start + link.start;
        }
    }
    check_overlaps(
        partitions
            .iter()
            .filter(|p| p.kind != MbrKind::Extended)
            .map(|p| (p.number, p.start_lba, p.end_lba())),
    )?;
    Ok(MbrTable {
        disk_signature: le32(mbr, 440),
        partitions,
    })
}

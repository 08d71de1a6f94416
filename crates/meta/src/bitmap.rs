//! The per-peer out-of-sync bitmap file `V.bitmap`.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "TNDMBMAP"
//! 8       4     version (u32 LE) = 1
//! 12      4     granularity: bytes of data per bit (u32 LE)
//! 16      8     volume size in bytes (u64 LE)
//! 24      1     number of peer slots S
//! 25      7     reserved, zero
//! 32      8     region length R in bytes (u64 LE): ceil(ceil(size/granularity)/8), rounded up to 4096
//! 40      2     volume uuid length L (u16 LE, <= 255)
//! 42      L     volume uuid (UTF-8)
//! ...           zero up to 4092
//! 4092    4     crc32c (u32 LE) of bytes [0, 4092)
//! 4096 + i*R    R     region of slot i: bit n (byte n/8, bit n%8, LSB first) set = the
//!                     granularity-sized block n differs from that peer
//! ```
//!
//! The regions carry no checksum: single bits change all the time and each update is a pwrite
//! of the changed bytes followed by fdatasync. A torn sector of a region can only concern the
//! bytes being updated at that moment.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{MetaError, Result};

pub const BITMAP_MAGIC: [u8; 8] = *b"TNDMBMAP";
pub const BITMAP_VERSION: u32 = 1;
pub const BITMAP_HEADER_LEN: u64 = 4096;
const CRC_AT: usize = 4092;
const ALIGN: u64 = 4096;
/// Largest bitmap region accepted (1 GiB: a 32 TiB volume at 4 KiB per bit).
const MAX_REGION: u64 = 1 << 30;

/// An open bitmap file with its regions loaded in memory.
#[derive(Debug)]
pub struct Bitmap {
    file: File,
    path: PathBuf,
    granularity: u32,
    size_bytes: u64,
    region_bytes: u64,
    volume_uuid: String,
    regions: Vec<Vec<u8>>,
}

impl Bitmap {
    /// Offset and length of slot `slot`'s region for a volume of `size_bytes`.
    pub fn region(size_bytes: u64, granularity: u32, slot: u8) -> (u64, u64) {
        let len = region_len(size_bytes, granularity);
        (BITMAP_HEADER_LEN + u64::from(slot) * len, len)
    }

    /// Creates `path` (replacing any existing file atomically via `path.tmp`) with every bit of
    /// every slot clear. The file is sparse: clear regions take no space.
    pub fn create(
        path: &Path,
        volume_uuid: &str,
        size_bytes: u64,
        granularity: u32,
        slots: u8,
    ) -> Result<Self> {
        Self::create_with(path, volume_uuid, size_bytes, granularity, slots, &[])
    }

    /// Rewrites the file for a volume of `new_size` bytes (a resize): regions are dense and
    /// contiguous, so they move. Writes `path.tmp` with every slot's bits copied (bits past
    /// the new end dropped, new bits clear), fsyncs it, renames it over the file and fsyncs
    /// the directory. A crash leaves the old or the new file, never a mix. Returns the new
    /// file opened; `self` refers to the replaced file afterwards and must be dropped.
    pub fn relayout(&self, new_size: u64) -> Result<Self> {
        let new_bits = new_size.div_ceil(u64::from(self.granularity));
        let regions: Vec<Vec<u8>> = self
            .regions
            .iter()
            .map(|r| {
                let keep = (new_bits.div_ceil(8) as usize).min(r.len());
                let mut out = r[..keep].to_vec();
                // Bits past the new end in the last kept byte are cleared.
                if new_bits % 8 != 0
                    && let Some(last) = out.get_mut((new_bits / 8) as usize)
                {
                    *last &= (1u8 << (new_bits % 8)) - 1;
                }
                out
            })
            .collect();
        Self::create_with(
            &self.path,
            &self.volume_uuid,
            new_size,
            self.granularity,
            self.slots(),
            &regions,
        )
    }

    /// [`Bitmap::create`] with the first bytes of some regions given.
    fn create_with(
        path: &Path,
        volume_uuid: &str,
        size_bytes: u64,
        granularity: u32,
        slots: u8,
        regions: &[Vec<u8>],
    ) -> Result<Self> {
        if !granularity.is_power_of_two() || granularity < 512 {
            return Err(MetaError::invalid(
                "bitmap",
                "granularity must be a power of two >= 512",
            ));
        }
        if volume_uuid.len() > 255 {
            return Err(MetaError::invalid("bitmap", "volume uuid too long"));
        }
        let region_bytes = region_len(size_bytes, granularity);
        if region_bytes > MAX_REGION {
            return Err(MetaError::TooLarge {
                what: "bitmap region",
                len: region_bytes,
                max: MAX_REGION,
            });
        }
        let mut header = vec![0u8; BITMAP_HEADER_LEN as usize];
        header[0..8].copy_from_slice(&BITMAP_MAGIC);
        header[8..12].copy_from_slice(&BITMAP_VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&granularity.to_le_bytes());
        header[16..24].copy_from_slice(&size_bytes.to_le_bytes());
        header[24] = slots;
        header[32..40].copy_from_slice(&region_bytes.to_le_bytes());
        header[40..42].copy_from_slice(&(volume_uuid.len() as u16).to_le_bytes());
        header[42..42 + volume_uuid.len()].copy_from_slice(volume_uuid.as_bytes());
        let crc = crc32c::crc32c(&header[..CRC_AT]);
        header[CRC_AT..].copy_from_slice(&crc.to_le_bytes());

        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| MetaError::io(&tmp, e))?;
            f.write_all_at(&header, 0)
                .and_then(|_| f.set_len(BITMAP_HEADER_LEN + u64::from(slots) * region_bytes))
                .map_err(|e| MetaError::io(&tmp, e))?;
            for (slot, r) in regions.iter().enumerate().take(usize::from(slots)) {
                let r = &r[..r.len().min(region_bytes as usize)];
                // Clear regions stay holes.
                if r.iter().any(|b| *b != 0) {
                    let at = Self::region(size_bytes, granularity, slot as u8).0;
                    f.write_all_at(r, at).map_err(|e| MetaError::io(&tmp, e))?;
                }
            }
            f.sync_all().map_err(|e| MetaError::io(&tmp, e))?;
        }
        std::fs::rename(&tmp, path).map_err(|e| MetaError::io(&tmp, e))?;
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::io::sync_dir(dir)?;
        }
        Self::open(path)
    }

    /// Opens and validates an existing bitmap file and loads its regions.
    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| MetaError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| MetaError::io(path, e))?.len();
        if file_len < BITMAP_HEADER_LEN {
            return Err(MetaError::Truncated {
                what: "bitmap",
                needed: BITMAP_HEADER_LEN as usize,
                have: file_len as usize,
            });
        }
        let mut header = vec![0u8; BITMAP_HEADER_LEN as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| MetaError::io(path, e))?;
        let (granularity, size_bytes, slots, region_bytes, volume_uuid) = parse_header(&header)?;
        let needed = BITMAP_HEADER_LEN + u64::from(slots) * region_bytes;
        if file_len < needed {
            return Err(MetaError::Truncated {
                what: "bitmap",
                needed: needed as usize,
                have: file_len as usize,
            });
        }
        let mut regions = Vec::with_capacity(usize::from(slots));
        for slot in 0..slots {
            let mut r = vec![0u8; region_bytes as usize];
            file.read_exact_at(&mut r, Self::region(size_bytes, granularity, slot).0)
                .map_err(|e| MetaError::io(path, e))?;
            regions.push(r);
        }
        Ok(Bitmap {
            file,
            path: path.to_path_buf(),
            granularity,
            size_bytes,
            region_bytes,
            volume_uuid,
            regions,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn granularity(&self) -> u32 {
        self.granularity
    }
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    pub fn slots(&self) -> u8 {
        self.regions.len() as u8
    }
    pub fn volume_uuid(&self) -> &str {
        &self.volume_uuid
    }
    pub fn region_bytes(&self) -> u64 {
        self.region_bytes
    }

    /// Number of bits per slot (blocks of `granularity` bytes, the last one possibly partial).
    pub fn bits(&self) -> u64 {
        self.size_bytes.div_ceil(u64::from(self.granularity))
    }

    fn check(&self, slot: u8, bit: u64) -> Result<()> {
        if usize::from(slot) >= self.regions.len() {
            return Err(MetaError::invalid("bitmap", format!("no peer slot {slot}")));
        }
        if bit >= self.bits() {
            return Err(MetaError::invalid(
                "bitmap",
                format!("bit {bit} beyond {} bits", self.bits()),
            ));
        }
        Ok(())
    }

    pub fn test(&self, slot: u8, bit: u64) -> Result<bool> {
        self.check(slot, bit)?;
        let r = &self.regions[usize::from(slot)];
        Ok(r[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    /// Sets bits `[first, first+count)` of `slot` and persists them (pwrite + fdatasync).
    /// Returns how many bits changed.
    pub fn set_bits(&mut self, slot: u8, first: u64, count: u64) -> Result<u64> {
        self.update(slot, first, count, true)
    }

    /// Clears bits `[first, first+count)` of `slot` and persists them. Returns how many changed.
    pub fn clear_bits(&mut self, slot: u8, first: u64, count: u64) -> Result<u64> {
        self.update(slot, first, count, false)
    }

    /// Marks the data range `[offset, offset+len)` out of sync for `slot` (every block it
    /// touches).
    pub fn set_range(&mut self, slot: u8, offset: u64, len: u64) -> Result<u64> {
        let (first, count) = self.blocks_touching(offset, len)?;
        self.update(slot, first, count, true)
    }

    /// Marks the data range in sync for `slot` (only blocks it covers completely, and the
    /// partial last block of the volume).
    pub fn clear_range(&mut self, slot: u8, offset: u64, len: u64) -> Result<u64> {
        let g = u64::from(self.granularity);
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size_bytes)
            .ok_or_else(|| MetaError::invalid("bitmap", "range beyond the volume"))?;
        let first = offset.div_ceil(g);
        let last = if end == self.size_bytes {
            self.bits()
        } else {
            end / g
        };
        if last <= first {
            return Ok(0);
        }
        self.update(slot, first, last - first, false)
    }

    fn blocks_touching(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let g = u64::from(self.granularity);
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.size_bytes)
            .ok_or_else(|| MetaError::invalid("bitmap", "range beyond the volume"))?;
        if len == 0 {
            return Ok((0, 0));
        }
        let first = offset / g;
        Ok((first, end.div_ceil(g) - first))
    }

    fn update(&mut self, slot: u8, first: u64, count: u64, set: bool) -> Result<u64> {
        if count == 0 {
            return Ok(0);
        }
        let last = first
            .checked_add(count - 1)
            .ok_or_else(|| MetaError::invalid("bitmap", "bit range overflows"))?;
        self.check(slot, first)?;
        self.check(slot, last)?;
        let region = &mut self.regions[usize::from(slot)];
        let mut changed = 0;
        for bit in first..=last {
            let byte = &mut region[(bit / 8) as usize];
            let mask = 1u8 << (bit % 8);
            let was = *byte & mask != 0;
            if was != set {
                changed += 1;
                if set {
                    *byte |= mask;
                } else {
                    *byte &= !mask;
                }
            }
        }
        if changed > 0 {
            let (b0, b1) = ((first / 8) as usize, (last / 8) as usize);
            let (off, _) = Self::region(self.size_bytes, self.granularity, slot);
            self.file
                .write_all_at(&region[b0..=b1], off + b0 as u64)
                .and_then(|_| self.file.sync_data())
                .map_err(|e| MetaError::io(&self.path, e))?;
        }
        Ok(changed)
    }

    /// Out-of-sync bits of `slot`.
    pub fn count(&self, slot: u8) -> u64 {
        self.regions
            .get(usize::from(slot))
            .map(|r| r.iter().map(|b| u64::from(b.count_ones())).sum())
            .unwrap_or(0)
    }

    /// Out-of-sync bytes of `slot` (bits times granularity, the partial last block counted
    /// by its real size).
    pub fn out_of_sync_bytes(&self, slot: u8) -> u64 {
        let g = u64::from(self.granularity);
        let mut bytes = self.count(slot) * g;
        let bits = self.bits();
        if bits > 0 && self.test(slot, bits - 1).unwrap_or(false) {
            // The last block may be shorter than the granularity.
            let last_block = self.size_bytes - (bits - 1) * g;
            bytes -= g - last_block;
        }
        bytes
    }
}

fn region_len(size_bytes: u64, granularity: u32) -> u64 {
    let bits = size_bytes.div_ceil(u64::from(granularity.max(1)));
    bits.div_ceil(8).div_ceil(ALIGN) * ALIGN
}

type Header = (u32, u64, u8, u64, String);

fn parse_header(h: &[u8]) -> Result<Header> {
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if h.len() < BITMAP_HEADER_LEN as usize || h[0..8] != BITMAP_MAGIC {
        return Err(MetaError::BadMagic { what: "bitmap" });
    }
    let version = u32_at(8);
    if version == 0 {
        return Err(MetaError::InvalidVersion {
            what: "bitmap",
            found: 0,
        });
    }
    if version > BITMAP_VERSION {
        return Err(MetaError::UnsupportedVersion {
            what: "bitmap",
            found: version,
            supported: BITMAP_VERSION,
        });
    }
    let stored = u32_at(CRC_AT);
    let computed = crc32c::crc32c(&h[..CRC_AT]);
    if stored != computed {
        return Err(MetaError::Checksum {
            what: "bitmap header",
            stored,
            computed,
        });
    }
    let granularity = u32_at(12);
    if !granularity.is_power_of_two() || granularity < 512 {
        return Err(MetaError::invalid("bitmap", "bad granularity"));
    }
    let size_bytes = u64_at(16);
    let slots = h[24];
    if slots > crate::MAX_PEER_SLOTS {
        return Err(MetaError::invalid("bitmap", "too many slots"));
    }
    let region_bytes = u64_at(32);
    if region_bytes != region_len(size_bytes, granularity) || region_bytes > MAX_REGION {
        return Err(MetaError::invalid(
            "bitmap",
            "region length does not match the size",
        ));
    }
    let ulen = usize::from(u16::from_le_bytes([h[40], h[41]]));
    if ulen > 255 {
        return Err(MetaError::invalid("bitmap", "volume uuid too long"));
    }
    let uuid = String::from_utf8(h[42..42 + ulen].to_vec())
        .map_err(|_| MetaError::invalid("bitmap", "volume uuid is not UTF-8"))?;
    Ok((granularity, size_bytes, slots, region_bytes, uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_persist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.bitmap");
        let size = (100 << 20) + 1000; // partial last block
        let mut b = Bitmap::create(&p, "uuid-1", size, 4096, 3).unwrap();
        assert_eq!(b.bits(), 25601);
        assert_eq!(b.count(0), 0);
        assert_eq!(b.set_range(1, 4095, 2).unwrap(), 2); // touches blocks 0 and 1
        assert_eq!(b.set_bits(2, 25600, 1).unwrap(), 1);
        assert_eq!(b.set_bits(1, 0, 1).unwrap(), 0, "already set");
        assert_eq!(b.count(1), 2);
        assert_eq!(b.out_of_sync_bytes(1), 8192);
        assert_eq!(b.out_of_sync_bytes(2), 1000);
        assert!(b.test(1, 1).unwrap() && !b.test(0, 1).unwrap());
        assert!(b.set_bits(3, 0, 1).is_err(), "no slot 3");
        assert!(b.set_bits(0, 25601, 1).is_err(), "past the end");
        assert!(b.set_range(0, size, 1).is_err());
        drop(b);

        let mut b = Bitmap::open(&p).unwrap();
        assert_eq!(b.volume_uuid(), "uuid-1");
        assert_eq!(b.count(1), 2);
        assert_eq!(b.count(2), 1);
        assert_eq!(b.count(0), 0);
        // Clearing a partial range keeps blocks it does not cover completely.
        assert_eq!(b.clear_range(1, 100, 4096).unwrap(), 0);
        assert_eq!(b.clear_range(1, 0, 8192).unwrap(), 2);
        assert_eq!(b.clear_range(2, 25600 * 4096, 1000).unwrap(), 1);
        drop(b);
        let b = Bitmap::open(&p).unwrap();
        assert_eq!(b.count(1) + b.count(2), 0);
        // Sparse: three clear 4 KiB-aligned regions take (almost) no space.
        let (off, len) = Bitmap::region(size, 4096, 2);
        assert_eq!(off, 4096 + 2 * 4096);
        assert_eq!(len, 4096);
    }

    #[test]
    fn corrupt_or_newer_headers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.bitmap");
        Bitmap::create(&p, "u", 1 << 20, 4096, 3).unwrap();
        let good = std::fs::read(&p).unwrap();

        let mut bad = good.clone();
        bad[20] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(Bitmap::open(&p), Err(MetaError::Checksum { .. })));

        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&9u32.to_le_bytes());
        std::fs::write(&p, &newer).unwrap();
        assert!(matches!(
            Bitmap::open(&p),
            Err(MetaError::UnsupportedVersion { found: 9, .. })
        ));

        std::fs::write(&p, &good[..4096]).unwrap();
        assert!(matches!(Bitmap::open(&p), Err(MetaError::Truncated { .. })));
        std::fs::write(&p, b"short").unwrap();
        assert!(Bitmap::open(&p).is_err());
    }

    proptest::proptest! {
        #[test]
        fn random_headers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 4096)) {
            let _ = parse_header(&bytes);
            let mut b = bytes.clone();
            b[0..8].copy_from_slice(&BITMAP_MAGIC);
            b[8..12].copy_from_slice(&1u32.to_le_bytes());
            let crc = crc32c::crc32c(&b[..CRC_AT]);
            b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
            let _ = parse_header(&b);
        }
    }
}

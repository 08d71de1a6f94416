//! A simulated disk: what reads see, what survives a crash, and the difference.

use crate::rng::Rng;

const BLOCK: u64 = 4096;

#[derive(Debug, Clone)]
pub struct SimDisk {
    /// What reads return.
    pub data: Vec<u8>,
    /// What survives a crash for sure.
    pub durable: Vec<u8>,
    /// Completed block writes not yet made durable: (sequence, block, bytes), in order.
    volatile: Vec<(u64, u64, Vec<u8>)>,
    next: u64,
}

impl SimDisk {
    pub fn new(size: u64) -> SimDisk {
        SimDisk {
            data: vec![0; size as usize],
            durable: vec![0; size as usize],
            volatile: Vec::new(),
            next: 1,
        }
    }

    /// Online grow: the new area reads as zeros and is durable as such (the driver extends
    /// the file and fsyncs it before the engine learns the size).
    pub fn grow(&mut self, size: u64) {
        if size as usize > self.data.len() {
            self.data.resize(size as usize, 0);
            self.durable.resize(size as usize, 0);
        }
    }

    /// A write completed (reads see it from now on). Writes are whole 4 KiB blocks.
    pub fn complete_write(&mut self, offset: u64, bytes: &[u8], fua: bool) {
        assert!(offset.is_multiple_of(BLOCK) && (bytes.len() as u64).is_multiple_of(BLOCK));
        let o = offset as usize;
        self.data[o..o + bytes.len()].copy_from_slice(bytes);
        let first = offset / BLOCK;
        let n = bytes.len() as u64 / BLOCK;
        if fua {
            // Durable now; older cached versions of these blocks can never resurface.
            self.durable[o..o + bytes.len()].copy_from_slice(bytes);
            self.volatile
                .retain(|(_, b, _)| *b < first || *b >= first + n);
        } else {
            for i in 0..n {
                let s = (i * BLOCK) as usize;
                self.volatile
                    .push((self.next, first + i, bytes[s..s + BLOCK as usize].to_vec()));
            }
            self.next += 1;
        }
    }

    /// Marker for a flush started now: it covers writes completed so far.
    pub fn flush_marker(&self) -> u64 {
        self.next
    }

    /// A flush started at `marker` completed.
    pub fn complete_flush(&mut self, marker: u64) {
        let mut keep = Vec::new();
        for (seq, b, bytes) in std::mem::take(&mut self.volatile) {
            if seq < marker {
                let o = (b * BLOCK) as usize;
                self.durable[o..o + BLOCK as usize].copy_from_slice(&bytes);
            } else {
                keep.push((seq, b, bytes));
            }
        }
        self.volatile = keep;
    }

    /// Power loss: each 4 KiB block of unflushed or in-flight writes independently survives
    /// or not (torn writes, reordered cache), in write order; what reads see becomes what
    /// survived.
    pub fn crash(&mut self, rng: &mut Rng, in_flight: &[(u64, Vec<u8>)]) {
        let mut pending: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.volatile)
            .into_iter()
            .map(|(_, b, bytes)| (b, bytes))
            .collect();
        for (off, bytes) in in_flight {
            for (i, c) in bytes.chunks(BLOCK as usize).enumerate() {
                pending.push((off / BLOCK + i as u64, c.to_vec()));
            }
        }
        for (b, bytes) in pending {
            if rng.chance(0.5) {
                let o = (b * BLOCK) as usize;
                self.durable[o..o + bytes.len()].copy_from_slice(&bytes);
            }
        }
        self.data = self.durable.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_makes_completed_writes_durable() {
        let mut d = SimDisk::new(16384);
        d.complete_write(0, &[1; 4096], false);
        let m = d.flush_marker();
        d.complete_write(4096, &[2; 4096], false);
        d.complete_flush(m);
        assert_eq!(d.durable[0], 1);
        assert_eq!(d.durable[4096], 0);
        assert_eq!(d.data[4096], 2);
        d.complete_write(8192, &[3; 4096], true);
        assert_eq!(d.durable[8192], 3);
    }

    #[test]
    fn fua_supersedes_older_cached_writes() {
        let mut d = SimDisk::new(8192);
        d.complete_write(0, &[1; 4096], false);
        d.complete_write(0, &[2; 4096], true);
        let m = d.flush_marker();
        d.complete_flush(m);
        assert_eq!(d.durable[0], 2);
        d.complete_write(4096, &[5; 4096], false);
        d.complete_write(0, &[3; 4096], true);
        d.crash(&mut Rng::new(7), &[]);
        assert_eq!(d.data[0], 3);
    }

    #[test]
    fn crash_keeps_durable_data() {
        let mut d = SimDisk::new(8192);
        d.complete_write(0, &[7; 4096], false);
        let m = d.flush_marker();
        d.complete_flush(m);
        d.complete_write(0, &[9; 8192], false);
        d.crash(&mut Rng::new(1), &[]);
        assert!(d.data[0] == 7 || d.data[0] == 9);
        assert_eq!(d.data, d.durable);
    }
}

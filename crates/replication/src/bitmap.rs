//! In-memory out-of-sync bitmap toward one peer: one bit per `granularity` bytes (4 KiB by
//! default). A set bit means the block may differ on that peer. The engine changes bits and
//! tells its driver through [`crate::Action::PersistBits`] so the persistent copy follows.

/// One bitmap; bit n covers bytes `[n * granularity, (n + 1) * granularity)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    granularity: u64,
    size_bytes: u64,
    bits: u64,
    words: Vec<u64>,
    count: u64,
}

impl Bitmap {
    /// A clear bitmap covering `size_bytes` with `granularity` bytes per bit (a power of two).
    pub fn new(size_bytes: u64, granularity: u32) -> Bitmap {
        let g = u64::from(granularity.max(1));
        let bits = size_bytes.div_ceil(g);
        Bitmap {
            granularity: g,
            size_bytes,
            bits,
            words: vec![0; bits.div_ceil(64) as usize],
            count: 0,
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }
    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }
    /// Set bits.
    pub fn count(&self) -> u64 {
        self.count
    }
    /// Bytes covered by set bits (the last block may be short).
    pub fn out_of_sync_bytes(&self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let mut bytes = self.count * self.granularity;
        if self.test(self.bits - 1) {
            bytes -= self.bits * self.granularity - self.size_bytes;
        }
        bytes
    }

    /// Covers `size_bytes` from now on: new blocks clear (in sync), blocks past a smaller
    /// end dropped.
    pub fn resize(&mut self, size_bytes: u64) {
        let bits = size_bytes.div_ceil(self.granularity);
        if bits < self.bits {
            let old = self.bits;
            self.clear_bits(bits, old - bits);
        }
        self.words.resize(bits.div_ceil(64) as usize, 0);
        self.bits = bits;
        self.size_bytes = size_bytes;
    }

    /// Size of the volume the bitmap covers.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn test(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// Sets `count` bits from `first` (clamped to the bitmap); returns how many changed.
    pub fn set_bits(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.bits);
        let mut changed = 0;
        for b in first..end {
            let w = &mut self.words[(b / 64) as usize];
            let m = 1u64 << (b % 64);
            if *w & m == 0 {
                *w |= m;
                changed += 1;
            }
        }
        self.count += changed;
        changed
    }

    /// Clears `count` bits from `first` (clamped); returns how many changed.
    pub fn clear_bits(&mut self, first: u64, count: u64) -> u64 {
        let end = first.saturating_add(count).min(self.bits);
        let mut changed = 0;
        for b in first..end {
            let w = &mut self.words[(b / 64) as usize];
            let m = 1u64 << (b % 64);
            if *w & m != 0 {
                *w &= !m;
                changed += 1;
            }
        }
        self.count -= changed;
        changed
    }

    /// Bits touched by the byte range (every block the range touches, even partly).
    pub fn bits_touching(&self, offset: u64, len: u64) -> (u64, u64) {
        if len == 0 {
            return (offset / self.granularity, 0);
        }
        let first = offset / self.granularity;
        let last = (offset + len - 1) / self.granularity;
        (first, last - first + 1)
    }

    /// Bits completely covered by the byte range.
    pub fn bits_covered(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset.div_ceil(self.granularity);
        let end = (offset + len) / self.granularity;
        // A range reaching the end of the volume covers the short last block too.
        let end = if offset + len >= self.size_bytes {
            self.bits
        } else {
            end
        };
        (first, end.saturating_sub(first))
    }

    /// Marks every block the byte range touches; returns the bit range to persist.
    pub fn set_range(&mut self, offset: u64, len: u64) -> (u64, u64) {
        let (f, n) = self.bits_touching(offset, len);
        self.set_bits(f, n);
        (f, n)
    }

    /// Runs of set bits as (first bit, count), in order.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut b = 0;
        while let Some(s) = self.next_set(b) {
            let mut e = s + 1;
            while e < self.bits && self.test(e) {
                e += 1;
            }
            out.push((s, e - s));
            b = e;
        }
        out
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut wi = (from / 64) as usize;
        let mut w = self.words[wi] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let b = wi as u64 * 64 + u64::from(w.trailing_zeros());
                return (b < self.bits).then_some(b);
            }
            wi += 1;
            if wi >= self.words.len() {
                return None;
            }
            w = self.words[wi];
        }
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.set_bits(0, self.bits);
    }
    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.clear_bits(0, self.bits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_count() {
        let mut b = Bitmap::new(1 << 20, 4096);
        assert_eq!(b.len(), 256);
        assert_eq!(b.set_range(4095, 2), (0, 2));
        assert_eq!(b.count(), 2);
        assert_eq!(b.out_of_sync_bytes(), 8192);
        assert_eq!(b.set_bits(1, 3), 2);
        assert_eq!(b.runs(), vec![(0, 4)]);
        assert_eq!(b.clear_bits(2, 1), 1);
        assert_eq!(b.runs(), vec![(0, 2), (3, 1)]);
        assert_eq!(b.next_set(2), Some(3));
        assert_eq!(b.next_set(4), None);
        b.set_bits(250, 100);
        assert_eq!(b.count(), 3 + 6);
        b.clear_all();
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn covered_versus_touching() {
        let b = Bitmap::new(16384, 4096);
        assert_eq!(b.bits_touching(100, 4096), (0, 2));
        assert_eq!(b.bits_covered(100, 4096), (1, 0));
        assert_eq!(b.bits_covered(4096, 8192), (1, 2));
        assert_eq!(b.bits_covered(0, 16384), (0, 4));
        // short last block: size 10000 => 3 bits, a range to the end covers the last one
        let s = Bitmap::new(10000, 4096);
        assert_eq!(s.bits_covered(8192, 1808), (2, 1));
    }

    proptest! {
        #[test]
        fn count_matches_runs(ops in proptest::collection::vec((any::<bool>(), 0u64..300, 0u64..40), 0..60)) {
            let mut b = Bitmap::new(300 * 4096, 4096);
            let mut model = [false; 300];
            for (set, first, n) in ops {
                if set { b.set_bits(first, n); } else { b.clear_bits(first, n); }
                for m in model.iter_mut().take((first + n).min(300) as usize).skip(first as usize) { *m = set; }
            }
            let expected = model.iter().filter(|x| **x).count() as u64;
            prop_assert_eq!(b.count(), expected);
            let from_runs: u64 = b.runs().iter().map(|r| r.1).sum();
            prop_assert_eq!(from_runs, expected);
            for (i, m) in model.iter().enumerate() { prop_assert_eq!(b.test(i as u64), *m); }
        }
    }
}

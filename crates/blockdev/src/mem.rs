//! An in-memory block device with allocation tracking at 4 KiB granularity.

use std::sync::Mutex;

use crate::{BlockDevice, Extent, Result};

const PAGE: u64 = 4096;

/// Memory-backed device. Pages never written (or trimmed) read as zero and report as holes.
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    pages: Mutex<Vec<Option<Box<[u8]>>>>,
}

impl MemDevice {
    pub fn new(size: u64) -> Self {
        let n = size.div_ceil(PAGE) as usize;
        MemDevice {
            size,
            pages: Mutex::new(vec![None; n]),
        }
    }

    fn for_each_page(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Option<Box<[u8]>>, usize, usize, usize),
    ) {
        let mut pages = self.pages.lock().unwrap();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = (pos / PAGE) as usize;
            let in_page = (pos % PAGE) as usize;
            let n = ((PAGE as usize) - in_page).min((end - pos) as usize);
            f(&mut pages[idx], in_page, n, (pos - offset) as usize);
            pos += n as u64;
        }
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn quick_writes(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        self.for_each_page(offset, buf.len() as u64, |page, at, n, b| match page {
            Some(p) => buf[b..b + n].copy_from_slice(&p[at..at + n]),
            None => buf[b..b + n].fill(0),
        });
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_range("write", offset, buf.len() as u64)?;
        self.for_each_page(offset, buf.len() as u64, |page, at, n, b| {
            let p = page.get_or_insert_with(|| vec![0u8; PAGE as usize].into_boxed_slice());
            p[at..at + n].copy_from_slice(&buf[b..b + n]);
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_deallocate: bool) -> Result<()> {
        self.check_range("write_zeroes", offset, len)?;
        self.for_each_page(offset, len, |page, at, n, _| {
            if may_deallocate && n == PAGE as usize {
                *page = None;
            } else if let Some(p) = page {
                p[at..at + n].fill(0);
            } else if !may_deallocate {
                *page = Some(vec![0u8; PAGE as usize].into_boxed_slice());
            }
        });
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range("block_status", offset, len)?;
        let mut out: Vec<Extent> = Vec::new();
        self.for_each_page(offset, len, |page, _, n, _| {
            let hole = page.is_none();
            match out.last_mut() {
                Some(last) if last.hole == hole => last.length += n as u64,
                _ => out.push(Extent {
                    length: n as u64,
                    hole,
                    zero: hole,
                }),
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sparse_file() {
        let dev = MemDevice::new(10 * PAGE + 100);
        let mut buf = vec![1u8; 5000];
        dev.read_at(&mut buf, 100).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        dev.write_at(&[7u8; 5000], PAGE + 10).unwrap();
        dev.read_at(&mut buf, PAGE + 10).unwrap();
        assert!(buf.iter().all(|b| *b == 7));
        let st = dev.block_status(0, dev.size()).unwrap();
        assert_eq!(st.len(), 3);
        assert_eq!(
            st[0],
            Extent {
                length: PAGE,
                hole: true,
                zero: true
            }
        );
        assert_eq!(
            st[1],
            Extent {
                length: 2 * PAGE,
                hole: false,
                zero: false
            }
        );
        dev.trim(PAGE, 2 * PAGE).unwrap();
        assert_eq!(dev.block_status(0, dev.size()).unwrap().len(), 1);
        assert!(dev.read_at(&mut buf, dev.size() - 10).is_err());
    }
}

//! What the consumer may legitimately read back, per 4 KiB block. Block contents name the
//! write that produced them (write id in the first 8 bytes), so a read tells which write a
//! block holds.

use std::collections::BTreeSet;

pub const BLOCK: u64 = 4096;

/// The contents write `w` puts into block `b`.
pub fn block_bytes(w: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK as usize];
    v[0..8].copy_from_slice(&w.to_le_bytes());
    v[8..16].copy_from_slice(&b.to_le_bytes());
    let fill = (w.wrapping_mul(31) ^ b) as u8 | 1;
    for x in &mut v[16..] {
        *x = fill;
    }
    v
}

/// Which write a block holds (0: never written), or None if the bytes are not a block any
/// write produced for this block.
pub fn parse_block(bytes: &[u8], b: u64) -> Option<u64> {
    if bytes.iter().all(|x| *x == 0) {
        return Some(0);
    }
    let w = u64::from_le_bytes(bytes[0..8].try_into().ok()?);
    (bytes == block_bytes(w, b).as_slice()).then_some(w)
}

#[derive(Debug, Clone, Default)]
pub struct Block {
    /// Last acknowledged write (issue order = id order).
    pub acked: u64,
    /// Ack counter value when `acked` was acknowledged.
    pub acked_at: u64,
    /// Last write known durable (acked, then covered by a flush or FUA).
    pub durable: u64,
    /// Acked writes newer than `durable` (could survive a crash).
    pub unflushed: Vec<u64>,
    /// Writes issued, failed or lost, that a read may also return.
    pub possible: BTreeSet<u64>,
    /// Acknowledged writes a crash made uncertain: one of them may have reached the disk of
    /// the replica that went on (a flush there since made it durable) while the model kept
    /// `durable`. A later crash before a flush of a newer write may bring them back.
    pub maybe_durable: BTreeSet<u64>,
    /// Writes that failed since `durable`: they may have reached the disks (and a flush
    /// there) although the consumer got an error. A later acknowledged write supersedes them
    /// for reads, but a crash that loses it before a flush may bring one of them back.
    pub failed: BTreeSet<u64>,
    pub writes_in_flight: u32,
    /// Ids of the writes in flight (their order of application is not known yet).
    pub inflight: Vec<u64>,
    pub reads_in_flight: u32,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub blocks: Vec<Block>,
    pub ack_counter: u64,
    /// Two consumers (a dual-primary window): overlapping writes are applied in the order
    /// they are acknowledged (the write token lets only one node write at a time, and a
    /// node holds an overlapping write back until the earlier one completed), not in id order.
    pub ack_order: bool,
}

impl Model {
    pub fn new(blocks: u64, ack_order: bool) -> Model {
        Model {
            blocks: vec![Block::default(); blocks as usize],
            ack_counter: 0,
            ack_order,
        }
    }

    pub fn issue_write(&mut self, w: u64, first: u64, n: u64) {
        for b in first..first + n {
            let blk = &mut self.blocks[b as usize];
            blk.possible.insert(w);
            blk.writes_in_flight += 1;
            blk.inflight.push(w);
        }
    }

    pub fn write_acked(&mut self, w: u64, first: u64, n: u64, fua: bool) {
        self.ack_counter += 1;
        let at = self.ack_counter;
        for b in first..first + n {
            let blk = &mut self.blocks[b as usize];
            blk.writes_in_flight -= 1;
            blk.inflight.retain(|x| *x != w);
            if self.ack_order {
                // Applied after every write acknowledged before it; writes still in flight
                // may still land after it.
                blk.acked = w;
                blk.acked_at = at;
                let inflight = &blk.inflight;
                blk.possible.retain(|x| inflight.contains(x));
                if fua {
                    blk.durable = w;
                    blk.unflushed.clear();
                    blk.maybe_durable.clear();
                    blk.failed.clear();
                } else {
                    blk.unflushed.push(w);
                }
            } else if w > blk.acked {
                blk.acked = w;
                blk.acked_at = at;
                blk.possible.retain(|x| *x > w);
                if fua {
                    blk.durable = w;
                    blk.unflushed.clear();
                    blk.maybe_durable.clear();
                    blk.failed.retain(|x| *x > w);
                } else {
                    blk.unflushed.push(w);
                }
            }
        }
    }

    /// Failed or lost: the write may or may not be there.
    pub fn write_failed(&mut self, w: u64, first: u64, n: u64) {
        for b in first..first + n {
            let blk = &mut self.blocks[b as usize];
            blk.writes_in_flight -= 1;
            blk.inflight.retain(|x| *x != w);
            blk.failed.insert(w);
        }
    }

    /// A flush issued when the ack counter was `marker` completed successfully.
    pub fn flush_done(&mut self, marker: u64) {
        for blk in &mut self.blocks {
            if blk.acked != blk.durable && blk.acked_at <= marker {
                blk.durable = blk.acked;
                let d = blk.durable;
                blk.unflushed.retain(|x| *x > d);
                blk.maybe_durable.clear();
                blk.failed.retain(|x| *x > d);
            }
        }
    }

    /// The node whose disk the consumer sees crashed: unflushed acknowledged writes may be
    /// gone (or not).
    pub fn primary_crashed(&mut self) {
        for blk in &mut self.blocks {
            blk.possible.extend(blk.maybe_durable.iter().copied());
            if blk.acked != blk.durable {
                blk.possible.extend(blk.failed.iter().copied());
                let un = std::mem::take(&mut blk.unflushed);
                blk.maybe_durable.extend(un.iter().copied());
                blk.maybe_durable.insert(blk.acked);
                blk.possible.extend(un);
                blk.possible.insert(blk.acked);
                blk.acked = blk.durable;
            }
        }
    }

    /// The volume grew to `blocks`: new blocks were never written (read as zeros).
    pub fn grow(&mut self, blocks: u64) {
        if blocks as usize > self.blocks.len() {
            self.blocks.resize(blocks as usize, Block::default());
        }
    }

    pub fn allowed(&self, b: u64, w: u64) -> bool {
        let blk = &self.blocks[b as usize];
        w == blk.acked || blk.possible.contains(&w)
    }
}

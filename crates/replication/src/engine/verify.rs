//! Online verify (DRBD's `verify`) and the online resync of what it found.
//!
//! The verify source (this node: the Primary, or an UpToDate Secondary when no node is
//! Primary) walks the volume in chunks of `Config::verify_chunk` bytes, at most
//! `Config::verify_max_inflight` in flight, paced like a resync by the resync rate. Each
//! chunk is an ordered read (`OpKind::VerifyLocal`) through the same ordering as consumer
//! I/O: when it *starts*, every earlier overlapping write has completed here and was sent to
//! every peer before; the `ChecksumRequest`s go out at that moment, and later overlapping
//! writes wait until the local digests are taken, so they reach the peers after the request.
//! A peer answers through its own ordering (`OpKind::ChecksumAnswer`, queued behind the
//! writes that arrived before the request). Both sides therefore digest the same version of
//! every block: a block written during verify is never reported as a false difference. This
//! only holds while all writes come from this node, so a Secondary source aborts when a peer
//! becomes Primary.
//!
//! Digests are computed by the driver (`Action::DiskChecksum`, BLAKE3 per block of
//! `bitmap_granularity` bytes): the data never passes through the engine. Differing blocks
//! are marked out of sync toward that peer (persisted like every bit) and sent to it as
//! `OutOfSync` (flags 0) so it marks them too. With `resync` the source then starts a
//! bitmap resync of the marked blocks on the established link (`ResyncBegin` with the
//! current generation): the peer becomes sync target, the verify source's data wins.

use super::*;
use tandem_repl_proto::{ChecksumAlg, ChecksumPurpose, Digest, Generation};

/// Why a verify cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("a verify is already running ({done} of {total} bytes compared)")]
    Running { done: u64, total: u64 },
    #[error("a witness has no data to verify")]
    Diskless,
    #[error("local data is {0:?}, not UpToDate")]
    NotUpToDate(DiskState),
    #[error("node {0} is Primary: verify from the Primary")]
    PrimaryElsewhere(NodeId),
    #[error("no connected UpToDate diskful peer in sync to compare with")]
    NoPeer,
}

#[derive(Debug)]
pub(super) struct Chunk {
    offset: u64,
    len: u64,
    local: Option<Vec<Digest>>,
    /// Per peer still in the run: its digests once answered.
    remote: BTreeMap<NodeId, Option<Vec<Digest>>>,
}

#[derive(Debug)]
pub(super) struct VerifyRun {
    run: u64,
    resync: bool,
    peers: BTreeSet<NodeId>,
    started: Nanos,
    cursor: u64,
    inflight: BTreeMap<u64, Chunk>,
    checked: u64,
    tokens: u64,
    last_refill: Nanos,
    different_by_peer: BTreeMap<NodeId, u64>,
    /// Differing blocks (union over peers): first bit -> count, merged.
    diff: BTreeMap<u64, u64>,
    different: u64,
    error: Option<String>,
}

#[derive(Debug, Default)]
pub(super) struct VerifyState {
    run: Option<VerifyRun>,
    last: Option<VerifyResult>,
    runs: u64,
    next_req: u64,
    /// Online resyncs we started as source: peer -> link epoch, until the target reported
    /// Inconsistent (an older UpToDate report must not end the resync at once).
    online_sources: BTreeMap<NodeId, u64>,
}

/// Differing block runs kept while verifying (beyond that only bytes are counted).
const DIFF_RUNS_MAX: usize = 4096;

impl Engine {
    /// Starts an online verify from this node against every connected UpToDate diskful peer
    /// in sync with us. `resync`: start a bitmap resync of the differing blocks toward each
    /// peer when done (our data wins).
    pub fn start_verify(&mut self, now: Nanos, resync: bool) -> Result<Vec<Action>, VerifyError> {
        self.now = self.now.max(now);
        if let Some(r) = &self.verify.run {
            return Err(VerifyError::Running {
                done: r.checked,
                total: self.cfg.size_bytes,
            });
        }
        if !self.cfg.diskful {
            return Err(VerifyError::Diskless);
        }
        if self.meta.disk_state != DiskState::UpToDate {
            return Err(VerifyError::NotUpToDate(self.meta.disk_state));
        }
        if self.role != Role::Primary
            && let Some(p) = self
                .peers
                .values()
                .find(|p| peer_role(p) == Some(Role::Primary))
        {
            return Err(VerifyError::PrimaryElsewhere(p.cfg.node_id));
        }
        let peers: BTreeSet<NodeId> = self
            .diskful_ids()
            .into_iter()
            .filter(|id| self.in_sync(*id))
            .collect();
        if peers.is_empty() {
            return Err(VerifyError::NoPeer);
        }
        self.verify.runs += 1;
        let run = self.verify.runs;
        self.log(
            Level::Info,
            format!(
                "verify {run} started against nodes {peers:?}{}",
                if resync {
                    " (resync of differences)"
                } else {
                    ""
                }
            ),
        );
        self.verify.run = Some(VerifyRun {
            run,
            resync,
            peers,
            started: self.now,
            cursor: 0,
            inflight: BTreeMap::new(),
            checked: 0,
            tokens: u64::from(self.cfg.verify_chunk),
            last_refill: self.now,
            different_by_peer: BTreeMap::new(),
            diff: BTreeMap::new(),
            different: 0,
            error: None,
        });
        self.pump_verify();
        Ok(self.take_out())
    }

    pub(super) fn verify_status(&self) -> (Option<VerifyProgress>, Option<VerifyResult>) {
        let progress = self.verify.run.as_ref().map(|r| VerifyProgress {
            run: r.run,
            peers: r.peers.iter().copied().collect(),
            resync: r.resync,
            bytes_total: self.cfg.size_bytes,
            bytes_done: r.checked,
            different_bytes: r.different,
            elapsed_nanos: self.now.saturating_sub(r.started),
        });
        (progress, self.verify.last.clone())
    }

    /// Issues chunks up to the in-flight limit and the rate (the resync rate limit applies to
    /// verify too, like DRBD's).
    pub(super) fn pump_verify(&mut self) {
        let now = self.now;
        let rate = self.resync_rate;
        let chunk = u64::from(self.cfg.verify_chunk.max(self.cfg.bitmap_granularity));
        let max_inflight = self.cfg.verify_max_inflight.max(1);
        let size = self.cfg.size_bytes;
        let mut new = Vec::new();
        {
            let Some(r) = self.verify.run.as_mut() else {
                return;
            };
            if rate > 0 {
                let dt = now.saturating_sub(r.last_refill);
                let add = (u128::from(rate) * u128::from(dt) / 1_000_000_000) as u64;
                if add > 0 {
                    r.tokens = (r.tokens + add).min(chunk * max_inflight as u64 + chunk);
                    r.last_refill = now;
                }
            }
            while r.inflight.len() < max_inflight && r.cursor < size {
                let len = chunk.min(size - r.cursor);
                if rate > 0 {
                    if r.tokens < len {
                        break;
                    }
                    r.tokens -= len;
                }
                self.verify.next_req += 1;
                let req = self.verify.next_req;
                r.inflight.insert(
                    req,
                    Chunk {
                        offset: r.cursor,
                        len,
                        local: None,
                        remote: r.peers.iter().map(|p| (*p, None)).collect(),
                    },
                );
                new.push((req, r.cursor, len));
                r.cursor += len;
            }
        }
        for (req, offset, len) in new {
            self.enqueue(offset, len, Access::Read, OpKind::VerifyLocal { req });
        }
        self.maybe_finish_verify();
    }

    /// `OpKind::VerifyLocal` starts: the ordering point of the chunk (see the module docs).
    pub(super) fn start_verify_local(&mut self, op: &Op, req: u64) {
        self.active.insert(op.key, op.clone());
        let g = self.cfg.bitmap_granularity;
        let peers: Vec<NodeId> = self
            .verify
            .run
            .as_ref()
            .and_then(|r| r.inflight.get(&req))
            .map(|c| c.remote.keys().copied().collect())
            .unwrap_or_default();
        for p in peers {
            self.send(
                p,
                Message::ChecksumRequest {
                    id: req,
                    offset: op.offset,
                    len: op.len as u32,
                    block_size: g,
                    alg: ChecksumAlg::Blake3,
                    purpose: ChecksumPurpose::Verify,
                },
            );
        }
        let io = self.io(IoPurpose::Op(op.key));
        self.disk(Action::DiskChecksum {
            io,
            offset: op.offset,
            len: op.len as u32,
            block_size: g,
        });
    }

    /// `OpKind::ChecksumAnswer` starts: digest our copy for the peer.
    pub(super) fn start_checksum_answer(&mut self, op: &Op, block_size: u32) {
        self.active.insert(op.key, op.clone());
        let io = self.io(IoPurpose::Op(op.key));
        self.disk(Action::DiskChecksum {
            io,
            offset: op.offset,
            len: op.len as u32,
            block_size,
        });
    }

    pub(super) fn disk_checksum_done(&mut self, io: IoId, result: Result<Vec<Digest>, DiskError>) {
        let Some(IoPurpose::Op(key)) = self.ios.remove(&io) else {
            return;
        };
        let Some(op) = self.active.get(&key).cloned() else {
            return;
        };
        match op.kind {
            OpKind::ChecksumAnswer {
                peer,
                epoch,
                id,
                block_size,
            } => {
                if self.conn(peer).is_some_and(|c| c.epoch == epoch) {
                    let (status, digests) = match result {
                        Ok(d) => (WireStatus::Ok, d),
                        Err(_) => (WireStatus::IoError, Vec::new()),
                    };
                    self.send(
                        peer,
                        Message::ChecksumReply {
                            id,
                            offset: op.offset,
                            block_size,
                            alg: ChecksumAlg::Blake3,
                            status,
                            digests,
                        },
                    );
                }
                self.finish_op(key);
            }
            OpKind::ResyncCheckLocal { peer, epoch, id } => {
                self.finish_op(key);
                if let Some(ck) = self
                    .conn_mut(peer)
                    .filter(|c| c.epoch == epoch)
                    .and_then(|c| c.resync.as_mut())
                    .and_then(|rs| rs.checks.get_mut(&id))
                {
                    // A local read error: the digests cannot match, so everything is fetched.
                    ck.local = Some(result.unwrap_or_default());
                }
                self.resync_check_ready(peer, id);
            }
            OpKind::VerifyLocal { req } => {
                self.finish_op(key);
                let mut failed = None;
                if let Some(c) = self
                    .verify
                    .run
                    .as_mut()
                    .and_then(|r| r.inflight.get_mut(&req))
                {
                    match result {
                        Ok(d) => c.local = Some(d),
                        Err(e) => failed = Some(e.0),
                    }
                }
                if let Some(e) = failed {
                    self.end_verify(Some(format!("local read failed: {e}")));
                    return;
                }
                self.complete_chunk(req);
            }
            _ => {}
        }
    }

    /// A peer's `ChecksumRequest` (any other message is ignored).
    pub(super) fn on_checksum_request(
        &mut self,
        peer: NodeId,
        msg: Message,
    ) -> Result<(), ProtocolError> {
        let Message::ChecksumRequest {
            id,
            offset,
            len,
            block_size,
            alg,
            purpose,
        } = msg
        else {
            return Ok(());
        };
        if offset.saturating_add(u64::from(len)) > self.cfg.size_bytes || len == 0 {
            return Err(ProtocolError::Invalid {
                peer,
                detail: "checksum request outside the volume".into(),
            });
        }
        let resync_source = self
            .conn(peer)
            .is_some_and(|c| c.state == ReplState::SyncSource);
        let refuse = if alg != ChecksumAlg::Blake3 {
            Some(WireStatus::NotSupported)
        } else if (purpose == ChecksumPurpose::Resync && !resync_source)
            || !self.cfg.diskful
            || self.meta.disk_state != DiskState::UpToDate
            || !self.peers.get(&peer).is_some_and(|p| p.cfg.diskful)
        {
            Some(WireStatus::NotPermitted)
        } else {
            None
        };
        if let Some(status) = refuse {
            self.send(
                peer,
                Message::ChecksumReply {
                    id,
                    offset,
                    block_size,
                    alg,
                    status,
                    digests: Vec::new(),
                },
            );
            return Ok(());
        }
        if purpose == ChecksumPurpose::Resync
            && let Some(c) = self.conn_mut(peer)
        {
            c.resync_asked = true;
        }
        let epoch = self.conn(peer).map_or(0, |c| c.epoch);
        self.enqueue(
            offset,
            u64::from(len),
            Access::Read,
            OpKind::ChecksumAnswer {
                peer,
                epoch,
                id,
                block_size,
            },
        );
        Ok(())
    }

    pub(super) fn on_checksum_reply(
        &mut self,
        peer: NodeId,
        id: u64,
        offset: u64,
        block_size: u32,
        status: WireStatus,
        digests: Vec<Digest>,
    ) -> Result<(), ProtocolError> {
        let g = self.cfg.bitmap_granularity;
        if self
            .conn(peer)
            .and_then(|c| c.resync.as_ref())
            .is_some_and(|rs| rs.checks.contains_key(&id))
        {
            return self.on_resync_checksums(peer, id, offset, block_size, status, digests);
        }
        let Some(c) = self
            .verify
            .run
            .as_mut()
            .and_then(|r| r.inflight.get_mut(&id))
        else {
            // A late answer for a run that ended (or a chunk done without this peer).
            return Ok(());
        };
        let Some(slot) = c.remote.get_mut(&peer) else {
            return Ok(());
        };
        if slot.is_some() || c.offset != offset || block_size != g {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!("ChecksumReply {id} does not match the request"),
            });
        }
        if status != WireStatus::Ok {
            self.verify_drop_peer(peer, format!("node {peer} refused to verify: {status:?}"));
            return Ok(());
        }
        let blocks = c.len.div_ceil(u64::from(g)) as usize;
        if digests.len() != blocks {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!(
                    "ChecksumReply {id}: {} digests for {blocks} blocks",
                    digests.len()
                ),
            });
        }
        *slot = Some(digests);
        self.complete_chunk(id);
        Ok(())
    }

    /// Compares a chunk once every digest is there; marks and reports differences.
    fn complete_chunk(&mut self, req: u64) {
        let ready = self
            .verify
            .run
            .as_ref()
            .and_then(|r| r.inflight.get(&req))
            .is_some_and(|c| c.local.is_some() && c.remote.values().all(Option::is_some));
        if !ready {
            return;
        }
        let Some(c) = self
            .verify
            .run
            .as_mut()
            .and_then(|r| r.inflight.remove(&req))
        else {
            return;
        };
        let g = u64::from(self.cfg.bitmap_granularity);
        let first_bit = c.offset / g;
        let local = c.local.unwrap_or_default();
        let mut union: BTreeSet<u64> = BTreeSet::new();
        for (peer, remote) in c.remote {
            let remote = remote.unwrap_or_default();
            let mut ranges: Vec<ByteRange> = Vec::new();
            let mut bytes = 0;
            for (i, (a, b)) in local.iter().zip(remote.iter()).enumerate() {
                if a == b {
                    continue;
                }
                let off = c.offset + i as u64 * g;
                let len = g.min(c.offset + c.len - off);
                bytes += len;
                union.insert(first_bit + i as u64);
                match ranges.last_mut() {
                    Some(r) if r.offset + r.len == off => r.len += len,
                    _ => ranges.push(ByteRange { offset: off, len }),
                }
            }
            if ranges.is_empty() {
                continue;
            }
            self.log(
                Level::Warn,
                format!(
                    "verify: {bytes} bytes differ from node {peer} in [{}, {})",
                    c.offset,
                    c.offset + c.len
                ),
            );
            for r in &ranges {
                self.set_bits(peer, r.offset, r.len);
            }
            if self.conn(peer).is_some() {
                for chunk in ranges.chunks(OOS_CHUNK) {
                    self.send(
                        peer,
                        Message::OutOfSync {
                            flags: 0,
                            ranges: chunk.to_vec(),
                        },
                    );
                }
            }
            if let Some(r) = self.verify.run.as_mut() {
                *r.different_by_peer.entry(peer).or_insert(0) += bytes;
            }
        }
        let size = self.cfg.size_bytes;
        if let Some(r) = self.verify.run.as_mut() {
            r.checked += c.len;
            for bit in union {
                r.different += g.min(size - bit * g);
                let merged = r
                    .diff
                    .range(..bit)
                    .next_back()
                    .filter(|(f, n)| **f + **n == bit)
                    .map(|(f, _)| *f);
                match merged {
                    Some(f) => *r.diff.entry(f).or_insert(0) += 1,
                    None if r.diff.len() < DIFF_RUNS_MAX => {
                        r.diff.insert(bit, 1);
                    }
                    None => {}
                }
            }
        }
        self.pump_verify();
    }

    /// A peer leaves the run (link down, refusal); the run ends when none is left.
    pub(super) fn verify_drop_peer(&mut self, peer: NodeId, why: String) {
        let Some(r) = self.verify.run.as_mut() else {
            return;
        };
        if !r.peers.remove(&peer) {
            return;
        }
        for c in r.inflight.values_mut() {
            c.remove_peer(peer);
        }
        let empty = r.peers.is_empty();
        let reqs: Vec<u64> = r.inflight.keys().copied().collect();
        self.log(
            Level::Warn,
            format!("verify: {why}; node {peer} left the run"),
        );
        if empty {
            self.end_verify(Some(format!("{why}; no peer left to compare with")));
            return;
        }
        for req in reqs {
            self.complete_chunk(req);
        }
    }

    /// Hooks: a link went down; a peer reported (a Primary elsewhere ends a Secondary's run).
    pub(super) fn verify_peer_down(&mut self, peer: NodeId) {
        self.verify.online_sources.remove(&peer);
        if self
            .verify
            .run
            .as_ref()
            .is_some_and(|r| r.peers.contains(&peer))
        {
            self.verify_drop_peer(peer, format!("link to node {peer} lost"));
        }
    }

    pub(super) fn verify_on_report(&mut self, peer: NodeId, r: &StateReport) {
        if r.disk_state == DiskState::Inconsistent
            && self.verify.online_sources.remove(&peer).is_some()
            && let Some(c) = self.conn_mut(peer)
        {
            // It took our online resync (it may ask for nothing: blocks a Primary gave it
            // directly it does not fetch).
            c.resync_asked = true;
        }
        if self.verify.run.is_some() && self.role != Role::Primary && r.role == Role::Primary {
            self.end_verify(Some(format!(
                "node {peer} became Primary: its writes are not ordered with this verify"
            )));
        }
    }

    /// Our disk was detached: a running verify ends.
    pub(super) fn end_verify_detached(&mut self) {
        if self.verify.run.is_some() {
            self.end_verify(Some("local disk detached".into()));
        }
    }

    /// Whether an UpToDate report of `peer` must not end our online resync toward it yet.
    pub(super) fn online_resync_unconfirmed(&self, peer: NodeId) -> bool {
        let epoch = self.conn(peer).map(|c| c.epoch);
        self.verify.online_sources.get(&peer).copied() == epoch
    }

    fn maybe_finish_verify(&mut self) {
        let done = self
            .verify
            .run
            .as_ref()
            .is_some_and(|r| r.cursor >= self.cfg.size_bytes && r.inflight.is_empty());
        if done {
            self.end_verify(None);
        }
    }

    /// Ends the run (`error`: early), keeps the result, starts the resyncs asked for.
    fn end_verify(&mut self, error: Option<String>) {
        let Some(r) = self.verify.run.take() else {
            return;
        };
        let g = u64::from(self.cfg.bitmap_granularity);
        let size = self.cfg.size_bytes;
        let mut ranges: Vec<(u64, u64)> = r
            .diff
            .iter()
            .map(|(f, n)| (f * g, (n * g).min(size - f * g)))
            .collect();
        let truncated = ranges.len() > VERIFY_RANGES_MAX || r.diff.len() >= DIFF_RUNS_MAX;
        ranges.truncate(VERIFY_RANGES_MAX);
        let error = error.or(r.error);
        let mut resync_started = Vec::new();
        if r.resync && error.is_none() {
            for (peer, bytes) in &r.different_by_peer {
                if *bytes > 0 && self.start_online_resync(*peer) {
                    resync_started.push(*peer);
                }
            }
        }
        let result = VerifyResult {
            run: r.run,
            peers: r.peers.iter().copied().collect(),
            checked_bytes: r.checked,
            different_bytes: r.different,
            different_by_peer: r.different_by_peer.into_iter().collect(),
            ranges,
            ranges_truncated: truncated,
            resync_started,
            error,
            elapsed_nanos: self.now.saturating_sub(r.started),
        };
        self.log(
            if result.different_bytes > 0 || result.error.is_some() {
                Level::Warn
            } else {
                Level::Info
            },
            format!(
                "verify {} ended: {} bytes compared, {} bytes differ{}{}",
                result.run,
                result.checked_bytes,
                result.different_bytes,
                result
                    .error
                    .as_ref()
                    .map(|e| format!(", stopped early: {e}"))
                    .unwrap_or_default(),
                if result.resync_started.is_empty() {
                    String::new()
                } else {
                    format!(", resync toward nodes {:?}", result.resync_started)
                }
            ),
        );
        self.verify.last = Some(result);
    }

    /// Source side: resync our bits toward an established, in-sync peer now, without a
    /// reconnect. Returns false when the link is not in a state for it (the bits stay and
    /// the next handshake resyncs them).
    pub(super) fn start_online_resync(&mut self, peer: NodeId) -> bool {
        if !self.in_sync(peer) || self.meta.disk_state != DiskState::UpToDate {
            return false;
        }
        let bytes = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
        if bytes == 0 {
            return false;
        }
        let Some(epoch) = self.conn(peer).map(|c| c.epoch) else {
            return false;
        };
        self.verify.online_sources.insert(peer, epoch);
        self.set_state(peer, ReplState::SyncSource);
        let generation = self.meta.current;
        self.log(
            Level::Info,
            format!("resync of {bytes} bytes toward node {peer} (verify findings)"),
        );
        self.send(peer, Message::ResyncBegin { generation, bytes });
        true
    }

    /// Target side: a `ResyncBegin` on an established link (the peer's verify found
    /// differences). Accepted when it names our current generation and we are an UpToDate
    /// Secondary without another resync; then we become sync target of our bits toward it.
    pub(super) fn accept_online_resync(&mut self, peer: NodeId, generation: Generation) -> bool {
        let ok = self.cfg.diskful
            && self.role == Role::Secondary
            && self.meta.disk_state == DiskState::UpToDate
            && generation == self.meta.current
            && self
                .conn(peer)
                .is_some_and(|c| c.state == ReplState::Established)
            && !self.peers.values().any(|p| {
                p.conn
                    .as_ref()
                    .is_some_and(|c| c.state == ReplState::SyncTarget)
            });
        if !ok {
            return false;
        }
        // Blocks a Primary (another node) gave us whole over its current link are current:
        // the source may read them before that write reaches it.
        self.skip_primary_fresh(peer);
        let total = self.bitmap(peer).map_or(0, |b| b.out_of_sync_bytes());
        let now = self.now;
        let chunk = u64::from(self.cfg.resync_chunk);
        let decided_at = self.meta.current;
        if let Some(c) = self.conn_mut(peer) {
            c.state = ReplState::SyncTarget;
            c.resync = Some(ResyncTarget {
                cursor: 0,
                inflight: BTreeMap::new(),
                next_id: 1,
                tokens: chunk,
                last_refill: now,
                total,
                done: 0,
                finishing: false,
                fenced: BTreeSet::new(),
                begun: true,
                decided_at,
                checks: BTreeMap::new(),
                no_checksums: false,
                skipped: 0,
                remark: BTreeMap::new(),
                end_received: false,
            });
        }
        self.log(
            Level::Info,
            format!("node {peer} resyncs {total} bytes toward us (verify findings)"),
        );
        self.meta.disk_state = DiskState::Inconsistent;
        self.persist_meta();
        self.broadcast_report(false);
        self.pump_resync();
        true
    }

    /// `OutOfSync` on an established link: the peer's verify found these ranges different.
    pub(super) fn on_verify_findings(
        &mut self,
        peer: NodeId,
        ranges: &[ByteRange],
    ) -> Result<(), ProtocolError> {
        for r in ranges {
            if r.offset.saturating_add(r.len) > self.cfg.size_bytes {
                return Err(ProtocolError::Invalid {
                    peer,
                    detail: "out-of-sync range outside the volume".into(),
                });
            }
        }
        let total: u64 = ranges.iter().map(|r| r.len).sum();
        self.log(
            Level::Warn,
            format!(
                "node {peer} reports {total} bytes different from it (verify findings, or writes \
                 its detached disk may lack); marked out of sync"
            ),
        );
        for r in ranges {
            self.set_bits(peer, r.offset, r.len);
        }
        Ok(())
    }
}

/// A chunk of a checksum-based resync whose digests are being compared.
#[derive(Debug)]
pub(super) struct ResyncCheck {
    offset: u64,
    len: u64,
    local: Option<Vec<Digest>>,
    remote: Option<Vec<Digest>>,
}

impl ResyncCheck {
    pub(super) fn new(offset: u64, len: u64) -> ResyncCheck {
        ResyncCheck {
            offset,
            len,
            local: None,
            remote: None,
        }
    }
}

pub(super) fn resync_checksum_request(id: u64, offset: u64, len: u64, g: u64) -> Message {
    Message::ChecksumRequest {
        id,
        offset,
        len: len as u32,
        block_size: g as u32,
        alg: ChecksumAlg::Blake3,
        purpose: ChecksumPurpose::Resync,
    }
}

impl Engine {
    /// Checksum resync, target side: the source's digests of a chunk.
    fn on_resync_checksums(
        &mut self,
        peer: NodeId,
        id: u64,
        offset: u64,
        block_size: u32,
        status: WireStatus,
        digests: Vec<Digest>,
    ) -> Result<(), ProtocolError> {
        let g = self.cfg.bitmap_granularity;
        let Some(rs) = self.conn_mut(peer).and_then(|c| c.resync.as_mut()) else {
            return Ok(());
        };
        let Some(ck) = rs.checks.get_mut(&id) else {
            return Ok(());
        };
        if ck.remote.is_some() || ck.offset != offset || block_size != g {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!("ChecksumReply {id} does not match the resync request"),
            });
        }
        if status != WireStatus::Ok {
            // The source cannot (an older build, a refusal): fetch this chunk and every later
            // one as data. Its bits are still set; the walk starts over.
            rs.no_checksums = true;
            rs.checks.remove(&id);
            rs.inflight.remove(&id);
            rs.cursor = 0;
            self.log(
                Level::Info,
                format!("node {peer} answers checksum requests with {status:?}: plain resync"),
            );
            self.pump_resync();
            return Ok(());
        }
        if digests.len() as u64 != ck.len.div_ceil(u64::from(g)) {
            return Err(ProtocolError::Invalid {
                peer,
                detail: format!("ChecksumReply {id}: wrong number of digests"),
            });
        }
        ck.remote = Some(digests);
        self.resync_check_ready(peer, id);
        Ok(())
    }

    /// Both digests of a chunk are there: identical blocks are done (bits cleared, nothing
    /// transferred); the others are requested as data.
    fn resync_check_ready(&mut self, peer: NodeId, id: u64) {
        let g = u64::from(self.cfg.bitmap_granularity);
        let mut requests = Vec::new();
        let mut cleared = Vec::new();
        {
            let Some(p) = self.peers.get_mut(&peer) else {
                return;
            };
            let (Some(c), Some(b)) = (p.conn.as_mut(), p.bitmap.as_mut()) else {
                return;
            };
            let Some(rs) = c.resync.as_mut() else { return };
            let ready = rs
                .checks
                .get(&id)
                .is_some_and(|ck| ck.local.is_some() && ck.remote.is_some());
            if !ready {
                return;
            }
            let Some(ck) = rs.checks.remove(&id) else {
                return;
            };
            rs.inflight.remove(&id);
            let local = ck.local.unwrap_or_default();
            let remote = ck.remote.unwrap_or_default();
            let first = ck.offset / g;
            let blocks = ck.len.div_ceil(g);
            let mut run: Option<(u64, u64)> = None;
            let mut flush_run = |run: &mut Option<(u64, u64)>, rs: &mut ResyncTarget| {
                if let Some((off, len)) = run.take() {
                    let rid = rs.next_id;
                    rs.next_id += 1;
                    rs.inflight.insert(rid, (off, len));
                    requests.push(Message::ResyncRequest {
                        id: rid,
                        offset: off,
                        len: len as u32,
                    });
                }
            };
            for i in 0..blocks {
                let bit = first + i;
                let off = bit * g;
                let len = g.min(ck.offset + ck.len - off);
                if !b.test(bit) {
                    // Fenced by a replicated write meanwhile: current already.
                    flush_run(&mut run, rs);
                    continue;
                }
                let same = local.get(i as usize).is_some()
                    && local.get(i as usize) == remote.get(i as usize);
                if same {
                    flush_run(&mut run, rs);
                    b.clear_bits(bit, 1);
                    cleared.push(bit);
                    rs.skipped += len;
                } else {
                    match run.as_mut() {
                        Some((o, l)) if *o + *l == off => *l += len,
                        _ => {
                            flush_run(&mut run, rs);
                            run = Some((off, len));
                        }
                    }
                }
            }
            flush_run(&mut run, rs);
        }
        for bit in cleared {
            self.out.push(Action::PersistBits {
                peer,
                set: false,
                first: bit,
                count: 1,
            });
        }
        for m in requests {
            self.send(peer, m);
        }
        self.pump_resync();
    }
}

impl Chunk {
    fn remove_peer(&mut self, peer: NodeId) {
        self.remote.remove(&peer);
    }
}

//! `on-no-quorum`: what a Primary without quorum does with consumer requests. `io-error`
//! (the default) fails them once quorum cannot come back over the current links; `suspend`
//! holds them: requests that arrive wait (not started), and writes and flushes that finish
//! meanwhile are not acknowledged. When quorum is back they are started and acknowledged;
//! when the node stops being Primary (an operator's demote, or it meets a Primary that kept
//! quorum) they fail. Nothing is acknowledged without quorum either way.
//!
//! A diskless Primary under `suspend` also holds its I/O while no peer holds its data (all
//! its links broke, e.g. a blip around its host): requests that arrive wait, and those in
//! flight whose peers went are *parked* (`Parked`): a write's op stays active (overlapping
//! later ones wait behind it) and is sent again, a flush is sent anew, a read is forwarded
//! again, once a peer serves again. Nothing was acknowledged that no peer holding the data
//! has, as with `io-error`; only the failure is replaced by waiting.

use super::*;

impl Engine {
    /// Changes the on-no-quorum policy while running. Back to `io-error`, requests held now
    /// fail (finished ones) or fail once quorum cannot come back (waiting ones).
    pub fn set_on_no_quorum(&mut self, now: Nanos, policy: OnNoQuorum) -> Vec<Action> {
        self.now = self.now.max(now);
        if self.cfg.on_no_quorum != policy {
            self.cfg.on_no_quorum = policy;
            self.log(
                Level::Info,
                format!("on-no-quorum set to {}", policy_name(policy)),
            );
            if policy == OnNoQuorum::IoError {
                let (reachable, voters, _) = self.quorum();
                self.fail_held(RequestError::NoQuorum { reachable, voters });
                self.fail_parked(self.detached_error());
                self.recheck_quorum_wait();
                if self.diskless_primary() && self.serving_peer().is_none() {
                    // Requests waiting for a peer that holds our data fail, as they would
                    // have on arrival.
                    let err = self.detached_error();
                    for ev in std::mem::take(&mut self.quorum_wait) {
                        if let Event::Write { id, .. }
                        | Event::Flush { id }
                        | Event::Read { id, .. } = ev
                        {
                            self.complete(id, Err(err.clone()));
                        }
                    }
                }
            }
            self.broadcast_report(false);
        }
        self.take_out()
    }

    pub(super) fn suspends(&self) -> bool {
        self.cfg.on_no_quorum == OnNoQuorum::Suspend
    }

    /// A diskless Primary under `suspend`: it parks requests while no peer holds its data.
    pub(super) fn parks(&self) -> bool {
        self.diskless_primary() && self.suspends()
    }

    /// Logs the start of a suspension (nothing was waiting yet).
    pub(super) fn note_suspending(&mut self) {
        if self.held.is_empty() && self.quorum_wait.is_empty() && self.parked.is_empty() {
            self.log(
                Level::Warn,
                "no peer holds our data: consumer I/O suspended (on-no-quorum=suspend)".into(),
            );
        }
    }

    /// A peer holds our data again: the parked requests go out again, in their order.
    pub(super) fn unpark(&mut self) {
        if self.parked.is_empty() || self.serving_peer().is_none() {
            return;
        }
        let parked = std::mem::take(&mut self.parked);
        self.log(
            Level::Info,
            format!(
                "a peer holds our data again: {} suspended requests resumed",
                parked.len()
            ),
        );
        for p in parked {
            match p {
                Parked::Write(key) => {
                    let Some(op) = self.active.get(&key).cloned() else {
                        continue;
                    };
                    let OpKind::ClientWrite { data, fua, .. } = op.kind else {
                        continue;
                    };
                    let waiting = self.replicate_write(key, op.offset, &data, fua);
                    if waiting.is_empty() {
                        // Cannot be (a serving peer receives writes); parked again.
                        self.parked.push(Parked::Write(key));
                    }
                    if let Some(w) = self.writes.get_mut(&key) {
                        w.waiting = waiting;
                        w.ok_from.clear();
                    }
                }
                Parked::Flush(id) => self.start_client_flush(Some(id)),
                Parked::Read(key) => self.forward_read(key),
            }
        }
    }

    /// The parked requests fail (no longer Primary, or back to `io-error`).
    pub(super) fn fail_parked(&mut self, err: RequestError) {
        for p in std::mem::take(&mut self.parked) {
            match p {
                Parked::Write(key) | Parked::Read(key) => {
                    let id = match self.active.get(&key).map(|op| &op.kind) {
                        Some(OpKind::ClientWrite { id, .. } | OpKind::ClientRead { id }) => *id,
                        _ => continue,
                    };
                    if let Some(w) = self.writes.remove(&key) {
                        self.seq_to_key.retain(|_, k| *k != key);
                        drop(w);
                    }
                    self.complete(id, Err(err.clone()));
                    self.finish_op(key);
                }
                Parked::Flush(id) => self.complete(id, Err(err.clone())),
            }
        }
        self.al_evict();
    }

    /// A write or flush finished (every replica answered) while we have no quorum: with
    /// `suspend` its acknowledgement waits. Returns false when the caller should complete it
    /// now (with the quorum error).
    pub(super) fn hold_completion(&mut self, id: RequestId) -> bool {
        if !self.suspends() || self.role != Role::Primary {
            return false;
        }
        if self.held.is_empty() && self.quorum_wait.is_empty() {
            self.log(
                Level::Warn,
                "no quorum: consumer I/O suspended (on-no-quorum=suspend)".into(),
            );
        }
        self.held.push(id);
        true
    }

    /// Quorum is back: acknowledge what was held (under a new generation if a diskful peer
    /// missed those writes, as any write that completes without one).
    pub(super) fn release_held(&mut self) {
        if self.held.is_empty() || self.role != Role::Primary || !self.quorum().2 {
            return;
        }
        if self.mint_pending {
            let missing = self.peers_needing_new_generation();
            if !missing.is_empty() {
                self.mint_pending = false;
                self.mint(&format!(
                    "suspended writes completed without diskful nodes {missing:?}"
                ));
                self.persist_meta();
                self.broadcast_report(false);
            }
        }
        let held = std::mem::take(&mut self.held);
        self.log(
            Level::Info,
            format!(
                "quorum is back: {} suspended requests acknowledged",
                held.len()
            ),
        );
        for id in held {
            self.complete(id, Ok(Reply::Done));
        }
    }

    /// The held acknowledgements fail (no longer Primary, or back to `io-error`).
    pub(super) fn fail_held(&mut self, err: RequestError) {
        for id in std::mem::take(&mut self.held) {
            self.complete(id, Err(err.clone()));
        }
    }

    /// I/O is suspended: requests wait for quorum under `suspend`.
    pub(super) fn io_suspended(&self) -> bool {
        self.suspends() && (!self.held.is_empty() || !self.quorum_wait.is_empty())
    }
}

pub(crate) fn policy_name(p: OnNoQuorum) -> &'static str {
    match p {
        OnNoQuorum::IoError => "io-error",
        OnNoQuorum::Suspend => "suspend",
    }
}

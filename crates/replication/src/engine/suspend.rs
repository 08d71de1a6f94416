//! `on-no-quorum`: what a Primary without quorum does with consumer requests. `io-error`
//! (the default) fails them once quorum cannot come back over the current links; `suspend`
//! holds them: requests that arrive wait (not started), and writes and flushes that finish
//! meanwhile are not acknowledged. When quorum is back they are started and acknowledged;
//! when the node stops being Primary (an operator's demote, or it meets a Primary that kept
//! quorum) they fail. Nothing is acknowledged without quorum either way.

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
                self.recheck_quorum_wait();
            }
            self.broadcast_report(false);
        }
        self.take_out()
    }

    pub(super) fn suspends(&self) -> bool {
        self.cfg.on_no_quorum == OnNoQuorum::Suspend
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

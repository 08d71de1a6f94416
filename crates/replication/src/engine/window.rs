//! The dual-primary window (live migration): two nodes are Primary to their consumers at the
//! same time, and exactly one of them, the holder of the *write token*, is the replication
//! Primary. The other one queues its consumer's requests and asks for the token; the holder
//! finishes its requests in flight (protocol C: they are on every replica then), demotes,
//! and grants the token; the requester promotes and runs the queued requests. So the rest of
//! the engine, and every other node, always sees at most one replication Primary, and
//! overlapping writes of the two consumers are never in flight at once: every replica applies
//! them in the same order. See `docs/replication.md`, "Dual-primary window".

use std::collections::VecDeque;

use tandem_repl_proto::NodeId;

use super::*;

/// Why the window could not be opened or closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the dual-primary window needs protocol C")]
    ProtocolA,
    #[error(
        "two Primaries (node {0} is the other one): demote one of them before closing the \
         dual-primary window"
    )]
    TwoPrimaries(NodeId),
}

/// Who holds the write token, as this member sees it.
#[allow(dead_code)] // the token protocol lands in the next commit
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    /// We hold it: we are the replication Primary, or may promote without asking.
    Held,
    /// The partner holds it and we have not asked for it.
    NotHeld,
    /// We sent `TokenRequest` and wait for `TokenGrant`.
    Requested,
}

/// This node is one of the two Primaries of a dual-primary window.
#[allow(dead_code)] // the token protocol lands in the next commit
#[derive(Debug)]
pub(super) struct Window {
    /// The other Primary.
    pub(super) partner: NodeId,
    /// The link to the partner this window lives on (its loss ends the window here).
    pub(super) epoch: u64,
    pub(super) token: Token,
    /// Consumer requests waiting for the token, in arrival order.
    pub(super) pending: VecDeque<Event>,
    /// The partner asked for the token: start nothing new, hand it over once our requests
    /// in flight are complete.
    pub(super) handing: bool,
}

impl Engine {
    /// Opens or closes the dual-primary window for this volume. Closing is refused while
    /// this node is one of two Primaries.
    pub fn set_allow_two_primaries(
        &mut self,
        now: Nanos,
        on: bool,
    ) -> Result<Vec<Action>, WindowError> {
        self.now = self.now.max(now);
        if on && self.cfg.protocol != Protocol::C {
            return Err(WindowError::ProtocolA);
        }
        if !on && let Some(w) = self.window.as_ref() {
            return Err(WindowError::TwoPrimaries(w.partner));
        }
        if self.cfg.allow_two_primaries != on {
            self.cfg.allow_two_primaries = on;
            self.log(
                Level::Info,
                format!(
                    "dual-primary window {}",
                    if on { "opened" } else { "closed" }
                ),
            );
            self.broadcast_report(false);
        }
        Ok(self.take_out())
    }

    pub(super) fn dual_primary_status(&self) -> Option<DualPrimary> {
        self.window.as_ref().map(|w| DualPrimary {
            partner: w.partner,
            write_token: w.token == Token::Held,
        })
    }
}

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
#[derive(Debug)]
pub(super) struct Window {
    /// The other Primary.
    pub(super) partner: NodeId,
    pub(super) token: Token,
    /// Consumer requests waiting for the token, in arrival order.
    pub(super) pending: VecDeque<Event>,
    /// The partner asked for the token: start nothing new, hand it over once our requests
    /// in flight are complete.
    pub(super) handing: bool,
    /// Token hand-offs of this window so far (carried in the messages, for logs).
    pub(super) handoffs: u64,
}

impl Window {
    /// A window just joined with `partner`, the write token here or not.
    fn new(partner: NodeId, token: Token) -> Window {
        Window {
            partner,
            token,
            pending: VecDeque::new(),
            handing: false,
            handoffs: 0,
        }
    }
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

    /// A consumer request on a member that is not the replication Primary: queued until the
    /// token is here (asked for once), or, holding the token, a promotion first.
    pub(super) fn window_request(&mut self, ev: Event) {
        let Some(w) = self.window.as_mut() else {
            return;
        };
        match w.token {
            Token::Held => {
                if let Err(e) = self.promote_checked() {
                    let id = request_id(&ev);
                    self.log(
                        Level::Warn,
                        format!("dual-primary: holding the write token but not promoted: {e}"),
                    );
                    return self.complete(id, Err(promote_failure(&e)));
                }
                self.serve_request(request_id(&ev), ev);
            }
            Token::Requested => w.pending.push_back(ev),
            Token::NotHeld => {
                w.pending.push_back(ev);
                w.token = Token::Requested;
                let (partner, handoffs) = (w.partner, w.handoffs);
                self.send(partner, Message::TokenRequest { handoffs });
            }
        }
    }

    /// The replication Primary of a window that hands the token over queues new requests.
    pub(super) fn window_queues(&mut self, ev: Event) -> Option<Event> {
        match self.window.as_mut() {
            Some(w) if w.handing => {
                w.pending.push_back(ev);
                None
            }
            _ => Some(ev),
        }
    }

    /// `promote` on a node while `primary` is Primary: it joins the dual-primary window as
    /// the member without the token, when the window is open on both, it is diskful and in
    /// sync with that Primary over an established link, and that Primary has no other member.
    /// The caller checked our disk (UpToDate, not a sync target) already.
    pub(super) fn join_window(&mut self, primary: NodeId) -> Result<(), PromoteError> {
        if !self.cfg.allow_two_primaries || self.window.is_some() {
            return Err(PromoteError::PrimaryElsewhere(primary));
        }
        let p = &self.peers[&primary];
        let report = p.conn.as_ref().and_then(|c| c.report.as_ref());
        let theirs = report.map_or(0, |r| r.flags);
        if theirs & state_flags::DUAL_PRIMARY == 0 || !p.cfg.diskful {
            return Err(PromoteError::WindowClosedOn(primary));
        }
        if theirs & state_flags::WINDOW_MEMBER != 0
            || self.peers.values().any(|o| {
                o.cfg.node_id != primary
                    && o.conn
                        .as_ref()
                        .and_then(|c| c.report.as_ref())
                        .is_some_and(|r| r.flags & state_flags::WINDOW_MEMBER != 0)
            })
        {
            return Err(PromoteError::WindowFull(primary));
        }
        let unsynced = self
            .peers
            .get(&primary)
            .and_then(|p| p.bitmap.as_ref())
            .is_some_and(|b| b.out_of_sync_bytes() > 0);
        if !self.in_sync(primary) || unsynced {
            return Err(PromoteError::NotInSyncWith(primary));
        }
        let (reachable, voters, ok) = self.quorum();
        if !ok {
            return Err(PromoteError::NoQuorum { reachable, voters });
        }
        self.window = Some(Window::new(primary, Token::NotHeld));
        self.log(
            Level::Info,
            format!(
                "dual-primary: second Primary next to node {primary} (without the write token)"
            ),
        );
        self.broadcast_report(true);
        Ok(())
    }

    /// A peer's report says it is a window member. The Primary takes it as its partner (it
    /// holds the token) if the window is open here and it has no other partner; otherwise
    /// the link is refused (`TwoPrimaries`), which ends that member's part.
    /// Returns false when the link was closed.
    pub(super) fn window_report(&mut self, peer: NodeId, r: &StateReport) -> bool {
        let member = r.flags & state_flags::WINDOW_MEMBER != 0;
        match self.window.as_ref() {
            Some(w) if w.partner == peer => {
                if !member && r.role != Role::Primary {
                    self.partner_left(peer);
                }
                true
            }
            Some(w) if member => {
                let other = w.partner;
                self.disconnect(
                    peer,
                    DisconnectReason::TwoPrimaries,
                    format!("node {other} is the second Primary of the dual-primary window"),
                );
                false
            }
            None if member && self.role == Role::Primary => {
                if !self.cfg.allow_two_primaries || !self.cfg.diskful {
                    self.disconnect(
                        peer,
                        DisconnectReason::TwoPrimaries,
                        "the dual-primary window is closed here".into(),
                    );
                    return false;
                }
                self.window = Some(Window::new(peer, Token::Held));
                self.log(
                    Level::Info,
                    format!(
                        "dual-primary: node {peer} is the second Primary (we hold the write token)"
                    ),
                );
                self.broadcast_report(false);
                true
            }
            _ => true,
        }
    }

    /// The partner left the window (demoted) without holding the replication role: we are
    /// the only Primary to a consumer now; promote (or give up being Primary if we cannot).
    fn partner_left(&mut self, peer: NodeId) {
        let Some(mut w) = self.window.take() else {
            return;
        };
        self.log(
            Level::Info,
            format!("dual-primary: node {peer} left the window"),
        );
        if self.role == Role::Primary {
            // Pending only while handing over: run them.
            for ev in std::mem::take(&mut w.pending) {
                self.serve_request(request_id(&ev), ev);
            }
            self.broadcast_report(false);
            return;
        }
        match self.promote_checked() {
            Ok(()) => {
                for ev in std::mem::take(&mut w.pending) {
                    self.serve_request(request_id(&ev), ev);
                }
            }
            Err(e) => {
                self.log(
                    Level::Warn,
                    format!("dual-primary: the other Primary left and we cannot promote: {e}"),
                );
                for ev in std::mem::take(&mut w.pending) {
                    let id = request_id(&ev);
                    self.complete(id, Err(promote_failure(&e)));
                }
                self.broadcast_report(false);
            }
        }
    }

    /// The link to `peer` went down: if it was our partner, the window ends here. The
    /// replication Primary goes on alone (quorum rules as always); the other member stops
    /// being Primary at once (its queued requests fail): it cannot tell a dead holder from a
    /// partition, and its disk would go stale.
    pub(super) fn window_peer_down(&mut self, peer: NodeId) {
        if self.window.as_ref().is_none_or(|w| w.partner != peer) {
            return;
        }
        let Some(w) = self.window.take() else { return };
        if self.role == Role::Primary {
            self.log(
                Level::Warn,
                format!(
                    "dual-primary: link to the other Primary (node {peer}) lost; we go on alone"
                ),
            );
            for ev in w.pending {
                self.serve_request(request_id(&ev), ev);
            }
        } else {
            self.log(
                Level::Warn,
                format!(
                    "dual-primary: link to the token holder (node {peer}) lost; no longer Primary"
                ),
            );
            for ev in w.pending {
                self.complete(request_id(&ev), Err(RequestError::NotPrimary));
            }
        }
        self.broadcast_report(false);
    }

    pub(super) fn token_message(
        &mut self,
        peer: NodeId,
        msg: Message,
    ) -> Result<(), ProtocolError> {
        match msg {
            Message::TokenRequest { handoffs } => {
                if self.window.is_none() && self.role == Role::Primary {
                    // Its report (member) is before this on the link; a refusal closed it.
                    let r = self.conn(peer).and_then(|c| c.report.clone());
                    if let Some(r) = r
                        && !self.window_report(peer, &r)
                    {
                        return Ok(());
                    }
                }
                let Some(w) = self.window.as_mut() else {
                    // We left the window: our report (Secondary, no member) tells it.
                    return Ok(());
                };
                if w.partner != peer {
                    return Err(ProtocolError::Unexpected("TokenRequest", peer));
                }
                w.handoffs = w.handoffs.max(handoffs);
                match w.token {
                    Token::Held => {
                        w.handing = true;
                        self.maybe_hand_over();
                    }
                    // Crossed our grant (or our own request): it gets the token anyway.
                    Token::NotHeld | Token::Requested => {}
                }
                Ok(())
            }
            Message::TokenGrant { handoffs } => {
                let Some(w) = self.window.as_mut().filter(|w| w.partner == peer) else {
                    // We left the window; our report tells it that it holds the token.
                    return Ok(());
                };
                if w.token == Token::Held {
                    return Err(ProtocolError::Unexpected("TokenGrant", peer));
                }
                w.token = Token::Held;
                w.handoffs = handoffs;
                let pending = std::mem::take(&mut w.pending);
                self.log(
                    Level::Info,
                    format!("dual-primary: write token from node {peer} (hand-off {handoffs})"),
                );
                match self.promote_checked() {
                    Ok(()) => {
                        for ev in pending {
                            self.serve_request(request_id(&ev), ev);
                        }
                    }
                    Err(e) => {
                        self.log(
                            Level::Warn,
                            format!("dual-primary: holding the write token but not promoted: {e}"),
                        );
                        for ev in pending {
                            self.complete(request_id(&ev), Err(promote_failure(&e)));
                        }
                    }
                }
                Ok(())
            }
            _ => Err(ProtocolError::Unexpected("message", peer)),
        }
    }

    /// The token holder that was asked for the token hands it over once none of its
    /// consumer requests is in flight: demote (its report goes out on every link first),
    /// then `TokenGrant`. Requests that arrived meanwhile (queued, not in flight) ask for it
    /// back.
    pub(super) fn maybe_hand_over(&mut self) {
        let Some(w) = self.window.as_ref() else {
            return;
        };
        if !w.handing || w.token != Token::Held || self.requests_in_flight() > 0 {
            return;
        }
        if self.role == Role::Primary {
            self.become_secondary("handing the write token over");
        }
        let Some(w) = self.window.as_mut() else {
            return;
        };
        w.handing = false;
        w.handoffs += 1;
        w.token = Token::NotHeld;
        let (partner, handoffs) = (w.partner, w.handoffs);
        self.send(partner, Message::TokenGrant { handoffs });
        let w = self.window.as_mut().expect("window");
        if !w.pending.is_empty() {
            w.token = Token::Requested;
            self.send(partner, Message::TokenRequest { handoffs });
        }
    }

    /// Requests queued for the token (they count as in flight for `demote`).
    pub(super) fn window_pending(&self) -> usize {
        self.window.as_ref().map_or(0, |w| w.pending.len())
    }

    /// `demote` of a member: it leaves the window (its report, without the member flag,
    /// tells the partner, which then holds the token).
    pub(super) fn leave_window(&mut self) {
        if let Some(w) = self.window.take() {
            self.log(
                Level::Info,
                format!("dual-primary: left the window (node {} goes on)", w.partner),
            );
        }
    }

    /// At a third node: `r` (a new Primary) and `other` (the Primary we knew) are the two
    /// members of a window in a hand-off (the old holder's Secondary report is still on its
    /// way over the other link): not two Primaries.
    pub(super) fn window_handoff(&self, r: &StateReport, other: &Peer) -> bool {
        let member = |flags: u32| flags & state_flags::WINDOW_MEMBER != 0;
        self.cfg.allow_two_primaries
            && member(r.flags)
            && other
                .conn
                .as_ref()
                .and_then(|c| c.report.as_ref())
                .is_some_and(|o| member(o.flags))
    }

    /// Member of a window (Primary to our consumer, token or not).
    pub(super) fn window_member(&self) -> bool {
        self.window.is_some()
    }

    /// Flags of our reports for the window.
    pub(super) fn window_flags(&self) -> u32 {
        let mut f = 0;
        if self.cfg.allow_two_primaries {
            f |= state_flags::DUAL_PRIMARY;
        }
        if self.window.is_some() {
            f |= state_flags::WINDOW_MEMBER;
        }
        f
    }

    pub(super) fn dual_primary_status(&self) -> Option<DualPrimary> {
        self.window.as_ref().map(|w| DualPrimary {
            partner: w.partner,
            write_token: w.token == Token::Held,
        })
    }
}

fn request_id(ev: &Event) -> RequestId {
    match ev {
        Event::Write { id, .. } | Event::Read { id, .. } | Event::Flush { id } => *id,
        _ => 0,
    }
}

/// What a consumer request gets when the promotion it needs is refused.
fn promote_failure(e: &PromoteError) -> RequestError {
    match e {
        PromoteError::NoQuorum { reachable, voters } => RequestError::NoQuorum {
            reachable: *reachable,
            voters: *voters,
        },
        PromoteError::NotUpToDate(_) | PromoteError::Outdated => RequestError::NotUpToDate,
        _ => RequestError::NotPrimary,
    }
}

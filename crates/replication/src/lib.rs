//! The per-volume replication engine of tandem, as a sans-IO state machine.
//!
//! [`Engine::handle`] takes the time (driver's monotonic clock, nanoseconds) and one
//! [`Event`] (consumer request, completion of a local disk I/O the engine asked for, a link
//! event or message, a timer tick, an admin change) and returns [`Action`]s (disk I/O to
//! start, messages to send, consumer completions, metadata/bitmap/activity-log updates to
//! persist, log lines). The engine owns no socket, clock, disk, thread or randomness: the
//! agent drives it in production, `tandem-sim` drives the very same code in deterministic
//! simulation. [`Action`] documents the ordering contract drivers must keep.
//!
//! Semantics: DRBD 9's, see `docs/replication.md`. Pieces:
//! * [`decide`]: the pure handshake decision (no sync / bitmap or full resync and its
//!   direction / split brain / unrelated data) and the rule that decided it.
//! * [`Bitmap`]: the per-peer out-of-sync bitmap (4 KiB per bit).
//! * [`quorum`]: majority arithmetic.

pub mod bitmap;
pub mod decide;
mod engine;
pub mod quorum;
mod types;

pub use bitmap::Bitmap;
pub use decide::{Rule, SideView, SyncDecision, decide};
pub use engine::{
    DemoteError, Engine, PromoteError, ProtocolError, ResolveError, VerifyError, WindowError,
};
pub use types::*;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_diskless;
#[cfg(test)]
mod tests_suspend;
#[cfg(test)]
mod tests_three;
#[cfg(test)]
mod tests_window;

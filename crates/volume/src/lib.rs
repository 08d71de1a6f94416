//! The production driver of the replication engine (`tandem-replication`) on one node.
//!
//! * [`NodeReplication`] (one per agent) owns the node's [`tandem_transport::Transport`] and
//!   routes its events to the volume drivers by volume name.
//! * [`VolumeDriver`] (one per replicated volume on this node) opens the replica's pool files
//!   (`V.data` through [`tandem_blockdev::FileDevice`], `V.meta` and `V.bitmap` through
//!   `tandem-meta`, `V.al` from this crate, see [`al`]) and builds the engine. Its inputs
//!   (consumer requests, disk completions, transport events, admin calls) are queued in order
//!   and run by whichever delivering thread gets the engine's lock, or by the volume's loop
//!   thread, which also runs a 20 ms tick on the real monotonic clock and sends what waits
//!   for room on a link. It executes the engine's actions per the ordering contract of
//!   `docs/replication.md` (section "Driver").
//! * [`VolumeDriver::block_device`] is a [`tandem_blockdev::BlockDevice`]: writes start
//!   asynchronously (`start_write`, answered from the completion), other calls block the
//!   calling thread until the engine completes them (the NBD server calls those from its
//!   worker threads).

pub mod al;
mod device;
mod driver;
mod node;
mod store;

pub use device::ReplicatedDevice;
pub use driver::{VolumeDriver, VolumeOptions, VolumePeer, VolumeSpec, VolumeStatus};
pub use node::{NodeConfig, NodeReplication};
pub use tandem_repl_proto::DiskState;
pub use tandem_replication::{
    DemoteError, DualPrimary, OnNoQuorum, PeerStatus, PromoteError, Protocol, ReplState,
    RequestError, ResolveError, Role, SplitBrainPolicy, SplitBrainStatus, VerifyError,
    VerifyProgress, VerifyResult, WindowError,
};

/// Errors of starting a node or a volume driver, or of an admin call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("invalid volume configuration: {0}")]
    Config(String),
    #[error("replica metadata: {0}")]
    Meta(String),
    #[error("data file: {0}")]
    Data(String),
    #[error("replication transport: {0}")]
    Transport(String),
    #[error("promotion refused: {0}")]
    Promote(#[from] PromoteError),
    #[error("demotion refused: {0}")]
    Demote(#[from] DemoteError),
    #[error("verify refused: {0}")]
    Verify(#[from] VerifyError),
    #[error("split-brain resolution refused: {0}")]
    Resolve(#[from] ResolveError),
    #[error("dual-primary window refused: {0}")]
    Window(#[from] WindowError),
    #[error("the volume driver stopped: {0}")]
    Stopped(String),
}

//! Deterministic simulator for `tandem-replication`: several nodes run the real [`Engine`]
//! against simulated disks (written-but-unflushed versus durable data, torn writes on crash)
//! and a simulated network (delay, cross-link reordering, message loss that breaks the link
//! like TCP, partitions and healing), slow disks and disk I/O errors, with node crashes and
//! restarts from persisted state, a consumer workload on the Primary, promotions, demotions
//! and failover. Invariants are checked after every event; everything comes from one seed, so
//! a failing seed reproduces exactly. See `docs/replication.md` ("Simulator").

mod disk;
mod model;
mod rng;
mod split_brain;
mod world;

pub use rng::Rng;
pub use world::{Outcome, SimOptions, Topology, run};

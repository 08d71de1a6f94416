//! NBD server. STUB: the public API the agent codes against; the implementation lands next.

pub mod server;

//! Value types shared by every tandem crate. No I/O, no async.
//!
//! * [`size`]: byte sizes with units that cannot be confused (KiB vs KB; a bare `G` is refused).
//! * [`name`]: validation of object names (volumes, nodes, pools) that end up as file names and
//!   NBD export names.

pub mod name;
pub mod size;

pub use name::{NameError, validate_name};
pub use size::{SizeError, format_iec, format_size, parse_size};

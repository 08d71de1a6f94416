//! NBD (Network Block Device) server for tandem volumes.
//!
//! Implements the protocol of `doc/proto.md` in the NetworkBlockDevice/nbd repository, in two
//! layers:
//!
//! * a sans-IO codec: [`handshake`] (fixed newstyle handshake state machine: bytes in, bytes out)
//!   and [`transmission`] (request parsing/validation, simple and structured reply encoding),
//!   with constants in [`proto`];
//! * an async tokio shell, [`server`], serving [`server::Export`]s from an
//!   [`server::ExportRegistry`] on unix sockets and TCP.
//!
//! Supported:
//!
//! * Handshake: fixed newstyle only (a client without `NBD_FLAG_C_FIXED_NEWSTYLE` is
//!   disconnected), `NBD_FLAG_NO_ZEROES`; options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`
//!   (info `EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE` = 1 / 4 KiB / 32 MiB), `STRUCTURED_REPLY`,
//!   `LIST_META_CONTEXT` / `SET_META_CONTEXT` with `base:allocation`. `STARTTLS` (no TLS),
//!   `EXTENDED_HEADERS` and unknown options get `NBD_REP_ERR_UNSUP`; malformed options
//!   `NBD_REP_ERR_INVALID`; unknown exports `NBD_REP_ERR_UNKNOWN`. Options longer than 64 KiB
//!   close the connection.
//! * Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_CACHE`, `SEND_DF` (with
//!   structured replies), `CAN_MULTI_CONN` (per export), and either `READ_ONLY` or `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES`, `SEND_FAST_ZERO`.
//! * Commands: `READ` (structured: one `OFFSET_DATA` chunk, or `OFFSET_HOLE` chunks for zero
//!   extents of reads of 64 KiB and more unless `DF`), `WRITE` (+`FUA`), `DISC`, `FLUSH`, `TRIM`
//!   (punches holes), `WRITE_ZEROES` (`NO_HOLE` keeps the range allocated; `FAST_ZERO` succeeds
//!   when the range may be deallocated, fails fast with `ENOTSUP` together with `NO_HOLE`),
//!   `BLOCK_STATUS` for `base:allocation` (`HOLE`/`ZERO`, `REQ_ONE`), `CACHE` (no-op).
//! * Errors: `EINVAL` for reads/trims/block status outside the export, bad flags and unknown
//!   commands (the connection stays up); `ENOSPC` for writes past the end; `EPERM` for writes on
//!   read-only exports; `EOVERFLOW` (structured) / `EINVAL` (simple) for reads over 32 MiB; a
//!   write payload over 32 MiB, a bad request magic or a truncated request closes that connection
//!   only. Device errors map to `EIO`/`ENOSPC`.
//! * Concurrency: many requests in flight per connection (up to 128 requests / 128 MiB),
//!   executed on a fixed pool of worker threads (4 per CPU, 8 to 64); small writes that arrive
//!   together run as one batch on one worker when the device has quick writes (files); replies
//!   leave out of order, sent by the workers themselves when the socket has room, else through
//!   one writer task that batches them into vectored writes.
//!
//! Not supported: TLS, extended headers, oldstyle or non-fixed newstyle handshakes.

pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;

pub use server::{ConnError, Export, ExportRegistry, Server};

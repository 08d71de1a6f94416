//! FUSE file view (in progress).

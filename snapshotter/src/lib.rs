//! `hyperbox-snapshotter`: containerd's snapshots API, served as a proxy plugin.
//!
//! containerd sees an ordinary snapshotter (`[proxy_plugins.hyperbox] type = "snapshot"`);
//! the gRPC service itself is the `containerd-snapshots` crate's, and this crate is one
//! implementation of its `Snapshotter` trait ([`service::HyperboxSnapshotter`]).
//!
//! - [`store`]: snapshot records in a redb database, one transaction per change, so that a
//!   `kill -9` at any point leaves the old or the new state;
//! - [`layer`]: where a snapshot's files live (directories named by numeric ids, never by
//!   keys) and the mounts containerd gets (overlayfs, or a bind mount for a single layer);
//! - [`filter`]: containerd's filter syntax for `List`;
//! - [`tree`]: walking and removing trees of any depth, one descriptor at a time;
//! - [`usage`]: disk usage of a snapshot's own directory, as `du` counts it;
//! - [`config`]: the TOML configuration file;
//! - [`differ`]: containerd's diff API (containerd 2.x): unpacks into this snapshotter
//!   become EROFS images straight from the layer archives;
//! - `conversion`: committed layers converted to EROFS images over the chunk store, mounted,
//!   re-mounted at start-up.
//!
//! The design (state schema, crash safety, mount scheme, what Usage means) is in
//! `snapshotter/DESIGN.md`.

pub mod config;
mod conversion;
pub mod differ;
mod error;
pub mod filter;
mod kind;
pub mod layer;
mod options;
pub mod service;
pub mod store;
pub mod tree;
pub mod usage;

pub use config::Config;
pub use service::{
    ConversionLimits, HyperboxSnapshotter, LayerOptions, SnapshotterError, CONVERSION_LABEL,
    STORAGE_LABEL,
};

//! Storage core of `hyperbox-snapshotter`: layers as EROFS images whose file data lives in a
//! host-wide content-addressed chunk store, mounted by the kernel with the store's pack files
//! as extra devices.
//!
//! - [`write_image`]: an EROFS image from a directory tree (the layer's upper dir).
//! - [`write_image_from_tar`]: the same image straight from a layer's tar stream.
//! - [`ChunkStore`]: the chunk store: packs, index, reference counts, GC, verify.
//! - [`commit_layer`]: both of the above, crash-safe, for one layer.
//! - [`write_merged_image`]: one image of a stack of layer images, flattened as overlayfs
//!   shows them, its file data still the layers' chunks (metadata only).
//! - [`mount_image`]: the kernel mount (file-backed, or through loop devices).

pub mod format;
mod from_tar;
mod layer;
mod merge;
mod mount;
mod reader;
mod redb_file;
mod store;
mod writer;

pub use format::DeviceSlot;
pub use from_tar::write_image_from_tar;
pub use layer::{commit_layer, commit_layer_from_tar, LayerError, LayerReport};
pub use merge::write_merged_image;
pub use mount::{device_options, mount_image, MountError, MountMode, MountedImage};
pub use redb_file::open_or_create_redb;
pub use store::{
    chunk_digest, ChunkDigest, ChunkLocation, ChunkProblem, ChunkSink, ChunkStore, GcStats,
    LayerStats, LayerWriter, StoreConfig, StoreError, StoreStats, VerifyReport, DEFAULT_CHUNK_BITS,
};
pub use writer::{
    write_image, ImageError, ImageOptions, ImageStats, DEFAULT_MAX_DEPTH, DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_INODES,
};

//! What the snapshotter does with committed layers ([`LayerOptions`]): conversion to EROFS
//! images, merged images, and what one conversion may cost ([`ConversionLimits`]).

use hyperbox_erofs::MountMode;

/// What to do with committed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// Convert committed layers to EROFS images (config `convert`).
    pub convert: bool,
    /// How EROFS images are mounted (config `mount_mode`).
    pub mount_mode: MountMode,
    /// What one layer's conversion may cost; a layer over a limit is set aside.
    pub limits: ConversionLimits,
    /// Give each image's top layer one merged EROFS image of all its layers (config
    /// `merge_layers`).
    pub merge: bool,
    /// Layers converted at once (config `conversion_workers`).
    pub workers: usize,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            convert: true,
            merge: true,
            workers: 1,
            mount_mode: MountMode::Auto,
            limits: ConversionLimits::default(),
        }
    }
}

/// The limits of one layer's conversion (config `max_depth`, `max_inodes`,
/// `max_image_bytes`, `conversion_timeout_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionLimits {
    /// Deepest directory nesting below the layer's root.
    pub max_depth: u32,
    /// Inodes in the layer.
    pub max_inodes: u64,
    /// Size of the EROFS image (8 bytes of chunk index per 64 KiB of file, holes included).
    pub max_image_bytes: u64,
    /// Wall-clock time of the walk and the chunking.
    pub timeout: std::time::Duration,
}

impl Default for ConversionLimits {
    fn default() -> Self {
        ConversionLimits {
            max_depth: hyperbox_erofs::DEFAULT_MAX_DEPTH,
            max_inodes: hyperbox_erofs::DEFAULT_MAX_INODES,
            max_image_bytes: hyperbox_erofs::DEFAULT_MAX_IMAGE_BYTES,
            timeout: std::time::Duration::from_secs(600),
        }
    }
}

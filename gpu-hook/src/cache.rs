//! The node's GPU cache: everything the generator learned from NVML, `/proc` and the driver
//! root, written once per driver load or MIG change, and all the hook and the shim read on
//! a container's start path (no NVML, no `dlopen`, no directory walks there).

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::discover::{clean_container_path, DriverFile};
use crate::driver::DeviceNode;

/// Where the generator writes the cache, unless told otherwise (`HYPERBOX_GPU_CACHE` for the
/// shim, `--cache` for the generator and the hook).
pub const DEFAULT_PATH: &str = "/run/hyperbox/gpu/cache.json";

/// The environment variable naming another cache (the shim's; tests point it at theirs).
pub const PATH_ENV: &str = "HYPERBOX_GPU_CACHE";

/// The format this code writes and reads; another is refused (regenerate the cache).
pub const FORMAT: u32 = 1;

/// A cache is a few hundred entries; more than this is not one of ours.
const MAX_SIZE: u64 = 16 << 20;

/// One MIG device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigDevice {
    /// Its index under its GPU (`NVIDIA_VISIBLE_DEVICES=GPU:INDEX`).
    pub index: u32,
    /// `MIG-…`, as NVML gives it.
    pub uuid: String,
    pub gpu_instance: u32,
    pub compute_instance: u32,
    /// Its capability nodes (`/dev/nvidia-caps/nvidia-cap<minor>` for its GPU instance and
    /// compute instance), besides its GPU's node.
    pub nodes: Vec<DeviceNode>,
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    /// NVML's index (GPUs in PCI bus order).
    pub index: u32,
    /// `GPU-…`, as NVML gives it.
    pub uuid: String,
    /// NVML's extended form, lowercase: `00000000:3b:00.0`.
    pub bus_id: String,
    pub name: String,
    /// NVML's brand, lowercase as `NVIDIA_REQUIRE_BRAND` names it (`tesla`, `geforce`).
    pub brand: String,
    /// Compute capability, `8.0`.
    pub arch: String,
    /// `/dev/nvidia<minor>`.
    pub node: DeviceNode,
    /// Its MIG devices when MIG is enabled, else empty.
    pub mig: Vec<MigDevice>,
}

/// What the generator wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCache {
    pub format: u32,
    pub driver_version: String,
    /// The highest CUDA version the driver supports, `12.4`.
    pub cuda_version: String,
    /// The driver root the files were found under.
    pub driver_root: PathBuf,
    pub gpus: Vec<Gpu>,
    /// `nvidiactl` and the UVM nodes: every GPU container's.
    pub control_nodes: Vec<DeviceNode>,
    /// `nvidia-modeset`, for the display capability.
    pub modeset_node: DeviceNode,
    pub files: Vec<DriverFile>,
}

/// A cache that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "no NVIDIA driver on this node: {path} does not exist (hyperbox-gpu-cdi generate \
         writes it when the driver is loaded)"
    )]
    Missing { path: PathBuf },
    #[error("cannot read the GPU cache {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the GPU cache {path} is not valid: {what}; run hyperbox-gpu-cdi generate again")]
    Invalid { path: PathBuf, what: String },
    #[error("cannot write the GPU cache {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

impl NodeCache {
    /// Reads and checks the cache at `path`.
    pub fn read(path: &Path) -> Result<Self, CacheError> {
        let file = match fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(CacheError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(CacheError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let mut data = Vec::new();
        file.take(MAX_SIZE + 1)
            .read_to_end(&mut data)
            .map_err(|source| CacheError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let invalid = |what: String| CacheError::Invalid {
            path: path.to_path_buf(),
            what,
        };
        if data.len() as u64 > MAX_SIZE {
            return Err(invalid(format!("larger than {MAX_SIZE} bytes")));
        }
        let cache: NodeCache = serde_json::from_slice(&data).map_err(|e| invalid(e.to_string()))?;
        cache.validate().map_err(invalid)?;
        Ok(cache)
    }

    /// What a reader relies on: our format, container paths that are absolute and free of
    /// `..`, device nodes under `/dev`.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "format {} (this build reads {FORMAT})",
                self.format
            ));
        }
        for f in &self.files {
            if !clean_container_path(&f.container_path) || !f.host_path.is_absolute() {
                return Err(format!(
                    "file {} -> {} is not an absolute, normalised path",
                    f.host_path.display(),
                    f.container_path.display()
                ));
            }
        }
        let nodes = self
            .control_nodes
            .iter()
            .chain(std::iter::once(&self.modeset_node))
            .chain(self.gpus.iter().map(|g| &g.node))
            .chain(
                self.gpus
                    .iter()
                    .flat_map(|g| g.mig.iter().flat_map(|m| &m.nodes)),
            );
        for n in nodes {
            let p = Path::new(&n.path);
            if !clean_container_path(p) || !p.starts_with("/dev") {
                return Err(format!("device node {} is not under /dev", n.path));
            }
        }
        Ok(())
    }

    /// Writes the cache atomically, root-only (mode 0600), creating its directory (0700).
    pub fn write(&self, path: &Path) -> Result<(), CacheError> {
        let err = |source| CacheError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(err)?;
            }
        }
        let mut data = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        data.push(b'\n');
        crate::atomic::write(path, &data, 0o600).map_err(err)
    }
}

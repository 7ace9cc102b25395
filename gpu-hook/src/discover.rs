//! The driver's files under a driver root, per capability: libraries (found through the
//! root's own `ld.so.cache`, as its loader finds them), binaries, firmware, graphics
//! configuration and IPC sockets.
//!
//! The names are those NVIDIA's `libnvidia-container` injects for each capability, so a
//! container gets the same driver parts under HyperBox as under the toolkit. Every path is
//! resolved to the real file inside the root: a container gets the file itself at the same
//! path (relative to the root) and its SONAME in the loader's cache, never a link.

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ldcache::{self, Arch};
use crate::request::Capability;

/// Library base names per capability (`libnvidia-container`'s lists, current drivers).
pub const LIBRARIES: &[(Capability, &[&str])] = &[
    (
        Capability::Utility,
        &["libnvidia-ml.so", "libnvidia-cfg.so", "libnvidia-nscq.so"],
    ),
    (
        Capability::Compute,
        &[
            "libcuda.so",
            "libcudadebugger.so",
            "libnvidia-opencl.so",
            "libnvidia-gpucomp.so",
            "libnvidia-ptxjitcompiler.so",
            "libnvidia-fatbinaryloader.so",
            "libnvidia-allocator.so",
            "libnvidia-compiler.so",
            "libnvidia-pkcs11.so",
            "libnvidia-pkcs11-openssl3.so",
            "libnvidia-nvvm.so",
        ],
    ),
    (
        Capability::Video,
        &[
            "libvdpau_nvidia.so",
            "libnvidia-encode.so",
            "libnvidia-opticalflow.so",
            "libnvcuvid.so",
        ],
    ),
    (
        Capability::Graphics,
        &[
            "libnvidia-eglcore.so",
            "libnvidia-glcore.so",
            "libnvidia-tls.so",
            "libnvidia-glsi.so",
            "libnvidia-fbc.so",
            "libnvidia-ifr.so",
            "libnvidia-rtcore.so",
            "libnvoptix.so",
            "libGLX_nvidia.so",
            "libEGL_nvidia.so",
            "libGLESv2_nvidia.so",
            "libGLESv1_CM_nvidia.so",
            "libnvidia-glvkspirv.so",
            "libnvidia-cbl.so",
            "libnvidia-egl-gbm.so",
            "libnvidia-egl-wayland.so",
        ],
    ),
    (Capability::Ngx, &["libnvidia-ngx.so"]),
];

/// Binaries per capability.
pub const BINARIES: &[(Capability, &[&str])] = &[
    (
        Capability::Utility,
        &["nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"],
    ),
    (
        Capability::Compute,
        &["nvidia-cuda-mps-control", "nvidia-cuda-mps-server"],
    ),
];

/// Where binaries are looked for, in this order.
const BINARY_DIRS: &[&str] = &["usr/bin", "usr/sbin", "bin", "sbin"];

/// Graphics configuration files (Vulkan ICD, GLVND's EGL vendor).
pub const GRAPHICS_CONFIGS: &[&str] = &[
    "usr/share/vulkan/icd.d/nvidia_icd.json",
    "etc/vulkan/icd.d/nvidia_icd.json",
    "usr/share/vulkan/implicit_layer.d/nvidia_layers.json",
    "usr/share/glvnd/egl_vendor.d/10_nvidia.json",
];

/// IPC sockets and directories, with the capability that gets them.
pub const IPC: &[(Capability, &str)] = &[
    (Capability::Utility, "run/nvidia-persistenced/socket"),
    (Capability::Compute, "run/nvidia-fabricmanager/socket"),
    (Capability::Compute, "tmp/nvidia-mps"),
];

/// What a driver file is, which decides how it is injected.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum FileKind {
    /// A shared library: mounted, and its SONAME put in the container's loader cache.
    Library {
        soname: String,
        bits: u8,
    },
    Binary,
    Firmware,
    Config,
    /// A UNIX socket (or the directory an IPC socket lives in).
    Socket,
}

/// One file of the driver a container may get.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriverFile {
    pub capability: Capability,
    pub kind: FileKind,
    /// The real file on the host (driver root included): never a link.
    pub host_path: PathBuf,
    /// Where it goes in the container: absolute, normalised, no `..`.
    pub container_path: PathBuf,
}

/// Errors finding the driver's files.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot read the driver root's loader cache {path}: {source}")]
    LdCache { path: PathBuf, source: io::Error },
    #[error("{path} resolves outside the driver root {root}")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("cannot resolve {path}: {source}")]
    Resolve { path: PathBuf, source: io::Error },
}

/// The real path of `rel` under `root` and its path relative to the root (as an absolute
/// container path), or `None` when it does not exist.
fn real_under(root: &Path, rel: &Path) -> Result<Option<(PathBuf, PathBuf)>, DiscoverError> {
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let joined = root.join(rel);
    let real = match fs::canonicalize(&joined) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DiscoverError::Resolve {
                path: joined,
                source,
            })
        }
    };
    let canonical_root = fs::canonicalize(root).map_err(|source| DiscoverError::Resolve {
        path: root.to_path_buf(),
        source,
    })?;
    let inside = real
        .strip_prefix(&canonical_root)
        .map_err(|_| DiscoverError::OutsideRoot {
            path: joined.clone(),
            root: root.to_path_buf(),
        })?;
    Ok(Some((real.clone(), Path::new("/").join(inside))))
}

/// Whether `path` is absolute, normalised and free of `..`: what a container path must be.
pub fn clean_container_path(path: &Path) -> bool {
    // `components` drops `.` and repeated slashes, so a path that differs from its own
    // components rebuilt had them.
    path.is_absolute()
        && path
            .components()
            .skip(1)
            .all(|c| matches!(c, Component::Normal(_)))
        && path.components().collect::<PathBuf>().as_os_str() == path.as_os_str()
}

/// Every driver file under `root` (`/` for a host-installed driver, or a containerised
/// driver's root), for every capability. `driver_version` names the firmware directory.
pub fn driver_files(root: &Path, driver_version: &str) -> Result<Vec<DriverFile>, DiscoverError> {
    let mut files = Vec::new();
    let cache_path = root.join("etc/ld.so.cache");
    let entries = ldcache::read_under(root).map_err(|source| DiscoverError::LdCache {
        path: cache_path,
        source,
    })?;
    for (capability, names) in LIBRARIES {
        for base in *names {
            for entry in &entries {
                // The SONAME entries (`libcuda.so.1`), not the development link
                // (`libcuda.so`), which a runtime does not need.
                let is_versioned = entry
                    .name
                    .strip_prefix(base)
                    .is_some_and(|rest| rest.starts_with('.'));
                let bits = match entry.arch() {
                    Arch::Native64 => 64,
                    Arch::Elf32 => 32,
                    Arch::Other => continue,
                };
                if !is_versioned {
                    continue;
                }
                if let Some((host_path, container_path)) = real_under(root, &entry.path)? {
                    files.push(DriverFile {
                        capability: *capability,
                        kind: FileKind::Library {
                            soname: entry.name.clone(),
                            bits,
                        },
                        host_path,
                        container_path,
                    });
                }
            }
        }
    }
    for (capability, names) in BINARIES {
        for name in *names {
            for dir in BINARY_DIRS {
                if let Some((host_path, container_path)) =
                    real_under(root, &Path::new(dir).join(name))?
                {
                    if host_path.is_file() {
                        files.push(DriverFile {
                            capability: *capability,
                            kind: FileKind::Binary,
                            host_path,
                            container_path,
                        });
                        break;
                    }
                }
            }
        }
    }
    // GSP firmware, for every capability that opens a GPU (the toolkit mounts it with the
    // utility and compute capabilities).
    // (`lib/firmware` on older layouts, `usr/lib/firmware` on merged-/usr ones; the same
    // directory on a host where `lib` links to `usr/lib`, deduplicated below.)
    for base in ["lib/firmware/nvidia", "usr/lib/firmware/nvidia"] {
        let Some((dir, container_dir)) = real_under(root, &Path::new(base).join(driver_version))?
        else {
            continue;
        };
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|source| DiscoverError::Resolve {
                path: dir.clone(),
                source,
            })?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().ends_with(".bin"))
            .collect();
        names.sort();
        for name in names {
            let host_path = dir.join(&name);
            if host_path.is_file() {
                files.push(DriverFile {
                    capability: Capability::Utility,
                    kind: FileKind::Firmware,
                    host_path,
                    container_path: container_dir.join(&name),
                });
            }
        }
    }
    for rel in GRAPHICS_CONFIGS {
        if let Some((host_path, container_path)) = real_under(root, Path::new(rel))? {
            if host_path.is_file() {
                files.push(DriverFile {
                    capability: Capability::Graphics,
                    kind: FileKind::Config,
                    host_path,
                    container_path,
                });
            }
        }
    }
    for (capability, rel) in IPC {
        if let Some((host_path, container_path)) = real_under(root, Path::new(rel))? {
            let meta =
                fs::symlink_metadata(&host_path).map_err(|source| DiscoverError::Resolve {
                    path: host_path.clone(),
                    source,
                })?;
            if meta.file_type().is_socket() || meta.is_dir() {
                files.push(DriverFile {
                    capability: *capability,
                    kind: FileKind::Socket,
                    host_path,
                    container_path,
                });
            }
        }
    }
    files.sort_by(|a, b| a.container_path.cmp(&b.container_path));
    files.dedup_by(|a, b| a.container_path == b.container_path);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_paths_must_be_clean() {
        assert!(clean_container_path(Path::new("/usr/lib/libcuda.so.1")));
        assert!(!clean_container_path(Path::new("usr/lib")));
        assert!(!clean_container_path(Path::new("/usr/../etc/passwd")));
        assert!(!clean_container_path(Path::new("/usr/./lib")));
    }

    #[test]
    fn real_paths_stay_inside_the_root() {
        let dir =
            std::env::temp_dir().join(format!("hyperbox-gpu-discover-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(root.join("usr/lib")).unwrap();
        fs::write(root.join("usr/lib/libx.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", root.join("usr/lib/libx.so.1")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("usr/lib/out")).unwrap();
        let (host, container) = real_under(&root, Path::new("/usr/lib/libx.so.1"))
            .unwrap()
            .unwrap();
        assert_eq!(
            host,
            fs::canonicalize(root.join("usr/lib/libx.so.1.2")).unwrap()
        );
        assert_eq!(container, Path::new("/usr/lib/libx.so.1.2"));
        assert!(matches!(
            real_under(&root, Path::new("usr/lib/out")),
            Err(DiscoverError::OutsideRoot { .. })
        ));
        assert!(real_under(&root, Path::new("usr/lib/absent"))
            .unwrap()
            .is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}

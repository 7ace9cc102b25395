//! The CDI spec (`nvidia.com/gpu`) the generator writes for runtimes that read CDI
//! (containerd's CRI with `enable_cdi`, Docker's `--device nvidia.com/gpu=0`, Podman).
//!
//! Devices by NVML index (GPUs ordered by PCI bus id, as NVML numbers them), by UUID, and
//! `all`; the nodes every GPU container needs (`nvidiactl`, UVM) in the spec's common
//! edits. The spec says the lowest `cdiVersion` whose rules it meets (device names starting
//! with a digit need 0.5.0, host paths on device nodes 0.5.0, mount types 0.4.0), and is
//! written atomically so a runtime never reads half of it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::driver::{DeviceNode, DriverProc};

/// The kind of every device here.
pub const KIND: &str = "nvidia.com/gpu";

/// Errors making or writing a spec.
#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("{0:?} is not a CDI device name (a letter or digit, then letters, digits, '_', '-', '.', ':')")]
    BadName(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot encode the spec: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A device node edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CdiDeviceNode {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub major: u32,
    pub minor: u32,
    pub permissions: String,
}

impl From<&DeviceNode> for CdiDeviceNode {
    fn from(n: &DeviceNode) -> Self {
        CdiDeviceNode {
            path: n.path.clone(),
            kind: "c".into(),
            major: n.major,
            minor: n.minor,
            permissions: "rw".into(),
        }
    }
}

/// A mount edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiMount {
    pub host_path: String,
    pub container_path: String,
    pub options: Vec<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// What a device (or the whole spec) changes in a container's OCI spec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<CdiDeviceNode>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<CdiMount>,
}

/// One named device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiDevice {
    pub name: String,
    pub container_edits: ContainerEdits,
}

/// A whole spec file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiSpec {
    pub cdi_version: String,
    pub kind: String,
    pub devices: Vec<CdiDevice>,
    pub container_edits: ContainerEdits,
}

/// Whether `name` is a valid CDI device name.
pub fn valid_device_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
}

impl CdiSpec {
    /// The spec for the GPUs `driver` lists: per GPU a device by index and one by UUID,
    /// and `all`; the control nodes as common edits.
    pub fn for_driver(driver: &DriverProc) -> Result<Self, CdiError> {
        let mut devices = Vec::new();
        let mut all_nodes = Vec::new();
        for (index, gpu) in driver.gpus.iter().enumerate() {
            let node = CdiDeviceNode::from(&DriverProc::gpu_node(gpu));
            all_nodes.push(node.clone());
            for name in [index.to_string(), gpu.uuid.clone()] {
                devices.push(CdiDevice {
                    name,
                    container_edits: ContainerEdits {
                        device_nodes: vec![node.clone()],
                        ..Default::default()
                    },
                });
            }
        }
        devices.push(CdiDevice {
            name: "all".into(),
            container_edits: ContainerEdits {
                device_nodes: all_nodes,
                ..Default::default()
            },
        });
        for d in &devices {
            if !valid_device_name(&d.name) {
                return Err(CdiError::BadName(d.name.clone()));
            }
        }
        let mut spec = CdiSpec {
            cdi_version: String::new(),
            kind: KIND.into(),
            devices,
            container_edits: ContainerEdits {
                device_nodes: driver
                    .control_nodes()
                    .iter()
                    .map(CdiDeviceNode::from)
                    .collect(),
                ..Default::default()
            },
        };
        spec.cdi_version = spec.minimum_version().into();
        Ok(spec)
    }

    /// The lowest `cdiVersion` this spec's content is valid in.
    pub fn minimum_version(&self) -> &'static str {
        let edits = self
            .devices
            .iter()
            .map(|d| &d.container_edits)
            .chain(std::iter::once(&self.container_edits));
        let mut needs_040 = false;
        for e in edits {
            if e.mounts.iter().any(|m| m.kind.is_some()) {
                needs_040 = true;
            }
        }
        let digit_first = self
            .devices
            .iter()
            .any(|d| d.name.starts_with(|c: char| !c.is_ascii_alphabetic()));
        if digit_first {
            "0.5.0"
        } else if needs_040 {
            "0.4.0"
        } else {
            "0.3.0"
        }
    }

    /// Writes the spec as JSON to `path` atomically (a temporary file in the same directory,
    /// synced, then renamed over it), mode 0644.
    pub fn write_atomically(&self, path: &Path) -> Result<(), CdiError> {
        let err = |source| CdiError::Write {
            path: path.to_path_buf(),
            source,
        };
        let mut text = serde_json::to_vec_pretty(self)?;
        text.push(b'\n');
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let tmp = dir.join(format!(".{}.tmp", name.unwrap_or_default()));
        // Whatever is at the temporary name (a leftover, or a link planted there) is removed,
        // not followed, and the file is made afresh.
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(&text).map_err(err)?;
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, path).map_err(err)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::GpuInfo;

    fn driver(gpus: usize, uvm: bool) -> DriverProc {
        let mut majors = std::collections::BTreeMap::new();
        if uvm {
            majors.insert("nvidia-uvm".to_owned(), 237);
        }
        DriverProc {
            version: "550.54.15".parse().unwrap(),
            gpus: (0..gpus)
                .map(|i| GpuInfo {
                    model: "Tesla T4".into(),
                    uuid: format!("GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd"),
                    bus_id: format!("00000000:{:02x}:00.0", 0x3b + i),
                    minor: i as u32,
                    excluded: false,
                })
                .collect(),
            char_majors: majors,
            mig_minors: Vec::new(),
        }
    }

    #[test]
    fn two_gpus_give_index_uuid_and_all_devices() {
        let spec = CdiSpec::for_driver(&driver(2, true)).unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        let expected = serde_json::json!({
            "cdiVersion": "0.5.0",
            "kind": "nvidia.com/gpu",
            "devices": [
                {"name": "0", "containerEdits": {"deviceNodes": [
                    {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "permissions": "rw"}]}},
                {"name": "GPU-00000000-aaaa-bbbb-cccc-dddddddddddd", "containerEdits": {"deviceNodes": [
                    {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "permissions": "rw"}]}},
                {"name": "1", "containerEdits": {"deviceNodes": [
                    {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "permissions": "rw"}]}},
                {"name": "GPU-00000001-aaaa-bbbb-cccc-dddddddddddd", "containerEdits": {"deviceNodes": [
                    {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "permissions": "rw"}]}},
                {"name": "all", "containerEdits": {"deviceNodes": [
                    {"path": "/dev/nvidia0", "type": "c", "major": 195, "minor": 0, "permissions": "rw"},
                    {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "permissions": "rw"}]}}
            ],
            "containerEdits": {"deviceNodes": [
                {"path": "/dev/nvidiactl", "type": "c", "major": 195, "minor": 255, "permissions": "rw"},
                {"path": "/dev/nvidia-uvm", "type": "c", "major": 237, "minor": 0, "permissions": "rw"},
                {"path": "/dev/nvidia-uvm-tools", "type": "c", "major": 237, "minor": 1, "permissions": "rw"}
            ]}
        });
        assert_eq!(json, expected);
    }

    #[test]
    fn the_version_is_the_lowest_the_content_allows() {
        // No GPU: only `all`, a name starting with a letter, no mount types: 0.3.0.
        let mut spec = CdiSpec::for_driver(&driver(0, false)).unwrap();
        assert_eq!(spec.cdi_version, "0.3.0");
        spec.container_edits.mounts.push(CdiMount {
            host_path: "/usr/lib/libcuda.so.1".into(),
            container_path: "/usr/lib/libcuda.so.1".into(),
            options: vec!["ro".into(), "nosuid".into(), "nodev".into(), "bind".into()],
            kind: Some("bind".into()),
        });
        assert_eq!(spec.minimum_version(), "0.4.0");
        assert_eq!(
            CdiSpec::for_driver(&driver(1, false)).unwrap().cdi_version,
            "0.5.0"
        );
    }

    #[test]
    fn device_names_are_checked() {
        for good in ["0", "all", "GPU-abc", "0:1", "MIG-x_y.z"] {
            assert!(valid_device_name(good), "{good}");
        }
        for bad in ["", "-0", "a/b", "a b", "../x", "é"] {
            assert!(!valid_device_name(bad), "{bad}");
        }
        let mut d = driver(1, false);
        d.gpus[0].uuid = "GPU-../x".into();
        assert!(matches!(
            CdiSpec::for_driver(&d),
            Err(CdiError::BadName(n)) if n == "GPU-../x"
        ));
    }

    #[test]
    fn written_atomically_and_readable_by_all() {
        let dir = std::env::temp_dir().join(format!("hb-cdi-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nvidia.json");
        fs::write(&path, "stale").unwrap();
        let spec = CdiSpec::for_driver(&driver(1, true)).unwrap();
        spec.write_atomically(&path).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, serde_json::to_value(&spec).unwrap());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("nvidia.json")]);
        // A link planted at the temporary name is replaced, not followed.
        let victim = dir.join("victim");
        fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join(".nvidia.json.tmp")).unwrap();
        spec.write_atomically(&path).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!dir.join(".nvidia.json.tmp").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}

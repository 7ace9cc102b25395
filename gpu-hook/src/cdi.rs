//! The CDI spec (`nvidia.com/gpu`) the generator writes for runtimes that read CDI
//! (containerd's CRI with `enable_cdi`, Docker's `--device nvidia.com/gpu=0`, Podman).
//!
//! Devices by NVML index (GPUs ordered by PCI bus id, as NVML numbers them), by UUID, each
//! MIG device as `GPU:MIG` and by its UUID, and `all`. The common edits carry what every GPU
//! container needs: the control nodes (`nvidiactl`, UVM), the driver's files as read-only
//! bind mounts, `NVIDIA_VISIBLE_DEVICES=void` (so that a legacy hook, or our shim, does not
//! inject a second time) and `hyperbox-gpu-hook ldcache` as a `createContainer` hook, which
//! writes the loader's cache for the mounted libraries. The spec says the lowest
//! `cdiVersion` whose rules it meets (device names starting with a digit and device nodes
//! with a host path need 0.5.0, mount types 0.4.0), and is written atomically so a runtime
//! never reads half of it.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::cache::NodeCache;
use crate::driver::DeviceNode;

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
    /// The node on the host, where it is not `path` (a test's fake `/dev`).
    #[serde(rename = "hostPath", skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
}

impl CdiDeviceNode {
    /// The edit for `n`, whose host node is under `dev_root` (`/` on a real node).
    fn new(n: &DeviceNode, dev_root: &Path) -> Self {
        let host = dev_root.join(n.path.trim_start_matches('/'));
        CdiDeviceNode {
            path: n.path.clone(),
            kind: "c".into(),
            major: n.major,
            minor: n.minor,
            permissions: "rw".into(),
            host_path: (host != Path::new(&n.path)).then(|| host.display().to_string()),
        }
    }
}

/// A hook edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CdiHook {
    pub hook_name: String,
    pub path: String,
    pub args: Vec<String>,
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<CdiHook>,
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
    /// The spec for the node `cache` describes; device nodes on the host under `dev_root`,
    /// the hook at `hook` reading `cache_path`.
    pub fn for_node(
        cache: &NodeCache,
        dev_root: &Path,
        hook: &Path,
        cache_path: &Path,
    ) -> Result<Self, CdiError> {
        let node = |n: &DeviceNode| CdiDeviceNode::new(n, dev_root);
        let device = |name: String, nodes: Vec<CdiDeviceNode>| CdiDevice {
            name,
            container_edits: ContainerEdits {
                device_nodes: nodes,
                ..Default::default()
            },
        };
        let mut devices = Vec::new();
        let mut all_nodes = Vec::new();
        for gpu in &cache.gpus {
            let gpu_node = node(&gpu.node);
            all_nodes.push(gpu_node.clone());
            devices.push(device(gpu.index.to_string(), vec![gpu_node.clone()]));
            devices.push(device(gpu.uuid.clone(), vec![gpu_node.clone()]));
            for mig in &gpu.mig {
                let mut nodes = vec![gpu_node.clone()];
                nodes.extend(mig.nodes.iter().map(node));
                devices.push(device(
                    format!("{}:{}", gpu.index, mig.index),
                    nodes.clone(),
                ));
                devices.push(device(mig.uuid.clone(), nodes));
            }
        }
        devices.push(device("all".into(), all_nodes));
        for d in &devices {
            if !valid_device_name(&d.name) {
                return Err(CdiError::BadName(d.name.clone()));
            }
        }
        let mounts = cache
            .files
            .iter()
            .map(|f| CdiMount {
                host_path: f.host_path.display().to_string(),
                container_path: f.container_path.display().to_string(),
                options: ["ro", "nosuid", "nodev", "rbind", "rprivate"]
                    .map(String::from)
                    .to_vec(),
                kind: None,
            })
            .collect();
        let mut spec = CdiSpec {
            cdi_version: String::new(),
            kind: KIND.into(),
            devices,
            container_edits: ContainerEdits {
                env: vec![format!("{}=void", crate::request::VISIBLE_DEVICES)],
                device_nodes: cache.control_nodes.iter().map(node).collect(),
                mounts,
                hooks: vec![CdiHook {
                    hook_name: "createContainer".into(),
                    path: hook.display().to_string(),
                    args: vec![
                        "hyperbox-gpu-hook".into(),
                        "--cache".into(),
                        cache_path.display().to_string(),
                        "ldcache".into(),
                    ],
                }],
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
        let mut needs_050 = false;
        for e in edits {
            if e.mounts.iter().any(|m| m.kind.is_some()) {
                needs_040 = true;
            }
            if e.device_nodes.iter().any(|n| n.host_path.is_some()) {
                needs_050 = true;
            }
        }
        let digit_first = self
            .devices
            .iter()
            .any(|d| d.name.starts_with(|c: char| !c.is_ascii_alphabetic()));
        if digit_first || needs_050 {
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
        crate::atomic::write(path, &text, 0o644).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::two_gpus;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn spec(cache: &NodeCache) -> CdiSpec {
        CdiSpec::for_node(
            cache,
            Path::new("/"),
            Path::new("/usr/local/bin/hyperbox-gpu-hook"),
            Path::new("/run/hyperbox/gpu/cache.json"),
        )
        .unwrap()
    }

    #[test]
    fn devices_by_index_uuid_mig_and_all() {
        let json = serde_json::to_value(spec(&two_gpus())).unwrap();
        let names: Vec<&str> = json["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "0",
                "GPU-01111111-2222-3333-4444-555555555555",
                "1",
                "GPU-11111111-2222-3333-4444-555555555555",
                "1:0",
                "MIG-0aaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                "1:1",
                "MIG-1aaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
                "all"
            ]
        );
        assert_eq!(
            json["devices"][6]["containerEdits"]["deviceNodes"],
            serde_json::json!([
                {"path": "/dev/nvidia1", "type": "c", "major": 195, "minor": 1, "permissions": "rw"},
                {"path": "/dev/nvidia-caps/nvidia-cap20", "type": "c", "major": 236, "minor": 20, "permissions": "rw"},
                {"path": "/dev/nvidia-caps/nvidia-cap21", "type": "c", "major": 236, "minor": 21, "permissions": "rw"}
            ])
        );
        let common = &json["containerEdits"];
        assert_eq!(
            common["env"],
            serde_json::json!(["NVIDIA_VISIBLE_DEVICES=void"])
        );
        assert_eq!(common["deviceNodes"][0]["path"], "/dev/nvidiactl");
        assert_eq!(common["mounts"].as_array().unwrap().len(), 5);
        assert_eq!(
            common["mounts"][0],
            serde_json::json!({"hostPath": "/drv/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "options": ["ro", "nosuid", "nodev", "rbind", "rprivate"]})
        );
        assert_eq!(
            common["hooks"],
            serde_json::json!([{"hookName": "createContainer",
                "path": "/usr/local/bin/hyperbox-gpu-hook",
                "args": ["hyperbox-gpu-hook", "--cache", "/run/hyperbox/gpu/cache.json", "ldcache"]}])
        );
    }

    #[test]
    fn the_version_is_the_lowest_the_content_allows() {
        // No GPU: only `all`, a name starting with a letter, no mount types: 0.3.0.
        let mut cache = two_gpus();
        cache.gpus.clear();
        let mut s = spec(&cache);
        assert_eq!(s.cdi_version, "0.3.0");
        s.container_edits.mounts[0].kind = Some("bind".into());
        assert_eq!(s.minimum_version(), "0.4.0");
        // A fake /dev: host paths on the nodes.
        let fake = CdiSpec::for_node(
            &cache,
            Path::new("/tmp/fake"),
            Path::new("/h"),
            Path::new("/c"),
        )
        .unwrap();
        assert_eq!(fake.cdi_version, "0.5.0");
        assert_eq!(
            fake.container_edits.device_nodes[0].host_path.as_deref(),
            Some("/tmp/fake/dev/nvidiactl")
        );
        assert_eq!(spec(&two_gpus()).cdi_version, "0.5.0");
    }

    #[test]
    fn device_names_are_checked() {
        for good in ["0", "all", "GPU-abc", "0:1", "MIG-x_y.z"] {
            assert!(valid_device_name(good), "{good}");
        }
        for bad in ["", "-0", "a/b", "a b", "../x", "é"] {
            assert!(!valid_device_name(bad), "{bad}");
        }
        let mut cache = two_gpus();
        cache.gpus[0].uuid = "GPU-../x".into();
        assert!(matches!(
            CdiSpec::for_node(&cache, Path::new("/"), Path::new("/h"), Path::new("/c")),
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
        let spec = spec(&two_gpus());
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

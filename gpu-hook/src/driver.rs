//! What the NVIDIA kernel driver tells about itself in `/proc`, without NVML: its version,
//! each GPU (model, UUID, PCI bus location, device minor), the character device majors, and
//! MIG capability minors; and from those, the device nodes a container needs.
//!
//! Everything is read under a proc root given by the caller (`/proc` on a node, a fake one
//! in tests): `driver/nvidia/version`, `driver/nvidia/gpus/<bus>/information`, `devices`,
//! `driver/nvidia-caps/mig-minors`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::version::Version;

/// The major of `/dev/nvidia<N>`, `/dev/nvidiactl` and `/dev/nvidia-modeset`, fixed by the
/// driver (registered as `nvidia-frontend` or `nvidia`).
pub const NVIDIA_MAJOR: u32 = 195;
/// The minor of `/dev/nvidiactl`.
pub const CTL_MINOR: u32 = 255;
/// The minor of `/dev/nvidia-modeset`.
pub const MODESET_MINOR: u32 = 254;

/// Errors reading the driver's proc files.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("no NVIDIA driver: {path} does not exist (is the nvidia module loaded?)")]
    NoDriver { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: {what}")]
    Parse { path: PathBuf, what: String },
}

/// One GPU, from `driver/nvidia/gpus/<bus>/information`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub model: String,
    /// `GPU-…`, lowercase after the prefix (as `NVIDIA_VISIBLE_DEVICES` is matched).
    pub uuid: String,
    /// NVML's extended form, lowercase: `00000000:3b:00.0`.
    pub bus_id: String,
    /// The minor of `/dev/nvidia<minor>`.
    pub minor: u32,
    /// Excluded by the administrator (`NVreg_ExcludedGpus`): never given to containers.
    pub excluded: bool,
}

impl GpuInfo {
    /// Parses an `information` file (`Key: value` lines).
    pub fn parse(text: &str) -> Result<Self, String> {
        let field = |key: &str| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_owned())
            })
        };
        let need = |key: &str| field(key).ok_or_else(|| format!("no {key:?} line"));
        let uuid = need("GPU UUID")?;
        let uuid = match uuid.get(..4) {
            Some(p) if p.eq_ignore_ascii_case("GPU-") => {
                format!("GPU-{}", uuid[4..].to_ascii_lowercase())
            }
            _ => return Err(format!("GPU UUID {uuid:?} does not start with GPU-")),
        };
        let minor = need("Device Minor")?;
        let minor = minor
            .parse()
            .map_err(|_| format!("Device Minor {minor:?} is not a number"))?;
        Ok(GpuInfo {
            model: need("Model")?,
            uuid,
            bus_id: need("Bus Location")?.to_ascii_lowercase(),
            minor,
            excluded: field("GPU Excluded").is_some_and(|v| v.eq_ignore_ascii_case("yes")),
        })
    }
}

/// The driver's version from `driver/nvidia/version`: the first dotted number after
/// `Kernel Module` (`NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue ...`, or
/// `... Open Kernel Module for x86_64  550.54.15 ...`).
pub fn parse_driver_version(text: &str) -> Option<Version> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    let after = &line[line.find("Kernel Module")? + "Kernel Module".len()..];
    after
        .split_whitespace()
        .find(|w| w.contains('.') && w.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
        .and_then(|w| w.parse().ok())
}

/// Character device majors by name, from the `Character devices:` part of `devices`.
pub fn parse_char_majors(text: &str) -> BTreeMap<String, u32> {
    text.lines()
        .skip_while(|l| l.trim() != "Character devices:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty() && !l.ends_with(':'))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let major = parts.next()?.parse().ok()?;
            Some((parts.next()?.to_owned(), major))
        })
        .collect()
}

/// `driver/nvidia-caps/mig-minors`: `NAME MINOR` lines (`config 1`, `gpu0/gi1/access 12`).
pub fn parse_mig_minors(text: &str) -> Vec<(String, u32)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next()?.to_owned();
            let minor = parts.next()?.parse().ok()?;
            parts.next().is_none().then_some((name, minor))
        })
        .collect()
}

/// A character device node a container may need.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNode {
    /// Where it lives, on the host and in the container (`/dev/nvidia0`).
    pub path: String,
    pub major: u32,
    pub minor: u32,
}

/// What the driver's proc files say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverProc {
    pub version: Version,
    /// By PCI bus id order, excluded GPUs left out.
    pub gpus: Vec<GpuInfo>,
    pub char_majors: BTreeMap<String, u32>,
    /// MIG capability files and their minors (empty without MIG support).
    pub mig_minors: Vec<(String, u32)>,
}

impl DriverProc {
    /// Reads the files under `proc_root`; no driver (no `driver/nvidia/version`) is
    /// [`DriverError::NoDriver`].
    pub fn read(proc_root: &Path) -> Result<Self, DriverError> {
        let read = |rel: &str| {
            let path = proc_root.join(rel);
            fs::read_to_string(&path).map_err(|source| DriverError::Read { path, source })
        };
        let version_path = proc_root.join("driver/nvidia/version");
        if !version_path.exists() {
            return Err(DriverError::NoDriver { path: version_path });
        }
        let version_text = read("driver/nvidia/version")?;
        let version = parse_driver_version(&version_text).ok_or_else(|| DriverError::Parse {
            path: version_path.clone(),
            what: format!("no driver version in {version_text:?}"),
        })?;
        let gpus_dir = proc_root.join("driver/nvidia/gpus");
        let mut gpus = Vec::new();
        if gpus_dir.exists() {
            let entries = fs::read_dir(&gpus_dir).map_err(|source| DriverError::Read {
                path: gpus_dir.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| DriverError::Read {
                    path: gpus_dir.clone(),
                    source,
                })?;
                let path = entry.path().join("information");
                let text = fs::read_to_string(&path).map_err(|source| DriverError::Read {
                    path: path.clone(),
                    source,
                })?;
                let gpu =
                    GpuInfo::parse(&text).map_err(|what| DriverError::Parse { path, what })?;
                if !gpu.excluded {
                    gpus.push(gpu);
                }
            }
        }
        gpus.sort_by(|a, b| a.bus_id.cmp(&b.bus_id));
        let char_majors = parse_char_majors(&read("devices")?);
        let mig_path = proc_root.join("driver/nvidia-caps/mig-minors");
        let mig_minors = if mig_path.exists() {
            parse_mig_minors(&read("driver/nvidia-caps/mig-minors")?)
        } else {
            Vec::new()
        };
        Ok(DriverProc {
            version,
            gpus,
            char_majors,
            mig_minors,
        })
    }

    /// The nodes every GPU container gets: `nvidiactl`, and `nvidia-uvm` and
    /// `nvidia-uvm-tools` when the UVM module is loaded (`nvidia-modeset` only with the
    /// `display` capability, so not here).
    pub fn control_nodes(&self) -> Vec<DeviceNode> {
        let mut nodes = vec![DeviceNode {
            path: "/dev/nvidiactl".into(),
            major: NVIDIA_MAJOR,
            minor: CTL_MINOR,
        }];
        if let Some(&uvm) = self.char_majors.get("nvidia-uvm") {
            nodes.push(DeviceNode {
                path: "/dev/nvidia-uvm".into(),
                major: uvm,
                minor: 0,
            });
            nodes.push(DeviceNode {
                path: "/dev/nvidia-uvm-tools".into(),
                major: uvm,
                minor: 1,
            });
        }
        nodes
    }

    /// `/dev/nvidia-modeset`, for the `display` capability.
    pub fn modeset_node(&self) -> DeviceNode {
        DeviceNode {
            path: "/dev/nvidia-modeset".into(),
            major: NVIDIA_MAJOR,
            minor: MODESET_MINOR,
        }
    }

    /// `/dev/nvidia<minor>` of `gpu`.
    pub fn gpu_node(gpu: &GpuInfo) -> DeviceNode {
        Self::gpu_node_for(gpu.minor)
    }

    /// `/dev/nvidia<minor>`.
    pub fn gpu_node_for(minor: u32) -> DeviceNode {
        DeviceNode {
            path: format!("/dev/nvidia{minor}"),
            major: NVIDIA_MAJOR,
            minor,
        }
    }

    /// `/dev/nvidia-caps/nvidia-cap<minor>` of MIG capability `name` (`gpu0/gi1/access`),
    /// when the `nvidia-caps` major is registered and the capability exists.
    pub fn mig_cap_node(&self, name: &str) -> Option<DeviceNode> {
        let major = *self.char_majors.get("nvidia-caps")?;
        let (_, minor) = self.mig_minors.iter().find(|(n, _)| n == name)?;
        Some(DeviceNode {
            path: format!("/dev/nvidia-caps/nvidia-cap{minor}"),
            major,
            minor: *minor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T4: &str = "Model: \t\t Tesla T4\nIRQ:   \t\t 139\nGPU UUID: \t GPU-2B6F3D4C-1111-2222-3333-444455556666\nVideo BIOS: \t 90.04.38.00.03\nBus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\nBus Location: \t 0000:3B:00.0\nDevice Minor: \t 0\nGPU Excluded:\t No\n";

    const DEVICES: &str = "Character devices:\n  1 mem\n  4 /dev/vc/0\n195 nvidia-frontend\n236 nvidia-caps\n237 nvidia-uvm\n\nBlock devices:\n  7 loop\n237 not-a-char\n";

    fn fake_proc(dir: &Path, gpus: &[(&str, &str)], with_uvm: bool) {
        fs::create_dir_all(dir.join("driver/nvidia")).unwrap();
        fs::write(
            dir.join("driver/nvidia/version"),
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n",
        )
        .unwrap();
        for (bus, info) in gpus {
            let d = dir.join("driver/nvidia/gpus").join(bus);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("information"), info).unwrap();
        }
        let devices = if with_uvm {
            DEVICES.to_owned()
        } else {
            DEVICES.replace("237 nvidia-uvm\n", "")
        };
        fs::write(dir.join("devices"), devices).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hb-gpu-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn reads_a_gpu_information_file() {
        let gpu = GpuInfo::parse(T4).unwrap();
        assert_eq!(
            gpu,
            GpuInfo {
                model: "Tesla T4".into(),
                uuid: "GPU-2b6f3d4c-1111-2222-3333-444455556666".into(),
                bus_id: "0000:3b:00.0".into(),
                minor: 0,
                excluded: false,
            }
        );
        assert!(GpuInfo::parse(&T4.replace("No", "Yes")).unwrap().excluded);
        let err = GpuInfo::parse(&T4.replace("Device Minor", "Minor")).unwrap_err();
        assert!(err.contains("Device Minor"), "{err}");
        let err = GpuInfo::parse(&T4.replace("GPU-2B6F", "XYZ-2B6F")).unwrap_err();
        assert!(err.contains("GPU-"), "{err}");
    }

    #[test]
    fn reads_the_driver_version_of_both_module_flavours() {
        let proprietary = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n";
        assert_eq!(
            parse_driver_version(proprietary),
            Some("535.104.05".parse().unwrap())
        );
        let open =
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build\n";
        assert_eq!(
            parse_driver_version(open),
            Some("550.54.15".parse().unwrap())
        );
        assert_eq!(parse_driver_version("GCC version: 12.2.0\n"), None);
    }

    #[test]
    fn reads_character_majors_only() {
        let majors = parse_char_majors(DEVICES);
        assert_eq!(majors.get("nvidia-uvm"), Some(&237));
        assert_eq!(majors.get("nvidia-caps"), Some(&236));
        assert_eq!(majors.get("nvidia-frontend"), Some(&195));
        assert_eq!(majors.get("not-a-char"), None);
        assert_eq!(majors.get("loop"), None);
    }

    #[test]
    fn reads_mig_minors() {
        let minors = parse_mig_minors("config 1\nmonitor 2\ngpu0/gi1/access 12\nbad line here\n\n");
        assert_eq!(
            minors,
            vec![
                ("config".to_owned(), 1),
                ("monitor".to_owned(), 2),
                ("gpu0/gi1/access".to_owned(), 12)
            ]
        );
    }

    #[test]
    fn reads_a_fake_proc_root() {
        let dir = scratch("proc");
        let second = T4
            .replace("0000:3B:00.0", "0000:AF:00.0")
            .replace("Device Minor: \t 0", "Device Minor: \t 1")
            .replace("2B6F3D4C", "99999999");
        let excluded = T4
            .replace("0000:3B:00.0", "0000:5E:00.0")
            .replace("GPU Excluded:\t No", "GPU Excluded:\t Yes");
        fake_proc(
            &dir,
            &[
                ("0000:af:00.0", &second),
                ("0000:3b:00.0", T4),
                ("0000:5e:00.0", &excluded),
            ],
            true,
        );
        fs::create_dir_all(dir.join("driver/nvidia-caps")).unwrap();
        fs::write(
            dir.join("driver/nvidia-caps/mig-minors"),
            "config 1\nmonitor 2\ngpu0/gi1/access 12\n",
        )
        .unwrap();
        let proc = DriverProc::read(&dir).unwrap();
        assert_eq!(proc.version, "550.54.15".parse().unwrap());
        let buses: Vec<&str> = proc.gpus.iter().map(|g| g.bus_id.as_str()).collect();
        assert_eq!(buses, ["0000:3b:00.0", "0000:af:00.0"], "excluded left out");
        let nodes: Vec<String> = proc
            .control_nodes()
            .iter()
            .map(|n| format!("{} {}:{}", n.path, n.major, n.minor))
            .collect();
        assert_eq!(
            nodes,
            [
                "/dev/nvidiactl 195:255",
                "/dev/nvidia-uvm 237:0",
                "/dev/nvidia-uvm-tools 237:1"
            ]
        );
        assert_eq!(DriverProc::gpu_node(&proc.gpus[1]).path, "/dev/nvidia1");
        assert_eq!(
            proc.mig_cap_node("gpu0/gi1/access"),
            Some(DeviceNode {
                path: "/dev/nvidia-caps/nvidia-cap12".into(),
                major: 236,
                minor: 12
            })
        );
        assert_eq!(proc.mig_cap_node("gpu0/gi9/access"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_uvm_module_no_uvm_nodes_and_no_driver_is_said() {
        let dir = scratch("nouvm");
        fake_proc(&dir, &[("0000:3b:00.0", T4)], false);
        let proc = DriverProc::read(&dir).unwrap();
        assert_eq!(proc.control_nodes().len(), 1);
        assert!(proc.mig_minors.is_empty());
        fs::remove_dir_all(&dir).unwrap();

        let empty = scratch("nodriver");
        fs::create_dir_all(&empty).unwrap();
        let err = DriverProc::read(&empty).unwrap_err();
        assert!(matches!(err, DriverError::NoDriver { .. }), "{err}");
        assert!(err.to_string().contains("nvidia module"), "{err}");
        fs::remove_dir_all(&empty).unwrap();
    }
}

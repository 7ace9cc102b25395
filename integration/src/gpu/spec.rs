//! What a fake driver describes: its version, GPUs and MIG devices ([`FakeDriverSpec`]), the
//! libraries and device nodes that follow from them, and the driver's fixed tables (models,
//! PCI ids, CUDA versions, MIG capability minors).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{FakeDriverError, LIB32_DIR, LIB64_DIR};

/// The MIG capability minors the driver reserves: `gpu0` to `gpu31`, GPU instances `gi0` to
/// `gi14`, compute instances `ci0` to `ci7`.
const MIG_MAX_GPUS: u32 = 32;
const MIG_MAX_GI: u32 = 15;
const MIG_MAX_CI: u32 = 8;

/// What the fake driver describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeDriverSpec {
    /// The driver version (`550.54.15`): library suffixes, firmware directory, proc files,
    /// NVML's answer.
    pub version: String,
    /// The GPUs, in any order (NVML numbers them in PCI bus order).
    pub gpus: Vec<FakeGpu>,
}

/// One GPU of a [`FakeDriverSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeGpu {
    /// NVML's name (`NVIDIA A100-SXM4-40GB`), also the proc file's `Model`.
    pub name: String,
    /// `GPU-…`, lowercase hex as NVML gives it.
    pub uuid: String,
    /// The PCI bus id in NVML's form (`00000000:3B:00.0`; any case, 4- or 8-digit domain).
    pub bus_id: String,
    /// The minor of `/dev/nvidia<minor>`.
    pub minor: u32,
    /// NVML's `nvmlBrandType_t` number (2 Tesla, 5 GeForce, 14 NVIDIA: data-centre GPUs on
    /// current drivers).
    pub brand: u32,
    pub compute_capability: (u32, u32),
    /// `Some`: MIG mode enabled, with these MIG devices (NVML's MIG indices in this order).
    /// `None`: MIG mode disabled, on a model that supports MIG (A100, A30, H100, …: the fake
    /// NVML answers its MIG mode as disabled) or not MIG capable (any other name: the fake
    /// NVML answers `NVML_ERROR_NOT_SUPPORTED`).
    pub mig: Option<Vec<FakeMig>>,
}

/// One MIG device of a [`FakeGpu`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeMig {
    /// `MIG-…`.
    pub uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// A library of the fake driver root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeLibrary {
    /// The driver capability it belongs to: `utility`, `compute`, `video`, `graphics`, `ngx`.
    pub capability: &'static str,
    /// The real file, relative to the driver root (`usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15`).
    pub file: PathBuf,
    /// Its SONAME (`libcuda.so.1`), also the link next to the file.
    pub soname: String,
    /// 64-bit (`libc6,x86-64` in the cache) or 32-bit (`libc6`).
    pub sixty_four: bool,
}

impl FakeLibrary {
    /// The SONAME link, relative to the driver root.
    pub fn link(&self) -> PathBuf {
        self.file.with_file_name(&self.soname)
    }
}

/// A device node of the fake device root.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FakeNode {
    /// The path on a node and in a container (`/dev/nvidia0`); under the device root it is
    /// `dev_root().join(path without its leading /)`.
    pub path: String,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (0o666; MIG `config` 0o400, other capabilities 0o444).
    pub mode: u32,
}

/// The libraries: (capability, name stem, SONAME major, 64-bit).
const LIBRARIES: &[(&str, &str, u32, bool)] = &[
    ("utility", "libnvidia-ml", 1, true),
    ("utility", "libnvidia-cfg", 1, true),
    ("compute", "libcuda", 1, true),
    ("compute", "libnvidia-opencl", 1, true),
    ("compute", "libnvidia-ptxjitcompiler", 1, true),
    ("compute", "libnvidia-nvvm", 1, true),
    ("compute", "libcudadebugger", 1, true),
    ("video", "libnvidia-encode", 1, true),
    ("video", "libnvcuvid", 1, true),
    ("video", "libvdpau_nvidia", 1, true),
    ("graphics", "libnvidia-eglcore", 1, true),
    ("graphics", "libnvidia-glcore", 1, true),
    ("graphics", "libnvidia-tls", 1, true),
    ("graphics", "libGLX_nvidia", 0, true),
    ("graphics", "libEGL_nvidia", 0, true),
    ("ngx", "libnvidia-ngx", 1, true),
    ("compute", "libcuda", 1, false),
    ("utility", "libnvidia-ml", 1, false),
    ("graphics", "libGLX_nvidia", 0, false),
];

/// Models that support MIG (by name), and their maximum MIG device count.
const MIG_CAPABLE: &[(&str, u32)] = &[
    ("A100", 7),
    ("A800", 7),
    ("A30", 4),
    ("H100", 7),
    ("H800", 7),
    ("H200", 7),
    ("GH200", 7),
    ("B200", 7),
];

/// PCI device ids (`device << 16 | 0x10de`) by model name.
const PCI_DEVICE_IDS: &[(&str, u32)] = &[
    ("A100-SXM4-40GB", 0x20B0_10DE),
    ("A100-SXM4-80GB", 0x20B2_10DE),
    ("A100-PCIE-40GB", 0x20F1_10DE),
    ("A100 80GB PCIe", 0x20B5_10DE),
    ("A30", 0x20B7_10DE),
    ("H100 80GB HBM3", 0x2330_10DE),
    ("H100 PCIe", 0x2331_10DE),
    ("Tesla T4", 0x1EB8_10DE),
    ("L4", 0x27B8_10DE),
];

/// The CUDA version (`1000 * major + 10 * minor`) of each driver branch.
const CUDA_VERSIONS: &[(u32, i32)] = &[
    (450, 11000),
    (455, 11010),
    (460, 11020),
    (465, 11030),
    (470, 11040),
    (495, 11050),
    (510, 11060),
    (515, 11070),
    (520, 11080),
    (525, 12000),
    (530, 12010),
    (535, 12020),
    (545, 12030),
    (550, 12040),
    (555, 12050),
    (560, 12060),
    (565, 12070),
    (570, 12080),
    (575, 12090),
    (580, 13000),
];

/// A PCI bus location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Bus {
    domain: u32,
    bus: u32,
    device: u32,
    function: u32,
}

impl Bus {
    pub(super) fn parse(text: &str) -> Option<Bus> {
        let (domain, rest) = text.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (device, function) = rest.split_once('.')?;
        let hex = |s: &str, max: usize| {
            (!s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(s, 16).ok())
                .flatten()
        };
        Some(Bus {
            domain: hex(domain, 8)?,
            bus: hex(bus, 2)?,
            device: hex(device, 2)?,
            function: hex(function, 1)?,
        })
    }

    /// NVML's form: `00000000:3B:00.0`.
    pub(super) fn nvml(self) -> String {
        format!(
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// The kernel's form, the proc directory's name: `0000:3b:00.0`.
    pub(super) fn kernel(self) -> String {
        format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// The MIG capability minor of GPU instance `gi` of the GPU with minor `gpu_minor`
/// (`gpu<minor>/gi<gi>/access` in `mig-minors`), numbered as the driver does: `config` 1,
/// `monitor` 2, then per GPU (by minor) per GPU instance its `access` and its eight compute
/// instances' (`gpu0/gi0/access` 3, `gpu0/gi1/access` 12).
pub fn mig_gi_minor(gpu_minor: u32, gi: u32) -> u32 {
    3 + gpu_minor * MIG_MAX_GI * (1 + MIG_MAX_CI) + gi * (1 + MIG_MAX_CI)
}

/// The MIG capability minor of compute instance `ci` of GPU instance `gi`
/// (`gpu<minor>/gi<gi>/ci<ci>/access`).
pub fn mig_ci_minor(gpu_minor: u32, gi: u32, ci: u32) -> u32 {
    mig_gi_minor(gpu_minor, gi) + 1 + ci
}

/// The driver's full `mig-minors` table.
pub(super) fn mig_minors_table() -> String {
    let mut out = String::from("config 1\nmonitor 2\n");
    for gpu in 0..MIG_MAX_GPUS {
        for gi in 0..MIG_MAX_GI {
            out += &format!("gpu{gpu}/gi{gi}/access {}\n", mig_gi_minor(gpu, gi));
            for ci in 0..MIG_MAX_CI {
                out += &format!(
                    "gpu{gpu}/gi{gi}/ci{ci}/access {}\n",
                    mig_ci_minor(gpu, gi, ci)
                );
            }
        }
    }
    out
}

impl FakeGpu {
    /// The maximum MIG device count of its model, when it supports MIG.
    fn mig_max_devices(&self) -> Option<u32> {
        MIG_CAPABLE
            .iter()
            .find(|(model, _)| self.name.contains(model))
            .map(|(_, max)| *max)
    }

    fn pci_device_id(&self) -> u32 {
        PCI_DEVICE_IDS
            .iter()
            .find(|(model, _)| self.name.contains(model))
            .map_or(0x10DE, |(_, id)| *id)
    }

    pub(super) fn bus(&self) -> Bus {
        Bus::parse(&self.bus_id).unwrap_or_else(|| panic!("validated: {:?}", self.bus_id))
    }
}

impl FakeDriverSpec {
    /// GPU 0: an `NVIDIA A100-SXM4-40GB` at `00000000:3B:00.0`, minor 0, MIG disabled. GPU 1:
    /// the same model at `00000000:86:00.0`, minor 1, in MIG mode with two MIG devices (GPU
    /// instance 1 compute instance 0, GPU instance 2 compute instance 0). Driver 550.54.15
    /// (CUDA 12.4).
    pub fn two_gpus_one_mig() -> Self {
        let a100 = |uuid: &str, bus_id: &str, minor, mig| FakeGpu {
            name: "NVIDIA A100-SXM4-40GB".into(),
            uuid: uuid.into(),
            bus_id: bus_id.into(),
            minor,
            brand: 14,
            compute_capability: (8, 0),
            mig,
        };
        FakeDriverSpec {
            version: "550.54.15".into(),
            gpus: vec![
                a100(
                    "GPU-4f6a3c21-7b9e-4d58-a1c2-3e5f6a7b8c90",
                    "00000000:3B:00.0",
                    0,
                    None,
                ),
                a100(
                    "GPU-b2d4e6f8-1a3c-4e5f-8a9b-0c1d2e3f4a5b",
                    "00000000:86:00.0",
                    1,
                    Some(vec![
                        FakeMig {
                            uuid: "MIG-0e4c3a1f-6b2d-5e8a-9c7f-1d3b5a7c9e20".into(),
                            gpu_instance_id: 1,
                            compute_instance_id: 0,
                        },
                        FakeMig {
                            uuid: "MIG-7a9c1e3b-5d2f-5a4c-8e6b-2f4d6a8c0e31".into(),
                            gpu_instance_id: 2,
                            compute_instance_id: 0,
                        },
                    ]),
                ),
            ],
        }
    }

    /// The CUDA version NVML reports for this driver branch (12040 for 550).
    pub fn cuda_version(&self) -> i32 {
        let major: u32 = self
            .version
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        CUDA_VERSIONS
            .iter()
            .rev()
            .find(|(branch, _)| *branch <= major)
            .map_or(11000, |(_, cuda)| *cuda)
    }

    /// The GPUs in NVML's order (PCI bus order): index `i` here is NVML index `i`.
    pub fn gpus_in_nvml_order(&self) -> Vec<&FakeGpu> {
        let mut gpus: Vec<&FakeGpu> = self.gpus.iter().collect();
        gpus.sort_by_key(|g| Bus::parse(&g.bus_id));
        gpus
    }

    /// The driver root's libraries.
    pub fn libraries(&self) -> Vec<FakeLibrary> {
        LIBRARIES
            .iter()
            .map(|&(capability, stem, major, sixty_four)| {
                let dir = if sixty_four { LIB64_DIR } else { LIB32_DIR };
                FakeLibrary {
                    capability,
                    file: Path::new(dir).join(format!("{stem}.so.{}", self.version)),
                    soname: format!("{stem}.so.{major}"),
                    sixty_four,
                }
            })
            .collect()
    }

    /// The fake NVML's description (`hyperbox-fake-nvml.json`) of this spec.
    pub fn nvml_json(&self) -> serde_json::Value {
        let gpus: Vec<serde_json::Value> = self
            .gpus
            .iter()
            .map(|g| {
                let mut gpu = serde_json::json!({
                    "name": g.name,
                    "uuid": g.uuid,
                    "minor": g.minor,
                    "bus_id": g.bus().nvml(),
                    "pci_device_id": g.pci_device_id(),
                    "brand": g.brand,
                    "compute_capability": [g.compute_capability.0, g.compute_capability.1],
                });
                let max_devices = g.mig_max_devices();
                let mig = match (&g.mig, max_devices) {
                    (Some(devices), max) => Some(serde_json::json!({
                        "enabled": true,
                        "max_devices": max.unwrap_or(7).max(devices.len() as u32),
                        "devices": devices.iter().map(|m| serde_json::json!({
                            "uuid": m.uuid,
                            "gpu_instance_id": m.gpu_instance_id,
                            "compute_instance_id": m.compute_instance_id,
                        })).collect::<Vec<_>>(),
                    })),
                    (None, Some(max)) => Some(serde_json::json!({
                        "enabled": false,
                        "max_devices": max,
                        "devices": [],
                    })),
                    (None, None) => None,
                };
                if let Some(mig) = mig {
                    gpu["mig"] = mig;
                }
                gpu
            })
            .collect();
        serde_json::json!({
            "driver_version": self.version,
            "cuda_version": self.cuda_version(),
            "gpus": gpus,
        })
    }

    pub(super) fn validate(&self) -> Result<(), FakeDriverError> {
        let bad = |what: String| Err(FakeDriverError::Spec(what));
        let version_ok = !self.version.is_empty()
            && self
                .version
                .split('.')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        if !version_ok {
            return bad(format!(
                "driver version {:?} is not dotted numbers",
                self.version
            ));
        }
        let mut uuids = BTreeSet::new();
        let mut minors = BTreeSet::new();
        let mut buses = BTreeSet::new();
        for g in &self.gpus {
            if !g.uuid.starts_with("GPU-") || !uuids.insert(g.uuid.clone()) {
                return bad(format!("GPU uuid {:?}: not GPU-… or given twice", g.uuid));
            }
            // 254 and 255 are nvidia-modeset and nvidiactl.
            if g.minor >= 254 || !minors.insert(g.minor) {
                return bad(format!("GPU minor {}: reserved or given twice", g.minor));
            }
            match Bus::parse(&g.bus_id) {
                Some(bus) if buses.insert(bus) => {}
                _ => {
                    return bad(format!(
                        "bus id {:?}: not DOMAIN:BUS:DEVICE.FUNCTION or given twice",
                        g.bus_id
                    ))
                }
            }
            let Some(migs) = &g.mig else { continue };
            if g.minor >= MIG_MAX_GPUS {
                return bad(format!("MIG on GPU minor {}: the driver has 32", g.minor));
            }
            let mut instances = BTreeSet::new();
            for m in migs {
                if !m.uuid.starts_with("MIG-") || !uuids.insert(m.uuid.clone()) {
                    return bad(format!("MIG uuid {:?}: not MIG-… or given twice", m.uuid));
                }
                if m.gpu_instance_id >= MIG_MAX_GI
                    || m.compute_instance_id >= MIG_MAX_CI
                    || !instances.insert((m.gpu_instance_id, m.compute_instance_id))
                {
                    return bad(format!(
                        "MIG device {}: GPU instance {} compute instance {} out of range or \
                         given twice",
                        m.uuid, m.gpu_instance_id, m.compute_instance_id
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_checks_and_derived_values() {
        let spec = FakeDriverSpec::two_gpus_one_mig();
        spec.validate().unwrap();
        assert_eq!(spec.cuda_version(), 12040);
        let json = spec.nvml_json();
        assert_eq!(json["gpus"][0]["bus_id"], "00000000:3B:00.0");
        assert_eq!(json["gpus"][0]["pci_device_id"], 0x20B0_10DE_u32);
        assert_eq!(
            json["gpus"][0]["mig"]["enabled"], false,
            "an A100: MIG capable"
        );
        assert_eq!(json["gpus"][1]["mig"]["devices"][1]["gpu_instance_id"], 2);
        assert_eq!(mig_gi_minor(0, 1), 12, "the driver's numbering");
        assert_eq!(mig_ci_minor(0, 0, 0), 4);
        assert_eq!(mig_ci_minor(31, 14, 7), 4322, "the driver's last minor");

        let mut dup = spec.clone();
        dup.gpus[1].minor = 0;
        assert!(matches!(dup.validate(), Err(FakeDriverError::Spec(_))));
        let mut bad_bus = spec.clone();
        bad_bus.gpus[0].bus_id = "3b:00.0".into();
        assert!(matches!(bad_bus.validate(), Err(FakeDriverError::Spec(_))));
    }
}

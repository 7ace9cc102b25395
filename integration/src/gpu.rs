//! A faithful fake NVIDIA driver for tests on machines without a GPU.
//!
//! [`FakeDriver::build`] makes, under one directory, what the GPU generator and hook read of a
//! node with NVIDIA's driver installed (Debian/Ubuntu x86-64 layout):
//!
//! - `root/`, the driver root: the driver's user-space libraries as real files
//!   `usr/lib/x86_64-linux-gnu/libX.so.<version>` (and a few 32-bit ones in
//!   `usr/lib/i386-linux-gnu/`) with their SONAME links (`libX.so.1`, `libGLX_nvidia.so.0`),
//!   `etc/ld.so.conf` naming both directories and the `etc/ld.so.cache` that glibc's
//!   `ldconfig -r root` made of them; binaries in `usr/bin/`; GSP firmware in
//!   `usr/lib/firmware/nvidia/<version>/`; the Vulkan ICD and EGL vendor files; the
//!   persistenced and fabric manager sockets (real UNIX sockets) and MPS's `tmp/nvidia-mps/`.
//!   The libraries are ELF shared-object stubs (a dynamic section with `DT_SONAME`, nothing
//!   to run) except `libnvidia-ml.so.<version>`, which is the fake NVML of
//!   `hyperbox-fake-nvml`, described by `hyperbox-fake-nvml.json` next to it and logging each
//!   `nvmlInit` to `hyperbox-fake-nvml.log` there ([`FakeDriver::nvml_log`]);
//! - `proc/`, a proc root with the driver's files: `driver/nvidia/version`, `params`,
//!   `gpus/<bus>/information`, `capabilities/…` of the MIG devices, `devices` and
//!   `driver/nvidia-caps/mig-minors` (the driver's full table);
//! - `dev-root/dev/`, the device nodes (real character devices, so building needs root):
//!   `nvidiactl`, `nvidia-modeset`, `nvidia<minor>`, `nvidia-uvm`, `nvidia-uvm-tools`, and
//!   `nvidia-caps/nvidia-cap<minor>` for MIG's `config` and `monitor` and every GPU and compute
//!   instance of the MIG devices.
//!
//! The generator is pointed at it with its driver root, proc root and device root; what it
//! must find is listed by [`FakeDriverSpec::libraries`], [`FakeDriver::nodes`], [`BINARIES`],
//! [`FIRMWARE`], [`GRAPHICS_CONFIGS`], [`IPC_SOCKETS`] and [`MPS_PIPE_DIR`].

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use crate::host;

/// The file name of the built fake NVML (`hyperbox-fake-nvml`'s cdylib).
pub const FAKE_NVML_LIBRARY: &str = "libhyperbox_fake_nvml.so";
/// The fake NVML's description, next to the library it is loaded as.
pub const NVML_CONFIG_FILE: &str = "hyperbox-fake-nvml.json";
/// The fake NVML's log of inits, next to the library it is loaded as.
pub const NVML_LOG_FILE: &str = "hyperbox-fake-nvml.log";
/// The 64-bit library directory, relative to the driver root.
pub const LIB64_DIR: &str = "usr/lib/x86_64-linux-gnu";
/// The 32-bit library directory, relative to the driver root.
pub const LIB32_DIR: &str = "usr/lib/i386-linux-gnu";
/// The major of `nvidia<N>`, `nvidiactl` and `nvidia-modeset`, fixed by the driver.
pub const NVIDIA_MAJOR: u32 = 195;
/// The dynamic major the fake `devices` gives `nvidia-caps`.
pub const CAPS_MAJOR: u32 = 236;
/// The dynamic major the fake `devices` gives `nvidia-uvm`.
pub const UVM_MAJOR: u32 = 237;
/// The driver's executables, relative to the driver root.
pub const BINARIES: &[&str] = &[
    "usr/bin/nvidia-smi",
    "usr/bin/nvidia-debugdump",
    "usr/bin/nvidia-persistenced",
    "usr/bin/nvidia-cuda-mps-control",
    "usr/bin/nvidia-cuda-mps-server",
];
/// GSP firmware files, in `usr/lib/firmware/nvidia/<version>/` of the driver root.
pub const FIRMWARE: &[&str] = &["gsp_ga10x.bin", "gsp_tu10x.bin"];
/// The graphics configuration files, relative to the driver root.
pub const GRAPHICS_CONFIGS: &[&str] = &[
    "usr/share/vulkan/icd.d/nvidia_icd.json",
    "usr/share/glvnd/egl_vendor.d/10_nvidia.json",
];
/// The driver daemons' UNIX sockets, relative to the driver root.
pub const IPC_SOCKETS: &[&str] = &[
    "run/nvidia-persistenced/socket",
    "run/nvidia-fabricmanager/socket",
];
/// MPS's pipe directory, relative to the driver root.
pub const MPS_PIPE_DIR: &str = "tmp/nvidia-mps";

/// The MIG capability minors the driver reserves: `gpu0` to `gpu31`, GPU instances `gi0` to
/// `gi14`, compute instances `ci0` to `ci7`.
const MIG_MAX_GPUS: u32 = 32;
const MIG_MAX_GI: u32 = 15;
const MIG_MAX_CI: u32 = 8;

/// Errors building a fake driver.
#[derive(Debug, thiserror::Error)]
pub enum FakeDriverError {
    #[error("fake driver spec: {0}")]
    Spec(String),
    #[error(
        "the fake NVML {path} does not exist: build it (`cargo build -p hyperbox-fake-nvml`, \
         or the workspace) or set HYPERBOX_BIN_DIR"
    )]
    NoFakeNvml { path: PathBuf },
    #[error("{dir} exists and is not empty: a fake driver is built in a fresh directory")]
    NotEmpty { dir: PathBuf },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`ldconfig -r {root}` failed ({status}): {stderr}")]
    Ldconfig {
        root: PathBuf,
        status: String,
        stderr: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FakeDriverError {
    let path = path.to_path_buf();
    move |source| FakeDriverError::Io { what, path, source }
}

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
struct Bus {
    domain: u32,
    bus: u32,
    device: u32,
    function: u32,
}

impl Bus {
    fn parse(text: &str) -> Option<Bus> {
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
    fn nvml(self) -> String {
        format!(
            "{:08X}:{:02X}:{:02X}.{:X}",
            self.domain, self.bus, self.device, self.function
        )
    }

    /// The kernel's form, the proc directory's name: `0000:3b:00.0`.
    fn kernel(self) -> String {
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
fn mig_minors_table() -> String {
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

    fn bus(&self) -> Bus {
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

    fn validate(&self) -> Result<(), FakeDriverError> {
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

/// The ELF shared object stub of a library: the ELF header, a `PT_LOAD` covering the file at
/// address 0 and a `PT_DYNAMIC` whose dynamic section has `DT_NEEDED libc.so.6` (which makes
/// `ldconfig` file a 32-bit library as `libc6`, as a real one), `DT_SONAME`, `DT_STRTAB`,
/// `DT_STRSZ` and `DT_NULL`. 64-bit: x86-64 `ELFCLASS64`; 32-bit: `EM_386` `ELFCLASS32`.
/// Nothing in it can be run or linked against.
pub fn elf_stub(soname: &str, sixty_four: bool) -> Vec<u8> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    const DT_STRSZ: u64 = 10;
    const DT_SONAME: u64 = 14;

    let word = if sixty_four { 8 } else { 4 };
    let (ehsize, phentsize) = if sixty_four { (64, 56) } else { (52, 32) };
    let mut strtab = b"\0libc.so.6\0".to_vec();
    let needed = 1u64;
    let soname_at = strtab.len() as u64;
    strtab.extend_from_slice(soname.as_bytes());
    strtab.push(0);
    let dynamic = [
        (DT_NEEDED, needed),
        (DT_SONAME, soname_at),
        (DT_STRTAB, 0), // filled below
        (DT_STRSZ, strtab.len() as u64),
        (DT_NULL, 0),
    ];
    let phoff = ehsize;
    let dyn_at = phoff + 2 * phentsize;
    let dyn_size = dynamic.len() as u64 * 2 * word;
    let strtab_at = dyn_at + dyn_size;
    let total = strtab_at + strtab.len() as u64;

    let mut out = Vec::with_capacity(total as usize);
    let put_word = |out: &mut Vec<u8>, v: u64| {
        if sixty_four {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
    };
    // e_ident: magic, class, little-endian, version 1, System V ABI, padding.
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[if sixty_four { 2 } else { 1 }, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&3u16.to_le_bytes()); // e_type: ET_DYN
    out.extend_from_slice(&(if sixty_four { 62u16 } else { 3 }).to_le_bytes()); // EM_X86_64 / EM_386
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    put_word(&mut out, 0); // e_entry
    put_word(&mut out, phoff); // e_phoff
    put_word(&mut out, 0); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(ehsize as u16).to_le_bytes());
    out.extend_from_slice(&(phentsize as u16).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&(if sixty_four { 64u16 } else { 40 }).to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(out.len() as u64, ehsize);

    // (type, flags, offset = address, size, align)
    let segments = [
        (PT_LOAD, 4u32, 0u64, total, 0x1000u64),
        (PT_DYNAMIC, 6, dyn_at, dyn_size, word),
    ];
    for (p_type, flags, offset, size, align) in segments {
        out.extend_from_slice(&p_type.to_le_bytes());
        if sixty_four {
            out.extend_from_slice(&flags.to_le_bytes());
        }
        put_word(&mut out, offset); // p_offset
        put_word(&mut out, offset); // p_vaddr
        put_word(&mut out, offset); // p_paddr
        put_word(&mut out, size); // p_filesz
        put_word(&mut out, size); // p_memsz
        if !sixty_four {
            out.extend_from_slice(&flags.to_le_bytes());
        }
        put_word(&mut out, align);
    }
    debug_assert_eq!(out.len() as u64, dyn_at);

    for (tag, value) in dynamic {
        let value = if tag == DT_STRTAB { strtab_at } else { value };
        put_word(&mut out, tag);
        put_word(&mut out, value);
    }
    out.extend_from_slice(&strtab);
    debug_assert_eq!(out.len() as u64, total);
    out
}

/// A fake driver built under `dir`.
#[derive(Debug, Clone)]
pub struct FakeDriver {
    /// Holds `root/`, `proc/` and `dev-root/`.
    pub dir: PathBuf,
    pub spec: FakeDriverSpec,
}

fn create_dir(path: &Path) -> Result<(), FakeDriverError> {
    fs::create_dir_all(path).map_err(io_err("create directory", path))
}

fn write_file(path: &Path, data: impl AsRef<[u8]>, mode: u32) -> Result<(), FakeDriverError> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    fs::write(path, data).map_err(io_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

/// Leaves a UNIX socket file at `path` that a listener was bound to.
fn make_socket(path: &Path) -> Result<(), FakeDriverError> {
    let parent = path.parent().unwrap_or(Path::new("."));
    create_dir(parent)?;
    // Bound through the directory's descriptor, so a deep `dir` cannot exceed sun_path.
    let dir = fs::File::open(parent).map_err(io_err("open", parent))?;
    let name = path.file_name().unwrap_or_default();
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    let listener = UnixListener::bind(&short).map_err(io_err("bind a UNIX socket at", path))?;
    drop(listener);
    Ok(())
}

fn make_node(path: &Path, major: u32, minor: u32, mode: u32) -> Result<(), FakeDriverError> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major.into(), minor.into()),
    )
    .map_err(|e| FakeDriverError::Io {
        what: "mknod",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    // mknod applied the umask.
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
}

fn ldconfig_binary() -> PathBuf {
    ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ldconfig"))
}

/// The generator's binary name.
pub const GENERATOR: &str = "hyperbox-gpu-cdi";
/// The hook's binary name.
pub const HOOK: &str = "hyperbox-gpu-hook";

/// A command's exit status and output, for assertion messages.
pub fn describe_output(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A workspace binary the GPU tests need (the generator, the static hook, the shim), or a
/// panic saying how to build it.
pub fn built_binary(name: &str) -> PathBuf {
    host::workspace_binary(name).unwrap_or_else(|| {
        panic!(
            "{name} is not built: cargo build --workspace --bins; scripts/build-gpu-hook \
             $HYPERBOX_BIN_DIR"
        )
    })
}

impl FakeDriver {
    /// `hyperbox-gpu-cdi MODE` (`generate` or `refresh`) for this driver, built into
    /// `bin_dir`: the spec to `spec`, the cache to `cache`, and the hook beside it named in
    /// the spec.
    pub fn generator_command(
        &self,
        bin_dir: &Path,
        mode: &str,
        spec: &Path,
        cache: &Path,
    ) -> Command {
        let mut cmd = Command::new(bin_dir.join(GENERATOR));
        cmd.arg(mode)
            .arg("--driver-root")
            .arg(self.driver_root())
            .arg("--proc-root")
            .arg(self.proc_root())
            .arg("--dev-root")
            .arg(self.dev_root())
            .arg("--output")
            .arg(spec)
            .arg("--cache")
            .arg(cache)
            .arg("--hook-path")
            .arg(bin_dir.join(HOOK));
        cmd
    }

    /// `hyperbox-gpu-cdi generate` for this driver with the workspace's generator and hook:
    /// the spec to `spec`, the cache to `cache`. Panics with the generator's output when it
    /// fails or leaves either file out (for tests).
    pub fn generate(&self, spec: &Path, cache: &Path) {
        let bin_dir = host::workspace_bin_dir().expect("the workspace's binaries");
        let out = self
            .generator_command(&bin_dir, "generate", spec, cache)
            .output()
            .expect("hyperbox-gpu-cdi runs");
        assert!(
            out.status.success() && spec.is_file() && cache.is_file(),
            "hyperbox-gpu-cdi generate: {}",
            describe_output(&out)
        );
    }

    /// The `init …` lines of the fake NVML's log: one per `nvmlInit` since the build.
    pub fn nvml_inits(&self) -> Vec<String> {
        fs::read_to_string(self.nvml_log())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("init "))
            .map(str::to_owned)
            .collect()
    }

    /// Builds the fake driver of `spec` under `dir` (created if needed, and empty), with
    /// `fake_nvml` (the built `libhyperbox_fake_nvml.so`, see [`FakeDriver::fake_nvml_path`])
    /// as its NVML. Needs root: device nodes are made with mknod and `ldconfig -r` chroots.
    pub fn build(
        dir: &Path,
        spec: &FakeDriverSpec,
        fake_nvml: &Path,
    ) -> Result<FakeDriver, FakeDriverError> {
        spec.validate()?;
        if !fake_nvml.is_file() {
            return Err(FakeDriverError::NoFakeNvml {
                path: fake_nvml.to_path_buf(),
            });
        }
        create_dir(dir)?;
        let not_empty = fs::read_dir(dir)
            .map_err(io_err("read", dir))?
            .next()
            .is_some();
        if not_empty {
            return Err(FakeDriverError::NotEmpty {
                dir: dir.to_path_buf(),
            });
        }
        let driver = FakeDriver {
            dir: dir.to_path_buf(),
            spec: spec.clone(),
        };
        driver.build_root(fake_nvml)?;
        driver.build_proc()?;
        driver.build_dev()?;
        Ok(driver)
    }

    /// The driver root (`dir/root`).
    pub fn driver_root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The proc root (`dir/proc`).
    pub fn proc_root(&self) -> PathBuf {
        self.dir.join("proc")
    }

    /// The device root (`dir/dev-root`): the nodes are in its `dev/`.
    pub fn dev_root(&self) -> PathBuf {
        self.dir.join("dev-root")
    }

    /// The fake NVML as the generator loads it: `root/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1`.
    pub fn nvml_library(&self) -> PathBuf {
        self.driver_root().join(LIB64_DIR).join("libnvidia-ml.so.1")
    }

    /// The fake NVML's log: one `init pid=… exe=…` line per successful `nvmlInit`; empty
    /// after the build.
    pub fn nvml_log(&self) -> PathBuf {
        self.driver_root().join(LIB64_DIR).join(NVML_LOG_FILE)
    }

    /// The fake NVML's description.
    pub fn nvml_config(&self) -> PathBuf {
        self.driver_root().join(LIB64_DIR).join(NVML_CONFIG_FILE)
    }

    /// Where the harness finds the built fake NVML: `$HYPERBOX_BIN_DIR/libhyperbox_fake_nvml.so`
    /// when that variable is set, else in the test binary's profile directory
    /// (`target/<profile>/`, where a build of the workspace or of `hyperbox-fake-nvml` puts
    /// it), else in its `deps/` (where cargo leaves it when it was built only as a dependency).
    /// `None` when it has not been built.
    pub fn fake_nvml_path() -> Option<PathBuf> {
        let dir = host::workspace_bin_dir()?;
        let from_env = std::env::var_os("HYPERBOX_BIN_DIR").is_some_and(|v| !v.is_empty());
        let mut candidates = vec![dir.join(FAKE_NVML_LIBRARY)];
        if !from_env {
            candidates.push(dir.join("deps").join(FAKE_NVML_LIBRARY));
        }
        candidates.into_iter().find(|p| p.is_file())
    }

    /// The device nodes under [`FakeDriver::dev_root`], by their path on a node.
    pub fn nodes(&self) -> Vec<FakeNode> {
        let node = |path: String, major, minor, mode| FakeNode {
            path,
            major,
            minor,
            mode,
        };
        let mut nodes = vec![
            node("/dev/nvidiactl".into(), NVIDIA_MAJOR, 255, 0o666),
            node("/dev/nvidia-modeset".into(), NVIDIA_MAJOR, 254, 0o666),
            node("/dev/nvidia-uvm".into(), UVM_MAJOR, 0, 0o666),
            node("/dev/nvidia-uvm-tools".into(), UVM_MAJOR, 1, 0o666),
            node("/dev/nvidia-caps/nvidia-cap1".into(), CAPS_MAJOR, 1, 0o400),
            node("/dev/nvidia-caps/nvidia-cap2".into(), CAPS_MAJOR, 2, 0o444),
        ];
        for g in &self.spec.gpus {
            nodes.push(node(
                format!("/dev/nvidia{}", g.minor),
                NVIDIA_MAJOR,
                g.minor,
                0o666,
            ));
            let mut gis = BTreeSet::new();
            for m in g.mig.iter().flatten() {
                let gi = mig_gi_minor(g.minor, m.gpu_instance_id);
                if gis.insert(gi) {
                    let path = format!("/dev/nvidia-caps/nvidia-cap{gi}");
                    nodes.push(node(path, CAPS_MAJOR, gi, 0o444));
                }
                let ci = mig_ci_minor(g.minor, m.gpu_instance_id, m.compute_instance_id);
                let path = format!("/dev/nvidia-caps/nvidia-cap{ci}");
                nodes.push(node(path, CAPS_MAJOR, ci, 0o444));
            }
        }
        nodes.sort();
        nodes
    }

    fn build_root(&self, fake_nvml: &Path) -> Result<(), FakeDriverError> {
        let root = self.driver_root();
        let version = &self.spec.version;
        for lib in self.spec.libraries() {
            let file = root.join(&lib.file);
            let fake = lib.sixty_four && lib.soname == "libnvidia-ml.so.1";
            if fake {
                create_dir(file.parent().unwrap_or(&root))?;
                fs::copy(fake_nvml, &file).map_err(io_err("copy the fake NVML to", &file))?;
                fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
                    .map_err(io_err("chmod", &file))?;
            } else {
                write_file(&file, elf_stub(&lib.soname, lib.sixty_four), 0o644)?;
            }
            let link = root.join(lib.link());
            let target = lib.file.file_name().unwrap_or_default();
            symlink(target, &link).map_err(io_err("make the SONAME link", &link))?;
        }
        let config =
            serde_json::to_vec_pretty(&self.spec.nvml_json()).expect("a JSON value serialises");
        write_file(&self.nvml_config(), config, 0o644)?;
        // Anyone who loads NVML can log it.
        write_file(&self.nvml_log(), "", 0o666)?;

        write_file(
            &root.join("etc/ld.so.conf"),
            format!("/{LIB64_DIR}\n/{LIB32_DIR}\n"),
            0o644,
        )?;
        create_dir(&root.join("var/cache/ldconfig"))?;
        let output = Command::new(ldconfig_binary())
            .arg("-r")
            .arg(&root)
            .output()
            .map_err(io_err("run ldconfig -r", &root))?;
        if !output.status.success() || !root.join("etc/ld.so.cache").is_file() {
            return Err(FakeDriverError::Ldconfig {
                root,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }

        for bin in BINARIES {
            let name = Path::new(bin).file_name().unwrap_or_default();
            let script = format!(
                "#!/bin/sh\necho \"{}: hyperbox fake NVIDIA driver {version}\"\n",
                name.to_string_lossy()
            );
            write_file(&root.join(bin), script, 0o755)?;
        }
        let firmware = root.join("usr/lib/firmware/nvidia").join(version);
        for name in FIRMWARE {
            write_file(
                &firmware.join(name),
                format!("hyperbox fake GSP firmware {name} {version}\n"),
                0o644,
            )?;
        }
        write_file(
            &root.join(GRAPHICS_CONFIGS[0]),
            "{\n    \"file_format_version\" : \"1.0.1\",\n    \"ICD\": {\n        \
             \"library_path\": \"libGLX_nvidia.so.0\",\n        \"api_version\" : \"1.3.277\"\n    \
             }\n}\n",
            0o644,
        )?;
        write_file(
            &root.join(GRAPHICS_CONFIGS[1]),
            "{\n    \"file_format_version\" : \"1.0.0\",\n    \"ICD\" : {\n        \
             \"library_path\" : \"libEGL_nvidia.so.0\"\n    }\n}\n",
            0o644,
        )?;
        for socket in IPC_SOCKETS {
            make_socket(&root.join(socket))?;
        }
        create_dir(&root.join(MPS_PIPE_DIR))
    }

    fn build_proc(&self) -> Result<(), FakeDriverError> {
        let proc = self.proc_root();
        let nvidia = proc.join("driver/nvidia");
        let version = &self.spec.version;
        write_file(
            &nvidia.join("version"),
            format!(
                "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {version}  Tue Mar  5 22:23:56 \
                 UTC 2024\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
            ),
            0o444,
        )?;
        write_file(
            &nvidia.join("params"),
            "ResmanDebugLevel: 4294967295\nRmLogonRC: 1\nModifyDeviceFiles: 1\nDeviceFileUID: 0\n\
             DeviceFileGID: 0\nDeviceFileMode: 438\nInitializeSystemMemoryAllocations: 1\n\
             UsePageAttributeTable: 4294967295\nEnableMSI: 1\nEnableStreamMemOPs: 0\n\
             NvLinkDisable: 0\nRmProfilingAdminOnly: 1\nPreserveVideoMemoryAllocations: 0\n\
             DynamicPowerManagement: 3\nRegisterPCIDriver: 1\nEnableGpuFirmware: 18\n\
             RegistryDwords: \"\"\nRegistryDwordsPerDevice: \"\"\nRmMsg: \"\"\nGpuBlacklist: \"\"\n\
             TemporaryFilePath: \"\"\nExcludedGpus: \"\"\n",
            0o444,
        )?;
        for (i, g) in self.spec.gpus_in_nvml_order().into_iter().enumerate() {
            let bus = g.bus().kernel();
            let information = format!(
                "Model: \t\t {}\nIRQ:   \t\t {}\nGPU UUID: \t {}\nVideo BIOS: \t 92.00.45.00.05\n\
                 Bus Type: \t PCIe\nDMA Size: \t 47 bits\nDMA Mask: \t 0x7fffffffffff\n\
                 Bus Location: \t {bus}\nDevice Minor: \t {}\nGPU Excluded:\t No\n",
                g.name,
                150 + i,
                g.uuid,
                g.minor
            );
            write_file(
                &nvidia.join("gpus").join(&bus).join("information"),
                information,
                0o444,
            )?;
        }
        write_file(
            &proc.join("devices"),
            format!(
                "Character devices:\n  1 mem\n  4 /dev/vc/0\n  4 tty\n  4 ttyS\n  5 /dev/tty\n\
                 \x20 5 /dev/console\n  5 /dev/ptmx\n  7 vcs\n 10 misc\n 13 input\n 29 fb\n\
                 128 ptm\n136 pts\n180 usb\n189 usb_device\n{NVIDIA_MAJOR} nvidia-frontend\n\
                 226 drm\n234 nvidia-caps-imex-channels\n235 nvidia-nvlink\n\
                 {CAPS_MAJOR} nvidia-caps\n{UVM_MAJOR} nvidia-uvm\n254 gpiochip\n\n\
                 Block devices:\n  7 loop\n  8 sd\n  9 md\n 11 sr\n 65 sd\n253 device-mapper\n\
                 254 mdp\n259 blkext\n"
            ),
            0o444,
        )?;
        write_file(
            &proc.join("driver/nvidia-caps/mig-minors"),
            mig_minors_table(),
            0o444,
        )?;
        // The capability files of MIG's config and monitor and of each instance:
        // `DeviceFileMinor`, `DeviceFileMode` (decimal), `DeviceFileModify`.
        let capability = |minor: u32, mode: u32| {
            format!("DeviceFileMinor: {minor}\nDeviceFileMode: {mode}\nDeviceFileModify: 1\n")
        };
        let caps = nvidia.join("capabilities");
        write_file(&caps.join("mig/config"), capability(1, 0o400), 0o444)?;
        write_file(&caps.join("mig/monitor"), capability(2, 0o444), 0o444)?;
        for g in &self.spec.gpus {
            for m in g.mig.iter().flatten() {
                let gi_dir = caps.join(format!("gpu{}/mig/gi{}", g.minor, m.gpu_instance_id));
                let gi = mig_gi_minor(g.minor, m.gpu_instance_id);
                write_file(&gi_dir.join("access"), capability(gi, 0o444), 0o444)?;
                let ci = mig_ci_minor(g.minor, m.gpu_instance_id, m.compute_instance_id);
                write_file(
                    &gi_dir.join(format!("ci{}/access", m.compute_instance_id)),
                    capability(ci, 0o444),
                    0o444,
                )?;
            }
        }
        Ok(())
    }

    fn build_dev(&self) -> Result<(), FakeDriverError> {
        let root = self.dev_root();
        for node in self.nodes() {
            let path = root.join(node.path.trim_start_matches('/'));
            make_node(&path, node.major, node.minor, node.mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use hyperbox_gpu::driver::DriverProc;
    use hyperbox_gpu::ldcache::{self, Arch};

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hb-fake-driver-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    /// The built fake NVML, or (when `hyperbox-fake-nvml` has not been built) an ELF stub
    /// with its SONAME in its place.
    fn fake_nvml(scratch: &Path) -> PathBuf {
        if let Some(path) = FakeDriver::fake_nvml_path() {
            return path;
        }
        eprintln!("{FAKE_NVML_LIBRARY} not built: a stub stands in for it");
        fs::create_dir_all(scratch).unwrap();
        let stub = scratch.join("stub-nvml.so");
        fs::write(&stub, elf_stub("libnvidia-ml.so.1", true)).unwrap();
        stub
    }

    #[test]
    fn the_elf_stubs_are_what_readelf_expects() {
        for sixty_four in [true, false] {
            let stub = elf_stub("libcuda.so.1", sixty_four);
            assert_eq!(&stub[..4], b"\x7fELF");
            assert_eq!(stub[4], if sixty_four { 2 } else { 1 });
            let dir = scratch(&format!("elf{}", u8::from(sixty_four)));
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("libcuda.so.1");
            fs::write(&path, &stub).unwrap();
            // binutils may be missing; the ldconfig test below is the real check.
            if let Ok(out) = Command::new("readelf").arg("-d").arg(&path).output() {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("Library soname: [libcuda.so.1]"), "{text}");
                assert!(text.contains("Shared library: [libc.so.6]"), "{text}");
            }
            fs::remove_dir_all(&dir).unwrap();
        }
    }

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

    #[test]
    fn builds_a_driver_the_loader_and_the_parsers_read() {
        if !nix::unistd::geteuid().is_root() {
            crate::skip("needs root");
            return;
        }
        let dir = scratch("build");
        let spec = FakeDriverSpec::two_gpus_one_mig();
        let nvml = fake_nvml(&dir.join("nvml"));
        let driver = FakeDriver::build(&dir.join("driver"), &spec, &nvml).unwrap();
        let root = driver.driver_root();

        // The loader's cache, as glibc's ldconfig prints it: every library by SONAME, with
        // its architecture, and nothing else.
        let out = Command::new(ldconfig_binary())
            .arg("-p")
            .arg("-C")
            .arg(root.join("etc/ld.so.cache"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let listed: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" => "))
            .map(|l| l.trim().to_owned())
            .collect();
        let expected: BTreeSet<String> = spec
            .libraries()
            .iter()
            .map(|l| {
                let arch = if l.sixty_four {
                    "libc6,x86-64"
                } else {
                    "libc6"
                };
                format!("{} ({arch}) => /{}", l.soname, l.link().display())
            })
            .collect();
        assert_eq!(listed, expected);
        // The same cache read by hyperbox-gpu's reader.
        let entries = ldcache::read_under(&root).unwrap();
        assert_eq!(entries.len(), expected.len());
        for lib in spec.libraries() {
            let entry = entries
                .iter()
                .find(|e| e.path == Path::new("/").join(lib.link()))
                .unwrap_or_else(|| panic!("{} in the cache", lib.soname));
            assert_eq!(entry.name, lib.soname);
            let arch = if lib.sixty_four {
                Arch::Native64
            } else {
                Arch::Elf32
            };
            assert_eq!(entry.arch(), arch, "{}", lib.soname);
            let link = fs::read_link(root.join(lib.link())).unwrap();
            assert_eq!(link, Path::new(lib.file.file_name().unwrap()));
            assert!(fs::symlink_metadata(root.join(&lib.file))
                .unwrap()
                .file_type()
                .is_file());
        }

        // The fake NVML and its description sit where the generator loads it from.
        let config: serde_json::Value =
            serde_json::from_slice(&fs::read(driver.nvml_config()).unwrap()).unwrap();
        assert_eq!(config, spec.nvml_json());
        assert_eq!(
            driver.nvml_library().parent(),
            driver.nvml_config().parent()
        );
        assert!(driver.nvml_library().is_file());
        assert_eq!(fs::read_to_string(driver.nvml_log()).unwrap(), "");

        for bin in BINARIES {
            let meta = fs::metadata(root.join(bin)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o755, "{bin}");
        }
        for name in FIRMWARE {
            let path = root.join("usr/lib/firmware/nvidia/550.54.15").join(name);
            assert!(path.is_file(), "{}", path.display());
        }
        for config in GRAPHICS_CONFIGS {
            let text = fs::read(root.join(config)).unwrap();
            serde_json::from_slice::<serde_json::Value>(&text).unwrap();
        }
        for socket in IPC_SOCKETS {
            let meta = fs::symlink_metadata(root.join(socket)).unwrap();
            assert!(meta.file_type().is_socket(), "{socket}");
        }
        assert!(root.join(MPS_PIPE_DIR).is_dir());

        // hyperbox-gpu's parser reads the proc root.
        let proc = DriverProc::read(&driver.proc_root()).unwrap();
        assert_eq!(proc.version, "550.54.15".parse().unwrap());
        let gpus: Vec<(&str, &str, u32)> = proc
            .gpus
            .iter()
            .map(|g| (g.uuid.as_str(), g.bus_id.as_str(), g.minor))
            .collect();
        assert_eq!(
            gpus,
            [
                (spec.gpus[0].uuid.as_str(), "0000:3b:00.0", 0),
                (spec.gpus[1].uuid.as_str(), "0000:86:00.0", 1)
            ]
        );
        assert_eq!(proc.gpus[0].model, "NVIDIA A100-SXM4-40GB");
        assert_eq!(proc.char_majors.get("nvidia-caps"), Some(&CAPS_MAJOR));
        assert_eq!(proc.char_majors.get("nvidia-uvm"), Some(&UVM_MAJOR));
        assert_eq!(proc.mig_minors.len(), 2 + 32 * 15 * 9);

        // Every node the parser derives exists as that character device, and the device root
        // holds exactly the nodes listed.
        let mut derived = proc.control_nodes();
        derived.push(proc.modeset_node());
        derived.extend(proc.gpus.iter().map(DriverProc::gpu_node));
        for cap in [
            "config",
            "monitor",
            "gpu1/gi1/access",
            "gpu1/gi1/ci0/access",
        ] {
            derived.push(proc.mig_cap_node(cap).unwrap());
        }
        derived.extend(proc.mig_cap_node("gpu1/gi2/access"));
        derived.extend(proc.mig_cap_node("gpu1/gi2/ci0/access"));
        let listed: BTreeMap<String, (u32, u32)> = driver
            .nodes()
            .into_iter()
            .map(|n| (n.path, (n.major, n.minor)))
            .collect();
        for node in &derived {
            assert_eq!(
                listed.get(&node.path),
                Some(&(node.major, node.minor)),
                "{}",
                node.path
            );
        }
        assert_eq!(listed.len(), derived.len());
        for node in driver.nodes() {
            let path = driver.dev_root().join(node.path.trim_start_matches('/'));
            let meta = fs::symlink_metadata(&path).unwrap();
            assert!(meta.file_type().is_char_device(), "{}", path.display());
            let rdev = meta.rdev();
            assert_eq!(
                (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)),
                (u64::from(node.major), u64::from(node.minor)),
                "{}",
                node.path
            );
            assert_eq!(meta.mode() & 0o7777, node.mode, "{}", node.path);
        }
        assert_eq!(
            driver
                .nodes()
                .iter()
                .find(|n| n.path == "/dev/nvidia-caps/nvidia-cap148"),
            Some(&FakeNode {
                path: "/dev/nvidia-caps/nvidia-cap148".into(),
                major: CAPS_MAJOR,
                minor: 148,
                mode: 0o444
            }),
            "gpu1/gi1/ci0/access"
        );
        let info = fs::read_to_string(
            driver
                .proc_root()
                .join("driver/nvidia/capabilities/gpu1/mig/gi2/access"),
        )
        .unwrap();
        assert_eq!(
            info,
            "DeviceFileMinor: 156\nDeviceFileMode: 292\nDeviceFileModify: 1\n"
        );

        // A second build in the same place is refused.
        let again = FakeDriver::build(&driver.dir, &spec, &driver.nvml_library());
        assert!(matches!(again, Err(FakeDriverError::NotEmpty { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}

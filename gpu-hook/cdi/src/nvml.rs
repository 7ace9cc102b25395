//! What NVML says about the node's GPUs, loaded from the driver root's own
//! `libnvidia-ml.so.1` at run time. The only code of HyperBox that loads NVML.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hyperbox_gpu::cache::{Gpu, MigDevice};
use hyperbox_gpu::driver::{DriverProc, NVIDIA_MAJOR};
use hyperbox_gpu::ldcache::{self, Arch};
use nvml_wrapper::enum_wrappers::device::Brand;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::Nvml;

/// What NVML reports.
#[derive(Debug)]
pub struct NvmlFacts {
    pub driver_version: String,
    pub cuda_version: String,
    pub gpus: Vec<Gpu>,
}

/// Where the driver root's loader finds `libnvidia-ml.so.1`.
pub fn library_path(driver_root: &Path) -> Result<PathBuf> {
    let entries = ldcache::read_under(driver_root).with_context(|| {
        format!(
            "cannot read the loader cache of the driver root {}",
            driver_root.display()
        )
    })?;
    let entry = entries
        .iter()
        .find(|e| e.name == "libnvidia-ml.so.1" && e.arch() == Arch::Native64)
        .with_context(|| {
            format!(
                "the driver root {} has no libnvidia-ml.so.1 in its loader cache",
                driver_root.display()
            )
        })?;
    let rel = entry.path.strip_prefix("/").unwrap_or(&entry.path);
    Ok(driver_root.join(rel))
}

/// NVML's brand names, lowercase, as `NVIDIA_REQUIRE_BRAND` compares them.
fn brand_name(b: Brand) -> String {
    let name = match b {
        Brand::Unknown => "unknown",
        Brand::Quadro => "quadro",
        Brand::Tesla => "tesla",
        Brand::NVS => "nvs",
        Brand::GRID => "grid",
        Brand::GeForce => "geforce",
        Brand::Titan => "titan",
        Brand::VApps => "nvidiavapps",
        Brand::VPC => "nvidiavpc",
        Brand::VCS => "nvidiavcs",
        Brand::VWS => "nvidiavws",
        Brand::CloudGaming => "nvidiacloudgaming",
        Brand::QuadroRTX => "quadrortx",
        Brand::NvidiaRTX => "nvidiartx",
        Brand::Nvidia => "nvidia",
        Brand::GeForceRTX => "geforcertx",
        Brand::TitanRTX => "titanrtx",
        Brand::VGaming => "nvidiavgaming",
    };
    name.into()
}

/// NVML's `00000000:3B:00.0`, lowercase.
fn normalise_bus_id(id: &str) -> String {
    id.to_ascii_lowercase()
}

/// Reads every GPU and MIG device through NVML at `library`; MIG capability nodes come
/// from `driver`'s proc files.
pub fn read(library: &Path, driver: &DriverProc) -> Result<NvmlFacts> {
    let nvml = Nvml::builder()
        .lib_path(OsStr::new(library))
        .init()
        .with_context(|| format!("cannot initialise NVML from {}", library.display()))?;
    let driver_version = nvml.sys_driver_version().context("NVML: driver version")?;
    let cuda = nvml
        .sys_cuda_driver_version()
        .context("NVML: CUDA driver version")?;
    let cuda_version = format!("{}.{}", cuda / 1000, (cuda % 1000) / 10);
    let count = nvml.device_count().context("NVML: device count")?;
    let mut gpus = Vec::new();
    for index in 0..count {
        let d = nvml
            .device_by_index(index)
            .with_context(|| format!("NVML: GPU {index}"))?;
        let what = |w: &str| format!("NVML: GPU {index}: {w}");
        let uuid = d.uuid().with_context(|| what("UUID"))?;
        let minor = d.minor_number().with_context(|| what("minor number"))?;
        let bus_id = normalise_bus_id(&d.pci_info().with_context(|| what("PCI info"))?.bus_id);
        let name = d.name().with_context(|| what("name"))?;
        let brand = brand_name(d.brand().with_context(|| what("brand"))?);
        let cc = d
            .cuda_compute_capability()
            .with_context(|| what("compute capability"))?;
        let mig_enabled = match d.mig_mode() {
            Ok(m) => m.current == 1,
            Err(NvmlError::NotSupported) => false,
            Err(e) => return Err(e).with_context(|| what("MIG mode")),
        };
        let mut mig = Vec::new();
        if mig_enabled {
            let max = d
                .mig_device_count()
                .with_context(|| what("MIG device count"))?;
            for slot in 0..max {
                let m = match d.mig_device_by_index(slot) {
                    Ok(m) => m,
                    Err(NvmlError::NotFound) => continue,
                    Err(e) => return Err(e).with_context(|| what("MIG device")),
                };
                let uuid = m.uuid().with_context(|| what("MIG UUID"))?;
                let (gi, ci) = instance_ids(&nvml, &m).with_context(|| what("MIG instance ids"))?;
                let mut nodes = Vec::new();
                for cap in [
                    format!("gpu{minor}/gi{gi}/access"),
                    format!("gpu{minor}/gi{gi}/ci{ci}/access"),
                ] {
                    match driver.mig_cap_node(&cap) {
                        Some(n) => nodes.push(n),
                        None => bail!(
                            "GPU {index}'s MIG device {uuid}: the driver lists no capability {cap} \
                             in driver/nvidia-caps/mig-minors"
                        ),
                    }
                }
                mig.push(MigDevice {
                    index: mig.len() as u32,
                    uuid,
                    gpu_instance: gi,
                    compute_instance: ci,
                    nodes,
                });
            }
        }
        gpus.push(Gpu {
            index,
            uuid,
            bus_id,
            name,
            brand,
            arch: format!("{}.{}", cc.major, cc.minor),
            node: DriverProc::gpu_node_for(minor),
            mig,
        });
    }
    if let Err(e) = nvml.shutdown() {
        tracing::warn!("NVML shutdown: {e}");
    }
    debug_assert!(gpus.iter().all(|g| g.node.major == NVIDIA_MAJOR));
    Ok(NvmlFacts {
        driver_version,
        cuda_version,
        gpus,
    })
}

/// A MIG device's GPU instance and compute instance ids (NVML calls `nvml-wrapper` does not
/// wrap).
fn instance_ids(nvml: &Nvml, device: &nvml_wrapper::Device<'_>) -> Result<(u32, u32)> {
    let lib = nvml.lib();
    let gi_sym = lib
        .nvmlDeviceGetGpuInstanceId
        .as_ref()
        .map_err(|e| anyhow::anyhow!("nvmlDeviceGetGpuInstanceId: {e}"))?;
    let ci_sym = lib
        .nvmlDeviceGetComputeInstanceId
        .as_ref()
        .map_err(|e| anyhow::anyhow!("nvmlDeviceGetComputeInstanceId: {e}"))?;
    let (mut gi, mut ci) = (0u32, 0u32);
    // SAFETY: the handle is a live MIG device handle of this NVML instance, and the out
    // pointers are valid for the call.
    let (r1, r2) = unsafe {
        let handle = device.handle();
        (gi_sym(handle, &mut gi), ci_sym(handle, &mut ci))
    };
    if r1 != 0 || r2 != 0 {
        bail!("NVML returned {r1} and {r2}");
    }
    Ok((gi, ci))
}

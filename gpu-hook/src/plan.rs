//! What one container gets: from its request (`request`) and the node's cache (`cache`), the
//! device nodes and driver files to inject, and the facts its `NVIDIA_REQUIRE_*` are checked
//! against. The shim and the hook both use this, so they cannot disagree.

use crate::cache::{Gpu, NodeCache};
use crate::discover::{DriverFile, FileKind};
use crate::driver::DeviceNode;
use crate::request::{Capability, DeviceSelector, Devices, Environment, GpuRequest};
use crate::require::{GpuFacts, NodeFacts, RequireError, Requirements};

/// A request the node cannot meet.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("NVIDIA_VISIBLE_DEVICES names {0}, which this node does not have (GPUs: {1})")]
    Unknown(String, String),
    #[error("NVIDIA_VISIBLE_DEVICES names MIG device {0}, but GPU {1} is not in MIG mode")]
    NotMig(String, u32),
    #[error(transparent)]
    Require(#[from] RequireError),
    #[error("{0}")]
    BadVersion(String),
}

/// What to give a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection<'a> {
    /// Control nodes first, then each GPU's, then MIG capability nodes; no repeats.
    pub nodes: Vec<DeviceNode>,
    pub files: Vec<&'a DriverFile>,
    /// The GPUs behind the selection (a MIG device's parent), for the requirements.
    pub gpus: Vec<&'a Gpu>,
}

fn describe(cache: &NodeCache) -> String {
    let gpus: Vec<String> = cache
        .gpus
        .iter()
        .map(|g| format!("{} {} {}", g.index, g.uuid, g.bus_id))
        .collect();
    if gpus.is_empty() {
        "none".into()
    } else {
        gpus.join(", ")
    }
}

/// Whether `file` belongs to a container with `caps`: its capability asked for, and a 32-bit
/// library only with `compat32`.
fn wanted(file: &DriverFile, caps: &std::collections::BTreeSet<Capability>) -> bool {
    if !caps.contains(&file.capability) {
        return false;
    }
    match file.kind {
        FileKind::Library { bits: 32, .. } => caps.contains(&Capability::Compat32),
        _ => true,
    }
}

/// The injection for `request` on this node.
pub fn plan<'a>(cache: &'a NodeCache, request: &GpuRequest) -> Result<Injection<'a>, PlanError> {
    let mut nodes: Vec<DeviceNode> = cache.control_nodes.clone();
    if request.capabilities.contains(&Capability::Display) {
        nodes.push(cache.modeset_node.clone());
    }
    let mut gpus: Vec<&Gpu> = Vec::new();
    let mut mig_nodes: Vec<DeviceNode> = Vec::new();
    match &request.devices {
        Devices::Void | Devices::None => {}
        Devices::All => gpus.extend(cache.gpus.iter()),
        Devices::Listed(selectors) => {
            for s in selectors {
                let unknown = |what: String| PlanError::Unknown(what, describe(cache));
                let found = match s {
                    DeviceSelector::Index(i) => cache
                        .gpus
                        .iter()
                        .find(|g| g.index == *i)
                        .ok_or_else(|| unknown(format!("GPU {i}")))?,
                    DeviceSelector::Uuid(u) => cache
                        .gpus
                        .iter()
                        .find(|g| g.uuid.eq_ignore_ascii_case(u))
                        .ok_or_else(|| unknown(u.clone()))?,
                    DeviceSelector::PciBusId(b) => cache
                        .gpus
                        .iter()
                        .find(|g| g.bus_id.eq_ignore_ascii_case(b))
                        .ok_or_else(|| unknown(format!("PCI bus id {b}")))?,
                    DeviceSelector::Mig { gpu, device } => {
                        let parent = cache
                            .gpus
                            .iter()
                            .find(|g| g.index == *gpu)
                            .ok_or_else(|| unknown(format!("GPU {gpu}")))?;
                        if parent.mig.is_empty() {
                            return Err(PlanError::NotMig(format!("{gpu}:{device}"), *gpu));
                        }
                        let mig = parent
                            .mig
                            .iter()
                            .find(|m| m.index == *device)
                            .ok_or_else(|| unknown(format!("MIG device {gpu}:{device}")))?;
                        mig_nodes.extend(mig.nodes.iter().cloned());
                        parent
                    }
                    DeviceSelector::MigUuid(u) => {
                        let (parent, mig) = cache
                            .gpus
                            .iter()
                            .flat_map(|g| g.mig.iter().map(move |m| (g, m)))
                            .find(|(g, m)| {
                                m.uuid.eq_ignore_ascii_case(u)
                                    || legacy_mig_uuid(g, m).eq_ignore_ascii_case(u)
                            })
                            .ok_or_else(|| unknown(u.clone()))?;
                        mig_nodes.extend(mig.nodes.iter().cloned());
                        parent
                    }
                };
                if !gpus.iter().any(|g| g.index == found.index) {
                    gpus.push(found);
                }
            }
        }
    }
    nodes.extend(gpus.iter().map(|g| g.node.clone()));
    nodes.extend(mig_nodes);
    let mut seen = std::collections::BTreeSet::new();
    nodes.retain(|n| seen.insert(n.path.clone()));
    let files = cache
        .files
        .iter()
        .filter(|f| wanted(f, &request.capabilities))
        .collect();
    Ok(Injection { nodes, files, gpus })
}

/// R450/R460's MIG name: `MIG-GPU-<uuid>/<gi>/<ci>`.
fn legacy_mig_uuid(gpu: &Gpu, mig: &crate::cache::MigDevice) -> String {
    format!(
        "MIG-{}/{}/{}",
        gpu.uuid, mig.gpu_instance, mig.compute_instance
    )
}

/// Checks the container's `NVIDIA_REQUIRE_*` against the node and the selected GPUs.
pub fn check_requirements(
    cache: &NodeCache,
    injection: &Injection<'_>,
    env: &Environment,
) -> Result<(), PlanError> {
    let requirements = Requirements::from_env(env)?;
    if requirements.0.is_empty() {
        return Ok(());
    }
    let parse = |what: &str, v: &str| {
        v.parse()
            .map_err(|e| PlanError::BadVersion(format!("the cache's {what} {v:?}: {e}")))
    };
    let mut gpus = Vec::new();
    for g in &injection.gpus {
        gpus.push(GpuFacts {
            arch: parse("compute capability", &g.arch)?,
            brand: g.brand.clone(),
        });
    }
    let facts = NodeFacts {
        cuda: parse("CUDA version", &cache.cuda_version)?,
        driver: parse("driver version", &cache.driver_version)?,
        gpus,
    };
    requirements.check(&facts)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache::{MigDevice, FORMAT};
    use std::path::PathBuf;

    fn node(path: &str, major: u32, minor: u32) -> DeviceNode {
        DeviceNode {
            path: path.into(),
            major,
            minor,
        }
    }

    fn lib(cap: Capability, name: &str, bits: u8) -> DriverFile {
        let dir = if bits == 64 {
            "/usr/lib/x86_64-linux-gnu"
        } else {
            "/usr/lib/i386-linux-gnu"
        };
        DriverFile {
            capability: cap,
            kind: FileKind::Library {
                soname: format!("{name}.so.1"),
                bits,
            },
            host_path: PathBuf::from(format!("/drv{dir}/{name}.so.550.54.15")),
            container_path: PathBuf::from(format!("{dir}/{name}.so.550.54.15")),
        }
    }

    /// Two GPUs; GPU 1 in MIG mode with two MIG devices.
    pub(crate) fn two_gpus() -> NodeCache {
        let gpu = |i: u32, mig: Vec<MigDevice>| Gpu {
            index: i,
            uuid: format!("GPU-{i}1111111-2222-3333-4444-555555555555"),
            bus_id: format!("00000000:{:02x}:00.0", 0x3b + i),
            name: "NVIDIA A100-SXM4-40GB".into(),
            brand: "nvidia".into(),
            arch: "8.0".into(),
            node: node(&format!("/dev/nvidia{i}"), 195, i),
            mig,
        };
        let mig = |i: u32, gi: u32| MigDevice {
            index: i,
            uuid: format!("MIG-{i}aaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"),
            gpu_instance: gi,
            compute_instance: 0,
            nodes: vec![
                node(
                    &format!("/dev/nvidia-caps/nvidia-cap{}", gi * 10),
                    236,
                    gi * 10,
                ),
                node(
                    &format!("/dev/nvidia-caps/nvidia-cap{}", gi * 10 + 1),
                    236,
                    gi * 10 + 1,
                ),
            ],
        };
        NodeCache {
            format: FORMAT,
            driver_version: "550.54.15".into(),
            cuda_version: "12.4".into(),
            driver_root: "/drv".into(),
            gpus: vec![gpu(0, vec![]), gpu(1, vec![mig(0, 1), mig(1, 2)])],
            control_nodes: vec![
                node("/dev/nvidiactl", 195, 255),
                node("/dev/nvidia-uvm", 237, 0),
            ],
            modeset_node: node("/dev/nvidia-modeset", 195, 254),
            files: vec![
                lib(Capability::Compute, "libcuda", 64),
                lib(Capability::Compute, "libcuda", 32),
                lib(Capability::Utility, "libnvidia-ml", 64),
                lib(Capability::Graphics, "libnvidia-glcore", 64),
                DriverFile {
                    capability: Capability::Utility,
                    kind: FileKind::Binary,
                    host_path: "/drv/usr/bin/nvidia-smi".into(),
                    container_path: "/usr/bin/nvidia-smi".into(),
                },
            ],
        }
    }

    fn run(entries: &[&str]) -> Result<(Vec<String>, Vec<String>), PlanError> {
        let cache = two_gpus();
        let env = Environment::from_entries(entries);
        let request = GpuRequest::from_env(&env).unwrap().unwrap();
        let p = plan(&cache, &request)?;
        check_requirements(&cache, &p, &env)?;
        let mut files: Vec<String> = p
            .files
            .iter()
            .map(|f| f.container_path.display().to_string())
            .collect();
        files.sort();
        Ok((p.nodes.iter().map(|n| n.path.clone()).collect(), files))
    }

    #[test]
    fn selects_exactly_the_named_devices() {
        let (nodes, files) = run(&["NVIDIA_VISIBLE_DEVICES=0"]).unwrap();
        assert_eq!(nodes, ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia0"]);
        assert_eq!(
            files,
            [
                "/usr/bin/nvidia-smi",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15"
            ]
        );
        let (nodes, _) =
            run(&["NVIDIA_VISIBLE_DEVICES=gpu-11111111-2222-3333-4444-555555555555"]).unwrap();
        assert_eq!(nodes.last().unwrap(), "/dev/nvidia1");
        let (nodes, _) = run(&["NVIDIA_VISIBLE_DEVICES=3c:00.0"]).unwrap();
        assert_eq!(nodes.last().unwrap(), "/dev/nvidia1");
        let (nodes, _) = run(&["NVIDIA_VISIBLE_DEVICES=all"]).unwrap();
        assert_eq!(nodes[2..], ["/dev/nvidia0", "/dev/nvidia1"]);
        let (nodes, files) = run(&["NVIDIA_VISIBLE_DEVICES=none"]).unwrap();
        assert_eq!(nodes, ["/dev/nvidiactl", "/dev/nvidia-uvm"]);
        assert_eq!(files.len(), 3);
    }

    #[test]
    fn mig_devices_bring_their_parent_and_capability_nodes() {
        let (nodes, _) = run(&["NVIDIA_VISIBLE_DEVICES=1:1"]).unwrap();
        assert_eq!(
            nodes,
            [
                "/dev/nvidiactl",
                "/dev/nvidia-uvm",
                "/dev/nvidia1",
                "/dev/nvidia-caps/nvidia-cap20",
                "/dev/nvidia-caps/nvidia-cap21"
            ]
        );
        let (by_uuid, _) =
            run(&["NVIDIA_VISIBLE_DEVICES=MIG-1AAAAAAA-bbbb-cccc-dddd-eeeeeeeeeeee"]).unwrap();
        assert_eq!(by_uuid, nodes);
        let legacy = "NVIDIA_VISIBLE_DEVICES=MIG-GPU-11111111-2222-3333-4444-555555555555/2/0";
        assert_eq!(run(&[legacy]).unwrap().0, nodes);
        assert!(matches!(
            run(&["NVIDIA_VISIBLE_DEVICES=0:0"]),
            Err(PlanError::NotMig(..))
        ));
    }

    #[test]
    fn unknown_devices_are_refused_naming_them() {
        for entry in [
            "2",
            "GPU-99999999-2222-3333-4444-555555555555",
            "1:5",
            "ff:00.0",
        ] {
            let err = run(&[&format!("NVIDIA_VISIBLE_DEVICES={entry}")]).unwrap_err();
            assert!(matches!(err, PlanError::Unknown(..)), "{entry}: {err}");
            assert!(err.to_string().contains("GPU-01111111"), "{err}");
        }
    }

    #[test]
    fn capabilities_choose_the_files() {
        let (_, files) = run(&[
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_DRIVER_CAPABILITIES=compute,compat32",
        ])
        .unwrap();
        assert_eq!(
            files,
            [
                "/usr/lib/i386-linux-gnu/libcuda.so.550.54.15",
                "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"
            ]
        );
        let (nodes, files) = run(&[
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_DRIVER_CAPABILITIES=display",
        ])
        .unwrap();
        assert!(nodes.contains(&"/dev/nvidia-modeset".to_string()));
        assert_eq!(
            files,
            ["/usr/lib/x86_64-linux-gnu/libnvidia-glcore.so.550.54.15"]
        );
    }

    #[test]
    fn requirements_hold_in_every_mode() {
        assert!(run(&["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.0"]).is_ok());
        let err = run(&["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.5"]).unwrap_err();
        assert!(matches!(err, PlanError::Require(_)), "{err}");
        let err = run(&[
            "NVIDIA_VISIBLE_DEVICES=all",
            "NVIDIA_REQUIRE_ARCH=arch>=9.0",
        ])
        .unwrap_err();
        assert!(matches!(err, PlanError::Require(_)), "{err}");
        assert!(run(&[
            "NVIDIA_VISIBLE_DEVICES=all",
            "NVIDIA_REQUIRE_ARCH=arch>=9.0",
            "NVIDIA_DISABLE_REQUIRE=true"
        ])
        .is_ok());
    }
}

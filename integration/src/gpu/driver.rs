//! Building a fake driver on disk ([`FakeDriver::build`]): the driver root with its loader
//! cache, the proc root and the device nodes; and running the generator against it.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sys::stat::{makedev, mknod, Mode, SFlag};

use super::spec::mig_minors_table;
use super::{
    describe_output, elf_stub, io_err, mig_ci_minor, mig_gi_minor, FakeDriverError, FakeDriverSpec,
    FakeNode, BINARIES, CAPS_MAJOR, FAKE_NVML_LIBRARY, FIRMWARE, GENERATOR, GRAPHICS_CONFIGS, HOOK,
    IPC_SOCKETS, LIB32_DIR, LIB64_DIR, MPS_PIPE_DIR, NVIDIA_MAJOR, NVML_CONFIG_FILE, NVML_LOG_FILE,
    UVM_MAJOR,
};
use crate::host;

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
    use crate::gpu::scratch;

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

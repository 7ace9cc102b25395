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
//!
//! What a driver describes is in `spec`, the library stubs in `elf`, and building one on disk
//! (and running the generator against it) in `driver`.

use std::io;
use std::path::{Path, PathBuf};

use crate::host;

mod driver;
mod elf;
mod spec;

pub use driver::FakeDriver;
pub use elf::elf_stub;
pub use spec::{
    mig_ci_minor, mig_gi_minor, FakeDriverSpec, FakeGpu, FakeLibrary, FakeMig, FakeNode,
};

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

/// A fresh scratch directory path for a unit test (removed if a previous run left it).
#[cfg(test)]
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hb-fake-driver-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

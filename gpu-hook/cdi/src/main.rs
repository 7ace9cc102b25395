//! `hyperbox-gpu-cdi`: writes the node's CDI spec (`nvidia.com/gpu`) and the GPU cache
//! `hyperbox-gpu-hook` and the shim read, from NVML, the driver's `/proc` files and the
//! driver root. Run it when the driver loads and when MIG changes (`refresh`, from the
//! systemd unit or udev rule in `config/`), never per container.

mod nvml;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use hyperbox_gpu::cache::{NodeCache, DEFAULT_PATH, FORMAT};
use hyperbox_gpu::cdi::CdiSpec;
use hyperbox_gpu::discover;
use hyperbox_gpu::driver::{DriverError, DriverProc};

#[derive(Debug, Parser)]
#[command(name = "hyperbox-gpu-cdi", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Writes the CDI spec and the cache; fails, writing nothing, without a driver.
    Generate(Options),
    /// As `generate`, but without a driver removes the spec and cache (so nothing stale is
    /// left after the driver is unloaded), and leaves unchanged files untouched.
    Refresh(Options),
}

#[derive(Debug, Args)]
struct Options {
    /// The root the driver is installed under (`/`, or a containerised driver's root).
    #[arg(long, default_value = "/")]
    driver_root: PathBuf,
    /// Where the driver's proc files are.
    #[arg(long, default_value = "/proc")]
    proc_root: PathBuf,
    /// The root whose `dev/` holds the driver's device nodes.
    #[arg(long, default_value = "/")]
    dev_root: PathBuf,
    /// The CDI spec to write.
    #[arg(long, default_value = "/var/run/cdi/hyperbox-nvidia.json")]
    output: PathBuf,
    /// The cache the hook and the shim read.
    #[arg(long, default_value = DEFAULT_PATH)]
    cache: PathBuf,
    /// The hook the CDI spec names.
    #[arg(long, default_value = "/usr/local/bin/hyperbox-gpu-hook")]
    hook_path: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(o) => generate(o, false),
        Command::Refresh(o) => generate(o, true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-gpu-cdi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Removes `path` if it exists.
fn remove(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {
            eprintln!("hyperbox-gpu-cdi: removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

fn generate(o: &Options, refresh: bool) -> Result<()> {
    let driver = match DriverProc::read(&o.proc_root) {
        Ok(d) => d,
        Err(DriverError::NoDriver { path }) => {
            if refresh {
                eprintln!(
                    "hyperbox-gpu-cdi: no NVIDIA driver loaded ({} is absent): removing the spec and cache",
                    path.display()
                );
                remove(&o.output)?;
                return remove(&o.cache);
            }
            anyhow::bail!(
                "no NVIDIA driver loaded ({} is absent): nothing written",
                path.display()
            );
        }
        Err(e) => return Err(e.into()),
    };
    let library = nvml::library_path(&o.driver_root)?;
    let facts = nvml::read(&library, &driver)?;
    let files = discover::driver_files(&o.driver_root, &facts.driver_version)?;
    let cache = NodeCache {
        format: FORMAT,
        driver_version: facts.driver_version,
        cuda_version: facts.cuda_version,
        driver_root: o.driver_root.clone(),
        gpus: facts.gpus,
        control_nodes: driver.control_nodes(),
        modeset_node: driver.modeset_node(),
        files,
    };
    cache
        .validate()
        .map_err(|e| anyhow::anyhow!("the discovered driver is not usable: {e}"))?;
    for n in cache
        .control_nodes
        .iter()
        .chain(cache.gpus.iter().map(|g| &g.node))
    {
        let host = o.dev_root.join(n.path.trim_start_matches('/'));
        if !host.exists() {
            tracing::warn!(
                "device node {} does not exist (run nvidia-modprobe, or load the driver with \
                 ModifyDeviceFiles): a runtime reading the CDI spec will fail on it",
                host.display()
            );
        }
    }
    let spec = CdiSpec::for_node(&cache, &o.dev_root, &o.hook_path, &o.cache)?;
    if refresh && NodeCache::read(&o.cache).ok().as_ref() == Some(&cache) && o.output.exists() {
        eprintln!("hyperbox-gpu-cdi: unchanged: {}", o.output.display());
        return Ok(());
    }
    if let Some(dir) = o.output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    cache.write(&o.cache)?;
    spec.write_atomically(&o.output)?;
    eprintln!(
        "hyperbox-gpu-cdi: {} GPU(s), {} MIG device(s), {} driver file(s), driver {} (CUDA {}): wrote {} (cdiVersion {}) and {}",
        cache.gpus.len(),
        cache.gpus.iter().map(|g| g.mig.len()).sum::<usize>(),
        cache.files.len(),
        cache.driver_version,
        cache.cuda_version,
        o.output.display(),
        spec.cdi_version,
        o.cache.display()
    );
    Ok(())
}

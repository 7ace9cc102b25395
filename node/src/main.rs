//! `hyperbox-node`: HyperBox on a host. `doctor` tells what the host lacks, one line each
//! with its fix (see `doctor.rs`); `configure-containerd` adds HyperBox's runtimes and
//! snapshotter to containerd's configuration without clobbering it, and
//! `unconfigure-containerd` puts the file back byte for byte (see `containerd_config.rs`);
//! `install` puts a release's payload on the host, configures and restarts containerd and
//! verifies, `uninstall` undoes it, `verify` runs the checks alone (see `install.rs`).

mod containerd_config;
mod doctor;
mod host;
mod install;

use std::path::PathBuf;
use std::process::ExitCode;

use std::os::unix::fs::PermissionsExt;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "hyperbox-node", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// What this host lacks for HyperBox: kernel EROFS, cgroups, CRIU, containerd and what is
    /// registered with it, userfaultfd, the GPU driver's cache and CDI spec. Exits 1 when
    /// something is missing.
    Doctor(DoctorArgs),
    /// Adds HyperBox's CRI runtimes and the proxy snapshotter to containerd's configuration
    /// (in place for 1.6/1.7, as an imported drop-in for 2.x), keeping everything of the
    /// user's; the original is saved for `unconfigure-containerd`. containerd must then be
    /// restarted.
    ConfigureContainerd {
        #[command(flatten)]
        target: ConfigTarget,
        /// Print the change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Puts containerd's configuration back exactly as `configure-containerd` found it and
    /// removes the drop-in.
    UnconfigureContainerd {
        #[command(flatten)]
        target: ConfigTarget,
    },
    /// Installs a release's payload: binaries, units, CRIU where missing, containerd's
    /// configuration; restarts containerd and verifies. Idempotent.
    Install {
        #[command(flatten)]
        args: install::InstallArgs,
        /// Print what would change and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Undoes `install`: containerd's configuration back byte for byte, our files and units
    /// removed, what they replaced put back.
    Uninstall(install::UninstallArgs),
    /// Runs a container through each HyperBox runtime and a snapshot through the
    /// snapshotter, through containerd.
    Verify(install::VerifyArgs),
}

#[derive(Debug, clap::Args)]
struct DoctorArgs {
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: PathBuf,
    /// containerd's configuration file (default: containerd's own default).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The containerd binary.
    #[arg(long, default_value = "containerd")]
    containerd: String,
    /// The ctr binary.
    #[arg(long, default_value = "ctr")]
    ctr: String,
    /// The PATH containerd gives its shims (default: this process's).
    #[arg(long)]
    path: Option<String>,
    /// The GPU cache hyperbox-gpu-cdi writes.
    #[arg(long, default_value = hyperbox_gpu::cache::DEFAULT_PATH)]
    gpu_cache: PathBuf,
    /// The CDI spec hyperbox-gpu-cdi writes.
    #[arg(long, default_value = "/var/run/cdi/hyperbox-nvidia.json")]
    cdi_spec: PathBuf,
    /// The findings as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ConfigTarget {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    config: PathBuf,
    /// The containerd binary (its version picks the config version).
    #[arg(long, default_value = "containerd")]
    containerd: String,
    /// Where 2.x's drop-in goes.
    #[arg(long, default_value = "/etc/containerd/conf.d")]
    drop_in_dir: PathBuf,
    /// Where the original configuration is kept (root-only).
    #[arg(long, default_value = "/var/lib/hyperbox/node")]
    state_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::ConfigureContainerd { target, dry_run } => configure(&target, dry_run).map(drop),
        Command::UnconfigureContainerd { target } => unconfigure(&target),
        Command::Install { args, dry_run } => install::install(&args, dry_run).map(|()| {
            if args.stay {
                wait_for_termination();
            }
        }),
        Command::Uninstall(args) => install::uninstall(&args),
        Command::Verify(args) => install::verify(&args),
        Command::Doctor(args) => return doctor_main(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `configure-containerd` saved: enough to put everything back.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Saved {
    config: PathBuf,
    /// The file's text before the first configure; `None` when there was no file.
    original: Option<String>,
    drop_in: Option<PathBuf>,
}

const SAVED: &str = "containerd-config.json";

/// Blocks until SIGTERM or SIGINT.
fn wait_for_termination() {
    eprintln!("hyperbox-node: installed; staying until SIGTERM");
    // SAFETY: plain signal-set calls on a local set; no handlers are installed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

fn containerd_version(bin: &str) -> anyhow::Result<(u64, u64)> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {bin} --version"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = text
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| {
            w.split(|c: char| !c.is_ascii_digit())
                .take(2)
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match v.as_slice() {
        [major, minor] => Ok((*major, *minor)),
        _ => anyhow::bail!("{bin} --version says no version: {text:?}"),
    }
}

/// Adds HyperBox to containerd's configuration; whether a file changed.
fn configure(t: &ConfigTarget, dry_run: bool) -> anyhow::Result<bool> {
    let (major, minor) = containerd_version(&t.containerd)?;
    let current = match std::fs::read_to_string(&t.config) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", t.config.display())),
    };
    let before = current.clone().unwrap_or_default();
    let plan = containerd_config::plan(&t.config, &before, major, minor, &t.drop_in_dir)?;
    for key in &plan.kept {
        eprintln!(
            "hyperbox-node: {key} is already set in {}: left as it is",
            t.config.display()
        );
    }
    if dry_run {
        println!("--- {} (containerd {major}.{minor})", t.config.display());
        print!("{}", containerd_config::diff(&before, &plan.config));
        if let Some((path, text)) = &plan.drop_in {
            println!("--- {} (new)", path.display());
            print!("{}", containerd_config::diff("", text));
        }
        return Ok(false);
    }
    let drop_in_changed = plan
        .drop_in
        .as_ref()
        .is_some_and(|(path, text)| std::fs::read_to_string(path).ok().as_deref() != Some(text));
    let config_changed = plan.config != before;
    if !drop_in_changed && !config_changed {
        eprintln!(
            "hyperbox-node: containerd {major}.{minor}'s configuration already has HyperBox's runtimes and snapshotter"
        );
        return Ok(false);
    }
    let saved_path = t.state_dir.join(SAVED);
    if !saved_path.exists() {
        install::make_state_dir(&t.state_dir)?;
        let saved = Saved {
            config: t.config.clone(),
            original: current,
            drop_in: plan.drop_in.as_ref().map(|(p, _)| p.clone()),
        };
        hyperbox_gpu::atomic::write(&saved_path, &serde_json::to_vec_pretty(&saved)?, 0o600)
            .with_context(|| format!("cannot save the original to {}", saved_path.display()))?;
    }
    if let Some((path, text)) = plan.drop_in.as_ref().filter(|_| drop_in_changed) {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        hyperbox_gpu::atomic::write(path, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if config_changed {
        let mode = std::fs::metadata(&t.config)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        if let Some(dir) = t.config.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        hyperbox_gpu::atomic::write(&t.config, plan.config.as_bytes(), mode)
            .with_context(|| format!("cannot write {}", t.config.display()))?;
    }
    eprintln!(
        "hyperbox-node: containerd {major}.{minor}'s configuration has HyperBox's runtimes and snapshotter; restart containerd to apply"
    );
    Ok(true)
}

fn unconfigure(t: &ConfigTarget) -> anyhow::Result<()> {
    let saved_path = t.state_dir.join(SAVED);
    let saved: Saved = match std::fs::read(&saved_path) {
        Ok(data) => serde_json::from_slice(&data)
            .with_context(|| format!("{} is not ours", saved_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("nothing to undo: {} does not exist", saved_path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", saved_path.display())),
    };
    match &saved.original {
        Some(text) => hyperbox_gpu::atomic::write(&saved.config, text.as_bytes(), 0o644)
            .with_context(|| format!("cannot restore {}", saved.config.display()))?,
        None => match std::fs::remove_file(&saved.config) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", saved.config.display()))
            }
            _ => {}
        },
    }
    if let Some(drop_in) = &saved.drop_in {
        match std::fs::remove_file(drop_in) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", drop_in.display()))
            }
            _ => {}
        }
    }
    std::fs::remove_file(&saved_path)
        .with_context(|| format!("cannot remove {}", saved_path.display()))?;
    eprintln!(
        "hyperbox-node: {} is as it was; restart containerd to apply",
        saved.config.display()
    );
    Ok(())
}

fn doctor_main(args: DoctorArgs) -> ExitCode {
    let DoctorArgs {
        address,
        config,
        containerd,
        ctr,
        path,
        gpu_cache,
        cdi_spec,
        json,
    } = args;
    let host = host::RealHost {
        path: path.unwrap_or_else(|| std::env::var("PATH").unwrap_or_default()),
    };
    let opts = doctor::Options {
        address,
        config,
        containerd,
        ctr,
        gpu_cache,
        cdi_spec,
    };
    let findings = doctor::run(&host, &opts);
    if json {
        match serde_json::to_string_pretty(&findings) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("hyperbox-node: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        for f in &findings {
            println!("{f}");
        }
    }
    if doctor::any_missing(&findings) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

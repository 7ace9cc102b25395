//! `hyperbox-node`: HyperBox on a host. `doctor` tells what the host lacks, one line each
//! with its fix (see `doctor.rs`). Installing and uninstalling come with the node-install
//! work; until then `config/` and the README say what to put where.

mod doctor;
mod host;

use std::path::PathBuf;
use std::process::ExitCode;

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
    Doctor {
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor {
            address,
            config,
            containerd,
            ctr,
            path,
            gpu_cache,
            cdi_spec,
            json,
        } => {
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
    }
}

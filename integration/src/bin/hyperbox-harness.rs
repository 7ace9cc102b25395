//! `hyperbox-harness`: the sandbox guard the harness starts, and cleanup of sandboxes left by
//! killed test runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyperbox_integration::{cli, host, sandbox};

#[derive(Parser)]
#[command(about = "HyperBox test harness helper")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Wait for end-of-file on stdin (the owner's pipe), then tear down the sandbox DIR.
    Guard { dir: PathBuf },
    /// Tear down sandboxes whose owner is gone (all sandboxes with --all).
    Cleanup {
        #[arg(long)]
        all: bool,
    },
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit_code("hyperbox-harness", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Guard { dir } => {
            sandbox::run_guard(&dir).with_context(|| format!("guard of {}", dir.display()))
        }
        Cmd::Cleanup { all } => {
            let root = host::test_root();
            if all {
                let mut failed = 0;
                for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
                    if let Err(e) = sandbox::teardown_dir(&entry.path()) {
                        eprintln!("{e}");
                        failed += 1;
                    }
                }
                anyhow::ensure!(failed == 0, "{failed} sandboxes could not be cleaned");
            } else {
                sandbox::sweep_stale(&root);
            }
            Ok(())
        }
    }
}

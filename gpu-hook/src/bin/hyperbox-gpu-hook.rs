//! `hyperbox-gpu-hook`: the OCI hook (see `hyperbox_gpu::hook`). Built statically for
//! `x86_64-unknown-linux-musl` (`scripts/build-gpu-hook`), so no dynamic loader runs and
//! nothing from a container's environment (`LD_PRELOAD`, CVE-2025-23266) can reach it; it
//! clears its environment on entry anyway, and never executes anything.

use std::process::ExitCode;

use hyperbox_gpu::hook::{self, Args};

fn main() -> ExitCode {
    for (key, _) in std::env::vars_os() {
        std::env::remove_var(key);
    }
    let result = Args::parse(std::env::args().skip(1))
        .and_then(|args| hook::run(&args, std::io::stdin().lock()));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-gpu-hook: {e}");
            ExitCode::FAILURE
        }
    }
}

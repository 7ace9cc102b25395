//! `hyperbox-bench wasm`: `containerd-shim-hyperbox-wasm-v1` against runc.v2's native
//! containers, on one private containerd, in the same run.
//!
//! - **lifecycle**: `ctr run --rm` of a wasm hello (a WAT module printing one line, exit 0)
//!   from a root filesystem given with `--rootfs`, with the compile cache warm and cold (the
//!   module's cache entry deleted at the start of each cold run), the same module as an OCI
//!   wasm image (containerd 1.7), and busybox `echo hello` through `io.containerd.runc.v2`,
//!   all rotated round-robin. The shims' log lines for the module (`compiled`, `cache hit`)
//!   are counted afterwards, so every cold run is known to have compiled and every warm one
//!   to have hit.
//! - **memory**: K sleeping containers per runtime (a guest blocked in `poll_oneoff`;
//!   busybox `sleep 1000` through runc.v2), the runtime side read as `mem` does
//!   ([`memprobe`](crate::memprobe)), plus the container's own processes (for wasm the
//!   guest's process holds wasmtime and the compiled code).
//! - **kill**: a looping guest (and a busybox `sh` loop through runc.v2) started detached,
//!   then timed from spawning `ctr tasks kill -s SIGKILL` until containerd's `/tasks/exit`
//!   event for it arrives on a `ctr events` stream.

mod bench;
mod guests;
mod kill;
mod lifecycle;
mod memory;
mod results;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;
use hyperbox_integration::containerd::ContainerdVersion;

use crate::machine::Machine;
use crate::report;
use crate::runner::{Plan, Timings};

use bench::prepare;
use guests::remove_cache_entries;
use kill::kill;
use lifecycle::lifecycle;
use memory::memory;
use results::mib;

pub use guests::{count_cache_lines, is_cache_entry_of, CacheCounts};
pub use kill::{parse_exit_event, ExitEvent};
pub use memory::parse_cpu_ticks;
pub use results::{verdict, Goals, KillTimings, WasmMemRow, WasmReport};

/// HyperBox's wasm runtime.
pub const WASM_V1: &str = "io.containerd.hyperbox-wasm.v1";
/// Where the wasm shim keeps compiled guests (`hyperbox_shim_wasm::cache::CACHE_DIR`; not
/// linked here, to keep wasmtime out of the benchmark).
pub const COMPILE_CACHE_DIR: &str = "/var/lib/hyperbox/wasm-cache";
/// The goal: a warm wasm `ctr run --rm` at most this share of runc.v2's native one.
pub const GOAL_WARM_RATIO: f64 = 0.5;
/// The goal: at most this PSS (MiB) per running wasm container.
pub const GOAL_PSS_MIB: f64 = 12.0;

#[derive(Debug, Args)]
pub struct WasmArgs {
    /// Measured `ctr run --rm` rounds; each runs every variant once.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Unrecorded rounds first (lifecycle and kill).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Measured kill rounds; each kills one looping container per runtime.
    #[arg(long, default_value_t = 30)]
    kill_rounds: usize,
    /// K: sleeping containers per runtime, running at once when memory is read.
    #[arg(long, default_value_t = 10)]
    containers: usize,
    /// Seconds to wait after the last container started before reading /proc.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// The containerd version (OCI wasm images need 1.7).
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn ratio_of(t: &Timings, name: &str) -> Option<f64> {
    t.variants
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.ratio_to_baseline)
}

pub fn run(args: WasmArgs, command_line: String) -> anyhow::Result<()> {
    if args.rounds == 0 || args.kill_rounds == 0 {
        bail!("--rounds and --kill-rounds must be at least 1");
    }
    if args.containers == 0 {
        bail!("--containers must be at least 1");
    }
    if !(args.settle_secs.is_finite() && args.settle_secs >= 0.0) {
        bail!("--settle-secs must be a non-negative number of seconds");
    }
    let mut machine = Machine::collect(None);
    let b = prepare(args.containerd)?;
    machine.locate_runc(b.containerd().path_env());
    machine.restart_cpu_sample();
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline: None,
    };
    let (lifecycle, cache_seen, cache_expected) = lifecycle(&b, &plan)?;
    let memory = memory(&b, args.containers, args.settle_secs)?;
    let kill = kill(&b, args.kill_rounds, args.warmup)?;
    machine.finish();
    let _ = remove_cache_entries(&b.digest);

    let goals = Goals {
        warm_ratio: ratio_of(&lifecycle, "hyperbox-wasm warm").unwrap_or(f64::NAN),
        warm_image_ratio: ratio_of(&lifecycle, "hyperbox-wasm image warm"),
        wasm_pss_mib: memory
            .iter()
            .find(|r| r.runtime == WASM_V1)
            .map_or(f64::NAN, |r| mib(r.total_pss_kib.mean)),
    };
    let report = WasmReport {
        benchmark: "wasm".into(),
        command_line,
        machine,
        containerd: args.containerd.to_string(),
        hello_digest: b.digest.clone(),
        lifecycle,
        cache_seen,
        cache_expected,
        settle_secs: args.settle_secs,
        memory,
        kill,
        goals,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
        tracing::info!(path = %path.display(), "report written");
    }
    if cache_seen != cache_expected {
        bail!(
            "the compile cache did not behave as the variants say: {cache_seen:?} logged, \
             {cache_expected:?} expected"
        );
    }
    Ok(())
}

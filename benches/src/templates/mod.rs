//! `hyperbox-bench templates`: starting from a template of `containerd-shim-hyperbox-v1`
//! against starting cold, and checkpoint/restore through ours against runc.v2's shim, on one
//! private containerd per version (one at a time), in the same run.
//!
//! - **python** and **busybox**: time to ready, from spawning `ctr run -d` until a GET of
//!   `127.0.0.1:8000/` in the container's network namespace (one of its own, loopback up,
//!   joined with `--with-ns network:FILE`) first returns a body, polled every 5 ms. Three
//!   variants, rotated round-robin: cold through `io.containerd.runc.v2`, cold through ours,
//!   and restored through ours from a template (`io.hyperbox.restore-from`) captured once
//!   before the rounds (`io.hyperbox.template.capture`, not timed, but its capture time and
//!   size are reported). The Python service ([`PY_SERVICE`]) warms up for about 2 s; busybox
//!   `httpd` serves at once. A restored copy must answer with the template's body (the Python
//!   service's start time, httpd's random page), a cold one with a body of its own, so each
//!   run is known to have been what its variant says. The time until `ctr run -d` returned
//!   is kept too. The captured service is asked nothing until its template is kept (CRIU
//!   refuses to dump a connection not yet accepted). After each run (not timed) the task is
//!   killed and deleted, the container removed and the network namespace unbound.
//! - **checkpoint/restore**: a busybox shell loop that writes no file, per round and runtime:
//!   started detached, then `ctr containers checkpoint --task ID REF` timed, the task and
//!   container removed, then `ctr containers restore --live ID REF` timed (ctr restores with
//!   the runtime the checkpoint records), then removed again with the checkpoint image.
//!   Skipped, with busybox, when `--busybox-rounds 0`.
//! - **python, pulled**: a fourth variant of the Python table. After its capture `py-tpl` is
//!   pushed to the test bed's loopback registry (`containerd-shim-hyperbox-v1 templates push`,
//!   timed, its size as the shim says it) and pulled back into the same store as `py-pulled`
//!   (`templates pull REF@DIGEST py-pulled`, timed); the variant restores from `py-pulled`.
//! - **heap**: a Python service holding `--heap-mib` MiB of random heap
//!   ([`py_heap_service`]), captured once as `heap-tpl`; per round, rotated: cold through
//!   runc.v2, restored eagerly through ours, restored lazily through ours
//!   (`io.hyperbox.restore-lazy=true`, CRIU's lazy-pages daemon). Time to ready as above;
//!   time until all pages are in (for lazy: until no process whose command line holds
//!   `lazy-pages` and the container's id is left, polled every 5 ms; otherwise ready); then,
//!   untimed into ready, `GET /sum` (the heap hashed again), which must match the heap's
//!   hash at start, and which restored copies must share with the captured service.

mod bench;
mod capture;
mod checkpoint;
mod heap;
mod parse;
mod ready;
mod results;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::workloads::{py_heap_service, PY_SERVICE};

use crate::engines::{Engine, HYPERBOX_V1};
use crate::machine::Machine;
use crate::report;

use bench::{Bench, Workload};
use ready::READY_VARIANTS;
use results::median_of;

pub use bench::run_args;
pub use parse::{heap_sha, is_lazy_pages_of, parse_pushed, parse_sum, size_bytes, Pushed};
pub use results::{
    p90, Capture, CheckpointPart, Distribution, Goals, HeapPart, ReadyPart, Table, TemplatesReport,
    VersionReport,
};

/// The annotation that makes ours keep a template of a container once it is ready.
pub const CAPTURE: &str = "io.hyperbox.template.capture";
/// The annotation naming a file whose creation says the container is ready.
pub const READY_FILE: &str = "io.hyperbox.template.ready-file";
/// The annotation saying the container is ready after this long.
pub const READY_DELAY: &str = "io.hyperbox.template.ready-delay";
/// The annotation that makes ours restore a container from a template.
pub const RESTORE_FROM: &str = "io.hyperbox.restore-from";
/// The annotation that makes ours restore memory lazily (CRIU's lazy-pages daemon).
pub const RESTORE_LAZY: &str = "io.hyperbox.restore-lazy";
/// What the pulled copy of the Python template is called in the store.
pub const PULLED_NAME: &str = "py-pulled";
/// Ours, as a binary (for `templates inspect`).
const SHIM: &str = "containerd-shim-hyperbox-v1";

/// Goal: a Python service restored from its template ready in at most this share of the
/// time it takes cold through ours.
pub const GOAL_RESTORED_OVER_COLD: f64 = 0.1;
/// Goal: a trivial process restored from its template ready in under this many ms (median).
pub const GOAL_RESTORED_MS: f64 = 100.0;
/// Goal: `ctr containers restore --live` through ours at most this share of runc.v2's.
pub const GOAL_RESTORE_OVER_RUNC: f64 = 0.7;
/// Goal: the heap service restored lazily ready in at most this share of the time it takes
/// restored eagerly (medians).
pub const GOAL_LAZY_OVER_EAGER: f64 = 0.2;
/// Goal: the heap service restored lazily ready in at most this many ms (median).
pub const GOAL_LAZY_READY_MS: f64 = 250.0;

/// Serves a page of its own (a random UUID, written at start) on 127.0.0.1:8000, at once.
const HTTPD: &str = "mkdir -p /tmp/www && cat /proc/sys/kernel/random/uuid > /tmp/www/index.html \
                     && exec httpd -f -p 127.0.0.1:8000 -h /tmp/www";
/// Counts in memory, writing no file (a restore's fresh root filesystem lacks nothing).
const LOOP: &str = "i=0; while :; do i=$((i+1)); sleep 0.1; done";

/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(5);
/// How long one GET may wait to connect, and then for its answer.
const GET_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a container may take to be ready, or a template to be kept.
const READY_LIMIT: Duration = Duration::from_secs(90);
/// How long `GET /sum` of the heap service may wait for its answer.
const SUM_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `templates push` or `templates pull` may take.
const DISTRIBUTION_LIMIT: Duration = Duration::from_secs(300);

#[derive(Debug, Args)]
pub struct TemplatesArgs {
    /// Measured rounds of the Python service; each starts it once per variant (cold ~3 s).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Measured rounds of busybox httpd and of checkpoint/restore (0 skips both parts).
    #[arg(long, default_value_t = 20)]
    busybox_rounds: usize,
    /// MiB of heap the heap service fills (and a template of it holds).
    #[arg(long, default_value_t = 1024)]
    heap_mib: usize,
    /// Measured rounds of the heap service: runc.v2 cold, restored eagerly, lazily (0 skips).
    #[arg(long, default_value_t = 5)]
    heap_rounds: usize,
    /// Unrecorded rounds first, in every part.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// containerd versions, comma-separated (measured one after the other).
    #[arg(long, value_delimiter = ',', default_value = "1.7")]
    containerd: Vec<ContainerdVersion>,
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Measures everything on containerd `version`; the CPU sample of `machine` starts once its
/// images are pulled (for the first version: later ones' set-up falls inside it).
fn measure(
    version: ContainerdVersion,
    args: &TemplatesArgs,
    machine: &mut Machine,
    first: bool,
) -> anyhow::Result<VersionReport> {
    let engine =
        Engine::start(version).with_context(|| format!("preparing containerd {version}"))?;
    engine.check_runtime(HYPERBOX_V1)?;
    let python = engine
        .bed
        .image(TestImage::DebianPython)
        .with_context(|| format!("preparing debian-python on containerd {version}"))?;
    if first {
        machine.locate_runc(engine.bed.containerd.path_env());
        machine.restart_cpu_sample();
    }
    let b = Bench { engine, python };
    let python = Workload {
        label: "python service",
        tag: "py",
        image: &b.python,
        cmd: vec!["python3", "-c", PY_SERVICE],
        ready: (READY_FILE, "/ready"),
    };
    let busybox = Workload {
        label: "busybox httpd",
        tag: "bb",
        image: &b.engine.image,
        cmd: vec!["sh", "-c", HTTPD],
        ready: (READY_DELAY, "300ms"),
    };
    let heap_service = py_heap_service(args.heap_mib);
    let heap = Workload {
        label: "python heap service",
        tag: "heap",
        image: &b.python,
        cmd: vec!["python3", "-c", heap_service.as_str()],
        ready: (READY_FILE, "/ready"),
    };
    let python = b.ready_part(&python, &READY_VARIANTS, args.rounds, args.warmup)?;
    let (busybox, checkpoint) = if args.busybox_rounds > 0 {
        let busybox = b.ready_part(
            &busybox,
            &READY_VARIANTS[..3],
            args.busybox_rounds,
            args.warmup,
        )?;
        let checkpoint = b.checkpoint_part(args.busybox_rounds, args.warmup)?;
        (Some(busybox), Some(checkpoint))
    } else {
        (None, None)
    };
    let heap = if args.heap_rounds > 0 {
        Some(b.heap_part(&heap, args.heap_mib, args.heap_rounds, args.warmup)?)
    } else {
        None
    };
    let goals = Goals {
        python_restored_over_cold: python.restored_over_cold,
        busybox_restored_ms: busybox
            .as_ref()
            .map(|p| median_of(&p.ready, "hyperbox restored")),
        restore_over_runc: checkpoint
            .as_ref()
            .map(|cp| median_of(&cp.restore, "hyperbox") / median_of(&cp.restore, "runc.v2")),
        heap_lazy_over_eager: heap.as_ref().map(|h| h.lazy_over_eager),
        heap_lazy_ready_ms: heap.as_ref().map(|h| h.lazy_ready_ms),
    };
    Ok(VersionReport {
        containerd: version.to_string(),
        python,
        busybox,
        checkpoint,
        heap,
        goals,
    })
}

pub fn run(args: TemplatesArgs, command_line: String) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1 (--busybox-rounds 0 and --heap-rounds 0 skip parts)");
    }
    if args.heap_rounds > 0 && args.heap_mib == 0 {
        bail!("--heap-mib must be at least 1 (or --heap-rounds 0 to skip the heap part)");
    }
    let mut versions: Vec<ContainerdVersion> = Vec::new();
    for v in &args.containerd {
        if !versions.contains(v) {
            versions.push(*v);
        }
    }
    if versions.is_empty() {
        bail!("no containerd version given: use --containerd 1.6,1.7");
    }
    let mut machine = Machine::collect(None);
    let mut reports = Vec::new();
    for (i, v) in versions.into_iter().enumerate() {
        let report = measure(v, &args, &mut machine, i == 0)
            .with_context(|| format!("on containerd {v}"))?;
        reports.push(report);
    }
    machine.finish();
    let report = TemplatesReport {
        benchmark: "templates".into(),
        command_line,
        machine,
        versions: reports,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
        tracing::info!(path = %path.display(), "report written");
    }
    Ok(())
}

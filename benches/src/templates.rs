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

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::workloads::{
    connect_in_network, get_in_network, network_with_loopback, py_heap_service, remove_network,
    PY_SERVICE, PY_SERVICE_PORT,
};
use serde::Serialize;

use crate::engines::{parse_tasks_ls, Engine, HYPERBOX_V1, RUNC_V2};
use crate::machine::Machine;
use crate::report;
use crate::runner::{self, describe, Timings, VariantTimes};
use crate::stats::{percentile_nearest_rank, rotation};
use crate::wasm::verdict;

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

/// A template captured before the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Capture {
    pub name: String,
    /// The readiness annotation it was captured with.
    pub readiness: String,
    /// From spawning `ctr run -d` until the template was kept (`template.json` written).
    pub kept_ms: f64,
    /// The template's size on disk, as `containerd-shim-hyperbox-v1 templates inspect` says.
    pub bytes: u64,
    /// What the captured container answered (every restored copy answers the same).
    pub body: String,
    /// `templates inspect`'s record.
    pub record: serde_json::Value,
}

/// One timed table, with the nearest-rank p90 of each variant beside the summaries.
#[derive(Debug, Clone, Serialize)]
pub struct Table {
    pub timings: Timings,
    /// Per variant, in the order of `timings.variants`, ms.
    pub p90_ms: Vec<f64>,
}

/// A template pushed to the registry and pulled back under another name.
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    /// The template pushed.
    pub template: String,
    /// `templates push -n NS NAME REF`, as run.
    pub push_command: String,
    /// From spawning `templates push` until it exited.
    pub push_ms: f64,
    /// The reference pushed to, and the digest `push` printed.
    pub reference: String,
    pub digest: String,
    /// The pushed size as `push` printed it (`12.3 MiB`), and in bytes (to its precision).
    pub pushed_size: String,
    pub pushed_bytes: Option<u64>,
    /// `templates pull -n NS REF@DIGEST NAME`, as run.
    pub pull_command: String,
    /// From spawning `templates pull` until it exited.
    pub pull_ms: f64,
    /// The name pulled as.
    pub pulled: String,
    /// The pulled template's size, `templates inspect`'s `bytes`.
    pub pulled_bytes: u64,
    /// `templates inspect`'s record of the pulled template.
    pub record: serde_json::Value,
}

/// Time to ready of one workload: cold through runc.v2 and ours, restored through ours
/// (and, for the Python service, restored through ours from the template pulled back).
#[derive(Debug, Clone, Serialize)]
pub struct ReadyPart {
    pub workload: String,
    pub template: Capture,
    /// The template through the registry, when a variant restores from its pulled copy.
    pub distribution: Option<Distribution>,
    /// Ratios of medians to runc.v2 cold.
    pub ready: Table,
    /// The same runs, until `ctr run -d` returned (it may return before or after the
    /// service answers).
    pub ctr_returned: Table,
    /// Median restored over median cold, both through ours.
    pub restored_over_cold: f64,
    /// Median restored from the pulled template over median restored from the local one.
    pub pulled_over_restored: Option<f64>,
}

/// The heap service: cold through runc.v2, restored eagerly and lazily through ours.
#[derive(Debug, Clone, Serialize)]
pub struct HeapPart {
    pub workload: String,
    pub heap_mib: usize,
    pub template: Capture,
    /// Time to ready; ratios of medians to runc.v2 cold.
    pub ready: Table,
    /// From spawning `ctr run -d` until all pages are in (lazy: the lazy-pages daemon of the
    /// container exited; otherwise ready).
    pub all_pages_in: Table,
    /// `GET /sum` after all pages are in, until its answer.
    pub sum: Table,
    /// Measured lazy runs whose lazy-pages daemon was still running when they were ready,
    /// of how many.
    pub lazy_daemon_seen: usize,
    pub lazy_runs: usize,
    /// Median lazy ready over median eager ready.
    pub lazy_over_eager: f64,
    /// Median lazy ready, ms.
    pub lazy_ready_ms: f64,
}

/// `ctr containers checkpoint --task` and `ctr containers restore --live` per runtime.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointPart {
    pub workload: String,
    /// Ratios of medians to runc.v2.
    pub checkpoint: Table,
    pub restore: Table,
}

/// The goals beside what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// Python: restored median over cold median, through ours.
    pub python_restored_over_cold: f64,
    /// busybox httpd: restored median, ms (none when skipped).
    pub busybox_restored_ms: Option<f64>,
    /// `ctr containers restore --live`: ours' median over runc.v2's (none when skipped).
    pub restore_over_runc: Option<f64>,
    /// Heap service: lazy ready median over eager ready median (none when skipped).
    pub heap_lazy_over_eager: Option<f64>,
    /// Heap service: lazy ready median, ms (none when skipped).
    pub heap_lazy_ready_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionReport {
    pub containerd: String,
    pub python: ReadyPart,
    /// None with `--busybox-rounds 0`.
    pub busybox: Option<ReadyPart>,
    /// None with `--busybox-rounds 0`.
    pub checkpoint: Option<CheckpointPart>,
    /// None with `--heap-rounds 0`.
    pub heap: Option<HeapPart>,
    pub goals: Goals,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemplatesReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub versions: Vec<VersionReport>,
}

/// The nearest-rank 90th percentile of `samples` (NaN when empty).
pub fn p90(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile_nearest_rank(&sorted, 90).unwrap_or(f64::NAN)
}

fn table(times: Vec<VariantTimes>, rounds: usize, warmup: usize) -> Table {
    let baseline = times.first().map(|t| t.name.clone()).unwrap_or_default();
    let p90_ms = times.iter().map(|t| p90(&t.samples_ms)).collect();
    Table {
        timings: Timings {
            rounds,
            warmup,
            baseline,
            variants: runner::summarize(times, 0),
        },
        p90_ms,
    }
}

/// The table of variants `names` run as `commands`, each with its samples, timed `until`.
fn named_table(
    names: &[&str],
    commands: &[String],
    samples: Vec<Vec<f64>>,
    until: &str,
    rounds: usize,
    warmup: usize,
) -> Table {
    let times = names
        .iter()
        .zip(commands)
        .zip(samples)
        .map(|((name, command), s)| VariantTimes {
            name: name.to_string(),
            command: format!("{command} ({until})"),
            samples_ms: s,
        })
        .collect();
    table(times, rounds, warmup)
}

fn median_of(t: &Table, name: &str) -> f64 {
    t.timings
        .variants
        .iter()
        .find(|v| v.name == name)
        .map_or(f64::NAN, |v| v.summary.median)
}

fn render_table(t: &Table) -> String {
    let v = &t.timings.variants;
    let width = v.iter().map(|v| v.name.len()).max().unwrap_or(0).max(7);
    let mut s = format!(
        "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
        "variant", "runs", "median", "p90", "p95", "mean", "min", "max", "×runc"
    );
    let digits = report::decimals_for(v.iter().map(|v| v.summary.median));
    for (v, p90) in v.iter().zip(&t.p90_ms) {
        let m = &v.summary;
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  \
             {:>8.digits$}  {:>8.digits$}  {:>8.3}\n",
            v.name, m.runs, m.median, p90, m.p95, m.mean, m.min, m.max, v.ratio_to_baseline
        ));
    }
    s
}

fn render_ready(p: &ReadyPart, containerd: &str) -> String {
    let c = &p.template;
    let t = &p.ready.timings;
    let mut s = format!(
        "{} on containerd {containerd}: template {:?} kept {:.1} ms after spawning `ctr run -d` \
         ({}), {:.1} MiB on disk\n",
        p.workload,
        c.name,
        c.kept_ms,
        c.readiness,
        c.bytes as f64 / (1024.0 * 1024.0)
    );
    if let Some(d) = &p.distribution {
        s.push_str(&format!(
            "template {:?} pushed to {}@{} in {:.1} ms ({}), pulled back as {:?} in {:.1} ms, \
             {:.1} MiB on disk\n",
            d.template,
            d.reference,
            d.digest,
            d.push_ms,
            d.pushed_size,
            d.pulled,
            d.pull_ms,
            d.pulled_bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    s.push_str(&format!(
        "time to ready, from spawning `ctr run -d` until a GET in its netns answers ({} rounds \
         after {} warm-up, rotated; ms; ratio of medians to runc.v2 cold)\n",
        t.rounds, t.warmup
    ));
    s.push_str(&render_table(&p.ready));
    s.push_str("the same runs, until `ctr run -d` returned:\n");
    s.push_str(&render_table(&p.ctr_returned));
    s.push_str(&format!(
        "restored / cold, both through ours: {:.4}\n",
        p.restored_over_cold
    ));
    if let Some(r) = p.pulled_over_restored {
        s.push_str(&format!(
            "restored from the pulled template / from the local one: {r:.4}\n"
        ));
    }
    s
}

fn render_heap(p: &HeapPart, containerd: &str) -> String {
    let c = &p.template;
    let t = &p.ready.timings;
    let mut s = format!(
        "{} ({} MiB) on containerd {containerd}: template {:?} kept {:.1} ms after spawning \
         `ctr run -d` ({}), {:.1} MiB on disk\n",
        p.workload,
        p.heap_mib,
        c.name,
        c.kept_ms,
        c.readiness,
        c.bytes as f64 / (1024.0 * 1024.0)
    );
    s.push_str(&format!(
        "time to ready, from spawning `ctr run -d` until a GET in its netns answers ({} rounds \
         after {} warm-up, rotated; ms; ratio of medians to runc.v2 cold)\n",
        t.rounds, t.warmup
    ));
    s.push_str(&render_table(&p.ready));
    s.push_str(
        "the same runs, until all pages were in (lazy: its lazy-pages daemon exited; \
         otherwise ready):\n",
    );
    s.push_str(&render_table(&p.all_pages_in));
    s.push_str(
        "`GET /sum` afterwards (the whole heap hashed again, matching its hash at start):\n",
    );
    s.push_str(&render_table(&p.sum));
    s.push_str(&format!(
        "lazy / eager ready: {:.4}; lazy-pages daemon still running when ready in {} of {} \
         lazy runs\n",
        p.lazy_over_eager, p.lazy_daemon_seen, p.lazy_runs
    ));
    s
}

impl TemplatesReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}", self.command_line, self.machine.render());
        for v in &self.versions {
            let cv = &v.containerd;
            s.push('\n');
            s.push_str(&render_ready(&v.python, cv));
            if let Some(busybox) = &v.busybox {
                s.push('\n');
                s.push_str(&render_ready(busybox, cv));
            }
            if let Some(cp) = &v.checkpoint {
                s.push_str(&format!(
                    "\n{} on containerd {cv}: `ctr containers checkpoint --task ID REF` ({} \
                     rounds after {} warm-up, rotated; ms; ratio of medians to runc.v2)\n",
                    cp.workload, cp.checkpoint.timings.rounds, cp.checkpoint.timings.warmup
                ));
                s.push_str(&render_table(&cp.checkpoint));
                s.push_str("`ctr containers restore --live ID REF`, until it returned:\n");
                s.push_str(&render_table(&cp.restore));
            }
            if let Some(heap) = &v.heap {
                s.push('\n');
                s.push_str(&render_heap(heap, cv));
            }
            let g = &v.goals;
            s.push_str(&format!("\ngoals on containerd {cv}:\n"));
            s.push_str(&format!(
                "python restored ≤ {GOAL_RESTORED_OVER_COLD} × cold through ours: {:.4} ({})\n",
                g.python_restored_over_cold,
                verdict(g.python_restored_over_cold, GOAL_RESTORED_OVER_COLD)
            ));
            if let Some(ms) = g.busybox_restored_ms {
                // Strictly under: `verdict` is "at most".
                let fast = ms < GOAL_RESTORED_MS;
                s.push_str(&format!(
                    "busybox restored median < {GOAL_RESTORED_MS} ms: {ms:.1} ms ({})\n",
                    if fast { "met" } else { "missed" }
                ));
            }
            if let Some(r) = g.restore_over_runc {
                s.push_str(&format!(
                    "restore --live through ours ≤ {GOAL_RESTORE_OVER_RUNC} × runc.v2's: {r:.4} \
                     ({})\n",
                    verdict(r, GOAL_RESTORE_OVER_RUNC)
                ));
            }
            if let Some(r) = g.heap_lazy_over_eager {
                s.push_str(&format!(
                    "heap lazy ready ≤ {GOAL_LAZY_OVER_EAGER} × eager ready: {r:.4} ({})\n",
                    verdict(r, GOAL_LAZY_OVER_EAGER)
                ));
            }
            if let Some(ms) = g.heap_lazy_ready_ms {
                s.push_str(&format!(
                    "heap lazy ready median ≤ {GOAL_LAZY_READY_MS} ms: {ms:.1} ms ({})\n",
                    verdict(ms, GOAL_LAZY_READY_MS)
                ));
            }
        }
        s
    }
}

/// A network namespace with its loopback up, bound at a file, unbound when dropped.
struct Netns(PathBuf);

impl Netns {
    fn new(c: &Containerd, id: &str) -> anyhow::Result<Netns> {
        let file = c.dir().join(format!("netns-{id}"));
        network_with_loopback(&file).map_err(anyhow::Error::msg)?;
        Ok(Netns(file))
    }

    fn remove(mut self) -> anyhow::Result<()> {
        let file = std::mem::take(&mut self.0);
        remove_network(&file).map_err(anyhow::Error::msg)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            if let Err(e) = remove_network(&self.0) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// `ctr run -d --null-io --runtime RUNTIME [--with-ns network:FILE] [--annotation K=V]...
/// IMAGE ID CMD...` as arguments of `ctr`.
pub fn run_args(
    runtime: &str,
    netns: Option<&Path>,
    annotations: &[(&str, &str)],
    image: &str,
    id: &str,
    cmd: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["run", "-d", "--null-io", "--runtime", runtime]
        .map(String::from)
        .to_vec();
    if let Some(ns) = netns {
        args.push("--with-ns".into());
        args.push(format!("network:{}", ns.display()));
    }
    for (k, v) in annotations {
        args.push("--annotation".into());
        args.push(format!("{k}={v}"));
    }
    args.push(image.into());
    args.push(id.into());
    args.extend(cmd.iter().map(|a| a.to_string()));
    args
}

/// What a variant of a ready part starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    Cold,
    /// From the template captured on this node.
    Restored,
    /// From the template pushed to the registry and pulled back as [`PULLED_NAME`].
    Pulled,
}

/// One variant of a ready part.
struct ReadyVariant {
    name: &'static str,
    runtime: &'static str,
    start: Start,
}

/// The variants of the Python table; busybox's are the first three (no registry).
const READY_VARIANTS: [ReadyVariant; 4] = [
    ReadyVariant {
        name: "runc.v2 cold",
        runtime: RUNC_V2,
        start: Start::Cold,
    },
    ReadyVariant {
        name: "hyperbox cold",
        runtime: HYPERBOX_V1,
        start: Start::Cold,
    },
    ReadyVariant {
        name: "hyperbox restored",
        runtime: HYPERBOX_V1,
        start: Start::Restored,
    },
    ReadyVariant {
        name: "hyperbox pulled",
        runtime: HYPERBOX_V1,
        start: Start::Pulled,
    },
];

/// How the heap service is started in a variant of the heap part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeapStart {
    Cold,
    Eager,
    Lazy,
}

/// One variant of the heap part.
struct HeapVariant {
    name: &'static str,
    runtime: &'static str,
    start: HeapStart,
}

const HEAP_VARIANTS: [HeapVariant; 3] = [
    HeapVariant {
        name: "runc.v2 cold",
        runtime: RUNC_V2,
        start: HeapStart::Cold,
    },
    HeapVariant {
        name: "hyperbox eager",
        runtime: HYPERBOX_V1,
        start: HeapStart::Eager,
    },
    HeapVariant {
        name: "hyperbox lazy",
        runtime: HYPERBOX_V1,
        start: HeapStart::Lazy,
    },
];

/// What `templates push` printed: `pushed template NAME to REF@DIGEST (SIZE)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub reference: String,
    pub digest: String,
    pub size: String,
}

/// Parses `templates push`'s output (its last line that says `pushed template`).
pub fn parse_pushed(output: &str) -> Option<Pushed> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("pushed template "))?
        .trim();
    let (_, rest) = line.split_once(" to ")?;
    let (pinned, size) = rest.rsplit_once(" (")?;
    let size = size.strip_suffix(')')?;
    let (reference, digest) = pinned.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    if reference.is_empty() || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(Pushed {
        reference: reference.to_string(),
        digest: digest.to_string(),
        size: size.to_string(),
    })
}

/// `12.3 MiB` or `4.0 KiB` (the shim's way to print sizes) in bytes, to its precision.
pub fn size_bytes(size: &str) -> Option<u64> {
    let (n, unit) = size.trim().split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then(|| (n * scale).round() as u64)
}

/// Whether `cmdline` (a /proc/PID/cmdline: NUL-separated arguments) is CRIU's lazy-pages
/// daemon of container `id`: an argument is `lazy-pages`, and a path among the arguments
/// has `id` as one of its components (the daemon's `-W BUNDLE/criu-work`, the bundle being
/// `.../NAMESPACE/ID`), so `id` is not matched inside a longer id.
pub fn is_lazy_pages_of(cmdline: &[u8], id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let args = || cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    args().any(|a| a == b"lazy-pages")
        && args().any(|a| {
            Path::new(OsStr::from_bytes(a))
                .components()
                .any(|c| c.as_os_str().as_bytes() == id.as_bytes())
        })
}

/// Whether a lazy-pages daemon of container `id` is running (a scan of /proc).
fn lazy_pages_running(id: &str) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        name.as_bytes().iter().all(u8::is_ascii_digit)
            && fs::read(e.path().join("cmdline")).is_ok_and(|c| is_lazy_pages_of(&c, id))
    })
}

/// The `S` of the heap service's `heap started=T sha=S`.
pub fn heap_sha(body: &str) -> Option<&str> {
    let rest = body.trim().strip_prefix("heap ")?;
    rest.split_whitespace()
        .find_map(|f| f.strip_prefix("sha="))
        .filter(|s| !s.is_empty())
}

/// `(N, S)` of the heap service's `sum now=N sha=S`.
pub fn parse_sum(body: &str) -> Option<(&str, &str)> {
    let rest = body.trim().strip_prefix("sum ")?;
    let mut now = None;
    let mut sha = None;
    for f in rest.split_whitespace() {
        if let Some(v) = f.strip_prefix("now=") {
            now = Some(v);
        } else if let Some(v) = f.strip_prefix("sha=") {
            sha = Some(v);
        }
    }
    match (now, sha) {
        (Some(n), Some(s)) if !n.is_empty() && !s.is_empty() => Some((n, s)),
        _ => None,
    }
}

/// `GET /sum` of the heap service in the network namespace at `netns`: its body, and how
/// long from connecting until the answer was read, ms.
fn get_sum(netns: &Path) -> Result<(String, f64), String> {
    let start = Instant::now();
    let mut stream = connect_in_network(netns, PY_SERVICE_PORT, Duration::from_secs(10))?;
    stream
        .set_read_timeout(Some(SUM_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SUM_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /sum HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the answer to GET /sum: {e}"))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .ok_or_else(|| format!("no HTTP body in {text:?}"))?;
    Ok((body.to_string(), ms))
}

/// A workload served on 127.0.0.1:8000: its image, command, and how a template of it is
/// known to be ready.
struct Workload<'a> {
    label: &'static str,
    /// Short, for container ids and the template's name.
    tag: &'static str,
    image: &'a str,
    cmd: Vec<&'a str>,
    ready: (&'static str, &'static str),
}

/// One start until ready.
struct Ready {
    /// When `ctr run -d` was spawned.
    spawned: Instant,
    /// The first body the service answered.
    body: String,
    /// From spawning `ctr run -d` until that answer.
    ready_ms: f64,
    /// From spawning `ctr run -d` until it exited.
    returned_ms: f64,
}

/// The benchmark's set-up for one containerd version.
struct Bench {
    engine: Engine,
    python: String,
}

impl Bench {
    fn containerd(&self) -> &Containerd {
        &self.engine.bed.containerd
    }

    fn fail(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!(
            "{what}\ncontainerd's log ends:\n{}",
            self.containerd().log_tail(40)
        )
    }

    /// Spawns `ctr ARGS`, stdout discarded, stderr kept.
    fn spawn_ctr(&self, args: &[String]) -> anyhow::Result<(Child, String)> {
        let mut cmd = self.containerd().ctr();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
        Ok((child, shown))
    }

    /// Fails unless the `ctr` `child` ended well.
    fn finish_ctr(&self, child: Child, shown: &str) -> anyhow::Result<()> {
        let out = self
            .containerd()
            .wait_ctr(child, Duration::from_secs(60))
            .with_context(|| format!("waiting for {shown}"))?;
        if !out.status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// When the `ctr` `child` spawned at `start` exited, ms after `start`, if it has; fails
    /// if it failed.
    fn ctr_returned(
        &self,
        child: &mut Child,
        shown: &str,
        start: Instant,
    ) -> anyhow::Result<Option<f64>> {
        match child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                let stderr = child
                    .stderr
                    .take()
                    .and_then(|e| std::io::read_to_string(e).ok())
                    .unwrap_or_default();
                Err(self.fail(format!("`{shown}` failed ({status}): {}", stderr.trim())))
            }
            Ok(Some(_)) => Ok(Some(start.elapsed().as_secs_f64() * 1e3)),
            Ok(None) => Ok(None),
            Err(e) => bail!("cannot wait for {shown}: {e}"),
        }
    }

    /// Spawns `ctr run -d ...` and polls a GET in `netns` every [`POLL`] until it returns a
    /// body; also notes when `ctr` returned.
    fn run_until_ready(&self, args: &[String], netns: &Path) -> anyhow::Result<Ready> {
        let start = Instant::now();
        let (mut child, shown) = self.spawn_ctr(args)?;
        let mut returned_ms = None;
        loop {
            if let Ok(body) = get_in_network(netns, PY_SERVICE_PORT, GET_TIMEOUT) {
                let ready_ms = start.elapsed().as_secs_f64() * 1e3;
                // `ctr run -d` returns once the task runs: soon, if not yet.
                while returned_ms.is_none() {
                    returned_ms = self.ctr_returned(&mut child, &shown, start)?;
                    if start.elapsed() > READY_LIMIT {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(self.fail(format!("`{shown}` did not return")));
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                self.finish_ctr(child, &shown)?;
                return Ok(Ready {
                    spawned: start,
                    body,
                    ready_ms,
                    returned_ms: returned_ms.unwrap_or(f64::NAN),
                });
            }
            if returned_ms.is_none() {
                returned_ms = self.ctr_returned(&mut child, &shown, start)?;
            }
            if start.elapsed() > READY_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!(
                    "no answer on 127.0.0.1:{PY_SERVICE_PORT} within {READY_LIMIT:?} of `{shown}`"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Kills and deletes the task `id`, and removes its container.
    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.engine
            .remove(&[id.to_string()])
            .map_err(|e| self.fail(format!("removing {id}: {e}")))
    }

    /// The store of this daemon's namespace.
    fn store(&self) -> PathBuf {
        let c = self.containerd();
        c.template_root().join(c.namespace())
    }

    /// Waits until template `name` is kept, failing at once with why its capture failed.
    fn wait_template(&self, name: &str, since: Instant) -> anyhow::Result<f64> {
        let record = self.store().join(name).join("template.json");
        let error = self.store().join(format!(".{name}.error"));
        loop {
            if record.is_file() {
                return Ok(since.elapsed().as_secs_f64() * 1e3);
            }
            if let Ok(reason) = fs::read_to_string(&error) {
                return Err(self.fail(format!("capture of template {name} failed: {reason}")));
            }
            if since.elapsed() > READY_LIMIT {
                return Err(self.fail(format!("no template {name} within {READY_LIMIT:?}")));
            }
            thread::sleep(POLL);
        }
    }

    /// `containerd-shim-hyperbox-v1 templates COMMAND -n NS ARGS...` with this daemon's
    /// template store and settings and its `PATH` (CRIU); its stdout, and how long from
    /// spawning it until it exited, ms. Fails if it fails or takes over `limit`.
    fn shim_templates(
        &self,
        command: &str,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<(String, f64)> {
        let c = self.containerd();
        let shim = host::workspace_binary(SHIM)
            .with_context(|| format!("{SHIM} is not built beside this binary"))?;
        let mut cmd = Command::new(&shim);
        cmd.args(["templates", command, "-n", c.namespace()])
            .args(args)
            .env("HYPERBOX_TEMPLATE_ROOT", c.template_root())
            .env("HYPERBOX_TEMPLATE_CONFIG", c.template_settings())
            // No registry credentials of the user's: the loopback registry needs none.
            .env("HOME", c.dir())
            .env("PATH", c.path_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = describe(&cmd);
        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
        // Read both pipes on threads so a chatty command cannot block on a full one.
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let mut stderr = child.stderr.take().context("no stderr pipe")?;
        let out_reader = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stdout.read_to_end(&mut text);
            text
        });
        let err_reader = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        });
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {shown}"))?
            {
                break status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!("`{shown}` did not end within {limit:?}")));
            }
            thread::sleep(Duration::from_millis(1));
        };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({status}): {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        Ok((String::from_utf8_lossy(&out).into_owned(), ms))
    }

    /// `containerd-shim-hyperbox-v1 templates inspect -n NS NAME`.
    fn inspect(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let (out, _) = self.shim_templates("inspect", &[name], Duration::from_secs(60))?;
        serde_json::from_str(&out)
            .with_context(|| format!("{SHIM} templates inspect {name} printed no JSON: {out}"))
    }

    /// Pushes template `name` to the test bed's registry and pulls it back into the same
    /// store as [`PULLED_NAME`], both timed.
    fn distribute(&self, name: &str) -> anyhow::Result<Distribution> {
        let c = self.containerd();
        let ns = c.namespace();
        let target = self
            .engine
            .bed
            .registry
            .reference(&format!("hyperbox-templates/{name}:bench"));
        let (said, push_ms) = self.shim_templates("push", &[name, &target], DISTRIBUTION_LIMIT)?;
        let pushed = parse_pushed(&said).with_context(|| {
            format!("{SHIM} templates push {name} {target} did not say what it pushed: {said:?}")
        })?;
        tracing::info!(
            template = name,
            reference = pushed.reference,
            digest = pushed.digest,
            size = pushed.size,
            push_ms,
            "template pushed"
        );
        // Pinned: exactly what was pushed.
        let pinned = format!("{}@{}", pushed.reference, pushed.digest);
        let (said, pull_ms) =
            self.shim_templates("pull", &[&pinned, PULLED_NAME], DISTRIBUTION_LIMIT)?;
        if !self
            .store()
            .join(PULLED_NAME)
            .join("template.json")
            .is_file()
        {
            return Err(self.fail(format!(
                "{SHIM} templates pull {pinned} {PULLED_NAME} said {said:?} but left no \
                 template {PULLED_NAME}"
            )));
        }
        let record = self.inspect(PULLED_NAME)?;
        let pulled_bytes = record["bytes"]
            .as_u64()
            .with_context(|| format!("templates inspect {PULLED_NAME} gives no bytes: {record}"))?;
        tracing::info!(
            template = PULLED_NAME,
            pull_ms,
            pulled_bytes,
            "template pulled"
        );
        Ok(Distribution {
            template: name.to_string(),
            push_command: format!("{SHIM} templates push -n {ns} {name} {target}"),
            push_ms,
            pushed_bytes: size_bytes(&pushed.size),
            reference: pushed.reference,
            digest: pushed.digest,
            pushed_size: pushed.size,
            pull_command: format!("{SHIM} templates pull -n {ns} {pinned} {PULLED_NAME}"),
            pull_ms,
            pulled: PULLED_NAME.to_string(),
            pulled_bytes,
            record,
        })
    }

    /// Captures the template of `w` (not timed as a variant) and removes its container.
    fn capture(&self, w: &Workload<'_>) -> anyhow::Result<Capture> {
        let name = format!("{}-tpl", w.tag);
        let id = format!("{}-capture", w.tag);
        let netns = Netns::new(self.containerd(), &id)?;
        let annotations = [(CAPTURE, name.as_str()), w.ready];
        let args = run_args(
            HYPERBOX_V1,
            Some(&netns.0),
            &annotations,
            w.image,
            &id,
            &w.cmd,
        );
        // Not asked anything until it is kept: a connection still waiting to be accepted
        // when the capture starts makes CRIU refuse the dump ("In-flight connections").
        let since = Instant::now();
        let (child, shown) = self.spawn_ctr(&args)?;
        self.finish_ctr(child, &shown)?;
        let kept_ms = self.wait_template(&name, since)?;
        let body = get_in_network(&netns.0, PY_SERVICE_PORT, Duration::from_secs(10))
            .map_err(|e| self.fail(format!("the captured {id} does not answer: {e}")))?;
        let record = self.inspect(&name)?;
        let bytes = record["bytes"]
            .as_u64()
            .with_context(|| format!("templates inspect {name} gives no bytes: {record}"))?;
        tracing::info!(template = name, kept_ms, bytes, "template kept");
        self.remove(&id)?;
        netns.remove()?;
        Ok(Capture {
            name,
            readiness: format!("{}={}", w.ready.0, w.ready.1),
            kept_ms,
            bytes,
            body,
            record,
        })
    }

    /// The time-to-ready part of workload `w` over `variants` (those of [`READY_VARIANTS`]
    /// it runs; with [`Start::Pulled`] among them the template goes through the registry).
    fn ready_part(
        &self,
        w: &Workload<'_>,
        variants: &[ReadyVariant],
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<ReadyPart> {
        let template = self.capture(w)?;
        let distribution = if variants.iter().any(|v| v.start == Start::Pulled) {
            Some(self.distribute(&template.name)?)
        } else {
            None
        };
        let restore = [(RESTORE_FROM, template.name.as_str())];
        let pulled = [(RESTORE_FROM, PULLED_NAME)];
        let mut samples = vec![Vec::with_capacity(rounds); variants.len()];
        let mut returned = vec![Vec::with_capacity(rounds); variants.len()];
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(variants.len(), round) {
                    n += 1;
                    let v = &variants[i];
                    let id = format!("{}-{i}-{n}", w.tag);
                    let netns = Netns::new(self.containerd(), &id)?;
                    let annotations: &[(&str, &str)] = match v.start {
                        Start::Cold => &[],
                        Start::Restored => &restore,
                        Start::Pulled => &pulled,
                    };
                    let args =
                        run_args(v.runtime, Some(&netns.0), annotations, w.image, &id, &w.cmd);
                    let Ready {
                        body,
                        ready_ms,
                        returned_ms,
                        ..
                    } = self.run_until_ready(&args, &netns.0)?;
                    let restored = body == template.body;
                    if restored != (v.start != Start::Cold) {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {body:?}, the template {:?}: a restored copy \
                             answers as the template, a cold start does not",
                            v.name, template.body
                        )));
                    }
                    if record {
                        samples[i].push(ready_ms);
                        returned[i].push(returned_ms);
                    }
                    self.remove(&id)?;
                    netns.remove()?;
                }
                tracing::info!("{} {phase} round {}/{count} done", w.label, round + 1);
            }
        }
        let commands: Vec<String> = variants
            .iter()
            .map(|v| {
                let how = match v.start {
                    Start::Cold => String::new(),
                    Start::Restored => format!(" --annotation {RESTORE_FROM}={}", template.name),
                    Start::Pulled => format!(" --annotation {RESTORE_FROM}={PULLED_NAME}"),
                };
                let cmd: Vec<String> = w.cmd.iter().map(|a| a.to_string()).collect();
                format!(
                    "ctr run -d --null-io --runtime {} --with-ns network:FILE{how} {} ID {}",
                    v.runtime,
                    w.image,
                    report::shell_words(&cmd)
                )
            })
            .collect();
        let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
        let times = |samples: Vec<Vec<f64>>, until: &str| {
            named_table(&names, &commands, samples, until, rounds, warmup)
        };
        let ready = times(samples, "until a GET in its netns answers");
        let ctr_returned = times(returned, "until ctr returned");
        let restored_over_cold =
            median_of(&ready, "hyperbox restored") / median_of(&ready, "hyperbox cold");
        let pulled_over_restored = distribution
            .as_ref()
            .map(|_| median_of(&ready, "hyperbox pulled") / median_of(&ready, "hyperbox restored"));
        Ok(ReadyPart {
            workload: w.label.to_string(),
            template,
            distribution,
            ready,
            ctr_returned,
            restored_over_cold,
            pulled_over_restored,
        })
    }

    /// Waits, after the lazily restored `id` is ready, until its lazy-pages daemon is gone;
    /// when that was, ms after `spawned`, and whether the daemon was still there at first.
    fn wait_all_pages_in(&self, id: &str, spawned: Instant) -> anyhow::Result<(f64, bool)> {
        let seen = lazy_pages_running(id);
        if seen {
            while lazy_pages_running(id) {
                if spawned.elapsed() > READY_LIMIT {
                    return Err(self.fail(format!(
                        "the lazy-pages daemon of {id} still runs {READY_LIMIT:?} after its \
                         `ctr run -d`"
                    )));
                }
                thread::sleep(POLL);
            }
        }
        Ok((spawned.elapsed().as_secs_f64() * 1e3, seen))
    }

    /// The heap part: the service `w` (of [`py_heap_service`]) cold through runc.v2,
    /// restored eagerly and lazily through ours.
    fn heap_part(
        &self,
        w: &Workload<'_>,
        heap_mib: usize,
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<HeapPart> {
        let template = self.capture(w)?;
        let template_sha = heap_sha(&template.body)
            .with_context(|| {
                format!(
                    "the captured heap service answered {:?}, not `heap ... sha=S`",
                    template.body
                )
            })?
            .to_string();
        let eager = [(RESTORE_FROM, template.name.as_str())];
        let lazy = [
            (RESTORE_FROM, template.name.as_str()),
            (RESTORE_LAZY, "true"),
        ];
        let annotations_of = |start: HeapStart| -> &[(&str, &str)] {
            match start {
                HeapStart::Cold => &[],
                HeapStart::Eager => &eager,
                HeapStart::Lazy => &lazy,
            }
        };
        let k = HEAP_VARIANTS.len();
        let mut ready = vec![Vec::with_capacity(rounds); k];
        let mut all_in = vec![Vec::with_capacity(rounds); k];
        let mut sums = vec![Vec::with_capacity(rounds); k];
        let mut lazy_daemon_seen = 0;
        let mut lazy_runs = 0;
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(k, round) {
                    n += 1;
                    let v = &HEAP_VARIANTS[i];
                    let id = format!("{}-{i}-{n}", w.tag);
                    let netns = Netns::new(self.containerd(), &id)?;
                    let args = run_args(
                        v.runtime,
                        Some(&netns.0),
                        annotations_of(v.start),
                        w.image,
                        &id,
                        &w.cmd,
                    );
                    let r = self.run_until_ready(&args, &netns.0)?;
                    let (pages_ms, seen) = match v.start {
                        HeapStart::Lazy => self.wait_all_pages_in(&id, r.spawned)?,
                        HeapStart::Cold | HeapStart::Eager => (r.ready_ms, false),
                    };
                    let Some(sha) = heap_sha(&r.body) else {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {:?}, not `heap ... sha=S`",
                            v.name, r.body
                        )));
                    };
                    let restored = r.body == template.body;
                    if restored != (v.start != HeapStart::Cold) {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {:?}, the template {:?}: a restored copy \
                             answers as the template, a cold start does not",
                            v.name, r.body, template.body
                        )));
                    }
                    let (sum_body, sum_ms) = get_sum(&netns.0)
                        .map_err(|e| self.fail(format!("GET /sum of {id} ({}): {e}", v.name)))?;
                    match parse_sum(&sum_body) {
                        Some((now, at_start)) if now == at_start && at_start == sha => {}
                        _ => {
                            return Err(self.fail(format!(
                                "{id} ({}): GET /sum answered {sum_body:?}, its heap's hash at \
                                 start being {sha} (template's {template_sha}): the heap is not \
                                 whole",
                                v.name
                            )))
                        }
                    }
                    if record {
                        ready[i].push(r.ready_ms);
                        all_in[i].push(pages_ms);
                        sums[i].push(sum_ms);
                        if v.start == HeapStart::Lazy {
                            lazy_runs += 1;
                            lazy_daemon_seen += usize::from(seen);
                        }
                    }
                    tracing::debug!(
                        id,
                        variant = v.name,
                        ready_ms = r.ready_ms,
                        pages_ms,
                        sum_ms,
                        seen,
                        "heap run"
                    );
                    self.remove(&id)?;
                    netns.remove()?;
                }
                tracing::info!("{} {phase} round {}/{count} done", w.label, round + 1);
            }
        }
        let commands: Vec<String> = HEAP_VARIANTS
            .iter()
            .map(|v| {
                let how: String = annotations_of(v.start)
                    .iter()
                    .map(|(k, v)| format!(" --annotation {k}={v}"))
                    .collect();
                format!(
                    "ctr run -d --null-io --runtime {} --with-ns network:FILE{how} {} ID \
                     python3 -c HEAP_SERVICE({heap_mib})",
                    v.runtime, w.image
                )
            })
            .collect();
        let names: Vec<&str> = HEAP_VARIANTS.iter().map(|v| v.name).collect();
        let times = |samples: Vec<Vec<f64>>, until: &str| {
            named_table(&names, &commands, samples, until, rounds, warmup)
        };
        let ready = times(ready, "until a GET in its netns answers");
        let all_pages_in = times(
            all_in,
            "until its lazy-pages daemon exited (lazy), else until ready",
        );
        let sum = times(sums, "then GET /sum, until its answer");
        let lazy_ready_ms = median_of(&ready, "hyperbox lazy");
        let lazy_over_eager = lazy_ready_ms / median_of(&ready, "hyperbox eager");
        Ok(HeapPart {
            workload: "python heap service".into(),
            heap_mib,
            template,
            ready,
            all_pages_in,
            sum,
            lazy_daemon_seen,
            lazy_runs,
            lazy_over_eager,
            lazy_ready_ms,
        })
    }

    /// Waits until task `id` is listed as running.
    fn wait_running(&self, id: &str) -> anyhow::Result<()> {
        let c = self.containerd();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listing = c.ctr_stdout(&["tasks", "ls"])?;
            match parse_tasks_ls(&listing).into_iter().find(|t| t.id == id) {
                Some(t) if t.status == "RUNNING" && t.pid > 0 => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(self.fail(format!(
                        "task {id} is not running; `ctr tasks ls` says:\n{listing}"
                    )))
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs `ctr ARGS` to its end; how long it took, ms.
    fn timed_ctr(&self, args: &[&str]) -> anyhow::Result<f64> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let start = Instant::now();
        let (child, shown) = self.spawn_ctr(&args)?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {shown}"))?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(ms)
    }

    /// The checkpoint/restore part.
    fn checkpoint_part(&self, rounds: usize, warmup: usize) -> anyhow::Result<CheckpointPart> {
        let c = self.containerd();
        let image = self.engine.image.as_str();
        let runtimes = [("runc.v2", RUNC_V2), ("hyperbox", HYPERBOX_V1)];
        let mut checkpoint = vec![Vec::with_capacity(rounds); runtimes.len()];
        let mut restore = vec![Vec::with_capacity(rounds); runtimes.len()];
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(runtimes.len(), round) {
                    n += 1;
                    let (short, runtime) = runtimes[i];
                    let id = format!("cr-{i}-{n}");
                    let reference = format!("hyperbox.bench/cr-{short}-{n}:1");
                    let args = run_args(runtime, None, &[], image, &id, &["sh", "-c", LOOP]);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    c.ctr_run(&args)
                        .map_err(|e| self.fail(format!("starting {id}: {e}")))?;
                    self.wait_running(&id)?;
                    // Into its loop, not still starting.
                    thread::sleep(Duration::from_millis(200));
                    let cp =
                        self.timed_ctr(&["containers", "checkpoint", "--task", &id, &reference])?;
                    self.remove(&id)?;
                    let rs =
                        self.timed_ctr(&["containers", "restore", "--live", &id, &reference])?;
                    self.wait_running(&id)?;
                    let info = c.ctr_stdout(&["containers", "info", &id])?;
                    if !info.contains(runtime) {
                        return Err(self.fail(format!("{id} was not restored through {runtime}")));
                    }
                    if record {
                        checkpoint[i].push(cp);
                        restore[i].push(rs);
                    }
                    self.remove(&id)?;
                    c.ctr_run(&["images", "rm", &reference])
                        .map_err(|e| self.fail(format!("removing {reference}: {e}")))?;
                }
                tracing::info!(
                    "checkpoint/restore {phase} round {}/{count} done",
                    round + 1
                );
            }
        }
        let times = |samples: Vec<Vec<f64>>, what: &str| {
            let times = runtimes
                .iter()
                .zip(samples)
                .map(|((short, runtime), s)| VariantTimes {
                    name: short.to_string(),
                    command: format!("{what} (container run through {runtime})"),
                    samples_ms: s,
                })
                .collect();
            table(times, rounds, warmup)
        };
        Ok(CheckpointPart {
            workload: format!("busybox sh -c '{LOOP}'"),
            checkpoint: times(checkpoint, "ctr containers checkpoint --task ID REF"),
            restore: times(restore, "ctr containers restore --live ID REF"),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_arguments_put_namespace_and_annotations_before_the_image() {
        let args = run_args(
            HYPERBOX_V1,
            Some(Path::new("/s/netns-a")),
            &[(CAPTURE, "py-tpl"), (READY_FILE, "/ready")],
            "img",
            "a",
            &["sh", "-c", "x y"],
        );
        assert_eq!(
            args,
            [
                "run",
                "-d",
                "--null-io",
                "--runtime",
                HYPERBOX_V1,
                "--with-ns",
                "network:/s/netns-a",
                "--annotation",
                "io.hyperbox.template.capture=py-tpl",
                "--annotation",
                "io.hyperbox.template.ready-file=/ready",
                "img",
                "a",
                "sh",
                "-c",
                "x y"
            ]
        );
        let plain = run_args(RUNC_V2, None, &[], "img", "b", &["true"]);
        assert_eq!(
            plain,
            [
                "run",
                "-d",
                "--null-io",
                "--runtime",
                RUNC_V2,
                "img",
                "b",
                "true"
            ]
        );
    }

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn push_output_gives_reference_digest_and_size() {
        let said = format!(
            "pushed template py-tpl to 127.0.0.1:5000/hyperbox-templates/py-tpl:bench@{DIGEST} \
             (123.4 MiB)\n"
        );
        let p = parse_pushed(&said).expect("parsed");
        assert_eq!(
            p.reference,
            "127.0.0.1:5000/hyperbox-templates/py-tpl:bench"
        );
        assert_eq!(p.digest, DIGEST);
        assert_eq!(p.size, "123.4 MiB");
        // Other lines before it (warnings) do not matter.
        let noisy = format!("note: plain HTTP to 127.0.0.1:5000\n{said}");
        assert_eq!(parse_pushed(&noisy), Some(p));
        let small = format!("pushed template a to r:1@{DIGEST} (4.0 KiB)");
        assert_eq!(parse_pushed(&small).unwrap().size, "4.0 KiB");
    }

    #[test]
    fn push_output_without_a_full_digest_is_refused() {
        assert_eq!(parse_pushed(""), None);
        assert_eq!(parse_pushed("pushed template a to r:1 (4.0 KiB)"), None);
        assert_eq!(
            parse_pushed("pushed template a to r:1@sha256:abc (4.0 KiB)"),
            None
        );
        let no_size = format!("pushed template a to r:1@{DIGEST}");
        assert_eq!(parse_pushed(&no_size), None);
        let no_ref = format!("pushed template a to @{DIGEST} (1.0 MiB)");
        assert_eq!(parse_pushed(&no_ref), None);
        let not_hex = format!(
            "pushed template a to r:1@{} (1.0 MiB)",
            DIGEST.replace('a', "g")
        );
        assert_eq!(parse_pushed(&not_hex), None);
    }

    #[test]
    fn sizes_as_the_shim_prints_them() {
        assert_eq!(size_bytes("4.0 KiB"), Some(4096));
        assert_eq!(size_bytes("1.5 MiB"), Some(1_572_864));
        assert_eq!(size_bytes("2.0 GiB"), Some(2 << 30));
        assert_eq!(size_bytes("12 B"), Some(12));
        assert_eq!(size_bytes("1.0 TB"), None);
        assert_eq!(size_bytes("MiB"), None);
        assert_eq!(size_bytes("-1.0 MiB"), None);
    }

    fn cmdline(args: &[&str]) -> Vec<u8> {
        let mut c = Vec::new();
        for a in args {
            c.extend_from_slice(a.as_bytes());
            c.push(0);
        }
        c
    }

    #[test]
    fn lazy_pages_daemons_are_matched_by_their_container() {
        let daemon = cmdline(&[
            "/usr/local/sbin/criu",
            "lazy-pages",
            "-D",
            "/s/templates/bench/heap-tpl/images",
            "-W",
            "/s/state/io.containerd.runtime.v2.task/bench/heap-2-12/criu-work",
            "-o",
            "lazy-pages.log",
            "-v4",
            "--status-fd",
            "3",
        ]);
        assert!(is_lazy_pages_of(&daemon, "heap-2-12"));
        // Not another container whose id it starts or ends with, nor the template's name.
        assert!(!is_lazy_pages_of(&daemon, "heap-2-1"));
        assert!(!is_lazy_pages_of(&daemon, "2-12"));
        assert!(is_lazy_pages_of(&daemon, "heap-tpl"), "a path component");
        assert!(!is_lazy_pages_of(&daemon, ""));
        // The restore itself, or the shim, is not the daemon.
        let restore = cmdline(&[
            "criu",
            "restore",
            "--lazy-pages",
            "-W",
            "/s/state/io.containerd.runtime.v2.task/bench/heap-2-12/criu-work",
        ]);
        assert!(!is_lazy_pages_of(&restore, "heap-2-12"));
        let shim = cmdline(&["containerd-shim-hyperbox-v1", "-id", "heap-2-12"]);
        assert!(!is_lazy_pages_of(&shim, "heap-2-12"));
        assert!(!is_lazy_pages_of(b"", "heap-2-12"));
    }

    #[test]
    fn this_process_is_no_lazy_pages_daemon() {
        assert!(!lazy_pages_running("no-such-container-0"));
    }

    #[test]
    fn heap_answers_are_parsed() {
        let body = "heap started=1765000000.123456 sha=ab12\n";
        assert_eq!(heap_sha(body), Some("ab12"));
        assert_eq!(heap_sha("warm started=1 entries=2\n"), None);
        assert_eq!(heap_sha("heap started=1 sha=\n"), None);
        assert_eq!(parse_sum("sum now=ab12 sha=ab12\n"), Some(("ab12", "ab12")));
        assert_eq!(parse_sum("sum now=cd34 sha=ab12"), Some(("cd34", "ab12")));
        assert_eq!(parse_sum("sum now= sha=ab12"), None);
        assert_eq!(parse_sum("heap started=1 sha=ab12"), None);
    }

    #[test]
    fn the_python_table_adds_the_pulled_variant_to_busyboxs() {
        let names: Vec<&str> = READY_VARIANTS.iter().map(|v| v.name).collect();
        assert_eq!(
            names,
            [
                "runc.v2 cold",
                "hyperbox cold",
                "hyperbox restored",
                "hyperbox pulled"
            ]
        );
        assert!(READY_VARIANTS[..3].iter().all(|v| v.start != Start::Pulled));
        assert_eq!(HEAP_VARIANTS[0].runtime, RUNC_V2);
        assert_eq!(HEAP_VARIANTS[2].start, HeapStart::Lazy);
    }

    fn sample_table(variants: &[(&str, f64)]) -> Table {
        let times = variants
            .iter()
            .map(|(name, ms)| VariantTimes {
                name: name.to_string(),
                command: String::new(),
                samples_ms: vec![*ms, *ms],
            })
            .collect();
        table(times, 2, 1)
    }

    fn sample_capture(name: &str) -> Capture {
        Capture {
            name: name.into(),
            readiness: format!("{READY_FILE}=/ready"),
            kept_ms: 5000.0,
            bytes: 1 << 30,
            body: "heap started=1 sha=ab\n".into(),
            record: serde_json::json!({"bytes": 1u64 << 30}),
        }
    }

    #[test]
    fn the_new_parts_are_rendered_and_saved() {
        let heap = HeapPart {
            workload: "python heap service".into(),
            heap_mib: 1024,
            template: sample_capture("heap-tpl"),
            ready: sample_table(&[
                ("runc.v2 cold", 6000.0),
                ("hyperbox eager", 900.0),
                ("hyperbox lazy", 120.0),
            ]),
            all_pages_in: sample_table(&[
                ("runc.v2 cold", 6000.0),
                ("hyperbox eager", 900.0),
                ("hyperbox lazy", 1500.0),
            ]),
            sum: sample_table(&[
                ("runc.v2 cold", 3000.0),
                ("hyperbox eager", 3000.0),
                ("hyperbox lazy", 3000.0),
            ]),
            lazy_daemon_seen: 2,
            lazy_runs: 2,
            lazy_over_eager: 120.0 / 900.0,
            lazy_ready_ms: 120.0,
        };
        let text = render_heap(&heap, "1.7");
        assert!(
            text.contains("python heap service (1024 MiB) on containerd 1.7"),
            "{text}"
        );
        assert!(text.contains("hyperbox lazy"), "{text}");
        assert!(text.contains("until all pages were in"), "{text}");
        assert!(text.contains("`GET /sum`"), "{text}");
        assert!(text.contains("in 2 of 2 lazy runs"), "{text}");
        let python = ReadyPart {
            workload: "python service".into(),
            template: sample_capture("py-tpl"),
            distribution: Some(Distribution {
                template: "py-tpl".into(),
                push_command: "push".into(),
                push_ms: 800.0,
                reference: "127.0.0.1:5000/hyperbox-templates/py-tpl:bench".into(),
                digest: DIGEST.into(),
                pushed_size: "40.0 MiB".into(),
                pushed_bytes: size_bytes("40.0 MiB"),
                pull_command: "pull".into(),
                pull_ms: 600.0,
                pulled: PULLED_NAME.into(),
                pulled_bytes: 40 << 20,
                record: serde_json::Value::Null,
            }),
            ready: sample_table(&[
                ("runc.v2 cold", 2200.0),
                ("hyperbox cold", 2300.0),
                ("hyperbox restored", 150.0),
                ("hyperbox pulled", 160.0),
            ]),
            ctr_returned: sample_table(&[("runc.v2 cold", 100.0)]),
            restored_over_cold: 150.0 / 2300.0,
            pulled_over_restored: Some(160.0 / 150.0),
        };
        let text = render_ready(&python, "1.7");
        assert!(
            text.contains(&format!("pushed to 127.0.0.1:5000/hyperbox-templates/py-tpl:bench@{DIGEST} in 800.0 ms (40.0 MiB), pulled back as \"py-pulled\" in 600.0 ms")),
            "{text}"
        );
        assert!(text.contains("hyperbox pulled"), "{text}");
        assert!(
            text.contains("from the pulled template / from the local one: 1.0667"),
            "{text}"
        );
        let json = serde_json::to_value(&heap).unwrap();
        assert_eq!(json["lazy_ready_ms"], 120.0);
        assert_eq!(
            json["ready"]["timings"]["variants"][2]["name"],
            "hyperbox lazy"
        );
        let json = serde_json::to_value(&python).unwrap();
        assert_eq!(json["distribution"]["pushed_bytes"], 40u64 << 20);
        assert_eq!(json["distribution"]["pulled"], PULLED_NAME);
    }

    #[test]
    fn p90_is_the_nearest_rank() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!(p90(&ten), 9.0);
        let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(p90(&twenty), 18.0);
        assert!(p90(&[]).is_nan());
    }

    #[test]
    fn tables_compare_with_the_first_variant() {
        let times = [("runc.v2 cold", 100.0), ("hyperbox restored", 8.0)]
            .map(|(name, ms)| VariantTimes {
                name: name.into(),
                command: String::new(),
                samples_ms: vec![ms, ms],
            })
            .to_vec();
        let t = table(times, 2, 0);
        assert_eq!(t.timings.baseline, "runc.v2 cold");
        assert_eq!(t.timings.variants[1].ratio_to_baseline, 0.08);
        assert_eq!(median_of(&t, "hyperbox restored"), 8.0);
        assert!(median_of(&t, "nothing").is_nan());
        assert_eq!(t.p90_ms, [100.0, 8.0]);
    }
}

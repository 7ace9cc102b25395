//! What the templates benchmark reports: the typed results of each part, the tables of
//! timings with their p90s, and how they are rendered as text.

use serde::Serialize;

use crate::machine::Machine;
use crate::report;
use crate::runner::{self, Timings, VariantTimes};
use crate::stats::percentile_nearest_rank;
use crate::wasm::verdict;

use super::{
    GOAL_LAZY_OVER_EAGER, GOAL_LAZY_READY_MS, GOAL_RESTORED_MS, GOAL_RESTORED_OVER_COLD,
    GOAL_RESTORE_OVER_RUNC,
};

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

pub(super) fn table(times: Vec<VariantTimes>, rounds: usize, warmup: usize) -> Table {
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
pub(super) fn named_table(
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

pub(super) fn median_of(t: &Table, name: &str) -> f64 {
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

pub(super) fn render_ready(p: &ReadyPart, containerd: &str) -> String {
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

pub(super) fn render_heap(p: &HeapPart, containerd: &str) -> String {
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

//! What the wasm benchmark reports: the memory rows, the kill timings, the goals, and how
//! the report is rendered as text.

use serde::Serialize;

use crate::machine::Machine;
use crate::memprobe::{ContainerMemory, ContainerProbe};
use crate::report;
use crate::runner::Timings;
use crate::stats::Summary;

use super::guests::CacheCounts;
use super::{GOAL_PSS_MIB, GOAL_WARM_RATIO};

/// One runtime's line of the memory part.
#[derive(Debug, Clone, Serialize)]
pub struct WasmMemRow {
    pub runtime: String,
    /// What each container runs.
    pub workload: String,
    /// K: containers running at once when measured.
    pub containers: usize,
    /// Runtime processes per container (shim and helpers, a shared one divided).
    pub runtime_processes: f64,
    /// The container's own processes per container (init and its descendants).
    pub container_processes: f64,
    /// Runtime side (shim + helpers), KiB per container.
    pub runtime_pss_kib: Summary,
    pub runtime_rss_kib: Summary,
    /// The container's own processes, KiB per container.
    pub container_pss_kib: Summary,
    pub container_rss_kib: Summary,
    /// Both, KiB per container.
    pub total_pss_kib: Summary,
    pub total_rss_kib: Summary,
    /// Mean total PSS and RSS over runc.v2's.
    pub total_pss_ratio: f64,
    pub total_rss_ratio: f64,
    /// CPU the containers' init processes used while settling, percent of one CPU (mean):
    /// near 0 for a sleeping guest.
    pub init_cpu_percent: f64,
    /// Processes elsewhere running the same executable as a probed one (they lower PSS).
    pub outside_sharers: usize,
    pub per_container: Vec<ContainerMemory>,
    pub probes: Vec<ContainerProbe>,
}

/// The kill part: per runtime, from spawning `ctr tasks kill -s SIGKILL` until the exit event,
/// and until that `ctr` returned.
#[derive(Debug, Clone, Serialize)]
pub struct KillTimings {
    pub until_exit_event: Timings,
    pub until_kill_returned: Timings,
}

/// The goals beside what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct Goals {
    /// Warm wasm (rootfs) median over runc.v2's.
    pub warm_ratio: f64,
    /// Warm wasm (OCI image) median over runc.v2's, when measured.
    pub warm_image_ratio: Option<f64>,
    /// Mean total PSS per wasm container, MiB.
    pub wasm_pss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WasmReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub containerd: String,
    /// SHA-256 of the hello guest: its compile cache key.
    pub hello_digest: String,
    pub lifecycle: Timings,
    /// Shim log lines for the hello guest during the timed rounds (warm-up included), and
    /// what they should be: a compile per cold run, a hit per warm one.
    pub cache_seen: CacheCounts,
    pub cache_expected: CacheCounts,
    pub settle_secs: f64,
    pub memory: Vec<WasmMemRow>,
    pub kill: KillTimings,
    pub goals: Goals,
}

/// `met` when `value` is at most `limit`, else `missed`.
pub fn verdict(value: f64, limit: f64) -> &'static str {
    if value <= limit {
        "met"
    } else {
        "missed"
    }
}

pub(super) fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn render_timings(t: &Timings) -> String {
    let width = t
        .variants
        .iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let mut s = format!(
        "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
        "variant", "runs", "median", "p95", "mean", "min", "max", "×runc"
    );
    let digits = report::decimals_for(t.variants.iter().map(|v| v.summary.median));
    for v in &t.variants {
        let m = &v.summary;
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  \
             {:>8.digits$}  {:>8.3}\n",
            v.name, m.runs, m.median, m.p95, m.mean, m.min, m.max, v.ratio_to_baseline
        ));
    }
    s
}

impl WasmReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        let t = &self.lifecycle;
        s.push_str(&format!(
            "ctr run --rm on containerd {} ({} rounds after {} warm-up, rotated; ms; ratio of \
             medians to {})\n",
            self.containerd, t.rounds, t.warmup, t.baseline
        ));
        s.push_str(&render_timings(t));
        let (seen, want) = (self.cache_seen, self.cache_expected);
        s.push_str(&format!(
            "compile cache, shim log lines for the hello guest ({}): {} compiled (expected {}, \
             one per cold run), {} cache hits (expected {}, one per warm run){}\n",
            &self.hello_digest[..12],
            seen.compiled,
            want.compiled,
            seen.cache_hits,
            want.cache_hits,
            if seen == want { "" } else { ": MISMATCH" }
        ));

        s.push_str(&format!(
            "\nmemory per running container, MiB (means over K; runtime = shim + helpers \
             outside the container, container = its init and descendants; read {} s after the \
             last start; `other`: processes elsewhere running the same executable; ×: total \
             over runc.v2's)\n",
            self.settle_secs
        ));
        let width = self
            .memory
            .iter()
            .map(|r| r.runtime.len())
            .max()
            .unwrap_or(0)
            .max(7);
        s.push_str(&format!(
            "{:<width$}  {:>3}  {:>5}  {:>5}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}  {:>7}  {:>6}  \
             {:>6}  {:>5}\n",
            "runtime",
            "K",
            "other",
            "procs",
            "rt PSS",
            "rt RSS",
            "ct PSS",
            "ct RSS",
            "PSS",
            "RSS",
            "×PSS",
            "×RSS",
            "cpu%"
        ));
        for r in &self.memory {
            s.push_str(&format!(
                "{:<width$}  {:>3}  {:>5}  {:>5.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  {:>7.2}  \
                 {:>7.2}  {:>6.3}  {:>6.3}  {:>5.1}\n",
                r.runtime,
                r.containers,
                r.outside_sharers,
                r.runtime_processes + r.container_processes,
                mib(r.runtime_pss_kib.mean),
                mib(r.runtime_rss_kib.mean),
                mib(r.container_pss_kib.mean),
                mib(r.container_rss_kib.mean),
                mib(r.total_pss_kib.mean),
                mib(r.total_rss_kib.mean),
                r.total_pss_ratio,
                r.total_rss_ratio,
                r.init_cpu_percent
            ));
        }

        let k = &self.kill.until_exit_event;
        s.push_str(&format!(
            "\nSIGKILL of a looping container: from spawning `ctr tasks kill -s SIGKILL` until \
             the /tasks/exit event ({} rounds after {} warm-up, rotated; ms)\n",
            k.rounds, k.warmup
        ));
        s.push_str(&render_timings(k));
        s.push_str("until `ctr tasks kill` returned (signal delivered):\n");
        s.push_str(&render_timings(&self.kill.until_kill_returned));

        let g = &self.goals;
        s.push_str("\ngoals:\n");
        s.push_str(&format!(
            "warm wasm ctr run --rm ≤ {GOAL_WARM_RATIO} × runc.v2 native: {:.3} from a rootfs \
             ({})",
            g.warm_ratio,
            verdict(g.warm_ratio, GOAL_WARM_RATIO)
        ));
        if let Some(r) = g.warm_image_ratio {
            s.push_str(&format!(
                ", {r:.3} from an OCI image ({})",
                verdict(r, GOAL_WARM_RATIO)
            ));
        }
        s.push_str(&format!(
            "\nPSS per wasm container ≤ {GOAL_PSS_MIB} MiB: {:.2} MiB, runtime side and guest \
             process together ({})\n",
            g.wasm_pss_mib,
            verdict(g.wasm_pss_mib, GOAL_PSS_MIB)
        ));
        s
    }
}

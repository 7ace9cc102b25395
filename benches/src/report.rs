//! Reports: a human table on stdout and, on request, the same data as JSON.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::machine::Machine;
use crate::memprobe::{ContainerMemory, ContainerProbe};
use crate::runner::Timings;
use crate::stats::Summary;

/// Errors writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write report {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// A timing benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct TimingReport {
    /// `time` or `ctr-run`.
    pub benchmark: String,
    /// How the benchmark was run.
    pub command_line: String,
    pub machine: Machine,
    /// Milliseconds.
    pub timings: Timings,
}

impl TimingReport {
    /// The report as text: the machine block, then one line per variant.
    pub fn render(&self) -> String {
        let t = &self.timings;
        let width = t
            .variants
            .iter()
            .map(|v| v.name.len())
            .max()
            .unwrap_or(0)
            .max(7);
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!(
            "{} measured rounds after {} warm-up rounds, variants rotated round-robin; \
             times in ms; baseline {}\n\n",
            t.rounds, t.warmup, t.baseline
        ));
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
            "variant", "runs", "median", "p95", "mean", "min", "max", "×base"
        ));
        let digits = decimals_for(t.variants.iter().map(|v| v.summary.median));
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

    /// Every measured sample, in the order taken: one line per variant (for benchmarks of few
    /// rounds, where each round is worth seeing).
    pub fn render_samples(&self) -> String {
        let t = &self.timings;
        let digits = decimals_for(t.variants.iter().map(|v| v.summary.median));
        let mut s = String::from("\nper round, in the order run (ms):\n");
        for v in &t.variants {
            let samples: Vec<String> = v
                .samples_ms
                .iter()
                .map(|x| format!("{x:.digits$}"))
                .collect();
            s.push_str(&format!("{}: {}\n", v.name, samples.join(" ")));
        }
        s
    }
}

/// Decimals for a table of times in ms: 1, or 3 when a median is under 10 ms (sub-millisecond
/// calls such as Stats would otherwise print as 0.3 against 0.4).
pub fn decimals_for(medians: impl Iterator<Item = f64>) -> usize {
    if medians.into_iter().any(|m| m < 10.0) {
        3
    } else {
        1
    }
}

/// One (containerd, runtime) line of the memory report.
#[derive(Debug, Clone, Serialize)]
pub struct MemRow {
    pub containerd: String,
    pub runtime: String,
    /// K: containers running at once when measured.
    pub containers: usize,
    /// Runtime processes per container (mean).
    pub processes_per_container: f64,
    /// Per-container PSS, KiB.
    pub pss_kib: Summary,
    /// Per-container RSS, KiB.
    pub rss_kib: Summary,
    /// Mean PSS divided by runc.v2's on the same containerd.
    pub pss_ratio: f64,
    /// Mean RSS divided by runc.v2's on the same containerd.
    pub rss_ratio: f64,
    /// Processes elsewhere on the machine running the same executable as a probed one (other
    /// daemons' shims): they share its pages and lower its PSS.
    pub outside_sharers: usize,
    pub per_container: Vec<ContainerMemory>,
    pub probes: Vec<ContainerProbe>,
}

/// The memory benchmark's report.
#[derive(Debug, Clone, Serialize)]
pub struct MemReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    /// Seconds waited after starting the K containers before reading /proc.
    pub settle_secs: f64,
    pub rows: Vec<MemRow>,
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

impl MemReport {
    /// The report as text: the machine block, then one line per (containerd, runtime).
    pub fn render(&self) -> String {
        let width = self
            .rows
            .iter()
            .map(|r| r.runtime.len())
            .max()
            .unwrap_or(0)
            .max(7);
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!(
            "runtime-side memory per container (shim + helpers outside the container), MiB; \
             K containers running at once; ratios of means to runc.v2 on the same containerd; \
             read {} s after the last start; `other`: processes elsewhere on the machine \
             running the same executable, sharing its pages (they lower PSS)\n\n",
            self.settle_secs
        ));
        s.push_str(&format!(
            "{:<10}  {:<width$}  {:>3}  {:>5}  {:>5}  {:>8}  {:>8}  {:>8}  {:>8}  {:>6}  {:>6}\n",
            "containerd",
            "runtime",
            "K",
            "other",
            "procs",
            "PSS mean",
            "PSS med",
            "RSS mean",
            "RSS med",
            "×PSS",
            "×RSS"
        ));
        for r in &self.rows {
            s.push_str(&format!(
                "{:<10}  {:<width$}  {:>3}  {:>5}  {:>5.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>8.2}  {:>6.3}  {:>6.3}\n",
                r.containerd,
                r.runtime,
                r.containers,
                r.outside_sharers,
                r.processes_per_container,
                mib(r.pss_kib.mean),
                mib(r.pss_kib.median),
                mib(r.rss_kib.mean),
                mib(r.rss_kib.median),
                r.pss_ratio,
                r.rss_ratio
            ));
        }
        s
    }
}

/// `words` as one POSIX shell command line, quoting the words that need it.
pub fn shell_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| {
            let plain = !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@%+".contains(c));
            if plain {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `report` as pretty JSON to `path`.
pub fn write_json<T: Serialize>(path: &Path, report: &T) -> Result<(), ReportError> {
    let err = |source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut text = serde_json::to_string_pretty(report).map_err(|e| err(io::Error::other(e)))?;
    text.push('\n');
    fs::write(path, text).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_times_get_three_decimals() {
        assert_eq!(decimals_for([137.2, 90.7].into_iter()), 1);
        assert_eq!(decimals_for([0.41, 1.2].into_iter()), 3);
        assert_eq!(decimals_for(std::iter::empty()), 1);
    }

    #[test]
    fn command_lines_are_quoted_for_the_shell() {
        let words: Vec<String> = ["hyperbox-bench", "time", "--variant", "a=sh -c 'x'", ""]
            .map(String::from)
            .to_vec();
        assert_eq!(
            shell_words(&words),
            r"hyperbox-bench time --variant 'a=sh -c '\''x'\''' ''"
        );
    }
}

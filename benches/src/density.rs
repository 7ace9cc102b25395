//! Density: N idle containers (`sleep`) on one containerd, through each runtime in turn.
//!
//! For each runtime (runc.v2 first, then the others, one after the other on the same
//! containerd): the wall time to have all N running (`ctr run -d`, `--parallel` at a time),
//! the total runtime-side PSS and RSS with all N running (every process started from a shim
//! binary for this containerd: shims, our zygotes), `ctr tasks ls` latency with all N
//! listed, the wall time to remove them all; then a check that nothing of the runtime is
//! left: no shim process, no task, no rootfs mount and no state directory of the namespace.
//! A runtime that cannot start all N is reported with how far it got.

use std::collections::VecDeque;
use std::fs;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::cri;
use serde::Serialize;

use crate::engines::{parse_tasks_ls, with_default_runtime, Engine};
use crate::machine::Machine;
use crate::memprobe::parse_smaps_rollup;
use crate::stats::median;

/// How long after the last start the memory is read.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct DensityArgs {
    /// Containers per runtime, running at once when measured.
    #[arg(long, default_value_t = 500)]
    containers: usize,
    /// `ctr run -d` commands in flight at once.
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// The containerd version.
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
    /// Runtimes, comma-separated; io.containerd.runc.v2 is always included, first.
    #[arg(long, value_delimiter = ',', default_value = crate::engines::HYPERBOX_V1)]
    runtime: Vec<String>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

/// One runtime's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DensityRow {
    pub runtime: String,
    pub asked: usize,
    /// Containers running when measured (less than asked when starting one failed).
    pub running: usize,
    /// The first failure, if any.
    pub failure: Option<String>,
    pub start_all_s: f64,
    /// Runtime-side processes with all running.
    pub processes: usize,
    pub pss_mib: f64,
    pub rss_mib: f64,
    pub tasks_ls_ms: f64,
    pub remove_all_s: f64,
    /// What was left after removing them all (empty: nothing).
    pub leftovers: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DensityReport {
    pub benchmark: String,
    pub command_line: String,
    pub containerd: String,
    pub parallel: usize,
    pub machine: Machine,
    pub rows: Vec<DensityRow>,
}

impl DensityReport {
    pub fn render(&self) -> String {
        let mut out = format!(
            "# {}\n{} idle containers per runtime on containerd {}, {} `ctr run -d` at a time\n",
            self.command_line,
            self.rows.first().map_or(0, |r| r.asked),
            self.containerd,
            self.parallel
        );
        out.push_str(&format!(
            "{:<28} {:>8} {:>10} {:>6} {:>10} {:>10} {:>12} {:>10}\n",
            "runtime",
            "running",
            "start s",
            "procs",
            "PSS MiB",
            "RSS MiB",
            "tasks ls ms",
            "remove s"
        ));
        let base = self.rows.first();
        for r in &self.rows {
            out.push_str(&format!(
                "{:<28} {:>8} {:>10.1} {:>6} {:>10.1} {:>10.1} {:>12.1} {:>10.1}\n",
                r.runtime,
                r.running,
                r.start_all_s,
                r.processes,
                r.pss_mib,
                r.rss_mib,
                r.tasks_ls_ms,
                r.remove_all_s
            ));
        }
        if let Some(b) = base {
            for r in self.rows.iter().skip(1) {
                out.push_str(&format!(
                    "{} / {}: start {:.3}, PSS {:.3}, tasks ls {:.3}, remove {:.3}\n",
                    r.runtime,
                    b.runtime,
                    r.start_all_s / b.start_all_s,
                    r.pss_mib / b.pss_mib,
                    r.tasks_ls_ms / b.tasks_ls_ms,
                    r.remove_all_s / b.remove_all_s
                ));
            }
        }
        for r in &self.rows {
            if let Some(f) = &r.failure {
                out.push_str(&format!(
                    "{}: stopped at {} running: {f}\n",
                    r.runtime, r.running
                ));
            }
            if r.leftovers.is_empty() {
                out.push_str(&format!("{}: nothing left after removal\n", r.runtime));
            } else {
                out.push_str(&format!(
                    "{}: LEFT BEHIND: {}\n",
                    r.runtime,
                    r.leftovers.join("; ")
                ));
            }
        }
        out
    }
}

/// Runs `commands` (one `ctr` each), `parallel` at a time; returns how many succeeded before
/// the first failure, and that failure.
fn run_pool(
    c: &Containerd,
    commands: Vec<Vec<String>>,
    parallel: usize,
) -> (usize, Option<String>) {
    let mut queue: VecDeque<Vec<String>> = commands.into();
    let mut running: Vec<(String, Child)> = Vec::new();
    let mut ok = 0;
    let mut failure = None;
    loop {
        while failure.is_none() && running.len() < parallel.max(1) {
            let Some(args) = queue.pop_front() else { break };
            let mut cmd = c.ctr();
            cmd.args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            match cmd.spawn() {
                Ok(child) => running.push((args.join(" "), child)),
                Err(e) => failure = Some(format!("cannot run ctr: {e}")),
            }
        }
        if running.is_empty() {
            break;
        }
        let (shown, child) = running.remove(0);
        match child.wait_with_output() {
            Ok(out) if out.status.success() => ok += 1,
            Ok(out) => {
                failure.get_or_insert_with(|| {
                    format!(
                        "ctr {shown}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                });
            }
            Err(e) => {
                failure.get_or_insert_with(|| format!("ctr {shown}: {e}"));
            }
        }
    }
    (ok, failure)
}

/// Total PSS and RSS (KiB) and count of the processes started from a shim binary for the
/// containerd at `socket`, whose binary is `binary`.
fn runtime_memory(socket: &Path, binary: &str) -> (usize, u64, u64) {
    let mut n = 0;
    let (mut pss, mut rss) = (0, 0);
    for p in cri::shim_processes(socket) {
        if p.binary != binary {
            continue;
        }
        let Ok(text) = fs::read_to_string(format!("/proc/{}/smaps_rollup", p.pid)) else {
            continue;
        };
        if let Some(r) = parse_smaps_rollup(&text) {
            n += 1;
            pss += r.pss_kib;
            rss += r.rss_kib;
        }
    }
    (n, pss, rss)
}

/// What is left of `ids` after their removal: shim processes, tasks, rootfs mounts and our
/// shim's state directory for the namespace.
fn leftovers(engine: &Engine, binary: &str, ids: &[String]) -> Vec<String> {
    let c = &engine.bed.containerd;
    let mut left = Vec::new();
    let shims = runtime_memory(c.socket(), binary).0;
    if shims > 0 {
        left.push(format!("{shims} {binary} processes"));
    }
    match c.ctr_stdout(&["tasks", "ls"]) {
        Ok(listing) => {
            let tasks = parse_tasks_ls(&listing)
                .into_iter()
                .filter(|t| ids.contains(&t.id))
                .count();
            if tasks > 0 {
                left.push(format!("{tasks} tasks"));
            }
        }
        Err(e) => left.push(format!("cannot list tasks: {e}")),
    }
    let task_dir = format!("io.containerd.runtime.v2.task/{}/", c.namespace());
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&task_dir))
        .count();
    if mounts > 0 {
        left.push(format!("{mounts} mounts under {task_dir}"));
    }
    let state = Path::new("/run/hyperbox/youki").join(c.namespace());
    if let Ok(dir) = fs::read_dir(&state) {
        let n = dir.count();
        if n > 0 {
            left.push(format!("{n} entries in {}", state.display()));
        }
    }
    left
}

fn measure(engine: &Engine, runtime: &str, index: usize, args: &DensityArgs) -> DensityRow {
    let c = &engine.bed.containerd;
    let binary = hyperbox_integration::containerd::shim_binary_name(runtime).unwrap_or_default();
    let ids: Vec<String> = (0..args.containers)
        .map(|i| format!("dense-{index}-{i}"))
        .collect();
    let starts: Vec<Vec<String>> = ids
        .iter()
        .map(|id| {
            [
                "run",
                "-d",
                "--null-io",
                "--runtime",
                runtime,
                &engine.image,
                id,
                "sleep",
                "100000",
            ]
            .map(String::from)
            .to_vec()
        })
        .collect();
    let t = Instant::now();
    let (_, failure) = run_pool(c, starts, args.parallel);
    let start_all_s = t.elapsed().as_secs_f64();
    // Memory is read in the steady state: the last shims' start-up work (their `start`
    // processes, first page-ins) is over.
    std::thread::sleep(SETTLE);
    let (processes, pss, rss) = runtime_memory(c.socket(), &binary);
    let mut ls = Vec::new();
    let mut running = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let listing = c.ctr_stdout(&["tasks", "ls"]).unwrap_or_default();
        ls.push(t.elapsed().as_secs_f64() * 1000.0);
        running = parse_tasks_ls(&listing)
            .iter()
            .filter(|t| t.status == "RUNNING" && ids.contains(&t.id))
            .count();
    }
    ls.sort_by(f64::total_cmp);
    // What exists of ours: all, or those created before a failure stopped the starts.
    let existing = c
        .ctr_stdout(&["containers", "ls", "-q"])
        .unwrap_or_default();
    let made: Vec<&String> = ids
        .iter()
        .filter(|id| existing.lines().any(|l| l.trim() == id.as_str()))
        .collect();
    let t = Instant::now();
    let removes: Vec<Vec<String>> = made
        .iter()
        .map(|id| {
            ["tasks", "rm", "-f", id.as_str()]
                .map(String::from)
                .to_vec()
        })
        .collect();
    let (_, rm_failure) = run_pool(c, removes, args.parallel);
    let containers: Vec<Vec<String>> = made
        .iter()
        .map(|id| ["containers", "rm", id.as_str()].map(String::from).to_vec())
        .collect();
    let (_, c_failure) = run_pool(c, containers, args.parallel);
    let remove_all_s = t.elapsed().as_secs_f64();
    let mut left = leftovers(engine, &binary, &ids);
    if let Some(e) = rm_failure.or(c_failure) {
        left.push(format!("removal failed: {e}"));
    }
    DensityRow {
        runtime: runtime.to_string(),
        asked: args.containers,
        running,
        failure,
        start_all_s,
        processes,
        pss_mib: pss as f64 / 1024.0,
        rss_mib: rss as f64 / 1024.0,
        tasks_ls_ms: median(&ls).unwrap_or(0.0),
        remove_all_s,
        leftovers: left,
    }
}

pub fn run(args: DensityArgs, command_line: String) -> anyhow::Result<()> {
    if args.containers == 0 {
        bail!("--containers must be at least 1");
    }
    let runtimes = with_default_runtime(&args.runtime);
    let mut machine = Machine::collect(None);
    let engine = Engine::start(args.containerd)
        .with_context(|| format!("preparing containerd {}", args.containerd))?;
    machine.locate_runc(engine.bed.containerd.path_env());
    for rt in &runtimes {
        engine.check_runtime(rt)?;
    }
    let mut rows = Vec::new();
    for (i, rt) in runtimes.iter().enumerate() {
        let row = measure(&engine, rt, i, &args);
        tracing::info!(
            runtime = rt,
            running = row.running,
            pss_mib = row.pss_mib,
            "measured"
        );
        rows.push(row);
    }
    machine.finish();
    let report = DensityReport {
        benchmark: "density".into(),
        command_line,
        containerd: args.containerd.to_string(),
        parallel: args.parallel,
        machine,
        rows,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        crate::report::write_json(path, &report)?;
    }
    if report.rows.iter().any(|r| !r.leftovers.is_empty()) {
        bail!("something was left behind after removing the containers (see above)");
    }
    Ok(())
}

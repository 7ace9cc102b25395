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

use std::fs;
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
    get_in_network, network_with_loopback, remove_network, PY_SERVICE, PY_SERVICE_PORT,
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
/// Ours, as a binary (for `templates inspect`).
const SHIM: &str = "containerd-shim-hyperbox-v1";

/// Goal: a Python service restored from its template ready in at most this share of the
/// time it takes cold through ours.
pub const GOAL_RESTORED_OVER_COLD: f64 = 0.1;
/// Goal: a trivial process restored from its template ready in under this many ms (median).
pub const GOAL_RESTORED_MS: f64 = 100.0;
/// Goal: `ctr containers restore --live` through ours at most this share of runc.v2's.
pub const GOAL_RESTORE_OVER_RUNC: f64 = 0.7;

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

#[derive(Debug, Args)]
pub struct TemplatesArgs {
    /// Measured rounds of the Python service; each starts it once per variant (cold ~3 s).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Measured rounds of busybox httpd and of checkpoint/restore.
    #[arg(long, default_value_t = 20)]
    busybox_rounds: usize,
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

/// Time to ready of one workload: cold through runc.v2 and ours, restored through ours.
#[derive(Debug, Clone, Serialize)]
pub struct ReadyPart {
    pub workload: String,
    pub template: Capture,
    /// Ratios of medians to runc.v2 cold.
    pub ready: Table,
    /// The same runs, until `ctr run -d` returned (it may return before or after the
    /// service answers).
    pub ctr_returned: Table,
    /// Median restored over median cold, both through ours.
    pub restored_over_cold: f64,
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
    /// busybox httpd: restored median, ms.
    pub busybox_restored_ms: f64,
    /// `ctr containers restore --live`: ours' median over runc.v2's.
    pub restore_over_runc: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionReport {
    pub containerd: String,
    pub python: ReadyPart,
    pub busybox: ReadyPart,
    pub checkpoint: CheckpointPart,
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
    s
}

impl TemplatesReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}", self.command_line, self.machine.render());
        for v in &self.versions {
            let cv = &v.containerd;
            s.push('\n');
            s.push_str(&render_ready(&v.python, cv));
            s.push('\n');
            s.push_str(&render_ready(&v.busybox, cv));
            let cp = &v.checkpoint;
            s.push_str(&format!(
                "\n{} on containerd {cv}: `ctr containers checkpoint --task ID REF` ({} rounds \
                 after {} warm-up, rotated; ms; ratio of medians to runc.v2)\n",
                cp.workload, cp.checkpoint.timings.rounds, cp.checkpoint.timings.warmup
            ));
            s.push_str(&render_table(&cp.checkpoint));
            s.push_str("`ctr containers restore --live ID REF`, until it returned:\n");
            s.push_str(&render_table(&cp.restore));
            let g = &v.goals;
            s.push_str(&format!("\ngoals on containerd {cv}:\n"));
            s.push_str(&format!(
                "python restored ≤ {GOAL_RESTORED_OVER_COLD} × cold through ours: {:.4} ({})\n",
                g.python_restored_over_cold,
                verdict(g.python_restored_over_cold, GOAL_RESTORED_OVER_COLD)
            ));
            // Strictly under: `verdict` is "at most".
            let fast = g.busybox_restored_ms < GOAL_RESTORED_MS;
            s.push_str(&format!(
                "busybox restored median < {GOAL_RESTORED_MS} ms: {:.1} ms ({})\n",
                g.busybox_restored_ms,
                if fast { "met" } else { "missed" }
            ));
            s.push_str(&format!(
                "restore --live through ours ≤ {GOAL_RESTORE_OVER_RUNC} × runc.v2's: {:.4} ({})\n",
                g.restore_over_runc,
                verdict(g.restore_over_runc, GOAL_RESTORE_OVER_RUNC)
            ));
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
    Restored,
}

/// One variant of a ready part.
struct ReadyVariant {
    name: &'static str,
    runtime: &'static str,
    start: Start,
}

const READY_VARIANTS: [ReadyVariant; 3] = [
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
];

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

    /// `containerd-shim-hyperbox-v1 templates inspect -n NS NAME`.
    fn inspect(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let c = self.containerd();
        let shim = host::workspace_binary(SHIM)
            .with_context(|| format!("{SHIM} is not built beside this binary"))?;
        let out = Command::new(&shim)
            .args(["templates", "inspect", "-n", c.namespace(), name])
            .env("HYPERBOX_TEMPLATE_ROOT", c.template_root())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", shim.display()))?;
        if !out.status.success() {
            bail!(
                "{SHIM} templates inspect {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{SHIM} templates inspect {name} printed no JSON"))
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

    /// The time-to-ready part of workload `w`.
    fn ready_part(
        &self,
        w: &Workload<'_>,
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<ReadyPart> {
        let template = self.capture(w)?;
        let restore = [(RESTORE_FROM, template.name.as_str())];
        let mut samples = vec![Vec::with_capacity(rounds); READY_VARIANTS.len()];
        let mut returned = vec![Vec::with_capacity(rounds); READY_VARIANTS.len()];
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(READY_VARIANTS.len(), round) {
                    n += 1;
                    let v = &READY_VARIANTS[i];
                    let id = format!("{}-{i}-{n}", w.tag);
                    let netns = Netns::new(self.containerd(), &id)?;
                    let annotations: &[(&str, &str)] = match v.start {
                        Start::Cold => &[],
                        Start::Restored => &restore,
                    };
                    let args =
                        run_args(v.runtime, Some(&netns.0), annotations, w.image, &id, &w.cmd);
                    let Ready {
                        body,
                        ready_ms,
                        returned_ms,
                    } = self.run_until_ready(&args, &netns.0)?;
                    let restored = body == template.body;
                    if restored != (v.start == Start::Restored) {
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
        let commands: Vec<String> = READY_VARIANTS
            .iter()
            .map(|v| {
                let how = match v.start {
                    Start::Cold => String::new(),
                    Start::Restored => format!(" --annotation {RESTORE_FROM}={}", template.name),
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
        let times = |samples: Vec<Vec<f64>>, until: &str| {
            let times = READY_VARIANTS
                .iter()
                .zip(&commands)
                .zip(samples)
                .map(|((v, command), s)| VariantTimes {
                    name: v.name.to_string(),
                    command: format!("{command} ({until})"),
                    samples_ms: s,
                })
                .collect();
            table(times, rounds, warmup)
        };
        let ready = times(samples, "until a GET in its netns answers");
        let ctr_returned = times(returned, "until ctr returned");
        let restored_over_cold =
            median_of(&ready, "hyperbox restored") / median_of(&ready, "hyperbox cold");
        Ok(ReadyPart {
            workload: w.label.to_string(),
            template,
            ready,
            ctr_returned,
            restored_over_cold,
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
    let python = b.ready_part(&python, args.rounds, args.warmup)?;
    let busybox = b.ready_part(&busybox, args.busybox_rounds, args.warmup)?;
    let checkpoint = b.checkpoint_part(args.busybox_rounds, args.warmup)?;
    let goals = Goals {
        python_restored_over_cold: python.restored_over_cold,
        busybox_restored_ms: median_of(&busybox.ready, "hyperbox restored"),
        restore_over_runc: median_of(&checkpoint.restore, "hyperbox")
            / median_of(&checkpoint.restore, "runc.v2"),
    };
    Ok(VersionReport {
        containerd: version.to_string(),
        python,
        busybox,
        checkpoint,
        goals,
    })
}

pub fn run(args: TemplatesArgs, command_line: String) -> anyhow::Result<()> {
    if args.rounds == 0 || args.busybox_rounds == 0 {
        bail!("--rounds and --busybox-rounds must be at least 1");
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

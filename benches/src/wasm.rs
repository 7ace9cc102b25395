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
//!   ([`memprobe`]), plus the container's own processes (for wasm the guest's process holds
//!   wasmtime and the compiled code).
//! - **kill**: a looping guest (and a busybox `sh` loop through runc.v2) started detached,
//!   then timed from spawning `ctr tasks kill -s SIGKILL` until containerd's `/tasks/exit`
//!   event for it arrives on a `ctr events` stream.

use std::collections::VecDeque;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::wasm_image::{WasmImageBuilder, WASM_LAYER};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::engines::{parse_tasks_ls, Engine, RUNC_V2};
use crate::machine::Machine;
use crate::memprobe::{self, parse_smaps_rollup, ContainerMemory, ContainerProbe};
use crate::report;
use crate::runner::{
    self, describe, run_command, CommandFailure, Plan, Timings, Variant, VariantTimes,
};
use crate::stats::{rotation, Summary};

/// HyperBox's wasm runtime.
pub const WASM_V1: &str = "io.containerd.hyperbox-wasm.v1";
/// Where the wasm shim keeps compiled guests (`hyperbox_shim_wasm::cache::CACHE_DIR`; not
/// linked here, to keep wasmtime out of the benchmark).
pub const COMPILE_CACHE_DIR: &str = "/var/lib/hyperbox/wasm-cache";
/// The goal: a warm wasm `ctr run --rm` at most this share of runc.v2's native one.
pub const GOAL_WARM_RATIO: f64 = 0.5;
/// The goal: at most this PSS (MiB) per running wasm container.
pub const GOAL_PSS_MIB: f64 = 12.0;

/// Prints `hello from wasm` and returns from `_start` (exit 0). `TAG` makes the module, and
/// so its digest and cache entry, this benchmark run's own.
const HELLO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (data (i32.const 256) "TAG")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// Sleeps an hour at a time, forever, in `poll_oneoff` on one relative monotonic-clock
/// subscription (userdata 0, tag 0 = clock at 8, clock id 1 at 16, timeout in ns at 24,
/// precision 0 at 32, flags 0 at 40): blocked, not burning a CPU.
const SLEEP: &str = r#"
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (loop $sleep
      (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
      (br $sleep))))
"#;

/// Never ends, never calls the host: only epoch interruption can stop it.
const LOOP: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

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

/// WebAssembly text for the guests.
fn assemble(wat: &str) -> anyhow::Result<Vec<u8>> {
    wat::parse_str(wat).context("assembling a benchmark guest")
}

/// The hello guest made unique by `tag` (letters, digits and `-`).
fn hello(tag: &str) -> anyhow::Result<Vec<u8>> {
    assemble(&HELLO.replace("TAG", tag))
}

/// Whether the cache file `name` is an entry (`DIGEST-COMPAT.cwasm`) of the guest whose
/// SHA-256 is `digest`.
pub fn is_cache_entry_of(name: &str, digest: &str) -> bool {
    name.strip_prefix(digest)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|rest| rest.ends_with(".cwasm"))
}

/// Deletes every compile cache entry of `digest`; how many there were.
fn remove_cache_entries(digest: &str) -> std::io::Result<usize> {
    let dir = match fs::read_dir(COMPILE_CACHE_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in dir {
        let entry = entry?;
        if is_cache_entry_of(&entry.file_name().to_string_lossy(), digest) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What the shims logged about one guest: `compiled` and `cache hit` lines naming its digest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounts {
    pub compiled: usize,
    pub cache_hits: usize,
}

/// Counts the lines of `log` naming `digest` whose message is `compiled` or `cache hit`
/// (the wasm shim's `tracing` line for each Create of a guest; a warning such as `cannot
/// store the compiled guest` is not counted).
pub fn count_cache_lines(log: &str, digest: &str) -> CacheCounts {
    let mut counts = CacheCounts::default();
    for line in log.lines().filter(|l| l.contains(digest)) {
        if line.contains("cache hit") {
            counts.cache_hits += 1;
        } else if line.contains("compiled") && !line.contains("cannot store") {
            counts.compiled += 1;
        }
    }
    counts
}

/// A `/tasks/exit` event as `ctr events` prints it: `TIME NS /tasks/exit {JSON}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitEvent {
    pub container: String,
    pub exit_status: u32,
}

/// Parses one line of `ctr events`; `None` for any other topic (the JSON leaves out an exit
/// status of 0).
pub fn parse_exit_event(line: &str) -> Option<ExitEvent> {
    let at = line.find(" /tasks/exit ")?;
    let json = line[at..].find('{').map(|i| &line[at + i..])?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(ExitEvent {
        container: v.get("container_id")?.as_str()?.to_string(),
        exit_status: v
            .get("exit_status")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32,
    })
}

/// User plus system CPU time of a process, in clock ticks, from `/proc/PID/stat` (fields 14
/// and 15, counted after the command name, which may hold spaces and parentheses).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn cpu_ticks(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_cpu_ticks(&s))
        .unwrap_or(0)
}

/// `pid` and every process descending from it, from `/proc/PID/task/*/children`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        out.push(p);
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            queue.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// The container's own processes (its init and what descends from it) and their memory.
struct ContainerSide {
    pids: Vec<u32>,
    pss_kib: f64,
    rss_kib: f64,
}

fn container_memory(init_pid: u32) -> anyhow::Result<ContainerSide> {
    let mut side = ContainerSide {
        pids: process_tree(init_pid),
        pss_kib: 0.0,
        rss_kib: 0.0,
    };
    for pid in &side.pids {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        let m = parse_smaps_rollup(&text).with_context(|| format!("cannot parse {path}"))?;
        side.pss_kib += m.pss_kib as f64;
        side.rss_kib += m.rss_kib as f64;
    }
    Ok(side)
}

/// How many of the containers' own processes run an executable a probed runtime process
/// runs (a wasm guest's process is a copy of the shim's zygote): they are not others'.
fn containers_sharing_exe(probes: &[ContainerProbe], containers: &[ContainerSide]) -> usize {
    let exes: Vec<&Path> = probes
        .iter()
        .flat_map(|p| p.processes.iter().map(|q| q.exe.as_path()))
        .collect();
    containers
        .iter()
        .flat_map(|c| &c.pids)
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| exes.contains(&e.as_path()))
        })
        .count()
}

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

fn mib(kib: f64) -> f64 {
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

/// The benchmark's set-up: the engine, the guests' root filesystem, the hello guest.
struct Bench {
    engine: Engine,
    rootfs: PathBuf,
    fifo: PathBuf,
    digest: String,
    /// The hello guest as an OCI wasm image, pulled (containerd 1.7 only).
    image: Option<String>,
}

impl Bench {
    fn containerd(&self) -> &Containerd {
        &self.engine.bed.containerd
    }

    /// `ctr run --rm --fifo-dir F --runtime WASM --rootfs DIR ID /hello.wasm`.
    fn wasm_rootfs_run(&self, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args(["--runtime", WASM_V1, "--rootfs"])
            .arg(&self.rootfs)
            .args([id, "/hello.wasm"]);
        cmd
    }

    fn wasm_image_run(&self, image: &str, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args(["--runtime", WASM_V1, image, id]);
        cmd
    }

    fn native_run(&self, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args([
                "--runtime",
                RUNC_V2,
                &self.engine.image,
                id,
                "echo",
                "hello",
            ]);
        cmd
    }

    fn cache_counts(&self) -> CacheCounts {
        let log = fs::read_to_string(self.containerd().log_path()).unwrap_or_default();
        count_cache_lines(&log, &self.digest)
    }

    /// Starts `ctr run -d --null-io --runtime RUNTIME ARGS` and returns the task's pid once
    /// it runs.
    fn start_detached(&self, runtime: &str, id: &str, args: &[&str]) -> anyhow::Result<u32> {
        let c = self.containerd();
        let mut all = vec!["run", "-d", "--null-io", "--runtime", runtime];
        all.extend_from_slice(args);
        c.ctr_run(&all)
            .with_context(|| format!("starting container {id}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listing = c.ctr_stdout(&["tasks", "ls"])?;
            match parse_tasks_ls(&listing).into_iter().find(|t| t.id == id) {
                Some(t) if t.status == "RUNNING" && t.pid > 0 => return Ok(t.pid),
                _ if Instant::now() > deadline => {
                    bail!("task {id} is not running; `ctr tasks ls` says:\n{listing}")
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Runs `cmd` once with its output kept, failing unless it exits 0 printing `expected`.
fn check_output(mut cmd: Command, expected: &str) -> anyhow::Result<()> {
    let shown = describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout != expected {
        bail!(
            "`{shown}` did not print {expected:?} ({}): stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn unique_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("hyperbox-bench-{}-{nanos}", std::process::id())
}

fn prepare(version: ContainerdVersion) -> anyhow::Result<Bench> {
    let engine =
        Engine::start(version).with_context(|| format!("preparing containerd {version}"))?;
    engine.check_runtime(WASM_V1)?;
    let c = &engine.bed.containerd;
    let hello = hello(&unique_tag())?;
    let digest = format!("{:x}", Sha256::digest(&hello));
    let rootfs = c.dir().join("wasm-rootfs");
    fs::create_dir_all(&rootfs).with_context(|| format!("cannot create {}", rootfs.display()))?;
    for (name, bytes) in [
        ("hello.wasm", hello.clone()),
        ("sleep.wasm", assemble(SLEEP)?),
        ("loop.wasm", assemble(LOOP)?),
    ] {
        let path = rootfs.join(name);
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let image = if version == ContainerdVersion::V1_6 {
        tracing::info!("containerd 1.6 refuses wasm images: no OCI image variant");
        None
    } else {
        let written = WasmImageBuilder::new()
            .with_layer(WASM_LAYER, hello)
            .with_cmd(&["hello.wasm"])
            .write(&c.dir().join("wasm-image-hello"))
            .context("writing the hello guest's OCI image")?;
        let reference = written
            .push(&engine.bed.registry.host(), "bench/wasm-hello:1")
            .context("pushing the hello guest's image")?;
        c.pull(&reference)?;
        Some(reference)
    };
    let fifo = c.dir().join("fifo");
    tracing::info!(%digest, rootfs = %rootfs.display(), ?image, "wasm guests ready");
    Ok(Bench {
        engine,
        rootfs,
        fifo,
        digest,
        image,
    })
}

fn io_failure(what: &str, e: std::io::Error) -> CommandFailure {
    CommandFailure {
        command: what.to_string(),
        status: "failed".into(),
        stderr: e.to_string(),
    }
}

/// The lifecycle part: the timed variants, then the shims' cache log lines.
fn lifecycle(b: &Bench, plan: &Plan) -> anyhow::Result<(Timings, CacheCounts, CacheCounts)> {
    // Each variant once, its output checked, before anything is timed.
    check_output(b.wasm_rootfs_run("wasm-check"), "hello from wasm\n")?;
    if let Some(image) = &b.image {
        check_output(
            b.wasm_image_run(image, "wasm-image-check"),
            "hello from wasm\n",
        )?;
    }
    check_output(b.native_run("native-check"), "hello\n")?;
    let before = b.cache_counts();

    let warm = Variant::command(
        "hyperbox-wasm warm",
        format!(
            "ctr run --rm --runtime {WASM_V1} --rootfs DIR wasm-warm-{{n}} /hello.wasm \
             (compile cache entry present)"
        ),
        |n| b.wasm_rootfs_run(&format!("wasm-warm-{n}")),
    );
    let digest = b.digest.clone();
    let cold = Variant::new(
        "hyperbox-wasm cold",
        format!(
            "rm {COMPILE_CACHE_DIR}/{digest}-*.cwasm; ctr run --rm --runtime {WASM_V1} \
             --rootfs DIR wasm-cold-{{n}} /hello.wasm"
        ),
        move |n| {
            remove_cache_entries(&digest)
                .map_err(|e| io_failure("removing the compile cache entry", e))?;
            let mut cmd = b.wasm_rootfs_run(&format!("wasm-cold-{n}"));
            let shown = describe(&cmd);
            run_command(&mut cmd, &shown)
        },
    );
    let native = Variant::command(
        "runc.v2 busybox",
        format!("ctr run --rm --runtime {RUNC_V2} busybox native-{{n}} echo hello"),
        |n| b.native_run(&format!("native-{n}")),
    );
    let mut variants = vec![warm, cold];
    if let Some(image) = &b.image {
        variants.push(Variant::command(
            "hyperbox-wasm image warm",
            format!("ctr run --rm --runtime {WASM_V1} {image} wasm-image-{{n}}"),
            move |n| b.wasm_image_run(image, &format!("wasm-image-{n}")),
        ));
    }
    variants.push(native);
    let warm_variants = variants.len() - 2;
    let plan = Plan {
        baseline: Some("runc.v2 busybox".into()),
        ..plan.clone()
    };
    let timings = runner::run(&mut variants, &plan)?;
    drop(variants);

    let runs = plan.rounds + plan.warmup;
    let expected = CacheCounts {
        compiled: runs,
        cache_hits: runs * warm_variants,
    };
    // The shims' log lines reach containerd's log shortly after each container.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let now = b.cache_counts();
        let seen = CacheCounts {
            compiled: now.compiled - before.compiled,
            cache_hits: now.cache_hits - before.cache_hits,
        };
        if seen == expected || Instant::now() > deadline {
            break seen;
        }
        thread::sleep(Duration::from_millis(200));
    };
    if seen != expected {
        tracing::warn!(
            ?seen,
            ?expected,
            "the compile cache did not behave as expected"
        );
    }
    Ok((timings, seen, expected))
}

/// `ctr run` arguments for the container `id`: `template` with `{id}` replaced.
fn with_id(template: &[String], id: &str) -> Vec<String> {
    template.iter().map(|a| a.replace("{id}", id)).collect()
}

/// One runtime's memory line: K containers started with `template` (its `{id}` the
/// container's), probed, removed.
fn measure_memory(
    b: &Bench,
    runtime: &str,
    workload: &str,
    k: usize,
    settle_secs: f64,
    template: &[String],
) -> anyhow::Result<WasmMemRow> {
    let ids: Vec<String> = (0..k)
        .map(|i| format!("mem-{}-{i}", runtime.replace('.', "-")))
        .collect();
    let mut pids = Vec::with_capacity(k);
    for id in &ids {
        let a = with_id(template, id);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        pids.push(b.start_detached(runtime, id, &a)?);
    }
    let ticks_before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let settle_start = Instant::now();
    thread::sleep(Duration::from_secs_f64(settle_secs));
    let probes = ids
        .iter()
        .zip(&pids)
        .map(|(id, pid)| memprobe::probe_container(id, *pid))
        .collect::<Result<Vec<_>, _>>()?;
    let container = pids
        .iter()
        .map(|p| container_memory(*p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settled = settle_start.elapsed().as_secs_f64();
    // SAFETY: sysconf has no preconditions; it reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&ticks_before)
        .map(|(p, before)| 100.0 * cpu_ticks(*p).saturating_sub(*before) as f64 / hz / settled)
        .collect();
    let outside_sharers = memprobe::outside_sharers(&probes)
        .saturating_sub(containers_sharing_exe(&probes, &container));
    b.engine.remove(&ids)?;

    let per_container = memprobe::attribute(&probes);
    let summary = |s: Vec<f64>| Summary::of(&s).context("no container was measured");
    let rt_pss: Vec<f64> = per_container.iter().map(|m| m.pss_kib).collect();
    let rt_rss: Vec<f64> = per_container.iter().map(|m| m.rss_kib).collect();
    let ct_pss: Vec<f64> = container.iter().map(|c| c.pss_kib).collect();
    let ct_rss: Vec<f64> = container.iter().map(|c| c.rss_kib).collect();
    let total_pss = rt_pss.iter().zip(&ct_pss).map(|(a, b)| a + b).collect();
    let total_rss = rt_rss.iter().zip(&ct_rss).map(|(a, b)| a + b).collect();
    let row = WasmMemRow {
        runtime: runtime.to_string(),
        workload: workload.to_string(),
        containers: k,
        runtime_processes: summary(per_container.iter().map(|m| m.processes).collect())?.mean,
        container_processes: summary(container.iter().map(|c| c.pids.len() as f64).collect())?.mean,
        runtime_pss_kib: summary(rt_pss)?,
        runtime_rss_kib: summary(rt_rss)?,
        container_pss_kib: summary(ct_pss)?,
        container_rss_kib: summary(ct_rss)?,
        total_pss_kib: summary(total_pss)?,
        total_rss_kib: summary(total_rss)?,
        total_pss_ratio: f64::NAN,
        total_rss_ratio: f64::NAN,
        init_cpu_percent: summary(cpu)?.mean,
        outside_sharers,
        per_container,
        probes,
    };
    tracing::info!(
        runtime,
        pss_mib = mib(row.total_pss_kib.mean),
        rss_mib = mib(row.total_rss_kib.mean),
        "memory measured"
    );
    Ok(row)
}

fn memory(b: &Bench, k: usize, settle_secs: f64) -> anyhow::Result<Vec<WasmMemRow>> {
    let native = [b.engine.image.as_str(), "{id}", "sleep", "1000"].map(String::from);
    let native = measure_memory(b, RUNC_V2, "busybox sleep 1000", k, settle_secs, &native)?;
    let rootfs = b.rootfs.to_string_lossy();
    let wasm = ["--rootfs", &rootfs, "{id}", "/sleep.wasm"].map(String::from);
    let wasm = measure_memory(
        b,
        WASM_V1,
        "/sleep.wasm (poll_oneoff)",
        k,
        settle_secs,
        &wasm,
    )?;
    let mut rows = vec![native, wasm];
    let (pss, rss) = (rows[0].total_pss_kib.mean, rows[0].total_rss_kib.mean);
    for r in &mut rows {
        r.total_pss_ratio = r.total_pss_kib.mean / pss;
        r.total_rss_ratio = r.total_rss_kib.mean / rss;
    }
    Ok(rows)
}

/// `ctr events`, read on a thread: the `/tasks/exit` events with the instant each arrived.
struct ExitEvents {
    child: Child,
    events: Receiver<(ExitEvent, Instant)>,
}

impl ExitEvents {
    fn start(c: &Containerd) -> anyhow::Result<ExitEvents> {
        let mut child = c
            .ctr()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `ctr events`")?;
        let stdout = child.stdout.take().context("`ctr events` has no stdout")?;
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(e) = parse_exit_event(&line) {
                    if tx.send((e, Instant::now())).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(ExitEvents { child, events })
    }

    /// Waits for the exit event of `container`, skipping others'.
    fn wait_for(&self, container: &str) -> anyhow::Result<(ExitEvent, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((e, at)) if e.container == container => return Ok((e, at)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no /tasks/exit event for {container} within 30 s")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("`ctr events` ended"),
            }
        }
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A looping container to kill: name, runtime, and `ctr run` arguments (`{id}` for the
/// container's).
struct Looper {
    name: &'static str,
    runtime: &'static str,
    template: Vec<String>,
}

fn kill(b: &Bench, rounds: usize, warmup: usize) -> anyhow::Result<KillTimings> {
    let rootfs = b.rootfs.to_string_lossy();
    let image = b.engine.image.as_str();
    let loopers = [
        Looper {
            name: "hyperbox-wasm loop",
            runtime: WASM_V1,
            template: ["--rootfs", &rootfs, "{id}", "/loop.wasm"]
                .map(String::from)
                .to_vec(),
        },
        Looper {
            name: "runc.v2 busybox loop",
            runtime: RUNC_V2,
            template: [image, "{id}", "sh", "-c", "while :; do :; done"]
                .map(String::from)
                .to_vec(),
        },
    ];
    let c = b.containerd();
    let events = ExitEvents::start(c)?;
    // Let the subscription reach containerd before the first kill.
    thread::sleep(Duration::from_millis(500));
    let mut until_exit = vec![Vec::with_capacity(rounds); loopers.len()];
    let mut until_returned = vec![Vec::with_capacity(rounds); loopers.len()];
    let mut n = 0;
    for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
        for round in 0..count {
            for i in rotation(loopers.len(), round) {
                n += 1;
                let l = &loopers[i];
                let id = format!("kill-{i}-{n}");
                let args = with_id(&l.template, &id);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                b.start_detached(l.runtime, &id, &args)?;
                // Running its loop, not still starting it.
                thread::sleep(Duration::from_millis(100));
                let start = Instant::now();
                c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", &id])
                    .with_context(|| format!("killing {id}"))?;
                let returned = start.elapsed();
                let (event, at) = events.wait_for(&id)?;
                if event.exit_status != 137 {
                    bail!("{id} exited {} after SIGKILL, not 137", event.exit_status);
                }
                if record {
                    until_exit[i].push(at.duration_since(start).as_secs_f64() * 1e3);
                    until_returned[i].push(returned.as_secs_f64() * 1e3);
                }
                b.engine.remove(&[id])?;
            }
            if (round + 1) % 10 == 0 || round + 1 == count {
                tracing::info!("kill {phase} round {}/{count} done", round + 1);
            }
        }
    }
    let timings = |samples: Vec<Vec<f64>>, what: &str| {
        let times = loopers
            .iter()
            .zip(samples)
            .map(|(l, s)| VariantTimes {
                name: l.name.to_string(),
                command: format!("ctr tasks kill -s SIGKILL ID ({what}), {}", l.runtime),
                samples_ms: s,
            })
            .collect();
        Timings {
            rounds,
            warmup,
            baseline: loopers[1].name.to_string(),
            variants: runner::summarize(times, 1),
        }
    };
    Ok(KillTimings {
        until_exit_event: timings(until_exit, "until the exit event"),
        until_kill_returned: timings(until_returned, "until ctr returned"),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_assemble_and_the_tag_makes_hello_unique() {
        let a = hello("bench-a").unwrap();
        let b = hello("bench-b").unwrap();
        assert!(a.starts_with(b"\0asm"));
        assert_ne!(Sha256::digest(&a), Sha256::digest(&b));
        assert!(a.windows(7).any(|w| w == b"bench-a"));
        assert!(assemble(SLEEP).unwrap().starts_with(b"\0asm"));
        assert!(assemble(LOOP).unwrap().starts_with(b"\0asm"));
    }

    #[test]
    fn cache_entries_are_matched_by_digest_and_suffix() {
        let d = "ab12";
        assert!(is_cache_entry_of("ab12-7f00aa.cwasm", d));
        assert!(!is_cache_entry_of("ab12-7f00aa.tmp-42", d));
        assert!(!is_cache_entry_of("ab123-7f00aa.cwasm", d));
        assert!(!is_cache_entry_of("cd34-7f00aa.cwasm", d));
    }

    #[test]
    fn cache_lines_are_counted_for_the_digest_only() {
        let log = "\
time=1 level=info msg=\"compiled\" id=a digest=ab12 guest=/hello.wasm\n\
time=2 level=info msg=\"cache hit\" id=b digest=ab12 guest=/hello.wasm\n\
time=3 level=info msg=\"cache hit\" id=c digest=cd34 guest=/other.wasm\n\
time=4 level=warn msg=\"cannot store the compiled guest: full\" entry=/c/ab12-1.cwasm\n\
time=5 level=info msg=\"cache hit\" id=d digest=ab12 guest=/hello.wasm\n";
        assert_eq!(
            count_cache_lines(log, "ab12"),
            CacheCounts {
                compiled: 1,
                cache_hits: 2
            }
        );
    }

    #[test]
    fn exit_events_are_parsed_from_ctr_events() {
        let line = "2026-11-29 05:20:01.123456789 +0000 UTC hyperbox /tasks/exit \
                    {\"container_id\":\"kill-0-4\",\"id\":\"kill-0-4\",\"pid\":4242,\
                    \"exit_status\":137,\"exited_at\":\"2026-11-29T05:20:01Z\"}";
        assert_eq!(
            parse_exit_event(line),
            Some(ExitEvent {
                container: "kill-0-4".into(),
                exit_status: 137
            })
        );
        // An exit status of 0 is left out of the JSON.
        let zero = "t ns /tasks/exit {\"container_id\":\"x\",\"id\":\"x\",\"pid\":1}";
        assert_eq!(parse_exit_event(zero).unwrap().exit_status, 0);
        let start = "t ns /tasks/start {\"container_id\":\"x\",\"pid\":1}";
        assert_eq!(parse_exit_event(start), None);
    }

    #[test]
    fn cpu_ticks_are_user_plus_system() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(22));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn ctr_arguments_get_the_container_id() {
        let template = ["--rootfs", "/r", "{id}", "/loop.wasm"].map(String::from);
        assert_eq!(
            with_id(&template, "kill-0-3"),
            ["--rootfs", "/r", "kill-0-3", "/loop.wasm"]
        );
    }

    #[test]
    fn goals_are_met_at_the_limit() {
        assert_eq!(verdict(0.5, GOAL_WARM_RATIO), "met");
        assert_eq!(verdict(0.51, GOAL_WARM_RATIO), "missed");
        assert_eq!(verdict(f64::NAN, GOAL_PSS_MIB), "missed");
    }
}

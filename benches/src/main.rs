//! `hyperbox-bench`: side-by-side benchmarks against the engines' defaults. See
//! `benches/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use hyperbox_benches::breakdown;
use hyperbox_benches::engines::{self, Engine, HYPERBOX_V1, RUNC_V2};
use hyperbox_benches::machine::Machine;
use hyperbox_benches::memprobe;
use hyperbox_benches::report::{self, MemReport, MemRow, TimingReport};
use hyperbox_benches::runner::{self, Plan, Variant};
use hyperbox_benches::snapshots;
use hyperbox_benches::stats::Summary;
use hyperbox_benches::task_stats::{self, StatsTarget};
use hyperbox_integration::cli;
use hyperbox_integration::containerd::ContainerdVersion;

#[derive(Parser)]
#[command(about = "Side-by-side benchmarks of HyperBox against the engines' defaults")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time shell commands against each other, round-robin.
    Time(TimeArgs),
    /// Time `ctr run --rm busybox true` per containerd version and runtime, round-robin.
    CtrRun(CtrRunArgs),
    /// Measure the runtime-side memory (PSS, RSS) of K running containers per runtime.
    Mem(MemArgs),
    /// Time a running task's Stats, asked of its shim directly and through containerd.
    Stats(StatsArgs),
    /// Time N `ctr run --rm` started at once, per runtime, round by round.
    Parallel(ParallelArgs),
    /// hyperbox-snapshotter against overlayfs: pull+unpack, `ctr run --rm`, disk, and
    /// one core's chunk+hash throughput.
    Snapshotter(snapshots::SnapshotterArgs),
    /// The wasm shim against runc.v2: warm and cold `ctr run --rm`, memory per container,
    /// time to kill a looping guest.
    Wasm(hyperbox_benches::wasm::WasmArgs),
    /// Templates of HyperBox's shim: time to ready of a Python service and of busybox httpd,
    /// cold through runc.v2 and ours and restored from a template through ours; and
    /// `ctr containers checkpoint`/`restore --live` through ours against runc.v2.
    Templates(hyperbox_benches::templates::TemplatesArgs),
    /// Images of many layers through overlayfs, hyperbox with merged images and hyperbox
    /// without: import+unpack, `ctr run --rm`, and find+stat of the whole root.
    Layers(hyperbox_benches::layers::LayersArgs),
    /// What converting one committed layer to EROFS costs the snapshotter: time and peak
    /// RSS, for the debian layer and sparse files.
    Conversion(hyperbox_benches::conversion::ConversionArgs),
    /// Runtime-side memory of pods through containerd's CRI (crictl), runc.v2 against ours:
    /// P pods of C containers per handler.
    Pods(hyperbox_benches::pods::PodsArgs),
    /// NVIDIA GPUs against a fake driver: the hook's time per container, what GPUs add to
    /// `ctr run --rm` through our shim (against the same without GPUs and runc.v2), NVML
    /// off the start path, and the generator's time.
    Gpu(hyperbox_benches::gpu::GpuArgs),
    /// N idle containers per runtime on one containerd: time to have all running, total
    /// runtime-side memory, `ctr tasks ls` latency, removal, and that nothing is left.
    Density(hyperbox_benches::density::DensityArgs),
}

#[derive(Args)]
struct Output {
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct TimeArgs {
    /// Measured rounds; each runs every variant once.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// `NAME=SHELL COMMAND`, run with `sh -c`; `{n}` in it becomes a unique run number.
    #[arg(long = "variant", value_name = "NAME=COMMAND", required = true)]
    variants: Vec<String>,
    /// The variant the others are compared with (default: the first).
    #[arg(long)]
    baseline: Option<String>,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct CtrRunArgs {
    /// Measured rounds; each runs every variant once.
    #[arg(long, default_value_t = 40)]
    rounds: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// containerd versions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.6,1.7")]
    containerd: Vec<ContainerdVersion>,
    /// Runtimes, comma-separated; io.containerd.runc.v2 is always included.
    #[arg(long, value_delimiter = ',', default_value = RUNC_V2)]
    runtime: Vec<String>,
    /// The variant the others are compared with, as `RUNTIME@VERSION`
    /// (default: io.containerd.runc.v2@1.6, or runc.v2 on the first version given).
    #[arg(long)]
    baseline: Option<String>,
    /// Instead of timing whole runs, show where one run's time goes, step by step: our shims'
    /// timeline marks, runc's calls as a wrapper logs them (which slows runc.v2 a little).
    #[arg(long)]
    breakdown: bool,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct MemArgs {
    /// K: containers per runtime, running at once when measured.
    #[arg(long, default_value_t = 10)]
    containers: usize,
    /// containerd versions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.7")]
    containerd: Vec<ContainerdVersion>,
    /// Runtimes, comma-separated; io.containerd.runc.v2 is always included.
    #[arg(long, value_delimiter = ',', default_value = RUNC_V2)]
    runtime: Vec<String>,
    /// Seconds to wait after the last container started before reading /proc.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct StatsArgs {
    /// Measured rounds; each asks every task once each way.
    #[arg(long, default_value_t = 500)]
    rounds: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// containerd versions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.7")]
    containerd: Vec<ContainerdVersion>,
    /// Runtimes, comma-separated; io.containerd.runc.v2 is always included.
    #[arg(long, value_delimiter = ',', default_value = HYPERBOX_V1)]
    runtime: Vec<String>,
    #[command(flatten)]
    output: Output,
}

#[derive(Args)]
struct ParallelArgs {
    /// Measured rounds; each runs one batch per variant.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Containers per batch, all started at once.
    #[arg(long, default_value_t = 50)]
    containers: usize,
    /// containerd versions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1.7")]
    containerd: Vec<ContainerdVersion>,
    /// Runtimes, comma-separated; io.containerd.runc.v2 is always included.
    #[arg(long, value_delimiter = ',', default_value = HYPERBOX_V1)]
    runtime: Vec<String>,
    #[command(flatten)]
    output: Output,
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit_code("hyperbox-bench", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Time(args) => time(args),
        Cmd::CtrRun(args) => ctr_run(args),
        Cmd::Mem(args) => mem(args),
        Cmd::Stats(args) => stats(args),
        Cmd::Parallel(args) => parallel(args),
        Cmd::Snapshotter(args) => snapshots::run(args, command_line()),
        Cmd::Wasm(args) => hyperbox_benches::wasm::run(args, command_line()),
        Cmd::Templates(args) => hyperbox_benches::templates::run(args, command_line()),
        Cmd::Conversion(args) => hyperbox_benches::conversion::run(args, command_line()),
        Cmd::Layers(args) => hyperbox_benches::layers::run(args, command_line()),
        Cmd::Pods(args) => hyperbox_benches::pods::run(args, command_line()),
        Cmd::Gpu(args) => hyperbox_benches::gpu::run(args, command_line()),
        Cmd::Density(args) => hyperbox_benches::density::run(args, command_line()),
    }
}

/// The command line as typed, the program by name rather than by path.
fn command_line() -> String {
    let mut words: Vec<String> = std::env::args().collect();
    if let Some(first) = words.first_mut() {
        if let Some(name) = PathBuf::from(first.as_str()).file_name() {
            *first = name.to_string_lossy().into_owned();
        }
    }
    report::shell_words(&words)
}

fn dedup_versions(mut versions: Vec<ContainerdVersion>) -> anyhow::Result<Vec<ContainerdVersion>> {
    let mut seen = Vec::new();
    versions.retain(|v| {
        let new = !seen.contains(v);
        seen.push(*v);
        new
    });
    if versions.is_empty() {
        bail!("no containerd version given: use --containerd 1.6,1.7");
    }
    Ok(versions)
}

fn print_timings(report: &TimingReport, json: Option<&PathBuf>) -> anyhow::Result<()> {
    print!("{}", report.render());
    if let Some(path) = json {
        report::write_json(path, report)?;
        tracing::info!(path = %path.display(), "report written");
    }
    Ok(())
}

fn time(args: TimeArgs) -> anyhow::Result<()> {
    let mut machine = Machine::collect(None);
    let mut variants = Vec::new();
    for v in &args.variants {
        let (name, command) = v
            .split_once('=')
            .with_context(|| format!("variant {v:?} is not NAME=COMMAND"))?;
        variants.push(Variant::shell(name.trim(), command));
    }
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline: args.baseline,
    };
    let timings = runner::run(&mut variants, &plan)?;
    machine.finish();
    let report = TimingReport {
        benchmark: "time".into(),
        command_line: command_line(),
        machine,
        timings,
    };
    print_timings(&report, args.output.json.as_ref())
}

fn ctr_run(args: CtrRunArgs) -> anyhow::Result<()> {
    let versions = dedup_versions(args.containerd)?;
    let runtimes = engines::with_default_runtime(&args.runtime);
    if args.breakdown {
        let report = breakdown::run(
            &versions,
            &runtimes,
            args.rounds,
            args.warmup,
            command_line(),
        )?;
        print!("{}", report.render());
        if let Some(path) = &args.output.json {
            report::write_json(path, &report)?;
        }
        return Ok(());
    }
    let mut machine = Machine::collect(None);
    let started = start_engines(&versions, &runtimes, &mut machine)?;
    let mut variants: Vec<Variant<'_>> = started
        .iter()
        .flat_map(|e| runtimes.iter().map(move |rt| e.ctr_run_rm(rt)))
        .collect();
    let baseline = args.baseline.or_else(|| {
        let v = if versions.contains(&ContainerdVersion::V1_6) {
            ContainerdVersion::V1_6
        } else {
            versions[0]
        };
        Some(engines::variant_name(RUNC_V2, v))
    });
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline,
    };
    machine.restart_cpu_sample();
    let timings = runner::run(&mut variants, &plan)?;
    drop(variants);
    machine.finish();
    let report = TimingReport {
        benchmark: "ctr-run".into(),
        command_line: command_line(),
        machine,
        timings,
    };
    print_timings(&report, args.output.json.as_ref())?;
    drop(started);
    Ok(())
}

fn mem(args: MemArgs) -> anyhow::Result<()> {
    let versions = dedup_versions(args.containerd)?;
    let runtimes = engines::with_default_runtime(&args.runtime);
    if args.containers == 0 {
        bail!("--containers must be at least 1");
    }
    if !(args.settle_secs.is_finite() && args.settle_secs >= 0.0) {
        bail!("--settle-secs must be a non-negative number of seconds");
    }
    let mut machine = Machine::collect(None);
    let mut rows = Vec::new();
    for v in versions {
        let engine = Engine::start(v).with_context(|| format!("preparing containerd {v}"))?;
        machine.locate_runc(engine.bed.containerd.path_env());
        for rt in &runtimes {
            engine.check_runtime(rt)?;
        }
        for (ri, rt) in runtimes.iter().enumerate() {
            rows.push(
                measure_runtime(&engine, rt, ri, args.containers, args.settle_secs)
                    .with_context(|| format!("measuring {rt} on containerd {v}"))?,
            );
        }
    }
    // Ratios to runc.v2 on the same containerd, measured in this run.
    let bases: Vec<(String, f64, f64)> = rows
        .iter()
        .filter(|r| r.runtime == RUNC_V2)
        .map(|r| (r.containerd.clone(), r.pss_kib.mean, r.rss_kib.mean))
        .collect();
    for r in &mut rows {
        if let Some((_, pss, rss)) = bases.iter().find(|b| b.0 == r.containerd) {
            r.pss_ratio = r.pss_kib.mean / pss;
            r.rss_ratio = r.rss_kib.mean / rss;
        }
    }
    machine.finish();
    let report = MemReport {
        benchmark: "mem".into(),
        command_line: command_line(),
        machine,
        settle_secs: args.settle_secs,
        rows,
    };
    print!("{}", report.render());
    if let Some(path) = &args.output.json {
        report::write_json(path, &report)?;
        tracing::info!(path = %path.display(), "report written");
    }
    Ok(())
}

/// Starts `k` sleeping containers through `runtime`, probes their runtime side, removes them.
fn measure_runtime(
    engine: &Engine,
    runtime: &str,
    index: usize,
    k: usize,
    settle_secs: f64,
) -> anyhow::Result<MemRow> {
    let ids: Vec<String> = (0..k).map(|i| format!("mem-{index}-{i}")).collect();
    let mut pids = Vec::with_capacity(k);
    for id in &ids {
        pids.push(engine.start_sleeper(runtime, id)?);
    }
    thread::sleep(Duration::from_secs_f64(settle_secs));
    let probes = ids
        .iter()
        .zip(&pids)
        .map(|(id, pid)| memprobe::probe_container(id, *pid))
        .collect::<Result<Vec<_>, _>>()?;
    let outside_sharers = memprobe::outside_sharers(&probes);
    engine.remove(&ids)?;
    let per_container = memprobe::attribute(&probes);
    let pss: Vec<f64> = per_container.iter().map(|m| m.pss_kib).collect();
    let rss: Vec<f64> = per_container.iter().map(|m| m.rss_kib).collect();
    let procs: Vec<f64> = per_container.iter().map(|m| m.processes).collect();
    let summary = |s: &[f64]| Summary::of(s).context("no container was measured");
    let row = MemRow {
        containerd: engine.version.to_string(),
        runtime: runtime.to_string(),
        containers: k,
        processes_per_container: summary(&procs)?.mean,
        pss_kib: summary(&pss)?,
        rss_kib: summary(&rss)?,
        pss_ratio: f64::NAN,
        outside_sharers,
        rss_ratio: f64::NAN,
        per_container,
        probes,
    };
    tracing::info!(
        containerd = %row.containerd,
        runtime,
        pss_mib = row.pss_kib.mean / 1024.0,
        rss_mib = row.rss_kib.mean / 1024.0,
        "measured"
    );
    Ok(row)
}

/// Starts one containerd per version, all at once, and checks that each can run `runtimes`.
fn start_engines(
    versions: &[ContainerdVersion],
    runtimes: &[String],
    machine: &mut Machine,
) -> anyhow::Result<Vec<Engine>> {
    let mut started = Vec::new();
    for v in versions {
        started.push(Engine::start(*v).with_context(|| format!("preparing containerd {v}"))?);
    }
    if let Some(first) = started.first() {
        machine.locate_runc(first.bed.containerd.path_env());
    }
    for e in &started {
        for rt in runtimes {
            e.check_runtime(rt)?;
        }
    }
    Ok(started)
}

/// For each variant, the index of its baseline: the variant of the same group (containerd
/// version, way of asking) whose runtime is runc.v2. `keys` are (group, runtime) per variant.
fn runc_baselines(keys: &[(String, String)]) -> Vec<usize> {
    keys.iter()
        .enumerate()
        .map(|(i, (group, _))| {
            keys.iter()
                .position(|(g, rt)| g == group && rt == RUNC_V2)
                .unwrap_or(i)
        })
        .collect()
}

fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let versions = dedup_versions(args.containerd)?;
    let runtimes = engines::with_default_runtime(&args.runtime);
    let mut machine = Machine::collect(None);
    let started = start_engines(&versions, &runtimes, &mut machine)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;

    // One sleeping container per (containerd, runtime), and connections to it both ways.
    let mut targets: Vec<Vec<StatsTarget>> = Vec::new();
    for e in &started {
        let mut of_engine = Vec::new();
        for (ri, runtime) in runtimes.iter().enumerate() {
            let id = format!("stats-{ri}");
            e.start_sleeper(runtime, &id)?;
            let target = StatsTarget::locate(e, runtime, &id).with_context(|| {
                format!("finding the shim of {runtime} on containerd {}", e.version)
            })?;
            tracing::info!(
                containerd = %e.version,
                runtime,
                address = target.address,
                confirmed_by = ?target.confirmed_by,
                "shim found"
            );
            of_engine.push(target);
        }
        targets.push(of_engine);
    }
    let mut connected = Vec::new();
    for (e, of_engine) in started.iter().zip(&targets) {
        connected.push(
            task_stats::connect(&rt, e, of_engine)
                .with_context(|| format!("asking for stats on containerd {}", e.version))?,
        );
    }

    let mut variants = Vec::new();
    let mut keys = Vec::new();
    for ((e, of_engine), (clients, answers)) in started.iter().zip(&targets).zip(&connected) {
        for (i, (target, answer)) in of_engine.iter().zip(answers).enumerate() {
            let [shim, containerd] = task_stats::variants(&rt, e, clients, i, target, answer);
            variants.push(shim);
            keys.push((format!("{} shim", e.version), target.runtime.clone()));
            variants.push(containerd);
            keys.push((format!("{} containerd", e.version), target.runtime.clone()));
        }
    }
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline: None,
    };
    machine.restart_cpu_sample();
    let mut timings = runner::run(&mut variants, &plan)?;
    drop(variants);
    machine.finish();
    runner::rebase(
        &mut timings,
        &runc_baselines(&keys),
        format!("{RUNC_V2} on the same containerd, asked the same way"),
    );
    let report = TimingReport {
        benchmark: "stats".into(),
        command_line: command_line(),
        machine,
        timings,
    };
    print_timings(&report, args.output.json.as_ref())?;
    drop(connected);
    for (e, of_engine) in started.iter().zip(&targets) {
        let ids: Vec<String> = of_engine.iter().map(|t| t.id.clone()).collect();
        e.remove(&ids)?;
    }
    Ok(())
}

fn parallel(args: ParallelArgs) -> anyhow::Result<()> {
    let versions = dedup_versions(args.containerd)?;
    let runtimes = engines::with_default_runtime(&args.runtime);
    if args.containers == 0 {
        bail!("--containers must be at least 1");
    }
    let mut machine = Machine::collect(None);
    let started = start_engines(&versions, &runtimes, &mut machine)?;
    let mut variants = Vec::new();
    let mut keys = Vec::new();
    for e in &started {
        for runtime in &runtimes {
            variants.push(e.ctr_run_batch(runtime, args.containers));
            keys.push((e.version.to_string(), runtime.clone()));
        }
    }
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline: None,
    };
    machine.restart_cpu_sample();
    let mut timings = runner::run(&mut variants, &plan)?;
    drop(variants);
    machine.finish();
    runner::rebase(
        &mut timings,
        &runc_baselines(&keys),
        format!("{RUNC_V2} on the same containerd"),
    );
    let report = TimingReport {
        benchmark: "parallel".into(),
        command_line: command_line(),
        machine,
        timings,
    };
    print_timings(&report, args.output.json.as_ref())?;
    print!("{}", report.render_samples());
    drop(started);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_is_compared_with_runc_of_its_own_group() {
        let key = |g: &str, rt: &str| (g.to_string(), rt.to_string());
        let keys = [
            key("1.6 shim", RUNC_V2),
            key("1.6 shim", HYPERBOX_V1),
            key("1.7 shim", HYPERBOX_V1),
            key("1.7 shim", RUNC_V2),
            key("1.7 containerd", HYPERBOX_V1),
        ];
        // A group without runc is its own baseline (ratio 1), not another group's.
        assert_eq!(runc_baselines(&keys), [0, 0, 3, 3, 4]);
    }
}

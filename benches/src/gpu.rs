//! `hyperbox-bench gpu`: what giving a container NVIDIA GPUs costs, against the harness's
//! fake driver (`hyperbox_integration::gpu::FakeDriver`: real library files and loader
//! cache, real device nodes, a fake `/proc`, a fake `libnvidia-ml.so.1` that logs every
//! `nvmlInit`), on one private containerd, in one run:
//!
//! - **hook**: `hyperbox-gpu-hook` run directly as a runtime runs a `createContainer` hook
//!   (the OCI state on a pipe to its stdin, a bundle whose `config.json` asks for
//!   `NVIDIA_VISIBLE_DEVICES=0` with the default capabilities, a fresh small rootfs per run),
//!   timed from spawning it until it exited. The runs happen in a private mount namespace of
//!   one thread of the benchmark (made once, before the first run, as a runtime's container
//!   namespace exists before its hooks run), on a tmpfs mounted there (or, with
//!   `--hook-rootfs disk`, in the sandbox's directory); each run's rootfs is a mount point
//!   (bound onto itself), detached with everything the hook mounted under it after the run.
//! - **start**: `ctr run --rm` of the debian test image running `true` through our shim
//!   with `NVIDIA_VISIBLE_DEVICES=0` and with `NVIDIA_VISIBLE_DEVICES=void`, and through
//!   runc.v2 without GPUs, rotated round-robin; what GPUs add is the difference of our two
//!   medians, against the goal of under 10 ms per container.
//! - **NVML**: the fake NVML's count of inits before the hook runs and container starts and
//!   after them: it must not change (NVML is for the generator alone); the benchmark fails
//!   after its report if it did.
//! - **generator**: `hyperbox-gpu-cdi generate` for the fake two-GPU driver (one GPU in MIG
//!   mode with two MIG devices), which must raise the NVML count by one per run (so the log
//!   is known to count).

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::gpu::{FakeDriver, FakeDriverSpec};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::testbed::TestBed;
use serde::Serialize;

use crate::engines::{Engine, HYPERBOX_V1, RUNC_V2};
use crate::machine::Machine;
use crate::report;
use crate::runner::{self, describe, run_command, Plan, Timings, Variant, VariantTimes};
use crate::stats::Summary;

/// The goal: GPUs add under this many milliseconds to a container's start.
pub const GOAL_ADDED_MS: f64 = 10.0;
/// The generator's binary.
pub use hyperbox_integration::gpu::GENERATOR;
/// The hook's binary, beside the shim's.
pub use hyperbox_integration::gpu::HOOK;

/// Variant names of the start part.
const GPU: &str = "ours, NVIDIA_VISIBLE_DEVICES=0";
const VOID: &str = "ours, NVIDIA_VISIBLE_DEVICES=void";
const RUNC: &str = "runc.v2, no GPU";

#[derive(Debug, Args)]
pub struct GpuArgs {
    /// Measured runs of the hook binary on its own.
    #[arg(long, default_value_t = 200)]
    hook_runs: usize,
    /// Measured `ctr run --rm` rounds; each runs every variant once.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Unrecorded rounds first (and unrecorded hook runs, and one unrecorded generator run).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Measured runs of `hyperbox-gpu-cdi generate`.
    #[arg(long, default_value_t = 20)]
    generator_runs: usize,
    /// Where the hook runs' bundles and rootfs live: a tmpfs mounted in the runs' private
    /// mount namespace, or the sandbox's own filesystem (on an ext4 without a journal,
    /// creating files right after deleting many costs a scan of the recently deleted inodes).
    #[arg(long, value_enum, default_value_t = HookRootfs::Tmpfs)]
    hook_rootfs: HookRootfs,
    /// The containerd version.
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Where the hook runs' rootfs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookRootfs {
    /// A tmpfs mounted in the runs' private mount namespace.
    Tmpfs,
    /// The sandbox's directory, on the host's filesystem.
    Disk,
}

impl HookRootfs {
    fn describe(self) -> &'static str {
        match self {
            HookRootfs::Tmpfs => "rootfs on a tmpfs",
            HookRootfs::Disk => "rootfs on the sandbox's filesystem",
        }
    }
}

/// The hook part: the runs' times and what one run injected.
#[derive(Debug, Clone, Serialize)]
pub struct HookPart {
    /// Spawn to exit, ms.
    pub timings: Timings,
    pub rootfs_on: HookRootfs,
    /// Device nodes the hook left in each run's rootfs.
    pub nodes_per_run: usize,
    /// Mounts the hook made under each run's rootfs (read-only binds of driver files).
    pub mounts_per_run: usize,
    /// Size of the image's loader cache each rootfs starts with (a copy of the host's
    /// `/etc/ld.so.cache`, merged by the hook with the driver's entries), 0 when none.
    pub image_ld_cache_bytes: u64,
}

/// The fake NVML's count of `nvmlInit`s at each point.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NvmlInits {
    /// After the set-up's generator run, before any hook run or container start.
    pub before_starts: usize,
    /// After every hook run and container start: must equal `before_starts`.
    pub after_starts: usize,
    /// After the timed generator runs.
    pub after_generator: usize,
    /// What `after_generator` should be: one init per generator run, warm-up included.
    pub expected_after_generator: usize,
}

/// The goal beside what was measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Goals {
    /// median(ours GPU) − median(ours void), ms.
    pub added_ms: f64,
    /// p95(ours GPU) − p95(ours void), ms.
    pub added_p95_ms: f64,
    /// The median over rounds of ours GPU − ours void within the round (the two ran next to
    /// each other), ms: less moved by a machine that gets busier or quieter.
    pub added_paired_ms: f64,
    pub goal_added_ms: f64,
    /// median(ours GPU) / median(runc.v2).
    pub gpu_to_runc: f64,
    /// median(ours void) / median(runc.v2).
    pub void_to_runc: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub containerd: String,
    /// The fake driver, in words.
    pub driver: String,
    pub hook: HookPart,
    pub start: Timings,
    pub nvml: NvmlInits,
    pub generator: Timings,
    pub goals: Goals,
}

/// `met` when `added` is under `limit` ms, else `missed`.
pub fn verdict(added: f64, limit: f64) -> &'static str {
    if added < limit {
        "met"
    } else {
        "missed"
    }
}

/// A table of `t`, with the ratio column headed `ratio` when given.
fn render_table(t: &Timings, ratio: Option<&str>) -> String {
    let width = t
        .variants
        .iter()
        .map(|v| v.name.len())
        .max()
        .unwrap_or(0)
        .max(7);
    let mut s = format!(
        "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
        "variant", "runs", "median", "p95", "mean", "min", "max"
    );
    if let Some(r) = ratio {
        s.push_str(&format!("  {r:>8}"));
    }
    s.push('\n');
    let digits = report::decimals_for(t.variants.iter().map(|v| v.summary.median));
    for v in &t.variants {
        let m = &v.summary;
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  {:>8.digits$}  \
             {:>8.digits$}",
            v.name, m.runs, m.median, m.p95, m.mean, m.min, m.max
        ));
        if ratio.is_some() {
            s.push_str(&format!("  {:>8.3}", v.ratio_to_baseline));
        }
        s.push('\n');
    }
    s
}

impl GpuReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!("driver: {}\n\n", self.driver));

        let h = &self.hook;
        s.push_str(&format!(
            "{HOOK} run directly, as a createContainer hook ({} runs after {} warm-up; \
             NVIDIA_VISIBLE_DEVICES=0, default capabilities: {} device nodes, {} read-only \
             mounts, loader cache merged with the image's {} bytes; {}, in a private mount \
             namespace; ms from spawn to exit)\n",
            h.timings.rounds,
            h.timings.warmup,
            h.nodes_per_run,
            h.mounts_per_run,
            h.image_ld_cache_bytes,
            h.rootfs_on.describe()
        ));
        s.push_str(&render_table(&h.timings, None));

        let t = &self.start;
        s.push_str(&format!(
            "\nctr run --rm debian true on containerd {} ({} rounds after {} warm-up, rotated; \
             ms; ratio of medians to {})\n",
            self.containerd, t.rounds, t.warmup, t.baseline
        ));
        s.push_str(&render_table(t, Some("×runc")));
        let g = &self.goals;
        s.push_str(&format!(
            "added by GPUs: median(GPU) − median(void) = {:.2} ms (p95: {:.2} ms; median of \
             the rounds' GPU − void: {:.2} ms); goal under {} ms per container: {}\n",
            g.added_ms,
            g.added_p95_ms,
            g.added_paired_ms,
            g.goal_added_ms,
            verdict(g.added_ms, g.goal_added_ms)
        ));
        s.push_str(&format!(
            "ours with GPU 0 / runc.v2 without GPUs: {:.3} (ours void / runc.v2: {:.3})\n",
            g.gpu_to_runc, g.void_to_runc
        ));

        let n = &self.nvml;
        s.push_str(&format!(
            "\nNVML inits (the fake NVML's log): {} before the hook runs and container starts, \
             {} after them ({}); {} after {} generator runs (expected {}{})\n",
            n.before_starts,
            n.after_starts,
            if n.before_starts == n.after_starts {
                "unchanged: NVML is off the start path"
            } else {
                "CHANGED: NVML was loaded on a start path"
            },
            n.after_generator,
            self.generator.rounds + self.generator.warmup,
            n.expected_after_generator,
            if n.after_generator == n.expected_after_generator {
                ""
            } else {
                ": MISMATCH"
            }
        ));

        let t = &self.generator;
        s.push_str(&format!(
            "\n{GENERATOR} generate for the fake driver ({} runs after {} warm-up; ms from \
             spawn to exit)\n",
            t.rounds, t.warmup
        ));
        s.push_str(&render_table(t, None));
        s
    }
}

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    host::workspace_binary(name).with_context(|| {
        let dir = host::workspace_bin_dir()
            .map_or_else(|| "target/<profile>".into(), |d| d.display().to_string());
        format!(
            "{name} is not built in {dir}: `cargo build --workspace --bins` and \
             `scripts/build-gpu-hook {dir}` (or set HYPERBOX_BIN_DIR)"
        )
    })
}

/// The fake NVML's initialisations so far.
fn nvml_inits(driver: &FakeDriver) -> usize {
    driver.nvml_inits().len()
}

fn describe_driver(spec: &FakeDriverSpec) -> String {
    let gpus: Vec<String> = spec
        .gpus
        .iter()
        .map(|g| match &g.mig {
            Some(m) => format!("{} (MIG mode, {} MIG devices)", g.name, m.len()),
            None => g.name.clone(),
        })
        .collect();
    format!(
        "the harness's fake driver {} (no real GPU): {}",
        spec.version,
        gpus.join(", ")
    )
}

fn cstring(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL byte", path.display()))
}

/// Gives the calling thread a mount namespace of its own, with every mount private, so
/// that what is mounted from it (and by the processes it spawns) stays there and goes when
/// the thread ends.
fn private_mount_namespace() -> anyhow::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNS (with CLONE_FS, which it implies)
    // concerns the calling thread alone and is allowed in a threaded process.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNS)");
    }
    let root = cstring(Path::new("/"))?;
    // SAFETY: a valid NUL-terminated target; null source, type and data are allowed for a
    // propagation change.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("making / rprivate");
    }
    Ok(())
}

fn bind_onto_itself(dir: &Path) -> anyhow::Result<()> {
    let c = cstring(dir)?;
    // SAFETY: valid NUL-terminated source and target; null type and data for a bind.
    let r = unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding {} onto itself", dir.display()));
    }
    Ok(())
}

/// Mounts a fresh tmpfs at `dir`.
fn mount_tmpfs(dir: &Path) -> anyhow::Result<()> {
    let target = cstring(dir)?;
    let fstype = cstring(Path::new("tmpfs"))?;
    let data = cstring(Path::new("mode=0755"))?;
    // SAFETY: valid NUL-terminated source, target, type and data.
    let r = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("mounting a tmpfs at {}", dir.display()));
    }
    Ok(())
}

/// Detaches the mount at `dir` and every mount under it.
fn detach(dir: &Path) -> anyhow::Result<()> {
    let c = cstring(dir)?;
    // SAFETY: a valid NUL-terminated target.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("detaching {}", dir.display()));
    }
    Ok(())
}

/// Mount points strictly under `dir` in the calling thread's mount namespace
/// (`/proc/thread-self/mountinfo`: `/proc/self` would be the main thread's).
fn mounts_below(dir: &Path) -> usize {
    let info = fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    count_mounts_below(&info, dir)
}

/// Mount points (mountinfo's fifth field) strictly under `dir`; `dir` without characters
/// that mountinfo escapes.
pub fn count_mounts_below(mountinfo: &str, dir: &Path) -> usize {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir) && Path::new(m) != dir)
        .count()
}

/// Character devices at or under `dir`.
fn char_devices(dir: &Path) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_char_device() => 1,
            Ok(t) if t.is_dir() => char_devices(&e.path()),
            _ => 0,
        })
        .sum()
}

/// What one hook run found and left.
struct HookRun {
    ms: f64,
    nodes: usize,
    mounts: usize,
}

/// A fresh bundle in `dir`: `config.json` asking for GPU 0 and a small rootfs (`etc/` with
/// `image_ld_cache`'s bytes as its loader cache, `dev/`), the rootfs a mount point.
fn prepare_bundle(dir: &Path, image_ld_cache: &[u8]) -> anyhow::Result<PathBuf> {
    let bundle = dir.join("bundle");
    let rootfs = bundle.join("rootfs");
    for d in ["etc", "dev", "tmp"] {
        let p = rootfs.join(d);
        fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
    }
    if !image_ld_cache.is_empty() {
        fs::write(rootfs.join("etc/ld.so.cache"), image_ld_cache)?;
    }
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "root": {"path": "rootfs"},
        "process": {
            "args": ["true"],
            "cwd": "/",
            "env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "NVIDIA_VISIBLE_DEVICES=0",
            ],
        },
    });
    fs::write(bundle.join("config.json"), config.to_string())?;
    bind_onto_itself(&rootfs)?;
    Ok(bundle)
}

/// One run: a fresh bundle under `dir`, the hook timed from spawn to exit with the state on
/// its stdin, what it left checked and counted, its mounts detached and the bundle removed.
fn hook_once(
    hook: &Path,
    cache: &Path,
    dir: &Path,
    id: &str,
    image_ld_cache: &[u8],
) -> anyhow::Result<HookRun> {
    let bundle = prepare_bundle(dir, image_ld_cache)?;
    let rootfs = bundle.join("rootfs");
    let state = serde_json::json!({
        "ociVersion": "1.1.0",
        "id": id,
        "status": "creating",
        "pid": std::process::id(),
        "bundle": bundle,
    })
    .to_string();
    let mut cmd = Command::new(hook);
    cmd.arg("--cache")
        .arg(cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", hook.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(state.as_bytes())
            .context("writing the state to the hook")?;
    }
    let out = child.wait_with_output().context("waiting for the hook")?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let result = if out.status.success() {
        let run = HookRun {
            ms,
            nodes: char_devices(&rootfs.join("dev")),
            mounts: mounts_below(&rootfs),
        };
        if run.nodes == 0 || run.mounts == 0 {
            Err(anyhow!(
                "the hook exited 0 but left {} device nodes and {} mounts in {}",
                run.nodes,
                run.mounts,
                rootfs.display()
            ))
        } else {
            Ok(run)
        }
    } else {
        Err(anyhow!(
            "`{}` failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    detach(&rootfs)?;
    let left = mounts_below(dir);
    if left != 0 {
        bail!("{left} mounts left under {} after detaching", dir.display());
    }
    fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    result
}

/// The hook part, on a thread of its own in a private mount namespace.
fn hook_part(
    hook: &Path,
    cache: &Path,
    dir: &Path,
    runs: usize,
    warmup: usize,
    rootfs_on: HookRootfs,
) -> anyhow::Result<HookPart> {
    // What a Debian image brings: the host's loader cache stands in for it.
    let image_ld_cache = fs::read("/etc/ld.so.cache").unwrap_or_default();
    let samples = thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<Vec<HookRun>> {
            private_mount_namespace()?;
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            if rootfs_on == HookRootfs::Tmpfs {
                // Gone with the namespace, when this thread ends.
                mount_tmpfs(dir)?;
            }
            let mut samples = Vec::with_capacity(runs);
            for n in 0..warmup + runs {
                let run = hook_once(
                    hook,
                    cache,
                    &dir.join(format!("run-{n}")),
                    &format!("hook-{n}"),
                    &image_ld_cache,
                )
                .with_context(|| format!("hook run {}", n + 1))?;
                if n >= warmup {
                    samples.push(run);
                }
                if (n + 1) % 50 == 0 || n + 1 == warmup + runs {
                    tracing::info!("hook run {}/{} done", n + 1, warmup + runs);
                }
            }
            Ok(samples)
        })
        .join()
        .map_err(|_| anyhow!("the hook runs' thread panicked"))?
    })?;
    let first = samples.first().context("no hook run was measured")?;
    let (nodes, mounts) = (first.nodes, first.mounts);
    if let Some(odd) = samples
        .iter()
        .find(|r| r.nodes != nodes || r.mounts != mounts)
    {
        bail!(
            "the hook's runs differ: {nodes} nodes and {mounts} mounts, then {} and {}",
            odd.nodes,
            odd.mounts
        );
    }
    let times = vec![VariantTimes {
        name: "hyperbox-gpu-hook".into(),
        command: format!(
            "{} --cache {} < STATE (bundle: NVIDIA_VISIBLE_DEVICES=0, fresh rootfs)",
            hook.display(),
            cache.display()
        ),
        samples_ms: samples.iter().map(|r| r.ms).collect(),
    }];
    Ok(HookPart {
        timings: Timings {
            rounds: runs,
            warmup,
            baseline: "hyperbox-gpu-hook".into(),
            variants: runner::summarize(times, 0),
        },
        rootfs_on,
        nodes_per_run: nodes,
        mounts_per_run: mounts,
        image_ld_cache_bytes: image_ld_cache.len() as u64,
    })
}

/// `ctr run --rm --fifo-dir F --runtime RUNTIME [--env ENV] IMAGE ID ARGS`.
fn ctr_run(engine: &Engine, runtime: &str, env: Option<&str>, id: &str, args: &[&str]) -> Command {
    let c = &engine.bed.containerd;
    let mut cmd = c.ctr();
    cmd.args(["run", "--rm", "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args(["--runtime", runtime]);
    if let Some(e) = env {
        cmd.args(["--env", e]);
    }
    cmd.args([engine.image.as_str(), id]).args(args);
    cmd
}

/// The start part: each variant checked once, then timed round-robin.
fn start_part(engine: &Engine, plan: &Plan) -> anyhow::Result<Timings> {
    let gpu_env = "NVIDIA_VISIBLE_DEVICES=0";
    let void_env = "NVIDIA_VISIBLE_DEVICES=void";
    // GPU 0's node and a driver library inside; nothing of the kind without GPUs.
    let injected = "test -c /dev/nvidia0 && test -f /usr/lib/x86_64-linux-gnu/libcuda.so.1";
    let absent = "! test -e /dev/nvidia0 && ! test -e /usr/lib/x86_64-linux-gnu/libcuda.so.1";
    for (runtime, env, id, script) in [
        (HYPERBOX_V1, Some(gpu_env), "gpu-check", injected),
        (HYPERBOX_V1, Some(void_env), "void-check", absent),
        (RUNC_V2, None, "runc-check", absent),
    ] {
        let mut cmd = ctr_run(engine, runtime, env, id, &["sh", "-c", script]);
        let shown = describe(&cmd);
        run_command(&mut cmd, &shown).with_context(|| {
            format!("checking {runtime} with {env:?} before timing: `{script}` failed")
        })?;
    }
    let image = &engine.image;
    let mut variants = vec![
        Variant::command(
            GPU,
            format!("ctr run --rm --runtime {HYPERBOX_V1} --env {gpu_env} {image} gpu-{{n}} true"),
            |n| {
                ctr_run(
                    engine,
                    HYPERBOX_V1,
                    Some(gpu_env),
                    &format!("gpu-{n}"),
                    &["true"],
                )
            },
        ),
        Variant::command(
            VOID,
            format!(
                "ctr run --rm --runtime {HYPERBOX_V1} --env {void_env} {image} void-{{n}} true"
            ),
            |n| {
                ctr_run(
                    engine,
                    HYPERBOX_V1,
                    Some(void_env),
                    &format!("void-{n}"),
                    &["true"],
                )
            },
        ),
        Variant::command(
            RUNC,
            format!("ctr run --rm --runtime {RUNC_V2} {image} runc-{{n}} true"),
            |n| ctr_run(engine, RUNC_V2, None, &format!("runc-{n}"), &["true"]),
        ),
    ];
    let plan = Plan {
        baseline: Some(RUNC.into()),
        ..plan.clone()
    };
    Ok(runner::run(&mut variants, &plan)?)
}

fn samples_of<'a>(t: &'a Timings, name: &str) -> &'a [f64] {
    t.variants
        .iter()
        .find(|v| v.name == name)
        .map_or(&[], |v| v.samples_ms.as_slice())
}

fn median_of(t: &Timings, name: &str) -> Option<(f64, f64)> {
    t.variants
        .iter()
        .find(|v| v.name == name)
        .map(|v| (v.summary.median, v.summary.p95))
}

/// The goal from the start part's medians.
pub fn goals(start: &Timings) -> Goals {
    let nan = (f64::NAN, f64::NAN);
    let (gpu, gpu95) = median_of(start, GPU).unwrap_or(nan);
    let (void, void95) = median_of(start, VOID).unwrap_or(nan);
    let (runc, _) = median_of(start, RUNC).unwrap_or(nan);
    let paired: Vec<f64> = samples_of(start, GPU)
        .iter()
        .zip(samples_of(start, VOID))
        .map(|(g, v)| g - v)
        .collect();
    Goals {
        added_ms: gpu - void,
        added_p95_ms: gpu95 - void95,
        added_paired_ms: Summary::of(&paired).map_or(f64::NAN, |s| s.median),
        goal_added_ms: GOAL_ADDED_MS,
        gpu_to_runc: gpu / runc,
        void_to_runc: void / runc,
    }
}

pub fn run(args: GpuArgs, command_line: String) -> anyhow::Result<()> {
    if args.hook_runs == 0 || args.rounds == 0 || args.generator_runs == 0 {
        bail!("--hook-runs, --rounds and --generator-runs must be at least 1");
    }
    let hook = binary(HOOK)?;
    let generator = binary(GENERATOR)?;
    let nvml = FakeDriver::fake_nvml_path().context(
        "the fake NVML (libhyperbox_fake_nvml.so) is not built: cargo build --workspace",
    )?;
    let mut machine = Machine::collect(None);
    let v = args.containerd;
    let bed = TestBed::start(v).with_context(|| format!("preparing containerd {v}"))?;
    let image = bed
        .image(TestImage::Debian)
        .context("pulling the debian test image")?;
    let engine = Engine {
        version: v,
        bed,
        image,
    };
    engine.check_runtime(HYPERBOX_V1)?;
    let c = &engine.bed.containerd;
    machine.locate_runc(c.path_env());

    // The node: the fake driver, and the cache our shim reads, written by the generator.
    let dir = c.dir().join("gpu-bench");
    let spec = FakeDriverSpec::two_gpus_one_mig();
    let driver =
        FakeDriver::build(&dir.join("driver"), &spec, &nvml).context("building the fake driver")?;
    let cache = c.gpu_cache();
    let bin_dir = generator
        .parent()
        .context("the generator's directory")?
        .to_path_buf();
    let mut cmd = driver.generator_command(
        &bin_dir,
        "generate",
        &dir.join("cdi/hyperbox-nvidia.json"),
        &cache,
    );
    let shown = describe(&cmd);
    run_command(&mut cmd, &shown).context("generating the node's GPU cache")?;
    let before_starts = nvml_inits(&driver);
    tracing::info!(driver = %driver.dir.display(), cache = %cache.display(), before_starts, "GPU node ready");

    machine.restart_cpu_sample();
    let hook_part = hook_part(
        &hook,
        &cache,
        &dir.join("hook-runs"),
        args.hook_runs,
        args.warmup,
        args.hook_rootfs,
    )?;
    let plan = Plan {
        rounds: args.rounds,
        warmup: args.warmup,
        baseline: None,
    };
    let start = start_part(&engine, &plan)?;
    let after_starts = nvml_inits(&driver);

    // The generator, writing elsewhere than the cache the shim reads.
    let gen_dir = dir.join("generated");
    let mut variants = vec![Variant::command(
        "hyperbox-gpu-cdi generate",
        format!(
            "{} generate --driver-root R --proc-root P --dev-root D --output SPEC --cache \
             CACHE --hook-path HOOK",
            generator.display()
        ),
        |_| {
            driver.generator_command(
                &bin_dir,
                "generate",
                &gen_dir.join("spec.json"),
                &gen_dir.join("cache.json"),
            )
        },
    )];
    let gen_plan = Plan {
        rounds: args.generator_runs,
        warmup: 1,
        baseline: None,
    };
    let generator_timings = runner::run(&mut variants, &gen_plan)?;
    drop(variants);
    let after_generator = nvml_inits(&driver);
    machine.finish();

    let goals = goals(&start);
    let report = GpuReport {
        benchmark: "gpu".into(),
        command_line,
        machine,
        containerd: v.to_string(),
        driver: describe_driver(&spec),
        hook: hook_part,
        start,
        nvml: NvmlInits {
            before_starts,
            after_starts,
            after_generator,
            expected_after_generator: after_starts + gen_plan.rounds + gen_plan.warmup,
        },
        generator: generator_timings,
        goals,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
        tracing::info!(path = %path.display(), "report written");
    }
    let n = report.nvml;
    if n.after_starts != n.before_starts {
        bail!(
            "NVML was initialised on a start path: {} inits before the hook runs and container \
             starts, {} after",
            n.before_starts,
            n.after_starts
        );
    }
    if n.after_generator != n.expected_after_generator {
        bail!(
            "the fake NVML's log did not count the generator's inits: {} expected, {} seen",
            n.expected_after_generator,
            n.after_generator
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_strictly_below_a_directory_are_counted() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/vda rw\n\
90 22 8:1 /x /b/rootfs rw - ext4 /dev/vda rw\n\
91 90 8:1 /l /b/rootfs/usr/lib/libcuda.so.550 ro - ext4 /dev/vda rw\n\
92 90 8:1 /s /b/rootfs/usr/bin/nvidia-smi ro - ext4 /dev/vda rw\n\
93 22 8:1 /o /b/rootfs2/usr ro - ext4 /dev/vda rw\n";
        assert_eq!(count_mounts_below(info, Path::new("/b/rootfs")), 2);
        assert_eq!(count_mounts_below(info, Path::new("/b")), 4);
        assert_eq!(count_mounts_below(info, Path::new("/c")), 0);
    }

    #[test]
    fn added_is_the_difference_of_our_medians() {
        let t = |name: &str, ms: [f64; 3]| VariantTimes {
            name: name.into(),
            command: String::new(),
            samples_ms: ms.to_vec(),
        };
        let times = vec![
            t(GPU, [90.0, 95.0, 100.0]),
            t(VOID, [88.0, 91.0, 93.0]),
            t(RUNC, [140.0, 190.0, 200.0]),
        ];
        let start = Timings {
            rounds: 3,
            warmup: 0,
            baseline: RUNC.into(),
            variants: runner::summarize(times, 2),
        };
        let g = goals(&start);
        assert_eq!(g.added_ms, 4.0);
        assert_eq!(g.added_p95_ms, 7.0);
        // Rounds: 2, 4, 7.
        assert_eq!(g.added_paired_ms, 4.0);
        assert_eq!(g.gpu_to_runc, 0.5);
        assert_eq!(verdict(g.added_ms, GOAL_ADDED_MS), "met");
        assert_eq!(verdict(10.0, GOAL_ADDED_MS), "missed");
        assert_eq!(verdict(f64::NAN, GOAL_ADDED_MS), "missed");
    }
}

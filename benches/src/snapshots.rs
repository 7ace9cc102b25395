//! `hyperbox-bench snapshotter`: `hyperbox-snapshotter` against containerd's own overlayfs
//! snapshotter, in the same containerd, on the same images, interleaved.
//!
//! - **pull**: `ctr images pull --snapshotter S` of each image from the loopback registry,
//!   every image and its content removed (`ctr images rm --sync`, which also removes the
//!   snapshots) before each pull, so every pull downloads and unpacks every layer. For
//!   hyperbox the time until every layer of the image is served from its EROFS image
//!   (conversion runs after Commit) is reported too; the next pull starts only after it.
//! - **run**: `ctr run --rm --snapshotter S IMAGE id true`, the images pulled through both.
//! - **disk**: bytes under each snapshotter's root (`du -B1 -x`) with every image pulled
//!   through both and every hyperbox layer converted.
//! - **chunk+hash**: one core's throughput of SHA-256 over 64 KiB chunks in memory, and of
//!   the whole layer commit (chunk, hash, pack write, EROFS image) of a tree of random data.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_erofs::{commit_layer, ChunkStore, ImageOptions, StoreConfig};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::{self, TestImage};
use hyperbox_integration::sandbox::Sandbox;
use hyperbox_integration::snapshotter::{SnapshotterDaemon, PLUGIN};
use hyperbox_integration::testbed::TestBed;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::machine::Machine;
use crate::report;
use crate::runner::{self, describe, run_command, Plan, Timings, Variant, VariantTimes};
use crate::stats::{rotation, Summary};

/// containerd's default snapshotter, the baseline.
pub const OVERLAYFS: &str = "overlayfs";

#[derive(Debug, Args)]
pub struct SnapshotterArgs {
    /// Measured pull rounds; each pulls every image through each snapshotter once.
    #[arg(long, default_value_t = 8)]
    pull_rounds: usize,
    /// Measured `ctr run --rm` rounds.
    #[arg(long, default_value_t = 30)]
    run_rounds: usize,
    /// Unrecorded `ctr run --rm` rounds first (the first pull of each round is not special:
    /// every pull starts from nothing).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The containerd version.
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
    /// Test images, comma-separated: busybox, debian, debian-python.
    #[arg(long, value_delimiter = ',', default_value = "busybox,debian-python")]
    images: Vec<String>,
    /// containerd 2.x: also containerd's own EROFS snapshotter (`erofs`, its EROFS differ
    /// running erofs-utils 1.8's `mkfs.erofs --tar=f`), in the same runs.
    #[arg(long)]
    peer_erofs: bool,
    /// Time to start this many containers of each image at once (`ctr run -d`, all
    /// running), per snapshotter; 0 skips it.
    #[arg(long, default_value_t = 0)]
    parallel: usize,
    /// MiB of random data committed as one layer for the chunk+hash figure.
    #[arg(long, default_value_t = 512)]
    commit_mib: u64,
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Disk under each snapshotter's root.
#[derive(Debug, Clone, Serialize)]
pub struct DiskRow {
    pub snapshotter: String,
    pub bytes: u64,
    pub ratio_to_overlayfs: f64,
}

/// One core's chunking and hashing.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// SHA-256 of 64 KiB chunks in memory, GiB/s.
    pub sha256_gib_s: f64,
    /// `commit_layer` of `commit_mib` MiB of random files (already in the page cache) into
    /// a fresh chunk store, GiB/s of file data.
    pub commit_gib_s: f64,
    pub commit_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotterReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub images: Vec<String>,
    /// Pull+unpack, ms; ratios to overlayfs for the same image.
    pub pull: Timings,
    /// hyperbox: from the start of the pull until every layer is an EROFS image, ms.
    pub converted: Vec<VariantTimes>,
    /// `ctr run --rm ... true`, ms; ratios to overlayfs for the same image.
    pub run: Timings,
    /// N containers of one image started at once, until all run, ms.
    pub parallel: Vec<VariantTimes>,
    pub disk: Vec<DiskRow>,
    /// With `--peer-erofs`: how containerd's EROFS snapshotter got its layers.
    pub peer_path: Option<String>,
    /// How hyperbox got its layers: its differ, or containerd's walking differ and a
    /// conversion after Commit.
    pub hyperbox_path: String,
    pub throughput: Throughput,
}

impl SnapshotterReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!(
            "\npull+unpack ({} rounds, snapshotters alternated, everything removed before each pull; \
             ms; ratio to overlayfs for the same image)\n",
            self.pull.rounds
        ));
        s.push_str(&render_timings(&self.pull));
        s.push_str("\nhyperbox, pull start until every layer is EROFS (ms)\n");
        s.push_str(&render_medians(&self.converted));
        s.push_str(&format!(
            "\nctr run --rm IMAGE true ({} rounds after {} warm-up, rotated; ms; ratio to \
             overlayfs for the same image)\n",
            self.run.rounds, self.run.warmup
        ));
        s.push_str(&render_timings(&self.run));
        if !self.parallel.is_empty() {
            s.push_str("\ncontainers of one image started at once, until every `ctr run -d` returned (ms)\n");
            for v in &self.parallel {
                if let Some(m) = Summary::of(&v.samples_ms) {
                    s.push_str(&format!(
                        "{:<36}  {:>4}  median {:>8.1}  min {:>8.1}  max {:>8.1}\n",
                        v.name, m.runs, m.median, m.min, m.max
                    ));
                }
            }
        }
        s.push_str(&format!(
            "\ndisk under each root, images {} pulled through each\n",
            self.images.join(", ")
        ));
        for d in &self.disk {
            s.push_str(&format!(
                "{:<10}  {:>12} B  {:>6.3}\n",
                d.snapshotter, d.bytes, d.ratio_to_overlayfs
            ));
        }
        if let Some(p) = &self.peer_path {
            s.push_str(&format!("\ncontainerd's erofs snapshotter: {p}\n"));
        }
        s.push_str(&format!("hyperbox: {}\n", self.hyperbox_path));
        let t = &self.throughput;
        s.push_str(&format!(
            "\none core: sha256 of 64 KiB chunks {:.2} GiB/s; commit_layer of {} MiB random \
             files {:.2} GiB/s\n",
            t.sha256_gib_s, t.commit_mib, t.commit_gib_s
        ));
        s
    }
}

/// One line per variant: runs, median and p95 of its samples (ms).
pub fn render_medians(times: &[VariantTimes]) -> String {
    let mut s = String::new();
    for c in times {
        if let Some(m) = Summary::of(&c.samples_ms) {
            s.push_str(&format!(
                "{:<28}  {:>4}  median {:>8.1}  p95 {:>8.1}\n",
                c.name, m.runs, m.median, m.p95
            ));
        }
    }
    s
}

/// A table of timings: one line per variant, its ratio last.
pub fn render_timings(t: &Timings) -> String {
    let width = t.variants.iter().map(|v| v.name.len()).max().unwrap_or(0);
    let mut s = format!(
        "{:<width$}  {:>4}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>7}\n",
        "variant", "runs", "median", "p95", "mean", "min", "max", "ratio"
    );
    for v in &t.variants {
        let m = &v.summary;
        s.push_str(&format!(
            "{:<width$}  {:>4}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>7.3}\n",
            v.name, m.runs, m.median, m.p95, m.mean, m.min, m.max, v.ratio_to_baseline
        ));
    }
    s
}

fn parse_image(name: &str) -> anyhow::Result<TestImage> {
    TestImage::all()
        .into_iter()
        .find(|i| i.name() == name.trim())
        .with_context(|| format!("unknown image {name:?}: busybox, debian, debian-python"))
}

/// An image in the registry: its reference and how many layers it has.
struct Pushed {
    name: String,
    reference: String,
    layers: usize,
}

pub fn run(args: SnapshotterArgs, command_line: String) -> anyhow::Result<()> {
    if args.pull_rounds == 0 || args.run_rounds == 0 {
        bail!("--pull-rounds and --run-rounds must be at least 1");
    }
    let wanted = args
        .images
        .iter()
        .map(|n| parse_image(n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut machine = Machine::collect(None);

    // The throughput figures first, before any daemon runs.
    let throughput = throughput(args.commit_mib)?;
    tracing::info!(?throughput, "chunk+hash measured");

    let snap = SnapshotterDaemon::start("").context("starting hyperbox-snapshotter")?;
    let mut builder = snap.register(PLUGIN, Containerd::builder(args.containerd));
    if args.peer_erofs {
        builder = builder.with_erofs_peer();
    }
    let bed = TestBed::with_builder(builder).context("starting containerd and the registry")?;
    let c = &bed.containerd;
    let mut pushed = Vec::new();
    for image in &wanted {
        let built = TestBed::build(*image)?;
        let repo_tag = format!("hyperbox/{}:latest", image.name());
        images::push(&built, &bed.registry.host(), &repo_tag)?;
        pushed.push(Pushed {
            name: image.name().to_string(),
            reference: bed.registry.reference(&repo_tag),
            layers: built.layer_digests.len(),
        });
    }
    let remove_all = || -> anyhow::Result<()> {
        for p in &pushed {
            let mut cmd = c.ctr();
            cmd.args(["images", "rm", "--sync", &p.reference]);
            // Not there yet is fine; anything else is not.
            let out = cmd.output()?;
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !err.contains("not found") {
                bail!("{}: {err}", describe(&cmd));
            }
        }
        wait_no_layers(&snap)?;
        Ok(())
    };

    // Pull+unpack.
    let mut snapshotters = vec![OVERLAYFS, PLUGIN];
    if args.peer_erofs {
        snapshotters.push(EROFS_PEER);
    }
    let snapshotters = snapshotters;
    let k = snapshotters.len();
    let mut pull_times: Vec<VariantTimes> = Vec::new();
    let mut converted: Vec<VariantTimes> = Vec::new();
    for p in &pushed {
        for &s in &snapshotters {
            pull_times.push(VariantTimes {
                name: format!("{}@{s}", p.name),
                command: format!(
                    "ctr images pull --plain-http --snapshotter {s} {}",
                    p.reference
                ),
                samples_ms: Vec::new(),
            });
        }
        converted.push(VariantTimes {
            name: format!("{}@{PLUGIN}", p.name),
            command: "until every layer is EROFS".into(),
            samples_ms: Vec::new(),
        });
    }
    machine.restart_cpu_sample();
    for round in 0..args.pull_rounds {
        for (pi, p) in pushed.iter().enumerate() {
            for si in rotation(snapshotters.len(), round + pi) {
                let s = snapshotters[si];
                remove_all()?;
                let mut cmd = c.ctr();
                cmd.args([
                    "images",
                    "pull",
                    "--plain-http",
                    "--snapshotter",
                    s,
                    &p.reference,
                ]);
                let shown = describe(&cmd);
                let start = Instant::now();
                run_command(&mut cmd, &shown)?;
                let pulled = start.elapsed();
                pull_times[pi * k + si]
                    .samples_ms
                    .push(pulled.as_secs_f64() * 1e3);
                if s == PLUGIN {
                    wait_layers(&snap, p.layers)?;
                    converted[pi]
                        .samples_ms
                        .push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        tracing::info!("pull round {}/{} done", round + 1, args.pull_rounds);
    }
    let pull = per_image_timings(pull_times, args.pull_rounds, 0, k);

    // ctr run --rm, every image pulled through both.
    remove_all()?;
    for p in &pushed {
        for &s in &snapshotters {
            c.ctr_run(&[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                s,
                &p.reference,
            ])?;
        }
    }
    let total_layers: usize = distinct_layers(&wanted)?;
    wait_layers(&snap, total_layers)?;
    let fifo = c.dir().join("fifo");
    let mut variants = Vec::new();
    for p in &pushed {
        for &s in &snapshotters {
            let reference = p.reference.clone();
            let fifo = fifo.clone();
            let description = format!("ctr run --rm --snapshotter {s} {reference} id-{{n}} true");
            variants.push(Variant::command(
                format!("{}@{s}", p.name),
                description,
                move |n| {
                    let mut cmd = c.ctr();
                    cmd.args(["run", "--rm", "--fifo-dir"]).arg(&fifo).args([
                        "--snapshotter",
                        s,
                        &reference,
                        &format!("bench-{n}"),
                        "true",
                    ]);
                    cmd
                },
            ));
        }
    }
    let plan = Plan {
        rounds: args.run_rounds,
        warmup: args.warmup,
        baseline: None,
    };
    let mut run_timings = runner::run(&mut variants, &plan)?;
    drop(variants);
    let baselines: Vec<usize> = (0..run_timings.variants.len()).map(|i| i / k * k).collect();
    runner::rebase(&mut run_timings, &baselines, "overlayfs, same image");

    // N containers of each image started at once.
    let parallel = if args.parallel > 0 {
        parallel_starts(
            c,
            &pushed,
            &snapshotters,
            args.parallel,
            args.run_rounds.min(5),
        )?
    } else {
        Vec::new()
    };

    // Disk.
    let overlay_root = c.dir().join("root/io.containerd.snapshotter.v1.overlayfs");
    let overlay = du(&overlay_root)?;
    let hyperbox = du(&snap.root())?;
    let mut disk = vec![
        DiskRow {
            snapshotter: OVERLAYFS.into(),
            bytes: overlay,
            ratio_to_overlayfs: 1.0,
        },
        DiskRow {
            snapshotter: PLUGIN.into(),
            bytes: hyperbox,
            ratio_to_overlayfs: hyperbox as f64 / overlay as f64,
        },
    ];
    if args.peer_erofs {
        let peer = du(&c.dir().join("root/io.containerd.snapshotter.v1.erofs"))?;
        disk.push(DiskRow {
            snapshotter: EROFS_PEER.into(),
            bytes: peer,
            ratio_to_overlayfs: peer as f64 / overlay as f64,
        });
    }
    let peer_path = if args.peer_erofs {
        Some(peer_erofs_path(c)?)
    } else {
        None
    };
    let hyperbox_path = hyperbox_path(&[&snap]);
    machine.finish();
    let report = SnapshotterReport {
        benchmark: "snapshotter".into(),
        command_line,
        machine,
        images: pushed.iter().map(|p| p.name.clone()).collect(),
        pull,
        converted,
        run: run_timings,
        parallel,
        disk,
        peer_path,
        hyperbox_path,
        throughput,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    drop(bed);
    drop(snap);
    Ok(())
}

/// Timings of (image, overlayfs), (image, hyperbox) pairs, each ratio to its pair's first.
fn per_image_timings(times: Vec<VariantTimes>, rounds: usize, warmup: usize, k: usize) -> Timings {
    let n = times.len();
    let mut t = Timings {
        rounds,
        warmup,
        baseline: String::new(),
        variants: runner::summarize(times, 0),
    };
    let baselines: Vec<usize> = (0..n).map(|i| i / k * k).collect();
    runner::rebase(&mut t, &baselines, "overlayfs, same image");
    t
}

/// containerd's own EROFS snapshotter.
pub const EROFS_PEER: &str = "erofs";

/// How containerd's EROFS snapshotter got its layers: its differ (`mkfs.erofs --tar=f`) or
/// the walking differ and a conversion of the directory at Commit, from the log of the
/// `mkfs.erofs` wrapper on the daemon's `PATH` and `ctr plugins ls`.
pub fn peer_erofs_path(c: &Containerd) -> anyhow::Result<String> {
    let out = c.ctr_run(&["plugins", "ls"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let differ = text
        .lines()
        .find(|l| l.contains("io.containerd.differ.v1") && l.contains("erofs"))
        .map(|l| l.split_whitespace().last().unwrap_or("?").to_string())
        .unwrap_or_else(|| "absent".into());
    let log = fs::read_to_string(
        c.dir()
            .join(hyperbox_integration::containerd::MKFS_EROFS_LOG),
    )
    .unwrap_or_default();
    let tar = log.lines().filter(|l| l.contains("--tar=f")).count();
    let dirs = log.lines().count() - tar;
    let mkfs = Command::new(hyperbox_integration::host::mkfs_erofs_peer())
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    Ok(format!(
        "EROFS differ {differ}, {mkfs}: {tar} layers unpacked by `mkfs.erofs --tar=f`, {dirs} \
         converted from a directory"
    ))
}

/// How hyperbox's snapshotters got their layers, from their logs: unpacked by the differ
/// straight from the archives (containerd 2.x), or by containerd's walking differ into a
/// directory and converted after Commit.
pub fn hyperbox_path(snaps: &[&SnapshotterDaemon]) -> String {
    let count =
        |needle: &str| -> usize { snaps.iter().map(|s| s.log().matches(needle).count()).sum() };
    format!(
        "{} layer unpacks by its differ straight from the archives, {} handed to containerd's \
         walking differ; {} layers converted from a directory after Commit",
        count("layer unpacked by the differ"),
        count("hands the layer to containerd"),
        count("layer converted to erofs"),
    )
}

/// `n` containers of each image started at once through each snapshotter (`ctr run -d`,
/// `sleep`), timed until the last `ctr run -d` returns (the task is started then); then
/// all removed. `rounds` rounds, snapshotters rotated.
fn parallel_starts(
    c: &Containerd,
    pushed: &[Pushed],
    snapshotters: &[&str],
    n: usize,
    rounds: usize,
) -> anyhow::Result<Vec<VariantTimes>> {
    let mut out = Vec::new();
    for p in pushed {
        for &s in snapshotters {
            out.push(VariantTimes {
                name: format!("{}@{s} x{n}", p.name),
                command: format!(
                    "{n} x ctr run -d --snapshotter {s} {} ID sleep 600",
                    p.reference
                ),
                samples_ms: Vec::new(),
            });
        }
    }
    let k = snapshotters.len();
    for round in 0..rounds {
        for (pi, p) in pushed.iter().enumerate() {
            for si in rotation(k, round + pi) {
                let s = snapshotters[si];
                let start = Instant::now();
                let children: Vec<_> = (0..n)
                    .map(|i| {
                        let mut cmd = c.ctr();
                        cmd.args([
                            "run",
                            "-d",
                            "--null-io",
                            "--snapshotter",
                            s,
                            &p.reference,
                            &format!("par-{i}"),
                            "sleep",
                            "600",
                        ]);
                        cmd.stdout(std::process::Stdio::null());
                        cmd.spawn()
                    })
                    .collect::<Result<_, _>>()?;
                let mut failed = 0;
                for mut ch in children {
                    if !ch.wait()?.success() {
                        failed += 1;
                    }
                }
                let ms = start.elapsed().as_secs_f64() * 1e3;
                for i in 0..n {
                    let id = format!("par-{i}");
                    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", &id]);
                }
                for i in 0..n {
                    let id = format!("par-{i}");
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while c.ctr_run(&["tasks", "delete", &id]).is_err()
                        && c.ctr_run(&["tasks", "ls", "-q"]).is_ok_and(|o| {
                            String::from_utf8_lossy(&o.stdout).lines().any(|l| l == id)
                        })
                    {
                        if Instant::now() > deadline {
                            bail!("task {id} not deleted");
                        }
                        thread::sleep(Duration::from_millis(50));
                    }
                    let _ = c.ctr_run(&["containers", "rm", &id]);
                }
                if failed > 0 {
                    bail!("{failed} of {n} `ctr run -d` through {s} failed");
                }
                out[pi * k + si].samples_ms.push(ms);
            }
        }
    }
    Ok(out)
}

/// Distinct layers of `images` (debian-python shares debian's).
fn distinct_layers(images: &[TestImage]) -> anyhow::Result<usize> {
    let mut digests = std::collections::BTreeSet::new();
    for i in images {
        digests.extend(TestBed::build(*i)?.diff_ids);
    }
    Ok(digests.len())
}

/// Waits until `n` layers are EROFS images under the snapshotter.
fn wait_layers(snap: &SnapshotterDaemon, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while snap.image_ids().len() < n {
        if Instant::now() > deadline {
            bail!(
                "{} of {n} layers converted after 300 s; snapshotter log:\n{}",
                snap.image_ids().len(),
                snap.log()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until no layer is left (removed snapshots are deleted after Remove returns), and
/// for the trash to be emptied, so the next pull does not share the disk with a deletion.
fn wait_no_layers(snap: &SnapshotterDaemon) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !snap.image_ids().is_empty() || !snap.entries("trash").is_empty() {
        if Instant::now() > deadline {
            bail!("removed layers still there after 120 s");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Bytes under `path` as `du -s -B1 -x` counts them.
pub fn du(path: &Path) -> anyhow::Result<u64> {
    let mut tries = 0;
    let out = loop {
        let out = Command::new("du")
            .args(["-s", "-B1", "-x"])
            .arg(path)
            .output()?;
        // containerd's garbage collector may remove a snapshot while du walks: again, once
        // it is done.
        let vanished = String::from_utf8_lossy(&out.stderr).contains("No such file or directory");
        tries += 1;
        if out.status.success() || !vanished || tries == 5 {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    };
    if !out.status.success() {
        bail!(
            "du {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du {} printed no number", path.display()))
}

/// Fills `buf` with xorshift noise: incompressible, unique chunks, and fast to make.
fn noise(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn throughput(commit_mib: u64) -> anyhow::Result<Throughput> {
    const CHUNK: usize = 64 << 10;
    // SHA-256 in memory: 256 MiB, three passes, the best taken (one core).
    let mut buf = vec![0u8; 256 << 20];
    noise(&mut buf, 0x9e37_79b9_7f4a_7c15);
    let mut best = f64::MAX;
    let mut sink = 0u8;
    for _ in 0..3 {
        let start = Instant::now();
        for chunk in buf.chunks(CHUNK) {
            sink ^= Sha256::digest(chunk)[0];
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    let sha256_gib_s = (buf.len() as f64 / (1u64 << 30) as f64) / best;
    drop(buf);

    // A whole layer commit of random files.
    let mut sandbox = Sandbox::create("bench-chunks")?;
    let src = sandbox.dir().join("src");
    fs::create_dir_all(&src)?;
    let files = commit_mib.div_ceil(64).max(1);
    let mut block = vec![0u8; 64 << 20];
    for f in 0..files {
        noise(&mut block, 0x5151 + f);
        let mut file = fs::File::create(src.join(format!("f{f}")))?;
        file.write_all(&block)?;
    }
    drop(block);
    // Read once so the commit measures chunking and hashing, not the disk.
    for f in 0..files {
        std::hint::black_box(fs::read(src.join(format!("f{f}")))?.len());
    }
    let store = ChunkStore::open(&sandbox.dir().join("store"), StoreConfig::default())?;
    let start = Instant::now();
    commit_layer(
        &store,
        "bench",
        &src,
        &sandbox.dir().join("layer.erofs"),
        &ImageOptions::default(),
    )?;
    let secs = start.elapsed().as_secs_f64();
    drop(store);
    sandbox.teardown()?;
    Ok(Throughput {
        sha256_gib_s,
        commit_gib_s: (files * 64) as f64 / 1024.0 / secs,
        commit_mib: files * 64,
    })
}

//! `hyperbox-bench layers`: images of many layers through containerd's overlayfs, through
//! hyperbox-snapshotter with merged images (`hyperbox`: a container's root is one merged
//! EROFS mount under its upper dir) and through hyperbox-snapshotter without them
//! (`hyperbox-layers`, `merge_layers = false`: an overlay of every layer's EROFS mount), in
//! one containerd, interleaved.
//!
//! Each image is debian's layer plus DEPTH-1 small layers that each add a file to `/usr/bin`
//! and a directory under `/usr/local/lib`, rewrite `/etc/layer`, delete the previous
//! layer's file under `/usr/share/hyperbox`, and every fifth layer hides `/opt/box` with an
//! opaque directory: directories merged across many layers, as in images built step by step.
//!
//! - **import**: `ctr images import --snapshotter S` of the image's archive (unpack of every
//!   layer), the image and its snapshots removed before each; for hyperbox, also until every
//!   layer is converted and the top layer's merged image is mounted.
//! - **run**: `ctr run --rm IMAGE id true`.
//! - **find+stat**: `ctr run --rm IMAGE id find / -xdev -exec stat …` (every entry of the
//!   root looked up and stat'ed in a new container, whose overlay's caches start empty; the
//!   lower file systems' caches are warm, as on a node that ran the image before).

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::layer::LayerEntry;
use hyperbox_integration::images::{oci, TestImage};
use hyperbox_integration::snapshotter::{SnapshotterDaemon, PLUGIN};
use hyperbox_integration::testbed::TestBed;
use serde::Serialize;

use crate::machine::Machine;
use crate::report;
use crate::runner::{self, describe, run_command, Plan, Timings, Variant, VariantTimes};
use crate::snapshots::{render_medians, render_timings, EROFS_PEER, OVERLAYFS};
use crate::stats::rotation;

/// The second hyperbox-snapshotter, without merged images.
pub const UNMERGED: &str = "hyperbox-layers";

#[derive(Debug, Args)]
pub struct LayersArgs {
    /// Layers of each image (debian's plus small ones), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,40")]
    depths: Vec<usize>,
    /// Measured import rounds.
    #[arg(long, default_value_t = 3)]
    import_rounds: usize,
    /// Measured rounds of `ctr run --rm` and of find+stat.
    #[arg(long, default_value_t = 10)]
    run_rounds: usize,
    /// Unrecorded rounds first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// The containerd version.
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
    /// containerd 2.x: also containerd's own EROFS snapshotter (`erofs`, its EROFS differ
    /// running erofs-utils 1.8's `mkfs.erofs --tar=f`).
    #[arg(long)]
    peer_erofs: bool,
    /// Also write the report, with every sample, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayersReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub depths: Vec<usize>,
    /// Import (unpack of every layer), ms; ratios to overlayfs for the same image.
    pub import: Timings,
    /// hyperbox: from the start of the import until every layer is EROFS and the top
    /// layer's merged image is mounted, ms.
    pub ready: Vec<VariantTimes>,
    /// `ctr run --rm IMAGE true`, ms.
    pub run: Timings,
    /// `ctr run --rm IMAGE find / -xdev -exec stat`, ms.
    pub find_stat: Timings,
    /// Entries find+stat visited per image.
    pub entries: Vec<(usize, usize)>,
    /// Bytes under each snapshotter's root (`du -B1 -x`), every image imported.
    pub disk: Vec<(String, u64)>,
    /// With `--peer-erofs`: how containerd's EROFS snapshotter got its layers.
    pub peer_path: Option<String>,
    /// How the two hyperbox snapshotters got their layers (their differ, or conversions).
    pub hyperbox_path: String,
}

impl LayersReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!(
            "\nimport+unpack ({} rounds, snapshotters rotated, image removed before each; ms; \
             ratio to overlayfs for the same image)\n",
            self.import.rounds
        ));
        s.push_str(&render_timings(&self.import));
        s.push_str("\nhyperbox, import start until every layer is EROFS and the merged image is mounted (ms)\n");
        s.push_str(&render_medians(&self.ready));
        s.push_str(&format!(
            "\nctr run --rm IMAGE true ({} rounds after {} warm-up, rotated; ms; ratio to overlayfs \
             for the same image)\n",
            self.run.rounds, self.run.warmup
        ));
        s.push_str(&render_timings(&self.run));
        s.push_str(&format!(
            "\nctr run --rm IMAGE find / -xdev -exec stat ({} rounds after {} warm-up, rotated; \
             ms; ratio to overlayfs for the same image)\n",
            self.find_stat.rounds, self.find_stat.warmup
        ));
        s.push_str(&render_timings(&self.find_stat));
        for (depth, n) in &self.entries {
            s.push_str(&format!("{depth} layers: find+stat visits {n} entries\n"));
        }
        s.push_str("\ndisk under each root, every image imported (bytes; ratio to overlayfs)\n");
        let base = self.disk.first().map_or(1, |d| d.1.max(1)) as f64;
        for (name, bytes) in &self.disk {
            s.push_str(&format!(
                "{name:<18} {bytes:>12}  {:>6.3}\n",
                *bytes as f64 / base
            ));
        }
        if let Some(p) = &self.peer_path {
            s.push_str(&format!("\ncontainerd's erofs snapshotter: {p}\n"));
        }
        s.push_str(&format!("hyperbox: {}\n", self.hyperbox_path));
        s
    }
}

/// The oci-archive of debian's layer plus `depth - 1` small layers.
fn build_image(work: &Path, depth: usize) -> anyhow::Result<(PathBuf, String)> {
    let debian = TestBed::build(TestImage::Debian)?;
    let name = format!("layers-{depth}");
    let layout = work.join(format!("{name}.layout"));
    let archive = work.join(format!("{name}.tar"));
    let _ = fs::remove_dir_all(&layout);
    let epoch = 1_700_000_000;
    let mut w = oci::LayoutWriter::create(&layout, epoch)?;
    debian.add_layers_to(&mut w)?;
    for i in 1..depth {
        let mut e = vec![
            LayerEntry::dir("etc", 0o755),
            // Names the image too: no two images share a layer but debian's.
            LayerEntry::file(
                "etc/layer",
                0o644,
                format!("layer {i} of {depth}\n").into_bytes(),
            ),
            LayerEntry::dir("usr", 0o755),
            LayerEntry::dir("usr/bin", 0o755),
            LayerEntry::file(format!("usr/bin/tool-{i}"), 0o755, vec![b'#'; 200 + i]),
            LayerEntry::dir("usr/local", 0o755),
            LayerEntry::dir("usr/local/lib", 0o755),
            LayerEntry::dir(format!("usr/local/lib/layer-{i}"), 0o755),
            LayerEntry::file(
                format!("usr/local/lib/layer-{i}/data"),
                0o644,
                vec![b'd'; 5000 + i],
            ),
            LayerEntry::dir("usr/share", 0o755),
            LayerEntry::dir("usr/share/hyperbox", 0o755),
            LayerEntry::file(
                format!("usr/share/hyperbox/own-{i}"),
                0o644,
                b"own".to_vec(),
            ),
        ];
        if i > 1 {
            e.push(LayerEntry::whiteout(Path::new(&format!(
                "usr/share/hyperbox/own-{}",
                i - 1
            ))));
        }
        e.push(LayerEntry::dir("opt", 0o755));
        if i % 5 == 0 {
            e.push(LayerEntry::dir("opt/box", 0o755));
            e.push(LayerEntry::file("opt/box/.wh..wh..opq", 0o644, Vec::new()));
        }
        e.push(LayerEntry::dir("opt/box", 0o755));
        e.push(LayerEntry::file(
            format!("opt/box/{i}"),
            0o644,
            b"box".to_vec(),
        ));
        w.add_layer(&mut e)?;
    }
    let run = oci::RunConfig {
        cmd: vec!["bash".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        history: (0..depth).map(|i| format!("layer {i}")).collect(),
    };
    let reference = format!("docker.io/hyperbox/{name}:latest");
    w.finish(&run, "latest", &reference)?;
    oci::write_archive(&layout, &archive, epoch)?;
    fs::remove_dir_all(&layout)?;
    Ok((archive, reference))
}

/// Waits until `snap` holds `layers` EROFS layers and, if `merged`, `merged` merged images
/// mounted.
fn wait_ready(snap: &SnapshotterDaemon, layers: usize, merged: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    let root = format!("{}/snapshots/", snap.root().display());
    loop {
        let mounted = fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|p| p.starts_with(&root) && p.ends_with("/merged"))
            .count();
        let converted = snap.image_ids().len();
        if converted == layers && mounted == merged {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after 600 s: {converted} of {layers} layers converted, {mounted} of {merged} \
                 merged images mounted; log:\n{}",
                snap.log()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn remove_image(c: &Containerd, reference: &str) -> anyhow::Result<()> {
    let mut cmd = c.ctr();
    cmd.args(["images", "rm", "--sync", reference]);
    let out = cmd.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !err.contains("not found") {
        bail!("{}: {err}", describe(&cmd));
    }
    Ok(())
}

pub fn run(args: LayersArgs, command_line: String) -> anyhow::Result<()> {
    if args.import_rounds == 0 || args.run_rounds == 0 || args.depths.is_empty() {
        bail!("--import-rounds, --run-rounds and --depths must not be empty or 0");
    }
    let mut machine = Machine::collect(None);
    let merged = SnapshotterDaemon::start("").context("starting hyperbox-snapshotter")?;
    let layered = SnapshotterDaemon::start("merge_layers = false\n")
        .context("starting the second hyperbox-snapshotter")?;
    let mut builder = layered.register(
        UNMERGED,
        merged.register(PLUGIN, Containerd::builder(args.containerd)),
    );
    if args.peer_erofs {
        builder = builder.with_erofs_peer();
    }
    let bed = TestBed::with_builder(builder).context("starting containerd")?;
    let c = &bed.containerd;
    let work = merged.dir().join("bench-layers");
    fs::create_dir_all(&work)?;
    let mut images = Vec::new();
    for &depth in &args.depths {
        images.push((depth, build_image(&work, depth)?));
    }
    let mut snapshotters = vec![OVERLAYFS, PLUGIN, UNMERGED];
    if args.peer_erofs {
        snapshotters.push(EROFS_PEER);
    }
    let snapshotters = snapshotters;
    let k = snapshotters.len();

    // Import+unpack.
    let mut import_times = Vec::new();
    let mut ready = Vec::new();
    for (depth, _) in &images {
        for &s in &snapshotters {
            import_times.push(VariantTimes {
                name: format!("{depth} layers@{s}"),
                command: format!("ctr images import --snapshotter {s} layers-{depth}.tar"),
                samples_ms: Vec::new(),
            });
        }
        ready.push(VariantTimes {
            name: format!("{depth} layers@{PLUGIN}"),
            command: "until every layer is EROFS and the top one merged".into(),
            samples_ms: Vec::new(),
        });
    }
    machine.restart_cpu_sample();
    let remove_all = || -> anyhow::Result<()> {
        for (_, (_, reference)) in &images {
            remove_image(c, reference)?;
        }
        wait_ready(&merged, 0, 0)?;
        wait_ready(&layered, 0, 0)
    };
    for round in 0..args.import_rounds {
        for (ii, (depth, (archive, _))) in images.iter().enumerate() {
            for si in rotation(snapshotters.len(), round + ii) {
                let s = snapshotters[si];
                remove_all()?;
                let mut cmd = c.ctr();
                cmd.args(["images", "import", "--snapshotter", s])
                    .arg(archive);
                let shown = describe(&cmd);
                let start = Instant::now();
                run_command(&mut cmd, &shown)?;
                import_times[ii * k + si]
                    .samples_ms
                    .push(start.elapsed().as_secs_f64() * 1e3);
                if s == PLUGIN {
                    wait_ready(&merged, *depth, 1)?;
                    ready[ii]
                        .samples_ms
                        .push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        tracing::info!("import round {}/{} done", round + 1, args.import_rounds);
    }
    let n = import_times.len();
    let mut import = Timings {
        rounds: args.import_rounds,
        warmup: 0,
        baseline: String::new(),
        variants: runner::summarize(import_times, 0),
    };
    runner::rebase(
        &mut import,
        &(0..n).map(|i| i / k * k).collect::<Vec<_>>(),
        "overlayfs, same image",
    );

    // Every image imported through all three, converted and merged.
    remove_all()?;
    for (_, (archive, _)) in &images {
        for &s in &snapshotters {
            let mut cmd = c.ctr();
            cmd.args(["images", "import", "--snapshotter", s])
                .arg(archive);
            let shown = describe(&cmd);
            run_command(&mut cmd, &shown)?;
        }
    }
    let all_layers = 1 + images.iter().map(|(d, _)| d - 1).sum::<usize>();
    wait_ready(&merged, all_layers, images.len())?;
    wait_ready(&layered, all_layers, 0)?;
    let roots = snapshotters.iter().map(|&s| match s {
        PLUGIN => merged.root(),
        UNMERGED => layered.root(),
        other => c
            .dir()
            .join(format!("root/io.containerd.snapshotter.v1.{other}")),
    });
    let mut disk = Vec::new();
    for (&s, root) in snapshotters.iter().zip(roots) {
        disk.push((s.to_string(), crate::snapshots::du(&root)?));
    }

    let fifo = c.dir().join("fifo");
    let timed = |script: Option<&'static str>| -> anyhow::Result<Timings> {
        let mut variants = Vec::new();
        for (depth, (_, reference)) in &images {
            for &s in &snapshotters {
                let reference = reference.clone();
                let fifo = fifo.clone();
                let what = script.unwrap_or("true");
                variants.push(Variant::command(
                    format!("{depth} layers@{s}"),
                    format!("ctr run --rm --snapshotter {s} {reference} id-{{n}} {what}"),
                    move |n| {
                        let mut cmd = c.ctr();
                        cmd.args(["run", "--rm", "--fifo-dir"]).arg(&fifo).args([
                            "--snapshotter",
                            s,
                            &reference,
                            &format!("bench-{n}"),
                        ]);
                        match script {
                            Some(sc) => cmd.args(["sh", "-c", sc]),
                            None => cmd.arg("true"),
                        };
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
        let mut t = runner::run(&mut variants, &plan)?;
        let n = t.variants.len();
        runner::rebase(
            &mut t,
            &(0..n).map(|i| i / k * k).collect::<Vec<_>>(),
            "overlayfs, same image",
        );
        Ok(t)
    };
    const FIND_STAT: &str = "find / -xdev -exec stat -c %i {} + >/dev/null";
    let run_timings = timed(None)?;
    let find_stat = timed(Some(FIND_STAT))?;
    let mut entries = Vec::new();
    for (depth, (_, reference)) in &images {
        let out = c.ctr_run(&[
            "run",
            "--rm",
            "--snapshotter",
            PLUGIN,
            reference,
            "bench-count",
            "sh",
            "-c",
            "find / -xdev | wc -l",
        ])?;
        let n: usize = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        entries.push((*depth, n));
    }
    machine.finish();
    let report = LayersReport {
        benchmark: "layers".into(),
        command_line,
        machine,
        depths: args.depths.clone(),
        import,
        ready,
        run: run_timings,
        find_stat,
        entries,
        disk,
        peer_path: if args.peer_erofs {
            Some(crate::snapshots::peer_erofs_path(c)?)
        } else {
            None
        },
        hyperbox_path: crate::snapshots::hyperbox_path(&[&merged, &layered]),
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    drop(bed);
    drop(layered);
    drop(merged);
    Ok(())
}

//! `hyperbox-bench conversion`: what converting one committed layer to EROFS costs the
//! snapshotter, in time and in peak memory, for the debian layer and for sparse files
//! (8 KB of data) of the sizes given.
//!
//! The snapshotter runs alone (no containerd); each layer is made as containerd's unpacker
//! makes one (Prepare, fill the directory, Commit) straight on its socket. Before each
//! Commit the snapshotter's peak RSS is reset from outside (`/proc/PID/clear_refs`), and
//! after the layer shows its storage label it is read (`VmHWM`), so the figure is the same
//! for any build of the snapshotter (`HYPERBOX_BIN_DIR` picks one): a before/after pair
//! is two runs. Time is from Commit's return until the label shows; each layer is removed
//! after its conversion and the chunk store's GC given 2 s before the next.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::tonic::transport::Channel;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::snapshotter::{SnapshotterDaemon, PLUGIN, STORAGE_LABEL};
use hyperbox_integration::testbed::TestBed;
use serde::Serialize;

use crate::machine::Machine;
use crate::stats::Summary;

#[derive(Debug, Args)]
pub struct ConversionArgs {
    /// Conversions of each layer.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Sizes of the sparse files, GiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,1024")]
    sparse_gib: Vec<u64>,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One layer's conversions.
#[derive(Debug, Clone, Serialize)]
pub struct ConversionRow {
    pub layer: String,
    /// Commit until the storage label shows, ms.
    pub samples_ms: Vec<f64>,
    /// The snapshotter's peak RSS during each conversion, MiB.
    pub peak_rss_mib: Vec<f64>,
    /// The storage label at the end (`erofs`, or `directory` when set aside).
    pub storage: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversionReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub binary: String,
    /// The snapshotter's RSS before the first conversion, MiB.
    pub idle_rss_mib: f64,
    pub rows: Vec<ConversionRow>,
}

impl ConversionReport {
    pub fn render(&self) -> String {
        let mut s = format!("$ {}\n{}\n", self.command_line, self.machine.render());
        s.push_str(&format!(
            "snapshotter {}; idle RSS {:.1} MiB\n\n{:<34} {:>6} {:>12} {:>14} {:>10}\n",
            self.binary, self.idle_rss_mib, "layer", "runs", "median ms", "peak RSS MiB", "storage"
        ));
        for r in &self.rows {
            let m = Summary::of(&r.samples_ms).map_or(0.0, |m| m.median);
            let peak = r.peak_rss_mib.iter().cloned().fold(0.0, f64::max);
            s.push_str(&format!(
                "{:<34} {:>6} {:>12.1} {:>14.1} {:>10}\n",
                r.layer,
                r.samples_ms.len(),
                m,
                peak,
                r.storage
            ));
        }
        s
    }
}

/// `VmRSS` or `VmHWM` of process `pid`, MiB.
fn status_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for {pid}"))?;
    Ok(kib / 1024.0)
}

struct Client {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl Client {
    fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    fn prepare(&self, key: &str) -> anyhow::Result<PathBuf> {
        let mounts = self
            .rt
            .block_on(self.client().prepare(PrepareSnapshotRequest {
                snapshotter: PLUGIN.into(),
                key: key.into(),
                ..Default::default()
            }))?
            .into_inner()
            .mounts;
        let m = mounts.first().context("no mount")?;
        if m.r#type != "bind" {
            bail!("expected a bind mount, got {m:?}");
        }
        Ok(PathBuf::from(&m.source))
    }

    fn commit(&self, name: &str, key: &str) -> anyhow::Result<()> {
        self.rt
            .block_on(self.client().commit(CommitSnapshotRequest {
                snapshotter: PLUGIN.into(),
                name: name.into(),
                key: key.into(),
                ..Default::default()
            }))?;
        Ok(())
    }

    fn labels(&self, key: &str) -> anyhow::Result<HashMap<String, String>> {
        Ok(self
            .rt
            .block_on(self.client().stat(StatSnapshotRequest {
                snapshotter: PLUGIN.into(),
                key: key.into(),
            }))?
            .into_inner()
            .info
            .context("no info")?
            .labels)
    }

    fn remove(&self, key: &str) -> anyhow::Result<()> {
        self.rt
            .block_on(self.client().remove(RemoveSnapshotRequest {
                snapshotter: PLUGIN.into(),
                key: key.into(),
            }))?;
        Ok(())
    }
}

/// Converts the layer `fill` writes, once; returns (ms, peak RSS MiB, storage).
fn convert_once(
    c: &Client,
    pid: u32,
    name: &str,
    fill: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64, String)> {
    let key = format!("{name}-active");
    let dir = c.prepare(&key)?;
    fill(&dir)?;
    fs::write(format!("/proc/{pid}/clear_refs"), "5").context("reset the peak RSS")?;
    c.commit(name, &key)?;
    let t = Instant::now();
    let deadline = t + Duration::from_secs(1800);
    let storage = loop {
        if let Some(s) = c.labels(name)?.get(STORAGE_LABEL) {
            break s.clone();
        }
        if Instant::now() > deadline {
            bail!("{name} not converted after 30 min");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let peak = status_mib(pid, "VmHWM:")?;
    c.remove(name)?;
    // Removal queues the chunk store's GC on the conversion worker: let it finish, so that
    // the next conversion's time is its own.
    thread::sleep(Duration::from_secs(2));
    Ok((ms, peak, storage))
}

pub fn run(args: ConversionArgs, command_line: String) -> anyhow::Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let machine = Machine::collect(None);
    let debian = TestBed::build(TestImage::Debian)?;
    let blobs: Vec<PathBuf> = debian
        .layer_digests
        .iter()
        .map(|d| debian.blob_path(d))
        .collect();
    // A sparse file over 8 TiB needs more than max_image_bytes' default (1 GiB) of chunk
    // indexes; only then is the limit raised (an older snapshotter has no such option).
    let largest = args.sparse_gib.iter().max().copied().unwrap_or(0);
    let config = if largest > 8 << 10 {
        "max_image_bytes = 3221225472\n"
    } else {
        ""
    };
    let snap = SnapshotterDaemon::start(config).context("starting hyperbox-snapshotter")?;
    let pid = snap.pid().context("no snapshotter pid")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let channel = rt.block_on(containerd_client::connect(snap.socket()))?;
    let c = Client { rt, channel };
    thread::sleep(Duration::from_secs(1));
    let idle_rss_mib = status_mib(pid, "VmRSS:")?;

    type Fill = Box<dyn Fn(&Path) -> anyhow::Result<()>>;
    let mut cases: Vec<(String, Fill)> = Vec::new();
    cases.push((
        "debian layer".into(),
        Box::new(move |dir: &Path| {
            for blob in &blobs {
                let ok = Command::new("tar")
                    .arg("-xzpf")
                    .arg(blob)
                    .arg("-C")
                    .arg(dir)
                    .arg("--numeric-owner")
                    .status()?
                    .success();
                if !ok {
                    bail!("tar -x {} failed", blob.display());
                }
            }
            Ok(())
        }),
    ));
    for gib in &args.sparse_gib {
        let size = (gib << 30).min((16 << 40) - (64 << 10));
        cases.push((
            format!("{gib} GiB sparse file, 8 KB of data"),
            Box::new(move |dir: &Path| {
                let f = fs::File::create(dir.join("sparse"))?;
                f.set_len(size)?;
                std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 8192], size / 2)?;
                Ok(())
            }),
        ));
    }
    let mut rows: Vec<ConversionRow> = cases
        .iter()
        .map(|(layer, _)| ConversionRow {
            layer: layer.clone(),
            samples_ms: Vec::new(),
            peak_rss_mib: Vec::new(),
            storage: String::new(),
        })
        .collect();
    for round in 0..args.rounds {
        for (i, (layer, fill)) in cases.iter().enumerate() {
            let (ms, peak, storage) =
                convert_once(&c, pid, &format!("bench-{i}-{round}"), fill.as_ref())
                    .with_context(|| format!("converting the {layer}"))?;
            tracing::info!(layer, round, ms, peak, storage, "converted");
            rows[i].samples_ms.push(ms);
            rows[i].peak_rss_mib.push(peak);
            rows[i].storage = storage;
        }
    }
    let report = ConversionReport {
        benchmark: "conversion".into(),
        command_line,
        machine,
        binary: hyperbox_integration::host::workspace_binary(
            hyperbox_integration::snapshotter::BINARY,
        )
        .map(|p| p.display().to_string())
        .unwrap_or_default(),
        idle_rss_mib,
        rows,
    };
    print!("{}", report.render());
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

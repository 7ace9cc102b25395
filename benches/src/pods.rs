//! `hyperbox-bench pods`: what a Kubernetes pod costs on the runtime side, through
//! containerd's CRI plugin driven with `crictl` as the kubelet drives it.
//!
//! Per containerd version, one daemon with the CRI handlers `runc` (runc.v2) and `hyperbox`
//! (ours); per handler, P pods (`--pods`) of C sleeping containers each (`--containers`)
//! run at once, then the PSS and RSS of every process started from a `containerd-shim-*`
//! binary of that daemon (the shims, and the zygotes ours fork) are read from
//! `/proc/PID/smaps_rollup`, and their number counted. Both runtimes group a pod's
//! containers into one shim, so the figure is per pod. The pods are removed before the next
//! handler runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::cri::{self, CriBed};
use serde::Serialize;

use crate::machine::Machine;
use crate::memprobe::parse_smaps_rollup;

#[derive(Debug, Args)]
pub struct PodsArgs {
    /// Pods per handler, running at once when measured.
    #[arg(long, default_value_t = 5)]
    pods: usize,
    /// Containers per pod, beside its sandbox.
    #[arg(long, default_value_t = 3)]
    containers: usize,
    /// containerd versions with the CRI plugin, comma-separated (1.7, 2.1).
    #[arg(long, value_delimiter = ',', default_value = "1.7,2.1")]
    containerd: Vec<ContainerdVersion>,
    /// Seconds to wait after the last container started before reading /proc.
    #[arg(long, default_value_t = 2.0)]
    settle_secs: f64,
    /// Also write the report as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// One handler on one containerd version.
#[derive(Debug, Clone, Serialize)]
pub struct PodsRow {
    pub containerd: String,
    pub handler: String,
    pub pods: usize,
    pub containers_per_pod: usize,
    /// Processes started from a shim binary (shims and their helpers).
    pub processes: usize,
    /// Of them, those whose parent is not one of them: the shims.
    pub shims: usize,
    pub pss_kib_per_pod: f64,
    pub rss_kib_per_pod: f64,
    /// This row's PSS per pod over runc's on the same version.
    pub pss_ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct PodsReport {
    pub command_line: String,
    pub machine: Machine,
    pub rows: Vec<PodsRow>,
}

const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";

fn crictl(bed: &CriBed, args: &[&str]) -> anyhow::Result<String> {
    let out = bed.crictl().args(args).output().context("running crictl")?;
    if !out.status.success() {
        bail!(
            "crictl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// (pid, ppid, PSS KiB, RSS KiB) of every process of a shim binary of the daemon at
/// `socket` (shims and their helpers).
fn shim_processes(socket: &Path) -> Vec<(u32, u32, u64, u64)> {
    cri::shim_processes(socket)
        .into_iter()
        .filter_map(|p| {
            let smaps = fs::read_to_string(format!("/proc/{}/smaps_rollup", p.pid)).ok()?;
            let rollup = parse_smaps_rollup(&smaps)?;
            Some((p.pid, p.ppid, rollup.pss_kib, rollup.rss_kib))
        })
        .collect()
}

fn measure(
    bed: &CriBed,
    v: ContainerdVersion,
    handler: &str,
    args: &PodsArgs,
    dir: &Path,
) -> anyhow::Result<PodsRow> {
    let mut pods = Vec::new();
    for p in 0..args.pods {
        let name = format!("bench-{handler}-{p}");
        let logs = dir.join(format!("{name}-logs"));
        fs::create_dir_all(&logs)?;
        let pod_config = dir.join(format!("{name}.json"));
        let json = serde_json::json!({
            "metadata": {"name": name, "namespace": "bench", "uid": format!("uid-{name}")},
            "log_directory": logs,
            "linux": {},
        });
        fs::write(&pod_config, json.to_string())?;
        let pod_config = pod_config.to_string_lossy().into_owned();
        let pod = crictl(bed, &["runp", "--runtime", handler, &pod_config])?;
        for c in 0..args.containers {
            let config = dir.join(format!("{name}-c{c}.json"));
            let json = serde_json::json!({
                "metadata": {"name": format!("c{c}")},
                "image": {"image": BUSYBOX},
                "command": ["sleep", "100000"],
                "log_path": format!("c{c}.log"),
                "linux": {},
            });
            fs::write(&config, json.to_string())?;
            let id = crictl(
                bed,
                &["create", &pod, config.to_str().unwrap(), &pod_config],
            )?;
            crictl(bed, &["start", &id])?;
        }
        pods.push(pod);
    }
    thread::sleep(Duration::from_secs_f64(args.settle_secs));
    let procs = shim_processes(bed.containerd.socket());
    let shims = procs
        .iter()
        .filter(|(_, ppid, _, _)| !procs.iter().any(|(pid, _, _, _)| pid == ppid))
        .count();
    let pss: u64 = procs.iter().map(|p| p.2).sum();
    let rss: u64 = procs.iter().map(|p| p.3).sum();
    tracing::info!(handler, processes = procs.len(), shims, pss, "measured");
    for pod in &pods {
        crictl(bed, &["stopp", pod])?;
        crictl(bed, &["rmp", pod])?;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shim_processes(bed.containerd.socket()).is_empty() {
        if Instant::now() > deadline {
            bail!("{handler}: shims still running 30 s after their pods were removed");
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(PodsRow {
        containerd: v.to_string(),
        handler: handler.to_owned(),
        pods: args.pods,
        containers_per_pod: args.containers,
        processes: procs.len(),
        shims,
        pss_kib_per_pod: pss as f64 / args.pods as f64,
        rss_kib_per_pod: rss as f64 / args.pods as f64,
        pss_ratio: f64::NAN,
    })
}

pub fn run(args: PodsArgs, command_line: String) -> anyhow::Result<()> {
    if args.pods == 0 || args.containers == 0 {
        bail!("--pods and --containers must be at least 1");
    }
    let mut machine = Machine::collect(None);
    let mut rows = Vec::new();
    for &v in &args.containerd {
        let bed = CriBed::start(v).with_context(|| format!("containerd {v} with CRI"))?;
        let dir = bed.containerd.dir().join("bench-pods");
        fs::create_dir_all(&dir)?;
        crictl(&bed, &["pull", BUSYBOX])?;
        let first = rows.len();
        for (handler, _) in cri::HANDLERS {
            rows.push(measure(&bed, v, handler, &args, &dir)?);
        }
        let runc = rows[first].pss_kib_per_pod;
        for row in &mut rows[first..] {
            row.pss_ratio = row.pss_kib_per_pod / runc;
        }
        bed.teardown()?;
    }
    machine.finish();
    println!("{}", machine.render());
    println!("$ {command_line}");
    println!(
        "\n| containerd | handler | pods × containers | shim processes (shims) | PSS per pod | RSS per pod | PSS vs runc |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} | {} × {} | {} ({}) | {:.2} MiB | {:.2} MiB | {:.2} |",
            r.containerd,
            r.handler,
            r.pods,
            r.containers_per_pod,
            r.processes,
            r.shims,
            r.pss_kib_per_pod / 1024.0,
            r.rss_kib_per_pod / 1024.0,
            r.pss_ratio
        );
    }
    let report = PodsReport {
        command_line,
        machine,
        rows,
    };
    if let Some(path) = &args.json {
        fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

//! The memory part: K sleeping containers per runtime, the runtime side read as `mem` does
//! plus the containers' own processes, from /proc.

use std::collections::VecDeque;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::engines::RUNC_V2;
use crate::memprobe::{self, parse_smaps_rollup, ContainerProbe};
use crate::stats::Summary;

use super::bench::{with_id, Bench};
use super::results::{mib, WasmMemRow};
use super::WASM_V1;

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

pub(super) fn memory(b: &Bench, k: usize, settle_secs: f64) -> anyhow::Result<Vec<WasmMemRow>> {
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

//! The machine block of every report: what the numbers were measured on.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use hyperbox_integration::containerd::{self, ContainerdVersion};
use serde::Serialize;

/// A binary and what it says its version is.
#[derive(Debug, Clone, Serialize)]
pub struct ToolVersion {
    pub name: String,
    pub path: Option<PathBuf>,
    /// The first line of `--version`, or why there is none.
    pub version: String,
}

/// The machine a report was measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    /// Online CPUs (`processor` entries in /proc/cpuinfo).
    pub cores: usize,
    pub memory_mib: u64,
    /// `uname -r`.
    pub kernel: String,
    /// When the report was started, UTC.
    pub date: String,
    /// /proc/loadavg before the benchmark started anything (others' load on the machine).
    pub load_before: String,
    /// /proc/loadavg when it finished (includes the benchmark's own load).
    pub load_after: Option<String>,
    /// Share of all CPUs' time that was busy (not idle or waiting for IO) during the
    /// benchmark's measured work, in percent, the benchmark's own work included: a run
    /// far above what a quiet machine shows for the same benchmark had company.
    pub cpu_busy_percent: Option<f64>,
    /// Share of CPU time idle while waiting for IO (`iowait`), in percent: disk contention.
    pub cpu_iowait_percent: Option<f64>,
    /// Share of CPU time the hypervisor gave to others (`steal`), in percent.
    pub cpu_steal_percent: Option<f64>,
    #[serde(skip)]
    cpu_at_start: Option<CpuTimes>,
    pub containerd: Vec<ToolVersion>,
    pub runc: ToolVersion,
}

impl Machine {
    /// Describes this machine; `runc` is looked up on `path_env`, or on the benchmark's own
    /// `PATH` when `None` (see [`Machine::locate_runc`]).
    pub fn collect(path_env: Option<&str>) -> Machine {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (cpu_model, cores) = parse_cpuinfo(&cpuinfo);
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let containerd = ContainerdVersion::ALL
            .into_iter()
            .map(|v| ToolVersion {
                name: format!("containerd {v}"),
                path: Some(v.containerd()),
                version: containerd::check_installed(v).unwrap_or_else(|e| e.to_string()),
            })
            .collect();
        let path_env = path_env
            .map(str::to_string)
            .or_else(|| env::var("PATH").ok())
            .unwrap_or_default();
        Machine {
            cpu_model,
            cores: cores.max(1),
            memory_mib: parse_mem_total_kib(&meminfo).unwrap_or(0) / 1024,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            date: utc_timestamp(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            ),
            load_before: read_trimmed("/proc/loadavg"),
            load_after: None,
            cpu_busy_percent: None,
            cpu_iowait_percent: None,
            cpu_steal_percent: None,
            cpu_at_start: read_cpu_times(),
            containerd,
            runc: tool_version("runc", &path_env),
        }
    }

    /// Finds runc on `path_env` instead, the `PATH` containerd gives its shims
    /// (`Containerd::path_env`), so the report names the runc the containers ran with.
    pub fn locate_runc(&mut self, path_env: &str) {
        self.runc = tool_version("runc", path_env);
    }

    /// Starts the CPU time sample anew, for example once set-up is done and the measured
    /// work begins.
    pub fn restart_cpu_sample(&mut self) {
        self.cpu_at_start = read_cpu_times();
    }

    /// Notes the load at the end of the benchmark.
    pub fn finish(&mut self) {
        self.load_after = Some(read_trimmed("/proc/loadavg"));
        if let (Some(a), Some(b)) = (self.cpu_at_start, read_cpu_times()) {
            let total = b.total.saturating_sub(a.total);
            if total > 0 {
                let share = |x: u64| 100.0 * x as f64 / total as f64;
                self.cpu_busy_percent = Some(share(b.busy.saturating_sub(a.busy)));
                self.cpu_iowait_percent = Some(share(b.iowait.saturating_sub(a.iowait)));
                self.cpu_steal_percent = Some(share(b.steal.saturating_sub(a.steal)));
            }
        }
    }

    /// The block as text, one `key: value` per line.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "cpu:        {} × {}\n",
            self.cores, self.cpu_model
        ));
        s.push_str(&format!("memory:     {} MiB\n", self.memory_mib));
        s.push_str(&format!("kernel:     {}\n", self.kernel));
        s.push_str(&format!("date:       {}\n", self.date));
        s.push_str(&format!("loadavg:    before {}", self.load_before));
        if let Some(after) = &self.load_after {
            s.push_str(&format!(", after {after}"));
        }
        s.push('\n');
        if let (Some(busy), Some(iowait), Some(steal)) = (
            self.cpu_busy_percent,
            self.cpu_iowait_percent,
            self.cpu_steal_percent,
        ) {
            s.push_str(&format!(
                "cpu time:   {busy:.0} % busy during the run (benchmark included), iowait \
                 {iowait:.1} %, steal {steal:.1} %\n"
            ));
        }
        for c in &self.containerd {
            s.push_str(&format!("{}: {}\n", c.name, c.version));
        }
        let runc_path = self
            .runc
            .path
            .as_deref()
            .map_or_else(|| "not found".to_string(), |p| p.display().to_string());
        s.push_str(&format!(
            "runc:       {} ({})\n",
            self.runc.version, runc_path
        ));
        s
    }
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path).map_or_else(|e| format!("unknown ({e})"), |s| s.trim().to_string())
}

/// The first `model name` and the number of `processor` entries of /proc/cpuinfo.
pub fn parse_cpuinfo(text: &str) -> (String, usize) {
    let mut model = None;
    let mut count = 0;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key.trim() {
            "processor" => count += 1,
            "model name" if model.is_none() => model = Some(value.trim().to_string()),
            _ => {}
        }
    }
    (model.unwrap_or_else(|| "unknown".into()), count)
}

/// Jiffies of all CPUs together, from the `cpu` line of /proc/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub total: u64,
    /// Everything but idle and iowait.
    pub busy: u64,
    pub iowait: u64,
    pub steal: u64,
}

/// Parses the aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq
/// steal ...; guest time is already inside user and nice).
pub fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 8 {
        return None;
    }
    let total: u64 = f.iter().sum();
    Some(CpuTimes {
        total,
        busy: total - f[3] - f[4],
        iowait: f[4],
        steal: f[7],
    })
}

fn read_cpu_times() -> Option<CpuTimes> {
    parse_cpu_times(&fs::read_to_string("/proc/stat").ok()?)
}

/// `MemTotal` of /proc/meminfo, in KiB.
pub fn parse_mem_total_kib(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `name` on the colon-separated `path_env`, with the first line of its `--version`.
fn tool_version(name: &str, path_env: &str) -> ToolVersion {
    // The file itself: /usr/bin/runc is a link to /usr/sbin/runc on Debian 12.
    let path = which(name, path_env).map(|p| fs::canonicalize(&p).unwrap_or(p));
    let version = match &path {
        None => format!("not found on PATH {path_env}"),
        Some(p) => match Command::new(p).arg("--version").output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            Err(e) => format!("cannot run {}: {e}", p.display()),
        },
    };
    ToolVersion {
        name: name.to_string(),
        path,
        version,
    }
}

/// The first file called `name` in a directory of `path_env`.
pub fn which(name: &str, path_env: &str) -> Option<PathBuf> {
    path_env
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of `days` since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_timestamp(1_795_899_661), "2026-11-28 21:01:01 UTC");
    }

    #[test]
    fn cpuinfo_gives_model_and_count() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC\n";
        assert_eq!(parse_cpuinfo(text), ("AMD EPYC".to_string(), 2));
        assert_eq!(parse_cpuinfo(""), ("unknown".to_string(), 0));
    }

    #[test]
    fn cpu_times_from_proc_stat() {
        let text = "cpu  100 5 50 800 20 3 2 10 0 0\ncpu0 50 2 25 400 10 1 1 5 0 0\n";
        assert_eq!(
            parse_cpu_times(text),
            Some(CpuTimes {
                total: 990,
                busy: 170,
                iowait: 20,
                steal: 10
            })
        );
        assert_eq!(parse_cpu_times("cpu  1 2 3\n"), None);
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:       24683520 kB\nMemFree:        21000000 kB\n";
        assert_eq!(parse_mem_total_kib(text), Some(24_683_520));
        assert_eq!(parse_mem_total_kib("MemFree: 1 kB\n"), None);
    }
}

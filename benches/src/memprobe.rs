//! The memory a runtime spends per container, read from /proc.
//!
//! For a container whose init process is `PID`, the runtime side is the shim (the parent of
//! `PID`: runc and the shims reparent a container's init to the shim, a child subreaper) plus
//! every process descending from the shim that is not part of the container, that is, still
//! in the shim's pid namespace and not in the container's cgroup (a helper such as a zygote
//! or a wasm engine worker). Each process's `Pss:` and `Rss:` come from
//! `/proc/PID/smaps_rollup`.
//!
//! RSS counts every page a process maps; PSS divides each page by the number of processes
//! mapping it, so identical shims sharing their binary's text each carry a part of it, and the
//! PSS of one of K shims falls as K grows. A shim serving several containers (runc.v2 can group
//! a pod's containers) is divided between them, so no process is counted twice.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hyperbox_integration::sandbox;
use serde::Serialize;

/// Errors probing a container's processes.
#[derive(Debug, thiserror::Error)]
pub enum MemProbeError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot parse {path}: {what}")]
    Parse { path: PathBuf, what: &'static str },
    #[error(
        "container {container}: its init process {init_pid} has parent {ppid}, not a shim \
         (did the task exit?)"
    )]
    NoShim {
        container: String,
        init_pid: u32,
        ppid: u32,
    },
}

/// The totals of `/proc/PID/smaps_rollup`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SmapsRollup {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// Reads the `Rss:` and `Pss:` lines (not `Pss_Anon:` and the like) of a smaps_rollup text.
pub fn parse_smaps_rollup(text: &str) -> Option<SmapsRollup> {
    let mut rss = None;
    let mut pss = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("Rss:") => &mut rss,
            Some("Pss:") => &mut pss,
            _ => continue,
        };
        let value: u64 = words.next()?.parse().ok()?;
        if words.next() != Some("kB") {
            return None;
        }
        *slot = Some(value);
    }
    Some(SmapsRollup {
        rss_kib: rss?,
        pss_kib: pss?,
    })
}

/// The fields of `/proc/PID/stat` the probe needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub state: char,
    pub ppid: u32,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses, so the fields
/// after it are taken from after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(ProcStat { comm, state, ppid })
}

/// What a runtime-side process is to the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Shim,
    Helper,
}

/// One runtime-side process and its memory.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeProcess {
    pub pid: u32,
    pub role: Role,
    pub comm: String,
    /// The executable (`/proc/PID/exe`).
    pub exe: PathBuf,
    pub cmdline: String,
    pub pss_kib: u64,
    pub rss_kib: u64,
}

/// The runtime side of one container.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerProbe {
    pub container: String,
    pub init_pid: u32,
    pub shim_pid: u32,
    pub processes: Vec<RuntimeProcess>,
}

fn read(path: PathBuf) -> Result<String, MemProbeError> {
    fs::read_to_string(&path).map_err(|source| MemProbeError::Read { path, source })
}

fn stat_of(pid: u32) -> Result<ProcStat, MemProbeError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let text = read(path.clone())?;
    parse_stat(&text).ok_or(MemProbeError::Parse {
        path,
        what: "no `(comm) state ppid`",
    })
}

fn pid_namespace(pid: u32) -> Result<PathBuf, MemProbeError> {
    let path = PathBuf::from(format!("/proc/{pid}/ns/pid"));
    fs::read_link(&path).map_err(|source| MemProbeError::Read { path, source })
}

fn memory_of(pid: u32) -> Result<SmapsRollup, MemProbeError> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps_rollup"));
    let text = read(path.clone())?;
    parse_smaps_rollup(&text).ok_or(MemProbeError::Parse {
        path,
        what: "no `Rss:` and `Pss:` lines in kB",
    })
}

/// Every pid in /proc.
fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Children of every live process, from one scan of /proc.
fn children_map() -> BTreeMap<u32, Vec<u32>> {
    let mut map: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for pid in all_pids() {
        // Processes come and go during the scan: one that vanished is simply not listed.
        if let Ok(stat) = stat_of(pid) {
            map.entry(stat.ppid).or_default().push(pid);
        }
    }
    map
}

/// How many processes outside `probes` run an executable one of the probed processes runs,
/// for example shims of other daemons on the machine. They share the executable's pages, so
/// they lower the probed processes' PSS: a report names them so its PSS can be read right.
pub fn outside_sharers(probes: &[ContainerProbe]) -> usize {
    let probed: BTreeSet<u32> = probes
        .iter()
        .flat_map(|p| p.processes.iter().map(|q| q.pid))
        .collect();
    let exes: BTreeSet<&Path> = probes
        .iter()
        .flat_map(|p| p.processes.iter().map(|q| q.exe.as_path()))
        .filter(|e| !e.as_os_str().is_empty())
        .collect();
    all_pids()
        .into_iter()
        .filter(|pid| !probed.contains(pid))
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| exes.contains(e.as_path()))
        })
        .count()
}

/// Finds the runtime side of the container `container` whose init process is `init_pid`, and
/// reads its memory.
pub fn probe_container(container: &str, init_pid: u32) -> Result<ContainerProbe, MemProbeError> {
    let init = stat_of(init_pid)?;
    let shim_pid = init.ppid;
    if shim_pid <= 1 {
        return Err(MemProbeError::NoShim {
            container: container.to_string(),
            init_pid,
            ppid: shim_pid,
        });
    }
    let shim_ns = pid_namespace(shim_pid)?;
    let init_cgroup = read(PathBuf::from(format!("/proc/{init_pid}/cgroup")))?;
    let children = children_map();

    let mut processes = vec![runtime_process(shim_pid, Role::Shim)?];
    let mut queue: VecDeque<u32> = VecDeque::from([shim_pid]);
    while let Some(parent) = queue.pop_front() {
        for &pid in children.get(&parent).into_iter().flatten() {
            if pid == init_pid {
                continue;
            }
            // A process that exited since the scan is not part of the steady state.
            let Ok(stat) = stat_of(pid) else { continue };
            let Ok(ns) = pid_namespace(pid) else { continue };
            let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            // In the container's pid namespace or cgroup: the container's, not the runtime's.
            if ns != shim_ns || cgroup == init_cgroup || stat.state == 'Z' {
                continue;
            }
            processes.push(runtime_process(pid, Role::Helper)?);
            queue.push_back(pid);
        }
    }
    Ok(ContainerProbe {
        container: container.to_string(),
        init_pid,
        shim_pid,
        processes,
    })
}

fn runtime_process(pid: u32, role: Role) -> Result<RuntimeProcess, MemProbeError> {
    let stat = stat_of(pid)?;
    let mem = memory_of(pid)?;
    Ok(RuntimeProcess {
        pid,
        role,
        comm: stat.comm,
        exe: fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default(),
        cmdline: sandbox::cmdline(pid).unwrap_or_default(),
        pss_kib: mem.pss_kib,
        rss_kib: mem.rss_kib,
    })
}

/// The runtime memory charged to one container.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerMemory {
    pub container: String,
    /// Runtime processes, a process shared by k containers counting 1/k.
    pub processes: f64,
    pub pss_kib: f64,
    pub rss_kib: f64,
}

/// Charges each probe's processes to its container, dividing a process that appears in k
/// probes (a shared shim) by k.
pub fn attribute(probes: &[ContainerProbe]) -> Vec<ContainerMemory> {
    let mut sharers: BTreeMap<u32, usize> = BTreeMap::new();
    for p in probes {
        for proc_ in &p.processes {
            *sharers.entry(proc_.pid).or_default() += 1;
        }
    }
    probes
        .iter()
        .map(|p| {
            let mut m = ContainerMemory {
                container: p.container.clone(),
                processes: 0.0,
                pss_kib: 0.0,
                rss_kib: 0.0,
            };
            for proc_ in &p.processes {
                let k = sharers.get(&proc_.pid).copied().unwrap_or(1).max(1) as f64;
                m.processes += 1.0 / k;
                m.pss_kib += proc_.pss_kib as f64 / k;
                m.rss_kib += proc_.rss_kib as f64 / k;
            }
            m
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLLUP: &str = "\
55d0c1a0e000-7ffd5b5f4000 ---p 00000000 00:00 0                          [rollup]
Rss:               15052 kB
Pss:                9011 kB
Pss_Dirty:          6140 kB
Pss_Anon:           6120 kB
Pss_File:           2891 kB
Pss_Shmem:             0 kB
Shared_Clean:       8860 kB
Shared_Dirty:          0 kB
Private_Clean:        52 kB
Private_Dirty:      6140 kB
Referenced:        15052 kB
Anonymous:          6140 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    #[test]
    fn smaps_rollup_gives_rss_and_pss_not_their_parts() {
        assert_eq!(
            parse_smaps_rollup(ROLLUP),
            Some(SmapsRollup {
                rss_kib: 15052,
                pss_kib: 9011
            })
        );
    }

    #[test]
    fn smaps_rollup_without_totals_is_rejected() {
        // A zombie or kernel thread has an empty rollup.
        assert_eq!(parse_smaps_rollup(""), None);
        assert_eq!(parse_smaps_rollup("Rss: 10 kB\n"), None);
        assert_eq!(parse_smaps_rollup("Rss: 10 kB\nPss: x kB\n"), None);
        assert_eq!(parse_smaps_rollup("Rss: 10 kB\nPss: 5 MB\n"), None);
    }

    #[test]
    fn stat_with_a_tricky_command_name() {
        let text = "4242 (containerd-shim) S 1 4242 17 0 -1 4194560 2 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(ProcStat {
                comm: "containerd-shim".into(),
                state: 'S',
                ppid: 1
            })
        );
        let text = "77 (a) b (c)) R 76 77 0";
        assert_eq!(parse_stat(text).unwrap().comm, "a) b (c)");
        assert_eq!(parse_stat(text).unwrap().ppid, 76);
        assert_eq!(parse_stat("77 (x"), None);
    }

    fn process(pid: u32, role: Role, pss: u64, rss: u64) -> RuntimeProcess {
        RuntimeProcess {
            pid,
            role,
            comm: String::new(),
            exe: PathBuf::new(),
            cmdline: String::new(),
            pss_kib: pss,
            rss_kib: rss,
        }
    }

    #[test]
    fn a_shared_shim_is_divided_between_its_containers() {
        let probe = |c: &str, procs| ContainerProbe {
            container: c.into(),
            init_pid: 0,
            shim_pid: 10,
            processes: procs,
        };
        let probes = vec![
            probe("a", vec![process(10, Role::Shim, 900, 1500)]),
            probe(
                "b",
                vec![
                    process(10, Role::Shim, 900, 1500),
                    process(11, Role::Helper, 100, 200),
                ],
            ),
            probe("c", vec![process(20, Role::Shim, 800, 1400)]),
        ];
        let m = attribute(&probes);
        assert_eq!(
            (m[0].processes, m[0].pss_kib, m[0].rss_kib),
            (0.5, 450.0, 750.0)
        );
        assert_eq!(
            (m[1].processes, m[1].pss_kib, m[1].rss_kib),
            (1.5, 550.0, 950.0)
        );
        assert_eq!(
            (m[2].processes, m[2].pss_kib, m[2].rss_kib),
            (1.0, 800.0, 1400.0)
        );
    }
}

//! A container's cgroup, as the task API sees it: Pause/Resume (freezer), Update (resources
//! on a running task), Stats (encoded as runc's shim encodes them, so `ctr task metrics`,
//! Docker and the kubelet decode them) and the OOM notification behind TaskOOM.
//!
//! Shared by every engine: an engine only says where its container's cgroup is
//! (`Engine::cgroups_path`). cgroup v1 (and hybrid hosts, where the controllers are on v1)
//! give `io.containerd.cgroups.v1.Metrics`; a unified host gives
//! `io.containerd.cgroups.v2.Metrics`. The numbers are read from the cgroup files exactly as
//! containerd's `cgroups` package reads them for runc's shim.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use containerd_shim::protos::cgroups::metrics as v1;
use containerd_shim::protos::cgroups_v2::metrics as v2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, AnyCgroupManager, CgroupConfig, CgroupManager,
    CgroupSetup, ControllerOpt, FreezerState,
};
use libcgroups::v1::ControllerType;

use crate::error::{EngineError, ShimError};

const V1_METRICS: &str = "io.containerd.cgroups.v1.Metrics";
const V2_METRICS: &str = "io.containerd.cgroups.v2.Metrics";
const UNIFIED_ROOT: &str = "/sys/fs/cgroup";
/// `USER_HZ`, the unit of `cpuacct.stat` (100 on every Linux architecture containerd runs on).
const CLOCK_TICKS: u64 = 100;

/// Where a cgroup's files are.
#[derive(Debug, Clone)]
enum Layout {
    /// One directory per v1 controller.
    V1(HashMap<ControllerType, PathBuf>),
    /// The unified hierarchy's directory.
    V2(PathBuf),
}

/// The cgroup of one container.
pub struct ContainerCgroup {
    id: String,
    path: PathBuf,
    layout: Layout,
    manager: AnyCgroupManager,
}

impl std::fmt::Debug for ContainerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCgroup")
            .field("id", &self.id)
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

fn failed(id: &str, what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(format!("cannot {what} the cgroup of container {id}: {e}"))
}

impl ContainerCgroup {
    /// The cgroup at `cgroups_path` (the spec's `linux.cgroupsPath`, cgroupfs form).
    pub fn open(id: &str, cgroups_path: &Path) -> Result<Self, EngineError> {
        let relative = cgroups_path.strip_prefix("/").unwrap_or(cgroups_path);
        let setup = get_cgroup_setup().map_err(|e| failed(id, "find", e))?;
        let layout = match setup {
            CgroupSetup::Unified => Layout::V2(Path::new(UNIFIED_ROOT).join(relative)),
            CgroupSetup::Legacy | CgroupSetup::Hybrid => {
                let mounts = libcgroups::v1::util::list_supported_mount_points()
                    .map_err(|e| failed(id, "find", e))?;
                Layout::V1(
                    mounts
                        .into_iter()
                        .map(|(kind, mount)| (kind, mount.join(relative)))
                        .collect(),
                )
            }
        };
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: cgroups_path.to_path_buf(),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|e| failed(id, "open", e))?;
        Ok(ContainerCgroup {
            id: id.to_string(),
            path: cgroups_path.to_path_buf(),
            layout,
            manager,
        })
    }

    /// Moves `pids` (the shim and its helpers) into cgroup `path` (runc's `shim_cgroup`), as
    /// runc's shim moves itself. As there, the cgroup must exist (whoever asks for it made
    /// it); it is joined in every hierarchy (created where a hierarchy lacks it).
    pub fn join_shim(path: &Path, pids: &[u32]) -> Result<(), ShimError> {
        let failed = |e: &dyn std::error::Error| {
            ShimError::FailedPrecondition(format!(
                "cannot move the shim into cgroup {}: {e}",
                path.display()
            ))
        };
        let relative = path.strip_prefix("/").unwrap_or(path);
        let root = Path::new("/sys/fs/cgroup");
        let exists = root.join(relative).is_dir()
            || fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .any(|h| h.path().join(relative).is_dir());
        if !exists {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot move the shim into cgroup {}: it does not exist (create it first, as \
                 for runc's shim)",
                path.display()
            )));
        }
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: "shim".to_string(),
        })
        .map_err(|e| failed(&e))?;
        for &pid in pids {
            manager
                .add_task(nix::unistd::Pid::from_raw(pid as i32))
                .map_err(|e| failed(&e))?;
        }
        Ok(())
    }

    /// Freezes (`true`) or thaws every process of the cgroup.
    pub fn freeze(&self, frozen: bool) -> Result<(), EngineError> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager
            .freeze(state)
            .map_err(|e| failed(&self.id, if frozen { "freeze" } else { "thaw" }, e))
    }

    /// Whether the cgroup is frozen now.
    pub fn is_frozen(&self) -> bool {
        match &self.layout {
            Layout::V1(dirs) => dirs
                .get(&ControllerType::Freezer)
                .and_then(|d| fs::read_to_string(d.join("freezer.state")).ok())
                .is_some_and(|s| s.trim() == "FROZEN"),
            Layout::V2(dir) => {
                fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
            }
        }
    }

    /// Applies new limits to the running container: containerd sends OCI `LinuxResources`
    /// as JSON. Only what the update sets is written (libcgroups also re-applies the
    /// default device rules every container already has).
    pub fn update(&self, resources_json: &[u8]) -> Result<(), EngineError> {
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| {
            EngineError::InvalidSpec(format!(
                "the resources of the update of container {} are not OCI LinuxResources: {e}",
                self.id
            ))
        })?;
        self.manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| failed(&self.id, "update", e))
    }

    /// The container's metrics, in the type runc's shim answers Stats with.
    pub fn metrics(&self) -> Result<Any, EngineError> {
        let (type_url, value) = match &self.layout {
            Layout::V1(dirs) => (V1_METRICS, v1_metrics(dirs).write_to_bytes()),
            Layout::V2(dir) => (V2_METRICS, v2_metrics(dir).write_to_bytes()),
        };
        Ok(Any {
            type_url: type_url.to_string(),
            value: value.map_err(|e| failed(&self.id, "encode the metrics of", e))?,
            ..Default::default()
        })
    }

    /// Starts watching for OOM kills in the cgroup: `on_oom` runs (on a thread of the
    /// watcher's own) once per OOM event, until the cgroup is removed.
    pub fn watch_oom(&self, on_oom: impl Fn() + Send + 'static) -> Result<(), EngineError> {
        match &self.layout {
            Layout::V1(dirs) => {
                let dir = dirs
                    .get(&ControllerType::Memory)
                    .ok_or_else(|| failed(&self.id, "watch", "no memory controller"))?;
                watch_oom_v1(&self.id, dir, on_oom)
            }
            Layout::V2(dir) => watch_oom_v2(&self.id, dir, on_oom),
        }
    }
}

/// cgroup v1: an eventfd registered for `memory.oom_control` through `cgroup.event_control`.
/// The eventfd also fires when the cgroup is removed, which ends the watch.
fn watch_oom_v1(
    id: &str,
    dir: &Path,
    on_oom: impl Fn() + Send + 'static,
) -> Result<(), EngineError> {
    let control = fs::File::open(dir.join("memory.oom_control"))
        .map_err(|e| failed(id, "watch (memory.oom_control)", e))?;
    // SAFETY: eventfd takes no pointers; the returned fd is checked and owned below.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        return Err(failed(
            id,
            "watch (eventfd)",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `efd` is a new fd nothing else owns.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )
    .map_err(|e| failed(id, "watch (cgroup.event_control)", e))?;
    let event_control = dir.join("cgroup.event_control");
    let name = id.to_string();
    std::thread::Builder::new()
        .name("oom-watch".into())
        .spawn(move || {
            let _control = control;
            let mut efd = fs::File::from(efd);
            let mut buf = [0u8; 8];
            loop {
                if efd.read_exact(&mut buf).is_err() {
                    return;
                }
                // The cgroup went away: that is the last event.
                if !event_control.exists() {
                    return;
                }
                tracing::info!(id = name, "out of memory");
                on_oom();
            }
        })
        .map_err(|e| failed(id, "watch", e))?;
    Ok(())
}

/// cgroup v2: `memory.events`' `oom_kill` count, watched with inotify.
fn watch_oom_v2(
    id: &str,
    dir: &Path,
    on_oom: impl Fn() + Send + 'static,
) -> Result<(), EngineError> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let events = dir.join("memory.events");
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).map_err(|e| failed(id, "watch", e))?;
    inotify
        .add_watch(&events, AddWatchFlags::IN_MODIFY)
        .map_err(|e| failed(id, "watch (memory.events)", e))?;
    let name = id.to_string();
    let kills = move || {
        read_kv(&events)
            .get("oom_kill")
            .copied()
            .unwrap_or_default()
    };
    let mut seen = kills();
    std::thread::Builder::new()
        .name("oom-watch".into())
        .spawn(move || loop {
            let Ok(evs) = inotify.read_events() else {
                return;
            };
            if evs
                .iter()
                .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED))
            {
                return;
            }
            let now = kills();
            if now > seen {
                seen = now;
                tracing::info!(id = name, "out of memory");
                on_oom();
            }
        })
        .map_err(|e| failed(id, "watch", e))?;
    Ok(())
}

fn read_u64(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_default()
}

/// A v1 limit: `max` (pids) reads as 0, as containerd's v1 metrics report it.
fn read_limit(path: &Path) -> u64 {
    read_u64(path)
}

/// A v2 limit: `max` reads as `u64::MAX`, as containerd's v2 metrics report it.
fn read_limit_v2(path: &Path) -> u64 {
    match fs::read_to_string(path) {
        Ok(s) if s.trim() == "max" => u64::MAX,
        Ok(s) => s.trim().parse().unwrap_or_default(),
        Err(_) => 0,
    }
}

/// A pressure file (`cpu.pressure`): `some` and `full` lines of `avg10= avg60= avg300=
/// total=`.
fn read_psi(path: &Path) -> MessageField<v2::PSIStats> {
    let Ok(text) = fs::read_to_string(path) else {
        return MessageField::none();
    };
    let mut stats = v2::PSIStats::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let kind = f.next().unwrap_or_default();
        let mut data = v2::PSIData::new();
        for kv in f {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            match k {
                "avg10" => data.avg10 = v.parse().unwrap_or_default(),
                "avg60" => data.avg60 = v.parse().unwrap_or_default(),
                "avg300" => data.avg300 = v.parse().unwrap_or_default(),
                "total" => data.total = v.parse().unwrap_or_default(),
                _ => {}
            }
        }
        match kind {
            "some" => stats.some = MessageField::some(data),
            "full" => stats.full = MessageField::some(data),
            _ => {}
        }
    }
    MessageField::some(stats)
}

/// `rdma.current` / `rdma.max`: a line per device of `hca_handle=N hca_object=N`.
fn read_rdma(path: &Path) -> Vec<v2::RdmaEntry> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let mut e = v2::RdmaEntry {
                device: f.next()?.to_string(),
                ..Default::default()
            };
            for kv in f {
                let (k, v) = kv.split_once('=')?;
                let n = if v == "max" {
                    u32::MAX
                } else {
                    v.parse().ok()?
                };
                match k {
                    "hca_handle" => e.hca_handles = n,
                    "hca_object" => e.hca_objects = n,
                    _ => {}
                }
            }
            Some(e)
        })
        .collect()
}

/// A flat-keyed file (`memory.stat`, `cpu.stat`, `memory.events`).
fn read_kv(path: &Path) -> HashMap<String, u64> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

fn v1_metrics(dirs: &HashMap<ControllerType, PathBuf>) -> v1::Metrics {
    let mut m = v1::Metrics::new();
    let dir = |k: ControllerType| dirs.get(&k).filter(|d| d.is_dir());
    if let Some(d) = dir(ControllerType::Pids) {
        m.pids = MessageField::some(v1::PidsStat {
            current: read_u64(&d.join("pids.current")),
            limit: read_limit(&d.join("pids.max")),
            ..Default::default()
        });
    }
    let mut cpu = v1::CPUStat::new();
    if let Some(d) = dir(ControllerType::CpuAcct) {
        let stat = read_kv(&d.join("cpuacct.stat"));
        let ns = |ticks: u64| ticks * 1_000_000_000 / CLOCK_TICKS;
        cpu.usage = MessageField::some(v1::CPUUsage {
            total: read_u64(&d.join("cpuacct.usage")),
            kernel: ns(stat.get("system").copied().unwrap_or_default()),
            user: ns(stat.get("user").copied().unwrap_or_default()),
            per_cpu: fs::read_to_string(d.join("cpuacct.usage_percpu"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect(),
            ..Default::default()
        });
    }
    if let Some(d) = dir(ControllerType::Cpu) {
        let stat = read_kv(&d.join("cpu.stat"));
        let get = |k: &str| stat.get(k).copied().unwrap_or_default();
        cpu.throttling = MessageField::some(v1::Throttle {
            periods: get("nr_periods"),
            throttled_periods: get("nr_throttled"),
            throttled_time: get("throttled_time"),
            ..Default::default()
        });
    }
    if cpu.usage.is_some() || cpu.throttling.is_some() {
        m.cpu = MessageField::some(cpu);
    }
    if let Some(d) = dir(ControllerType::Memory) {
        m.memory = MessageField::some(v1_memory(d));
        let oom = read_kv(&d.join("memory.oom_control"));
        let g = |k: &str| oom.get(k).copied().unwrap_or_default();
        m.memory_oom_control = MessageField::some(v1::MemoryOomControl {
            oom_kill_disable: g("oom_kill_disable"),
            under_oom: g("under_oom"),
            oom_kill: g("oom_kill"),
            ..Default::default()
        });
    }
    if let Some(d) = dir(ControllerType::Blkio) {
        m.blkio = MessageField::some(v1_blkio(d));
    }
    if let Some(d) = dir(ControllerType::HugeTlb) {
        m.hugetlb = v1_hugetlb(d);
    }
    m
}

fn v1_memory(d: &Path) -> v1::MemoryStat {
    let s = read_kv(&d.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or_default();
    let entry = |prefix: &str| {
        let f = |name: &str| d.join(format!("{prefix}.{name}"));
        MessageField::some(v1::MemoryEntry {
            limit: read_u64(&f("limit_in_bytes")),
            usage: read_u64(&f("usage_in_bytes")),
            max: read_u64(&f("max_usage_in_bytes")),
            failcnt: read_u64(&f("failcnt")),
            ..Default::default()
        })
    };
    v1::MemoryStat {
        cache: g("cache"),
        rss: g("rss"),
        rss_huge: g("rss_huge"),
        mapped_file: g("mapped_file"),
        dirty: g("dirty"),
        writeback: g("writeback"),
        pg_pg_in: g("pgpgin"),
        pg_pg_out: g("pgpgout"),
        pg_fault: g("pgfault"),
        pg_maj_fault: g("pgmajfault"),
        inactive_anon: g("inactive_anon"),
        active_anon: g("active_anon"),
        inactive_file: g("inactive_file"),
        active_file: g("active_file"),
        unevictable: g("unevictable"),
        hierarchical_memory_limit: g("hierarchical_memory_limit"),
        hierarchical_swap_limit: g("hierarchical_memsw_limit"),
        total_cache: g("total_cache"),
        total_rss: g("total_rss"),
        total_rss_huge: g("total_rss_huge"),
        total_mapped_file: g("total_mapped_file"),
        total_dirty: g("total_dirty"),
        total_writeback: g("total_writeback"),
        total_pg_pg_in: g("total_pgpgin"),
        total_pg_pg_out: g("total_pgpgout"),
        total_pg_fault: g("total_pgfault"),
        total_pg_maj_fault: g("total_pgmajfault"),
        total_inactive_anon: g("total_inactive_anon"),
        total_active_anon: g("total_active_anon"),
        total_inactive_file: g("total_inactive_file"),
        total_active_file: g("total_active_file"),
        total_unevictable: g("total_unevictable"),
        usage: entry("memory"),
        swap: entry("memory.memsw"),
        kernel: entry("memory.kmem"),
        kernel_tcp: entry("memory.kmem.tcp"),
        ..Default::default()
    }
}

/// `blkio.*_recursive` files: `MAJ:MIN [OP] VALUE` lines (and a `Total` line, skipped).
fn v1_blkio(d: &Path) -> v1::BlkIOStat {
    let read = |name: &str| -> Vec<v1::BlkIOEntry> {
        fs::read_to_string(d.join(name))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (dev, op, value) = match f.as_slice() {
                    [dev, op, v] => (*dev, *op, *v),
                    [dev, v] => (*dev, "", *v),
                    _ => return None,
                };
                let (major, minor) = dev.split_once(':')?;
                let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
                Some(v1::BlkIOEntry {
                    op: op.to_string(),
                    device: device_name(major, minor),
                    major,
                    minor,
                    value: value.parse().ok()?,
                    ..Default::default()
                })
            })
            .collect()
    };
    v1::BlkIOStat {
        io_service_bytes_recursive: read("blkio.io_service_bytes_recursive"),
        io_serviced_recursive: read("blkio.io_serviced_recursive"),
        io_queued_recursive: read("blkio.io_queued_recursive"),
        io_service_time_recursive: read("blkio.io_service_time_recursive"),
        io_wait_time_recursive: read("blkio.io_wait_time_recursive"),
        io_merged_recursive: read("blkio.io_merged_recursive"),
        io_time_recursive: read("blkio.time_recursive"),
        sectors_recursive: read("blkio.sectors_recursive"),
        ..Default::default()
    }
}

/// `/dev/NAME` of a block device, as containerd fills `BlkIOEntry.device`.
fn device_name(major: u64, minor: u64) -> String {
    fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(|n| format!("/dev/{n}")))
        })
        .unwrap_or_default()
}

fn v1_hugetlb(d: &Path) -> Vec<v1::HugetlbStat> {
    let mut sizes: Vec<String> = fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let size = name
                .strip_prefix("hugetlb.")?
                .strip_suffix(".usage_in_bytes")?;
            Some(size.to_string())
        })
        .collect();
    sizes.sort();
    sizes
        .into_iter()
        .map(|size| {
            let f = |n: &str| d.join(format!("hugetlb.{size}.{n}"));
            v1::HugetlbStat {
                usage: read_u64(&f("usage_in_bytes")),
                max: read_u64(&f("max_usage_in_bytes")),
                failcnt: read_u64(&f("failcnt")),
                pagesize: size,
                ..Default::default()
            }
        })
        .collect()
}

fn v2_metrics(d: &Path) -> v2::Metrics {
    let mut m = v2::Metrics::new();
    m.pids = MessageField::some(v2::PidsStat {
        current: read_u64(&d.join("pids.current")),
        limit: read_limit_v2(&d.join("pids.max")),
        ..Default::default()
    });
    let c = read_kv(&d.join("cpu.stat"));
    let g = |k: &str| c.get(k).copied().unwrap_or_default();
    m.cpu = MessageField::some(v2::CPUStat {
        usage_usec: g("usage_usec"),
        user_usec: g("user_usec"),
        system_usec: g("system_usec"),
        nr_periods: g("nr_periods"),
        nr_throttled: g("nr_throttled"),
        throttled_usec: g("throttled_usec"),
        nr_bursts: g("nr_bursts"),
        burst_usec: g("burst_usec"),
        psi: read_psi(&d.join("cpu.pressure")),
        ..Default::default()
    });
    let s = read_kv(&d.join("memory.stat"));
    let g = |k: &str| s.get(k).copied().unwrap_or_default();
    m.memory = MessageField::some(v2::MemoryStat {
        anon: g("anon"),
        file: g("file"),
        kernel_stack: g("kernel_stack"),
        slab: g("slab"),
        sock: g("sock"),
        shmem: g("shmem"),
        file_mapped: g("file_mapped"),
        file_dirty: g("file_dirty"),
        file_writeback: g("file_writeback"),
        anon_thp: g("anon_thp"),
        inactive_anon: g("inactive_anon"),
        active_anon: g("active_anon"),
        inactive_file: g("inactive_file"),
        active_file: g("active_file"),
        unevictable: g("unevictable"),
        slab_reclaimable: g("slab_reclaimable"),
        slab_unreclaimable: g("slab_unreclaimable"),
        pgfault: g("pgfault"),
        pgmajfault: g("pgmajfault"),
        workingset_refault: g("workingset_refault"),
        workingset_activate: g("workingset_activate"),
        workingset_nodereclaim: g("workingset_nodereclaim"),
        pgrefill: g("pgrefill"),
        pgscan: g("pgscan"),
        pgsteal: g("pgsteal"),
        pgactivate: g("pgactivate"),
        pgdeactivate: g("pgdeactivate"),
        pglazyfree: g("pglazyfree"),
        pglazyfreed: g("pglazyfreed"),
        thp_fault_alloc: g("thp_fault_alloc"),
        thp_collapse_alloc: g("thp_collapse_alloc"),
        usage: read_u64(&d.join("memory.current")),
        usage_limit: read_limit_v2(&d.join("memory.max")),
        swap_usage: read_u64(&d.join("memory.swap.current")),
        swap_limit: read_limit_v2(&d.join("memory.swap.max")),
        max_usage: read_u64(&d.join("memory.peak")),
        swap_max_usage: read_u64(&d.join("memory.swap.peak")),
        psi: read_psi(&d.join("memory.pressure")),
        ..Default::default()
    });
    let e = read_kv(&d.join("memory.events"));
    let g = |k: &str| e.get(k).copied().unwrap_or_default();
    m.memory_events = MessageField::some(v2::MemoryEvents {
        low: g("low"),
        high: g("high"),
        max: g("max"),
        oom: g("oom"),
        oom_kill: g("oom_kill"),
        oom_group_kill: g("oom_group_kill"),
        ..Default::default()
    });
    let io = fs::read_to_string(d.join("io.stat")).unwrap_or_default();
    let usage = io
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (major, minor) = f.next()?.split_once(':')?;
            let kv: HashMap<&str, u64> = f
                .filter_map(|p| {
                    let (k, v) = p.split_once('=')?;
                    Some((k, v.parse().ok()?))
                })
                .collect();
            let g = |k: &str| kv.get(k).copied().unwrap_or_default();
            Some(v2::IOEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                rbytes: g("rbytes"),
                wbytes: g("wbytes"),
                rios: g("rios"),
                wios: g("wios"),
                ..Default::default()
            })
        })
        .collect();
    m.io = MessageField::some(v2::IOStat {
        usage,
        psi: read_psi(&d.join("io.pressure")),
        ..Default::default()
    });
    m.rdma = MessageField::some(v2::RdmaStat {
        current: read_rdma(&d.join("rdma.current")),
        limit: read_rdma(&d.join("rdma.max")),
        ..Default::default()
    });
    m.hugetlb = v2_hugetlb(d);
    m
}

/// `hugetlb.SIZE.current` / `.max` / `.events` (its `max` count is the failure count).
fn v2_hugetlb(d: &Path) -> Vec<v2::HugeTlbStat> {
    let mut sizes: Vec<String> = fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let size = name.strip_prefix("hugetlb.")?.strip_suffix(".current")?;
            // `hugetlb.2MB.rsvd.current` is the reservation counter, not a page size.
            (!size.contains('.')).then(|| size.to_string())
        })
        .collect();
    sizes.sort();
    sizes
        .into_iter()
        .map(|size| {
            let f = |n: &str| d.join(format!("hugetlb.{size}.{n}"));
            v2::HugeTlbStat {
                current: read_u64(&f("current")),
                max: read_limit_v2(&f("max")),
                failcnt: read_kv(&f("events"))
                    .get("max")
                    .copied()
                    .unwrap_or_default(),
                pagesize: size,
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shim-core-cg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn v1_files_decode_as_containerd_reads_them() {
        let d = dir("v1");
        let (cpu, acct, mem, pids, blk) = (
            d.join("cpu"),
            d.join("cpuacct"),
            d.join("memory"),
            d.join("pids"),
            d.join("blkio"),
        );
        for x in [&cpu, &acct, &mem, &pids, &blk] {
            fs::create_dir_all(x).unwrap();
        }
        fs::write(pids.join("pids.current"), "3\n").unwrap();
        fs::write(pids.join("pids.max"), "max\n").unwrap();
        fs::write(acct.join("cpuacct.usage"), "123456789\n").unwrap();
        fs::write(acct.join("cpuacct.stat"), "user 7\nsystem 3\n").unwrap();
        fs::write(acct.join("cpuacct.usage_percpu"), "100 200 \n").unwrap();
        fs::write(
            cpu.join("cpu.stat"),
            "nr_periods 4\nnr_throttled 1\nthrottled_time 99\n",
        )
        .unwrap();
        fs::write(
            mem.join("memory.stat"),
            "cache 10\nrss 20\ntotal_rss 30\npgmajfault 2\n",
        )
        .unwrap();
        fs::write(mem.join("memory.usage_in_bytes"), "4096\n").unwrap();
        fs::write(mem.join("memory.limit_in_bytes"), "67108864\n").unwrap();
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        )
        .unwrap();
        fs::write(
            blk.join("blkio.io_service_bytes_recursive"),
            "8:0 Read 512\n8:0 Write 1024\nTotal 1536\n",
        )
        .unwrap();
        let dirs = HashMap::from([
            (ControllerType::Cpu, cpu),
            (ControllerType::CpuAcct, acct),
            (ControllerType::Memory, mem),
            (ControllerType::Pids, pids),
            (ControllerType::Blkio, blk),
        ]);
        let m = v1_metrics(&dirs);
        assert_eq!((m.pids.current, m.pids.limit), (3, 0));
        let usage = m.cpu.usage.as_ref().unwrap();
        assert_eq!(usage.total, 123456789);
        assert_eq!(usage.user, 70_000_000);
        assert_eq!(usage.kernel, 30_000_000);
        assert_eq!(usage.per_cpu, vec![100, 200]);
        assert_eq!(m.cpu.throttling.throttled_time, 99);
        assert_eq!(
            (m.memory.cache, m.memory.rss, m.memory.total_rss),
            (10, 20, 30)
        );
        assert_eq!(m.memory.pg_maj_fault, 2);
        assert_eq!(m.memory.usage.usage, 4096);
        assert_eq!(m.memory.usage.limit, 64 << 20);
        assert_eq!(m.memory_oom_control.oom_kill, 3);
        let io = &m.blkio.io_service_bytes_recursive;
        assert_eq!(io.len(), 2);
        assert_eq!(
            (io[1].op.as_str(), io[1].major, io[1].value),
            ("Write", 8, 1024)
        );
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn v2_files_decode_as_containerd_reads_them() {
        let d = dir("v2");
        fs::write(d.join("pids.current"), "2\n").unwrap();
        fs::write(d.join("pids.max"), "50\n").unwrap();
        fs::write(
            d.join("cpu.stat"),
            "usage_usec 500\nuser_usec 300\nsystem_usec 200\n",
        )
        .unwrap();
        fs::write(d.join("memory.stat"), "anon 4096\nfile 8192\n").unwrap();
        fs::write(d.join("memory.current"), "12288\n").unwrap();
        fs::write(d.join("memory.max"), "max\n").unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        fs::write(
            d.join("io.stat"),
            "8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n",
        )
        .unwrap();
        fs::write(
            d.join("cpu.pressure"),
            "some avg10=1.50 avg60=0.00 avg300=0.00 total=7\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=42\n",
        )
        .unwrap();
        fs::write(d.join("hugetlb.2MB.current"), "4096\n").unwrap();
        fs::write(d.join("hugetlb.2MB.max"), "max\n").unwrap();
        fs::write(d.join("hugetlb.2MB.events"), "max 2\n").unwrap();
        fs::write(d.join("hugetlb.2MB.rsvd.current"), "0\n").unwrap();
        let m = v2_metrics(&d);
        assert_eq!((m.pids.current, m.pids.limit), (2, 50));
        assert_eq!(
            (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec),
            (500, 300, 200)
        );
        assert_eq!(
            (m.memory.anon, m.memory.file, m.memory.usage),
            (4096, 8192, 12288)
        );
        assert_eq!(m.memory.usage_limit, u64::MAX);
        assert_eq!(m.cpu.psi.some.avg10, 1.5);
        assert_eq!(m.cpu.psi.full.total, 42);
        assert_eq!(m.hugetlb.len(), 1);
        assert_eq!(
            (
                m.hugetlb[0].pagesize.as_str(),
                m.hugetlb[0].current,
                m.hugetlb[0].max
            ),
            ("2MB", 4096, u64::MAX)
        );
        assert_eq!(m.hugetlb[0].failcnt, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!((m.io.usage[0].rbytes, m.io.usage[0].wios), (10, 2));
        fs::remove_dir_all(d).unwrap();
    }
}

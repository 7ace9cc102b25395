//! Checkpoint and restore of a container's process tree with CRIU (`criu.rs`), in the zygote.
//!
//! Dump: the container's init and its descendants, as runc does it: the rootfs is CRIU's root,
//! bind mounts (and on cgroup v1 the host's cgroup hierarchies) are external mounts, the
//! cgroup is frozen through its freezer (a container containerd paused stays paused), and
//! the init's standard streams, which come from outside the container (FIFOs, `/dev/null`,
//! the shim's stdin pipe), are external files. Their keys are kept beside the images
//! (`hyperbox-checkpoint.json`) with the options the dump used.
//!
//! Restore: into a new container's rootfs, cgroup and stdio. CRIU creates the namespaces the
//! images hold (or joins those the spec names by path), re-roots the cgroups onto the new
//! container's, and opens the new streams in place of the external ones (`inherit_fd`). The
//! restored init is CRIU's child; CRIU exits once it answers, so the init is reparented to the
//! shim (the child subreaper), which reaps it like any init. libcontainer's state is then
//! written for it, so exec, signals, pids and delete work as for a created container.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use hyperbox_shim_core::{CheckpointSpec, EngineError, RestoreSpec};
use libcgroups::common::{
    create_cgroup_manager, get_cgroup_setup, CgroupConfig, CgroupManager, CgroupSetup,
    ControllerOpt,
};
use libcgroups::v1::ControllerType;
use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rust_criu::rust_criu_protobuf::rpc;
use serde::{Deserialize, Serialize};

use crate::criu::{self, Criu};

/// What a dump records beside CRIU's images for the restore.
const METADATA: &str = "hyperbox-checkpoint.json";
const DUMP_LOG: &str = "dump.log";
const RESTORE_LOG: &str = "restore.log";
/// Where the rootfs is bound for CRIU during a restore, in the container's state directory.
const CRIU_ROOT: &str = "criu-root";
/// The external name of masked directories in a dump. CRIU would otherwise archive each as
/// a tmpfs and extract it on restore, running `tar` twice for an empty directory; a restore
/// binds one empty read-only tmpfs of its own there instead (see [`FreshTmpfs`]).
const MASKED_DIR: &str = "hyperbox-masked-dir";
/// Where a restore mounts that tmpfs, in the container's state directory.
const MASKED_MOUNT: &str = "masked";
/// The external name of an empty tmpfs mount of the spec (`/dev/shm`, `/run`) in a dump of a
/// frozen container, followed by its destination: CRIU would archive and extract it with
/// `tar`; a restore mounts a new one, as the new spec says, for CRIU to bind there.
const EMPTY_TMPFS: &str = "hyperbox-empty-tmpfs:";
/// CRIU's log level: 4 is what runc uses (debug).
const LOG_LEVEL: i32 = 4;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Metadata {
    /// Each standard stream of the init (0, 1, 2) that came from outside the container.
    stdio: [Option<Stream>; 3],
    shell_job: bool,
    tcp_established: bool,
    ext_unix_sk: bool,
    file_locks: bool,
    empty_ns: u32,
    /// In a record left where containerd asked for the images while they went elsewhere: the
    /// directory that holds them.
    #[serde(default)]
    images_at: Option<PathBuf>,
    /// When the dump was taken (ns since the epoch): no two records are alike, which
    /// containerd needs of what it stores.
    #[serde(default)]
    dumped_at_ns: u64,
    /// The masked directories (empty read-only tmpfs mounts) were dumped as external mounts
    /// named [`MASKED_DIR`], not as tmpfs contents.
    #[serde(default)]
    masked_dirs: bool,
    /// tmpfs mounts of the spec that were empty, dumped as external mounts named
    /// `EMPTY_TMPFS` + destination; a restore binds a new tmpfs of the new spec there.
    #[serde(default)]
    empty_tmpfs: Vec<String>,
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(e.to_string())
}

pub(crate) fn load_spec(bundle: &Path) -> Result<Spec, EngineError> {
    let path = bundle.join("config.json");
    Spec::load(&path)
        .map_err(|e| EngineError::InvalidSpec(format!("cannot read {}: {e}", path.display())))
}

fn rootfs_of(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    bundle.join(root)
}

fn open_dir(path: &Path, create: bool) -> Result<fs::File, EngineError> {
    if create {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| failed(format!("cannot create {}: {e}", path.display())))?;
    }
    fs::File::open(path).map_err(|e| failed(format!("cannot open {}: {e}", path.display())))
}

fn cg_mode(mode: Option<&str>) -> Result<Option<rpc::Criu_cg_mode>, EngineError> {
    Ok(match mode {
        None => None,
        Some("soft") => Some(rpc::Criu_cg_mode::SOFT),
        Some("full") => Some(rpc::Criu_cg_mode::FULL),
        Some("strict") => Some(rpc::Criu_cg_mode::STRICT),
        Some("ignore") => Some(rpc::Criu_cg_mode::IGNORE),
        Some(other) => {
            return Err(EngineError::InvalidSpec(format!(
                "unknown CRIU cgroup mode {other:?}"
            )))
        }
    })
}

fn empty_ns(names: &[String]) -> Result<u32, EngineError> {
    let mut mask = 0;
    for n in names {
        match n.as_str() {
            "network" => mask |= libc::CLONE_NEWNET as u32,
            other => {
                return Err(EngineError::InvalidSpec(format!(
                    "CRIU cannot create the {other} namespace empty (only network)"
                )))
            }
        }
    }
    Ok(mask)
}

fn ext_mount(key: &str, val: &str) -> rpc::Ext_mount_map {
    let mut m = rpc::Ext_mount_map::new();
    m.set_key(key.to_string());
    m.set_val(val.to_string());
    m
}

/// The host's cgroup v1 hierarchies, which libcontainer bind-mounts into a container whose
/// spec mounts `cgroup`: external mounts for CRIU, under the same path on both sides.
fn v1_cgroup_mounts(spec: &Spec) -> Result<Vec<String>, EngineError> {
    let wants = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.typ().as_deref() == Some("cgroup"));
    if !wants || matches!(get_cgroup_setup().map_err(failed)?, CgroupSetup::Unified) {
        return Ok(Vec::new());
    }
    let points = libcgroups::v1::util::list_subsystem_mount_points().map_err(failed)?;
    Ok(points
        .into_iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect())
}

fn bind_mounts(spec: &Spec) -> Vec<(String, String)> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| libcontainer::rootfs::utils::is_bind(m))
        .map(|m| {
            (
                m.destination().to_string_lossy().into_owned(),
                m.source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn masked_paths(spec: &Spec) -> Vec<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
}

/// The freezer directory of a container's cgroup (`cgroup_path` as libcontainer applied it).
fn freezer_dir(cgroup_path: &Path) -> Result<PathBuf, EngineError> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    match get_cgroup_setup().map_err(failed)? {
        CgroupSetup::Unified => Ok(Path::new("/sys/fs/cgroup").join(relative)),
        _ => Ok(
            libcgroups::v1::util::get_subsystem_mount_point(&ControllerType::Freezer)
                .map_err(failed)?
                .join(relative),
        ),
    }
}

/// Whether the freezer cgroup at `dir` is frozen (v1 `freezer.state`, v2 `cgroup.freeze`).
fn is_frozen(dir: &Path) -> bool {
    let v1 = fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN");
    v1 || fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
}

/// The destinations of the spec's tmpfs mounts (but `/dev`, which holds the device nodes)
/// that are empty mount points in the container whose init is `pid`.
fn empty_tmpfs_mounts(spec: &Spec, pid: i32) -> Vec<String> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| m.typ().as_deref() == Some("tmpfs") && m.destination() != Path::new("/dev"))
        .filter_map(|m| {
            let dest = m.destination().to_string_lossy().into_owned();
            let inside = PathBuf::from(format!("/proc/{pid}/root{dest}"));
            let dev = fs::metadata(&inside).ok().filter(|i| i.is_dir())?.dev();
            let parent = fs::metadata(inside.parent()?).ok()?.dev();
            let empty = fs::read_dir(&inside).ok()?.next().is_none();
            (dev != parent && empty).then_some(dest)
        })
        .collect()
}

/// A standard stream from outside the container, as CRIU knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stream {
    /// `pipe:[INODE]`, or `file[MNT_ID:INODE]` for a file (CRIU's external file).
    key: String,
    /// The host's `/dev/null` (no stream given): restored as `/dev/null`, since CRIU cannot
    /// put a pipe or FIFO in the place of a device file (it restores the file position).
    null: bool,
}

/// Fd `n` of `pid` when it comes from outside the container: a pipe by its inode, a file by
/// its mount id and inode (an external file). `None` for a socket or a terminal, which CRIU
/// handles itself or refuses.
fn stdio_stream(pid: i32, n: u32) -> Option<Stream> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{n}")).ok()?;
    let link = link.to_string_lossy();
    if link.starts_with("pipe:") {
        return Some(Stream {
            key: link.into_owned(),
            null: false,
        });
    }
    if !link.starts_with('/') || link.starts_with("/dev/pts/") {
        return None;
    }
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
    let mnt_id: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))?
        .trim()
        .parse()
        .ok()?;
    let ino = fs::metadata(format!("/proc/{pid}/fd/{n}")).ok()?.ino();
    Some(Stream {
        key: format!("file[{mnt_id:x}:{ino:x}]"),
        null: link == "/dev/null",
    })
}

/// What CRIU said of a failure: the errors of its log, else its answer.
fn describe(refused: &criu::Refused, log: &Path) -> String {
    let errors = criu::log_errors(log, 3);
    if !errors.is_empty() {
        return format!("criu failed: {}", errors.join(" / "));
    }
    let mut text = format!("criu failed (errno {})", refused.errno);
    if !refused.message.is_empty() {
        text.push_str(": ");
        text.push_str(refused.message.trim());
    }
    text
}

/// Checkpoints container `c` (whose bundle is `bundle`) as `spec` says.
pub fn dump(c: &Container, bundle: &Path, spec: &CheckpointSpec) -> Result<(), EngineError> {
    let id = c.id().to_string();
    let criu = Criu::get()?.with_timeout(spec.timeout);
    let pid = c
        .pid()
        .ok_or_else(|| EngineError::NotFound(format!("container {id} has no init pid")))?
        .as_raw();
    let oci = load_spec(bundle)?;
    let cgroup_path = c
        .spec()
        .map_err(|e| failed(format!("cannot read the config of container {id}: {e}")))?
        .cgroup_path;

    let images = open_dir(&spec.image_dir, true)?;
    // CRIU's log outlives a failed dump: in the work directory asked for, else in the bundle
    // (removed with the task).
    let work_path = spec
        .work_dir
        .clone()
        .unwrap_or_else(|| bundle.join("criu-work"));
    let work = open_dir(&work_path, true)?;
    let log = work_path.join(DUMP_LOG);
    let _ = fs::remove_file(&log);

    let mut meta = Metadata {
        shell_job: spec.terminal,
        tcp_established: spec.open_tcp,
        ext_unix_sk: spec.external_unix_sockets,
        file_locks: spec.file_locks,
        empty_ns: empty_ns(&spec.empty_namespaces)?,
        ..Default::default()
    };
    let mut opts = rpc::Criu_opts::new();
    opts.set_images_dir_fd(images.as_raw_fd());
    opts.set_work_dir_fd(work.as_raw_fd());
    opts.set_log_file(DUMP_LOG.into());
    opts.set_log_level(LOG_LEVEL);
    opts.set_pid(pid);
    opts.set_root(rootfs_of(bundle, &oci).to_string_lossy().into_owned());
    opts.set_manage_cgroups(true);
    if let Some(mode) = cg_mode(spec.cgroups_mode.as_deref())? {
        opts.set_manage_cgroups_mode(mode);
    }
    opts.set_freeze_cgroup(freezer_dir(&cgroup_path)?.to_string_lossy().into_owned());
    opts.set_leave_running(!spec.exit);
    opts.set_shell_job(meta.shell_job);
    opts.set_tcp_established(meta.tcp_established);
    opts.set_ext_unix_sk(meta.ext_unix_sk);
    opts.set_file_locks(meta.file_locks);
    opts.set_orphan_pts_master(true);
    skip_network_lock(&mut opts, meta.tcp_established);
    opts.set_tcp_skip_in_flight(spec.skip_in_flight);
    if meta.empty_ns != 0 {
        opts.set_empty_ns(meta.empty_ns);
    }
    for (dest, _) in bind_mounts(&oci) {
        opts.ext_mnt.push(ext_mount(&dest, &dest));
    }
    for point in v1_cgroup_mounts(&oci)? {
        opts.ext_mnt.push(ext_mount(&point, &point));
    }
    for path in masked_paths(&oci) {
        let inside = PathBuf::from(format!("/proc/{pid}/root{path}"));
        let Ok(info) = fs::metadata(&inside) else {
            continue;
        };
        if !info.is_dir() {
            opts.ext_mnt.push(ext_mount(&path, "/dev/null"));
            continue;
        }
        // A directory masked with a tmpfs of its own (a mount point: another device than
        // its parent's).
        let parent_dev = inside
            .parent()
            .and_then(|p| fs::metadata(p).ok())
            .map(|m| m.dev());
        if parent_dev.is_some_and(|d| d != info.dev()) {
            opts.ext_mnt.push(ext_mount(&path, MASKED_DIR));
            meta.masked_dirs = true;
        }
    }
    // Frozen, nothing can write to an empty tmpfs before CRIU has seen it.
    if is_frozen(&freezer_dir(&cgroup_path)?) {
        for dest in empty_tmpfs_mounts(&oci, pid) {
            opts.ext_mnt
                .push(ext_mount(&dest, &format!("{EMPTY_TMPFS}{dest}")));
            meta.empty_tmpfs.push(dest);
        }
    }
    for ns in [LinuxNamespaceType::Network, LinuxNamespaceType::Pid] {
        if let Some(path) = namespace_path(&oci, ns) {
            let ino = fs::metadata(&path)
                .map_err(|e| failed(format!("cannot stat namespace {}: {e}", path.display())))?
                .ino();
            opts.external
                .push(format!("{}[{ino}]:{}", ns_name(ns), ns_key(ns)));
        }
    }
    for n in 0..3u32 {
        let stream = stdio_stream(pid, n);
        if let Some(s) = stream.as_ref().filter(|s| s.key.starts_with("file[")) {
            if !opts.external.contains(&s.key) {
                opts.external.push(s.key.clone());
            }
        }
        meta.stdio[n as usize] = stream;
    }
    let meta_path = spec.image_dir.join(METADATA);
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap_or_default())
        .map_err(|e| failed(format!("cannot write {}: {e}", meta_path.display())))?;

    let mut req = rpc::Criu_req::new();
    req.set_type(rpc::Criu_req_type::DUMP);
    req.opts = protobuf::MessageField::some(opts);
    match criu.call(&mut req, &[], |_, _| Ok(()))? {
        Ok(_) => {
            if spec.work_dir.is_none() {
                let _ = fs::remove_dir_all(&work_path);
            }
            if let Some(dir) = spec.record_dir.as_ref().filter(|d| **d != spec.image_dir) {
                let record = Metadata {
                    images_at: Some(spec.image_dir.clone()),
                    dumped_at_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                    ..meta
                };
                let path = dir.join(METADATA);
                fs::create_dir_all(dir)
                    .and_then(|()| {
                        fs::write(&path, serde_json::to_vec(&record).unwrap_or_default())
                    })
                    .map_err(|e| failed(format!("cannot write {}: {e}", path.display())))?;
            }
            tracing::info!(id, pid, "dumped");
            Ok(())
        }
        Err(refused) => Err(EngineError::Failed(format!(
            "cannot checkpoint container {id}: {}; the container runs on; CRIU's log: {}",
            describe(&refused, &log),
            log.display()
        ))),
    }
}

/// CRIU locks the container's network (iptables rules in its namespace, two tools run to
/// add them and two to remove them) so that no TCP peer sees a connection being dumped or
/// restored. Without established connections there is nothing to protect: the lock is
/// skipped, which takes tens of milliseconds off each dump and restore.
fn skip_network_lock(opts: &mut rpc::Criu_opts, tcp_established: bool) {
    if !tcp_established {
        opts.set_network_lock(rpc::Criu_network_lock_method::SKIP);
    }
}

fn namespace_path(spec: &Spec, t: LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == t)?
        .path()
        .clone()
}

/// Whether the spec gives the container a namespace of type `t` (new or joined).
fn namespace_in(spec: &Spec, t: LinuxNamespaceType) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == t))
}

fn ns_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
    }
}

/// runc's key for an external namespace: `extRootNetNS`, `extRootPidNS`.
fn ns_key(t: LinuxNamespaceType) -> String {
    rust_criu::criu_ns_to_key(ns_name(t))
}

/// The standard streams of a restored init: the new container's, in fd order; `None` puts
/// `/dev/null` in place of an external stream. With a console socket, the restored init's
/// terminal (a new one, which CRIU makes for the checkpointed one) is handed to it, as
/// runc's restore does.
#[derive(Debug, Default)]
pub struct RestoreStdio {
    pub streams: [Option<OwnedFd>; 3],
    pub console_socket: Option<PathBuf>,
}

/// What a restore leaves to undo if a later step fails.
struct Undo<'a> {
    state_dir: &'a Path,
    cgroup: Option<libcgroups::common::AnyCgroupManager>,
    armed: bool,
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(m) = self.cgroup.take() {
            if let Err(e) = m.remove() {
                tracing::warn!("cannot remove the cgroup of a failed restore: {e}");
            }
        }
        // Entry by entry, never recursively: CRIU's root below it is a bind of the rootfs,
        // should its unmount have failed.
        for entry in ["state.json", "youki_config.json"] {
            let _ = fs::remove_file(self.state_dir.join(entry));
        }
        let _ = fs::remove_dir(self.state_dir.join(CRIU_ROOT));
        let _ = fs::remove_dir(self.state_dir);
    }
}

/// A new tmpfs, mounted for CRIU to bind into a restored container in place of an external
/// mount (its masked directories: read-only in the superblock, so that no bind of it is
/// writable; its empty tmpfs mounts, as the spec mounts them), and unmounted when dropped:
/// the container keeps its binds.
struct FreshTmpfs {
    path: PathBuf,
}

impl FreshTmpfs {
    fn mount(path: &Path, flags: MsFlags, data: &str) -> Result<FreshTmpfs, EngineError> {
        fs::create_dir(path)
            .map_err(|e| failed(format!("cannot create {}: {e}", path.display())))?;
        let data = (!data.is_empty()).then_some(data);
        if let Err(e) = mount(Some("tmpfs"), path, Some("tmpfs"), flags, data) {
            let _ = fs::remove_dir(path);
            return Err(failed(format!(
                "cannot mount a tmpfs at {}: {e}",
                path.display()
            )));
        }
        Ok(FreshTmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for FreshTmpfs {
    fn drop(&mut self) {
        let _ = umount2(&self.path, MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(&self.path);
    }
}

fn read_metadata(id: &str, dir: &Path) -> Result<Metadata, EngineError> {
    let path = dir.join(METADATA);
    fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| {
            EngineError::InvalidSpec(format!(
                "cannot restore container {id}: {} is not a checkpoint of this shim: cannot \
                 read {}: {e}",
                dir.display(),
                path.display()
            ))
        })
}

/// Restores container `id` from `from` into its bundle (rootfs mounted by now); its state goes
/// to `state_dir`. Returns the restored init's pid.
pub fn restore(
    id: &str,
    bundle: &Path,
    state_dir: &Path,
    from: &RestoreSpec,
    stdio: RestoreStdio,
) -> Result<u32, EngineError> {
    let criu = Criu::get()?.with_timeout(from.timeout);
    let oci = load_spec(bundle)?;
    let mut meta = read_metadata(id, &from.image_dir)?;
    // A record of a checkpoint whose images went elsewhere (containerd's copy of it).
    let mut image_dir = from.image_dir.clone();
    if let Some(at) = meta.images_at.clone() {
        meta = read_metadata(id, &at)?;
        image_dir = at;
    }
    let from = &RestoreSpec {
        image_dir,
        work_dir: from.work_dir.clone(),
        timeout: from.timeout,
        lazy: from.lazy,
    };
    let images = open_dir(&from.image_dir, false)?;
    if state_dir.exists() {
        return Err(EngineError::InvalidSpec(format!(
            "cannot restore container {id}: its state {} exists",
            state_dir.display()
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(state_dir)
        .map_err(|e| failed(format!("cannot create {}: {e}", state_dir.display())))?;
    let mut undo = Undo {
        state_dir,
        cgroup: None,
        armed: true,
    };
    // CRIU's log goes with the images unless a work directory is named, as under runc: the
    // bundle of a failed restore is removed by containerd.
    let work_path = from
        .work_dir
        .clone()
        .unwrap_or_else(|| from.image_dir.clone());
    let work = open_dir(&work_path, from.work_dir.is_some())?;
    let log = work_path.join(RESTORE_LOG);
    let _ = fs::remove_file(&log);

    let rootfs = rootfs_of(bundle, &oci);
    prepare_mountpoints(&oci, &rootfs);
    // CRIU's root must be a mount point whose parent is not overmounted: a bind of the rootfs.
    // The tmpfs mounts CRIU binds in place of external ones: dropped (unmounted here) once it
    // is done, the container keeping its binds.
    let mut fresh: Vec<(String, FreshTmpfs)> = Vec::new();
    if meta.masked_dirs {
        let flags =
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        let dir = FreshTmpfs::mount(&state_dir.join(MASKED_MOUNT), flags, "size=4k,mode=0555")?;
        fresh.push((MASKED_DIR.to_string(), dir));
    }
    for (i, dest) in meta.empty_tmpfs.iter().enumerate() {
        let m = oci
            .mounts()
            .iter()
            .flatten()
            .find(|m| m.destination() == Path::new(dest) && m.typ().as_deref() == Some("tmpfs"))
            .ok_or_else(|| {
                EngineError::InvalidSpec(format!(
                    "cannot restore container {id}: the checkpoint has a tmpfs at {dest}, its \
                     spec has none"
                ))
            })?;
        let (flags, data) = crate::rootfs::parse_options(&m.options().clone().unwrap_or_default());
        let dir = FreshTmpfs::mount(&state_dir.join(format!("tmpfs-{i}")), flags, &data)?;
        fresh.push((format!("{EMPTY_TMPFS}{dest}"), dir));
    }
    let criu_root = state_dir.join(CRIU_ROOT);
    fs::create_dir(&criu_root)
        .map_err(|e| failed(format!("cannot create {}: {e}", criu_root.display())))?;
    mount(
        Some(&rootfs),
        &criu_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| failed(format!("cannot bind {} for CRIU: {e}", rootfs.display())))?;
    // Lazily: the daemon that serves the memory listens in the work directory before CRIU
    // restores, and CRIU's restore leaves the pages to it.
    // A restore that fails leaves no daemon waiting for it.
    let mut daemon = None;
    let restored = if from.lazy {
        criu.start_lazy_pages(&from.image_dir, &work_path)
            .map(|pid| daemon = Some(pid))
    } else {
        Ok(())
    }
    .and_then(|()| {
        run_restore(
            id, &criu, &oci, &meta, &images, &work, &criu_root, &fresh, stdio, from.lazy, &mut undo,
        )
    });
    if let (Some(pid), Err(_) | Ok(Err(_))) = (daemon, &restored) {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    drop(fresh);
    let _ = umount2(&criu_root, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&criu_root);
    let pid = match restored? {
        Ok(pid) => pid,
        Err(refused) => {
            return Err(EngineError::Failed(format!(
                "cannot restore container {id} from {}: {}; CRIU's log: {}",
                from.image_dir.display(),
                describe(&refused, &log),
                log.display()
            )));
        }
    };
    // libcontainer's state, as if it had created the container: exec, kill, pids and delete
    // find the init and the cgroup through it.
    let mut c = Container::new(id, ContainerStatus::Running, Some(pid), bundle, state_dir)
        .map_err(|e| failed(format!("cannot record container {id}: {e}")))?;
    c.set_systemd(false);
    c.set_creator(nix::unistd::geteuid().as_raw());
    c.save()
        .map_err(|e| failed(format!("cannot save container {id}: {e}")))?;
    YoukiConfig::from_spec(&oci, id)
        .and_then(|config| config.save(state_dir))
        .map_err(|e| failed(format!("cannot save the config of container {id}: {e}")))?;
    undo.armed = false;
    tracing::info!(id, pid, "restored");
    Ok(pid as u32)
}

#[allow(clippy::too_many_arguments)]
fn run_restore(
    id: &str,
    criu: &Criu,
    oci: &Spec,
    meta: &Metadata,
    images: &fs::File,
    work: &fs::File,
    criu_root: &Path,
    fresh: &[(String, FreshTmpfs)],
    stdio: RestoreStdio,
    lazy: bool,
    undo: &mut Undo<'_>,
) -> Result<Result<i32, criu::Refused>, EngineError> {
    let mut opts = rpc::Criu_opts::new();
    opts.set_lazy_pages(lazy);
    opts.set_images_dir_fd(images.as_raw_fd());
    opts.set_work_dir_fd(work.as_raw_fd());
    opts.set_log_file(RESTORE_LOG.into());
    opts.set_log_level(LOG_LEVEL);
    opts.set_root(criu_root.to_string_lossy().into_owned());
    opts.set_evasive_devices(true);
    // A checkpointed terminal's master was the shim's, outside the images: CRIU makes a new
    // pair and sends its master, which goes to the console socket.
    let console_socket = stdio.console_socket.clone();
    opts.set_orphan_pts_master(console_socket.is_some());
    // CRIU sends that master only as a notification.
    opts.set_notify_scripts(console_socket.is_some());
    // CRIU runs in the container's cgroup (see `started` below), so the restored processes,
    // its children, are born there. CRIU's own cgroup restore (a yard of every hierarchy
    // mounted, the images' cgroups re-rooted under the new one) is needed only to give them a
    // cgroup namespace rooted there: without one in the spec it is skipped, which takes a
    // mount per hierarchy off each restore.
    let manage_cgroups = namespace_in(oci, LinuxNamespaceType::Cgroup);
    opts.set_manage_cgroups(manage_cgroups);
    opts.set_shell_job(meta.shell_job);
    opts.set_tcp_established(meta.tcp_established);
    opts.set_ext_unix_sk(meta.ext_unix_sk);
    opts.set_file_locks(meta.file_locks);
    skip_network_lock(&mut opts, meta.tcp_established);
    if meta.empty_ns != 0 {
        opts.set_empty_ns(meta.empty_ns);
    }
    for (dest, source) in bind_mounts(oci) {
        opts.ext_mnt.push(ext_mount(&dest, &source));
    }
    for point in v1_cgroup_mounts(oci)? {
        opts.ext_mnt.push(ext_mount(&point, &point));
    }
    if !masked_paths(oci).is_empty() {
        opts.ext_mnt.push(ext_mount("/dev/null", "/dev/null"));
    }
    for (key, dir) in fresh {
        opts.ext_mnt
            .push(ext_mount(key, &dir.path.to_string_lossy()));
    }

    // The fds CRIU inherits: the streams at 0-2 (where the images have external ones), then
    // namespaces to take as they are, from 4 on (3 is CRIU's socket).
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| failed(format!("cannot open /dev/null: {e}")))?;
    // Streams that shared one file in the container (stdout and stderr on one pipe, or all
    // three on /dev/null) come back as one file: the new stream of the first of them.
    let mut held: Vec<(RawFd, OwnedFd)> = Vec::new();
    let mut streams = stdio.streams;
    for (n, stream) in meta.stdio.iter().enumerate() {
        let Some(stream) = stream else { continue };
        if opts.inherit_fd.iter().any(|i| i.key() == stream.key) {
            continue;
        }
        let fd = match streams[n].take().filter(|_| !stream.null) {
            Some(fd) => fd,
            None => null
                .try_clone()
                .map_err(|e| failed(format!("cannot duplicate /dev/null: {e}")))?
                .into(),
        };
        let mut inherit = rpc::Inherit_fd::new();
        inherit.set_key(stream.key.clone());
        inherit.set_fd(n as i32);
        opts.inherit_fd.push(inherit);
        held.push((n as RawFd, fd));
    }
    let mut next = 4;
    for ns in [
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        let Some(path) = namespace_path(oci, ns) else {
            continue;
        };
        if matches!(ns, LinuxNamespaceType::Network | LinuxNamespaceType::Pid) {
            let fd: OwnedFd = fs::File::open(&path)
                .map_err(|e| {
                    EngineError::InvalidSpec(format!(
                        "cannot restore container {id}: namespace {} does not exist: {e}",
                        path.display()
                    ))
                })?
                .into();
            let mut inherit = rpc::Inherit_fd::new();
            inherit.set_key(ns_key(ns));
            inherit.set_fd(next);
            opts.inherit_fd.push(inherit);
            held.push((next, fd));
            next += 1;
        } else {
            let mut join = rpc::Join_namespace::new();
            join.set_ns(ns_name(ns).into());
            join.set_ns_file(path.to_string_lossy().into_owned());
            opts.join_ns.push(join);
        }
    }

    let config = CgroupConfig {
        cgroup_path: libcontainer::utils::get_cgroup_path(
            &oci.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
            id,
        ),
        systemd_cgroup: false,
        container_name: id.to_string(),
    };
    let manager = create_cgroup_manager(config)
        .map_err(|e| failed(format!("cgroup of container {id}: {e}")))?;
    undo.cgroup = Some(manager);
    let resources = oci
        .linux()
        .as_ref()
        .and_then(|l| l.resources().clone())
        .unwrap_or_default();
    let mut opts = Some(opts);
    let inherit: Vec<(RawFd, BorrowedFd<'_>)> =
        held.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
    let mut req = rpc::Criu_req::new();
    req.set_type(rpc::Criu_req_type::RESTORE);
    // CRIU joins the container's cgroup before it restores, and re-roots the images' cgroups
    // onto the one it is in (runc's criuApplyCgroups).
    let manager = undo.cgroup.as_ref().expect("set above");
    let started = |criu_pid: nix::unistd::Pid| -> Result<(), EngineError> {
        manager
            .add_task(criu_pid)
            .map_err(|e| failed(format!("cannot put CRIU in the cgroup of {id}: {e}")))?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| failed(format!("cannot set the cgroup of {id}: {e}")))?;
        Ok(())
    };
    // The cgroup roots are known only once CRIU runs in the cgroup, so the request is built
    // around a hook: the roots come from the CRIU process's /proc entry.
    let mut terminal_sent = false;
    let notified = |script: &str, fd: Option<OwnedFd>| -> Result<(), EngineError> {
        if script != "orphan-pts-master" {
            return Ok(());
        }
        let (Some(socket), Some(master)) = (&console_socket, fd) else {
            return Err(failed(format!(
                "cannot restore container {id}: CRIU sent a terminal it was not asked for"
            )));
        };
        crate::console::send_master(socket, &master)?;
        terminal_sent = true;
        Ok(())
    };
    let answer = criu.call_notified(
        &mut req,
        &inherit,
        |criu_pid, req| {
            started(criu_pid)?;
            let mut opts = opts.take().expect("called once");
            let roots = if manage_cgroups {
                cgroup_roots(criu_pid.as_raw())?
            } else {
                Vec::new()
            };
            for (ctrl, path) in roots {
                let mut root = rpc::Cgroup_root::new();
                if !ctrl.is_empty() {
                    root.set_ctrl(ctrl);
                }
                root.set_path(path);
                opts.cg_root.push(root);
            }
            req.opts = protobuf::MessageField::some(opts);
            Ok(())
        },
        notified,
    )?;
    if let Ok(resp) = &answer {
        if console_socket.is_some() && !terminal_sent {
            // The restored process runs; without a terminal its client would hang.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(resp.restore.pid()),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(EngineError::InvalidSpec(format!(
                "cannot restore container {id} with a terminal: its checkpoint has none"
            )));
        }
    }
    Ok(answer.map(|resp| resp.restore.pid()))
}

/// The cgroup of each controller of `pid`, from `/proc/PID/cgroup` (`ID:CONTROLLERS:PATH`).
fn cgroup_roots(pid: i32) -> Result<Vec<(String, String)>, EngineError> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(|e| failed(format!("cannot read the cgroups of CRIU (pid {pid}): {e}")))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            // Named hierarchies (name=systemd) are CRIU's to handle from the images.
            (!ctrl.starts_with("name=")).then(|| (ctrl.to_string(), path.to_string()))
        })
        .collect())
}

/// Creates the mount points of the spec's mounts in the rootfs, as libcontainer does at create
/// (the new rootfs may lack directories the old container's had): not those on a tmpfs of the
/// spec, whose content CRIU restores, and not cgroup mounts. The rootfs is a checkpoint's or a
/// template's, which a tenant made: every path is resolved inside it (symbolic links and `..`
/// as if it were `/`), so nothing is ever created outside it.
fn prepare_mountpoints(spec: &Spec, rootfs: &Path) {
    let mounts: Vec<_> = spec.mounts().iter().flatten().collect();
    let tmpfs: Vec<&Path> = mounts
        .iter()
        .filter(|m| m.typ().as_deref() == Some("tmpfs"))
        .map(|m| m.destination().as_path())
        .collect();
    let root = match fs::File::open(rootfs) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot open rootfs {}: {e}", rootfs.display());
            return;
        }
    };
    for m in &mounts {
        let dest = m.destination();
        if m.typ().as_deref() == Some("cgroup")
            || tmpfs.iter().any(|t| dest != *t && dest.starts_with(t))
        {
            continue;
        }
        let is_file = libcontainer::rootfs::utils::is_bind(m)
            && m.source().as_ref().is_some_and(|s| s.is_file());
        if let Err(e) = create_in_root(root.as_fd(), dest, is_file) {
            tracing::warn!(
                "cannot create mount point {} in {}: {e}",
                dest.display(),
                rootfs.display()
            );
        }
    }
}

/// Creates `path` in the directory `root` as if `root` were `/` (a directory, or with
/// `is_file` an empty file), with its missing parents; nothing when it exists.
fn create_in_root(root: BorrowedFd<'_>, path: &Path, is_file: bool) -> std::io::Result<()> {
    use hyperbox_shim_core::template::open_in_root;
    use std::path::Component;
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY;
    if open_in_root(root, path, libc::O_PATH).is_ok() {
        return Ok(());
    }
    let names: Vec<_> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = names.split_last() else {
        return Ok(());
    };
    let mut done = PathBuf::from("/");
    let mut dir = open_in_root(root, &done, dir_flags)?;
    for name in parents {
        done.push(name);
        dir = match open_in_root(root, &done, dir_flags) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // `name` alone, in the directory resolved so far: a symbolic link there is
                // not followed (EEXIST), and the lookup below then fails.
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    *name,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open_in_root(root, &done, dir_flags)?
            }
            Err(e) => return Err(e),
        };
    }
    if is_file {
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            *last,
            nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_EXCL
                | nix::fcntl::OFlag::O_WRONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )?;
        nix::unistd::close(fd)?;
    } else {
        nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            *last,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rootfs (in a fresh directory) with links out of it, and a host directory they name.
    fn hostile_rootfs(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("mountpoints-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (rootfs, host) = (base.join("rootfs"), base.join("host"));
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(&host).unwrap();
        std::os::unix::fs::symlink(&host, rootfs.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../host", rootfs.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("inside")).unwrap();
        (rootfs, host)
    }

    #[test]
    fn mount_points_are_made_inside_the_rootfs_whatever_its_links_say() {
        let (rootfs, host) = hostile_rootfs("links");
        let root = fs::File::open(&rootfs).unwrap();
        for (path, is_file) in [
            ("/evil/x/y", false),
            ("/evil/f", true),
            ("/up/x", false),
            ("/up/f", true),
            ("/../../host/z", false),
        ] {
            let _ = create_in_root(root.as_fd(), Path::new(path), is_file);
        }
        assert_eq!(
            fs::read_dir(&host).unwrap().count(),
            0,
            "something was made in the host's directory through a link"
        );
        // A link that stays inside resolves inside; plain paths are made as asked.
        create_in_root(root.as_fd(), Path::new("/inside/x"), false).unwrap();
        assert!(rootfs.join("etc/x").is_dir());
        create_in_root(root.as_fd(), Path::new("/a/b/c"), false).unwrap();
        assert!(rootfs.join("a/b/c").is_dir());
        create_in_root(root.as_fd(), Path::new("/a/file"), true).unwrap();
        assert!(rootfs.join("a/file").is_file());
        // Existing: nothing to do.
        create_in_root(root.as_fd(), Path::new("/a/file"), true).unwrap();
        fs::remove_dir_all(rootfs.parent().unwrap()).unwrap();
    }
}

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
//!
//! Each goes in three steps: `probe` finds what CRIU's options depend on (the host's cgroups,
//! what is inside the running container), `request` builds CRIU's options from the spec, the
//! options asked for and those findings (pure, unit-tested case by case), and this module does
//! the rest: directories, mounts, fds, the cgroup, CRIU's call and libcontainer's state.

mod mountpoints;
mod probe;
mod request;

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use hyperbox_shim_core::{CheckpointSpec, RestoreSpec};
use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt};
use libcontainer::config::YoukiConfig;
use libcontainer::container::{Container, ContainerStatus};
use libcontainer::oci_spec::runtime::Spec;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rust_criu::rust_criu_protobuf::rpc;
use serde::{Deserialize, Serialize};

use crate::criu::{self, Criu, CriuError};
use crate::error::YoukiError;

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

pub(crate) fn load_spec(bundle: &Path) -> Result<Spec, YoukiError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| YoukiError::Config {
        path,
        source: e.into(),
    })
}

fn rootfs_of(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    bundle.join(root)
}

fn open_dir(path: &Path, create: bool) -> Result<fs::File, YoukiError> {
    if create {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(YoukiError::io("create", path))?;
    }
    fs::File::open(path).map_err(YoukiError::io("open", path))
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
pub fn dump(c: &Container, bundle: &Path, spec: &CheckpointSpec) -> Result<(), YoukiError> {
    let id = c.id().to_string();
    let criu = Criu::get()?.with_timeout(spec.timeout);
    let pid = c
        .pid()
        .ok_or_else(|| YoukiError::NotFound(format!("container {id} has no init pid")))?
        .as_raw();
    let oci = load_spec(bundle)?;
    let cgroup_path = c
        .spec()
        .map_err(YoukiError::container(&id, "read the config of"))?
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

    let choices = request::DumpChoices::of(spec)?;
    let freezer = probe::freezer_dir(&cgroup_path)?;
    let v1_cgroup_mounts = probe::v1_cgroup_mounts(&oci)?;
    let masked = probe::masked(&oci, pid);
    // Frozen, nothing can write to an empty tmpfs before CRIU has seen it.
    let empty_tmpfs = if probe::is_frozen(&freezer) {
        probe::empty_tmpfs_mounts(&oci, pid)
    } else {
        Vec::new()
    };
    let external_namespaces = probe::external_namespaces(&oci)?;
    let stdio = [0, 1, 2].map(|n| probe::stdio_stream(pid, n));
    let facts = request::DumpFacts {
        pid,
        images_dir_fd: images.as_raw_fd(),
        work_dir_fd: work.as_raw_fd(),
        root: rootfs_of(bundle, &oci),
        freezer,
        v1_cgroup_mounts,
        masked,
        empty_tmpfs,
        external_namespaces,
        stdio,
    };
    let (opts, meta) = request::dump(&choices, &oci, facts);
    let meta_path = spec.image_dir.join(METADATA);
    fs::write(&meta_path, serde_json::to_vec(&meta).unwrap_or_default())
        .map_err(YoukiError::io("write", &meta_path))?;

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
                    .map_err(YoukiError::io("write", &path))?;
            }
            tracing::info!(id, pid, "dumped");
            Ok(())
        }
        Err(refused) => Err(CriuError::Refused {
            what: format!("checkpoint container {id}"),
            reason: format!("{}; the container runs on", describe(&refused, &log)),
            log,
        }
        .into()),
    }
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
    fn mount(path: &Path, flags: MsFlags, data: &str) -> Result<FreshTmpfs, YoukiError> {
        fs::create_dir(path).map_err(YoukiError::io("create", path))?;
        let data = (!data.is_empty()).then_some(data);
        if let Err(e) = mount(Some("tmpfs"), path, Some("tmpfs"), flags, data) {
            let _ = fs::remove_dir(path);
            return Err(YoukiError::io("mount a tmpfs at", path)(e.into()));
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

fn read_metadata(id: &str, dir: &Path) -> Result<Metadata, YoukiError> {
    let path = dir.join(METADATA);
    fs::read(&path)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .map_err(|e: std::io::Error| {
            let message = format!(
                "cannot restore container {id}: {} is not a checkpoint of this shim: cannot \
                 read {}",
                dir.display(),
                path.display()
            );
            YoukiError::invalid_because(message, e)
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
) -> Result<u32, YoukiError> {
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
        return Err(YoukiError::invalid(format!(
            "cannot restore container {id}: its state {} exists",
            state_dir.display()
        )));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(state_dir)
        .map_err(YoukiError::io("create", state_dir))?;
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
    mountpoints::prepare_mountpoints(&oci, &rootfs);
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
                YoukiError::invalid(format!(
                    "cannot restore container {id}: the checkpoint has a tmpfs at {dest}, its \
                     spec has none"
                ))
            })?;
        let (flags, data) = crate::rootfs::parse_options(&m.options().clone().unwrap_or_default());
        let dir = FreshTmpfs::mount(&state_dir.join(format!("tmpfs-{i}")), flags, &data)?;
        fresh.push((format!("{EMPTY_TMPFS}{dest}"), dir));
    }
    let criu_root = state_dir.join(CRIU_ROOT);
    fs::create_dir(&criu_root).map_err(YoukiError::io("create", &criu_root))?;
    mount(
        Some(&rootfs),
        &criu_root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| YoukiError::io("bind for CRIU the rootfs", &rootfs)(e.into()))?;
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
            id, &criu, &oci, &meta, &images, &work, &criu_root, &fresh, stdio, from, &mut undo,
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
            return Err(CriuError::Refused {
                what: format!("restore container {id} from {}", from.image_dir.display()),
                reason: describe(&refused, &log),
                log,
            }
            .into());
        }
    };
    // libcontainer's state, as if it had created the container: exec, kill, pids and delete
    // find the init and the cgroup through it.
    let mut c = Container::new(id, ContainerStatus::Running, Some(pid), bundle, state_dir)
        .map_err(YoukiError::container(id, "record"))?;
    c.set_systemd(false);
    c.set_creator(nix::unistd::geteuid().as_raw());
    c.save().map_err(YoukiError::container(id, "save"))?;
    YoukiConfig::from_spec(&oci, id)
        .and_then(|config| config.save(state_dir))
        .map_err(|e| YoukiError::container(id, "save the config of")(e.into()))?;
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
    from: &RestoreSpec,
    undo: &mut Undo<'_>,
) -> Result<Result<i32, criu::Refused>, YoukiError> {
    let v1_cgroup_mounts = probe::v1_cgroup_mounts(oci)?;
    let console_socket = stdio.console_socket.clone();
    let facts = request::RestoreFacts {
        images_dir_fd: images.as_raw_fd(),
        work_dir_fd: work.as_raw_fd(),
        root: criu_root.to_path_buf(),
        v1_cgroup_mounts,
        fresh: fresh
            .iter()
            .map(|(key, dir)| (key.clone(), dir.path.clone()))
            .collect(),
    };
    let request::Restore { opts, inherit } =
        request::restore(oci, from, meta, console_socket.is_some(), facts);
    let manage_cgroups = opts.manage_cgroups();

    // The fds CRIU inherits, as the request places them.
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(YoukiError::io("open", "/dev/null"))?;
    let mut held: Vec<(RawFd, OwnedFd)> = Vec::new();
    let mut streams = stdio.streams;
    for (n, what) in inherit {
        let fd: OwnedFd = match what {
            request::Inherited::Stream { null: is_null } => {
                match streams[n as usize].take().filter(|_| !is_null) {
                    Some(fd) => fd,
                    None => null
                        .try_clone()
                        .map_err(YoukiError::io("duplicate", "/dev/null"))?
                        .into(),
                }
            }
            request::Inherited::Namespace(path) => fs::File::open(&path)
                .map_err(|e| {
                    let message = format!(
                        "cannot restore container {id}: namespace {} does not exist",
                        path.display()
                    );
                    YoukiError::invalid_because(message, e)
                })?
                .into(),
        };
        held.push((n, fd));
    }

    let config = CgroupConfig {
        cgroup_path: libcontainer::utils::get_cgroup_path(
            &oci.linux().as_ref().and_then(|l| l.cgroups_path().clone()),
            id,
        ),
        systemd_cgroup: false,
        container_name: id.to_string(),
    };
    let manager = create_cgroup_manager(config).map_err(|e| YoukiError::Cgroup {
        what: "open",
        id: id.to_string(),
        source: e.into(),
    })?;
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
    let cgroup = |what| {
        move |e: libcgroups::common::AnyManagerError| YoukiError::Cgroup {
            what,
            id: id.to_string(),
            source: e.into(),
        }
    };
    let started = |criu_pid: nix::unistd::Pid| -> Result<(), YoukiError> {
        manager.add_task(criu_pid).map_err(cgroup("put CRIU in"))?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(cgroup("set"))?;
        Ok(())
    };
    // The cgroup roots are known only once CRIU runs in the cgroup, so the request is built
    // around a hook: the roots come from the CRIU process's /proc entry.
    let mut terminal_sent = false;
    let notified = |script: &str, fd: Option<OwnedFd>| -> Result<(), YoukiError> {
        if script != "orphan-pts-master" {
            return Ok(());
        }
        let (Some(socket), Some(master)) = (&console_socket, fd) else {
            return Err(YoukiError::Failed(format!(
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
                probe::cgroup_roots(criu_pid.as_raw())?
            } else {
                Vec::new()
            };
            request::add_cgroup_roots(&mut opts, roots);
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
            return Err(YoukiError::invalid(format!(
                "cannot restore container {id} with a terminal: its checkpoint has none"
            )));
        }
    }
    Ok(answer.map(|resp| resp.restore.pid()))
}

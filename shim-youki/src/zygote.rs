//! The zygote: a single-threaded child forked in `main` before the async runtime exists, which
//! does every `libcontainer` call for the shim.
//!
//! `libcontainer` forks (clone) and runs complex code in the children, which is undefined
//! behaviour in a multi-threaded process such as the tokio-based task server. The zygote has
//! one thread, so it may. It creates containers with `as_sibling`: libcontainer then clones
//! the container's intermediate and init processes with `CLONE_PARENT`, making them children
//! of the zygote's parent, the shim, which reaps them (it is a child subreaper, too, for
//! anything reparented). Exits therefore reach the shim exactly as a runc shim's do.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyperbox_shim_core::timeline::mark;
use hyperbox_shim_core::{EngineError, RestoreFrom};
use libcgroups::common::{create_cgroup_manager, CgroupConfig, CgroupManager};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::oci_spec::runtime::{Process, Spec};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;
use nix::unistd::{fork, ForkResult, Pid};

use crate::checkpoint::{self, RestoreStdio};
use crate::error::YoukiError;
use crate::exec_security;
use crate::executor::{BoxedExecutor, ExecutorFactory, NewContainer};
use crate::image::ImageRef;
use crate::rootfs;
use crate::template::{self, Store};
use crate::wire::{self, Reply, Request, StdioMask};

/// Forks the zygote serving containers whose state lives under `root`, their executors
/// chosen by `executors`, and returns the shim's end of its socket.
pub fn spawn(
    root: PathBuf,
    namespace: String,
    mut executors: Box<dyn ExecutorFactory>,
) -> Result<(OwnedFd, Pid), YoukiError> {
    let threads = thread_count();
    if threads != Some(1) {
        return Err(YoukiError::Failed(format!(
            "the zygote must be forked while the shim is single-threaded, found {threads:?} threads"
        )));
    }
    let (shim_end, zygote_end) = wire::pair().map_err(YoukiError::sys("create a socket pair"))?;
    let parent = nix::unistd::getpid();
    // SAFETY: the process has exactly one thread (checked above), so the child is a complete
    // copy and may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(zygote_end);
            Ok((shim_end, child))
        }
        Ok(ForkResult::Child) => {
            drop(shim_end);
            let code = match become_zygote(parent) {
                Ok(()) => serve(&zygote_end, parent, &root, &namespace, executors.as_mut()),
                Err(e) => {
                    tracing::error!("zygote setup: {e}");
                    1
                }
            };
            // SAFETY: ends the zygote without running the parent's atexit handlers or
            // destructors, which belong to the shim.
            unsafe { libc::_exit(code) }
        }
        Err(e) => Err(YoukiError::sys("fork the zygote")(e)),
    }
}

fn thread_count() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Detaches the zygote's standard streams from the shim's (stdout is the pipe `shim start`
/// reads the address from: holding it would keep that read from ending) and ties its life
/// to the shim's.
fn become_zygote(parent: Pid) -> io::Result<()> {
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd)?;
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if nix::unistd::getppid() != parent {
        return Err(io::Error::other(
            "the shim exited before its zygote started",
        ));
    }
    Ok(())
}

/// Answers requests until the shim closes its end.
fn serve(
    sock: &OwnedFd,
    shim: Pid,
    root: &Path,
    namespace: &str,
    executors: &mut dyn ExecutorFactory,
) -> i32 {
    let mut roots = StateRoots {
        default: root.to_path_buf(),
        by_id: HashMap::new(),
        namespace: namespace.to_string(),
    };
    loop {
        let (req, fds) = match wire::recv::<Request>(sock.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => return 0,
            Err(e) => {
                tracing::error!("zygote: {e}");
                return 1;
            }
        };
        let (reply, fds) = if runs_long(&req) {
            match detach(sock, shim, &mut roots, executors, req, fds) {
                Ok(worker) => (Reply::Detached, vec![worker]),
                Err(e) => (Reply::Failed(e.into()), Vec::new()),
            }
        } else {
            match handle(&mut roots, executors, req, fds) {
                Ok(r) => (r, Vec::new()),
                Err(e) => (Reply::Failed(e.into()), Vec::new()),
            }
        };
        if let Err(e) = wire::send(sock.as_fd(), &reply, &fds) {
            tracing::error!("zygote: {e}");
            return 1;
        }
    }
}

/// Requests that run CRIU against a running container, for as long as CRIU takes: they
/// change nothing the zygote keeps, so a worker can answer them while the zygote goes on
/// (a hung dump must not hold up the Delete, signal or exec of any container).
fn runs_long(req: &Request) -> bool {
    matches!(
        req,
        Request::Checkpoint { .. } | Request::CaptureTemplate { .. }
    )
}

/// Hands `req` to a worker: a grandchild of the zygote (its parent exits at once, so it is
/// reparented to the shim, the subreaper, which reaps it) that answers on a socket of its
/// own and exits. Returns the shim's end of that socket.
fn detach(
    sock: &OwnedFd,
    shim: Pid,
    roots: &mut StateRoots,
    executors: &mut dyn ExecutorFactory,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<OwnedFd, YoukiError> {
    let (shim_end, worker_end) = wire::pair().map_err(YoukiError::sys("create a socket pair"))?;
    // SAFETY: the zygote has one thread, so the child is a complete copy and may run any code.
    match unsafe { fork() } {
        Ok(ForkResult::Parent { child }) => {
            drop(worker_end);
            // The intermediate exits at once.
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(shim_end)
        }
        Ok(ForkResult::Child) => {
            drop(shim_end);
            // SAFETY: still one thread; the worker is a complete copy too.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {}
                // SAFETY: ends the intermediate without running anything of the zygote's.
                _ => unsafe { libc::_exit(0) },
            }
            // The zygote's socket is the zygote's alone; without it the worker cannot read
            // or answer another request by mistake.
            // SAFETY: the fd is not used again in this process, which ends with `_exit`.
            unsafe { libc::close(std::os::fd::AsRawFd::as_raw_fd(sock)) };
            let code = match become_worker(shim) {
                Ok(()) => {
                    let reply = match handle(roots, executors, req, fds) {
                        Ok(r) => r,
                        Err(e) => Reply::Failed(e.into()),
                    };
                    match wire::send(worker_end.as_fd(), &reply, &[]) {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::error!("zygote worker: {e}");
                            1
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("zygote worker setup: {e}");
                    1
                }
            };
            // SAFETY: as the zygote's own end.
            unsafe { libc::_exit(code) }
        }
        Err(e) => Err(YoukiError::sys("fork a zygote worker")(e)),
    }
}

/// Ties a worker's life to the shim's, once it has been reparented to it.
fn become_worker(shim: Pid) -> io::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while nix::unistd::getppid() != shim {
        if nix::unistd::getppid().as_raw() == 1 || std::time::Instant::now() > deadline {
            return Err(io::Error::other("the shim is gone"));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes no memory.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if nix::unistd::getppid() != shim {
        return Err(io::Error::other("the shim exited"));
    }
    Ok(())
}

/// Where each container's state lives: under the default root, or under the one its runtime
/// options named. That choice is also kept in the bundle (`STATE_ROOT_FILE`), for a `delete`
/// action run by a new shim after this one went away.
#[derive(Debug)]
struct StateRoots {
    default: PathBuf,
    by_id: HashMap<String, PathBuf>,
    /// The containerd namespace, whose templates its containers use.
    namespace: String,
}

/// The state root a container was created with, when not the default; in its bundle.
const STATE_ROOT_FILE: &str = "hyperbox-state-root";

impl StateRoots {
    fn of(&self, id: &str) -> &Path {
        self.by_id.get(id).unwrap_or(&self.default)
    }

    /// The root of a container to delete; looked up in its bundle when never known here.
    fn for_delete(&self, id: &str, bundle: &Path) -> PathBuf {
        let recorded = || fs::read_to_string(bundle.join(STATE_ROOT_FILE)).ok();
        self.by_id
            .get(id)
            .cloned()
            .or_else(|| recorded().map(PathBuf::from))
            .unwrap_or_else(|| self.default.clone())
    }

    /// Forgets a deleted container's root.
    fn forget(&mut self, id: &str, bundle: &Path) {
        self.by_id.remove(id);
        let _ = fs::remove_file(bundle.join(STATE_ROOT_FILE));
    }
}

fn handle(
    roots: &mut StateRoots,
    executors: &mut dyn ExecutorFactory,
    req: Request,
    fds: Vec<OwnedFd>,
) -> Result<Reply, YoukiError> {
    match req {
        Request::Create {
            id,
            bundle,
            rootfs,
            stdio,
            state_root,
            no_pivot_root,
            restore,
            image,
        } => {
            let root = state_root.unwrap_or_else(|| roots.default.clone());
            if root != roots.default {
                let file = bundle.join(STATE_ROOT_FILE);
                fs::write(&file, root.as_os_str().as_encoded_bytes())
                    .map_err(YoukiError::io("write", &file))?;
            }
            let created = match &restore {
                Some(from) => restore_container(
                    &root,
                    &roots.namespace,
                    &id,
                    &bundle,
                    &rootfs,
                    from,
                    image.as_ref(),
                    stdio,
                    fds,
                ),
                None => create(
                    &root,
                    &id,
                    &bundle,
                    &rootfs,
                    stdio,
                    fds,
                    no_pivot_root,
                    executors,
                ),
            };
            match created {
                Ok(_) if root != roots.default => {
                    roots.by_id.insert(id, root);
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = fs::remove_file(bundle.join(STATE_ROOT_FILE));
                }
            }
            created.map(|(pid, cgroups_path)| Reply::Created { pid, cgroups_path })
        }
        Request::Start { id } => {
            mark("zygote.start.begin", &id);
            load(roots.of(&id), &id)?
                .start()
                .map_err(YoukiError::container(&id, "start"))?;
            mark("zygote.start.end", &id);
            Ok(Reply::Done)
        }
        Request::Exec {
            id,
            exec_id,
            process,
            stdio,
        } => exec(roots.of(&id), &id, &exec_id, &process, stdio, fds).map(Reply::Pid),
        Request::SignalAll { id, signal } => {
            let sig = Signal::try_from(signal)
                .map_err(|e| YoukiError::invalid_because(format!("signal {signal}"), e))?;
            load(roots.of(&id), &id)?
                .kill(sig, true)
                .map_err(YoukiError::container(&id, "signal"))?;
            Ok(Reply::Done)
        }
        Request::Checkpoint { id, bundle, spec } => {
            let c = load(roots.of(&id), &id)?;
            checkpoint::dump(&c, &bundle, &spec)?;
            Ok(Reply::Done)
        }
        Request::CaptureTemplate {
            id,
            bundle,
            spec,
            image,
        } => {
            let c = load(roots.of(&id), &id)?;
            let captured = Store::for_bundle(&roots.namespace, &bundle)?.capture(
                &c,
                &id,
                &bundle,
                &spec,
                image.as_ref(),
            )?;
            Ok(Reply::Captured(captured))
        }
        Request::TemplateFailed {
            name,
            reason,
            bundle,
        } => {
            Store::for_bundle(&roots.namespace, &bundle)?.record_failure(&name, &reason);
            Ok(Reply::Done)
        }
        Request::Pids { id } => pids(roots.of(&id), &id).map(Reply::Pids),
        Request::CgroupsPath { id } => {
            let c = load(roots.of(&id), &id)?;
            let config = c
                .spec()
                .map_err(YoukiError::container(&id, "read the config of"))?;
            Ok(Reply::Path(config.cgroup_path))
        }
        Request::Delete { id, bundle } => {
            mark("zygote.delete.begin", &id);
            let root = roots.for_delete(&id, &bundle);
            delete(&root, &id, &bundle)?;
            roots.forget(&id, &bundle);
            mark("zygote.delete.end", &id);
            Ok(Reply::Done)
        }
    }
}

fn load(root: &Path, id: &str) -> Result<Container, YoukiError> {
    let dir = root.join(id);
    if !dir.exists() {
        return Err(YoukiError::NotFound(format!(
            "container {id} has no state in {}",
            dir.display()
        )));
    }
    Container::load(dir).map_err(YoukiError::container(id, "load"))
}

fn builder(
    root: &Path,
    id: &str,
    stdio: StdioMask,
    fds: Vec<OwnedFd>,
) -> Result<ContainerBuilder, YoukiError> {
    create_state_root(root)?;
    let mut b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(root)
        .map_err(YoukiError::container(id, "use state dir for"))?;
    let mut fds = fds.into_iter();
    let mut next = |wanted: bool| if wanted { fds.next() } else { None };
    if let Some(fd) = next(stdio.stdin) {
        b = b.with_stdin(fd);
    }
    if let Some(fd) = next(stdio.stdout) {
        b = b.with_stdout(fd);
    }
    if let Some(fd) = next(stdio.stderr) {
        b = b.with_stderr(fd);
    }
    if stdio.console_socket.is_some() {
        b = b.with_console_socket(stdio.console_socket);
    }
    Ok(b)
}

#[allow(clippy::too_many_arguments)]
fn create(
    root: &Path,
    id: &str,
    bundle: &Path,
    mounts: &[hyperbox_shim_core::RootfsMount],
    stdio: StdioMask,
    fds: Vec<OwnedFd>,
    no_pivot_root: bool,
    executors: &mut dyn ExecutorFactory,
) -> Result<(u32, Option<PathBuf>), YoukiError> {
    mark("zygote.create.begin", id);
    let mut spec = rootfs::SpecPaths::read(bundle)?;
    if mounts.is_empty() && !spec.root.is_dir() {
        return Err(YoukiError::invalid(format!(
            "cannot create container {id}: its rootfs {} does not exist",
            spec.root.display()
        )));
    }
    spec.normalize_root_propagation(bundle)?;
    crate::gpu::prepare(id, bundle)?;
    let b = builder(root, id, stdio, fds)?;
    let target = bundle.join("rootfs");
    rootfs::mount_all(mounts, &target)?;
    mark("zygote.rootfs_mounted", id);
    if let Err(e) = spec.create_cwd() {
        tracing::warn!(id, "cannot create the process's cwd: {e}");
    }
    let new = NewContainer {
        id,
        bundle,
        rootfs: &spec.root,
    };
    let executor = match executors.executor(&new) {
        Ok(e) => e,
        Err(e) => {
            if let Err(clean) = delete(root, id, bundle) {
                tracing::warn!(id, "cleanup after failed create: {clean:?}");
            }
            return Err(e.into());
        }
    };
    let built = b.validate_id().and_then(|b| {
        b.with_executor(BoxedExecutor(executor, id.to_string()))
            .as_init(bundle)
            .as_sibling(true)
            .with_systemd(false)
            .with_no_pivot(no_pivot_root)
            .with_detach(true)
            .build()
    });
    let built = built.map_err(|source| YoukiError::Create {
        id: id.to_string(),
        hint: spec.diagnose_cwd(),
        source: Box::new(source),
    });
    match built.and_then(|c| {
        secure_state(&root.join(id))?;
        Ok(c)
    }) {
        Ok(c) => {
            let pid = c.pid().map(Pid::as_raw).unwrap_or_default();
            mark("zygote.create.end", id);
            tracing::info!(id, pid, "container created");
            // As libcontainer derives it from the spec (no systemd cgroups here).
            let cgroups_path = libcontainer::utils::get_cgroup_path(&spec.cgroups_path, id);
            Ok((pid as u32, Some(cgroups_path)))
        }
        Err(e) => {
            if let Err(clean) = delete(root, id, bundle) {
                tracing::warn!(id, "cleanup after failed create: {clean:?}");
            }
            Err(e)
        }
    }
}

/// Creates container `id` by restoring its processes from a checkpoint (see `checkpoint`) or
/// from a template of `namespace` (see `template`).
#[allow(clippy::too_many_arguments)]
fn restore_container(
    root: &Path,
    namespace: &str,
    id: &str,
    bundle: &Path,
    mounts: &[hyperbox_shim_core::RootfsMount],
    from: &RestoreFrom,
    image: Option<&ImageRef>,
    stdio: StdioMask,
    fds: Vec<OwnedFd>,
) -> Result<(u32, Option<PathBuf>), YoukiError> {
    let spec = rootfs::SpecPaths::read(bundle)?;
    if mounts.is_empty() && !spec.root.is_dir() {
        return Err(YoukiError::invalid(format!(
            "cannot restore container {id}: its rootfs {} does not exist",
            spec.root.display()
        )));
    }
    let mut fds = fds.into_iter();
    let mut next = |wanted: bool| if wanted { fds.next() } else { None };
    let streams = RestoreStdio {
        streams: [next(stdio.stdin), next(stdio.stdout), next(stdio.stderr)],
        console_socket: stdio.console_socket,
    };
    // A template's rootfs changes are a layer of the new container's overlay, over the image's:
    // the template is held (shared) until the rootfs is mounted, so that it cannot be removed
    // in between (a removal refuses a template an overlay uses).
    let (from, mounts, _hold) = match from {
        RestoreFrom::Checkpoint(spec) => (spec.clone(), mounts.to_vec(), None),
        RestoreFrom::Template(t) => {
            let (store, name) = template::resolve(namespace, bundle, &t.name)?;
            let prepared = store.prepare_restore(&name, id, bundle, mounts, image, t.lazy)?;
            (prepared.spec, prepared.mounts, Some(prepared.hold))
        }
    };
    let from = &from;
    rootfs::mount_all(&mounts, &bundle.join("rootfs"))?;
    create_state_root(root)?;
    let restored = checkpoint::restore(id, bundle, &root.join(id), from, streams)
        .and_then(|pid| secure_state(&root.join(id)).map(|()| pid));
    if restored.is_err() {
        if let Err(clean) = delete(root, id, bundle) {
            tracing::warn!(id, "cleanup after failed restore: {clean:?}");
        }
    }
    // Read back from the state the restore wrote; the service asks again if it cannot be.
    let cgroups_path = |pid| {
        let path = load(root, id).ok()?.spec().ok()?.cgroup_path;
        Some((pid, Some(path)))
    };
    restored.map(|pid| cgroups_path(pid).unwrap_or((pid, None)))
}

/// Starts exec'd process `exec_id` in container `id`: `process` as containerd sent it, under
/// the container's seccomp filter and with its SELinux label (`exec_security`).
fn exec(
    root: &Path,
    id: &str,
    exec_id: &str,
    process: &serde_json::Value,
    stdio: StdioMask,
    fds: Vec<OwnedFd>,
) -> Result<u32, YoukiError> {
    let dir = root.join(id);
    if !dir.exists() {
        return Err(YoukiError::NotFound(format!("container {id}")));
    }
    let container = load(root, id)?;
    let config = container.bundle().join("config.json");
    let spec =
        Spec::load(&config).map_err(|e| YoukiError::io("read", &config)(io::Error::other(e)))?;
    let process: Process = serde_json::from_value(process.clone()).map_err(|e| {
        YoukiError::invalid_because(format!("the process spec of exec {exec_id}"), e)
    })?;
    let plan = exec_security::plan(&spec, process, exec_security::selinux_enabled())?;
    // The process spec holds its environment: readable by root only, as the state is.
    let path = dir.join(format!("exec-{exec_id}.json"));
    let written = serde_json::to_vec(&plan.process)
        .map_err(io::Error::other)
        .and_then(|bytes| {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?
                .write_all(&bytes)
        });
    written.map_err(YoukiError::io("write", &path))?;
    let built = builder(root, id, stdio, fds).and_then(|b| {
        b.with_executor(plan.security)
            .as_tenant()
            .with_process(Some(&path))
            .with_process_label(plan.process_label)
            .as_sibling(true)
            .with_detach(true)
            .build()
            .map_err(|source| YoukiError::Exec {
                exec_id: exec_id.to_string(),
                id: id.to_string(),
                source: Box::new(source),
            })
    });
    let _ = fs::remove_file(&path);
    Ok(built?.as_raw() as u32)
}

/// Creates a state root (`/run/hyperbox/youki/NAMESPACE`, or the `root` runtime option's)
/// readable by root only, as runc keeps its root (0700), and tightens one made earlier.
fn create_state_root(root: &Path) -> Result<(), YoukiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(YoukiError::io("create state dir", root))?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o700))
        .map_err(YoukiError::io("create state dir", root))
}

/// Gives a container's state runc's modes: its directory 0711, and its files (`state.json`,
/// libcontainer's copy of the config, with every annotation and environment variable) 0600.
fn secure_state(dir: &Path) -> Result<(), YoukiError> {
    let failed = |p: &Path| YoukiError::io("restrict the state", p.to_path_buf());
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).map_err(failed(dir))?;
    for entry in fs::read_dir(dir).map_err(failed(dir))? {
        let entry = entry.map_err(failed(dir))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(failed(&path))?;
        }
    }
    Ok(())
}

fn pids(root: &Path, id: &str) -> Result<Vec<u32>, YoukiError> {
    let c = load(root, id)?;
    let config = c
        .spec()
        .map_err(YoukiError::container(id, "read the config of"))?;
    let cgroup = |what, source| YoukiError::Cgroup {
        what,
        id: id.to_string(),
        source,
    };
    let manager = create_cgroup_manager(CgroupConfig {
        cgroup_path: config.cgroup_path,
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| cgroup("open", e.into()))?;
    let pids = manager
        .get_all_pids()
        .map_err(|e| cgroup("list the pids in", e.into()))?;
    Ok(pids.into_iter().map(|p| p.as_raw() as u32).collect())
}

/// The `delete` action's cleanup after a task server that went away, in the calling process:
/// container `id`'s state (under the root its bundle records, else `default_root`) and its
/// rootfs mounts, as the zygote's Delete does.
pub(crate) fn delete_after_lost_shim(
    default_root: PathBuf,
    id: &str,
    bundle: &Path,
) -> Result<(), YoukiError> {
    let mut roots = StateRoots {
        default: default_root,
        by_id: HashMap::new(),
        namespace: String::new(),
    };
    let root = roots.for_delete(id, bundle);
    delete(&root, id, bundle)?;
    roots.forget(id, bundle);
    Ok(())
}

fn delete(root: &Path, id: &str, bundle: &Path) -> Result<(), YoukiError> {
    let dir = root.join(id);
    let mut result = Ok(());
    if dir.exists() {
        match Container::load(dir.clone()) {
            Ok(mut c) => {
                if let Err(e) = c.delete(true) {
                    result = Err(YoukiError::container(id, "delete")(e));
                }
            }
            Err(e) => {
                let e = EngineError::from(YoukiError::container(id, "load")(e));
                tracing::warn!(id, "unreadable state, removing it: {e}");
                let _ = fs::remove_dir_all(&dir);
            }
        }
    }
    rootfs::unmount_all(&bundle.join("rootfs"))?;
    // The namespace's state dir goes with its last container.
    let _ = fs::remove_dir(root);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_finds_the_root_in_memory_then_in_the_bundle_then_the_default() {
        let bundle = std::env::temp_dir().join(format!("hb-roots-{}", std::process::id()));
        fs::create_dir_all(&bundle).unwrap();
        let mut roots = StateRoots {
            default: PathBuf::from("/run/hyperbox/youki/ns"),
            by_id: HashMap::new(),
            namespace: "ns".into(),
        };
        assert_eq!(roots.for_delete("a", &bundle), roots.default);

        // A later shim: only the bundle knows.
        fs::write(bundle.join(STATE_ROOT_FILE), "/run/elsewhere/ns").unwrap();
        assert_eq!(
            roots.for_delete("a", &bundle),
            PathBuf::from("/run/elsewhere/ns")
        );

        // The shim that created it: its memory wins.
        roots
            .by_id
            .insert("a".into(), PathBuf::from("/run/other/ns"));
        assert_eq!(roots.of("a"), Path::new("/run/other/ns"));
        assert_eq!(
            roots.for_delete("a", &bundle),
            PathBuf::from("/run/other/ns")
        );

        roots.forget("a", &bundle);
        assert_eq!(roots.of("a"), roots.default.as_path());
        assert!(!bundle.join(STATE_ROOT_FILE).exists());
        fs::remove_dir(&bundle).unwrap();
    }
}

//! The narrow interface a shim implements: what it takes to create, start, signal, inspect
//! and remove one container and its extra processes. Everything containerd-facing (the task
//! API, the process table, stdio, events, exit reaping) is done once, around it.

use std::fmt::Debug;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::options::RuntimeOptions;

/// A rootfs mount containerd passes in Create (from the snapshotter), to be mounted at
/// `BUNDLE/rootfs` before the container is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsMount {
    /// Filesystem type, such as `overlay` or `bind`.
    pub kind: String,
    pub source: String,
    /// Mount options as containerd gives them: flags (`ro`, `rbind`) and data (`lowerdir=`).
    pub options: Vec<String>,
}

/// A container to create.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub id: String,
    /// The OCI bundle: `config.json` and the `rootfs` mount point.
    pub bundle: PathBuf,
    /// Mounts that make up the rootfs; empty when the bundle's rootfs is ready as it is.
    pub rootfs: Vec<RootfsMount>,
    /// The runtime options of the Create, decoded and checked.
    pub options: RuntimeOptions,
    /// Restore the container's processes from a checkpoint or a template instead of
    /// running its process: they run from Create on, and Start only reports them started.
    pub restore: Option<RestoreFrom>,
}

/// Where a restored container comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestoreFrom {
    /// A checkpoint's images.
    Checkpoint(RestoreSpec),
    /// A template (see `template`).
    Template(TemplateRestore),
}

/// A template to restore a new container from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRestore {
    /// As `io.hyperbox.restore-from` names it: `NAME` or `POD_NAMESPACE/NAME`.
    pub name: String,
    /// Where to pull it from when this node does not have it.
    pub pull: Option<String>,
    /// Its memory comes in lazily, each page on first touch.
    pub lazy: bool,
}

/// A checkpoint to restore a new container from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// CRIU's images, as a checkpoint of this engine wrote them.
    pub image_dir: PathBuf,
    /// CRIU's work directory (its log); `None` lets the engine choose.
    pub work_dir: Option<PathBuf>,
    /// How long CRIU may take; `None` for as long as it takes.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Memory comes in lazily, each page on first touch (a template's restore may ask).
    #[serde(default)]
    pub lazy: bool,
}

/// What a checkpoint is to take: runc's `CheckpointOptions`, decoded, and where it goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSpec {
    /// Where CRIU's images go (created when missing).
    pub image_dir: PathBuf,
    /// When the images go to `image_dir` on a client's word: the directory containerd asked
    /// for, which it stores in its content store. It gets a record of the checkpoint naming
    /// `image_dir`, so that a restore from containerd's copy finds the images.
    pub record_dir: Option<PathBuf>,
    /// CRIU's work directory (its log); `None` lets the engine choose.
    pub work_dir: Option<PathBuf>,
    /// Stop the container after the dump instead of leaving it running.
    pub exit: bool,
    /// Checkpoint established TCP connections.
    pub open_tcp: bool,
    /// Allow unix sockets connected to peers outside the container.
    pub external_unix_sockets: bool,
    /// Allow a terminal (CRIU's shell job).
    pub terminal: bool,
    /// Checkpoint file locks.
    pub file_locks: bool,
    /// Namespaces created empty on restore instead of dumped (`network` only).
    pub empty_namespaces: Vec<String>,
    /// CRIU's cgroup mode (`soft`, `full`, `strict`, `ignore`); `None` for CRIU's default.
    pub cgroups_mode: Option<String>,
    /// Leave out TCP connections not yet accepted (CRIU's `tcp_skip_in_flight`): they stay
    /// with a container left running, and a restored copy does not get them. Templates.
    #[serde(default)]
    pub skip_in_flight: bool,
    /// How long CRIU may take; `None` for as long as it takes.
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// An additional process to run in a running container.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub exec_id: String,
    /// The OCI `process` object, as containerd sends it.
    pub process: serde_json::Value,
}

/// The standard streams of a new process. `None` leaves the stream on `/dev/null`.
#[derive(Debug, Default)]
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The process gets a new pseudo-terminal as its stdio (the spec's `process.terminal`);
    /// the three streams are then `None`, and the engine returns the terminal's master in
    /// [`Spawned::console`].
    pub terminal: bool,
}

/// A process an engine created or started.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    /// The master side of the process's terminal, when [`ProcessStdio::terminal`] asked for one.
    pub console: Option<OwnedFd>,
    /// The container's cgroup as the engine applied it (as [`Engine::cgroups_path`] gives
    /// it), when the engine knows it at Create; the service then needs no second call for it.
    /// `None` for an exec, or when the engine leaves it to [`Engine::cgroups_path`].
    pub cgroups_path: Option<PathBuf>,
}

/// Who started the process, for [`ShimContext::action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShimAction {
    /// The long-lived task server.
    Serve,
    /// `delete`: clean up after a shim that went away.
    Delete,
}

/// What an engine is told when it is prepared.
#[derive(Debug, Clone)]
pub struct ShimContext {
    /// containerd namespace.
    pub namespace: String,
    /// Container id the shim was started for.
    pub id: String,
    pub action: ShimAction,
    /// containerd's gRPC address (`-address`, as containerd starts shims), for engines that
    /// ask containerd about a container's image; empty when none was given.
    pub address: String,
}

/// A container engine behind the task service.
///
/// Every pid an engine returns must be a child of the shim process (directly, or by
/// reparenting to it as subreaper): the shim reaps it and reports its exit. Processes are
/// signalled by pid by the service itself; engines only signal whole containers.
#[async_trait]
pub trait Engine: Send + Sync + Debug + 'static {
    /// Creates the container (mounting `spec.rootfs` first) and returns its init,
    /// which waits for [`Engine::start`] before running the user's process. On failure,
    /// nothing of the container may be left behind.
    async fn create(&self, spec: &CreateSpec, stdio: ProcessStdio) -> Result<Spawned, EngineError>;

    /// The engine's own long-lived processes besides the shim (a zygote), which go wherever
    /// the shim goes (runc's `shim_cgroup`).
    fn helper_pids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// Lets the created init run the user's process.
    async fn start(&self, id: &str) -> Result<(), EngineError>;

    /// Runs an extra process in the running container `id` and returns it.
    async fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: ProcessStdio,
    ) -> Result<Spawned, EngineError>;

    /// Sends `signal` to every process of the container.
    async fn signal_all(&self, id: &str, signal: i32) -> Result<(), EngineError>;

    /// The pids of every process of the container.
    async fn pids(&self, id: &str) -> Result<Vec<u32>, EngineError>;

    /// The container's cgroup in cgroupfs form (the spec's `linux.cgroupsPath` as the engine
    /// applied it), through which the service pauses, updates, measures and watches it.
    async fn cgroups_path(&self, id: &str) -> Result<PathBuf, EngineError>;

    /// Checkpoints the running container `id` (its init and every descendant) with CRIU,
    /// into `spec.image_dir`. A failed dump leaves the container running; the error names
    /// CRIU's log. Engines that cannot checkpoint keep this default.
    async fn checkpoint(
        &self,
        id: &str,
        bundle: &Path,
        spec: &CheckpointSpec,
    ) -> Result<(), EngineError> {
        let _ = (bundle, spec);
        Err(EngineError::Unsupported(format!(
            "cannot checkpoint container {id}: this engine does not checkpoint"
        )))
    }

    /// Checkpoints the running container `id` as a template, leaving it running: the CRIU
    /// images, the container's changes to its rootfs and what a restore must match, kept
    /// under `spec.name` for the namespace. The caller has frozen the container. Engines
    /// without templates keep this default.
    async fn capture_template(
        &self,
        id: &str,
        bundle: &Path,
        spec: &TemplateCapture,
    ) -> Result<Captured, EngineError> {
        let _ = (bundle, spec);
        Err(EngineError::Unsupported(format!(
            "cannot capture container {id} as a template: this engine has no templates"
        )))
    }

    /// Records that the capture of template `name` failed, and why, where the engine's
    /// template listing shows it. Engines without templates keep this default.
    async fn template_failed(&self, name: &str, reason: &str, bundle: &Path) {
        let _ = (name, reason, bundle);
    }

    /// Removes the container: kills what is left of it, removes its cgroup and state, and
    /// unmounts the rootfs it mounted. Succeeds when there is nothing left to remove.
    async fn delete(&self, id: &str, bundle: &Path) -> Result<(), EngineError>;
}

/// What an engine needs to capture a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateCapture {
    pub name: String,
    /// The mounts of the container's rootfs, as Create got them: the engine keeps the
    /// container's changes to its image (an overlay's upper directory).
    pub rootfs: Vec<RootfsMount>,
}

/// What came of a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Captured {
    /// Kept at this path, of this many bytes on disk.
    Kept { path: PathBuf, bytes: u64 },
    /// A template of that name exists and is kept as it is.
    Exists { path: PathBuf },
}

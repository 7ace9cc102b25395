//! The containerd task service: the process table, the lifecycle calls and their events.
//!
//! No request waits behind work that can block for long (a CRIU dump, a logger that is slow
//! to start, a terminal that never comes, a frozen cgroup): Kill, State and Wait take no
//! lock at all, and exits are handled without one.
//!
//! - Each container has a lock of its own that orders the calls that change its processes'
//!   states: Create, Start, Pause, Resume and Delete. They hold it across their engine call
//!   and their event, never across the opening of a process's streams (done before, off the
//!   runtime's threads). Checkpoint and template capture do not hold it: a container marks
//!   one as under way, so a second is refused while Kill, Resume and Delete go on.
//! - An exit is recorded (and Wait answered) as soon as it is reaped. Its TaskExit event is
//!   held while the process's TaskCreate/TaskStart/TaskExecStarted is not out yet, so
//!   containerd always sees TaskCreate, TaskStart, TaskExit, TaskDelete in that order.
//! - An exit reaped before the engine has returned the pid of its process (a restored
//!   process, or an exec that ends at once) is kept aside while a spawn is under way and
//!   handed to that spawn once it knows its pid.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{ExitSignal, Task, TtrpcContext};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{mpsc, watch};

use crate::cgroup::ContainerCgroup;
use crate::console::Console;
use crate::engine::{
    CheckpointSpec, CreateSpec, Engine, ExecSpec, RestoreFrom, RestoreSpec, RootfsMount, Spawned,
    TemplateRestore,
};
use crate::error::{EngineError, ShimError};
use crate::options::{CheckpointOptions, RuntimeOptions};
use crate::reaper::Reaped;
use crate::stdio::{IoOwner, OpenedStdio, OutputCopy, StdinFeeder, StdioPaths, StreamOwner};
use crate::template::{self, CapturePlan, Captured, Readiness, TemplateCapture, TemplatePlan};
use crate::timeline;

/// How long Delete waits for a created-but-never-started init to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long an exit waits for the process's output to reach its `file://` log.
const LOG_DRAIN_WAIT: Duration = Duration::from_secs(2);

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Exit {
    status: u32,
    at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Init: created, waiting for Start. Exec: added, not started (no pid yet).
    Created,
    Running,
    Stopped,
}

#[derive(Debug)]
struct Process {
    pid: u32,
    state: State,
    exit: Option<Exit>,
    exited: watch::Sender<Option<Exit>>,
    stdio: StdioPaths,
    stdin: Option<StdinFeeder>,
    /// The copy of its output into a `file://` log, when it has one.
    output: Option<OutputCopy>,
    /// The process's terminal, when it has one.
    console: Option<Console>,
    /// For an exec not yet started.
    exec: Option<ExecSpec>,
    /// Read ends of its output FIFOs, held until it exits (see `OpenedStdio`).
    fifo_readers: Vec<std::os::fd::OwnedFd>,
    /// Whether the event of its last state change (TaskCreate, TaskStart, TaskExecStarted)
    /// is out; until it is, its TaskExit waits in `held_exit`.
    announced: bool,
    held_exit: Option<TaskExit>,
}

impl Process {
    fn new(pid: u32, state: State, stdio: StdioPaths) -> Self {
        Process {
            pid,
            state,
            exit: None,
            exited: watch::channel(None).0,
            stdio,
            stdin: None,
            output: None,
            console: None,
            exec: None,
            fifo_readers: Vec::new(),
            announced: true,
            held_exit: None,
        }
    }

    fn status(&self) -> Status {
        match self.state {
            State::Created => Status::CREATED,
            State::Running => Status::RUNNING,
            State::Stopped => Status::STOPPED,
        }
    }

    fn set_exit(&mut self, exit: Exit) {
        self.state = State::Stopped;
        self.exit = Some(exit);
        self.fifo_readers.clear();
        if let Some(c) = &self.console {
            c.exited();
        }
        self.exited.send_replace(Some(exit));
    }
}

#[derive(Debug)]
struct Container {
    bundle: PathBuf,
    init: Process,
    execs: HashMap<String, Process>,
    /// Its cgroup, for Pause/Resume, Update, Stats and OOM events; `None` inside when the
    /// engine's cgroup could not be opened (logged).
    cgroup: CgroupSlot,
    /// Frozen by Pause.
    paused: bool,
    /// Restored from a checkpoint: its init runs from Create on, Start only reports it.
    restored: bool,
    /// The template to capture once it is ready (annotations), taken by Start.
    capture: Option<TemplateCapturePlan>,
    /// A checkpoint or capture under way (its name), during which another is refused.
    busy: Option<&'static str>,
    /// Execs the engine is starting, whose pids are not in the table yet.
    exec_spawns: usize,
    /// Who owns its processes' pipes (runtime options `io_uid`/`io_gid`).
    io_owner: Option<IoOwner>,
}

/// A capture a container asked for, with the rootfs mounts the engine needs for it.
#[derive(Debug, Clone)]
struct TemplateCapturePlan {
    plan: CapturePlan,
    rootfs: Vec<RootfsMount>,
    /// The container's bundle (whose spec says whose template it is).
    bundle: PathBuf,
}

/// The resources type containerd sends in Update (OCI `LinuxResources`, as JSON).
const LINUX_RESOURCES: &str = "opencontainers/runtime-spec/1/LinuxResources";

impl Container {
    fn process(&self, id: &str, exec_id: &str) -> Result<&Process, ShimError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {id}")))
    }

    fn process_mut(&mut self, id: &str, exec_id: &str) -> Result<&mut Process, ShimError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {id}")))
    }
}

struct Inner {
    engine: Arc<dyn Engine>,
    publisher: RemotePublisher,
    namespace: String,
    exit: Arc<ExitSignal>,
    /// Each container's lifecycle lock (see the module's documentation).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    containers: Mutex<HashMap<String, Container>>,
    /// Exits whose pid no process held when reaped, kept while a spawn is under way.
    early: Mutex<EarlyExits>,
    /// Held from the recording of an exit to the end of its TaskExit's publication, and by
    /// Delete for its TaskDelete: a TaskDelete never overtakes the exit it follows.
    exits: tokio::sync::Mutex<()>,
}

/// Exits reaped while the engine was spawning a process whose pid was not known yet.
#[derive(Debug, Default)]
struct EarlyExits {
    /// Spawns under way; with none, nothing is kept (helpers' exits are not asked for).
    spawning: usize,
    exits: HashMap<u32, Reaped>,
}

/// A spawn under way (see [`EarlyExits`]); ends when dropped, if not before.
struct Spawning<'a> {
    inner: &'a Inner,
    ended: bool,
}

impl Spawning<'_> {
    /// Ends the spawn of the process that got `pid`, returning its exit if it was already
    /// reaped. Called with the table locked, after the pid was recorded there, so that no
    /// exit can fall between the table and the kept exits.
    fn end(mut self, _table: &HashMap<String, Container>, pid: u32) -> Option<Reaped> {
        self.ended = true;
        let mut early = self.inner.early();
        let exit = early.exits.remove(&pid);
        early.spawning -= 1;
        if early.spawning == 0 {
            early.exits.clear();
        }
        exit
    }
}

/// A checkpoint or capture under way (see `Container::busy`); over when dropped.
struct Busy<'a> {
    inner: &'a Inner,
    id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.inner.table().get_mut(&self.id) {
            c.busy = None;
        }
    }
}

impl Drop for Spawning<'_> {
    fn drop(&mut self) {
        if !self.ended {
            let mut early = self.inner.early();
            early.spawning -= 1;
            if early.spawning == 0 {
                early.exits.clear();
            }
        }
    }
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("engine", &self.engine)
            .field("namespace", &self.namespace)
            .field("containers", &self.containers)
            .finish_non_exhaustive()
    }
}

/// The task service containerd talks to.
#[derive(Debug, Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    MessageField::some(Timestamp::from(t))
}

impl TaskService {
    /// A service over `engine`, handling the exits `reaped` reports.
    pub fn new(
        engine: Arc<dyn Engine>,
        publisher: RemotePublisher,
        namespace: String,
        exit: Arc<ExitSignal>,
        mut reaped: mpsc::UnboundedReceiver<Reaped>,
    ) -> Self {
        let inner = Arc::new(Inner {
            engine,
            publisher,
            namespace,
            exit,
            locks: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            early: Mutex::new(EarlyExits::default()),
            exits: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Some(r) = reaped.recv().await {
                let Some(inner) = weak.upgrade() else { return };
                inner.reaped(r);
            }
        });
        TaskService { inner }
    }
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, "cannot publish event: {e}");
        }
    }

    fn early(&self) -> MutexGuard<'_, EarlyExits> {
        self.early.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes container `id`'s lifecycle lock.
    async fn order(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// Drops the lock of container `id`, gone, unless another call still waits on it.
    fn forget_lock(&self, id: &str) {
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        // The map's reference and the caller's guard's.
        if locks.get(id).is_some_and(|l| Arc::strong_count(l) <= 2) {
            locks.remove(id);
        }
    }

    /// Marks a spawn under way: exits of unknown pids are kept until it ends.
    fn spawning(&self) -> Spawning<'_> {
        self.early().spawning += 1;
        Spawning {
            inner: self,
            ended: false,
        }
    }

    /// A reaped child: the exit of one of the table's processes is handled on a task of its
    /// own (it may wait for the process's log and kill what is left of its container); the
    /// exit of a pid no process holds is kept while a spawn may yet claim it.
    fn reaped(self: &Arc<Self>, r: Reaped) {
        let found = {
            let table = self.table();
            let found = table.iter().find_map(|(id, c)| {
                if c.init.pid == r.pid && c.init.state != State::Stopped {
                    return Some((id.clone(), String::new()));
                }
                c.execs
                    .iter()
                    .find(|(_, p)| p.pid == r.pid && p.state == State::Running)
                    .map(|(exec_id, _)| (id.clone(), exec_id.clone()))
            });
            if found.is_none() {
                let mut early = self.early();
                if early.spawning > 0 {
                    early.exits.insert(r.pid, r);
                }
            }
            found
        };
        match found {
            Some((id, exec_id)) => {
                let inner = self.clone();
                tokio::spawn(async move { inner.handle_exit(&id, &exec_id, r).await });
            }
            None => tracing::debug!(pid = r.pid, status = r.status, "reaped a helper process"),
        }
    }

    /// Records the exit `r` of process `exec_id` of container `id` and reports it.
    async fn handle_exit(&self, id: &str, exec_id: &str, r: Reaped) {
        if exec_id.is_empty() {
            timeline::mark("exit.reaped", id);
        }
        let exit = Exit {
            status: r.status,
            at: r.at,
        };
        let ours = |p: &Process| p.pid == r.pid && p.state != State::Stopped;
        // The process's `file://` log gets everything it wrote before anyone hears of its
        // exit (a pid namespace's processes die with its init, so the pipe closes at once;
        // an exec's children may hold it, hence the limit).
        let (output, bundle) = {
            let table = self.table();
            let Some(c) = table.get(id) else { return };
            let Ok(p) = c.process(id, exec_id) else {
                return;
            };
            (
                p.output.clone().filter(|_| ours(p)),
                exec_id.is_empty().then(|| c.bundle.clone()),
            )
        };
        if let Some(copy) = output {
            copy.drained(LOG_DRAIN_WAIT).await;
        }
        // A container without a pid namespace of its own does not lose its processes with
        // its init: as runc's shim, kill them all before the exit is reported.
        if bundle.is_some_and(|b| kills_all_on_exit(&b)) {
            if let Err(e) = self.engine.signal_all(id, Signal::SIGKILL as i32).await {
                tracing::warn!(id, "cannot kill what is left of it: {e}");
            }
        }
        // Recorded at once (Wait answers); published when `releasable` says.
        let _exits = self.exits.lock().await;
        let events = {
            let mut table = self.table();
            let Some(p) = table
                .get_mut(id)
                .and_then(|c| c.process_mut(id, exec_id).ok())
                .filter(|p| ours(p))
            else {
                return;
            };
            p.set_exit(exit);
            p.held_exit = Some(TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid: r.pid,
                exit_status: r.status,
                exited_at: timestamp(r.at),
                ..Default::default()
            });
            table.get_mut(id).map(releasable).unwrap_or_default()
        };
        self.publish_exits(events).await;
    }

    /// Publishes the TaskExits `releasable` gave, in order.
    async fn publish_exits(&self, events: Vec<TaskExit>) {
        for event in events {
            tracing::info!(
                id = event.container_id,
                exec_id = event.id,
                pid = event.pid,
                status = event.exit_status,
                "exited"
            );
            let init = (event.id == event.container_id).then(|| event.container_id.clone());
            self.publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
                .await;
            if let Some(id) = init {
                timeline::mark("exit.published", &id);
            }
        }
    }

    /// Publishes the TaskExits of container `id` that may go out now.
    async fn release_exits(&self, id: &str) {
        let _exits = self.exits.lock().await;
        let events = self.table().get_mut(id).map(releasable).unwrap_or_default();
        self.publish_exits(events).await;
    }

    /// Holds the TaskExit of process `exec_id` of container `id` until [`Self::announce`].
    fn hold_exit(&self, id: &str, exec_id: &str) {
        if let Some(p) = self
            .table()
            .get_mut(id)
            .and_then(|c| c.process_mut(id, exec_id).ok())
        {
            p.announced = false;
        }
    }

    /// The event of the process's last state change is out: its TaskExit may follow.
    async fn announce(&self, id: &str, exec_id: &str) {
        if let Some(p) = self
            .table()
            .get_mut(id)
            .and_then(|c| c.process_mut(id, exec_id).ok())
        {
            p.announced = true;
        }
        self.release_exits(id).await;
    }

    /// Hands an exit reaped before its pid was known to the exit handling.
    fn early_exit(self: &Arc<Self>, id: &str, exec_id: &str, r: Option<Reaped>) {
        if let Some(r) = r {
            let (inner, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
            tokio::spawn(async move { inner.handle_exit(&id, &exec_id, r).await });
        }
    }

    async fn create(
        self: &Arc<Self>,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ShimError> {
        let id = req.id.clone();
        let _order = self.order(&id).await;
        let created = self.create_locked(req).await;
        if created.is_err() && !self.table().contains_key(&id) {
            self.forget_lock(&id);
        }
        created
    }

    async fn create_locked(
        self: &Arc<Self>,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ShimError> {
        let id = req.id.clone();
        if self.table().contains_key(&id) {
            return Err(ShimError::AlreadyExists(format!("container {id}")));
        }
        // Checked before anything is opened or created: a refusal leaves nothing behind.
        let options = RuntimeOptions::from_any(req.options.as_ref()).inspect_err(|e| {
            tracing::error!(id, "create refused: {e}");
        })?;
        if let Some(path) = &options.shim_cgroup {
            let mut pids = vec![std::process::id()];
            pids.extend(self.engine.helper_pids());
            ContainerCgroup::join_shim(path, &pids).inspect_err(|e| {
                tracing::error!(id, "create refused: {e}");
            })?;
        }
        // containerd unpacks a checkpoint from its content store into a directory and sends
        // its path; a client may instead name CRIU images in the runtime options, as for runc.
        let checkpoint = match (req.checkpoint.as_str(), &options.criu_image_path) {
            ("", None) => None,
            ("", Some(images)) => Some(images.clone()),
            (dir, _) => Some(PathBuf::from(dir)),
        }
        .map(|image_dir| RestoreSpec {
            image_dir,
            work_dir: options.criu_work_path.clone(),
            timeout: None,
            lazy: false,
        });
        // A template to restore from, or to capture, is asked for in the spec's annotations.
        let plan = TemplatePlan::read(Path::new(&req.bundle)).inspect_err(|e| {
            tracing::error!(id, "create refused: {e}");
        })?;
        let restore = match (checkpoint, plan.restore_from) {
            (None, None) => None,
            (Some(c), None) => Some(RestoreFrom::Checkpoint(c)),
            (None, Some(name)) => Some(RestoreFrom::Template(TemplateRestore {
                name,
                pull: plan.pull,
                lazy: plan.lazy,
            })),
            (Some(_), Some(name)) => {
                return Err(ShimError::InvalidArgument(format!(
                    "cannot restore container {id} both from a checkpoint and from template \
                     {name}"
                )))
            }
        };
        let stdio = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let io_owner = options.io_owner;
        let opened = open_stdio(&stdio, &self.namespace, &id, io_owner).await?;
        let (fds, feeder, output, fifo_readers) =
            (opened.fds, opened.stdin, opened.output, opened.fifo_readers);
        let spec = CreateSpec {
            id: id.clone(),
            bundle: PathBuf::from(&req.bundle),
            rootfs: req
                .rootfs
                .iter()
                .map(|m| RootfsMount {
                    kind: m.type_.clone(),
                    source: m.source.clone(),
                    options: m.options.clone(),
                })
                .collect(),
            options,
            restore,
        };
        let spawning = self.spawning();
        let created = self.engine.create(&spec, fds).await;
        let (pid, console) = match created {
            Ok(Spawned { pid, console }) => (pid, console),
            Err(e) => {
                if let Some(f) = feeder {
                    f.abort();
                }
                tracing::error!(id, "create failed: {e}");
                return Err(e.into());
            }
        };
        let console = match attach_console(console, &stdio) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(id, "create failed: {e}");
                if let Err(clean) = self.engine.delete(&id, &spec.bundle).await {
                    tracing::warn!(id, "cleanup after failed create: {clean}");
                }
                return Err(e);
            }
        };
        let mut init = Process::new(pid, State::Created, stdio);
        init.stdin = feeder;
        init.output = output;
        init.console = console;
        init.fifo_readers = fifo_readers;
        init.announced = false;
        timeline::mark("create.engine_done", &id);
        let cgroup = CgroupSlot::default();
        let early = {
            let mut table = self.table();
            table.insert(
                id.clone(),
                Container {
                    bundle: spec.bundle.clone(),
                    init,
                    execs: HashMap::new(),
                    cgroup: cgroup.clone(),
                    paused: false,
                    restored: spec.restore.is_some(),
                    capture: plan.capture.map(|plan| TemplateCapturePlan {
                        plan,
                        rootfs: spec.rootfs.clone(),
                        bundle: spec.bundle.clone(),
                    }),
                    busy: None,
                    exec_spawns: 0,
                    io_owner,
                },
            );
            spawning.end(&table, pid)
        };
        self.early_exit(&id, "", early);
        tracing::info!(id, pid, restored = spec.restore.is_some(), "created");
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle,
                rootfs: req.rootfs,
                io: MessageField::some(TaskIO {
                    stdin: req.stdin,
                    stdout: req.stdout,
                    stderr: req.stderr,
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        timeline::mark("create.published", &id);
        self.announce(&id, "").await;
        // Opened after the answer (runc's shim also watches for OOM only from Start on);
        // Pause, Update, Stats and captures wait for it.
        let inner = self.clone();
        tokio::spawn(async move {
            inner.cgroup_of_slot(&id, &cgroup).await;
        });
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// Opens the container's cgroup and starts its OOM watch, which publishes TaskOOM.
    async fn open_cgroup(self: &Arc<Self>, id: &str) -> Option<Arc<ContainerCgroup>> {
        // Off the runtime's thread: opening reads the mount table and every hierarchy, and the
        // next request (Start) must not wait for it.
        let opened = match self.engine.cgroups_path(id).await {
            Ok(path) => {
                let id = id.to_string();
                tokio::task::spawn_blocking(move || ContainerCgroup::open(&id, &path))
                    .await
                    .unwrap_or_else(|e| {
                        Err(EngineError::Failed(format!(
                            "opening the cgroup panicked: {e}"
                        )))
                    })
            }
            Err(e) => Err(e),
        };
        let cgroup = match opened {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::warn!(
                    id,
                    "no cgroup: Pause, Update, Stats and OOM events fail: {e}"
                );
                return None;
            }
        };
        let weak = Arc::downgrade(self);
        let runtime = tokio::runtime::Handle::current();
        let container_id = id.to_string();
        let watched = cgroup.watch_oom(move || {
            let Some(inner) = weak.upgrade() else { return };
            let container_id = container_id.clone();
            runtime.spawn(async move {
                inner
                    .publish(
                        topics::TASK_OOM_EVENT_TOPIC,
                        Box::new(TaskOOM {
                            container_id,
                            ..Default::default()
                        }),
                    )
                    .await;
            });
        });
        if let Err(e) = watched {
            tracing::warn!(id, "no OOM events: {e}");
        }
        Some(cgroup)
    }

    /// The cgroup in container `id`'s `slot`, opened now unless it was (or is being) before.
    async fn cgroup_of_slot(
        self: &Arc<Self>,
        id: &str,
        slot: &CgroupSlot,
    ) -> Option<Arc<ContainerCgroup>> {
        let opened = slot.get_or_init(|| self.open_cgroup(id)).await.clone();
        if opened.is_some() {
            timeline::mark("create.cgroup_opened", id);
        }
        opened
    }

    /// The cgroup of running container `id`, for a call named `what`.
    async fn cgroup_of(
        self: &Arc<Self>,
        id: &str,
        what: &str,
    ) -> Result<(Arc<ContainerCgroup>, bool), ShimError> {
        self.cgroup_in(id, what, &[State::Running]).await
    }

    /// The cgroup of container `id` while its init is in one of `states`, for a call named
    /// `what`.
    async fn cgroup_in(
        self: &Arc<Self>,
        id: &str,
        what: &str,
        states: &[State],
    ) -> Result<(Arc<ContainerCgroup>, bool), ShimError> {
        let slot = {
            let table = self.table();
            let c = table
                .get(id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            if !states.contains(&c.init.state) {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot {what} container {id}: it is not running"
                )));
            }
            c.cgroup.clone()
        };
        let cgroup = self.cgroup_of_slot(id, &slot).await.ok_or_else(|| {
            ShimError::FailedPrecondition(format!(
                "cannot {what} container {id}: its cgroup could not be opened (see the shim log)"
            ))
        })?;
        // Read after the wait: a Pause or Resume may have gone through meanwhile.
        let paused = self.table().get(id).is_some_and(|c| c.paused);
        Ok((cgroup, paused))
    }

    fn set_paused(&self, id: &str, paused: bool) {
        if let Some(c) = self.table().get_mut(id) {
            c.paused = paused;
        }
    }

    async fn pause(self: &Arc<Self>, req: PauseRequest) -> Result<(), ShimError> {
        let _order = self.order(&req.id).await;
        let (cgroup, paused) = self.cgroup_of(&req.id, "pause").await?;
        if paused {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is already paused",
                req.id
            )));
        }
        blocking(move || cgroup.freeze(true)).await?;
        self.set_paused(&req.id, true);
        tracing::info!(id = req.id, "paused");
        self.publish(
            topics::TASK_PAUSED_EVENT_TOPIC,
            Box::new(TaskPaused {
                container_id: req.id,
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    async fn resume(self: &Arc<Self>, req: ResumeRequest) -> Result<(), ShimError> {
        let _order = self.order(&req.id).await;
        let (cgroup, paused) = self.cgroup_of(&req.id, "resume").await?;
        if !paused {
            return Err(ShimError::FailedPrecondition(format!(
                "container {} is not paused",
                req.id
            )));
        }
        blocking(move || cgroup.freeze(false)).await?;
        self.set_paused(&req.id, false);
        tracing::info!(id = req.id, "resumed");
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            Box::new(TaskResumed {
                container_id: req.id,
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    async fn update(self: &Arc<Self>, req: UpdateTaskRequest) -> Result<(), ShimError> {
        let resources = req.resources.into_option().ok_or_else(|| {
            ShimError::InvalidArgument(format!("update of container {} has no resources", req.id))
        })?;
        if !resources.type_url.ends_with(LINUX_RESOURCES) {
            return Err(ShimError::InvalidArgument(format!(
                "update of container {}: resources of type {:?}, not {LINUX_RESOURCES}",
                req.id, resources.type_url
            )));
        }
        // As runc's shim: a created task's limits can be changed before it starts.
        let (cgroup, _) = self
            .cgroup_in(&req.id, "update", &[State::Created, State::Running])
            .await?;
        blocking(move || cgroup.update(&resources.value)).await?;
        tracing::info!(id = req.id, "resources updated");
        Ok(())
    }

    async fn stats(self: &Arc<Self>, req: StatsRequest) -> Result<StatsResponse, ShimError> {
        let slot = {
            let table = self.table();
            let c = table
                .get(&req.id)
                .ok_or_else(|| ShimError::NotFound(format!("container {}", req.id)))?;
            c.cgroup.clone()
        };
        let cgroup = self.cgroup_of_slot(&req.id, &slot).await.ok_or_else(|| {
            ShimError::FailedPrecondition(format!(
                "no stats for container {}: its cgroup could not be opened (see the shim log)",
                req.id
            ))
        })?;
        let stats = blocking(move || cgroup.metrics()).await?;
        Ok(StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    /// Checkpoints a running container with CRIU. containerd pauses the task before and
    /// resumes it after; the engine dumps it frozen or not. The images go where the options
    /// say, else where containerd asks (it then stores them in its content store).
    async fn checkpoint(&self, req: CheckpointTaskRequest) -> Result<(), ShimError> {
        let id = req.id;
        let options = CheckpointOptions::from_any(req.options.as_ref()).inspect_err(|e| {
            tracing::error!(id, "checkpoint refused: {e}");
        })?;
        let bundle = {
            let table = self.table();
            let c = table
                .get(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            if c.init.state != State::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot checkpoint container {id}: it is not running"
                )));
            }
            c.bundle.clone()
        };
        let _busy = self.mark_busy(&id, "checkpoint")?;
        // As runc's shim: the images go where the options say, else where containerd asks.
        // containerd honours an image path only for runc's runtime names: for this one it
        // still stores its own directory in its content store, which then gets a record
        // naming where the images are.
        let (image_dir, record_dir) = match (options.image_path.as_str(), req.path.as_str()) {
            ("", "") => {
                return Err(ShimError::InvalidArgument(format!(
                    "checkpoint of container {id} names no directory for the images"
                )))
            }
            ("", path) => (PathBuf::from(path), None),
            (images, "") => (PathBuf::from(images), None),
            (images, path) => (PathBuf::from(images), Some(PathBuf::from(path))),
        };
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        let spec = CheckpointSpec {
            image_dir,
            record_dir,
            work_dir: non_empty(options.work_path).map(PathBuf::from),
            exit: options.exit,
            open_tcp: options.open_tcp,
            external_unix_sockets: options.external_unix_sockets,
            terminal: options.terminal,
            file_locks: options.file_locks,
            empty_namespaces: options.empty_namespaces,
            cgroups_mode: non_empty(options.cgroups_mode),
            // As runc: a connection waiting to be accepted fails the dump.
            skip_in_flight: false,
            // As runc: CRIU takes as long as it takes (the client may give up).
            timeout: None,
        };
        let started = std::time::Instant::now();
        self.engine
            .checkpoint(&id, &bundle, &spec)
            .await
            .inspect_err(|e| tracing::error!(id, "checkpoint failed: {e}"))?;
        tracing::info!(
            id,
            images = %spec.image_dir.display(),
            exit = spec.exit,
            ms = started.elapsed().as_millis() as u64,
            "checkpointed"
        );
        Ok(())
    }

    /// Marks a checkpoint or capture (`what`) of container `id` under way, until the
    /// returned guard is dropped; refused while another is.
    fn mark_busy(&self, id: &str, what: &'static str) -> Result<Busy<'_>, ShimError> {
        let mut table = self.table();
        let c = table
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        if let Some(other) = c.busy {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot {what} container {id}: a {other} of it is under way"
            )));
        }
        c.busy = Some(what);
        Ok(Busy {
            inner: self,
            id: id.to_string(),
        })
    }

    /// Waits until container `id` (init `pid`) is ready as its capture plan says, then
    /// captures it as a template: frozen, so that its files and memory agree, and running on
    /// afterwards. What comes of it is logged, and a failure is also recorded by the engine
    /// beside the templates, where `templates list` shows it.
    async fn capture_when_ready(
        self: Arc<Self>,
        id: String,
        pid: u32,
        capture: TemplateCapturePlan,
    ) {
        let name = capture.plan.name.clone();
        let outcome = match self.wait_ready(&id, pid, &capture.plan).await {
            Ok(()) => self.capture(&id, &capture).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(Captured::Kept { path, bytes }) => {
                tracing::info!(id, name, path = %path.display(), bytes, "template captured")
            }
            Ok(Captured::Exists { path }) => tracing::info!(
                id,
                name,
                path = %path.display(),
                "template exists: kept as it is, not captured again"
            ),
            Err(e) => {
                tracing::error!(id, name, "template not captured: {e}");
                self.engine
                    .template_failed(&name, &e.to_string(), &capture.bundle)
                    .await;
            }
        }
    }

    async fn wait_ready(&self, id: &str, pid: u32, plan: &CapturePlan) -> Result<(), EngineError> {
        let running = || {
            self.table()
                .get(id)
                .is_some_and(|c| c.init.state == State::Running && c.init.pid == pid)
        };
        match &plan.ready {
            Readiness::Delay(d) => {
                tokio::time::sleep(*d).await;
            }
            Readiness::File(path) => {
                let deadline = tokio::time::Instant::now() + plan.timeout;
                loop {
                    if !running() {
                        break;
                    }
                    match template::exists_in_container(pid, path) {
                        Ok(true) => break,
                        Ok(false) => {}
                        Err(e) if running() => {
                            return Err(EngineError::Failed(format!(
                                "cannot look for {} in container {id}: {e}",
                                path.display()
                            )))
                        }
                        Err(_) => break,
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(EngineError::Failed(format!(
                            "container {id} did not create {} within {:?}",
                            path.display(),
                            plan.timeout
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        if !running() {
            return Err(EngineError::Failed(format!(
                "container {id} stopped before it was ready"
            )));
        }
        Ok(())
    }

    /// The capture itself; no other capture or checkpoint of the container meanwhile.
    async fn capture(
        self: &Arc<Self>,
        id: &str,
        capture: &TemplateCapturePlan,
    ) -> Result<Captured, EngineError> {
        let _busy = self
            .mark_busy(id, "capture")
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        let (bundle, cgroup, paused) = {
            let table = self.table();
            let c = table
                .get(id)
                .filter(|c| c.init.state == State::Running)
                .ok_or_else(|| {
                    EngineError::Failed(format!("container {id} stopped before it was captured"))
                })?;
            (c.bundle.clone(), c.cgroup.clone(), c.paused)
        };
        let cgroup = self.cgroup_of_slot(id, &cgroup).await.ok_or_else(|| {
            EngineError::Failed(format!(
                "cannot capture container {id}: its cgroup is not open to freeze it"
            ))
        })?;
        if !paused {
            cgroup.freeze(true)?;
        }
        let spec = TemplateCapture {
            name: capture.plan.name.clone(),
            rootfs: capture.rootfs.clone(),
        };
        let started = std::time::Instant::now();
        let captured = self.engine.capture_template(id, &bundle, &spec).await;
        // Left frozen if it was paused meanwhile.
        let paused = self.table().get(id).is_none_or(|c| c.paused);
        if !paused {
            if let Err(e) = cgroup.freeze(false) {
                tracing::error!(id, "cannot thaw the container after its capture: {e}");
            }
        }
        tracing::debug!(
            id,
            ms = started.elapsed().as_millis() as u64,
            "capture done"
        );
        captured
    }

    async fn start(self: &Arc<Self>, req: StartRequest) -> Result<StartResponse, ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        if exec_id.is_empty() {
            self.start_init(id).await
        } else {
            self.start_exec(id, exec_id).await
        }
    }

    /// The state of process `exec_id` of container `id`, which Start needs to be Created.
    fn startable(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let table = self.table();
        let c = table
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        let p = c.process(id, exec_id)?;
        if p.state != State::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot start {}: it is {:?}",
                describe(id, exec_id),
                p.state
            )));
        }
        if !exec_id.is_empty() {
            if c.init.state != State::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot start {}: container {id} is not running",
                    describe(id, exec_id)
                )));
            }
            // A process started in a frozen cgroup would freeze before it reports, and the
            // engine's call with it.
            if c.paused {
                return Err(exec_while_paused());
            }
        }
        Ok(())
    }

    /// What `part` takes of exec `exec_id` of container `id`, not yet started.
    fn exec_part<T>(
        &self,
        id: &str,
        exec_id: &str,
        part: impl FnOnce(&Process) -> Option<T>,
    ) -> Result<T, ShimError> {
        let table = self.table();
        let c = table
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        part(c.process(id, exec_id)?).ok_or_else(|| {
            ShimError::FailedPrecondition(format!("{} has no spec", describe(id, exec_id)))
        })
    }

    /// Undoes what the Start of an exec of container `id` did before `e` stopped it: its
    /// process (if the engine started one) is killed, its input closed, and the exits that
    /// waited on it may go out.
    async fn exec_not_started(
        &self,
        id: &str,
        pid: Option<u32>,
        feeder: Option<StdinFeeder>,
        e: ShimError,
    ) -> ShimError {
        if let Some(pid) = pid {
            // Without its terminal's copies the process would hang its client: end it.
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if let Some(f) = feeder {
            f.abort();
        }
        self.count_exec_spawn(id, false);
        self.release_exits(id).await;
        e
    }

    /// Counts an exec of container `id` the engine starts (`true`) or has started.
    fn count_exec_spawn(&self, id: &str, starting: bool) {
        if let Some(c) = self.table().get_mut(id) {
            if starting {
                c.exec_spawns += 1;
            } else {
                c.exec_spawns = c.exec_spawns.saturating_sub(1);
            }
        }
    }

    async fn start_init(self: &Arc<Self>, id: String) -> Result<StartResponse, ShimError> {
        let _order = self.order(&id).await;
        self.startable(&id, "")?;
        let (pid, restored) = {
            let table = self.table();
            let c = &table[&id];
            (c.init.pid, c.restored)
        };
        // A restored init has run since Create: there is nothing to let go.
        if !restored {
            self.hold_exit(&id, "");
            if let Err(e) = self.engine.start(&id).await {
                self.announce(&id, "").await;
                return Err(e.into());
            }
        }
        let capture = self.table().get_mut(&id).and_then(|c| {
            if c.init.state == State::Created {
                c.init.state = State::Running;
            }
            c.capture.take()
        });
        if let Some(capture) = capture {
            let inner = self.clone();
            let id = id.clone();
            tokio::spawn(async move { inner.capture_when_ready(id, pid, capture).await });
        }
        tracing::info!(id, pid, "started");
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: id.clone(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        self.announce(&id, "").await;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start_exec(
        self: &Arc<Self>,
        id: String,
        exec_id: String,
    ) -> Result<StartResponse, ShimError> {
        self.startable(&id, &exec_id)?;
        let stdio_paths = self.exec_part(&id, &exec_id, |p| Some(p.stdio.clone()))?;
        let io_owner = self.table().get(&id).and_then(|c| c.io_owner);
        // Opened before the container's lock is taken: a logger may take its time.
        let opened = open_stdio(&stdio_paths, &self.namespace, &id, io_owner).await?;
        let (fds, feeder, output, fifo_readers) =
            (opened.fds, opened.stdin, opened.output, opened.fifo_readers);
        let abort = |feeder: Option<StdinFeeder>| {
            if let Some(f) = feeder {
                f.abort();
            }
        };
        let _order = self.order(&id).await;
        let exec = match self
            .startable(&id, &exec_id)
            .and_then(|()| self.exec_part(&id, &exec_id, |p| p.exec.clone()))
        {
            Ok(exec) => exec,
            Err(e) => {
                abort(feeder);
                return Err(e);
            }
        };
        let spawning = self.spawning();
        self.count_exec_spawn(&id, true);
        let spawned = self.engine.exec(&id, &exec, fds).await;
        let (pid, console) = match spawned {
            Ok(Spawned { pid, console }) => (pid, console),
            Err(e) => return Err(self.exec_not_started(&id, None, feeder, e.into()).await),
        };
        let console = match attach_console(console, &stdio_paths) {
            Ok(c) => c,
            Err(e) => return Err(self.exec_not_started(&id, Some(pid), feeder, e).await),
        };
        let recorded = {
            let mut table = self.table();
            match table.get_mut(&id).and_then(|c| c.execs.get_mut(&exec_id)) {
                Some(p) => {
                    p.pid = pid;
                    p.state = State::Running;
                    p.stdin = feeder;
                    p.output = output;
                    p.console = console;
                    p.fifo_readers = fifo_readers;
                    p.exec = None;
                    p.announced = false;
                    if let Some(c) = table.get_mut(&id) {
                        c.exec_spawns -= 1;
                    }
                    Ok(spawning.end(&table, pid))
                }
                None => Err(feeder),
            }
        };
        let early = match recorded {
            Ok(early) => early,
            Err(feeder) => {
                let gone = ShimError::NotFound(describe(&id, &exec_id));
                return Err(self.exec_not_started(&id, Some(pid), feeder, gone).await);
            }
        };
        self.early_exit(&id, &exec_id, early);
        tracing::info!(id, exec_id, pid, "exec started");
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.clone(),
                exec_id: exec_id.clone(),
                pid,
                ..Default::default()
            }),
        )
        .await;
        self.announce(&id, &exec_id).await;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn exec(&self, req: ExecProcessRequest) -> Result<(), ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        let mut process: serde_json::Value = serde_json::from_slice(&req.spec.value)
            .map_err(|e| ShimError::InvalidArgument(format!("exec {exec_id}: bad spec: {e}")))?;
        // As runc's shim: the request decides whether the process gets a terminal, whatever
        // its process spec says (a client may ask for one in the IO only).
        match process.as_object_mut() {
            Some(p) => {
                p.insert("terminal".into(), req.terminal.into());
            }
            None => {
                return Err(ShimError::InvalidArgument(format!(
                    "exec {exec_id}: the process spec is not an object"
                )))
            }
        }
        {
            let mut table = self.table();
            let c = table
                .get_mut(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            if c.init.state != State::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot exec in container {id}: it is not running"
                )));
            }
            if c.paused {
                return Err(exec_while_paused());
            }
            if c.execs.contains_key(&exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "exec {exec_id} of container {id}"
                )));
            }
            let stdio = StdioPaths {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                terminal: req.terminal,
            };
            let mut p = Process::new(0, State::Created, stdio);
            p.exec = Some(ExecSpec {
                exec_id: exec_id.clone(),
                process,
            });
            c.execs.insert(exec_id.clone(), p);
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: id,
                exec_id,
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    async fn kill(&self, req: KillRequest) -> Result<(), ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        let signal = req.signal as i32;
        let (pid, state) = {
            let table = self.table();
            let c = table
                .get(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            let p = c.process(&id, &exec_id)?;
            (p.pid, p.state)
        };
        if req.all && exec_id.is_empty() {
            self.engine.signal_all(&id, signal).await?;
            self.thaw_after_kill(&id, signal).await;
            self.keep_paused(&id).await;
            return Ok(());
        }
        if state == State::Stopped || pid == 0 {
            return Err(ShimError::NotFound(format!(
                "{}: process already finished",
                describe(&id, &exec_id)
            )));
        }
        // Signal 0 checks that the process exists, as kill(2) does.
        let sig = match signal {
            0 => None,
            n => Some(
                Signal::try_from(n)
                    .map_err(|_| ShimError::InvalidArgument(format!("signal {signal}")))?,
            ),
        };
        match kill(Pid::from_raw(pid as i32), sig) {
            Ok(()) => {
                if exec_id.is_empty() {
                    self.thaw_after_kill(&id, signal).await;
                }
                Ok(())
            }
            Err(nix::errno::Errno::ESRCH) => Err(ShimError::NotFound(format!(
                "{}: process already finished",
                describe(&id, &exec_id)
            ))),
            Err(e) => Err(ShimError::Io {
                what: "signal",
                path: format!("pid {pid}").into(),
                source: e.into(),
            }),
        }
    }

    /// A frozen process cannot act on SIGKILL: as runc does, a paused container is thawed
    /// after it is sent one, so it dies.
    async fn thaw_after_kill(&self, id: &str, signal: i32) {
        if signal != Signal::SIGKILL as i32 {
            return;
        }
        let cgroup = {
            let table = self.table();
            match table.get(id) {
                Some(c) if c.paused => c.cgroup.get().cloned().flatten(),
                _ => None,
            }
        };
        if let Some(cgroup) = cgroup {
            match blocking(move || cgroup.freeze(false)).await {
                Ok(()) => self.set_paused(id, false),
                Err(e) => tracing::warn!(id, "cannot thaw after SIGKILL: {e}"),
            }
        }
    }

    /// Signalling every process freezes and thaws the cgroup on the way (so none escapes
    /// by forking): a container paused before stays paused.
    async fn keep_paused(&self, id: &str) {
        let cgroup = {
            let table = self.table();
            match table.get(id) {
                Some(c) if c.paused => c.cgroup.get().cloned().flatten(),
                _ => None,
            }
        };
        if let Some(cgroup) = cgroup.filter(|c| !c.is_frozen()) {
            if let Err(e) = blocking(move || cgroup.freeze(true)).await {
                tracing::warn!(id, "cannot freeze again after signalling all: {e}");
            }
        }
    }

    async fn wait(&self, req: WaitRequest) -> Result<WaitResponse, ShimError> {
        let mut rx = {
            let table = self.table();
            let c = table
                .get(&req.id)
                .ok_or_else(|| ShimError::NotFound(format!("container {}", req.id)))?;
            c.process(&req.id, &req.exec_id)?.exited.subscribe()
        };
        let exit = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| ShimError::NotFound(describe(&req.id, &req.exec_id)))?
            .expect("waited for Some");
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    async fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        if !exec_id.is_empty() {
            let _order = self.order(&id).await;
            let mut table = self.table();
            let c = table
                .get_mut(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            let p = c.process(&id, &exec_id)?;
            if p.state == State::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot delete {}: it is running",
                    describe(&id, &exec_id)
                )));
            }
            let p = c.execs.remove(&exec_id).expect("looked up above");
            if let Some(f) = &p.stdin {
                f.abort();
            }
            let exit = p.exit.unwrap_or(Exit {
                status: 0,
                at: SystemTime::now(),
            });
            return Ok(DeleteResponse {
                pid: p.pid,
                exit_status: exit.status,
                exited_at: timestamp(exit.at),
                ..Default::default()
            });
        }

        let (state, mut exited) = {
            let table = self.table();
            let c = table
                .get(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            (c.init.state, c.init.exited.subscribe())
        };
        match state {
            State::Running => {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot delete container {id}: it is running"
                )))
            }
            State::Created => {
                // Never started: the init waits for Start. It dies now, and its exit is
                // reported like any other before the container goes.
                self.engine.signal_all(&id, Signal::SIGKILL as i32).await?;
                let _ = tokio::time::timeout(KILL_WAIT, exited.wait_for(Option::is_some)).await;
            }
            State::Stopped => {}
        }

        let _order = self.order(&id).await;
        let (bundle, slot) = match self.table().get(&id) {
            Some(c) => (c.bundle.clone(), c.cgroup.clone()),
            None => return Err(ShimError::NotFound(format!("container {id}"))),
        };
        // A cgroup being opened is waited for, so that no OOM watch starts on a removed
        // cgroup; one not opened yet never will be.
        slot.get_or_init(|| async { None }).await;
        self.engine.delete(&id, &bundle).await?;
        let c = self
            .table()
            .remove(&id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        for p in std::iter::once(&c.init).chain(c.execs.values()) {
            if let Some(f) = &p.stdin {
                f.abort();
            }
        }
        let exit = c.init.exit.unwrap_or(Exit {
            status: 128 + Signal::SIGKILL as u32,
            at: SystemTime::now(),
        });
        self.forget_lock(&id);
        tracing::info!(id, "deleted");
        let _exits = self.exits.lock().await;
        // Exits still held (an exec's not reaped yet kept the init's) go out before the end.
        let mut c = c;
        let mut held: Vec<TaskExit> = c
            .execs
            .values_mut()
            .filter_map(|p| p.held_exit.take())
            .collect();
        held.extend(c.init.held_exit.take());
        self.publish_exits(held).await;
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.clone(),
                id,
                pid: c.init.pid,
                exit_status: exit.status,
                exited_at: timestamp(exit.at),
                ..Default::default()
            }),
        )
        .await;
        Ok(DeleteResponse {
            pid: c.init.pid,
            exit_status: exit.status,
            exited_at: timestamp(exit.at),
            ..Default::default()
        })
    }

    fn state(&self, req: StateRequest) -> Result<StateResponse, ShimError> {
        let table = self.table();
        let c = table
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {}", req.id)))?;
        let p = c.process(&req.id, &req.exec_id)?;
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid,
            status: if c.paused && p.state == State::Running {
                Status::PAUSED
            } else {
                p.status()
            }
            .into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: p.exit.map_or(0, |e| e.status),
            exited_at: p.exit.map_or_else(MessageField::none, |e| timestamp(e.at)),
            exec_id: req.exec_id,
            ..Default::default()
        })
    }

    async fn pids(&self, req: PidsRequest) -> Result<PidsResponse, ShimError> {
        if !self.table().contains_key(&req.id) {
            return Err(ShimError::NotFound(format!("container {}", req.id)));
        }
        let pids = self.engine.pids(&req.id).await?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn close_io(&self, req: CloseIORequest) -> Result<(), ShimError> {
        let table = self.table();
        let c = table
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {}", req.id)))?;
        let p = c.process(&req.id, &req.exec_id)?;
        if let Some(f) = &p.stdin {
            f.close();
        }
        if let Some(c) = &p.console {
            c.close_stdin();
        }
        Ok(())
    }

    fn resize_pty(&self, req: ResizePtyRequest) -> Result<(), ShimError> {
        let table = self.table();
        let c = table
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {}", req.id)))?;
        // A process without a terminal has nothing to resize: a no-op, as in runc's shim.
        match &c.process(&req.id, &req.exec_id)?.console {
            Some(console) => console.resize(req.width, req.height),
            None => Ok(()),
        }
    }

    fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse, ShimError> {
        let table = self.table();
        let task_pid = table.get(&req.id).map_or(0, |c| c.init.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self) {
        if self.table().is_empty() {
            tracing::info!("no container left: shutting down");
            self.exit.signal();
        }
    }
}

/// The held TaskExits of container `c` that may go out now, in the order they must: those
/// of its execs whose start is announced, then its init's once it is announced and no exec
/// can still report an exit (as runc's shim: containerd takes the init's exit as the
/// container's end, after which an exec's would come too late).
fn releasable(c: &mut Container) -> Vec<TaskExit> {
    let mut out: Vec<TaskExit> = c
        .execs
        .values_mut()
        .filter(|p| p.announced)
        .filter_map(|p| p.held_exit.take())
        .collect();
    let execs_pending = c.exec_spawns > 0
        || c.execs
            .values()
            .any(|p| p.state == State::Running || p.held_exit.is_some());
    if c.init.announced && !execs_pending {
        out.extend(c.init.held_exit.take());
    }
    out
}

/// Whether the processes of the container of `bundle` must be killed when its init exits:
/// when it has no pid namespace of its own (the host's, or another container's by path), as
/// runc's shim decides (`ShouldKillAllOnExit`). An unreadable spec says yes, as there.
fn kills_all_on_exit(bundle: &Path) -> bool {
    #[derive(serde::Deserialize)]
    struct Spec {
        linux: Option<Linux>,
    }
    #[derive(serde::Deserialize)]
    struct Linux {
        #[serde(default)]
        namespaces: Vec<Namespace>,
    }
    #[derive(serde::Deserialize)]
    struct Namespace {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        path: String,
    }
    let spec: Option<Spec> = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    !spec.and_then(|s| s.linux).is_some_and(|l| {
        l.namespaces
            .iter()
            .any(|n| n.kind == "pid" && n.path.is_empty())
    })
}

/// runc's refusal of an exec into a paused container, word for word (and, as runc's shim
/// sends it, with code Unknown).
fn exec_while_paused() -> ShimError {
    ShimError::Engine(EngineError::Failed("cannot exec in a paused state".into()))
}

/// Starts the copies of a process's terminal, when the engine returned one.
fn attach_console(
    master: Option<std::os::fd::OwnedFd>,
    stdio: &StdioPaths,
) -> Result<Option<Console>, ShimError> {
    match master {
        Some(m) => Console::attach(m, stdio).map(Some),
        None if stdio.terminal => Err(ShimError::Engine(EngineError::Failed(
            "the engine returned no terminal for a process that asked for one".into(),
        ))),
        None => Ok(None),
    }
}

/// Runs cgroup file work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ShimError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShimError::Engine(EngineError::Failed(format!("cgroup work panicked: {e}"))))?
        .map_err(ShimError::from)
}

/// Opens the streams of a new process of container `id` off the runtime's threads: a
/// `binary://` logger may take up to its readiness limit, and nothing else may wait on it.
async fn open_stdio(
    paths: &StdioPaths,
    namespace: &str,
    id: &str,
    io: Option<IoOwner>,
) -> Result<OpenedStdio, ShimError> {
    let (paths, namespace, id) = (paths.clone(), namespace.to_string(), id.to_string());
    tokio::task::spawn_blocking(move || {
        paths.open(StreamOwner {
            namespace: &namespace,
            container_id: &id,
            io,
        })
    })
    .await
    .map_err(|e| {
        ShimError::Engine(EngineError::Failed(format!(
            "opening the streams panicked: {e}"
        )))
    })?
}

/// A container's cgroup, opened (with its OOM watch) once Create has answered, off its
/// critical path: whoever needs it first opens it, later callers wait for that (see
/// [`Inner::cgroup_of_slot`]). `None` inside when it could not be opened.
type CgroupSlot = Arc<tokio::sync::OnceCell<Option<Arc<ContainerCgroup>>>>;

/// The id a timeline step is recorded under: the container's, or `ID/EXEC` for an exec.
fn step_id(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        id.to_string()
    } else {
        format!("{id}/{exec_id}")
    }
}

fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

type TtrpcResult<T> = ttrpc::Result<T>;

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let id = req.id.clone();
        timeline::mark("create.begin", &id);
        let r = self.inner.create(req).await;
        timeline::mark("create.end", &id);
        Ok(r?)
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let id = step_id(&req.id, &req.exec_id);
        timeline::mark("start.begin", &id);
        let r = self.inner.start(req).await;
        timeline::mark("start.end", &id);
        Ok(r?)
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        self.inner.exec(req).await?;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        self.inner.kill(req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let id = step_id(&req.id, &req.exec_id);
        timeline::mark("wait.begin", &id);
        let r = self.inner.wait(req).await;
        timeline::mark("wait.end", &id);
        Ok(r?)
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let id = step_id(&req.id, &req.exec_id);
        timeline::mark("delete.begin", &id);
        let r = self.inner.delete(req).await;
        timeline::mark("delete.end", &id);
        Ok(r?)
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        Ok(self.inner.state(req)?)
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        Ok(self.inner.pids(req).await?)
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        self.inner.close_io(req)?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        self.inner.resize_pty(req)?;
        Ok(Empty::new())
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        Ok(self.inner.connect(req)?)
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        self.inner.pause(req).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        self.inner.resume(req).await?;
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.inner.update(req).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        Ok(self.inner.stats(req).await?)
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        self.inner.checkpoint(req).await?;
        Ok(Empty::new())
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        timeline::mark("shutdown", "");
        self.inner.shutdown();
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pid_namespace_of_its_own_keeps_the_processes_after_init() {
        let bundle = std::env::temp_dir().join(format!("hb-killall-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        let cases = [
            (
                r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#,
                false,
            ),
            (r#"{"linux":{"namespaces":[{"type":"mount"}]}}"#, true),
            (
                r#"{"linux":{"namespaces":[{"type":"pid","path":"/proc/9/ns/pid"}]}}"#,
                true,
            ),
            (r#"{"process":{}}"#, true),
            ("not json", true),
        ];
        for (spec, kill_all) in cases {
            std::fs::write(bundle.join("config.json"), spec).unwrap();
            assert_eq!(kills_all_on_exit(&bundle), kill_all, "{spec}");
        }
        std::fs::remove_dir_all(&bundle).unwrap();
    }
}

//! Create: the runtime options and the restore source decided before anything is opened,
//! the streams, the engine's create, the process table's new entry and TaskCreate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api::{CreateTaskRequest, CreateTaskResponse};
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;

use crate::cgroup::ContainerCgroup;
use crate::console::Console;
use crate::engine::{CreateSpec, RestoreFrom, RestoreSpec, RootfsMount, Spawned, TemplateRestore};
use crate::error::{EngineError, ShimError};
use crate::options::RuntimeOptions;
use crate::stdio::{IoOwner, OpenedStdio, StdioPaths, StreamOwner};
use crate::timeline;

use super::bundle::BundleSpec;
use super::state::{check_id, CgroupSlot, Container, Process, State, TemplateCapturePlan};
use super::Inner;

impl Inner {
    pub(super) async fn create(
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

    pub(super) async fn create_locked(
        self: &Arc<Self>,
        req: CreateTaskRequest,
    ) -> Result<CreateTaskResponse, ShimError> {
        let id = req.id.clone();
        // First: the id names the container's state, cgroup and mounts.
        check_id(&id).inspect_err(|e| tracing::error!(id, "create refused: {e}"))?;
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
        let bundle_spec = BundleSpec::read(Path::new(&req.bundle)).inspect_err(|e| {
            tracing::error!(id, "create refused: {e}");
        })?;
        let plan = bundle_spec.plan;
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
        let (pid, console, cgroups_path) = match created {
            Ok(Spawned {
                pid,
                console,
                cgroups_path,
            }) => (pid, console, cgroups_path),
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
                    kills_all_on_exit: bundle_spec.kills_all_on_exit,
                    cgroups_path,
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
}

/// Starts the copies of a process's terminal, when the engine returned one.
pub(super) fn attach_console(
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

/// Opens the streams of a new process of container `id` off the runtime's threads: a
/// `binary://` logger may take up to its readiness limit, and nothing else may wait on it.
pub(super) async fn open_stdio(
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

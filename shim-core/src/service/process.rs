//! The calls on a container's processes: Start, Exec, Kill, Wait, Delete, State, Pids,
//! CloseIO, ResizePty, Connect and Shutdown.

use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, DeleteRequest, DeleteResponse,
    ExecProcessRequest, KillRequest, PidsRequest, PidsResponse, ResizePtyRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, Status, WaitRequest, WaitResponse,
};
use containerd_shim::protos::events::task::{
    TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskStart,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::protos::types::task::ProcessInfo;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::engine::{ExecSpec, Spawned};
use crate::error::ShimError;
use crate::stdio::{StdinFeeder, StdioPaths};

use super::create::{attach_console, open_stdio};
use super::state::{describe, Exit, KillTarget, Process, State};
use super::{timestamp, Inner, KILL_WAIT};

impl Inner {
    pub(super) async fn start(
        self: &Arc<Self>,
        req: StartRequest,
    ) -> Result<StartResponse, ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        if exec_id.is_empty() {
            self.start_init(id).await
        } else {
            self.start_exec(id, exec_id).await
        }
    }

    /// The state of process `exec_id` of container `id`, which Start needs to be Created.
    pub(super) fn startable(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let table = self.table();
        let c = table
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        c.check_start(id, exec_id)
    }

    /// What `part` takes of exec `exec_id` of container `id`, not yet started.
    pub(super) fn exec_part<T>(
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
    pub(super) async fn exec_not_started(
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
    pub(super) fn count_exec_spawn(&self, id: &str, starting: bool) {
        if let Some(c) = self.table().get_mut(id) {
            if starting {
                c.exec_spawns += 1;
            } else {
                c.exec_spawns = c.exec_spawns.saturating_sub(1);
            }
        }
    }

    pub(super) async fn start_init(
        self: &Arc<Self>,
        id: String,
    ) -> Result<StartResponse, ShimError> {
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

    pub(super) async fn start_exec(
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
            Ok(Spawned { pid, console, .. }) => (pid, console),
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

    pub(super) async fn exec(&self, req: ExecProcessRequest) -> Result<(), ShimError> {
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
            c.check_exec(&id, &exec_id)?;
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

    pub(super) async fn kill(&self, req: KillRequest) -> Result<(), ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        let signal = req.signal as i32;
        let target = {
            let table = self.table();
            let c = table
                .get(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            c.check_kill(&id, &exec_id, req.all)?
        };
        let pid = match target {
            KillTarget::All => {
                self.engine.signal_all(&id, signal).await?;
                self.thaw_after_kill(&id, signal).await;
                self.keep_paused(&id).await;
                return Ok(());
            }
            KillTarget::Pid(pid) => pid,
        };
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

    pub(super) async fn wait(&self, req: WaitRequest) -> Result<WaitResponse, ShimError> {
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

    pub(super) async fn delete(&self, req: DeleteRequest) -> Result<DeleteResponse, ShimError> {
        let (id, exec_id) = (req.id, req.exec_id);
        if !exec_id.is_empty() {
            let _order = self.order(&id).await;
            let mut table = self.table();
            let c = table
                .get_mut(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            c.check_delete(&id, &exec_id)?;
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
            c.check_delete(&id, "")?;
            (c.init.state, c.init.exited.subscribe())
        };
        match state {
            State::Created => {
                // Never started: the init waits for Start. It dies now, and its exit is
                // reported like any other before the container goes.
                self.engine.signal_all(&id, Signal::SIGKILL as i32).await?;
                let _ = tokio::time::timeout(KILL_WAIT, exited.wait_for(Option::is_some)).await;
            }
            State::Stopped | State::Running => {}
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

    pub(super) fn state(&self, req: StateRequest) -> Result<StateResponse, ShimError> {
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

    pub(super) async fn pids(&self, req: PidsRequest) -> Result<PidsResponse, ShimError> {
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

    pub(super) fn close_io(&self, req: CloseIORequest) -> Result<(), ShimError> {
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

    pub(super) fn resize_pty(&self, req: ResizePtyRequest) -> Result<(), ShimError> {
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

    pub(super) fn connect(&self, req: ConnectRequest) -> Result<ConnectResponse, ShimError> {
        let table = self.table();
        let task_pid = table.get(&req.id).map_or(0, |c| c.init.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    pub(super) fn shutdown(&self) {
        if self.table().is_empty() {
            tracing::info!("no container left: shutting down");
            self.exit.signal();
        }
    }
}

//! The process table's records and the state machine they follow: which request each
//! state admits, and with which error code one is refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::api::Status;
use containerd_shim::protos::events::task::TaskExit;
use tokio::sync::watch;

use crate::cgroup::ContainerCgroup;
use crate::console::Console;
use crate::engine::{ExecSpec, RootfsMount};
use crate::error::{EngineError, ShimError};
use crate::stdio::{IoOwner, OutputCopy, StdinFeeder, StdioPaths};
use crate::template::CapturePlan;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Exit {
    pub(super) status: u32,
    pub(super) at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Init: created, waiting for Start. Exec: added, not started (no pid yet).
    Created,
    Running,
    Stopped,
}

#[derive(Debug)]
pub(super) struct Process {
    pub(super) pid: u32,
    pub(super) state: State,
    pub(super) exit: Option<Exit>,
    pub(super) exited: watch::Sender<Option<Exit>>,
    pub(super) stdio: StdioPaths,
    pub(super) stdin: Option<StdinFeeder>,
    /// The copy of its output into a `file://` log, when it has one.
    pub(super) output: Option<OutputCopy>,
    /// The process's terminal, when it has one.
    pub(super) console: Option<Console>,
    /// For an exec not yet started.
    pub(super) exec: Option<ExecSpec>,
    /// Read ends of its output FIFOs, held until it exits (see `OpenedStdio`).
    pub(super) fifo_readers: Vec<std::os::fd::OwnedFd>,
    /// Whether the event of its last state change (TaskCreate, TaskStart, TaskExecStarted)
    /// is out; until it is, its TaskExit waits in `held_exit`.
    pub(super) announced: bool,
    pub(super) held_exit: Option<TaskExit>,
}

impl Process {
    pub(super) fn new(pid: u32, state: State, stdio: StdioPaths) -> Self {
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

    pub(super) fn status(&self) -> Status {
        match self.state {
            State::Created => Status::CREATED,
            State::Running => Status::RUNNING,
            State::Stopped => Status::STOPPED,
        }
    }

    pub(super) fn set_exit(&mut self, exit: Exit) {
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
pub(super) struct Container {
    pub(super) bundle: PathBuf,
    pub(super) init: Process,
    pub(super) execs: HashMap<String, Process>,
    /// Its cgroup, for Pause/Resume, Update, Stats and OOM events; `None` inside when the
    /// engine's cgroup could not be opened (logged).
    pub(super) cgroup: CgroupSlot,
    /// Frozen by Pause.
    pub(super) paused: bool,
    /// Restored from a checkpoint: its init runs from Create on, Start only reports it.
    pub(super) restored: bool,
    /// The template to capture once it is ready (annotations), taken by Start.
    pub(super) capture: Option<TemplateCapturePlan>,
    /// A checkpoint or capture under way (its name), during which another is refused.
    pub(super) busy: Option<&'static str>,
    /// Execs the engine is starting, whose pids are not in the table yet.
    pub(super) exec_spawns: usize,
    /// Who owns its processes' pipes (runtime options `io_uid`/`io_gid`).
    pub(super) io_owner: Option<IoOwner>,
    /// Its processes are killed when its init exits (it has no pid namespace of its own).
    pub(super) kills_all_on_exit: bool,
    /// Its cgroup's path, when the engine gave it with Create.
    pub(super) cgroups_path: Option<PathBuf>,
}

/// A capture a container asked for, with the rootfs mounts the engine needs for it.
#[derive(Debug, Clone)]
pub(super) struct TemplateCapturePlan {
    pub(super) plan: CapturePlan,
    pub(super) rootfs: Vec<RootfsMount>,
    /// The container's bundle (whose spec says whose template it is).
    pub(super) bundle: PathBuf,
}

impl Container {
    pub(super) fn process(&self, id: &str, exec_id: &str) -> Result<&Process, ShimError> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {id}")))
    }

    pub(super) fn process_mut(
        &mut self,
        id: &str,
        exec_id: &str,
    ) -> Result<&mut Process, ShimError> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| ShimError::NotFound(format!("exec {exec_id} of container {id}")))
    }

    // The state machine. Each request is admitted or refused here, before the engine is
    // called; the handlers call these and nothing else decides. The table in this module's
    // tests is the whole of it. The integration suites (shim_parity, runc_behaviours) run the
    // same requests through runc's shim and ours and compare the answers.

    /// Start of process `exec_id` (init when empty): it must be Created; an exec's container
    /// must run and not be paused.
    pub(super) fn check_start(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        let p = self.process(id, exec_id)?;
        if p.state != State::Created {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot start {}: it is {:?}",
                describe(id, exec_id),
                p.state
            )));
        }
        if !exec_id.is_empty() {
            if self.init.state != State::Running {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot start {}: container {id} is not running",
                    describe(id, exec_id)
                )));
            }
            // A process started in a frozen cgroup would freeze before it reports, and the
            // engine's call with it.
            if self.paused {
                return Err(exec_while_paused());
            }
        }
        Ok(())
    }

    /// Exec (the adding of process `exec_id`): the container must run, not paused, and have
    /// no process of that id.
    pub(super) fn check_exec(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        if self.init.state != State::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot exec in container {id}: it is not running"
            )));
        }
        if self.paused {
            return Err(exec_while_paused());
        }
        if self.execs.contains_key(exec_id) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {exec_id} of container {id}"
            )));
        }
        Ok(())
    }

    /// Kill of process `exec_id` (`all`: every process of the container, asked of the init):
    /// whom to signal. A process that has finished (or an exec never started) is not found,
    /// as kill(2) would say; signalling all is always admitted.
    pub(super) fn check_kill(
        &self,
        id: &str,
        exec_id: &str,
        all: bool,
    ) -> Result<KillTarget, ShimError> {
        let p = self.process(id, exec_id)?;
        if all && exec_id.is_empty() {
            return Ok(KillTarget::All);
        }
        if p.state == State::Stopped || p.pid == 0 {
            return Err(ShimError::NotFound(format!(
                "{}: process already finished",
                describe(id, exec_id)
            )));
        }
        Ok(KillTarget::Pid(p.pid))
    }

    /// A call named `what` (update, checkpoint, pause...) that needs the init in one of
    /// `states`.
    pub(super) fn check_init_in(
        &self,
        id: &str,
        what: &str,
        states: &[State],
    ) -> Result<(), ShimError> {
        if !states.contains(&self.init.state) {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot {what} container {id}: it is not running"
            )));
        }
        Ok(())
    }

    /// Pause (`pause`) or Resume: the container must run, and not be paused already (Pause)
    /// or be paused (Resume).
    pub(super) fn check_freeze(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        let what = if pause { "pause" } else { "resume" };
        self.check_init_in(id, what, &[State::Running])?;
        match (pause, self.paused) {
            (true, true) => Err(ShimError::FailedPrecondition(format!(
                "container {id} is already paused"
            ))),
            (false, false) => Err(ShimError::FailedPrecondition(format!(
                "container {id} is not paused"
            ))),
            _ => Ok(()),
        }
    }

    /// A checkpoint or capture (`what`): refused while another is under way.
    pub(super) fn check_busy(&self, id: &str, what: &str) -> Result<(), ShimError> {
        match self.busy {
            Some(other) => Err(ShimError::FailedPrecondition(format!(
                "cannot {what} container {id}: a {other} of it is under way"
            ))),
            None => Ok(()),
        }
    }

    /// Delete of process `exec_id` (the container when empty): refused while it runs (a
    /// paused init runs). A Created init is killed first by the caller.
    pub(super) fn check_delete(&self, id: &str, exec_id: &str) -> Result<(), ShimError> {
        if self.process(id, exec_id)?.state == State::Running {
            return Err(ShimError::FailedPrecondition(format!(
                "cannot delete {}: it is running",
                describe(id, exec_id)
            )));
        }
        Ok(())
    }
}

/// Whom a Kill the state machine admitted signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KillTarget {
    /// Every process of the container, through the engine.
    All,
    /// One process.
    Pid(u32),
}

/// The held TaskExits of container `c` that may go out now, in the order they must: those
/// of its execs whose start is announced, then its init's once it is announced and no exec
/// can still report an exit (as runc's shim: containerd takes the init's exit as the
/// container's end, after which an exec's would come too late).
pub(super) fn releasable(c: &mut Container) -> Vec<TaskExit> {
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

/// runc's refusal of an exec into a paused container, word for word (and, as runc's shim
/// sends it, with code Unknown).
pub(super) fn exec_while_paused() -> ShimError {
    ShimError::Engine(EngineError::Failed("cannot exec in a paused state".into()))
}

/// A container's cgroup, opened (with its OOM watch) once Create has answered, off its
/// critical path: whoever needs it first opens it, later callers wait for that (see
/// `Inner::cgroup_of_slot`). `None` inside when it could not be opened.
pub(super) type CgroupSlot = Arc<tokio::sync::OnceCell<Option<Arc<ContainerCgroup>>>>;

/// A container id as runc and libcontainer take it: 1 to 1024 of `[A-Za-z0-9_+.-]`, not `.`
/// or `..`, so that it is one path component wherever the engine puts it. containerd checks
/// ids too (more strictly); this holds for a client that talks to the shim directly.
pub(super) fn check_id(id: &str) -> Result<(), ShimError> {
    let chars_ok = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '+' | '-' | '.'));
    if id.is_empty() || id.len() > 1024 || !chars_ok || id == "." || id == ".." {
        return Err(ShimError::InvalidArgument(format!(
            "container id {id:?} is not 1 to 1024 of [A-Za-z0-9_+.-] (nor . or ..)"
        )));
    }
    Ok(())
}

pub(super) fn describe(id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {id}")
    } else {
        format!("exec {exec_id} of container {id}")
    }
}

#[cfg(test)]
mod tests {
    use containerd_shim::protos::ttrpc::Code;

    use super::*;

    /// The init's states as containerd sees them: Paused is a running init in a frozen
    /// cgroup.
    #[derive(Debug, Clone, Copy)]
    enum Init {
        Created,
        Running,
        Paused,
        Stopped,
    }

    fn container(init: Init) -> Container {
        let (state, paused) = match init {
            Init::Created => (State::Created, false),
            Init::Running => (State::Running, false),
            Init::Paused => (State::Running, true),
            Init::Stopped => (State::Stopped, false),
        };
        let mut c = Container {
            bundle: PathBuf::from("/run/bundle"),
            init: Process::new(42, state, StdioPaths::default()),
            execs: HashMap::new(),
            cgroup: CgroupSlot::default(),
            paused,
            restored: false,
            capture: None,
            busy: None,
            exec_spawns: 0,
            io_owner: None,
            kills_all_on_exit: false,
            cgroups_path: None,
        };
        // An exec added and not started (no pid yet), one running, one finished.
        c.execs.insert(
            "added".into(),
            Process::new(0, State::Created, StdioPaths::default()),
        );
        c.execs.insert(
            "running".into(),
            Process::new(43, State::Running, StdioPaths::default()),
        );
        c.execs.insert(
            "done".into(),
            Process::new(44, State::Stopped, StdioPaths::default()),
        );
        c
    }

    /// A check's outcome as containerd receives it: "ok" or the status code.
    fn outcome<T>(r: Result<T, ShimError>) -> &'static str {
        match r.map_err(|e| e.code()) {
            Ok(_) => "ok",
            Err(Code::NOT_FOUND) => "not found",
            Err(Code::ALREADY_EXISTS) => "exists",
            Err(Code::FAILED_PRECONDITION) => "precondition",
            Err(Code::INVALID_ARGUMENT) => "invalid",
            Err(Code::UNKNOWN) => "unknown",
            Err(other) => panic!("unexpected code {other:?}"),
        }
    }

    type Check = fn(&Container) -> &'static str;

    /// Each request with its answer in each of the init's states: Created, Running, Paused,
    /// Stopped. The answers with a counterpart in runc's shim are those it gives (compared
    /// side by side in the integration suites shim_parity and runc_behaviours).
    const TABLE: &[(&str, Check, [&str; 4])] = &[
        (
            "start init",
            |c| outcome(c.check_start("c", "")),
            ["ok", "precondition", "precondition", "precondition"],
        ),
        // runc's "cannot exec in a paused state" comes back with code Unknown.
        (
            "start an added exec",
            |c| outcome(c.check_start("c", "added")),
            ["precondition", "ok", "unknown", "precondition"],
        ),
        (
            "start a running exec",
            |c| outcome(c.check_start("c", "running")),
            [
                "precondition",
                "precondition",
                "precondition",
                "precondition",
            ],
        ),
        (
            "start an unknown exec",
            |c| outcome(c.check_start("c", "nope")),
            ["not found", "not found", "not found", "not found"],
        ),
        (
            "exec (add) a new id",
            |c| outcome(c.check_exec("c", "new")),
            ["precondition", "ok", "unknown", "precondition"],
        ),
        (
            "exec (add) an id in use",
            |c| outcome(c.check_exec("c", "done")),
            ["precondition", "exists", "unknown", "precondition"],
        ),
        // A created init has a pid and can be signalled; a finished one is "not found",
        // which containerd takes as "already gone".
        (
            "kill init",
            |c| outcome(c.check_kill("c", "", false)),
            ["ok", "ok", "ok", "not found"],
        ),
        (
            "kill all",
            |c| outcome(c.check_kill("c", "", true)),
            ["ok", "ok", "ok", "ok"],
        ),
        (
            "kill an added exec (no pid)",
            |c| outcome(c.check_kill("c", "added", false)),
            ["not found", "not found", "not found", "not found"],
        ),
        (
            "kill a running exec",
            |c| outcome(c.check_kill("c", "running", false)),
            ["ok", "ok", "ok", "ok"],
        ),
        (
            "kill a finished exec",
            |c| outcome(c.check_kill("c", "done", true)),
            ["not found", "not found", "not found", "not found"],
        ),
        (
            "pause",
            |c| outcome(c.check_freeze("c", true)),
            ["precondition", "ok", "precondition", "precondition"],
        ),
        (
            "resume",
            |c| outcome(c.check_freeze("c", false)),
            ["precondition", "precondition", "ok", "precondition"],
        ),
        // As runc's shim: a created task's limits can be changed before it starts.
        (
            "update",
            |c| outcome(c.check_init_in("c", "update", &[State::Created, State::Running])),
            ["ok", "ok", "ok", "precondition"],
        ),
        // containerd pauses a task before its checkpoint.
        (
            "checkpoint",
            |c| outcome(c.check_init_in("c", "checkpoint", &[State::Running])),
            ["precondition", "ok", "ok", "precondition"],
        ),
        // A created init is killed by Delete, and its exit reported, before it goes.
        (
            "delete the container",
            |c| outcome(c.check_delete("c", "")),
            ["ok", "precondition", "precondition", "ok"],
        ),
        (
            "delete a running exec",
            |c| outcome(c.check_delete("c", "running")),
            [
                "precondition",
                "precondition",
                "precondition",
                "precondition",
            ],
        ),
        (
            "delete a finished exec",
            |c| outcome(c.check_delete("c", "done")),
            ["ok", "ok", "ok", "ok"],
        ),
        (
            "delete an added exec, never started",
            |c| outcome(c.check_delete("c", "added")),
            ["ok", "ok", "ok", "ok"],
        ),
        (
            "delete an unknown exec",
            |c| outcome(c.check_delete("c", "nope")),
            ["not found", "not found", "not found", "not found"],
        ),
    ];

    #[test]
    fn each_state_admits_the_requests_the_table_says() {
        let states = [Init::Created, Init::Running, Init::Paused, Init::Stopped];
        let mut wrong = Vec::new();
        for (request, check, expected) in TABLE {
            for (state, want) in states.iter().zip(expected) {
                let got = check(&container(*state));
                if got != *want {
                    wrong.push(format!("{request} in {state:?}: {got}, want {want}"));
                }
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn an_id_is_one_path_component() {
        for good in ["c1", "a.b", "x_y-z+1", "A9", &"a".repeat(1024)] {
            assert_eq!(outcome(check_id(good)), "ok", "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "é",
            "a\0",
            &"a".repeat(1025),
        ] {
            assert_eq!(outcome(check_id(bad)), "invalid", "{bad:?}");
        }
    }

    #[test]
    fn a_kill_signals_the_process_the_table_holds() {
        let c = container(Init::Running);
        assert_eq!(c.check_kill("c", "", false).unwrap(), KillTarget::Pid(42));
        assert_eq!(
            c.check_kill("c", "running", false).unwrap(),
            KillTarget::Pid(43)
        );
        assert_eq!(c.check_kill("c", "", true).unwrap(), KillTarget::All);
        // Signalling all is asked of the init: for an exec it signals that exec only.
        assert_eq!(
            c.check_kill("c", "running", true).unwrap(),
            KillTarget::Pid(43)
        );
    }

    #[test]
    fn a_second_checkpoint_or_capture_is_refused_while_one_is_under_way() {
        let mut c = container(Init::Running);
        assert_eq!(outcome(c.check_busy("c", "checkpoint")), "ok");
        c.busy = Some("capture");
        let e = c.check_busy("c", "checkpoint").unwrap_err();
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert!(
            e.to_string().contains("a capture of it is under way"),
            "{e}"
        );
    }

    #[test]
    fn a_refusal_names_the_process_and_why() {
        let c = container(Init::Stopped);
        let e = c.check_start("c", "").unwrap_err();
        assert_eq!(e.to_string(), "cannot start container c: it is Stopped");
        let c = container(Init::Paused);
        assert_eq!(
            c.check_start("c", "added").unwrap_err().to_string(),
            "cannot exec in a paused state"
        );
        assert_eq!(
            c.check_delete("c", "running").unwrap_err().to_string(),
            "cannot delete exec running of container c: it is running"
        );
    }
}

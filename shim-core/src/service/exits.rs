//! Exits: the reaped children matched to their processes, the TaskExit events held until
//! the event they follow is out, and the exits of pids not known yet kept for their spawn.

use std::collections::HashMap;
use std::sync::Arc;

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::topics;
use nix::sys::signal::Signal;

use crate::reaper::Reaped;
use crate::timeline;

use super::state::{releasable, Container, Exit, Process, State};
use super::{timestamp, Inner, LOG_DRAIN_WAIT};

/// Exits reaped while the engine was spawning a process whose pid was not known yet.
#[derive(Debug, Default)]
pub(super) struct EarlyExits {
    /// Spawns under way; with none, nothing is kept (helpers' exits are not asked for).
    pub(super) spawning: usize,
    pub(super) exits: HashMap<u32, Reaped>,
}

/// A spawn under way (see [`EarlyExits`]); ends when dropped, if not before.
pub(super) struct Spawning<'a> {
    pub(super) inner: &'a Inner,
    pub(super) ended: bool,
}

impl Spawning<'_> {
    /// Ends the spawn of the process that got `pid`, returning its exit if it was already
    /// reaped. Called with the table locked, after the pid was recorded there, so that no
    /// exit can fall between the table and the kept exits.
    pub(super) fn end(mut self, _table: &HashMap<String, Container>, pid: u32) -> Option<Reaped> {
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

impl Inner {
    /// A reaped child: the exit of one of the table's processes is handled on a task of its
    /// own (it may wait for the process's log and kill what is left of its container); the
    /// exit of a pid no process holds is kept while a spawn may yet claim it.
    pub(super) fn reaped(self: &Arc<Self>, r: Reaped) {
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
    pub(super) async fn handle_exit(&self, id: &str, exec_id: &str, r: Reaped) {
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
        let (output, kill_all) = {
            let table = self.table();
            let Some(c) = table.get(id) else { return };
            let Ok(p) = c.process(id, exec_id) else {
                return;
            };
            (
                p.output.clone().filter(|_| ours(p)),
                exec_id.is_empty() && c.kills_all_on_exit,
            )
        };
        if let Some(copy) = output {
            copy.drained(LOG_DRAIN_WAIT).await;
        }
        // A container without a pid namespace of its own does not lose its processes with
        // its init: as runc's shim, kill them all before the exit is reported.
        if kill_all {
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
    pub(super) async fn publish_exits(&self, events: Vec<TaskExit>) {
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
    pub(super) async fn release_exits(&self, id: &str) {
        let _exits = self.exits.lock().await;
        let events = self.table().get_mut(id).map(releasable).unwrap_or_default();
        self.publish_exits(events).await;
    }

    /// Holds the TaskExit of process `exec_id` of container `id` until [`Self::announce`].
    pub(super) fn hold_exit(&self, id: &str, exec_id: &str) {
        if let Some(p) = self
            .table()
            .get_mut(id)
            .and_then(|c| c.process_mut(id, exec_id).ok())
        {
            p.announced = false;
        }
    }

    /// The event of the process's last state change is out: its TaskExit may follow.
    pub(super) async fn announce(&self, id: &str, exec_id: &str) {
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
    pub(super) fn early_exit(self: &Arc<Self>, id: &str, exec_id: &str, r: Option<Reaped>) {
        if let Some(r) = r {
            let (inner, id, exec_id) = (self.clone(), id.to_string(), exec_id.to_string());
            tokio::spawn(async move { inner.handle_exit(&id, &exec_id, r).await });
        }
    }
}

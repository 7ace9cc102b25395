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
//!
//! The parts: [`state`] holds the table's records and the state machine (which request each
//! state admits), [`exits`] the exits and their events' order, [`create`] Create, [`process`]
//! the calls on processes (Start, Exec, Kill, Wait, Delete, State...), [`resources`] the
//! cgroup and the calls on it (Pause, Resume, Update, Stats), [`capture`] checkpoints and
//! template captures, [`rpc`] the ttrpc `Task` service, and [`events`] where events go (an
//! [`Events`] sink: containerd, or a channel in the unit tests).

mod bundle;
mod capture;
mod create;
mod events;
mod exits;
mod process;
mod resources;
mod rpc;
mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::ExitSignal;
use tokio::sync::mpsc;

use crate::engine::Engine;
use crate::reaper::Reaped;

pub use events::Events;
use exits::{EarlyExits, Spawning};
use state::Container;

/// How long Delete waits for a created-but-never-started init to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How long an exit waits for the process's output to reach its `file://` log.
const LOG_DRAIN_WAIT: Duration = Duration::from_secs(2);

struct Inner {
    engine: Arc<dyn Engine>,
    events: Arc<dyn Events>,
    /// containerd's namespace of the containers (their loggers are told it).
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
        reaped: mpsc::UnboundedReceiver<Reaped>,
    ) -> Self {
        let events = Arc::new(events::Containerd {
            publisher,
            namespace: namespace.clone(),
        });
        Self::with_events(engine, events, namespace, exit, reaped)
    }

    /// A service over `engine` whose events go to `events` (a channel in unit tests).
    pub fn with_events(
        engine: Arc<dyn Engine>,
        events: Arc<dyn Events>,
        namespace: String,
        exit: Arc<ExitSignal>,
        mut reaped: mpsc::UnboundedReceiver<Reaped>,
    ) -> Self {
        let inner = Arc::new(Inner {
            engine,
            events,
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
        self.events.publish(topic, event).await;
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
}

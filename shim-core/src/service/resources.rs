//! The container's cgroup, opened once Create has answered, and the calls that need it:
//! Pause, Resume, Update, Stats, and the thaw or freeze around a kill.

use std::sync::Arc;

use containerd_shim::api::{
    PauseRequest, ResumeRequest, StatsRequest, StatsResponse, UpdateTaskRequest,
};
use containerd_shim::protos::events::task::{TaskOOM, TaskPaused, TaskResumed};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use nix::sys::signal::Signal;

use crate::cgroup::ContainerCgroup;
use crate::error::{EngineError, ShimError};
use crate::timeline;

use super::state::{CgroupSlot, State};
use super::Inner;

/// The resources type containerd sends in Update (OCI `LinuxResources`, as JSON).
pub(super) const LINUX_RESOURCES: &str = "opencontainers/runtime-spec/1/LinuxResources";

impl Inner {
    /// Opens the container's cgroup and starts its OOM watch, which publishes TaskOOM.
    pub(super) async fn open_cgroup(self: &Arc<Self>, id: &str) -> Option<Arc<ContainerCgroup>> {
        // Off the runtime's thread: opening reads the mount table and every hierarchy, and the
        // next request (Start) must not wait for it.
        let known = self.table().get(id).and_then(|c| c.cgroups_path.clone());
        let path = match known {
            Some(path) => Ok(path),
            None => self.engine.cgroups_path(id).await,
        };
        let opened = match path {
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
    pub(super) async fn cgroup_of_slot(
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
    pub(super) async fn cgroup_of(
        self: &Arc<Self>,
        id: &str,
        what: &str,
    ) -> Result<Arc<ContainerCgroup>, ShimError> {
        self.cgroup_in(id, what, &[State::Running]).await
    }

    /// The cgroup of container `id` while its init is in one of `states`, for a call named
    /// `what`.
    pub(super) async fn cgroup_in(
        self: &Arc<Self>,
        id: &str,
        what: &str,
        states: &[State],
    ) -> Result<Arc<ContainerCgroup>, ShimError> {
        let slot = {
            let table = self.table();
            let c = table
                .get(id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            c.check_init_in(id, what, states)?;
            c.cgroup.clone()
        };
        self.cgroup_of_slot(id, &slot).await.ok_or_else(|| {
            ShimError::FailedPrecondition(format!(
                "cannot {what} container {id}: its cgroup could not be opened (see the shim log)"
            ))
        })
    }

    /// Whether container `id` may be paused (`pause`) or resumed now.
    fn check_freeze(&self, id: &str, pause: bool) -> Result<(), ShimError> {
        self.table()
            .get(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?
            .check_freeze(id, pause)
    }

    pub(super) fn set_paused(&self, id: &str, paused: bool) {
        if let Some(c) = self.table().get_mut(id) {
            c.paused = paused;
        }
    }

    pub(super) async fn pause(self: &Arc<Self>, req: PauseRequest) -> Result<(), ShimError> {
        let _order = self.order(&req.id).await;
        self.check_freeze(&req.id, true)?;
        let cgroup = self.cgroup_of(&req.id, "pause").await?;
        // Checked again: the cgroup may have taken a while to open.
        self.check_freeze(&req.id, true)?;
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

    pub(super) async fn resume(self: &Arc<Self>, req: ResumeRequest) -> Result<(), ShimError> {
        let _order = self.order(&req.id).await;
        self.check_freeze(&req.id, false)?;
        let cgroup = self.cgroup_of(&req.id, "resume").await?;
        // Checked again: the cgroup may have taken a while to open.
        self.check_freeze(&req.id, false)?;
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

    pub(super) async fn update(self: &Arc<Self>, req: UpdateTaskRequest) -> Result<(), ShimError> {
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
        let cgroup = self
            .cgroup_in(&req.id, "update", &[State::Created, State::Running])
            .await?;
        blocking(move || cgroup.update(&resources.value)).await?;
        tracing::info!(id = req.id, "resources updated");
        Ok(())
    }

    pub(super) async fn stats(
        self: &Arc<Self>,
        req: StatsRequest,
    ) -> Result<StatsResponse, ShimError> {
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

    /// A frozen process cannot act on SIGKILL: as runc does, a paused container is thawed
    /// after it is sent one, so it dies.
    pub(super) async fn thaw_after_kill(&self, id: &str, signal: i32) {
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
    pub(super) async fn keep_paused(&self, id: &str) {
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
}

/// Runs cgroup file work off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ShimError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ShimError::Engine(EngineError::Failed(format!("cgroup work panicked: {e}"))))?
        .map_err(ShimError::from)
}

//! Checkpoints and template captures: neither holds the container's lifecycle lock; a
//! container marks one as under way so that a second is refused.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::CheckpointTaskRequest;

use crate::engine::CheckpointSpec;
use crate::error::{EngineError, ShimError};
use crate::options::checkpoint_options;
use crate::template::{self, CapturePlan, Captured, Readiness, TemplateCapture};

use super::state::{State, TemplateCapturePlan};
use super::Inner;

/// A checkpoint or capture under way (see `Container::busy`); over when dropped.
pub(super) struct Busy<'a> {
    pub(super) inner: &'a Inner,
    pub(super) id: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.inner.table().get_mut(&self.id) {
            c.busy = None;
        }
    }
}

impl Inner {
    /// Checkpoints a running container with CRIU. containerd pauses the task before and
    /// resumes it after; the engine dumps it frozen or not. The images go where the options
    /// say, else where containerd asks (it then stores them in its content store).
    pub(super) async fn checkpoint(&self, req: CheckpointTaskRequest) -> Result<(), ShimError> {
        let id = req.id;
        let options = checkpoint_options(req.options.as_ref()).inspect_err(|e| {
            tracing::error!(id, "checkpoint refused: {e}");
        })?;
        let bundle = {
            let table = self.table();
            let c = table
                .get(&id)
                .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
            c.check_init_in(&id, "checkpoint", &[State::Running])?;
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
    pub(super) fn mark_busy(&self, id: &str, what: &'static str) -> Result<Busy<'_>, ShimError> {
        let mut table = self.table();
        let c = table
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id}")))?;
        c.check_busy(id, what)?;
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
    pub(super) async fn capture_when_ready(
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

    pub(super) async fn wait_ready(
        &self,
        id: &str,
        pid: u32,
        plan: &CapturePlan,
    ) -> Result<(), EngineError> {
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
    pub(super) async fn capture(
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
}

//! The wasm shim's `Engine`: the youki shim's, with Exec refused in containers that run a
//! WebAssembly guest (their init is the guest; there is no program to exec beside it that
//! the image can be assumed to have). Native containers accept Exec as under the youki shim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use hyperbox_shim_core::{CreateSpec, Engine, EngineError, ExecSpec, ProcessStdio, Spawned};

use crate::guest;
use crate::image::{ContentStore, Handoff};

#[derive(Debug)]
pub struct WasmEngine {
    containers: Arc<dyn Engine>,
    /// containerd's API, for OCI wasm images; `None` when the shim was not told its address.
    images: Option<ContentStore>,
    /// Containers running a guest: id → the guest's name.
    guests: Mutex<HashMap<String, String>>,
}

impl WasmEngine {
    pub fn new(containers: Arc<dyn Engine>, images: Option<ContentStore>) -> Self {
        WasmEngine {
            containers,
            images,
            guests: Mutex::new(HashMap::new()),
        }
    }

    /// The wasm layer of the container's image, handed to the zygote through the bundle;
    /// its name. `None` when the container has no wasm image (it runs from its rootfs).
    async fn hand_off_image_guest(&self, spec: &CreateSpec) -> Result<Option<String>, EngineError> {
        let Some(images) = &self.images else {
            return Ok(None);
        };
        let found = match images.wasm_layer(&spec.id).await {
            Ok(found) => found,
            Err(e) if e.is_bad_image() => {
                return Err(EngineError::InvalidSpec(format!(
                    "cannot create container {}: {e}",
                    spec.id
                )))
            }
            Err(e) => {
                // containerd out of reach must not stop native containers or rootfs guests.
                tracing::warn!(
                    id = spec.id,
                    "cannot look up the container's image ({e}): running it from its root \
                     filesystem"
                );
                return Ok(None);
            }
        };
        let Some((layer, wasm)) = found else {
            return Ok(None);
        };
        Handoff::write(&spec.bundle, &layer, &wasm).map_err(|e| {
            EngineError::Failed(format!("cannot create container {}: {e}", spec.id))
        })?;
        Ok(Some(layer.name()))
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.guests.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl Engine for WasmEngine {
    async fn create(&self, spec: &CreateSpec, stdio: ProcessStdio) -> Result<Spawned, EngineError> {
        if spec.restore.is_some() {
            return Err(EngineError::Unsupported(format!(
                "cannot restore container {}: the wasm shim restores neither checkpoints nor \
                 templates",
                spec.id
            )));
        }
        let image_guest = self.hand_off_image_guest(spec).await?;
        let spawned = self.containers.create(spec, stdio).await?;
        if let Some(name) = image_guest {
            self.guests().insert(spec.id.clone(), name);
            return Ok(spawned);
        }
        // The rootfs is mounted now: the same lookup the zygote made.
        let found = guest::load_spec(&spec.bundle).and_then(|s| {
            let rootfs = guest::rootfs_of(&spec.bundle, &s);
            guest::locate(&s, &rootfs)
        });
        match found {
            Ok(Some(g)) => {
                self.guests().insert(spec.id.clone(), g.name);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(id = spec.id, "cannot tell whether it runs a guest: {e}"),
        }
        Ok(spawned)
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        self.containers.start(id).await
    }

    async fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: ProcessStdio,
    ) -> Result<Spawned, EngineError> {
        if let Some(name) = self.guests().get(id) {
            return Err(EngineError::Unsupported(format!(
                "container {id} runs the WebAssembly guest {name}: exec is not supported in \
                 WebAssembly containers"
            )));
        }
        self.containers.exec(id, spec, stdio).await
    }

    async fn signal_all(&self, id: &str, signal: i32) -> Result<(), EngineError> {
        self.containers.signal_all(id, signal).await
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>, EngineError> {
        self.containers.pids(id).await
    }

    async fn cgroups_path(&self, id: &str) -> Result<PathBuf, EngineError> {
        self.containers.cgroups_path(id).await
    }

    async fn delete(&self, id: &str, bundle: &Path) -> Result<(), EngineError> {
        let result = self.containers.delete(id, bundle).await;
        if result.is_ok() {
            self.guests().remove(id);
        }
        result
    }
}

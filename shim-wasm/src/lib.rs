//! `containerd-shim-hyperbox-wasm-v1`: WebAssembly containers through wasmtime, on the
//! youki shim's container path. A container whose `args[0]` is a WebAssembly guest runs it
//! with wasmtime in the container's init process (in its namespaces and cgroup, after
//! pivot_root); any other container runs its native program exactly as under
//! `io.containerd.hyperbox.v1`. See `DESIGN.md`.

mod cache;
mod engine;
mod guest;
mod runtime;

use std::sync::Arc;

use hyperbox_shim_core::{Engine, EngineError, ShimContext};
use hyperbox_shim_youki::{ExecutorFactory, NewContainer};
use libcontainer::workload::Executor;

pub use cache::{CompileCache, CACHE_DIR};

/// The runtime name containerd knows this shim by.
pub const RUNTIME: &str = "io.containerd.hyperbox-wasm.v1";

/// Forks the zygote (with [`WasmExecutors`] choosing each container's executor); called by
/// `hyperbox_shim_core::run` while the process has one thread.
pub fn prepare(ctx: &ShimContext) -> Result<Arc<dyn Engine>, EngineError> {
    let executors = WasmExecutors::new(CompileCache::new(CACHE_DIR));
    let containers = hyperbox_shim_youki::prepare_with(ctx, Box::new(executors))?;
    Ok(Arc::new(engine::WasmEngine::new(containers)))
}

/// Chooses, in the zygote, how each container runs: a WebAssembly guest is compiled (or
/// its compiled artifact read from the cache) here, before the container is built, because
/// the init process runs after pivot_root, where the host's cache is out of sight.
#[derive(Debug)]
pub struct WasmExecutors {
    cache: CompileCache,
    /// Made at the first guest: a shim of native containers never builds one.
    engine: Option<wasmtime::Engine>,
}

impl WasmExecutors {
    pub fn new(cache: CompileCache) -> Self {
        WasmExecutors {
            cache,
            engine: None,
        }
    }
}

impl ExecutorFactory for WasmExecutors {
    fn executor(&mut self, c: &NewContainer<'_>) -> Result<Box<dyn Executor>, EngineError> {
        let invalid = |e: guest::GuestError| {
            EngineError::InvalidSpec(format!("cannot create container {}: {e}", c.id))
        };
        let spec = guest::load_spec(c.bundle).map_err(invalid)?;
        let Some(file) = guest::locate(&spec, c.rootfs).map_err(invalid)? else {
            return Ok(libcontainer::workload::default::get_executor());
        };
        let name = file.name.clone();
        let export = file.export.clone();
        let wasm = file.read().map_err(invalid)?;
        let kind = guest::GuestKind::of(&wasm);
        let engine = match &self.engine {
            Some(e) => e.clone(),
            None => {
                let e = runtime::engine()
                    .map_err(|e| EngineError::Failed(format!("cannot set up wasmtime: {e:#}")))?;
                self.engine.insert(e).clone()
            }
        };
        let artifact = self
            .cache
            .artifact(&engine, &name, kind, &wasm)
            .map_err(|e| {
                EngineError::InvalidSpec(format!("cannot create container {}: {e}", c.id))
            })?;
        let what = match artifact.source {
            cache::Source::Compiled => "compiled",
            cache::Source::CacheHit => "cache hit",
        };
        tracing::info!(
            id = c.id,
            guest = name,
            digest = artifact.digest,
            kind = ?kind,
            "{what}"
        );
        Ok(Box::new(runtime::WasmExecutor::new(
            runtime::CompiledGuest {
                name,
                export,
                kind,
                artifact: artifact.bytes,
            },
        )))
    }
}

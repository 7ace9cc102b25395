//! `containerd-shim-hyperbox-wasm-v1`: WebAssembly containers through wasmtime, on the
//! youki shim's container path. A container whose image is an OCI wasm image (runwasi's
//! format, read from containerd's content store), or whose `args[0]` is a WebAssembly guest
//! in its rootfs, runs it with wasmtime in the container's init process (in its namespaces
//! and cgroup, after pivot_root); a component exporting `wasi:http/incoming-handler` is
//! served over HTTP there. Any other container runs its native program exactly as under
//! `io.containerd.hyperbox.v1`. See `DESIGN.md`.

mod cache;
mod engine;
mod guest;
mod http;
mod image;
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
    let images = hyperbox_shim_youki::Containerd::new(&ctx.address, &ctx.namespace)
        .map(image::ContentStore::new);
    if images.is_none() {
        tracing::warn!("no containerd address (-address): OCI wasm images cannot be read");
    }
    Ok(Arc::new(engine::WasmEngine::new(containers, images)))
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
        let invalid = |e: &dyn std::fmt::Display| {
            EngineError::InvalidSpec(format!("cannot create container {}: {e}", c.id))
        };
        let spec = guest::load_spec(c.bundle).map_err(|e| invalid(&e))?;
        let source = match image::Handoff::take(c.bundle).map_err(|e| invalid(&e))? {
            Some((layer, wasm)) => {
                // args[0] is only the guest's argv[0] (and may pick an export).
                let arg0 = spec
                    .process()
                    .as_ref()
                    .and_then(|p| p.args().as_ref())
                    .and_then(|a| a.first());
                let (argv0, export) = match arg0 {
                    Some(a) => {
                        let (name, export) = guest::split_export(a);
                        (name.to_string(), export.map(str::to_string))
                    }
                    None => (layer.image.clone(), None),
                };
                GuestSource {
                    name: layer.name(),
                    argv0,
                    export,
                    digest: layer.digest_hex().to_string(),
                    wasm,
                }
            }
            None => {
                let Some(file) = guest::locate(&spec, c.rootfs).map_err(|e| invalid(&e))? else {
                    return Ok(libcontainer::workload::default::get_executor());
                };
                let name = file.name.clone();
                let export = file.export.clone();
                let wasm = file.read().map_err(|e| invalid(&e))?;
                GuestSource {
                    argv0: name.clone(),
                    name,
                    export,
                    digest: cache::sha256_hex(&wasm),
                    wasm,
                }
            }
        };
        let kind = guest::GuestKind::of(&source.wasm);
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
            .artifact(&engine, &source.name, kind, &source.digest, &source.wasm)
            .map_err(|e| invalid(&e))?;
        let what = match artifact.source {
            cache::Source::Compiled => "compiled",
            cache::Source::CacheHit => "cache hit",
        };
        tracing::info!(
            id = c.id,
            guest = source.name,
            digest = artifact.digest,
            kind = ?kind,
            "{what}"
        );
        Ok(Box::new(runtime::WasmExecutor::new(
            runtime::CompiledGuest {
                name: source.name,
                argv0: source.argv0,
                export: source.export,
                kind,
                artifact: artifact.bytes,
            },
        )))
    }
}

/// A guest's binary, from the rootfs or from the image's wasm layer.
struct GuestSource {
    /// How messages name it: the file as `args[0]` names it, or the image's layer.
    name: String,
    argv0: String,
    export: Option<String>,
    /// SHA-256 of `wasm`, hex: the compile cache's key.
    digest: String,
    wasm: Vec<u8>,
}

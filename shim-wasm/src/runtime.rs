//! Running a guest in the container's init process: libcontainer's `Executor`, which runs
//! after namespaces, cgroup and pivot_root, so the guest is that process, in the container.
//!
//! The zygote hands over the compiled artifact in memory (the init process is a copy of
//! it); `validate`, before Start, loads it (a failure fails Create), and `exec`, at Start,
//! runs the guest and ends the process with the guest's exit code.

use std::cell::OnceCell;
use std::collections::HashMap;
use std::io::Write;
use std::rc::Rc;

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{Module, ResourceLimiter, Store};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::sync::Command;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::guest::GuestKind;

/// The engine every artifact is compiled for and loaded into: the zygote and the init
/// process must agree (wasmtime checks it when loading). wasmtime is built without its
/// `parallel-compilation` feature: compiling stays on the zygote's one thread.
pub fn engine() -> wasmtime::Result<wasmtime::Engine> {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    wasmtime::Engine::new(&config)
}

/// Exit code of a guest that trapped, as wasmtime's CLI (128 + SIGABRT).
const TRAP_EXIT: i32 = 128 + libc::SIGABRT;

/// A guest compiled in the zygote, to run in the container's init.
#[derive(Debug)]
pub struct CompiledGuest {
    /// The file as `args[0]` names it, or the image layer, for messages.
    pub name: String,
    /// The guest's `argv[0]`.
    pub argv0: String,
    pub export: Option<String>,
    pub kind: GuestKind,
    /// `Engine::precompile_*` output, produced by [`engine`] or read from a verified cache
    /// entry.
    pub artifact: Vec<u8>,
}

enum Loaded {
    Module(wasmtime::Engine, Module),
    Component(wasmtime::Engine, Component),
}

/// libcontainer's executor for a WebAssembly guest.
#[derive(Clone)]
pub struct WasmExecutor {
    guest: Rc<CompiledGuest>,
    /// Set by `validate`; shared by clones (libcontainer may clone the executor).
    loaded: Rc<OnceCell<Loaded>>,
}

impl WasmExecutor {
    pub fn new(guest: CompiledGuest) -> Self {
        WasmExecutor {
            guest: Rc::new(guest),
            loaded: Rc::new(OnceCell::new()),
        }
    }

    fn load(&self) -> Result<&Loaded, String> {
        if let Some(l) = self.loaded.get() {
            return Ok(l);
        }
        let g = &self.guest;
        let fail = |e: wasmtime::Error| format!("cannot load the compiled {}: {e:#}", g.name);
        let engine = engine().map_err(fail)?;
        let loaded = match g.kind {
            // SAFETY: the artifact is `Engine::precompile_*` output for this same engine
            // configuration: compiled in the zygote, or read from a cache entry whose
            // checksum the zygote verified; it reached this process as a copy of the
            // zygote's memory. wasmtime checks its own header and compatibility too.
            GuestKind::Module => unsafe { Module::deserialize(&engine, &g.artifact) }
                .map(|m| Loaded::Module(engine.clone(), m)),
            // SAFETY: as for a module, above.
            GuestKind::Component => unsafe { Component::deserialize(&engine, &g.artifact) }
                .map(|c| Loaded::Component(engine.clone(), c)),
        }
        .map_err(fail)?;
        Ok(self.loaded.get_or_init(|| loaded))
    }
}

impl Executor for WasmExecutor {
    fn validate(&self, _spec: &Spec) -> Result<(), ExecutorValidationError> {
        self.load()
            .map(|_| ())
            .map_err(ExecutorValidationError::ArgValidationError)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        // As libcontainer's default: the process's environment becomes the spec's, which
        // the guest then inherits.
        libcontainer::workload::default::get_executor().setup_envs(envs)
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let loaded = self.load().map_err(ExecutorError::Other)?;
        exit_on_termination_signals();
        let mut args: Vec<String> = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().clone())
            .unwrap_or_default();
        match args.first_mut() {
            Some(arg0) => arg0.clone_from(&self.guest.argv0),
            None => args.push(self.guest.argv0.clone()),
        }
        let limit = memory_limit(spec);
        let code = match run(&self.guest, loaded, &args, limit) {
            Ok(code) => code,
            Err(e) => {
                let trapped = e.downcast_ref::<wasmtime::Trap>().is_some();
                eprintln!("hyperbox-wasm: {}: {e:?}", self.guest.name);
                if trapped {
                    TRAP_EXIT
                } else {
                    1
                }
            }
        };
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: ends the process with the guest's code; nothing after the guest needs
        // destructors or atexit handlers.
        unsafe { libc::_exit(code) }
    }
}

/// The spec's memory limit, applied to the guest's linear memory.
fn memory_limit(spec: &Spec) -> Option<usize> {
    let limit = spec
        .linux()
        .as_ref()?
        .resources()
        .as_ref()?
        .memory()
        .as_ref()?
        .limit()?;
    usize::try_from(limit).ok().filter(|l| *l > 0)
}

/// Refuses linear memory growth past the container's memory limit, saying so once on the
/// container's stderr; the guest sees `memory.grow` fail, as a native program sees `brk`
/// fail (and a trap during instantiation when its initial memory is already too big).
#[derive(Debug, Default)]
pub(crate) struct MemoryLimit {
    limit: Option<usize>,
    reported: bool,
}

impl MemoryLimit {
    pub(crate) fn new(limit: Option<usize>) -> Self {
        MemoryLimit {
            limit,
            reported: false,
        }
    }
}

impl ResourceLimiter for MemoryLimit {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        match self.limit {
            Some(limit) if desired > limit => {
                if !self.reported {
                    self.reported = true;
                    eprintln!(
                        "hyperbox-wasm: guest memory limit of {limit} bytes reached \
                         (growing linear memory to {desired} bytes refused)"
                    );
                }
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

struct ModuleHost {
    wasi: WasiP1Ctx,
    memory: MemoryLimit,
}

struct ComponentHost {
    ctx: WasiCtx,
    table: ResourceTable,
    memory: MemoryLimit,
}

impl WasiView for ComponentHost {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// WASI for the guest: the process's args, environment and stdio (containerd's FIFOs or
/// terminal), the container's root filesystem (this process's `/`) as the preopened `/`.
pub(crate) fn wasi(args: &[String]) -> wasmtime::Result<WasiCtxBuilder> {
    let mut b = WasiCtxBuilder::new();
    b.args(args)
        .inherit_env()
        .inherit_stdio()
        .preopened_dir("/", "/", FsPerms::ReadWrite)?;
    Ok(b)
}

/// Runs the guest; its exit code.
fn run(
    guest: &CompiledGuest,
    loaded: &Loaded,
    args: &[String],
    limit: Option<usize>,
) -> wasmtime::Result<i32> {
    let memory = MemoryLimit::new(limit);
    let outcome = match loaded {
        Loaded::Module(engine, module) => {
            let host = ModuleHost {
                wasi: wasi(args)?.build_p1(),
                memory,
            };
            let mut store = Store::new(engine, host);
            store.limiter(|h| &mut h.memory);
            let mut linker = wasmtime::Linker::new(engine);
            wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |h: &mut ModuleHost| &mut h.wasi)?;
            let export = guest.export.as_deref().unwrap_or("_start");
            linker
                .instantiate(&mut store, module)
                .and_then(|i| i.get_typed_func::<(), ()>(&mut store, export))
                .and_then(|f| f.call(&mut store, ()))
                .map(|()| 0)
        }
        Loaded::Component(engine, component) if crate::http::is_http_handler(engine, component) => {
            crate::http::serve(&guest.name, engine, component, args, limit)
        }
        Loaded::Component(engine, component) => {
            let host = ComponentHost {
                ctx: wasi(args)?.build(),
                table: ResourceTable::new(),
                memory,
            };
            let mut store = Store::new(engine, host);
            store.limiter(|h| &mut h.memory);
            let mut linker = wasmtime::component::Linker::new(engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
            Command::instantiate(&mut store, component, &linker)
                .and_then(|c| c.wasi_cli_run().call_run(&mut store))
                .map(|r| if r.is_ok() { 0 } else { 1 })
        }
    };
    match outcome {
        Ok(code) => Ok(code),
        Err(e) => match e.downcast_ref::<I32Exit>() {
            Some(exit) => Ok(exit.0),
            None => Err(e),
        },
    }
}

/// The guest is often PID 1 of its PID namespace, where signals without a handler are
/// ignored, and it cannot install handlers of its own. So the host does what a native
/// program's default disposition does: these signals end the process, with 128 + N.
fn exit_on_termination_signals() {
    extern "C" fn exit_on(signal: libc::c_int) {
        // SAFETY: `_exit` is async-signal-safe.
        unsafe { libc::_exit(128 + signal) }
    }
    for signal in [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
    ] {
        // SAFETY: installs a handler that only calls `_exit`; `sigaction` on a valid struct.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = exit_on as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(wat: &str, export: Option<&str>) -> WasmExecutor {
        let engine = engine().unwrap();
        let wasm = wat::parse_str(wat).unwrap();
        let kind = GuestKind::of(&wasm);
        let artifact = match kind {
            GuestKind::Module => engine.precompile_module(&wasm),
            GuestKind::Component => engine.precompile_component(&wasm),
        }
        .unwrap();
        let e = WasmExecutor::new(CompiledGuest {
            name: "/t.wasm".into(),
            argv0: "/t.wasm".into(),
            export: export.map(str::to_string),
            kind,
            artifact,
        });
        e.load().unwrap();
        e
    }

    fn exit_code(e: &WasmExecutor, limit: Option<usize>) -> wasmtime::Result<i32> {
        run(
            &e.guest,
            e.loaded.get().unwrap(),
            &["/t.wasm".to_string()],
            limit,
        )
    }

    const EXIT: &str = r#"(module
        (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
        (memory (export "memory") 1)
        (func (export "_start") (call $exit (i32.const 7)))
        (func (export "other") (call $exit (i32.const 5)))
        (func (export "returns")))"#;

    #[test]
    fn the_exit_code_is_the_guests() {
        assert_eq!(exit_code(&loaded(EXIT, None), None).unwrap(), 7);
        assert_eq!(exit_code(&loaded(EXIT, Some("other")), None).unwrap(), 5);
        assert_eq!(exit_code(&loaded(EXIT, Some("returns")), None).unwrap(), 0);
    }

    #[test]
    fn memory_growth_stops_at_the_limit() {
        // Grows one page at a time and exits with the number of pages it got to.
        let grow = r#"(module
            (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
            (memory (export "memory") 1)
            (func (export "_start")
              (loop $grow
                (if (i32.ne (memory.grow (i32.const 1)) (i32.const -1)) (then (br $grow))))
              (call $exit (memory.size))))"#;
        let e = loaded(grow, None);
        assert_eq!(exit_code(&e, Some(10 * 65536)).unwrap(), 10);
        assert_eq!(exit_code(&e, Some(10 * 65536 + 100)).unwrap(), 10);
        // Over the limit from the start: instantiation fails.
        let big = loaded("(module (memory 20) (func (export \"_start\")))", None);
        assert!(exit_code(&big, Some(10 * 65536)).is_err());
        assert_eq!(exit_code(&big, None).unwrap(), 0);
    }

    #[test]
    fn a_trap_is_an_error() {
        let e = loaded("(module (func (export \"_start\") unreachable))", None);
        let err = exit_code(&e, None).unwrap_err();
        assert!(err.downcast_ref::<wasmtime::Trap>().is_some(), "{err:?}");
    }

    #[test]
    fn a_component_runs_through_wasi_cli_run() {
        // A component exporting `wasi:cli/run` whose `run` returns ok (0) or err (1).
        let component = |ok: bool| {
            format!(
                r#"(component
                  (core module $m (func (export "run") (result i32) i32.const {}))
                  (core instance $i (instantiate $m))
                  (func $run (result (result)) (canon lift (core func $i "run")))
                  (instance $runner (export "run" (func $run)))
                  (export "wasi:cli/run@0.2.0" (instance $runner)))"#,
                if ok { 0 } else { 1 }
            )
        };
        let e = loaded(&component(true), None);
        assert_eq!(e.guest.kind, GuestKind::Component);
        assert_eq!(exit_code(&e, None).unwrap(), 0);
        assert_eq!(
            exit_code(&loaded(&component(false), None), None).unwrap(),
            1
        );
    }
}

//! How a container's init process runs the container's process: libcontainer's `Executor`,
//! chosen per container by an [`ExecutorFactory`] that the shim's `main` gives the zygote.
//! The youki shim execs the native program ([`NativeExecutors`]); another shim on this
//! crate (the wasm shim) runs some programs differently in the same container.

use std::collections::HashMap;
use std::path::Path;

use hyperbox_shim_core::EngineError;
use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

/// What an [`ExecutorFactory`] is told of a container being created.
#[derive(Debug, Clone, Copy)]
pub struct NewContainer<'a> {
    pub id: &'a str,
    /// The OCI bundle (`config.json`).
    pub bundle: &'a Path,
    /// The container's root filesystem as the host sees it (the spec's `root.path`, made
    /// absolute), mounted by now.
    pub rootfs: &'a Path,
}

/// Chooses each container's executor. Called in the zygote (single-threaded, the shim's
/// logging set up) during Create, after the rootfs is mounted and before libcontainer builds
/// the container; the executor returned is what the container's init process (a copy of the
/// zygote's memory) runs once started. An error fails the Create, and nothing of the
/// container is left behind.
pub trait ExecutorFactory: Send + 'static {
    fn executor(&mut self, container: &NewContainer<'_>) -> Result<Box<dyn Executor>, EngineError>;
}

/// libcontainer's own executor for every container: the native program is exec'd.
#[derive(Debug, Clone, Copy, Default)]
pub struct NativeExecutors;

impl ExecutorFactory for NativeExecutors {
    fn executor(&mut self, _: &NewContainer<'_>) -> Result<Box<dyn Executor>, EngineError> {
        Ok(libcontainer::workload::default::get_executor())
    }
}

/// A boxed executor in the form libcontainer's builder takes (`with_executor` wants a sized
/// type), and the id of the container it runs (for its timeline marks).
#[derive(Clone)]
pub(crate) struct BoxedExecutor(pub Box<dyn Executor>, pub String);

impl Executor for BoxedExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        hyperbox_shim_core::timeline::mark("init.exec", &self.1);
        self.0.exec(spec)
    }

    /// Called in the container's init once its namespaces, root and mounts are set up, just
    /// before it waits for Start.
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        hyperbox_shim_core::timeline::mark("init.ready", &self.1);
        validate_as_runc(self.0.as_ref(), spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        self.0.setup_envs(envs)
    }
}

/// `inner.validate(spec)`, except that a process without `PATH` in its environment is
/// validated as runc runs it: a program named with a `/` is run as it is, and a bare name is
/// looked up in an empty `PATH` (so not found). libcontainer's own executor refuses any
/// process without `PATH` ("PATH environment variable is not set"), where runc runs
/// `/hello` from a `ctr run --rootfs` with no image environment. Only the validation sees
/// the empty `PATH`; the process gets the environment its spec gives.
pub(crate) fn validate_as_runc(
    inner: &dyn Executor,
    spec: &Spec,
) -> Result<(), ExecutorValidationError> {
    let env = spec.process().as_ref().and_then(|p| p.env().as_ref());
    if env.is_some_and(|e| e.iter().any(|v| v.starts_with("PATH="))) {
        return inner.validate(spec);
    }
    let mut spec = spec.clone();
    if let Some(process) = spec.process_mut() {
        let mut env = process.env().clone().unwrap_or_default();
        env.push("PATH=".to_string());
        process.set_env(Some(env));
    }
    inner.validate(&spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{ProcessBuilder, SpecBuilder};

    fn spec(args: &[&str], env: &[&str]) -> Spec {
        let process = ProcessBuilder::default()
            .args(args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .env(env.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap();
        SpecBuilder::default().process(process).build().unwrap()
    }

    #[test]
    fn a_path_with_a_slash_needs_no_path_variable() {
        let inner = libcontainer::workload::default::get_executor();
        // /bin/sh exists on every development and CI host.
        validate_as_runc(inner.as_ref(), &spec(&["/bin/sh"], &[])).unwrap();
        let e = validate_as_runc(inner.as_ref(), &spec(&["sh"], &[])).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        validate_as_runc(inner.as_ref(), &spec(&["sh"], &["PATH=/bin"])).unwrap();
    }
}

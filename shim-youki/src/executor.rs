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
/// type).
#[derive(Clone)]
pub(crate) struct BoxedExecutor(pub Box<dyn Executor>);

impl Executor for BoxedExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        self.0.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        self.0.validate(spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        self.0.setup_envs(envs)
    }
}

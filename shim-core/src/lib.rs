//! containerd shim v2 plumbing shared by the HyperBox shims.
//!
//! A shim is an [`Engine`] (create, start, exec, signal, list and delete containers) and a
//! `main` that calls [`run`]. This crate does the rest, on the `containerd-shim` crate: the
//! start/delete actions, the task API (Create, Start, Wait, Kill, Delete, State, Pids, Exec,
//! ResizePty, CloseIO, Connect, Shutdown, Pause, Resume, Update, Stats, Checkpoint, and Create
//! from a checkpoint), the process table,
//! stdio FIFOs, log URIs and terminals, the container's cgroup (freezer, limits, metrics,
//! OOM events), task events, and exit reaping as a child subreaper, with errors mapped to
//! ttrpc codes in [`ShimError::code`].

mod cgroup;
mod cgroup_warmup;
mod console;
mod engine;
mod error;
pub mod info;
mod options;
mod reaper;
mod service;
mod shim;
mod stdio;
pub mod template;
pub mod timeline;

pub use cgroup::ContainerCgroup;
pub use engine::{
    CheckpointSpec, CreateSpec, Engine, ExecSpec, ProcessStdio, RestoreFrom, RestoreSpec,
    RootfsMount, ShimAction, ShimContext, Spawned, TemplateRestore,
};
pub use error::{EngineError, ShimError};
pub use options::{
    checkpoint_options, CheckpointOptions, CriOptions, LegacyCheckpointOptions,
    LegacyCreateOptions, RuncOptions, RuntimeOptions,
};
pub use reaper::{exit_status, output as owned_output, OwnedChild};
pub use service::TaskService;
pub use shim::run;
pub use stdio::{IoOwner, StdioPaths};

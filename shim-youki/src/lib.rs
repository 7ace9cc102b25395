//! `containerd-shim-hyperbox-v1`'s engine: Linux containers through youki's `libcontainer`,
//! in-process, created by a single-threaded zygote. A library so that another shim can run
//! its containers through the same path with its own executor ([`prepare_with`]); see
//! `DESIGN.md` for how containers are created without forking the multi-threaded shim.

mod checkpoint;
mod cli;
mod console;
mod criu;
mod distribution;
mod engine;
mod error;
mod exec_security;
mod executor;
mod features;
mod gpu;
mod image;
mod rootfs;
pub mod template;
mod template_security;
mod wire;
mod zygote;

pub use cli::templates;
pub use engine::{prepare, prepare_with};
pub use executor::{ExecutorFactory, NativeExecutors, NewContainer};
pub use features::oci_features;
pub use image::Containerd;

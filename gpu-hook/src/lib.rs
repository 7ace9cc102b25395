//! NVIDIA GPUs in containers for HyperBox.
//!
//! This crate will hold `hyperbox-gpu-cdi` (the CDI spec generator, the only part that talks
//! to the driver) and `hyperbox-gpu-hook` (the OCI hook, which reads the generator's cache
//! and never loads the driver); see `DESIGN.md`. What is here so far is the part both need
//! first and the one users meet first: what a container asks for, read from its environment
//! with the NVIDIA Container Toolkit's exact semantics.
//!
//! - [`request`]: `NVIDIA_VISIBLE_DEVICES` (which GPUs, or none, or not a GPU container at
//!   all) and `NVIDIA_DRIVER_CAPABILITIES` (which parts of the driver);
//! - [`require`]: `NVIDIA_REQUIRE_*` constraints (`cuda`, `driver`, `arch`, `brand`), checked
//!   against what the node has;
//! - [`driver`]: what the kernel driver says of itself in `/proc` (version, GPUs, device
//!   majors, MIG capability minors) and the device nodes that follows, the generator's first
//!   input besides NVML;
//! - [`cdi`]: the CDI spec (`nvidia.com/gpu`) for runtimes that read CDI, written atomically;
//! - [`ldcache`]: glibc's `ld.so.cache`, read as the loader reads it, to find the driver's
//!   libraries under a driver root without running `ldconfig`.

pub mod atomic;
pub mod cache;
pub mod cdi;
pub mod discover;
pub mod driver;
pub mod hook;
pub mod inject;
pub mod ldcache;
pub mod plan;
pub mod request;
pub mod require;
pub mod version;

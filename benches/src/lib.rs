//! Side-by-side benchmarks of HyperBox against the engines' defaults.
//!
//! - [`breakdown`]: one lifecycle step by step (our shims' timeline, runc's calls);
//! - [`density`]: hundreds of idle containers per runtime (time, memory, listing, removal);
//! - [`runner`]: a round-robin timing runner over any number of variants, reporting median,
//!   nearest-rank p95, mean, min, max and the ratio of each median to a baseline's;
//! - [`engines`]: private containerd daemons (the integration harness's test beds) and the
//!   `ctr` commands timed or measured;
//! - [`memprobe`]: the runtime-side memory (PSS and RSS) of a container, from /proc;
//! - [`pods`]: the runtime-side memory of Kubernetes pods through containerd's CRI;
//! - [`task_stats`]: a running task's Stats asked of its shim (ttrpc, containerd bypassed) and
//!   of containerd;
//! - [`snapshots`]: hyperbox-snapshotter against overlayfs (pull, run, disk, chunk+hash);
//! - [`conversion`]: what converting one layer to EROFS costs the snapshotter (time, peak RSS);
//! - [`wasm`]: the wasm shim against runc.v2 (warm and cold `ctr run --rm`, memory, kill);
//! - [`gpu`]: what giving a container NVIDIA GPUs costs (the hook, `ctr run --rm` with and
//!   without GPUs, NVML off the start path, the generator), against a fake driver;
//! - [`templates`]: starting from a template of the youki shim against starting cold, and
//!   checkpoint/restore through it against runc.v2's shim;
//! - [`machine`] and [`report`]: what each report says about where it was measured, and how
//!   it is printed and saved.
//!
//! The `hyperbox-bench` binary drives them; `benches/README.md` says how to run it.

pub mod breakdown;
pub mod conversion;
pub mod density;
pub mod engines;
pub mod gpu;
pub mod layers;
pub mod machine;
pub mod memprobe;
pub mod pods;
pub mod report;
pub mod runner;
pub mod snapshots;
pub mod stats;
pub mod task_stats;
pub mod templates;
pub mod wasm;

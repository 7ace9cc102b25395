//! Templates through an OCI registry: `templates push NAME REF` and `templates pull REF`, and
//! the pull a restore asks for on first use (`io.hyperbox.template.pull=REF`).
//!
//! A template is an OCI artifact: an image manifest of artifact type [`ARTIFACT_TYPE`] whose
//! config is the template's record ([`RECORD_TYPE`], `template.json`) and whose two layers are
//! tar archives of CRIU's images ([`IMAGES_TYPE`], flat) and of the rootfs changes
//! ([`ROOTFS_TYPE`], overlay whiteouts as character devices 0:0, opaque directories as the
//! `trusted.overlay.opaque` attribute in PAX headers). A pull fetches the manifest (checked
//! against the reference's digest when it names one), then the record, checks the node against
//! it (CRIU, shim, kernel, architecture; the container's image when a restore pulls) before
//! any layer is fetched, fetches each layer into a staging directory verifying its digest and
//! size, unpacks them refusing anything a capture does not make, runs CRIU's CPU check on the
//! images, and renames the whole into the puller's store: a template is whole and verified, or
//! absent. A pulled template belongs to the owner that pulled it; its record keeps where it
//! came from.
//!
//! The parts: reaching registries (`registry`), the layers as tar archives and back
//! (`archive`), and the two directions, [`push()`] and [`pull()`].

mod archive;
mod pull;
mod push;
mod registry;

use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use crate::template::{self, Record, Store};

pub use pull::pull;
pub use push::push;
pub use registry::Access;

/// The artifact type of a template's manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.hyperbox.template.v1";
/// The config: the template's record.
pub const RECORD_TYPE: &str = "application/vnd.hyperbox.template.record.v1+json";
/// The first layer: CRIU's images, a flat tar.
pub const IMAGES_TYPE: &str = "application/vnd.hyperbox.template.criu-images.v1.tar";
/// The second layer: the container's rootfs changes, a tar with overlay whiteouts.
pub const ROOTFS_TYPE: &str = "application/vnd.hyperbox.template.rootfs.v1.tar";
/// A record larger than this is not a record.
const MAX_RECORD: u64 = 1 << 20;

fn err(what: impl std::fmt::Display) -> String {
    what.to_string()
}

fn staging(store: &Store, what: &str, name: &str) -> Result<PathBuf, String> {
    store.ensure().map_err(err)?;
    // One shim may pull for several containers at once: a count of its own, then its pid
    // (which the store's sweep reads to remove what a dead process left).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = store
        .path(name)
        .with_file_name(format!(".{what}-{name}-{n}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Removes a directory when dropped.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The kernel this node runs.
pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Why this node cannot restore what `record` holds; empty when it can.
pub fn differences(record: &Record, criu_version: &str) -> Vec<String> {
    let mut out = Vec::new();
    if record.criu_version != criu_version {
        out.push(format!(
            "it was captured with CRIU {}, this node has CRIU {criu_version}",
            record.criu_version
        ));
    }
    if record.shim_version != template::SHIM_VERSION {
        out.push(format!(
            "it was captured by containerd-shim-hyperbox-v1 {}, this node has {}",
            record.shim_version,
            template::SHIM_VERSION
        ));
    }
    let here = kernel();
    match &record.kernel {
        Some(k) if *k != here => out.push(format!(
            "it was captured under kernel {k}, this node runs {here}"
        )),
        Some(_) => {}
        None => out.push("its record does not say which kernel it was captured under".into()),
    }
    if let Some(arch) = &record.arch {
        if arch != std::env::consts::ARCH {
            out.push(format!(
                "it was captured on {arch}, this node is {}",
                std::env::consts::ARCH
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_that_differ_are_named() {
        let record = Record {
            name: "t".into(),
            namespace: "default".into(),
            container: "c".into(),
            created: 0,
            criu_version: "4.2.1".into(),
            shim_version: template::SHIM_VERSION.into(),
            layers: Vec::new(),
            image: None,
            image_digest: None,
            owner: None,
            security: None,
            kernel: Some(kernel()),
            arch: Some(std::env::consts::ARCH.into()),
            source: None,
        };
        assert!(differences(&record, "4.2.1").is_empty());
        let other = Record {
            kernel: Some("0.0.1".into()),
            arch: Some("riscv64".into()),
            shim_version: "0.0.0".into(),
            ..record
        };
        let why = differences(&other, "4.3").join("; ");
        for says in [
            "CRIU 4.2.1",
            "kernel 0.0.1",
            "riscv64",
            "containerd-shim-hyperbox-v1 0.0.0",
        ] {
            assert!(why.contains(says), "{says}: {why}");
        }
    }
}

//! The template store: checkpoints of ready containers that new containers restore from
//! instead of running their entrypoint.
//!
//! ```text
//! /var/lib/hyperbox/templates/     0700: templates hold process memory
//!   NAMESPACE/                     one per containerd namespace
//!     NAME/
//!       template.json              what a restore must match (Record)
//!       images/                    CRIU's images, uncompressed
//!       rootfs/                    the container's changes to its image (its overlay upper dir)
//!     .NAME.error                  why the last capture of NAME failed
//!     .NAME.log/dump.log           CRIU's log of that failure
//!     .capture-NAME-PID/           a capture in progress (removed if PID is gone)
//! ```
//!
//! A capture is written under a temporary name and renamed into place, so a template is
//! whole or absent, whatever is killed when. The image is identified by the snapshots of its
//! layers (the overlay's lower directories, without their last component, which a
//! snapshotter may change from `fs` to `erofs`): CRIU restores files by path, so a template
//! fits exactly the filesystem it was captured on.
//!
//! The parts: [`Settings`], the administrator's file (`settings`); [`Store`], one owner's
//! directory of templates, with its listing, removal and locks (`store`); what a capture writes
//! (`capture`) and what a restore checks and mounts (`restore`); and the overlay layers both
//! work on, the container's changes and the copies of them (`layer`).

mod capture;
mod layer;
mod restore;
mod settings;
mod store;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use hyperbox_shim_core::template::{check_owner, CRI_SANDBOX_NAMESPACE};
use hyperbox_shim_core::EngineError;
use serde::{Deserialize, Serialize};

use crate::template_security::Security;

pub use layer::disk_usage;
pub use restore::PreparedRestore;
pub use settings::{parse_setting_duration, parse_setting_size, Settings, SETTINGS};
pub use store::{Hold, Store};

/// Where templates are kept unless `HYPERBOX_TEMPLATE_ROOT` names another directory.
pub const DEFAULT_ROOT: &str = "/var/lib/hyperbox/templates";
const RECORD: &str = "template.json";
pub(crate) const IMAGES: &str = "images";
pub(crate) const ROOTFS: &str = "rootfs";
/// The shim's version, which a restore must match (the images' metadata is its own).
pub const SHIM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// CRI's annotation naming a container's image; recorded and matched where present.
const CRI_IMAGE: &str = "io.kubernetes.cri.image-name";

/// The store's root directory.
pub fn root() -> PathBuf {
    std::env::var_os("HYPERBOX_TEMPLATE_ROOT")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from)
}

/// What a template records of where it came from; a restore must match it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub namespace: String,
    /// The container it was captured from.
    pub container: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub criu_version: String,
    pub shim_version: String,
    /// The snapshots of the image's layers, top first.
    pub layers: Vec<PathBuf>,
    /// The image's name: containerd's, else CRI's annotation.
    #[serde(default)]
    pub image: Option<String>,
    /// The digest of the image's manifest (or index), as containerd has it.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The pod namespace it belongs to, under Kubernetes.
    #[serde(default)]
    pub owner: Option<String>,
    /// The security settings of the process captured, which its copies keep (see
    /// `template_security`); a restore must ask for the same. `None` in a record of an older
    /// shim, which is not restored.
    #[serde(default)]
    pub security: Option<Box<Security>>,
    /// The kernel it was captured under (`/proc/sys/kernel/osrelease`), which a restore must
    /// run; `None` in an older shim's record.
    #[serde(default)]
    pub kernel: Option<String>,
    /// The machine it was captured on (`x86_64`).
    #[serde(default)]
    pub arch: Option<String>,
    /// Where a pulled template came from; `None` for one captured on this node.
    #[serde(default)]
    pub source: Option<Source>,
}

/// Where a template pulled from a registry came from (`templates pull`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The reference it was pulled by.
    pub reference: String,
    /// The digest of its manifest, which names the digest of each of its parts.
    pub digest: String,
    /// The container, namespace and owner it was captured from, on the node that captured it.
    pub container: String,
    pub namespace: String,
    #[serde(default)]
    pub owner: Option<String>,
}

/// One entry of a listing: a template, or a capture of that name that failed.
#[derive(Debug)]
pub enum Listed {
    Template {
        record: Box<Record>,
        path: PathBuf,
        bytes: u64,
    },
    Failed {
        name: String,
        reason: String,
    },
}

impl Listed {
    pub fn name(&self) -> &str {
        match self {
            Listed::Template { record, .. } => &record.name,
            Listed::Failed { name, .. } => name,
        }
    }
}

/// The owner of the container of `bundle` under Kubernetes: the pod namespace CRI wrote in
/// its spec; `None` outside Kubernetes.
pub fn owner_of(bundle: &Path) -> Result<Option<String>, EngineError> {
    let path = bundle.join("config.json");
    let spec: serde_json::Value = fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
        .map_err(|e| EngineError::InvalidSpec(format!("cannot read {}: {e}", path.display())))?;
    let Some(owner) = spec
        .get("annotations")
        .and_then(|a| a.get(CRI_SANDBOX_NAMESPACE))
    else {
        return Ok(None);
    };
    let owner = owner.as_str().unwrap_or_default();
    check_owner(owner)
        .map_err(|e| EngineError::InvalidSpec(format!("{CRI_SANDBOX_NAMESPACE}: {e}")))?;
    Ok(Some(owner.to_string()))
}

/// The store and name of the template that the container of `bundle` (in containerd
/// namespace `namespace`) restores from, `reference` as its annotation gives it: `NAME`, its
/// own owner's, or `POD_NAMESPACE/NAME`, refused for another owner's template unless the
/// node's settings share it.
pub fn resolve(
    namespace: &str,
    bundle: &Path,
    reference: &str,
) -> Result<(Store, String), EngineError> {
    let own = owner_of(bundle)?;
    let Some((owner, name)) = reference.split_once('/') else {
        return Ok((
            Store::scoped(&root(), namespace, own.as_deref())?,
            reference.to_string(),
        ));
    };
    if own.as_deref() != Some(owner) && !Settings::load()?.shares(owner, name) {
        return Err(EngineError::InvalidSpec(format!(
            "template {reference} belongs to pod namespace {owner}, not this container's ({}): \
             another owner's template is restored only when an administrator shares it \
             (shared = [\"{reference}\"] in {})",
            own.as_deref().unwrap_or("none"),
            Settings::path().display()
        )));
    }
    Ok((
        Store::scoped(&root(), namespace, Some(owner))?,
        name.to_string(),
    ))
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(e.to_string())
}

/// The image name a bundle's spec carries (CRI's annotation), if any.
fn image_annotation(bundle: &Path) -> Option<String> {
    let bytes = fs::read(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    spec.get("annotations")?
        .get(CRI_IMAGE)?
        .as_str()
        .map(str::to_string)
}

/// `io::Error` for the CLI.
pub fn io_error(e: EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

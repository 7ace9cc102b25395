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

use std::fs;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyperbox_shim_core::template::{
    check_name, check_owner, Captured, TemplateCapture, CRI_SANDBOX_NAMESPACE,
};
use hyperbox_shim_core::{CheckpointSpec, EngineError, OwnedChild, RestoreSpec, RootfsMount};
use libcontainer::container::Container;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::criu::Criu;
use crate::image::ImageRef;
use crate::template_security::Security;

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

/// The templates of one owner: a containerd namespace, and under Kubernetes (every pod in
/// containerd's `k8s.io`) a pod namespace in it, as CRI writes it into the container's spec.
/// Tenants never see each other's templates; a restore across owners needs an
/// administrator's [`Settings::shared`].
#[derive(Debug, Clone)]
pub struct Store {
    /// The store's root ([`root`], or the CLI's).
    root: PathBuf,
    dir: PathBuf,
    namespace: String,
    /// The pod namespace, under Kubernetes.
    owner: Option<String>,
}

/// A pod namespace's templates are in its containerd namespace's directory, under this prefix
/// and its name: no template name starts with a '.'.
const OWNER_PREFIX: &str = ".pod.";

/// Where the node's template settings are, unless `HYPERBOX_TEMPLATE_CONFIG` names another
/// file.
pub const SETTINGS: &str = "/etc/hyperbox/templates.toml";

/// The node's template settings, an administrator's (never a tenant's: no annotation sets
/// them). A missing file, or a setting left out, is the default (`config/templates.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Templates any owner may restore from, as `POD_NAMESPACE/NAME` (what such a restore
    /// names in `io.hyperbox.restore-from`).
    pub shared: Vec<String>,
    /// How long a capture may take: the copy of the container's rootfs changes and CRIU's
    /// dump. The container is thawed and runs on when it runs out.
    #[serde(with = "setting_duration")]
    pub capture_timeout: Duration,
    /// How long CRIU may take to restore a container from a template.
    #[serde(with = "setting_duration")]
    pub restore_timeout: Duration,
    /// The most a capture copies of a container's rootfs changes (its overlay's upper
    /// directory); more refuses the capture.
    #[serde(with = "setting_size")]
    pub max_rootfs_changes: u64,
    /// What one owner's templates may take on disk together; a capture that would exceed it
    /// is refused.
    #[serde(with = "setting_size")]
    pub owner_quota: u64,
    /// Templates nothing restored from for this long are removed (when no restore holds
    /// them); zero keeps them.
    #[serde(with = "setting_duration")]
    pub expire_unused: Duration,
    /// Registries a restore may pull a missing template from on first use
    /// (`io.hyperbox.template.pull`), as reference prefixes (`registry.example:5000/templates/`).
    /// A pulled template's CRIU images are restored by root: only an administrator's choice
    /// of source. Empty (the default): no pull on first use.
    pub pull_from: Vec<String>,
    /// Registry hosts (`HOST:PORT`) reached over plain HTTP; loopback hosts always are.
    pub plain_http: Vec<String>,
    /// A Docker-style `config.json` whose `auths` give registries' credentials.
    pub auth_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            shared: Vec::new(),
            capture_timeout: Duration::from_secs(5 * 60),
            restore_timeout: Duration::from_secs(2 * 60),
            max_rootfs_changes: 4 << 30,
            owner_quota: 50 << 30,
            expire_unused: Duration::from_secs(30 * 86_400),
            pull_from: Vec::new(),
            plain_http: Vec::new(),
            auth_file: None,
        }
    }
}

/// A duration setting: a number and a unit, `s`, `m`, `h` or `d` (`90s`, `5m`, `30d`), or `0`.
pub fn parse_setting_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 90s, 5m, 12h or 30d");
    let (n, unit) = number_and_unit(text).ok_or_else(bad)?;
    let unit = match unit {
        "" if n == 0 => 1,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n.saturating_mul(unit)))
}

/// A setting's leading number and the unit after it (`"5m"` → `(5, "m")`); `None` when it
/// does not start with a number.
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    Some((number.parse().ok()?, unit))
}

/// A size setting: bytes, or a number with `KiB`, `MiB`, `GiB` or `TiB`.
pub fn parse_setting_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size such as 512MiB or 4GiB");
    let (n, unit) = number_and_unit(text).ok_or_else(bad)?;
    let shift = match unit {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

mod setting_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_setting_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod setting_size {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_setting_size(&text).map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// The settings file's path.
    pub fn path() -> PathBuf {
        std::env::var_os("HYPERBOX_TEMPLATE_CONFIG")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(SETTINGS), PathBuf::from)
    }

    /// Reads the settings; a file that does not parse, or names a template badly, is an
    /// error naming it.
    pub fn load() -> Result<Settings, EngineError> {
        let path = Self::path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(failed(format!("cannot read {}: {e}", path.display()))),
        };
        let settings: Settings = toml::from_str(&text).map_err(|e| {
            EngineError::InvalidSpec(format!("template settings {}: {e}", path.display()))
        })?;
        for entry in &settings.shared {
            if !entry.contains('/') {
                return Err(EngineError::InvalidSpec(format!(
                    "template settings {}: shared entry {entry:?} is not POD_NAMESPACE/NAME",
                    path.display()
                )));
            }
            hyperbox_shim_core::template::check_reference(entry).map_err(|e| {
                EngineError::InvalidSpec(format!("template settings {}: {e}", path.display()))
            })?;
        }
        Ok(settings)
    }

    /// Whether template `name` of pod namespace `owner` is shared.
    pub fn shares(&self, owner: &str, name: &str) -> bool {
        self.shared
            .iter()
            .any(|e| e.split_once('/') == Some((owner, name)))
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

/// An overlay rootfs: where the container's changes go, and the image's layers.
#[derive(Debug, PartialEq, Eq)]
struct Overlay {
    upper: PathBuf,
    layers: Vec<PathBuf>,
}

fn overlay_of(mounts: &[RootfsMount]) -> Result<Overlay, String> {
    if mounts.is_empty() {
        return Err(
            "templates need the rootfs as the snapshotter's mounts, given to the \
                    runtime to mount (as containerd's clients and CRI give them); this \
                    container's engine mounted the rootfs itself (as Docker does, with its \
                    own storage or the containerd image store)"
                .to_string(),
        );
    }
    let [m] = mounts else {
        return Err(format!(
            "templates need a rootfs of one overlay mount (the overlayfs or hyperbox \
             snapshotter); this one has {} mounts",
            mounts.len()
        ));
    };
    let option = |key: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    match (m.kind.as_str(), option("upperdir"), option("lowerdir")) {
        ("overlay", Some(upper), Some(lower)) => Ok(Overlay {
            upper: PathBuf::from(upper),
            layers: lower.split(':').map(layer_identity).collect(),
        }),
        _ => Err(format!(
            "templates need a writable overlay rootfs (the overlayfs or hyperbox snapshotter); \
             this one is a {} mount",
            m.kind
        )),
    }
}

/// A lower directory as the snapshot it belongs to: `.../snapshots/3/fs` and
/// `.../snapshots/3/erofs` are both `.../snapshots/3`.
fn layer_identity(dir: &str) -> PathBuf {
    let p = Path::new(dir);
    match (p.file_name().and_then(|n| n.to_str()), p.parent()) {
        (Some("fs" | "erofs"), Some(parent)) => parent.to_path_buf(),
        _ => p.to_path_buf(),
    }
}

/// Copies the tree `from` onto `to` (created if missing, else merged into) as it is: owners,
/// modes, times,
/// extended attributes (an overlay's opaque directories), device nodes (its whiteouts),
/// links never followed.
fn copy_tree(from: &Path, to: &Path, deadline: Instant) -> Result<(), EngineError> {
    let mut child = OwnedChild::spawn(
        Command::new("cp")
            .args(["-a", "--no-target-directory", "--"])
            .arg(from)
            .arg(to)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .map_err(|e| failed(format!("cannot run cp: {e}")))?;
    // Its errors are read meanwhile, so that many of them cannot fill the pipe and stall it.
    let stderr = child.stderr().take();
    let reading = std::thread::spawn(move || {
        let mut said = Vec::new();
        if let Some(mut e) = stderr {
            let _ = io::Read::read_to_end(&mut e, &mut said);
        }
        said
    });
    // Past the capture's deadline the copy is stopped.
    let left = deadline.saturating_duration_since(Instant::now());
    let status = match child.wait_for(Some(left)) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "the copy of {} did not finish within the template settings' \
                 capture_timeout: it was stopped",
                from.display()
            )));
        }
        Err(e) => return Err(failed(format!("cannot wait for cp: {e}"))),
    };
    let said = reading.join().unwrap_or_default();
    if !status.success() {
        return Err(failed(format!(
            "cannot copy {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&said).trim()
        )));
    }
    Ok(())
}

/// In a bundle restored from a template: the template's rootfs layer it mounted.
const LAYER_FILE: &str = "hyperbox-template-layer";

/// What a restore from a template needs: CRIU's images, the rootfs mounts with the template's
/// layer, and the hold that keeps the template from removal until they are mounted.
#[derive(Debug)]
pub struct PreparedRestore {
    pub spec: RestoreSpec,
    pub mounts: Vec<RootfsMount>,
    pub hold: Hold,
}

/// A `flock(2)` on a template's directory: shared while a restore mounts it, exclusive while
/// it is removed. Released when dropped.
#[derive(Debug)]
pub struct Hold {
    _dir: fs::File,
}

impl Hold {
    fn take(path: &Path, how: libc::c_int, what: &str) -> Result<Hold, EngineError> {
        let dir = fs::File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                EngineError::NotFound(format!("template {} does not exist", path.display()))
            }
            _ => failed(format!("cannot open {}: {e}", path.display())),
        })?;
        // SAFETY: flock on an fd this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&dir), how) } != 0 {
            let e = io::Error::last_os_error();
            return Err(failed(format!("cannot {what} {}: {e}", path.display())));
        }
        Ok(Hold { _dir: dir })
    }

    fn shared(path: &Path) -> Result<Hold, EngineError> {
        match Self::take(path, libc::LOCK_SH, "hold") {
            // Nothing to hold: the check that follows says the template does not exist.
            Err(EngineError::NotFound(_)) => Ok(Hold {
                _dir: fs::File::open("/").map_err(|e| failed(format!("cannot open /: {e}")))?,
            }),
            other => other,
        }
    }

    fn exclusive(path: &Path) -> Result<Hold, EngineError> {
        Self::take(
            path,
            libc::LOCK_EX | libc::LOCK_NB,
            "lock (a restore is using it)",
        )
    }
}

/// The mount points of overlays (in this mount namespace, the host's and the shims') that
/// have `layer` as a lower directory.
fn overlays_using(layer: &Path) -> Vec<PathBuf> {
    let wanted = layer.to_string_lossy();
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut fields = right.split(' ');
            let (fstype, _source, options) = (fields.next()?, fields.next()?, fields.next()?);
            let lower = options
                .split(',')
                .find_map(|o| o.strip_prefix("lowerdir="))?;
            (fstype == "overlay" && lower.split(':').any(|d| d == wanted))
                .then(|| PathBuf::from(left.split(' ').nth(4).unwrap_or_default()))
        })
        .collect()
}

/// Puts the overlay upper directory `upper` over the layer `dest` (a copy of a lower layer),
/// as the overlay showed them: what `upper` deletes (whiteouts), hides (opaque directories)
/// or replaces goes first, then its entries are copied in. `dest` stays a layer: whiteouts
/// and opaque directories are kept, for the image layers below.
fn squash(upper: &Path, dest: &Path, deadline: Instant) -> Result<(), EngineError> {
    clear_for(upper, dest).map_err(|e| {
        failed(format!(
            "cannot put {} over {}: {e}",
            upper.display(),
            dest.display()
        ))
    })?;
    // Onto an existing directory, a copy of a tree merges into it.
    copy_tree(upper, dest, deadline)
}

/// Removes from `dest` what the entries of the upper directory `upper` replace.
fn clear_for(upper: &Path, dest: &Path) -> io::Result<()> {
    for entry in fs::read_dir(upper)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        let Ok(existing) = fs::symlink_metadata(&target) else {
            continue;
        };
        let meta = entry.metadata()?;
        let remove = |t: &Path| {
            if existing.is_dir() {
                fs::remove_dir_all(t)
            } else {
                fs::remove_file(t)
            }
        };
        if meta.is_dir() && existing.is_dir() && !is_opaque(&entry.path()) {
            clear_for(&entry.path(), &target)?;
        } else {
            remove(&target)?;
        }
    }
    Ok(())
}

/// An overlay opaque directory: `trusted.overlay.opaque` is `y`.
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: lgetxattr writes at most `value.len()` bytes into `value`.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Bytes on disk under `path`, links not followed.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

/// fsync(2) of every file and directory under `path` (not the whole filesystem, as syncfs
/// would: a busy host may have much else to write).
fn sync_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
    } else if !meta.is_file() {
        return Ok(());
    }
    fs::File::open(path)?.sync_all()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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

impl Store {
    /// The templates of `namespace` under [`root`].
    pub fn new(namespace: &str) -> Result<Store, EngineError> {
        Self::at(&root(), namespace)
    }

    /// The templates of `namespace` under `root`.
    pub fn at(root: &Path, namespace: &str) -> Result<Store, EngineError> {
        Self::scoped(root, namespace, None)
    }

    /// The templates of pod namespace `owner` (when given) of `namespace` under `root`.
    pub fn scoped(root: &Path, namespace: &str, owner: Option<&str>) -> Result<Store, EngineError> {
        check_name(namespace).map_err(|e| {
            EngineError::InvalidSpec(format!(
                "namespace {namespace:?}: {}",
                e.replace("template name", "name")
            ))
        })?;
        let mut dir = root.join(namespace);
        if let Some(owner) = owner {
            check_owner(owner).map_err(EngineError::InvalidSpec)?;
            dir.push(format!("{OWNER_PREFIX}{owner}"));
        }
        Ok(Store {
            root: root.to_path_buf(),
            dir,
            namespace: namespace.to_string(),
            owner: owner.map(str::to_string),
        })
    }

    /// The store of the container of `bundle`: its owner's in `namespace`.
    pub fn for_bundle(namespace: &str, bundle: &Path) -> Result<Store, EngineError> {
        Self::scoped(&root(), namespace, owner_of(bundle)?.as_deref())
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The pod namespace whose templates these are, under Kubernetes.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// The pod namespaces that have templates in this store's containerd namespace.
    pub fn owners(&self) -> Vec<String> {
        let mut owners: Vec<String> = fs::read_dir(self.root.join(&self.namespace))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(OWNER_PREFIX)
                    .filter(|o| check_owner(o).is_ok())
                    .map(str::to_string)
            })
            .collect();
        owners.sort();
        owners
    }

    /// This owner's directory.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whose templates these are, for messages.
    pub(crate) fn describe(&self) -> String {
        self.scope()
    }

    /// A shared hold on template `name`, which must exist (a push reads it meanwhile).
    pub(crate) fn hold(&self, name: &str) -> Result<Hold, EngineError> {
        check_name(name).map_err(EngineError::InvalidSpec)?;
        Hold::take(&self.path(name), libc::LOCK_SH, "hold").map_err(|e| match e {
            EngineError::NotFound(_) => self.missing(name),
            e => e,
        })
    }

    fn missing(&self, name: &str) -> EngineError {
        EngineError::NotFound(format!(
            "template {name} does not exist in {}: capture it first (annotation \
             io.hyperbox.template.capture={name}); `containerd-shim-hyperbox-v1 templates \
             list {}` lists the templates",
            self.scope(),
            self.cli_options()
        ))
    }

    /// Template `name`'s record.
    pub(crate) fn record(&self, name: &str) -> Result<Record, EngineError> {
        let path = self.path(name);
        if !path.is_dir() {
            return Err(self.missing(name));
        }
        let file = path.join(RECORD);
        fs::read(&file)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| {
                EngineError::InvalidSpec(format!(
                    "template {name} is damaged: cannot read {}: {e}; remove it with \
                     `containerd-shim-hyperbox-v1 templates remove {} {name}`",
                    file.display(),
                    self.cli_options()
                ))
            })
    }

    /// Keeps the pulled template staged in `tmp` (its `images/` and `rootfs/`) as
    /// `record.name` with `record`, if the owner's templates stay within `quota`; returns its
    /// size. One of that name that appeared meanwhile is kept instead.
    pub(crate) fn keep_pulled(
        &self,
        tmp: &Path,
        record: &Record,
        quota: u64,
    ) -> Result<u64, EngineError> {
        let file = tmp.join(RECORD);
        fs::write(&file, serde_json::to_vec_pretty(record).unwrap_or_default())
            .map_err(|e| failed(format!("cannot write {}: {e}", file.display())))?;
        let used = disk_usage(&self.dir);
        if used > quota {
            return Err(EngineError::Unsupported(format!(
                "cannot keep template {}: the templates of {} would take {used} bytes, more \
                 than the template settings' owner_quota ({quota} bytes, {})",
                record.name,
                self.scope(),
                Settings::path().display()
            )));
        }
        sync_tree(tmp).map_err(|e| failed(format!("cannot sync {}: {e}", tmp.display())))?;
        let path = self.path(&record.name);
        match fs::rename(tmp, &path) {
            Ok(()) => Ok(disk_usage(&path)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
                Ok(disk_usage(&path))
            }
            Err(e) => Err(failed(format!(
                "cannot keep template {}: {e}",
                path.display()
            ))),
        }
    }

    /// Whose templates these are, for messages.
    fn scope(&self) -> String {
        match &self.owner {
            None => format!("namespace {}", self.namespace),
            Some(o) => format!("namespace {}, pod namespace {o}", self.namespace),
        }
    }

    /// The CLI options that name this store.
    fn cli_options(&self) -> String {
        match &self.owner {
            None => format!("-n {}", self.namespace),
            Some(o) => format!("-n {} -p {o}", self.namespace),
        }
    }

    /// The directory of template `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn error_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.error"))
    }

    /// Written at each restore from template `name`: its mtime is when it was last used.
    fn used_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.used"))
    }

    fn log_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.log"))
    }

    /// Creates the store's directories, the root readable by root only.
    pub(crate) fn ensure(&self) -> Result<(), EngineError> {
        let root = self.root.as_path();
        for dir in [root, &self.dir] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| failed(format!("cannot create {}: {e}", dir.display())))?;
        }
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))
            .map_err(|e| failed(format!("cannot restrict {}: {e}", root.display())))
    }

    /// Removes what captures and removals killed midway left behind.
    fn sweep(&self) {
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix(".capture-")
                .or_else(|| name.strip_prefix(".remove-"))
                .or_else(|| name.strip_prefix(".push-"))
                .or_else(|| name.strip_prefix(".pull-"))
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if pid.is_some_and(|pid| !pid_alive(pid)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        self.expire();
    }

    /// Removes the templates nothing restored from for the template settings'
    /// `expire_unused` (counted from their capture when never used), unless a restore or a
    /// running container uses them.
    fn expire(&self) {
        let expire = match Settings::load() {
            Ok(s) if !s.expire_unused.is_zero() => s.expire_unused,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!("templates are not expired: {e}");
                return;
            }
        };
        let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if check_name(&name).is_err() {
                continue;
            }
            let Some(last) = [
                mtime(&self.used_file(&name)),
                mtime(&entry.path().join(RECORD)),
            ]
            .into_iter()
            .flatten()
            .max() else {
                continue;
            };
            if last.elapsed().is_ok_and(|idle| idle > expire) {
                match self.remove(&name) {
                    Ok(_) => tracing::info!(name, "template expired: unused for {expire:?}"),
                    Err(e) => tracing::debug!(name, "expired template kept: {e}"),
                }
            }
        }
    }

    /// Captures container `c` (id `id`, bundle `bundle`, frozen by the caller) as template
    /// `spec.name`; a template of that name is kept as it is.
    pub fn capture(
        &self,
        c: &Container,
        id: &str,
        bundle: &Path,
        spec: &TemplateCapture,
        image: Option<&ImageRef>,
    ) -> Result<Captured, EngineError> {
        check_name(&spec.name).map_err(EngineError::InvalidSpec)?;
        let settings = Settings::load()?;
        let deadline = Instant::now() + settings.capture_timeout;
        let overlay = overlay_of(&spec.rootfs)
            .map_err(|e| EngineError::Unsupported(format!("cannot capture container {id}: {e}")))?;
        let criu = Criu::get()?;
        self.ensure()?;
        self.sweep();
        let path = self.path(&spec.name);
        if path.exists() {
            return Ok(Captured::Exists { path });
        }
        let changes = disk_usage(&overlay.upper);
        if changes > settings.max_rootfs_changes {
            return Err(EngineError::Unsupported(format!(
                "cannot capture container {id}: its rootfs changes take {changes} bytes, more \
                 than the template settings' max_rootfs_changes ({} bytes, {})",
                settings.max_rootfs_changes,
                Settings::path().display()
            )));
        }
        let tmp = self
            .dir
            .join(format!(".capture-{}-{}", spec.name, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| failed(format!("cannot create {}: {e}", tmp.display())))?;
        let written = self
            .write(c, id, bundle, spec, image, &overlay, &criu, &tmp, deadline)
            .and_then(|()| {
                // The owner's templates with this one, and what other captures hold now.
                let used = disk_usage(&self.dir);
                if used > settings.owner_quota {
                    return Err(EngineError::Unsupported(format!(
                        "cannot keep template {}: the templates of {} would take {used} bytes, \
                         more than the template settings' owner_quota ({} bytes, {})",
                        spec.name,
                        self.scope(),
                        settings.owner_quota,
                        Settings::path().display()
                    )));
                }
                Ok(())
            });
        if let Err(e) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        match fs::rename(&tmp, &path) {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST | libc::ENOTEMPTY)) => {
                let _ = fs::remove_dir_all(&tmp);
                return Ok(Captured::Exists { path });
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(failed(format!(
                    "cannot keep template {}: {e}",
                    path.display()
                )));
            }
        }
        let _ = fs::remove_file(self.error_file(&spec.name));
        let _ = fs::remove_dir_all(self.log_dir(&spec.name));
        Ok(Captured::Kept {
            bytes: disk_usage(&path),
            path,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        c: &Container,
        id: &str,
        bundle: &Path,
        spec: &TemplateCapture,
        image: Option<&ImageRef>,
        overlay: &Overlay,
        criu: &Criu,
        tmp: &Path,
        deadline: Instant,
    ) -> Result<(), EngineError> {
        // A container restored from a template has that template's changes as a layer of
        // its own: the new template's rootfs is that layer with the upper directory over it.
        let rootfs = tmp.join(ROOTFS);
        match fs::read(bundle.join(LAYER_FILE)) {
            Ok(layer) => {
                let layer = PathBuf::from(std::ffi::OsString::from_vec(layer));
                copy_tree(&layer, &rootfs, deadline)?;
                squash(&overlay.upper, &rootfs, deadline)?;
            }
            Err(_) => copy_tree(&overlay.upper, &rootfs, deadline)?,
        }
        let log_dir = self.log_dir(&spec.name);
        let _ = fs::remove_dir_all(&log_dir);
        checkpoint::dump(
            c,
            bundle,
            &CheckpointSpec {
                image_dir: tmp.join(IMAGES),
                work_dir: Some(log_dir.clone()),
                // A client connecting as the service becomes ready (a readiness probe)
                // stays with the original; copies start without it.
                skip_in_flight: true,
                timeout: Some(deadline.saturating_duration_since(Instant::now())),
                ..Default::default()
            },
        )?;
        let record = Record {
            name: spec.name.clone(),
            namespace: self.namespace.clone(),
            container: id.to_string(),
            created: now(),
            criu_version: criu.version()?,
            shim_version: SHIM_VERSION.to_string(),
            layers: overlay.layers.clone(),
            image: image
                .map(|i| i.name.clone())
                .or_else(|| image_annotation(bundle)),
            image_digest: image.map(|i| i.digest.clone()),
            owner: self.owner.clone(),
            security: Some(Box::new(Security::of(&checkpoint::load_spec(bundle)?))),
            kernel: Some(crate::distribution::kernel()),
            arch: Some(std::env::consts::ARCH.to_string()),
            source: None,
        };
        // What another node's CRIU checks before it takes this template (`templates pull`).
        criu.cpuinfo_dump(&tmp.join(IMAGES)).map_err(failed)?;
        let file = tmp.join(RECORD);
        fs::write(
            &file,
            serde_json::to_vec_pretty(&record).unwrap_or_default(),
        )
        .map_err(|e| failed(format!("cannot write {}: {e}", file.display())))?;
        // Whole on disk before it is visible under its name.
        sync_tree(tmp).map_err(|e| failed(format!("cannot sync {}: {e}", tmp.display())))?;
        let _ = fs::remove_dir_all(&log_dir);
        Ok(())
    }

    /// Records why the capture of `name` failed, for `templates list`.
    pub fn record_failure(&self, name: &str, reason: &str) {
        if check_name(name).is_err() || self.ensure().is_err() {
            return;
        }
        let file = self.error_file(name);
        // Written beside and renamed over: a reader (`templates list`) never sees it half
        // written.
        let tmp = self
            .dir
            .join(format!(".{name}.error-{}.tmp", std::process::id()));
        let written = fs::write(&tmp, reason).and_then(|()| fs::rename(&tmp, &file));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!("cannot write {}: {e}", file.display());
        }
    }

    /// The template `name`'s record, checked against this host: the CRIU and shim that will
    /// restore it, and the image of a container to restore (`mounts`, its rootfs, and
    /// `bundle`, its spec).
    pub fn check(
        &self,
        name: &str,
        mounts: &[RootfsMount],
        bundle: &Path,
        image: Option<&ImageRef>,
    ) -> Result<Record, EngineError> {
        let record = self.record(name)?;
        let criu = Criu::get()?.version()?;
        if record.criu_version != criu || record.shim_version != SHIM_VERSION {
            return Err(EngineError::Unsupported(format!(
                "template {name} was captured with CRIU {} and containerd-shim-hyperbox-v1 {}; \
                 this host has CRIU {criu} and shim {SHIM_VERSION}: capture it again",
                record.criu_version, record.shim_version
            )));
        }
        // The kernel and machine too (a record of an older shim does not say them).
        if record.kernel.is_some() {
            let differ = crate::distribution::differences(&record, &criu);
            if !differ.is_empty() {
                return Err(EngineError::Unsupported(format!(
                    "cannot restore from template {name}: {}; capture it again",
                    differ.join("; ")
                )));
            }
        }
        // A pulled template is matched to its image by digest alone: the snapshots of its
        // layers are another node's.
        if record.source.is_some() && image.is_none() {
            return Err(EngineError::InvalidSpec(format!(
                "template {name} was pulled from {}: it is matched to its image by digest, \
                 and containerd did not say this container's image",
                record.source.as_ref().map_or("", |s| s.reference.as_str())
            )));
        }
        if let (Some(theirs), Some(ours)) = (&record.image_digest, image) {
            if *theirs != ours.digest {
                return Err(EngineError::InvalidSpec(format!(
                    "template {name} was captured from another image: {}@{theirs}, this \
                     container's is {}@{}",
                    record.image.as_deref().unwrap_or("?"),
                    ours.name,
                    ours.digest
                )));
            }
        }
        let overlay = overlay_of(mounts).map_err(|e| {
            EngineError::Unsupported(format!("cannot restore from template {name}: {e}"))
        })?;
        if record.source.is_none() && overlay.layers != record.layers {
            return Err(EngineError::InvalidSpec(format!(
                "template {name} was captured from another image: its layers are {:?}, this \
                 container's are {:?}",
                record.layers, overlay.layers
            )));
        }
        let annotated = image_annotation(bundle);
        if let (None, Some(theirs), Some(ours)) = (&record.image_digest, &record.image, &annotated)
        {
            if theirs != ours {
                return Err(EngineError::InvalidSpec(format!(
                    "template {name} was captured from image {theirs}, this container runs {ours}"
                )));
            }
        }
        // CRIU gives the copies the captured process's credentials, capabilities, seccomp
        // filters and labels, whatever this spec says: it must say the same.
        let Some(theirs) = &record.security else {
            return Err(EngineError::InvalidSpec(format!(
                "template {name} records no security settings (an older shim captured it): \
                 capture it again"
            )));
        };
        let wanted = Security::of(&checkpoint::load_spec(bundle)?);
        let differences = theirs.differences(&wanted);
        if !differences.is_empty() {
            return Err(EngineError::InvalidSpec(format!(
                "cannot restore from template {name}: its processes would keep the security \
                 settings they were captured with, and this container asks for others: {}",
                differences.join("; ")
            )));
        }
        Ok(record)
    }

    /// Prepares container `id` to restore from template `name`: checks the template, and
    /// gives the container's rootfs mounts with the template's changes as the top lower layer
    /// of its overlay (nothing is copied, whatever their size), where its images are, and a
    /// shared hold on the template to keep until the rootfs is mounted. The bundle records
    /// the layer, for a capture of the restored container.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_restore(
        &self,
        name: &str,
        id: &str,
        bundle: &Path,
        mounts: &[RootfsMount],
        image: Option<&ImageRef>,
        lazy: bool,
    ) -> Result<PreparedRestore, EngineError> {
        let path = self.path(name);
        let settings = Settings::load()?;
        let hold = Hold::shared(&path)?;
        self.check(name, mounts, bundle, image)?;
        // Used now: not expired for a while (see `sweep`).
        let _ = fs::write(self.used_file(name), b"");
        let layer = path.join(ROOTFS);
        let mut mounts = mounts.to_vec();
        let lower = mounts[0]
            .options
            .iter_mut()
            .find(|o| o.starts_with("lowerdir="))
            .expect("checked: an overlay with lower directories");
        *lower = format!(
            "lowerdir={}:{}",
            layer.display(),
            &lower["lowerdir=".len()..]
        );
        let record = bundle.join(LAYER_FILE);
        fs::write(&record, layer.as_os_str().as_encoded_bytes()).map_err(|e| {
            failed(format!(
                "cannot restore container {id} from template {name}: cannot write {}: {e}",
                record.display()
            ))
        })?;
        Ok(PreparedRestore {
            spec: RestoreSpec {
                image_dir: path.join(IMAGES),
                work_dir: Some(bundle.join("criu-work")),
                timeout: Some(settings.restore_timeout),
                lazy,
            },
            mounts,
            hold,
        })
    }

    /// The templates, and the captures that failed, by name.
    pub fn list(&self) -> Vec<Listed> {
        self.sweep();
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file_name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".error"))
            {
                out.push(Listed::Failed {
                    name: name.to_string(),
                    reason: fs::read_to_string(entry.path()).unwrap_or_default(),
                });
                continue;
            }
            if file_name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            let record = fs::read(path.join(RECORD))
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            match record {
                Some(record) => out.push(Listed::Template {
                    bytes: disk_usage(&path),
                    record: Box::new(record),
                    path,
                }),
                None => out.push(Listed::Failed {
                    name: file_name,
                    reason: format!("damaged: no readable {RECORD}"),
                }),
            }
        }
        out.sort_by(|a, b| a.name().cmp(b.name()));
        out
    }

    /// Removes template `name` (and the record of a failed capture of it). Containers
    /// restored from it are not affected. `Ok(false)` when there was nothing to remove.
    pub fn remove(&self, name: &str) -> Result<bool, EngineError> {
        check_name(name).map_err(EngineError::InvalidSpec)?;
        let removed = fs::remove_file(self.error_file(name)).is_ok();
        let _ = fs::remove_dir_all(self.log_dir(name));
        let _ = fs::remove_file(self.used_file(name));
        let path = self.path(name);
        if !path.exists() {
            return Ok(removed);
        }
        // Not while a restore is mounting it, nor while an overlay has it as a layer.
        let _hold = Hold::exclusive(&path)?;
        let users = overlays_using(&path.join(ROOTFS));
        if !users.is_empty() {
            return Err(EngineError::Unsupported(format!(
                "template {name} is a layer of {} running container(s) (rootfs {}): remove \
                 them first",
                users.len(),
                users
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        // Out of sight at once, then removed: a restore sees the template whole or not at all.
        let doomed = self
            .dir
            .join(format!(".remove-{name}-{}", std::process::id()));
        fs::rename(&path, &doomed)
            .map_err(|e| failed(format!("cannot remove {}: {e}", path.display())))?;
        fs::remove_dir_all(&doomed)
            .map_err(|e| failed(format!("cannot remove {}: {e}", doomed.display())))?;
        let _ = fs::remove_dir(&self.dir);
        Ok(true)
    }

    /// The namespaces that have a store under `root`.
    pub fn namespaces(root: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Listed {
    pub fn name(&self) -> &str {
        match self {
            Listed::Template { record, .. } => &record.name,
            Listed::Failed { name, .. } => name,
        }
    }
}

/// `io::Error` for the CLI.
pub fn io_error(e: EngineError) -> io::Error {
    io::Error::other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_example_parses_and_shares_nothing() {
        let example: Settings = toml::from_str(include_str!("../../config/templates.toml"))
            .expect("config/templates.toml parses");
        let defaults = Settings::default();
        assert!(example.shared.is_empty());
        assert_eq!(
            (
                example.capture_timeout,
                example.restore_timeout,
                example.max_rootfs_changes,
                example.owner_quota,
                example.expire_unused
            ),
            (
                defaults.capture_timeout,
                defaults.restore_timeout,
                defaults.max_rootfs_changes,
                defaults.owner_quota,
                defaults.expire_unused
            ),
            "the example gives the defaults"
        );
        let some: Settings = toml::from_str("shared = [\"team-a/py\"]").unwrap();
        assert!(some.shares("team-a", "py"));
        assert!(!some.shares("team-b", "py") && !some.shares("team-a", "other"));
        assert!(
            toml::from_str::<Settings>("share = []").is_err(),
            "unknown keys refused"
        );
    }

    #[test]
    fn durations_and_sizes_of_the_settings() {
        for (text, secs) in [
            ("0", 0),
            ("90s", 90),
            ("5m", 300),
            ("12h", 43_200),
            ("30d", 2_592_000),
        ] {
            assert_eq!(
                parse_setting_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "5", "1.5m", "m", "5w", "-1s"] {
            assert!(parse_setting_duration(bad).is_err(), "{bad}");
        }
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("64KiB", 65_536),
            ("4GiB", 4 << 30),
        ] {
            assert_eq!(parse_setting_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "4GB", "1.5GiB", "KiB", "99999999999TiB"] {
            assert!(parse_setting_size(bad).is_err(), "{bad}");
        }
    }
    use std::os::unix::fs::FileTypeExt;

    fn overlay(options: &[&str]) -> Vec<RootfsMount> {
        vec![RootfsMount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }]
    }

    #[test]
    fn an_overlay_gives_its_upper_dir_and_layers() {
        let o = overlay_of(&overlay(&[
            "index=off",
            "workdir=/s/snapshots/9/work",
            "upperdir=/s/snapshots/9/fs",
            "lowerdir=/s/snapshots/3/erofs:/s/snapshots/1/fs:/other",
        ]))
        .unwrap();
        assert_eq!(o.upper, PathBuf::from("/s/snapshots/9/fs"));
        assert_eq!(
            o.layers,
            [
                PathBuf::from("/s/snapshots/3"),
                PathBuf::from("/s/snapshots/1"),
                PathBuf::from("/other")
            ]
        );
        let e = overlay_of(&overlay(&["lowerdir=/a:/b"])).unwrap_err();
        assert!(e.contains("writable overlay"), "{e}");
        let e = overlay_of(&[]).unwrap_err();
        assert!(e.contains("mounted the rootfs itself"), "{e}");
    }

    fn set_opaque(dir: &Path) {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: setxattr reads the name and one byte of value.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn an_upper_dir_squashed_over_a_layer_is_what_the_overlay_showed() {
        let root = std::env::temp_dir().join(format!("hb-squash-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (layer, upper, dest) = (root.join("layer"), root.join("upper"), root.join("dest"));
        for d in ["a", "gone", "hidden", "file-then-dir"] {
            fs::create_dir_all(layer.join(d)).unwrap();
        }
        fs::write(layer.join("a/kept"), "layer").unwrap();
        fs::write(layer.join("a/changed"), "layer").unwrap();
        fs::write(layer.join("gone/x"), "layer").unwrap();
        fs::write(layer.join("hidden/x"), "layer").unwrap();
        fs::write(layer.join("dir-then-file"), "layer").unwrap();
        fs::create_dir_all(upper.join("a")).unwrap();
        fs::write(upper.join("a/changed"), "upper").unwrap();
        fs::write(upper.join("a/new"), "upper").unwrap();
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        fs::create_dir_all(upper.join("hidden")).unwrap();
        set_opaque(&upper.join("hidden"));
        fs::write(upper.join("hidden/y"), "upper").unwrap();
        fs::write(upper.join("file-then-dir"), "upper").unwrap();
        fs::create_dir_all(upper.join("dir-then-file")).unwrap();

        copy_tree(&layer, &dest, Instant::now() + Duration::from_secs(60)).unwrap();
        squash(&upper, &dest, Instant::now() + Duration::from_secs(60)).unwrap();
        let read = |p: &str| fs::read_to_string(dest.join(p)).ok();
        assert_eq!(read("a/kept").as_deref(), Some("layer"));
        assert_eq!(read("a/changed").as_deref(), Some("upper"));
        assert_eq!(read("a/new").as_deref(), Some("upper"));
        let gone = fs::symlink_metadata(dest.join("gone")).unwrap();
        assert!(
            gone.file_type().is_char_device() && gone.rdev() == 0,
            "a whiteout is kept"
        );
        assert!(
            !dest.join("hidden/x").exists(),
            "an opaque directory hides the layer's"
        );
        assert_eq!(read("hidden/y").as_deref(), Some("upper"));
        assert!(is_opaque(&dest.join("hidden")));
        assert_eq!(read("file-then-dir").as_deref(), Some("upper"));
        assert!(dest.join("dir-then-file").is_dir());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_layer_in_use_by_an_overlay_is_found() {
        let root = std::env::temp_dir().join(format!("hb-in-use-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["layer", "base", "upper", "work", "merged"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let layer = root.join("layer");
        assert!(overlays_using(&layer).is_empty());
        let options = format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            layer.display(),
            root.join("base").display(),
            root.join("upper").display(),
            root.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &root.join("merged"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap();
        let users = overlays_using(&layer);
        nix::mount::umount2(&root.join("merged"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(users, [root.join("merged")]);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_store_lists_removes_and_refuses_what_it_cannot_restore() {
        let root = std::env::temp_dir().join(format!("hb-templates-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let store = Store::at(&root, "ns1").unwrap();
        assert!(Store::at(&root, "../x").is_err());
        store.ensure().unwrap();
        assert_eq!(
            fs::metadata(&root).unwrap().permissions().mode() & 0o777,
            0o700
        );

        // Missing, then damaged.
        let bundle = root.join("bundle");
        fs::create_dir_all(&bundle).unwrap();
        let mounts = overlay(&["upperdir=/u", "lowerdir=/l/1/fs"]);
        let e = store.check("py", &mounts, &bundle, None).unwrap_err();
        assert!(matches!(e, EngineError::NotFound(_)), "{e}");
        fs::create_dir_all(store.path("py")).unwrap();
        fs::write(store.path("py").join(RECORD), "{").unwrap();
        let e = store
            .check("py", &mounts, &bundle, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("damaged") && e.contains("templates remove"),
            "{e}"
        );

        // A failure is listed beside the damaged one; stale captures are swept.
        store.record_failure("web", "did not create /ready within 5s");
        let stale = root.join("ns1/.capture-web-999999999");
        fs::create_dir_all(&stale).unwrap();
        let listed = store.list();
        let names: Vec<&str> = listed.iter().map(Listed::name).collect();
        assert_eq!(names, ["py", "web"]);
        assert!(!stale.exists());
        assert!(matches!(&listed[1], Listed::Failed { reason, .. } if reason.contains("/ready")));

        assert!(store.remove("py").unwrap());
        assert!(store.remove("web").unwrap());
        assert!(!store.remove("web").unwrap());
        assert!(store.list().is_empty());
        fs::remove_dir_all(&root).unwrap();
    }
}

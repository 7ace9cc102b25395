//! One owner's templates: where they are, their records, listing, removal, the sweep of what
//! killed captures left, expiry, and the locks that keep a template while a restore mounts it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hyperbox_shim_core::template::{check_name, check_owner};
use hyperbox_shim_core::EngineError;

use super::layer::{disk_usage, overlays_using, sync_tree};
use super::{failed, owner_of, root, Listed, Record, Settings, RECORD, ROOTFS};

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

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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
    pub(super) fn scope(&self) -> String {
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

    pub(super) fn error_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.error"))
    }

    /// Written at each restore from template `name`: its mtime is when it was last used.
    pub(super) fn used_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}.used"))
    }

    pub(super) fn log_dir(&self, name: &str) -> PathBuf {
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
    pub(super) fn sweep(&self) {
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

    pub(super) fn shared(path: &Path) -> Result<Hold, EngineError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::layer::overlay_mounts;

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
        let mounts = overlay_mounts(&["upperdir=/u", "lowerdir=/l/1/fs"]);
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

//! A capture: a frozen container's rootfs changes and CRIU's dump of it, written under a
//! temporary name and renamed into place once whole, within the settings' time and space.

use std::fs;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hyperbox_shim_core::template::{check_name, Captured, TemplateCapture};
use hyperbox_shim_core::{CheckpointSpec, EngineError};
use libcontainer::container::Container;

use super::layer::{copy_tree, disk_usage, overlay_of, squash, sync_tree, Overlay};
use super::restore::LAYER_FILE;
use super::{
    failed, image_annotation, Record, Settings, Store, IMAGES, RECORD, ROOTFS, SHIM_VERSION,
};
use crate::checkpoint;
use crate::criu::Criu;
use crate::image::ImageRef;
use crate::template_security::Security;

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
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
            .dir()
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
                let used = disk_usage(self.dir());
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
            namespace: self.namespace().to_string(),
            container: id.to_string(),
            created: now(),
            criu_version: criu.version()?,
            shim_version: SHIM_VERSION.to_string(),
            layers: overlay.layers.clone(),
            image: image
                .map(|i| i.name.clone())
                .or_else(|| image_annotation(bundle)),
            image_digest: image.map(|i| i.digest.clone()),
            owner: self.owner().map(str::to_string),
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
            .dir()
            .join(format!(".{name}.error-{}.tmp", std::process::id()));
        let written = fs::write(&tmp, reason).and_then(|()| fs::rename(&tmp, &file));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            tracing::warn!("cannot write {}: {e}", file.display());
        }
    }
}

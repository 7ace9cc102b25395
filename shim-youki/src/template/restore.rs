//! A restore from a template: the checks that the template fits this node and this container
//! (CRIU, shim, kernel, image, security settings), and the rootfs mounts that put the
//! template's changes under the new container's.

use std::fs;
use std::path::Path;

use hyperbox_shim_core::{EngineError, RestoreSpec, RootfsMount};

use super::layer::overlay_of;
use super::{
    failed, image_annotation, Hold, Record, Settings, Store, IMAGES, ROOTFS, SHIM_VERSION,
};
use crate::checkpoint;
use crate::criu::Criu;
use crate::image::ImageRef;
use crate::template_security::Security;

/// In a bundle restored from a template: the template's rootfs layer it mounted.
pub(super) const LAYER_FILE: &str = "hyperbox-template-layer";

/// What a restore from a template needs: CRIU's images, the rootfs mounts with the template's
/// layer, and the hold that keeps the template from removal until they are mounted.
#[derive(Debug)]
pub struct PreparedRestore {
    pub spec: RestoreSpec,
    pub mounts: Vec<RootfsMount>,
    pub hold: Hold,
}

impl Store {
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
}

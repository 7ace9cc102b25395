//! Merged images: an image's top layer gets one EROFS image of itself and every layer below
//! it, flattened as overlayfs shows them, once all of them are converted; snapshots made on
//! it then have that image as their only lower dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hyperbox_erofs::write_merged_image;
use tracing::{error, info, warn};

use super::{Converter, Job};
use crate::error::{io_err, Result, SnapshotterError};
use crate::layer::LayerStorage;
use crate::store::{self, MergeReport, SnapshotKind, SnapshotRecord, SnapshotTable};

impl Converter {
    /// Queues a merge of every converted layer that is an image's top (no committed
    /// child), has parents, and has no merged image yet (`merge_layers = true`).
    pub(crate) fn queue_pending_merges(&self) -> Result<()> {
        if !self.options.merge {
            return Ok(());
        }
        let all = self.store.read()?.all()?;
        for (key, rec) in &all {
            if self.wants_merge(key, rec, &all, false) {
                self.queue(Job::Merge {
                    id: rec.id,
                    on_use: false,
                });
            }
        }
        Ok(())
    }

    /// Whether committed layer `rec` (under `key`) should get a merged image: converted,
    /// with a parent, none yet, not set aside, and either no committed child (a layer below
    /// an image's top is read through the top's merged image) or `on_use` (a container was
    /// made on it: it is some image's top).
    fn wants_merge(
        &self,
        key: &str,
        rec: &SnapshotRecord,
        all: &[(String, SnapshotRecord)],
        on_use: bool,
    ) -> bool {
        self.options.merge
            && rec.kind == SnapshotKind::Committed
            && rec.storage.is_erofs()
            && rec.storage.merged_ns().is_none()
            && !rec.parent.is_empty()
            && rec
                .conversion
                .as_ref()
                .is_none_or(|c| c.merge_set_aside.is_none())
            && (on_use
                || !all
                    .iter()
                    .any(|(_, r)| r.kind == SnapshotKind::Committed && r.parent == key))
    }

    /// Whether layer `id` [wants a merged image](Self::wants_merge) now; false when that
    /// cannot be told (the merge itself tells errors).
    pub(crate) fn merge_wanted(&self, id: u64, on_use: bool) -> bool {
        let Ok(all) = self.store.read().and_then(|t| t.all()) else {
            return true;
        };
        all.iter()
            .find(|(_, r)| r.id == id)
            .is_some_and(|(key, rec)| self.wants_merge(key, rec, &all, on_use))
    }

    /// Writes, mounts and switches on the merged image of layer `id` if it
    /// [wants one](Self::wants_merge) and every layer below it is converted. A failure sets
    /// the merge aside (the layer stays served as an overlay of its layers' mounts).
    pub(crate) fn merge(&self, id: u64, on_use: bool) -> Result<()> {
        let _guard = self.layer_locks.lock(id);
        let (key, rec, inputs, layers) = {
            let txn = self.store.read()?;
            let all = txn.all()?;
            let Some((key, rec)) = all.iter().find(|(_, r)| r.id == id).cloned() else {
                return Ok(());
            };
            if !self.wants_merge(&key, &rec, &all, on_use) {
                return Ok(());
            }
            let ancestors = txn.ancestors(&rec.parent)?;
            if ancestors.iter().any(|(_, s)| !s.is_erofs()) {
                return Ok(()); // a layer below is still plain (pending or set aside)
            }
            // The nearest merged image below, and the layers' own images above it.
            let mut inputs = vec![self.layout.image_path(id)];
            for (pid, storage) in &ancestors {
                if storage.merged_ns().is_some() {
                    inputs.push(self.layout.merged_image_path(*pid));
                    break;
                }
                inputs.push(self.layout.image_path(*pid));
            }
            inputs.reverse();
            (key, rec, inputs, ancestors.len() as u32 + 1)
        };
        let started = Instant::now();
        match self.merge_once(&key, id, &inputs, layers, started) {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Err(undo) = self.drop_merged(id) {
                    warn!(id, "cannot undo the failed merge: {undo}");
                }
                error!(key, id, reason = %e, "merged erofs image failed: the layer is served as an overlay of its layers' images");
                self.update_conversion(&key, rec.id, |rec| {
                    rec.conversion
                        .get_or_insert_with(Default::default)
                        .merge_set_aside = Some(e.to_string());
                })?;
                Ok(())
            }
        }
    }

    fn merge_once(
        &self,
        key: &str,
        id: u64,
        inputs: &[PathBuf],
        layers: u32,
        started: Instant,
    ) -> Result<()> {
        self.drop_merged(id)?;
        let image = self.layout.merged_image_path(id);
        let mut tmp = image.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let options = self.image_options();
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        let stats = write_merged_image(&refs, &file, &tmp, &options)
            .map_err(|source| SnapshotterError::Merge { id, source })?;
        file.sync_all().map_err(io_err("cannot sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &image).map_err(io_err("cannot rename into place", &image))?;
        let dir = self.layout.snapshot_dir(id);
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("cannot sync", &dir))?;
        self.mount_merged(id)?;
        let report = MergeReport {
            millis: started.elapsed().as_millis() as u64,
            layers,
            inputs: inputs.len() as u32,
            image_bytes: stats.image_bytes,
            inodes: stats.inodes,
        };
        let switched = self.update_conversion(key, id, |rec| {
            if let LayerStorage::Erofs { merged_ns, .. } = &mut rec.storage {
                *merged_ns = Some(store::now_ns());
            }
            rec.conversion.get_or_insert_with(Default::default).merge = Some(report.clone());
        })?;
        if !switched {
            self.drop_merged(id)?;
            return Ok(());
        }
        info!(
            key,
            id,
            ?report,
            "merged erofs image of the layer and all below it"
        );
        Ok(())
    }
}

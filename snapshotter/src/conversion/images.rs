//! A layer's EROFS image files and mounts: mounted, dropped (with the layer's chunks),
//! re-mounted at start-up after a crash or reboot, and the plain `fs` dir released once
//! nothing uses it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use hyperbox_erofs::mount_image;
use tracing::{error, info, warn};

use super::mounts::{mount_points, parse_mountinfo, unmount_if_mounted, used_by_mounts};
use super::Converter;
use crate::error::{io_err, Result, SnapshotterError};
use crate::layer::LayerStorage;
use crate::store::{self, SnapshotKind, SnapshotRecord, SnapshotTable};
use crate::tree::remove_tree;

/// Removes `image`, its `.tmp` (a write cut short) and the (unmounted) mount point `mount`,
/// whichever exist.
pub(super) fn remove_image_files(image: &Path, mount: &Path) -> Result<()> {
    let mut tmp = image.as_os_str().to_owned();
    tmp.push(".tmp");
    for f in [image, Path::new(&tmp)] {
        match fs::remove_file(f) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("cannot remove", f)(e))
            }
            _ => {}
        }
    }
    match fs::remove_dir(mount) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("cannot remove", mount)(e)),
        _ => Ok(()),
    }
}

impl Converter {
    /// Undoes whatever an interrupted or abandoned conversion of layer `id` left: its
    /// mount, its chunk-store layer (after the unmount), its image and mount point.
    pub(crate) fn drop_erofs_layer(&self, id: u64) -> Result<()> {
        self.drop_merged(id)?;
        let mount = self.layout.erofs_dir(id);
        unmount_if_mounted(&mount)?;
        if self.chunks.remove_layer(&id.to_string())? {
            info!(id, "released the layer's chunks");
        }
        let image = self.layout.image_path(id);
        remove_image_files(&image, &mount)
    }

    /// Start-up: unmounts EROFS mounts of layers that are not (or no longer) converted,
    /// drops chunk-store layers no converted record owns, and mounts every converted layer
    /// the kernel does not already have mounted (mounts survive a snapshotter crash).
    pub(crate) fn recover_erofs(&self, all: &[(String, SnapshotRecord)]) -> Result<()> {
        let converted: BTreeMap<u64, &SnapshotRecord> = all
            .iter()
            .filter(|(_, r)| r.storage.is_erofs())
            .map(|(_, r)| (r.id, r))
            .collect();
        let snapshots = self.layout.snapshots_dir();
        let mounted =
            mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
        for m in &mounted {
            let Ok(rest) = m.strip_prefix(&snapshots) else {
                continue;
            };
            let Some(name) = rest.file_name().filter(|n| *n == "erofs" || *n == "merged") else {
                continue;
            };
            let id = rest
                .parent()
                .and_then(|p| p.to_str())
                .and_then(|p| p.parse::<u64>().ok());
            let Some(id) = id else { continue };
            let owned = converted
                .get(&id)
                .is_some_and(|r| name == "erofs" || r.storage.merged_ns().is_some());
            if !owned {
                info!(id, mount = %m.display(), "unmounting the erofs mount of an unconverted, unmerged or removed layer");
                unmount_if_mounted(m)?;
            }
        }
        let in_store: BTreeSet<String> = self.chunks.layers()?.into_iter().collect();
        for name in &in_store {
            let owned = name
                .parse::<u64>()
                .is_ok_and(|id| converted.contains_key(&id));
            if !owned {
                info!(
                    layer = name,
                    "rolling back a half-done conversion or removal"
                );
                self.chunks.remove_layer(name)?;
            }
        }
        for (_, rec) in all {
            if rec.kind == SnapshotKind::Committed && !rec.storage.is_erofs() {
                // Leftover image or mount point of an interrupted conversion.
                self.drop_erofs_layer(rec.id)?;
            } else if rec.storage.is_erofs() && rec.storage.merged_ns().is_none() {
                // Leftover of an interrupted merge.
                self.drop_merged(rec.id)?;
            }
        }
        let mounted =
            mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
        for id in converted.keys() {
            let target = self.layout.erofs_dir(*id);
            if mounted.contains(&target) {
                continue;
            }
            if !in_store.contains(&id.to_string()) {
                error!(
                    id,
                    "converted layer has no chunk-store record: it cannot be mounted"
                );
                continue;
            }
            self.mount_layer(*id)?;
            info!(id, "re-mounted converted layer");
        }
        for (id, rec) in &converted {
            let target = self.layout.merged_dir(*id);
            if rec.storage.merged_ns().is_none() || mounted.contains(&target) {
                continue;
            }
            self.mount_merged(*id)?;
            info!(id, "re-mounted merged image");
        }
        Ok(())
    }

    pub(super) fn mount_merged(&self, id: u64) -> Result<()> {
        self.mount_at(
            id,
            &self.layout.merged_image_path(id),
            &self.layout.merged_dir(id),
        )
    }

    /// Unmounts and deletes layer `id`'s merged image, if it has one (or a piece of one).
    pub(crate) fn drop_merged(&self, id: u64) -> Result<()> {
        let mount = self.layout.merged_dir(id);
        unmount_if_mounted(&mount)?;
        let image = self.layout.merged_image_path(id);
        remove_image_files(&image, &mount)
    }

    pub(super) fn mount_layer(&self, id: u64) -> Result<()> {
        self.mount_at(id, &self.layout.image_path(id), &self.layout.erofs_dir(id))
    }

    /// Mounts `image` (of layer `id`) with the store's packs at `target`, made if missing,
    /// and leaves it mounted.
    fn mount_at(&self, id: u64, image: &Path, target: &Path) -> Result<()> {
        match fs::DirBuilder::new().mode(0o755).create(target) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(io_err("cannot create mount point", target)(e))
            }
            _ => {}
        }
        mount_image(
            image,
            &self.chunks.pack_paths(),
            target,
            self.options.mount_mode,
        )
        .map_err(|source| SnapshotterError::Mount { id, source })?
        .keep_mounted();
        Ok(())
    }

    /// Deletes the plain `fs` dir of every converted layer that no active snapshot or view
    /// created before its switch still uses as a lower dir, and that no mount still uses
    /// (an overlay naming it as its upper dir: a snapshot committed while its container ran).
    pub(crate) fn release_plain_dirs(&self) -> Result<()> {
        let txn = self.store.write()?;
        let all = txn.all()?;
        let table = fs::read_to_string("/proc/self/mountinfo")
            .map(|t| parse_mountinfo(&t))
            .map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
        let mut doomed = Vec::new();
        for (key, layer) in &all {
            let LayerStorage::Erofs { converted_ns, .. } = layer.storage else {
                continue;
            };
            let fs_dir = self.layout.fs_dir(layer.id);
            if !fs_dir.exists() {
                continue;
            }
            let mut in_use = false;
            for (_, r) in &all {
                if r.kind == SnapshotKind::Committed || r.created_ns >= converted_ns {
                    continue;
                }
                if txn
                    .ancestors(&r.parent)?
                    .iter()
                    .any(|(pid, _)| *pid == layer.id)
                {
                    in_use = true;
                    break;
                }
            }
            if in_use {
                continue;
            }
            if used_by_mounts(&fs_dir, &table) {
                info!(key, id = layer.id, dir = %fs_dir.display(), "plain layer directory kept: a mount still uses it");
                continue;
            }
            let trash =
                self.layout
                    .trash_dir()
                    .join(format!("{}-fs-{}", layer.id, store::now_ns()));
            fs::rename(&fs_dir, &trash).map_err(io_err("cannot move to trash", &fs_dir))?;
            info!(key, id = layer.id, "plain layer directory released");
            doomed.push(trash);
        }
        drop(txn);
        for d in doomed {
            if let Err(e) = remove_tree(&d) {
                warn!(dir = %d.display(), "cannot delete a released plain layer directory: {e}");
            }
        }
        Ok(())
    }
}

//! The `Snapshotter` implementation: every method of containerd's snapshots API, with the
//! error codes of containerd's own snapshotters (its `snapshots/storage` package), which
//! its unpacker and garbage collector rely on.
//!
//! Each change is one store transaction. Files move around it so that a crash at any point
//! leaves only directories the start-up recovery ([`HyperboxSnapshotter::open`]) knows to
//! remove:
//!
//! - Prepare/View: the directories are made under `staging/`, then, inside the write
//!   transaction, renamed to `snapshots/ID` just before it commits. A crash before the commit
//!   leaves a staging dir or a `snapshots/ID` the database does not know: both removed.
//! - Commit: a record change only (the layer stays where it is); the layer is then queued
//!   for conversion to an EROFS image ([`crate::conversion`]), which switches its record in a
//!   transaction of its own once the image is mounted.
//! - Remove: the record is deleted and committed first, then the directory is moved to
//!   `trash/` and deleted. A crash in between leaves an unknown `snapshots/ID` or a trash
//!   entry: both removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use hyperbox_erofs::{ChunkStore, StoreConfig};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::{Info, Snapshotter, Usage};
use tracing::{info, warn};

use crate::conversion::{self, Converter, Job};
use crate::error::{io_err, Result};
use crate::filter::Filters;
use crate::layer::{self, LayerStorage, Layout, OverlayOptions};
use crate::store::{self, MetaStore, SnapshotKind, SnapshotRecord, SnapshotTable};
use crate::tree::remove_tree;
use crate::usage;

mod labels;
#[cfg(test)]
mod tests;

pub use crate::error::SnapshotterError;
pub use crate::options::{ConversionLimits, LayerOptions};
use labels::{field, to_info};
pub use labels::{CONVERSION_LABEL, MERGED_LABEL, STORAGE_LABEL};

/// The snapshotter: a store and a directory layout under one root.
#[derive(Debug, Clone)]
pub struct HyperboxSnapshotter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    store: Arc<MetaStore>,
    overlay: OverlayOptions,
    staging_seq: AtomicU64,
    options: LayerOptions,
    /// Converts and merges committed layers in the background; owns the chunk store and
    /// the per-layer locks.
    conversion: Arc<Converter>,
}

impl HyperboxSnapshotter {
    /// Opens the snapshotter at `root` (creating it), then recovers from any crash: removes
    /// staging and trash entries and snapshot directories the database does not know,
    /// rolls back half-done conversions, re-mounts converted layers, and queues the layers
    /// still to convert.
    pub fn open(root: &Path, options: LayerOptions) -> Result<HyperboxSnapshotter> {
        let layout = Layout::new(root);
        layout
            .create()
            .map_err(io_err("cannot create root", root))?;
        let store = Arc::new(MetaStore::open(&layout.db_path())?);
        let chunks = ChunkStore::open(&layout.chunk_store_dir(), StoreConfig::default())?;
        let (converter, jobs) = Converter::new(layout.clone(), store.clone(), options, chunks);
        let inner = Arc::new(Inner {
            layout,
            store,
            overlay: OverlayOptions::probe(),
            staging_seq: AtomicU64::new(0),
            options,
            conversion: Arc::new(converter),
        });
        inner.recover()?;
        let converter = &inner.conversion;
        conversion::spawn_workers(Arc::downgrade(converter), jobs, inner.options.workers)
            .map_err(io_err("cannot start the conversion worker for", root))?;
        converter.queue_pending_conversions()?;
        converter.queue_pending_merges()?;
        converter.queue(Job::Gc);
        Ok(HyperboxSnapshotter { inner })
    }

    /// The directory layout (tests use it to find a snapshot's files).
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The snapshot whose plain directory `dir` is (`ROOT/snapshots/ID/fs`), if any.
    pub fn snapshot_of_dir(&self, dir: &Path) -> Option<u64> {
        let rest = dir.strip_prefix(self.inner.layout.snapshots_dir()).ok()?;
        let mut parts = rest.components();
        let id: u64 = parts.next()?.as_os_str().to_str()?.parse().ok()?;
        (parts.next()?.as_os_str() == "fs" && parts.next().is_none()).then_some(id)
    }

    /// The differ's unpack of the layer archive `tar` (uncompressed) into unpack snapshot
    /// `id`, as its EROFS image (blocking). `shown` names the archive in errors. On an
    /// error the snapshot is left as it was.
    pub fn unpack_archive(&self, id: u64, tar: &mut dyn Read, shown: &Path) -> Result<()> {
        self.inner.conversion.unpack_archive(id, tar, shown)
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| SnapshotterError::Task(e.to_string()))?
    }
}

impl Inner {
    fn recover(&self) -> Result<()> {
        for dir in [self.layout.staging_dir(), self.layout.trash_dir()] {
            self.clear_dir(&dir, |_| true)?;
        }
        let txn = self.store.read()?;
        let all = txn.all()?;
        drop(txn);
        // EROFS mounts first: a directory holding one cannot be removed.
        self.conversion.recover_erofs(&all)?;
        let known: BTreeSet<u64> = all.iter().map(|(_, r)| r.id).collect();
        self.remove_unknown_snapshot_dirs(&known)?;
        for (key, rec) in &all {
            let dir = match rec.storage {
                LayerStorage::Directory => self.layout.fs_dir(rec.id),
                LayerStorage::Erofs { .. } => self.layout.erofs_dir(rec.id),
            };
            if !dir.is_dir() {
                warn!(key, dir = %dir.display(), "snapshot directory is missing");
            }
        }
        self.conversion.release_plain_dirs()?;
        Ok(())
    }

    /// Removes the entries of `dir` for which `pick(name)` holds. An entry that cannot be
    /// removed is logged and left for the next Cleanup or start: it is garbage either way.
    fn clear_dir(&self, dir: &Path, pick: impl Fn(&str) -> bool) -> Result<()> {
        let entries = fs::read_dir(dir).map_err(io_err("cannot read", dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err("cannot read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if pick(&name) {
                let path = entry.path();
                info!(path = %path.display(), "removing a leftover");
                if let Err(e) = remove_tree(&path) {
                    warn!(path = %path.display(), "cannot remove a leftover: {e}");
                }
            }
        }
        Ok(())
    }

    /// Removes `snapshots/*` entries whose id is not in `known` (half-made prepares,
    /// interrupted removals).
    fn remove_unknown_snapshot_dirs(&self, known: &BTreeSet<u64>) -> Result<()> {
        let dir = self.layout.snapshots_dir();
        self.clear_dir(&dir, |name| {
            name.parse::<u64>()
                .map_or(true, |id| !known.contains(&id) || id.to_string() != name)
        })
    }

    fn staging_path(&self) -> PathBuf {
        let n = self.staging_seq.fetch_add(1, Ordering::Relaxed);
        self.layout
            .staging_dir()
            .join(format!("{}-{n}", std::process::id()))
    }

    fn create(
        &self,
        kind: SnapshotKind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapshotterError::EmptyKey);
        }
        // Checked before any file is made, and again in the transaction, which decides.
        {
            let txn = self.store.read()?;
            if txn.get(&key)?.is_some() {
                return Err(SnapshotterError::AlreadyExists(key));
            }
        }
        let parent_top = || -> Result<Option<PathBuf>> {
            if parent.is_empty() {
                return Ok(None);
            }
            let txn = self.store.read()?;
            let p = txn
                .get(&parent)?
                .ok_or_else(|| SnapshotterError::ParentNotFound(parent.clone()))?;
            Ok(Some(p.storage.lower_dir(&self.layout, p.id, u64::MAX)))
        };
        let staging = self.staging_path();
        // The parent's plain dir may be released (its conversion just switched it to EROFS)
        // between reading its record and reading the dir's owner: read the record again.
        let mut tries = 0;
        loop {
            let top = parent_top()?;
            match layer::make_snapshot_dirs(&staging, kind, top.as_deref()) {
                Ok(()) => break,
                Err(e) => {
                    let _ = remove_tree(&staging);
                    tries += 1;
                    if e.kind() != io::ErrorKind::NotFound || top.is_none() || tries == 3 {
                        return Err(io_err("cannot create snapshot directories in", &staging)(e));
                    }
                }
            }
        }
        let mut placed: Option<PathBuf> = None;
        let result = (|| {
            let mut txn = self.store.write()?;
            if txn.get(&key)?.is_some() {
                return Err(SnapshotterError::AlreadyExists(key.clone()));
            }
            let parents = if parent.is_empty() {
                Vec::new()
            } else {
                let p = txn
                    .get(&parent)?
                    .ok_or_else(|| SnapshotterError::ParentNotFound(parent.clone()))?;
                if p.kind != SnapshotKind::Committed {
                    return Err(SnapshotterError::ParentNotCommitted(parent.clone()));
                }
                txn.ancestors(&parent)?
            };
            let id = txn.allocate_id()?;
            let now = store::now_ns();
            let rec = SnapshotRecord {
                id,
                kind,
                parent: parent.clone(),
                labels: labels.into_iter().collect(),
                created_ns: now,
                updated_ns: now,
                storage: LayerStorage::Directory,
                conversion: None,
            };
            txn.put(&key, &rec)?;
            let dest = self.layout.snapshot_dir(id);
            fs::rename(&staging, &dest).map_err(io_err("cannot move snapshot to", &dest))?;
            placed = Some(dest);
            txn.commit()?;
            info!(key, id, ?kind, parent, "created snapshot");
            // A container (or view) made on a layer without a merged image, that is not an
            // unpack: the layer may be an image's top that has children in another image
            // (`FROM` it, pulled first). Later ones get the merged image.
            let unpack = key
                .rsplit('/')
                .next()
                .is_some_and(|k| k.starts_with("extract-"));
            if let Some((pid, storage)) = parents.first() {
                // A layer with no parent is its own flat tree: nothing to merge.
                if self.options.merge
                    && !unpack
                    && parents.len() > 1
                    && storage.is_erofs()
                    && storage.merged_ns().is_none()
                {
                    self.conversion.queue(Job::Merge {
                        id: *pid,
                        on_use: true,
                    });
                }
            }
            Ok(layer::mounts(
                &self.layout,
                id,
                kind,
                now,
                &parents,
                self.overlay,
            ))
        })();
        if result.is_err() {
            let _ = remove_tree(placed.as_deref().unwrap_or(&staging));
        }
        result
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let txn = self.store.read()?;
        let rec = txn
            .get(key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.to_string()))?;
        if rec.kind == SnapshotKind::Committed {
            return Err(SnapshotterError::NotMountable(key.to_string()));
        }
        let parents = txn.ancestors(&rec.parent)?;
        Ok(layer::mounts(
            &self.layout,
            rec.id,
            rec.kind,
            rec.created_ns,
            &parents,
            self.overlay,
        ))
    }

    fn commit(&self, name: String, key: String, labels: HashMap<String, String>) -> Result<()> {
        let mut txn = self.store.write()?;
        if txn.get(&name)?.is_some() {
            return Err(SnapshotterError::AlreadyExists(name));
        }
        let mut rec = txn
            .get(&key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.clone()))?;
        if rec.kind != SnapshotKind::Active {
            return Err(SnapshotterError::NotActive(key));
        }
        txn.delete(&key)?;
        let now = store::now_ns();
        rec.kind = SnapshotKind::Committed;
        rec.labels = labels.into_iter().collect();
        rec.created_ns = now;
        rec.updated_ns = now;
        txn.put(&name, &rec)?;
        txn.commit()?;
        info!(name, key, id = rec.id, "committed snapshot");
        if rec.storage.is_erofs() {
            // Unpacked by the differ: already an EROFS image. It may complete an image whose
            // top now gets its merged image, and its empty plain dir goes.
            if let Err(e) = self.conversion.queue_pending_merges() {
                warn!(name, "cannot queue merges: {e}");
            }
            if let Err(e) = self.conversion.release_plain_dirs() {
                warn!(name, "cannot release plain layer directories: {e}");
            }
        } else if self.options.convert {
            self.conversion.queue(Job::Convert(rec.id));
        }
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
        // A committed layer may be converting or merging: wait for that to finish (or give
        // up) first. Its id never changes (ids are not reused).
        let committed = self
            .store
            .read()?
            .get(key)?
            .filter(|r| r.kind == SnapshotKind::Committed || r.storage.is_erofs())
            .map(|r| r.id);
        let _converting = committed.map(|id| self.conversion.lock_layer(id));
        let mut txn = self.store.write()?;
        let rec = txn
            .get(key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.to_string()))?;
        if txn.all()?.iter().any(|(_, r)| r.parent == key) {
            return Err(SnapshotterError::HasChildren(key.to_string()));
        }
        txn.delete(key)?;
        txn.commit()?;
        info!(key, id = rec.id, "removed snapshot");
        // The record is gone: from here on the directory is garbage that recovery or
        // Cleanup also remove, so a failure is logged, not returned. An EROFS layer is
        // unmounted before its chunks are released (hyperbox-erofs's rule), and the pack
        // space is reclaimed in the background.
        if rec.storage.is_erofs() && rec.kind != SnapshotKind::Committed {
            // An unpack the differ wrote whose snapshot was never committed.
            if let Err(e) = self.conversion.drop_erofs_layer(rec.id) {
                warn!(key, id = rec.id, "cannot release the erofs layer: {e}");
            }
            self.conversion.queue(Job::Gc);
        } else if rec.kind == SnapshotKind::Committed {
            if let Err(e) = self.conversion.drop_erofs_layer(rec.id) {
                warn!(key, id = rec.id, "cannot release the erofs layer: {e}");
            }
            self.conversion.queue(Job::Gc);
            // Its parent may now be an image's top layer without a merged image.
            if let Err(e) = self.conversion.queue_pending_merges() {
                warn!(key, "cannot queue merges: {e}");
            }
        } else if let Err(e) = self.conversion.release_plain_dirs() {
            // A view or active snapshot gone may free plain dirs of converted layers.
            warn!(key, "cannot release plain layer directories: {e}");
        }
        let dir = self.layout.snapshot_dir(rec.id);
        let trash = self.layout.trash_dir().join(rec.id.to_string());
        let doomed = match fs::rename(&dir, &trash) {
            Ok(()) => trash,
            Err(_) => dir,
        };
        if let Err(e) = remove_tree(&doomed) {
            warn!(key, dir = %doomed.display(), "cannot delete removed snapshot: {e}");
        }
        Ok(())
    }

    fn stat(&self, key: &str) -> Result<Info> {
        let rec = self
            .store
            .read()?
            .get(key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.to_string()))?;
        Ok(to_info(key, &rec))
    }

    fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        let key = info.name.clone();
        let mut txn = self.store.write()?;
        let mut rec = txn
            .get(&key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.clone()))?;
        let new: BTreeMap<String, String> = info.labels.into_iter().collect();
        match fieldpaths.filter(|p| !p.is_empty()) {
            None => rec.labels = new,
            Some(paths) => {
                for path in paths {
                    if path == "labels" {
                        rec.labels = new.clone();
                    } else if let Some(label) = path.strip_prefix("labels.") {
                        match new.get(label) {
                            Some(v) => rec.labels.insert(label.to_string(), v.clone()),
                            None => rec.labels.remove(label),
                        };
                    } else {
                        return Err(SnapshotterError::ImmutableField { key, field: path });
                    }
                }
            }
        }
        rec.updated_ns = store::now_ns();
        txn.put(&key, &rec)?;
        txn.commit()?;
        Ok(to_info(&key, &rec))
    }

    fn usage(&self, key: &str) -> Result<Usage> {
        let rec = self
            .store
            .read()?
            .get(key)?
            .ok_or_else(|| SnapshotterError::NotFound(key.to_string()))?;
        let fs_dir = self.layout.fs_dir(rec.id);
        let plain = match &rec.storage {
            LayerStorage::Erofs { .. } if !fs_dir.exists() => Default::default(),
            _ => usage::disk_usage(&fs_dir).map_err(io_err("cannot measure", &fs_dir))?,
        };
        match &rec.storage {
            LayerStorage::Directory => Ok(Usage {
                size: plain.size,
                inodes: plain.inodes,
            }),
            LayerStorage::Erofs {
                first_stored_bytes, ..
            } => {
                // The image, the chunks this layer stored first, and the plain dir while
                // older mounts still need it.
                let image = self.layout.image_path(rec.id);
                let meta = fs::metadata(&image).map_err(io_err("cannot measure", &image))?;
                // The merged image, if any, is this layer's too.
                let merged = fs::metadata(self.layout.merged_image_path(rec.id))
                    .map_or(0, |m| m.blocks() * 512);
                let image_bytes = i64::try_from(meta.blocks() * 512 + merged).unwrap_or(i64::MAX);
                let chunk_bytes = i64::try_from(*first_stored_bytes).unwrap_or(i64::MAX);
                Ok(Usage {
                    size: image_bytes + chunk_bytes + plain.size,
                    inodes: 1 + i64::from(merged > 0) + plain.inodes,
                })
            }
        }
    }

    fn list(&self, filters: &[String]) -> Result<Vec<Info>> {
        let filters = Filters::parse(filters)?;
        let all = self.store.read()?.all()?;
        Ok(all
            .iter()
            .filter(|(key, rec)| filters.matches(|path| field(key, rec, path)))
            .map(|(key, rec)| to_info(key, rec))
            .collect())
    }

    /// Deletes what no record owns: trash, staging dirs of earlier processes, unknown
    /// snapshot dirs. Holds the write transaction so no Prepare is placing a directory.
    fn cleanup(&self) -> Result<()> {
        let txn = self.store.write()?;
        let known: BTreeSet<u64> = txn.all()?.iter().map(|(_, r)| r.id).collect();
        self.remove_unknown_snapshot_dirs(&known)?;
        self.clear_dir(&self.layout.trash_dir(), |_| true)?;
        let mine = format!("{}-", std::process::id());
        self.clear_dir(&self.layout.staging_dir(), |name| !name.starts_with(&mine))?;
        drop(txn);
        self.conversion.release_plain_dirs()?;
        let gc = self.conversion.chunks().gc()?;
        info!(?gc, "cleanup: chunk store garbage collected");
        // Layers whose conversion failed (e.g. a full disk) are tried again.
        self.conversion.queue_pending_conversions()?;
        self.conversion.queue_pending_merges()?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Snapshotter for HyperboxSnapshotter {
    type Error = SnapshotterError;

    #[tracing::instrument(skip(self), level = "debug")]
    async fn stat(&self, key: String) -> Result<Info> {
        self.blocking(move |i| i.stat(&key)).await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info> {
        self.blocking(move |i| i.update(info, fieldpaths)).await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn usage(&self, key: String) -> Result<Usage> {
        self.blocking(move |i| i.usage(&key)).await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn mounts(&self, key: String) -> Result<Vec<Mount>> {
        self.blocking(move |i| i.mounts(&key)).await
    }

    #[tracing::instrument(skip(self, labels), level = "debug")]
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        info!(key, parent, "prepare");
        self.blocking(move |i| i.create(SnapshotKind::Active, key, parent, labels))
            .await
    }

    #[tracing::instrument(skip(self, labels), level = "debug")]
    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        info!(key, parent, "view");
        self.blocking(move |i| i.create(SnapshotKind::View, key, parent, labels))
            .await
    }

    #[tracing::instrument(skip(self, labels), level = "debug")]
    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        self.blocking(move |i| i.commit(name, key, labels)).await
    }

    #[tracing::instrument(skip(self), level = "debug")]
    async fn remove(&self, key: String) -> Result<()> {
        self.blocking(move |i| i.remove(&key)).await
    }

    async fn clear(&self) -> Result<()> {
        self.blocking(|i| i.cleanup()).await
    }

    type InfoStream = tokio_stream::Iter<std::vec::IntoIter<Result<Info>>>;

    #[tracing::instrument(skip(self), level = "debug")]
    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream> {
        let infos = self.blocking(move |i| i.list(&filters)).await?;
        Ok(tokio_stream::iter(
            infos.into_iter().map(Ok).collect::<Vec<_>>(),
        ))
    }
}

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
use std::sync::{mpsc, Arc, Mutex};

use hyperbox_erofs::{ChunkStore, MountMode, StoreConfig};

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::{self, Status};
use containerd_snapshots::{Info, Kind, Snapshotter, Usage};
use tracing::{info, warn};

use crate::filter::{FilterError, Filters};
use crate::layer::{self, LayerStorage, Layout, OverlayOptions};
use crate::store::{self, MetaStore, SnapshotKind, SnapshotRecord, SnapshotTable, StoreError};
use crate::usage;

/// Errors of the snapshotter, each with the gRPC code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("snapshot {0:?}: not found")]
    NotFound(String),
    #[error("parent snapshot {0:?}: not found")]
    ParentNotFound(String),
    #[error("snapshot {0:?}: already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} is not active")]
    NotActive(String),
    #[error("snapshot {0:?} is committed: mounts exist only for active snapshots and views")]
    NotMountable(String),
    #[error("cannot remove snapshot {0:?}: it has children, remove them first")]
    HasChildren(String),
    #[error("parent {0:?} is not a committed snapshot")]
    ParentNotCommitted(String),
    #[error("snapshot key is empty")]
    EmptyKey,
    #[error("cannot update field {field:?} of snapshot {key:?}: only labels may change")]
    ImmutableField { key: String, field: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("snapshotter task failed: {0}")]
    Task(String),
    #[error("chunk store: {0}")]
    Chunks(#[from] hyperbox_erofs::StoreError),
    #[error("erofs layer {id}: {source}")]
    Layer {
        id: u64,
        source: hyperbox_erofs::LayerError,
    },
    #[error("merged image of layer {id}: {source}")]
    Merge {
        id: u64,
        source: hyperbox_erofs::ImageError,
    },
    #[error("erofs layer {id}: {source}")]
    Mount {
        id: u64,
        source: hyperbox_erofs::MountError,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotterError {
    let path = path.to_path_buf();
    move |source| SnapshotterError::Io { what, path, source }
}

impl SnapshotterError {
    /// The gRPC code containerd maps back to its `errdefs` error.
    pub fn code(&self) -> tonic::Code {
        use SnapshotterError as E;
        match self {
            E::NotFound(_) | E::ParentNotFound(_) => tonic::Code::NotFound,
            E::AlreadyExists(_) => tonic::Code::AlreadyExists,
            E::NotActive(_) | E::NotMountable(_) | E::HasChildren(_) => {
                tonic::Code::FailedPrecondition
            }
            E::ParentNotCommitted(_) | E::EmptyKey | E::ImmutableField { .. } | E::Filter(_) => {
                tonic::Code::InvalidArgument
            }
            E::Store(_)
            | E::Io { .. }
            | E::Task(_)
            | E::Chunks(_)
            | E::Layer { .. }
            | E::Merge { .. }
            | E::Mount { .. } => tonic::Code::Internal,
        }
    }
}

impl From<SnapshotterError> for Status {
    fn from(e: SnapshotterError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

type Result<T, E = SnapshotterError> = std::result::Result<T, E>;

/// What to do with committed layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOptions {
    /// Convert committed layers to EROFS images (config `convert`).
    pub convert: bool,
    /// How EROFS images are mounted (config `mount_mode`).
    pub mount_mode: MountMode,
    /// What one layer's conversion may cost; a layer over a limit is set aside.
    pub limits: ConversionLimits,
    /// Give each image's top layer one merged EROFS image of all its layers (config
    /// `merge_layers`).
    pub merge: bool,
    /// Layers converted at once (config `conversion_workers`).
    pub workers: usize,
}

impl Default for LayerOptions {
    fn default() -> Self {
        LayerOptions {
            convert: true,
            merge: true,
            workers: 1,
            mount_mode: MountMode::Auto,
            limits: ConversionLimits::default(),
        }
    }
}

/// The limits of one layer's conversion (config `max_depth`, `max_inodes`,
/// `max_image_bytes`, `conversion_timeout_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionLimits {
    /// Deepest directory nesting below the layer's root.
    pub max_depth: u32,
    /// Inodes in the layer.
    pub max_inodes: u64,
    /// Size of the EROFS image (8 bytes of chunk index per 64 KiB of file, holes included).
    pub max_image_bytes: u64,
    /// Wall-clock time of the walk and the chunking.
    pub timeout: std::time::Duration,
}

impl Default for ConversionLimits {
    fn default() -> Self {
        ConversionLimits {
            max_depth: hyperbox_erofs::DEFAULT_MAX_DEPTH,
            max_inodes: hyperbox_erofs::DEFAULT_MAX_INODES,
            max_image_bytes: hyperbox_erofs::DEFAULT_MAX_IMAGE_BYTES,
            timeout: std::time::Duration::from_secs(600),
        }
    }
}

/// The snapshotter: a store and a directory layout under one root.
#[derive(Debug, Clone)]
pub struct HyperboxSnapshotter {
    inner: Arc<Inner>,
}

/// The layers being converted, merged or removed: one of these at a time per layer.
#[derive(Debug, Default)]
pub(crate) struct LayerLocks {
    busy: Mutex<BTreeSet<u64>>,
    freed: std::sync::Condvar,
}

impl LayerLocks {
    /// Waits until nothing works on layer `id`, then holds it until the guard is dropped.
    pub(crate) fn lock(&self, id: u64) -> LayerLock<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(&id) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(id);
        LayerLock { locks: self, id }
    }
}

/// Held while one layer is worked on ([`LayerLocks::lock`]).
pub(crate) struct LayerLock<'a> {
    locks: &'a LayerLocks,
    id: u64,
}

impl Drop for LayerLock<'_> {
    fn drop(&mut self) {
        let mut busy = self.locks.busy.lock().unwrap_or_else(|p| p.into_inner());
        busy.remove(&self.id);
        self.locks.freed.notify_all();
    }
}

/// Work for the background worker ([`crate::conversion`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Job {
    /// Convert committed layer `id` to an EROFS image.
    Convert(u64),
    /// Write the merged image of committed layer `id`, if it is an image's top layer, or
    /// (`on_use`) because a container or view was just made on it.
    Merge { id: u64, on_use: bool },
    /// Reclaim pack space nothing references any more.
    Gc,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) layout: Layout,
    pub(crate) store: MetaStore,
    overlay: OverlayOptions,
    staging_seq: AtomicU64,
    pub(crate) options: LayerOptions,
    pub(crate) chunks: ChunkStore,
    /// Held per layer while it is converted or merged and while it is removed, so that no
    /// two of these work on one layer at once (different layers convert in parallel).
    pub(crate) layer_locks: LayerLocks,
    jobs: Mutex<mpsc::Sender<Job>>,
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
        let store = MetaStore::open(&layout.db_path())?;
        let chunks = ChunkStore::open(&layout.chunk_store_dir(), StoreConfig::default())?;
        let (tx, rx) = mpsc::channel();
        let inner = Arc::new(Inner {
            layout,
            store,
            overlay: OverlayOptions::probe(),
            staging_seq: AtomicU64::new(0),
            options,
            chunks,
            layer_locks: LayerLocks::default(),
            jobs: Mutex::new(tx),
        });
        inner.recover()?;
        crate::conversion::spawn_workers(Arc::downgrade(&inner), rx, inner.options.workers)
            .map_err(io_err("cannot start the conversion worker for", root))?;
        inner.queue_pending_conversions()?;
        inner.queue_pending_merges()?;
        inner.queue(Job::Gc);
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
        self.inner.unpack_archive(id, tar, shown)
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

fn to_kind(kind: SnapshotKind) -> Kind {
    match kind {
        SnapshotKind::Active => Kind::Active,
        SnapshotKind::View => Kind::View,
        SnapshotKind::Committed => Kind::Committed,
    }
}

/// The label telling how a committed layer is stored (`erofs` once converted); computed from
/// the record, never stored, so no client can set it.
pub const STORAGE_LABEL: &str = "containerd.io/snapshot/hyperbox.storage";

/// Computed label of a committed layer's conversion: what it cost, or why the layer was
/// set aside (`set aside: REASON`).
pub const CONVERSION_LABEL: &str = "containerd.io/snapshot/hyperbox.conversion";

/// Computed label of a committed layer's merged image: what it cost, or why there is none
/// (`set aside: REASON`).
pub const MERGED_LABEL: &str = "containerd.io/snapshot/hyperbox.merged";

/// Prefix of the labels the snapshotter computes; clients' labels under it are dropped.
const COMPUTED_LABELS: &str = "containerd.io/snapshot/hyperbox.";

/// The labels of a snapshot as clients see them: its own, plus [`STORAGE_LABEL`] (`erofs`
/// on a converted layer, `directory` on one set aside) and [`CONVERSION_LABEL`].
fn labels_of(rec: &SnapshotRecord) -> BTreeMap<String, String> {
    let mut labels = rec.labels.clone();
    labels.retain(|k, _| !k.starts_with(COMPUTED_LABELS));
    if rec.storage.is_erofs() {
        labels.insert(STORAGE_LABEL.to_string(), "erofs".to_string());
    }
    if let Some(c) = &rec.conversion {
        if let Some(reason) = &c.set_aside {
            labels.insert(STORAGE_LABEL.to_string(), "directory".to_string());
            labels.insert(CONVERSION_LABEL.to_string(), format!("set aside: {reason}"));
        } else if let Some(r) = &c.report {
            let mib = |b: u64| b as f64 / f64::from(1 << 20);
            labels.insert(
                CONVERSION_LABEL.to_string(),
                format!(
                    "{}took {} ms, peak RSS {:.1} MiB, image {:.1} MiB, {} inodes, {} chunks ({} new)",
                    if c.from_archive { "from the archive by the differ: " } else { "" },
                    r.millis,
                    mib(r.peak_rss_bytes),
                    mib(r.image_bytes),
                    r.inodes,
                    r.chunks,
                    r.new_chunks
                ),
            );
        }
        if let Some(reason) = &c.merge_set_aside {
            labels.insert(MERGED_LABEL.to_string(), format!("set aside: {reason}"));
        } else if let (Some(m), Some(_)) = (&c.merge, rec.storage.merged_ns()) {
            labels.insert(
                MERGED_LABEL.to_string(),
                format!(
                    "{} layers in one image, took {} ms, image {} KiB, {} inodes, from {} images",
                    m.layers,
                    m.millis,
                    m.image_bytes.div_ceil(1024),
                    m.inodes,
                    m.inputs
                ),
            );
        }
    }
    labels
}

fn to_info(key: &str, rec: &SnapshotRecord) -> Info {
    Info {
        kind: to_kind(rec.kind),
        name: key.to_string(),
        parent: rec.parent.clone(),
        labels: labels_of(rec).into_iter().collect(),
        created_at: store::system_time(rec.created_ns),
        updated_at: store::system_time(rec.updated_ns),
    }
}

/// The value of a field path of a snapshot, for filters (containerd's snapshot adaptor).
fn field(key: &str, rec: &SnapshotRecord, path: &[String]) -> Option<String> {
    let nonempty = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    match path.first().map(String::as_str)? {
        "kind" => Some(rec.kind.as_str().to_string()),
        "name" => nonempty(key),
        "parent" => nonempty(&rec.parent),
        "labels" if path.len() > 1 => labels_of(rec).get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

/// Removes a directory tree that may not exist.
pub(crate) use crate::tree::remove_tree;

impl Inner {
    /// Hands `job` to the background worker.
    pub(crate) fn queue(&self, job: Job) {
        let tx = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(job).is_err() {
            warn!(?job, "the conversion worker is gone");
        }
    }

    fn recover(&self) -> Result<()> {
        for dir in [self.layout.staging_dir(), self.layout.trash_dir()] {
            self.clear_dir(&dir, |_| true)?;
        }
        let txn = self.store.read()?;
        let all = txn.all()?;
        drop(txn);
        // EROFS mounts first: a directory holding one cannot be removed.
        self.recover_erofs(&all)?;
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
        self.release_plain_dirs()?;
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
                    self.queue(Job::Merge {
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
            if let Err(e) = self.queue_pending_merges() {
                warn!(name, "cannot queue merges: {e}");
            }
            if let Err(e) = self.release_plain_dirs() {
                warn!(name, "cannot release plain layer directories: {e}");
            }
        } else if self.options.convert {
            self.queue(Job::Convert(rec.id));
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
        let _converting = committed.map(|id| self.layer_locks.lock(id));
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
            if let Err(e) = self.drop_erofs_layer(rec.id) {
                warn!(key, id = rec.id, "cannot release the erofs layer: {e}");
            }
            self.queue(Job::Gc);
        } else if rec.kind == SnapshotKind::Committed {
            if let Err(e) = self.drop_erofs_layer(rec.id) {
                warn!(key, id = rec.id, "cannot release the erofs layer: {e}");
            }
            self.queue(Job::Gc);
            // Its parent may now be an image's top layer without a merged image.
            if let Err(e) = self.queue_pending_merges() {
                warn!(key, "cannot queue merges: {e}");
            }
        } else if let Err(e) = self.release_plain_dirs() {
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
        self.release_plain_dirs()?;
        let gc = self.chunks.gc()?;
        info!(?gc, "cleanup: chunk store garbage collected");
        // Layers whose conversion failed (e.g. a full disk) are tried again.
        self.queue_pending_conversions()?;
        self.queue_pending_merges()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversion;

    #[test]
    fn errors_map_to_the_codes_containerd_expects() {
        let cases = [
            (
                SnapshotterError::NotFound("k".into()),
                tonic::Code::NotFound,
            ),
            (
                SnapshotterError::ParentNotFound("p".into()),
                tonic::Code::NotFound,
            ),
            (
                SnapshotterError::AlreadyExists("k".into()),
                tonic::Code::AlreadyExists,
            ),
            (
                SnapshotterError::NotActive("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::NotMountable("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::HasChildren("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::ParentNotCommitted("p".into()),
                tonic::Code::InvalidArgument,
            ),
            (SnapshotterError::EmptyKey, tonic::Code::InvalidArgument),
            (SnapshotterError::Task("x".into()), tonic::Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let status: Status = e.into();
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    fn temp_root(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hb-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn labels() -> HashMap<String, String> {
        HashMap::new()
    }

    #[test]
    fn lifecycle_and_errors() {
        let root = temp_root("life");
        let plain = LayerOptions {
            convert: false,
            ..Default::default()
        };
        let s = HyperboxSnapshotter::open(&root, plain).unwrap();
        let i = &s.inner;
        let m = i
            .create(SnapshotKind::Active, "a".into(), "".into(), labels())
            .unwrap();
        assert_eq!(m[0].r#type, "bind");
        let upper = PathBuf::from(&m[0].source);
        fs::write(upper.join("file"), b"layer one").unwrap();
        assert!(matches!(
            i.create(SnapshotKind::Active, "a".into(), "".into(), labels()),
            Err(SnapshotterError::AlreadyExists(_))
        ));
        assert!(matches!(
            i.create(SnapshotKind::Active, "b".into(), "a".into(), labels()),
            Err(SnapshotterError::ParentNotCommitted(_))
        ));
        assert!(matches!(
            i.create(SnapshotKind::Active, "b".into(), "nope".into(), labels()),
            Err(SnapshotterError::ParentNotFound(_))
        ));
        i.commit("L1".into(), "a".into(), labels()).unwrap();
        assert!(matches!(i.stat("a"), Err(SnapshotterError::NotFound(_))));
        assert_eq!(i.stat("L1").unwrap().kind, Kind::Committed);
        assert!(matches!(
            i.mounts("L1"),
            Err(SnapshotterError::NotMountable(_))
        ));

        let m = i
            .create(SnapshotKind::Active, "b".into(), "L1".into(), labels())
            .unwrap();
        assert_eq!(m[0].r#type, "overlay");
        assert!(matches!(
            i.commit("L1".into(), "b".into(), labels()),
            Err(SnapshotterError::AlreadyExists(_))
        ));
        i.create(SnapshotKind::View, "v".into(), "L1".into(), labels())
            .unwrap();
        assert!(matches!(
            i.commit("V".into(), "v".into(), labels()),
            Err(SnapshotterError::NotActive(_))
        ));
        assert!(matches!(
            i.remove("L1"),
            Err(SnapshotterError::HasChildren(_))
        ));
        let listed: Vec<String> = i
            .list(&["kind==active".to_string()])
            .unwrap()
            .into_iter()
            .map(|x| x.name)
            .collect();
        assert_eq!(listed, ["b"]);

        let mut info = i.stat("L1").unwrap();
        info.labels.insert("x".into(), "1".into());
        info.labels.insert("y".into(), "2".into());
        let updated = i.update(info, Some(vec!["labels.x".into()])).unwrap();
        assert_eq!(updated.labels.get("x").map(String::as_str), Some("1"));
        assert!(!updated.labels.contains_key("y"));
        let info = i.stat("L1").unwrap();
        assert!(matches!(
            i.update(info, Some(vec!["parent".into()])),
            Err(SnapshotterError::ImmutableField { .. })
        ));

        let u = i.usage("L1").unwrap();
        assert_eq!(u.inodes, 2);

        // Restart: state survives; an unknown directory is swept.
        drop(s);
        fs::create_dir_all(root.join("snapshots/999/fs")).unwrap();
        fs::create_dir_all(root.join("staging/1-1/fs")).unwrap();
        let s = HyperboxSnapshotter::open(&root, plain).unwrap();
        assert!(!root.join("snapshots/999").exists());
        assert!(!root.join("staging/1-1").exists());
        let i = &s.inner;
        assert_eq!(i.list(&[]).unwrap().len(), 3);
        for k in ["b", "v", "L1"] {
            i.remove(k).unwrap();
        }
        assert_eq!(fs::read_dir(root.join("snapshots")).unwrap().count(), 0);
        drop(s);
        fs::remove_dir_all(&root).unwrap();
    }

    /// Waits until `key` is served from its EROFS image (the worker converts it).
    fn wait_converted(i: &Inner, key: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while i
            .stat(key)
            .unwrap()
            .labels
            .get(STORAGE_LABEL)
            .map(String::as_str)
            != Some("erofs")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{key} never converted"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn committed_layers_become_mounted_erofs_images_and_survive_a_restart() {
        if !nix::unistd::Uid::effective().is_root() {
            hyperbox_testkit::skip("needs root to mount erofs");
            return;
        }
        let root = temp_root("erofs");
        let s = HyperboxSnapshotter::open(&root, LayerOptions::default()).unwrap();
        let i = &s.inner;
        let m = i
            .create(SnapshotKind::Active, "a".into(), "".into(), labels())
            .unwrap();
        let upper = PathBuf::from(&m[0].source);
        let data: Vec<u8> = (0..300_000u32).map(|n| (n * 7 % 251) as u8).collect();
        fs::write(upper.join("file"), &data).unwrap();
        std::os::unix::fs::symlink("file", upper.join("link")).unwrap();
        i.commit("L1".into(), "a".into(), labels()).unwrap();
        // A view made before the switch keeps the plain dir, and its mounts keep naming it.
        i.create(SnapshotKind::View, "old".into(), "L1".into(), labels())
            .unwrap();
        wait_converted(i, "L1");
        let id = i.store.read().unwrap().get("L1").unwrap().unwrap().id;
        let mounted = i.layout.erofs_dir(id);
        assert!(conversion::mount_points().unwrap().contains(&mounted));
        assert_eq!(fs::read(mounted.join("file")).unwrap(), data);
        assert_eq!(
            fs::read_link(mounted.join("link")).unwrap(),
            Path::new("file")
        );
        assert_eq!(
            i.mounts("old").unwrap()[0].source,
            i.layout.fs_dir(id).to_string_lossy()
        );
        assert!(i.layout.fs_dir(id).exists());
        let m = i
            .create(SnapshotKind::View, "new".into(), "L1".into(), labels())
            .unwrap();
        assert_eq!(m[0].source, mounted.to_string_lossy());
        i.remove("old").unwrap();
        assert!(
            !i.layout.fs_dir(id).exists(),
            "plain dir kept after its last user"
        );
        assert_eq!(i.chunks.layers().unwrap(), [id.to_string()]);
        let u = i.usage("L1").unwrap();
        assert!(u.size >= 300_000, "{u:?}");

        // Restart after the mount went away (a reboot): the layer is mounted again.
        drop(s);
        nix::mount::umount2(&mounted, nix::mount::MntFlags::empty()).unwrap();
        let s = reopen(&root);
        assert!(conversion::mount_points().unwrap().contains(&mounted));
        assert_eq!(fs::read(mounted.join("file")).unwrap().len(), 300_000);
        // Restart with the mount still there (a crash): nothing is mounted twice.
        drop(s);
        let s = reopen(&root);
        let i2 = &s.inner;
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let needle = format!(" {} ", mounted.display());
        assert_eq!(text.matches(&needle).count(), 1, "{text}");

        i2.remove("new").unwrap();
        i2.remove("L1").unwrap();
        assert!(!conversion::mount_points().unwrap().contains(&mounted));
        assert!(i2.chunks.layers().unwrap().is_empty());
        i2.cleanup().unwrap();
        assert_eq!(i2.chunks.stats().unwrap().pack_disk_bytes, 0);
        drop(s);
        fs::remove_dir_all(&root).unwrap();
    }

    /// An archive with a directory and a file, or (with `orphan`) a file whose parent is not
    /// in it.
    fn layer_archive(orphan: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, data).unwrap();
        };
        if orphan {
            add("missing/file", tar::EntryType::Regular, b"x");
        } else {
            add("etc/", tar::EntryType::Directory, b"");
            add("etc/motd", tar::EntryType::Regular, &[7u8; 100_000]);
        }
        b.into_inner().unwrap()
    }

    /// The differ's unpack: only into an empty unpack snapshot (`extract-` key) of this
    /// snapshotter; a refused or broken archive leaves the snapshot as it was (no image, no
    /// chunks, still a directory), and the next try works; Commit then needs no conversion.
    #[test]
    fn the_differ_unpacks_archives_into_empty_unpack_snapshots_only() {
        if !nix::unistd::Uid::effective().is_root() {
            hyperbox_testkit::skip("needs root to mount erofs");
            return;
        }
        let root = temp_root("differ");
        let s = HyperboxSnapshotter::open(&root, LayerOptions::default()).unwrap();
        let i = &s.inner;
        let key = "ns/7/extract-123-abc sha256:aa".to_string();
        let m = i
            .create(SnapshotKind::Active, key.clone(), "".into(), labels())
            .unwrap();
        let fs_dir = PathBuf::from(&m[0].source);
        let id = s.snapshot_of_dir(&fs_dir).expect("our snapshot");
        assert_eq!(i.layout.fs_dir(id), fs_dir);
        for other in [
            fs_dir.join("sub"),
            fs_dir.parent().unwrap().to_path_buf(),
            i.layout.snapshots_dir().join("x").join("fs"),
            PathBuf::from("/var/lib/elsewhere/snapshots/1/fs"),
        ] {
            assert_eq!(s.snapshot_of_dir(&other), None, "{}", other.display());
        }
        let shown = Path::new("layer.tar");
        let untouched = |i: &Inner| {
            let rec = i.store.read().unwrap().get(&key).unwrap().unwrap();
            assert!(!rec.storage.is_erofs());
            assert!(!i.layout.image_path(id).exists());
            assert!(i.chunks.layers().unwrap().is_empty());
            assert!(!conversion::mount_points()
                .unwrap()
                .contains(&i.layout.erofs_dir(id)));
        };
        // Refused by the archive path, and cut short: nothing is left.
        let orphan = layer_archive(true);
        let e = s
            .unpack_archive(id, &mut &orphan[..], shown)
            .expect_err("parent not in the archive");
        assert!(e.to_string().contains("parent directory"), "{e}");
        untouched(i);
        let good = layer_archive(false);
        let cut = &good[..good.len() / 2];
        assert!(s.unpack_archive(id, &mut &cut[..], shown).is_err());
        untouched(i);
        // Not an unpack's snapshot, or not empty: refused.
        i.create(
            SnapshotKind::Active,
            "ns/7/container".into(),
            "".into(),
            labels(),
        )
        .unwrap();
        let other = i
            .store
            .read()
            .unwrap()
            .get("ns/7/container")
            .unwrap()
            .unwrap();
        assert!(s.unpack_archive(other.id, &mut &good[..], shown).is_err());
        fs::write(fs_dir.join("written"), b"by someone").unwrap();
        assert!(s.unpack_archive(id, &mut &good[..], shown).is_err());
        fs::remove_file(fs_dir.join("written")).unwrap();
        untouched(i);

        s.unpack_archive(id, &mut &good[..], shown).unwrap();
        let rec = i.store.read().unwrap().get(&key).unwrap().unwrap();
        assert!(rec.storage.is_erofs());
        assert!(rec.conversion.as_ref().unwrap().from_archive);
        assert!(labels_of(&rec)[CONVERSION_LABEL].starts_with("from the archive by the differ"));
        let mounted = i.layout.erofs_dir(id);
        assert_eq!(fs::read(mounted.join("etc/motd")).unwrap(), [7u8; 100_000]);
        // Twice: refused (no longer a directory).
        assert!(s.unpack_archive(id, &mut &good[..], shown).is_err());
        i.commit("ns/7/L".into(), key.clone(), labels()).unwrap();
        let m = i
            .create(
                SnapshotKind::Active,
                "ns/7/c".into(),
                "ns/7/L".into(),
                labels(),
            )
            .unwrap();
        assert!(
            m[0].options
                .iter()
                .any(|o| o.contains(&*mounted.to_string_lossy())),
            "{m:?}"
        );
        assert!(
            !fs_dir.exists(),
            "the empty plain dir is released at Commit"
        );
        i.remove("ns/7/c").unwrap();
        i.remove("ns/7/container").unwrap();
        i.remove("ns/7/L").unwrap();
        assert!(!conversion::mount_points().unwrap().contains(&mounted));
        assert!(i.chunks.layers().unwrap().is_empty());
        drop(s);
        fs::remove_dir_all(&root).unwrap();
    }

    fn busy(e: &str) -> bool {
        e.contains("already open") || e.contains("in use by another process")
    }

    /// Opens the snapshotter at `root` again in this process. The background worker may
    /// still be finishing a job of the dropped instance (holding the database open for a
    /// moment); a restarted snapshotter is a new process and never sees that.
    fn reopen(root: &Path) -> HyperboxSnapshotter {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match HyperboxSnapshotter::open(root, LayerOptions::default()) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() < deadline && busy(&e.to_string()) => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("reopen {}: {e}", root.display()),
            }
        }
    }
}

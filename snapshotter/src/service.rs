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
//! - Commit: a record change only (the layer stays where it is).
//! - Remove: the record is deleted and committed first, then the directory is moved to
//!   `trash/` and deleted. A crash in between leaves an unknown `snapshots/ID` or a trash
//!   entry: both removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
            E::Store(_) | E::Io { .. } | E::Task(_) => tonic::Code::Internal,
        }
    }
}

impl From<SnapshotterError> for Status {
    fn from(e: SnapshotterError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

type Result<T, E = SnapshotterError> = std::result::Result<T, E>;

/// The snapshotter: a store and a directory layout under one root.
#[derive(Debug, Clone)]
pub struct HyperboxSnapshotter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    layout: Layout,
    store: MetaStore,
    overlay: OverlayOptions,
    staging_seq: AtomicU64,
}

impl HyperboxSnapshotter {
    /// Opens the snapshotter at `root` (creating it), then recovers from any crash: removes
    /// staging and trash entries and snapshot directories the database does not know.
    pub fn open(root: &Path) -> Result<HyperboxSnapshotter> {
        let layout = Layout::new(root);
        layout
            .create()
            .map_err(io_err("cannot create root", root))?;
        let store = MetaStore::open(&layout.db_path())?;
        let inner = Inner {
            layout,
            store,
            overlay: OverlayOptions::probe(),
            staging_seq: AtomicU64::new(0),
        };
        inner.recover()?;
        Ok(HyperboxSnapshotter {
            inner: Arc::new(inner),
        })
    }

    /// The directory layout (tests use it to find a snapshot's files).
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
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

fn to_info(key: &str, rec: &SnapshotRecord) -> Info {
    Info {
        kind: to_kind(rec.kind),
        name: key.to_string(),
        parent: rec.parent.clone(),
        labels: rec.labels.clone().into_iter().collect(),
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
        "labels" if path.len() > 1 => rec.labels.get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

/// Removes a directory tree that may not exist.
fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Inner {
    fn recover(&self) -> Result<()> {
        for dir in [self.layout.staging_dir(), self.layout.trash_dir()] {
            self.clear_dir(&dir, |_| true)?;
        }
        let txn = self.store.read()?;
        let known: BTreeSet<u64> = txn.all()?.iter().map(|(_, r)| r.id).collect();
        self.remove_unknown_snapshot_dirs(&known)?;
        for (key, rec) in txn.all()? {
            let fs_dir = self.layout.fs_dir(rec.id);
            if !fs_dir.is_dir() {
                warn!(key, dir = %fs_dir.display(), "snapshot directory is missing");
            }
        }
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
        let parent_top = if parent.is_empty() {
            None
        } else {
            let txn = self.store.read()?;
            let p = txn
                .get(&parent)?
                .ok_or_else(|| SnapshotterError::ParentNotFound(parent.clone()))?;
            Some(p.storage.lower_dir(&self.layout, p.id))
        };
        let staging = self.staging_path();
        if let Err(e) = layer::make_snapshot_dirs(&staging, kind, parent_top.as_deref()) {
            let _ = remove_tree(&staging);
            return Err(io_err("cannot create snapshot directories in", &staging)(e));
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
            };
            txn.put(&key, &rec)?;
            let dest = self.layout.snapshot_dir(id);
            fs::rename(&staging, &dest).map_err(io_err("cannot move snapshot to", &dest))?;
            placed = Some(dest);
            txn.commit()?;
            info!(key, id, ?kind, parent, "created snapshot");
            Ok(layer::mounts(
                &self.layout,
                id,
                kind,
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
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<()> {
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
        // Cleanup also remove, so a failure is logged, not returned.
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
        let dir = match &rec.storage {
            LayerStorage::Directory => self.layout.fs_dir(rec.id),
        };
        let u = usage::disk_usage(&dir).map_err(io_err("cannot measure", &dir))?;
        Ok(Usage {
            size: u.size,
            inodes: u.inodes,
        })
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
        let s = HyperboxSnapshotter::open(&root).unwrap();
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
        let s = HyperboxSnapshotter::open(&root).unwrap();
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
}

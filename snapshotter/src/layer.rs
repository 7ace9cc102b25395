//! Where a snapshot's files live, and the mounts containerd gets for them.
//!
//! ```text
//! ROOT/                  0700
//!   metadata.redb        the records (store.rs)
//!   snapshots/ID/fs      the snapshot's files: an active snapshot's upper dir, a layer's tree
//!   snapshots/ID/work    overlayfs work dir of an active snapshot with a parent
//!   staging/PID-N/       a snapshot being prepared, renamed to snapshots/ID in its transaction
//!   trash/ID/            a removed snapshot being deleted
//! ```
//!
//! Directories are named by numeric ids the store allocates, never by keys or labels, so
//! nothing a client sends becomes a path.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use containerd_snapshots::api::types::Mount;
use serde::{Deserialize, Serialize};

use crate::kind::SnapshotKind;

/// How a snapshot's files are stored. Mounts are computed from it, so a committed layer can
/// switch to an EROFS image without its children noticing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum LayerStorage {
    /// A plain directory tree, `snapshots/ID/fs`.
    Directory,
    /// An EROFS image, `snapshots/ID/layer.erofs`, its file data in the chunk store under
    /// `erofs/` as layer `ID`, mounted read-only at `snapshots/ID/erofs`. The plain `fs` dir
    /// stays until no active snapshot or view made before `converted_ns` is left (their
    /// mounts name it as a lower dir).
    Erofs {
        /// When the record switched (nanoseconds since the Unix epoch).
        converted_ns: u64,
        /// Bytes of the chunks this layer stored first (its share of the packs).
        first_stored_bytes: u64,
        /// When the layer's merged image (`snapshots/ID/merged.erofs`, mounted at
        /// `snapshots/ID/merged`: this layer and all below it flattened into one EROFS
        /// tree) was switched on. Snapshots made on this layer since then have it as their
        /// only lower dir, whatever the image's depth.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        merged_ns: Option<u64>,
    },
}

impl LayerStorage {
    /// The directory overlayfs reads this layer from, when it is a lower layer of a
    /// snapshot created at `created_ns`: snapshots made before the layer switched to EROFS
    /// keep the plain directory their earlier mounts name.
    pub fn lower_dir(&self, layout: &Layout, id: u64, created_ns: u64) -> PathBuf {
        match self {
            LayerStorage::Directory => layout.fs_dir(id),
            LayerStorage::Erofs { converted_ns, .. } if created_ns < *converted_ns => {
                layout.fs_dir(id)
            }
            LayerStorage::Erofs { .. } => layout.erofs_dir(id),
        }
    }

    /// Whether the layer is served from its EROFS image.
    pub fn is_erofs(&self) -> bool {
        matches!(self, LayerStorage::Erofs { .. })
    }

    /// When the layer's merged image was switched on, if it has one.
    pub fn merged_ns(&self) -> Option<u64> {
        match self {
            LayerStorage::Erofs { merged_ns, .. } => *merged_ns,
            LayerStorage::Directory => None,
        }
    }
}

/// The directory layout under the root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The metadata database.
    pub fn db_path(&self) -> PathBuf {
        self.root.join("metadata.redb")
    }

    /// Parent of every snapshot directory.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Snapshots being prepared.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Snapshots being deleted.
    pub fn trash_dir(&self) -> PathBuf {
        self.root.join("trash")
    }

    /// The directory of snapshot `id`.
    pub fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    /// The files of snapshot `id`.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// The mount point of committed layer `id`'s EROFS image.
    pub fn erofs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("erofs")
    }

    /// The EROFS image of committed layer `id`.
    pub fn image_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("layer.erofs")
    }

    /// The merged image of committed layer `id`: the layer and all below it, flattened.
    pub fn merged_image_path(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("merged.erofs")
    }

    /// Where the merged image of layer `id` is mounted.
    pub fn merged_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("merged")
    }

    /// The host-wide chunk store.
    pub fn chunk_store_dir(&self) -> PathBuf {
        self.root.join("erofs")
    }

    /// The overlayfs work dir of snapshot `id`.
    pub fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Creates the root and its fixed subdirectories, mode 0700.
    pub fn create(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.snapshots_dir(),
            self.staging_dir(),
            self.trash_dir(),
            self.chunk_store_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }
}

/// Makes the directories of a new snapshot in `dir` (under staging): `fs` with mode 0755,
/// owned like the parent's top layer (as containerd's overlayfs snapshotter does, for
/// user-namespaced images), and `work` for an active snapshot with a parent.
pub fn make_snapshot_dirs(
    dir: &Path,
    kind: SnapshotKind,
    parent_top: Option<&Path>,
) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(dir)?;
    let fs_dir = dir.join("fs");
    fs::DirBuilder::new().mode(0o755).create(&fs_dir)?;
    fs::set_permissions(&fs_dir, fs::Permissions::from_mode(0o755))?;
    if let Some(top) = parent_top {
        let meta = fs::metadata(top)?;
        std::os::unix::fs::lchown(&fs_dir, Some(meta.uid()), Some(meta.gid()))?;
        if kind == SnapshotKind::Active {
            fs::DirBuilder::new().mode(0o711).create(dir.join("work"))?;
        }
    }
    Ok(())
}

/// Options shared by every overlay mount this host makes.
#[derive(Debug, Clone, Copy, Default)]
pub struct OverlayOptions {
    /// Add `index=off` (the kernel has the `index` feature; containerd does the same so that
    /// lower dirs can be shared by several mounts).
    pub index_off: bool,
}

impl OverlayOptions {
    /// Probes the running kernel.
    pub fn probe() -> OverlayOptions {
        OverlayOptions {
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
        }
    }
}

fn bind(source: &Path, read_only: bool) -> Mount {
    Mount {
        r#type: "bind".to_string(),
        source: source.to_string_lossy().into_owned(),
        options: vec![
            if read_only { "ro" } else { "rw" }.to_string(),
            "rbind".to_string(),
        ],
        ..Default::default()
    }
}

/// The mounts of snapshot `id` of `kind`, created at `created_ns`, whose ancestors are
/// `parents` (nearest first):
///
/// - active, no parent: a read-write bind mount of its `fs`;
/// - active with parents: overlayfs, `upperdir` its `fs`, `lowerdir` the parents' dirs, or
///   the nearest parent's merged image alone once it has one (for snapshots made since);
/// - view, no parent: a read-only bind mount of its (empty) `fs`;
/// - view of one layer: a read-only bind mount of that layer;
/// - view of several: overlayfs with only `lowerdir`, which the kernel mounts read-only.
pub fn mounts(
    layout: &Layout,
    id: u64,
    kind: SnapshotKind,
    created_ns: u64,
    parents: &[(u64, LayerStorage)],
    overlay: OverlayOptions,
) -> Vec<Mount> {
    let lowers: Vec<PathBuf> = match parents.first() {
        Some((pid, storage)) if storage.merged_ns().is_some_and(|t| created_ns >= t) => {
            vec![layout.merged_dir(*pid)]
        }
        _ => parents
            .iter()
            .map(|(pid, storage)| storage.lower_dir(layout, *pid, created_ns))
            .collect(),
    };
    match (kind, lowers.as_slice()) {
        (SnapshotKind::Active, []) => vec![bind(&layout.fs_dir(id), false)],
        (SnapshotKind::View | SnapshotKind::Committed, []) => {
            vec![bind(&layout.fs_dir(id), true)]
        }
        (SnapshotKind::View | SnapshotKind::Committed, [one]) => vec![bind(one, true)],
        (kind, lowers) => {
            let mut options = Vec::new();
            if overlay.index_off {
                options.push("index=off".to_string());
            }
            if kind == SnapshotKind::Active {
                options.push(format!("workdir={}", layout.work_dir(id).display()));
                options.push(format!("upperdir={}", layout.fs_dir(id).display()));
            }
            let joined: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
            options.push(format!("lowerdir={}", joined.join(":")));
            vec![Mount {
                r#type: "overlay".to_string(),
                source: "overlay".to_string(),
                options,
                ..Default::default()
            }]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new("/r")
    }

    #[test]
    fn an_active_snapshot_without_parent_is_a_writable_bind() {
        let m = mounts(
            &layout(),
            7,
            SnapshotKind::Active,
            0,
            &[],
            Default::default(),
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "bind");
        assert_eq!(m[0].source, "/r/snapshots/7/fs");
        assert_eq!(m[0].options, ["rw", "rbind"]);
    }

    #[test]
    fn an_active_snapshot_is_an_overlay_over_its_parents_nearest_first() {
        let parents = [(3, LayerStorage::Directory), (1, LayerStorage::Directory)];
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::Active,
            0,
            &parents,
            OverlayOptions { index_off: true },
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].r#type, "overlay");
        assert_eq!(
            m[0].options,
            [
                "index=off",
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/3/fs:/r/snapshots/1/fs",
            ]
        );
    }

    #[test]
    fn views_are_read_only() {
        let one = [(3, LayerStorage::Directory)];
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            0,
            &one,
            Default::default(),
        );
        assert_eq!(
            (m[0].r#type.as_str(), m[0].source.as_str()),
            ("bind", "/r/snapshots/3/fs")
        );
        assert_eq!(m[0].options, ["ro", "rbind"]);

        let two = [(3, LayerStorage::Directory), (1, LayerStorage::Directory)];
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            0,
            &two,
            Default::default(),
        );
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/3/fs:/r/snapshots/1/fs"]
        );
        assert!(!m[0].options.iter().any(|o| o.starts_with("upperdir")));

        let m = mounts(&layout(), 9, SnapshotKind::View, 0, &[], Default::default());
        assert_eq!(m[0].options, ["ro", "rbind"]);
    }

    #[test]
    fn converted_layers_are_read_from_their_erofs_mount_by_newer_snapshots() {
        let erofs = LayerStorage::Erofs {
            converted_ns: 100,
            first_stored_bytes: 0,
            merged_ns: None,
        };
        let parents = [(3, erofs), (1, LayerStorage::Directory)];
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            200,
            &parents,
            Default::default(),
        );
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/3/erofs:/r/snapshots/1/fs"]
        );
        // Made before the switch: keeps the plain dir its earlier mounts named.
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            50,
            &parents,
            Default::default(),
        );
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/3/fs:/r/snapshots/1/fs"]
        );
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            200,
            &parents[..1],
            Default::default(),
        );
        assert_eq!(m[0].source, "/r/snapshots/3/erofs");
    }

    #[test]
    fn a_merged_parent_is_the_only_lower_dir_of_snapshots_made_since() {
        let merged = LayerStorage::Erofs {
            converted_ns: 100,
            first_stored_bytes: 0,
            merged_ns: Some(300),
        };
        let erofs = LayerStorage::Erofs {
            converted_ns: 100,
            first_stored_bytes: 0,
            merged_ns: None,
        };
        let parents = [(5, merged), (3, erofs.clone()), (1, erofs)];
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::Active,
            400,
            &parents,
            Default::default(),
        );
        assert_eq!(
            m[0].options,
            [
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/5/merged",
            ]
        );
        let v = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            400,
            &parents,
            Default::default(),
        );
        assert_eq!(
            (v[0].r#type.as_str(), v[0].source.as_str()),
            ("bind", "/r/snapshots/5/merged")
        );
        // Made before the merged image: the layers' own mounts, as its earlier mounts name.
        let m = mounts(
            &layout(),
            9,
            SnapshotKind::View,
            200,
            &parents,
            Default::default(),
        );
        assert_eq!(
            m[0].options,
            ["lowerdir=/r/snapshots/5/erofs:/r/snapshots/3/erofs:/r/snapshots/1/erofs"]
        );
    }
}

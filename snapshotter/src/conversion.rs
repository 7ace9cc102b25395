//! Committed layers become EROFS images over the host-wide chunk store, after Commit returns.
//!
//! ```text
//! ROOT/erofs/            the chunk store (hyperbox-erofs): lock, index.redb, packs p0..p3
//! ROOT/snapshots/ID/layer.erofs   the layer's metadata image (its chunk-store layer is "ID")
//! ROOT/snapshots/ID/erofs         where the image is mounted, read-only, for as long as the
//!                                 layer exists (a stable path: lower dirs name it)
//! ROOT/snapshots/ID/fs            the plain tree, removed once no mount made before the
//!                                 switch can still name it
//! ```
//!
//! Worker threads (`conversion_workers`) convert layers, one thread per layer at a time
//! (a per-layer lock, also held by Remove): the image and its chunks
//! ([`hyperbox_erofs::commit_layer`], crash-safe on its own), the kernel mount, then one
//! transaction switching the record to [`LayerStorage::Erofs`]. Until that transaction commits
//! the layer is served from `fs`, so a `kill -9` anywhere leaves either the plain layer
//! (start-up rolls the half-done conversion back: unmounts, drops the store's layer, removes
//! the image, and converts again) or the converted one (start-up re-mounts it if the kernel
//! mount is gone).
//!
//! A try is counted in the record before it starts. Any failure, or three tries each cut short
//! by the process dying, sets the layer aside (the reason in its record, its labels and
//! `hyperbox-snapshotter status`): it stays a plain directory and is never tried again.
//!
//! Plain dirs: an overlay mounted before the switch names `fs` as a lower dir (a running
//! container's root, an unpack's view). Such a mount belongs to an active snapshot or view
//! created before the switch whose ancestors hold the layer; while one exists the `fs` dir
//! stays, and its Mounts keep naming `fs`. Once none is left (checked after a conversion,
//! after every Remove of an active snapshot or view, in Cleanup and at start-up), `fs` moves
//! to `trash/` and is deleted, so disk use converges to the image plus its chunks. A mount the
//! records do not know of (an overlay whose upper dir is a layer committed while mounted, a
//! bind mount) keeps `fs` too, found in `/proc/self/mountinfo`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Weak};
use std::time::Instant;

use hyperbox_erofs::{
    commit_layer, commit_layer_from_tar, mount_image, write_merged_image, ImageOptions, LayerReport,
};
use nix::mount::{umount2, MntFlags};
use tracing::{error, info, warn};

use crate::layer::LayerStorage;
use crate::service::{remove_tree, Inner, Job, SnapshotterError};
use crate::store::{
    self, ConversionReport, MergeReport, SnapshotKind, SnapshotRecord, SnapshotTable,
};

/// A layer whose conversion was begun this many times without ending (the snapshotter
/// died during each try) is set aside instead of being tried again.
pub(crate) const MAX_INTERRUPTED: u32 = 3;

/// Resets this process's peak resident memory (`VmHWM`), so that the next reading is the
/// peak since now.
fn reset_peak_rss() {
    if let Err(e) = fs::write("/proc/self/clear_refs", "5") {
        warn!("cannot reset the peak RSS: {e}");
    }
}

/// This process's peak resident memory (`VmHWM`) in bytes; 0 if unknown.
fn peak_rss_bytes() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// The longest a conversion waits for unpacks to finish; an unpack snapshot left behind by
/// a crashed client must not stop conversions for good.
const UNPACK_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long no unpack must run before a merge starts: between two layers of one image the
/// unpacker has committed one and not yet prepared the next, and the layer just committed
/// is not the image's top.
const MERGE_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

type Result<T, E = SnapshotterError> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SnapshotterError {
    let path = path.to_path_buf();
    move |source| SnapshotterError::Io { what, path, source }
}

/// Starts `workers` threads (at least one) that run [`Job`]s from one queue; they end when
/// the snapshotter is dropped. Different layers convert in parallel (the chunk store gives
/// each writer a pack of its own); one layer is worked on by one thread at a time
/// ([`crate::service::LayerLocks`]).
pub(crate) fn spawn_workers(
    inner: Weak<Inner>,
    jobs: mpsc::Receiver<Job>,
    workers: usize,
) -> io::Result<()> {
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    for n in 0..workers.max(1) {
        let inner = inner.clone();
        let jobs = jobs.clone();
        std::thread::Builder::new()
            .name(format!("erofs-convert-{n}"))
            .spawn(move || {
                let mut stale_unpacks = BTreeSet::new();
                loop {
                    let job = {
                        let rx = jobs.lock().unwrap_or_else(|p| p.into_inner());
                        rx.recv()
                    };
                    let Ok(job) = job else { break };
                    let Some(inner) = inner.upgrade() else { break };
                    match job {
                        Job::Convert(id) => {
                            inner.wait_for_unpacks(&mut stale_unpacks);
                            if let Err(e) = inner.convert(id) {
                                error!(id, "conversion to erofs: {e}");
                            }
                        }
                        Job::Merge { id, on_use } => {
                            // Most are not wanted (already merged, queued once per
                            // container): known without waiting.
                            if !inner.merge_wanted(id, on_use) {
                                continue;
                            }
                            // An unpack commits a layer and only then prepares the next:
                            // one quiet moment is not the end of an image's unpack.
                            loop {
                                inner.wait_for_unpacks(&mut stale_unpacks);
                                std::thread::sleep(MERGE_SETTLE);
                                if inner.unpacks().is_ok_and(|u| u.is_subset(&stale_unpacks)) {
                                    break;
                                }
                            }
                            if let Err(e) = inner.merge(id, on_use) {
                                error!(id, "merged erofs image: {e}");
                            }
                        }
                        Job::Gc => match inner.chunks.gc() {
                            Ok(gc) if gc.chunks_reclaimed > 0 => {
                                info!(?gc, "chunk store garbage collected")
                            }
                            Ok(_) => {}
                            Err(e) => warn!("chunk store garbage collection failed: {e}"),
                        },
                    }
                }
            })?;
    }
    Ok(())
}

/// The mount points of this mount namespace (`/proc/self/mountinfo`, field 5, unescaped).
pub(crate) fn mount_points() -> io::Result<BTreeSet<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect())
}

/// The fields of one `/proc/self/mountinfo` line the release check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    dev: String,
    /// The mount's root within its filesystem (a bind mount of a directory names it).
    root: PathBuf,
    point: PathBuf,
    fstype: String,
    super_options: String,
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let f: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: PathBuf::from(unescape_mountinfo(f.get(3)?)),
                point: PathBuf::from(unescape_mountinfo(f.get(4)?)),
                fstype: t.first()?.to_string(),
                super_options: unescape_mountinfo(t.get(2).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// Whether a mount in `table` still uses `dir` or something inside it: an overlay naming it
/// as a lower, upper or work dir, or a bind mount of it or of something in it.
fn used_by_mounts(dir: &Path, table: &[MountEntry]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let overlay_uses = table.iter().filter(|m| m.fstype == "overlay").any(|m| {
        m.super_options
            .split(',')
            .filter_map(|o| o.split_once('='))
            .filter(|(k, _)| {
                matches!(
                    *k,
                    "lowerdir" | "upperdir" | "workdir" | "datadir+" | "lowerdir+"
                )
            })
            .flat_map(|(_, v)| v.split(':'))
            .any(|p| Path::new(p).starts_with(dir))
    });
    if overlay_uses {
        return true;
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    let dev = format!("{}:{}", libc::major(meta.dev()), libc::minor(meta.dev()));
    // The mount `dir` lies in, and `dir`'s path within that filesystem.
    let Some(home) = table
        .iter()
        .filter(|m| m.dev == dev && dir.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())
    else {
        return false;
    };
    let Ok(inside) = dir.strip_prefix(&home.point) else {
        return false;
    };
    let rel = home.root.join(inside);
    table
        .iter()
        .any(|m| m.dev == dev && m.root.starts_with(&rel))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes `image`, its `.tmp` (a write cut short) and the (unmounted) mount point `mount`,
/// whichever exist.
fn remove_image_files(image: &Path, mount: &Path) -> Result<()> {
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

/// Unmounts `dir` if it is a mount point; lazily when it is busy.
fn unmount_if_mounted(dir: &Path) -> Result<()> {
    let mounted =
        mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
    // Stacked mounts (a re-mount over a surviving one) come off one by one.
    if mounted.contains(dir) {
        while umount2(dir, MntFlags::empty()).is_ok() {}
        let still =
            mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
        if still.contains(dir) {
            warn!(dir = %dir.display(), "erofs mount is busy: detaching it lazily");
            while umount2(dir, MntFlags::MNT_DETACH).is_ok() {}
        }
    }
    Ok(())
}

impl Inner {
    /// Keys of the active snapshots containerd's unpacker is writing
    /// (`NS/N/extract-NANOS-RANDOM CHAINID`, containerd 1.6 and 1.7).
    pub(crate) fn unpacks(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .store
            .read()?
            .all()?
            .into_iter()
            .filter(|(key, r)| {
                r.kind == SnapshotKind::Active
                    && key
                        .rsplit('/')
                        .next()
                        .is_some_and(|k| k.starts_with("extract-"))
            })
            .map(|(key, _)| key)
            .collect())
    }

    /// Waits until no unpack is in progress, so that conversions take no CPU or disk from
    /// a pull: a layer committed by an unpack is converted once the whole image is
    /// unpacked (it is served from its plain directory meanwhile, so nothing but the
    /// conversion waits). An unpack snapshot still there after [`UNPACK_WAIT`] (left by a
    /// client that died) goes into `stale` and is not waited for again.
    pub(crate) fn wait_for_unpacks(&self, stale: &mut BTreeSet<String>) {
        let deadline = std::time::Instant::now() + UNPACK_WAIT;
        loop {
            let running: BTreeSet<String> = match self.unpacks() {
                Ok(keys) => keys.difference(stale).cloned().collect(),
                Err(e) => {
                    warn!("cannot tell whether an unpack is running: {e}");
                    return;
                }
            };
            if running.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                warn!(
                    ?running,
                    "unpack snapshots unchanged for {UNPACK_WAIT:?}; converting anyway"
                );
                stale.extend(running);
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn record_of(&self, id: u64) -> Result<Option<(String, SnapshotRecord)>> {
        Ok(self
            .store
            .read()?
            .all()?
            .into_iter()
            .find(|(_, r)| r.id == id))
    }

    /// Queues every committed layer still stored as a plain directory (`convert = true`).
    pub(crate) fn queue_pending_conversions(&self) -> Result<()> {
        if !self.options.convert {
            return Ok(());
        }
        for (_, rec) in self.store.read()?.all()? {
            let set_aside = rec
                .conversion
                .as_ref()
                .is_some_and(|c| c.set_aside.is_some());
            if rec.kind == SnapshotKind::Committed && !rec.storage.is_erofs() && !set_aside {
                self.queue(Job::Convert(rec.id));
            }
        }
        Ok(())
    }

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

    fn mount_merged(&self, id: u64) -> Result<()> {
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

    fn mount_layer(&self, id: u64) -> Result<()> {
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

    /// Changes the conversion record of layer `id` (under `key`) in one transaction; false
    /// when the layer is gone.
    fn update_conversion(
        &self,
        key: &str,
        id: u64,
        change: impl FnOnce(&mut SnapshotRecord),
    ) -> Result<bool> {
        let mut txn = self.store.write()?;
        let Some(mut rec) = txn.get(key)?.filter(|r| r.id == id) else {
            return Ok(false);
        };
        change(&mut rec);
        txn.put(key, &rec)?;
        txn.commit()?;
        Ok(true)
    }

    /// Records why layer `id` is set aside: it stays a plain directory and is never tried
    /// again.
    fn set_aside(&self, key: &str, id: u64, reason: String) -> Result<()> {
        error!(key, id, %reason, "conversion to erofs failed: the layer is set aside and stays a plain directory (`hyperbox-snapshotter status` lists it)");
        self.update_conversion(key, id, |rec| {
            rec.conversion
                .get_or_insert_with(Default::default)
                .set_aside = Some(reason);
        })?;
        Ok(())
    }

    /// Converts committed layer `id`, if it still is a plain one and has not been set aside.
    /// A failure of any kind sets the layer aside, and so does a layer whose earlier tries
    /// were all cut short by the snapshotter dying ([`MAX_INTERRUPTED`] of them).
    pub(crate) fn convert(&self, id: u64) -> Result<()> {
        let _guard = self.layer_locks.lock(id);
        let Some((key, rec)) = self.record_of(id)? else {
            return Ok(());
        };
        if rec.kind != SnapshotKind::Committed || rec.storage.is_erofs() {
            return Ok(());
        }
        let tries = rec.conversion.unwrap_or_default();
        if tries.set_aside.is_some() {
            return Ok(());
        }
        if tries.attempts >= MAX_INTERRUPTED {
            return self.set_aside(
                &key,
                id,
                format!(
                    "{} tries were cut short: the snapshotter died during each",
                    tries.attempts
                ),
            );
        }
        // Counted before it starts: a try that kills the process still counts.
        if !self.update_conversion(&key, id, |rec| {
            rec.conversion.get_or_insert_with(Default::default).attempts += 1;
        })? {
            return Ok(());
        }
        reset_peak_rss();
        let started = Instant::now();
        match self.convert_once(&key, id, started) {
            Ok(()) => {
                // An image's top layer gets its merged image once it and every layer below
                // it are converted: this one, or a top above it waiting for it (layers
                // convert in parallel, so not always in order).
                self.queue_pending_merges()?;
                self.release_plain_dirs()
            }
            Err(e) => {
                if let Err(undo) = self.drop_erofs_layer(id) {
                    warn!(id, "cannot undo the failed conversion: {undo}");
                }
                self.set_aside(&key, id, e.to_string())
            }
        }
    }

    fn convert_once(&self, key: &str, id: u64, started: Instant) -> Result<()> {
        // A try cut short earlier may have left pieces.
        self.drop_erofs_layer(id)?;
        let fs_dir = self.layout.fs_dir(id);
        let image = self.layout.image_path(id);
        let options = self.image_options();
        let report = commit_layer(&self.chunks, &id.to_string(), &fs_dir, &image, &options)
            .map_err(|source| SnapshotterError::Layer { id, source })?;
        let Some(cost) = self.switch_to_image(key, id, &report, started, false)? else {
            // Removed meanwhile (cannot happen while the lock is held; kept for safety).
            self.drop_erofs_layer(id)?;
            return Ok(());
        };
        info!(
            key,
            id,
            millis = cost.millis,
            peak_rss_mib = cost.peak_rss_bytes >> 20,
            image = ?report.image,
            chunks = ?report.chunks,
            "layer converted to erofs"
        );
        Ok(())
    }

    /// The limits of one layer's image, from the config.
    fn image_options(&self) -> ImageOptions {
        let limits = self.options.limits;
        ImageOptions::default()
            .with_max_depth(limits.max_depth)
            .with_max_inodes(limits.max_inodes)
            .with_max_image_bytes(limits.max_image_bytes)
            .with_time_limit(limits.timeout)
    }

    /// Mounts layer `id`'s new image, then switches its record (under `key`) to it in one
    /// transaction, with what it cost since `started`; `None` when the record is gone.
    fn switch_to_image(
        &self,
        key: &str,
        id: u64,
        report: &LayerReport,
        started: Instant,
        from_archive: bool,
    ) -> Result<Option<ConversionReport>> {
        self.mount_layer(id)?;
        let cost = ConversionReport {
            millis: started.elapsed().as_millis() as u64,
            peak_rss_bytes: peak_rss_bytes(),
            image_bytes: report.image.image_bytes,
            inodes: report.image.inodes,
            chunks: report.image.chunks,
            new_chunks: report.chunks.new_chunks,
        };
        let switched = self.update_conversion(key, id, |rec| {
            rec.storage = LayerStorage::Erofs {
                converted_ns: store::now_ns(),
                first_stored_bytes: report.chunks.new_bytes,
                merged_ns: None,
            };
            let c = rec.conversion.get_or_insert_with(Default::default);
            c.report = Some(cost.clone());
            c.from_archive = from_archive;
        })?;
        Ok(switched.then_some(cost))
    }

    /// The differ's unpack of a layer archive into active snapshot `id`: the layer's EROFS
    /// image is written straight from `tar` (uncompressed), mounted, and the record switched
    /// to it in one transaction, so that Commit has nothing left to convert. Only an unpack's
    /// snapshot (`extract-` key) still empty is taken. On any error nothing of it is left:
    /// the snapshot is as it was, for another differ to unpack into.
    pub(crate) fn unpack_archive(&self, id: u64, tar: &mut dyn Read, shown: &Path) -> Result<()> {
        if !self.options.convert {
            // Layers stay plain directories: the unpack is containerd's to do.
            return Err(SnapshotterError::NotActive(format!(
                "snapshot id {id}: convert = false keeps layers as directories"
            )));
        }
        let _guard = self.layer_locks.lock(id);
        let Some((key, rec)) = self.record_of(id)? else {
            return Err(SnapshotterError::NotFound(format!("snapshot id {id}")));
        };
        let unpack = key
            .rsplit('/')
            .next()
            .is_some_and(|k| k.starts_with("extract-"));
        if rec.kind != SnapshotKind::Active || rec.storage.is_erofs() || !unpack {
            return Err(SnapshotterError::NotActive(key));
        }
        let fs_dir = self.layout.fs_dir(id);
        let empty = fs::read_dir(&fs_dir)
            .map_err(io_err("cannot read", &fs_dir))?
            .next()
            .is_none();
        if !empty {
            return Err(SnapshotterError::NotActive(format!(
                "{key}: its directory is not empty"
            )));
        }
        reset_peak_rss();
        let started = Instant::now();
        // A try cut short earlier may have left pieces.
        self.drop_erofs_layer(id)?;
        let result = self.unpack_once(&key, id, tar, shown, started);
        if result.is_err() {
            if let Err(undo) = self.drop_erofs_layer(id) {
                warn!(id, "cannot undo the failed unpack: {undo}");
            }
        }
        result
    }

    fn unpack_once(
        &self,
        key: &str,
        id: u64,
        tar: &mut dyn Read,
        shown: &Path,
        started: Instant,
    ) -> Result<()> {
        let image = self.layout.image_path(id);
        let options = self.image_options();
        let report =
            commit_layer_from_tar(&self.chunks, &id.to_string(), tar, shown, &image, &options)
                .map_err(|source| SnapshotterError::Layer { id, source })?;
        // What follows the end-of-archive marker is read too (the caller's digest covers it).
        io::copy(tar, &mut io::sink()).map_err(io_err("cannot read the end of", shown))?;
        let Some(cost) = self.switch_to_image(key, id, &report, started, true)? else {
            return Err(SnapshotterError::NotFound(key.to_string()));
        };
        info!(
            key,
            id,
            millis = cost.millis,
            image = ?report.image,
            chunks = ?report.chunks,
            "layer unpacked from its archive into an erofs image"
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_that_use_a_directory_are_found() {
        let text = "\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
90 22 0:50 / /run/c1/rootfs rw - overlay overlay rw,lowerdir=/r/snapshots/3/erofs:/r/snapshots/2/fs,upperdir=/r/snapshots/7/fs,workdir=/r/snapshots/7/work,index=off
91 22 8:1 /r/snapshots/9/fs /mnt/view ro - ext4 /dev/vda rw
92 22 8:1 /r/snapshots/10 /mnt/above rw - ext4 /dev/vda rw
";
        let table = parse_mountinfo(text);
        assert_eq!(table.len(), 4);
        assert_eq!(table[2].root, Path::new("/r/snapshots/9/fs"));
        assert!(
            used_by_mounts(Path::new("/r/snapshots/7/fs"), &table),
            "upper dir"
        );
        assert!(
            used_by_mounts(Path::new("/r/snapshots/2/fs"), &table),
            "lower dir"
        );
        assert!(!used_by_mounts(Path::new("/r/snapshots/3/fs"), &table));
        assert!(
            !used_by_mounts(Path::new("/r/snapshots/77/fs"), &table),
            "77 is not 7"
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }
}

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
//!
//! - `merge`: merged images (an image's top layer and all below it in one EROFS tree);
//! - `images`: a layer's image files and mounts: made, dropped, re-mounted at start-up, and
//!   the plain dirs released;
//! - `mounts`: the kernel's mount table as the above need it.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Instant;

use hyperbox_erofs::{commit_layer, commit_layer_from_tar, ChunkStore, ImageOptions, LayerReport};
use tracing::{error, info, warn};

use crate::error::{io_err, Result, SnapshotterError};
use crate::layer::{LayerStorage, Layout};
use crate::options::LayerOptions;
use crate::store::{
    self, ConversionReport, MetaStore, SnapshotKind, SnapshotRecord, SnapshotTable,
};

mod images;
mod merge;
pub(crate) mod mounts;

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

/// The layers being converted, merged or removed: one of these at a time per layer.
#[derive(Debug, Default)]
struct LayerLocks {
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

/// Work for the background worker.
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

/// Converts and merges committed layers in the background, with worker threads started by
/// [`spawn_workers`]: owns the chunk store, the per-layer locks and the queue of [`Job`]s.
#[derive(Debug)]
pub(crate) struct Converter {
    layout: Layout,
    store: Arc<MetaStore>,
    options: LayerOptions,
    chunks: ChunkStore,
    /// Held per layer while it is converted or merged and while it is removed, so that no
    /// two of these work on one layer at once (different layers convert in parallel).
    layer_locks: LayerLocks,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Converter {
    /// A converter of the layers under `layout` recorded in `store`, their chunks in
    /// `chunks`, and the receiving end of its job queue for [`spawn_workers`].
    pub(crate) fn new(
        layout: Layout,
        store: Arc<MetaStore>,
        options: LayerOptions,
        chunks: ChunkStore,
    ) -> (Converter, mpsc::Receiver<Job>) {
        let (tx, rx) = mpsc::channel();
        let converter = Converter {
            layout,
            store,
            options,
            chunks,
            layer_locks: LayerLocks::default(),
            jobs: Mutex::new(tx),
        };
        (converter, rx)
    }

    /// The chunk store the layers' file data lives in.
    pub(crate) fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Waits until nothing converts, merges or removes layer `id`, then holds it until the
    /// guard is dropped.
    pub(crate) fn lock_layer(&self, id: u64) -> LayerLock<'_> {
        self.layer_locks.lock(id)
    }

    /// Hands `job` to the background worker.
    pub(crate) fn queue(&self, job: Job) {
        let tx = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(job).is_err() {
            warn!(?job, "the conversion worker is gone");
        }
    }
}

/// Starts `workers` threads (at least one) that run [`Job`]s from one queue; they end when
/// the snapshotter is dropped. Different layers convert in parallel (the chunk store gives
/// each writer a pack of its own); one layer is worked on by one thread at a time
/// ([`LayerLocks`]).
pub(crate) fn spawn_workers(
    converter: Weak<Converter>,
    jobs: mpsc::Receiver<Job>,
    workers: usize,
) -> io::Result<()> {
    let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
    for n in 0..workers.max(1) {
        let converter = converter.clone();
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
                    let Some(converter) = converter.upgrade() else {
                        break;
                    };
                    match job {
                        Job::Convert(id) => {
                            converter.wait_for_unpacks(&mut stale_unpacks);
                            if let Err(e) = converter.convert(id) {
                                error!(id, "conversion to erofs: {e}");
                            }
                        }
                        Job::Merge { id, on_use } => {
                            // Most are not wanted (already merged, queued once per
                            // container): known without waiting.
                            if !converter.merge_wanted(id, on_use) {
                                continue;
                            }
                            // An unpack commits a layer and only then prepares the next:
                            // one quiet moment is not the end of an image's unpack.
                            loop {
                                converter.wait_for_unpacks(&mut stale_unpacks);
                                std::thread::sleep(MERGE_SETTLE);
                                if converter
                                    .unpacks()
                                    .is_ok_and(|u| u.is_subset(&stale_unpacks))
                                {
                                    break;
                                }
                            }
                            if let Err(e) = converter.merge(id, on_use) {
                                error!(id, "merged erofs image: {e}");
                            }
                        }
                        Job::Gc => match converter.chunks.gc() {
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

impl Converter {
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
}

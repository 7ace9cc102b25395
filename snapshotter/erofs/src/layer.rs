//! Committing a layer: its EROFS image written beside its final path, its chunks made
//! durable and recorded, then the image renamed into place.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::from_tar::write_image_from_tar;
use crate::store::{ChunkStore, LayerStats, LayerWriter, StoreError};
use crate::writer::{write_image, ImageError, ImageOptions, ImageStats};

/// Errors of [`commit_layer`].
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What [`commit_layer`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerReport {
    pub image: ImageStats,
    pub chunks: LayerStats,
}

/// Writes the EROFS image of the tree at `src` to `image_path`, its file data into `store`
/// under layer `id`.
///
/// Order, for crash safety: image to `<image_path>.tmp` and fsync; chunks fsync and index
/// commit; rename and directory fsync. After a crash the store holds either no layer `id`
/// (and no chunk of it is referenced) or all of it; a committed layer whose image is missing
/// (a crash before the rename) must be removed with [`ChunkStore::remove_layer`] and written
/// again.
pub fn commit_layer(
    store: &ChunkStore,
    id: &str,
    src: &Path,
    image_path: &Path,
    options: &ImageOptions,
) -> Result<LayerReport, LayerError> {
    commit_with(store, id, image_path, |file, tmp, writer| {
        write_image(src, file, tmp, writer, options)
    })
}

/// [`commit_layer`] of the layer archive read from `tar` (uncompressed), with
/// [`write_image_from_tar`]: nothing of the layer is unpacked on disk. `shown` names the
/// archive in errors.
pub fn commit_layer_from_tar(
    store: &ChunkStore,
    id: &str,
    tar: &mut dyn Read,
    shown: &Path,
    image_path: &Path,
    options: &ImageOptions,
) -> Result<LayerReport, LayerError> {
    commit_with(store, id, image_path, |file, tmp, writer| {
        write_image_from_tar(tar, shown, file, tmp, writer, options)
    })
}

fn commit_with(
    store: &ChunkStore,
    id: &str,
    image_path: &Path,
    write: impl FnOnce(&File, &Path, &mut LayerWriter<'_>) -> Result<ImageStats, ImageError>,
) -> Result<LayerReport, LayerError> {
    let io = |op, path: &Path| {
        let path = path.to_path_buf();
        move |source| LayerError::Io { op, path, source }
    };
    let mut tmp = image_path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .read(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    let mut writer = store.begin_layer(id)?;
    let image = match write(&file, &tmp, &mut writer) {
        Ok(s) => s,
        Err(e) => {
            drop(writer);
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    file.sync_all().map_err(io("sync", &tmp))?;
    drop(file);
    let chunks = match writer.commit() {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    };
    std::fs::rename(&tmp, image_path).map_err(io("rename into place", image_path))?;
    if let Some(dir) = image_path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("sync directory", dir))?;
    }
    tracing::info!(layer = id, image = %image_path.display(), ?image, ?chunks, "committed layer");
    Ok(LayerReport { image, chunks })
}

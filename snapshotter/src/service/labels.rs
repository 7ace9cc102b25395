//! What clients see of a record: its kind, its labels with the ones the snapshotter
//! computes, and the field paths containerd's filters ask for.

use std::collections::BTreeMap;

use containerd_snapshots::{Info, Kind};

use crate::kind::SnapshotKind;
use crate::store::{self, SnapshotRecord};

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
pub(super) fn labels_of(rec: &SnapshotRecord) -> BTreeMap<String, String> {
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

pub(super) fn to_info(key: &str, rec: &SnapshotRecord) -> Info {
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
pub(super) fn field(key: &str, rec: &SnapshotRecord, path: &[String]) -> Option<String> {
    let nonempty = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    match path.first().map(String::as_str)? {
        "kind" => Some(rec.kind.as_str().to_string()),
        "name" => nonempty(key),
        "parent" => nonempty(&rec.parent),
        "labels" if path.len() > 1 => labels_of(rec).get(&path[1..].join(".")).cloned(),
        _ => None,
    }
}

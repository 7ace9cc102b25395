//! Snapshot records in an embedded redb database.
//!
//! redb rather than SQLite: the state is a small key-value map (snapshot key to record plus
//! one id counter), redb is pure Rust (no C library to build or audit), and each write
//! transaction commits with fsync and a copy-on-write B-tree switch, so a `kill -9` or power
//! loss at any point leaves the last committed state. It also locks its file, so two
//! snapshotters cannot share one root.
//!
//! Schema (version 1):
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `snapshots` | the snapshot's key as containerd gives it | JSON [`SnapshotRecord`] |
//! | `counters` | `next_id` | the next directory id (ids are never reused) |
//! | `counters` | `schema` | the schema version |

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub use crate::kind::SnapshotKind;
use crate::layer::LayerStorage;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";
const SCHEMA: &str = "schema";
/// The schema this build reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// Errors of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("metadata database {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("metadata database: {0}")]
    Db(Box<redb::Error>),
    #[error(
        "metadata database {path} has schema version {found}, this build knows {SCHEMA_VERSION}"
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("record of snapshot {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode the record of snapshot {key:?}: {source}")]
    Encode {
        key: String,
        source: serde_json::Error,
    },
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(Box::new(e.into()))
}

/// One snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// Names the snapshot's directory `snapshots/ID`; allocated once, never reused.
    pub id: u64,
    pub kind: SnapshotKind,
    /// The parent's key, empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the Unix epoch.
    pub created_ns: u64,
    pub updated_ns: u64,
    /// Where the files are.
    pub storage: LayerStorage,
    /// A committed layer's conversion to EROFS: tries, outcome, cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion: Option<Conversion>,
}

/// What became of a committed layer's conversion to EROFS.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversion {
    /// Tries begun. Recorded before each try starts, so a try cut short by a crash of the
    /// snapshotter counts too: a layer that keeps killing it is set aside, not retried.
    pub attempts: u32,
    /// Why the layer was set aside. It stays a plain directory, served as it is, and is not
    /// tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<String>,
    /// What the conversion that succeeded cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ConversionReport>,
    /// What the layer's merged image (this layer and all below it in one EROFS tree)
    /// cost, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeReport>,
    /// Why no merged image is made for this layer (it is served as an overlay of its
    /// layers' own images instead); not tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_set_aside: Option<String>,
    /// The image was written by the differ straight from the layer's archive, during the
    /// unpack; no directory was written and no conversion ran.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_archive: bool,
}

/// The cost of one merged image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeReport {
    /// Wall-clock time of the image, its mount and the switch.
    pub millis: u64,
    /// Layers the image flattens (this one and every one below it).
    pub layers: u32,
    /// Images read to write it: the layers' own, or the nearest merged one below and the
    /// layers above it.
    pub inputs: u32,
    /// Size of the merged image file.
    pub image_bytes: u64,
    /// Inodes in the merged tree.
    pub inodes: u64,
}

/// The cost of one conversion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversionReport {
    /// Wall-clock time of the image, chunks, mount and switch.
    pub millis: u64,
    /// The snapshotter's peak resident memory while it ran (`VmHWM`, reset before it).
    pub peak_rss_bytes: u64,
    /// Size of the EROFS image file.
    pub image_bytes: u64,
    /// Inodes in the image.
    pub inodes: u64,
    /// Chunks the layer's files hold, and how many of them were new to the store.
    pub chunks: u64,
    pub new_chunks: u64,
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A time stored by [`now_ns`].
pub fn system_time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

fn decode(key: &str, bytes: &[u8]) -> Result<SnapshotRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// The database.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
}

impl MetaStore {
    /// Opens (or creates) the database at `path`. redb repairs a database left by a crash
    /// here, rolling back to the last committed transaction.
    pub fn open(path: &Path) -> Result<MetaStore, StoreError> {
        let open_err = |source: redb::Error| StoreError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let db = hyperbox_erofs::open_or_create_redb(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            let mut counters = txn.open_table(COUNTERS).map_err(|e| open_err(e.into()))?;
            let found = counters
                .get(SCHEMA)
                .map_err(|e| open_err(e.into()))?
                .map(|g| g.value());
            match found {
                None => {
                    counters
                        .insert(SCHEMA, SCHEMA_VERSION)
                        .map_err(|e| open_err(e.into()))?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(found) => {
                    return Err(StoreError::Schema {
                        path: path.to_path_buf(),
                        found,
                    })
                }
            }
            txn.open_table(SNAPSHOTS).map_err(|e| open_err(e.into()))?;
        }
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(MetaStore { db })
    }

    /// A read-only snapshot of the state.
    pub fn read(&self) -> Result<ReadTxn, StoreError> {
        Ok(ReadTxn {
            txn: self.db.begin_read().map_err(db)?,
        })
    }

    /// A write transaction; only one exists at a time (others wait), so a check made in it
    /// still holds when it commits.
    pub fn write(&self) -> Result<WriteTxn, StoreError> {
        Ok(WriteTxn {
            txn: self.db.begin_write().map_err(db)?,
        })
    }
}

/// Reads of the snapshot table, shared by read and write transactions.
pub trait SnapshotTable {
    /// The record of `key`, if any.
    fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError>;
    /// Every record, ordered by key.
    fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError>;

    /// The chain of ancestors of `parent` (itself first), as (id, storage); empty for "".
    /// Bounded, so that a corrupt database with a loop cannot hang a call.
    fn ancestors(&self, parent: &str) -> Result<Vec<(u64, LayerStorage)>, StoreError> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() && out.len() < 4096 {
            let Some(rec) = self.get(&next)? else { break };
            out.push((rec.id, rec.storage.clone()));
            next = rec.parent;
        }
        Ok(out)
    }
}

/// A read transaction.
pub struct ReadTxn {
    txn: redb::ReadTransaction,
}

impl std::fmt::Debug for ReadTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadTxn")
    }
}

fn table_get<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
    key: &str,
) -> Result<Option<SnapshotRecord>, StoreError> {
    match table.get(key).map_err(db)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

fn table_all<T: ReadableTable<&'static str, &'static [u8]>>(
    table: &T,
) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
    let mut out = Vec::new();
    for entry in table.iter().map_err(db)? {
        let (k, v) = entry.map_err(db)?;
        let key = k.value().to_string();
        let rec = decode(&key, v.value())?;
        out.push((key, rec));
    }
    Ok(out)
}

impl SnapshotTable for ReadTxn {
    fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        table_get(&self.txn.open_table(SNAPSHOTS).map_err(db)?, key)
    }

    fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        table_all(&self.txn.open_table(SNAPSHOTS).map_err(db)?)
    }
}

/// A write transaction: nothing of it is visible, on disk or to readers, until
/// [`WriteTxn::commit`]; dropping it aborts.
pub struct WriteTxn {
    txn: redb::WriteTransaction,
}

impl std::fmt::Debug for WriteTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteTxn")
    }
}

impl SnapshotTable for WriteTxn {
    fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        table_get(&self.txn.open_table(SNAPSHOTS).map_err(db)?, key)
    }

    fn all(&self) -> Result<Vec<(String, SnapshotRecord)>, StoreError> {
        table_all(&self.txn.open_table(SNAPSHOTS).map_err(db)?)
    }
}

impl WriteTxn {
    /// Inserts or replaces the record of `key`.
    pub fn put(&mut self, key: &str, rec: &SnapshotRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(rec).map_err(|source| StoreError::Encode {
            key: key.to_string(),
            source,
        })?;
        let mut table = self.txn.open_table(SNAPSHOTS).map_err(db)?;
        table.insert(key, bytes.as_slice()).map_err(db)?;
        Ok(())
    }

    /// Removes the record of `key`, returning whether there was one.
    pub fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let mut table = self.txn.open_table(SNAPSHOTS).map_err(db)?;
        let existed = table.remove(key).map_err(db)?.is_some();
        Ok(existed)
    }

    /// Takes the next directory id.
    pub fn allocate_id(&mut self) -> Result<u64, StoreError> {
        let mut counters = self.txn.open_table(COUNTERS).map_err(db)?;
        let id = counters.get(NEXT_ID).map_err(db)?.map_or(1, |g| g.value());
        counters.insert(NEXT_ID, id + 1).map_err(db)?;
        Ok(id)
    }

    /// Makes the changes durable (fsync) and visible.
    pub fn commit(self) -> Result<(), StoreError> {
        self.txn.commit().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, parent: &str) -> SnapshotRecord {
        SnapshotRecord {
            id,
            kind: SnapshotKind::Committed,
            parent: parent.to_string(),
            labels: BTreeMap::new(),
            created_ns: 1,
            updated_ns: 2,
            storage: LayerStorage::Directory,
            conversion: None,
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hb-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn uncommitted_changes_vanish_and_ids_are_never_reused() {
        let dir = temp_dir("txn");
        let path = dir.join("m.redb");
        {
            let store = MetaStore::open(&path).unwrap();
            let mut txn = store.write().unwrap();
            assert_eq!(txn.allocate_id().unwrap(), 1);
            txn.put("a", &record(1, "")).unwrap();
            txn.commit().unwrap();

            let mut txn = store.write().unwrap();
            assert_eq!(txn.allocate_id().unwrap(), 2);
            txn.put("b", &record(2, "a")).unwrap();
            drop(txn); // aborted
            assert!(store.read().unwrap().get("b").unwrap().is_none());
        }
        let store = MetaStore::open(&path).unwrap();
        let r = store.read().unwrap();
        assert_eq!(r.get("a").unwrap(), Some(record(1, "")));
        assert_eq!(r.all().unwrap().len(), 1);
        let mut txn = store.write().unwrap();
        assert_eq!(txn.allocate_id().unwrap(), 2);
        txn.put("b", &record(2, "a")).unwrap();
        txn.put("c", &record(3, "b")).unwrap();
        let chain: Vec<u64> = txn.ancestors("c").unwrap().iter().map(|a| a.0).collect();
        assert_eq!(chain, vec![3, 2, 1]);
        assert!(txn.delete("c").unwrap());
        assert!(!txn.delete("c").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

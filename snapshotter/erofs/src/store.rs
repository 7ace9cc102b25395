//! Host-wide content-addressed chunk store.
//!
//! File data of every layer image lives in a few append-only pack files (`p0`, `p1`, ...
//! under the store root), which the images list in their EROFS device table; a chunk is
//! addressed by the block it starts at. An index (`index.redb`, crash-safe with
//! copy-on-write commits) maps each chunk's sha256 to its location and counts how many
//! layers reference each location. Removing a layer drops its references; chunks left with
//! none become garbage, and [`ChunkStore::gc`] punches their blocks out of the packs.
//!
//! Crash safety: chunk data is written past the pack's committed end and fsynced before the
//! index transaction that records it commits; a crash before that commit leaves data past
//! the committed end, which the next writer of that pack overwrites (and `open` truncates).
//! GC punches a hole only after the transaction that unreferenced the chunk committed, and
//! forgets the garbage entry after punching, so a crash repeats an idempotent punch.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use nix::fcntl::{FallocateFlags, FlockArg};
use redb::{Database, ReadableTable, TableDefinition};
use sha2::{Digest, Sha256};

use crate::format::{align_up, DeviceSlot, BLOCK_BITS, BLOCK_SIZE, DEVT_TAG_SIZE};

/// sha256 of a chunk's bytes.
pub type ChunkDigest = [u8; 32];

/// location key: pack number in the top 16 bits, block number in the low 48.
type LocKey = u64;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PACKS: TableDefinition<u16, u64> = TableDefinition::new("packs");
/// location → chunk record (digest, length, reference count).
const CHUNKS: TableDefinition<u64, &[u8]> = TableDefinition::new("chunks");
/// digest → location of the copy new layers share.
const DIGESTS: TableDefinition<&[u8], u64> = TableDefinition::new("digests");
/// location → chunk record of chunks no layer references, not yet punched.
const GARBAGE: TableDefinition<u64, &[u8]> = TableDefinition::new("garbage");
/// layer id → its chunk locations (8 bytes each, little endian).
const LAYERS: TableDefinition<&str, &[u8]> = TableDefinition::new("layers");

const FORMAT_VERSION: u64 = 1;
const MAX_PACKS: u16 = 16;

/// Errors of the chunk store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation on the store failed.
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The index database failed.
    #[error("chunk index {path} failed: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// Another process holds the store.
    #[error("chunk store {path} is in use by another process")]
    Busy { path: PathBuf },
    /// The store was created with other settings.
    #[error("chunk store {path} was created with {what}; open it with the same settings")]
    ConfigMismatch { path: PathBuf, what: String },
    /// The configuration is out of range.
    #[error("invalid chunk store configuration: {0}")]
    InvalidConfig(String),
    /// A layer id is already committed.
    #[error("layer {id} is already in chunk store {path}")]
    LayerExists { id: String, path: PathBuf },
    /// A pack reached the largest block address a chunk index can hold.
    #[error("pack {path} is full (16 TiB)")]
    PackFull { path: PathBuf },
    /// A chunk's bytes no longer match its digest.
    #[error(
        "chunk {digest} at offset {offset} of {path} is corrupt (its data hashes to {actual})"
    )]
    CorruptChunk {
        digest: String,
        actual: String,
        path: PathBuf,
        offset: u64,
    },
    /// A pack is shorter than the chunks recorded in it.
    #[error("chunk {digest} at offset {offset} of {path} is missing: the pack is truncated to {len} bytes")]
    TruncatedPack {
        digest: String,
        path: PathBuf,
        offset: u64,
        len: u64,
    },
    /// No chunk has this digest.
    #[error("no chunk {digest} in chunk store {path}")]
    NoSuchChunk { digest: String, path: PathBuf },
    /// A chunk a layer deduplicated against was reclaimed before the layer committed.
    #[error("chunk at {offset} of {path} was reclaimed while layer {id} was written; write the layer again")]
    ChunkReclaimed {
        id: String,
        path: PathBuf,
        offset: u64,
    },
}

fn index_err<E: Into<redb::Error>>(path: &Path) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::Index {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Settings fixed when a store is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreConfig {
    pack_count: u16,
    chunk_bits: u8,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            pack_count: 4,
            chunk_bits: DEFAULT_CHUNK_BITS,
        }
    }
}

/// Default chunk size: 64 KiB (see DESIGN.md for the measurement behind it).
pub const DEFAULT_CHUNK_BITS: u8 = 16;

impl StoreConfig {
    /// Number of pack files (devices of every image), 1 to 16. Default 4: up to four layers
    /// are written at once.
    pub fn with_pack_count(mut self, packs: u16) -> Self {
        self.pack_count = packs;
        self
    }

    /// log2 of the chunk size, 12 (4 KiB) to 30 (1 GiB). Default [`DEFAULT_CHUNK_BITS`].
    pub fn with_chunk_bits(mut self, bits: u8) -> Self {
        self.chunk_bits = bits;
        self
    }
}

#[derive(Debug)]
struct Pack {
    path: PathBuf,
    file: File,
}

/// A chunk record: digest, length, references.
#[derive(Debug, Clone, Copy)]
struct Record {
    digest: ChunkDigest,
    len: u32,
    refs: u64,
}

impl Record {
    fn encode(&self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[..32].copy_from_slice(&self.digest);
        b[32..36].copy_from_slice(&self.len.to_le_bytes());
        b[36..44].copy_from_slice(&self.refs.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Self {
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[..32]);
        Self {
            digest,
            len: u32::from_le_bytes(b[32..36].try_into().unwrap_or_default()),
            refs: u64::from_le_bytes(b[36..44].try_into().unwrap_or_default()),
        }
    }
}

fn loc_key(pack: u16, offset: u64) -> LocKey {
    (u64::from(pack) << 48) | (offset >> BLOCK_BITS)
}

fn loc_split(key: LocKey) -> (u16, u64) {
    ((key >> 48) as u16, (key & ((1 << 48) - 1)) << BLOCK_BITS)
}

/// Hashes a chunk.
pub fn chunk_digest(data: &[u8]) -> ChunkDigest {
    Sha256::digest(data).into()
}

/// The host-wide chunk store. One process opens it at a time (a lock file); within that
/// process it is shared by reference (`&ChunkStore` is `Sync`).
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    index_path: PathBuf,
    db: Database,
    chunk_bits: u8,
    packs: Vec<Pack>,
    leased: Mutex<Vec<bool>>,
    lease_freed: Condvar,
    /// Locations in-flight layers deduplicated against: GC leaves them alone.
    pins: Mutex<HashMap<LocKey, u32>>,
    /// Serialises index writers (commit, remove, gc).
    index_lock: Mutex<()>,
    _lock_file: File,
}

/// What committing one layer stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Chunks written to a pack by this layer.
    pub new_chunks: u64,
    /// Bytes of those chunks.
    pub new_bytes: u64,
    /// Chunk references satisfied by chunks already stored (in the store or this layer).
    pub shared_chunks: u64,
    /// Bytes of those chunks.
    pub shared_bytes: u64,
}

/// What [`ChunkStore::gc`] reclaimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcStats {
    pub chunks_reclaimed: u64,
    pub bytes_reclaimed: u64,
    /// Garbage chunks left because a layer being written still uses them.
    pub chunks_pinned: u64,
}

/// Totals of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub layers: u64,
    pub live_chunks: u64,
    pub live_bytes: u64,
    pub garbage_chunks: u64,
    pub garbage_bytes: u64,
    /// Disk space the pack files occupy (allocated blocks, holes excluded).
    pub pack_disk_bytes: u64,
}

/// One problem [`ChunkStore::verify`] found.
#[derive(Debug)]
pub struct ChunkProblem {
    pub digest: ChunkDigest,
    pub error: StoreError,
}

/// Result of [`ChunkStore::verify`].
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    pub problems: Vec<ChunkProblem>,
}

impl ChunkStore {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        if !(1..=MAX_PACKS).contains(&config.pack_count) {
            return Err(StoreError::InvalidConfig(format!(
                "pack count {} is not between 1 and {MAX_PACKS}",
                config.pack_count
            )));
        }
        if !(BLOCK_BITS..=30).contains(&config.chunk_bits) {
            return Err(StoreError::InvalidConfig(format!(
                "chunk size 2^{} is not between 4 KiB and 1 GiB",
                config.chunk_bits
            )));
        }
        let options_len: usize = (0..config.pack_count)
            .map(|p| ",device=".len() + root.join(format!("p{p}")).as_os_str().len())
            .sum();
        if options_len >= 4096 {
            return Err(StoreError::InvalidConfig(format!(
                "{} packs under {} need {options_len} bytes of device= mount options, more than one 4096-byte page; use a shorter root or fewer packs",
                config.pack_count,
                root.display()
            )));
        }
        std::fs::create_dir_all(root).map_err(io_err("create directory", root))?;
        let lock_path = root.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("open", &lock_path))?;
        #[allow(deprecated)] // nix 0.29's Flock type needs an owned file; this is a plain flock
        nix::fcntl::flock(lock_file.as_raw_fd(), FlockArg::LockExclusiveNonblock).map_err(|e| {
            match e {
                nix::errno::Errno::EWOULDBLOCK => StoreError::Busy {
                    path: root.to_path_buf(),
                },
                e => io_err("lock", &lock_path)(e.into()),
            }
        })?;
        let index_path = root.join("index.redb");
        let db = crate::open_or_create_redb(&index_path).map_err(|source| StoreError::Index {
            path: index_path.clone(),
            source,
        })?;
        let mut ends = Vec::new();
        {
            let ie = |e: redb::Error| StoreError::Index {
                path: index_path.clone(),
                source: Box::new(e),
            };
            let txn = db.begin_write().map_err(|e| ie(e.into()))?;
            {
                let mut meta = txn.open_table(META).map_err(|e| ie(e.into()))?;
                for (key, want) in [
                    ("version", FORMAT_VERSION),
                    ("chunk_bits", u64::from(config.chunk_bits)),
                    ("pack_count", u64::from(config.pack_count)),
                ] {
                    let have = meta.get(key).map_err(|e| ie(e.into()))?.map(|g| g.value());
                    match have {
                        None => {
                            meta.insert(key, want).map_err(|e| ie(e.into()))?;
                        }
                        Some(h) if h == want => {}
                        Some(h) => {
                            return Err(StoreError::ConfigMismatch {
                                path: root.to_path_buf(),
                                what: format!("{key} {h}, not {want}"),
                            })
                        }
                    }
                }
                let mut packs = txn.open_table(PACKS).map_err(|e| ie(e.into()))?;
                for p in 0..config.pack_count {
                    let end = packs.get(p).map_err(|e| ie(e.into()))?.map(|g| g.value());
                    let end = match end {
                        Some(e) => e,
                        None => {
                            packs.insert(p, 0).map_err(|e| ie(e.into()))?;
                            0
                        }
                    };
                    ends.push(end);
                }
                txn.open_table(CHUNKS).map_err(|e| ie(e.into()))?;
                txn.open_table(DIGESTS).map_err(|e| ie(e.into()))?;
                txn.open_table(GARBAGE).map_err(|e| ie(e.into()))?;
                txn.open_table(LAYERS).map_err(|e| ie(e.into()))?;
            }
            txn.commit().map_err(|e| ie(e.into()))?;
        }
        let mut packs = Vec::new();
        for (p, end) in ends.iter().enumerate() {
            let path = root.join(format!("p{p}"));
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err("open pack", &path))?;
            let len = file.metadata().map_err(io_err("stat", &path))?.len();
            if len > *end {
                // Data of a layer that never committed.
                tracing::info!(pack = %path.display(), len, end, "truncating uncommitted pack data");
                file.set_len(*end).map_err(io_err("truncate", &path))?;
            } else if len < *end {
                tracing::error!(pack = %path.display(), len, end, "pack is shorter than its committed chunks; run verify");
            }
            packs.push(Pack { path, file });
        }
        tracing::debug!(root = %root.display(), ?config, "opened chunk store");
        Ok(Self {
            root: root.to_path_buf(),
            index_path,
            db,
            chunk_bits: config.chunk_bits,
            leased: Mutex::new(vec![false; packs.len()]),
            packs,
            lease_freed: Condvar::new(),
            pins: Mutex::new(HashMap::new()),
            index_lock: Mutex::new(()),
            _lock_file: lock_file,
        })
    }

    /// Root directory of the store.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// log2 of the chunk size.
    pub fn chunk_bits(&self) -> u8 {
        self.chunk_bits
    }

    /// Paths of the pack files, in device id order: mount every image of this store with
    /// exactly these as its `device=` options.
    pub fn pack_paths(&self) -> Vec<PathBuf> {
        self.packs.iter().map(|p| p.path.clone()).collect()
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ie<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StoreError + '_ {
        index_err(&self.index_path)
    }

    /// Starts writing the chunks of layer `id`. Takes one pack for itself until it is
    /// committed or dropped (waiting while every pack is taken).
    pub fn begin_layer(&self, id: &str) -> Result<LayerWriter<'_>, StoreError> {
        let mut leased = Self::lock(&self.leased);
        let pack = loop {
            if let Some(p) = leased.iter().position(|l| !l) {
                break p;
            }
            leased = self
                .lease_freed
                .wait(leased)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        };
        leased[pack] = true;
        drop(leased);
        let mut writer = LayerWriter {
            store: self,
            id: id.to_string(),
            pack: pack as u16,
            end: 0,
            new: HashMap::new(),
            shared: BTreeSet::new(),
            pinned: Vec::new(),
            stats: LayerStats::default(),
            pad: vec![0; BLOCK_SIZE as usize],
        };
        let txn = self.db.begin_read().map_err(self.ie())?;
        let packs = txn.open_table(PACKS).map_err(self.ie())?;
        writer.end = packs
            .get(pack as u16)
            .map_err(self.ie())?
            .map(|g| g.value())
            .unwrap_or(0);
        let p = &self.packs[pack];
        let len = p.file.metadata().map_err(io_err("stat", &p.path))?.len();
        if len > writer.end {
            p.file
                .set_len(writer.end)
                .map_err(io_err("truncate", &p.path))?;
        }
        Ok(writer)
    }

    /// Looks a digest up and pins its location so GC keeps it until the layer is done.
    fn find_and_pin(&self, digest: &ChunkDigest) -> Result<Option<(LocKey, u32)>, StoreError> {
        let mut pins = Self::lock(&self.pins);
        let txn = self.db.begin_read().map_err(self.ie())?;
        let digests = txn.open_table(DIGESTS).map_err(self.ie())?;
        let Some(loc) = digests
            .get(digest.as_slice())
            .map_err(self.ie())?
            .map(|g| g.value())
        else {
            return Ok(None);
        };
        let chunks = txn.open_table(CHUNKS).map_err(self.ie())?;
        let Some(rec) = chunks.get(loc).map_err(self.ie())? else {
            return Ok(None);
        };
        *pins.entry(loc).or_default() += 1;
        Ok(Some((loc, Record::decode(rec.value()).len)))
    }

    fn unpin(&self, locs: &[LocKey]) {
        let mut pins = Self::lock(&self.pins);
        for l in locs {
            if let Some(c) = pins.get_mut(l) {
                *c -= 1;
                if *c == 0 {
                    pins.remove(l);
                }
            }
        }
    }

    /// Ids of the committed layers.
    pub fn layers(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read().map_err(self.ie())?;
        let t = txn.open_table(LAYERS).map_err(self.ie())?;
        let mut out = Vec::new();
        for item in t.iter().map_err(self.ie())? {
            let (k, _) = item.map_err(self.ie())?;
            out.push(k.value().to_string());
        }
        Ok(out)
    }

    /// Drops layer `id`'s references. Chunks no layer references any more become garbage
    /// for [`ChunkStore::gc`]. Returns false when no such layer is committed.
    pub fn remove_layer(&self, id: &str) -> Result<bool, StoreError> {
        let _guard = Self::lock(&self.index_lock);
        let txn = self.db.begin_write().map_err(self.ie())?;
        let mut released = 0u64;
        {
            let mut layers = txn.open_table(LAYERS).map_err(self.ie())?;
            let Some(locs) = layers
                .remove(id)
                .map_err(self.ie())?
                .map(|g| g.value().to_vec())
            else {
                return Ok(false);
            };
            let mut chunks = txn.open_table(CHUNKS).map_err(self.ie())?;
            let mut digests = txn.open_table(DIGESTS).map_err(self.ie())?;
            let mut garbage = txn.open_table(GARBAGE).map_err(self.ie())?;
            for l in locs.chunks_exact(8) {
                let loc = u64::from_le_bytes(l.try_into().unwrap_or_default());
                let Some(mut rec) = chunks
                    .get(loc)
                    .map_err(self.ie())?
                    .map(|g| Record::decode(g.value()))
                else {
                    continue;
                };
                rec.refs = rec.refs.saturating_sub(1);
                if rec.refs == 0 {
                    chunks.remove(loc).map_err(self.ie())?;
                    let canonical = digests
                        .get(rec.digest.as_slice())
                        .map_err(self.ie())?
                        .map(|g| g.value());
                    if canonical == Some(loc) {
                        digests.remove(rec.digest.as_slice()).map_err(self.ie())?;
                    }
                    garbage
                        .insert(loc, rec.encode().as_slice())
                        .map_err(self.ie())?;
                    released += 1;
                } else {
                    chunks
                        .insert(loc, rec.encode().as_slice())
                        .map_err(self.ie())?;
                }
            }
        }
        txn.commit().map_err(self.ie())?;
        tracing::info!(layer = id, released, "removed layer from chunk store");
        Ok(true)
    }

    /// Punches the blocks of unreferenced chunks out of the packs, so the disk space
    /// converges to the chunks still referenced.
    pub fn gc(&self) -> Result<GcStats, StoreError> {
        let _guard = Self::lock(&self.index_lock);
        let mut stats = GcStats::default();
        let mut done = Vec::new();
        {
            let pins = Self::lock(&self.pins);
            let txn = self.db.begin_read().map_err(self.ie())?;
            let garbage = txn.open_table(GARBAGE).map_err(self.ie())?;
            for item in garbage.iter().map_err(self.ie())? {
                let (k, v) = item.map_err(self.ie())?;
                let loc = k.value();
                if pins.contains_key(&loc) {
                    stats.chunks_pinned += 1;
                    continue;
                }
                let rec = Record::decode(v.value());
                let (pack, offset) = loc_split(loc);
                let Some(p) = self.packs.get(usize::from(pack)) else {
                    continue;
                };
                let len = align_up(u64::from(rec.len), BLOCK_SIZE);
                nix::fcntl::fallocate(
                    p.file.as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    offset as i64,
                    len as i64,
                )
                .map_err(|e| io_err("punch a hole in", &p.path)(e.into()))?;
                stats.chunks_reclaimed += 1;
                stats.bytes_reclaimed += len;
                done.push(loc);
            }
        }
        let txn = self.db.begin_write().map_err(self.ie())?;
        {
            let mut garbage = txn.open_table(GARBAGE).map_err(self.ie())?;
            for loc in &done {
                garbage.remove(*loc).map_err(self.ie())?;
            }
        }
        txn.commit().map_err(self.ie())?;
        tracing::info!(?stats, "chunk store gc");
        Ok(stats)
    }

    fn read_verified(&self, loc: LocKey, rec: &Record) -> Result<Vec<u8>, StoreError> {
        let (pack, offset) = loc_split(loc);
        let p = &self.packs[usize::from(pack).min(self.packs.len() - 1)];
        let mut buf = vec![0u8; rec.len as usize];
        if let Err(e) = p.file.read_exact_at(&mut buf, offset) {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                let len = p.file.metadata().map(|m| m.len()).unwrap_or(0);
                return Err(StoreError::TruncatedPack {
                    digest: hex::encode(rec.digest),
                    path: p.path.clone(),
                    offset,
                    len,
                });
            }
            return Err(io_err("read", &p.path)(e));
        }
        let actual = chunk_digest(&buf);
        if actual != rec.digest {
            return Err(StoreError::CorruptChunk {
                digest: hex::encode(rec.digest),
                actual: hex::encode(actual),
                path: p.path.clone(),
                offset,
            });
        }
        Ok(buf)
    }

    /// Reads the chunk with this digest, checking its bytes against the digest.
    pub fn read_chunk(&self, digest: &ChunkDigest) -> Result<Vec<u8>, StoreError> {
        let txn = self.db.begin_read().map_err(self.ie())?;
        let digests = txn.open_table(DIGESTS).map_err(self.ie())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.ie())?;
        let not_found = || StoreError::NoSuchChunk {
            digest: hex::encode(digest),
            path: self.root.clone(),
        };
        let loc = digests
            .get(digest.as_slice())
            .map_err(self.ie())?
            .ok_or_else(not_found)?
            .value();
        let rec = Record::decode(
            chunks
                .get(loc)
                .map_err(self.ie())?
                .ok_or_else(not_found)?
                .value(),
        );
        self.read_verified(loc, &rec)
    }

    /// Reads every live chunk and checks it against its digest.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let txn = self.db.begin_read().map_err(self.ie())?;
        let chunks = txn.open_table(CHUNKS).map_err(self.ie())?;
        for item in chunks.iter().map_err(self.ie())? {
            let (k, v) = item.map_err(self.ie())?;
            let rec = Record::decode(v.value());
            report.chunks_checked += 1;
            report.bytes_checked += u64::from(rec.len);
            if let Err(error) = self.read_verified(k.value(), &rec) {
                tracing::error!(%error, "chunk store verify");
                report.problems.push(ChunkProblem {
                    digest: rec.digest,
                    error,
                });
            }
        }
        Ok(report)
    }

    /// Totals of the store.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut s = StoreStats::default();
        let txn = self.db.begin_read().map_err(self.ie())?;
        let layers = txn.open_table(LAYERS).map_err(self.ie())?;
        s.layers = layers.iter().map_err(self.ie())?.count() as u64;
        for (table, count, bytes) in [
            (CHUNKS, &mut s.live_chunks, &mut s.live_bytes),
            (GARBAGE, &mut s.garbage_chunks, &mut s.garbage_bytes),
        ] {
            let t = txn.open_table(table).map_err(self.ie())?;
            for item in t.iter().map_err(self.ie())? {
                let (_, v) = item.map_err(self.ie())?;
                *count += 1;
                *bytes += u64::from(Record::decode(v.value()).len);
            }
        }
        for p in &self.packs {
            s.pack_disk_bytes += p.file.metadata().map_err(io_err("stat", &p.path))?.blocks() * 512;
        }
        Ok(s)
    }
}

/// Where a stored chunk lies: `device_id` 1..=n is slot n-1 of the device table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    pub device_id: u16,
    pub blkaddr: u32,
}

/// Receives the data chunks of chunk-based files.
pub trait ChunkSink {
    /// log2 of the chunk size; at least [`BLOCK_BITS`].
    fn chunk_bits(&self) -> u8;
    /// Stores one chunk (at most the chunk size, the last one of a file may be shorter,
    /// never all zeroes) and says where it lies.
    fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkLocation, StoreError>;
    /// The device table the image must carry, in device id order.
    fn device_table(&self) -> Vec<DeviceSlot>;
}

/// Writes the chunks of one layer into one pack; [`LayerWriter::commit`] records them and
/// the layer's references in the index. Dropping it uncommitted forgets the layer.
#[derive(Debug)]
pub struct LayerWriter<'a> {
    store: &'a ChunkStore,
    id: String,
    pack: u16,
    end: u64,
    new: HashMap<ChunkDigest, (LocKey, u32)>,
    shared: BTreeSet<LocKey>,
    pinned: Vec<LocKey>,
    stats: LayerStats,
    pad: Vec<u8>,
}

impl LayerWriter<'_> {
    fn pack(&self) -> &Pack {
        &self.store.packs[usize::from(self.pack)]
    }

    /// Makes the layer's chunks durable and records them and its references.
    pub fn commit(self) -> Result<LayerStats, StoreError> {
        let store = self.store;
        let pack = self.pack();
        if !self.new.is_empty() {
            pack.file.sync_data().map_err(io_err("sync", &pack.path))?;
        }
        let _guard = ChunkStore::lock(&store.index_lock);
        let txn = store.db.begin_write().map_err(store.ie())?;
        {
            let mut layers = txn.open_table(LAYERS).map_err(store.ie())?;
            if layers.get(self.id.as_str()).map_err(store.ie())?.is_some() {
                return Err(StoreError::LayerExists {
                    id: self.id.clone(),
                    path: store.root.clone(),
                });
            }
            let mut packs = txn.open_table(PACKS).map_err(store.ie())?;
            packs.insert(self.pack, self.end).map_err(store.ie())?;
            let mut chunks = txn.open_table(CHUNKS).map_err(store.ie())?;
            let mut digests = txn.open_table(DIGESTS).map_err(store.ie())?;
            let mut garbage = txn.open_table(GARBAGE).map_err(store.ie())?;
            let mut all = Vec::with_capacity((self.new.len() + self.shared.len()) * 8);
            for (digest, &(loc, len)) in &self.new {
                let rec = Record {
                    digest: *digest,
                    len,
                    refs: 1,
                };
                chunks
                    .insert(loc, rec.encode().as_slice())
                    .map_err(store.ie())?;
                if digests
                    .get(digest.as_slice())
                    .map_err(store.ie())?
                    .is_none()
                {
                    digests.insert(digest.as_slice(), loc).map_err(store.ie())?;
                }
                all.extend_from_slice(&loc.to_le_bytes());
            }
            for &loc in &self.shared {
                let live = chunks
                    .get(loc)
                    .map_err(store.ie())?
                    .map(|g| Record::decode(g.value()));
                let mut rec = match live {
                    Some(r) => r,
                    None => {
                        // Its last layer was removed meanwhile; GC left it because we pinned it.
                        let dead = garbage
                            .remove(loc)
                            .map_err(store.ie())?
                            .map(|g| Record::decode(g.value()));
                        let Some(r) = dead else {
                            let (p, offset) = loc_split(loc);
                            return Err(StoreError::ChunkReclaimed {
                                id: self.id.clone(),
                                path: store.packs[usize::from(p)].path.clone(),
                                offset,
                            });
                        };
                        if digests
                            .get(r.digest.as_slice())
                            .map_err(store.ie())?
                            .is_none()
                        {
                            digests
                                .insert(r.digest.as_slice(), loc)
                                .map_err(store.ie())?;
                        }
                        r
                    }
                };
                rec.refs += 1;
                chunks
                    .insert(loc, rec.encode().as_slice())
                    .map_err(store.ie())?;
                all.extend_from_slice(&loc.to_le_bytes());
            }
            layers
                .insert(self.id.as_str(), all.as_slice())
                .map_err(store.ie())?;
        }
        txn.commit().map_err(store.ie())?;
        tracing::info!(layer = %self.id, stats = ?self.stats, "committed layer chunks");
        Ok(self.stats.clone())
    }
}

impl Drop for LayerWriter<'_> {
    fn drop(&mut self) {
        self.store.unpin(&self.pinned);
        let mut leased = ChunkStore::lock(&self.store.leased);
        leased[usize::from(self.pack)] = false;
        self.store.lease_freed.notify_one();
    }
}

impl ChunkSink for LayerWriter<'_> {
    fn chunk_bits(&self) -> u8 {
        self.store.chunk_bits
    }

    fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkLocation, StoreError> {
        let digest = chunk_digest(data);
        let len = data.len() as u64;
        let loc = if let Some(&(loc, _)) = self.new.get(&digest) {
            self.stats.shared_chunks += 1;
            self.stats.shared_bytes += len;
            loc
        } else if let Some((loc, _)) = self.store.find_and_pin(&digest)? {
            self.pinned.push(loc);
            self.shared.insert(loc);
            self.stats.shared_chunks += 1;
            self.stats.shared_bytes += len;
            loc
        } else {
            let offset = self.end;
            let stored = align_up(len, BLOCK_SIZE);
            if (offset + stored) >> BLOCK_BITS > u64::from(u32::MAX) {
                return Err(StoreError::PackFull {
                    path: self.pack().path.clone(),
                });
            }
            let pack = self.pack();
            pack.file
                .write_all_at(data, offset)
                .map_err(io_err("write", &pack.path))?;
            if stored > len {
                pack.file
                    .write_all_at(&self.pad[..(stored - len) as usize], offset + len)
                    .map_err(io_err("write", &pack.path))?;
            }
            let loc = loc_key(self.pack, offset);
            self.end += stored;
            self.new.insert(digest, (loc, len as u32));
            self.stats.new_chunks += 1;
            self.stats.new_bytes += len;
            loc
        };
        let (pack, offset) = loc_split(loc);
        Ok(ChunkLocation {
            device_id: pack + 1,
            blkaddr: (offset >> BLOCK_BITS) as u32,
        })
    }

    fn device_table(&self) -> Vec<DeviceSlot> {
        self.store
            .packs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let len = if i == usize::from(self.pack) {
                    self.end
                } else {
                    p.file.metadata().map(|m| m.len()).unwrap_or(0)
                };
                let path = p.path.as_os_str().as_encoded_bytes();
                let tag = if path.len() < DEVT_TAG_SIZE {
                    path.to_vec()
                } else {
                    p.path
                        .file_name()
                        .map(|n| n.as_encoded_bytes().to_vec())
                        .unwrap_or_default()
                };
                DeviceSlot {
                    tag,
                    blocks: (align_up(len, BLOCK_SIZE) >> BLOCK_BITS) as u32,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_keys_round_trip() {
        let k = loc_key(3, 4096 * 12345);
        assert_eq!(loc_split(k), (3, 4096 * 12345));
    }

    #[test]
    fn records_round_trip() {
        let r = Record {
            digest: [7; 32],
            len: 65536,
            refs: 3,
        };
        let d = Record::decode(&r.encode());
        assert_eq!((d.digest, d.len, d.refs), (r.digest, r.len, r.refs));
    }
}

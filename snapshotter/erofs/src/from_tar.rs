//! An EROFS image straight from a layer's tar stream, without unpacking it anywhere.
//!
//! [`write_image_from_tar`] reads an uncompressed OCI layer archive once, front to back, and
//! builds the tree the layer's directory would hold after containerd's overlayfs applier
//! unpacked it:
//!
//! - a whiteout `.wh.NAME` becomes a character device 0:0 named `NAME`, owned as the entry
//!   says;
//! - `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque=y`);
//! - a later entry of a name replaces an earlier one, except that a directory over a
//!   directory only takes the new attributes;
//! - a hard link (`Link`) is one more name of the inode it names;
//! - PAX `SCHILY.xattr.*` records become xattrs, except `trusted.*` (never taken from an
//!   archive, as containerd's applier refuses them) and `user.*` on what is neither a file
//!   nor a directory; PAX `mtime` keeps its nanoseconds.
//!
//! File data goes to the chunk sink as it streams past (all-zero chunks become holes), small
//! files and symlink targets into the image, so nothing of the layer is written to a file
//! system but the image and the store's packs.
//!
//! It refuses, with [`ImageError::Archive`], what it cannot reproduce exactly: a path with a
//! `..` component, an entry whose parent directory the archive does not contain (the applier
//! would follow a lower layer's symlink or make the directory with its own attributes), a hard
//! link to a name not in the archive or to a directory, sparse and other rare entry kinds. A
//! caller falls back to unpacking such a layer on disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tar::EntryType;

use crate::format;
use crate::merge::{flatten_tree, MNode};
use crate::store::ChunkSink;
use crate::writer::{
    check_chunk_bits, Body, ImageError, ImageOptions, ImageStats, Layout, Node, Spill,
    SPILL_CHUNK_RECORD,
};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
const PAX_XATTR: &[u8] = b"SCHILY.xattr.";
/// At most this much of PAX records per entry.
const MAX_PAX_BYTES: u64 = 1 << 20;
/// At most this long a GNU long name or link target.
const MAX_LONG_NAME: u64 = 64 << 10;

/// PAX records, key and value, in the order given.
type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// What the extension entries before an entry say about it.
#[derive(Default)]
struct Extensions {
    pax: PaxRecords,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

impl Extensions {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.pax
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }
}

/// PAX records: `LEN KEY=VALUE\n`, LEN counting the whole record; values may hold any byte.
fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        if data.iter().all(|&b| b == 0) {
            break;
        }
        let space = data
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or("a PAX record without its length")?;
        let len: usize = std::str::from_utf8(&data[..space])
            .ok()
            .and_then(|l| l.parse().ok())
            .ok_or("a PAX record with an unreadable length")?;
        if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a PAX record whose length does not fit".into());
        }
        let record = &data[space + 1..len - 1];
        let eq = record
            .iter()
            .position(|&b| b == b'=')
            .ok_or("a PAX record without `=`")?;
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

/// Writes into `out` (truncated first) the EROFS image of the uncompressed layer archive read
/// from `tar`, its file data into `sink`. `shown` names the archive in errors. The limits of
/// `options` apply as for [`crate::write_image`]. The archive is read up to its end-of-archive
/// marker; what follows it is left in `tar`.
pub fn write_image_from_tar(
    tar: &mut dyn Read,
    shown: &Path,
    out: &File,
    out_path: &Path,
    sink: &mut dyn ChunkSink,
    options: &ImageOptions,
) -> Result<ImageStats, ImageError> {
    let started = Instant::now();
    let chunk_bits = sink.chunk_bits();
    check_chunk_bits(chunk_bits, shown)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut b = Builder {
        nodes: Vec::new(),
        sink,
        chunk_bits,
        options,
        started,
        index_bytes: 0,
        spill: Spill::create(out_path.parent().unwrap_or(Path::new(".")))?,
        buf: vec![0; 1 << chunk_bits],
        stats: ImageStats::default(),
        shown: shown.to_path_buf(),
    };
    // The layer's root: as the snapshotter makes an empty layer directory, unless the
    // archive has an entry for it.
    b.push(Node {
        mode: libc::S_IFDIR | 0o755,
        uid: 0,
        gid: 0,
        mtime: now.as_secs() as i64,
        mtime_nsec: now.subsec_nanos(),
        rdev: 0,
        size: 0,
        nlink: 1,
        xattrs: Vec::new(),
        body: Body::Dir {
            entries: Vec::new(),
            parent: 0,
        },
    })?;
    let mut archive = tar::Archive::new(tar);
    // Raw: PAX records and GNU long names are read here, not by the tar crate, whose PAX
    // parser splits records at every newline (an xattr's binary value may hold one).
    let entries = archive
        .entries()
        .map_err(|e| b.archive(format!("{e}")))?
        .raw(true);
    let mut ext = Extensions::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| b.archive(format!("cannot read an entry: {e}")))?;
        b.check_time()?;
        match entry.header().entry_type() {
            EntryType::XHeader => {
                let data = b.read_small(&mut entry, MAX_PAX_BYTES)?;
                ext.pax = parse_pax(&data).map_err(|w| b.archive(w))?;
            }
            // Global records: containerd's applier ignores them too.
            EntryType::XGlobalHeader => {
                b.read_small(&mut entry, MAX_PAX_BYTES)?;
            }
            EntryType::GNULongName => {
                ext.long_name = Some(b.read_name(&mut entry)?);
            }
            EntryType::GNULongLink => {
                ext.long_link = Some(b.read_name(&mut entry)?);
            }
            _ => {
                let this = std::mem::take(&mut ext);
                b.entry(&mut entry, &this)?;
            }
        }
    }
    let mut nodes = flatten_tree(&mut b.nodes, options, shown, &mut b.stats)?;
    // Link counts as the tree has them: one per name of a non-directory.
    let mut names = vec![0u32; nodes.len()];
    for n in &nodes {
        if let Body::Dir { entries, .. } = &n.body {
            for &(_, c) in entries {
                names[c] += 1;
            }
        }
    }
    for (n, count) in nodes.iter_mut().zip(names) {
        if n.mode & libc::S_IFMT != libc::S_IFDIR {
            n.nlink = count.max(1);
        }
    }
    let devices = b.sink.device_table();
    let layout = Layout {
        devices: &devices,
        options,
        chunk_bits,
        root: shown,
        out,
        out_path,
    };
    let stats = layout.finish(&mut nodes, b.spill, b.stats)?;
    tracing::debug!(archive = %shown.display(), image = %out_path.display(), ?stats, "wrote erofs image from a layer archive");
    Ok(stats)
}

struct Builder<'a> {
    nodes: Vec<MNode>,
    sink: &'a mut dyn ChunkSink,
    chunk_bits: u8,
    options: &'a ImageOptions,
    started: Instant,
    index_bytes: u64,
    spill: Spill,
    buf: Vec<u8>,
    stats: ImageStats,
    shown: PathBuf,
}

/// The path of an entry as names below the root; `None` for the root itself.
fn components(raw: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("a path with a `..` component".into()),
            c if c.len() > format::NAME_LEN => return Err("a name longer than 255 bytes".into()),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn shown_name(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

impl Builder<'_> {
    fn archive(&self, what: String) -> ImageError {
        ImageError::Archive {
            path: self.shown.clone(),
            what,
        }
    }

    fn check_time(&self) -> Result<(), ImageError> {
        match self.options.time_limit {
            Some(limit) if self.started.elapsed() > limit => Err(ImageError::TimedOut {
                path: self.shown.clone(),
                limit,
            }),
            _ => Ok(()),
        }
    }

    fn push(&mut self, node: Node) -> Result<usize, ImageError> {
        if self.nodes.len() as u64 >= self.options.max_inodes {
            return Err(ImageError::OverLimit {
                path: self.shown.clone(),
                what: "inodes in the layer",
                needed: self.nodes.len() as u64 + 1,
                limit: self.options.max_inodes,
            });
        }
        self.nodes.push(MNode {
            node,
            children: BTreeMap::new(),
        });
        Ok(self.nodes.len() - 1)
    }

    fn is_dir(&self, n: usize) -> bool {
        self.nodes[n].node.mode & libc::S_IFMT == libc::S_IFDIR
    }

    /// The directory `path` names, which the archive must have made already.
    fn dir_at(&self, path: &[&[u8]], raw: &[u8]) -> Result<usize, ImageError> {
        let mut at = 0;
        for c in path {
            match self.nodes[at].children.get(*c) {
                Some(&n) if self.is_dir(n) => at = n,
                _ => {
                    return Err(self.archive(format!(
                        "{}: its parent directory is not in the archive",
                        shown_name(raw)
                    )))
                }
            }
        }
        Ok(at)
    }

    /// An extension entry's data, at most `limit` bytes.
    fn read_small(
        &self,
        entry: &mut tar::Entry<'_, &mut dyn Read>,
        limit: u64,
    ) -> Result<Vec<u8>, ImageError> {
        if entry.size() > limit {
            return Err(self.archive(format!(
                "an extension entry of {} bytes, over the limit of {limit}",
                entry.size()
            )));
        }
        let mut data = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut data)
            .map_err(|e| self.archive(format!("an extension entry ends early: {e}")))?;
        Ok(data)
    }

    /// A GNU long name or link target, without its trailing NULs.
    fn read_name(&self, entry: &mut tar::Entry<'_, &mut dyn Read>) -> Result<Vec<u8>, ImageError> {
        let mut name = self.read_small(entry, MAX_LONG_NAME)?;
        while name.last() == Some(&0) {
            name.pop();
        }
        Ok(name)
    }

    fn entry(
        &mut self,
        entry: &mut tar::Entry<'_, &mut dyn Read>,
        ext: &Extensions,
    ) -> Result<(), ImageError> {
        let kind = entry.header().entry_type();
        let raw = match (ext.get(b"path"), &ext.long_name) {
            (Some(p), _) => p.to_vec(),
            (None, Some(n)) => n.clone(),
            (None, None) => entry.header().path_bytes().into_owned(),
        };
        if let Some(size) = ext.get(b"size") {
            if std::str::from_utf8(size).ok().and_then(|s| s.parse().ok()) != Some(entry.size()) {
                return Err(self.archive(format!(
                    "{}: a PAX size other than its header's",
                    shown_name(&raw)
                )));
            }
        }
        let link = match (ext.get(b"linkpath"), &ext.long_link) {
            (Some(p), _) => Some(p.to_vec()),
            (None, Some(n)) => Some(n.clone()),
            (None, None) => entry.header().link_name_bytes().map(|l| l.into_owned()),
        };
        let path =
            components(&raw).map_err(|w| self.archive(format!("{}: {w}", shown_name(&raw))))?;
        if path.len() as u64 > u64::from(self.options.max_depth) + 1 {
            return Err(ImageError::TooDeep {
                path: self.shown.clone(),
                limit: self.options.max_depth,
            });
        }
        self.stats.depth = self.stats.depth.max(path.len().saturating_sub(1) as u32);
        let Some((&name, parents)) = path.split_last() else {
            // The root: only a directory may stand for it.
            if kind != EntryType::Directory {
                return Err(self.archive(format!(
                    "{}: a root that is not a directory",
                    shown_name(&raw)
                )));
            }
            let node = self.node(entry, ext, &raw, Body::Empty, libc::S_IFDIR)?;
            let root = &mut self.nodes[0].node;
            *root = Node {
                body: std::mem::replace(&mut root.body, Body::Empty),
                ..node
            };
            return Ok(());
        };
        let dir = self.dir_at(parents, &raw)?;
        if name == OPAQUE_MARKER {
            let xattrs = &mut self.nodes[dir].node.xattrs;
            xattrs.retain(|(n, _)| n != OPAQUE_XATTR);
            xattrs.push((OPAQUE_XATTR.to_vec(), b"y".to_vec()));
            xattrs.sort();
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() {
                return Err(self.archive(format!("{}: an empty whiteout", shown_name(&raw))));
            }
            let mut node = self.node(entry, ext, &raw, Body::Empty, libc::S_IFCHR)?;
            node.mode = libc::S_IFCHR;
            node.rdev = 0;
            node.xattrs.clear();
            let n = self.push(node)?;
            self.nodes[dir].children.insert(hidden.to_vec(), n);
            return Ok(());
        }
        let existing = self.nodes[dir].children.get(name).copied();
        let n = match kind {
            EntryType::Directory => {
                let node = self.node(
                    entry,
                    ext,
                    &raw,
                    Body::Dir {
                        entries: Vec::new(),
                        parent: 0,
                    },
                    libc::S_IFDIR,
                )?;
                if let Some(e) = existing.filter(|&e| self.is_dir(e)) {
                    // A directory over a directory: new attributes, the same contents.
                    let old = &mut self.nodes[e].node;
                    *old = Node {
                        body: std::mem::replace(&mut old.body, Body::Empty),
                        ..node
                    };
                    return Ok(());
                }
                self.push(node)?
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                let body = self.file_body(entry, size, &raw)?;
                let mut node = self.node(entry, ext, &raw, body, libc::S_IFREG)?;
                node.size = size;
                self.push(node)?
            }
            EntryType::Symlink => {
                let target = link.clone().ok_or_else(|| {
                    self.archive(format!("{}: a symlink without a target", shown_name(&raw)))
                })?;
                if target.len() > format::BLOCK_SIZE as usize {
                    return Err(self.archive(format!(
                        "{}: a symlink target over 4096 bytes",
                        shown_name(&raw)
                    )));
                }
                let at = self.spill.append(&target)?;
                let mut node = self.node(entry, ext, &raw, Body::Spilled { at }, libc::S_IFLNK)?;
                node.size = target.len() as u64;
                self.push(node)?
            }
            EntryType::Link => {
                let target = link.clone().ok_or_else(|| {
                    self.archive(format!(
                        "{}: a hard link without a target",
                        shown_name(&raw)
                    ))
                })?;
                let tpath = components(&target)
                    .map_err(|w| self.archive(format!("{}: link target {w}", shown_name(&raw))))?;
                let Some((&tname, tparents)) = tpath.split_last() else {
                    return Err(
                        self.archive(format!("{}: a hard link to the root", shown_name(&raw)))
                    );
                };
                let tdir = self.dir_at(tparents, &target)?;
                match self.nodes[tdir].children.get(tname).copied() {
                    Some(t) if !self.is_dir(t) => t,
                    _ => {
                        return Err(self.archive(format!(
                            "{}: a hard link to {}, which is not an earlier file of the archive",
                            shown_name(&raw),
                            shown_name(&target)
                        )))
                    }
                }
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let bits = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let mut node = self.node(entry, ext, &raw, Body::Empty, bits)?;
                if bits != libc::S_IFIFO {
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    node.rdev = libc::makedev(major, minor);
                }
                self.push(node)?
            }
            other => {
                return Err(self.archive(format!(
                    "{}: entries of type {other:?} are not handled",
                    shown_name(&raw)
                )))
            }
        };
        self.nodes[dir].children.insert(name.to_vec(), n);
        Ok(())
    }

    /// A node with the entry's owner, permission bits, time and xattrs.
    fn node(
        &self,
        entry: &mut tar::Entry<'_, &mut dyn Read>,
        ext: &Extensions,
        raw: &[u8],
        body: Body,
        kind: u32,
    ) -> Result<Node, ImageError> {
        let bad = |what: &str| self.archive(format!("{}: {what}", shown_name(raw)));
        let number = |key: &[u8]| -> Result<Option<u64>, ImageError> {
            ext.get(key)
                .map(|v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse().ok())
                        .ok_or_else(|| bad("an unreadable PAX number"))
                })
                .transpose()
        };
        let h = entry.header();
        let mode = h.mode().map_err(|_| bad("an unreadable mode"))?;
        let uid = match number(b"uid")? {
            Some(u) => u,
            None => h.uid().map_err(|_| bad("an unreadable owner"))?,
        };
        let gid = match number(b"gid")? {
            Some(g) => g,
            None => h.gid().map_err(|_| bad("an unreadable group"))?,
        };
        if uid > u64::from(u32::MAX) || gid > u64::from(u32::MAX) {
            return Err(bad("an owner over 2^32"));
        }
        let mut mtime = h.mtime().map_err(|_| bad("an unreadable time"))? as i64;
        let mut mtime_nsec = 0u32;
        if let Some(value) = ext.get(b"mtime") {
            let value = std::str::from_utf8(value).map_err(|_| bad("an unreadable PAX mtime"))?;
            let (secs, frac) = value.split_once('.').unwrap_or((value, ""));
            mtime = secs.parse().map_err(|_| bad("an unreadable PAX mtime"))?;
            let digits: String = frac.chars().take(9).collect();
            if !digits.is_empty() {
                let n: u32 = digits.parse().map_err(|_| bad("an unreadable PAX mtime"))?;
                mtime_nsec = n * 10u32.pow(9 - digits.len() as u32);
                if mtime < 0 && mtime_nsec > 0 {
                    // -1.25 is 1.25 s before the epoch: -2 s plus 0.75 s.
                    mtime -= 1;
                    mtime_nsec = 1_000_000_000 - mtime_nsec;
                }
            }
        }
        let mut xattrs = Vec::new();
        for (key, value) in &ext.pax {
            let Some(name) = key.strip_prefix(PAX_XATTR) else {
                continue;
            };
            // As containerd's applier: `trusted.*` from an archive is never set (an image
            // must not steer overlayfs: `trusted.overlay.*`), and `user.*` only on regular
            // files and directories (the kernel refuses it elsewhere; containerd ignores
            // that).
            if name.starts_with(b"trusted.")
                || (name.starts_with(b"user.") && kind != libc::S_IFREG && kind != libc::S_IFDIR)
            {
                continue;
            }
            let shown = || PathBuf::from(shown_name(raw));
            if format::xattr_name_index(name).is_none() {
                return Err(ImageError::UnsupportedXattr {
                    path: shown(),
                    name: shown_name(name),
                });
            }
            if value.len() > usize::from(u16::MAX) {
                return Err(ImageError::XattrTooLarge {
                    path: shown(),
                    name: shown_name(name),
                });
            }
            xattrs.push((name.to_vec(), value.clone()));
        }
        // A name given twice: the last record wins.
        xattrs.reverse();
        xattrs.sort_by(|a, b| a.0.cmp(&b.0));
        xattrs.dedup_by(|a, b| a.0 == b.0);
        Ok(Node {
            mode: kind | (mode & 0o7777),
            uid: uid as u32,
            gid: gid as u32,
            mtime,
            mtime_nsec,
            rdev: 0,
            size: 0,
            nlink: 1,
            xattrs,
            body,
        })
    }

    /// A regular file's data, read from the archive: in the image when small, else in
    /// chunks (all-zero ones become holes).
    fn file_body(
        &mut self,
        data: &mut dyn Read,
        size: u64,
        raw: &[u8],
    ) -> Result<Body, ImageError> {
        let short = |e: io::Error| ImageError::Archive {
            path: self.shown.clone(),
            what: format!("{}: its data ends early: {e}", shown_name(raw)),
        };
        if size == 0 {
            return Ok(Body::Empty);
        }
        if size <= self.options.inline_max {
            let mut bytes = vec![0; size as usize];
            data.read_exact(&mut bytes).map_err(short)?;
            return Ok(Body::Spilled {
                at: self.spill.append(&bytes)?,
            });
        }
        let chunk = 1u64 << self.chunk_bits;
        let count = size.div_ceil(chunk);
        self.index_bytes += count * format::CHUNK_INDEX_SIZE as u64;
        if self.index_bytes > self.options.max_image_bytes {
            return Err(ImageError::OverLimit {
                path: self.shown.clone(),
                what: "bytes of image (chunk indexes)",
                needed: self.index_bytes,
                limit: self.options.max_image_bytes,
            });
        }
        let at = self.spill.len;
        let mut stored = 0u64;
        for i in 0..count {
            if i % 256 == 0 {
                self.check_time()?;
            }
            let len = chunk.min(size - i * chunk) as usize;
            let buf = &mut self.buf[..len];
            data.read_exact(buf).map_err(|e| ImageError::Archive {
                path: self.shown.clone(),
                what: format!("{}: its data ends early: {e}", shown_name(raw)),
            })?;
            if buf.iter().all(|&b| b == 0) {
                continue;
            }
            let loc = self
                .sink
                .put_chunk(buf)
                .map_err(|source| ImageError::Store {
                    path: PathBuf::from(shown_name(raw)),
                    source,
                })?;
            stored += 1;
            let mut rec = [0u8; SPILL_CHUNK_RECORD];
            rec[..8].copy_from_slice(&i.to_le_bytes());
            rec[8..10].copy_from_slice(&loc.device_id.to_le_bytes());
            rec[12..16].copy_from_slice(&loc.blkaddr.to_le_bytes());
            self.spill.append(&rec)?;
        }
        Ok(Body::Chunked { count, at, stored })
    }
}

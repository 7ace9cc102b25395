//! Deterministic layer tarballs: a filesystem tree (or an in-memory recipe) as a sorted list of
//! [`LayerEntry`] values, written by [`write_tar`] so that the same entries always give the same
//! bytes.
//!
//! What makes the output deterministic:
//!
//! - entries are sorted by path, component by component (the order of a sorted depth-first
//!   walk, so a directory always precedes its contents and the first path of a hard-link group
//!   precedes the links to it);
//! - modification times are clamped to the build's `SOURCE_DATE_EPOCH`; access and change
//!   times are not stored;
//! - owner names are empty, only numeric ids are stored;
//! - extended attributes are stored as PAX `SCHILY.xattr.NAME` records, sorted by name.
//!
//! Owners, modes (set-id and sticky bits included), extended attributes, hard links, symbolic
//! links, fifos and device nodes are kept as they are.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

use super::ImageError;

/// Prefix of a whiteout file: `DIR/.wh.NAME` in a layer deletes `DIR/NAME` of the layers below.
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// Where the contents of a regular file come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// A file on disk, read when the layer is written.
    Path(PathBuf),
    /// Contents held in memory.
    Bytes(Vec<u8>),
}

/// What kind of filesystem object an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File {
        data: FileData,
        size: u64,
    },
    Symlink {
        target: PathBuf,
    },
    /// A hard link to `target`, an earlier entry of the same layer.
    HardLink {
        target: PathBuf,
    },
    Fifo,
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
}

/// One entry of a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    /// Path inside the image, relative (`bin/sh`, no leading `/` or `./`).
    pub path: PathBuf,
    pub kind: EntryKind,
    /// Permission bits with the set-uid, set-gid and sticky bits (`0o7777` at most).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Modification time in seconds since the epoch; clamped when written.
    pub mtime: u64,
    /// Extended attributes by name (`security.capability`, `user.foo`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl LayerEntry {
    /// A root-owned directory.
    pub fn dir(path: impl Into<PathBuf>, mode: u32) -> Self {
        Self::new(path, EntryKind::Directory, mode)
    }

    /// A root-owned regular file with the given contents.
    pub fn file(path: impl Into<PathBuf>, mode: u32, contents: impl Into<Vec<u8>>) -> Self {
        let contents = contents.into();
        let size = contents.len() as u64;
        Self::new(
            path,
            EntryKind::File {
                data: FileData::Bytes(contents),
                size,
            },
            mode,
        )
    }

    /// A root-owned symbolic link.
    pub fn symlink(path: impl Into<PathBuf>, target: impl Into<PathBuf>) -> Self {
        Self::new(
            path,
            EntryKind::Symlink {
                target: target.into(),
            },
            0o777,
        )
    }

    /// A whiteout deleting `path` from the layers below.
    pub fn whiteout(path: &Path) -> Self {
        let name = path.file_name().unwrap_or_default();
        let mut wh = std::ffi::OsString::from(WHITEOUT_PREFIX);
        wh.push(name);
        let wh_path = match path.parent() {
            Some(parent) => parent.join(wh),
            None => PathBuf::from(wh),
        };
        Self::file(wh_path, 0o644, Vec::new())
    }

    fn new(path: impl Into<PathBuf>, kind: EntryKind, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            xattrs: BTreeMap::new(),
        }
    }

    /// Sets the owner.
    pub fn with_owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the modification time.
    pub fn with_mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// Adds an extended attribute.
    pub fn with_xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.insert(name.to_owned(), value.into());
        self
    }
}

/// Reads a directory tree into layer entries, in layer order, without following symbolic links.
///
/// The root itself is not an entry. Files sharing an inode become one regular file (the first
/// path) and hard links to it. Sockets are skipped: a tar cannot hold them.
pub fn scan_tree(root: &Path) -> Result<Vec<LayerEntry>, ImageError> {
    let mut entries = Vec::new();
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    scan_dir(root, Path::new(""), &mut inodes, &mut entries)?;
    Ok(entries)
}

fn scan_dir(
    root: &Path,
    rel: &Path,
    inodes: &mut HashMap<(u64, u64), PathBuf>,
    out: &mut Vec<LayerEntry>,
) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(|e| ImageError::io("cannot read directory", &dir, e))? {
        let entry = entry.map_err(|e| ImageError::io("cannot read directory", &dir, e))?;
        names.push(entry.file_name());
    }
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        let rel_path = rel.join(&name);
        let abs = root.join(&rel_path);
        let meta =
            fs::symlink_metadata(&abs).map_err(|e| ImageError::io("cannot stat", &abs, e))?;
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Directory
        } else if let Some(first) = inodes.get(&(meta.dev(), meta.ino())) {
            EntryKind::HardLink {
                target: first.clone(),
            }
        } else {
            if meta.nlink() > 1 {
                inodes.insert((meta.dev(), meta.ino()), rel_path.clone());
            }
            if ft.is_file() {
                EntryKind::File {
                    data: FileData::Path(abs.clone()),
                    size: meta.len(),
                }
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&abs).map_err(|e| ImageError::io("cannot read link", &abs, e))?;
                EntryKind::Symlink { target }
            } else if ft.is_fifo() {
                EntryKind::Fifo
            } else if ft.is_char_device() || ft.is_block_device() {
                let rdev = meta.rdev();
                let (major, minor) = (
                    nix::sys::stat::major(rdev) as u32,
                    nix::sys::stat::minor(rdev) as u32,
                );
                if ft.is_char_device() {
                    EntryKind::CharDevice { major, minor }
                } else {
                    EntryKind::BlockDevice { major, minor }
                }
            } else {
                tracing::warn!(path = %abs.display(), "skipping a socket: tar cannot hold it");
                continue;
            }
        };
        out.push(LayerEntry {
            path: rel_path.clone(),
            kind,
            mode: meta.mode() & 0o7777,
            uid: u64::from(meta.uid()),
            gid: u64::from(meta.gid()),
            mtime: u64::try_from(meta.mtime()).unwrap_or(0),
            xattrs: read_xattrs(&abs)?,
        });
        if ft.is_dir() {
            scan_dir(root, &rel_path, inodes, out)?;
        }
    }
    Ok(())
}

fn read_xattrs(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, ImageError> {
    let mut out = BTreeMap::new();
    // `xattr::list` and `xattr::get` act on the link itself, never on its target.
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => {
            return Err(ImageError::io(
                "cannot list extended attributes of",
                path,
                e,
            ))
        }
    };
    for name in names {
        let Some(key) = name.to_str() else {
            return Err(ImageError::io(
                "extended attribute name is not UTF-8 on",
                path,
                io::Error::from(io::ErrorKind::InvalidData),
            ));
        };
        if let Some(value) = xattr::get(path, &name)
            .map_err(|e| ImageError::io("cannot read extended attribute of", path, e))?
        {
            out.insert(key.to_owned(), value);
        }
    }
    Ok(out)
}

/// Sorts entries into layer order (by path, component by component).
pub fn sort_entries(entries: &mut [LayerEntry]) {
    entries.sort_by(|a, b| a.path.cmp(&b.path));
}

/// Writes `entries` as an uncompressed tar stream to `out`, sorting them first.
///
/// Modification times later than `epoch` are set to `epoch`. Returns the writer.
pub fn write_tar<W: Write>(
    entries: &mut [LayerEntry],
    epoch: u64,
    out: W,
) -> Result<W, ImageError> {
    sort_entries(entries);
    let mut builder = Builder::new(out);
    for entry in entries.iter() {
        append_entry(&mut builder, entry, epoch)
            .map_err(|e| ImageError::io("cannot add to layer tar the entry", &entry.path, e))?;
    }
    builder
        .into_inner()
        .map_err(|e| ImageError::io("cannot finish layer tar", Path::new("-"), e))
}

fn append_entry<W: Write>(b: &mut Builder<W>, e: &LayerEntry, epoch: u64) -> io::Result<()> {
    if e.path.as_os_str().is_empty() || e.path.is_absolute() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "entry paths must be relative and not empty",
        ));
    }
    if !e.xattrs.is_empty() {
        let records: Vec<(String, &[u8])> = e
            .xattrs
            .iter()
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
            .collect();
        b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))?;
    }
    let mut h = Header::new_gnu();
    h.set_mode(e.mode & 0o7777);
    h.set_uid(e.uid);
    h.set_gid(e.gid);
    h.set_mtime(e.mtime.min(epoch));
    h.set_size(0);
    match &e.kind {
        EntryKind::Directory => {
            h.set_entry_type(EntryType::Directory);
            b.append_data(&mut h, &e.path, io::empty())
        }
        EntryKind::File { data, size } => {
            h.set_entry_type(EntryType::Regular);
            h.set_size(*size);
            match data {
                FileData::Bytes(bytes) => {
                    if bytes.len() as u64 != *size {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "in-memory file size does not match its entry",
                        ));
                    }
                    b.append_data(&mut h, &e.path, bytes.as_slice())
                }
                FileData::Path(src) => {
                    let file = File::open(src)?;
                    if file.metadata()?.len() != *size {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{} changed size while the layer was written", src.display()),
                        ));
                    }
                    b.append_data(&mut h, &e.path, file.take(*size))
                }
            }
        }
        EntryKind::Symlink { target } => {
            h.set_entry_type(EntryType::Symlink);
            b.append_link(&mut h, &e.path, target)
        }
        EntryKind::HardLink { target } => {
            h.set_entry_type(EntryType::Link);
            b.append_link(&mut h, &e.path, target)
        }
        EntryKind::Fifo => {
            h.set_entry_type(EntryType::Fifo);
            b.append_data(&mut h, &e.path, io::empty())
        }
        EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
            h.set_entry_type(if matches!(e.kind, EntryKind::CharDevice { .. }) {
                EntryType::Char
            } else {
                EntryType::Block
            });
            h.set_device_major(*major)?;
            h.set_device_minor(*minor)?;
            b.append_data(&mut h, &e.path, io::empty())
        }
    }
}

/// The entries of a layer that turns the tree `lower` into the tree `upper` (both as returned
/// by [`scan_tree`]), the way a container engine's diff would:
///
/// - every entry of `upper` that is new or differs from `lower` (kind, contents, mode, owner,
///   extended attributes, modification time after clamping to `epoch`);
/// - a whiteout `DIR/.wh.NAME` for each path of `lower` missing from `upper` (one for a whole
///   deleted directory);
/// - the parent directories of all of those, so owners and modes are carried;
/// - the whole hard-link group of any changed member, since a link in a layer must point into
///   the same layer.
pub fn diff_entries(
    lower: &[LayerEntry],
    upper: &[LayerEntry],
    epoch: u64,
) -> Result<Vec<LayerEntry>, ImageError> {
    let lower_by_path: HashMap<&Path, &LayerEntry> =
        lower.iter().map(|e| (e.path.as_path(), e)).collect();
    let upper_by_path: HashMap<&Path, &LayerEntry> =
        upper.iter().map(|e| (e.path.as_path(), e)).collect();

    // Hard-link groups of the upper tree, keyed by the group's first path.
    let mut groups: HashMap<&Path, Vec<&Path>> = HashMap::new();
    for e in upper {
        if let EntryKind::HardLink { target } = &e.kind {
            groups
                .entry(target.as_path())
                .or_insert_with(|| vec![target.as_path()])
                .push(e.path.as_path());
        }
    }

    let mut emit: BTreeSet<&Path> = BTreeSet::new();
    for e in upper {
        let changed = match lower_by_path.get(e.path.as_path()) {
            None => true,
            Some(old) => !same_entry(old, e, epoch)?,
        };
        if changed {
            emit.insert(e.path.as_path());
            let leader = match &e.kind {
                EntryKind::HardLink { target } => Some(target.as_path()),
                _ => groups
                    .contains_key(e.path.as_path())
                    .then_some(e.path.as_path()),
            };
            if let Some(group) = leader.and_then(|l| groups.get(l)) {
                emit.extend(group.iter().copied());
            }
        }
    }

    let mut whiteouts = Vec::new();
    for e in lower {
        if upper_by_path.contains_key(e.path.as_path()) {
            continue;
        }
        let parent_kept = e
            .path
            .parent()
            .is_none_or(|p| p.as_os_str().is_empty() || upper_by_path.contains_key(p));
        if parent_kept {
            whiteouts.push(e.path.as_path());
        }
    }

    // Parent directories of everything emitted, whiteouts included.
    let mut parents: BTreeSet<&Path> = BTreeSet::new();
    for p in emit.iter().chain(whiteouts.iter()) {
        for a in p.ancestors().skip(1) {
            if a.as_os_str().is_empty() {
                break;
            }
            if upper_by_path.contains_key(a) {
                parents.insert(a);
            }
        }
    }
    emit.extend(parents);

    let mut out: Vec<LayerEntry> = upper
        .iter()
        .filter(|e| emit.contains(e.path.as_path()))
        .cloned()
        .collect();
    out.extend(whiteouts.into_iter().map(|p| {
        let parent_mtime = p
            .parent()
            .and_then(|pp| upper_by_path.get(pp))
            .map_or(epoch, |pe| pe.mtime.min(epoch));
        LayerEntry::whiteout(p).with_mtime(parent_mtime)
    }));
    sort_entries(&mut out);
    Ok(out)
}

fn same_entry(a: &LayerEntry, b: &LayerEntry, epoch: u64) -> Result<bool, ImageError> {
    if a.mode != b.mode
        || a.uid != b.uid
        || a.gid != b.gid
        || a.mtime.min(epoch) != b.mtime.min(epoch)
        || a.xattrs != b.xattrs
    {
        return Ok(false);
    }
    match (&a.kind, &b.kind) {
        (EntryKind::File { data: da, size: sa }, EntryKind::File { data: db, size: sb }) => {
            Ok(sa == sb && same_data(da, db)?)
        }
        (ka, kb) => Ok(ka == kb),
    }
}

fn same_data(a: &FileData, b: &FileData) -> Result<bool, ImageError> {
    match (a, b) {
        (FileData::Bytes(x), FileData::Bytes(y)) => Ok(x == y),
        _ => Ok(read_data(a)? == read_data(b)?),
    }
}

fn read_data(d: &FileData) -> Result<Vec<u8>, ImageError> {
    match d {
        FileData::Bytes(b) => Ok(b.clone()),
        FileData::Path(p) => fs::read(p).map_err(|e| ImageError::io("cannot read", p, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(bytes: &[u8]) -> Vec<(String, EntryType, u32)> {
        let mut ar = tar::Archive::new(bytes);
        ar.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.entry_type(),
                    h.mode().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn entries_are_sorted_by_component_and_mtimes_clamped() {
        let mut entries = vec![
            LayerEntry::file("a/y", 0o644, "y").with_mtime(5_000),
            LayerEntry::dir("a-b", 0o755),
            LayerEntry::file("a-b/x", 0o644, "x"),
            LayerEntry::dir("a", 0o755),
        ];
        let bytes = write_tar(&mut entries, 1_000, Vec::new()).unwrap();
        let names: Vec<String> = read_back(&bytes).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["a", "a/y", "a-b", "a-b/x"]);
        let mut ar = tar::Archive::new(bytes.as_slice());
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            assert!(e.header().mtime().unwrap() <= 1_000);
            assert_eq!(e.header().username_bytes(), Some(&b""[..]));
        }
    }

    #[test]
    fn diff_emits_changes_parents_and_whiteouts() {
        let lower = vec![
            LayerEntry::dir("etc", 0o755),
            LayerEntry::file("etc/keep", 0o644, "same"),
            LayerEntry::file("etc/gone", 0o644, "old"),
            LayerEntry::dir("old", 0o755),
            LayerEntry::file("old/x", 0o644, "x"),
            LayerEntry::dir("usr", 0o755),
            LayerEntry::file("usr/changed", 0o644, "v1"),
        ];
        let upper = vec![
            LayerEntry::dir("etc", 0o755),
            LayerEntry::file("etc/keep", 0o644, "same"),
            LayerEntry::dir("usr", 0o755),
            LayerEntry::file("usr/changed", 0o644, "v2"),
            LayerEntry::dir("usr/new", 0o755),
            LayerEntry::file("usr/new/a", 0o644, "a"),
            LayerEntry::new(
                "usr/new/b",
                EntryKind::HardLink {
                    target: "usr/new/a".into(),
                },
                0o644,
            ),
        ];
        let diff = diff_entries(&lower, &upper, 100).unwrap();
        let names: Vec<&str> = diff.iter().map(|e| e.path.to_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                ".wh.old",
                "etc",
                "etc/.wh.gone",
                "usr",
                "usr/changed",
                "usr/new",
                "usr/new/a",
                "usr/new/b"
            ]
        );
    }

    #[test]
    fn a_changed_hard_link_brings_its_group() {
        let lower = vec![
            LayerEntry::file("a", 0o755, "1"),
            LayerEntry::new("b", EntryKind::HardLink { target: "a".into() }, 0o755),
            LayerEntry::file("c", 0o644, "c"),
        ];
        let upper = vec![
            LayerEntry::file("a", 0o755, "1"),
            LayerEntry::new("b", EntryKind::HardLink { target: "a".into() }, 0o755),
            LayerEntry::new("c", EntryKind::HardLink { target: "a".into() }, 0o755),
        ];
        let diff = diff_entries(&lower, &upper, 100).unwrap();
        let names: Vec<&str> = diff.iter().map(|e| e.path.to_str().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }
}

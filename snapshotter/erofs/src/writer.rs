//! EROFS image writer: walks a directory tree without following symlinks and writes an
//! EROFS metadata image whose large files are chunk-based, their chunks stored through a
//! [`ChunkSink`] (the host-wide [`crate::ChunkStore`]) and addressed by device id.
//!
//! Layout: block 0 holds the superblock and the device table; inodes (with inline xattrs,
//! inline tails and chunk indexes) follow from block 1, the root first (at nid 1: a nid of 0
//! would reach readers as inode number 0, which `readdir` skips); whole data blocks of
//! directories, long symlinks and small files that do not fit inline come last.
//!
//! Memory does not grow with file or layer size: the walk is iterative, with one directory
//! descriptor open at a time (it goes back up through `..`, checking each parent is the one
//! it came down from); file contents, symlink targets and the stored chunks' addresses go to
//! an unnamed spill file beside the image while the tree is walked, and the image is then
//! streamed to disk. What stays in memory is per inode (its attributes, xattrs, and its
//! name in its directory), capped by [`ImageOptions::with_max_inodes`]. Holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` and never read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, FileStat, Mode};
use nix::unistd::{self, Whence};

use crate::format::{self, align_up, Le, BLOCK_SIZE};
use crate::store::StoreError;

/// Errors of [`write_image`].
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A system call on a path of the source tree or the image failed.
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file name is longer than EROFS allows.
    #[error("file name longer than 255 bytes at {path}")]
    NameTooLong { path: PathBuf },
    /// An xattr name has a prefix EROFS cannot encode.
    #[error("xattr {name} on {path} cannot be stored in EROFS (unsupported name prefix)")]
    UnsupportedXattr { path: PathBuf, name: String },
    /// An xattr value is larger than an EROFS xattr entry can hold.
    #[error("xattr {name} on {path} has a value over 65535 bytes")]
    XattrTooLarge { path: PathBuf, name: String },
    /// A file changed type, identity or size while it was read.
    #[error("{path} changed while the image was written; retry once the tree is quiet")]
    Changed { path: PathBuf },
    /// The tree exceeds an EROFS limit.
    #[error("tree at {path} does not fit in an EROFS image: {what}")]
    TooLarge { path: PathBuf, what: &'static str },
    /// Directories nest deeper than [`ImageOptions::with_max_depth`] allows.
    #[error("directories nest deeper than {limit} levels at {path}")]
    TooDeep { path: PathBuf, limit: u32 },
    /// The image would cost more than a limit of [`ImageOptions`] allows.
    #[error("{what} at {path}: {needed} over the limit of {limit}")]
    OverLimit {
        path: PathBuf,
        what: &'static str,
        needed: u64,
        limit: u64,
    },
    /// The walk ran past [`ImageOptions::with_deadline`].
    #[error("conversion ran past its time limit of {limit:?} (at {path})")]
    TimedOut { path: PathBuf, limit: Duration },
    /// An image read back (to merge it) is not one this crate writes, or is damaged.
    #[error("{path} is not a readable image: {what}")]
    Corrupt { path: PathBuf, what: &'static str },
    /// A layer archive holds something an image cannot be made of directly (see
    /// [`crate::write_image_from_tar`]), or is damaged.
    #[error("layer archive {path}: {what}")]
    Archive { path: PathBuf, what: String },
    /// Images to merge were written with different chunk sizes or device tables.
    #[error("{path} cannot be merged with the layers below it: {what}")]
    Mismatch { path: PathBuf, what: &'static str },
    /// Storing a chunk of a file failed.
    #[error("failed to store a chunk of {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(Errno) -> ImageError + 'a {
    move |e| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source: io::Error::from(e),
    }
}

fn std_io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Where a stored chunk lies: `device_id` 1..=n is slot n-1 of the device table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    pub device_id: u16,
    pub blkaddr: u32,
}

/// One entry of an image's device table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Name recorded in the slot (the device path where it fits in 64 bytes).
    pub tag: Vec<u8>,
    /// Size of the device in blocks when the image was written.
    pub blocks: u32,
}

/// Receives the data chunks of chunk-based files.
pub trait ChunkSink {
    /// log2 of the chunk size; at least [`format::BLOCK_BITS`].
    fn chunk_bits(&self) -> u8;
    /// Stores one chunk (at most the chunk size, the last one of a file may be shorter,
    /// never all zeroes) and says where it lies.
    fn put_chunk(&mut self, data: &[u8]) -> Result<ChunkLocation, StoreError>;
    /// The device table the image must carry, in device id order.
    fn device_table(&self) -> Vec<DeviceSlot>;
}

/// Default of [`ImageOptions::with_max_depth`].
pub const DEFAULT_MAX_DEPTH: u32 = 4096;
/// Default of [`ImageOptions::with_max_image_bytes`]: 1 GiB (a 1 TiB sparse file needs a
/// 128 MiB image with 64 KiB chunks, 8 bytes of chunk index per chunk, holes included).
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 1 << 30;
/// Default of [`ImageOptions::with_max_inodes`].
pub const DEFAULT_MAX_INODES: u64 = 2_000_000;

/// Options of [`write_image`].
#[derive(Debug, Clone)]
pub struct ImageOptions {
    pub(crate) inline_max: u64,
    uuid: [u8; 16],
    pub(crate) max_depth: u32,
    pub(crate) max_image_bytes: u64,
    pub(crate) max_inodes: u64,
    pub(crate) time_limit: Option<Duration>,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            inline_max: 2048,
            uuid: [0; 16],
            max_depth: DEFAULT_MAX_DEPTH,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            max_inodes: DEFAULT_MAX_INODES,
            time_limit: None,
        }
    }
}

impl ImageOptions {
    /// Regular files up to this many bytes live in the image (inline after their inode
    /// where they fit) instead of the chunk store. Default 2048.
    pub fn with_inline_max(mut self, bytes: u64) -> Self {
        self.inline_max = bytes;
        self
    }

    /// The file system UUID. Default all zeroes.
    pub fn with_uuid(mut self, uuid: [u8; 16]) -> Self {
        self.uuid = uuid;
        self
    }

    /// Directories may nest this deep below the root; deeper ones fail the image with
    /// [`ImageError::TooDeep`]. Default [`DEFAULT_MAX_DEPTH`].
    pub fn with_max_depth(mut self, levels: u32) -> Self {
        self.max_depth = levels;
        self
    }

    /// The image file may be this large; a tree that needs more fails with
    /// [`ImageError::OverLimit`], found out before the file that crosses the limit is read.
    /// Default [`DEFAULT_MAX_IMAGE_BYTES`].
    pub fn with_max_image_bytes(mut self, bytes: u64) -> Self {
        self.max_image_bytes = bytes;
        self
    }

    /// The tree may hold this many inodes (memory is spent per inode). Default
    /// [`DEFAULT_MAX_INODES`].
    pub fn with_max_inodes(mut self, inodes: u64) -> Self {
        self.max_inodes = inodes;
        self
    }

    /// The walk and the chunking give up with [`ImageError::TimedOut`] once this long has
    /// passed since [`write_image`] started. Default: no limit.
    pub fn with_time_limit(mut self, limit: Duration) -> Self {
        self.time_limit = Some(limit);
        self
    }
}

/// What [`write_image`] wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageStats {
    /// Inodes in the image (hard links counted once).
    pub inodes: u64,
    /// Regular files stored as chunk-based inodes.
    pub chunked_files: u64,
    /// Chunks handed to the sink.
    pub chunks: u64,
    /// Chunks recorded as holes (never stored).
    pub hole_chunks: u64,
    /// Bytes of file data kept in the image itself.
    pub inline_bytes: u64,
    /// Distinct xattrs stored once in the shared xattr area (carried by several inodes).
    pub shared_xattrs: u64,
    /// Deepest directory nesting below the root.
    pub depth: u32,
    /// Size of the image file.
    pub image_bytes: u64,
}

/// An entry's xattrs: full names and values, sorted by name.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug)]
pub(crate) enum Body {
    Dir {
        entries: Vec<(Vec<u8>, usize)>,
        parent: usize,
    },
    /// `size` bytes at `at` in the spill file (a small file's data, a symlink's target).
    Spilled {
        at: u64,
    },
    /// `count` chunk indexes; the `stored` chunks that are not holes are listed as spill
    /// records (chunk number, device id, block address) from `at`, in chunk order.
    Chunked {
        count: u64,
        at: u64,
        stored: u64,
    },
    Empty,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) rdev: u64,
    pub(crate) size: u64,
    pub(crate) nlink: u32,
    pub(crate) xattrs: Xattrs,
    pub(crate) body: Body,
}

impl Node {
    fn new(st: &FileStat, xattrs: Xattrs, body: Body) -> Self {
        Self {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            rdev: st.st_rdev,
            size: 0,
            nlink: 1,
            xattrs,
            body,
        }
    }

    fn file_type(&self) -> u8 {
        match self.mode & libc::S_IFMT {
            libc::S_IFREG => format::FT_REG_FILE,
            libc::S_IFDIR => format::FT_DIR,
            libc::S_IFCHR => format::FT_CHRDEV,
            libc::S_IFBLK => format::FT_BLKDEV,
            libc::S_IFIFO => format::FT_FIFO,
            libc::S_IFSOCK => format::FT_SOCK,
            _ => format::FT_SYMLINK,
        }
    }
}

/// Size of one spill record of a stored chunk: chunk number (8), device id (2), pad (2),
/// block address (4).
pub(crate) const SPILL_CHUNK_RECORD: usize = 16;

/// An unnamed temporary file beside the image: file data and chunk addresses gathered
/// during the walk, read back while the image is written.
pub(crate) struct Spill {
    w: BufWriter<File>,
    pub(crate) len: u64,
    path: PathBuf,
}

impl Spill {
    pub(crate) fn create(dir: &Path) -> Result<Self, ImageError> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let raw = fcntl::open(
            dir,
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(io_err("create a spill file in", dir))?;
        // SAFETY: `raw` was just returned by open and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(raw) };
        Ok(Self {
            w: BufWriter::with_capacity(1 << 16, file),
            len: 0,
            path: dir.join("(spill file)"),
        })
    }

    pub(crate) fn append(&mut self, data: &[u8]) -> Result<u64, ImageError> {
        let at = self.len;
        self.w
            .write_all(data)
            .map_err(std_io_err("write", &self.path))?;
        self.len += data.len() as u64;
        Ok(at)
    }

    /// Everything appended, flushed, for positioned reads.
    pub(crate) fn finish(self) -> Result<SpillReader, ImageError> {
        let path = self.path;
        let file = self
            .w
            .into_inner()
            .map_err(|e| std_io_err("write", &path)(e.into_error()))?;
        Ok(SpillReader { file, path })
    }
}

pub(crate) struct SpillReader {
    file: File,
    path: PathBuf,
}

impl SpillReader {
    fn read(&self, buf: &mut [u8], at: u64) -> Result<(), ImageError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(std_io_err("read", &self.path))
    }
}

/// Writes an EROFS image of the tree at `root` into `out` (truncated first).
///
/// Symlinks are never followed: every entry is reached with `openat`/`fstatat` relative to
/// its already opened parent, with `O_NOFOLLOW`. Regular files larger than the inline limit
/// are cut into chunks of `sink.chunk_bits()`; all-zero chunks and holes become null chunk
/// addresses. Hard links within the tree share one inode. The limits of `options` are
/// checked as the walk goes, so a tree over one fails before most of its cost is paid.
pub fn write_image(
    root: &Path,
    out: &File,
    out_path: &Path,
    sink: &mut dyn ChunkSink,
    options: &ImageOptions,
) -> Result<ImageStats, ImageError> {
    let started = Instant::now();
    let chunk_bits = sink.chunk_bits();
    check_chunk_bits(chunk_bits, root)?;
    let spill = Spill::create(out_path.parent().unwrap_or(Path::new(".")))?;
    let mut walker = Walker {
        nodes: Vec::new(),
        links: HashMap::new(),
        sink,
        chunk_bits,
        options,
        deadline: options.time_limit.map(|l| started + l),
        index_bytes: 0,
        spill,
        buf: vec![0; 1 << chunk_bits],
        zeroes: vec![0; 1 << chunk_bits],
        stats: ImageStats::default(),
    };
    walker.walk(root)?;
    let devices = walker.sink.device_table();
    let layout = Layout {
        devices: &devices,
        options,
        chunk_bits,
        root,
        out,
        out_path,
    };
    let stats = layout.finish(&mut walker.nodes, walker.spill, walker.stats)?;
    tracing::debug!(root = %root.display(), image = %out_path.display(), ?stats, "wrote erofs image");
    Ok(stats)
}

/// Path that reaches `name` inside the open directory `dirfd` without resolving any
/// component but `name` itself, which the `l*xattr` calls do not follow.
fn proc_path(dirfd: RawFd, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{dirfd}/").into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn read_xattrs(at: &Path, shown: &Path) -> Result<Xattrs, ImageError> {
    let io = |op| {
        move |source| ImageError::Io {
            op,
            path: shown.to_path_buf(),
            source,
        }
    };
    let mut out = Vec::new();
    let names = match xattr::list(at) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(out),
        Err(e) => return Err(io("list xattrs of")(e)),
    };
    for name in names {
        let Some(value) = xattr::get(at, &name).map_err(io("read xattr of"))? else {
            continue;
        };
        let name = name.as_bytes().to_vec();
        let shown_name = || String::from_utf8_lossy(&name).into_owned();
        if format::xattr_name_index(&name).is_none() {
            return Err(ImageError::UnsupportedXattr {
                path: shown.to_path_buf(),
                name: shown_name(),
            });
        }
        if value.len() > usize::from(u16::MAX) {
            return Err(ImageError::XattrTooLarge {
                path: shown.to_path_buf(),
                name: shown_name(),
            });
        }
        out.push((name, value));
    }
    out.sort();
    Ok(out)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// The names in the open directory `dir` (without `.` and `..`), sorted.
fn dir_names(dir: &Dir, path: &Path) -> Result<Vec<Vec<u8>>, ImageError> {
    // Iterate a duplicate descriptor: `dir` stays the *at() base.
    let dup = unistd::dup(dir.as_raw_fd()).map_err(io_err("duplicate descriptor of", path))?;
    let mut it = Dir::from_fd(dup).map_err(io_err("read directory", path))?;
    let mut names = Vec::new();
    for entry in it.iter() {
        let entry = entry.map_err(io_err("read directory", path))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

/// A file's identity: device and inode numbers.
type FileId = (u64, u64);

/// A directory on the walk's path from the root: its node, identity, and the names in it
/// still to visit (in reverse order, popped from the end).
struct Frame {
    node: usize,
    id: FileId,
    names: Vec<Vec<u8>>,
}

struct Walker<'a> {
    nodes: Vec<Node>,
    links: HashMap<(u64, u64), usize>,
    sink: &'a mut dyn ChunkSink,
    chunk_bits: u8,
    options: &'a ImageOptions,
    deadline: Option<Instant>,
    /// Bytes of chunk indexes the image needs so far.
    index_bytes: u64,
    spill: Spill,
    buf: Vec<u8>,
    zeroes: Vec<u8>,
    stats: ImageStats,
}

impl Walker<'_> {
    fn add_entry(&mut self, dir: usize, name: Vec<u8>, child: usize) {
        if let Body::Dir { entries, .. } = &mut self.nodes[dir].body {
            entries.push((name, child));
        }
    }

    fn check_time(&self, path: &Path) -> Result<(), ImageError> {
        match (self.deadline, self.options.time_limit) {
            (Some(d), Some(limit)) if Instant::now() > d => Err(ImageError::TimedOut {
                path: path.to_path_buf(),
                limit,
            }),
            _ => Ok(()),
        }
    }

    fn push_node(&mut self, node: Node, path: &Path) -> Result<usize, ImageError> {
        if self.nodes.len() as u64 >= self.options.max_inodes {
            return Err(ImageError::OverLimit {
                path: path.to_path_buf(),
                what: "inodes in the layer",
                needed: self.nodes.len() as u64 + 1,
                limit: self.options.max_inodes,
            });
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    /// Walks the tree depth first without recursion, with one directory open at a time.
    fn walk(&mut self, root: &Path) -> Result<(), ImageError> {
        let mut cur = Dir::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_err("open directory", root))?;
        let st = stat::fstat(cur.as_raw_fd()).map_err(io_err("stat", root))?;
        let xattrs = read_xattrs(&proc_path(cur.as_raw_fd(), b"."), root)?;
        self.push_node(
            Node::new(
                &st,
                xattrs,
                Body::Dir {
                    entries: Vec::new(),
                    parent: 0,
                },
            ),
            root,
        )?;
        let mut path = root.to_path_buf();
        let mut names = dir_names(&cur, &path)?;
        names.reverse();
        let mut stack = vec![Frame {
            node: 0,
            id: (st.st_dev, st.st_ino),
            names,
        }];
        loop {
            let top = stack.last_mut().expect("the root frame is popped last");
            let Some(name) = top.names.pop() else {
                stack.pop();
                let Some(parent) = stack.last() else {
                    return Ok(());
                };
                // Back up through "..", which must be the directory we came down from.
                let up = Dir::openat(Some(cur.as_raw_fd()), "..", DIR_FLAGS, Mode::empty())
                    .map_err(io_err("open the parent of", &path))?;
                let ust = stat::fstat(up.as_raw_fd()).map_err(io_err("stat", &path))?;
                path.pop();
                if (ust.st_dev, ust.st_ino) != parent.id {
                    return Err(ImageError::Changed { path });
                }
                cur = up;
                continue;
            };
            let me = top.node;
            let entry_path = path.join(OsStr::from_bytes(&name));
            self.check_time(&entry_path)?;
            if let Some(child) = self.entry(&cur, me, name, &entry_path)? {
                if stack.len() as u32 > self.options.max_depth {
                    return Err(ImageError::TooDeep {
                        path: entry_path,
                        limit: self.options.max_depth,
                    });
                }
                self.stats.depth = self.stats.depth.max(stack.len() as u32);
                let (dir, id) = child;
                path = entry_path;
                let mut names = dir_names(&dir, &path)?;
                names.reverse();
                let node = self.nodes.len() - 1;
                stack.push(Frame { node, id, names });
                cur = dir;
            }
        }
    }

    /// Adds entry `name` of the open directory `dir` (node `me`); a directory comes back
    /// opened, with its identity, for the walk to go into.
    fn entry(
        &mut self,
        dir: &Dir,
        me: usize,
        name: Vec<u8>,
        path: &Path,
    ) -> Result<Option<(Dir, FileId)>, ImageError> {
        let fd = dir.as_raw_fd();
        if name.len() > format::NAME_LEN {
            return Err(ImageError::NameTooLong {
                path: path.to_path_buf(),
            });
        }
        let cname = OsStr::from_bytes(&name);
        let st = stat::fstatat(Some(fd), cname, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(io_err("stat", path))?;
        let kind = st.st_mode & libc::S_IFMT;
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            if let Some(&existing) = self.links.get(&(st.st_dev, st.st_ino)) {
                self.nodes[existing].nlink += 1;
                self.add_entry(me, name, existing);
                return Ok(None);
            }
        }
        let xattrs = read_xattrs(&proc_path(fd, &name), path)?;
        let mut opened = None;
        let idx = match kind {
            libc::S_IFDIR => {
                let child = Dir::openat(Some(fd), cname, DIR_FLAGS, Mode::empty())
                    .map_err(io_err("open directory", path))?;
                let cst = stat::fstat(child.as_raw_fd()).map_err(io_err("stat", path))?;
                if (cst.st_dev, cst.st_ino) != (st.st_dev, st.st_ino) {
                    return Err(ImageError::Changed {
                        path: path.to_path_buf(),
                    });
                }
                opened = Some((child, (cst.st_dev, cst.st_ino)));
                self.push_node(
                    Node::new(
                        &st,
                        xattrs,
                        Body::Dir {
                            entries: Vec::new(),
                            parent: me,
                        },
                    ),
                    path,
                )?
            }
            libc::S_IFREG => {
                let raw = fcntl::openat(
                    Some(fd),
                    cname,
                    OFlag::O_RDONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_NONBLOCK
                        | OFlag::O_NOCTTY
                        | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(io_err("open", path))?;
                // SAFETY: `raw` was just returned by openat and is owned by nothing else.
                let file = unsafe { File::from_raw_fd(raw) };
                let fst = stat::fstat(file.as_raw_fd()).map_err(io_err("stat", path))?;
                if (fst.st_dev, fst.st_ino, fst.st_mode) != (st.st_dev, st.st_ino, st.st_mode) {
                    return Err(ImageError::Changed {
                        path: path.to_path_buf(),
                    });
                }
                let size = fst.st_size as u64;
                let body = if size == 0 {
                    Body::Empty
                } else if size <= self.options.inline_max {
                    let mut data = vec![0; size as usize];
                    file.read_exact_at(&mut data, 0)
                        .map_err(|_| ImageError::Changed {
                            path: path.to_path_buf(),
                        })?;
                    self.stats.inline_bytes += size;
                    Body::Spilled {
                        at: self.spill.append(&data)?,
                    }
                } else {
                    self.stats.chunked_files += 1;
                    self.chunk_file(&file, size, path)?
                };
                let end = stat::fstat(file.as_raw_fd()).map_err(io_err("stat", path))?;
                if end.st_size as u64 != size {
                    return Err(ImageError::Changed {
                        path: path.to_path_buf(),
                    });
                }
                let mut node = Node::new(&st, xattrs, body);
                node.size = size;
                self.push_node(node, path)?
            }
            libc::S_IFLNK => {
                let target =
                    fcntl::readlinkat(Some(fd), cname).map_err(io_err("read symlink", path))?;
                let target = target.as_bytes();
                let mut node = Node::new(
                    &st,
                    xattrs,
                    Body::Spilled {
                        at: self.spill.append(target)?,
                    },
                );
                node.size = target.len() as u64;
                self.push_node(node, path)?
            }
            _ => self.push_node(Node::new(&st, xattrs, Body::Empty), path)?,
        };
        self.add_entry(me, name, idx);
        if kind != libc::S_IFDIR && st.st_nlink > 1 {
            self.links.insert((st.st_dev, st.st_ino), idx);
        }
        Ok(opened)
    }

    /// Stores the chunks of `file` that hold data; chunks inside holes (found with
    /// `SEEK_DATA`/`SEEK_HOLE`, never read) and all-zero chunks become null indexes.
    fn chunk_file(&mut self, file: &File, size: u64, path: &Path) -> Result<Body, ImageError> {
        let chunk = 1u64 << self.chunk_bits;
        let count = size.div_ceil(chunk);
        self.index_bytes += count * format::CHUNK_INDEX_SIZE as u64;
        if self.index_bytes > self.options.max_image_bytes {
            return Err(ImageError::OverLimit {
                path: path.to_path_buf(),
                what: "bytes of image (chunk indexes, holes included)",
                needed: self.index_bytes,
                limit: self.options.max_image_bytes,
            });
        }
        let at = self.spill.len;
        let mut stored = 0u64;
        let mut next = 0u64; // first chunk not yet looked at
        let fd = file.as_raw_fd();
        while next < count {
            let data = match unistd::lseek(fd, (next * chunk) as i64, Whence::SeekData) {
                Ok(d) => d as u64,
                Err(Errno::ENXIO) => break,
                Err(e) => return Err(io_err("seek in", path)(e)),
            };
            if data >= size {
                break;
            }
            let hole = match unistd::lseek(fd, data as i64, Whence::SeekHole) {
                Ok(h) => (h as u64).min(size),
                Err(Errno::ENXIO) => size,
                Err(e) => return Err(io_err("seek in", path)(e)),
            };
            let first = (data / chunk).max(next);
            let last = hole.div_ceil(chunk).max(first + 1).min(count);
            for i in first..last {
                if (i - first) % 256 == 0 {
                    self.check_time(path)?;
                }
                let off = i * chunk;
                let len = chunk.min(size - off) as usize;
                let buf = &mut self.buf[..len];
                file.read_exact_at(buf, off)
                    .map_err(|_| ImageError::Changed {
                        path: path.to_path_buf(),
                    })?;
                if buf[..] == self.zeroes[..len] {
                    continue;
                }
                let loc = self
                    .sink
                    .put_chunk(buf)
                    .map_err(|source| ImageError::Store {
                        path: path.to_path_buf(),
                        source,
                    })?;
                self.stats.chunks += 1;
                stored += 1;
                let mut rec = [0u8; SPILL_CHUNK_RECORD];
                rec[..8].copy_from_slice(&i.to_le_bytes());
                rec[8..10].copy_from_slice(&loc.device_id.to_le_bytes());
                rec[12..16].copy_from_slice(&loc.blkaddr.to_le_bytes());
                self.spill.append(&rec)?;
            }
            next = last;
        }
        self.stats.hole_chunks += count - stored;
        Ok(Body::Chunked { count, at, stored })
    }
}

/// Where and how one inode is laid out.
#[derive(Debug, Default, Clone)]
struct Placement {
    pos: u64,
    compact: bool,
    layout: u16,
    xattr_body: Vec<u8>,
    /// Bytes stored after the inode and its xattrs (inline tail).
    tail: u64,
    /// Whole data blocks in the image.
    blocks: u64,
    startblk: u64,
}

/// Splits sorted directory entries (name lengths) into blocks; returns the first entry
/// index of each block and the directory's size.
fn pack_dir(names: &[&[u8]]) -> (Vec<usize>, u64) {
    let mut starts = Vec::new();
    let mut used = 0usize;
    for (i, n) in names.iter().enumerate() {
        let need = format::DIRENT_SIZE + n.len();
        if starts.is_empty() || used + need > BLOCK_SIZE as usize {
            starts.push(i);
            used = 0;
        }
        used += need;
    }
    let size = (starts.len() as u64 - 1) * BLOCK_SIZE + used as u64;
    (starts, size)
}

/// Appends one xattr entry (4-byte aligned) to `out`.
fn push_xattr_entry(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let Some((index, suffix)) = format::xattr_name_index(name) else {
        return; // rejected by read_xattrs
    };
    let start = out.len();
    out.extend_from_slice(&[suffix.len() as u8, index]);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(suffix);
    out.extend_from_slice(value);
    let end = start + align_up((out.len() - start) as u64, 4) as usize;
    out.resize(end, 0);
}

/// Shared xattrs: (name, value) pairs several inodes carry, stored once at `xattr_blkaddr`
/// and referenced by id (offset / 4) from each inode.
#[derive(Debug, Default)]
struct SharedXattrs {
    area: Vec<u8>,
    ids: HashMap<(Vec<u8>, Vec<u8>), u32>,
}

impl SharedXattrs {
    fn build(nodes: &[Node]) -> Self {
        let mut counts: HashMap<(&[u8], &[u8]), u32> = HashMap::new();
        for n in nodes {
            for (k, v) in &n.xattrs {
                *counts.entry((k.as_slice(), v.as_slice())).or_default() += 1;
            }
        }
        let mut shared: Vec<_> = counts
            .into_iter()
            .filter(|&(_, c)| c > 1)
            .map(|(p, _)| p)
            .collect();
        shared.sort();
        let mut out = Self::default();
        for (k, v) in shared {
            let id = (out.area.len() / 4) as u32;
            push_xattr_entry(&mut out.area, k, v);
            out.ids.insert((k.to_vec(), v.to_vec()), id);
        }
        out
    }
}

/// The inline xattr body of an inode: header, shared xattr ids, inline entries.
fn xattr_body(xattrs: &[(Vec<u8>, Vec<u8>)], shared: &SharedXattrs) -> Vec<u8> {
    if xattrs.is_empty() {
        return Vec::new();
    }
    let mut ids = Vec::new();
    let mut inline = Vec::new();
    for (name, value) in xattrs {
        // h_shared_count is one byte
        match shared.ids.get(&(name.clone(), value.clone())) {
            Some(&id) if ids.len() < usize::from(u8::MAX) => ids.push(id),
            _ => push_xattr_entry(&mut inline, name, value),
        }
    }
    let mut body = vec![0u8; format::XATTR_IBODY_HEADER_SIZE];
    body[4] = ids.len() as u8;
    for id in ids {
        body.extend_from_slice(&id.to_le_bytes());
    }
    body.extend_from_slice(&inline);
    body
}

/// The image file, written front to back.
struct Out<'a> {
    w: BufWriter<&'a File>,
    pos: u64,
    path: &'a Path,
}

impl Out<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), ImageError> {
        self.w
            .write_all(data)
            .map_err(std_io_err("write", self.path))?;
        self.pos += data.len() as u64;
        Ok(())
    }

    /// Zeroes up to `off`.
    fn pad_to(&mut self, off: u64) -> Result<(), ImageError> {
        debug_assert!(off >= self.pos, "image written out of order");
        const ZEROES: [u8; 4096] = [0; 4096];
        while self.pos < off {
            let n = (off - self.pos).min(ZEROES.len() as u64) as usize;
            self.write(&ZEROES[..n])?;
        }
        Ok(())
    }
}

/// The bytes of a directory: blocks of dirents, each block's names after its dirents.
fn dir_data(
    entries: &[(Vec<u8>, usize)],
    nodes: &[Node],
    place: &[Placement],
    nid: impl Fn(&Placement) -> u64,
    size: u64,
) -> Vec<u8> {
    let bs = BLOCK_SIZE as usize;
    let names: Vec<&[u8]> = entries.iter().map(|(n, _)| n.as_slice()).collect();
    let (starts, _) = pack_dir(&names);
    let mut out = Vec::with_capacity(size as usize);
    for (b, &start) in starts.iter().enumerate() {
        let end = starts.get(b + 1).copied().unwrap_or(entries.len());
        let mut blk = vec![0u8; bs];
        let mut nameoff = (end - start) * format::DIRENT_SIZE;
        for (j, (name, child)) in entries[start..end].iter().enumerate() {
            let mut d = Le(&mut blk[j * format::DIRENT_SIZE..]);
            d.u64(0, nid(&place[*child]));
            d.u16(8, nameoff as u16);
            d.u8(10, nodes[*child].file_type());
            blk[nameoff..nameoff + name.len()].copy_from_slice(name);
            nameoff += name.len();
        }
        if end == entries.len() {
            blk.truncate(nameoff);
        }
        out.extend_from_slice(&blk);
    }
    debug_assert_eq!(out.len() as u64, size);
    out
}

/// The chunk size must be a whole number of blocks, below 2^43 bytes.
pub(crate) fn check_chunk_bits(chunk_bits: u8, root: &Path) -> Result<(), ImageError> {
    if (format::BLOCK_BITS..=format::BLOCK_BITS + 31).contains(&chunk_bits) {
        return Ok(());
    }
    Err(ImageError::TooLarge {
        path: root.to_path_buf(),
        what: "chunk size must be a block size multiple below 2^43",
    })
}

/// Where and how a tree of nodes becomes an image file.
pub(crate) struct Layout<'a> {
    pub(crate) devices: &'a [DeviceSlot],
    pub(crate) options: &'a ImageOptions,
    pub(crate) chunk_bits: u8,
    /// Names the source in errors.
    pub(crate) root: &'a Path,
    pub(crate) out: &'a File,
    pub(crate) out_path: &'a Path,
}

impl Layout<'_> {
    /// Truncates the image file, writes `nodes` into it with the data gathered in `spill`,
    /// and completes `stats` (image size, inodes).
    pub(crate) fn finish(
        &self,
        nodes: &mut [Node],
        spill: Spill,
        mut stats: ImageStats,
    ) -> Result<ImageStats, ImageError> {
        let spill = spill.finish()?;
        self.out
            .set_len(0)
            .map_err(std_io_err("truncate", self.out_path))?;
        stats.image_bytes = write_layout(
            nodes,
            self.devices,
            self.options,
            self.chunk_bits,
            self.root,
            &spill,
            self.out,
            self.out_path,
            &mut stats,
        )?;
        stats.inodes = nodes.len() as u64;
        Ok(stats)
    }
}

/// Lays the nodes out and streams the image into `out`; returns its size.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_layout(
    nodes: &mut [Node],
    devices: &[DeviceSlot],
    options: &ImageOptions,
    chunk_bits: u8,
    root: &Path,
    spill: &SpillReader,
    out_file: &File,
    out_path: &Path,
    stats: &mut ImageStats,
) -> Result<u64, ImageError> {
    let too_large = |what| ImageError::TooLarge {
        path: root.to_path_buf(),
        what,
    };
    let bs = BLOCK_SIZE;
    let devt_off = format::SUPER_OFFSET + format::SUPER_SIZE;
    if devt_off + devices.len() * format::DEVT_SLOT_SIZE > bs as usize {
        return Err(too_large("more devices than fit in block 0"));
    }

    // Directories: add "." and "..", sort, count links and sizes.
    let mut subdirs = vec![0u32; nodes.len()];
    for (i, node) in nodes.iter_mut().enumerate() {
        if let Body::Dir { entries, parent } = &mut node.body {
            let parent = *parent;
            entries.push((b".".to_vec(), i));
            entries.push((b"..".to_vec(), parent));
            entries.sort();
            if i != 0 {
                subdirs[parent] += 1;
            }
        }
    }
    for (i, node) in nodes.iter_mut().enumerate() {
        if let Body::Dir { entries, .. } = &node.body {
            node.nlink = 2 + subdirs[i];
            let names: Vec<&[u8]> = entries.iter().map(|(n, _)| n.as_slice()).collect();
            node.size = pack_dir(&names).1;
        }
    }
    drop(subdirs);

    // Compact inodes take their mtime from the superblock: pick the most common one.
    let mut times: HashMap<(i64, u32), u64> = HashMap::new();
    for n in nodes.iter().filter(|n| n.mtime >= 0) {
        *times.entry((n.mtime, n.mtime_nsec)).or_default() += 1;
    }
    let (build_time, build_nsec) = times
        .into_iter()
        .max_by_key(|&(t, c)| (c, std::cmp::Reverse(t)))
        .map(|(t, _)| t)
        .unwrap_or((0, 0));

    let shared = SharedXattrs::build(nodes);
    stats.shared_xattrs = shared.ids.len() as u64;
    let xattr_blkaddr = if shared.area.is_empty() { 0 } else { 1u64 };
    let meta_blkaddr = 1 + align_up(shared.area.len() as u64, bs) / bs;
    let meta_start = meta_blkaddr * bs;
    // Slot 0 stays empty: no inode gets nid 0 (readdir skips entries whose inode number is 0).
    let mut pos = meta_start + format::INODE_SLOT_SIZE;
    let mut place = Vec::with_capacity(nodes.len());
    let mut chunked = false;
    for n in nodes.iter() {
        let mut p = Placement {
            compact: n.uid <= u16::MAX.into()
                && n.gid <= u16::MAX.into()
                && n.nlink <= u16::MAX.into()
                && n.size <= u32::MAX.into()
                && (n.mtime, n.mtime_nsec) == (build_time, build_nsec),
            xattr_body: xattr_body(&n.xattrs, &shared),
            ..Default::default()
        };
        let isize = if p.compact {
            format::COMPACT_INODE_SIZE
        } else {
            format::EXTENDED_INODE_SIZE
        } as u64;
        let head = isize + p.xattr_body.len() as u64;
        pos = align_up(pos, format::INODE_SLOT_SIZE);
        let need = match &n.body {
            Body::Chunked { count, .. } => {
                chunked = true;
                p.layout = format::LAYOUT_CHUNK_BASED;
                align_up(pos + head, format::CHUNK_INDEX_SIZE as u64) - pos
                    + count * format::CHUNK_INDEX_SIZE as u64
            }
            _ if n.size == 0 => {
                p.layout = format::LAYOUT_FLAT_PLAIN;
                head
            }
            _ => {
                let tail = n.size % bs;
                if tail != 0 && head + tail <= bs {
                    p.layout = format::LAYOUT_FLAT_INLINE;
                    p.tail = tail;
                    p.blocks = n.size / bs;
                    if pos % bs + head + tail > bs {
                        pos = align_up(pos, bs);
                    }
                } else {
                    p.layout = format::LAYOUT_FLAT_PLAIN;
                    p.blocks = n.size.div_ceil(bs);
                }
                head + p.tail
            }
        };
        p.pos = pos;
        pos += need;
        place.push(p);
    }
    let nid = |p: &Placement| (p.pos - meta_start) / format::INODE_SLOT_SIZE;
    if nid(&place[0]) > u16::MAX.into() {
        return Err(too_large("root inode beyond nid 65535"));
    }
    let mut next_block = align_up(pos, bs) / bs;
    for p in place.iter_mut().filter(|p| p.blocks > 0) {
        p.startblk = next_block;
        next_block += p.blocks;
    }
    if next_block > u32::MAX.into() {
        return Err(too_large("image over 2^32 blocks"));
    }
    let image_bytes = next_block * bs;
    if image_bytes > options.max_image_bytes {
        return Err(ImageError::OverLimit {
            path: root.to_path_buf(),
            what: "bytes of image",
            needed: image_bytes,
            limit: options.max_image_bytes,
        });
    }

    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, out_file),
        pos: 0,
        path: out_path,
    };
    // Block 0: superblock and device table.
    let mut block0 = vec![0u8; bs as usize];
    let mut incompat = 0;
    if chunked {
        incompat |= format::FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    if !devices.is_empty() {
        incompat |= format::FEATURE_INCOMPAT_DEVICE_TABLE;
    }
    format::SuperBlock {
        root_nid: nid(&place[0]) as u16,
        inos: nodes.len() as u64,
        build_time: build_time as u64,
        build_time_nsec: build_nsec,
        blocks: next_block as u32,
        meta_blkaddr: meta_blkaddr as u32,
        xattr_blkaddr: xattr_blkaddr as u32,
        uuid: options.uuid,
        volume_name: [0; 16],
        feature_incompat: incompat,
        extra_devices: devices.len() as u16,
        devt_slotoff: (devt_off / format::DEVT_SLOT_SIZE) as u16,
    }
    .encode(&mut block0[format::SUPER_OFFSET..]);
    for (i, d) in devices.iter().enumerate() {
        let off = devt_off + i * format::DEVT_SLOT_SIZE;
        format::encode_device_slot(
            &mut block0[off..off + format::DEVT_SLOT_SIZE],
            &d.tag,
            d.blocks,
        );
    }
    out.write(&block0)?;
    drop(block0);
    if xattr_blkaddr != 0 {
        out.pad_to(xattr_blkaddr * bs)?;
        out.write(&shared.area)?;
    }

    // Inodes, with their xattrs and inline tails or chunk indexes.
    let mut scratch = vec![0u8; 1 << 16];
    for (i, (n, p)) in nodes.iter().zip(place.iter()).enumerate() {
        out.pad_to(p.pos)?;
        let isize = if p.compact {
            format::COMPACT_INODE_SIZE
        } else {
            format::EXTENDED_INODE_SIZE
        };
        let i_u = match &n.body {
            Body::Chunked { .. } => {
                u32::from(
                    u16::from(chunk_bits - format::BLOCK_BITS) & format::CHUNK_FORMAT_BLKBITS_MASK,
                ) | u32::from(format::CHUNK_FORMAT_INDEXES)
            }
            _ if matches!(n.mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) => {
                format::encode_dev(libc::major(n.rdev), libc::minor(n.rdev))
            }
            _ => p.startblk as u32,
        };
        let icount = if p.xattr_body.is_empty() {
            0
        } else {
            1 + (p.xattr_body.len() - format::XATTR_IBODY_HEADER_SIZE) / 4
        };
        if icount > u16::MAX.into() {
            return Err(too_large("xattrs of one inode over 256 KiB"));
        }
        let ino = (i + 1) as u32;
        let mut inode = [0u8; format::EXTENDED_INODE_SIZE];
        {
            let mut b = Le(&mut inode[..isize]);
            b.u16(0, u16::from(!p.compact) | (p.layout << 1));
            b.u16(2, icount as u16);
            b.u16(4, n.mode as u16);
            if p.compact {
                b.u16(6, n.nlink as u16);
                b.u32(8, n.size as u32);
                b.u32(12, 0);
                b.u32(16, i_u);
                b.u32(20, ino);
                b.u16(24, n.uid as u16);
                b.u16(26, n.gid as u16);
            } else {
                b.u16(6, 0);
                b.u64(8, n.size);
                b.u32(16, i_u);
                b.u32(20, ino);
                b.u32(24, n.uid);
                b.u32(28, n.gid);
                b.u64(32, n.mtime as u64);
                b.u32(40, n.mtime_nsec);
                b.u32(44, n.nlink);
            }
        }
        out.write(&inode[..isize])?;
        out.write(&p.xattr_body)?;
        match &n.body {
            Body::Chunked { count, at, stored } => {
                out.pad_to(align_up(out.pos, format::CHUNK_INDEX_SIZE as u64))?;
                write_chunk_indexes(&mut out, spill, *count, *at, *stored, &mut scratch)?;
            }
            Body::Dir { entries, .. } if p.tail > 0 => {
                let data = dir_data(entries, nodes, &place, nid, n.size);
                out.write(&data[(p.blocks * bs) as usize..])?;
            }
            Body::Spilled { at } if p.tail > 0 => {
                let tail = &mut scratch[..p.tail as usize];
                spill.read(tail, at + p.blocks * bs)?;
                out.write(tail)?;
            }
            _ => {}
        }
    }

    // Whole data blocks.
    for (n, p) in nodes.iter().zip(place.iter()).filter(|(_, p)| p.blocks > 0) {
        out.pad_to(p.startblk * bs)?;
        let full = (p.blocks * bs).min(n.size);
        match &n.body {
            Body::Dir { entries, .. } => {
                let data = dir_data(entries, nodes, &place, nid, n.size);
                out.write(&data[..full as usize])?;
            }
            Body::Spilled { at } => {
                let mut done = 0;
                while done < full {
                    let k = (full - done).min(scratch.len() as u64) as usize;
                    spill.read(&mut scratch[..k], at + done)?;
                    out.write(&scratch[..k])?;
                    done += k as u64;
                }
            }
            _ => {}
        }
    }
    out.pad_to(image_bytes)?;
    out.w.flush().map_err(std_io_err("write", out_path))?;
    stats.inodes = nodes.len() as u64;
    Ok(out.pos)
}

/// Writes `count` chunk indexes: the `stored` spill records from `at` where they say, null
/// indexes between them.
fn write_chunk_indexes(
    out: &mut Out<'_>,
    spill: &SpillReader,
    count: u64,
    at: u64,
    stored: u64,
    scratch: &mut [u8],
) -> Result<(), ImageError> {
    const BATCH: usize = 1024;
    let mut records = vec![0u8; BATCH * SPILL_CHUNK_RECORD];
    let (mut have, mut used, mut read) = (0usize, 0usize, 0u64);
    let per = scratch.len() / format::CHUNK_INDEX_SIZE;
    let mut k = 0u64;
    while k < count {
        let n = (count - k).min(per as u64) as usize;
        for (j, slot) in scratch[..n * format::CHUNK_INDEX_SIZE]
            .chunks_exact_mut(format::CHUNK_INDEX_SIZE)
            .enumerate()
        {
            if used == have && read < stored {
                let take = (stored - read).min(BATCH as u64) as usize;
                spill.read(
                    &mut records[..take * SPILL_CHUNK_RECORD],
                    at + read * SPILL_CHUNK_RECORD as u64,
                )?;
                read += take as u64;
                have = take;
                used = 0;
            }
            let chunk_no = k + j as u64;
            let rec = &records[used.min(BATCH - 1) * SPILL_CHUNK_RECORD..][..SPILL_CHUNK_RECORD];
            let (dev, blk) = if used < have
                && u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) == chunk_no
            {
                used += 1;
                (
                    u16::from_le_bytes([rec[8], rec[9]]),
                    u32::from_le_bytes(rec[12..16].try_into().expect("4 bytes")),
                )
            } else {
                (0, format::NULL_ADDR)
            };
            format::encode_chunk_index(slot, dev, blk);
        }
        out.write(&scratch[..n * format::CHUNK_INDEX_SIZE])?;
        k += n as u64;
    }
    debug_assert_eq!((used, read), (have, stored));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entries_fill_blocks_without_splitting_one() {
        let long = vec![b'n'; 255];
        // 12 + 255 = 267 bytes each: 15 fit in a 4096-byte block, the 16th starts the next.
        let names: Vec<&[u8]> = (0..16).map(|_| long.as_slice()).collect();
        let (starts, size) = pack_dir(&names);
        assert_eq!(starts, vec![0, 15]);
        assert_eq!(size, BLOCK_SIZE + 267);
        let (starts, size) = pack_dir(&[b".", b".."]);
        assert_eq!((starts, size), (vec![0], 12 + 1 + 12 + 2));
    }

    #[test]
    fn xattr_entries_are_four_byte_aligned() {
        let body = xattr_body(
            &[
                (b"user.a".to_vec(), b"xyz".to_vec()),
                (b"security.capability".to_vec(), vec![1; 20]),
            ],
            &SharedXattrs::default(),
        );
        // header 12; "a"+"xyz": 4+1+3 = 8; "capability"+20: 4+10+20 = 34 -> 36
        assert_eq!(body.len(), 12 + 8 + 36);
        assert_eq!(&body[12..16], &[1, 1, 3, 0]);
        assert_eq!(&body[20..24], &[10, 6, 20, 0]);
    }
}

//! EROFS image writer: walks a directory tree without following symlinks and writes an
//! EROFS metadata image whose large files are chunk-based, their chunks stored through a
//! [`crate::ChunkSink`] (the host-wide [`crate::ChunkStore`]) and addressed by device id.
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
//!
//! - `walk`: [`write_image`], the walk of a directory tree into nodes;
//! - `spill`: the spill file the walk's data goes to;
//! - `layout`: nodes laid out and streamed into the image file (shared with the archive
//!   and merge writers).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::stat::FileStat;

use crate::format;
use crate::store::StoreError;

mod layout;
mod spill;
mod walk;

pub(crate) use layout::Layout;
pub(crate) use spill::{Spill, SPILL_CHUNK_RECORD};
pub use walk::write_image;

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

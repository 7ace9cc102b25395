//! [`write_image`]: the walk of a directory tree, without following symlinks and with one
//! directory open at a time, into the nodes of an image; large files are cut into chunks
//! for the [`ChunkSink`] on the way.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, Mode};
use nix::unistd::{self, Whence};

use super::layout::Layout;
use super::spill::{Spill, SPILL_CHUNK_RECORD};
use super::{check_chunk_bits, io_err, Body, ImageError, ImageOptions, ImageStats, Node, Xattrs};
use crate::format;
use crate::store::ChunkSink;

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

//! One EROFS image presenting a stack of layer images as overlayfs would show them.
//!
//! [`write_merged_image`] reads the layers' images (never their file data), applies each
//! layer over the ones below it the way overlayfs does, and writes one metadata image of the
//! flattened tree:
//!
//! - a whiteout (a character device 0:0) deletes the name from the layers below, and is not
//!   in the result;
//! - a directory marked opaque (`trusted.overlay.opaque=y`) hides everything below it; the
//!   mark is not in the result;
//! - a directory over a directory merges, its attributes and xattrs the upper one's;
//! - anything else replaces what was below it (a directory over a file, a file over a
//!   directory's whole subtree);
//! - hard links within a layer stay one inode.
//!
//! A chunk-based file keeps its chunk indexes as they are: its data stays in the chunk store
//! where the layer put it, so the merged image costs metadata only. Small files and symlink
//! targets (kept in the layer images themselves) are copied. The chunks belong to the layers
//! of the stack: the merged image must be dropped before any of them is removed from the
//! store (a parent layer cannot be removed before its children, so a merged image kept with
//! the top layer is safe).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::time::Instant;

use crate::format::{self, DeviceSlot};
use crate::reader::{Image, Inode};
use crate::writer::{
    Body, ImageError, ImageOptions, ImageStats, Layout, Node, Spill, SPILL_CHUNK_RECORD,
};

/// The xattr overlayfs marks an opaque directory with (containerd's applier writes it).
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

/// A node of a tree being built (merged, or read from an archive), with the names of a
/// directory's entries.
pub(crate) struct MNode {
    pub(crate) node: Node,
    pub(crate) children: BTreeMap<Vec<u8>, usize>,
}

struct Merger<'a> {
    nodes: Vec<MNode>,
    spill: Spill,
    options: &'a ImageOptions,
    started: Instant,
    chunk_bits: Option<u8>,
    index_bytes: u64,
    stats: ImageStats,
}

/// Writes into `out` (truncated first) one image of `layers` (paths of images this crate
/// wrote, the bottom layer first) merged as overlayfs merges its lower dirs. The result's
/// device table is the layers' (each slot as large as the largest of them says), so it is
/// mounted with the same devices. `options`' limits (inodes, depth, image bytes, time) apply
/// to the merged tree.
pub fn write_merged_image(
    layers: &[&Path],
    out: &File,
    out_path: &Path,
    options: &ImageOptions,
) -> Result<ImageStats, ImageError> {
    let Some(top) = layers.last() else {
        return Err(ImageError::TooLarge {
            path: out_path.to_path_buf(),
            what: "no layers to merge",
        });
    };
    let mut m = Merger {
        nodes: Vec::new(),
        spill: Spill::create(out_path.parent().unwrap_or(Path::new(".")))?,
        options,
        started: Instant::now(),
        chunk_bits: None,
        index_bytes: 0,
        stats: ImageStats::default(),
    };
    let mut devices: Vec<DeviceSlot> = Vec::new();
    for path in layers {
        let img = Image::open(path)?;
        for (i, d) in img.devices().iter().enumerate() {
            match devices.get_mut(i) {
                Some(slot) if slot.tag != d.tag => {
                    return Err(ImageError::Mismatch {
                        path: path.to_path_buf(),
                        what: "its device table names other devices",
                    })
                }
                Some(slot) => slot.blocks = slot.blocks.max(d.blocks),
                None => devices.push(d.clone()),
            }
        }
        m.apply(&img)?;
    }
    let chunk_bits = m.chunk_bits.unwrap_or(format::BLOCK_BITS);
    let mut nodes = m.flatten(top)?;
    let layout = Layout {
        devices: &devices,
        options,
        chunk_bits,
        root: top,
        out,
        out_path,
    };
    let stats = layout.finish(&mut nodes, m.spill, m.stats)?;
    tracing::debug!(layers = layers.len(), image = %out_path.display(), ?stats, "wrote merged erofs image");
    Ok(stats)
}

impl Merger<'_> {
    fn check_time(&self, img: &Image) -> Result<(), ImageError> {
        match self.options.time_limit {
            Some(limit) if self.started.elapsed() > limit => Err(ImageError::TimedOut {
                path: img.path().to_path_buf(),
                limit,
            }),
            _ => Ok(()),
        }
    }

    fn push(&mut self, node: Node, img: &Image) -> Result<usize, ImageError> {
        if self.nodes.len() as u64 >= self.options.max_inodes {
            return Err(ImageError::OverLimit {
                path: img.path().to_path_buf(),
                what: "inodes in the merged tree",
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

    /// A node for `ino` of `img`, its data (small file, symlink target) or chunk indexes
    /// copied into the spill file.
    fn load(&mut self, img: &Image, ino: &Inode) -> Result<Node, ImageError> {
        let body = match ino.kind() {
            libc::S_IFDIR => Body::Dir {
                entries: Vec::new(),
                parent: 0,
            },
            libc::S_IFREG if ino.size == 0 => Body::Empty,
            libc::S_IFREG if ino.chunk_bits().is_some() => self.load_chunks(img, ino)?,
            libc::S_IFREG | libc::S_IFLNK => {
                let data = img.flat_data(ino, 1 << 20)?;
                Body::Spilled {
                    at: self.spill.append(&data)?,
                }
            }
            _ => Body::Empty,
        };
        let attrs = |xattrs| Node {
            mode: ino.mode,
            uid: ino.uid,
            gid: ino.gid,
            mtime: ino.mtime,
            mtime_nsec: ino.mtime_nsec,
            rdev: ino.rdev,
            size: if ino.kind() == libc::S_IFDIR {
                0
            } else {
                ino.size
            },
            // As overlayfs reports a lower file's: the layer's own count, even where a
            // layer above deleted one of its names.
            nlink: ino.nlink,
            xattrs,
            body,
        };
        Ok(attrs(visible_xattrs(&ino.xattrs)))
    }

    fn load_chunks(&mut self, img: &Image, ino: &Inode) -> Result<Body, ImageError> {
        let bits = ino.chunk_bits().expect("a chunk-based inode");
        match self.chunk_bits {
            Some(b) if b != bits => {
                return Err(ImageError::Mismatch {
                    path: img.path().to_path_buf(),
                    what: "its files are cut into chunks of another size",
                })
            }
            _ => self.chunk_bits = Some(bits),
        }
        let count = ino.size.div_ceil(1u64 << bits);
        self.index_bytes += count * format::CHUNK_INDEX_SIZE as u64;
        if self.index_bytes > self.options.max_image_bytes {
            return Err(ImageError::OverLimit {
                path: img.path().to_path_buf(),
                what: "bytes of merged image (chunk indexes, holes included)",
                needed: self.index_bytes,
                limit: self.options.max_image_bytes,
            });
        }
        let at = self.spill.len;
        let mut stored = 0u64;
        let spill = &mut self.spill;
        img.chunks(ino, |chunk_no, dev, blk| {
            let mut rec = [0u8; SPILL_CHUNK_RECORD];
            rec[..8].copy_from_slice(&chunk_no.to_le_bytes());
            rec[8..10].copy_from_slice(&dev.to_le_bytes());
            rec[12..16].copy_from_slice(&blk.to_le_bytes());
            spill.append(&rec)?;
            stored += 1;
            Ok(())
        })?;
        Ok(Body::Chunked { count, at, stored })
    }

    /// Applies layer `img` over the tree merged so far, without recursion.
    fn apply(&mut self, img: &Image) -> Result<(), ImageError> {
        let root = img.inode(img.root_nid())?;
        if root.kind() != libc::S_IFDIR {
            return Err(ImageError::Corrupt {
                path: img.path().to_path_buf(),
                what: "its root is not a directory",
            });
        }
        if self.nodes.is_empty() {
            let node = self.load(img, &root)?;
            self.push(node, img)?;
        }
        // Hard links of this layer: nid -> node.
        let mut links: HashMap<u64, usize> = HashMap::new();
        // (merged directory, its inode in this layer, depth)
        let mut stack = vec![(0usize, img.root_nid(), 0u32)];
        while let Some((dir, nid, depth)) = stack.pop() {
            self.check_time(img)?;
            let ino = img.inode(nid)?;
            if is_opaque(&ino) {
                self.nodes[dir].children.clear();
            }
            // The directory's own attributes are the upper layer's.
            let fresh = self.load(img, &ino)?;
            let old = std::mem::replace(&mut self.nodes[dir].node, fresh);
            drop(old);
            for (name, cnid) in img.dir_entries(&ino)? {
                if name == b"." || name == b".." {
                    continue;
                }
                let child = img.inode(cnid)?;
                if child.is_whiteout() {
                    self.nodes[dir].children.remove(&name);
                    continue;
                }
                if child.kind() == libc::S_IFDIR {
                    if depth + 1 > self.options.max_depth {
                        return Err(ImageError::TooDeep {
                            path: img.path().to_path_buf(),
                            limit: self.options.max_depth,
                        });
                    }
                    self.stats.depth = self.stats.depth.max(depth + 1);
                    let below = self.nodes[dir].children.get(&name).copied();
                    let target = match below {
                        Some(b) if self.nodes[b].node.mode & libc::S_IFMT == libc::S_IFDIR => b,
                        _ => {
                            let node = self.load(img, &child)?;
                            let n = self.push(node, img)?;
                            self.nodes[dir].children.insert(name, n);
                            n
                        }
                    };
                    stack.push((target, cnid, depth + 1));
                    continue;
                }
                let n = match links.get(&cnid) {
                    Some(&n) => n,
                    None => {
                        let node = self.load(img, &child)?;
                        let n = self.push(node, img)?;
                        if child.nlink > 1 {
                            links.insert(cnid, n);
                        }
                        n
                    }
                };
                self.nodes[dir].children.insert(name, n);
            }
        }
        Ok(())
    }

    fn flatten(&mut self, top: &Path) -> Result<Vec<Node>, ImageError> {
        flatten_tree(&mut self.nodes, self.options, top, &mut self.stats)
    }
}

/// The nodes of `nodes` reachable from the root (node 0), in the writer's form: root first, directory
/// entries pointing at their new indexes.
pub(crate) fn flatten_tree(
    nodes: &mut [MNode],
    options: &ImageOptions,
    top: &Path,
    stats: &mut ImageStats,
) -> Result<Vec<Node>, ImageError> {
    let mut new_index: Vec<Option<usize>> = vec![None; nodes.len()];
    let mut order: Vec<usize> = Vec::new();
    new_index[0] = Some(0);
    order.push(0);
    let mut i = 0;
    while i < order.len() {
        let old = order[i];
        let children: Vec<usize> = nodes[old].children.values().copied().collect();
        for c in children {
            if new_index[c].is_none() {
                new_index[c] = Some(order.len());
                order.push(c);
            }
        }
        i += 1;
    }
    if order.len() as u64 > options.max_inodes {
        return Err(ImageError::OverLimit {
            path: top.to_path_buf(),
            what: "inodes in the merged tree",
            needed: order.len() as u64,
            limit: options.max_inodes,
        });
    }
    let mut out = Vec::with_capacity(order.len());
    for &old in &order {
        let m = &mut nodes[old];
        let children = std::mem::take(&mut m.children);
        let mut node = std::mem::replace(
            &mut m.node,
            Node {
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                rdev: 0,
                size: 0,
                nlink: 0,
                xattrs: Vec::new(),
                body: Body::Empty,
            },
        );
        if let Body::Dir { entries, .. } = &mut node.body {
            *entries = children
                .into_iter()
                .map(|(name, c)| (name, new_index[c].expect("reachable")))
                .collect();
        }
        out.push(node);
    }
    for n in &out {
        match n.body {
            Body::Chunked { count, stored, .. } => {
                stats.chunked_files += 1;
                stats.chunks += stored;
                stats.hole_chunks += count - stored;
            }
            Body::Spilled { .. } if n.mode & libc::S_IFMT == libc::S_IFREG => {
                stats.inline_bytes += n.size;
            }
            _ => {}
        }
    }
    // Parents: every directory is reached through exactly one entry.
    let mut parents = vec![0usize; out.len()];
    for (i, n) in out.iter().enumerate() {
        if let Body::Dir { entries, .. } = &n.body {
            for &(_, c) in entries {
                parents[c] = i;
            }
        }
    }
    for (i, n) in out.iter_mut().enumerate() {
        if let Body::Dir { parent, .. } = &mut n.body {
            *parent = parents[i];
        }
    }
    Ok(out)
}

fn is_opaque(ino: &Inode) -> bool {
    ino.kind() == libc::S_IFDIR
        && ino
            .xattrs
            .iter()
            .any(|(n, v)| n == OPAQUE_XATTR && v == b"y")
}

/// The xattrs a merged tree shows: overlayfs's opaque mark is consumed by the merge.
fn visible_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    xattrs
        .iter()
        .filter(|(n, _)| n != OPAQUE_XATTR)
        .cloned()
        .collect()
}

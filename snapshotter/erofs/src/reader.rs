//! Reading back the EROFS images this crate writes, for [`crate::write_merged_image`].
//!
//! Only what the writer produces is understood: 4096-byte blocks, compact and extended
//! inodes, inline and shared xattrs, FLAT_PLAIN, FLAT_INLINE and CHUNK_BASED layouts with
//! 8-byte chunk indexes, and a device table. Anything else, and every offset or length that
//! points outside the image, is an [`ImageError::Corrupt`]: an image on disk is read as
//! untrusted bytes, and no input makes the reader panic or allocate beyond the image's size.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::format::{self, align_up, DeviceSlot, BLOCK_SIZE};
use crate::writer::{ImageError, Xattrs};

/// An open image.
pub(crate) struct Image {
    file: File,
    path: PathBuf,
    len: u64,
    meta_blkaddr: u64,
    xattr_blkaddr: u64,
    root_nid: u64,
    build_time: i64,
    build_nsec: u32,
    devices: Vec<DeviceSlot>,
}

/// One inode, decoded.
#[derive(Debug, Clone)]
pub(crate) struct Inode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub rdev: u64,
    pub size: u64,
    pub nlink: u32,
    pub xattrs: Xattrs,
    layout: u16,
    i_u: u32,
    /// Where the inode's inline part (tail or chunk indexes) starts: after its xattrs.
    after: u64,
}

impl Inode {
    pub fn kind(&self) -> u32 {
        self.mode & libc::S_IFMT
    }

    /// An overlayfs whiteout: a character device 0:0.
    pub fn is_whiteout(&self) -> bool {
        self.kind() == libc::S_IFCHR && self.rdev == 0
    }

    /// log2 of the chunk size of a chunk-based file.
    pub fn chunk_bits(&self) -> Option<u8> {
        (self.layout == format::LAYOUT_CHUNK_BASED).then(|| {
            (self.i_u as u16 & format::CHUNK_FORMAT_BLKBITS_MASK) as u8 + format::BLOCK_BITS
        })
    }
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

impl Image {
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let io = |op| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { op, path, source }
        };
        let file = File::open(path).map_err(io("open"))?;
        let len = file.metadata().map_err(io("stat"))?.len();
        let mut img = Image {
            file,
            path: path.to_path_buf(),
            len,
            meta_blkaddr: 0,
            xattr_blkaddr: 0,
            root_nid: 0,
            build_time: 0,
            build_nsec: 0,
            devices: Vec::new(),
        };
        let block0 = img.read(0, BLOCK_SIZE as usize)?;
        let sb = &block0[format::SUPER_OFFSET..format::SUPER_OFFSET + format::SUPER_SIZE];
        if le32(sb, 0) != format::SUPER_MAGIC || sb[12] != format::BLOCK_BITS {
            return Err(img.corrupt("not an EROFS image with 4096-byte blocks"));
        }
        let known = format::FEATURE_INCOMPAT_CHUNKED_FILE | format::FEATURE_INCOMPAT_DEVICE_TABLE;
        if le32(sb, 80) & !known != 0 {
            return Err(img.corrupt("an EROFS feature this reader does not know"));
        }
        img.root_nid = u64::from(le16(sb, 14));
        img.build_time = le64(sb, 24) as i64;
        img.build_nsec = le32(sb, 32);
        img.meta_blkaddr = u64::from(le32(sb, 40));
        img.xattr_blkaddr = u64::from(le32(sb, 44));
        let extra = usize::from(le16(sb, 86));
        let slotoff = usize::from(le16(sb, 88)) * format::DEVT_SLOT_SIZE;
        if slotoff + extra * format::DEVT_SLOT_SIZE > BLOCK_SIZE as usize {
            return Err(img.corrupt("device table beyond block 0"));
        }
        for i in 0..extra {
            let s = &block0[slotoff + i * format::DEVT_SLOT_SIZE..][..format::DEVT_SLOT_SIZE];
            let tag = &s[..format::DEVT_TAG_SIZE];
            let end = tag.iter().position(|&c| c == 0).unwrap_or(tag.len());
            img.devices.push(DeviceSlot {
                tag: tag[..end].to_vec(),
                blocks: le32(s, 64),
            });
        }
        Ok(img)
    }

    fn corrupt(&self, what: &'static str) -> ImageError {
        ImageError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// `len` bytes at `at`, which must lie inside the image.
    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, ImageError> {
        if at.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(self.corrupt("an offset or length points past the end"));
        }
        let mut buf = vec![0; len];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|source| ImageError::Io {
                op: "read",
                path: self.path.clone(),
                source,
            })?;
        Ok(buf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn root_nid(&self) -> u64 {
        self.root_nid
    }

    pub fn devices(&self) -> &[DeviceSlot] {
        &self.devices
    }

    fn inode_pos(&self, nid: u64) -> Result<u64, ImageError> {
        nid.checked_mul(format::INODE_SLOT_SIZE)
            .and_then(|o| o.checked_add(self.meta_blkaddr * BLOCK_SIZE))
            .ok_or_else(|| self.corrupt("inode number out of range"))
    }

    /// Decodes inode `nid`.
    pub fn inode(&self, nid: u64) -> Result<Inode, ImageError> {
        let pos = self.inode_pos(nid)?;
        let head = self.read(pos, format::COMPACT_INODE_SIZE)?;
        let extended = le16(&head, 0) & 1 == 1;
        let layout = (le16(&head, 0) >> 1) & 0x7;
        let icount = usize::from(le16(&head, 2));
        let mode = u32::from(le16(&head, 4));
        let (b, isize) = if extended {
            (
                self.read(pos, format::EXTENDED_INODE_SIZE)?,
                format::EXTENDED_INODE_SIZE,
            )
        } else {
            (head, format::COMPACT_INODE_SIZE)
        };
        let i_u = le32(&b, 16);
        let (size, uid, gid, mtime, mtime_nsec, nlink) = if extended {
            (
                le64(&b, 8),
                le32(&b, 24),
                le32(&b, 28),
                le64(&b, 32) as i64,
                le32(&b, 40),
                le32(&b, 44),
            )
        } else {
            (
                u64::from(le32(&b, 8)),
                u32::from(le16(&b, 24)),
                u32::from(le16(&b, 26)),
                self.build_time,
                self.build_nsec,
                u32::from(le16(&b, 6)),
            )
        };
        if !matches!(
            layout,
            format::LAYOUT_FLAT_PLAIN | format::LAYOUT_FLAT_INLINE | format::LAYOUT_CHUNK_BASED
        ) {
            return Err(self.corrupt("a compressed or unknown data layout"));
        }
        let xattr_len = if icount == 0 {
            0
        } else {
            format::XATTR_IBODY_HEADER_SIZE + (icount - 1) * 4
        };
        let xattrs = if xattr_len == 0 {
            Vec::new()
        } else {
            let body = self.read(pos + isize as u64, xattr_len)?;
            self.decode_xattrs(&body)?
        };
        let kind = mode & libc::S_IFMT;
        let rdev = if matches!(kind, libc::S_IFCHR | libc::S_IFBLK) {
            // The kernel's new_decode_dev.
            let major = (i_u & 0xfff00) >> 8;
            let minor = (i_u & 0xff) | ((i_u >> 12) & 0xfff00);
            libc::makedev(major, minor)
        } else {
            0
        };
        Ok(Inode {
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            rdev,
            size,
            nlink,
            xattrs,
            layout,
            i_u,
            after: pos + (isize + xattr_len) as u64,
        })
    }

    /// One xattr entry at the start of `b`: (full name, value, bytes used, 4-aligned).
    fn xattr_entry(&self, b: &[u8]) -> Result<(Vec<u8>, Vec<u8>, usize), ImageError> {
        if b.len() < format::XATTR_ENTRY_SIZE {
            return Err(self.corrupt("truncated xattr entry"));
        }
        let (nlen, index, vlen) = (usize::from(b[0]), b[1], usize::from(le16(b, 2)));
        let end = format::XATTR_ENTRY_SIZE + nlen + vlen;
        if end > b.len() {
            return Err(self.corrupt("xattr entry past its inode's xattrs"));
        }
        let (prefix, whole) = format::XATTR_PREFIXES
            .iter()
            .find(|p| p.1 == index)
            .map(|p| (p.0, p.2))
            .ok_or_else(|| self.corrupt("unknown xattr name index"))?;
        if whole && nlen != 0 {
            return Err(self.corrupt("a suffix on a whole-name xattr"));
        }
        let mut name = prefix.as_bytes().to_vec();
        name.extend_from_slice(&b[4..4 + nlen]);
        let value = b[4 + nlen..end].to_vec();
        Ok((name, value, align_up(end as u64, 4) as usize))
    }

    fn decode_xattrs(&self, body: &[u8]) -> Result<Xattrs, ImageError> {
        let shared = usize::from(body[4]);
        let ids_end = format::XATTR_IBODY_HEADER_SIZE + shared * 4;
        if ids_end > body.len() {
            return Err(self.corrupt("shared xattr ids past the inode's xattrs"));
        }
        let mut out = Vec::new();
        for i in 0..shared {
            let id = u64::from(le32(body, format::XATTR_IBODY_HEADER_SIZE + i * 4));
            let at = self.xattr_blkaddr * BLOCK_SIZE + id * 4;
            let head = self.read(at, format::XATTR_ENTRY_SIZE)?;
            let len = format::XATTR_ENTRY_SIZE + usize::from(head[0]) + usize::from(le16(&head, 2));
            let entry = self.read(at, len)?;
            let (n, v, _) = self.xattr_entry(&entry)?;
            out.push((n, v));
        }
        let mut rest = &body[ids_end..];
        while !rest.is_empty() {
            let (n, v, used) = self.xattr_entry(rest)?;
            out.push((n, v));
            rest = &rest[used.min(rest.len())..];
        }
        out.sort();
        Ok(out)
    }

    /// The whole data of a FLAT_PLAIN or FLAT_INLINE inode (a directory, a symlink, a small
    /// file), at most `limit` bytes.
    pub fn flat_data(&self, ino: &Inode, limit: u64) -> Result<Vec<u8>, ImageError> {
        if ino.layout == format::LAYOUT_CHUNK_BASED {
            return Err(self.corrupt("flat data asked of a chunk-based inode"));
        }
        if ino.size > limit || ino.size > self.len {
            return Err(self.corrupt("an inode's data larger than it can be"));
        }
        let size = ino.size;
        let full = if ino.layout == format::LAYOUT_FLAT_INLINE {
            size / BLOCK_SIZE * BLOCK_SIZE
        } else {
            size
        };
        let mut data = if full == 0 {
            Vec::new()
        } else {
            self.read(u64::from(ino.i_u) * BLOCK_SIZE, full as usize)?
        };
        if ino.layout == format::LAYOUT_FLAT_INLINE && size > full {
            data.extend(self.read(ino.after, (size - full) as usize)?);
        }
        Ok(data)
    }

    /// A directory's entries (`.` and `..` included): (name, nid).
    pub fn dir_entries(&self, ino: &Inode) -> Result<Vec<(Vec<u8>, u64)>, ImageError> {
        if ino.kind() != libc::S_IFDIR {
            return Err(self.corrupt("directory entries asked of a non-directory"));
        }
        let data = self.flat_data(ino, self.len)?;
        let mut out = Vec::new();
        for blk in data.chunks(BLOCK_SIZE as usize) {
            if blk.len() < format::DIRENT_SIZE {
                return Err(self.corrupt("directory block too short"));
            }
            let first = usize::from(le16(blk, 8));
            if first % format::DIRENT_SIZE != 0 || first == 0 || first > blk.len() {
                return Err(self.corrupt("directory block with a bad first name offset"));
            }
            let n = first / format::DIRENT_SIZE;
            for j in 0..n {
                let d = &blk[j * format::DIRENT_SIZE..];
                let start = usize::from(le16(d, 8));
                let end = if j + 1 < n {
                    usize::from(le16(&blk[(j + 1) * format::DIRENT_SIZE..], 8))
                } else {
                    blk.len()
                };
                if start < first || start > end || end > blk.len() {
                    return Err(self.corrupt("directory entry names out of order"));
                }
                let mut name = &blk[start..end];
                if j + 1 == n {
                    // The last name of a block runs to a NUL or to the block's end.
                    let cut = name.iter().position(|&c| c == 0).unwrap_or(name.len());
                    name = &name[..cut];
                }
                if name.is_empty() || name.len() > format::NAME_LEN || name.contains(&b'/') {
                    return Err(self.corrupt("a directory entry with an invalid name"));
                }
                out.push((name.to_vec(), le64(d, 0)));
            }
        }
        Ok(out)
    }

    /// The chunk indexes of a chunk-based inode, in batches: calls `each(chunk number,
    /// device id, block address)` for every chunk that is not a hole; returns the number of
    /// indexes.
    pub fn chunks(
        &self,
        ino: &Inode,
        mut each: impl FnMut(u64, u16, u32) -> Result<(), ImageError>,
    ) -> Result<u64, ImageError> {
        let bits = ino
            .chunk_bits()
            .ok_or_else(|| self.corrupt("chunk indexes asked of a flat inode"))?;
        if ino.i_u as u16 & format::CHUNK_FORMAT_INDEXES == 0 {
            return Err(self.corrupt("a chunk-based file without 8-byte chunk indexes"));
        }
        let count = ino.size.div_ceil(1u64 << bits);
        let start = align_up(ino.after, format::CHUNK_INDEX_SIZE as u64);
        if count
            .checked_mul(format::CHUNK_INDEX_SIZE as u64)
            .and_then(|n| n.checked_add(start))
            .is_none_or(|end| end > self.len)
        {
            return Err(self.corrupt("chunk indexes past the end"));
        }
        const BATCH: u64 = 8192;
        let mut k = 0;
        while k < count {
            let n = (count - k).min(BATCH);
            let buf = self.read(
                start + k * format::CHUNK_INDEX_SIZE as u64,
                (n as usize) * format::CHUNK_INDEX_SIZE,
            )?;
            for (j, e) in buf.chunks_exact(format::CHUNK_INDEX_SIZE).enumerate() {
                let (dev, blk) = (le16(e, 2), le32(e, 4));
                if blk != format::NULL_ADDR {
                    if le16(e, 0) != 0 || usize::from(dev) > self.devices.len() || dev == 0 {
                        return Err(self.corrupt("a chunk index naming no device"));
                    }
                    each(k + j as u64, dev, blk)?;
                }
            }
            k += n;
        }
        Ok(count)
    }
}

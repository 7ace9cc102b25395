//! EROFS on-disk format: the constants and encoders this crate writes.
//!
//! Layout as in the Linux kernel's `fs/erofs/erofs_fs.h` (superblock, compact and extended
//! inodes, inline xattrs, dirents, 8-byte chunk indexes, device slots). Only uncompressed
//! layouts are written: FLAT_PLAIN, FLAT_INLINE and CHUNK_BASED.

/// Byte offset of the superblock in block 0.
pub const SUPER_OFFSET: usize = 1024;
/// EROFS superblock magic.
pub const SUPER_MAGIC: u32 = 0xE0F5_E1E2;
/// Size of the superblock without extension slots.
pub const SUPER_SIZE: usize = 128;
/// Block size bits written by this crate (4096-byte blocks, the page size here).
pub const BLOCK_BITS: u8 = 12;
/// Block size written by this crate.
pub const BLOCK_SIZE: u64 = 1 << BLOCK_BITS;

/// Chunk-based files exist in the image.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// The superblock is followed by a device table.
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;

/// One device slot in the device table.
pub const DEVT_SLOT_SIZE: usize = 128;
/// Size of the tag (the device's name) in a device slot.
pub const DEVT_TAG_SIZE: usize = 64;

/// Uncompressed data in whole blocks starting at `startblk`.
pub const LAYOUT_FLAT_PLAIN: u16 = 0;
/// Whole blocks at `startblk`, the tail stored right after the inode.
pub const LAYOUT_FLAT_INLINE: u16 = 2;
/// Fixed-size chunks located through a chunk index array after the inode.
pub const LAYOUT_CHUNK_BASED: u16 = 4;

/// Inode sizes: the 32-byte compact and the 64-byte extended form.
pub const COMPACT_INODE_SIZE: usize = 32;
pub const EXTENDED_INODE_SIZE: usize = 64;
/// Inode slots (nids) are 32 bytes apart.
pub const INODE_SLOT_SIZE: u64 = 32;

/// Chunk format: the chunk size shift above the block size.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// Chunk format: 8-byte chunk indexes (with a device id) instead of a 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// Size of one chunk index entry.
pub const CHUNK_INDEX_SIZE: usize = 8;
/// Block address of a chunk that is a hole (reads as zeroes).
pub const NULL_ADDR: u32 = u32::MAX;

/// Size of an on-disk directory entry.
pub const DIRENT_SIZE: usize = 12;
/// Longest file name.
pub const NAME_LEN: usize = 255;

/// Inline xattr body header size.
pub const XATTR_IBODY_HEADER_SIZE: usize = 12;
/// Xattr entry header size.
pub const XATTR_ENTRY_SIZE: usize = 4;

/// File types in directory entries (the kernel's FT_* values).
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SOCK: u8 = 6;
pub const FT_SYMLINK: u8 = 7;

/// Xattr name prefixes EROFS can encode, as (prefix, index, whole name).
///
/// Whole-name entries (the POSIX ACLs) have an empty suffix.
pub const XATTR_PREFIXES: &[(&str, u8, bool)] = &[
    ("user.", 1, false),
    ("system.posix_acl_access", 2, true),
    ("system.posix_acl_default", 3, true),
    ("trusted.", 4, false),
    ("lustre.", 5, false),
    ("security.", 6, false),
];

/// Splits an xattr name into its EROFS name index and the stored suffix.
pub fn xattr_name_index(name: &[u8]) -> Option<(u8, &[u8])> {
    for &(prefix, index, whole) in XATTR_PREFIXES {
        let p = prefix.as_bytes();
        if whole {
            if name == p {
                return Some((index, &name[name.len()..]));
            }
        } else if name.len() > p.len() && name.starts_with(p) {
            return Some((index, &name[p.len()..]));
        }
    }
    None
}

/// Encodes a device number the way the kernel's `new_encode_dev` does.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Rounds `v` up to a multiple of `align` (a power of two).
pub const fn align_up(v: u64, align: u64) -> u64 {
    (v + align - 1) & !(align - 1)
}

/// Little-endian field writers over a byte slice.
#[derive(Debug)]
pub struct Le<'a>(pub &'a mut [u8]);

impl Le<'_> {
    pub fn u8(&mut self, off: usize, v: u8) {
        self.0[off] = v;
    }
    pub fn u16(&mut self, off: usize, v: u16) {
        self.0[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// The fields of the superblock this crate sets.
#[derive(Debug, Default, Clone)]
pub struct SuperBlock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub extra_devices: u16,
    pub devt_slotoff: u16,
}

impl SuperBlock {
    /// Writes the 128-byte superblock into `buf` (at least 128 bytes).
    pub fn encode(&self, buf: &mut [u8]) {
        let mut b = Le(buf);
        b.u32(0, SUPER_MAGIC);
        b.u32(4, 0); // checksum: FEATURE_COMPAT_SB_CHKSUM is not set
        b.u32(8, 0); // feature_compat
        b.u8(12, BLOCK_BITS);
        b.u8(13, 0); // sb_extslots
        b.u16(14, self.root_nid);
        b.u64(16, self.inos);
        b.u64(24, self.build_time);
        b.u32(32, self.build_time_nsec);
        b.u32(36, self.blocks);
        b.u32(40, self.meta_blkaddr);
        b.u32(44, self.xattr_blkaddr);
        b.0[48..64].copy_from_slice(&self.uuid);
        b.0[64..80].copy_from_slice(&self.volume_name);
        b.u32(80, self.feature_incompat);
        b.u16(84, 0);
        b.u16(86, self.extra_devices);
        b.u16(88, self.devt_slotoff);
        b.u8(90, 0); // dirblkbits: directory blocks are file system blocks
    }
}

/// Writes one device slot: its tag (name, cut to 64 bytes) and size in blocks.
pub fn encode_device_slot(buf: &mut [u8], tag: &[u8], blocks: u32) {
    let n = tag.len().min(DEVT_TAG_SIZE);
    buf[..n].copy_from_slice(&tag[..n]);
    Le(buf).u32(64, blocks);
    Le(buf).u32(68, 0); // mapped_blkaddr: addressed by device id, not flattened
}

/// Writes one chunk index: a chunk in `device_id` (0 = this image, n = device table slot n-1)
/// at block `blkaddr`, or a hole when `blkaddr` is [`NULL_ADDR`].
pub fn encode_chunk_index(buf: &mut [u8], device_id: u16, blkaddr: u32) {
    let mut b = Le(buf);
    b.u16(0, 0); // startblk_hi (48-bit layouts only)
    b.u16(2, device_id);
    b.u32(4, blkaddr);
}

/// One entry of an image's device table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSlot {
    /// Name recorded in the slot (the device path where it fits in 64 bytes).
    pub tag: Vec<u8>,
    /// Size of the device in blocks when the image was written.
    pub blocks: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_prefixes_split() {
        assert_eq!(
            xattr_name_index(b"security.capability"),
            Some((6, &b"capability"[..]))
        );
        assert_eq!(
            xattr_name_index(b"trusted.overlay.opaque"),
            Some((4, &b"overlay.opaque"[..]))
        );
        assert_eq!(
            xattr_name_index(b"system.posix_acl_access"),
            Some((2, &b""[..]))
        );
        assert_eq!(xattr_name_index(b"user."), None);
        assert_eq!(xattr_name_index(b"system.other"), None);
    }

    #[test]
    fn device_numbers_encode_like_the_kernel() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x12345), 0x45 | (8 << 8) | (0x12300 << 12));
    }

    #[test]
    fn superblock_fields_at_kernel_offsets() {
        let mut buf = [0u8; SUPER_SIZE];
        SuperBlock {
            root_nid: 0x1234,
            meta_blkaddr: 2,
            extra_devices: 3,
            devt_slotoff: 9,
            ..Default::default()
        }
        .encode(&mut buf);
        assert_eq!(&buf[0..4], &SUPER_MAGIC.to_le_bytes());
        assert_eq!(buf[12], 12);
        assert_eq!(&buf[14..16], &[0x34, 0x12]);
        assert_eq!(&buf[40..44], &[2, 0, 0, 0]);
        assert_eq!(&buf[86..88], &[3, 0]);
        assert_eq!(&buf[88..90], &[9, 0]);
    }
}

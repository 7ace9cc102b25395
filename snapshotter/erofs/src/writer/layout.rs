//! Nodes laid out as an EROFS image and streamed into the image file: the superblock and
//! device table, shared xattrs, inodes with their inline data or chunk indexes, then whole
//! data blocks.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::spill::{Spill, SpillReader, SPILL_CHUNK_RECORD};
use super::{std_io_err, Body, ImageError, ImageOptions, ImageStats, Node};
use crate::format::{self, align_up, DeviceSlot, Le, BLOCK_SIZE};

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

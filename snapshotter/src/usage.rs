//! Disk usage of a directory tree, counted as `du` counts it: the blocks allocated to each
//! inode (hard links once), and the number of distinct inodes, the directory itself
//! included.
//!
//! The tree may belong to a running container, which can swap a directory for a symbolic
//! link at any moment; so the walk goes by directory descriptors (`openat` with
//! `O_NOFOLLOW`, `fstatat` with `AT_SYMLINK_NOFOLLOW`) and never leaves the tree.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode};

/// Bytes and inodes used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Allocated bytes (`st_blocks * 512`), as `du -B1` reports.
    pub size: i64,
    /// Distinct inodes, as `du --inodes` reports.
    pub inodes: i64,
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A directory being walked and the names in it still to visit.
struct Frame {
    dir: Dir,
    names: std::vec::IntoIter<CString>,
}

fn frame(mut dir: Dir) -> io::Result<Frame> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    Ok(Frame {
        dir,
        names: names.into_iter(),
    })
}

/// The usage of the tree at `dir` (which must be a directory, not a link to one). Entries
/// that vanish or change type during the walk are skipped. Open descriptors grow with the
/// tree's depth, not its width.
pub fn disk_usage(dir: &Path) -> io::Result<DiskUsage> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut count = |st: &FileStat| {
        if seen.insert((st.st_dev, st.st_ino)) {
            usage.inodes += 1;
            usage.size = usage.size.saturating_add(st.st_blocks.saturating_mul(512));
        }
    };
    let root = Dir::open(dir, DIR_FLAGS, Mode::empty())?;
    count(&fstat(root.as_raw_fd())?);
    let mut stack = vec![frame(root)?];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            stack.pop();
            continue;
        };
        let fd = top.dir.as_raw_fd();
        let st = match fstatat(Some(fd), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        count(&st);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            match Dir::openat(Some(fd), name.as_c_str(), DIR_FLAGS, Mode::empty()) {
                Ok(sub) => stack.push(frame(sub)?),
                // Removed, or replaced by a link or a file since the fstatat.
                Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn hard_links_count_once_and_symlinks_are_not_followed() {
        let dir = std::env::temp_dir().join(format!("hb-usage-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/a"), vec![1u8; 10_000]).unwrap();
        fs::hard_link(dir.join("sub/a"), dir.join("b")).unwrap();
        std::os::unix::fs::symlink("/usr", dir.join("link")).unwrap();
        let u = disk_usage(&dir).unwrap();
        // dir, sub, a (= b), link
        assert_eq!(u.inodes, 4);
        let a = fs::metadata(dir.join("sub/a")).unwrap().blocks() as i64 * 512;
        assert!(u.size >= a && u.size < a + 1_000_000, "{u:?}");
        // A link is never walked, not even as the root.
        assert!(disk_usage(&dir.join("link")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}

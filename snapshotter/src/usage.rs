//! Disk usage of a directory tree, counted as `du` counts it: the blocks allocated to each
//! inode (hard links once), and the number of distinct inodes, the directory itself
//! included.
//!
//! The tree may belong to a running container, which can swap a directory for a symbolic
//! link at any moment; so the walk goes by directory descriptors (`openat` with
//! `O_NOFOLLOW`, `fstatat` with `AT_SYMLINK_NOFOLLOW`) and never leaves the tree.

use std::collections::HashSet;
use std::io;
use std::path::Path;

use nix::sys::stat::FileStat;

/// Bytes and inodes used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    /// Allocated bytes (`st_blocks * 512`), as `du -B1` reports.
    pub size: i64,
    /// Distinct inodes, as `du --inodes` reports.
    pub inodes: i64,
}

/// The usage of the tree at `dir` (which must be a directory, not a link to one). Entries
/// that vanish or change type during the walk are skipped. The walk is iterative with one
/// directory open at a time ([`crate::tree::walk`]), so any depth is measured.
pub fn disk_usage(dir: &Path) -> io::Result<DiskUsage> {
    let mut seen = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut count = |st: &FileStat| {
        if seen.insert((st.st_dev, st.st_ino)) {
            usage.inodes += 1;
            usage.size = usage.size.saturating_add(st.st_blocks.saturating_mul(512));
        }
    };
    let root = crate::tree::walk(
        dir,
        |_, _, st| {
            count(st);
            Ok(true)
        },
        |_, _| Ok(()),
    )?;
    count(&root);
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

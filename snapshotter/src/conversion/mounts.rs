//! The kernel's mount table (`/proc/self/mountinfo`) as the conversion needs it: the mount
//! points, whether a mount still uses a directory, and unmounting one.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags};
use tracing::warn;

use crate::error::{io_err, Result};

/// The mount points of this mount namespace (`/proc/self/mountinfo`, field 5, unescaped).
pub(crate) fn mount_points() -> io::Result<BTreeSet<PathBuf>> {
    let text = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect())
}

/// The fields of one `/proc/self/mountinfo` line the release check needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MountEntry {
    /// `major:minor` of the mounted filesystem.
    dev: String,
    /// The mount's root within its filesystem (a bind mount of a directory names it).
    root: PathBuf,
    point: PathBuf,
    fstype: String,
    super_options: String,
}

pub(super) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            let f: Vec<&str> = head.split(' ').collect();
            let t: Vec<&str> = tail.split(' ').collect();
            Some(MountEntry {
                dev: f.get(2)?.to_string(),
                root: PathBuf::from(unescape_mountinfo(f.get(3)?)),
                point: PathBuf::from(unescape_mountinfo(f.get(4)?)),
                fstype: t.first()?.to_string(),
                super_options: unescape_mountinfo(t.get(2).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// Whether a mount in `table` still uses `dir` or something inside it: an overlay naming it
/// as a lower, upper or work dir, or a bind mount of it or of something in it.
pub(super) fn used_by_mounts(dir: &Path, table: &[MountEntry]) -> bool {
    use std::os::unix::fs::MetadataExt;
    let overlay_uses = table.iter().filter(|m| m.fstype == "overlay").any(|m| {
        m.super_options
            .split(',')
            .filter_map(|o| o.split_once('='))
            .filter(|(k, _)| {
                matches!(
                    *k,
                    "lowerdir" | "upperdir" | "workdir" | "datadir+" | "lowerdir+"
                )
            })
            .flat_map(|(_, v)| v.split(':'))
            .any(|p| Path::new(p).starts_with(dir))
    });
    if overlay_uses {
        return true;
    }
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return false;
    };
    let dev = format!("{}:{}", libc::major(meta.dev()), libc::minor(meta.dev()));
    // The mount `dir` lies in, and `dir`'s path within that filesystem.
    let Some(home) = table
        .iter()
        .filter(|m| m.dev == dev && dir.starts_with(&m.point))
        .max_by_key(|m| m.point.components().count())
    else {
        return false;
    };
    let Ok(inside) = dir.strip_prefix(&home.point) else {
        return false;
    };
    let rel = home.root.join(inside);
    table
        .iter()
        .any(|m| m.dev == dev && m.root.starts_with(&rel))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `dir` if it is a mount point; lazily when it is busy.
pub(super) fn unmount_if_mounted(dir: &Path) -> Result<()> {
    let mounted =
        mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
    // Stacked mounts (a re-mount over a surviving one) come off one by one.
    if mounted.contains(dir) {
        while umount2(dir, MntFlags::empty()).is_ok() {}
        let still =
            mount_points().map_err(io_err("cannot read", Path::new("/proc/self/mountinfo")))?;
        if still.contains(dir) {
            warn!(dir = %dir.display(), "erofs mount is busy: detaching it lazily");
            while umount2(dir, MntFlags::MNT_DETACH).is_ok() {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_that_use_a_directory_are_found() {
        let text = "\
22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
90 22 0:50 / /run/c1/rootfs rw - overlay overlay rw,lowerdir=/r/snapshots/3/erofs:/r/snapshots/2/fs,upperdir=/r/snapshots/7/fs,workdir=/r/snapshots/7/work,index=off
91 22 8:1 /r/snapshots/9/fs /mnt/view ro - ext4 /dev/vda rw
92 22 8:1 /r/snapshots/10 /mnt/above rw - ext4 /dev/vda rw
";
        let table = parse_mountinfo(text);
        assert_eq!(table.len(), 4);
        assert_eq!(table[2].root, Path::new("/r/snapshots/9/fs"));
        assert!(
            used_by_mounts(Path::new("/r/snapshots/7/fs"), &table),
            "upper dir"
        );
        assert!(
            used_by_mounts(Path::new("/r/snapshots/2/fs"), &table),
            "lower dir"
        );
        assert!(!used_by_mounts(Path::new("/r/snapshots/3/fs"), &table));
        assert!(
            !used_by_mounts(Path::new("/r/snapshots/77/fs"), &table),
            "77 is not 7"
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }
}

//! Walking and removing directory trees of any depth: iteratively (no recursion, so a tree
//! 100,000 levels deep cannot overflow a thread's stack) and with one directory descriptor
//! open at a time (no descriptor per level). The walk goes down with `openat(O_NOFOLLOW)`
//! relative to the open parent, checking the directory it opened is the one `fstatat` saw,
//! and back up through `..`, checking it arrives at the directory it came down from; a tree
//! rearranged under the walk makes it stop with an error instead of leaving the tree.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A directory on the path from the walk's root: its identity, its name in its parent, and
/// the names in it still to visit.
struct Level {
    id: (u64, u64),
    name: CString,
    names: Vec<CString>,
}

fn names_of(dir: &mut Dir) -> io::Result<Vec<CString>> {
    let mut names = Vec::new();
    for entry in dir.iter() {
        let name = entry?.file_name().to_owned();
        if name.as_bytes() != b"." && name.as_bytes() != b".." {
            names.push(name);
        }
    }
    // Popped from the end: visit in directory order.
    names.reverse();
    Ok(names)
}

fn rearranged() -> io::Error {
    io::Error::other("a directory was moved while the tree was walked")
}

/// Walks the tree at `root` (a directory, not a link to one) depth first. `entry(parent,
/// name, stat)` is called for every entry below the root (not following links); when it
/// returns true for a directory the walk goes into it. `leave(parent, name)` is called for
/// every directory the walk went into, once everything below it has been visited. Entries
/// that vanish or change type before they are opened are skipped.
pub fn walk(
    root: &Path,
    mut entry: impl FnMut(&Dir, &CStr, &FileStat) -> io::Result<bool>,
    mut leave: impl FnMut(&Dir, &CStr) -> io::Result<()>,
) -> io::Result<FileStat> {
    let mut cur = Dir::open(root, DIR_FLAGS, Mode::empty())?;
    let root_st = fstat(cur.as_raw_fd())?;
    let mut stack = vec![Level {
        id: (root_st.st_dev, root_st.st_ino),
        name: CString::default(),
        names: names_of(&mut cur)?,
    }];
    loop {
        let top = stack.last_mut().expect("the root level is popped last");
        let Some(name) = top.names.pop() else {
            let done = stack.pop().expect("a level");
            let Some(parent) = stack.last() else {
                return Ok(root_st);
            };
            let up = Dir::openat(Some(cur.as_raw_fd()), "..", DIR_FLAGS, Mode::empty())?;
            let st = fstat(up.as_raw_fd())?;
            if (st.st_dev, st.st_ino) != parent.id {
                return Err(rearranged());
            }
            cur = up;
            leave(&cur, &done.name)?;
            continue;
        };
        let st = match fstatat(
            Some(cur.as_raw_fd()),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => st,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        if !entry(&cur, &name, &st)? || st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            continue;
        }
        let mut sub = match Dir::openat(
            Some(cur.as_raw_fd()),
            name.as_c_str(),
            DIR_FLAGS,
            Mode::empty(),
        ) {
            Ok(sub) => sub,
            // Removed, or replaced by a link or a file since the fstatat.
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => continue,
            Err(e) => return Err(e.into()),
        };
        let sst = fstat(sub.as_raw_fd())?;
        if (sst.st_dev, sst.st_ino) != (st.st_dev, st.st_ino) {
            // Swapped for another directory since the fstatat.
            continue;
        }
        let names = names_of(&mut sub)?;
        stack.push(Level {
            id: (sst.st_dev, sst.st_ino),
            name,
            names,
        });
        cur = sub;
    }
}

/// Removes the tree at `path`, of any depth; symlinks are removed, never followed. A
/// missing `path` is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(m) if !m.is_dir() => return std::fs::remove_file(path),
        Ok(_) => {}
    }
    let unlink = |dir: &Dir, name: &CStr, how| match unlinkat(Some(dir.as_raw_fd()), name, how) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io::Error::from(e)),
    };
    walk(
        path,
        |dir, name, st| {
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                return Ok(true);
            }
            unlink(dir, name, UnlinkatFlags::NoRemoveDir)?;
            Ok(false)
        },
        |dir, name| unlink(dir, name, UnlinkatFlags::RemoveDir),
    )?;
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// `depth` nested directories `d` under `root`, one descriptor open at a time, with a
    /// file, a symlink out of the tree and a FIFO at the bottom.
    fn make_deep(root: &Path, depth: usize) {
        fs::create_dir_all(root).unwrap();
        let mut cur = Dir::open(root, DIR_FLAGS, Mode::empty()).unwrap();
        for _ in 0..depth {
            nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), "d", Mode::from_bits_truncate(0o755))
                .unwrap();
            cur = Dir::openat(Some(cur.as_raw_fd()), "d", DIR_FLAGS, Mode::empty()).unwrap();
        }
        let fd = cur.as_raw_fd();
        nix::fcntl::openat(
            Some(fd),
            "f",
            OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map(nix::unistd::close)
        .unwrap()
        .unwrap();
        nix::unistd::symlinkat("/etc", Some(fd), "link").unwrap();
        nix::unistd::mkfifoat(Some(fd), "fifo", Mode::from_bits_truncate(0o600)).unwrap();
    }

    #[test]
    fn a_100000_deep_tree_is_removed_on_a_small_stack() {
        let dir = std::env::temp_dir().join(format!("hb-tree-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        make_deep(&dir, 100_000);
        fs::write(dir.join("top"), b"x").unwrap();
        let d = dir.clone();
        // A recursive walk would overflow 64 KiB within a few hundred levels.
        let counted = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                let mut n = 0u64;
                walk(
                    &d,
                    |_, _, _| {
                        n += 1;
                        Ok(true)
                    },
                    |_, _| Ok(()),
                )
                .map(|_| n)
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(counted, 100_000 + 4);
        let d = dir.clone();
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || remove_tree(&d))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert!(!dir.exists());
        // /etc, behind the link, is untouched.
        assert!(Path::new("/etc/passwd").exists());
        remove_tree(&dir).expect("removing a missing tree is not an error");
    }
}

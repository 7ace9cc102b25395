//! The mount points a restored container needs in its rootfs, made inside it whatever its
//! symbolic links say.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;

/// Creates the mount points of the spec's mounts in the rootfs, as libcontainer does at create
/// (the new rootfs may lack directories the old container's had): not those on a tmpfs of the
/// spec, whose content CRIU restores, and not cgroup mounts. The rootfs is a checkpoint's or a
/// template's, which a tenant made: every path is resolved inside it (symbolic links and `..`
/// as if it were `/`), so nothing is ever created outside it.
pub(super) fn prepare_mountpoints(spec: &Spec, rootfs: &Path) {
    let mounts: Vec<_> = spec.mounts().iter().flatten().collect();
    let tmpfs: Vec<&Path> = mounts
        .iter()
        .filter(|m| m.typ().as_deref() == Some("tmpfs"))
        .map(|m| m.destination().as_path())
        .collect();
    let root = match fs::File::open(rootfs) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot open rootfs {}: {e}", rootfs.display());
            return;
        }
    };
    for m in &mounts {
        let dest = m.destination();
        if m.typ().as_deref() == Some("cgroup")
            || tmpfs.iter().any(|t| dest != *t && dest.starts_with(t))
        {
            continue;
        }
        let is_file = libcontainer::rootfs::utils::is_bind(m)
            && m.source().as_ref().is_some_and(|s| s.is_file());
        if let Err(e) = create_in_root(root.as_fd(), dest, is_file) {
            tracing::warn!(
                "cannot create mount point {} in {}: {e}",
                dest.display(),
                rootfs.display()
            );
        }
    }
}

/// Creates `path` in the directory `root` as if `root` were `/` (a directory, or with
/// `is_file` an empty file), with its missing parents; nothing when it exists.
fn create_in_root(root: BorrowedFd<'_>, path: &Path, is_file: bool) -> std::io::Result<()> {
    use hyperbox_shim_core::template::open_in_root;
    use std::path::Component;
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY;
    if open_in_root(root, path, libc::O_PATH).is_ok() {
        return Ok(());
    }
    let names: Vec<_> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let Some((last, parents)) = names.split_last() else {
        return Ok(());
    };
    let mut done = PathBuf::from("/");
    let mut dir = open_in_root(root, &done, dir_flags)?;
    for name in parents {
        done.push(name);
        dir = match open_in_root(root, &done, dir_flags) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // `name` alone, in the directory resolved so far: a symbolic link there is
                // not followed (EEXIST), and the lookup below then fails.
                match nix::sys::stat::mkdirat(
                    Some(dir.as_raw_fd()),
                    *name,
                    nix::sys::stat::Mode::from_bits_truncate(0o755),
                ) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open_in_root(root, &done, dir_flags)?
            }
            Err(e) => return Err(e),
        };
    }
    if is_file {
        let fd = nix::fcntl::openat(
            Some(dir.as_raw_fd()),
            *last,
            nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_EXCL
                | nix::fcntl::OFlag::O_WRONLY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )?;
        nix::unistd::close(fd)?;
    } else {
        nix::sys::stat::mkdirat(
            Some(dir.as_raw_fd()),
            *last,
            nix::sys::stat::Mode::from_bits_truncate(0o755),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rootfs (in a fresh directory) with links out of it, and a host directory they name.
    fn hostile_rootfs(name: &str) -> (PathBuf, PathBuf) {
        let base = std::env::temp_dir().join(format!("mountpoints-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let (rootfs, host) = (base.join("rootfs"), base.join("host"));
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::create_dir_all(&host).unwrap();
        std::os::unix::fs::symlink(&host, rootfs.join("evil")).unwrap();
        std::os::unix::fs::symlink("../../host", rootfs.join("up")).unwrap();
        std::os::unix::fs::symlink("/etc", rootfs.join("inside")).unwrap();
        (rootfs, host)
    }

    #[test]
    fn mount_points_are_made_inside_the_rootfs_whatever_its_links_say() {
        let (rootfs, host) = hostile_rootfs("links");
        let root = fs::File::open(&rootfs).unwrap();
        for (path, is_file) in [
            ("/evil/x/y", false),
            ("/evil/f", true),
            ("/up/x", false),
            ("/up/f", true),
            ("/../../host/z", false),
        ] {
            let _ = create_in_root(root.as_fd(), Path::new(path), is_file);
        }
        assert_eq!(
            fs::read_dir(&host).unwrap().count(),
            0,
            "something was made in the host's directory through a link"
        );
        // A link that stays inside resolves inside; plain paths are made as asked.
        create_in_root(root.as_fd(), Path::new("/inside/x"), false).unwrap();
        assert!(rootfs.join("etc/x").is_dir());
        create_in_root(root.as_fd(), Path::new("/a/b/c"), false).unwrap();
        assert!(rootfs.join("a/b/c").is_dir());
        create_in_root(root.as_fd(), Path::new("/a/file"), true).unwrap();
        assert!(rootfs.join("a/file").is_file());
        // Existing: nothing to do.
        create_in_root(root.as_fd(), Path::new("/a/file"), true).unwrap();
        fs::remove_dir_all(rootfs.parent().unwrap()).unwrap();
    }
}

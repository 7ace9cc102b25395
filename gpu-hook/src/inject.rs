//! Changing a container's rootfs without ever following a link its image planted.
//!
//! Every path inside the rootfs is resolved by the kernel with `openat2` under
//! `RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, one directory at a time
//! from a descriptor of the rootfs: a symbolic link anywhere on the way is refused (`ELOOP`),
//! not followed, and `..` cannot climb out. What is then made (a directory, a device node, a
//! mount point, a file, a link) is made relative to the descriptor of its parent, so
//! swapping a path component for a link between the check and the use changes nothing: the
//! descriptor is the directory that was checked. Bind mounts are made detached
//! (`open_tree`), made read-only, `nosuid` and `nodev` while still detached
//! (`mount_setattr`), and only then attached to the checked target descriptor
//! (`move_mount`), so the container never sees a writable driver file even for an instant.
//! This is what NVIDIA's toolkit got wrong in CVE-2024-0132/-0133 (races on image paths) and
//! CVE-2025-23267 (`ldconfig` following planted links).
//!
//! Needs Linux 5.12 (`mount_setattr`); `openat2` is 5.6.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Errors changing a rootfs; each names the path in the container.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{path} in the container is or passes through a symbolic link; refusing to follow it")]
    Symlink { path: PathBuf },
    #[error("{path} in the container is not a {wanted}")]
    WrongType { path: PathBuf, wanted: &'static str },
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("{0:?} is not an absolute, normalised path")]
    BadPath(PathBuf),
}

fn io_err<'p>(path: &'p Path, what: &'static str) -> impl FnOnce(io::Error) -> InjectError + 'p {
    move |source| InjectError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn cstr(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn last_error<T>() -> io::Result<T> {
    Err(io::Error::last_os_error())
}

/// `openat2(dir, name, flags, RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS)`.
fn openat2(dir: &OwnedFd, name: &[u8], flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    // SAFETY: open_how is plain data; all-zero is its valid default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 {
        u64::from(mode)
    } else {
        0
    };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `name` is NUL-terminated and `how` lives across the call; the size passed is
        // the struct's.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let e = io::Error::last_os_error();
        // The kernel asks for a retry when a rename raced the lookup.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is plain data, filled by the kernel.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return last_error();
    }
    Ok(st)
}

/// The normal components of an absolute, normalised container path.
fn components(path: &Path) -> Result<Vec<&[u8]>, InjectError> {
    if !crate::discover::clean_container_path(path) {
        return Err(InjectError::BadPath(path.to_path_buf()));
    }
    Ok(path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_bytes()),
            _ => None,
        })
        .collect())
}

/// A container's rootfs, held open.
#[derive(Debug)]
pub struct ContainerRoot {
    fd: OwnedFd,
}

/// What sits at a mount target, and so what the target must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    File,
    Directory,
}

impl ContainerRoot {
    /// Opens the rootfs at `path` (a host path the runtime gave; its last component must not
    /// be a link).
    pub fn open(path: &Path) -> Result<Self, InjectError> {
        let c = cstr(path.as_os_str().as_bytes()).map_err(io_err(path, "open the rootfs"))?;
        // SAFETY: a NUL-terminated path; the returned descriptor is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io_err(path, "open the rootfs")(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ContainerRoot { fd })
    }

    /// Opens directory `path` of the container, making what is missing (mode 0755).
    pub fn mkdir_all(&self, path: &Path) -> Result<OwnedFd, InjectError> {
        let parts = components(path)?;
        let mut dir = self.fd.try_clone().map_err(io_err(path, "open"))?;
        let mut walked = PathBuf::from("/");
        for part in parts {
            walked.push(std::ffi::OsStr::from_bytes(part));
            let flags = libc::O_PATH | libc::O_DIRECTORY;
            dir = match openat2(&dir, part, flags, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    let name = cstr(part).map_err(io_err(&walked, "create"))?;
                    // SAFETY: a valid directory descriptor and a NUL-terminated name.
                    let r = unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755) };
                    if r != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(io_err(&walked, "create the directory")(e));
                        }
                    }
                    openat2(&dir, part, flags, 0).map_err(|e| self.explain(&walked, e))?
                }
                Err(e) => return Err(self.explain(&walked, e)),
            };
        }
        Ok(dir)
    }

    fn explain(&self, path: &Path, e: io::Error) -> InjectError {
        match e.raw_os_error() {
            Some(libc::ELOOP) => InjectError::Symlink {
                path: path.to_path_buf(),
            },
            Some(libc::ENOTDIR) => InjectError::WrongType {
                path: path.to_path_buf(),
                wanted: "directory",
            },
            _ => InjectError::Io {
                path: path.to_path_buf(),
                what: "resolve",
                source: e,
            },
        }
    }

    /// The parent directory of `path` (made if missing) and its last component.
    fn parent_of<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p [u8]), InjectError> {
        let name = path
            .file_name()
            .ok_or_else(|| InjectError::BadPath(path.to_path_buf()))?;
        let parent = path
            .parent()
            .ok_or_else(|| InjectError::BadPath(path.to_path_buf()))?;
        Ok((self.mkdir_all(parent)?, name.as_bytes()))
    }

    /// The mount target at `path`: made if missing (an empty file or a directory), else
    /// checked to be that (a link or a device there is refused).
    fn target(&self, path: &Path, kind: Target) -> Result<OwnedFd, InjectError> {
        if kind == Target::Directory {
            return self.mkdir_all(path);
        }
        let (parent, name) = self.parent_of(path)?;
        match openat2(
            &parent,
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o644,
        ) {
            Ok(fd) => drop(fd),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(self.explain(path, e)),
        }
        let fd = openat2(&parent, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| self.explain(path, e))?;
        let st = fstat(&fd).map_err(io_err(path, "stat"))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFSOCK => Ok(fd),
            libc::S_IFLNK => Err(InjectError::Symlink {
                path: path.to_path_buf(),
            }),
            _ => Err(InjectError::WrongType {
                path: path.to_path_buf(),
                wanted: "regular file",
            }),
        }
    }

    /// Bind-mounts host path `source` at `path` in the container, read-only, `nosuid`,
    /// `nodev`.
    pub fn bind_read_only(&self, source: &Path, path: &Path) -> Result<(), InjectError> {
        let src = cstr(source.as_os_str().as_bytes()).map_err(io_err(source, "open"))?;
        let kind = if std::fs::symlink_metadata(source)
            .map_err(io_err(source, "stat the driver file"))?
            .is_dir()
        {
            Target::Directory
        } else {
            Target::File
        };
        let target = self.target(path, kind)?;
        // SAFETY: a NUL-terminated host path; the result is checked.
        let tree = unsafe {
            libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
            )
        };
        if tree < 0 {
            return Err(io_err(source, "clone the driver file's mount")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a new descriptor nothing else owns.
        let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
        // SAFETY: mount_attr is plain data.
        let mut attr: libc::mount_attr = unsafe { std::mem::zeroed() };
        attr.attr_set = libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        let empty = c"";
        // SAFETY: a detached mount's descriptor, an empty NUL-terminated path with
        // AT_EMPTY_PATH, and the attribute struct with its size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if r != 0 {
            return Err(io_err(source, "make the mount read-only")(
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: both descriptors are valid; empty paths with the EMPTY_PATH flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                empty.as_ptr(),
                target.as_raw_fd(),
                empty.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
            )
        };
        if r != 0 {
            return Err(io_err(path, "mount the driver file")(
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Makes character device `path` (mode 0666) unless one with these numbers is there.
    pub fn char_device(&self, path: &Path, major: u32, minor: u32) -> Result<(), InjectError> {
        let (parent, name) = self.parent_of(path)?;
        let c = cstr(name).map_err(io_err(path, "create"))?;
        let dev = libc::makedev(major, minor);
        // SAFETY: a valid directory descriptor and a NUL-terminated name.
        let r =
            unsafe { libc::mknodat(parent.as_raw_fd(), c.as_ptr(), libc::S_IFCHR | 0o666, dev) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(io_err(path, "create the device node")(e));
        }
        let fd = openat2(&parent, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
            .map_err(|e| self.explain(path, e))?;
        let st = fstat(&fd).map_err(io_err(path, "stat"))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFCHR || st.st_rdev != dev {
            return Err(InjectError::WrongType {
                path: path.to_path_buf(),
                wanted: "the expected character device",
            });
        }
        Ok(())
    }

    /// Makes `path` a link to `target` (a name in the same directory): a link already there
    /// is replaced, anything else left alone (the image's own file). Returns whether the
    /// link is ours.
    pub fn symlink(&self, path: &Path, target: &Path) -> Result<bool, InjectError> {
        let (parent, name) = self.parent_of(path)?;
        let c = cstr(name).map_err(io_err(path, "create"))?;
        let t = cstr(target.as_os_str().as_bytes()).map_err(io_err(path, "create"))?;
        for _ in 0..2 {
            // SAFETY: valid descriptor and NUL-terminated strings.
            if unsafe { libc::symlinkat(t.as_ptr(), parent.as_raw_fd(), c.as_ptr()) } == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io_err(path, "create the link")(e));
            }
            let fd = openat2(&parent, name, libc::O_PATH | libc::O_NOFOLLOW, 0)
                .map_err(|e| self.explain(path, e))?;
            if fstat(&fd).map_err(io_err(path, "stat"))?.st_mode & libc::S_IFMT != libc::S_IFLNK {
                return Ok(false);
            }
            // SAFETY: valid descriptor and NUL-terminated name; removes the link itself.
            if unsafe { libc::unlinkat(parent.as_raw_fd(), c.as_ptr(), 0) } != 0 {
                return Err(io_err(path, "replace the link")(io::Error::last_os_error()));
            }
        }
        Ok(false)
    }

    /// Reads regular file `path` of the container, up to `max` bytes; `None` when absent.
    pub fn read_file(&self, path: &Path, max: u64) -> Result<Option<Vec<u8>>, InjectError> {
        let parts = components(path)?;
        let Some((name, dirs)) = parts.split_last() else {
            return Err(InjectError::BadPath(path.to_path_buf()));
        };
        let mut dir = self.fd.try_clone().map_err(io_err(path, "open"))?;
        for part in dirs {
            dir = match openat2(&dir, part, libc::O_PATH | libc::O_DIRECTORY, 0) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(self.explain(path, e)),
            };
        }
        let fd = match openat2(
            &dir,
            name,
            libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            0,
        ) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(self.explain(path, e)),
        };
        if fstat(&fd).map_err(io_err(path, "stat"))?.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(InjectError::WrongType {
                path: path.to_path_buf(),
                wanted: "regular file",
            });
        }
        let mut data = Vec::new();
        File::from(fd)
            .take(max)
            .read_to_end(&mut data)
            .map_err(io_err(path, "read"))?;
        Ok(Some(data))
    }

    /// Replaces file `path` of the container with `data` atomically (a new file in the same
    /// directory, renamed over it; a link at `path` is replaced, never followed).
    pub fn write_file(&self, path: &Path, data: &[u8], mode: u32) -> Result<(), InjectError> {
        let (parent, name) = self.parent_of(path)?;
        let mut tmp_name = b".hyperbox-gpu.".to_vec();
        tmp_name.extend_from_slice(name);
        let tmp = cstr(&tmp_name).map_err(io_err(path, "create"))?;
        // A leftover from an earlier, interrupted run (or anything planted there) goes.
        // SAFETY: valid descriptor, NUL-terminated name.
        unsafe { libc::unlinkat(parent.as_raw_fd(), tmp.as_ptr(), 0) };
        let fd = openat2(
            &parent,
            &tmp_name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
        )
        .map_err(io_err(path, "create"))?;
        let mut f = File::from(fd);
        f.write_all(data).map_err(io_err(path, "write"))?;
        // SAFETY: a valid descriptor.
        unsafe { libc::fchmod(f.as_raw_fd(), mode) };
        drop(f);
        let c = cstr(name).map_err(io_err(path, "create"))?;
        // SAFETY: valid descriptors and NUL-terminated names.
        let r = unsafe {
            libc::renameat(
                parent.as_raw_fd(),
                tmp.as_ptr(),
                parent.as_raw_fd(),
                c.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io_err(path, "replace")(io::Error::last_os_error()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("hyperbox-gpu-inject-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn directories_are_made_and_links_on_the_way_refused() {
        let dir = scratch("mkdir");
        let outside = dir.join("outside");
        fs::create_dir_all(outside.join("lib")).unwrap();
        let root_path = dir.join("rootfs");
        fs::create_dir_all(root_path.join("usr")).unwrap();
        symlink(&outside, root_path.join("usr/lib")).unwrap();
        symlink("../../..", root_path.join("up")).unwrap();
        let root = ContainerRoot::open(&root_path).unwrap();
        root.mkdir_all(Path::new("/usr/share/x")).unwrap();
        assert!(root_path.join("usr/share/x").is_dir());
        for bad in ["/usr/lib/x86_64-linux-gnu", "/up/etc"] {
            let err = root.mkdir_all(Path::new(bad)).unwrap_err();
            assert!(matches!(err, InjectError::Symlink { .. }), "{bad}: {err}");
        }
        assert!(!outside.join("lib/x86_64-linux-gnu").exists());
        assert!(matches!(
            root.mkdir_all(Path::new("/usr/../etc")),
            Err(InjectError::BadPath(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_are_replaced_not_followed() {
        let dir = scratch("files");
        let root_path = dir.join("rootfs");
        fs::create_dir_all(root_path.join("etc")).unwrap();
        fs::write(dir.join("host-file"), b"host").unwrap();
        symlink(dir.join("host-file"), root_path.join("etc/ld.so.cache")).unwrap();
        let root = ContainerRoot::open(&root_path).unwrap();
        assert!(matches!(
            root.read_file(Path::new("/etc/ld.so.cache"), 100),
            Err(InjectError::Symlink { .. })
        ));
        root.write_file(Path::new("/etc/ld.so.cache"), b"new", 0o644)
            .unwrap();
        assert_eq!(fs::read(dir.join("host-file")).unwrap(), b"host");
        assert_eq!(fs::read(root_path.join("etc/ld.so.cache")).unwrap(), b"new");
        assert_eq!(
            root.read_file(Path::new("/etc/ld.so.cache"), 100)
                .unwrap()
                .unwrap(),
            b"new"
        );
        assert_eq!(root.read_file(Path::new("/etc/absent"), 100).unwrap(), None);
        // A link the image planted at a SONAME is replaced; a file is left alone.
        symlink("/etc/shadow", root_path.join("etc/libcuda.so.1")).unwrap();
        assert!(root
            .symlink(Path::new("/etc/libcuda.so.1"), Path::new("libcuda.so.550"))
            .unwrap());
        assert_eq!(
            fs::read_link(root_path.join("etc/libcuda.so.1")).unwrap(),
            Path::new("libcuda.so.550")
        );
        fs::write(root_path.join("etc/own.so.1"), b"image").unwrap();
        assert!(!root
            .symlink(Path::new("/etc/own.so.1"), Path::new("x"))
            .unwrap());
        // A mount target that is a link is refused.
        symlink("/etc/passwd", root_path.join("etc/target")).unwrap();
        assert!(matches!(
            root.target(Path::new("/etc/target"), Target::File),
            Err(InjectError::Symlink { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}

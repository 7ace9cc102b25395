//! A template's two layers as tar archives and back: CRIU's images (flat, regular files) and
//! the rootfs changes (owners, modes, times, hard links, overlay whiteouts and the extended
//! attributes a template keeps). Unpacking refuses anything a capture does not make: an
//! archive comes from a registry, which is not trusted.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use super::err;

/// The extended attribute that marks an overlay directory opaque.
const OPAQUE: &str = "trusted.overlay.opaque";
/// PAX's key prefix for extended attributes.
const PAX_XATTR: &str = "SCHILY.xattr.";

/// A file written while its SHA-256 is computed.
struct Hashed<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A layer written to a file, with its digest and size.
pub(super) struct Blob {
    pub(super) path: PathBuf,
    pub(super) digest: String,
    pub(super) size: u64,
}

fn new_blob(path: &Path) -> Result<tar::Builder<Hashed<fs::File>>, String> {
    let file =
        fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut builder = tar::Builder::new(Hashed {
        inner: file,
        hasher: Sha256::new(),
        size: 0,
    });
    builder.follow_symlinks(false);
    Ok(builder)
}

fn finish_blob(builder: tar::Builder<Hashed<fs::File>>, path: &Path) -> Result<Blob, String> {
    let mut hashed = builder
        .into_inner()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    hashed
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(Blob {
        path: path.to_path_buf(),
        digest: format!("sha256:{:x}", hashed.hasher.finalize()),
        size: hashed.size,
    })
}

/// CRIU's images: the files of one directory.
pub(super) fn tar_images(dir: &Path, out: &Path) -> Result<Blob, String> {
    let mut builder = new_blob(out)?;
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        builder
            .append_path_with_name(&path, &name)
            .map_err(|e| format!("cannot archive {}: {e}", path.display()))?;
    }
    finish_blob(builder, out)
}

/// The rootfs changes: every entry with its owner, mode and times, whiteouts (character
/// devices 0:0), hard links, and the extended attributes overlay and programs use.
pub(super) fn tar_rootfs(dir: &Path, out: &Path) -> Result<Blob, String> {
    let mut builder = new_blob(out)?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names.into_iter().rev() {
            let rel = rel.join(&name);
            let full = dir.join(&rel);
            let meta =
                fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let xattrs = if meta.file_type().is_symlink() {
                Vec::new()
            } else {
                kept_xattrs(&full)?
            };
            if !xattrs.is_empty() {
                builder
                    .append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let ft = meta.file_type();
            if ft.is_file() && meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, &rel, first)
                        .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
                    continue;
                }
                links.insert(key, rel.clone());
            }
            if ft.is_dir() {
                builder
                    .append_data(&mut header, &rel, io::empty())
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
                stack.push(rel);
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                builder
                    .append_link(&mut header, &rel, &target)
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else if ft.is_file() {
                let file = fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                builder
                    .append_data(&mut header, &rel, file)
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let rdev = meta.rdev();
                header.set_device_major(libc::major(rdev)).ok();
                header.set_device_minor(libc::minor(rdev)).ok();
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, io::empty())
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else {
                return Err(format!(
                    "{}: a socket is not kept in a template",
                    full.display()
                ));
            }
        }
    }
    finish_blob(builder, out)
}

/// The extended attributes a template keeps: overlay's opaque mark, file capabilities and
/// `user.*`. Others (overlay's redirects, SELinux labels, ACLs) are not carried.
fn allowed_xattr(name: &str) -> bool {
    name == OPAQUE || name == "security.capability" || name.starts_with("user.")
}

fn kept_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for name in xattr::list(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let name = name.to_string_lossy().into_owned();
        if !allowed_xattr(&name) {
            continue;
        }
        if let Some(value) =
            xattr::get(path, &name).map_err(|e| format!("{}: {e}", path.display()))?
        {
            out.push((format!("{PAX_XATTR}{name}"), value));
        }
    }
    Ok(out)
}

/// A path from an archive: relative, of plain components.
fn plain(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(format!("{} is not a plain relative path", path.display())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{:?} names no file", path));
    }
    Ok(out)
}

fn archive(path: &Path) -> Result<tar::Archive<fs::File>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    Ok(archive)
}

/// CRIU's images: regular files of plain names, nothing else.
pub(super) fn untar_images(blob: &Path, dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut archive = archive(blob)?;
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = entry.path().map_err(err)?.into_owned();
        let name = plain(&path)?;
        if name.components().count() != 1 || entry.header().entry_type() != tar::EntryType::Regular
        {
            return Err(format!(
                "{} is not a file of CRIU's images (a plain name, a regular file)",
                path.display()
            ));
        }
        let target = dir.join(&name);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        io::copy(&mut entry, &mut out)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// The rootfs changes: directories, files, links, fifos and whiteouts (character devices
/// 0:0) at plain paths inside `dir`, and only the extended attributes a capture keeps. Other
/// device nodes are refused: a template's layer is not a way to hand a container devices.
pub(super) fn untar_rootfs(blob: &Path, dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut archive = archive(blob)?;
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = plain(&entry.path().map_err(err)?)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link
            | tar::EntryType::Fifo => {}
            tar::EntryType::Char => {
                let (major, minor) = (
                    entry.header().device_major().ok().flatten(),
                    entry.header().device_minor().ok().flatten(),
                );
                if (major, minor) != (Some(0), Some(0)) {
                    return Err(format!(
                        "{} is a device node other than a whiteout (0:0)",
                        path.display()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "{}: entries of type {other:?} are not kept in templates",
                    path.display()
                ))
            }
        }
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(err)? {
            for ext in pax {
                let ext = ext.map_err(err)?;
                let key = ext.key().map_err(err)?;
                if let Some(name) = key.strip_prefix(PAX_XATTR) {
                    if !allowed_xattr(name) {
                        return Err(format!(
                            "{}: extended attribute {name} is not kept in templates",
                            path.display()
                        ));
                    }
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        if !xattrs.is_empty() && matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            return Err(format!(
                "{}: links carry no extended attributes",
                path.display()
            ));
        }
        let target = dir.join(&path);
        if kind == tar::EntryType::Char {
            // The tar crate makes device nodes with mknod; a whiteout is made here so its mode
            // and owner are exact, under a parent checked to be inside `dir`.
            check_parent(dir, &path)?;
            let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(err)?;
            // SAFETY: mknod of a path the caller made, under a checked parent.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                return Err(format!(
                    "cannot make whiteout {}: {}",
                    target.display(),
                    io::Error::last_os_error()
                ));
            }
            let h = entry.header();
            let (uid, gid) = (h.uid().map_err(err)? as u32, h.gid().map_err(err)? as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown {}: {e}", target.display()))?;
        } else if !entry
            .unpack_in(dir)
            .map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => format!("{}: {e}: {cause}", path.display()),
                None => format!("{}: {e}", path.display()),
            })?
        {
            return Err(format!("{} would be outside the template", path.display()));
        }
        for (name, value) in &xattrs {
            xattr::set(&target, name, value)
                .map_err(|e| format!("cannot set {name} on {}: {e}", target.display()))?;
        }
        if kind == tar::EntryType::Directory {
            let h = entry.header();
            dirs.push((target, h.mode().map_err(err)?, h.mtime().map_err(err)?));
        }
    }
    // Directories' modes and times once their contents are in.
    for (d, mode, mtime) in dirs.into_iter().rev() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(mode & 0o7777));
        let t = filetime_of(mtime);
        let _ = set_mtime(&d, t);
    }
    Ok(())
}

fn filetime_of(secs: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    }
}

fn set_mtime(path: &Path, t: libc::timespec) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let times = [t, t];
    // SAFETY: utimensat with a valid path and two timespecs.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `path`'s parent, inside `dir`, is a directory reached without a symbolic link.
fn check_parent(dir: &Path, path: &Path) -> Result<(), String> {
    let mut at = dir.to_path_buf();
    if let Some(parent) = path.parent() {
        for c in parent.components() {
            at.push(c);
            let meta = fs::symlink_metadata(&at).map_err(|e| format!("{}: {e}", at.display()))?;
            if !meta.is_dir() {
                return Err(format!("{} is not a directory", at.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hyperbox-dist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rootfs_changes_come_back_as_they_were() {
        if !root() {
            hyperbox_testkit::skip("whiteouts and trusted.* attributes need root");
            return;
        }
        let dir = scratch("roundtrip");
        let src = dir.join("src");
        fs::create_dir_all(src.join("opaque/inner")).unwrap();
        xattr::set(src.join("opaque"), OPAQUE, b"y").unwrap();
        fs::write(src.join("opaque/inner/file"), b"kept").unwrap();
        fs::set_permissions(
            src.join("opaque/inner/file"),
            fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        fs::hard_link(src.join("opaque/inner/file"), src.join("linked")).unwrap();
        symlink("/etc/passwd", src.join("link")).unwrap();
        let wh = std::ffi::CString::new(src.join("gone").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mknod of a NUL-terminated path in the test's scratch directory.
        assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
        std::os::unix::fs::lchown(src.join("link"), Some(7), Some(8)).unwrap();
        // Not carried: an overlay redirect.
        xattr::set(src.join("opaque/inner"), "trusted.overlay.redirect", b"/x").unwrap();

        let blob = tar_rootfs(&src, &dir.join("rootfs.tar")).unwrap();
        assert!(blob.digest.starts_with("sha256:") && blob.size > 0);
        let out = dir.join("out");
        untar_rootfs(&blob.path, &out).unwrap();

        assert_eq!(
            xattr::get(out.join("opaque"), OPAQUE).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            xattr::get(out.join("opaque/inner"), "trusted.overlay.redirect").unwrap(),
            None
        );
        assert_eq!(fs::read(out.join("opaque/inner/file")).unwrap(), b"kept");
        let meta = fs::metadata(out.join("opaque/inner/file")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4750);
        assert_eq!(
            meta.ino(),
            fs::metadata(out.join("linked")).unwrap().ino(),
            "a hard link"
        );
        assert_eq!(
            fs::read_link(out.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(fs::symlink_metadata(out.join("link")).unwrap().uid(), 7);
        let gone = fs::symlink_metadata(out.join("gone")).unwrap();
        assert!(
            gone.file_type().is_char_device() && gone.rdev() == 0,
            "a whiteout"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A tar of one entry made by hand: what a hostile registry could send.
    fn hostile(dir: &Path, build: impl FnOnce(&mut tar::Builder<fs::File>)) -> PathBuf {
        let path = dir.join("hostile.tar");
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        build(&mut b);
        b.finish().unwrap();
        path
    }

    fn entry(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    /// Writes `name` into the header's raw name field (the tar crate refuses `..` itself).
    fn raw_name(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
    }

    #[test]
    fn hostile_archives_are_refused() {
        if !root() {
            hyperbox_testkit::skip("unpacking with owners needs root");
            return;
        }
        let dir = scratch("hostile");
        type Build = Box<dyn FnOnce(&mut tar::Builder<fs::File>)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "not a plain relative path",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Regular, 1);
                    raw_name(&mut h, "../escape");
                    b.append(&h, &b"x"[..]).unwrap();
                }),
            ),
            (
                "device node other than a whiteout",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Char, 0);
                    h.set_device_major(1).unwrap();
                    h.set_device_minor(3).unwrap();
                    b.append_data(&mut h, "null", io::empty()).unwrap();
                }),
            ),
            (
                "trusted.overlay.redirect is not kept",
                Box::new(|b| {
                    b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.redirect", &b"/"[..])])
                        .unwrap();
                    let mut h = entry(tar::EntryType::Directory, 0);
                    b.append_data(&mut h, "d", io::empty()).unwrap();
                }),
            ),
            (
                "outside",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Symlink, 0);
                    b.append_link(&mut h, "up", "/").unwrap();
                    let mut h = entry(tar::EntryType::Regular, 1);
                    b.append_data(&mut h, "up/etc/owned", &b"x"[..]).unwrap();
                }),
            ),
            (
                "outside",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Link, 0);
                    b.append_link(&mut h, "passwd", "../../../../etc/passwd")
                        .unwrap();
                }),
            ),
        ];
        for (i, (says, build)) in cases.into_iter().enumerate() {
            let tar = hostile(&dir, build);
            let out = dir.join(format!("out-{i}"));
            let e = untar_rootfs(&tar, &out).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
        assert!(!Path::new("/etc/owned").exists());
        // CRIU's images: plain files only.
        let tar = hostile(&dir, |b| {
            let mut h = entry(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "pages-1.img", "/etc/shadow").unwrap();
        });
        let e = untar_images(&tar, &dir.join("images")).unwrap_err();
        assert!(e.contains("not a file of CRIU's images"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }
}

//! The overlay layers templates are made of: a container's overlay rootfs (its upper
//! directory, its image's layers), copies of its changes (squashed over the template layer it
//! was restored from), the overlays that use a template's layer, and the trees' sizes and syncs.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use hyperbox_shim_core::{EngineError, OwnedChild, RootfsMount};

use super::failed;

/// An overlay rootfs: where the container's changes go, and the image's layers.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Overlay {
    pub(super) upper: PathBuf,
    pub(super) layers: Vec<PathBuf>,
}

pub(super) fn overlay_of(mounts: &[RootfsMount]) -> Result<Overlay, String> {
    if mounts.is_empty() {
        return Err(
            "templates need the rootfs as the snapshotter's mounts, given to the \
                    runtime to mount (as containerd's clients and CRI give them); this \
                    container's engine mounted the rootfs itself (as Docker does, with its \
                    own storage or the containerd image store)"
                .to_string(),
        );
    }
    let [m] = mounts else {
        return Err(format!(
            "templates need a rootfs of one overlay mount (the overlayfs or hyperbox \
             snapshotter); this one has {} mounts",
            mounts.len()
        ));
    };
    let option = |key: &str| {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
    };
    match (m.kind.as_str(), option("upperdir"), option("lowerdir")) {
        ("overlay", Some(upper), Some(lower)) => Ok(Overlay {
            upper: PathBuf::from(upper),
            layers: lower.split(':').map(layer_identity).collect(),
        }),
        _ => Err(format!(
            "templates need a writable overlay rootfs (the overlayfs or hyperbox snapshotter); \
             this one is a {} mount",
            m.kind
        )),
    }
}

/// A lower directory as the snapshot it belongs to: `.../snapshots/3/fs` and
/// `.../snapshots/3/erofs` are both `.../snapshots/3`.
fn layer_identity(dir: &str) -> PathBuf {
    let p = Path::new(dir);
    match (p.file_name().and_then(|n| n.to_str()), p.parent()) {
        (Some("fs" | "erofs"), Some(parent)) => parent.to_path_buf(),
        _ => p.to_path_buf(),
    }
}

/// Copies the tree `from` onto `to` (created if missing, else merged into) as it is: owners,
/// modes, times,
/// extended attributes (an overlay's opaque directories), device nodes (its whiteouts),
/// links never followed.
pub(super) fn copy_tree(from: &Path, to: &Path, deadline: Instant) -> Result<(), EngineError> {
    let mut child = OwnedChild::spawn(
        Command::new("cp")
            .args(["-a", "--no-target-directory", "--"])
            .arg(from)
            .arg(to)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .map_err(|e| failed(format!("cannot run cp: {e}")))?;
    // Its errors are read meanwhile, so that many of them cannot fill the pipe and stall it.
    let stderr = child.stderr().take();
    let reading = std::thread::spawn(move || {
        let mut said = Vec::new();
        if let Some(mut e) = stderr {
            let _ = io::Read::read_to_end(&mut e, &mut said);
        }
        said
    });
    // Past the capture's deadline the copy is stopped.
    let left = deadline.saturating_duration_since(Instant::now());
    let status = match child.wait_for(Some(left)) {
        Ok(Some(status)) => status,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(failed(format!(
                "the copy of {} did not finish within the template settings' \
                 capture_timeout: it was stopped",
                from.display()
            )));
        }
        Err(e) => return Err(failed(format!("cannot wait for cp: {e}"))),
    };
    let said = reading.join().unwrap_or_default();
    if !status.success() {
        return Err(failed(format!(
            "cannot copy {} to {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&said).trim()
        )));
    }
    Ok(())
}

/// The mount points of overlays (in this mount namespace, the host's and the shims') that
/// have `layer` as a lower directory.
pub(super) fn overlays_using(layer: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    overlays_in(&text, layer)
}

/// [`overlays_using`] over the mount table `mountinfo`.
fn overlays_in(mountinfo: &str, layer: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut fields = right.split(' ');
            let (fstype, _source, options) = (fields.next()?, fields.next()?, fields.next()?);
            let lower = options
                .split(',')
                .find_map(|o| o.strip_prefix("lowerdir="))?;
            let uses = lower.split(':').any(|d| Path::new(&unescape(d)) == layer);
            (fstype == "overlay" && uses)
                .then(|| PathBuf::from(unescape(left.split(' ').nth(4).unwrap_or_default())))
        })
        .collect()
}

/// A mountinfo field as it was given: the kernel writes space, tab, newline and backslash (and
/// in overlay options, comma) as `\ooo`. (procfs' `MountInfo` leaves them escaped.)
fn unescape(s: &str) -> String {
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

/// Puts the overlay upper directory `upper` over the layer `dest` (a copy of a lower layer),
/// as the overlay showed them: what `upper` deletes (whiteouts), hides (opaque directories)
/// or replaces goes first, then its entries are copied in. `dest` stays a layer: whiteouts
/// and opaque directories are kept, for the image layers below.
pub(super) fn squash(upper: &Path, dest: &Path, deadline: Instant) -> Result<(), EngineError> {
    clear_for(upper, dest).map_err(|e| {
        failed(format!(
            "cannot put {} over {}: {e}",
            upper.display(),
            dest.display()
        ))
    })?;
    // Onto an existing directory, a copy of a tree merges into it.
    copy_tree(upper, dest, deadline)
}

/// Removes from `dest` what the entries of the upper directory `upper` replace.
fn clear_for(upper: &Path, dest: &Path) -> io::Result<()> {
    for entry in fs::read_dir(upper)? {
        let entry = entry?;
        let target = dest.join(entry.file_name());
        let Ok(existing) = fs::symlink_metadata(&target) else {
            continue;
        };
        let meta = entry.metadata()?;
        let remove = |t: &Path| {
            if existing.is_dir() {
                fs::remove_dir_all(t)
            } else {
                fs::remove_file(t)
            }
        };
        if meta.is_dir() && existing.is_dir() && !is_opaque(&entry.path()) {
            clear_for(&entry.path(), &target)?;
        } else {
            remove(&target)?;
        }
    }
    Ok(())
}

/// An overlay opaque directory: `trusted.overlay.opaque` is `y`.
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: lgetxattr writes at most `value.len()` bytes into `value`.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Bytes on disk under `path`, links not followed.
pub fn disk_usage(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in fs::read_dir(path).into_iter().flatten().flatten() {
            total += disk_usage(&entry.path());
        }
    }
    total
}

/// fsync(2) of every file and directory under `path` (not the whole filesystem, as syncfs
/// would: a busy host may have much else to write).
pub(super) fn sync_tree(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.is_dir() {
        for entry in fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
    } else if !meta.is_file() {
        return Ok(());
    }
    fs::File::open(path)?.sync_all()
}

/// The rootfs of a container as one overlay mount with `options`, as a snapshotter gives it.
#[cfg(test)]
pub(super) fn overlay_mounts(options: &[&str]) -> Vec<RootfsMount> {
    vec![RootfsMount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options: options.iter().map(|s| s.to_string()).collect(),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;
    use std::time::Duration;

    #[test]
    fn an_overlay_gives_its_upper_dir_and_layers() {
        let o = overlay_of(&overlay_mounts(&[
            "index=off",
            "workdir=/s/snapshots/9/work",
            "upperdir=/s/snapshots/9/fs",
            "lowerdir=/s/snapshots/3/erofs:/s/snapshots/1/fs:/other",
        ]))
        .unwrap();
        assert_eq!(o.upper, PathBuf::from("/s/snapshots/9/fs"));
        assert_eq!(
            o.layers,
            [
                PathBuf::from("/s/snapshots/3"),
                PathBuf::from("/s/snapshots/1"),
                PathBuf::from("/other")
            ]
        );
        let e = overlay_of(&overlay_mounts(&["lowerdir=/a:/b"])).unwrap_err();
        assert!(e.contains("writable overlay"), "{e}");
        let e = overlay_of(&[]).unwrap_err();
        assert!(e.contains("mounted the rootfs itself"), "{e}");
    }

    fn set_opaque(dir: &Path) {
        let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: setxattr reads the name and one byte of value.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"trusted.overlay.opaque".as_ptr(),
                b"y".as_ptr().cast(),
                1,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    #[test]
    fn an_upper_dir_squashed_over_a_layer_is_what_the_overlay_showed() {
        let root = std::env::temp_dir().join(format!("hb-squash-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let (layer, upper, dest) = (root.join("layer"), root.join("upper"), root.join("dest"));
        for d in ["a", "gone", "hidden", "file-then-dir"] {
            fs::create_dir_all(layer.join(d)).unwrap();
        }
        fs::write(layer.join("a/kept"), "layer").unwrap();
        fs::write(layer.join("a/changed"), "layer").unwrap();
        fs::write(layer.join("gone/x"), "layer").unwrap();
        fs::write(layer.join("hidden/x"), "layer").unwrap();
        fs::write(layer.join("dir-then-file"), "layer").unwrap();
        fs::create_dir_all(upper.join("a")).unwrap();
        fs::write(upper.join("a/changed"), "upper").unwrap();
        fs::write(upper.join("a/new"), "upper").unwrap();
        nix::sys::stat::mknod(
            &upper.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        fs::create_dir_all(upper.join("hidden")).unwrap();
        set_opaque(&upper.join("hidden"));
        fs::write(upper.join("hidden/y"), "upper").unwrap();
        fs::write(upper.join("file-then-dir"), "upper").unwrap();
        fs::create_dir_all(upper.join("dir-then-file")).unwrap();

        copy_tree(&layer, &dest, Instant::now() + Duration::from_secs(60)).unwrap();
        squash(&upper, &dest, Instant::now() + Duration::from_secs(60)).unwrap();
        let read = |p: &str| fs::read_to_string(dest.join(p)).ok();
        assert_eq!(read("a/kept").as_deref(), Some("layer"));
        assert_eq!(read("a/changed").as_deref(), Some("upper"));
        assert_eq!(read("a/new").as_deref(), Some("upper"));
        let gone = fs::symlink_metadata(dest.join("gone")).unwrap();
        assert!(
            gone.file_type().is_char_device() && gone.rdev() == 0,
            "a whiteout is kept"
        );
        assert!(
            !dest.join("hidden/x").exists(),
            "an opaque directory hides the layer's"
        );
        assert_eq!(read("hidden/y").as_deref(), Some("upper"));
        assert!(is_opaque(&dest.join("hidden")));
        assert_eq!(read("file-then-dir").as_deref(), Some("upper"));
        assert!(dest.join("dir-then-file").is_dir());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn escaped_paths_in_the_mount_table_are_read_as_given() {
        let table = "\
90 22 0:50 / /run/a\\040b/rootfs rw - overlay overlay rw,lowerdir=/t/my\\040layer:/t/base,upperdir=/t/u
91 22 0:51 / /run/c/rootfs rw - overlay overlay rw,lowerdir=/t/my,upperdir=/t/u2
92 22 8:1 /t/my\\040layer /mnt/bind rw - ext4 /dev/vda rw
";
        assert_eq!(
            overlays_in(table, Path::new("/t/my layer")),
            [PathBuf::from("/run/a b/rootfs")]
        );
        assert_eq!(
            overlays_in(table, Path::new("/t/my")),
            [PathBuf::from("/run/c/rootfs")]
        );
        assert!(overlays_in(table, Path::new("/t/my\\040layer")).is_empty());
        assert_eq!(unescape("/x\\134y\\011z"), "/x\\y\tz");
    }

    #[test]
    fn a_layer_in_use_by_an_overlay_is_found() {
        // A space in the path: the kernel's mount table escapes it.
        let root = std::env::temp_dir().join(format!("hb in-use-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for d in ["layer", "base", "upper", "work", "merged"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        let layer = root.join("layer");
        assert!(overlays_using(&layer).is_empty());
        let options = format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            layer.display(),
            root.join("base").display(),
            root.join("upper").display(),
            root.join("work").display()
        );
        nix::mount::mount(
            Some("overlay"),
            &root.join("merged"),
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .unwrap();
        let users = overlays_using(&layer);
        nix::mount::umount2(&root.join("merged"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(users, [root.join("merged")]);
        fs::remove_dir_all(&root).unwrap();
    }
}

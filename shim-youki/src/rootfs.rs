//! Mounting the rootfs containerd describes in Create at `BUNDLE/rootfs`, and unmounting it at
//! delete, as runc's shim does. Runs in the zygote.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use hyperbox_shim_core::RootfsMount;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{mkdirat, Mode};

use crate::error::YoukiError;

/// Mount options that are flags rather than filesystem data: (name, flag, clears it).
const FLAGS: &[(&str, MsFlags, bool)] = &[
    ("async", MsFlags::MS_SYNCHRONOUS, true),
    ("atime", MsFlags::MS_NOATIME, true),
    ("bind", MsFlags::MS_BIND, false),
    ("defaults", MsFlags::empty(), false),
    ("dev", MsFlags::MS_NODEV, true),
    ("diratime", MsFlags::MS_NODIRATIME, true),
    ("dirsync", MsFlags::MS_DIRSYNC, false),
    ("exec", MsFlags::MS_NOEXEC, true),
    ("mand", MsFlags::MS_MANDLOCK, false),
    ("noatime", MsFlags::MS_NOATIME, false),
    ("nodev", MsFlags::MS_NODEV, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, false),
    ("noexec", MsFlags::MS_NOEXEC, false),
    ("nomand", MsFlags::MS_MANDLOCK, true),
    ("norelatime", MsFlags::MS_RELATIME, true),
    ("nostrictatime", MsFlags::MS_STRICTATIME, true),
    ("nosuid", MsFlags::MS_NOSUID, false),
    ("rbind", MsFlags::MS_BIND.union(MsFlags::MS_REC), false),
    ("relatime", MsFlags::MS_RELATIME, false),
    ("remount", MsFlags::MS_REMOUNT, false),
    ("ro", MsFlags::MS_RDONLY, false),
    ("rw", MsFlags::MS_RDONLY, true),
    ("strictatime", MsFlags::MS_STRICTATIME, false),
    ("suid", MsFlags::MS_NOSUID, true),
    ("sync", MsFlags::MS_SYNCHRONOUS, false),
];

/// Splits containerd mount options into mount flags and the data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match FLAGS.iter().find(|(name, _, _)| name == o) {
            Some((_, f, true)) => flags.remove(*f),
            Some((_, f, false)) => flags.insert(*f),
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mounts `mounts` one over the other at `target`.
pub fn mount_all(mounts: &[RootfsMount], target: &Path) -> Result<(), YoukiError> {
    if mounts.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(YoukiError::io("create rootfs mount point", target))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// The mount(2) data limit: one page.
const PAGE: usize = 4096;

fn mount_one(m: &RootfsMount, target: &Path) -> Result<(), YoukiError> {
    let (flags, data) = parse_options(&m.options);
    // Long overlay lowerdir lists (images of many layers) overflow the page mount(2) takes:
    // as runc's shim does, the lowerdirs are given relative to their common parent, which
    // becomes the working directory for the mount (the zygote is single-threaded).
    let (data, chdir) = if data.len() >= PAGE && m.kind == "overlay" {
        compact_lowerdir(&data)
    } else {
        (data, None)
    };
    if data.len() >= PAGE {
        return Err(YoukiError::Failed(format!(
            "rootfs mount options of {} bytes are too long (more than a page) for {}",
            data.len(),
            target.display()
        )));
    }
    let fstype = (!m.kind.is_empty() && m.kind != "bind").then_some(m.kind.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    let mounted = match &chdir {
        Some(dir) => in_dir(dir, || {
            mount(Some(m.source.as_str()), target, fstype, flags, data)
        }),
        None => mount(Some(m.source.as_str()), target, fstype, flags, data),
    };
    mounted.map_err(|e| YoukiError::Mount {
        from: m.source.clone(),
        kind: m.kind.clone(),
        target: target.to_path_buf(),
        source: e.into(),
    })?;
    // A read-only bind mount needs a remount to become read-only.
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        mount::<str, Path, str, str>(None, target, None, flags | MsFlags::MS_REMOUNT, None)
            .map_err(|e| YoukiError::io("remount read-only", target)(e.into()))?;
    }
    Ok(())
}

/// Runs `f` with `dir` as the working directory, then returns to `/`.
fn in_dir<T>(dir: &Path, f: impl FnOnce() -> nix::Result<T>) -> nix::Result<T> {
    nix::unistd::chdir(dir)?;
    let r = f();
    let _ = nix::unistd::chdir("/");
    r
}

/// Rewrites the `lowerdir=` option of overlay mount data with paths relative to the lower
/// dirs' longest common parent directory; returns the data and that directory, or the data
/// unchanged when nothing is gained.
fn compact_lowerdir(data: &str) -> (String, Option<PathBuf>) {
    let opts: Vec<&str> = data.split(',').collect();
    let Some(at) = opts.iter().position(|o| o.starts_with("lowerdir=")) else {
        return (data.to_string(), None);
    };
    let lowers: Vec<&str> = opts[at]["lowerdir=".len()..].split(':').collect();
    if lowers.len() < 2 || !lowers.iter().all(|l| l.starts_with('/')) {
        return (data.to_string(), None);
    }
    // The longest prefix ending at a '/' that every lower dir shares.
    let first = lowers[0];
    let mut common = first.len();
    for l in &lowers[1..] {
        common = common.min(
            first
                .bytes()
                .zip(l.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    let Some(cut) = first[..common].rfind('/') else {
        return (data.to_string(), None);
    };
    if cut == 0 {
        return (data.to_string(), None);
    }
    let dir = &first[..cut];
    let relative: Vec<&str> = lowers.iter().map(|l| &l[cut + 1..]).collect();
    if relative.iter().any(|r| r.is_empty()) {
        return (data.to_string(), None);
    }
    let mut out: Vec<String> = opts.iter().map(|o| o.to_string()).collect();
    out[at] = format!("lowerdir={}", relative.join(":"));
    (out.join(","), Some(dir.into()))
}

/// The name libcontainer knows for a recursive rootfs propagation runc takes, or `None` when
/// the name needs no change.
fn libcontainer_propagation(name: &str) -> Option<&'static str> {
    match name {
        "rshared" => Some("shared"),
        "rslave" => Some("slave"),
        "rprivate" => Some("private"),
        "runbindable" => Some("unbindable"),
        _ => None,
    }
}

/// Edits the bundle's `config.json` with `edit` and replaces the file whole (a temporary file,
/// given the original's mode, renamed over it), before libcontainer reads it.
pub fn rewrite_config(
    bundle: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Result<(), YoukiError> {
    let path = bundle.join("config.json");
    let mut config: serde_json::Value = std::fs::read(&path)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .map_err(YoukiError::io("read", &path))?;
    edit(&mut config);
    let tmp = bundle.join(".config.json.hyperbox");
    let bytes =
        serde_json::to_vec(&config).map_err(|e| YoukiError::io("encode", &path)(e.into()))?;
    std::fs::write(&tmp, bytes)
        .and_then(|()| {
            let mode = std::fs::metadata(&path)?.permissions();
            std::fs::set_permissions(&tmp, mode)?;
            std::fs::rename(&tmp, &path)
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            YoukiError::io("rewrite", path)(e)
        })
}

/// What the rootfs checks need from a bundle's `config.json`.
#[derive(Debug, Clone, Default)]
pub struct SpecPaths {
    /// `root.path`, made absolute against the bundle.
    pub root: PathBuf,
    /// `process.cwd`.
    pub cwd: Option<String>,
    /// The destinations of the spec's mounts.
    pub mount_destinations: Vec<String>,
    /// `linux.rootfsPropagation`.
    pub root_propagation: Option<String>,
    /// `linux.cgroupsPath`.
    pub cgroups_path: Option<PathBuf>,
}

impl SpecPaths {
    pub fn read(bundle: &Path) -> Result<Self, YoukiError> {
        let path = bundle.join("config.json");
        let config: serde_json::Value = std::fs::read(&path)
            .and_then(|b| Ok(serde_json::from_slice(&b)?))
            .map_err(|e| YoukiError::Config {
                path,
                source: e.into(),
            })?;
        let text = |p: &str| {
            config
                .pointer(p)
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        Ok(SpecPaths {
            root: bundle.join(text("/root/path").unwrap_or_else(|| "rootfs".into())),
            cwd: text("/process/cwd"),
            mount_destinations: config
                .pointer("/mounts")
                .and_then(|m| m.as_array())
                .into_iter()
                .flatten()
                .filter_map(|m| Some(m.get("destination")?.as_str()?.to_string()))
                .collect(),
            root_propagation: text("/linux/rootfsPropagation"),
            cgroups_path: text("/linux/cgroupsPath").map(PathBuf::from),
        })
    }

    /// Writes `linux.rootfsPropagation` in the bundle's `config.json` in the form libcontainer
    /// knows when the spec uses one of the recursive names runc also takes (containerd's CRI
    /// writes `rshared` for pods with Bidirectional mount propagation and `rslave` for
    /// HostToContainer). libcontainer already applies `shared`, `slave` and `private`
    /// recursively to the mounts it sets up (`MS_REC`), so `rshared` becomes `shared` and so on;
    /// `runbindable` becomes `unbindable`. Any other value is left for libcontainer to refuse.
    /// The file is replaced whole (a temporary file renamed over it).
    pub fn normalize_root_propagation(&mut self, bundle: &Path) -> Result<(), YoukiError> {
        let Some(known) = self
            .root_propagation
            .as_deref()
            .and_then(libcontainer_propagation)
        else {
            return Ok(());
        };
        rewrite_config(bundle, |config| {
            config["linux"]["rootfsPropagation"] = known.into();
        })?;
        self.root_propagation = Some(known.to_string());
        Ok(())
    }

    /// Creates `process.cwd` in the rootfs when it is missing, as runc does, so a process
    /// may start in a directory the image lacks. Walks from the rootfs without following
    /// symlinks (a symlinked component is left to the runtime, which resolves it inside the
    /// container); a cwd under one of the spec's mounts is left alone too (it lives in that
    /// mount, not in the rootfs).
    pub fn create_cwd(&self) -> Result<(), YoukiError> {
        let Some(cwd) = &self.cwd else {
            return Ok(());
        };
        let cwd_path = Path::new(cwd);
        if self
            .mount_destinations
            .iter()
            .any(|d| d != "/" && cwd_path.starts_with(d))
        {
            return Ok(());
        }
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_PATH;
        let raw = nix::fcntl::open(&self.root, flags, Mode::empty())
            .map_err(|e| YoukiError::io("open rootfs", &self.root)(e.into()))?;
        // SAFETY: `open` returned a new fd that nothing else owns.
        let mut dir = unsafe { OwnedFd::from_raw_fd(raw) };
        for part in cwd_path.components() {
            let Component::Normal(name) = part else {
                continue;
            };
            let next = match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    let mode = Mode::from_bits_truncate(0o755);
                    match mkdirat(Some(dir.as_raw_fd()), name, mode) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(YoukiError::io("create the cwd", self.root.join(name))(
                                e.into(),
                            ))
                        }
                    }
                    openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()).map_err(|e| {
                        YoukiError::io("open the cwd", self.root.join(name))(e.into())
                    })?
                }
                // A symlink or a file: the runtime decides (and names it when it fails).
                Err(_) => return Ok(()),
            };
            // SAFETY: `openat` returned a new fd that nothing else owns.
            dir = unsafe { OwnedFd::from_raw_fd(next) };
        }
        Ok(())
    }

    /// After a failed create, names the working directory when it is what failed:
    /// libcontainer reports a failed `chdir` without the path. Looked up without following
    /// symlinks (the rootfs is the container's, not the host's); says nothing when unsure.
    pub fn diagnose_cwd(&self) -> Option<String> {
        let cwd = self.cwd.as_deref()?;
        let mut path = self.root.clone();
        for part in Path::new(cwd).components() {
            if let Component::Normal(p) = part {
                path.push(p);
                let meta = std::fs::symlink_metadata(&path).ok()?;
                if meta.file_type().is_symlink() {
                    return None;
                }
                if !meta.is_dir() {
                    return Some(format!(
                        "the process's cwd {cwd:?} is not a directory in the container"
                    ));
                }
            }
        }
        None
    }
}

/// Unmounts everything mounted at `target`; nothing mounted there is fine.
pub fn unmount_all(target: &Path) -> Result<(), YoukiError> {
    let failed = |e: Errno| YoukiError::io("unmount", target)(e.into());
    for _ in 0..16 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) => umount2(target, MntFlags::MNT_DETACH).map_err(failed)?,
            Err(e) => return Err(failed(e)),
        }
    }
    Err(YoukiError::io("unmount", target)(io::Error::other(
        "it stays mounted after 16 unmounts",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_split_into_flags_and_data() {
        let opts = [
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
            "ro",
        ]
        .map(String::from);
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
    }

    #[test]
    fn long_lowerdir_lists_become_relative_to_their_parent() {
        let lowers: Vec<String> = (0..200)
            .map(|i| format!("/var/lib/containerd/snapshots/{i}/fs"))
            .collect();
        let data = format!("index=off,lowerdir={},upperdir=/u", lowers.join(":"));
        assert!(data.len() >= PAGE);
        let (short, dir) = compact_lowerdir(&data);
        assert_eq!(
            dir.as_deref(),
            Some(Path::new("/var/lib/containerd/snapshots"))
        );
        assert!(short.len() < PAGE, "{} bytes", short.len());
        assert!(
            short.starts_with("index=off,lowerdir=0/fs:1/fs:"),
            "{short}"
        );
        assert!(short.ends_with(",upperdir=/u"), "{short}");
    }

    #[test]
    fn lowerdirs_without_a_common_parent_stay_as_they_are() {
        let data = "lowerdir=/a/x:/b/y";
        assert_eq!(compact_lowerdir(data), (data.to_string(), None));
        let data = "lowerdir=/a/x";
        assert_eq!(compact_lowerdir(data), (data.to_string(), None));
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let opts = ["rbind", "ro", "rw", "nosuid"].map(String::from);
        let (flags, data) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID
        );
        assert!(data.is_empty());
    }

    #[test]
    fn recursive_propagations_are_written_as_libcontainer_knows_them() {
        let bundle = std::env::temp_dir().join(format!("hb-prop-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        for (given, written) in [
            ("rshared", "shared"),
            ("rslave", "slave"),
            ("rprivate", "private"),
            ("runbindable", "unbindable"),
            ("shared", "shared"),
            ("bogus", "bogus"),
        ] {
            let config = serde_json::json!({
                "root": {"path": "rootfs"},
                "process": {"cwd": "/"},
                "linux": {"rootfsPropagation": given, "namespaces": [{"type": "mount"}]},
            });
            std::fs::write(bundle.join("config.json"), config.to_string()).unwrap();
            let mut spec = SpecPaths::read(&bundle).unwrap();
            spec.normalize_root_propagation(&bundle).unwrap();
            assert_eq!(spec.root_propagation.as_deref(), Some(written));
            let back: serde_json::Value =
                serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(back["linux"]["rootfsPropagation"], written);
            // Nothing else of the spec changes.
            assert_eq!(back["linux"]["namespaces"], config["linux"]["namespaces"]);
            assert_eq!(back["process"], config["process"]);
        }
        std::fs::remove_dir_all(&bundle).unwrap();
    }
}

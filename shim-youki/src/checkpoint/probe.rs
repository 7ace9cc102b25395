//! What a dump or a restore finds of the host and of the container before CRIU is asked:
//! cgroup hierarchies and freezer state, what the masked paths and tmpfs mounts are inside the
//! running container, its standard streams, the namespaces it joined, and the cgroups CRIU runs
//! in. Each result is a plain value for `request`, which builds CRIU's options from them.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use libcgroups::common::{get_cgroup_setup, CgroupSetup};
use libcgroups::v1::ControllerType;
use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};

use super::request::{masked_paths, namespace_path, Masked};
use super::Stream;
use crate::error::YoukiError;

/// The host's cgroup v1 hierarchies, which libcontainer bind-mounts into a container whose
/// spec mounts `cgroup`: external mounts for CRIU, under the same path on both sides.
pub(super) fn v1_cgroup_mounts(spec: &Spec) -> Result<Vec<String>, YoukiError> {
    let wants = spec
        .mounts()
        .iter()
        .flatten()
        .any(|m| m.typ().as_deref() == Some("cgroup"));
    if !wants {
        return Ok(Vec::new());
    }
    let setup = get_cgroup_setup().map_err(YoukiError::sys("tell the host's cgroup setup"))?;
    if matches!(setup, CgroupSetup::Unified) {
        return Ok(Vec::new());
    }
    let points = libcgroups::v1::util::list_subsystem_mount_points()
        .map_err(YoukiError::sys("find the host's cgroup v1 mounts"))?;
    Ok(points
        .into_iter()
        .filter(|p| p.starts_with("/sys/fs/cgroup"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect())
}

/// The freezer directory of a container's cgroup (`cgroup_path` as libcontainer applied it).
pub(super) fn freezer_dir(cgroup_path: &Path) -> Result<PathBuf, YoukiError> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    match get_cgroup_setup().map_err(YoukiError::sys("tell the host's cgroup setup"))? {
        CgroupSetup::Unified => Ok(Path::new("/sys/fs/cgroup").join(relative)),
        _ => Ok(
            libcgroups::v1::util::get_subsystem_mount_point(&ControllerType::Freezer)
                .map_err(YoukiError::sys("find the host's freezer cgroup mount"))?
                .join(relative),
        ),
    }
}

/// Whether the freezer cgroup at `dir` is frozen (v1 `freezer.state`, v2 `cgroup.freeze`).
pub(super) fn is_frozen(dir: &Path) -> bool {
    let v1 = fs::read_to_string(dir.join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN");
    v1 || fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|s| s.trim() == "1")
}

/// The destinations of the spec's tmpfs mounts (but `/dev`, which holds the device nodes)
/// that are empty mount points in the container whose init is `pid`.
pub(super) fn empty_tmpfs_mounts(spec: &Spec, pid: i32) -> Vec<String> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| m.typ().as_deref() == Some("tmpfs") && m.destination() != Path::new("/dev"))
        .filter_map(|m| {
            let dest = m.destination().to_string_lossy().into_owned();
            let inside = PathBuf::from(format!("/proc/{pid}/root{dest}"));
            let dev = fs::metadata(&inside).ok().filter(|i| i.is_dir())?.dev();
            let parent = fs::metadata(inside.parent()?).ok()?.dev();
            let empty = fs::read_dir(&inside).ok()?.next().is_none();
            (dev != parent && empty).then_some(dest)
        })
        .collect()
}

/// What is at each masked path of the spec inside the container whose init is `pid`.
pub(super) fn masked(spec: &Spec, pid: i32) -> BTreeMap<String, Masked> {
    masked_paths(spec)
        .into_iter()
        .map(|path| {
            let inside = PathBuf::from(format!("/proc/{pid}/root{path}"));
            let what = match fs::metadata(&inside) {
                Err(_) => Masked::Missing,
                Ok(info) if !info.is_dir() => Masked::File,
                Ok(info) => {
                    // A directory masked with a tmpfs of its own (a mount point: another
                    // device than its parent's).
                    let parent_dev = inside
                        .parent()
                        .and_then(|p| fs::metadata(p).ok())
                        .map(|m| m.dev());
                    if parent_dev.is_some_and(|d| d != info.dev()) {
                        Masked::MountedDir
                    } else {
                        Masked::Dir
                    }
                }
            };
            (path, what)
        })
        .collect()
}

/// The namespaces the spec joins by path that CRIU leaves outside a dump (network, pid), each
/// with its inode.
pub(super) fn external_namespaces(
    spec: &Spec,
) -> Result<Vec<(LinuxNamespaceType, u64)>, YoukiError> {
    let mut out = Vec::new();
    for ns in [LinuxNamespaceType::Network, LinuxNamespaceType::Pid] {
        if let Some(path) = namespace_path(spec, ns) {
            let ino = fs::metadata(&path)
                .map_err(YoukiError::io("stat namespace", &path))?
                .ino();
            out.push((ns, ino));
        }
    }
    Ok(out)
}

/// Fd `n` of `pid` when it comes from outside the container: a pipe by its inode, a file by
/// its mount id and inode (an external file). `None` for a socket or a terminal, which CRIU
/// handles itself or refuses.
pub(super) fn stdio_stream(pid: i32, n: u32) -> Option<Stream> {
    let link = fs::read_link(format!("/proc/{pid}/fd/{n}")).ok()?;
    let link = link.to_string_lossy();
    if link.starts_with("pipe:") {
        return Some(Stream {
            key: link.into_owned(),
            null: false,
        });
    }
    if !link.starts_with('/') || link.starts_with("/dev/pts/") {
        return None;
    }
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).ok()?;
    let mnt_id: u32 = info
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))?
        .trim()
        .parse()
        .ok()?;
    let ino = fs::metadata(format!("/proc/{pid}/fd/{n}")).ok()?.ino();
    Some(Stream {
        key: format!("file[{mnt_id:x}:{ino:x}]"),
        null: link == "/dev/null",
    })
}

/// The cgroup of each controller of `pid`, from `/proc/PID/cgroup` (`ID:CONTROLLERS:PATH`).
pub(super) fn cgroup_roots(pid: i32) -> Result<Vec<(String, String)>, YoukiError> {
    let path = format!("/proc/{pid}/cgroup");
    let text =
        fs::read_to_string(&path).map_err(YoukiError::io("read the cgroups of CRIU in", path))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
            // Named hierarchies (name=systemd) are CRIU's to handle from the images.
            (!ctrl.starts_with("name=")).then(|| (ctrl.to_string(), path.to_string()))
        })
        .collect())
}

//! Templates, as a container's annotations ask for them: capture a container once it is ready
//! (`io.hyperbox.template.capture=NAME` with a readiness condition), or restore a new one from
//! a template instead of running its process (`io.hyperbox.restore-from=NAME`). The engine
//! keeps the templates (see [`crate::Engine::capture_template`]); this module reads and checks
//! what a container asks for, and tells when a container is ready.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

pub use crate::engine::{Captured, TemplateCapture};
use crate::error::EngineError;

/// Capture this container as the template of this name once it is ready.
pub const CAPTURE: &str = "io.hyperbox.template.capture";
/// Ready when this file exists in the container (an absolute path, as the container sees it).
pub const READY_FILE: &str = "io.hyperbox.template.ready-file";
/// Ready this long after the container started (`2s`, `1500ms`, `1m`; a bare number is
/// seconds).
pub const READY_DELAY: &str = "io.hyperbox.template.ready-delay";
/// How long to wait for the ready file before giving up on the capture (default 5 minutes).
pub const TIMEOUT: &str = "io.hyperbox.template.timeout";
/// Restore this container from the template of this name.
pub const RESTORE_FROM: &str = "io.hyperbox.restore-from";
/// Where to pull the template `io.hyperbox.restore-from` names when this node does not have
/// it (an OCI reference, from a registry the node's template settings list in `pull_from`).
pub const PULL: &str = "io.hyperbox.template.pull";
/// `true`: restore the template's memory lazily, each page on first touch (CRIU's lazy pages
/// over userfaultfd), so the container is ready before all of it is loaded.
pub const LAZY: &str = "io.hyperbox.restore-lazy";
/// The pod namespace containerd's CRI writes into every container's spec, from the pod's
/// metadata (after any annotation a pod may pass through): under Kubernetes, a template's
/// owner.
pub const CRI_SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
/// In a Kubernetes pod (whose annotations reach every container), the one container the
/// template annotations are for, by name; without it, every container but the sandbox's.
pub const CONTAINER: &str = "io.hyperbox.template.container";
/// CRI's annotations: the kind of container (`sandbox` or `container`) and its name.
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
const CRI_CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// When a container to capture is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// This path exists inside the container.
    File(PathBuf),
    /// This long after Start.
    Delay(Duration),
}

/// A capture a container asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturePlan {
    pub name: String,
    pub ready: Readiness,
    /// Giving up on a ready file after this long.
    pub timeout: Duration,
}

/// What a container's annotations ask of templates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplatePlan {
    pub capture: Option<CapturePlan>,
    pub restore_from: Option<String>,
    /// Where to pull `restore_from` from when it is missing.
    pub pull: Option<String>,
    /// Restore memory lazily.
    pub lazy: bool,
}

/// A template name: 1 to 128 of `[A-Za-z0-9_.-]`, starting with a letter or digit, so that
/// it is one path component.
pub fn check_name(name: &str) -> Result<(), String> {
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let all_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if name.len() > 128 || !first_ok || !all_ok {
        return Err(format!(
            "template name {name:?} is not 1 to 128 letters, digits, '_', '.' or '-' \
             starting with a letter or digit"
        ));
    }
    Ok(())
}

/// A pod namespace as Kubernetes names it (a DNS label: 1 to 63 lower-case letters, digits
/// and '-', starting and ending with a letter or digit).
pub fn check_owner(owner: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&owner.len())
        && owner
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !owner.starts_with('-')
        && !owner.ends_with('-');
    if !ok {
        return Err(format!(
            "pod namespace {owner:?} is not 1 to 63 lower-case letters, digits or '-' \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A template to restore from: `NAME`, a template of the container's own owner, or
/// `POD_NAMESPACE/NAME`, one of that pod namespace's (restored only where an administrator
/// shares it).
pub fn check_reference(reference: &str) -> Result<(), String> {
    match reference.split_once('/') {
        None => check_name(reference),
        Some((owner, name)) => {
            check_owner(owner)?;
            check_name(name)
        }
    }
}

/// A duration as annotations give it: `250ms`, `2s`, `1.5s`, `1m`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 2s or 1m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => {
            return Err(format!(
                "{text:?} is not a duration such as 500ms, 2s or 1m"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=86_400.0).contains(&seconds) {
        return Err(format!("{text:?} is not a duration of at most a day"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn invalid(e: String) -> EngineError {
    EngineError::InvalidSpec(e)
}

impl TemplatePlan {
    /// What `annotations` (a spec's) ask for, checked.
    pub fn from_annotations(annotations: &HashMap<String, String>) -> Result<Self, EngineError> {
        let get = |k: &str| annotations.get(k).map(String::as_str);
        // A pod's annotations reach its sandbox (pause) container too, and all its
        // containers: the templates are for the one named, else for every container.
        if get(CRI_CONTAINER_TYPE) == Some("sandbox") {
            return Ok(TemplatePlan::default());
        }
        if let (Some(wanted), Some(name)) = (get(CONTAINER), get(CRI_CONTAINER_NAME)) {
            if wanted != name {
                return Ok(TemplatePlan::default());
            }
        }
        let restore_from = match get(RESTORE_FROM) {
            Some(reference) => {
                check_reference(reference).map_err(|e| invalid(format!("{RESTORE_FROM}: {e}")))?;
                Some(reference.to_string())
            }
            None => None,
        };
        let pull = match (get(PULL), &restore_from) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(invalid(format!(
                    "annotation {PULL} needs {RESTORE_FROM}=NAME"
                )))
            }
            (Some(_), Some(name)) if name.contains('/') => {
                return Err(invalid(format!(
                    "{PULL}: a template is pulled into the container's own templates, and \
                     {RESTORE_FROM}={name} names another owner's"
                )))
            }
            (Some(reference), Some(_)) => {
                check_pull_reference(reference).map_err(|e| invalid(format!("{PULL}: {e}")))?;
                Some(reference.to_string())
            }
        };
        let lazy = match get(LAZY) {
            None | Some("false") => false,
            Some("true") if restore_from.is_some() => true,
            Some("true") => {
                return Err(invalid(format!(
                    "annotation {LAZY} needs {RESTORE_FROM}=NAME"
                )))
            }
            Some(other) => return Err(invalid(format!("{LAZY}={other:?}: give true or false"))),
        };
        let capture = match get(CAPTURE) {
            None => {
                if let Some(k) = [READY_FILE, READY_DELAY, TIMEOUT]
                    .into_iter()
                    .find(|k| get(k).is_some())
                {
                    return Err(invalid(format!("annotation {k} needs {CAPTURE}=NAME")));
                }
                None
            }
            Some(name) => {
                check_name(name).map_err(|e| invalid(format!("{CAPTURE}: {e}")))?;
                let ready = match (get(READY_FILE), get(READY_DELAY)) {
                    (Some(path), None) => Readiness::File(check_ready_file(path)?),
                    (None, Some(delay)) => Readiness::Delay(
                        parse_duration(delay)
                            .map_err(|e| invalid(format!("{READY_DELAY}: {e}")))?,
                    ),
                    (None, None) => {
                        return Err(invalid(format!(
                            "{CAPTURE}={name} needs a readiness condition: \
                             {READY_FILE}=/PATH (a file the container creates when it is \
                             ready) or {READY_DELAY}=DURATION"
                        )))
                    }
                    (Some(_), Some(_)) => {
                        return Err(invalid(format!(
                            "{CAPTURE}={name}: give {READY_FILE} or {READY_DELAY}, not both"
                        )))
                    }
                };
                let timeout = match get(TIMEOUT) {
                    Some(t) => parse_duration(t).map_err(|e| invalid(format!("{TIMEOUT}: {e}")))?,
                    None => DEFAULT_TIMEOUT,
                };
                Some(CapturePlan {
                    name: name.to_string(),
                    ready,
                    timeout,
                })
            }
        };
        Ok(TemplatePlan {
            capture,
            restore_from,
            pull,
            lazy,
        })
    }
}

/// An image reference as a pull takes it: at most 512 printable ASCII characters without
/// spaces, a registry host and a repository.
pub fn check_pull_reference(reference: &str) -> Result<(), String> {
    let printable = reference.bytes().all(|b| b.is_ascii_graphic());
    if reference.is_empty() || reference.len() > 512 || !printable || !reference.contains('/') {
        return Err(format!(
            "{reference:?} is not an image reference such as registry.example:5000/templates/py:v1"
        ));
    }
    Ok(())
}

fn check_ready_file(path: &str) -> Result<PathBuf, EngineError> {
    let p = Path::new(path);
    let normal = p
        .components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)));
    if !p.is_absolute() || !normal || p.components().count() < 2 {
        return Err(invalid(format!(
            "{READY_FILE} {path:?} is not an absolute path to a file without '.' or '..'"
        )));
    }
    Ok(p.to_path_buf())
}

/// Whether `path` exists in the container whose init is `pid`, looked up in the container's
/// own root: symbolic links in the container resolve inside it, never to the host's files.
pub fn exists_in_container(pid: u32, path: &Path) -> std::io::Result<bool> {
    let root = fs::File::open(format!("/proc/{pid}/root"))?;
    match open_in_root(root.as_fd(), path, libc::O_PATH) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens `path` (absolute or not) below the directory `root` as if `root` were `/`: symbolic
/// links and `..` resolve inside it, never above (`openat2` with `RESOLVE_IN_ROOT`, magic
/// links refused). `flags` are `open`'s (close-on-exec is added).
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let relative = if relative.as_os_str().is_empty() {
        Path::new(".")
    } else {
        relative
    };
    let name = CString::new(relative.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: open_how is plain integers, for which zero is valid (and what openat2 wants of
    // fields this code does not set).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { 0o644 } else { 0 };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the path and `how` (of the size given) and returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(pairs: &[(&str, &str)]) -> Result<TemplatePlan, EngineError> {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TemplatePlan::from_annotations(&map)
    }

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_duration("1500ms").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        for bad in ["", "s", "2h", "-1s", "1e9", "2 s x"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_are_one_path_component() {
        for good in ["py", "web-1.2_a", "0"] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "-x",
            ".hidden",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn annotations_are_read_and_checked() {
        assert_eq!(plan(&[]).unwrap(), TemplatePlan::default());
        let p = plan(&[(CAPTURE, "py"), (READY_FILE, "/tmp/ready")]).unwrap();
        assert_eq!(
            p.capture,
            Some(CapturePlan {
                name: "py".into(),
                ready: Readiness::File("/tmp/ready".into()),
                timeout: DEFAULT_TIMEOUT,
            })
        );
        let p = plan(&[(CAPTURE, "py"), (READY_DELAY, "2s"), (TIMEOUT, "10s")]).unwrap();
        assert_eq!(
            p.capture.unwrap().ready,
            Readiness::Delay(Duration::from_secs(2))
        );
        let p = plan(&[(RESTORE_FROM, "py")]).unwrap();
        assert_eq!(p.restore_from.as_deref(), Some("py"));
        let p = plan(&[
            (RESTORE_FROM, "py"),
            (PULL, "r.example:5000/t/py:1"),
            (LAZY, "true"),
        ])
        .unwrap();
        assert_eq!(p.pull.as_deref(), Some("r.example:5000/t/py:1"));
        assert!(p.lazy);
        let shared = plan(&[(RESTORE_FROM, "team-a/py")]).unwrap();
        assert_eq!(shared.restore_from.as_deref(), Some("team-a/py"));
        // In a pod: never the sandbox; only the container named, when one is.
        let pod = [(RESTORE_FROM, "py"), (CONTAINER, "web")];
        for (kind, name, applies) in [
            ("sandbox", "", false),
            ("container", "web", true),
            ("container", "sidecar", false),
        ] {
            let mut a = pod.to_vec();
            a.extend([(CRI_CONTAINER_TYPE, kind), (CRI_CONTAINER_NAME, name)]);
            assert_eq!(
                plan(&a).unwrap().restore_from.is_some(),
                applies,
                "{kind} {name}"
            );
        }

        for (bad, says) in [
            (vec![(CAPTURE, "py")], "needs a readiness condition"),
            (
                vec![(CAPTURE, "py"), (READY_FILE, "/a"), (READY_DELAY, "1s")],
                "not both",
            ),
            (vec![(CAPTURE, "py"), (READY_FILE, "ready")], "absolute"),
            (vec![(CAPTURE, "py"), (READY_FILE, "/a/../b")], "'..'"),
            (vec![(CAPTURE, "py"), (READY_FILE, "/")], "absolute"),
            (
                vec![(CAPTURE, "../x"), (READY_DELAY, "1s")],
                "template name",
            ),
            (vec![(RESTORE_FROM, "a/../b")], "template name"),
            (vec![(RESTORE_FROM, "A/b")], "pod namespace"),
            (vec![(RESTORE_FROM, "-a/b")], "pod namespace"),
            (
                vec![(PULL, "r.example/t:1")],
                "needs io.hyperbox.restore-from",
            ),
            (
                vec![(RESTORE_FROM, "a/b"), (PULL, "r.example/t:1")],
                "another owner's",
            ),
            (
                vec![(RESTORE_FROM, "b"), (PULL, "r t")],
                "not an image reference",
            ),
            (vec![(RESTORE_FROM, "b"), (LAZY, "yes")], "true or false"),
            (vec![(LAZY, "true")], "needs io.hyperbox.restore-from"),
            (
                vec![(READY_FILE, "/a")],
                "needs io.hyperbox.template.capture",
            ),
            (
                vec![(CAPTURE, "py"), (READY_DELAY, "soon")],
                "not a duration",
            ),
        ] {
            let e = plan(&bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn a_ready_file_is_looked_up_inside_the_root() {
        let me = std::process::id();
        let dir = std::env::temp_dir().join(format!("hb-ready-{me}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let name = dir.strip_prefix("/").unwrap();
        // This process's root is the host's: the directory exists, a missing file does not.
        assert!(exists_in_container(me, &Path::new("/").join(name)).unwrap());
        assert!(!exists_in_container(me, &dir.join("missing")).unwrap());
        // A link out of the directory resolves against the root given, here still the host's.
        std::os::unix::fs::symlink("/nonexistent-hb", dir.join("link")).unwrap();
        assert!(!exists_in_container(me, &dir.join("link")).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! `hyperbox-gpu-hook`: the OCI hook that gives a container the GPUs and driver parts it
//! asked for, from the node's cache alone.
//!
//! It runs as a `createContainer` hook (in the container's mount namespace, before
//! `pivot_root`; `prestart` works too where a runtime runs that there), reads the OCI state
//! on stdin and the bundle's `config.json`, and:
//! - **default mode**: for a container whose `NVIDIA_VISIBLE_DEVICES` asks for GPUs, checks
//!   its `NVIDIA_REQUIRE_*`, makes the device nodes (already there when our shim put them in
//!   the spec, which is also what lets them through the device cgroup), bind-mounts the
//!   driver files of its capabilities read-only, links their SONAMEs and writes the loader's
//!   cache;
//! - **`ldcache` mode** (the CDI spec's hook, after the runtime made CDI's mounts): links the
//!   SONAMEs of the driver libraries mounted into the container and writes the loader's
//!   cache.
//!
//! Every check happens before the first change. All changes are inside the container's mount
//! namespace and rootfs, so a failed hook, which fails the container's creation, leaves
//! nothing on the host.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

use crate::cache::{CacheError, NodeCache};
use crate::discover::{DriverFile, FileKind};
use crate::inject::{ContainerRoot, InjectError};
use crate::ldcache::{self, LdCacheEntry};
use crate::plan::{self, PlanError};
use crate::request::{Environment, GpuRequest, RequestError};

/// The largest OCI state or `config.json` read.
const MAX_INPUT: u64 = 4 << 20;
/// The largest image `ld.so.cache` merged with (Debian's full desktop is about 200 KiB).
const MAX_LDCACHE: u64 = 64 << 20;
/// The loader configuration naming the driver's library directories, so that an `ldconfig`
/// run later inside the container keeps them.
const LD_CONF: &str = "/etc/ld.so.conf.d/000-hyperbox-gpu.conf";

/// What the hook does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the container's environment.
    Environment,
    /// The loader cache for CDI's mounts.
    LdCache,
}

/// The hook's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Args {
    pub cache: PathBuf,
    pub mode: Mode,
    /// The devices, as `NVIDIA_VISIBLE_DEVICES` would name them, chosen by whoever put the
    /// hook in the spec (the shim: from `cdi.k8s.io/*` annotations or the variable); unset,
    /// the container's variable decides.
    pub visible_devices: Option<String>,
}

/// Errors of the hook; each says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("usage: hyperbox-gpu-hook [--cache FILE] [--visible-devices LIST] [ldcache]: {0}")]
    Usage(String),
    #[error("cannot read the OCI state on stdin: {0}")]
    State(String),
    #[error("cannot read the bundle's config.json {path}: {what}")]
    Config { path: PathBuf, what: String },
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error("cannot write the container's loader cache: {0}")]
    LdCache(#[from] ldcache::LdCacheWriteError),
}

impl Args {
    /// Reads the arguments after the program name.
    pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Self, HookError> {
        let mut out = Args {
            cache: PathBuf::from(crate::cache::DEFAULT_PATH),
            mode: Mode::Environment,
            visible_devices: None,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--cache" => {
                    let v = args
                        .next()
                        .ok_or_else(|| HookError::Usage("--cache needs a file".into()))?;
                    out.cache = PathBuf::from(v);
                }
                "--visible-devices" => {
                    let v = args
                        .next()
                        .ok_or_else(|| HookError::Usage("--visible-devices needs a list".into()))?;
                    out.visible_devices = Some(v);
                }
                "ldcache" => out.mode = Mode::LdCache,
                other => return Err(HookError::Usage(format!("unknown argument {other:?}"))),
            }
        }
        if !out.cache.is_absolute() {
            return Err(HookError::Usage("--cache must be an absolute path".into()));
        }
        Ok(out)
    }
}

/// The parts of the OCI state the hook reads.
#[derive(Debug, Deserialize)]
struct State {
    bundle: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
struct Root {
    path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
struct Process {
    #[serde(default)]
    env: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Mount {
    destination: PathBuf,
}

#[derive(Debug, Deserialize)]
struct LinuxDevice {
    path: String,
}

#[derive(Debug, Default, Deserialize)]
struct Linux {
    #[serde(default)]
    devices: Vec<LinuxDevice>,
}

/// The parts of `config.json` the hook reads.
#[derive(Debug, Deserialize)]
struct Config {
    root: Option<Root>,
    #[serde(default)]
    process: Option<Process>,
    #[serde(default)]
    mounts: Vec<Mount>,
    #[serde(default)]
    linux: Option<Linux>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

/// What the hook did, for its caller (the benchmark, tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub nodes: usize,
    pub mounts: usize,
    pub libraries: usize,
}

fn read_limited(r: impl Read) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    r.take(MAX_INPUT + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_INPUT {
        return Err(io::Error::other(format!("larger than {MAX_INPUT} bytes")));
    }
    Ok(data)
}

/// Runs the hook on the OCI state read from `stdin`.
pub fn run(args: &Args, stdin: impl Read) -> Result<Report, HookError> {
    let state = read_limited(stdin).map_err(|e| HookError::State(e.to_string()))?;
    let state: State =
        serde_json::from_slice(&state).map_err(|e| HookError::State(e.to_string()))?;
    if !state.bundle.is_absolute() {
        return Err(HookError::State(format!(
            "the bundle {} is not an absolute path",
            state.bundle.display()
        )));
    }
    let config_path = state.bundle.join("config.json");
    let bad = |what: String| HookError::Config {
        path: config_path.clone(),
        what,
    };
    let config = File::open(&config_path)
        .and_then(read_limited)
        .map_err(|e| bad(e.to_string()))?;
    let config: Config = serde_json::from_slice(&config).map_err(|e| bad(e.to_string()))?;
    let root = config
        .root
        .as_ref()
        .map(|r| r.path.clone())
        .ok_or_else(|| bad("no root.path".into()))?;
    // The runtime's rootfs, never a path that climbs (`..`) or the host's own root.
    if root.components().any(|c| c == Component::ParentDir) {
        return Err(bad(format!("root.path {} contains '..'", root.display())));
    }
    let rootfs = if root.is_absolute() {
        root
    } else {
        state.bundle.join(root)
    };
    if std::fs::canonicalize(&rootfs).is_ok_and(|r| r == Path::new("/")) {
        return Err(bad(format!(
            "root.path {} is the host's root",
            rootfs.display()
        )));
    }
    match args.mode {
        Mode::Environment => {
            let mut entries: Vec<String> = config
                .process
                .as_ref()
                .map(|p| p.env.clone())
                .unwrap_or_default();
            if let Some(v) = &args.visible_devices {
                // Last definition wins, as in the process's environment.
                entries.push(format!("{}={v}", crate::request::VISIBLE_DEVICES));
            }
            let env = Environment::from_entries(entries);
            let Some(request) = GpuRequest::from_env(&env)? else {
                return Ok(Report::default());
            };
            let cache = NodeCache::read(&args.cache)?;
            let injection = plan::plan(&cache, &request)?;
            plan::check_requirements(&cache, &injection, &env)?;
            let root = ContainerRoot::open(&rootfs)?;
            for n in &injection.nodes {
                root.char_device(Path::new(&n.path), n.major, n.minor)?;
            }
            for f in &injection.files {
                root.bind_read_only(&f.host_path, &f.container_path)?;
            }
            let libraries = link_and_cache(&root, &injection.files)?;
            Ok(Report {
                nodes: injection.nodes.len(),
                mounts: injection.files.len(),
                libraries,
            })
        }
        Mode::LdCache => {
            let cache = NodeCache::read(&args.cache)?;
            // NVIDIA_REQUIRE_* hold in CDI mode too (the toolkit's CDI mode skips them),
            // against the GPUs whose nodes the runtime put in the spec.
            let env = Environment::from_entries(
                config
                    .process
                    .as_ref()
                    .map(|p| p.env.as_slice())
                    .unwrap_or_default(),
            );
            let given: Vec<&str> = config
                .linux
                .as_ref()
                .map(|l| l.devices.iter().map(|d| d.path.as_str()).collect())
                .unwrap_or_default();
            let injection = plan::Injection {
                nodes: Vec::new(),
                files: Vec::new(),
                gpus: cache
                    .gpus
                    .iter()
                    .filter(|g| given.contains(&g.node.path.as_str()))
                    .collect(),
            };
            plan::check_requirements(&cache, &injection, &env)?;
            let mounted: Vec<&DriverFile> = cache
                .files
                .iter()
                .filter(|f| {
                    config
                        .mounts
                        .iter()
                        .any(|m| m.destination == f.container_path)
                })
                .collect();
            let root = ContainerRoot::open(&rootfs)?;
            let libraries = link_and_cache(&root, &mounted)?;
            Ok(Report {
                libraries,
                ..Report::default()
            })
        }
    }
}

/// Links each injected library's SONAME beside it and writes the container's loader cache
/// (the image's entries, with the driver's replacing any of the same name and kind) and
/// loader configuration. Returns how many libraries it named.
fn link_and_cache(root: &ContainerRoot, files: &[&DriverFile]) -> Result<usize, HookError> {
    let mut injected = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for f in files {
        let FileKind::Library { soname, bits } = &f.kind else {
            continue;
        };
        let (Some(dir), Some(file_name)) =
            (f.container_path.parent(), f.container_path.file_name())
        else {
            continue;
        };
        if file_name != soname.as_str() {
            root.symlink(&dir.join(soname), Path::new(file_name))?;
        }
        injected.push(LdCacheEntry::library(
            soname,
            &f.container_path,
            *bits == 64,
        ));
        if !dirs.iter().any(|d| d == dir) {
            dirs.push(dir.to_path_buf());
        }
    }
    if injected.is_empty() {
        return Ok(0);
    }
    let cache_path = Path::new("/etc/ld.so.cache");
    // An image cache that cannot be read is replaced: the loader falls back to its default
    // directories for the image's own libraries, as without a cache.
    let image = root
        .read_file(cache_path, MAX_LDCACHE)?
        .and_then(|data| ldcache::parse(&data).ok())
        .unwrap_or_default();
    let merged = ldcache::merge(image, &injected);
    root.write_file(cache_path, &ldcache::write(&merged)?, 0o644)?;
    let mut conf = String::from("# Written by hyperbox-gpu-hook: the NVIDIA driver's libraries\n");
    for d in &dirs {
        conf.push_str(&d.to_string_lossy());
        conf.push('\n');
    }
    root.write_file(Path::new(LD_CONF), conf.as_bytes(), 0o644)?;
    Ok(injected.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        let a = Args::parse(Vec::<String>::new()).unwrap();
        assert_eq!(a.mode, Mode::Environment);
        assert_eq!(a.cache, Path::new(crate::cache::DEFAULT_PATH));
        let a = Args::parse(["--cache".into(), "/x/c.json".into(), "ldcache".into()]).unwrap();
        assert_eq!(
            (a.cache.as_path(), a.mode),
            (Path::new("/x/c.json"), Mode::LdCache)
        );
        assert!(Args::parse(["--cache".into()]).is_err());
        assert!(Args::parse(["--cache".into(), "rel".into()]).is_err());
        assert!(Args::parse(["--evil".into()]).is_err());
        let a = Args::parse(["--visible-devices".into(), "1:0".into()]).unwrap();
        assert_eq!(a.visible_devices.as_deref(), Some("1:0"));
        assert!(Args::parse(["--visible-devices".into()]).is_err());
    }

    #[test]
    fn bad_input_is_refused_before_anything_changes() {
        let args = Args::parse(Vec::<String>::new()).unwrap();
        for state in ["", "{", "[]", r#"{"bundle":"relative"}"#] {
            assert!(
                matches!(run(&args, state.as_bytes()), Err(HookError::State(_))),
                "{state}"
            );
        }
        let err = run(&args, r#"{"bundle":"/nonexistent-bundle"}"#.as_bytes()).unwrap_err();
        assert!(matches!(err, HookError::Config { .. }), "{err}");
    }
}

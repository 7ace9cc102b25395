//! Finding a container's WebAssembly guest: `args[0]` names a `.wasm` file, or a file that
//! starts with the `\0asm` magic, in the container's root filesystem. Looked up from the host
//! with `openat2(RESOLVE_IN_ROOT)`, so that symlinks resolve inside the rootfs and never lead
//! out of it.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

/// The first bytes of every WebAssembly binary, module or component.
pub(crate) const MAGIC: &[u8; 4] = b"\0asm";

/// Errors finding or reading a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot read {path}: {source}")]
    Spec {
        path: PathBuf,
        source: libcontainer::oci_spec::OciSpecError,
    },
    #[error("cannot open the container's root filesystem {path}: {source}")]
    Rootfs { path: PathBuf, source: nix::Error },
    #[error("the WebAssembly guest {name} is not in the container's root filesystem")]
    Missing { name: String },
    #[error("cannot read the WebAssembly guest {name}: {source}")]
    Read {
        name: String,
        source: std::io::Error,
    },
}

/// What kind of binary a guest is, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// A core module: WASI preview 1, run through an export (`_start` by default).
    Module,
    /// A component: WASI preview 2, run through `wasi:cli/run`.
    Component,
}

impl GuestKind {
    /// From the 8-byte header: the version word's layer field is 1 for components.
    pub fn of(bytes: &[u8]) -> GuestKind {
        match bytes.get(6..8) {
            Some([1, 0]) => GuestKind::Component,
            _ => GuestKind::Module,
        }
    }
}

/// A container's WebAssembly guest, open in its root filesystem.
#[derive(Debug)]
pub struct GuestFile {
    /// The file as `args[0]` names it (without `#export`).
    pub name: String,
    /// The export to run, from `args[0]`'s `#export` suffix.
    pub export: Option<String>,
    file: File,
}

impl GuestFile {
    /// Reads the whole file.
    pub fn read(mut self) -> Result<Vec<u8>, GuestError> {
        let mut bytes = Vec::new();
        self.file
            .read_to_end(&mut bytes)
            .map_err(|source| GuestError::Read {
                name: self.name.clone(),
                source,
            })?;
        Ok(bytes)
    }
}

/// Reads a bundle's `config.json`.
pub fn load_spec(bundle: &Path) -> Result<Spec, GuestError> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|source| GuestError::Spec { path, source })
}

/// The spec's root filesystem as the host sees it.
pub fn rootfs_of(bundle: &Path, spec: &Spec) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| PathBuf::from("rootfs"));
    bundle.join(root)
}

/// The container's guest, or `None` when `args[0]` is a native program (or names nothing
/// this lookup finds: libcontainer's own executor then reports it, as for any container).
pub fn locate(spec: &Spec, rootfs: &Path) -> Result<Option<GuestFile>, GuestError> {
    let Some(process) = spec.process().as_ref() else {
        return Ok(None);
    };
    let Some(arg0) = process.args().as_ref().and_then(|a| a.first()) else {
        return Ok(None);
    };
    let (name, export) = split_export(arg0);
    let named_wasm = name.ends_with(".wasm");
    let cwd = process.cwd();
    let path_var = process
        .env()
        .as_ref()
        .and_then(|env| env.iter().find_map(|e| e.strip_prefix("PATH=")))
        .unwrap_or("");
    let root = open_root(rootfs)?;
    for candidate in candidates(name, cwd, path_var) {
        let Some(mut file) = open_in_root(&root, &candidate) else {
            continue;
        };
        let mut header = [0u8; 4];
        let is_wasm = file.read_exact(&mut header).is_ok() && &header == MAGIC;
        if !(is_wasm || named_wasm) {
            return Ok(None);
        }
        use std::io::Seek;
        file.rewind().map_err(|source| GuestError::Read {
            name: name.to_string(),
            source,
        })?;
        return Ok(Some(GuestFile {
            name: name.to_string(),
            export: export.map(str::to_string),
            file,
        }));
    }
    if named_wasm {
        return Err(GuestError::Missing {
            name: name.to_string(),
        });
    }
    Ok(None)
}

/// `file.wasm#export` names an export of the module to run.
pub fn split_export(arg0: &str) -> (&str, Option<&str>) {
    match arg0.rsplit_once('#') {
        Some((file, export)) if file.ends_with(".wasm") && !export.is_empty() => {
            (file, Some(export))
        }
        _ => (arg0, None),
    }
}

/// Where `name` may be, in the container's terms: itself when it has a slash (relative to
/// the process's cwd), else each `PATH` entry, then the cwd.
fn candidates(name: &str, cwd: &Path, path_var: &str) -> Vec<PathBuf> {
    if name.contains('/') {
        return vec![cwd.join(name)];
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .chain(std::iter::once(cwd.join(name)))
        .collect()
}

fn open_root(rootfs: &Path) -> Result<OwnedFd, GuestError> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_PATH | OFlag::O_CLOEXEC;
    let raw =
        nix::fcntl::open(rootfs, flags, Mode::empty()).map_err(|source| GuestError::Rootfs {
            path: rootfs.to_path_buf(),
            source,
        })?;
    // SAFETY: `open` returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Opens `path` for reading as if `root` were `/`: `..` and symlinks (absolute ones
/// included) stay inside it. `None` when it is not a regular file there.
fn open_in_root(root: &OwnedFd, path: &Path) -> Option<File> {
    use std::os::fd::AsRawFd;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let raw = openat2(root.as_raw_fd(), path, how).ok()?;
    // SAFETY: `openat2` returned a new fd that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.metadata().ok()?.is_file().then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_split_from_a_wasm_file_only() {
        assert_eq!(split_export("/a.wasm#run"), ("/a.wasm", Some("run")));
        assert_eq!(split_export("/a.wasm"), ("/a.wasm", None));
        assert_eq!(split_export("/bin/x#y"), ("/bin/x#y", None));
        assert_eq!(split_export("/a.wasm#"), ("/a.wasm#", None));
    }

    #[test]
    fn components_are_told_from_modules_by_their_header() {
        let module = wat::parse_str("(module)").unwrap();
        assert_eq!(GuestKind::of(&module), GuestKind::Module);
        let component = wat::parse_str("(component)").unwrap();
        assert_eq!(GuestKind::of(&component), GuestKind::Component);
    }

    #[test]
    fn symlinks_resolve_inside_the_rootfs() {
        let base = std::env::temp_dir().join(format!("hb-wasm-guest-{}", std::process::id()));
        let rootfs = base.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        // A file outside the rootfs, and a link in it pointing there by absolute path.
        std::fs::write(base.join("outside.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::os::unix::fs::symlink(base.join("outside.wasm"), rootfs.join("bin/x.wasm")).unwrap();
        let root = open_root(&rootfs).unwrap();
        assert!(open_in_root(&root, Path::new("/bin/x.wasm")).is_none());
        assert!(open_in_root(&root, Path::new("/../outside.wasm")).is_none());
        // The same name inside the rootfs is what the link reaches.
        let inside = rootfs.join(base.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("outside.wasm"), b"\0asm\x01\0\0\0").unwrap();
        assert!(open_in_root(&root, Path::new("/bin/x.wasm")).is_some());
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_command_is_looked_up_on_path_then_in_the_cwd() {
        let c = candidates("app.wasm", Path::new("/srv"), "/usr/bin:/bin");
        assert_eq!(
            c,
            ["/usr/bin/app.wasm", "/bin/app.wasm", "/srv/app.wasm"].map(PathBuf::from)
        );
        assert_eq!(
            candidates("./app.wasm", Path::new("/srv"), "/bin"),
            [PathBuf::from("/srv/./app.wasm")]
        );
    }
}

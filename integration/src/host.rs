//! Where `scripts/setup-host` puts things, and where the workspace's built binaries are.
//!
//! The defaults match `scripts/setup-host`; `HYPERBOX_PREFIX` and `HYPERBOX_CACHE` override
//! them in both places.

use std::env;
use std::path::{Path, PathBuf};

/// Default install prefix of the private engines and CRIU (`HYPERBOX_PREFIX`).
pub const DEFAULT_PREFIX: &str = "/opt/hyperbox";
/// Default cache of downloads, image builds and the CI cargo target (`HYPERBOX_CACHE`).
pub const DEFAULT_CACHE: &str = "/var/cache/hyperbox";
/// Default parent of every harness sandbox (`HYPERBOX_TEST_ROOT`).
pub const DEFAULT_TEST_ROOT: &str = "/var/lib/hyperbox-test";

fn env_path(var: &str, default: &str) -> PathBuf {
    env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The install prefix (`/opt/hyperbox`).
pub fn prefix() -> PathBuf {
    env_path("HYPERBOX_PREFIX", DEFAULT_PREFIX)
}

/// The cache root (`/var/cache/hyperbox`).
pub fn cache_root() -> PathBuf {
    env_path("HYPERBOX_CACHE", DEFAULT_CACHE)
}

/// The directory under which sandboxes are made (`/var/lib/hyperbox-test`).
pub fn test_root() -> PathBuf {
    env_path("HYPERBOX_TEST_ROOT", DEFAULT_TEST_ROOT)
}

/// `$PREFIX/bin`: host tools the setup step provides (CRIU 4), put first on daemons' `PATH`.
pub fn tools_bin() -> PathBuf {
    prefix().join("bin")
}

/// Debian 13's erofs-utils 1.8 `fsck.erofs`, unpacked by `scripts/setup-host`: the
/// reference reader the snapshotter's tests extract images with.
pub fn fsck_erofs() -> PathBuf {
    prefix().join("erofs-utils-1.8/usr/bin/fsck.erofs")
}

/// erofs-utils 1.8's `mkfs.erofs`, built from Debian 13's source by `scripts/setup-host`:
/// what containerd 2.1's own EROFS differ runs in the side-by-side benchmark.
pub fn mkfs_erofs_peer() -> PathBuf {
    prefix().join("erofs-utils-1.8-built/bin/mkfs.erofs")
}

/// A file of the repository's `config/` directory.
pub fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
}

/// The directory holding this workspace's built binaries (`target/<profile>`).
///
/// `HYPERBOX_BIN_DIR` wins; otherwise it is derived from the running executable, which is
/// either a binary in `target/<profile>/` or a test in `target/<profile>/deps/`.
pub fn workspace_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("HYPERBOX_BIN_DIR").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let exe = env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf)
    } else {
        Some(dir.to_path_buf())
    }
}

/// A binary of this workspace by name, if it has been built.
pub fn workspace_binary(name: &str) -> Option<PathBuf> {
    let path = workspace_bin_dir()?.join(name);
    path.is_file().then_some(path)
}

/// The directory of `pid`'s cgroup in the v1 hierarchy that has `controller` (mounted under
/// its controllers' joined names, `/sys/fs/cgroup/cpu,cpuacct` or `/sys/fs/cgroup/cpu`).
pub fn cgroup_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (mount, path) = text.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| (ctrls.to_string(), path.to_string()))
    })?;
    Some(
        Path::new("/sys/fs/cgroup")
            .join(mount)
            .join(path.trim_start_matches('/')),
    )
}

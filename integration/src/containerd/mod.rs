//! A private containerd daemon of a chosen version, in its own sandbox.
//!
//! Each daemon gets its own root, state dir, gRPC and ttrpc sockets, `opt` dir and generated
//! config (version 2 for 1.6 and 1.7, version 3 for 2.1), plus a `bin/` directory put first on its
//! `PATH`: containerd finds a runtime `io.containerd.X.v1` as the binary
//! `containerd-shim-X-v1` on its `PATH`, so linking the workspace's shims there registers them
//! without touching the host. Containers run in a containerd namespace unique to the daemon,
//! so their cgroups (`/NS/ID`) and runc state can be found and removed at teardown.
//!
//! [`ContainerdBuilder`] (in `builder`) sets a daemon up and starts it, with the config that
//! `config` generates; [`Containerd`] (in `daemon`) is the running daemon and what tests do
//! with it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use crate::host;
use crate::sandbox::SandboxError;

mod builder;
mod config;
mod daemon;

pub use builder::{
    shim_binary_name, ContainerdBuilder, CRI_NAMESPACE, MKFS_EROFS_LOG, WORKSPACE_SHIMS,
};
pub use config::{go_arch, CriOptions};
pub use daemon::Containerd;

/// The containerd versions the harness runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContainerdVersion {
    /// 1.6.20, Debian 12's package, binaries in `/usr/bin`.
    V1_6,
    /// 1.7.24, Debian 13's package unpacked by `scripts/setup-host` into
    /// `$PREFIX/containerd-1.7`.
    V1_7,
    /// 2.1.9, built by `scripts/setup-host` from its source tarball into
    /// `$PREFIX/containerd-2.1/bin`; config version 3.
    V2_1,
}

impl ContainerdVersion {
    /// Every supported version, oldest first.
    pub const ALL: [ContainerdVersion; 3] = [
        ContainerdVersion::V1_6,
        ContainerdVersion::V1_7,
        ContainerdVersion::V2_1,
    ];

    /// The versions to test against: `HYPERBOX_CONTAINERD` (`1.6`, `1.7`, `2.1` or a
    /// comma-separated list; default all).
    pub fn selected() -> Vec<ContainerdVersion> {
        match std::env::var("HYPERBOX_CONTAINERD") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "all" => {
                v.split(',').filter_map(|s| s.trim().parse().ok()).collect()
            }
            _ => Self::ALL.to_vec(),
        }
    }

    /// `1.6`, `1.7` or `2.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContainerdVersion::V1_6 => "1.6",
            ContainerdVersion::V1_7 => "1.7",
            ContainerdVersion::V2_1 => "2.1",
        }
    }

    /// Whether this is containerd 2.x: config version 3, CRI split into the
    /// `io.containerd.cri.v1.*` plugins, shims asked for `-info`.
    pub fn is_2x(self) -> bool {
        self >= ContainerdVersion::V2_1
    }

    /// Directory holding `containerd`, `ctr` and `containerd-shim-runc-v2` of this version.
    pub fn bin_dir(self) -> PathBuf {
        match self {
            ContainerdVersion::V1_6 => PathBuf::from("/usr/bin"),
            ContainerdVersion::V1_7 => host::prefix().join("containerd-1.7/usr/bin"),
            ContainerdVersion::V2_1 => host::prefix().join("containerd-2.1/bin"),
        }
    }

    /// The daemon binary.
    pub fn containerd(self) -> PathBuf {
        self.bin_dir().join("containerd")
    }

    /// The matching `ctr`.
    pub fn ctr(self) -> PathBuf {
        self.bin_dir().join("ctr")
    }
}

impl fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ContainerdVersion {
    type Err = ContainerdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1.6" => Ok(ContainerdVersion::V1_6),
            "1.7" => Ok(ContainerdVersion::V1_7),
            "2.1" => Ok(ContainerdVersion::V2_1),
            other => Err(ContainerdError::UnknownVersion(other.to_string())),
        }
    }
}

/// Errors of the private containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("unknown containerd version {0:?}: expected 1.6, 1.7 or 2.1")]
    UnknownVersion(String),
    #[error(
        "containerd {version} is not installed at {path}: run scripts/setup-host (as root) first"
    )]
    NotInstalled {
        version: ContainerdVersion,
        path: PathBuf,
    },
    #[error("{binary} reports version {found:?}, expected containerd {expected}")]
    WrongVersion {
        binary: PathBuf,
        found: String,
        expected: ContainerdVersion,
    },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("containerd {version} did not come up within {secs} s; log {log}:\n{tail}")]
    StartTimeout {
        version: ContainerdVersion,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("`ctr {args}` failed ({status}): {stderr}")]
    Ctr {
        args: String,
        status: String,
        stderr: String,
    },
    #[error(
        "ctr did not finish within {limit:?} (killed); stderr: {stderr}\ncontainerd log:\n{tail}"
    )]
    CtrTimeout {
        limit: Duration,
        stderr: String,
        tail: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ContainerdError {
    let path = path.to_path_buf();
    move |source| ContainerdError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `p` quoted for `sh`.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

/// Checks that `version`'s binaries exist and report that version.
pub fn check_installed(version: ContainerdVersion) -> Result<String, ContainerdError> {
    if !version.ctr().is_file() {
        return Err(ContainerdError::NotInstalled {
            version,
            path: version.ctr(),
        });
    }
    check_installed_at(version, &version.containerd())
}

/// Checks that `binary` exists and is containerd `version`.
pub fn check_installed_at(
    version: ContainerdVersion,
    binary: &Path,
) -> Result<String, ContainerdError> {
    let binary = binary.to_path_buf();
    if !binary.is_file() {
        return Err(ContainerdError::NotInstalled {
            version,
            path: binary,
        });
    }
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .map_err(io_err("cannot run", &binary))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let wanted = format!(" {}.", version.as_str());
    let wanted_v = format!(" v{}.", version.as_str());
    if text.contains(&wanted) || text.contains(&wanted_v) {
        Ok(text)
    } else {
        Err(ContainerdError::WrongVersion {
            binary,
            found: text,
            expected: version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_print() {
        for v in ContainerdVersion::ALL {
            assert_eq!(v.as_str().parse::<ContainerdVersion>().unwrap(), v);
        }
        assert!("2.0".parse::<ContainerdVersion>().is_err());
    }
}

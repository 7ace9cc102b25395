//! Setting a private containerd up: its shims, proxy plugins, CRI options and environment
//! ([`ContainerdBuilder`]), and starting it in a fresh sandbox.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::{write_cri_files, CriOptions};
use super::{check_installed, io_err, shell_quote, Containerd, ContainerdError, ContainerdVersion};
use crate::host;
use crate::sandbox::Sandbox;

/// A runtime shim made visible to the daemon.
#[derive(Debug, Clone)]
struct ShimLink {
    runtime: String,
    binary: PathBuf,
}

/// A `[proxy_plugins.NAME]` entry.
#[derive(Debug, Clone)]
pub(super) struct ProxyPlugin {
    pub(super) name: String,
    pub(super) kind: String,
    pub(super) address: PathBuf,
}

/// Builds a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    pub(super) version: ContainerdVersion,
    namespace: Option<String>,
    shims: Vec<ShimLink>,
    pub(super) proxy_plugins: Vec<ProxyPlugin>,
    workspace_shims: bool,
    pub(super) log_level: String,
    pub(super) cri: Option<CriOptions>,
    pub(super) imports: Vec<PathBuf>,
    pub(super) erofs_peer: bool,
    /// (snapshotter, diff proxy plugin) pairs: the transfer service unpacks into the
    /// snapshotter with that differ (2.x).
    pub(super) differs: Vec<(String, String)>,
    /// Symlinks made to the daemon's socket (for a process that must name it before it
    /// exists).
    socket_links: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

/// With [`ContainerdBuilder::with_erofs_peer`]: the file in the daemon's directory where
/// every `mkfs.erofs` run's arguments are logged, one line each.
pub const MKFS_EROFS_LOG: &str = "mkfs-erofs.log";

/// The containerd namespace of the CRI plugin's pods and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// Shim binaries of this workspace and the runtime names containerd maps to them.
pub const WORKSPACE_SHIMS: &[(&str, &str)] = &[
    ("io.containerd.hyperbox.v1", "containerd-shim-hyperbox-v1"),
    (
        "io.containerd.hyperbox-wasm.v1",
        "containerd-shim-hyperbox-wasm-v1",
    ),
];

/// The binary containerd runs for a runtime name: `io.containerd.X.v1` runs
/// `containerd-shim-X-v1`.
pub fn shim_binary_name(runtime: &str) -> Option<String> {
    let rest = runtime.strip_prefix("io.containerd.")?;
    let (name, version) = rest.rsplit_once('.')?;
    (!name.is_empty() && version.starts_with('v'))
        .then(|| format!("containerd-shim-{name}-{version}"))
}

impl ContainerdBuilder {
    /// A builder for `version` with the workspace's shims registered when built.
    pub fn new(version: ContainerdVersion) -> Self {
        ContainerdBuilder {
            version,
            namespace: None,
            shims: Vec::new(),
            proxy_plugins: Vec::new(),
            workspace_shims: true,
            log_level: "info".into(),
            cri: None,
            imports: Vec::new(),
            erofs_peer: false,
            differs: Vec::new(),
            socket_links: Vec::new(),
            env: Vec::new(),
        }
    }

    /// containerd 2.x only: enables its own EROFS snapshotter (`erofs`) and EROFS differ,
    /// which unpacks into it (`mkfs.erofs --tar=f`), with erofs-utils 1.8's `mkfs.erofs`
    /// ([`host::mkfs_erofs_peer`]) first on the daemon's `PATH`: the peer the snapshotter
    /// benchmark measures hyperbox against.
    pub fn with_erofs_peer(mut self) -> Self {
        self.erofs_peer = true;
        self
    }

    /// Enables the CRI plugin (disabled by default) with `options`. Its pods and containers
    /// live in containerd namespace `k8s.io`, which the daemon then uses.
    pub fn with_cri(mut self, options: CriOptions) -> Self {
        self.namespace = Some(CRI_NAMESPACE.to_owned());
        self.cri = Some(options);
        self
    }

    /// The containerd namespace clients use (default: unique per daemon).
    pub fn with_namespace(mut self, ns: &str) -> Self {
        self.namespace = Some(ns.to_string());
        self
    }

    /// Registers `binary` as the shim of runtime `runtime` (`io.containerd.X.v1`).
    pub fn with_shim(mut self, runtime: &str, binary: impl Into<PathBuf>) -> Self {
        self.shims.push(ShimLink {
            runtime: runtime.to_string(),
            binary: binary.into(),
        });
        self
    }

    /// Whether to register the workspace's built shims (default yes).
    pub fn with_workspace_shims(mut self, yes: bool) -> Self {
        self.workspace_shims = yes;
        self
    }

    /// Lists `file` in the config's top-level `imports` (a user's snippet, read by containerd
    /// itself: 1.6 and 1.7 let an imported plugin table replace the generated one whole, 2.x
    /// merges it).
    pub fn with_import(mut self, file: impl Into<PathBuf>) -> Self {
        self.imports.push(file.into());
        self
    }

    /// Adds a proxy plugin (`kind` is `snapshot` or `content`) served on `address`.
    pub fn with_proxy_plugin(
        mut self,
        name: &str,
        kind: &str,
        address: impl Into<PathBuf>,
    ) -> Self {
        self.proxy_plugins.push(ProxyPlugin {
            name: name.to_string(),
            kind: kind.to_string(),
            address: address.into(),
        });
        self
    }

    /// containerd 2.x: a `type = "diff"` proxy plugin `name` at `address`, the differ the
    /// transfer service unpacks into `snapshotter` with (1.6 and 1.7 have no diff proxy
    /// plugins: nothing is added there).
    pub fn with_diff_proxy(
        mut self,
        name: &str,
        snapshotter: &str,
        address: impl Into<PathBuf>,
    ) -> Self {
        if self.version.is_2x() {
            self = self.with_proxy_plugin(name, "diff", address);
            self.differs
                .push((snapshotter.to_string(), name.to_string()));
        }
        self
    }

    /// A symlink at `link` to the daemon's socket, made before the daemon starts.
    pub fn with_socket_link(mut self, link: impl Into<PathBuf>) -> Self {
        self.socket_links.push(link.into());
        self
    }

    /// Sets `key` to `value` in the daemon's environment, which the shims it starts inherit
    /// (e.g. `HYPERBOX_TIMELINE` for a benchmark's per-step timeline).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// containerd's log level (default `info`).
    pub fn with_log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts the daemon and waits until it serves its API.
    pub fn start(self) -> Result<Containerd, ContainerdError> {
        let version = self.version;
        check_installed(version)?;
        let mut sandbox = Sandbox::create(&format!("containerd{}", version.as_str()))?;
        let dir = sandbox.dir().to_path_buf();
        let namespace = self.namespace.clone().unwrap_or_else(|| {
            let base = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            format!("hbt-{}", base.unwrap_or_default().replace('.', "-"))
        });
        let socket = dir.join("containerd.sock");
        sandbox.record_containerd(&socket, &namespace)?;
        for link in &self.socket_links {
            let _ = fs::remove_file(link);
            symlink(&socket, link).map_err(io_err("cannot link the socket at", link))?;
        }

        let bin = dir.join("bin");
        fs::create_dir_all(&bin).map_err(io_err("cannot create", &bin))?;
        let mut shims = self.shims.clone();
        if self.workspace_shims {
            for (runtime, name) in WORKSPACE_SHIMS {
                if let Some(path) = host::workspace_binary(name) {
                    shims.push(ShimLink {
                        runtime: runtime.to_string(),
                        binary: path,
                    });
                }
            }
        }
        if self.erofs_peer {
            if !version.is_2x() {
                return Err(ContainerdError::UnknownVersion(format!(
                    "containerd {version:?} has no EROFS snapshotter (2.1 has)"
                )));
            }
            let mkfs = host::mkfs_erofs_peer();
            if !mkfs.exists() {
                return Err(ContainerdError::UnknownVersion(format!(
                    "{} is missing: scripts/setup-host builds it",
                    mkfs.display()
                )));
            }
            // A wrapper that logs each run's arguments, so a benchmark can tell which path
            // containerd took: its differ (`--tar=f`) or a conversion of a directory.
            let wrapper = bin.join("mkfs.erofs");
            let script = format!(
                "#!/bin/sh\necho \"$*\" >> {}\nexec {} \"$@\"\n",
                shell_quote(&dir.join(MKFS_EROFS_LOG)),
                shell_quote(&mkfs)
            );
            fs::write(&wrapper, script).map_err(io_err("cannot write", &wrapper))?;
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
                .map_err(io_err("cannot chmod", &wrapper))?;
        }
        let mut runtimes = Vec::new();
        for shim in &shims {
            let name = shim_binary_name(&shim.runtime).ok_or_else(|| {
                ContainerdError::UnknownVersion(format!("runtime name {}", shim.runtime))
            })?;
            let link = bin.join(&name);
            let _ = fs::remove_file(&link);
            symlink(&shim.binary, &link).map_err(io_err("cannot link shim", &link))?;
            runtimes.push(shim.runtime.clone());
        }

        if let Some(cri) = &self.cri {
            write_cri_files(&dir, cri)?;
        }
        let config = dir.join("config.toml");
        fs::write(&config, self.config_toml(&dir, &socket))
            .map_err(io_err("cannot write", &config))?;

        let path_env = daemon_path(version, &bin);
        let mut containerd = Containerd {
            version,
            namespace,
            socket,
            config,
            path_env,
            runtimes,
            env: self.env.clone(),
            child: None,
            sandbox,
        };
        containerd.spawn_daemon()?;
        Ok(containerd)
    }
}

fn daemon_path(version: ContainerdVersion, bin: &Path) -> String {
    let mut parts = vec![
        bin.to_string_lossy().into_owned(),
        host::tools_bin().to_string_lossy().into_owned(),
        version.bin_dir().to_string_lossy().into_owned(),
    ];
    parts.extend(
        [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ]
        .map(String::from),
    );
    parts.dedup();
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_map_to_shim_binaries() {
        assert_eq!(
            shim_binary_name("io.containerd.hyperbox.v1").as_deref(),
            Some("containerd-shim-hyperbox-v1")
        );
        assert_eq!(
            shim_binary_name("io.containerd.hyperbox-wasm.v1").as_deref(),
            Some("containerd-shim-hyperbox-wasm-v1")
        );
        assert_eq!(
            shim_binary_name("io.containerd.runc.v2").as_deref(),
            Some("containerd-shim-runc-v2")
        );
        assert_eq!(shim_binary_name("runc"), None);
        assert_eq!(shim_binary_name("io.containerd..v1"), None);
    }
}

//! A private containerd daemon of a chosen version, in its own sandbox.
//!
//! Each daemon gets its own root, state dir, gRPC and ttrpc sockets, `opt` dir and generated
//! config (version 2 for 1.6 and 1.7, version 3 for 2.1), plus a `bin/` directory put first on its
//! `PATH`: containerd finds a runtime `io.containerd.X.v1` as the binary
//! `containerd-shim-X-v1` on its `PATH`, so linking the workspace's shims there registers them
//! without touching the host. Containers run in a containerd namespace unique to the daemon,
//! so their cgroups (`/NS/ID`) and runc state can be found and removed at teardown.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::thread;
use std::time::{Duration, Instant};

use crate::client::TestClient;
use crate::host;
use crate::sandbox::{Sandbox, SandboxError};

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

/// A runtime shim made visible to the daemon.
#[derive(Debug, Clone)]
struct ShimLink {
    runtime: String,
    binary: PathBuf,
}

/// A `[proxy_plugins.NAME]` entry.
#[derive(Debug, Clone)]
struct ProxyPlugin {
    name: String,
    kind: String,
    address: PathBuf,
}

/// The CRI plugin's settings (`[plugins."io.containerd.grpc.v1.cri"]`), for a daemon that
/// serves Kubernetes' CRI. Its files are written into the daemon's sandbox: the CNI network
/// list as `cni/net.d/10-NAME.conflist` and one `certs.d/HOST/hosts.toml` per mirrored
/// registry host.
#[derive(Debug, Clone, Default)]
pub struct CriOptions {
    /// The sandbox (pause) image.
    pub sandbox_image: String,
    /// Runtime handlers: (handler name, runtime type such as `io.containerd.runc.v2`). The
    /// first is the default.
    pub runtimes: Vec<(String, String)>,
    /// Shim binaries of handlers that name one (`runtime_path`): (handler name, binary).
    pub runtime_paths: Vec<(String, PathBuf)>,
    /// Snapshotters of handlers that name one (`snapshotter`): (handler name, snapshotter).
    pub runtime_snapshotters: Vec<(String, String)>,
    /// Annotations a handler lets through from pods and containers to the runtime
    /// (`pod_annotations` and `container_annotations`): (handler name, pattern).
    pub runtime_annotations: Vec<(String, String)>,
    /// Directory of the CNI plugin binaries (Debian: `/usr/lib/cni`).
    pub cni_bin_dir: PathBuf,
    /// The network's name and its `.conflist` JSON.
    pub cni_conflist: (String, String),
    /// Registry hosts served by a mirror: (host, mirror URL such as `http://127.0.0.1:PORT`).
    pub mirrors: Vec<(String, String)>,
    /// `restrict_oom_score_adj` (needed where root lacks CAP_SYS_RESOURCE).
    pub restrict_oom_score_adj: bool,
    /// CDI spec directories: when not empty, CDI is turned on (`enable_cdi`, off by default
    /// in 1.7) and reads only these (`cdi_spec_dirs`; 2.x would otherwise read the host's
    /// `/etc/cdi` and `/var/run/cdi`).
    pub cdi_spec_dirs: Vec<PathBuf>,
}

/// Builds a [`Containerd`].
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    version: ContainerdVersion,
    namespace: Option<String>,
    shims: Vec<ShimLink>,
    proxy_plugins: Vec<ProxyPlugin>,
    workspace_shims: bool,
    log_level: String,
    cri: Option<CriOptions>,
    imports: Vec<PathBuf>,
    erofs_peer: bool,
    /// (snapshotter, diff proxy plugin) pairs: the transfer service unpacks into the
    /// snapshotter with that differ (2.x).
    differs: Vec<(String, String)>,
    /// Symlinks made to the daemon's socket (for a process that must name it before it
    /// exists).
    socket_links: Vec<PathBuf>,
    env: Vec<(String, String)>,
}

/// With [`ContainerdBuilder::with_erofs_peer`]: the file in the daemon's directory where
/// every `mkfs.erofs` run's arguments are logged, one line each.
pub const MKFS_EROFS_LOG: &str = "mkfs-erofs.log";

/// `p` quoted for `sh`.
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"))
}

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

    /// containerd's log level (default `info`).
    /// Sets `key` to `value` in the daemon's environment, which the shims it starts inherit
    /// (e.g. `HYPERBOX_TIMELINE` for a benchmark's per-step timeline).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

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

    fn config_toml(&self, dir: &Path, socket: &Path) -> String {
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        let mut s = String::new();
        let config_version = if self.version.is_2x() { 3 } else { 2 };
        s.push_str(&format!(
            "# Generated by the HyperBox test harness.\nversion = {config_version}\n"
        ));
        if !self.imports.is_empty() {
            let files: Vec<String> = self.imports.iter().map(|f| q(f)).collect();
            s.push_str(&format!("imports = [{}]\n", files.join(", ")));
        }
        s.push_str(&format!("root = {}\n", q(&dir.join("root"))));
        s.push_str(&format!("state = {}\n", q(&dir.join("state"))));
        // The CRI plugin needs CNI and a sandbox image; tests that need CRI configure it.
        if self.cri.is_none() {
            s.push_str("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n");
        } else {
            s.push_str("disabled_plugins = []\n\n");
        }
        s.push_str(&format!("[grpc]\n  address = {}\n\n", q(socket)));
        s.push_str(&format!(
            "[ttrpc]\n  address = {}\n\n",
            q(&dir.join("containerd.sock.ttrpc"))
        ));
        s.push_str(&format!(
            "[debug]\n  level = {}\n\n",
            toml_string(&self.log_level)
        ));
        s.push_str(&format!(
            "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = {}\n\n",
            q(&dir.join("opt"))
        ));
        if let Some(cri) = &self.cri {
            if self.version.is_2x() {
                s.push_str(&cri_toml_v3(dir, cri));
            } else {
                s.push_str(&cri_toml(dir, cri));
            }
        }
        // containerd 2.x unpacks pulled layers in its transfer service, only into the
        // snapshotters its `unpack_config` lists (default: overlayfs alone): a proxy
        // snapshotter is listed beside overlayfs, as config/containerd-snapshotter.v3.toml
        // tells users to.
        let snapshotters: Vec<&str> = self
            .proxy_plugins
            .iter()
            .filter(|p| p.kind == "snapshot")
            .map(|p| p.name.as_str())
            .collect();
        if self.version.is_2x() && (!snapshotters.is_empty() || self.erofs_peer) {
            let platform = format!("linux/{}", go_arch());
            for name in std::iter::once("overlayfs").chain(snapshotters) {
                let differ = self
                    .differs
                    .iter()
                    .find(|(sn, _)| sn == name)
                    .map_or("walking", |(_, d)| d.as_str());
                s.push_str(&format!(
                    "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  \
                     platform = {}\n  snapshotter = {}\n  differ = {}\n\n",
                    toml_string(&platform),
                    toml_string(name),
                    toml_string(differ)
                ));
            }
            if self.erofs_peer {
                // As containerd's docs/snapshotters/erofs.md advises for erofs-utils 1.8.2+.
                s.push_str(&format!(
                    "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  \
                     platform = {}\n  snapshotter = \"erofs\"\n  differ = \"erofs\"\n\n\
                     [plugins.\"io.containerd.differ.v1.erofs\"]\n  \
                     mkfs_options = [\"-T0\", \"--mkfs-time\", \"--sort=none\"]\n\n",
                    toml_string(&platform),
                ));
            }
        }
        for p in &self.proxy_plugins {
            s.push_str(&format!(
                "[proxy_plugins.{}]\n  type = {}\n  address = {}\n\n",
                toml_string(&p.name),
                toml_string(&p.kind),
                q(&p.address)
            ));
        }
        s
    }
}

/// Where a CRI daemon's files live in its sandbox.
const CRI_CNI_CONF_DIR: &str = "cni/net.d";
const CRI_CERTS_DIR: &str = "certs.d";

fn write_cri_files(dir: &Path, cri: &CriOptions) -> Result<(), ContainerdError> {
    let conf_dir = dir.join(CRI_CNI_CONF_DIR);
    fs::create_dir_all(&conf_dir).map_err(io_err("cannot create", &conf_dir))?;
    let (name, conflist) = &cri.cni_conflist;
    let path = conf_dir.join(format!("10-{name}.conflist"));
    fs::write(&path, conflist).map_err(io_err("cannot write", &path))?;
    for (host, mirror) in &cri.mirrors {
        let host_dir = dir.join(CRI_CERTS_DIR).join(host);
        fs::create_dir_all(&host_dir).map_err(io_err("cannot create", &host_dir))?;
        let path = host_dir.join("hosts.toml");
        let text = format!(
            "# Generated by the HyperBox test harness: {host} served by the loopback registry.\n\
             server = {}\n\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
            toml_string(&format!("https://{host}")),
            toml_string(mirror)
        );
        fs::write(&path, text).map_err(io_err("cannot write", &path))?;
    }
    Ok(())
}

/// `enable_cdi` and `cdi_spec_dirs` lines of a CRI table, when the options name spec
/// directories.
fn cdi_toml(cri: &CriOptions) -> String {
    if cri.cdi_spec_dirs.is_empty() {
        return String::new();
    }
    let dirs: Vec<String> = cri
        .cdi_spec_dirs
        .iter()
        .map(|d| toml_string(&d.to_string_lossy()))
        .collect();
    format!(
        "  enable_cdi = true\n  cdi_spec_dirs = [{}]\n",
        dirs.join(", ")
    )
}

/// The `[plugins."io.containerd.grpc.v1.cri"]` section.
fn cri_toml(dir: &Path, cri: &CriOptions) -> String {
    let q = |p: &Path| toml_string(&p.to_string_lossy());
    let plugin = "plugins.\"io.containerd.grpc.v1.cri\"";
    let mut s = format!(
        "[{plugin}]\n  sandbox_image = {}\n  restrict_oom_score_adj = {}\n  \
         netns_mounts_under_state_dir = true\n  enable_selinux = false\n{}\n",
        toml_string(&cri.sandbox_image),
        cri.restrict_oom_score_adj,
        cdi_toml(cri)
    );
    s.push_str(&format!(
        "[{plugin}.containerd]\n  snapshotter = \"overlayfs\"\n"
    ));
    s.push_str(&runtimes_toml(plugin, cri));
    s.push_str(&format!(
        "[{plugin}.cni]\n  bin_dir = {}\n  conf_dir = {}\n  max_conf_num = 1\n\n",
        q(&cri.cni_bin_dir),
        q(&dir.join(CRI_CNI_CONF_DIR))
    ));
    s.push_str(&format!(
        "[{plugin}.registry]\n  config_path = {}\n\n",
        q(&dir.join(CRI_CERTS_DIR))
    ));
    s
}

/// The rest of `[PLUGIN.containerd]` (its header written by the caller): the default
/// runtime, then one `[PLUGIN.containerd.runtimes.NAME]` table per handler.
fn runtimes_toml(plugin: &str, cri: &CriOptions) -> String {
    let default = cri
        .runtimes
        .first()
        .map(|(n, _)| n.as_str())
        .unwrap_or("runc");
    let mut s = format!("  default_runtime_name = {}\n\n", toml_string(default));
    for (name, runtime_type) in &cri.runtimes {
        s.push_str(&format!(
            "[{plugin}.containerd.runtimes.{}]\n  runtime_type = {}\n",
            toml_string(name),
            toml_string(runtime_type)
        ));
        if let Some((_, path)) = cri.runtime_paths.iter().find(|(n, _)| n == name) {
            s.push_str(&format!(
                "  runtime_path = {}\n",
                toml_string(&path.to_string_lossy())
            ));
        }
        if let Some((_, snapshotter)) = cri.runtime_snapshotters.iter().find(|(n, _)| n == name) {
            s.push_str(&format!("  snapshotter = {}\n", toml_string(snapshotter)));
        }
        if let Some((_, pattern)) = cri.runtime_annotations.iter().find(|(n, _)| n == name) {
            let pattern = toml_string(pattern);
            s.push_str(&format!(
                "  pod_annotations = [{pattern}]\n  container_annotations = [{pattern}]\n"
            ));
        }
        s.push('\n');
    }
    s
}

/// The CRI plugins' sections in config version 3 (containerd 2.x): images (sandbox image,
/// snapshotter, registry) in `io.containerd.cri.v1.images`, runtimes and CNI in
/// `io.containerd.cri.v1.runtime`.
fn cri_toml_v3(dir: &Path, cri: &CriOptions) -> String {
    let q = |p: &Path| toml_string(&p.to_string_lossy());
    let images = "plugins.\"io.containerd.cri.v1.images\"";
    let runtime = "plugins.\"io.containerd.cri.v1.runtime\"";
    let mut s = format!(
        "[{images}]\n  snapshotter = \"overlayfs\"\n\n\
         [{images}.pinned_images]\n  sandbox = {}\n\n\
         [{images}.registry]\n  config_path = {}\n\n",
        toml_string(&cri.sandbox_image),
        q(&dir.join(CRI_CERTS_DIR))
    );
    s.push_str(&format!(
        "[{runtime}]\n  restrict_oom_score_adj = {}\n  netns_mounts_under_state_dir = true\n  \
         enable_selinux = false\n{}\n",
        cri.restrict_oom_score_adj,
        cdi_toml(cri)
    ));
    s.push_str(&format!("[{runtime}.containerd]\n"));
    s.push_str(&runtimes_toml(runtime, cri));
    s.push_str(&format!(
        "[{runtime}.cni]\n  bin_dirs = [{}]\n  conf_dir = {}\n  max_conf_num = 1\n\n",
        q(&cri.cni_bin_dir),
        q(&dir.join(CRI_CNI_CONF_DIR))
    ));
    s
}

/// This machine's architecture as Go (and so OCI platforms) names it.
pub fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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

/// A running private containerd. Dropping it tears down every container, shim, mount and
/// directory it made.
#[derive(Debug)]
pub struct Containerd {
    version: ContainerdVersion,
    namespace: String,
    socket: PathBuf,
    config: PathBuf,
    path_env: String,
    runtimes: Vec<String>,
    /// What [`ContainerdBuilder::with_env`] added to the daemon's environment.
    env: Vec<(String, String)>,
    child: Option<Child>,
    sandbox: Sandbox,
}

impl Containerd {
    /// Starts a daemon of `version` with default settings.
    pub fn start(version: ContainerdVersion) -> Result<Self, ContainerdError> {
        ContainerdBuilder::new(version).start()
    }

    /// A builder for finer control.
    pub fn builder(version: ContainerdVersion) -> ContainerdBuilder {
        ContainerdBuilder::new(version)
    }

    fn spawn_daemon(&mut self) -> Result<(), ContainerdError> {
        let dir = self.sandbox.dir().to_path_buf();
        let log_path = dir.join("containerd.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot open", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("cannot open", &log_path))?;
        let binary = self.version.containerd();
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&self.config)
            .env("PATH", &self.path_env)
            // The shims keep their templates in the sandbox, torn down with it, and read the
            // node's template settings there (none unless a test writes them).
            .env("HYPERBOX_TEMPLATE_ROOT", self.template_root())
            .env("HYPERBOX_TEMPLATE_CONFIG", self.template_settings())
            // The shims read the GPU cache a test's generator writes there (none otherwise:
            // a GPU request then fails as on a node without a driver).
            .env("HYPERBOX_GPU_CACHE", self.gpu_cache())
            .env("HYPERBOX_GPU_CONFIG", self.gpu_settings())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err("cannot start", &binary))?;
        self.sandbox.track(&child, "containerd")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(30))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + limit;
        loop {
            let exited = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_))));
            if !exited && UnixStream::connect(&self.socket).is_ok() {
                let ok = self
                    .ctr()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return Ok(());
                }
            }
            if exited || Instant::now() > deadline {
                return Err(ContainerdError::StartTimeout {
                    version: self.version,
                    secs: limit.as_secs(),
                    log: self.log_path(),
                    tail: self.log_tail(30),
                });
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// The daemon's version.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// The containerd namespace of this daemon's containers.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The configuration file the daemon was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The sandbox directory (root, state, config, logs).
    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    /// The sandbox record (for leftover checks).
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }

    /// Runtime names registered beside the built-in ones (`io.containerd.runc.v2`).
    pub fn runtimes(&self) -> &[String] {
        &self.runtimes
    }

    /// The `PATH` the daemon and its shims run with.
    pub fn path_env(&self) -> &str {
        &self.path_env
    }

    /// The daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `ctr -a SOCKET -n NS` of the daemon's version.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new(self.version.ctr());
        cmd.arg("-a")
            .arg(&self.socket)
            .arg("-n")
            .arg(&self.namespace)
            .env("PATH", &self.path_env);
        cmd
    }

    /// Where this daemon's shims keep templates (`HYPERBOX_TEMPLATE_ROOT`): in the sandbox.
    pub fn template_root(&self) -> PathBuf {
        self.sandbox.dir().join("templates")
    }

    /// Where this daemon's shims read the node's GPU cache (`HYPERBOX_GPU_CACHE`): in the
    /// sandbox, written by a test's `hyperbox-gpu-cdi generate --cache`.
    pub fn gpu_cache(&self) -> PathBuf {
        self.sandbox.dir().join("gpu/cache.json")
    }

    /// Where this daemon's shims read the node's GPU settings (`HYPERBOX_GPU_CONFIG`): in
    /// the sandbox (none unless a test writes them: the defaults).
    pub fn gpu_settings(&self) -> PathBuf {
        self.sandbox.dir().join("gpu.toml")
    }

    /// Where this daemon's shims read the node's template settings
    /// (`HYPERBOX_TEMPLATE_CONFIG`): in the sandbox.
    pub fn template_settings(&self) -> PathBuf {
        self.sandbox.dir().join("templates.toml")
    }

    /// The real `name` on this daemon's `PATH` past its own `bin` directory (where a test's
    /// stand-ins go); `what` is what the error says could not be done.
    fn beyond_bin(&self, what: &'static str, name: &str) -> Result<PathBuf, ContainerdError> {
        let bin = self.dir().join("bin");
        std::env::split_paths(&self.path_env)
            .filter(|d| *d != bin)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .ok_or_else(|| io_err(what, &bin)(io::Error::from(io::ErrorKind::NotFound)))
    }

    /// Puts a `criu` first on this daemon's `PATH` (so the shims started from now on find it)
    /// whose `swrk`, the RPC a dump or restore uses, never answers: it writes its pid to
    /// `pidfile` and sleeps. `check` and `--version` go to the real CRIU further down the
    /// `PATH`. Returns the fake's path (remove it to put the real CRIU back).
    pub fn hang_criu_requests(&self, pidfile: &Path) -> Result<PathBuf, ContainerdError> {
        let bin = self.dir().join("bin");
        let real = self.beyond_bin(
            "find a criu (scripts/setup-host installs it) on the PATH beside",
            "criu",
        )?;
        let fake = bin.join("criu");
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = swrk ]; then echo $$ > {}; exec sleep 300; fi\n\
             exec {} \"$@\"\n",
            pidfile.display(),
            real.display()
        );
        fs::write(&fake, script).map_err(io_err("cannot write", &fake))?;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755))
            .map_err(io_err("cannot make executable", &fake))?;
        Ok(fake)
    }

    /// Puts a `runc` first on this daemon's `PATH` (for the shims started from now on) that
    /// runs the real one found further down and appends a line per call to `log`: the wall
    /// clock in microseconds before and after it, its exit status and its arguments
    /// (`T0 T1 STATUS ARGS...`). What a benchmark learns of runc's shim's steps; bash's
    /// `EPOCHREALTIME` reads the clock without starting a process.
    pub fn log_runc_calls(&self, log: &Path) -> Result<PathBuf, ContainerdError> {
        let bin = self.dir().join("bin");
        let real = self.beyond_bin("find a runc on the PATH beside", "runc")?;
        let bash = Path::new("/bin/bash");
        if !bash.is_file() {
            return Err(io_err("find", bash)(io::Error::from(
                io::ErrorKind::NotFound,
            )));
        }
        let wrapper = bin.join("runc");
        let script = format!(
            "#!/bin/bash\nt0=${{EPOCHREALTIME/./}}\n{} \"$@\"\nrc=$?\n\
             echo \"$t0 ${{EPOCHREALTIME/./}} $rc $*\" >> {}\nexit $rc\n",
            shell_quote(&real),
            shell_quote(log)
        );
        fs::write(&wrapper, script).map_err(io_err("cannot write", &wrapper))?;
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))
            .map_err(io_err("cannot make executable", &wrapper))?;
        Ok(wrapper)
    }

    /// Runs `ctr ARGS` and returns its output, failing with its stderr when it fails.
    pub fn ctr_run(&self, args: &[&str]) -> Result<Output, ContainerdError> {
        let out = self
            .ctr()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("cannot run", &self.version.ctr()))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ContainerdError::Ctr {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs `ctr ARGS` and returns its stdout as text.
    /// Waits for a `ctr` started from [`Containerd::ctr`] and returns its output; kills it
    /// after `limit`, with its stderr and the daemon's log tail in the error.
    pub fn wait_ctr(&self, mut child: Child, limit: Duration) -> Result<Output, ContainerdError> {
        let deadline = Instant::now() + limit;
        let io = |e| io_err("wait for", Path::new("ctr"))(e);
        while child.try_wait().map_err(io)?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().map_err(io)?;
                return Err(ContainerdError::CtrTimeout {
                    limit,
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    tail: self.log_tail(40),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().map_err(io)
    }

    pub fn ctr_stdout(&self, args: &[&str]) -> Result<String, ContainerdError> {
        self.ctr_run(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Creates a container (no task) with `ctr containers create IMAGE ID ARGS...`.
    pub fn create_container(
        &self,
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Result<(), ContainerdError> {
        self.create_container_on(None, image, id, args)
    }

    /// `ctr run -d --null-io --runtime RUNTIME IMAGE ID CMD...`: a task left running.
    pub fn run_detached(
        &self,
        runtime: &str,
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<(), ContainerdError> {
        let mut args = vec!["run", "-d", "--null-io", "--runtime", runtime, image, id];
        args.extend_from_slice(cmd);
        self.ctr_run(&args).map(drop)
    }

    /// [`Containerd::create_container`] with runtime `runtime` (`--runtime`) when given.
    pub fn create_container_on(
        &self,
        runtime: Option<&str>,
        image: &str,
        id: &str,
        args: &[&str],
    ) -> Result<(), ContainerdError> {
        let mut all = vec!["containers", "create"];
        if let Some(runtime) = runtime {
            all.extend(["--runtime", runtime]);
        }
        all.extend([image, id]);
        // ctr 1.6 parses flags anywhere on the line, so an argument such as `sh -c` would be
        // taken as its own `--config`; `--` ends its flags there. ctr 1.7 stops at the first
        // argument and would run `--` as the command.
        if self.version == ContainerdVersion::V1_6 {
            all.push("--");
        }
        all.extend_from_slice(args);
        self.ctr_run(&all).map(drop)
    }

    /// Pulls `reference` over plain HTTP (the loopback registry).
    pub fn pull(&self, reference: &str) -> Result<(), ContainerdError> {
        self.ctr_run(&["images", "pull", "--plain-http", reference])
            .map(drop)
    }

    /// Imports an oci-archive tar.
    pub fn import(&self, archive: &Path) -> Result<(), ContainerdError> {
        let archive = archive.to_string_lossy();
        self.ctr_run(&["images", "import", &archive]).map(drop)
    }

    /// A client of the containerd API for what `ctr` cannot do.
    pub async fn client(&self) -> Result<TestClient, crate::client::ClientError> {
        TestClient::connect(&self.socket, &self.namespace).await
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.sandbox.dir().join("containerd.log")
    }

    /// Stops the daemon with SIGTERM (containers keep running, as on a host restarting
    /// containerd), then starts it again with the same config and waits until it serves.
    pub fn restart(&mut self) -> Result<(), ContainerdError> {
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        self.spawn_daemon()
    }

    /// Kills the daemon with `signal` and reaps it; containers and shims stay.
    pub fn stop_daemon(&mut self, signal: nix::sys::signal::Signal) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, signal);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => thread::sleep(Duration::from_millis(20)),
                }
            }
            let _ = self.sandbox.untrack(child.id());
        }
    }

    /// Deletes every task and container through the API, as a user would, so shims exit and
    /// unmount on their own; whatever resists is then removed by the sandbox teardown.
    fn remove_containers(&self) {
        if self.child.is_none() {
            return;
        }
        let tasks = self.ctr_stdout(&["tasks", "ls", "-q"]).unwrap_or_default();
        for id in tasks.split_whitespace() {
            let _ = self.ctr_run(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
        }
        for id in tasks.split_whitespace() {
            let _ = self.ctr_run(&["tasks", "rm", "-f", id]);
        }
        let containers = self
            .ctr_stdout(&["containers", "ls", "-q"])
            .unwrap_or_default();
        for id in containers.split_whitespace() {
            let _ = self.ctr_run(&["containers", "rm", id]);
        }
    }

    /// Stops everything and verifies nothing is left: no process, mount, cgroup or directory.
    pub fn teardown(&mut self) -> Result<(), ContainerdError> {
        self.remove_containers();
        self.stop_daemon(nix::sys::signal::Signal::SIGTERM);
        self.sandbox.teardown()?;
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("containerd {} teardown: {e}", self.version);
            eprintln!(
                "hyperbox harness: containerd {} teardown: {e}",
                self.version
            );
        }
    }
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

    #[test]
    fn versions_parse_and_print() {
        for v in ContainerdVersion::ALL {
            assert_eq!(v.as_str().parse::<ContainerdVersion>().unwrap(), v);
        }
        assert!("2.0".parse::<ContainerdVersion>().is_err());
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(toml_string("x\ny"), "\"x\\u000ay\"");
    }

    #[test]
    fn config_names_every_private_path() {
        let b = ContainerdBuilder::new(ContainerdVersion::V1_7).with_proxy_plugin(
            "hyperbox",
            "snapshot",
            "/run/hb.sock",
        );
        let dir = Path::new("/tmp/sb");
        let text = b.config_toml(dir, &dir.join("containerd.sock"));
        for want in [
            "root = \"/tmp/sb/root\"",
            "state = \"/tmp/sb/state\"",
            "address = \"/tmp/sb/containerd.sock\"",
            "address = \"/tmp/sb/containerd.sock.ttrpc\"",
            "path = \"/tmp/sb/opt\"",
            "[proxy_plugins.\"hyperbox\"]",
            "type = \"snapshot\"",
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}

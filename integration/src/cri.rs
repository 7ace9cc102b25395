//! Kubernetes' CRI conformance suite (`critest`, cri-tools 1.34) against a private containerd
//! serving the CRI.
//!
//! [`CriBed::start`] brings up, each in a harness sandbox and removed after:
//!
//! - the loopback registry holding the stand-ins for critest's images
//!   ([`crate::images::cri`]), pushed as `REPO:TAG` (the original name without its host);
//! - a CNI bridge of the test's own: `hbcPID` with `10.234.X.1/24` (X chosen free), made by the
//!   harness with its address so that the `bridge` plugin needs neither `isGateway` (which
//!   turns on IP forwarding host-wide) nor `ipMasq` (iptables masquerading); pods get no
//!   default route. `portmap` serves `hostPort` (its iptables chains, recorded in the
//!   sandbox when they did not exist before, are deleted at teardown with the bridge);
//! - containerd 1.7 or 2.1 with the CRI plugin (`ContainerdBuilder::with_cri`): runtime
//!   handlers `runc` (`io.containerd.runc.v2`), `hyperbox` (`io.containerd.hyperbox.v1`, the
//!   workspace's shim) and `hyperbox-runc-type` (runc's type, our shim as `runtime_path`), `restrict_oom_score_adj = true` (root lacks CAP_SYS_RESOURCE here),
//!   network namespaces under its state dir, `registry.k8s.io` and `gcr.io` mirrored to the
//!   loopback registry with one `hosts.toml` each, CNI plugins from Debian's
//!   `containernetworking-plugins` (`/usr/lib/cni`).
//!
//! [`run_critest`] runs critest against it for one handler and reads its JUnit report
//! ([`JunitReport`]). critest and crictl are built by `scripts/setup-host` from the cri-tools
//! source tarball in `HYPERBOX_THIRD_PARTY_SRC` into `$PREFIX/cri-tools-1.34.0`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::containerd::{Containerd, ContainerdError, ContainerdVersion, CriOptions};
use crate::images::cri::{self as cri_images, CriImages};
use crate::images::{BuildOptions, ImageError};
use crate::registry::{Registry, RegistryError};
use crate::sandbox::{self, Sandbox, SandboxError};
use crate::snapshotter::{SnapshotterDaemon, PLUGIN};

/// The cri-tools version the harness builds and runs.
pub const CRI_TOOLS_VERSION: &str = "1.34.0";
/// The source tarball `scripts/setup-host` builds critest from, in `HYPERBOX_THIRD_PARTY_SRC`.
pub const CRI_TOOLS_TARBALL: &str = "cri-tools-v1.34.0-src.tar.xz";
/// Where Debian's `containernetworking-plugins` installs the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The runtime handlers critest and the pod tests compare: (handler, runtime type).
pub const HANDLERS: &[(&str, &str)] = &[
    ("runc", "io.containerd.runc.v2"),
    ("hyperbox", "io.containerd.hyperbox.v1"),
];
/// A handler of our runtime whose containers' root filesystems come from hyperbox-snapshotter
/// (`snapshotter = "hyperbox"`), offered by [`CriBed::start_with_snapshotter`].
pub const SNAPSHOTTER_HANDLER: &str = "hyperbox-erofs";
/// The wasm shim's handler (`config/runtimeclass-wasm.yaml`), also offered by the bed.
pub const WASM_HANDLER: (&str, &str) = ("hyperbox-wasm", "io.containerd.hyperbox-wasm.v1");
/// A handler running our shim under runc's runtime type, the binary named by `runtime_path`:
/// containerd 2.x's CRI asks only runtimes of type `io.containerd.runc.v2` for their features
/// (`SHIM -info`), and only through them offers recursive read-only mounts and user
/// namespaces (`config/containerd-runtime.v3.toml` shows both forms).
pub const HYPERBOX_AS_RUNC: &str = "hyperbox-runc-type";
/// The chains CNI's `portmap` plugin adds to the `nat` table.
const PORTMAP_CHAINS: &[&str] = &[
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-SETMARK",
    "CNI-HOSTPORT-MASQ",
];

/// Errors of the CRI test bed.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("no free 10.234.X.0/24 subnet for the CNI bridge")]
    NoSubnet,
    #[error("hyperbox-snapshotter: {0}")]
    Snapshotter(String),
    #[error("cannot read the JUnit report {path}: {reason}")]
    Junit { path: PathBuf, reason: String },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CriError {
    let path = path.to_path_buf();
    move |source| CriError::Io { what, path, source }
}

/// `$PREFIX/cri-tools-1.34.0`: critest and crictl.
pub fn cri_tools_dir() -> PathBuf {
    crate::host::prefix().join(format!("cri-tools-{CRI_TOOLS_VERSION}"))
}

/// The critest binary.
pub fn critest_binary() -> PathBuf {
    cri_tools_dir().join("critest")
}

/// The crictl binary.
pub fn crictl_binary() -> PathBuf {
    cri_tools_dir().join("crictl")
}

/// The cri-tools source tarball, if `HYPERBOX_THIRD_PARTY_SRC` names a folder holding it.
pub fn cri_tools_tarball() -> Option<PathBuf> {
    let dir = std::env::var_os("HYPERBOX_THIRD_PARTY_SRC").filter(|v| !v.is_empty())?;
    let path = Path::new(&dir).join(CRI_TOOLS_TARBALL);
    path.is_file().then_some(path)
}

/// A bridge of the test's own, with the CNI network list that uses it.
#[derive(Debug)]
struct BridgeNetwork {
    name: String,
    bridge: String,
    subnet: String,
    conflist: String,
    sandbox: Sandbox,
}

impl BridgeNetwork {
    fn create() -> Result<Self, CriError> {
        let mut sandbox = Sandbox::create("cni")?;
        let pid = std::process::id();
        let bridge = format!("hbc{pid}");
        let name = format!("hyperbox-critest-{pid}");
        // Chains portmap will add that are not there yet become the sandbox's.
        let before = sandbox::nat_rules();
        let ours: Vec<String> = PORTMAP_CHAINS
            .iter()
            .filter(|c| !before.iter().any(|r| r == &format!("-N {c}")))
            .map(|c| (*c).to_owned())
            .collect();
        sandbox.record_nat_chains(&ours)?;
        let mut chosen = None;
        for i in 0..250u32 {
            let x = (pid + i) % 250 + 1;
            let subnet = format!("10.234.{x}.0/24");
            let routes = ip(&[
                "-4",
                "route",
                "show",
                "to",
                "match",
                &format!("10.234.{x}.1"),
            ])?;
            // Only the default route may cover it.
            if routes.lines().all(|l| l.starts_with("default")) {
                chosen = Some((x, subnet));
                break;
            }
        }
        let (x, subnet) = chosen.ok_or(CriError::NoSubnet)?;
        sandbox.record_net_link(&bridge)?;
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("10.234.{x}.1/24"), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        let ipam_dir = sandbox.dir().join("ipam");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": subnet, "gateway": format!("10.234.{x}.1") }]],
                        "dataDir": ipam_dir,
                    },
                },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        })
        .to_string();
        Ok(Self {
            name,
            bridge,
            subnet,
            conflist,
            sandbox,
        })
    }
}

fn ip(args: &[&str]) -> Result<String, CriError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("cannot run", Path::new("ip")))?;
    if !out.status.success() {
        return Err(CriError::Command {
            command: format!("ip {}", args.join(" ")),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// containerd serving the CRI, its registry of stand-in images and its CNI bridge.
#[derive(Debug)]
pub struct CriBed {
    // Field order is drop order: pods and containerd, then the snapshotter, the bridge, the
    // registry.
    pub containerd: Containerd,
    pub snapshotter: Option<SnapshotterDaemon>,
    network: BridgeNetwork,
    pub registry: Registry,
    pub images: CriImages,
    /// One bed at a time per process (its bridge is named after the process, and portmap's
    /// chains are host-wide): held until everything above is gone.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Serialises the CRI beds of one test process.
static ONE_BED: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl CriBed {
    /// Builds (or finds) the stand-in images, starts the registry and pushes them, makes the
    /// bridge and starts containerd `version` with the CRI plugin.
    pub fn start(version: ContainerdVersion) -> Result<Self, CriError> {
        Self::start_inner(version, false, Vec::new())
    }

    /// As [`CriBed::start`], with the CRI's CDI support on (`enable_cdi`), reading specs from
    /// `spec_dir` only (`cdi_spec_dirs`): containers get the devices their `cdi.k8s.io/*`
    /// annotations name.
    pub fn start_with_cdi(version: ContainerdVersion, spec_dir: &Path) -> Result<Self, CriError> {
        Self::start_inner(version, false, vec![spec_dir.to_path_buf()])
    }

    /// As [`CriBed::start`], with hyperbox-snapshotter running as containerd's proxy
    /// snapshotter `hyperbox` and the handler [`SNAPSHOTTER_HANDLER`] using it
    /// (`snapshotter = "hyperbox"` in its runtime table).
    pub fn start_with_snapshotter(version: ContainerdVersion) -> Result<Self, CriError> {
        Self::start_inner(version, true, Vec::new())
    }

    fn start_inner(
        version: ContainerdVersion,
        with_snapshotter: bool,
        cdi_spec_dirs: Vec<PathBuf>,
    ) -> Result<Self, CriError> {
        let serial = ONE_BED.lock().unwrap_or_else(|e| e.into_inner());
        let snapshotter = if with_snapshotter {
            Some(SnapshotterDaemon::start("").map_err(|e| CriError::Snapshotter(e.to_string()))?)
        } else {
            None
        };
        let images = cri_images::build(&BuildOptions::from_env()?)?;
        let registry = Registry::start()?;
        images.push(&registry.host())?;
        let network = BridgeNetwork::create()?;
        let mirror = format!("http://{}", registry.host());
        // containerd 2.x merges an imported file's tables into the config: there the
        // `hyperbox` and `hyperbox-wasm` handlers come from config/containerd-runtime.v3.toml
        // itself, as a user's node gets them. 1.6 and 1.7 would let the snippet's CRI table
        // replace the generated one whole, so there they are generated with the same types.
        let snippet = crate::host::config_file("containerd-runtime.v3.toml");
        let ours = [HANDLERS[1], WASM_HANDLER];
        let mut runtimes: Vec<(String, String)> = std::iter::once(HANDLERS[0])
            .chain(ours.iter().copied().filter(|_| !version.is_2x()))
            .map(|(h, t)| (h.to_owned(), t.to_owned()))
            .chain(std::iter::once((
                HYPERBOX_AS_RUNC.to_owned(),
                "io.containerd.runc.v2".to_owned(),
            )))
            .collect();
        let mut runtime_snapshotters = Vec::new();
        if snapshotter.is_some() {
            runtimes.push((SNAPSHOTTER_HANDLER.to_owned(), HANDLERS[1].1.to_owned()));
            runtime_snapshotters.push((SNAPSHOTTER_HANDLER.to_owned(), PLUGIN.to_owned()));
        }
        // Our handlers let `io.hyperbox.*` annotations through, as config/'s snippets do.
        let runtime_annotations = runtimes
            .iter()
            .filter(|(h, _)| h != HANDLERS[0].0)
            .map(|(h, _)| (h.clone(), "io.hyperbox.*".to_owned()))
            .collect();
        let options = CriOptions {
            sandbox_image: cri_images::PAUSE_IMAGE.to_owned(),
            runtimes,
            runtime_paths: crate::host::workspace_binary("containerd-shim-hyperbox-v1")
                .map(|path| (HYPERBOX_AS_RUNC.to_owned(), path))
                .into_iter()
                .collect(),
            runtime_snapshotters,
            runtime_annotations,
            cni_bin_dir: PathBuf::from(CNI_BIN_DIR),
            cni_conflist: (network.name.clone(), network.conflist.clone()),
            mirrors: cri_images::REGISTRY_HOSTS
                .iter()
                .map(|h| ((*h).to_owned(), mirror.clone()))
                .collect(),
            restrict_oom_score_adj: true,
            cdi_spec_dirs,
        };
        let mut builder = Containerd::builder(version).with_cri(options);
        if version.is_2x() {
            builder = builder.with_import(snippet);
        }
        if let Some(snap) = &snapshotter {
            builder = snap.register(PLUGIN, builder);
        }
        let containerd = builder.start()?;
        Ok(Self {
            containerd,
            snapshotter,
            network,
            registry,
            images,
            _serial: serial,
        })
    }

    /// `unix://SOCKET`, critest's and crictl's endpoint.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.containerd.socket().display())
    }

    /// The bridge's name and subnet.
    pub fn bridge(&self) -> (&str, &str) {
        (&self.network.bridge, &self.network.subnet)
    }

    /// A crictl command against the daemon.
    pub fn crictl(&self) -> Command {
        let mut cmd = Command::new(crictl_binary());
        cmd.arg("--runtime-endpoint")
            .arg(self.endpoint())
            .arg("--image-endpoint")
            .arg(self.endpoint())
            .arg("--timeout")
            .arg("60s");
        cmd
    }

    /// Writes a pod config named `name` in Kubernetes namespace `namespace` into `dir`,
    /// annotated with `annotations`, and runs it under `handler` (`crictl runp`): returns (pod
    /// id, config path). Panics with crictl's output on failure (for tests).
    pub fn run_pod(
        &self,
        handler: &str,
        dir: &Path,
        namespace: &str,
        name: &str,
        annotations: &[(&str, &str)],
    ) -> (String, String) {
        let config = dir.join(format!("{name}.json"));
        let logs = dir.join(format!("{name}-logs"));
        fs::create_dir_all(&logs).expect("pod log directory");
        let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
        let json = serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
            "log_directory": logs,
            "annotations": annotations,
            "linux": {},
        });
        fs::write(&config, json.to_string()).expect("pod config");
        let config = config.to_string_lossy().into_owned();
        let pod = self.crictl_ok(&["runp", "--runtime", handler, &config]);
        (pod, config)
    }

    /// `crictl ARGS`, run to completion.
    pub fn crictl_output(&self, args: &[&str]) -> std::process::Output {
        self.crictl().args(args).output().expect("crictl runs")
    }

    /// `crictl ARGS`, which must succeed: its trimmed stdout. A failure panics with crictl's
    /// stderr and the daemon's log tail (for tests).
    pub fn crictl_ok(&self, args: &[&str]) -> String {
        let out = self.crictl_output(args);
        assert!(
            out.status.success(),
            "crictl {}: {}\ncontainerd log:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.containerd.log_tail(40)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops and removes every pod through the CRI (so CNI releases its addresses, veths and
    /// port mappings), then tears everything down, reporting what is left.
    pub fn teardown(mut self) -> Result<(), CriError> {
        self.remove_pods();
        self.containerd.teardown()?;
        self.network.sandbox.teardown()?;
        self.registry.teardown()?;
        Ok(())
    }

    /// Removes the pods critest left (none when it cleaned up after itself).
    pub fn remove_pods(&self) {
        if crictl_binary().is_file() {
            let _ = self
                .crictl()
                .args(["rmp", "--all", "--force"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for CriBed {
    fn drop(&mut self) {
        self.remove_pods();
    }
}

/// A process started from a `containerd-shim-*` binary: its pid, its parent's, and the
/// binary's file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimProcess {
    pub pid: u32,
    pub ppid: u32,
    pub binary: String,
}

/// Every process started from a `containerd-shim-*` binary with `-address` the daemon socket
/// `socket`: the shims, and the helpers they fork from themselves (our zygote: same binary,
/// same arguments, a shim for its parent).
pub fn shim_processes(socket: &Path) -> Vec<ShimProcess> {
    let socket = socket.to_string_lossy();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let binary = Path::new(args.first()?).file_name()?.to_str()?.to_owned();
            let ours = args
                .windows(2)
                .any(|w| w[0] == "-address" && w[1] == socket);
            if !binary.starts_with("containerd-shim-") || !ours {
                return None;
            }
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some(ShimProcess { pid, ppid, binary })
        })
        .collect()
}

/// The outcome of one spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SpecStatus {
    Passed,
    Failed,
    Skipped,
}

impl SpecStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SpecStatus::Passed => "passed",
            SpecStatus::Failed => "failed",
            SpecStatus::Skipped => "skipped",
        }
    }
}

/// A JUnit report of ginkgo (`--ginkgo.junit-report`): each spec's name and outcome.
#[derive(Debug, Clone, Default)]
pub struct JunitReport {
    /// Spec name (ginkgo's `[It] ...` text) to outcome and failure message.
    pub specs: BTreeMap<String, (SpecStatus, String)>,
}

impl JunitReport {
    /// Reads a report file.
    pub fn read(path: &Path) -> Result<Self, CriError> {
        let text = fs::read_to_string(path).map_err(|e| CriError::Junit {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| CriError::Junit {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses the `<testcase>` elements of a report. A case is failed with a `<failure>` or
    /// `<error>` child, skipped with `<skipped>` (or ginkgo's `status="skipped"`/`"pending"`),
    /// passed otherwise. Suite nodes (`[BeforeSuite]`, ...) count as specs too.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut specs = BTreeMap::new();
        let mut rest = text;
        while let Some(start) = rest.find("<testcase") {
            rest = &rest[start + "<testcase".len()..];
            let head_end = rest.find('>').ok_or("unterminated <testcase")?;
            let head = &rest[..head_end];
            let self_closing = head.ends_with('/');
            let body = if self_closing {
                ""
            } else {
                let end = rest.find("</testcase>").ok_or("no </testcase>")?;
                &rest[head_end + 1..end]
            };
            let name = attribute(head, "name").ok_or("a <testcase> without a name")?;
            let status_attr = attribute(head, "status").unwrap_or_default();
            let (status, message) = if let Some(m) = child(body, "failure").or(child(body, "error"))
            {
                (SpecStatus::Failed, m)
            } else if let Some(m) = child(body, "skipped") {
                (SpecStatus::Skipped, m)
            } else if matches!(status_attr.as_str(), "skipped" | "pending") {
                (SpecStatus::Skipped, String::new())
            } else if matches!(
                status_attr.as_str(),
                "failed" | "panicked" | "interrupted" | "aborted" | "timedout"
            ) {
                (SpecStatus::Failed, status_attr.clone())
            } else {
                (SpecStatus::Passed, String::new())
            };
            specs.insert(name, (status, message));
        }
        if specs.is_empty() {
            return Err("no <testcase> in the report".to_owned());
        }
        Ok(Self { specs })
    }

    /// How many specs have `status` (suite nodes such as `[BeforeSuite]` not counted, as
    /// ginkgo's own summary does not count them).
    pub fn count(&self, status: SpecStatus) -> usize {
        self.specs
            .iter()
            .filter(|(n, (s, _))| *s == status && !is_suite_node(n))
            .count()
    }

    /// The outcome of `name`, if the report has it.
    pub fn status(&self, name: &str) -> Option<SpecStatus> {
        self.specs.get(name).map(|(s, _)| *s)
    }
}

/// True for ginkgo's suite-level nodes (`[BeforeSuite]`, `[SynchronizedAfterSuite]`, ...),
/// which its JUnit report lists beside the specs.
pub fn is_suite_node(name: &str) -> bool {
    !name.starts_with("[It]") && name.starts_with('[') && name.contains("Suite]")
}

/// The value of attribute `name` in an element's head, unescaped.
fn attribute(head: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = head[from..].find(name) {
        let at = from + i;
        let before_ok = at == 0 || head.as_bytes()[at - 1].is_ascii_whitespace();
        let after = &head[at + name.len()..];
        if before_ok && after.starts_with("=\"") {
            let value = &after[2..];
            let end = value.find('"')?;
            return Some(unescape(&value[..end]));
        }
        from = at + name.len();
    }
    None
}

/// The `message` attribute (or text) of the first `<tag ...>` child of `body`.
fn child(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}");
    let start = body.find(&open)?;
    let after = &body[start + open.len()..];
    if !(after.starts_with(' ') || after.starts_with('>') || after.starts_with('/')) {
        return None;
    }
    let head_end = after.find('>')?;
    let head = &after[..head_end];
    if let Some(m) = attribute(head, "message").filter(|m| !m.is_empty()) {
        return Some(m);
    }
    let close = format!("</{tag}>");
    let text = after[head_end + 1..]
        .find(&close)
        .map(|e| unescape(&after[head_end + 1..head_end + 1 + e]))
        .unwrap_or_default();
    Some(text)
}

/// Undoes XML's character escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let c = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16)
                .ok()
                .and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match c {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// One critest run.
#[derive(Debug)]
pub struct CritestRun {
    pub handler: String,
    pub report: JunitReport,
    pub elapsed: Duration,
    /// critest's exit status (non-zero when a spec failed).
    pub status: std::process::ExitStatus,
    /// critest's output, kept in the bed's sandbox.
    pub log: PathBuf,
    /// The shim binaries seen running the pods during the run, with how many shims (pods) of
    /// each: proof that the handler was the one asked for.
    pub shims: BTreeMap<String, usize>,
}

/// Runs critest against `bed` with runtime handler `handler`, skipping specs that match the
/// regular expression `skip`, and reads its JUnit report.
pub fn run_critest(bed: &CriBed, handler: &str, skip: &str) -> Result<CritestRun, CriError> {
    let dir = bed.containerd.dir().join(format!("critest-{handler}"));
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).map_err(io_err("cannot create", &tmp))?;
    let report = dir.join("junit.xml");
    let log = dir.join("critest.log");
    let out = fs::File::create(&log).map_err(io_err("cannot create", &log))?;
    let err = out.try_clone().map_err(io_err("cannot open", &log))?;
    let started = Instant::now();
    let critest = critest_binary();
    let mut child = Command::new(&critest)
        .arg(format!("--runtime-endpoint={}", bed.endpoint()))
        .arg(format!("--image-endpoint={}", bed.endpoint()))
        .arg(format!("--runtime-handler={handler}"))
        // No crictl.yaml of the host's.
        .arg(format!("--config={}", dir.join("crictl.yaml").display()))
        .arg(format!("--ginkgo.junit-report={}", report.display()))
        .arg(format!("--ginkgo.skip={skip}"))
        .arg("--ginkgo.no-color")
        // A spec that fails is run once more, for both handlers alike: on two loaded cores
        // some of runc's own specs (the OOMKilled reason, which races containerd's OOM event
        // against the exit) fail now and then; a spec that fails twice still fails.
        .arg("--ginkgo.flake-attempts=2")
        // Temporary directories and pod logs of the specs stay in the sandbox.
        .env("TMPDIR", &tmp)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(io_err("cannot run", &critest))?;
    // Which shims run the pods: the daemon's shims name its socket on their command line.
    let socket = bed.containerd.socket().to_string_lossy().into_owned();
    let mut shims: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(io_err("cannot wait for", &critest))?
        {
            break status;
        }
        for (binary, id) in shims_of(&socket) {
            shims.entry(binary).or_default().insert(id);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let elapsed = started.elapsed();
    let report = JunitReport::read(&report)?;
    Ok(CritestRun {
        handler: handler.to_owned(),
        report,
        elapsed,
        status,
        log,
        shims: shims.into_iter().map(|(b, ids)| (b, ids.len())).collect(),
    })
}

/// The shims of the containerd at `socket` now running: (binary name, `-id` argument).
fn shims_of(socket: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let binary = args
            .first()
            .and_then(|a| Path::new(a).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !binary.starts_with("containerd-shim-") || !args.iter().any(|a| a == socket) {
            continue;
        }
        let id = args
            .windows(2)
            .find(|w| w[0] == "-id")
            .map(|w| w[1].clone())
            .unwrap_or_default();
        found.push((binary, id));
    }
    found
}

/// `cri_versions!(body)` makes the tests `body::on_containerd_1_7` and
/// `body::on_containerd_2_1`, each calling `body(version)`: ignored (counted as skipped) when
/// the build found no cri-tools tarball (crictl), or for 2.1 no containerd 2.1 tarball; never
/// under CI.
#[macro_export]
macro_rules! cri_versions {
    ($body:ident) => {
        mod $body {
            #[test]
            #[cfg_attr(
                hyperbox_critest_unavailable,
                ignore = "crictl skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder \
                          holding cri-tools-v1.34.0-src.tar.xz (CI sets it)"
            )]
            fn on_containerd_1_7() {
                super::$body($crate::containerd::ContainerdVersion::V1_7);
            }

            #[test]
            #[cfg_attr(
                any(hyperbox_critest_unavailable, hyperbox_containerd2_unavailable),
                ignore = "crictl or containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not \
                          name a folder holding cri-tools-v1.34.0-src.tar.xz and \
                          containerd-2.1.9-src.tar.xz (CI sets it)"
            )]
            fn on_containerd_2_1() {
                super::$body($crate::containerd::ContainerdVersion::V2_1);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" disabled="0" errors="0" failures="1" time="1">
  <testsuite name="CRI validation" package="/x" tests="4">
    <testcase name="[BeforeSuite]" classname="CRI validation" status="passed" time="0.1"></testcase>
    <testcase name="[It] [k8s.io] Image Manager public image with digest should be pulled and removed [Conformance]" classname="CRI validation" status="skipped" time="0">
      <skipped message="skipped"></skipped>
    </testcase>
    <testcase name="[It] [k8s.io] Container runtime should support &quot;exec&quot; &amp; more" classname="CRI validation" status="failed" time="2">
      <failure message="Expected &lt;string&gt;" type="failed">[FAILED] boom</failure>
    </testcase>
    <testcase name="[It] [k8s.io] Streaming runtime should support attach" classname="CRI validation" status="passed" time="1"/>
  </testsuite>
</testsuites>"#;

    #[test]
    fn junit_reports_are_read_spec_by_spec() {
        let r = JunitReport::parse(REPORT).unwrap();
        assert_eq!(r.specs.len(), 4);
        assert_eq!(r.count(SpecStatus::Passed), 1);
        assert!(is_suite_node("[BeforeSuite]") && !is_suite_node("[It] x"));
        assert_eq!(r.count(SpecStatus::Failed), 1);
        assert_eq!(r.count(SpecStatus::Skipped), 1);
        let (s, m) = &r.specs["[It] [k8s.io] Container runtime should support \"exec\" & more"];
        assert_eq!((*s, m.as_str()), (SpecStatus::Failed, "Expected <string>"));
        assert_eq!(
            r.status("[It] [k8s.io] Streaming runtime should support attach"),
            Some(SpecStatus::Passed)
        );
        assert!(JunitReport::parse("<testsuites></testsuites>").is_err());
    }

    #[test]
    fn entities_are_unescaped() {
        assert_eq!(
            unescape("a &lt;b&gt; &#39;c&#x27; &bogus; &"),
            "a <b> 'c' &bogus; &"
        );
    }
}

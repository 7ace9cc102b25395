//! A private Docker Engine (`dockerd` 26.1.5, unpacked from Debian 13 by `scripts/setup-host`)
//! driving a harness [`Containerd`], in a sandbox of its own.
//!
//! Everything dockerd owns is under the sandbox directory: `data/` (`--data-root`: images,
//! overlay2 layers and their mounts, container logs), `exec/` (`--exec-root`: the stdio FIFOs
//! it hands containerd, network namespace files, runc's state for the `runc` runtime),
//! `docker.sock` (the only API endpoint; no TCP), `docker.pid` and the generated
//! `daemon.json`. Nothing on the host is reconfigured: no iptables rules, no bridge, no IP
//! forwarding, no userland proxy, so containers run with `--network none` or `host`.
//!
//! dockerd's containers live in a containerd namespace of their own, `hbt-docker-PID-N`
//! (plugins in `hbt-docker-PID-N-plugins`), and their cgroups under `/hbt-docker-PID-N/ID`
//! (`--cgroup-parent`): the sandbox records that namespace on the containerd it is a client of
//! ([`Sandbox::record_containerd_client`]), so teardown finds the containers through their
//! cgroups and the shims through their command lines, as it does for a containerd sandbox.
//!
//! Runtimes are registered as users register them: the `runtimes` of
//! `config/docker-daemon.json` are merged into the generated `daemon.json` (Docker ≥ 23 syntax,
//! `"runtimeType": "io.containerd.hyperbox.v1"`); containerd finds the shim binary on its own
//! `PATH` (the harness links the workspace's shims there). `--runtime io.containerd.X.v1`
//! works without any configuration.
//!
//! Images: Docker 26 with its own (graphdriver) image store does not load OCI archives
//! (`docker load` looks for `manifest.json`), so [`Docker::load_image`] converts the offline
//! test image to a docker-archive with skopeo and loads that.
//!
//! A `Docker` must be dropped before the `Containerd` it drives (declare it after).

use std::fs;
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{Map, Value};

use crate::containerd::Containerd;
use crate::host;
use crate::images::{self, BuildOptions, ImageError, TestImage, LAYOUT_REF};
use crate::sandbox::{self, Sandbox, SandboxError};

/// The runtime name Docker users give in `daemon.json` for this project's Linux shim.
pub const HYPERBOX_RUNTIME: &str = "hyperbox";

/// The storage driver: overlay2 works on this host (ext4 under `/var/lib/hyperbox-test`).
pub const DEFAULT_STORAGE_DRIVER: &str = "overlay2";

/// Where dockerd creates its plugin discovery directory whatever `--exec-root` says.
const PLUGINS_DIR: &str = "/run/docker/plugins";

/// Errors of the private Docker Engine.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker 26 is not installed at {path}: run scripts/setup-host (as root) first")]
    NotInstalled { path: PathBuf },
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("daemon.json fragment {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("dockerd did not come up within {secs} s; log {log}:\n{tail}")]
    StartTimeout {
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DockerError {
    let path = path.to_path_buf();
    move |source| DockerError::Io { what, path, source }
}

/// `$PREFIX/docker-26/usr`, where `scripts/setup-host` unpacks Debian 13's `docker.io`.
pub fn docker_root() -> PathBuf {
    host::prefix().join("docker-26/usr")
}

/// The daemon binary.
pub fn dockerd_binary() -> PathBuf {
    docker_root().join("sbin/dockerd")
}

/// The client binary (beside `docker-init`).
pub fn docker_binary() -> PathBuf {
    docker_root().join("bin/docker")
}

pub use crate::host::config_file;

/// Builds a [`Docker`].
#[derive(Debug, Clone)]
pub struct DockerBuilder {
    daemon_json: Vec<PathBuf>,
    storage_driver: String,
    log_level: String,
}

impl Default for DockerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DockerBuilder {
    /// overlay2, and the runtimes of `config/docker-daemon.json`.
    pub fn new() -> Self {
        DockerBuilder {
            daemon_json: vec![config_file("docker-daemon.json")],
            storage_driver: DEFAULT_STORAGE_DRIVER.into(),
            log_level: "info".into(),
        }
    }

    /// Merges a `daemon.json` fragment into the generated one (objects merge key by key, other
    /// values replace). Settings the harness passes as flags (paths, networking) must not
    /// appear in it: dockerd refuses a setting given both ways.
    pub fn with_daemon_json(mut self, path: impl Into<PathBuf>) -> Self {
        self.daemon_json.push(path.into());
        self
    }

    /// Starts without the repository's `config/docker-daemon.json`.
    pub fn without_default_daemon_json(mut self) -> Self {
        self.daemon_json
            .retain(|p| *p != config_file("docker-daemon.json"));
        self
    }

    /// The storage driver (default overlay2).
    pub fn with_storage_driver(mut self, driver: &str) -> Self {
        self.storage_driver = driver.to_string();
        self
    }

    /// dockerd's log level (default `info`).
    pub fn with_log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// The `daemon.json` the fragments make.
    pub fn daemon_json(&self) -> Result<Value, DockerError> {
        let mut merged = Value::Object(Map::new());
        for path in &self.daemon_json {
            let text = fs::read_to_string(path).map_err(io_err("cannot read", path))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| DockerError::Config {
                path: path.clone(),
                reason: format!("not JSON: {e}"),
            })?;
            if !value.is_object() {
                return Err(DockerError::Config {
                    path: path.clone(),
                    reason: "not a JSON object".into(),
                });
            }
            merge_json(&mut merged, value);
        }
        Ok(merged)
    }

    /// Starts dockerd against `containerd` and waits until it serves its API.
    pub fn start(self, containerd: &Containerd) -> Result<Docker, DockerError> {
        for binary in [dockerd_binary(), docker_binary()] {
            if !binary.is_file() {
                return Err(DockerError::NotInstalled { path: binary });
            }
        }
        let daemon_json = self.daemon_json()?;
        let mut sandbox = Sandbox::create("docker")?;
        let dir = sandbox.dir().to_path_buf();
        let base = dir.file_name().map(|n| n.to_string_lossy().into_owned());
        let namespace = format!("hbt-{}", base.unwrap_or_default());
        let plugins_namespace = format!("{namespace}-plugins");
        sandbox.record_containerd_client(containerd.socket(), &namespace)?;
        sandbox.record_containerd_client(containerd.socket(), &plugins_namespace)?;

        let config = dir.join("daemon.json");
        let text = serde_json::to_string_pretty(&daemon_json).unwrap_or_default();
        fs::write(&config, text).map_err(io_err("cannot write", &config))?;
        let client_config = dir.join("client");
        fs::create_dir_all(&client_config).map_err(io_err("cannot create", &client_config))?;

        // docker-init (for --init) beside the client, then what the containerd runs with.
        let path_env = format!(
            "{}:{}:{}",
            docker_root().join("bin").display(),
            docker_root().join("sbin").display(),
            containerd.path_env()
        );
        let mut docker = Docker {
            socket: dir.join("docker.sock"),
            config,
            client_config,
            namespace,
            path_env,
            containerd_socket: containerd.socket().to_path_buf(),
            storage_driver: self.storage_driver,
            log_level: self.log_level,
            child: None,
            sandbox,
        };
        docker.spawn_daemon()?;
        Ok(docker)
    }
}

/// Merges `from` into `into`: objects key by key, anything else replaced.
fn merge_json(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge_json(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// A running private dockerd. Dropping it removes its containers and tears down every
/// process, mount, cgroup, shim socket and directory it made.
#[derive(Debug)]
pub struct Docker {
    socket: PathBuf,
    config: PathBuf,
    client_config: PathBuf,
    namespace: String,
    path_env: String,
    containerd_socket: PathBuf,
    storage_driver: String,
    log_level: String,
    child: Option<Child>,
    sandbox: Sandbox,
}

impl Docker {
    /// Starts dockerd against `containerd` with the default settings.
    pub fn start(containerd: &Containerd) -> Result<Self, DockerError> {
        DockerBuilder::new().start(containerd)
    }

    /// A builder for finer control.
    pub fn builder() -> DockerBuilder {
        DockerBuilder::new()
    }

    fn spawn_daemon(&mut self) -> Result<(), DockerError> {
        let dir = self.sandbox.dir().to_path_buf();
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err("cannot open", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("cannot open", &log_path))?;
        let binary = dockerd_binary();
        let flag = |name: &str, path: &Path| format!("--{name}={}", path.display());
        let child = Command::new(&binary)
            .arg(flag("config-file", &self.config))
            .arg(flag("containerd", &self.containerd_socket))
            .arg(format!("--containerd-namespace={}", self.namespace))
            .arg(format!(
                "--containerd-plugins-namespace={}-plugins",
                self.namespace
            ))
            .arg(flag("data-root", &dir.join("data")))
            .arg(flag("exec-root", &dir.join("exec")))
            .arg(flag("pidfile", &dir.join("docker.pid")))
            .arg(format!("--host=unix://{}", self.socket.display()))
            // Containers' cgroups at /NS/ID, where the sandbox teardown looks.
            .arg(format!("--cgroup-parent=/{}", self.namespace))
            .arg(format!("--storage-driver={}", self.storage_driver))
            .arg(format!("--log-level={}", self.log_level))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
                "--ip-masq=false",
                "--bridge=none",
                "--userland-proxy=false",
                "--group=root",
            ])
            .env("PATH", &self.path_env)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("DOCKER_HOST")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io_err("cannot start", &binary))?;
        self.sandbox.track(&child, "dockerd")?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60))
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), DockerError> {
        let deadline = Instant::now() + limit;
        loop {
            let exited = matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(Some(_))));
            if !exited && UnixStream::connect(&self.socket).is_ok() {
                let ok = self
                    .docker()
                    .arg("version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return Ok(());
                }
            }
            if exited || Instant::now() > deadline {
                return Err(DockerError::StartTimeout {
                    secs: limit.as_secs(),
                    log: self.log_path(),
                    tail: self.log_tail(30),
                });
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `docker -H unix://SOCKET` with a private client configuration directory.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new(docker_binary());
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", &self.client_config)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        cmd
    }

    /// Runs `docker ARGS` with stdin closed, failing with its stderr when it fails.
    pub fn docker_run(&self, args: &[&str]) -> Result<Output, DockerError> {
        let out = self
            .docker()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("cannot run", &docker_binary()))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(DockerError::Command {
                command: format!("docker {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Runs `docker ARGS` and returns its stdout, trimmed.
    pub fn docker_stdout(&self, args: &[&str]) -> Result<String, DockerError> {
        self.docker_run(args)
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Loads an offline test image (built or taken from the cache) and returns the reference
    /// it is tagged with (`docker.io/hyperbox/NAME:latest`). Docker 26 loads docker-archives
    /// only, so the OCI layout is copied into one with skopeo first.
    pub fn load_image(&self, image: TestImage) -> Result<String, DockerError> {
        let built = images::build(image, &BuildOptions::default())?;
        let reference = built.reference.clone();
        let archive = self
            .sandbox
            .dir()
            .join(format!("{}.docker.tar", image.name()));
        let _ = fs::remove_file(&archive);
        let src = format!("oci:{}:{LAYOUT_REF}", built.layout_dir.display());
        let dest = format!("docker-archive:{}:{reference}", archive.display());
        let out = Command::new("skopeo")
            .args(["copy", "--insecure-policy", "--quiet", &src, &dest])
            .stdin(Stdio::null())
            .output()
            .map_err(io_err("cannot run skopeo for", &archive))?;
        if !out.status.success() {
            return Err(DockerError::Command {
                command: format!("skopeo copy {src} {dest}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let loaded = self.docker_run(&["load", "--quiet", "--input", &archive.to_string_lossy()]);
        let _ = fs::remove_file(&archive);
        loaded?;
        self.docker_run(&["image", "inspect", "--format", "{{.Id}}", &reference])?;
        Ok(reference)
    }

    /// The containerd namespace of dockerd's containers.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    /// The generated `daemon.json`.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// dockerd's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// dockerd's log file.
    pub fn log_path(&self) -> PathBuf {
        self.sandbox.dir().join("dockerd.log")
    }

    /// The last `lines` lines of dockerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Removes every container through the API, as a user would, so shims exit and unmount
    /// on their own; whatever resists is removed by the sandbox teardown.
    fn remove_containers(&self) {
        if self.child.is_none() {
            return;
        }
        let ids = self
            .docker_stdout(&["ps", "--all", "--quiet", "--no-trunc"])
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let mut args = vec!["rm", "--force", "--volumes"];
            args.extend(&ids);
            let _ = self.docker_run(&args);
        }
    }

    /// Stops dockerd with SIGTERM (it stops its containers first), SIGKILL after 30 s.
    fn stop_daemon(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
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

    /// Stops everything and verifies nothing is left: no process, mount, cgroup, shim socket
    /// or directory.
    pub fn teardown(&mut self) -> Result<(), DockerError> {
        self.remove_containers();
        self.stop_daemon();
        let result = self.sandbox.teardown();
        remove_plugins_dir();
        Ok(result?)
    }
}

impl Drop for Docker {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("dockerd teardown: {e}");
            eprintln!("hyperbox harness: dockerd teardown: {e}");
        }
    }
}

/// dockerd makes `/run/docker/plugins` (and `/run/docker`) whatever its `--exec-root`; they
/// are removed when empty and no dockerd runs any more.
fn remove_plugins_dir() {
    let dockerd_runs = fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(sandbox::cmdline)
                .any(|c| {
                    c.split(' ')
                        .next()
                        .is_some_and(|a| a.ends_with("/dockerd") || a == "dockerd")
                })
        })
        .unwrap_or(true);
    if !dockerd_runs {
        let plugins = Path::new(PLUGINS_DIR);
        if fs::remove_dir(plugins).is_ok() {
            if let Some(parent) = plugins.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_merge_objects_and_replace_the_rest() {
        let mut a = serde_json::json!({"runtimes": {"a": {"runtimeType": "x"}}, "debug": false});
        merge_json(
            &mut a,
            serde_json::json!({"runtimes": {"b": {"path": "/y"}}, "debug": true}),
        );
        assert_eq!(
            a,
            serde_json::json!({
                "runtimes": {"a": {"runtimeType": "x"}, "b": {"path": "/y"}},
                "debug": true
            })
        );
    }

    #[test]
    fn the_repository_daemon_json_registers_the_runtime() {
        let json = DockerBuilder::new()
            .daemon_json()
            .expect("config/docker-daemon.json");
        assert_eq!(
            json["runtimes"][HYPERBOX_RUNTIME]["runtimeType"], "io.containerd.hyperbox.v1",
            "{json}"
        );
    }
}

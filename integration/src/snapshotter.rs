//! A `hyperbox-snapshotter` process in a sandbox of its own (root, socket, config and log
//! inside it), so the harness's guard kills it and removes its files whatever happens to
//! the test or benchmark that started it. Register it with containerd through
//! [`SnapshotterDaemon::register`]`(`[`PLUGIN`]`, builder)`: its snapshots API, and on
//! containerd 2.x its differ.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::containerd::ContainerdBuilder;
use crate::host;
use crate::sandbox::{Sandbox, SandboxError};

/// The binary's name.
pub const BINARY: &str = "hyperbox-snapshotter";
/// The proxy plugin's name in containerd (`--snapshotter hyperbox`).
pub const PLUGIN: &str = "hyperbox";
/// The differ's proxy plugin name in containerd 2.x (`type = "diff"`).
pub const DIFFER_PLUGIN: &str = "hyperbox-differ";
/// The label the snapshotter reports on a layer served from its EROFS image.
pub const STORAGE_LABEL: &str = "containerd.io/snapshot/hyperbox.storage";
/// The computed label of a layer's merged image (what it cost, or `set aside: REASON`).
pub const MERGED_LABEL: &str = "containerd.io/snapshot/hyperbox.merged";
/// Label the snapshotter computes for a committed layer's conversion: its cost, or
/// `set aside: REASON`.
pub const CONVERSION_LABEL: &str = "containerd.io/snapshot/hyperbox.conversion";

/// Errors starting the snapshotter.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error(
        "{BINARY} is not built next to this executable ({dir:?}): cargo build -p hyperbox-snapshotter first"
    )]
    NotBuilt { dir: Option<PathBuf> },
    #[error("snapshotter sandbox: {0}")]
    Sandbox(#[from] SandboxError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{BINARY} did not come up on {socket}; its log:\n{log}")]
    NotReady { socket: PathBuf, log: String },
}

/// A running (or stopped) `hyperbox-snapshotter`.
#[derive(Debug)]
pub struct SnapshotterDaemon {
    child: Option<Child>,
    sandbox: Sandbox,
    /// Lines appended to the config file (`convert`, `mount_mode`).
    extra_config: String,
}

impl SnapshotterDaemon {
    /// Starts the snapshotter with its default config plus `extra_config` lines, and waits
    /// until it accepts on its socket.
    pub fn start(extra_config: &str) -> Result<Self, SnapshotterError> {
        let sandbox = Sandbox::create("snapshotter")?;
        let mut d = SnapshotterDaemon {
            child: None,
            sandbox,
            extra_config: extra_config.to_string(),
        };
        d.spawn()?;
        Ok(d)
    }

    /// The sandbox directory holding root, socket, config and log.
    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir().join("snapshotter.sock")
    }

    /// The differ's socket (containerd's diff API).
    pub fn differ_socket(&self) -> PathBuf {
        self.dir().join("differ.sock")
    }

    /// Where the config names containerd's socket: a symlink to the daemon's, made by
    /// [`SnapshotterDaemon::register`].
    pub fn containerd_link(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// Registers this snapshotter with the daemon `builder` makes, as `name`: the snapshots
    /// proxy plugin, and on containerd 2.x its differ as a diff proxy plugin (`NAME-differ`)
    /// that the transfer service unpacks into it with, as
    /// config/containerd-snapshotter.v3.toml tells users to.
    pub fn register(&self, name: &str, builder: ContainerdBuilder) -> ContainerdBuilder {
        builder
            .with_proxy_plugin(name, "snapshot", self.socket())
            .with_diff_proxy(&format!("{name}-differ"), name, self.differ_socket())
            .with_socket_link(self.containerd_link())
    }

    pub fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir().join("snapshotter.log")
    }

    /// The log so far (empty when unreadable).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the binary (again) on the sandbox's root and socket and waits until it
    /// accepts.
    pub fn spawn(&mut self) -> Result<(), SnapshotterError> {
        let binary = host::workspace_binary(BINARY).ok_or_else(|| SnapshotterError::NotBuilt {
            dir: host::workspace_bin_dir(),
        })?;
        let log_path = self.log_path();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| SnapshotterError::Io {
                what: "open",
                path: log_path.clone(),
                source,
            })?;
        let socket = self.socket();
        let _ = fs::remove_file(&socket);
        let config = self.write_config()?;
        let child = Command::new(&binary)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| SnapshotterError::Io {
                what: "start",
                path: binary.clone(),
                source,
            })?;
        self.sandbox.track(&child, BINARY)?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() > deadline {
                return Err(SnapshotterError::NotReady {
                    socket,
                    log: self.log(),
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The config file, naming every option.
    fn write_config(&self) -> Result<PathBuf, SnapshotterError> {
        let path = self.dir().join("snapshotter.toml");
        let differ = if self.extra_config.contains("differ_address") {
            String::new()
        } else {
            format!("differ_address = \"{}\"\n", self.differ_socket().display())
        };
        let text = format!(
            "root = \"{}\"\naddress = \"{}\"\nsocket_mode = 0o600\nlog_level = \"info\"\n\
             {differ}containerd_address = \"{}\"\n{}",
            self.root().display(),
            self.socket().display(),
            self.containerd_link().display(),
            self.extra_config,
        );
        fs::write(&path, text).map_err(|source| SnapshotterError::Io {
            what: "write",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Sends `signal` and reaps the process.
    pub fn stop(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
            let _ = self.sandbox.untrack(child.id());
        }
    }

    /// Names of the entries of `ROOT/sub`.
    pub fn entries(&self, sub: &str) -> BTreeSet<String> {
        fs::read_dir(self.root().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Ids of the committed layers served from an EROFS image: the snapshot directories
    /// holding `layer.erofs`.
    pub fn image_ids(&self) -> Vec<String> {
        let snapshots = self.root().join("snapshots");
        self.entries("snapshots")
            .into_iter()
            .filter(|id| snapshots.join(id).join("layer.erofs").is_file())
            .collect()
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM);
        if let Err(e) = self.sandbox.teardown() {
            eprintln!("snapshotter sandbox teardown: {e}");
        }
    }
}

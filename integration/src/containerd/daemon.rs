//! A running private containerd ([`Containerd`]): its paths, `ctr` calls, stand-ins on its
//! `PATH`, restart and teardown.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{io_err, shell_quote, ContainerdBuilder, ContainerdError, ContainerdVersion};
use crate::client::TestClient;
use crate::sandbox::Sandbox;

/// A running private containerd. Dropping it tears down every container, shim, mount and
/// directory it made.
#[derive(Debug)]
pub struct Containerd {
    pub(super) version: ContainerdVersion,
    pub(super) namespace: String,
    pub(super) socket: PathBuf,
    pub(super) config: PathBuf,
    pub(super) path_env: String,
    pub(super) runtimes: Vec<String>,
    /// What [`ContainerdBuilder::with_env`] added to the daemon's environment.
    pub(super) env: Vec<(String, String)>,
    pub(super) child: Option<Child>,
    pub(super) sandbox: Sandbox,
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

    pub(super) fn spawn_daemon(&mut self) -> Result<(), ContainerdError> {
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

    /// Runs `ctr ARGS` and returns its stdout as text.
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

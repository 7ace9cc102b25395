//! The benchmark's set-up for one containerd version ([`Bench`]) and how it drives `ctr` and
//! `containerd-shim-hyperbox-v1 templates`: a network namespace per run, the `ctr run -d`
//! arguments, one start polled until ready, a template awaited.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyperbox_integration::containerd::Containerd;
use hyperbox_integration::host;
use hyperbox_integration::workloads::{
    get_in_network, network_with_loopback, remove_network, PY_SERVICE_PORT,
};

use crate::engines::{parse_tasks_ls, Engine};
use crate::runner::describe;

use super::{GET_TIMEOUT, POLL, READY_LIMIT, SHIM};

/// A network namespace with its loopback up, bound at a file, unbound when dropped.
pub(super) struct Netns(pub(super) PathBuf);

impl Netns {
    pub(super) fn new(c: &Containerd, id: &str) -> anyhow::Result<Netns> {
        let file = c.dir().join(format!("netns-{id}"));
        network_with_loopback(&file).map_err(anyhow::Error::msg)?;
        Ok(Netns(file))
    }

    pub(super) fn remove(mut self) -> anyhow::Result<()> {
        let file = std::mem::take(&mut self.0);
        remove_network(&file).map_err(anyhow::Error::msg)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            if let Err(e) = remove_network(&self.0) {
                tracing::warn!("{e}");
            }
        }
    }
}

/// `ctr run -d --null-io --runtime RUNTIME [--with-ns network:FILE] [--annotation K=V]...
/// IMAGE ID CMD...` as arguments of `ctr`.
pub fn run_args(
    runtime: &str,
    netns: Option<&Path>,
    annotations: &[(&str, &str)],
    image: &str,
    id: &str,
    cmd: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["run", "-d", "--null-io", "--runtime", runtime]
        .map(String::from)
        .to_vec();
    if let Some(ns) = netns {
        args.push("--with-ns".into());
        args.push(format!("network:{}", ns.display()));
    }
    for (k, v) in annotations {
        args.push("--annotation".into());
        args.push(format!("{k}={v}"));
    }
    args.push(image.into());
    args.push(id.into());
    args.extend(cmd.iter().map(|a| a.to_string()));
    args
}

/// A workload served on 127.0.0.1:8000: its image, command, and how a template of it is
/// known to be ready.
pub(super) struct Workload<'a> {
    pub(super) label: &'static str,
    /// Short, for container ids and the template's name.
    pub(super) tag: &'static str,
    pub(super) image: &'a str,
    pub(super) cmd: Vec<&'a str>,
    pub(super) ready: (&'static str, &'static str),
}

/// One start until ready.
pub(super) struct Ready {
    /// When `ctr run -d` was spawned.
    pub(super) spawned: Instant,
    /// The first body the service answered.
    pub(super) body: String,
    /// From spawning `ctr run -d` until that answer.
    pub(super) ready_ms: f64,
    /// From spawning `ctr run -d` until it exited.
    pub(super) returned_ms: f64,
}

/// The benchmark's set-up for one containerd version.
pub(super) struct Bench {
    pub(super) engine: Engine,
    pub(super) python: String,
}

impl Bench {
    pub(super) fn containerd(&self) -> &Containerd {
        &self.engine.bed.containerd
    }

    pub(super) fn fail(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!(
            "{what}\ncontainerd's log ends:\n{}",
            self.containerd().log_tail(40)
        )
    }

    /// Spawns `ctr ARGS`, stdout discarded, stderr kept.
    pub(super) fn spawn_ctr(&self, args: &[String]) -> anyhow::Result<(Child, String)> {
        let mut cmd = self.containerd().ctr();
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = describe(&cmd);
        let child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
        Ok((child, shown))
    }

    /// Fails unless the `ctr` `child` ended well.
    pub(super) fn finish_ctr(&self, child: Child, shown: &str) -> anyhow::Result<()> {
        let out = self
            .containerd()
            .wait_ctr(child, Duration::from_secs(60))
            .with_context(|| format!("waiting for {shown}"))?;
        if !out.status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// When the `ctr` `child` spawned at `start` exited, ms after `start`, if it has; fails
    /// if it failed.
    fn ctr_returned(
        &self,
        child: &mut Child,
        shown: &str,
        start: Instant,
    ) -> anyhow::Result<Option<f64>> {
        match child.try_wait() {
            Ok(Some(status)) if !status.success() => {
                let stderr = child
                    .stderr
                    .take()
                    .and_then(|e| std::io::read_to_string(e).ok())
                    .unwrap_or_default();
                Err(self.fail(format!("`{shown}` failed ({status}): {}", stderr.trim())))
            }
            Ok(Some(_)) => Ok(Some(start.elapsed().as_secs_f64() * 1e3)),
            Ok(None) => Ok(None),
            Err(e) => bail!("cannot wait for {shown}: {e}"),
        }
    }

    /// Spawns `ctr run -d ...` and polls a GET in `netns` every [`POLL`] until it returns a
    /// body; also notes when `ctr` returned.
    pub(super) fn run_until_ready(&self, args: &[String], netns: &Path) -> anyhow::Result<Ready> {
        let start = Instant::now();
        let (mut child, shown) = self.spawn_ctr(args)?;
        let mut returned_ms = None;
        loop {
            if let Ok(body) = get_in_network(netns, PY_SERVICE_PORT, GET_TIMEOUT) {
                let ready_ms = start.elapsed().as_secs_f64() * 1e3;
                // `ctr run -d` returns once the task runs: soon, if not yet.
                while returned_ms.is_none() {
                    returned_ms = self.ctr_returned(&mut child, &shown, start)?;
                    if start.elapsed() > READY_LIMIT {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(self.fail(format!("`{shown}` did not return")));
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                self.finish_ctr(child, &shown)?;
                return Ok(Ready {
                    spawned: start,
                    body,
                    ready_ms,
                    returned_ms: returned_ms.unwrap_or(f64::NAN),
                });
            }
            if returned_ms.is_none() {
                returned_ms = self.ctr_returned(&mut child, &shown, start)?;
            }
            if start.elapsed() > READY_LIMIT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!(
                    "no answer on 127.0.0.1:{PY_SERVICE_PORT} within {READY_LIMIT:?} of `{shown}`"
                )));
            }
            thread::sleep(POLL);
        }
    }

    /// Kills and deletes the task `id`, and removes its container.
    pub(super) fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.engine
            .remove(&[id.to_string()])
            .map_err(|e| self.fail(format!("removing {id}: {e}")))
    }

    /// The store of this daemon's namespace.
    pub(super) fn store(&self) -> PathBuf {
        let c = self.containerd();
        c.template_root().join(c.namespace())
    }

    /// Waits until template `name` is kept, failing at once with why its capture failed.
    pub(super) fn wait_template(&self, name: &str, since: Instant) -> anyhow::Result<f64> {
        let record = self.store().join(name).join("template.json");
        let error = self.store().join(format!(".{name}.error"));
        loop {
            if record.is_file() {
                return Ok(since.elapsed().as_secs_f64() * 1e3);
            }
            if let Ok(reason) = fs::read_to_string(&error) {
                return Err(self.fail(format!("capture of template {name} failed: {reason}")));
            }
            if since.elapsed() > READY_LIMIT {
                return Err(self.fail(format!("no template {name} within {READY_LIMIT:?}")));
            }
            thread::sleep(POLL);
        }
    }

    /// `containerd-shim-hyperbox-v1 templates COMMAND -n NS ARGS...` with this daemon's
    /// template store and settings and its `PATH` (CRIU); its stdout, and how long from
    /// spawning it until it exited, ms. Fails if it fails or takes over `limit`.
    pub(super) fn shim_templates(
        &self,
        command: &str,
        args: &[&str],
        limit: Duration,
    ) -> anyhow::Result<(String, f64)> {
        let c = self.containerd();
        let shim = host::workspace_binary(SHIM)
            .with_context(|| format!("{SHIM} is not built beside this binary"))?;
        let mut cmd = Command::new(&shim);
        cmd.args(["templates", command, "-n", c.namespace()])
            .args(args)
            .env("HYPERBOX_TEMPLATE_ROOT", c.template_root())
            .env("HYPERBOX_TEMPLATE_CONFIG", c.template_settings())
            // No registry credentials of the user's: the loopback registry needs none.
            .env("HOME", c.dir())
            .env("PATH", c.path_env())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let shown = describe(&cmd);
        let start = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
        // Read both pipes on threads so a chatty command cannot block on a full one.
        let mut stdout = child.stdout.take().context("no stdout pipe")?;
        let mut stderr = child.stderr.take().context("no stderr pipe")?;
        let out_reader = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stdout.read_to_end(&mut text);
            text
        });
        let err_reader = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            text
        });
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .with_context(|| format!("waiting for {shown}"))?
            {
                break status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(self.fail(format!("`{shown}` did not end within {limit:?}")));
            }
            thread::sleep(Duration::from_millis(1));
        };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        if !status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({status}): {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        Ok((String::from_utf8_lossy(&out).into_owned(), ms))
    }

    /// `containerd-shim-hyperbox-v1 templates inspect -n NS NAME`.
    pub(super) fn inspect(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let (out, _) = self.shim_templates("inspect", &[name], Duration::from_secs(60))?;
        serde_json::from_str(&out)
            .with_context(|| format!("{SHIM} templates inspect {name} printed no JSON: {out}"))
    }

    /// Waits until task `id` is listed as running.
    pub(super) fn wait_running(&self, id: &str) -> anyhow::Result<()> {
        let c = self.containerd();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let listing = c.ctr_stdout(&["tasks", "ls"])?;
            match parse_tasks_ls(&listing).into_iter().find(|t| t.id == id) {
                Some(t) if t.status == "RUNNING" && t.pid > 0 => return Ok(()),
                _ if Instant::now() > deadline => {
                    return Err(self.fail(format!(
                        "task {id} is not running; `ctr tasks ls` says:\n{listing}"
                    )))
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Runs `ctr ARGS` to its end; how long it took, ms.
    pub(super) fn timed_ctr(&self, args: &[&str]) -> anyhow::Result<f64> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let start = Instant::now();
        let (child, shown) = self.spawn_ctr(&args)?;
        let out = child
            .wait_with_output()
            .with_context(|| format!("waiting for {shown}"))?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            return Err(self.fail(format!(
                "`{shown}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(ms)
    }
}

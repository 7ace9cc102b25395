//! The engines under test: one private containerd per version (a harness [`TestBed`]) with
//! busybox pulled, and the `ctr` commands the benchmarks time or measure.

use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{shim_binary_name, ContainerdError, ContainerdVersion};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::testbed::{TestBed, TestBedError};

use crate::runner::{describe, CommandFailure, Variant};

/// containerd's default runtime: the baseline every benchmark compares with.
pub const RUNC_V2: &str = "io.containerd.runc.v2";
/// HyperBox's Linux shim, what the parity benchmarks (`stats`, `parallel`) compare by default.
pub const HYPERBOX_V1: &str = "io.containerd.hyperbox.v1";

/// Errors preparing or driving an engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot start a test bed with containerd {version}: {source}")]
    TestBed {
        version: ContainerdVersion,
        #[source]
        source: TestBedError,
    },
    #[error("containerd {version}: {source}")]
    Ctr {
        version: ContainerdVersion,
        #[source]
        source: ContainerdError,
    },
    #[error(
        "runtime {runtime} is not available in containerd {version}: {why}; runtimes available: \
         {available}"
    )]
    RuntimeNotBuilt {
        runtime: String,
        version: ContainerdVersion,
        why: String,
        available: String,
    },
    #[error("containerd {version}: task {id} is not running; `ctr tasks ls` says:\n{listing}")]
    TaskNotRunning {
        version: ContainerdVersion,
        id: String,
        listing: String,
    },
}

/// A line of `ctr tasks ls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskLine {
    pub id: String,
    pub pid: u32,
    pub status: String,
}

/// Parses `ctr tasks ls` (`TASK PID STATUS` table with a header line).
pub fn parse_tasks_ls(text: &str) -> Vec<TaskLine> {
    text.lines()
        .filter_map(|line| {
            let mut w = line.split_whitespace();
            let id = w.next()?.to_string();
            let pid = w.next()?.parse().ok()?;
            let status = w.next()?.to_string();
            Some(TaskLine { id, pid, status })
        })
        .collect()
}

/// `runtimes` with [`RUNC_V2`] first, duplicates removed: every report shows the default
/// runtime measured in the same run.
pub fn with_default_runtime(runtimes: &[String]) -> Vec<String> {
    let mut out = vec![RUNC_V2.to_string()];
    for r in runtimes {
        let r = r.trim();
        if !r.is_empty() && !out.iter().any(|o| o == r) {
            out.push(r.to_string());
        }
    }
    out
}

/// A private containerd of one version, with busybox pulled.
#[derive(Debug)]
pub struct Engine {
    pub version: ContainerdVersion,
    pub bed: TestBed,
    /// The pulled busybox reference.
    pub image: String,
}

impl Engine {
    /// Starts containerd `version` and a registry, and pulls busybox from it.
    pub fn start(version: ContainerdVersion) -> Result<Engine, EngineError> {
        let bed =
            TestBed::start(version).map_err(|source| EngineError::TestBed { version, source })?;
        let image = bed
            .image(TestImage::Busybox)
            .map_err(|source| EngineError::TestBed { version, source })?;
        tracing::info!(%version, dir = %bed.containerd.dir().display(), %image, "engine ready");
        Ok(Engine {
            version,
            bed,
            image,
        })
    }

    /// Fails unless containerd can run `runtime`: the built-in [`RUNC_V2`], or a shim the
    /// harness registered.
    pub fn check_runtime(&self, runtime: &str) -> Result<(), EngineError> {
        let registered = self.bed.containerd.runtimes();
        if runtime == RUNC_V2 || registered.iter().any(|r| r == runtime) {
            return Ok(());
        }
        let why = match shim_binary_name(runtime) {
            None => "not a runtime name of the form io.containerd.NAME.vN".to_string(),
            Some(binary) => {
                let dir = host::workspace_bin_dir()
                    .map_or_else(|| "target/<profile>".into(), |d| d.display().to_string());
                format!(
                    "its shim `{binary}` is not built in {dir} (the harness registers the \
                     workspace's shims found beside this binary: build them in the same \
                     profile, e.g. `cargo build --release --workspace`)"
                )
            }
        };
        let mut available = vec![format!("{RUNC_V2} (built in)")];
        available.extend(registered.iter().cloned());
        Err(EngineError::RuntimeNotBuilt {
            runtime: runtime.to_string(),
            version: self.version,
            why,
            available: available.join(", "),
        })
    }

    /// The `ctr run --rm` variant: runs `true` in busybox through `runtime` to completion.
    pub fn ctr_run_rm(&self, runtime: &str) -> Variant<'_> {
        let c = &self.bed.containerd;
        let fifo = c.dir().join("fifo");
        let name = variant_name(runtime, self.version);
        let description = format!(
            "ctr run --rm --fifo-dir {} --runtime {runtime} {} id-{{n}} true",
            fifo.display(),
            self.image
        );
        let runtime = runtime.to_string();
        Variant::command(name, description, move |n| {
            let mut cmd = c.ctr();
            cmd.args(["run", "--rm", "--fifo-dir"]).arg(&fifo).args([
                "--runtime",
                &runtime,
                &self.image,
                &format!("id-{n}"),
                "true",
            ]);
            cmd
        })
    }

    /// The parallel-lifecycles variant: `containers` × `ctr run --rm` through `runtime`, all
    /// spawned at once, container `I` running `sh -c 'exit I'` (`I` mod 256); done when every
    /// `ctr` has exited, and failed unless every one exited with its container's code.
    pub fn ctr_run_batch(&self, runtime: &str, containers: usize) -> Variant<'_> {
        let c = &self.bed.containerd;
        let fifo = c.dir().join("fifo");
        let name = variant_name(runtime, self.version);
        let description = format!(
            "{containers} at once: ctr run --rm --fifo-dir {} --runtime {runtime} {} \
             par-{{n}}-I sh -c 'exit I'",
            fifo.display(),
            self.image
        );
        let runtime = runtime.to_string();
        Variant::new(name, description, move |n| {
            let mut running: Vec<(i32, String, Child)> = Vec::with_capacity(containers);
            let mut failures: Vec<CommandFailure> = Vec::new();
            for i in 0..containers {
                let code = (i % 256) as i32;
                let mut cmd = c.ctr();
                cmd.args(["run", "--rm", "--fifo-dir"]).arg(&fifo).args([
                    "--runtime",
                    &runtime,
                    &self.image,
                    &format!("par-{n}-{i}"),
                    // `ctr run` (1.6 and 1.7) stops taking flags at the image: `-c` is sh's.
                    "sh",
                    "-c",
                    &format!("exit {code}"),
                ]);
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                let shown = describe(&cmd);
                match cmd.spawn() {
                    Ok(child) => running.push((code, shown, child)),
                    Err(e) => failures.push(CommandFailure {
                        command: shown,
                        status: "not started".into(),
                        stderr: e.to_string(),
                    }),
                }
            }
            // Every child is waited for, also after a failure, so none outlives the round.
            for (code, shown, child) in running {
                let failure = match child.wait_with_output() {
                    Err(e) => Some((format!("not waited for: {e}"), String::new())),
                    Ok(out) => {
                        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                        // A failing ctr exits 1 and says `ctr: ...`; a container's own code
                        // comes back as ctr's exit status, with nothing said.
                        let ok = out.status.code() == Some(code) && !stderr.contains("ctr: ");
                        (!ok).then(|| {
                            (
                                format!("{}, expected exit status {code}", out.status),
                                stderr,
                            )
                        })
                    }
                };
                if let Some((status, stderr)) = failure {
                    failures.push(CommandFailure {
                        command: shown,
                        status,
                        stderr,
                    });
                }
            }
            match failures.len() {
                0 => Ok(()),
                count => {
                    let mut first = failures.swap_remove(0);
                    if count > 1 {
                        first.stderr = format!(
                            "{} (and {} more of the {containers} failed)",
                            first.stderr,
                            count - 1
                        );
                    }
                    Err(first)
                }
            }
        })
    }

    /// Starts the detached container `id` running `sleep 1000` through `runtime` and returns
    /// its init pid.
    pub fn start_sleeper(&self, runtime: &str, id: &str) -> Result<u32, EngineError> {
        let c = &self.bed.containerd;
        let args = [
            "run",
            "-d",
            "--null-io",
            "--runtime",
            runtime,
            &self.image,
            id,
            "sleep",
            "1000",
        ];
        c.ctr_run(&args).map_err(|source| self.ctr_error(source))?;
        // `ctr run -d` returns once the task is started; allow it a moment to be listed.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let listing = c
                .ctr_stdout(&["tasks", "ls"])
                .map_err(|source| self.ctr_error(source))?;
            let task = parse_tasks_ls(&listing).into_iter().find(|t| t.id == id);
            match task {
                Some(t) if t.status == "RUNNING" && t.pid > 0 => return Ok(t.pid),
                _ if Instant::now() > deadline => {
                    return Err(EngineError::TaskNotRunning {
                        version: self.version,
                        id: id.to_string(),
                        listing,
                    })
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Kills and deletes the containers `ids` (their tasks, then the containers and
    /// snapshots).
    pub fn remove(&self, ids: &[String]) -> Result<(), EngineError> {
        let c = &self.bed.containerd;
        for id in ids {
            c.ctr_run(&["tasks", "rm", "-f", id])
                .map_err(|source| self.ctr_error(source))?;
            c.ctr_run(&["containers", "rm", id])
                .map_err(|source| self.ctr_error(source))?;
        }
        Ok(())
    }

    fn ctr_error(&self, source: ContainerdError) -> EngineError {
        EngineError::Ctr {
            version: self.version,
            source,
        }
    }
}

/// The name of a (runtime, containerd version) variant, as reports print it.
pub fn variant_name(runtime: &str, version: ContainerdVersion) -> String {
    format!("{runtime}@{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_listing_parses() {
        let text =
            "TASK      PID     STATUS    \nmem-0     4242    RUNNING\nmem-1     0       CREATED\n";
        assert_eq!(
            parse_tasks_ls(text),
            vec![
                TaskLine {
                    id: "mem-0".into(),
                    pid: 4242,
                    status: "RUNNING".into()
                },
                TaskLine {
                    id: "mem-1".into(),
                    pid: 0,
                    status: "CREATED".into()
                },
            ]
        );
    }

    #[test]
    fn the_default_runtime_always_comes_first() {
        let given = ["io.containerd.hyperbox.v1".to_string(), RUNC_V2.to_string()];
        assert_eq!(
            with_default_runtime(&given),
            vec![RUNC_V2.to_string(), "io.containerd.hyperbox.v1".to_string()]
        );
        assert_eq!(with_default_runtime(&[]), vec![RUNC_V2.to_string()]);
    }

    #[test]
    fn variant_names_say_runtime_and_version() {
        assert_eq!(
            variant_name(RUNC_V2, ContainerdVersion::V1_6),
            "io.containerd.runc.v2@1.6"
        );
    }
}

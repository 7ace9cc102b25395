//! The libcontainer engine: each call is a request to the zygote (see `zygote`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use hyperbox_shim_core::template::{Captured, TemplateCapture};
use hyperbox_shim_core::{
    CheckpointSpec, CreateSpec, Engine, EngineError, ExecSpec, ProcessStdio, RestoreFrom,
    ShimAction, ShimContext, Spawned,
};
use nix::unistd::Pid;

use crate::console::ConsoleSocket;
use crate::error::YoukiError;
use crate::executor::{ExecutorFactory, NativeExecutors};
use crate::image::{Containerd, ImageRef, Images};
use crate::template;
use crate::wire::{self, Reply, Request, StdioMask, WireError};
use crate::zygote;

/// Where container state lives: one directory per containerd namespace, one per container in
/// it (libcontainer's `root`).
const STATE_ROOT: &str = "/run/hyperbox/youki";

/// Containers through libcontainer, created by the zygote.
#[derive(Debug)]
pub struct YoukiEngine {
    /// The zygote's socket and pid; `None` in the `delete` action, which only cleans up after
    /// a shim that went away (containerd runs it after every task server's exit) and does
    /// that in-process, without forking a zygote it would not otherwise use.
    zygote: Option<(Arc<Mutex<OwnedFd>>, Pid)>,
    /// containerd namespace, joined to a state root given in the runtime options.
    namespace: String,
    /// containerd's images, asked for what templates record and match; `None` without
    /// containerd's address.
    images: Option<Images>,
}

/// Forks the zygote; called by `hyperbox_shim_core::run` while the process has one thread.
pub fn prepare(ctx: &ShimContext) -> Result<Arc<dyn Engine>, EngineError> {
    prepare_with(ctx, Box::new(NativeExecutors))
}

/// As [`prepare`], with the executor of each container chosen by `executors` in the zygote
/// (see [`ExecutorFactory`]).
pub fn prepare_with(
    ctx: &ShimContext,
    executors: Box<dyn ExecutorFactory>,
) -> Result<Arc<dyn Engine>, EngineError> {
    let zygote = match ctx.action {
        ShimAction::Delete => None,
        ShimAction::Serve => {
            let root = PathBuf::from(STATE_ROOT).join(&ctx.namespace);
            let (sock, pid) = zygote::spawn(root, ctx.namespace.clone(), executors)?;
            tracing::debug!(id = ctx.id, zygote = pid.as_raw(), "zygote started");
            Some((Arc::new(Mutex::new(sock)), pid))
        }
    };
    Ok(Arc::new(YoukiEngine {
        zygote,
        namespace: ctx.namespace.clone(),
        images: Containerd::new(&ctx.address, &ctx.namespace).map(Images::new),
    }))
}

/// A console socket for a process that asks for a terminal. It lives beside the state
/// directories, whatever the runtime options say of those, so that its path stays short.
fn console_socket(stdio: &ProcessStdio) -> Result<Option<ConsoleSocket>, YoukiError> {
    stdio
        .terminal
        .then(|| ConsoleSocket::bind(Path::new(STATE_ROOT)))
        .transpose()
}

/// The terminal master the new process sent on `console`, if it asked for one; received off
/// the runtime's threads, as it may take up to the console's limit.
async fn receive_master(console: Option<ConsoleSocket>) -> Result<Option<OwnedFd>, YoukiError> {
    let Some(console) = console else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || console.receive_master())
        .await
        .map_err(|source| YoukiError::Task {
            what: "receiving the terminal",
            source,
        })?
        .map(Some)
}

fn split(stdio: ProcessStdio, console: Option<&ConsoleSocket>) -> (StdioMask, Vec<OwnedFd>) {
    let mask = StdioMask {
        stdin: stdio.stdin.is_some(),
        stdout: stdio.stdout.is_some(),
        stderr: stdio.stderr.is_some(),
        console_socket: console.map(|c| c.path().to_path_buf()),
    };
    let fds = [stdio.stdin, stdio.stdout, stdio.stderr]
        .into_iter()
        .flatten()
        .collect();
    (mask, fds)
}

impl YoukiEngine {
    /// One request, one reply. The fds go to the zygote and are closed here once sent.
    async fn call(&self, req: Request, fds: Vec<OwnedFd>) -> Result<Reply, YoukiError> {
        let Some((sock, zygote)) = self.zygote.clone() else {
            return Err(YoukiError::Failed(
                "the shim's delete action serves no task requests".into(),
            ));
        };
        let reply = tokio::task::spawn_blocking(move || {
            let (reply, mut fds) = {
                let sock = sock.lock().unwrap_or_else(PoisonError::into_inner);
                wire::send(sock.as_fd(), &req, &fds)?;
                drop(fds);
                wire::recv::<Reply>(sock.as_fd())?
                    .ok_or(WireError::ZygoteExited(zygote.as_raw()))?
            };
            // A long request goes on in a worker of the zygote: its answer comes on a socket
            // of its own, waited for without holding the zygote's.
            if !matches!(reply, Reply::Detached) {
                return Ok(reply);
            }
            let worker = fds.pop().ok_or(WireError::NoWorkerSocket)?;
            wire::recv::<Reply>(worker.as_fd())?
                .map(|(r, _)| r)
                .ok_or(WireError::WorkerExited)
        })
        .await
        .map_err(|source| YoukiError::Task {
            what: "the zygote call",
            source,
        })??;
        match reply {
            Reply::Failed(e) => Err(e.into()),
            r => Ok(r),
        }
    }

    /// Container `id`'s image, for a template; `None` (logged) when containerd cannot say.
    async fn image_of(&self, id: &str) -> Option<ImageRef> {
        let images = self.images.as_ref()?;
        match images.of(id).await {
            Ok(image) => image,
            Err(e) => {
                tracing::warn!(id, "the template records no image digest: {e}");
                None
            }
        }
    }

    /// Pulls template `name` from `reference` into the container's owner's templates, unless
    /// it is there: a restore's pull on first use (`io.hyperbox.template.pull`), from a
    /// registry the node's template settings list in `pull_from` only, and only for a
    /// container whose image containerd names (the template's must be it).
    async fn pull_template(
        &self,
        spec: &CreateSpec,
        name: &str,
        reference: &str,
        image: Option<&ImageRef>,
    ) -> Result<(), YoukiError> {
        let store = template::Store::for_bundle(&self.namespace, &spec.bundle)?;
        if store.path(name).exists() {
            return Ok(());
        }
        let settings = template::Settings::load()?;
        if !settings
            .pull_from
            .iter()
            .any(|prefix| !prefix.is_empty() && reference.starts_with(prefix.as_str()))
        {
            return Err(YoukiError::invalid(format!(
                "template {name} is not on this node, and {reference} is not a source the node \
                 pulls templates from: an administrator lists those in pull_from of {}",
                template::Settings::path().display()
            )));
        }
        let Some(image) = image.cloned() else {
            return Err(YoukiError::Unsupported(format!(
                "cannot pull template {name} for container {}: containerd did not say its \
                 image, which a pulled template is matched to",
                spec.id
            )));
        };
        let access = crate::distribution::Access::of_node(&settings);
        let (name, reference) = (name.to_string(), reference.to_string());
        let started = std::time::Instant::now();
        let pulled = tokio::task::spawn_blocking(move || {
            crate::distribution::pull(&store, &reference, Some(&name), &access, Some(&image), true)
        })
        .await
        .map_err(|source| YoukiError::Task {
            what: "the template pull",
            source,
        })?
        .map_err(YoukiError::Unsupported)?;
        tracing::info!(
            id = spec.id,
            template = pulled.name,
            digest = pulled.digest,
            bytes = pulled.bytes,
            "template pulled in {:?}",
            started.elapsed()
        );
        Ok(())
    }

    async fn call_done(&self, req: Request) -> Result<(), YoukiError> {
        match self.call(req, Vec::new()).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(r: Reply) -> YoukiError {
    WireError::Unexpected(format!("{r:?}")).into()
}

#[async_trait]
impl Engine for YoukiEngine {
    fn helper_pids(&self) -> Vec<u32> {
        self.zygote
            .iter()
            .map(|(_, pid)| pid.as_raw() as u32)
            .collect()
    }

    async fn create(&self, spec: &CreateSpec, stdio: ProcessStdio) -> Result<Spawned, EngineError> {
        if spec.options.systemd_cgroup {
            return Err(YoukiError::Unsupported(format!(
                "container {}: SystemdCgroup requested but this shim is built without systemd \
                 cgroup support; set SystemdCgroup = false in the runtime options",
                spec.id
            ))
            .into());
        }
        let image = match &spec.restore {
            Some(RestoreFrom::Template(t)) => {
                let image = self.image_of(&spec.id).await;
                if let Some(reference) = &t.pull {
                    self.pull_template(spec, &t.name, reference, image.as_ref())
                        .await?;
                }
                image
            }
            _ => None,
        };
        let console = console_socket(&stdio)?;
        let (mask, fds) = split(stdio, console.as_ref());
        let req = Request::Create {
            id: spec.id.clone(),
            bundle: spec.bundle.clone(),
            rootfs: spec.rootfs.clone(),
            stdio: mask,
            state_root: spec
                .options
                .state_root
                .as_ref()
                .map(|r| r.join(&self.namespace)),
            no_pivot_root: spec.options.no_pivot_root,
            restore: spec.restore.clone(),
            image,
        };
        let (pid, cgroups_path) = match self.call(req, fds).await? {
            Reply::Created { pid, cgroups_path } => (pid, cgroups_path),
            other => return Err(unexpected(other).into()),
        };
        match receive_master(console).await {
            Ok(console) => Ok(Spawned {
                pid,
                console,
                cgroups_path,
            }),
            Err(e) => {
                if let Err(clean) = self.delete(&spec.id, &spec.bundle).await {
                    tracing::warn!(id = spec.id, "cleanup after failed create: {clean}");
                }
                Err(e.into())
            }
        }
    }

    async fn start(&self, id: &str) -> Result<(), EngineError> {
        Ok(self
            .call_done(Request::Start { id: id.to_string() })
            .await?)
    }

    async fn exec(
        &self,
        id: &str,
        spec: &ExecSpec,
        stdio: ProcessStdio,
    ) -> Result<Spawned, EngineError> {
        let console = console_socket(&stdio)?;
        let (mask, fds) = split(stdio, console.as_ref());
        let req = Request::Exec {
            id: id.to_string(),
            exec_id: spec.exec_id.clone(),
            process: spec.process.clone(),
            stdio: mask,
        };
        let pid = match self.call(req, fds).await? {
            Reply::Pid(pid) => pid,
            other => return Err(unexpected(other).into()),
        };
        match receive_master(console).await {
            Ok(console) => Ok(Spawned {
                pid,
                console,
                cgroups_path: None,
            }),
            Err(e) => {
                // A process without its terminal's copies would hang its client.
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Err(e.into())
            }
        }
    }

    async fn signal_all(&self, id: &str, signal: i32) -> Result<(), EngineError> {
        Ok(self
            .call_done(Request::SignalAll {
                id: id.to_string(),
                signal,
            })
            .await?)
    }

    async fn pids(&self, id: &str) -> Result<Vec<u32>, EngineError> {
        match self
            .call(Request::Pids { id: id.to_string() }, Vec::new())
            .await?
        {
            Reply::Pids(p) => Ok(p),
            other => Err(unexpected(other).into()),
        }
    }

    async fn cgroups_path(&self, id: &str) -> Result<PathBuf, EngineError> {
        match self
            .call(Request::CgroupsPath { id: id.to_string() }, Vec::new())
            .await?
        {
            Reply::Path(p) => Ok(p),
            other => Err(unexpected(other).into()),
        }
    }

    async fn checkpoint(
        &self,
        id: &str,
        bundle: &Path,
        spec: &CheckpointSpec,
    ) -> Result<(), EngineError> {
        Ok(self
            .call_done(Request::Checkpoint {
                id: id.to_string(),
                bundle: bundle.to_path_buf(),
                spec: spec.clone(),
            })
            .await?)
    }

    async fn capture_template(
        &self,
        id: &str,
        bundle: &Path,
        spec: &TemplateCapture,
    ) -> Result<Captured, EngineError> {
        match self
            .call(
                Request::CaptureTemplate {
                    id: id.to_string(),
                    bundle: bundle.to_path_buf(),
                    spec: spec.clone(),
                    image: self.image_of(id).await,
                },
                Vec::new(),
            )
            .await?
        {
            Reply::Captured(c) => Ok(c),
            other => Err(unexpected(other).into()),
        }
    }

    async fn template_failed(&self, name: &str, reason: &str, bundle: &Path) {
        let req = Request::TemplateFailed {
            name: name.to_string(),
            reason: reason.to_string(),
            bundle: bundle.to_path_buf(),
        };
        if let Err(e) = self.call_done(req).await {
            tracing::warn!(name, "cannot record the failed capture: {e}");
        }
    }

    async fn delete(&self, id: &str, bundle: &Path) -> Result<(), EngineError> {
        if self.zygote.is_none() {
            let root = PathBuf::from(STATE_ROOT).join(&self.namespace);
            let (id, bundle) = (id.to_string(), bundle.to_path_buf());
            tokio::task::spawn_blocking(move || zygote::delete_after_lost_shim(root, &id, &bundle))
                .await
                .map_err(|source| YoukiError::Task {
                    what: "the cleanup",
                    source,
                })??;
            return Ok(());
        }
        Ok(self
            .call_done(Request::Delete {
                id: id.to_string(),
                bundle: bundle.to_path_buf(),
            })
            .await?)
    }
}

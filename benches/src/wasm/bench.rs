//! The benchmark's set-up ([`Bench`]): the engine, the guests' root filesystem and OCI
//! image, and the `ctr` commands that run them.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::wasm_image::{WasmImageBuilder, WASM_LAYER};
use sha2::{Digest, Sha256};

use crate::engines::{parse_tasks_ls, Engine, RUNC_V2};

use super::guests::{assemble, count_cache_lines, hello, CacheCounts, LOOP, SLEEP};
use super::WASM_V1;

/// The benchmark's set-up: the engine, the guests' root filesystem, the hello guest.
pub(super) struct Bench {
    pub(super) engine: Engine,
    pub(super) rootfs: PathBuf,
    fifo: PathBuf,
    pub(super) digest: String,
    /// The hello guest as an OCI wasm image, pulled (containerd 1.7 only).
    pub(super) image: Option<String>,
}

impl Bench {
    pub(super) fn containerd(&self) -> &Containerd {
        &self.engine.bed.containerd
    }

    /// `ctr run --rm --fifo-dir F --runtime WASM --rootfs DIR ID /hello.wasm`.
    pub(super) fn wasm_rootfs_run(&self, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args(["--runtime", WASM_V1, "--rootfs"])
            .arg(&self.rootfs)
            .args([id, "/hello.wasm"]);
        cmd
    }

    pub(super) fn wasm_image_run(&self, image: &str, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args(["--runtime", WASM_V1, image, id]);
        cmd
    }

    pub(super) fn native_run(&self, id: &str) -> Command {
        let mut cmd = self.containerd().ctr();
        cmd.args(["run", "--rm", "--fifo-dir"])
            .arg(&self.fifo)
            .args([
                "--runtime",
                RUNC_V2,
                &self.engine.image,
                id,
                "echo",
                "hello",
            ]);
        cmd
    }

    pub(super) fn cache_counts(&self) -> CacheCounts {
        let log = fs::read_to_string(self.containerd().log_path()).unwrap_or_default();
        count_cache_lines(&log, &self.digest)
    }

    /// Starts `ctr run -d --null-io --runtime RUNTIME ARGS` and returns the task's pid once
    /// it runs.
    pub(super) fn start_detached(
        &self,
        runtime: &str,
        id: &str,
        args: &[&str],
    ) -> anyhow::Result<u32> {
        let c = self.containerd();
        let mut all = vec!["run", "-d", "--null-io", "--runtime", runtime];
        all.extend_from_slice(args);
        c.ctr_run(&all)
            .with_context(|| format!("starting container {id}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let listing = c.ctr_stdout(&["tasks", "ls"])?;
            match parse_tasks_ls(&listing).into_iter().find(|t| t.id == id) {
                Some(t) if t.status == "RUNNING" && t.pid > 0 => return Ok(t.pid),
                _ if Instant::now() > deadline => {
                    bail!("task {id} is not running; `ctr tasks ls` says:\n{listing}")
                }
                _ => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn unique_tag() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("hyperbox-bench-{}-{nanos}", std::process::id())
}

pub(super) fn prepare(version: ContainerdVersion) -> anyhow::Result<Bench> {
    let engine =
        Engine::start(version).with_context(|| format!("preparing containerd {version}"))?;
    engine.check_runtime(WASM_V1)?;
    let c = &engine.bed.containerd;
    let hello = hello(&unique_tag())?;
    let digest = format!("{:x}", Sha256::digest(&hello));
    let rootfs = c.dir().join("wasm-rootfs");
    fs::create_dir_all(&rootfs).with_context(|| format!("cannot create {}", rootfs.display()))?;
    for (name, bytes) in [
        ("hello.wasm", hello.clone()),
        ("sleep.wasm", assemble(SLEEP)?),
        ("loop.wasm", assemble(LOOP)?),
    ] {
        let path = rootfs.join(name);
        fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let image = if version == ContainerdVersion::V1_6 {
        tracing::info!("containerd 1.6 refuses wasm images: no OCI image variant");
        None
    } else {
        let written = WasmImageBuilder::new()
            .with_layer(WASM_LAYER, hello)
            .with_cmd(&["hello.wasm"])
            .write(&c.dir().join("wasm-image-hello"))
            .context("writing the hello guest's OCI image")?;
        let reference = written
            .push(&engine.bed.registry.host(), "bench/wasm-hello:1")
            .context("pushing the hello guest's image")?;
        c.pull(&reference)?;
        Some(reference)
    };
    let fifo = c.dir().join("fifo");
    tracing::info!(%digest, rootfs = %rootfs.display(), ?image, "wasm guests ready");
    Ok(Bench {
        engine,
        rootfs,
        fifo,
        digest,
        image,
    })
}

/// `ctr run` arguments for the container `id`: `template` with `{id}` replaced.
pub(super) fn with_id(template: &[String], id: &str) -> Vec<String> {
    template.iter().map(|a| a.replace("{id}", id)).collect()
}

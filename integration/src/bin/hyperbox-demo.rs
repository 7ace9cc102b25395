//! `hyperbox-demo`: what HyperBox can do today, on a private containerd started for the demo
//! (nothing on the host is reconfigured) and torn down at the end.
//!
//! It grows as components land; today it shows the foundation every component is tested on.

use std::process::{ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use hyperbox_integration::cli;
use hyperbox_integration::client::CheckpointOptions;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::testbed::TestBed;

const HYPERBOX_RUNTIME: &str = "io.containerd.hyperbox.v1";

#[derive(Parser)]
#[command(about = "HyperBox demo on a private containerd")]
struct Cli {
    /// containerd version to run the demo on (1.6, 1.7, or 2.1 once built by setup-host).
    #[arg(long, default_value = "1.7")]
    containerd: ContainerdVersion,
}

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() -> ExitCode {
    cli::init_logging("warn");
    cli::exit_code("hyperbox-demo", run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    step(&format!(
        "starting a private containerd {} and a registry on loopback",
        cli.containerd
    ));
    let t = Instant::now();
    let bed = TestBed::start(cli.containerd).context("starting the test bed")?;
    let c = &bed.containerd;
    println!(
        "    containerd socket {} (namespace {}), registry {}, up in {} ms",
        c.socket().display(),
        c.namespace(),
        bed.registry.host(),
        t.elapsed().as_millis()
    );

    step("building the offline busybox image (cached), pushing it, pulling it into containerd");
    let t = Instant::now();
    let image = bed.image(TestImage::Busybox).context("busybox image")?;
    println!("    {image} in {} ms", t.elapsed().as_millis());

    step("running a container through io.containerd.runc.v2 (the engine default)");
    let ms = run_hello(c, &image, "io.containerd.runc.v2", "demo-hello")?;
    println!(
        "    ctr run --rm took {ms} ms (the first run also unpacks the image into a snapshot)"
    );

    if c.runtimes().iter().any(|r| r == HYPERBOX_RUNTIME) {
        step("the same through io.containerd.hyperbox.v1 (libcontainer in-process)");
        let ms = run_hello(c, &image, HYPERBOX_RUNTIME, "demo-hyperbox")?;
        println!("    ctr run --rm took {ms} ms");
        running_task(c, &image)?;
        template(c, &image)?;
    } else {
        step("io.containerd.hyperbox.v1 is not built: `cargo build --workspace` adds it");
    }

    step("checkpointing a running counter with CRIU 4 (leave running)");
    c.ctr_run(&[
        "run",
        "-d",
        "--null-io",
        &image,
        "demo-counter",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done",
    ])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(c.client())?;
    let images = c.dir().join("demo-checkpoint");
    let t = Instant::now();
    rt.block_on(client.checkpoint_task(
        "demo-counter",
        Some(&CheckpointOptions {
            image_path: images.to_string_lossy().into_owned(),
            ..Default::default()
        }),
    ))
    .context("checkpoint")?;
    let files = std::fs::read_dir(&images)?.count();
    println!(
        "    {files} CRIU image files in {} ({} ms); the container runs on",
        images.display(),
        t.elapsed().as_millis()
    );
    print!("{}", c.ctr_stdout(&["tasks", "ls"])?);

    step("tearing everything down");
    bed.teardown().context("teardown")?;
    println!("    done: no process, mount, cgroup or directory left behind");
    Ok(())
}

/// A counter captured as a template once ready, and copies started from it, each going on
/// from where the template was rather than from 1.
fn template(c: &Containerd, image: &str) -> anyhow::Result<()> {
    step("a template: a counter captured 1 s after it starts, three containers started from it");
    // Written aside and renamed, so that a read never sees it half written.
    let counter =
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/m; mv /tmp/m /tmp/n; sleep 0.1; done";
    let run = |id: &str, annotations: &[&str]| {
        let mut args = vec!["run", "-d", "--null-io", "--runtime", HYPERBOX_RUNTIME];
        for a in annotations {
            args.extend(["--annotation", a]);
        }
        args.extend([image, id, "sh", "-c", counter]);
        c.ctr_run(&args)
    };
    let t = Instant::now();
    run(
        "demo-template",
        &[
            "io.hyperbox.template.capture=demo-counter",
            "io.hyperbox.template.ready-delay=1s",
        ],
    )?;
    let record = c
        .template_root()
        .join(c.namespace())
        .join("demo-counter/template.json");
    while !record.exists() {
        anyhow::ensure!(
            t.elapsed() < std::time::Duration::from_secs(30),
            "no template after 30 s:\n{}",
            c.log_tail(20)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!(
        "    template demo-counter kept after {} ms",
        t.elapsed().as_millis()
    );
    for n in 1..=3 {
        let id = format!("demo-copy{n}");
        let t = Instant::now();
        run(&id, &["io.hyperbox.restore-from=demo-counter"])?;
        let ms = t.elapsed().as_millis();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let at = c.ctr_stdout(&["tasks", "exec", "--exec-id", "n", &id, "cat", "/tmp/n"])?;
        println!(
            "    {id}: ctr run -d took {ms} ms; 300 ms later its counter is at {}",
            at.trim()
        );
    }
    Ok(())
}

/// A service through our runtime, as an engine manages it: its output in a `file://` log,
/// its metrics, Pause and Resume, then SIGKILL.
fn running_task(c: &Containerd, image: &str) -> anyhow::Result<()> {
    step("a service through io.containerd.hyperbox.v1: file:// log, metrics, pause, resume");
    let log = c.dir().join("demo-service.log");
    let uri = format!("file://{}", log.display());
    c.ctr_run(&[
        "run",
        "-d",
        "--log-uri",
        &uri,
        "--memory-limit",
        "67108864",
        "--runtime",
        HYPERBOX_RUNTIME,
        image,
        "demo-service",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.1; done",
    ])?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let metrics = c.ctr_stdout(&["tasks", "metrics", "demo-service"])?;
    for row in metrics.lines().filter(|l| {
        [
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
            "cpuacct.usage ",
            "pids.current",
        ]
        .iter()
        .any(|m| l.starts_with(m))
    }) {
        println!(
            "    {}",
            row.split_whitespace().collect::<Vec<_>>().join("  ")
        );
    }
    c.ctr_run(&["tasks", "pause", "demo-service"])?;
    let paused = std::fs::read_to_string(&log)?.lines().count();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let still = std::fs::read_to_string(&log)?.lines().count();
    print!(
        "    {}",
        c.ctr_stdout(&["tasks", "ls"])?
            .lines()
            .filter(|l| l.contains("demo-service"))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
    println!("    paused: the log stays at {paused} lines ({still} half a second later)");
    c.ctr_run(&["tasks", "resume", "demo-service"])?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let resumed = std::fs::read_to_string(&log)?.lines().count();
    println!("    resumed: {resumed} lines in {}", log.display());
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "demo-service"])?;
    Ok(())
}

/// Runs a greeting container to completion through `runtime`, prints its output and returns
/// how long the whole `ctr run --rm` took, in milliseconds.
fn run_hello(c: &Containerd, image: &str, runtime: &str, id: &str) -> anyhow::Result<u128> {
    let t = Instant::now();
    let out = c
        .ctr()
        .args(["run", "--rm", "--runtime", runtime, "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args([image, id, "sh", "-c"])
        .arg("echo \"hello from $(uname -s) container, pid $$\"")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("ctr run --runtime {runtime}"))?;
    if !out.status.success() {
        bail!(
            "ctr run through {runtime} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    print!("    {}", String::from_utf8_lossy(&out.stdout));
    Ok(t.elapsed().as_millis())
}

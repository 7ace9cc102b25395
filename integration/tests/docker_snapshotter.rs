//! Docker Engine 26 with the containerd image store (`features.containerd-snapshotter`) on
//! the `hyperbox` snapshotter (`--storage-driver hyperbox`, `config/docker-daemon-snapshotter.json`):
//! images loaded, built and run keep their layers in hyperbox-snapshotter (converted to
//! EROFS), through Docker's default runc runtime and ours, on containerd 1.6, 1.7 and 2.1;
//! and a template capture under Docker, refused with its reason (Docker mounts the rootfs
//! itself and gives the runtime no snapshot mounts).

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::docker::{config_file, Docker, HYPERBOX_RUNTIME};
use hyperbox_integration::images::{self, BuildOptions, TestImage};
use hyperbox_integration::per_version;
use hyperbox_integration::registry::Registry;
use hyperbox_integration::snapshotter::{SnapshotterDaemon, PLUGIN};
use hyperbox_integration::wait_until;

struct Bed {
    docker: Docker,
    containerd: Containerd,
    snapshotter: SnapshotterDaemon,
}

fn bed(v: ContainerdVersion) -> Bed {
    let snapshotter = SnapshotterDaemon::start("").expect("snapshotter started");
    let containerd = snapshotter
        .register(PLUGIN, Containerd::builder(v))
        .start()
        .expect("containerd");
    let docker = Docker::builder()
        .with_daemon_json(config_file("docker-daemon-snapshotter.json"))
        .with_storage_driver(PLUGIN)
        .start(&containerd)
        .expect("dockerd on the hyperbox snapshotter");
    Bed {
        docker,
        containerd,
        snapshotter,
    }
}

fn docker(b: &Bed, args: &[&str]) -> String {
    let out = b.docker.docker().args(args).output().expect("docker runs");
    assert!(
        out.status.success(),
        "docker {args:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        b.docker.log_tail(30)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The keys of the snapshots Docker's namespace has in the hyperbox snapshotter.
fn snapshots(b: &Bed) -> Vec<String> {
    let out = b
        .containerd
        .ctr()
        .args([
            "-n",
            b.docker.namespace(),
            "snapshots",
            "--snapshotter",
            PLUGIN,
            "ls",
        ])
        .output()
        .expect("ctr snapshots ls");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn pull_build_run(v: ContainerdVersion) {
    let b = bed(v);
    let info = docker(
        &b,
        &["info", "--format", "{{.Driver}} {{json .DriverStatus}}"],
    );
    assert!(info.starts_with(PLUGIN), "docker info: {info}");
    let image = b
        .docker
        .load_image(TestImage::Busybox)
        .expect("docker load");
    assert!(
        !snapshots(&b).is_empty(),
        "no layer in the hyperbox snapshotter"
    );

    for runtime in [None, Some(HYPERBOX_RUNTIME)] {
        let mut args = vec!["run", "--rm", "--network", "none"];
        if let Some(r) = runtime {
            args.extend(["--runtime", r]);
        }
        args.extend([image.as_str(), "sh", "-c", "echo hi from $(hostname)"]);
        let out = docker(&b, &args);
        assert!(out.starts_with("hi from"), "{runtime:?}: {out}");
    }

    // docker build (the classic builder: the test host has no buildx plugin): a RUN step in a
    // container on the snapshotter, committed as a layer of ours.
    let ctx = b.docker.dir().join("build");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {image}\nRUN echo built-on-hyperbox > /built\nCMD [\"cat\", \"/built\"]\n"),
    )
    .unwrap();
    let before = snapshots(&b).len();
    let out = b
        .docker
        .docker()
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", "hyperbox/built:1"])
        .arg(&ctx)
        .output()
        .expect("docker build");
    assert!(
        out.status.success(),
        "docker build: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        b.docker.log_tail(30)
    );
    assert!(
        snapshots(&b).len() > before,
        "the build left no layer of ours"
    );
    for runtime in ["runc", HYPERBOX_RUNTIME] {
        let out = docker(
            &b,
            &[
                "run",
                "--rm",
                "--network",
                "none",
                "--runtime",
                runtime,
                "hyperbox/built:1",
            ],
        );
        assert_eq!(out, "built-on-hyperbox", "{runtime}");
    }
    // The layers were converted into EROFS images of the snapshotter's store.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.snapshotter.image_ids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no layer converted\n{}",
            b.snapshotter.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}
per_version!(pull_build_run, pull_build_run);

/// Counts up, writing each value to /tmp/n.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done";

fn counter(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/root/tmp/n"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Templates under Docker: an image pulled from a registry lands in the snapshotter, but
/// Docker (with the containerd image store as with its own storage) mounts a container's
/// rootfs itself and hands the runtime a path, not the snapshot's mounts; a capture needs the
/// mounts (its changes and the image's layers as separate paths), so it is refused with that
/// reason, and the container runs on unharmed.
fn template_under_docker(v: ContainerdVersion) {
    let b = bed(v);
    let registry = Registry::start().expect("registry");
    let built = images::build(TestImage::Busybox, &BuildOptions::default()).expect("busybox");
    images::push(&built, &registry.host(), "hyperbox/busybox:latest").expect("push");
    let image = format!("{}/hyperbox/busybox:latest", registry.host());
    docker(&b, &["pull", "--quiet", &image]);
    assert!(!snapshots(&b).is_empty(), "the pull left no layer of ours");

    let store = b.containerd.template_root().join(b.docker.namespace());
    let id = docker(
        &b,
        &[
            "run",
            "-d",
            "--network",
            "none",
            "--runtime",
            HYPERBOX_RUNTIME,
            "--annotation",
            "io.hyperbox.template.capture=count",
            "--annotation",
            "io.hyperbox.template.ready-delay=300ms",
            &image,
            "sh",
            "-c",
            COUNTER,
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let reason = loop {
        if let Ok(reason) = fs::read_to_string(store.join(".count.error")) {
            break reason;
        }
        assert!(
            !store.join("count/template.json").exists(),
            "a template was kept: this test must now check restores under Docker"
        );
        assert!(
            Instant::now() < deadline,
            "no capture outcome\n{}",
            b.containerd.log_tail(30)
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("mounted the rootfs itself"), "{reason}");
    let pid = docker(&b, &["inspect", "--format", "{{.State.Pid}}", &id]);
    let n = counter(&pid);
    wait_until(
        Duration::from_secs(10),
        "the container to count on after the refusal",
        || counter(&pid) > n,
    );
    assert!(
        counter(&pid) > n,
        "the container stopped counting after the refusal"
    );
    assert_eq!(
        docker(&b, &["inspect", "--format", "{{.State.Status}}", &id]),
        "running"
    );
    docker(&b, &["rm", "-f", &id]);
}
per_version!(template, template_under_docker);

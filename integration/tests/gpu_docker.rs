//! Docker Engine 26 gets NVIDIA GPUs through the CDI spec `hyperbox-gpu-cdi` writes, as a user
//! asks for them: `docker run --device nvidia.com/gpu=…`, with CDI turned on by
//! `config/docker-daemon-cdi.json`.
//!
//! dockerd runs on a harness containerd 1.7 (the version `engines.rs` runs Docker on) with
//! `config/docker-daemon.json` (the `hyperbox` runtime) and `config/docker-daemon-cdi.json`
//! merged, plus a fragment of the test's own that points `cdi-spec-dirs` at the test's spec
//! directory alone (never the host's `/etc/cdi` or `/var/run/cdi`). The node is the fake
//! driver of `hyperbox_integration::gpu`; the generator writes the spec there and the node's
//! cache where the harness containerd's shims read it (`Containerd::gpu_cache`), so our shim
//! could inject GPUs on its own if it were asked to.
//!
//! Docker applies the spec's edits itself (device nodes and their device-cgroup rules,
//! read-only driver mounts, `NVIDIA_VISIBLE_DEVICES=void`, `hyperbox-gpu-hook ldcache` as a
//! `createContainer` hook) before the runtime sees the container. What each container sees is
//! checked from inside the debian image (it has `ldconfig`), positive and negative:
//! - Docker's default runtime (runc), `nvidia.com/gpu=0`: exactly the control nodes and
//!   nvidia0, the loader finds libcuda and NVML, read-only mounts, the device cgroup lets
//!   nvidia0 through and refuses 195:1;
//! - runc, `nvidia.com/gpu=all`: nvidia0 and nvidia1;
//! - our runtime (`--runtime hyperbox`), `nvidia.com/gpu=0`: the same, each driver file
//!   mounted once (the `void` in the edits keeps our shim from injecting again), even when
//!   the image or the user sets `NVIDIA_VISIBLE_DEVICES=all`; and, as a control that the
//!   shim's cache is live, `-e NVIDIA_VISIBLE_DEVICES=0` alone does make our shim inject;
//! - no `--device`: no nodes, no driver files;
//! - NVML is loaded once, by the generator, never on a container's start path.
//!
//! Needs root, Docker 26 and containerd 1.7 (`scripts/setup-host`), the workspace's binaries
//! (`cargo build --workspace --bins`; the fake NVML by `cargo build --workspace` or `-p
//! hyperbox-fake-nvml`) and `scripts/build-gpu-hook`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use containerd_client::events::ContainerCreate;
use hyperbox_integration::client::{EventStream, TestClient};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::docker::{config_file, Docker, HYPERBOX_RUNTIME};
use hyperbox_integration::gpu::{
    built_binary, describe_output, FakeDriver, FakeDriverSpec, GENERATOR, HOOK, LIB64_DIR,
};
use hyperbox_integration::images::TestImage;

/// The containerd version Docker runs on here (as in `engines.rs`).
const VERSION: ContainerdVersion = ContainerdVersion::V1_7;
/// Our shim's runtime name, which `--runtime hyperbox` leads to.
const RUNTIME: &str = "io.containerd.hyperbox.v1";
/// Docker's default runtime.
const RUNC: &str = "io.containerd.runc.v2";
/// The fake driver's version, the suffix of its libraries.
const DRIVER_VERSION: &str = "550.54.15";

/// What a container sees, one tagged line per fact: its `/dev/nvidia*` nodes (`ls -l`), the
/// loader's entries, the driver's libraries, nvidia-smi, its driver mounts (mount point and
/// per-mount options, one line per mount), its `NVIDIA_VISIBLE_DEVICES`, and what the device
/// cgroup lets through: opening a node the cgroup allows reaches the (absent) driver, ENXIO;
/// one it denies fails with EPERM. Docker's default capabilities include CAP_MKNOD, and its
/// default device rules allow `mknod` of any character device.
const PROBE: &str = r#"
ls -l /dev/nvidia* /dev/nvidia-caps 2>&1 | sed 's/^/dev: /'
ldconfig -p | grep -E 'nvidia|cuda' | sed 's/^[[:space:]]*/ld: /'
ls -l /usr/lib/x86_64-linux-gnu/libcuda* /usr/lib/x86_64-linux-gnu/libnvidia-ml* 2>&1 | sed 's/^/lib: /'
ls /usr/bin/nvidia-smi 2>&1 | sed 's/^/bin: /'
grep -E 'nvidia|cuda' /proc/self/mountinfo | awk '{print "mount: " $5 " " $6}'
echo "env: NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-unset}"
if [ -e /dev/nvidia0 ]; then echo "open nvidia0: $(cat /dev/nvidia0 2>&1 | head -1)"; fi
if mknod /tmp/n1 c 195 1; then echo "open 195:1: $(cat /tmp/n1 2>&1 | head -1)"; fi
echo "probe: done"
"#;

/// The device nodes of one GPU (sorted as `BTreeMap` keys are).
const GPU0_NODES: [&str; 4] = [
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia0",
    "/dev/nvidiactl",
];

/// dockerd on a containerd, the debian image loaded, and a client of containerd's events in
/// dockerd's namespace. Field order is drop order: dockerd goes before its containerd.
struct Bed {
    docker: Docker,
    containerd: Containerd,
    image: String,
    rt: tokio::runtime::Runtime,
    events: RefCell<EventStream>,
}

/// One probe's output, with the context a failure needs.
struct Seen<'a> {
    name: &'a str,
    out: String,
    bed: &'a Bed,
}

impl Bed {
    /// `docker run --rm --network none ARGS… IMAGE sh -c PROBE`; checks it exited 0 through
    /// `runtime` (the name containerd was asked for) and returns what it printed.
    fn probe<'a>(&'a self, name: &'a str, args: &[&str], runtime: &str) -> Seen<'a> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let cidfile = self
            .docker
            .dir()
            .join(format!("cid-{}", RUNS.fetch_add(1, Ordering::SeqCst)));
        let mut docker = self.docker.docker();
        docker.args(["run", "--rm", "--network", "none", "--cidfile"]);
        docker.arg(&cidfile);
        let out = docker
            .args(args)
            .args([self.image.as_str(), "sh", "-c", PROBE])
            .stdin(Stdio::null())
            .output()
            .expect("docker runs");
        let id = fs::read_to_string(&cidfile).unwrap_or_default();
        let _ = fs::remove_file(&cidfile);
        let seen = Seen {
            name,
            out: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            bed: self,
        };
        eprintln!("{name}:\n{}", seen.out);
        seen.check(
            out.status.success(),
            &format!("docker run: {}", describe_output(&out)),
        );
        let id = id.trim();
        seen.check(
            id.len() == 64,
            &format!("no container id from --cidfile: {id:?}"),
        );
        let created = self.created_with(id);
        seen.check(
            created == runtime,
            &format!("containerd was asked for runtime {created:?}, not {runtime:?}"),
        );
        seen
    }

    /// The runtime containerd was asked to create `id` with, from its `/containers/create`
    /// event in dockerd's namespace.
    fn created_with(&self, id: &str) -> String {
        let mut events = self.events.borrow_mut();
        loop {
            let seen = self
                .rt
                .block_on(events.until_topic("/containers/create", Duration::from_secs(30)))
                .expect("a /containers/create event");
            let created: ContainerCreate = seen
                .last()
                .and_then(|e| e.decode())
                .expect("ContainerCreate payload");
            if created.id == id {
                return created.runtime.map(|r| r.name).unwrap_or_default();
            }
        }
    }
}

impl Seen<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}: {what}\ncontainer output:\n{}\ndockerd log:\n{}\ncontainerd log:\n{}",
            self.name,
            self.out,
            self.bed.docker.log_tail(30),
            self.bed.containerd.log_tail(30)
        )
    }

    fn check(&self, ok: bool, what: &str) {
        if !ok {
            self.fail(what);
        }
    }

    fn has_line(&self, line: &str) -> bool {
        self.out.lines().any(|l| l.trim_end() == line)
    }

    fn tagged(&self, tag: &str) -> Vec<&str> {
        self.out
            .lines()
            .filter_map(|l| l.strip_prefix(tag))
            .collect()
    }

    /// The `/dev/nvidia*` character devices `ls -l` listed: path to (major, minor).
    fn nodes(&self) -> BTreeMap<String, (u32, u32)> {
        self.tagged("dev: ")
            .iter()
            .filter(|l| l.starts_with('c'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let major = f.get(4)?.trim_end_matches(',').parse().ok()?;
                let minor = f.get(5)?.parse().ok()?;
                Some((f.last()?.to_string(), (major, minor)))
            })
            .collect()
    }

    fn node_paths(&self) -> Vec<String> {
        self.nodes().into_keys().collect()
    }

    /// The driver mounts: (mount point, per-mount options), one per mount.
    fn mounts(&self) -> Vec<(String, String)> {
        self.tagged("mount: ")
            .iter()
            .filter_map(|l| {
                let (point, options) = l.split_once(' ')?;
                Some((point.to_owned(), options.to_owned()))
            })
            .collect()
    }

    /// Checks exactly `want` device nodes.
    fn check_nodes(&self, want: &[&str]) {
        self.check(
            self.node_paths() == want,
            &format!("the device nodes are not exactly {want:?}"),
        );
    }

    /// Checks what a GPU container sees beyond its GPU nodes: the control nodes, the loader's
    /// entries and SONAME links, nvidia-smi, driver mounts read-only and each once,
    /// `NVIDIA_VISIBLE_DEVICES=void`, nvidia0 through the device cgroup.
    fn check_driver_parts(&self) {
        let n = self.nodes();
        for (path, want) in [("/dev/nvidiactl", (195, 255)), ("/dev/nvidia0", (195, 0))] {
            self.check(
                n.get(path) == Some(&want),
                &format!("{path} is not the character device {want:?}: {n:?}"),
            );
        }
        self.check(
            self.has_line("dev: ls: cannot access '/dev/nvidia-caps': No such file or directory"),
            "/dev/nvidia-caps exists though no MIG device was asked for",
        );
        for lib in ["libcuda.so.1", "libnvidia-ml.so.1"] {
            let stem = lib.trim_end_matches(".1");
            let want = format!("ld: {lib} (libc6,x86-64) => /{LIB64_DIR}/{stem}.{DRIVER_VERSION}");
            self.check(self.has_line(&want), &format!("ldconfig -p lacks {want:?}"));
        }
        let libs = self.tagged("lib: ");
        self.check(
            libs.iter()
                .any(|l| l.ends_with(&format!("libcuda.so.1 -> libcuda.so.{DRIVER_VERSION}"))),
            "no libcuda.so.1 link to the driver's libcuda",
        );
        for stem in ["libcuda", "libnvidia-ml"] {
            self.check(
                libs.iter().any(|l| {
                    l.starts_with('-') && l.ends_with(&format!("{stem}.so.{DRIVER_VERSION}"))
                }),
                &format!("the driver's {stem} is not there as a file"),
            );
        }
        self.check(
            self.has_line("bin: /usr/bin/nvidia-smi"),
            "no /usr/bin/nvidia-smi",
        );
        let m = self.mounts();
        for point in [
            format!("/{LIB64_DIR}/libcuda.so.{DRIVER_VERSION}"),
            format!("/{LIB64_DIR}/libnvidia-ml.so.{DRIVER_VERSION}"),
            "/usr/bin/nvidia-smi".to_owned(),
        ] {
            self.check(
                m.iter().any(|(p, _)| *p == point),
                &format!("{point} is not a mount point"),
            );
        }
        self.check(m.len() >= 10, &format!("too few driver mounts: {m:?}"));
        let mut count: BTreeMap<&str, usize> = BTreeMap::new();
        for (point, _) in &m {
            *count.entry(point).or_default() += 1;
        }
        let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
        self.check(
            twice.is_empty(),
            &format!("driver files mounted more than once: {twice:?}"),
        );
        for (point, options) in &m {
            let options: Vec<&str> = options.split(',').collect();
            for want in ["ro", "nosuid", "nodev"] {
                self.check(
                    options.contains(&want),
                    &format!("{point} is mounted without {want}: {options:?}"),
                );
            }
        }
        self.check(
            self.has_line("env: NVIDIA_VISIBLE_DEVICES=void"),
            "NVIDIA_VISIBLE_DEVICES is not void",
        );
        self.check(
            self.has_line("open nvidia0: cat: /dev/nvidia0: No such device or address"),
            "the device cgroup does not let nvidia0 through",
        );
        self.check(self.has_line("probe: done"), "the probe did not finish");
    }

    /// GPU 0 alone: its nodes, the driver, and 195:1 (GPU 1) refused by the device cgroup.
    fn check_gpu0(&self) {
        self.check_nodes(&GPU0_NODES);
        self.check_driver_parts();
        self.check(
            self.has_line("open 195:1: cat: /tmp/n1: Operation not permitted"),
            "the device cgroup lets 195:1 (GPU 1, not asked for) through",
        );
    }

    /// No GPU and no driver file.
    fn check_nothing(&self) {
        self.check(self.nodes().is_empty(), "it has /dev/nvidia* nodes");
        for tag in ["ld: ", "mount: "] {
            self.check(
                self.tagged(tag).is_empty(),
                &format!("it has driver parts ({tag:?} lines)"),
            );
        }
        let libs = self.tagged("lib: ");
        self.check(
            libs.len() == 2 && libs.iter().all(|l| l.contains("No such file or directory")),
            "it has libcuda or NVML",
        );
        self.check(
            self.has_line(
                "bin: ls: cannot access '/usr/bin/nvidia-smi': No such file or directory",
            ),
            "it has nvidia-smi",
        );
        self.check(
            self.has_line("open 195:1: cat: /tmp/n1: Operation not permitted"),
            "the device cgroup lets 195:1 through",
        );
        self.check(self.has_line("probe: done"), "the probe did not finish");
    }
}

/// Docker with CDI on, runc and our runtime: exactly the GPUs `--device nvidia.com/gpu=…`
/// names, read-only driver files mounted once, a loader cache that finds them, the device
/// cgroup; nothing without `--device`; NVML never loaded by a container's start.
#[test]
fn docker_gets_gpus_through_cdi() {
    if !hyperbox_integration::selected_or_skip(VERSION) {
        return;
    }
    let started = Instant::now();
    built_binary(HOOK);
    built_binary(GENERATOR);
    let nvml = FakeDriver::fake_nvml_path().expect(
        "the fake NVML is built (cargo build --workspace, or cargo build -p hyperbox-fake-nvml)",
    );
    let containerd = Containerd::start(VERSION).expect("containerd");
    assert!(
        containerd.runtimes().iter().any(|r| r == RUNTIME),
        "{RUNTIME} is not registered: build containerd-shim-hyperbox-v1 first"
    );

    // The node, in the containerd's sandbox: the fake driver, its spec in the test's CDI
    // directory, the cache where this containerd's shims read it.
    let node = containerd.dir().join("gpu-node");
    let driver = FakeDriver::build(
        &node.join("driver"),
        &FakeDriverSpec::two_gpus_one_mig(),
        &nvml,
    )
    .expect("fake driver");
    let cdi_dir = node.join("cdi");
    let spec_path = cdi_dir.join("hyperbox-nvidia.json");
    let cache = containerd.gpu_cache();
    driver.generate(&spec_path, &cache);
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(&spec_path).unwrap()).expect("the spec is JSON");
    assert_eq!(spec["kind"], "nvidia.com/gpu");

    // dockerd: the runtimes, the user-facing CDI fragment, and the test's spec directory in
    // place of the host's.
    let fragment = node.join("daemon-cdi-dirs.json");
    fs::write(
        &fragment,
        serde_json::json!({ "cdi-spec-dirs": [&cdi_dir] }).to_string(),
    )
    .unwrap();
    let builder = Docker::builder()
        .with_daemon_json(config_file("docker-daemon-cdi.json"))
        .with_daemon_json(&fragment);
    let daemon_json = builder.daemon_json().expect("daemon.json");
    assert_eq!(daemon_json["features"]["cdi"], true, "{daemon_json}");
    assert_eq!(
        daemon_json["cdi-spec-dirs"],
        serde_json::json!([&cdi_dir]),
        "{daemon_json}"
    );
    let docker = builder.start(&containerd).expect("dockerd");
    let info = docker
        .docker_stdout(&["info", "--format", "{{json .CDISpecDirs}}"])
        .expect("docker info");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&info).ok(),
        Some(serde_json::json!([&cdi_dir])),
        "dockerd's CDI spec directories: {info}"
    );
    let image = docker.load_image(TestImage::Debian).expect("debian loaded");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = rt
        .block_on(TestClient::connect(containerd.socket(), docker.namespace()))
        .expect("client in dockerd's namespace");
    let events = rt
        .block_on(client.subscribe(&[r#"topic=="/containers/create""#]))
        .expect("subscribe");
    let bed = Bed {
        docker,
        containerd,
        image,
        rt,
        events: RefCell::new(events),
    };
    eprintln!("set up in {:.1} s", started.elapsed().as_secs_f64());

    // runc, GPU 0 alone.
    let seen = bed.probe(
        "runc, nvidia.com/gpu=0",
        &["--device", "nvidia.com/gpu=0"],
        RUNC,
    );
    seen.check_gpu0();

    // runc, every GPU.
    let seen = bed.probe(
        "runc, nvidia.com/gpu=all",
        &["--device", "nvidia.com/gpu=all"],
        RUNC,
    );
    seen.check_nodes(&[
        "/dev/nvidia-uvm",
        "/dev/nvidia-uvm-tools",
        "/dev/nvidia0",
        "/dev/nvidia1",
        "/dev/nvidiactl",
    ]);
    seen.check(
        seen.nodes().get("/dev/nvidia1") == Some(&(195, 1)),
        "/dev/nvidia1 is not 195:1",
    );
    seen.check_driver_parts();
    seen.check(
        seen.has_line("open 195:1: cat: /tmp/n1: No such device or address"),
        "the device cgroup does not let GPU 1 through",
    );

    // Our runtime, GPU 0 alone: Docker's edits, our shim adding nothing.
    let seen = bed.probe(
        "hyperbox, nvidia.com/gpu=0",
        &[
            "--runtime",
            HYPERBOX_RUNTIME,
            "--device",
            "nvidia.com/gpu=0",
        ],
        RUNTIME,
    );
    seen.check_gpu0();

    // Our runtime, GPU 0 asked for by CDI while the environment asks for every GPU (as the
    // CUDA images' `ENV NVIDIA_VISIBLE_DEVICES=all` does): the edits' `void` wins, GPU 0 alone.
    let seen = bed.probe(
        "hyperbox, nvidia.com/gpu=0 with NVIDIA_VISIBLE_DEVICES=all",
        &[
            "--runtime",
            HYPERBOX_RUNTIME,
            "--env",
            "NVIDIA_VISIBLE_DEVICES=all",
            "--device",
            "nvidia.com/gpu=0",
        ],
        RUNTIME,
    );
    seen.check_gpu0();

    // The control: without CDI, our shim does inject from the cache the spec's generator
    // wrote, so `void` above is what kept it from injecting twice.
    let seen = bed.probe(
        "hyperbox, NVIDIA_VISIBLE_DEVICES=0 without --device",
        &[
            "--runtime",
            HYPERBOX_RUNTIME,
            "--env",
            "NVIDIA_VISIBLE_DEVICES=0",
        ],
        RUNTIME,
    );
    seen.check_nodes(&GPU0_NODES);
    seen.check(
        seen.has_line("env: NVIDIA_VISIBLE_DEVICES=0"),
        "NVIDIA_VISIBLE_DEVICES changed",
    );
    seen.check(
        seen.has_line("open nvidia0: cat: /dev/nvidia0: No such device or address"),
        "our shim's device rule does not let nvidia0 through",
    );

    // No --device: no GPU, no driver, with either runtime.
    for (name, args, runtime) in [
        ("runc, no --device", &[][..], RUNC),
        (
            "hyperbox, no --device",
            &["--runtime", HYPERBOX_RUNTIME][..],
            RUNTIME,
        ),
    ] {
        let seen = bed.probe(name, args, runtime);
        seen.check_nothing();
        seen.check(
            seen.has_line("env: NVIDIA_VISIBLE_DEVICES=unset"),
            "NVIDIA_VISIBLE_DEVICES is set",
        );
    }

    // NVML: the generator's init, and no other.
    let inits = driver.nvml_inits();
    assert_eq!(inits.len(), 1, "NVML loaded on a start path: {inits:?}");
    assert!(inits[0].contains("hyperbox-gpu-cdi"), "{inits:?}");

    let Bed {
        mut docker,
        mut containerd,
        ..
    } = bed;
    docker
        .teardown()
        .expect("dockerd's teardown leaves nothing behind");
    drop(docker);
    containerd
        .teardown()
        .expect("containerd's teardown leaves nothing behind");
    eprintln!(
        "Docker through CDI checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

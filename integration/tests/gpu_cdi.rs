//! runc gets NVIDIA GPUs through the CDI spec `hyperbox-gpu-cdi` writes, via containerd's CRI
//! (1.7 with `enable_cdi`, 2.1 where CDI is on by default), as the kubelet asks for them: a
//! `cdi.k8s.io/*` annotation on the container's config naming `nvidia.com/gpu=…`.
//!
//! The node is the fake driver of `hyperbox_integration::gpu` (real libraries with SONAMEs,
//! binaries, a fake `/proc`, real device nodes under a fake `/dev` that the spec names as
//! `hostPath`s, and a fake NVML that logs each `nvmlInit`). The handler is `runc`
//! (`io.containerd.runc.v2`, not our shim): the spec alone gives the container its device
//! nodes (and the device cgroup its rules), the driver's files as read-only bind mounts,
//! `NVIDIA_VISIBLE_DEVICES=void`, and `hyperbox-gpu-hook ldcache` as a `createContainer`
//! hook that writes the loader's cache and SONAME links for them. What each container sees is
//! checked from inside, positive and negative: GPU 0 alone, `all`, and no annotation at all.
//! NVML is loaded once, by the generator, never on a container's start path.
//!
//! Needs root, crictl (see `cri_pods.rs`), the workspace's binaries (`cargo build --workspace
//! --bins`, which builds `hyperbox-gpu-cdi`; the fake NVML is built by `cargo build
//! --workspace` or `-p hyperbox-fake-nvml`) and `scripts/build-gpu-hook`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::cri::{self, CriBed};
use hyperbox_integration::cri_versions;
use hyperbox_integration::gpu::{
    built_binary, FakeDriver, FakeDriverSpec, GENERATOR, HOOK, LIB64_DIR,
};
use hyperbox_integration::images::{self, BuildOptions, TestImage};
use hyperbox_integration::sandbox::Sandbox;

/// The handler: runc's shim, which knows nothing of GPUs.
const HANDLER: &str = "runc";
/// The Kubernetes namespace of the test pods.
const POD_NAMESPACE: &str = "hyperbox-gpu-cdi";
/// The annotation a container asks for CDI devices with (any key under `cdi.k8s.io/`).
const CDI_ANNOTATION: &str = "cdi.k8s.io/gpu";
/// The fake driver's version, the suffix of its libraries.
const DRIVER_VERSION: &str = "550.54.15";

/// What a container sees, one tagged line per fact: its `/dev/nvidia*` nodes (`ls -l`), the
/// loader's entries, the libcuda files, nvidia-smi, its driver mounts, its
/// `NVIDIA_VISIBLE_DEVICES`, and what the device cgroup lets through: opening a node the
/// cgroup allows reaches the (absent) driver, ENXIO; one it denies fails with EPERM.
const PROBE: &str = r#"
ls -l /dev/nvidia* /dev/nvidia-caps 2>&1 | sed 's/^/dev: /'
ldconfig -p | grep -E 'nvidia|cuda' | sed 's/^[[:space:]]*/ld: /'
ls -l /usr/lib/x86_64-linux-gnu/libcuda* 2>&1 | sed 's/^/lib: /'
ls /usr/bin/nvidia-smi 2>&1 | sed 's/^/bin: /'
cat /proc/self/mountinfo | grep -E 'nvidia|cuda' | sed 's/^/mount: /'
echo "env: NVIDIA_VISIBLE_DEVICES=${NVIDIA_VISIBLE_DEVICES-unset}"
if [ -e /dev/nvidia0 ]; then echo "open nvidia0: $(cat /dev/nvidia0 2>&1 | head -1)"; fi
if mknod /tmp/n1 c 195 1; then echo "open 195:1: $(cat /tmp/n1 2>&1 | head -1)"; fi
echo "probe: done"
"#;

/// Creates and starts container `name` running [`PROBE`] in `image`, annotated with
/// `annotations`; returns its id.
fn start_probe(
    bed: &CriBed,
    dir: &Path,
    (pod, pod_config): (&str, &str),
    name: &str,
    image: &str,
    annotations: &[(&str, &str)],
) -> String {
    let config = dir.join(format!("{name}.json"));
    let annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    let json = serde_json::json!({
        "metadata": {"name": name},
        "image": {"image": image},
        "command": ["sh", "-c", PROBE],
        "annotations": annotations,
        "log_path": format!("{name}.log"),
        "linux": {},
    });
    fs::write(&config, json.to_string()).unwrap();
    let id = bed.crictl_ok(&["create", pod, config.to_str().unwrap(), pod_config]);
    bed.crictl_ok(&["start", &id]);
    id
}

/// Waits until container `id` has exited; returns its exit code and output (its CRI log).
fn wait_output(bed: &CriBed, id: &str) -> (i64, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inspect: serde_json::Value =
            serde_json::from_str(&bed.crictl_ok(&["inspect", id])).expect("inspect is JSON");
        let status = &inspect["status"];
        if status["state"] == "CONTAINER_EXITED" {
            let out = bed.crictl_output(&["logs", id]);
            let log = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status["exitCode"].as_i64().unwrap_or(-1), log);
        }
        assert!(
            Instant::now() < deadline,
            "container {id} still {} after 30 s\ncontainerd log:\n{}",
            status["state"],
            bed.containerd.log_tail(40)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The `/dev/nvidia*` character devices `ls -l` listed: path to (major, minor).
fn nodes(out: &str) -> BTreeMap<String, (u32, u32)> {
    out.lines()
        .filter_map(|l| l.strip_prefix("dev: "))
        .filter(|l| l.starts_with('c'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let major = f.get(4)?.trim_end_matches(',').parse().ok()?;
            let minor = f.get(5)?.parse().ok()?;
            Some((f.last()?.to_string(), (major, minor)))
        })
        .collect()
}

fn tagged<'a>(out: &'a str, tag: &str) -> Vec<&'a str> {
    out.lines().filter_map(|l| l.strip_prefix(tag)).collect()
}

/// The driver mounts of the container's mountinfo: (mount point, per-mount options).
fn mounts(out: &str) -> Vec<(String, String)> {
    tagged(out, "mount: ")
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(4)?.to_string(), f.get(5)?.to_string()))
        })
        .collect()
}

/// One probe's output, with the context a failure needs.
struct Seen<'a> {
    name: &'a str,
    out: String,
    bed: &'a CriBed,
}

impl Seen<'_> {
    fn fail(&self, what: &str) -> ! {
        panic!(
            "{}: {what}\ncontainer output:\n{}\ncontainerd log:\n{}",
            self.name,
            self.out,
            self.bed.containerd.log_tail(40)
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

    fn nodes(&self) -> Vec<String> {
        nodes(&self.out).into_keys().collect()
    }
}

/// Checks what a GPU container sees beyond its GPU nodes: the control nodes, the loader's
/// entries and SONAME links, nvidia-smi, read-only driver mounts, `NVIDIA_VISIBLE_DEVICES`.
fn check_driver_parts(seen: &Seen) {
    let n = nodes(&seen.out);
    for (path, want) in [("/dev/nvidiactl", (195, 255)), ("/dev/nvidia0", (195, 0))] {
        seen.check(
            n.get(path) == Some(&want),
            &format!("{path} is not the character device {want:?}: {n:?}"),
        );
    }
    seen.check(
        seen.out
            .contains("dev: ls: cannot access '/dev/nvidia-caps': No such file or directory"),
        "/dev/nvidia-caps exists though no MIG device was asked for",
    );
    for lib in ["libcuda.so.1", "libnvidia-ml.so.1"] {
        let stem = lib.trim_end_matches(".1");
        let want = format!("ld: {lib} (libc6,x86-64) => /{LIB64_DIR}/{stem}.{DRIVER_VERSION}");
        seen.check(seen.has_line(&want), &format!("ldconfig -p lacks {want:?}"));
    }
    seen.check(
        tagged(&seen.out, "lib: ")
            .iter()
            .any(|l| l.ends_with(&format!("libcuda.so.1 -> libcuda.so.{DRIVER_VERSION}"))),
        "no libcuda.so.1 link to the driver's libcuda",
    );
    seen.check(
        tagged(&seen.out, "lib: ")
            .iter()
            .any(|l| l.starts_with('-') && l.ends_with(&format!("libcuda.so.{DRIVER_VERSION}"))),
        "the driver's libcuda is not there as a file",
    );
    seen.check(
        seen.has_line("bin: /usr/bin/nvidia-smi"),
        "no /usr/bin/nvidia-smi",
    );
    let m = mounts(&seen.out);
    for point in [
        format!("/{LIB64_DIR}/libcuda.so.{DRIVER_VERSION}"),
        format!("/{LIB64_DIR}/libnvidia-ml.so.{DRIVER_VERSION}"),
        "/usr/bin/nvidia-smi".to_owned(),
    ] {
        seen.check(
            m.iter().any(|(p, _)| *p == point),
            &format!("{point} is not a mount point"),
        );
    }
    seen.check(m.len() >= 10, &format!("too few driver mounts: {m:?}"));
    for (point, options) in &m {
        let options: Vec<&str> = options.split(',').collect();
        for want in ["ro", "nosuid", "nodev"] {
            seen.check(
                options.contains(&want),
                &format!("{point} is mounted without {want}: {options:?}"),
            );
        }
    }
    seen.check(
        seen.has_line("env: NVIDIA_VISIBLE_DEVICES=void"),
        "NVIDIA_VISIBLE_DEVICES is not void",
    );
    seen.check(
        seen.has_line("open nvidia0: cat: /dev/nvidia0: No such device or address"),
        "the device cgroup does not let nvidia0 through",
    );
    seen.check(seen.has_line("probe: done"), "the probe did not finish");
}

/// runc, through containerd `v`'s CRI with CDI enabled, gets exactly the GPUs a container's
/// `cdi.k8s.io/` annotation names, with the driver's files read-only and a loader cache that
/// finds them; a container without the annotation gets nothing; NVML is never loaded by a
/// container's start.
fn runc_gets_gpus_through_cdi(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    assert!(
        cri::crictl_binary().is_file(),
        "{} is missing: run scripts/setup-host with HYPERBOX_THIRD_PARTY_SRC naming the folder \
         of {}",
        cri::crictl_binary().display(),
        cri::CRI_TOOLS_TARBALL
    );
    let started = Instant::now();
    built_binary(HOOK);
    built_binary(GENERATOR);
    let nvml = FakeDriver::fake_nvml_path().expect(
        "the fake NVML is built (cargo build --workspace, or cargo build -p hyperbox-fake-nvml)",
    );
    // The node's sandbox outlives the bed (dropped after it): the driver and spec first,
    // so the CRI finds the spec when it starts.
    let node = Sandbox::create("gpu-cdi").expect("sandbox");
    let dir = node.dir().to_path_buf();

    // The node: the fake driver, its spec in the CDI directory the CRI reads, the cache the
    // spec's hook reads in the test's own place.
    let driver = FakeDriver::build(
        &dir.join("driver"),
        &FakeDriverSpec::two_gpus_one_mig(),
        &nvml,
    )
    .expect("fake driver");
    let cdi_dir = dir.join("cdi");
    let spec_path = cdi_dir.join("hyperbox-nvidia.json");
    let cache = dir.join("node/gpu-cache.json");
    driver.generate(&spec_path, &cache);
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(&spec_path).unwrap()).expect("the spec is JSON");
    assert_eq!(spec["kind"], "nvidia.com/gpu");
    let bed = CriBed::start_with_cdi(v, &cdi_dir)
        .unwrap_or_else(|e| panic!("containerd {v} with CRI and CDI: {e}"));

    // The debian image (it has ldconfig), through the bed's registry.
    let built = images::build(
        TestImage::Debian,
        &BuildOptions::from_env().expect("build options"),
    )
    .expect("debian image");
    let repo_tag = "hyperbox/debian:latest";
    images::push(&built, &bed.registry.host(), repo_tag).expect("debian pushed");
    let image = bed.registry.reference(repo_tag);
    bed.crictl_ok(&["pull", &image]);

    let (pod, pod_config) = bed.run_pod(HANDLER, &dir, POD_NAMESPACE, "gpu-pod", &[]);
    let p = (pod.as_str(), pod_config.as_str());
    let gpu0 = start_probe(
        &bed,
        &dir,
        p,
        "gpu0",
        &image,
        &[(CDI_ANNOTATION, "nvidia.com/gpu=0")],
    );
    let all = start_probe(
        &bed,
        &dir,
        p,
        "all",
        &image,
        &[(CDI_ANNOTATION, "nvidia.com/gpu=all")],
    );
    let plain = start_probe(&bed, &dir, p, "plain", &image, &[]);
    // The pod's shim is runc's, not ours.
    let shims: Vec<String> = cri::shim_processes(bed.containerd.socket())
        .into_iter()
        .map(|s| s.binary)
        .collect();
    assert_eq!(shims, ["containerd-shim-runc-v2"], "the pod's shims");

    // GPU 0 alone.
    let (code, out) = wait_output(&bed, &gpu0);
    let seen = Seen {
        name: "nvidia.com/gpu=0",
        out,
        bed: &bed,
    };
    eprintln!("containerd {v}, {}:\n{}", seen.name, seen.out);
    seen.check(code == 0, &format!("exit code {code}"));
    seen.check(
        seen.nodes()
            == [
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/nvidiactl",
            ],
        "the device nodes are not exactly nvidiactl, nvidia-uvm, nvidia-uvm-tools, nvidia0",
    );
    check_driver_parts(&seen);
    seen.check(
        seen.has_line("open 195:1: cat: /tmp/n1: Operation not permitted"),
        "the device cgroup lets 195:1 (GPU 1, not asked for) through",
    );

    // Every GPU.
    let (code, out) = wait_output(&bed, &all);
    let seen = Seen {
        name: "nvidia.com/gpu=all",
        out,
        bed: &bed,
    };
    eprintln!("containerd {v}, {}:\n{}", seen.name, seen.out);
    seen.check(code == 0, &format!("exit code {code}"));
    seen.check(
        seen.nodes()
            == [
                "/dev/nvidia-uvm",
                "/dev/nvidia-uvm-tools",
                "/dev/nvidia0",
                "/dev/nvidia1",
                "/dev/nvidiactl",
            ],
        "the device nodes are not exactly the control nodes, nvidia0 and nvidia1",
    );
    seen.check(
        nodes(&seen.out).get("/dev/nvidia1") == Some(&(195, 1)),
        "/dev/nvidia1 is not 195:1",
    );
    check_driver_parts(&seen);
    seen.check(
        seen.has_line("open 195:1: cat: /tmp/n1: No such device or address"),
        "the device cgroup does not let GPU 1 through",
    );

    // No annotation: no GPU, no driver.
    let (code, out) = wait_output(&bed, &plain);
    let seen = Seen {
        name: "no annotation",
        out,
        bed: &bed,
    };
    eprintln!("containerd {v}, {}:\n{}", seen.name, seen.out);
    seen.check(code == 0, &format!("exit code {code}"));
    seen.check(seen.nodes().is_empty(), "it has /dev/nvidia* nodes");
    for tag in ["ld: ", "mount: "] {
        seen.check(
            tagged(&seen.out, tag).is_empty(),
            &format!("it has driver parts ({tag:?} lines)"),
        );
    }
    seen.check(
        tagged(&seen.out, "lib: ")
            .iter()
            .all(|l| l.contains("No such file or directory")),
        "it has libcuda",
    );
    seen.check(
        seen.has_line("env: NVIDIA_VISIBLE_DEVICES=unset"),
        "NVIDIA_VISIBLE_DEVICES is set",
    );
    seen.check(
        seen.has_line("open 195:1: cat: /tmp/n1: Operation not permitted"),
        "the device cgroup lets 195:1 through",
    );
    seen.check(seen.has_line("probe: done"), "the probe did not finish");

    // NVIDIA_REQUIRE_* hold in CDI mode too: the spec's hook refuses a container whose
    // requirement the node does not meet, naming it, and the container does not start.
    let config = dir.join("requires.json");
    let json = serde_json::json!({
        "metadata": {"name": "requires"},
        "image": {"image": image},
        "command": ["true"],
        "envs": [{"key": "NVIDIA_REQUIRE_CUDA", "value": "cuda>=13.0"}],
        "annotations": {CDI_ANNOTATION: "nvidia.com/gpu=0"},
        "log_path": "requires.log",
        "linux": {},
    });
    fs::write(&config, json.to_string()).unwrap();
    let id = bed.crictl_ok(&["create", p.0, config.to_str().unwrap(), p.1]);
    let out = bed.crictl_output(&["start", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cuda>=13.0"),
        "containerd {v}: a container requiring CUDA 13 on a 12.4 node: {}\n{err}",
        out.status
    );

    // NVML: the generator's init, and no other.
    let inits = driver.nvml_inits();
    assert_eq!(inits.len(), 1, "NVML loaded on a start path: {inits:?}");
    assert!(inits[0].contains("hyperbox-gpu-cdi"), "{inits:?}");

    bed.crictl_ok(&["stopp", &pod]);
    bed.crictl_ok(&["rmp", &pod]);
    bed.teardown().expect("teardown leaves nothing behind");
    eprintln!(
        "containerd {v}: runc through CDI checked in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

cri_versions!(runc_gets_gpus_through_cdi);

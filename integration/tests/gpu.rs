//! NVIDIA GPUs without a GPU: `hyperbox-gpu-cdi` and `hyperbox-gpu-hook` against a faithful
//! fake driver (`hyperbox_integration::gpu::FakeDriver`: real libraries with SONAMEs and a
//! real `ld.so.cache`, binaries, firmware, sockets, a fake `/proc`, real device nodes, and a
//! fake `libnvidia-ml.so.1` that the generator really `dlopen`s and that logs every
//! `nvmlInit`).
//!
//! - the generator: what it discovers, the CDI spec against CDI's JSON schema and a golden
//!   file, no driver, refresh;
//! - the hook binary: static, no dynamic section;
//! - through containerd with our shim: each form of `NVIDIA_VISIBLE_DEVICES` and
//!   `NVIDIA_DRIVER_CAPABILITIES` gives exactly its devices and files, the device cgroup lets
//!   exactly those through, `ldconfig -p` inside finds the libraries, and NVML is never
//!   loaded on the start path;
//! - the hook run directly in a private mount namespace: escapes tried and refused, bad input
//!   refused with nothing changed.
//!
//! runc through CDI (containerd's CRI) is `gpu_cdi.rs`. Needs root, the workspace's binaries
//! and `scripts/build-gpu-hook` (scripts/test does both).

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hyperbox_gpu::cache::NodeCache;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::gpu::{
    built_binary, describe_output, mig_ci_minor, mig_gi_minor, FakeDriver, FakeDriverSpec, HOOK,
};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Sandbox;
use hyperbox_integration::testbed::TestBed;

const RUNTIME: &str = "io.containerd.hyperbox.v1";

/// `hyperbox-gpu-cdi MODE` for `driver`, run to completion.
fn generate(driver: &FakeDriver, spec: &Path, cache: &Path, mode: &str) -> Output {
    let bin_dir = host::workspace_bin_dir().expect("the workspace's binaries");
    driver
        .generator_command(&bin_dir, mode, spec, cache)
        .output()
        .expect("hyperbox-gpu-cdi runs")
}

/// A fake driver in `dir/driver`, its spec and cache generated into `dir`.
struct Node {
    driver: FakeDriver,
    spec: PathBuf,
    cache: PathBuf,
}

fn node_in(dir: &Path, cache: PathBuf) -> Node {
    let nvml = FakeDriver::fake_nvml_path()
        .expect("the fake NVML is built (cargo build --workspace builds hyperbox-fake-nvml)");
    let driver = FakeDriver::build(
        &dir.join("driver"),
        &FakeDriverSpec::two_gpus_one_mig(),
        &nvml,
    )
    .expect("fake driver");
    let spec = dir.join("cdi/hyperbox-nvidia.json");
    let out = generate(&driver, &spec, &cache, "generate");
    assert!(out.status.success(), "generate: {}", describe_output(&out));
    Node {
        driver,
        spec,
        cache,
    }
}

/// The generator reads the fake driver through NVML, `/proc` and the driver root, and its
/// CDI spec validates against CDI's JSON schema and matches the golden file.
#[test]
fn generator_describes_the_driver() {
    let sandbox = Sandbox::create("gpu-gen").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache/cache.json"));
    let cache = NodeCache::read(&node.cache).expect("cache readable");
    let spec = FakeDriverSpec::two_gpus_one_mig();
    assert_eq!(cache.driver_version, "550.54.15");
    assert_eq!(cache.cuda_version, "12.4");
    let uuids: Vec<&str> = cache.gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert_eq!(
        uuids,
        [spec.gpus[0].uuid.as_str(), spec.gpus[1].uuid.as_str()]
    );
    assert_eq!(cache.gpus[0].bus_id, "00000000:3b:00.0");
    assert_eq!(
        (cache.gpus[1].node.major, cache.gpus[1].node.minor),
        (195, 1)
    );
    assert_eq!(cache.gpus[1].arch, "8.0");
    assert!(cache.gpus[0].mig.is_empty());
    let migs = &cache.gpus[1].mig;
    assert_eq!(migs.len(), 2);
    assert_eq!(migs[1].uuid, spec.gpus[1].mig.as_ref().unwrap()[1].uuid);
    let minors: Vec<u32> = migs[1].nodes.iter().map(|n| n.minor).collect();
    assert_eq!(minors, [mig_gi_minor(1, 2), mig_ci_minor(1, 2, 0)]);
    let paths: Vec<String> = cache
        .files
        .iter()
        .map(|f| f.container_path.display().to_string())
        .collect();
    for wanted in [
        "/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
        "/usr/lib/i386-linux-gnu/libcuda.so.550.54.15",
        "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15",
        "/usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.550.54.15",
        "/usr/bin/nvidia-smi",
        "/usr/bin/nvidia-cuda-mps-control",
        "/usr/lib/firmware/nvidia/550.54.15/gsp_ga10x.bin",
        "/usr/share/vulkan/icd.d/nvidia_icd.json",
        "/run/nvidia-persistenced/socket",
        "/tmp/nvidia-mps",
    ] {
        assert!(
            paths.iter().any(|p| p == wanted),
            "{wanted} not in {paths:#?}"
        );
    }
    // No development links, nothing outside the driver root.
    assert!(!paths.iter().any(|p| p.ends_with(".so")), "{paths:#?}");
    let root = fs::canonicalize(node.driver.driver_root()).unwrap();
    assert!(cache.files.iter().all(|f| f.host_path.starts_with(&root)));
    // One NVML initialisation: the generator's.
    let inits = node.driver.nvml_inits();
    assert_eq!(inits.len(), 1, "{inits:?}");
    assert!(inits[0].contains("hyperbox-gpu-cdi"), "{inits:?}");
    // The cache is root's alone.
    assert_eq!(fs::metadata(&node.cache).unwrap().mode() & 0o777, 0o600);

    // CDI's JSON schema (cdiVersion up to 0.8.0), as Debian ships it.
    let schema = host::prefix()
        .join("cdi-schema-0.8/usr/share/gocode/src/tags.cncf.io/container-device-interface/schema");
    assert!(
        schema.join("schema.json").is_file(),
        "{} missing: scripts/setup-host unpacks it",
        schema.display()
    );
    let check = |file: &Path| {
        Command::new("python3")
            .arg("-c")
            .arg(
                "import json, sys, pathlib, jsonschema\n\
                 d = pathlib.Path(sys.argv[1])\n\
                 schema = json.load(open(d / 'schema.json'))\n\
                 resolver = jsonschema.RefResolver(base_uri=d.as_uri() + '/', referrer=schema)\n\
                 jsonschema.validate(json.load(open(sys.argv[2])), schema, resolver=resolver)\n",
            )
            .arg(&schema)
            .arg(file)
            .output()
            .expect("python3 runs")
    };
    let out = check(&node.spec);
    assert!(
        out.status.success(),
        "spec fails CDI's schema: {}",
        describe_output(&out)
    );
    // The check can fail: a spec without its kind does not validate.
    let mut broken: serde_json::Value =
        serde_json::from_slice(&fs::read(&node.spec).unwrap()).unwrap();
    broken.as_object_mut().unwrap().remove("kind");
    let broken_path = dir.join("broken.json");
    fs::write(&broken_path, broken.to_string()).unwrap();
    assert!(
        !check(&broken_path).status.success(),
        "the schema check accepts anything"
    );

    // The golden spec, with the sandbox's paths replaced.
    let written = fs::read_to_string(&node.spec).unwrap();
    let driver_dir = fs::canonicalize(&node.driver.dir).unwrap();
    let normalised = written
        .replace(&driver_dir.display().to_string(), "@DRIVER@")
        .replace(&node.driver.dir.display().to_string(), "@DRIVER@")
        .replace(&built_binary(HOOK).display().to_string(), "@HOOK@")
        .replace(&node.cache.display().to_string(), "@CACHE@");
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gpu-cdi-spec.json");
    if std::env::var_os("HYPERBOX_UPDATE_GOLDEN").is_some() {
        fs::write(&golden_path, &normalised).unwrap();
    }
    let golden = fs::read_to_string(&golden_path).expect("golden file");
    assert_eq!(
        normalised,
        golden,
        "the spec differs from {}",
        golden_path.display()
    );
}

/// Without a driver, `generate` writes nothing and says so; `refresh` removes what an
/// earlier run wrote, and leaves an unchanged spec alone.
#[test]
fn no_driver_no_spec_and_refresh_removes_stale_ones() {
    let sandbox = Sandbox::create("gpu-nodrv").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache.json"));
    let out = generate(&node.driver, &node.spec, &node.cache, "refresh");
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unchanged"),
        "{}",
        describe_output(&out)
    );
    // The driver goes away.
    fs::remove_file(node.driver.proc_root().join("driver/nvidia/version")).unwrap();
    let other_spec = dir.join("other/spec.json");
    let other_cache = dir.join("other/cache.json");
    let out = generate(&node.driver, &other_spec, &other_cache, "generate");
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no NVIDIA driver loaded"),
        "{}",
        describe_output(&out)
    );
    assert!(!other_spec.exists() && !other_cache.exists());
    let out = generate(&node.driver, &node.spec, &node.cache, "refresh");
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        !node.spec.exists() && !node.cache.exists(),
        "stale spec or cache left"
    );
}

/// The hook is a static executable: no dynamic section, no interpreter, so no loader and no
/// `LD_PRELOAD` can reach it.
#[test]
fn hook_has_no_dynamic_section() {
    let out = Command::new("readelf")
        .args(["-d", "-l"])
        .arg(built_binary(HOOK))
        .output()
        .expect("readelf runs");
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(
        t.contains("There is no dynamic section in this file"),
        "{t}"
    );
    assert!(!t.contains("INTERP"), "{t}");
    // readelf can see a dynamic section: the shim has one.
    let out = Command::new("readelf")
        .arg("-d")
        .arg(built_binary("containerd-shim-hyperbox-v1"))
        .output()
        .expect("readelf runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains("NEEDED"));
}

// ---- Through containerd, with our shim ----

/// `ctr run --rm` through our shim with `env`, running `script` in `image`.
fn run_gpu(c: &Containerd, image: &str, id: &str, env: &[&str], script: &str) -> Output {
    let mut cmd = c.ctr();
    cmd.args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(c.dir().join("fifo"));
    for e in env {
        cmd.args(["--env", e]);
    }
    cmd.args([image, id, "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .expect("ctr runs")
}

/// What the container sees: device nodes, driver files, links, loader entries, mounts and
/// what its device cgroup lets through.
const PROBE: &str = r#"
for n in /dev/nvidia* /dev/nvidia-caps/*; do [ -c "$n" ] && echo "node $n $(stat -c '%t:%T' "$n")"; done
for f in /usr/lib/x86_64-linux-gnu/lib*nvidia* /usr/lib/x86_64-linux-gnu/libcuda* /usr/lib/i386-linux-gnu/lib* /usr/bin/nvidia-* /usr/lib/firmware/nvidia/*/* /run/nvidia-persistenced/socket /usr/share/vulkan/icd.d/nvidia_icd.json; do
  [ -e "$f" ] || [ -L "$f" ] || continue
  if [ -L "$f" ]; then echo "link $f -> $(readlink "$f")"; else echo "file $f"; fi
done
if command -v ldconfig >/dev/null; then ldconfig -p | grep -E 'nvidia|cuda' | sed 's/^[[:space:]]*/ld /'; fi
grep -E 'nvidia|cuda|gsp' /proc/self/mountinfo | awk '{print "mount " $5 " " $6}'
if [ -e /dev/nvidia0 ]; then echo "open nvidia0: $(cat /dev/nvidia0 2>&1 | head -1)"; fi
mknod /tmp/n1 c 195 1 2>/dev/null && echo "open 195:1: $(cat /tmp/n1 2>&1 | head -1)"
exit 0
"#;

fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

fn nodes_of(out: &str) -> Vec<String> {
    let mut v: Vec<String> = lines_with(out, "node ")
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// One GPU container through our shim on `v`: exactly GPU 0, the default capabilities'
/// files, the loader finds them, the device cgroup lets nvidia0 through and nothing else,
/// and NVML stays unloaded.
fn one_gpu(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    let image = bed.image(TestImage::Debian).expect("debian image");
    let node = node_in(&c.dir().join("gpu-node"), c.gpu_cache());
    let out = run_gpu(c, &image, "gpu0", &["NVIDIA_VISIBLE_DEVICES=0"], PROBE);
    assert!(
        out.status.success(),
        "{}\n{}",
        describe_output(&out),
        c.log_tail(30)
    );
    let o = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        nodes_of(&o),
        [
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools",
            "/dev/nvidia0",
            "/dev/nvidiactl"
        ],
        "{o}"
    );
    assert!(o.contains("node /dev/nvidia0 c3:0"), "{o}");
    // compute and utility: libcuda and NVML, nvidia-smi, firmware; no graphics, no 32-bit.
    for want in [
        "file /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
        "link /usr/lib/x86_64-linux-gnu/libcuda.so.1 -> libcuda.so.550.54.15",
        "file /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15",
        "file /usr/bin/nvidia-smi",
        "file /usr/lib/firmware/nvidia/550.54.15/gsp_ga10x.bin",
        "file /run/nvidia-persistenced/socket",
        "ld libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15",
        "ld libnvidia-ml.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.550.54.15",
    ] {
        assert!(o.lines().any(|l| l == want), "missing {want:?} in:\n{o}");
    }
    for absent in [
        "libGLX_nvidia",
        "i386-linux-gnu",
        "nvidia_icd",
        "libnvidia-encode",
    ] {
        assert!(
            !o.contains(absent),
            "{absent} injected without its capability:\n{o}"
        );
    }
    // Every driver mount is read-only.
    let mounts = lines_with(&o, "mount ");
    assert!(mounts.len() >= 5, "{o}");
    assert!(
        mounts
            .iter()
            .all(|m| m.contains(" ro,") || m.ends_with(" ro")),
        "{mounts:#?}"
    );
    // The device cgroup: the granted node reaches the (absent) driver, ENXIO; 195:1 is
    // refused by the cgroup itself.
    assert!(
        o.contains("open nvidia0: cat: /dev/nvidia0: No such device or address"),
        "{o}"
    );
    assert!(
        o.contains("open 195:1: cat: /tmp/n1: Operation not permitted"),
        "{o}"
    );
    // The image's own libraries are still in its loader cache.
    let out = run_gpu(
        c,
        &image,
        "gpu0-libc",
        &["NVIDIA_VISIBLE_DEVICES=0"],
        "ldconfig -p | grep -c 'libc.so.6 '",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1",
        "{}",
        describe_output(&out)
    );
    // NVML was loaded once, by the generator, never on a container's start path.
    assert_eq!(
        node.driver.nvml_inits().len(),
        1,
        "{:?}",
        node.driver.nvml_inits()
    );
}
per_version!(one_gpu_through_our_shim, one_gpu);

/// Every form of `NVIDIA_VISIBLE_DEVICES` and the capabilities, on containerd 1.7.
#[test]
fn every_request_form_through_our_shim() {
    let v = ContainerdVersion::V1_7;
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    let image = bed.image(TestImage::Debian).expect("debian image");
    let node = node_in(&c.dir().join("gpu-node"), c.gpu_cache());
    let spec = FakeDriverSpec::two_gpus_one_mig();
    let mig1 = spec.gpus[1].mig.as_ref().unwrap()[1].uuid.clone();
    let ctl = ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidiactl"];
    let with = |extra: &[&str]| {
        let mut v: Vec<String> = ctl.iter().chain(extra).map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let gi = format!("/dev/nvidia-caps/nvidia-cap{}", mig_gi_minor(1, 2));
    let ci = format!("/dev/nvidia-caps/nvidia-cap{}", mig_ci_minor(1, 2, 0));
    let cases: Vec<(String, Vec<String>)> = vec![
        ("all".into(), with(&["/dev/nvidia0", "/dev/nvidia1"])),
        ("none".into(), with(&[])),
        (spec.gpus[1].uuid.to_lowercase(), with(&["/dev/nvidia1"])),
        ("86:00.0".into(), with(&["/dev/nvidia1"])),
        ("0,1".into(), with(&["/dev/nvidia0", "/dev/nvidia1"])),
        ("1:1".into(), with(&["/dev/nvidia1", &gi, &ci])),
        (mig1, with(&["/dev/nvidia1", &gi, &ci])),
    ];
    for (i, (devices, expected)) in cases.iter().enumerate() {
        let env = format!("NVIDIA_VISIBLE_DEVICES={devices}");
        let out = run_gpu(c, &image, &format!("form{i}"), &[&env], PROBE);
        assert!(
            out.status.success(),
            "{env}: {}\n{}",
            describe_output(&out),
            c.log_tail(20)
        );
        let o = String::from_utf8_lossy(&out.stdout);
        assert_eq!(&nodes_of(&o), expected, "{env}:\n{o}");
        assert!(
            o.contains("ld libcuda.so.1 "),
            "{env}: driver files missing:\n{o}"
        );
    }
    // void, or no variable at all: nothing, and the container is untouched.
    for env in [vec!["NVIDIA_VISIBLE_DEVICES=void"], vec![]] {
        let out = run_gpu(c, &image, "void", &env, PROBE);
        assert!(out.status.success(), "{env:?}: {}", describe_output(&out));
        let o = String::from_utf8_lossy(&out.stdout);
        assert!(
            nodes_of(&o).is_empty() && !o.contains("nvidia") && !o.contains("cuda"),
            "{env:?}:\n{o}"
        );
    }
    // Capabilities pick the files: graphics+display without compute; compat32.
    let out = run_gpu(
        c,
        &image,
        "display",
        &[
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_DRIVER_CAPABILITIES=display",
        ],
        PROBE,
    );
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        nodes_of(&o).contains(&"/dev/nvidia-modeset".to_string()),
        "{o}"
    );
    assert!(
        o.contains("file /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.550.54.15"),
        "{o}"
    );
    assert!(
        o.contains("file /usr/share/vulkan/icd.d/nvidia_icd.json"),
        "{o}"
    );
    assert!(!o.contains("libcuda") && !o.contains("nvidia-smi"), "{o}");
    let out = run_gpu(
        c,
        &image,
        "compat32",
        &[
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_DRIVER_CAPABILITIES=compute,compat32",
        ],
        PROBE,
    );
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(
        o.contains("file /usr/lib/i386-linux-gnu/libcuda.so.550.54.15"),
        "{o}"
    );
    assert!(
        o.contains("ld libcuda.so.1 (libc6) => /usr/lib/i386-linux-gnu/libcuda.so.550.54.15"),
        "{o}"
    );
    assert!(
        !o.contains("libnvidia-ml"),
        "utility injected without asking:\n{o}"
    );
    // Refusals at Create, naming the reason: an unknown GPU, an unknown capability, a
    // requirement the node does not meet, MIG syntax on a GPU without MIG.
    for (env, reason) in [
        (vec!["NVIDIA_VISIBLE_DEVICES=7"], "GPU 7"),
        (
            vec![
                "NVIDIA_VISIBLE_DEVICES=0",
                "NVIDIA_DRIVER_CAPABILITIES=warp",
            ],
            "warp",
        ),
        (
            vec!["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=13.0"],
            "cuda>=13.0",
        ),
        (vec!["NVIDIA_VISIBLE_DEVICES=0:0"], "not in MIG mode"),
    ] {
        let out = run_gpu(c, &image, "refused", &env, "true");
        assert!(!out.status.success(), "{env:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{env:?}: {err}");
    }
    // cdi.k8s.io annotations come first: they name GPU 1, the variable GPU 0.
    let annotated = |id: &str, extra: &[&str], env: &[&str]| {
        let mut cmd = c.ctr();
        cmd.args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
            .arg(c.dir().join("fifo"))
            .args(extra);
        for e in env {
            cmd.args(["--env", e]);
        }
        cmd.args([&image, id, "sh", "-c", PROBE])
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    };
    let out = annotated(
        "annotated",
        &["--annotation", "cdi.k8s.io/gpu=nvidia.com/gpu=1"],
        &["NVIDIA_VISIBLE_DEVICES=0"],
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    let o = String::from_utf8_lossy(&out.stdout);
    assert_eq!(nodes_of(&o), with(&["/dev/nvidia1"]), "{o}");
    // A node that refuses the variable from unprivileged containers: the variable alone gets
    // nothing (the container runs without GPUs); an annotation, or a privileged container,
    // still gets them.
    fs::write(c.gpu_settings(), "accept_env_when_unprivileged = false\n").unwrap();
    let out = annotated("unprivileged", &[], &["NVIDIA_VISIBLE_DEVICES=0"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(nodes_of(&o).is_empty() && !o.contains("cuda"), "{o}");
    let out = annotated(
        "unprivileged-annotated",
        &["--annotation", "cdi.k8s.io/gpu=nvidia.com/gpu=0"],
        &[],
    );
    let o = String::from_utf8_lossy(&out.stdout);
    assert_eq!(nodes_of(&o), with(&["/dev/nvidia0"]), "{o}");
    let out = annotated(
        "privileged",
        &["--privileged", "--privileged-without-host-devices"],
        &["NVIDIA_VISIBLE_DEVICES=0"],
    );
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(nodes_of(&o).contains(&"/dev/nvidia0".to_string()), "{o}");
    fs::remove_file(c.gpu_settings()).unwrap();

    // Without the cache (a node without a driver): a GPU request fails naming it; void runs.
    fs::rename(&node.cache, node.cache.with_extension("away")).unwrap();
    let out = run_gpu(c, &image, "nodriver", &["NVIDIA_VISIBLE_DEVICES=0"], "true");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no NVIDIA driver on this node"), "{err}");
    let out = run_gpu(
        c,
        &image,
        "nodriver-void",
        &["NVIDIA_VISIBLE_DEVICES=void"],
        "true",
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        node.driver.nvml_inits().len(),
        1,
        "NVML loaded on a start path"
    );
}

// ---- The hook run directly, in a private mount namespace ----

/// A bundle for the hook: `config.json` with `env` and rootfs `rootfs`.
fn bundle(dir: &Path, env: &[&str]) -> PathBuf {
    let bundle = dir.join("bundle");
    fs::create_dir_all(bundle.join("rootfs/etc")).unwrap();
    fs::create_dir_all(bundle.join("rootfs/dev")).unwrap();
    let config = serde_json::json!({
        "ociVersion": "1.1.0",
        "root": {"path": "rootfs"},
        "process": {"env": env, "args": ["sh"], "cwd": "/"},
    });
    fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    bundle
}

/// Runs the hook as a runtime would, inside a private mount namespace, with `hook_env` in
/// the hook's environment (and nothing else's: the shell sets it for the hook alone);
/// afterwards lists the mounts under `watch` from inside that namespace.
fn run_hook(
    bundle: &Path,
    cache: &Path,
    args: &[&str],
    hook_env: &[(&str, &str)],
    watch: &Path,
) -> Output {
    let state = serde_json::json!({"ociVersion": "1.1.0", "id": "c", "status": "creating",
        "pid": std::process::id(), "bundle": bundle});
    let state_file = bundle.with_extension("state.json");
    fs::write(&state_file, state.to_string()).unwrap();
    let assignments: String = hook_env
        .iter()
        .map(|(k, _)| format!("{k}=\"${k}_FOR_HOOK\" "))
        .collect();
    let script = format!(
        "hook=$0 cache=$1 watch=$2 state=$3; shift 3; {assignments}\"$hook\" --cache \"$cache\" \"$@\" < \"$state\"; rc=$?; \
         grep -F \" $watch\" /proc/self/mountinfo | awk '{{print \"mounted \" $5}}'; exit $rc"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script])
        .arg(built_binary(HOOK))
        .arg(cache)
        .arg(watch)
        .arg(&state_file)
        .args(args);
    for (k, v) in hook_env {
        cmd.env(format!("{k}_FOR_HOOK"), v);
    }
    cmd.output().expect("unshare runs")
}

fn mounted(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("mounted ").map(str::to_string))
        .collect()
}

/// Plants something in a rootfs.
type Plant = Box<dyn Fn(&Path)>;

/// The hook on its own: it injects into a bare rootfs, and a link planted by the image
/// anywhere on a path it uses is refused, never followed.
#[test]
fn hook_refuses_planted_links() {
    let sandbox = Sandbox::create("gpu-hook").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache.json"));
    // A clean rootfs: it works (the positive case the refusals are measured against).
    let ok = dir.join("ok");
    let b = bundle(&ok, &["NVIDIA_VISIBLE_DEVICES=0"]);
    let out = run_hook(&b, &node.cache, &[], &[], &ok);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(
        mounted(&out)
            .iter()
            .any(|m| m.ends_with("/usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15")),
        "{}",
        describe_output(&out)
    );
    assert!(b
        .join("rootfs/dev/nvidia0")
        .metadata()
        .unwrap()
        .file_type()
        .is_char_device());
    let cache = b.join("rootfs/etc/ld.so.cache");
    let listed = Command::new("ldconfig")
        .arg("-p")
        .arg("-C")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout)
        .contains("libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"));

    // Links the image planted: to the host's /etc (absolute), up and out (relative), and at
    // the loader cache itself.
    let outside = dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("keep"), "host file").unwrap();
    let cases: Vec<(&str, Plant)> = vec![
        (
            "lib dir -> host dir",
            Box::new({
                let outside = outside.clone();
                move |root: &Path| {
                    fs::create_dir_all(root.join("usr/lib")).unwrap();
                    symlink(&outside, root.join("usr/lib/x86_64-linux-gnu")).unwrap();
                }
            }),
        ),
        (
            "usr -> ../../..",
            Box::new(|root: &Path| symlink("../../..", root.join("usr")).unwrap()),
        ),
        (
            "dev -> /tmp",
            Box::new(|root: &Path| {
                fs::remove_dir(root.join("dev")).unwrap();
                symlink("/tmp", root.join("dev")).unwrap();
            }),
        ),
        (
            "soname target is a link to the host",
            Box::new({
                let outside = outside.clone();
                move |root: &Path| {
                    fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu")).unwrap();
                    symlink(
                        outside.join("keep"),
                        root.join("usr/lib/x86_64-linux-gnu/libcuda.so.550.54.15"),
                    )
                    .unwrap();
                }
            }),
        ),
    ];
    for (i, (what, plant)) in cases.iter().enumerate() {
        let d = dir.join(format!("case{i}"));
        let b = bundle(&d, &["NVIDIA_VISIBLE_DEVICES=0"]);
        plant(&b.join("rootfs"));
        let out = run_hook(&b, &node.cache, &[], &[], &dir.join("outside"));
        assert!(
            !out.status.success(),
            "{what}: accepted\n{}",
            describe_output(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symbolic link"), "{what}: {err}");
        assert!(
            mounted(&out).is_empty(),
            "{what}: mounted outside the rootfs: {:?}",
            mounted(&out)
        );
        assert_eq!(
            fs::read_to_string(outside.join("keep")).unwrap(),
            "host file"
        );
        let entries: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            entries.len(),
            1,
            "{what}: the hook wrote outside the rootfs: {entries:?}"
        );
    }
    assert!(
        !Path::new("/tmp/nvidia0").exists(),
        "a device node was made in the host's /tmp"
    );
}

/// A path component swapped for a link while the hook runs, over and over: the hook either
/// succeeds inside the rootfs or refuses; it never mounts or writes outside it.
#[test]
fn hook_survives_a_swap_race() {
    let sandbox = Sandbox::create("gpu-race").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache.json"));
    let outside = dir.join("outside");
    fs::create_dir_all(&outside).unwrap();
    let b = bundle(&dir.join("r"), &["NVIDIA_VISIBLE_DEVICES=0"]);
    let lib = b.join("rootfs/usr/lib");
    fs::create_dir_all(lib.join("x86_64-linux-gnu")).unwrap();
    let real = lib.join("x86_64-linux-gnu");
    let parked = lib.join("parked");
    let link = lib.join("link");
    symlink(&outside, &link).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (real, parked, link) = (real.clone(), parked.clone(), link.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // real dir <-> link to the host, by renames.
                let _ = fs::rename(&real, &parked);
                let _ = fs::rename(&link, &real);
                let _ = fs::rename(&real, &link);
                let _ = fs::rename(&parked, &real);
                swaps += 1;
            }
            swaps
        })
    };
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..40 {
        let out = run_hook(&b, &node.cache, &[], &[], &outside);
        assert!(
            mounted(&out).is_empty(),
            "mounted outside: {}",
            describe_output(&out)
        );
        if out.status.success() {
            ok += 1;
        } else {
            refused += 1;
        }
        let entries: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            entries.is_empty(),
            "written outside the rootfs: {entries:?}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!("swap race: {ok} runs injected, {refused} refused, {swaps} swaps");
    assert!(swaps > 40, "the race did not run");
}

/// NVIDIAScape (CVE-2025-23266): an `LD_PRELOAD` from the image, even in the hook's own
/// environment, runs nothing in the (root) hook. The same preload does run in a dynamic
/// program, so the test can tell.
#[test]
fn hook_ignores_ld_preload() {
    let sandbox = Sandbox::create("gpu-preload").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache.json"));
    let marker = dir.join("preloaded");
    let src = dir.join("evil.c");
    fs::write(
        &src,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {{ FILE *f = fopen(\"{}\", \"a\"); if (f) {{ fputs(\"ran\\n\", f); fclose(f); }} }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let evil = dir.join("evil.so");
    let cc = Command::new("gcc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&evil)
        .arg(&src)
        .output()
        .expect("gcc runs");
    assert!(cc.status.success(), "{}", describe_output(&cc));
    let evil_s = evil.display().to_string();
    // The preload works on a dynamic program.
    Command::new("true")
        .env("LD_PRELOAD", &evil_s)
        .status()
        .unwrap();
    assert!(marker.exists(), "the preload library does not run anywhere");
    fs::remove_file(&marker).unwrap();
    let b = bundle(
        &dir.join("p"),
        &[
            "NVIDIA_VISIBLE_DEVICES=0",
            &format!("LD_PRELOAD={evil_s}"),
            "LD_LIBRARY_PATH=/evil",
        ],
    );
    let out = run_hook(
        &b,
        &node.cache,
        &[],
        &[
            ("LD_PRELOAD", evil_s.as_str()),
            ("LD_LIBRARY_PATH", "/evil"),
        ],
        &dir.join("nowhere"),
    );
    assert!(out.status.success(), "{}", describe_output(&out));
    assert!(!marker.exists(), "the image's LD_PRELOAD ran in the hook");
}

/// Bad input: malformed state, a missing bundle, a hostile or huge `config.json`, an unknown
/// device: a clear error, a non-zero exit, nothing mounted.
#[test]
fn hook_refuses_bad_input() {
    let sandbox = Sandbox::create("gpu-bad").expect("sandbox");
    let dir = sandbox.dir();
    let node = node_in(dir, dir.join("cache.json"));
    let hook = built_binary(HOOK);
    let feed = |stdin: &str, args: &[&str]| {
        let mut child = Command::new(&hook)
            .args(args)
            .arg("--cache")
            .arg(&node.cache)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
        child.wait_with_output().unwrap()
    };
    for (stdin, reason) in [
        ("", "OCI state"),
        ("{not json", "OCI state"),
        (r#"{"bundle": "relative/path"}"#, "absolute"),
        (r#"{"bundle": "/nonexistent/bundle"}"#, "config.json"),
    ] {
        let out = feed(stdin, &[]);
        assert!(!out.status.success(), "{stdin:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("hyperbox-gpu-hook: ") && err.contains(reason),
            "{stdin:?}: {err}"
        );
    }
    let out = feed("{}", &["--bogus"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("usage"),
        "{}",
        describe_output(&out)
    );

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "root up and out",
            serde_json::json!({"root": {"path": "../../../.."}, "process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}}),
            "root.path",
        ),
        (
            "root is the host's",
            serde_json::json!({"root": {"path": "/"}, "process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]}}),
            "root.path",
        ),
        (
            "unknown GPU",
            serde_json::json!({"root": {"path": "rootfs"}, "process": {"env": ["NVIDIA_VISIBLE_DEVICES=9"]}}),
            "GPU 9",
        ),
        (
            "absurd device list",
            serde_json::json!({"root": {"path": "rootfs"}, "process": {"env": ["NVIDIA_VISIBLE_DEVICES=0"]},
                "linux": {"devices": vec![serde_json::json!({"path": "/dev/../../etc/x", "type": "c", "major": 1, "minor": 1}); 200_000]}}),
            "larger than",
        ),
    ];
    for (what, config, reason) in cases {
        let d = dir.join(what.replace(|c: char| !c.is_ascii_alphanumeric(), "-"));
        let b = bundle(&d, &[]);
        fs::write(b.join("config.json"), config.to_string()).unwrap();
        let out = run_hook(&b, &node.cache, &[], &[], &d);
        assert!(
            !out.status.success(),
            "{what}: accepted\n{}",
            describe_output(&out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(reason), "{what}: {err}");
        assert!(mounted(&out).is_empty(), "{what}: {:?}", mounted(&out));
        assert!(
            !b.join("rootfs/dev/nvidia0").exists(),
            "{what}: a node was made"
        );
    }
}

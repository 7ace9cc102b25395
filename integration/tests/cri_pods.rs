//! Pods through containerd's CRI plugin (1.7 and 2.1), driven with `crictl` as the kubelet
//! drives the CRI: one shim per pod, for runc's shim and ours side by side in one daemon.
//!
//! runc's shim groups a pod's containers itself: its `start` reads the pod's sandbox id from
//! the bundle's `config.json` and, when that group's shim already listens, hands containerd
//! its address instead of starting another. Ours does the same (`shim-core/src/shim.rs`), so
//! a pod costs one shim and one zygote whatever its number of containers.
//!
//! Needs crictl (built with critest by `scripts/setup-host` from the cri-tools tarball in
//! `HYPERBOX_THIRD_PARTY_SRC`); without it these tests are ignored (reported as skipped),
//! except under CI (`CI=true`), where they must run.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::cri::{self, CriBed, ShimProcess};
use hyperbox_integration::cri_versions;
use hyperbox_integration::wasm_image::WasmImageBuilder;

const BUSYBOX: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";
/// Containers per pod, beside its sandbox.
const CONTAINERS: usize = 3;

/// Every process of a shim binary of this daemon (shims and our zygotes).
fn shim_processes(bed: &CriBed) -> Vec<ShimProcess> {
    cri::shim_processes(bed.containerd.socket())
}

/// Proportional set size of `pid` in KiB.
fn pss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What one pod left running, seen from the host.
#[derive(Debug)]
struct PodView {
    /// Shim processes: those whose parent is not a shim process too.
    shims: Vec<ShimProcess>,
    /// Processes a shim forked from itself (our zygote).
    helpers: Vec<ShimProcess>,
    /// PSS of all of them, KiB.
    pss_kib: u64,
}

fn pod_view(bed: &CriBed) -> PodView {
    let all = shim_processes(bed);
    let (helpers, shims): (Vec<_>, Vec<_>) = all
        .iter()
        .cloned()
        .partition(|p| all.iter().any(|q| q.pid == p.ppid));
    let pss_kib = all.iter().map(|p| pss_kib(p.pid)).sum();
    PodView {
        shims,
        helpers,
        pss_kib,
    }
}

/// Waits until `crictl ps` shows exactly `ids` running in `pod`.
fn wait_running(bed: &CriBed, pod: &str, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    loop {
        let out = bed.crictl_ok(&["ps", "-q", "--pod", pod, "--state", "Running"]);
        let mut running: Vec<&str> = out.lines().map(str::trim).collect();
        running.sort_unstable();
        if running == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pod {pod}: running {running:?}, expected {want:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a pod with `CONTAINERS` sleeping containers under `handler`, checks how many shims
/// serve it, stops one container and checks the others run on, then removes the pod and
/// checks its shim is gone. Returns the shims' (and helpers') PSS with the pod running, KiB.
fn pod_on_one_shim(bed: &CriBed, handler: &str, dir: &Path) -> u64 {
    let (pod, pod_config) = run_pod(bed, handler, dir, &format!("pod-{handler}"));
    let ids: Vec<String> = (0..CONTAINERS)
        .map(|n| {
            let name = format!("c{n}");
            let command = ["sleep", "1000"];
            run_container(bed, dir, &pod, &pod_config, &name, BUSYBOX, &command)
        })
        .collect();
    wait_running(bed, &pod, &ids);

    let view = pod_view(bed);
    let binary = format!(
        "containerd-shim-{}",
        if handler == "runc" {
            "runc-v2"
        } else {
            "hyperbox-v1"
        }
    );
    assert_eq!(
        view.shims.len(),
        1,
        "{handler}: a pod of {CONTAINERS} containers should have one shim: {view:#?}"
    );
    assert_eq!(view.shims[0].binary, binary, "{view:#?}");
    let helpers = if handler == "runc" { 0 } else { 1 };
    assert_eq!(
        view.helpers.len(),
        helpers,
        "{handler}: helper processes (our zygote) of the pod's shim: {view:#?}"
    );
    let shim = view.shims[0].pid;
    eprintln!(
        "{handler}: pod of {CONTAINERS} containers: {} shim ({}), {} helper, PSS {} KiB",
        view.shims.len(),
        shim,
        view.helpers.len(),
        view.pss_kib
    );

    // One container killed and removed: the others run on in the same shim.
    let (gone, rest) = ids.split_first().unwrap();
    bed.crictl_ok(&["stop", "--timeout", "0", gone]);
    bed.crictl_ok(&["rm", gone]);
    wait_running(bed, &pod, rest);
    let after = pod_view(bed);
    assert_eq!(
        after.shims.iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![shim],
        "{handler}: the pod's shim after one container went: {after:#?}"
    );

    // The pod removed: its shim (and zygote) exit.
    bed.crictl_ok(&["stopp", &pod]);
    bed.crictl_ok(&["rmp", &pod]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !shim_processes(bed).is_empty() {
        assert!(
            Instant::now() < deadline,
            "{handler}: shim processes left after the pod was removed: {:#?}",
            shim_processes(bed)
        );
        thread::sleep(Duration::from_millis(100));
    }
    view.pss_kib
}

fn one_shim_per_pod(v: ContainerdVersion) {
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
    let bed = CriBed::start(v).unwrap_or_else(|e| panic!("containerd {v} with CRI: {e}"));
    let dir = bed.containerd.dir().join("pods");
    fs::create_dir_all(&dir).unwrap();
    bed.crictl_ok(&["pull", BUSYBOX]);
    let mut pss = BTreeMap::new();
    for (handler, _) in cri::HANDLERS {
        pss.insert(*handler, pod_on_one_shim(&bed, handler, &dir));
    }
    let (runc, ours) = (pss["runc"], pss["hyperbox"]);
    eprintln!(
        "containerd {v}: shim-side PSS of a pod of {CONTAINERS} containers: runc.v2 {:.2} MiB, \
         hyperbox {:.2} MiB, ratio {:.2}",
        runc as f64 / 1024.0,
        ours as f64 / 1024.0,
        ours as f64 / runc.max(1) as f64
    );
    bed.teardown().expect("teardown leaves nothing behind");
}

cri_versions!(one_shim_per_pod);

/// The Kubernetes namespace of the test pods.
const POD_NAMESPACE: &str = "hyperbox-test";

/// Counts up in `/tmp/n`, ten times a second.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done";

/// Runs pod `name` under `handler` in [`POD_NAMESPACE`]; returns (pod id, config).
fn run_pod(bed: &CriBed, handler: &str, dir: &Path, name: &str) -> (String, String) {
    bed.run_pod(handler, dir, POD_NAMESPACE, name, &[])
}

/// Creates and starts container `name` from `image` in `pod`; returns its id.
fn run_container(
    bed: &CriBed,
    dir: &Path,
    pod: &str,
    pod_config: &str,
    name: &str,
    image: &str,
    command: &[&str],
) -> String {
    let config = dir.join(format!("{pod}-{name}.json"));
    let mut json = serde_json::json!({
        "metadata": {"name": name},
        "image": {"image": image},
        "log_path": format!("{name}.log"),
        "linux": {},
    });
    if !command.is_empty() {
        json["command"] = serde_json::json!(command);
    }
    fs::write(&config, json.to_string()).unwrap();
    let id = bed.crictl_ok(&["create", pod, config.to_str().unwrap(), pod_config]);
    bed.crictl_ok(&["start", &id]);
    id
}

/// The counter in container `id`, read through `crictl exec` (an empty read, between the
/// counter's truncate and write, is tried again).
fn counter(bed: &CriBed, id: &str) -> Option<u64> {
    (0..10).find_map(|_| {
        let out = bed.crictl_output(&["exec", id, "cat", "/tmp/n"]);
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    })
}

/// Waits until the counter of `id` passes `above`; returns it.
fn counter_passes(bed: &CriBed, id: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = counter(bed, id).filter(|n| *n > above) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter of {id} does not pass {above} (at {:?})\n{}",
            counter(bed, id),
            bed.containerd.log_tail(30)
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `crictl checkpoint --export` (the kubelet's checkpoint API) of a running counter, under
/// runc's shim and ours: the archive is written, the container runs on, and a container
/// created in a new pod from the archive (containerd 2.1's CRI restores one when a
/// container's image is a checkpoint archive) carries on counting from where it was.
fn checkpoint_through_cri(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = CriBed::start(v).unwrap_or_else(|e| panic!("containerd {v} with CRI: {e}"));
    let dir = bed.containerd.dir().join("checkpoints");
    fs::create_dir_all(&dir).unwrap();
    // The restore pulls the checkpoint's base image again, by digest, through containerd's
    // Go client with its default resolver: not through the CRI's registry mirrors, so not
    // under registry.k8s.io's name here (no network). The image is taken by the loopback
    // registry's own name, which that resolver reaches (plain HTTP on loopback).
    let busybox = format!("{}/e2e-test-images/busybox:1.29-2", bed.registry.host());
    bed.crictl_ok(&["pull", &busybox]);
    for (handler, _) in cri::HANDLERS {
        let (pod, pod_config) = run_pod(&bed, handler, &dir, &format!("ck-{handler}"));
        let id = run_container(
            &bed,
            &dir,
            &pod,
            &pod_config,
            "counter",
            &busybox,
            &["sh", "-c", COUNTER],
        );
        // Far enough that a counter started afresh would need seconds to get there.
        let before = counter_passes(&bed, &id, 30);
        let archive = dir.join(format!("{handler}.tar"));
        let started = Instant::now();
        bed.crictl_ok(&["checkpoint", "--export", archive.to_str().unwrap(), &id]);
        let took = started.elapsed();
        assert!(archive.is_file(), "{handler}: no archive at {archive:?}");
        let listing = std::process::Command::new("tar")
            .arg("-tf")
            .arg(&archive)
            .output()
            .expect("tar");
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.lines().any(|l| l.ends_with("inventory.img")),
            "{handler}: no CRIU images in the archive:\n{listing}"
        );
        // Left running, as the kubelet's checkpoint is.
        let now = counter_passes(&bed, &id, before);
        eprintln!(
            "{handler}: checkpoint of a running counter in {:.0} ms, {} KiB archive",
            took.as_secs_f64() * 1000.0,
            fs::metadata(&archive).map_or(0, |m| m.len() / 1024)
        );

        let (pod2, pod2_config) = run_pod(&bed, handler, &dir, &format!("ck-{handler}-restored"));
        let restored = run_container(
            &bed,
            &dir,
            &pod2,
            &pod2_config,
            "counter",
            archive.to_str().unwrap(),
            &[],
        );
        // Its first value already at or past the checkpoint's: restored, not started afresh.
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            if let Some(n) = counter(&bed, &restored) {
                break n;
            }
            assert!(
                Instant::now() < deadline,
                "{handler}: no counter in {restored}"
            );
            thread::sleep(Duration::from_millis(50));
        };
        assert!(
            first >= before && first <= now + 50,
            "{handler}: restored at {first}; checkpointed at {before}, the original at {now}"
        );
        counter_passes(&bed, &restored, first);
        let shims: Vec<String> = shim_processes(&bed).into_iter().map(|p| p.binary).collect();
        let want = if *handler == "runc" {
            "containerd-shim-runc-v2"
        } else {
            "containerd-shim-hyperbox-v1"
        };
        assert!(shims.iter().all(|s| s == want), "{handler}: {shims:?}");
        for p in [&pod, &pod2] {
            bed.crictl_ok(&["stopp", p]);
            bed.crictl_ok(&["rmp", p]);
        }
    }
    bed.teardown().expect("teardown leaves nothing behind");
}

#[test]
#[cfg_attr(
    any(hyperbox_critest_unavailable, hyperbox_containerd2_unavailable),
    ignore = "crictl or containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder \
              holding cri-tools-v1.34.0-src.tar.xz and containerd-2.1.9-src.tar.xz (CI sets it)"
)]
fn checkpoint_through_cri_on_containerd_2_1() {
    checkpoint_through_cri(ContainerdVersion::V2_1);
}

/// A WASI preview 1 guest that says hello on stdout, then sleeps (WASI `poll_oneoff` on a
/// 1000 s clock, in a loop) rather than exit or spin.
const WASM_HELLO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from a wasm guest\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 24))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store8 (i32.const 136) (i32.const 0))
    (i32.store (i32.const 144) (i32.const 1))
    (i64.store (i32.const 152) (i64.const 1000000000000))
    (loop $sleep
      (drop (call $poll (i32.const 128) (i32.const 256) (i32.const 1) (i32.const 320)))
      (br $sleep))))
"#;

/// A pod of the `hyperbox-wasm` RuntimeClass mixing a native container (busybox) and a
/// WebAssembly one (a `.wasm` in an ordinary image, run by wasmtime), as the wasm shim runs
/// both: both run, the guest's hello reaches its CRI log, and the pod has one shim.
fn wasm_and_native_in_one_pod(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = CriBed::start(v).unwrap_or_else(|e| panic!("containerd {v} with CRI: {e}"));
    let dir = bed.containerd.dir().join("mixed");
    fs::create_dir_all(&dir).unwrap();
    bed.crictl_ok(&["pull", BUSYBOX]);
    let guest = wat::parse_str(WASM_HELLO).expect("the guest assembles");
    let image = WasmImageBuilder::new()
        .with_architecture(hyperbox_integration::containerd::go_arch())
        .with_os("linux")
        .with_files(&[("/hello.wasm", &guest)])
        .expect("tar layer")
        .with_cmd(&["/hello.wasm"])
        .write(&dir.join("layout"))
        .expect("image layout");
    let reference = image
        .push(&bed.registry.host(), "hyperbox/wasm-hello:1")
        .expect("pushed");
    bed.crictl_ok(&["pull", &reference]);

    let (handler, _) = cri::WASM_HANDLER;
    let (pod, pod_config) = run_pod(&bed, handler, &dir, "mixed");
    let native = run_container(
        &bed,
        &dir,
        &pod,
        &pod_config,
        "native",
        BUSYBOX,
        &["sleep", "1000"],
    );
    let wasm = run_container(&bed, &dir, &pod, &pod_config, "wasm", &reference, &[]);
    wait_running(&bed, &pod, &[native.clone(), wasm.clone()]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = bed.crictl_output(&["logs", &wasm]);
        if String::from_utf8_lossy(&logs.stdout).contains("hello from a wasm guest") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no hello in the wasm container's log: {}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The native one is a real Linux process tree: busybox answers an exec.
    assert_eq!(
        bed.crictl_ok(&["exec", &native, "echo", "native"]),
        "native"
    );
    let view = pod_view(&bed);
    assert_eq!(view.shims.len(), 1, "{view:#?}");
    assert_eq!(
        view.shims[0].binary, "containerd-shim-hyperbox-wasm-v1",
        "{view:#?}"
    );
    bed.crictl_ok(&["stopp", &pod]);
    bed.crictl_ok(&["rmp", &pod]);
    bed.teardown().expect("teardown leaves nothing behind");
}

cri_versions!(wasm_and_native_in_one_pod);

/// A RuntimeClass handler whose runtime table names hyperbox-snapshotter
/// (`snapshotter = "hyperbox"`): an image pulled for that handler (the kubelet's
/// pod-scoped pull, `crictl pull --pod-config`) is unpacked into hyperbox, the pod's
/// containers get their root filesystems from it (containerd records the snapshotter), the
/// layers are converted to EROFS, and the container runs from them.
fn snapshotter_for_a_handler(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = CriBed::start_with_snapshotter(v)
        .unwrap_or_else(|e| panic!("containerd {v} with CRI and the snapshotter: {e}"));
    let dir = bed.containerd.dir().join("snap");
    fs::create_dir_all(&dir).unwrap();
    let handler = cri::SNAPSHOTTER_HANDLER;
    // The pod's config, with the handler annotated as the kubelet passes it for a pull.
    let config = dir.join("puller.json");
    let json = serde_json::json!({
        "metadata": {"name": "puller", "namespace": POD_NAMESPACE, "uid": "uid-puller"},
        "annotations": {"io.kubernetes.cri.runtime-handler": handler},
        "linux": {},
    });
    fs::write(&config, json.to_string()).unwrap();
    bed.crictl_ok(&["pull", "--pod-config", config.to_str().unwrap(), BUSYBOX]);
    let (pod, pod_config) = run_pod(&bed, handler, &dir, "erofs");
    let id = run_container(
        &bed,
        &dir,
        &pod,
        &pod_config,
        "c",
        BUSYBOX,
        &["sleep", "1000"],
    );
    wait_running(&bed, &pod, std::slice::from_ref(&id));
    assert_eq!(bed.crictl_ok(&["exec", &id, "echo", "up"]), "up");
    let info = bed
        .containerd
        .ctr_stdout(&["containers", "info", &id])
        .expect("ctr containers info");
    let record: serde_json::Value = serde_json::from_str(&info).expect("JSON");
    assert_eq!(record["Snapshotter"], "hyperbox", "{info}");
    // The image's layers, committed into hyperbox, are served from EROFS images.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listing = bed
            .containerd
            .ctr_stdout(&["snapshots", "--snapshotter", "hyperbox", "ls"])
            .expect("ctr snapshots ls");
        let committed = listing
            .lines()
            .filter(|l| l.trim_end().ends_with("Committed"))
            .count();
        let erofs = bed.snapshotter.as_ref().map_or(0, |s| s.image_ids().len());
        if committed > 0 && erofs >= committed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{committed} committed layers, {erofs} EROFS images:\n{listing}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    bed.crictl_ok(&["stopp", &pod]);
    bed.crictl_ok(&["rmp", &pod]);
    bed.teardown().expect("teardown leaves nothing behind");
}

cri_versions!(snapshotter_for_a_handler);

/// Templates driven by Pod annotations through CRI, as `config/templates-pods.yaml` writes
/// them: a pod annotated to capture its container `app` once `/ready` exists gives a
/// template of its pod namespace (the sandbox is never captured), and a pod annotated to
/// restore from it starts `app` from the template: its counter goes on from the captured
/// count instead of starting at 1.
fn templates_from_pod_annotations(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = CriBed::start(v).unwrap_or_else(|e| panic!("containerd {v} with CRI: {e}"));
    let dir = bed.containerd.dir().join("templates");
    fs::create_dir_all(&dir).unwrap();
    bed.crictl_ok(&["pull", BUSYBOX]);
    let (handler, _) = cri::HANDLERS[1];
    let counter_ready =
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; [ $i = 30 ] && touch /ready; sleep 0.1; done";
    let command = ["sh", "-c", counter_ready];
    let (capture_pod, capture_config) = bed.run_pod(
        handler,
        &dir,
        POD_NAMESPACE,
        "capture",
        &[
            ("io.hyperbox.template.capture", "counter"),
            ("io.hyperbox.template.ready-file", "/ready"),
            ("io.hyperbox.template.container", "app"),
        ],
    );
    let app = run_container(
        &bed,
        &dir,
        &capture_pod,
        &capture_config,
        "app",
        BUSYBOX,
        &command,
    );
    // Kept under the daemon's template root, in containerd namespace k8s.io, for the pod
    // namespace of the capturing pod.
    let store = bed
        .containerd
        .template_root()
        .join(bed.containerd.namespace())
        .join(format!(".pod.{POD_NAMESPACE}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !store.join("counter/template.json").is_file() {
        assert!(
            Instant::now() < deadline,
            "no template counter in {}\n{}",
            store.display(),
            bed.containerd.log_tail(30)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let kept: Vec<String> = fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(kept, ["counter"], "only app is captured, not the sandbox");
    // The captured container runs on.
    let captured = counter_passes(&bed, &app, 30);

    let (copy_pod, copy_config) = bed.run_pod(
        handler,
        &dir,
        POD_NAMESPACE,
        "copy",
        &[
            ("io.hyperbox.restore-from", "counter"),
            ("io.hyperbox.template.container", "app"),
        ],
    );
    let copy = run_container(
        &bed,
        &dir,
        &copy_pod,
        &copy_config,
        "app",
        BUSYBOX,
        &command,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(n) = counter(&bed, &copy) {
            break n;
        }
        assert!(Instant::now() < deadline, "no counter in the copy");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(
        (30..captured + 100).contains(&first),
        "the copy's counter starts at {first}: not from the template (captured at 30 or more)"
    );
    counter_passes(&bed, &copy, first);
    for pod in [&capture_pod, &copy_pod] {
        bed.crictl_ok(&["stopp", pod]);
        bed.crictl_ok(&["rmp", pod]);
    }
    bed.teardown().expect("teardown leaves nothing behind");
}

cri_versions!(templates_from_pod_annotations);

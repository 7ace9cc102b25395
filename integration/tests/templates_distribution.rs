//! Templates across nodes: `containerd-shim-hyperbox-v1 templates push` sends a template
//! captured on one node (the test bed's containerd) to the loopback registry as an OCI
//! artifact; a second node (a containerd of its own, with its own template store) pulls it
//! with `templates pull`, or when a container asks for it (`io.hyperbox.template.pull`), and
//! starts copies from it as from a local one, eagerly and lazily (`io.hyperbox.restore-lazy`,
//! CRIU's lazy pages: a checksum of the whole heap proves every page arrived). Refused, naming
//! why, and leaving nothing: a registry that is not the node's to pull from, a template whose
//! record names another kernel, a layer whose bytes do not match its digest, a container of
//! another image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::templates::{self, cli, store, wait_template};
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::workloads::{
    network_with_loopback, py_heap_service, PY_HEAP_SUM, PY_SERVICE_GET,
};

const CAPTURE: &str = "io.hyperbox.template.capture";
const READY_FILE: &str = "io.hyperbox.template.ready-file";
const RESTORE_FROM: &str = "io.hyperbox.restore-from";
const PULL: &str = "io.hyperbox.template.pull";
const LAZY: &str = "io.hyperbox.restore-lazy";
/// The heap the service holds, in MiB: enough for lazy pages to matter, small enough for CI.
const HEAP_MIB: usize = 96;

/// Runs `cmd` through ours as `id`, in a network namespace of its own (loopback up).
fn run(
    c: &Containerd,
    image: &str,
    id: &str,
    annotations: &[(&str, &str)],
    cmd: &[&str],
) -> Output {
    let net = network_with_loopback(&c.dir().join(format!("netns-{id}")))
        .unwrap_or_else(|e| panic!("{e}"));
    templates::run(c, image, id, Some(&net), annotations, cmd)
}

fn run_ok(c: &Containerd, image: &str, id: &str, annotations: &[(&str, &str)], cmd: &[&str]) {
    let net = network_with_loopback(&c.dir().join(format!("netns-{id}")))
        .unwrap_or_else(|e| panic!("{e}"));
    templates::run_ok(c, image, id, Some(&net), annotations, cmd)
}

/// A request from inside container `id`: the last line of the answer, if it starts so.
fn ask(
    c: &Containerd,
    id: &str,
    exec_id: &str,
    script: &str,
    starts: &str,
) -> Result<String, String> {
    let out = c
        .ctr()
        .args([
            "tasks",
            "exec",
            "--exec-id",
            exec_id,
            id,
            "bash",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("ctr exec");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.lines().last() {
        Some(body) if out.status.success() && body.starts_with(starts) => Ok(body.to_string()),
        _ => Err(format!(
            "no answer from {id} ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

/// `sum now=N sha=S`: N == S.
fn assert_whole(answer: &str) {
    let fields: Vec<&str> = answer.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{answer}");
    assert_eq!(
        fields[1].trim_start_matches("now="),
        fields[2].trim_start_matches("sha="),
        "the heap is not what it was at capture: {answer}"
    );
}

fn tasks(c: &Containerd) -> String {
    c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls")
}

fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while tasks(c)
        .lines()
        .any(|l| l.starts_with(&format!("{id} ")) && !l.contains("STOPPED"))
    {
        assert!(Instant::now() < deadline, "{id} does not stop");
        thread::sleep(Duration::from_millis(50));
    }
    let _ = c.ctr_run(&["tasks", "rm", id]);
    let _ = c.ctr_run(&["containers", "rm", id]);
}

fn templates_ok(c: &Containerd, args: &[&str]) -> String {
    let out = cli(c, args);
    assert!(
        out.status.success(),
        "templates {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn templates_err(c: &Containerd, args: &[&str]) -> String {
    let out = cli(c, args);
    assert!(!out.status.success(), "templates {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Nothing staged is left in `c`'s store, and no template `name`.
fn nothing_left(c: &Containerd, name: &str) {
    let left: Vec<String> = fs::read_dir(store(c))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pull-") || n == name)
        .collect();
    assert!(left.is_empty(), "left in the store: {left:?}");
}

/// The file of blob `digest` in the registry's storage.
fn registry_blob(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

fn across_nodes(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::DebianPython).expect("python image");
    let busybox = bed.image(TestImage::Busybox).expect("busybox");
    let a = &bed.containerd;
    let service = py_heap_service(HEAP_MIB);
    let cmd = ["python3", "-c", service.as_str()];

    // Node A captures the service once its heap is filled.
    run_ok(
        a,
        &image,
        "tpl",
        &[(CAPTURE, "heap"), (READY_FILE, "/ready")],
        &cmd,
    );
    let kept = wait_template(a, "heap", Duration::from_secs(120));
    assert!(
        kept.join("images/cpuinfo.img").is_file(),
        "the CPU is recorded"
    );
    let original = ask(a, "tpl", "q0", PY_SERVICE_GET, "heap ").expect("the service answers");

    // Push it.
    let reference = bed.registry.reference("templates/heap:v1");
    let said = templates_ok(a, &["push", "heap", &reference]);
    assert!(said.contains("@sha256:"), "{said}");
    let digest = said
        .split('@')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("a digest")
        .to_string();

    // Node B: a containerd of its own, its own template store, the same image from the
    // registry.
    let b = Containerd::builder(v).start().expect("a second containerd");
    b.pull(&image).expect("node B pulls the image");
    b.pull(&busybox).expect("node B pulls busybox");
    let pinned = format!("{reference}@{digest}");
    let said = templates_ok(&b, &["pull", &pinned]);
    assert!(said.contains("pulled template heap"), "{said}");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(store(&b).join("heap/template.json")).unwrap()).unwrap();
    assert_eq!(record["namespace"], b.namespace(), "the puller's");
    assert_eq!(record["source"]["reference"], pinned.as_str());
    assert_eq!(record["source"]["digest"], digest.as_str());
    let listing = templates_ok(&b, &["list"]);
    assert!(listing.contains("heap"), "{listing}");
    // A second pull of the same name is refused; the template stays.
    let why = templates_err(&b, &["pull", &pinned]);
    assert!(why.contains("exists"), "{why}");

    // Copies on node B: eager, then lazy; each is the captured service, its heap whole.
    run_ok(&b, &image, "eager", &[(RESTORE_FROM, "heap")], &cmd);
    let answer = ask(&b, "eager", "q1", PY_SERVICE_GET, "heap ").expect("eager copy answers");
    assert_eq!(
        answer, original,
        "the eager copy is not the captured service"
    );
    assert_whole(&ask(&b, "eager", "q2", PY_HEAP_SUM, "sum ").expect("sum"));
    run_ok(
        &b,
        &image,
        "lazy",
        &[(RESTORE_FROM, "heap"), (LAZY, "true")],
        &cmd,
    );
    let answer = ask(&b, "lazy", "q1", PY_SERVICE_GET, "heap ").expect("lazy copy answers");
    assert_eq!(
        answer, original,
        "the lazy copy is not the captured service"
    );
    assert_whole(&ask(&b, "lazy", "q2", PY_HEAP_SUM, "sum ").expect("sum"));
    // Its memory came through CRIU's lazy-pages daemon, which moved every page.
    let log = b
        .dir()
        .join("state/io.containerd.runtime.v2.task")
        .join(b.namespace())
        .join("lazy/criu-work/lazy-pages.log");
    let log = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    let moved = log
        .lines()
        .find(|l| l.contains("UFFD transferred pages"))
        .unwrap_or_else(|| panic!("the daemon did not finish: {log}"));
    let (done, all) = moved
        .rsplit_once('(')
        .and_then(|(_, n)| n.trim_end_matches(')').split_once('/'))
        .expect("done/all");
    assert_eq!(done, all, "{moved}");
    remove(&b, "eager");
    remove(&b, "lazy");

    // Pull on first use: refused until the node's settings name the registry.
    let first_use = [(RESTORE_FROM, "heap2"), (PULL, reference.as_str())];
    let out = run(&b, &image, "unlisted", &first_use, &cmd);
    assert!(!out.status.success(), "pulled from a registry not listed");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("pull_from"), "{why}");
    remove(&b, "unlisted");
    nothing_left(&b, "heap2");
    let prefix = format!("{}/templates/", bed.registry.host());
    fs::write(
        b.template_settings(),
        format!("pull_from = [\"{prefix}\"]\n"),
    )
    .unwrap();
    run_ok(&b, &image, "first", &first_use, &cmd);
    let answer = ask(&b, "first", "q1", PY_SERVICE_GET, "heap ").expect("first-use copy answers");
    assert_eq!(answer, original);
    assert!(store(&b).join("heap2/template.json").is_file());
    remove(&b, "first");
    // A container of another image does not get it.
    let other = [(RESTORE_FROM, "heap3"), (PULL, reference.as_str())];
    let out = run(&b, &busybox, "other", &other, &["sleep", "100"]);
    assert!(
        !out.status.success(),
        "a busybox container restored a python template"
    );
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("captured from image"), "{why}");
    remove(&b, "other");
    nothing_left(&b, "heap3");

    // A template whose record names another kernel: pushed from node A, refused by node B.
    let copy = store(a).join("elsewhere");
    assert!(Command::new("cp")
        .args(["-a"])
        .arg(&kept)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let rec = copy.join("template.json");
    let mut value: serde_json::Value = serde_json::from_slice(&fs::read(&rec).unwrap()).unwrap();
    value["name"] = "elsewhere".into();
    value["kernel"] = "0.0.0-elsewhere".into();
    fs::write(&rec, serde_json::to_vec(&value).unwrap()).unwrap();
    let other_kernel = bed.registry.reference("templates/elsewhere:v1");
    templates_ok(a, &["push", "elsewhere", &other_kernel]);
    let why = templates_err(&b, &["pull", &other_kernel]);
    assert!(why.contains("kernel 0.0.0-elsewhere"), "{why}");
    nothing_left(&b, "elsewhere");

    // A layer whose bytes are not those of its digest (the registry's storage spoiled).
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(registry_blob(&bed.registry.dir().join("data"), &digest)).unwrap(),
    )
    .unwrap();
    let layer = manifest["layers"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = registry_blob(&bed.registry.dir().join("data"), &layer);
    let mut bytes = fs::read(&blob).unwrap();
    bytes[600] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let why = templates_err(&b, &["pull", &pinned, "spoiled"]);
    assert!(why.to_lowercase().contains("digest"), "{why}");
    nothing_left(&b, "spoiled");

    // Nothing of the refused containers is left running.
    let left = tasks(&b);
    assert_eq!(left.lines().count(), 1, "tasks left on node B: {left}");
    remove(a, "tpl");
}
per_version!(across_nodes_v, across_nodes);

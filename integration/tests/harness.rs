//! The harness itself: a private containerd of each version runs a busybox container through
//! `io.containerd.runc.v2` from an image pulled from the loopback registry, and teardown leaves
//! no process, mount, cgroup, socket or directory behind: after a normal end, after the owner
//! panics, and after the owner is killed with SIGKILL.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::testbed::TestBed;

/// Runs a container to completion with `ctr run --rm` and returns (exit code, stdout).
fn ctr_run_rm(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> (Option<i32>, String) {
    let fifo = c.dir().join("fifo");
    let out = c
        .ctr()
        .args(["run", "--rm", "--fifo-dir"])
        .arg(&fifo)
        .arg(image)
        .arg(id)
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("ctr runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Starts a detached container sleeping for a long time and returns its task pid.
fn start_sleeper(c: &Containerd, image: &str, id: &str) -> u32 {
    c.ctr_run(&["run", "-d", "--null-io", image, id, "sleep", "1000"])
        .expect("detached run");
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    let line = tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .unwrap_or_else(|| panic!("task {id} not listed:\n{tasks}"));
    assert!(line.contains("RUNNING"), "{line}");
    line.split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("task pid")
}

fn assert_footprint_is_real(fp: &Footprint, sleeper: u32) {
    assert!(
        fp.processes.iter().any(|p| p.pid == sleeper),
        "the sleeper {sleeper} is not in the footprint: {fp:#?}"
    );
    assert!(
        fp.processes
            .iter()
            .any(|p| p.what.contains("containerd-shim-runc-v2")),
        "no shim in the footprint: {fp:#?}"
    );
    assert!(!fp.mounts.is_empty(), "no rootfs mount seen: {fp:#?}");
    assert!(!fp.cgroups.is_empty(), "no container cgroup seen: {fp:#?}");
    assert!(!fp.shim_sockets.is_empty(), "no shim socket: {fp:#?}");
    for s in &fp.shim_sockets {
        assert!(
            s.exists(),
            "computed shim socket {} does not exist",
            s.display()
        );
    }
}

fn runc_container_from_the_registry(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    assert!(image.starts_with("127.0.0.1:"), "{image}");
    let listed = bed.containerd.ctr_stdout(&["images", "ls", "-q"]).unwrap();
    assert!(listed.lines().any(|l| l == image), "{listed}");

    let (code, out) = ctr_run_rm(
        &bed.containerd,
        &image,
        "hello",
        &["sh", "-c", "echo hello from busybox; exit 3"],
    );
    assert_eq!(code, Some(3), "stdout: {out}");
    assert_eq!(out.trim(), "hello from busybox");

    let sleeper = start_sleeper(&bed.containerd, &image, "sleeper");
    let fp = Footprint::of(bed.containerd.dir()).expect("footprint");
    assert_footprint_is_real(&fp, sleeper);
    let registry_fp = Footprint::of(bed.registry.dir()).expect("registry footprint");
    assert!(!registry_fp.processes.is_empty(), "{registry_fp:#?}");

    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
    assert_eq!(registry_fp.leftovers(), Vec::<String>::new());
}
per_version!(runc_busybox, runc_container_from_the_registry);

fn restarted_daemon_keeps_containers(v: ContainerdVersion) {
    let mut bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let pid = start_sleeper(&bed.containerd, &image, "survivor");
    bed.containerd.restart().expect("restart");
    let tasks = bed.containerd.ctr_stdout(&["tasks", "ls"]).unwrap();
    assert!(
        tasks.contains("survivor") && tasks.contains(&pid.to_string()),
        "{tasks}"
    );
    let fp = Footprint::of(bed.containerd.dir()).unwrap();
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(restart, restarted_daemon_keeps_containers);

#[test]
fn missing_version_is_a_clear_error() {
    let err = hyperbox_integration::containerd::check_installed_at(
        ContainerdVersion::V1_7,
        Path::new("/nonexistent/containerd"),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("scripts/setup-host"), "{text}");
    assert!(text.contains("/nonexistent/containerd"), "{text}");
}

// --- owners that die -------------------------------------------------------------------

const REPORT_ENV: &str = "HYPERBOX_CHILD_REPORT";

/// What a child test reports before it dies: the footprints of its sandboxes.
fn write_report(bed: &TestBed, sleeper: u32) {
    let path = PathBuf::from(std::env::var(REPORT_ENV).expect("report path"));
    let fps = vec![
        Footprint::of(bed.containerd.dir()).unwrap(),
        Footprint::of(bed.registry.dir()).unwrap(),
    ];
    assert_footprint_is_real(&fps[0], sleeper);
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(&fps).unwrap()).unwrap();
    fs::rename(&tmp, &path).unwrap();
}

fn child_bed() -> (TestBed, u32) {
    let v = ContainerdVersion::selected()[0];
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let sleeper = start_sleeper(&bed.containerd, &image, "orphan");
    (bed, sleeper)
}

#[test]
#[ignore = "run as a child process by owner_that_panics_leaves_nothing"]
fn child_owner_panics() {
    let (bed, sleeper) = child_bed();
    write_report(&bed, sleeper);
    panic!("deliberate panic with a running container");
}

#[test]
#[ignore = "run as a child process by owner_killed_is_cleaned_by_the_guard"]
fn child_owner_waits_to_be_killed() {
    let (bed, sleeper) = child_bed();
    write_report(&bed, sleeper);
    thread::sleep(Duration::from_secs(600));
    drop(bed);
}

fn spawn_child(test: &str, report: &Path) -> std::process::Child {
    let _ = fs::remove_file(report);
    Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(REPORT_ENV, report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child test starts")
}

fn read_report(report: &Path, limit: Duration) -> Vec<Footprint> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(data) = fs::read(report) {
            let _ = fs::remove_file(report);
            return serde_json::from_slice(&data).expect("report parses");
        }
        assert!(Instant::now() < deadline, "child wrote no report");
        thread::sleep(Duration::from_millis(100));
    }
}

fn report_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hyperbox-{name}-{}.json", std::process::id()))
}

#[test]
fn owner_that_panics_leaves_nothing() {
    let report = report_path("panic");
    let status = spawn_child("child_owner_panics", &report)
        .wait()
        .expect("child ends");
    assert!(!status.success(), "the child test was meant to fail");
    let fps = read_report(&report, Duration::from_secs(1));
    for fp in fps {
        assert_eq!(fp.leftovers(), Vec::<String>::new(), "{}", fp.dir.display());
    }
}

#[test]
fn owner_killed_is_cleaned_by_the_guard() {
    let report = report_path("kill");
    let mut child = spawn_child("child_owner_waits_to_be_killed", &report);
    let fps = read_report(&report, Duration::from_secs(300));
    child.kill().expect("SIGKILL to the owner");
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for fp in fps {
        loop {
            let left = fp.leftovers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the guard left {left:?} of {}",
                fp.dir.display()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

fn debian_images_run(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let debian = bed.image(TestImage::Debian).expect("debian pulled");
    let (code, out) = ctr_run_rm(
        &bed.containerd,
        &debian,
        "deb",
        &[
            "sh",
            "-c",
            "cat /etc/debian_version; dpkg-query -W -f='${Version}' bash",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("12."), "{out}");

    let python = bed
        .image(TestImage::DebianPython)
        .expect("debian-python pulled");
    let (code, out) = ctr_run_rm(
        &bed.containerd,
        &python,
        "py",
        &[
            "python3",
            "-c",
            "import ssl, sqlite3, json; print(json.dumps(6 * 7))",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.trim(), "42");
    bed.teardown().expect("clean teardown");
}
per_version!(debian_images, debian_images_run);

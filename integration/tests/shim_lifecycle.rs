//! `containerd-shim-hyperbox-v1` under a real containerd of each version, driven with `ctr`
//! as a user drives it: exit codes and output, stdin, signals, `kill --all`, exec, and a
//! teardown that leaves nothing behind.
//!
//! The shim binary must be built first (`cargo build -p hyperbox-shim-youki`); the harness
//! registers it from the target directory as runtime `io.containerd.hyperbox.v1`.

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::client::TASK_LIFECYCLE_TOPICS;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::pty::{run_in_pty, run_in_pty_when};
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::testbed::TestBed;

const RUNTIME: &str = "io.containerd.hyperbox.v1";

/// A test bed with busybox pulled, after checking the shim is registered.
fn bed(v: ContainerdVersion) -> (TestBed, String) {
    let bed = TestBed::start(v).expect("test bed");
    assert!(
        bed.containerd.runtimes().iter().any(|r| r == RUNTIME),
        "{RUNTIME} is not registered: build containerd-shim-hyperbox-v1 first \
         (cargo build -p hyperbox-shim-youki)"
    );
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    (bed, image)
}

/// `ctr run --rm` through our runtime with `stdin` fed to the container; returns the output.
fn run_rm(c: &Containerd, image: &str, id: &str, stdin: Option<&[u8]>, cmd: &[&str]) -> Output {
    let fifo = c.dir().join("fifo");
    let mut ctr = c.ctr();
    ctr.args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(&fifo)
        .arg(image)
        .arg(id)
        .args(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = ctr.spawn().expect("ctr runs");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        w.write_all(data).unwrap();
        // ctr sends CloseIO when its stdin ends only once the task exists (before, it just
        // closes the FIFO, and the process's input never ends: runc's shim holds a write end
        // until CloseIO, and so does ours). End it once the task runs.
        let deadline = Instant::now() + Duration::from_secs(20);
        while task_line(c, id).is_none_or(|l| !l.contains("RUNNING")) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
    }
    c.wait_ctr(child, Duration::from_secs(60)).expect("ctr")
}

/// Starts `cmd` detached through our runtime and returns the task's pid.
fn run_detached(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> u32 {
    let mut args = vec!["run", "-d", "--null-io", "--runtime", RUNTIME, image, id];
    args.extend_from_slice(cmd);
    c.ctr_run(&args).expect("detached run");
    task_line(c, id)
        .and_then(|l| l.split_whitespace().nth(1).and_then(|p| p.parse().ok()))
        .expect("task pid")
}

/// The `ctr task ls` line of `id`.
fn task_line(c: &Containerd, id: &str) -> Option<String> {
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_string)
}

fn wait_stopped(c: &Containerd, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = task_line(c, id).unwrap_or_default();
        if line.contains("STOPPED") {
            return;
        }
        assert!(Instant::now() < deadline, "task {id} did not stop: {line}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `ctr run --rm CMD` through our runtime in the background, as a user's foreground
/// run, and waits until its task runs; returns ctr and the task's pid.
fn run_attached(c: &Containerd, image: &str, id: &str, cmd: &[&str]) -> (std::process::Child, u32) {
    let fifo = c.dir().join("fifo");
    let mut child = c
        .ctr()
        .args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(&fifo)
        .arg(image)
        .arg(id)
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = loop {
        let pid = task_line(c, id)
            .filter(|l| l.contains("RUNNING"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok());
        match pid {
            Some(pid) => break pid,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("ctr ends");
                panic!(
                    "task {id} never ran; ctr stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => thread::sleep(Duration::from_millis(20)),
        }
    };
    (child, pid)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn exit_code_and_output(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let out = run_rm(
        &bed.containerd,
        &image,
        "hi",
        None,
        &["sh", "-c", "echo hi; exit 3"],
    );
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        bed.containerd.log_tail(30)
    );
    assert_eq!(stdout(&out), "hi\n");
    assert!(
        task_line(&bed.containerd, "hi").is_none(),
        "--rm left the task behind"
    );
}
per_version!(exit_code, exit_code_and_output);

fn stdin_passes_through(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let out = run_rm(&bed.containerd, &image, "cat", Some(b"x\n"), &["cat"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "x\n");
}
per_version!(stdin, stdin_passes_through);

fn sigkill_gives_137(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;

    // Detached: the task stops and its process is gone.
    let pid = run_detached(c, &image, "victim", &["sleep", "1000"]);
    assert!(alive(pid), "task pid {pid} is not running");
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "victim"])
        .expect("kill");
    wait_stopped(c, "victim");
    assert!(!alive(pid));
    c.ctr_run(&["tasks", "rm", "victim"]).expect("task rm");
    c.ctr_run(&["containers", "rm", "victim"])
        .expect("container rm");

    // Attached: the waiting client gets 137.
    let (ctr, pid) = run_attached(c, &image, "victim2", &["sleep", "1000"]);
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "victim2"])
        .expect("kill");
    let out = c.wait_ctr(ctr, Duration::from_secs(30)).expect("ctr");
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!alive(pid));
}
per_version!(sigkill, sigkill_gives_137);

fn kill_all_ends_every_process(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let (ctr, _) = run_attached(
        c,
        &image,
        "family",
        &["sh", "-c", "sleep 1000 & sleep 1000 & wait"],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let pids: Vec<u32> = loop {
        let ps = c.ctr_stdout(&["tasks", "ps", "family"]).expect("tasks ps");
        let pids: Vec<u32> = ps
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        if pids.len() >= 3 {
            break pids;
        }
        assert!(Instant::now() < deadline, "expected 3 processes:\n{ps}");
        thread::sleep(Duration::from_millis(50));
    };
    c.ctr_run(&["tasks", "kill", "-a", "-s", "SIGKILL", "family"])
        .expect("kill -a");
    let out = c.wait_ctr(ctr, Duration::from_secs(30)).expect("ctr");
    assert_eq!(out.status.code(), Some(137));
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "survivors among {pids:?}");
        thread::sleep(Duration::from_millis(50));
    }
}
per_version!(kill_all, kill_all_ends_every_process);

fn exec_returns_its_exit_code(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    run_detached(c, &image, "host", &["sleep", "1000"]);
    let out = c
        .ctr()
        .args([
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "host",
            "sh",
            "-c",
            "echo in; exit 5",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("ctr exec");
    assert_eq!(
        out.status.code(),
        Some(5),
        "stderr: {}\nlog:\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(30)
    );
    assert_eq!(stdout(&out), "in\n");
}
per_version!(exec, exec_returns_its_exit_code);

fn teardown_leaves_nothing(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let pid = run_detached(c, &image, "stay", &["sleep", "1000"]);
    let state = Path::new("/run/hyperbox/youki").join(c.namespace());
    assert!(
        state.join("stay").is_dir(),
        "no state in {}",
        state.display()
    );
    let fp = Footprint::of(c.dir()).expect("footprint");
    assert!(fp.processes.iter().any(|p| p.pid == pid), "{fp:#?}");
    assert!(
        fp.processes
            .iter()
            .any(|p| p.what.contains("containerd-shim-hyperbox-v1")),
        "no shim in the footprint: {fp:#?}"
    );
    assert!(!fp.mounts.is_empty(), "no rootfs mount seen: {fp:#?}");
    assert!(!fp.cgroups.is_empty(), "no container cgroup seen: {fp:#?}");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
    assert!(!state.exists(), "state left in {}", state.display());
}
per_version!(teardown, teardown_leaves_nothing);

fn events_in_order(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = rt.block_on(c.client()).expect("client");
    // The subscription is live when subscribe returns: no event of the run can be missed.
    let mut events = rt
        .block_on(client.subscribe(&[r#"topic~="/tasks/""#]))
        .expect("subscribe");
    let out = run_rm(c, &image, "evented", None, &["true"]);
    assert_eq!(out.status.code(), Some(0));
    let seen = rt
        .block_on(events.until_topic("/tasks/delete", Duration::from_secs(30)))
        .expect("events");
    let topics: Vec<&str> = seen.iter().map(|e| e.topic.as_str()).collect();
    assert_eq!(topics, TASK_LIFECYCLE_TOPICS, "events:\n{seen:#?}");
}
per_version!(events, events_in_order);

/// Runs `ctr run --rm [--seccomp] --runtime RUNTIME IMAGE ID CMD...` and returns its output.
fn run_with(
    c: &hyperbox_integration::containerd::Containerd,
    runtime: &str,
    seccomp: bool,
    image: &str,
    id: &str,
    cmd: &[&str],
) -> std::process::Output {
    let mut ctr = c.ctr();
    ctr.args(["run", "--rm"]);
    if seccomp {
        ctr.arg("--seccomp");
    }
    ctr.args(["--runtime", runtime, "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args([image, id])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("ctr runs")
}

/// The spec's seccomp profile is enforced as runc enforces it: the same `/proc/self/status`
/// confinement lines through both runtimes, with and without `--seccomp`.
fn seccomp_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let status = "grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs|CapEff|CapBnd):' /proc/self/status";
    for seccomp in [false, true] {
        let mut seen = Vec::new();
        for (n, runtime) in ["io.containerd.runc.v2", RUNTIME].into_iter().enumerate() {
            let id = format!("sc-{}-{n}", u8::from(seccomp));
            let out = run_with(c, runtime, seccomp, &image, &id, &["sh", "-c", status]);
            assert!(
                out.status.success(),
                "{runtime}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            seen.push(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        assert_eq!(seen[0], seen[1], "runc vs hyperbox, --seccomp={seccomp}");
        let mode = if seccomp {
            "Seccomp:\t2"
        } else {
            "Seccomp:\t0"
        };
        assert!(seen[1].contains(mode), "{}", seen[1]);
    }
}
per_version!(seccomp, seccomp_as_runc);

/// A missing executable fails the run with a message naming it, as runc's does, and leaves
/// no process, mount, cgroup or state behind.
fn missing_executable_is_named(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let out = run_with(c, RUNTIME, false, &image, "nox", &["/no/such/binary"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran a missing binary: {stderr}");
    assert!(stderr.contains("/no/such/binary"), "{stderr}");
    assert!(task_line(c, "nox").is_none());
    let state = Path::new("/run/hyperbox/youki")
        .join(c.namespace())
        .join("nox");
    assert!(!state.exists(), "state left in {}", state.display());
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(missing_executable, missing_executable_is_named);

/// Under a pseudo-terminal, `ctr run -t` gives the container a terminal of its own: `tty`
/// names a pts, typed input reaches an interactive shell, `ctr task exec -t` gets one too, and
/// each returns its process's exit code, also when a background process keeps the terminal.
fn terminal_through_ctr(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fifo = c.dir().join("fifo");
    let limit = Duration::from_secs(60);

    let mut run = c.ctr();
    run.args(["run", "-t", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(&fifo)
        .args([&image, "tty1", "sh", "-c", "tty; stty size; exit 6"]);
    let out = run_in_pty(run, b"", limit).expect("ctr run -t");
    assert!(
        out.output.contains("/dev/pts/"),
        "{out:?}\nlog:\n{}",
        c.log_tail(30)
    );
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    // The terminal has a size from the start (ctr's first resize comes after Start).
    assert!(
        !out.output.contains("\n0 0"),
        "an unsized terminal: {out:?}"
    );

    let mut run = c.ctr();
    run.args(["run", "-t", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(&fifo)
        .args([&image, "tty2", "sh"]);
    // Typed at the prompt, as a user types.
    let out = run_in_pty_when(run, "# ", b"echo typed-$((6*7))\nexit 2\n", limit)
        .expect("interactive ctr run -t");
    assert!(out.output.contains("typed-42"), "{out:?}");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    run_detached(c, &image, "host", &["sleep", "1000"]);
    let mut exec = c.ctr();
    exec.args(["tasks", "exec", "-t", "--exec-id", "e1", "host"])
        .args(["sh", "-c", "tty; exit 9"]);
    let out = run_in_pty(exec, b"", limit).expect("ctr task exec -t");
    assert!(
        out.output.contains("/dev/pts/"),
        "{out:?}\nlog:\n{}",
        c.log_tail(30)
    );
    assert_eq!(out.status.code(), Some(9), "{out:?}");

    // A background process still holding the terminal does not keep the client waiting.
    let mut exec = c.ctr();
    exec.args(["tasks", "exec", "-t", "--exec-id", "e2", "host"])
        .args(["sh", "-c", "sleep 1000 & echo left; exit 4"]);
    let out = run_in_pty(exec, b"", limit).expect("ctr task exec -t with a background child");
    assert!(out.output.contains("left"), "{out:?}");
    assert_eq!(out.status.code(), Some(4), "{out:?}");
}
per_version!(terminal, terminal_through_ctr);

/// `HYPERBOX_TIMELINE` in containerd's environment: each process of a lifecycle marks its
/// steps, in order, in a root-only file (what `hyperbox-bench ctr-run --breakdown` reads).
fn timeline_names_every_step(v: ContainerdVersion) {
    use std::os::unix::fs::PermissionsExt;
    let dir =
        std::env::temp_dir().join(format!("hb-timeline-{}-{}", v.as_str(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("timeline.jsonl");
    let builder = Containerd::builder(v).with_env("HYPERBOX_TIMELINE", &file.to_string_lossy());
    let bed = TestBed::with_builder(builder).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    let out = run_rm(&bed.containerd, &image, "timed", None, &["true"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    drop(bed);
    let text = std::fs::read_to_string(&file).expect("timeline written");
    let mode = std::fs::metadata(&file)
        .expect("timeline")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the timeline is root-only");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a whole JSON line"))
        .collect();
    let steps: Vec<&str> = lines
        .iter()
        .filter(|l| l["id"] == "timed")
        .map(|l| l["step"].as_str().expect("step"))
        .collect();
    // Each process's steps in the order they happen; the processes' steps interleave.
    let must_follow = [
        ("start.main", "start.exit"),
        ("serve.main", "serve.listening"),
        ("create.begin", "zygote.create.begin"),
        ("zygote.create.begin", "zygote.rootfs_mounted"),
        ("zygote.rootfs_mounted", "init.ready"),
        ("init.ready", "zygote.create.end"),
        ("zygote.create.end", "create.end"),
        ("create.end", "start.begin"),
        ("start.begin", "init.exec"),
        ("init.exec", "exit.reaped"),
        ("exit.reaped", "exit.published"),
        ("exit.published", "delete.begin"),
        ("delete.begin", "zygote.delete.begin"),
        ("zygote.delete.end", "delete.end"),
        ("delete.end", "serve.exit"),
    ];
    let at = |step: &str| {
        steps
            .iter()
            .position(|s| *s == step)
            .unwrap_or_else(|| panic!("no {step} in {steps:?}"))
    };
    for (before, after) in must_follow {
        assert!(at(before) < at(after), "{before} after {after}: {steps:?}");
    }
    std::fs::remove_dir_all(&dir).expect("scratch dir removed");
}
per_version!(timeline, timeline_names_every_step);

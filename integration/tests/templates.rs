//! Templates of `containerd-shim-hyperbox-v1`, against the harness's containerd: a Python
//! service that takes about 2 s to warm up is captured as a template once it says it is ready
//! (`io.hyperbox.template.capture` with a ready file), and containers restored from it
//! (`io.hyperbox.restore-from`) answer at once, concurrently, each in its own network
//! namespace and root filesystem; `containerd-shim-hyperbox-v1 templates` lists, inspects and
//! removes templates; bad annotations, missing, damaged, foreign and spoiled templates, and
//! captures that cannot happen fail clearly and harm nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::templates::{
    cli as templates, run as run_in, run_ok as run_ok_in, store, wait_template,
};
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::wait_until;
use hyperbox_integration::workloads::{
    connect_in_network, get_in_network, network_with_loopback, remove_network, PY_SERVICE,
    PY_SERVICE_GET, PY_SERVICE_PORT,
};

const OURS: &str = "io.containerd.hyperbox.v1";
const CAPTURE: &str = "io.hyperbox.template.capture";
const READY_FILE: &str = "io.hyperbox.template.ready-file";
const READY_DELAY: &str = "io.hyperbox.template.ready-delay";
const TIMEOUT: &str = "io.hyperbox.template.timeout";
const RESTORE_FROM: &str = "io.hyperbox.restore-from";

/// Listens on 127.0.0.1:8000 and never accepts: a connection stays in its queue.
const NEVER_ACCEPTS: &str = "import socket, time\ns = socket.socket()\ns.bind(('127.0.0.1', 8000))\ns.listen(8)\ntime.sleep(100000)\n";

/// Counts up, writing each value to /tmp/n.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done";

fn network(c: &Containerd, name: &str) -> PathBuf {
    network_with_loopback(&c.dir().join(format!("netns-{name}"))).unwrap_or_else(|e| panic!("{e}"))
}

fn task(c: &Containerd, id: &str) -> Option<(u32, String)> {
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    tasks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
    })
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while task(c, id).map(|t| t.1).unwrap_or_default() != want {
        assert!(
            Instant::now() < deadline,
            "task {id} is not {want}\n{}",
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `ctr task exec --exec-id EXEC_ID ID SHELL -c SCRIPT`.
fn exec_in(c: &Containerd, id: &str, exec_id: &str, shell: &str, script: &str) -> Output {
    c.ctr()
        .args([
            "tasks",
            "exec",
            "--exec-id",
            exec_id,
            id,
            shell,
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .expect("ctr exec")
}

fn exec(c: &Containerd, id: &str, exec_id: &str, script: &str) -> Result<String, String> {
    let out = exec_in(c, id, exec_id, "sh", script);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "exec in {id} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The service's answer (its body), asked once from inside container `id`.
fn ask(c: &Containerd, id: &str, exec_id: &str) -> Result<String, String> {
    let out = exec_in(c, id, exec_id, "bash", PY_SERVICE_GET);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.lines().last() {
        Some(body) if out.status.success() && body.starts_with("warm ") => Ok(body.to_string()),
        _ => Err(format!(
            "no answer from {id} ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )),
    }
}

fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_status(c, id, "STOPPED");
    c.ctr_run(&["tasks", "rm", id]).expect("task rm");
    c.ctr_run(&["containers", "rm", id]).expect("container rm");
}

/// Waits until the capture of `name` is recorded as failed; returns why.
fn wait_failure(c: &Containerd, name: &str) -> String {
    let error = store(c).join(format!(".{name}.error"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(reason) = fs::read_to_string(&error) {
            return reason;
        }
        assert!(
            Instant::now() < deadline,
            "no failure recorded for {name}\n{}",
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn netns(pid: u32) -> PathBuf {
    fs::read_link(format!("/proc/{pid}/ns/net")).expect("netns")
}

/// Test 3 of the issue: the Python service captured and restored five times at once.
fn python_service_from_a_template(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::DebianPython).expect("python image");
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");

    let started = Instant::now();
    let tpl_net = network(c, "tpl");
    run_ok_in(
        c,
        &image,
        "tpl",
        Some(&tpl_net),
        &[(CAPTURE, "py"), (READY_FILE, "/ready")],
        &["python3", "-c", PY_SERVICE],
    );
    let kept = wait_template(c, "py", Duration::from_secs(90));
    eprintln!("captured after {:?}", started.elapsed());
    assert!(kept.join("images/inventory.img").is_file());
    // Dumped frozen: its empty /dev/shm is not archived but made anew for each copy (below).
    let meta = fs::read_to_string(kept.join("images/hyperbox-checkpoint.json")).unwrap();
    assert!(meta.contains("\"/dev/shm\""), "{meta}");
    assert!(
        kept.join("rootfs/ready").exists(),
        "the rootfs changes are kept"
    );
    // The captured container runs on, and is the one every copy will answer as.
    let original = ask(c, "tpl", "a0").expect("the captured service answers");
    assert!(original.contains("entries=200000"), "{original}");
    // The same answer from the host, through the container's network namespace.
    let from_host = get_in_network(&tpl_net, PY_SERVICE_PORT, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("GET from the host: {e}"));
    assert_eq!(from_host.trim(), original);

    // Five copies at once, each in a network namespace of its own, each asked right after
    // `ctr run` returns: no retry.
    let copies: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
    let networks: Vec<PathBuf> = copies.iter().map(|id| network(c, id)).collect();
    let answers: Vec<(String, Duration, Result<String, String>)> = thread::scope(|s| {
        let handles: Vec<_> = copies
            .iter()
            .zip(&networks)
            .map(|(id, net)| {
                let image = &image;
                s.spawn(move || {
                    let t = Instant::now();
                    run_ok_in(
                        c,
                        image,
                        id,
                        Some(net),
                        &[(RESTORE_FROM, "py")],
                        &["python3", "-c", PY_SERVICE],
                    );
                    let answer = ask(c, id, "a1");
                    (id.clone(), t.elapsed(), answer)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("restore thread"))
            .collect()
    });
    for (id, took, answer) in &answers {
        let body = answer
            .as_ref()
            .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(40)));
        assert_eq!(body, &original, "{id} is not the warmed-up service");
        eprintln!("{id}: run and first answer in {took:?}");
    }

    // Each has its own network namespace and root filesystem, with the template's changes.
    let pids: Vec<u32> = copies
        .iter()
        .map(|id| task(c, id).expect("task").0)
        .collect();
    let mut namespaces: Vec<PathBuf> = pids.iter().map(|p| netns(*p)).collect();
    namespaces.push(netns(task(c, "tpl").expect("tpl").0));
    namespaces.push(netns(std::process::id()));
    namespaces.sort();
    namespaces.dedup();
    assert_eq!(
        namespaces.len(),
        copies.len() + 2,
        "network namespaces are shared"
    );
    for id in &copies {
        exec(
            c,
            id,
            "w",
            &format!("echo {id} > /owner && echo {id} > /dev/shm/owner && test -e /ready"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // Masked directories are still empty and read-only (an empty tmpfs of the restore).
        exec(
            c,
            id,
            "m",
            "! touch /sys/firmware/x 2>/dev/null && test -z \"$(ls -A /sys/firmware)\"",
        )
        .unwrap_or_else(|e| panic!("/sys/firmware is not masked: {e}"));
    }
    for id in &copies {
        let owner = exec(c, id, "r", "cat /owner /dev/shm/owner").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            owner,
            format!("{id}\n{id}\n"),
            "{id} sees another container's write"
        );
    }
    assert!(
        exec(c, "tpl", "r", "cat /owner").is_err(),
        "the template's container sees a write"
    );

    // The command line tool.
    let out = templates(c, &["list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{listing}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("py"))
        .unwrap_or_else(|| panic!("py is not listed:\n{listing}"));
    assert!(line.contains("MiB"), "{line}");
    let out = templates(c, &["inspect", "py"]);
    assert!(out.status.success());
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).expect("inspect JSON");
    assert_eq!(record["container"], "tpl");
    assert_eq!(record["image"], image.as_str(), "{record}");
    assert!(
        record["image_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{record}"
    );
    assert_eq!(record["namespace"], c.namespace());
    assert!(
        record["layers"].as_array().is_some_and(|l| l.len() == 2),
        "{record}"
    );
    assert!(record["criu_version"]
        .as_str()
        .is_some_and(|s| s.starts_with('4')));
    eprintln!("template size: {} bytes", record["bytes"]);

    // The template is a layer of the copies' root filesystems: it cannot be removed under them.
    let out = templates(c, &["remove", "py"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("is a layer of 5 running"),
        "{said}"
    );
    assert!(kept.join("template.json").is_file());

    // Killed and deleted cleanly, copies and original alike; the template stays for more.
    for id in copies.iter().map(String::as_str).chain(["tpl"]) {
        remove(c, id);
    }
    for net in networks.iter().chain([&tpl_net]) {
        remove_network(net).unwrap_or_else(|e| panic!("{e}"));
    }
    let out = templates(c, &["remove", "py"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!kept.exists());
    let out = templates(c, &["remove", "py"]);
    assert!(!out.status.success(), "a second remove succeeds");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(python_service, python_service_from_a_template);

/// Asserts that `ctr run` of a container annotated so fails saying `says`, and leaves no task,
/// no state and no cgroup.
fn refused(c: &Containerd, image: &str, id: &str, annotations: &[(&str, &str)], says: &str) {
    let out = run_in(c, image, id, None, annotations, &["sh", "-c", COUNTER]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{id} ran");
    assert!(stderr.contains(says), "{id}: {stderr}");
    assert!(task(c, id).is_none(), "a task {id} is left");
    let state = Path::new("/run/hyperbox/youki")
        .join(c.namespace())
        .join(id);
    assert!(!state.exists(), "{} is left", state.display());
    let cgroup = Path::new("/sys/fs/cgroup/memory")
        .join(c.namespace())
        .join(id);
    assert!(!cgroup.exists(), "{} is left", cgroup.display());
    let _ = c.ctr_run(&["containers", "rm", id]);
}

fn counter(c: &Containerd, id: &str) -> u64 {
    let (pid, _) = task(c, id).expect("task");
    fs::read_to_string(format!("/proc/{pid}/root/tmp/n"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn counter_passes(c: &Containerd, id: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = counter(c, id);
        if n > above {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter of {id} stays at {n}\n{}",
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Copies template `from` of the store to `to`, then lets `spoil` change the copy.
fn spoiled_copy(c: &Containerd, from: &str, to: &str, spoil: impl FnOnce(&Path)) {
    let dir = store(c).join(to);
    let status = Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(store(c).join(from))
        .arg(&dir)
        .status()
        .expect("cp");
    assert!(status.success());
    spoil(&dir);
}

/// Test 4 of the issue: bad input fails clearly and harms nothing.
fn template_bad_input_harms_nothing(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let python = bed.image(TestImage::DebianPython).expect("python image");
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");

    // Annotations that make no sense are refused before anything is created.
    refused(
        c,
        &image,
        "b1",
        &[(CAPTURE, "x")],
        "needs a readiness condition",
    );
    refused(
        c,
        &image,
        "b2",
        &[(CAPTURE, "../x"), (READY_DELAY, "1s")],
        "template name",
    );
    refused(
        c,
        &image,
        "b3",
        &[(CAPTURE, "x"), (READY_FILE, "ready")],
        "absolute path",
    );
    refused(
        c,
        &image,
        "b4",
        &[(RESTORE_FROM, "a/../b")],
        "template name",
    );

    // A good template of a counter (its rootfs changes include /tmp/n, which it has open).
    run_ok_in(
        c,
        &image,
        "orig",
        None,
        &[(CAPTURE, "count"), (READY_DELAY, "300ms")],
        &["sh", "-c", COUNTER],
    );
    wait_template(c, "count", Duration::from_secs(30));
    let at_capture = counter(c, "orig");
    // A copy captured in turn (1.5 s after it starts, after the write below): its template has
    // the first one's changes and its own.
    run_ok_in(
        c,
        &image,
        "copy",
        None,
        &[
            (RESTORE_FROM, "count"),
            (CAPTURE, "count2"),
            (READY_DELAY, "1500ms"),
        ],
        &["sh", "-c", COUNTER],
    );
    counter_passes(c, "copy", at_capture);
    exec(c, "copy", "w", "echo copy > /mark").unwrap_or_else(|e| panic!("{e}"));
    wait_template(c, "count2", Duration::from_secs(30));
    run_ok_in(
        c,
        &image,
        "copy2",
        None,
        &[(RESTORE_FROM, "count2")],
        &["sh", "-c", COUNTER],
    );
    counter_passes(c, "copy2", at_capture);
    let mark = exec(c, "copy2", "r", "cat /mark; test -e /tmp/n").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mark.trim(), "copy");
    for id in ["copy", "copy2"] {
        remove(c, id);
    }

    // Missing, damaged, from another CRIU, from another image, and with spoiled images.
    refused(
        c,
        &image,
        "m1",
        &[(RESTORE_FROM, "nothing")],
        "template nothing does not exist",
    );
    spoiled_copy(c, "count", "damaged", |d| {
        fs::write(d.join("template.json"), "{").unwrap()
    });
    refused(
        c,
        &image,
        "m2",
        &[(RESTORE_FROM, "damaged")],
        "template damaged is damaged",
    );
    spoiled_copy(c, "count", "old", |d| {
        let file = d.join("template.json");
        let text = fs::read_to_string(&file).unwrap();
        let mut record: serde_json::Value = serde_json::from_str(&text).unwrap();
        record["criu_version"] = "3.17".into();
        fs::write(&file, record.to_string()).unwrap();
    });
    refused(
        c,
        &image,
        "m3",
        &[(RESTORE_FROM, "old")],
        "captured with CRIU 3.17",
    );
    refused(
        c,
        &python,
        "m4",
        &[(RESTORE_FROM, "count")],
        // By digest, as containerd has the images.
        &format!("captured from another image: {image}@sha256:"),
    );
    spoiled_copy(c, "count", "spoiled", |d| {
        fs::write(d.join("images/pstree.img"), b"not a CRIU image").unwrap()
    });
    refused(c, &image, "m5", &[(RESTORE_FROM, "spoiled")], "pstree.img");
    // The listing says what is wrong with the damaged one.
    let out = templates(c, &["list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains(" damaged ") && l.contains("capture failed: damaged")),
        "{listing}"
    );

    // Captures that cannot happen are recorded as failed; the container runs on.
    let ghost =
        format!("head -c 3000000 /dev/zero > /tmp/big; exec 3</tmp/big; rm /tmp/big; {COUNTER}");
    run_ok_in(
        c,
        &image,
        "ghost",
        None,
        &[(CAPTURE, "ghost"), (READY_DELAY, "300ms")],
        &["sh", "-c", &ghost],
    );
    let reason = wait_failure(c, "ghost");
    assert!(
        reason.contains("criu failed") && reason.contains("dump.log"),
        "{reason}"
    );
    let log = store(c).join(".ghost.log/dump.log");
    assert!(
        fs::read_to_string(&log).is_ok_and(|t| t.contains("ghost")),
        "{}",
        log.display()
    );
    assert!(!store(c).join("ghost").exists(), "a failed capture is kept");
    let n = counter(c, "ghost");
    counter_passes(c, "ghost", n + 2);
    run_ok_in(
        c,
        &image,
        "late",
        None,
        &[
            (CAPTURE, "late"),
            (READY_FILE, "/never"),
            (TIMEOUT, "500ms"),
        ],
        &["sh", "-c", COUNTER],
    );
    let reason = wait_failure(c, "late");
    assert!(reason.contains("did not create /never"), "{reason}");
    let out = templates(c, &["list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains(" late ") && l.contains("capture failed")),
        "{listing}"
    );
    let n = counter(c, "orig");
    counter_passes(c, "orig", n + 2);

    // A client connected but not yet accepted when the service is captured (a readiness
    // probe, say) stays with the original: the capture does not fail for it.
    let net = network(c, "probe");
    run_ok_in(
        c,
        &python,
        "probed",
        Some(&net),
        &[(CAPTURE, "probed"), (READY_DELAY, "2s")],
        &["python3", "-c", NEVER_ACCEPTS],
    );
    let pending = connect_in_network(&net, 8000, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.log_tail(20)));
    wait_template(c, "probed", Duration::from_secs(30));
    drop(pending);
    remove(c, "probed");
    remove_network(&net).unwrap_or_else(|e| panic!("{e}"));

    for id in ["orig", "ghost", "late"] {
        remove(c, id);
    }
    let out = templates(
        c,
        &[
            "remove", "count", "count2", "probed", "damaged", "old", "spoiled", "ghost", "late",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<_> = fs::read_dir(store(c))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the store: {left:?}");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(bad_input, template_bad_input_harms_nothing);

/// A template whose rootfs plants a link to a host directory (`/evil -> HOST`), restored into
/// a container whose spec mounts a volume below that link (`/evil/x`, as a Kubernetes
/// volumeMount may): the mount point is made inside the container's rootfs or not at all,
/// never in the host's directory.
fn template_links_stay_inside(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let c = &bed.containerd;
    let host_dir = c.dir().join("host-dir");
    fs::create_dir_all(&host_dir).unwrap();
    let volume = c.dir().join("volume");
    fs::create_dir_all(&volume).unwrap();
    let plant = format!(
        "ln -s {host} /evil; ln -s {host}/file /evil-file; {COUNTER}",
        host = host_dir.display()
    );
    run_ok_in(
        c,
        &image,
        "planter",
        None,
        &[(CAPTURE, "planted"), (READY_DELAY, "300ms")],
        &["sh", "-c", &plant],
    );
    wait_template(c, "planted", Duration::from_secs(30));
    remove(c, "planter");
    let mount = |dst: &str| {
        format!(
            "type=bind,src={},dst={dst},options=rbind:rw",
            volume.display()
        )
    };
    let (dir_mount, file_mount) = (mount("/evil/x/y"), mount("/evil-file"));
    let restore_from = format!("{RESTORE_FROM}=planted");
    let out = c
        .ctr()
        .args(["run", "-d", "--null-io", "--runtime", OURS])
        .args(["--annotation", &restore_from])
        .args(["--mount", &dir_mount, "--mount", &file_mount])
        .args([&image, "victim", "sh", "-c", COUNTER])
        .stdin(Stdio::null())
        .output()
        .expect("ctr run");
    let made: Vec<_> = fs::read_dir(&host_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    eprintln!(
        "restore through the planted links: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    remove_quietly(c, "victim");
    assert!(
        made.is_empty(),
        "the restore made {made:?} in the host's {} through the template's links",
        host_dir.display()
    );
}
per_version!(links_stay_inside, template_links_stay_inside);

/// A template captured from a privileged container (every capability, no seccomp filter)
/// is not restored into a container whose spec gives fewer: CRIU would hand the copy the
/// captured process's privileges. The refusal names what differs; a copy that asks for the
/// same privileges is restored.
fn template_privileges_come_from_the_spec(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let c = &bed.containerd;
    let run = |id: &str, privileged: bool, annotations: &[(&str, &str)]| {
        let mut args = vec!["run", "-d", "--null-io", "--runtime", OURS];
        if privileged {
            args.push("--privileged");
        }
        let pairs: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for p in &pairs {
            args.extend(["--annotation", p.as_str()]);
        }
        args.extend([image.as_str(), id, "sh", "-c", COUNTER]);
        c.ctr()
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr run")
    };
    let out = run(
        "mighty",
        true,
        &[(CAPTURE, "mighty"), (READY_DELAY, "300ms")],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_template(c, "mighty", Duration::from_secs(30));
    remove(c, "mighty");

    let out = run("meek", false, &[(RESTORE_FROM, "mighty")]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let caps = exec(c, "meek", "caps", "grep CapEff /proc/1/status");
    remove_quietly(c, "meek");
    assert!(
        !out.status.success()
            && stderr.contains("security settings")
            && stderr.contains("bounding capabilities")
            && stderr.contains("CAP_SYS_ADMIN"),
        "a restore with fewer privileges than the template's: {stderr}; its init's {caps:?}"
    );

    let out = run("peer", true, &[(RESTORE_FROM, "mighty")]);
    assert!(
        out.status.success(),
        "the same privileges: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    counter_passes(c, "peer", 0);
    remove(c, "peer");
}
per_version!(
    privileges_from_the_spec,
    template_privileges_come_from_the_spec
);

/// Under Kubernetes every pod is in containerd's `k8s.io`: templates belong to the pod
/// namespace CRI writes into each container's spec (set here by the test's own client, as
/// CRI does). A pod of another namespace does not find a tenant's template by its name, is
/// refused it by `OWNER/NAME` until an administrator shares it in the node's template
/// settings, and captures a template of the same name without touching the tenant's.
fn templates_belong_to_their_pod_namespace(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let c = &bed.containerd;
    const SANDBOX_NS: &str = "io.kubernetes.cri.sandbox-namespace";
    let run = |id: &str, owner: &str, annotations: &[(&str, &str)]| {
        let mut all = vec![(SANDBOX_NS, owner)];
        all.extend_from_slice(annotations);
        run_in(c, &image, id, None, &all, &["sh", "-c", COUNTER])
    };
    let said = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let out = run(
        "a1",
        "tenant-a",
        &[(CAPTURE, "svc"), (READY_DELAY, "300ms")],
    );
    assert!(out.status.success(), "{}", said(&out));
    wait_pod_template(c, "tenant-a", "svc");

    // By its name, from another pod namespace: not there.
    let out = run("b1", "tenant-b", &[(RESTORE_FROM, "svc")]);
    let b_by_name = (out.status.success(), said(&out));
    remove_quietly(c, "b1");
    // By its owner's name: refused, until shared.
    let out = run("b2", "tenant-b", &[(RESTORE_FROM, "tenant-a/svc")]);
    let b_by_owner = (out.status.success(), said(&out));
    remove_quietly(c, "b2");
    fs::write(c.template_settings(), "shared = [\"tenant-a/svc\"]\n").unwrap();
    let out = run("b3", "tenant-b", &[(RESTORE_FROM, "tenant-a/svc")]);
    let b_shared = (out.status.success(), said(&out));
    remove_quietly(c, "b3");
    fs::remove_file(c.template_settings()).unwrap();
    // Its own pod namespace restores it by name.
    let out = run("a2", "tenant-a", &[(RESTORE_FROM, "svc")]);
    let a_by_name = (out.status.success(), said(&out));
    remove_quietly(c, "a2");
    // Another tenant's capture of the same name is its own.
    let out = run(
        "b4",
        "tenant-b",
        &[(CAPTURE, "svc"), (READY_DELAY, "300ms")],
    );
    assert!(out.status.success(), "{}", said(&out));
    wait_pod_template(c, "tenant-b", "svc");
    remove_quietly(c, "b4");
    remove_quietly(c, "a1");
    let listing = templates(c, &["list"]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();

    assert!(
        !b_by_name.0 && b_by_name.1.contains("does not exist"),
        "tenant-b by name: {b_by_name:?}"
    );
    assert!(
        !b_by_owner.0 && b_by_owner.1.contains("shares it"),
        "tenant-b by owner, not shared: {b_by_owner:?}"
    );
    assert!(b_shared.0, "tenant-b, shared: {b_shared:?}");
    assert!(a_by_name.0, "tenant-a by name: {a_by_name:?}");
    let ns = c.namespace();
    assert!(
        listing.contains(&format!("{ns}/tenant-a")) && listing.contains(&format!("{ns}/tenant-b")),
        "{listing}"
    );
}
per_version!(pod_namespaces, templates_belong_to_their_pod_namespace);

/// Waits until pod namespace `owner` has template `name`.
fn wait_pod_template(c: &Containerd, owner: &str, name: &str) {
    let record = store(c)
        .join(format!(".pod.{owner}"))
        .join(name)
        .join("template.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !record.is_file() {
        assert!(
            Instant::now() < deadline,
            "no template {name} of {owner}\n{}",
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Kills and removes container `id`, whatever state it is in (or none).
fn remove_quietly(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while task(c, id).is_some_and(|t| t.1 != "STOPPED") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let _ = c.ctr_run(&["tasks", "rm", "-f", id]);
    let _ = c.ctr_run(&["containers", "rm", id]);
}

/// The node's template settings bound the work a template costs: a container that wrote more
/// than `max_rootfs_changes` is not captured, a capture over the owner's `owner_quota` is not
/// kept, a capture whose CRIU outlasts `capture_timeout` is stopped (the container thawed and
/// running on), and a template unused for `expire_unused` is removed. Each failure says
/// which setting, in `templates list`.
fn template_work_is_bounded(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let image = bed.image(TestImage::Busybox).expect("busybox");
    let c = &bed.containerd;
    let settings = |text: &str| fs::write(c.template_settings(), text).unwrap();
    let capture = |id: &str, script: &str| {
        run_ok_in(
            c,
            &image,
            id,
            None,
            &[(CAPTURE, id), (READY_DELAY, "300ms")],
            &["sh", "-c", script],
        )
    };
    let runs_on = |id: &str| {
        let now = counter(c, id);
        counter_passes(c, id, now);
    };

    settings("max_rootfs_changes = \"64KiB\"\n");
    capture(
        "big",
        &format!("head -c 300000 /dev/zero > /blob; {COUNTER}"),
    );
    let why = wait_failure(c, "big");
    assert!(why.contains("max_rootfs_changes"), "{why}");
    runs_on("big");
    remove(c, "big");

    settings("owner_quota = \"4KiB\"\n");
    capture("quota", COUNTER);
    let why = wait_failure(c, "quota");
    assert!(why.contains("owner_quota"), "{why}");
    assert!(!store(c).join("quota").exists());
    runs_on("quota");
    remove(c, "quota");

    // A CRIU that never answers a dump.
    let fake = c
        .hang_criu_requests(&c.dir().join("criu.pid"))
        .expect("a hanging criu");
    settings("capture_timeout = \"2s\"\n");
    capture("slow", COUNTER);
    let why = wait_failure(c, "slow");
    fs::remove_file(&fake).unwrap();
    assert!(why.contains("CRIU did not finish within"), "{why}");
    runs_on("slow");
    remove(c, "slow");

    settings("expire_unused = \"1s\"\n");
    capture("old", COUNTER);
    wait_template(c, "old", Duration::from_secs(30));
    remove(c, "old");
    // A template unused for a second expires when the store is next swept, as `list` does.
    wait_until(
        Duration::from_secs(30),
        "the unused template old to expire",
        || {
            let listing = templates(c, &["list"]);
            let listing = String::from_utf8_lossy(&listing.stdout);
            !store(c).join("old").exists() && !listing.contains(" old ")
        },
    );
    let listing = templates(c, &["list"]);
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(
        !store(c).join("old").exists() && !listing.contains(" old "),
        "an unused template is expired: {listing}"
    );
}
per_version!(bounded_work, template_work_is_bounded);

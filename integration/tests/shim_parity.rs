//! `containerd-shim-hyperbox-v1` against runc's shim for what engines do to running tasks:
//! Pause and Resume, metrics, Update, OOM, a shim killed with SIGKILL, a containerd restart,
//! many lifecycles at once and in a row, and the error codes of bad calls. Where runc's shim
//! is the reference, both run in the same containerd and are compared.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::client::ClientError;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::wait_until;

const OURS: &str = "io.containerd.hyperbox.v1";
const RUNC: &str = "io.containerd.runc.v2";
const RUNTIMES: [&str; 2] = [RUNC, OURS];

fn bed(v: ContainerdVersion) -> (TestBed, String) {
    let bed = TestBed::start(v).expect("test bed");
    assert!(
        bed.containerd.runtimes().iter().any(|r| r == OURS),
        "{OURS} is not registered: build containerd-shim-hyperbox-v1 first"
    );
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    (bed, image)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `ctr run -d --null-io FLAGS --runtime RUNTIME IMAGE ID CMD...`; returns the task's pid.
fn detached(
    c: &Containerd,
    runtime: &str,
    image: &str,
    id: &str,
    flags: &[&str],
    cmd: &[&str],
) -> u32 {
    let mut args = vec!["run", "-d", "--null-io"];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--runtime", runtime, image, id]);
    args.extend_from_slice(cmd);
    c.ctr_run(&args).expect("detached run");
    task_field(c, id, 1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid for task {id}"))
}

/// Field `n` of the `ctr task ls` line of `id` (1: pid, 2: status).
fn task_field(c: &Containerd, id: &str, n: usize) -> Option<String> {
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(n).map(str::to_string))
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = task_field(c, id, 2).unwrap_or_default();
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {status:?}, not {want}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Kills, deletes the task and the container.
fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_status(c, id, "STOPPED");
    c.ctr_run(&["tasks", "rm", id]).expect("task rm");
    c.ctr_run(&["containers", "rm", id]).expect("container rm");
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Pause freezes (a counter the container writes stops), Resume continues it; State says
/// PAUSED between; TaskPaused and TaskResumed are published. Same through both runtimes.
fn pause_and_resume(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("count{n}");
        let mut events = rt
            .block_on(
                client.subscribe(&[r#"topic=="/tasks/paused""#, r#"topic=="/tasks/resumed""#]),
            )
            .expect("subscribe");
        let script = "i=0; while :; do i=$((i+1)); echo $i > /tmp/c; sleep 0.02; done";
        let pid = detached(c, runtime, &image, &id, &[], &["sh", "-c", script]);
        let counter = PathBuf::from(format!("/proc/{pid}/root/tmp/c"));
        let read = || -> u64 {
            std::fs::read_to_string(&counter)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while read() < 3 {
            assert!(
                Instant::now() < deadline,
                "{runtime}: the counter does not count"
            );
            thread::sleep(Duration::from_millis(20));
        }
        rt.block_on(client.pause(&id)).expect("pause");
        wait_status(c, &id, "PAUSED");
        let frozen = read();
        // A check that the counter does NOT move: it is given time to, then compared.
        thread::sleep(Duration::from_millis(400));
        assert_eq!(read(), frozen, "{runtime}: the counter moved while paused");
        rt.block_on(client.resume(&id)).expect("resume");
        wait_status(c, &id, "RUNNING");
        let deadline = Instant::now() + Duration::from_secs(10);
        while read() <= frozen {
            assert!(
                Instant::now() < deadline,
                "{runtime}: the counter did not resume"
            );
            thread::sleep(Duration::from_millis(20));
        }
        let seen = rt
            .block_on(events.until_topic("/tasks/resumed", Duration::from_secs(10)))
            .expect("events");
        let topics: Vec<&str> = seen.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(topics, ["/tasks/paused", "/tasks/resumed"], "{runtime}");
        // SIGKILL ends a paused task too.
        rt.block_on(client.pause(&id)).expect("pause again");
        remove(c, &id);
    }
}
per_version!(pause_resume, pause_and_resume);

/// `ctr task metrics` rows and values.
fn metrics(c: &Containerd, id: &str) -> Vec<(String, u64)> {
    let out = c
        .ctr_stdout(&["tasks", "metrics", id])
        .expect("task metrics");
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?.to_string();
            let value = f.next()?.parse().ok()?;
            Some((name, value))
        })
        .collect()
}

fn metric(rows: &[(String, u64)], name: &str) -> u64 {
    rows.iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name} in {rows:?}"))
}

fn exec(c: &Containerd, id: &str, exec_id: &str, detach: bool, script: &str) {
    let mut args = vec!["tasks", "exec"];
    if detach {
        args.push("--detach");
    }
    args.extend_from_slice(&["--exec-id", exec_id, id, "sh", "-c", script]);
    let out = c
        .ctr()
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("ctr exec");
    assert!(
        out.status.success(),
        "exec {exec_id}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ctr task metrics` shows memory, CPU and pids that move when the container allocates
/// memory, burns CPU and starts processes; the same rows as runc's shim. An update of the
/// memory, pids and CPU limits through the task API is read back from the cgroup, as
/// through runc's.
fn metrics_move_and_updates_apply(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let mut rows = Vec::new();
    let mut limits = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("busy{n}");
        let pid = detached(c, runtime, &image, &id, &[], &["sleep", "1000"]);
        let before = metrics(c, &id);
        exec(
            c,
            &id,
            "mem",
            false,
            "head -c 40000000 /dev/zero > /dev/shm/x",
        );
        exec(
            c,
            &id,
            "cpu",
            false,
            "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done",
        );
        exec(c, &id, "kids", true, "sleep 1000 & sleep 1000 & wait");
        let growth = [
            ("memory.usage_in_bytes", 30_000_000),
            ("cpuacct.usage", 10_000_000),
            ("pids.current", 3),
        ];
        wait_until(
            Duration::from_secs(10),
            format!("{runtime}: the memory, CPU and pid counts to grow"),
            || {
                let after = metrics(c, &id);
                growth
                    .iter()
                    .all(|&(name, by)| metric(&after, name) >= metric(&before, name) + by)
            },
        );
        let after = metrics(c, &id);
        let grew = |name: &str, by: u64| {
            let (b, a) = (metric(&before, name), metric(&after, name));
            assert!(
                a >= b + by,
                "{runtime}: {name} went from {b} to {a}, expected +{by}"
            );
        };
        for (name, by) in growth {
            grew(name, by);
        }
        rows.push(
            after
                .iter()
                .map(|(n, _)| n.clone())
                .collect::<BTreeSet<_>>(),
        );

        let resources = serde_json::json!({
            "memory": {"limit": 104_857_600},
            "pids": {"limit": 77},
            "cpu": {"shares": 512, "quota": 50_000, "period": 100_000},
        });
        rt.block_on(client.update_task(&id, &resources))
            .expect("update");
        let mem = host::cgroup_dir(pid, "memory").expect("the cgroup of the task");
        let pids = host::cgroup_dir(pid, "pids").expect("the cgroup of the task");
        let cpu = host::cgroup_dir(pid, "cpu").expect("the cgroup of the task");
        limits.push(vec![
            read_trim(&mem.join("memory.limit_in_bytes")),
            read_trim(&pids.join("pids.max")),
            read_trim(&cpu.join("cpu.shares")),
            read_trim(&cpu.join("cpu.cfs_quota_us")),
        ]);
        remove(c, &id);
    }
    assert_eq!(rows[1], rows[0], "metric rows: hyperbox vs runc");
    assert_eq!(
        limits[0],
        ["104857600", "77", "512", "50000"],
        "runc's update"
    );
    assert_eq!(limits[1], limits[0], "hyperbox's update vs runc's");
}
per_version!(metrics_update, metrics_move_and_updates_apply);

/// A container limited to 32 MiB that allocates more exits 137, and TaskOOM is published.
fn oom_kill_gives_137_and_an_event(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("oom{n}");
        let mut events = rt
            .block_on(client.subscribe(&[r#"topic=="/tasks/oom""#]))
            .expect("subscribe");
        let out = c
            .ctr()
            .args([
                "run",
                "--rm",
                "--memory-limit",
                "33554432",
                "--runtime",
                runtime,
            ])
            .args(["--fifo-dir"])
            .arg(c.dir().join("fifo"))
            .args([
                &image,
                &id,
                "sh",
                "-c",
                "head -c 200000000 /dev/zero | tail",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
        assert_eq!(
            out.status.code(),
            Some(137),
            "{runtime}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = rt
            .block_on(events.until_topic("/tasks/oom", Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("{runtime}: no TaskOOM: {e}"));
        assert_eq!(seen.last().map(|e| e.topic.as_str()), Some("/tasks/oom"));
    }
}
per_version!(oom, oom_kill_gives_137_and_an_event);

/// `kill -9` of the shim of a running container: containerd reports the exit (TaskExit, and
/// the task is stopped or gone as under runc's shim), `ctr task rm` (when the task is still
/// listed) and `ctr container rm` succeed, and nothing of the container remains.
fn killed_shim_strands_nothing(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let mut after_kill = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("orphan{n}");
        let mut events = rt
            .block_on(client.subscribe(&[r#"topic=="/tasks/exit""#]))
            .expect("subscribe");
        let pid = detached(c, runtime, &image, &id, &[], &["sleep", "1000"]);
        let mem = host::cgroup_dir(pid, "memory").expect("the cgroup of the task");
        let during = Footprint::of(c.dir()).expect("footprint");
        let shim = during
            .processes
            .iter()
            .find(|p| p.what.contains("containerd-shim") && p.what.contains(&id))
            .unwrap_or_else(|| panic!("no shim process for {id}: {during:#?}"))
            .pid;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shim as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the shim");
        let seen = rt
            .block_on(events.until_topic("/tasks/exit", Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{runtime}: no TaskExit after the shim died: {e}"));
        assert!(!seen.is_empty());
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            let status = task_field(c, &id, 2);
            if status.as_deref() != Some("RUNNING") {
                break status;
            }
            assert!(Instant::now() < deadline, "{runtime}: {id} still RUNNING");
            thread::sleep(Duration::from_millis(50));
        };
        if status.is_some() {
            c.ctr_run(&["tasks", "rm", &id]).expect("task rm");
        }
        after_kill.push(status);
        c.ctr_run(&["containers", "rm", &id]).expect("container rm");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                Instant::now() < deadline,
                "{runtime}: the container's process {pid} survived"
            );
            thread::sleep(Duration::from_millis(50));
        }
        assert!(!mem.exists(), "{runtime}: cgroup left: {}", mem.display());
    }
    assert_eq!(
        after_kill[1], after_kill[0],
        "task after its shim died: hyperbox vs runc"
    );
    let state = Path::new("/run/hyperbox/youki").join(c.namespace());
    let left: Vec<PathBuf> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left: {left:?}");
    let now = Footprint::of(c.dir()).expect("footprint");
    assert!(
        now.mounts.len() <= fp.mounts.len(),
        "mounts left: {:#?} (before: {:#?})",
        now.mounts,
        fp.mounts
    );
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(killed_shim, killed_shim_strands_nothing);

/// containerd restarted with 5 running containers: all still run, and exec, metrics, kill and
/// delete work on each.
fn containerd_restart_keeps_tasks_manageable(v: ContainerdVersion) {
    let (mut bed, image) = bed(v);
    let ids: Vec<String> = (0..5).map(|i| format!("keep{i}")).collect();
    let pids: Vec<u32> = ids
        .iter()
        .map(|id| detached(&bed.containerd, OURS, &image, id, &[], &["sleep", "1000"]))
        .collect();
    bed.containerd.restart().expect("containerd restarts");
    let c = &bed.containerd;
    for (id, pid) in ids.iter().zip(&pids) {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{id} died with containerd"
        );
        assert_eq!(task_field(c, id, 2).as_deref(), Some("RUNNING"), "{id}");
        let out = c
            .ctr()
            .args([
                "tasks",
                "exec",
                "--exec-id",
                "after",
                id,
                "sh",
                "-c",
                "exit 4",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("exec");
        assert_eq!(
            out.status.code(),
            Some(4),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(metric(&metrics(c, id), "pids.current") >= 1, "{id}");
        remove(c, id);
    }
}
per_version!(
    containerd_restart,
    containerd_restart_keeps_tasks_manageable
);

/// A newer shim binary installed while a container runs: the running shim keeps serving it
/// (exec, kill, delete), new containers start with the new binary, and the new binary's
/// `delete` action cleans up after the old shim when that one is killed.
fn new_binary_under_running_containers(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let old_pid = detached(c, OURS, &image, "before", &[], &["sleep", "1000"]);
    let other_pid = detached(c, OURS, &image, "orphaned", &[], &["sleep", "1000"]);
    // Install a new binary: a new file (new inode) where containerd finds the shim.
    let shim = c.dir().join("bin/containerd-shim-hyperbox-v1");
    let source = std::fs::canonicalize(&shim).expect("installed shim");
    let staged = c.dir().join("bin/.containerd-shim-hyperbox-v1.new");
    std::fs::copy(&source, &staged).expect("copy the shim");
    std::fs::rename(&staged, &shim).expect("replace the shim");

    let out = c
        .ctr()
        .args([
            "tasks",
            "exec",
            "--exec-id",
            "x",
            "before",
            "sh",
            "-c",
            "exit 3",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("exec");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_pid = detached(c, OURS, &image, "after", &[], &["sleep", "1000"]);
    let shim_of = |id: &str| {
        Footprint::of(c.dir())
            .expect("footprint")
            .processes
            .into_iter()
            .find(|p| p.what.contains("containerd-shim-hyperbox-v1") && p.what.contains(id))
            .unwrap_or_else(|| panic!("no shim for {id}"))
            .pid
    };
    let exe = |pid: u32| std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
    assert!(
        exe(shim_of("before"))
            .to_string_lossy()
            .ends_with("(deleted)")
            || exe(shim_of("before")) != exe(shim_of("after")),
        "the old shim should run the replaced binary"
    );
    // The old shim dies: the new binary's delete action cleans up its container.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim_of("orphaned") as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the old shim");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{other_pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the old shim's container survived"
        );
        thread::sleep(Duration::from_millis(50));
    }
    if task_field(c, "orphaned", 2).is_some() {
        c.ctr_run(&["tasks", "rm", "orphaned"]).expect("task rm");
    }
    c.ctr_run(&["containers", "rm", "orphaned"])
        .expect("container rm");
    remove(c, "before");
    remove(c, "after");
    for pid in [old_pid, new_pid, other_pid] {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} survived"
        );
    }
    let state = Path::new("/run/hyperbox/youki").join(c.namespace());
    let left: Vec<PathBuf> = std::fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left: {left:?}");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(new_binary, new_binary_under_running_containers);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn files_under(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                files_under(&p)
            } else {
                1
            }
        })
        .sum()
}

/// 50 containers started in parallel all exit with their own codes; after 200 sequential
/// lifecycles no shim process, mount, cgroup, FIFO or containerd file descriptor is left
/// over (counted before and after).
fn many_lifecycles_leave_nothing(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fifo = c.dir().join("fifo");
    let daemon = c.pid().expect("containerd pid");
    // One lifecycle first, so lazily opened daemon files are counted in "before".
    let run = |id: &str, code: u32| {
        let mut cmd = c.ctr();
        cmd.args(["run", "--rm", "--runtime", OURS, "--fifo-dir"])
            .arg(&fifo)
            .args([image.as_str(), id, "sh", "-c", &format!("exit {code}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    };
    assert_eq!(run_status(&mut run("warm", 0)), 0);
    let fds = fd_count(daemon);
    let before = Footprint::of(c.dir()).expect("footprint");
    let fifos = files_under(&fifo);

    let children: Vec<(u32, std::process::Child)> = (0..50u32)
        .map(|i| (i, run(&format!("par{i}"), i).spawn().expect("ctr")))
        .collect();
    for (i, child) in children {
        let out = child.wait_with_output().expect("ctr ends");
        assert_eq!(
            out.status.code(),
            Some(i as i32),
            "par{i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for i in 0..200u32 {
        assert_eq!(
            run_status(&mut run(&format!("seq{i}"), i % 7)),
            (i % 7) as i32,
            "seq{i}"
        );
    }

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = Footprint::of(c.dir()).expect("footprint");
        let shims: Vec<_> = after
            .processes
            .iter()
            .filter(|p| p.what.contains("containerd-shim"))
            .collect();
        let settled = shims.is_empty()
            && after.mounts.len() <= before.mounts.len()
            && after.cgroups.len() <= before.cgroups.len()
            && fd_count(daemon) <= fds + 2
            && files_under(&fifo) <= fifos;
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left over after 250 lifecycles: shims {shims:#?}, mounts {} (before {}), cgroups {} \
             (before {}), containerd fds {} (before {fds}), fifos {} (before {fifos})",
            after.mounts.len(),
            before.mounts.len(),
            after.cgroups.len(),
            before.cgroups.len(),
            fd_count(daemon),
            files_under(&fifo)
        );
        thread::sleep(Duration::from_millis(200));
    }
}
per_version!(many_lifecycles, many_lifecycles_leave_nothing);

fn run_status(cmd: &mut Command) -> i32 {
    let out = cmd.output().expect("ctr runs");
    out.status
        .code()
        .unwrap_or_else(|| panic!("ctr killed: {}", String::from_utf8_lossy(&out.stderr)))
}

/// The code of a call's result: "Ok" or the gRPC code's name.
fn code<T>(r: Result<T, ClientError>) -> String {
    match r {
        Ok(_) => "Ok".into(),
        Err(e) => e
            .code()
            .map_or_else(|| format!("no code: {e}"), |c| format!("{c:?}")),
    }
}

/// Bad calls get the codes runc's shim gives: the same calls against both, compared.
fn error_codes_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let process = |args: &[&str]| {
        serde_json::json!({
            "args": args, "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}, "terminal": false,
        })
    };
    let mut answers = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("codes{n}");
        detached(c, runtime, &image, &id, &[], &["sleep", "1000"]);
        let mut seen: Vec<(&str, String)> = Vec::new();
        rt.block_on(async {
            seen.push((
                "update unknown task",
                code(client.update_task("nosuch", &serde_json::json!({})).await),
            ));
            seen.push((
                "exec in unknown task",
                code(client.exec("nosuch", "e", &process(&["true"])).await),
            ));
            seen.push((
                "exec",
                code(client.exec(&id, "e1", &process(&["sleep", "100"])).await),
            ));
            seen.push((
                "exec id reused",
                code(client.exec(&id, "e1", &process(&["true"])).await),
            ));
            seen.push(("start unknown exec", code(client.start(&id, "nope").await)));
            seen.push((
                "kill unknown exec",
                code(client.kill_exec(&id, "nope", 9).await),
            ));
            seen.push(("signal 0", code(client.kill(&id, 0, false).await)));
            seen.push((
                "memory limit -1",
                code(
                    client
                        .update_task(&id, &serde_json::json!({"memory": {"limit": -1}}))
                        .await,
                ),
            ));
            seen.push((
                "resize a non-tty process",
                code(client.resize(&id, "", 80, 24).await),
            ));
            seen.push(("pause", code(client.pause(&id).await)));
            // runc's shim answers these two with runc's error text (Unknown); ours says
            // FailedPrecondition. Both refuse: compared as refusals.
            let refused = |c: String| if c == "Ok" { c } else { "refused".into() };
            seen.push((
                "pause a paused task",
                refused(code(client.pause(&id).await)),
            ));
            seen.push(("resume", code(client.resume(&id).await)));
            seen.push((
                "resume a running task",
                refused(code(client.resume(&id).await)),
            ));
            seen.push((
                "metrics type",
                client
                    .metrics(&id)
                    .await
                    .map_or_else(|e| format!("error: {e}"), |a| a.type_url),
            ));
        });
        remove(c, &id);
        answers.push(seen);
    }
    assert_eq!(answers[1], answers[0], "hyperbox's codes vs runc's");
}
per_version!(error_codes, error_codes_as_runc);

/// Containers annotated `io.containerd.runc.v2.group` share one shim, under runc's shim and
/// ours alike (`ctr run --annotation`, the form a client other than CRI uses): two
/// containers of a group have one shim (ours with its one zygote), and killing one leaves
/// the other running in it. A container of another runtime in the same group never joins
/// ours: runc's shim for it is a shim of its own.
fn group_annotation_as_runc(v: ContainerdVersion) {
    use hyperbox_integration::cri::shim_processes;
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let group = "io.containerd.runc.v2.group=g1";
    let shims_of = |binary: &str| {
        let all = shim_processes(c.socket());
        let shims: Vec<u32> = all
            .iter()
            .filter(|p| p.binary == binary && !all.iter().any(|q| q.pid == p.ppid))
            .map(|p| p.pid)
            .collect();
        let helpers = all
            .iter()
            .filter(|p| p.binary == binary && all.iter().any(|q| q.pid == p.ppid))
            .count();
        (shims, helpers)
    };
    let mut seen = Vec::new();
    for (runtime, binary) in [
        (RUNC, "containerd-shim-runc-v2"),
        (OURS, "containerd-shim-hyperbox-v1"),
    ] {
        let tag = if runtime == RUNC { "r" } else { "h" };
        let (a, b) = (format!("grp-{tag}a"), format!("grp-{tag}b"));
        for id in [&a, &b] {
            let pid = detached(
                c,
                runtime,
                &image,
                id,
                &["--annotation", group],
                &["sleep", "1000"],
            );
            // Until it execs `sleep`, a container's init is still the shim's binary and the
            // shim's child, which would count as a helper.
            wait_until(
                Duration::from_secs(10),
                format!("{runtime}: the init of {id} to exec sleep"),
                || {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c == "sleep\n")
                },
            );
        }
        let (shims, helpers) = shims_of(binary);
        remove(c, &a);
        wait_status(c, &b, "RUNNING");
        let (after, _) = shims_of(binary);
        seen.push((runtime, shims.len(), helpers, after == shims));
    }
    // A runc container in group g1 while only ours serves g1: were the socket derived from
    // the group alone (as runc's shim derives it), runc's shim would find ours there and
    // hand it the container. It gets a runc shim of its own; ours is untouched.
    remove(c, "grp-rb");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !shims_of("containerd-shim-runc-v2").0.is_empty() {
        assert!(Instant::now() < deadline, "runc's group shim did not exit");
        thread::sleep(Duration::from_millis(50));
    }
    let ours_before = shims_of("containerd-shim-hyperbox-v1").0;
    let pid = detached(
        c,
        RUNC,
        &image,
        "grp-rc",
        &["--annotation", group],
        &["sleep", "1000"],
    );
    let runc_shims = shims_of("containerd-shim-runc-v2").0;
    let ours_after = shims_of("containerd-shim-hyperbox-v1").0;
    let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse::<u32>()
                .ok()
        });
    for id in ["grp-hb", "grp-rc"] {
        remove(c, id);
    }
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
    assert_eq!(
        seen,
        [(RUNC, 1, 0, true), (OURS, 1, 1, true)],
        "(runtime, shims, helpers, same shim after one container went)"
    );
    assert_eq!(ours_after, ours_before, "a runc container joined our shim");
    assert_eq!(runc_shims.len(), 1, "{runc_shims:?}");
    assert_eq!(parent, Some(runc_shims[0]), "grp-rc runs under runc's shim");
}
per_version!(group_annotation, group_annotation_as_runc);

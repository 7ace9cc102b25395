//! CRIU checkpoint and restore through `containerd-shim-hyperbox-v1`, against the harness's
//! containerd: a checkpoint through the task API (with and without runc's options, of a
//! running and of a paused task), a restore through Create with a checkpoint that continues
//! where the checkpoint left off, `ctr container checkpoint --task` / `ctr container restore
//! --live`, and bad input (a dump CRIU refuses, a corrupt checkpoint) that harms nothing.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::client::{
    to_any, CheckpointOptions, CreateTask, RuncOptions, TestClient,
};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::host;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::testbed::TestBed;

const OURS: &str = "io.containerd.hyperbox.v1";
/// The media type of the CRIU images containerd keeps in its content store.
const CHECKPOINT_MEDIA_TYPE: &str = "application/vnd.containerd.container.criu.checkpoint.criu.tar";

/// Counts up, writing each value to /tmp/n and to stdout.
const COUNTER: &str = "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; echo $i; sleep 0.1; done";

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

/// `ctr run -d --null-io --runtime OURS IMAGE ID sh -c SCRIPT`.
fn run_detached(c: &Containerd, image: &str, id: &str, script: &str) {
    c.ctr_run(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        OURS,
        image,
        id,
        "sh",
        "-c",
        script,
    ])
    .expect("detached run");
}

/// The task's pid and status from `ctr task ls`.
fn task(c: &Containerd, id: &str) -> Option<(u32, String)> {
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    tasks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id)).then(|| (f[1].parse().unwrap_or(0), f[2].to_string()))
    })
}

fn wait_status(c: &Containerd, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = task(c, id).map(|t| t.1).unwrap_or_default();
        if status == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} is {status:?}, not {want}\n{}",
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The counter as the task's init sees /tmp/n (through its root).
fn counter(c: &Containerd, id: &str) -> Option<u64> {
    let (pid, _) = task(c, id)?;
    fs::read_to_string(format!("/proc/{pid}/root/tmp/n"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the counter passes `above`, and returns it.
fn counter_passes(c: &Containerd, id: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(n) = counter(c, id).filter(|n| *n > above) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the counter of {id} does not pass {above} (at {:?})\n{}",
            counter(c, id),
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Freezes the task's cgroup (the v1 freezer this host has) at a moment when none of its
/// processes has the counter file open, and returns the freezer's directory (thaw it after
/// the checkpoint). The restored container's rootfs is a fresh snapshot of the image, without
/// `/tmp/n`, and CRIU rightly refuses to restore a descriptor of a file that is not there: a
/// dump taken during `echo $i > /tmp/n` cannot be restored elsewhere (seen once in CI).
fn freeze_between_writes(c: &Containerd, id: &str) -> std::path::PathBuf {
    let (pid, _) = task(c, id).expect("task");
    let cg = host::cgroup_dir(pid, "freezer").expect("freezer cgroup");
    let state = cg.join("freezer.state");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        fs::write(&state, "FROZEN").expect("freeze");
        while fs::read_to_string(&state).unwrap_or_default().trim() != "FROZEN" {
            assert!(Instant::now() < deadline, "{id} does not freeze");
            thread::sleep(Duration::from_millis(5));
        }
        let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        let open = procs.lines().any(|p| {
            fs::read_dir(format!("/proc/{}/fd", p.trim()))
                .map(|fds| {
                    fds.flatten()
                        .any(|fd| fs::read_link(fd.path()).is_ok_and(|t| t.ends_with("tmp/n")))
                })
                .unwrap_or(false)
        });
        if !open {
            return cg;
        }
        thaw(&cg);
        assert!(Instant::now() < deadline, "{id} always has /tmp/n open");
        thread::sleep(Duration::from_millis(20));
    }
}

fn thaw(cg: &Path) {
    fs::write(cg.join("freezer.state"), "THAWED").expect("thaw");
}

/// Checkpoints task `id` through the task API into CRIU images at `images` (runc's
/// `image_path`), stopping it after the dump when `exit`; a failure fails the test, saying
/// `what` with the daemon's log.
fn checkpoint_into(
    rt: &tokio::runtime::Runtime,
    client: &TestClient,
    c: &Containerd,
    id: &str,
    images: &Path,
    exit: bool,
    what: &str,
) {
    let options = CheckpointOptions {
        exit,
        image_path: images.to_string_lossy().into_owned(),
        ..Default::default()
    };
    rt.block_on(client.checkpoint_task(id, Some(&options)))
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", c.log_tail(30)));
}

/// Kills, deletes the task and the container.
fn remove(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
    wait_status(c, id, "STOPPED");
    c.ctr_run(&["tasks", "rm", id]).expect("task rm");
    c.ctr_run(&["containers", "rm", id]).expect("container rm");
}

/// A checkpoint through the task API, without options (containerd stores the images in its
/// content store) and with runc's options (images and CRIU's log where they say, and a record
/// naming them in containerd's copy, from which a new container restores): the task runs on, its counter moving; a paused task is checkpointed
/// and stays paused; `exit` stops the task after the dump. (containerd stores a checkpoint's
/// config blob under a digest of the container's spec and refuses a second one, whatever
/// the runtime: one checkpoint per container here.)
fn checkpoint_through_the_task_api(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let rt = runtime();
    let client: TestClient = rt.block_on(c.client()).expect("client");
    for id in ["ck0", "ck1", "ck2", "ck3"] {
        run_detached(c, &image, id, COUNTER);
    }

    let before = counter_passes(c, "ck0", 2);
    let stored = rt
        .block_on(client.checkpoint_task("ck0", None))
        .unwrap_or_else(|e| panic!("checkpoint: {e}\n{}", c.log_tail(30)));
    assert!(
        stored.iter().any(|d| d.media_type.contains("checkpoint")),
        "{stored:?}"
    );
    wait_status(c, "ck0", "RUNNING");
    counter_passes(c, "ck0", before + 2);

    let images = c.dir().join("ck1-images");
    let work = c.dir().join("ck1-work");
    let options = CheckpointOptions {
        image_path: images.to_string_lossy().into_owned(),
        work_path: work.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let before = counter_passes(c, "ck1", 2);
    let lease = "ck1-checkpoint";
    rt.block_on(client.create_lease(lease)).expect("lease");
    // Restored below into a new container: dumped when no process has /tmp/n open.
    let frozen = freeze_between_writes(c, "ck1");
    let stored = rt
        .block_on(client.checkpoint_task_leased("ck1", Some(&options), lease))
        .unwrap_or_else(|e| panic!("checkpoint with options: {e}\n{}", c.log_tail(30)));
    thaw(&frozen);
    assert!(images.join("inventory.img").is_file(), "no CRIU inventory");
    assert!(images.join("pstree.img").is_file());
    assert!(
        work.join("dump.log").is_file(),
        "no CRIU log in the work path"
    );
    counter_passes(c, "ck1", before + 2);
    // containerd 1.x stored its own directory, which names where the images went: a restore
    // from containerd's copy restores them. containerd 2.x commits nothing to its content
    // store when the request names an image path (its tasks service returns no descriptors):
    // the images are restored from where they were asked to go.
    let (record, options) = if v.is_2x() {
        assert!(
            stored.is_empty(),
            "containerd {v} stored a checkpoint given an image path: {stored:?}"
        );
        let options = to_any(&RuncOptions {
            criu_image_path: images.to_string_lossy().into_owned(),
            ..Default::default()
        });
        (None, Some(options))
    } else {
        let record = stored
            .into_iter()
            .find(|d| d.media_type == CHECKPOINT_MEDIA_TYPE)
            .expect("a checkpoint in the content store");
        (Some(record), None)
    };
    c.ctr_run(&[
        "containers",
        "create",
        "--runtime",
        OURS,
        &image,
        "ck1-back",
        "true",
    ])
    .expect("container");
    let out = c.dir().join("ck1-back.log");
    rt.block_on(client.create_task(CreateTask {
        container_id: "ck1-back".into(),
        stdout: format!("file://{}", out.display()),
        stderr: format!("file://{}", out.display()),
        checkpoint: record,
        options,
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("restore of ck1: {e}\n{}", c.log_tail(40)));
    rt.block_on(client.start("ck1-back", "")).expect("start");
    counter_passes(c, "ck1-back", before);
    remove(c, "ck1-back");
    rt.block_on(client.delete_lease(lease))
        .expect("delete lease");

    // Paused: checkpointed frozen, and still paused after.
    counter_passes(c, "ck2", 2);
    rt.block_on(client.pause("ck2")).expect("pause");
    wait_status(c, "ck2", "PAUSED");
    let paused_images = c.dir().join("ck2-images");
    checkpoint_into(
        &rt,
        &client,
        c,
        "ck2",
        &paused_images,
        false,
        "checkpoint of a paused task",
    );
    assert!(paused_images.join("inventory.img").is_file());
    wait_status(c, "ck2", "PAUSED");
    let frozen = counter(c, "ck2").expect("counter");
    // A check that the counter does NOT move: it is given time to, then compared.
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        counter(c, "ck2"),
        Some(frozen),
        "the counter moved while paused"
    );
    rt.block_on(client.resume("ck2")).expect("resume");
    counter_passes(c, "ck2", frozen + 1);

    // Exit: the dump ends the task.
    counter_passes(c, "ck3", 2);
    let exit_images = c.dir().join("ck3-images");
    checkpoint_into(
        &rt,
        &client,
        c,
        "ck3",
        &exit_images,
        true,
        "checkpoint with exit",
    );
    assert!(exit_images.join("inventory.img").is_file());
    wait_status(c, "ck3", "STOPPED");
    c.ctr_run(&["tasks", "rm", "ck3"]).expect("task rm");
    c.ctr_run(&["containers", "rm", "ck3"])
        .expect("container rm");
    for id in ["ck0", "ck1", "ck2"] {
        remove(c, id);
    }
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(checkpoint_api, checkpoint_through_the_task_api);

/// The numbers a counter wrote to a log, in order.
fn logged_numbers(log: &Path) -> Vec<u64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Waits until the log holds a number above `above`; returns the numbers.
fn log_passes(c: &Containerd, log: &Path, above: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let numbers = logged_numbers(log);
        if numbers.last().is_some_and(|n| *n > above) {
            return numbers;
        }
        assert!(
            Instant::now() < deadline,
            "{} does not pass {above}: {numbers:?}\n{}",
            log.display(),
            c.log_tail(30)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A counter is checkpointed (leave running) into CRIU images named in runc's options,
/// killed, and restored from them into a new container (Create with runc's
/// `criu_image_path`, as the harness client sends it): the restored counter continues from
/// at least the checkpointed value, its output reaches the new task's stdout (a log URI
/// here), it lives in the new container's cgroup, and it is then managed like any task
/// (exec, pause and resume, metrics, kill with its exit status, delete), leaving nothing
/// behind. (A checkpoint stored by the task API alone is not leased
/// and containerd collects it: see the `ctr` test for restores from the content store.)
fn restore_continues_a_counter(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let rt = runtime();
    let client: TestClient = rt.block_on(c.client()).expect("client");
    let log = c.dir().join("cnt.log");
    let log_uri = format!("file://{}", log.display());
    c.ctr_run(&[
        "run",
        "-d",
        "--log-uri",
        &log_uri,
        "--runtime",
        OURS,
        &image,
        "cnt",
        "sh",
        "-c",
        COUNTER,
    ])
    .expect("run the counter");
    let seen = counter_passes(c, "cnt", 3);
    let images = c.dir().join("cnt-images");
    let frozen = freeze_between_writes(c, "cnt");
    checkpoint_into(&rt, &client, c, "cnt", &images, false, "checkpoint");
    thaw(&frozen);
    remove(c, "cnt");

    // Into a new container of its own (its own snapshot of the image).
    let id = "back";
    let out = c.dir().join("back.log");
    c.ctr_run(&[
        "containers",
        "create",
        "--runtime",
        OURS,
        &image,
        id,
        "true",
    ])
    .expect("container");
    let task = CreateTask {
        container_id: id.to_string(),
        stdout: format!("file://{}", out.display()),
        stderr: format!("file://{}", out.display()),
        options: Some(to_any(&RuncOptions {
            criu_image_path: images.to_string_lossy().into_owned(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let pid = rt
        .block_on(client.create_task(task))
        .unwrap_or_else(|e| panic!("restore {id}: {e}\n{}", c.log_tail(40)));
    assert!(pid > 0);
    assert_eq!(rt.block_on(client.start(id, "")).expect("start"), pid);
    wait_status(c, id, "RUNNING");
    let numbers = log_passes(c, &out, seen + 3);
    assert!(
        numbers[0] >= seen,
        "{id}: restored counter starts at {} below the checkpointed {seen}",
        numbers[0]
    );
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "{id}: {numbers:?}"
    );
    // Its own rootfs: the counter file is there, and moving.
    let now = counter_passes(c, id, seen);
    // `echo $i > /tmp/n` truncates before it writes: a read can land in between and see an
    // empty file (seen once in CI), so an empty read is tried again.
    let mut reads = Vec::new();
    let read = (0..10)
        .find_map(|i| {
            let exec_id = format!("rd{i}");
            let read = c
                .ctr_stdout(&["tasks", "exec", "--exec-id", &exec_id, id, "cat", "/tmp/n"])
                .unwrap_or_else(|e| panic!("exec in {id}: {e}"));
            reads.push(read.clone());
            read.trim().parse::<u64>().ok()
        })
        .unwrap_or_else(|| panic!("{id}: /tmp/n never held a number: {reads:?}"));
    assert!(read >= now, "{id}: /tmp/n holds {read}, below {now}");
    // Its own cgroup: where containerd's spec puts the new container, paused and resumed
    // through it.
    let cgroup = host::cgroup_dir(pid, "memory").expect("the cgroup of the task");
    assert_eq!(
        cgroup,
        Path::new("/sys/fs/cgroup/memory")
            .join(c.namespace())
            .join(id),
    );
    rt.block_on(client.pause(id)).expect("pause");
    wait_status(c, id, "PAUSED");
    // Compared as text: a freeze can land between `echo`'s truncate and its write, and then
    // the file stays empty until the resume (seen once in CI).
    let counter_text = || fs::read_to_string(format!("/proc/{pid}/root/tmp/n")).ok();
    let frozen = counter_text().expect("the counter file");
    // A check that the counter does NOT move: it is given time to, then compared.
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        counter_text().as_deref(),
        Some(frozen.as_str()),
        "the counter moved while paused"
    );
    rt.block_on(client.resume(id)).expect("resume");
    counter_passes(c, id, frozen.trim().parse::<u64>().unwrap_or(0) + 1);
    let metrics = c.ctr_stdout(&["tasks", "metrics", id]).expect("metrics");
    assert!(metrics.contains("pids.current"), "{metrics}");
    rt.block_on(client.kill(id, 9, false)).expect("kill");
    assert_eq!(rt.block_on(client.wait(id, "")).expect("wait"), 137);
    assert_eq!(rt.block_on(client.delete_task(id)).expect("delete"), 137);
    c.ctr_run(&["containers", "rm", id]).expect("container rm");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(restore, restore_continues_a_counter);

/// `ctr container checkpoint --task` of a running counter of this runtime, then, with the
/// container gone, `ctr container restore --live`: containerd keeps the checkpoint in its
/// content store (an image), records the runtime, and restores through it; the restored
/// counter continues from at least the checkpointed value and its output reaches the task's
/// stdout FIFO, read with `ctr task attach`.
fn ctr_checkpoint_and_live_restore(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    // Its output goes to a log (a pipe the shim copies): a stream that comes back as the
    // restored task's stdout. (A container without stdio keeps /dev/null, as under runc.)
    let log_uri = format!("file://{}", c.dir().join("live.log").display());
    c.ctr_run(&[
        "run",
        "-d",
        "--log-uri",
        &log_uri,
        "--runtime",
        OURS,
        &image,
        "live",
        "sh",
        "-c",
        COUNTER,
    ])
    .expect("run the counter");
    let seen = counter_passes(c, "live", 3);
    let reference = "hyperbox.test/live-checkpoint:1";
    // containerd pauses the (already frozen) task, dumps it and resumes it.
    let frozen = freeze_between_writes(c, "live");
    c.ctr_run(&["containers", "checkpoint", "--task", "live", reference])
        .unwrap_or_else(|e| panic!("ctr checkpoint: {e}\n{}", c.log_tail(30)));
    thaw(&frozen);
    wait_status(c, "live", "RUNNING");
    counter_passes(c, "live", seen + 1);
    remove(c, "live");

    // Without a terminal, `ctr container restore --live` returns once the task is started;
    // its output is read as any detached task's, with `ctr task attach`.
    c.ctr_run(&["containers", "restore", "--live", "live", reference])
        .unwrap_or_else(|e| panic!("ctr restore: {e}\n{}", c.log_tail(40)));
    wait_status(c, "live", "RUNNING");
    let mut attach = c
        .ctr()
        .args(["tasks", "attach", "live"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr attach");
    let stdout = attach.stdout.take().expect("stdout");
    let lines = Arc::new(Mutex::new(Vec::<u64>::new()));
    let reader = {
        let lines = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(n) = line.trim().parse() {
                    lines.lock().unwrap().push(n);
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines.lock().unwrap().len() < 5 {
        if Instant::now() > deadline || attach.try_wait().ok().flatten().is_some() {
            let _ = attach.kill();
            let out = attach.wait_with_output().expect("ctr attach output");
            panic!(
                "no counter output from the restored task: {:?}\n{}\n{}",
                lines.lock().unwrap(),
                String::from_utf8_lossy(&out.stderr),
                c.log_tail(40)
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let info = c.ctr_stdout(&["containers", "info", "live"]).expect("info");
    assert!(info.contains(OURS), "not restored through {OURS}: {info}");
    let numbers = lines.lock().unwrap().clone();
    assert!(
        numbers[0] >= seen,
        "restored counter starts at {} below the checkpointed {seen}",
        numbers[0]
    );
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "live"])
        .expect("kill");
    c.wait_ctr(attach, Duration::from_secs(20))
        .expect("ctr attach ends with its task");
    reader.join().expect("reader");
    // `ctr task attach` deletes the task it saw exit (1.6); 1.7 leaves it stopped.
    if task(c, "live").is_some() {
        wait_status(c, "live", "STOPPED");
        c.ctr_run(&["tasks", "rm", "live"]).expect("task rm");
    }
    c.ctr_run(&["containers", "rm", "live"])
        .expect("container rm");
    c.ctr_run(&["images", "rm", reference]).expect("image rm");
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(ctr_live_restore, ctr_checkpoint_and_live_restore);

/// The path an error names as CRIU's log.
fn named_log(text: &str) -> String {
    text.split("CRIU's log: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|s| s.trim_end_matches([':', '"']).to_string())
        .unwrap_or_else(|| panic!("no log named: {text}"))
}

/// Bad input harms nothing. A dump CRIU refuses (the counter holds a deleted file larger
/// than CRIU's ghost-file limit) fails naming CRIU's log, which says why, and the container
/// runs on. A restore from a directory that is not a checkpoint, and from a corrupt one,
/// fails clearly; the container being restored gets no task, no mount, no cgroup and no
/// state, and the original runs on.
fn bad_input_harms_nothing(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let fp = Footprint::of(c.dir()).expect("footprint");
    let rt = runtime();
    let client: TestClient = rt.block_on(c.client()).expect("client");

    let ghost =
        format!("head -c 3000000 /dev/zero > /tmp/big; exec 3</tmp/big; rm /tmp/big; {COUNTER}");
    run_detached(c, &image, "ghost", &ghost);
    let before = counter_passes(c, "ghost", 2);
    let images = c.dir().join("ghost-images");
    let err = rt
        .block_on(client.checkpoint_task(
            "ghost",
            Some(&CheckpointOptions {
                image_path: images.to_string_lossy().into_owned(),
                ..Default::default()
            }),
        ))
        .expect_err("CRIU dumps a deleted file over its ghost limit");
    let text = err.to_string();
    assert!(text.contains("cannot checkpoint container ghost"), "{text}");
    let log = named_log(&text);
    let log_text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{log}: {e}"));
    assert!(log_text.contains("ghost"), "{log}:\n{log_text}");
    wait_status(c, "ghost", "RUNNING");
    counter_passes(c, "ghost", before + 3);

    // A good checkpoint of another counter, to spoil.
    run_detached(c, &image, "orig", COUNTER);
    counter_passes(c, "orig", 2);
    let good = c.dir().join("orig-images");
    checkpoint_into(&rt, &client, c, "orig", &good, false, "checkpoint");
    let corrupt = c.dir().join("corrupt-images");
    fs::create_dir_all(&corrupt).unwrap();
    for entry in fs::read_dir(&good).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), corrupt.join(entry.file_name())).unwrap();
    }
    fs::write(corrupt.join("pstree.img"), b"not a CRIU image").unwrap();
    let not_a_checkpoint = c.dir().join("empty-images");
    fs::create_dir_all(&not_a_checkpoint).unwrap();

    c.ctr_run(&[
        "containers",
        "create",
        "--runtime",
        OURS,
        &image,
        "bad",
        "true",
    ])
    .expect("container");
    for (from, says) in [
        (&not_a_checkpoint, "is not a checkpoint of this shim"),
        (&corrupt, "cannot restore container bad"),
    ] {
        let err = rt
            .block_on(client.create_task(CreateTask {
                container_id: "bad".into(),
                options: Some(to_any(&RuncOptions {
                    criu_image_path: from.to_string_lossy().into_owned(),
                    ..Default::default()
                })),
                ..Default::default()
            }))
            .expect_err("a restore from bad images");
        let text = err.to_string();
        assert!(text.contains(says), "{}: {text}", from.display());
        if from == &corrupt {
            // CRIU's log stays with the images (the bundle goes with the failed task).
            let log = named_log(&text);
            let log_text = fs::read_to_string(&log).unwrap_or_else(|e| panic!("{log}: {e}"));
            assert!(log_text.contains("pstree.img"), "{log}:\n{log_text}");
            assert!(text.contains("pstree.img"), "{text}");
        }
        assert!(task(c, "bad").is_none(), "a task is left");
        let state = Path::new("/run/hyperbox/youki")
            .join(c.namespace())
            .join("bad");
        assert!(!state.exists(), "{} is left", state.display());
        let cgroup = Path::new("/sys/fs/cgroup/memory")
            .join(c.namespace())
            .join("bad");
        assert!(!cgroup.exists(), "{} is left", cgroup.display());
    }
    let now = counter(c, "orig").expect("the original runs");
    counter_passes(c, "orig", now + 2);
    c.ctr_run(&["containers", "rm", "bad"])
        .expect("container rm");
    for id in ["ghost", "orig"] {
        remove(c, id);
    }
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(bad_input, bad_input_harms_nothing);

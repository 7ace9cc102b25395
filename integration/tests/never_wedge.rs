//! No request waits behind one that blocks. One request is held blocked on purpose, and the
//! calls a client needs to stop and clean up that container (State, Pause, Resume, an exec,
//! Kill, Wait, Delete) are timed meanwhile:
//! - an exec whose `binary://` logger never reports ready (its Start waits for it);
//! - a checkpoint whose CRIU never answers (a `criu` on containerd's `PATH` that hangs in
//!   `swrk`).
//!
//! Both run through ours only: runc's shim wedges in them. Measured with the logger held
//! (the first scenario): under containerd 1.6's `io.containerd.runc.v2`, Resume, Kill, Wait
//! and Delete got no answer within 40 s; under 1.7's, Wait got none (it holds the init's exit
//! until every exec has started) and Delete was refused. Its checkpoint holds the
//! container's lock, which Kill and exit handling take.
//!
//! The shim binary must be built first (`cargo build --workspace --bins`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyperbox_integration::client::{ExecIo, TestClient};
use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::testbed::TestBed;

const OURS: &str = "io.containerd.hyperbox.v1";

/// What "promptly" means here, on a loaded two-core CI machine.
const PROMPT: Duration = Duration::from_secs(5);

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Waits up to 30 s for `path` to hold a pid, failing if the request meant to be held
/// there answers (on `held`) first.
fn pid_in(path: &Path, what: &str, held: &mpsc::Receiver<Result<(), String>>) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return pid;
        }
        if let Ok(answer) = held.try_recv() {
            panic!("the request meant to wait for {what} answered first: {answer:?}");
        }
        assert!(Instant::now() < deadline, "{what} never started");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `call` and returns how long it took and what it said (an error as text).
fn timed<T: std::fmt::Debug>(
    rt: &tokio::runtime::Runtime,
    call: impl std::future::Future<Output = Result<T, hyperbox_integration::client::ClientError>>,
) -> (Duration, Result<String, String>) {
    let started = Instant::now();
    let out = rt.block_on(async { tokio::time::timeout(Duration::from_secs(40), call).await });
    let said = match out {
        Ok(Ok(v)) => Ok(format!("{v:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 40 s".into()),
    };
    (started.elapsed(), said)
}

/// The calls that stop and clean up container `id`, each timed, in the order a client makes
/// them; `exec` adds an exec of `true` (started and waited for) while the container runs.
fn stop_and_clean_up(
    rt: &tokio::runtime::Runtime,
    client: &TestClient,
    id: &str,
    exec: bool,
) -> Vec<(&'static str, Duration, Result<String, String>)> {
    let mut calls = Vec::new();
    let mut record = |name, (took, said)| calls.push((name, took, said));
    record("state", timed(rt, client.task_status(id)));
    record("pause", timed(rt, client.pause(id)));
    record("resume", timed(rt, client.resume(id)));
    if exec {
        let process = serde_json::json!({
            "args": ["true"],
            "cwd": "/",
            "env": ["PATH=/bin:/usr/bin"],
            "user": {"uid": 0, "gid": 0},
        });
        record(
            "exec",
            timed(rt, async {
                client.exec(id, "quick", &process).await?;
                client.start(id, "quick").await?;
                client.wait(id, "quick").await
            }),
        );
    }
    record("kill", timed(rt, client.kill(id, 9, false)));
    record("wait", timed(rt, client.wait(id, "")));
    record("delete", timed(rt, client.delete_task(id)));
    calls
}

fn assert_prompt(runtime: &str, calls: &[(&str, Duration, Result<String, String>)]) {
    for (name, took, said) in calls {
        // containerd answers State itself, with an unknown status, when the shim does not.
        let running = *name != "state" || said.as_ref().is_ok_and(|s| s.starts_with("(2,"));
        assert!(
            said.is_ok() && running && *took < PROMPT,
            "{runtime}: {name} took {took:?} and said {said:?}, with a blocked request under \
             way (all calls: {calls:?})"
        );
    }
}

/// An exec whose logger never reports ready holds its Start; the container's State, Pause,
/// Resume, another exec, Kill, Wait and Delete are answered promptly meanwhile.
fn logger_held_exec(v: ContainerdVersion) {
    let (bed, image) = TestBed::for_runtime(v, OURS, TestImage::Busybox).expect("test bed");
    let c = &bed.containerd;
    let rt = tokio_rt();
    let client = rt.block_on(c.client()).expect("client");
    let id = "logheld";
    c.run_detached(OURS, &image, id, &["sleep", "1000"])
        .expect("run");
    let pidfile = c.dir().join("logger.pid");
    let logger = c.dir().join("hanging-logger");
    // Holds fd 5 (the ready signal) open without closing it.
    script(
        &logger,
        &format!("echo $$ > {}\nexec sleep 300\n", pidfile.display()),
    );
    let (tx, rx) = mpsc::channel();
    let held = {
        // A client of its own: a client's channel lives on the runtime that made it.
        let (socket, ns, id) = (
            c.socket().to_path_buf(),
            c.namespace().to_string(),
            id.to_string(),
        );
        let io = ExecIo {
            stdout: format!("binary://{}", logger.display()),
            terminal: false,
        };
        std::thread::spawn(move || {
            let process = serde_json::json!({
                "args": ["true"],
                "cwd": "/",
                "env": ["PATH=/bin:/usr/bin"],
                "user": {"uid": 0, "gid": 0},
            });
            let out = tokio_rt().block_on(async {
                let client = TestClient::connect(&socket, &ns).await?;
                client.exec_with_io(&id, "logged", &process, &io).await?;
                client.start(&id, "logged").await
            });
            let _ = tx.send(out.map(|_| ()).map_err(|e| e.to_string()));
        })
    };
    let logger_pid = pid_in(&pidfile, "the logger", &rx);
    let calls = stop_and_clean_up(&rt, &client, id, true);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(logger_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let start = rx.recv_timeout(Duration::from_secs(40));
    held.join().unwrap();
    eprintln!("{calls:?}; the held exec's start: {start:?}");
    assert_prompt(OURS, &calls);
    assert!(
        matches!(start, Ok(Err(_))),
        "the exec of a container deleted meanwhile cannot start: {start:?}"
    );
}
per_version!(logger_held, logger_held_exec);

/// The first executable `criu` on `path` other than in `skip`.
fn real_criu(path: &str, skip: &Path) -> PathBuf {
    std::env::split_paths(path)
        .filter(|d| d != skip)
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
        .expect("criu on containerd's PATH (scripts/setup-host installs it)")
}

/// A checkpoint whose CRIU never answers holds its request; the container's State, Pause,
/// Resume, an exec, Kill, Wait and Delete are answered promptly meanwhile, and the
/// checkpoint fails once CRIU goes.
fn criu_held_checkpoint(v: ContainerdVersion) {
    let (bed, image) = TestBed::for_runtime(v, OURS, TestImage::Busybox).expect("test bed");
    let c = &bed.containerd;
    let bin = c.dir().join("bin");
    let real = real_criu(c.path_env(), &bin);
    let pidfile = c.dir().join("criu.pid");
    // First on containerd's PATH, so the shims find it; `check` and `--version` go to the
    // real CRIU, `swrk` (the RPC a dump uses) hangs.
    script(
        &bin.join("criu"),
        &format!(
            "if [ \"$1\" = swrk ]; then echo $$ > {}; exec sleep 300; fi\nexec {} \"$@\"\n",
            pidfile.display(),
            real.display()
        ),
    );
    let rt = tokio_rt();
    let client = rt.block_on(c.client()).expect("client");
    let id = "criuheld";
    c.run_detached(OURS, &image, id, &["sleep", "1000"])
        .expect("run");
    let (tx, rx) = mpsc::channel();
    let held = {
        // A client of its own: a client's channel lives on the runtime that made it.
        let (socket, ns) = (c.socket().to_path_buf(), c.namespace().to_string());
        std::thread::spawn(move || {
            let out = tokio_rt().block_on(async {
                let client = TestClient::connect(&socket, &ns).await?;
                client.checkpoint_task(id, None).await
            });
            let _ = tx.send(out.map(|_| ()).map_err(|e| e.to_string()));
        })
    };
    let criu_pid = pid_in(&pidfile, "the dump's CRIU", &rx);
    let calls = stop_and_clean_up(&rt, &client, id, true);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(criu_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let checkpoint = rx.recv_timeout(Duration::from_secs(40));
    held.join().unwrap();
    eprintln!("{calls:?}; the held checkpoint: {checkpoint:?}");
    assert_prompt(OURS, &calls);
    assert!(
        matches!(checkpoint, Ok(Err(_))),
        "a checkpoint whose CRIU died fails: {checkpoint:?}"
    );
}
per_version!(criu_held, criu_held_checkpoint);

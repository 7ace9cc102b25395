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
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hyperbox_integration::client::{ClientError, ExecIo, TestClient};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
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

/// Each call's name, how long it took and what it said.
type Calls = Vec<(&'static str, Duration, Result<String, String>)>;

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

/// Sends a request on a thread of its own (`request`, with a client of its own: a client's
/// channel lives on the runtime that made it) that a helper holds: once the helper wrote its
/// pid to `pidfile`, times [`stop_and_clean_up`] of container `id`, then kills the helper.
/// Returns the timed calls and what the held request said in the end.
fn while_held<F, T>(
    c: &Containerd,
    id: &str,
    pidfile: &Path,
    what: &str,
    request: F,
) -> (Calls, Result<Result<(), String>, mpsc::RecvTimeoutError>)
where
    F: FnOnce(TestClient) -> T + Send + 'static,
    T: std::future::Future<Output = Result<(), ClientError>>,
{
    let rt = tokio_rt();
    let client = rt.block_on(c.client()).expect("client");
    let (tx, rx) = mpsc::channel();
    let (socket, ns) = (c.socket().to_path_buf(), c.namespace().to_string());
    let held = std::thread::spawn(move || {
        let out = tokio_rt().block_on(async {
            let client = TestClient::connect(&socket, &ns).await?;
            request(client).await
        });
        let _ = tx.send(out.map_err(|e| e.to_string()));
    });
    let pid = pid_in(pidfile, what, &rx);
    let calls = stop_and_clean_up(&rt, &client, id, true);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let answer = rx.recv_timeout(Duration::from_secs(40));
    held.join().unwrap();
    (calls, answer)
}

/// An exec whose logger never reports ready holds its Start; the container's State, Pause,
/// Resume, another exec, Kill, Wait and Delete are answered promptly meanwhile.
fn logger_held_exec(v: ContainerdVersion) {
    let (bed, image) = TestBed::for_runtime(v, OURS, TestImage::Busybox).expect("test bed");
    let c = &bed.containerd;
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
    let io = ExecIo {
        stdout: format!("binary://{}", logger.display()),
        terminal: false,
    };
    let (calls, start) = while_held(c, id, &pidfile, "the logger", move |client| async move {
        let process = serde_json::json!({
            "args": ["true"],
            "cwd": "/",
            "env": ["PATH=/bin:/usr/bin"],
            "user": {"uid": 0, "gid": 0},
        });
        client.exec_with_io(id, "logged", &process, &io).await?;
        client.start(id, "logged").await.map(drop)
    });
    eprintln!("{calls:?}; the held exec's start: {start:?}");
    assert_prompt(OURS, &calls);
    assert!(
        matches!(start, Ok(Err(_))),
        "the exec of a container deleted meanwhile cannot start: {start:?}"
    );
}
per_version!(logger_held, logger_held_exec);

/// A checkpoint whose CRIU never answers holds its request; the container's State, Pause,
/// Resume, an exec, Kill, Wait and Delete are answered promptly meanwhile, and the
/// checkpoint fails once CRIU goes.
fn criu_held_checkpoint(v: ContainerdVersion) {
    let (bed, image) = TestBed::for_runtime(v, OURS, TestImage::Busybox).expect("test bed");
    let c = &bed.containerd;
    let pidfile = c.dir().join("criu.pid");
    c.hang_criu_requests(&pidfile).expect("a hanging criu");
    let id = "criuheld";
    c.run_detached(OURS, &image, id, &["sleep", "1000"])
        .expect("run");
    let (calls, checkpoint) = while_held(
        c,
        id,
        &pidfile,
        "the dump's CRIU",
        move |client| async move { client.checkpoint_task(id, None).await.map(drop) },
    );
    eprintln!("{calls:?}; the held checkpoint: {checkpoint:?}");
    assert_prompt(OURS, &calls);
    assert!(
        matches!(checkpoint, Ok(Err(_))),
        "a checkpoint whose CRIU died fails: {checkpoint:?}"
    );
}
per_version!(criu_held, criu_held_checkpoint);

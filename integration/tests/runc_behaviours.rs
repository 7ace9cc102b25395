//! Requests answered as runc's shim answers them, in states where a shim is easy to get
//! wrong: each scenario runs through `io.containerd.runc.v2` and through ours in the same
//! containerd and compares what the client sees.
//! - an exec into a paused task is refused at once with runc's words, and the task can be
//!   resumed and exec'd into afterwards (it hung, and wedged the shim, before);
//! - a created task's resources can be updated before it starts.
//!
//! The shim binary must be built first (`cargo build --workspace --bins`).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hyperbox_integration::client::CreateTask;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::testbed::TestBed;

const RUNC: &str = "io.containerd.runc.v2";
const OURS: &str = "io.containerd.hyperbox.v1";
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

/// Runs `ctr ARGS` and returns (success, stderr), failing the test if it takes over 20 s.
fn ctr(c: &Containerd, args: &[&str]) -> (bool, String) {
    let child = c
        .ctr()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr runs");
    let out = c
        .wait_ctr(child, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("ctr {args:?} did not answer: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// `ctr task exec` into a paused task fails at once saying why, as under runc's shim; resume
/// answers, and an exec after it runs.
fn exec_into_paused_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let mut seen = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("paused{n}");
        c.ctr_run(&[
            "run",
            "-d",
            "--null-io",
            "--runtime",
            runtime,
            &image,
            &id,
            "sleep",
            "1000",
        ])
        .unwrap_or_else(|e| panic!("{runtime}: {e}"));
        assert!(ctr(c, &["tasks", "pause", &id]).0, "{runtime} pause");
        let (ok, stderr) = ctr(c, &["tasks", "exec", "--exec-id", "frozen", &id, "true"]);
        let refused = (ok, stderr.replace(&id, "ID"));
        let resumed = ctr(c, &["tasks", "resume", &id]);
        let after = ctr(c, &["tasks", "exec", "--exec-id", "thawed", &id, "true"]);
        let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", &id]);
        seen.push((refused, resumed.0, after.0));
    }
    assert!(
        seen[0].0 .1.contains("cannot exec in a paused state"),
        "runc's refusal: {:?}",
        seen[0]
    );
    assert_eq!(
        seen[1], seen[0],
        "hyperbox vs runc: (exec refused, resume, exec after)"
    );
}
per_version!(exec_into_paused, exec_into_paused_as_runc);

fn memory_limit(pid: u32) -> String {
    let dir = hyperbox_integration::host::cgroup_dir(pid, "memory").expect("memory cgroup");
    std::fs::read_to_string(Path::new(&dir).join("memory.limit_in_bytes"))
        .expect("memory.limit_in_bytes")
        .trim()
        .to_string()
}

/// Update of a created (not yet started) task applies the limits, as runc's shim does.
fn update_created_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = rt.block_on(c.client()).expect("client");
    let mut seen = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("upd{n}");
        let mut create = vec!["containers", "create", "--runtime", runtime, &image, &id];
        // ctr 1.6 needs `--` before the command's flags; 1.7 must not get it.
        if v == ContainerdVersion::V1_6 {
            create.push("--");
        }
        create.extend(["sleep", "1000"]);
        c.ctr_run(&create).expect("container created");
        let pid = rt
            .block_on(client.create_task(CreateTask {
                container_id: id.clone(),
                ..Default::default()
            }))
            .unwrap_or_else(|e| panic!("{runtime} create: {e}"));
        let updated = rt.block_on(
            client.update_task(&id, &serde_json::json!({"memory": {"limit": 56_623_104}})),
        );
        seen.push((updated.map_err(|e| e.to_string()), memory_limit(pid)));
        let _ = rt.block_on(client.kill(&id, 9, false));
        let _ = rt.block_on(client.delete_task(&id));
    }
    assert_eq!(seen[0], (Ok(()), "56623104".to_string()), "runc's view");
    assert_eq!(seen[1], seen[0], "hyperbox vs runc");
}
per_version!(update_created, update_created_as_runc);

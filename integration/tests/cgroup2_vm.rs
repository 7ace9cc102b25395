//! The shims on a pure cgroup v2 host: `scripts/vm-cgroup2` boots Debian's kernel with
//! `cgroup_no_v1=all` in qemu and runs containerd 1.7 there with runc's shim and ours
//! (pause/resume, metrics, limits, OOM events, kill --all, exec, run exit codes; CRIU checkpoint,
//! restore and templates through ours); this test
//! asserts the guest finished and every `CHECK` line passed. The development hosts are
//! cgroup hybrid, so this is where the shims' cgroup v2 paths run.
//!
//! Needs root and qemu (`scripts/setup-host` installs `qemu-system-x86`); the kernel is
//! downloaded once through apt into `HYPERBOX_CACHE/vm`. See `integration/VM.md`.

use std::path::Path;
use std::process::Command;

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::host;

#[test]
fn shims_on_pure_cgroup_v2() {
    if !ContainerdVersion::selected().contains(&ContainerdVersion::V1_7) {
        eprintln!("the VM runs containerd 1.7, not selected by HYPERBOX_CONTAINERD: skipped");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/vm-cgroup2");
    let bin_dir = host::workspace_bin_dir().expect("the workspace's target directory");
    let out = Command::new(&script)
        // 1.5 minutes on an idle development machine (emulated CPU), up to 4 on a busy one.
        .args(["--timeout", "420"])
        .env("HYPERBOX_BIN_DIR", &bin_dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("CHECK ")).collect();
    let failed: Vec<&str> = checks
        .iter()
        .copied()
        .filter(|l| l.split_whitespace().nth(2) != Some("PASS"))
        .collect();
    assert!(
        stdout.lines().any(|l| l == "DONE"),
        "the VM did not finish ({}): see the console lines above",
        out.status
    );
    assert!(!checks.is_empty(), "no CHECK lines from the VM");
    assert!(
        failed.is_empty(),
        "{} of {} checks failed on pure cgroup v2:\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n")
    );
    assert!(out.status.success(), "scripts/vm-cgroup2: {}", out.status);
}

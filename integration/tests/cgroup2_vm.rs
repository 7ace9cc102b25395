//! The shims on a pure cgroup v2 host: `scripts/vm-cgroup2` boots Debian's kernel with
//! `cgroup_no_v1=all` in qemu and runs containerd 1.7 there with runc's shim and ours
//! (pause/resume, metrics, limits, OOM events, kill --all, exec, run exit codes; CRIU checkpoint,
//! restore and templates through ours); this test
//! asserts the guest finished and every `CHECK` line passed. The development hosts are
//! cgroup hybrid, so this is where the shims' cgroup v2 paths run.
//!
//! Needs root and qemu (`scripts/setup-host` installs `qemu-system-x86`); the kernel is
//! downloaded once through apt into `HYPERBOX_CACHE/vm`. See `integration/VM.md`.

use std::process::Command;

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::{host, vm};

#[test]
fn shims_on_pure_cgroup_v2() {
    if !ContainerdVersion::selected().contains(&ContainerdVersion::V1_7) {
        hyperbox_integration::skip(
            "the VM runs containerd 1.7, not selected by HYPERBOX_CONTAINERD",
        );
        return;
    }
    let bin_dir = host::workspace_bin_dir().expect("the workspace's target directory");
    let mut cmd = Command::new(vm::script("vm-cgroup2"));
    // 1.5 minutes on an idle development machine (emulated CPU), up to 4 on a busy one.
    cmd.args(["--timeout", "420"])
        .env("HYPERBOX_BIN_DIR", &bin_dir);
    vm::assert_checks_pass(cmd, "pure cgroup v2");
}

//! `hyperbox-node` on a real host: `scripts/vm-node` boots Debian 12 with systemd in qemu,
//! containerd (1.7, then 2.1) running as systemd's `containerd.service` from a user's own
//! commented configuration, and the guest (`integration/vm/node-guest`) installs this
//! build's release, runs containers through ctr (both runtimes, the snapshotter) and crictl
//! (the RuntimeClass handlers), reboots and checks that everything came back, uninstalls
//! (the configuration byte for byte the original, every file gone), then runs the release's
//! installer image as its DaemonSet would and uninstalls again.
//!
//! Needs root and qemu (`scripts/setup-host`); the release is `HYPERBOX_RELEASE_DIR`
//! (`scripts/test` makes it with `scripts/release --profile dev`), else the script makes one.

use std::process::Command;

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::vm;

fn run(version: ContainerdVersion, flag: &str) {
    if !ContainerdVersion::selected().contains(&version) {
        hyperbox_integration::skip(&format!(
            "the VM's containerd {flag} is not selected by HYPERBOX_CONTAINERD"
        ));
        return;
    }
    let mut cmd = Command::new(vm::script("vm-node"));
    // About 4.5 minutes emulated on an idle development machine (two boots).
    cmd.args(["--containerd", flag, "--timeout", "1200"]);
    if let Ok(dir) = std::env::var("HYPERBOX_RELEASE_DIR") {
        cmd.args(["--release", &dir]);
    }
    vm::assert_checks_pass(cmd, &format!("hyperbox-node on containerd {flag}"));
}

/// One test: the VM scripts take a host-wide lock, one VM at a time.
#[test]
fn install_reboot_uninstall_on_systemd_hosts() {
    run(ContainerdVersion::V1_7, "1.7");
    run(ContainerdVersion::V2_1, "2.1");
}

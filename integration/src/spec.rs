//! OCI specs for `ctr run --config`: `ctr oci spec`'s default spec over a rootfs of the
//! host's static busybox, for tests that set spec fields `ctr` has no flag for.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::containerd::Containerd;

/// A rootfs in `dir/rootfs` of the host's static busybox (Debian's `busybox-static`), every
/// applet linked in `/bin`, with the empty directories `dirs` (and `proc`, `dev`, `sys`,
/// `tmp`) made. Returns its path.
pub fn busybox_rootfs(dir: &Path, dirs: &[&str]) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp"].iter().chain(dirs) {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
    }
    root
}

/// `ctr oci spec`'s default spec over [`busybox_rootfs`] in `dir` (with `dirs`), without a
/// terminal, `PATH=/bin`.
pub fn config_spec(c: &Containerd, dir: &Path, dirs: &[&str]) -> serde_json::Value {
    let root = busybox_rootfs(dir, dirs);
    let out = c
        .ctr()
        .args(["oci", "spec"])
        .output()
        .expect("ctr oci spec");
    assert!(out.status.success(), "ctr oci spec");
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["root"] = serde_json::json!({"path": root, "readonly": false});
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    spec
}

/// Writes `spec` as `dir/config.json` and returns that path, for `ctr run --config`.
pub fn write(dir: &Path, spec: &serde_json::Value) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
    path
}

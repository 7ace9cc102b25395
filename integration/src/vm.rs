//! Running the qemu VM scripts (`scripts/vm-cgroup2`, `scripts/vm-node`) from tests: the
//! guest prints `CHECK NAME PASS|FAIL DETAIL` lines and `DONE`; a run passes only if the
//! guest finished, printed checks, and every one passed. See `integration/VM.md`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A script of the repository's `scripts/`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

/// Runs `cmd` (a VM script), prints its output, and panics unless the guest finished and all
/// its checks passed.
pub fn assert_checks_pass(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
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
        "the VM ({what}) did not finish ({}): see the console lines above",
        out.status
    );
    assert!(!checks.is_empty(), "no CHECK lines from the VM ({what})");
    assert!(
        failed.is_empty(),
        "{} of {} checks failed ({what}):\n{}",
        failed.len(),
        checks.len(),
        failed.join("\n")
    );
    assert!(out.status.success(), "{what}: {}", out.status);
}

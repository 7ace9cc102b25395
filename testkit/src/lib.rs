//! What every HyperBox test suite shares, unit tests and integration tests alike.
//!
//! A test that cannot run here (no root, no CRIU, a containerd version not selected) calls
//! [`skip`] and returns. libtest would count it as passed; `scripts/test` counts it as
//! skipped instead: it names a file in [`SKIP_LOG_ENV`], every skip appends a line there,
//! and its summary ends with `N passed, N failed, N skipped`. Under CI a skip that
//! `scripts/skips-allowed` does not list fails the run.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

/// The environment variable naming the file skips are recorded in.
pub const SKIP_LOG_ENV: &str = "HYPERBOX_SKIP_LOG";

/// The running test's name as libtest runs it (`module::test`), with its test binary's
/// (`shim_lifecycle::timeline::v1_6`; a unit test's binary is its crate).
pub fn current_test() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| match n.rsplit_once('-') {
            // cargo names test binaries NAME-HASH.
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_string(),
            _ => n,
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("main");
    format!("{binary}::{test}")
}

/// Marks the running test skipped because of `reason`: prints it, and records
/// `TEST<TAB>REASON` in the skip log when one is named. The caller returns right after.
pub fn skip(reason: &str) {
    let test = current_test();
    let reason = reason.replace(['\n', '\t'], " ");
    eprintln!("{test}: skipped: {reason}");
    let Some(path) = std::env::var_os(SKIP_LOG_ENV) else {
        return;
    };
    let line = format!("{test}\t{reason}\n");
    // One write to an O_APPEND file: lines of tests running at once stay whole.
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", path.to_string_lossy());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_is_named_with_its_binary() {
        let name = current_test();
        assert!(
            name.starts_with("hyperbox_testkit::")
                && name.ends_with("the_test_is_named_with_its_binary"),
            "{name}"
        );
    }
}

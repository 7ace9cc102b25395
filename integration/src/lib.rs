//! The HyperBox test harness.
//!
//! Everything here drives real parts: a private containerd (1.6 from Debian 12, 1.7 unpacked
//! from Debian 13, or 2.1 built from source by `scripts/setup-host`) with its own root,
//! state, socket and generated config; a real OCI registry on loopback; offline images built reproducibly from Debian
//! packages; a small client for the containerd calls `ctr` cannot make; and a private Docker
//! Engine driving a harness containerd.
//!
//! Every daemon the harness starts lives in a [`sandbox::Sandbox`]: a directory with a record
//! of what was started, watched by a guard process that tears everything down when the owner
//! goes away, also when it panics or is killed.

/// A skip counted as one (see `hyperbox_testkit`): every suite of this crate skips through it.
pub use hyperbox_testkit::skip;

/// Whether a test of containerd `v` may run: `HYPERBOX_CONTAINERD` selects it. When it does
/// not, the test is recorded as skipped ([`skip`]) and should return.
pub fn selected_or_skip(v: containerd::ContainerdVersion) -> bool {
    let selected = containerd::ContainerdVersion::selected().contains(&v);
    if !selected {
        skip(&format!(
            "containerd {v} not selected by HYPERBOX_CONTAINERD"
        ));
    }
    selected
}

/// Waits until `condition` holds, checking it every 50 ms; panics naming `what` when it still
/// does not after `timeout`. This is how a test waits for something to happen; a check that
/// something does *not* happen within a time keeps its sleep and says so.
pub fn wait_until(
    timeout: std::time::Duration,
    what: impl std::fmt::Display,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

pub mod cli;
pub mod client;
pub mod containerd;
pub mod cri;
pub mod docker;
pub mod gpu;
pub mod host;
pub mod images;
pub mod pty;
pub mod registry;
pub mod sandbox;
pub mod snapshotter;
pub mod spec;
pub mod templates;
pub mod testbed;
pub mod vm;
pub mod wasm_image;
pub mod workloads;

/// Generates one test per containerd version: `per_version!(name, body_fn)` makes
/// `name::v1_6`, `name::v1_7` and `name::v2_1`, each calling `body_fn(version)`. A version
/// left out by `HYPERBOX_CONTAINERD` is reported and skipped; `v2_1` is marked ignored
/// (counted as skipped) when the build found no containerd 2.1 source to build it from.
#[macro_export]
macro_rules! per_version {
    ($name:ident, $body:path) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run(v: $crate::containerd::ContainerdVersion) {
                if !$crate::selected_or_skip(v) {
                    return;
                }
                $body(v)
            }

            #[test]
            fn v1_6() {
                run($crate::containerd::ContainerdVersion::V1_6)
            }

            #[test]
            fn v1_7() {
                run($crate::containerd::ContainerdVersion::V1_7)
            }

            #[test]
            #[cfg_attr(
                hyperbox_containerd2_unavailable,
                ignore = "containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a \
                          folder holding containerd-2.1.9-src.tar.xz (CI sets it; \
                          scripts/setup-host builds containerd 2.1 from it)"
            )]
            fn v2_1() {
                run($crate::containerd::ContainerdVersion::V2_1)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::wait_until;

    #[test]
    fn wait_until_returns_once_the_condition_holds() {
        let mut checks = 0;
        wait_until(Duration::from_secs(10), "the third check", || {
            checks += 1;
            checks == 3
        });
        assert_eq!(checks, 3);
    }

    #[test]
    #[should_panic(expected = "timed out after 100ms waiting for nothing")]
    fn wait_until_fails_naming_what_it_waited_for() {
        wait_until(Duration::from_millis(100), "nothing", || false);
    }
}

//! Starting the kernel's wait for a cgroup migration early, beside the shim's start-up
//! instead of inside Create.
//!
//! Moving a process into a cgroup (libcontainer's intermediate process writing itself into
//! the container's `cgroup.procs`, as runc's parent writes its child) takes the kernel's
//! global `cgroup_threadgroup_rwsem` for writing. Unless the host mounts cgroups with
//! `favordynmods`, the first writer after a quiet spell waits for a full RCU grace period
//! (`rcu_sync_enter` → `synchronize_rcu`): 10 to 15 ms on the 2-vCPU machines we measure on,
//! most of a container's Create (`hyperbox-bench ctr-run --breakdown`). Writers that come
//! while the grace period is running, or within a grace period after the last writer left,
//! do not wait again.
//!
//! So the task server, once its zygote is forked, moves itself into the cgroup it is already
//! in (a migration that changes nothing) on a thread of its own: the grace period then runs
//! while containerd connects and sends Create, and the container's own migration finds it
//! over or under way. Best effort: any failure only means the wait happens where it did.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Roots where the unified (v2) hierarchy is mounted: a hybrid host's, then a v2 host's.
const UNIFIED_MOUNTS: [&str; 2] = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];

/// The `cgroup.procs` of this process's own cgroup in the unified hierarchy, if it is mounted
/// where expected and really lists this process (so the write below cannot move it anywhere:
/// in a cgroup namespace whose paths do not match the mount, nothing is found).
fn own_procs_file(pid: u32) -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let relative = Path::new(path.trim_start_matches('/'));
    UNIFIED_MOUNTS.iter().find_map(|root| {
        if !is_cgroup2(Path::new(root)) {
            return None;
        }
        let procs = Path::new(root).join(relative).join("cgroup.procs");
        let listed = fs::read_to_string(&procs).ok()?;
        listed
            .lines()
            .any(|l| l.trim().parse() == Ok(pid))
            .then_some(procs)
    })
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// Moves this process into its own cgroup again, once (blocks for the grace period).
fn migrate_in_place() {
    let pid = std::process::id();
    let Some(procs) = own_procs_file(pid) else {
        return;
    };
    crate::timeline::mark("cgroup_warmup.begin", "");
    let written = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()));
    crate::timeline::mark("cgroup_warmup.end", "");
    if let Err(e) = written {
        tracing::debug!("no early cgroup migration through {}: {e}", procs.display());
    }
}

/// Starts [`migrate_in_place`] on a thread of its own; call once the process may have threads.
pub(crate) fn start() {
    let _ = std::thread::Builder::new()
        .name("cgroup-warmup".into())
        .stack_size(64 * 1024)
        .spawn(migrate_in_place);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_cgroup() -> Option<String> {
        let text = fs::read_to_string("/proc/self/cgroup").ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(String::from)
    }

    #[test]
    fn the_migration_leaves_the_process_where_it_was() {
        let before = own_cgroup();
        migrate_in_place();
        assert_eq!(own_cgroup(), before);
    }

    #[test]
    fn a_file_is_only_found_where_it_lists_this_process() {
        // pid 0 is never listed: whatever the host's layout, nothing is found for it.
        assert_eq!(own_procs_file(0), None);
        if let Some(procs) = own_procs_file(std::process::id()) {
            let text = fs::read_to_string(&procs).unwrap();
            assert!(text
                .lines()
                .any(|l| l.trim() == std::process::id().to_string()));
        }
    }
}

//! Exit reaping. The shim is a child subreaper (containerd-shim sets it up), so container
//! processes, whichever process forked them, end up as its children; this reaps every child
//! on SIGCHLD and reports `(pid, exit status)` in containerd's convention.

use std::process::{Child, Command};
use std::sync::RwLock;
use std::time::SystemTime;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: u32,
    pub status: u32,
    pub at: SystemTime,
}

/// The exit status containerd and runc's shim report: the exit code, or 128+N for a process
/// killed by signal N. `None` for statuses that are not an end (stopped, continued).
pub fn exit_status(ws: WaitStatus) -> Option<(Pid, u32)> {
    match ws {
        WaitStatus::Exited(pid, code) => Some((pid, code as u32)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid, 128 + sig as u32)),
        _ => None,
    }
}

/// Held for reading while std's `Command::spawn` runs, for writing while the reaper reaps.
/// When `exec` fails in the child, std reaps that child itself with `waitpid` and panics if it
/// is already gone ("wait() should either return Ok or panic"); a reaper pass between the
/// child's exit and that `waitpid` would take it.
static SPAWNING: RwLock<()> = RwLock::new(());

/// `cmd.spawn()`, safe from the reaper: a child whose `exec` fails is left for std to reap,
/// and the failure comes back as an error.
pub(crate) fn spawn_command(cmd: &mut Command) -> std::io::Result<Child> {
    let _guard = SPAWNING.read().unwrap_or_else(|p| p.into_inner());
    cmd.spawn()
}

/// Starts reaping: every child that ends is sent on the returned channel.
pub fn spawn() -> std::io::Result<mpsc::UnboundedReceiver<Reaped>> {
    let mut sigchld = signal(SignalKind::child())?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            // Children that ended before the handler was installed are reaped on the first
            // pass, which runs before the first signal. No spawn is in flight meanwhile.
            let guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(ws) => {
                        if let Some((pid, status)) = exit_status(ws) {
                            let reaped = Reaped {
                                pid: pid.as_raw() as u32,
                                status,
                                at: SystemTime::now(),
                            };
                            if tx.send(reaped).is_err() {
                                return;
                            }
                        }
                    }
                    Err(Errno::EINTR) => {}
                    Err(e) => {
                        tracing::warn!("waitpid: {e}");
                        break;
                    }
                }
            }
            drop(guard);
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    /// Failed `exec`s while the reaper runs: without the guard, the reaper takes some of the
    /// failed children before std's own `waitpid`, and std panics.
    #[test]
    fn failed_execs_are_not_stolen_from_spawn() {
        use std::os::unix::process::CommandExt;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let _rx = rt.block_on(async { spawn() }).unwrap();
        for _ in 0..300 {
            let mut cmd = Command::new("/no/such/program");
            // SAFETY: the closure does nothing; pre_exec makes std fork and exec itself, the
            // path on which it reaps a child whose exec failed.
            unsafe {
                cmd.pre_exec(|| Ok(()));
            }
            let e = spawn_command(&mut cmd).expect_err("no such program");
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
            // Another child that ends, so the reaper runs between the spawns.
            let _ = spawn_command(&mut Command::new("/bin/true"));
        }
        rt.shutdown_background();
    }

    #[test]
    fn exits_map_as_runc_shim_reports_them() {
        let p = Pid::from_raw(42);
        assert_eq!(exit_status(WaitStatus::Exited(p, 0)), Some((p, 0)));
        assert_eq!(exit_status(WaitStatus::Exited(p, 3)), Some((p, 3)));
        assert_eq!(
            exit_status(WaitStatus::Signaled(p, Signal::SIGKILL, false)),
            Some((p, 137))
        );
        assert_eq!(
            exit_status(WaitStatus::Signaled(p, Signal::SIGTERM, true)),
            Some((p, 143))
        );
        assert_eq!(exit_status(WaitStatus::Stopped(p, Signal::SIGSTOP)), None);
        assert_eq!(exit_status(WaitStatus::Continued(p)), None);
    }
}

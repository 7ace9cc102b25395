//! Exit reaping. The shim is a child subreaper (containerd-shim sets it up), so container
//! processes, whichever process forked them, end up as its children; this reaps every child
//! on SIGCHLD and reports `(pid, exit status)` in containerd's convention.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

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

/// The process whose reaper runs (0: none). A process forked from the shim (the zygote and
/// its workers) inherits the statics but not the reaper's thread: there, children are waited
/// for by std as usual.
static REAPER_PID: AtomicI32 = AtomicI32::new(0);

/// Children the shim runs for itself (CRIU's checks, `cp`), by pid: the reaper keeps their
/// exit status here for [`OwnedChild`] instead of reporting it as a container's exit.
static OWNED: Mutex<Option<HashMap<i32, Option<ExitStatus>>>> = Mutex::new(None);
static OWNED_ENDED: Condvar = Condvar::new();

fn reaping_here() -> bool {
    REAPER_PID.load(Ordering::Acquire) == std::process::id() as i32
}

fn owned() -> std::sync::MutexGuard<'static, Option<HashMap<i32, Option<ExitStatus>>>> {
    OWNED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Keeps the status of `pid` if it is an [`OwnedChild`]'s; false if it is not one.
fn keep_if_owned(pid: i32, ws: WaitStatus) -> bool {
    let raw = match ws {
        WaitStatus::Exited(_, code) => (code & 0xff) << 8,
        WaitStatus::Signaled(_, sig, core) => sig as i32 | if core { 0x80 } else { 0 },
        _ => return false,
    };
    let mut table = owned();
    match table.as_mut().and_then(|t| t.get_mut(&pid)) {
        Some(slot) => {
            *slot = Some(ExitStatus::from_raw(raw));
            OWNED_ENDED.notify_all();
            true
        }
        None => false,
    }
}

/// A child the shim runs for itself and waits for, such as CRIU or `cp`. In the shim process
/// the reaper takes every child that ends (it is a subreaper and must reap what containers
/// leave), so std's own `wait` could find the child gone (`ECHILD`): an owned child's status
/// is handed over by the reaper instead. Elsewhere it is std's `Child`, waited for as usual.
#[derive(Debug)]
pub struct OwnedChild {
    child: Child,
    /// Whether the reaper hands the status over (the child was started in the reaper's process).
    registered: bool,
    status: Option<ExitStatus>,
}

impl OwnedChild {
    /// Starts `cmd`; see [`OwnedChild`].
    pub fn spawn(cmd: &mut Command) -> std::io::Result<OwnedChild> {
        if !reaping_here() {
            return Ok(OwnedChild {
                child: cmd.spawn()?,
                registered: false,
                status: None,
            });
        }
        // Under the spawn guard the reaper cannot run, so the child is registered before it
        // can be reaped.
        let _guard = SPAWNING.read().unwrap_or_else(|p| p.into_inner());
        let child = cmd.spawn()?;
        owned()
            .get_or_insert_with(HashMap::new)
            .insert(child.id() as i32, None);
        Ok(OwnedChild {
            child,
            registered: true,
            status: None,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Its pipes, as std's `Child` has them.
    pub fn stdout(&mut self) -> &mut Option<std::process::ChildStdout> {
        &mut self.child.stdout
    }

    pub fn stderr(&mut self) -> &mut Option<std::process::ChildStderr> {
        &mut self.child.stderr
    }

    /// Its status if it has ended, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        if !self.registered {
            self.status = self.child.try_wait()?;
            return Ok(self.status);
        }
        let mut table = owned();
        let pid = self.child.id() as i32;
        if let Some(Some(status)) = table.as_ref().and_then(|t| t.get(&pid)) {
            self.status = Some(*status);
            table.as_mut().map(|t| t.remove(&pid));
        }
        Ok(self.status)
    }

    /// Waits for it to end, at most `limit` (forever when `None`); `None` if it has not.
    pub fn wait_for(&mut self, limit: Option<Duration>) -> std::io::Result<Option<ExitStatus>> {
        if self.status.is_some() {
            return Ok(self.status);
        }
        if !self.registered {
            return match limit {
                None => self.child.wait().map(Some),
                Some(limit) => {
                    let until = Instant::now() + limit;
                    loop {
                        if let Some(s) = self.try_wait()? {
                            return Ok(Some(s));
                        }
                        if Instant::now() >= until {
                            return Ok(None);
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            };
        }
        let until = limit.map(|l| Instant::now() + l);
        let pid = self.child.id() as i32;
        let mut table = owned();
        loop {
            if let Some(Some(status)) = table.as_ref().and_then(|t| t.get(&pid)) {
                self.status = Some(*status);
                table.as_mut().map(|t| t.remove(&pid));
                return Ok(self.status);
            }
            match until {
                None => table = OWNED_ENDED.wait(table).unwrap_or_else(|p| p.into_inner()),
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    table = OWNED_ENDED
                        .wait_timeout(table, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Waits for it to end.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        Ok(self
            .wait_for(None)?
            .expect("a wait without a limit ends with a status"))
    }

    /// SIGKILL, unless it has already ended (its pid may then be another process's).
    pub fn kill(&mut self) -> std::io::Result<()> {
        if !self.registered {
            return self.child.kill();
        }
        let table = owned();
        let pid = self.child.id() as i32;
        if self.status.is_some()
            || matches!(table.as_ref().and_then(|t| t.get(&pid)), Some(Some(_)))
        {
            return Ok(());
        }
        // SAFETY: kill(2) on our own child, which has not been reaped (the table lock is held,
        // and the reaper records the status under it).
        if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads its piped stdout and stderr to their end, then waits for it, as
    /// `Child::wait_with_output` does.
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        let stderr = self.child.stderr.take();
        let reading_err = std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_end(&mut buf);
            }
            buf
        });
        let mut stdout = Vec::new();
        if let Some(mut o) = self.child.stdout.take() {
            o.read_to_end(&mut stdout)?;
        }
        let stderr = reading_err.join().unwrap_or_default();
        let status = self.wait()?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        if self.registered {
            // A child dropped before it ends is reported by the reaper as any other.
            owned()
                .as_mut()
                .map(|t| t.remove(&(self.child.id() as i32)));
        }
    }
}

/// `cmd.output()` for a command the shim runs for itself: stdout and stderr captured, stdin as
/// `cmd` sets it (std's `output` would make it /dev/null); see [`OwnedChild`].
pub fn output(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    OwnedChild::spawn(cmd)?.wait_with_output()
}

/// Starts reaping: every child that ends is sent on the returned channel.
pub fn spawn() -> std::io::Result<mpsc::UnboundedReceiver<Reaped>> {
    let mut sigchld = signal(SignalKind::child())?;
    let (tx, rx) = mpsc::unbounded_channel();
    REAPER_PID.store(std::process::id() as i32, Ordering::Release);
    tokio::spawn(async move {
        loop {
            // Children that ended before the handler was installed are reaped on the first
            // pass, which runs before the first signal. No spawn is in flight meanwhile.
            let guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
            loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                    Ok(ws) => {
                        if ws.pid().is_some_and(|p| keep_if_owned(p.as_raw(), ws)) {
                            continue;
                        }
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

    /// The reaper tests each start a reaper, which reaps every child of the test process: one
    /// at a time, so that each sees only its own children.
    static ONE_REAPER: Mutex<()> = Mutex::new(());

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Failed `exec`s while the reaper runs: without the guard, the reaper takes some of the
    /// failed children before std's own `waitpid`, and std panics.
    #[test]
    fn failed_execs_are_not_stolen_from_spawn() {
        use std::os::unix::process::CommandExt;
        let _one = ONE_REAPER.lock().unwrap_or_else(|p| p.into_inner());
        let rt = runtime();
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

    /// Children the shim runs for itself, while the reaper reaps every child: each one's
    /// status and output come back (none is lost to the reaper, which an `ECHILD` from std's
    /// `wait` would show), and none is reported as a container's exit.
    #[test]
    fn owned_children_are_handed_their_status_by_the_reaper() {
        let _one = ONE_REAPER.lock().unwrap_or_else(|p| p.into_inner());
        let rt = runtime();
        let mut rx = rt.block_on(async { spawn() }).unwrap();
        for i in 0..200 {
            let out = output(
                Command::new("/bin/sh")
                    .args([
                        "-c",
                        &format!("echo out{i}; echo err{i} >&2; exit {}", i % 4),
                    ])
                    .stdin(Stdio::null()),
            )
            .unwrap();
            assert_eq!(out.status.code(), Some(i % 4));
            assert_eq!(String::from_utf8_lossy(&out.stdout), format!("out{i}\n"));
            assert_eq!(String::from_utf8_lossy(&out.stderr), format!("err{i}\n"));
            // An unowned child ends meanwhile and is reported.
            let _ = spawn_command(&mut Command::new("/bin/true"));
        }
        let mut killed = OwnedChild::spawn(Command::new("/bin/sleep").arg("30")).unwrap();
        assert_eq!(killed.try_wait().unwrap(), None);
        assert_eq!(
            killed.wait_for(Some(Duration::from_millis(50))).unwrap(),
            None
        );
        killed.kill().unwrap();
        let status = killed.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // A kill after the end is a no-op, not a signal to whatever has the pid now.
        killed.kill().unwrap();
        let owned_pid = killed.id();
        drop(killed);
        let mut reported = 0;
        rt.block_on(async {
            while let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(300), rx.recv()).await
            {
                assert_ne!(r.pid, owned_pid, "an owned child was reported as an exit");
                reported += 1;
            }
        });
        // Other tests' children may be reaped here too.
        assert!(
            reported >= 200,
            "every unowned child is reported: {reported}"
        );
        assert!(owned().as_ref().is_none_or(|t| t.is_empty()));
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

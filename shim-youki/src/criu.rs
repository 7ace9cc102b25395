//! CRIU through its RPC: `criu swrk FD` serves one request on a `SOCK_SEQPACKET` socket
//! (protobuf messages from CRIU's `rpc.proto`, generated in the `rust-criu` crate). Runs in the
//! zygote. `rust-criu`'s own client drops the restored process's pid and cannot pass a cgroup
//! root or namespaces to join, so requests are built here from its generated messages.
//!
//! fds named in the options (`images_dir_fd`, `work_dir_fd`) are CRIU's to open through
//! `/proc/CALLER/fd/N` (the caller is the socket pair's creator: the zygote); fds in
//! `inherit_fd` are CRIU's own, so they are placed at fixed numbers in the child.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyperbox_shim_core::{owned_output, OwnedChild};
use std::io::IoSliceMut;
use std::os::fd::FromRawFd;

use nix::sys::socket::{
    recv, recvmsg, sendmsg, socketpair, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag,
    SockType,
};
use nix::unistd::Pid;
use protobuf::Message;
use rust_criu::rust_criu_protobuf::rpc;

use crate::error::YoukiError;

/// The CRIU of this host: found once on `PATH` and checked once with `criu check`.
#[derive(Debug, Clone)]
pub struct Criu {
    binary: PathBuf,
    /// Its version, when the record of its check had it.
    version: Option<String>,
    /// How long a request may take; `None` for as long as it takes.
    timeout: Option<Duration>,
}

/// The lazy-pages daemon's log, in the restore's work directory.
pub const LAZY_PAGES_LOG: &str = "lazy-pages.log";

/// What to install when CRIU is missing or does not work.
const INSTALL_HINT: &str = "checkpoint and restore need CRIU 4.2 or later on the PATH of \
     containerd (Debian 12's criu 3.17 fails on recent kernels, and 4.1 cannot dump TCP sockets \
     on kernels 6.16 and later): build it from Debian unstable's source package as \
     scripts/setup-host does, into /opt/hyperbox/criu with /opt/hyperbox/bin/criu on \
     containerd's PATH";

/// What failed of CRIU's work.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// No working CRIU on this host: what to install.
    #[error("{0}")]
    Unavailable(String),
    /// CRIU did not say its version.
    #[error("{0}")]
    Version(String),
    /// Running or talking to CRIU failed.
    #[error("criu {}: cannot {what}", binary.display())]
    Run {
        what: &'static str,
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A request ran past its time and CRIU was stopped.
    #[error("CRIU did not finish within the {:.1} s left to it: it was stopped", limit.as_secs_f64())]
    TimedOut { limit: Duration },
    /// CRIU answered `what` with a failure; `reason` is what its log or answer says.
    #[error("cannot {what}: {reason}; CRIU's log: {}", log.display())]
    Refused {
        what: String,
        reason: String,
        log: PathBuf,
    },
    /// The lazy-pages daemon did not come up; `errors` are its log's.
    #[error("CRIU's lazy-pages daemon did not start: {errors}; its log: {}", log.display())]
    LazyPages { errors: String, log: PathBuf },
}

/// A request CRIU answered with a failure.
#[derive(Debug)]
pub struct Refused {
    pub errno: i32,
    pub message: String,
}

impl Criu {
    /// The working CRIU, looked up on `PATH` and checked on the first call of this process.
    pub fn get() -> Result<Criu, CriuError> {
        static FOUND: OnceLock<Result<(PathBuf, Option<String>), String>> = OnceLock::new();
        FOUND
            .get_or_init(|| locate(&std::env::var_os("PATH").unwrap_or_default()))
            .clone()
            .map(|(binary, version)| Criu {
                binary,
                version,
                timeout: None,
            })
            .map_err(CriuError::Unavailable)
    }

    /// CRIU's version (`criu --version`: `Version: 4.1.1`), asked once per process.
    /// Recorded with the check, so that a restore from a template runs no extra process.
    pub fn version(&self) -> Result<String, CriuError> {
        if let Some(v) = &self.version {
            return Ok(v.clone());
        }
        static VERSION: OnceLock<Result<String, String>> = OnceLock::new();
        VERSION
            .get_or_init(|| ask_version(&self.binary))
            .clone()
            .map_err(CriuError::Version)
    }

    fn cpuinfo(&self, action: &str, dir: &Path) -> Result<(), String> {
        let out = owned_output(
            Command::new(&self.binary)
                .args(["cpuinfo", action, "--cpu-cap=fpu,cpu", "-D"])
                .arg(dir)
                .stdin(Stdio::null()),
        )
        .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "criu cpuinfo {action}: {}",
            said.lines()
                .filter(|l| l.contains("Error") || l.contains("cpu"))
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }

    /// Records this node's CPU features in `dir` (`cpuinfo.img`), for [`Criu::cpuinfo_check`]
    /// on another node.
    pub fn cpuinfo_dump(&self, dir: &Path) -> Result<(), String> {
        self.cpuinfo("dump", dir)
    }

    /// CRIU's check that this node's CPU has the features recorded in `dir`: the FPU's and
    /// every CPU feature (`--cpu-cap=fpu,cpu`), which a restored process may be using.
    pub fn cpuinfo_check(&self, dir: &Path) -> Result<(), String> {
        if !dir.join("cpuinfo.img").is_file() {
            return Err(
                "the template's images do not record the CPU it was captured on \
                        (cpuinfo.img)"
                    .to_string(),
            );
        }
        self.cpuinfo("check", dir).map_err(|e| {
            format!("this node's CPU lacks features of the CPU it was captured on ({e})")
        })
    }

    /// Starts CRIU's lazy-pages daemon for a restore from `images` whose work directory is
    /// `work` (where the daemon listens, `lazy-pages.socket`, and the restore connects), and
    /// returns once it listens. The daemon serves the restored processes' page faults from the
    /// images, pushes the pages nobody touched in the background, and exits when all are in.
    /// It is started in a session of its own and left to the shim (a subreaper) to reap: it
    /// outlives neither its pages nor needs the zygote, and a shim killed meanwhile does not
    /// take it (and with it the restored processes' memory) along. Its log is
    /// `work/lazy-pages.log`.
    pub fn start_lazy_pages(&self, images: &Path, work: &Path) -> Result<Pid, YoukiError> {
        use std::ffi::CString;
        let c = |s: &std::ffi::OsStr| {
            CString::new(s.as_encoded_bytes())
                .map_err(YoukiError::sys("pass a path with a NUL byte to CRIU"))
        };
        let argv: Vec<CString> = vec![
            c(self.binary.as_os_str())?,
            c("lazy-pages".as_ref())?,
            c("-D".as_ref())?,
            c(images.as_os_str())?,
            c("-W".as_ref())?,
            c(work.as_os_str())?,
            c("-o".as_ref())?,
            c(LAZY_PAGES_LOG.as_ref())?,
            c("-v4".as_ref())?,
            c("--status-fd".as_ref())?,
            c("3".as_ref())?,
        ];
        let _ = std::fs::remove_file(work.join("lazy-pages.socket"));
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(YoukiError::sys("make a pipe"))?;
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(YoukiError::io("open", "/dev/null"))?;
        // SAFETY: the zygote is single-threaded; the children only dup, fork and exec.
        match unsafe { nix::unistd::fork() } {
            Err(e) => return Err(YoukiError::sys("fork CRIU's lazy-pages daemon")(e)),
            // SAFETY: in the child of a single-threaded process: setsid, fork, dup2, execv and
            // _exit only, on descriptors and strings made before the fork.
            Ok(nix::unistd::ForkResult::Child) => unsafe {
                libc::setsid();
                if libc::fork() != 0 {
                    libc::_exit(0);
                }
                // Its pid first (the zygote stops it if the restore fails), then CRIU's
                // status byte once it listens.
                let pid = libc::getpid().to_ne_bytes();
                libc::write(write.as_raw_fd(), pid.as_ptr().cast(), pid.len());
                libc::dup2(write.as_raw_fd(), 3);
                for fd in 0..3 {
                    libc::dup2(null.as_raw_fd(), fd);
                }
                let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
                ptrs.push(std::ptr::null());
                libc::execv(ptrs[0], ptrs.as_ptr());
                libc::_exit(127);
            },
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                drop(write);
                let _ = nix::sys::wait::waitpid(child, None);
            }
        }
        // Its pid, then one byte once it listens; end of file if it failed.
        let limit = Instant::now() + Duration::from_secs(10);
        let mut got = [0u8; 5];
        let mut have = 0;
        while have < got.len() {
            let ready = readable_before(&read, limit).map_err(|source| CriuError::Run {
                what: "wait for the lazy-pages daemon",
                binary: self.binary.clone(),
                source,
            })?;
            match ready.then(|| nix::unistd::read(read.as_raw_fd(), &mut got[have..])) {
                Some(Ok(n)) if n > 0 => have += n,
                _ => break,
            }
        }
        let pid = Pid::from_raw(i32::from_ne_bytes([got[0], got[1], got[2], got[3]]));
        if have < got.len() {
            if have >= 4 {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            let log = work.join(LAZY_PAGES_LOG);
            let errors = log_errors(&log, 3).join("; ");
            return Err(CriuError::LazyPages { errors, log }.into());
        }
        Ok(pid)
    }

    /// This CRIU, its requests stopped after `timeout` (when given): CRIU is sent SIGTERM,
    /// then SIGKILL, and the request fails saying so.
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `req` to a new `criu swrk` and returns its answer. `inherit` places fds at the
    /// given numbers in CRIU (for `inherit_fd`, numbers 0-2 and 4 on: 3 is the socket);
    /// `started` runs with CRIU's pid before the request is sent, and may complete it (a
    /// restore puts CRIU in the container's cgroup and names that cgroup in the request).
    pub fn call(
        &self,
        req: &mut rpc::Criu_req,
        inherit: &[(RawFd, BorrowedFd<'_>)],
        started: impl FnOnce(Pid, &mut rpc::Criu_req) -> Result<(), YoukiError>,
    ) -> Result<Result<rpc::Criu_resp, Refused>, YoukiError> {
        self.call_notified(req, inherit, started, |_, _| Ok(()))
    }

    /// [`Criu::call`], with `notified` called on each of CRIU's notifications (its script
    /// name, and the fd it came with: `orphan-pts-master` brings a restored terminal's master)
    /// before CRIU is told to go on; an error from it fails the request.
    pub fn call_notified(
        &self,
        req: &mut rpc::Criu_req,
        inherit: &[(RawFd, BorrowedFd<'_>)],
        started: impl FnOnce(Pid, &mut rpc::Criu_req) -> Result<(), YoukiError>,
        mut notified: impl FnMut(&str, Option<OwnedFd>) -> Result<(), YoukiError>,
    ) -> Result<Result<rpc::Criu_resp, Refused>, YoukiError> {
        let failed = |what: &'static str| {
            move |source: io::Error| -> YoukiError {
                CriuError::Run {
                    what,
                    binary: self.binary.clone(),
                    source,
                }
                .into()
            }
        };
        let protobuf = |e: protobuf::Error| io::Error::other(e);
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| failed("create its socket")(e.into()))?;
        let mut moves: Vec<(RawFd, RawFd)> = vec![(theirs.as_raw_fd(), 3)];
        moves.extend(inherit.iter().map(|(n, fd)| (fd.as_raw_fd(), *n)));
        let mut cmd = Command::new(&self.binary);
        cmd.args(["swrk", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: the closure only calls fcntl(2) and dup2(2), which are async-signal-safe,
        // and touches no memory but the `moves` it owns.
        unsafe {
            cmd.pre_exec(move || place_fds(&moves));
        }
        let mut child = OwnedChild::spawn(&mut cmd).map_err(failed("start"))?;
        drop(theirs);
        let deadline = self.timeout.map(|t| (Instant::now() + t, t));
        let answer = (|| {
            started(Pid::from_raw(child.id() as i32), req)?;
            let bytes = req
                .write_to_bytes()
                .map_err(|e| failed("encode a request")(protobuf(e)))?;
            send(&ours, &bytes).map_err(|e| failed("send a request")(e.into()))?;
            loop {
                if let Some((at, limit)) = deadline {
                    if !readable_before(&ours, at).map_err(failed("wait for it"))? {
                        return Err(CriuError::TimedOut { limit }.into());
                    }
                }
                let (bytes, fd) = receive(&ours).map_err(failed("read its answer"))?;
                let resp = rpc::Criu_resp::parse_from_bytes(&bytes)
                    .map_err(|e| failed("decode its answer")(protobuf(e)))?;
                if !resp.success() {
                    return Ok(Err(Refused {
                        errno: resp.cr_errno(),
                        message: resp.cr_errmsg().to_string(),
                    }));
                }
                if resp.type_() == rpc::Criu_req_type::NOTIFY {
                    notified(resp.notify.script(), fd)?;
                    let mut ack = rpc::Criu_req::new();
                    ack.set_type(rpc::Criu_req_type::NOTIFY);
                    ack.set_notify_success(true);
                    let bytes = ack
                        .write_to_bytes()
                        .map_err(|e| failed("encode a notify answer")(protobuf(e)))?;
                    send(&ours, &bytes).map_err(|e| failed("answer a notify")(e.into()))?;
                    continue;
                }
                return Ok(Ok(resp));
            }
        })();
        drop(ours);
        if answer.is_err() {
            stop(&mut child);
        }
        let _ = child.wait();
        answer
    }
}

/// Runs in the child between fork and exec: every source fd first moves above the targets'
/// range (so no `dup2` overwrites a source still to be moved), then onto its target, which
/// `dup2` leaves without close-on-exec.
fn place_fds(moves: &[(RawFd, RawFd)]) -> io::Result<()> {
    let mut high = [0 as RawFd; 16];
    if moves.len() > high.len() {
        return Err(io::Error::from_raw_os_error(libc::E2BIG));
    }
    for (i, (src, _)) in moves.iter().enumerate() {
        // SAFETY: fcntl on an fd this process owns; F_DUPFD_CLOEXEC allocates a new one.
        let fd = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 100) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        high[i] = fd;
    }
    for (i, (_, target)) in moves.iter().enumerate() {
        // SAFETY: dup2 onto a number this child reserves for CRIU.
        if unsafe { libc::dup2(high[i], *target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn send(sock: &OwnedFd, bytes: &[u8]) -> nix::Result<()> {
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[],
        MsgFlags::empty(),
        None,
    )
    .map(|_| ())
}

/// Stops a CRIU that is to give up: SIGTERM first (a chance to let go of the tasks it
/// holds), SIGKILL if it is still there 5 s later.
fn stop(child: &mut OwnedChild) {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
}

/// Whether `sock` has something to read before `at`.
fn readable_before(sock: &OwnedFd, at: Instant) -> io::Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    loop {
        let left = at.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if Instant::now() >= at => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// One datagram, whatever its size (peeked first), and the fd it carried, if any.
fn receive(sock: &OwnedFd) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    loop {
        let mut probe = [0u8; 1];
        let len = match recv(
            sock.as_raw_fd(),
            &mut probe,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
        ) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "criu exited without answering",
                ))
            }
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut buf = vec![0u8; len];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let (n, fd) = match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fd = None;
                for c in msg.cmsgs()? {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for raw in fds {
                            // SAFETY: SCM_RIGHTS gave this process a new fd nothing else owns.
                            let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                            fd.get_or_insert(owned);
                        }
                    }
                }
                (msg.bytes, fd)
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        buf.truncate(n);
        return Ok((buf, fd));
    }
}

/// Where a passed `criu check` is recorded for the shims that come later: on tmpfs, so a
/// reboot (a new kernel) checks again; the record names the binary and the kernel.
const CHECKED: &str = "/run/hyperbox/criu-checked";

/// The first `criu` on `path` (a `PATH` value), if `criu check` passes (or passed for this
/// binary and kernel before: each container has a shim of its own, and the check takes a
/// quarter of a second).
fn locate(path: &std::ffi::OsStr) -> Result<(PathBuf, Option<String>), String> {
    let binary = std::env::split_paths(path)
        .map(|d| d.join("criu"))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            format!(
                "no criu on PATH ({}): {INSTALL_HINT}",
                path.to_string_lossy()
            )
        })?;
    let record = check_record(&binary);
    let recorded = std::fs::read_to_string(CHECKED).unwrap_or_default();
    if let Some(rest) = record.as_deref().and_then(|r| recorded.strip_prefix(r)) {
        let version = rest
            .lines()
            .find_map(|l| l.strip_prefix(VERSION_LINE))
            .map(str::to_string);
        if version.is_some() {
            return Ok((binary, version));
        }
    } else {
        check(&binary)?;
    }
    let version = ask_version(&binary).ok();
    if let (Some(record), Some(v)) = (record, &version) {
        let tmp = format!("{CHECKED}.{}", std::process::id());
        let written = Path::new(CHECKED)
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, format!("{record}{VERSION_LINE}{v}\n")))
            .and_then(|()| std::fs::rename(&tmp, CHECKED));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!("cannot record the criu check in {CHECKED}: {e}");
        }
    }
    Ok((binary, version))
}

/// The line of a check's record that gives CRIU's version.
const VERSION_LINE: &str = "criu version: ";

/// `criu --version`: `Version: 4.2.1`.
fn ask_version(binary: &Path) -> Result<String, String> {
    let out = owned_output(Command::new(binary).arg("--version").stdin(Stdio::null()))
        .map_err(|e| format!("cannot run {} --version: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string())
        .ok_or_else(|| {
            format!(
                "{} --version said no version: {}",
                binary.display(),
                text.trim()
            )
        })
}

/// What identifies a check: the binary (path, size, modification time) and the kernel.
fn check_record(binary: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let real = std::fs::canonicalize(binary).ok()?;
    let meta = std::fs::metadata(&real).ok()?;
    let kernel = |f: &str| std::fs::read_to_string(format!("/proc/sys/kernel/{f}")).ok();
    Some(format!(
        "{}\n{} {} {}\n{}{}",
        real.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        kernel("osrelease")?,
        kernel("version")?
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `criu check`: the kernel and CRIU agree on what CRIU needs.
fn check(binary: &Path) -> Result<(), String> {
    let out = owned_output(Command::new(binary).arg("check").stdin(Stdio::null()))
        .map_err(|e| format!("cannot run {} check: {e}: {INSTALL_HINT}", binary.display()))?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    let last: Vec<&str> = text.lines().rev().take(3).collect();
    Err(format!(
        "{} check failed ({}): {}: {INSTALL_HINT}",
        binary.display(),
        out.status,
        last.into_iter().rev().collect::<Vec<_>>().join(" / ")
    ))
}

/// The lines of a CRIU log that say what failed (`Error` lines), the last `max` of them.
/// CRIU's complaint that it cannot raise its own open-file limit (under containerd's limits)
/// is harmless and left out.
pub fn log_errors(log: &Path, max: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .map(|l| l.trim().to_string())
        .collect();
    let skip = errors.len().saturating_sub(max);
    errors.into_iter().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_criu_the_error_says_what_to_install() {
        let empty = std::env::temp_dir().join(format!("hb-no-criu-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let e = locate(empty.as_os_str()).unwrap_err();
        assert!(e.starts_with("no criu on PATH ("), "{e}");
        assert!(e.contains(&empty.display().to_string()), "{e}");
        assert!(e.contains("CRIU 4.2"), "{e}");
        std::fs::remove_dir(&empty).unwrap();
    }

    #[test]
    fn the_hosts_criu_passes_its_check() {
        // Where scripts/setup-host installs it; hosts without it have nothing to check.
        let bin = Path::new("/opt/hyperbox/bin");
        if !bin.join("criu").exists() {
            hyperbox_testkit::skip(&format!("no {}/criu", bin.display()));
            return;
        }
        let (found, version) = locate(bin.as_os_str()).unwrap();
        assert_eq!(found, bin.join("criu"));
        // Checked or recorded, the version is known without asking again.
        let (_, again) = locate(bin.as_os_str()).unwrap();
        assert!(version.is_some_and(|v| v.starts_with('4')), "no version");
        assert_eq!(again.as_deref().map(|v| v.chars().next()), Some(Some('4')));
    }
}

//! The console socket of a process with a terminal, as runc's `--console-socket`: the shim
//! listens on a unix socket, libcontainer (in the zygote) connects to it before cloning the
//! process, and the process sends its new terminal's master over that connection
//! (`SCM_RIGHTS`) before it reports ready. So the master lands in the shim, not the zygote,
//! and is waiting on the connection by the time the zygote replies.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    accept4, bind, connect, listen, recvmsg, sendmsg, socket, AddressFamily, Backlog,
    ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

use crate::error::YoukiError;

/// How long, in milliseconds, to wait for the master once the zygote has said the process is
/// ready (it sent the master before that, so this only bounds a broken peer).
const RECEIVE_WAIT_MS: u16 = 5000;

/// A listening console socket, removed when dropped.
#[derive(Debug)]
pub struct ConsoleSocket {
    listener: OwnedFd,
    path: PathBuf,
}

/// `what` (which names the console socket) of the one at `path` failed.
fn failed<E: Into<io::Error>>(what: &'static str, path: &Path) -> impl FnOnce(E) -> YoukiError {
    let path = path.to_path_buf();
    move |e| YoukiError::io(what, path)(e.into())
}

impl ConsoleSocket {
    /// Listens on a new socket in `dir` (kept short: a socket path has at most 107 bytes).
    pub fn bind(dir: &Path) -> Result<Self, YoukiError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".console-{}-{n}.sock", std::process::id()));
        std::fs::create_dir_all(dir)
            .map_err(failed("create the directory of console socket", &path))?;
        let _ = std::fs::remove_file(&path);
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(failed("create console socket", &path))?;
        let addr = UnixAddr::new(&path).map_err(failed("name console socket", &path))?;
        bind(listener.as_raw_fd(), &addr).map_err(failed("bind console socket", &path))?;
        let socket = ConsoleSocket { listener, path };
        listen(
            &socket.listener,
            Backlog::new(1).expect("1 is a valid backlog"),
        )
        .map_err(failed("listen on console socket", &socket.path))?;
        Ok(socket)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The terminal master the process sent.
    pub fn receive_master(&self) -> Result<OwnedFd, YoukiError> {
        let path = &self.path;
        wait_readable(self.listener.as_fd(), path)?;
        let raw = accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(failed("accept on console socket", path))?;
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        wait_readable(conn.as_fd(), path)?;
        let mut buf = [0u8; 256];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        )
        .map_err(failed("receive the terminal from console socket", path))?;
        let mut master = None;
        for c in msg.cmsgs().map_err(failed("read console socket", path))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS gave this process this new fd; nothing else owns it.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    master.get_or_insert(fd);
                }
            }
        }
        master.ok_or_else(|| {
            failed("receive the terminal from console socket", path)(io::Error::other("no fd came"))
        })
    }
}

/// Sends a terminal's `master` to the console socket at `path`, as a process that allocated
/// it does (a restore hands on the master CRIU made for the restored terminal).
pub fn send_master(path: &Path, master: &OwnedFd) -> Result<(), YoukiError> {
    let peer = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(failed("create a peer of console socket", path))?;
    let addr = UnixAddr::new(path).map_err(failed("name console socket", path))?;
    connect(peer.as_raw_fd(), &addr).map_err(failed("connect to console socket", path))?;
    sendmsg::<()>(
        peer.as_raw_fd(),
        &[IoSlice::new(b"/dev/ptmx")],
        &[ControlMessage::ScmRights(&[master.as_raw_fd()])],
        MsgFlags::empty(),
        None,
    )
    .map_err(failed("send the terminal to console socket", path))?;
    Ok(())
}

fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<(), YoukiError> {
    loop {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(RECEIVE_WAIT_MS)) {
            Ok(0) => {
                let timed_out = io::Error::new(io::ErrorKind::TimedOut, "timed out");
                return Err(failed("receive the terminal from console socket", path)(
                    timed_out,
                ));
            }
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(failed("poll console socket", path)(e)),
        }
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sent_master_is_received() {
        let dir = std::env::temp_dir().join(format!("console-test-{}", std::process::id()));
        let console = ConsoleSocket::bind(&dir).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_master(console.path(), &r).unwrap();
        assert!(console.receive_master().is_ok());
        let path = console.path().to_path_buf();
        drop(console);
        assert!(!path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The zygote's wire: JSON messages on a `SOCK_SEQPACKET` socket pair (one datagram each, so
//! no framing), with file descriptors riding along as `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use hyperbox_shim_core::template::{Captured, TemplateCapture};
use hyperbox_shim_core::{CheckpointSpec, EngineError, RestoreFrom, RootfsMount};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::image::ImageRef;

/// Largest message: requests carry ids, paths and an exec's process object.
const MAX_MESSAGE: usize = 256 * 1024;

/// Which standard streams follow a request as fds, in this order.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StdioMask {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    /// For a process with a terminal: the shim's console socket, which libcontainer connects
    /// to and the process sends its terminal's master on (no stdio fds follow then).
    pub console_socket: Option<PathBuf>,
}

/// What the shim asks the zygote.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Create {
        id: String,
        bundle: PathBuf,
        rootfs: Vec<RootfsMount>,
        stdio: StdioMask,
        /// The container's state directory's parent when not the zygote's default (runc's
        /// `root` option, with the namespace joined).
        state_root: Option<PathBuf>,
        no_pivot_root: bool,
        /// Restore the processes from this checkpoint or template instead of creating an
        /// init.
        restore: Option<RestoreFrom>,
        /// The container's image, as containerd has it (asked for a restore from a template).
        image: Option<ImageRef>,
    },
    CaptureTemplate {
        id: String,
        bundle: PathBuf,
        spec: TemplateCapture,
        image: Option<ImageRef>,
    },
    TemplateFailed {
        name: String,
        reason: String,
        /// The bundle of the container that failed, whose owner's store records it.
        bundle: PathBuf,
    },
    Checkpoint {
        id: String,
        bundle: PathBuf,
        spec: CheckpointSpec,
    },
    Start {
        id: String,
    },
    Exec {
        id: String,
        exec_id: String,
        process: serde_json::Value,
        stdio: StdioMask,
    },
    SignalAll {
        id: String,
        signal: i32,
    },
    Pids {
        id: String,
    },
    CgroupsPath {
        id: String,
    },
    Delete {
        id: String,
        bundle: PathBuf,
    },
}

/// What the zygote answers.
#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Pid(u32),
    /// A created (or restored) container's init, and its cgroup as libcontainer applied it
    /// (`None` when it could not be told: the service then asks for it).
    Created {
        pid: u32,
        cgroups_path: Option<PathBuf>,
    },
    Pids(Vec<u32>),
    Path(PathBuf),
    Captured(Captured),
    Done,
    Failed(EngineError),
    /// The request goes on in a worker of the zygote, which answers on the socket sent
    /// with this reply: the zygote serves other requests meanwhile.
    Detached,
}

/// What failed on the zygote's socket.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode message")]
    Encode(#[source] serde_json::Error),
    #[error("cannot send to the zygote socket")]
    Send(#[source] nix::Error),
    #[error("cannot receive from the zygote socket")]
    Receive(#[source] nix::Error),
    #[error("bad control message")]
    ControlMessage(#[source] nix::Error),
    #[error("bad message")]
    Decode(#[source] serde_json::Error),
    #[error("the zygote (pid {0}) exited")]
    ZygoteExited(i32),
    #[error("the zygote detached a request without a socket")]
    NoWorkerSocket,
    #[error("the zygote's worker exited without an answer")]
    WorkerExited,
    /// A reply that does not answer the request sent.
    #[error("unexpected zygote reply {0}")]
    Unexpected(String),
}

/// A connected socket pair: (shim end, zygote end), both close-on-exec.
pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Sends `msg` with `fds`.
pub fn send<T: Serialize>(sock: BorrowedFd<'_>, msg: &T, fds: &[OwnedFd]) -> Result<(), WireError> {
    let data = serde_json::to_vec(msg).map_err(WireError::Encode)?;
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() {
        vec![]
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&data)],
        &cmsgs,
        MsgFlags::empty(),
        None,
    )
    .map_err(WireError::Send)?;
    Ok(())
}

/// Receives one message and the fds that came with it; `Ok(None)` when the peer is gone.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: BorrowedFd<'_>,
) -> Result<Option<(T, Vec<OwnedFd>)>, WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 3]);
    let (len, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(WireError::ControlMessage)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS gave this process these new fds; nothing else
                        // owns them.
                        fds.extend(
                            raw.into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                break (msg.bytes, fds);
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(WireError::Receive(e)),
        }
    };
    if len == 0 {
        return Ok(None);
    }
    let msg = serde_json::from_slice(&buf[..len]).map_err(WireError::Decode)?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn requests_and_fds_cross() {
        let (a, b) = pair().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let req = Request::Start { id: "c1".into() };
        send(a.as_fd(), &req, &[w]).unwrap();
        let (got, fds): (Request, _) = recv(b.as_fd()).unwrap().unwrap();
        assert!(matches!(got, Request::Start { id } if id == "c1"));
        assert_eq!(fds.len(), 1);
        let mut w = std::fs::File::from(fds.into_iter().next().unwrap());
        w.write_all(b"ok").unwrap();
        drop(w);
        let mut s = String::new();
        std::fs::File::from(r).read_to_string(&mut s).unwrap();
        assert_eq!(s, "ok");
        drop(a);
        assert!(recv::<Request>(b.as_fd()).unwrap().is_none());
    }
}

//! A process's terminal, on the shim's side: the pseudo-terminal master the engine hands back
//! when containerd asks for a terminal (`ctr run -t`, `ctr task exec -t`).
//!
//! As in runc's shim, the process's stdio is the terminal's slave; the shim copies containerd's
//! stdin FIFO into the master and the master into the stdout FIFO (a terminal has no separate
//! stderr), and ResizePty sets the master's window size. When the process exits, what it left
//! in the terminal is copied and the stdout FIFO is closed, so the client reading it sees
//! end-of-file even while something else in the container still holds the terminal open.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};
use std::thread;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::ShimError;
use crate::stdio::{open_output, StdinFeeder, StdioPaths};

/// The terminal of one process and the copies between it and containerd's FIFOs.
#[derive(Debug)]
pub struct Console {
    master: OwnedFd,
    stdin: Option<StdinFeeder>,
    /// Dropped when the process exits: the output copy then drains the master and ends.
    exited: Mutex<Option<OwnedFd>>,
}

impl Console {
    /// Starts copying between `master` and the FIFOs of `paths`.
    pub fn attach(master: OwnedFd, paths: &StdioPaths) -> Result<Console, ShimError> {
        let io_err = |what: &'static str| {
            move |source: io::Error| ShimError::Io {
                what,
                path: "the terminal master".into(),
                source,
            }
        };
        let stdout = open_output(&paths.stdout)?.map(File::from);
        let stdin = if paths.stdin.is_empty() {
            None
        } else {
            let writer = master.try_clone().map_err(io_err("duplicate"))?;
            Some(StdinFeeder::spawn(&paths.stdin, File::from(writer))?)
        };
        let (exited_r, exited_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io_err("create an exit pipe for")(e.into()))?;
        let reader = File::from(master.try_clone().map_err(io_err("duplicate"))?);
        let copy = thread::Builder::new()
            .name("console".into())
            .spawn(move || copy_output(&reader, stdout, &exited_r));
        if let Err(e) = copy {
            if let Some(f) = &stdin {
                f.abort();
            }
            return Err(io_err("start the output copy of")(e));
        }
        let console = Console {
            master,
            stdin,
            exited: Mutex::new(Some(exited_w)),
        };
        console.size_unsized()?;
        Ok(console)
    }

    /// A new pty is 0x0 until the client's first ResizePty, which `ctr` sends only after
    /// Start: a process reading its size before then (`stty size`, a shell laying out its
    /// prompt) would see no columns. An unsized terminal starts at the VT100's 80x24 instead;
    /// the client's resize replaces it.
    fn size_unsized(&self) -> Result<(), ShimError> {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        if rc == 0 && size.ws_row == 0 && size.ws_col == 0 {
            self.resize(80, 24)?;
        }
        Ok(())
    }

    /// Sets the terminal's window size (ResizePty); the process gets SIGWINCH.
    pub fn resize(&self, width: u32, height: u32) -> Result<(), ShimError> {
        let size = libc::winsize {
            ws_row: u16::try_from(height).unwrap_or(u16::MAX),
            ws_col: u16::try_from(width).unwrap_or(u16::MAX),
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(ShimError::Io {
                what: "set the window size of",
                path: "the terminal master".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Stops copying stdin into the terminal (CloseIO).
    pub fn close_stdin(&self) {
        if let Some(f) = &self.stdin {
            f.close();
        }
    }

    /// The process exited: copy what is left in the terminal, then close the output.
    pub fn exited(&self) {
        self.exited
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.close_stdin();
        self.exited();
    }
}

/// Copies the master into `out` until no slave is left open (EIO) or, once `exited` reports
/// the process gone, until the master has nothing more to read. Closing `out` on return is
/// what ends the reader's copy on containerd's side.
/// How long the output copy waits for more of an exited process's output.
const DRAIN_QUIET_MS: u16 = 50;

fn copy_output(master: &File, mut out: Option<File>, exited: &OwnedFd) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut draining = false;
    loop {
        let (readable, gone) = {
            let mut fds = [
                PollFd::new(master.as_fd(), PollFlags::POLLIN),
                PollFd::new(exited.as_fd(), PollFlags::POLLIN),
            ];
            // Once the process is gone, what it wrote last may still be on its way through
            // the terminal's buffers (the kernel moves it to the master side on a work
            // queue): wait a little for it, and stop at the first quiet spell (something
            // else may keep the terminal open) or at EIO (nothing does).
            let (watched, timeout) = if draining {
                (&mut fds[..1], PollTimeout::from(DRAIN_QUIET_MS))
            } else {
                (&mut fds[..], PollTimeout::NONE)
            };
            match poll(watched, timeout) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("terminal copy: poll: {e}");
                    return;
                }
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), !draining && ready(&fds[1]))
        };
        if gone {
            draining = true;
        }
        if !readable {
            if draining && !gone {
                return;
            }
            continue;
        }
        let n = match (&mut &*master).read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO: every slave fd is closed.
            Err(_) => return,
        };
        if let Some(o) = out.as_mut() {
            if let Err(e) = o.write_all(&buf[..n]) {
                tracing::debug!("terminal output dropped, its reader is gone: {e}");
                out = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;

    #[test]
    fn output_is_copied_and_closed_when_the_process_exits() {
        let pty = openpty(None, None).unwrap();
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // The stdout "FIFO": a pipe through /proc/self/fd, which `open_output` opens too.
        let paths = StdioPaths {
            stdout: format!("/proc/self/fd/{}", w.as_raw_fd()),
            terminal: true,
            ..Default::default()
        };
        let console = Console::attach(pty.master, &paths).unwrap();
        drop(w);
        console.resize(100, 40).unwrap();
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which outlives the call.
        let rc = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
        assert_eq!(rc, 0);
        assert_eq!((size.ws_col, size.ws_row), (100, 40));
        File::from(pty.slave.try_clone().unwrap())
            .write_all(b"bye\n")
            .unwrap();
        // The slave stays open (as a background process would keep it): only the exit ends
        // the copy.
        console.exited();
        let mut got = String::new();
        File::from(r).read_to_string(&mut got).unwrap();
        assert_eq!(got, "bye\r\n");
        drop(pty.slave);
    }
}

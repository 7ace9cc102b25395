//! The standard streams containerd gives a process: FIFO paths it reads and writes on the
//! other side (`ctr`'s `--fifo-dir`), a log URI, or empty for none.
//!
//! stdout and stderr FIFOs are handed to the process itself, so its output goes to containerd
//! without passing through the shim. stdin goes through a pipe the shim feeds from the FIFO:
//! that way the process sees end-of-file when the writer closes the FIFO (or on CloseIO),
//! which it would not if it held the FIFO open itself, and opening the FIFO, which blocks
//! until a writer comes, never holds up Create.
//!
//! Log URIs (`ctr run --log-uri`, Docker's log drivers through containerd) are taken as
//! runc's shim takes them:
//! - `file:///PATH`: stdout and stderr are appended to PATH (created `0640`, with its
//!   directory), copied there by the shim; the container never holds the file itself.
//! - `binary:///PATH?K=V`: the logging program PATH is started with arguments `K V` for each
//!   query pair and only `CONTAINER_ID` and `CONTAINER_NAMESPACE` in its environment; it
//!   reads the process's stdout on fd 3 and stderr on fd 4, and closes fd 5 once it is ready,
//!   which Create waits for.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use percent_encoding::percent_decode_str;
use tokio::sync::watch;

use crate::engine::ProcessStdio;
use crate::error::ShimError;

/// How long Create waits for a logging binary to report it is ready.
const LOGGER_READY_WAIT: Duration = Duration::from_secs(30);

/// The stream paths of a process, as given by containerd and reported back in State.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Whose streams are opened: a logging binary is told in its environment.
#[derive(Debug, Clone, Copy)]
pub struct StreamOwner<'a> {
    pub namespace: &'a str,
    pub container_id: &'a str,
    /// Who owns the pipes the process gets, when not the shim (see [`IoOwner`]).
    pub io: Option<IoOwner>,
}

/// The owner of the pipes a process gets for its streams (runc's `io_uid` and `io_gid`): in a
/// user namespace, the host ids of the container's root, so that its processes may reopen
/// their streams (`/dev/stdout`, `/proc/self/fd/1`), as they can under runc's shim. Output
/// to FIFOs then goes through a pipe of the shim's, copied into the FIFO, as runc's shim
/// always does; the FIFOs themselves belong to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoOwner {
    pub uid: u32,
    pub gid: u32,
}

impl IoOwner {
    /// Gives `fd` (a pipe end) to this owner.
    fn take(self, fd: &OwnedFd, what: &str) -> Result<(), ShimError> {
        nix::unistd::fchown(
            fd.as_raw_fd(),
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        )
        .map_err(|e| ShimError::Io {
            what: "give io_uid/io_gid the pipe of",
            path: what.into(),
            source: e.into(),
        })
    }
}

/// The opened streams of a new process.
#[derive(Debug, Default)]
pub struct OpenedStdio {
    /// The fds the new process gets.
    pub fds: ProcessStdio,
    /// Copies the stdin FIFO into the process, when it has a stdin.
    pub stdin: Option<StdinFeeder>,
    /// The shim's copy of the process's output into a log file, when it has one.
    pub output: Option<OutputCopy>,
    /// Read ends of the output FIFOs, held while the process runs (as runc's shim does) so
    /// that its writes do not fail with `EPIPE` when the client reading them goes away (a
    /// detached `ctr`); they are not writers, so the client still sees end-of-file when the
    /// process ends.
    pub fifo_readers: Vec<OwnedFd>,
}

/// Where a process's stdout and stderr go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OutputTarget {
    /// FIFO paths (or nothing, for an empty path).
    Fifos,
    /// `file://`: both streams appended to one file.
    File(PathBuf),
    /// `binary://`: a logging program and its arguments.
    Binary { program: PathBuf, args: Vec<String> },
}

impl OutputTarget {
    fn parse(stdout: &str, stderr: &str) -> Result<Self, ShimError> {
        let Some((scheme, _)) = stdout.split_once("://") else {
            if stderr.contains("://") {
                return Err(ShimError::InvalidArgument(format!(
                    "stderr is the log URI {stderr:?} but stdout is not a log URI"
                )));
            }
            return Ok(OutputTarget::Fifos);
        };
        if !stderr.is_empty() && stderr != stdout {
            return Err(ShimError::InvalidArgument(format!(
                "stdout is the log URI {stdout:?} but stderr is {stderr:?}: one URI takes both"
            )));
        }
        let rest = &stdout[scheme.len() + 3..];
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(ShimError::InvalidArgument(format!(
                "the log URI {stdout:?} names no absolute path (a host part is not supported)"
            )));
        }
        let decode = |s: &str| {
            percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    ShimError::InvalidArgument(format!("the log URI {stdout:?} is not UTF-8"))
                })
        };
        let path = PathBuf::from(
            percent_decode_str(path)
                .decode_utf8()
                .map_err(|_| {
                    ShimError::InvalidArgument(format!("the log URI {stdout:?} is not UTF-8"))
                })?
                .into_owned(),
        );
        match scheme {
            "file" => Ok(OutputTarget::File(path)),
            "binary" => {
                // As containerd's runc shim: each query pair gives the key and its value as
                // two arguments (a key without a value gives an empty argument).
                let mut args = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    args.push(decode(k)?);
                    args.push(decode(v)?);
                }
                Ok(OutputTarget::Binary {
                    program: path,
                    args,
                })
            }
            other => Err(ShimError::InvalidArgument(format!(
                "the log URI {stdout:?} has the scheme {other:?}: only fifo paths, \
                 file:// and binary:// are supported"
            ))),
        }
    }
}

impl StdioPaths {
    /// Opens the streams for a new process of `owner`: the fds it gets, the feeder that
    /// copies the stdin FIFO into it, and the copy of its output to a log file.
    pub fn open(&self, owner: StreamOwner<'_>) -> Result<OpenedStdio, ShimError> {
        let target = OutputTarget::parse(&self.stdout, &self.stderr)?;
        if self.terminal {
            if target != OutputTarget::Fifos {
                return Err(ShimError::InvalidArgument(format!(
                    "a terminal cannot be combined with the log URI {:?}",
                    self.stdout
                )));
            }
            // The streams are the terminal's: see `Console`, which takes them once the
            // engine has returned the terminal's master.
            return Ok(OpenedStdio {
                fds: ProcessStdio {
                    terminal: true,
                    ..Default::default()
                },
                ..Default::default()
            });
        }
        let (stdout, stderr, output) = match (&target, owner.io) {
            (OutputTarget::Fifos, None) => {
                (open_output(&self.stdout)?, open_output(&self.stderr)?, None)
            }
            (OutputTarget::Fifos, Some(_)) => {
                let mut copies = Vec::new();
                let mut piped = |path: &str| -> Result<Option<OwnedFd>, ShimError> {
                    let Some(fifo) = open_output(path)? else {
                        return Ok(None);
                    };
                    let (w, copy) = OutputCopy::start(File::from(fifo), path)?;
                    copies.push(copy);
                    Ok(Some(w))
                };
                let (out, err) = (piped(&self.stdout)?, piped(&self.stderr)?);
                (out, err, OutputCopy::all(copies))
            }
            (OutputTarget::File(path), _) => {
                let (w, copy) = OutputCopy::to_file(path)?;
                let w2 = w.try_clone().map_err(|source| ShimError::Io {
                    what: "duplicate the log pipe of",
                    path: path.clone(),
                    source,
                })?;
                (Some(w), Some(w2), Some(copy))
            }
            (OutputTarget::Binary { program, args }, _) => {
                let (out, err) = start_logger(program, args, owner)?;
                (Some(out), Some(err), None)
            }
        };
        if let Some(io) = owner.io {
            for (fd, path) in [(&stdout, &self.stdout), (&stderr, &self.stderr)] {
                if let Some(fd) = fd {
                    io.take(fd, path)?;
                }
            }
        }
        let (stdin, feeder) = if self.stdin.is_empty() {
            (None, None)
        } else {
            let (read, write) =
                nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| ShimError::Io {
                    what: "create a stdin pipe for",
                    path: self.stdin.clone().into(),
                    source: e.into(),
                })?;
            if let Some(io) = owner.io {
                io.take(&read, &self.stdin)?;
            }
            let feeder = StdinFeeder::spawn(&self.stdin, File::from(write))?;
            (Some(read), Some(feeder))
        };
        let fifo_readers = match target {
            OutputTarget::Fifos => [&self.stdout, &self.stderr]
                .into_iter()
                .filter_map(|p| fifo_reader(p))
                .collect(),
            _ => Vec::new(),
        };
        Ok(OpenedStdio {
            fds: ProcessStdio {
                stdin,
                stdout,
                stderr,
                terminal: false,
            },
            stdin: feeder,
            output,
            fifo_readers,
        })
    }
}

/// The shim's copies of a process's output pipes into its `file://` log (or, for a process
/// whose pipes belong to `io_uid`, into its FIFOs), each on a thread of its own until every
/// writer of its pipe is gone.
#[derive(Debug, Clone)]
pub struct OutputCopy {
    done: Vec<watch::Receiver<bool>>,
}

impl OutputCopy {
    /// Opens (creating) the log file and starts copying; returns the pipe's write end.
    fn to_file(path: &Path) -> Result<(OwnedFd, Self), ShimError> {
        let io_err = |what, source| ShimError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(|e| io_err("create the directory of the log file", e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
            .map_err(|e| io_err("open the log file", e))?;
        Self::start(file, &path.to_string_lossy())
    }

    /// Starts copying a new pipe into `to` (named `what`); returns the pipe's write end.
    fn start(mut to: File, what: &str) -> Result<(OwnedFd, Self), ShimError> {
        let io_err = |what: &'static str, path: &str, source| ShimError::Io {
            what,
            path: path.into(),
            source,
        };
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| io_err("create the output pipe of", what, e.into()))?;
        let (tx, done) = watch::channel(false);
        let name = what.to_string();
        thread::Builder::new()
            .name("output-copy".into())
            .spawn(move || {
                if let Err(e) = io::copy(&mut File::from(read), &mut to) {
                    tracing::warn!(to = name, "output copy ended: {e}");
                }
                tx.send_replace(true);
            })
            .map_err(|e| io_err("start the output copy to", what, e))?;
        Ok((write, OutputCopy { done: vec![done] }))
    }

    /// All of `copies` as one; `None` for none.
    fn all(copies: Vec<Self>) -> Option<Self> {
        let done: Vec<_> = copies.into_iter().flat_map(|c| c.done).collect();
        (!done.is_empty()).then_some(OutputCopy { done })
    }

    /// Waits until everything the process wrote is copied, for at most `limit` (its
    /// children may hold the pipes open after it exits).
    pub async fn drained(&self, limit: Duration) {
        let all = async {
            for done in &self.done {
                let _ = done.clone().wait_for(|d| *d).await;
            }
        };
        let _ = tokio::time::timeout(limit, all).await;
    }
}

/// Starts a `binary://` logging program and waits until it reports ready; returns the write
/// ends of the stdout and stderr pipes it reads.
fn start_logger(
    program: &Path,
    args: &[String],
    owner: StreamOwner<'_>,
) -> Result<(OwnedFd, OwnedFd), ShimError> {
    let io_err = |what, source: io::Error| ShimError::Io {
        what,
        path: program.to_path_buf(),
        source,
    };
    let pipe =
        || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("create a pipe for", e.into()));
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (ready_r, ready_w) = pipe()?;
    let passed = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("CONTAINER_ID", owner.container_id)
        .env("CONTAINER_NAMESPACE", owner.namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: the closure only calls fcntl and dup2, which are async-signal-safe, on fds that
    // stay open in the parent until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            // Moved above the targets first, so no source is overwritten before it is used.
            let mut high = [0; 3];
            for (i, fd) in passed.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if h < 0 {
                    return Err(io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = crate::reaper::spawn_command(&mut cmd)
        .map_err(|e| io_err("start the logging binary", e))?;
    // Reaped by the shim's reaper with every other child; nothing waits for it here.
    drop(child);
    drop((out_r, err_r, ready_w));
    let mut fds = [PollFd::new(ready_r.as_fd(), PollFlags::POLLIN)];
    let ms = u16::try_from(LOGGER_READY_WAIT.as_millis()).unwrap_or(u16::MAX);
    let ready = poll(&mut fds, PollTimeout::from(ms)).map_err(|e| io_err("wait for", e.into()))?;
    if ready == 0 {
        return Err(ShimError::FailedPrecondition(format!(
            "the logging binary {} did not close fd 5 (its ready signal) within {:?}",
            program.display(),
            LOGGER_READY_WAIT
        )));
    }
    Ok((out_w, err_w))
}

/// Opens an output FIFO for writing without waiting for its reader: opened read-write first
/// (which never blocks), then reopened write-only through `/proc/self/fd`, which does not
/// block either since a reader (the first fd) exists at that moment.
pub(crate) fn open_output(path: &str) -> Result<Option<OwnedFd>, ShimError> {
    if path.is_empty() {
        return Ok(None);
    }
    let io_err = |source| ShimError::Io {
        what: "open",
        path: path.into(),
        source,
    };
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err)?;
    let wo = OpenOptions::new()
        .write(true)
        .open(Path::new("/proc/self/fd").join(rw.as_raw_fd().to_string()))
        .map_err(io_err)?;
    Ok(Some(wo.into()))
}

/// A read end of the FIFO at `path` (nothing when it is not a FIFO); opened without waiting,
/// once the process's write end is open.
fn fifo_reader(path: &str) -> Option<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    if path.is_empty() || !std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        return None;
    }
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map(OwnedFd::from)
        .inspect_err(|e| tracing::debug!("cannot hold a read end of {path}: {e}"))
        .ok()
}

/// Copies a stdin FIFO into the process's stdin pipe (or its terminal's master, see `Console`)
/// on a thread of its own.
///
/// As runc's shim does, the shim holds a write end of the FIFO itself until CloseIO: the
/// process reads end-of-file only once CloseIO came and every client has closed its end and
/// all they wrote is copied; a client that goes away (`ctr` killed) does not end the process's
/// input. CloseIO ([`StdinFeeder::close`]) drops only that write end, so nothing written
/// before it is lost; Delete ([`StdinFeeder::abort`]) stops the copy at once.
#[derive(Debug, Clone)]
pub struct StdinFeeder {
    pipe: Arc<Mutex<Option<File>>>,
    held: Arc<Mutex<Option<File>>>,
}

impl StdinFeeder {
    pub(crate) fn spawn(fifo: &str, pipe: File) -> Result<Self, ShimError> {
        let io_err = |what: &'static str| {
            let path = fifo.to_string();
            move |source: io::Error| ShimError::Io {
                what,
                path: path.into(),
                source,
            }
        };
        // The read end without waiting for a writer, then the shim's own write end (which
        // opens at once, a reader being there); reads block from then on.
        let src = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(io_err("open the stdin FIFO"))?;
        let held = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(fifo)
            .map_err(io_err("hold a write end of the stdin FIFO"))?;
        set_blocking(&src).map_err(io_err("set blocking reads on the stdin FIFO"))?;
        let pipe = Arc::new(Mutex::new(Some(pipe)));
        let feeder = StdinFeeder {
            pipe: pipe.clone(),
            held: Arc::new(Mutex::new(Some(held))),
        };
        let name = fifo.to_string();
        thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                if let Err(e) = feed(src, &pipe) {
                    tracing::warn!(fifo = name, "stdin copy ended: {e}");
                }
                pipe.lock().unwrap_or_else(PoisonError::into_inner).take();
            })
            .map_err(io_err("start the stdin copy of"))?;
        Ok(feeder)
    }

    /// CloseIO: the process's input ends once the clients have closed the FIFO and what they
    /// wrote is copied.
    pub fn close(&self) {
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// Ends the process's input now (Delete, or a process that could not be started).
    pub fn abort(&self) {
        self.close();
        self.pipe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

fn set_blocking(f: &File) -> io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL on a descriptor this function borrows only read and set
    // its status flags.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn feed(mut src: File, pipe: &Mutex<Option<File>>) -> io::Result<()> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut guard = pipe.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(p) => p.write_all(&buf[..n])?,
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shim-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn stdin_ends_after_close_io_and_the_writer_with_nothing_lost() {
        let dir = temp_dir("stdin");
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let paths = StdioPaths {
            stdin: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let opened = paths.open(OWNER).unwrap();
        let (stdio, feeder) = (opened.fds, opened.stdin.expect("a feeder"));
        let mut process = File::from(stdio.stdin.unwrap());
        // Written and closed by the client, then CloseIO at once: every byte arrives.
        let data = vec![b'x'; 256 * 1024];
        let writer_data = data.clone();
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        let client = std::thread::spawn(move || writer.write_all(&writer_data).unwrap());
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.len() < 1024 {
            let n = process.read(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        feeder.close();
        process.read_to_end(&mut got).unwrap();
        client.join().unwrap();
        assert_eq!(got.len(), data.len());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_client_going_away_does_not_end_the_input() {
        let dir = temp_dir("stdin-gone");
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let paths = StdioPaths {
            stdin: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let opened = paths.open(OWNER).unwrap();
        let (stdio, feeder) = (opened.fds, opened.stdin.expect("a feeder"));
        let process = File::from(stdio.stdin.unwrap());
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"a\n").unwrap();
        drop(writer);
        std::thread::sleep(Duration::from_millis(200));
        // The byte is there and no end-of-file follows it: poll says readable once, then the
        // pipe stays open (a nonblocking read finds nothing rather than EOF).
        set_nonblocking(&process);
        let mut buf = [0u8; 16];
        assert_eq!((&process).read(&mut buf).unwrap(), 2);
        let more = (&process).read(&mut buf);
        assert_eq!(more.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // Delete ends it at once.
        feeder.abort();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!((&process).read(&mut buf).unwrap(), 0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn set_nonblocking(f: &File) {
        // SAFETY: sets a status flag of a descriptor the test owns.
        unsafe {
            let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }

    #[test]
    fn output_fifo_opens_before_its_reader() {
        let dir = temp_dir("stdout");
        let fifo = dir.join("stdout");
        mkfifo(&fifo);
        let paths = StdioPaths {
            stdout: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let stdio = paths.open(OWNER).unwrap().fds;
        let mut reader = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        File::from(stdio.stdout.unwrap()).write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        reader.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn log_uris_parse_as_containerd_writes_them() {
        let uri = "binary:///usr/local/bin/my%20logger?tag=a%2Fb&verbose";
        assert_eq!(
            OutputTarget::parse(uri, uri).unwrap(),
            OutputTarget::Binary {
                program: "/usr/local/bin/my logger".into(),
                args: vec!["tag".into(), "a/b".into(), "verbose".into(), String::new()],
            }
        );
        assert_eq!(
            OutputTarget::parse("file:///var/log/c.log", "file:///var/log/c.log").unwrap(),
            OutputTarget::File("/var/log/c.log".into())
        );
        assert_eq!(
            OutputTarget::parse("/run/fifo/out", "/run/fifo/err").unwrap(),
            OutputTarget::Fifos
        );
    }

    #[test]
    fn bad_log_uris_are_refused_naming_them() {
        for (out, err) in [
            ("syslog:///x", "syslog:///x"),
            ("file://host/x", "file://host/x"),
            ("file:///a", "file:///b"),
            ("/fifo", "file:///b"),
        ] {
            let e = OutputTarget::parse(out, err).unwrap_err();
            assert!(matches!(e, ShimError::InvalidArgument(_)), "{e}");
            assert!(
                e.to_string().contains(out) || e.to_string().contains(err),
                "{e}"
            );
        }
    }

    #[test]
    fn file_log_gets_both_streams_and_drains() {
        let dir = temp_dir("filelog");
        let log = dir.join("sub/c.log");
        let uri = format!("file://{}", log.display());
        let paths = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let opened = paths.open(OWNER).unwrap();
        let copy = opened.output.expect("a copy to the file");
        File::from(opened.fds.stdout.unwrap())
            .write_all(b"out\n")
            .unwrap();
        File::from(opened.fds.stderr.unwrap())
            .write_all(b"err\n")
            .unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(copy.drained(std::time::Duration::from_secs(5)));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\nerr\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn binary_log_gets_fds_and_env() {
        let dir = temp_dir("binlog");
        let script = dir.join("logger");
        let got = dir.join("got");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec 5>&-\n{{ echo \"$CONTAINER_NAMESPACE/$CONTAINER_ID $*\"; cat <&3; cat <&4; }} > {}\n",
                got.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let uri = format!("binary://{}?k=v", script.display());
        let paths = StdioPaths {
            stdout: uri.clone(),
            stderr: uri,
            ..Default::default()
        };
        let opened = paths.open(OWNER).unwrap();
        File::from(opened.fds.stdout.unwrap())
            .write_all(b"out\n")
            .unwrap();
        File::from(opened.fds.stderr.unwrap())
            .write_all(b"err\n")
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = std::fs::read_to_string(&got).unwrap_or_default();
            if s == "ns/c1 k v\nout\nerr\n" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "logger wrote {s:?}");
            thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_logging_binary_is_named() {
        let uri = "binary:///no/such/logger";
        let paths = StdioPaths {
            stdout: uri.into(),
            stderr: uri.into(),
            ..Default::default()
        };
        let e = paths.open(OWNER).unwrap_err().to_string();
        assert!(e.contains("/no/such/logger"), "{e}");
    }

    const OWNER: StreamOwner<'static> = StreamOwner {
        io: None,
        namespace: "ns",
        container_id: "c1",
    };
}

//! The standard streams containerd gives a process: FIFO paths it reads and writes on the
//! other side (`ctr`'s `--fifo-dir`), or empty for none.
//!
//! stdout and stderr FIFOs are handed to the process itself, so its output goes to containerd
//! without passing through the shim. stdin goes through a pipe the shim feeds from the FIFO:
//! that way the process sees end-of-file when the writer closes the FIFO (or on CloseIO),
//! which it would not if it held the FIFO open itself, and opening the FIFO, which blocks
//! until a writer comes, never holds up Create.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use crate::engine::ProcessStdio;
use crate::error::ShimError;

/// The stream paths of a process, as given by containerd and reported back in State.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// Opens the streams: the fds for the new process and, when there is a stdin, the feeder
    /// that copies the stdin FIFO into it.
    pub fn open(&self) -> Result<(ProcessStdio, Option<StdinFeeder>), ShimError> {
        for uri in [&self.stdout, &self.stderr] {
            if uri.contains("://") {
                return Err(ShimError::Unimplemented(format!(
                    "the log URI {uri:?} (binary:// and file://)"
                )));
            }
        }
        if self.terminal {
            // The streams are the terminal's: see `Console`, which takes them once the
            // engine has returned the terminal's master.
            return Ok((
                ProcessStdio {
                    terminal: true,
                    ..Default::default()
                },
                None,
            ));
        }
        let stdout = open_output(&self.stdout)?;
        let stderr = open_output(&self.stderr)?;
        let (stdin, feeder) = if self.stdin.is_empty() {
            (None, None)
        } else {
            let (read, write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ShimError::Io {
                    what: "create a stdin pipe for",
                    path: self.stdin.clone().into(),
                    source: e.into(),
                })?;
            let feeder = StdinFeeder::spawn(&self.stdin, File::from(write))?;
            (Some(read), Some(feeder))
        };
        Ok((
            ProcessStdio {
                stdin,
                stdout,
                stderr,
                terminal: false,
            },
            feeder,
        ))
    }
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

/// Copies a stdin FIFO into the process's stdin pipe (or its terminal's master, see `Console`)
/// on a thread of its own, until the FIFO's writer closes it or [`StdinFeeder::close`] is
/// called.
#[derive(Debug, Clone)]
pub struct StdinFeeder {
    pipe: Arc<Mutex<Option<File>>>,
}

impl StdinFeeder {
    pub(crate) fn spawn(fifo: &str, pipe: File) -> Result<Self, ShimError> {
        let pipe = Arc::new(Mutex::new(Some(pipe)));
        let feeder = StdinFeeder { pipe: pipe.clone() };
        let path = fifo.to_string();
        let fifo = fifo.to_string();
        thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                if let Err(e) = feed(&fifo, &pipe) {
                    tracing::warn!(fifo, "stdin copy ended: {e}");
                }
                pipe.lock().unwrap_or_else(PoisonError::into_inner).take();
            })
            .map_err(|source| ShimError::Io {
                what: "start the stdin copy of",
                path: path.into(),
                source,
            })?;
        Ok(feeder)
    }

    /// Closes the process's stdin (CloseIO): it reads end-of-file once the pipe is drained.
    pub fn close(&self) {
        self.pipe
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

fn feed(fifo: &str, pipe: &Mutex<Option<File>>) -> io::Result<()> {
    // Blocks until the writer (containerd's client) opens its end.
    let mut src = File::open(fifo)?;
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
    fn stdin_reaches_the_pipe_and_ends_with_the_writer() {
        let dir = temp_dir("stdin");
        let fifo = dir.join("stdin");
        mkfifo(&fifo);
        let paths = StdioPaths {
            stdin: fifo.to_string_lossy().into_owned(),
            ..Default::default()
        };
        let (stdio, feeder) = paths.open().unwrap();
        assert!(feeder.is_some());
        let mut writer = OpenOptions::new().write(true).open(&fifo).unwrap();
        writer.write_all(b"x\n").unwrap();
        drop(writer);
        let mut got = String::new();
        File::from(stdio.stdin.unwrap())
            .read_to_string(&mut got)
            .unwrap();
        assert_eq!(got, "x\n");
        std::fs::remove_dir_all(dir).unwrap();
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
        let (stdio, _) = paths.open().unwrap();
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
    fn log_uris_are_refused_clearly() {
        let paths = StdioPaths {
            stdout: "binary:///usr/bin/logger".into(),
            ..Default::default()
        };
        let err = paths.open().unwrap_err().to_string();
        assert!(err.contains("binary:///usr/bin/logger"), "{err}");
    }

    use std::os::unix::fs::OpenOptionsExt;
}

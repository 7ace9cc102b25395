//! Running a command under a pseudo-terminal, for `ctr run -t` and `ctr task exec -t` (they
//! refuse to run without a terminal, and CI has none).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use nix::pty::{openpty, Winsize};

/// What a command printed on its terminal, and how it ended.
#[derive(Debug)]
pub struct PtyOutput {
    /// Everything read from the terminal (CR LF as the terminal wrote it).
    pub output: String,
    pub status: ExitStatus,
}

/// Errors running under a pseudo-terminal.
#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot open a pseudo-terminal: {0}")]
    Open(nix::Error),
    #[error("cannot run {program}: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("{program} did not finish within {limit:?}; terminal so far: {output:?}")]
    Timeout {
        program: String,
        limit: Duration,
        output: String,
    },
    #[error("terminal i/o: {0}")]
    Io(#[from] io::Error),
}

/// Runs `cmd` with a new pseudo-terminal as its controlling terminal and stdio, writes
/// `input` to it, and collects the output until the command exits (killing it after `limit`).
pub fn run_in_pty(cmd: Command, input: &[u8], limit: Duration) -> Result<PtyOutput, PtyError> {
    run_in_pty_when(cmd, "", input, limit)
}

/// As [`run_in_pty`], but types `input` only once the output contains `ready` (a prompt), as
/// a user would: input typed before a program set up its terminal may be discarded by it.
pub fn run_in_pty_when(
    mut cmd: Command,
    ready: &str,
    input: &[u8],
    limit: Duration,
) -> Result<PtyOutput, PtyError> {
    let winsize = Winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = openpty(Some(&winsize), None).map_err(PtyError::Open)?;
    let slave: OwnedFd = pty.slave;
    let program = format!("{:?}", cmd.get_program());
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: the closure runs in the forked child before exec and calls only setsid(2) and
    // ioctl(2), both async-signal-safe; it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // fd 0 is the slave: make it the controlling terminal of the new session.
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| PtyError::Spawn {
        program: program.clone(),
        source,
    })?;
    // Only the child holds the slave now, so reading the master ends (EIO) when it exits.
    drop(slave);
    drop(cmd);

    let master = File::from(pty.master);
    let mut writer = master.try_clone()?;
    let mut reader = master;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let reader_thread = thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EIO: every slave descriptor is closed.
                Err(_) => break,
            }
        }
    });
    let mut pending = (!input.is_empty()).then_some(input);

    let deadline = std::time::Instant::now() + limit;
    let mut output = Vec::new();
    let mut answered = 0;
    let mut quiet_since = std::time::Instant::now();
    let status = loop {
        while let Ok(chunk) = rx.try_recv() {
            output.extend(chunk);
            quiet_since = std::time::Instant::now();
        }
        // Answer cursor position queries (ESC [ 6 n) as a terminal does: busybox's shell asks
        // at its prompt and takes what it reads next as the answer.
        let text = String::from_utf8_lossy(&output);
        let asked = text.matches("\x1b[6n").count();
        while answered < asked {
            writer.write_all(b"\x1b[1;1R")?;
            answered += 1;
        }
        if let Some(typed) = pending {
            let settled = quiet_since.elapsed() > Duration::from_millis(200);
            if ready.is_empty() || (text.contains(ready) && settled) {
                writer.write_all(typed)?;
                pending = None;
            }
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(PtyError::Timeout {
                program,
                limit,
                output: String::from_utf8_lossy(&output).into_owned(),
            });
        }
        thread::sleep(Duration::from_millis(10));
    };
    // Grandchildren may still hold the slave; give the reader a moment, then stop waiting.
    let drain_until = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < drain_until {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(chunk) => output.extend(chunk),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    drop(writer);
    if reader_thread.is_finished() {
        let _ = reader_thread.join();
    }
    Ok(PtyOutput {
        output: String::from_utf8_lossy(&output).into_owned(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_sees_a_terminal() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("tty; test -t 0 && echo stdin-is-tty");
        let out = run_in_pty(cmd, b"", Duration::from_secs(10)).unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(out.output.contains("/dev/pts/"), "{out:?}");
        assert!(out.output.contains("stdin-is-tty"), "{out:?}");
    }

    #[test]
    fn input_reaches_the_command() {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("read line; echo got:$line");
        let out = run_in_pty(cmd, b"hello\n", Duration::from_secs(10)).unwrap();
        assert!(out.output.contains("got:hello"), "{out:?}");
    }
}

//! A real OCI registry (Debian's `docker-registry`, the CNCF distribution server) on loopback,
//! in its own sandbox.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::sandbox::{Sandbox, SandboxError};

/// The registry binary Debian's `docker-registry` package installs.
pub const REGISTRY_BINARY: &str = "/usr/bin/docker-registry";

/// Errors of the loopback registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{REGISTRY_BINARY} is missing: run scripts/setup-host (it installs docker-registry)")]
    NotInstalled,
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the registry on {addr} did not answer /v2/ within {secs} s; log:\n{tail}")]
    StartTimeout {
        addr: SocketAddr,
        secs: u64,
        tail: String,
    },
}

/// A running registry on `127.0.0.1:PORT`, serving plain HTTP. Dropping it stops it and
/// removes its storage.
#[derive(Debug)]
pub struct Registry {
    addr: SocketAddr,
    child: Option<Child>,
    sandbox: Sandbox,
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until it answers.
    pub fn start() -> Result<Self, RegistryError> {
        if !Path::new(REGISTRY_BINARY).is_file() {
            return Err(RegistryError::NotInstalled);
        }
        let mut sandbox = Sandbox::create("registry")?;
        let dir = sandbox.dir().to_path_buf();
        let io_err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { what, path, source }
        };
        // Retry a few ports in case another process takes ours between probe and bind.
        let mut last = None;
        for _ in 0..5 {
            let port = free_port().map_err(io_err("cannot find a free port near", &dir))?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let config = dir.join("config.yml");
            let data = dir.join("data");
            fs::write(&config, config_yaml(addr, &data))
                .map_err(io_err("cannot write", &config))?;
            let log_path = dir.join("registry.log");
            let log = fs::File::create(&log_path).map_err(io_err("cannot create", &log_path))?;
            let log2 = log.try_clone().map_err(io_err("cannot open", &log_path))?;
            let child = Command::new(REGISTRY_BINARY)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2)
                .spawn()
                .map_err(io_err("cannot start", Path::new(REGISTRY_BINARY)))?;
            sandbox.track(&child, "registry")?;
            let mut child = child;
            match wait_ready(&mut child, addr, &dir, Duration::from_secs(20)) {
                Ok(()) => {
                    return Ok(Registry {
                        addr,
                        child: Some(child),
                        sandbox,
                    })
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    sandbox.untrack(child.id())?;
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or(RegistryError::NotInstalled))
    }

    /// `127.0.0.1:PORT`, as image references and `skopeo` want it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    /// A reference to `repo:tag` in this registry.
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.addr)
    }

    /// The HTTP status of `GET path`.
    pub fn get_status(&self, path: &str) -> io::Result<u16> {
        http_status(self.addr, path)
    }

    fn stop_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = self.sandbox.untrack(child.id());
        }
    }

    /// Stops the registry and removes its storage, checking nothing is left.
    pub fn teardown(&mut self) -> Result<(), RegistryError> {
        self.stop_child();
        self.sandbox.teardown()?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("registry teardown: {e}");
            eprintln!("hyperbox harness: registry teardown: {e}");
        }
    }
}

fn wait_ready(
    child: &mut Child,
    addr: SocketAddr,
    dir: &Path,
    limit: Duration,
) -> Result<(), RegistryError> {
    let deadline = Instant::now() + limit;
    loop {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if !exited && http_status(addr, "/v2/").is_ok_and(|s| s == 200) {
            return Ok(());
        }
        if exited || Instant::now() > deadline {
            let log = fs::read_to_string(dir.join("registry.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            return Err(RegistryError::StartTimeout {
                addr,
                secs: limit.as_secs(),
                tail: lines[lines.len().saturating_sub(20)..].join("\n"),
            });
        }
        thread::sleep(Duration::from_millis(25));
    }
}

fn config_yaml(addr: SocketAddr, data: &Path) -> String {
    format!(
        "# Generated by the HyperBox test harness.\n\
         version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n\
         http:\n  addr: \"{addr}\"\n",
        data.display()
    )
}

fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// A minimal HTTP/1.0 GET, enough to probe the registry without an HTTP client crate.
fn http_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an HTTP response"))
}

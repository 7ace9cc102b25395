//! Workloads shared by the template tests and benchmarks: a Python service that takes about
//! 2 s to warm up, a request to it, and network namespaces with their loopback up.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A service that warms up for about 2 s (imports, a table, then a sleep up to 2 s), then
/// serves on 127.0.0.1:8000 and creates /ready. Its answer names the moment it started, which
/// a restored copy keeps: it has not run its warm-up again. Run as `python3 -c PY_SERVICE`.
pub const PY_SERVICE: &str = r#"
import time
started = time.time()
import json, http.server, email.mime.multipart, xml.dom.minidom, decimal, statistics
import argparse, logging.handlers, asyncio, urllib.request, difflib, csv, zipfile, tarfile
table = {i: str(i * i) for i in range(200000)}
time.sleep(max(0.0, 2.0 - (time.time() - started)))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("warm started=%.6f entries=%d\n" % (started, len(table))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 8000), Handler)
open("/ready", "w").close()
server.serve_forever()
"#;

/// A service holding `mib` MiB of touched heap (a bytearray filled with random bytes, one
/// MiB at a time), on 127.0.0.1:8000 like [`PY_SERVICE`], ready when `/ready` exists. `GET /`
/// answers at once: `heap started=T sha=S` (S: the heap's SHA-256 computed once it was
/// filled); `GET /sum` computes the SHA-256 of the whole heap again and answers `sum now=N
/// sha=S`, so N equal to S proves every page holds what it held at start.
pub fn py_heap_service(mib: usize) -> String {
    format!(
        r#"
import hashlib, http.server, os, time
started = time.time()
heap = bytearray({mib} << 20)
for i in range({mib}):
    heap[i << 20:(i + 1) << 20] = os.urandom(1 << 20)
sha = hashlib.sha256(heap).hexdigest()

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/sum":
            body = "sum now=%s sha=%s\n" % (hashlib.sha256(heap).hexdigest(), sha)
        else:
            body = "heap started=%.6f sha=%s\n" % (started, sha)
        body = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 8000), Handler)
open("/ready", "w").close()
server.serve_forever()
"#
    )
}

/// [`PY_SERVICE_GET`] for `GET /sum` of [`py_heap_service`].
pub const PY_HEAP_SUM: &str =
    "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET /sum HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";

/// The port [`PY_SERVICE`] listens on, on the container's loopback.
pub const PY_SERVICE_PORT: u16 = 8000;

/// One request to the service from inside its container, for `bash -c` (bash's /dev/tcp).
pub const PY_SERVICE_GET: &str =
    "exec 3<>/dev/tcp/127.0.0.1/8000 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3";

/// A network namespace with its loopback up, bound at `file` (as CNI gives a pod one; a
/// namespace `ctr run` creates has its loopback down). `ctr run --with-ns network:FILE`
/// puts a container in it. Remove it with [`remove_network`].
pub fn network_with_loopback(file: &Path) -> Result<PathBuf, String> {
    fs::write(file, "").map_err(|e| format!("cannot create {}: {e}", file.display()))?;
    let out = Command::new("unshare")
        .arg(format!("--net={}", file.display()))
        .args(["ip", "link", "set", "lo", "up"])
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if !out.status.success() {
        let _ = fs::remove_file(file);
        return Err(format!(
            "unshare --net={}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(file.to_path_buf())
}

/// Unbinds and removes a namespace made by [`network_with_loopback`].
pub fn remove_network(file: &Path) -> Result<(), String> {
    nix::mount::umount2(file, nix::mount::MntFlags::MNT_DETACH)
        .map_err(|e| format!("cannot unmount {}: {e}", file.display()))?;
    fs::remove_file(file).map_err(|e| format!("cannot remove {}: {e}", file.display()))
}

/// Runs `f` on a thread of this process that has entered the network namespace at `netns`.
fn in_network<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> Result<T, String> + Send,
) -> Result<T, String> {
    let ns = fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {}: {e}", netns.display()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err("the thread in the network namespace panicked".into()))
    })
}

/// A TCP connection to `127.0.0.1:PORT` inside the network namespace at `netns`, retried
/// until `timeout`; nothing is sent.
pub fn connect_in_network(netns: &Path, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    in_network(netns, || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => return Ok(stream),
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(format!("connect to {addr} in {}: {e}", netns.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

/// One HTTP GET of `127.0.0.1:PORT/` inside the network namespace at `netns`: the body, or
/// why there is none (yet).
pub fn get_in_network(netns: &Path, port: u16, timeout: Duration) -> Result<String, String> {
    in_network(netns, || {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        stream
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        text.split("\r\n\r\n")
            .nth(1)
            .map(str::to_string)
            .ok_or_else(|| format!("no HTTP body in {text:?}"))
    })
}

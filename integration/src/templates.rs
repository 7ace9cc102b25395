//! The template store of a test daemon's shims, for tests: `containerd-shim-hyperbox-v1
//! templates ...` run against it, where its templates are, and waiting for a capture.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::containerd::Containerd;
use crate::host;

/// The shim whose `templates` subcommand manages the store.
const SHIM: &str = "containerd-shim-hyperbox-v1";
/// Its runtime.
const OURS: &str = "io.containerd.hyperbox.v1";

/// `containerd-shim-hyperbox-v1 templates ARGS -n NAMESPACE` for this daemon's namespace and
/// store, with its template settings and its `PATH` (where CRIU is), `HOME` in its sandbox
/// (no user's registry credentials).
pub fn cli(c: &Containerd, args: &[&str]) -> Output {
    let shim = host::workspace_binary(SHIM).expect("the shim is built");
    Command::new(shim)
        .arg("templates")
        .args(args)
        .args(["-n", c.namespace()])
        .env("HYPERBOX_TEMPLATE_ROOT", c.template_root())
        .env("HYPERBOX_TEMPLATE_CONFIG", c.template_settings())
        .env("PATH", c.path_env())
        .env("HOME", c.dir())
        .stdin(Stdio::null())
        .output()
        .expect("templates command")
}

/// This daemon's namespace's templates.
pub fn store(c: &Containerd) -> PathBuf {
    c.template_root().join(c.namespace())
}

/// Waits until template `name` is kept; fails at once with the reason a capture failed.
pub fn wait_template(c: &Containerd, name: &str, limit: Duration) -> PathBuf {
    let dir = store(c).join(name);
    let error = store(c).join(format!(".{name}.error"));
    let deadline = Instant::now() + limit;
    while !dir.join("template.json").is_file() {
        if let Ok(reason) = fs::read_to_string(&error) {
            panic!("capture of {name} failed: {reason}\n{}", c.log_tail(30));
        }
        assert!(
            Instant::now() < deadline,
            "no template {name}\n{}",
            c.log_tail(40)
        );
        thread::sleep(Duration::from_millis(50));
    }
    dir
}

/// `ctr run -d --null-io --runtime io.containerd.hyperbox.v1` of `cmd` in `image` as `id`,
/// in network namespace `netns` when given, with `annotations`.
pub fn run(
    c: &Containerd,
    image: &str,
    id: &str,
    netns: Option<&Path>,
    annotations: &[(&str, &str)],
    cmd: &[&str],
) -> Output {
    let pairs: Vec<String> = annotations
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let with_ns = netns.map(|n| format!("network:{}", n.display()));
    let mut args = vec!["run", "-d", "--null-io", "--runtime", OURS];
    if let Some(ns) = &with_ns {
        args.extend(["--with-ns", ns.as_str()]);
    }
    for p in &pairs {
        args.extend(["--annotation", p.as_str()]);
    }
    args.extend([image, id]);
    args.extend_from_slice(cmd);
    c.ctr()
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .expect("ctr run")
}

/// [`run`], which must succeed.
pub fn run_ok(
    c: &Containerd,
    image: &str,
    id: &str,
    netns: Option<&Path>,
    annotations: &[(&str, &str)],
    cmd: &[&str],
) {
    let out = run(c, image, id, netns, annotations, cmd);
    assert!(
        out.status.success(),
        "ctr run {id}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(30)
    );
}

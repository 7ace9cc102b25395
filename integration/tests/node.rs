//! `hyperbox-node` on real daemons. `doctor`: a bare containerd (no CRI runtimes of ours, no
//! snapshotter) is told what to add; a CRI node with our runtimes and hyperbox-snapshotter
//! is found complete; the snapshotter stopped is named missing. The kernel, cgroups, CRIU and
//! userfaultfd checks run against this host (the unit tests cover their failures with a
//! fake host). `configure-containerd` and `unconfigure-containerd` on a copy of each
//! version's real configuration. `install` into a private root and back, `install --dry-run`
//! against this host's real paths, and `verify` on a CRI node of each version.

use std::process::{Command, Output};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::cri::CriBed;
use hyperbox_integration::cri_versions;
use hyperbox_integration::gpu::{built_binary, describe_output};
use hyperbox_integration::per_version;
use hyperbox_integration::testbed::TestBed;
use nix::sys::signal::Signal;

/// `hyperbox-node doctor --json` against `c`, with containerd's own PATH.
fn doctor(c: &Containerd) -> (Output, serde_json::Value) {
    let out = Command::new(built_binary("hyperbox-node"))
        .arg("doctor")
        .arg("--json")
        .arg("--address")
        .arg(c.socket())
        .arg("--config")
        .arg(c.config_path())
        .arg("--containerd")
        .arg(c.version().containerd())
        .arg("--ctr")
        .arg(c.version().ctr())
        .arg("--path")
        .arg(c.path_env())
        .output()
        .expect("hyperbox-node runs");
    let findings = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor's JSON: {e}\n{}", describe_output(&out)));
    (out, findings)
}

/// The statuses of `check`'s findings.
fn statuses(findings: &serde_json::Value, check: &str) -> Vec<String> {
    findings
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == check)
        .map(|f| f["status"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn doctor_tells_a_bare_containerd_what_to_add() {
    let v = ContainerdVersion::V1_7;
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = TestBed::start(v).expect("test bed");
    let (out, f) = doctor(&bed.containerd);
    eprintln!("{f:#}");
    // This host has everything below containerd (setup-host's CRIU, a 6.x kernel).
    for check in [
        "kernel erofs",
        "cgroups",
        "criu",
        "containerd",
        "containerd socket",
        "userfaultfd",
    ] {
        assert_eq!(statuses(&f, check), ["ok"], "{check}: {f:#}");
    }
    assert_eq!(statuses(&f, "shim binary"), ["ok", "ok"], "{f:#}");
    // No CRI runtimes of ours and no snapshotter: warnings, each with its fix.
    assert_eq!(statuses(&f, "CRI runtime"), ["warn", "warn"], "{f:#}");
    assert_eq!(statuses(&f, "snapshotter"), ["warn"], "{f:#}");
    assert!(f
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["status"] != "ok")
        .all(|x| x["fix"]
            .as_str()
            .is_some_and(|s| s.starts_with("hyperbox-node install"))));
    // Warnings only: exit 0.
    assert!(out.status.success(), "{}", describe_output(&out));
}

/// A CRI node with our handlers and hyperbox-snapshotter: complete; the snapshotter killed:
/// missing, exit 1.
fn cri_node_complete(v: ContainerdVersion) {
    let mut bed = CriBed::start_with_snapshotter(v).expect("CRI bed with the snapshotter");
    let (out, f) = doctor(&bed.containerd);
    eprintln!("{f:#}");
    assert_eq!(statuses(&f, "CRI runtime"), ["ok", "ok"], "{f:#}");
    assert_eq!(statuses(&f, "snapshotter"), ["ok"], "{f:#}");
    assert!(out.status.success(), "{}", describe_output(&out));
    bed.snapshotter
        .as_mut()
        .expect("the snapshotter")
        .stop(Signal::SIGKILL);
    let (out, f) = doctor(&bed.containerd);
    assert_eq!(statuses(&f, "snapshotter"), ["missing"], "{f:#}");
    assert!(!out.status.success(), "{}", describe_output(&out));
    bed.teardown().expect("teardown");
}
cri_versions!(cri_node_complete);

/// `configure-containerd` on a copy of a real daemon's configuration: `--dry-run` changes
/// nothing; the edit makes `containerd config dump` show our runtimes and snapshotter, keeps
/// every line of the user's file and is idempotent; `unconfigure-containerd` puts the file
/// back byte for byte and removes the drop-in.
fn configure_and_unconfigure(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    let dir = c.dir().join("node-config");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.toml");
    // The daemon's own file with its CRI plugin on, as on a Kubernetes node (a dump shows no
    // CRI settings for a disabled plugin; the dump starts nothing).
    let original: Vec<u8> = std::fs::read_to_string(c.config_path())
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("disabled_plugins"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .into_bytes();
    std::fs::write(&config, &original).unwrap();
    let node = |args: &[&str]| {
        Command::new(built_binary("hyperbox-node"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--containerd")
            .arg(v.containerd())
            .arg("--drop-in-dir")
            .arg(dir.join("conf.d"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .output()
            .expect("hyperbox-node runs")
    };
    let dump = || {
        let out = Command::new(v.containerd())
            .arg("--config")
            .arg(&config)
            .args(["config", "dump"])
            .output()
            .expect("containerd config dump");
        assert!(out.status.success(), "{}", describe_output(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(!dump().contains("io.containerd.hyperbox.v1"));

    let out = node(&["configure-containerd", "--dry-run"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("+") && shown.contains("hyperbox"), "{shown}");
    assert_eq!(
        std::fs::read(&config).unwrap(),
        original,
        "--dry-run changed the file"
    );
    assert!(!dir.join("state").exists() && !dir.join("conf.d").exists());

    let out = node(&["configure-containerd"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let edited = std::fs::read_to_string(&config).unwrap();
    for line in String::from_utf8_lossy(&original).lines() {
        assert!(edited.contains(line), "{line:?} lost:\n{edited}");
    }
    let d = dump();
    for want in [
        "io.containerd.hyperbox.v1",
        "io.containerd.hyperbox-wasm.v1",
        "/run/hyperbox/snapshotter.sock",
    ] {
        assert!(
            d.contains(want),
            "containerd {v}: {want} not in the dump:\n{d}"
        );
    }
    assert_eq!(dir.join("conf.d/hyperbox.toml").exists(), v.is_2x());
    let out = node(&["configure-containerd"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        edited,
        "not idempotent"
    );

    let out = node(&["unconfigure-containerd"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        std::fs::read(&config).unwrap(),
        original,
        "not restored byte for byte"
    );
    assert!(!dir.join("conf.d/hyperbox.toml").exists());
    assert!(!dump().contains("io.containerd.hyperbox.v1"));
    let out = node(&["unconfigure-containerd"]);
    assert!(
        !out.status.success(),
        "a second undo found something to undo"
    );
}
per_version!(configure_containerd, configure_and_unconfigure);

/// The unpacked release of this build that `scripts/test` makes (`HYPERBOX_RELEASE_DIR`):
/// its `hyperbox-node` is the static one a release ships. `None` (the test says skipped)
/// outside `scripts/test`; CI runs through it, where a missing release fails.
fn release_dir() -> Option<std::path::PathBuf> {
    match std::env::var_os("HYPERBOX_RELEASE_DIR") {
        Some(d) => Some(d.into()),
        None if std::env::var_os("CI").is_some() => {
            panic!("HYPERBOX_RELEASE_DIR is not set: scripts/test makes the release")
        }
        None => {
            hyperbox_integration::skip(
                "no HYPERBOX_RELEASE_DIR (scripts/release --profile dev makes one)",
            );
            None
        }
    }
}

/// Every file under the places `install` writes on a host, with its size, mode and
/// modification time: what must not change under `--dry-run`.
fn host_state() -> Vec<(std::path::PathBuf, u64, u32, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    for dir in [
        "/usr/local/bin",
        "/usr/local/sbin",
        "/etc/containerd",
        "/etc/hyperbox",
        "/etc/systemd/system",
        "/etc/udev/rules.d",
        "/var/lib/hyperbox/node",
    ] {
        let mut stack = vec![std::path::PathBuf::from(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(m) = e.path().symlink_metadata() else {
                    continue;
                };
                if m.is_dir() {
                    stack.push(e.path());
                }
                out.push((
                    e.path(),
                    m.size(),
                    m.mode(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                ));
            }
        }
    }
    out.sort();
    out
}

/// `install --dry-run` with every default (this host's real /usr/local/bin, /etc/containerd,
/// systemd's and udev's directories): it says what it would do, and nothing on the host
/// changes.
#[test]
fn install_dry_run_changes_nothing_on_this_host() {
    let Some(release) = release_dir() else {
        return;
    };
    let v = ContainerdVersion::selected()[0];
    let before = host_state();
    let out = Command::new(release.join("bin/hyperbox-node"))
        .args(["install", "--dry-run", "--containerd"])
        .arg(v.containerd())
        .output()
        .expect("hyperbox-node runs");
    assert!(out.status.success(), "{}", describe_output(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    for want in [
        "/usr/local/bin/containerd-shim-hyperbox-v1: ",
        "/etc/systemd/system/hyperbox-snapshotter.service: ",
        "/etc/hyperbox/snapshotter.toml: ",
        "--- /etc/containerd/config.toml",
    ] {
        assert!(shown.contains(want), "{want:?} not shown:\n{shown}");
    }
    assert_eq!(before, host_state(), "--dry-run changed the host");
}

/// `hyperbox-node ARGS` (`install` or `uninstall`) of `release` on a host whose every path
/// is under `root` (containerd's configuration at `etc/containerd/config.toml`), with
/// `--restart none`: this host has no systemd.
fn node_in_root(
    release: &std::path::Path,
    root: &std::path::Path,
    v: ContainerdVersion,
    args: &[&str],
) -> Output {
    let p = |rel: &str| root.join(rel);
    let mut cmd = Command::new(release.join("bin/hyperbox-node"));
    cmd.args(args)
        .arg("--config")
        .arg(p("etc/containerd/config.toml"))
        .arg("--containerd")
        .arg(v.containerd())
        .arg("--drop-in-dir")
        .arg(p("etc/containerd/conf.d"))
        .arg("--state-dir")
        .arg(p("state"))
        .args(["--restart", "none"]);
    if args[0] == "install" {
        for (flag, dir) in [
            ("--bin-dir", "bin"),
            ("--sbin-dir", "sbin"),
            ("--etc-dir", "etc/hyperbox"),
            ("--unit-dir", "units"),
            ("--udev-dir", "udev"),
        ] {
            cmd.arg(flag).arg(p(dir));
        }
        cmd.arg("--from").arg(release);
    }
    cmd.output().expect("hyperbox-node runs")
}

/// `install --restart none` into a private root (this host has no systemd): the files, the
/// configuration edit, a foreign file replaced and saved, a configuration file of the user's
/// kept, the record root-only; a second install changes nothing; `uninstall` puts back the
/// foreign file and the configuration byte for byte, removes ours, and keeps one the user
/// changed since.
fn install_and_uninstall_in_a_private_root(v: ContainerdVersion) {
    let Some(release) = release_dir() else {
        return;
    };
    use std::os::unix::fs::PermissionsExt;
    let bed = TestBed::start(v).expect("test bed");
    let root = bed.containerd.dir().join("node-root");
    let p = |rel: &str| root.join(rel);
    for d in [
        "bin",
        "sbin",
        "etc/containerd",
        "etc/hyperbox",
        "units",
        "udev",
    ] {
        std::fs::create_dir_all(p(d)).unwrap();
    }
    let config = p("etc/containerd/config.toml");
    let original = b"# the user's own\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.8\" # pinned\n".to_vec();
    let original = if v.is_2x() {
        b"# the user's own\nversion = 3\n\n[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'registry.k8s.io/pause:3.8' # pinned\n".to_vec()
    } else {
        original
    };
    std::fs::write(&config, &original).unwrap();
    // Someone else's hyperbox-gpu-cdi, and the user's own snapshotter settings.
    std::fs::write(p("bin/hyperbox-gpu-cdi"), b"#!/bin/sh\necho theirs\n").unwrap();
    std::fs::write(p("etc/hyperbox/snapshotter.toml"), b"# mine\n").unwrap();
    let node = |args: &[&str]| node_in_root(&release, &root, v, args);

    let out = node(&["install"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("hyperbox-node verify"), "{said}");
    for b in [
        "containerd-shim-hyperbox-v1",
        "containerd-shim-hyperbox-wasm-v1",
        "hyperbox-snapshotter",
        "hyperbox-gpu-hook",
        "hyperbox-gpu-cdi",
        "hyperbox-node",
    ] {
        assert_eq!(
            std::fs::read(p("bin").join(b)).unwrap(),
            std::fs::read(release.join("bin").join(b)).unwrap(),
            "{b}"
        );
    }
    let unit = std::fs::read_to_string(p("units/hyperbox-snapshotter.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={}",
            p("bin/hyperbox-snapshotter").display()
        )),
        "the unit runs the installed binary:\n{unit}"
    );
    assert_eq!(
        std::fs::read(p("etc/hyperbox/snapshotter.toml")).unwrap(),
        b"# mine\n"
    );
    assert!(p("etc/hyperbox/gpu.toml").is_file());
    let edited = std::fs::read_to_string(&config).unwrap();
    assert!(edited.starts_with("# the user's own\n"), "{edited}");
    assert_eq!(
        p("etc/containerd/conf.d/hyperbox.toml").is_file(),
        v.is_2x()
    );
    let record = p("state/installed.json");
    let mode = std::fs::metadata(&record).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "installed.json is {mode:o}");
    assert_eq!(
        std::fs::metadata(p("state")).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let recorded = std::fs::read(&record).unwrap();
    let out = node(&["install"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        std::fs::read(&record).unwrap(),
        recorded,
        "the second install changed the record"
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("(New)"),
        "{}",
        describe_output(&out)
    );

    // The user changes the installed gpu.toml: uninstall keeps it.
    std::fs::write(
        p("etc/hyperbox/gpu.toml"),
        b"accept_env_when_unprivileged = false\n",
    )
    .unwrap();
    let out = node(&["uninstall"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        std::fs::read(&config).unwrap(),
        original,
        "not restored byte for byte"
    );
    assert!(!p("etc/containerd/conf.d/hyperbox.toml").exists());
    assert_eq!(
        std::fs::read(p("bin/hyperbox-gpu-cdi")).unwrap(),
        b"#!/bin/sh\necho theirs\n",
        "the foreign file is put back"
    );
    for gone in [
        "bin/containerd-shim-hyperbox-v1",
        "bin/hyperbox-node",
        "units/hyperbox-snapshotter.service",
        "udev/99-hyperbox-gpu.rules",
        "state/installed.json",
    ] {
        assert!(!p(gone).exists(), "{gone} is left");
    }
    assert_eq!(
        std::fs::read(p("etc/hyperbox/snapshotter.toml")).unwrap(),
        b"# mine\n"
    );
    assert!(
        p("etc/hyperbox/gpu.toml").is_file(),
        "a file changed since install is kept"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kept"),
        "{}",
        describe_output(&out)
    );
    let out = node(&["uninstall"]);
    assert!(
        !out.status.success(),
        "a second uninstall found something to undo"
    );
    bed.teardown().expect("teardown");
}
per_version!(install_uninstall, install_and_uninstall_in_a_private_root);

/// `hyperbox-node verify` (what install ends with) on a CRI node with our runtimes and
/// snapshotter: a native container through each runtime, a wasm one, a snapshot; with the
/// snapshotter killed it fails and says which part.
fn verify_on_a_node(v: ContainerdVersion) {
    let Some(release) = release_dir() else {
        return;
    };
    let mut bed = CriBed::start_with_snapshotter(v).expect("CRI bed with the snapshotter");
    let verify = || {
        Command::new(release.join("bin/hyperbox-node"))
            .arg("verify")
            .arg("--address")
            .arg(bed.containerd.socket())
            .arg("--ctr")
            .arg(v.ctr())
            .args(["--timeout-s", "10"])
            .output()
            .expect("hyperbox-node runs")
    };
    let out = verify();
    assert!(out.status.success(), "{}", describe_output(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(said.matches("verified:").count(), 4, "{said}");
    bed.snapshotter
        .as_mut()
        .expect("the snapshotter")
        .stop(Signal::SIGKILL);
    let out = verify();
    assert!(!out.status.success(), "{}", describe_output(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hyperbox snapshotter"),
        "{}",
        describe_output(&out)
    );
    bed.teardown().expect("teardown");
}
cri_versions!(verify_on_a_node);

/// An install that fails part way (a directory where a binary goes) says which file, leaves
/// containerd's configuration alone, and `uninstall` removes what it had written and puts
/// back the file it had replaced.
#[test]
fn an_interrupted_install_is_undone() {
    let Some(release) = release_dir() else {
        return;
    };
    let v = ContainerdVersion::selected()[0];
    let root = std::env::temp_dir().join(format!("hb-node-interrupted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let p = |rel: &str| root.join(rel);
    std::fs::create_dir_all(p("etc/containerd")).unwrap();
    std::fs::create_dir_all(p("bin/hyperbox-node")).unwrap();
    std::fs::write(p("bin/containerd-shim-hyperbox-v1"), b"theirs").unwrap();
    let config = p("etc/containerd/config.toml");
    std::fs::write(&config, b"version = 2\n").unwrap();
    let node = |args: &[&str]| node_in_root(&release, &root, v, args);
    let out = node(&["install"]);
    assert!(!out.status.success(), "{}", describe_output(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("bin/hyperbox-node"), "{said}");
    assert_eq!(std::fs::read(&config).unwrap(), b"version = 2\n");
    assert!(
        p("bin/containerd-shim-hyperbox-wasm-v1").is_file(),
        "written before the failure"
    );

    let out = node(&["uninstall"]);
    assert!(out.status.success(), "{}", describe_output(&out));
    assert_eq!(
        std::fs::read(p("bin/containerd-shim-hyperbox-v1")).unwrap(),
        b"theirs"
    );
    assert!(!p("bin/containerd-shim-hyperbox-wasm-v1").exists());
    assert!(p("bin/hyperbox-node").is_dir(), "not ours: left alone");
    assert_eq!(std::fs::read(&config).unwrap(), b"version = 2\n");
    std::fs::remove_dir_all(&root).unwrap();
}

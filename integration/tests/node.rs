//! `hyperbox-node` on real daemons. `doctor`: a bare containerd (no CRI runtimes of ours, no
//! snapshotter) is told what to add; a CRI node with our runtimes and hyperbox-snapshotter
//! is found complete; the snapshotter stopped is named missing. The kernel, cgroups, CRIU and
//! userfaultfd checks run against this host (the unit tests cover their failures with a
//! fake host). `configure-containerd` and `unconfigure-containerd` on a copy of each
//! version's real configuration.

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
    if !ContainerdVersion::selected().contains(&v) {
        eprintln!("containerd {v} not selected by HYPERBOX_CONTAINERD: skipped");
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
        .all(|x| x["fix"].as_str().is_some_and(|s| s.contains("config/"))));
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

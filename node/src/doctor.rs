//! `hyperbox-node doctor`: what this host lacks for HyperBox, one finding per line, each with
//! the fix. Every probe goes through [`Host`], so the findings are unit-tested against fake
//! hosts; [`crate::host::RealHost`] asks the real one (and mounts a tiny EROFS image to know,
//! not guess, whether file-backed mounts work).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Present and working.
    Ok,
    /// Works, but a part of HyperBox is limited here (the detail says which).
    Warn,
    /// A part of HyperBox cannot work here until it is fixed.
    Missing,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Missing => "MISSING",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, when the status is not ok.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Finding {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn not_ok(
        check: &'static str,
        status: Status,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            check,
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<8} {:<22} {}", self.status, self.check, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n{:<32}fix: {fix}", "")?;
        }
        Ok(())
    }
}

/// A command's result, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ran {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// What the checks ask of a host.
pub trait Host {
    /// A file's text; `None` when it cannot be read (absent, or not allowed).
    fn read(&self, path: &Path) -> Option<String>;
    /// A directory's entry names; empty when it cannot be read.
    fn list(&self, path: &Path) -> Vec<String>;
    /// `program args...`; `None` when the program cannot be started (not found).
    fn run(&self, program: &str, args: &[&str]) -> Option<Ran>;
    /// The filesystem type of the mount holding `path` (`cgroup2`, `tmpfs`, ...).
    fn fs_type(&self, path: &Path) -> Option<String>;
    /// Mounts a tiny EROFS image file-backed (no loop device) and unmounts it: `Err` with the
    /// kernel's reason when that fails.
    fn erofs_file_backed_mount(&self) -> Result<(), String>;
    /// Opens a userfaultfd: `Err` with the reason when that fails.
    fn userfaultfd(&self) -> Result<(), String>;
    /// Whether `name` is an executable on the `PATH` containerd and its shims get.
    fn on_path(&self, name: &str) -> Option<PathBuf>;
    /// Whether something accepts connections on UNIX socket `path`.
    fn connects(&self, path: &Path) -> bool;
}

/// Where to look.
#[derive(Debug, Clone)]
pub struct Options {
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd's configuration file (for `config dump`).
    pub config: Option<PathBuf>,
    /// The `containerd` binary to ask (default: found on the `PATH`).
    pub containerd: String,
    /// The `ctr` binary to ask.
    pub ctr: String,
    /// The GPU cache and CDI spec `hyperbox-gpu-cdi` writes.
    pub gpu_cache: PathBuf,
    pub cdi_spec: PathBuf,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            address: PathBuf::from("/run/containerd/containerd.sock"),
            config: None,
            containerd: "containerd".into(),
            ctr: "ctr".into(),
            gpu_cache: PathBuf::from(hyperbox_gpu::cache::DEFAULT_PATH),
            cdi_spec: PathBuf::from("/var/run/cdi/hyperbox-nvidia.json"),
        }
    }
}

/// Dotted numbers at the start of `text` (`4.2.1` of `4.2.1-rc1`), as integers.
fn leading_version(text: &str) -> Vec<u64> {
    text.split(|c: char| !c.is_ascii_digit() && c != '.')
        .find(|s| s.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(|v| v.split('.').filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

/// Every check, in the order a reader fixes things: kernel, cgroups, CRIU, containerd and
/// what is registered with it, then the optional parts.
pub fn run(host: &dyn Host, opts: &Options) -> Vec<Finding> {
    let mut out = Vec::new();
    kernel(host, &mut out);
    cgroups(host, &mut out);
    criu(host, &mut out);
    containerd(host, opts, &mut out);
    userfaultfd(host, &mut out);
    gpu(host, opts, &mut out);
    out
}

fn kernel(host: &dyn Host, out: &mut Vec<Finding>) {
    let release = host
        .read(Path::new("/proc/sys/kernel/osrelease"))
        .map(|r| r.trim().to_string())
        .unwrap_or_default();
    let filesystems = host
        .read(Path::new("/proc/filesystems"))
        .unwrap_or_default();
    let has_erofs = filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("erofs"));
    if !has_erofs {
        out.push(Finding::not_ok(
            "kernel erofs",
            Status::Missing,
            format!("Linux {release} has no erofs filesystem loaded (/proc/filesystems)"),
            "modprobe erofs (CONFIG_EROFS_FS); hyperbox-snapshotter needs it",
        ));
        return;
    }
    out.push(Finding::ok(
        "kernel erofs",
        format!("Linux {release}: erofs"),
    ));
    match host.erofs_file_backed_mount() {
        Ok(()) => out.push(Finding::ok(
            "erofs file-backed",
            "a test image mounted without a loop device",
        )),
        Err(why) => out.push(Finding::not_ok(
            "erofs file-backed",
            Status::Warn,
            format!("file-backed erofs mounts fail here ({why})"),
            "Linux 6.12 or later mounts images directly; until then hyperbox-snapshotter uses \
             loop devices (erofs_mount = \"auto\"), one per image and pack",
        )),
    }
    let features = host.list(Path::new("/sys/fs/erofs/features"));
    if features.iter().any(|f| f == "compr_cfgs") {
        out.push(Finding::ok(
            "erofs compression",
            format!("features: {}", features.join(", ")),
        ));
    } else {
        out.push(Finding::not_ok(
            "erofs compression",
            Status::Warn,
            "the kernel's erofs reads no compressed images (no compr_cfgs in /sys/fs/erofs/features)",
            "CONFIG_EROFS_FS_ZIP; hyperbox-snapshotter's own images are not compressed, images \
             made by other tools may be",
        ));
    }
}

fn cgroups(host: &dyn Host, out: &mut Vec<Finding>) {
    match host.fs_type(Path::new("/sys/fs/cgroup")).as_deref() {
        Some("cgroup2") => out.push(Finding::ok(
            "cgroups",
            "v2 (unified); the shims use cgroupfs paths, so run the kubelet with cgroupDriver: cgroupfs",
        )),
        Some("tmpfs") => out.push(Finding::ok(
            "cgroups",
            "v1 (hybrid or legacy); the shims use cgroupfs paths, so run the kubelet with cgroupDriver: cgroupfs",
        )),
        other => out.push(Finding::not_ok(
            "cgroups",
            Status::Missing,
            format!("/sys/fs/cgroup is {}", other.unwrap_or("not mounted")),
            "mount cgroup2 on /sys/fs/cgroup (or boot with systemd, which does)",
        )),
    }
}

fn criu(host: &dyn Host, out: &mut Vec<Finding>) {
    let Some(path) = host.on_path("criu") else {
        out.push(Finding::not_ok(
            "criu",
            Status::Missing,
            "no criu on containerd's PATH: checkpoint, restore and templates are refused",
            "install CRIU 4.2 or later (scripts/setup-host builds it into /opt/hyperbox/bin)",
        ));
        return;
    };
    let path_s = path.display().to_string();
    let version = host
        .run(&path_s, &["--version"])
        .map(|r| r.stdout)
        .unwrap_or_default();
    let v = version
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| leading_version(v.trim()))
        .unwrap_or_default();
    let shown = v.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    if v.is_empty() {
        out.push(Finding::not_ok(
            "criu",
            Status::Missing,
            format!("{path_s} --version says no version"),
            "install CRIU 4.2 or later",
        ));
        return;
    }
    if v < vec![4, 2] {
        out.push(Finding::not_ok(
            "criu",
            Status::Warn,
            format!(
                "{path_s} is CRIU {shown}: before 4.2 it cannot dump TCP sockets on Linux 6.16+"
            ),
            "install CRIU 4.2 or later",
        ));
    } else {
        out.push(Finding::ok("criu", format!("{path_s}: CRIU {shown}")));
    }
    match host.run(&path_s, &["check"]) {
        Some(r) if r.success => out.push(Finding::ok("criu check", "Looks good")),
        Some(r) => out.push(Finding::not_ok(
            "criu check",
            Status::Warn,
            format!(
                "criu check fails: {}",
                r.stderr
                    .lines()
                    .chain(r.stdout.lines())
                    .last()
                    .unwrap_or("")
                    .trim()
            ),
            "run `criu check` for the kernel features CRIU lacks",
        )),
        None => {}
    }
}

/// From `containerd config dump`: our runtime types, and whether the proxy snapshotter
/// `hyperbox` is configured, with its socket.
fn registered(dump: &str) -> (Vec<String>, Option<String>) {
    let value = |l: &str, key: &str| {
        let (k, v) = l.split_once('=')?;
        // containerd 1.x dumps strings in double quotes, 2.x in single ones.
        (k.trim() == key).then(|| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
    };
    let runtimes = dump
        .lines()
        .filter_map(|l| value(l, "runtime_type"))
        .filter(|t| t.starts_with("io.containerd.hyperbox"))
        .collect();
    let mut in_table = false;
    let mut snapshotter = None;
    for l in dump.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            in_table = t.trim_matches(|c| c == '[' || c == ']') == "proxy_plugins.hyperbox";
            if in_table {
                snapshotter.get_or_insert_with(String::new);
            }
        } else if in_table {
            if let Some(a) = value(t, "address") {
                snapshotter = Some(a);
            }
        }
    }
    (runtimes, snapshotter)
}

fn containerd(host: &dyn Host, opts: &Options, out: &mut Vec<Finding>) {
    let Some(version) = host.run(&opts.containerd, &["--version"]) else {
        out.push(Finding::not_ok(
            "containerd",
            Status::Missing,
            format!("{} not found", opts.containerd),
            "install containerd 1.6, 1.7 or 2.x",
        ));
        return;
    };
    let v = version
        .stdout
        .split_whitespace()
        .map(|w| w.trim_start_matches('v'))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(leading_version)
        .unwrap_or_default();
    let supported = matches!(v.as_slice(), [1, 6 | 7, ..] | [2, ..]);
    let shown = v.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    if supported {
        out.push(Finding::ok("containerd", format!("containerd {shown}")));
    } else {
        out.push(Finding::not_ok(
            "containerd",
            Status::Missing,
            format!("containerd {shown} is not one HyperBox supports"),
            "use containerd 1.6, 1.7 or 2.x",
        ));
    }
    let address = opts.address.display().to_string();
    match host.run(&opts.ctr, &["--address", &address, "version"]) {
        Some(r) if r.success => out.push(Finding::ok(
            "containerd socket",
            format!("{address} answers"),
        )),
        _ => out.push(Finding::not_ok(
            "containerd socket",
            Status::Missing,
            format!("nothing answers on {address}"),
            "start containerd (systemctl start containerd)",
        )),
    }
    for (binary, runtime) in [
        ("containerd-shim-hyperbox-v1", "io.containerd.hyperbox.v1"),
        (
            "containerd-shim-hyperbox-wasm-v1",
            "io.containerd.hyperbox-wasm.v1",
        ),
    ] {
        match host.on_path(binary) {
            Some(p) => out.push(Finding::ok(
                "shim binary",
                format!("{} ({runtime})", p.display()),
            )),
            None => out.push(Finding::not_ok(
                "shim binary",
                Status::Missing,
                format!("{binary} is not on containerd's PATH: --runtime {runtime} fails"),
                format!("hyperbox-node install (or put {binary} into /usr/local/bin)"),
            )),
        }
    }
    let mut args = vec!["config", "dump"];
    let config;
    if let Some(c) = &opts.config {
        config = c.display().to_string();
        args = vec!["--config", &config, "config", "dump"];
    }
    let Some(dump) = host.run(&opts.containerd, &args).filter(|r| r.success) else {
        out.push(Finding::not_ok(
            "containerd config",
            Status::Warn,
            "containerd config dump failed: cannot tell what is registered",
            "check containerd's configuration file",
        ));
        return;
    };
    let (runtimes, snapshotter) = registered(&dump.stdout);
    for runtime in [
        "io.containerd.hyperbox.v1",
        "io.containerd.hyperbox-wasm.v1",
    ] {
        if runtimes.iter().any(|r| r == runtime) {
            out.push(Finding::ok(
                "CRI runtime",
                format!("{runtime} is a CRI runtime"),
            ));
        } else {
            out.push(Finding::not_ok(
                "CRI runtime",
                Status::Warn,
                format!("no CRI runtime has runtime_type {runtime}: Kubernetes pods cannot ask for it (ctr, nerdctl and Docker still can)"),
                "hyperbox-node install (or: hyperbox-node configure-containerd, then restart containerd)",
            ));
        }
    }
    let Some(socket) = snapshotter else {
        out.push(Finding::not_ok(
            "snapshotter",
            Status::Warn,
            "no proxy snapshotter \"hyperbox\" in containerd's configuration",
            "hyperbox-node install (or: hyperbox-node configure-containerd, start hyperbox-snapshotter (config/hyperbox-snapshotter.service), restart containerd)",
        ));
        return;
    };
    if host.connects(Path::new(&socket)) {
        out.push(Finding::ok(
            "snapshotter",
            format!("hyperbox is configured and answers on {socket}"),
        ));
    } else {
        out.push(Finding::not_ok(
            "snapshotter",
            Status::Missing,
            format!(
                "the proxy snapshotter \"hyperbox\" is configured, but nothing answers on {socket}"
            ),
            "start hyperbox-snapshotter (systemctl start hyperbox-snapshotter)",
        ));
    }
}

fn userfaultfd(host: &dyn Host, out: &mut Vec<Finding>) {
    match host.userfaultfd() {
        Ok(()) => out.push(Finding::ok("userfaultfd", "available")),
        Err(why) => out.push(Finding::not_ok(
            "userfaultfd",
            Status::Warn,
            format!("userfaultfd is not available ({why}): restores copy all memory up front"),
            "CONFIG_USERFAULTFD; as root it needs nothing else",
        )),
    }
}

fn gpu(host: &dyn Host, opts: &Options, out: &mut Vec<Finding>) {
    let Some(version) = host.read(Path::new("/proc/driver/nvidia/version")) else {
        out.push(Finding::ok("gpu", "no NVIDIA driver loaded: nothing to do"));
        return;
    };
    let driver = hyperbox_gpu::driver::parse_driver_version(&version)
        .map(|v| v.to_string())
        .unwrap_or_default();
    let cache = match host.read(&opts.gpu_cache) {
        Some(text) => text,
        None => {
            out.push(Finding::not_ok(
                "gpu",
                Status::Missing,
                format!(
                    "NVIDIA driver {driver} loaded, but no GPU cache at {}: GPU containers fail at Create",
                    opts.gpu_cache.display()
                ),
                "systemctl start hyperbox-gpu-cdi (config/hyperbox-gpu-cdi.service, 99-hyperbox-gpu.rules)",
            ));
            return;
        }
    };
    let cached: Option<String> = serde_json::from_str::<serde_json::Value>(&cache)
        .ok()
        .and_then(|v| v["driver_version"].as_str().map(str::to_string));
    if cached.as_deref() != Some(driver.as_str()) {
        out.push(Finding::not_ok(
            "gpu",
            Status::Missing,
            format!(
                "the GPU cache describes driver {}, the loaded driver is {driver}",
                cached.unwrap_or_else(|| "(unreadable)".into())
            ),
            "hyperbox-gpu-cdi refresh (the udev rule runs it when the driver loads)",
        ));
        return;
    }
    out.push(Finding::ok(
        "gpu",
        format!("NVIDIA driver {driver}, cache current"),
    ));
    if host.on_path("hyperbox-gpu-hook").is_none() {
        out.push(Finding::not_ok(
            "gpu hook",
            Status::Missing,
            "hyperbox-gpu-hook is not beside the shim: GPU containers through it fail at Create",
            "install the static hyperbox-gpu-hook (scripts/build-gpu-hook) next to containerd-shim-hyperbox-v1",
        ));
    }
    if host.read(&opts.cdi_spec).is_none() {
        out.push(Finding::not_ok(
            "gpu cdi",
            Status::Warn,
            format!(
                "no CDI spec at {}: runc and Docker cannot ask for nvidia.com/gpu",
                opts.cdi_spec.display()
            ),
            "hyperbox-gpu-cdi refresh",
        ));
    }
}

/// Whether anything is missing (the exit status).
pub fn any_missing(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.status == Status::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A host made of answers.
    #[derive(Default)]
    struct FakeHost {
        files: BTreeMap<String, String>,
        dirs: BTreeMap<String, Vec<String>>,
        commands: BTreeMap<String, Ran>,
        path: Vec<String>,
        fs: Option<String>,
        erofs: Option<String>,
        uffd: Option<String>,
        sockets: Vec<String>,
    }

    impl Host for FakeHost {
        fn read(&self, path: &Path) -> Option<String> {
            self.files.get(path.to_str()?).cloned()
        }
        fn list(&self, path: &Path) -> Vec<String> {
            self.dirs
                .get(path.to_str().unwrap())
                .cloned()
                .unwrap_or_default()
        }
        fn run(&self, program: &str, args: &[&str]) -> Option<Ran> {
            self.commands
                .get(&format!("{program} {}", args.join(" ")))
                .cloned()
        }
        fn fs_type(&self, _: &Path) -> Option<String> {
            self.fs.clone()
        }
        fn erofs_file_backed_mount(&self) -> Result<(), String> {
            self.erofs.clone().map_or(Ok(()), Err)
        }
        fn userfaultfd(&self) -> Result<(), String> {
            self.uffd.clone().map_or(Ok(()), Err)
        }
        fn connects(&self, path: &Path) -> bool {
            self.sockets.iter().any(|s| Path::new(s) == path)
        }
        fn on_path(&self, name: &str) -> Option<PathBuf> {
            self.path
                .iter()
                .any(|n| n == name)
                .then(|| PathBuf::from("/usr/local/bin").join(name))
        }
    }

    fn ran(stdout: &str) -> Ran {
        Ran {
            success: true,
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    const DUMP: &str = r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hyperbox]
  runtime_type = "io.containerd.hyperbox.v1"
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hyperbox-wasm]
  runtime_type = "io.containerd.hyperbox-wasm.v1"
[proxy_plugins]
  [proxy_plugins.hyperbox]
    address = "/run/hyperbox/snapshotter.sock"
    type = "snapshot"
"#;

    /// A host with everything.
    fn complete() -> FakeHost {
        let mut h = FakeHost {
            fs: Some("cgroup2".into()),
            path: [
                "criu",
                "containerd-shim-hyperbox-v1",
                "containerd-shim-hyperbox-wasm-v1",
            ]
            .map(String::from)
            .to_vec(),
            sockets: vec!["/run/hyperbox/snapshotter.sock".into()],
            ..Default::default()
        };
        h.files
            .insert("/proc/sys/kernel/osrelease".into(), "6.18.1\n".into());
        h.files
            .insert("/proc/filesystems".into(), "nodev\tproc\n\terofs\n".into());
        h.dirs.insert(
            "/sys/fs/erofs/features".into(),
            vec!["compr_cfgs".into(), "zero_padding".into()],
        );
        for (cmd, out) in [
            ("/usr/local/bin/criu --version", "Version: 4.2.1\n"),
            ("/usr/local/bin/criu check", "Looks good.\n"),
            (
                "containerd --version",
                "containerd github.com/containerd/containerd/v2 v2.1.9 abc\n",
            ),
            (
                "ctr --address /run/containerd/containerd.sock version",
                "Server: 2.1.9\n",
            ),
            ("containerd config dump", DUMP),
        ] {
            h.commands.insert(cmd.into(), ran(out));
        }
        h
    }

    fn statuses(h: &FakeHost) -> Vec<(&'static str, Status)> {
        run(h, &Options::default())
            .into_iter()
            .map(|f| (f.check, f.status))
            .collect()
    }

    #[test]
    fn a_complete_host_has_nothing_missing() {
        let findings = run(&complete(), &Options::default());
        assert!(
            findings.iter().all(|f| f.status == Status::Ok),
            "{findings:#?}"
        );
        assert!(!any_missing(&findings));
        assert!(findings.iter().any(|f| f.detail == "containerd 2.1.9"));
    }

    /// Takes something away from a host.
    type Break = Box<dyn Fn(&mut FakeHost)>;

    #[test]
    fn each_missing_piece_is_named_with_its_fix() {
        let cases: Vec<(&str, Break, &str, Status)> = vec![
            (
                "no erofs",
                Box::new(|h| {
                    h.files
                        .insert("/proc/filesystems".into(), "nodev\tproc\n".into());
                }),
                "kernel erofs",
                Status::Missing,
            ),
            (
                "no file-backed",
                Box::new(|h| h.erofs = Some("ENOTBLK".into())),
                "erofs file-backed",
                Status::Warn,
            ),
            (
                "no compression",
                Box::new(|h| {
                    h.dirs
                        .insert("/sys/fs/erofs/features".into(), vec!["zero_padding".into()]);
                }),
                "erofs compression",
                Status::Warn,
            ),
            (
                "no cgroups",
                Box::new(|h| h.fs = None),
                "cgroups",
                Status::Missing,
            ),
            (
                "no criu",
                Box::new(|h| h.path.retain(|p| p != "criu")),
                "criu",
                Status::Missing,
            ),
            (
                "old criu",
                Box::new(|h| {
                    h.commands.insert(
                        "/usr/local/bin/criu --version".into(),
                        ran("Version: 3.17.1\n"),
                    );
                }),
                "criu",
                Status::Warn,
            ),
            (
                "criu check fails",
                Box::new(|h| {
                    h.commands.insert(
                        "/usr/local/bin/criu check".into(),
                        Ran {
                            success: false,
                            stdout: String::new(),
                            stderr: "Error (criu/cr-check.c:1): no tcp repair\n".into(),
                        },
                    );
                }),
                "criu check",
                Status::Warn,
            ),
            (
                "no containerd",
                Box::new(|h| {
                    h.commands.remove("containerd --version");
                }),
                "containerd",
                Status::Missing,
            ),
            (
                "old containerd",
                Box::new(|h| {
                    h.commands.insert(
                        "containerd --version".into(),
                        ran("containerd github.com/containerd/containerd v1.5.9 x\n"),
                    );
                }),
                "containerd",
                Status::Missing,
            ),
            (
                "containerd down",
                Box::new(|h| {
                    h.commands
                        .remove("ctr --address /run/containerd/containerd.sock version");
                }),
                "containerd socket",
                Status::Missing,
            ),
            (
                "no shim",
                Box::new(|h| h.path.retain(|p| p != "containerd-shim-hyperbox-v1")),
                "shim binary",
                Status::Missing,
            ),
            (
                "no CRI runtime",
                Box::new(|h| {
                    h.commands.insert(
                        "containerd config dump".into(),
                        ran("version = 2\n[proxy_plugins.hyperbox]\n  address = \"/run/hyperbox/snapshotter.sock\"\n"),
                    );
                }),
                "CRI runtime",
                Status::Warn,
            ),
            (
                "no snapshotter configured",
                Box::new(|h| {
                    h.commands.insert(
                        "containerd config dump".into(),
                        ran(&DUMP.replace("[proxy_plugins.hyperbox]", "")),
                    );
                }),
                "snapshotter",
                Status::Warn,
            ),
            (
                "snapshotter down",
                Box::new(|h| h.sockets.clear()),
                "snapshotter",
                Status::Missing,
            ),
            (
                "no userfaultfd",
                Box::new(|h| h.uffd = Some("ENOSYS".into())),
                "userfaultfd",
                Status::Warn,
            ),
            (
                "driver without cache",
                Box::new(|h| {
                    h.files.insert(
                        "/proc/driver/nvidia/version".into(),
                        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue\n".into(),
                    );
                }),
                "gpu",
                Status::Missing,
            ),
            (
                "stale cache",
                Box::new(|h| {
                    h.files.insert(
                        "/proc/driver/nvidia/version".into(),
                        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue\n".into(),
                    );
                    h.files.insert(
                        hyperbox_gpu::cache::DEFAULT_PATH.into(),
                        r#"{"driver_version": "535.1.2"}"#.into(),
                    );
                }),
                "gpu",
                Status::Missing,
            ),
        ];
        for (what, break_it, check, status) in cases {
            let mut h = complete();
            break_it(&mut h);
            let findings = run(&h, &Options::default());
            let f = findings
                .iter()
                .find(|f| f.check == check && f.status != Status::Ok)
                .unwrap_or_else(|| panic!("{what}: no {check} finding in {:#?}", statuses(&h)));
            assert_eq!(f.status, status, "{what}: {f}");
            assert!(
                f.fix.as_deref().is_some_and(|x| !x.is_empty()),
                "{what}: no fix"
            );
            assert_eq!(any_missing(&findings), status == Status::Missing, "{what}");
        }
    }

    #[test]
    fn versions_are_read_from_their_lines() {
        assert_eq!(leading_version("4.2.1-rc1"), [4, 2, 1]);
        assert_eq!(leading_version("1.7.24~ds1"), [1, 7, 24]);
        assert!(leading_version("none").is_empty());
        let (r, s) = registered(DUMP);
        assert_eq!(
            r,
            [
                "io.containerd.hyperbox.v1",
                "io.containerd.hyperbox-wasm.v1"
            ]
        );
        assert_eq!(s.as_deref(), Some("/run/hyperbox/snapshotter.sock"));
        // containerd 2.x's dump: single quotes.
        let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.hyperbox]\n  \
                  runtime_type = 'io.containerd.hyperbox.v1'\n[proxy_plugins]\n  \
                  [proxy_plugins.hyperbox]\n    address = '/s.sock'\n    type = 'snapshot'\n";
        let (r, s) = registered(v3);
        assert_eq!(r, ["io.containerd.hyperbox.v1"]);
        assert_eq!(s.as_deref(), Some("/s.sock"));
    }
}

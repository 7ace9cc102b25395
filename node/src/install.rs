//! `install` / `uninstall` / `verify`: HyperBox from a release payload onto this host.
//!
//! The payload is what `scripts/release` packs (and what the installer image carries under
//! `/payload`): `bin/` with the shims, the snapshotter, the GPU hook and generator, this
//! binary (static) and optionally `criu`; `config/` as in the repository.
//!
//! `install`, in order: checks the payload and the host (before changing anything); copies
//! the binaries (a different file of someone else's at a destination is saved first and put
//! back by `uninstall`); writes `/etc/hyperbox/snapshotter.toml` if there is none; installs
//! the systemd units and starts the snapshotter; puts CRIU in place when the host has none of
//! 4.2 or later; adds HyperBox to containerd's configuration ([`crate::configure`]); restarts
//! containerd when its configuration changed; and runs [`verify`]. Every file it wrote is
//! recorded, with its digest, in the state directory's `installed.json` (root-only). Run
//! twice, the second run changes nothing and restarts nothing.
//!
//! `uninstall` undoes it: containerd's configuration back byte for byte, the units stopped
//! and removed, each file of ours removed if it is still what we wrote (a file changed since
//! is kept, and said), the saved files put back, containerd restarted. Snapshots, templates
//! and the wasm compile cache stay unless `--purge`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};

use crate::ConfigTarget;

/// The binaries a payload must have, installed into `--bin-dir`.
pub const BINARIES: &[&str] = &[
    "containerd-shim-hyperbox-v1",
    "containerd-shim-hyperbox-wasm-v1",
    "hyperbox-snapshotter",
    "hyperbox-gpu-hook",
    "hyperbox-gpu-cdi",
    "hyperbox-node",
];
/// The systemd units, from the payload's `config/`.
pub const UNITS: &[&str] = &["hyperbox-snapshotter.service", "hyperbox-gpu-cdi.service"];
const SNAPSHOTTER_UNIT: &str = "hyperbox-snapshotter.service";
const GPU_UNIT: &str = "hyperbox-gpu-cdi.service";
const UDEV_RULES: &str = "99-hyperbox-gpu.rules";
const INSTALLED: &str = "installed.json";
const VERIFY_NAMESPACE: &str = "hyperbox-verify";
/// The CRIU release our checkpoint features are built and tested against.
const CRIU_MIN: (u64, u64) = (4, 2);

/// Where things go. Defaults are a host's usual places.
#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: ConfigTarget,
    /// The payload: a release's unpacked directory (default: the one this binary is in,
    /// `PAYLOAD/bin/hyperbox-node`).
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// Where the binaries go; containerd finds the shims on its PATH.
    #[arg(long, default_value = "/usr/local/bin")]
    pub bin_dir: PathBuf,
    /// Where CRIU goes when the host lacks it.
    #[arg(long, default_value = "/usr/local/sbin")]
    pub sbin_dir: PathBuf,
    /// HyperBox's configuration files.
    #[arg(long, default_value = "/etc/hyperbox")]
    pub etc_dir: PathBuf,
    /// systemd's unit directory.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// udev's rules directory.
    #[arg(long, default_value = "/etc/udev/rules.d")]
    pub udev_dir: PathBuf,
    /// containerd's socket, for the verification.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// The ctr binary, for the verification.
    #[arg(long, default_value = "ctr")]
    pub ctr: String,
    /// How containerd and the snapshotter are (re)started: `systemd` (their units), or
    /// `none` (not at all: the command says what to start, and verification is left to
    /// `hyperbox-node verify`). `auto` is `systemd` where systemd runs containerd.
    #[arg(long, value_enum, default_value_t = Restart::Auto)]
    pub restart: Restart,
    /// Do not run containers to verify.
    #[arg(long)]
    pub no_verify: bool,
    /// Enter the host's mount namespace first (that of PID 1, so the pod needs `hostPID`):
    /// how the installer image's DaemonSet pod installs onto its node.
    #[arg(long)]
    pub enter_host: bool,
    /// Once installed, stay until SIGTERM (a DaemonSet's pod must keep running).
    #[arg(long)]
    pub stay: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Restart {
    Auto,
    Systemd,
    None,
}

/// One file `install` wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstalledFile {
    pub path: PathBuf,
    pub sha256: String,
    /// Where the file that was there before is kept (put back by `uninstall`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved: Option<PathBuf>,
}

/// `installed.json`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Installed {
    pub version: String,
    pub files: Vec<InstalledFile>,
    /// Units `install` enabled.
    pub units: Vec<String>,
}

impl Installed {
    fn load(state_dir: &Path) -> anyhow::Result<Option<Self>> {
        let path = state_dir.join(INSTALLED);
        match fs::read(&path) {
            Ok(data) => {
                Ok(Some(serde_json::from_slice(&data).with_context(|| {
                    format!("{} is not ours", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    fn store(&self, state_dir: &Path) -> anyhow::Result<()> {
        make_state_dir(state_dir)?;
        let path = state_dir.join(INSTALLED);
        hyperbox_gpu::atomic::write(&path, &serde_json::to_vec_pretty(self)?, 0o600)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    fn entry(&self, path: &Path) -> Option<&InstalledFile> {
        self.files.iter().find(|f| f.path == path)
    }
}

pub fn make_state_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} root-only", dir.display()))
}

fn sha256(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

fn file_sha256(path: &Path) -> Option<String> {
    let mut f = fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(format!("{:x}", h.finalize()))
}

/// A file to put in place.
#[derive(Debug)]
struct Put {
    dest: PathBuf,
    data: Vec<u8>,
    mode: u32,
    /// Only if nothing is there (a configuration file the user may have changed).
    keep_existing: bool,
}

/// What a [`Put`] comes to on this host.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    New,
    Same,
    /// Ours from an earlier install, now different.
    Update,
    /// Someone else's file: saved, then replaced.
    Replace,
    /// A configuration file that exists: left alone.
    Keep,
}

fn change_of(put: &Put, installed: &Installed) -> Change {
    match fs::read(&put.dest) {
        Err(_) => Change::New,
        Ok(_) if put.keep_existing => Change::Keep,
        Ok(old) if old == put.data => Change::Same,
        Ok(_) if installed.entry(&put.dest).is_some() => Change::Update,
        Ok(_) => Change::Replace,
    }
}

/// The payload directory and what it holds.
#[derive(Debug)]
pub struct Payload {
    pub dir: PathBuf,
    /// Held open so that `--enter-host` can still read it through `/proc/self/fd`.
    _fd: Option<OwnedFd>,
}

impl Payload {
    pub fn open(from: Option<&Path>) -> anyhow::Result<Self> {
        let dir = match from {
            Some(d) => d.to_path_buf(),
            None => {
                let exe = std::env::current_exe().context("cannot find this binary's path")?;
                exe.parent()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
                    .context("this binary is not in a payload's bin/: give --from")?
            }
        };
        let payload = Self { dir, _fd: None };
        payload.check()?;
        Ok(payload)
    }

    fn check(&self) -> anyhow::Result<()> {
        let mut missing = Vec::new();
        for b in BINARIES {
            if !self.bin(b).is_file() {
                missing.push(format!("bin/{b}"));
            }
        }
        for c in UNITS
            .iter()
            .chain(&["snapshotter.toml", UDEV_RULES, "gpu.toml"])
        {
            if !self.config(c).is_file() {
                missing.push(format!("config/{c}"));
            }
        }
        if !missing.is_empty() {
            bail!(
                "{} is not a HyperBox payload (scripts/release makes one): it lacks {}",
                self.dir.display(),
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// Opens the directory and names it through `/proc/self/fd`, which stays valid after the
    /// process enters another mount namespace.
    fn pin(&mut self) -> anyhow::Result<()> {
        let fd: OwnedFd = fs::File::open(&self.dir)
            .with_context(|| format!("cannot open {}", self.dir.display()))?
            .into();
        self.dir = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        self._fd = Some(fd);
        Ok(())
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    fn config(&self, name: &str) -> PathBuf {
        self.dir.join("config").join(name)
    }
}

/// Enters PID 1's mount namespace, keeping `payload` readable. Must run before any thread
/// starts (setns(CLONE_NEWNS) refuses a process whose filesystem information is shared).
pub fn enter_host(payload: &mut Payload) -> anyhow::Result<()> {
    payload.pin()?;
    let ns = fs::File::open("/proc/1/ns/mnt")
        .context("cannot open /proc/1/ns/mnt (the pod needs hostPID: true)")?;
    // SAFETY: setns on a descriptor we hold open; no memory is shared with the kernel.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot enter the host's mount namespace (the pod must be privileged)");
    }
    std::env::set_current_dir("/").context("cannot change to the host's /")?;
    Ok(())
}

/// The files `install` puts in place, in order.
fn plan_files(args: &InstallArgs, payload: &Payload) -> anyhow::Result<Vec<Put>> {
    let read = |p: PathBuf| fs::read(&p).with_context(|| format!("cannot read {}", p.display()));
    let mut puts = Vec::new();
    for b in BINARIES {
        puts.push(Put {
            dest: args.bin_dir.join(b),
            data: read(payload.bin(b))?,
            mode: 0o755,
            keep_existing: false,
        });
    }
    let default_bin = Path::new("/usr/local/bin");
    for unit in UNITS {
        let text = String::from_utf8(read(payload.config(unit))?)
            .with_context(|| format!("config/{unit} is not UTF-8"))?;
        let text = if args.bin_dir == default_bin {
            text
        } else {
            text.replace("/usr/local/bin/", &format!("{}/", args.bin_dir.display()))
        };
        puts.push(Put {
            dest: args.unit_dir.join(unit),
            data: text.into_bytes(),
            mode: 0o644,
            keep_existing: false,
        });
    }
    puts.push(Put {
        dest: args.udev_dir.join(UDEV_RULES),
        data: read(payload.config(UDEV_RULES))?,
        mode: 0o644,
        keep_existing: false,
    });
    for conf in ["snapshotter.toml", "gpu.toml"] {
        puts.push(Put {
            dest: args.etc_dir.join(conf),
            data: read(payload.config(conf))?,
            mode: 0o644,
            keep_existing: true,
        });
    }
    if let Some(criu) = criu_to_install(args, payload) {
        puts.push(Put {
            dest: args.sbin_dir.join("criu"),
            data: read(criu)?,
            mode: 0o755,
            keep_existing: false,
        });
    }
    Ok(puts)
}

/// The payload's CRIU, when it has one and the host has none of [`CRIU_MIN`] or later
/// outside `--sbin-dir` (ours there is updated).
fn criu_to_install(args: &InstallArgs, payload: &Payload) -> Option<PathBuf> {
    let ours = payload.bin("criu");
    if !ours.is_file() {
        return None;
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let host_has = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .filter(|d| *d != args.sbin_dir)
        .map(|d| d.join("criu"))
        .filter(|p| p.is_file())
        .any(|p| criu_version(&p).is_some_and(|v| v >= CRIU_MIN));
    (!host_has).then_some(ours)
}

fn criu_version(bin: &Path) -> Option<(u64, u64)> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.lines().find_map(|l| l.strip_prefix("Version: "))?;
    let mut parts = v.trim().split('.').map(|p| p.parse::<u64>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("cannot run systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn unit_active(unit: &str) -> bool {
    Command::new("systemctl")
        .args(["is-active", "--quiet", unit])
        .status()
        .is_ok_and(|s| s.success())
}

/// `auto` made definite, or an error saying why neither works.
fn restart_mode(wanted: Restart) -> anyhow::Result<Restart> {
    match wanted {
        Restart::None => Ok(Restart::None),
        Restart::Systemd if !systemd_runs() => {
            bail!("--restart systemd, but systemd is not running here")
        }
        Restart::Systemd => Ok(Restart::Systemd),
        Restart::Auto if systemd_runs() && unit_active("containerd.service") => {
            Ok(Restart::Systemd)
        }
        Restart::Auto => bail!(
            "containerd is not running as systemd's containerd.service here, so this command \
             cannot restart it: run with --restart none, then start hyperbox-snapshotter and \
             restart containerd yourself, then run hyperbox-node verify"
        ),
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    hyperbox_gpu::atomic::write(path, data, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The name under which `path`'s former file is kept in the state directory.
fn saved_name(state_dir: &Path, path: &Path) -> PathBuf {
    let flat = path
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "%");
    state_dir.join("saved").join(flat)
}

pub fn install(args: &InstallArgs, dry_run: bool) -> anyhow::Result<()> {
    let mut payload = Payload::open(args.from.as_deref())?;
    if args.enter_host {
        enter_host(&mut payload)?;
    }
    let t = &args.target;
    let mut installed = Installed::load(&t.state_dir)?.unwrap_or_default();
    let puts = plan_files(args, &payload)?;
    let restart = if dry_run {
        args.restart
    } else {
        restart_mode(args.restart)?
    };

    let changes: Vec<Change> = puts.iter().map(|p| change_of(p, &installed)).collect();
    if dry_run {
        for (p, c) in puts.iter().zip(&changes) {
            let what = match c {
                Change::New => "new",
                Change::Same => "unchanged",
                Change::Update => "updated",
                Change::Replace => "replaced (the present file is saved)",
                Change::Keep => "exists: left as it is",
            };
            println!("{}: {what}", p.dest.display());
        }
        crate::configure(t, true)?;
        return Ok(());
    }

    let mut changed_binaries = false;
    for (p, c) in puts.iter().zip(&changes) {
        match c {
            Change::Same | Change::Keep => {
                if *c == Change::Same && installed.entry(&p.dest).is_none() {
                    // Identical to ours already: uninstall may remove it.
                    installed.files.push(InstalledFile {
                        path: p.dest.clone(),
                        sha256: sha256(&p.data),
                        saved: None,
                    });
                }
                continue;
            }
            Change::Replace => {
                let keep = saved_name(&t.state_dir, &p.dest);
                make_state_dir(&t.state_dir)?;
                fs::create_dir_all(keep.parent().expect("under the state dir"))?;
                fs::copy(&p.dest, &keep).with_context(|| {
                    format!("cannot save {} to {}", p.dest.display(), keep.display())
                })?;
                installed.files.retain(|f| f.path != p.dest);
                installed.files.push(InstalledFile {
                    path: p.dest.clone(),
                    sha256: sha256(&p.data),
                    saved: Some(keep),
                });
            }
            Change::New | Change::Update => {
                let saved = installed.entry(&p.dest).and_then(|f| f.saved.clone());
                installed.files.retain(|f| f.path != p.dest);
                installed.files.push(InstalledFile {
                    path: p.dest.clone(),
                    sha256: sha256(&p.data),
                    saved,
                });
            }
        }
        // Recorded before written: an interrupted install is still undone by uninstall.
        installed.version = env!("CARGO_PKG_VERSION").to_string();
        installed.store(&t.state_dir)?;
        write_file(&p.dest, &p.data, p.mode)?;
        eprintln!("hyperbox-node: {} ({:?})", p.dest.display(), c);
        changed_binaries |= p.dest.starts_with(&args.bin_dir);
    }
    installed.version = env!("CARGO_PKG_VERSION").to_string();
    installed.store(&t.state_dir)?;

    if restart == Restart::Systemd {
        systemctl(&["daemon-reload"])?;
        let mut units = vec![SNAPSHOTTER_UNIT];
        if Path::new("/dev/nvidiactl").exists() {
            units.push(GPU_UNIT);
        }
        for unit in &units {
            if !installed.units.iter().any(|u| u == unit) {
                installed.units.push(unit.to_string());
                installed.store(&t.state_dir)?;
            }
            systemctl(&["enable", unit])?;
        }
        if changed_binaries || !unit_active(SNAPSHOTTER_UNIT) {
            systemctl(&["restart", SNAPSHOTTER_UNIT])?;
        }
        if units.contains(&GPU_UNIT) {
            systemctl(&["start", GPU_UNIT])?;
        }
    }

    let config_changed = crate::configure(t, false)?;
    match restart {
        Restart::Systemd if config_changed => {
            eprintln!("hyperbox-node: restarting containerd");
            systemctl(&["restart", "containerd.service"])?;
        }
        Restart::Systemd => {}
        _ => {
            eprintln!(
                "hyperbox-node: installed; now start {} (`{} --config {}`), restart containerd, \
                 and run `hyperbox-node verify`",
                SNAPSHOTTER_UNIT,
                args.bin_dir.join("hyperbox-snapshotter").display(),
                args.etc_dir.join("snapshotter.toml").display()
            );
            return Ok(());
        }
    }
    if args.no_verify {
        return Ok(());
    }
    verify(&VerifyArgs {
        address: args.address.clone(),
        ctr: args.ctr.clone(),
        node_binary: Some(payload.bin("hyperbox-node")),
        timeout_s: 60,
    })
}

/// `verify`'s settings.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// The ctr binary.
    #[arg(long, default_value = "ctr")]
    pub ctr: String,
    /// The static hyperbox-node to run in the test containers (default: this binary).
    #[arg(long)]
    pub node_binary: Option<PathBuf>,
    /// How long to wait for containerd to answer.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
}

/// A WASI command module (wasm32, preview 1) printing `hyperbox-wasm-ok`: the wasm shim's
/// check. Assembled from [`VERIFY_WAT`] (a test checks the bytes are its assembly).
pub const VERIFY_WASM: &[u8] = &[
    0, 97, 115, 109, 1, 0, 0, 0, 1, 12, 2, 96, 4, 127, 127, 127, 127, 1, 127, 96, 0, 0, 2, 35, 1,
    22, 119, 97, 115, 105, 95, 115, 110, 97, 112, 115, 104, 111, 116, 95, 112, 114, 101, 118, 105,
    101, 119, 49, 8, 102, 100, 95, 119, 114, 105, 116, 101, 0, 0, 3, 2, 1, 1, 5, 3, 1, 0, 1, 7, 19,
    2, 6, 109, 101, 109, 111, 114, 121, 2, 0, 6, 95, 115, 116, 97, 114, 116, 0, 1, 10, 29, 1, 27,
    0, 65, 0, 65, 16, 54, 2, 0, 65, 4, 65, 17, 54, 2, 0, 65, 1, 65, 0, 65, 1, 65, 8, 16, 0, 26, 11,
    11, 23, 1, 0, 65, 16, 11, 17, 104, 121, 112, 101, 114, 98, 111, 120, 45, 119, 97, 115, 109, 45,
    111, 107, 10, 0, 11, 4, 110, 97, 109, 101, 1, 4, 1, 0, 1, 119,
];
#[cfg(test)]
const VERIFY_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hyperbox-wasm-ok\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 17))
    (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

/// Whether an ELF file asks for a program interpreter (is dynamically linked).
fn elf_is_dynamic(path: &Path) -> anyhow::Result<bool> {
    let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("{}: truncated ELF header", path.display());
    };
    Ok((0..phnum as usize).any(|i| {
        let at = phoff as usize + i * phentsize as usize;
        data.get(at..at + 4) == Some(&3u32.to_le_bytes()[..]) // PT_INTERP
    }))
}

fn ctr(args: &VerifyArgs) -> Command {
    let mut c = Command::new(&args.ctr);
    c.arg("--address")
        .arg(&args.address)
        .args(["--namespace", VERIFY_NAMESPACE]);
    c
}

fn run_ok(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("{what}: cannot run {:?}", cmd.get_program()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// Runs a container through each of our runtimes and a snapshot through our snapshotter, as
/// containerd sees them: what `install` ends with.
pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    loop {
        let mut v = ctr(args);
        v.arg("version");
        match run_ok(v, "containerd's version") {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let node = match &args.node_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    if elf_is_dynamic(&node)? {
        bail!(
            "{} is dynamically linked: verification runs it in an empty container, so it must \
             be the static build a release ships (scripts/release); give --node-binary",
            node.display()
        );
    }
    let work = std::env::temp_dir().join(format!("hyperbox-verify-{}", std::process::id()));
    let result = verify_in(args, &node, &work);
    let _ = fs::remove_dir_all(&work);
    let mut rm = ctr(args);
    rm.args(["namespaces", "remove", VERIFY_NAMESPACE]);
    let _ = rm.output();
    result
}

fn verify_in(args: &VerifyArgs, node: &Path, work: &Path) -> anyhow::Result<()> {
    let rootfs = work.join("rootfs");
    fs::create_dir_all(&rootfs).with_context(|| format!("cannot create {}", rootfs.display()))?;
    fs::copy(node, rootfs.join("hyperbox-node"))
        .with_context(|| format!("cannot copy {}", node.display()))?;
    fs::write(rootfs.join("verify.wasm"), VERIFY_WASM)?;
    // The node binary's --version is the payload's: the same release as this one.
    let checks: [(&str, &str, &[&str], &str); 3] = [
        (
            "io.containerd.hyperbox.v1",
            "linux",
            &["/hyperbox-node", "--version"],
            "hyperbox-node ",
        ),
        (
            "io.containerd.hyperbox-wasm.v1",
            "native",
            &["/hyperbox-node", "--version"],
            "hyperbox-node ",
        ),
        (
            "io.containerd.hyperbox-wasm.v1",
            "wasm",
            &["/verify.wasm"],
            "hyperbox-wasm-ok",
        ),
    ];
    for (runtime, kind, argv, expect) in checks {
        let id = format!("hyperbox-verify-{}-{kind}", std::process::id());
        let mut run = ctr(args);
        run.args(["run", "--rm", "--runtime", runtime, "--rootfs"])
            .arg(&rootfs)
            .arg(&id)
            .args(argv);
        let out = run_ok(run, &format!("a {kind} container through {runtime}"))?;
        if !out.contains(expect) {
            bail!("a {kind} container through {runtime} printed {out:?}, not {expect:?}");
        }
        eprintln!("hyperbox-node: verified: a {kind} container through {runtime}");
    }
    // The snapshotter: a snapshot made, mounted (as containerd would mount it), removed.
    let key = format!("hyperbox-verify-{}", std::process::id());
    let mut prepare = ctr(args);
    prepare.args([
        "snapshots",
        "--snapshotter",
        "hyperbox",
        "prepare",
        &key,
        "",
    ]);
    run_ok(prepare, "a snapshot through the hyperbox snapshotter")?;
    let mut mounts = ctr(args);
    mounts.args([
        "snapshots",
        "--snapshotter",
        "hyperbox",
        "mounts",
        "/tmp",
        &key,
    ]);
    let shown = run_ok(mounts, "the hyperbox snapshotter's mounts");
    let mut rm = ctr(args);
    rm.args(["snapshots", "--snapshotter", "hyperbox", "rm", &key]);
    let removed = run_ok(rm, "removing the verification snapshot");
    shown?;
    removed?;
    eprintln!("hyperbox-node: verified: a snapshot through the hyperbox snapshotter");
    Ok(())
}

/// `uninstall`'s settings.
#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    pub target: ConfigTarget,
    /// As for install.
    #[arg(long, value_enum, default_value_t = Restart::Auto)]
    pub restart: Restart,
    /// Also remove the snapshotter's layers and snapshots, templates and the wasm compile
    /// cache (containerd keeps records of images unpacked into the snapshotter: remove
    /// those images first).
    #[arg(long)]
    pub purge: bool,
    /// Enter the host's mount namespace first (as install).
    #[arg(long)]
    pub enter_host: bool,
}

/// What `--purge` removes, besides the state directory.
pub const PURGED: &[&str] = &[
    "/var/lib/hyperbox/snapshotter",
    "/var/lib/hyperbox/templates",
    "/var/lib/hyperbox/wasm-cache",
];

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    if args.enter_host {
        let mut none = Payload {
            dir: PathBuf::from("/"),
            _fd: None,
        };
        enter_host(&mut none)?;
    }
    let t = &args.target;
    let restart = restart_mode(args.restart)?;
    let installed = Installed::load(&t.state_dir)?;
    let configured = t.state_dir.join(crate::SAVED).exists();
    if installed.is_none() && !configured {
        bail!(
            "nothing to uninstall: {} has no record of an install",
            t.state_dir.display()
        );
    }
    if configured {
        crate::unconfigure(t)?;
    }
    if restart == Restart::Systemd {
        eprintln!("hyperbox-node: restarting containerd");
        systemctl(&["restart", "containerd.service"])?;
    }
    let Some(installed) = installed else {
        return Ok(());
    };
    if restart == Restart::Systemd {
        for unit in &installed.units {
            if let Err(e) = systemctl(&["disable", "--now", unit]) {
                eprintln!("hyperbox-node: {e:#}");
            }
        }
    }
    let mut kept: BTreeMap<PathBuf, String> = BTreeMap::new();
    for f in installed.files.iter().rev() {
        match file_sha256(&f.path) {
            Some(sum) if sum == f.sha256 => match &f.saved {
                Some(saved) => {
                    let data = fs::read(saved)
                        .with_context(|| format!("cannot read {}", saved.display()))?;
                    let mode = fs::metadata(saved)?.permissions().mode() & 0o7777;
                    write_file(&f.path, &data, mode)?;
                }
                None => fs::remove_file(&f.path)
                    .with_context(|| format!("cannot remove {}", f.path.display()))?,
            },
            Some(_) => {
                kept.insert(f.path.clone(), "changed since install".into());
            }
            None => {}
        }
    }
    for (path, why) in &kept {
        eprintln!("hyperbox-node: kept {} ({why})", path.display());
    }
    if restart == Restart::Systemd {
        systemctl(&["daemon-reload"])?;
    }
    if args.purge {
        for dir in PURGED {
            match fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("hyperbox-node: cannot remove {dir}: {e}")
                }
                _ => {}
            }
        }
        fs::remove_dir_all(&t.state_dir)
            .with_context(|| format!("cannot remove {}", t.state_dir.display()))?;
    } else {
        fs::remove_file(t.state_dir.join(INSTALLED))?;
        let _ = fs::remove_dir_all(t.state_dir.join("saved"));
    }
    eprintln!("hyperbox-node: uninstalled");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_wasm_is_its_assembly() {
        assert_eq!(VERIFY_WASM, wat::parse_str(VERIFY_WAT).unwrap().as_slice());
    }

    #[test]
    fn dynamic_elf_is_told_from_static() {
        // This test binary is dynamically linked (glibc); a static one has no PT_INTERP.
        let me = std::env::current_exe().unwrap();
        assert!(elf_is_dynamic(&me).unwrap());
        let dir = std::env::temp_dir().join(format!("hb-elf-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let not_elf = dir.join("x");
        fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(elf_is_dynamic(&not_elf).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn saved_names_are_flat() {
        let state = Path::new("/var/lib/hyperbox/node");
        assert_eq!(
            saved_name(state, Path::new("/usr/local/bin/hyperbox-node")),
            Path::new("/var/lib/hyperbox/node/saved/usr%local%bin%hyperbox-node")
        );
    }
}

//! A sandbox: one directory holding everything a harness daemon owns, and a guard that tears
//! it down when its owner goes away.
//!
//! The owner (a test, a benchmark, the demo) keeps the write end of a pipe whose read end is
//! the guard's stdin. The guard (`hyperbox-harness guard DIR`, in its own process group so a
//! Ctrl-C or a test runner's kill of the owner's group does not take it along) waits for
//! end-of-file. A clean owner tears down in-process first ([`Sandbox::teardown`]); an owner
//! that panicked without unwinding or was killed leaves the work to the guard. Either way the
//! same teardown runs ([`teardown_dir`]; [`teardown_abandoned`] in the guard), driven by the
//! record in `DIR/sandbox.json`:
//!
//! 1. processes: thaw, then SIGKILL, everything in the containerd namespaces' cgroups, every
//!    process whose command line names the sandbox (containerd, shims, the registry) and the
//!    shims of its namespaces (a dockerd's sandbox is a client of another's containerd);
//! 2. mounts under the sandbox, deepest first;
//! 3. the namespaces' cgroups, runc's state (`/run/containerd/runc/NS`; after an owner died,
//!    the hyperbox shim's too, as its killed shims cannot remove it) and shim sockets that
//!    containerd keeps outside its root;
//! 4. the directory itself, only when nothing is mounted under it any more.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::mount::{umount2, MntFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::host;

/// Where runtimes keep per-namespace state outside containerd's own directories: runc's
/// default root (runc shim; swept at teardown) and libcontainer's root of
/// `containerd-shim-hyperbox-v1` (checked, not swept: the shim must clean up after itself).
pub const RUNTIME_STATE_ROOTS: &[&str] = &["/run/containerd/runc", "/run/hyperbox/youki"];

/// Name of the record file inside a sandbox.
const RECORD: &str = "sandbox.json";
/// Name of the harness binary that provides the guard.
pub const HARNESS_BINARY: &str = "hyperbox-harness";

/// Errors of sandbox set-up and teardown.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot create sandbox directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write sandbox record {path}: {source}")]
    Record { path: PathBuf, source: io::Error },
    #[error(
        "the harness binary `{HARNESS_BINARY}` was not found next to {exe}: build the workspace \
         first (`cargo build --workspace`) or set HYPERBOX_BIN_DIR"
    )]
    NoHarnessBinary { exe: String },
    #[error("cannot start the sandbox guard {binary}: {source}")]
    Guard { binary: PathBuf, source: io::Error },
    #[error("teardown of {dir} left things behind: {leftovers:?}")]
    Leftovers {
        dir: PathBuf,
        leftovers: Vec<String>,
    },
}

/// A process the sandbox started, identified by pid and start time so that a reused pid is
/// never killed by mistake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrackedProcess {
    pub pid: u32,
    pub start_time: u64,
    pub what: String,
}

/// What a sandbox holds, persisted as `sandbox.json` so the guard and later sweeps can undo it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// The process that created the sandbox.
    pub owner: Option<TrackedProcess>,
    /// The guard watching the owner.
    pub guard: Option<TrackedProcess>,
    /// Daemons started in the sandbox.
    pub processes: Vec<TrackedProcess>,
    /// containerd namespaces used by the sandbox's daemon; their cgroups and runc state are
    /// removed at teardown.
    pub namespaces: Vec<String>,
    /// The containerd gRPC socket, to find shim sockets outside the sandbox.
    pub containerd_socket: Option<PathBuf>,
    /// The containerd at `containerd_socket` belongs to another sandbox (this one is a client
    /// of it, as a dockerd is): only the shims of `namespaces` are this sandbox's.
    #[serde(default)]
    pub containerd_client: bool,
    /// Network interfaces made for the sandbox (a CNI bridge): deleted at teardown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_links: Vec<String>,
    /// iptables `nat` chains that appeared for the sandbox (CNI's portmap plugin): flushed,
    /// unhooked and deleted at teardown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nat_chains: Vec<String>,
}

/// One sandbox directory and its guard.
#[derive(Debug)]
pub struct Sandbox {
    dir: PathBuf,
    record: Record,
    guard: Option<(Child, ChildStdin)>,
    torn_down: bool,
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

impl Sandbox {
    /// Makes a fresh sandbox `TEST_ROOT/KIND-PID-N` and starts its guard. Sandboxes left by
    /// owners that died (and whose guards died too) are swept first.
    pub fn create(kind: &str) -> Result<Self, SandboxError> {
        let root = host::test_root();
        sweep_stale(&root);
        let n = SEQUENCE.fetch_add(1, Ordering::SeqCst);
        let dir = root.join(format!("{kind}-{}-{n}", std::process::id()));
        if dir.exists() {
            // Left by an earlier process that had our pid: it is dead, so undo its work.
            let _ = teardown_abandoned(&dir);
        }
        fs::create_dir_all(&dir).map_err(|source| SandboxError::Create {
            path: dir.clone(),
            source,
        })?;
        let owner = tracked(std::process::id(), "owner");
        let mut sandbox = Sandbox {
            dir,
            record: Record {
                owner,
                ..Record::default()
            },
            guard: None,
            torn_down: false,
        };
        sandbox.save()?;
        sandbox.start_guard()?;
        Ok(sandbox)
    }

    fn start_guard(&mut self) -> Result<(), SandboxError> {
        let binary = host::workspace_binary(HARNESS_BINARY).ok_or_else(|| {
            SandboxError::NoHarnessBinary {
                exe: std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            }
        })?;
        let log = fs::File::create(self.dir.join("guard.log")).map_err(|source| {
            SandboxError::Create {
                path: self.dir.join("guard.log"),
                source,
            }
        })?;
        let mut child = Command::new(&binary)
            .arg("guard")
            .arg(&self.dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            // Its own process group: a signal to the owner's group must not reach the guard.
            .process_group(0)
            .spawn()
            .map_err(|source| SandboxError::Guard {
                binary: binary.clone(),
                source,
            })?;
        let stdin = child.stdin.take().ok_or_else(|| SandboxError::Guard {
            binary,
            source: io::Error::other("guard has no stdin pipe"),
        })?;
        self.record.guard = tracked(child.id(), "guard");
        self.guard = Some((child, stdin));
        self.save()
    }

    /// The sandbox directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The record as persisted.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Records a daemon the sandbox started, so teardown kills it.
    pub fn track(&mut self, child: &Child, what: &str) -> Result<(), SandboxError> {
        if let Some(p) = tracked(child.id(), what) {
            self.record.processes.push(p);
        }
        self.save()
    }

    /// Forgets a daemon that has been stopped.
    pub fn untrack(&mut self, pid: u32) -> Result<(), SandboxError> {
        self.record.processes.retain(|p| p.pid != pid);
        self.save()
    }

    /// Records the containerd socket and a namespace it uses.
    pub fn record_containerd(
        &mut self,
        socket: &Path,
        namespace: &str,
    ) -> Result<(), SandboxError> {
        self.record.containerd_socket = Some(socket.to_path_buf());
        if !self.record.namespaces.iter().any(|n| n == namespace) {
            self.record.namespaces.push(namespace.to_string());
        }
        self.save()
    }

    /// Records a containerd of another sandbox that this sandbox's daemon is a client of,
    /// and a namespace it uses there: teardown then takes that namespace's containers, cgroups
    /// and shims (and only those) as this sandbox's.
    pub fn record_containerd_client(
        &mut self,
        socket: &Path,
        namespace: &str,
    ) -> Result<(), SandboxError> {
        self.record.containerd_client = true;
        self.record_containerd(socket, namespace)
    }

    /// Records a network interface the sandbox made, so teardown deletes it.
    pub fn record_net_link(&mut self, name: &str) -> Result<(), SandboxError> {
        if !self.record.net_links.iter().any(|n| n == name) {
            self.record.net_links.push(name.to_string());
        }
        self.save()
    }

    /// Records iptables `nat` chains that are the sandbox's, so teardown deletes them.
    pub fn record_nat_chains(&mut self, chains: &[String]) -> Result<(), SandboxError> {
        for c in chains {
            if !self.record.nat_chains.contains(c) {
                self.record.nat_chains.push(c.clone());
            }
        }
        self.save()
    }

    fn save(&self) -> Result<(), SandboxError> {
        let path = self.dir.join(RECORD);
        let tmp = self.dir.join(format!("{RECORD}.tmp"));
        let data = serde_json::to_vec_pretty(&self.record).map_err(io::Error::other);
        data.and_then(|d| fs::write(&tmp, d))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|source| SandboxError::Record { path, source })
    }

    /// Tears everything down and checks that nothing is left. Idempotent.
    pub fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let result = teardown_dir(&self.dir);
        if let Some((mut child, stdin)) = self.guard.take() {
            // End of file tells the guard its owner is done; it finds the sandbox gone.
            drop(stdin);
            let _ = child.wait();
        }
        result
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!(dir = %self.dir.display(), "sandbox teardown: {e}");
            eprintln!("hyperbox harness: sandbox teardown: {e}");
        }
    }
}

/// Runs the guard: waits until the owner closes our stdin (or dies), then tears down `dir`.
pub fn run_guard(dir: &Path) -> Result<(), SandboxError> {
    // A terminal's Ctrl-C or hang-up belongs to the owner; the guard must outlive it.
    // SAFETY: installing SIG_IGN has no handler code to run, so no async-signal-safety concern.
    unsafe {
        let _ = nix::sys::signal::signal(Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn);
        let _ = nix::sys::signal::signal(Signal::SIGHUP, nix::sys::signal::SigHandler::SigIgn);
    }
    let mut buf = [0u8; 64];
    let mut stdin = io::stdin();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if dir.join(RECORD).exists() {
        tracing::info!(dir = %dir.display(), "owner gone without teardown; tearing down");
        teardown_abandoned(dir)
    } else {
        Ok(())
    }
}

/// Tears down whatever the sandbox at `dir` recorded, then verifies nothing is left.
pub fn teardown_dir(dir: &Path) -> Result<(), SandboxError> {
    teardown_with(dir, false)
}

/// Tears down the sandbox of an owner that died without tearing down: as [`teardown_dir`],
/// but the shims killed here cannot remove their own runtime state, so every root in
/// [`RUNTIME_STATE_ROOTS`] is swept for the sandbox's namespaces too.
pub fn teardown_abandoned(dir: &Path) -> Result<(), SandboxError> {
    teardown_with(dir, true)
}

fn teardown_with(dir: &Path, abandoned: bool) -> Result<(), SandboxError> {
    let record = read_record(dir).unwrap_or_default();
    let spare = record_spares(&record);

    // Shims must be known before they die: their sockets live outside the sandbox.
    let shim_sockets = shim_sockets(&record);

    for _ in 0..3 {
        thaw_namespaces(&record.namespaces);
        let victims = victims(dir, &record, &spare);
        if victims.is_empty() {
            break;
        }
        for pid in &victims {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        wait_gone(&victims, Duration::from_secs(10));
    }

    unmount_under(dir);
    for ns in &record.namespaces {
        for cg in namespace_cgroups(ns) {
            remove_cgroup_tree(&cg);
        }
        // runc leaves its namespace directory behind by design; our shim must remove its
        // own state, so teardown does not sweep it: what remains is reported below.
        let _ = fs::remove_dir_all(Path::new(RUNTIME_STATE_ROOTS[0]).join(ns));
        if abandoned {
            for root in &RUNTIME_STATE_ROOTS[1..] {
                let _ = fs::remove_dir_all(Path::new(root).join(ns));
            }
        }
    }
    for s in &shim_sockets {
        let _ = fs::remove_file(s);
    }
    remove_nat_chains(&record.nat_chains);
    for link in &record.net_links {
        let _ = Command::new("ip")
            .args(["link", "del", link])
            .stderr(Stdio::null())
            .status();
    }

    if mounts_under(dir).is_empty() {
        let _ = fs::remove_dir_all(dir);
    }
    let left = leftovers(dir, &record, &spare, &shim_sockets);
    if left.is_empty() {
        Ok(())
    } else {
        Err(SandboxError::Leftovers {
            dir: dir.to_path_buf(),
            leftovers: left,
        })
    }
}

/// What of a sandbox still exists: processes naming it or in its namespaces' cgroups, mounts,
/// cgroups, runc state, shim sockets and the directory. Empty after a clean teardown.
pub fn leftovers(
    dir: &Path,
    record: &Record,
    spare: &BTreeSet<u32>,
    shim_sockets: &[PathBuf],
) -> Vec<String> {
    let mut left = Vec::new();
    for pid in victims(dir, record, spare) {
        left.push(format!(
            "process {pid} ({})",
            cmdline(pid).unwrap_or_default()
        ));
    }
    for m in mounts_under(dir) {
        left.push(format!("mount {}", m.display()));
    }
    for ns in &record.namespaces {
        for cg in namespace_cgroups(ns) {
            left.push(format!("cgroup {}", cg.display()));
        }
        for root in RUNTIME_STATE_ROOTS {
            let state = Path::new(root).join(ns);
            if state.exists() {
                left.push(format!("runtime state {}", state.display()));
            }
        }
    }
    for s in shim_sockets {
        if s.exists() {
            left.push(format!("shim socket {}", s.display()));
        }
    }
    for link in &record.net_links {
        if Path::new("/sys/class/net").join(link).exists() {
            left.push(format!("network interface {link}"));
        }
    }
    let nat = nat_rules();
    for chain in &record.nat_chains {
        if nat.iter().any(|r| r == &format!("-N {chain}")) {
            left.push(format!("iptables nat chain {chain}"));
        }
    }
    if dir.exists() {
        left.push(format!("directory {}", dir.display()));
    }
    left
}

/// `iptables -t nat -S`, one rule per line (empty when iptables is absent or fails).
pub fn nat_rules() -> Vec<String> {
    Command::new("iptables")
        .args(["-w", "-t", "nat", "-S"])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The words of an `iptables -S` line, double quotes (with backslash escapes) removed.
fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in rule.chars() {
        match c {
            _ if escaped => {
                word.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                any = false;
            }
            c => word.push(c),
        }
    }
    if any || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Deletes `chains` of the `nat` table: first every rule jumping to one, then the chains.
fn remove_nat_chains(chains: &[String]) {
    if chains.is_empty() {
        return;
    }
    let iptables = |args: &[&str]| {
        let _ = Command::new("iptables")
            .arg("-w")
            .args(["-t", "nat"])
            .args(args)
            .stderr(Stdio::null())
            .status();
    };
    for rule in nat_rules() {
        let words = split_rule(&rule);
        let jumps = words
            .windows(2)
            .any(|w| w[0] == "-j" && chains.iter().any(|c| c == &w[1]));
        if words.first().is_some_and(|w| w == "-A") && jumps {
            let mut args = vec!["-D"];
            args.extend(words[1..].iter().map(String::as_str));
            iptables(&args);
        }
    }
    for chain in chains {
        iptables(&["-F", chain]);
    }
    for chain in chains {
        iptables(&["-X", chain]);
    }
}

/// Everything a sandbox has made, taken while it runs, to check after teardown that all of it
/// is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Footprint {
    pub dir: PathBuf,
    pub record: Record,
    /// Live processes of the sandbox: daemons, shims, containers.
    pub processes: Vec<TrackedProcess>,
    pub shim_sockets: Vec<PathBuf>,
    pub mounts: Vec<PathBuf>,
    pub cgroups: Vec<PathBuf>,
}

impl Footprint {
    /// Takes the footprint of the sandbox at `dir`.
    pub fn of(dir: &Path) -> Option<Footprint> {
        let record = read_record(dir)?;
        let spare = record_spares(&record);
        let processes = victims(dir, &record, &spare)
            .into_iter()
            .filter_map(|pid| tracked(pid, &cmdline(pid).unwrap_or_default()))
            .collect();
        let cgroups = record
            .namespaces
            .iter()
            .flat_map(|ns| namespace_cgroups(ns))
            .collect();
        Some(Footprint {
            dir: dir.to_path_buf(),
            shim_sockets: shim_sockets(&record),
            mounts: mounts_under(dir),
            processes,
            cgroups,
            record,
        })
    }

    /// What of the footprint still exists (empty after a clean teardown).
    pub fn leftovers(&self) -> Vec<String> {
        let spare = record_spares(&self.record);
        let mut left = leftovers(&self.dir, &self.record, &spare, &self.shim_sockets);
        for p in &self.processes {
            if is_alive(p) && !spare.contains(&p.pid) {
                left.push(format!("process {} ({})", p.pid, p.what));
            }
        }
        for cg in &self.cgroups {
            if cg.exists() {
                left.push(format!("cgroup {}", cg.display()));
            }
        }
        left.sort();
        left.dedup();
        left
    }
}

/// The owner and guard of a record, and this process: never killed by teardown.
fn record_spares(record: &Record) -> BTreeSet<u32> {
    let me = std::process::id();
    [Some(me), record.owner.as_ref().map(|p| p.pid)]
        .into_iter()
        .flatten()
        .chain(record.guard.as_ref().filter(|g| g.pid != me).map(|g| g.pid))
        .collect()
}

/// Reads a sandbox's record.
pub fn read_record(dir: &Path) -> Option<Record> {
    let data = fs::read(dir.join(RECORD)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Tears down sandboxes under `root` whose owner and guard are both gone.
pub fn sweep_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(record) = read_record(&dir) else {
            continue;
        };
        let alive = |p: &Option<TrackedProcess>| p.as_ref().is_some_and(is_alive);
        if !alive(&record.owner) && !alive(&record.guard) {
            tracing::info!(dir = %dir.display(), "sweeping a stale sandbox");
            let _ = teardown_abandoned(&dir);
        }
    }
}

fn tracked(pid: u32, what: &str) -> Option<TrackedProcess> {
    Some(TrackedProcess {
        pid,
        start_time: start_time(pid)?,
        what: what.to_string(),
    })
}

/// Whether the tracked process still runs: same pid and start time, and not a zombie (a
/// zombie has exited; only its parent's reaping is pending).
fn is_alive(p: &TrackedProcess) -> bool {
    start_time(p.pid) == Some(p.start_time) && !is_zombie(p.pid)
}

/// Field 22 of `/proc/PID/stat`: the start time in clock ticks since boot.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A process's command line, arguments joined by spaces.
pub fn cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

fn all_pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a command line names `dir` or a path inside it. Sandboxes `NAME-1` and `NAME-10`
/// share a prefix, so a plain substring test would take one's processes for the other's.
fn names_dir(cmdline: &str, dir: &Path) -> bool {
    let dir = dir.to_string_lossy();
    let inside = format!("{dir}/");
    cmdline.split(' ').any(|arg| {
        let path = arg.rsplit_once('=').map_or(arg, |(_, v)| v);
        path == dir || path.contains(&inside)
    })
}

/// Processes to kill: recorded daemons still alive, processes whose command line names the
/// sandbox directory, shims of the recorded namespaces on the recorded containerd (a client's
/// shims name the containerd's sandbox, not its own), and processes in the recorded
/// namespaces' cgroups.
fn victims(dir: &Path, record: &Record, spare: &BTreeSet<u32>) -> Vec<u32> {
    let mut out = BTreeSet::new();
    for p in &record.processes {
        if is_alive(p) {
            out.insert(p.pid);
        }
    }
    for pid in all_pids() {
        if cmdline(pid).is_some_and(|c| names_dir(&c, dir) || is_recorded_shim(&c, record)) {
            out.insert(pid);
        }
    }
    for ns in &record.namespaces {
        for cg in namespace_cgroups(ns) {
            collect_cgroup_procs(&cg, &mut out);
        }
    }
    out.retain(|p| !spare.contains(p));
    out.into_iter().collect()
}

fn wait_gone(pids: &[u32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if pids
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists() || is_zombie(*p))
        {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s[s.rfind(')')? + 2..].to_string();
            Some(rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Cgroup directories of a containerd namespace in every mounted hierarchy. containerd's
/// clients (ctr, Docker, the harness) place a container's cgroup at `/NS/ID`.
pub fn namespace_cgroups(ns: &str) -> Vec<PathBuf> {
    let base = Path::new("/sys/fs/cgroup");
    let mut out = Vec::new();
    let direct = base.join(ns);
    if direct.is_dir() {
        out.push(direct);
    }
    if let Ok(entries) = fs::read_dir(base) {
        for e in entries.flatten() {
            let p = e.path().join(ns);
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn collect_cgroup_procs(cg: &Path, out: &mut BTreeSet<u32>) {
    if let Ok(procs) = fs::read_to_string(cg.join("cgroup.procs")) {
        out.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(cg) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_cgroup_procs(&e.path(), out);
            }
        }
    }
}

/// Frozen processes cannot die: thaw the namespaces' freezer cgroups (v1 and v2) first.
fn thaw_namespaces(namespaces: &[String]) {
    fn thaw(cg: &Path) {
        let v1 = cg.join("freezer.state");
        if v1.exists() {
            let _ = fs::write(&v1, "THAWED");
        }
        let v2 = cg.join("cgroup.freeze");
        if v2.exists() {
            let _ = fs::write(&v2, "0");
        }
        if let Ok(entries) = fs::read_dir(cg) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    thaw(&e.path());
                }
            }
        }
    }
    for ns in namespaces {
        for cg in namespace_cgroups(ns) {
            thaw(&cg);
        }
    }
}

fn remove_cgroup_tree(cg: &Path) {
    // Children are listed again on every try: a runtime still finishing a delete (or a
    // create) under load may add or remove one between our rmdirs, and the parent stays
    // busy until its last child is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(entries) = fs::read_dir(cg) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_cgroup_tree(&e.path());
                }
            }
        }
        // A cgroup directory is removed with rmdir even though it appears to hold files.
        match fs::remove_dir(cg) {
            Ok(()) => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(20))
            }
            Err(_) => return,
        }
    }
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or under `dir`, deepest first (detaching what is busy).
pub fn unmount_under(dir: &Path) {
    for _ in 0..3 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            if umount2(&m, MntFlags::empty()).is_err() {
                let _ = umount2(&m, MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Sockets of this sandbox's shims. containerd 1.6 and 1.7 place a shim's socket at
/// `/run/containerd/s/HEX(sha256(ADDRESS/NS/ID))` whatever its own state dir is; the shims'
/// command lines give namespace and id. A client of another sandbox's containerd
/// ([`Record::containerd_client`]) owns only the shims of its namespaces.
pub fn shim_sockets(record: &Record) -> Vec<PathBuf> {
    let Some(address) = &record.containerd_socket else {
        return Vec::new();
    };
    let address = address.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for pid in all_pids() {
        let Some(cmd) = cmdline(pid) else { continue };
        if !cmd.contains(&address) {
            continue;
        }
        if let Some((ns, id)) = shim_namespace_and_id(&cmd) {
            if !record.containerd_client || record.namespaces.iter().any(|n| n == ns) {
                out.push(shim_socket_path(&address, ns, id));
            }
        }
    }
    out
}

/// The `-namespace` and `-id` of a shim's command line.
fn shim_namespace_and_id(cmd: &str) -> Option<(&str, &str)> {
    let args: Vec<&str> = cmd.split(' ').collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| *a == flag)
            .and_then(|i| args.get(i + 1).copied())
    };
    Some((arg("-namespace")?, arg("-id")?))
}

/// Whether `cmd` is a shim of one of the record's namespaces on the record's containerd.
fn is_recorded_shim(cmd: &str, record: &Record) -> bool {
    let Some(address) = &record.containerd_socket else {
        return false;
    };
    let args: Vec<&str> = cmd.split(' ').collect();
    let on_address = args
        .windows(2)
        .any(|w| w[0] == "-address" && Path::new(w[1]) == address);
    on_address
        && shim_namespace_and_id(cmd)
            .is_some_and(|(ns, _)| record.namespaces.iter().any(|n| n == ns))
}

/// The socket path containerd gives the shim of `ns`/`id` on the daemon at `address`.
pub fn shim_socket_path(address: &str, ns: &str, id: &str) -> PathBuf {
    let digest = Sha256::digest(format!("{address}/{ns}/{id}").as_bytes());
    Path::new("/run/containerd/s").join(hex::encode(digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_name_a_sandbox_only_by_whole_path() {
        let dir = Path::new("/var/lib/hyperbox-test/containerd1.7-9-1");
        assert!(names_dir(
            "containerd --config /var/lib/hyperbox-test/containerd1.7-9-1/config.toml",
            dir
        ));
        assert!(names_dir(
            "shim -address /var/lib/hyperbox-test/containerd1.7-9-1/c.sock",
            dir
        ));
        assert!(names_dir(
            "hyperbox-harness guard /var/lib/hyperbox-test/containerd1.7-9-1",
            dir
        ));
        assert!(names_dir(
            "x --root=/var/lib/hyperbox-test/containerd1.7-9-1/root",
            dir
        ));
        assert!(!names_dir(
            "containerd --config /var/lib/hyperbox-test/containerd1.7-9-10/config.toml",
            dir
        ));
        assert!(!names_dir("sleep 1000", dir));
    }

    #[test]
    fn a_client_owns_the_shims_of_its_namespaces_only() {
        let record = Record {
            containerd_socket: Some(PathBuf::from("/sb/containerd.sock")),
            namespaces: vec!["hbt-docker-9-0".into()],
            containerd_client: true,
            ..Record::default()
        };
        let shim = |ns: &str, address: &str| {
            format!(
                "/sb/bin/containerd-shim-hyperbox-v1 -namespace {ns} -id abc -address {address}"
            )
        };
        assert!(is_recorded_shim(
            &shim("hbt-docker-9-0", "/sb/containerd.sock"),
            &record
        ));
        assert!(!is_recorded_shim(
            &shim("hbt-containerd", "/sb/containerd.sock"),
            &record
        ));
        assert!(!is_recorded_shim(
            &shim("hbt-docker-9-0", "/sb/containerd.sock2"),
            &record
        ));
        assert!(!is_recorded_shim("sleep 1000", &record));
        assert_eq!(shim_namespace_and_id(&shim("n", "/a")), Some(("n", "abc")));
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/tab\\011x\\134"), "/tab\tx\\");
    }

    #[test]
    fn start_time_of_self_is_stable_and_dead_pids_have_none() {
        let me = std::process::id();
        let t = start_time(me).expect("own stat readable");
        assert_eq!(start_time(me), Some(t));
        // pid_max is at most 2^22; this pid cannot exist.
        assert_eq!(start_time(4_194_304 + 1), None);
    }
}

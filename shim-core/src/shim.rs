//! The shim process: containerd's start and delete actions and the task server, on the
//! `containerd-shim` crate, with the engine prepared before any thread exists.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::write_str_to_file;
use containerd_shim::{spawn, Config, ExitSignal, Flags, Shim, StartOpts};
use tracing_subscriber::EnvFilter;

use crate::cgroup_warmup;
use crate::engine::{Engine, ShimAction, ShimContext};
use crate::error::EngineError;
use crate::reaper;
use crate::service::TaskService;
use crate::timeline;

/// The engine prepared in [`run`] before the async runtime, handed to the shim instance the
/// `containerd-shim` crate constructs.
static ENGINE: OnceLock<Arc<dyn Engine>> = OnceLock::new();

/// Runs a shim binary: parses containerd's arguments, sets up logging, lets `prepare` build
/// the engine while the process is still single-threaded (a fork-based engine forks its
/// helper there), then serves containerd's start, delete or task-server action.
/// `features` gives the OCI runtime features document `-info` reports (containerd 2.x asks
/// for it), if the engine has one.
pub fn run(
    runtime_id: &str,
    prepare: fn(&ShimContext) -> Result<Arc<dyn Engine>, EngineError>,
    features: fn() -> Option<serde_json::Value>,
) -> ExitCode {
    // Before anything else: nothing this process is handed by accident reaches what it
    // starts (hooks, CRIU, loggers, the shim's own re-exec).
    close_inherited_fds_on_exec();
    let args: Vec<OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(&args[1..]) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{runtime_id}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.info {
        return crate::info::print_info(runtime_id, features());
    }
    if flags.version {
        println!("{runtime_id}: version {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let action = match flags.action.as_str() {
        "start" => None,
        "delete" => Some(ShimAction::Delete),
        _ => Some(ShimAction::Serve),
    };
    init_logging(&flags, action);
    // Opened before the zygote's fork, which inherits it.
    timeline::init();
    let role = match action {
        None => "start",
        Some(ShimAction::Delete) => "delete",
        Some(ShimAction::Serve) => "serve",
    };
    timeline::mark(&format!("{role}.main"), &flags.id);
    if let Some(action) = action {
        let ctx = ShimContext {
            namespace: flags.namespace.clone(),
            id: flags.id.clone(),
            action,
            address: flags.address.clone(),
        };
        match prepare(&ctx) {
            Ok(engine) => {
                let _ = ENGINE.set(engine);
                timeline::mark(&format!("{role}.engine_ready"), &flags.id);
                // The zygote is forked: threads may start now.
                if action == ShimAction::Serve {
                    cgroup_warmup::start();
                }
            }
            Err(e) => {
                tracing::error!(id = flags.id, "cannot prepare the engine: {e}");
                eprintln!("{runtime_id}: cannot prepare the engine: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    // One thread is plenty for one container's task API and keeps the shim small.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{runtime_id}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = Config {
        // Logging is ours (tracing, set up above); reaping too (see `reaper`).
        no_setup_logger: true,
        no_reaper: true,
        no_sub_reaper: false,
        ..Default::default()
    };
    rt.block_on(containerd_shim::asynchronous::run::<CoreShim>(
        runtime_id,
        Some(config),
    ));
    // A stdin copy may still wait for a writer that never comes; do not wait for it.
    rt.shutdown_background();
    timeline::mark(&format!("{role}.exit"), &flags.id);
    ExitCode::SUCCESS
}

/// Logs where containerd reads them: the task server writes to the `log` FIFO containerd
/// opened in the bundle (the shim's working directory), the short-lived start and delete
/// actions to stderr, which containerd captures.
fn init_logging(flags: &Flags, action: Option<ShimAction>) {
    let level = if flags.debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let result = match action {
        Some(ShimAction::Serve) => match OpenOptions::new().write(true).open("log") {
            Ok(fifo) => builder.with_writer(Mutex::new(fifo)).try_init(),
            Err(_) => builder.with_writer(std::io::stderr).try_init(),
        },
        _ => builder.with_writer(std::io::stderr).try_init(),
    };
    if let Err(e) = result {
        eprintln!("cannot set up logging: {e}");
    }
}

/// The `containerd-shim` crate's view of this shim.
struct CoreShim {
    id: String,
    runtime_id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

/// The annotations that put containers in one shim, as runc's shim reads them from the
/// bundle's `config.json`: an explicit group first, then the CRI pod (every container of a
/// pod carries its sandbox's id, the sandbox its own).
const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// The group of the container whose bundle is `bundle`: the first of [`GROUP_ANNOTATIONS`]
/// its spec carries (non-empty), else its own id. A spec that cannot be read is an error, as
/// under runc's shim: Create would fail on it anyway.
fn group_of(bundle: &Path, id: &str) -> Result<String, String> {
    let path = bundle.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    #[derive(serde::Deserialize)]
    struct Annotated {
        #[serde(default)]
        annotations: Option<std::collections::HashMap<String, String>>,
    }
    let spec: Annotated = serde_json::from_slice(&text)
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    let annotations = spec.annotations.unwrap_or_default();
    Ok(GROUP_ANNOTATIONS
        .iter()
        .find_map(|key| annotations.get(*key).filter(|g| !g.is_empty()))
        .cloned()
        .unwrap_or_else(|| id.to_string()))
}

/// Whether a task server listens on `address` (`unix://PATH`).
fn serving(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[async_trait]
impl Shim for CoreShim {
    type T = TaskService;

    async fn new(runtime_id: &str, flags: &Flags, _config: &mut Config) -> Self {
        CoreShim {
            id: flags.id.clone(),
            runtime_id: runtime_id.to_string(),
            namespace: flags.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // One shim per group, as runc's shim: a pod's containers (or containers annotated with
        // one group) share the shim of the first, which serves them all through one zygote.
        // The group's socket is derived from containerd's address, the namespace and the
        // group, and also this runtime's name, so that a container never lands in a shim of
        // another runtime (runc's, or our wasm shim) that happens to share its group.
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("no bundle directory: {e}")))?;
        let group = group_of(&bundle, &opts.id).map_err(containerd_shim::Error::Other)?;
        let key = format!("{}/{group}", self.runtime_id);
        let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &key);
        // Nothing may be logged here: containerd reads the start action's stdout and stderr
        // together as the address.
        if group != opts.id && serving(&address) {
            write_str_to_file("address", &address).await?;
            return Ok(address);
        }
        // A shim started at the same moment for another container of the group may win the
        // socket: ours then finds it served, writes its address and exits (the crate's
        // create_server_with_retry), and the address returned is the group's either way.
        let address = spawn(opts, &key, Vec::new()).await?;
        timeline::mark("start.spawned", &self.id);
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        // containerd runs `delete` in the bundle when the task server went away.
        let bundle = std::env::current_dir()
            .map_err(|e| containerd_shim::Error::Other(format!("no bundle directory: {e}")))?;
        if let Some(engine) = ENGINE.get() {
            if let Err(e) = engine.delete(&self.id, &bundle).await {
                tracing::warn!(id = self.id, "cleanup of a lost shim: {e}");
            }
        }
        remove_dead_socket(&self.id, &bundle.join("address"));
        Ok(DeleteResponse {
            pid: 0,
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(Timestamp::from(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let engine = ENGINE
            .get()
            .cloned()
            .expect("the engine is prepared before the task server starts");
        let reaped = reaper::spawn().expect("SIGCHLD handler");
        timeline::mark("serve.listening", &self.id);
        TaskService::new(
            engine,
            publisher,
            self.namespace.clone(),
            self.exit.clone(),
            reaped,
        )
    }
}

/// Removes the task socket named in the bundle's `address` file when nothing listens on it
/// any more: a shim that was killed could not remove it itself.
fn remove_dead_socket(id: &str, address_file: &Path) {
    let Ok(address) = std::fs::read_to_string(address_file) else {
        return;
    };
    let path = Path::new(address.trim().trim_start_matches("unix://"));
    let refused = matches!(
        std::os::unix::net::UnixStream::connect(path),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    );
    if refused {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(
                id,
                "cannot remove the dead shim's socket {}: {e}",
                path.display()
            );
        }
    }
}

/// Marks every file descriptor above the standard streams close-on-exec. containerd opens
/// its own descriptors close-on-exec, but one it was itself handed without the flag (by a
/// parent, a socket-activating init or an embedding program) is inherited by every shim it
/// starts; runc's shim passes such descriptors on to runc and from there to hooks. Marked
/// (not closed), so nothing the process uses itself is lost: only `exec` drops them.
fn close_inherited_fds_on_exec() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC takes plain integers and touches only
    // the descriptors' flags.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if marked {
        return;
    }
    // Kernels before 5.11: each open descriptor, as /proc lists them.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_SETFD on a descriptor number only sets its flag (EBADF for the one the
        // listing itself used, which is closed by now).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

#[cfg(test)]
mod fd_tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn inherited_descriptors_are_marked_close_on_exec() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let fd = file.as_raw_fd();
        // SAFETY: clears the flag of a descriptor this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let cloexec = || {
            // SAFETY: reads the flags of a descriptor this test owns.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            flags & libc::FD_CLOEXEC == libc::FD_CLOEXEC
        };
        assert!(!cloexec());
        close_inherited_fds_on_exec();
        assert!(cloexec());
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    fn bundle(name: &str, config: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hb-group-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config).unwrap();
        dir
    }

    #[test]
    fn the_group_comes_from_the_annotations_as_under_runc() {
        let cases = [
            (r#"{"ociVersion":"1.0.2"}"#, "own"),
            (r#"{"annotations":null}"#, "own"),
            (
                r#"{"annotations":{"io.kubernetes.cri.sandbox-id":""}}"#,
                "own",
            ),
            (
                r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1"}}"#,
                "pod1",
            ),
            (
                r#"{"annotations":{"io.kubernetes.cri.sandbox-id":"pod1","io.containerd.runc.v2.group":"g"}}"#,
                "g",
            ),
            (
                r#"{"annotations":{"io.containerd.runc.v2.group":"","io.kubernetes.cri.sandbox-id":"pod1"}}"#,
                "pod1",
            ),
        ];
        for (n, (config, want)) in cases.into_iter().enumerate() {
            let dir = bundle(&format!("c{n}"), config);
            assert_eq!(group_of(&dir, "own").as_deref(), Ok(want), "{config}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_spec_that_cannot_be_read_fails_start_naming_it() {
        let dir = bundle("bad", "{not json");
        let err = group_of(&dir, "own").unwrap_err();
        assert!(err.contains("config.json"), "{err}");
        std::fs::remove_file(dir.join("config.json")).unwrap();
        let err = group_of(&dir, "own").unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_hostile_group_only_names_a_socket_under_containerds_shim_dir() {
        // The group is hashed into the socket's name: whatever an annotation holds (path
        // parts, a NUL, a megabyte), the address stays one file in containerd's directory,
        // and the runtime's name keeps other runtimes' groups apart.
        let long = "x".repeat(1 << 20);
        for group in [
            "../../etc/passwd",
            "/run/containerd/s/abc",
            "a\0b",
            long.as_str(),
        ] {
            let ours = containerd_shim::socket_address(
                "/run/containerd/containerd.sock.ttrpc",
                "k8s.io",
                &format!("io.containerd.hyperbox.v1/{group}"),
            );
            let name = ours.strip_prefix("unix:///run/containerd/s/").expect(&ours);
            assert!(
                name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()),
                "{ours}"
            );
            let runcs = containerd_shim::socket_address(
                "/run/containerd/containerd.sock.ttrpc",
                "k8s.io",
                group,
            );
            assert_ne!(ours, runcs);
        }
    }
}

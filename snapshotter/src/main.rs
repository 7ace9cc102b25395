//! `hyperbox-snapshotter`: serves containerd's snapshots API on a unix socket, and its diff
//! API (the EROFS differ, for containerd 2.x) on another.
//!
//! ```text
//! hyperbox-snapshotter [--config FILE] [--root DIR] [--address SOCKET]
//! hyperbox-snapshotter [--config FILE] [--address SOCKET] status [--all]
//! ```
//!
//! `status` asks the running snapshotter (through its socket) for its snapshots and prints
//! each committed layer's storage and conversion: what it cost, or why it was set aside.
//!
//! Logs go to stderr (journald under systemd). SIGTERM or SIGINT stops it; containers keep
//! running, since their mounts do not go through this process.

use std::fs;
use std::io::{self, IsTerminal};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use containerd_snapshots::tonic::transport::Server;
use hyperbox_snapshotter::config::{Config, DEFAULT_CONFIG_PATH};
use hyperbox_snapshotter::differ::{DiffServer, Differ};
use hyperbox_snapshotter::{HyperboxSnapshotter, LayerOptions};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{info, warn};

#[derive(Debug, Parser)]
#[command(name = "hyperbox-snapshotter", version, about)]
struct Args {
    /// Configuration file (default /etc/hyperbox/snapshotter.toml, if it exists).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Overrides `root` of the configuration.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Overrides `address` of the configuration.
    #[arg(long)]
    address: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Lists the committed layers of the running snapshotter: storage (erofs, directory,
    /// or pending), and what the conversion cost or why the layer was set aside.
    Status {
        /// Active snapshots and views too.
        #[arg(long)]
        all: bool,
    },
}

/// Prints the layers of the snapshotter listening on `address`.
fn status(address: &Path, all: bool) -> anyhow::Result<()> {
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
    use hyperbox_snapshotter::{CONVERSION_LABEL, STORAGE_LABEL};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let infos = runtime.block_on(async {
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("cannot connect to {}", address.display()))?;
        let mut stream = SnapshotsClient::new(channel)
            .list(ListSnapshotsRequest {
                snapshotter: "hyperbox".to_string(),
                filters: Vec::new(),
            })
            .await
            .context("List failed")?
            .into_inner();
        let mut infos = Vec::new();
        while let Some(batch) = stream.message().await.context("List failed")? {
            infos.extend(batch.info);
        }
        anyhow::Ok(infos)
    })?;
    let mut rows = Vec::new();
    let (mut erofs, mut aside, mut pending) = (0, 0, 0);
    for info in &infos {
        // containerd's Kind: 1 view, 2 active, 3 committed.
        let kind = match info.kind {
            1 => "view",
            2 => "active",
            3 => "committed",
            _ => "unknown",
        };
        let storage = info.labels.get(STORAGE_LABEL).map(String::as_str);
        let conversion = info
            .labels
            .get(CONVERSION_LABEL)
            .cloned()
            .unwrap_or_default();
        let storage = match (kind, storage) {
            ("committed", Some("erofs")) => {
                erofs += 1;
                "erofs"
            }
            ("committed", Some(_)) => {
                aside += 1;
                "directory"
            }
            ("committed", None) => {
                pending += 1;
                "pending"
            }
            _ if !all => continue,
            _ => "directory",
        };
        rows.push((kind, storage, info.name.clone(), conversion));
    }
    rows.sort_by(|a, b| a.2.cmp(&b.2));
    let width = rows.iter().map(|r| r.2.len()).max().unwrap_or(3).max(3);
    println!(
        "{:<10} {:<9} {:<width$} CONVERSION",
        "KIND", "STORAGE", "KEY"
    );
    for (kind, storage, key, conversion) in rows {
        println!("{kind:<10} {storage:<9} {key:<width$} {conversion}");
    }
    println!(
        "{} committed layers: {erofs} converted to erofs, {aside} set aside (plain directories), \
         {pending} waiting for conversion",
        erofs + aside + pending
    );
    Ok(())
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Config::load(Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => Config::default(),
    };
    if let Some(root) = &args.root {
        config.root = root.clone();
    }
    if let Some(address) = &args.address {
        config.address = address.clone();
    }
    config.validate()?;
    Ok(config)
}

/// Binds the socket with `mode`, never wider even for an instant: the umask is narrowed
/// around the bind. A stale socket file is replaced; anything else at the path is refused.
fn bind_socket(path: &Path, mode: u32) -> anyhow::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("cannot create socket directory {}", dir.display()))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?,
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    // SAFETY: umask only swaps the process's file-creation mask; no tokio thread exists yet,
    // so nothing else creates files while it is narrowed.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.with_context(|| format!("cannot listen on {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set mode {mode:o} on {}", path.display()))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("cannot make {} non-blocking", path.display()))?;
    Ok(listener)
}

/// How long in-flight requests may finish after SIGTERM before the process exits anyway
/// (a client holding its connection open must not keep the snapshotter alive).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The differ's socket, and containerd's for what it hands over.
struct DifferSocket {
    listener: std::os::unix::net::UnixListener,
    address: PathBuf,
    containerd: PathBuf,
}

async fn serve(
    snapshotter: HyperboxSnapshotter,
    listener: std::os::unix::net::UnixListener,
    address: &Path,
    differ: Option<DifferSocket>,
) -> anyhow::Result<()> {
    let listener = tokio::net::UnixListener::from_std(listener)
        .with_context(|| format!("cannot serve on {}", address.display()))?;
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    info!(address = %address.display(), "serving the snapshots API");
    let differ_address = differ.as_ref().map(|d| d.address.clone());
    let differ_server = match differ {
        Some(d) => {
            let listener = tokio::net::UnixListener::from_std(d.listener)
                .with_context(|| format!("cannot serve on {}", d.address.display()))?;
            info!(address = %d.address.display(), containerd = %d.containerd.display(), "serving the diff API");
            let service = DiffServer::new(Differ::new(snapshotter.clone(), d.containerd));
            let stopped = stop.clone();
            Some(tokio::spawn(
                containerd_client::tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                        stopped.notified().await
                    }),
            ))
        }
        None => None,
    };
    let server = Server::builder()
        .add_service(containerd_snapshots::server(Arc::new(snapshotter)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            stopped.notified().await
        });
    tokio::pin!(server);
    let result = tokio::select! {
        r = &mut server => r,
        _ = term.recv() => {
            info!("SIGTERM: stopping");
            drain(&stop, &mut server).await
        }
        _ = int.recv() => {
            info!("SIGINT: stopping");
            drain(&stop, &mut server).await
        }
    };
    let _ = fs::remove_file(address);
    if let Some(d) = differ_server {
        d.abort();
    }
    if let Some(a) = differ_address {
        let _ = fs::remove_file(a);
    }
    result.with_context(|| format!("serving on {}", address.display()))
}

/// Stops accepting, then gives open requests [`SHUTDOWN_GRACE`] to finish.
async fn drain<F, E>(stop: &Notify, server: &mut std::pin::Pin<&mut F>) -> Result<(), E>
where
    F: std::future::Future<Output = Result<(), E>>,
{
    stop.notify_waiters();
    match tokio::time::timeout(SHUTDOWN_GRACE, server.as_mut()).await {
        Ok(r) => r,
        Err(_) => {
            warn!("connections still open after {SHUTDOWN_GRACE:?}: exiting anyway");
            Ok(())
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = load_config(&args)?;
    if let Some(Command::Status { all }) = args.command {
        return status(&config.address, all);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log_level))
        .with_context(|| format!("invalid log_level {:?}", config.log_level))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .init();

    let options = LayerOptions {
        convert: config.convert,
        mount_mode: config.erofs_mount_mode()?,
        limits: config.conversion_limits(),
        merge: config.merge_layers,
        workers: config.conversion_workers as usize,
    };
    let snapshotter = HyperboxSnapshotter::open(&config.root, options)
        .with_context(|| format!("cannot open snapshotter root {}", config.root.display()))?;
    info!(root = %config.root.display(), "snapshotter state recovered");
    let listener = bind_socket(&config.address, config.socket_mode)?;
    let differ = if config.differ_enabled() {
        Some(DifferSocket {
            listener: bind_socket(&config.differ_address, config.socket_mode)?,
            address: config.differ_address.clone(),
            containerd: config.containerd_address.clone(),
        })
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(snapshotter, listener, &config.address, differ))
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hyperbox-snapshotter: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The latency of a running task's `Stats`, two ways: asked of the shim itself, on its ttrpc
//! socket (`containerd.task.v2.Task/Stats`, containerd bypassed), and asked of containerd
//! (`Tasks.Metrics`, which containerd answers by calling the same shim method).
//!
//! One tokio runtime (current-thread) drives both clients; each timed call is one
//! `block_on` of one request on a connection opened beforehand, so connecting is not timed.

use std::fs;
use std::path::{Path, PathBuf};

use containerd_shim_protos::api::StatsRequest;
use containerd_shim_protos::shim_async::{Client, TaskClient};
use containerd_shim_protos::ttrpc;
use hyperbox_integration::client::TestClient;
use hyperbox_integration::sandbox::shim_socket_path;
use tokio::runtime::Runtime;

use crate::engines::{variant_name, Engine};
use crate::runner::{CommandFailure, Variant};

/// How long one Stats call may take before it counts as failed (nanoseconds, as ttrpc takes
/// it).
const CALL_TIMEOUT_NS: i64 = 10_000_000_000;

/// Errors finding or calling a shim.
#[derive(Debug, thiserror::Error)]
pub enum TaskStatsError {
    #[error(
        "the shim of container {id} does not listen where containerd puts shim sockets: {path} \
         does not exist (is the task running?)"
    )]
    NoSocket { id: String, path: PathBuf },
    #[error(
        "the shim of container {id} wrote its address as {written:?} in {file}, but the harness \
         computes {computed:?} (integration's `shim_socket_path` disagrees with this shim)"
    )]
    AddressMismatch {
        id: String,
        file: PathBuf,
        written: String,
        computed: String,
    },
    #[error("cannot connect to the shim of container {id} at {address}: {source}")]
    Connect {
        id: String,
        address: String,
        #[source]
        source: ttrpc::Error,
    },
    #[error("{0}")]
    Call(#[from] CommandFailure),
}

/// A running task and where to ask for its stats.
#[derive(Debug, Clone)]
pub struct StatsTarget {
    pub runtime: String,
    pub id: String,
    /// The shim's ttrpc address, `unix:///run/containerd/s/HEX`.
    pub address: String,
    /// The bundle's `address` file, where the shim wrote the same address (`None`: it wrote
    /// none, and the address is the harness's computation alone).
    pub confirmed_by: Option<PathBuf>,
}

impl StatsTarget {
    /// The task `id` of `engine`, run by `runtime`. The shim's address is the one containerd
    /// gives it ([`shim_socket_path`]); where the shim also wrote it into its bundle's
    /// `address` file, the two must agree.
    pub fn locate(engine: &Engine, runtime: &str, id: &str) -> Result<Self, TaskStatsError> {
        let c = &engine.bed.containerd;
        let path = shim_socket_path(&c.socket().to_string_lossy(), c.namespace(), id);
        if !path.exists() {
            return Err(TaskStatsError::NoSocket {
                id: id.to_string(),
                path,
            });
        }
        let address = format!("unix://{}", path.display());
        let file = bundle_dir(c.dir(), c.namespace(), id).join("address");
        let confirmed_by = match fs::read_to_string(&file) {
            Err(_) => None,
            Ok(written) if written.trim() == address => Some(file),
            Ok(written) => {
                return Err(TaskStatsError::AddressMismatch {
                    id: id.to_string(),
                    file,
                    written: written.trim().to_string(),
                    computed: address,
                })
            }
        };
        Ok(StatsTarget {
            runtime: runtime.to_string(),
            id: id.to_string(),
            address,
            confirmed_by,
        })
    }
}

/// A task's bundle in a harness containerd: `STATE/io.containerd.runtime.v2.task/NS/ID`.
pub fn bundle_dir(containerd_dir: &Path, namespace: &str, id: &str) -> PathBuf {
    containerd_dir
        .join("state")
        .join("io.containerd.runtime.v2.task")
        .join(namespace)
        .join(id)
}

/// The name of a Stats variant: the runtime and containerd version, and which way it asks.
pub fn stats_variant_name(variant: &str, via_containerd: bool) -> String {
    let way = if via_containerd { "containerd" } else { "shim" };
    format!("{variant} {way}")
}

/// What one answer held: the metrics' type URL and encoded size, for the report (a shim
/// that answered quickly with nothing would otherwise look fast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsAnswer {
    pub type_url: String,
    pub bytes: usize,
}

impl std::fmt::Display for StatsAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, {} bytes", self.type_url, self.bytes)
    }
}

/// Calls `Task/Stats` once on the shim.
async fn shim_stats(
    client: &TaskClient,
    target: &StatsTarget,
) -> Result<StatsAnswer, CommandFailure> {
    let req = StatsRequest {
        id: target.id.clone(),
        ..Default::default()
    };
    let resp = client
        .stats(ttrpc::context::with_timeout(CALL_TIMEOUT_NS), &req)
        .await
        .map_err(|e| failure(&shim_call_text(target), e.to_string()))?;
    let stats = resp.stats.into_option().ok_or_else(|| {
        failure(
            &shim_call_text(target),
            "the response holds no stats".into(),
        )
    })?;
    Ok(StatsAnswer {
        type_url: stats.type_url,
        bytes: stats.value.len(),
    })
}

/// Calls containerd's `Tasks.Metrics` once for the task.
async fn containerd_metrics(
    client: &TestClient,
    target: &StatsTarget,
) -> Result<StatsAnswer, CommandFailure> {
    let any = client
        .metrics(&target.id)
        .await
        .map_err(|e| failure(&containerd_call_text(target), e.to_string()))?;
    Ok(StatsAnswer {
        type_url: any.type_url,
        bytes: any.value.len(),
    })
}

fn shim_call_text(target: &StatsTarget) -> String {
    format!(
        "ttrpc containerd.task.v2.Task/Stats {{id: {}}} on {}",
        target.id, target.address
    )
}

fn containerd_call_text(target: &StatsTarget) -> String {
    format!("containerd Tasks.Metrics {{filters: [id=={}]}}", target.id)
}

fn failure(command: &str, error: String) -> CommandFailure {
    CommandFailure {
        command: command.to_string(),
        status: "error".into(),
        stderr: error,
    }
}

/// The connections one engine's Stats variants use.
#[derive(Clone)]
pub struct StatsClients {
    pub containerd: TestClient,
    /// One per target, in the same order.
    pub shims: Vec<TaskClient>,
}

impl std::fmt::Debug for StatsClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatsClients")
            .field("containerd", &self.containerd)
            .field("shims", &self.shims.len())
            .finish()
    }
}

/// Connects to containerd and to each target's shim, and asks each once both ways (a failing
/// shim is reported here, before anything is timed). Returns the clients and, per target,
/// what the shim and containerd answered.
pub fn connect(
    rt: &Runtime,
    engine: &Engine,
    targets: &[StatsTarget],
) -> Result<(StatsClients, Vec<(StatsAnswer, StatsAnswer)>), TaskStatsError> {
    let c = &engine.bed.containerd;
    let containerd = rt
        .block_on(c.client())
        .map_err(|e| failure("connect to containerd", e.to_string()))?;
    let mut shims = Vec::with_capacity(targets.len());
    let mut answers = Vec::with_capacity(targets.len());
    for t in targets {
        let client =
            rt.block_on(Client::connect(&t.address))
                .map_err(|source| TaskStatsError::Connect {
                    id: t.id.clone(),
                    address: t.address.clone(),
                    source,
                })?;
        let client = TaskClient::new(client);
        let from_shim = rt.block_on(shim_stats(&client, t))?;
        let from_containerd = rt.block_on(containerd_metrics(&containerd, t))?;
        tracing::info!(
            containerd = %engine.version,
            runtime = t.runtime,
            shim = %from_shim,
            via_containerd = %from_containerd,
            "stats answered"
        );
        shims.push(client);
        answers.push((from_shim, from_containerd));
    }
    Ok((StatsClients { containerd, shims }, answers))
}

/// The two variants of `target` (the `index`th of `clients`): Stats asked of the shim, and
/// Metrics asked of containerd. `answers` describe them in the report.
pub fn variants<'a>(
    rt: &'a Runtime,
    engine: &Engine,
    clients: &'a StatsClients,
    index: usize,
    target: &'a StatsTarget,
    answers: &(StatsAnswer, StatsAnswer),
) -> [Variant<'a>; 2] {
    let base = variant_name(&target.runtime, engine.version);
    let shim = &clients.shims[index];
    let via_shim = Variant::new(
        stats_variant_name(&base, false),
        format!("{} -> {}", shim_call_text(target), answers.0),
        move |_| rt.block_on(shim_stats(shim, target)).map(drop),
    );
    let containerd = &clients.containerd;
    let via_containerd = Variant::new(
        stats_variant_name(&base, true),
        format!("{} -> {}", containerd_call_text(target), answers.1),
        move |_| {
            rt.block_on(containerd_metrics(containerd, target))
                .map(drop)
        },
    );
    [via_shim, via_containerd]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_live_in_the_v2_task_state_dir() {
        assert_eq!(
            bundle_dir(Path::new("/sb"), "ns", "c1"),
            PathBuf::from("/sb/state/io.containerd.runtime.v2.task/ns/c1")
        );
    }

    #[test]
    fn variant_names_say_which_way_stats_were_asked() {
        assert_eq!(
            stats_variant_name("io.containerd.runc.v2@1.7", false),
            "io.containerd.runc.v2@1.7 shim"
        );
        assert_eq!(
            stats_variant_name("io.containerd.runc.v2@1.7", true),
            "io.containerd.runc.v2@1.7 containerd"
        );
    }
}

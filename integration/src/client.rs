//! A small client of containerd's API for what `ctr` 1.6/1.7 cannot do: task update, create
//! and checkpoint with explicit runtime options, and event subscription.
//!
//! `ctr` has no `task update`; it sends checkpoint options (and containerd honours image
//! paths) only for runtimes named `io.containerd.runc*`; its `-t` needs a terminal. Tests that
//! need any of that use this client instead.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::snapshots::MountsRequest;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    CheckpointTaskRequest, CreateTaskRequest, DeleteTaskRequest, ExecProcessRequest,
    GetContainerRequest, GetRequest, KillRequest, MetricsRequest, PauseTaskRequest, PublishRequest,
    ResizePtyRequest, ResumeTaskRequest, StartRequest, SubscribeRequest, UpdateTaskRequest,
    WaitRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status, Streaming};
use containerd_client::types::{Descriptor, Envelope, Mount};
use containerd_client::Client;
use prost::Message;
use prost_types::Any;

/// How containerd's Go client types an OCI `Process` (JSON) in an exec.
pub const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// Type URL containerd's Go client gives an OCI `LinuxResources` sent as JSON (typeurl
/// registers runtime-spec types under this path).
pub const LINUX_RESOURCES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

/// Errors of the test client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to containerd at {socket}: {source}")]
    Connect {
        socket: String,
        source: containerd_client::tonic::transport::Error,
    },
    #[error("{call} {id}: {status}")]
    Call {
        call: &'static str,
        id: String,
        status: Box<Status>,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("event stream ended before {0}")]
    StreamEnded(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

impl ClientError {
    /// The gRPC code of a failed call.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Call { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// CRI's runtime options (`runtimeoptions.v1.Options`) and the legacy `containerd.linux.runc`
/// family containerd's Go client sends to runtimes not named `io.containerd.runc*`: the shim's
/// own definitions (no crate ships them).
pub use hyperbox_shim_core::{CriOptions, LegacyCheckpointOptions, LegacyCreateOptions};

/// runc's runtime options (`containerd.runc.v1.Options`) as Docker, nerdctl, CRI and `ctr`
/// encode them, field for field from containerd's `api/types/runc/options/oci.proto`. The
/// shim decodes them with `containerd-shim`'s protos; this encoder is the client's own, so the
/// two are checked against each other.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RuncOptions {
    #[prost(bool, tag = "1")]
    pub no_pivot_root: bool,
    #[prost(bool, tag = "2")]
    pub no_new_keyring: bool,
    #[prost(string, tag = "3")]
    pub shim_cgroup: String,
    #[prost(uint32, tag = "4")]
    pub io_uid: u32,
    #[prost(uint32, tag = "5")]
    pub io_gid: u32,
    #[prost(string, tag = "6")]
    pub binary_name: String,
    #[prost(string, tag = "7")]
    pub root: String,
    /// Removed in containerd 2.0; still sent by 1.x clients.
    #[prost(string, tag = "8")]
    pub criu_path: String,
    #[prost(bool, tag = "9")]
    pub systemd_cgroup: bool,
    #[prost(string, tag = "10")]
    pub criu_image_path: String,
    #[prost(string, tag = "11")]
    pub criu_work_path: String,
    #[prost(string, tag = "12")]
    pub task_api_address: String,
    #[prost(uint32, tag = "13")]
    pub task_api_version: u32,
}

impl prost::Name for RuncOptions {
    const NAME: &'static str = "Options";
    const PACKAGE: &'static str = "containerd.runc.v1";
}

/// runc's checkpoint options (`containerd.runc.v1.CheckpointOptions`) as clients encode them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(string, tag = "8")]
    pub image_path: String,
    #[prost(string, tag = "9")]
    pub work_path: String,
}

impl prost::Name for CheckpointOptions {
    const NAME: &'static str = "CheckpointOptions";
    const PACKAGE: &'static str = "containerd.runc.v1";
}

/// Packs a message as containerd does: the type URL is the bare full name.
pub fn to_any<M: Message + prost::Name>(m: &M) -> Any {
    containerd_client::to_any(m)
}

/// What to create a task with. The rootfs defaults to the container's snapshot mounts.
#[derive(Debug, Clone, Default)]
pub struct CreateTask {
    pub container_id: String,
    /// Explicit rootfs mounts; empty means "the container's snapshot".
    pub rootfs: Vec<Mount>,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// A checkpoint to restore from.
    pub checkpoint: Option<Descriptor>,
    /// Runtime options (for example [`RuncOptions`] through [`to_any`]).
    pub options: Option<Any>,
}

/// The IO of an exec request ([`TestClient::exec_with_io`]).
#[derive(Debug, Clone, Default)]
pub struct ExecIo {
    /// A FIFO (or file) path for stdout; empty for none.
    pub stdout: String,
    /// The request's terminal flag.
    pub terminal: bool,
}

/// A decoded event from containerd's event stream.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: String,
    pub namespace: String,
    pub event: Option<Any>,
}

impl Event {
    /// Decodes the payload as `M` when its type matches.
    pub fn decode<M: Message + Default + prost::Name>(&self) -> Option<M> {
        let any = self.event.as_ref()?;
        let name = M::full_name();
        (any.type_url == name || any.type_url.ends_with(&format!("/{name}")))
            .then(|| M::decode(any.value.as_slice()).ok())
            .flatten()
    }
}

/// A subscription to containerd's events.
#[derive(Debug)]
pub struct EventStream {
    inner: Streaming<Envelope>,
}

impl EventStream {
    /// The next event, or `None` when the stream ends.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        match self.inner.message().await {
            Ok(Some(env)) if env.topic == SYNC_TOPIC => Box::pin(self.next()).await,
            Ok(Some(env)) => Ok(Some(Event {
                topic: env.topic,
                namespace: env.namespace,
                event: env.event,
            })),
            Ok(None) => Ok(None),
            Err(status) => Err(ClientError::Call {
                call: "events",
                id: String::new(),
                status: Box::new(status),
            }),
        }
    }

    /// Collects events until one with `topic` arrives (inclusive) or `limit` passes.
    pub async fn until_topic(
        &mut self,
        topic: &str,
        limit: Duration,
    ) -> Result<Vec<Event>, ClientError> {
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // On a timeout, say what did arrive: which event went missing is the clue.
            let next = tokio::time::timeout_at(deadline, self.next())
                .await
                .map_err(|_| {
                    let arrived: Vec<&str> =
                        seen.iter().map(|e: &Event| e.topic.as_str()).collect();
                    ClientError::Timeout(limit, format!("event {topic} (arrived: {arrived:?})"))
                })??;
            let Some(event) = next else {
                return Err(ClientError::StreamEnded(topic.to_string()));
            };
            let done = event.topic == topic;
            seen.push(event);
            if done {
                return Ok(seen);
            }
        }
    }
}

/// A connection to one containerd namespace.
#[derive(Debug, Clone)]
pub struct TestClient {
    channel: Channel,
    namespace: String,
}

fn call_err(call: &'static str, id: &str) -> impl FnOnce(Status) -> ClientError {
    let id = id.to_string();
    move |status| ClientError::Call {
        call,
        id,
        status: Box::new(status),
    }
}

impl TestClient {
    /// Connects to the daemon at `socket`, working in `namespace`.
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, ClientError> {
        let channel =
            containerd_client::connect(socket)
                .await
                .map_err(|source| ClientError::Connect {
                    socket: socket.display().to_string(),
                    source,
                })?;
        Ok(TestClient {
            channel,
            namespace: namespace.to_string(),
        })
    }

    fn request<T>(&self, body: T) -> Request<T> {
        let mut req = Request::new(body);
        if let Ok(ns) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        req
    }

    fn tasks(&self) -> TasksClient<Channel> {
        TasksClient::new(self.channel.clone())
    }

    /// The raw client, for calls not wrapped here.
    pub fn raw(&self) -> Client {
        Client::from(self.channel.clone())
    }

    /// The namespace this client works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Updates a running task's resources. `resources` is an OCI `LinuxResources` object (as
    /// JSON), sent the way containerd's Go client sends it.
    pub async fn update_task(
        &self,
        id: &str,
        resources: &serde_json::Value,
    ) -> Result<(), ClientError> {
        let value = serde_json::to_vec(resources).map_err(|source| ClientError::Encode {
            what: "LinuxResources",
            source,
        })?;
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(Any {
                type_url: LINUX_RESOURCES_TYPE_URL.to_string(),
                value,
            }),
            annotations: HashMap::new(),
        };
        self.tasks()
            .update(self.request(req))
            .await
            .map_err(call_err("update", id))?;
        Ok(())
    }

    /// Checkpoints a task, with runc-style options when given. Returns the descriptors
    /// containerd stored (none when an image path was given).
    pub async fn checkpoint_task(
        &self,
        id: &str,
        options: Option<&CheckpointOptions>,
    ) -> Result<Vec<Descriptor>, ClientError> {
        let req = CheckpointTaskRequest {
            container_id: id.to_string(),
            parent_checkpoint: String::new(),
            options: options.map(to_any),
        };
        let resp = self
            .tasks()
            .checkpoint(self.request(req))
            .await
            .map_err(call_err("checkpoint", id))?;
        Ok(resp.into_inner().descriptors)
    }

    /// Gives container `id`'s record runtime options (`Container.runtime.options`), as
    /// containerd's CRI does when it creates a container. containerd 2.x passes them to the
    /// shim's Create when the task request carries no options of its own (its tasks service
    /// refuses task options of any type but `containerd.runc.v1.Options`). containerd does
    /// not let a container's runtime change, so the record is made again with the options:
    /// deleted and created under a lease that keeps its snapshot meanwhile.
    pub async fn set_runtime_options(&self, id: &str, options: Any) -> Result<(), ClientError> {
        use containerd_client::services::v1::{
            AddResourceRequest, CreateContainerRequest, DeleteContainerRequest,
            GetContainerRequest, Resource,
        };
        let got = self
            .raw()
            .containers()
            .get(self.request(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(call_err("get container", id))?;
        let mut container = got
            .into_inner()
            .container
            .ok_or_else(|| ClientError::Call {
                call: "get container",
                id: id.to_string(),
                status: Box::new(Status::not_found("no container in the reply")),
            })?;
        let lease = format!("runtime-options-{id}");
        self.create_lease(&lease).await?;
        let kept = AddResourceRequest {
            id: lease.clone(),
            resource: Some(Resource {
                id: container.snapshot_key.clone(),
                r#type: format!("snapshots/{}", container.snapshotter),
            }),
        };
        self.raw()
            .leases()
            .add_resource(self.request(kept))
            .await
            .map_err(call_err("keep the snapshot of", id))?;
        self.raw()
            .containers()
            .delete(self.request(DeleteContainerRequest { id: id.to_string() }))
            .await
            .map_err(call_err("delete container", id))?;
        container
            .runtime
            .get_or_insert_with(Default::default)
            .options = Some(options);
        container.created_at = None;
        container.updated_at = None;
        self.raw()
            .containers()
            .create(self.request(CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(call_err("create container", id))?;
        self.delete_lease(&lease).await
    }

    /// Creates lease `lease`: what containerd writes under it is kept until it is deleted.
    pub async fn create_lease(&self, lease: &str) -> Result<(), ClientError> {
        let req = containerd_client::services::v1::CreateRequest {
            id: lease.to_string(),
            labels: HashMap::new(),
        };
        self.raw()
            .leases()
            .create(self.request(req))
            .await
            .map_err(call_err("create lease", lease))?;
        Ok(())
    }

    /// Deletes lease `lease` and, with it, what only it kept.
    pub async fn delete_lease(&self, lease: &str) -> Result<(), ClientError> {
        let req = containerd_client::services::v1::DeleteRequest {
            id: lease.to_string(),
            sync: true,
        };
        self.raw()
            .leases()
            .delete(self.request(req))
            .await
            .map_err(call_err("delete lease", lease))?;
        Ok(())
    }

    /// As [`TestClient::checkpoint_task`], under lease `lease`: the checkpoint containerd
    /// stores is kept for a later restore (without a lease, nothing refers to it and
    /// containerd's garbage collector removes it).
    pub async fn checkpoint_task_leased(
        &self,
        id: &str,
        options: Option<&CheckpointOptions>,
        lease: &str,
    ) -> Result<Vec<Descriptor>, ClientError> {
        let req = CheckpointTaskRequest {
            container_id: id.to_string(),
            parent_checkpoint: String::new(),
            options: options.map(to_any),
        };
        let mut req = self.request(req);
        if let Ok(value) = lease.parse() {
            req.metadata_mut().insert("containerd-lease", value);
        }
        let resp = self
            .tasks()
            .checkpoint(req)
            .await
            .map_err(call_err("checkpoint", id))?;
        Ok(resp.into_inner().descriptors)
    }

    /// The mounts of a snapshot.
    pub async fn snapshot_mounts(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Vec<Mount>, ClientError> {
        let req = MountsRequest {
            snapshotter: snapshotter.to_string(),
            key: key.to_string(),
        };
        let resp = self
            .raw()
            .snapshots()
            .mounts(self.request(req))
            .await
            .map_err(call_err("snapshot mounts", key))?;
        Ok(resp.into_inner().mounts)
    }

    /// Creates a task with explicit stdio, runtime options and optional checkpoint. Without
    /// explicit rootfs mounts, the container's own snapshot is mounted, as `ctr` does.
    pub async fn create_task(&self, task: CreateTask) -> Result<u32, ClientError> {
        let id = task.container_id.clone();
        let mut rootfs = task.rootfs;
        if rootfs.is_empty() {
            let container = self
                .raw()
                .containers()
                .get(self.request(GetContainerRequest { id: id.clone() }))
                .await
                .map_err(call_err("get container", &id))?
                .into_inner()
                .container
                .unwrap_or_default();
            if !container.snapshot_key.is_empty() {
                rootfs = self
                    .snapshot_mounts(&container.snapshotter, &container.snapshot_key)
                    .await?;
            }
        }
        let req = CreateTaskRequest {
            container_id: id.clone(),
            rootfs,
            stdin: task.stdin,
            stdout: task.stdout,
            stderr: task.stderr,
            terminal: task.terminal,
            checkpoint: task.checkpoint,
            options: task.options,
            runtime_path: String::new(),
        };
        let resp = self
            .tasks()
            .create(self.request(req))
            .await
            .map_err(call_err("create", &id))?;
        Ok(resp.into_inner().pid)
    }

    /// Starts a task (or, with `exec_id`, an exec'd process).
    pub async fn start(&self, id: &str, exec_id: &str) -> Result<u32, ClientError> {
        let req = StartRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let resp = self
            .tasks()
            .start(self.request(req))
            .await
            .map_err(call_err("start", id))?;
        Ok(resp.into_inner().pid)
    }

    /// Waits for a task (or exec) to exit and returns its exit status.
    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<u32, ClientError> {
        let req = WaitRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        };
        let resp = self
            .tasks()
            .wait(self.request(req))
            .await
            .map_err(call_err("wait", id))?;
        Ok(resp.into_inner().exit_status)
    }

    /// Sends `signal` to a task's process (or to all its processes).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), ClientError> {
        let req = KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal,
            all,
        };
        self.tasks()
            .kill(self.request(req))
            .await
            .map_err(call_err("kill", id))?;
        Ok(())
    }

    /// Adds an exec'd process to a running task (started with [`TestClient::start`]).
    /// `process` is an OCI `Process` object; no stdio.
    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
    ) -> Result<(), ClientError> {
        self.exec_with_io(id, exec_id, process, &ExecIo::default())
            .await
    }

    /// [`TestClient::exec`] with the request's IO: a stdout path and the terminal flag, sent
    /// as given (whatever `process` says of a terminal).
    pub async fn exec_with_io(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        io: &ExecIo,
    ) -> Result<(), ClientError> {
        let value = serde_json::to_vec(process).map_err(|source| ClientError::Encode {
            what: "Process",
            source,
        })?;
        let req = ExecProcessRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            spec: Some(Any {
                type_url: PROCESS_TYPE_URL.to_string(),
                value,
            }),
            stdout: io.stdout.clone(),
            terminal: io.terminal,
            ..Default::default()
        };
        self.tasks()
            .exec(self.request(req))
            .await
            .map_err(call_err("exec", id))?;
        Ok(())
    }

    /// Sends a signal to one exec'd process.
    pub async fn kill_exec(&self, id: &str, exec_id: &str, signal: u32) -> Result<(), ClientError> {
        let req = KillRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            signal,
            all: false,
        };
        self.tasks()
            .kill(self.request(req))
            .await
            .map_err(call_err("kill", id))?;
        Ok(())
    }

    /// Resizes the terminal of a task (or exec'd process).
    pub async fn resize(
        &self,
        id: &str,
        exec_id: &str,
        width: u32,
        height: u32,
    ) -> Result<(), ClientError> {
        let req = ResizePtyRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            width,
            height,
        };
        self.tasks()
            .resize_pty(self.request(req))
            .await
            .map_err(call_err("resize", id))?;
        Ok(())
    }

    /// Pauses (freezes) a task.
    pub async fn pause(&self, id: &str) -> Result<(), ClientError> {
        let req = PauseTaskRequest {
            container_id: id.to_string(),
        };
        self.tasks()
            .pause(self.request(req))
            .await
            .map_err(call_err("pause", id))?;
        Ok(())
    }

    /// Resumes a paused task.
    pub async fn resume(&self, id: &str) -> Result<(), ClientError> {
        let req = ResumeTaskRequest {
            container_id: id.to_string(),
        };
        self.tasks()
            .resume(self.request(req))
            .await
            .map_err(call_err("resume", id))?;
        Ok(())
    }

    /// A task's metrics as containerd returns them: the type URL and the encoded message.
    pub async fn metrics(&self, id: &str) -> Result<Any, ClientError> {
        let req = MetricsRequest {
            filters: vec![format!("id=={id}")],
        };
        let resp = self
            .tasks()
            .metrics(self.request(req))
            .await
            .map_err(call_err("metrics", id))?;
        resp.into_inner()
            .metrics
            .into_iter()
            .next()
            .and_then(|m| m.data)
            .ok_or_else(|| ClientError::StreamEnded(format!("no metrics for task {id}")))
    }

    /// Deletes a stopped task and returns its exit status.
    pub async fn delete_task(&self, id: &str) -> Result<u32, ClientError> {
        let req = DeleteTaskRequest {
            container_id: id.to_string(),
        };
        let resp = self
            .tasks()
            .delete(self.request(req))
            .await
            .map_err(call_err("delete", id))?;
        Ok(resp.into_inner().exit_status)
    }

    /// The task's status (`containerd.v1.types.Status` as a number) and pid.
    pub async fn task_status(&self, id: &str) -> Result<(i32, u32), ClientError> {
        let req = GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        };
        let resp = self
            .tasks()
            .get(self.request(req))
            .await
            .map_err(call_err("get", id))?;
        let p = resp.into_inner().process.unwrap_or_default();
        Ok((p.status, p.pid))
    }

    /// Subscribes to events of this namespace matching any of the containerd filter
    /// expressions (for example `topic~="/tasks/"`; none means every event), and returns once
    /// the subscription is live, so no event published after this returns is missed.
    ///
    /// containerd sends a stream's headers only with its first event, so the call would block
    /// until something happens; the client therefore publishes a sync event of its own
    /// (topic [`SYNC_TOPIC`]) until it comes back through the stream, then drops it.
    pub async fn subscribe(&self, filters: &[&str]) -> Result<EventStream, ClientError> {
        let ns = &self.namespace;
        let mut all: Vec<String> = if filters.is_empty() {
            vec![format!("namespace=={ns}")]
        } else {
            // Filters in the list are alternatives; a comma joins conditions.
            filters
                .iter()
                .map(|f| format!("namespace=={ns},{f}"))
                .collect()
        };
        all.push(format!("namespace=={ns},topic==\"{SYNC_TOPIC}\""));
        let mut events = EventsClient::new(self.channel.clone());
        let subscribe = events.subscribe(Request::new(SubscribeRequest { filters: all }));
        tokio::pin!(subscribe);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut inner = loop {
            self.publish_sync().await?;
            match tokio::time::timeout(Duration::from_millis(100), &mut subscribe).await {
                Ok(resp) => break resp.map_err(call_err("subscribe", ""))?.into_inner(),
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Err(_) => {
                    return Err(ClientError::Timeout(
                        Duration::from_secs(10),
                        "the event subscription".into(),
                    ))
                }
            }
        };
        // Skip our sync events up to the first one; later ones are filtered in `next`.
        loop {
            match inner.message().await.map_err(call_err("events", ""))? {
                Some(env) if env.topic == SYNC_TOPIC => break,
                Some(_) => continue,
                None => return Err(ClientError::StreamEnded("the sync event".into())),
            }
        }
        Ok(EventStream { inner })
    }

    async fn publish_sync(&self) -> Result<(), ClientError> {
        let req = PublishRequest {
            topic: SYNC_TOPIC.to_string(),
            event: Some(Any {
                type_url: "google.protobuf.Empty".into(),
                value: Vec::new(),
            }),
        };
        EventsClient::new(self.channel.clone())
            .publish(self.request(req))
            .await
            .map_err(call_err("publish", SYNC_TOPIC))?;
        Ok(())
    }
}

/// The task events containerd publishes, in order, for a container run to completion and
/// deleted (`ctr run --rm`), as the runc shim produces them.
pub const TASK_LIFECYCLE_TOPICS: [&str; 4] = [
    "/tasks/create",
    "/tasks/start",
    "/tasks/exit",
    "/tasks/delete",
];

/// Topic of the events the client publishes to learn that its subscription is live.
pub const SYNC_TOPIC: &str = "/hyperbox-test/sync";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_use_containerd_type_urls() {
        let any = to_any(&RuncOptions {
            root: "/x".into(),
            ..Default::default()
        });
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        let back = RuncOptions::decode(any.value.as_slice()).unwrap();
        assert_eq!(back.root, "/x");
        let any = to_any(&CheckpointOptions::default());
        assert_eq!(any.type_url, "containerd.runc.v1.CheckpointOptions");
    }

    #[test]
    fn checkpoint_options_wire_format_matches_the_proto() {
        // image_path is field 8 (string): tag byte (8 << 3 | 2) = 0x42.
        let bytes = CheckpointOptions {
            image_path: "/i".into(),
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(bytes, vec![0x42, 2, b'/', b'i']);
        // systemd_cgroup is field 9 (bool): tag byte 9 << 3 = 0x48.
        let bytes = RuncOptions {
            systemd_cgroup: true,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(bytes, vec![0x48, 1]);
    }

    /// What this client encodes, the shim (with `containerd-shim`'s protos) decodes to the
    /// same values; a 1.x client's `criu_path` is seen and refused.
    #[test]
    fn the_shim_decodes_what_the_client_encodes() {
        use containerd_shim::protos::protobuf::well_known_types::any::Any as ShimAny;
        let shim_any = |a: Any| {
            let mut any = ShimAny::new();
            any.type_url = a.type_url;
            any.value = a.value;
            any
        };
        let o = RuncOptions {
            root: "/run/r".into(),
            io_uid: 1000,
            io_gid: 1001,
            criu_image_path: "/img".into(),
            criu_work_path: "/work".into(),
            no_pivot_root: true,
            ..Default::default()
        };
        let got =
            hyperbox_shim_core::RuntimeOptions::from_any(Some(&shim_any(to_any(&o)))).unwrap();
        assert_eq!(
            got.state_root.as_deref(),
            Some(std::path::Path::new("/run/r"))
        );
        assert_eq!(
            got.io_owner,
            Some(hyperbox_shim_core::IoOwner {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(
            got.criu_image_path.as_deref(),
            Some(std::path::Path::new("/img"))
        );
        assert_eq!(
            got.criu_work_path.as_deref(),
            Some(std::path::Path::new("/work"))
        );
        assert!(got.no_pivot_root);
        let refused = RuncOptions {
            criu_path: "/usr/sbin/criu".into(),
            ..Default::default()
        };
        let e = hyperbox_shim_core::RuntimeOptions::from_any(Some(&shim_any(to_any(&refused))))
            .unwrap_err();
        assert!(e.to_string().contains("criu_path (/usr/sbin/criu)"), "{e}");
        let c = CheckpointOptions {
            exit: true,
            open_tcp: true,
            file_locks: true,
            empty_namespaces: vec!["network".into()],
            cgroups_mode: "soft".into(),
            image_path: "/i".into(),
            work_path: "/w".into(),
            ..Default::default()
        };
        let got = hyperbox_shim_core::checkpoint_options(Some(&shim_any(to_any(&c)))).unwrap();
        assert!(got.exit && got.open_tcp && got.file_locks && !got.terminal);
        assert_eq!(got.empty_namespaces, ["network"]);
        assert_eq!(
            (
                got.cgroups_mode.as_str(),
                got.image_path.as_str(),
                got.work_path.as_str()
            ),
            ("soft", "/i", "/w")
        );
    }
}

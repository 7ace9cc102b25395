//! Where the service's events go: containerd's event service in a shim, a channel in the
//! service's unit tests.

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;

/// The receiver of the task events (TaskCreate, TaskStart, TaskExit, ...) the service emits,
/// in the order it emits them. A failure to deliver is the sink's to report: the service goes
/// on, as runc's shim does.
#[async_trait]
pub trait Events: Send + Sync + 'static {
    /// Sends `event` under `topic` (one of `containerd_shim::protos::topics`).
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// containerd's event service, reached through the publisher the shim was given.
pub struct Containerd {
    pub publisher: RemotePublisher,
    /// The containerd namespace the events are published in.
    pub namespace: String,
}

#[async_trait]
impl Events for Containerd {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self
            .publisher
            .publish(Context::default(), topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, "cannot publish event: {e}");
        }
    }
}

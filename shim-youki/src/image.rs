//! The image of a container, asked of containerd (its gRPC API, at the `-address` containerd
//! starts shims with): what a template records and a restore from it must match. Asked in the
//! shim, never in the zygote, which must stay single-threaded.

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetContainerRequest, GetImageRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::with_namespace;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

/// An image by name and by the digest of its manifest (or index), as containerd has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub digest: String,
}

/// A connection to containerd's gRPC API, in one namespace, made when first needed: the one
/// client both shims use (this one for a container's image, the wasm shim for its content).
#[derive(Debug)]
pub struct Containerd {
    address: String,
    namespace: String,
    channel: OnceCell<Channel>,
}

impl Containerd {
    /// A client of containerd at `address` (`unix://PATH` or a path), for `namespace`; `None`
    /// when the shim was given no address.
    pub fn new(address: &str, namespace: &str) -> Option<Self> {
        (!address.is_empty()).then(|| Containerd {
            address: address.to_string(),
            namespace: namespace.to_string(),
            channel: OnceCell::new(),
        })
    }

    /// The namespace its requests are made in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The address it connects to, for messages.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The connection, made on first use and kept.
    pub async fn channel(&self) -> Result<Channel, String> {
        self.channel
            .get_or_try_init(|| async {
                containerd_client::connect(self.address.trim_start_matches("unix://"))
                    .await
                    .map_err(|e| format!("cannot connect to containerd at {}: {e:?}", self.address))
            })
            .await
            .cloned()
    }
}

/// Lookups of containers' images in one containerd namespace.
#[derive(Debug)]
pub struct Images {
    containerd: Containerd,
}

impl Images {
    pub fn new(containerd: Containerd) -> Self {
        Images { containerd }
    }

    /// Container `id`'s image; `None` when it was made without one or the image is gone.
    pub async fn of(&self, id: &str) -> Result<Option<ImageRef>, String> {
        let channel = self.containerd.channel().await?;
        let namespace = self.containerd.namespace();
        let req = GetContainerRequest { id: id.to_string() };
        let container = ContainersClient::new(channel.clone())
            .get(with_namespace!(req, namespace))
            .await
            .map_err(|s| format!("cannot get container {id} from containerd: {s}"))?
            .into_inner()
            .container;
        let Some(name) = container.map(|c| c.image).filter(|i| !i.is_empty()) else {
            return Ok(None);
        };
        let req = GetImageRequest { name: name.clone() };
        match ImagesClient::new(channel)
            .get(with_namespace!(req, namespace))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| ImageRef {
                    name,
                    digest: t.digest,
                })),
            Err(s) if s.code() == containerd_client::tonic::Code::NotFound => Ok(None),
            Err(s) => Err(format!("cannot get image {name} from containerd: {s}")),
        }
    }
}

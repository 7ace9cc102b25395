//! The EROFS differ: containerd's diff API (`containerd.services.diff.v1.Diff`), served on a
//! socket of its own for containerd 2.x's `type = "diff"` proxy plugin.
//!
//! `Apply` of a layer into one of this snapshotter's unpack snapshots reads the layer blob
//! from containerd's content store, decompresses it, and writes the layer's EROFS image
//! straight from the archive ([`hyperbox_erofs::commit_layer_from_tar`]): no directory is
//! written, and Commit finds the layer already converted. The answer is what containerd's
//! walking differ answers: the uncompressed archive's descriptor (its digest is the layer's
//! diff ID, which containerd checks against the image's config).
//!
//! Everything else is handed to containerd's own diff service, request as it came (the
//! namespace with it), so the user sees what containerd alone would do:
//! - mounts that are not an unpack snapshot of this snapshotter;
//! - a blob that is neither a plain nor a gzip tar (zstd, encrypted), or stream processors;
//! - an archive the image cannot be made from exactly (an entry whose parent directory the
//!   archive lacks, a `..` path: see `write_image_from_tar`), or any other failure of the
//!   direct path, which leaves the snapshot as it was. That layer is unpacked on disk by the
//!   walking differ and converted after its Commit, as without the differ.
//!
//! containerd's diff service should not list this differ itself (its `default` list of
//! `io.containerd.service.v1.diff-service`): a handed-over request would come back. One that
//! does is answered Unimplemented, which sends the service on to its next differ.

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::{
    ApplyRequest, ApplyResponse, DiffRequest, DiffResponse, ReadContentRequest,
};
use containerd_client::tonic::{self, codegen::http, Request, Response, Status};
use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc::{self, Receiver};
use tracing::{info, warn};

use crate::service::HyperboxSnapshotter;

/// The gRPC service name containerd's proxy calls.
const SERVICE: &str = "containerd.services.diff.v1.Diff";
/// The header carrying containerd's namespace.
const NAMESPACE_HEADER: &str = "containerd-namespace";
/// What Apply answers for the unpacked archive, as containerd's walking differ does.
const TAR_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// The differ: this snapshotter's layers, and containerd for what it hands over.
#[derive(Debug, Clone)]
pub struct Differ {
    snapshotter: HyperboxSnapshotter,
    containerd: Arc<PathBuf>,
    /// Applies being handed to containerd's diff service, by blob and mounts. One that
    /// comes back while it is (containerd's diff service lists this differ in its `default`
    /// list, against the advice) is answered Unimplemented, which sends the service on to
    /// its next differ instead of round in a loop.
    handing_over: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// Removes an Apply from [`Differ::handing_over`] when the hand-over ends.
struct HandingOver {
    set: Arc<std::sync::Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for HandingOver {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// What identifies an Apply: the blob and where it goes.
fn apply_key(req: &ApplyRequest) -> String {
    let digest = req.diff.as_ref().map_or("", |d| d.digest.as_str());
    let mounts: Vec<String> = req
        .mounts
        .iter()
        .map(|m| format!("{} {} {}", m.r#type, m.source, m.options.join(",")))
        .collect();
    format!("{digest} {}", mounts.join(" | "))
}

/// How a blob is compressed, told by its first bytes as containerd tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    /// zstd or anything else this differ does not read: handed over.
    Other,
}

fn sniff(head: &[u8]) -> Compression {
    match head {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] | [0x42, 0x5a, 0x68, ..] | [0xfd, b'7', b'z', b'X', ..] => {
            Compression::Other
        }
        _ => Compression::None,
    }
}

/// Whether `media_type` names a layer this differ may read (not encrypted, no other
/// processor): OCI and Docker layer types, plain or gzip.
fn readable_layer_type(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    )
}

/// Reads what an async task sends: the blob's bytes as containerd streams them.
struct ChannelReader {
    rx: Receiver<Result<Vec<u8>, String>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(Ok(data)) => {
                    self.buf = data;
                    self.at = 0;
                }
                Some(Err(e)) => return Err(io::Error::other(e)),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Counts and digests what is read through it: the uncompressed archive's size and diff ID.
struct Digesting<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(out)?;
        self.hash.update(&out[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl Differ {
    pub fn new(snapshotter: HyperboxSnapshotter, containerd: PathBuf) -> Differ {
        Differ {
            snapshotter,
            containerd: Arc::new(containerd),
            handing_over: Arc::default(),
        }
    }

    /// The unpack snapshot `mounts` are for, if they are one of this snapshotter's: a bind
    /// of its plain dir (no parent) or an overlay with it as the upper dir.
    fn snapshot_of(&self, mounts: &[containerd_client::types::Mount]) -> Option<u64> {
        let [m] = mounts else { return None };
        let dir = match m.r#type.as_str() {
            "bind" => m.source.clone(),
            "overlay" => m
                .options
                .iter()
                .find_map(|o| o.strip_prefix("upperdir="))?
                .to_string(),
            _ => return None,
        };
        self.snapshotter.snapshot_of_dir(Path::new(&dir))
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, Status> {
        containerd_client::connect(self.containerd.as_path())
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "cannot connect to containerd at {}: {e}",
                    self.containerd.display()
                ))
            })
    }

    /// Hands `req` to containerd's own diff service.
    async fn hand_over(
        &self,
        namespace: Option<String>,
        req: ApplyRequest,
    ) -> Result<Response<ApplyResponse>, Status> {
        let key = apply_key(&req);
        self.handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        let _done = HandingOver {
            set: self.handing_over.clone(),
            key,
        };
        let mut forwarded = Request::new(req);
        if let Some(ns) = namespace.and_then(|n| n.parse().ok()) {
            forwarded.metadata_mut().insert(NAMESPACE_HEADER, ns);
        }
        DiffClient::new(self.channel().await?)
            .apply(forwarded)
            .await
    }

    async fn apply(
        &self,
        request: Request<ApplyRequest>,
    ) -> Result<Response<ApplyResponse>, Status> {
        let namespace = request
            .metadata()
            .get(NAMESPACE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let req = request.into_inner();
        let Some(desc) = req.diff.clone() else {
            return Err(Status::invalid_argument("Apply without a descriptor"));
        };
        if self
            .handing_over
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&apply_key(&req))
        {
            return Err(Status::unimplemented(
                "hyperbox's differ handed this layer to containerd's diff service, which asked \
                 it back: that service's `default` list must not name hyperbox's differ",
            ));
        }
        let id = match self.snapshot_of(&req.mounts) {
            Some(id) if req.payloads.is_empty() && readable_layer_type(&desc.media_type) => id,
            _ => return self.hand_over(namespace, req).await,
        };
        match self.unpack(namespace.clone(), &desc, id).await {
            Ok(applied) => Ok(Response::new(ApplyResponse {
                applied: Some(applied),
            })),
            Err(why) => {
                warn!(digest = desc.digest, id, %why, "the differ hands the layer to containerd's diff service");
                self.hand_over(namespace, req).await
            }
        }
    }

    /// Streams the blob `desc` from containerd into snapshot `id`'s EROFS image.
    async fn unpack(
        &self,
        namespace: Option<String>,
        desc: &Descriptor,
        id: u64,
    ) -> Result<Descriptor, String> {
        let started = std::time::Instant::now();
        let mut read = Request::new(ReadContentRequest {
            digest: desc.digest.clone(),
            offset: 0,
            size: 0,
        });
        if let Some(ns) = namespace.as_deref().and_then(|n| n.parse().ok()) {
            read.metadata_mut().insert(NAMESPACE_HEADER, ns);
        }
        let conn = self.channel().await.map_err(|s| s.message().to_string())?;
        let mut stream = ContentClient::new(conn)
            .read(read)
            .await
            .map_err(|s| format!("cannot read the blob: {}", s.message()))?
            .into_inner();
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, String>>(16);
        let snapshotter = self.snapshotter.clone();
        let shown = PathBuf::from(&desc.digest);
        let work = tokio::task::spawn_blocking(move || -> Result<(String, u64), String> {
            let mut blob = ChannelReader {
                rx,
                buf: Vec::new(),
                at: 0,
            };
            let mut head = [0u8; 6];
            let mut got = 0;
            while got < head.len() {
                match blob.read(&mut head[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) => return Err(format!("cannot read the blob: {e}")),
                }
            }
            let compression = sniff(&head[..got]);
            let whole = io::Cursor::new(head[..got].to_vec()).chain(blob);
            let raw: Box<dyn Read> = match compression {
                Compression::None => Box::new(whole),
                Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
                Compression::Other => return Err("a compression this differ does not read".into()),
            };
            let mut tar = Digesting {
                inner: raw,
                hash: Sha256::new(),
                bytes: 0,
            };
            // Reads the archive to its very end (the diff ID covers the end-of-archive blocks
            // and any padding after them) before the layer is switched to its image.
            snapshotter
                .unpack_archive(id, &mut tar, &shown)
                .map_err(|e| e.to_string())?;
            Ok((hex::encode(tar.hash.finalize()), tar.bytes))
        });
        // Feed the blob to the blocking side until it ends or the side stops reading.
        loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    if tx.send(Ok(msg.data)).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    let _ = tx
                        .send(Err(format!("reading the blob failed: {}", s.message())))
                        .await;
                    break;
                }
            }
        }
        drop(tx);
        let outcome = work
            .await
            .map_err(|e| format!("the unpack task failed: {e}"))?;
        let (digest, size) = outcome?;
        info!(
            blob = desc.digest,
            id,
            diff_id = %format!("sha256:{digest}"),
            bytes = size,
            millis = started.elapsed().as_millis() as u64,
            "layer unpacked by the differ"
        );
        Ok(Descriptor {
            media_type: TAR_MEDIA_TYPE.to_string(),
            digest: format!("sha256:{digest}"),
            size: size as i64,
            annotations: Default::default(),
        })
    }

    async fn diff(&self, request: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        let namespace = request.metadata().get(NAMESPACE_HEADER).cloned();
        let mut forwarded = Request::new(request.into_inner());
        if let Some(ns) = namespace {
            forwarded.metadata_mut().insert(NAMESPACE_HEADER, ns);
        }
        DiffClient::new(self.channel().await?).diff(forwarded).await
    }
}

/// The diff service as tonic serves it (containerd-client's generated code is client-only).
#[derive(Debug, Clone)]
pub struct DiffServer(Arc<Differ>);

impl DiffServer {
    pub fn new(differ: Differ) -> DiffServer {
        DiffServer(Arc::new(differ))
    }
}

impl tonic::server::NamedService for DiffServer {
    const NAME: &'static str = SERVICE;
}

struct ApplySvc(Arc<Differ>);

impl tonic::server::UnaryService<ApplyRequest> for ApplySvc {
    type Response = ApplyResponse;
    type Future = tonic::codegen::BoxFuture<Response<ApplyResponse>, Status>;
    fn call(&mut self, request: Request<ApplyRequest>) -> Self::Future {
        let differ = self.0.clone();
        Box::pin(async move { differ.apply(request).await })
    }
}

struct DiffSvc(Arc<Differ>);

impl tonic::server::UnaryService<DiffRequest> for DiffSvc {
    type Response = DiffResponse;
    type Future = tonic::codegen::BoxFuture<Response<DiffResponse>, Status>;
    fn call(&mut self, request: Request<DiffRequest>) -> Self::Future {
        let differ = self.0.clone();
        Box::pin(async move { differ.diff(request).await })
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for DiffServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let differ = self.0.clone();
        match req.uri().path() {
            "/containerd.services.diff.v1.Diff/Apply" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(ApplySvc(differ), req).await)
            }),
            "/containerd.services.diff.v1.Diff/Diff" => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(DiffSvc(differ), req).await)
            }),
            _ => Box::pin(async move {
                Ok(Status::unimplemented("no such method of the diff service").into_http())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_is_told_by_the_first_bytes() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8, 0]), Compression::Gzip);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Compression::Other);
        assert_eq!(sniff(b"etc/\0\0"), Compression::None);
        assert_eq!(sniff(b""), Compression::None);
        assert!(readable_layer_type(
            "application/vnd.oci.image.layer.v1.tar+gzip"
        ));
        assert!(!readable_layer_type(
            "application/vnd.oci.image.layer.v1.tar+zstd"
        ));
        assert!(!readable_layer_type(
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
        ));
    }

    #[test]
    fn the_channel_reader_reads_what_was_sent_then_ends() {
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Ok(b"abc".to_vec())).unwrap();
        tx.try_send(Ok(Vec::new())).unwrap();
        tx.try_send(Ok(b"defgh".to_vec())).unwrap();
        drop(tx);
        let mut r = ChannelReader {
            rx,
            buf: Vec::new(),
            at: 0,
        };
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abcdefgh");
        let (tx, rx) = mpsc::channel(1);
        tx.try_send(Err("broken".to_string())).unwrap();
        let mut r = ChannelReader {
            rx,
            buf: Vec::new(),
            at: 0,
        };
        assert!(r.read(&mut [0; 4]).is_err());
    }
}

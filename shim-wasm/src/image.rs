//! OCI wasm images in runwasi's format: an image whose configuration says
//! `architecture: wasm`, with a layer of media type `application/wasm` or
//! `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm` that is the guest itself
//! (not a tar). containerd (1.7.7 on) pulls such images into its content store; the shim
//! asks it, at Create, for the container's image and reads the layer from there.
//!
//! The lookup runs in the shim (async, on containerd's API), the compiling in the zygote,
//! which must stay single-threaded and so makes no gRPC calls: the layer reaches it through
//! the bundle ([`Handoff`]), which the zygote reads and removes.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetContainerRequest, GetImageRequest, ReadContentRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::with_namespace;
use oci_spec::image::{Arch, Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use hyperbox_shim_youki::Containerd;

use crate::cache::sha256_hex;

/// Layer media types that hold a WebAssembly binary (module or component), as runwasi's.
pub const WASM_LAYER_TYPES: [&str; 2] = [
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
    "application/wasm",
];

const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// Errors finding a container's image guest.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// `message` names the address and why (from the shim's containerd client).
    #[error("{message}")]
    Connect { address: String, message: String },
    #[error("cannot get {what} from containerd: {status}")]
    Call { what: String, status: Box<Status> },
    #[error(
        "{kind} {digest} of image {image} is not a valid OCI {kind}: {source}: remove the image \
         and pull a valid one"
    )]
    Decode {
        kind: &'static str,
        digest: String,
        image: String,
        source: serde_json::Error,
    },
    #[error(
        "image {image} is a wasm image (architecture wasm) without a WebAssembly layer: \
         expected one layer of media type {}",
        WASM_LAYER_TYPES.join(" or ")
    )]
    NoWasmLayer { image: String },
    #[error(
        "image {image} has {count} WebAssembly layers: this runtime runs an image with exactly one"
    )]
    ManyWasmLayers { image: String, count: usize },
    #[error(
        "layer {digest} of image {image} is corrupt in containerd's content store (it reads as \
         {size} bytes with digest sha256:{actual}): remove the image and pull it again"
    )]
    Corrupt {
        image: String,
        digest: String,
        size: usize,
        actual: String,
    },
    #[error("layer {digest} of image {image} ({media_type}) is not a WebAssembly binary")]
    NotWasm {
        image: String,
        digest: String,
        media_type: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Handoff {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ImageError {
    /// True when the image itself is unusable (as opposed to containerd being unreachable).
    pub fn is_bad_image(&self) -> bool {
        !matches!(
            self,
            ImageError::Connect { .. } | ImageError::Call { .. } | ImageError::Handoff { .. }
        )
    }
}

/// A container's guest taken from its image's wasm layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageLayer {
    /// The image's name (`registry/repo:tag`).
    pub image: String,
    /// The layer's digest, `sha256:HEX`: verified against its content, and the compile
    /// cache's key.
    pub digest: String,
    pub media_type: String,
}

impl ImageLayer {
    /// How messages name the guest.
    pub fn name(&self) -> String {
        format!("layer {} of image {}", self.digest, self.image)
    }

    /// The digest's hex part.
    pub fn digest_hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// What the shim hands the zygote in the bundle: `wasm-image.json` (the [`ImageLayer`])
/// and `wasm-image.wasm` (its bytes). The zygote reads and removes both.
#[derive(Debug)]
pub struct Handoff;

impl Handoff {
    const LAYER: &'static str = "wasm-image.json";
    const WASM: &'static str = "wasm-image.wasm";

    /// Writes the handoff into `bundle` (the wasm first: the json marks it complete).
    pub fn write(bundle: &Path, layer: &ImageLayer, wasm: &[u8]) -> Result<(), ImageError> {
        let err = |action, path: PathBuf| {
            move |source| ImageError::Handoff {
                action,
                path,
                source,
            }
        };
        let wasm_path = bundle.join(Self::WASM);
        fs::write(&wasm_path, wasm).map_err(err("write", wasm_path))?;
        let json = serde_json::to_vec(layer).map_err(std::io::Error::from);
        let layer_path = bundle.join(Self::LAYER);
        json.and_then(|j| fs::write(&layer_path, j))
            .map_err(err("write", layer_path))
    }

    /// Takes the handoff out of `bundle`: `None` when the container has no image guest.
    pub fn take(bundle: &Path) -> Result<Option<(ImageLayer, Vec<u8>)>, ImageError> {
        let layer_path = bundle.join(Self::LAYER);
        let json = match fs::read(&layer_path) {
            Ok(j) => j,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ImageError::Handoff {
                    action: "read",
                    path: layer_path,
                    source,
                })
            }
        };
        let layer: ImageLayer = serde_json::from_slice(&json).map_err(|e| ImageError::Handoff {
            action: "decode",
            path: layer_path.clone(),
            source: e.into(),
        })?;
        let wasm_path = bundle.join(Self::WASM);
        let wasm = fs::read(&wasm_path).map_err(|source| ImageError::Handoff {
            action: "read",
            path: wasm_path.clone(),
            source,
        })?;
        let _ = fs::remove_file(&wasm_path);
        let _ = fs::remove_file(&layer_path);
        Ok(Some((layer, wasm)))
    }
}

/// containerd's content and image services, as the shim reaches them (`-address`, in the
/// shim's namespace), through the youki shim's client.
#[derive(Debug)]
pub struct ContentStore {
    containerd: Containerd,
}

impl ContentStore {
    pub fn new(containerd: Containerd) -> Self {
        ContentStore { containerd }
    }

    async fn channel(&self) -> Result<Channel, ImageError> {
        self.containerd
            .channel()
            .await
            .map_err(|message| ImageError::Connect {
                address: self.containerd.address().to_string(),
                message,
            })
    }

    /// The whole blob `digest`.
    async fn read(&self, digest: &str, what: &str) -> Result<Vec<u8>, ImageError> {
        let call = |status| ImageError::Call {
            what: format!("{what} {digest}"),
            status: Box::new(status),
        };
        let req = ReadContentRequest {
            digest: digest.to_string(),
            ..Default::default()
        };
        let mut stream = ContentClient::new(self.channel().await?)
            .read(with_namespace!(req, self.containerd.namespace()))
            .await
            .map_err(call)?
            .into_inner();
        let mut data = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(call)? {
            data.extend_from_slice(&chunk.data);
        }
        Ok(data)
    }

    /// The image manifest `digest`.
    async fn manifest(&self, digest: &str, image: &str) -> Result<ImageManifest, ImageError> {
        let bytes = self.read(digest, "manifest").await?;
        serde_json::from_slice(&bytes).map_err(decode_error("image manifest", digest, image))
    }

    /// The wasm layer of container `id`'s image and its bytes, verified against the layer's
    /// digest; `None` when the container has no image or its image is not a wasm image.
    pub async fn wasm_layer(&self, id: &str) -> Result<Option<(ImageLayer, Vec<u8>)>, ImageError> {
        let channel = self.channel().await?;
        let req = GetContainerRequest { id: id.to_string() };
        let container = ContainersClient::new(channel.clone())
            .get(with_namespace!(req, self.containerd.namespace()))
            .await
            .map_err(|status| ImageError::Call {
                what: format!("container {id}"),
                status: Box::new(status),
            })?
            .into_inner()
            .container;
        let image = match container {
            Some(c) if !c.image.is_empty() => c.image,
            _ => return Ok(None),
        };
        let req = GetImageRequest {
            name: image.clone(),
        };
        let target = match ImagesClient::new(channel)
            .get(with_namespace!(req, self.containerd.namespace()))
            .await
        {
            Ok(r) => r.into_inner().image.and_then(|i| i.target),
            // The image was removed after the container was made: nothing to read.
            Err(status) if status.code() == Code::NotFound => None,
            Err(status) => {
                return Err(ImageError::Call {
                    what: format!("image {image}"),
                    status: Box::new(status),
                })
            }
        };
        let Some(target) = target else {
            return Ok(None);
        };
        let bytes = self.read(&target.digest, "manifest").await?;
        let manifest = match TargetBlob::parse(&target.media_type, &bytes, &target.digest, &image)?
        {
            TargetBlob::Manifest(m) => *m,
            TargetBlob::Index(index) => {
                let Some(wasm) = wasm_entry(&index) else {
                    // A native multi-platform image: nothing more to read.
                    return Ok(None);
                };
                self.manifest(wasm.digest().as_ref(), &image).await?
            }
        };
        let config_digest = manifest.config().digest().to_string();
        let bytes = self.read(&config_digest, "configuration").await?;
        let config: ImageConfiguration = serde_json::from_slice(&bytes).map_err(decode_error(
            "image configuration",
            &config_digest,
            &image,
        ))?;
        if *config.architecture() != Arch::Wasm {
            return Ok(None);
        }
        let layer = wasm_layer_of(&manifest, &image)?;
        let digest = layer.digest().to_string();
        let wasm = self.read(&digest, "layer").await?;
        let layer = ImageLayer {
            image,
            digest,
            media_type: layer.media_type().to_string(),
        };
        verify(&layer, &wasm)?;
        Ok(Some((layer, wasm)))
    }
}

/// The blob an image's name points to: a multi-platform index or one image's manifest.
#[derive(Debug)]
enum TargetBlob {
    Index(Box<ImageIndex>),
    Manifest(Box<ImageManifest>),
}

impl TargetBlob {
    /// Parses blob `digest` of `image`: an index where containerd's `media_type` or the
    /// blob's own `mediaType` says so, a manifest otherwise.
    fn parse(
        media_type: &str,
        bytes: &[u8],
        digest: &str,
        image: &str,
    ) -> Result<Self, ImageError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(decode_error("image manifest", digest, image))?;
        let own_type = value.get("mediaType").and_then(serde_json::Value::as_str);
        if INDEX_TYPES.contains(&media_type) || own_type.is_some_and(|t| INDEX_TYPES.contains(&t)) {
            serde_json::from_value(value)
                .map(|i| TargetBlob::Index(Box::new(i)))
                .map_err(decode_error("image index", digest, image))
        } else {
            serde_json::from_value(value)
                .map(|m| TargetBlob::Manifest(Box::new(m)))
                .map_err(decode_error("image manifest", digest, image))
        }
    }
}

/// Maps a failed parse of blob `digest` (an OCI `kind`) of `image` to [`ImageError::Decode`].
fn decode_error<'a>(
    kind: &'static str,
    digest: &'a str,
    image: &'a str,
) -> impl FnOnce(serde_json::Error) -> ImageError + 'a {
    move |source| ImageError::Decode {
        kind,
        digest: digest.to_string(),
        image: image.to_string(),
        source,
    }
}

/// An index's entry for architecture wasm.
fn wasm_entry(index: &ImageIndex) -> Option<&Descriptor> {
    index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.architecture() == Arch::Wasm)
    })
}

/// The one WebAssembly layer of a wasm image's manifest.
fn wasm_layer_of<'m>(
    manifest: &'m ImageManifest,
    image: &str,
) -> Result<&'m Descriptor, ImageError> {
    let layers: Vec<&Descriptor> = manifest
        .layers()
        .iter()
        .filter(|l| WASM_LAYER_TYPES.contains(&l.media_type().as_ref()))
        .collect();
    match layers.as_slice() {
        [] => Err(ImageError::NoWasmLayer {
            image: image.to_string(),
        }),
        [one] => Ok(one),
        many => Err(ImageError::ManyWasmLayers {
            image: image.to_string(),
            count: many.len(),
        }),
    }
}

/// Checks that `wasm` is the layer's content (containerd checks digests when it ingests
/// content, not when it serves it) and a WebAssembly binary.
fn verify(layer: &ImageLayer, wasm: &[u8]) -> Result<(), ImageError> {
    let actual = sha256_hex(wasm);
    if layer.digest.strip_prefix("sha256:") != Some(actual.as_str()) {
        return Err(ImageError::Corrupt {
            image: layer.image.clone(),
            digest: layer.digest.clone(),
            size: wasm.len(),
            actual,
        });
    }
    if !wasm.starts_with(crate::guest::MAGIC) {
        return Err(ImageError::NotWasm {
            image: layer.image.clone(),
            digest: layer.digest.clone(),
            media_type: layer.media_type.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(wasm: &[u8]) -> ImageLayer {
        ImageLayer {
            image: "r/w:1".into(),
            digest: format!("sha256:{}", sha256_hex(wasm)),
            media_type: WASM_LAYER_TYPES[1].into(),
        }
    }

    #[test]
    fn a_layer_must_match_its_digest_and_be_wasm() {
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        assert!(verify(&layer(&wasm), &wasm).is_ok());
        let mut flipped = wasm.clone();
        flipped[7] ^= 1;
        let err = verify(&layer(&wasm), &flipped).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
        assert!(err.is_bad_image());
        let text = b"plain text".to_vec();
        let err = verify(&layer(&text), &text).unwrap_err();
        assert!(matches!(err, ImageError::NotWasm { .. }), "{err}");
        assert!(
            err.to_string().contains("is not a WebAssembly binary"),
            "{err}"
        );
    }

    #[test]
    fn the_handoff_is_taken_once() {
        let bundle = std::env::temp_dir().join(format!("hb-wasm-handoff-{}", std::process::id()));
        fs::create_dir_all(&bundle).unwrap();
        assert!(Handoff::take(&bundle).unwrap().is_none());
        let wasm = b"\0asm\x01\0\0\0".to_vec();
        Handoff::write(&bundle, &layer(&wasm), &wasm).unwrap();
        let (got, bytes) = Handoff::take(&bundle).unwrap().unwrap();
        assert_eq!((got, bytes), (layer(&wasm), wasm));
        assert!(Handoff::take(&bundle).unwrap().is_none());
        fs::remove_dir_all(&bundle).unwrap();
    }

    /// A valid `sha256:` digest made of one repeated hex digit.
    fn digest(hex: char) -> String {
        format!("sha256:{}", hex.to_string().repeat(64))
    }

    fn index_json(media_type: &str, platforms: &[(&str, char)]) -> String {
        let manifests: Vec<String> = platforms
            .iter()
            .map(|(arch, hex)| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json",
                        "digest":"{}","size":1,
                        "platform":{{"architecture":"{arch}","os":"linux"}}}}"#,
                    digest(*hex)
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media_type}","manifests":[{}]}}"#,
            manifests.join(",")
        )
    }

    fn manifest_json(layers: &[(&str, char)]) -> String {
        let layers: Vec<String> = layers
            .iter()
            .map(|(media_type, hex)| {
                format!(
                    r#"{{"mediaType":"{media_type}","digest":"{}","size":8}}"#,
                    digest(*hex)
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",
                "config":{{"mediaType":"application/vnd.oci.image.config.v1+json",
                           "digest":"{}","size":2}},
                "layers":[{}]}}"#,
            digest('c'),
            layers.join(",")
        )
    }

    fn parse(media_type: &str, json: &str) -> Result<TargetBlob, ImageError> {
        TargetBlob::parse(media_type, json.as_bytes(), &digest('0'), "r/w:1")
    }

    #[test]
    fn an_index_entry_is_chosen_by_architecture() {
        for media_type in INDEX_TYPES {
            let json = index_json(media_type, &[("amd64", 'a'), ("wasm", 'b')]);
            let Ok(TargetBlob::Index(index)) = parse(media_type, &json) else {
                panic!("{media_type} is not parsed as an index");
            };
            assert_eq!(
                wasm_entry(&index).unwrap().digest().to_string(),
                digest('b')
            );
        }
        let native = index_json(INDEX_TYPES[0], &[("amd64", 'a'), ("arm64", 'b')]);
        let Ok(TargetBlob::Index(native)) = parse(INDEX_TYPES[0], &native) else {
            panic!("a native index is not parsed as an index");
        };
        assert!(wasm_entry(&native).is_none());
    }

    #[test]
    fn a_blob_is_an_index_by_either_media_type() {
        let index = index_json(INDEX_TYPES[0], &[("wasm", 'b')]);
        let manifest_type = "application/vnd.oci.image.manifest.v1+json";
        assert!(matches!(
            parse(manifest_type, &index),
            Ok(TargetBlob::Index(_))
        ));
        let manifest = manifest_json(&[(WASM_LAYER_TYPES[1], 'd')]);
        assert!(matches!(
            parse(manifest_type, &manifest),
            Ok(TargetBlob::Manifest(_))
        ));
    }

    #[test]
    fn a_wasm_image_has_exactly_one_wasm_layer() {
        let tar = "application/vnd.oci.image.layer.v1.tar";
        let json = manifest_json(&[(tar, 'a'), (WASM_LAYER_TYPES[0], 'b')]);
        let Ok(TargetBlob::Manifest(manifest)) = parse("", &json) else {
            panic!("not a manifest: {json}");
        };
        let layer = wasm_layer_of(&manifest, "r/w:1").unwrap();
        assert_eq!(layer.digest().to_string(), digest('b'));
        assert_eq!(layer.media_type().to_string(), WASM_LAYER_TYPES[0]);

        let json = manifest_json(&[(tar, 'a')]);
        let Ok(TargetBlob::Manifest(manifest)) = parse("", &json) else {
            panic!("not a manifest: {json}");
        };
        let err = wasm_layer_of(&manifest, "r/w:1").unwrap_err();
        assert!(matches!(err, ImageError::NoWasmLayer { .. }), "{err}");

        let json = manifest_json(&[(WASM_LAYER_TYPES[0], 'a'), (WASM_LAYER_TYPES[1], 'b')]);
        let Ok(TargetBlob::Manifest(manifest)) = parse("", &json) else {
            panic!("not a manifest: {json}");
        };
        let err = wasm_layer_of(&manifest, "r/w:1").unwrap_err();
        assert!(
            matches!(err, ImageError::ManyWasmLayers { count: 2, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_malformed_manifest_is_a_clear_error() {
        let no_size = manifest_json(&[(WASM_LAYER_TYPES[1], 'd')]).replace(r#","size":8"#, "");
        let no_os = index_json(INDEX_TYPES[0], &[("wasm", 'b')]).replace(r#","os":"linux""#, "");
        let short_digest =
            manifest_json(&[(WASM_LAYER_TYPES[1], 'd')]).replace(&digest('d'), "sha256:d");
        for (media_type, json, kind, reason) in [
            (
                "",
                no_size.as_str(),
                "image manifest",
                "missing field `size`",
            ),
            (
                INDEX_TYPES[0],
                no_os.as_str(),
                "image index",
                "missing field `os`",
            ),
            ("", short_digest.as_str(), "image manifest", "digest length"),
            ("", "{not json", "image manifest", "key must be a string"),
        ] {
            let err = parse(media_type, json).unwrap_err();
            assert!(matches!(err, ImageError::Decode { .. }), "{err}");
            assert!(err.is_bad_image());
            let text = err.to_string();
            let expected = format!(
                "{kind} {} of image r/w:1 is not a valid OCI {kind}",
                digest('0')
            );
            assert!(text.starts_with(&expected), "{text}");
            assert!(text.contains(reason), "{text}");
        }
    }

    #[test]
    fn a_configuration_says_wasm_by_its_architecture() {
        let config = |arch: &str| {
            serde_json::from_str::<ImageConfiguration>(&format!(
                r#"{{"architecture":"{arch}","os":"wasip1",
                    "rootfs":{{"type":"layers","diff_ids":[]}}}}"#
            ))
            .unwrap()
        };
        assert_eq!(*config("wasm").architecture(), Arch::Wasm);
        assert_ne!(*config("amd64").architecture(), Arch::Wasm);
    }
}

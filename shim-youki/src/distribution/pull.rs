//! `templates pull REF`, and the pull a restore asks for on first use: the manifest and the
//! record checked against this node before any layer is fetched, the layers fetched within
//! their sizes, unpacked, checked by CRIU and kept in the puller's store.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::manifest::{OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use super::archive::{untar_images, untar_rootfs};
use super::registry::{crypto, parse_reference, runtime, Access};
use super::{differences, err, staging, Staged, IMAGES_TYPE, MAX_RECORD, RECORD_TYPE, ROOTFS_TYPE};
use crate::criu::Criu;
use crate::image::ImageRef;
use crate::template::{self, disk_usage, Record, Settings, Source, Store};

/// What a pull kept.
#[derive(Debug)]
pub struct Pulled {
    pub name: String,
    pub path: PathBuf,
    pub digest: String,
    pub bytes: u64,
}

/// An `AsyncWrite` to a file that refuses more than `limit` bytes.
struct Bounded {
    file: tokio::fs::File,
    written: u64,
    limit: u64,
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.written + buf.len() as u64 > self.limit {
            return Poll::Ready(Err(io::Error::other(format!(
                "the registry sent more than the {} bytes the manifest gives",
                self.limit
            ))));
        }
        let this = &mut *self;
        match Pin::new(&mut this.file).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                this.written += n as u64;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.file).poll_shutdown(cx)
    }
}

/// Pulls the template at `reference` into `store` as `name` (else the name it was pushed
/// under). `image`: the image of the container a restore pulls for, which the template's must
/// be. A template of that name that exists is an error for a person (`exists_ok` false) and
/// kept as it is for a restore.
pub fn pull(
    store: &Store,
    reference: &str,
    name: Option<&str>,
    access: &Access,
    image: Option<&ImageRef>,
    exists_ok: bool,
) -> Result<Pulled, String> {
    crypto();
    let parsed = parse_reference(reference)?;
    if let Some(name) = name {
        hyperbox_shim_core::template::check_name(name)?;
        if store.path(name).exists() {
            return if exists_ok {
                Ok(Pulled {
                    name: name.to_string(),
                    path: store.path(name),
                    digest: String::new(),
                    bytes: 0,
                })
            } else {
                Err(format!(
                    "template {name} exists in {}: remove it first",
                    store.describe()
                ))
            };
        }
    }
    let settings = Settings::load().map_err(err)?;
    let criu = Criu::get().map_err(err)?;
    let criu_version = criu.version().map_err(err)?;
    let client = access.client(&parsed);
    let auth = access.auth(&parsed)?;
    let rt = runtime()?;
    // The manifest and the record: small, checked before anything large is fetched.
    let (manifest, digest, record) = rt.block_on(async {
        let (body, digest) = client
            .pull_manifest_raw(&parsed, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|e| format!("cannot pull {reference}: {e}"))?;
        let computed = format!("sha256:{:x}", Sha256::digest(&body));
        if let Some(pinned) = parsed.digest() {
            if pinned != computed {
                return Err(format!(
                    "{reference}: the registry sent a manifest of digest {computed}"
                ));
            }
        }
        let manifest: OciImageManifest = serde_json::from_slice(&body)
            .map_err(|e| format!("{reference}: its manifest does not parse: {e}"))?;
        if manifest.config.media_type != RECORD_TYPE {
            return Err(format!(
                "{reference} is not a HyperBox template: its config is {}, not {RECORD_TYPE}",
                manifest.config.media_type
            ));
        }
        let kinds: Vec<&str> = manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect();
        if kinds != [IMAGES_TYPE, ROOTFS_TYPE] {
            return Err(format!(
                "{reference}: a template has the layers {IMAGES_TYPE} and {ROOTFS_TYPE}, this one \
                 has {kinds:?}"
            ));
        }
        if manifest.config.size < 0 || manifest.config.size as u64 > MAX_RECORD {
            return Err(format!(
                "{reference}: its record is over {MAX_RECORD} bytes"
            ));
        }
        let mut config = Vec::new();
        client
            .pull_blob(&parsed, &manifest.config, &mut config)
            .await
            .map_err(|e| format!("cannot pull the record of {reference}: {e}"))?;
        let record: Record = serde_json::from_slice(&config)
            .map_err(|e| format!("{reference}: its record does not parse: {e}"))?;
        let _ = digest;
        Ok::<_, String>((manifest, computed, record))
    })?;
    let name = name.unwrap_or(&record.name).to_string();
    hyperbox_shim_core::template::check_name(&name)?;
    let refuse = |why: Vec<String>| {
        format!(
            "cannot pull template {name} from {reference} onto this node: {}",
            why.join("; ")
        )
    };
    let mut why = differences(&record, &criu_version);
    if record.security.is_none() {
        why.push("its record has no security settings".into());
    }
    match (&record.image_digest, image) {
        (None, _) => why.push("its record does not name its image's digest".into()),
        (Some(theirs), Some(ours)) if *theirs != ours.digest => why.push(format!(
            "it was captured from image {}@{theirs}, this container's is {}@{}",
            record.image.as_deref().unwrap_or("?"),
            ours.name,
            ours.digest
        )),
        _ => {}
    }
    if !why.is_empty() {
        return Err(refuse(why));
    }
    let sizes: Vec<u64> = manifest
        .layers
        .iter()
        .map(|l| l.size.max(0) as u64)
        .collect();
    if sizes[1] > settings.max_rootfs_changes {
        return Err(refuse(vec![format!(
            "its rootfs changes take {} bytes, more than the template settings' \
             max_rootfs_changes ({} bytes, {})",
            sizes[1],
            settings.max_rootfs_changes,
            Settings::path().display()
        )]));
    }
    // Fetched and unpacked, the template takes about twice its layers while staged.
    let needed = disk_usage(store.dir()) + 2 * sizes.iter().sum::<u64>();
    if needed > settings.owner_quota {
        return Err(refuse(vec![format!(
            "the templates of {} would take {needed} bytes, more than the template settings' \
             owner_quota ({} bytes, {})",
            store.describe(),
            settings.owner_quota,
            Settings::path().display()
        )]));
    }
    if store.path(&name).exists() {
        return if exists_ok {
            Ok(Pulled {
                path: store.path(&name),
                name,
                digest,
                bytes: 0,
            })
        } else {
            Err(format!(
                "template {name} exists in {}: remove it first",
                store.describe()
            ))
        };
    }
    let stage = Staged(staging(store, "pull", &name)?);
    let blobs: Vec<PathBuf> = (0..2)
        .map(|i| stage.0.join(format!("layer-{i}.tar")))
        .collect();
    rt.block_on(async {
        for ((layer, path), size) in manifest.layers.iter().zip(&blobs).zip(&sizes) {
            let file = tokio::fs::File::create(path)
                .await
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            let mut out = Bounded {
                file,
                written: 0,
                limit: *size,
            };
            client
                .pull_blob(&parsed, layer, &mut out)
                .await
                .map_err(|e| format!("cannot pull layer {} of {reference}: {e}", layer.digest))?;
            if out.written != *size {
                return Err(format!(
                    "layer {} of {reference}: the registry sent {} bytes, the manifest gives {size}",
                    layer.digest, out.written
                ));
            }
        }
        Ok::<(), String>(())
    })?;
    drop(rt);
    let tmp = stage.0.join("template");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    untar_images(&blobs[0], &tmp.join(template::IMAGES))
        .map_err(|e| refuse(vec![format!("its CRIU images: {e}")]))?;
    untar_rootfs(&blobs[1], &tmp.join(template::ROOTFS))
        .map_err(|e| refuse(vec![format!("its rootfs changes: {e}")]))?;
    for blob in &blobs {
        let _ = fs::remove_file(blob);
    }
    criu.cpuinfo_check(&tmp.join(template::IMAGES))
        .map_err(|e| refuse(vec![e]))?;
    let record = Record {
        name: name.clone(),
        namespace: store.namespace().to_string(),
        owner: store.owner().map(str::to_string),
        layers: Vec::new(),
        source: Some(Source {
            reference: reference.to_string(),
            digest: digest.clone(),
            container: record.container.clone(),
            namespace: record.namespace.clone(),
            owner: record.owner.clone(),
        }),
        ..record
    };
    let bytes = store
        .keep_pulled(&tmp, &record, settings.owner_quota)
        .map_err(err)?;
    Ok(Pulled {
        path: store.path(&name),
        name,
        digest,
        bytes,
    })
}

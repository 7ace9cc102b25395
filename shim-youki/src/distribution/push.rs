//! `templates push NAME REF`: a template of this node's store, archived and sent to a
//! registry as an OCI artifact.

use std::collections::BTreeMap;

use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use sha2::{Digest, Sha256};

use super::archive::{tar_images, tar_rootfs};
use super::registry::{crypto, parse_reference, runtime, Access};
use super::{err, staging, Staged, ARTIFACT_TYPE, IMAGES_TYPE, RECORD_TYPE, ROOTFS_TYPE};
use crate::template::{self, Store};

/// What a push sent.
#[derive(Debug)]
pub struct Pushed {
    pub reference: String,
    /// The manifest's digest: `REF@DIGEST` pulls exactly this.
    pub digest: String,
    pub bytes: u64,
}

/// Pushes template `name` of `store` to `reference`.
pub fn push(store: &Store, name: &str, reference: &str, access: &Access) -> Result<Pushed, String> {
    crypto();
    let parsed = parse_reference(reference)?;
    let _hold = store.hold(name).map_err(err)?;
    let record = store.record(name).map_err(err)?;
    if record.kernel.is_none() || record.image_digest.is_none() || record.security.is_none() {
        return Err(format!(
            "template {name} cannot be pushed: its record lacks {}, which another node checks \
             before restoring it; capture it again",
            [
                record
                    .kernel
                    .is_none()
                    .then_some("the kernel it was captured under"),
                record
                    .image_digest
                    .is_none()
                    .then_some("its image's digest (containerd did not say it at capture)"),
                record.security.is_none().then_some("its security settings"),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        ));
    }
    let path = store.path(name);
    let stage = Staged(staging(store, "push", name)?);
    let images = tar_images(&path.join(template::IMAGES), &stage.0.join("images.tar"))?;
    let rootfs = tar_rootfs(&path.join(template::ROOTFS), &stage.0.join("rootfs.tar"))?;
    let config = serde_json::to_vec_pretty(&record).map_err(err)?;
    let config_digest = format!("sha256:{:x}", Sha256::digest(&config));
    let descriptor = |media_type: &str, digest: &str, size: u64| OciDescriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        ..Default::default()
    };
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "org.opencontainers.image.title".to_string(),
        name.to_string(),
    );
    annotations.insert(
        "io.hyperbox.template.image".to_string(),
        format!(
            "{}@{}",
            record.image.as_deref().unwrap_or(""),
            record.image_digest.as_deref().unwrap_or("")
        ),
    );
    annotations.insert(
        "io.hyperbox.template.criu".to_string(),
        record.criu_version.clone(),
    );
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        config: descriptor(RECORD_TYPE, &config_digest, config.len() as u64),
        layers: vec![
            descriptor(IMAGES_TYPE, &images.digest, images.size),
            descriptor(ROOTFS_TYPE, &rootfs.digest, rootfs.size),
        ],
        subject: None,
        annotations: Some(annotations),
    };
    let body = serde_json::to_vec(&manifest).map_err(err)?;
    let digest = format!("sha256:{:x}", Sha256::digest(&body));
    let client = access.client(&parsed);
    let auth = access.auth(&parsed)?;
    runtime()?.block_on(async {
        client
            .auth(&parsed, &auth, oci_client::RegistryOperation::Push)
            .await
            .map_err(|e| format!("cannot log in to {}: {e}", parsed.resolve_registry()))?;
        for blob in [&images, &rootfs] {
            if client
                .blob_exists(&parsed, &blob.digest)
                .await
                .unwrap_or(false)
            {
                continue;
            }
            let file = tokio::fs::File::open(&blob.path)
                .await
                .map_err(|e| format!("cannot open {}: {e}", blob.path.display()))?;
            let stream = futures_util::TryStreamExt::map_err(
                tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
                oci_client::errors::OciDistributionError::from,
            );
            client
                .push_blob_stream(&parsed, stream, &blob.digest, Some(blob.size))
                .await
                .map_err(|e| {
                    format!("cannot push a layer of template {name} to {reference}: {e}")
                })?;
        }
        client
            .push_blob(&parsed, config.clone(), &config_digest)
            .await
            .map_err(|e| {
                format!("cannot push the record of template {name} to {reference}: {e}")
            })?;
        client
            .push_manifest_raw(
                &parsed,
                body.clone(),
                OCI_IMAGE_MEDIA_TYPE.parse().expect("a media type"),
            )
            .await
            .map_err(|e| {
                format!("cannot push the manifest of template {name} to {reference}: {e}")
            })?;
        Ok::<(), String>(())
    })?;
    Ok(Pushed {
        reference: reference.to_string(),
        digest,
        bytes: images.size + rootfs.size + config.len() as u64,
    })
}

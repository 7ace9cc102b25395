//! Templates through an OCI registry: `templates push NAME REF` and `templates pull REF`, and
//! the pull a restore asks for on first use (`io.hyperbox.template.pull=REF`).
//!
//! A template is an OCI artifact: an image manifest of artifact type [`ARTIFACT_TYPE`] whose
//! config is the template's record ([`RECORD_TYPE`], `template.json`) and whose two layers are
//! tar archives of CRIU's images ([`IMAGES_TYPE`], flat) and of the rootfs changes
//! ([`ROOTFS_TYPE`], overlay whiteouts as character devices 0:0, opaque directories as the
//! `trusted.overlay.opaque` attribute in PAX headers). A pull fetches the manifest (checked
//! against the reference's digest when it names one), then the record, checks the node against
//! it (CRIU, shim, kernel, architecture; the container's image when a restore pulls) before
//! any layer is fetched, fetches each layer into a staging directory verifying its digest and
//! size, unpacks them refusing anything a capture does not make, runs CRIU's CPU check on the
//! images, and renames the whole into the puller's store: a template is whole and verified, or
//! absent. A pulled template belongs to the owner that pulled it; its record keeps where it
//! came from.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWrite;

use crate::criu::Criu;
use crate::image::ImageRef;
use crate::template::{self, disk_usage, Record, Settings, Source, Store};

/// The artifact type of a template's manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.hyperbox.template.v1";
/// The config: the template's record.
pub const RECORD_TYPE: &str = "application/vnd.hyperbox.template.record.v1+json";
/// The first layer: CRIU's images, a flat tar.
pub const IMAGES_TYPE: &str = "application/vnd.hyperbox.template.criu-images.v1.tar";
/// The second layer: the container's rootfs changes, a tar with overlay whiteouts.
pub const ROOTFS_TYPE: &str = "application/vnd.hyperbox.template.rootfs.v1.tar";
/// A record larger than this is not a record.
const MAX_RECORD: u64 = 1 << 20;
/// The extended attribute that marks an overlay directory opaque.
const OPAQUE: &str = "trusted.overlay.opaque";
/// PAX's key prefix for extended attributes.
const PAX_XATTR: &str = "SCHILY.xattr.";

fn err(what: impl std::fmt::Display) -> String {
    what.to_string()
}

/// How to reach registries: which hosts speak plain HTTP, and the credentials.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Hosts (`HOST:PORT`) reached over plain HTTP (`*`: every host); loopback hosts always
    /// are.
    pub plain_http: Vec<String>,
    /// A Docker-style `config.json` (`auths`), where credentials are needed.
    pub auth_file: Option<PathBuf>,
}

impl Access {
    /// The node's: the template settings' `plain_http` and `auth_file`.
    pub fn of_node(settings: &Settings) -> Access {
        Access {
            plain_http: settings.plain_http.clone(),
            auth_file: settings.auth_file.clone(),
        }
    }

    fn client(&self, reference: &Reference) -> Client {
        let host = reference.resolve_registry().to_string();
        let loopback = {
            let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
            name == "localhost" || name.starts_with("127.") || name == "[::1]"
        };
        let protocol = if self.plain_http.iter().any(|h| h == "*") {
            ClientProtocol::Http
        } else {
            let mut plain = self.plain_http.clone();
            if loopback {
                plain.push(host);
            }
            ClientProtocol::HttpsExcept(plain)
        };
        Client::new(ClientConfig {
            protocol,
            ..Default::default()
        })
    }

    fn auth(&self, reference: &Reference) -> Result<RegistryAuth, String> {
        let Some(file) = &self.auth_file else {
            return Ok(RegistryAuth::Anonymous);
        };
        #[derive(Deserialize)]
        struct Entry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        #[derive(Deserialize)]
        struct Config {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        let bytes = match fs::read(file) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        let config: Config = serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let host = reference.resolve_registry();
        let entry = config.auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k.split('/').next() == Some(host)
        });
        let Some((_, entry)) = entry else {
            return Ok(RegistryAuth::Anonymous);
        };
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(RegistryAuth::Basic(u.clone(), p.clone()));
        }
        let Some(auth) = &entry.auth else {
            return Ok(RegistryAuth::Anonymous);
        };
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|d| {
                d.split_once(':')
                    .map(|(u, p)| (u.to_string(), p.to_string()))
            })
            .ok_or_else(|| {
                format!(
                    "{}: the auth of {host} is not base64 of USER:PASSWORD",
                    file.display()
                )
            })?;
        Ok(RegistryAuth::Basic(decoded.0, decoded.1))
    }
}

fn parse_reference(reference: &str) -> Result<Reference, String> {
    reference
        .parse::<Reference>()
        .map_err(|e| format!("{reference:?} is not an image reference: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start an async runtime: {e}"))
}

/// rustls needs its crypto chosen once per process: ring, which builds in seconds where
/// aws-lc takes minutes (rustls deprecates ring's provider only for its lack of post-quantum
/// key exchange; registries negotiate classical groups with it).
#[allow(deprecated)]
fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A file written while its SHA-256 is computed.
struct Hashed<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A layer written to a file, with its digest and size.
struct Blob {
    path: PathBuf,
    digest: String,
    size: u64,
}

fn new_blob(path: &Path) -> Result<tar::Builder<Hashed<fs::File>>, String> {
    let file =
        fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut builder = tar::Builder::new(Hashed {
        inner: file,
        hasher: Sha256::new(),
        size: 0,
    });
    builder.follow_symlinks(false);
    Ok(builder)
}

fn finish_blob(builder: tar::Builder<Hashed<fs::File>>, path: &Path) -> Result<Blob, String> {
    let mut hashed = builder
        .into_inner()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    hashed
        .flush()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(Blob {
        path: path.to_path_buf(),
        digest: format!("sha256:{:x}", hashed.hasher.finalize()),
        size: hashed.size,
    })
}

/// CRIU's images: the files of one directory.
fn tar_images(dir: &Path, out: &Path) -> Result<Blob, String> {
    let mut builder = new_blob(out)?;
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let meta = fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        builder
            .append_path_with_name(&path, &name)
            .map_err(|e| format!("cannot archive {}: {e}", path.display()))?;
    }
    finish_blob(builder, out)
}

/// The rootfs changes: every entry with its owner, mode and times, whiteouts (character
/// devices 0:0), hard links, and the extended attributes overlay and programs use.
fn tar_rootfs(dir: &Path, out: &Path) -> Result<Blob, String> {
    let mut builder = new_blob(out)?;
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = dir.join(&rel);
        let mut names: Vec<_> = fs::read_dir(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names.into_iter().rev() {
            let rel = rel.join(&name);
            let full = dir.join(&rel);
            let meta =
                fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let xattrs = if meta.file_type().is_symlink() {
                Vec::new()
            } else {
                kept_xattrs(&full)?
            };
            if !xattrs.is_empty() {
                builder
                    .append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let ft = meta.file_type();
            if ft.is_file() && meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = links.get(&key) {
                    header.set_entry_type(tar::EntryType::Link);
                    header.set_size(0);
                    builder
                        .append_link(&mut header, &rel, first)
                        .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
                    continue;
                }
                links.insert(key, rel.clone());
            }
            if ft.is_dir() {
                builder
                    .append_data(&mut header, &rel, io::empty())
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
                stack.push(rel);
            } else if ft.is_symlink() {
                let target =
                    fs::read_link(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                builder
                    .append_link(&mut header, &rel, &target)
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else if ft.is_file() {
                let file = fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
                builder
                    .append_data(&mut header, &rel, file)
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                let rdev = meta.rdev();
                header.set_device_major(libc::major(rdev)).ok();
                header.set_device_minor(libc::minor(rdev)).ok();
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, io::empty())
                    .map_err(|e| format!("cannot archive {}: {e}", full.display()))?;
            } else {
                return Err(format!(
                    "{}: a socket is not kept in a template",
                    full.display()
                ));
            }
        }
    }
    finish_blob(builder, out)
}

/// The extended attributes a template keeps: overlay's opaque mark, file capabilities and
/// `user.*`. Others (overlay's redirects, SELinux labels, ACLs) are not carried.
fn allowed_xattr(name: &str) -> bool {
    name == OPAQUE || name == "security.capability" || name.starts_with("user.")
}

fn kept_xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for name in xattr::list(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let name = name.to_string_lossy().into_owned();
        if !allowed_xattr(&name) {
            continue;
        }
        if let Some(value) =
            xattr::get(path, &name).map_err(|e| format!("{}: {e}", path.display()))?
        {
            out.push((format!("{PAX_XATTR}{name}"), value));
        }
    }
    Ok(out)
}

/// What a push sent.
#[derive(Debug)]
pub struct Pushed {
    pub reference: String,
    /// The manifest's digest: `REF@DIGEST` pulls exactly this.
    pub digest: String,
    pub bytes: u64,
}

fn staging(store: &Store, what: &str, name: &str) -> Result<PathBuf, String> {
    store.ensure().map_err(err)?;
    // One shim may pull for several containers at once: a count of its own, then its pid
    // (which the store's sweep reads to remove what a dead process left).
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = store
        .path(name)
        .with_file_name(format!(".{what}-{name}-{n}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Removes a directory when dropped.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
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

/// The kernel this node runs.
pub fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Why this node cannot restore what `record` holds; empty when it can.
pub fn differences(record: &Record, criu_version: &str) -> Vec<String> {
    let mut out = Vec::new();
    if record.criu_version != criu_version {
        out.push(format!(
            "it was captured with CRIU {}, this node has CRIU {criu_version}",
            record.criu_version
        ));
    }
    if record.shim_version != template::SHIM_VERSION {
        out.push(format!(
            "it was captured by containerd-shim-hyperbox-v1 {}, this node has {}",
            record.shim_version,
            template::SHIM_VERSION
        ));
    }
    let here = kernel();
    match &record.kernel {
        Some(k) if *k != here => out.push(format!(
            "it was captured under kernel {k}, this node runs {here}"
        )),
        Some(_) => {}
        None => out.push("its record does not say which kernel it was captured under".into()),
    }
    if let Some(arch) = &record.arch {
        if arch != std::env::consts::ARCH {
            out.push(format!(
                "it was captured on {arch}, this node is {}",
                std::env::consts::ARCH
            ));
        }
    }
    out
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

/// A path from an archive: relative, of plain components.
fn plain(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return Err(format!("{} is not a plain relative path", path.display())),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{:?} names no file", path));
    }
    Ok(out)
}

fn archive(path: &Path) -> Result<tar::Archive<fs::File>, String> {
    let file = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    Ok(archive)
}

/// CRIU's images: regular files of plain names, nothing else.
fn untar_images(blob: &Path, dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut archive = archive(blob)?;
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = entry.path().map_err(err)?.into_owned();
        let name = plain(&path)?;
        if name.components().count() != 1 || entry.header().entry_type() != tar::EntryType::Regular
        {
            return Err(format!(
                "{} is not a file of CRIU's images (a plain name, a regular file)",
                path.display()
            ));
        }
        let target = dir.join(&name);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(&target)
            .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
        io::copy(&mut entry, &mut out)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// The rootfs changes: directories, files, links, fifos and whiteouts (character devices
/// 0:0) at plain paths inside `dir`, and only the extended attributes a capture keeps. Other
/// device nodes are refused: a template's layer is not a way to hand a container devices.
fn untar_rootfs(blob: &Path, dir: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut archive = archive(blob)?;
    let mut dirs = Vec::new();
    for entry in archive.entries().map_err(err)? {
        let mut entry = entry.map_err(err)?;
        let path = plain(&entry.path().map_err(err)?)?;
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Regular
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link
            | tar::EntryType::Fifo => {}
            tar::EntryType::Char => {
                let (major, minor) = (
                    entry.header().device_major().ok().flatten(),
                    entry.header().device_minor().ok().flatten(),
                );
                if (major, minor) != (Some(0), Some(0)) {
                    return Err(format!(
                        "{} is a device node other than a whiteout (0:0)",
                        path.display()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "{}: entries of type {other:?} are not kept in templates",
                    path.display()
                ))
            }
        }
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(err)? {
            for ext in pax {
                let ext = ext.map_err(err)?;
                let key = ext.key().map_err(err)?;
                if let Some(name) = key.strip_prefix(PAX_XATTR) {
                    if !allowed_xattr(name) {
                        return Err(format!(
                            "{}: extended attribute {name} is not kept in templates",
                            path.display()
                        ));
                    }
                    xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
                }
            }
        }
        if !xattrs.is_empty() && matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            return Err(format!(
                "{}: links carry no extended attributes",
                path.display()
            ));
        }
        let target = dir.join(&path);
        if kind == tar::EntryType::Char {
            // The tar crate makes device nodes with mknod; a whiteout is made here so its mode
            // and owner are exact, under a parent checked to be inside `dir`.
            check_parent(dir, &path)?;
            let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(err)?;
            // SAFETY: mknod of a path the caller made, under a checked parent.
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, 0) } != 0 {
                return Err(format!(
                    "cannot make whiteout {}: {}",
                    target.display(),
                    io::Error::last_os_error()
                ));
            }
            let h = entry.header();
            let (uid, gid) = (h.uid().map_err(err)? as u32, h.gid().map_err(err)? as u32);
            std::os::unix::fs::lchown(&target, Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown {}: {e}", target.display()))?;
        } else if !entry
            .unpack_in(dir)
            .map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => format!("{}: {e}: {cause}", path.display()),
                None => format!("{}: {e}", path.display()),
            })?
        {
            return Err(format!("{} would be outside the template", path.display()));
        }
        for (name, value) in &xattrs {
            xattr::set(&target, name, value)
                .map_err(|e| format!("cannot set {name} on {}: {e}", target.display()))?;
        }
        if kind == tar::EntryType::Directory {
            let h = entry.header();
            dirs.push((target, h.mode().map_err(err)?, h.mtime().map_err(err)?));
        }
    }
    // Directories' modes and times once their contents are in.
    for (d, mode, mtime) in dirs.into_iter().rev() {
        let _ = fs::set_permissions(&d, fs::Permissions::from_mode(mode & 0o7777));
        let t = filetime_of(mtime);
        let _ = set_mtime(&d, t);
    }
    Ok(())
}

fn filetime_of(secs: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    }
}

fn set_mtime(path: &Path, t: libc::timespec) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let times = [t, t];
    // SAFETY: utimensat with a valid path and two timespecs.
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `path`'s parent, inside `dir`, is a directory reached without a symbolic link.
fn check_parent(dir: &Path, path: &Path) -> Result<(), String> {
    let mut at = dir.to_path_buf();
    if let Some(parent) = path.parent() {
        for c in parent.components() {
            at.push(c);
            let meta = fs::symlink_metadata(&at).map_err(|e| format!("{}: {e}", at.display()))?;
            if !meta.is_dir() {
                return Err(format!("{} is not a directory", at.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hyperbox-dist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rootfs_changes_come_back_as_they_were() {
        if !root() {
            hyperbox_testkit::skip("whiteouts and trusted.* attributes need root");
            return;
        }
        let dir = scratch("roundtrip");
        let src = dir.join("src");
        fs::create_dir_all(src.join("opaque/inner")).unwrap();
        xattr::set(src.join("opaque"), OPAQUE, b"y").unwrap();
        fs::write(src.join("opaque/inner/file"), b"kept").unwrap();
        fs::set_permissions(
            src.join("opaque/inner/file"),
            fs::Permissions::from_mode(0o4750),
        )
        .unwrap();
        fs::hard_link(src.join("opaque/inner/file"), src.join("linked")).unwrap();
        symlink("/etc/passwd", src.join("link")).unwrap();
        let wh = std::ffi::CString::new(src.join("gone").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mknod of a NUL-terminated path in the test's scratch directory.
        assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
        std::os::unix::fs::lchown(src.join("link"), Some(7), Some(8)).unwrap();
        // Not carried: an overlay redirect.
        xattr::set(src.join("opaque/inner"), "trusted.overlay.redirect", b"/x").unwrap();

        let blob = tar_rootfs(&src, &dir.join("rootfs.tar")).unwrap();
        assert!(blob.digest.starts_with("sha256:") && blob.size > 0);
        let out = dir.join("out");
        untar_rootfs(&blob.path, &out).unwrap();

        assert_eq!(
            xattr::get(out.join("opaque"), OPAQUE).unwrap().as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            xattr::get(out.join("opaque/inner"), "trusted.overlay.redirect").unwrap(),
            None
        );
        assert_eq!(fs::read(out.join("opaque/inner/file")).unwrap(), b"kept");
        let meta = fs::metadata(out.join("opaque/inner/file")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o4750);
        assert_eq!(
            meta.ino(),
            fs::metadata(out.join("linked")).unwrap().ino(),
            "a hard link"
        );
        assert_eq!(
            fs::read_link(out.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(fs::symlink_metadata(out.join("link")).unwrap().uid(), 7);
        let gone = fs::symlink_metadata(out.join("gone")).unwrap();
        assert!(
            gone.file_type().is_char_device() && gone.rdev() == 0,
            "a whiteout"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A tar of one entry made by hand: what a hostile registry could send.
    fn hostile(dir: &Path, build: impl FnOnce(&mut tar::Builder<fs::File>)) -> PathBuf {
        let path = dir.join("hostile.tar");
        let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
        build(&mut b);
        b.finish().unwrap();
        path
    }

    fn entry(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    /// Writes `name` into the header's raw name field (the tar crate refuses `..` itself).
    fn raw_name(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
    }

    #[test]
    fn hostile_archives_are_refused() {
        if !root() {
            hyperbox_testkit::skip("unpacking with owners needs root");
            return;
        }
        let dir = scratch("hostile");
        type Build = Box<dyn FnOnce(&mut tar::Builder<fs::File>)>;
        let cases: Vec<(&str, Build)> = vec![
            (
                "not a plain relative path",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Regular, 1);
                    raw_name(&mut h, "../escape");
                    b.append(&h, &b"x"[..]).unwrap();
                }),
            ),
            (
                "device node other than a whiteout",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Char, 0);
                    h.set_device_major(1).unwrap();
                    h.set_device_minor(3).unwrap();
                    b.append_data(&mut h, "null", io::empty()).unwrap();
                }),
            ),
            (
                "trusted.overlay.redirect is not kept",
                Box::new(|b| {
                    b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.redirect", &b"/"[..])])
                        .unwrap();
                    let mut h = entry(tar::EntryType::Directory, 0);
                    b.append_data(&mut h, "d", io::empty()).unwrap();
                }),
            ),
            (
                "outside",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Symlink, 0);
                    b.append_link(&mut h, "up", "/").unwrap();
                    let mut h = entry(tar::EntryType::Regular, 1);
                    b.append_data(&mut h, "up/etc/owned", &b"x"[..]).unwrap();
                }),
            ),
            (
                "outside",
                Box::new(|b| {
                    let mut h = entry(tar::EntryType::Link, 0);
                    b.append_link(&mut h, "passwd", "../../../../etc/passwd")
                        .unwrap();
                }),
            ),
        ];
        for (i, (says, build)) in cases.into_iter().enumerate() {
            let tar = hostile(&dir, build);
            let out = dir.join(format!("out-{i}"));
            let e = untar_rootfs(&tar, &out).unwrap_err();
            assert!(e.contains(says), "{says}: {e}");
        }
        assert!(!Path::new("/etc/owned").exists());
        // CRIU's images: plain files only.
        let tar = hostile(&dir, |b| {
            let mut h = entry(tar::EntryType::Symlink, 0);
            b.append_link(&mut h, "pages-1.img", "/etc/shadow").unwrap();
        });
        let e = untar_images(&tar, &dir.join("images")).unwrap_err();
        assert!(e.contains("not a file of CRIU's images"), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn nodes_that_differ_are_named() {
        let record = Record {
            name: "t".into(),
            namespace: "default".into(),
            container: "c".into(),
            created: 0,
            criu_version: "4.2.1".into(),
            shim_version: template::SHIM_VERSION.into(),
            layers: Vec::new(),
            image: None,
            image_digest: None,
            owner: None,
            security: None,
            kernel: Some(kernel()),
            arch: Some(std::env::consts::ARCH.into()),
            source: None,
        };
        assert!(differences(&record, "4.2.1").is_empty());
        let other = Record {
            kernel: Some("0.0.1".into()),
            arch: Some("riscv64".into()),
            shim_version: "0.0.0".into(),
            ..record
        };
        let why = differences(&other, "4.3").join("; ");
        for says in [
            "CRIU 4.2.1",
            "kernel 0.0.1",
            "riscv64",
            "containerd-shim-hyperbox-v1 0.0.0",
        ] {
            assert!(why.contains(says), "{says}: {why}");
        }
    }
}

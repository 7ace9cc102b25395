//! OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/...`) and oci-archive tars of
//! them, written deterministically: the JSON documents are `oci_spec`'s types with their
//! object keys sorted.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, HistoryBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, RootFsBuilder, SCHEMA_VERSION,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::layer::{self, EntryKind, LayerEntry};
use super::ImageError;

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_TYPE_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The OCI annotation naming a manifest inside a layout (`oci:DIR:NAME`, `umoci DIR:NAME`).
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation `ctr images import` takes the image name from.
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Gzip level of layer blobs: fixed, since the level changes the bytes.
const GZIP_LEVEL: u32 = 6;

/// A layer's tar on its way into the blob: hashed (diff id), compressed, hashed (digest).
type TarStream = HashingWriter<GzEncoder<HashingWriter<BufWriter<File>>>>;

/// A layer blob written to a layout, with the digest of its uncompressed tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub descriptor: Descriptor,
    pub diff_id: String,
}

/// The runtime part of an image configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunConfig {
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    /// One `created_by` text per layer, for the history.
    pub history: Vec<String>,
}

/// Parts of an image configuration that only some images set (the test images of Kubernetes'
/// CRI suite): left empty, they are not written, so other images keep their bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigExtras {
    /// `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// `User`: `UID`, `NAME`, `UID:GID` or `NAME:GID`.
    pub user: String,
    /// `ExposedPorts` keys, `80/tcp`.
    pub exposed_ports: Vec<String>,
}

/// Writes one image into an OCI image layout directory.
#[derive(Debug)]
pub struct LayoutWriter {
    dir: PathBuf,
    epoch: u64,
    layers: Vec<Layer>,
    extras: ConfigExtras,
}

impl LayoutWriter {
    /// Starts a layout in `dir` (created; it should be empty). Modification times in layers
    /// are clamped to `epoch`, which is also the image's creation time.
    pub fn create(dir: &Path, epoch: u64) -> Result<Self, ImageError> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| ImageError::io("cannot create", &blobs, e))?;
        write_file(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            epoch,
            layers: Vec::new(),
            extras: ConfigExtras::default(),
        })
    }

    /// Writes `entries` as the next layer (a gzip-compressed tar).
    pub fn add_layer(&mut self, entries: &mut [LayerEntry]) -> Result<&Layer, ImageError> {
        let epoch = self.epoch;
        self.add_compressed(|tar| layer::write_tar(entries, epoch, tar))
    }

    /// Adds the tar file at `tar` (made by another tool, e.g. GNU tar's sparse format) as
    /// the next layer, gzip-compressed.
    pub fn add_tar_layer(&mut self, tar: &Path) -> Result<&Layer, ImageError> {
        self.add_compressed(|mut out| {
            let mut file = File::open(tar).map_err(|e| ImageError::io("cannot open", tar, e))?;
            io::copy(&mut file, &mut out).map_err(|e| ImageError::io("cannot read", tar, e))?;
            Ok(out)
        })
    }

    /// Writes the next layer's blob: the tar `write` produces, gzip-compressed, with its
    /// diff id (digest of the tar) and digest (of the compressed blob).
    fn add_compressed(
        &mut self,
        write: impl FnOnce(TarStream) -> Result<TarStream, ImageError>,
    ) -> Result<&Layer, ImageError> {
        let tmp = self.dir.join("blobs/sha256/.layer.tmp");
        let file = File::create(&tmp).map_err(|e| ImageError::io("cannot create", &tmp, e))?;
        let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
        let gz: GzEncoder<HashingWriter<BufWriter<File>>> = GzBuilder::new()
            .mtime(0)
            .operating_system(255)
            .write(compressed, Compression::new(GZIP_LEVEL));
        let tar_stream = write(HashingWriter::new(gz))?;
        let (gz, diff_id, _) = tar_stream.finish();
        let compressed = gz
            .finish()
            .map_err(|e| ImageError::io("cannot compress layer", &tmp, e))?;
        let (file, digest, size) = compressed.finish();
        file.into_inner()
            .map_err(|e| ImageError::io("cannot write", &tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| ImageError::io("cannot write", &tmp, e))?;
        let dest = self.blob_path(&digest);
        fs::rename(&tmp, &dest).map_err(|e| ImageError::io("cannot rename into", &dest, e))?;
        self.layers.push(Layer {
            descriptor: descriptor(MediaType::ImageLayerGzip, &digest, size)?,
            diff_id,
        });
        Ok(self.layers.last().expect("a layer was just pushed"))
    }

    /// Sets the configuration's `Entrypoint`, `User` and `ExposedPorts`.
    pub fn set_extras(&mut self, extras: ConfigExtras) {
        self.extras = extras;
    }

    /// Reuses a layer blob of another layout (hard-linked, or copied across filesystems).
    pub fn add_existing_layer(
        &mut self,
        from_layout: &Path,
        layer: &Layer,
    ) -> Result<(), ImageError> {
        let digest = layer.descriptor.digest().as_ref();
        let src = blob_path(from_layout, digest);
        let dest = self.blob_path(digest);
        link_or_copy(&src, &dest)?;
        self.layers.push(layer.clone());
        Ok(())
    }

    /// Writes the configuration, the manifest and `index.json`; returns the manifest's
    /// descriptor, annotated with the reference names.
    pub fn finish(
        self,
        run: &RunConfig,
        ref_name: &str,
        containerd_name: &str,
    ) -> Result<Written, ImageError> {
        let created = rfc3339_utc(self.epoch);
        let mut run_config = ConfigBuilder::default()
            .env(run.env.clone())
            .cmd(run.cmd.clone())
            .working_dir("/");
        if !self.extras.entrypoint.is_empty() {
            run_config = run_config.entrypoint(self.extras.entrypoint.clone());
        }
        if !self.extras.user.is_empty() {
            run_config = run_config.user(self.extras.user.clone());
        }
        if !self.extras.exposed_ports.is_empty() {
            run_config = run_config.exposed_ports(self.extras.exposed_ports.clone());
        }
        let history = run
            .history
            .iter()
            .map(|h| {
                HistoryBuilder::default()
                    .created(created.clone())
                    .created_by(h.clone())
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(spec_error("image history"))?;
        let rootfs = RootFsBuilder::default()
            .typ("layers")
            .diff_ids(
                self.layers
                    .iter()
                    .map(|l| l.diff_id.clone())
                    .collect::<Vec<_>>(),
            )
            .build()
            .map_err(spec_error("image rootfs"))?;
        let config = ImageConfigurationBuilder::default()
            .created(created.clone())
            .architecture(Arch::Amd64)
            .os(Os::Linux)
            .config(run_config.build().map_err(spec_error("image run config"))?)
            .rootfs(rootfs)
            .history(history)
            .build()
            .map_err(spec_error("image configuration"))?;
        let config_desc = self.add_json_blob(MediaType::ImageConfig, &config)?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageManifest)
            .config(config_desc.clone())
            .layers(
                self.layers
                    .iter()
                    .map(|l| l.descriptor.clone())
                    .collect::<Vec<_>>(),
            )
            .build()
            .map_err(spec_error("image manifest"))?;
        let mut manifest_desc = self.add_json_blob(MediaType::ImageManifest, &manifest)?;
        manifest_desc.set_annotations(Some(HashMap::from([
            (ANNOTATION_REF_NAME.to_owned(), ref_name.to_owned()),
            (
                ANNOTATION_CONTAINERD_NAME.to_owned(),
                containerd_name.to_owned(),
            ),
        ])));
        let index = ImageIndexBuilder::default()
            .schema_version(SCHEMA_VERSION)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![manifest_desc.clone()])
            .build()
            .map_err(spec_error("image index"))?;
        let index_bytes = json_bytes(&index)?;
        write_file(&self.dir.join("index.json"), &index_bytes)?;
        Ok(Written {
            manifest: manifest_desc,
            config: config_desc,
            layers: self.layers,
        })
    }

    fn add_json_blob<T: Serialize>(
        &self,
        media_type: MediaType,
        value: &T,
    ) -> Result<Descriptor, ImageError> {
        let bytes = json_bytes(value)?;
        let digest = sha256_digest(&bytes);
        write_file(&self.blob_path(&digest), &bytes)?;
        descriptor(media_type, &digest, bytes.len() as u64)
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.dir, digest)
    }
}

/// What [`LayoutWriter::finish`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Layer>,
}

/// The path of a blob (`sha256:HEX`) inside a layout.
pub fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    layout.join("blobs/sha256").join(hex)
}

/// Writes the layout directory `layout` as an oci-archive tar (what `ctr images import` and
/// `skopeo copy oci-archive:` read): root-owned entries, modes 0644/0755, times `epoch`.
pub fn write_archive(layout: &Path, archive: &Path, epoch: u64) -> Result<(), ImageError> {
    let mut entries = layer::scan_tree(layout)?;
    for e in &mut entries {
        e.uid = 0;
        e.gid = 0;
        e.mtime = epoch;
        e.xattrs.clear();
        e.mode = match e.kind {
            EntryKind::Directory => 0o755,
            EntryKind::File { .. } => 0o644,
            _ => {
                return Err(ImageError::io(
                    "unexpected non-regular file in image layout",
                    &layout.join(&e.path),
                    io::Error::from(io::ErrorKind::InvalidData),
                ))
            }
        };
    }
    let tmp = archive.with_extension("tmp");
    let file = File::create(&tmp).map_err(|e| ImageError::io("cannot create", &tmp, e))?;
    let out = layer::write_tar(&mut entries, epoch, BufWriter::with_capacity(1 << 20, file))?;
    out.into_inner()
        .map_err(|e| ImageError::io("cannot write", &tmp, e.into_error()))?
        .sync_all()
        .map_err(|e| ImageError::io("cannot write", &tmp, e))?;
    fs::rename(&tmp, archive).map_err(|e| ImageError::io("cannot rename into", archive, e))
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `sha256:HEX` of the file at `path`.
pub fn file_digest(path: &Path) -> Result<String, ImageError> {
    let mut file = File::open(path).map_err(|e| ImageError::io("cannot open", path, e))?;
    let mut hasher = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut hasher).map_err(|e| ImageError::io("cannot read", path, e))?;
    Ok(hasher.finish().1)
}

/// Hard-links `src` to `dest`, copying where a link is impossible; replaces `dest`.
pub(crate) fn link_or_copy(src: &Path, dest: &Path) -> Result<(), ImageError> {
    if dest.exists() {
        fs::remove_file(dest).map_err(|e| ImageError::io("cannot replace", dest, e))?;
    }
    if fs::hard_link(src, dest).is_err() {
        fs::copy(src, dest).map_err(|e| ImageError::io("cannot copy to", dest, e))?;
    }
    Ok(())
}

/// The descriptor of a blob `digest` (`sha256:HEX`) of `size` bytes.
fn descriptor(media_type: MediaType, digest: &str, size: u64) -> Result<Descriptor, ImageError> {
    let digest = digest
        .parse::<oci_spec::image::Digest>()
        .map_err(spec_error("blob digest"))?;
    Ok(Descriptor::new(media_type, size, digest))
}

/// The descriptor of a gzip-compressed layer blob.
pub fn layer_descriptor(digest: &str, size: u64) -> Result<Descriptor, ImageError> {
    descriptor(MediaType::ImageLayerGzip, digest, size)
}

/// `value` as compact JSON with every object's keys sorted: `oci_spec` keeps annotations and
/// `ExposedPorts` in hash maps, whose order would change the bytes from one build to the next.
fn json_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    let json_error = |source| ImageError::Json {
        what: "image metadata".to_owned(),
        source,
    };
    let mut value = serde_json::to_value(value).map_err(json_error)?;
    value.sort_all_objects();
    serde_json::to_vec(&value).map_err(json_error)
}

/// Maps an `oci_spec` builder or parse failure on `what` to [`ImageError::Spec`].
fn spec_error(what: &'static str) -> impl Fn(oci_spec::OciSpecError) -> ImageError {
    move |e| ImageError::Spec {
        what,
        reason: e.to_string(),
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    fs::write(path, bytes).map_err(|e| ImageError::io("cannot write", path, e))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch (proleptic Gregorian calendar).
pub fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}

/// A writer that hashes (SHA-256) and counts what passes through it.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the `sha256:HEX` digest and the byte count.
    pub fn finish(self) -> (W, String, u64) {
        let digest = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        (self.inner, digest, self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_704_067_200), "2024-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_827_696), "2000-02-29T12:34:56Z");
    }

    /// Writes a one-layer layout into a fresh directory named `name`.
    fn write_layout(name: &str) -> (PathBuf, Written) {
        let dir = std::env::temp_dir().join(format!("hb-oci-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut writer = LayoutWriter::create(&dir, 1_704_067_200).unwrap();
        writer
            .add_layer(&mut [LayerEntry::file("hello", 0o644, b"hi".to_vec())])
            .unwrap();
        writer.set_extras(ConfigExtras {
            entrypoint: vec!["/bin/sh".into()],
            user: "1000".into(),
            exposed_ports: vec!["80/tcp".into(), "443/tcp".into(), "53/udp".into()],
        });
        let run = RunConfig {
            cmd: vec!["true".into()],
            env: vec!["PATH=/bin".into()],
            history: vec!["one layer".into()],
        };
        let written = writer.finish(&run, "latest", "r/w:1").unwrap();
        (dir, written)
    }

    fn read_json(path: &Path) -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn a_layout_has_the_oci_documents_and_is_reproducible() {
        let (a, written) = write_layout("a");
        let (b, _) = write_layout("b");
        for file in ["oci-layout", "index.json"] {
            assert!(fs::read(a.join(file)).unwrap() == fs::read(b.join(file)).unwrap());
        }
        let manifest_digest = written.manifest.digest().to_string();
        let config_digest = written.config.digest().to_string();
        let layer = &written.layers[0];
        let layer_digest = layer.descriptor.digest().to_string();
        for digest in [&manifest_digest, &config_digest, &layer_digest] {
            let bytes = fs::read(blob_path(&a, digest)).unwrap();
            assert!(
                bytes == fs::read(blob_path(&b, digest)).unwrap(),
                "{digest}"
            );
            assert_eq!(sha256_digest(&bytes), *digest);
        }
        assert_eq!(
            read_json(&a.join("index.json")),
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_INDEX,
                "manifests": [{
                    "mediaType": MEDIA_TYPE_MANIFEST,
                    "digest": manifest_digest,
                    "size": written.manifest.size(),
                    "annotations": {
                        ANNOTATION_REF_NAME: "latest",
                        ANNOTATION_CONTAINERD_NAME: "r/w:1",
                    },
                }],
            })
        );
        assert_eq!(
            read_json(&blob_path(&a, &manifest_digest)),
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": MEDIA_TYPE_MANIFEST,
                "config": {
                    "mediaType": MEDIA_TYPE_CONFIG,
                    "digest": config_digest,
                    "size": written.config.size(),
                },
                "layers": [{
                    "mediaType": MEDIA_TYPE_LAYER_GZIP,
                    "digest": layer_digest,
                    "size": layer.descriptor.size(),
                }],
            })
        );
        assert_eq!(
            read_json(&blob_path(&a, &config_digest)),
            serde_json::json!({
                "created": "2024-01-01T00:00:00Z",
                "architecture": "amd64",
                "os": "linux",
                "config": {
                    "Env": ["PATH=/bin"],
                    "Cmd": ["true"],
                    "WorkingDir": "/",
                    "Entrypoint": ["/bin/sh"],
                    "User": "1000",
                    "ExposedPorts": { "80/tcp": {}, "443/tcp": {}, "53/udp": {} },
                },
                "rootfs": { "type": "layers", "diff_ids": [layer.diff_id] },
                "history": [{ "created": "2024-01-01T00:00:00Z", "created_by": "one layer" }],
            })
        );
        fs::remove_dir_all(&a).unwrap();
        fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn blob_paths_drop_the_algorithm() {
        assert_eq!(
            blob_path(Path::new("/l"), "sha256:abc"),
            Path::new("/l/blobs/sha256/abc")
        );
    }
}

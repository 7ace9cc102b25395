//! OCI images of WebAssembly guests in runwasi's format, for the wasm shim's tests: an image
//! configuration with `architecture: wasm` (and `os: wasip1`), and layers that are raw
//! WebAssembly binaries (media type `application/wasm` or
//! `application/vnd.bytecodealliance.wasm.component.layer.v0+wasm`), optionally beside
//! ordinary tar layers of files. Written as an OCI image layout, then pushed to a registry
//! with skopeo, keeping its digests, as [`crate::images::push`] does for the test images.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::json;

use crate::images::layer::{write_tar, LayerEntry};
use crate::images::oci::{blob_path, sha256_digest};
use crate::images::rootfs::find_tool;
use crate::images::{ImageError, LAYOUT_REF};

/// runwasi's layer media type for a WebAssembly component (or module).
pub const WASM_COMPONENT_LAYER: &str =
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm";
/// The plain WebAssembly media type, also accepted as a layer.
pub const WASM_LAYER: &str = "application/wasm";
/// An uncompressed tar layer.
pub const TAR_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";

/// A layer of a wasm image: its media type and blob.
#[derive(Debug, Clone)]
pub struct WasmImageLayer {
    pub media_type: String,
    pub blob: Vec<u8>,
}

/// Describes a wasm image; [`WasmImageBuilder::write`] writes its layout.
#[derive(Debug, Clone)]
pub struct WasmImageBuilder {
    architecture: String,
    os: String,
    cmd: Vec<String>,
    env: Vec<String>,
    layers: Vec<WasmImageLayer>,
}

impl Default for WasmImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl WasmImageBuilder {
    /// An image for `wasm`/`wasip1` with no layers and no command.
    pub fn new() -> Self {
        WasmImageBuilder {
            architecture: "wasm".to_owned(),
            os: "wasip1".to_owned(),
            cmd: Vec::new(),
            env: Vec::new(),
            layers: Vec::new(),
        }
    }

    /// A layer of `media_type` holding `blob` as is (a wasm binary, or anything a test
    /// wants the shim to reject).
    pub fn with_layer(mut self, media_type: &str, blob: impl Into<Vec<u8>>) -> Self {
        self.layers.push(WasmImageLayer {
            media_type: media_type.to_owned(),
            blob: blob.into(),
        });
        self
    }

    /// An uncompressed tar layer holding `files` (absolute path, content; mode 0644).
    pub fn with_files(self, files: &[(&str, &[u8])]) -> Result<Self, ImageError> {
        let mut entries: Vec<LayerEntry> = Vec::new();
        for (path, content) in files {
            let rel = Path::new(path.trim_start_matches('/'));
            for dir in rel.ancestors().skip(1) {
                if !dir.as_os_str().is_empty() && !entries.iter().any(|e| e.path.as_path() == dir) {
                    entries.push(LayerEntry::dir(dir, 0o755));
                }
            }
            entries.push(LayerEntry::file(rel, 0o644, content.to_vec()));
        }
        let tar = write_tar(&mut entries, 0, Vec::new())?;
        Ok(self.with_layer(TAR_LAYER, tar))
    }

    /// The configuration's `Cmd` (what `ctr run IMAGE ID` runs without arguments).
    pub fn with_cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = cmd.iter().map(|s| s.to_string()).collect();
        self
    }

    /// An `Env` entry of the configuration (`NAME=value`).
    pub fn with_env(mut self, entry: &str) -> Self {
        self.env.push(entry.to_owned());
        self
    }

    /// The configuration's `architecture` (`wasm` by default).
    pub fn with_architecture(mut self, architecture: &str) -> Self {
        self.architecture = architecture.to_owned();
        self
    }

    /// The configuration's `os` (`wasip1` by default): `linux` with an ordinary architecture
    /// makes an image any Linux platform matcher takes, a `.wasm` file in its tar layers.
    pub fn with_os(mut self, os: &str) -> Self {
        self.os = os.to_owned();
        self
    }

    /// Writes the image as an OCI layout in `dir` (created; tagged [`LAYOUT_REF`]).
    pub fn write(&self, dir: &Path) -> Result<WasmImage, ImageError> {
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io {
                action,
                path,
                source,
            }
        };
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io("cannot create", &blobs))?;
        let put = |bytes: &[u8]| -> Result<String, ImageError> {
            let digest = sha256_digest(bytes);
            let path = blob_path(dir, &digest);
            fs::write(&path, bytes).map_err(io("cannot write", &path))?;
            Ok(digest)
        };
        let mut layers = Vec::new();
        let mut diff_ids = Vec::new();
        for layer in &self.layers {
            let digest = put(&layer.blob)?;
            // Only tar layers are part of the root filesystem: containerd (1.7.7 on) unpacks
            // the layers of tar media types and wants exactly as many diff_ids.
            if layer.media_type == TAR_LAYER {
                diff_ids.push(digest.clone());
            }
            layers.push(json!({
                "mediaType": layer.media_type,
                "digest": digest,
                "size": layer.blob.len(),
            }));
        }
        let mut run = serde_json::Map::new();
        if !self.cmd.is_empty() {
            run.insert("Cmd".into(), json!(self.cmd));
        }
        if !self.env.is_empty() {
            run.insert("Env".into(), json!(self.env));
        }
        let config = json!({
            "architecture": self.architecture,
            "os": self.os,
            "config": run,
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
        });
        let config = to_json(&config, "the image configuration")?;
        let config_digest = put(&config)?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers,
        });
        let manifest = to_json(&manifest, "the image manifest")?;
        let manifest_digest = put(&manifest)?;
        let index = json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "annotations": { "org.opencontainers.image.ref.name": LAYOUT_REF },
            }],
        });
        let index_path = dir.join("index.json");
        fs::write(&index_path, to_json(&index, "the image index")?)
            .map_err(io("cannot write", &index_path))?;
        let layout = dir.join("oci-layout");
        fs::write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io("cannot write", &layout))?;
        Ok(WasmImage {
            layout_dir: dir.to_path_buf(),
            manifest_digest,
            config_digest,
            layer_digests: self.layers.iter().map(|l| sha256_digest(&l.blob)).collect(),
        })
    }
}

fn to_json(value: &serde_json::Value, what: &str) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec(value).map_err(|source| ImageError::Json {
        what: what.to_owned(),
        source,
    })
}

/// A wasm image written as an OCI layout.
#[derive(Debug, Clone)]
pub struct WasmImage {
    pub layout_dir: PathBuf,
    /// `sha256:HEX` of the manifest, the configuration and each layer.
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

impl WasmImage {
    /// Pushes the image to the registry `registry` (`HOST:PORT`, plain HTTP) as
    /// `REGISTRY/REPO_TAG`, digests kept, and returns that reference.
    pub fn push(&self, registry: &str, repo_tag: &str) -> Result<String, ImageError> {
        let skopeo = find_tool("skopeo", "skopeo")?;
        let src = format!("oci:{}:{LAYOUT_REF}", self.layout_dir.display());
        let reference = format!("{registry}/{repo_tag}");
        let dest = format!("docker://{reference}");
        let out = Command::new(&skopeo)
            .args([
                "copy",
                "--insecure-policy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
                &src,
                &dest,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| ImageError::Io {
                action: "cannot run",
                path: skopeo.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(ImageError::Command {
                command: format!("skopeo copy {src} {dest}"),
                status: out.status.to_string(),
                output_tail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(reference)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tar_layers_are_part_of_the_rootfs() {
        let dir = std::env::temp_dir().join(format!("hb-wasm-image-{}", std::process::id()));
        let image = WasmImageBuilder::new()
            .with_files(&[("/data/a.txt", b"a")])
            .unwrap()
            .with_layer(WASM_LAYER, b"\0asm\x01\0\0\0".to_vec())
            .with_cmd(&["app.wasm"])
            .write(&dir)
            .unwrap();
        let read = |digest: &str| -> serde_json::Value {
            serde_json::from_slice(&fs::read(blob_path(&dir, digest)).unwrap()).unwrap()
        };
        let config = read(&image.config_digest);
        assert_eq!(config["architecture"], "wasm");
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([image.layer_digests[0]])
        );
        assert_eq!(config["config"]["Cmd"], json!(["app.wasm"]));
        let manifest = read(&image.manifest_digest);
        assert_eq!(manifest["layers"][0]["mediaType"], TAR_LAYER);
        assert_eq!(manifest["layers"][1]["mediaType"], WASM_LAYER);
        assert_eq!(manifest["layers"][1]["digest"], image.layer_digests[1]);
        fs::remove_dir_all(&dir).unwrap();
    }
}

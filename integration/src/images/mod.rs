//! Offline test images, built reproducibly from Debian packages and cached.
//!
//! Three images, each written as an OCI image layout directory and as an oci-archive tar of it
//! (for `ctr images import`):
//!
//! - `busybox`: the host's static busybox (Debian's `busybox-static`) with `/bin/sh`, a symlink
//!   per applet, and a minimal `/etc` (users `root`, `nobody`, `hbuser` 1000:1000); `sh`;
//! - `debian`: Debian 12 from `debootstrap --variant=minbase`; `bash`;
//! - `debian-python`: the `debian` layer (the same blob) plus a layer with what
//!   `--include=python3` adds, changes and removes (as whiteouts); `python3`.
//!
//! Two builds from scratch give byte-identical blobs: layers are written by
//! [`layer::write_tar`] (sorted entries, clamped times, no owner names, fixed gzip settings),
//! debootstrap trees are normalized by [`rootfs::normalize`], and every timestamp is the
//! build's `SOURCE_DATE_EPOCH` (default 2024-01-01).
//!
//! Everything is cached under `HYPERBOX_CACHE` (default `/var/cache/hyperbox`):
//!
//! ```text
//! debootstrap/bookworm-amd64/          downloaded .debs (shared even by --no-cache builds)
//! rootfs/NAME/KEY/tree/                normalized debootstrap trees
//! images/NAME/KEY/{oci/,image.tar,image.json}
//! ```
//!
//! where `KEY` is the SHA-256 of the recipe (format version, parameters, the busybox binary's
//! hash, the debootstrap suite and package list), so a changed recipe never hits a stale entry.
//! Entries are built under `KEY.partial`, renamed into place when complete, and guarded by
//! `KEY.lock` (flock), so concurrent builders wait for each other.

pub mod cri;
pub mod installer;
pub mod layer;
pub mod oci;
pub mod rootfs;

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::Descriptor;
use serde::{Deserialize, Serialize};

use self::layer::LayerEntry;
use self::oci::{Layer, LayoutWriter, RunConfig};
use self::rootfs::DebootstrapRecipe;

/// Version of the image writer; part of every cache key. Bump it when the bytes of a layer,
/// configuration, manifest or archive change for the same recipe.
pub const FORMAT_VERSION: u32 = 2;
/// Version of the rootfs recipe (debootstrap invocation and [`rootfs::normalize`]); part of
/// the rootfs cache keys.
pub const ROOTFS_VERSION: u32 = 1;
/// Default `SOURCE_DATE_EPOCH`: 2024-01-01T00:00:00Z.
pub const DEFAULT_SOURCE_DATE_EPOCH: u64 = 1_704_067_200;
/// The name every image has inside its layout (`oci:DIR:latest`, `umoci ... DIR:latest`).
pub const LAYOUT_REF: &str = "latest";

/// Errors of building and pushing test images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "`{tool}` was not found on PATH: install the Debian package `{package}` \
         (scripts/setup-host does)"
    )]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
    },
    #[error(
        "the Debian test images are amd64 and are debootstrapped natively: this host is {arch}"
    )]
    UnsupportedHost { arch: &'static str },
    #[error("cannot use busybox at {}: {reason}", path.display())]
    Busybox { path: PathBuf, reason: String },
    #[error(
        "no Debian mirror for suite `{suite}` in the machine's apt sources \
         (/etc/apt/sources.list.d/*.sources, /etc/apt/sources.list): add one, or set \
         HYPERBOX_DEBIAN_MIRROR"
    )]
    NoMirror { suite: String },
    #[error("`{command}` failed ({status}):\n{output_tail}")]
    Command {
        command: String,
        status: String,
        output_tail: String,
    },
    #[error("cannot encode or decode {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid OCI {what}: {reason}")]
    Spec { what: &'static str, reason: String },
    #[error("unknown test image `{0}`: expected busybox, debian, debian-python or all")]
    UnknownImage(String),
    #[error("invalid SOURCE_DATE_EPOCH `{value}`: {reason}")]
    SourceDateEpoch { value: String, reason: String },
    #[error(
        "the registry {registry} serves {reference} with manifest digest {actual}, not the \
         built {expected}"
    )]
    DigestMismatch {
        registry: String,
        reference: String,
        expected: String,
        actual: String,
    },
}

impl ImageError {
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The test images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TestImage {
    Busybox,
    Debian,
    DebianPython,
}

impl TestImage {
    /// All images, dependencies first.
    pub fn all() -> [TestImage; 3] {
        [Self::Busybox, Self::Debian, Self::DebianPython]
    }

    /// `busybox`, `debian`, `debian-python`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Busybox => "busybox",
            Self::Debian => "debian",
            Self::DebianPython => "debian-python",
        }
    }

    /// The name `ctr images import` gives the image: `docker.io/hyperbox/NAME:latest`.
    pub fn reference(self) -> String {
        format!("docker.io/hyperbox/{}:{LAYOUT_REF}", self.name())
    }

    /// The image's default command.
    pub fn cmd(self) -> &'static [&'static str] {
        match self {
            Self::Busybox => &["sh"],
            Self::Debian => &["bash"],
            Self::DebianPython => &["python3"],
        }
    }

    /// The debootstrap recipe of the image's root filesystem, for the Debian images.
    fn debootstrap(self) -> Option<DebootstrapRecipe> {
        let base = DebootstrapRecipe {
            suite: "bookworm",
            variant: "minbase",
            arch: "amd64",
            include: &[],
        };
        match self {
            Self::Busybox => None,
            Self::Debian => Some(base),
            Self::DebianPython => Some(DebootstrapRecipe {
                include: &["python3"],
                ..base
            }),
        }
    }
}

impl fmt::Display for TestImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TestImage {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::all()
            .into_iter()
            .find(|i| i.name() == s)
            .ok_or_else(|| ImageError::UnknownImage(s.to_owned()))
    }
}

/// How to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Cache root (`HYPERBOX_CACHE`, default `/var/cache/hyperbox`).
    pub cache_root: PathBuf,
    /// Build from scratch: ignore cached root filesystems and images (the download cache of
    /// `.deb` files is still used). Without `out_dir` the results replace the cache entries;
    /// with it, the cache is not touched.
    pub no_cache: bool,
    /// Put each image in `OUT/NAME/` (`oci/`, `image.tar`, `image.json`) instead of leaving it
    /// in the cache.
    pub out_dir: Option<PathBuf>,
    /// Timestamps of the images, seconds since 1970 (`SOURCE_DATE_EPOCH`, default
    /// [`DEFAULT_SOURCE_DATE_EPOCH`]); must not be in the future.
    pub source_date_epoch: u64,
}

impl BuildOptions {
    /// Options from the environment (`HYPERBOX_CACHE`, `SOURCE_DATE_EPOCH`): cached, in the
    /// cache.
    pub fn from_env() -> Result<Self, ImageError> {
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.is_empty() => v.parse().map_err(|_| ImageError::SourceDateEpoch {
                value: v.clone(),
                reason: "not a number of seconds".to_owned(),
            })?,
            _ => DEFAULT_SOURCE_DATE_EPOCH,
        };
        Ok(Self {
            source_date_epoch,
            ..Self::defaults()
        })
    }

    /// The default options: the cache, [`DEFAULT_SOURCE_DATE_EPOCH`].
    fn defaults() -> Self {
        Self {
            cache_root: crate::host::cache_root(),
            no_cache: false,
            out_dir: None,
            source_date_epoch: DEFAULT_SOURCE_DATE_EPOCH,
        }
    }

    pub fn with_cache_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_root = dir.into();
        self
    }

    pub fn with_no_cache(mut self, yes: bool) -> Self {
        self.no_cache = yes;
        self
    }

    pub fn with_out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    pub fn with_source_date_epoch(mut self, epoch: u64) -> Self {
        self.source_date_epoch = epoch;
        self
    }
}

impl Default for BuildOptions {
    /// [`BuildOptions::from_env`]; an invalid `SOURCE_DATE_EPOCH` is reported and replaced by
    /// [`DEFAULT_SOURCE_DATE_EPOCH`].
    fn default() -> Self {
        Self::from_env().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "using the default SOURCE_DATE_EPOCH");
            Self::defaults()
        })
    }
}

/// A built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub image: TestImage,
    /// `busybox`, `debian`, `debian-python`.
    pub name: String,
    /// The name the archive imports as (`docker.io/hyperbox/NAME:latest`).
    pub reference: String,
    /// The OCI image layout directory; the image is tagged [`LAYOUT_REF`] in it.
    pub layout_dir: PathBuf,
    /// The oci-archive tar of the layout.
    pub archive: PathBuf,
    /// `sha256:HEX` of the manifest.
    pub manifest_digest: String,
    /// `sha256:HEX` of the configuration.
    pub config_digest: String,
    /// `sha256:HEX` of each compressed layer blob, base first.
    pub layer_digests: Vec<String>,
    /// `sha256:HEX` of each uncompressed layer tar (the configuration's `diff_ids`).
    pub diff_ids: Vec<String>,
    /// Compressed size of the image: manifest, configuration and layers, in bytes.
    pub size: u64,
    /// True when this call found the image in the cache.
    pub from_cache: bool,
}

impl BuiltImage {
    /// Adds every layer of this image, bottom first, to `writer` (a `FROM` this image).
    pub fn add_layers_to(&self, writer: &mut oci::LayoutWriter) -> Result<(), ImageError> {
        for (digest, diff_id) in self.layer_digests.iter().zip(&self.diff_ids) {
            let blob = self.blob_path(digest);
            let size = fs::metadata(&blob)
                .map_err(|e| ImageError::io("cannot stat", &blob, e))?
                .len();
            let layer = oci::Layer {
                descriptor: oci::layer_descriptor(digest, size)?,
                diff_id: diff_id.clone(),
            };
            writer.add_existing_layer(&self.layout_dir, &layer)?;
        }
        Ok(())
    }

    /// The path of a blob of the image's layout.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        oci::blob_path(&self.layout_dir, digest)
    }

    fn from_record(image: TestImage, dir: &Path, rec: &ImageRecord, from_cache: bool) -> Self {
        Self {
            image,
            name: image.name().to_owned(),
            reference: image.reference(),
            layout_dir: dir.join(LAYOUT_DIR),
            archive: dir.join(ARCHIVE),
            manifest_digest: rec.manifest.digest().to_string(),
            config_digest: rec.config.digest().to_string(),
            layer_digests: rec.layers.iter().map(|l| l.digest.clone()).collect(),
            diff_ids: rec.layers.iter().map(|l| l.diff_id.clone()).collect(),
            size: rec.manifest.size()
                + rec.config.size()
                + rec.layers.iter().map(|l| l.size).sum::<u64>(),
            from_cache,
        }
    }
}

/// Builds one image (and the images it is made from), or finds it in the cache.
pub fn build(image: TestImage, opts: &BuildOptions) -> Result<BuiltImage, ImageError> {
    let mut built = build_all(&[image], opts)?;
    Ok(built.remove(0))
}

/// Builds several images in one go, in the order given; within the call each image and root
/// filesystem is built at most once, also with [`BuildOptions::no_cache`].
pub fn build_all(images: &[TestImage], opts: &BuildOptions) -> Result<Vec<BuiltImage>, ImageError> {
    check_epoch(opts.source_date_epoch)?;
    let private_store = match (&opts.out_dir, opts.no_cache) {
        (Some(out), true) => Some(out.join(format!(".hyperbox-build-{}", std::process::id()))),
        _ => None,
    };
    let mut session = Session {
        opts,
        store: private_store
            .clone()
            .unwrap_or_else(|| opts.cache_root.clone()),
        images: HashMap::new(),
        trees: HashMap::new(),
    };
    let result = (|| {
        let mut out = Vec::new();
        for &image in images {
            let (dir, rec, from_cache) = session.image(image)?;
            let built = match &opts.out_dir {
                Some(out_dir) => {
                    let dest = out_dir.join(image.name());
                    export_entry(&dir, &dest)?;
                    BuiltImage::from_record(image, &dest, &rec, from_cache)
                }
                None => BuiltImage::from_record(image, &dir, &rec, from_cache),
            };
            out.push(built);
        }
        Ok(out)
    })();
    if let Some(store) = private_store {
        if let Err(e) = remove_tree(&store) {
            tracing::warn!(error = %e, "cannot remove the private build store");
        }
    }
    result
}

/// Pushes a built image to a registry on loopback as `REGISTRY/REPO_TAG` with skopeo, keeping
/// its digests, and checks that the registry serves the same manifest digest.
pub fn push(image: &BuiltImage, registry: &str, repo_tag: &str) -> Result<(), ImageError> {
    push_layout(
        &image.layout_dir,
        &image.manifest_digest,
        registry,
        repo_tag,
    )?;
    tracing::info!(image = %image.name, registry, repo_tag, "pushed");
    Ok(())
}

/// Pushes the image tagged [`LAYOUT_REF`] in the OCI layout `layout` to `REGISTRY/REPO_TAG`
/// with skopeo, keeping its digests, and checks that the registry serves `manifest_digest`.
pub fn push_layout(
    layout: &Path,
    manifest_digest: &str,
    registry: &str,
    repo_tag: &str,
) -> Result<(), ImageError> {
    let skopeo = rootfs::find_tool("skopeo", "skopeo")?;
    let src = format!("oci:{}:{LAYOUT_REF}", layout.display());
    let dest = format!("docker://{registry}/{repo_tag}");
    run_tool(
        Command::new(&skopeo).args([
            "copy",
            "--insecure-policy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            &src,
            &dest,
        ]),
        &format!("skopeo copy {src} {dest}"),
    )?;
    let raw = run_tool(
        Command::new(&skopeo).args(["inspect", "--raw", "--tls-verify=false", &dest]),
        &format!("skopeo inspect --raw {dest}"),
    )?;
    let actual = oci::sha256_digest(&raw);
    if actual != manifest_digest {
        return Err(ImageError::DigestMismatch {
            registry: registry.to_owned(),
            reference: repo_tag.to_owned(),
            expected: manifest_digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<Vec<u8>, ImageError> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io("cannot run", Path::new(what), e))?;
    if !output.status.success() {
        return Err(ImageError::Command {
            command: what.to_owned(),
            status: output.status.to_string(),
            output_tail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output.stdout)
}

fn check_epoch(epoch: u64) -> Result<(), ImageError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if epoch > now {
        return Err(ImageError::SourceDateEpoch {
            value: epoch.to_string(),
            reason: "it is in the future, so times of the build would not be clamped".to_owned(),
        });
    }
    Ok(())
}

const LAYOUT_DIR: &str = "oci";
const ARCHIVE: &str = "image.tar";
const RECORD: &str = "image.json";
const RECIPE: &str = "recipe.txt";

/// What `image.json` holds: the descriptors of a built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageRecord {
    name: String,
    manifest: Descriptor,
    config: Descriptor,
    layers: Vec<LayerRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerRecord {
    digest: String,
    size: u64,
    diff_id: String,
}

impl LayerRecord {
    fn to_layer(&self) -> Result<Layer, ImageError> {
        Ok(Layer {
            descriptor: oci::layer_descriptor(&self.digest, self.size)?,
            diff_id: self.diff_id.clone(),
        })
    }
}

/// One build call: where entries go and what it has built or found so far.
struct Session<'a> {
    opts: &'a BuildOptions,
    /// Root of `rootfs/` and `images/` entries: the cache, or a private directory.
    store: PathBuf,
    images: HashMap<TestImage, (PathBuf, ImageRecord, bool)>,
    trees: HashMap<TestImage, PathBuf>,
}

impl Session<'_> {
    fn epoch(&self) -> u64 {
        self.opts.source_date_epoch
    }

    /// The recipe text of an image's root filesystem.
    fn rootfs_recipe(&self, image: TestImage) -> Option<String> {
        let recipe = image.debootstrap()?;
        Some(format!(
            "hyperbox rootfs v{ROOTFS_VERSION}\nimage={}\n{}source_date_epoch={}\n",
            image.name(),
            recipe.describe(),
            self.epoch()
        ))
    }

    /// The recipe text of an image.
    fn image_recipe(&self, image: TestImage) -> Result<String, ImageError> {
        let mut text = format!(
            "hyperbox image v{FORMAT_VERSION}\nimage={}\ncmd={:?}\nenv={}\nsource_date_epoch={}\n",
            image.name(),
            image.cmd(),
            rootfs::IMAGE_PATH,
            self.epoch()
        );
        match image {
            TestImage::Busybox => {
                let busybox = rootfs::find_busybox()?;
                text.push_str(&format!("busybox_sha256={}\n", oci::file_digest(&busybox)?));
            }
            TestImage::Debian => {
                text.push_str(&format!(
                    "rootfs={}\n",
                    key_of(&self.rootfs_recipe(image).unwrap_or_default())
                ));
            }
            TestImage::DebianPython => {
                text.push_str(&format!(
                    "base_image={}\nrootfs_lower={}\nrootfs_upper={}\n",
                    key_of(&self.image_recipe(TestImage::Debian)?),
                    key_of(&self.rootfs_recipe(TestImage::Debian).unwrap_or_default()),
                    key_of(&self.rootfs_recipe(image).unwrap_or_default()),
                ));
            }
        }
        Ok(text)
    }

    /// The image's cache entry, built if needed: (entry directory, record, from cache).
    fn image(&mut self, image: TestImage) -> Result<(PathBuf, ImageRecord, bool), ImageError> {
        if let Some(found) = self.images.get(&image) {
            return Ok(found.clone());
        }
        let recipe = self.image_recipe(image)?;
        let entry = self
            .store
            .join("images")
            .join(image.name())
            .join(key_of(&recipe));
        let _lock = EntryLock::acquire(&entry)?;
        let record_path = entry.join(RECORD);
        let found = if !self.opts.no_cache && record_path.is_file() {
            let rec = read_record(&record_path)?;
            tracing::info!(image = image.name(), entry = %entry.display(), "image found in the cache");
            (entry, rec, true)
        } else {
            let started = Instant::now();
            let partial = prepare_partial(&entry)?;
            write(&partial.join(RECIPE), recipe.as_bytes())?;
            let rec = self.write_image(image, &partial)?;
            write(&partial.join(RECORD), &json(&rec)?)?;
            commit_partial(&partial, &entry)?;
            tracing::info!(
                image = image.name(),
                digest = %rec.manifest.digest(),
                seconds = started.elapsed().as_secs_f64(),
                "image built"
            );
            (entry, rec, false)
        };
        self.images.insert(image, found.clone());
        Ok(found)
    }

    /// Writes the layout and the archive of `image` into `dir`.
    fn write_image(&mut self, image: TestImage, dir: &Path) -> Result<ImageRecord, ImageError> {
        let epoch = self.epoch();
        let layout = dir.join(LAYOUT_DIR);
        let mut writer = LayoutWriter::create(&layout, epoch)?;
        let mut history = Vec::new();
        match image {
            TestImage::Busybox => {
                let busybox = rootfs::find_busybox()?;
                let mut entries = rootfs::busybox_entries(&busybox, epoch)?;
                writer.add_layer(&mut entries)?;
                history.push("hyperbox-testimg: busybox-static with applet symlinks".to_owned());
            }
            TestImage::Debian => {
                let tree = self.rootfs_tree(image)?;
                let mut entries = layer::scan_tree(&tree)?;
                writer.add_layer(&mut entries)?;
                history.push(debootstrap_history(image));
            }
            TestImage::DebianPython => {
                let (base_dir, base, _) = self.image(TestImage::Debian)?;
                for l in &base.layers {
                    writer.add_existing_layer(&base_dir.join(LAYOUT_DIR), &l.to_layer()?)?;
                    history.push(debootstrap_history(TestImage::Debian));
                }
                let lower = layer::scan_tree(&self.rootfs_tree(TestImage::Debian)?)?;
                let upper = layer::scan_tree(&self.rootfs_tree(image)?)?;
                let mut diff: Vec<LayerEntry> = layer::diff_entries(&lower, &upper, epoch)?;
                tracing::info!(
                    entries = diff.len(),
                    "python layer: difference of the two trees"
                );
                writer.add_layer(&mut diff)?;
                history.push(debootstrap_history(image));
            }
        }
        let run = RunConfig {
            cmd: image.cmd().iter().map(|s| (*s).to_owned()).collect(),
            env: vec![rootfs::IMAGE_PATH.to_owned()],
            history,
        };
        let written = writer.finish(&run, LAYOUT_REF, &image.reference())?;
        oci::write_archive(&layout, &dir.join(ARCHIVE), epoch)?;
        let mut manifest = written.manifest;
        manifest.set_annotations(None);
        Ok(ImageRecord {
            name: image.name().to_owned(),
            manifest,
            config: written.config,
            layers: written
                .layers
                .iter()
                .map(|l| LayerRecord {
                    digest: l.descriptor.digest().to_string(),
                    size: l.descriptor.size(),
                    diff_id: l.diff_id.clone(),
                })
                .collect(),
        })
    }

    /// The normalized root filesystem tree of a Debian image, debootstrapped if needed.
    fn rootfs_tree(&mut self, image: TestImage) -> Result<PathBuf, ImageError> {
        if let Some(tree) = self.trees.get(&image) {
            return Ok(tree.clone());
        }
        let (Some(recipe), Some(text)) = (image.debootstrap(), self.rootfs_recipe(image)) else {
            return Err(ImageError::UnknownImage(format!(
                "{image} (no root filesystem tree)"
            )));
        };
        let entry = self
            .store
            .join("rootfs")
            .join(image.name())
            .join(key_of(&text));
        let tree = entry.join("tree");
        let _lock = EntryLock::acquire(&entry)?;
        if !self.opts.no_cache && tree.is_dir() {
            tracing::info!(image = image.name(), tree = %tree.display(), "rootfs found in the cache");
        } else {
            let partial = prepare_partial(&entry)?;
            write(&partial.join(RECIPE), text.as_bytes())?;
            let deb_cache = self
                .opts
                .cache_root
                .join("debootstrap")
                .join(format!("{}-{}", recipe.suite, recipe.arch));
            fs::create_dir_all(&deb_cache)
                .map_err(|e| ImageError::io("cannot create", &deb_cache, e))?;
            let mirror = rootfs::debian_mirror(recipe.suite)?;
            let started = Instant::now();
            {
                // debootstrap writes downloads into the shared .deb cache in place, so a run
                // that may download holds the cache exclusively. Once a recipe's packages have
                // all been fetched (the marker), its runs only read the cache and may run side
                // by side.
                let complete = deb_cache.join(format!(".complete-{}", key_of(&recipe.describe())));
                let _deb_lock = if complete.is_file() {
                    EntryLock::acquire_shared(&deb_cache)?
                } else {
                    EntryLock::acquire(&deb_cache)?
                };
                let result = rootfs::debootstrap(
                    &recipe,
                    &partial.join("tree"),
                    &deb_cache,
                    &mirror,
                    &partial.join("debootstrap.log"),
                );
                crate::sandbox::unmount_under(&partial);
                result?;
                write(&complete, recipe.describe().as_bytes())?;
            }
            let debootstrapped = started.elapsed();
            rootfs::normalize(&partial.join("tree"), self.epoch())?;
            commit_partial(&partial, &entry)?;
            tracing::info!(
                image = image.name(),
                debootstrap_seconds = debootstrapped.as_secs_f64(),
                total_seconds = started.elapsed().as_secs_f64(),
                "rootfs built"
            );
        }
        self.trees.insert(image, tree.clone());
        Ok(tree)
    }
}

fn debootstrap_history(image: TestImage) -> String {
    image
        .debootstrap()
        .map(|r| r.command_line())
        .unwrap_or_default()
}

/// Hex SHA-256 of a recipe text: the cache key.
fn key_of(recipe: &str) -> String {
    oci::sha256_digest(recipe.as_bytes())
        .trim_start_matches("sha256:")
        .to_owned()
}

fn read_record(path: &Path) -> Result<ImageRecord, ImageError> {
    read_json(path)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ImageError> {
    let bytes = fs::read(path).map_err(|e| ImageError::io("cannot read", path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Json {
        what: path.display().to_string(),
        source,
    })
}

fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, ImageError> {
    serde_json::to_vec_pretty(value).map_err(|source| ImageError::Json {
        what: "image record".to_owned(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    fs::write(path, bytes).map_err(|e| ImageError::io("cannot write", path, e))
}

/// A flock on `ENTRY.lock`, held while an entry is looked up or built.
#[derive(Debug)]
struct EntryLock {
    _flock: Flock<File>,
}

impl EntryLock {
    fn acquire(entry: &Path) -> Result<Self, ImageError> {
        Self::lock(entry, FlockArg::LockExclusive)
    }

    /// A shared lock: excludes only holders of the exclusive one.
    fn acquire_shared(entry: &Path) -> Result<Self, ImageError> {
        Self::lock(entry, FlockArg::LockShared)
    }

    fn lock(entry: &Path, arg: FlockArg) -> Result<Self, ImageError> {
        let path = with_suffix(entry, ".lock");
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(|e| ImageError::io("cannot create", parent, e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ImageError::io("cannot open lock", &path, e))?;
        let flock = Flock::lock(file, arg)
            .map_err(|(_, errno)| ImageError::io("cannot lock", &path, errno.into()))?;
        Ok(Self { _flock: flock })
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A fresh `ENTRY.partial` directory (a leftover of an interrupted build is removed first).
fn prepare_partial(entry: &Path) -> Result<PathBuf, ImageError> {
    let partial = with_suffix(entry, ".partial");
    remove_tree(&partial)?;
    fs::create_dir_all(&partial).map_err(|e| ImageError::io("cannot create", &partial, e))?;
    Ok(partial)
}

/// Moves a complete `ENTRY.partial` to `ENTRY`, replacing an older entry.
fn commit_partial(partial: &Path, entry: &Path) -> Result<(), ImageError> {
    remove_tree(entry)?;
    fs::rename(partial, entry).map_err(|e| ImageError::io("cannot rename into", entry, e))
}

/// Removes a directory tree, first detaching anything mounted under it (a debootstrap that
/// was killed leaves `/proc` and `/sys` mounted in its target).
fn remove_tree(dir: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    crate::sandbox::unmount_under(dir);
    fs::remove_dir_all(dir).map_err(|e| ImageError::io("cannot remove", dir, e))
}

/// Copies a built image entry to `dest` (blobs and archive hard-linked where possible).
fn export_entry(entry: &Path, dest: &Path) -> Result<(), ImageError> {
    remove_tree(dest)?;
    copy_dir(entry, dest)
}

fn copy_dir(src: &Path, dest: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(dest).map_err(|e| ImageError::io("cannot create", dest, e))?;
    for entry in fs::read_dir(src).map_err(|e| ImageError::io("cannot read directory", src, e))? {
        let entry = entry.map_err(|e| ImageError::io("cannot read directory", src, e))?;
        let from = entry.path();
        let to = dest.join(entry.file_name());
        let ft = entry
            .file_type()
            .map_err(|e| ImageError::io("cannot stat", &from, e))?;
        if ft.is_dir() {
            copy_dir(&from, &to)?;
        } else {
            oci::link_or_copy(&from, &to)?;
        }
    }
    Ok(())
}

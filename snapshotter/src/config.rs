//! The configuration file (`/etc/hyperbox/snapshotter.toml`), read once at start-up.
//!
//! Every option has a default; `config/snapshotter.toml` shows each one.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration file is looked for when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/hyperbox/snapshotter.toml";
/// Default state and layer directory.
pub const DEFAULT_ROOT: &str = "/var/lib/hyperbox/snapshotter";
/// Default socket, the address containerd's `[proxy_plugins.hyperbox]` names.
pub const DEFAULT_ADDRESS: &str = "/run/hyperbox/snapshotter.sock";
/// Default socket of the EROFS differ, the address containerd's `[proxy_plugins.hyperbox-differ]`
/// names.
pub const DEFAULT_DIFFER_ADDRESS: &str = "/run/hyperbox/differ.sock";
/// Default containerd socket: the differ reads layers from containerd's content store and
/// hands it the layers it does not unpack itself.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// Default socket mode: only root (containerd) may connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config option `{option}` must be an absolute path, got {value:?}")]
    NotAbsolute {
        option: &'static str,
        value: PathBuf,
    },
    #[error("config option `socket_mode` must be a file mode between 0o000 and 0o777, got {0:#o}")]
    SocketMode(u32),
    #[error(
        "config option `root` ({0}) must not contain `,` or `:`: they separate overlayfs mount \
         options"
    )]
    RootSeparator(PathBuf),
    #[error("config option `mount_mode` must be \"file\", \"loop\" or \"auto\", got {0:?}")]
    MountMode(String),
    #[error("config option `{0}` must be at least 1")]
    Zero(&'static str),
    #[error("config option `address` ({address}) must not lie inside `root` ({root})")]
    AddressInRoot { address: PathBuf, root: PathBuf },
}

/// The snapshotter's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory holding the database and every layer (default
    /// `/var/lib/hyperbox/snapshotter`). Created with mode 0700.
    pub root: PathBuf,
    /// Unix socket serving the snapshots API (default `/run/hyperbox/snapshotter.sock`).
    pub address: PathBuf,
    /// Mode of the socket file (default `0o600`: root only).
    pub socket_mode: u32,
    /// Log filter in `tracing_subscriber::EnvFilter` syntax (default `info`); `RUST_LOG`
    /// overrides it.
    pub log_level: String,
    /// Convert committed layers to EROFS images over the chunk store (default `true`);
    /// `false` keeps them as plain directories. Layers converted earlier stay converted.
    pub convert: bool,
    /// How EROFS images are mounted: `"file"` (file-backed, Linux 6.12+), `"loop"` (loop
    /// devices) or `"auto"` (file-backed where the kernel supports it, else loop devices).
    /// Default `"auto"`.
    pub mount_mode: String,
    /// Deepest directory nesting a layer may have to be converted (default 4096).
    pub max_depth: u32,
    /// Most inodes a layer may hold to be converted (default 2,000,000; the conversion
    /// keeps a few hundred bytes per inode in memory).
    pub max_inodes: u64,
    /// Largest EROFS image one layer may need (default 1 GiB). Chunk indexes take 8 bytes
    /// per 64 KiB of file, holes included: a 1 TiB sparse file needs 128 MiB.
    pub max_image_bytes: u64,
    /// Longest one conversion may take, in seconds (default 600).
    pub conversion_timeout_s: u64,
    /// Give each image's top layer one merged EROFS image presenting all the image's
    /// layers flattened (default `true`): a container's root is then one EROFS mount under
    /// its upper dir whatever the image's depth. `false` keeps an overlay of every layer.
    pub merge_layers: bool,
    /// Layers converted at once (default 2). Each conversion takes a core while it runs,
    /// and at most four write to the chunk store at a time (one per pack file).
    pub conversion_workers: u32,
    /// Unix socket serving containerd's diff API (containerd 2.x's `type = "diff"` proxy
    /// plugin): layers unpacked into this snapshotter become EROFS images straight from
    /// their archives, with no directory written and no conversion after. Default
    /// `/run/hyperbox/differ.sock`; empty: no differ.
    pub differ_address: PathBuf,
    /// containerd's socket (default `/run/containerd/containerd.sock`): the differ reads
    /// layer blobs from its content store and hands it the unpacks it does not do itself.
    pub containerd_address: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            socket_mode: DEFAULT_SOCKET_MODE,
            log_level: "info".to_string(),
            convert: true,
            mount_mode: "auto".to_string(),
            max_depth: hyperbox_erofs::DEFAULT_MAX_DEPTH,
            max_inodes: hyperbox_erofs::DEFAULT_MAX_INODES,
            max_image_bytes: hyperbox_erofs::DEFAULT_MAX_IMAGE_BYTES,
            conversion_timeout_s: 600,
            merge_layers: true,
            conversion_workers: 2,
            differ_address: PathBuf::from(DEFAULT_DIFFER_ADDRESS),
            containerd_address: PathBuf::from(DEFAULT_CONTAINERD_ADDRESS),
        }
    }
}

impl Config {
    /// Parses a configuration from TOML text (`path` names it in errors) and validates it.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Whether the differ is served (`differ_address` is not empty).
    pub fn differ_enabled(&self) -> bool {
        !self.differ_address.as_os_str().is_empty()
    }

    /// The EROFS mount mode `mount_mode` names.
    pub fn erofs_mount_mode(&self) -> Result<hyperbox_erofs::MountMode, ConfigError> {
        match self.mount_mode.as_str() {
            "file" => Ok(hyperbox_erofs::MountMode::FileBacked),
            "loop" => Ok(hyperbox_erofs::MountMode::LoopDevices),
            "auto" => Ok(hyperbox_erofs::MountMode::Auto),
            other => Err(ConfigError::MountMode(other.to_string())),
        }
    }

    /// The limits of one layer's conversion.
    pub fn conversion_limits(&self) -> crate::ConversionLimits {
        crate::ConversionLimits {
            max_depth: self.max_depth,
            max_inodes: self.max_inodes,
            max_image_bytes: self.max_image_bytes,
            timeout: std::time::Duration::from_secs(self.conversion_timeout_s),
        }
    }

    /// Checks the values: absolute paths, a real file mode, the socket outside the root, a
    /// known mount mode, limits of at least 1.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.erofs_mount_mode()?;
        for (option, value) in [
            ("root", &self.root),
            ("address", &self.address),
            ("containerd_address", &self.containerd_address),
        ] {
            if !value.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    option,
                    value: value.clone(),
                });
            }
        }
        if self.root.to_string_lossy().contains([',', ':']) {
            return Err(ConfigError::RootSeparator(self.root.clone()));
        }
        if self.socket_mode > 0o777 {
            return Err(ConfigError::SocketMode(self.socket_mode));
        }
        for (option, value) in [
            ("max_depth", u64::from(self.max_depth)),
            ("max_inodes", self.max_inodes),
            ("max_image_bytes", self.max_image_bytes),
            ("conversion_timeout_s", self.conversion_timeout_s),
            ("conversion_workers", u64::from(self.conversion_workers)),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(option));
            }
        }
        if self.differ_enabled() {
            if !self.differ_address.is_absolute() {
                return Err(ConfigError::NotAbsolute {
                    option: "differ_address",
                    value: self.differ_address.clone(),
                });
            }
            if self.differ_address.starts_with(&self.root) {
                return Err(ConfigError::AddressInRoot {
                    address: self.differ_address.clone(),
                    root: self.root.clone(),
                });
            }
        }
        if self.address.starts_with(&self.root) {
            return Err(ConfigError::AddressInRoot {
                address: self.address.clone(),
                root: self.root.clone(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::from_toml("", Path::new("x.toml")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.root, Path::new("/var/lib/hyperbox/snapshotter"));
        assert_eq!(c.address, Path::new("/run/hyperbox/snapshotter.sock"));
        assert_eq!(c.socket_mode, 0o600);
        assert!(c.convert);
        assert_eq!(
            c.erofs_mount_mode().unwrap(),
            hyperbox_erofs::MountMode::Auto
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../../config/snapshotter.toml");
        let c = Config::from_toml(text, Path::new("config/snapshotter.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let p = Path::new("x.toml");
        let e = Config::from_toml("rooot = \"/x\"", p).unwrap_err();
        assert!(e.to_string().contains("rooot"), "{e}");
        assert!(matches!(
            Config::from_toml("root = \"rel\"", p),
            Err(ConfigError::NotAbsolute { option: "root", .. })
        ));
        assert!(matches!(
            Config::from_toml("socket_mode = 0o1777", p),
            Err(ConfigError::SocketMode(_))
        ));
        assert!(matches!(
            Config::from_toml("root = \"/a:b\"", p),
            Err(ConfigError::RootSeparator(_))
        ));
        assert!(matches!(
            Config::from_toml("root = \"/r\"\naddress = \"/r/s.sock\"", p),
            Err(ConfigError::AddressInRoot { .. })
        ));
        assert!(matches!(
            Config::from_toml("mount_mode = \"fuse\"", p),
            Err(ConfigError::MountMode(_))
        ));
        assert!(matches!(
            Config::from_toml("max_depth = 0", p),
            Err(ConfigError::Zero("max_depth"))
        ));
        let c = Config::from_toml("max_image_bytes = 5\nconversion_timeout_s = 7", p).unwrap();
        assert_eq!(c.conversion_limits().max_image_bytes, 5);
        assert_eq!(c.conversion_limits().timeout.as_secs(), 7);
        let c = Config::from_toml("convert = false\nmount_mode = \"loop\"", p).unwrap();
        assert!(!c.convert);
        assert_eq!(
            c.erofs_mount_mode().unwrap(),
            hyperbox_erofs::MountMode::LoopDevices
        );
    }
}

//! The node's template settings (`/etc/hyperbox/templates.toml`): what an administrator allows
//! captures, restores and pulls, read at each use.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use hyperbox_shim_core::EngineError;
use serde::Deserialize;

use super::failed;

/// Where the node's template settings are, unless `HYPERBOX_TEMPLATE_CONFIG` names another
/// file.
pub const SETTINGS: &str = "/etc/hyperbox/templates.toml";

/// The node's template settings, an administrator's (never a tenant's: no annotation sets
/// them). A missing file, or a setting left out, is the default (`config/templates.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Templates any owner may restore from, as `POD_NAMESPACE/NAME` (what such a restore
    /// names in `io.hyperbox.restore-from`).
    pub shared: Vec<String>,
    /// How long a capture may take: the copy of the container's rootfs changes and CRIU's
    /// dump. The container is thawed and runs on when it runs out.
    #[serde(with = "setting_duration")]
    pub capture_timeout: Duration,
    /// How long CRIU may take to restore a container from a template.
    #[serde(with = "setting_duration")]
    pub restore_timeout: Duration,
    /// The most a capture copies of a container's rootfs changes (its overlay's upper
    /// directory); more refuses the capture.
    #[serde(with = "setting_size")]
    pub max_rootfs_changes: u64,
    /// What one owner's templates may take on disk together; a capture that would exceed it
    /// is refused.
    #[serde(with = "setting_size")]
    pub owner_quota: u64,
    /// Templates nothing restored from for this long are removed (when no restore holds
    /// them); zero keeps them.
    #[serde(with = "setting_duration")]
    pub expire_unused: Duration,
    /// Registries a restore may pull a missing template from on first use
    /// (`io.hyperbox.template.pull`), as reference prefixes (`registry.example:5000/templates/`).
    /// A pulled template's CRIU images are restored by root: only an administrator's choice
    /// of source. Empty (the default): no pull on first use.
    pub pull_from: Vec<String>,
    /// Registry hosts (`HOST:PORT`) reached over plain HTTP; loopback hosts always are.
    pub plain_http: Vec<String>,
    /// A Docker-style `config.json` whose `auths` give registries' credentials.
    pub auth_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            shared: Vec::new(),
            capture_timeout: Duration::from_secs(5 * 60),
            restore_timeout: Duration::from_secs(2 * 60),
            max_rootfs_changes: 4 << 30,
            owner_quota: 50 << 30,
            expire_unused: Duration::from_secs(30 * 86_400),
            pull_from: Vec::new(),
            plain_http: Vec::new(),
            auth_file: None,
        }
    }
}

/// A duration setting: a number and a unit, `s`, `m`, `h` or `d` (`90s`, `5m`, `30d`), or `0`.
pub fn parse_setting_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration such as 90s, 5m, 12h or 30d");
    let (n, unit) = number_and_unit(text).ok_or_else(bad)?;
    let unit = match unit {
        "" if n == 0 => 1,
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    Ok(Duration::from_secs(n.saturating_mul(unit)))
}

/// A setting's leading number and the unit after it (`"5m"` → `(5, "m")`); `None` when it
/// does not start with a number.
fn number_and_unit(text: &str) -> Option<(u64, &str)> {
    let t = text.trim();
    let (number, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    Some((number.parse().ok()?, unit))
}

/// A size setting: bytes, or a number with `KiB`, `MiB`, `GiB` or `TiB`.
pub fn parse_setting_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size such as 512MiB or 4GiB");
    let (n, unit) = number_and_unit(text).ok_or_else(bad)?;
    let shift = match unit {
        "" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

mod setting_duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_setting_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod setting_size {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_setting_size(&text).map_err(serde::de::Error::custom)
    }
}

impl Settings {
    /// The settings file's path.
    pub fn path() -> PathBuf {
        std::env::var_os("HYPERBOX_TEMPLATE_CONFIG")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(SETTINGS), PathBuf::from)
    }

    /// Reads the settings; a file that does not parse, or names a template badly, is an
    /// error naming it.
    pub fn load() -> Result<Settings, EngineError> {
        let path = Self::path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(failed(format!("cannot read {}: {e}", path.display()))),
        };
        let settings: Settings = toml::from_str(&text).map_err(|e| {
            EngineError::InvalidSpec(format!("template settings {}: {e}", path.display()))
        })?;
        for entry in &settings.shared {
            if !entry.contains('/') {
                return Err(EngineError::InvalidSpec(format!(
                    "template settings {}: shared entry {entry:?} is not POD_NAMESPACE/NAME",
                    path.display()
                )));
            }
            hyperbox_shim_core::template::check_reference(entry).map_err(|e| {
                EngineError::InvalidSpec(format!("template settings {}: {e}", path.display()))
            })?;
        }
        Ok(settings)
    }

    /// Whether template `name` of pod namespace `owner` is shared.
    pub fn shares(&self, owner: &str, name: &str) -> bool {
        self.shared
            .iter()
            .any(|e| e.split_once('/') == Some((owner, name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_example_parses_and_shares_nothing() {
        let example: Settings = toml::from_str(include_str!("../../../config/templates.toml"))
            .expect("config/templates.toml parses");
        let defaults = Settings::default();
        assert!(example.shared.is_empty());
        assert_eq!(
            (
                example.capture_timeout,
                example.restore_timeout,
                example.max_rootfs_changes,
                example.owner_quota,
                example.expire_unused
            ),
            (
                defaults.capture_timeout,
                defaults.restore_timeout,
                defaults.max_rootfs_changes,
                defaults.owner_quota,
                defaults.expire_unused
            ),
            "the example gives the defaults"
        );
        let some: Settings = toml::from_str("shared = [\"team-a/py\"]").unwrap();
        assert!(some.shares("team-a", "py"));
        assert!(!some.shares("team-b", "py") && !some.shares("team-a", "other"));
        assert!(
            toml::from_str::<Settings>("share = []").is_err(),
            "unknown keys refused"
        );
    }

    #[test]
    fn durations_and_sizes_of_the_settings() {
        for (text, secs) in [
            ("0", 0),
            ("90s", 90),
            ("5m", 300),
            ("12h", 43_200),
            ("30d", 2_592_000),
        ] {
            assert_eq!(
                parse_setting_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "5", "1.5m", "m", "5w", "-1s"] {
            assert!(parse_setting_duration(bad).is_err(), "{bad}");
        }
        for (text, bytes) in [
            ("0", 0),
            ("4096", 4096),
            ("64KiB", 65_536),
            ("4GiB", 4 << 30),
        ] {
            assert_eq!(parse_setting_size(text), Ok(bytes), "{text}");
        }
        for bad in ["", "4GB", "1.5GiB", "KiB", "99999999999TiB"] {
            assert!(parse_setting_size(bad).is_err(), "{bad}");
        }
    }
}

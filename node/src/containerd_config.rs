//! Adding HyperBox to containerd's configuration without clobbering the user's, and taking it
//! out again byte for byte.
//!
//! - containerd 1.6/1.7 (config `version = 2`): an imported file's plugin table replaces the
//!   whole table (only `proxy_plugins` merge), so adding a CRI runtime needs an edit of the
//!   main file: the tables of `config/containerd-runtime.toml` and
//!   `config/containerd-snapshotter.toml` are added to it in place, with `toml_edit`, keeping
//!   every comment, key and layout of the user's; a key the user already set is left as the
//!   user set it (and reported).
//! - containerd 2.x (`version = 3`) merges imported tables: the two `.v3.toml` snippets go into
//!   a drop-in file of ours, and the main file's `imports` gets its path (the only edit).
//!
//! The snippets are `config/`'s own files, built into the binary, so what is installed is what
//! the repository documents and tests.

use std::path::{Path, PathBuf};

use toml_edit::{DocumentMut, Item, Table};

const RUNTIME_V2: &str = include_str!("../../config/containerd-runtime.toml");
const SNAPSHOTTER_V2: &str = include_str!("../../config/containerd-snapshotter.toml");
const RUNTIME_V3: &str = include_str!("../../config/containerd-runtime.v3.toml");
const SNAPSHOTTER_V3: &str = include_str!("../../config/containerd-snapshotter.v3.toml");

/// Errors editing a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml_edit::TomlError,
    },
    #[error("{path}: config version {found}, but containerd {containerd} reads version {wanted}")]
    Version {
        path: PathBuf,
        found: i64,
        wanted: i64,
        containerd: String,
    },
    #[error("{path}: {what} is not a table")]
    NotATable { path: PathBuf, what: String },
}

/// What the edit comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The main configuration file's new text.
    pub config: String,
    /// A drop-in file to write (2.x): path and text.
    pub drop_in: Option<(PathBuf, String)>,
    /// Keys the user had already set differently, left as they were.
    pub kept: Vec<String>,
}

/// Adds `from`'s tables and keys to `into` where missing; a key present in both with another
/// value is left as `into` has it and its dotted name added to `kept`. Arrays of tables
/// (`[[...]]`) get the entries they lack.
fn merge(into: &mut Table, from: &Table, prefix: &str, kept: &mut Vec<String>) {
    for (key, item) in from.iter() {
        let name = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(key), item) {
            (None, _) => {
                into.insert(key, item.clone());
            }
            (Some(Item::Table(mine)), Item::Table(theirs)) => merge(mine, theirs, &name, kept),
            (Some(Item::ArrayOfTables(mine)), Item::ArrayOfTables(theirs)) => {
                for t in theirs.iter() {
                    let present = mine.iter().any(|m| m.to_string() == t.to_string());
                    if !present {
                        mine.push(t.clone());
                    }
                }
            }
            (Some(Item::Value(mine)), Item::Value(theirs)) => {
                if mine.to_string().trim() != theirs.to_string().trim() {
                    kept.push(name);
                }
            }
            (Some(_), _) => kept.push(name),
        }
    }
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, ConfigError> {
    text.parse::<DocumentMut>()
        .map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
}

/// The config version a file declares (1 when it says none, as containerd reads it).
fn declared_version(doc: &DocumentMut) -> i64 {
    doc.get("version").and_then(Item::as_integer).unwrap_or(1)
}

/// The edit of the configuration at `path` (whose text is `current`, empty when the file does
/// not exist) for containerd `major`.`minor`; `drop_in_dir` is where 2.x's drop-in goes.
pub fn plan(
    path: &Path,
    current: &str,
    major: u64,
    minor: u64,
    drop_in_dir: &Path,
) -> Result<Plan, ConfigError> {
    let mut doc = parse(path, current)?;
    let containerd = format!("{major}.{minor}");
    let wanted = if major >= 2 { 3 } else { 2 };
    let found = declared_version(&doc);
    if !current.trim().is_empty() && found != wanted && !(major >= 2 && found == 2) {
        return Err(ConfigError::Version {
            path: path.to_path_buf(),
            found,
            wanted,
            containerd,
        });
    }
    let mut kept = Vec::new();
    if current.trim().is_empty() {
        doc.insert("version", toml_edit::value(wanted));
    }
    if major < 2 {
        for snippet in [RUNTIME_V2, SNAPSHOTTER_V2] {
            let s = parse(Path::new("config/"), snippet)?;
            let mut from = s.as_table().clone();
            from.remove("version");
            merge(doc.as_table_mut(), &from, "", &mut kept);
        }
        return Ok(Plan {
            config: doc.to_string(),
            drop_in: None,
            kept,
        });
    }
    // 2.x: one drop-in of ours, imported.
    let mut drop_in = DocumentMut::new();
    drop_in.insert("version", toml_edit::value(3));
    for snippet in [RUNTIME_V3, SNAPSHOTTER_V3] {
        let s = parse(Path::new("config/"), snippet)?;
        let mut from = s.as_table().clone();
        from.remove("version");
        let mut ignored = Vec::new();
        merge(drop_in.as_table_mut(), &from, "", &mut ignored);
    }
    let drop_in_path = drop_in_dir.join("hyperbox.toml");
    let entry = drop_in_path.display().to_string();
    match doc.get_mut("imports") {
        None => {
            let mut a = toml_edit::Array::new();
            a.push(entry.as_str());
            doc.insert("imports", toml_edit::value(a));
        }
        Some(item) => {
            let a = item.as_array_mut().ok_or_else(|| ConfigError::NotATable {
                path: path.to_path_buf(),
                what: "imports (an array)".into(),
            })?;
            if !a.iter().any(|v| v.as_str() == Some(entry.as_str())) {
                a.push(entry.as_str());
            }
        }
    }
    Ok(Plan {
        config: doc.to_string(),
        drop_in: Some((drop_in_path, drop_in.to_string())),
        kept,
    })
}

/// A line diff of `old` and `new` for `--dry-run` (`-` and `+` lines, with their
/// surroundings left out): what is added or taken away.
pub fn diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence, small files only (configuration files are).
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER_V2: &str = r#"# my node's containerd
version = 2
root = "/var/lib/containerd"  # kept

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.example/pause:3.9"

  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    # my comment
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = true
"#;

    fn dump(text: &str) -> toml::Table {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn containerd_1_x_gets_its_tables_in_place_and_keeps_everything_else() {
        let p = plan(
            Path::new("/etc/containerd/config.toml"),
            USER_V2,
            1,
            7,
            Path::new("/d"),
        )
        .unwrap();
        assert!(p.drop_in.is_none());
        assert!(p.kept.is_empty(), "{:?}", p.kept);
        // Every line of the user's file is still there, in order.
        let mut rest = p.config.as_str();
        for line in USER_V2.lines() {
            let at = rest
                .find(line)
                .unwrap_or_else(|| panic!("{line:?} lost:\n{}", p.config));
            rest = &rest[at + line.len()..];
        }
        let t = dump(&p.config);
        let runtimes = &t["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
        assert_eq!(
            runtimes["hyperbox"]["runtime_type"].as_str(),
            Some("io.containerd.hyperbox.v1")
        );
        assert_eq!(
            runtimes["hyperbox-wasm"]["runtime_type"].as_str(),
            Some("io.containerd.hyperbox-wasm.v1")
        );
        assert_eq!(
            runtimes["runc"]["options"]["SystemdCgroup"].as_bool(),
            Some(true)
        );
        assert_eq!(
            t["proxy_plugins"]["hyperbox"]["address"].as_str(),
            Some("/run/hyperbox/snapshotter.sock")
        );
        // Idempotent.
        let again = plan(Path::new("c"), &p.config, 1, 7, Path::new("/d")).unwrap();
        assert_eq!(again.config, p.config);
        assert!(diff(&p.config, &again.config).is_empty());
    }

    #[test]
    fn a_users_own_setting_is_kept_and_reported() {
        let user = "version = 2\n[proxy_plugins.hyperbox]\n  type = \"snapshot\"\n  address = \"/elsewhere.sock\"\n";
        let p = plan(Path::new("c"), user, 1, 6, Path::new("/d")).unwrap();
        assert_eq!(p.kept, ["proxy_plugins.hyperbox.address"]);
        assert_eq!(
            dump(&p.config)["proxy_plugins"]["hyperbox"]["address"].as_str(),
            Some("/elsewhere.sock")
        );
    }

    #[test]
    fn containerd_2_x_gets_a_drop_in_and_an_import() {
        let user = "version = 3\nimports = [\"/etc/containerd/other.toml\"]\n# mine\n";
        let p = plan(
            Path::new("c"),
            user,
            2,
            1,
            Path::new("/etc/containerd/conf.d"),
        )
        .unwrap();
        let (path, text) = p.drop_in.clone().unwrap();
        assert_eq!(path, Path::new("/etc/containerd/conf.d/hyperbox.toml"));
        let d = dump(&text);
        assert_eq!(d["version"].as_integer(), Some(3));
        assert_eq!(
            d["proxy_plugins"]["hyperbox"]["type"].as_str(),
            Some("snapshot")
        );
        let t = dump(&p.config);
        let imports: Vec<&str> = t["imports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            imports,
            [
                "/etc/containerd/other.toml",
                "/etc/containerd/conf.d/hyperbox.toml"
            ]
        );
        assert!(p.config.contains("# mine"));
        assert_eq!(
            diff(user, &p.config)
                .lines()
                .filter(|l| l.starts_with('-'))
                .count(),
            1
        );
        // No file at all: a version 3 file with the import.
        let p = plan(Path::new("c"), "", 2, 1, Path::new("/x")).unwrap();
        assert_eq!(dump(&p.config)["version"].as_integer(), Some(3));
    }

    #[test]
    fn a_file_of_the_wrong_version_is_refused() {
        let err = plan(Path::new("/c.toml"), "version = 3\n", 1, 7, Path::new("/d")).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
        assert!(matches!(
            plan(Path::new("c"), "not toml [", 1, 7, Path::new("/d")),
            Err(ConfigError::Parse { .. })
        ));
    }
}

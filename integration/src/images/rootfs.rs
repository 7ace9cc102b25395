//! Root filesystems of the test images: busybox as an in-memory recipe around the host's
//! static busybox, Debian from `debootstrap` followed by [`normalize`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::layer::{EntryKind, FileData, LayerEntry};
use super::ImageError;

/// Where Debian's `busybox-static` puts the binary (`/usr/bin/busybox` on merged-/usr hosts is
/// the same file).
const BUSYBOX_CANDIDATES: &[&str] = &["/bin/busybox", "/usr/bin/busybox"];

/// `PATH` of every test image.
pub const IMAGE_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host's static busybox binary.
pub fn find_busybox() -> Result<PathBuf, ImageError> {
    let Some(path) = BUSYBOX_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        return Err(ImageError::ToolMissing {
            tool: "busybox",
            package: "busybox-static",
        });
    };
    if !is_static_elf(path)? {
        return Err(ImageError::Busybox {
            path: path.to_path_buf(),
            reason: "it is dynamically linked (the `busybox` package); install `busybox-static`"
                .to_owned(),
        });
    }
    Ok(path.to_path_buf())
}

/// True when `path` is a 64-bit little-endian ELF without a program interpreter.
fn is_static_elf(path: &Path) -> Result<bool, ImageError> {
    let err = |e| ImageError::io("cannot read", path, e);
    let mut f = File::open(path).map_err(err)?;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).map_err(err)?;
    if &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return Ok(false);
    }
    let phoff = u64::from_le_bytes(eh[0x20..0x28].try_into().expect("8 bytes"));
    let phentsize = u64::from(u16::from_le_bytes([eh[0x36], eh[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([eh[0x38], eh[0x39]]));
    for i in 0..phnum {
        f.seek(SeekFrom::Start(phoff + i * phentsize))
            .map_err(err)?;
        let mut p_type = [0u8; 4];
        f.read_exact(&mut p_type).map_err(err)?;
        // PT_INTERP: the binary needs a dynamic loader.
        if u32::from_le_bytes(p_type) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The busybox image's root filesystem: the static binary as `/bin/busybox`, `/bin/sh` and a
/// symlink per applet in `/bin`, a minimal `/etc` with users `root`, `nobody` (65534) and
/// `hbuser` (1000:1000), and the usual empty directories.
pub fn busybox_entries(busybox: &Path, epoch: u64) -> Result<Vec<LayerEntry>, ImageError> {
    let output = Command::new(busybox)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ImageError::io("cannot run", busybox, e))?;
    if !output.status.success() {
        return Err(ImageError::Busybox {
            path: busybox.to_path_buf(),
            reason: format!("`busybox --list` failed: {}", output.status),
        });
    }
    let listing = String::from_utf8_lossy(&output.stdout);
    let mut applets: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .collect();
    if !applets.contains(&"sh") {
        return Err(ImageError::Busybox {
            path: busybox.to_path_buf(),
            reason: "it has no `sh` applet".to_owned(),
        });
    }
    applets.sort_unstable();
    applets.dedup();

    let size = fs::metadata(busybox)
        .map_err(|e| ImageError::io("cannot stat", busybox, e))?
        .len();
    let mut entries = vec![
        LayerEntry::dir("bin", 0o755),
        LayerEntry {
            path: "bin/busybox".into(),
            kind: EntryKind::File {
                data: FileData::Path(busybox.to_path_buf()),
                size,
            },
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: epoch,
            xattrs: Default::default(),
        },
        LayerEntry::dir("dev", 0o755),
        LayerEntry::dir("etc", 0o755),
        LayerEntry::file(
            "etc/passwd",
            0o644,
            "root:x:0:0:root:/root:/bin/sh\n\
             nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n\
             hbuser:x:1000:1000:HyperBox test user:/home/hbuser:/bin/sh\n",
        ),
        LayerEntry::file(
            "etc/group",
            0o644,
            "root:x:0:\nnogroup:x:65534:\nhbuser:x:1000:\n",
        ),
        LayerEntry::dir("home", 0o755),
        LayerEntry::dir("home/hbuser", 0o755).with_owner(1000, 1000),
        LayerEntry::dir("proc", 0o555),
        LayerEntry::dir("root", 0o700),
        LayerEntry::dir("sys", 0o555),
        LayerEntry::dir("tmp", 0o1777),
        LayerEntry::dir("usr", 0o755),
        LayerEntry::dir("usr/bin", 0o755),
        LayerEntry::dir("usr/sbin", 0o755),
        LayerEntry::dir("var", 0o755),
        LayerEntry::dir("var/tmp", 0o1777),
    ];
    entries.extend(
        applets
            .iter()
            .map(|a| LayerEntry::symlink(format!("bin/{a}"), "busybox")),
    );
    for e in &mut entries {
        e.mtime = epoch;
    }
    Ok(entries)
}

/// What `debootstrap` is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebootstrapRecipe {
    pub suite: &'static str,
    pub variant: &'static str,
    pub arch: &'static str,
    /// Extra packages (`--include`), resolved with their dependencies by debootstrap.
    pub include: &'static [&'static str],
}

impl DebootstrapRecipe {
    /// The debootstrap options and suite, for the image history.
    pub fn command_line(&self) -> String {
        let mut line = format!(
            "debootstrap --variant={} --arch={}",
            self.variant, self.arch
        );
        if !self.include.is_empty() {
            line.push_str(&format!(" --include={}", self.include.join(",")));
        }
        line.push(' ');
        line.push_str(self.suite);
        line
    }

    /// The recipe as text, for cache keys.
    pub fn describe(&self) -> String {
        format!(
            "suite={}\nvariant={}\narch={}\ninclude={}\n",
            self.suite,
            self.variant,
            self.arch,
            self.include.join(",")
        )
    }
}

/// The Debian mirror of the machine's apt sources that serves `suite`: the `URIs:` of a deb822
/// entry in `/etc/apt/sources.list.d/*.sources` whose `Suites:` names it, else a `deb` line of
/// `/etc/apt/sources.list` (or `sources.list.d/*.list`) for it. `HYPERBOX_DEBIAN_MIRROR`
/// overrides.
pub fn debian_mirror(suite: &str) -> Result<String, ImageError> {
    if let Some(m) = std::env::var("HYPERBOX_DEBIAN_MIRROR")
        .ok()
        .filter(|m| !m.is_empty())
    {
        return Ok(m);
    }
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        if let Ok(text) = fs::read_to_string(f) {
            if let Some(m) = mirror_from_deb822(&text, suite) {
                return Ok(m);
            }
        }
    }
    let lists = std::iter::once(PathBuf::from("/etc/apt/sources.list")).chain(
        files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "list")),
    );
    for f in lists {
        if let Ok(text) = fs::read_to_string(&f) {
            if let Some(m) = mirror_from_one_line(&text, suite) {
                return Ok(m);
            }
        }
    }
    Err(ImageError::NoMirror {
        suite: suite.to_owned(),
    })
}

/// The first URI of a deb822 stanza with `Types: deb` whose `Suites` has `suite`.
pub fn mirror_from_deb822(text: &str, suite: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut suites = "";
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => types = value.trim(),
                "uris" => uris = value.trim(),
                "suites" => suites = value.trim(),
                "enabled" => enabled = !value.trim().eq_ignore_ascii_case("no"),
                _ => {}
            }
        }
        if enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
        {
            if let Some(uri) = uris.split_whitespace().next() {
                return Some(uri.to_owned());
            }
        }
    }
    None
}

/// The URI of the first `deb [options] URI SUITE COMPONENTS...` line for `suite`.
pub fn mirror_from_one_line(text: &str, suite: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            rest = rest.split_once(']')?.1;
        }
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(s)) = (words.next(), words.next()) else {
            continue;
        };
        if s == suite {
            return Some(uri.to_owned());
        }
    }
    None
}

/// Runs `debootstrap` for `recipe` into `target` (which must not exist yet), keeping the
/// downloaded packages in `deb_cache`; its output goes to `log`.
pub fn debootstrap(
    recipe: &DebootstrapRecipe,
    target: &Path,
    deb_cache: &Path,
    mirror: &str,
    log: &Path,
) -> Result<(), ImageError> {
    let debootstrap = find_tool("debootstrap", "debootstrap")?;
    if std::env::consts::ARCH != "x86_64" || recipe.arch != "amd64" {
        return Err(ImageError::UnsupportedHost {
            arch: std::env::consts::ARCH,
        });
    }
    let log_file = File::create(log).map_err(|e| ImageError::io("cannot create", log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| ImageError::io("cannot open", log, e))?;
    let mut cmd = Command::new(&debootstrap);
    cmd.arg(format!("--variant={}", recipe.variant))
        .arg(format!("--arch={}", recipe.arch))
        .arg(format!("--cache-dir={}", deb_cache.display()));
    if !recipe.include.is_empty() {
        cmd.arg(format!("--include={}", recipe.include.join(",")));
    }
    cmd.arg(recipe.suite)
        .arg(target)
        .arg(mirror)
        .env("LC_ALL", "C")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env_remove("TMPDIR")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    tracing::info!(
        target = %target.display(),
        suite = recipe.suite,
        include = ?recipe.include,
        "running debootstrap"
    );
    let status = cmd
        .status()
        .map_err(|e| ImageError::io("cannot run", &debootstrap, e))?;
    if !status.success() {
        let mut tail = log_tail(log, 20);
        let inner = target.join("debootstrap/debootstrap.log");
        if inner.is_file() {
            tail.push_str("\n--- debootstrap.log ---\n");
            tail.push_str(&log_tail(&inner, 20));
        }
        return Err(ImageError::Command {
            command: format!("debootstrap {} {}", recipe.suite, target.display()),
            status: status.to_string(),
            output_tail: tail,
        });
    }
    Ok(())
}

/// The last `n` lines of a text file, or an empty string.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The full path of `tool` on `PATH` (with the sbin directories added).
pub(crate) fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(ImageError::ToolMissing { tool, package })
}

/// One normalization of a debootstrapped tree; paths are relative to the root.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Remove the regular files directly inside the directory whose names end with the suffix.
    RemoveFiles(&'static str, &'static str),
    /// Remove everything inside the directory, keeping the directory.
    EmptyDir(&'static str),
    /// Truncate to zero length every regular file under the directory.
    TruncateFilesUnder(&'static str),
    /// Remove the file or directory tree, if present.
    Remove(&'static str),
    /// Truncate the file, if present.
    Truncate(&'static str),
    /// Set the "last password change" field (days since the epoch) of every entry of a shadow
    /// file to the build's `SOURCE_DATE_EPOCH` day.
    ShadowLastChange(&'static str),
    /// Remove every directory of that name anywhere in the tree.
    RemoveDirsNamed(&'static str),
}

/// Everything done to a debootstrapped tree so that two builds give the same bytes and the
/// image does not depend on the build host. Found by building twice and comparing the trees
/// (`diff -r`, `find -printf '%p %y %m %U %G %s %l'`); modification times are clamped later,
/// when the layer is written.
const NORMALIZATION: &[(Step, &str)] = &[
    (
        Step::Remove("debootstrap"),
        "debootstrap's work directory (left behind by a failed or --keep-debootstrap-dir run)",
    ),
    (
        Step::RemoveFiles("var/cache/apt/archives", ".deb"),
        "debootstrap's copies of the downloaded packages (the download cache keeps them)",
    ),
    (
        Step::EmptyDir("var/cache/apt/archives/partial"),
        "half-downloaded packages",
    ),
    (
        Step::RemoveFiles("var/cache/apt", ".bin"),
        "apt's binary package caches: rebuilt on demand, they embed build times",
    ),
    (
        Step::RemoveFiles("var/lib/apt/lists", ""),
        "package lists as downloaded: they change with the mirror and the day of the build",
    ),
    (
        Step::EmptyDir("var/lib/apt/lists/partial"),
        "half-downloaded package lists",
    ),
    (
        Step::TruncateFilesUnder("var/log"),
        "logs (bootstrap.log, dpkg.log, alternatives.log...) stamped with build times; kept \
         empty so wtmp, lastlog and friends keep their owners and modes",
    ),
    (
        Step::Remove("var/cache/ldconfig/aux-cache"),
        "ldconfig's auxiliary cache records inode numbers and times of the build tree",
    ),
    (
        Step::Truncate("etc/machine-id"),
        "a random id per install; empty means \"generate at first boot\"",
    ),
    (
        Step::Remove("var/lib/dbus/machine-id"),
        "the same random id, for D-Bus",
    ),
    (
        Step::ShadowLastChange("etc/shadow"),
        "password change dates are the day of the build",
    ),
    (
        Step::ShadowLastChange("etc/shadow-"),
        "shadow's backup, same",
    ),
    (
        Step::RemoveFiles("var/lib/dpkg", "-old"),
        "dpkg's backups of status, available, diversions... from the previous run",
    ),
    (
        Step::RemoveFiles("var/cache/debconf", "-old"),
        "debconf's backups of its databases",
    ),
    (
        Step::RemoveDirsNamed("__pycache__"),
        "byte-compiled Python (py3compile in postinst): marshal output is not reproducible; \
         Python works without them",
    ),
    (
        Step::Truncate("etc/apt/sources.list"),
        "names the mirror of the build host; the images are used offline",
    ),
    (
        Step::Remove("etc/resolv.conf"),
        "copied from the build host; runtimes provide their own",
    ),
    (
        Step::Remove("etc/hostname"),
        "copied from the build host; runtimes provide their own",
    ),
    (
        Step::EmptyDir("dev"),
        "device nodes made by debootstrap; runtimes mount /dev",
    ),
    (Step::EmptyDir("proc"), "mount point only"),
    (Step::EmptyDir("sys"), "mount point only"),
    (Step::EmptyDir("tmp"), "scratch space of the install"),
    (
        Step::Remove("run/mount"),
        "util-linux's mount table of the build, empty or not",
    ),
];

/// Applies [`NORMALIZATION`] to the tree at `root`.
pub fn normalize(root: &Path, epoch: u64) -> Result<(), ImageError> {
    for (step, why) in NORMALIZATION {
        tracing::debug!(?step, why, "normalizing {}", root.display());
        apply(root, *step, epoch)?;
    }
    Ok(())
}

fn apply(root: &Path, step: Step, epoch: u64) -> Result<(), ImageError> {
    match step {
        Step::RemoveFiles(dir, suffix) => {
            for (path, ft) in children(&root.join(dir))? {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                if ft.is_file() && name.ends_with(suffix) {
                    remove_path(&path)?;
                }
            }
        }
        Step::EmptyDir(dir) => {
            for (path, _) in children(&root.join(dir))? {
                remove_path(&path)?;
            }
        }
        Step::TruncateFilesUnder(dir) => truncate_under(&root.join(dir))?,
        Step::Remove(path) => remove_path(&root.join(path))?,
        Step::Truncate(path) => {
            let path = root.join(path);
            if path.is_file() {
                OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map_err(|e| ImageError::io("cannot truncate", &path, e))?;
            }
        }
        Step::ShadowLastChange(path) => {
            let path = root.join(path);
            if path.is_file() {
                let text = fs::read_to_string(&path)
                    .map_err(|e| ImageError::io("cannot read", &path, e))?;
                let fixed = shadow_with_last_change(&text, epoch / 86_400);
                if fixed != text {
                    // Rewrites in place: owner and mode stay.
                    fs::write(&path, fixed)
                        .map_err(|e| ImageError::io("cannot write", &path, e))?;
                }
            }
        }
        Step::RemoveDirsNamed(name) => remove_dirs_named(root, name)?,
    }
    Ok(())
}

/// `text` (a shadow file) with each entry's third field, when set, replaced by `day`.
pub fn shadow_with_last_change(text: &str, day: u64) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, nl) = match line.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (line, ""),
        };
        let mut fields: Vec<&str> = body.split(':').collect();
        let day_text = day.to_string();
        if fields.len() >= 3 && !fields[2].is_empty() {
            fields[2] = &day_text;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(body);
        }
        out.push_str(nl);
    }
    out
}

fn children(dir: &Path) -> Result<Vec<(PathBuf, fs::FileType)>, ImageError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ImageError::io("cannot read directory", dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| ImageError::io("cannot read directory", dir, e))?;
        let ft = entry
            .file_type()
            .map_err(|e| ImageError::io("cannot stat", &entry.path(), e))?;
        out.push((entry.path(), ft));
    }
    Ok(out)
}

fn remove_path(path: &Path) -> Result<(), ImageError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("cannot stat", path, e)),
    };
    let result = if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    result.map_err(|e| ImageError::io("cannot remove", path, e))
}

fn truncate_under(dir: &Path) -> Result<(), ImageError> {
    for (path, ft) in children(dir)? {
        if ft.is_dir() {
            truncate_under(&path)?;
        } else if ft.is_file() {
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| ImageError::io("cannot truncate", &path, e))?;
        }
    }
    Ok(())
}

fn remove_dirs_named(dir: &Path, name: &str) -> Result<(), ImageError> {
    for (path, ft) in children(dir)? {
        if !ft.is_dir() {
            continue;
        }
        if path.file_name().is_some_and(|n| n == name) {
            remove_path(&path)?;
        } else {
            remove_dirs_named(&path, name)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_suite_must_match_exactly() {
        let text =
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\n\nTypes: deb\nURIs: http://mirror.example/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            mirror_from_deb822(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_from_deb822(text, "bookworm-security").as_deref(),
            Some("http://mirror.example/debian-security")
        );
        assert_eq!(mirror_from_deb822(text, "trixie"), None);
        let disabled = "Enabled: no\nTypes: deb\nURIs: http://x/debian\nSuites: bookworm\n";
        assert_eq!(mirror_from_deb822(disabled, "bookworm"), None);
    }

    #[test]
    fn one_line_sources_with_options() {
        let text = "# comment\ndeb-src http://src/debian bookworm main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main\n";
        assert_eq!(
            mirror_from_one_line(text, "bookworm").as_deref(),
            Some("http://m/debian")
        );
        assert_eq!(mirror_from_one_line(text, "bullseye"), None);
    }

    #[test]
    fn shadow_last_change_is_fixed() {
        let text = "root:*:20785:0:99999:7:::\nnobody:!::0:99999:7:::\nshort\n";
        assert_eq!(
            shadow_with_last_change(text, 19723),
            "root:*:19723:0:99999:7:::\nnobody:!::0:99999:7:::\nshort\n"
        );
    }
}

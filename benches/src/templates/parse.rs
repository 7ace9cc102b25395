//! Reading what the processes around a run say: `templates push`'s output, the shim's
//! sizes, CRIU's lazy-pages daemon's command line, the heap service's answers.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What `templates push` printed: `pushed template NAME to REF@DIGEST (SIZE)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub reference: String,
    pub digest: String,
    pub size: String,
}

/// Parses `templates push`'s output (its last line that says `pushed template`).
pub fn parse_pushed(output: &str) -> Option<Pushed> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with("pushed template "))?
        .trim();
    let (_, rest) = line.split_once(" to ")?;
    let (pinned, size) = rest.rsplit_once(" (")?;
    let size = size.strip_suffix(')')?;
    let (reference, digest) = pinned.rsplit_once('@')?;
    let hex = digest.strip_prefix("sha256:")?;
    if reference.is_empty() || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(Pushed {
        reference: reference.to_string(),
        digest: digest.to_string(),
        size: size.to_string(),
    })
}

/// `12.3 MiB` or `4.0 KiB` (the shim's way to print sizes) in bytes, to its precision.
pub fn size_bytes(size: &str) -> Option<u64> {
    let (n, unit) = size.trim().split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    (n.is_finite() && n >= 0.0).then(|| (n * scale).round() as u64)
}

/// Whether `cmdline` (a /proc/PID/cmdline: NUL-separated arguments) is CRIU's lazy-pages
/// daemon of container `id`: an argument is `lazy-pages`, and a path among the arguments
/// has `id` as one of its components (the daemon's `-W BUNDLE/criu-work`, the bundle being
/// `.../NAMESPACE/ID`), so `id` is not matched inside a longer id.
pub fn is_lazy_pages_of(cmdline: &[u8], id: &str) -> bool {
    if id.is_empty() {
        return false;
    }
    let args = || cmdline.split(|b| *b == 0).filter(|a| !a.is_empty());
    args().any(|a| a == b"lazy-pages")
        && args().any(|a| {
            Path::new(OsStr::from_bytes(a))
                .components()
                .any(|c| c.as_os_str().as_bytes() == id.as_bytes())
        })
}

/// The `S` of the heap service's `heap started=T sha=S`.
pub fn heap_sha(body: &str) -> Option<&str> {
    let rest = body.trim().strip_prefix("heap ")?;
    rest.split_whitespace()
        .find_map(|f| f.strip_prefix("sha="))
        .filter(|s| !s.is_empty())
}

/// `(N, S)` of the heap service's `sum now=N sha=S`.
pub fn parse_sum(body: &str) -> Option<(&str, &str)> {
    let rest = body.trim().strip_prefix("sum ")?;
    let mut now = None;
    let mut sha = None;
    for f in rest.split_whitespace() {
        if let Some(v) = f.strip_prefix("now=") {
            now = Some(v);
        } else if let Some(v) = f.strip_prefix("sha=") {
            sha = Some(v);
        }
    }
    match (now, sha) {
        (Some(n), Some(s)) if !n.is_empty() && !s.is_empty() => Some((n, s)),
        _ => None,
    }
}

//! Timestamps of a lifecycle's steps, for `hyperbox-bench ctr-run --breakdown`: where the
//! time of one container goes, from containerd running the shim's `start` to the task
//! server's exit.
//!
//! Off unless the shim's environment (containerd's) names an absolute file in
//! [`TIMELINE_ENV`]. Each [`mark`] then appends one JSON line, in one `write(2)` to a file
//! opened with `O_APPEND`, so the lines of the `start` process, the task server, the zygote
//! and its workers interleave whole:
//!
//! ```text
//! {"t_us":1733541000123456,"pid":4242,"step":"create.begin","id":"c1"}
//! ```
//!
//! `t_us` is the wall clock (`CLOCK_REALTIME`) in microseconds, the clock the benchmark reads
//! before it runs `ctr`. Switched off, a mark costs one load of a static.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable naming the timeline file.
pub const TIMELINE_ENV: &str = "HYPERBOX_TIMELINE";

/// The open timeline, if one was asked for and could be opened.
static FILE: OnceLock<Option<File>> = OnceLock::new();

/// Opens the timeline at `path` (absolute, not a link) for appending.
fn open(path: &std::path::Path) -> Option<File> {
    if !path.is_absolute() {
        return None;
    }
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        // Never the file behind a planted link.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()
}

fn file() -> Option<&'static File> {
    FILE.get_or_init(|| open(std::path::Path::new(&std::env::var_os(TIMELINE_ENV)?)))
        .as_ref()
}

/// Opens the timeline now, if one is asked for: called while the process is single-threaded,
/// so a fork (the zygote) inherits the open file instead of opening it again.
pub fn init() {
    let _ = file();
}

/// Records that `step` of container `id` (empty: none) happened now.
pub fn mark(step: &str, id: &str) {
    if let Some(f) = file() {
        write_mark(f, step, id);
    }
}

/// One line, in one `write(2)`.
fn write_mark(mut f: &File, step: &str, id: &str) {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let line = serde_json::json!({
        "t_us": t,
        "pid": std::process::id(),
        "step": step,
        "id": id,
    });
    let mut text = line.to_string();
    text.push('\n');
    let _ = f.write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_whole_json_lines_in_order() {
        let path = std::env::temp_dir().join(format!("hb-timeline-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let f = open(&path).unwrap();
        write_mark(&f, "create.begin", "c1");
        write_mark(&f, "create.end", "c1");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["step"], "create.begin");
        assert_eq!(lines[1]["step"], "create.end");
        assert_eq!(lines[1]["id"], "c1");
        assert!(lines[0]["t_us"].as_u64().unwrap() <= lines[1]["t_us"].as_u64().unwrap());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn only_an_absolute_path_that_is_not_a_link_is_opened() {
        assert!(open(std::path::Path::new("relative/timeline")).is_none());
        let dir = std::env::temp_dir().join(format!("hb-timeline-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::os::unix::fs::symlink(&target, dir.join("link")).unwrap();
        assert!(open(&dir.join("link")).is_none());
        assert!(!target.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The benchmark's wasm guests (assembled from WebAssembly text), and what the wasm shim's
//! compile cache holds and logs of them.

use std::fs;

use anyhow::Context;
use serde::Serialize;

use super::COMPILE_CACHE_DIR;

/// Prints `hello from wasm` and returns from `_start` (exit 0). `TAG` makes the module, and
/// so its digest and cache entry, this benchmark run's own.
const HELLO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (data (i32.const 256) "TAG")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"#;

/// Sleeps an hour at a time, forever, in `poll_oneoff` on one relative monotonic-clock
/// subscription (userdata 0, tag 0 = clock at 8, clock id 1 at 16, timeout in ns at 24,
/// precision 0 at 32, flags 0 at 40): blocked, not burning a CPU.
pub(super) const SLEEP: &str = r#"
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (loop $sleep
      (drop (call $poll_oneoff (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))
      (br $sleep))))
"#;

/// Never ends, never calls the host: only epoch interruption can stop it.
pub(super) const LOOP: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

/// WebAssembly text for the guests.
pub(super) fn assemble(wat: &str) -> anyhow::Result<Vec<u8>> {
    wat::parse_str(wat).context("assembling a benchmark guest")
}

/// The hello guest made unique by `tag` (letters, digits and `-`).
pub(super) fn hello(tag: &str) -> anyhow::Result<Vec<u8>> {
    assemble(&HELLO.replace("TAG", tag))
}

/// Whether the cache file `name` is an entry (`DIGEST-COMPAT.cwasm`) of the guest whose
/// SHA-256 is `digest`.
pub fn is_cache_entry_of(name: &str, digest: &str) -> bool {
    name.strip_prefix(digest)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|rest| rest.ends_with(".cwasm"))
}

/// Deletes every compile cache entry of `digest`; how many there were.
pub(super) fn remove_cache_entries(digest: &str) -> std::io::Result<usize> {
    let dir = match fs::read_dir(COMPILE_CACHE_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in dir {
        let entry = entry?;
        if is_cache_entry_of(&entry.file_name().to_string_lossy(), digest) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What the shims logged about one guest: `compiled` and `cache hit` lines naming its digest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CacheCounts {
    pub compiled: usize,
    pub cache_hits: usize,
}

/// Counts the lines of `log` naming `digest` whose message is `compiled` or `cache hit`
/// (the wasm shim's `tracing` line for each Create of a guest; a warning such as `cannot
/// store the compiled guest` is not counted).
pub fn count_cache_lines(log: &str, digest: &str) -> CacheCounts {
    let mut counts = CacheCounts::default();
    for line in log.lines().filter(|l| l.contains(digest)) {
        if line.contains("cache hit") {
            counts.cache_hits += 1;
        } else if line.contains("compiled") && !line.contains("cannot store") {
            counts.compiled += 1;
        }
    }
    counts
}

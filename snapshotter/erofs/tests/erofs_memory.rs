//! Memory does not grow with file size: converting 1 GiB, 1 TiB and (almost) 16 TiB sparse
//! files of 8 KB of data each raises this process's peak RSS by amounts within 16 MiB of
//! each other. One test in its own binary, so no other test shares the process.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::Scratch;
use hyperbox_erofs::{commit_layer, ChunkStore, ImageOptions, StoreConfig};

fn status_kib(field: &str) -> u64 {
    let s = fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

#[test]
fn peak_memory_is_independent_of_sparse_file_size() {
    let scratch = Scratch::new("memory");
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    // ext4's largest file is 16 TiB less one block; 64 KiB less keeps whole chunks.
    let sizes: [(&str, u64); 3] = [
        ("1 GiB", 1 << 30),
        ("1 TiB", 1 << 40),
        ("16 TiB", (16 << 40) - (64 << 10)),
    ];
    let opts = ImageOptions::default().with_max_image_bytes(3 << 30);
    let mut peaks = Vec::new();
    for (i, (name, size)) in sizes.iter().enumerate() {
        let src = scratch.join(&format!("src{i}"));
        fs::create_dir(&src).unwrap();
        let f = common::create_rw(&src.join("sparse"));
        f.set_len(*size).unwrap();
        f.write_all_at(&[0x5a; 8192], size / 2).unwrap();
        drop(f);
        let image = scratch.join(&format!("l{i}.erofs"));
        fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
        let before = status_kib("VmRSS:");
        let t = std::time::Instant::now();
        let r = commit_layer(&store, &format!("l{i}"), &src, &image, &opts).unwrap();
        let took = t.elapsed();
        let peak = status_kib("VmHWM:");
        // The kernel moves VmHWM up lazily (at unmap and when read), so memory the allocator
        // gave back otherwise between the reset and now can leave it below `before`: the
        // conversion then added nothing above where it started.
        let added = peak.saturating_sub(before);
        eprintln!(
            "{name}: peak RSS {} KiB (+{} KiB over {} KiB), image {} MiB, {took:?}",
            peak,
            added,
            before,
            r.image.image_bytes >> 20
        );
        assert_eq!(r.image.chunks, 1, "{r:?}");
        peaks.push(added);
        fs::remove_file(&image).unwrap();
        fs::remove_dir_all(&src).unwrap();
    }
    let spread = peaks.iter().max().unwrap() - peaks.iter().min().unwrap();
    assert!(
        spread < 16 << 10,
        "peak RSS growth differs by {spread} KiB: {peaks:?}"
    );
}

//! Chunk+hash throughput per core (sha256 vs blake3, 64 KiB vs 1 MiB chunks), layer write
//! throughput, and dedup of whole trees against storing each tree as a plain directory (what
//! overlayfs keeps for flattened images).
//!
//! `cargo bench -p hyperbox-erofs --bench chunk_throughput -- [TREE...]`
//! Without trees only the in-memory figures are measured. Needs root for trees (it reads
//! them whole); writes scratch stores under $BENCH_SCRATCH (default /var/tmp)/hyperbox-erofs-bench-PID
//! and removes them; BENCH_CHUNK_BITS=16,20 picks the chunk sizes (and their order),
//! BENCH_INLINE=2048 the inline limits.

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hyperbox_erofs::{commit_layer, ChunkStore, ImageOptions, StoreConfig};
use sha2::{Digest, Sha256};

const MIB: f64 = 1024.0 * 1024.0;

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// CPU seconds (user + system) this process has used.
fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn rate(bytes: usize, secs: f64) -> String {
    format!("{:7.0} MiB/s", bytes as f64 / MIB / secs)
}

fn digests(data: &[u8]) {
    let zero = vec![0u8; 1 << 20];
    for bits in [16u32, 20] {
        let chunk = 1usize << bits;
        for (name, f) in [
            (
                "sha256",
                &(|c: &[u8]| Sha256::digest(c)[0]) as &dyn Fn(&[u8]) -> u8,
            ),
            ("blake3", &|c: &[u8]| blake3::hash(c).as_bytes()[0]),
        ] {
            // warm up, then best of 3
            let mut best = f64::MAX;
            let mut sink = 0u8;
            for _ in 0..3 {
                let t = Instant::now();
                for c in data.chunks(chunk) {
                    // the writer's per-chunk work: hole test, then hash
                    if c != &zero[..c.len()] {
                        sink ^= f(c);
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "chunk+hash {name} {:>5} KiB chunks, one core: {}   ({sink})",
                chunk >> 10,
                rate(data.len(), best)
            );
        }
    }
}

/// Disk usage of a tree as a plain directory (like `du -s`: hard links once).
fn du(root: &Path, seen: &mut HashSet<(u64, u64)>) -> (u64, u64) {
    let mut disk = 0;
    let mut data = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if !seen.insert((m.dev(), m.ino())) {
            continue;
        }
        disk += m.blocks() * 512;
        if m.is_file() {
            data += m.len();
        }
        if m.is_dir() {
            if let Ok(rd) = fs::read_dir(&p) {
                stack.extend(rd.filter_map(|e| e.ok().map(|e| e.path())));
            }
        }
    }
    (disk, data)
}

fn trees(trees: &[PathBuf]) {
    let base = std::env::var("BENCH_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
    let scratch = PathBuf::from(format!(
        "{base}/hyperbox-erofs-bench-{}",
        std::process::id()
    ));
    let order: Vec<u8> = std::env::var("BENCH_CHUNK_BITS")
        .unwrap_or_else(|_| "16,20".into())
        .split(',')
        .map(|b| {
            b.parse()
                .expect("BENCH_CHUNK_BITS: comma-separated numbers")
        })
        .collect();
    let inlines: Vec<u64> = std::env::var("BENCH_INLINE")
        .unwrap_or_else(|_| "2048".into())
        .split(',')
        .map(|b| b.parse().expect("BENCH_INLINE: comma-separated numbers"))
        .collect();
    let mut baseline = 0;
    let mut data_total = 0;
    for t in trees {
        let (disk, data) = du(t, &mut HashSet::new());
        println!(
            "tree {}: {:.1} MiB on disk, {:.1} MiB file data",
            t.display(),
            disk as f64 / MIB,
            data as f64 / MIB
        );
        baseline += disk;
        data_total += data;
    }
    println!(
        "plain directories (overlayfs lower dirs) total: {:.1} MiB",
        baseline as f64 / MIB
    );
    for &bits in &order {
        for &inline in &inlines {
            let _ = fs::remove_dir_all(&scratch);
            fs::create_dir_all(&scratch).unwrap();
            let store = ChunkStore::open(
                &scratch.join("store"),
                StoreConfig::default().with_chunk_bits(bits),
            )
            .unwrap();
            let opts = ImageOptions::default().with_inline_max(inline);
            let mut images = 0;
            let t0 = Instant::now();
            let c0 = cpu_secs();
            let mut first_rate = String::new();
            for (i, t) in trees.iter().enumerate() {
                let img = scratch.join(format!("{i}.erofs"));
                let t1 = Instant::now();
                let r = commit_layer(&store, &format!("l{i}"), t, &img, &opts).unwrap();
                let secs = t1.elapsed().as_secs_f64();
                if i == 0 {
                    let (_, data) = du(t, &mut HashSet::new());
                    first_rate = rate(data as usize, secs);
                }
                images += fs::metadata(&img).unwrap().blocks() * 512;
                println!(
                    "  {:>4} KiB chunks, layer {i}: {:.2} s, new {:.1} MiB, shared {:.1} MiB, image {:.2} MiB, {} chunks",
                    1u32 << (bits - 10),
                    secs,
                    r.chunks.new_bytes as f64 / MIB,
                    r.chunks.shared_bytes as f64 / MIB,
                    r.image.image_bytes as f64 / MIB,
                    r.image.chunks
                );
            }
            let total_secs = t0.elapsed().as_secs_f64();
            let total_cpu = cpu_secs() - c0;
            let packs = store.stats().unwrap().pack_disk_bytes;
            println!(
                "{:>4} KiB chunks, inline <= {inline}: packs {:.1} MiB + images {:.1} MiB = {:.1} MiB, {:.3} of plain directories; write {} (first layer, all new), {} over all layers, {} per CPU second",
                1u32 << (bits - 10),
                packs as f64 / MIB,
                images as f64 / MIB,
                (packs + images) as f64 / MIB,
                (packs + images) as f64 / baseline as f64,
                first_rate,
                rate(data_total as usize, total_secs),
                rate(data_total as usize, total_cpu),
            );
            drop(store);
        }
    }
    let _ = fs::remove_dir_all(&scratch);
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too, unoptimized: measure only under
    // `cargo bench`, which passes --bench.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("chunk_throughput: measures only under `cargo bench`");
        return;
    }
    let args: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(PathBuf::from)
        .collect();
    let data = pattern(512 << 20);
    digests(&data);
    drop(data);
    if !args.is_empty() {
        trees(&args);
    }
}

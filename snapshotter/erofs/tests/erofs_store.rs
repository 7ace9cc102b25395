//! The chunk store: dedup across layers, GC with hole punching, kill -9 while writing,
//! corrupt and truncated packs.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{compare_trees, extract_and_compare, pattern, root_for, Scratch};
use hyperbox_erofs::{
    chunk_digest, commit_layer, mount_image, ChunkStore, ImageOptions, MountMode, StoreConfig,
    StoreError, DEFAULT_CHUNK_BITS,
};

const MIB: usize = 1 << 20;

/// Writes files `name -> (seed, size)` under `dir`.
fn make_tree<S: AsRef<str>>(dir: &Path, files: &[(S, u64, usize)]) {
    for (name, seed, size) in files {
        let p = dir.join(name.as_ref());
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, pattern(*seed, *size)).unwrap();
    }
}

/// The kernel mount's skip, recorded once by each test that mounts.
const MOUNT: &str = "the kernel mount of the images";

/// With `mount` (root), mounts the image at `mnt` and compares it with `src`; otherwise has
/// fsck.erofs extract it to `mnt` and compares names and contents.
fn mount_and_compare(mount: bool, store: &ChunkStore, image: &Path, src: &Path, mnt: &Path) {
    if !mount {
        extract_and_compare(image, &store.pack_paths(), src, mnt);
        return;
    }
    fs::create_dir_all(mnt).unwrap();
    let m = mount_image(image, &store.pack_paths(), mnt, MountMode::FileBacked).unwrap();
    compare_trees(src, mnt);
    m.unmount().unwrap();
}

#[test]
fn shared_files_across_layers_are_stored_once() {
    let mount = root_for(MOUNT);
    let s = Scratch::new("dedup");
    let store = ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap();
    let (a, b) = (s.join("a"), s.join("b"));
    make_tree(
        &a,
        &[
            ("usr/lib/one", 1, 3 * MIB + 100),
            ("usr/lib/two", 2, 2 * MIB),
            ("usr/bin/three", 3, 700_000),
            ("only-a", 4, MIB),
        ],
    );
    // b: the same three files under other names, one changed in its second MiB, one new.
    make_tree(
        &b,
        &[
            ("lib/one", 1, 3 * MIB + 100),
            ("lib/two-renamed", 2, 2 * MIB),
            ("bin/three", 3, 700_000),
            ("only-b", 5, MIB / 2),
        ],
    );
    let mut changed = pattern(1, 3 * MIB + 100);
    changed[MIB + 5] ^= 0xff;
    fs::write(b.join("lib/one-changed"), &changed).unwrap();

    let ra = commit_layer(
        &store,
        "a",
        &a,
        &s.join("a.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    let after_a = store.stats().unwrap().pack_disk_bytes;
    let rb = commit_layer(
        &store,
        "b",
        &b,
        &s.join("b.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    let after_b = store.stats().unwrap().pack_disk_bytes;
    eprintln!("a: {ra:?}\nb: {rb:?}\npack disk bytes: {after_a} then {after_b}");

    let a_bytes = (3 * MIB + 100 + 2 * MIB + 700_000 + MIB) as u64;
    assert_eq!(ra.chunks.new_bytes, a_bytes);
    // b stores only its own file and the one changed chunk.
    let chunk = 1usize << DEFAULT_CHUNK_BITS;
    let b_new = (MIB / 2 + chunk) as u64;
    assert_eq!(rb.chunks.new_bytes, b_new);
    assert_eq!(
        rb.chunks.shared_bytes,
        a_bytes - MIB as u64 + (3 * MIB + 100 - chunk) as u64
    );
    let grew = after_b - after_a;
    assert!(
        grew <= b_new + 8192,
        "packs grew by {grew} bytes for {b_new} bytes of new data"
    );
    let st = store.stats().unwrap();
    assert_eq!(st.live_bytes, a_bytes + b_new);

    mount_and_compare(mount, &store, &s.join("a.erofs"), &a, &s.join("mnt-a"));
    mount_and_compare(mount, &store, &s.join("b.erofs"), &b, &s.join("mnt-b"));
}

#[test]
fn removing_layers_and_gc_return_the_disk_space() {
    let mount = root_for(MOUNT);
    let s = Scratch::new("gc");
    let store = ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap();
    let (a, b) = (s.join("a"), s.join("b"));
    let shared: Vec<(String, u64, usize)> = (0..4)
        .map(|i| (format!("shared/{i}"), 500 + i, MIB))
        .collect();
    let mut fa: Vec<(String, u64, usize)> =
        (0..8).map(|i| (format!("a/{i}"), 100 + i, MIB)).collect();
    fa.extend(shared.iter().cloned());
    let mut fb: Vec<(String, u64, usize)> =
        (0..2).map(|i| (format!("b/{i}"), 200 + i, MIB)).collect();
    fb.extend(shared.iter().cloned());
    make_tree(&a, &fa);
    make_tree(&b, &fb);
    commit_layer(
        &store,
        "a",
        &a,
        &s.join("a.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    commit_layer(
        &store,
        "b",
        &b,
        &s.join("b.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    let du0 = store.stats().unwrap().pack_disk_bytes;
    assert!(du0 >= 14 * MIB as u64, "{du0}");

    assert!(store.remove_layer("a").unwrap());
    assert!(!store.remove_layer("a").unwrap());
    let st = store.stats().unwrap();
    assert_eq!(st.garbage_bytes, 8 * MIB as u64, "{st:?}");
    // Removal alone frees nothing yet (deferred GC).
    assert_eq!(st.pack_disk_bytes, du0);
    let gc = store.gc().unwrap();
    assert_eq!(gc.bytes_reclaimed, 8 * MIB as u64, "{gc:?}");
    let du1 = store.stats().unwrap().pack_disk_bytes;
    eprintln!("pack disk bytes: {du0} with a and b, {du1} after removing a and gc");
    assert!(du1 <= du0 - 8 * MIB as u64, "du {du0} -> {du1}");
    assert!(store.verify().unwrap().problems.is_empty());
    mount_and_compare(mount, &store, &s.join("b.erofs"), &b, &s.join("mnt-b"));

    // Data of a removed layer is not shared with new layers once it is garbage.
    let c = s.join("c");
    make_tree(&c, &fa);
    let rc = commit_layer(
        &store,
        "c",
        &c,
        &s.join("c.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    assert_eq!(rc.chunks.new_bytes, 8 * MIB as u64, "{rc:?}");
    mount_and_compare(mount, &store, &s.join("c.erofs"), &c, &s.join("mnt-c"));

    for id in ["b", "c"] {
        assert!(store.remove_layer(id).unwrap());
    }
    store.gc().unwrap();
    let st = store.stats().unwrap();
    assert_eq!(
        (st.layers, st.live_chunks, st.garbage_chunks),
        (0, 0, 0),
        "{st:?}"
    );
    assert!(st.pack_disk_bytes < 64 * 1024, "{st:?}");
    // du(1) agrees.
    let out = Command::new("du")
        .arg("-sB1")
        .args(store.pack_paths())
        .output()
        .unwrap();
    eprintln!(
        "du of empty packs: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn concurrent_layers_use_separate_packs() {
    let mount = root_for(MOUNT);
    let s = Scratch::new("concurrent");
    let store = ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap();
    std::thread::scope(|scope| {
        for t in 0..3u64 {
            let (store, s) = (&store, &s);
            scope.spawn(move || {
                let src = s.join(&format!("src{t}"));
                make_tree(&src, &[("f", 1000 + t, 3 * MIB), ("common", 7, 2 * MIB)]);
                let img = s.join(&format!("l{t}.erofs"));
                commit_layer(
                    store,
                    &format!("l{t}"),
                    &src,
                    &img,
                    &ImageOptions::default(),
                )
                .unwrap();
            });
        }
    });
    for t in 0..3 {
        mount_and_compare(
            mount,
            &store,
            &s.join(&format!("l{t}.erofs")),
            &s.join(&format!("src{t}")),
            &s.join(&format!("mnt{t}")),
        );
    }
    assert!(matches!(
        commit_layer(
            &store,
            "l0",
            &s.join("src0"),
            &s.join("again.erofs"),
            &ImageOptions::default()
        ),
        Err(hyperbox_erofs::LayerError::Store(
            StoreError::LayerExists { .. }
        ))
    ));
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn second_process_cannot_open_the_store() {
    let s = Scratch::new("busy");
    let _store = ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap();
    // flock is per open file description: a second open in this process conflicts too.
    assert!(matches!(
        ChunkStore::open(&s.join("store"), StoreConfig::default()),
        Err(StoreError::Busy { .. })
    ));
}

#[test]
fn reopening_with_other_settings_is_refused() {
    let s = Scratch::new("settings");
    drop(ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap());
    let err =
        ChunkStore::open(&s.join("store"), StoreConfig::default().with_chunk_bits(20)).unwrap_err();
    assert!(matches!(err, StoreError::ConfigMismatch { .. }), "{err}");
}

#[test]
fn corrupt_and_truncated_packs_are_reported() {
    let s = Scratch::new("corrupt");
    let store =
        ChunkStore::open(&s.join("store"), StoreConfig::default().with_chunk_bits(20)).unwrap();
    let src = s.join("src");
    make_tree(&src, &[("a", 1, MIB), ("b", 2, MIB), ("c", 3, MIB)]);
    commit_layer(
        &store,
        "l",
        &src,
        &s.join("l.erofs"),
        &ImageOptions::default(),
    )
    .unwrap();
    assert!(store.verify().unwrap().problems.is_empty());
    let first = chunk_digest(&pattern(1, MIB));
    assert_eq!(store.read_chunk(&first).unwrap(), pattern(1, MIB));

    // Flip one byte of the first chunk in the pack.
    let pack = store.pack_paths()[0].clone();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pack)
        .unwrap();
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, 1000).unwrap();
    f.write_all_at(&[byte[0] ^ 0x55], 1000).unwrap();
    let report = store.verify().unwrap();
    assert_eq!(report.chunks_checked, 3);
    assert_eq!(report.problems.len(), 1, "{report:?}");
    let msg = report.problems[0].error.to_string();
    assert!(
        matches!(
            report.problems[0].error,
            StoreError::CorruptChunk { offset: 0, .. }
        ),
        "{msg}"
    );
    assert!(msg.contains(&pack.display().to_string()), "{msg}");
    let err = store.read_chunk(&first).unwrap_err();
    assert!(matches!(err, StoreError::CorruptChunk { .. }), "{err}");
    eprintln!("corrupt: {err}");

    // Cut the pack short: the chunks past the end are reported missing.
    f.set_len(MIB as u64 + 4096).unwrap();
    let report = store.verify().unwrap();
    let truncated: Vec<_> = report
        .problems
        .iter()
        .filter(|p| matches!(p.error, StoreError::TruncatedPack { .. }))
        .collect();
    assert_eq!(truncated.len(), 2, "{report:?}");
    eprintln!("truncated: {}", truncated[0].error);
}

fn crash_dir() -> Option<PathBuf> {
    std::env::var_os("HYPERBOX_EROFS_CRASH_DIR").map(PathBuf::from)
}

/// Child of `kill_9_while_writing_leaves_a_usable_store`: commits layers until killed.
#[test]
#[ignore = "run by kill_9_while_writing_leaves_a_usable_store as its child"]
fn crash_child() {
    let Some(dir) = crash_dir() else {
        return;
    };
    let round: u64 = std::env::var("HYPERBOX_EROFS_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    let store = ChunkStore::open(&dir.join("store"), StoreConfig::default()).unwrap();
    for i in 0..1000u64 {
        let id = round * 1000 + i;
        let src = dir.join(format!("src-{id}"));
        let files: Vec<(String, u64, usize)> = (0..4)
            .map(|k| (format!("d{k}/f"), id * 10 + k, MIB + 4096 * k as usize))
            .chain([("shared".to_string(), 1, 2 * MIB)])
            .collect();
        make_tree(&src, &files);
        let image = dir.join(format!("l{id}.erofs"));
        commit_layer(
            &store,
            &format!("l{id}"),
            &src,
            &image,
            &ImageOptions::default(),
        )
        .unwrap();
        if i % 3 == 2 {
            // Removal and GC are interrupted too.
            store.remove_layer(&format!("l{}", id - 1)).unwrap();
            fs::remove_file(dir.join(format!("l{}.erofs", id - 1))).unwrap();
            store.gc().unwrap();
        }
    }
}

#[test]
fn kill_9_while_writing_leaves_a_usable_store() {
    let mount = root_for(MOUNT);
    let s = Scratch::new("crash");
    let exe = std::env::current_exe().unwrap();
    let mut committed_total = 0;
    let mut interrupted = 0;
    for (round, delay_ms) in [120u64, 300, 550, 800, 1100].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--include-ignored", "--nocapture"])
            .env("HYPERBOX_EROFS_CRASH_DIR", &s.path)
            .env("HYPERBOX_EROFS_CRASH_ROUND", round.to_string())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();

        let store = ChunkStore::open(&s.join("store"), StoreConfig::default()).unwrap();
        // Was the child killed inside a layer (its tree written, the layer not committed)?
        let layers = store.layers().unwrap();
        let last_src = (0..1000)
            .map(|i| round as u64 * 1000 + i)
            .take_while(|id| s.join(&format!("src-{id}")).exists())
            .last();
        if let Some(id) = last_src {
            if !layers.contains(&format!("l{id}")) {
                interrupted += 1;
            }
        }
        let report = store.verify().unwrap();
        assert!(report.problems.is_empty(), "round {round}: {report:?}");
        for id in store.layers().unwrap() {
            let image = s.join(&format!("{id}.erofs"));
            if image.exists() {
                let src = match id.strip_prefix('l') {
                    Some(n) => s.join(&format!("src-{n}")),
                    None => s.join(&id),
                };
                mount_and_compare(mount, &store, &image, &src, &s.join("mnt"));
                committed_total += 1;
            } else {
                // Killed between the index commit and the rename (or the removal of an
                // image before its layer): the documented recovery.
                store.remove_layer(&id).unwrap();
            }
        }
        store.gc().unwrap();
        // The store takes new layers after the crash.
        let src = s.join(&format!("after-{round}"));
        make_tree(&src, &[("x", 9000 + round as u64, 2 * MIB + 1)]);
        let image = s.join(&format!("after-{round}.erofs"));
        commit_layer(
            &store,
            &format!("after-{round}"),
            &src,
            &image,
            &ImageOptions::default(),
        )
        .unwrap();
        mount_and_compare(mount, &store, &image, &src, &s.join("mnt"));
        eprintln!(
            "round {round}: killed after {delay_ms} ms, {} layers",
            store.layers().unwrap().len()
        );
    }
    assert!(committed_total > 0, "no child ever committed a layer");
    assert!(interrupted > 0, "no child was killed inside a layer");
}

#[test]
fn pack_paths_too_long_for_one_mount_page_are_refused() {
    let root = PathBuf::from(format!(
        "/var/tmp/hyperbox-erofs-long-{}/{}",
        std::process::id(),
        "d".repeat(250)
    ));
    let err = ChunkStore::open(&root, StoreConfig::default().with_pack_count(16)).unwrap_err();
    assert!(matches!(err, StoreError::InvalidConfig(_)), "{err}");
    assert!(
        !root.exists(),
        "nothing is created for a refused configuration"
    );
}

//! Hostile trees: deep nesting on a small stack, a directory moved away mid-walk, `.` and
//! `..` in every listing, and the limits on depth, inodes, image size and time.

mod common;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{fsck, root_for, Fsck, Scratch};
use hyperbox_erofs::{
    commit_layer, mount_image, ChunkStore, ImageError, ImageOptions, LayerError, MountMode,
    StoreConfig,
};
use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Makes `depth` nested directories named `d` under `root` (one descriptor open at a time)
/// and a file `leaf` in the deepest; returns the deepest directory's path relative to `root`.
fn make_deep(root: &Path, depth: usize) -> PathBuf {
    fs::create_dir_all(root).unwrap();
    let mut cur = Dir::open(root, OFlag::O_DIRECTORY | OFlag::O_RDONLY, Mode::empty()).unwrap();
    for _ in 0..depth {
        nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), "d", Mode::from_bits_truncate(0o755))
            .unwrap();
        cur = Dir::openat(
            Some(cur.as_raw_fd()),
            "d",
            OFlag::O_DIRECTORY | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .unwrap();
    }
    let leaf = nix::fcntl::openat(
        Some(cur.as_raw_fd()),
        "leaf",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    // SAFETY: `leaf` was just returned by openat and is owned by nothing else.
    let mut leaf = unsafe { <fs::File as std::os::fd::FromRawFd>::from_raw_fd(leaf) };
    std::io::Write::write_all(&mut leaf, b"at the bottom").unwrap();
    ["d"; 1].repeat(depth).iter().collect()
}

/// Runs `f` on a thread with a 128 KiB stack: a walk that recursed per level would overflow
/// it within a few hundred levels.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap()
}

fn layer_error(r: Result<hyperbox_erofs::LayerReport, LayerError>) -> ImageError {
    match r {
        Err(LayerError::Image(e)) => e,
        other => panic!("expected an image error, got {other:?}"),
    }
}

/// The store and the image's directory hold nothing of a layer whose image failed.
fn nothing_left(store: &ChunkStore, image: &Path) {
    assert!(store.layers().unwrap().is_empty(), "no layer committed");
    let dir = image.parent().unwrap();
    let leftovers: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().contains(".erofs"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

#[test]
fn a_1950_deep_tree_converts_on_a_small_stack() {
    let scratch = Scratch::new("deep1950");
    let src = scratch.join("src");
    let deepest = make_deep(&src, 1950);
    let store_dir = scratch.join("store");
    let image = scratch.join("l.erofs");
    let (s, i) = (src.clone(), image.clone());
    let report = on_small_stack(move || {
        let store = ChunkStore::open(&store_dir, StoreConfig::default()).unwrap();
        commit_layer(&store, "l", &s, &i, &ImageOptions::default()).map(|r| (r, store))
    });
    let (report, store) = report.expect("a 1,950-deep tree converts");
    assert_eq!(report.image.depth, 1950);
    assert_eq!(report.image.inodes, 1 + 1950 + 1);
    if !root_for("the kernel mount of the image") {
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount_image(&image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    assert_eq!(
        fs::read(mnt.join(&deepest).join("leaf")).unwrap(),
        b"at the bottom"
    );
    m.unmount().unwrap();
}

#[test]
fn a_tree_deeper_than_the_limit_fails_cleanly() {
    let scratch = Scratch::new("deep5000");
    let src = scratch.join("src");
    make_deep(&src, 5000);
    fs::create_dir(scratch.join("img")).unwrap();
    let store_dir = scratch.join("store");
    let image = scratch.join("img/l.erofs");
    let (s, i, sd) = (src.clone(), image.clone(), store_dir.clone());
    let err = on_small_stack(move || {
        let store = ChunkStore::open(&sd, StoreConfig::default()).unwrap();
        layer_error(commit_layer(&store, "l", &s, &i, &ImageOptions::default()))
    });
    assert!(
        matches!(err, ImageError::TooDeep { limit: 4096, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("deeper than 4096 levels"), "{text}");
    let store = ChunkStore::open(&store_dir, StoreConfig::default()).unwrap();
    nothing_left(&store, &image);
    // A lower limit is honoured exactly: 100 levels pass at 100, fail at 99.
    let shallow = scratch.join("shallow");
    make_deep(&shallow, 100);
    let opts = ImageOptions::default().with_max_depth(100);
    commit_layer(&store, "ok", &shallow, &image, &opts).expect("100 levels at a limit of 100");
    let opts = ImageOptions::default().with_max_depth(99);
    let image2 = scratch.join("img/l2.erofs");
    let err = layer_error(commit_layer(&store, "no", &shallow, &image2, &opts));
    assert!(
        matches!(err, ImageError::TooDeep { limit: 99, .. }),
        "{err}"
    );
}

#[test]
fn a_directory_moved_out_from_under_the_walk_is_refused() {
    let scratch = Scratch::new("moved");
    let src = scratch.join("src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("a/b/big"), common::pattern(1, 100_000)).unwrap();
    fs::write(src.join("a/z-after"), b"x").unwrap();
    let outside = scratch.join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), b"not in the tree").unwrap();
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    // At the first chunk (inside a/b), a/b moves out of the tree: going back up through
    // `..` would now lead outside.
    let (from, to) = (src.join("a/b"), outside.join("b"));
    let mut sink = common::OnFirstChunk {
        inner: store.begin_layer("l").unwrap(),
        act: Some(Box::new(move || fs::rename(from, to).unwrap())),
    };
    let image = scratch.join("l.erofs");
    let out = common::create_rw(&image);
    let err = hyperbox_erofs::write_image(&src, &out, &image, &mut sink, &ImageOptions::default())
        .expect_err("the walk must not follow b to its new parent");
    assert!(matches!(err, ImageError::Changed { .. }), "{err}");
}

/// Every directory, the root included, lists `.` and `..` with non-zero inode numbers
/// (`readdir` drops entries whose inode number is 0), even next to names that sort before
/// `.`, such as `-x` and `+x`.
#[test]
fn every_directory_lists_dot_and_dotdot() {
    let scratch = Scratch::new("dots");
    let src = scratch.join("src");
    fs::create_dir_all(src.join("bin/sub")).unwrap();
    for f in ["-dash", "+plus", "bin/-dash", "bin/sh", "bin/sub/!bang"] {
        fs::write(src.join(f), b"x").unwrap();
    }
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    let image = scratch.join("l.erofs");
    commit_layer(&store, "l", &src, &image, &ImageOptions::default()).unwrap();
    if !root_for("the kernel mount of the image") {
        // Without the kernel, fsck.erofs walks every directory of the image.
        let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::Data);
        assert!(ok, "fsck.erofs failed: {out}");
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount_image(&image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    for d in ["", "bin", "bin/sub"] {
        let list = |root: &Path| {
            let mut dir = Dir::open(
                &root.join(d),
                OFlag::O_DIRECTORY | OFlag::O_RDONLY,
                Mode::empty(),
            )
            .unwrap();
            let mut names: Vec<(String, bool)> = dir
                .iter()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name().to_string_lossy().into_owned(), e.ino() != 0)
                })
                .collect();
            names.sort();
            names
        };
        let ours = list(&mnt);
        assert_eq!(ours, list(&src), "listing of /{d}");
        assert!(ours.iter().any(|(n, _)| n == ".."), "/{d}: {ours:?}");
        assert!(ours.iter().all(|(_, nonzero)| *nonzero), "/{d}: {ours:?}");
    }
    m.unmount().unwrap();
}

#[test]
fn limits_on_inodes_image_size_and_time_fail_before_the_cost_is_paid() {
    let scratch = Scratch::new("limits");
    let src = scratch.join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..50 {
        fs::write(src.join(format!("f{i}")), b"small").unwrap();
    }
    // A 1 TiB sparse file: 16 Mi chunk indexes (128 MiB of image) for 8 KB of data.
    let sparse = common::create_rw(&src.join("sparse"));
    sparse.set_len(1 << 40).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[7u8; 8192], 1 << 39).unwrap();
    drop(sparse);
    fs::create_dir(scratch.join("img")).unwrap();
    let image = scratch.join("img/l.erofs");
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();

    let opts = ImageOptions::default().with_max_inodes(20);
    let err = layer_error(commit_layer(&store, "l", &src, &image, &opts));
    assert!(
        matches!(
            err,
            ImageError::OverLimit {
                limit: 20,
                needed: 21,
                ..
            }
        ),
        "{err}"
    );

    let t = std::time::Instant::now();
    let opts = ImageOptions::default().with_max_image_bytes(64 << 20);
    let err = layer_error(commit_layer(&store, "l", &src, &image, &opts));
    assert!(
        matches!(err, ImageError::OverLimit { needed, limit, .. } if needed == 128 << 20 && limit == 64 << 20),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    let opts = ImageOptions::default().with_time_limit(Duration::ZERO);
    let err = layer_error(commit_layer(&store, "l", &src, &image, &opts));
    assert!(matches!(err, ImageError::TimedOut { .. }), "{err}");
    assert!(err.to_string().contains("time limit"), "{err}");
    nothing_left(&store, &image);

    // Within the default limits the sparse file converts; its holes cost nothing.
    let t = std::time::Instant::now();
    let r = commit_layer(&store, "l", &src, &image, &ImageOptions::default()).unwrap();
    eprintln!("1 TiB sparse layer: {:?} in {:?}", r, t.elapsed());
    assert_eq!(r.image.chunks, 1, "{r:?}");
    assert_eq!(r.image.hole_chunks, (1 << 24) - 1, "{r:?}");
    assert!(r.chunks.new_bytes <= 64 << 10, "{r:?}");
    if !root_for("the kernel mount of the image") {
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount_image(&image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    let f = fs::File::open(mnt.join("sparse")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 40);
    let mut buf = vec![1u8; 16384];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, (1 << 39) - 4096).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0));
    assert!(buf[4096..4096 + 8192].iter().all(|&b| b == 7));
    assert!(buf[4096 + 8192..].iter().all(|&b| b == 0));
    drop(f);
    m.unmount().unwrap();
}

//! Writes an image of a tree with every kind of entry, checks it with fsck.erofs, mounts it
//! with the kernel (file-backed and through loop devices) and compares it with the source.
//! Without root, the images are still written and checked; only the mounts are skipped.

mod common;

use std::fs;
use std::path::Path;

use common::{build_full_tree, compare_trees, fsck, require_root, root_for, Fsck, Scratch};
use hyperbox_erofs::{commit_layer, mount_image, ChunkStore, ImageOptions, MountMode, StoreConfig};

fn round_trip(name: &str, mode: MountMode, chunk_bits: u8) {
    let scratch = Scratch::new(name);
    let src = scratch.join("src");
    build_full_tree(&src);
    let store = ChunkStore::open(
        &scratch.join("store"),
        StoreConfig::default().with_chunk_bits(chunk_bits),
    )
    .unwrap();
    let image = scratch.join("layer.erofs");
    let report = commit_layer(&store, "layer-1", &src, &image, &ImageOptions::default()).unwrap();
    eprintln!("{name}: {report:?}");
    assert!(report.image.chunked_files >= 10, "{report:?}");
    assert!(report.image.hole_chunks > 0, "{report:?}");
    // user.shared, and security.capability where root could set it.
    let shared_xattrs = if common::is_root() { 2 } else { 1 };
    assert_eq!(report.image.shared_xattrs, shared_xattrs, "{report:?}");
    // dup-1 and dup-2 share their chunks; so do hard links (one inode).
    assert!(report.chunks.shared_chunks > 0, "{report:?}");

    let t = std::time::Instant::now();
    let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::Data);
    eprintln!("fsck.erofs --extract took {:?}", t.elapsed());
    eprintln!("fsck.erofs: {out}");
    assert!(ok, "fsck.erofs failed: {out}");

    if !root_for("the kernel mount of the image") {
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = mount_image(&image, &store.pack_paths(), &mnt, mode).unwrap();
    if mode == MountMode::LoopDevices {
        assert_eq!(mounted.loop_devices().len(), 1 + store.pack_paths().len());
    }
    let n = compare_trees(&src, &mnt);
    assert!(n > 750, "compared {n} entries");
    // Nothing escapes: the absolute and upward symlinks are links in the image, not content.
    let m = fs::symlink_metadata(mnt.join("sym-abs")).unwrap();
    assert!(m.file_type().is_symlink());
    assert_eq!(
        fs::read_link(mnt.join("sym-up")).unwrap(),
        Path::new("../../../../etc/shadow")
    );
    let loops = mounted.loop_devices().to_vec();
    mounted.unmount().unwrap();
    for l in loops {
        let name = l.file_name().unwrap().to_str().unwrap().to_string();
        let backing = format!("/sys/block/{name}/loop/backing_file");
        // autoclear: the loop device lets go of its file once the mount is gone
        let mut released = false;
        for _ in 0..100 {
            if !Path::new(&backing).exists() {
                released = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(released, "{} still attached after unmount", l.display());
    }
}

#[test]
fn full_tree_file_backed_mount_matches_source() {
    round_trip("filebacked", MountMode::FileBacked, 20);
}

#[test]
fn full_tree_loop_mount_matches_source() {
    round_trip("loop", MountMode::LoopDevices, 20);
}

#[test]
fn full_tree_with_64k_chunks_matches_source() {
    round_trip("chunk64k", MountMode::FileBacked, 16);
}

#[test]
fn fsck_extracts_chunked_files_from_the_packs() {
    let scratch = Scratch::new("fsck-extract");
    let src = scratch.join("src");
    fs::create_dir(&src).unwrap();
    for (i, size) in [10_000usize, 1 << 20, (3 << 20) + 77]
        .into_iter()
        .enumerate()
    {
        fs::write(src.join(format!("f{i}")), common::pattern(i as u64, size)).unwrap();
    }
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    let image = scratch.join("l.erofs");
    commit_layer(&store, "l", &src, &image, &ImageOptions::default()).unwrap();
    let out_dir = scratch.join("extracted");
    let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::ExtractTo(&out_dir));
    assert!(ok, "fsck.erofs --extract failed: {out}");
    for i in 0..3 {
        assert_eq!(
            fs::read(src.join(format!("f{i}"))).unwrap(),
            fs::read(out_dir.join(format!("f{i}"))).unwrap(),
            "f{i} extracted by fsck.erofs"
        );
    }
}

#[test]
fn auto_mode_mounts_file_backed_on_this_kernel() {
    let scratch = Scratch::new("auto");
    let src = scratch.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), common::pattern(1, 100_000)).unwrap();
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    let image = scratch.join("l.erofs");
    commit_layer(&store, "l", &src, &image, &ImageOptions::default()).unwrap();
    if !root_for("the kernel mount of the image") {
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = mount_image(&image, &store.pack_paths(), &mnt, MountMode::Auto).unwrap();
    // Linux 6.12+ mounts the files themselves: no loop device was needed.
    assert!(m.loop_devices().is_empty());
    compare_trees(&src, &mnt);
    m.unmount().unwrap();
}

#[test]
fn mounting_with_missing_devices_fails_cleanly() {
    let scratch = Scratch::new("missing-dev");
    let src = scratch.join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), common::pattern(1, 100_000)).unwrap();
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    let image = scratch.join("l.erofs");
    commit_layer(&store, "l", &src, &image, &ImageOptions::default()).unwrap();
    if !root_for("the kernel mount of the image") {
        return;
    }
    let mnt = scratch.join("mnt");
    fs::create_dir(&mnt).unwrap();
    // One device fewer than the image's device table: the kernel refuses the mount.
    let packs = store.pack_paths();
    let err = mount_image(
        &image,
        &packs[..packs.len() - 1],
        &mnt,
        MountMode::FileBacked,
    )
    .unwrap_err();
    eprintln!("{err}");
    assert!(
        err.to_string().contains(&mnt.display().to_string()),
        "{err}"
    );
}

/// Opt-in: `HYPERBOX_EROFS_ROOTFS=/path/a:/path/b cargo test -p hyperbox-erofs --test
/// erofs_image real_rootfs -- --ignored` writes each tree (e.g. a debootstrap rootfs) as a
/// layer of one store, mounts it and compares every entry.
#[test]
#[ignore = "needs HYPERBOX_EROFS_ROOTFS=tree[:tree...]"]
fn real_rootfs_round_trip() {
    if !require_root() {
        return;
    }
    let trees = std::env::var("HYPERBOX_EROFS_ROOTFS").expect("HYPERBOX_EROFS_ROOTFS");
    let scratch = Scratch::new("rootfs");
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    for (i, tree) in trees.split(':').enumerate() {
        let image = scratch.join(&format!("{i}.erofs"));
        let r = commit_layer(
            &store,
            &format!("l{i}"),
            Path::new(tree),
            &image,
            &ImageOptions::default(),
        )
        .unwrap();
        let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::Data);
        assert!(ok, "fsck.erofs {tree}: {out}");
        let mnt = scratch.join(&format!("mnt{i}"));
        fs::create_dir(&mnt).unwrap();
        let m = mount_image(&image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
        let n = compare_trees(Path::new(tree), &mnt);
        m.unmount().unwrap();
        eprintln!("{tree}: {n} entries match; {r:?}");
    }
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn entries_swapped_for_symlinks_mid_walk_are_stored_as_symlinks() {
    let scratch = Scratch::new("swap");
    let src = scratch.join("src");
    fs::create_dir_all(src.join("zz-dir")).unwrap();
    fs::write(src.join("zz-dir/inside"), b"in the tree").unwrap();
    fs::write(src.join("zz-file"), b"in the tree").unwrap();
    // Sorted first, so its chunks are stored before the walk reaches the zz- entries.
    fs::write(src.join("a-big"), common::pattern(3, 200_000)).unwrap();
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    // At the first chunk, the entries the walk has listed but not reached yet become
    // symlinks out of the tree.
    let swaps = [
        (src.join("zz-dir"), "/etc"),
        (src.join("zz-file"), "/etc/shadow"),
    ];
    let mut sink = common::OnFirstChunk {
        inner: store.begin_layer("l").unwrap(),
        act: Some(Box::new(move || {
            for (p, target) in swaps {
                fs::rename(&p, p.with_extension("old")).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            }
        })),
    };
    let image = scratch.join("l.erofs");
    let out = common::create_rw(&image);
    hyperbox_erofs::write_image(&src, &out, &image, &mut sink, &ImageOptions::default()).unwrap();
    sink.inner.commit().unwrap();
    let mnt = scratch.join("mnt");
    // Read back through the kernel as root; without it, through fsck.erofs's extraction.
    let m = if root_for("the kernel mount of the image") {
        fs::create_dir(&mnt).unwrap();
        Some(mount_image(&image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap())
    } else {
        let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::ExtractTo(&mnt));
        assert!(ok, "fsck.erofs --extract failed: {out}");
        None
    };
    for (name, target) in [("zz-dir", "/etc"), ("zz-file", "/etc/shadow")] {
        let meta = fs::symlink_metadata(mnt.join(name)).unwrap();
        assert!(meta.file_type().is_symlink(), "{name} stored as {meta:?}");
        assert_eq!(fs::read_link(mnt.join(name)).unwrap(), Path::new(target));
    }
    // The walk listed the directory before the swap: the renamed originals are not in it,
    // and nothing of /etc came in through the links.
    let mut names: Vec<_> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a-big", "zz-dir", "zz-file"]);
    if let Some(m) = m {
        m.unmount().unwrap();
    }
}

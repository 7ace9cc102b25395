//! Merged images: layers made as containerd's unpacker makes them (whiteouts as character
//! devices 0:0, opaque directories marked `trusted.overlay.opaque=y`) are converted one by
//! one, merged into one image, mounted by the kernel, and compared entry by entry with the
//! kernel's overlayfs over the same layer directories. Without root, the layers (less their
//! opaque marks, device nodes and other owners) are still converted, merged and checked with
//! fsck.erofs.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    build_full_tree, compare_trees_as_overlay, fsck, is_root, lchown, mknod, pattern, root_for,
    set_mtime, Fsck, Scratch,
};
use hyperbox_erofs::{
    commit_layer, mount_image, write_merged_image, ChunkStore, ImageError, ImageOptions, MountMode,
    StoreConfig,
};

fn whiteout(p: &Path) {
    mknod(p, libc::S_IFCHR, 0, 0);
}

/// An opaque directory; without root (no `trusted.*` xattrs), a plain one.
fn opaque(p: &Path) {
    fs::create_dir_all(p).unwrap();
    if is_root() {
        xattr::set(p, "trusted.overlay.opaque", b"y").unwrap();
    }
}

/// The second layer: every way a layer changes the ones below it.
fn build_changes(root: &Path) {
    fs::create_dir_all(root).unwrap();
    whiteout(&root.join("sparse")); // a file deleted
    whiteout(&root.join("deep")); // a whole subtree deleted
    opaque(&root.join("empty-dir")); // an opaque dir over an empty one
    opaque(&root.join("many")); // an opaque dir: all 3000 entries below are hidden
    fs::write(root.join("many/only"), b"the one entry left").unwrap();
    fs::write(root.join("small.txt"), pattern(9, 5000)).unwrap(); // changed, now chunked
    fs::create_dir(root.join("size-2049")).unwrap(); // a file replaced by a dir
    fs::write(root.join("size-2049/inside"), b"x").unwrap();
    fs::write(root.join("dev"), b"a file over a directory").unwrap();
    fs::create_dir(root.join("links")).unwrap(); // a dir over a dir, attributes changed
    fs::set_permissions(root.join("links"), fs::Permissions::from_mode(0o700)).unwrap();
    if is_root() {
        lchown(&root.join("links"), 42, 43);
    }
    xattr::set(root.join("links"), "user.upper", b"from layer 2").unwrap();
    set_mtime(&root.join("links"), 1_600_000_000, 123);
    fs::write(root.join("links/added"), b"added in layer 2").unwrap();
    symlink("hl-small", root.join("links/sym-rel-hardlink")).unwrap(); // replaced
    fs::create_dir(root.join("fresh")).unwrap();
    fs::write(root.join("fresh/hl-a"), pattern(3, 9000)).unwrap();
    fs::hard_link(root.join("fresh/hl-a"), root.join("fresh/hl-b")).unwrap();
    whiteout(&root.join("fresh/never-was")); // a whiteout with nothing below it
    opaque(&root.join("new-opaque")); // opaque, nothing below
}

/// The third layer: changes of the changes.
fn build_top(root: &Path) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("deep"), b"deep is a file now").unwrap(); // re-created after a whiteout
    whiteout(&root.join("many")); // the opaque dir of layer 2 deleted
    fs::create_dir(root.join("size-2049")).unwrap();
    whiteout(&root.join("size-2049/inside"));
    fs::create_dir(root.join("fresh")).unwrap();
    fs::write(root.join("fresh/hl-c"), b"small").unwrap();
    opaque(&root.join("links")); // opaque over a merged dir
    fs::write(root.join("links/only-this"), b"1").unwrap();
}

/// Fills one layer's directory.
type Builder = Box<dyn Fn(&Path)>;

struct Stack {
    _scratch: Scratch,
    dirs: Vec<PathBuf>,
    images: Vec<PathBuf>,
    store: ChunkStore,
    root: PathBuf,
}

fn stack(name: &str, builders: &[&dyn Fn(&Path)]) -> Stack {
    let scratch = Scratch::new(name);
    let root = scratch.path.clone();
    let store = ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap();
    let mut dirs = Vec::new();
    let mut images = Vec::new();
    for (i, build) in builders.iter().enumerate() {
        let dir = scratch.join(&format!("{}", i + 1));
        build(&dir);
        let image = scratch.join(&format!("{}.erofs", i + 1));
        commit_layer(
            &store,
            &format!("l{i}"),
            &dir,
            &image,
            &ImageOptions::default(),
        )
        .unwrap();
        dirs.push(dir);
        images.push(image);
    }
    Stack {
        _scratch: scratch,
        dirs,
        images,
        store,
        root,
    }
}

/// A read-only overlayfs of `lowers` (the bottom first, all in one directory, named
/// relative to it so that many fit in the mount option's page) at `target`.
fn mount_overlay(lowers: &[PathBuf], target: &Path) {
    fs::create_dir_all(target).unwrap();
    let joined: Vec<String> = lowers
        .iter()
        .rev()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let st = Command::new("mount")
        .current_dir(lowers[0].parent().unwrap())
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={}", joined.join(":")))
        .arg(target)
        .status()
        .unwrap();
    assert!(st.success(), "mount overlay");
}

fn merge(s: &Stack, inputs: &[&Path], name: &str) -> PathBuf {
    let out = s.root.join(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&out)
        .unwrap();
    let stats = write_merged_image(inputs, &file, &out, &ImageOptions::default()).unwrap();
    eprintln!("{name}: {stats:?}");
    out
}

#[test]
fn merged_image_equals_overlayfs_of_its_layers() {
    let privileged =
        root_for("the layers' opaque marks and other owners, and the kernel and overlayfs mounts");
    let s = stack("merge3", &[&build_full_tree, &build_changes, &build_top]);
    let reference = s.root.join("overlay");
    if privileged {
        mount_overlay(&s.dirs, &reference);
    }

    let images: Vec<&Path> = s.images.iter().map(PathBuf::as_path).collect();
    let merged = merge(&s, &images, "merged.erofs");
    let (ok, out) = fsck(&merged, &s.store.pack_paths(), Fsck::Data);
    assert!(ok, "fsck.erofs of the merged image: {out}");
    if !privileged {
        // Built in steps too, and nothing stored by merging; the trees are compared as root.
        let lower2 = merge(&s, &images[..2], "lower2.erofs");
        let stepped = merge(&s, &[&lower2, images[2]], "stepped.erofs");
        let (ok, out) = fsck(&stepped, &s.store.pack_paths(), Fsck::Data);
        assert!(ok, "fsck.erofs of the stepped image: {out}");
        assert_eq!(s.store.layers().unwrap().len(), 3);
        return;
    }
    let mnt = s.root.join("merged");
    fs::create_dir(&mnt).unwrap();
    let _m = mount_image(&merged, &s.store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    let n = compare_trees_as_overlay(&reference, &mnt);
    assert!(n > 50, "compared {n} entries");
    assert!(!mnt.join("fresh/never-was").exists());
    assert_eq!(fs::read(mnt.join("many/only")).ok(), None);
    assert_eq!(fs::read_dir(mnt.join("links")).unwrap().count(), 1);
    assert_eq!(
        xattr::get(mnt.join("new-opaque"), "trusted.overlay.opaque").unwrap(),
        None,
        "the opaque mark is consumed by the merge"
    );

    // Built in steps (the parent's merged image and one layer) it is the same tree.
    let lower2 = merge(&s, &images[..2], "lower2.erofs");
    let stepped = merge(&s, &[&lower2, images[2]], "stepped.erofs");
    let mnt2 = s.root.join("stepped");
    fs::create_dir(&mnt2).unwrap();
    let _m2 = mount_image(
        &stepped,
        &s.store.pack_paths(),
        &mnt2,
        MountMode::FileBacked,
    )
    .unwrap();
    assert_eq!(compare_trees_as_overlay(&reference, &mnt2), n);
    // Metadata only: no chunk was stored by merging.
    assert_eq!(s.store.layers().unwrap().len(), 3);
}

#[test]
fn a_hundred_and_twenty_layers_merge_into_one_image() {
    let privileged = root_for("the layers' opaque marks, and the kernel and overlayfs mounts");
    // Each layer adds a file, changes a shared one, deletes the previous layer's, and
    // replaces a directory's content through an opaque dir every tenth layer.
    let builders: Vec<Builder> = (0..120)
        .map(|i: usize| {
            Box::new(move |root: &Path| {
                fs::create_dir_all(root.join("shared")).unwrap();
                fs::write(
                    root.join(format!("shared/own-{i:03}")),
                    pattern(i as u64, 3000 + i),
                )
                .unwrap();
                fs::write(root.join("shared/changed"), format!("layer {i}")).unwrap();
                if i > 0 {
                    whiteout(&root.join(format!("shared/own-{:03}", i - 1)));
                }
                if i % 10 == 0 {
                    opaque(&root.join("box"));
                }
                fs::create_dir_all(root.join("box")).unwrap();
                fs::write(root.join(format!("box/{i}")), b"in the box").unwrap();
            }) as Builder
        })
        .collect();
    let refs: Vec<&dyn Fn(&Path)> = builders.iter().map(|b| b.as_ref()).collect();
    let s = stack("m120", &refs);
    let images: Vec<&Path> = s.images.iter().map(PathBuf::as_path).collect();
    let t = std::time::Instant::now();
    let merged = merge(&s, &images, "merged.erofs");
    eprintln!("120 layers merged in {:?}", t.elapsed());
    if !privileged {
        let (ok, out) = fsck(&merged, &s.store.pack_paths(), Fsck::Data);
        assert!(ok, "fsck.erofs of the merged image: {out}");
        return;
    }
    let mnt = s.root.join("merged");
    fs::create_dir(&mnt).unwrap();
    let _m = mount_image(&merged, &s.store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    // overlayfs takes at most 500 lower dirs; these short paths fit in one mount option.
    let reference = s.root.join("overlay");
    mount_overlay(&s.dirs, &reference);
    compare_trees_as_overlay(&reference, &mnt);
    let own: Vec<_> = fs::read_dir(mnt.join("shared"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(own.len(), 2, "{own:?}");
    assert_eq!(fs::read(mnt.join("shared/changed")).unwrap(), b"layer 119");
    assert_eq!(fs::read_dir(mnt.join("box")).unwrap().count(), 10);
}

#[test]
fn damaged_or_foreign_images_are_refused_with_a_reason() {
    root_for("the layer's opaque marks and other owners");
    let s = stack("mbad", &[&build_changes]);
    let good = &s.images[0];
    let out = s.root.join("out.erofs");
    let file = fs::File::create(&out).unwrap();
    let opts = ImageOptions::default();

    let not_erofs = s.root.join("not-erofs");
    fs::write(&not_erofs, vec![7u8; 8192]).unwrap();
    let err = write_merged_image(&[&not_erofs], &file, &out, &opts).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");

    // Every byte of the metadata flipped in turn, past block 0: an error or a tree, never a
    // panic or a hang.
    let bytes = fs::read(good).unwrap();
    for off in (4096..bytes.len()).step_by(7) {
        let mut spoiled = bytes.clone();
        spoiled[off] ^= 0xff;
        let p = s.root.join("spoiled.erofs");
        fs::write(&p, &spoiled).unwrap();
        let _ = write_merged_image(&[&p], &file, &out, &opts);
    }
    let truncated = s.root.join("truncated.erofs");
    // Cut inside the root inode.
    fs::write(&truncated, &bytes[..4100]).unwrap();
    let err = write_merged_image(&[&truncated], &file, &out, &opts).unwrap_err();
    assert!(
        matches!(err, ImageError::Corrupt { .. }),
        "a truncated image: {err}"
    );

    // Too many inodes for the limit.
    let err = write_merged_image(
        &[good.as_path()],
        &file,
        &out,
        &ImageOptions::default().with_max_inodes(3),
    )
    .unwrap_err();
    assert!(matches!(err, ImageError::OverLimit { .. }), "{err}");
}

//! Images written straight from a layer archive ([`write_image_from_tar`]) against images of
//! the same layer unpacked on disk: the tree with every kind of entry, archived by GNU tar in
//! PAX format (xattrs, nanosecond times, hard links, long names and targets, devices), and
//! archives in the OCI layer form (`.wh.` whiteouts, `.wh..wh..opq`, names given twice). Both
//! kernel-mounted and compared entry by entry; then what the archive path refuses.

mod common;

use std::fs::{self, File};
use std::io::Cursor;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{build_full_tree, compare_trees, fsck, mknod, root_for, Fsck, Scratch};
use hyperbox_erofs::{
    commit_layer_from_tar, mount_image, write_image_from_tar, ChunkStore, ImageError, ImageOptions,
    MountMode, StoreConfig,
};

fn store(scratch: &Scratch) -> ChunkStore {
    ChunkStore::open(&scratch.join("store"), StoreConfig::default()).unwrap()
}

/// Commits `archive` as layer `name` and checks its image with fsck.erofs; returns the store
/// and the image.
fn image_of(scratch: &Scratch, archive: &[u8], name: &str) -> (ChunkStore, PathBuf) {
    let store = store(scratch);
    let image = scratch.join(&format!("{name}.erofs"));
    let report = commit_layer_from_tar(
        &store,
        name,
        &mut Cursor::new(archive),
        Path::new(name),
        &image,
        &ImageOptions::default(),
    )
    .unwrap();
    eprintln!("{name}: {report:?}");
    let (ok, out) = fsck(&image, &store.pack_paths(), Fsck::Data);
    assert!(ok, "fsck.erofs failed: {out}");
    (store, image)
}

/// Mounts `image` and compares it with `expected`; returns entries compared.
fn image_matches(
    scratch: &Scratch,
    store: &ChunkStore,
    image: &Path,
    expected: &Path,
    name: &str,
) -> usize {
    let mnt = scratch.join(&format!("{name}-mnt"));
    fs::create_dir(&mnt).unwrap();
    let mounted = mount_image(image, &store.pack_paths(), &mnt, MountMode::FileBacked).unwrap();
    let n = compare_trees(expected, &mnt);
    mounted.unmount().unwrap();
    n
}

#[test]
fn full_tree_archived_by_gnu_tar_matches_the_tree() {
    let scratch = Scratch::new("from-tar-full");
    let src = scratch.join("src");
    build_full_tree(&src);
    // Archives cannot carry sockets (tar leaves them out, as containerd's differ would find).
    fs::remove_file(src.join("dev/sock")).unwrap();
    let out = Command::new("tar")
        .args([
            "--format=posix",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-cf",
            "-",
            "-C",
        ])
        .arg(&src)
        .arg(".")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What containerd's applier leaves: no `trusted.*` xattr is taken from an archive
    // (the opaque mark comes from `.wh..wh..opq` entries only).
    drop_trusted_xattrs(&src);
    let (store, image) = image_of(&scratch, &out.stdout, "full");
    if !root_for("the kernel mount of the image") {
        return;
    }
    let n = image_matches(&scratch, &store, &image, &src, "full");
    assert!(n > 750, "compared {n} entries");
}

/// Removes every `trusted.*` xattr in the tree at `root` (links not followed: the `xattr`
/// crate's calls are the `l*xattr` ones).
fn drop_trusted_xattrs(root: &Path) {
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        for name in xattr::list(&p).unwrap() {
            if name.to_string_lossy().starts_with("trusted.") {
                xattr::remove(&p, &name).unwrap();
            }
        }
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                todo.push(e.unwrap().path());
            }
        }
    }
}

/// Appends an entry to an archive in the making.
fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, mode: u32, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_link(b: &mut tar::Builder<Vec<u8>>, path: &str, kind: tar::EntryType, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o777);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    b.append_link(&mut h, path, target).unwrap();
}

#[test]
fn oci_whiteouts_and_replaced_names_match_containerds_unpacked_form() {
    use tar::EntryType::*;
    let scratch = Scratch::new("from-tar-oci");
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, "./", Directory, 0o755, b"");
    add(&mut b, "etc/", Directory, 0o755, b"");
    add(&mut b, "etc/.wh.gone", Regular, 0o644, b"");
    add(&mut b, "etc/.wh..wh..opq", Regular, 0o644, b"");
    add(&mut b, "etc/config", Regular, 0o600, b"first");
    // Given again: the later entry wins.
    add(&mut b, "etc/config", Regular, 0o640, b"second and longer");
    add(&mut b, "etc/was-file", Regular, 0o644, b"a file first");
    add(&mut b, "etc/was-file", Directory, 0o711, b"");
    add(
        &mut b,
        "etc/was-file/inside",
        Regular,
        0o644,
        &vec![7u8; 100_000],
    );
    add(&mut b, "etc/was-dir", Directory, 0o755, b"");
    add(
        &mut b,
        "etc/was-dir/dropped",
        Regular,
        0o644,
        b"dropped with its dir",
    );
    add_link(&mut b, "etc/was-dir", Symlink, "config");
    add(&mut b, "etc/again", Directory, 0o700, b"");
    add(&mut b, "etc/again/kept", Regular, 0o644, b"kept");
    // A directory over a directory: new attributes, same contents.
    add(&mut b, "etc/again", Directory, 0o750, b"");
    add(&mut b, "zeros", Regular, 0o644, &vec![0u8; 300_000]);
    // xattrs: `trusted.*` never taken from an archive, `user.*` only on files and dirs.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(Regular);
    h.set_mode(0o644);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(2);
    b.append_pax_extensions([
        ("SCHILY.xattr.trusted.overlay.redirect", &b"/etc"[..]),
        ("SCHILY.xattr.user.kept", &b"line\nbreak"[..]),
        ("SCHILY.xattr.security.capability", &common::CAPABILITY[..]),
    ])
    .unwrap();
    b.append_data(&mut h, "xattrs", &b"xa"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(Symlink);
    h.set_mode(0o777);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    h.set_size(0);
    b.append_pax_extensions([("SCHILY.xattr.user.dropped", &b"x"[..])])
        .unwrap();
    b.append_link(&mut h, "xattr-link", "xattrs").unwrap();
    add_link(&mut b, "etc/config-link", Link, "etc/config");
    add_link(&mut b, "./etc/config-link2", Link, "./etc/config");
    let archive = b.into_inner().unwrap();
    let (store, image) = image_of(&scratch, &archive, "oci");
    if !root_for("the unpacked tree to compare with (owners, trusted.* and security.* xattrs) and the kernel mount of the image") {
        return;
    }

    // What containerd's overlayfs applier leaves on disk for it.
    let want = scratch.join("want");
    fs::create_dir(&want).unwrap();
    let etc = want.join("etc");
    fs::create_dir(&etc).unwrap();
    mknod(&etc.join("gone"), libc::S_IFCHR, 0, 0);
    xattr::set(&etc, "trusted.overlay.opaque", b"y").unwrap();
    fs::write(etc.join("config"), b"second and longer").unwrap();
    fs::set_permissions(etc.join("config"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::create_dir(etc.join("was-file")).unwrap();
    fs::set_permissions(etc.join("was-file"), fs::Permissions::from_mode(0o711)).unwrap();
    fs::write(etc.join("was-file/inside"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("config", etc.join("was-dir")).unwrap();
    fs::create_dir(etc.join("again")).unwrap();
    fs::write(etc.join("again/kept"), b"kept").unwrap();
    fs::set_permissions(etc.join("again"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(want.join("zeros"), vec![0u8; 300_000]).unwrap();
    fs::write(want.join("xattrs"), b"xa").unwrap();
    xattr::set(want.join("xattrs"), "user.kept", b"line\nbreak").unwrap();
    std::os::unix::fs::symlink("xattrs", want.join("xattr-link")).unwrap();
    fs::hard_link(etc.join("config"), etc.join("config-link")).unwrap();
    fs::hard_link(etc.join("config"), etc.join("config-link2")).unwrap();
    // Owners and times as the archive gives them, deepest first.
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "find . -depth -exec chown -h 1000:1000 {} + && \
             find . -depth -exec touch -h -d @1700000000 {} +",
        )
        .current_dir(&want)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::set_permissions(&want, fs::Permissions::from_mode(0o755)).unwrap();
    // After the chown, which drops file capabilities.
    xattr::set(
        want.join("xattrs"),
        "security.capability",
        &common::CAPABILITY,
    )
    .unwrap();
    let n = image_matches(&scratch, &store, &image, &want, "oci");
    assert!(n >= 12, "compared {n} entries");
}

fn refusal(archive: &[u8]) -> ImageError {
    let scratch = Scratch::new("from-tar-refused");
    let store = store(&scratch);
    let image = scratch.join("refused.erofs");
    let out = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let mut w = store.begin_layer("refused").unwrap();
    write_image_from_tar(
        &mut Cursor::new(archive),
        Path::new("refused.tar"),
        &out,
        &image,
        &mut w,
        &ImageOptions::default().with_max_inodes(50),
    )
    .expect_err("refused")
}

/// Writes a case's entries.
type Build = Box<dyn Fn(&mut tar::Builder<Vec<u8>>)>;

#[test]
fn what_the_archive_path_refuses() {
    use tar::EntryType::*;
    let cases: Vec<(&str, Build, &str)> = vec![
        (
            "dot-dot",
            Box::new(|b| {
                // The tar crate refuses to write `..` itself: the header is set by hand.
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(Regular);
                h.set_mode(0o644);
                h.set_size(1);
                h.as_gnu_mut().unwrap().name[..11].copy_from_slice(b"a/../../etc");
                h.set_cksum();
                b.append(&h, &b"x"[..]).unwrap();
            }),
            "`..`",
        ),
        (
            "no-parent",
            Box::new(|b| add(b, "missing/file", Regular, 0o644, b"x")),
            "parent directory is not in the archive",
        ),
        (
            "parent-is-file",
            Box::new(|b| {
                add(b, "f", Regular, 0o644, b"x");
                add(b, "f/g", Regular, 0o644, b"x");
            }),
            "parent directory is not in the archive",
        ),
        (
            "link-to-nothing",
            Box::new(|b| add_link(b, "l", Link, "nowhere")),
            "not an earlier file",
        ),
        (
            "link-to-dir",
            Box::new(|b| {
                add(b, "d/", Directory, 0o755, b"");
                add_link(b, "l", Link, "d");
            }),
            "not an earlier file",
        ),
        (
            "truncated",
            // Built below: a header announcing 1 MiB, then 1000 bytes.
            Box::new(|_| {}),
            "ends early",
        ),
        (
            "inodes",
            Box::new(|b| {
                for i in 0..60 {
                    add(b, &format!("f{i}"), Regular, 0o644, b"x");
                }
            }),
            "inodes",
        ),
    ];
    for (name, build, want) in cases {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let mut archive = b.into_inner().unwrap();
        if name == "truncated" {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(Regular);
            h.set_mode(0o644);
            h.set_size(1 << 20);
            h.set_path("big").unwrap();
            h.set_cksum();
            archive = h.as_bytes().to_vec();
            archive.extend_from_slice(&[1u8; 1000]);
        }
        let e = refusal(&archive);
        let text = e.to_string();
        eprintln!("{name}: {text}");
        assert!(text.contains(want), "{name}: {text}");
    }
    // Garbage: every byte flipped in turn in a small archive never panics.
    let mut b = tar::Builder::new(Vec::new());
    add(&mut b, "d/", Directory, 0o755, b"");
    add(&mut b, "d/f", Regular, 0o644, &vec![3u8; 5000]);
    add_link(&mut b, "d/s", Symlink, "f");
    let good = b.into_inner().unwrap();
    let scratch = Scratch::new("from-tar-flip");
    let store = store(&scratch);
    let image = scratch.join("flip.erofs");
    let out = File::create(&image).unwrap();
    // Only the headers: the data is taken as it is.
    let headers = [0..512, 512..1024, 6144..6656];
    for i in headers.into_iter().flatten().filter(|i| i % 3 == 0) {
        let mut bad = good.clone();
        bad[i] ^= 0x5a;
        let mut w = store.begin_layer("flip").unwrap();
        let _ = write_image_from_tar(
            &mut Cursor::new(&bad),
            Path::new("flip.tar"),
            &out,
            &image,
            &mut w,
            &ImageOptions::default(),
        );
    }
}

//! The offline test images: reproducible builds, the layer writer, the cache.
//!
//! Needs root (debootstrap, device nodes, `security.capability`), `busybox-static`,
//! `debootstrap` and a Debian mirror in the machine's apt sources (the `.deb` files are
//! downloaded once into `HYPERBOX_CACHE`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use hyperbox_integration::images::layer::{self, LayerEntry};
use hyperbox_integration::images::{self, BuildOptions, BuiltImage, TestImage};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "hyperbox-images-{tag}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// One entry of a layer as read back: type, mode, owner, mtime, link target, contents, PAX
/// records.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ReadEntry {
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    link: Option<String>,
    data: Vec<u8>,
    pax: BTreeMap<String, Vec<u8>>,
    device: Option<(u32, u32)>,
}

fn read_tar(bytes: &[u8]) -> BTreeMap<String, ReadEntry> {
    let mut ar = tar::Archive::new(bytes);
    let mut out = BTreeMap::new();
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let mut pax = BTreeMap::new();
        if let Some(exts) = e.pax_extensions().expect("pax") {
            for ext in exts {
                let ext = ext.expect("pax record");
                pax.insert(
                    ext.key().expect("utf-8 key").to_owned(),
                    ext.value_bytes().to_vec(),
                );
            }
        }
        let h = e.header().clone();
        let path = e.path().expect("path").to_string_lossy().into_owned();
        let link = e
            .link_name()
            .expect("link name")
            .map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("entry data");
        let device = match h.entry_type() {
            tar::EntryType::Char | tar::EntryType::Block => Some((
                h.device_major().expect("major").expect("has major"),
                h.device_minor().expect("minor").expect("has minor"),
            )),
            _ => None,
        };
        let prev = out.insert(
            path.clone(),
            ReadEntry {
                kind: h.entry_type(),
                mode: h.mode().expect("mode"),
                uid: h.uid().expect("uid"),
                gid: h.gid().expect("gid"),
                mtime: h.mtime().expect("mtime"),
                link,
                data,
                pax,
                device,
            },
        );
        assert!(prev.is_none(), "{path} appears twice in the layer");
    }
    out
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(fs::File::open(path).expect("open blob"))
        .read_to_end(&mut out)
        .expect("gunzip blob");
    out
}

fn layer_tar(image: &BuiltImage, index: usize) -> BTreeMap<String, ReadEntry> {
    read_tar(&gunzip(&image.blob_path(&image.layer_digests[index])))
}

fn scratch(out: &Path) -> BuildOptions {
    BuildOptions::default()
        .with_no_cache(true)
        .with_out_dir(out)
}

/// Every blob of `a`'s layout is in `b`'s with the same bytes, and the archives are equal.
fn assert_same_bytes(a: &BuiltImage, b: &BuiltImage) {
    assert_eq!(
        a.manifest_digest, b.manifest_digest,
        "{}: manifests differ",
        a.name
    );
    assert_eq!(a.layer_digests, b.layer_digests);
    assert_eq!(a.diff_ids, b.diff_ids);
    for digest in a
        .layer_digests
        .iter()
        .chain([&a.config_digest, &a.manifest_digest])
    {
        let x = fs::read(a.blob_path(digest)).expect("blob of a");
        let y = fs::read(b.blob_path(digest)).expect("blob of b");
        assert!(x == y, "{}: blob {digest} differs", a.name);
        assert_eq!(
            images::oci::sha256_digest(&x),
            *digest,
            "blob named by its digest"
        );
    }
    assert!(
        fs::read(&a.archive).expect("archive a") == fs::read(&b.archive).expect("archive b"),
        "{}: oci-archive tars differ",
        a.name
    );
}

fn assert_layout(image: &BuiltImage) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(image.layout_dir.join("index.json")).expect("index"))
            .expect("index json");
    let m = &index["manifests"][0];
    assert_eq!(m["digest"], image.manifest_digest.as_str());
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        images::LAYOUT_REF
    );
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        image.reference.as_str()
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(image.blob_path(&image.manifest_digest)).expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(manifest["schemaVersion"], 2);
    assert_eq!(manifest["mediaType"], images::oci::MEDIA_TYPE_MANIFEST);
    assert_eq!(
        manifest["config"]["mediaType"],
        images::oci::MEDIA_TYPE_CONFIG
    );
    for layer in manifest["layers"].as_array().expect("layers") {
        assert_eq!(layer["mediaType"], images::oci::MEDIA_TYPE_LAYER_GZIP);
    }
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(image.blob_path(&image.config_digest)).expect("config"))
            .expect("config json");
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    let cmd: Vec<&str> = image.image.cmd().to_vec();
    assert_eq!(config["config"]["Cmd"], serde_json::json!(cmd));
    assert!(config["config"]["Env"][0]
        .as_str()
        .is_some_and(|e| e.starts_with("PATH=")));
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!(image.diff_ids)
    );
    // The archive holds the layout.
    let archive = read_tar(&fs::read(&image.archive).expect("archive"));
    assert!(archive.contains_key("oci-layout") && archive.contains_key("index.json"));
    let hex = image.manifest_digest.trim_start_matches("sha256:");
    assert!(archive.contains_key(&format!("blobs/sha256/{hex}")));
}

#[test]
fn busybox_builds_reproducibly_with_the_expected_contents() {
    let (a, b) = (TempDir::new("bb-a"), TempDir::new("bb-b"));
    let first = images::build(TestImage::Busybox, &scratch(a.path())).expect("first build");
    let second = images::build(TestImage::Busybox, &scratch(b.path())).expect("second build");
    assert!(!first.from_cache && !second.from_cache);
    assert_ne!(first.layout_dir, second.layout_dir);
    assert_same_bytes(&first, &second);
    assert_layout(&first);

    let entries = layer_tar(&first, 0);
    let busybox = &entries["bin/busybox"];
    assert_eq!(busybox.kind, tar::EntryType::Regular);
    assert_eq!(busybox.mode, 0o755);
    assert!(busybox.data.starts_with(b"\x7fELF"));
    let sh = &entries["bin/sh"];
    assert_eq!(sh.kind, tar::EntryType::Symlink);
    assert_eq!(sh.link.as_deref(), Some("busybox"));
    assert!(entries.contains_key("bin/ls") && entries.contains_key("bin/id"));
    let passwd = String::from_utf8_lossy(&entries["etc/passwd"].data).into_owned();
    assert!(
        passwd.lines().any(|l| l.starts_with("hbuser:x:1000:1000:")),
        "{passwd}"
    );
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nobody:x:65534:65534:")),
        "{passwd}"
    );
    let group = String::from_utf8_lossy(&entries["etc/group"].data).into_owned();
    assert!(
        group.lines().any(|l| l.starts_with("hbuser:x:1000:")),
        "{group}"
    );
    assert_eq!(entries["tmp"].kind, tar::EntryType::Directory);
    assert_eq!(entries["tmp"].mode, 0o1777);
    assert_eq!(
        (entries["home/hbuser"].uid, entries["home/hbuser"].gid),
        (1000, 1000)
    );
    for dir in ["proc", "sys", "dev", "etc", "root"] {
        assert_eq!(entries[dir].kind, tar::EntryType::Directory, "{dir}");
    }
    let epoch = BuildOptions::default().source_date_epoch;
    assert!(entries.values().all(|e| e.mtime <= epoch && e.uid == e.gid));
}

#[test]
fn a_cached_image_is_found_again() {
    let cache = TempDir::new("cache");
    let opts = BuildOptions::default().with_cache_root(cache.path());
    let built = images::build(TestImage::Busybox, &opts).expect("build");
    assert!(!built.from_cache);
    assert!(built
        .layout_dir
        .starts_with(cache.path().join("images/busybox")));
    let again = images::build(TestImage::Busybox, &opts).expect("cached build");
    assert!(again.from_cache);
    assert_eq!(
        again,
        BuiltImage {
            from_cache: true,
            ..built.clone()
        }
    );

    // Exported copies of a cached image are the same image.
    let out = TempDir::new("export");
    let exported =
        images::build(TestImage::Busybox, &opts.clone().with_out_dir(out.path())).expect("export");
    assert!(exported.from_cache);
    assert_eq!(exported.layout_dir, out.path().join("busybox/oci"));
    assert_same_bytes(&built, &exported);
}

#[test]
fn debian_images_build_reproducibly_and_share_the_base_layer() {
    let (a, b) = (TempDir::new("deb-a"), TempDir::new("deb-b"));
    let wanted = [TestImage::Debian, TestImage::DebianPython];
    // Side by side: two independent builds, sharing only the .deb download cache.
    let (first, second) = std::thread::scope(|s| {
        let one = s.spawn(|| images::build_all(&wanted, &scratch(a.path())));
        let two = s.spawn(|| images::build_all(&wanted, &scratch(b.path())));
        (
            one.join()
                .expect("first build thread")
                .expect("first build"),
            two.join()
                .expect("second build thread")
                .expect("second build"),
        )
    });
    for (x, y) in first.iter().zip(&second) {
        assert!(!x.from_cache && !y.from_cache);
        assert_same_bytes(x, y);
        assert_layout(x);
    }
    let (debian, python) = (&first[0], &first[1]);
    assert_eq!(debian.layer_digests.len(), 1);
    assert_eq!(python.layer_digests.len(), 2);
    assert_eq!(
        python.layer_digests[0], debian.layer_digests[0],
        "shared base layer"
    );
    assert_eq!(python.diff_ids[0], debian.diff_ids[0]);

    let base = layer_tar(debian, 0);
    assert!(base.contains_key("usr/bin/bash"));
    assert!(base.contains_key("etc/debian_version"));
    assert!(!base.contains_key("usr/bin/python3"));
    // Normalized away: host files, package lists, logs' contents, leftovers.
    for gone in [
        "etc/hostname",
        "etc/resolv.conf",
        "var/cache/ldconfig/aux-cache",
        "var/lib/dpkg/status-old",
        "debootstrap",
    ] {
        assert!(!base.contains_key(gone), "{gone} left in the debian layer");
    }
    assert!(!base
        .keys()
        .any(|k| k.starts_with("var/lib/apt/lists/") && base[k].kind == tar::EntryType::Regular));
    assert!(!base
        .keys()
        .any(|k| k.starts_with("var/cache/apt/archives/") && k.ends_with(".deb")));
    assert!(base
        .iter()
        .filter(|(k, _)| k.starts_with("var/log/"))
        .all(|(_, e)| e.data.is_empty()));
    assert!(base["etc/apt/sources.list"].data.is_empty());

    let top = layer_tar(python, 1);
    assert!(
        top.keys().any(|k| k.starts_with("usr/bin/python3")),
        "no usr/bin/python3* in the python layer"
    );
    assert!(top.contains_key("var/lib/dpkg/status"));
    assert!(
        !top.contains_key("usr/bin/bash"),
        "unchanged files belong to the base layer"
    );
    assert!(!top.keys().any(|k| k.contains("__pycache__")));
    assert!(
        top.len() < base.len(),
        "the python layer is a difference, not a tree"
    );
}

/// A valid `security.capability` value (VFS_CAP_REVISION_2, effective, CAP_NET_RAW permitted).
fn net_raw_capability() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

#[test]
fn tar_writer_keeps_links_special_files_modes_and_xattrs() {
    let dir = TempDir::new("tree");
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("sub")).expect("mkdir");
    fs::write(root.join("sub/file"), b"hello").expect("write");
    fs::hard_link(root.join("sub/file"), root.join("sub/link")).expect("hard link");
    std::os::unix::fs::symlink("sub/file", root.join("symlink")).expect("symlink");
    nix::unistd::mkfifo(&root.join("fifo"), Mode::from_bits_truncate(0o640)).expect("mkfifo");
    mknod(
        &root.join("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o666),
        makedev(1, 3),
    )
    .expect("mknod");
    fs::write(root.join("setuid"), b"#!/bin/sh\n").expect("write");
    fs::set_permissions(
        root.join("setuid"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .expect("chmod");
    fs::write(root.join("ping"), b"binary").expect("write");
    xattr::set(
        root.join("ping"),
        "security.capability",
        &net_raw_capability(),
    )
    .expect("setcap (needs root)");
    nix::unistd::chown(
        &root.join("sub/file"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1001)),
    )
    .expect("chown");
    let long_dir = root.join("d".repeat(90));
    fs::create_dir(&long_dir).expect("mkdir long");
    let long_name = format!("{}-file", "f".repeat(60));
    fs::write(long_dir.join(&long_name), b"long").expect("write long");
    std::os::unix::fs::symlink("t".repeat(150), root.join("long-target")).expect("symlink");

    let epoch = 1_000_000;
    let mut entries = layer::scan_tree(&root).expect("scan");
    let bytes = layer::write_tar(&mut entries.clone(), epoch, Vec::new()).expect("tar");
    let again = layer::write_tar(&mut entries, epoch, Vec::new()).expect("tar again");
    assert!(bytes == again, "same entries, same bytes");

    let got = read_tar(&bytes);
    let names: Vec<&str> = got.keys().map(String::as_str).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);

    let file = &got["sub/file"];
    assert_eq!(file.kind, tar::EntryType::Regular);
    assert_eq!(file.data, b"hello");
    assert_eq!((file.uid, file.gid), (1000, 1001));
    let link = &got["sub/link"];
    assert_eq!(link.kind, tar::EntryType::Link);
    assert_eq!(link.link.as_deref(), Some("sub/file"));
    assert!(link.data.is_empty());
    let sym = &got["symlink"];
    assert_eq!(sym.kind, tar::EntryType::Symlink);
    assert_eq!(sym.link.as_deref(), Some("sub/file"));
    assert_eq!(got["fifo"].kind, tar::EntryType::Fifo);
    assert_eq!(got["fifo"].mode, 0o640);
    assert_eq!(got["null"].kind, tar::EntryType::Char);
    assert_eq!(got["null"].device, Some((1, 3)));
    assert_eq!(got["setuid"].mode, 0o4755);
    assert_eq!(
        got["ping"].pax.get("SCHILY.xattr.security.capability"),
        Some(&net_raw_capability())
    );
    assert_eq!(
        got[&format!("{}/{long_name}", "d".repeat(90))].data,
        b"long"
    );
    assert_eq!(
        got["long-target"].link.as_deref(),
        Some("t".repeat(150).as_str())
    );
    assert!(got.values().all(|e| e.mtime <= epoch), "times clamped");

    // Unpacked by the tar crate, the tree is the same again.
    let copy = dir.path().join("copy");
    let mut ar = tar::Archive::new(bytes.as_slice());
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_unpack_xattrs(true);
    ar.unpack(&copy).expect("unpack");
    assert_eq!(
        xattr::get(copy.join("ping"), "security.capability").expect("getxattr"),
        Some(net_raw_capability())
    );
    let (f, l) = (
        fs::metadata(copy.join("sub/file")).expect("stat"),
        fs::metadata(copy.join("sub/link")).expect("stat"),
    );
    assert_eq!(f.ino(), l.ino(), "hard link restored");
    assert_eq!(f.uid(), 1000);
}

#[test]
fn whiteouts_name_deleted_paths() {
    let w = LayerEntry::whiteout(Path::new("usr/share/doc/x"));
    assert_eq!(w.path, Path::new("usr/share/doc/.wh.x"));
    assert_eq!(
        LayerEntry::whiteout(Path::new("top")).path,
        Path::new(".wh.top")
    );
}

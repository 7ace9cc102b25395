//! The snapshotter's methods end to end on a temporary root: the snapshot lifecycle and its
//! errors, conversion to EROFS and restarts (needs root), and the differ's unpack (its
//! refusals run without root; the unpack itself mounts, so needs root).

use containerd_snapshots::Kind;

use super::labels::labels_of;
use super::*;
use crate::conversion;

fn temp_root(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hb-snap-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

fn labels() -> HashMap<String, String> {
    HashMap::new()
}

#[test]
fn lifecycle_and_errors() {
    let root = temp_root("life");
    let plain = LayerOptions {
        convert: false,
        ..Default::default()
    };
    let s = HyperboxSnapshotter::open(&root, plain).unwrap();
    let i = &s.inner;
    let m = i
        .create(SnapshotKind::Active, "a".into(), "".into(), labels())
        .unwrap();
    assert_eq!(m[0].r#type, "bind");
    let upper = PathBuf::from(&m[0].source);
    fs::write(upper.join("file"), b"layer one").unwrap();
    assert!(matches!(
        i.create(SnapshotKind::Active, "a".into(), "".into(), labels()),
        Err(SnapshotterError::AlreadyExists(_))
    ));
    assert!(matches!(
        i.create(SnapshotKind::Active, "b".into(), "a".into(), labels()),
        Err(SnapshotterError::ParentNotCommitted(_))
    ));
    assert!(matches!(
        i.create(SnapshotKind::Active, "b".into(), "nope".into(), labels()),
        Err(SnapshotterError::ParentNotFound(_))
    ));
    i.commit("L1".into(), "a".into(), labels()).unwrap();
    assert!(matches!(i.stat("a"), Err(SnapshotterError::NotFound(_))));
    assert_eq!(i.stat("L1").unwrap().kind, Kind::Committed);
    assert!(matches!(
        i.mounts("L1"),
        Err(SnapshotterError::NotMountable(_))
    ));

    let m = i
        .create(SnapshotKind::Active, "b".into(), "L1".into(), labels())
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert!(matches!(
        i.commit("L1".into(), "b".into(), labels()),
        Err(SnapshotterError::AlreadyExists(_))
    ));
    i.create(SnapshotKind::View, "v".into(), "L1".into(), labels())
        .unwrap();
    assert!(matches!(
        i.commit("V".into(), "v".into(), labels()),
        Err(SnapshotterError::NotActive(_))
    ));
    assert!(matches!(
        i.remove("L1"),
        Err(SnapshotterError::HasChildren(_))
    ));
    let listed: Vec<String> = i
        .list(&["kind==active".to_string()])
        .unwrap()
        .into_iter()
        .map(|x| x.name)
        .collect();
    assert_eq!(listed, ["b"]);

    let mut info = i.stat("L1").unwrap();
    info.labels.insert("x".into(), "1".into());
    info.labels.insert("y".into(), "2".into());
    let updated = i.update(info, Some(vec!["labels.x".into()])).unwrap();
    assert_eq!(updated.labels.get("x").map(String::as_str), Some("1"));
    assert!(!updated.labels.contains_key("y"));
    let info = i.stat("L1").unwrap();
    assert!(matches!(
        i.update(info, Some(vec!["parent".into()])),
        Err(SnapshotterError::ImmutableField { .. })
    ));

    let u = i.usage("L1").unwrap();
    assert_eq!(u.inodes, 2);

    // Restart: state survives; an unknown directory is swept.
    drop(s);
    fs::create_dir_all(root.join("snapshots/999/fs")).unwrap();
    fs::create_dir_all(root.join("staging/1-1/fs")).unwrap();
    let s = HyperboxSnapshotter::open(&root, plain).unwrap();
    assert!(!root.join("snapshots/999").exists());
    assert!(!root.join("staging/1-1").exists());
    let i = &s.inner;
    assert_eq!(i.list(&[]).unwrap().len(), 3);
    for k in ["b", "v", "L1"] {
        i.remove(k).unwrap();
    }
    assert_eq!(fs::read_dir(root.join("snapshots")).unwrap().count(), 0);
    drop(s);
    fs::remove_dir_all(&root).unwrap();
}

/// Waits until `key` is served from its EROFS image (the worker converts it).
fn wait_converted(i: &Inner, key: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while i
        .stat(key)
        .unwrap()
        .labels
        .get(STORAGE_LABEL)
        .map(String::as_str)
        != Some("erofs")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{key} never converted"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn committed_layers_become_mounted_erofs_images_and_survive_a_restart() {
    if !nix::unistd::Uid::effective().is_root() {
        hyperbox_testkit::skip("needs root to mount erofs");
        return;
    }
    let root = temp_root("erofs");
    let s = HyperboxSnapshotter::open(&root, LayerOptions::default()).unwrap();
    let i = &s.inner;
    let m = i
        .create(SnapshotKind::Active, "a".into(), "".into(), labels())
        .unwrap();
    let upper = PathBuf::from(&m[0].source);
    let data: Vec<u8> = (0..300_000u32).map(|n| (n * 7 % 251) as u8).collect();
    fs::write(upper.join("file"), &data).unwrap();
    std::os::unix::fs::symlink("file", upper.join("link")).unwrap();
    i.commit("L1".into(), "a".into(), labels()).unwrap();
    // A view made before the switch keeps the plain dir, and its mounts keep naming it.
    i.create(SnapshotKind::View, "old".into(), "L1".into(), labels())
        .unwrap();
    wait_converted(i, "L1");
    let id = i.store.read().unwrap().get("L1").unwrap().unwrap().id;
    let mounted = i.layout.erofs_dir(id);
    assert!(conversion::mounts::mount_points()
        .unwrap()
        .contains(&mounted));
    assert_eq!(fs::read(mounted.join("file")).unwrap(), data);
    assert_eq!(
        fs::read_link(mounted.join("link")).unwrap(),
        Path::new("file")
    );
    assert_eq!(
        i.mounts("old").unwrap()[0].source,
        i.layout.fs_dir(id).to_string_lossy()
    );
    assert!(i.layout.fs_dir(id).exists());
    let m = i
        .create(SnapshotKind::View, "new".into(), "L1".into(), labels())
        .unwrap();
    assert_eq!(m[0].source, mounted.to_string_lossy());
    i.remove("old").unwrap();
    assert!(
        !i.layout.fs_dir(id).exists(),
        "plain dir kept after its last user"
    );
    assert_eq!(i.conversion.chunks().layers().unwrap(), [id.to_string()]);
    let u = i.usage("L1").unwrap();
    assert!(u.size >= 300_000, "{u:?}");

    // Restart after the mount went away (a reboot): the layer is mounted again.
    drop(s);
    nix::mount::umount2(&mounted, nix::mount::MntFlags::empty()).unwrap();
    let s = reopen(&root);
    assert!(conversion::mounts::mount_points()
        .unwrap()
        .contains(&mounted));
    assert_eq!(fs::read(mounted.join("file")).unwrap().len(), 300_000);
    // Restart with the mount still there (a crash): nothing is mounted twice.
    drop(s);
    let s = reopen(&root);
    let i2 = &s.inner;
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mounted.display());
    assert_eq!(text.matches(&needle).count(), 1, "{text}");

    i2.remove("new").unwrap();
    i2.remove("L1").unwrap();
    assert!(!conversion::mounts::mount_points()
        .unwrap()
        .contains(&mounted));
    assert!(i2.conversion.chunks().layers().unwrap().is_empty());
    i2.cleanup().unwrap();
    assert_eq!(i2.conversion.chunks().stats().unwrap().pack_disk_bytes, 0);
    drop(s);
    fs::remove_dir_all(&root).unwrap();
}

/// An archive with a directory and a file, or (with `orphan`) a file whose parent is not
/// in it.
fn layer_archive(orphan: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    if orphan {
        add("missing/file", tar::EntryType::Regular, b"x");
    } else {
        add("etc/", tar::EntryType::Directory, b"");
        add("etc/motd", tar::EntryType::Regular, &[7u8; 100_000]);
    }
    b.into_inner().unwrap()
}

/// The differ's unpack: only into an empty unpack snapshot (`extract-` key) of this
/// snapshotter; a refused or broken archive leaves the snapshot as it was (no image, no
/// chunks, still a directory), and the next try works; Commit then needs no conversion.
#[test]
fn the_differ_unpacks_archives_into_empty_unpack_snapshots_only() {
    let root = temp_root("differ");
    let s = HyperboxSnapshotter::open(&root, LayerOptions::default()).unwrap();
    let i = &s.inner;
    let key = "ns/7/extract-123-abc sha256:aa".to_string();
    let m = i
        .create(SnapshotKind::Active, key.clone(), "".into(), labels())
        .unwrap();
    let fs_dir = PathBuf::from(&m[0].source);
    let id = s.snapshot_of_dir(&fs_dir).expect("our snapshot");
    assert_eq!(i.layout.fs_dir(id), fs_dir);
    for other in [
        fs_dir.join("sub"),
        fs_dir.parent().unwrap().to_path_buf(),
        i.layout.snapshots_dir().join("x").join("fs"),
        PathBuf::from("/var/lib/elsewhere/snapshots/1/fs"),
    ] {
        assert_eq!(s.snapshot_of_dir(&other), None, "{}", other.display());
    }
    let shown = Path::new("layer.tar");
    let untouched = |i: &Inner| {
        let rec = i.store.read().unwrap().get(&key).unwrap().unwrap();
        assert!(!rec.storage.is_erofs());
        assert!(!i.layout.image_path(id).exists());
        assert!(i.conversion.chunks().layers().unwrap().is_empty());
        assert!(!conversion::mounts::mount_points()
            .unwrap()
            .contains(&i.layout.erofs_dir(id)));
    };
    // Refused by the archive path, and cut short: nothing is left.
    let orphan = layer_archive(true);
    let e = s
        .unpack_archive(id, &mut &orphan[..], shown)
        .expect_err("parent not in the archive");
    assert!(e.to_string().contains("parent directory"), "{e}");
    untouched(i);
    let good = layer_archive(false);
    let cut = &good[..good.len() / 2];
    assert!(s.unpack_archive(id, &mut &cut[..], shown).is_err());
    untouched(i);
    // Not an unpack's snapshot, or not empty: refused.
    i.create(
        SnapshotKind::Active,
        "ns/7/container".into(),
        "".into(),
        labels(),
    )
    .unwrap();
    let other = i
        .store
        .read()
        .unwrap()
        .get("ns/7/container")
        .unwrap()
        .unwrap();
    assert!(s.unpack_archive(other.id, &mut &good[..], shown).is_err());
    fs::write(fs_dir.join("written"), b"by someone").unwrap();
    assert!(s.unpack_archive(id, &mut &good[..], shown).is_err());
    fs::remove_file(fs_dir.join("written")).unwrap();
    untouched(i);
    if !nix::unistd::Uid::effective().is_root() {
        hyperbox_testkit::skip("the unpack's kernel mount of the image: needs root");
        drop(s);
        fs::remove_dir_all(&root).unwrap();
        return;
    }

    s.unpack_archive(id, &mut &good[..], shown).unwrap();
    let rec = i.store.read().unwrap().get(&key).unwrap().unwrap();
    assert!(rec.storage.is_erofs());
    assert!(rec.conversion.as_ref().unwrap().from_archive);
    assert!(labels_of(&rec)[CONVERSION_LABEL].starts_with("from the archive by the differ"));
    let mounted = i.layout.erofs_dir(id);
    assert_eq!(fs::read(mounted.join("etc/motd")).unwrap(), [7u8; 100_000]);
    // Twice: refused (no longer a directory).
    assert!(s.unpack_archive(id, &mut &good[..], shown).is_err());
    i.commit("ns/7/L".into(), key.clone(), labels()).unwrap();
    let m = i
        .create(
            SnapshotKind::Active,
            "ns/7/c".into(),
            "ns/7/L".into(),
            labels(),
        )
        .unwrap();
    assert!(
        m[0].options
            .iter()
            .any(|o| o.contains(&*mounted.to_string_lossy())),
        "{m:?}"
    );
    assert!(
        !fs_dir.exists(),
        "the empty plain dir is released at Commit"
    );
    i.remove("ns/7/c").unwrap();
    i.remove("ns/7/container").unwrap();
    i.remove("ns/7/L").unwrap();
    assert!(!conversion::mounts::mount_points()
        .unwrap()
        .contains(&mounted));
    assert!(i.conversion.chunks().layers().unwrap().is_empty());
    drop(s);
    fs::remove_dir_all(&root).unwrap();
}

fn busy(e: &str) -> bool {
    e.contains("already open") || e.contains("in use by another process")
}

/// Opens the snapshotter at `root` again in this process. The background worker may
/// still be finishing a job of the dropped instance (holding the database open for a
/// moment); a restarted snapshotter is a new process and never sees that.
fn reopen(root: &Path) -> HyperboxSnapshotter {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match HyperboxSnapshotter::open(root, LayerOptions::default()) {
            Ok(s) => return s,
            Err(e) if std::time::Instant::now() < deadline && busy(&e.to_string()) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("reopen {}: {e}", root.display()),
        }
    }
}

//! Helpers of the kernel tests: root checks, scratch directories, a tree with every kind of
//! entry, and a full comparison of a mounted image against its source tree.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Whether this process runs as root: may mount, make device nodes, give files to other
/// owners and set `trusted.*` and `security.*` xattrs.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the whole test may run; records it as skipped (`hyperbox_testkit::skip`)
/// otherwise.
pub fn require_root() -> bool {
    if !is_root() {
        hyperbox_testkit::skip("needs root (mount, mknod, chown, trusted.* xattrs)");
        return false;
    }
    true
}

/// True when `part` of a test may run; otherwise records that part as skipped ("`part`:
/// needs root") and the test goes on with what needs no root.
pub fn root_for(part: &str) -> bool {
    if !is_root() {
        hyperbox_testkit::skip(&format!("{part}: needs root"));
        return false;
    }
    true
}

/// A scratch directory under /var/tmp, unmounted and removed on drop.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(name: &str) -> Self {
        let path = PathBuf::from(format!(
            "/var/tmp/hyperbox-erofs-{name}-{}",
            std::process::id()
        ));
        let s = Self { path };
        s.cleanup();
        fs::create_dir_all(&s.path).unwrap();
        s
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }

    fn cleanup(&self) {
        // Unmount anything still mounted below (deepest first).
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let prefix = format!("{}/", self.path.display());
            let mut targets: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|t| t.starts_with(&prefix))
                .collect();
            targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
            for t in targets {
                let c = CString::new(t).unwrap();
                // SAFETY: c is a valid NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) {
    let c = cstr(p);
    // SAFETY: c is a valid path; mknod has no memory preconditions.
    let rc = unsafe { libc::mknod(c.as_ptr(), mode, libc::makedev(major, minor)) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = cstr(p);
    let times = [
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
        libc::timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        },
    ];
    // SAFETY: c and times are valid for the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn write_file(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap();
}

/// The 5 GiB + sparse file's size and the places it has data.
pub const HUGE_SIZE: u64 = (5 << 30) + 12345;
pub const HUGE_DATA: &[(u64, &[u8])] = &[
    (0, b"head of a huge sparse file"),
    ((4 << 30) - 7, b"across the 4 GiB line"),
    (HUGE_SIZE - 4, b"tail"),
];

/// security.capability v2: cap_net_bind_service, effective.
pub const CAPABILITY: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

/// Builds a tree with every kind of entry the snapshotter must keep. Without root, leaves
/// out what needs it (device nodes other than whiteouts, a file of mode 0, other owners,
/// `trusted.*` and `security.*` xattrs) and records that as skipped.
pub fn build_full_tree(root: &Path) {
    let privileged = root_for(
        "the full tree's device nodes, mode-0 file, other owners and trusted.* and security.* \
         xattrs",
    );
    fs::create_dir_all(root).unwrap();
    write_file(&root.join("small.txt"), b"hello\n");
    write_file(&root.join("empty"), b"");
    write_file(&root.join("!bang"), b"sorts before the dot entries");
    write_file(&root.join("-dash"), b"also before the dot entries");
    for (i, size) in [
        2047usize,
        2048,
        2049,
        4095,
        4096,
        4097,
        8191,
        8193,
        65535,
        65536,
        65537,
        1048575,
        1048576,
        1048577,
        3 * 1048576 + 5,
    ]
    .into_iter()
    .enumerate()
    {
        write_file(
            &root.join(format!("size-{size}")),
            &pattern(i as u64 + 1, size),
        );
    }
    // The same content twice: one stored copy.
    write_file(&root.join("dup-1"), &pattern(99, 300_000));
    write_file(&root.join("dup-2"), &pattern(99, 300_000));

    // Sparse: a hole, a little data, a zero-filled (written) chunk, more data.
    let mut f = File::create(root.join("sparse")).unwrap();
    f.seek(SeekFrom::Start((1 << 20) + 100)).unwrap();
    f.write_all(b"island").unwrap();
    f.write_all_at(&vec![0u8; 1 << 20], 2 << 20).unwrap();
    f.write_all_at(b"end", (4 << 20) - 3).unwrap();
    drop(f);
    let f = File::create(root.join("huge-sparse")).unwrap();
    f.set_len(HUGE_SIZE).unwrap();
    for (off, data) in HUGE_DATA {
        f.write_all_at(data, *off).unwrap();
    }
    drop(f);

    // Hard links, small (inline) and large (chunked), across directories.
    fs::create_dir(root.join("links")).unwrap();
    write_file(&root.join("hl-small"), b"linked");
    fs::hard_link(root.join("hl-small"), root.join("links/hl-small-2")).unwrap();
    fs::hard_link(root.join("hl-small"), root.join("links/hl-small-3")).unwrap();
    write_file(&root.join("hl-big"), &pattern(7, 200_000));
    fs::hard_link(root.join("hl-big"), root.join("links/hl-big-2")).unwrap();

    // Symlinks: relative, absolute, escaping, dangling, long (inline and not).
    symlink("small.txt", root.join("sym-rel")).unwrap();
    symlink("/etc/passwd", root.join("sym-abs")).unwrap();
    symlink("../../../../etc/shadow", root.join("sym-up")).unwrap();
    symlink("/", root.join("sym-root")).unwrap();
    symlink("nowhere", root.join("sym-dangling")).unwrap();
    symlink("a".repeat(1000), root.join("sym-1000")).unwrap();
    symlink("b".repeat(4000), root.join("sym-4000")).unwrap();
    fs::hard_link(root.join("sym-rel"), root.join("links/sym-rel-hardlink")).unwrap();

    // Directories, deep, modes.
    fs::create_dir_all(root.join("deep/a/b/c/d/e")).unwrap();
    write_file(&root.join("deep/a/b/c/d/e/leaf"), b"leaf");
    fs::create_dir(root.join("tmp")).unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::create_dir(root.join("private")).unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();

    // Special files.
    fs::create_dir(root.join("dev")).unwrap();
    if privileged {
        mknod(&root.join("dev/null"), libc::S_IFCHR | 0o666, 1, 3);
        mknod(&root.join("dev/loop200"), libc::S_IFBLK | 0o660, 7, 200);
        mknod(
            &root.join("dev/bigminor"),
            libc::S_IFCHR | 0o600,
            240,
            0x12345,
        );
    }
    mknod(&root.join("dev/fifo"), libc::S_IFIFO | 0o644, 0, 0);
    let sock = root.join("dev/sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    // Overlay whiteout and opaque directory.
    mknod(&root.join("whiteout"), libc::S_IFCHR, 0, 0);
    fs::create_dir(root.join("opaque")).unwrap();
    write_file(&root.join("opaque/kept"), b"kept");
    if privileged {
        xattr::set(root.join("opaque"), "trusted.overlay.opaque", b"y").unwrap();
    }

    // Permission bits and owners.
    for (name, mode) in [
        ("suid", 0o4755),
        ("sgid", 0o2755),
        ("sticky-file", 0o1644),
        ("none", 0),
    ] {
        // A file of mode 0 is read by root only.
        if mode == 0 && !privileged {
            continue;
        }
        write_file(&root.join(name), name.as_bytes());
        fs::set_permissions(root.join(name), fs::Permissions::from_mode(mode)).unwrap();
    }
    write_file(&root.join("owned-100000"), b"userns owner");
    write_file(&root.join("owned-70000"), b"large uid, small gid");
    if privileged {
        lchown(&root.join("owned-100000"), 100000, 100000);
        lchown(&root.join("owned-70000"), 70000, 65534);
        lchown(&root.join("sym-abs"), 1234, 5678);
        lchown(&root.join("dev/fifo"), 42, 43);
    }

    // Xattrs.
    write_file(&root.join("caps"), b"\x7fELF pretend");
    if privileged {
        xattr::set(root.join("caps"), "security.capability", &CAPABILITY).unwrap();
    }
    xattr::set(root.join("small.txt"), "user.note", b"a note").unwrap();
    xattr::set(root.join("small.txt"), "user.empty", b"").unwrap();
    if privileged {
        xattr::set(root.join("small.txt"), "trusted.t", b"trusted value").unwrap();
    }
    xattr::set(root.join("size-65537"), "user.big", &pattern(5, 3000)).unwrap();
    xattr::set(root.join("deep/a"), "user.dir", b"on a dir").unwrap();
    if privileged {
        xattr::set(root.join("dev/null"), "trusted.dev", b"on a device").unwrap();
        xattr::set(root.join("sym-rel"), "trusted.link", b"on a symlink").unwrap();
    }
    xattr::set(root, "user.root", b"on the root").unwrap();
    // One xattr on several inodes: stored once in the shared xattr area.
    for name in ["suid", "sgid", "hl-big", "deep/a/b", "size-4095"] {
        xattr::set(root.join(name), "user.shared", b"one value, many inodes").unwrap();
    }
    if privileged {
        xattr::set(root.join("size-2049"), "security.capability", &CAPABILITY).unwrap();
    }
    // Inline tail plus xattrs too big to share a block: falls back to a data block.
    write_file(&root.join("xattr-heavy"), &pattern(11, 1500));
    xattr::set(root.join("xattr-heavy"), "user.heavy", &pattern(12, 3000)).unwrap();

    // Names: the longest, and odd bytes.
    write_file(&root.join("n".repeat(255)), b"long name");
    write_file(
        &root.join(OsStr::from_bytes(b"bytes-\xff\x01 space")),
        b"odd name",
    );

    // Many entries: a multi-block directory.
    fs::create_dir(root.join("many")).unwrap();
    for i in 0..700 {
        let p = root.join(format!("many/entry-{i:05}-{}", "x".repeat(i % 40)));
        if i % 3 == 0 {
            symlink(format!("target-{i}"), &p).unwrap();
        } else {
            write_file(&p, format!("entry {i}").as_bytes());
        }
    }

    // Times: most entries share one (compact inodes), some differ (extended).
    let mut all = Vec::new();
    collect(root, &mut all);
    for (i, p) in all.iter().enumerate() {
        if i % 5 == 0 {
            set_mtime(
                p,
                1_600_000_000 + i as i64,
                (i as i64 * 7919) % 1_000_000_000,
            );
        } else {
            set_mtime(p, 1_700_000_000, 123_456_789);
        }
    }
    set_mtime(&root.join("small.txt"), 0, 0);
    set_mtime(&root.join("empty"), -86400, 5);
    set_mtime(&root.join("size-4096"), 4_000_000_000, 999_999_999);
    set_mtime(root, 1_700_000_000, 123_456_789);
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            collect(&p, out);
        }
        out.push(p);
    }
}

fn xattrs_of(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for name in xattr::list(p).unwrap() {
        let v = xattr::get(p, &name).unwrap().unwrap_or_default();
        out.insert(name.as_bytes().to_vec(), v);
    }
    out
}

fn file_digest(p: &Path) -> [u8; 32] {
    let mut f = File::open(p).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

/// Compares every entry, attribute, xattr and content of `mounted` with `src`; returns the
/// number of entries compared.
pub fn compare_trees(src: &Path, mounted: &Path) -> usize {
    compare_trees_with(src, mounted, true)
}

/// As [`compare_trees`], for `src` an overlayfs mount: overlayfs reports a link count of 1
/// for a directory merged from several layers, so directories' link counts are not compared.
pub fn compare_trees_as_overlay(src: &Path, mounted: &Path) -> usize {
    compare_trees_with(src, mounted, false)
}

fn compare_trees_with(src: &Path, mounted: &Path, dir_nlink: bool) -> usize {
    let mut src_links: HashMap<u64, PathBuf> = HashMap::new();
    let mut mnt_links: HashMap<u64, PathBuf> = HashMap::new();
    let mut count = 0;
    let mut cx = Compare {
        src,
        mnt: mounted,
        src_links: &mut src_links,
        mnt_links: &mut mnt_links,
        count: &mut count,
        dir_nlink,
    };
    cx.dir(Path::new(""));
    count
}

struct Compare<'a> {
    src: &'a Path,
    mnt: &'a Path,
    src_links: &'a mut HashMap<u64, PathBuf>,
    mnt_links: &'a mut HashMap<u64, PathBuf>,
    count: &'a mut usize,
    dir_nlink: bool,
}

impl Compare<'_> {
    fn dir(&mut self, rel: &Path) {
        let s = self.src.join(rel);
        let m = self.mnt.join(rel);
        compare_entry(&s, &m, rel, self.src_links, self.mnt_links, self.dir_nlink);
        *self.count += 1;
        let names = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (sn, mn) = (names(&s), names(&m));
        assert_eq!(sn, mn, "entries of {}", rel.display());
        for name in sn {
            let r = rel.join(&name);
            let meta = fs::symlink_metadata(self.src.join(&r)).unwrap();
            if meta.is_dir() {
                self.dir(&r);
            } else {
                compare_entry(
                    &self.src.join(&r),
                    &self.mnt.join(&r),
                    &r,
                    self.src_links,
                    self.mnt_links,
                    self.dir_nlink,
                );
                *self.count += 1;
            }
        }
    }
}

fn compare_entry(
    s: &Path,
    m: &Path,
    rel: &Path,
    src_links: &mut HashMap<u64, PathBuf>,
    mnt_links: &mut HashMap<u64, PathBuf>,
    dir_nlink: bool,
) {
    let sm = fs::symlink_metadata(s).unwrap();
    let mm = fs::symlink_metadata(m).unwrap_or_else(|e| panic!("{}: {e}", m.display()));
    let r = rel.display();
    assert_eq!(sm.mode(), mm.mode(), "mode of {r}");
    assert_eq!(sm.uid(), mm.uid(), "uid of {r}");
    assert_eq!(sm.gid(), mm.gid(), "gid of {r}");
    assert_eq!(
        (sm.mtime(), sm.mtime_nsec()),
        (mm.mtime(), mm.mtime_nsec()),
        "mtime of {r}"
    );
    if dir_nlink || !sm.is_dir() {
        assert_eq!(sm.nlink(), mm.nlink(), "nlink of {r}");
    }
    assert_eq!(xattrs_of(s), xattrs_of(m), "xattrs of {r}");
    let ft = sm.file_type();
    use std::os::unix::fs::FileTypeExt;
    if ft.is_char_device() || ft.is_block_device() {
        assert_eq!(sm.rdev(), mm.rdev(), "rdev of {r}");
    }
    if ft.is_symlink() {
        assert_eq!(
            fs::read_link(s).unwrap(),
            fs::read_link(m).unwrap(),
            "target of {r}"
        );
        assert_eq!(sm.len(), mm.len(), "size of {r}");
    }
    if ft.is_file() {
        assert_eq!(sm.len(), mm.len(), "size of {r}");
        if sm.len() <= 64 << 20 {
            assert_eq!(file_digest(s), file_digest(m), "content of {r}");
        } else {
            compare_sparse_samples(s, m, sm.len(), &r.to_string());
        }
    }
    if !ft.is_dir() && sm.nlink() > 1 {
        let a = src_links
            .entry(sm.ino())
            .or_insert_with(|| rel.to_path_buf())
            .clone();
        let b = mnt_links
            .entry(mm.ino())
            .or_insert_with(|| rel.to_path_buf())
            .clone();
        assert_eq!(a, b, "hard link group of {r}");
    }
}

/// Large sparse files: compares every data extent of the source and the ranges around and
/// between them, not all the zeroes.
fn compare_sparse_samples(s: &Path, m: &Path, len: u64, r: &str) {
    let sf = File::open(s).unwrap();
    let mf = File::open(m).unwrap();
    let mut offsets = vec![
        0u64,
        len.saturating_sub(1 << 20),
        (1 << 32) - (1 << 20),
        1 << 32,
    ];
    let mut pos = 0i64;
    loop {
        // SAFETY: plain lseek on an open descriptor.
        let d = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&sf), pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        offsets.push((d as u64).saturating_sub(4096));
        // SAFETY: as above.
        let h = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(&sf), d, libc::SEEK_HOLE) };
        offsets.push(h as u64);
        pos = h;
    }
    for off in offsets {
        if off >= len {
            continue;
        }
        let n = (len - off).min(3 << 20) as usize;
        let mut a = vec![0u8; n];
        let mut b = vec![0u8; n];
        sf.read_exact_at(&mut a, off).unwrap();
        mf.read_exact_at(&mut b, off).unwrap();
        assert!(a == b, "content of {r} at {off}");
    }
}

/// How far fsck.erofs goes.
pub enum Fsck<'a> {
    /// Decode every file's data (`--extract` without a target).
    Data,
    /// Extract the tree to this directory.
    ExtractTo(&'a Path),
}

/// Runs fsck.erofs on the image with its devices; returns (success, output).
pub fn fsck(image: &Path, devices: &[PathBuf], how: Fsck<'_>) -> (bool, String) {
    let mut cmd = Command::new("fsck.erofs");
    for d in devices {
        cmd.arg(format!("--device={}", d.display()));
    }
    match how {
        Fsck::Data => cmd.arg("--extract"),
        Fsck::ExtractTo(x) => cmd.arg(format!("--extract={}", x.display())),
    };
    cmd.arg(image);
    let out = cmd.output().expect("run fsck.erofs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Disk space a file occupies (allocated blocks).
pub fn disk_bytes(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Creates (or truncates) a file for writing.
pub fn create_rw(p: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(p)
        .unwrap()
}

/// A sink that runs `act` once, at the first chunk, then stores chunks in `inner`: a hostile
/// process racing the writer, changing the tree at a moment the test knows.
pub struct OnFirstChunk<'a> {
    pub inner: hyperbox_erofs::LayerWriter<'a>,
    pub act: Option<Box<dyn FnOnce()>>,
}

impl hyperbox_erofs::ChunkSink for OnFirstChunk<'_> {
    fn chunk_bits(&self) -> u8 {
        self.inner.chunk_bits()
    }

    fn put_chunk(
        &mut self,
        data: &[u8],
    ) -> Result<hyperbox_erofs::ChunkLocation, hyperbox_erofs::StoreError> {
        if let Some(act) = self.act.take() {
            act();
        }
        self.inner.put_chunk(data)
    }

    fn device_table(&self) -> Vec<hyperbox_erofs::DeviceSlot> {
        self.inner.device_table()
    }
}

/// Without root, the nearest check to a kernel mount: fsck.erofs extracts the image to `out`
/// (reading file data from `devices`), and the names, kinds, symlink targets and file
/// contents there must match `src`'s (owners, modes, times and xattrs are not extracted as
/// they were). Returns the number of entries compared.
pub fn extract_and_compare(image: &Path, devices: &[PathBuf], src: &Path, out: &Path) -> usize {
    let _ = fs::remove_dir_all(out);
    let (ok, text) = fsck(image, devices, Fsck::ExtractTo(out));
    assert!(ok, "fsck.erofs --extract of {}: {text}", image.display());
    let mut count = 0;
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let names = |d: &Path| {
            let mut v: Vec<_> = fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let (sn, xn) = (names(&src.join(&rel)), names(&out.join(&rel)));
        assert_eq!(sn, xn, "entries of {}", rel.display());
        for name in sn {
            let r = rel.join(name);
            let (s, x) = (src.join(&r), out.join(&r));
            let sm = fs::symlink_metadata(&s).unwrap();
            let xm = fs::symlink_metadata(&x).unwrap();
            assert_eq!(sm.file_type(), xm.file_type(), "kind of {}", r.display());
            if sm.is_dir() {
                todo.push(r);
            } else if sm.file_type().is_symlink() {
                assert_eq!(fs::read_link(&s).unwrap(), fs::read_link(&x).unwrap());
            } else if sm.is_file() {
                assert_eq!(
                    file_digest(&s),
                    file_digest(&x),
                    "content of {}",
                    r.display()
                );
            }
            count += 1;
        }
    }
    count
}

//! Tests of reading, ordering, merging and writing `ld.so.cache` files, checked against
//! `ldconfig` and the loader of this host where they run.

use super::*;
use std::process::Command;

#[test]
fn reads_this_hosts_cache_as_ldconfig_prints_it() {
    let data = std::fs::read("/etc/ld.so.cache").expect("the host has an ld.so.cache");
    let entries = parse(&data).unwrap();
    assert!(!entries.is_empty());
    // `ldconfig -p`: "\tNAME (libc6,x86-64[, hwcap...]) => PATH", in the cache's order.
    let out = Command::new("ldconfig").arg("-p").output();
    let Ok(out) = out.or_else(|_| Command::new("/sbin/ldconfig").arg("-p").output()) else {
        panic!("ldconfig -p does not run");
    };
    let printed: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (left, path) = l.trim().split_once(" => ")?;
            let name = left.split_once(" (")?.0;
            Some((name.to_owned(), path.to_owned()))
        })
        .collect();
    let ours: Vec<(String, String)> = entries
        .iter()
        .map(|e| (e.name.clone(), e.path.display().to_string()))
        .collect();
    assert_eq!(ours, printed);
    let libc = entries
        .iter()
        .find(|e| e.name == "libc.so.6" && e.arch() == Arch::Native64)
        .expect("libc.so.6 in the cache");
    assert!(libc.path.is_absolute(), "{libc:?}");
}

fn cache(entries: &[(i32, &str, &str)]) -> Vec<u8> {
    let mut strings = Vec::new();
    let strings_at = HEADER + entries.len() * ENTRY;
    let mut table = Vec::new();
    for (flags, name, path) in entries {
        let key = strings_at + strings.len();
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
        let value = strings_at + strings.len();
        strings.extend_from_slice(path.as_bytes());
        strings.push(0);
        table.extend_from_slice(&flags.to_ne_bytes());
        table.extend_from_slice(&(key as u32).to_ne_bytes());
        table.extend_from_slice(&(value as u32).to_ne_bytes());
        table.extend_from_slice(&[0; 12]);
    }
    let mut data = MAGIC.to_vec();
    data.extend_from_slice(&(entries.len() as u32).to_ne_bytes());
    data.extend_from_slice(&(strings.len() as u32).to_ne_bytes());
    data.extend_from_slice(&[2, 0, 0, 0]);
    data.extend_from_slice(&[0; 16]);
    assert_eq!(data.len(), HEADER);
    data.extend_from_slice(&table);
    data.extend_from_slice(&strings);
    data
}

#[test]
fn tells_64_bit_from_32_bit_libraries() {
    let data = cache(&[
        (
            0x0303,
            "libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        ),
        (
            0x0003,
            "libcuda.so.1",
            "/usr/lib/i386-linux-gnu/libcuda.so.1",
        ),
        (0x0001, "libold.so", "/lib/libold.so"),
    ]);
    let entries = parse(&data).unwrap();
    let arches: Vec<Arch> = entries.iter().map(LdCacheEntry::arch).collect();
    assert_eq!(arches, [Arch::Native64, Arch::Elf32, Arch::Other]);
    assert_eq!(
        entries[1].path,
        PathBuf::from("/usr/lib/i386-linux-gnu/libcuda.so.1")
    );
}

#[test]
fn refuses_what_is_not_a_whole_cache() {
    assert_eq!(parse(b""), Err(LdCacheError::NotACache));
    assert_eq!(
        parse(b"glibc-ld.so.cache1.0...."),
        Err(LdCacheError::NotACache)
    );
    let data = cache(&[(0x0303, "liba.so.1", "/lib/liba.so.1")]);
    // Cut inside the entry table, inside the strings, and a count that lies.
    for cut in [HEADER + 10, data.len() - 3] {
        assert!(
            matches!(parse(&data[..cut]), Err(LdCacheError::Truncated(_))),
            "cut at {cut}"
        );
    }
    let mut lying = data.clone();
    lying[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    assert!(matches!(parse(&lying), Err(LdCacheError::Truncated(_))));
    let mut wild = data;
    wild[HEADER + 4..HEADER + 8].copy_from_slice(&0x7fff_fff0u32.to_ne_bytes());
    assert!(matches!(parse(&wild), Err(LdCacheError::Truncated(_))));
}

#[test]
fn reads_a_cache_behind_the_old_table() {
    let new = cache(&[(0x0303, "liba.so.1", "/lib/liba.so.1")]);
    let mut data = OLD_MAGIC.to_vec();
    data.push(0);
    data.extend_from_slice(&1u32.to_ne_bytes());
    data.extend_from_slice(&[0; OLD_ENTRY]);
    while data.len() % 8 != 0 {
        data.push(0);
    }
    data.extend_from_slice(&new);
    let entries = parse(&data).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].name, "liba.so.1");
}

fn entry(flags: i32, name: &str, path: &str) -> LdCacheEntry {
    LdCacheEntry {
        name: name.to_owned(),
        path: PathBuf::from(path),
        flags,
        hwcap: 0,
    }
}

/// The flags `ldconfig` gives a 64-bit library of this machine.
const NATIVE: i32 = FLAG_ELF_LIBC6
    | if cfg!(target_arch = "aarch64") {
        FLAG_AARCH64_LIB64
    } else {
        FLAG_X8664_LIB64
    };

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("hyperbox-ldcache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The `ldconfig` to ask, if there is one.
fn ldconfig() -> Option<&'static str> {
    ["ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .into_iter()
        .find(|p| runs(p))
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// What `ldconfig -p -C cache` prints of each entry, in order:
/// `NAME (FLAGS[, hwcap: "SUBDIR"]) => PATH`.
fn printed(ldconfig: &str, cache: &Path) -> Vec<String> {
    let out = run(Command::new(ldconfig).arg("-p").arg("-C").arg(cache));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('\t'))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[test]
fn libcmp_compares_digit_runs_as_numbers_as_glibc_does() {
    use Ordering::*;
    for (a, b, expected) in [
        ("libfoo.so.2", "libfoo.so.10", Less),
        ("libfoo.so.10", "libfoo.so.9", Greater),
        ("libfoo.so.01", "libfoo.so.1", Equal),
        ("libfoo.so.1.2", "libfoo.so.1.10", Less),
        ("libfoo-2.0.so", "libfoo-10.so", Less),
        // A digit is above any other byte, and the end of a name below.
        ("libfoo.so.1", "libfoo.so.a", Greater),
        ("libfoo.so.1", "libfoo.so.", Greater),
        ("libfoo.so", "libfoo.so.1", Less),
        ("libcuda.so", "libcuda.so.1", Less),
        ("lib3d.so", "libz.so", Greater),
        // Other bytes compare as they are.
        ("libA.so", "liba.so", Less),
        ("libc.so.6", "libcuda.so.1", Less),
        ("libcuda.so.1", "libcuda.so.1", Equal),
        // A name ends at its NUL, as a C string does.
        ("liba.so\0junk", "liba.so", Equal),
    ] {
        assert_eq!(libcmp(a, b), expected, "{a:?} vs {b:?}");
        assert_eq!(libcmp(b, a), expected.reverse(), "{b:?} vs {a:?}");
    }
    // Bytes above 0x7f are negative where `char` is signed (x86-64), so they sort below
    // the end of a name there.
    let signed = std::ffi::c_char::MIN != 0;
    assert_eq!(
        libcmp("lib\u{e9}.so", "lib"),
        if signed { Less } else { Greater }
    );
    assert_eq!(
        libcmp("lib", "lib\u{e9}.so"),
        if signed { Greater } else { Less }
    );
    // Digit runs that overflow C's `int` still give an order, so sorting cannot panic.
    let mut names = vec![
        "libx.so.99999999999".to_owned(),
        "libx.so.4294967297".to_owned(),
        "libx.so.1".to_owned(),
        "libx.so.2147483648".to_owned(),
        "libx.so.18446744073709551617".to_owned(),
    ];
    names.sort_by(|a, b| libcmp(a, b));
    for a in &names {
        for b in &names {
            assert_eq!(libcmp(a, b), libcmp(b, a).reverse());
        }
    }
}

/// The entries of [`round_trips_in_ldconfigs_order`], as `ldconfig` orders them.
fn sorted_sample() -> Vec<LdCacheEntry> {
    vec![
        entry(NATIVE, "libnvidia-ml.so.1", "/usr/lib64/libnvidia-ml.so.1"),
        entry(0x0003, "libnvidia-ml.so.1", "/usr/lib32/libnvidia-ml.so.1"),
        entry(NATIVE, "libfoo.so.10", "/usr/lib64/libfoo.so.10"),
        entry(NATIVE, "libfoo.so.2", "/usr/lib64/libfoo.so.2"),
        entry(NATIVE, "libfoo.so.1", "/usr/lib64/libfoo.so.1"),
        entry(NATIVE, "libcuda.so.1", "/usr/lib64/libcuda.so.1"),
        entry(0x0003, "libcuda.so.1", "/usr/lib32/libcuda.so.1"),
        entry(NATIVE, "libcuda.so", "/usr/lib64/libcuda.so"),
        entry(NATIVE, "libc.so.6", "/lib64/libc.so.6"),
        entry(0x0003, "libc.so.6", "/lib32/libc.so.6"),
        entry(0x0001, "libc.so.6", "/lib32/libc.so.6"),
    ]
}

#[test]
fn round_trips_in_ldconfigs_order() {
    let sorted = sorted_sample();
    // Any order in, ldconfig's out.
    let mut shuffled = sorted.clone();
    shuffled.reverse();
    shuffled.swap(0, 5);
    shuffled.swap(2, 9);
    let data = write(&shuffled).unwrap();
    assert_eq!(parse(&data).unwrap(), sorted);
    assert_eq!(write(&sorted).unwrap(), data);

    // The header of `ldconfig -c new`, with no extensions.
    assert!(data.starts_with(b"glibc-ld.so.cache1.1"));
    let strings_at = HEADER + sorted.len() * ENTRY;
    assert_eq!(u32_at(&data, 20).unwrap() as usize, sorted.len());
    assert_eq!(u32_at(&data, 24).unwrap() as usize, data.len() - strings_at);
    assert_eq!(data[28], if cfg!(target_endian = "little") { 2 } else { 3 });
    assert_eq!(&data[29..HEADER], &[0; 19]);
    // Each string once: the two entries of `libc.so.6` at `/lib32/libc.so.6` share
    // their key and their value.
    let key_value = |i: usize| data[HEADER + i * ENTRY + 4..HEADER + i * ENTRY + 12].to_vec();
    assert_eq!(key_value(9), key_value(10));
    assert_eq!(data.last(), Some(&0));

    assert_eq!(parse(&write(&[]).unwrap()).unwrap(), []);
}

#[test]
fn refuses_what_a_cache_cannot_hold() {
    assert_eq!(
        write(&[entry(NATIVE, "liba.so\0.1", "/lib/liba.so.1")]),
        Err(LdCacheWriteError::Nul("liba.so\0.1".to_owned()))
    );
    assert!(matches!(
        write(&[entry(NATIVE, "liba.so.1", "/lib/liba\0.so.1")]),
        Err(LdCacheWriteError::Nul(_))
    ));
    let mut hwcaps = entry(NATIVE, "liba.so.1", "/lib/glibc-hwcaps/x86-64-v3/liba.so.1");
    hwcaps.hwcap = HWCAP_EXTENSION | (3 << 32);
    assert_eq!(
        write(&[hwcaps]),
        Err(LdCacheWriteError::GlibcHwcaps("liba.so.1".to_owned()))
    );
}

#[test]
fn ldconfig_prints_the_cache_we_wrote() {
    let Some(ldconfig) = ldconfig() else {
        hyperbox_testkit::skip("no ldconfig");
        return;
    };
    let scratch = Scratch::new("print");
    let file = scratch.0.join("ld.so.cache");
    let data = write(&sorted_sample()).unwrap();
    std::fs::write(&file, &data).unwrap();
    let native = if cfg!(target_arch = "aarch64") {
        "libc6,AArch64"
    } else {
        "libc6,x86-64"
    };
    let expected: Vec<String> = parse(&data)
        .unwrap()
        .iter()
        .map(|e| {
            let kind = match e.flags {
                NATIVE => native,
                0x0003 => "libc6",
                0x0001 => "ELF",
                other => panic!("{other:#x}"),
            };
            format!("{} ({kind}) => {}", e.name, e.path.display())
        })
        .collect();
    assert_eq!(printed(ldconfig, &file), expected);
}

#[test]
fn merge_lets_the_driver_win_and_keeps_the_rest() {
    let mut hwcaps = entry(
        NATIVE,
        "libcuda.so.1",
        "/usr/lib/glibc-hwcaps/x86-64-v3/libcuda.so.1",
    );
    hwcaps.hwcap = HWCAP_EXTENSION;
    let image = vec![
        entry(NATIVE, "libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
        entry(
            NATIVE,
            "libcuda.so.1",
            "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        ),
        hwcaps,
        entry(NATIVE, "libcuda.so.1", "/opt/stale/libcuda.so.1"),
        entry(
            0x0003,
            "libcuda.so.1",
            "/usr/lib/i386-linux-gnu/libcuda.so.1",
        ),
        entry(
            NATIVE,
            "libnvidia-ml.so.1",
            "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1",
        ),
        entry(0x0001, "libold.so.1", "/usr/lib/libold.so.1"),
    ];
    let injected = [
        entry(NATIVE, "libcuda.so.1", "/run/driver/lib64/libcuda.so.1"),
        entry(
            0x0003,
            "libnvidia-ml.so.1",
            "/run/driver/lib32/libnvidia-ml.so.1",
        ),
        // Another ABI than the image's `libold.so.1`: both stay.
        entry(0x0000, "libold.so.1", "/run/driver/libold.so.1"),
    ];
    assert_eq!(
        merge(image, &injected),
        [
            entry(0x0001, "libold.so.1", "/usr/lib/libold.so.1"),
            entry(0x0000, "libold.so.1", "/run/driver/libold.so.1"),
            entry(
                NATIVE,
                "libnvidia-ml.so.1",
                "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"
            ),
            entry(
                0x0003,
                "libnvidia-ml.so.1",
                "/run/driver/lib32/libnvidia-ml.so.1"
            ),
            entry(NATIVE, "libcuda.so.1", "/run/driver/lib64/libcuda.so.1"),
            entry(
                0x0003,
                "libcuda.so.1",
                "/usr/lib/i386-linux-gnu/libcuda.so.1"
            ),
            entry(NATIVE, "libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
        ]
    );
    assert_eq!(merge(Vec::new(), &[]), []);

    let lib64 = LdCacheEntry::library("libcuda.so.1", Path::new("/l/libcuda.so.1"), true);
    let lib32 = LdCacheEntry::library("libcuda.so.1", Path::new("/l/libcuda.so.1"), false);
    assert_eq!((lib64.flags, lib64.arch()), (NATIVE, Arch::Native64));
    assert_eq!((lib32.flags, lib32.arch()), (0x0003, Arch::Elf32));
}

/// Builds stub libraries, has `ldconfig` write their cache, and checks that [`write`]
/// orders and fills the entries as `ldconfig` did and that `ldconfig -p` prints both
/// files alike.
#[test]
fn writes_what_ldconfig_writes() {
    let Some(ldconfig) = ldconfig() else {
        hyperbox_testkit::skip("no ldconfig");
        return;
    };
    if !runs("gcc") {
        hyperbox_testkit::skip("no gcc");
        return;
    }
    let scratch = Scratch::new("truth");
    let root = scratch.0.join("root");
    let stub = scratch.0.join("stub.c");
    std::fs::write(&stub, "int hyperbox_stub(void) { return 0; }\n").unwrap();
    // `gcc -shared -Wl,-soname,NAME -o DIR/NAME.0.0 stub.c`: `ldconfig` lists each
    // library under its SONAME, as `DIR/SONAME`.
    let build = |dir: &str, soname: &str, extra: &[&str]| {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("gcc")
            .args(["-shared", "-fPIC"])
            .arg(format!("-Wl,-soname,{soname}"))
            .arg("-o")
            .arg(dir.join(format!("{soname}.0.0")))
            .arg(&stub)
            .args(extra));
    };
    let native = [
        "libfoo.so.1",
        "libfoo.so.10",
        "libfoo.so.2",
        "libfoo.so.1.2",
        "libfoo.so",
        "libfoo-2.0.so.0",
        "libfoo-10.so.0",
        "libc.so.6",
        "libcuda.so.1",
        "libnvidia-ml.so.1",
        "libnvidia-glcore.so.550.54.14",
        "libnvidia-glcore.so.550.100",
        "lib3d.so.1",
        "libA.so.1",
        "libz.so.1",
    ];
    for soname in native {
        build("l64", soname, &[]);
    }
    build("usr/lib", "libcuda.so", &[]);
    // A glibc-hwcaps entry: `ldconfig` lists it before the plain one of its name.
    build("l64/glibc-hwcaps/x86-64-v3", "libfoo.so.1", &[]);
    let mut dirs = "/l64\n".to_owned();
    if cfg!(target_arch = "x86_64") {
        // 32-bit libraries: a `libc.so.6` stub without dependencies (flags `ELF`), and
        // libraries that need it (flags `libc6`, no architecture bits).
        let libc32 = root.join("l32/libc.so.6.0.0");
        let needs_libc = [
            "-m32",
            "-nostdlib",
            "-Wl,--no-as-needed",
            libc32.to_str().unwrap(),
        ];
        build("l32", "libc.so.6", &["-m32", "-nostdlib"]);
        for soname in ["libcuda.so.1", "libfoo.so.2", "libnvidia-ml.so.1"] {
            build("l32", soname, &needs_libc);
        }
        dirs.push_str("/l32\n");
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/ld.so.conf"), dirs).unwrap();
    // `-r ROOT`: `ROOT/etc/ld.so.conf` in, `ROOT/etc/ld.so.cache` out, and nothing of
    // this host's (its aux cache included); `-X`: no links made.
    run(Command::new(ldconfig).arg("-X").arg("-r").arg(&root));
    let theirs_file = root.join("etc/ld.so.cache");
    let truth = parse(&std::fs::read(&theirs_file).unwrap()).unwrap();
    let n32 = if cfg!(target_arch = "x86_64") { 4 } else { 0 };
    assert_eq!(truth.len(), native.len() + 2 + n32, "{truth:#?}");
    assert_eq!(truth.iter().filter(|e| e.in_glibc_hwcaps()).count(), 1);
    assert!(matches!(
        write(&truth),
        Err(LdCacheWriteError::GlibcHwcaps(_))
    ));

    let plain: Vec<LdCacheEntry> = truth
        .iter()
        .filter(|e| !e.in_glibc_hwcaps())
        .cloned()
        .collect();
    // No two entries are equal to the order, so the order of the input cannot matter.
    for pair in plain.windows(2) {
        assert_eq!(cache_order(&pair[0], &pair[1]), Ordering::Less, "{pair:#?}");
    }
    let mut backwards = plain.clone();
    backwards.reverse();
    let ours = write(&backwards).unwrap();
    assert_eq!(parse(&ours).unwrap(), plain);
    assert_eq!(merge(truth.clone(), &[]), plain);

    let ours_file = scratch.0.join("ours.cache");
    std::fs::write(&ours_file, &ours).unwrap();
    let theirs_printed: Vec<String> = printed(ldconfig, &theirs_file)
        .into_iter()
        .filter(|l| !l.contains("hwcap: "))
        .collect();
    assert_eq!(printed(ldconfig, &ours_file), theirs_printed);
}

/// Runs a program whose library only a cache we wrote knows of, with this host's
/// loader made to read that cache: the loader binary-searches the file, so this fails
/// if the order is not the loader's.
#[test]
fn the_loader_finds_a_library_through_a_cache_we_wrote() {
    let loader = if cfg!(target_arch = "x86_64") {
        "/lib64/ld-linux-x86-64.so.2"
    } else if cfg!(target_arch = "aarch64") {
        "/lib/ld-linux-aarch64.so.1"
    } else {
        ""
    };
    let Ok(loader_bytes) = std::fs::read(loader) else {
        hyperbox_testkit::skip(&format!("no glibc loader at {loader:?}"));
        return;
    };
    if !runs("gcc") {
        hyperbox_testkit::skip("no gcc");
        return;
    }
    let Ok(host) = std::fs::read("/etc/ld.so.cache") else {
        hyperbox_testkit::skip("this host has no ld.so.cache");
        return;
    };
    let image = parse(&host).unwrap();

    let scratch = Scratch::new("loader");
    let dir = &scratch.0;
    std::fs::write(
        dir.join("probe.c"),
        "const char *hb_probe(void) { return \"probe ok\"; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.c"),
        "#include <stdio.h>\nconst char *hb_probe(void);\n\
         int main(void) { puts(hb_probe()); return 0; }\n",
    )
    .unwrap();
    let lib = dir.join("libhbprobe.so.1");
    run(Command::new("gcc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libhbprobe.so.1", "-o"])
        .arg(&lib)
        .arg(dir.join("probe.c")));
    let program = dir.join("main");
    run(Command::new("gcc")
        .arg("-o")
        .arg(&program)
        .arg(dir.join("main.c"))
        .arg(&lib));

    // A copy of the loader that reads its cache from a path of the same length as
    // `/etc/ld.so.cache` (16 bytes), so the string can be patched in place.
    let cache = format!("/tmp/hbc{:08x}", std::process::id());
    assert_eq!(cache.len(), 16);
    let wanted = b"/etc/ld.so.cache\0";
    let mut patched = loader_bytes;
    let mut found = 0;
    let mut at = 0;
    while let Some(i) = patched[at..]
        .windows(wanted.len())
        .position(|w| w == wanted)
    {
        patched[at + i..at + i + 16].copy_from_slice(cache.as_bytes());
        found += 1;
        at += i + wanted.len();
    }
    if found == 0 {
        hyperbox_testkit::skip(&format!("{loader} does not name /etc/ld.so.cache"));
        return;
    }
    let patched_loader = dir.join("ld.so");
    std::fs::write(&patched_loader, patched).unwrap();
    std::fs::set_permissions(
        &patched_loader,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(cache.clone());
    let run_program = || {
        Command::new(&patched_loader)
            .arg(&program)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap()
    };

    // Without the library in the cache the program does not start...
    std::fs::write(&cache, write(&merge(image.clone(), &[])).unwrap()).unwrap();
    let out = run_program();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("libhbprobe.so.1"),
        "{out:?}"
    );
    // ...and with it, among this host's libraries, it does.
    let injected = [LdCacheEntry {
        name: "libhbprobe.so.1".to_owned(),
        path: lib.clone(),
        flags: NATIVE,
        hwcap: 0,
    }];
    std::fs::write(&cache, write(&merge(image, &injected)).unwrap()).unwrap();
    let out = run_program();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "probe ok\n");
}

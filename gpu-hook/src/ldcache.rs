//! glibc's `ld.so.cache` (the format `ldconfig` writes since glibc 2.32, magic
//! `glibc-ld.so.cache` version `1.1`), read and written without running `ldconfig` (which
//! has followed links planted in images: CVE-2025-23267).
//!
//! Reading lets the generator find the driver's libraries under a driver root the way the
//! dynamic loader of that root would. Writing lets the hook give a container an
//! `/etc/ld.so.cache` that lists the image's own libraries and the injected driver
//! libraries ([`merge`], then [`write`]) instead of running `ldconfig` inside it.
//!
//! Layout (native byte order, little-endian here): a 48-byte header (magic, version, entry
//! count, string table length, flags, extension offset), then 24-byte entries (flags, key
//! and value as offsets from the start of the file into the string table, an unused OS
//! version, hwcap), then the NUL-terminated strings. An older file may start with the
//! libc5-era `ld.so-1.7.0` table, which the new header then follows (aligned); that form is
//! read too. [`write`] writes the new table alone (`ldconfig -c new`, the default) and no
//! extensions; the loader binary-searches the entries, so they are kept in `ldconfig`'s
//! order ([`libcmp`]).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The new format's magic and version.
const MAGIC: &[u8; 20] = b"glibc-ld.so.cache1.1";
/// The old format's magic, followed by a `u32` entry count and 12-byte entries.
const OLD_MAGIC: &[u8; 11] = b"ld.so-1.7.0";
const HEADER: usize = 48;
const ENTRY: usize = 24;
const OLD_ENTRY: usize = 12;

/// `FLAG_ELF_LIBC6`: a glibc library.
const FLAG_ELF_LIBC6: i32 = 0x0003;
/// The mask of the architecture bits of an entry's flags.
const FLAG_REQUIRED_MASK: i32 = 0xff00;
/// `FLAG_X8664_LIB64`: x86-64.
const FLAG_X8664_LIB64: i32 = 0x0300;
/// `FLAG_AARCH64_LIB64`: AArch64.
const FLAG_AARCH64_LIB64: i32 = 0x0a00;
/// `DL_CACHE_HWCAP_EXTENSION`: the entry is a library in a `glibc-hwcaps` subdirectory, and
/// the low bits of its hwcap index the subdirectory names of the file's extension section.
const HWCAP_EXTENSION: u64 = 1 << 62;
/// `cache_file_new_flags_endian_little` / `_big` (glibc's `dl-cache.h`): the loader refuses
/// a file whose flags name the other byte order, and we write native order.
const FLAGS_ENDIAN_CURRENT: u8 = if cfg!(target_endian = "little") { 2 } else { 3 };

/// A cache that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LdCacheError {
    #[error("not an ld.so.cache of glibc 2.32 or later (no glibc-ld.so.cache1.1 header)")]
    NotACache,
    #[error("the cache is cut short or inconsistent: {0}")]
    Truncated(&'static str),
}

/// Entries that cannot be written as a cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LdCacheWriteError {
    /// The strings of the file are NUL-terminated, so such a name would be cut.
    #[error("{0:?}: a library name or path with a NUL byte cannot be stored")]
    Nul(String),
    /// Such an entry's hwcap indexes subdirectory names in an extension section, which
    /// [`write`] does not write ([`merge`] drops these entries).
    #[error("{0}: an entry of a glibc-hwcaps subdirectory cannot be written")]
    GlibcHwcaps(String),
    /// Offsets in the file are 32-bit.
    #[error("the cache would be larger than 4 GiB")]
    TooLarge,
}

/// Which kind of library an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// A 64-bit library of this machine's kind (x86-64 or AArch64).
    Native64,
    /// A glibc library without architecture bits: 32-bit x86 on an x86-64 host (what the
    /// `compat32` capability injects).
    Elf32,
    /// Anything else (other ABIs, libc5 leftovers).
    Other,
}

/// One library of the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LdCacheEntry {
    /// What programs ask for: the SONAME (`libcuda.so.1`), or a plain name (`libcuda.so`).
    pub name: String,
    /// Where the loader finds it.
    pub path: PathBuf,
    pub flags: i32,
    pub hwcap: u64,
}

impl LdCacheEntry {
    /// The entry `ldconfig` makes of a glibc library of this machine: 64-bit (`Native64`,
    /// flags `libc6,x86-64` or `libc6,AArch64`) or 32-bit (`Elf32`, flags `libc6`).
    pub fn library(name: &str, path: &Path, sixty_four: bool) -> LdCacheEntry {
        let arch = match (sixty_four, cfg!(target_arch = "aarch64")) {
            (false, _) => 0,
            (true, true) => FLAG_AARCH64_LIB64,
            (true, false) => FLAG_X8664_LIB64,
        };
        LdCacheEntry {
            name: name.to_owned(),
            path: path.to_path_buf(),
            flags: FLAG_ELF_LIBC6 | arch,
            hwcap: 0,
        }
    }

    /// The entry's kind.
    pub fn arch(&self) -> Arch {
        if self.flags & 0xff != FLAG_ELF_LIBC6 {
            return Arch::Other;
        }
        match self.flags & FLAG_REQUIRED_MASK {
            FLAG_X8664_LIB64 | FLAG_AARCH64_LIB64 => Arch::Native64,
            0 => Arch::Elf32,
            _ => Arch::Other,
        }
    }
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, LdCacheError> {
    data.get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(LdCacheError::Truncated("a field past the end"))
}

/// The NUL-terminated string at `at`.
fn str_at(data: &[u8], at: usize) -> Result<String, LdCacheError> {
    let rest = data
        .get(at..)
        .ok_or(LdCacheError::Truncated("a string offset past the end"))?;
    let end = rest
        .iter()
        .position(|b| *b == 0)
        .ok_or(LdCacheError::Truncated("a string without its NUL"))?;
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Parses a whole cache file.
pub fn parse(data: &[u8]) -> Result<Vec<LdCacheEntry>, LdCacheError> {
    let start = if data.starts_with(MAGIC) {
        0
    } else if data.starts_with(OLD_MAGIC) {
        // The old table: magic (padded to 12), count, entries; the new header follows,
        // aligned to 8.
        let count = u32_at(data, 12)? as usize;
        let end = 16usize
            .checked_add(
                count
                    .checked_mul(OLD_ENTRY)
                    .ok_or(LdCacheError::NotACache)?,
            )
            .ok_or(LdCacheError::NotACache)?;
        let aligned = end.next_multiple_of(8);
        if !data.get(aligned..).is_some_and(|d| d.starts_with(MAGIC)) {
            return Err(LdCacheError::NotACache);
        }
        aligned
    } else {
        return Err(LdCacheError::NotACache);
    };
    let count = u32_at(data, start + 20)? as usize;
    let table = start + HEADER;
    let needed = count
        .checked_mul(ENTRY)
        .and_then(|n| n.checked_add(table))
        .ok_or(LdCacheError::Truncated("an entry count that overflows"))?;
    if needed > data.len() {
        return Err(LdCacheError::Truncated(
            "fewer entries than the header says",
        ));
    }
    // Offsets count from the new header in files that have the old table in front, and
    // from the start of the file otherwise; both are `start` here.
    (0..count)
        .map(|i| {
            let at = table + i * ENTRY;
            let flags = u32_at(data, at)? as i32;
            let key = u32_at(data, at + 4)? as usize;
            let value = u32_at(data, at + 8)? as usize;
            let hwcap_bytes = &data[at + 16..at + 24];
            let hwcap = u64::from_ne_bytes(hwcap_bytes.try_into().expect("8 bytes"));
            Ok(LdCacheEntry {
                name: str_at(data, start + key)?,
                path: PathBuf::from(str_at(data, start + value)?),
                flags,
                hwcap,
            })
        })
        .collect()
}

/// Reads `root/etc/ld.so.cache` (a driver root's own cache).
pub fn read_under(root: &Path) -> Result<Vec<LdCacheEntry>, std::io::Error> {
    let data = std::fs::read(root.join("etc/ld.so.cache"))?;
    parse(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// glibc's `_dl_cache_libcmp`, the order of the cache: byte by byte, except that runs of
/// digits compare as numbers (`libfoo.so.2` < `libfoo.so.10`, `.01` = `.1`) and above any
/// other byte, and that a name ends at its first NUL. Other bytes compare as C `char`s,
/// signed on x86-64 as in the loader there.
///
/// One deviation: C accumulates a digit run in an `int` that overflows past nine digits and
/// returns the sign of the wrapped difference, which is no order at all for such runs;
/// here the wrapped values themselves are compared, so the order stays total (sorting
/// relies on that). No library name has such a run.
pub fn libcmp(a: &str, b: &str) -> Ordering {
    libcmp_bytes(a.as_bytes(), b.as_bytes())
}

fn libcmp_bytes(a: &[u8], b: &[u8]) -> Ordering {
    // A C string: past the end (or at an inner NUL) there is a NUL.
    let at = |s: &[u8], i: usize| s.get(i).copied().unwrap_or(0);
    let (mut i, mut j) = (0, 0);
    while at(a, i) != 0 {
        let (c1, c2) = (at(a, i), at(b, j));
        if c1.is_ascii_digit() {
            if !c2.is_ascii_digit() {
                return Ordering::Greater;
            }
            let (v1, next_i) = digit_run(a, i);
            let (v2, next_j) = digit_run(b, j);
            if v1 != v2 {
                return v1.cmp(&v2);
            }
            (i, j) = (next_i, next_j);
        } else if c2.is_ascii_digit() {
            return Ordering::Less;
        } else if c1 != c2 {
            return c_char_value(c1).cmp(&c_char_value(c2));
        } else {
            i += 1;
            j += 1;
        }
    }
    // `*p1 - *p2` with `*p1` the NUL.
    0.cmp(&c_char_value(at(b, j)))
}

/// The value of the digit run at `at`, wrapping as C's `int` does, and where it ends.
fn digit_run(s: &[u8], mut at: usize) -> (i32, usize) {
    let mut value: i32 = 0;
    while let Some(d) = s.get(at).filter(|d| d.is_ascii_digit()) {
        value = value.wrapping_mul(10).wrapping_add(i32::from(d - b'0'));
        at += 1;
    }
    (value, at)
}

/// A byte as the loader's `char` holds it (signed on x86-64, unsigned on AArch64).
fn c_char_value(c: u8) -> i32 {
    i32::from(std::ffi::c_char::from_ne_bytes([c]))
}

/// The string table of a file being written, each string stored once.
struct StringTable<'a> {
    /// Where the table starts in the file: offsets count from the start of the file.
    base: usize,
    bytes: Vec<u8>,
    offsets: HashMap<&'a [u8], u32>,
}

impl<'a> StringTable<'a> {
    /// The offset of `s`, added if new.
    fn add(&mut self, s: &'a [u8]) -> Result<u32, LdCacheWriteError> {
        if let Some(&at) = self.offsets.get(s) {
            return Ok(at);
        }
        if s.contains(&0) {
            return Err(LdCacheWriteError::Nul(
                String::from_utf8_lossy(s).into_owned(),
            ));
        }
        // The string's end, NUL included, must be addressable too.
        let at = self.base.checked_add(self.bytes.len());
        let end = at.and_then(|at| at.checked_add(s.len() + 1));
        let (Some(at), Some(_)) = (
            at.and_then(|at| u32::try_from(at).ok()),
            end.and_then(|end| u32::try_from(end).ok()),
        ) else {
            return Err(LdCacheWriteError::TooLarge);
        };
        self.bytes.extend_from_slice(s);
        self.bytes.push(0);
        self.offsets.insert(s, at);
        Ok(at)
    }
}

/// `ldconfig`'s order (`compare` in glibc's `elf/cache.c`): names descending by
/// [`libcmp`] (the loader's binary search expects that), then flags descending, then the
/// most specific hwcap (most bits set, then the larger value) first. The OS version, the
/// last key there, is 0 in every entry we write. `ldconfig` inserts each library after
/// those that compare equal, so the sort must be stable: of equal entries the loader takes
/// the first.
fn cache_order(a: &LdCacheEntry, b: &LdCacheEntry) -> Ordering {
    libcmp(&b.name, &a.name)
        .then(b.flags.cmp(&a.flags))
        .then(b.hwcap.count_ones().cmp(&a.hwcap.count_ones()))
        .then(b.hwcap.cmp(&a.hwcap))
}

impl LdCacheEntry {
    /// Whether this is a library of a `glibc-hwcaps` subdirectory.
    fn in_glibc_hwcaps(&self) -> bool {
        self.hwcap & HWCAP_EXTENSION != 0
    }

    /// Whether `other` stands for the same library to the loader: the same name for the
    /// same kind of program. `Other` lumps together ABIs that cannot stand in for each other
    /// (libc5, x32, ...), so there the flags must match exactly.
    fn same_library(&self, other: &LdCacheEntry) -> bool {
        self.name == other.name
            && match (self.arch(), other.arch()) {
                (Arch::Other, Arch::Other) => self.flags == other.flags,
                (mine, theirs) => mine == theirs,
            }
    }
}

/// A container's cache: the image's entries and the injected ones, in `ldconfig`'s order.
/// An injected entry replaces every image entry of the same name and kind ([`Arch`]), so a
/// program finds the driver's library and not a stale copy the image carries.
///
/// The image's `glibc-hwcaps` entries are dropped: [`write`] writes no extension section to
/// name their subdirectories, and were they kept the loader would prefer them to any plain
/// entry of the same name, an injected one included. Without them the loader takes the
/// plain entries of those names: a `glibc-hwcaps` subdirectory holds faster builds of
/// libraries that its parent directory has too.
pub fn merge(image: Vec<LdCacheEntry>, injected: &[LdCacheEntry]) -> Vec<LdCacheEntry> {
    let mut entries: Vec<LdCacheEntry> = image
        .into_iter()
        .filter(|e| !e.in_glibc_hwcaps() && !injected.iter().any(|i| i.same_library(e)))
        .chain(injected.iter().cloned())
        .collect();
    entries.sort_by(cache_order);
    entries
}

/// A whole cache file listing `entries`, as `ldconfig -c new` writes it: the 48-byte header
/// (no extensions: their offset is 0), the entries in `ldconfig`'s order (sorted here, so
/// any order may be passed), then the strings, each stored once.
pub fn write(entries: &[LdCacheEntry]) -> Result<Vec<u8>, LdCacheWriteError> {
    let mut sorted: Vec<&LdCacheEntry> = entries.iter().collect();
    sorted.sort_by(|a, b| cache_order(a, b));

    let table_len = sorted
        .len()
        .checked_mul(ENTRY)
        .ok_or(LdCacheWriteError::TooLarge)?;
    let strings_at = HEADER
        .checked_add(table_len)
        .ok_or(LdCacheWriteError::TooLarge)?;
    let mut strings = StringTable {
        base: strings_at,
        bytes: Vec::new(),
        offsets: HashMap::new(),
    };
    let mut table = Vec::with_capacity(table_len);
    for entry in sorted {
        if entry.in_glibc_hwcaps() {
            return Err(LdCacheWriteError::GlibcHwcaps(entry.name.clone()));
        }
        let key = strings.add(entry.name.as_bytes())?;
        let value = strings.add(entry.path.as_os_str().as_bytes())?;
        table.extend_from_slice(&entry.flags.to_ne_bytes());
        table.extend_from_slice(&key.to_ne_bytes());
        table.extend_from_slice(&value.to_ne_bytes());
        // The OS version: 0 asks for no minimum kernel (and `parse` keeps none).
        table.extend_from_slice(&0u32.to_ne_bytes());
        table.extend_from_slice(&entry.hwcap.to_ne_bytes());
    }
    let nlibs = u32::try_from(entries.len()).map_err(|_| LdCacheWriteError::TooLarge)?;
    let strings = strings.bytes;
    let len_strings = u32::try_from(strings.len()).map_err(|_| LdCacheWriteError::TooLarge)?;

    let mut data = Vec::with_capacity(strings_at + strings.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&nlibs.to_ne_bytes());
    data.extend_from_slice(&len_strings.to_ne_bytes());
    data.extend_from_slice(&[FLAGS_ENDIAN_CURRENT, 0, 0, 0]);
    // The extension offset (none) and three unused words.
    data.extend_from_slice(&[0; 16]);
    data.extend_from_slice(&table);
    data.extend_from_slice(&strings);
    Ok(data)
}

#[cfg(test)]
mod tests {
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
}

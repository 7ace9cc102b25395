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
mod tests;

//! Reading glibc's `ld.so.cache` (the format `ldconfig` writes since glibc 2.32, magic
//! `glibc-ld.so.cache` version `1.1`), so the generator finds the driver's libraries under a
//! driver root the way the dynamic loader of that root would, without running `ldconfig`
//! (which has followed links planted in images: CVE-2025-23267).
//!
//! Layout (native byte order, little-endian here): a 48-byte header (magic, version, entry
//! count, string table length, flags, extension offset), then 24-byte entries (flags, key
//! and value as offsets from the start of the file into the string table, an unused OS
//! version, hwcap), then the NUL-terminated strings. An older file may start with the
//! libc5-era `ld.so-1.7.0` table, which the new header then follows (aligned); that form is
//! read too.

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

/// A cache that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LdCacheError {
    #[error("not an ld.so.cache of glibc 2.32 or later (no glibc-ld.so.cache1.1 header)")]
    NotACache,
    #[error("the cache is cut short or inconsistent: {0}")]
    Truncated(&'static str),
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
}

//! The ELF shared-object stubs that stand in for the driver's libraries.

/// The ELF shared object stub of a library: the ELF header, a `PT_LOAD` covering the file at
/// address 0 and a `PT_DYNAMIC` whose dynamic section has `DT_NEEDED libc.so.6` (which makes
/// `ldconfig` file a 32-bit library as `libc6`, as a real one), `DT_SONAME`, `DT_STRTAB`,
/// `DT_STRSZ` and `DT_NULL`. 64-bit: x86-64 `ELFCLASS64`; 32-bit: `EM_386` `ELFCLASS32`.
/// Nothing in it can be run or linked against.
pub fn elf_stub(soname: &str, sixty_four: bool) -> Vec<u8> {
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    const DT_STRSZ: u64 = 10;
    const DT_SONAME: u64 = 14;

    let word = if sixty_four { 8 } else { 4 };
    let (ehsize, phentsize) = if sixty_four { (64, 56) } else { (52, 32) };
    let mut strtab = b"\0libc.so.6\0".to_vec();
    let needed = 1u64;
    let soname_at = strtab.len() as u64;
    strtab.extend_from_slice(soname.as_bytes());
    strtab.push(0);
    let dynamic = [
        (DT_NEEDED, needed),
        (DT_SONAME, soname_at),
        (DT_STRTAB, 0), // filled below
        (DT_STRSZ, strtab.len() as u64),
        (DT_NULL, 0),
    ];
    let phoff = ehsize;
    let dyn_at = phoff + 2 * phentsize;
    let dyn_size = dynamic.len() as u64 * 2 * word;
    let strtab_at = dyn_at + dyn_size;
    let total = strtab_at + strtab.len() as u64;

    let mut out = Vec::with_capacity(total as usize);
    let put_word = |out: &mut Vec<u8>, v: u64| {
        if sixty_four {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
    };
    // e_ident: magic, class, little-endian, version 1, System V ABI, padding.
    out.extend_from_slice(b"\x7fELF");
    out.extend_from_slice(&[if sixty_four { 2 } else { 1 }, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&3u16.to_le_bytes()); // e_type: ET_DYN
    out.extend_from_slice(&(if sixty_four { 62u16 } else { 3 }).to_le_bytes()); // EM_X86_64 / EM_386
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    put_word(&mut out, 0); // e_entry
    put_word(&mut out, phoff); // e_phoff
    put_word(&mut out, 0); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(ehsize as u16).to_le_bytes());
    out.extend_from_slice(&(phentsize as u16).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&(if sixty_four { 64u16 } else { 40 }).to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(out.len() as u64, ehsize);

    // (type, flags, offset = address, size, align)
    let segments = [
        (PT_LOAD, 4u32, 0u64, total, 0x1000u64),
        (PT_DYNAMIC, 6, dyn_at, dyn_size, word),
    ];
    for (p_type, flags, offset, size, align) in segments {
        out.extend_from_slice(&p_type.to_le_bytes());
        if sixty_four {
            out.extend_from_slice(&flags.to_le_bytes());
        }
        put_word(&mut out, offset); // p_offset
        put_word(&mut out, offset); // p_vaddr
        put_word(&mut out, offset); // p_paddr
        put_word(&mut out, size); // p_filesz
        put_word(&mut out, size); // p_memsz
        if !sixty_four {
            out.extend_from_slice(&flags.to_le_bytes());
        }
        put_word(&mut out, align);
    }
    debug_assert_eq!(out.len() as u64, dyn_at);

    for (tag, value) in dynamic {
        let value = if tag == DT_STRTAB { strtab_at } else { value };
        put_word(&mut out, tag);
        put_word(&mut out, value);
    }
    out.extend_from_slice(&strtab);
    debug_assert_eq!(out.len() as u64, total);
    out
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::process::Command;

    use super::*;
    use crate::gpu::scratch;

    #[test]
    fn the_elf_stubs_are_what_readelf_expects() {
        for sixty_four in [true, false] {
            let stub = elf_stub("libcuda.so.1", sixty_four);
            assert_eq!(&stub[..4], b"\x7fELF");
            assert_eq!(stub[4], if sixty_four { 2 } else { 1 });
            let dir = scratch(&format!("elf{}", u8::from(sixty_four)));
            fs::create_dir_all(&dir).unwrap();
            let path = dir.join("libcuda.so.1");
            fs::write(&path, &stub).unwrap();
            // binutils may be missing; the ldconfig test below is the real check.
            if let Ok(out) = Command::new("readelf").arg("-d").arg(&path).output() {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(text.contains("Library soname: [libcuda.so.1]"), "{text}");
                assert!(text.contains("Shared library: [libc.so.6]"), "{text}");
            }
            fs::remove_dir_all(&dir).unwrap();
        }
    }
}

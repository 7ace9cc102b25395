//! The compile cache: a guest is compiled once per content digest and wasmtime
//! compatibility hash, and later containers load the compiled artifact instead.
//!
//! An entry is `DIR/SHA256(wasm)-COMPAT.cwasm`: an 8-byte magic, the SHA-256 of the payload,
//! then the payload (`Engine::precompile_*`'s output). The checksum is verified before the
//! payload is used: deserializing compiled code is unsafe (it is mapped executable), so a
//! corrupt or truncated entry is recompiled, never run. A new wasmtime, or other engine
//! settings, change COMPAT, so stale entries are not even looked at.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::guest::GuestKind;

/// Where the shim keeps compiled guests.
pub const CACHE_DIR: &str = "/var/lib/hyperbox/wasm-cache";

const MAGIC: &[u8; 8] = b"HBWASM\x00\x01";
const HEADER: usize = MAGIC.len() + 32;

/// Errors of the compile cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot compile {name}: {message}")]
    Compile { name: String, message: String },
}

/// Where a guest's compiled artifact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Compiled,
    CacheHit,
}

/// A compiled guest, ready for `Module::deserialize` / `Component::deserialize`.
#[derive(Debug)]
pub struct Artifact {
    /// SHA-256 of the wasm binary, hex.
    pub digest: String,
    pub bytes: Vec<u8>,
    pub source: Source,
}

/// The on-disk cache.
#[derive(Debug, Clone)]
pub struct CompileCache {
    dir: PathBuf,
}

impl CompileCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CompileCache { dir: dir.into() }
    }

    /// The entry for the guest whose SHA-256 is `digest` (hex) under `engine`.
    pub fn entry_path(&self, engine: &wasmtime::Engine, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{digest}-{}.cwasm", compatibility(engine)))
    }

    /// The artifact of `wasm` (named `name` in messages), whose SHA-256 (hex) is `digest`:
    /// a verified cache entry, else compiled now and stored. A cache that cannot be written
    /// is logged, not fatal. The caller vouches for `digest`: a rootfs file's is computed
    /// here by [`sha256_hex`], an image layer's is its content digest, which the shim checked
    /// when it read the layer from containerd's content store.
    pub fn artifact(
        &self,
        engine: &wasmtime::Engine,
        name: &str,
        kind: GuestKind,
        digest: &str,
        wasm: &[u8],
    ) -> Result<Artifact, CacheError> {
        let digest = digest.to_string();
        let path = self.entry_path(engine, &digest);
        match read_entry(&path) {
            Ok(Some(bytes)) => {
                return Ok(Artifact {
                    digest,
                    bytes,
                    source: Source::CacheHit,
                })
            }
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(
                    entry = %path.display(),
                    "corrupt compile cache entry ({why}): recompiling"
                );
            }
        }
        let compiled = match kind {
            GuestKind::Module => engine.precompile_module(wasm),
            GuestKind::Component => engine.precompile_component(wasm),
        }
        .map_err(|e| CacheError::Compile {
            name: name.to_string(),
            message: format!("{e:#}"),
        })?;
        if let Err(e) = self.write_entry(&path, &compiled) {
            tracing::warn!(entry = %path.display(), "cannot store the compiled guest: {e}");
        }
        Ok(Artifact {
            digest,
            bytes: compiled,
            source: Source::Compiled,
        })
    }

    /// Writes an entry whole or not at all (a temporary file renamed over it), so that
    /// containers compiling the same guest at once never see a partial one.
    fn write_entry(&self, path: &Path, payload: &[u8]) -> std::io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&Sha256::digest(payload))?;
            f.write_all(payload)?;
            f.sync_data()?;
            fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// SHA-256 of `bytes`, hex: a guest's cache key.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The payload of a verified entry; `Ok(None)` when there is none, `Err` saying why an entry
/// cannot be trusted.
fn read_entry(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if data.len() < HEADER || &data[..MAGIC.len()] != MAGIC {
        return Err("no entry header".into());
    }
    let (sum, payload) = data[MAGIC.len()..].split_at(32);
    if Sha256::digest(payload).as_slice() != sum {
        return Err("checksum mismatch".into());
    }
    Ok(Some(payload.to_vec()))
}

/// wasmtime's compatibility hash of `engine` (its version and every setting that changes
/// compiled code), as SHA-256 hex: stable across runs, unlike `DefaultHasher`.
fn compatibility(engine: &wasmtime::Engine) -> String {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut h = Sha(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(h.0.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(tag: &str) -> CompileCache {
        let dir = std::env::temp_dir().join(format!("hb-wasm-cache-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        CompileCache::new(dir)
    }

    /// The artifact of module `wasm` (named `a.wasm`), compiled or from the cache.
    fn load(c: &CompileCache, engine: &wasmtime::Engine, wasm: &[u8]) -> Artifact {
        c.artifact(engine, "a.wasm", GuestKind::Module, &sha256_hex(wasm), wasm)
            .unwrap()
    }

    #[test]
    fn a_guest_is_compiled_once_then_read_back() {
        let engine = crate::runtime::engine().unwrap();
        let wasm = wat::parse_str("(module (func (export \"_start\")))").unwrap();
        let c = cache("once");
        let first = load(&c, &engine, &wasm);
        assert_eq!(first.source, Source::Compiled);
        let second = load(&c, &engine, &wasm);
        assert_eq!(second.source, Source::CacheHit);
        assert_eq!(first.bytes, second.bytes);
        assert_eq!(first.digest, hex::encode(Sha256::digest(&wasm)));
        fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn a_corrupt_or_truncated_entry_is_recompiled() {
        let engine = crate::runtime::engine().unwrap();
        let wasm = wat::parse_str("(module (func (export \"_start\")))").unwrap();
        let c = cache("corrupt");
        let good = load(&c, &engine, &wasm);
        let path = c.entry_path(&engine, &sha256_hex(&wasm));
        let mut data = fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 0xff;
        fs::write(&path, &data).unwrap();
        let again = load(&c, &engine, &wasm);
        assert_eq!(again.source, Source::Compiled);
        assert_eq!(again.bytes, good.bytes);
        // Rewritten whole: the next start is a hit again.
        fs::write(&path, &data[..20]).unwrap();
        let after_truncation = load(&c, &engine, &wasm);
        assert_eq!(after_truncation.source, Source::Compiled);
        let hit = load(&c, &engine, &wasm);
        assert_eq!(hit.source, Source::CacheHit);
        fs::remove_dir_all(&c.dir).unwrap();
    }

    #[test]
    fn an_invalid_binary_fails_naming_the_file() {
        let engine = crate::runtime::engine().unwrap();
        let c = cache("invalid");
        let err = c
            .artifact(
                &engine,
                "/bad.wasm",
                GuestKind::Module,
                &sha256_hex(b"\0asm\x01\0\0\0\xff"),
                b"\0asm\x01\0\0\0\xff",
            )
            .unwrap_err();
        assert!(
            err.to_string().starts_with("cannot compile /bad.wasm: "),
            "{err}"
        );
        let _ = fs::remove_dir_all(&c.dir);
    }
}

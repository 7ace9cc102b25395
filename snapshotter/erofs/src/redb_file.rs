//! Opening a redb database so that a crash while it is first created cannot leave a
//! file redb refuses.
//!
//! redb repairs a database that was being written when the process died, but not one
//! whose header was never completely written: `kill -9` during `Database::create` of a
//! new file leaves a short file that every later open rejects as invalid data. So a new
//! database is created under a temporary name, synced, and renamed into place; the
//! rename is the moment it exists.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use redb::Database;

/// Opens the database at `path`, creating it atomically if it does not exist.
/// The error is boxed because `redb::Error` is large.
pub fn open_or_create_redb(path: &Path) -> Result<Database, Box<redb::Error>> {
    if path.exists() {
        return Database::create(path).map_err(boxed);
    }
    create_new(path)?;
    Database::create(path).map_err(boxed)
}

fn boxed<E: Into<redb::Error>>(e: E) -> Box<redb::Error> {
    Box::new(e.into())
}

fn create_new(path: &Path) -> Result<(), Box<redb::Error>> {
    let tmp = temp_name(path);
    // A temporary left by an earlier crash was never renamed, so it holds nothing.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(boxed(e)),
    }
    drop(Database::create(&tmp).map_err(boxed)?);
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(boxed)?;
    std::fs::rename(&tmp, path).map_err(boxed)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir).and_then(|f| f.sync_all()).map_err(boxed)?;
    }
    Ok(())
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".creating");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_leftover_temporary_does_not_stop_creation() {
        let dir = std::env::temp_dir().join(format!("hb-redb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index.redb");
        // What a kill during the first create leaves: a few header bytes.
        std::fs::write(temp_name(&path), b"redb\x1a\x0a\xa9").unwrap();
        let db = open_or_create_redb(&path).unwrap();
        drop(db);
        assert!(!temp_name(&path).exists());
        // And the database opens again.
        drop(open_or_create_redb(&path).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

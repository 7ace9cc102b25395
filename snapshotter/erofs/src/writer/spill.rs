//! The spill file of an image being written: file data and chunk addresses gathered while
//! the tree is walked (or the archive read), read back while the image is streamed out.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{self, OFlag};
use nix::sys::stat::Mode;

use super::{io_err, std_io_err, ImageError};

/// Size of one spill record of a stored chunk: chunk number (8), device id (2), pad (2),
/// block address (4).
pub(crate) const SPILL_CHUNK_RECORD: usize = 16;

/// An unnamed temporary file beside the image: file data and chunk addresses gathered
/// during the walk, read back while the image is written.
pub(crate) struct Spill {
    w: BufWriter<File>,
    pub(crate) len: u64,
    path: PathBuf,
}

impl Spill {
    pub(crate) fn create(dir: &Path) -> Result<Self, ImageError> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let raw = fcntl::open(
            dir,
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .map_err(io_err("create a spill file in", dir))?;
        // SAFETY: `raw` was just returned by open and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(raw) };
        Ok(Self {
            w: BufWriter::with_capacity(1 << 16, file),
            len: 0,
            path: dir.join("(spill file)"),
        })
    }

    pub(crate) fn append(&mut self, data: &[u8]) -> Result<u64, ImageError> {
        let at = self.len;
        self.w
            .write_all(data)
            .map_err(std_io_err("write", &self.path))?;
        self.len += data.len() as u64;
        Ok(at)
    }

    /// Everything appended, flushed, for positioned reads.
    pub(crate) fn finish(self) -> Result<SpillReader, ImageError> {
        let path = self.path;
        let file = self
            .w
            .into_inner()
            .map_err(|e| std_io_err("write", &path)(e.into_error()))?;
        Ok(SpillReader { file, path })
    }
}

pub(crate) struct SpillReader {
    file: File,
    path: PathBuf,
}

impl SpillReader {
    pub(super) fn read(&self, buf: &mut [u8], at: u64) -> Result<(), ImageError> {
        self.file
            .read_exact_at(buf, at)
            .map_err(std_io_err("read", &self.path))
    }
}

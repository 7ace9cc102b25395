//! Mounting an image with its devices: the kernel's file-backed EROFS mount (Linux 6.12 and
//! later), or read-only loop devices for the image and every device as a fallback.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{umount2, MntFlags, MsFlags};

/// Errors of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("failed to {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused the mount (dmesg tells why, e.g. a device count that does not
    /// match the image's device table).
    #[error("failed to mount erofs image {image} with {devices} devices on {target}: {source}")]
    Mount {
        image: PathBuf,
        devices: usize,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The `device=` options do not fit in one 4096-byte mount data page.
    #[error("device options for {count} devices take {len} bytes, more than the 4095 a mount data page holds; use shorter pack paths or fewer packs")]
    OptionsTooLong { count: usize, len: usize },
    /// A device path cannot be passed as a mount option.
    #[error("device path {path} contains a comma, which the mount option parser splits on")]
    BadDevicePath { path: PathBuf },
    /// No free loop device could be configured.
    #[error("no free loop device for {path}")]
    NoLoopDevice { path: PathBuf },
}

/// How [`mount_image`] hands the files to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountMode {
    /// `mount(image, dir, "erofs")` on the files themselves (kernel 6.12 and later).
    FileBacked,
    /// A read-only loop device per file; the loop devices go away on unmount.
    LoopDevices,
    /// File-backed where the kernel supports it, loop devices where it answers that the
    /// source must be a block device (kernels before 6.12).
    Auto,
}

/// Builds the `device=A,device=B` mount data for these device paths.
pub fn device_options(devices: &[PathBuf]) -> Result<String, MountError> {
    let mut opts = String::new();
    for d in devices {
        let s = d.to_str().filter(|s| !s.contains(','));
        let Some(s) = s else {
            return Err(MountError::BadDevicePath { path: d.clone() });
        };
        if !opts.is_empty() {
            opts.push(',');
        }
        opts.push_str("device=");
        opts.push_str(s);
    }
    // The kernel copies one page of mount data, NUL included.
    if opts.len() >= 4096 {
        return Err(MountError::OptionsTooLong {
            count: devices.len(),
            len: opts.len(),
        });
    }
    Ok(opts)
}

/// A mounted image; unmounted by [`MountedImage::unmount`], or lazily on drop.
#[derive(Debug)]
pub struct MountedImage {
    target: PathBuf,
    loop_devices: Vec<PathBuf>,
    mounted: bool,
}

impl MountedImage {
    /// The mount point.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The loop devices behind the mount ([`MountMode::LoopDevices`]), image first.
    pub fn loop_devices(&self) -> &[PathBuf] {
        &self.loop_devices
    }

    /// Leaves the image mounted for good (a snapshotter's layer outlives its process): the
    /// mount is no longer unmounted on drop. Returns the mount point.
    pub fn keep_mounted(mut self) -> PathBuf {
        self.mounted = false;
        std::mem::take(&mut self.target)
    }

    /// Unmounts; the loop devices, if any, are released with it.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.mounted = false;
        umount2(&self.target, MntFlags::empty()).map_err(|e| MountError::Io {
            op: "unmount",
            path: self.target.clone(),
            source: e.into(),
        })
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = umount2(&self.target, MntFlags::MNT_DETACH) {
                tracing::warn!(target = %self.target.display(), error = %e, "lazy unmount failed");
            }
        }
    }
}

/// Mounts the EROFS `image` read-only on `target` with `devices` (in device id order: for a
/// [`crate::ChunkStore`] image, its [`crate::ChunkStore::pack_paths`]).
pub fn mount_image(
    image: &Path,
    devices: &[PathBuf],
    target: &Path,
    mode: MountMode,
) -> Result<MountedImage, MountError> {
    if mode == MountMode::Auto {
        return match mount_image(image, devices, target, MountMode::FileBacked) {
            Err(MountError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOTBLK) => {
                tracing::info!(image = %image.display(), "no file-backed erofs mounts here, using loop devices");
                mount_image(image, devices, target, MountMode::LoopDevices)
            }
            other => other,
        };
    }
    let mut loops = Vec::new();
    let mut loop_files = Vec::new();
    let (source, devs) = match mode {
        MountMode::FileBacked | MountMode::Auto => (image.to_path_buf(), devices.to_vec()),
        MountMode::LoopDevices => {
            for f in std::iter::once(image).chain(devices.iter().map(PathBuf::as_path)) {
                let (dev, file) = attach_loop(f)?;
                loops.push(dev);
                loop_files.push(file);
            }
            (loops[0].clone(), loops[1..].to_vec())
        }
    };
    let opts = device_options(&devs)?;
    let data = (!opts.is_empty()).then_some(opts.as_str());
    nix::mount::mount(
        Some(source.as_path()),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        data,
    )
    .map_err(|e| MountError::Mount {
        image: image.to_path_buf(),
        devices: devices.len(),
        target: target.to_path_buf(),
        source: io::Error::from(e),
    })?;
    // The loop devices auto-clear when their last user closes; the mount now holds them.
    drop(loop_files);
    tracing::debug!(image = %image.display(), target = %target.display(), ?mode, "mounted erofs image");
    Ok(MountedImage {
        target: target.to_path_buf(),
        loop_devices: loops,
        mounted: true,
    })
}

const LOOP_CTL_GET_FREE: libc::Ioctl = 0x4C82;
const LOOP_CONFIGURE: libc::Ioctl = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64` of `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Attaches `path` read-only to a free loop device with autoclear; the returned file keeps
/// the device alive until it is closed or something else opens it.
fn attach_loop(path: &Path) -> Result<(PathBuf, File), MountError> {
    let io = |op, p: &Path| {
        let p = p.to_path_buf();
        move |source| MountError::Io {
            op,
            path: p,
            source,
        }
    };
    let backing = File::open(path).map_err(io("open", path))?;
    let ctl_path = Path::new("/dev/loop-control");
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(ctl_path)
        .map_err(io("open", ctl_path))?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io("find a free loop device with", ctl_path)(
                io::Error::last_os_error(),
            ));
        }
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loop_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .map_err(io("open", &dev))?;
        let mut name = [0u8; 64];
        let bytes = path.as_os_str().as_bytes();
        let n = bytes.len().min(63);
        name[..n].copy_from_slice(&bytes[..n]);
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                lo_file_name: name,
                lo_crypt_name: [0; 64],
                lo_encrypt_key: [0; 32],
                lo_init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a `struct loop_config`, which `config` is laid out as
        // and outlives the call.
        let rc = unsafe { libc::ioctl(loop_file.as_raw_fd(), LOOP_CONFIGURE, &config) };
        if rc == 0 {
            return Ok((dev, loop_file));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(io("configure loop device", &dev)(err));
        }
        // Another process took this device between GET_FREE and CONFIGURE: try the next.
    }
    Err(MountError::NoLoopDevice {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options_join_and_check_the_page() {
        let devs = vec![PathBuf::from("/s/p0"), PathBuf::from("/s/p1")];
        assert_eq!(device_options(&devs).unwrap(), "device=/s/p0,device=/s/p1");
        assert!(matches!(
            device_options(&[PathBuf::from("/a,b")]),
            Err(MountError::BadDevicePath { .. })
        ));
        let long: Vec<PathBuf> = (0..40)
            .map(|i| PathBuf::from(format!("/{}/{i}", "x".repeat(100))))
            .collect();
        assert!(matches!(
            device_options(&long),
            Err(MountError::OptionsTooLong { .. })
        ));
    }
}

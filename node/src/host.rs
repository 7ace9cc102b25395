//! The real host behind [`crate::doctor::Host`].

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::doctor::{Host, Ran};

/// This machine, with containerd's `PATH` (the one its shims get) as `path`.
#[derive(Debug)]
pub struct RealHost {
    pub path: String,
}

impl Host for RealHost {
    fn read(&self, path: &Path) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn list(&self, path: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn run(&self, program: &str, args: &[&str]) -> Option<Ran> {
        let out = Command::new(program)
            .args(args)
            .env("PATH", &self.path)
            .output()
            .ok()?;
        Some(Ran {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn fs_type(&self, path: &Path) -> Option<String> {
        let c = CString::new(path.as_os_str().as_bytes()).ok()?;
        // SAFETY: statfs is plain data filled by the kernel.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a valid out pointer.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some(
            // The field's type differs between C libraries (glibc: i64, musl: u64).
            #[allow(clippy::unnecessary_cast)]
            match st.f_type as i64 {
                x if x == libc::CGROUP2_SUPER_MAGIC as i64 => "cgroup2",
                x if x == libc::TMPFS_MAGIC as i64 => "tmpfs",
                x if x == libc::CGROUP_SUPER_MAGIC as i64 => "cgroup",
                _ => "other",
            }
            .to_string(),
        )
    }

    fn erofs_file_backed_mount(&self) -> Result<(), String> {
        let dir = std::env::temp_dir().join(format!("hyperbox-node-erofs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let result = probe_erofs(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    fn userfaultfd(&self) -> Result<(), String> {
        // SAFETY: the syscall takes flags only and returns a new descriptor or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: the descriptor was just returned to us and is closed once.
        unsafe { libc::close(fd as i32) };
        Ok(())
    }

    fn connects(&self, path: &Path) -> bool {
        std::os::unix::net::UnixStream::connect(path).is_ok()
    }

    fn on_path(&self, name: &str) -> Option<PathBuf> {
        self.path
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .find(|p| {
                std::fs::metadata(p).is_ok_and(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
            })
    }
}

/// Writes an EROFS image of an empty directory with hyperbox-erofs and mounts it file-backed.
fn probe_erofs(dir: &Path) -> Result<(), String> {
    let tree = dir.join("tree");
    let target = dir.join("mnt");
    std::fs::create_dir_all(&tree).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&target).map_err(|e| e.to_string())?;
    std::fs::write(tree.join("probe"), b"hyperbox").map_err(|e| e.to_string())?;
    let image = dir.join("probe.erofs");
    let store = hyperbox_erofs::ChunkStore::open(
        &dir.join("store"),
        hyperbox_erofs::StoreConfig::default(),
    )
    .map_err(|e| format!("cannot make a test chunk store: {e}"))?;
    hyperbox_erofs::commit_layer(
        &store,
        "probe",
        &tree,
        &image,
        &hyperbox_erofs::ImageOptions::default(),
    )
    .map_err(|e| format!("cannot write a test image: {e}"))?;
    let mounted = hyperbox_erofs::mount_image(
        &image,
        &store.pack_paths(),
        &target,
        hyperbox_erofs::MountMode::FileBacked,
    )
    .map_err(|e| e.to_string())?;
    let read = std::fs::read(target.join("probe")).map_err(|e| e.to_string());
    mounted.unmount().map_err(|e| e.to_string())?;
    match read {
        Ok(data) if data == b"hyperbox" => Ok(()),
        Ok(_) => Err("the test image reads back wrong".into()),
        Err(e) => Err(e),
    }
}

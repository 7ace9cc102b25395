//! Mounting the rootfs containerd describes in Create at `BUNDLE/rootfs`, and unmounting it at
//! delete, as runc's shim does. Runs in the zygote.

use std::path::Path;

use hyperbox_shim_core::RootfsMount;
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mount options that are flags rather than filesystem data: (name, flag, clears it).
const FLAGS: &[(&str, MsFlags, bool)] = &[
    ("async", MsFlags::MS_SYNCHRONOUS, true),
    ("atime", MsFlags::MS_NOATIME, true),
    ("bind", MsFlags::MS_BIND, false),
    ("defaults", MsFlags::empty(), false),
    ("dev", MsFlags::MS_NODEV, true),
    ("diratime", MsFlags::MS_NODIRATIME, true),
    ("dirsync", MsFlags::MS_DIRSYNC, false),
    ("exec", MsFlags::MS_NOEXEC, true),
    ("mand", MsFlags::MS_MANDLOCK, false),
    ("noatime", MsFlags::MS_NOATIME, false),
    ("nodev", MsFlags::MS_NODEV, false),
    ("nodiratime", MsFlags::MS_NODIRATIME, false),
    ("noexec", MsFlags::MS_NOEXEC, false),
    ("nomand", MsFlags::MS_MANDLOCK, true),
    ("norelatime", MsFlags::MS_RELATIME, true),
    ("nostrictatime", MsFlags::MS_STRICTATIME, true),
    ("nosuid", MsFlags::MS_NOSUID, false),
    ("rbind", MsFlags::MS_BIND.union(MsFlags::MS_REC), false),
    ("relatime", MsFlags::MS_RELATIME, false),
    ("remount", MsFlags::MS_REMOUNT, false),
    ("ro", MsFlags::MS_RDONLY, false),
    ("rw", MsFlags::MS_RDONLY, true),
    ("strictatime", MsFlags::MS_STRICTATIME, false),
    ("suid", MsFlags::MS_NOSUID, true),
    ("sync", MsFlags::MS_SYNCHRONOUS, false),
];

/// Splits containerd mount options into mount flags and the data string.
pub fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match FLAGS.iter().find(|(name, _, _)| name == o) {
            Some((_, f, true)) => flags.remove(*f),
            Some((_, f, false)) => flags.insert(*f),
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mounts `mounts` one over the other at `target`.
pub fn mount_all(mounts: &[RootfsMount], target: &Path) -> Result<(), String> {
    if mounts.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(target)
        .map_err(|e| format!("cannot create rootfs mount point {}: {e}", target.display()))?;
    for (i, m) in mounts.iter().enumerate() {
        if let Err(e) = mount_one(m, target) {
            for _ in 0..i {
                let _ = umount2(target, MntFlags::MNT_DETACH);
            }
            return Err(e);
        }
    }
    Ok(())
}

fn mount_one(m: &RootfsMount, target: &Path) -> Result<(), String> {
    let (flags, data) = parse_options(&m.options);
    // Page-size limit of mount(2) data: long overlay lowerdir lists need the chdir trick
    // runc's shim uses, not done yet.
    if data.len() >= 4096 {
        return Err(format!(
            "rootfs mount options of {} bytes are too long (more than a page) for {}",
            data.len(),
            target.display()
        ));
    }
    let fstype = (!m.kind.is_empty() && m.kind != "bind").then_some(m.kind.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(m.source.as_str()), target, fstype, flags, data).map_err(|e| {
        format!(
            "cannot mount {} ({}) at {}: {e}",
            m.source,
            m.kind,
            target.display()
        )
    })?;
    // A read-only bind mount needs a remount to become read-only.
    if flags.contains(MsFlags::MS_BIND) && flags.contains(MsFlags::MS_RDONLY) {
        mount::<str, Path, str, str>(None, target, None, flags | MsFlags::MS_REMOUNT, None)
            .map_err(|e| format!("cannot make {} read-only: {e}", target.display()))?;
    }
    Ok(())
}

/// Unmounts everything mounted at `target`; nothing mounted there is fine.
pub fn unmount_all(target: &Path) -> Result<(), String> {
    for _ in 0..16 {
        match umount2(target, MntFlags::empty()) {
            Ok(()) => continue,
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) => {
                umount2(target, MntFlags::MNT_DETACH)
                    .map_err(|e| format!("cannot unmount {}: {e}", target.display()))?;
            }
            Err(e) => return Err(format!("cannot unmount {}: {e}", target.display())),
        }
    }
    Err(format!("{} stays mounted", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_options_split_into_flags_and_data() {
        let opts = [
            "index=off",
            "workdir=/w",
            "upperdir=/u",
            "lowerdir=/l1:/l2",
            "ro",
        ]
        .map(String::from);
        let (flags, data) = parse_options(&opts);
        assert_eq!(flags, MsFlags::MS_RDONLY);
        assert_eq!(data, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let opts = ["rbind", "ro", "rw", "nosuid"].map(String::from);
        let (flags, data) = parse_options(&opts);
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_NOSUID
        );
        assert!(data.is_empty());
    }
}

//! CRIU's options for a dump and for a restore, built from the container's spec, the
//! checkpoint's options (or the record of the dump, for a restore) and what the caller found
//! of the host and the container, passed in as plain values (see `probe`). Nothing here
//! touches the filesystem or runs a process: each case is a unit test.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::path::PathBuf;

use hyperbox_shim_core::{CheckpointSpec, RestoreSpec};
use libcontainer::oci_spec::runtime::{LinuxNamespaceType, Spec};
use rust_criu::rust_criu_protobuf::rpc;

use super::{Metadata, Stream, DUMP_LOG, EMPTY_TMPFS, MASKED_DIR, RESTORE_LOG};
use crate::error::YoukiError;

/// CRIU's log level: 4 is what runc uses (debug).
const LOG_LEVEL: i32 = 4;

/// The first fd CRIU inherits a namespace at (0-2 are the streams, 3 is CRIU's socket).
const FIRST_NAMESPACE_FD: RawFd = 4;

/// A checkpoint's options as CRIU takes them, checked before anything is probed: a spec that
/// asks for what CRIU cannot do is refused whatever the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DumpChoices {
    /// `exit`'s opposite: the container runs on after the dump.
    pub leave_running: bool,
    pub shell_job: bool,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub tcp_skip_in_flight: bool,
    /// CLONE_NEW* flags of the namespaces a restore creates empty.
    pub empty_ns: u32,
    pub cgroups_mode: Option<rpc::Criu_cg_mode>,
}

impl DumpChoices {
    pub(super) fn of(spec: &CheckpointSpec) -> Result<DumpChoices, YoukiError> {
        let empty_ns = empty_ns(&spec.empty_namespaces)?;
        let cgroups_mode = cg_mode(spec.cgroups_mode.as_deref())?;
        Ok(DumpChoices {
            leave_running: !spec.exit,
            shell_job: spec.terminal,
            tcp_established: spec.open_tcp,
            ext_unix_sk: spec.external_unix_sockets,
            file_locks: spec.file_locks,
            tcp_skip_in_flight: spec.skip_in_flight,
            empty_ns,
            cgroups_mode,
        })
    }
}

/// What is at a masked path of the spec inside the running container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Masked {
    /// Nothing (or nothing that could be read): left to CRIU.
    Missing,
    /// A file: `/dev/null` bound over it.
    File,
    /// A directory with a tmpfs of its own mounted on it (another device than its parent's).
    MountedDir,
    /// A directory of its parent's filesystem: left to CRIU.
    Dir,
}

/// What the caller of a dump found of the host and of the running container.
#[derive(Debug, Default)]
pub(super) struct DumpFacts {
    /// The container's init.
    pub pid: i32,
    /// The directories CRIU writes its images and its log in, open in the caller.
    pub images_dir_fd: RawFd,
    pub work_dir_fd: RawFd,
    /// The container's rootfs, CRIU's root.
    pub root: PathBuf,
    /// The freezer directory of the container's cgroup.
    pub freezer: PathBuf,
    /// The host's cgroup v1 hierarchies bound into the container (none on cgroup v2).
    pub v1_cgroup_mounts: Vec<String>,
    /// What is at each masked path of the spec inside the container; a path not here is
    /// [`Masked::Missing`].
    pub masked: BTreeMap<String, Masked>,
    /// The destinations of the spec's tmpfs mounts that are empty in the container, when it is
    /// frozen (nothing can write to them before CRIU has seen them); none when it is not.
    pub empty_tmpfs: Vec<String>,
    /// The namespaces the spec joins by path that CRIU leaves outside the images (network,
    /// pid), each with its inode.
    pub external_namespaces: Vec<(LinuxNamespaceType, u64)>,
    /// The init's standard streams that come from outside the container.
    pub stdio: [Option<Stream>; 3],
}

/// CRIU's options for a dump of the container of `oci` as `choices` say, and the record of it
/// kept beside the images for the restore.
pub(super) fn dump(
    choices: &DumpChoices,
    oci: &Spec,
    facts: DumpFacts,
) -> (rpc::Criu_opts, Metadata) {
    let mut meta = Metadata {
        shell_job: choices.shell_job,
        tcp_established: choices.tcp_established,
        ext_unix_sk: choices.ext_unix_sk,
        file_locks: choices.file_locks,
        empty_ns: choices.empty_ns,
        ..Default::default()
    };
    let mut opts = rpc::Criu_opts::new();
    opts.set_images_dir_fd(facts.images_dir_fd);
    opts.set_work_dir_fd(facts.work_dir_fd);
    opts.set_log_file(DUMP_LOG.into());
    opts.set_log_level(LOG_LEVEL);
    opts.set_pid(facts.pid);
    opts.set_root(facts.root.to_string_lossy().into_owned());
    opts.set_manage_cgroups(true);
    if let Some(mode) = choices.cgroups_mode {
        opts.set_manage_cgroups_mode(mode);
    }
    opts.set_freeze_cgroup(facts.freezer.to_string_lossy().into_owned());
    opts.set_leave_running(choices.leave_running);
    opts.set_orphan_pts_master(true);
    set_from_record(&mut opts, &meta);
    opts.set_tcp_skip_in_flight(choices.tcp_skip_in_flight);
    for (dest, _) in bind_mounts(oci) {
        opts.ext_mnt.push(ext_mount(&dest, &dest));
    }
    for point in &facts.v1_cgroup_mounts {
        opts.ext_mnt.push(ext_mount(point, point));
    }
    for path in masked_paths(oci) {
        match facts.masked.get(&path).copied().unwrap_or(Masked::Missing) {
            Masked::File => opts.ext_mnt.push(ext_mount(&path, "/dev/null")),
            Masked::MountedDir => {
                opts.ext_mnt.push(ext_mount(&path, MASKED_DIR));
                meta.masked_dirs = true;
            }
            Masked::Missing | Masked::Dir => {}
        }
    }
    for dest in facts.empty_tmpfs {
        opts.ext_mnt
            .push(ext_mount(&dest, &format!("{EMPTY_TMPFS}{dest}")));
        meta.empty_tmpfs.push(dest);
    }
    for (ns, ino) in facts.external_namespaces {
        opts.external
            .push(format!("{}[{ino}]:{}", ns_name(ns), ns_key(ns)));
    }
    for (n, stream) in facts.stdio.into_iter().enumerate() {
        if let Some(s) = stream.as_ref().filter(|s| s.key.starts_with("file[")) {
            if !opts.external.contains(&s.key) {
                opts.external.push(s.key.clone());
            }
        }
        meta.stdio[n] = stream;
    }
    (opts, meta)
}

/// What the caller of a restore prepared and found.
#[derive(Debug, Default)]
pub(super) struct RestoreFacts {
    /// The directories of CRIU's images and of its log, open in the caller.
    pub images_dir_fd: RawFd,
    pub work_dir_fd: RawFd,
    /// CRIU's root: a bind of the new container's rootfs.
    pub root: PathBuf,
    /// The host's cgroup v1 hierarchies bound into the container (none on cgroup v2).
    pub v1_cgroup_mounts: Vec<String>,
    /// The tmpfs mounts CRIU binds in place of external mounts of the dump: each external
    /// mount's name and where its tmpfs is mounted.
    pub fresh: Vec<(String, PathBuf)>,
}

/// What CRIU inherits at one fd of a restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Inherited {
    /// The new container's standard stream of the same number; `/dev/null` where `null` (the
    /// checkpoint's was `/dev/null`) or when no stream is given.
    Stream { null: bool },
    /// The namespace file at this path, which the spec joins.
    Namespace(PathBuf),
}

/// CRIU's options for a restore, and the fds the caller opens for it: `inherit[i]` is what
/// goes at the fd of `opts.inherit_fd[i]`.
#[derive(Debug)]
pub(super) struct Restore {
    pub opts: rpc::Criu_opts,
    pub inherit: Vec<(RawFd, Inherited)>,
}

/// CRIU's options for a restore into the new container of `oci` from a dump recorded as
/// `meta`; `console`: the restored terminal goes to a console socket. The cgroup roots are
/// added once CRIU runs ([`add_cgroup_roots`]).
pub(super) fn restore(
    oci: &Spec,
    from: &RestoreSpec,
    meta: &Metadata,
    console: bool,
    facts: RestoreFacts,
) -> Restore {
    let mut opts = rpc::Criu_opts::new();
    opts.set_lazy_pages(from.lazy);
    opts.set_images_dir_fd(facts.images_dir_fd);
    opts.set_work_dir_fd(facts.work_dir_fd);
    opts.set_log_file(RESTORE_LOG.into());
    opts.set_log_level(LOG_LEVEL);
    opts.set_root(facts.root.to_string_lossy().into_owned());
    opts.set_evasive_devices(true);
    // A checkpointed terminal's master was the shim's, outside the images: CRIU makes a new
    // pair and sends its master, which goes to the console socket.
    opts.set_orphan_pts_master(console);
    // CRIU sends that master only as a notification.
    opts.set_notify_scripts(console);
    // CRIU runs in the container's cgroup (`run_restore` puts it there as it starts), so the
    // restored processes, its children, are born there. CRIU's own cgroup restore (a yard of every hierarchy
    // mounted, the images' cgroups re-rooted under the new one) is needed only to give them a
    // cgroup namespace rooted there: without one in the spec it is skipped, which takes a
    // mount per hierarchy off each restore.
    opts.set_manage_cgroups(namespace_in(oci, LinuxNamespaceType::Cgroup));
    set_from_record(&mut opts, meta);
    for (dest, source) in bind_mounts(oci) {
        opts.ext_mnt.push(ext_mount(&dest, &source));
    }
    for point in &facts.v1_cgroup_mounts {
        opts.ext_mnt.push(ext_mount(point, point));
    }
    if !masked_paths(oci).is_empty() {
        opts.ext_mnt.push(ext_mount("/dev/null", "/dev/null"));
    }
    for (key, dir) in &facts.fresh {
        opts.ext_mnt.push(ext_mount(key, &dir.to_string_lossy()));
    }

    // The fds CRIU inherits: the streams at 0-2 (where the images have external ones), then
    // namespaces to take as they are, from 4 on (3 is CRIU's socket). Streams that shared one
    // file in the container (stdout and stderr on one pipe, or all three on /dev/null) come
    // back as one file: the new stream of the first of them.
    let mut inherit = Vec::new();
    for (n, stream) in meta.stdio.iter().enumerate() {
        let Some(stream) = stream else { continue };
        if opts.inherit_fd.iter().any(|i| i.key() == stream.key) {
            continue;
        }
        let mut fd = rpc::Inherit_fd::new();
        fd.set_key(stream.key.clone());
        fd.set_fd(n as RawFd);
        opts.inherit_fd.push(fd);
        inherit.push((n as RawFd, Inherited::Stream { null: stream.null }));
    }
    let mut next = FIRST_NAMESPACE_FD;
    for ns in [
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        let Some(path) = namespace_path(oci, ns) else {
            continue;
        };
        if matches!(ns, LinuxNamespaceType::Network | LinuxNamespaceType::Pid) {
            let mut fd = rpc::Inherit_fd::new();
            fd.set_key(ns_key(ns));
            fd.set_fd(next);
            opts.inherit_fd.push(fd);
            inherit.push((next, Inherited::Namespace(path)));
            next += 1;
        } else {
            let mut join = rpc::Join_namespace::new();
            join.set_ns(ns_name(ns).into());
            join.set_ns_file(path.to_string_lossy().into_owned());
            opts.join_ns.push(join);
        }
    }
    Restore { opts, inherit }
}

/// Re-roots the images' cgroups onto those CRIU runs in (runc's criuApplyCgroups): `roots`,
/// each controller (empty on cgroup v2) and its path, as `/proc/PID/cgroup` gives them.
pub(super) fn add_cgroup_roots(opts: &mut rpc::Criu_opts, roots: Vec<(String, String)>) {
    for (ctrl, path) in roots {
        let mut root = rpc::Cgroup_root::new();
        if !ctrl.is_empty() {
            root.set_ctrl(ctrl);
        }
        root.set_path(path);
        opts.cg_root.push(root);
    }
}

/// The options a restore takes from the record of the dump, as the dump set them.
fn set_from_record(opts: &mut rpc::Criu_opts, meta: &Metadata) {
    opts.set_shell_job(meta.shell_job);
    opts.set_tcp_established(meta.tcp_established);
    opts.set_ext_unix_sk(meta.ext_unix_sk);
    opts.set_file_locks(meta.file_locks);
    skip_network_lock(opts, meta.tcp_established);
    if meta.empty_ns != 0 {
        opts.set_empty_ns(meta.empty_ns);
    }
}

/// CRIU locks the container's network (iptables rules in its namespace, two tools run to
/// add them and two to remove them) so that no TCP peer sees a connection being dumped or
/// restored. Without established connections there is nothing to protect: the lock is
/// skipped, which takes tens of milliseconds off each dump and restore.
fn skip_network_lock(opts: &mut rpc::Criu_opts, tcp_established: bool) {
    if !tcp_established {
        opts.set_network_lock(rpc::Criu_network_lock_method::SKIP);
    }
}

fn cg_mode(mode: Option<&str>) -> Result<Option<rpc::Criu_cg_mode>, YoukiError> {
    Ok(match mode {
        None => None,
        Some("soft") => Some(rpc::Criu_cg_mode::SOFT),
        Some("full") => Some(rpc::Criu_cg_mode::FULL),
        Some("strict") => Some(rpc::Criu_cg_mode::STRICT),
        Some("ignore") => Some(rpc::Criu_cg_mode::IGNORE),
        Some(other) => {
            return Err(YoukiError::invalid(format!(
                "unknown CRIU cgroup mode {other:?}"
            )))
        }
    })
}

fn empty_ns(names: &[String]) -> Result<u32, YoukiError> {
    let mut mask = 0;
    for n in names {
        match n.as_str() {
            "network" => mask |= libc::CLONE_NEWNET as u32,
            other => {
                return Err(YoukiError::invalid(format!(
                    "CRIU cannot create the {other} namespace empty (only network)"
                )))
            }
        }
    }
    Ok(mask)
}

fn ext_mount(key: &str, val: &str) -> rpc::Ext_mount_map {
    let mut m = rpc::Ext_mount_map::new();
    m.set_key(key.to_string());
    m.set_val(val.to_string());
    m
}

/// The spec's bind mounts: destination and source.
fn bind_mounts(spec: &Spec) -> Vec<(String, String)> {
    spec.mounts()
        .iter()
        .flatten()
        .filter(|m| libcontainer::rootfs::utils::is_bind(m))
        .map(|m| {
            (
                m.destination().to_string_lossy().into_owned(),
                m.source()
                    .as_ref()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

pub(super) fn masked_paths(spec: &Spec) -> Vec<String> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.masked_paths().clone())
        .unwrap_or_default()
}

pub(super) fn namespace_path(spec: &Spec, t: LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == t)?
        .path()
        .clone()
}

/// Whether the spec gives the container a namespace of type `t` (new or joined).
fn namespace_in(spec: &Spec, t: LinuxNamespaceType) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == t))
}

fn ns_name(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Network => "net",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Mount => "mnt",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Time => "time",
    }
}

/// runc's key for an external namespace: `extRootNetNS`, `extRootPidNS`.
fn ns_key(t: LinuxNamespaceType) -> String {
    rust_criu::criu_ns_to_key(ns_name(t))
}

#[cfg(test)]
mod tests;

//! Runtime options in Create (`CreateTaskRequest.options`): what engines send, decoded and
//! checked once, so that an engine sees only what it is asked to honour.
//!
//! Two messages arrive here: runc's `containerd.runc.v1.Options` (Docker, nerdctl, CRI's runc
//! runtime config) and CRI's `runtimeoptions.v1.Options` (CRI's config for other runtimes).
//! What does not apply to this shim is ignored with a debug log (`binary_name` names runc's
//! binary); what cannot be honoured is refused, before anything is created.

use std::fs;
use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;

use crate::error::ShimError;
use crate::stdio::IoOwner;

/// runc's options (`containerd.runc.v1.Options`), as `containerd-shim`'s protos define them.
/// Their field 8, `criu_path`, which containerd 2.0 removed and 1.x clients still send, is
/// read from the message's unknown fields ([`criu_path`]).
pub use containerd_shim::protos::shim::oci::Options as RuncOptions;

/// runc's checkpoint options (`containerd.runc.v1.CheckpointOptions`), sent in Checkpoint by
/// clients that ask for more than containerd's defaults; [`checkpoint_options`] decodes and
/// checks them.
pub use containerd_shim::protos::shim::oci::CheckpointOptions;

/// CRI's options for runtimes other than runc (`api/types/runtimeoptions/v1/api.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CriOptions {
    /// The type of the runtime's own options, in the file at `config_path`.
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(string, tag = "2")]
    pub config_path: String,
}

impl prost::Name for CriOptions {
    const NAME: &'static str = "Options";
    const PACKAGE: &'static str = "runtimeoptions.v1";
}

/// The legacy runtime's create options (`containerd.linux.runc.CreateOptions`,
/// `runtime/linux/runctypes/runc.proto`). containerd's Go client 1.6/1.7 sends these, not
/// [`RuncOptions`], to every runtime whose name does not start with `io.containerd.runc`
/// (`WithShimCgroup`, user-namespace IO ownership, `WithRestoreImagePath`, ...).
#[derive(Clone, PartialEq, prost::Message)]
pub struct LegacyCreateOptions {
    #[prost(bool, tag = "1")]
    pub no_pivot_root: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(bool, tag = "8")]
    pub no_new_keyring: bool,
    #[prost(string, tag = "9")]
    pub shim_cgroup: String,
    #[prost(uint32, tag = "10")]
    pub io_uid: u32,
    #[prost(uint32, tag = "11")]
    pub io_gid: u32,
    #[prost(string, tag = "12")]
    pub criu_work_path: String,
    #[prost(string, tag = "13")]
    pub criu_image_path: String,
}

impl prost::Name for LegacyCreateOptions {
    const NAME: &'static str = "CreateOptions";
    const PACKAGE: &'static str = "containerd.linux.runc";
}

/// The legacy runtime's checkpoint options (`containerd.linux.runc.CheckpointOptions`), which
/// the Go client sends to runtimes not named `io.containerd.runc*`
/// (`WithCheckpointImagePath`, `WithCheckpointExit`, ...). Its image and work paths are
/// numbered the other way round from [`CheckpointOptions`]'.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LegacyCheckpointOptions {
    #[prost(bool, tag = "1")]
    pub exit: bool,
    #[prost(bool, tag = "2")]
    pub open_tcp: bool,
    #[prost(bool, tag = "3")]
    pub external_unix_sockets: bool,
    #[prost(bool, tag = "4")]
    pub terminal: bool,
    #[prost(bool, tag = "5")]
    pub file_locks: bool,
    #[prost(string, repeated, tag = "6")]
    pub empty_namespaces: Vec<String>,
    #[prost(string, tag = "7")]
    pub cgroups_mode: String,
    #[prost(string, tag = "8")]
    pub work_path: String,
    #[prost(string, tag = "9")]
    pub image_path: String,
}

impl prost::Name for LegacyCheckpointOptions {
    const NAME: &'static str = "CheckpointOptions";
    const PACKAGE: &'static str = "containerd.linux.runc";
}

impl From<LegacyCheckpointOptions> for CheckpointOptions {
    fn from(o: LegacyCheckpointOptions) -> Self {
        CheckpointOptions {
            exit: o.exit,
            open_tcp: o.open_tcp,
            external_unix_sockets: o.external_unix_sockets,
            terminal: o.terminal,
            file_locks: o.file_locks,
            empty_namespaces: o.empty_namespaces,
            cgroups_mode: o.cgroups_mode,
            image_path: o.image_path,
            work_path: o.work_path,
            ..Default::default()
        }
    }
}

const CHECKPOINT_OPTIONS: &str = "containerd.runc.v1.CheckpointOptions";
const LEGACY_CHECKPOINT_OPTIONS: &str = "containerd.linux.runc.CheckpointOptions";

/// The cgroup modes CRIU takes (runc's `--manage-cgroups-mode`).
const CGROUPS_MODES: [&str; 4] = ["soft", "full", "strict", "ignore"];

/// Decodes and checks the options of a Checkpoint; `None` gives the defaults (leave running,
/// nothing optional).
pub fn checkpoint_options(any: Option<&Any>) -> Result<CheckpointOptions, ShimError> {
    let Some(any) = any else {
        return Ok(CheckpointOptions::default());
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let o: CheckpointOptions = match name {
        CHECKPOINT_OPTIONS => decode_protobuf(name, &any.value)?,
        LEGACY_CHECKPOINT_OPTIONS => decode::<LegacyCheckpointOptions>(name, &any.value)?.into(),
        _ => {
            return Err(ShimError::InvalidArgument(format!(
                "unsupported checkpoint options type {:?}: this shim takes \
                     {CHECKPOINT_OPTIONS} or {LEGACY_CHECKPOINT_OPTIONS}",
                any.type_url
            )))
        }
    };
    if !o.cgroups_mode.is_empty() && !CGROUPS_MODES.contains(&o.cgroups_mode.as_str()) {
        return Err(ShimError::InvalidArgument(format!(
            "checkpoint option cgroups_mode {:?} is not one of {}",
            o.cgroups_mode,
            CGROUPS_MODES.join(", ")
        )));
    }
    if let Some(ns) = o.empty_namespaces.iter().find(|n| n.as_str() != "network") {
        return Err(ShimError::InvalidArgument(format!(
            "checkpoint option empty_namespaces names {ns:?}: CRIU creates only the \
                 network namespace empty"
        )));
    }
    for (field, path) in [("image_path", &o.image_path), ("work_path", &o.work_path)] {
        if !path.is_empty() && !Path::new(path).is_absolute() {
            return Err(ShimError::InvalidArgument(format!(
                "checkpoint option {field} {path:?} is not an absolute path"
            )));
        }
    }
    Ok(o)
}

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
const CRI_OPTIONS: &str = "runtimeoptions.v1.Options";
const LEGACY_CREATE_OPTIONS: &str = "containerd.linux.runc.CreateOptions";

/// What the engine is asked to honour, from the runtime options. The default is what the shim
/// does without options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    /// Where the engine keeps container state instead of its default: runc's `root`. As
    /// under runc's shim, a container's state is then `ROOT/NAMESPACE/ID`.
    pub state_root: Option<PathBuf>,
    /// Cgroups through systemd rather than cgroupfs; only set when systemd runs the host.
    pub systemd_cgroup: bool,
    /// Move the rootfs with `MS_MOVE` and `chroot` instead of `pivot_root` (runc's
    /// `no_pivot_root`, for rootfs on ramfs).
    pub no_pivot_root: bool,
    /// Restore from the CRIU images in this directory (runc's `criu_image_path`), when the
    /// Create carries no checkpoint of its own.
    pub criu_image_path: Option<PathBuf>,
    /// CRIU's work directory for a restore (runc's `criu_work_path`).
    pub criu_work_path: Option<PathBuf>,
    /// The cgroup the shim (and its helpers) move into (runc's `shim_cgroup`): a path below
    /// the cgroup root, as runc's shim takes it.
    pub shim_cgroup: Option<PathBuf>,
    /// Who owns the pipes of the container's processes (runc's `io_uid` and `io_gid`).
    pub io_owner: Option<IoOwner>,
}

impl RuntimeOptions {
    /// Decodes and checks the options of a Create; `None` gives the defaults.
    pub fn from_any(any: Option<&Any>) -> Result<Self, ShimError> {
        // `ctr container restore` sends the runtime options its checkpoint recorded: for a
        // runtime without options, an empty message of no type.
        let Some(any) = any.filter(|a| !(a.type_url.is_empty() && a.value.is_empty())) else {
            return Ok(Self::default());
        };
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        match name {
            RUNC_OPTIONS => Self::from_runc(decode_protobuf(name, &any.value)?, &Host),
            CRI_OPTIONS => Self::from_cri(decode(name, &any.value)?),
            LEGACY_CREATE_OPTIONS => Self::from_runc(from_legacy(decode(name, &any.value)?), &Host),
            _ => Err(ShimError::InvalidArgument(format!(
                "unsupported runtime options type {:?}: this shim takes {RUNC_OPTIONS}, \
                 {LEGACY_CREATE_OPTIONS} or {CRI_OPTIONS}",
                any.type_url
            ))),
        }
    }

    fn from_runc(o: RuncOptions, host: &dyn HostFacts) -> Result<Self, ShimError> {
        let refuse = |what: String| Err(ShimError::FailedPrecondition(what));
        if !o.binary_name.is_empty() {
            tracing::debug!(
                binary_name = o.binary_name,
                "ignored: this shim runs no binary"
            );
        }
        if let Some(path) = criu_path(&o) {
            return refuse(format!(
                "runtime option criu_path ({path}) cannot be honoured: this shim runs the criu \
                 found on containerd's PATH; remove it from the runtime options"
            ));
        }
        if o.no_new_keyring {
            return refuse(
                "runtime option no_new_keyring cannot be honoured: libcontainer always \
                 creates a session keyring; remove it from the runtime options"
                    .into(),
            );
        }
        let shim_cgroup = match o.shim_cgroup.as_str() {
            "" => None,
            path => Some(cgroup_path(path)?),
        };
        // As runc's shim: the pipes belong to these ids when either is set.
        let io_owner = (o.io_uid != 0 || o.io_gid != 0).then_some(IoOwner {
            uid: o.io_uid,
            gid: o.io_gid,
        });
        if !o.task_api_address.is_empty() {
            return refuse(format!(
                "runtime option task_api_address ({}) cannot be honoured: this shim serves \
                 its own task API",
                o.task_api_address
            ));
        }
        if o.systemd_cgroup && !host.systemd_running() {
            return refuse(format!(
                "SystemdCgroup requested but systemd is not running (PID 1 is {}); set \
                 SystemdCgroup = false in the runtime options to use cgroupfs",
                host.pid1_name()
            ));
        }
        let state_root = match o.root.as_str() {
            "" => None,
            root if Path::new(root).is_absolute() => Some(PathBuf::from(root)),
            root => {
                return Err(ShimError::InvalidArgument(format!(
                    "runtime option root {root:?} is not an absolute path"
                )))
            }
        };
        let absolute = |field: &str, path: &str| match path {
            "" => Ok(None),
            p if Path::new(p).is_absolute() => Ok(Some(PathBuf::from(p))),
            p => Err(ShimError::InvalidArgument(format!(
                "runtime option {field} {p:?} is not an absolute path"
            ))),
        };
        Ok(Self {
            state_root,
            systemd_cgroup: o.systemd_cgroup,
            no_pivot_root: o.no_pivot_root,
            criu_image_path: absolute("criu_image_path", &o.criu_image_path)?,
            criu_work_path: absolute("criu_work_path", &o.criu_work_path)?,
            shim_cgroup,
            io_owner,
        })
    }

    fn from_cri(o: CriOptions) -> Result<Self, ShimError> {
        if !o.config_path.is_empty() {
            return Err(ShimError::FailedPrecondition(format!(
                "runtime option config_path ({}) cannot be honoured: this shim reads no \
                 configuration file; remove ConfigPath from the runtime's options",
                o.config_path
            )));
        }
        if !o.type_url.is_empty() {
            tracing::debug!(
                type_url = o.type_url,
                "ignored: no configuration file to read"
            );
        }
        Ok(Self::default())
    }
}

/// The legacy create options as the [`RuncOptions`] fields they stand for. What they carry
/// for a restore (`open_tcp`, `external_unix_sockets`, `terminal`, `file_locks`,
/// `empty_namespaces`, `cgroups_mode`) has no counterpart there: a restore takes those from
/// its checkpoint's record, so they are ignored, with a debug log.
fn from_legacy(o: LegacyCreateOptions) -> RuncOptions {
    if o.open_tcp
        || o.external_unix_sockets
        || o.terminal
        || o.file_locks
        || !o.empty_namespaces.is_empty()
        || !o.cgroups_mode.is_empty()
    {
        tracing::debug!(
            "ignored: restore options of {LEGACY_CREATE_OPTIONS} (the checkpoint's record decides)"
        );
    }
    RuncOptions {
        no_pivot_root: o.no_pivot_root,
        no_new_keyring: o.no_new_keyring,
        shim_cgroup: o.shim_cgroup,
        io_uid: o.io_uid,
        io_gid: o.io_gid,
        criu_work_path: o.criu_work_path,
        criu_image_path: o.criu_image_path,
        ..Default::default()
    }
}

/// A cgroup path as runc's `shim_cgroup` takes it, relative to each hierarchy's root: made
/// only of plain names (no `.` or `..`, which would leave the cgroup filesystem).
fn cgroup_path(path: &str) -> Result<PathBuf, ShimError> {
    let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
    if names.is_empty() || names.iter().any(|n| *n == "." || *n == "..") {
        return Err(ShimError::InvalidArgument(format!(
            "runtime option shim_cgroup {path:?} is not a cgroup path (/NAME/...) of plain names"
        )));
    }
    Ok(PathBuf::from(format!("/{}", names.join("/"))))
}

/// runc's `criu_path` (field 8 of its options), when a 1.x client sent one: containerd 2.0
/// removed the field, and the protos this shim is built with mark it reserved.
pub fn criu_path(o: &RuncOptions) -> Option<String> {
    use containerd_shim::protos::protobuf::UnknownValueRef;
    match o.special_fields.unknown_fields().get(8)? {
        UnknownValueRef::LengthDelimited(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
    .filter(|p| !p.is_empty())
}

/// Decodes a message of the protos `containerd-shim` ships (runc's options).
fn decode_protobuf<M: containerd_shim::protos::protobuf::Message>(
    name: &str,
    bytes: &[u8],
) -> Result<M, ShimError> {
    M::parse_from_bytes(bytes).map_err(|e| {
        ShimError::InvalidArgument(format!("cannot decode runtime options {name}: {e}"))
    })
}

fn decode<M: prost::Message + Default>(name: &str, bytes: &[u8]) -> Result<M, ShimError> {
    M::decode(bytes).map_err(|e| {
        ShimError::InvalidArgument(format!("cannot decode runtime options {name}: {e}"))
    })
}

/// What the checks need to know about the host, behind a trait for the unit tests.
trait HostFacts {
    fn systemd_running(&self) -> bool;
    fn pid1_name(&self) -> String;
}

struct Host;

impl HostFacts for Host {
    /// As `sd_booted(3)` decides it.
    fn systemd_running(&self) -> bool {
        Path::new("/run/systemd/system").is_dir()
    }

    fn pid1_name(&self) -> String {
        fs::read_to_string("/proc/1/comm")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|e| format!("unknown: cannot read /proc/1/comm: {e}"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use containerd_shim::protos::protobuf::Message as _;
    use containerd_shim::protos::ttrpc::Code;
    use prost::Message as _;

    use super::*;

    struct NoSystemd;

    impl HostFacts for NoSystemd {
        fn systemd_running(&self) -> bool {
            false
        }
        fn pid1_name(&self) -> String {
            "tini".into()
        }
    }

    /// runc's options with field 8, `criu_path`, as a containerd 1.x client sends it.
    pub(crate) fn with_criu_path(path: &str) -> RuncOptions {
        let mut o = RuncOptions::default();
        o.special_fields
            .mut_unknown_fields()
            .add_length_delimited(8, path.as_bytes().to_vec());
        o
    }

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        let mut a = Any::new();
        a.type_url = type_url.into();
        a.value = value;
        a
    }

    #[test]
    fn no_options_are_the_defaults() {
        assert_eq!(
            RuntimeOptions::from_any(None).unwrap(),
            RuntimeOptions::default()
        );
    }

    #[test]
    fn runc_root_becomes_the_state_root_and_binary_name_is_ignored() {
        let o = RuncOptions {
            root: "/run/elsewhere".into(),
            binary_name: "/usr/bin/runc".into(),
            ..Default::default()
        };
        for url in [
            RUNC_OPTIONS,
            "type.googleapis.com/containerd.runc.v1.Options",
        ] {
            let got =
                RuntimeOptions::from_any(Some(&any(url, o.write_to_bytes().unwrap()))).unwrap();
            assert_eq!(
                got.state_root,
                Some(PathBuf::from("/run/elsewhere")),
                "{url}"
            );
        }
    }

    #[test]
    fn systemd_cgroup_without_systemd_is_refused_naming_pid1() {
        let o = RuncOptions {
            systemd_cgroup: true,
            ..Default::default()
        };
        let e = RuntimeOptions::from_runc(o, &NoSystemd).unwrap_err();
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert!(
            e.to_string()
                .starts_with("SystemdCgroup requested but systemd is not running (PID 1 is tini)"),
            "{e}"
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_naming_the_option() {
        let cases = [
            (with_criu_path("/usr/sbin/criu"), "criu_path"),
            (
                RuncOptions {
                    no_new_keyring: true,
                    ..Default::default()
                },
                "no_new_keyring",
            ),
        ];
        for (o, field) in cases {
            let e = RuntimeOptions::from_runc(o, &NoSystemd).unwrap_err();
            assert_eq!(e.code(), Code::FAILED_PRECONDITION, "{e}");
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = RuntimeOptions::from_runc(
            RuncOptions {
                root: "relative".into(),
                ..Default::default()
            },
            &NoSystemd,
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
    }

    #[test]
    fn io_ids_give_the_pipes_an_owner() {
        let owner = |io_uid, io_gid| {
            let o = RuncOptions {
                io_uid,
                io_gid,
                ..Default::default()
            };
            RuntimeOptions::from_runc(o, &NoSystemd).unwrap().io_owner
        };
        assert_eq!(owner(0, 0), None);
        assert_eq!(
            owner(100000, 100000),
            Some(IoOwner {
                uid: 100000,
                gid: 100000
            })
        );
        assert_eq!(owner(0, 5), Some(IoOwner { uid: 0, gid: 5 }));
    }

    #[test]
    fn shim_cgroup_is_taken_as_a_path_of_plain_names() {
        for (given, taken) in [("/shims", "/shims"), ("pods/a/shim", "/pods/a/shim")] {
            let o = RuncOptions {
                shim_cgroup: given.into(),
                ..Default::default()
            };
            let got = RuntimeOptions::from_runc(o, &NoSystemd).unwrap();
            assert_eq!(got.shim_cgroup, Some(PathBuf::from(taken)));
        }
        for bad in ["/", "/a/../../etc", "/a/./b"] {
            let o = RuncOptions {
                shim_cgroup: bad.into(),
                ..Default::default()
            };
            let e = RuntimeOptions::from_runc(o, &NoSystemd).unwrap_err();
            assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{bad}: {e}");
        }
    }

    #[test]
    fn the_legacy_families_mean_what_their_runc_v1_fields_mean() {
        let legacy = LegacyCreateOptions {
            no_pivot_root: true,
            shim_cgroup: "/shims/a".into(),
            criu_image_path: "/images".into(),
            criu_work_path: "/work".into(),
            open_tcp: true,
            ..Default::default()
        };
        let url = "type.googleapis.com/containerd.linux.runc.CreateOptions";
        let got = RuntimeOptions::from_any(Some(&any(url, legacy.encode_to_vec()))).unwrap();
        assert_eq!(
            got,
            RuntimeOptions {
                no_pivot_root: true,
                shim_cgroup: Some(PathBuf::from("/shims/a")),
                criu_image_path: Some(PathBuf::from("/images")),
                criu_work_path: Some(PathBuf::from("/work")),
                ..Default::default()
            }
        );
        // What runc.v1 refuses, the legacy family's field is refused for, naming it.
        let keyring = LegacyCreateOptions {
            no_new_keyring: true,
            ..Default::default()
        };
        let e = RuntimeOptions::from_any(Some(&any(url, keyring.encode_to_vec()))).unwrap_err();
        assert!(e.to_string().contains("no_new_keyring"), "{e}");

        // Checkpoint: image and work paths come from their own (swapped) field numbers.
        let legacy = LegacyCheckpointOptions {
            exit: true,
            image_path: "/img".into(),
            work_path: "/wrk".into(),
            ..Default::default()
        };
        let url = "type.googleapis.com/containerd.linux.runc.CheckpointOptions";
        let got = checkpoint_options(Some(&any(url, legacy.encode_to_vec()))).unwrap();
        assert_eq!(
            got,
            CheckpointOptions {
                exit: true,
                image_path: "/img".into(),
                work_path: "/wrk".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn criu_paths_are_taken_for_a_restore() {
        let o = RuncOptions {
            criu_image_path: "/images".into(),
            criu_work_path: "/work".into(),
            ..Default::default()
        };
        let got = RuntimeOptions::from_runc(o, &NoSystemd).unwrap();
        assert_eq!(got.criu_image_path, Some(PathBuf::from("/images")));
        assert_eq!(got.criu_work_path, Some(PathBuf::from("/work")));
        let e = RuntimeOptions::from_runc(
            RuncOptions {
                criu_image_path: "images".into(),
                ..Default::default()
            },
            &NoSystemd,
        )
        .unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
    }

    #[test]
    fn checkpoint_options_are_decoded_and_checked() {
        assert_eq!(
            checkpoint_options(None).unwrap(),
            CheckpointOptions::default()
        );
        let o = CheckpointOptions {
            exit: true,
            image_path: "/img".into(),
            cgroups_mode: "soft".into(),
            empty_namespaces: vec!["network".into()],
            ..Default::default()
        };
        let got = checkpoint_options(Some(&any(CHECKPOINT_OPTIONS, o.write_to_bytes().unwrap())))
            .unwrap();
        assert_eq!(got, o);
        let bad = [
            (
                CheckpointOptions {
                    cgroups_mode: "hard".into(),
                    ..Default::default()
                },
                "hard",
            ),
            (
                CheckpointOptions {
                    empty_namespaces: vec!["pid".into()],
                    ..Default::default()
                },
                "pid",
            ),
            (
                CheckpointOptions {
                    work_path: "rel".into(),
                    ..Default::default()
                },
                "work_path",
            ),
        ];
        for (o, named) in bad {
            let e = checkpoint_options(Some(&any(CHECKPOINT_OPTIONS, o.write_to_bytes().unwrap())))
                .unwrap_err();
            assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
            assert!(e.to_string().contains(named), "{e}");
        }
        let e = checkpoint_options(Some(&any(RUNC_OPTIONS, vec![]))).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT, "{e}");
    }

    #[test]
    fn cri_options_without_a_config_file_are_the_defaults() {
        let empty = CriOptions {
            type_url: String::new(),
            config_path: String::new(),
        };
        let got = RuntimeOptions::from_any(Some(&any(CRI_OPTIONS, empty.encode_to_vec())));
        assert_eq!(got.unwrap(), RuntimeOptions::default());
        let with_file = CriOptions {
            type_url: "x".into(),
            config_path: "/etc/hyperbox.toml".into(),
        };
        let e = RuntimeOptions::from_any(Some(&any(CRI_OPTIONS, with_file.encode_to_vec())))
            .unwrap_err();
        assert_eq!(e.code(), Code::FAILED_PRECONDITION);
        assert!(e.to_string().contains("/etc/hyperbox.toml"), "{e}");
    }

    #[test]
    fn an_empty_message_of_no_type_is_no_options() {
        assert_eq!(
            RuntimeOptions::from_any(Some(&any("", vec![]))).unwrap(),
            RuntimeOptions::default()
        );
        let e = RuntimeOptions::from_any(Some(&any("", vec![1]))).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
    }

    #[test]
    fn unknown_types_are_refused_naming_them() {
        let e = RuntimeOptions::from_any(Some(&any("example.v1.Other", vec![]))).unwrap_err();
        assert_eq!(e.code(), Code::INVALID_ARGUMENT);
        assert!(e.to_string().contains("example.v1.Other"), "{e}");
    }
}

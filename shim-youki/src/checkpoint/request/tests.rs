//! The request builder case by case: each option, each finding, dump against restore.

use super::*;
use hyperbox_shim_core::EngineError;
use protobuf::reflect::ReflectFieldRef;
use protobuf::MessageFull;
use serde_json::json;

/// Each field CRIU gets, as `name: value` in the order of `rpc.proto` (a repeated field
/// once per entry, in order).
fn fields(opts: &rpc::Criu_opts) -> Vec<String> {
    let mut out = Vec::new();
    for f in rpc::Criu_opts::descriptor().fields() {
        match f.get_reflect(opts) {
            ReflectFieldRef::Optional(v) => {
                out.extend(v.value().map(|v| format!("{}: {v}", f.name())))
            }
            ReflectFieldRef::Repeated(r) => {
                out.extend(r.into_iter().map(|v| format!("{}: {v}", f.name())))
            }
            ReflectFieldRef::Map(_) => {}
        }
    }
    out
}

/// What `got` sets that `base` does not, and what `base` sets that `got` does not.
fn changes(base: &[String], got: &[String]) -> (Vec<String>, Vec<String>) {
    (
        got.iter().filter(|f| !base.contains(f)).cloned().collect(),
        base.iter().filter(|f| !got.contains(f)).cloned().collect(),
    )
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// An OCI spec of `json`'s fields.
fn spec(json: serde_json::Value) -> Spec {
    let mut full = json!({ "ociVersion": "1.2.0" });
    full.as_object_mut()
        .unwrap()
        .extend(json.as_object().unwrap().clone());
    serde_json::from_value(full).unwrap()
}

fn stream(key: &str, null: bool) -> Option<Stream> {
    let key = key.to_string();
    Some(Stream { key, null })
}

/// A dump as a test varies it: nothing asked for, nothing special found.
struct DumpCase {
    checkpoint: CheckpointSpec,
    oci: Spec,
    facts: DumpFacts,
}

impl DumpCase {
    fn new() -> DumpCase {
        DumpCase {
            checkpoint: CheckpointSpec::default(),
            oci: spec(json!({})),
            facts: DumpFacts {
                pid: 42,
                images_dir_fd: 10,
                work_dir_fd: 11,
                root: PathBuf::from("/bundle/rootfs"),
                freezer: PathBuf::from("/sys/fs/cgroup/pod/c1"),
                ..Default::default()
            },
        }
    }

    fn build(self) -> (Vec<String>, Metadata) {
        let choices = DumpChoices::of(&self.checkpoint).unwrap();
        let (opts, meta) = dump(&choices, &self.oci, self.facts);
        (fields(&opts), meta)
    }
}

/// A restore as a test varies it: a record of nothing special, nothing asked for.
struct RestoreCase {
    oci: Spec,
    lazy: bool,
    meta: Metadata,
    console: bool,
    facts: RestoreFacts,
}

impl RestoreCase {
    fn new() -> RestoreCase {
        RestoreCase {
            oci: spec(json!({})),
            lazy: false,
            meta: Metadata::default(),
            console: false,
            facts: RestoreFacts {
                images_dir_fd: 10,
                work_dir_fd: 11,
                root: PathBuf::from("/state/c1/criu-root"),
                ..Default::default()
            },
        }
    }

    fn build(self) -> Restore {
        // Where the images and the log are is the caller's: open directories.
        let from = RestoreSpec {
            image_dir: PathBuf::from("/images"),
            work_dir: Some(PathBuf::from("/work")),
            timeout: None,
            lazy: self.lazy,
        };
        restore(&self.oci, &from, &self.meta, self.console, self.facts)
    }
}

#[test]
fn a_dump_by_default_leaves_the_container_running_and_skips_the_network_lock() {
    let (got, meta) = DumpCase::new().build();
    let expected = [
        "images_dir_fd: 10",
        "pid: 42",
        "leave_running: true",
        "ext_unix_sk: false",
        "tcp_established: false",
        "shell_job: false",
        "file_locks: false",
        "log_level: 4",
        "log_file: dump.log",
        "root: /bundle/rootfs",
        "work_dir_fd: 11",
        "manage_cgroups: true",
        "freeze_cgroup: /sys/fs/cgroup/pod/c1",
        "tcp_skip_in_flight: false",
        "orphan_pts_master: true",
        "network_lock: SKIP",
    ];
    assert_eq!(got, strings(&expected));
    assert!(!meta.shell_job && !meta.tcp_established && meta.empty_ns == 0);
}

#[test]
fn each_checkpoint_option_sets_its_criu_field_and_the_record() {
    type Asked = fn(&mut CheckpointSpec);
    let cases: [(&str, Asked, &[&str], &[&str]); 12] = [
        (
            "exit",
            |c| c.exit = true,
            &["leave_running: false"],
            &["leave_running: true"],
        ),
        (
            // Established connections are what the network lock protects.
            "open_tcp",
            |c| c.open_tcp = true,
            &["tcp_established: true"],
            &["tcp_established: false", "network_lock: SKIP"],
        ),
        (
            "external_unix_sockets",
            |c| c.external_unix_sockets = true,
            &["ext_unix_sk: true"],
            &["ext_unix_sk: false"],
        ),
        (
            "terminal",
            |c| c.terminal = true,
            &["shell_job: true"],
            &["shell_job: false"],
        ),
        (
            "file_locks",
            |c| c.file_locks = true,
            &["file_locks: true"],
            &["file_locks: false"],
        ),
        (
            "skip_in_flight",
            |c| c.skip_in_flight = true,
            &["tcp_skip_in_flight: true"],
            &["tcp_skip_in_flight: false"],
        ),
        (
            "empty network namespace",
            |c| c.empty_namespaces = vec!["network".into()],
            &["empty_ns: 1073741824"],
            &[],
        ),
        (
            "cgroups_mode soft",
            |c| c.cgroups_mode = Some("soft".into()),
            &["manage_cgroups_mode: SOFT"],
            &[],
        ),
        (
            "cgroups_mode full",
            |c| c.cgroups_mode = Some("full".into()),
            &["manage_cgroups_mode: FULL"],
            &[],
        ),
        (
            "cgroups_mode strict",
            |c| c.cgroups_mode = Some("strict".into()),
            &["manage_cgroups_mode: STRICT"],
            &[],
        ),
        (
            "cgroups_mode ignore",
            |c| c.cgroups_mode = Some("ignore".into()),
            &["manage_cgroups_mode: IGNORE"],
            &[],
        ),
        (
            // Where the images and the log go is the caller's: open directories.
            "image, work and record directories, timeout",
            |c| {
                c.image_dir = PathBuf::from("/images");
                c.work_dir = Some(PathBuf::from("/work"));
                c.record_dir = Some(PathBuf::from("/record"));
                c.timeout = Some(std::time::Duration::from_secs(1));
            },
            &[],
            &[],
        ),
    ];
    let base = DumpCase::new().build().0;
    for (what, asked, added, removed) in cases {
        let mut case = DumpCase::new();
        asked(&mut case.checkpoint);
        let c = case.checkpoint.clone();
        let (got, meta) = case.build();
        assert_eq!(
            changes(&base, &got),
            (strings(added), strings(removed)),
            "{what}"
        );
        // What a restore repeats is recorded as the dump had it.
        let recorded = (
            meta.shell_job,
            meta.tcp_established,
            meta.ext_unix_sk,
            meta.file_locks,
        );
        let asked = (
            c.terminal,
            c.open_tcp,
            c.external_unix_sockets,
            c.file_locks,
        );
        assert_eq!(recorded, asked, "{what}");
        let empty_ns = if c.empty_namespaces.is_empty() {
            0
        } else {
            libc::CLONE_NEWNET
        };
        assert_eq!(meta.empty_ns, empty_ns as u32, "{what}");
    }
}

#[test]
fn options_criu_cannot_take_are_refused_before_anything_is_probed() {
    type Asked = fn(&mut CheckpointSpec);
    let cases: [(&str, Asked, &str); 3] = [
        (
            "cgroups_mode",
            |c| c.cgroups_mode = Some("loose".into()),
            "unknown CRIU cgroup mode \"loose\"",
        ),
        (
            "empty_namespaces",
            |c| c.empty_namespaces = vec!["network".into(), "pid".into()],
            "the pid namespace empty",
        ),
        (
            "both: the namespaces are checked first",
            |c| {
                c.cgroups_mode = Some("loose".into());
                c.empty_namespaces = vec!["ipc".into()];
            },
            "the ipc namespace empty",
        ),
    ];
    for (what, asked, says) in cases {
        let mut checkpoint = CheckpointSpec::default();
        asked(&mut checkpoint);
        let e = EngineError::from(DumpChoices::of(&checkpoint).unwrap_err());
        assert!(
            matches!(&e, EngineError::InvalidSpec(m) if m.contains(says)),
            "{what}: {e}"
        );
    }
}

#[test]
fn what_the_probes_found_becomes_external_mounts_files_and_namespaces() {
    type Found = fn(&mut DumpFacts);
    let cases: [(&str, Found, &[&str]); 6] = [
        // Bind mounts are external under their destination, on both sides; masked paths
        // that are missing or directories of their parent's are CRIU's.
        ("nothing probed", |_| {}, &[]),
        (
            "cgroup v1 hierarchies",
            |f| f.v1_cgroup_mounts = vec!["/sys/fs/cgroup/cpu".into()],
            &["ext_mnt: key: \"/sys/fs/cgroup/cpu\" val: \"/sys/fs/cgroup/cpu\""],
        ),
        (
            "masked paths",
            |f| {
                f.masked = [
                    ("/proc/kcore", Masked::File),
                    ("/proc/acpi", Masked::MountedDir),
                    ("/proc/scsi", Masked::Dir),
                    ("/not/in/the/spec", Masked::File),
                ]
                .into_iter()
                .map(|(p, m)| (p.to_string(), m))
                .collect()
            },
            &[
                "ext_mnt: key: \"/proc/kcore\" val: \"/dev/null\"",
                "ext_mnt: key: \"/proc/acpi\" val: \"hyperbox-masked-dir\"",
            ],
        ),
        (
            "empty tmpfs mounts of a frozen container",
            |f| f.empty_tmpfs = vec!["/dev/shm".into()],
            &["ext_mnt: key: \"/dev/shm\" val: \"hyperbox-empty-tmpfs:/dev/shm\""],
        ),
        (
            "joined network and pid namespaces",
            |f| {
                f.external_namespaces = vec![
                    (LinuxNamespaceType::Network, 4026532001),
                    (LinuxNamespaceType::Pid, 4026532002),
                ]
            },
            &[
                "external: net[4026532001]:extRootNetNS",
                "external: pid[4026532002]:extRootPidNS",
            ],
        ),
        (
            // Files are CRIU's external files, once each; pipes it finds itself.
            "standard streams",
            |f| {
                let file = stream("file[2a:9]", false);
                f.stdio = [stream("pipe:[7]", false), file.clone(), file];
            },
            &["external: file[2a:9]"],
        ),
    ];
    let oci = json!({
        "mounts": [
            {"destination": "/data", "source": "/host/data", "options": ["rbind"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
            {"destination": "/etc/hosts", "type": "bind", "source": "/host/hosts"},
        ],
        "linux": {
            "maskedPaths": ["/proc/kcore", "/proc/acpi", "/proc/scsi", "/sys/firmware"],
        },
    });
    let binds = [
        "ext_mnt: key: \"/data\" val: \"/data\"",
        "ext_mnt: key: \"/etc/hosts\" val: \"/etc/hosts\"",
    ];
    let base = DumpCase::new().build().0;
    for (what, found, added) in cases {
        let mut case = DumpCase::new();
        case.oci = spec(oci.clone());
        found(&mut case.facts);
        let (got, _) = case.build();
        let added = [&binds[..], added].concat();
        assert_eq!(changes(&base, &got), (strings(&added), vec![]), "{what}");
    }
}

#[test]
fn the_record_of_a_dump_says_what_a_restore_must_put_back() {
    let oci = json!({ "linux": { "maskedPaths": ["/proc/kcore", "/proc/acpi"] } });
    let mut case = DumpCase::new();
    case.oci = spec(oci.clone());
    case.facts.masked = [("/proc/acpi".to_string(), Masked::MountedDir)].into();
    case.facts.empty_tmpfs = vec!["/dev/shm".into(), "/run".into()];
    case.facts.stdio = [None, stream("pipe:[7]", false), stream("file[1:2]", true)];
    let (_, meta) = case.build();
    assert!(meta.masked_dirs);
    assert_eq!(meta.empty_tmpfs, ["/dev/shm", "/run"]);
    let stdio: Vec<_> = meta
        .stdio
        .iter()
        .map(|s| s.as_ref().map(|s| (&*s.key, s.null)))
        .collect();
    assert_eq!(
        stdio,
        [None, Some(("pipe:[7]", false)), Some(("file[1:2]", true))]
    );

    // Without a masked directory of its own, nothing to bind.
    let mut case = DumpCase::new();
    case.oci = spec(oci);
    let (_, meta) = case.build();
    assert!(!meta.masked_dirs && meta.empty_tmpfs.is_empty());
}

#[test]
fn a_restore_by_default_takes_evasive_devices_and_no_cgroup_of_its_own() {
    let r = RestoreCase::new().build();
    let expected = [
        "images_dir_fd: 10",
        "ext_unix_sk: false",
        "tcp_established: false",
        "evasive_devices: true",
        "shell_job: false",
        "file_locks: false",
        "log_level: 4",
        "log_file: restore.log",
        "notify_scripts: false",
        "root: /state/c1/criu-root",
        "work_dir_fd: 11",
        "manage_cgroups: false",
        "lazy_pages: false",
        "orphan_pts_master: false",
        "network_lock: SKIP",
    ];
    assert_eq!(fields(&r.opts), strings(&expected));
    assert!(r.inherit.is_empty());
}

#[test]
fn each_restore_input_sets_its_criu_field() {
    type Given = fn(&mut RestoreCase);
    let cases: [(&str, Given, &[&str], &[&str]); 12] = [
        (
            "lazy",
            |c| c.lazy = true,
            &["lazy_pages: true"],
            &["lazy_pages: false"],
        ),
        (
            "a console socket",
            |c| c.console = true,
            &["notify_scripts: true", "orphan_pts_master: true"],
            &["notify_scripts: false", "orphan_pts_master: false"],
        ),
        (
            "a cgroup namespace",
            |c| c.oci = spec(json!({ "linux": { "namespaces": [{"type": "cgroup"}] } })),
            &["manage_cgroups: true"],
            &["manage_cgroups: false"],
        ),
        (
            "a terminal",
            |c| c.meta.shell_job = true,
            &["shell_job: true"],
            &["shell_job: false"],
        ),
        (
            "established connections",
            |c| c.meta.tcp_established = true,
            &["tcp_established: true"],
            &["tcp_established: false", "network_lock: SKIP"],
        ),
        (
            "external unix sockets",
            |c| c.meta.ext_unix_sk = true,
            &["ext_unix_sk: true"],
            &["ext_unix_sk: false"],
        ),
        (
            "file locks",
            |c| c.meta.file_locks = true,
            &["file_locks: true"],
            &["file_locks: false"],
        ),
        (
            "an empty network namespace",
            |c| c.meta.empty_ns = libc::CLONE_NEWNET as u32,
            &["empty_ns: 1073741824"],
            &[],
        ),
        (
            // From the new container's source: the dump had its own.
            "a bind mount",
            |c| {
                let data = json!({"destination": "/data", "source": "/new", "options": ["bind"]});
                c.oci = spec(json!({ "mounts": [data] }));
            },
            &["ext_mnt: key: \"/data\" val: \"/new\""],
            &[],
        ),
        (
            "cgroup v1 hierarchies",
            |c| c.facts.v1_cgroup_mounts = vec!["/sys/fs/cgroup/memory".into()],
            &["ext_mnt: key: \"/sys/fs/cgroup/memory\" val: \"/sys/fs/cgroup/memory\""],
            &[],
        ),
        (
            "masked paths",
            |c| c.oci = spec(json!({ "linux": { "maskedPaths": ["/proc/kcore", "/proc/keys"] } })),
            &["ext_mnt: key: \"/dev/null\" val: \"/dev/null\""],
            &[],
        ),
        (
            "fresh tmpfs mounts",
            |c| {
                c.facts.fresh = vec![
                    ("hyperbox-masked-dir".into(), "/state/c1/masked".into()),
                    (
                        "hyperbox-empty-tmpfs:/run".into(),
                        "/state/c1/tmpfs-0".into(),
                    ),
                ]
            },
            &[
                "ext_mnt: key: \"hyperbox-masked-dir\" val: \"/state/c1/masked\"",
                "ext_mnt: key: \"hyperbox-empty-tmpfs:/run\" val: \"/state/c1/tmpfs-0\"",
            ],
            &[],
        ),
    ];
    let base = fields(&RestoreCase::new().build().opts);
    for (what, given, added, removed) in cases {
        let mut case = RestoreCase::new();
        given(&mut case);
        let got = fields(&case.build().opts);
        assert_eq!(
            changes(&base, &got),
            (strings(added), strings(removed)),
            "{what}"
        );
    }
}

#[test]
fn a_restore_inherits_each_stream_once_then_the_namespaces_it_keeps() {
    let mut case = RestoreCase::new();
    case.oci = spec(json!({ "linux": { "namespaces": [
        {"type": "mount", "path": "/proc/9/ns/mnt"},
        {"type": "pid", "path": "/proc/9/ns/pid"},
        {"type": "ipc", "path": "/proc/9/ns/ipc"},
        {"type": "network", "path": "/run/netns/pod"},
        {"type": "uts"},
        {"type": "user", "path": "/proc/9/ns/user"},
    ] } }));
    let shared = stream("pipe:[8]", false);
    case.meta.stdio = [stream("pipe:[7]", false), shared.clone(), shared];
    let r = case.build();
    let (added, _) = changes(&fields(&RestoreCase::new().build().opts), &fields(&r.opts));
    let expected = [
        "inherit_fd: key: \"pipe:[7]\" fd: 0",
        "inherit_fd: key: \"pipe:[8]\" fd: 1",
        "inherit_fd: key: \"extRootNetNS\" fd: 4",
        "inherit_fd: key: \"extRootPidNS\" fd: 5",
        "join_ns: ns: \"ipc\" ns_file: \"/proc/9/ns/ipc\"",
        "join_ns: ns: \"mnt\" ns_file: \"/proc/9/ns/mnt\"",
    ];
    assert_eq!(added, strings(&expected));
    let stream = |null| Inherited::Stream { null };
    let namespace = |path: &str| Inherited::Namespace(PathBuf::from(path));
    let expected = [
        (0, stream(false)),
        (1, stream(false)),
        (4, namespace("/run/netns/pod")),
        (5, namespace("/proc/9/ns/pid")),
    ];
    assert_eq!(r.inherit, expected);

    // A stream that was /dev/null stays /dev/null, and is inherited once; the first
    // namespace is at 4 whatever the streams.
    let mut case = RestoreCase::new();
    case.oci = spec(json!({ "linux": { "namespaces": [
        {"type": "pid", "path": "/proc/9/ns/pid"},
    ] } }));
    let null = Some(Stream {
        key: "file[1:2]".into(),
        null: true,
    });
    case.meta.stdio = [None, null.clone(), null];
    let r = case.build();
    assert_eq!(
        r.inherit,
        [(1, stream(true)), (4, namespace("/proc/9/ns/pid"))]
    );
    let fds: Vec<_> = r.opts.inherit_fd.iter().map(|i| i.fd()).collect();
    assert_eq!(fds, [1, 4], "in the order of the fds the caller opens");
}

#[test]
fn a_restore_repeats_the_dump_where_the_record_says_and_differs_where_it_must() {
    let oci = json!({
        "mounts": [{"destination": "/data", "source": "/host/data", "options": ["rbind"]}],
        "linux": { "maskedPaths": ["/proc/kcore"] },
    });
    let mut dumped = DumpCase::new();
    dumped.checkpoint.terminal = true;
    dumped.checkpoint.file_locks = true;
    dumped.checkpoint.external_unix_sockets = true;
    dumped.checkpoint.empty_namespaces = vec!["network".into()];
    dumped.oci = spec(oci.clone());
    dumped.facts.masked = [("/proc/kcore".to_string(), Masked::File)].into();
    let (dumped, meta) = dumped.build();
    let mut restored = RestoreCase::new();
    restored.oci = spec(oci);
    restored.meta = meta;
    let restored = fields(&restored.build().opts);
    let (restore_only, dump_only) = changes(&dumped, &restored);
    let expected = [
        "pid: 42",
        "leave_running: true",
        "log_file: dump.log",
        "root: /bundle/rootfs",
        "ext_mnt: key: \"/data\" val: \"/data\"",
        "ext_mnt: key: \"/proc/kcore\" val: \"/dev/null\"",
        "manage_cgroups: true",
        "freeze_cgroup: /sys/fs/cgroup/pod/c1",
        "tcp_skip_in_flight: false",
        "orphan_pts_master: true",
    ];
    assert_eq!(dump_only, strings(&expected));
    let expected = [
        "evasive_devices: true",
        "log_file: restore.log",
        "notify_scripts: false",
        "root: /state/c1/criu-root",
        "ext_mnt: key: \"/data\" val: \"/host/data\"",
        "ext_mnt: key: \"/dev/null\" val: \"/dev/null\"",
        "manage_cgroups: false",
        "lazy_pages: false",
        "orphan_pts_master: false",
    ];
    assert_eq!(restore_only, strings(&expected));
    // The record's options are the same on both sides.
    for same in [
        "shell_job: true",
        "file_locks: true",
        "ext_unix_sk: true",
        "empty_ns: 1073741824",
        "network_lock: SKIP",
    ] {
        let same = same.to_string();
        assert!(dumped.contains(&same) && restored.contains(&same), "{same}");
    }
}

#[test]
fn cgroup_roots_name_their_controller_except_on_cgroup_v2() {
    let mut opts = rpc::Criu_opts::new();
    let roots = [("cpu,cpuacct", "/pod/c1"), ("", "/pod/c1")];
    add_cgroup_roots(&mut opts, roots.map(|(c, p)| (c.into(), p.into())).to_vec());
    let expected = [
        "cg_root: ctrl: \"cpu,cpuacct\" path: \"/pod/c1\"",
        "cg_root: path: \"/pod/c1\"",
    ];
    assert_eq!(fields(&opts), strings(&expected));
}

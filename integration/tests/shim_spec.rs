//! `containerd-shim-hyperbox-v1` honours what it is given as runc's shim does: the runtime
//! options of a Create (taken or refused with a message), and one OCI spec run through both
//! runtimes shows the same user, cwd, env, capabilities, mounts and limits inside.
//!
//! The shim binary must be built first (`cargo build --workspace --bins`).

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use containerd_client::tonic::Code;
use hyperbox_integration::client::{
    to_any, ClientError, CreateTask, CriOptions, RuncOptions, TestClient,
};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::Footprint;
use hyperbox_integration::testbed::TestBed;
use prost_types::Any;

const RUNTIME: &str = "io.containerd.hyperbox.v1";
const RUNC: &str = "io.containerd.runc.v2";
/// The shim's default state root; a container's state is `STATE_ROOT/NAMESPACE/ID`.
const STATE_ROOT: &str = "/run/hyperbox/youki";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A test bed with busybox pulled, after checking the shim is registered.
fn bed(v: ContainerdVersion) -> (TestBed, String) {
    let bed = TestBed::start(v).expect("test bed");
    assert!(
        bed.containerd.runtimes().iter().any(|r| r == RUNTIME),
        "{RUNTIME} is not registered: build containerd-shim-hyperbox-v1 first \
         (cargo build --workspace --bins)"
    );
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    (bed, image)
}

/// `ctr containers create --runtime RUNTIME IMAGE ID ARGS...`: a container whose task the
/// test client then creates with explicit options.
fn create_container(c: &Containerd, v: ContainerdVersion, image: &str, id: &str, args: &[&str]) {
    let mut all = vec!["containers", "create", "--runtime", RUNTIME, image, id];
    // As in `Containerd::create_container`: ctr 1.6 needs `--` before `sh -c`, 1.7 must not
    // get it.
    if v == ContainerdVersion::V1_6 {
        all.push("--");
    }
    all.extend_from_slice(args);
    c.ctr_run(&all).expect("container created");
}

/// runc's `root` option moves the container's state there (`ROOT/NAMESPACE/ID`), as under
/// runc's shim; the task runs and is deleted as usual, and its state goes with it.
fn runc_root_option_takes_effect(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    create_container(
        c,
        v,
        &image,
        "rooted",
        &["sh", "-c", "echo created with options; exit 5"],
    );
    let root = c.dir().join("hyperbox-root");
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let options = RuncOptions {
        root: root.to_string_lossy().into_owned(),
        binary_name: "runc".into(),
        ..Default::default()
    };
    let pid = rt
        .block_on(client.create_task(CreateTask {
            container_id: "rooted".into(),
            options: Some(to_any(&options)),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("create with options: {e}\n{}", c.log_tail(30)));
    assert!(pid > 0);
    let state = root.join(c.namespace()).join("rooted");
    assert!(
        state.join("state.json").is_file(),
        "no state in {}",
        state.display()
    );
    let default = Path::new(STATE_ROOT).join(c.namespace()).join("rooted");
    assert!(!default.exists(), "state also in {}", default.display());

    rt.block_on(client.start("rooted", "")).expect("start");
    assert_eq!(rt.block_on(client.wait("rooted", "")).expect("wait"), 5);
    assert_eq!(
        rt.block_on(client.delete_task("rooted")).expect("delete"),
        5
    );
    assert!(!state.exists(), "state left in {}", state.display());
    c.ctr_run(&["containers", "rm", "rooted"]).expect("rm");
}
per_version!(runc_root_option, runc_root_option_takes_effect);

/// A container created under runc's `root` option is still cleaned up when its shim dies:
/// containerd runs the shim's `delete` action, a new shim, which finds the root in the bundle.
fn dead_shim_cleanup_finds_the_root(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    create_container(c, v, &image, "orphan", &["sleep", "1000"]);
    let root = c.dir().join("hyperbox-root");
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let options = RuncOptions {
        root: root.to_string_lossy().into_owned(),
        ..Default::default()
    };
    let pid = rt
        .block_on(client.create_task(CreateTask {
            container_id: "orphan".into(),
            options: Some(to_any(&options)),
            ..Default::default()
        }))
        .unwrap_or_else(|e| panic!("create with options: {e}\n{}", c.log_tail(30)));
    rt.block_on(client.start("orphan", "")).expect("start");
    let state = root.join(c.namespace()).join("orphan");
    assert!(state.is_dir(), "no state in {}", state.display());
    let fp = Footprint::of(c.dir()).expect("footprint");
    let shims: Vec<u32> = fp
        .processes
        .iter()
        .filter(|p| p.what.contains("containerd-shim-hyperbox-v1"))
        .map(|p| p.pid)
        .collect();
    assert!(!shims.is_empty(), "no shim in {fp:#?}");
    for shim in shims {
        // SAFETY: kill(2) with a pid and a signal number has no memory effects.
        unsafe { libc::kill(shim as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while state.exists() || Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "after the shim died: state {} exists: {}, init {pid} alive: {}\n{}",
            state.display(),
            state.exists(),
            Path::new(&format!("/proc/{pid}")).exists(),
            c.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(client);
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(dead_shim_cleanup, dead_shim_cleanup_finds_the_root);

/// `SystemdCgroup = true` on a host without systemd is refused with a message saying so, and
/// the refused create leaves no process, mount, cgroup or state behind.
fn systemd_cgroup_refused_without_systemd(v: ContainerdVersion) {
    if Path::new("/run/systemd/system").is_dir() {
        hyperbox_integration::skip("systemd runs this host: the refusal cannot be seen here");
        return;
    }
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    create_container(c, v, &image, "sd", &["true"]);
    let fp = Footprint::of(c.dir()).expect("footprint");
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let options = RuncOptions {
        systemd_cgroup: true,
        ..Default::default()
    };
    let err = rt
        .block_on(client.create_task(CreateTask {
            container_id: "sd".into(),
            options: Some(to_any(&options)),
            ..Default::default()
        }))
        .expect_err("SystemdCgroup accepted without systemd");
    let text = err.to_string();
    assert!(
        text.contains("SystemdCgroup requested but systemd is not running (PID 1 is "),
        "{text}"
    );
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{text}");
    let state = Path::new(STATE_ROOT).join(c.namespace()).join("sd");
    assert!(!state.exists(), "state left in {}", state.display());
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    assert!(
        !tasks.lines().any(|l| l.starts_with("sd ")),
        "task left: {tasks}"
    );
    drop(client);
    drop(bed);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}
per_version!(
    systemd_cgroup_refused,
    systemd_cgroup_refused_without_systemd
);

/// Creates task `id` with `options` where this containerd version takes them: in the task
/// request on 1.6 and 1.7; on 2.x, whose tasks service refuses task options of any type but
/// runc's, in the container's record, as its CRI puts them (containerd hands those to the
/// shim's Create when the request has none).
fn create_task_with_options(
    rt: &tokio::runtime::Runtime,
    client: &TestClient,
    v: ContainerdVersion,
    id: &str,
    options: Any,
) -> Result<u32, ClientError> {
    if v.is_2x() {
        rt.block_on(client.set_runtime_options(id, options))?;
        rt.block_on(client.create_task(CreateTask {
            container_id: id.into(),
            ..Default::default()
        }))
    } else {
        rt.block_on(client.create_task(CreateTask {
            container_id: id.into(),
            options: Some(options),
            ..Default::default()
        }))
    }
}

/// CRI's options are taken when they name no configuration file (the task runs), and refused
/// naming the file when they do: this shim reads none.
fn cri_options_taken_or_refused(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    create_container(c, v, &image, "cri", &["sh", "-c", "exit 7"]);
    let plain = CriOptions {
        type_url: String::new(),
        config_path: String::new(),
    };
    create_task_with_options(&rt, &client, v, "cri", to_any(&plain))
        .unwrap_or_else(|e| panic!("create with CRI options: {e}\n{}", c.log_tail(30)));
    rt.block_on(client.start("cri", "")).expect("start");
    assert_eq!(rt.block_on(client.wait("cri", "")).expect("wait"), 7);
    assert_eq!(rt.block_on(client.delete_task("cri")).expect("delete"), 7);

    create_container(c, v, &image, "cri-file", &["true"]);
    let with_file = CriOptions {
        type_url: "io.containerd.hyperbox.v1.Options".into(),
        config_path: "/etc/hyperbox/shim.toml".into(),
    };
    let err = create_task_with_options(&rt, &client, v, "cri-file", to_any(&with_file))
        .expect_err("a configuration file accepted");
    let text = err.to_string();
    assert!(text.contains("/etc/hyperbox/shim.toml"), "{text}");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{text}");
}
per_version!(cri_options, cri_options_taken_or_refused);

/// Options of a type this shim does not know are refused naming the type.
fn unknown_options_refused(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    create_container(c, v, &image, "odd", &["true"]);
    let rt = runtime();
    let client = rt.block_on(c.client()).expect("client");
    let mut any = to_any(&RuncOptions::default());
    any.type_url = "example.v1.Unknown".into();
    if v.is_2x() {
        // containerd 2.x refuses such task options itself, before any shim, naming the type.
        let err = rt
            .block_on(client.create_task(CreateTask {
                container_id: "odd".into(),
                options: Some(any.clone()),
                ..Default::default()
            }))
            .expect_err("containerd 2.x took task options of an unknown type");
        assert!(err.to_string().contains("example.v1.Unknown"), "{err}");
    }
    let result = create_task_with_options(&rt, &client, v, "odd", any);
    if v == ContainerdVersion::V1_7 {
        // containerd 1.7 calls the shim's Create without options of a type it has not
        // registered, so the shim sees none and the task runs as without options; the shim's
        // own refusal is the unit test `unknown_types_are_refused_naming_them`.
        result.expect("1.7 drops unregistered option types before the shim");
        rt.block_on(client.start("odd", "")).expect("start");
        assert_eq!(rt.block_on(client.wait("odd", "")).expect("wait"), 0);
        rt.block_on(client.delete_task("odd")).expect("delete");
        return;
    }
    let err = result.expect_err("unknown options accepted");
    let text = err.to_string();
    assert!(text.contains("example.v1.Unknown"), "{text}");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{text}");
}
per_version!(unknown_options, unknown_options_refused);

/// `ctr run --rm` through `runtime` with `flags`; returns stdout, after checking it succeeded.
fn run_through(
    c: &Containerd,
    runtime: &str,
    flags: &[String],
    image: &str,
    id: &str,
    cmd: &[&str],
) -> String {
    let out = c
        .ctr()
        .args(["run", "--rm", "--runtime", runtime, "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args(flags)
        .args([image, id])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("ctr runs");
    assert!(
        out.status.success(),
        "{runtime}: exit {:?}: {}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(30)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What the container sees of its spec, one fact a line: user and groups, cwd, env, hostname,
/// confinement, rlimits and umask, which writes succeed (rootfs, bind and tmpfs mounts,
/// read-only `/proc` paths), whether masked `/proc` files read empty, and every mount with its
/// options (the rootfs's name its snapshot's directories, so only its first, ro or rw).
const PROBE: &str = r#"
echo "id: $(id)"
echo "pwd: $(pwd)"
env | sort
echo "hostname: $(hostname)"
grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo "nofile: $(ulimit -n)"
ulimit -a
echo "umask: $(umask)"
for f in /probe-write /mnt/probe-write /scratch/probe-write; do
  if (: > "$f") 2>/dev/null; then echo "write $f: ok"; else echo "write $f: refused"; fi
done
echo "bind: $(cat /mnt/marker)"
for f in /proc/kcore /proc/keys /proc/timer_list; do
  n=$(wc -c < "$f" 2>/dev/null)
  if [ "${n:-0}" -gt 0 ]; then echo "$f: has content"; else echo "$f: empty, unreadable or absent"; fi
done
(echo x > /proc/sys/kernel/domainname) 2>&1 | sed 's/^[^:]*: //'
awk '{ if ($2 == "/") { split($4, o, ","); print $2, $3, o[1] } else print $2, $3, $4 }' \
  /proc/self/mounts
"#;

/// Whether this version's `ctr run` has `flag`.
fn ctr_run_has(c: &Containerd, flag: &str) -> bool {
    let help = c
        .ctr()
        .args(["run", "--help"])
        .output()
        .expect("ctr run --help");
    String::from_utf8_lossy(&help.stdout).contains(&format!("--{flag} "))
}

/// Runs PROBE with `flags` through runc's shim and ours and asserts the outputs are the same,
/// line for line; returns ours.
fn compare(c: &Containerd, image: &str, name: &str, flags: &[String]) -> String {
    let runc = run_through(
        c,
        RUNC,
        flags,
        image,
        &format!("{name}-runc"),
        &["sh", "-c", PROBE],
    );
    let ours = run_through(
        c,
        RUNTIME,
        flags,
        image,
        &format!("{name}-hb"),
        &["sh", "-c", PROBE],
    );
    let (a, b): (Vec<&str>, Vec<&str>) = (runc.lines().collect(), ours.lines().collect());
    let differing: Vec<String> = (0..a.len().max(b.len()))
        .filter(|&i| a.get(i) != b.get(i))
        .map(|i| {
            format!(
                "line {i}:\n  runc:     {}\n  hyperbox: {}",
                a.get(i).unwrap_or(&"<none>"),
                b.get(i).unwrap_or(&"<none>")
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "{name}: {} of {} lines differ:\n{}\n\nrunc:\n{runc}\nhyperbox:\n{ours}",
        differing.len(),
        a.len(),
        differing.join("\n")
    );
    // Sanity: the probe ran to its end.
    assert!(ours.contains("bind: from the host"), "{name}:\n{ours}");
    ours
}

/// One spec, built by `ctr run`'s flags, through runc's shim and ours: what the container
/// sees is the same, line for line. Three times: a confined non-root user on a read-only
/// rootfs, root with the default seccomp profile and a writable bind mount, and privileged.
fn same_view_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let host_dir = c.dir().join("parity-src");
    fs::create_dir_all(&host_dir).unwrap();
    fs::write(host_dir.join("marker"), "from the host\n").unwrap();
    let mut flags: Vec<String> = [
        "--cwd",
        "/tmp",
        "--env",
        "FOO=bar",
        "--read-only",
        "--cap-add",
        "CAP_NET_ADMIN",
        "--cap-drop",
        "CAP_CHOWN",
        "--mount",
        &format!(
            "type=bind,src={},dst=/mnt,options=rbind:ro",
            host_dir.display()
        ),
        "--mount",
        "type=tmpfs,src=tmpfs,dst=/scratch,options=nosuid:nodev:size=1m",
    ]
    .map(String::from)
    .to_vec();
    // Flags that this version's ctr lacks are left out, for both runtimes alike.
    for (flag, value) in [("user", "1000:1000"), ("hostname", "parity")] {
        if ctr_run_has(c, flag) {
            flags.extend([format!("--{flag}"), value.to_string()]);
        } else {
            eprintln!("ctr {v} has no --{flag}: left out");
        }
    }
    let ours = compare(c, &image, "confined", &flags);
    for expected in ["pwd: /tmp", "FOO=bar", "write /probe-write: refused"] {
        assert!(ours.contains(expected), "no {expected:?} in:\n{ours}");
    }

    let flags: Vec<String> = [
        "--seccomp",
        "--mount",
        &format!(
            "type=bind,src={},dst=/mnt,options=rbind:rw",
            host_dir.display()
        ),
    ]
    .map(String::from)
    .to_vec();
    let ours = compare(c, &image, "root", &flags);
    for expected in ["uid=0(root)", "Seccomp:\t2", "write /mnt/probe-write: ok"] {
        assert!(ours.contains(expected), "no {expected:?} in:\n{ours}");
    }

    let flags: Vec<String> = [
        "--privileged",
        "--mount",
        &format!(
            "type=bind,src={},dst=/mnt,options=rbind:ro",
            host_dir.display()
        ),
    ]
    .map(String::from)
    .to_vec();
    let ours = compare(c, &image, "privileged", &flags);
    // Privileged: no path masked.
    assert!(ours.contains("/proc/keys: has content"), "{ours}");
}
per_version!(same_view, same_view_as_runc);

//! Security settings as runc's shim gives them, where a difference would be a hole on a
//! shared node. Each scenario runs through `io.containerd.runc.v2` and through ours in the
//! same containerd, and what a user sees is compared:
//! - an exec'd process runs under the container's seccomp filter, capabilities, user,
//!   no_new_privileges and limits, with and without no_new_privileges;
//! - `rootfsPropagation` `rshared`, `rslave` and `rprivate` (what containerd's CRI writes for
//!   Bidirectional, HostToContainer and no mount propagation) start, and mounts propagate
//!   between host and container exactly as under runc;
//! - the runtime's state is private: its root 0700, a container's directory 0711, its files
//!   0600;
//! - a file descriptor containerd was handed without close-on-exec reaches no hook.
//!
//! The shim binary must be built first (`cargo build --workspace --bins`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::spec::{config_spec, write};
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::wait_until;

const RUNC: &str = "io.containerd.runc.v2";
const OURS: &str = "io.containerd.hyperbox.v1";
const RUNTIMES: [&str; 2] = [RUNC, OURS];

fn bed(v: ContainerdVersion) -> (TestBed, String) {
    TestBed::for_runtime(v, OURS, TestImage::Busybox).expect("test bed with busybox")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kill(c: &Containerd, id: &str) {
    let _ = c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", id]);
}

/// What an exec'd process sees of its own confinement: ids, seccomp mode, no_new_privs,
/// capability sets, a limit and the cwd; and whether `unshare(CLONE_NEWUSER)`, which the
/// default seccomp profile refuses without CAP_SYS_ADMIN, goes through.
const CONFINEMENT: &str = "grep -E \
    '^(Uid|Gid|Groups|Seccomp|Seccomp_filters|NoNewPrivs|CapInh|CapPrm|CapEff|CapBnd|CapAmb):' \
    /proc/self/status; ulimit -n; pwd; unshare -U true 2>/dev/null; echo unshare=$?";

/// `ctr task exec` into a container started with `ctr run --seccomp` (the default profile),
/// with and without `--allow-new-privs`, as root and as another user: the exec'd process is
/// confined as runc's is, and its filter refuses what the profile refuses.
fn exec_confinement_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    for new_privs in [false, true] {
        for user in [None, Some("1000:1000")] {
            let mut seen = Vec::new();
            for (n, runtime) in RUNTIMES.into_iter().enumerate() {
                let id = format!("ex{}{}{n}", u8::from(new_privs), u8::from(user.is_some()));
                let mut run = vec!["run", "-d", "--null-io", "--seccomp"];
                if new_privs {
                    run.push("--allow-new-privs");
                }
                run.extend(["--runtime", runtime, &image, &id, "sleep", "1000"]);
                c.ctr_run(&run).unwrap_or_else(|e| panic!("{runtime}: {e}"));
                let mut exec = c.ctr();
                exec.args(["tasks", "exec", "--exec-id", "probe"]);
                if let Some(user) = user {
                    exec.args(["--user", user]);
                }
                let out = exec
                    .args([&id, "sh", "-c", CONFINEMENT])
                    .stdin(Stdio::null())
                    .output()
                    .expect("ctr tasks exec");
                kill(c, &id);
                assert!(
                    out.status.success(),
                    "{runtime} exec: {}",
                    text(&out.stderr)
                );
                seen.push(text(&out.stdout));
            }
            let case = format!("allow-new-privs={new_privs} user={user:?}");
            assert_eq!(seen[1], seen[0], "hyperbox vs runc, {case}");
            assert!(seen[1].contains("Seccomp:\t2"), "{case}: {}", seen[1]);
            assert!(!seen[1].contains("unshare=0"), "{case}: {}", seen[1]);
            let nnp = if new_privs {
                "NoNewPrivs:\t0"
            } else {
                "NoNewPrivs:\t1"
            };
            assert!(seen[1].contains(nnp), "{case}: {}", seen[1]);
        }
    }
}
per_version!(exec_confinement, exec_confinement_as_runc);

fn sh(script: &str) {
    let out = Command::new("sh")
        .args(["-c", script])
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {}", text(&out.stderr));
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what}: no {}", path.display());
        thread::sleep(Duration::from_millis(20));
    }
}

fn mounted(mount_point: &Path) -> bool {
    let wanted = format!(" {} ", mount_point.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(&wanted))
}

/// The container's half of the propagation scenario: it says it is running, waits for the
/// host's mount, reports whether it sees it, mounts a tmpfs of its own in the volume, and
/// waits for the host to look.
const PROPAGATION: &str = "touch /vol/ready; \
    while [ ! -e /vol/go ]; do sleep 0.02; done; \
    if grep -q ' /vol/fromhost ' /proc/self/mountinfo; then echo fromhost=seen; \
    else echo fromhost=unseen; fi; \
    mount -t tmpfs ct /vol/fromct && echo ctmount=ok; touch /vol/done; \
    while [ ! -e /vol/end ]; do sleep 0.02; done";

/// `rootfsPropagation` rshared, rslave and rprivate, with a volume of the matching
/// propagation (as CRI writes them for Bidirectional, HostToContainer and None): the
/// container starts, and a mount made on the host under the volume, and one made in the
/// container, are seen on the other side exactly when runc's shim shows them.
fn rootfs_propagation_as_runc(v: ContainerdVersion) {
    let (bed, _image) = bed(v);
    let c = &bed.containerd;
    for propagation in ["rshared", "rslave", "rprivate"] {
        let mut seen = Vec::new();
        for (n, runtime) in RUNTIMES.into_iter().enumerate() {
            let id = format!("prop-{propagation}-{n}");
            let dir = c.dir().join(&id);
            let vol = dir.join("vol");
            std::fs::create_dir_all(vol.join("fromhost")).unwrap();
            std::fs::create_dir_all(vol.join("fromct")).unwrap();
            let v = vol.display();
            sh(&format!("mount --bind {v} {v} && mount --make-rshared {v}"));
            let mut spec = config_spec(c, &dir, &["vol"]);
            spec["linux"]["rootfsPropagation"] = propagation.into();
            spec["mounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "destination": "/vol", "type": "bind", "source": vol,
                    "options": ["rbind", propagation]
                }));
            for set in ["bounding", "effective", "permitted"] {
                spec["process"]["capabilities"][set]
                    .as_array_mut()
                    .unwrap()
                    .push("CAP_SYS_ADMIN".into());
            }
            spec["process"]["args"] = serde_json::json!(["sh", "-c", PROPAGATION]);
            let config = write(&dir, &spec);
            let child = c
                .ctr()
                .args(["run", "--rm", "--config"])
                .arg(&config)
                .args(["--runtime", runtime, "--fifo-dir"])
                .arg(c.dir().join("fifo"))
                .arg(&id)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("ctr run");
            let started = Instant::now();
            while !vol.join("ready").exists() && started.elapsed() < Duration::from_secs(20) {
                thread::sleep(Duration::from_millis(20));
            }
            if !vol.join("ready").exists() {
                let out = c.wait_ctr(child, Duration::from_secs(5)).expect("ctr");
                panic!(
                    "{runtime} with rootfsPropagation {propagation} did not start: {}",
                    text(&out.stderr)
                );
            }
            sh(&format!("mount -t tmpfs host {v}/fromhost && touch {v}/go"));
            wait_for(&vol.join("done"), runtime);
            let to_host = mounted(&vol.join("fromct"));
            std::fs::write(vol.join("end"), "").unwrap();
            let out = c.wait_ctr(child, Duration::from_secs(30)).expect("ctr");
            assert!(out.status.success(), "{runtime}: {}", text(&out.stderr));
            sh(&format!("umount -R {v}"));
            seen.push(format!("{}fromct-on-host={to_host}", text(&out.stdout)));
        }
        assert_eq!(seen[1], seen[0], "hyperbox vs runc, {propagation}");
        let want = match propagation {
            "rshared" => "fromhost=seen\nctmount=ok\nfromct-on-host=true",
            "rslave" => "fromhost=seen\nctmount=ok\nfromct-on-host=false",
            _ => "fromhost=unseen\nctmount=ok\nfromct-on-host=false",
        };
        assert_eq!(seen[0], want, "runc's view, {propagation}");
    }
}
per_version!(rootfs_propagation, rootfs_propagation_as_runc);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The state of a running container is private as runc keeps it: the namespace's state root
/// 0700, the container's directory 0711, `state.json` 0600; and nothing in our container's
/// directory (state, libcontainer's copy of the config with its annotations and environment)
/// is readable by other users, also while an exec runs.
fn state_is_private_as_runc(v: ContainerdVersion) {
    let (bed, image) = bed(v);
    let c = &bed.containerd;
    let roots = [
        PathBuf::from("/run/containerd/runc"),
        PathBuf::from("/run/hyperbox/youki"),
    ];
    let mut seen = Vec::new();
    for (n, (runtime, root)) in RUNTIMES.into_iter().zip(&roots).enumerate() {
        let id = format!("state{n}");
        c.run_detached(runtime, &image, &id, &["sleep", "1000"])
            .unwrap_or_else(|e| panic!("{runtime}: {e}"));
        let ns_root = root.join(c.namespace());
        let dir = ns_root.join(&id);
        seen.push((mode(&ns_root), mode(&dir), mode(&dir.join("state.json"))));
        if runtime == OURS {
            let exec = c
                .ctr()
                .args(["tasks", "exec", "--exec-id", "look", &id, "sleep", "2"])
                .stdin(Stdio::null())
                .spawn()
                .expect("ctr tasks exec");
            // The directory is read while the exec runs: its process is in the task's pids.
            wait_until(Duration::from_secs(20), "the exec `look` to run", || {
                c.ctr_stdout(&["tasks", "ps", &id])
                    .unwrap_or_default()
                    .lines()
                    .skip(1)
                    .count()
                    >= 2
            });
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    assert_eq!(
                        mode(&path) & 0o077,
                        0,
                        "{} is readable by others",
                        path.display()
                    );
                }
            }
            c.wait_ctr(exec, Duration::from_secs(20))
                .expect("exec ends");
        }
        kill(c, &id);
    }
    assert_eq!(seen[0], (0o700, 0o711, 0o600), "runc's modes");
    assert_eq!(
        seen[1], seen[0],
        "hyperbox vs runc (root, container dir, state.json)"
    );
}
per_version!(state_is_private, state_is_private_as_runc);

/// A descriptor a shim is handed without close-on-exec (by containerd, from whatever started
/// it, or by an embedding program) does not reach the container's hooks through ours. Each
/// shim is started through a wrapper that opens such a descriptor and execs the real shim:
/// runc's shim passes it on to runc and its hooks, which shows the scenario happens.
fn leaked_fds_reach_no_hook(v: ContainerdVersion) {
    let scratch = std::env::temp_dir().join(format!("hb-leak-{}-{v}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let marker = scratch.join("hyperbox-leaked-fd");
    std::fs::write(&marker, "").unwrap();
    let wrap = |name: &str, real: &Path| {
        let path = scratch.join(name);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nexec 7<{}\nexec {} \"$@\"\n",
                marker.display(),
                real.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let runc_shim = wrap("runc-shim", &v.bin_dir().join("containerd-shim-runc-v2"));
    let ours = hyperbox_integration::host::workspace_binary("containerd-shim-hyperbox-v1")
        .expect("containerd-shim-hyperbox-v1 built");
    let our_shim = wrap("our-shim", &ours);
    let bed = TestBed::with_builder(
        hyperbox_integration::containerd::Containerd::builder(v)
            .with_workspace_shims(false)
            .with_shim(RUNC, runc_shim)
            .with_shim(OURS, our_shim),
    )
    .expect("test bed");
    let c = &bed.containerd;
    let mut seen = Vec::new();
    for (n, runtime) in RUNTIMES.into_iter().enumerate() {
        let id = format!("fds{n}");
        let dir = c.dir().join(&id);
        let mut spec = config_spec(c, &dir, &[]);
        spec["process"]["args"] = serde_json::json!(["true"]);
        let hook = |name: &str| {
            serde_json::json!({
                "path": "/bin/sh",
                "args": ["sh", "-c", format!("ls -l /proc/$$/fd > {}/{name}", dir.display())],
            })
        };
        spec["hooks"] = serde_json::json!({
            "createRuntime": [hook("createRuntime")],
            "poststop": [hook("poststop")],
        });
        let config = write(&dir, &spec);
        let out = c
            .ctr()
            .args(["run", "--rm", "--config"])
            .arg(&config)
            .args(["--runtime", runtime, &id])
            .stdin(Stdio::null())
            .output()
            .expect("ctr run");
        assert!(out.status.success(), "{runtime}: {}", text(&out.stderr));
        wait_for(&dir.join("poststop"), runtime);
        let mut fds = String::new();
        for hook in ["createRuntime", "poststop"] {
            fds.push_str(&std::fs::read_to_string(dir.join(hook)).unwrap());
        }
        seen.push(fds);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let name = marker.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        seen[0].contains(&name),
        "runc's hooks did not get the descriptor: the scenario did not happen\n{}",
        seen[0]
    );
    assert!(
        !seen[1].contains(&name),
        "our hooks got the leaked descriptor:\n{}",
        seen[1]
    );
}
per_version!(leaked_fds, leaked_fds_reach_no_hook);

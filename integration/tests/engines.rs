//! Engines on HyperBox: Docker Engine 26 runs containers through `containerd-shim-hyperbox-v1`
//! on a private containerd of each version, selected as users select it (`--runtime hyperbox`
//! registered by `config/docker-daemon.json`, or the runtime's own name), and each behaviour is
//! compared with Docker's default runc runtime in the same test. Then the runtime's
//! configuration snippets in `config/` are checked against the real engines.
//!
//! The shim binary must be built first (`cargo build -p hyperbox-shim-youki`); the harness
//! links it into the containerd's `bin/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use containerd_client::events::ContainerCreate;
use hyperbox_integration::client::EventStream;
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::docker::{config_file, Docker, HYPERBOX_RUNTIME};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::pty::{run_in_pty, run_in_pty_when};
use hyperbox_integration::sandbox::{Footprint, Sandbox};
use hyperbox_shim_core::template;

const RUNTIME: &str = "io.containerd.hyperbox.v1";
const RUNC: &str = "io.containerd.runc.v2";
/// The wasm shim, registered by `config/docker-daemon.json` as `hyperbox-wasm`.
const WASM_RUNTIME: &str = "io.containerd.hyperbox-wasm.v1";
const WASM_NAME: &str = "hyperbox-wasm";
/// The runtimes each Docker behaviour is checked with: Docker's default, then ours.
const RUNTIMES: [&str; 2] = ["runc", HYPERBOX_RUNTIME];

/// dockerd on a containerd, with busybox loaded. Field order is drop order: dockerd goes
/// before the containerd it drives.
struct DockerBed {
    docker: Docker,
    containerd: Containerd,
    image: String,
}

fn bed(v: ContainerdVersion) -> DockerBed {
    let containerd = Containerd::start(v).expect("containerd");
    assert!(
        containerd.runtimes().iter().any(|r| r == RUNTIME),
        "{RUNTIME} is not registered: build containerd-shim-hyperbox-v1 first \
         (cargo build -p hyperbox-shim-youki)"
    );
    let docker = Docker::start(&containerd).expect("dockerd");
    let image = docker
        .load_image(TestImage::Busybox)
        .expect("busybox loaded");
    DockerBed {
        docker,
        containerd,
        image,
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `docker run --rm --network none [--runtime R] IMAGE CMD...` in the foreground; returns its
/// output and the container's id (from `--cidfile`).
fn run_rm(b: &DockerBed, runtime: Option<&str>, cmd: &[&str]) -> (Output, String) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let cidfile = b
        .docker
        .dir()
        .join(format!("cid-{}", RUNS.fetch_add(1, Ordering::SeqCst)));
    let mut docker = b.docker.docker();
    docker.args(["run", "--rm", "--network", "none", "--cidfile"]);
    docker.arg(&cidfile);
    if let Some(r) = runtime {
        docker.args(["--runtime", r]);
    }
    let out = docker
        .arg(&b.image)
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("docker runs");
    let cid = fs::read_to_string(&cidfile).unwrap_or_default();
    let _ = fs::remove_file(&cidfile);
    (out, cid.trim().to_string())
}

/// `docker run -d --network none --runtime R ARGS... IMAGE CMD...`; returns the id.
fn run_detached(b: &DockerBed, runtime: &str, args: &[&str], cmd: &[&str]) -> String {
    let mut all = vec!["run", "-d", "--network", "none", "--runtime", runtime];
    all.extend_from_slice(args);
    all.push(&b.image);
    all.extend_from_slice(cmd);
    b.docker.docker_stdout(&all).unwrap_or_else(|e| {
        panic!(
            "{e}\ndockerd log:\n{}\ncontainerd log:\n{}",
            b.docker.log_tail(20),
            b.containerd.log_tail(20)
        )
    })
}

fn inspect(b: &DockerBed, id: &str, format: &str) -> String {
    b.docker
        .docker_stdout(&["inspect", "--format", format, id])
        .expect("docker inspect")
}

/// The runtime name containerd was asked to create `id` with, from its `/containers/create`
/// event in dockerd's namespace.
fn created_with(rt: &tokio::runtime::Runtime, events: &mut EventStream, id: &str) -> String {
    loop {
        let seen = rt
            .block_on(events.until_topic("/containers/create", Duration::from_secs(30)))
            .expect("a /containers/create event");
        let created: ContainerCreate = seen
            .last()
            .and_then(|e| e.decode())
            .expect("ContainerCreate payload");
        if created.id == id {
            return created.runtime.map(|r| r.name).unwrap_or_default();
        }
    }
}

/// `docker run --runtime hyperbox` and `--runtime io.containerd.hyperbox.v1` print the
/// container's output and exit with its code, as the default runtime does, and containerd is
/// really asked for our runtime (not runc) each time.
fn run_exit_code(v: ContainerdVersion) {
    let b = bed(v);
    let info = b
        .docker
        .docker_stdout(&["info", "--format", "{{json .Runtimes}}"])
        .expect("docker info");
    let runtimes: serde_json::Value = serde_json::from_str(&info).expect("runtimes JSON");
    // The API does not show a runtimeType; the events below show where the name leads.
    for name in [HYPERBOX_RUNTIME, WASM_NAME] {
        assert!(
            runtimes.get(name).is_some(),
            "runtime {name} of config/docker-daemon.json is not registered: {info}"
        );
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let client = rt
        .block_on(hyperbox_integration::client::TestClient::connect(
            b.containerd.socket(),
            b.docker.namespace(),
        ))
        .expect("client in dockerd's namespace");
    let mut events = rt
        .block_on(client.subscribe(&[r#"topic=="/containers/create""#]))
        .expect("subscribe");
    for (flag, expected) in [
        (None, RUNC),
        (Some(HYPERBOX_RUNTIME), RUNTIME),
        (Some(RUNTIME), RUNTIME),
        // busybox is native: the wasm shim runs it as a Linux container.
        (Some(WASM_NAME), WASM_RUNTIME),
    ] {
        let (out, id) = run_rm(&b, flag, &["sh", "-c", "echo hi; exit 3"]);
        assert_eq!(
            out.status.code(),
            Some(3),
            "--runtime {flag:?}: {}\ndockerd log:\n{}",
            stderr(&out),
            b.docker.log_tail(20)
        );
        assert_eq!(stdout(&out), "hi\n", "--runtime {flag:?}");
        assert_eq!(id.len(), 64, "no container id from --cidfile: {id:?}");
        assert_eq!(
            created_with(&rt, &mut events, &id),
            expected,
            "--runtime {flag:?}"
        );
    }
}
per_version!(run_exit_code, run_exit_code);

/// Waits until `docker logs` of `id` shows `out` on stdout and `err` on stderr (Docker copies
/// the two streams separately).
fn wait_logs(b: &DockerBed, id: &str, out: &str, err: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let logs = b.docker.docker_run(&["logs", id]).expect("docker logs");
        if stdout(&logs).contains(out) && stderr(&logs).contains(err) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{out:?} / {err:?} not in the logs of {id}: {logs:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

const TRAPPER: &str = "echo started; echo to-stderr >&2; \
                       trap 'echo got-term; exit 7' TERM; while true; do sleep 0.1; done";

/// A detached container through each runtime: `docker logs` shows its stdout and stderr,
/// `docker exec` returns the exec'd process's output and exit code, `docker stop` sends
/// SIGTERM (the trap's exit code; 143 behind `--init`), `docker rm` removes it, and the
/// shim leaves no state. Then, with containers of both runtimes running, dockerd's teardown
/// leaves nothing behind.
fn detached_exec_logs_stop(v: ContainerdVersion) {
    let b = bed(v);
    let youki_state = Path::new("/run/hyperbox/youki").join(b.docker.namespace());
    for runtime in RUNTIMES {
        let id = run_detached(&b, runtime, &[], &["sh", "-c", TRAPPER]);
        let logs = wait_logs(&b, &id, "started", "to-stderr");
        assert_eq!(stdout(&logs), "started\n", "{runtime}");
        assert_eq!(stderr(&logs), "to-stderr\n", "{runtime}");

        let exec = b
            .docker
            .docker()
            .args(["exec", &id, "sh", "-c", "echo in-exec; exit 5"])
            .stdin(Stdio::null())
            .output()
            .expect("docker exec runs");
        assert_eq!(exec.status.code(), Some(5), "{runtime}: {}", stderr(&exec));
        assert_eq!(stdout(&exec), "in-exec\n", "{runtime}");

        if runtime == HYPERBOX_RUNTIME {
            let fp = Footprint::of(b.docker.dir()).expect("footprint");
            assert!(
                fp.processes.iter().any(|p| p
                    .what
                    .contains("containerd-shim-hyperbox-v1")
                    && p.what.contains(&id)),
                "no hyperbox shim for {id}: {fp:#?}"
            );
            assert!(youki_state.join(&id).is_dir(), "no shim state for {id}");
        }

        b.docker
            .docker_run(&["stop", "--time", "30", &id])
            .expect("docker stop");
        assert_eq!(inspect(&b, &id, "{{.State.ExitCode}}"), "7", "{runtime}");
        let logs = b.docker.docker_run(&["logs", &id]).expect("docker logs");
        assert_eq!(stdout(&logs), "started\ngot-term\n", "{runtime}");
        b.docker.docker_run(&["rm", &id]).expect("docker rm");
        assert!(
            !youki_state.join(&id).exists(),
            "{runtime}: shim state of {id} left after docker rm"
        );

        // Behind docker-init, SIGTERM reaches `sleep`, which dies of it: 128 + 15.
        let id = run_detached(&b, runtime, &["--init"], &["sleep", "1000"]);
        b.docker.docker_run(&["stop", &id]).expect("docker stop");
        assert_eq!(inspect(&b, &id, "{{.State.ExitCode}}"), "143", "{runtime}");
        b.docker.docker_run(&["rm", &id]).expect("docker rm");
    }

    // Teardown with containers of both runtimes running.
    let mut pids = Vec::new();
    for runtime in RUNTIMES {
        let id = run_detached(&b, runtime, &[], &["sleep", "1000"]);
        pids.push(inspect(&b, &id, "{{.State.Pid}}").parse::<u32>().unwrap());
    }
    let fp = Footprint::of(b.docker.dir()).expect("footprint");
    for pid in &pids {
        assert!(fp.processes.iter().any(|p| p.pid == *pid), "{fp:#?}");
    }
    assert!(
        fp.processes.iter().any(|p| p.what.contains("dockerd")),
        "{fp:#?}"
    );
    assert!(!fp.mounts.is_empty(), "no overlay2 mount seen: {fp:#?}");
    assert!(!fp.cgroups.is_empty(), "no container cgroup seen: {fp:#?}");
    assert!(!fp.shim_sockets.is_empty(), "no shim socket seen: {fp:#?}");
    let containerd_fp = Footprint::of(b.containerd.dir()).expect("containerd footprint");
    drop(b);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
    assert_eq!(containerd_fp.leftovers(), Vec::<String>::new());
    assert!(!youki_state.exists(), "{} left", youki_state.display());
}
per_version!(detached, detached_exec_logs_stop);

/// `docker run -t` under a pseudo-terminal gives the container a terminal through each
/// runtime, `-it` carries typed input to it, and the exit code comes back.
fn tty(v: ContainerdVersion) {
    let b = bed(v);
    let limit = Duration::from_secs(60);
    for runtime in RUNTIMES {
        let mut run = b.docker.docker();
        run.args([
            "run",
            "--rm",
            "-t",
            "--network",
            "none",
            "--runtime",
            runtime,
        ])
        .args([&b.image, "sh", "-c", "tty; exit 4"]);
        let out = run_in_pty(run, b"", limit).expect("docker run -t");
        assert!(out.output.contains("/dev/pts/"), "{runtime}: {out:?}");
        assert_eq!(out.status.code(), Some(4), "{runtime}: {out:?}");

        let mut run = b.docker.docker();
        run.args([
            "run",
            "--rm",
            "-it",
            "--network",
            "none",
            "--runtime",
            runtime,
        ])
        .args([&b.image, "sh"]);
        let out = run_in_pty_when(run, "# ", b"echo typed-$((6*7))\nexit 2\n", limit)
            .expect("docker -it");
        assert!(out.output.contains("typed-42"), "{runtime}: {out:?}");
        assert_eq!(out.status.code(), Some(2), "{runtime}: {out:?}");
    }
}
per_version!(tty, tty);

/// The memory limit file of `pid`'s cgroup (v1 memory controller, or v2) and its cgroup path.
fn memory_limit(pid: u32) -> (String, String) {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup of pid");
    let v1 = cgroups.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        ctrl.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    });
    let (file, path) = match v1 {
        Some(path) => (
            PathBuf::from(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")),
            path,
        ),
        None => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a v2 cgroup")
                .to_string();
            (
                PathBuf::from(format!("/sys/fs/cgroup{path}/memory.max")),
                path,
            )
        }
    };
    let limit = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    (limit.trim().to_string(), path)
}

/// `docker run --memory 64m` sets the container's cgroup memory limit through each runtime,
/// in the cgroup Docker asked for (`/PARENT/ID`), and the container sees the same limit.
fn memory_limit_applies(v: ContainerdVersion) {
    let b = bed(v);
    let mut inside = Vec::new();
    for runtime in RUNTIMES {
        let id = run_detached(&b, runtime, &["--memory", "64m"], &["sleep", "1000"]);
        let pid: u32 = inspect(&b, &id, "{{.State.Pid}}").parse().unwrap();
        let (limit, path) = memory_limit(pid);
        assert_eq!(limit, "67108864", "{runtime}: cgroup {path}");
        assert_eq!(path, format!("/{}/{id}", b.docker.namespace()), "{runtime}");
        let seen = b
            .docker
            .docker_stdout(&[
                "exec",
                &id,
                "sh",
                "-c",
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes \
                 2>/dev/null || cat /sys/fs/cgroup/memory.max",
            ])
            .expect("limit inside");
        inside.push(seen);
        b.docker.docker_run(&["rm", "-f", &id]).expect("docker rm");
    }
    assert_eq!(inside[0], "67108864", "runc");
    assert_eq!(inside[1], inside[0], "hyperbox vs runc, seen inside");
}
per_version!(memory_limit, memory_limit_applies);

// --- config/ ----------------------------------------------------------------------------

/// The value at `keys` of a TOML document.
fn toml_at<'a>(doc: &'a toml::Table, keys: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = keys.split_first()?;
    rest.iter()
        .try_fold(doc.get(*first)?, |v, k| v.as_table()?.get(*k))
}

fn read_toml(name: &str) -> toml::Table {
    let path = config_file(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()))
}

/// Each snippet parses and names the same runtimes: the CRI runtime tables `hyperbox` and
/// `hyperbox-wasm` of both containerd configs (`runtime_type` is the shim's runtime name) are
/// the RuntimeClasses' handlers, and docker-daemon.json registers the same runtime types.
#[test]
fn config_snippets_agree() {
    let v2 = read_toml("containerd-runtime.toml");
    assert_eq!(v2.get("version").and_then(toml::Value::as_integer), Some(2));
    let v2_runtimes = [
        "plugins",
        "io.containerd.grpc.v1.cri",
        "containerd",
        "runtimes",
    ];
    let v3 = read_toml("containerd-runtime.v3.toml");
    assert_eq!(v3.get("version").and_then(toml::Value::as_integer), Some(3));
    let v3_runtimes = [
        "plugins",
        "io.containerd.cri.v1.runtime",
        "containerd",
        "runtimes",
    ];
    for (doc, path) in [(&v2, &v2_runtimes), (&v3, &v3_runtimes)] {
        let runtimes = toml_at(doc, path)
            .and_then(toml::Value::as_table)
            .expect("CRI runtimes table");
        let names: Vec<&String> = runtimes.keys().collect();
        assert_eq!(names, [HYPERBOX_RUNTIME, WASM_NAME]);
        for (name, runtime_type) in [(HYPERBOX_RUNTIME, RUNTIME), (WASM_NAME, WASM_RUNTIME)] {
            assert_eq!(
                runtimes[name]
                    .get("runtime_type")
                    .and_then(toml::Value::as_str),
                Some(runtime_type)
            );
        }
    }

    let path = config_file("docker-daemon.json");
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&path).unwrap()).expect("docker-daemon.json");
    assert_eq!(json["runtimes"][HYPERBOX_RUNTIME]["runtimeType"], RUNTIME);
    assert_eq!(json["runtimes"][WASM_NAME]["runtimeType"], WASM_RUNTIME);

    // runtimeclass*.yaml: flat `key: value` lines are all they have (no YAML parser here).
    for (file, handler) in [
        ("runtimeclass.yaml", HYPERBOX_RUNTIME),
        ("runtimeclass-wasm.yaml", WASM_NAME),
    ] {
        let yaml = fs::read_to_string(config_file(file)).unwrap();
        let value = |key: &str| {
            yaml.lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
                .map(str::trim)
                .map(str::to_string)
        };
        assert_eq!(value("apiVersion").as_deref(), Some("node.k8s.io/v1"));
        assert_eq!(value("kind").as_deref(), Some("RuntimeClass"));
        assert_eq!(value("name").as_deref(), Some(handler));
        assert_eq!(value("handler").as_deref(), Some(handler), "{yaml}");
    }

    // templates-pods.yaml: only annotations the shim knows, one template captured and
    // restored, through the RuntimeClass above.
    let yaml = fs::read_to_string(config_file("templates-pods.yaml")).unwrap();
    let pairs: Vec<(&str, &str)> = yaml
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.trim().split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let known = [
        template::CAPTURE,
        template::READY_FILE,
        template::READY_DELAY,
        template::TIMEOUT,
        template::RESTORE_FROM,
        template::CONTAINER,
    ];
    let ours: Vec<&(&str, &str)> = pairs
        .iter()
        .filter(|(k, _)| k.starts_with("io.hyperbox."))
        .collect();
    assert!(ours.iter().all(|(k, _)| known.contains(k)), "{ours:?}");
    let get = |key: &str| ours.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    assert_eq!(get(template::CAPTURE), get(template::RESTORE_FROM));
    assert!(get(template::CAPTURE).is_some());
    assert_eq!(
        pairs
            .iter()
            .filter(|(k, v)| *k == "runtimeClassName" && *v == HYPERBOX_RUNTIME)
            .count(),
        2
    );
}

/// containerd itself reads config/containerd-runtime.toml (1.6, 1.7: config version 2) and
/// config/containerd-runtime.v3.toml (2.x: version 3): `containerd config dump` of a config
/// importing it shows the CRI runtime `hyperbox` with our runtime_type, in the plugin that
/// version keeps CRI's runtimes in. The harness's daemons run with CRI disabled, and
/// containerd then leaves CRI's settings out of the dump, so the dumped config enables CRI
/// (`config dump` starts no plugin).
fn containerd_reads_the_runtime_config(v: ContainerdVersion) {
    hyperbox_integration::containerd::check_installed(v).expect("containerd installed");
    let mut sandbox = Sandbox::create("config-dump").expect("sandbox");
    let dir = sandbox.dir().to_path_buf();
    let (file, config_version, cri_plugin) = if v.is_2x() {
        (
            "containerd-runtime.v3.toml",
            3,
            "io.containerd.cri.v1.runtime",
        )
    } else {
        ("containerd-runtime.toml", 2, "io.containerd.grpc.v1.cri")
    };
    let snippet = config_file(file)
        .canonicalize()
        .unwrap_or_else(|e| panic!("config/{file}: {e}"));
    let config = dir.join("config.toml");
    fs::write(
        &config,
        format!(
            "version = {config_version}\nroot = \"{}/root\"\nstate = \"{}/state\"\n\
             imports = [\"{}\"]\n",
            dir.display(),
            dir.display(),
            snippet.display()
        ),
    )
    .unwrap();
    let out = Command::new(v.containerd())
        .arg("--config")
        .arg(&config)
        .args(["config", "dump"])
        .stdin(Stdio::null())
        .output()
        .expect("containerd config dump");
    assert!(out.status.success(), "{}", stderr(&out));
    let dump: toml::Table = stdout(&out).parse().expect("the dump is TOML");
    let imports = dump.get("imports").and_then(toml::Value::as_array);
    assert!(
        imports.is_some_and(|i| i.iter().any(|p| p.as_str() == snippet.to_str())),
        "{snippet:?} not imported: {imports:?}"
    );
    let runtime = toml_at(
        &dump,
        &[
            "plugins",
            cri_plugin,
            "containerd",
            "runtimes",
            HYPERBOX_RUNTIME,
        ],
    )
    .and_then(toml::Value::as_table)
    .unwrap_or_else(|| {
        panic!(
            "no runtime {HYPERBOX_RUNTIME} in the dump:\n{}",
            stdout(&out)
        )
    });
    assert_eq!(
        runtime.get("runtime_type").and_then(toml::Value::as_str),
        Some(RUNTIME)
    );
    let annotations = runtime
        .get("pod_annotations")
        .and_then(toml::Value::as_array);
    assert!(
        annotations.is_some_and(|a| a.iter().any(|x| x.as_str() == Some("io.hyperbox.*"))),
        "{runtime:?}"
    );
    let wasm = toml_at(
        &dump,
        &["plugins", cri_plugin, "containerd", "runtimes", WASM_NAME],
    )
    .and_then(toml::Value::as_table)
    .unwrap_or_else(|| panic!("no runtime {WASM_NAME} in the dump:\n{}", stdout(&out)));
    assert_eq!(
        wasm.get("runtime_type").and_then(toml::Value::as_str),
        Some(WASM_RUNTIME)
    );
    sandbox.teardown().expect("teardown");
}
per_version!(containerd_config_dump, containerd_reads_the_runtime_config);

// --- an owner that dies -------------------------------------------------------------------

const REPORT_ENV: &str = "HYPERBOX_CHILD_REPORT";

#[test]
#[ignore = "run as a child process by killed_owner_leaves_nothing"]
fn child_docker_owner_waits_to_be_killed() {
    let b = bed(ContainerdVersion::selected()[0]);
    let id = run_detached(&b, HYPERBOX_RUNTIME, &[], &["sleep", "1000"]);
    let pid: u32 = inspect(&b, &id, "{{.State.Pid}}").parse().unwrap();
    let fps = vec![
        Footprint::of(b.docker.dir()).unwrap(),
        Footprint::of(b.containerd.dir()).unwrap(),
    ];
    assert!(fps[0].processes.iter().any(|p| p.pid == pid), "{fps:#?}");
    assert!(!fps[0].mounts.is_empty(), "{fps:#?}");
    let path = PathBuf::from(std::env::var(REPORT_ENV).expect("report path"));
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec(&fps).unwrap()).unwrap();
    fs::rename(&tmp, &path).unwrap();
    thread::sleep(Duration::from_secs(600));
    drop(b);
}

/// A test owning a dockerd with a hyperbox container running is killed with SIGKILL: the
/// guards remove dockerd, the container, its shim, mounts and cgroups.
#[test]
fn killed_owner_leaves_nothing() {
    let report =
        std::env::temp_dir().join(format!("hyperbox-docker-kill-{}.json", std::process::id()));
    let _ = fs::remove_file(&report);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "child_docker_owner_waits_to_be_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(REPORT_ENV, &report)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("child test starts");
    let deadline = Instant::now() + Duration::from_secs(300);
    let fps: Vec<Footprint> = loop {
        if let Ok(data) = fs::read(&report) {
            let _ = fs::remove_file(&report);
            break serde_json::from_slice(&data).expect("report parses");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the child test ended ({status}) without a report");
        }
        assert!(Instant::now() < deadline, "child wrote no report");
        thread::sleep(Duration::from_millis(100));
    };
    child.kill().expect("SIGKILL to the owner");
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for fp in fps {
        loop {
            let left = fp.leftovers();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the guard left {left:?} of {}",
                fp.dir.display()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

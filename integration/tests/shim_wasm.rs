//! `containerd-shim-hyperbox-wasm-v1` under a real containerd of each version, driven with
//! `ctr`: WebAssembly guests (written in WAT, compiled here) in a root filesystem given with
//! `ctr run --rootfs`, their output, args, env, files and exit codes, signals, the memory
//! limit, invalid binaries, the compile cache, native containers through the same runtime,
//! and many guests at once; OCI wasm images (runwasi's format) pulled from the loopback
//! registry (containerd 1.7); a `wasi:http/incoming-handler` component (Rust, built here for
//! `wasm32-wasip2`) answering inside its network namespace.
//!
//! The shim binary must be built first (`cargo build -p hyperbox-shim-wasm`); the harness
//! registers it from the target directory as runtime `io.containerd.hyperbox-wasm.v1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::per_version;
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::wasm_image::{
    WasmImage, WasmImageBuilder, WASM_COMPONENT_LAYER, WASM_LAYER,
};
use sha2::{Digest, Sha256};

const RUNTIME: &str = "io.containerd.hyperbox-wasm.v1";
const CACHE_DIR: &str = "/var/lib/hyperbox/wasm-cache";

/// Prints a greeting, its args and environment (one per line), then the rootfs file
/// `/data/greeting.txt`. `TAG` makes the binary unique, for tests of the compile cache.
const ECHO: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open" (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 4)
  (data (i32.const 0) "hello from wasm\n")
  (data (i32.const 16) "args:\n")
  (data (i32.const 22) "env:\n")
  (data (i32.const 27) "file:\n")
  (data (i32.const 33) "data/greeting.txt")
  (data (i32.const 60000) "TAG")
  (func $print (param $ptr i32) (param $len i32)
    (i32.store (i32.const 1024) (local.get $ptr))
    (i32.store (i32.const 1028) (local.get $len))
    (drop (call $fd_write (i32.const 1) (i32.const 1024) (i32.const 1) (i32.const 1032))))
  (func $nul_to_newline (param $ptr i32) (param $len i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (if (i32.eqz (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))
          (then (i32.store8 (i32.add (local.get $ptr) (local.get $i)) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next))))
  (func (export "_start")
    (call $print (i32.const 0) (i32.const 16))
    (call $print (i32.const 16) (i32.const 6))
    (drop (call $args_sizes_get (i32.const 2000) (i32.const 2004)))
    (drop (call $args_get (i32.const 4096) (i32.const 8192)))
    (call $nul_to_newline (i32.const 8192) (i32.load (i32.const 2004)))
    (call $print (i32.const 8192) (i32.load (i32.const 2004)))
    (call $print (i32.const 22) (i32.const 5))
    (drop (call $environ_sizes_get (i32.const 2000) (i32.const 2004)))
    (drop (call $environ_get (i32.const 12288) (i32.const 16384)))
    (call $nul_to_newline (i32.const 16384) (i32.load (i32.const 2004)))
    (call $print (i32.const 16384) (i32.load (i32.const 2004)))
    (call $print (i32.const 27) (i32.const 6))
    (if (call $path_open (i32.const 3) (i32.const 1) (i32.const 33) (i32.const 17)
          (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 2008))
      (then (call $proc_exit (i32.const 3))))
    (i32.store (i32.const 1040) (i32.const 32768))
    (i32.store (i32.const 1044) (i32.const 4096))
    (drop (call $fd_read (i32.load (i32.const 2008)) (i32.const 1040) (i32.const 1) (i32.const 2012)))
    (call $print (i32.const 32768) (i32.load (i32.const 2012)))))
"#;

/// Exits 7 from `_start`, 5 from the export `other`.
const EXIT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7)))
  (func (export "other") (call $exit (i32.const 5))))
"#;

/// Never ends.
const LOOP: &str =
    r#"(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))"#;

/// Grows its memory 1 MiB at a time, forever; traps when growing fails.
const GROW: &str = r#"
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $grow
      (if (i32.eq (memory.grow (i32.const 16)) (i32.const -1)) (then unreachable))
      (br $grow))))
"#;

/// A WASI preview 2 component whose `wasi:cli/run` returns ok, or err when `ok` is false.
fn component(ok: bool) -> Vec<u8> {
    wasm(&format!(
        r#"(component
          (core module $m (func (export "run") (result i32) i32.const {}))
          (core instance $i (instantiate $m))
          (func $run (result (result)) (canon lift (core func $i "run")))
          (instance $runner (export "run" (func $run)))
          (export "wasi:cli/run@0.2.0" (instance $runner)))"#,
        if ok { 0 } else { 1 }
    ))
}

fn wasm(wat: &str) -> Vec<u8> {
    wat::parse_str(wat).expect("test guest assembles")
}

/// The echo guest, made unique by `tag`.
fn echo(tag: &str) -> Vec<u8> {
    wasm(&ECHO.replace("TAG", tag))
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

fn daemon(v: ContainerdVersion) -> Containerd {
    let c = Containerd::start(v).expect("containerd");
    assert!(
        c.runtimes().iter().any(|r| r == RUNTIME),
        "{RUNTIME} is not registered: build containerd-shim-hyperbox-wasm-v1 first \
         (cargo build -p hyperbox-shim-wasm)"
    );
    c
}

/// A root filesystem in the daemon's sandbox holding `files` (path, content) and
/// `/data/greeting.txt`.
fn rootfs(c: &Containerd, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let dir = c.dir().join(format!("rootfs-{name}"));
    fs::create_dir_all(dir.join("data")).unwrap();
    fs::write(dir.join("data/greeting.txt"), "hi from the rootfs\n").unwrap();
    for (path, content) in files {
        fs::write(dir.join(path.trim_start_matches('/')), content).unwrap();
    }
    dir
}

/// `ctr run --rm` of `args` in `rootfs` through the wasm runtime, `flags` before the
/// positional arguments.
fn ctr_run(c: &Containerd, rootfs: &Path, id: &str, flags: &[&str], args: &[&str]) -> Child {
    c.ctr()
        .args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args(flags)
        .arg("--rootfs")
        .arg(rootfs)
        .arg(id)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr runs")
}

fn run(c: &Containerd, rootfs: &Path, id: &str, flags: &[&str], args: &[&str]) -> Output {
    c.wait_ctr(
        ctr_run(c, rootfs, id, flags, args),
        Duration::from_secs(120),
    )
    .expect("ctr")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn explain(out: &Output, c: &Containerd) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr),
        c.log_tail(30)
    )
}

fn task_line(c: &Containerd, id: &str) -> Option<String> {
    let tasks = c.ctr_stdout(&["tasks", "ls"]).expect("tasks ls");
    tasks
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .map(str::to_string)
}

/// Waits until task `id` runs (the guest's `_start` has been called by then or is about to
/// be: Start returned).
fn wait_running(c: &Containerd, id: &str, ctr: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if task_line(c, id).is_some_and(|l| l.contains("RUNNING")) {
            return;
        }
        if let Some(status) = ctr.try_wait().unwrap() {
            panic!("ctr ended ({status}) before task {id} ran");
        }
        assert!(Instant::now() < deadline, "task {id} never ran");
        thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, field: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap_or_default()
}

fn parent_of(pid: u32) -> u32 {
    status_field(pid, "PPid:").parse().expect("a parent pid")
}

/// The daemon log's lines (the shims' logs are copied there) that mention `digest`, once
/// at least `want` of them say `what`.
fn log_lines_saying(c: &Containerd, digest: &str, what: &str, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = fs::read_to_string(c.log_path()).unwrap_or_default();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(digest))
            .map(str::to_string)
            .collect();
        if lines.iter().filter(|l| l.contains(what)).count() >= want || Instant::now() > deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn count(lines: &[String], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

/// The cache entries of the guest whose digest is `digest`.
fn cache_entries(digest: &str) -> Vec<PathBuf> {
    fs::read_dir(CACHE_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with(digest) && name.ends_with(".cwasm")
                })
                .collect()
        })
        .unwrap_or_default()
}

fn guest_sees_args_env_and_rootfs(v: ContainerdVersion) {
    let c = daemon(v);
    let guest = echo("io");
    let exit = wasm(EXIT);
    let (ok, err) = (component(true), component(false));
    let root = rootfs(
        &c,
        "io",
        &[
            ("/echo.wasm", &guest),
            ("/exit.wasm", &exit),
            ("/ok.wasm", &ok),
            ("/err.wasm", &err),
        ],
    );

    let out = run(
        &c,
        &root,
        "echo",
        &["--env", "GREETING=hi there"],
        &["/echo.wasm", "one", "two words"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &c));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("hello from wasm\n"), "{stdout}");
    assert!(
        stdout.contains("args:\n/echo.wasm\none\ntwo words\nenv:\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nGREETING=hi there\n"), "{stdout}");
    assert!(stdout.ends_with("file:\nhi from the rootfs\n"), "{stdout}");

    let out = run(&c, &root, "exit7", &[], &["/exit.wasm"]);
    assert_eq!(out.status.code(), Some(7), "{}", explain(&out, &c));
    // `file.wasm#export` runs that export.
    let out = run(&c, &root, "exit5", &[], &["/exit.wasm#other"]);
    assert_eq!(out.status.code(), Some(5), "{}", explain(&out, &c));
    // Components run through `wasi:cli/run`: its result is the exit code.
    let out = run(&c, &root, "component-ok", &[], &["/ok.wasm"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &c));
    let out = run(&c, &root, "component-err", &[], &["/err.wasm"]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, &c));
    assert!(task_line(&c, "echo").is_none(), "--rm left the task behind");
}
per_version!(guest_io, guest_sees_args_env_and_rootfs);

fn a_looping_guest_ends_on_signals(v: ContainerdVersion) {
    let c = daemon(v);
    let root = rootfs(&c, "loop", &[("/loop.wasm", &wasm(LOOP))]);
    for (signal, code) in [("SIGKILL", 137), ("SIGTERM", 143)] {
        let id = format!("loop-{}", signal.to_lowercase());
        let mut ctr = ctr_run(&c, &root, &id, &[], &["/loop.wasm"]);
        wait_running(&c, &id, &mut ctr);
        if signal == "SIGKILL" {
            // Compiling left the zygote with one thread: libcontainer may fork it again.
            let pid: u32 = task_line(&c, &id)
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .expect("task pid");
            let shim = parent_of(pid);
            let zygote = fs::read_to_string(format!("/proc/{shim}/task/{shim}/children"))
                .unwrap()
                .split_whitespace()
                .map(|p| p.parse::<u32>().unwrap())
                .find(|p| *p != pid)
                .expect("the shim's zygote");
            assert_eq!(status_field(zygote, "Threads:"), "1", "zygote {zygote}");
            // The guest is in the container's cgroup: its metrics come from there.
            let metrics = c.ctr_stdout(&["tasks", "metrics", &id]).expect("metrics");
            assert!(metrics.contains("pids.current"), "{metrics}");
            // The guest is the init: there is nothing to exec beside it.
            let exec = c
                .ctr()
                .args(["tasks", "exec", "--exec-id", "extra", &id, "/loop.wasm"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            assert!(!exec.status.success(), "exec into a wasm container ran");
            assert!(
                text(&exec.stderr).contains("exec is not supported in WebAssembly containers"),
                "{}",
                text(&exec.stderr)
            );
        }
        c.ctr_run(&["tasks", "kill", "-s", signal, &id])
            .expect("kill");
        let out = c.wait_ctr(ctr, Duration::from_secs(120)).expect("ctr");
        assert_eq!(out.status.code(), Some(code), "{}", explain(&out, &c));
    }
}
per_version!(signals, a_looping_guest_ends_on_signals);

fn memory_past_the_limit_fails_clearly(v: ContainerdVersion) {
    let c = daemon(v);
    let root = rootfs(&c, "grow", &[("/grow.wasm", &wasm(GROW))]);
    let limit = 64 * 1024 * 1024;
    let out = run(
        &c,
        &root,
        "grow",
        &["--memory-limit", &limit.to_string()],
        &["/grow.wasm"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", explain(&out, &c));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "hyperbox-wasm: guest memory limit of {limit} bytes reached"
        )),
        "{}",
        explain(&out, &c)
    );
}
per_version!(memory_limit, memory_past_the_limit_fails_clearly);

fn an_invalid_guest_fails_create_naming_it(v: ContainerdVersion) {
    let c = daemon(v);
    let root = rootfs(
        &c,
        "bad",
        &[
            ("/bad.wasm", b"\0asm\x01\0\0\0 this is no module"),
            ("/notes.wasm", b"plain text"),
        ],
    );
    for (id, name) in [("bad", "/bad.wasm"), ("notes", "/notes.wasm")] {
        let out = run(&c, &root, id, &[], &[name]);
        assert!(!out.status.success(), "{}", explain(&out, &c));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot compile {name}")),
            "{}",
            explain(&out, &c)
        );
        assert!(task_line(&c, id).is_none(), "a failed create left a task");
    }
    let out = run(&c, &root, "missing", &[], &["/missing.wasm"]);
    assert!(!out.status.success(), "{}", explain(&out, &c));
    assert!(
        text(&out.stderr)
            .contains("the WebAssembly guest /missing.wasm is not in the container's root"),
        "{}",
        explain(&out, &c)
    );
}
per_version!(invalid_guest, an_invalid_guest_fails_create_naming_it);

fn the_second_start_is_a_cache_hit_and_a_corrupt_entry_is_recompiled(v: ContainerdVersion) {
    let c = daemon(v);
    let guest = echo(&unique("cache"));
    let digest = hex::encode(Sha256::digest(&guest));
    let root = rootfs(&c, "cache", &[("/echo.wasm", &guest)]);
    let expect_ok = |id: &str| {
        let out = run(&c, &root, id, &[], &["/echo.wasm"]);
        assert_eq!(out.status.code(), Some(0), "{}", explain(&out, &c));
        assert!(
            text(&out.stdout).ends_with("file:\nhi from the rootfs\n"),
            "{}",
            explain(&out, &c)
        );
    };

    expect_ok("first");
    let lines = log_lines_saying(&c, &digest, "compiled", 1);
    assert_eq!(count(&lines, "compiled"), 1, "{lines:#?}");
    assert_eq!(count(&lines, "cache hit"), 0, "{lines:#?}");
    let entries = cache_entries(&digest);
    assert_eq!(entries.len(), 1, "cache entries: {entries:?}");

    expect_ok("second");
    let lines = log_lines_saying(&c, &digest, "cache hit", 1);
    assert_eq!(count(&lines, "cache hit"), 1, "{lines:#?}");
    assert_eq!(count(&lines, "compiled"), 1, "{lines:#?}");

    // One flipped bit in the compiled code: detected, recompiled, and the guest still runs.
    let mut data = fs::read(&entries[0]).unwrap();
    let at = data.len() / 2;
    data[at] ^= 0x01;
    fs::write(&entries[0], &data).unwrap();
    expect_ok("third");
    let lines = log_lines_saying(&c, &digest, "compiled", 2);
    assert_eq!(count(&lines, "compiled"), 2, "{lines:#?}");
    let log = fs::read_to_string(c.log_path()).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("corrupt compile cache entry")
                && l.contains(&*entries[0].to_string_lossy())),
        "no corrupt entry reported:\n{}",
        c.log_tail(30)
    );

    // Rewritten whole: a hit again.
    expect_ok("fourth");
    let lines = log_lines_saying(&c, &digest, "cache hit", 2);
    assert_eq!(count(&lines, "cache hit"), 2, "{lines:#?}");
    assert_eq!(count(&lines, "compiled"), 2, "{lines:#?}");

    for e in cache_entries(&digest) {
        let _ = fs::remove_file(e);
    }
}
per_version!(
    compile_cache,
    the_second_start_is_a_cache_hit_and_a_corrupt_entry_is_recompiled
);

fn native_containers_run_through_the_wasm_runtime(v: ContainerdVersion) {
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    let image = bed.image(TestImage::Busybox).expect("busybox pulled");
    let out = c
        .wait_ctr(
            c.ctr()
                .args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
                .arg(c.dir().join("fifo"))
                .args([image.as_str(), "native", "sh", "-c", "echo native; exit 4"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
            Duration::from_secs(120),
        )
        .expect("ctr");
    assert_eq!(out.status.code(), Some(4), "{}", explain(&out, c));
    assert_eq!(text(&out.stdout), "native\n");

    // Exec into a native container works as under the youki runtime.
    c.ctr_run(&[
        "run",
        "-d",
        "--null-io",
        "--runtime",
        RUNTIME,
        &image,
        "native-d",
        "sleep",
        "1000",
    ])
    .expect("detached run");
    let exec = c
        .ctr_run(&[
            "tasks",
            "exec",
            "--exec-id",
            "e1",
            "native-d",
            "sh",
            "-c",
            "echo from exec",
        ])
        .expect("exec into a native container");
    assert_eq!(text(&exec.stdout), "from exec\n");
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "native-d"])
        .expect("kill");
}
per_version!(native, native_containers_run_through_the_wasm_runtime);

/// 50 guests started at once (50 `ctr run`, 50 shims) all complete, each
/// with its own args and environment on its own stdout. No timing is asserted: on a small
/// machine they queue for the CPUs, so each `ctr` gets a generous limit.
fn many_guests_at_once_keep_their_own_output(v: ContainerdVersion) {
    const N: usize = 50;
    let c = daemon(v);
    let guest = echo(&unique("parallel"));
    let root = rootfs(&c, "parallel", &[("/echo.wasm", &guest)]);
    let children: Vec<(String, Child)> = (0..N)
        .map(|i| {
            let marker = format!("guest-{i}");
            let env = format!("MARKER={marker}");
            let child = ctr_run(
                &c,
                &root,
                &format!("par-{i}"),
                &["--env", &env],
                &["/echo.wasm", &marker],
            );
            (marker, child)
        })
        .collect();
    let mut completed = 0;
    for (marker, child) in children {
        let out = c.wait_ctr(child, Duration::from_secs(600)).expect("ctr");
        assert_eq!(
            out.status.code(),
            Some(0),
            "{marker}: {}",
            explain(&out, &c)
        );
        let stdout = text(&out.stdout);
        let args: Vec<&str> = stdout
            .split("args:\n")
            .nth(1)
            .and_then(|s| s.split("\nenv:\n").next())
            .unwrap_or_default()
            .lines()
            .collect();
        assert_eq!(args, ["/echo.wasm", marker.as_str()], "{stdout}");
        assert!(
            stdout.contains(&format!("\nMARKER={marker}\n")),
            "{marker}: {stdout}"
        );
        assert_eq!(stdout.matches("MARKER=").count(), 1, "{marker}: {stdout}");
        assert!(stdout.ends_with("file:\nhi from the rootfs\n"), "{stdout}");
        completed += 1;
    }
    assert_eq!(completed, N);
    // Every container is gone (`--rm`): none was left behind by a crowded start.
    let tasks = c.ctr_stdout(&["tasks", "ls", "-q"]).expect("tasks ls");
    assert!(tasks.trim().is_empty(), "tasks left: {tasks}");
    let containers = c
        .ctr_stdout(&["containers", "ls", "-q"])
        .expect("containers ls");
    assert!(
        containers.trim().is_empty(),
        "containers left: {containers}"
    );
    let digest = hex::encode(Sha256::digest(&guest));
    for e in cache_entries(&digest) {
        let _ = fs::remove_file(e);
    }
}
per_version!(parallel, many_guests_at_once_keep_their_own_output);

/// `ctr run --rm` of image `image` through the wasm runtime, with `args` after the id.
fn ctr_run_image(c: &Containerd, image: &str, id: &str, args: &[&str]) -> Child {
    c.ctr()
        .args(["run", "--rm", "--runtime", RUNTIME, "--fifo-dir"])
        .arg(c.dir().join("fifo"))
        .args([image, id])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ctr runs")
}

fn run_image(c: &Containerd, image: &str, id: &str, args: &[&str]) -> Output {
    c.wait_ctr(ctr_run_image(c, image, id, args), Duration::from_secs(120))
        .expect("ctr")
}

/// Builds `image` in the daemon's sandbox, pushes it to the test bed's registry as `name`
/// and pulls it (plain HTTP, as a user would); its reference.
fn push_and_pull(bed: &TestBed, image: WasmImageBuilder, name: &str) -> (String, WasmImage) {
    let written = image
        .write(&bed.containerd.dir().join(format!("image-{name}")))
        .expect("wasm image layout");
    let reference = written
        .push(&bed.registry.host(), &format!("wasm/{name}:1"))
        .expect("wasm image pushed");
    bed.containerd.pull(&reference).expect("wasm image pulled");
    (reference, written)
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap()
}

/// OCI wasm images in runwasi's format, `architecture: wasm`
/// with the guest as a raw layer, pulled from a registry by containerd 1.7 (which accepts
/// them from 1.7.7 on; 1.6 refuses the platform) and 2.1, and run from its content store. The wasm
/// layer is not part of the root filesystem: containerd unpacks only the image's tar layers
/// (here one holding `/data/greeting.txt`; without one the snapshot is empty).
#[test]
fn oci_wasm_image_runs_from_the_content_store() {
    oci_wasm_image_runs_from_the_content_store_on(ContainerdVersion::V1_7);
}

#[test]
#[cfg_attr(
    hyperbox_containerd2_unavailable,
    ignore = "containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder holding \
              containerd-2.1.9-src.tar.xz (CI sets it)"
)]
fn oci_wasm_image_runs_from_the_content_store_on_2_1() {
    oci_wasm_image_runs_from_the_content_store_on(ContainerdVersion::V2_1);
}

fn oci_wasm_image_runs_from_the_content_store_on(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    assert!(c.runtimes().iter().any(|r| r == RUNTIME));
    let guest = echo(&unique("image"));
    let (echo_ref, echo_image) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_files(&[("/data/greeting.txt", b"hi from a tar layer\n")])
            .expect("tar layer")
            .with_layer(WASM_LAYER, guest.clone())
            .with_cmd(&["echo.wasm", "from-cmd"])
            .with_env("GREETING=from the image"),
        "echo",
    );
    let layer = echo_image.layer_digests[1].clone();
    assert_eq!(hex_of(&layer), hex::encode(Sha256::digest(&guest)));

    // The image's Cmd and Env; the file comes from the tar layer.
    let out = run_image(c, &echo_ref, "image-echo", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, c));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("hello from wasm\n"), "{stdout}");
    assert!(
        stdout.contains("args:\necho.wasm\nfrom-cmd\nenv:\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nGREETING=from the image\n"), "{stdout}");
    assert!(stdout.ends_with("file:\nhi from a tar layer\n"), "{stdout}");
    // Compiled once, keyed by the layer's digest; the next container is a cache hit.
    let lines = log_lines_saying(c, hex_of(&layer), "compiled", 1);
    assert_eq!(count(&lines, "compiled"), 1, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("layer {layer} of image {echo_ref}"))),
        "{lines:#?}"
    );
    assert_eq!(cache_entries(hex_of(&layer)).len(), 1);
    // args[0] is only argv[0]: any name runs the image's layer.
    let out = run_image(c, &echo_ref, "image-args", &["any-name", "x y"]);
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out, c));
    assert!(
        text(&out.stdout).contains("args:\nany-name\nx y\nenv:\n"),
        "{}",
        explain(&out, c)
    );
    let lines = log_lines_saying(c, hex_of(&layer), "cache hit", 1);
    assert_eq!(count(&lines, "cache hit"), 1, "{lines:#?}");
    assert_eq!(count(&lines, "compiled"), 1, "{lines:#?}");
    for e in cache_entries(hex_of(&layer)) {
        let _ = fs::remove_file(e);
    }

    // A wasm-only image (empty root filesystem) with runwasi's component media type: the
    // exit code is the guest's, `NAME.wasm#export` picks an export.
    let (exit_ref, _) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_COMPONENT_LAYER, wasm(EXIT))
            .with_cmd(&["exit.wasm"]),
        "exit",
    );
    let out = run_image(c, &exit_ref, "image-exit7", &[]);
    assert_eq!(out.status.code(), Some(7), "{}", explain(&out, c));
    let out = run_image(c, &exit_ref, "image-exit5", &["exit.wasm#other"]);
    assert_eq!(out.status.code(), Some(5), "{}", explain(&out, c));
    // A component runs through wasi:cli/run.
    let (component_ref, _) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_COMPONENT_LAYER, component(false))
            .with_cmd(&["run.wasm"]),
        "component",
    );
    let out = run_image(c, &component_ref, "image-component", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out, c));
    assert!(
        task_line(c, "image-component").is_none(),
        "--rm left the task"
    );

    // An image guest is the container's init too: exec is refused, naming the layer.
    let (loop_ref, loop_image) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_LAYER, wasm(LOOP))
            .with_cmd(&["loop.wasm"]),
        "loop",
    );
    let mut ctr = ctr_run_image(c, &loop_ref, "image-loop", &[]);
    wait_running(c, "image-loop", &mut ctr);
    let exec = c
        .ctr()
        .args([
            "tasks",
            "exec",
            "--exec-id",
            "extra",
            "image-loop",
            "loop.wasm",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!exec.status.success(), "exec into a wasm container ran");
    let stderr = text(&exec.stderr);
    assert!(
        stderr.contains("exec is not supported in WebAssembly containers")
            && stderr.contains(&loop_image.layer_digests[0]),
        "{stderr}"
    );
    c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", "image-loop"])
        .expect("kill");
    let out = c.wait_ctr(ctr, Duration::from_secs(120)).expect("ctr");
    assert_eq!(out.status.code(), Some(137), "{}", explain(&out, c));
}

/// Wasm images the shim cannot run fail Create with a message naming the image and what is
/// wrong with it: no wasm layer, a layer that is not WebAssembly, one that does not compile,
/// and a layer corrupted in containerd's content store after the pull.
#[test]
fn a_bad_oci_wasm_image_fails_create_clearly() {
    a_bad_oci_wasm_image_fails_create_clearly_on(ContainerdVersion::V1_7);
}

#[test]
#[cfg_attr(
    hyperbox_containerd2_unavailable,
    ignore = "containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder holding \
              containerd-2.1.9-src.tar.xz (CI sets it)"
)]
fn a_bad_oci_wasm_image_fails_create_clearly_on_2_1() {
    a_bad_oci_wasm_image_fails_create_clearly_on(ContainerdVersion::V2_1);
}

fn a_bad_oci_wasm_image_fails_create_clearly_on(v: ContainerdVersion) {
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let bed = TestBed::start(v).expect("test bed");
    let c = &bed.containerd;
    let expect_failure = |reference: &str, id: &str, message: &str| {
        let out = run_image(c, reference, id, &[]);
        assert!(!out.status.success(), "{}", explain(&out, c));
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(message) && stderr.contains(reference),
            "expected {message:?} about {reference}: {}",
            explain(&out, c)
        );
        assert!(task_line(c, id).is_none(), "a failed create left a task");
    };

    let (no_layer, _) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_files(&[("/app.wasm", &wasm(EXIT))])
            .expect("tar layer")
            .with_cmd(&["/app.wasm"]),
        "no-layer",
    );
    expect_failure(&no_layer, "no-layer", "without a WebAssembly layer");

    let (not_wasm, _) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_LAYER, b"plain text, not a module".to_vec())
            .with_cmd(&["app.wasm"]),
        "not-wasm",
    );
    expect_failure(&not_wasm, "not-wasm", "is not a WebAssembly binary");

    let invalid = b"\0asm\x01\0\0\0 this is no module".to_vec();
    let (invalid_ref, invalid_image) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_LAYER, invalid)
            .with_cmd(&["app.wasm"]),
        "invalid",
    );
    expect_failure(
        &invalid_ref,
        "invalid",
        &format!("cannot compile layer {}", invalid_image.layer_digests[0]),
    );

    // One flipped bit in the pulled blob: containerd serves it as is; the shim checks it.
    let guest = echo(&unique("corrupt"));
    let (corrupt_ref, corrupt_image) = push_and_pull(
        &bed,
        WasmImageBuilder::new()
            .with_layer(WASM_LAYER, guest)
            .with_cmd(&["app.wasm"]),
        "corrupt",
    );
    let blob = c
        .dir()
        .join("root/io.containerd.content.v1.content/blobs/sha256")
        .join(hex_of(&corrupt_image.layer_digests[0]));
    let mut data = fs::read(&blob).expect("the layer in containerd's content store");
    let at = data.len() / 2;
    data[at] ^= 0x01;
    fs::write(&blob, &data).unwrap();
    expect_failure(
        &corrupt_ref,
        "corrupt",
        "is corrupt in containerd's content store",
    );
}

/// The source of a `wasi:http/incoming-handler` component in Rust (the `wasip2` crate's
/// bindings): answers every request with its path, the container's `GREETING` and how many
/// requests this instance has served (always 1: one instance per request).
const HTTP_GUEST_MANIFEST: &str = r#"[package]
name = "http-hello"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
crate-type = ["cdylib"]

[dependencies]
wasip2 = "=2.0.1"

[profile.release]
opt-level = "s"
strip = true

[workspace]
"#;

const HTTP_GUEST_SOURCE: &str = r#"
use std::sync::atomic::{AtomicU32, Ordering};

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

static SERVED: AtomicU32 = AtomicU32::new(0);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let served = SERVED.fetch_add(1, Ordering::SeqCst) + 1;
        let path = request.path_with_query().unwrap_or_default();
        let greeting = std::env::var("GREETING").unwrap_or_default();
        let text = format!("hello from wasi:http path={path} greeting={greeting} served={served}\n");
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(200).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        stream.blocking_write_and_flush(text.as_bytes()).unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasip2::http::proxy::export!(Hello);
"#;

/// The HTTP guest, built once per test run for `wasm32-wasip2` (cargo fetches `wasip2` the
/// first time) under the integration tests' scratch directory.
fn http_guest() -> Vec<u8> {
    static BUILT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wasm-guests/http-hello");
            fs::create_dir_all(dir.join("src")).unwrap();
            fs::write(dir.join("Cargo.toml"), HTTP_GUEST_MANIFEST).unwrap();
            fs::write(dir.join("src/lib.rs"), HTTP_GUEST_SOURCE).unwrap();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = std::process::Command::new(cargo)
                .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2"])
                .arg("--manifest-path")
                .arg(dir.join("Cargo.toml"))
                .arg("--target-dir")
                .arg(dir.join("target"))
                .env_remove("CARGO_TARGET_DIR")
                .stdin(Stdio::null())
                .output()
                .expect("cargo runs");
            assert!(
                out.status.success(),
                "building the HTTP guest failed (is `rustup target add wasm32-wasip2` done?):\n{}",
                text(&out.stderr)
            );
            fs::read(dir.join("target/wasm32-wasip2/release/http_hello.wasm"))
                .expect("the HTTP guest component")
        })
        .clone()
}

/// `GET path` over HTTP/1.0 (no chunked body to decode) to `127.0.0.1:port` from inside the network namespace of
/// process `pid` (a thread that joined it), waiting for the server to listen; the whole
/// response.
fn get_in_netns(pid: u32, port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let ns = fs::File::open(format!("/proc/{pid}/ns/net")).expect("the task's netns");
    let path = path.to_string();
    thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "nothing listens on {port}: {e}");
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("a response");
        response
    })
    .join()
    .expect("request thread")
}

/// A component exporting `wasi:http/incoming-handler` is served on the port
/// from the container's environment, in the container's own network namespace, one instance
/// per request; SIGTERM stops the server (143).
fn an_http_component_answers_inside_its_netns(v: ContainerdVersion) {
    const PORT: u16 = 8181;
    let guest = http_guest();
    let c = daemon(v);
    let root = rootfs(&c, "http", &[("/hello.wasm", &guest)]);
    let port_env = format!("HYPERBOX_HTTP_PORT={PORT}");
    let mut ctr = ctr_run(
        &c,
        &root,
        "http",
        &["--env", &port_env, "--env", "GREETING=hi there"],
        &["/hello.wasm"],
    );
    wait_running(&c, "http", &mut ctr);
    let pid: u32 = task_line(&c, "http")
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .expect("task pid");
    // A new network namespace has its loopback down (a CNI plugin would bring it up).
    let up = std::process::Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "link",
            "set",
            "lo",
            "up",
        ])
        .output()
        .expect("nsenter");
    assert!(up.status.success(), "{}", text(&up.stderr));

    for path in ["/first?x=1", "/second"] {
        let response = get_in_netns(pid, PORT, path);
        let status = response.lines().next().unwrap_or_default();
        assert!(status.ends_with(" 200 OK"), "{response}");
        assert!(
            response.ends_with(&format!(
                "\r\n\r\nhello from wasi:http path={path} greeting=hi there served=1\n"
            )),
            "{response}"
        );
    }

    c.ctr_run(&["tasks", "kill", "-s", "SIGTERM", "http"])
        .expect("kill");
    let out = c.wait_ctr(ctr, Duration::from_secs(120)).expect("ctr");
    assert_eq!(out.status.code(), Some(143), "{}", explain(&out, &c));
    assert!(
        text(&out.stderr).contains(&format!(
            "hyperbox-wasm: /hello.wasm: serving wasi:http/incoming-handler on http://0.0.0.0:{PORT}"
        )),
        "{}",
        explain(&out, &c)
    );
}
per_version!(http, an_http_component_answers_inside_its_netns);

//! `containerd-shim-hyperbox-wasm-v1` under a real containerd of each version, driven with
//! `ctr`: WebAssembly guests (written in WAT, compiled here) in a root filesystem given with
//! `ctr run --rootfs`, their output, args, env, files and exit codes, signals, the memory
//! limit, invalid binaries, the compile cache, native containers through the same runtime,
//! and many guests at once.
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

fn many_guests_at_once_keep_their_own_output(v: ContainerdVersion) {
    const N: usize = 24;
    let c = daemon(v);
    let guest = echo(&unique("parallel"));
    let root = rootfs(&c, "parallel", &[("/echo.wasm", &guest)]);
    let children: Vec<(String, Child)> = (0..N)
        .map(|i| {
            let marker = format!("guest-{i}");
            let child = ctr_run(
                &c,
                &root,
                &format!("par-{i}"),
                &[],
                &["/echo.wasm", &marker],
            );
            (marker, child)
        })
        .collect();
    for (marker, child) in children {
        let out = c.wait_ctr(child, Duration::from_secs(120)).expect("ctr");
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
        assert!(stdout.ends_with("file:\nhi from the rootfs\n"), "{stdout}");
    }
    let digest = hex::encode(Sha256::digest(&guest));
    for e in cache_entries(&digest) {
        let _ = fs::remove_file(e);
    }
}
per_version!(parallel, many_guests_at_once_keep_their_own_output);

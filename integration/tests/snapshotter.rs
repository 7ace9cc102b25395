//! `hyperbox-snapshotter` under the harness's containerd 1.6 and 1.7, registered as the proxy
//! plugin `hyperbox`: images pulled through it run through the runc shim (and concurrent pulls
//! share a layer), Usage matches `du`, removing an image gives its disk back, bad input gets
//! the error codes containerd's own overlayfs snapshotter gives, and a `kill -9` during an
//! unpack loses nothing while a running container keeps reading its files.
//!
//! The snapshotter runs in a sandbox of its own (root, socket and log inside it), so the
//! harness's guard kills it and removes its files whatever happens to the test.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, ListSnapshotsRequest, MountsRequest,
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest, UpdateSnapshotRequest,
    UsageRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Mount;
use hyperbox_integration::containerd::{Containerd, ContainerdError, ContainerdVersion};
use hyperbox_integration::host;
use hyperbox_integration::images::{self, TestImage};
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::{Footprint, Sandbox};
use hyperbox_integration::testbed::TestBed;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const BINARY: &str = "hyperbox-snapshotter";
const PLUGIN: &str = "hyperbox";

/// A `hyperbox-snapshotter` process in a sandbox of its own.
struct SnapshotterDaemon {
    child: Option<Child>,
    sandbox: Sandbox,
}

impl SnapshotterDaemon {
    fn start() -> Self {
        let sandbox = Sandbox::create("snapshotter").expect("snapshotter sandbox");
        let mut d = SnapshotterDaemon {
            child: None,
            sandbox,
        };
        d.spawn();
        d
    }

    fn dir(&self) -> &Path {
        self.sandbox.dir()
    }

    fn socket(&self) -> PathBuf {
        self.dir().join("snapshotter.sock")
    }

    fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    fn log_path(&self) -> PathBuf {
        self.dir().join("snapshotter.log")
    }

    fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the binary on the sandbox's root and socket and waits until it accepts.
    fn spawn(&mut self) {
        let binary = host::workspace_binary(BINARY).unwrap_or_else(|| {
            panic!(
                "{BINARY} is not built next to this test ({:?}): \
                 cargo build -p hyperbox-snapshotter first",
                host::workspace_bin_dir()
            )
        });
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("snapshotter log");
        let socket = self.socket();
        let _ = fs::remove_file(&socket);
        let child = Command::new(&binary)
            .arg("--config")
            .arg(self.write_config())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        self.sandbox.track(&child, BINARY).expect("track");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(&socket).is_err() {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            assert!(
                !exited && Instant::now() < deadline,
                "{BINARY} did not come up on {}:\n{}",
                socket.display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The config file, naming every option (the test also checks it is accepted).
    fn write_config(&self) -> PathBuf {
        let path = self.dir().join("snapshotter.toml");
        let text = format!(
            "root = \"{}\"\naddress = \"{}\"\nsocket_mode = 0o600\nlog_level = \"info\"\n",
            self.root().display(),
            self.socket().display()
        );
        fs::write(&path, text).expect("write config");
        path
    }

    /// Sends `signal` and reaps the process.
    fn stop(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
            let _ = self.sandbox.untrack(child.id());
        }
    }

    /// Names of the entries of `ROOT/sub`.
    fn entries(&self, sub: &str) -> BTreeSet<String> {
        fs::read_dir(self.root().join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        self.stop(Signal::SIGTERM);
        if let Err(e) = self.sandbox.teardown() {
            eprintln!("snapshotter sandbox teardown: {e}");
        }
    }
}

/// containerd with the snapshotter registered, and the registry. Field order is drop order:
/// containerd (and its containers' mounts of our layers) goes before the snapshotter.
struct Fixture {
    bed: TestBed,
    snap: SnapshotterDaemon,
}

impl Fixture {
    fn start(v: ContainerdVersion) -> Fixture {
        let snap = SnapshotterDaemon::start();
        let builder = Containerd::builder(v).with_proxy_plugin(PLUGIN, "snapshot", snap.socket());
        let bed = TestBed::with_builder(builder).expect("test bed");
        Fixture { bed, snap }
    }

    fn c(&self) -> &Containerd {
        &self.bed.containerd
    }

    /// Builds (or takes from the cache) and pushes `image`; returns its reference.
    fn push(&self, image: TestImage) -> String {
        let built = TestBed::build(image).expect("image built");
        let repo_tag = format!("hyperbox/{}:latest", image.name());
        images::push(&built, &self.bed.registry.host(), &repo_tag).expect("image pushed");
        self.bed.registry.reference(&repo_tag)
    }

    fn pull(&self, reference: &str) -> Result<(), ContainerdError> {
        self.c()
            .ctr_run(&[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                PLUGIN,
                reference,
            ])
            .map(drop)
    }

    /// `ctr run --snapshotter hyperbox --rm IMAGE ID CMD...`.
    fn run_rm(&self, image: &str, id: &str, cmd: &[&str]) -> Output {
        self.c()
            .ctr()
            .args(["run", "--snapshotter", PLUGIN, "--rm", "--fifo-dir"])
            .arg(self.c().dir().join("fifo"))
            .arg(image)
            .arg(id)
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("ctr runs")
    }

    /// Runs `sh -c SCRIPT` in a new container and asserts that the script succeeded. The
    /// verdict travels as the exit code (7), not as output: `ctr run` 1.6 now and then loses
    /// the stdout of a short-lived container.
    fn run_check(&self, image: &str, id: &str, script: &str) {
        let wrapped = format!("{script} && exit 7");
        let out = self.run_rm(image, id, &["sh", "-c", &wrapped]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "ctr run {image} sh -c {script:?}: {}\nstdout: {}\nstderr: {}\nsnapshotter log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.snap.log()
        );
    }

    /// Starts a detached container of `image` through the snapshotter running `script`.
    fn start_detached(&self, image: &str, id: &str, script: &str) {
        self.c()
            .ctr_run(&[
                "run",
                "--snapshotter",
                PLUGIN,
                "-d",
                "--null-io",
                image,
                id,
                "sh",
                "-c",
                script,
            ])
            .expect("detached run");
    }

    /// `ctr tasks exec` of `cmd` in the running container `id`.
    fn exec(&self, id: &str, exec_id: &str, cmd: &[&str]) -> Output {
        self.c()
            .ctr()
            .args(["tasks", "exec", "--exec-id", exec_id, id])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("ctr tasks exec runs")
    }

    /// Snapshots calls through containerd (its metadata layer, then the plugin), under a
    /// lease of their own as `ctr snapshots` makes them: without one, containerd's garbage
    /// collector may remove a committed snapshot nothing references before it is used.
    fn via_containerd(&self, snapshotter: &str) -> Calls {
        let rt = runtime();
        let channel = rt
            .block_on(containerd_client::connect(self.c().socket()))
            .expect("connect to containerd");
        let mut calls = Calls {
            rt,
            channel,
            namespace: Some(self.c().namespace().to_string()),
            lease: None,
            snapshotter: snapshotter.to_string(),
        };
        let req = calls.req(CreateLeaseRequest::default());
        let lease = calls
            .rt
            .block_on(LeasesClient::new(calls.channel.clone()).create(req))
            .expect("create a lease")
            .into_inner()
            .lease
            .expect("a lease")
            .id;
        calls.lease = Some(lease);
        calls
    }

    /// Snapshots calls straight to the snapshotter's socket, as containerd makes them.
    fn direct(&self) -> Calls {
        Calls::direct(&self.snap.socket())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The snapshots API, blocking.
struct Calls {
    rt: tokio::runtime::Runtime,
    channel: Channel,
    namespace: Option<String>,
    lease: Option<String>,
    snapshotter: String,
}

impl Calls {
    /// Calls straight to a snapshotter's socket.
    fn direct(socket: &Path) -> Calls {
        let rt = runtime();
        let channel = rt
            .block_on(containerd_client::connect(socket))
            .expect("connect to the snapshotter");
        Calls {
            rt,
            channel,
            namespace: None,
            lease: None,
            snapshotter: PLUGIN.to_string(),
        }
    }

    fn req<T>(&self, body: T) -> Request<T> {
        let mut req = Request::new(body);
        if let Some(ns) = self.namespace.as_ref().and_then(|n| n.parse().ok()) {
            req.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(lease) = self.lease.as_ref().and_then(|l| l.parse().ok()) {
            req.metadata_mut().insert("containerd-lease", lease);
        }
        req
    }

    fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.channel.clone())
    }

    fn prepare(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = self.req(PrepareSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            ..Default::default()
        });
        self.rt
            .block_on(self.client().prepare(req))
            .map(|r| r.into_inner().mounts)
    }

    fn view(&self, key: &str, parent: &str) -> Result<Vec<Mount>, Status> {
        let req = self.req(ViewSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
            parent: parent.to_string(),
            ..Default::default()
        });
        self.rt
            .block_on(self.client().view(req))
            .map(|r| r.into_inner().mounts)
    }

    fn commit(&self, name: &str, key: &str) -> Result<(), Status> {
        let req = self.req(CommitSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            name: name.to_string(),
            key: key.to_string(),
            ..Default::default()
        });
        self.rt.block_on(self.client().commit(req)).map(drop)
    }

    fn remove(&self, key: &str) -> Result<(), Status> {
        let req = self.req(RemoveSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.rt.block_on(self.client().remove(req)).map(drop)
    }

    fn stat(&self, key: &str) -> Result<Info, Status> {
        let req = self.req(StatSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.rt
            .block_on(self.client().stat(req))
            .map(|r| r.into_inner().info.unwrap_or_default())
    }

    fn mounts(&self, key: &str) -> Result<Vec<Mount>, Status> {
        let req = self.req(MountsRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.rt
            .block_on(self.client().mounts(req))
            .map(|r| r.into_inner().mounts)
    }

    /// Updates the fields `paths` of `info` (labels only may change).
    fn update(&self, info: Info, paths: &[&str]) -> Result<Info, Status> {
        let req = self.req(UpdateSnapshotRequest {
            snapshotter: self.snapshotter.clone(),
            info: Some(info),
            update_mask: Some(prost_types::FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
        });
        self.rt
            .block_on(self.client().update(req))
            .map(|r| r.into_inner().info.unwrap_or_default())
    }

    fn cleanup(&self) -> Result<(), Status> {
        let req = self.req(CleanupRequest {
            snapshotter: self.snapshotter.clone(),
        });
        self.rt.block_on(self.client().cleanup(req)).map(drop)
    }

    /// (bytes, inodes).
    fn usage(&self, key: &str) -> Result<(i64, i64), Status> {
        let req = self.req(UsageRequest {
            snapshotter: self.snapshotter.clone(),
            key: key.to_string(),
        });
        self.rt
            .block_on(self.client().usage(req))
            .map(|r| r.into_inner())
            .map(|u| (u.size, u.inodes))
    }

    fn list(&self, filters: &[&str]) -> Result<Vec<Info>, Status> {
        let req = self.req(ListSnapshotsRequest {
            snapshotter: self.snapshotter.clone(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        });
        self.rt.block_on(async {
            let mut stream = self.client().list(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(batch) = stream.message().await? {
                out.extend(batch.info);
            }
            Ok(out)
        })
    }

    /// Deletes the lease with a synchronous garbage collection, so that what containerd has
    /// removed is removed from the snapshotters too before this returns.
    fn release(&self) {
        if let Some(id) = &self.lease {
            let req = self.req(DeleteLeaseRequest {
                id: id.clone(),
                sync: true,
            });
            self.rt
                .block_on(LeasesClient::new(self.channel.clone()).delete(req))
                .expect("delete the lease");
        }
    }

    /// Names of the snapshots matching `filters`, sorted.
    fn names(&self, filters: &[&str]) -> BTreeSet<String> {
        self.list(filters)
            .expect("list snapshots")
            .into_iter()
            .map(|i| i.name)
            .collect()
    }
}

/// Kind values of containerd's snapshots API.
const KIND_VIEW: i32 = 1;
const KIND_ACTIVE: i32 = 2;
const KIND_COMMITTED: i32 = 3;

fn code_of<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

fn option<'a>(m: &'a Mount, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    m.options.iter().find_map(|o| o.strip_prefix(&prefix))
}

/// `du -s ARGS DIR`'s number.
fn du(dir: &Path, args: &[&str]) -> i64 {
    let out = Command::new("du")
        .arg("-s")
        .args(args)
        .arg(dir)
        .output()
        .expect("du runs");
    assert!(out.status.success(), "du {}: {:?}", dir.display(), out);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du prints a number")
}

/// Checks after teardown that neither sandbox left anything behind.
fn teardown_leaves_nothing(f: Fixture) {
    let fps = [
        Footprint::of(f.c().dir()).expect("containerd footprint"),
        Footprint::of(f.snap.dir()).expect("snapshotter footprint"),
    ];
    assert!(
        fps[1].processes.iter().any(|p| p.what.contains(BINARY)),
        "the snapshotter is not in its sandbox's footprint: {:#?}",
        fps[1]
    );
    drop(f);
    for fp in fps {
        assert_eq!(fp.leftovers(), Vec::<String>::new(), "{}", fp.dir.display());
    }
}

/// Test 1: busybox, debian and debian-python pulled through the snapshotter (the two Debian
/// images concurrently: they share the debian layer) run through the runc shim, from mounts
/// of the snapshotter's directories.
fn images_run_from_the_snapshotter(v: ContainerdVersion) {
    let f = Fixture::start(v);
    let mode = fs::metadata(f.snap.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    let busybox = f.push(TestImage::Busybox);
    let debian = f.push(TestImage::Debian);
    let python = f.push(TestImage::DebianPython);
    f.pull(&busybox).expect("busybox pulled through hyperbox");
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| f.pull(&debian));
        let b = s.spawn(|| f.pull(&python));
        (a.join().unwrap(), b.join().unwrap())
    });
    a.expect("debian pulled");
    b.expect("debian-python pulled at the same time");

    // busybox, debian, and python's second layer on the shared debian layer: three layers,
    // each stored once.
    let direct = f.direct();
    let committed = direct.names(&["kind==committed"]);
    assert_eq!(committed.len(), 3, "{committed:?}\n{}", f.snap.log());
    // One directory per record (the extraction that lost the race to commit the shared
    // layer stays until containerd's GC removes it).
    let records = direct.list(&[]).expect("list").len();
    assert_eq!(f.snap.entries("snapshots").len(), records);
    let with_parent = direct
        .list(&["kind==committed,parent"])
        .expect("list with filters");
    assert_eq!(with_parent.len(), 1, "{with_parent:?}");
    assert!(committed.contains(&with_parent[0].parent));

    f.run_check(
        &busybox,
        "bb",
        "echo written >/new && test \"$(cat /new)\" = written && test \"$(id -un)\" = root",
    );
    f.run_check(&debian, "deb", "grep -q '^12\\.' /etc/debian_version");
    f.run_check(&python, "py", "test \"$(python3 -c 'print(6 * 7)')\" = 42");

    // A running container's root is an overlay of the snapshotter's directories.
    f.start_detached(&python, "sleeper", "sleep 1000");
    let lower = format!("lowerdir={}/snapshots/", f.snap.root().display());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = mountinfo
        .lines()
        .find(|l| l.contains(" overlay ") && l.contains(&lower) && l.contains("/sleeper/"))
        .unwrap_or_else(|| panic!("no overlay of {lower} for the sleeper:\n{mountinfo}"));
    let upper = format!("upperdir={}/snapshots/", f.snap.root().display());
    assert!(rootfs.contains(&upper), "{rootfs}");
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(images_run, images_run_from_the_snapshotter);

/// Test 5: Usage of an active snapshot is exactly `du` of its upper dir (bytes and inodes),
/// a committed layer's is `du` of its directory, and removing an image's snapshots gives its
/// disk back.
fn usage_and_disk(v: ContainerdVersion) {
    let f = Fixture::start(v);
    let busybox = f.push(TestImage::Busybox);
    let debian = f.push(TestImage::Debian);
    f.pull(&busybox).expect("busybox");
    let calls = f.via_containerd(PLUGIN);
    let dirs_before = f.snap.entries("snapshots");
    let layers_before = calls.names(&["kind==committed"]);
    let du_before = du(&f.snap.root().join("snapshots"), &["-B1"]);

    f.pull(&debian).expect("debian");
    let new_layers: Vec<String> = calls
        .names(&["kind==committed"])
        .difference(&layers_before)
        .cloned()
        .collect();
    assert_eq!(new_layers.len(), 1, "{new_layers:?}");
    let layer = &new_layers[0];
    let new_dirs: Vec<String> = f
        .snap
        .entries("snapshots")
        .difference(&dirs_before)
        .cloned()
        .collect();
    assert_eq!(new_dirs.len(), 1, "{new_dirs:?}");
    let layer_dir = f
        .snap
        .root()
        .join("snapshots")
        .join(&new_dirs[0])
        .join("fs");
    assert!(layer_dir.join("etc/debian_version").is_file());

    // A committed layer: du of its directory (the documented rule).
    let (size, inodes) = calls.usage(layer).expect("usage of the layer");
    assert_eq!(size, du(&layer_dir, &["-B1"]), "layer bytes");
    assert_eq!(inodes, du(&layer_dir, &["--inodes"]), "layer inodes");
    assert!(size > 10 << 20, "a debian layer of {size} bytes");

    // An active snapshot: exactly du of its upper dir.
    let mounts = calls.prepare("usage-probe", layer).expect("prepare");
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "overlay");
    let upper = PathBuf::from(option(&mounts[0], "upperdir").expect("upperdir"));
    assert!(upper.starts_with(f.snap.root()), "{}", upper.display());
    let (size, inodes) = calls.usage("usage-probe").expect("usage");
    assert_eq!((size, inodes), (du(&upper, &["-B1"]), 1), "empty upper");
    fs::create_dir_all(upper.join("var/data")).unwrap();
    let mut big = fs::File::create(upper.join("var/data/big")).unwrap();
    for i in 0..300u32 {
        big.write_all(&[i as u8; 4096]).unwrap();
    }
    drop(big);
    for i in 0..20 {
        fs::write(
            upper.join(format!("var/data/small{i}")),
            "x".repeat(i * 100),
        )
        .unwrap();
    }
    fs::hard_link(upper.join("var/data/big"), upper.join("big-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", upper.join("passwd-link")).unwrap();
    let (size, inodes) = calls.usage("usage-probe").expect("usage");
    assert_eq!(size, du(&upper, &["-B1"]), "active bytes");
    assert_eq!(inodes, du(&upper, &["--inodes"]), "active inodes");
    assert!(size >= 300 * 4096, "{size}");
    calls.remove("usage-probe").expect("remove the probe");

    // Removing the image gives its disk back: the layer directory and its bytes.
    f.c()
        .ctr_run(&["images", "rm", "--sync", &debian])
        .expect("image removed");
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.snap.entries("snapshots") != dirs_before && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        f.snap.entries("snapshots"),
        dirs_before,
        "snapshot dirs after removal\n{}",
        f.snap.log()
    );
    assert_eq!(du(&f.snap.root().join("snapshots"), &["-B1"]), du_before);
    assert!(f.snap.entries("trash").is_empty());
    assert_eq!(calls.names(&["kind==committed"]), layers_before);
    f.run_check(&busybox, "after", "test -s /etc/passwd");
    drop(calls);
    teardown_leaves_nothing(f);
}
per_version!(usage, usage_and_disk);

/// The outcome of one bad call, by name, for comparison between snapshotters.
type Outcome = (&'static str, Code);

/// Bad calls through containerd's API for `calls`' snapshotter; every one must fail.
fn bad_calls(calls: &Calls, tag: &str) -> Vec<Outcome> {
    let k = |s: &str| format!("{tag}-{s}");
    calls.prepare(&k("base-active"), "").expect("prepare base");
    calls
        .commit(&k("base"), &k("base-active"))
        .expect("commit base");
    calls
        .prepare(&k("active"), &k("base"))
        .expect("prepare active");
    calls.view(&k("view"), &k("base")).expect("view");
    let out = vec![
        ("stat unknown", code_of(calls.stat(&k("nope")))),
        ("mounts unknown", code_of(calls.mounts(&k("nope")))),
        ("usage unknown", code_of(calls.usage(&k("nope")))),
        ("remove unknown", code_of(calls.remove(&k("nope")))),
        ("commit unknown", code_of(calls.commit(&k("c"), &k("nope")))),
        (
            "prepare missing parent",
            code_of(calls.prepare(&k("x"), &k("nope"))),
        ),
        (
            "view missing parent",
            code_of(calls.view(&k("y"), &k("nope"))),
        ),
        (
            "prepare existing key",
            code_of(calls.prepare(&k("active"), "")),
        ),
        (
            "prepare on an active parent",
            code_of(calls.prepare(&k("z"), &k("active"))),
        ),
        (
            "commit of a view",
            code_of(calls.commit(&k("c2"), &k("view"))),
        ),
        (
            "commit of a committed snapshot",
            code_of(calls.commit(&k("c3"), &k("base"))),
        ),
        (
            "commit onto an existing name",
            code_of(calls.commit(&k("base"), &k("active"))),
        ),
    ];
    // Nothing of the above changed anything.
    assert_eq!(calls.stat(&k("active")).expect("active").kind, KIND_ACTIVE);
    assert_eq!(calls.stat(&k("view")).expect("view").kind, KIND_VIEW);
    assert_eq!(calls.stat(&k("base")).expect("base").kind, KIND_COMMITTED);
    for key in ["active", "view", "base"] {
        calls.remove(&k(key)).expect("clean up");
    }
    out
}

/// Test 6: bad input gets clear errors with the codes containerd's overlayfs snapshotter gives
/// for the same calls, the snapshotter itself answers containerd's codes, keys are never
/// paths, and nothing else is damaged.
fn bad_input(v: ContainerdVersion) {
    let f = Fixture::start(v);
    let busybox = f.push(TestImage::Busybox);
    f.pull(&busybox).expect("busybox");
    let direct = f.direct();
    let before: Vec<(String, i32, String)> = direct
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.kind, i.parent))
        .collect();
    let dirs_before = f.snap.entries("snapshots");

    let hb = f.via_containerd(PLUGIN);
    let ours = bad_calls(&hb, "hb");
    hb.release();
    let ov = f.via_containerd("overlayfs");
    let theirs = bad_calls(&ov, "ov");
    ov.release();
    assert_eq!(ours, theirs, "hyperbox vs overlayfs through containerd");
    eprintln!("codes through containerd {v}, hyperbox = overlayfs: {ours:?}");
    for (what, code) in &ours {
        assert!(
            matches!(
                code,
                Code::NotFound
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
                    | Code::InvalidArgument
            ),
            "{what}: {code:?}"
        );
    }

    // Straight to the snapshotter, as containerd's metadata layer calls it: the codes of
    // containerd's snapshots/storage package.
    direct.prepare("d-base-active", "").unwrap();
    direct.commit("d-base", "d-base-active").unwrap();
    direct.prepare("d-active", "d-base").unwrap();
    direct.view("d-view", "d-base").unwrap();
    let cases: Vec<(&str, Code, Code)> = vec![
        ("stat", code_of(direct.stat("nope")), Code::NotFound),
        ("mounts", code_of(direct.mounts("nope")), Code::NotFound),
        ("usage", code_of(direct.usage("nope")), Code::NotFound),
        ("remove", code_of(direct.remove("nope")), Code::NotFound),
        (
            "commit unknown",
            code_of(direct.commit("c", "nope")),
            Code::NotFound,
        ),
        (
            "missing parent",
            code_of(direct.prepare("x", "nope")),
            Code::NotFound,
        ),
        (
            "existing key",
            code_of(direct.prepare("d-active", "")),
            Code::AlreadyExists,
        ),
        (
            "existing name",
            code_of(direct.commit("d-base", "d-active")),
            Code::AlreadyExists,
        ),
        (
            "commit of a view",
            code_of(direct.commit("c", "d-view")),
            Code::FailedPrecondition,
        ),
        (
            "mounts of a committed snapshot",
            code_of(direct.mounts("d-base")),
            Code::FailedPrecondition,
        ),
        (
            "remove with children",
            code_of(direct.remove("d-base")),
            Code::FailedPrecondition,
        ),
        (
            "active parent",
            code_of(direct.prepare("x", "d-active")),
            Code::InvalidArgument,
        ),
        (
            "empty key",
            code_of(direct.prepare("", "")),
            Code::InvalidArgument,
        ),
        (
            "bad filter",
            code_of(direct.list(&["name=="])),
            Code::InvalidArgument,
        ),
    ];
    for (what, got, want) in &cases {
        assert_eq!(got, want, "{what}");
    }

    // Update changes labels only, field by field; Cleanup keeps every live snapshot.
    let mut info = direct.stat("d-base").unwrap();
    info.labels.insert("team".into(), "infra".into());
    info.labels.insert("ignored".into(), "x".into());
    let updated = direct.update(info.clone(), &["labels.team"]).unwrap();
    assert_eq!(
        updated.labels.get("team").map(String::as_str),
        Some("infra")
    );
    assert!(!updated.labels.contains_key("ignored"), "{updated:?}");
    assert_eq!(
        direct.names(&["labels.team==infra"]),
        ["d-base".to_string()].into()
    );
    assert_eq!(
        code_of(direct.update(info.clone(), &["parent"])),
        Code::InvalidArgument
    );
    info.name = "nope".into();
    assert_eq!(code_of(direct.update(info, &["labels"])), Code::NotFound);
    direct.cleanup().expect("cleanup");
    assert_eq!(direct.stat("d-active").unwrap().kind, KIND_ACTIVE);
    assert_eq!(direct.mounts("d-active").unwrap().len(), 1);
    let status = direct.stat("nope").unwrap_err();
    assert!(status.message().contains("nope"), "{}", status.message());

    // Keys and labels are never paths: a key that reads like one makes a numbered directory.
    let escape = Path::new("/tmp").join(format!("hb-escape-{}", std::process::id()));
    let evil = format!("../../../../../..{}", escape.display());
    let m = direct.prepare(&evil, "").expect("any key is fine");
    assert!(!escape.exists());
    let source = PathBuf::from(&m[0].source);
    assert!(source.starts_with(f.snap.root().join("snapshots")), "{m:?}");
    assert!(f
        .snap
        .entries("snapshots")
        .iter()
        .all(|n| n.parse::<u64>().is_ok()));
    for key in [evil.as_str(), "d-active", "d-view", "d-base"] {
        direct.remove(key).expect("clean up");
    }

    // Nothing else was touched: the image's snapshots and directories are as they were.
    let after: Vec<(String, i32, String)> = direct
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.kind, i.parent))
        .collect();
    assert_eq!(after, before);
    assert_eq!(f.snap.entries("snapshots"), dirs_before);
    f.run_check(&busybox, "after", "test -s /etc/passwd");
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(errors, bad_input);

/// Reads the reader container's counter. An exec whose output `ctr` lost (it happens with
/// short-lived processes) is asked again.
fn reads_done(f: &Fixture, exec_id: &str) -> u64 {
    for attempt in 0..5 {
        let out = f.exec(
            "reader",
            &format!("{exec_id}-{attempt}"),
            &["cat", "/count"],
        );
        assert!(out.status.success(), "exec in reader: {out:?}");
        if let Ok(n) = String::from_utf8_lossy(&out.stdout).trim().parse() {
            return n;
        }
    }
    panic!("no count read from the reader container");
}

/// Test 4: `kill -9` of the snapshotter while containerd unpacks a layer. The pull fails, a
/// running container keeps reading its files throughout, the restarted snapshotter recovers
/// (earlier snapshots intact, nothing half-made left), and the retried pull succeeds.
fn kill9_during_unpack(v: ContainerdVersion) {
    let mut f = Fixture::start(v);
    let busybox = f.push(TestImage::Busybox);
    let debian = f.push(TestImage::Debian);
    f.pull(&busybox).expect("busybox");
    f.start_detached(
        &busybox,
        "reader",
        "n=0; while :; do if cat /bin/sh /etc/passwd >/dev/null; then n=$((n+1)); \
         echo $n >/count; else echo fail >>/failures; fi; sleep 0.05; done",
    );
    let direct = f.direct();
    let before: Vec<(String, i32, String)> = direct
        .list(&[])
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.kind, i.parent))
        .collect();
    drop(direct);
    thread::sleep(Duration::from_millis(300));
    let c0 = reads_done(&f, "c0");

    // Pull debian and kill the snapshotter as soon as its layer's extraction snapshot exists:
    // containerd is then writing the layer into it.
    let log_start = f.snap.log().len();
    let pull = f
        .c()
        .ctr()
        .args(["images", "pull", "--plain-http", "--snapshotter", PLUGIN])
        .arg(&debian)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("pull starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let log = f.snap.log();
        let new = &log[log_start.min(log.len())..];
        if new
            .lines()
            .any(|l| l.contains("created snapshot") && l.contains("extract"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no extraction snapshot seen:\n{log}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    f.snap.stop(Signal::SIGKILL);
    let out = pull.wait_with_output().expect("pull ends");
    assert!(
        !out.status.success(),
        "the pull survived the kill: the kill came too late"
    );

    // The container keeps reading its files while no snapshotter runs.
    thread::sleep(Duration::from_millis(500));
    let c1 = reads_done(&f, "c1");
    assert!(
        c1 > c0,
        "reads stalled while the snapshotter was down: {c0} -> {c1}"
    );

    // Restart on the same root: recovery leaves only what the database knows.
    f.snap.spawn();
    assert!(f.snap.entries("staging").is_empty());
    assert!(f.snap.entries("trash").is_empty());
    let direct = f.direct();
    let recovered = direct.list(&[]).unwrap();
    for (name, kind, parent) in &before {
        let found = recovered.iter().find(|i| &i.name == name);
        assert!(
            found.is_some_and(|i| i.kind == *kind && &i.parent == parent),
            "snapshot {name} not intact after the crash: {found:?}"
        );
    }
    assert_eq!(
        f.snap.entries("snapshots").len(),
        recovered.len(),
        "a directory per record, no orphans"
    );

    // The retried pull succeeds once containerd has reconnected.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        match f.pull(&debian) {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying the pull: {e}");
                thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("the retried pull failed: {e}\n{}", f.snap.log()),
        }
    }
    f.run_check(&debian, "deb", "grep -q '^12\\.' /etc/debian_version");
    f.run_check(&busybox, "bb", "test -s /etc/passwd");

    let c2 = reads_done(&f, "c2");
    assert!(c2 > c1, "reads stalled: {c1} -> {c2}");
    let failures = f.exec("reader", "c3", &["cat", "/failures"]);
    assert!(
        !failures.status.success()
            && String::from_utf8_lossy(&failures.stderr).contains("No such file"),
        "the reader saw failed reads: {failures:?}"
    );
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(crash, kill9_during_unpack);

/// What a client was told before the snapshotter died: the committed chain it built (oldest
/// first), the names it removed, and the call in flight (whose outcome may go either way).
#[derive(Debug, Default)]
struct Acked {
    chain: Vec<String>,
    removed: Vec<String>,
    in_flight: Option<String>,
}

/// Builds and trims a chain of committed layers through the snapshotter's socket until a
/// call fails (the snapshotter was killed).
fn churn(socket: &Path, round: u32) -> Acked {
    let calls = Calls::direct(socket);
    let mut acked = Acked::default();
    for i in 0.. {
        let parent = acked.chain.last().cloned().unwrap_or_default();
        let key = format!("r{round}-active{i}");
        acked.in_flight = Some(key.clone());
        let Ok(mounts) = calls.prepare(&key, &parent) else {
            return acked;
        };
        let m = &mounts[0];
        let upper = option(m, "upperdir").map_or_else(|| PathBuf::from(&m.source), PathBuf::from);
        fs::write(upper.join(format!("file{i}")), vec![b'x'; 8192]).expect("write a layer");
        let name = format!("r{round}-layer{i}");
        acked.in_flight = Some(name.clone());
        if calls.commit(&name, &key).is_err() {
            return acked;
        }
        acked.chain.push(name);
        if i % 3 == 2 {
            let leaf = acked.chain.last().cloned().unwrap_or_default();
            acked.in_flight = Some(leaf.clone());
            if calls.remove(&leaf).is_err() {
                return acked;
            }
            acked.chain.pop();
            acked.removed.push(leaf);
        }
        acked.in_flight = None;
    }
    acked
}

/// `kill -9` at arbitrary points of a stream of Prepare/Commit/Remove calls: after each
/// restart every acknowledged change is there, nothing acknowledged as removed came back, and
/// recovery leaves exactly one directory per record and no staging or trash entries.
#[test]
fn kill9_at_any_point_leaves_old_or_new_state() {
    let mut snap = SnapshotterDaemon::start();
    for round in 0..8u32 {
        let socket = snap.socket();
        let worker = thread::spawn(move || churn(&socket, round));
        thread::sleep(Duration::from_millis(40 + u64::from(round) * 37));
        snap.stop(Signal::SIGKILL);
        let acked = worker.join().expect("churn thread");
        snap.spawn();

        let calls = Calls::direct(&snap.socket());
        // The call in flight at the kill may have happened or not; everything else was
        // acknowledged and must have happened.
        for name in acked
            .chain
            .iter()
            .filter(|n| acked.in_flight.as_ref() != Some(*n))
        {
            let info = calls
                .stat(name)
                .unwrap_or_else(|e| panic!("round {round}: acknowledged {name} lost: {e}"));
            assert_eq!(info.kind, KIND_COMMITTED, "{name}");
        }
        for name in &acked.removed {
            if acked.in_flight.as_ref() != Some(name) {
                assert_eq!(
                    code_of(calls.stat(name)),
                    Code::NotFound,
                    "{name} came back"
                );
            }
        }
        let records = calls.list(&[]).expect("list").len();
        assert_eq!(snap.entries("snapshots").len(), records, "round {round}");
        assert!(snap.entries("staging").is_empty(), "round {round}");
        assert!(snap.entries("trash").is_empty(), "round {round}");
        eprintln!(
            "round {round}: {} layers acknowledged, {records} records after recovery",
            acked.chain.len()
        );
    }
    let fp = Footprint::of(snap.dir()).expect("footprint");
    drop(snap);
    assert_eq!(fp.leftovers(), Vec::<String>::new());
}

/// A file of the repository's `config/`.
fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
        .canonicalize()
        .unwrap_or_else(|e| panic!("config/{name}: {e}"))
}

/// containerd itself reads `config/containerd-snapshotter.toml`: `containerd config dump` of a
/// config importing it shows the proxy snapshotter `hyperbox` at the address
/// `config/snapshotter.toml` gives the snapshotter; and the systemd unit starts the
/// snapshotter with that file before containerd.
fn containerd_reads_the_plugin_snippet(v: ContainerdVersion) {
    hyperbox_integration::containerd::check_installed(v).expect("containerd installed");
    let mut sandbox = Sandbox::create("config-dump").expect("sandbox");
    let dir = sandbox.dir().to_path_buf();
    let snippet = config_file("containerd-snapshotter.toml");
    let config = dir.join("config.toml");
    fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\nimports = [\"{1}\"]\n",
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
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: toml::Table = text.parse().expect("the dump is TOML");
    let plugin = dump
        .get("proxy_plugins")
        .and_then(|p| p.get(PLUGIN))
        .unwrap_or_else(|| panic!("no proxy plugin {PLUGIN} in the dump:\n{text}"));
    assert_eq!(
        plugin.get("type").and_then(toml::Value::as_str),
        Some("snapshot")
    );
    let ours: toml::Table = fs::read_to_string(config_file("snapshotter.toml"))
        .unwrap()
        .parse()
        .expect("config/snapshotter.toml is TOML");
    let address = ours.get("address").and_then(toml::Value::as_str);
    assert_eq!(address, Some("/run/hyperbox/snapshotter.sock"));
    assert_eq!(plugin.get("address").and_then(toml::Value::as_str), address);

    let unit = fs::read_to_string(config_file("hyperbox-snapshotter.service")).unwrap();
    let directive = |key: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_default()
    };
    assert!(directive("Before").contains("containerd.service"), "{unit}");
    assert!(
        directive("ExecStart")
            .contains("hyperbox-snapshotter --config /etc/hyperbox/snapshotter.toml"),
        "{unit}"
    );
    sandbox.teardown().expect("teardown");
}
per_version!(plugin_snippet, containerd_reads_the_plugin_snippet);

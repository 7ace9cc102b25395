//! `hyperbox-snapshotter` under the harness's containerd 1.6 and 1.7, registered as the proxy
//! plugin `hyperbox`: images pulled through it run through the runc shim (and concurrent pulls
//! share a layer), Usage matches `du`, removing an image gives its disk back, bad input gets
//! the error codes containerd's own overlayfs snapshotter gives, and a `kill -9` during an
//! unpack loses nothing while a running container keeps reading its files. Committed layers
//! become EROFS images over the chunk store (`erofs_*`): containers run from them (file-backed
//! and loop mounts), a root built from every kind of entry equals overlayfs's (`fidelity`),
//! five flattened Debian images share their data (`dedup`), four images sharing a base layer
//! take no more disk than under overlayfs (`multi_layer`; on 2.1 both also measured against
//! containerd's own EROFS snapshotter), images of 10, 40 and 120 layers run from one merged
//! EROFS image each and equal overlayfs (`merged_fidelity`), and `kill -9` during conversions
//! loses nothing.
//!
//! The snapshotter runs in a sandbox of its own (root, socket and log inside it), so the
//! harness's guard kills it and removes its files whatever happens to the test.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
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
use hyperbox_integration::containerd::{
    Containerd, ContainerdBuilder, ContainerdError, ContainerdVersion,
};
use hyperbox_integration::images::{self, TestImage};
use hyperbox_integration::per_version;
use hyperbox_integration::sandbox::{Footprint, Sandbox};
use hyperbox_integration::snapshotter::{
    SnapshotterDaemon, BINARY, MERGED_LABEL, PLUGIN, STORAGE_LABEL,
};
use hyperbox_integration::testbed::TestBed;
use hyperbox_integration::wait_until;
use nix::sys::signal::Signal;

/// containerd with the snapshotter registered, and the registry. Field order is drop order:
/// containerd (and its containers' mounts of our layers) goes before the snapshotter.
struct Fixture {
    bed: TestBed,
    snap: SnapshotterDaemon,
    /// Whether image top layers get merged images (`merge_layers`, on unless turned off).
    merges: bool,
}

impl Fixture {
    /// The snapshotter with its default config (committed layers converted to EROFS).
    fn start(v: ContainerdVersion) -> Fixture {
        Fixture::start_with(v, "")
    }

    /// The snapshotter with `extra_config` lines added to its config file.
    /// [`Fixture::start`], and on containerd 2.x also containerd's own EROFS snapshotter
    /// (`erofs`, its EROFS differ running erofs-utils 1.8's `mkfs.erofs --tar=f`): the peer
    /// the disk figures are compared with.
    fn start_with_peer(v: ContainerdVersion) -> Fixture {
        Self::start_inner(v, "", v.is_2x())
    }

    fn start_with(v: ContainerdVersion, extra_config: &str) -> Fixture {
        Self::start_inner(v, extra_config, false)
    }

    fn start_inner(v: ContainerdVersion, extra_config: &str, peer: bool) -> Fixture {
        Self::start_built(
            v,
            extra_config,
            |b| if peer { b.with_erofs_peer() } else { b },
        )
    }

    /// [`Fixture::start_with`], the daemon's builder changed by `change`.
    fn start_built(
        v: ContainerdVersion,
        extra_config: &str,
        change: impl FnOnce(ContainerdBuilder) -> ContainerdBuilder,
    ) -> Fixture {
        let snap = SnapshotterDaemon::start(extra_config).expect("snapshotter started");
        let builder = change(snap.register(PLUGIN, Containerd::builder(v)));
        let bed = TestBed::with_builder(builder).expect("test bed");
        let merges = !extra_config.contains("merge_layers = false")
            && !extra_config.contains("convert = false");
        Fixture { bed, snap, merges }
    }

    /// Waits until every committed snapshot is served from its EROFS image (the storage
    /// label the snapshotter reports), and returns them.
    fn wait_converted(&self, calls: &Calls) -> Vec<Info> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let committed = calls.list(&["kind==committed"]).expect("list");
            let pending = committed
                .iter()
                .filter(|i| i.labels.get(STORAGE_LABEL).map(String::as_str) != Some("erofs"))
                .count();
            // Then an image's top layer (a committed layer with a parent and no committed
            // child) gets its merged image.
            let unmerged = committed
                .iter()
                .filter(|i| {
                    !i.parent.is_empty()
                        && !committed.iter().any(|c| c.parent == i.name)
                        && !i.labels.contains_key(MERGED_LABEL)
                })
                .count();
            if pending == 0 && (unmerged == 0 || !self.merges) {
                return committed;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} layers never converted, {unmerged} never merged:\n{}",
                self.snap.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Ids of the snapshot directories holding an EROFS image.
    fn image_ids(&self) -> Vec<String> {
        self.snap.image_ids()
    }

    /// EROFS mounts under the snapshotter's root: (mount point, mount source).
    fn erofs_mounts(&self) -> Vec<(String, String)> {
        let root = format!("{}/", self.snap.root().display());
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split(' ');
                let (fstype, source) = (r.next()?, r.next()?);
                let point = left.split(' ').nth(4)?;
                (fstype == "erofs" && point.starts_with(&root))
                    .then(|| (point.to_string(), source.to_string()))
            })
            .collect()
    }

    /// Checks every converted layer: its image mounted once at `snapshots/ID/erofs`, its
    /// plain dir gone, `fsck.erofs` (with the packs as devices) decoding all of its data and
    /// extracting a tree equal to the mount.
    fn check_converted_layers(&self, expected: usize) {
        self.check_converted_layers_with(expected, true);
    }

    /// [`Fixture::check_converted_layers`]; without `extract`, `fsck.erofs` only decodes
    /// (erofs-utils 1.8.6 cannot extract a file with a hole past 2 GiB: it keeps `lseek`'s
    /// result in an `int`, and 2^31 reads as an error).
    fn check_converted_layers_with(&self, expected: usize, extract: bool) {
        let ids = self.image_ids();
        assert_eq!(ids.len(), expected, "images: {ids:?}");
        let mounts = self.erofs_mounts();
        let packs: Vec<PathBuf> = (0..4)
            .map(|n| self.snap.root().join("erofs").join(format!("p{n}")))
            .collect();
        // Each layer's image, and each merged image (an image's top layer's).
        let snapshots = self.snap.root().join("snapshots");
        let merged: Vec<&String> = ids
            .iter()
            .filter(|id| snapshots.join(id).join("merged.erofs").is_file())
            .collect();
        let images = ids
            .iter()
            .map(|id| (id, "layer.erofs", "erofs"))
            .chain(merged.iter().map(|id| (*id, "merged.erofs", "merged")));
        for (id, image, mount) in images {
            let dir = snapshots.join(id);
            let point = dir.join(mount).display().to_string();
            let n = mounts.iter().filter(|(p, _)| *p == point).count();
            assert_eq!(n, 1, "mounts of {point}: {mounts:?}");
            assert!(!dir.join("fs").exists(), "plain dir of layer {id} kept");
            let fsck_erofs = hyperbox_integration::host::fsck_erofs();
            assert!(
                fsck_erofs.exists(),
                "{} is missing: scripts/setup-host unpacks Debian 13's erofs-utils there",
                fsck_erofs.display()
            );
            // Its walk recurses with a PATH_MAX buffer per level: a deep tree needs more than
            // the default 8 MiB of stack.
            let mut fsck = Command::new("sh");
            fsck.args(["-c", "ulimit -s unlimited && exec \"$0\" \"$@\""])
                .arg(&fsck_erofs);
            for p in &packs {
                fsck.arg(format!("--device={}", p.display()));
            }
            // erofs-utils is the reference reader: what it extracts must be what the kernel
            // mount shows (which the fidelity test holds against overlayfs).
            let extracted = self.snap.dir().join(format!("extract-{id}-{mount}"));
            let _ = fs::remove_dir_all(&extracted);
            if extract {
                fsck.arg("--xattrs")
                    .arg(format!("--extract={}", extracted.display()));
            } else {
                fsck.arg("--extract");
            }
            let out = fsck.arg(dir.join(image)).output().expect("fsck.erofs runs");
            assert!(
                out.status.success(),
                "fsck.erofs of {image} of layer {id}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if !extract {
                continue;
            }
            let mut theirs = tree_facts(&extracted);
            let mut ours = tree_facts(&dir.join(mount));
            // Two things erofs-utils 1.8.6 does not restore, accounted for exactly: it sets
            // xattrs before the owner, and the kernel drops `security.capability` on chown
            // (the fidelity test checks it through the mount); and it leaves a chunked file's
            // trailing hole out, so such a file must be the mount's content cut short where
            // only zeroes follow.
            for e in ours.values_mut().chain(theirs.values_mut()) {
                e.xattrs.retain(|(n, _)| n != "security.capability");
            }
            for (path, t) in theirs.iter_mut() {
                let Some(o) = ours.get(path) else { continue };
                if t.kind == "file" && t.size < o.size {
                    use sha2::{Digest, Sha256};
                    let mut h = Sha256::new();
                    let mut file = fs::File::open(extracted.join(path)).unwrap();
                    std::io::copy(&mut file, &mut h).unwrap();
                    std::io::copy(
                        &mut std::io::Read::take(std::io::repeat(0), o.size - t.size),
                        &mut h,
                    )
                    .unwrap();
                    if Some(format!("{:x}", h.finalize())) == o.content {
                        t.size = o.size;
                        t.content = o.content.clone();
                    }
                }
            }
            let n = ours.len();
            let diffs = differences(&ours, &theirs, "mount", "fsck.erofs --extract");
            assert!(
                diffs.is_empty(),
                "{image} of layer {id}: {} differences:\n{}",
                diffs.len(),
                diffs[..diffs.len().min(20)].join("\n")
            );
            eprintln!("{image} of layer {id}: {n} entries extracted by fsck.erofs equal the mount");
            fs::remove_dir_all(&extracted).expect("extraction removed");
        }
        assert_eq!(mounts.len(), ids.len() + merged.len(), "{mounts:?}");
    }

    /// Waits until containerd reaches the (restarted) snapshotter again: its gRPC client
    /// reconnects with a backoff.
    fn wait_reconnected(&self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while let Err(e) = self
            .c()
            .ctr_run(&["snapshots", "--snapshotter", PLUGIN, "ls"])
        {
            assert!(
                Instant::now() < deadline,
                "containerd never reconnected: {e}"
            );
            thread::sleep(Duration::from_millis(200));
        }
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

    /// `ctr run --snapshotter hyperbox --runtime RUNTIME --rm IMAGE ID CMD...`.
    fn run_rm_with(&self, runtime: &str, image: &str, id: &str, cmd: &[&str]) -> Output {
        self.c()
            .ctr()
            .args(["run", "--snapshotter", PLUGIN, "--runtime", runtime, "--rm"])
            .arg("--fifo-dir")
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
        self.run_check_with(RUNC, image, id, script);
    }

    /// [`Fixture::run_check`] through the runtime `runtime`.
    fn run_check_with(&self, runtime: &str, image: &str, id: &str, script: &str) {
        let wrapped = format!("{script} && exit 7");
        let out = self.run_rm_with(runtime, image, id, &["sh", "-c", &wrapped]);
        assert_eq!(
            out.status.code(),
            Some(7),
            "ctr run --runtime {runtime} {image} sh -c {script:?}: {}\nstdout: {}\nstderr: {}\nsnapshotter log:\n{}",
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
/// containerd's runc shim, and HyperBox's.
const RUNC: &str = "io.containerd.runc.v2";
const HYPERBOX_SHIM: &str = "io.containerd.hyperbox.v1";
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

/// Busybox, debian and debian-python pulled through the snapshotter (the two Debian
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
    f.run_check_with(
        HYPERBOX_SHIM,
        &python,
        "py-hb",
        "test \"$(python3 -c 'print(6 * 7)')\" = 42",
    );

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

/// Usage of an active snapshot is exactly `du` of its upper dir (bytes and inodes),
/// a committed layer's is `du` of its directory, and removing an image's snapshots gives its
/// disk back.
fn usage_and_disk(v: ContainerdVersion) {
    // Plain directories (the rule for converted layers is tested in `erofs_layers`).
    let f = Fixture::start_with(v, "convert = false\n");
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

/// Bad input gets clear errors with the codes containerd's overlayfs snapshotter gives
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

/// Waits until the reader container has written its first count, then returns it.
fn first_reads(f: &Fixture, exec_id: &str) -> u64 {
    let mut attempt = 0;
    wait_until(
        Duration::from_secs(30),
        "the reader container's first count",
        || {
            attempt += 1;
            let probe = format!("{exec_id}-wait{attempt}");
            f.exec("reader", &probe, &["test", "-s", "/count"])
                .status
                .success()
        },
    );
    reads_done(f, exec_id)
}

/// Waits until the reader container's count passes `after` (its reads go on), then returns
/// that count.
fn reads_past(f: &Fixture, exec_id: &str, after: u64) -> u64 {
    let mut attempt = 0;
    let mut n = after;
    wait_until(
        Duration::from_secs(30),
        format!("the reader container's count to pass {after}"),
        || {
            attempt += 1;
            n = reads_done(f, &format!("{exec_id}-{attempt}"));
            n > after
        },
    );
    n
}

/// Checks that the reader container never failed a read (it appends to `/failures` when
/// one does). Told by the exec's exit status, which containerd reports reliably: `ctr` loses
/// a short-lived exec's output now and then (one CI run saw `cat /failures` exit 1 with its
/// "No such file" gone), so an exec that did not run to its own verdict is asked again.
fn assert_no_failed_reads(f: &Fixture) {
    let script = "if [ -e /failures ]; then cat /failures; exit 3; fi";
    let mut outputs = Vec::new();
    for attempt in 0..5 {
        let out = f.exec(
            "reader",
            &format!("failures-{attempt}"),
            &["sh", "-c", script],
        );
        match out.status.code() {
            Some(0) => return,
            Some(3) => panic!("the reader saw failed reads: {out:?}"),
            _ => outputs.push(out),
        }
    }
    panic!("no verdict from the reader container: {outputs:?}");
}

/// `kill -9` of the snapshotter while containerd unpacks a layer. The pull fails, a
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
    let c0 = first_reads(&f, "c0");

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
    let c1 = reads_past(&f, "c1", c0);
    assert!(
        c1 > c0,
        "reads stalled while the snapshotter was down: {c0} -> {c1}"
    );

    // Restart on the same root: recovery leaves only what the database knows.
    f.snap.spawn().expect("snapshotter restarted");
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
    assert_no_failed_reads(&f);
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

/// Conversions wait for unpacks: a layer committed while containerd's unpacker still has
/// an `extract-` snapshot open stays a plain directory until that snapshot is committed
/// or removed (so the conversion takes nothing from the pull), then is converted.
#[test]
fn conversion_waits_for_running_unpacks() {
    let snap = SnapshotterDaemon::start("").expect("snapshotter started");
    let calls = Calls::direct(&snap.socket());
    let storage = |name: &str| {
        calls
            .stat(name)
            .expect("stat")
            .labels
            .get(STORAGE_LABEL)
            .cloned()
            .unwrap_or_default()
    };
    calls
        .prepare("ns/1/extract-1-a sha256:aa", "")
        .expect("prepare a");
    calls
        .prepare("ns/2/extract-2-b sha256:bb", "")
        .expect("prepare b");
    calls
        .commit("ns/3/layer-a", "ns/1/extract-1-a sha256:aa")
        .expect("commit a");
    // A check that the layer is NOT converted: it is given time to be, then looked at.
    thread::sleep(Duration::from_millis(1500));
    assert_ne!(
        storage("ns/3/layer-a"),
        "erofs",
        "converted while an unpack ran"
    );
    calls
        .remove("ns/2/extract-2-b sha256:bb")
        .expect("remove b");
    let deadline = Instant::now() + Duration::from_secs(60);
    while storage("ns/3/layer-a") != "erofs" {
        assert!(
            Instant::now() < deadline,
            "never converted after the unpack ended:\n{}",
            snap.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// `kill -9` at arbitrary points of a stream of Prepare/Commit/Remove calls: after each
/// restart every acknowledged change is there, nothing acknowledged as removed came back, and
/// recovery leaves exactly one directory per record and no staging or trash entries.
#[test]
fn kill9_at_any_point_leaves_old_or_new_state() {
    // Plain layers: conversions would move directories through trash/ while it is checked
    // (`erofs_kill9_during_conversion` covers crashes of the conversion).
    let mut snap = SnapshotterDaemon::start("convert = false\n").expect("snapshotter started");
    for round in 0..8u32 {
        let socket = snap.socket();
        let worker = thread::spawn(move || churn(&socket, round));
        thread::sleep(Duration::from_millis(40 + u64::from(round) * 37));
        snap.stop(Signal::SIGKILL);
        let acked = worker.join().expect("churn thread");
        snap.spawn().expect("snapshotter restarted");

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

/// containerd itself reads `config/containerd-snapshotter.toml` (1.6, 1.7) and
/// `config/containerd-snapshotter.v3.toml` (2.x, with the transfer service's unpack entries):
/// `containerd config dump` of a config importing it shows the proxy snapshotter `hyperbox` at
/// the address
/// `config/snapshotter.toml` gives the snapshotter; and the systemd unit starts the
/// snapshotter with that file before containerd.
fn containerd_reads_the_plugin_snippet(v: ContainerdVersion) {
    hyperbox_integration::containerd::check_installed(v).expect("containerd installed");
    let mut sandbox = Sandbox::create("config-dump").expect("sandbox");
    let dir = sandbox.dir().to_path_buf();
    let (file, config_version) = if v.is_2x() {
        ("containerd-snapshotter.v3.toml", 3)
    } else {
        ("containerd-snapshotter.toml", 2)
    };
    let snippet = config_file(file);
    let config = dir.join("config.toml");
    fs::write(
        &config,
        format!(
            "version = {config_version}\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n\
             imports = [\"{1}\"]\n",
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
    if v.is_2x() {
        // The transfer service unpacks into hyperbox, and still into overlayfs (the harness's
        // 2.x daemons get the same entries; every pull test here goes through them).
        let unpack = dump
            .get("plugins")
            .and_then(|p| p.get("io.containerd.transfer.v1.local"))
            .and_then(|t| t.get("unpack_config"))
            .and_then(toml::Value::as_array)
            .unwrap_or_else(|| panic!("no unpack_config in the dump:\n{text}"));
        let entries: Vec<(&str, &str)> = unpack
            .iter()
            .map(|e| {
                let get = |k: &str| e.get(k).and_then(toml::Value::as_str).unwrap_or_default();
                (get("snapshotter"), get("differ"))
            })
            .collect();
        assert_eq!(
            entries,
            [("overlayfs", "walking"), (PLUGIN, "hyperbox-differ")],
            "{text}"
        );
        // The differ, at the address snapshotter.toml gives it.
        let differ = dump
            .get("proxy_plugins")
            .and_then(|p| p.get("hyperbox-differ"))
            .unwrap_or_else(|| panic!("no proxy plugin hyperbox-differ in the dump:\n{text}"));
        assert_eq!(
            differ.get("type").and_then(toml::Value::as_str),
            Some("diff")
        );
        assert_eq!(
            differ.get("address").and_then(toml::Value::as_str),
            ours.get("differ_address").and_then(toml::Value::as_str)
        );
        assert_eq!(
            ours.get("containerd_address").and_then(toml::Value::as_str),
            Some("/run/containerd/containerd.sock")
        );
    }

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

/// Packs, images and metadata under the snapshotter's root, as `du -B1` counts them.
fn root_disk(f: &Fixture) -> i64 {
    du(&f.snap.root(), &["-B1", "-x"])
}

/// EROFS layers: busybox and debian pulled through the snapshotter become EROFS images over
/// the chunk store (mounted with `mount_mode`), containers run from overlays of those
/// mounts, `fsck.erofs` accepts every image, a restart (after SIGKILL) neither disturbs a
/// running container nor mounts anything twice, and removing the images gives the disk
/// back after GC.
fn erofs_layers(v: ContainerdVersion, mount_mode: &str) {
    let mut f = Fixture::start_with(v, &format!("mount_mode = \"{mount_mode}\"\n"));
    let empty_disk = root_disk(&f);
    let busybox = f.push(TestImage::Busybox);
    let debian = f.push(TestImage::Debian);
    f.pull(&busybox).expect("busybox pulled");
    f.pull(&debian).expect("debian pulled");
    let direct = f.direct();
    let layers = f.wait_converted(&direct);
    assert_eq!(layers.len(), 2, "{layers:?}");
    f.check_converted_layers(2);
    if mount_mode == "loop" {
        assert!(
            f.erofs_mounts()
                .iter()
                .all(|(_, src)| src.starts_with("/dev/loop")),
            "{:?}",
            f.erofs_mounts()
        );
    } else {
        assert!(
            f.erofs_mounts()
                .iter()
                .all(|(_, src)| src.ends_with("/layer.erofs")),
            "{:?}",
            f.erofs_mounts()
        );
    }

    f.run_check(
        &busybox,
        "bb",
        "echo written >/new && test \"$(cat /new)\" = written && test -x /bin/sh",
    );
    f.run_check(
        &debian,
        "deb",
        "grep -q '^12\\.' /etc/debian_version && ls -l /usr/bin/ | grep -q bash \
         && dpkg -s coreutils >/dev/null && sha256sum /usr/bin/* >/dev/null",
    );
    // And through HyperBox's shim, from the same EROFS layers.
    f.run_check_with(
        HYPERBOX_SHIM,
        &debian,
        "deb-hb",
        "echo written >/new && test \"$(cat /new)\" = written \
         && grep -q '^12\\.' /etc/debian_version && sha256sum /usr/bin/* >/dev/null",
    );

    // A running container's root is an overlay of the EROFS mounts.
    f.start_detached(
        &debian,
        "reader",
        "n=0; while :; do if cat /usr/bin/bash /etc/passwd >/dev/null; then n=$((n+1)); \
         echo $n >/count; else echo fail >>/failures; fi; sleep 0.05; done",
    );
    let lower = format!("lowerdir={}/snapshots/", f.snap.root().display());
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let rootfs = mountinfo
        .lines()
        .find(|l| l.contains(" overlay ") && l.contains(&lower) && l.contains("/reader/"))
        .unwrap_or_else(|| panic!("no overlay of {lower} for the reader:\n{mountinfo}"));
    let lowers = rootfs
        .split_once("lowerdir=")
        .and_then(|(_, rest)| rest.split(',').next())
        .expect("lowerdir option");
    assert!(
        lowers.split(':').all(|l| l.ends_with("/erofs")),
        "lower dirs are not the erofs mounts: {rootfs}"
    );

    // Killed and restarted: the mounts stay as they are, the container keeps reading.
    let c0 = first_reads(&f, "c0");
    drop(direct);
    f.snap.stop(Signal::SIGKILL);
    let c1 = reads_past(&f, "c1", c0);
    assert!(
        c1 > c0,
        "reads stalled with the snapshotter down: {c0} -> {c1}"
    );
    f.snap.spawn().expect("snapshotter restarted");
    let direct = f.direct();
    f.wait_converted(&direct);
    f.check_converted_layers(2);
    f.wait_reconnected();
    f.run_check(&debian, "deb2", "test -s /etc/passwd");
    let c2 = reads_done(&f, "c2");
    assert!(c2 > c1, "reads stalled: {c1} -> {c2}");
    assert_no_failed_reads(&f);
    f.c()
        .ctr_run(&["tasks", "kill", "-s", "SIGKILL", "reader"])
        .expect("kill reader");
    let deadline = Instant::now() + Duration::from_secs(30);
    while f.c().ctr_run(&["tasks", "delete", "reader"]).is_err() {
        assert!(Instant::now() < deadline, "reader task not deleted");
        thread::sleep(Duration::from_millis(200));
    }
    f.c()
        .ctr_run(&["containers", "rm", "reader"])
        .expect("reader container removed");

    // Removing every image gives the disk back once GC has run.
    let full_disk = root_disk(&f);
    for image in [&debian, &busybox] {
        f.c()
            .ctr_run(&["images", "rm", "--sync", image])
            .expect("image removed");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let _ = direct.cleanup();
        let left = direct.list(&[]).expect("list").len();
        if left == 0 && f.erofs_mounts().is_empty() && root_disk(&f) < empty_disk + (4 << 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disk not given back: {left} snapshots, {} bytes (empty {empty_disk}, full \
             {full_disk}), mounts {:?}\n{}",
            root_disk(&f),
            f.erofs_mounts(),
            f.snap.log()
        );
        thread::sleep(Duration::from_millis(300));
    }
    eprintln!(
        "erofs {mount_mode}: root {empty_disk} B empty, {full_disk} B with busybox+debian, {} B \
         after removal",
        root_disk(&f)
    );
    drop(direct);
    teardown_leaves_nothing(f);
}

fn erofs_layers_file_backed(v: ContainerdVersion) {
    erofs_layers(v, "file");
}
per_version!(erofs_file, erofs_layers_file_backed);

fn erofs_layers_loop_devices(v: ContainerdVersion) {
    erofs_layers(v, "loop");
}
per_version!(erofs_loop, erofs_layers_loop_devices);

/// `kill -9` of the snapshotter while it converts a layer, at several moments; after each
/// restart the layer is intact (plain or converted, never unmountable), conversion finishes,
/// a running container keeps reading, and the image runs from EROFS.
fn kill9_during_conversion(v: ContainerdVersion) {
    let mut f = Fixture::start(v);
    let busybox = f.push(TestImage::Busybox);
    let debian = f.push(TestImage::Debian);
    f.pull(&busybox).expect("busybox");
    f.wait_converted(&f.direct());
    f.start_detached(
        &busybox,
        "reader",
        "n=0; while :; do if cat /bin/sh /etc/passwd >/dev/null; then n=$((n+1)); \
         echo $n >/count; else echo fail >>/failures; fi; sleep 0.05; done",
    );
    let mut count = first_reads(&f, "c0");
    f.pull(&debian).expect("debian");
    // Kill at growing delays after the restart that starts debian's conversion again.
    let mut killed_mid_conversion = 0;
    for round in 0..5u64 {
        let log_start = f.snap.log().len();
        f.snap.stop(Signal::SIGKILL);
        f.snap.spawn().expect("snapshotter restarted");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = f.snap.log();
            if log[log_start.min(log.len())..].contains("snapshotter state recovered") {
                break;
            }
            assert!(Instant::now() < deadline, "no start-up seen:\n{log}");
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(round * 150));
        let log = f.snap.log();
        if !log[log_start.min(log.len())..].contains("layer converted to erofs") {
            killed_mid_conversion += 1;
        }
        f.snap.stop(Signal::SIGKILL);
        let n = reads_done(&f, &format!("r{round}"));
        assert!(n > count, "reads stalled: {count} -> {n}");
        count = n;
        f.snap.spawn().expect("snapshotter restarted");
        let direct = f.direct();
        let layers = f.wait_converted(&direct);
        assert_eq!(layers.len(), 2, "{layers:?}");
        f.check_converted_layers(2);
        f.wait_reconnected();
        f.run_check(
            &debian,
            &format!("deb{round}"),
            "grep -q '^12\\.' /etc/debian_version",
        );
        // Undo the conversion for the next round: remove and pull debian again.
        drop(direct);
        if round < 4 {
            f.c()
                .ctr_run(&["images", "rm", "--sync", &debian])
                .expect("image removed");
            f.pull(&debian).expect("debian again");
        }
    }
    assert!(
        killed_mid_conversion > 0,
        "no kill landed during a conversion"
    );
    let failures = f.exec("reader", "fail", &["cat", "/failures"]);
    assert!(!failures.status.success(), "the reader saw failed reads");
    teardown_leaves_nothing(f);
}
per_version!(erofs_crash, kill9_during_conversion);

/// Writes a single-layer image of the tree at `tree` as an oci-archive (imported through
/// both snapshotters) and returns its path.
fn flat_image_archive(tree: &Path, work: &Path, name: &str) -> PathBuf {
    use hyperbox_integration::images::{layer, oci};
    let layout = work.join(format!("{name}.layout"));
    let archive = work.join(format!("{name}.tar"));
    let epoch = 1_700_000_000;
    let mut writer = oci::LayoutWriter::create(&layout, epoch).expect("layout");
    let mut entries = layer::scan_tree(tree).expect("scan tree");
    writer.add_layer(&mut entries).expect("layer written");
    let run = oci::RunConfig {
        cmd: vec!["bash".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        history: vec![format!("flattened rootfs {name}")],
    };
    let reference = format!("docker.io/hyperbox/{name}:latest");
    writer
        .finish(&run, "latest", &reference)
        .expect("layout finished");
    oci::write_archive(&layout, &archive, epoch).expect("archive");
    archive
}

fn sh(script: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("sh");
    assert!(out.status.success(), "{script}: {out:?}");
}

/// The dedup set: five single-layer images, each a whole Debian rootfs flattened
/// into one layer (the base and four variants adding a package or changing files), as
/// separate pipelines produce them, so overlayfs shares nothing between them. Imported
/// through overlayfs and through hyperbox: the shared data is stored once (hyperbox's root
/// holds less than the base tree plus what each variant adds, plus images and metadata),
/// and the whole takes well below overlayfs's disk.
fn dedup_set(v: ContainerdVersion) {
    let f = Fixture::start_with_peer(v);
    let peer = v.is_2x();
    let debian = TestBed::build(TestImage::Debian).expect("debian built");
    assert_eq!(debian.layer_digests.len(), 1, "debian is one layer");
    let work = f.snap.dir().join("dedup");
    fs::create_dir_all(&work).unwrap();
    let blob = debian.blob_path(&debian.layer_digests[0]);
    let debs = Path::new("/var/cache/hyperbox/debs");
    let deb = |prefix: &str| -> Option<PathBuf> {
        fs::read_dir(debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
    };
    let tini = deb("tini_");
    let docker_cli = deb("docker-cli_");
    // (name, script run in the tree after the base is extracted)
    let variants: Vec<(String, String)> = vec![
        ("dedup-base".into(), String::new()),
        (
            "dedup-tini".into(),
            match &tini {
                Some(d) => format!("dpkg -x {} .", d.display()),
                None => "mkdir -p opt/tool && head -c 700000 /dev/urandom > opt/tool/bin".into(),
            },
        ),
        (
            "dedup-config".into(),
            "echo 'variant 2' > etc/motd && echo changed >> etc/bash.bashrc \
             && head -c 2000000 /dev/urandom > usr/local/bin/app && chmod 755 usr/local/bin/app"
                .into(),
        ),
        (
            "dedup-slim".into(),
            "rm -rf usr/share/doc usr/share/man usr/share/locale && echo slim > etc/hostname"
                .into(),
        ),
        (
            "dedup-cli".into(),
            match &docker_cli {
                Some(d) => format!("dpkg -x {} .", d.display()),
                None => "mkdir -p opt/cli && head -c 8000000 /dev/urandom > opt/cli/bin".into(),
            },
        ),
    ];
    let overlay_root = f
        .c()
        .dir()
        .join("root/io.containerd.snapshotter.v1.overlayfs");
    let overlay_before = du(&overlay_root, &["-B1", "-x"]);
    let hyperbox_before = root_disk(&f);
    let peer_root = f.c().dir().join("root/io.containerd.snapshotter.v1.erofs");
    let peer_before = if peer {
        du(&peer_root, &["-B1", "-x"])
    } else {
        0
    };
    // One variant at a time, its archive deleted once imported: the host's disk is shared.
    let import = |tree: &Path, name: &str| {
        let archive = flat_image_archive(tree, &work, name);
        let a = archive.to_string_lossy();
        f.c()
            .ctr_run(&["images", "import", "--snapshotter", PLUGIN, &a])
            .expect("import through hyperbox");
        f.c()
            .ctr_run(&["images", "import", "--snapshotter", "overlayfs", &a])
            .expect("import through overlayfs");
        if peer {
            f.c()
                .ctr_run(&["images", "import", "--snapshotter", "erofs", &a])
                .expect("import through containerd's erofs");
        }
        fs::remove_file(&archive).unwrap();
        fs::remove_dir_all(work.join(format!("{name}.layout"))).unwrap();
    };
    let base_dir = work.join("tree-base");
    let mut added = 0i64;
    for (name, script) in &variants {
        let tree = work.join(format!("tree-{name}"));
        fs::create_dir_all(&tree).unwrap();
        sh(&format!(
            "tar -xzpf {} -C {} --numeric-owner --xattrs --xattrs-include='*'",
            blob.display(),
            tree.display()
        ));
        if !script.is_empty() {
            sh(&format!("cd {} && {script}", tree.display()));
        }
        if name == "dedup-base" {
            fs::rename(&tree, &base_dir).unwrap();
            import(&base_dir, name);
        } else {
            added += (du(&tree, &["-B1"]) - du(&base_dir, &["-B1"])).max(0);
            import(&tree, name);
            fs::remove_dir_all(&tree).unwrap();
        }
    }
    let base_bytes = du(&base_dir, &["-B1"]);
    fs::remove_dir_all(&base_dir).unwrap();
    let direct = f.direct();
    let layers = f.wait_converted(&direct);
    assert_eq!(layers.len(), 5, "{layers:?}");
    f.check_converted_layers(5);
    let overlay = du(&overlay_root, &["-B1", "-x"]) - overlay_before;
    let hyperbox = root_disk(&f) - hyperbox_before;
    let packs = du(&f.snap.root().join("erofs"), &["-B1"]);
    let ratio = hyperbox as f64 / overlay as f64;
    eprintln!(
        "dedup set: overlayfs {overlay} B, hyperbox {hyperbox} B (packs+index {packs} B) = \
         {ratio:.3}; base tree {base_bytes} B, variants add {added} B"
    );
    // Shared data stored once: less than one base plus the additions, plus room for the
    // five metadata images and the databases.
    assert!(
        hyperbox < base_bytes + added + (40 << 20),
        "hyperbox {hyperbox} B vs base {base_bytes} B + added {added} B"
    );
    assert!(ratio < 0.45, "dedup ratio {ratio:.3}");
    if peer {
        // containerd 2.1's own EROFS snapshotter keeps each image's layer whole.
        let theirs = du(&peer_root, &["-B1", "-x"]) - peer_before;
        let to_peer = hyperbox as f64 / theirs as f64;
        eprintln!(
            "dedup set: containerd's erofs {theirs} B; hyperbox = {to_peer:.3} of it (goal 0.5)"
        );
        assert!(
            to_peer <= 0.5,
            "hyperbox {to_peer:.3} of containerd's erofs"
        );
    }
    f.run_check(
        "docker.io/hyperbox/dedup-config:latest",
        "dd",
        "grep -q 'variant 2' /etc/motd && test -x /usr/local/bin/app",
    );
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(dedup, dedup_set);

/// An image made of debian's layer (shared, as a `FROM debian` build shares it) plus one
/// layer holding `tree`, imported as `docker.io/hyperbox/NAME:latest`.
fn image_on_debian(debian: &images::BuiltImage, tree: &Path, work: &Path, name: &str) -> PathBuf {
    use hyperbox_integration::images::{layer, oci};
    let layout = work.join(format!("{name}.layout"));
    let archive = work.join(format!("{name}.tar"));
    let epoch = 1_700_000_000;
    let mut writer = oci::LayoutWriter::create(&layout, epoch).expect("layout");
    debian.add_layers_to(&mut writer).expect("base layer");
    let mut entries = layer::scan_tree(tree).expect("scan tree");
    writer.add_layer(&mut entries).expect("layer written");
    let run = oci::RunConfig {
        cmd: vec!["bash".into()],
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        history: vec!["debian".into(), format!("layer of {name}")],
    };
    let reference = format!("docker.io/hyperbox/{name}:latest");
    writer
        .finish(&run, "latest", &reference)
        .expect("layout finished");
    oci::write_archive(&layout, &archive, epoch).expect("archive");
    fs::remove_dir_all(&layout).unwrap();
    archive
}

/// The multi-layer set: debian, debian-python (debian's layer plus python's) and
/// two more images built `FROM debian` (a package added; configuration and a binary
/// changed), imported through overlayfs and through hyperbox. Both keep one snapshot per
/// distinct layer (the base is shared by all four images), and hyperbox's root, with every
/// layer converted to EROFS, takes no more disk than overlayfs's.
fn multi_layer_set(v: ContainerdVersion) {
    let f = Fixture::start_with_peer(v);
    let peer = v.is_2x();
    let debian = TestBed::build(TestImage::Debian).expect("debian built");
    let python = TestBed::build(TestImage::DebianPython).expect("debian-python built");
    assert_eq!(python.layer_digests[0], debian.layer_digests[0]);
    let work = f.snap.dir().join("multi");
    fs::create_dir_all(&work).unwrap();
    let pkg = work.join("tree-pkg");
    fs::create_dir_all(&pkg).unwrap();
    let tini = fs::read_dir("/var/cache/hyperbox/debs").ok().and_then(|d| {
        d.flatten().map(|e| e.path()).find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("tini_"))
        })
    });
    match tini {
        Some(deb) => sh(&format!("dpkg -x {} {}", deb.display(), pkg.display())),
        None => sh(&format!(
            "mkdir -p {0}/usr/bin && head -c 700000 /dev/urandom > {0}/usr/bin/tini",
            pkg.display()
        )),
    }
    let conf = work.join("tree-conf");
    sh(&format!(
        "mkdir -p {0}/etc {0}/usr/local/bin && echo 'multi-layer' > {0}/etc/motd \
         && head -c 2000000 /dev/urandom > {0}/usr/local/bin/app && chmod 755 {0}/usr/local/bin/app",
        conf.display()
    ));
    let archives = [
        debian.archive.clone(),
        python.archive.clone(),
        image_on_debian(&debian, &pkg, &work, "multi-pkg"),
        image_on_debian(&debian, &conf, &work, "multi-conf"),
    ];
    let overlay_root = f
        .c()
        .dir()
        .join("root/io.containerd.snapshotter.v1.overlayfs");
    let overlay_before = du(&overlay_root, &["-B1", "-x"]);
    let hyperbox_before = root_disk(&f);
    let peer_root = f.c().dir().join("root/io.containerd.snapshotter.v1.erofs");
    let peer_before = if peer {
        du(&peer_root, &["-B1", "-x"])
    } else {
        0
    };
    let snapshotters: &[&str] = if peer {
        &[PLUGIN, "overlayfs", "erofs"]
    } else {
        &[PLUGIN, "overlayfs"]
    };
    for archive in &archives {
        let a = archive.to_string_lossy();
        for &snapshotter in snapshotters {
            f.c()
                .ctr_run(&["images", "import", "--snapshotter", snapshotter, &a])
                .unwrap_or_else(|e| panic!("import {a} through {snapshotter}: {e}"));
        }
    }
    let direct = f.direct();
    let layers = f.wait_converted(&direct);
    // debian, python's layer, and one layer for each of the two FROM-debian images.
    assert_eq!(layers.len(), 4, "{layers:?}");
    f.check_converted_layers(4);
    let overlay_snapshots = f
        .c()
        .ctr_run(&["snapshots", "--snapshotter", "overlayfs", "ls"])
        .expect("overlayfs snapshots");
    let overlay_snapshots = String::from_utf8_lossy(&overlay_snapshots.stdout);
    let committed = overlay_snapshots
        .lines()
        .filter(|l| l.trim_end().ends_with("Committed"))
        .count();
    assert_eq!(committed, 4, "{overlay_snapshots}");
    let overlay = du(&overlay_root, &["-B1", "-x"]) - overlay_before;
    let hyperbox = root_disk(&f) - hyperbox_before;
    let ratio = hyperbox as f64 / overlay as f64;
    eprintln!("multi-layer set: overlayfs {overlay} B, hyperbox {hyperbox} B = {ratio:.3}");
    if peer {
        let theirs = du(&peer_root, &["-B1", "-x"]) - peer_before;
        eprintln!(
            "multi-layer set: containerd's erofs {theirs} B; hyperbox = {:.3} of it",
            hyperbox as f64 / theirs as f64
        );
    }
    assert!(
        hyperbox <= overlay,
        "hyperbox {hyperbox} B is more than overlayfs {overlay} B"
    );
    f.run_check(
        "docker.io/hyperbox/multi-conf:latest",
        "ml-conf",
        "grep -q multi-layer /etc/motd && test -x /usr/local/bin/app && test -x /bin/bash",
    );
    f.run_check(
        &TestImage::DebianPython.reference(),
        "ml-py",
        "python3 -c 'import sqlite3'",
    );
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(multi_layer, multi_layer_set);

/// One entry of a tree as the fidelity test compares it.
#[derive(Debug, PartialEq, Eq)]
struct EntryFacts {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    rdev: u64,
    content: Option<String>,
    link: Option<PathBuf>,
    xattrs: Vec<(String, Vec<u8>)>,
    /// A directory's names as `readdir` returns them, `.` and `..` included (readdir drops
    /// entries whose inode number is 0), sorted.
    listing: Option<Vec<String>>,
}

/// The names `readdir` gives for the directory at `path`, `.` and `..` included, sorted.
fn listing(path: &Path) -> Vec<String> {
    use nix::fcntl::OFlag;
    let mut dir = nix::dir::Dir::open(
        path,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut names: Vec<String> = dir
        .iter()
        .map(|e| {
            e.expect("readdir")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every entry under `root` (not following links), by path relative to it; the top-level
/// `proc`, `sys` and `dev` (the runtime's mounts) are left out.
fn tree_facts(root: &Path) -> std::collections::BTreeMap<PathBuf, EntryFacts> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_fifo() {
            "fifo"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else {
            "socket"
        };
        let content = ft.is_file().then(|| {
            let mut h = Sha256::new();
            let mut file = fs::File::open(&path).unwrap();
            std::io::copy(&mut file, &mut h).unwrap();
            format!("{:x}", h.finalize())
        });
        let mut xattrs: Vec<(String, Vec<u8>)> = xattr::list(&path)
            .map(|names| {
                names
                    .filter_map(|n| {
                        let v = xattr::get(&path, &n).ok()??;
                        Some((n.to_string_lossy().into_owned(), v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        out.insert(
            rel.clone(),
            EntryFacts {
                kind,
                mode: meta.mode(),
                uid: meta.uid(),
                gid: meta.gid(),
                size: if ft.is_dir() { 0 } else { meta.size() },
                mtime: (meta.mtime(), meta.mtime_nsec()),
                rdev: meta.rdev(),
                content,
                link: ft.is_symlink().then(|| fs::read_link(&path).unwrap()),
                xattrs,
                listing: ft.is_dir().then(|| {
                    let mut names = listing(&path);
                    if rel.as_os_str().is_empty() {
                        names.retain(|n| !["proc", "sys", "dev"].contains(&n.as_str()));
                    }
                    names
                }),
            },
        );
        if ft.is_dir() {
            for e in fs::read_dir(&path).unwrap().flatten() {
                let child = rel.join(e.file_name());
                if rel.as_os_str().is_empty()
                    && ["proc", "sys", "dev"].contains(&&*e.file_name().to_string_lossy())
                {
                    continue;
                }
                stack.push(child);
            }
        }
    }
    out
}

/// Every entry in which two trees' facts differ, naming the trees `a` and `b`.
fn differences(
    ours: &std::collections::BTreeMap<PathBuf, EntryFacts>,
    theirs: &std::collections::BTreeMap<PathBuf, EntryFacts>,
    a: &str,
    b: &str,
) -> Vec<String> {
    let mut diffs = Vec::new();
    for (path, facts) in ours {
        match theirs.get(path) {
            Some(t) if t == facts => {}
            Some(t) => diffs.push(format!("{}: {a} {facts:?}\n  {b} {t:?}", path.display())),
            None => diffs.push(format!("{}: only in {a}", path.display())),
        }
    }
    for path in theirs.keys().filter(|p| !ours.contains_key(*p)) {
        diffs.push(format!("{}: only in {b}", path.display()));
    }
    diffs
}

/// Fidelity: an image holding every kind of entry (regular, empty, sparse-ish,
/// hard-linked, symlinks, dirs, device nodes, FIFOs, set-uid/set-gid/sticky, owners, mtimes,
/// xattrs with `security.capability`), with deletions and an opaque dir in an upper layer,
/// gives a running container a root identical, entry by entry (type, mode, owner, size,
/// mtime, content digest, xattrs, link target, device numbers), through hyperbox (after
/// conversion to EROFS) and through containerd's overlayfs; `fsck.erofs` accepts the images.
fn fidelity(v: ContainerdVersion) {
    use hyperbox_integration::images::layer::{self, LayerEntry};
    use hyperbox_integration::images::oci;
    let f = Fixture::start(v);
    let work = f.snap.dir().join("fidelity");
    let tree = work.join("tree");
    extract_busybox(&tree);
    let fid = tree.join("fid");
    fill_fidelity_tree(&fid);

    let layout = work.join("layout");
    let archive = work.join("fidelity.tar");
    let epoch = 2_000_000_000;
    let mut writer = oci::LayoutWriter::create(&layout, epoch).expect("layout");
    let mut lower = layer::scan_tree(&tree).expect("scan");
    writer.add_layer(&mut lower).expect("lower layer");
    let mut upper = vec![
        LayerEntry::dir("fid", 0o755),
        LayerEntry::whiteout(Path::new("fid/gone-file")),
        LayerEntry::whiteout(Path::new("fid/gone-dir")),
        LayerEntry::dir("fid/opaque", 0o750).with_owner(7, 8),
        LayerEntry::file("fid/opaque/.wh..wh..opq", 0o644, Vec::new()),
        LayerEntry::file("fid/opaque/new", 0o600, b"fresh".to_vec()).with_mtime(1_234_567_890),
        LayerEntry::file("fid/small", 0o644, b"changed".to_vec()).with_owner(42, 43),
    ];
    writer.add_layer(&mut upper).expect("upper layer");
    let run = oci::RunConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        history: vec!["busybox + every kind of entry".into(), "deletions".into()],
    };
    let reference = "docker.io/hyperbox/fidelity:latest";
    writer.finish(&run, "latest", reference).expect("finish");
    oci::write_archive(&layout, &archive, epoch).expect("archive");
    let a = archive.to_string_lossy();
    for snapshotter in [PLUGIN, "overlayfs"] {
        f.c()
            .ctr_run(&["images", "import", "--snapshotter", snapshotter, &a])
            .expect("import");
    }
    let direct = f.direct();
    f.wait_converted(&direct);
    f.check_converted_layers(2);

    let trees = container_roots(&f, reference, "fid");
    let (ours, theirs) = (&trees[0], &trees[1]);
    let fid_entries = ours.keys().filter(|p| p.starts_with("fid")).count();
    assert_eq!(fid_entries, 21, "entries under /fid");
    for p in ["fid/gone-file", "fid/gone-dir", "fid/opaque/old"] {
        assert!(!ours.contains_key(Path::new(p)), "{p} not deleted");
    }
    assert_eq!(ours[Path::new("fid/chr")].kind, "char");
    assert!(ours[Path::new("fid/suid")]
        .xattrs
        .iter()
        .any(|(n, _)| n == "security.capability"));
    let diffs = differences(ours, theirs, "hyperbox", "overlayfs");
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    eprintln!(
        "fidelity: {} entries identical ({fid_entries} under /fid)",
        ours.len()
    );
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(fidelity_vs_overlayfs, fidelity);

/// Every kind of entry, under `fid` (created).
fn fill_fidelity_tree(fid: &Path) {
    use std::os::unix::fs::PermissionsExt;
    sh(&format!(
        "set -e; mkdir -p {d}/dir/sub {d}/gone-dir {d}/opaque/old {d}/sticky; cd {d}; \
         head -c 3000000 /dev/urandom > big; : > empty; echo small > small; \
         echo keep > opaque/old/file; echo bye > gone-file; echo bye > gone-dir/x; \
         truncate -s 8M sparse && printf data | dd of=sparse bs=1 seek=5000000 conv=notrunc 2>/dev/null; \
         ln big big-link; ln small dir/sub/small-link; ln -s small rel-link; \
         ln -s /etc/passwd abs-link; ln -s {long} long-link; ln -s missing dangling; \
         mknod chr c 1 3; mknod blk b 7 200; mkfifo fifo; \
         echo s > suid && chmod 4755 suid; echo g > sgid && chmod 2755 sgid; chmod 1777 sticky; \
         chown 1234:5678 small; chown 65534:65534 dir/sub; chmod 0640 small; \
         touch -h -d '2001-02-03 04:05:06.123456789' rel-link big; \
         touch -d '1999-12-31 23:59:59' dir",
        d = fid.display(),
        long = "t".repeat(300),
    ));
    xattr::set(
        fid.join("suid"),
        "security.capability",
        &[
            0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
    .expect("security.capability");
    xattr::set(fid.join("small"), "user.note", b"hello").expect("user xattr");
    xattr::set(fid.join("dir"), "user.dir", &[0u8, 1, 2, 255]).expect("user xattr");
    xattr::set(fid.join("big"), "trusted.x", b"t").expect("trusted xattr");
    fs::set_permissions(fid, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The whole root of a container of `reference` run through hyperbox and through overlayfs
/// (named `ID-SNAPSHOTTER`, left running), as the fidelity tests compare it.
///
/// The runtime makes mount points (/proc, /dev, /sys, /run) when it starts a container,
/// touching their parents' mtimes in the container's own upper dir: those directory times
/// are the start time, not the image's, and are left out.
fn container_roots(
    f: &Fixture,
    reference: &str,
    id: &str,
) -> Vec<std::collections::BTreeMap<PathBuf, EntryFacts>> {
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut trees = Vec::new();
    for snapshotter in [PLUGIN, "overlayfs"] {
        let id = format!("{id}-{snapshotter}");
        f.c()
            .ctr_run(&[
                "run",
                "--snapshotter",
                snapshotter,
                "-d",
                "--null-io",
                reference,
                &id,
                "sleep",
                "1000",
            ])
            .expect("detached run");
        let out = f.c().ctr_run(&["tasks", "ls"]).expect("tasks ls");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let pid: u32 = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id.as_str()))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no pid of {id}: {text}"));
        let mut facts = tree_facts(&PathBuf::from(format!("/proc/{pid}/root")));
        for entry in facts.values_mut() {
            if entry.kind == "dir" && entry.mtime.0 >= started {
                entry.mtime = (0, 0);
            }
        }
        trees.push(facts);
    }
    trees
}

/// The `lowerdir` option of the overlay mounted as the root of container `id`.
fn rootfs_lowers(id: &str) -> Vec<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = mountinfo
        .lines()
        .find(|l| l.contains(" overlay ") && l.contains(&format!("/{id}/rootfs")))
        .unwrap_or_else(|| panic!("no overlay root of {id}:\n{mountinfo}"));
    line.split_once("lowerdir=")
        .and_then(|(_, rest)| rest.split(',').next())
        .expect("lowerdir option")
        .split(':')
        .map(str::to_string)
        .collect()
}

/// Layer `i` (from 1) of the deep test images: changes, deletes, re-creates, and hides
/// through an opaque directory; the last layer (`i == last`) also deletes a hard-linked file
/// and replaces one with a symlink.
fn deep_layer(i: usize, last: usize) -> Vec<hyperbox_integration::images::layer::LayerEntry> {
    use hyperbox_integration::images::layer::LayerEntry;
    let mut e = vec![
        LayerEntry::dir("fid", 0o755),
        LayerEntry::file("fid/changed", 0o644, format!("layer {i}").into_bytes())
            .with_mtime(1_000_000 + i as u64),
        LayerEntry::file(format!("fid/own-{i:03}"), 0o600, vec![b'x'; 3000 + i])
            .with_owner(i as u64, 7),
    ];
    if i > 1 {
        e.push(LayerEntry::whiteout(Path::new(&format!(
            "fid/own-{:03}",
            i - 1
        ))));
    }
    if i % 7 == 0 {
        e.push(LayerEntry::dir("fid/opaque", 0o700).with_owner(1, 2));
        e.push(LayerEntry::file(
            "fid/opaque/.wh..wh..opq",
            0o644,
            Vec::new(),
        ));
    }
    if i == 1 {
        // Named, so that its time is the image's and not the unpack's.
        e.push(LayerEntry::dir("fid/opaque", 0o755));
    }
    if i % 7 == 0 || i == 1 {
        e.push(LayerEntry::file(
            format!("fid/opaque/in-{i}"),
            0o644,
            b"boxed".to_vec(),
        ));
    }
    if i % 5 == 0 {
        e.push(LayerEntry::whiteout(Path::new("fid/dir")));
        e.push(LayerEntry::dir("fid/dir", 0o751).with_xattr("user.layer", format!("{i}")));
        e.push(LayerEntry::file(
            "fid/dir/again",
            0o644,
            b"re-created".to_vec(),
        ));
    }
    if i == last {
        e.push(LayerEntry::whiteout(Path::new("fid/big")));
        e.push(LayerEntry::symlink("fid/small", "big-link"));
    }
    e
}

/// A container of `reference` through hyperbox and through overlayfs (`ID-SNAPSHOTTER`): the
/// roots are equal entry by entry; returns hyperbox's rootfs `lowerdir`s and the entries.
fn compare_roots(f: &Fixture, reference: &str, id: &str) -> (Vec<String>, usize) {
    let trees = container_roots(f, reference, id);
    let lowers = rootfs_lowers(&format!("{id}-{PLUGIN}"));
    let (ours, theirs) = (&trees[0], &trees[1]);
    let diffs = differences(ours, theirs, "hyperbox", "overlayfs");
    assert!(
        diffs.is_empty(),
        "{id}: {} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    (lowers, ours.len())
}

/// Merged images: images of 10, 40 and 120 layers (busybox and every kind of entry, then
/// layers that change, delete, re-create and hide through opaque directories) imported through
/// hyperbox and through overlayfs. Each top layer gets one merged image; a container's root
/// through hyperbox is an overlay of that one EROFS mount and its upper dir, and equals the
/// root through overlayfs (over all the layers) entry by entry. An image whose top layer is
/// below another image's (imported after it) gets its merged image once a container is made
/// on it.
fn fidelity_deep(v: ContainerdVersion) {
    use hyperbox_integration::images::layer;
    let f = Fixture::start(v);
    let work = f.snap.dir().join("deep-fidelity");
    let tree = work.join("tree");
    extract_busybox(&tree);
    fill_fidelity_tree(&tree.join("fid"));
    let direct = f.direct();
    let import = |name: &str, depth: usize, last: usize| {
        let history: Vec<String> = (0..depth).map(|i| format!("layer {i}")).collect();
        let history: Vec<&str> = history.iter().map(String::as_str).collect();
        import_image_through(&f, &work, name, &history, &[PLUGIN, "overlayfs"], |w| {
            let mut base = layer::scan_tree(&tree).expect("scan");
            w.add_layer(&mut base).expect("base layer");
            for i in 1..depth {
                w.add_layer(&mut deep_layer(i, last)).expect("layer");
            }
        })
    };
    for depth in [10usize, 40, 120] {
        let name = format!("layers-{depth}");
        let reference = import(&name, depth, depth - 1);
        f.wait_converted(&direct);
        let (lowers, n) = compare_roots(&f, &reference, &name);
        assert_eq!(lowers.len(), 1, "{depth} layers: {lowers:?}");
        assert!(lowers[0].ends_with("/merged"), "{depth} layers: {lowers:?}");
        let labels = direct.list(&["kind==committed"]).expect("list");
        let merged: Vec<&String> = labels
            .iter()
            .filter_map(|i| i.labels.get(MERGED_LABEL))
            .collect();
        eprintln!("{depth} layers: {n} entries identical; merged: {merged:?}");
    }
    // Six layers, all shared with the 10-layer image: its top has a child already.
    let reference = import("layers-6", 6, usize::MAX);
    let (lowers, _) = compare_roots(&f, &reference, "six-a");
    assert_eq!(
        lowers.len(),
        6,
        "the first container reads the layers: {lowers:?}"
    );
    // The container's snapshot names its parent, the six-layer image's top.
    let out = f
        .c()
        .ctr_run(&[
            "snapshots",
            "--snapshotter",
            PLUGIN,
            "info",
            &format!("six-a-{PLUGIN}"),
        ])
        .expect("snapshot info");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info json");
    let top = info["Parent"].as_str().expect("a parent").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !direct
        .list(&["kind==committed"])
        .expect("list")
        .iter()
        .any(|i| i.name.ends_with(&format!("/{top}")) && i.labels.contains_key(MERGED_LABEL))
    {
        assert!(
            Instant::now() < deadline,
            "no merged image made on use of {top}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (lowers, _) = compare_roots(&f, &reference, "six-b");
    assert_eq!(lowers.len(), 1, "{lowers:?}");
    assert!(lowers[0].ends_with("/merged"), "{lowers:?}");

    // Every layer converted once (the images share their first layers); each layer image
    // and merged image fsck.erofs-clean and equal to its mount.
    let committed = direct.list(&["kind==committed"]).expect("list");
    let tops = committed
        .iter()
        .filter(|i| !committed.iter().any(|c| c.parent == i.name))
        .count();
    assert_eq!(tops, 3);
    f.check_converted_layers(committed.len());
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(merged_fidelity, fidelity_deep);

/// Extracts the busybox test image's layers into `tree`.
fn extract_busybox(tree: &Path) {
    let busybox = TestBed::build(TestImage::Busybox).expect("busybox built");
    fs::create_dir_all(tree).unwrap();
    for digest in &busybox.layer_digests {
        sh(&format!(
            "tar -xzpf {} -C {} --numeric-owner",
            busybox.blob_path(digest).display(),
            tree.display()
        ));
    }
}

/// busybox's files (extracted under `work/busybox`) as the entries of one layer.
fn busybox_entries(work: &Path) -> Vec<hyperbox_integration::images::layer::LayerEntry> {
    let tree = work.join("busybox");
    extract_busybox(&tree);
    hyperbox_integration::images::layer::scan_tree(&tree).expect("scan")
}

/// An image whose layers `layers` adds (running `sh`, `PATH=/bin`), imported through the
/// snapshotter as `docker.io/hyperbox/NAME:latest`; returns that reference.
fn import_image(
    f: &Fixture,
    work: &Path,
    name: &str,
    history: &[&str],
    layers: impl FnOnce(&mut hyperbox_integration::images::oci::LayoutWriter),
) -> String {
    import_image_through(f, work, name, history, &[PLUGIN], layers)
}

/// [`import_image`] through each of `snapshotters`.
fn import_image_through(
    f: &Fixture,
    work: &Path,
    name: &str,
    history: &[&str],
    snapshotters: &[&str],
    layers: impl FnOnce(&mut hyperbox_integration::images::oci::LayoutWriter),
) -> String {
    use hyperbox_integration::images::oci;
    let layout = work.join(format!("{name}.layout"));
    let archive = work.join(format!("{name}.tar"));
    let epoch = 2_000_000_000;
    let mut writer = oci::LayoutWriter::create(&layout, epoch).expect("layout");
    layers(&mut writer);
    let run = oci::RunConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin".into()],
        history: history.iter().map(|h| h.to_string()).collect(),
    };
    let reference = format!("docker.io/hyperbox/{name}:latest");
    writer.finish(&run, "latest", &reference).expect("finish");
    oci::write_archive(&layout, &archive, epoch).expect("archive");
    for snapshotter in snapshotters {
        f.c()
            .ctr_run(&[
                "images",
                "import",
                "--snapshotter",
                snapshotter,
                &archive.to_string_lossy(),
            ])
            .unwrap_or_else(|e| panic!("import {name} through {snapshotter}: {e}"));
    }
    reference
}

/// `depth` nested directories `d` under `root` (one descriptor open at a time, as no path
/// this long can be named) with the file `leaf` in the deepest.
fn make_deep(root: &Path, depth: usize) {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::fd::{AsRawFd, FromRawFd};
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut cur = nix::dir::Dir::open(root, flags, Mode::empty()).expect("open root");
    for _ in 0..depth {
        nix::sys::stat::mkdirat(Some(cur.as_raw_fd()), "d", Mode::from_bits_truncate(0o755))
            .expect("mkdirat");
        cur = nix::dir::Dir::openat(Some(cur.as_raw_fd()), "d", flags, Mode::empty())
            .expect("openat");
    }
    let fd = nix::fcntl::openat(
        Some(cur.as_raw_fd()),
        "leaf",
        OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .expect("create leaf");
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    let mut leaf = unsafe { fs::File::from_raw_fd(fd) };
    leaf.write_all(b"at the bottom").expect("write leaf");
}

/// The contents of `leaf` at the bottom of a [`make_deep`] tree.
fn read_deep_leaf(root: &Path, depth: usize) -> Vec<u8> {
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd};
    let flags = OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let mut cur = nix::dir::Dir::open(root, flags, Mode::empty()).expect("open root");
    for level in 0..depth {
        cur = nix::dir::Dir::openat(Some(cur.as_raw_fd()), "d", flags, Mode::empty())
            .unwrap_or_else(|e| panic!("level {level}: {e}"));
    }
    let fd = nix::fcntl::openat(
        Some(cur.as_raw_fd()),
        "leaf",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .expect("open leaf");
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    let mut leaf = unsafe { fs::File::from_raw_fd(fd) };
    let mut data = Vec::new();
    leaf.read_to_end(&mut data).expect("read leaf");
    data
}

/// Waits until committed layer `key` carries the storage label (converted, or set aside),
/// and returns its labels.
fn wait_storage(
    snap: &SnapshotterDaemon,
    calls: &Calls,
    key: &str,
) -> std::collections::HashMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let info = calls.stat(key).expect("stat");
        if info.labels.contains_key(STORAGE_LABEL) {
            return info.labels;
        }
        assert!(
            Instant::now() < deadline,
            "{key} neither converted nor set aside:\n{}",
            snap.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `hyperbox-snapshotter status` against `snap`.
fn status_output(snap: &SnapshotterDaemon) -> String {
    let binary = hyperbox_integration::host::workspace_binary(BINARY).expect("built");
    let out = Command::new(binary)
        .arg("--config")
        .arg(snap.dir().join("snapshotter.toml"))
        .arg("status")
        .output()
        .expect("status runs");
    assert!(out.status.success(), "status: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A committed layer made straight through the API, as containerd's unpacker makes one:
/// `fill` writes into its directory.
fn direct_layer(calls: &Calls, name: &str, parent: &str, fill: impl FnOnce(&Path)) {
    let key = format!("{name}-active");
    let mounts = calls.prepare(&key, parent).expect("prepare");
    let upper = match mounts[0].r#type.as_str() {
        "bind" => PathBuf::from(&mounts[0].source),
        _ => PathBuf::from(option(&mounts[0], "upperdir").expect("upperdir")),
    };
    fill(&upper);
    calls.commit(name, &key).expect("commit");
}

/// The peak RSS a conversion label reports, in MiB.
fn peak_rss_mib(conversion: &str) -> f64 {
    conversion
        .split("peak RSS ")
        .nth(1)
        .and_then(|r| r.split(" MiB").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {conversion:?}"))
}

/// An image of busybox plus 500 nested directories with a file at the bottom, pulled
/// through containerd, converts, passes `fsck.erofs`'s extraction and runs. (containerd's
/// own unpack of deeper trees is slow: it resolves every path component by component,
/// about three minutes for 1,950 levels; the snapshotter's side of deeper layers is
/// `hostile_layers_direct`.)
fn deep_image(v: ContainerdVersion) {
    use hyperbox_integration::images::layer::LayerEntry;
    let f = Fixture::start(v);
    let work = f.snap.dir().join("deep");
    let mut entries = busybox_entries(&work);
    let mut deep = PathBuf::new();
    for _ in 0..500 {
        deep.push("d");
        entries.push(LayerEntry::dir(deep.clone(), 0o755));
    }
    entries.push(LayerEntry::file(
        deep.join("leaf"),
        0o644,
        b"at the bottom".to_vec(),
    ));
    let history = ["busybox and 500 nested directories"];
    let reference = import_image(&f, &work, "deep", &history, |w| {
        w.add_layer(&mut entries).expect("layer");
    });
    let reference = reference.as_str();
    let direct = f.direct();
    f.wait_converted(&direct);
    f.check_converted_layers(1);
    f.run_check(
        reference,
        "deep-500",
        &format!(
            "test \"$(cat /{})\" = 'at the bottom'",
            deep.join("leaf").display()
        ),
    );
    drop(direct);
    teardown_leaves_nothing(f);
}
per_version!(deep, deep_image);

/// Hostile layers, made as containerd's unpacker makes layers (Prepare, write, Commit) but
/// straight on the snapshotter's socket (containerd's garbage collector would remove
/// snapshots it does not know):
/// - a 1,950-deep layer converts (it used to overflow the conversion thread's stack and
///   crash-loop the snapshotter);
/// - a 100,000-deep one is set aside with its reason (label and `status`), stays readable as
///   a plain directory, is not tried again after a restart, and is removed (removal used to
///   overflow the stack too);
/// - sparse files of 1 GiB, 1 TiB and 16 TiB (8 KB of data each) convert with the same
///   peak memory, and a layer over `max_image_bytes` is set aside;
/// - a layer committed while its overlay (or bind mount) is still mounted keeps its
///   directory until the mount is gone.
#[test]
fn hostile_layers_direct() {
    use hyperbox_integration::snapshotter::CONVERSION_LABEL;
    let mut snap = SnapshotterDaemon::start("max_image_bytes = 3221225472\n").expect("started");
    let work = snap.dir().join("hostile");
    fs::create_dir_all(&work).unwrap();
    let calls = Calls::direct(&snap.socket());

    // 1,950 levels convert; the deepest file reads through the EROFS mount.
    direct_layer(&calls, "deep-1950", "", |dir| make_deep(dir, 1950));
    let labels = wait_storage(&snap, &calls, "deep-1950");
    assert_eq!(labels[STORAGE_LABEL], "erofs", "{labels:?}");
    let view = calls.view("deep-1950-view", "deep-1950").expect("view");
    assert_eq!(
        read_deep_leaf(Path::new(&view[0].source), 1950),
        b"at the bottom"
    );
    calls.remove("deep-1950-view").expect("remove view");

    // 100,000 levels: set aside, readable, not retried, removed.
    let before = snap.entries("snapshots");
    direct_layer(&calls, "deep-layer", "", |dir| make_deep(dir, 100_000));
    let labels = wait_storage(&snap, &calls, "deep-layer");
    assert_eq!(labels[STORAGE_LABEL], "directory", "{labels:?}");
    let reason = &labels[CONVERSION_LABEL];
    assert!(
        reason.starts_with("set aside: ") && reason.contains("deeper than 4096 levels"),
        "{reason}"
    );
    assert!(snap.log().contains("set aside"), "{}", snap.log());
    let status = status_output(&snap);
    assert!(
        status.lines().any(|l| l.contains("deep-layer")
            && l.contains("directory")
            && l.contains("deeper than 4096")),
        "{status}"
    );
    let view = calls.view("deep-view", "deep-layer").expect("view");
    assert_eq!(view[0].r#type, "bind", "{view:?}");
    let mnt = work.join("deep-view");
    fs::create_dir(&mnt).unwrap();
    sh(&format!(
        "mount --bind -o ro {} {}",
        view[0].source,
        mnt.display()
    ));
    assert_eq!(read_deep_leaf(&mnt, 100_000), b"at the bottom");
    sh(&format!("umount {}", mnt.display()));
    drop(calls);
    let log_start = snap.log().len();
    snap.stop(Signal::SIGKILL);
    snap.spawn().expect("restarted");
    let calls = Calls::direct(&snap.socket());
    // A check that the conversion is NOT tried again: it is given time to be, then the log
    // is read.
    thread::sleep(Duration::from_secs(2));
    let after_restart = snap.log()[log_start..].to_string();
    assert!(
        !after_restart.contains("set aside"),
        "tried again:\n{after_restart}"
    );
    assert_eq!(calls.stat("deep-layer").unwrap().labels, labels);
    calls.remove("deep-view").expect("remove view");
    calls
        .remove("deep-layer")
        .expect("remove the 100,000-deep layer");
    assert_eq!(before, snap.entries("snapshots"), "directories left behind");
    let pid = snap.pid();

    // Sparse files: memory does not grow with their size; a layer over the image cap is
    // set aside before it costs anything.
    let sizes: [(&str, u64); 3] = [
        ("1 GiB", 1 << 30),
        ("1 TiB", 1 << 40),
        ("16 TiB", (16 << 40) - (64 << 10)),
    ];
    let mut peaks = Vec::new();
    for (i, (name, size)) in sizes.iter().enumerate() {
        let key = format!("sparse-{i}");
        direct_layer(&calls, &key, "", |dir| {
            let file = fs::File::create(dir.join("sparse")).unwrap();
            file.set_len(*size).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, &[0x5a; 8192], size / 2).unwrap();
        });
        let labels = wait_storage(&snap, &calls, &key);
        assert_eq!(labels[STORAGE_LABEL], "erofs", "{labels:?}");
        let conversion = &labels[CONVERSION_LABEL];
        eprintln!("sparse file of {name} with 8 KB of data: {conversion}");
        peaks.push(peak_rss_mib(conversion));
    }
    let max = peaks.iter().cloned().fold(f64::MIN, f64::max);
    let min = peaks.iter().cloned().fold(f64::MAX, f64::min);
    assert!(
        max - min < 16.0,
        "peak RSS differs by {:.1} MiB: {peaks:?}",
        max - min
    );
    direct_layer(&calls, "sparse-over", "", |dir| {
        for n in ["a", "b"] {
            let file = fs::File::create(dir.join(n)).unwrap();
            file.set_len((16 << 40) - (64 << 10)).unwrap();
        }
    });
    let labels = wait_storage(&snap, &calls, "sparse-over");
    assert_eq!(labels[STORAGE_LABEL], "directory", "{labels:?}");
    let reason = &labels[CONVERSION_LABEL];
    assert!(reason.contains("over the limit of 3221225472"), "{reason}");
    for key in ["sparse-over", "sparse-1", "sparse-2"] {
        calls.remove(key).expect("remove");
    }

    // Committed while still mounted (an overlay's upper dir, a bind mount): converted, but
    // the directory stays until the mount is gone.
    for (name, parent) in [("busy-overlay", "sparse-0"), ("busy-bind", "")] {
        let key = format!("{name}-active");
        let mounts = calls.prepare(&key, parent).expect("prepare");
        let mnt = work.join(name);
        fs::create_dir(&mnt).unwrap();
        let m = &mounts[0];
        let upper = if m.r#type == "bind" {
            sh(&format!("mount --bind {} {}", m.source, mnt.display()));
            PathBuf::from(&m.source)
        } else {
            sh(&format!(
                "mount -t overlay overlay -o {} {}",
                m.options.join(","),
                mnt.display()
            ));
            PathBuf::from(option(m, "upperdir").unwrap())
        };
        fs::write(mnt.join("hello"), b"still here").unwrap();
        calls.commit(name, &key).expect("commit");
        let labels = wait_storage(&snap, &calls, name);
        assert_eq!(labels[STORAGE_LABEL], "erofs", "{labels:?}");
        calls.cleanup().expect("cleanup");
        assert!(
            upper.join("hello").exists(),
            "{name}: the mounted dir was released"
        );
        assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"still here");
        fs::write(mnt.join("more"), b"written after the conversion").unwrap();
        sh(&format!("umount {}", mnt.display()));
        calls.cleanup().expect("cleanup");
        assert!(!upper.exists(), "{name}: released once unmounted");
    }
    assert_eq!(snap.pid(), pid, "the snapshotter restarted");
    assert!(!snap.log().contains("panicked"), "{}", snap.log());
}

/// A sparse file over 4 GiB through the tar path (GNU tar's PAX sparse format; containerd
/// writes it out dense): its content, size and data at every region (before and past 4 GiB)
/// come through the EROFS layer, `fsck.erofs` extracts the same, and its holes stay holes:
/// the image stores only the chunks that hold data. One containerd version: containerd
/// writes the 4 GiB out, which both versions do the same way.
#[test]
fn a_sparse_file_over_4_gib_through_tar() {
    use hyperbox_integration::snapshotter::CONVERSION_LABEL;
    use std::os::unix::fs::FileExt;
    let v = ContainerdVersion::V1_7;
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let f = Fixture::start(v);
    let work = f.snap.dir().join("big");
    let mut entries = busybox_entries(&work);
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    let size: u64 = (4 << 30) + (1 << 20);
    let big = fs::File::create(src.join("big")).unwrap();
    big.set_len(size).unwrap();
    let pattern: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    big.write_all_at(&pattern, 0).unwrap();
    big.write_all_at(b"in the middle", (2 << 30) + 12345)
        .unwrap();
    big.write_all_at(&pattern, (4 << 30) + 100).unwrap();
    big.write_all_at(b"the end!!", size - 9).unwrap();
    drop(big);
    let expected = String::from_utf8(
        Command::new("sha256sum")
            .arg(src.join("big"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()[..64]
        .to_string();
    let tar = work.join("big.tar");
    sh(&format!(
        "tar --sparse --format=posix --numeric-owner -cf {} -C {} big",
        tar.display(),
        src.display()
    ));
    let tar_bytes = fs::metadata(&tar).unwrap().len();
    assert!(
        tar_bytes < 4 << 20,
        "the tar is not sparse: {tar_bytes} bytes"
    );

    let history = ["busybox", "a sparse 4 GiB file"];
    let reference = import_image(&f, &work, "big", &history, |w| {
        w.add_layer(&mut entries).expect("busybox layer");
        w.add_tar_layer(&tar).expect("sparse layer");
    });
    let reference = reference.as_str();
    let direct = f.direct();
    let layers = f.wait_converted(&direct);
    f.check_converted_layers_with(2, false);
    // The sparse layer's image addresses 65,553 chunks, holes included (about 512 KiB of
    // chunk indexes); only the four data regions (five chunks: the one past 4 GiB spans
    // two) are stored.
    let conversions: Vec<&String> = layers
        .iter()
        .filter_map(|i| i.labels.get(CONVERSION_LABEL))
        .collect();
    let sparse = conversions
        .iter()
        .find(|c| c.contains("2 inodes"))
        .unwrap_or_else(|| panic!("no two-inode layer: {conversions:?}"));
    eprintln!("sparse layer: {sparse}");
    assert!(sparse.contains(" 5 chunks "), "{sparse}");
    let id = f
        .image_ids()
        .into_iter()
        .find(|id| {
            f.snap
                .root()
                .join("snapshots")
                .join(id)
                .join("erofs/big")
                .exists()
        })
        .expect("the sparse layer's mount");
    let mounted = f.snap.root().join("snapshots").join(&id).join("erofs/big");
    let out = Command::new("sha256sum").arg(&mounted).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout)[..64], expected);
    f.run_check(
        reference,
        "big",
        &format!(
            "test $(stat -c %s /big) = {size} && test \"$(tail -c 9 /big)\" = 'the end!!' && \
             test \"$(dd if=/big bs=1 skip={} count=13 2>/dev/null)\" = 'in the middle'",
            (2u64 << 30) + 12345
        ),
    );
    drop(direct);
    teardown_leaves_nothing(f);
}

/// The differ (containerd 2.x, a `type = "diff"` proxy plugin named as hyperbox's differ in
/// the transfer service's unpack config): a pulled image's layers become EROFS images during
/// the unpack, straight from their archives. Every committed layer is served from its image
/// as soon as the pull returns, no plain directory is left, the conversion label says the
/// differ made it, and containers see the image. A layer it cannot reproduce exactly from
/// the archive (here: an entry whose parent directories the archive lacks) it hands to
/// containerd's walking differ, and that layer is converted after its Commit as before.
/// containerd 1.6 and 1.7 have no diff proxy plugins: there every layer is converted.
fn differ_unpacks(v: ContainerdVersion) {
    use hyperbox_integration::snapshotter::CONVERSION_LABEL;
    const BY_DIFFER: &str = "from the archive by the differ";
    let f = Fixture::start(v);
    let direct = f.direct();
    let by_differ = |i: &Info| {
        i.labels
            .get(CONVERSION_LABEL)
            .is_some_and(|l| l.starts_with(BY_DIFFER))
    };
    let debian = f.push(TestImage::Debian);
    f.pull(&debian).expect("debian");
    let committed = direct.list(&["kind==committed"]).expect("list");
    assert!(!committed.is_empty());
    for i in &committed {
        eprintln!("{}: {:?}", i.name, i.labels.get(CONVERSION_LABEL));
    }
    if v.is_2x() {
        for i in &committed {
            assert!(by_differ(i), "{}: {:?}", i.name, i.labels);
            assert_eq!(
                i.labels.get(STORAGE_LABEL).map(String::as_str),
                Some("erofs"),
                "{}: served from its image when the pull returns",
                i.name
            );
        }
        let log = f.snap.log();
        assert_eq!(
            log.matches("layer unpacked by the differ").count(),
            committed.len(),
            "{log}"
        );
        assert!(!log.contains("layer converted to erofs"), "{log}");
        // No layer directory was written.
        for id in f.snap.image_ids() {
            let fs_dir = f.snap.root().join("snapshots").join(&id).join("fs");
            assert!(!fs_dir.exists(), "{} left", fs_dir.display());
        }
    } else {
        assert!(committed.iter().all(|i| !by_differ(i)), "{committed:?}");
        f.wait_converted(&direct);
    }
    f.run_check(
        &debian,
        "differ-debian",
        "test -s /etc/debian_version && test -x /usr/bin/apt-get && test -L /bin",
    );

    // An upper layer whose entry's parent directories are not in the archive: handed over.
    let (archive, reference) = orphan_image(&f);
    f.c()
        .ctr_run(&[
            "images",
            "import",
            "--snapshotter",
            PLUGIN,
            &archive.to_string_lossy(),
        ])
        .expect("import");
    let converted = f.wait_converted(&direct);
    let handed = converted.iter().filter(|i| !by_differ(i)).count();
    eprintln!(
        "{handed} of {} layers converted after their unpack",
        converted.len()
    );
    if v.is_2x() {
        assert_eq!(
            handed, 1,
            "the orphan layer alone is converted: {converted:?}"
        );
        let log = f.snap.log();
        assert!(
            log.contains("hands the layer to containerd")
                && log.contains("its parent directory is not in the archive"),
            "{log}"
        );
    }
    f.run_check(
        reference,
        "differ-orphan",
        "test \"$(cat /etc/added/deep)\" = 'unpacked by containerd' && test -x /bin/busybox",
    );
}

per_version!(differ, differ_unpacks);

/// An image of busybox and one layer whose only entry's parent directories are not in its
/// archive (`etc/added/deep`): hyperbox's differ hands that layer to containerd. Returns the
/// image archive and its reference.
fn orphan_image(f: &Fixture) -> (PathBuf, &'static str) {
    use hyperbox_integration::images::layer::{self, LayerEntry};
    use hyperbox_integration::images::oci;
    let work = f.snap.dir().join("differ");
    let tree = work.join("tree");
    extract_busybox(&tree);
    let layout = work.join("layout");
    let archive = work.join("orphan.tar");
    let epoch = 2_000_000_000;
    let mut writer = oci::LayoutWriter::create(&layout, epoch).expect("layout");
    let mut lower = layer::scan_tree(&tree).expect("scan");
    writer.add_layer(&mut lower).expect("lower layer");
    let mut upper = vec![LayerEntry::file(
        "etc/added/deep",
        0o644,
        b"unpacked by containerd".to_vec(),
    )];
    writer.add_layer(&mut upper).expect("upper layer");
    let run = oci::RunConfig {
        cmd: vec!["sh".into()],
        env: vec!["PATH=/bin:/usr/bin".into()],
        history: vec!["busybox".into(), "an entry without its parents".into()],
    };
    let reference = "docker.io/hyperbox/orphan:latest";
    writer.finish(&run, "latest", reference).expect("finish");
    oci::write_archive(&layout, &archive, epoch).expect("archive");
    (archive, reference)
}

/// containerd 2.x's diff service with hyperbox's differ in its `default` list, against the
/// advice of config/containerd-snapshotter.v3.toml: a layer the differ hands over to that
/// service comes back to it, and it answers Unimplemented, so that the service goes on to
/// the walking differ instead of round in a loop. Through the diff service itself (`ctr
/// images import --local`, not the transfer service).
#[test]
#[cfg_attr(
    hyperbox_containerd2_unavailable,
    ignore = "containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder holding \
              containerd-2.1.9-src.tar.xz (CI sets it)"
)]
fn differ_listed_by_the_diff_service_on_containerd_2_1() {
    let v = ContainerdVersion::V2_1;
    if !hyperbox_integration::selected_or_skip(v) {
        return;
    }
    let snippet = std::env::temp_dir().join(format!("hb-diff-service-{}.toml", std::process::id()));
    fs::write(
        &snippet,
        "version = 3\n[plugins.\"io.containerd.service.v1.diff-service\"]\n  \
         default = [\"hyperbox-differ\", \"walking\"]\n",
    )
    .unwrap();
    let f = Fixture::start_built(v, "", |b| b.with_import(&snippet));
    let (archive, reference) = orphan_image(&f);
    let started = Instant::now();
    f.c()
        .ctr_run(&[
            "images",
            "import",
            "--local",
            "--snapshotter",
            PLUGIN,
            &archive.to_string_lossy(),
        ])
        .expect("import through the diff service");
    assert!(started.elapsed() < Duration::from_secs(60));
    let log = f.snap.log();
    assert!(log.contains("layer unpacked by the differ"), "{log}");
    assert!(log.contains("hands the layer to containerd"), "{log}");
    f.wait_converted(&f.direct());
    f.run_check(
        reference,
        "differ-listed",
        "test \"$(cat /etc/added/deep)\" = 'unpacked by containerd'",
    );
    let _ = fs::remove_file(&snippet);
}

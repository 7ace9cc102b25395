//! Stand-ins for the images of Kubernetes' CRI conformance suite (`critest` of cri-tools
//! 1.34), built offline from Debian packages and pushed under their original names.
//!
//! critest pulls `registry.k8s.io/pause:3.8`, `registry.k8s.io/e2e-test-images/...` and
//! `gcr.io/k8s-staging-cri-tools/...`; the harness serves them from its loopback registry as
//! mirrors of those hosts (`crate::cri`). What each image must be was read from critest's
//! sources (`pkg/validate`, `pkg/framework`, `images/`):
//!
//! | image | stand-in |
//! | --- | --- |
//! | `pause:3.8` | a static `/pause` (C, built here with `cc -static`): waits for SIGINT/SIGTERM, reaps children; user `65535:65535` |
//! | `e2e-test-images/busybox:1.29-2` | the base of all: Debian's dynamically linked `busybox` with every applet a hard link in `/bin` (a shell that `exec`s, so a masked `/bin/ls` fails), util-linux's `ipcs`, procps' `pgrep`, their libraries, and the `/etc/passwd`/`/etc/group` of busybox 1.29 (`www-data` 33) |
//! | `e2e-test-images/nginx:1.14-2` | base + Debian's `nginx` serving `/usr/share/nginx/html` on port 80, `nginx -g 'daemon off;'` (PID 1 is `nginx: master process`, pid file `/var/run/nginx.pid`) |
//! | `e2e-test-images/httpd:2.4.39-4` | base + busybox `httpd` on port 80, logging a line naming `httpd` first |
//! | `e2e-test-images/nonewprivs:1.3` | base + a set-uid-root `/usr/local/bin/nnp` printing `Effective uid: N` (as Kubernetes' `nnp.c`) |
//! | `test-image-user-uid`, `-username`, `-uid-group`, `-username-group` | base with `User` `1002`, `www-data`, `1003:1004`, `www-data:1004` |
//! | `test-image-predefined-group` | base + `default-user` (1000) in group `group-defined-in-image` (50000); `User` `1000` |
//! | `test-image-1`, `-2`, `-3`, `-latest` | base + an empty file named after the image (cri-tools' `ADD ${TEST}`) |
//! | `test-image-tags:1`, `:2`, `:3` | one image (base + `/same-image`) under three tags |
//! | `test-image-tag:test`, `:all` | base + `/test`, base + `/all` |
//! | `hostnet-nginx-amd64` | as nginx, listening on 12003 only (for host networking) |
//!
//! `test-image-digest` is pinned by the digest of the real image and cannot be stood in for.
//!
//! The binaries come from `$PREFIX/testimg-debs` (Debian 12's `busybox` and `nginx` packages,
//! unpacked there by `scripts/setup-host`: `busybox-static`, which the other test images use,
//! conflicts with `busybox`) and from the host (`ipcs`, `pgrep`, shared libraries found with
//! `ldd`). The set is cached as one entry, `images/critest/KEY/`, keyed by every input's
//! digest, like the other test images.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::layer::{EntryKind, FileData, LayerEntry};
use super::oci::{self, ConfigExtras, Layer, LayoutWriter, RunConfig};
use super::{
    commit_partial, json, key_of, prepare_partial, push_layout, read_json, write, BuildOptions,
    EntryLock, ImageError, FORMAT_VERSION, LAYOUT_DIR, LAYOUT_REF, RECIPE,
};

/// Version of this module's recipes; part of the cache key.
pub const CRI_IMAGES_VERSION: u32 = 1;

/// Where `scripts/setup-host` unpacks the Debian packages the stand-ins are made from.
pub fn debs_dir() -> PathBuf {
    crate::host::prefix().join("testimg-debs")
}

/// The registry hosts critest pulls from; the harness mirrors each to its loopback registry.
pub const REGISTRY_HOSTS: &[&str] = &["registry.k8s.io", "gcr.io"];

/// The image critest pins by digest: not stood in for, its spec is skipped.
pub const DIGEST_IMAGE: &str = "gcr.io/k8s-staging-cri-tools/test-image-digest";

/// The sandbox (pause) image containerd's CRI plugin is configured with.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.8";

const E2E: &str = "registry.k8s.io/e2e-test-images/";
const CRI_TOOLS: &str = "gcr.io/k8s-staging-cri-tools/";

/// What an image is made of, on top of the busybox base (except `Pause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recipe {
    Pause,
    Busybox,
    Nginx {
        port: u16,
    },
    Httpd,
    NoNewPrivs,
    User(&'static str),
    PredefinedGroup,
    /// An empty file `/NAME`.
    File(&'static str),
}

/// (name without tags, tags, recipe).
const IMAGES: &[(&str, &[&str], Recipe)] = &[
    ("registry.k8s.io/pause", &["3.8"], Recipe::Pause),
    ("busybox", &["1.29-2"], Recipe::Busybox),
    ("nginx", &["1.14-2"], Recipe::Nginx { port: 80 }),
    ("httpd", &["2.4.39-4"], Recipe::Httpd),
    ("nonewprivs", &["1.3"], Recipe::NoNewPrivs),
    ("test-image-user-uid", &["latest"], Recipe::User("1002")),
    (
        "test-image-user-username",
        &["latest"],
        Recipe::User("www-data"),
    ),
    (
        "test-image-user-uid-group",
        &["latest"],
        Recipe::User("1003:1004"),
    ),
    (
        "test-image-user-username-group",
        &["latest"],
        Recipe::User("www-data:1004"),
    ),
    (
        "test-image-predefined-group",
        &["latest"],
        Recipe::PredefinedGroup,
    ),
    ("test-image-1", &["latest"], Recipe::File("test-image-1")),
    ("test-image-2", &["latest"], Recipe::File("test-image-2")),
    ("test-image-3", &["latest"], Recipe::File("test-image-3")),
    (
        "test-image-latest",
        &["latest"],
        Recipe::File("test-image-latest"),
    ),
    (
        "test-image-tags",
        &["1", "2", "3"],
        Recipe::File("same-image"),
    ),
    ("test-image-tag", &["test"], Recipe::File("test")),
    ("test-image-tag", &["all"], Recipe::File("all")),
    (
        "hostnet-nginx-amd64",
        &["latest"],
        Recipe::Nginx { port: 12003 },
    ),
];

/// The full name (registry host, repository) of an entry of [`IMAGES`].
fn full_name(short: &str) -> String {
    if short.contains('/') {
        short.to_owned()
    } else if matches!(short, "busybox" | "nginx" | "httpd" | "nonewprivs") {
        format!("{E2E}{short}")
    } else {
        format!("{CRI_TOOLS}{short}")
    }
}

/// One built stand-in: its layout and every name it is pushed under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriImage {
    /// `registry.k8s.io/e2e-test-images/busybox:1.29-2`, ... (one per tag).
    pub references: Vec<String>,
    /// Directory of its OCI layout, relative to the cache entry.
    pub dir: String,
    /// `sha256:HEX` of the manifest.
    pub manifest_digest: String,
}

/// The built set.
#[derive(Debug, Clone)]
pub struct CriImages {
    /// The cache entry.
    pub entry: PathBuf,
    pub images: Vec<CriImage>,
    pub from_cache: bool,
}

impl CriImages {
    /// The OCI layout of `image`.
    pub fn layout(&self, image: &CriImage) -> PathBuf {
        self.entry.join(&image.dir).join(LAYOUT_DIR)
    }

    /// Every reference, in build order.
    pub fn references(&self) -> impl Iterator<Item = &str> {
        self.images
            .iter()
            .flat_map(|i| i.references.iter().map(String::as_str))
    }

    /// Pushes every image to `registry` (`127.0.0.1:PORT`) as `REPO:TAG`, the reference
    /// without its registry host, so that a mirror of that host serves it.
    pub fn push(&self, registry: &str) -> Result<(), ImageError> {
        for image in &self.images {
            for reference in &image.references {
                let (_, repo_tag) = reference.split_once('/').unwrap_or(("", reference));
                push_layout(
                    &self.layout(image),
                    &image.manifest_digest,
                    registry,
                    repo_tag,
                )?;
            }
        }
        Ok(())
    }
}

/// The files the stand-ins are made of, found on this host.
#[derive(Debug)]
struct Inputs {
    busybox: PathBuf,
    nginx: PathBuf,
    ipcs: PathBuf,
    pgrep: PathBuf,
    cc: PathBuf,
    cc_version: String,
}

impl Inputs {
    fn find() -> Result<Self, ImageError> {
        let debs = debs_dir();
        let busybox = debs.join("bin/busybox");
        let nginx = debs.join("usr/sbin/nginx");
        for (path, package) in [(&busybox, "busybox"), (&nginx, "nginx")] {
            if !path.is_file() {
                return Err(ImageError::Busybox {
                    path: path.clone(),
                    reason: format!(
                        "missing: scripts/setup-host unpacks Debian's `{package}` package into {}",
                        debs.display()
                    ),
                });
            }
        }
        let ipcs = super::rootfs::find_tool("ipcs", "util-linux")?;
        let pgrep = super::rootfs::find_tool("pgrep", "procps")?;
        let cc = super::rootfs::find_tool("cc", "build-essential")?;
        let out = run(Command::new(&cc).arg("--version"), "cc --version")?;
        let cc_version = String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            busybox,
            nginx,
            ipcs,
            pgrep,
            cc,
            cc_version,
        })
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, ImageError> {
    super::run_tool(cmd, what)
}

/// Shared libraries `binary` needs, as `ldd` resolves them on this host: (path in the image,
/// relative; the file to copy).
fn libraries(binary: &Path) -> Result<Vec<(PathBuf, PathBuf)>, ImageError> {
    let out = run(
        Command::new("ldd").arg(binary),
        &format!("ldd {}", binary.display()),
    )?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let line = line.trim();
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no path.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        if !path.starts_with('/') {
            continue;
        }
        let real = fs::canonicalize(path)
            .map_err(|e| ImageError::io("cannot resolve", Path::new(path), e))?;
        libs.push((PathBuf::from(path.trim_start_matches('/')), real));
    }
    Ok(libs)
}

/// A layer being put together: entries by path, parent directories added as needed.
#[derive(Debug, Default)]
struct Tree {
    entries: BTreeMap<PathBuf, LayerEntry>,
}

impl Tree {
    fn add(&mut self, entry: LayerEntry) {
        let mut parent = entry.path.parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_path_buf())
                .or_insert_with(|| LayerEntry::dir(p, 0o755));
            parent = p.parent();
        }
        self.entries.insert(entry.path.clone(), entry);
    }

    fn dir(&mut self, path: &str, mode: u32) {
        self.add(LayerEntry::dir(path, mode));
    }

    fn text(&mut self, path: &str, mode: u32, text: &str) {
        self.add(LayerEntry::file(path, mode, text.as_bytes().to_vec()));
    }

    /// A copy of the host file `src` at `path`.
    fn copy(&mut self, path: impl Into<PathBuf>, src: &Path, mode: u32) -> Result<(), ImageError> {
        let size = fs::metadata(src)
            .map_err(|e| ImageError::io("cannot stat", src, e))?
            .len();
        let mut e = LayerEntry::dir(path, mode);
        e.kind = EntryKind::File {
            data: FileData::Path(src.to_path_buf()),
            size,
        };
        self.add(e);
        Ok(())
    }

    /// `binary` at `path` with the libraries it needs.
    fn binary(&mut self, path: &str, binary: &Path) -> Result<(), ImageError> {
        self.copy(path, binary, 0o755)?;
        for (in_image, real) in libraries(binary)? {
            self.copy(in_image, &real, 0o755)?;
        }
        Ok(())
    }

    fn into_entries(self, epoch: u64) -> Vec<LayerEntry> {
        self.entries
            .into_values()
            .map(|e| e.with_mtime(epoch))
            .collect()
    }
}

/// `/etc/passwd` of busybox 1.29 (the e2e-test-images base).
const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
daemon:x:1:1:daemon:/usr/sbin:/bin/false\n\
bin:x:2:2:bin:/bin:/bin/false\n\
sys:x:3:3:sys:/dev:/bin/false\n\
sync:x:4:100:sync:/bin:/bin/sync\n\
mail:x:8:8:mail:/var/spool/mail:/bin/false\n\
www-data:x:33:33:www-data:/var/www:/bin/false\n\
operator:x:37:37:Operator:/var:/bin/false\n\
nobody:x:65534:65534:nobody:/home:/bin/false\n";

/// `/etc/group` of busybox 1.29.
const GROUP: &str = "root:x:0:\ndaemon:x:1:\nbin:x:2:\nsys:x:3:\nadm:x:4:\ntty:x:5:\n\
disk:x:6:\nlp:x:7:\nmail:x:8:\nkmem:x:9:\nwheel:x:10:root\ncdrom:x:11:\ndialout:x:18:\n\
floppy:x:19:\nvideo:x:28:\naudio:x:29:\ntape:x:32:\nwww-data:x:33:\noperator:x:37:\n\
utmp:x:43:\nplugdev:x:46:\nstaff:x:50:\nlock:x:54:\nnetdev:x:82:\nusers:x:100:\n\
nogroup:x:65534:\n";

/// Kubernetes' pause, reduced to what a sandbox needs: PID 1 that reaps and exits on
/// SIGINT/SIGTERM.
const PAUSE_C: &str = r#"#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void sigdown(int signo) {
  psignal(signo, "Shutting down, got signal");
  exit(0);
}

static void sigreap(int signo) {
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0)
    ;
}

int main(void) {
  if (getpid() != 1)
    fprintf(stderr, "Warning: pause should be the first process\n");
  if (sigaction(SIGINT, &(struct sigaction){.sa_handler = sigdown}, NULL) < 0)
    return 1;
  if (sigaction(SIGTERM, &(struct sigaction){.sa_handler = sigdown}, NULL) < 0)
    return 2;
  if (sigaction(SIGCHLD, &(struct sigaction){.sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP}, NULL) < 0)
    return 3;
  for (;;)
    pause();
}
"#;

/// Kubernetes' `test/images/nonewprivs/nnp.c`.
const NNP_C: &str = r#"#include <stdio.h>
#include <unistd.h>

int main(void) {
  printf("Effective uid: %d\n", geteuid());
  return 0;
}
"#;

const NGINX_MIME_TYPES: &str = "types {\n    text/html html htm;\n    text/plain txt;\n    \
application/octet-stream bin;\n}\n";

fn nginx_conf(port: u16) -> String {
    format!(
        "# HyperBox's stand-in for the nginx of Kubernetes' e2e test images.\n\
         user www-data;\n\
         worker_processes 1;\n\
         pid /var/run/nginx.pid;\n\
         error_log stderr notice;\n\
         events {{\n    worker_connections 64;\n}}\n\
         http {{\n    include /etc/nginx/mime.types;\n    default_type application/octet-stream;\n    \
         access_log /dev/stdout;\n    server {{\n        listen {port};\n        \
         server_name localhost;\n        location / {{\n            \
         root /usr/share/nginx/html;\n            index index.html;\n        }}\n    }}\n}}\n"
    )
}

const INDEX_HTML: &str = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n\
<body><h1>Welcome to nginx!</h1></body></html>\n";

const HTTPD_FOREGROUND: &str = "#!/bin/sh\n\
# HyperBox's stand-in for Apache httpd 2.4.39: busybox httpd in the foreground.\n\
echo \"httpd: busybox httpd serving /usr/local/apache2/htdocs on port 80\"\n\
exec httpd -f -v -p 80 -h /usr/local/apache2/htdocs\n";

/// Builds the stand-ins, or finds them in the cache.
pub fn build(opts: &BuildOptions) -> Result<CriImages, ImageError> {
    let inputs = Inputs::find()?;
    let epoch = opts.source_date_epoch;
    // The key: every input's digest (libraries included) and every recipe.
    let mut recipe = format!(
        "hyperbox critest images v{CRI_IMAGES_VERSION} format v{FORMAT_VERSION}\n\
         source_date_epoch={epoch}\ncc={}\npause.c={}\nnnp.c={}\n",
        inputs.cc_version,
        oci::sha256_digest(PAUSE_C.as_bytes()),
        oci::sha256_digest(NNP_C.as_bytes()),
    );
    for bin in [&inputs.busybox, &inputs.nginx, &inputs.ipcs, &inputs.pgrep] {
        recipe.push_str(&format!("{}={}\n", bin.display(), oci::file_digest(bin)?));
        for (path, real) in libraries(bin)? {
            recipe.push_str(&format!(
                "  {}={}\n",
                path.display(),
                oci::file_digest(&real)?
            ));
        }
    }
    for (name, tags, r) in IMAGES {
        recipe.push_str(&format!("{name}:{tags:?} {r:?}\n"));
    }
    recipe.push_str(&oci::sha256_digest(
        format!(
            "{PASSWD}{GROUP}{NGINX_MIME_TYPES}{}{INDEX_HTML}{HTTPD_FOREGROUND}",
            nginx_conf(80)
        )
        .as_bytes(),
    ));
    let entry = opts.cache_root.join("images/critest").join(key_of(&recipe));
    let _lock = EntryLock::acquire(&entry)?;
    let record = entry.join("images.json");
    if !opts.no_cache && record.is_file() {
        let images: Vec<CriImage> = read_json(&record)?;
        return Ok(CriImages {
            entry,
            images,
            from_cache: true,
        });
    }
    let partial = prepare_partial(&entry)?;
    write(&partial.join(RECIPE), recipe.as_bytes())?;
    let images = build_into(&partial, &inputs, epoch)?;
    write(&partial.join("images.json"), &json(&images)?)?;
    commit_partial(&partial, &entry)?;
    Ok(CriImages {
        entry,
        images,
        from_cache: false,
    })
}

/// Compiles a C program statically.
fn compile(cc: &Path, source: &str, dir: &Path, name: &str) -> Result<PathBuf, ImageError> {
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(name);
    write(&src, source.as_bytes())?;
    run(
        Command::new(cc)
            .args(["-static", "-Os", "-s", "-o"])
            .arg(&out)
            .arg(&src)
            .stdin(Stdio::null()),
        &format!("cc -static -o {} {}", out.display(), src.display()),
    )?;
    Ok(out)
}

fn base_tree(inputs: &Inputs) -> Result<Tree, ImageError> {
    let mut t = Tree::default();
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("home", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("var/run", 0o755),
        ("var/spool/mail", 0o755),
        ("var/tmp", 0o1777),
        ("var/www", 0o755),
    ] {
        t.dir(dir, mode);
    }
    t.text("etc/passwd", 0o644, PASSWD);
    t.text("etc/group", 0o644, GROUP);
    // Applets as hard links of one file (the first name in sorted order carries the data,
    // as a tar's hard links must follow their target).
    let listing = run(
        Command::new(&inputs.busybox).arg("--list"),
        "busybox --list",
    )?;
    let mut names: Vec<String> = String::from_utf8_lossy(&listing)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    names.push("busybox".to_owned());
    names.sort();
    names.dedup();
    let first = PathBuf::from("bin").join(&names[0]);
    t.copy(&first, &inputs.busybox, 0o755)?;
    for name in &names[1..] {
        let mut e = LayerEntry::dir(PathBuf::from("bin").join(name), 0o755);
        e.kind = EntryKind::HardLink {
            target: first.clone(),
        };
        t.add(e);
    }
    for (in_image, real) in libraries(&inputs.busybox)? {
        t.copy(in_image, &real, 0o755)?;
    }
    t.binary("bin/ipcs", &inputs.ipcs)?;
    t.binary("usr/bin/pgrep", &inputs.pgrep)?;
    Ok(t)
}

fn nginx_tree(inputs: &Inputs, port: u16) -> Result<Tree, ImageError> {
    let mut t = Tree::default();
    t.binary("usr/sbin/nginx", &inputs.nginx)?;
    t.text("etc/nginx/nginx.conf", 0o644, &nginx_conf(port));
    t.text("etc/nginx/mime.types", 0o644, NGINX_MIME_TYPES);
    t.text("usr/share/nginx/html/index.html", 0o644, INDEX_HTML);
    t.dir("var/lib/nginx", 0o755);
    t.dir("var/log/nginx", 0o755);
    t.dir("var/cache/nginx", 0o755);
    Ok(t)
}

fn build_into(dir: &Path, inputs: &Inputs, epoch: u64) -> Result<Vec<CriImage>, ImageError> {
    let scratch = dir.join("src");
    fs::create_dir_all(&scratch).map_err(|e| ImageError::io("cannot create", &scratch, e))?;
    let pause = compile(&inputs.cc, PAUSE_C, &scratch, "pause")?;
    let nnp = compile(&inputs.cc, NNP_C, &scratch, "nnp")?;

    let mut base: Option<(PathBuf, Layer)> = None;
    let mut out = Vec::new();
    for (i, (short, tags, recipe)) in IMAGES.iter().enumerate() {
        let name = full_name(short);
        let sub = format!("{i:02}-{}", short.rsplit('/').next().unwrap_or(short));
        let layout = dir.join(&sub).join(LAYOUT_DIR);
        let mut w = LayoutWriter::create(&layout, epoch)?;
        let mut history = Vec::new();
        let mut extras = ConfigExtras::default();
        let mut cmd = vec!["sh".to_owned()];
        if *recipe != Recipe::Pause {
            match &base {
                Some((from, layer)) => w.add_existing_layer(from, layer)?,
                None => {
                    let mut entries = base_tree(inputs)?.into_entries(epoch);
                    let layer = w.add_layer(&mut entries)?.clone();
                    base = Some((layout.clone(), layer));
                }
            }
            history.push(
                "hyperbox-testimg: Debian busybox with applet hard links, ipcs, pgrep".to_owned(),
            );
        }
        let mut extra = Tree::default();
        match recipe {
            Recipe::Pause => {
                extra.copy("pause", &pause, 0o755)?;
                extras.entrypoint = vec!["/pause".to_owned()];
                extras.user = "65535:65535".to_owned();
                cmd.clear();
            }
            Recipe::Busybox => {}
            Recipe::Nginx { port } => {
                extra = nginx_tree(inputs, *port)?;
                cmd = ["nginx", "-g", "daemon off;"].map(str::to_owned).to_vec();
                extras.exposed_ports = vec![format!("{port}/tcp")];
            }
            Recipe::Httpd => {
                extra.text(
                    "usr/local/apache2/htdocs/index.html",
                    0o644,
                    "<html><body><h1>It works!</h1></body></html>\n",
                );
                extra.text("usr/local/bin/httpd-foreground", 0o755, HTTPD_FOREGROUND);
                cmd = vec!["httpd-foreground".to_owned()];
                extras.exposed_ports = vec!["80/tcp".to_owned()];
            }
            Recipe::NoNewPrivs => {
                extra.copy("usr/local/bin/nnp", &nnp, 0o4755)?;
                extras.entrypoint = vec!["/usr/local/bin/nnp".to_owned()];
                cmd.clear();
            }
            Recipe::User(user) => extras.user = (*user).to_owned(),
            Recipe::PredefinedGroup => {
                extra.text(
                    "etc/passwd",
                    0o644,
                    &format!("{PASSWD}default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"),
                );
                extra.text(
                    "etc/group",
                    0o644,
                    &format!("{GROUP}default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"),
                );
                extra.add(LayerEntry::dir("home/default-user", 0o755).with_owner(1000, 1000));
                extras.user = "1000".to_owned();
            }
            Recipe::File(file) => extra.text(file, 0o644, ""),
        }
        if !extra.entries.is_empty() {
            let mut entries = extra.into_entries(epoch);
            w.add_layer(&mut entries)?;
            history.push(format!("hyperbox-testimg: {recipe:?}"));
        }
        w.set_extras(extras);
        let run = RunConfig {
            cmd,
            env: vec![super::rootfs::IMAGE_PATH.to_owned()],
            history,
        };
        let references: Vec<String> = tags.iter().map(|t| format!("{name}:{t}")).collect();
        let written = w.finish(&run, LAYOUT_REF, &references[0])?;
        out.push(CriImage {
            references,
            dir: sub,
            manifest_digest: written.manifest.digest().to_string(),
        });
    }
    fs::remove_dir_all(&scratch).map_err(|e| ImageError::io("cannot remove", &scratch, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_ones_critest_pulls() {
        let all: Vec<String> = IMAGES
            .iter()
            .flat_map(|(s, tags, _)| tags.iter().map(move |t| format!("{}:{t}", full_name(s))))
            .collect();
        for want in [
            PAUSE_IMAGE,
            "registry.k8s.io/e2e-test-images/busybox:1.29-2",
            "registry.k8s.io/e2e-test-images/nginx:1.14-2",
            "registry.k8s.io/e2e-test-images/httpd:2.4.39-4",
            "registry.k8s.io/e2e-test-images/nonewprivs:1.3",
            "gcr.io/k8s-staging-cri-tools/test-image-user-username-group:latest",
            "gcr.io/k8s-staging-cri-tools/test-image-tags:3",
            "gcr.io/k8s-staging-cri-tools/test-image-tag:all",
            "gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest",
        ] {
            assert!(all.iter().any(|a| a == want), "missing {want}");
        }
        for name in &all {
            let host = name.split('/').next().unwrap_or_default();
            assert!(REGISTRY_HOSTS.contains(&host), "{name}: host not mirrored");
        }
    }
}

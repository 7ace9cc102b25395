//! `hyperbox-testimg`: builds the offline test images (reproducibly, cached) and pushes them
//! to a loopback registry.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hyperbox_integration::cli;
use hyperbox_integration::images::{self, BuildOptions, TestImage};

#[derive(Debug, Parser)]
#[command(
    name = "hyperbox-testimg",
    about = "Build and push the HyperBox offline test images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build images (or find them in the cache) and print `NAME DIGEST LAYOUT` per image.
    Build {
        /// Build from scratch, ignoring cached root filesystems and images.
        #[arg(long)]
        no_cache: bool,
        /// Put the images in DIR/NAME/ (`oci/`, `image.tar`) instead of the cache.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// busybox, debian, debian-python or all (the default).
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Build (or find) images and push each as REGISTRY/hyperbox/NAME:latest.
    Push {
        /// The registry, `127.0.0.1:PORT`.
        #[arg(long)]
        registry: String,
        /// busybox, debian, debian-python or all.
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
    },
    /// Debootstrap a Debian 12 minbase tree with more packages into DIR (which must not
    /// exist), using the harness's package cache and mirror: the VM scripts' root filesystems.
    Rootfs {
        /// Packages to add (`--include`).
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// The tree to create.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Build a release's installer image (`scripts/release`): PAYLOAD under `/payload`, run as
    /// `hyperbox-node install --enter-host`; written as an oci-archive.
    Installer {
        /// The release's payload directory (bin/, config/, deploy/).
        #[arg(long)]
        payload: PathBuf,
        /// The oci-archive to write.
        #[arg(long)]
        out: PathBuf,
        /// The image's name.
        #[arg(long, default_value = "docker.io/hyperbox/hyperbox-node:latest")]
        reference: String,
    },
    /// Build (or find) the stand-ins for the images of Kubernetes' CRI suite (critest) and
    /// print `REFERENCE DIGEST` per name; with --registry, push each there as REPO:TAG.
    Critest {
        /// The registry, `127.0.0.1:PORT`.
        #[arg(long)]
        registry: Option<String>,
        /// Also write each image as an oci-archive (what `ctr images import` reads) in DIR,
        /// printed as a third column.
        #[arg(long, value_name = "DIR")]
        export: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    cli::init_logging("info");
    cli::exit_code("hyperbox-testimg", run(Cli::parse()))
}

fn run(cli: Cli) -> Result<()> {
    let opts = BuildOptions::from_env().context("reading the build settings")?;
    match cli.command {
        Cmd::Build {
            no_cache,
            out,
            names,
        } => {
            let mut opts = opts.with_no_cache(no_cache);
            if let Some(out) = out {
                opts = opts.with_out_dir(out);
            }
            for image in parse_names(&names)? {
                let started = Instant::now();
                let built = images::build(image, &opts)
                    .with_context(|| format!("building the {image} image"))?;
                tracing::info!(
                    image = %image,
                    seconds = started.elapsed().as_secs_f64(),
                    bytes = built.size,
                    from_cache = built.from_cache,
                    "done"
                );
                println!(
                    "{} {} {}",
                    built.name,
                    built.manifest_digest,
                    built.layout_dir.display()
                );
            }
        }
        Cmd::Push { registry, names } => {
            for image in parse_names(&names)? {
                let built = images::build(image, &opts)
                    .with_context(|| format!("building the {image} image"))?;
                let repo_tag = format!("hyperbox/{}:latest", image.name());
                images::push(&built, &registry, &repo_tag)
                    .with_context(|| format!("pushing {image} to {registry}"))?;
                println!(
                    "{} {} {registry}/{repo_tag}",
                    built.name, built.manifest_digest
                );
            }
        }
        Cmd::Rootfs { include, dir } => {
            // The recipe's fields are 'static: this process makes one tree and exits.
            let include: &'static [&'static str] =
                Vec::leak(include.into_iter().map(|p| &*String::leak(p)).collect());
            let recipe = images::rootfs::DebootstrapRecipe {
                suite: "bookworm",
                variant: "minbase",
                arch: "amd64",
                include,
            };
            let deb_cache = opts.cache_root.join("debootstrap/bookworm-amd64");
            std::fs::create_dir_all(&deb_cache)
                .with_context(|| format!("cannot create {}", deb_cache.display()))?;
            let mirror = images::rootfs::debian_mirror(recipe.suite)?;
            let log = dir.with_extension("log");
            images::rootfs::debootstrap(&recipe, &dir, &deb_cache, &mirror, &log).with_context(
                || format!("debootstrap into {} (log {})", dir.display(), log.display()),
            )?;
            println!("{}", dir.display());
        }
        Cmd::Installer {
            payload,
            out,
            reference,
        } => {
            let written =
                images::installer::build(&payload, &out, &reference, opts.source_date_epoch)
                    .with_context(|| {
                        format!("building the installer image of {}", payload.display())
                    })?;
            println!(
                "{reference} {} {}",
                written.manifest.digest(),
                out.display()
            );
        }
        Cmd::Critest { registry, export } => {
            let started = Instant::now();
            let built = images::cri::build(&opts).context("building the critest images")?;
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                from_cache = built.from_cache,
                entry = %built.entry.display(),
                "critest images done"
            );
            if let Some(registry) = &registry {
                built
                    .push(registry)
                    .with_context(|| format!("pushing the critest images to {registry}"))?;
            }
            for image in &built.images {
                let archive = match &export {
                    Some(dir) => {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("cannot create {}", dir.display()))?;
                        let file = dir.join(format!("{}.tar", image.dir.replace('/', "_")));
                        images::oci::write_archive(
                            &built.layout(image),
                            &file,
                            opts.source_date_epoch,
                        )
                        .with_context(|| format!("writing {}", file.display()))?;
                        format!(" {}", file.display())
                    }
                    None => String::new(),
                };
                for reference in &image.references {
                    println!("{reference} {}{archive}", image.manifest_digest);
                }
            }
        }
    }
    Ok(())
}

/// Image names from the command line; none or `all` means every image.
fn parse_names(names: &[String]) -> Result<Vec<TestImage>> {
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(TestImage::all().to_vec());
    }
    names
        .iter()
        .map(|n| n.parse::<TestImage>().map_err(anyhow::Error::from))
        .collect()
}

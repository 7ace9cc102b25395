//! A test bed: a private containerd and a loopback registry holding the offline test images,
//! the starting point of most integration tests, benchmarks and the demo.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::containerd::{Containerd, ContainerdBuilder, ContainerdError, ContainerdVersion};
use crate::images::{self, BuildOptions, BuiltImage, ImageError, TestImage};
use crate::registry::{Registry, RegistryError};

/// Errors setting up a test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestBedError {
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(
        "runtime {0} is not registered: build its shim first (cargo build --workspace --bins)"
    )]
    RuntimeMissing(String),
}

/// A containerd of one version plus a registry. Images are built (or taken from the cache),
/// pushed and pulled on first use.
#[derive(Debug)]
pub struct TestBed {
    // Field order is drop order: containers go before the registry.
    pub containerd: Containerd,
    pub registry: Registry,
    pulled: Mutex<BTreeMap<&'static str, String>>,
}

impl TestBed {
    /// Starts a registry and a default containerd of `version`.
    pub fn start(version: ContainerdVersion) -> Result<Self, TestBedError> {
        Self::with_builder(Containerd::builder(version))
    }

    /// Starts a default test bed of `version` with `image` pulled, after checking that
    /// `runtime` is registered (its shim built in the workspace); returns the image's
    /// reference too.
    pub fn for_runtime(
        version: ContainerdVersion,
        runtime: &str,
        image: TestImage,
    ) -> Result<(Self, String), TestBedError> {
        let bed = Self::start(version)?;
        if !bed.containerd.runtimes().iter().any(|r| r == runtime) {
            return Err(TestBedError::RuntimeMissing(runtime.to_string()));
        }
        let reference = bed.image(image)?;
        Ok((bed, reference))
    }

    /// Starts a registry and the containerd `builder` describes.
    pub fn with_builder(builder: ContainerdBuilder) -> Result<Self, TestBedError> {
        let registry = Registry::start()?;
        let containerd = builder.start()?;
        Ok(TestBed {
            containerd,
            registry,
            pulled: Mutex::new(BTreeMap::new()),
        })
    }

    /// Builds (or reuses) `image` in the cache without pushing it anywhere.
    pub fn build(image: TestImage) -> Result<BuiltImage, TestBedError> {
        Ok(images::build(image, &BuildOptions::default())?)
    }

    /// Makes `image` available in containerd (pushed to the registry, then pulled from it,
    /// as a user pulls) and returns its reference.
    pub fn image(&self, image: TestImage) -> Result<String, TestBedError> {
        let mut pulled = self.pulled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = pulled.get(image.name()) {
            return Ok(r.clone());
        }
        let built = Self::build(image)?;
        let repo_tag = format!("hyperbox/{}:latest", image.name());
        images::push(&built, &self.registry.host(), &repo_tag)?;
        let reference = self.registry.reference(&repo_tag);
        self.containerd.pull(&reference)?;
        pulled.insert(image.name(), reference.clone());
        Ok(reference)
    }

    /// Tears down containerd and the registry, reporting anything left behind (dropping
    /// does the same but can only log).
    pub fn teardown(mut self) -> Result<(), TestBedError> {
        self.containerd.teardown()?;
        self.registry.teardown()?;
        Ok(())
    }
}

//! The installer image of a release (`scripts/release`): a release's payload under
//! `/payload`, nothing else, with `hyperbox-node install` as its command. Its DaemonSet
//! (`deploy/hyperbox-node.yaml`) runs it privileged with `hostPID`, so that the installer
//! enters the node's mount namespace and installs there; the static `hyperbox-node` needs
//! nothing from the image.

use std::path::{Path, PathBuf};

use super::layer::{self, LayerEntry};
use super::oci::{self, LayoutWriter, RunConfig, Written};
use super::ImageError;

/// The image's command (and the DaemonSet's, which repeats it).
pub const COMMAND: &[&str] = &[
    "/payload/bin/hyperbox-node",
    "install",
    "--enter-host",
    "--from",
    "/payload",
    "--stay",
];

/// Writes the installer image of `payload` as an oci-archive at `archive`, named
/// `reference` (what `ctr images import` gives it), with times clamped to `epoch`.
pub fn build(
    payload: &Path,
    archive: &Path,
    reference: &str,
    epoch: u64,
) -> Result<Written, ImageError> {
    let layout = archive.with_extension("layout");
    let _ = std::fs::remove_dir_all(&layout);
    let mut entries: Vec<LayerEntry> = vec![LayerEntry::dir("payload", 0o755)];
    for mut e in layer::scan_tree(payload)? {
        e.path = PathBuf::from("payload").join(&e.path);
        if let layer::EntryKind::HardLink { target } = &mut e.kind {
            *target = PathBuf::from("payload").join(&*target);
        }
        e.uid = 0;
        e.gid = 0;
        e.xattrs.clear();
        entries.push(e);
    }
    let mut writer = LayoutWriter::create(&layout, epoch)?;
    writer.add_layer(&mut entries)?;
    let run = RunConfig {
        cmd: COMMAND.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        history: vec!["hyperbox-testimg installer: a HyperBox release's payload".into()],
    };
    let tag = reference.rsplit_once(':').map_or("latest", |(_, t)| t);
    let written = writer.finish(&run, tag, reference)?;
    oci::write_archive(&layout, archive, epoch)?;
    std::fs::remove_dir_all(&layout).map_err(|e| ImageError::io("cannot remove", &layout, e))?;
    Ok(written)
}

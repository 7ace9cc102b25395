//! The snapshotter's error ([`SnapshotterError`]) and the gRPC code containerd expects for
//! each, in one place.

use std::io;
use std::path::{Path, PathBuf};

use containerd_snapshots::tonic::{self, Status};

use crate::filter::FilterError;
use crate::store::StoreError;

/// Errors of the snapshotter, each with the gRPC code containerd expects.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    #[error("snapshot {0:?}: not found")]
    NotFound(String),
    #[error("parent snapshot {0:?}: not found")]
    ParentNotFound(String),
    #[error("snapshot {0:?}: already exists")]
    AlreadyExists(String),
    #[error("snapshot {0:?} is not active")]
    NotActive(String),
    #[error("snapshot {0:?} is committed: mounts exist only for active snapshots and views")]
    NotMountable(String),
    #[error("cannot remove snapshot {0:?}: it has children, remove them first")]
    HasChildren(String),
    #[error("parent {0:?} is not a committed snapshot")]
    ParentNotCommitted(String),
    #[error("snapshot key is empty")]
    EmptyKey,
    #[error("cannot update field {field:?} of snapshot {key:?}: only labels may change")]
    ImmutableField { key: String, field: String },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("snapshotter task failed: {0}")]
    Task(String),
    #[error("chunk store: {0}")]
    Chunks(#[from] hyperbox_erofs::StoreError),
    #[error("erofs layer {id}: {source}")]
    Layer {
        id: u64,
        source: hyperbox_erofs::LayerError,
    },
    #[error("merged image of layer {id}: {source}")]
    Merge {
        id: u64,
        source: hyperbox_erofs::ImageError,
    },
    #[error("erofs layer {id}: {source}")]
    Mount {
        id: u64,
        source: hyperbox_erofs::MountError,
    },
}

pub(crate) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(io::Error) -> SnapshotterError {
    let path = path.to_path_buf();
    move |source| SnapshotterError::Io { what, path, source }
}

impl SnapshotterError {
    /// The gRPC code containerd maps back to its `errdefs` error.
    pub fn code(&self) -> tonic::Code {
        use SnapshotterError as E;
        match self {
            E::NotFound(_) | E::ParentNotFound(_) => tonic::Code::NotFound,
            E::AlreadyExists(_) => tonic::Code::AlreadyExists,
            E::NotActive(_) | E::NotMountable(_) | E::HasChildren(_) => {
                tonic::Code::FailedPrecondition
            }
            E::ParentNotCommitted(_) | E::EmptyKey | E::ImmutableField { .. } | E::Filter(_) => {
                tonic::Code::InvalidArgument
            }
            E::Store(_)
            | E::Io { .. }
            | E::Task(_)
            | E::Chunks(_)
            | E::Layer { .. }
            | E::Merge { .. }
            | E::Mount { .. } => tonic::Code::Internal,
        }
    }
}

impl From<SnapshotterError> for Status {
    fn from(e: SnapshotterError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

pub(crate) type Result<T, E = SnapshotterError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_containerd_expects() {
        let cases = [
            (
                SnapshotterError::NotFound("k".into()),
                tonic::Code::NotFound,
            ),
            (
                SnapshotterError::ParentNotFound("p".into()),
                tonic::Code::NotFound,
            ),
            (
                SnapshotterError::AlreadyExists("k".into()),
                tonic::Code::AlreadyExists,
            ),
            (
                SnapshotterError::NotActive("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::NotMountable("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::HasChildren("k".into()),
                tonic::Code::FailedPrecondition,
            ),
            (
                SnapshotterError::ParentNotCommitted("p".into()),
                tonic::Code::InvalidArgument,
            ),
            (SnapshotterError::EmptyKey, tonic::Code::InvalidArgument),
            (SnapshotterError::Task("x".into()), tonic::Code::Internal),
        ];
        for (e, code) in cases {
            let text = e.to_string();
            let status: Status = e.into();
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }
}

//! Errors of the task service and of engines, and their one mapping to ttrpc status codes.

use std::io;
use std::path::PathBuf;

use containerd_shim::protos::ttrpc::{self, Code};
use serde::{Deserialize, Serialize};

/// What an [`Engine`](crate::Engine) reports when it cannot do what was asked. Serializable so
/// that an engine whose work happens in a helper process can carry it across unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EngineError {
    /// The bundle or the request asks for something invalid (a bad spec, a missing path).
    #[error("{0}")]
    InvalidSpec(String),
    /// The request is valid but this engine cannot honour it (a feature it was built without).
    #[error("{0}")]
    Unsupported(String),
    /// The container or process named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Anything else: the runtime failed.
    #[error("{0}")]
    Failed(String),
}

/// Errors of the task service.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0} is not implemented by this shim yet")]
    Unimplemented(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl ShimError {
    /// The ttrpc status code containerd receives for this error. containerd turns these codes
    /// back into its errdefs (`NOT_FOUND` into `ErrNotFound` and so on), which decide what it
    /// does next: for example a `NOT_FOUND` from Kill means "already gone" to it.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) | ShimError::Engine(EngineError::NotFound(_)) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::FailedPrecondition(_) | ShimError::Engine(EngineError::Unsupported(_)) => {
                Code::FAILED_PRECONDITION
            }
            ShimError::InvalidArgument(_) | ShimError::Engine(EngineError::InvalidSpec(_)) => {
                Code::INVALID_ARGUMENT
            }
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::Engine(EngineError::Failed(_)) | ShimError::Io { .. } => Code::UNKNOWN,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_code(e: ShimError) -> Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn every_error_maps_to_its_code() {
        let cases = [
            (ShimError::NotFound("container a".into()), Code::NOT_FOUND),
            (
                EngineError::NotFound("container a".into()).into(),
                Code::NOT_FOUND,
            ),
            (
                ShimError::AlreadyExists("exec e".into()),
                Code::ALREADY_EXISTS,
            ),
            (
                ShimError::FailedPrecondition("running".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                EngineError::Unsupported("seccomp".into()).into(),
                Code::FAILED_PRECONDITION,
            ),
            (
                ShimError::InvalidArgument("bad".into()),
                Code::INVALID_ARGUMENT,
            ),
            (
                EngineError::InvalidSpec("no such file /bin/x".into()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShimError::Unimplemented("Pause".into()),
                Code::UNIMPLEMENTED,
            ),
            (EngineError::Failed("boom".into()).into(), Code::UNKNOWN),
            (
                ShimError::Io {
                    what: "open",
                    path: "/x".into(),
                    source: io::Error::from_raw_os_error(libc::ENOENT),
                },
                Code::UNKNOWN,
            ),
        ];
        for (err, code) in cases {
            let text = err.to_string();
            assert_eq!(status_code(err), code, "{text}");
        }
    }

    #[test]
    fn status_message_is_the_error_text() {
        let e = ShimError::Io {
            what: "open",
            path: "/run/x/stdout".into(),
            source: io::Error::from_raw_os_error(libc::ENOENT),
        };
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => {
                assert!(s.message().contains("/run/x/stdout"), "{}", s.message())
            }
            other => panic!("{other:?}"),
        }
    }
}

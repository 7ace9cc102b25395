//! The errors of this crate, and their one mapping to the categories of [`EngineError`] (and so
//! to the ttrpc code containerd receives): `From<YoukiError> for EngineError` decides each
//! variant's category and renders its message with the whole chain of causes.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

use hyperbox_shim_core::EngineError;
use libcontainer::error::LibcontainerError;

use crate::criu::CriuError;
use crate::wire::WireError;

/// A cause of a type this crate does not name (libcgroups' many error types, a parser's).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// What went wrong in the engine or its zygote.
#[derive(Debug, thiserror::Error)]
pub enum YoukiError {
    /// A libcontainer call on container `id` failed (`what`: "start", "load" ...). libcontainer's
    /// errors are large: boxed, they keep every result of this crate small.
    #[error("cannot {what} container {id}")]
    Container {
        what: &'static str,
        id: String,
        #[source]
        source: Box<LibcontainerError>,
    },
    /// libcontainer could not create container `id`; `hint` names the cause where
    /// libcontainer's error does not (a working directory that is not one).
    #[error("cannot create container {id}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
    Create {
        id: String,
        hint: Option<String>,
        #[source]
        source: Box<LibcontainerError>,
    },
    /// libcontainer could not start exec'd process `exec_id` in container `id`.
    #[error("cannot exec {exec_id} in container {id}")]
    Exec {
        exec_id: String,
        id: String,
        #[source]
        source: Box<LibcontainerError>,
    },
    /// Container `id`'s cgroup could not be opened, read or set.
    #[error("cannot {what} the cgroup of container {id}")]
    Cgroup {
        what: &'static str,
        id: String,
        #[source]
        source: BoxError,
    },
    /// Work on a file or directory failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A system call on no path failed (a fork, a socket pair, the host's cgroup setup).
    #[error("cannot {what}")]
    Sys {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// A rootfs mount containerd asked for failed.
    #[error("cannot mount {from} ({kind}) at {}", target.display())]
    Mount {
        from: String,
        kind: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bundle's `config.json` cannot be read or parsed.
    #[error("cannot read {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    /// The bundle or the request asks for something invalid.
    #[error("{message}")]
    InvalidSpec {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The container (or process, or its state) named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A valid request this engine cannot honour.
    #[error("{0}")]
    Unsupported(String),
    /// CRIU is missing, failed or refused.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// The zygote's socket, or what came over it.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A blocking task of the shim did not complete (it panicked or was cancelled).
    #[error("{what} did not complete")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// An error of a part that reports [`EngineError`] (an [`ExecutorFactory`], the template
    /// store, the zygote's reply): its category is kept.
    ///
    /// [`ExecutorFactory`]: crate::ExecutorFactory
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Anything else the runtime fails at, with no cause to keep.
    #[error("{0}")]
    Failed(String),
}

impl YoukiError {
    /// An invalid spec or request, with no further cause.
    pub fn invalid(message: impl Into<String>) -> Self {
        YoukiError::InvalidSpec {
            message: message.into(),
            source: None,
        }
    }

    /// An invalid spec or request, and why.
    pub fn invalid_because(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        YoukiError::InvalidSpec {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// For `map_err`: libcontainer's `what` of container `id` failed.
    pub fn container<'a>(
        id: &'a str,
        what: &'static str,
    ) -> impl FnOnce(LibcontainerError) -> YoukiError + 'a {
        move |source| YoukiError::Container {
            what,
            id: id.to_string(),
            source: Box::new(source),
        }
    }

    /// For `map_err`: `what` of `path` failed.
    pub fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| YoukiError::Io { what, path, source }
    }

    /// For `map_err`: system call `what` failed.
    pub fn sys<E: Into<BoxError>>(what: &'static str) -> impl FnOnce(E) -> Self {
        move |source| YoukiError::Sys {
            what,
            source: source.into(),
        }
    }
}

impl From<YoukiError> for EngineError {
    fn from(e: YoukiError) -> Self {
        let message = chain(&e);
        match e {
            YoukiError::Config { .. } | YoukiError::InvalidSpec { .. } => {
                EngineError::InvalidSpec(message)
            }
            YoukiError::NotFound(_) => EngineError::NotFound(message),
            YoukiError::Unsupported(_) | YoukiError::Criu(CriuError::Unavailable(_)) => {
                EngineError::Unsupported(message)
            }
            YoukiError::Engine(e) => e,
            YoukiError::Container { .. }
            | YoukiError::Create { .. }
            | YoukiError::Exec { .. }
            | YoukiError::Cgroup { .. }
            | YoukiError::Io { .. }
            | YoukiError::Sys { .. }
            | YoukiError::Mount { .. }
            | YoukiError::Criu(_)
            | YoukiError::Wire(_)
            | YoukiError::Task { .. }
            | YoukiError::Failed(_) => EngineError::Failed(message),
        }
    }
}

/// For the parts that report [`EngineError`] (the template store) and use CRIU.
impl From<CriuError> for EngineError {
    fn from(e: CriuError) -> Self {
        YoukiError::from(e).into()
    }
}

/// An error with its sources, which is where libcontainer puts the detail; a source whose text
/// the message already holds is not repeated.
fn chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn enoent() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    fn libcontainer_error() -> LibcontainerError {
        LibcontainerError::OtherIO(enoent())
    }

    #[test]
    fn every_variant_has_its_category() {
        type Category = fn(&EngineError) -> bool;
        let failed: Category = |e| matches!(e, EngineError::Failed(_));
        let invalid: Category = |e| matches!(e, EngineError::InvalidSpec(_));
        let not_found: Category = |e| matches!(e, EngineError::NotFound(_));
        let unsupported: Category = |e| matches!(e, EngineError::Unsupported(_));
        let cases: Vec<(YoukiError, Category)> = vec![
            (
                YoukiError::container("c", "start")(libcontainer_error()),
                failed,
            ),
            (
                YoukiError::Create {
                    id: "c".into(),
                    hint: None,
                    source: Box::new(libcontainer_error()),
                },
                failed,
            ),
            (
                YoukiError::Exec {
                    exec_id: "e".into(),
                    id: "c".into(),
                    source: Box::new(libcontainer_error()),
                },
                failed,
            ),
            (
                YoukiError::Cgroup {
                    what: "open",
                    id: "c".into(),
                    source: enoent().into(),
                },
                failed,
            ),
            (YoukiError::io("open", "/x")(enoent()), failed),
            (YoukiError::sys("fork")(enoent()), failed),
            (
                YoukiError::Mount {
                    from: "overlay".into(),
                    kind: "overlay".into(),
                    target: "/b/rootfs".into(),
                    source: enoent(),
                },
                failed,
            ),
            (
                YoukiError::Config {
                    path: "/b/config.json".into(),
                    source: enoent().into(),
                },
                invalid,
            ),
            (YoukiError::invalid("bad signal"), invalid),
            (YoukiError::invalid_because("bad", enoent()), invalid),
            (YoukiError::NotFound("container c".into()), not_found),
            (YoukiError::Unsupported("systemd".into()), unsupported),
            (CriuError::Unavailable("no criu".into()).into(), unsupported),
            (
                CriuError::TimedOut {
                    limit: Duration::from_secs(1),
                }
                .into(),
                failed,
            ),
            (WireError::WorkerExited.into(), failed),
            (EngineError::NotFound("template t".into()).into(), not_found),
            (EngineError::InvalidSpec("x".into()).into(), invalid),
            (YoukiError::Failed("boom".into()), failed),
        ];
        for (e, category) in cases {
            let debug = format!("{e:?}");
            let engine = EngineError::from(e);
            assert!(category(&engine), "{debug} became {engine:?}");
        }
    }

    #[test]
    fn the_message_holds_each_cause_once() {
        let cause = enoent().to_string();
        let e = EngineError::from(YoukiError::io("write", "/b/exec.json")(enoent()));
        assert_eq!(e.to_string(), format!("cannot write /b/exec.json: {cause}"));

        // libcontainer's error already says its source: it is not repeated.
        let e = EngineError::from(YoukiError::container("c1", "start")(libcontainer_error()));
        let text = e.to_string();
        assert!(text.starts_with("cannot start container c1: "), "{text}");
        assert_eq!(text.matches(&cause).count(), 1, "{text}");

        let e = EngineError::from(YoukiError::Create {
            id: "c1".into(),
            hint: Some("the process's cwd \"/x\" is not a directory".into()),
            source: Box::new(libcontainer_error()),
        });
        let text = e.to_string();
        assert!(
            text.contains("is not a directory") && text.contains(&cause),
            "{text}"
        );

        // An engine error passes through as it was.
        let e = EngineError::from(YoukiError::from(EngineError::NotFound("gone".into())));
        assert_eq!(e, EngineError::NotFound("gone".into()));
    }
}

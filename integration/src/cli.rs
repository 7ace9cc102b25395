//! What every binary of the workspace's tooling does around its work: logging to stderr
//! through `tracing`, and one error type mapped to one exit code.

use std::io::IsTerminal;
use std::process::ExitCode;

/// Installs the `tracing` subscriber on stderr; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
}

/// Maps the outcome of a binary's work to its exit code, printing the error chain.
pub fn exit_code(program: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

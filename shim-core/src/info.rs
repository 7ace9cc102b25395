//! `SHIM -info`: containerd 2.x runs it (the runtime's options on stdin, as a protobuf `Any`)
//! to learn a runtime's name, version and OCI features, and its CRI decides from the features
//! what a runtime may be asked for. runc's shim answers with a `RuntimeInfo` protobuf on
//! stdout: its name, containerd's version, the options echoed, and `runc features` as the
//! features document; this module answers the same way, with the features the engine says it
//! supports.

use std::io::{Read, Write};
use std::process::ExitCode;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

use crate::options::RuntimeOptions;

/// The type URL containerd gives the OCI runtime features document.
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// The `RuntimeInfo` for `runtime_id`, from the options `stdin` carries (empty: none) and the
/// engine's features document (JSON), if it has one. Options the shim would refuse at Create
/// are refused here too, as runc's shim refuses options it cannot read.
pub fn runtime_info(
    runtime_id: &str,
    stdin: &[u8],
    features: Option<serde_json::Value>,
) -> Result<RuntimeInfo, String> {
    let mut info = RuntimeInfo {
        name: runtime_id.to_string(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_string(),
            revision: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    };
    if !stdin.is_empty() {
        let options = Any::parse_from_bytes(stdin)
            .map_err(|e| format!("failed to read runtime options: {e}"))?;
        RuntimeOptions::from_any(Some(&options))
            .map_err(|e| format!("failed to read runtime options: {e}"))?;
        if !(options.type_url.is_empty() && options.value.is_empty()) {
            info.options = MessageField::some(options);
        }
    }
    if let Some(features) = features {
        info.features = MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_string(),
            value: serde_json::to_vec(&features)
                .map_err(|e| format!("cannot encode the features: {e}"))?,
            ..Default::default()
        });
    }
    Ok(info)
}

/// Answers `-info`: reads the options from stdin, writes the `RuntimeInfo` protobuf to
/// stdout; on a bad input, says why on stderr and exits 1.
pub fn print_info(runtime_id: &str, features: Option<serde_json::Value>) -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        eprintln!("{runtime_id}: cannot read the runtime options from stdin: {e}");
        return ExitCode::FAILURE;
    }
    let bytes = match runtime_info(runtime_id, &stdin, features).and_then(|info| {
        info.write_to_bytes()
            .map_err(|e| format!("cannot encode the runtime info: {e}"))
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{runtime_id}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
        eprintln!("{runtime_id}: cannot write the runtime info: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::RuncOptions;

    fn runc_any(o: &RuncOptions) -> Any {
        Any {
            type_url: "containerd.runc.v1.Options".to_string(),
            value: o.write_to_bytes().unwrap(),
            ..Default::default()
        }
    }

    #[test]
    fn options_are_echoed_and_features_carried_as_json() {
        let opts = runc_any(&RuncOptions {
            binary_name: "runc".into(),
            ..Default::default()
        });
        let features = serde_json::json!({"ociVersionMin": "1.0.0"});
        let info = runtime_info(
            "io.containerd.hyperbox.v1",
            &opts.write_to_bytes().unwrap(),
            Some(features.clone()),
        )
        .unwrap();
        assert_eq!(info.name, "io.containerd.hyperbox.v1");
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(*info.options, opts);
        assert_eq!(info.features.type_url, FEATURES_TYPE_URL);
        let back: serde_json::Value = serde_json::from_slice(&info.features.value).unwrap();
        assert_eq!(back, features);
    }

    #[test]
    fn no_options_and_no_features_give_name_and_version_only() {
        let info = runtime_info("io.containerd.hyperbox-wasm.v1", b"", None).unwrap();
        assert!(info.options.is_none());
        assert!(info.features.is_none());
        assert!(!info.version.version.is_empty());
    }

    #[test]
    fn options_the_shim_refuses_are_refused() {
        let refused = runc_any(&crate::options::tests::with_criu_path("/usr/bin/criu"));
        let e = runtime_info("x", &refused.write_to_bytes().unwrap(), None).unwrap_err();
        assert!(e.contains("criu_path"), "{e}");
        let e = runtime_info("x", b"\xff\xff not protobuf", None).unwrap_err();
        assert!(e.contains("failed to read runtime options"), "{e}");
        let other = Any {
            type_url: "example.com/Other".into(),
            ..Default::default()
        };
        let e = runtime_info("x", &other.write_to_bytes().unwrap(), None).unwrap_err();
        assert!(e.contains("unsupported runtime options type"), "{e}");
    }
}

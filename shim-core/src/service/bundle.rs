//! What the service reads from a bundle's `config.json`, once per Create: the template
//! annotations and whether the container's processes die with its init. The engine reads the
//! spec for itself (libcontainer takes it from the bundle).

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::EngineError;
use crate::template::TemplatePlan;

/// The parts of an OCI spec the service reads.
#[derive(Debug, Default, Deserialize)]
struct Spec {
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
    #[serde(default)]
    linux: Option<Linux>,
}

#[derive(Debug, Default, Deserialize)]
struct Linux {
    #[serde(default)]
    namespaces: Option<Vec<Namespace>>,
}

#[derive(Debug, Deserialize)]
struct Namespace {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: Option<String>,
}

/// What Create takes from the bundle's spec.
#[derive(Debug)]
pub(super) struct BundleSpec {
    /// A template to restore from or to capture (annotations).
    pub(super) plan: TemplatePlan,
    /// Whether the container's processes must be killed when its init exits: when it has no
    /// pid namespace of its own (the host's, or another container's by path), as runc's shim
    /// decides (`ShouldKillAllOnExit`).
    pub(super) kills_all_on_exit: bool,
}

impl BundleSpec {
    /// Reads `bundle`'s `config.json`; a spec that cannot be read or parsed fails the Create
    /// before anything is made.
    pub(super) fn read(bundle: &Path) -> Result<Self, EngineError> {
        let path = bundle.join("config.json");
        let invalid = |e: &dyn std::fmt::Display| {
            EngineError::InvalidSpec(format!("cannot read {}: {e}", path.display()))
        };
        let bytes = std::fs::read(&path).map_err(|e| invalid(&e))?;
        let spec: Spec = serde_json::from_slice(&bytes).map_err(|e| invalid(&e))?;
        Self::from_spec(spec)
    }

    fn from_spec(spec: Spec) -> Result<Self, EngineError> {
        let own_pid_namespace = spec
            .linux
            .and_then(|l| l.namespaces)
            .unwrap_or_default()
            .iter()
            .any(|n| n.kind == "pid" && n.path.as_deref().unwrap_or_default().is_empty());
        Ok(BundleSpec {
            plan: TemplatePlan::from_annotations(&spec.annotations.unwrap_or_default())?,
            kills_all_on_exit: !own_pid_namespace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_pid_namespace_of_its_own_keeps_the_processes_after_init() {
        let cases = [
            (
                r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#,
                false,
            ),
            (r#"{"linux":{"namespaces":[{"type":"mount"}]}}"#, true),
            (
                r#"{"linux":{"namespaces":[{"type":"pid","path":"/proc/9/ns/pid"}]}}"#,
                true,
            ),
            (
                r#"{"linux":{"namespaces":[{"type":"pid","path":""}]}}"#,
                false,
            ),
            (r#"{"linux":{"namespaces":null}}"#, true),
            (r#"{"process":{}}"#, true),
        ];
        for (spec, kill_all) in cases {
            let got = BundleSpec::from_spec(serde_json::from_str(spec).unwrap()).unwrap();
            assert_eq!(got.kills_all_on_exit, kill_all, "{spec}");
        }
    }

    #[test]
    fn a_spec_that_cannot_be_read_fails_the_create_naming_the_file() {
        let bundle = std::env::temp_dir().join(format!("hb-bundle-{}", std::process::id()));
        std::fs::create_dir_all(&bundle).unwrap();
        let e = BundleSpec::read(&bundle).unwrap_err();
        assert!(matches!(e, EngineError::InvalidSpec(_)), "{e}");
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(bundle.join("config.json"), "not json").unwrap();
        let e = BundleSpec::read(&bundle).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");
        std::fs::write(
            bundle.join("config.json"),
            r#"{"annotations":{"io.hyperbox.template.capture":"web",
                "io.hyperbox.template.ready-delay":"1s"}}"#,
        )
        .unwrap();
        let got = BundleSpec::read(&bundle).unwrap();
        assert_eq!(got.plan.capture.map(|c| c.name).as_deref(), Some("web"));
        std::fs::remove_dir_all(&bundle).unwrap();
    }
}

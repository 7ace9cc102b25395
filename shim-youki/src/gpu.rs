//! NVIDIA GPUs for containers that ask for them (`NVIDIA_VISIBLE_DEVICES`), with no other
//! setup: at Create, the shim reads the node's GPU cache (written by `hyperbox-gpu-cdi`),
//! works out the container's devices with the same code the hook uses, and puts into the
//! bundle's `config.json`, before libcontainer reads it:
//! - the device nodes in `linux.devices` (libcontainer creates them) and an allow rule for
//!   each in `linux.resources.devices`, so the device cgroup lets exactly those through, by
//!   the runtime's own means: nothing edits cgroups behind its back, so a `systemctl
//!   daemon-reload` cannot take them away;
//! - `hyperbox-gpu-hook` (beside the shim's binary) as a `createContainer` hook, which mounts
//!   the driver's files and writes the loader's cache inside the container.
//!
//! A container asks with `cdi.k8s.io/*` annotations naming `nvidia.com/gpu` devices (first,
//! as the kubelet's device plugins do; `ctr run --annotation cdi.k8s.io/gpu=nvidia.com/gpu=0`
//! works too), or with `NVIDIA_VISIBLE_DEVICES`, which the node's settings
//! (`/etc/hyperbox/gpu.toml`, `config/gpu.toml`) may refuse from unprivileged containers.
//! The devices chosen go to the hook as `--visible-devices`, so it cannot choose otherwise.
//! A container that does not ask for GPUs (`NVIDIA_VISIBLE_DEVICES` unset, empty or `void`,
//! no such annotation) is left exactly as it was. One that asks on a node without a driver
//! fails at Create, naming what is missing.

use std::path::{Path, PathBuf};

use hyperbox_gpu::cache::{NodeCache, DEFAULT_PATH, PATH_ENV};
use hyperbox_gpu::plan;
use std::collections::BTreeMap;

use hyperbox_gpu::request::{Environment, GpuRequest, VISIBLE_DEVICES};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::YoukiError;

/// The hook's file name, looked for beside the shim's binary.
pub const HOOK: &str = "hyperbox-gpu-hook";

/// Where the node's GPU settings are, unless `HYPERBOX_GPU_CONFIG` names another file.
pub const SETTINGS: &str = "/etc/hyperbox/gpu.toml";

/// The node's GPU settings, an administrator's. A missing file, or a setting left out, is
/// the default (`config/gpu.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Whether a container that is not privileged (no `CAP_SYS_ADMIN` in its bounding set)
    /// may ask for GPUs with `NVIDIA_VISIBLE_DEVICES`; when false, such a container gets
    /// GPUs only through `cdi.k8s.io/*` annotations (which, under Kubernetes, only device
    /// plugins set). True, as NVIDIA's `accept-nvidia-visible-devices-envvar-when-unprivileged`.
    pub accept_env_when_unprivileged: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            accept_env_when_unprivileged: true,
        }
    }
}

impl Settings {
    /// Reads the settings; a missing file is the defaults, a bad one an error naming it.
    pub fn read() -> Result<Self, YoukiError> {
        let path = std::env::var_os("HYPERBOX_GPU_CONFIG")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SETTINGS));
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                YoukiError::io("parse the GPU settings", path)(std::io::Error::other(e))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(YoukiError::io("read the GPU settings", path)(e)),
        }
    }
}

/// Whether the spec's process holds `CAP_SYS_ADMIN` in its bounding set (what NVIDIA's
/// toolkit calls privileged).
fn privileged(config: &Value) -> bool {
    config
        .pointer("/process/capabilities/bounding")
        .and_then(Value::as_array)
        .is_some_and(|caps| caps.iter().any(|c| c.as_str() == Some("CAP_SYS_ADMIN")))
}

/// The spec's annotations.
fn annotations(config: &Value) -> BTreeMap<String, String> {
    config
        .pointer("/annotations")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect()
}

/// The cache the shim reads: `HYPERBOX_GPU_CACHE` (containerd's environment) or the default.
fn cache_path() -> PathBuf {
    std::env::var_os(PATH_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

fn hook_path() -> Result<PathBuf, YoukiError> {
    let exe = std::env::current_exe().map_err(YoukiError::sys("find the shim's own binary"))?;
    Ok(exe.with_file_name(HOOK))
}

/// The process environment of a parsed `config.json`.
fn process_env(config: &Value) -> Vec<String> {
    config
        .pointer("/process/env")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

/// Adds the GPUs container `id` asks for to the spec in `bundle`; does nothing for a
/// container that asks for none.
pub fn prepare(id: &str, bundle: &Path) -> Result<(), YoukiError> {
    let path = bundle.join("config.json");
    let config: Value = std::fs::read(&path)
        .and_then(|b| Ok(serde_json::from_slice(&b)?))
        .map_err(|e| YoukiError::Config {
            path,
            source: e.into(),
        })?;
    let env = Environment::from_entries(process_env(&config));
    let annotations = annotations(&config);
    let mentions_gpus = env.get(VISIBLE_DEVICES).is_some()
        || env.is_legacy_cuda()
        || annotations
            .keys()
            .any(|k| k.starts_with(hyperbox_gpu::request::CDI_ANNOTATION_PREFIX));
    if !mentions_gpus {
        return Ok(());
    }
    let env_allowed = privileged(&config) || Settings::read()?.accept_env_when_unprivileged;
    let request = GpuRequest::from_spec(&env, &annotations, env_allowed)
        .map_err(|e| YoukiError::invalid_because(format!("container {id}"), e))?;
    let Some(request) = request else {
        return Ok(());
    };
    let asked = request.devices.env_value();
    let cache_path = cache_path();
    let cache = NodeCache::read(&cache_path).map_err(|e| {
        YoukiError::invalid_because(format!("container {id} asks for GPUs ({asked})"), e)
    })?;
    let injection = plan::plan(&cache, &request)
        .and_then(|i| plan::check_requirements(&cache, &i, &env).map(|()| i))
        .map_err(|e| YoukiError::invalid_because(format!("container {id}"), e))?;
    let hook = hook_path()?;
    if !hook.is_file() {
        return Err(YoukiError::Failed(format!(
            "container {id} asks for GPUs, but {} is missing (install it beside the shim)",
            hook.display()
        )));
    }
    let nodes = injection.nodes.clone();
    crate::rootfs::rewrite_config(bundle, |config| {
        let linux = &mut config["linux"];
        let mut have: Vec<String> = linux["devices"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["path"].as_str().map(str::to_string))
            .collect();
        for n in &nodes {
            if have.contains(&n.path) {
                continue;
            }
            have.push(n.path.clone());
            push(
                &mut linux["devices"],
                json!({"path": n.path, "type": "c", "major": n.major, "minor": n.minor,
                       "fileMode": 0o666, "uid": 0, "gid": 0}),
            );
            push(
                &mut linux["resources"]["devices"],
                json!({"allow": true, "type": "c", "major": n.major, "minor": n.minor,
                       "access": "rwm"}),
            );
        }
        push(
            &mut config["hooks"]["createContainer"],
            json!({"path": hook.display().to_string(),
                   "args": [HOOK, "--cache", cache_path.display().to_string(),
                            "--visible-devices", asked]}),
        );
    })?;
    tracing::info!(
        id,
        devices = injection.nodes.len(),
        files = injection.files.len(),
        "GPUs added to the spec"
    );
    Ok(())
}

/// Appends `item` to the array at `slot`, making the array when there is none.
fn push(slot: &mut Value, item: Value) {
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    if let Value::Array(a) = slot {
        a.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_shim_core::EngineError;

    #[test]
    fn a_container_without_gpus_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("hb-gpu-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for env in [
            json!([]),
            json!(["NVIDIA_VISIBLE_DEVICES=void"]),
            json!(["NVIDIA_VISIBLE_DEVICES="]),
        ] {
            let text = json!({"process": {"env": env}, "root": {"path": "rootfs"}}).to_string();
            std::fs::write(dir.join("config.json"), &text).unwrap();
            prepare("c", &dir).unwrap();
            assert_eq!(
                std::fs::read_to_string(dir.join("config.json")).unwrap(),
                text
            );
        }
        // Annotations of other kinds only: nothing.
        let text =
            json!({"process": {"env": []}, "annotations": {"cdi.k8s.io/nic": "vendor.com/nic=1"}})
                .to_string();
        std::fs::write(dir.join("config.json"), &text).unwrap();
        prepare("c", &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("config.json")).unwrap(),
            text
        );
        let text = json!({"process": {"env": ["NVIDIA_VISIBLE_DEVICES=bogus"]}}).to_string();
        std::fs::write(dir.join("config.json"), &text).unwrap();
        assert!(matches!(
            prepare("c", &dir).map_err(EngineError::from),
            Err(EngineError::InvalidSpec(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn settings_and_privilege() {
        let s: Settings = toml::from_str("").unwrap();
        assert!(s.accept_env_when_unprivileged);
        let s: Settings = toml::from_str("accept_env_when_unprivileged = false").unwrap();
        assert!(!s.accept_env_when_unprivileged);
        assert!(toml::from_str::<Settings>("accept_env = true").is_err());
        let example = include_str!("../../config/gpu.toml");
        let s: Settings = toml::from_str(example).unwrap();
        assert!(
            s.accept_env_when_unprivileged,
            "config/gpu.toml shows the defaults"
        );
        let caps = |c: &[&str]| json!({"process": {"capabilities": {"bounding": c}}});
        assert!(privileged(&caps(&["CAP_CHOWN", "CAP_SYS_ADMIN"])));
        assert!(!privileged(&caps(&["CAP_CHOWN"])));
        assert!(!privileged(&json!({})));
    }
}

//! The OCI runtime features document (`runtime-spec`'s `features.md`) of this shim: what
//! `containerd-shim-hyperbox-v1 -info` reports to containerd 2.x, whose CRI reads it to decide
//! what it may ask of the runtime. It claims only what the engine honours: libcontainer's
//! mount options, hooks, namespaces and seccomp, cgroup v1 and v2 through cgroupfs (this build
//! has no systemd cgroup driver: Create refuses `SystemdCgroup`), no idmapped mounts
//! (libcontainer 0.7 has none, so CRI keeps user-namespaced pods off this runtime), and of
//! the recursive mount attributes only `rro`, the one CRI asks for, which a test holds
//! against runc (`shim_inputs::recursive_read_only`); the others libcontainer parses
//! (`rnosuid`, `rnodev`, ...) are not offered until tested.

use libcontainer::oci_spec::runtime::{
    ApparmorBuilder, CgroupBuilder, FeaturesBuilder, IDMapBuilder, LinuxFeatureBuilder,
    LinuxNamespaceType, MountExtensionsBuilder, SeccompBuilder, SelinuxBuilder,
};
use libcontainer::syscall::linux::MountOption;

/// The hooks libcontainer runs, in the spec's names.
const HOOKS: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

/// The features document, as JSON.
pub fn oci_features() -> Option<serde_json::Value> {
    let linux = LinuxFeatureBuilder::default()
        .namespaces(vec![
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::User,
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Time,
        ])
        .cgroup(
            CgroupBuilder::default()
                .v1(true)
                .v2(true)
                .systemd(false)
                .systemd_user(false)
                .rdma(false)
                .build()
                .ok()?,
        )
        .seccomp(SeccompBuilder::default().enabled(true).build().ok()?)
        .apparmor(ApparmorBuilder::default().enabled(true).build().ok()?)
        .selinux(SelinuxBuilder::default().enabled(true).build().ok()?)
        .mount_extensions(
            MountExtensionsBuilder::default()
                .idmap(IDMapBuilder::default().enabled(false).build().ok()?)
                .build()
                .ok()?,
        )
        .build()
        .ok()?;
    let features = FeaturesBuilder::default()
        .oci_version_min("1.0.0")
        .oci_version_max(libcontainer::oci_spec::runtime::VERSION)
        .hooks(HOOKS.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .mount_options(
            MountOption::known_options()
                .into_iter()
                .chain(["rro".to_string()])
                .collect::<Vec<_>>(),
        )
        .linux(linux)
        .build()
        .ok()?;
    let mut doc = serde_json::to_value(features).ok()?;
    drop_nulls(&mut doc);
    Some(doc)
}

/// Removes the fields the builder left unset (`null`), as `runc features` omits them.
fn drop_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_claims_what_the_engine_honours() {
        let f = oci_features().expect("features");
        assert_eq!(f["ociVersionMin"], "1.0.0");
        assert_eq!(f["ociVersionMax"], libcontainer::oci_spec::runtime::VERSION);
        let opts: Vec<&str> = f["mountOptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            opts.contains(&"nosuid") && opts.contains(&"rbind"),
            "{opts:?}"
        );
        assert!(opts.contains(&"rro"), "{opts:?}");
        assert!(!opts.contains(&"rnosuid"), "untested: {opts:?}");
        assert_eq!(f["linux"]["cgroup"]["systemd"], false);
        assert_eq!(f["linux"]["mountExtensions"]["idmap"]["enabled"], false);
        assert_eq!(f["linux"]["seccomp"]["enabled"], true);
        assert!(!f.to_string().contains("null"), "{f}");
        assert!(f["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("user")));
    }
}

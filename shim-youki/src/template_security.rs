//! What a template records of its process's security settings, and the check a restore
//! passes against them.
//!
//! CRIU restores a process's credentials, capabilities, seccomp filters and LSM labels from
//! its images, not from the spec of the container it restores into: a template captured
//! with CAP_SYS_ADMIN gives every copy CAP_SYS_ADMIN, whatever the copy's spec says. So a
//! template records the settings of the spec it was captured under, and a restore whose spec
//! asks for anything different is refused, naming the difference.

use std::collections::BTreeSet;

use libcontainer::oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The security settings of a spec's process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Security {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: BTreeSet<u32>,
    /// Each set (bounding, effective, inheritable, permitted, ambient), by name.
    pub capabilities: Vec<(String, BTreeSet<String>)>,
    pub no_new_privileges: bool,
    /// SHA-256 of the spec's `linux.seccomp` as JSON; `None` without a profile.
    pub seccomp: Option<String>,
    pub apparmor: Option<String>,
    pub selinux: Option<String>,
    /// `containerID:hostID:size` of each mapping.
    pub uid_mappings: Vec<String>,
    pub gid_mappings: Vec<String>,
}

/// The names of a set of capabilities, as the spec writes them.
fn names<T: Serialize>(set: &Option<T>) -> BTreeSet<String> {
    match set.as_ref().map(serde_json::to_value) {
        Some(Ok(serde_json::Value::Array(items))) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => BTreeSet::new(),
    }
}

impl Security {
    /// The settings `spec` gives its process.
    pub fn of(spec: &Spec) -> Self {
        let process = spec.process().as_ref();
        let linux = spec.linux().as_ref();
        let user = process.map(|p| p.user());
        let caps = process.and_then(|p| p.capabilities().as_ref());
        let capabilities = [
            ("bounding", caps.map(|c| names(c.bounding()))),
            ("effective", caps.map(|c| names(c.effective()))),
            ("inheritable", caps.map(|c| names(c.inheritable()))),
            ("permitted", caps.map(|c| names(c.permitted()))),
            ("ambient", caps.map(|c| names(c.ambient()))),
        ]
        .into_iter()
        .map(|(set, names)| (set.to_string(), names.unwrap_or_default()))
        .collect();
        let mappings = |m: Option<&Vec<libcontainer::oci_spec::runtime::LinuxIdMapping>>| {
            m.into_iter()
                .flatten()
                .map(|m| format!("{}:{}:{}", m.container_id(), m.host_id(), m.size()))
                .collect()
        };
        Security {
            uid: user.map_or(0, |u| u.uid()),
            gid: user.map_or(0, |u| u.gid()),
            additional_gids: user
                .and_then(|u| u.additional_gids().clone())
                .into_iter()
                .flatten()
                .collect(),
            capabilities,
            no_new_privileges: process.and_then(|p| p.no_new_privileges()).unwrap_or(false),
            seccomp: linux.and_then(|l| l.seccomp().as_ref()).map(|s| {
                let json = serde_json::to_vec(s).unwrap_or_default();
                format!("sha256:{:x}", Sha256::digest(json))
            }),
            apparmor: process.and_then(|p| p.apparmor_profile().clone()),
            selinux: process.and_then(|p| p.selinux_label().clone()),
            uid_mappings: mappings(linux.and_then(|l| l.uid_mappings().as_ref())),
            gid_mappings: mappings(linux.and_then(|l| l.gid_mappings().as_ref())),
        }
    }

    /// What `wanted` (a container's settings) asks for that differs from these (the
    /// template's), one entry per setting; empty when they are the same.
    pub fn differences(&self, wanted: &Security) -> Vec<String> {
        let mut out = Vec::new();
        for ((set, theirs), (_, ours)) in self.capabilities.iter().zip(&wanted.capabilities) {
            if theirs != ours {
                let more: Vec<_> = theirs.difference(ours).collect();
                let fewer: Vec<_> = ours.difference(theirs).collect();
                out.push(format!(
                    "{set} capabilities: the template has {more:?} more and {fewer:?} fewer"
                ));
            }
        }
        let mut differ = |what: &str, theirs: String, ours: String| {
            if theirs != ours {
                out.push(format!(
                    "{what}: the template's {theirs}, this container's {ours}"
                ));
            }
        };
        differ("uid", self.uid.to_string(), wanted.uid.to_string());
        differ("gid", self.gid.to_string(), wanted.gid.to_string());
        differ(
            "additional gids",
            format!("{:?}", self.additional_gids),
            format!("{:?}", wanted.additional_gids),
        );
        differ(
            "no_new_privileges",
            self.no_new_privileges.to_string(),
            wanted.no_new_privileges.to_string(),
        );
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        differ(
            "seccomp profile",
            or_none(&self.seccomp),
            or_none(&wanted.seccomp),
        );
        differ(
            "AppArmor profile",
            or_none(&self.apparmor),
            or_none(&wanted.apparmor),
        );
        differ(
            "SELinux label",
            or_none(&self.selinux),
            or_none(&wanted.selinux),
        );
        differ(
            "uid mappings",
            format!("{:?}", self.uid_mappings),
            format!("{:?}", wanted.uid_mappings),
        );
        differ(
            "gid mappings",
            format!("{:?}", self.gid_mappings),
            format!("{:?}", wanted.gid_mappings),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {
                "cwd": "/",
                "args": ["sh"],
                "user": {"uid": 0, "gid": 0, "additionalGids": [10, 1]},
                "noNewPrivileges": true,
                "capabilities": {
                    "bounding": ["CAP_CHOWN", "CAP_KILL"],
                    "effective": ["CAP_CHOWN", "CAP_KILL"],
                    "permitted": ["CAP_KILL", "CAP_CHOWN"]
                },
                "apparmorProfile": "cri-containerd.apparmor.d"
            },
            "linux": {
                "seccomp": {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
                    {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}
                ]},
                "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]
            }
        })
    }

    #[test]
    fn the_same_settings_in_another_order_do_not_differ() {
        let a = Security::of(&spec(base()));
        let mut other = base();
        other["process"]["capabilities"]["permitted"] =
            serde_json::json!(["CAP_CHOWN", "CAP_KILL"]);
        other["process"]["user"]["additionalGids"] = serde_json::json!([1, 10]);
        other["process"]["env"] = serde_json::json!(["A=b"]);
        assert_eq!(
            a.differences(&Security::of(&spec(other))),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_difference_is_named() {
        let template = Security::of(&spec(base()));
        let cases: [(&str, serde_json::Value, &str); 7] = [
            ("/process/user/uid", 1000.into(), "uid"),
            (
                "/process/capabilities/bounding",
                serde_json::json!(["CAP_KILL"]),
                "bounding capabilities: the template has [\"CAP_CHOWN\"] more",
            ),
            (
                "/process/noNewPrivileges",
                false.into(),
                "no_new_privileges",
            ),
            (
                "/linux/seccomp/defaultAction",
                "SCMP_ACT_KILL".into(),
                "seccomp profile",
            ),
            ("/process/apparmorProfile", "unconfined".into(), "AppArmor"),
            (
                "/process/selinuxLabel",
                "system_u:system_r:x".into(),
                "SELinux",
            ),
            (
                "/linux/uidMappings",
                serde_json::json!([{"containerID": 0, "hostID": 200000, "size": 65536}]),
                "uid mappings",
            ),
        ];
        for (pointer, value, named) in cases {
            let mut changed = base();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            changed.pointer_mut(parent).unwrap()[key] = value;
            let found = template.differences(&Security::of(&spec(changed)));
            assert_eq!(found.len(), 1, "{pointer}: {found:?}");
            assert!(found[0].contains(named), "{pointer}: {found:?}");
        }
    }
}

//! What an exec'd process takes from its container: everything runc's `exec` gives it.
//!
//! containerd sends an exec's process spec complete (user, groups, capabilities,
//! no_new_privileges, rlimits, AppArmor profile, SELinux label, cwd, env, terminal), and
//! libcontainer's tenant builder applies it, except two things runc takes from the
//! container: the seccomp filter (`linux.seccomp`: libcontainer 0.7 rebuilds an exec's `linux`
//! section from namespaces, cgroups path, personality and time offsets only) and the SELinux
//! label (libcontainer takes it only through `with_process_label`). This module plans both
//! for one exec ([`plan`]), and [`ExecSecurity`] loads the filter in the new process just
//! before it execs the program.
//!
//! When to load the filter, as runc does: with `no_new_privileges`, loading a filter needs no
//! privilege, so it is loaded last. Without it, loading needs `CAP_SYS_ADMIN`, which the
//! process may not keep: runc loads it before it drops capabilities. libcontainer drops them
//! before our executor runs, so the process is handed to libcontainer with `CAP_SYS_ADMIN`
//! and `CAP_SETPCAP` added to its bounding, effective and permitted sets, and the executor
//! loads the filter and then drops the process to exactly the spec's capabilities (libcontainer's
//! own `drop_privileges`) before it execs. Nothing of the container runs in between, and a
//! drop that fails fails the exec: the program never runs with more than its spec.

use std::collections::HashMap;

use hyperbox_shim_core::EngineError;
use libcontainer::oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, Process, Spec,
};
use libcontainer::syscall::syscall::create_syscall;
use libcontainer::workload::{
    Executor, ExecutorError, ExecutorSetEnvsError, ExecutorValidationError,
};

/// Capabilities the process holds between libcontainer's drop and the filter's load when the
/// filter must be loaded without `no_new_privileges`: `CAP_SYS_ADMIN` to load it,
/// `CAP_SETPCAP` to drop the bounding set afterwards.
const TO_LOAD_A_FILTER: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// How one exec is handed to libcontainer.
#[derive(Debug)]
pub(crate) struct ExecPlan {
    /// The process spec for libcontainer's tenant builder (`with_process`).
    pub process: Process,
    /// For the tenant builder's `with_process_label`: the process's SELinux label.
    pub process_label: Option<String>,
    /// What the new process does before it execs the program.
    pub security: ExecSecurity,
}

/// Plans exec'd process `process` of a container whose spec is `container`. `selinux` says
/// whether SELinux is enabled on the host: libcontainer 0.7 cannot apply a label (it takes
/// one and ignores it), so a process asking for one there is refused rather than run
/// unconfined; where SELinux is off, a label means nothing, as under runc.
pub(crate) fn plan(
    container: &Spec,
    mut process: Process,
    selinux: bool,
) -> Result<ExecPlan, EngineError> {
    let process_label = process.selinux_label().clone();
    if selinux && process_label.is_some() {
        return Err(EngineError::Unsupported(
            "this shim cannot apply SELinux labels (selinuxLabel) and SELinux is enabled on \
             this host: run this container with io.containerd.runc.v2"
                .into(),
        ));
    }
    let seccomp = container.linux().as_ref().and_then(|l| l.seccomp().clone());
    if seccomp
        .as_ref()
        .is_some_and(libcontainer::seccomp::is_notify)
    {
        return Err(EngineError::InvalidSpec(
            "the container's seccomp profile has SCMP_ACT_NOTIFY rules, which exec'd \
             processes of this shim do not support"
                .into(),
        ));
    }
    let mut drop_to = None;
    if seccomp.is_some() && process.no_new_privileges() != Some(true) {
        if let Some(caps) = process.capabilities().clone() {
            process.set_capabilities(Some(widened(&caps)));
            drop_to = Some(caps);
        }
        // Without capabilities in the spec, libcontainer drops none: the process keeps the
        // shim's, and loads the filter with them.
    }
    Ok(ExecPlan {
        process,
        process_label,
        security: ExecSecurity {
            seccomp,
            drop_to,
            inner: libcontainer::workload::default::get_executor(),
        },
    })
}

/// `caps` with [`TO_LOAD_A_FILTER`] added to the bounding, effective and permitted sets.
fn widened(caps: &LinuxCapabilities) -> LinuxCapabilities {
    let add = |set: &Option<Capabilities>| -> Option<Capabilities> {
        let mut set = set.clone().unwrap_or_default();
        set.extend(TO_LOAD_A_FILTER);
        Some(set)
    };
    let mut out = caps.clone();
    out.set_bounding(add(caps.bounding()))
        .set_effective(add(caps.effective()))
        .set_permitted(add(caps.permitted()));
    out
}

/// The exec'd process's last steps before the program: load the container's seccomp filter,
/// then (when [`plan`] widened its capabilities) drop to the spec's; then exec it.
#[derive(Clone)]
pub(crate) struct ExecSecurity {
    seccomp: Option<LinuxSeccomp>,
    drop_to: Option<LinuxCapabilities>,
    inner: Box<dyn Executor>,
}

impl std::fmt::Debug for ExecSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSecurity")
            .field("seccomp", &self.seccomp.is_some())
            .field("drop_to", &self.drop_to)
            .finish_non_exhaustive()
    }
}

impl Executor for ExecSecurity {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(seccomp) = &self.seccomp {
            libcontainer::seccomp::initialize_seccomp(seccomp).map_err(|e| {
                ExecutorError::Other(format!("cannot load the container's seccomp filter: {e}"))
            })?;
        }
        if let Some(caps) = &self.drop_to {
            libcontainer::capabilities::drop_privileges(caps, create_syscall().as_ref()).map_err(
                |e| {
                    ExecutorError::Other(format!(
                        "cannot drop to the process's capabilities after loading the seccomp \
                         filter (does the profile allow capset and prctl?): {e}"
                    ))
                },
            )?;
        }
        self.inner.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        crate::executor::validate_as_runc(self.inner.as_ref(), spec)
    }

    fn setup_envs(&self, envs: HashMap<String, String>) -> Result<(), ExecutorSetEnvsError> {
        self.inner.setup_envs(envs)
    }
}

/// Whether SELinux is enabled on this host (its filesystem is mounted, as libselinux checks).
pub(crate) fn selinux_enabled() -> bool {
    std::path::Path::new("/sys/fs/selinux/enforce").exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{
        LinuxBuilder, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder, ProcessBuilder,
        SpecBuilder,
    };

    fn container(seccomp: Option<LinuxSeccompAction>) -> Spec {
        let mut linux = LinuxBuilder::default();
        if let Some(action) = seccomp {
            linux = linux.seccomp(
                LinuxSeccompBuilder::default()
                    .default_action(action)
                    .build()
                    .unwrap(),
            );
        }
        SpecBuilder::default()
            .linux(linux.build().unwrap())
            .build()
            .unwrap()
    }

    fn caps(names: &[Capability]) -> LinuxCapabilities {
        let set: Capabilities = names.iter().copied().collect();
        let mut c = LinuxCapabilities::default();
        c.set_bounding(Some(set.clone()))
            .set_effective(Some(set.clone()))
            .set_permitted(Some(set))
            .set_inheritable(None)
            .set_ambient(None);
        c
    }

    fn process(nnp: Option<bool>, label: Option<&str>, apparmor: Option<&str>) -> Process {
        let mut p = ProcessBuilder::default()
            .args(vec!["sh".to_string()])
            .capabilities(caps(&[Capability::Chown, Capability::NetBindService]))
            .build()
            .unwrap();
        p.set_no_new_privileges(nnp)
            .set_selinux_label(label.map(str::to_string))
            .set_apparmor_profile(apparmor.map(str::to_string));
        p
    }

    #[test]
    fn the_container_filter_goes_to_every_exec() {
        for nnp in [Some(true), Some(false), None] {
            let p = plan(
                &container(Some(LinuxSeccompAction::ScmpActErrno)),
                process(nnp, None, None),
                false,
            )
            .unwrap();
            assert!(p.security.seccomp.is_some(), "nnp {nnp:?}");
        }
        let p = plan(&container(None), process(None, None, None), false).unwrap();
        assert!(p.security.seccomp.is_none());
        assert!(p.security.drop_to.is_none());
    }

    #[test]
    fn without_no_new_privileges_the_filter_is_loaded_with_privilege_then_dropped() {
        let wanted = caps(&[Capability::Chown, Capability::NetBindService]);
        for nnp in [Some(false), None] {
            let p = plan(
                &container(Some(LinuxSeccompAction::ScmpActErrno)),
                process(nnp, None, None),
                false,
            )
            .unwrap();
            let handed = p.process.capabilities().clone().unwrap();
            for set in [handed.bounding(), handed.effective(), handed.permitted()] {
                let set = set.as_ref().unwrap();
                assert!(set.contains(&Capability::SysAdmin) && set.contains(&Capability::Setpcap));
                assert!(set.contains(&Capability::Chown));
            }
            assert_eq!(handed.inheritable(), &None, "inheritable untouched");
            assert_eq!(handed.ambient(), &None, "ambient untouched");
            assert_eq!(p.security.drop_to.as_ref(), Some(&wanted), "nnp {nnp:?}");
        }
    }

    #[test]
    fn with_no_new_privileges_the_process_is_handed_on_as_it_is() {
        let given = process(Some(true), None, None);
        let p = plan(
            &container(Some(LinuxSeccompAction::ScmpActErrno)),
            given.clone(),
            false,
        )
        .unwrap();
        assert_eq!(p.process, given);
        assert!(p.security.drop_to.is_none());
    }

    #[test]
    fn labels_are_handed_to_libcontainer() {
        let p = plan(
            &container(None),
            process(
                None,
                Some("system_u:system_r:container_t:s0:c1,c2"),
                Some("tenant"),
            ),
            false,
        )
        .unwrap();
        assert_eq!(
            p.process_label.as_deref(),
            Some("system_u:system_r:container_t:s0:c1,c2")
        );
        // libcontainer applies the process's AppArmor profile itself.
        assert_eq!(p.process.apparmor_profile().as_deref(), Some("tenant"));
    }

    #[test]
    fn a_label_is_refused_where_selinux_would_need_it() {
        let e = plan(
            &container(None),
            process(None, Some("x:y:z:s0"), None),
            true,
        )
        .unwrap_err();
        assert!(matches!(e, EngineError::Unsupported(_)), "{e:?}");
        assert!(plan(&container(None), process(None, None, None), true).is_ok());
    }

    #[test]
    fn a_notify_profile_is_refused_clearly() {
        let mut spec = container(None);
        let seccomp = LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![LinuxSyscallBuilder::default()
                .names(vec!["mount".to_string()])
                .action(LinuxSeccompAction::ScmpActNotify)
                .build()
                .unwrap()])
            .build()
            .unwrap();
        let mut linux = spec.linux().clone().unwrap();
        linux.set_seccomp(Some(seccomp));
        spec.set_linux(Some(linux));
        let e = plan(&spec, process(None, None, None), false).unwrap_err();
        assert!(e.to_string().contains("SCMP_ACT_NOTIFY"), "{e}");
    }
}

//! Kubernetes' CRI conformance suite (critest, cri-tools 1.34) on the CRI plugins of
//! containerd 1.7 and 2.1, each once with runtime handler `runc` (runc's shim) and once with
//! `hyperbox` (ours), in one daemon, with the same single skip: the spec pinned to a real image's digest, which no
//! stand-in can match. The two JUnit reports are compared spec by spec; the test fails if runc
//! fails a spec, or if a spec runc passes is not passed under hyperbox.
//!
//! critest is built by `scripts/setup-host` from the cri-tools source tarball in
//! `HYPERBOX_THIRD_PARTY_SRC`; without it this test is ignored (reported as skipped), except
//! under CI (`CI=true`), where it must run. See `hyperbox_integration::cri`.

use hyperbox_integration::containerd::ContainerdVersion;
use hyperbox_integration::cri::{self, CriBed, CritestRun, SpecStatus};

/// The one spec skipped for both handlers (a regular expression for `--ginkgo.skip`).
const SKIP: &str = r"public image with digest should be pulled and removed";

fn counts(run: &CritestRun) -> String {
    format!(
        "{} passed, {} failed, {} skipped ({:.0} s)",
        run.report.count(SpecStatus::Passed),
        run.report.count(SpecStatus::Failed),
        run.report.count(SpecStatus::Skipped),
        run.elapsed.as_secs_f64()
    )
}

#[test]
#[cfg_attr(
    hyperbox_critest_unavailable,
    ignore = "critest skipped: HYPERBOX_THIRD_PARTY_SRC does not name a folder holding \
              cri-tools-v1.34.0-src.tar.xz (CI sets it; scripts/setup-host builds critest from it)"
)]
fn critest_runc_and_hyperbox_on_containerd_1_7() {
    critest_runc_and_hyperbox(ContainerdVersion::V1_7);
}

#[test]
#[cfg_attr(
    any(hyperbox_critest_unavailable, hyperbox_containerd2_unavailable),
    ignore = "critest on containerd 2.1 skipped: HYPERBOX_THIRD_PARTY_SRC does not name a \
              folder holding cri-tools-v1.34.0-src.tar.xz and containerd-2.1.9-src.tar.xz (CI \
              sets it; scripts/setup-host builds critest and containerd 2.1 from them)"
)]
fn critest_runc_and_hyperbox_on_containerd_2_1() {
    critest_runc_and_hyperbox(ContainerdVersion::V2_1);
}

fn critest_runc_and_hyperbox(v: ContainerdVersion) {
    if !ContainerdVersion::selected().contains(&v) {
        hyperbox_integration::skip(&format!(
            "critest on containerd {v}, not selected by HYPERBOX_CONTAINERD"
        ));
        return;
    }
    let critest = cri::critest_binary();
    assert!(
        critest.is_file() && cri::crictl_binary().is_file(),
        "{} or crictl is missing: run scripts/setup-host with HYPERBOX_THIRD_PARTY_SRC naming \
         the folder of {} (tarball: {:?})",
        critest.display(),
        cri::CRI_TOOLS_TARBALL,
        cri::cri_tools_tarball()
    );

    let bed =
        CriBed::start(v).unwrap_or_else(|e| panic!("containerd {v} with the CRI plugin: {e}"));
    let (bridge, subnet) = bed.bridge();
    eprintln!(
        "critest {}: containerd {} on {}, bridge {bridge} {subnet}, {} stand-in images",
        cri::CRI_TOOLS_VERSION,
        bed.containerd.version(),
        bed.endpoint(),
        bed.images.references().count()
    );
    // On 2.x ours runs under two handlers: its own runtime type (the form the shipped
    // snippet registers) and runc's type with our binary as `runtime_path`, the one form
    // containerd 2.x's CRI asks for features (recursive read-only mounts, user namespaces).
    let mut handlers: Vec<&str> = cri::HANDLERS.iter().map(|(h, _)| *h).collect();
    if v.is_2x() {
        handlers.push(cri::HYPERBOX_AS_RUNC);
    }
    let mut runs = Vec::new();
    for handler in handlers {
        let run = cri::run_critest(&bed, handler, SKIP)
            .unwrap_or_else(|e| panic!("critest --runtime-handler={handler}: {e}"));
        eprintln!(
            "critest handler {handler}: {}; shims seen: {:?}",
            counts(&run),
            run.shims
        );
        runs.push(run);
    }
    let runc = &runs[0];
    let runc_failures: Vec<&String> = runc
        .report
        .specs
        .keys()
        .filter(|n| runc.report.status(n) == Some(SpecStatus::Failed))
        .collect();
    let mut regressions = Vec::new();
    for ours in &runs[1..] {
        // containerd 2.x's CRI offers feature-gated specs only to runc's runtime type: under
        // our own type they are skipped by containerd, for the reason given here.
        let gated = if v.is_2x() && ours.handler == "hyperbox" {
            FEATURE_GATED
        } else {
            &[]
        };
        regressions.extend(compare(runc, ours, gated));
    }
    eprintln!("runc:     {}", counts(runc));
    for ours in &runs[1..] {
        eprintln!("{}: {}", ours.handler, counts(ours));
    }
    for run in &runs {
        eprintln!("critest log ({}): {}", run.handler, run.log.display());
    }
    if !runc_failures.is_empty() || !regressions.is_empty() {
        // Keep the logs: the sandbox goes with the bed.
        for run in &runs {
            let text = std::fs::read_to_string(&run.log).unwrap_or_default();
            let summary: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.contains("Summarizing"))
                .collect();
            eprintln!(
                "--- critest {}: summary\n{}",
                run.handler,
                summary.join("\n")
            );
        }
    }
    for run in &runs {
        let shim = if run.handler == "runc" {
            "containerd-shim-runc-v2"
        } else {
            "containerd-shim-hyperbox-v1"
        };
        assert!(
            run.shims.keys().all(|s| s == shim) && run.shims.contains_key(shim),
            "handler {}: the pods ran on {:?}, not only on {shim}",
            run.handler,
            run.shims
        );
    }
    bed.teardown().expect("teardown leaves nothing behind");
    assert!(
        runc_failures.is_empty(),
        "runc's shim fails {} critest spec(s) (the suite or the test bed is broken):\n{}",
        runc_failures.len(),
        runc_failures
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        regressions.is_empty(),
        "{} spec(s) that runc passes are not passed under hyperbox:\n{}",
        regressions.len(),
        regressions.join("\n")
    );
}

/// Specs containerd 2.x's CRI runs only for runtimes it could ask for their features, which it
/// does only for runc's runtime type, and the reason critest gives when it skips them.
const FEATURE_GATED: &[(&str, &str)] = &[(
    "recursive readonly mount",
    "runtime does not implement recursive readonly mounts",
)];

/// Prints every spec whose outcome differs between runc's run and `ours`, and returns the
/// specs runc passes that `ours` does not, except those `gated` names (a spec-name fragment)
/// that `ours` skips for the reason given.
fn compare(runc: &CritestRun, ours: &CritestRun, gated: &[(&str, &str)]) -> Vec<String> {
    let mut names: Vec<&String> = runc.report.specs.keys().collect();
    names.extend(
        ours.report
            .specs
            .keys()
            .filter(|n| !runc.report.specs.contains_key(*n)),
    );
    let mut table = Vec::new();
    let mut regressions = Vec::new();
    for name in names {
        let a = runc.report.status(name);
        let b = ours.report.status(name);
        let show = |s: Option<SpecStatus>| s.map_or("absent", SpecStatus::as_str);
        if a != b {
            table.push(format!("  {:<8} {:<8} {name}", show(a), show(b)));
        }
        if a == Some(SpecStatus::Passed) && b != Some(SpecStatus::Passed) {
            let why = ours
                .report
                .specs
                .get(name)
                .map(|(_, m)| m.lines().next().unwrap_or_default().to_owned())
                .unwrap_or_default();
            let excused = b == Some(SpecStatus::Skipped)
                && gated
                    .iter()
                    .any(|(spec, reason)| name.contains(spec) && why.contains(reason));
            if !excused {
                regressions.push(format!("{}: {name}: {}: {why}", ours.handler, show(b)));
            }
        }
    }
    eprintln!(
        "specs whose outcome differs, runc vs {} ({}):\n  {:<8} {:<8} spec\n{}",
        ours.handler,
        table.len(),
        "runc",
        ours.handler,
        table.join("\n")
    );
    regressions
}

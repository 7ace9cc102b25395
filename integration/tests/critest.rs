//! Kubernetes' CRI conformance suite (critest, cri-tools 1.34) on containerd 1.7's CRI plugin,
//! once with runtime handler `runc` (runc's shim) and once with `hyperbox` (ours), in one
//! daemon, with the same single skip: the spec pinned to a real image's digest, which no
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
    if !ContainerdVersion::selected().contains(&ContainerdVersion::V1_7) {
        eprintln!("critest runs on containerd 1.7, not selected by HYPERBOX_CONTAINERD: skipped");
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

    let bed = CriBed::start(ContainerdVersion::V1_7).expect("containerd 1.7 with the CRI plugin");
    let (bridge, subnet) = bed.bridge();
    eprintln!(
        "critest {}: containerd {} on {}, bridge {bridge} {subnet}, {} stand-in images",
        cri::CRI_TOOLS_VERSION,
        bed.containerd.version(),
        bed.endpoint(),
        bed.images.references().count()
    );
    let mut runs = Vec::new();
    for (handler, _) in cri::HANDLERS {
        let run = cri::run_critest(&bed, handler, SKIP)
            .unwrap_or_else(|e| panic!("critest --runtime-handler={handler}: {e}"));
        eprintln!(
            "critest handler {handler}: {}; shims seen: {:?}",
            counts(&run),
            run.shims
        );
        runs.push(run);
    }
    let (runc, ours) = (&runs[0], &runs[1]);

    // Every spec whose outcome differs, and every spec runc does not pass.
    let mut names: Vec<&String> = runc.report.specs.keys().collect();
    names.extend(
        ours.report
            .specs
            .keys()
            .filter(|n| !runc.report.specs.contains_key(*n)),
    );
    let mut table = Vec::new();
    let mut regressions = Vec::new();
    let mut runc_failures = Vec::new();
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
            regressions.push(format!("{name}: {}: {why}", show(b)));
        }
        if a == Some(SpecStatus::Failed) {
            runc_failures.push(name.clone());
        }
    }
    eprintln!(
        "specs whose outcome differs ({}):\n  {:<8} {:<8} spec\n{}",
        table.len(),
        "runc",
        "hyperbox",
        table.join("\n")
    );
    eprintln!("runc:     {}", counts(runc));
    eprintln!("hyperbox: {}", counts(ours));
    for run in &runs {
        eprintln!("critest log ({}): {}", run.handler, run.log.display());
    }
    let runc_log = runc.log.clone();
    let ours_log = ours.log.clone();
    let failed = !runc_failures.is_empty() || !regressions.is_empty();
    if failed {
        // Keep the logs: the sandbox goes with the bed.
        for (handler, log) in [("runc", &runc_log), ("hyperbox", &ours_log)] {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let summary: Vec<&str> = text
                .lines()
                .skip_while(|l| !l.contains("Summarizing"))
                .collect();
            eprintln!("--- critest {handler}: summary\n{}", summary.join("\n"));
        }
    }
    bed.teardown().expect("teardown leaves nothing behind");
    for (run, shim) in [
        (runc, "containerd-shim-runc-v2"),
        (ours, "containerd-shim-hyperbox-v1"),
    ] {
        assert!(
            run.shims.keys().all(|s| s == shim) && run.shims.contains_key(shim),
            "handler {}: the pods ran on {:?}, not only on {shim}",
            run.handler,
            run.shims
        );
    }
    assert!(
        runc_failures.is_empty(),
        "runc's shim fails {} critest spec(s) (the suite or the test bed is broken):\n{}",
        runc_failures.len(),
        runc_failures.join("\n")
    );
    assert!(
        regressions.is_empty(),
        "{} spec(s) that runc passes are not passed under hyperbox:\n{}",
        regressions.len(),
        regressions.join("\n")
    );
}

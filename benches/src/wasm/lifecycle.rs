//! The lifecycle part: `ctr run --rm` of the hello guest warm and cold, from an OCI image,
//! and busybox through runc.v2, rotated; then the shims' compile cache log lines.

use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::engines::RUNC_V2;
use crate::runner::{self, describe, run_command, CommandFailure, Plan, Timings, Variant};

use super::bench::Bench;
use super::guests::{remove_cache_entries, CacheCounts};
use super::{COMPILE_CACHE_DIR, WASM_V1};

/// Runs `cmd` once with its output kept, failing unless it exits 0 printing `expected`.
fn check_output(mut cmd: Command, expected: &str) -> anyhow::Result<()> {
    let shown = describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || stdout != expected {
        bail!(
            "`{shown}` did not print {expected:?} ({}): stdout {stdout:?}, stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn io_failure(what: &str, e: std::io::Error) -> CommandFailure {
    CommandFailure {
        command: what.to_string(),
        status: "failed".into(),
        stderr: e.to_string(),
    }
}

/// The lifecycle part: the timed variants, then the shims' cache log lines.
pub(super) fn lifecycle(
    b: &Bench,
    plan: &Plan,
) -> anyhow::Result<(Timings, CacheCounts, CacheCounts)> {
    // Each variant once, its output checked, before anything is timed.
    check_output(b.wasm_rootfs_run("wasm-check"), "hello from wasm\n")?;
    if let Some(image) = &b.image {
        check_output(
            b.wasm_image_run(image, "wasm-image-check"),
            "hello from wasm\n",
        )?;
    }
    check_output(b.native_run("native-check"), "hello\n")?;
    let before = b.cache_counts();

    let warm = Variant::command(
        "hyperbox-wasm warm",
        format!(
            "ctr run --rm --runtime {WASM_V1} --rootfs DIR wasm-warm-{{n}} /hello.wasm \
             (compile cache entry present)"
        ),
        |n| b.wasm_rootfs_run(&format!("wasm-warm-{n}")),
    );
    let digest = b.digest.clone();
    let cold = Variant::new(
        "hyperbox-wasm cold",
        format!(
            "rm {COMPILE_CACHE_DIR}/{digest}-*.cwasm; ctr run --rm --runtime {WASM_V1} \
             --rootfs DIR wasm-cold-{{n}} /hello.wasm"
        ),
        move |n| {
            remove_cache_entries(&digest)
                .map_err(|e| io_failure("removing the compile cache entry", e))?;
            let mut cmd = b.wasm_rootfs_run(&format!("wasm-cold-{n}"));
            let shown = describe(&cmd);
            run_command(&mut cmd, &shown)
        },
    );
    let native = Variant::command(
        "runc.v2 busybox",
        format!("ctr run --rm --runtime {RUNC_V2} busybox native-{{n}} echo hello"),
        |n| b.native_run(&format!("native-{n}")),
    );
    let mut variants = vec![warm, cold];
    if let Some(image) = &b.image {
        variants.push(Variant::command(
            "hyperbox-wasm image warm",
            format!("ctr run --rm --runtime {WASM_V1} {image} wasm-image-{{n}}"),
            move |n| b.wasm_image_run(image, &format!("wasm-image-{n}")),
        ));
    }
    variants.push(native);
    let warm_variants = variants.len() - 2;
    let plan = Plan {
        baseline: Some("runc.v2 busybox".into()),
        ..plan.clone()
    };
    let timings = runner::run(&mut variants, &plan)?;
    drop(variants);

    let runs = plan.rounds + plan.warmup;
    let expected = CacheCounts {
        compiled: runs,
        cache_hits: runs * warm_variants,
    };
    // The shims' log lines reach containerd's log shortly after each container.
    let deadline = Instant::now() + Duration::from_secs(10);
    let seen = loop {
        let now = b.cache_counts();
        let seen = CacheCounts {
            compiled: now.compiled - before.compiled,
            cache_hits: now.cache_hits - before.cache_hits,
        };
        if seen == expected || Instant::now() > deadline {
            break seen;
        }
        thread::sleep(Duration::from_millis(200));
    };
    if seen != expected {
        tracing::warn!(
            ?seen,
            ?expected,
            "the compile cache did not behave as expected"
        );
    }
    Ok((timings, seen, expected))
}

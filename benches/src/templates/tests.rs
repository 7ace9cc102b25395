//! Unit tests of the templates benchmark: run arguments, what it parses, its variants, its
//! tables and how its parts are rendered and saved.

use std::path::Path;

use crate::engines::{HYPERBOX_V1, RUNC_V2};
use crate::runner::VariantTimes;

use super::heap::{lazy_pages_running, HeapStart, HEAP_VARIANTS};
use super::ready::{Start, READY_VARIANTS};
use super::results::{median_of, render_heap, render_ready, table};
use super::*;

#[test]
fn run_arguments_put_namespace_and_annotations_before_the_image() {
    let args = run_args(
        HYPERBOX_V1,
        Some(Path::new("/s/netns-a")),
        &[(CAPTURE, "py-tpl"), (READY_FILE, "/ready")],
        "img",
        "a",
        &["sh", "-c", "x y"],
    );
    assert_eq!(
        args,
        [
            "run",
            "-d",
            "--null-io",
            "--runtime",
            HYPERBOX_V1,
            "--with-ns",
            "network:/s/netns-a",
            "--annotation",
            "io.hyperbox.template.capture=py-tpl",
            "--annotation",
            "io.hyperbox.template.ready-file=/ready",
            "img",
            "a",
            "sh",
            "-c",
            "x y"
        ]
    );
    let plain = run_args(RUNC_V2, None, &[], "img", "b", &["true"]);
    assert_eq!(
        plain,
        [
            "run",
            "-d",
            "--null-io",
            "--runtime",
            RUNC_V2,
            "img",
            "b",
            "true"
        ]
    );
}

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn push_output_gives_reference_digest_and_size() {
    let said = format!(
        "pushed template py-tpl to 127.0.0.1:5000/hyperbox-templates/py-tpl:bench@{DIGEST} \
         (123.4 MiB)\n"
    );
    let p = parse_pushed(&said).expect("parsed");
    assert_eq!(
        p.reference,
        "127.0.0.1:5000/hyperbox-templates/py-tpl:bench"
    );
    assert_eq!(p.digest, DIGEST);
    assert_eq!(p.size, "123.4 MiB");
    // Other lines before it (warnings) do not matter.
    let noisy = format!("note: plain HTTP to 127.0.0.1:5000\n{said}");
    assert_eq!(parse_pushed(&noisy), Some(p));
    let small = format!("pushed template a to r:1@{DIGEST} (4.0 KiB)");
    assert_eq!(parse_pushed(&small).unwrap().size, "4.0 KiB");
}

#[test]
fn push_output_without_a_full_digest_is_refused() {
    assert_eq!(parse_pushed(""), None);
    assert_eq!(parse_pushed("pushed template a to r:1 (4.0 KiB)"), None);
    assert_eq!(
        parse_pushed("pushed template a to r:1@sha256:abc (4.0 KiB)"),
        None
    );
    let no_size = format!("pushed template a to r:1@{DIGEST}");
    assert_eq!(parse_pushed(&no_size), None);
    let no_ref = format!("pushed template a to @{DIGEST} (1.0 MiB)");
    assert_eq!(parse_pushed(&no_ref), None);
    let not_hex = format!(
        "pushed template a to r:1@{} (1.0 MiB)",
        DIGEST.replace('a', "g")
    );
    assert_eq!(parse_pushed(&not_hex), None);
}

#[test]
fn sizes_as_the_shim_prints_them() {
    assert_eq!(size_bytes("4.0 KiB"), Some(4096));
    assert_eq!(size_bytes("1.5 MiB"), Some(1_572_864));
    assert_eq!(size_bytes("2.0 GiB"), Some(2 << 30));
    assert_eq!(size_bytes("12 B"), Some(12));
    assert_eq!(size_bytes("1.0 TB"), None);
    assert_eq!(size_bytes("MiB"), None);
    assert_eq!(size_bytes("-1.0 MiB"), None);
}

fn cmdline(args: &[&str]) -> Vec<u8> {
    let mut c = Vec::new();
    for a in args {
        c.extend_from_slice(a.as_bytes());
        c.push(0);
    }
    c
}

#[test]
fn lazy_pages_daemons_are_matched_by_their_container() {
    let daemon = cmdline(&[
        "/usr/local/sbin/criu",
        "lazy-pages",
        "-D",
        "/s/templates/bench/heap-tpl/images",
        "-W",
        "/s/state/io.containerd.runtime.v2.task/bench/heap-2-12/criu-work",
        "-o",
        "lazy-pages.log",
        "-v4",
        "--status-fd",
        "3",
    ]);
    assert!(is_lazy_pages_of(&daemon, "heap-2-12"));
    // Not another container whose id it starts or ends with, nor the template's name.
    assert!(!is_lazy_pages_of(&daemon, "heap-2-1"));
    assert!(!is_lazy_pages_of(&daemon, "2-12"));
    assert!(is_lazy_pages_of(&daemon, "heap-tpl"), "a path component");
    assert!(!is_lazy_pages_of(&daemon, ""));
    // The restore itself, or the shim, is not the daemon.
    let restore = cmdline(&[
        "criu",
        "restore",
        "--lazy-pages",
        "-W",
        "/s/state/io.containerd.runtime.v2.task/bench/heap-2-12/criu-work",
    ]);
    assert!(!is_lazy_pages_of(&restore, "heap-2-12"));
    let shim = cmdline(&["containerd-shim-hyperbox-v1", "-id", "heap-2-12"]);
    assert!(!is_lazy_pages_of(&shim, "heap-2-12"));
    assert!(!is_lazy_pages_of(b"", "heap-2-12"));
}

#[test]
fn this_process_is_no_lazy_pages_daemon() {
    assert!(!lazy_pages_running("no-such-container-0"));
}

#[test]
fn heap_answers_are_parsed() {
    let body = "heap started=1765000000.123456 sha=ab12\n";
    assert_eq!(heap_sha(body), Some("ab12"));
    assert_eq!(heap_sha("warm started=1 entries=2\n"), None);
    assert_eq!(heap_sha("heap started=1 sha=\n"), None);
    assert_eq!(parse_sum("sum now=ab12 sha=ab12\n"), Some(("ab12", "ab12")));
    assert_eq!(parse_sum("sum now=cd34 sha=ab12"), Some(("cd34", "ab12")));
    assert_eq!(parse_sum("sum now= sha=ab12"), None);
    assert_eq!(parse_sum("heap started=1 sha=ab12"), None);
}

#[test]
fn the_python_table_adds_the_pulled_variant_to_busyboxs() {
    let names: Vec<&str> = READY_VARIANTS.iter().map(|v| v.name).collect();
    assert_eq!(
        names,
        [
            "runc.v2 cold",
            "hyperbox cold",
            "hyperbox restored",
            "hyperbox pulled"
        ]
    );
    assert!(READY_VARIANTS[..3].iter().all(|v| v.start != Start::Pulled));
    assert_eq!(HEAP_VARIANTS[0].runtime, RUNC_V2);
    assert_eq!(HEAP_VARIANTS[2].start, HeapStart::Lazy);
}

fn sample_table(variants: &[(&str, f64)]) -> Table {
    let times = variants
        .iter()
        .map(|(name, ms)| VariantTimes {
            name: name.to_string(),
            command: String::new(),
            samples_ms: vec![*ms, *ms],
        })
        .collect();
    table(times, 2, 1)
}

fn sample_capture(name: &str) -> Capture {
    Capture {
        name: name.into(),
        readiness: format!("{READY_FILE}=/ready"),
        kept_ms: 5000.0,
        bytes: 1 << 30,
        body: "heap started=1 sha=ab\n".into(),
        record: serde_json::json!({"bytes": 1u64 << 30}),
    }
}

#[test]
fn the_new_parts_are_rendered_and_saved() {
    let heap = HeapPart {
        workload: "python heap service".into(),
        heap_mib: 1024,
        template: sample_capture("heap-tpl"),
        ready: sample_table(&[
            ("runc.v2 cold", 6000.0),
            ("hyperbox eager", 900.0),
            ("hyperbox lazy", 120.0),
        ]),
        all_pages_in: sample_table(&[
            ("runc.v2 cold", 6000.0),
            ("hyperbox eager", 900.0),
            ("hyperbox lazy", 1500.0),
        ]),
        sum: sample_table(&[
            ("runc.v2 cold", 3000.0),
            ("hyperbox eager", 3000.0),
            ("hyperbox lazy", 3000.0),
        ]),
        lazy_daemon_seen: 2,
        lazy_runs: 2,
        lazy_over_eager: 120.0 / 900.0,
        lazy_ready_ms: 120.0,
    };
    let text = render_heap(&heap, "1.7");
    assert!(
        text.contains("python heap service (1024 MiB) on containerd 1.7"),
        "{text}"
    );
    assert!(text.contains("hyperbox lazy"), "{text}");
    assert!(text.contains("until all pages were in"), "{text}");
    assert!(text.contains("`GET /sum`"), "{text}");
    assert!(text.contains("in 2 of 2 lazy runs"), "{text}");
    let python = ReadyPart {
        workload: "python service".into(),
        template: sample_capture("py-tpl"),
        distribution: Some(Distribution {
            template: "py-tpl".into(),
            push_command: "push".into(),
            push_ms: 800.0,
            reference: "127.0.0.1:5000/hyperbox-templates/py-tpl:bench".into(),
            digest: DIGEST.into(),
            pushed_size: "40.0 MiB".into(),
            pushed_bytes: size_bytes("40.0 MiB"),
            pull_command: "pull".into(),
            pull_ms: 600.0,
            pulled: PULLED_NAME.into(),
            pulled_bytes: 40 << 20,
            record: serde_json::Value::Null,
        }),
        ready: sample_table(&[
            ("runc.v2 cold", 2200.0),
            ("hyperbox cold", 2300.0),
            ("hyperbox restored", 150.0),
            ("hyperbox pulled", 160.0),
        ]),
        ctr_returned: sample_table(&[("runc.v2 cold", 100.0)]),
        restored_over_cold: 150.0 / 2300.0,
        pulled_over_restored: Some(160.0 / 150.0),
    };
    let text = render_ready(&python, "1.7");
    assert!(
        text.contains(&format!("pushed to 127.0.0.1:5000/hyperbox-templates/py-tpl:bench@{DIGEST} in 800.0 ms (40.0 MiB), pulled back as \"py-pulled\" in 600.0 ms")),
        "{text}"
    );
    assert!(text.contains("hyperbox pulled"), "{text}");
    assert!(
        text.contains("from the pulled template / from the local one: 1.0667"),
        "{text}"
    );
    let json = serde_json::to_value(&heap).unwrap();
    assert_eq!(json["lazy_ready_ms"], 120.0);
    assert_eq!(
        json["ready"]["timings"]["variants"][2]["name"],
        "hyperbox lazy"
    );
    let json = serde_json::to_value(&python).unwrap();
    assert_eq!(json["distribution"]["pushed_bytes"], 40u64 << 20);
    assert_eq!(json["distribution"]["pulled"], PULLED_NAME);
}

#[test]
fn p90_is_the_nearest_rank() {
    let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
    assert_eq!(p90(&ten), 9.0);
    let twenty: Vec<f64> = (1..=20).map(f64::from).collect();
    assert_eq!(p90(&twenty), 18.0);
    assert!(p90(&[]).is_nan());
}

#[test]
fn tables_compare_with_the_first_variant() {
    let times = [("runc.v2 cold", 100.0), ("hyperbox restored", 8.0)]
        .map(|(name, ms)| VariantTimes {
            name: name.into(),
            command: String::new(),
            samples_ms: vec![ms, ms],
        })
        .to_vec();
    let t = table(times, 2, 0);
    assert_eq!(t.timings.baseline, "runc.v2 cold");
    assert_eq!(t.timings.variants[1].ratio_to_baseline, 0.08);
    assert_eq!(median_of(&t, "hyperbox restored"), 8.0);
    assert!(median_of(&t, "nothing").is_nan());
    assert_eq!(t.p90_ms, [100.0, 8.0]);
}

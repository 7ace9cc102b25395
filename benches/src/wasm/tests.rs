//! Unit tests of the wasm benchmark: the guests, the compile cache entries and log lines,
//! `ctr events` and /proc parsing, the `ctr` arguments and the goals.

use sha2::{Digest, Sha256};

use super::bench::with_id;
use super::guests::{assemble, hello, LOOP, SLEEP};
use super::*;

#[test]
fn the_guests_assemble_and_the_tag_makes_hello_unique() {
    let a = hello("bench-a").unwrap();
    let b = hello("bench-b").unwrap();
    assert!(a.starts_with(b"\0asm"));
    assert_ne!(Sha256::digest(&a), Sha256::digest(&b));
    assert!(a.windows(7).any(|w| w == b"bench-a"));
    assert!(assemble(SLEEP).unwrap().starts_with(b"\0asm"));
    assert!(assemble(LOOP).unwrap().starts_with(b"\0asm"));
}

#[test]
fn cache_entries_are_matched_by_digest_and_suffix() {
    let d = "ab12";
    assert!(is_cache_entry_of("ab12-7f00aa.cwasm", d));
    assert!(!is_cache_entry_of("ab12-7f00aa.tmp-42", d));
    assert!(!is_cache_entry_of("ab123-7f00aa.cwasm", d));
    assert!(!is_cache_entry_of("cd34-7f00aa.cwasm", d));
}

#[test]
fn cache_lines_are_counted_for_the_digest_only() {
    let log = "\
time=1 level=info msg=\"compiled\" id=a digest=ab12 guest=/hello.wasm\n\
time=2 level=info msg=\"cache hit\" id=b digest=ab12 guest=/hello.wasm\n\
time=3 level=info msg=\"cache hit\" id=c digest=cd34 guest=/other.wasm\n\
time=4 level=warn msg=\"cannot store the compiled guest: full\" entry=/c/ab12-1.cwasm\n\
time=5 level=info msg=\"cache hit\" id=d digest=ab12 guest=/hello.wasm\n";
    assert_eq!(
        count_cache_lines(log, "ab12"),
        CacheCounts {
            compiled: 1,
            cache_hits: 2
        }
    );
}

#[test]
fn exit_events_are_parsed_from_ctr_events() {
    let line = "2026-11-29 05:20:01.123456789 +0000 UTC hyperbox /tasks/exit \
                {\"container_id\":\"kill-0-4\",\"id\":\"kill-0-4\",\"pid\":4242,\
                \"exit_status\":137,\"exited_at\":\"2026-11-29T05:20:01Z\"}";
    assert_eq!(
        parse_exit_event(line),
        Some(ExitEvent {
            container: "kill-0-4".into(),
            exit_status: 137
        })
    );
    // An exit status of 0 is left out of the JSON.
    let zero = "t ns /tasks/exit {\"container_id\":\"x\",\"id\":\"x\",\"pid\":1}";
    assert_eq!(parse_exit_event(zero).unwrap().exit_status, 0);
    let start = "t ns /tasks/start {\"container_id\":\"x\",\"pid\":1}";
    assert_eq!(parse_exit_event(start), None);
}

#[test]
fn cpu_ticks_are_user_plus_system() {
    let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0";
    assert_eq!(parse_cpu_ticks(stat), Some(22));
    assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
}

#[test]
fn ctr_arguments_get_the_container_id() {
    let template = ["--rootfs", "/r", "{id}", "/loop.wasm"].map(String::from);
    assert_eq!(
        with_id(&template, "kill-0-3"),
        ["--rootfs", "/r", "kill-0-3", "/loop.wasm"]
    );
}

#[test]
fn goals_are_met_at_the_limit() {
    assert_eq!(verdict(0.5, GOAL_WARM_RATIO), "met");
    assert_eq!(verdict(0.51, GOAL_WARM_RATIO), "missed");
    assert_eq!(verdict(f64::NAN, GOAL_PSS_MIB), "missed");
}

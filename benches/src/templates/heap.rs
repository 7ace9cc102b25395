//! The heap part: a service holding a large heap cold through runc.v2, restored eagerly and
//! lazily (CRIU's lazy-pages daemon) through ours, its heap checked whole afterwards.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use hyperbox_integration::workloads::{connect_in_network, PY_SERVICE_PORT};

use crate::engines::{HYPERBOX_V1, RUNC_V2};
use crate::stats::rotation;

use super::bench::{run_args, Bench, Netns, Workload};
use super::parse::{heap_sha, is_lazy_pages_of, parse_sum};
use super::results::{median_of, named_table, HeapPart};
use super::{POLL, READY_LIMIT, RESTORE_FROM, RESTORE_LAZY, SUM_TIMEOUT};

/// How the heap service is started in a variant of the heap part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HeapStart {
    Cold,
    Eager,
    Lazy,
}

/// One variant of the heap part.
pub(super) struct HeapVariant {
    pub(super) name: &'static str,
    pub(super) runtime: &'static str,
    pub(super) start: HeapStart,
}

pub(super) const HEAP_VARIANTS: [HeapVariant; 3] = [
    HeapVariant {
        name: "runc.v2 cold",
        runtime: RUNC_V2,
        start: HeapStart::Cold,
    },
    HeapVariant {
        name: "hyperbox eager",
        runtime: HYPERBOX_V1,
        start: HeapStart::Eager,
    },
    HeapVariant {
        name: "hyperbox lazy",
        runtime: HYPERBOX_V1,
        start: HeapStart::Lazy,
    },
];

/// Whether a lazy-pages daemon of container `id` is running (a scan of /proc).
pub(super) fn lazy_pages_running(id: &str) -> bool {
    let Ok(dir) = fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|e| {
        let name = e.file_name();
        name.as_bytes().iter().all(u8::is_ascii_digit)
            && fs::read(e.path().join("cmdline")).is_ok_and(|c| is_lazy_pages_of(&c, id))
    })
}

/// `GET /sum` of the heap service in the network namespace at `netns`: its body, and how
/// long from connecting until the answer was read, ms.
fn get_sum(netns: &Path) -> Result<(String, f64), String> {
    let start = Instant::now();
    let mut stream = connect_in_network(netns, PY_SERVICE_PORT, Duration::from_secs(10))?;
    stream
        .set_read_timeout(Some(SUM_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SUM_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /sum HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("reading the answer to GET /sum: {e}"))?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .ok_or_else(|| format!("no HTTP body in {text:?}"))?;
    Ok((body.to_string(), ms))
}

impl Bench {
    /// Waits, after the lazily restored `id` is ready, until its lazy-pages daemon is gone;
    /// when that was, ms after `spawned`, and whether the daemon was still there at first.
    fn wait_all_pages_in(&self, id: &str, spawned: Instant) -> anyhow::Result<(f64, bool)> {
        let seen = lazy_pages_running(id);
        if seen {
            while lazy_pages_running(id) {
                if spawned.elapsed() > READY_LIMIT {
                    return Err(self.fail(format!(
                        "the lazy-pages daemon of {id} still runs {READY_LIMIT:?} after its \
                         `ctr run -d`"
                    )));
                }
                thread::sleep(POLL);
            }
        }
        Ok((spawned.elapsed().as_secs_f64() * 1e3, seen))
    }

    /// The heap part: the service `w` (of
    /// [`py_heap_service`](hyperbox_integration::workloads::py_heap_service)) cold through runc.v2,
    /// restored eagerly and lazily through ours.
    pub(super) fn heap_part(
        &self,
        w: &Workload<'_>,
        heap_mib: usize,
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<HeapPart> {
        let template = self.capture(w)?;
        let template_sha = heap_sha(&template.body)
            .with_context(|| {
                format!(
                    "the captured heap service answered {:?}, not `heap ... sha=S`",
                    template.body
                )
            })?
            .to_string();
        let eager = [(RESTORE_FROM, template.name.as_str())];
        let lazy = [
            (RESTORE_FROM, template.name.as_str()),
            (RESTORE_LAZY, "true"),
        ];
        let annotations_of = |start: HeapStart| -> &[(&str, &str)] {
            match start {
                HeapStart::Cold => &[],
                HeapStart::Eager => &eager,
                HeapStart::Lazy => &lazy,
            }
        };
        let k = HEAP_VARIANTS.len();
        let mut ready = vec![Vec::with_capacity(rounds); k];
        let mut all_in = vec![Vec::with_capacity(rounds); k];
        let mut sums = vec![Vec::with_capacity(rounds); k];
        let mut lazy_daemon_seen = 0;
        let mut lazy_runs = 0;
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(k, round) {
                    n += 1;
                    let v = &HEAP_VARIANTS[i];
                    let id = format!("{}-{i}-{n}", w.tag);
                    let netns = Netns::new(self.containerd(), &id)?;
                    let args = run_args(
                        v.runtime,
                        Some(&netns.0),
                        annotations_of(v.start),
                        w.image,
                        &id,
                        &w.cmd,
                    );
                    let r = self.run_until_ready(&args, &netns.0)?;
                    let (pages_ms, seen) = match v.start {
                        HeapStart::Lazy => self.wait_all_pages_in(&id, r.spawned)?,
                        HeapStart::Cold | HeapStart::Eager => (r.ready_ms, false),
                    };
                    let Some(sha) = heap_sha(&r.body) else {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {:?}, not `heap ... sha=S`",
                            v.name, r.body
                        )));
                    };
                    let restored = r.body == template.body;
                    if restored != (v.start != HeapStart::Cold) {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {:?}, the template {:?}: a restored copy \
                             answers as the template, a cold start does not",
                            v.name, r.body, template.body
                        )));
                    }
                    let (sum_body, sum_ms) = get_sum(&netns.0)
                        .map_err(|e| self.fail(format!("GET /sum of {id} ({}): {e}", v.name)))?;
                    match parse_sum(&sum_body) {
                        Some((now, at_start)) if now == at_start && at_start == sha => {}
                        _ => {
                            return Err(self.fail(format!(
                                "{id} ({}): GET /sum answered {sum_body:?}, its heap's hash at \
                                 start being {sha} (template's {template_sha}): the heap is not \
                                 whole",
                                v.name
                            )))
                        }
                    }
                    if record {
                        ready[i].push(r.ready_ms);
                        all_in[i].push(pages_ms);
                        sums[i].push(sum_ms);
                        if v.start == HeapStart::Lazy {
                            lazy_runs += 1;
                            lazy_daemon_seen += usize::from(seen);
                        }
                    }
                    tracing::debug!(
                        id,
                        variant = v.name,
                        ready_ms = r.ready_ms,
                        pages_ms,
                        sum_ms,
                        seen,
                        "heap run"
                    );
                    self.remove(&id)?;
                    netns.remove()?;
                }
                tracing::info!("{} {phase} round {}/{count} done", w.label, round + 1);
            }
        }
        let commands: Vec<String> = HEAP_VARIANTS
            .iter()
            .map(|v| {
                let how: String = annotations_of(v.start)
                    .iter()
                    .map(|(k, v)| format!(" --annotation {k}={v}"))
                    .collect();
                format!(
                    "ctr run -d --null-io --runtime {} --with-ns network:FILE{how} {} ID \
                     python3 -c HEAP_SERVICE({heap_mib})",
                    v.runtime, w.image
                )
            })
            .collect();
        let names: Vec<&str> = HEAP_VARIANTS.iter().map(|v| v.name).collect();
        let times = |samples: Vec<Vec<f64>>, until: &str| {
            named_table(&names, &commands, samples, until, rounds, warmup)
        };
        let ready = times(ready, "until a GET in its netns answers");
        let all_pages_in = times(
            all_in,
            "until its lazy-pages daemon exited (lazy), else until ready",
        );
        let sum = times(sums, "then GET /sum, until its answer");
        let lazy_ready_ms = median_of(&ready, "hyperbox lazy");
        let lazy_over_eager = lazy_ready_ms / median_of(&ready, "hyperbox eager");
        Ok(HeapPart {
            workload: "python heap service".into(),
            heap_mib,
            template,
            ready,
            all_pages_in,
            sum,
            lazy_daemon_seen,
            lazy_runs,
            lazy_over_eager,
            lazy_ready_ms,
        })
    }
}

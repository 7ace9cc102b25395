//! The kill part: a looping container per runtime, timed from spawning `ctr tasks kill -s
//! SIGKILL` until containerd's `/tasks/exit` event for it arrives on a `ctr events` stream.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hyperbox_integration::containerd::Containerd;

use crate::engines::RUNC_V2;
use crate::runner::{self, Timings, VariantTimes};
use crate::stats::rotation;

use super::bench::{with_id, Bench};
use super::results::KillTimings;
use super::WASM_V1;

/// A `/tasks/exit` event as `ctr events` prints it: `TIME NS /tasks/exit {JSON}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitEvent {
    pub container: String,
    pub exit_status: u32,
}

/// Parses one line of `ctr events`; `None` for any other topic (the JSON leaves out an exit
/// status of 0).
pub fn parse_exit_event(line: &str) -> Option<ExitEvent> {
    let at = line.find(" /tasks/exit ")?;
    let json = line[at..].find('{').map(|i| &line[at + i..])?;
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(ExitEvent {
        container: v.get("container_id")?.as_str()?.to_string(),
        exit_status: v
            .get("exit_status")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32,
    })
}

/// `ctr events`, read on a thread: the `/tasks/exit` events with the instant each arrived.
struct ExitEvents {
    child: Child,
    events: Receiver<(ExitEvent, Instant)>,
}

impl ExitEvents {
    fn start(c: &Containerd) -> anyhow::Result<ExitEvents> {
        let mut child = c
            .ctr()
            .arg("events")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start `ctr events`")?;
        let stdout = child.stdout.take().context("`ctr events` has no stdout")?;
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(e) = parse_exit_event(&line) {
                    if tx.send((e, Instant::now())).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(ExitEvents { child, events })
    }

    /// Waits for the exit event of `container`, skipping others'.
    fn wait_for(&self, container: &str) -> anyhow::Result<(ExitEvent, Instant)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok((e, at)) if e.container == container => return Ok((e, at)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no /tasks/exit event for {container} within 30 s")
                }
                Err(RecvTimeoutError::Disconnected) => bail!("`ctr events` ended"),
            }
        }
    }
}

impl Drop for ExitEvents {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A looping container to kill: name, runtime, and `ctr run` arguments (`{id}` for the
/// container's).
struct Looper {
    name: &'static str,
    runtime: &'static str,
    template: Vec<String>,
}

pub(super) fn kill(b: &Bench, rounds: usize, warmup: usize) -> anyhow::Result<KillTimings> {
    let rootfs = b.rootfs.to_string_lossy();
    let image = b.engine.image.as_str();
    let loopers = [
        Looper {
            name: "hyperbox-wasm loop",
            runtime: WASM_V1,
            template: ["--rootfs", &rootfs, "{id}", "/loop.wasm"]
                .map(String::from)
                .to_vec(),
        },
        Looper {
            name: "runc.v2 busybox loop",
            runtime: RUNC_V2,
            template: [image, "{id}", "sh", "-c", "while :; do :; done"]
                .map(String::from)
                .to_vec(),
        },
    ];
    let c = b.containerd();
    let events = ExitEvents::start(c)?;
    // Let the subscription reach containerd before the first kill.
    thread::sleep(Duration::from_millis(500));
    let mut until_exit = vec![Vec::with_capacity(rounds); loopers.len()];
    let mut until_returned = vec![Vec::with_capacity(rounds); loopers.len()];
    let mut n = 0;
    for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
        for round in 0..count {
            for i in rotation(loopers.len(), round) {
                n += 1;
                let l = &loopers[i];
                let id = format!("kill-{i}-{n}");
                let args = with_id(&l.template, &id);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                b.start_detached(l.runtime, &id, &args)?;
                // Running its loop, not still starting it.
                thread::sleep(Duration::from_millis(100));
                let start = Instant::now();
                c.ctr_run(&["tasks", "kill", "-s", "SIGKILL", &id])
                    .with_context(|| format!("killing {id}"))?;
                let returned = start.elapsed();
                let (event, at) = events.wait_for(&id)?;
                if event.exit_status != 137 {
                    bail!("{id} exited {} after SIGKILL, not 137", event.exit_status);
                }
                if record {
                    until_exit[i].push(at.duration_since(start).as_secs_f64() * 1e3);
                    until_returned[i].push(returned.as_secs_f64() * 1e3);
                }
                b.engine.remove(&[id])?;
            }
            if (round + 1) % 10 == 0 || round + 1 == count {
                tracing::info!("kill {phase} round {}/{count} done", round + 1);
            }
        }
    }
    let timings = |samples: Vec<Vec<f64>>, what: &str| {
        let times = loopers
            .iter()
            .zip(samples)
            .map(|(l, s)| VariantTimes {
                name: l.name.to_string(),
                command: format!("ctr tasks kill -s SIGKILL ID ({what}), {}", l.runtime),
                samples_ms: s,
            })
            .collect();
        Timings {
            rounds,
            warmup,
            baseline: loopers[1].name.to_string(),
            variants: runner::summarize(times, 1),
        }
    };
    Ok(KillTimings {
        until_exit_event: timings(until_exit, "until the exit event"),
        until_kill_returned: timings(until_returned, "until ctr returned"),
    })
}

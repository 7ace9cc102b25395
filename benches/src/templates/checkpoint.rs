//! The checkpoint/restore part: `ctr containers checkpoint --task` and `ctr containers
//! restore --live` of a busybox shell loop, per runtime.

use std::thread;
use std::time::Duration;

use crate::engines::{HYPERBOX_V1, RUNC_V2};
use crate::runner::VariantTimes;
use crate::stats::rotation;

use super::bench::{run_args, Bench};
use super::results::{table, CheckpointPart};
use super::LOOP;

impl Bench {
    /// The checkpoint/restore part.
    pub(super) fn checkpoint_part(
        &self,
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<CheckpointPart> {
        let c = self.containerd();
        let image = self.engine.image.as_str();
        let runtimes = [("runc.v2", RUNC_V2), ("hyperbox", HYPERBOX_V1)];
        let mut checkpoint = vec![Vec::with_capacity(rounds); runtimes.len()];
        let mut restore = vec![Vec::with_capacity(rounds); runtimes.len()];
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(runtimes.len(), round) {
                    n += 1;
                    let (short, runtime) = runtimes[i];
                    let id = format!("cr-{i}-{n}");
                    let reference = format!("hyperbox.bench/cr-{short}-{n}:1");
                    let args = run_args(runtime, None, &[], image, &id, &["sh", "-c", LOOP]);
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    c.ctr_run(&args)
                        .map_err(|e| self.fail(format!("starting {id}: {e}")))?;
                    self.wait_running(&id)?;
                    // Into its loop, not still starting.
                    thread::sleep(Duration::from_millis(200));
                    let cp =
                        self.timed_ctr(&["containers", "checkpoint", "--task", &id, &reference])?;
                    self.remove(&id)?;
                    let rs =
                        self.timed_ctr(&["containers", "restore", "--live", &id, &reference])?;
                    self.wait_running(&id)?;
                    let info = c.ctr_stdout(&["containers", "info", &id])?;
                    if !info.contains(runtime) {
                        return Err(self.fail(format!("{id} was not restored through {runtime}")));
                    }
                    if record {
                        checkpoint[i].push(cp);
                        restore[i].push(rs);
                    }
                    self.remove(&id)?;
                    c.ctr_run(&["images", "rm", &reference])
                        .map_err(|e| self.fail(format!("removing {reference}: {e}")))?;
                }
                tracing::info!(
                    "checkpoint/restore {phase} round {}/{count} done",
                    round + 1
                );
            }
        }
        let times = |samples: Vec<Vec<f64>>, what: &str| {
            let times = runtimes
                .iter()
                .zip(samples)
                .map(|((short, runtime), s)| VariantTimes {
                    name: short.to_string(),
                    command: format!("{what} (container run through {runtime})"),
                    samples_ms: s,
                })
                .collect();
            table(times, rounds, warmup)
        };
        Ok(CheckpointPart {
            workload: format!("busybox sh -c '{LOOP}'"),
            checkpoint: times(checkpoint, "ctr containers checkpoint --task ID REF"),
            restore: times(restore, "ctr containers restore --live ID REF"),
        })
    }
}

//! The time-to-ready part: a workload cold through runc.v2 and ours, restored through ours
//! from its template (and from the template pulled back from the registry).

use crate::engines::{HYPERBOX_V1, RUNC_V2};
use crate::report;
use crate::stats::rotation;

use super::bench::{run_args, Bench, Netns, Ready, Workload};
use super::results::{median_of, named_table, ReadyPart};
use super::{PULLED_NAME, RESTORE_FROM};

/// What a variant of a ready part starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    Cold,
    /// From the template captured on this node.
    Restored,
    /// From the template pushed to the registry and pulled back as [`PULLED_NAME`].
    Pulled,
}

/// One variant of a ready part.
pub(super) struct ReadyVariant {
    pub(super) name: &'static str,
    pub(super) runtime: &'static str,
    pub(super) start: Start,
}

/// The variants of the Python table; busybox's are the first three (no registry).
pub(super) const READY_VARIANTS: [ReadyVariant; 4] = [
    ReadyVariant {
        name: "runc.v2 cold",
        runtime: RUNC_V2,
        start: Start::Cold,
    },
    ReadyVariant {
        name: "hyperbox cold",
        runtime: HYPERBOX_V1,
        start: Start::Cold,
    },
    ReadyVariant {
        name: "hyperbox restored",
        runtime: HYPERBOX_V1,
        start: Start::Restored,
    },
    ReadyVariant {
        name: "hyperbox pulled",
        runtime: HYPERBOX_V1,
        start: Start::Pulled,
    },
];

impl Bench {
    /// The time-to-ready part of workload `w` over `variants` (those of [`READY_VARIANTS`]
    /// it runs; with [`Start::Pulled`] among them the template goes through the registry).
    pub(super) fn ready_part(
        &self,
        w: &Workload<'_>,
        variants: &[ReadyVariant],
        rounds: usize,
        warmup: usize,
    ) -> anyhow::Result<ReadyPart> {
        let template = self.capture(w)?;
        let distribution = if variants.iter().any(|v| v.start == Start::Pulled) {
            Some(self.distribute(&template.name)?)
        } else {
            None
        };
        let restore = [(RESTORE_FROM, template.name.as_str())];
        let pulled = [(RESTORE_FROM, PULLED_NAME)];
        let mut samples = vec![Vec::with_capacity(rounds); variants.len()];
        let mut returned = vec![Vec::with_capacity(rounds); variants.len()];
        let mut n = 0;
        for (phase, count, record) in [("warm-up", warmup, false), ("measured", rounds, true)] {
            for round in 0..count {
                for i in rotation(variants.len(), round) {
                    n += 1;
                    let v = &variants[i];
                    let id = format!("{}-{i}-{n}", w.tag);
                    let netns = Netns::new(self.containerd(), &id)?;
                    let annotations: &[(&str, &str)] = match v.start {
                        Start::Cold => &[],
                        Start::Restored => &restore,
                        Start::Pulled => &pulled,
                    };
                    let args =
                        run_args(v.runtime, Some(&netns.0), annotations, w.image, &id, &w.cmd);
                    let Ready {
                        body,
                        ready_ms,
                        returned_ms,
                        ..
                    } = self.run_until_ready(&args, &netns.0)?;
                    let restored = body == template.body;
                    if restored != (v.start != Start::Cold) {
                        return Err(self.fail(format!(
                            "{id} ({}) answered {body:?}, the template {:?}: a restored copy \
                             answers as the template, a cold start does not",
                            v.name, template.body
                        )));
                    }
                    if record {
                        samples[i].push(ready_ms);
                        returned[i].push(returned_ms);
                    }
                    self.remove(&id)?;
                    netns.remove()?;
                }
                tracing::info!("{} {phase} round {}/{count} done", w.label, round + 1);
            }
        }
        let commands: Vec<String> = variants
            .iter()
            .map(|v| {
                let how = match v.start {
                    Start::Cold => String::new(),
                    Start::Restored => format!(" --annotation {RESTORE_FROM}={}", template.name),
                    Start::Pulled => format!(" --annotation {RESTORE_FROM}={PULLED_NAME}"),
                };
                let cmd: Vec<String> = w.cmd.iter().map(|a| a.to_string()).collect();
                format!(
                    "ctr run -d --null-io --runtime {} --with-ns network:FILE{how} {} ID {}",
                    v.runtime,
                    w.image,
                    report::shell_words(&cmd)
                )
            })
            .collect();
        let names: Vec<&str> = variants.iter().map(|v| v.name).collect();
        let times = |samples: Vec<Vec<f64>>, until: &str| {
            named_table(&names, &commands, samples, until, rounds, warmup)
        };
        let ready = times(samples, "until a GET in its netns answers");
        let ctr_returned = times(returned, "until ctr returned");
        let restored_over_cold =
            median_of(&ready, "hyperbox restored") / median_of(&ready, "hyperbox cold");
        let pulled_over_restored = distribution
            .as_ref()
            .map(|_| median_of(&ready, "hyperbox pulled") / median_of(&ready, "hyperbox restored"));
        Ok(ReadyPart {
            workload: w.label.to_string(),
            template,
            distribution,
            ready,
            ctr_returned,
            restored_over_cold,
            pulled_over_restored,
        })
    }
}

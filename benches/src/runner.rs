//! The round-robin timing runner.
//!
//! Every round runs each variant once; round `r` starts at variant `r mod N` and goes on in
//! order, wrapping around ([`stats::rotation`]), so no variant always runs first (on a cold
//! cache) or right after a particular other one, and a machine that gets busier or quieter
//! during the run affects all variants alike. Warm-up rounds run the same way and are not
//! recorded. Each run is timed as a whole with the monotonic clock ([`Instant`]); the first
//! failed run aborts everything with what it wrote to stderr.

use std::process::{Command, Stdio};
use std::time::Instant;

use crate::stats::{self, Summary};
use serde::Serialize;

/// One run of a variant that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{command}` failed ({status}): {stderr}")]
pub struct CommandFailure {
    /// The command as run.
    pub command: String,
    /// Its exit status, or why it did not start.
    pub status: String,
    /// What it wrote to stderr, trimmed.
    pub stderr: String,
}

/// Errors of a timing run.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("no variants to time")]
    NoVariants,
    #[error("no measured rounds: --rounds must be at least 1")]
    NoRounds,
    #[error("two variants are named {0:?}: names must be unique")]
    DuplicateName(String),
    #[error("baseline {name:?} is not a variant; variants are: {known}")]
    UnknownBaseline { name: String, known: String },
    #[error("variant {variant:?} failed in {phase} round {round}: {source}")]
    Failed {
        variant: String,
        phase: &'static str,
        round: usize,
        #[source]
        source: CommandFailure,
    },
}

/// The work of one variant: called with a run number unique within the whole timing run
/// (warm-up included), for example to name a container.
pub type Action<'a> = Box<dyn FnMut(u64) -> Result<(), CommandFailure> + 'a>;

/// A named thing to time.
pub struct Variant<'a> {
    name: String,
    /// What is run, for the report (`{n}` stands for the run number).
    command: String,
    action: Action<'a>,
}

impl std::fmt::Debug for Variant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Variant")
            .field("name", &self.name)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

impl<'a> Variant<'a> {
    /// A variant running `action`; `command` describes it in the report.
    pub fn new(
        name: impl Into<String>,
        command: impl Into<String>,
        action: impl FnMut(u64) -> Result<(), CommandFailure> + 'a,
    ) -> Self {
        Variant {
            name: name.into(),
            command: command.into(),
            action: Box::new(action),
        }
    }

    /// A variant running the shell command `template` with `sh -c`, every `{n}` in it
    /// replaced by the run number.
    pub fn shell(name: impl Into<String>, template: impl Into<String>) -> Self {
        let template = template.into();
        let command = template.clone();
        Variant::new(name, command, move |n| {
            let script = expand_run_number(&template, n);
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(&script);
            run_command(&mut cmd, &script)
        })
    }

    /// A variant running the command `make(n)` builds.
    pub fn command(
        name: impl Into<String>,
        description: impl Into<String>,
        mut make: impl FnMut(u64) -> Command + 'a,
    ) -> Self {
        Variant::new(name, description, move |n| {
            let mut cmd = make(n);
            let shown = describe(&cmd);
            run_command(&mut cmd, &shown)
        })
    }

    /// The variant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the variant runs.
    pub fn command_text(&self) -> &str {
        &self.command
    }
}

/// `template` with every `{n}` replaced by `n`.
pub fn expand_run_number(template: &str, n: u64) -> String {
    template.replace("{n}", &n.to_string())
}

/// A command line as text: the program and its arguments, space-separated.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` to completion with stdin and stdout on /dev/null, keeping stderr for the error
/// when it fails.
pub fn run_command(cmd: &mut Command, shown: &str) -> Result<(), CommandFailure> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| CommandFailure {
            command: shown.to_string(),
            status: "not started".into(),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CommandFailure {
            command: shown.to_string(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// How many rounds to run, and which variant the others are compared with.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Measured rounds.
    pub rounds: usize,
    /// Unrecorded rounds first.
    pub warmup: usize,
    /// The variant whose median the others' medians are divided by (default: the first).
    pub baseline: Option<String>,
}

/// The measured durations of one variant, in milliseconds, in the order they were taken.
#[derive(Debug, Clone, Serialize)]
pub struct VariantTimes {
    pub name: String,
    pub command: String,
    pub samples_ms: Vec<f64>,
}

/// One variant's line in a report.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub name: String,
    pub command: String,
    /// Milliseconds.
    pub summary: Summary,
    /// This variant's median divided by the baseline's median.
    pub ratio_to_baseline: f64,
    pub samples_ms: Vec<f64>,
}

/// What a timing run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub rounds: usize,
    pub warmup: usize,
    pub baseline: String,
    pub variants: Vec<VariantResult>,
}

/// Index of the baseline variant among `names`: the one named `baseline`, else the first.
pub fn baseline_index(names: &[&str], baseline: Option<&str>) -> Result<usize, RunnerError> {
    if names.is_empty() {
        return Err(RunnerError::NoVariants);
    }
    match baseline {
        None => Ok(0),
        Some(b) => names
            .iter()
            .position(|n| *n == b)
            .ok_or_else(|| RunnerError::UnknownBaseline {
                name: b.to_string(),
                known: names.join(", "),
            }),
    }
}

/// Summarizes `times` against the variant at index `baseline`.
pub fn summarize(times: Vec<VariantTimes>, baseline: usize) -> Vec<VariantResult> {
    let summaries: Vec<Option<Summary>> =
        times.iter().map(|t| Summary::of(&t.samples_ms)).collect();
    let base = summaries.get(baseline).copied().flatten().map(|s| s.median);
    times
        .into_iter()
        .zip(summaries)
        .filter_map(|(t, s)| {
            let summary = s?;
            let ratio = base.map_or(f64::NAN, |b| summary.median / b);
            Some(VariantResult {
                name: t.name,
                command: t.command,
                summary,
                ratio_to_baseline: ratio,
                samples_ms: t.samples_ms,
            })
        })
        .collect()
}

/// Gives each variant its own baseline: the ratio of variant `i` becomes its median over the
/// median of variant `baseline_of[i]` (indexes in the order the variants were run), and
/// `label` says in the report what the baselines are. For reports with one baseline per
/// group, such as runc.v2 on each containerd version.
pub fn rebase(timings: &mut Timings, baseline_of: &[usize], label: impl Into<String>) {
    let medians: Vec<f64> = timings.variants.iter().map(|v| v.summary.median).collect();
    for (v, b) in timings.variants.iter_mut().zip(baseline_of) {
        v.ratio_to_baseline = medians.get(*b).map_or(f64::NAN, |m| v.summary.median / m);
    }
    timings.baseline = label.into();
}

/// Runs `plan.warmup` then `plan.rounds` rounds of `variants`, rotated, and summarizes them.
pub fn run(variants: &mut [Variant<'_>], plan: &Plan) -> Result<Timings, RunnerError> {
    if plan.rounds == 0 {
        return Err(RunnerError::NoRounds);
    }
    let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
    for (i, n) in names.iter().enumerate() {
        if names[..i].contains(n) {
            return Err(RunnerError::DuplicateName(n.to_string()));
        }
    }
    let baseline = baseline_index(&names, plan.baseline.as_deref())?;
    let baseline_name = names[baseline].to_string();

    let mut samples: Vec<Vec<f64>> = vec![Vec::with_capacity(plan.rounds); variants.len()];
    let mut run_number: u64 = 0;
    let phases = [
        ("warm-up", plan.warmup, false),
        ("measured", plan.rounds, true),
    ];
    for (phase, rounds, record) in phases {
        for round in 0..rounds {
            for i in stats::rotation(variants.len(), round) {
                run_number += 1;
                let v = &mut variants[i];
                let start = Instant::now();
                (v.action)(run_number).map_err(|source| RunnerError::Failed {
                    variant: v.name.clone(),
                    phase,
                    round: round + 1,
                    source,
                })?;
                let elapsed = start.elapsed();
                if record {
                    samples[i].push(elapsed.as_secs_f64() * 1e3);
                }
            }
            if (round + 1) % 10 == 0 || round + 1 == rounds {
                tracing::info!("{phase} round {}/{rounds} done", round + 1);
            }
        }
    }

    let times = variants
        .iter()
        .zip(samples)
        .map(|(v, s)| VariantTimes {
            name: v.name.clone(),
            command: v.command.clone(),
            samples_ms: s,
        })
        .collect();
    Ok(Timings {
        rounds: plan.rounds,
        warmup: plan.warmup,
        baseline: baseline_name,
        variants: summarize(times, baseline),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[test]
    fn rounds_rotate_and_run_numbers_are_unique() {
        let log = RefCell::new(Vec::new());
        let mut variants: Vec<Variant<'_>> = ["a", "b", "c"]
            .into_iter()
            .map(|name| {
                let log = &log;
                Variant::new(name, name, move |n| {
                    log.borrow_mut().push((name, n));
                    Ok(())
                })
            })
            .collect();
        let plan = Plan {
            rounds: 3,
            warmup: 1,
            baseline: Some("b".into()),
        };
        let t = run(&mut variants, &plan).unwrap();
        let order: Vec<&str> = log.borrow().iter().map(|(name, _)| *name).collect();
        // Warm-up round 0, then measured rounds 0, 1, 2.
        assert_eq!(
            order,
            ["a", "b", "c", "a", "b", "c", "b", "c", "a", "c", "a", "b"]
        );
        let numbers: Vec<u64> = log.borrow().iter().map(|(_, n)| *n).collect();
        assert_eq!(numbers, (1..=12).collect::<Vec<_>>());
        assert_eq!(t.baseline, "b");
        assert!(t.variants.iter().all(|v| v.summary.runs == 3));
    }

    #[test]
    fn a_failure_aborts_with_its_stderr() {
        let mut variants = vec![
            Variant::shell("ok", "true"),
            Variant::shell("bad", "echo broken {n} >&2; exit 3"),
        ];
        let plan = Plan {
            rounds: 5,
            warmup: 0,
            baseline: None,
        };
        let err = run(&mut variants, &plan).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"bad\""), "{text}");
        assert!(text.contains("broken 2"), "{text}");
        assert!(text.contains("exit status: 3"), "{text}");
    }

    #[test]
    fn baseline_must_be_a_variant() {
        assert_eq!(baseline_index(&["x", "y"], None).unwrap(), 0);
        assert_eq!(baseline_index(&["x", "y"], Some("y")).unwrap(), 1);
        let err = baseline_index(&["x", "y"], Some("z")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "baseline \"z\" is not a variant; variants are: x, y"
        );
        assert!(matches!(
            baseline_index(&[], None),
            Err(RunnerError::NoVariants)
        ));
    }

    #[test]
    fn ratios_divide_medians_by_the_baselines() {
        let times = vec![
            VariantTimes {
                name: "base".into(),
                command: String::new(),
                samples_ms: vec![10.0, 20.0, 30.0],
            },
            VariantTimes {
                name: "fast".into(),
                command: String::new(),
                samples_ms: vec![5.0, 10.0, 100.0],
            },
        ];
        let r = summarize(times, 0);
        assert_eq!(r[0].ratio_to_baseline, 1.0);
        assert_eq!(r[1].ratio_to_baseline, 0.5);
    }

    #[test]
    fn rebased_ratios_divide_by_each_variants_own_baseline() {
        let times = ["a1", "b1", "a2", "b2"]
            .iter()
            .zip([10.0, 5.0, 40.0, 10.0])
            .map(|(name, ms)| VariantTimes {
                name: name.to_string(),
                command: String::new(),
                samples_ms: vec![ms],
            })
            .collect();
        let mut t = Timings {
            rounds: 1,
            warmup: 0,
            baseline: "a1".into(),
            variants: summarize(times, 0),
        };
        rebase(&mut t, &[0, 0, 2, 2], "a of the same number");
        let ratios: Vec<f64> = t.variants.iter().map(|v| v.ratio_to_baseline).collect();
        assert_eq!(ratios, [1.0, 0.5, 1.0, 0.25]);
        assert_eq!(t.baseline, "a of the same number");
    }

    #[test]
    fn run_numbers_expand() {
        assert_eq!(
            expand_run_number("ctr run x id-{n} {n}", 7),
            "ctr run x id-7 7"
        );
        assert_eq!(expand_run_number("true", 7), "true");
    }
}

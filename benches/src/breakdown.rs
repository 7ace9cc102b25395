//! Where one lifecycle's time goes: `ctr run --rm busybox true` step by step, for each
//! runtime, from the moment `ctr` is spawned to its exit.
//!
//! - HyperBox's shims mark each step in the timeline file containerd's environment names
//!   (`HYPERBOX_TIMELINE`, see `hyperbox_shim_core::timeline`): the `start` process, the
//!   task server, the zygote.
//! - runc's shim has no such marks: what can be told of it comes from a `runc` wrapper first on
//!   containerd's `PATH` that logs each call's start and end
//!   ([`hyperbox_integration::containerd::Containerd::log_runc_calls`]). The wrapper costs
//!   runc.v2 a bash start per call (about 1 ms each), so the totals here are not the
//!   benchmark's figures: `ctr-run` without `--breakdown` gives those.
//!
//! Each step's time is its median over the rounds, as an offset from `ctr`'s spawn; the
//! "since" column is the median of the gaps between that step and the one before it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hyperbox_integration::containerd::{Containerd, ContainerdVersion};
use hyperbox_integration::images::TestImage;
use hyperbox_integration::testbed::TestBed;
use serde::Serialize;

use crate::engines::RUNC_V2;
use crate::machine::Machine;
use crate::stats::median;

/// The environment variable the shims read (`hyperbox_shim_core::timeline::TIMELINE_ENV`).
const TIMELINE_ENV: &str = "HYPERBOX_TIMELINE";

/// One step of a lifecycle, as the report shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    pub step: String,
    /// Median offset from `ctr`'s spawn, ms.
    pub at_ms: f64,
    /// Median gap from the step before, ms.
    pub since_ms: f64,
    /// Rounds that had this step.
    pub rounds: usize,
}

/// The breakdown of one runtime on one containerd.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub runtime: String,
    pub containerd: String,
    pub rounds: usize,
    pub steps: Vec<StepRow>,
}

/// The whole report.
#[derive(Debug, Serialize)]
pub struct BreakdownReport {
    pub benchmark: String,
    pub command_line: String,
    pub machine: Machine,
    pub breakdowns: Vec<Breakdown>,
}

impl BreakdownReport {
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("# {}\n", self.command_line));
        for b in &self.breakdowns {
            out.push_str(&format!(
                "\n{} on containerd {}: `ctr run --rm busybox true`, median of {} rounds\n",
                b.runtime, b.containerd, b.rounds
            ));
            out.push_str(&format!(
                "  {:<28} {:>9} {:>9}\n",
                "step", "at ms", "since ms"
            ));
            for s in &b.steps {
                let partial = if s.rounds < b.rounds {
                    format!("  (in {} rounds)", s.rounds)
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  {:<28} {:>9.2} {:>9.2}{partial}\n",
                    s.step, s.at_ms, s.since_ms
                ));
            }
        }
        out
    }
}

/// A timestamped step of one round.
#[derive(Debug, Clone, PartialEq)]
struct Mark {
    step: String,
    t_us: u64,
}

/// One round of one variant: when `ctr` was spawned and exited, and the container's id.
#[derive(Debug)]
struct Round {
    runtime: String,
    id: String,
    t0_us: u64,
    t1_us: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The steps of container `id` in a shim timeline: its own lines, and the id-less lines
/// (Shutdown) of the processes that wrote one of its lines.
fn timeline_marks(text: &str, id: &str) -> Vec<Mark> {
    #[derive(serde::Deserialize)]
    struct Line {
        t_us: u64,
        pid: u32,
        step: String,
        id: String,
    }
    let lines: Vec<Line> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let pids: Vec<u32> = lines.iter().filter(|l| l.id == id).map(|l| l.pid).collect();
    let mut marks: Vec<Mark> = lines
        .into_iter()
        .filter(|l| l.id == id || (l.id.is_empty() && pids.contains(&l.pid)))
        .map(|l| Mark {
            step: l.step,
            t_us: l.t_us,
        })
        .collect();
    marks.sort_by_key(|m| m.t_us);
    marks
}

/// runc's subcommands, to find the one a logged call ran among its flags.
const RUNC_COMMANDS: [&str; 11] = [
    "create", "start", "delete", "kill", "state", "exec", "ps", "update", "pause", "resume",
    "events",
];

/// The steps of container `id` in the runc wrapper's log (`T0 T1 STATUS ARGS...`): a begin
/// and an end per call whose last argument is the id.
fn runc_marks(text: &str, id: &str) -> Vec<Mark> {
    let mut marks = Vec::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (Some(t0), Some(t1), Some(_rc)) = (w.next(), w.next(), w.next()) else {
            continue;
        };
        let (Ok(t0), Ok(t1)) = (t0.parse::<u64>(), t1.parse::<u64>()) else {
            continue;
        };
        let args: Vec<&str> = w.collect();
        if args.last() != Some(&id) {
            continue;
        }
        let Some(cmd) = args.iter().find(|a| RUNC_COMMANDS.contains(a)) else {
            continue;
        };
        marks.push(Mark {
            step: format!("runc {cmd}.begin"),
            t_us: t0,
        });
        marks.push(Mark {
            step: format!("runc {cmd}.end"),
            t_us: t1,
        });
    }
    marks.sort_by_key(|m| m.t_us);
    marks
}

/// Steps named once each per round: a repeated step (e.g. a second Delete) is numbered.
fn numbered(marks: Vec<Mark>) -> Vec<Mark> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    marks
        .into_iter()
        .map(|m| {
            let n = seen.entry(m.step.clone()).or_default();
            *n += 1;
            let step = if *n == 1 {
                m.step
            } else {
                format!("{} #{n}", m.step)
            };
            Mark { step, t_us: m.t_us }
        })
        .collect()
}

/// Medians over `rounds` (each: t0 and its marks, `ctr exit` last): each step's offset from
/// t0, the steps in the order of those medians, and the gap from the step before it in that
/// order (within each round that had both).
fn summarise(rounds: &[(u64, Vec<Mark>)]) -> Vec<StepRow> {
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        median(v).unwrap_or(0.0)
    };
    let mut at: HashMap<&str, Vec<f64>> = HashMap::new();
    for (t0, marks) in rounds {
        for m in marks {
            at.entry(m.step.as_str())
                .or_default()
                .push(m.t_us.saturating_sub(*t0) as f64 / 1000.0);
        }
    }
    let mut rows: Vec<StepRow> = at
        .into_iter()
        .map(|(step, mut v)| StepRow {
            step: step.to_string(),
            rounds: v.len(),
            at_ms: med(&mut v),
            since_ms: 0.0,
        })
        .collect();
    rows.sort_by(|a, b| {
        a.at_ms
            .total_cmp(&b.at_ms)
            .then_with(|| a.step.cmp(&b.step))
    });
    let mut since: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (t0, marks) in rounds {
        let by_step: HashMap<&str, u64> = marks.iter().map(|m| (m.step.as_str(), m.t_us)).collect();
        let mut prev = *t0;
        for (i, row) in rows.iter().enumerate() {
            let Some(&t) = by_step.get(row.step.as_str()) else {
                continue;
            };
            since
                .entry(i)
                .or_default()
                .push((t as f64 - prev as f64) / 1000.0);
            prev = t;
        }
    }
    for (i, row) in rows.iter_mut().enumerate() {
        if let Some(v) = since.get_mut(&i) {
            row.since_ms = med(v);
        }
    }
    rows
}

/// Runs the breakdown on each of `versions` for each of `runtimes`, `rounds` measured rounds
/// after `warmup`, interleaved.
pub fn run(
    versions: &[ContainerdVersion],
    runtimes: &[String],
    rounds: usize,
    warmup: usize,
    command_line: String,
) -> anyhow::Result<BreakdownReport> {
    if rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let mut machine = Machine::collect(None);
    let mut breakdowns = Vec::new();
    for &v in versions {
        let scratch = tempdir(v)?;
        let timeline = scratch.join("timeline.jsonl");
        let runc_log = scratch.join("runc-calls.log");
        let builder = Containerd::builder(v).with_env(TIMELINE_ENV, &timeline.to_string_lossy());
        let bed =
            TestBed::with_builder(builder).with_context(|| format!("preparing containerd {v}"))?;
        machine.locate_runc(bed.containerd.path_env());
        let image = bed.image(TestImage::Busybox)?;
        for rt in runtimes {
            if rt != RUNC_V2 && !bed.containerd.runtimes().iter().any(|r| r == rt) {
                bail!("runtime {rt} is not registered with containerd {v} (is its shim built?)");
            }
        }
        bed.containerd.log_runc_calls(&runc_log)?;
        let fifo = bed.containerd.dir().join("fifo");
        let mut done: Vec<Round> = Vec::new();
        for n in 0..warmup + rounds {
            for (ri, rt) in runtimes.iter().enumerate() {
                let id = format!("bd-{n}-{ri}");
                let mut cmd = bed.containerd.ctr();
                cmd.args(["run", "--rm", "--fifo-dir"]).arg(&fifo).args([
                    "--runtime",
                    rt,
                    &image,
                    &id,
                    "true",
                ]);
                let t0_us = now_us();
                let out = cmd.output().context("running ctr")?;
                let t1_us = now_us();
                if !out.status.success() {
                    bail!(
                        "ctr run through {rt} on containerd {v} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                if n >= warmup {
                    done.push(Round {
                        runtime: rt.clone(),
                        id,
                        t0_us,
                        t1_us,
                    });
                }
            }
        }
        let timeline_text = fs::read_to_string(&timeline).unwrap_or_default();
        let runc_text = fs::read_to_string(&runc_log).unwrap_or_default();
        for rt in runtimes {
            let per_round: Vec<(u64, Vec<Mark>)> = done
                .iter()
                .filter(|r| &r.runtime == rt)
                .map(|r| {
                    let mut marks = if rt == RUNC_V2 {
                        runc_marks(&runc_text, &r.id)
                    } else {
                        timeline_marks(&timeline_text, &r.id)
                    };
                    marks.push(Mark {
                        step: "ctr exit".into(),
                        t_us: r.t1_us,
                    });
                    (r.t0_us, numbered(marks))
                })
                .collect();
            if per_round.iter().all(|(_, m)| m.len() <= 1) {
                tracing::warn!(runtime = rt, "no steps recorded for this runtime");
            }
            breakdowns.push(Breakdown {
                runtime: rt.clone(),
                containerd: v.as_str().to_string(),
                rounds: per_round.len(),
                steps: summarise(&per_round),
            });
        }
        drop(bed);
        let _ = fs::remove_dir_all(&scratch);
    }
    machine.finish();
    Ok(BreakdownReport {
        benchmark: "ctr-run-breakdown".into(),
        command_line,
        machine,
        breakdowns,
    })
}

/// A private directory for one containerd's timeline and runc log.
fn tempdir(v: ContainerdVersion) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "hyperbox-breakdown-{}-{}",
        v.as_str(),
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    set_private(&dir)?;
    Ok(dir)
}

fn set_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_lines_of_a_container_and_its_processes_id_less_steps() {
        let text = r#"{"t_us":100,"pid":1,"step":"start.main","id":"a"}
{"t_us":105,"pid":2,"step":"serve.main","id":"a"}
{"t_us":107,"pid":3,"step":"serve.main","id":"b"}
not json
{"t_us":120,"pid":2,"step":"shutdown","id":""}
{"t_us":121,"pid":3,"step":"shutdown","id":""}
{"t_us":110,"pid":2,"step":"create.begin","id":"a"}"#;
        let steps: Vec<(String, u64)> = timeline_marks(text, "a")
            .into_iter()
            .map(|m| (m.step, m.t_us))
            .collect();
        assert_eq!(
            steps,
            [
                ("start.main".to_string(), 100),
                ("serve.main".to_string(), 105),
                ("create.begin".to_string(), 110),
                ("shutdown".to_string(), 120)
            ]
        );
    }

    #[test]
    fn runc_calls_become_begin_and_end_steps_of_their_container() {
        let text = "10 20 0 --root /run/x --log /l --log-format json create --bundle /b \
                    --pid-file /p a\n30 35 0 --root /run/x start a\n40 41 0 --root /r state b\n\
                    50 60 0 --root /run/x delete a\ngarbage\n";
        let steps: Vec<String> = runc_marks(text, "a").into_iter().map(|m| m.step).collect();
        assert_eq!(
            steps,
            [
                "runc create.begin",
                "runc create.end",
                "runc start.begin",
                "runc start.end",
                "runc delete.begin",
                "runc delete.end"
            ]
        );
    }

    #[test]
    fn medians_per_step_with_gaps_and_missing_steps() {
        let mark = |s: &str, t| Mark {
            step: s.into(),
            t_us: t,
        };
        let rounds = vec![
            (
                1000,
                vec![mark("a", 2000), mark("b", 4000), mark("ctr exit", 5000)],
            ),
            (1000, vec![mark("a", 3000), mark("ctr exit", 7000)]),
            (
                1000,
                vec![mark("a", 4000), mark("b", 6000), mark("ctr exit", 9000)],
            ),
        ];
        let rows = summarise(&rounds);
        let names: Vec<&str> = rows.iter().map(|r| r.step.as_str()).collect();
        assert_eq!(names, ["a", "b", "ctr exit"]);
        assert_eq!(rows[0].at_ms, 2.0);
        assert_eq!(rows[1].rounds, 2);
        assert_eq!(rows[1].at_ms, 4.0);
        assert_eq!(rows[1].since_ms, 2.0);
        assert_eq!(rows[2].at_ms, 6.0);
        assert_eq!(rows[2].since_ms, 3.0);
    }

    #[test]
    fn repeated_steps_are_numbered() {
        let m = |s: &str| Mark {
            step: s.into(),
            t_us: 0,
        };
        let steps: Vec<String> = numbered(vec![m("wait.begin"), m("wait.begin"), m("x")])
            .into_iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(steps, ["wait.begin", "wait.begin #2", "x"]);
    }
}

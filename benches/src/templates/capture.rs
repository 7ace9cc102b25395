//! Capturing a workload's template before the rounds, and sending it through the test bed's
//! registry (`templates push`, then `templates pull` under another name).

use std::time::{Duration, Instant};

use anyhow::Context;
use hyperbox_integration::workloads::{get_in_network, PY_SERVICE_PORT};

use crate::engines::HYPERBOX_V1;

use super::bench::{run_args, Bench, Netns, Workload};
use super::parse::{parse_pushed, size_bytes};
use super::results::{Capture, Distribution};
use super::{CAPTURE, DISTRIBUTION_LIMIT, PULLED_NAME, SHIM};

impl Bench {
    /// Pushes template `name` to the test bed's registry and pulls it back into the same
    /// store as [`PULLED_NAME`], both timed.
    pub(super) fn distribute(&self, name: &str) -> anyhow::Result<Distribution> {
        let c = self.containerd();
        let ns = c.namespace();
        let target = self
            .engine
            .bed
            .registry
            .reference(&format!("hyperbox-templates/{name}:bench"));
        let (said, push_ms) = self.shim_templates("push", &[name, &target], DISTRIBUTION_LIMIT)?;
        let pushed = parse_pushed(&said).with_context(|| {
            format!("{SHIM} templates push {name} {target} did not say what it pushed: {said:?}")
        })?;
        tracing::info!(
            template = name,
            reference = pushed.reference,
            digest = pushed.digest,
            size = pushed.size,
            push_ms,
            "template pushed"
        );
        // Pinned: exactly what was pushed.
        let pinned = format!("{}@{}", pushed.reference, pushed.digest);
        let (said, pull_ms) =
            self.shim_templates("pull", &[&pinned, PULLED_NAME], DISTRIBUTION_LIMIT)?;
        if !self
            .store()
            .join(PULLED_NAME)
            .join("template.json")
            .is_file()
        {
            return Err(self.fail(format!(
                "{SHIM} templates pull {pinned} {PULLED_NAME} said {said:?} but left no \
                 template {PULLED_NAME}"
            )));
        }
        let record = self.inspect(PULLED_NAME)?;
        let pulled_bytes = record["bytes"]
            .as_u64()
            .with_context(|| format!("templates inspect {PULLED_NAME} gives no bytes: {record}"))?;
        tracing::info!(
            template = PULLED_NAME,
            pull_ms,
            pulled_bytes,
            "template pulled"
        );
        Ok(Distribution {
            template: name.to_string(),
            push_command: format!("{SHIM} templates push -n {ns} {name} {target}"),
            push_ms,
            pushed_bytes: size_bytes(&pushed.size),
            reference: pushed.reference,
            digest: pushed.digest,
            pushed_size: pushed.size,
            pull_command: format!("{SHIM} templates pull -n {ns} {pinned} {PULLED_NAME}"),
            pull_ms,
            pulled: PULLED_NAME.to_string(),
            pulled_bytes,
            record,
        })
    }

    /// Captures the template of `w` (not timed as a variant) and removes its container.
    pub(super) fn capture(&self, w: &Workload<'_>) -> anyhow::Result<Capture> {
        let name = format!("{}-tpl", w.tag);
        let id = format!("{}-capture", w.tag);
        let netns = Netns::new(self.containerd(), &id)?;
        let annotations = [(CAPTURE, name.as_str()), w.ready];
        let args = run_args(
            HYPERBOX_V1,
            Some(&netns.0),
            &annotations,
            w.image,
            &id,
            &w.cmd,
        );
        // Not asked anything until it is kept: a connection still waiting to be accepted
        // when the capture starts makes CRIU refuse the dump ("In-flight connections").
        let since = Instant::now();
        let (child, shown) = self.spawn_ctr(&args)?;
        self.finish_ctr(child, &shown)?;
        let kept_ms = self.wait_template(&name, since)?;
        let body = get_in_network(&netns.0, PY_SERVICE_PORT, Duration::from_secs(10))
            .map_err(|e| self.fail(format!("the captured {id} does not answer: {e}")))?;
        let record = self.inspect(&name)?;
        let bytes = record["bytes"]
            .as_u64()
            .with_context(|| format!("templates inspect {name} gives no bytes: {record}"))?;
        tracing::info!(template = name, kept_ms, bytes, "template kept");
        self.remove(&id)?;
        netns.remove()?;
        Ok(Capture {
            name,
            readiness: format!("{}={}", w.ready.0, w.ready.1),
            kept_ms,
            bytes,
            body,
            record,
        })
    }
}

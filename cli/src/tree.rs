//! `rollout watch` on a terminal: a compact tree (the rollout, each step
//! with a progress bar) redrawn in place under the event log, like
//! `kubectl argo rollouts get rollout --watch`. Piped, the watch prints
//! plain lines instead (see `rollout_cmd::watch`): no escape codes in files.

use std::io::Write;

use hotfleet_proto::v1::Rollout;

use crate::rollout_cmd::{now_doing, phase_name};

const BAR: usize = 10;

/// The tree for one snapshot.
pub fn render(r: &Rollout) -> Vec<String> {
    let doing = now_doing(r).map(|d| format!("  ({d})")).unwrap_or_default();
    let mut lines = vec![format!("{}  {}{doing}", r.rollout_id, phase_name(r.phase).to_uppercase())];
    for (i, step) in r.steps.iter().enumerate() {
        let total = step.node_ids.len();
        // A finished rollout read from the store may come without node states: its steps say.
        let done = if r.nodes.is_empty() && step.state == "done" {
            total
        } else {
            r.nodes.iter().filter(|n| n.step == step.name && n.observed == "committed").count()
        };
        let filled = (done * BAR).checked_div(total).unwrap_or(0);
        let branch = if i + 1 == r.steps.len() { "└─" } else { "├─" };
        let gate = if step.pause_before { "  [manual gate]" } else { "" };
        lines.push(format!(
            "{branch} {:<8} [{}{}] {done}/{total}  {}{gate}",
            step.name,
            "#".repeat(filled),
            "-".repeat(BAR - filled),
            step.state
        ));
    }
    lines
}

/// Redraws the tree in place: events printed since go above it and stay.
#[derive(Default)]
pub struct Redraw {
    drawn: usize,
}

impl Redraw {
    pub fn show(&mut self, events: &[String], tree: &[String]) {
        let mut out = std::io::stdout().lock();
        let mut text = String::new();
        if self.drawn > 0 {
            // Cursor up over the last tree, then clear to the end of the screen.
            text.push_str(&format!("\x1b[{}A\x1b[J", self.drawn));
        }
        for line in events.iter().chain(tree) {
            text.push_str(line);
            text.push('\n');
        }
        // A closed terminal ends the CLI by SIGPIPE (see main); nothing to handle here.
        let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
        self.drawn = tree.len();
    }
}

#[cfg(test)]
mod tests {
    use hotfleet_proto::v1::{NodeRolloutStatus, RolloutPhase, RolloutStep};

    use super::*;

    #[test]
    fn each_step_shows_its_committed_share() {
        let step = |name: &str, nodes: &[&str], state: &str, gate: bool| RolloutStep {
            name: name.into(),
            node_ids: nodes.iter().map(|n| n.to_string()).collect(),
            state: state.into(),
            pause_before: gate,
        };
        let node = |id: &str, step: &str, observed: &str| NodeRolloutStatus {
            node_id: id.into(),
            step: step.into(),
            observed: observed.into(),
            ..Default::default()
        };
        let r = Rollout {
            rollout_id: "ro-1-1".into(),
            phase: RolloutPhase::Waiting as i32,
            waiting_reason: "manual gate before wave-2 (hotfleet rollout promote)".into(),
            steps: vec![
                step("canary", &["a"], "done", false),
                step("wave-1", &["b", "c"], "committing", false),
                step("wave-2", &["d"], "pending", true),
            ],
            nodes: vec![
                node("a", "canary", "committed"),
                node("b", "wave-1", "committed"),
                node("c", "wave-1", "prepared"),
            ],
            ..Default::default()
        };
        assert_eq!(
            render(&r),
            [
                "ro-1-1  WAITING  (waiting: manual gate before wave-2 (hotfleet rollout promote))",
                "├─ canary   [##########] 1/1  done",
                "├─ wave-1   [#####-----] 1/2  committing",
                "└─ wave-2   [----------] 0/1  pending  [manual gate]",
            ]
        );
    }
}

//! `rollout watch` on a terminal: a compact tree (the rollout, each step
//! with a progress bar) redrawn in place under the event log, like
//! `kubectl argo rollouts get rollout --watch`. Piped, the watch prints
//! plain lines instead (see `rollout_cmd::watch`): no escape codes in files.

use std::io::Write;

use hotfleet_proto::v1::Rollout;

use crate::rollout_cmd::{now_doing, phase_name};

const BAR: usize = 10;

/// The tree for one snapshot at `now_ms` (Unix ms): a pure function, so the
/// countdown can be redrawn between snapshots and tested without a terminal.
pub fn render(r: &Rollout, now_ms: u64) -> Vec<String> {
    let doing = now_doing(r, now_ms).map(|d| format!("  ({d})")).unwrap_or_default();
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
    drawn: Vec<String>,
}

impl Redraw {
    pub fn show(&mut self, events: &[String], tree: &[String]) {
        // A tick that changes nothing (no window running) draws nothing.
        if events.is_empty() && tree == self.drawn.as_slice() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let mut text = String::new();
        if !self.drawn.is_empty() {
            // Cursor up over the last tree, then clear to the end of the screen.
            text.push_str(&format!("\x1b[{}A\x1b[J", self.drawn.len()));
        }
        for line in events.iter().chain(tree) {
            text.push_str(line);
            text.push('\n');
        }
        // A closed terminal ends the CLI, as a closed pipe does (see `output`).
        if let Err(err) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            if err.kind() == std::io::ErrorKind::BrokenPipe {
                crate::output::stdout_closed();
            }
        }
        self.drawn = tree.to_vec();
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
            render(&r, 0),
            [
                "ro-1-1  WAITING  (waiting: manual gate before wave-2 (hotfleet rollout promote))",
                "├─ canary   [##########] 1/1  done",
                "├─ wave-1   [#####-----] 1/2  committing",
                "└─ wave-2   [----------] 0/1  pending  [manual gate]",
            ]
        );
    }

    #[test]
    fn the_health_window_counts_down_from_one_snapshot() {
        let r = Rollout {
            rollout_id: "ro-1-1".into(),
            phase: RolloutPhase::Watching as i32,
            window_ends_at_ms: 100_000,
            spec: Some(hotfleet_proto::v1::RolloutSpec { health_window_ms: 60_000, ..Default::default() }),
            steps: vec![RolloutStep {
                name: "canary".into(),
                node_ids: vec!["a".into()],
                state: "watching".into(),
                pause_before: false,
            }],
            ..Default::default()
        };
        // The same snapshot drawn at three instants: only the countdown moves.
        let head = |now| render(&r, now)[0].clone();
        assert_eq!(head(40_000), "ro-1-1  WATCHING  (health window 1m, 1m left)");
        assert_eq!(head(41_000), "ro-1-1  WATCHING  (health window 1m, 59s left)");
        assert_eq!(head(99_500), "ro-1-1  WATCHING  (health window 1m, 1s left)");
        assert_eq!(head(120_000), "ro-1-1  WATCHING  (health window 1m, 0s left)");
        assert_eq!(render(&r, 41_000)[1..], render(&r, 42_000)[1..], "the steps do not move");
    }
}

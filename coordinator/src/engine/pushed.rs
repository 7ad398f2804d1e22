//! Health pushed with heartbeats, for nodes whose own health window has
//! passed.
//!
//! Every heartbeat carries each process's health (counted from the process's
//! start), and an agent heartbeats at once when its patch stack changes, so
//! soon after a commit the coordinator holds a report of the patched
//! process. A node committed in an earlier step is judged from that report
//! instead of being polled again at the start and end of every later window
//! (which made health work grow with nodes x steps). A report is used only
//! when it is fresh (heard within `fresh_ms`) and shows this rollout's patch
//! on every baselined process's stack; anything else (a process missing, a
//! stale or pre-commit report) returns `None` and the node is polled as
//! before, so no health data still never passes.

use crate::{
    node::NodeStatus,
    rollout::{
        health::{Baseline, Sample},
        ProcessMap, RolloutKind,
    },
};

/// The newest pushed report about a node, as the registry holds it.
#[derive(Debug, Clone, Copy)]
pub struct Pushed<'a> {
    pub status: &'a NodeStatus,
    pub heard_at_ms: u64,
}

/// Samples (counted from `baselines`) for the health gate from a pushed
/// report, or `None` when the report cannot stand in for a poll.
pub fn samples(
    report: Pushed<'_>,
    baselines: &ProcessMap<Baseline>,
    patch_id: &str,
    kind: RolloutKind,
    now_ms: u64,
    fresh_ms: u64,
) -> Option<Vec<Sample>> {
    if baselines.is_empty() || now_ms.saturating_sub(report.heard_at_ms) > fresh_ms {
        return None;
    }
    let mut samples = Vec::with_capacity(baselines.len());
    for (process_id, base) in baselines {
        let process = report.status.processes.iter().find(|p| &p.process_id == process_id)?;
        // A report from before the commit says nothing about the change.
        if !kind.done_on(&process.patch_stack, patch_id) {
            return None;
        }
        let health = process.health.as_ref()?;
        samples.push(Sample {
            process_id: process_id.clone(),
            pid: process.pid,
            reachable: true,
            alive: health.alive,
            ticks_since: health.ticks,
            tick_p99_ms: health.tick_p99_ms,
            // Heartbeats count from the process's start; the baseline holds
            // the count at its mark.
            exceptions_since: health.exceptions_since.saturating_sub(base.exceptions_total),
            game_ok: health.game_ok,
            game_detail: health.game_detail.clone(),
            error: String::new(),
        });
    }
    Some(samples)
}

/// A pushed sample's ticks (counted from the process's start) counted from
/// its baseline mark instead, as a poll counts them. `None` when the process
/// restarted since its baseline (another pid) or the baseline has no tick count.
fn ticks_since_baseline(sample: &Sample, baselines: &ProcessMap<Baseline>) -> Option<u64> {
    let base = baselines.get(&sample.process_id).filter(|b| b.pid == sample.pid)?;
    sample.ticks_since.checked_sub(base.ticks_total?)
}

/// Each process's ticks since its baseline mark, from samples of a pushed
/// report ([`samples`]): the window's start without polling the node.
pub fn window_start(samples: &[Sample], baselines: &ProcessMap<Baseline>) -> Option<ProcessMap<u64>> {
    samples.iter().map(|s| Some((s.process_id.clone(), ticks_since_baseline(s, baselines)?))).collect()
}

/// Samples of a pushed report for a window's final check, their ticks
/// counted from the baseline like a poll's, only when every process ticked
/// since the window's start: a report that shows no tick there (too early,
/// or a stuck loop) is `None`, and a poll confirms it.
pub fn final_samples(
    samples: Vec<Sample>,
    baselines: &ProcessMap<Baseline>,
    window_start: &ProcessMap<u64>,
) -> Option<Vec<Sample>> {
    samples
        .into_iter()
        .map(|mut s| {
            let ticks = ticks_since_baseline(&s, baselines)?;
            if ticks <= *window_start.get(&s.process_id)? {
                return None;
            }
            s.ticks_since = ticks;
            Some(s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::node::{ProcessHealth, ProcessStatus};

    use super::*;

    fn baselines(exceptions_total: u64) -> ProcessMap<Baseline> {
        let base =
            Baseline { pid: 7, mark: 40, tick_p99_ms: 2.0, game_ok: true, exceptions_total, ticks_total: Some(420) };
        [("p1".to_string(), base)].into()
    }

    fn status(stack: &[&str], exceptions: u64) -> NodeStatus {
        let health = ProcessHealth {
            alive: true,
            ticks: 500,
            tick_p99_ms: 2.5,
            exceptions_since: exceptions,
            game_ok: true,
            ..Default::default()
        };
        let process = ProcessStatus {
            process_id: "p1".into(),
            pid: 7,
            patch_stack: stack.iter().map(|s| s.to_string()).collect(),
            health: Some(health),
            ..Default::default()
        };
        NodeStatus { node_id: "n1".into(), processes: vec![process], ..Default::default() }
    }

    /// The samples a report of `status` heard at 1 s gives at `now_ms` (fresh for 4 s).
    fn from(status: &NodeStatus, exceptions_total: u64, kind: RolloutKind, now_ms: u64) -> Option<Vec<Sample>> {
        samples(Pushed { status, heard_at_ms: 1_000 }, &baselines(exceptions_total), "b", kind, now_ms, 4_000)
    }

    #[test]
    fn a_fresh_report_with_the_patch_counts_exceptions_from_the_baseline() {
        let got = from(&status(&["a", "b"], 5), 3, RolloutKind::Apply, 1_500).expect("usable");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].exceptions_since, got[0].pid, got[0].alive, got[0].reachable), (2, 7, true, true));
    }

    #[test]
    fn a_stale_or_pre_commit_report_or_a_missing_process_means_a_poll() {
        let s = status(&["a", "b"], 0);
        assert!(from(&s, 0, RolloutKind::Apply, 6_000).is_none(), "stale");
        assert!(from(&status(&["a"], 0), 0, RolloutKind::Apply, 1_000).is_none(), "before the commit");
        let mut gone = status(&["a", "b"], 0);
        gone.processes[0].process_id = "p2".into();
        assert!(from(&gone, 0, RolloutKind::Apply, 1_000).is_none());
        let mut silent = status(&["a", "b"], 0);
        silent.processes[0].health = None;
        assert!(from(&silent, 0, RolloutKind::Apply, 1_000).is_none());
        let nothing = samples(
            Pushed { status: &s, heard_at_ms: 1_000 },
            &ProcessMap::new(),
            "b",
            RolloutKind::Apply,
            1_000,
            4_000,
        );
        assert!(nothing.is_none(), "no baseline");
        // A revert is done where the patch is gone: the report from before it says nothing.
        assert!(from(&status(&["a"], 0), 0, RolloutKind::Revert, 1_000).is_some());
        assert!(from(&s, 0, RolloutKind::Revert, 1_000).is_none());
    }

    #[test]
    fn a_report_after_the_commit_gives_the_window_start_counted_from_the_baseline() {
        let s = status(&["a", "b"], 0);
        let got = from(&s, 0, RolloutKind::Apply, 1_500).expect("usable");
        // 500 ticks since the start, 420 of them before the baseline.
        assert_eq!(window_start(&got, &baselines(0)), Some([("p1".to_string(), 80)].into()));
        let mut restarted = got.clone();
        restarted[0].pid = 8;
        assert_eq!(window_start(&restarted, &baselines(0)), None, "another process since the baseline");
        let mut old = baselines(0);
        old.get_mut("p1").expect("p1").ticks_total = None;
        assert_eq!(window_start(&got, &old), None, "a baseline without its tick count");
        let mut behind = got;
        behind[0].ticks_since = 10;
        assert_eq!(window_start(&behind, &baselines(0)), None, "a count below the baseline's is not this process's");
    }

    #[test]
    fn a_final_check_from_a_report_counts_ticks_from_the_baseline_and_needs_a_tick_in_the_window() {
        let got = from(&status(&["a", "b"], 0), 0, RolloutKind::Apply, 1_500).expect("usable");
        // 500 ticks since the start, 420 before the baseline: 80 since it.
        let start = |ticks: u64| -> ProcessMap<u64> { [("p1".to_string(), ticks)].into() };
        let judged = final_samples(got.clone(), &baselines(0), &start(30)).expect("ticked since 30");
        assert_eq!(judged[0].ticks_since, 80);
        assert_eq!(final_samples(got.clone(), &baselines(0), &start(80)), None, "no tick since the window's start");
        assert_eq!(final_samples(got.clone(), &ProcessMap::new(), &start(30)), None, "no baseline");
        assert_eq!(final_samples(got, &baselines(0), &ProcessMap::new()), None, "no window start");
    }
}

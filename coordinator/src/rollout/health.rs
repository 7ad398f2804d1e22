//! The health gate (pure): is a node healthy after its commit, compared with
//! the baseline taken just before?
//!
//! Per process, the gate fails on: the process gone (missing from the report,
//! unreachable or not alive, or a different pid), new unhandled exceptions
//! since the pre-commit mark, tick p99 worse than `factor x baseline` *and*
//! `baseline + floor` (the floor keeps a 0.3 ms idle server from flapping
//! on a 1 ms tick), the game's own `health()` turning bad, and, at the end of
//! the window, no tick completed during the window. The gate is honest: no
//! data is a failure, never a pass, and a node that had no process at its
//! commit (nothing ran the patch there) never passes.

use serde::{Deserialize, Serialize};

use super::ProcessMap;

/// Thresholds of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    pub p99_factor: f64,
    pub p99_floor_ms: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self { p99_factor: 3.0, p99_floor_ms: 20.0 }
    }
}

/// One process's figures just before commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub pid: u32,
    /// The runtime's mark; every later health query passes it back, so
    /// exceptions and ticks are counted from the commit on.
    pub mark: u64,
    pub tick_p99_ms: f64,
    pub game_ok: bool,
    /// Unhandled exceptions the process had counted at the mark: a report
    /// pushed with a heartbeat counts from the process's start, so this
    /// turns it into "since the baseline".
    #[serde(default)]
    pub exceptions_total: u64,
    /// Ticks the process had completed at the mark: turns a pushed report's
    /// count (from the process's start) into ticks since the baseline, so a
    /// report after the commit can stand for the window-start poll. `None`
    /// in baselines stored before it was kept: such a window start is polled.
    #[serde(default)]
    pub ticks_total: Option<u64>,
}

/// One process's figures as an agent reported them (since the baseline mark).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Sample {
    pub process_id: String,
    pub pid: u32,
    pub reachable: bool,
    pub alive: bool,
    pub ticks_since: u64,
    pub tick_p99_ms: f64,
    pub exceptions_since: u64,
    pub game_ok: bool,
    pub game_detail: String,
    pub error: String,
}

/// Whether this is a mid-window poll (fail fast on hard failures only) or the
/// end of the window (everything, including "no ticks in the window").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    Interim,
    Final,
}

/// The verdict on one node: empty = healthy; else one reason per problem.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn healthy(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn summary(&self) -> String {
        if self.problems.is_empty() {
            "ok".into()
        } else {
            self.problems.join("; ")
        }
    }
}

/// Judges a node. `baselines` and `window_start` are keyed by process id;
/// `window_start` holds each process's `ticks_since` at the window's start.
pub fn evaluate(
    config: &GateConfig,
    baselines: &ProcessMap<Baseline>,
    window_start: &ProcessMap<u64>,
    samples: &[Sample],
    check: Check,
) -> Verdict {
    let mut problems = Vec::new();
    if baselines.is_empty() {
        // No process at commit: its "health" could only be made up (a node
        // that registers with no process and answers every query healthy).
        problems.push("no game process on the node at commit: no health data, so the gate cannot pass".into());
        return Verdict { problems };
    }
    for (process_id, base) in baselines {
        let Some(s) = samples.iter().find(|s| &s.process_id == process_id) else {
            problems.push(format!("process {process_id} (pid {}) disappeared", base.pid));
            continue;
        };
        if !s.reachable {
            let why = if s.error.is_empty() { "disconnected".to_string() } else { s.error.clone() };
            problems.push(format!("process {process_id} unreachable: {why}"));
            continue;
        }
        if !s.alive || (s.pid != 0 && base.pid != 0 && s.pid != base.pid) {
            problems.push(format!("process {process_id} died (pid {} -> {})", base.pid, s.pid));
            continue;
        }
        if s.exceptions_since > 0 {
            problems.push(format!("process {process_id}: {} new unhandled exception(s)", s.exceptions_since));
        }
        let limit = (base.tick_p99_ms * config.p99_factor).max(base.tick_p99_ms + config.p99_floor_ms);
        if s.tick_p99_ms > limit {
            problems.push(format!(
                "process {process_id}: tick p99 {:.1} ms > {:.1} ms (baseline {:.1} ms x {} / +{} ms)",
                s.tick_p99_ms, limit, base.tick_p99_ms, config.p99_factor, config.p99_floor_ms
            ));
        }
        if !s.game_ok && base.game_ok {
            let detail = if s.game_detail.is_empty() { "no detail".to_string() } else { s.game_detail.clone() };
            problems.push(format!("process {process_id}: game health() failing: {detail}"));
        }
        if check == Check::Final {
            let start = window_start.get(process_id).copied().unwrap_or(0);
            if s.ticks_since <= start {
                problems.push(format!("process {process_id}: no tick completed in the health window (no health data)"));
            }
        }
    }
    Verdict { problems }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(p99: f64) -> ProcessMap<Baseline> {
        [(
            "p1".to_string(),
            Baseline { pid: 100, mark: 7, tick_p99_ms: p99, game_ok: true, exceptions_total: 0, ticks_total: None },
        )]
        .into()
    }

    fn sample() -> Sample {
        Sample {
            process_id: "p1".into(),
            pid: 100,
            reachable: true,
            alive: true,
            ticks_since: 50,
            tick_p99_ms: 2.0,
            exceptions_since: 0,
            game_ok: true,
            game_detail: String::new(),
            error: String::new(),
        }
    }

    fn judge(baseline_p99: f64, s: Sample, check: Check) -> Verdict {
        evaluate(&GateConfig::default(), &base(baseline_p99), &ProcessMap::new(), &[s], check)
    }

    #[test]
    fn healthy_process_passes() {
        assert!(judge(2.0, sample(), Check::Final).healthy());
        assert!(judge(2.0, sample(), Check::Interim).healthy());
    }

    #[test]
    fn missing_process_fails() {
        let v = evaluate(&GateConfig::default(), &base(2.0), &ProcessMap::new(), &[], Check::Interim);
        assert!(v.summary().contains("disappeared"), "{}", v.summary());
    }

    #[test]
    fn unreachable_or_dead_or_restarted_fails() {
        let v = judge(2.0, Sample { reachable: false, error: "socket closed".into(), ..sample() }, Check::Interim);
        assert!(v.summary().contains("socket closed"));
        assert!(!judge(2.0, Sample { alive: false, ..sample() }, Check::Interim).healthy());
        let v = judge(2.0, Sample { pid: 101, ..sample() }, Check::Interim);
        assert!(v.summary().contains("died"), "{}", v.summary());
    }

    #[test]
    fn new_exceptions_fail() {
        let v = judge(2.0, Sample { exceptions_since: 3, ..sample() }, Check::Interim);
        assert!(v.summary().contains("3 new unhandled"), "{}", v.summary());
    }

    #[test]
    fn p99_needs_both_factor_and_floor() {
        // 2 ms baseline: 3x = 6 ms, floor = 22 ms -> the floor decides.
        assert!(judge(2.0, Sample { tick_p99_ms: 15.0, ..sample() }, Check::Final).healthy());
        assert!(!judge(2.0, Sample { tick_p99_ms: 23.0, ..sample() }, Check::Final).healthy());
        // 30 ms baseline: 3x = 90 ms beats the floor (50 ms).
        assert!(judge(30.0, Sample { tick_p99_ms: 80.0, ..sample() }, Check::Final).healthy());
        assert!(!judge(30.0, Sample { tick_p99_ms: 95.0, ..sample() }, Check::Final).healthy());
        // A zero baseline (no ticks measured before) still has the floor.
        assert!(judge(0.0, Sample { tick_p99_ms: 19.0, ..sample() }, Check::Final).healthy());
        assert!(!judge(0.0, Sample { tick_p99_ms: 21.0, ..sample() }, Check::Final).healthy());
    }

    #[test]
    fn custom_thresholds_apply() {
        let cfg = GateConfig { p99_factor: 1.5, p99_floor_ms: 1.0 };
        let v =
            evaluate(&cfg, &base(10.0), &ProcessMap::new(), &[Sample { tick_p99_ms: 16.0, ..sample() }], Check::Final);
        assert!(!v.healthy());
    }

    #[test]
    fn game_health_regression_fails_but_preexisting_failure_is_not_blamed_on_the_patch() {
        let bad = Sample { game_ok: false, game_detail: "db pool exhausted".into(), ..sample() };
        let v = judge(2.0, bad.clone(), Check::Interim);
        assert!(v.summary().contains("db pool exhausted"));
        let mut was_bad = base(2.0);
        if let Some(b) = was_bad.get_mut("p1") {
            b.game_ok = false;
        }
        assert!(evaluate(&GateConfig::default(), &was_bad, &ProcessMap::new(), &[bad], Check::Final).healthy());
    }

    #[test]
    fn no_ticks_in_window_fails_only_at_the_end() {
        let idle = Sample { ticks_since: 10, ..sample() };
        let start: ProcessMap<u64> = [("p1".to_string(), 10)].into();
        assert!(
            evaluate(&GateConfig::default(), &base(2.0), &start, std::slice::from_ref(&idle), Check::Interim).healthy()
        );
        let v = evaluate(&GateConfig::default(), &base(2.0), &start, &[idle], Check::Final);
        assert!(v.summary().contains("no health data"), "{}", v.summary());
        let none = Sample { ticks_since: 0, ..sample() };
        assert!(!judge(2.0, none, Check::Final).healthy());
    }

    #[test]
    fn every_problem_is_listed() {
        let s = Sample { exceptions_since: 1, tick_p99_ms: 100.0, game_ok: false, ticks_since: 0, ..sample() };
        assert_eq!(judge(2.0, s, Check::Final).problems.len(), 4);
    }

    #[test]
    fn a_node_without_processes_never_passes() {
        for check in [Check::Interim, Check::Final] {
            let v = evaluate(&GateConfig::default(), &ProcessMap::new(), &ProcessMap::new(), &[], check);
            assert!(v.summary().contains("no game process"), "{}", v.summary());
            // Made-up samples for processes that had no baseline change nothing.
            let v = evaluate(&GateConfig::default(), &ProcessMap::new(), &ProcessMap::new(), &[sample()], check);
            assert!(!v.healthy());
        }
    }
}

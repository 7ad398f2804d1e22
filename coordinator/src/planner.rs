//! The planner (pure): which nodes a rollout targets and in which steps.
//!
//! Input: the registered nodes, a selector, the patch's target build, the
//! canary size and the wave sizes. Output: ordered steps (`canary`, `wave-1`,
//! ...) and the nodes the selector matched but the plan left out, with why.
//! Same input, same plan: nodes are ordered by id, so a re-plan after a restart
//! or a dry run shows exactly what will happen.

use std::{collections::BTreeMap, fmt};

use serde::{Deserialize, Serialize};

pub use crate::selector::Selector;
use crate::{
    input::{self, excerpt, InputError},
    rollout::{RolloutSpec, Skipped, Step},
};

/// Why a spec cannot be planned; the message says what to change.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// A field beyond its bound (lengths, counts, number ranges).
    #[error(transparent)]
    Input(#[from] InputError),
    /// `selector` is already an [`excerpt`] of what was sent.
    #[error("invalid selector {selector}: {reason} (use \"all\", or requirements joined by commas: k=v, k!=v, k in (a,b), k notin (a,b), k, !k)")]
    Selector { selector: String, reason: String },
    /// `text` is already an [`excerpt`] of what was sent.
    #[error("invalid size {text}: {reason} (use a count like \"2\" or a percent like \"25%\")")]
    Size { text: String, reason: String },
    #[error(
        "the selector {} matches no live node running build {build} (check `hotfleet nodes list`)",
        excerpt(selector)
    )]
    NoTargets { selector: String, build: String },
    /// `why` is empty, or says how the waves were merged on this fleet.
    #[error("unknown step {} in pause-before; this plan's steps are: {steps}{why}", excerpt(name))]
    UnknownStep { name: String, steps: String, why: String },
    #[error("tick_p99_factor {0} must be >= 1.0")]
    P99Factor(f64),
    #[error("tick_p99_floor_ms {0} must be >= 0")]
    P99Floor(f64),
    #[error(
        "prepare TTL {ttl_s}s is shorter than {heartbeats} heartbeat intervals ({min_ms} ms at --heartbeat-interval {interval_ms} ms): \
         agents renew a rollout's prepares on each heartbeat answer, so the TTL is how long they keep a prepare after the \
         coordinator goes silent, not how long the rollout may take; give --prepare-ttl of at least {min_s}s (or leave it out \
         for the agents' default)"
    )]
    PrepareTtl { ttl_s: u32, heartbeats: u32, interval_ms: u64, min_ms: u64, min_s: u64 },
    #[error("start time {at} is in the past (now {now}); give a time to come, or leave --at out to start now")]
    StartInPast { at: String, now: String },
    #[error("start time {at} is more than a year away; schedule it closer")]
    StartTooFar { at: String },
    #[error(transparent)]
    Window(#[from] crate::rollout::window::WindowError),
}

/// A step size: an absolute count or a percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Size {
    Count(u32),
    Percent(f64),
}

impl Size {
    pub fn parse(text: &str) -> Result<Self, PlanError> {
        input::text("size", text, input::MAX_SIZE_TEXT)?;
        let t = text.trim();
        let err = |reason: &str| PlanError::Size { text: excerpt(text), reason: reason.to_string() };
        if let Some(pct) = t.strip_suffix('%') {
            let value: f64 = pct.trim().parse().map_err(|_| err("not a number"))?;
            if !(value.is_finite() && value > 0.0 && value <= 100.0) {
                return Err(err("a percent must be in (0, 100]"));
            }
            Ok(Size::Percent(value))
        } else {
            let value: u32 = t.parse().map_err(|_| err("not a whole number"))?;
            Ok(Size::Count(value))
        }
    }

    /// Nodes out of `total`: percents round up, so "1%" of a small fleet is
    /// still one node rather than zero.
    fn of(self, total: usize) -> usize {
        match self {
            Size::Count(n) => (n as usize).min(total),
            Size::Percent(p) => (((total as f64) * p / 100.0).ceil() as usize).min(total),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size::Count(n) => write!(f, "{n}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What the planner needs to know about a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    /// Builds the node's processes run (plus its `build` label, if any).
    pub builds: Vec<String>,
    pub alive: bool,
    /// Whether the node reported any game process (runtime session): a node
    /// without one has nothing to patch and nothing to judge health by.
    pub has_processes: bool,
}

/// The planner's answer: the steps the rollout runs, in order (manual
/// gates marked), and the matched nodes it leaves out, with why.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub skipped: Vec<Skipped>,
    /// How the requested waves were merged on a fleet too small for them
    /// (each wave keeps its requested number, so `wave-2` always means the
    /// second wave asked for, and a merged one is absent, not renamed).
    pub merged: Vec<String>,
}

impl Plan {
    pub fn targets(&self) -> impl Iterator<Item = &String> {
        self.steps.iter().flat_map(|s| s.nodes.iter())
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// Plans a rollout of `spec` on build `build`: validates the whole spec
/// ([`RolloutSpec::validate`]: bounds, the health gate's thresholds, every pause-before naming a step of this plan) and
/// returns the steps with their manual gates.
pub fn plan(candidates: &[Candidate], spec: &RolloutSpec, build: &str) -> Result<Plan, PlanError> {
    spec.validate()?;
    let mut plan = select(candidates, &spec.selector, build, spec.canary, &spec.waves)?;
    for name in &spec.pause_before {
        if plan.step_index(name).is_none() {
            let steps: Vec<&str> = plan.steps.iter().map(|s| s.name.as_str()).collect();
            let prefix = format!("{name} ");
            let why =
                plan.merged.iter().find(|m| m.starts_with(&prefix)).map(|m| format!(" ({m})")).unwrap_or_default();
            return Err(PlanError::UnknownStep { name: name.clone(), steps: steps.join(", "), why });
        }
    }
    for step in &mut plan.steps {
        step.pause_before = spec.pause_before.contains(&step.name);
    }
    Ok(plan)
}

/// Which nodes, in which steps (no manual gates yet).
///
/// Targets: nodes matching `selector`, alive, with at least one game
/// process, and running `build` (a node whose processes report no build is
/// included: its agent refuses a wrong build at prepare, which aborts
/// safely). A node without processes is never a target, so never a canary:
/// nothing there would run the patch, and its health could only be made up
/// (drift repair patches it once a process attaches). Canary: the
/// first `canary` targets. Waves cover the rest: a count is "that many more
/// nodes", a percent is "up to that share of the non-canary targets"
/// (cumulative, so `25%,50%,100%` are three growing stages); nodes left after
/// the last entry form one final wave. Empty steps are dropped.
fn select(
    candidates: &[Candidate],
    selector: &Selector,
    build: &str,
    canary: Size,
    waves: &[Size],
) -> Result<Plan, PlanError> {
    let mut sorted: Vec<&Candidate> = candidates.iter().filter(|c| selector.matches(&c.labels)).collect();
    sorted.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for c in sorted {
        if !c.alive {
            skipped.push(Skipped { node_id: c.node_id.clone(), reason: "lost (missed heartbeats)".to_string() });
        } else if !c.has_processes {
            let reason = "no game process attached (nothing to patch; drift repair patches it once one attaches)";
            skipped.push(Skipped { node_id: c.node_id.clone(), reason: reason.to_string() });
        } else if !c.builds.is_empty() && !c.builds.iter().any(|b| b == build) {
            let reason = format!("runs build {}, not {build}", c.builds.join(","));
            skipped.push(Skipped { node_id: c.node_id.clone(), reason });
        } else {
            targets.push(c.node_id.clone());
        }
    }
    if targets.is_empty() {
        return Err(PlanError::NoTargets { selector: selector.to_string(), build: build.to_string() });
    }

    let mut steps = Vec::new();
    let canary_n = canary.of(targets.len());
    let rest = targets.split_off(canary_n);
    if !targets.is_empty() {
        steps.push(Step { name: "canary".into(), nodes: targets, pause_before: false });
    }

    // Wave i keeps the name wave-i; one that adds no node on this fleet is merged away, and said so.
    let mut done = 0usize;
    let mut wave_sizes = Vec::new();
    let mut empty = Vec::new();
    for (i, size) in waves.iter().enumerate() {
        let upto = match size {
            Size::Count(n) => done.saturating_add(*n as usize),
            Size::Percent(_) => size.of(rest.len()),
        }
        .min(rest.len());
        if upto > done {
            wave_sizes.push((i + 1, upto - done));
            done = upto;
        } else {
            empty.push((i + 1, *size));
        }
    }
    if done < rest.len() {
        wave_sizes.push((waves.len() + 1, rest.len() - done));
    }
    let merged = empty
        .into_iter()
        .map(|(i, size)| {
            let into = wave_sizes.iter().find(|(j, _)| *j > i).map(|(j, _)| format!("merged into wave-{j}"));
            format!(
                "wave-{i} ({size}) adds no node to the {} target(s) after the canary: {}",
                rest.len(),
                into.unwrap_or_else(|| "the waves before it already cover them all".into())
            )
        })
        .collect();
    let mut iter = rest.into_iter();
    for (i, n) in wave_sizes {
        let nodes = iter.by_ref().take(n).collect();
        steps.push(Step { name: format!("wave-{i}"), nodes, pause_before: false });
    }
    Ok(Plan { steps, skipped, merged })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, labels: &[(&str, &str)], build: &str) -> Candidate {
        Candidate {
            node_id: id.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            builds: if build.is_empty() { vec![] } else { vec![build.into()] },
            alive: true,
            has_processes: true,
        }
    }

    fn fleet(n: usize) -> Vec<Candidate> {
        // Out of order on purpose: the plan must not depend on input order.
        (0..n).rev().map(|i| node(&format!("n{i:02}"), &[("zone", if i % 2 == 0 { "a" } else { "b" })], "b1")).collect()
    }

    fn sizes(steps: &Plan) -> Vec<(String, usize)> {
        steps.steps.iter().map(|s| (s.name.clone(), s.nodes.len())).collect()
    }

    fn all() -> Selector {
        Selector::parse("all").expect("all")
    }

    fn waves(list: &[&str]) -> Vec<Size> {
        list.iter().map(|s| Size::parse(s).expect("size")).collect()
    }

    #[test]
    fn selector_parses_and_matches() {
        let s = Selector::parse("zone=a, region=eu").expect("parse");
        assert_eq!(s.to_string(), "region=eu,zone=a");
        let labels: BTreeMap<String, String> =
            [("zone".to_string(), "a".to_string()), ("region".to_string(), "eu".to_string())].into();
        assert!(s.matches(&labels));
        assert!(!Selector::parse("zone=b").expect("parse").matches(&labels));
        assert!(Selector::parse("").expect("empty").matches(&labels));
        assert!(Selector::parse("all").expect("all").is_all());
        for bad in ["zone in a", "=a", "zone=a,zone=b"] {
            assert!(Selector::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(Size::parse("3").expect("count"), Size::Count(3));
        assert_eq!(Size::parse("25%").expect("pct"), Size::Percent(25.0));
        for bad in ["", "x", "-1", "0%", "101%", "1.5", "nan%"] {
            assert!(Size::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn canary_then_cumulative_percent_waves() {
        let plan = select(&fleet(9), &all(), "b1", Size::Count(1), &waves(&["25%", "50%", "100%"])).expect("plan");
        // 8 after the canary: up to 2, up to 4, up to 8.
        assert_eq!(
            sizes(&plan),
            [("canary".into(), 1), ("wave-1".into(), 2), ("wave-2".into(), 2), ("wave-3".into(), 4)]
        );
        let order: Vec<&String> = plan.targets().collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "deterministic id order");
        assert_eq!(plan.steps[0].nodes, ["n00"]);
    }

    #[test]
    fn counts_are_per_wave_and_leftovers_form_a_final_wave() {
        let plan = select(&fleet(6), &all(), "b1", Size::Count(1), &waves(&["1", "2"])).expect("plan");
        assert_eq!(
            sizes(&plan),
            [("canary".into(), 1), ("wave-1".into(), 1), ("wave-2".into(), 2), ("wave-3".into(), 2)]
        );
    }

    #[test]
    fn percent_canary_rounds_up_and_zero_canary_is_none() {
        let p = select(&fleet(6), &all(), "b1", Size::Percent(10.0), &[]).expect("plan");
        assert_eq!(sizes(&p), [("canary".into(), 1), ("wave-1".into(), 5)]);
        let p = select(&fleet(6), &all(), "b1", Size::Count(0), &waves(&["50%"])).expect("plan");
        assert_eq!(sizes(&p), [("wave-1".into(), 3), ("wave-2".into(), 3)]);
    }

    #[test]
    fn canary_larger_than_fleet_takes_everyone() {
        let p = select(&fleet(2), &all(), "b1", Size::Count(5), &waves(&["100%"])).expect("plan");
        assert_eq!(sizes(&p), [("canary".into(), 2)]);
    }

    #[test]
    fn empty_waves_are_dropped() {
        // 2 non-canary nodes: 10% -> 1, 20% -> still 1 (merged), 100% -> 2.
        let p = select(&fleet(3), &all(), "b1", Size::Count(1), &waves(&["10%", "20%", "100%"])).expect("plan");
        assert_eq!(sizes(&p), [("canary".into(), 1), ("wave-1".into(), 1), ("wave-3".into(), 1)]);
        assert_eq!(p.merged, ["wave-2 (20%) adds no node to the 2 target(s) after the canary: merged into wave-3"]);
        let p = select(&fleet(2), &all(), "b1", Size::Count(1), &waves(&["100%", "2"])).expect("plan");
        assert_eq!(sizes(&p), [("canary".into(), 1), ("wave-1".into(), 1)]);
        assert!(p.merged[0].starts_with("wave-2 (2) adds no node") && p.merged[0].ends_with("cover them all"));
    }

    #[test]
    fn a_gate_before_a_merged_wave_is_refused_saying_why() {
        let spec = RolloutSpec {
            waves: waves(&["10%", "50%", "100%"]),
            pause_before: vec!["wave-2".into()],
            ..RolloutSpec::new("p")
        };
        let err = plan(&fleet(3), &spec, "b1").expect_err("wave-2 was merged").to_string();
        assert!(err.contains("steps are: canary, wave-1, wave-3"), "{err}");
        assert!(
            err.contains("(wave-2 (50%) adds no node to the 2 target(s) after the canary: merged into wave-3)"),
            "{err}"
        );
    }

    #[test]
    fn selector_build_and_liveness_filter_targets() {
        let mut nodes = fleet(4);
        nodes.push(node("x-other", &[("zone", "a")], "b0"));
        nodes.push(Candidate { alive: false, ..node("x-lost", &[("zone", "a")], "b1") });
        nodes.push(node("x-nobuild", &[("zone", "a")], ""));
        nodes.push(Candidate { has_processes: false, ..node("x-empty", &[("zone", "a")], "b1") });
        let sel = Selector::parse("zone=a").expect("sel");
        let p = select(&nodes, &sel, "b1", Size::Count(1), &[]).expect("plan");
        let targets: Vec<&String> = p.targets().collect();
        assert_eq!(targets, ["n00", "n02", "x-nobuild"]);
        assert_eq!(p.skipped.len(), 3);
        assert!(p.skipped.iter().any(|s| s.node_id == "x-empty" && s.reason.contains("no game process")));
        assert!(p.skipped.iter().any(|s| s.node_id == "x-other" && s.reason.contains("b0")));
        assert!(p.skipped.iter().any(|s| s.node_id == "x-lost" && s.reason.contains("lost")));
    }

    #[test]
    fn a_node_without_processes_is_never_the_canary_even_sorting_first() {
        // "a-fake" sorts first and registered with no process: the canary is
        // the first node that runs one.
        let mut nodes = fleet(3);
        nodes.push(Candidate { has_processes: false, ..node("a-fake", &[("zone", "a")], "") });
        let p = select(&nodes, &all(), "b1", Size::Count(1), &[]).expect("plan");
        assert_eq!(p.steps[0].nodes, ["n00"]);
        assert!(p.targets().all(|n| n != "a-fake"));
        let only_empty = [Candidate { has_processes: false, ..node("a-fake", &[], "b1") }];
        assert!(matches!(select(&only_empty, &all(), "b1", Size::Count(1), &[]), Err(PlanError::NoTargets { .. })));
    }

    #[test]
    fn no_targets_is_an_error_naming_the_selector() {
        let err = select(&fleet(3), &Selector::parse("zone=z").expect("sel"), "b1", Size::Count(1), &[])
            .expect_err("no targets");
        assert!(err.to_string().contains("zone=z"), "{err}");
        assert!(select(&fleet(3), &all(), "b9", Size::Count(1), &[]).is_err());
    }

    #[test]
    fn the_whole_spec_is_validated_and_manual_gates_are_marked() {
        let spec = |pause: &[&str]| RolloutSpec {
            waves: waves(&["50%", "100%"]),
            pause_before: pause.iter().map(|s| s.to_string()).collect(),
            ..RolloutSpec::new("p")
        };
        let p = plan(&fleet(5), &spec(&["wave-2"]), "b1").expect("plan");
        let gates: Vec<(&str, bool)> = p.steps.iter().map(|s| (s.name.as_str(), s.pause_before)).collect();
        assert_eq!(gates, [("canary", false), ("wave-1", false), ("wave-2", true)]);

        let err = plan(&fleet(5), &spec(&["wave-9"]), "b1").expect_err("unknown step");
        assert!(err.to_string().contains("canary, wave-1, wave-2"), "{err}");
        for (factor, floor, what) in
            [(0.5, 20.0, "must be >= 1.0"), (f64::NAN, 20.0, "must be >= 1.0"), (3.0, -1.0, "must be >= 0")]
        {
            let bad = RolloutSpec {
                gate: crate::rollout::health::GateConfig { p99_factor: factor, p99_floor_ms: floor },
                ..spec(&[])
            };
            let err = plan(&fleet(5), &bad, "b1").expect_err("bad gate");
            assert!(err.to_string().contains(what), "{err}");
        }
    }
}

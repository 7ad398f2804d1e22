//! A rollout spec: what to roll out where, and how carefully. One type from
//! the operator's request to the stored rollout, with its defaults here and
//! nowhere else (the CLI leaves out what the operator did not say). The
//! planner validates a spec against the fleet ([`crate::planner::plan`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{health::GateConfig, window::Windows};
use crate::{
    input,
    planner::{PlanError, Selector, Size},
};

/// What a rollout does with its patch. One engine path for all three: the
/// same planner, waves, health gates, two-phase commit and automatic
/// rollback; only where the patch goes on (or comes off) the stack differs
/// (checked by [`crate::stack`] at start, and by every agent again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutKind {
    /// On top of the build's stack (its manifest names the top as parent).
    #[default]
    Apply,
    /// Off the build's stack (`rollout revert`): each process restores the
    /// sources beneath the patch; on completion the stack no longer holds it.
    Revert,
    /// On top although its parent is an ancestor of the top (`--rebase`):
    /// the patches above that parent touch none of its modules.
    Rebase,
}

impl RolloutKind {
    pub fn name(self) -> &'static str {
        match self {
            RolloutKind::Apply => "apply",
            RolloutKind::Revert => "revert",
            RolloutKind::Rebase => "rebase",
        }
    }

    /// Whether a process whose stack is `stack` shows the change done.
    pub fn done_on(self, stack: &[String], patch_id: &str) -> bool {
        stack.iter().any(|p| p == patch_id) != (self == RolloutKind::Revert)
    }
}

/// What an operator asked for, with defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub patch_id: String,
    pub selector: Selector,
    pub canary: Size,
    pub waves: Vec<Size>,
    pub health_window_ms: u64,
    pub step_deadline_ms: u64,
    pub max_unhealthy: u32,
    pub pause_before: Vec<String>,
    pub gate: GateConfig,
    /// How long an agent keeps this rollout's prepare after it last heard of
    /// the rollout from the leader (a command, or a heartbeat answer listing
    /// it); 0 = the agent's own default (`hotfleet-agent --prepare-ttl`).
    pub prepare_ttl_seconds: u32,
    #[serde(default)]
    pub description: String,
    /// Allowed windows: no step starts outside them (none: any time).
    #[serde(default)]
    pub windows: Windows,
    /// When the rollout starts, Unix ms; 0 = at once. Until then it is
    /// scheduled: stored, listed, cancellable, nothing sent.
    #[serde(default)]
    pub start_at_ms: u64,
    /// Apply (the default), revert or rebase.
    #[serde(default)]
    pub kind: RolloutKind,
}

impl RolloutSpec {
    pub const DEFAULT_HEALTH_WINDOW_MS: u64 = 10_000;
    pub const DEFAULT_STEP_DEADLINE_MS: u64 = 60_000;

    /// Longest health window and step deadline: a day. Far beyond any real
    /// rollout step, and small enough that no clock arithmetic can wrap.
    pub const MAX_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
    /// Longest prepare TTL: a week.
    pub const MAX_PREPARE_TTL_S: u32 = 7 * 24 * 60 * 60;
    /// Most unhealthy nodes a spec may tolerate (more than any fleet).
    pub const MAX_UNHEALTHY: u32 = 1_000_000;
    /// Bounds of the health gate's thresholds.
    pub const MAX_P99_FACTOR: f64 = 1000.0;
    pub const MAX_P99_FLOOR_MS: f64 = 3_600_000.0;

    /// Checks every bound of the spec ([`crate::input`]): the numbers, the
    /// lists and the free text. The planner calls it with the rest of the
    /// validation; a refusal names the field and the accepted range.
    pub fn validate(&self) -> Result<(), PlanError> {
        let gate = &self.gate;
        if !(gate.p99_factor.is_finite() && gate.p99_factor >= 1.0) {
            return Err(PlanError::P99Factor(gate.p99_factor));
        }
        if !(gate.p99_floor_ms.is_finite() && gate.p99_floor_ms >= 0.0) {
            return Err(PlanError::P99Floor(gate.p99_floor_ms));
        }
        input::text("patch_id", &self.patch_id, input::MAX_ID)?;
        input::text("description", &self.description, input::MAX_DESCRIPTION)?;
        input::count("waves", self.waves.len(), input::MAX_STEPS)?;
        input::count("pause_before", self.pause_before.len(), input::MAX_STEPS)?;
        for name in &self.pause_before {
            input::text("pause_before step", name, input::MAX_STEP_NAME)?;
        }
        input::number("health_window_ms", self.health_window_ms, 1..=Self::MAX_WINDOW_MS, " ms")?;
        input::number("step_deadline_ms", self.step_deadline_ms, 1..=Self::MAX_WINDOW_MS, " ms")?;
        input::number("prepare_ttl_seconds", self.prepare_ttl_seconds, 0..=Self::MAX_PREPARE_TTL_S, " s")?;
        input::number("max_unhealthy", self.max_unhealthy, 0..=Self::MAX_UNHEALTHY, "")?;
        input::number("tick_p99_factor", self.gate.p99_factor, 1.0..=Self::MAX_P99_FACTOR, "")?;
        input::number("tick_p99_floor_ms", self.gate.p99_floor_ms, 0.0..=Self::MAX_P99_FLOOR_MS, " ms")?;
        Ok(())
    }

    /// A prepare TTL must span this many heartbeat intervals: renewal rides
    /// on heartbeat answers, so one or two lost heartbeats must not expire it.
    pub const MIN_TTL_HEARTBEATS: u32 = 3;

    /// Refuses a prepare TTL renewal cannot keep alive: shorter than
    /// [`Self::MIN_TTL_HEARTBEATS`] heartbeat intervals of this coordinator.
    pub fn check_prepare_ttl(&self, heartbeat_interval: Duration) -> Result<(), PlanError> {
        let ttl_s = self.prepare_ttl_seconds;
        let min = heartbeat_interval * Self::MIN_TTL_HEARTBEATS;
        if ttl_s == 0 || Duration::from_secs(ttl_s.into()) >= min {
            return Ok(());
        }
        Err(PlanError::PrepareTtl {
            ttl_s,
            heartbeats: Self::MIN_TTL_HEARTBEATS,
            interval_ms: heartbeat_interval.as_millis() as u64,
            min_ms: min.as_millis() as u64,
            min_s: min.as_secs() + u64::from(min.subsec_nanos() > 0),
        })
    }

    /// Latest start a schedule may name: a year ahead.
    pub const MAX_SCHEDULE_AHEAD_MS: u64 = 366 * 24 * 60 * 60 * 1000;

    /// Refuses a start time in the past or beyond [`Self::MAX_SCHEDULE_AHEAD_MS`]
    /// (0: start now, always fine).
    pub fn check_start_at(&self, now_ms: u64) -> Result<(), PlanError> {
        let at = self.start_at_ms;
        if at == 0 {
            return Ok(());
        }
        if at <= now_ms {
            return Err(PlanError::StartInPast { at: rfc3339(at), now: rfc3339(now_ms) });
        }
        if at - now_ms > Self::MAX_SCHEDULE_AHEAD_MS {
            return Err(PlanError::StartTooFar { at: rfc3339(at) });
        }
        Ok(())
    }

    /// The spec of an operator who named only the patch: every node, a
    /// one-node canary, then the rest in one wave; 10 s health windows, 60 s
    /// per step, no unhealthy node tolerated, the default health gate, no
    /// manual gate, the agents' own prepare TTL.
    pub fn new(patch_id: impl Into<String>) -> Self {
        Self {
            patch_id: patch_id.into(),
            selector: Selector::default(),
            canary: Size::Count(1),
            waves: vec![Size::Percent(100.0)],
            health_window_ms: Self::DEFAULT_HEALTH_WINDOW_MS,
            step_deadline_ms: Self::DEFAULT_STEP_DEADLINE_MS,
            max_unhealthy: 0,
            pause_before: Vec::new(),
            gate: GateConfig::default(),
            prepare_ttl_seconds: 0,
            description: String::new(),
            start_at_ms: 0,
            windows: Windows::default(),
            kind: RolloutKind::Apply,
        }
    }

    /// Parses the operator's text for the parts given as text; `None` (not
    /// given) keeps what `self` has.
    pub fn with_text(
        mut self,
        selector: Option<&str>,
        canary: Option<&str>,
        waves: Option<&[String]>,
    ) -> Result<Self, PlanError> {
        if let Some(selector) = selector {
            self.selector = Selector::parse(selector)?;
        }
        if let Some(canary) = canary {
            self.canary = Size::parse(canary)?;
        }
        if let Some(waves) = waves {
            self.waves = waves.iter().map(|w| Size::parse(w)).collect::<Result<_, _>>()?;
        }
        Ok(self)
    }
}

/// Unix ms as RFC 3339 UTC (for messages and events).
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// A spec as it arrives, parsed by the engine when it starts the rollout:
/// after the patch checks, so a refusal names the first thing wrong and a
/// spec that does not parse is audited like every other refused start. The
/// gRPC adapter implements it for the wire message; a parsed spec is its own.
pub trait ParseSpec {
    /// The patch the spec names (what a refusal is audited under).
    fn patch_id(&self) -> &str;
    fn parse(self) -> Result<RolloutSpec, PlanError>;
}

impl ParseSpec for RolloutSpec {
    fn patch_id(&self) -> &str {
        &self.patch_id
    }

    fn parse(self) -> Result<RolloutSpec, PlanError> {
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_parts_parse_and_absent_ones_keep_the_defaults() {
        let waves = vec!["25%".to_string(), "3".to_string()];
        let spec = RolloutSpec::new("p").with_text(Some("zone=a"), None, Some(&waves)).expect("parse");
        assert_eq!(spec.selector.to_string(), "zone=a");
        assert_eq!(spec.canary, Size::Count(1), "default canary kept");
        assert_eq!(spec.waves, [Size::Percent(25.0), Size::Count(3)]);
        assert_eq!(spec.health_window_ms, RolloutSpec::DEFAULT_HEALTH_WINDOW_MS);
        for (selector, canary, waves) in [(Some("zone in a"), None, None), (None, Some("x"), None)] {
            assert!(RolloutSpec::new("p").with_text(selector, canary, waves).is_err());
        }
        let bad = ["150%".to_string()];
        let err = RolloutSpec::new("p").with_text(None, None, Some(&bad)).expect_err("bad wave");
        assert!(err.to_string().contains("invalid size"), "{err}");
    }

    #[test]
    fn numbers_beyond_their_bounds_are_refused_with_the_range() {
        let err = RolloutSpec { health_window_ms: u64::MAX, ..RolloutSpec::new("p") }.validate().expect_err("u64::MAX");
        let text = err.to_string();
        assert!(text.contains("health_window_ms 18446744073709551615 ms is out of range"), "{text}");
        assert!(text.contains("give 1 ms to 86400000 ms"), "{text}");
        RolloutSpec::new("p").validate().expect("the defaults are in range");
        let bad = [
            RolloutSpec { step_deadline_ms: RolloutSpec::MAX_WINDOW_MS + 1, ..RolloutSpec::new("p") },
            RolloutSpec { prepare_ttl_seconds: u32::MAX, ..RolloutSpec::new("p") },
            RolloutSpec { max_unhealthy: u32::MAX, ..RolloutSpec::new("p") },
            RolloutSpec { gate: GateConfig { p99_factor: 1e300, p99_floor_ms: 1.0 }, ..RolloutSpec::new("p") },
            RolloutSpec { waves: vec![Size::Count(1); 65], ..RolloutSpec::new("p") },
            RolloutSpec { description: "d".repeat(input::MAX_DESCRIPTION + 1), ..RolloutSpec::new("p") },
        ];
        for spec in bad {
            let err = spec.validate().expect_err("out of bounds");
            assert!(err.to_string().len() < 200, "{err}");
        }
    }

    #[test]
    fn a_revert_is_done_where_the_patch_is_gone_the_others_where_it_runs() {
        let stack = ["a".to_string(), "b".to_string()];
        assert!(RolloutKind::Apply.done_on(&stack, "b") && RolloutKind::Rebase.done_on(&stack, "a"));
        assert!(!RolloutKind::Apply.done_on(&stack, "c"));
        assert!(RolloutKind::Revert.done_on(&stack, "c") && !RolloutKind::Revert.done_on(&stack, "b"));
        assert_eq!(serde_json::to_string(&RolloutKind::Revert).expect("json"), "\"revert\"");
        let old: RolloutSpec = serde_json::from_str(
            &serde_json::to_string(&RolloutSpec::new("p")).expect("json").replace(",\"kind\":\"apply\"", ""),
        )
        .expect("a spec stored before kinds existed");
        assert_eq!(old.kind, RolloutKind::Apply);
    }

    #[test]
    fn a_start_time_must_lie_ahead_within_a_year() {
        let at = |ms| RolloutSpec { start_at_ms: ms, ..RolloutSpec::new("p") };
        let now = 1_798_000_000_000;
        at(0).check_start_at(now).expect("now");
        at(now + 1000).check_start_at(now).expect("a second ahead");
        let err = at(now - 1000).check_start_at(now).expect_err("past").to_string();
        assert!(err.contains("is in the past") && err.contains("2026-12-23T"), "{err}");
        let err = at(now).check_start_at(now).expect_err("now is not ahead").to_string();
        assert!(err.contains("in the past"), "{err}");
        let err = at(now + RolloutSpec::MAX_SCHEDULE_AHEAD_MS + 1).check_start_at(now).expect_err("far").to_string();
        assert!(err.contains("more than a year away"), "{err}");
    }

    #[test]
    fn a_prepare_ttl_shorter_than_three_heartbeats_is_refused_with_the_numbers() {
        let spec = |ttl| RolloutSpec { prepare_ttl_seconds: ttl, ..RolloutSpec::new("p") };
        let heartbeat = Duration::from_millis(500);
        spec(0).check_prepare_ttl(heartbeat).expect("the agents' default");
        spec(2).check_prepare_ttl(heartbeat).expect("2 s covers 3 x 500 ms");
        let err = spec(1).check_prepare_ttl(heartbeat).expect_err("1 s < 1.5 s");
        let text = err.to_string();
        for part in ["prepare TTL 1s", "3 heartbeat intervals (1500 ms", "500 ms", "at least 2s", "goes silent"] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        let err = spec(5).check_prepare_ttl(Duration::from_secs(2)).expect_err("5 s < 6 s");
        assert!(err.to_string().contains("at least 6s"), "{err}");
    }
}

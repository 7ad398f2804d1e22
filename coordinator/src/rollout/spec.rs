//! A rollout spec: what to roll out where, and how carefully. One type from
//! the operator's request to the stored rollout, with its defaults here and
//! nowhere else (the CLI leaves out what the operator did not say). The
//! planner validates a spec against the fleet ([`crate::planner::plan`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::health::GateConfig;
use crate::planner::{PlanError, Selector, Size};

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
}

impl RolloutSpec {
    pub const DEFAULT_HEALTH_WINDOW_MS: u64 = 10_000;
    pub const DEFAULT_STEP_DEADLINE_MS: u64 = 60_000;

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
        for (selector, canary, waves) in [(Some("zone"), None, None), (None, Some("x"), None)] {
            assert!(RolloutSpec::new("p").with_text(selector, canary, waves).is_err());
        }
        let bad = ["150%".to_string()];
        let err = RolloutSpec::new("p").with_text(None, None, Some(&bad)).expect_err("bad wave");
        assert!(err.to_string().contains("invalid size"), "{err}");
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

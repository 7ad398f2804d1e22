//! Decoding a wire `RolloutSpec` into the domain's: proto3 cannot tell "not
//! given" from zero or empty, so those mean "not given" and the domain's
//! defaults ([`RolloutSpec::new`]) stand. Parsing and validation are the
//! domain's; nothing is decided here.

use hotfleet_proto::v1 as pb;

use crate::{
    planner::PlanError,
    rollout::{health::GateConfig, ParseSpec, RolloutSpec},
};

fn given<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn given_text(text: &str) -> Option<&str> {
    (!text.trim().is_empty()).then_some(text)
}

impl ParseSpec for pb::RolloutSpec {
    fn patch_id(&self) -> &str {
        &self.patch_id
    }

    fn parse(self) -> Result<RolloutSpec, PlanError> {
        let defaults = RolloutSpec::new(self.patch_id);
        let waves = (!self.waves.is_empty()).then_some(self.waves.as_slice());
        let spec = defaults.with_text(Some(&self.selector), given_text(&self.canary), waves)?;
        Ok(RolloutSpec {
            health_window_ms: given(self.health_window_ms).unwrap_or(spec.health_window_ms),
            step_deadline_ms: given(self.step_deadline_ms).unwrap_or(spec.step_deadline_ms),
            max_unhealthy: self.max_unhealthy,
            pause_before: self.pause_before,
            gate: GateConfig {
                p99_factor: given(self.tick_p99_factor).unwrap_or(spec.gate.p99_factor),
                p99_floor_ms: given(self.tick_p99_floor_ms).unwrap_or(spec.gate.p99_floor_ms),
            },
            prepare_ttl_seconds: self.prepare_ttl_seconds,
            description: self.description,
            ..spec
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::planner::Size;

    #[test]
    fn zero_and_empty_fields_take_the_domain_defaults() {
        let spec = pb::RolloutSpec { patch_id: "p".into(), ..Default::default() }.parse().expect("parse");
        assert_eq!(spec, RolloutSpec::new("p"));
    }

    #[test]
    fn given_fields_are_parsed() {
        let wire = pb::RolloutSpec {
            patch_id: "p".into(),
            selector: "zone=a".into(),
            canary: "10%".into(),
            waves: vec!["2".into(), "100%".into()],
            health_window_ms: 5,
            step_deadline_ms: 6,
            max_unhealthy: 1,
            pause_before: vec!["wave-2".into()],
            tick_p99_factor: 2.5,
            tick_p99_floor_ms: 4.0,
            prepare_ttl_seconds: 30,
            description: "fix".into(),
        };
        let spec = wire.parse().expect("parse");
        assert_eq!(spec.selector.to_string(), "zone=a");
        assert_eq!(spec.canary, Size::Percent(10.0));
        assert_eq!(spec.waves, [Size::Count(2), Size::Percent(100.0)]);
        assert_eq!((spec.health_window_ms, spec.step_deadline_ms, spec.max_unhealthy), (5, 6, 1));
        assert_eq!(spec.gate, GateConfig { p99_factor: 2.5, p99_floor_ms: 4.0 });
        assert_eq!((spec.prepare_ttl_seconds, spec.description.as_str()), (30, "fix"));
        assert_eq!(spec.pause_before, ["wave-2"]);
    }
}

//! Decoding a wire `RolloutSpec` into the domain's: proto3 cannot tell "not
//! given" from zero or empty, so those mean "not given" and the domain's
//! defaults ([`RolloutSpec::new`]) stand. Parsing and validation are the
//! domain's; nothing is decided here. Bounds ([`crate::input`]) are checked
//! as the message is decoded, the lists before any entry is parsed, so an
//! oversized spec is refused before it goes anywhere.

use hotfleet_proto::v1 as pb;

use crate::{
    input,
    planner::PlanError,
    rollout::{health::GateConfig, window::Windows, ParseSpec, RolloutKind, RolloutSpec},
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
        input::count("waves", self.waves.len(), input::MAX_STEPS)?;
        input::count("pause_before", self.pause_before.len(), input::MAX_STEPS)?;
        input::text("description", &self.description, input::MAX_DESCRIPTION)?;
        let kind = match self.kind() {
            pb::RolloutKind::Apply => RolloutKind::Apply,
            pb::RolloutKind::Revert => RolloutKind::Revert,
            pb::RolloutKind::Rebase => RolloutKind::Rebase,
        };
        let defaults = RolloutSpec::new(self.patch_id);
        let waves = (!self.waves.is_empty()).then_some(self.waves.as_slice());
        let spec = defaults.with_text(Some(&self.selector), given_text(&self.canary), waves)?;
        let spec = RolloutSpec {
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
            start_at_ms: self.start_at_ms,
            windows: Windows::parse(&self.windows, &self.window_tz)?,
            kind,
            ..spec
        };
        spec.validate()?;
        Ok(spec)
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
    fn oversized_or_out_of_range_fields_are_refused_with_short_messages() {
        let wire = |f: fn(&mut pb::RolloutSpec)| {
            let mut spec = pb::RolloutSpec { patch_id: "p".into(), ..Default::default() };
            f(&mut spec);
            spec.parse().expect_err("refused").to_string()
        };
        let err = wire(|s| s.selector = format!("zone={}", "a".repeat(4 << 20)));
        assert!(err.starts_with("selector is 4194309 bytes long"), "{err}");
        assert!(err.len() < 200, "{err}");
        let err = wire(|s| s.health_window_ms = u64::MAX);
        assert!(err.contains("health_window_ms 18446744073709551615 ms is out of range"), "{err}");
        let err = wire(|s| s.waves = vec!["1".into(); 100_000]);
        assert!(err.contains("waves has 100000 entries"), "{err}");
        let err = wire(|s| s.canary = "9".repeat(1000));
        assert!(err.starts_with("size is 1000 bytes long"), "{err}");
        let err = wire(|s| s.description = "d".repeat(1 << 20));
        assert!(err.starts_with("description is 1048576 bytes long"), "{err}");
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
            start_at_ms: 1_798_000_000_000,
            windows: vec!["02:00-05:00 mon-fri".into()],
            window_tz: "Europe/Berlin".into(),
            kind: pb::RolloutKind::Revert.into(),
        };
        let spec = wire.parse().expect("parse");
        assert_eq!(spec.selector.to_string(), "zone=a");
        assert_eq!(spec.canary, Size::Percent(10.0));
        assert_eq!(spec.waves, [Size::Count(2), Size::Percent(100.0)]);
        assert_eq!((spec.health_window_ms, spec.step_deadline_ms, spec.max_unhealthy), (5, 6, 1));
        assert_eq!(spec.gate, GateConfig { p99_factor: 2.5, p99_floor_ms: 4.0 });
        assert_eq!((spec.prepare_ttl_seconds, spec.description.as_str()), (30, "fix"));
        assert_eq!(spec.pause_before, ["wave-2"]);
        assert_eq!(spec.start_at_ms, 1_798_000_000_000);
        assert_eq!(spec.windows.to_string(), "02:00-05:00 mon,tue,wed,thu,fri Europe/Berlin");
        assert_eq!(spec.kind, RolloutKind::Revert);
    }
}

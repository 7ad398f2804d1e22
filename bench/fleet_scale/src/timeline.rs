//! A finished rollout's timeline, read from its events (the coordinator's
//! own clock): how long phase 1 took, each step from its commit to the end
//! of its health window, and a rollback from its start to its end.

use serde_json::Value;

/// Durations in milliseconds, `None` where the rollout never got there.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Timeline {
    pub prepare_ms: Option<u64>,
    /// (step name, commit start to window passed).
    pub steps: Vec<(String, u64)>,
    /// "rolling back" to "rolled back".
    pub rollback_ms: Option<u64>,
    pub completed: bool,
    pub rolled_back: bool,
    /// The last few events (what a failed run reports).
    pub last_events: Vec<String>,
}

fn num(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Reads the events of `rollout status --output json`.
pub fn from_status(status: &Value) -> Timeline {
    let events: Vec<(u64, String)> = status["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((num(&e["atMs"])?, e["message"].as_str().unwrap_or_default().to_string())))
                .collect()
        })
        .unwrap_or_default();
    let at = |pred: &dyn Fn(&str) -> bool| events.iter().find(|(_, m)| pred(m)).map(|(t, _)| *t);
    let mut timeline = Timeline::default();
    if let (Some(a), Some(b)) =
        (at(&|m| m.starts_with("preparing on")), at(&|m| m.starts_with("every target prepared")))
    {
        timeline.prepare_ms = Some(b.saturating_sub(a));
    }
    for (t, m) in &events {
        if let Some((name, _)) = m.split_once(": committing on") {
            let end = format!("{name}: health window passed");
            if let Some(done) = at(&|x| x.starts_with(&end)) {
                timeline.steps.push((name.to_string(), done.saturating_sub(*t)));
            }
        }
    }
    if let (Some(a), Some(b)) = (at(&|m| m.starts_with("rolling back")), at(&|m| m.starts_with("rolled back"))) {
        timeline.rollback_ms = Some(b.saturating_sub(a));
    }
    timeline.completed = at(&|m| m.contains("rollout completed")).is_some();
    timeline.rolled_back = at(&|m| m.starts_with("rolled back")).is_some();
    timeline.last_events = events.iter().rev().take(4).rev().map(|(_, m)| m.clone()).collect();
    timeline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_phases_steps_and_rollback() {
        let status = serde_json::json!({"events": [
            {"atMs": "1000", "message": "staged by x"},
            {"atMs": "1010", "message": "preparing on 3 node(s)"},
            {"atMs": "1110", "message": "every target prepared (phase 1 complete)"},
            {"atMs": "1120", "message": "canary: committing on 1 node(s)"},
            {"atMs": "1200", "message": "canary: health window passed"},
            {"atMs": "1210", "message": "wave-1: committing on 2 node(s)"},
            {"atMs": "1300", "message": "rolling back: health gate failed"},
            {"atMs": "1450", "message": "rolled back: health gate failed"},
        ]});
        let t = from_status(&status);
        assert_eq!(t.prepare_ms, Some(100));
        assert_eq!(t.steps, vec![("canary".to_string(), 80)]);
        assert_eq!(t.rollback_ms, Some(150));
        assert!(t.rolled_back && !t.completed);
        assert_eq!(t.last_events.last().map(String::as_str), Some("rolled back: health gate failed"));
    }
}

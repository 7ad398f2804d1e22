//! State machine tests: every transition, abort from every state, and resume
//! (next_action) from every persisted state.

use std::{collections::BTreeMap, sync::Arc};

use super::health::GateConfig;
use super::*;
use crate::planner::{Plan, Selector, Size};

fn spec(pause_before: &[&str], max_unhealthy: u32) -> RolloutSpec {
    RolloutSpec {
        patch_id: "p".repeat(64),
        selector: Selector::default(),
        canary: Size::Count(1),
        waves: vec![Size::Percent(50.0), Size::Percent(100.0)],
        health_window_ms: 1000,
        step_deadline_ms: 5000,
        max_unhealthy,
        pause_before: pause_before.iter().map(|s| s.to_string()).collect(),
        gate: GateConfig::default(),
        prepare_ttl_seconds: 0,
        description: String::new(),
        start_at_ms: 0,
        windows: Default::default(),
        kind: Default::default(),
    }
}

/// The plan the planner makes of five nodes, with gates before `pause_before`.
fn plan(pause_before: &[&str]) -> Plan {
    let step = |name: &str, nodes: &[&str]| Step {
        name: name.into(),
        nodes: nodes.iter().map(|s| s.to_string()).collect(),
        pause_before: pause_before.contains(&name),
    };
    Plan {
        steps: vec![step("canary", &["n1"]), step("wave-1", &["n2", "n3"]), step("wave-2", &["n4", "n5"])],
        skipped: vec![],
        merged: vec![],
    }
}

fn new_state(pause_before: &[&str], max_unhealthy: u32) -> RolloutState {
    let (spec, plan) = (spec(pause_before, max_unhealthy), plan(pause_before));
    RolloutState::new("ro-1-1".into(), spec, "b1".into(), plan, "alice".into(), 1, 0)
}

fn ok(nodes: &[&str]) -> Vec<NodeResult> {
    nodes.iter().map(|n| (n.to_string(), Ok(()))).collect()
}

fn all_nodes() -> Vec<&'static str> {
    vec!["n1", "n2", "n3", "n4", "n5"]
}

fn healthy(nodes: &[String]) -> Vec<(String, Verdict)> {
    nodes.iter().map(|n| (n.clone(), Verdict::default())).collect()
}

fn sick(node: &str, why: &str) -> (String, Verdict) {
    (node.to_string(), Verdict { problems: vec![why.to_string()] })
}

/// Drives a fresh rollout to the named point.
fn at(point: &str) -> RolloutState {
    let mut s = new_state(&[], 0);
    if point == "staged" {
        return s;
    }
    s.begin_prepare(1);
    if point == "preparing" {
        return s;
    }
    s.record_prepare(ok(&all_nodes()), 2);
    if point == "waiting" {
        return s;
    }
    s.begin_step(0, BTreeMap::new(), 3);
    if point == "committing" {
        return s;
    }
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    if point == "watching" {
        return s;
    }
    s.window_passed(0, 5);
    s.begin_step(1, BTreeMap::new(), 6);
    if point == "mid-wave" {
        return s;
    }
    panic!("unknown point {point}");
}

fn complete(s: &mut RolloutState) {
    let mut t = 10;
    loop {
        t += 1;
        match s.next_action(false) {
            Action::BeginPrepare => {
                s.begin_prepare(t);
            }
            Action::Prepare(nodes) => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                s.record_prepare(ok(&nodes), t);
            }
            Action::BeginStep(step) => {
                s.begin_step(step, BTreeMap::new(), t);
            }
            Action::Commit { step, nodes } => {
                let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
                s.record_commit(step, ok(&nodes), BTreeMap::new(), t);
            }
            Action::Watch { step, .. } => {
                let watched = s.watched_nodes();
                s.record_health(healthy(&watched), vec![], t);
                s.window_passed(step, t);
            }
            Action::Finished => return,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn happy_path_goes_canary_then_waves_then_completed() {
    let mut s = new_state(&[], 0);
    assert_eq!(s.next_action(false), Action::BeginPrepare);
    let changed = s.begin_prepare(1);
    assert!(changed.is_empty(), "the phase says desired=prepared for every target: no node state written");
    assert!(s.nodes.values().all(|n| n.desired == Desired::Prepared));
    assert_eq!(s.next_action(false), Action::Prepare(all_nodes().iter().map(|s| s.to_string()).collect()));
    s.record_prepare(ok(&all_nodes()), 2);
    assert_eq!(s.rollout.phase, Phase::Waiting { next_step: 0 });
    assert_eq!(s.next_action(false), Action::BeginStep(0));
    s.begin_step(0, BTreeMap::new(), 3);
    assert_eq!(s.nodes["n1"].desired, Desired::Committed);
    assert!(s.nodes["n1"].commit_sent);
    assert_eq!(s.nodes["n2"].desired, Desired::Prepared, "wave nodes untouched by the canary");
    assert_eq!(s.next_action(false), Action::Commit { step: 0, nodes: vec!["n1".into()] });
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    assert_eq!(s.next_action(false), Action::Watch { step: 0, ends_at_ms: 1004 });
    complete(&mut s);
    assert_eq!(s.rollout.phase, Phase::Completed);
    assert!(s.nodes.values().all(|n| n.observed == Observed::Committed && n.desired == Desired::Committed));
    assert!(s.rollout.events.iter().any(|e| e.message.contains("completed")));
}

#[test]
fn any_prepare_no_aborts_everywhere_and_commits_nothing() {
    let mut s = at("preparing");
    let mut results = ok(&["n1", "n2", "n4", "n5"]);
    results.push(("n3".into(), Err("SyntaxError in zone/combat.py line 3".into())));
    s.record_prepare(results, 5);
    let Phase::RollingBack { reason, faulty } = &s.rollout.phase else { panic!("{:?}", s.rollout.phase) };
    assert!(reason.contains("n3") && reason.contains("SyntaxError"), "{reason}");
    assert_eq!(faulty, &["n3"]);
    let Action::Revert { rollback, abort } = s.next_action(false) else { panic!() };
    assert!(rollback.is_empty(), "nothing was committed");
    assert_eq!(abort.len(), 5, "every prepared node aborts (the failing one too: idempotent)");
    s.record_revert(ok(&all_nodes()), false, 6);
    let Phase::RolledBack { faulty, .. } = &s.rollout.phase else { panic!() };
    assert_eq!(faulty, &["n3"]);
    assert!(s.nodes.values().all(|n| n.observed == Observed::Aborted));
    assert!(s.nodes.values().all(|n| !n.commit_sent));
}

#[test]
fn commit_failure_in_wave_rolls_back_committed_and_aborts_prepared() {
    let mut s = at("mid-wave");
    s.record_commit(1, vec![("n2".into(), Ok(())), ("n3".into(), Err("hook raised".into()))], BTreeMap::new(), 7);
    let Phase::RollingBack { reason, faulty } = &s.rollout.phase else { panic!() };
    assert!(reason.starts_with("wave-1: commit failed on n3"), "{reason}");
    assert_eq!(faulty, &["n3"]);
    let Action::Revert { rollback, abort } = s.next_action(false) else { panic!() };
    assert_eq!(rollback, ["n1", "n2", "n3"], "canary and wave-1 (the failed node may be half-applied)");
    assert_eq!(abort, ["n4", "n5"]);
    s.record_revert(ok(&["n1", "n2", "n3", "n4", "n5"]), false, 8);
    assert!(matches!(s.rollout.phase, Phase::RolledBack { .. }));
    assert_eq!(s.nodes["n1"].observed, Observed::RolledBack);
    assert_eq!(s.nodes["n4"].observed, Observed::Aborted);
}

#[test]
fn health_failure_beyond_policy_rolls_back() {
    let mut s = at("watching");
    s.record_health(vec![sick("n1", "tick p99 80 ms")], vec![], 5);
    let Phase::RollingBack { reason, faulty } = &s.rollout.phase else { panic!() };
    assert!(reason.contains("health gate failed") && reason.contains("tick p99"), "{reason}");
    assert_eq!(faulty, &["n1"]);
}

#[test]
fn an_expired_prepare_shows_as_expired_and_rolls_back_naming_the_expiry() {
    let mut s = new_state(&["wave-2"], 0);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    // Only a node still holding the patch prepared can expire; an unknown one is ignored.
    assert!(s.record_expired(vec![("n9".into(), "gone".into())], 3).is_empty());
    let changed = s.record_expired(vec![("n4".into(), "prepare expired on the agent".into())], 3);
    assert!(changed.contains(&"n4".to_string()));
    assert_eq!(s.nodes["n4"].observed, Observed::Expired);
    assert_eq!(s.nodes["n4"].observed.name(), "expired");
    let Phase::RollingBack { reason, faulty } = &s.rollout.phase else { panic!("{:?}", s.rollout.phase) };
    assert!(reason.contains("prepare expired") && reason.contains("n4: prepare expired on the agent"), "{reason}");
    assert_eq!(faulty, &["n4"]);
    // The expired node holds nothing: it is aborted like every other prepared node.
    let Action::Revert { rollback, abort } = s.next_action(false) else { panic!() };
    assert!(rollback.is_empty());
    assert_eq!(abort, ["n1", "n2", "n3", "n4", "n5"]);
    // Reported again while rolling back: nothing changes.
    assert!(s.record_expired(vec![("n5".into(), "x".into())], 4).is_empty());
}

#[test]
fn a_tolerated_expired_node_is_skipped_by_its_wave() {
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    s.record_expired(vec![("n3".into(), "prepare expired".into())], 3);
    assert_eq!(s.rollout.phase, Phase::Waiting { next_step: 0 }, "one expiry tolerated by max-unhealthy 1");
    s.begin_step(0, BTreeMap::new(), 4);
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 5);
    s.window_passed(0, 6);
    s.begin_step(1, BTreeMap::new(), 7);
    let Action::Commit { nodes, .. } = s.next_action(false) else { panic!() };
    assert_eq!(nodes, ["n2"], "the expired node is not sent a commit");
}

#[test]
fn policy_tolerates_up_to_max_unhealthy() {
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    s.begin_step(0, BTreeMap::new(), 3);
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    s.record_health(vec![sick("n1", "slow")], vec![], 5);
    assert!(matches!(s.rollout.phase, Phase::Watching { .. }), "one tolerated");
    assert_eq!(s.nodes["n1"].observed, Observed::Unhealthy);
    s.window_passed(0, 6);
    s.begin_step(1, BTreeMap::new(), 7);
    s.record_commit(1, ok(&["n2", "n3"]), BTreeMap::new(), 8);
    s.record_health(vec![], vec!["n2".into()], 9);
    assert!(matches!(s.rollout.phase, Phase::RollingBack { .. }), "a second bad node exceeds the policy");
}

#[test]
fn a_tolerated_lost_node_is_skipped_by_its_wave() {
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    s.begin_step(0, BTreeMap::new(), 3);
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    s.record_health(healthy(&["n1".to_string()]), vec!["n3".into()], 5);
    assert_eq!(s.nodes["n3"].observed, Observed::Lost);
    s.window_passed(0, 6);
    s.begin_step(1, BTreeMap::new(), 7);
    assert_eq!(s.next_action(false), Action::Commit { step: 1, nodes: vec!["n2".into()] });
    s.record_commit(1, ok(&["n2"]), BTreeMap::new(), 8);
    assert!(matches!(s.rollout.phase, Phase::Watching { step: 1, .. }));
}

#[test]
fn abort_is_accepted_in_every_non_terminal_state() {
    for point in ["staged", "preparing", "waiting", "committing", "watching", "mid-wave"] {
        let mut s = at(point);
        s.abort("bob", "incident 42", 100).expect("abort accepted");
        let Phase::RollingBack { reason, .. } = &s.rollout.phase else { panic!("{point}: {:?}", s.rollout.phase) };
        assert_eq!(reason, "aborted by bob: incident 42");
        // Nothing new is prepared or committed: the only action is revert.
        assert!(matches!(s.next_action(false), Action::Revert { .. }), "{point}");
        assert!(matches!(s.next_action(true), Action::Revert { .. }), "{point}: freeze never holds a rollback");
        // Idempotent while rolling back.
        assert_eq!(s.abort("bob", "again", 101), Ok(vec![]));
    }
    // While held at a gate and while paused too.
    let mut s = new_state(&["wave-1"], 0);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    s.pause("a", 3).expect("pause");
    assert!(matches!(s.next_action(false), Action::Hold(_)));
    s.abort("a", "", 4).expect("abort while paused");
    assert_eq!(s.rollout.phase, Phase::RollingBack { reason: "aborted by a".into(), faulty: vec![] });
}

#[test]
fn abort_after_the_end_is_refused() {
    let mut s = new_state(&[], 0);
    complete(&mut s);
    let err = s.abort("bob", "", 1).expect_err("finished");
    assert!(err.to_string().contains("already finished (completed)"), "{err}");
    let mut s = at("preparing");
    s.abort("bob", "", 1).expect("abort");
    s.record_revert(ok(&all_nodes()), false, 2);
    assert!(matches!(s.abort("bob", "", 3), Err(TransitionError::Finished { .. })));
}

#[test]
fn abort_staged_touches_no_node() {
    let mut s = at("staged");
    s.abort("a", "", 1).expect("abort");
    assert_eq!(s.next_action(false), Action::Revert { rollback: vec![], abort: vec![] });
    s.record_revert(vec![], false, 2);
    assert!(matches!(s.rollout.phase, Phase::RolledBack { .. }));
}

#[test]
fn late_answers_after_abort_do_not_resurrect_the_rollout() {
    let mut s = at("committing");
    s.abort("a", "", 5).expect("abort");
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 6);
    assert!(matches!(s.rollout.phase, Phase::RollingBack { .. }));
    let mut s = at("preparing");
    s.abort("a", "", 5).expect("abort");
    s.record_prepare(ok(&all_nodes()), 6);
    assert!(matches!(s.rollout.phase, Phase::RollingBack { .. }));
    assert!(s.nodes.values().all(|n| n.desired == Desired::Reverted));
}

#[test]
fn manual_gate_holds_until_promoted_and_promote_can_be_early() {
    let mut s = new_state(&["wave-1"], 0);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    assert_eq!(s.next_action(false), Action::BeginStep(0), "no gate before the canary");
    s.begin_step(0, BTreeMap::new(), 3);
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    s.window_passed(0, 5);
    let Action::Hold(reason) = s.next_action(false) else { panic!() };
    assert!(reason.contains("gate before wave-1"), "{reason}");
    assert_eq!(s.promote("carol", 6), Ok("wave-1".to_string()));
    assert_eq!(s.next_action(false), Action::BeginStep(1));
    assert!(matches!(s.promote("carol", 7), Err(TransitionError::NoGate { .. })));

    // Promoting while the canary watches opens the gate ahead.
    let mut s = new_state(&["wave-1"], 0);
    s.begin_prepare(1);
    s.record_prepare(ok(&all_nodes()), 2);
    s.begin_step(0, BTreeMap::new(), 3);
    s.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    s.promote("carol", 5).expect("early promote");
    s.window_passed(0, 6);
    assert_eq!(s.next_action(false), Action::BeginStep(1));
}

#[test]
fn pause_and_freeze_hold_new_steps_only() {
    let mut s = at("waiting");
    s.pause("a", 1).expect("pause");
    assert!(matches!(s.next_action(false), Action::Hold(r) if r.contains("paused")));
    s.resume("a", 2).expect("resume");
    assert_eq!(s.next_action(false), Action::BeginStep(0));
    assert!(matches!(s.next_action(true), Action::Hold(r) if r.contains("frozen")));
    assert!(matches!(at("staged").next_action(true), Action::Hold(_)), "freeze holds the prepare too");
    // A running window is not interrupted by a pause.
    let mut s = at("watching");
    s.pause("a", 1).expect("pause");
    assert!(matches!(s.next_action(true), Action::Watch { .. }));
    s.window_passed(0, 2);
    assert!(matches!(s.next_action(false), Action::Hold(_)));
}

#[test]
fn operator_commands_refused_while_rolling_back() {
    let mut s = at("watching");
    s.abort("a", "", 1).expect("abort");
    assert!(matches!(s.pause("a", 2), Err(TransitionError::RollingBack { .. })));
    assert!(matches!(s.promote("a", 2), Err(TransitionError::RollingBack { .. })));
}

#[test]
fn resume_from_every_persisted_state_picks_the_right_action() {
    // A restarted coordinator only has what the store has: next_action on a
    // deserialized copy must say what to do, and re-sent commands are the
    // (idempotent) ones of the current phase.
    let roundtrip = |s: &RolloutState| {
        let rollout: Rollout = serde_json::from_slice(&serde_json::to_vec(&s.rollout).expect("ser")).expect("de");
        let plain: BTreeMap<&String, &NodeState> = s.nodes.iter().map(|(k, n)| (k, n.as_ref())).collect();
        let nodes: BTreeMap<String, NodeState> =
            serde_json::from_slice(&serde_json::to_vec(&plain).expect("ser")).expect("de");
        RolloutState { rollout, nodes: shared(nodes) }
    };
    assert_eq!(roundtrip(&at("staged")).next_action(false), Action::BeginPrepare);
    assert_eq!(
        roundtrip(&at("preparing")).next_action(false),
        Action::Prepare(all_nodes().iter().map(|s| s.to_string()).collect())
    );
    // Crash after some prepare answers were recorded: only the rest are asked.
    let mut partial = at("preparing");
    partial.record_prepare(ok(&["n1", "n2"]), 2);
    assert_eq!(roundtrip(&partial).next_action(false), Action::Prepare(vec!["n3".into(), "n4".into(), "n5".into()]));
    assert_eq!(roundtrip(&at("waiting")).next_action(false), Action::BeginStep(0));
    assert_eq!(roundtrip(&at("committing")).next_action(false), Action::Commit { step: 0, nodes: vec!["n1".into()] });
    assert!(matches!(roundtrip(&at("watching")).next_action(false), Action::Watch { step: 0, ends_at_ms: 1004 }));
    assert_eq!(
        roundtrip(&at("mid-wave")).next_action(false),
        Action::Commit { step: 1, nodes: vec!["n2".into(), "n3".into()] }
    );
    // Mid-wave with one node's commit recorded: only the other is re-sent.
    let mut half = at("mid-wave");
    half.record_commit(1, ok(&["n2"]), BTreeMap::new(), 7);
    assert_eq!(roundtrip(&half).next_action(false), Action::Commit { step: 1, nodes: vec!["n3".into()] });
    // Rolling back, half reverted: only the rest.
    let mut rb = at("mid-wave");
    rb.abort("a", "", 8).expect("abort");
    rb.record_revert(
        vec![("n1".into(), Ok(())), ("n4".into(), Ok(())), ("n2".into(), Err("timeout".into()))],
        false,
        9,
    );
    assert_eq!(
        roundtrip(&rb).next_action(false),
        Action::Revert { rollback: vec!["n2".into(), "n3".into()], abort: vec!["n5".into()] }
    );
    let mut done = new_state(&[], 0);
    complete(&mut done);
    assert_eq!(roundtrip(&done).next_action(false), Action::Finished);
}

#[test]
fn revert_gives_up_after_the_last_attempt_and_records_who() {
    let mut s = at("mid-wave");
    s.fail("deadline".into(), vec!["n2".into()], 1);
    let failing = vec![("n2".to_string(), Err("unreachable".to_string()))];
    let mut rest = ok(&["n1", "n3", "n4", "n5"]);
    rest.extend(failing.clone());
    s.record_revert(rest, false, 2);
    assert!(matches!(s.rollout.phase, Phase::RollingBack { .. }), "retry pending");
    s.record_revert(failing, true, 3);
    assert!(matches!(s.rollout.phase, Phase::RolledBack { .. }));
    assert_eq!(s.nodes["n2"].observed, Observed::RevertFailed);
    assert!(s.rollout.events.last().is_some_and(|e| e.message.contains("n2 could not be reverted")));
}

#[test]
fn stale_window_and_step_signals_are_ignored() {
    let mut s = at("watching");
    assert!(!s.window_passed(3, 5), "wrong step");
    assert!(s.begin_step(2, BTreeMap::new(), 5).is_empty(), "not waiting for step 2");
    assert!(matches!(s.rollout.phase, Phase::Watching { step: 0, .. }));
}

#[test]
fn a_scheduled_rollout_waits_for_its_time_a_freeze_blocks_it_and_an_abort_cancels_it() {
    let scheduled = || {
        let spec = RolloutSpec { start_at_ms: 5000, ..spec(&[], 0) };
        RolloutState::new("ro-1-1".into(), spec, "b1".into(), plan(&[]), "alice".into(), 1, 0)
    };
    let mut s = scheduled();
    assert_eq!(s.rollout.phase, Phase::Scheduled { start_at_ms: 5000 });
    assert_eq!(s.next_action(false), Action::StartAt(5000));
    assert!(s.rollout.events.iter().any(|e| e.message.contains("scheduled to start at 1970-01-01T00:00:05Z")));
    let Action::Hold(reason) = s.next_action(true) else { panic!("a freeze holds it") };
    assert!(reason.contains("scheduled start blocked") && reason.contains("frozen"), "{reason}");
    s.begin_scheduled(4999);
    assert_eq!(s.rollout.phase, Phase::Scheduled { start_at_ms: 5000 }, "not before its time");
    s.begin_scheduled(5003);
    assert_eq!(s.next_action(false), Action::BeginPrepare);
    assert!(s.rollout.events.iter().any(|e| e.message.contains("3 ms after its time")));
    // Cancelled before its time: rolled back with nothing to revert.
    let mut s = scheduled();
    s.abort("bob", "cancelled", 10).expect("abort");
    assert_eq!(s.next_action(false), Action::Revert { rollback: vec![], abort: vec![] });
}

#[test]
fn outside_its_windows_a_rollout_starts_no_new_step_and_says_when_the_next_opens() {
    let windowed = |point| {
        let mut s = at(point);
        s.rollout.spec.windows = window::Windows::parse(&["00:00:10-00:00:20".into()], "UTC").expect("window");
        s
    };
    let s = windowed("waiting");
    assert_eq!(s.next_action_at(false, 15_000), Action::BeginStep(0), "inside");
    let Action::Hold(reason) = s.next_action_at(false, 25_000) else { panic!("held outside") };
    assert!(reason.contains("outside its window (00:00:10-00:00:20 UTC)"), "{reason}");
    assert!(reason.contains("next opens at 1970-01-02T00:00:10Z"), "{reason}");
    assert!(matches!(s.next_action_at(true, 15_000), Action::Hold(r) if r.contains("frozen")));
    assert!(matches!(windowed("staged").next_action_at(false, 25_000), Action::Hold(_)), "the prepare waits too");
    // A running health window, a commit in flight and a rollback are never held by a window.
    assert!(matches!(windowed("watching").next_action_at(false, 25_000), Action::Watch { .. }));
    assert!(matches!(windowed("committing").next_action_at(false, 25_000), Action::Commit { .. }));
}

#[test]
fn the_staged_event_names_few_nodes_and_counts_many() {
    let state = new_state(&[], 0);
    assert_eq!(state.rollout.events[0].message, "staged by alice: canary: n1 | wave-1: n2,n3 | wave-2: n4,n5");
    let big = Step { name: "wave-1".into(), nodes: (0..2000).map(|i| format!("n{i}")).collect(), pause_before: false };
    assert_eq!(step_text(&big), "wave-1: 2000 nodes (n0 … n1999)");
}

#[test]
fn a_state_read_from_the_store_fills_planned_nodes_nothing_was_written_for() {
    let fresh = new_state(&[], 0);
    // The start stored no node state; a later step stored n2's.
    let mut n2 = NodeState::clone(&fresh.nodes["n2"]);
    n2.desired = Desired::Prepared;
    n2.observed = Observed::Prepared;
    let stored: BTreeMap<String, NodeState> = [("n2".to_string(), n2.clone())].into();
    let read = RolloutState::from_store(fresh.rollout.clone(), stored);
    assert_eq!(read.nodes.len(), all_nodes().len());
    assert_eq!(*read.nodes["n2"], n2, "a stored state wins");
    for n in ["n1", "n3", "n4", "n5"] {
        assert_eq!(read.nodes[n], fresh.nodes[n], "{n} reads as planned");
    }
    assert_eq!(RolloutState::from_store(fresh.rollout.clone(), BTreeMap::new()).nodes, fresh.nodes);
}

/// What the engine stores of a transition: the record, and the node states it
/// returned as changed.
fn store(stored: &mut BTreeMap<String, NodeState>, s: &RolloutState, changed: Changed) {
    for id in changed {
        stored.insert(id.clone(), NodeState::clone(&s.nodes[&id]));
    }
}

#[test]
fn a_prepare_every_target_voted_yes_to_writes_no_node_but_one_stored_before() {
    // All yes: the record says every node is prepared; no node state is written.
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    let changed = s.record_prepare(ok(&all_nodes()), 2);
    assert!(changed.is_empty(), "{changed:?}");
    assert_eq!(s.rollout.all_prepared_at_ms, 2);
    let read = RolloutState::from_store(s.rollout.clone(), BTreeMap::new());
    assert_eq!(read, s);
    assert_eq!(read.next_action(false), Action::BeginStep(0));
    assert!(read.nodes.values().all(|n| n.observed == Observed::Prepared));

    // A node stored on its own before its vote (lost mid-prepare, then it
    // answered yes) is written again, or it would read back lost.
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    let mut stored = BTreeMap::new();
    let lost = s.record_health(vec![], vec!["n2".into()], 2);
    assert_eq!(lost, ["n2"]);
    store(&mut stored, &s, lost);
    let changed = s.record_prepare(ok(&all_nodes()), 3);
    assert_eq!(changed, ["n2"]);
    store(&mut stored, &s, changed);
    let read = RolloutState::from_store(s.rollout.clone(), stored);
    assert_eq!(read, s);
    assert_eq!(read.nodes["n2"].observed, Observed::Prepared);

    // One no: every vote is written, as before.
    let mut s = new_state(&[], 1);
    s.begin_prepare(1);
    let mut votes = ok(&all_nodes());
    votes[0].1 = Err("hook failed".into());
    assert_eq!(s.record_prepare(votes, 2).len(), all_nodes().len());
    assert_eq!(s.rollout.all_prepared_at_ms, 0);
}

#[test]
fn what_each_transition_stores_reads_back_as_the_state_the_engine_holds() {
    // A new leader resumes from the store alone: at every point of a rollout
    // that completes, and of ones that fail in their prepare, in a commit and
    // in a health window, the stored record plus the node states written so
    // far must read back as the whole state.
    for fault in ["none", "prepare", "commit", "health", "revert-retried", "revert-given-up"] {
        let mut s = new_state(&[], 0);
        let mut stored = BTreeMap::new();
        let mut t = 10;
        let mut revert_passes = 0;
        loop {
            t += 1;
            let changed = match s.next_action(false) {
                Action::BeginPrepare => s.begin_prepare(t),
                Action::Prepare(nodes) => {
                    let mut results = ok(&nodes.iter().map(String::as_str).collect::<Vec<_>>());
                    if fault == "prepare" {
                        results[2].1 = Err("hook failed".into());
                    }
                    s.record_prepare(results, t)
                }
                Action::BeginStep(step) => s.begin_step(step, BTreeMap::new(), t),
                Action::Commit { step, nodes } => {
                    let mut results = ok(&nodes.iter().map(String::as_str).collect::<Vec<_>>());
                    if fault == "commit" && step == 1 {
                        results[0].1 = Err("commit failed".into());
                    }
                    s.record_commit(step, results, BTreeMap::new(), t)
                }
                Action::Watch { step, .. } => {
                    let mut verdicts = healthy(&s.watched_nodes());
                    if (fault == "health" || fault.starts_with("revert")) && step == 2 {
                        verdicts.push(sick("n4", "1 new unhandled exception"));
                    }
                    let changed = s.record_health(verdicts, vec![], t);
                    s.window_passed(step, t);
                    changed
                }
                Action::Revert { rollback, abort } => {
                    revert_passes += 1;
                    let fails = (fault == "revert-retried" && revert_passes == 1) || fault == "revert-given-up";
                    let results = rollback
                        .iter()
                        .chain(&abort)
                        .map(|n| (n.clone(), if fails && n == "n4" { Err("unreachable".into()) } else { Ok(()) }))
                        .collect();
                    let changed = s.record_revert(results, revert_passes == 3, t);
                    if fault == "health" {
                        assert!(changed.is_empty(), "a rollback that succeeds at once writes no node: {changed:?}");
                    }
                    changed
                }
                Action::Finished => break,
                other => panic!("unexpected {other:?}"),
            };
            store(&mut stored, &s, changed);
            let read = RolloutState::from_store(s.rollout.clone(), stored.clone());
            assert_eq!(read, s, "after {} (fault: {fault})", s.rollout.phase.name());
        }
        let last = if fault == "none" { "completed" } else { "rolled-back" };
        assert_eq!(s.rollout.phase.name(), last, "fault: {fault}");
        let n4 = if fault == "revert-given-up" { Observed::RevertFailed } else { Observed::RolledBack };
        if fault.starts_with("revert") {
            assert_eq!(s.nodes["n4"].observed, n4, "fault: {fault}");
            assert_eq!(s.nodes["n5"].observed, Observed::RolledBack, "fault: {fault}");
        }
    }
    // A rollback's start writes the record only, cancelled before its
    // prepare (nothing was, or reads back as, sent) or later (every node
    // reads back as to be reverted).
    for point in ["staged", "preparing", "watching"] {
        let mut s = at(point);
        let mut stored: BTreeMap<String, NodeState> = s
            .nodes
            .iter()
            .filter(|(_, n)| n.observed != Observed::Pending)
            .map(|(k, n)| (k.clone(), NodeState::clone(n)))
            .collect();
        let changed = s.fail("cancelled by sre".into(), vec![], 2);
        assert!(changed.is_empty(), "{point}: {changed:?}");
        store(&mut stored, &s, changed);
        let read = RolloutState::from_store(s.rollout.clone(), stored);
        assert_eq!(read, s, "cancelled while {point}");
        let want = if point == "staged" { Desired::None } else { Desired::Reverted };
        assert!(read.nodes.values().all(|n| n.desired == want), "{point}: {:?}", read.nodes);
    }
    // The prepare's begin writes no node state, and one read back mid-prepare
    // still prepares every node (and aborts every one in a rollback).
    let mut s = at("staged");
    assert!(s.begin_prepare(1).is_empty());
    let read = RolloutState::from_store(s.rollout.clone(), BTreeMap::new());
    assert_eq!(read.next_action(false), Action::Prepare(all_nodes().iter().map(|n| n.to_string()).collect()));
    s.fail("coordinator lost its lease".into(), vec![], 2);
    let Action::Revert { abort, .. } = s.next_action(false) else { panic!("a revert") };
    assert_eq!(abort.len(), all_nodes().len(), "every node may hold the prepare");
}

#[test]
fn a_copy_for_a_transition_shares_every_node_the_transition_did_not_change() {
    // The engine copies the state, applies a transition to the copy and
    // keeps the old one until the store took the write: at 10,000 nodes a
    // whole copy was ~12 MB per transition.
    let before = at("committing");
    let mut next = before.clone();
    let changed = next.record_commit(0, ok(&["n1"]), BTreeMap::new(), 4);
    assert_eq!(changed, vec!["n1".to_string()]);
    assert_eq!(next.nodes["n1"].observed, Observed::Committed);
    assert_eq!(before.nodes["n1"].observed, Observed::Prepared, "the old state is untouched");
    for id in ["n2", "n3", "n4", "n5"] {
        assert!(Arc::ptr_eq(&before.nodes[id], &next.nodes[id]), "{id} is shared, not copied");
    }
    assert!(!Arc::ptr_eq(&before.nodes["n1"], &next.nodes["n1"]));
    // A health check that finds what the last one found copies nothing.
    next.record_health(healthy(&["n1".to_string()]), vec![], 5);
    let mut again = next.clone();
    assert!(again.record_health(healthy(&["n1".to_string()]), vec![], 6).is_empty());
    assert!(Arc::ptr_eq(&next.nodes["n1"], &again.nodes["n1"]));
}

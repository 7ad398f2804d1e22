//! No drift, by default, on a local fleet of real processes (both stores):
//! a zone server restarted after a rollout serves the fix to its first
//! player, and a process that missed a rollout (its agent was away) is shown
//! drifted in `nodes list` and repaired by the coordinator.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

on_both_stores!(
    zone_server_restarted_after_a_rollout_serves_the_fix_to_its_first_player,
    process_that_missed_a_rollout_is_listed_as_drifted_and_repaired,
);

/// `nodes list --output json`, the entry of `node_id`.
fn listed(s: &Scenario, node_id: &str) -> Value {
    let out = ok(s.fleet.cli(&["--output", "json", "nodes", "list"]).expect("nodes list"));
    let nodes: Value = serde_json::from_str(&out).expect("nodes json");
    nodes["items"].as_array().and_then(|n| n.iter().find(|n| n["nodeId"] == node_id).cloned()).expect("node listed")
}

/// The node's one process's drift entry.
fn drift_of(node: &Value) -> Value {
    node["processes"][0]["drift"].clone()
}

async fn zone_server_restarted_after_a_rollout_serves_the_fix_to_its_first_player(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let (code, rollout) = s.watch(&s.start_rollout(&patch, "1500ms"));
    assert_eq!(code, 0, "{rollout}");
    // kill -9, then started again as its supervisor would: it runs the stack before its port opens.
    let dir = s.dir.path().to_path_buf();
    s.pids[1] = s.fleet.restart_zone(1, &dir, &[]).expect("zone-2 restarted");
    let first = s.fleet.nodes[1].probe.hit_dummy().expect("first hit");
    assert!(first < before[1], "the first player after the restart sees the fix: {} -> {first}", before[1]);
    let pid = s.pids[1];
    // The process's first report may predate its sync (it is asked its stack
    // as it connects); the next one, within a heartbeat, shows it in sync.
    let mut last = Value::Null;
    let node = wait_for("node-2 to report its new process in sync", Duration::from_secs(20), None, || {
        last = listed(&s, "node-2");
        (last["processes"][0]["pid"] == pid && drift_of(&last)["state"] == "in-sync").then(|| last.clone())
    });
    assert!(node.is_ok(), "the restarted process is reported in sync: {last}");
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

async fn process_that_missed_a_rollout_is_listed_as_drifted_and_repaired(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    // node-6's agent is away during the rollout: the node is lost, so the rollout skips it.
    s.fleet.nodes[5].agent.proc.kill();
    wait_for("node-6 lost", Duration::from_secs(20), None, || {
        (listed(&s, "node-6")["liveness"] == "lost").then_some(())
    })
    .expect("node-6 marked lost");
    let patch = s.push("hotfix-damage");
    let (code, rollout) = s.watch(&s.start_rollout(&patch, "1500ms"));
    assert_eq!(code, 0, "{rollout}");
    assert!(node_states(&rollout).iter().all(|(n, _, _)| n != "node-6"), "node-6 was skipped: {rollout}");
    let stranded = s.fleet.nodes[5].probe.hit_dummy().expect("node-6 still serves");
    assert_eq!(stranded, before[5], "node-6's zone missed the hotfix");

    // Shown: its last report lacks the build's newest patch.
    let drift = drift_of(&listed(&s, "node-6"));
    assert_eq!(drift["state"], "drift", "{drift}");
    assert_eq!(drift["missing"], serde_json::json!([patch.clone()]), "{drift}");
    let text = ok(s.fleet.cli(&["nodes", "list"]).expect("nodes list"));
    assert!(text.contains(&format!("DRIFT missing [{}]", &patch[..12])), "{text}");
    assert_eq!(text.matches("in sync").count(), NODES - 1, "the other nodes run the stack: {text}");

    // Repaired once the agent is back: the coordinator commits the missing patch.
    let keys = s.fleet.keys.clone();
    s.restart_agent(5, &keys);
    wait_for("node-6 repaired", Duration::from_secs(30), None, || {
        let d = s.fleet.nodes[5].probe.hit_dummy().ok()?;
        (d < before[5]).then_some(())
    })
    .expect("node-6 committed the hotfix after its agent returned");
    let audit = ok(s.fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    assert!(audit.contains("reconcile.commit"), "the repair is audited: {audit}");
    wait_for("node-6 listed in sync", Duration::from_secs(10), None, || {
        (drift_of(&listed(&s, "node-6"))["state"] == "in-sync").then_some(())
    })
    .expect("node-6 in sync");
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

//! `hotfleet nodes remove` against real processes, on both stores: refused
//! while a live rollout holds the node, and once allowed the node's record
//! is gone for good (a restarted coordinator does not bring it back), each
//! attempt audited. And the coordinator's own removal of a node silent past
//! `--node-expiry`. And every process's module digests as the coordinator
//! lists them: held although heartbeats leave them out, and asked for again
//! by a restarted coordinator.

#[macro_use]
mod common;

use common::*;
use serde_json::Value;

use std::time::{Duration, Instant};

on_both_stores!(
    a_node_is_removed_only_outside_live_rollouts_and_stays_removed,
    a_node_silent_past_the_node_expiry_is_forgotten,
    the_coordinator_lists_each_process_s_digests_after_a_rollout_and_after_its_restart,
);

/// Each node's process digests as the coordinator lists them, sorted.
async fn listed_digests(s: &Scenario) -> Vec<Vec<(String, String)>> {
    let mut client = coordinator_client(&s.fleet.keys, &s.fleet.coordinator_urls()).await;
    let nodes = client.list_nodes(hotfleet_proto::v1::ListNodesRequest::default()).await.expect("list").into_inner();
    let mut by_node: Vec<(String, Vec<(String, String)>)> = nodes
        .nodes
        .into_iter()
        .filter_map(|n| n.status)
        .map(|n| {
            let mut digests: Vec<(String, String)> =
                n.processes.into_iter().flat_map(|p| p.live_digests.into_iter()).collect();
            digests.sort();
            (n.node_id, digests)
        })
        .collect();
    by_node.sort();
    by_node.into_iter().map(|(_, d)| d).collect()
}

/// Each node's process digests as its agent reports them, sorted.
async fn agents_digests(s: &Scenario) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    for status in s.agent_statuses().await {
        let mut digests: Vec<(String, String)> =
            status.processes.into_iter().flat_map(|p| p.live_digests.into_iter()).collect();
        digests.sort();
        out.push(digests);
    }
    out
}

/// Polls until the coordinator lists what the agents run, for up to `within`.
async fn await_listed_as_run(s: &Scenario, within: Duration, what: &str) {
    let until = Instant::now() + within;
    loop {
        let (listed, run) = (listed_digests(s).await, agents_digests(s).await);
        if listed == run && run.iter().all(|d| !d.is_empty()) {
            return;
        }
        assert!(Instant::now() < until, "{what}: the coordinator lists {listed:?}, the agents run {run:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn the_coordinator_lists_each_process_s_digests_after_a_rollout_and_after_its_restart(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    await_listed_as_run(&s, Duration::from_secs(10), "registered").await;
    let before = listed_digests(&s).await;
    let patch = s.push("hotfix-damage");
    let (code, rollout) = s.watch(&s.start_rollout(&patch, "500ms"));
    assert_eq!(code, 0, "{rollout}");
    // The patched module's digest changed: the heartbeat that says so names the new
    // map by fingerprint; the leader asks the first node for it whole, and the
    // other takes that copy (or sends it whole too, if it asked first).
    await_listed_as_run(&s, Duration::from_secs(10), "after the rollout").await;
    assert_ne!(listed_digests(&s).await, before, "the listing follows the patch");
    // Heartbeats now leave the unchanged maps out, and the coordinator keeps them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    await_listed_as_run(&s, Duration::from_secs(1), "while heartbeats leave them out").await;

    // A restarted coordinator (the only one, or on etcd the new term) holds none:
    // it asks for them, and lists them again within a few heartbeats.
    let dir = s.dir.path().to_path_buf();
    s.fleet.restart_coordinator(&dir).expect("restart");
    await_listed_as_run(&s, Duration::from_secs(20), "after the restart").await;
}

fn node_ids(s: &Scenario) -> Vec<String> {
    let out = ok(s.fleet.cli(&["--output", "json", "nodes", "list"]).expect("nodes list"));
    let nodes: Value = serde_json::from_str(&out).expect("json");
    nodes["items"].as_array().expect("nodes").iter().filter_map(|n| n["nodeId"].as_str().map(String::from)).collect()
}

async fn a_node_is_removed_only_outside_live_rollouts_and_stays_removed(backend: Backend) {
    let mut s = Scenario::start_game(backend, Game::ZoneServer, 2, BUILD);
    let patch = s.push("hotfix-damage");
    let args = ["--output", "json", "rollout", "start", &patch, "--health-window", "500ms", "--pause-before", "wave-1"];
    let started: Value = serde_json::from_str(&ok(s.fleet.cli(&args).expect("start"))).expect("json");
    let id = started["rolloutId"].as_str().expect("rollout id").to_string();
    s.wait_until(&id, "the gate", |r| r["waitingReason"].as_str().is_some_and(|w| w.contains("gate before wave-1")));

    let refused = s.fleet.cli(&["nodes", "remove", "node-2", "--reason", "decommissioned"]).expect("remove");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "refused while the rollout holds node-2");
    assert!(stderr.contains("live rollout") && stderr.contains(&id), "{stderr}");

    ok(s.fleet.cli(&["rollout", "abort", &id]).expect("abort"));
    let (code, _) = s.watch(&id);
    assert_eq!(code, 3, "aborted rollouts end rolled back");
    // Stopped first, so it does not register again.
    s.fleet.nodes[1].agent.proc.kill();
    let removed = ok(s.fleet.cli(&["nodes", "remove", "node-2", "--reason", "decommissioned"]).expect("remove"));
    assert!(removed.contains("node-2 removed"), "{removed}");
    assert_eq!(node_ids(&s), ["node-1"]);
    let missing = s.fleet.cli(&["nodes", "remove", "node-2"]).expect("remove again");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"), "a second removal finds nothing");

    let dir = s.dir.path().to_path_buf();
    s.fleet.restart_coordinator(&dir).expect("restart");
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while s.fleet.cli(&["nodes", "list"]).map(|o| !o.status.success()).unwrap_or(true) {
        assert!(std::time::Instant::now() < until, "the restarted coordinator answers");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(node_ids(&s), ["node-1"], "the record is gone from the store, not only from memory");

    let audit = ok(s.fleet.cli(&["--output", "json", "audit", "--limit", "20"]).expect("audit"));
    let records: Value = serde_json::from_str(&audit).expect("json");
    let removals: Vec<(bool, String)> = records["items"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == "node.remove")
        .map(|r| (r["ok"] == true, r["detail"].as_str().unwrap_or_default().to_string()))
        .collect();
    assert_eq!(removals.len(), 2, "the refusal and the removal are audited: {audit}");
    assert!(removals.iter().all(|(_, d)| d.contains("decommissioned")), "{removals:?}");
    assert!(removals.iter().any(|(ok, _)| *ok) && removals.iter().any(|(ok, _)| !*ok), "{removals:?}");
}

async fn a_node_silent_past_the_node_expiry_is_forgotten(backend: Backend) {
    let layout = Layout::for_workspace();
    let dir = tempfile::tempdir().expect("tmp");
    // Lost after 3 s (3 x 1 s advertised), forgotten after 4 s of silence.
    let mut flags: Vec<String> = ["--heartbeat-interval", "500ms", "--node-expiry", "4s"].map(String::from).into();
    if let Backend::Etcd { .. } = backend {
        flags.extend(["--leader-lease".to_string(), format!("{}s", LEASE.as_secs())]);
    }
    let options = FleetOptions {
        nodes: 2,
        build: BUILD.into(),
        backend,
        coordinator_flags: flags,
        game: Game::ZoneServer,
        relay: false,
    };
    let mut fleet = Fleet::start_with(&layout, dir.path(), &options, |_| Vec::new()).expect("fleet");
    fleet.wait_registered().expect("registered");
    fleet.nodes[1].agent.proc.kill();
    let silent = Instant::now();
    let ids = |fleet: &Fleet| -> Vec<String> {
        let out = ok(fleet.cli(&["--output", "json", "nodes", "list"]).expect("nodes list"));
        let nodes: Value = serde_json::from_str(&out).expect("json");
        nodes["items"]
            .as_array()
            .expect("nodes")
            .iter()
            .filter_map(|n| n["nodeId"].as_str().map(String::from))
            .collect()
    };
    while ids(&fleet).contains(&"node-2".to_string()) {
        assert!(silent.elapsed() < Duration::from_secs(20), "node-2 is never forgotten");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(silent.elapsed() >= Duration::from_secs(4), "not before the expiry: {:?}", silent.elapsed());
    assert_eq!(ids(&fleet), ["node-1"], "the node still heartbeating stays");
    let audit = ok(fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    assert!(audit.contains("node.expire") && audit.contains("node-2"), "the expiry is audited: {audit}");
}

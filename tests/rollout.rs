//! End-to-end rollouts on a local fleet of real processes: a coordinator,
//! six agents, six Python zone servers with players connected, driven through
//! the `hotfleet` CLI the way an SRE's runbook does. Every scenario runs twice:
//! `embedded::*` on the coordinator's embedded store, `etcd::*` on a real etcd
//! started on loopback (same scenarios, same assertions).
//!
//! Every test ends with the consistency check of `common`: each process's
//! actual code is what the store says the fleet runs, every process kept its
//! PID, and every player is still connected.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::*;

on_both_stores!(
    hotfix_rolls_out_in_canary_and_waves_with_players_connected,
    prepare_failure_on_one_node_changes_nothing_anywhere,
    commit_failure_in_wave_two_rolls_back_canary_and_wave_one,
    health_gate_failure_on_exceptions_rolls_back,
    health_gate_failure_on_slow_ticks_rolls_back,
    operator_abort_mid_wave_rolls_everything_back,
    agent_killed_mid_wave_rolls_back_under_the_default_policy,
    coordinator_killed_mid_wave_resumes_and_ends_consistent,
    a_gate_held_for_ten_prepare_ttls_then_promoted_completes,
    an_agent_restarted_while_prepared_leaves_no_transaction_pending_after_the_rollback,
);

async fn hotfix_rolls_out_in_canary_and_waves_with_players_connected(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1500ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "completed rollouts exit 0: {rollout}");
    assert_eq!(phase(&rollout), "completed");
    let names: Vec<&str> =
        rollout["steps"].as_array().expect("steps").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names.first(), Some(&"canary"));
    assert!(names.len() >= 3, "canary plus waves: {names:?}");
    assert!(node_states(&rollout).iter().all(|(_, d, o)| d == "committed" && o == "committed"));
    let after = s.damages();
    for (b, a) in before.iter().zip(&after) {
        assert!(a < b, "damage {b} -> {a}: the hotfix must have landed everywhere");
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

async fn prepare_failure_on_one_node_changes_nothing_anywhere(backend: Backend) {
    let mut s = Scenario::start(backend);
    // node-3's agent trusts another release key: it cannot verify the patch and votes no.
    // (Same CA: the agent is still the fleet's node-3, only its release key differs.)
    let other = Keys {
        tls: s.fleet.keys.tls.clone(),
        ..Keys::generate(&s.fleet.layout, &s.dir.path().join("other")).expect("keys")
    };
    s.restart_agent(2, &other);
    s.fleet.wait_registered().expect("re-registered");
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1500ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "rolled back rollouts exit 3: {rollout}");
    assert_eq!(phase(&rollout), "rolled-back");
    assert_eq!(rollout["faultyNodes"], serde_json::json!(["node-3"]));
    assert!(rollout["reason"].as_str().unwrap_or_default().contains("not trusted"), "{}", rollout["reason"]);
    assert!(node_states(&rollout).iter().all(|(_, _, o)| o != "committed"), "nothing was committed anywhere");
    assert_eq!(s.damages(), before);
    assert!(s.assert_consistent(&[]).await.is_empty());
}

async fn commit_failure_in_wave_two_rolls_back_canary_and_wave_one(backend: Backend) {
    // zone-4's migration hook fails: node-4 is wave 2 (canary node-1, wave-1 node-2,3).
    let mut s = Scenario::start_with(backend, |i| {
        if i == 4 {
            vec![("HOTFLEET_DEMO_FAIL_ZONE".into(), "zone-4".into())]
        } else {
            Vec::new()
        }
    });
    let hotfix = s.push("hotfix-damage");
    let (code, _) = s.watch(&s.start_rollout(&hotfix, "1500ms"));
    assert_eq!(code, 0);
    let fixed = s.damages();
    let bad = s.push_on("bad-hook", Some(&hotfix));
    let id = s.start_rollout(&bad, "1500ms");
    let plan = s.status(&id);
    assert_eq!(plan["steps"][2]["nodeIds"], serde_json::json!(["node-4"]), "node-4 is wave 2: {plan}");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "{rollout}");
    assert_eq!(rollout["faultyNodes"], serde_json::json!(["node-4"]));
    assert!(rollout["reason"].as_str().unwrap_or_default().contains("title migration failed"), "{}", rollout["reason"]);
    let states = node_states(&rollout);
    for node in ["node-1", "node-2", "node-3"] {
        let (_, _, observed) = states.iter().find(|(n, _, _)| n == node).expect("node in rollout");
        assert_eq!(observed, "rolled-back", "{node} committed in canary/wave 1 and must be rolled back");
    }
    assert_eq!(s.damages(), fixed, "the hotfix stays, the bad patch is gone");
    for node in &mut s.fleet.nodes {
        let stats = node.probe.stats().expect("stats");
        assert!(stats["player"].get("title").is_none(), "no trace of the bad patch's data: {stats}");
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![hotfix]);
}

async fn health_gate_rolls_back(backend: Backend, patch_name: &str) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push(patch_name);
    // The gate's default margin (20 ms): slow-tick adds 200 ms to every tick.
    let id = s.start_rollout_with_p99_floor(&patch, "1500ms", "20ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "{rollout}");
    assert!(rollout["reason"].as_str().unwrap_or_default().contains("health gate"), "{}", rollout["reason"]);
    assert_eq!(rollout["faultyNodes"], serde_json::json!(["node-1"]), "the canary caught it");
    // Only the canary ever committed; the waves never started.
    let committed: Vec<_> = node_states(&rollout).into_iter().filter(|(_, d, _)| d == "reverted").collect();
    assert!(!committed.is_empty());
    assert_eq!(s.damages(), before);
    assert!(s.assert_consistent(&[]).await.is_empty());
}

async fn health_gate_failure_on_exceptions_rolls_back(backend: Backend) {
    health_gate_rolls_back(backend, "raising-tick").await;
}

async fn health_gate_failure_on_slow_ticks_rolls_back(backend: Backend) {
    health_gate_rolls_back(backend, "slow-tick").await;
}

async fn operator_abort_mid_wave_rolls_everything_back(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "20s");
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    let aborted = Instant::now();
    ok(s.fleet.cli(&["rollout", "abort", &id, "--reason", "players report lag"]).expect("abort"));
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3);
    assert!(aborted.elapsed() < Duration::from_secs(10), "abort skips the 20 s window: {:?}", aborted.elapsed());
    assert!(node_states(&rollout).iter().all(|(_, _, o)| o != "committed"));
    assert_eq!(s.damages(), before);
    let audit = ok(s.fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    // The actor is the CLI's certificate identity (the fleet's operator `sre`).
    let records: serde_json::Value = serde_json::from_str(&audit).expect("audit json");
    let abort = records["items"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["action"] == "rollout.abort"))
        .expect("abort audited");
    assert_eq!(abort["actor"], "sre", "{audit}");
    assert!(s.assert_consistent(&[]).await.is_empty());
}

async fn agent_killed_mid_wave_rolls_back_under_the_default_policy(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "4s");
    // node-3 (wave 1) has committed; kill its agent during the window.
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    s.fleet.nodes[2].agent.proc.kill();
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "{rollout}");
    assert!(rollout["faultyNodes"].as_array().is_some_and(|f| f.contains(&serde_json::json!("node-3"))), "{rollout}");
    // Every reachable node is back; node-3's zone still holds the patch until its agent returns.
    let mut damages = s.damages();
    let stranded = damages.remove(2);
    let mut expected = before.clone();
    expected.remove(2);
    assert_eq!(damages, expected);
    assert!(stranded < before[2], "node-3 committed before its agent died");
    assert!(s.assert_consistent(&[2]).await.is_empty());
    // The agent comes back: the coordinator sees node-3 run a patch the store says is reverted, and reverts it.
    let keys = s.fleet.keys.clone();
    s.restart_agent(2, &keys);
    wait_for("node-3 reconciled", Duration::from_secs(30), None, || {
        let d = s.fleet.nodes[2].probe.hit_dummy().ok()?;
        (d == before[2]).then_some(())
    })
    .expect("node-3 reverted after its agent returned");
    assert!(s.assert_consistent(&[]).await.is_empty());
}

async fn coordinator_killed_mid_wave_resumes_and_ends_consistent(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    let at_kill = s.wait_until(&id, "wave-2", |r| step_name(r) == "wave-2");
    s.fleet.restart_coordinator(s.dir.path()).expect("restart coordinator");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "the restarted coordinator finishes the rollout: {rollout}");
    assert!(epoch_of(&rollout) > epoch_of(&at_kill), "written by the new incarnation: {}", rollout["epoch"]);
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

/// Prepared state lives as long as its rollout: the runbook's recipe (health
/// windows longer than the prepare TTL, a gate held for an hour) on a shortened
/// clock: a 2 s prepare TTL, 3 s health windows, and the wave-2 gate held for
/// 10 TTLs (the leader's heartbeat answers renew the waiting nodes' prepares),
/// then promoted, and the rollout completes. A TTL renewal could not keep alive
/// (under 3 heartbeat intervals) is refused first.
async fn a_gate_held_for_ten_prepare_ttls_then_promoted_completes(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let flags =
        |ttl| ["--waves", "25%,50%,100%", "--health-window", "3s", "--pause-before", "wave-2", "--prepare-ttl", ttl];
    let refused = start_rollout_raw(&s, &patch, &flags("1s"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a 1 s TTL at 500 ms heartbeats is refused");
    assert!(stderr.contains("prepare TTL 1s") && stderr.contains("at least 2s"), "{stderr}");
    let id = held_at_gate(&s, start_rollout_raw(&s, &patch, &flags("2s")), "wave-2");
    let held = Instant::now();
    while held.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_secs(2));
        let status = s.status(&id);
        assert!(status["waitingReason"].as_str().is_some_and(|w| w.contains("wave-2")), "{status}");
        let waiting: Vec<_> = node_states(&status).into_iter().filter(|(_, d, _)| d == "prepared").collect();
        assert!(!waiting.is_empty(), "wave-2 and later wait prepared: {status}");
        assert!(waiting.iter().all(|(_, _, o)| o == "prepared"), "no prepare expired at the gate: {status}");
    }
    for agent in s.agent_statuses().await {
        assert!(agent.expired.is_empty(), "{}: nothing expired: {:?}", agent.node_id, agent.expired);
    }
    ok(s.fleet.cli(&["rollout", "promote", &id]).expect("promote"));
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "promoted after 10 TTLs, the rollout completes: {rollout}");
    assert!(node_states(&rollout).iter().all(|(_, d, o)| d == "committed" && o == "committed"), "{rollout}");
    assert!(s.damages().iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

/// Presumed abort stays: a coordinator SIGKILLed for good while every node
/// holds a rollout's patch prepared renews nothing, and each agent drops the
/// prepare (telling its zone server) once the 2 s TTL has passed and reports
/// the expiry, which a coordinator started later shows and acts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_coordinator_gone_for_good_leaves_nothing_prepared_after_the_ttl() {
    let mut s = Scenario::start(Backend::Embedded);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let started = start_rollout_raw(&s, &patch, &["--pause-before", "canary", "--prepare-ttl", "2s"]);
    let id = held_at_gate(&s, started, "canary");
    for agent in s.agent_statuses().await {
        assert_eq!(agent.prepared.len(), 1, "{}: prepared before the kill", agent.node_id);
    }
    s.fleet.coordinators[0].proc.kill();
    let killed = Instant::now();
    let deadline = killed + Duration::from_secs(15);
    loop {
        let statuses = s.agent_statuses().await;
        if statuses.iter().all(|a| a.prepared.is_empty()) {
            for agent in &statuses {
                assert!(
                    agent.expired.iter().any(|e| e.rollout_id == id && e.patch_id == patch),
                    "{}: the expiry is reported: {:?}",
                    agent.node_id,
                    agent.expired
                );
                assert!(agent.processes.iter().all(|p| p.patch_stack.is_empty()), "nothing was committed");
            }
            break;
        }
        assert!(Instant::now() < deadline, "prepares still held 15 s after the coordinator died: {statuses:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(killed.elapsed() >= Duration::from_millis(1500), "not dropped before its TTL: {:?}", killed.elapsed());
    assert_eq!(s.damages(), before, "the live code never changed");
    // A coordinator started later on the same store resumes the rollout, hears
    // of the expiries in the first heartbeats and says so: the nodes show
    // expired (then aborted, with the expiry as their error), and the rollout
    // rolls back naming it instead of failing at the canary's commit.
    s.fleet.restart_coordinator(s.dir.path()).expect("restart coordinator");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "{rollout}");
    let reason = rollout["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("prepare expired") && reason.contains("TTL of 2s"), "{reason}");
    for node in rollout["nodes"].as_array().expect("nodes") {
        assert!(node["error"].as_str().is_some_and(|e| e.contains("presumed abort")), "{node}");
    }
    assert!(s.assert_consistent(&[]).await.is_empty());
}

/// `hotfleet --output json rollout start PATCH FLAGS...`, raw output.
fn start_rollout_raw(s: &Scenario, patch: &str, flags: &[&str]) -> std::process::Output {
    let mut args = vec!["--output", "json", "rollout", "start", patch];
    args.extend(flags);
    s.fleet.cli(&args).expect("rollout start")
}

/// The id of the rollout `started` started, once it waits at the manual gate before `step`.
fn held_at_gate(s: &Scenario, started: std::process::Output, step: &str) -> String {
    let out: serde_json::Value = serde_json::from_str(&ok(started)).expect("rollout json");
    let id = out["rolloutId"].as_str().expect("rollout id").to_string();
    let gate = format!("gate before {step}");
    s.wait_until(&id, &gate, |r| r["waitingReason"].as_str().is_some_and(|w| w.contains(&gate)));
    id
}

/// An agent restarted while its node holds the patch prepared forgets the
/// prepare; its zone server does not. The commit then finds nothing prepared
/// and the rollout rolls back: the rollback must drop the zone server's
/// prepared copy, or that server refuses every later patch ("transaction …
/// is still pending") until it restarts.
async fn an_agent_restarted_while_prepared_leaves_no_transaction_pending_after_the_rollback(backend: Backend) {
    let mut s = Scenario::start(backend);
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    let at = s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "watching");
    let waiting = node_states(&at)
        .into_iter()
        .position(|(_, _, observed)| observed == "prepared")
        .expect("a node of a later wave waits prepared");
    let keys = s.fleet.keys.clone();
    s.restart_agent(waiting, &keys);
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "the restarted agent's node cannot commit what it forgot: {rollout}");
    assert_eq!(s.damages(), before, "every node is back on the old code");
    // Another patch (the same module, one function more) must prepare and
    // commit everywhere, the restarted agent's zone server included.
    let source = s.fleet.layout.repo.join("examples/patches/hotfix-damage/zone/combat.py");
    let text = std::fs::read_to_string(source).expect("combat.py");
    let root = s.dir.path().join("trees").join("hotfix-again");
    std::fs::create_dir_all(root.join("zone")).expect("tree");
    std::fs::write(root.join("zone/combat.py"), format!("{text}\n\ndef hotfix_again() -> bool:\n    return True\n"))
        .expect("write combat.py");
    let again = s.push_tree(&root, "hotfix-again");
    let id = s.start_rollout(&again, "1s");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "a later patch goes through on every node: {rollout}");
    assert!(s.damages().iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent(&[]).await, vec![again]);
}

/// Every agent advertises a port where nothing listens, so the coordinator
/// cannot dial a single one: the rollout still prepares, commits and checks
/// the health of every node, down the connection each agent opened to the
/// coordinator (`AgentGateway.Attach`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_the_coordinator_cannot_dial_get_their_commands_down_their_own_connection() {
    // Inherited by the agents this starts (the agent reads it as --advertise-addr),
    // and removed once they run.
    std::env::set_var("HOTFLEET_AGENT_ADVERTISE", "127.0.0.1:9");
    let mut s = Scenario::start(Backend::Embedded);
    std::env::remove_var("HOTFLEET_AGENT_ADVERTISE");
    for agent in s.agent_statuses().await {
        assert_eq!(agent.advertise_addr, "127.0.0.1:9", "{} is not reachable at what it advertises", agent.node_id);
    }
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1s");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "completed rollouts exit 0: {rollout}");
    assert!(node_states(&rollout).iter().all(|(_, d, o)| d == "committed" && o == "committed"), "{rollout}");
    let after = s.damages();
    for (b, a) in before.iter().zip(&after) {
        assert!(a < b, "damage {b} -> {a}: the hotfix must have landed everywhere");
    }
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

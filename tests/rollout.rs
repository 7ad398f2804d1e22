//! End-to-end rollouts on a local fleet of real processes: a coordinator on
//! its embedded store, six agents, six Python zone servers with players
//! connected, driven through the `hotfleet` CLI the way an SRE's runbook does.
//!
//! Every test ends with a consistency check: each process's actual code (the
//! digests its runtime reports per module) is what the coordinator's store says
//! the fleet runs, every process kept its PID, and every player is still
//! connected.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use hotfleet_localfleet::*;
use hotfleet_proto::v1::{
    agent_client::AgentClient, agent_gateway_client::AgentGatewayClient, GetPatchStackRequest, StatusRequest,
};
use serde_json::Value;

const BUILD: &str = "zone-1.0";
const NODES: usize = 6;

struct Scenario {
    dir: TempDir,
    fleet: Fleet,
    /// patch id -> module -> sha256, for every patch built here.
    patch_digests: HashMap<String, BTreeMap<String, String>>,
    /// zone server pid at start, per node.
    pids: Vec<u32>,
}

impl Scenario {
    fn start() -> Scenario {
        Self::start_with(|_| Vec::new())
    }

    fn start_with(zone_env: impl Fn(usize) -> Vec<(String, String)>) -> Scenario {
        let layout = Layout::for_workspace();
        let dir = tempfile::tempdir().expect("tmp");
        let fleet = Fleet::start(&layout, dir.path(), NODES, BUILD, &["--heartbeat-interval", "500ms"], zone_env)
            .expect("start fleet");
        fleet.wait_registered().expect("fleet registered");
        let pids = fleet.nodes.iter().map(|n| n.zone.proc.pid()).collect();
        Scenario { dir, fleet, patch_digests: HashMap::new(), pids }
    }

    /// Builds a signed patch from a source tree holding `zone/`, pushes it with the CLI.
    fn push_tree(&mut self, root: &Path, name: &str) -> String {
        let out = self.dir.path().join(format!("{name}.hfpatch"));
        let (path, id) =
            build_patch(&self.fleet.layout, root, &out, BUILD, name, Some(&self.fleet.keys)).expect("build patch");
        let shown =
            self.fleet.layout.cli(&["--output", "json", "patch", "show", &path.display().to_string()]).expect("show");
        let shown: Value = serde_json::from_str(&shown).expect("json");
        let digests = shown["manifest"]["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["sha256"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        self.patch_digests.insert(id.clone(), digests);
        ok(self.fleet.cli(&["patch", "push", &path.display().to_string()]).expect("push"));
        id
    }

    fn push(&mut self, name: &str) -> String {
        let root = self.fleet.layout.repo.join("examples/patches").join(name);
        self.push_tree(&root, name)
    }

    /// Starts a rollout (canary 1, waves 25%,50%,100%) and returns its id.
    fn start_rollout(&self, patch: &str, health_window: &str) -> String {
        let args = vec![
            "--output",
            "json",
            "rollout",
            "start",
            patch,
            "--canary",
            "1",
            "--waves",
            "25%,50%,100%",
            "--health-window",
            health_window,
            "--step-deadline",
            "20s",
        ];
        let out = ok(self.fleet.cli(&args).expect("rollout start"));
        let rollout: Value = serde_json::from_str(&out).expect("rollout json");
        rollout["rolloutId"].as_str().expect("rollout id").to_string()
    }

    /// `rollout watch ID`: returns the exit code and the final snapshot.
    fn watch(&self, id: &str) -> (i32, Value) {
        let out = self.fleet.cli(&["--output", "json", "rollout", "watch", id]).expect("watch");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last =
            stdout.lines().rev().find_map(|l| serde_json::from_str::<Value>(l).ok()).unwrap_or_else(|| {
                panic!("watch printed no snapshot: {stdout}\n{}", String::from_utf8_lossy(&out.stderr))
            });
        (out.status.code().unwrap_or(-1), last)
    }

    fn status(&self, id: &str) -> Value {
        let out = ok(self.fleet.cli(&["--output", "json", "rollout", "status", id]).expect("status"));
        serde_json::from_str(&out).expect("status json")
    }

    /// Polls the rollout until `pred` holds on its status.
    fn wait_until(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let status = self.status(id);
            if pred(&status) {
                return status;
            }
            assert!(status["terminal"] != true, "rollout ended before {what}: {status}");
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {status}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn damages(&mut self) -> Vec<i64> {
        self.fleet.nodes.iter_mut().map(|n| n.probe.hit_dummy().expect("probe attack")).collect()
    }

    /// Each live process runs exactly the fleet patch stack the store records,
    /// module by module; PIDs unchanged; players connected.
    async fn assert_consistent(&mut self, skip_nodes: &[usize]) -> Vec<String> {
        let mut gateway = AgentGatewayClient::connect(self.fleet.coordinator.url()).await.expect("gateway");
        let stack: Vec<String> = gateway
            .get_patch_stack(GetPatchStackRequest { target_build: BUILD.into() })
            .await
            .expect("patch stack")
            .into_inner()
            .patches
            .into_iter()
            .map(|p| p.patch_id)
            .collect();
        let mut expected = base_digests(&self.fleet.layout.repo.join("examples/zone_server"));
        for id in &stack {
            expected.extend(self.patch_digests.get(id).cloned().unwrap_or_default());
        }
        for (i, node) in self.fleet.nodes.iter_mut().enumerate() {
            if skip_nodes.contains(&i) {
                continue;
            }
            let mut agent = AgentClient::connect(node.agent.url()).await.expect("agent");
            let status = agent.status(StatusRequest {}).await.expect("agent status").into_inner().node.expect("node");
            assert_eq!(status.processes.len(), 1, "{}: one zone process", node.agent.node_id);
            let process = &status.processes[0];
            assert_eq!(process.pid, self.pids[i], "{}: the zone server was restarted", node.agent.node_id);
            assert_eq!(process.patch_stack, stack, "{}: process stack differs from the store", node.agent.node_id);
            for (module, digest) in &expected {
                assert_eq!(
                    process.live_digests.get(module),
                    Some(digest),
                    "{}: module {module} does not run the code the store records",
                    node.agent.node_id
                );
            }
            assert!(node.probe.connected(), "player on {} lost its connection", node.zone.name);
        }
        stack
    }
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "hotfleet failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sha256 of every module of the zone package as shipped (no patch applied).
fn base_digests(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let dir = root.join("zone");
    for entry in std::fs::read_dir(&dir).expect("zone package").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".py") else { continue };
        let module = if stem == "__init__" { "zone".to_string() } else { format!("zone.{stem}") };
        let source = std::fs::read(entry.path()).expect("read module");
        out.insert(module, hotfleet_patch::sha256_hex(&source));
    }
    out
}

fn node_states(rollout: &Value) -> Vec<(String, String, String)> {
    rollout["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| {
                    let s = |k: &str| n[k].as_str().unwrap_or_default().to_string();
                    (s("nodeId"), s("desired"), s("observed"))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn phase(rollout: &Value) -> String {
    rollout["phase"].as_str().unwrap_or_default().to_string()
}

fn step_name(rollout: &Value) -> String {
    let i = rollout["currentStep"].as_u64().unwrap_or(0) as usize;
    rollout["steps"][i]["name"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hotfix_rolls_out_in_canary_and_waves_with_players_connected() {
    let mut s = Scenario::start();
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1500ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "completed rollouts exit 0: {rollout}");
    assert_eq!(phase(&rollout), "ROLLOUT_PHASE_COMPLETED");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_failure_on_one_node_changes_nothing_anywhere() {
    let mut s = Scenario::start();
    // node-3's agent trusts another release key: it cannot verify the patch and votes no.
    let other = Keys::generate(&s.fleet.layout, &s.dir.path().join("other")).expect("keys");
    s.fleet.nodes[2].agent.proc.kill();
    s.fleet.nodes[2].agent = AgentProc::start(
        &s.fleet.layout,
        s.dir.path(),
        "node-3",
        Some(&s.fleet.coordinator.url()),
        &other,
        &[("region", "eu"), ("zone", "zone-3")],
    )
    .expect("restart node-3");
    s.fleet.wait_registered().expect("re-registered");
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "1500ms");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3, "rolled back rollouts exit 3: {rollout}");
    assert_eq!(phase(&rollout), "ROLLOUT_PHASE_ROLLED_BACK");
    assert_eq!(rollout["faultyNodes"], serde_json::json!(["node-3"]));
    assert!(rollout["reason"].as_str().unwrap_or_default().contains("not trusted"), "{}", rollout["reason"]);
    assert!(node_states(&rollout).iter().all(|(_, _, o)| o != "committed"), "nothing was committed anywhere");
    assert_eq!(s.damages(), before);
    assert!(s.assert_consistent(&[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_failure_in_wave_two_rolls_back_canary_and_wave_one() {
    // zone-4's migration hook fails: node-4 is wave 2 (canary node-1, wave-1 node-2,3).
    let mut s = Scenario::start_with(|i| {
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
    let bad = s.push("bad-hook");
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

async fn health_gate_rolls_back(patch_name: &str) {
    let mut s = Scenario::start();
    let before = s.damages();
    let patch = s.push(patch_name);
    let id = s.start_rollout(&patch, "1500ms");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gate_failure_on_exceptions_rolls_back() {
    health_gate_rolls_back("raising-tick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gate_failure_on_slow_ticks_rolls_back() {
    health_gate_rolls_back("slow-tick").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_abort_mid_wave_rolls_everything_back() {
    let mut s = Scenario::start();
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "20s");
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "ROLLOUT_PHASE_WATCHING");
    let aborted = Instant::now();
    ok(s.fleet
        .cli(&["--actor", "sre-alice", "rollout", "abort", &id, "--reason", "players report lag"])
        .expect("abort"));
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 3);
    assert!(aborted.elapsed() < Duration::from_secs(10), "abort skips the 20 s window: {:?}", aborted.elapsed());
    assert!(node_states(&rollout).iter().all(|(_, _, o)| o != "committed"));
    assert_eq!(s.damages(), before);
    let audit = ok(s.fleet.cli(&["--output", "json", "audit"]).expect("audit"));
    assert!(audit.contains("sre-alice") && audit.contains("rollout.abort"), "{audit}");
    assert!(s.assert_consistent(&[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_wave_rolls_back_under_the_default_policy() {
    let mut s = Scenario::start();
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "4s");
    // node-3 (wave 1) has committed; kill its agent during the window.
    s.wait_until(&id, "wave-1 health window", |r| step_name(r) == "wave-1" && phase(r) == "ROLLOUT_PHASE_WATCHING");
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
    s.fleet.nodes[2].agent = AgentProc::start(
        &s.fleet.layout,
        s.dir.path(),
        "node-3",
        Some(&s.fleet.coordinator.url()),
        &s.fleet.keys,
        &[("region", "eu"), ("zone", "zone-3")],
    )
    .expect("agent restart");
    wait_for("node-3 reconciled", Duration::from_secs(30), None, || {
        let d = s.fleet.nodes[2].probe.hit_dummy().ok()?;
        (d == before[2]).then_some(())
    })
    .expect("node-3 reverted after its agent returned");
    assert!(s.assert_consistent(&[]).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_wave_resumes_and_ends_consistent() {
    let mut s = Scenario::start();
    let before = s.damages();
    let patch = s.push("hotfix-damage");
    let id = s.start_rollout(&patch, "3s");
    s.wait_until(&id, "wave-2", |r| step_name(r) == "wave-2");
    s.fleet.restart_coordinator(s.dir.path()).expect("restart coordinator");
    let (code, rollout) = s.watch(&id);
    assert_eq!(code, 0, "the restarted coordinator finishes the rollout: {rollout}");
    // proto3 JSON writes 64-bit integers as strings.
    let epoch: u64 = rollout["epoch"].as_str().and_then(|e| e.parse().ok()).unwrap_or(0);
    assert!(epoch >= 2, "written by the new incarnation: {}", rollout["epoch"]);
    let after = s.damages();
    assert!(after.iter().zip(&before).all(|(a, b)| a < b));
    assert_eq!(s.assert_consistent(&[]).await, vec![patch]);
}

//! Engine tests with an in-memory [`AgentClient`] double: ordering of the two
//! phases, every failure path, deadlines, abort, freeze, blast radius, and
//! resume after a crash. (The gRPC path is covered by `tests/rollout.rs`.)

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use hotfleet_proto::v1::RolloutSpec as WireSpec;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    agents::{AgentClient, AgentError, Command, CommandKind, HealthSample, Outcome, Target},
    node::{NodeStatus, ProcessStatus},
    registry::Registry,
    rollout::{health::Sample, Observed, OperatorAction, Phase, RolloutState},
    store::{embedded::EmbeddedStore, Batch, PatchRecord, Store, Write},
};

const PATCH: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const BUILD: &str = "b1";
/// The tick count of a process whose loop is stuck (`Behaviour::no_ticks`).
const NO_TICKS: u64 = 5;

#[derive(Debug, Clone, Default)]
struct Behaviour {
    prepare_no: bool,
    commit_fail: bool,
    exceptions_after_commit: u64,
    p99_after_commit: Option<f64>,
    no_ticks: bool,
    slow_prepare: Option<Duration>,
    slow_commit: Option<Duration>,
    /// The commit is applied at once, its answer arrives this much later
    /// (a node early in a long fan-out).
    late_commit_answer: Option<Duration>,
    /// Health answers take this long.
    slow_health: Option<Duration>,
    /// This many rollbacks are answered "unavailable" (an agent restarting).
    unavailable_rollbacks: u32,
}

#[derive(Default)]
struct FakeAgents {
    behaviour: Mutex<HashMap<String, Behaviour>>,
    /// (kind, node, epoch) in send order.
    log: Mutex<Vec<(String, String, u64)>>,
    committed: Mutex<HashSet<String>>,
    ticks: AtomicU64,
    /// Health queries, by node.
    health_calls: Mutex<HashMap<String, u32>>,
    /// What `width` answers (None: every agent at once).
    width: Option<usize>,
    /// Commands being answered now, and the most at any moment.
    busy: AtomicU64,
    most_busy: AtomicU64,
    /// The rollout kind every command named, in send order.
    kinds: Mutex<Vec<crate::rollout::RolloutKind>>,
}

/// Counts a command as busy while it lives.
struct Busy<'a>(&'a FakeAgents);

impl<'a> Busy<'a> {
    fn start(agents: &'a FakeAgents) -> Self {
        let now = agents.busy.fetch_add(1, Ordering::SeqCst) + 1;
        agents.most_busy.fetch_max(now, Ordering::SeqCst);
        Self(agents)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FakeAgents {
    fn set(&self, node: &str, b: Behaviour) {
        self.behaviour.lock().expect("lock").insert(node.into(), b);
    }

    fn behaviour(&self, node: &str) -> Behaviour {
        self.behaviour.lock().expect("lock").get(node).cloned().unwrap_or_default()
    }

    fn record(&self, kind: &str, to: &Target, cmd: &Command) {
        self.kinds.lock().expect("lock").push(cmd.rollout_kind);
        self.log.lock().expect("lock").push((kind.into(), to.node_id.clone(), cmd.epoch));
    }

    fn sent(&self, kind: &str) -> Vec<String> {
        self.log.lock().expect("lock").iter().filter(|(k, _, _)| k == kind).map(|(_, n, _)| n.clone()).collect()
    }

    fn log(&self) -> Vec<(String, String, u64)> {
        self.log.lock().expect("lock").clone()
    }

    fn health_calls(&self, node: &str) -> u32 {
        self.health_calls.lock().expect("lock").get(node).copied().unwrap_or(0)
    }
}

fn yes() -> Result<Outcome, AgentError> {
    Ok(Outcome { ok: true, ..Outcome::default() })
}

#[async_trait]
impl AgentClient for FakeAgents {
    fn width(&self, agents: usize) -> usize {
        self.width.unwrap_or(agents.max(1))
    }

    async fn send(&self, to: &Target, cmd: &Command, _d: Duration) -> Result<Outcome, AgentError> {
        let _busy = Busy::start(self);
        self.record(cmd.kind.name(), to, cmd);
        let b = self.behaviour(&to.node_id);
        match cmd.kind {
            CommandKind::Prepare { .. } => {
                if let Some(delay) = b.slow_prepare {
                    tokio::time::sleep(delay).await;
                }
                if b.prepare_no {
                    let reason = "SyntaxError: invalid syntax (zone/combat.py, line 3)".into();
                    return Ok(Outcome { ok: false, reason, ..Outcome::default() });
                }
            }
            CommandKind::Commit => {
                if let Some(delay) = b.slow_commit {
                    tokio::time::sleep(delay).await;
                }
                if b.commit_fail {
                    return Ok(Outcome {
                        ok: false,
                        reason: "__reload_instance__ raised KeyError".into(),
                        ..Outcome::default()
                    });
                }
                self.committed.lock().expect("lock").insert(to.node_id.clone());
                if let Some(delay) = b.late_commit_answer {
                    tokio::time::sleep(delay).await;
                }
            }
            CommandKind::Rollback => {
                if b.unavailable_rollbacks > 0 {
                    let mut all = self.behaviour.lock().expect("lock");
                    if let Some(b) = all.get_mut(&to.node_id) {
                        b.unavailable_rollbacks -= 1;
                    }
                    return Err(AgentError::Unreachable {
                        node: to.node_id.clone(),
                        addr: to.addr.clone(),
                        reason: "unknown, retry: game processes not reconnected".into(),
                    });
                }
                self.committed.lock().expect("lock").remove(&to.node_id);
            }
            CommandKind::Abort => {}
        }
        yes()
    }

    async fn health(
        &self,
        to: &Target,
        since: &BTreeMap<String, u64>,
        _d: Duration,
    ) -> Result<Vec<HealthSample>, AgentError> {
        *self.health_calls.lock().expect("lock").entry(to.node_id.clone()).or_default() += 1;
        let b = self.behaviour(&to.node_id);
        if let Some(delay) = b.slow_health {
            tokio::time::sleep(delay).await;
        }
        let committed = self.committed.lock().expect("lock").contains(&to.node_id);
        // A stuck loop's count stands still: counted from a mark, it is 0.
        let ticks = match (b.no_ticks, since.is_empty()) {
            (true, true) => NO_TICKS,
            (true, false) => 0,
            (false, _) => self.ticks.fetch_add(1, Ordering::Relaxed) + 1,
        };
        Ok(vec![HealthSample {
            mark: 1,
            sample: Sample {
                process_id: format!("{}-p", to.node_id),
                pid: 100,
                reachable: true,
                alive: true,
                ticks_since: ticks,
                tick_p99_ms: if committed { b.p99_after_commit.unwrap_or(2.0) } else { 2.0 },
                exceptions_since: if committed { b.exceptions_after_commit } else { 0 },
                game_ok: true,
                game_detail: String::new(),
                error: String::new(),
            },
        }])
    }
}

struct Fixture {
    _dir: Option<tempfile::TempDir>,
    engine: Engine,
    agents: Arc<FakeAgents>,
    registry: Registry,
    cancel: CancellationToken,
}

fn node(id: &str, zone: &str) -> NodeStatus {
    NodeStatus {
        node_id: id.into(),
        labels: [("zone".to_string(), zone.to_string())].into(),
        advertise_addr: format!("{id}:1"),
        processes: vec![ProcessStatus {
            process_id: format!("{id}-p"),
            pid: 100,
            build: BUILD.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn fixture_at(
    dir: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
    agents: Arc<FakeAgents>,
    nodes: usize,
) -> Fixture {
    // A "crashed" predecessor's tasks drop their store handle asynchronously;
    // redb refuses a second open meanwhile.
    let until = Instant::now() + Duration::from_secs(5);
    let embedded = loop {
        match EmbeddedStore::open(&path) {
            Ok(store) => break Arc::new(store),
            Err(err) if Instant::now() > until => panic!("{err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let fence = embedded.acquire_epoch().await.expect("epoch");
    let store: Arc<dyn Store> = embedded;
    let registry = Registry::load(store.clone(), fence, Duration::from_millis(50), Duration::from_millis(200))
        .await
        .expect("registry");
    for i in 1..=nodes {
        registry.register(node(&format!("n{i}"), if i % 2 == 0 { "b" } else { "a" })).await.expect("register");
    }
    let record = PatchRecord {
        patch_id: PATCH.into(),
        target_build: BUILD.into(),
        parent_patch_id: String::new(),
        description: "fix damage".into(),
        author: String::new(),
        created_at: String::new(),
        modules: vec![],
        size_bytes: 1,
        signer_key_id: String::new(),
        pushed_by: String::new(),
        pushed_at_ms: 0,
    };
    store.write(fence, Batch::new().with(Write::PutPatch { record, bundle: vec![1] })).await.expect("patch");
    let cancel = CancellationToken::new();
    let engine = Engine::new(
        store,
        fence,
        registry.clone(),
        agents.clone(),
        EngineConfig {
            max_poll_interval: Duration::from_millis(50),
            revert_attempts: 2,
            store_retry: Duration::from_millis(20),
            unavailable_retry_for: Duration::from_secs(2),
        },
        cancel.clone(),
    );
    engine.resume().await.expect("resume");
    Fixture { _dir: dir, engine, agents, registry, cancel }
}

async fn fixture(nodes: usize) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    fixture_at(Some(dir), path, Arc::new(FakeAgents::default()), nodes).await
}

fn request() -> WireSpec {
    WireSpec {
        patch_id: PATCH.into(),
        selector: "all".into(),
        canary: "1".into(),
        waves: vec!["50%".into(), "100%".into()],
        health_window_ms: 150,
        step_deadline_ms: 1000,
        ..Default::default()
    }
}

async fn wait_for(engine: &Engine, id: &str, timeout: Duration, pred: impl Fn(&RolloutState) -> bool) -> RolloutState {
    let until = Instant::now() + timeout;
    loop {
        let s = engine.get(id).await.expect("get");
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < until, "timed out; rollout is {:?}\nevents: {:#?}", s.rollout.phase, s.rollout.events);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn finish(engine: &Engine, id: &str) -> RolloutState {
    wait_for(engine, id, Duration::from_secs(10), |s| s.rollout.phase.is_terminal()).await
}

fn rolled_back(s: &RolloutState) -> (String, Vec<String>) {
    match &s.rollout.phase {
        Phase::RolledBack { reason, faulty } => (reason.clone(), faulty.clone()),
        other => panic!("expected rolled back, got {other:?}; events {:#?}", s.rollout.events),
    }
}

#[tokio::test]
async fn good_rollout_prepares_everywhere_then_commits_canary_then_waves() {
    let f = fixture(5).await;
    let state = f.engine.start(request(), "alice", false).await.expect("start");
    let steps: Vec<(String, usize)> = state.rollout.steps.iter().map(|s| (s.name.clone(), s.nodes.len())).collect();
    assert_eq!(steps, [("canary".to_string(), 1), ("wave-1".to_string(), 2), ("wave-2".to_string(), 2)]);
    let done = finish(&f.engine, &state.rollout.id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
    assert!(done.nodes.values().all(|n| n.observed == Observed::Committed));

    let log = f.agents.log();
    let first_commit = log.iter().position(|(k, _, _)| k == "commit").expect("commits");
    let last_prepare = log.iter().rposition(|(k, _, _)| k == "prepare").expect("prepares");
    assert!(last_prepare < first_commit, "phase 1 completes before any commit");
    assert_eq!(f.agents.sent("commit")[0], "n1", "canary first");
    assert_eq!(f.agents.sent("prepare").len(), 5);
    assert!(log.iter().all(|(_, _, epoch)| *epoch == f.engine.epoch()), "every command carries the epoch");

    // The patch joined the build's stack, once.
    let stack = f.engine.inner.store.patch_stack(BUILD).await.expect("stack");
    assert_eq!(stack.len(), 1);
    assert_eq!(stack[0].patch_id, PATCH);
    assert_eq!(stack[0].rollout_id, state.rollout.id);
    // And the start is audited.
    let audit = f.engine.inner.store.audit(10, None).await.expect("audit");
    assert!(audit.iter().any(|a| a.action == "rollout.start" && a.actor == "alice"));
}

#[tokio::test]
async fn a_fan_out_starts_no_more_calls_at_once_than_the_client_runs() {
    let agents = Arc::new(FakeAgents { width: Some(2), ..FakeAgents::default() });
    for i in 1..=6 {
        agents
            .set(&format!("n{i}"), Behaviour { slow_prepare: Some(Duration::from_millis(30)), ..Behaviour::default() });
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let f = fixture_at(Some(dir), path, agents, 6).await;
    let state = f.engine.start(request(), "alice", false).await.expect("start");
    let done = finish(&f.engine, &state.rollout.id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
    assert_eq!(f.agents.sent("prepare").len(), 6);
    assert_eq!(f.agents.most_busy.load(Ordering::SeqCst), 2, "six slow prepares, two at a time");
}

#[tokio::test]
async fn a_revert_is_a_rollout_of_its_own_kind_that_takes_the_patch_off_the_stack() {
    use crate::rollout::RolloutKind;
    let f = fixture(3).await;
    let revert = || WireSpec { kind: hotfleet_proto::v1::RolloutKind::Revert.into(), ..request() };
    // Nothing to revert yet: refused before any node is touched, naming the empty stack.
    let err = f.engine.start(revert(), "alice", false).await.expect_err("not on the stack").to_string();
    assert!(err.contains("is not on build b1's patch stack (it is empty)"), "{err}");
    assert!(f.agents.log().is_empty());

    let id = f.engine.start(request(), "alice", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    let applied = f.agents.log().len();
    let state = f.engine.start(revert(), "bob", false).await.expect("revert");
    assert_eq!(state.rollout.spec.kind, RolloutKind::Revert);
    let done = finish(&f.engine, &state.rollout.id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
    assert!(done.nodes.values().all(|n| n.observed == Observed::Committed), "the revert committed everywhere");

    let kinds = f.agents.kinds.lock().expect("lock").clone();
    assert!(kinds[..applied].iter().all(|k| *k == RolloutKind::Apply));
    assert!(kinds[applied..].iter().all(|k| *k == RolloutKind::Revert), "every command of the revert says so");
    assert!(f.engine.inner.store.patch_stack(BUILD).await.expect("stack").is_empty(), "off the stack");
    let audit = f.engine.inner.store.audit(10, None).await.expect("audit");
    assert!(audit.iter().any(|a| a.action == "rollout.start" && a.detail.starts_with("revert of patch")));
}

#[tokio::test]
async fn a_revert_rolled_back_leaves_the_patch_on_the_stack() {
    let f = fixture(3).await;
    let id = f.engine.start(request(), "alice", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    f.agents.set("n2", Behaviour { commit_fail: true, ..Default::default() });
    let revert = WireSpec { kind: hotfleet_proto::v1::RolloutKind::Revert.into(), ..request() };
    let id = f.engine.start(revert, "bob", false).await.expect("revert").rollout.id;
    let done = finish(&f.engine, &id).await;
    rolled_back(&done);
    assert!(!f.agents.sent("rollback").is_empty(), "the revert itself was rolled back");
    let stack = f.engine.inner.store.patch_stack(BUILD).await.expect("stack");
    assert_eq!(stack.iter().map(|e| e.patch_id.as_str()).collect::<Vec<_>>(), [PATCH]);
}

#[tokio::test]
async fn a_prepare_no_aborts_everywhere_and_commits_nothing() {
    let f = fixture(4).await;
    f.agents.set("n3", Behaviour { prepare_no: true, ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let done = finish(&f.engine, &id).await;
    let (reason, faulty) = rolled_back(&done);
    assert!(reason.contains("prepare failed on n3") && reason.contains("SyntaxError"), "{reason}");
    assert_eq!(faulty, ["n3"]);
    assert!(f.agents.sent("commit").is_empty(), "nothing committed anywhere");
    assert!(f.agents.sent("rollback").is_empty());
    let mut aborted = f.agents.sent("abort");
    aborted.sort();
    assert_eq!(aborted, ["n1", "n2", "n3", "n4"]);
    assert!(f.engine.inner.store.patch_stack(BUILD).await.expect("stack").is_empty());
}

#[tokio::test]
async fn a_commit_failure_in_wave_two_rolls_back_canary_and_wave_one() {
    let f = fixture(5).await;
    // Plan: canary n1, wave-1 n2,n3, wave-2 n4,n5.
    f.agents.set("n5", Behaviour { commit_fail: true, ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let done = finish(&f.engine, &id).await;
    let (reason, faulty) = rolled_back(&done);
    assert!(reason.contains("wave-2: commit failed on n5") && reason.contains("KeyError"), "{reason}");
    assert_eq!(faulty, ["n5"]);
    let mut rolled = f.agents.sent("rollback");
    rolled.sort();
    assert_eq!(rolled, ["n1", "n2", "n3", "n4", "n5"]);
    // One command per node: the agent's rollback also drops a prepare whose commit never landed.
    assert_eq!(f.agents.sent("abort"), Vec::<String>::new());
    assert!(f.agents.committed.lock().expect("lock").is_empty(), "nothing left committed");
    assert!(done.nodes.values().all(|n| n.observed == Observed::RolledBack));
}

#[tokio::test]
async fn new_exceptions_fail_the_gate() {
    let f = fixture(3).await;
    f.agents.set("n1", Behaviour { exceptions_after_commit: 2, ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    assert!(reason.contains("2 new unhandled exception"), "{reason}");
    assert_eq!(faulty, ["n1"]);
    assert_eq!(f.agents.sent("commit"), ["n1"], "waves never started");
}

#[tokio::test]
async fn slow_ticks_fail_the_gate() {
    let f = fixture(3).await;
    f.agents.set("n2", Behaviour { p99_after_commit: Some(250.0), ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    assert!(reason.contains("tick p99 250.0 ms"), "{reason}");
    assert_eq!(faulty, ["n2"]);
}

#[tokio::test]
async fn no_health_data_fails_the_gate() {
    let f = fixture(2).await;
    f.agents.set("n1", Behaviour { no_ticks: true, ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let (reason, _) = rolled_back(&finish(&f.engine, &id).await);
    assert!(reason.contains("no health data"), "{reason}");
}

#[tokio::test]
async fn a_slow_node_cannot_stall_prepare_past_the_deadline() {
    let f = fixture(3).await;
    f.agents.set("n2", Behaviour { slow_prepare: Some(Duration::from_secs(30)), ..Default::default() });
    let mut req = request();
    req.step_deadline_ms = 300;
    let started = Instant::now();
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(reason.contains("n2") && reason.contains("deadline"), "{reason}");
    assert_eq!(faulty, ["n2"]);
    assert!(f.agents.sent("commit").is_empty());
}

#[tokio::test]
async fn abort_during_a_health_window_rolls_back_at_once_and_commits_nothing_new() {
    let f = fixture(5).await;
    let mut req = request();
    req.health_window_ms = 60_000;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| matches!(s.rollout.phase, Phase::Watching { .. })).await;
    let started = Instant::now();
    let acked = f.engine.act(&id, OperatorAction::Abort, "bob", "players report lag").await.expect("abort");
    assert!(matches!(acked.rollout.phase, Phase::RollingBack { .. }), "acknowledged as rolling back");
    let commits_at_ack = f.agents.sent("commit").len();
    let done = finish(&f.engine, &id).await;
    assert!(started.elapsed() < Duration::from_secs(3), "rollback skipped the 60 s window");
    let (reason, _) = rolled_back(&done);
    assert_eq!(reason, "aborted by bob: players report lag");
    assert_eq!(f.agents.sent("commit").len(), commits_at_ack, "no commit after the abort was acknowledged");
    assert_eq!(f.agents.sent("rollback"), ["n1"]);
    let audit = f.engine.inner.store.audit(10, None).await.expect("audit");
    assert!(audit.iter().any(|a| a.action == "rollout.abort" && a.actor == "bob" && a.ok));
    // Refused once finished, and the refusal is audited.
    assert!(f.engine.act(&id, OperatorAction::Abort, "bob", "").await.is_err());
}

#[tokio::test]
async fn abort_while_prepares_are_in_flight_never_commits() {
    let f = fixture(3).await;
    f.agents.set("n3", Behaviour { slow_prepare: Some(Duration::from_secs(5)), ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.rollout.phase == Phase::Preparing).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.engine.act(&id, OperatorAction::Abort, "bob", "").await.expect("abort");
    let done = finish(&f.engine, &id).await;
    rolled_back(&done);
    assert!(f.agents.sent("commit").is_empty());
    let mut aborted = f.agents.sent("abort");
    aborted.sort();
    assert_eq!(aborted, ["n1", "n2", "n3"], "in-flight prepares are aborted too");
}

#[tokio::test]
async fn abort_while_committing_reverts_the_nodes_a_commit_may_have_reached() {
    let f = fixture(3).await;
    f.agents.set("n1", Behaviour { slow_commit: Some(Duration::from_secs(5)), ..Default::default() });
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| matches!(s.rollout.phase, Phase::Committing { .. })).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.engine.act(&id, OperatorAction::Abort, "bob", "").await.expect("abort");
    rolled_back(&finish(&f.engine, &id).await);
    assert_eq!(f.agents.sent("rollback"), ["n1"]);
    assert_eq!(f.agents.sent("commit"), ["n1"]);
}

#[tokio::test]
async fn manual_gate_pauses_until_promote() {
    let f = fixture(3).await;
    let mut req = request();
    req.pause_before = vec!["wave-1".into()];
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    let held = wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.waiting_reason(false).is_some()).await;
    assert_eq!(held.rollout.phase, Phase::Waiting { next_step: 1 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.agents.sent("commit"), ["n1"], "held at the gate");
    f.engine.act(&id, OperatorAction::Promote, "carol", "canary looks fine").await.expect("promote");
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
}

#[tokio::test]
async fn pause_and_resume() {
    let f = fixture(3).await;
    let mut req = request();
    req.health_window_ms = 300;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| matches!(s.rollout.phase, Phase::Watching { step: 0, .. }))
        .await;
    f.engine.act(&id, OperatorAction::Pause, "a", "").await.expect("pause");
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.rollout.phase == Phase::Waiting { next_step: 1 }).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.agents.sent("commit").len(), 1);
    f.engine.act(&id, OperatorAction::Resume, "a", "").await.expect("resume");
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
}

#[tokio::test]
async fn freeze_refuses_new_rollouts_and_holds_running_ones() {
    let f = fixture(3).await;
    let mut req = request();
    req.health_window_ms = 300;
    let id = f.engine.start(req.clone(), "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| matches!(s.rollout.phase, Phase::Watching { step: 0, .. }))
        .await;
    f.engine.set_freeze(Some("incident".into()), "sre").await.expect("freeze");
    let err = f.engine.start(req.clone(), "a", false).await.expect_err("frozen");
    assert!(err.to_string().contains("frozen by sre (incident)"), "{err}");
    let held = wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.waiting_reason(true).is_some()).await;
    assert_eq!(held.rollout.phase, Phase::Waiting { next_step: 1 });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(f.agents.sent("commit").len(), 1, "no new step while frozen");
    // An abort still goes through while frozen.
    f.engine.set_freeze(None, "sre").await.expect("unfreeze");
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
}

#[tokio::test]
async fn a_second_rollout_on_the_same_nodes_is_refused_naming_the_first() {
    let f = fixture(4).await;
    let mut req = request();
    req.pause_before = vec!["canary".into()];
    let first = f.engine.start(req.clone(), "a", false).await.expect("start").rollout.id;
    let mut second = request();
    second.selector = "zone=b".into();
    let err = f.engine.start(second, "a", false).await.expect_err("conflict");
    assert!(err.to_string().contains(&first) && err.to_string().contains("n2"), "{err}");
    f.engine.act(&first, OperatorAction::Abort, "a", "").await.expect("abort");
    finish(&f.engine, &first).await;
    let mut third = request();
    third.selector = "zone=b".into();
    f.engine.start(third, "a", false).await.expect("nodes free again");
}

#[tokio::test]
async fn a_lost_node_rolls_back_under_the_default_policy() {
    let f = fixture(3).await;
    let mut req = request();
    req.health_window_ms = 2_000;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| matches!(s.rollout.phase, Phase::Watching { step: 0, .. }))
        .await;
    // n1 (the canary) stops heartbeating; the others keep beating.
    let until = Instant::now() + Duration::from_secs(5);
    while !f.registry.is_lost("n1") && Instant::now() < until {
        for n in ["n2", "n3"] {
            f.registry.heartbeat(node(n, "a")).await.expect("hb");
        }
        f.registry.sweep();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    assert!(reason.contains("lost"), "{reason}");
    assert_eq!(faulty, ["n1"]);
}

#[tokio::test]
async fn bad_specs_are_refused_clearly() {
    let f = fixture(2).await;
    let cases: Vec<(WireSpec, &str)> = vec![
        (WireSpec { patch_id: "nope".into(), ..request() }, "not a patch id"),
        (WireSpec { patch_id: "b".repeat(64), ..request() }, "not found"),
        (WireSpec { selector: "zone in a".into(), ..request() }, "invalid selector"),
        (WireSpec { selector: "zone=z".into(), ..request() }, "matches no live node"),
        (WireSpec { waves: vec!["150%".into()], ..request() }, "invalid size"),
        (WireSpec { pause_before: vec!["wave-9".into()], ..request() }, "unknown step"),
        (WireSpec { tick_p99_factor: 0.5, ..request() }, "must be >= 1.0"),
    ];
    for (req, expected) in cases {
        let err = f.engine.start(req, "a", false).await.expect_err(expected);
        assert!(err.to_string().contains(expected), "{err} (expected {expected})");
    }
    let dry = f.engine.start(request(), "a", true).await.expect("dry run");
    assert!(dry.rollout.id.is_empty(), "a dry run names no rollout");
    assert!(f.engine.get("ro-1-1").await.is_err(), "a dry run stores nothing");
    // A bundle the coordinator does not hold plans with the build its caller read from it.
    let unstored = WireSpec { patch_id: "b".repeat(64), ..request() };
    let dry = f.engine.dry_run_unstored(unstored.clone(), "a", BUILD).await.expect("dry run of a local bundle");
    assert!(dry.rollout.id.is_empty() && !dry.nodes.is_empty(), "planned, unnamed");
    assert_eq!(dry.rollout.target_build, BUILD);
    let err = f.engine.dry_run_unstored(unstored.clone(), "a", "b9").await.expect_err("no node runs b9");
    assert!(err.to_string().contains("b9"), "{err}");
    // A stored patch keeps its own build, whatever the caller says.
    let stored = f.engine.dry_run_unstored(request(), "a", "b9").await.expect("stored");
    assert_eq!(stored.rollout.target_build, BUILD);
    let real = f.engine.start(request(), "a", false).await.expect("start");
    assert_eq!(real.rollout.id, "ro-1-1", "the dry run used up no id");
}

#[tokio::test]
async fn a_crash_mid_wave_resumes_and_finishes_under_a_new_epoch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let agents = Arc::new(FakeAgents::default());
    let (id, old_epoch) = {
        let f = fixture_at(None, path.clone(), agents.clone(), 5).await;
        let mut req = request();
        req.health_window_ms = 400;
        let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
        wait_for(&f.engine, &id, Duration::from_secs(5), |s| {
            matches!(s.rollout.phase, Phase::Watching { step: 1, .. })
        })
        .await;
        // kill -9: tasks dropped mid-window, nothing drained.
        f.cancel.cancel();
        f.engine.abort_all();
        (id, f.engine.epoch())
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let f = fixture_at(Some(dir), path, agents.clone(), 0).await;
    assert!(f.engine.epoch() > old_epoch);
    for i in 1..=5 {
        f.registry.register(node(&format!("n{i}"), "a")).await.expect("re-register");
    }
    let done = finish(&f.engine, &id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
    assert_eq!(done.rollout.epoch, f.engine.epoch(), "the new incarnation wrote the end");
    // Each node committed exactly once overall; commands after the restart
    // carry the new epoch.
    let commits = agents.sent("commit");
    let unique: HashSet<&String> = commits.iter().collect();
    assert_eq!(unique.len(), 5);
    let after: Vec<_> = agents.log().into_iter().filter(|(k, _, e)| k == "commit" && *e == f.engine.epoch()).collect();
    assert_eq!(after.len(), 2, "only wave-2 was committed by the new incarnation: {after:?}");
}

/// The start writes the rollout's record and no node state (each node's first
/// state follows from the plan): the store's reads show every planned node,
/// and a coordinator that crashed before any node moved resumes them all.
#[tokio::test]
async fn a_start_writes_no_node_state_and_a_crash_before_any_node_moved_resumes_them_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let agents = Arc::new(FakeAgents::default());
    let (id, started) = {
        let f = fixture_at(None, path.clone(), agents.clone(), 4).await;
        let soon = WireSpec { start_at_ms: now_ms() + 600, ..request() };
        let started = f.engine.start(soon, "a", false).await.expect("scheduled");
        let id = started.rollout.id.clone();
        let store = f.registry.store();
        assert!(store.rollout_nodes(&id).await.expect("nodes").is_empty(), "no node state written at start");
        let stored = crate::reads::stored_rollout(store.as_ref(), &id).await.expect("stored");
        assert_eq!(stored.nodes, started.nodes, "every planned node reads as it was started");
        f.cancel.cancel();
        f.engine.abort_all();
        (id, started)
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let f = fixture_at(Some(dir), path, agents.clone(), 0).await;
    for i in 1..=4 {
        f.registry.register(node(&format!("n{i}"), "a")).await.expect("re-register");
    }
    let resumed = f.engine.get(&id).await.expect("resumed");
    assert_eq!(resumed.nodes.len(), started.nodes.len());
    let done = finish(&f.engine, &id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
    let commits: HashSet<String> = agents.sent("commit").into_iter().collect();
    assert_eq!(commits.len(), 4, "every planned node committed: {commits:?}");
}

#[tokio::test]
async fn a_crash_while_rolling_back_resumes_the_rollback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let agents = Arc::new(FakeAgents::default());
    let id = {
        let f = fixture_at(None, path.clone(), agents.clone(), 3).await;
        let mut req = request();
        req.pause_before = vec!["wave-1".into()];
        let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
        wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.rollout.phase == Phase::Waiting { next_step: 1 }).await;
        // Record RollingBack, then die before any revert is sent.
        f.cancel.cancel();
        f.engine.abort_all();
        let handle = f.engine.handle(&id).expect("handle");
        f.engine
            .transact(&handle, Vec::new(), |s| Ok(((), s.fail("simulated".into(), vec![], 1))))
            .await
            .expect("record");
        id
    };
    assert!(agents.sent("rollback").is_empty());
    let f = fixture_at(Some(dir), path, agents.clone(), 3).await;
    let (reason, _) = rolled_back(&finish(&f.engine, &id).await);
    assert_eq!(reason, "simulated");
    assert_eq!(agents.sent("rollback"), ["n1"]);
}

#[tokio::test]
async fn a_nodes_live_rollouts_are_its_unfinished_ones() {
    let f = fixture(3).await;
    let mut req = request();
    req.pause_before = vec!["wave-1".into()];
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    assert_eq!(f.engine.live_rollouts_of("n2"), std::slice::from_ref(&id), "renewed while staged, prepared or held");
    assert!(f.engine.live_rollouts_of("n9").is_empty(), "a node outside every rollout renews nothing");
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.waiting_reason(false).is_some()).await;
    assert_eq!(f.engine.live_rollouts_of("n3"), std::slice::from_ref(&id));
    f.engine.act(&id, OperatorAction::Promote, "a", "").await.expect("promote");
    finish(&f.engine, &id).await;
    assert!(f.engine.live_rollouts_of("n2").is_empty(), "a finished rollout keeps nothing alive");
}

#[tokio::test]
async fn a_prepare_the_agent_reports_expired_rolls_back_at_the_gate_naming_the_expiry() {
    let f = fixture(3).await;
    let mut req = request();
    req.pause_before = vec!["wave-1".into()];
    req.prepare_ttl_seconds = 5;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.waiting_reason(false).is_some()).await;
    // n3's agent presumed abort and says so in its next heartbeat.
    let mut status = node("n3", "a");
    status.expired =
        vec![crate::node::PreparedPatch { rollout_id: id.clone(), patch_id: PATCH.into(), expires_at_ms: now_ms() }];
    f.registry.heartbeat(status).await.expect("heartbeat");
    let done = finish(&f.engine, &id).await;
    let (reason, faulty) = rolled_back(&done);
    assert!(reason.contains("prepare expired") && reason.contains("TTL of 5s"), "{reason}");
    assert_eq!(faulty, ["n3"]);
    assert!(done.nodes["n3"].error.contains("presumed abort"), "{:?}", done.nodes["n3"]);
    assert_eq!(f.agents.sent("commit"), ["n1"], "found at the gate, not at a commit");
    assert!(f.agents.sent("rollback").contains(&"n1".to_string()), "the canary is rolled back");
}

/// A rollout with a commit failure in wave 1 (n2), so the canary (n1) is rolled back.
async fn rollback_of_the_canary(unavailable_rollbacks: u32) -> (Fixture, RolloutState) {
    let f = fixture(3).await;
    f.agents.set("n1", Behaviour { unavailable_rollbacks, ..Behaviour::default() });
    f.agents.set("n2", Behaviour { commit_fail: true, ..Behaviour::default() });
    let mut req = request();
    req.step_deadline_ms = 10_000;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    let done = finish(&f.engine, &id).await;
    (f, done)
}

#[tokio::test]
async fn a_rollback_answered_unavailable_while_the_agent_restarts_is_asked_again_until_it_lands() {
    // Four "unavailable" answers take 1.5 s of retries: more than the old
    // three quick attempts, less than the 2 s budget.
    let (f, done) = rollback_of_the_canary(4).await;
    let (reason, _) = rolled_back(&done);
    assert!(reason.contains("KeyError"), "{reason}");
    assert_eq!(done.nodes["n1"].observed, Observed::RolledBack, "{:#?}", done.rollout.events);
    assert!(!f.agents.committed.lock().expect("lock").contains("n1"), "the rollback reached n1");
    assert_eq!(f.agents.sent("rollback").iter().filter(|n| *n == "n1").count(), 5);
}

#[tokio::test]
async fn a_rollback_that_stays_unavailable_gives_up_within_the_budget() {
    let started = Instant::now();
    let (f, done) = rollback_of_the_canary(u32::MAX).await;
    rolled_back(&done);
    assert_ne!(done.nodes["n1"].observed, Observed::RolledBack, "{:#?}", done.nodes["n1"]);
    assert!(f.agents.committed.lock().expect("lock").contains("n1"));
    // The 2 s budget once, then the later attempts are quick.
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
}

#[tokio::test]
async fn a_shutdown_mid_health_window_judges_nothing_and_the_rollout_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_path_buf();
    let agents = Arc::new(FakeAgents::default());
    let id = {
        let f = fixture_at(None, path.clone(), agents.clone(), 3).await;
        let mut req = request();
        req.health_window_ms = 1_500;
        let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
        wait_for(&f.engine, &id, Duration::from_secs(5), |s| {
            matches!(s.rollout.phase, Phase::Watching { step: 0, .. })
        })
        .await;
        // A health poll is in flight when shutdown begins; meanwhile every
        // node looks lost (a stopping coordinator hears no heartbeats).
        agents.set("n1", Behaviour { slow_health: Some(Duration::from_millis(800)), ..Behaviour::default() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        f.cancel.cancel();
        assert_eq!(f.registry.sweep().len(), 3, "silent since registration");
        f.engine.join().await;
        let stored = crate::reads::stored_rollout(f.engine.inner.store.as_ref(), &id).await.expect("stored");
        assert!(
            matches!(stored.rollout.phase, Phase::Watching { step: 0, .. }),
            "nothing judged after shutdown began: {:?}\n{:#?}",
            stored.rollout.phase,
            stored.rollout.events
        );
        id
    };
    agents.set("n1", Behaviour::default());
    let f = fixture_at(Some(dir), path, agents.clone(), 3).await;
    let done = finish(&f.engine, &id).await;
    assert_eq!(done.rollout.phase, Phase::Completed, "{:#?}", done.rollout.events);
}

#[tokio::test]
async fn the_sweeper_never_expires_a_node_a_live_rollout_holds_and_forgets_it_after() {
    let f = fixture(3).await;
    let mut req = request();
    req.pause_before = vec!["wave-1".into()];
    req.max_unhealthy = 2;
    let id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &id, Duration::from_secs(5), |s| s.waiting_reason(false).is_some()).await;
    let sweeper = crate::sweeper::Sweeper {
        registry: f.registry.clone(),
        engine: f.engine.clone(),
        store: f.engine.inner.store.clone(),
        fence: f.engine.inner.fence,
        node_expiry: Duration::from_millis(300),
        audit: Default::default(),
    };
    // n3 (wave-1) falls silent past the expiry; n1 and n2 keep beating.
    let until = Instant::now() + Duration::from_millis(700);
    while Instant::now() < until {
        for n in ["n1", "n2"] {
            f.registry.heartbeat(node(n, "a")).await.expect("hb");
        }
        f.registry.sweep();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(f.registry.expired(sweeper.node_expiry), ["n3"]);
    assert!(sweeper.expire_nodes().await.is_empty(), "held by the live rollout");
    assert!(f.registry.get("n3").is_some());
    f.engine.act(&id, OperatorAction::Abort, "a", "").await.expect("abort");
    finish(&f.engine, &id).await;
    assert_eq!(sweeper.expire_nodes().await, ["n3"]);
    let stored: Vec<String> =
        f.engine.inner.store.nodes().await.expect("nodes").iter().map(|r| r.node_id().to_string()).collect();
    assert_eq!(stored, ["n1", "n2"], "the record is gone from the store");
    let audit = f.engine.inner.store.audit(1, None).await.expect("audit");
    assert_eq!((audit[0].action.as_str(), audit[0].target.as_str()), ("node.expire", "n3"));

    // The same sweeper keeps the audit log to its retention.
    let keep_two =
        crate::sweeper::Sweeper { audit: crate::store::AuditRetention { keep: 2, max_age: Duration::ZERO }, ..sweeper };
    let before = f.engine.inner.store.audit(1000, None).await.expect("audit").len() as u64;
    assert_eq!(keep_two.trim_audit().await, before - 2);
    let kept = f.engine.inner.store.audit(1000, None).await.expect("audit");
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0].action, "node.expire", "the newest stay");
}

#[tokio::test]
async fn the_sweeper_compacts_finished_rollouts_only_and_they_read_back_the_same() {
    let f = fixture(3).await;
    let store = f.engine.inner.store.clone();
    let done_id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &done_id).await.rollout.phase, Phase::Completed);
    let before = store.rollout_nodes(&done_id).await.expect("nodes");
    assert!(before.values().any(|n| !n.baselines.is_empty()), "a finished rollout keeps its baselines until compacted");
    let mut req = request();
    req.pause_before = vec!["wave-1".into()];
    let live_id = f.engine.start(req, "a", false).await.expect("start").rollout.id;
    wait_for(&f.engine, &live_id, Duration::from_secs(5), |s| s.waiting_reason(false).is_some()).await;
    let live_before = store.rollout_nodes(&live_id).await.expect("nodes");
    let sweeper = crate::sweeper::Sweeper {
        registry: f.registry.clone(),
        engine: f.engine.clone(),
        store: store.clone(),
        fence: f.engine.inner.fence,
        node_expiry: Duration::from_secs(3600),
        audit: Default::default(),
    };
    let mut done = HashSet::new();
    assert_eq!(sweeper.compact_finished(&mut done).await, 1);
    assert_eq!(done, HashSet::from([done_id.clone()]));
    // Every node still answers its final state, without the baselines.
    let expected: BTreeMap<String, _> = before.iter().map(|(id, n)| (id.clone(), n.summary())).collect();
    assert_eq!(store.rollout_nodes(&done_id).await.expect("nodes"), expected);
    let got = f.engine.get(&done_id).await.expect("get");
    assert_eq!(got.nodes.values().filter(|n| n.observed == Observed::Committed).count(), 3);
    // The live rollout is untouched, asked directly or by a new term's sweep.
    assert!(!store.compact_rollout(f.engine.inner.fence, &live_id).await.expect("compact"));
    assert_eq!(sweeper.compact_finished(&mut HashSet::new()).await, 0, "nothing left to fold");
    assert_eq!(store.rollout_nodes(&live_id).await.expect("nodes"), live_before);
}

/// Heartbeats like a real agent: every 20 ms each node reports its process's
/// health (counted from its start, with `exceptions` once committed) and,
/// once committed, the patch on its stack.
fn push_health(f: &Fixture, nodes: usize, exceptions: HashMap<String, u64>) -> tokio::task::JoinHandle<()> {
    let (registry, agents) = (f.registry.clone(), f.agents.clone());
    tokio::spawn(async move {
        loop {
            for i in 1..=nodes {
                let id = format!("n{i}");
                let mut status = node(&id, if i % 2 == 0 { "b" } else { "a" });
                if agents.committed.lock().expect("lock").contains(&id) {
                    let process = &mut status.processes[0];
                    process.patch_stack = vec![PATCH.into()].into();
                    process.health = Some(crate::node::ProcessHealth {
                        alive: true,
                        // The double's tick counter, as polls count it
                        // (from the process's start); a stuck node's stands still.
                        ticks: if agents.behaviour(&id).no_ticks {
                            NO_TICKS
                        } else {
                            agents.ticks.fetch_add(1, Ordering::Relaxed) + 1
                        },
                        tick_p99_ms: 2.0,
                        exceptions_since: exceptions.get(&id).copied().unwrap_or(0),
                        game_ok: true,
                        ..Default::default()
                    });
                }
                let _ = registry.heartbeat(status).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

#[tokio::test]
async fn nodes_of_earlier_steps_are_judged_from_pushed_reports_not_polled_again() {
    let f = fixture(5).await;
    let pusher = push_health(&f, 5, HashMap::new());
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    pusher.abort();
    // The canary (n1) watched through three windows, a last-wave node
    // (n5) through one: each is polled for its own window only.
    let (canary, last) = (f.agents.health_calls("n1"), f.agents.health_calls("n5"));
    assert!(canary >= 1, "its baseline at least: {canary}");
    assert!(canary <= last + 2, "the canary was polled again in later windows: {canary} vs {last}");
}

#[tokio::test]
async fn an_exception_pushed_by_an_earlier_node_rolls_back_in_a_later_window() {
    let f = fixture(3).await;
    // Polls of n1 never show the exception; only its heartbeats do.
    let pusher = push_health(&f, 3, [("n1".to_string(), 1)].into());
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    pusher.abort();
    assert!(reason.contains("1 new unhandled exception"), "{reason}");
    assert_eq!(faulty, ["n1"]);
}

#[tokio::test]
async fn in_a_long_window_the_steps_own_nodes_are_judged_from_pushed_reports_until_its_final_check() {
    let f = fixture(5).await;
    let pusher = push_health(&f, 5, HashMap::new());
    // Checked every 50 ms through a 1 s window: ~20 checks of each step's nodes.
    let spec = WireSpec { health_window_ms: 1_000, step_deadline_ms: 3_000, ..request() };
    let id = f.engine.start(spec, "a", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    pusher.abort();
    // Baseline and final, plus the checks before the first report after the
    // commit arrived (heartbeats every 20 ms here).
    for node in ["n1", "n3", "n5"] {
        let polls = f.agents.health_calls(node);
        assert!((2..=5).contains(&polls), "{node} was polled {polls} times in its window");
    }
}

/// A rollout of three nodes whose commits are answered 300 ms after they
/// land, with reports pushed every 20 ms: one shows the patch before the
/// step's commits are all answered (as a wave's first nodes' do).
async fn with_reports_and_late_commit_answers(window_ms: u64) -> (Fixture, RolloutState) {
    let f = fixture(3).await;
    for node in ["n1", "n2", "n3"] {
        f.agents.set(node, Behaviour { late_commit_answer: Some(Duration::from_millis(300)), ..Default::default() });
    }
    let pusher = push_health(&f, 3, HashMap::new());
    let spec = WireSpec { health_window_ms: window_ms, step_deadline_ms: 3_000, ..request() };
    let id = f.engine.start(spec, "a", false).await.expect("start").rollout.id;
    let done = finish(&f.engine, &id).await;
    pusher.abort();
    assert_eq!(done.rollout.phase, Phase::Completed);
    (f, done)
}

#[tokio::test]
async fn the_final_check_is_judged_from_a_report_of_the_windows_last_quarter_that_shows_ticks() {
    // A report falls in each window's last 250 ms (with room for a loaded
    // test machine).
    let (f, _) = with_reports_and_late_commit_answers(1_000).await;
    for node in ["n1", "n2", "n3"] {
        assert_eq!(f.agents.health_calls(node), 1, "{node}: its baseline only");
    }
}

#[tokio::test]
async fn a_report_that_shows_no_tick_in_the_window_is_confirmed_by_a_poll_and_fails_the_gate() {
    let f = fixture(2).await;
    f.agents.set("n1", Behaviour { no_ticks: true, ..Default::default() });
    let pusher = push_health(&f, 2, HashMap::new());
    let spec = WireSpec { health_window_ms: 300, step_deadline_ms: 3_000, ..request() };
    let id = f.engine.start(spec, "a", false).await.expect("start").rollout.id;
    let (reason, faulty) = rolled_back(&finish(&f.engine, &id).await);
    pusher.abort();
    assert!(reason.contains("no tick completed in the health window"), "{reason}");
    assert_eq!(faulty, ["n1"]);
    assert!(f.agents.health_calls("n1") >= 2, "the final check polled the stuck node");
}

#[tokio::test]
async fn a_report_pushed_before_the_commit_fan_out_ends_stands_for_the_window_start_poll() {
    let (f, done) = with_reports_and_late_commit_answers(200).await;
    for node in ["n1", "n2", "n3"] {
        assert!(f.agents.health_calls(node) <= 2, "{node}: the baseline and at most the final check");
        let ns = &done.nodes[node];
        assert!(!ns.window_start.is_empty(), "{node} has a window start");
    }
}

#[tokio::test]
async fn without_pushed_reports_the_steps_own_nodes_are_polled_through_the_window() {
    let f = fixture(3).await;
    let spec = WireSpec { health_window_ms: 1_000, step_deadline_ms: 3_000, ..request() };
    let id = f.engine.start(spec, "a", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    let polls = f.agents.health_calls("n3");
    assert!(polls >= 10, "a last-wave node with no report is watched by polls: {polls}");
}

#[tokio::test]
async fn without_pushed_reports_earlier_nodes_are_polled_in_every_window() {
    let f = fixture(5).await;
    let id = f.engine.start(request(), "a", false).await.expect("start").rollout.id;
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    let (canary, last) = (f.agents.health_calls("n1"), f.agents.health_calls("n5"));
    assert!(canary > last + 2, "the canary is watched by polls in every later window: {canary} vs {last}");
}

#[tokio::test]
async fn a_scheduled_rollout_starts_at_its_time_and_one_in_the_past_is_refused() {
    let f = fixture(3).await;
    let start_at_ms = now_ms() + 400;
    let id = f.engine.start(WireSpec { start_at_ms, ..request() }, "a", false).await.expect("start").rollout.id;
    assert!(matches!(f.engine.get(&id).await.expect("get").rollout.phase, Phase::Scheduled { .. }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(f.agents.log().is_empty(), "nothing sent before its time");
    let staged =
        wait_for(&f.engine, &id, Duration::from_secs(5), |s| !matches!(s.rollout.phase, Phase::Scheduled { .. })).await;
    let late = now_ms().saturating_sub(start_at_ms);
    assert!(staged.rollout.updated_at_ms >= start_at_ms && late < 1000, "started {late} ms late");
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);

    let err =
        f.engine.start(WireSpec { start_at_ms: now_ms() - 1000, ..request() }, "a", false).await.expect_err("past");
    assert!(err.to_string().contains("is in the past"), "{err}");

    // Cancelled while scheduled: nothing is ever sent.
    let sent = f.agents.log().len();
    let far = WireSpec { start_at_ms: now_ms() + 60_000, ..request() };
    let id = f.engine.start(far, "a", false).await.expect("scheduled").rollout.id;
    f.engine.act(&id, OperatorAction::Abort, "a", "cancelled").await.expect("cancel");
    let done = finish(&f.engine, &id).await;
    assert!(rolled_back(&done).0.contains("cancelled"));
    assert_eq!(f.agents.log().len(), sent, "a cancelled schedule sends nothing");
}

/// The span tree of a rollout, with an in-memory exporter: one trace (its id
/// derived from the rollout id), rollout → step → node.
#[tokio::test]
async fn a_rollout_is_one_trace_of_steps_and_node_calls() {
    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor, SpanData};
    use tracing_subscriber::layer::SubscriberExt;

    let exporter = InMemorySpanExporter::default();
    let exporting = hotfleet_obs::traces::Exporting::with_processor(
        SimpleSpanProcessor::new(exporter.clone()),
        opentelemetry_sdk::Resource::builder().build(),
    );
    // A current-thread runtime: the drivers' tasks see this thread's subscriber.
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(exporting.tracer()));
    let _guard = tracing::subscriber::set_default(subscriber);

    let f = fixture(3).await;
    let state = f.engine.start(request(), "alice", false).await.expect("start");
    let id = state.rollout.id.clone();
    assert_eq!(finish(&f.engine, &id).await.rollout.phase, Phase::Completed);
    let trace_id: TraceId = hotfleet_obs::traces::rollout_trace_id(&id);
    let ours = || -> Vec<SpanData> {
        exporter
            .get_finished_spans()
            .expect("spans")
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .collect()
    };
    // The rollout span ends when its driver returns, just after the phase is recorded.
    let until = Instant::now() + Duration::from_secs(5);
    while !ours().iter().any(|s| s.name == "rollout") {
        assert!(
            Instant::now() < until,
            "no rollout span: {:?}",
            ours().iter().map(|s| s.name.clone()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let spans = ours();
    let attr = |s: &SpanData, key: &str| {
        s.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| kv.value.as_str().to_string())
    };
    let by_id: HashMap<SpanId, &SpanData> = spans.iter().map(|s| (s.span_context.span_id(), s)).collect();
    let parent = |s: &SpanData| by_id.get(&s.parent_span_id).map(|p| p.name.to_string());

    let rollout: Vec<&SpanData> = spans.iter().filter(|s| s.name == "rollout").collect();
    assert_eq!(rollout.len(), 1, "one rollout span");
    assert_eq!(attr(rollout[0], "rollout").as_deref(), Some(id.as_str()));
    assert_eq!(parent(rollout[0]), None, "its parent is the virtual root derived from the rollout id");
    let steps: Vec<&SpanData> = spans.iter().filter(|s| s.name == "step").collect();
    assert!(steps.iter().all(|s| s.parent_span_id == rollout[0].span_context.span_id()), "steps hang off the rollout");
    let step_names: HashSet<String> = steps.iter().filter_map(|s| attr(s, "step")).collect();
    for step in ["record", "prepare", "baseline", "commit", "watch"] {
        assert!(step_names.contains(step), "a {step} step: {step_names:?}");
    }
    let waves: HashSet<String> =
        steps.iter().filter(|s| attr(s, "step").as_deref() == Some("commit")).filter_map(|s| attr(s, "wave")).collect();
    let expected: HashSet<String> = ["canary", "wave-1", "wave-2"].iter().map(|s| s.to_string()).collect();
    assert_eq!(waves, expected, "each commit step names its wave");
    let nodes: Vec<&SpanData> = spans.iter().filter(|s| s.name == "node").collect();
    assert!(nodes.iter().all(|s| parent(s).as_deref() == Some("step")), "node calls hang off steps");
    let called = |step: &str| -> HashSet<String> {
        nodes
            .iter()
            .filter(|n| by_id.get(&n.parent_span_id).and_then(|p| attr(p, "step")).as_deref() == Some(step))
            .filter_map(|n| attr(n, "node"))
            .collect()
    };
    let all: HashSet<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
    assert_eq!(called("prepare"), all, "every node is prepared under the prepare step");
    assert_eq!(called("commit"), all, "and committed under commit steps");
}

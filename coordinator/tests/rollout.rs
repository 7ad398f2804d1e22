//! Loopback rollouts over real gRPC: the real coordinator server on
//! 127.0.0.1:0, and simulated agents that are real tonic `Agent` servers
//! (register and heartbeat through the gateway, answer commands, refuse stale
//! epochs). Exercises the operator API, the gRPC agent client with its
//! deadlines, and resume after a coordinator restart.

mod common;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use common::*;
use hotfleet_proto::v1::{
    agent_server::{Agent, AgentServer},
    coordinator_client::CoordinatorClient,
    *,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{transport::Channel, Code, Request, Response, Status};

#[derive(Default, Clone)]
struct Behaviour {
    commit_fail: bool,
    slow_commit: Option<Duration>,
}

#[derive(Default)]
struct AgentState {
    highest_epoch: u64,
    stack: Vec<String>,
    prepared: Vec<String>,
    /// The live rollouts of the latest heartbeat answer.
    live: Vec<String>,
    /// (kind, epoch)
    log: Vec<(String, u64)>,
}

/// A simulated agent serving the real `Agent` gRPC service.
#[derive(Clone)]
struct FakeAgent {
    id: String,
    addr: SocketAddr,
    state: Arc<Mutex<AgentState>>,
    behaviour: Arc<Mutex<Behaviour>>,
    ticks: Arc<AtomicU64>,
    coordinator: Arc<Mutex<String>>,
}

impl FakeAgent {
    async fn start(id: &str, coordinator: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let agent = FakeAgent {
            id: id.into(),
            addr: listener.local_addr().expect("addr"),
            state: Arc::default(),
            behaviour: Arc::default(),
            ticks: Arc::default(),
            coordinator: Arc::new(Mutex::new(coordinator.to_string())),
        };
        let svc = AgentServer::new(agent.clone());
        tokio::spawn(
            tonic::transport::Server::builder().add_service(svc).serve_with_incoming(TcpListenerStream::new(listener)),
        );
        agent.register().await;
        // Heartbeats, re-registering when the coordinator forgot us.
        let beat = agent.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let uri = beat.coordinator.lock().expect("lock").clone();
                let Ok(mut gw) = agent_gateway_client::AgentGatewayClient::connect(uri).await else { continue };
                match gw.heartbeat(HeartbeatRequest { node: Some(beat.status()) }).await {
                    Ok(r) if !r.get_ref().known => beat.register().await,
                    Ok(r) => beat.state.lock().expect("lock").live = r.into_inner().live_rollouts,
                    _ => {}
                }
            }
        });
        agent
    }

    fn status(&self) -> NodeStatus {
        let s = self.state.lock().expect("lock");
        NodeStatus {
            node_id: self.id.clone(),
            labels: [("region".to_string(), "eu".to_string())].into(),
            advertise_addr: self.addr.to_string(),
            processes: vec![ProcessStatus {
                process_id: format!("{}-p", self.id),
                pid: 100,
                build: BUILD.into(),
                patch_stack: s.stack.clone(),
                ..Default::default()
            }],
            highest_epoch: s.highest_epoch,
            ..Default::default()
        }
    }

    async fn register(&self) {
        let uri = self.coordinator.lock().expect("lock").clone();
        if let Ok(mut gw) = agent_gateway_client::AgentGatewayClient::connect(uri).await {
            let _ = gw.register(RegisterRequest { node: Some(self.status()) }).await;
        }
    }

    fn point_at(&self, coordinator: &str) {
        *self.coordinator.lock().expect("lock") = coordinator.to_string();
    }

    fn set(&self, b: Behaviour) {
        *self.behaviour.lock().expect("lock") = b;
    }

    fn stack(&self) -> Vec<String> {
        self.state.lock().expect("lock").stack.clone()
    }

    fn live(&self) -> Vec<String> {
        self.state.lock().expect("lock").live.clone()
    }

    fn log(&self) -> Vec<(String, u64)> {
        self.state.lock().expect("lock").log.clone()
    }

    /// Fencing: refuse an older epoch, remember the newest.
    fn accept(&self, kind: &str, header: Option<CommandHeader>) -> Result<CommandHeader, Status> {
        let h = header.ok_or_else(|| Status::invalid_argument("no header"))?;
        let mut s = self.state.lock().expect("lock");
        if h.epoch < s.highest_epoch {
            return Err(Status::failed_precondition("stale epoch"));
        }
        s.highest_epoch = h.epoch;
        s.log.push((kind.to_string(), h.epoch));
        Ok(h)
    }
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn prepare(&self, r: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        let h = self.accept("prepare", r.into_inner().header)?;
        let mut s = self.state.lock().expect("lock");
        if !s.prepared.contains(&h.patch_id) {
            s.prepared.push(h.patch_id);
        }
        Ok(Response::new(PrepareResponse { vote_yes: true, ..Default::default() }))
    }

    async fn commit(&self, r: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        let h = self.accept("commit", r.into_inner().header)?;
        let b = self.behaviour.lock().expect("lock").clone();
        if let Some(d) = b.slow_commit {
            tokio::time::sleep(d).await;
        }
        if b.commit_fail {
            return Ok(Response::new(CommitResponse {
                ok: false,
                reason: "commit failed".into(),
                processes: vec![ProcessOutcome {
                    process_id: format!("{}-p", self.id),
                    pid: 100,
                    ok: false,
                    error: "__reload_instance__ raised AttributeError".into(),
                    ..Default::default()
                }],
            }));
        }
        let mut s = self.state.lock().expect("lock");
        s.prepared.retain(|p| p != &h.patch_id);
        if s.stack.last() != Some(&h.patch_id) {
            s.stack.push(h.patch_id);
        }
        Ok(Response::new(CommitResponse { ok: true, ..Default::default() }))
    }

    async fn abort(&self, r: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        let h = self.accept("abort", r.into_inner().header)?;
        self.state.lock().expect("lock").prepared.retain(|p| p != &h.patch_id);
        Ok(Response::new(AbortResponse { ok: true, ..Default::default() }))
    }

    async fn rollback(&self, r: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        let h = self.accept("rollback", r.into_inner().header)?;
        let mut s = self.state.lock().expect("lock");
        if s.stack.last() == Some(&h.patch_id) {
            s.stack.pop();
        }
        s.prepared.retain(|p| p != &h.patch_id);
        Ok(Response::new(RollbackResponse { ok: true, ..Default::default() }))
    }

    async fn status(&self, _r: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse { node: Some(self.status()) }))
    }

    async fn health(&self, _r: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let ticks = self.ticks.fetch_add(7, Ordering::Relaxed) + 7;
        Ok(Response::new(HealthResponse {
            node_id: self.id.clone(),
            processes: vec![ProcessHealthReport {
                process_id: format!("{}-p", self.id),
                pid: 100,
                reachable: true,
                health: Some(ProcessHealth {
                    alive: true,
                    ticks,
                    tick_p50_ms: 1.0,
                    tick_p99_ms: 2.0,
                    exceptions_since: 0,
                    mark: 1,
                    game_ok: true,
                    game_detail: String::new(),
                    ticks_since: ticks,
                }),
                error: String::new(),
            }],
            healthy: true,
            summary: "1 process(es) healthy".into(),
        }))
    }
}

struct Fleet {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    public: std::path::PathBuf,
    running: Running,
    agents: Vec<FakeAgent>,
    patch_id: String,
}

/// A request carrying the old actor header, which is ignored now: these
/// loopback coordinators run `--insecure`, and audit every action as
/// `insecure` (tests/security.rs checks certificate actors over real TLS).
fn as_actor<T>(message: T, actor: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("x-hotfleet-actor", actor.parse().expect("ascii"));
    r
}

async fn fleet(n: usize) -> Fleet {
    let dir = tempfile::tempdir().expect("tempdir");
    let (key, public) = key_in(&dir.path().join("keys"));
    let data = dir.path().join("data");
    let running = start(config(&data, vec![public.clone()])).await;
    let mut agents = Vec::new();
    for i in 1..=n {
        agents.push(FakeAgent::start(&format!("node-{i}"), &running.channel_uri()).await);
    }
    let b = bundle("fix damage formula", Some(&key));
    running
        .operator()
        .await
        .push_patch(as_actor(PushPatchRequest { bundle: b.encode() }, "release-bot"))
        .await
        .expect("push");
    Fleet { _dir: dir, data, public, running, agents, patch_id: b.id() }
}

fn spec(patch_id: &str) -> RolloutSpec {
    RolloutSpec {
        patch_id: patch_id.into(),
        selector: "region=eu".into(),
        canary: "1".into(),
        waves: vec!["50%".into(), "100%".into()],
        health_window_ms: 200,
        step_deadline_ms: 2_000,
        ..Default::default()
    }
}

/// Starts a rollout of `spec`; its id.
async fn started(op: &mut CoordinatorClient<Channel>, spec: RolloutSpec) -> String {
    let started = op
        .start_rollout(StartRolloutRequest {
            spec: Some(spec),
            dry_run: false,
            target_build: String::new(),
            plan_canary: false,
        })
        .await
        .expect("start");
    started.into_inner().rollout.expect("rollout").rollout_id
}

/// A rollout's current state.
async fn rollout(op: &mut CoordinatorClient<Channel>, id: String) -> Rollout {
    op.get_rollout(GetRolloutRequest { rollout_id: id }).await.expect("get").into_inner().rollout.expect("r")
}

async fn watch_to_end(running: &Running, id: &str) -> (Rollout, usize) {
    let mut op = running.operator().await;
    let mut stream = op.watch_rollout(WatchRolloutRequest { rollout_id: id.into() }).await.expect("watch").into_inner();
    let mut last = None;
    let mut snapshots = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => panic!("watch did not end; last: {last:#?}"),
            msg = stream.message() => match msg.expect("stream") {
                Some(r) => { snapshots += 1; last = Some(r); }
                None => break,
            }
        }
    }
    let last = last.expect("at least one snapshot");
    assert!(last.terminal, "watch ended before the rollout did: {last:#?}");
    (last, snapshots)
}

#[tokio::test]
async fn a_good_rollout_over_grpc_completes_and_joins_the_patch_stack() {
    let f = fleet(5).await;
    let mut op = f.running.operator().await;

    let dry = op
        .start_rollout(StartRolloutRequest {
            spec: Some(spec(&f.patch_id)),
            dry_run: true,
            target_build: String::new(),
            plan_canary: false,
        })
        .await
        .expect("dry run")
        .into_inner()
        .rollout
        .expect("rollout");
    assert_eq!(dry.steps.iter().map(|s| s.node_ids.len()).collect::<Vec<_>>(), [1, 2, 2]);

    let started = op
        .start_rollout(as_actor(
            StartRolloutRequest {
                spec: Some(spec(&f.patch_id)),
                dry_run: false,
                target_build: String::new(),
                plan_canary: false,
            },
            "alice",
        ))
        .await
        .expect("start")
        .into_inner()
        .rollout
        .expect("rollout");
    assert_eq!(started.created_by, "insecure");
    let (done, snapshots) = watch_to_end(&f.running, &started.rollout_id).await;
    assert_eq!(done.phase, RolloutPhase::Completed as i32, "{:#?}", done.events);
    assert!(snapshots >= 3, "watch streamed progress ({snapshots} snapshots)");
    assert!(done.nodes.iter().all(|n| n.observed == "committed" && n.desired == "committed"));
    for agent in &f.agents {
        assert_eq!(agent.stack(), std::slice::from_ref(&f.patch_id), "{} runs the patch", agent.id);
        assert!(agent.log().iter().all(|(_, epoch)| *epoch == done.epoch));
    }

    let mut gw = f.running.gateway().await;
    let stack =
        gw.get_patch_stack(GetPatchStackRequest { target_build: BUILD.into() }).await.expect("stack").into_inner();
    assert_eq!(stack.patches.iter().map(|p| p.patch_id.clone()).collect::<Vec<_>>(), std::slice::from_ref(&f.patch_id));
    assert_eq!(stack.patches[0].description, "fix damage formula");

    let list = op.list_rollouts(ListRolloutsRequest::default()).await.expect("list").into_inner();
    assert_eq!(list.rollouts.len(), 1);
    let got =
        op.get_rollout(GetRolloutRequest { rollout_id: started.rollout_id.clone() }).await.expect("get").into_inner();
    assert_eq!(got.rollout.expect("rollout").phase, RolloutPhase::Completed as i32);
    let err = op.get_rollout(GetRolloutRequest { rollout_id: "ro-nope".into() }).await.expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);

    let nodes = op.list_nodes(ListNodesRequest::default()).await.expect("nodes").into_inner().nodes;
    assert_eq!(nodes.len(), 5);
    assert!(nodes.iter().all(|n| n.active_rollout_id.is_empty() && n.liveness == "alive"));

    let audit = op.list_audit(ListAuditRequest::default()).await.expect("audit").into_inner().records;
    let actions: Vec<(String, String)> = audit.iter().map(|a| (a.action.clone(), a.actor.clone())).collect();
    assert!(actions.contains(&("rollout.start".into(), "insecure".into())), "{actions:?}");
    assert!(actions.contains(&("patch.push".into(), "insecure".into())), "{actions:?}");
    assert!(actions.iter().all(|(_, actor)| actor == "insecure"), "the header is never the actor: {actions:?}");
    f.running.stop().await;
}

#[tokio::test]
async fn a_commit_failure_rolls_the_fleet_back_over_grpc() {
    let f = fleet(5).await;
    // Plan order is by node id: canary node-1, wave-1 node-2,3, wave-2 node-4,5.
    f.agents[3].set(Behaviour { commit_fail: true, ..Default::default() });
    let mut op = f.running.operator().await;
    let id = started(&mut op, spec(&f.patch_id)).await;
    let (done, _) = watch_to_end(&f.running, &id).await;
    assert_eq!(done.phase, RolloutPhase::RolledBack as i32);
    assert_eq!(done.faulty_nodes, ["node-4"]);
    assert!(done.reason.contains("AttributeError"), "{}", done.reason);
    for agent in &f.agents {
        assert!(agent.stack().is_empty(), "{} still runs the patch", agent.id);
        assert!(agent.state.lock().expect("lock").prepared.is_empty(), "{} still holds it prepared", agent.id);
    }
    let stack = f
        .running
        .gateway()
        .await
        .get_patch_stack(GetPatchStackRequest { target_build: BUILD.into() })
        .await
        .expect("stack")
        .into_inner();
    assert!(stack.patches.is_empty());
    f.running.stop().await;
}

#[tokio::test]
async fn a_silent_agent_is_cut_off_at_the_step_deadline() {
    let f = fleet(3).await;
    f.agents[0].set(Behaviour { slow_commit: Some(Duration::from_secs(30)), ..Default::default() });
    let mut op = f.running.operator().await;
    let mut s = spec(&f.patch_id);
    s.step_deadline_ms = 500;
    let began = Instant::now();
    let id = started(&mut op, s).await;
    let (done, _) = watch_to_end(&f.running, &id).await;
    assert!(began.elapsed() < Duration::from_secs(5), "took {:?}", began.elapsed());
    assert_eq!(done.phase, RolloutPhase::RolledBack as i32);
    assert_eq!(done.faulty_nodes, ["node-1"]);
    assert!(done.reason.contains("within"), "{}", done.reason);
    f.running.stop().await;
}

#[tokio::test]
async fn operator_controls_abort_freeze_conflict_promote() {
    let f = fleet(4).await;
    let mut op = f.running.operator().await;
    let mut s = spec(&f.patch_id);
    s.pause_before = vec!["wave-1".into()];
    let id = started(&mut op, s).await;

    // Blast radius.
    let err = op
        .start_rollout(StartRolloutRequest {
            spec: Some(spec(&f.patch_id)),
            dry_run: false,
            target_build: String::new(),
            plan_canary: false,
        })
        .await
        .expect_err("conflict");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains(&id), "{}", err.message());

    // Waits at the gate.
    let held = eventually(Duration::from_secs(10), || {
        let mut op = op.clone();
        let id = id.clone();
        async move {
            let r = rollout(&mut op, id).await;
            r.phase == RolloutPhase::Waiting as i32 && r.waiting_reason.contains("gate before wave-1")
        }
    })
    .await;
    assert!(held);
    // Heartbeat answers name the rollout to every node it holds, so their
    // agents keep its prepares alive at the gate.
    let agents = f.agents.clone();
    let expect = vec![id.clone()];
    assert!(eventually(Duration::from_secs(5), || std::future::ready(agents.iter().all(|a| a.live() == expect))).await);

    // Freeze, then promote: still held by the freeze.
    let frozen =
        op.freeze(as_actor(FreezeRequest { reason: "tournament".into() }, "sre")).await.expect("freeze").into_inner();
    assert!(frozen.frozen && frozen.by == "insecure");
    op.promote_rollout(RolloutActionRequest { rollout_id: id.clone(), reason: String::new() }).await.expect("promote");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = rollout(&mut op, id.clone()).await;
    assert!(r.waiting_reason.contains("frozen"), "{}", r.waiting_reason);
    assert_eq!(op.get_freeze(GetFreezeRequest {}).await.expect("get").into_inner().reason, "tournament");

    // Abort wins even while frozen.
    let aborted = op
        .abort_rollout(as_actor(RolloutActionRequest { rollout_id: id.clone(), reason: "not today".into() }, "bob"))
        .await
        .expect("abort")
        .into_inner()
        .rollout
        .expect("r");
    assert_eq!(aborted.phase, RolloutPhase::RollingBack as i32);
    let (done, _) = watch_to_end(&f.running, &id).await;
    assert_eq!(done.reason, "aborted by insecure: not today");
    let agents = f.agents.clone();
    assert!(
        eventually(Duration::from_secs(5), || std::future::ready(agents.iter().all(|a| a.live().is_empty()))).await,
        "a finished rollout is no longer renewed"
    );
    assert!(f.agents.iter().all(|a| a.stack().is_empty()));
    let err = op
        .abort_rollout(RolloutActionRequest { rollout_id: id.clone(), reason: String::new() })
        .await
        .expect_err("done");
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Frozen: a new rollout is refused with the fix; unfreeze lets it start.
    let err = op
        .start_rollout(StartRolloutRequest {
            spec: Some(spec(&f.patch_id)),
            dry_run: false,
            target_build: String::new(),
            plan_canary: false,
        })
        .await
        .expect_err("frozen");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("hotfleet unfreeze"), "{}", err.message());
    let thawed = op.unfreeze(UnfreezeRequest {}).await.expect("unfreeze").into_inner();
    assert!(!thawed.frozen);
    op.start_rollout(StartRolloutRequest {
        spec: Some(spec(&f.patch_id)),
        dry_run: false,
        target_build: String::new(),
        plan_canary: false,
    })
    .await
    .expect("start after unfreeze");

    let audit = op.list_audit(ListAuditRequest::default()).await.expect("audit").into_inner().records;
    for action in ["fleet.freeze", "fleet.unfreeze", "rollout.promote", "rollout.abort"] {
        assert!(audit.iter().any(|a| a.action == action && a.ok), "{action} not audited");
    }
    assert!(audit.iter().any(|a| a.action == "rollout.start" && !a.ok), "refused start audited");
    f.running.stop().await;
}

#[tokio::test]
async fn a_restarted_coordinator_resumes_the_rollout_under_a_higher_epoch() {
    let f = fleet(4).await;
    let mut op = f.running.operator().await;
    let mut s = spec(&f.patch_id);
    s.health_window_ms = 800;
    let id = started(&mut op, s).await;
    let watching_wave = eventually(Duration::from_secs(10), || {
        let mut op = op.clone();
        let id = id.clone();
        async move {
            let r = rollout(&mut op, id).await;
            r.phase == RolloutPhase::Watching as i32 && r.current_step == 1
        }
    })
    .await;
    assert!(watching_wave);
    let old_epoch = f.agents[0].log().last().expect("commands").1;
    f.running.stop().await;

    let second = start(config(&f.data, vec![f.public.clone()])).await;
    for a in &f.agents {
        a.point_at(&second.channel_uri());
    }
    let (done, _) = watch_to_end(&second, &id).await;
    assert_eq!(done.phase, RolloutPhase::Completed as i32, "{:#?}", done.events);
    assert!(done.epoch > old_epoch);
    let mut by_epoch: HashMap<u64, usize> = HashMap::new();
    for a in &f.agents {
        assert_eq!(a.stack(), std::slice::from_ref(&f.patch_id));
        for (_, e) in a.log() {
            *by_epoch.entry(e).or_default() += 1;
        }
        assert!(a.state.lock().expect("lock").highest_epoch <= done.epoch);
    }
    assert!(by_epoch.contains_key(&done.epoch), "the new incarnation sent commands");
    second.stop().await;
}

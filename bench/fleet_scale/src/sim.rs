//! The simulated fleet: N agents hosted by one process, speaking the real
//! agent gRPC contract to the real coordinator.
//!
//! What is real: the wire (every agent has its own address, `127.1.x.y:PORT`,
//! all served by one listener that tells agents apart by the local address a
//! connection arrived on, so the coordinator opens one channel per agent as
//! with a real fleet), Register/Heartbeat every interval, FetchPatch, and the
//! answers to Prepare/Commit/Abort/Rollback/Status/Health.
//! What is simulated: the runtime. Each node has one "process" whose patch
//! stack is a list in memory; it ticks at 20 Hz by the clock (no game
//! code runs), commit and rollback take no time, and a patch is fetched once
//! per patch for the whole fleet (not once per node). Heartbeats share a pool
//! of connections to the coordinator (a real fleet has one per node).
//!
//! Each agent attaches for its commands and answers the calls that come down
//! with the same handlers as the real one. On the shared connections the
//! simulated agents attach as a relay attaches the agents it carries (one
//! `AgentGateway.AttachRelayed` stream per connection: what the coordinator
//! holds for a fleet behind relays); with `--own-streams` each opens
//! `AgentGateway.Attach` of its own, as an agent straight to the coordinator
//! does; behind the benchmark's real relays each agent attaches to its relay
//! as the real agent does; with `--dial` no agent attaches, and the
//! coordinator dials each.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use hotfleet_agent::{attach, coordinator_link::HeldDigests};
use hotfleet_proto::v1::{
    agent_answer::Answer,
    agent_gateway_client::AgentGatewayClient,
    agent_server::{Agent, AgentServer},
    AbortRequest, AbortResponse, AgentAnswer, AttachHello, CommandHeader, CommitRequest, CommitResponse,
    FetchPatchRequest, HealthRequest, HealthResponse, HeartbeatRequest, NodeStatus, PrepareRequest, PrepareResponse,
    PreparedPatch, ProcessHealth, ProcessHealthReport, ProcessOutcome, ProcessStatus, RegisterRequest, RelayedAnswer,
    RollbackRequest, RollbackResponse, StatusRequest, StatusResponse,
};
use tokio::sync::OnceCell;
use tokio_stream::StreamExt;
use tonic::{
    transport::{Channel, Endpoint, Server},
    Extensions, Request, Response, Status,
};

/// Milliseconds per simulated game tick (20 Hz).
const TICK_MS: u64 = 50;
/// The simulated game's module names (`simgame.module_000`, …).
const MODULE_PREFIX: &str = "simgame.module_";
const FIRST_MODULE: &str = "simgame.module_000";

/// Injected failures.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Nodes (by index) whose commit of this patch fails.
    pub fail_commit: Option<(usize, String)>,
    /// Nodes (by index) that report an unhandled exception once this patch is on their stack.
    pub fail_health: Option<(usize, String)>,
}

/// Calls the simulated agents answered, by kind.
#[derive(Debug, Default)]
pub struct Counters {
    pub prepare: AtomicU64,
    pub commit: AtomicU64,
    pub abort: AtomicU64,
    pub rollback: AtomicU64,
    pub health: AtomicU64,
    pub status: AtomicU64,
    pub heartbeat: AtomicU64,
    pub register: AtomicU64,
    pub fetch: AtomicU64,
    /// Heartbeats that failed or were not answered (network, deadline, refusal).
    pub heartbeat_errors: AtomicU64,
    /// Registrations told to come back later (admission control).
    pub pushbacks: AtomicU64,
    /// Attached streams that ended or were refused (each attaches again).
    pub detached: AtomicU64,
    /// Answers asking for digest maps whole (a map named by fingerprint the leader lacked, a new term).
    pub digests_asked: AtomicU64,
}

/// A copy of [`Counters`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Calls {
    pub prepare: u64,
    pub commit: u64,
    pub abort: u64,
    pub rollback: u64,
    pub health: u64,
    pub status: u64,
    pub heartbeat: u64,
    pub register: u64,
    pub fetch: u64,
    pub heartbeat_errors: u64,
    pub pushbacks: u64,
    pub detached: u64,
    pub digests_asked: u64,
}

impl Calls {
    pub fn since(&self, earlier: &Calls) -> Calls {
        Calls {
            prepare: self.prepare - earlier.prepare,
            commit: self.commit - earlier.commit,
            abort: self.abort - earlier.abort,
            rollback: self.rollback - earlier.rollback,
            health: self.health - earlier.health,
            status: self.status - earlier.status,
            heartbeat: self.heartbeat - earlier.heartbeat,
            register: self.register - earlier.register,
            fetch: self.fetch - earlier.fetch,
            heartbeat_errors: self.heartbeat_errors - earlier.heartbeat_errors,
            pushbacks: self.pushbacks - earlier.pushbacks,
            detached: self.detached - earlier.detached,
            digests_asked: self.digests_asked - earlier.digests_asked,
        }
    }
}

#[derive(Debug, Default)]
struct NodeState {
    stack: Vec<String>,
    prepared: Vec<PreparedPatch>,
    highest_epoch: u64,
    /// The coordinator answered a heartbeat with `known`.
    known: bool,
}

struct SimNode {
    id: String,
    addr: SocketAddr,
    pid: u32,
    state: Mutex<NodeState>,
    /// Its stack changed: heartbeat now, as a real agent does after a commit.
    changed: tokio::sync::Notify,
}

impl SimNode {
    fn process_id(&self) -> String {
        format!("{}-sim", self.pid)
    }
}

/// The fleet: its nodes, faults, counters and the patches fetched so far.
pub struct Fleet {
    nodes: Vec<Arc<SimNode>>,
    by_ip: HashMap<IpAddr, usize>,
    build: String,
    started: Instant,
    faults: Mutex<Faults>,
    fetched: Mutex<HashMap<String, Arc<OnceCell<bool>>>>,
    coordinator: Vec<Channel>,
    /// How the agents get their commands.
    attach: Attach,
    /// With [`Attach::Relayed`]: each shared connection's stream of its agents.
    relayed: Vec<RelayedStream>,
    /// What each process reports as `live_digests` (module -> sha256), for statuses of a realistic size.
    digests: HashMap<String, String>,
    /// How statuses carry the digests (set before the nodes start).
    digest_protocol: Mutex<DigestProtocol>,
    pub counters: Counters,
}

/// How simulated agents send their module digests: the protocols real agents
/// spoke over time, for before/after figures from one build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DigestProtocol {
    /// Maps the leader holds left out, others named by fingerprint (agents now).
    #[default]
    Fingerprints,
    /// Maps the leader holds left out, others sent whole (before fingerprints).
    WholeMaps,
    /// Every status carries every map (before the thirteenth part).
    Full,
}

/// How the simulated agents get their commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Not attached: the coordinator dials each agent.
    Dial,
    /// Each agent on an `Attach` stream of its own.
    OwnStreams,
    /// The agents of each shared connection on one `AttachRelayed` stream,
    /// as a relay carries them.
    Relayed,
}

/// One shared connection's `AttachRelayed` stream: the nodes attached on it
/// (announced again whenever it is opened again) and where their answers go.
#[derive(Default)]
struct RelayedStream {
    state: Mutex<RelayedState>,
}

#[derive(Default)]
struct RelayedState {
    nodes: Vec<usize>,
    /// The open stream's sender (`None` until opened, and between openings).
    up: Option<tokio::sync::mpsc::UnboundedSender<RelayedAnswer>>,
    opened: bool,
}

fn relayed_hello(i: usize) -> RelayedAnswer {
    let node_id = node_id(i);
    let hello = AgentAnswer { call_id: 0, answer: Some(Answer::Hello(AttachHello { node_id: node_id.clone() })) };
    RelayedAnswer { node_id, answer: Some(hello), agent_cert: Vec::new(), detached: false }
}

/// Node `i`'s address: 127.1.0.0 + i + 1 (loopback, so every node is reachable
/// at its own address on one port).
fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x7f01_0000u32 + i as u32 + 1)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Fleet {
    /// A fleet of `nodes` agents on `port`, every one running `build`,
    /// heartbeating to `coordinator_urls` (in turn) over `heartbeat_conns` connections,
    /// each process reporting the digests of `modules` modules.
    pub fn new(
        nodes: usize,
        port: u16,
        build: &str,
        coordinator_urls: &[String],
        heartbeat_conns: usize,
        attach: Attach,
        modules: usize,
    ) -> Result<Arc<Self>, tonic::transport::Error> {
        let nodes: Vec<Arc<SimNode>> = (0..nodes)
            .map(|i| {
                Arc::new(SimNode {
                    id: node_id(i),
                    addr: SocketAddr::new(IpAddr::V4(node_ip(i)), port),
                    pid: 100_000 + i as u32,
                    state: Mutex::new(NodeState::default()),
                    changed: tokio::sync::Notify::new(),
                })
            })
            .collect();
        let by_ip = nodes.iter().enumerate().map(|(i, n)| (n.addr.ip(), i)).collect();
        // Connection k goes to target k mod targets (the coordinator, or the relays in turn).
        let mut endpoints = Vec::with_capacity(coordinator_urls.len());
        for url in coordinator_urls {
            endpoints
                .push(Endpoint::from_shared(url.clone())?.tcp_nodelay(true).connect_timeout(Duration::from_secs(3)));
        }
        let coordinator: Vec<Channel> =
            (0..heartbeat_conns.max(1)).map(|k| endpoints[k % endpoints.len()].connect_lazy()).collect();
        let relayed = match attach {
            Attach::Relayed => coordinator.iter().map(|_| RelayedStream::default()).collect(),
            _ => Vec::new(),
        };
        Ok(Arc::new(Fleet {
            nodes,
            by_ip,
            build: build.to_string(),
            started: Instant::now(),
            faults: Mutex::new(Faults::default()),
            fetched: Mutex::new(HashMap::new()),
            coordinator,
            attach,
            relayed,
            digests: (0..modules).map(|m| (format!("{MODULE_PREFIX}{m:03}"), format!("{m:064x}"))).collect(),
            digest_protocol: Mutex::new(DigestProtocol::default()),
            counters: Counters::default(),
        }))
    }

    /// Statuses carry the digests as `protocol` says (before the nodes start).
    pub fn send_digests_as(&self, protocol: DigestProtocol) {
        *lock(&self.digest_protocol) = protocol;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.faults) = faults;
    }

    /// Nodes the coordinator knows (their last heartbeat was answered `known`).
    pub fn known(&self) -> usize {
        self.nodes.iter().filter(|n| lock(&n.state).known).count()
    }

    /// Nodes whose stack ends with `patch` (None: empty stacks).
    pub fn on_top(&self, patch: Option<&str>) -> usize {
        self.nodes.iter().filter(|n| lock(&n.state).stack.last().map(String::as_str) == patch).count()
    }

    pub fn calls(&self) -> Calls {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Calls {
            prepare: get(&c.prepare),
            commit: get(&c.commit),
            abort: get(&c.abort),
            rollback: get(&c.rollback),
            health: get(&c.health),
            status: get(&c.status),
            heartbeat: get(&c.heartbeat),
            register: get(&c.register),
            fetch: get(&c.fetch),
            heartbeat_errors: get(&c.heartbeat_errors),
            pushbacks: get(&c.pushbacks),
            detached: get(&c.detached),
            digests_asked: get(&c.digests_asked),
        }
    }

    fn ticks(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 / TICK_MS
    }

    fn channel(&self, i: usize) -> Channel {
        self.coordinator[i % self.coordinator.len()].clone()
    }

    fn node_for<T>(&self, request: &Request<T>) -> Result<(usize, Arc<SimNode>), Status> {
        // A call down an attached stream names its node; a dialled one arrived at its address.
        if let Some(SimIndex(i)) = request.extensions().get::<SimIndex>() {
            return Ok((*i, self.nodes[*i].clone()));
        }
        let ip = request.local_addr().map(|a| a.ip()).ok_or_else(|| Status::internal("no local address"))?;
        let i = *self.by_ip.get(&ip).ok_or_else(|| Status::not_found(format!("no simulated agent at {ip}")))?;
        Ok((i, self.nodes[i].clone()))
    }

    fn unhealthy(&self, i: usize, stack: &[String]) -> bool {
        lock(&self.faults).fail_health.as_ref().is_some_and(|(node, patch)| *node == i && stack.contains(patch))
    }

    fn health_of(&self, i: usize, node: &SimNode, since: u64) -> ProcessHealth {
        let stack = lock(&node.state).stack.clone();
        let ticks = self.ticks();
        let exceptions = u64::from(self.unhealthy(i, &stack));
        ProcessHealth {
            alive: true,
            ticks,
            tick_p50_ms: 1.0,
            tick_p99_ms: 2.0,
            exceptions_since: exceptions,
            mark: ticks,
            game_ok: true,
            game_detail: String::new(),
            ticks_since: ticks.saturating_sub(since),
        }
    }

    /// A real process's digests change with its stack (the patched modules'
    /// do): the first module's digest follows the top patch.
    fn digests_for(&self, stack: &[String]) -> HashMap<String, String> {
        let mut digests = self.digests.clone();
        if let (Some(top), Some(first)) = (stack.last(), digests.get_mut(FIRST_MODULE)) {
            first.clone_from(top);
        }
        digests
    }

    fn status_of(&self, i: usize) -> NodeStatus {
        let node = &self.nodes[i];
        let health = self.health_of(i, node, 0);
        let state = lock(&node.state);
        NodeStatus {
            node_id: node.id.clone(),
            labels: HashMap::new(),
            advertise_addr: node.addr.to_string(),
            processes: vec![ProcessStatus {
                process_id: node.process_id(),
                pid: node.pid,
                build: self.build.clone(),
                patch_stack: state.stack.clone(),
                live_digests: self.digests_for(&state.stack),
                health: Some(health),
                runtime_version: "sim".into(),
                python_version: "sim".into(),
                live_digests_unchanged: false,
                live_digests_fingerprint: String::new(),
            }],
            highest_epoch: state.highest_epoch,
            prepared: state.prepared.clone(),
            commands_admitted: 0,
            commands_refused_stale: 0,
            expired: Vec::new(),
        }
    }

    /// Fetches `patch_id` from the coordinator, once for the whole fleet.
    async fn fetch(&self, i: usize, patch_id: &str) -> bool {
        let cell = lock(&self.fetched).entry(patch_id.to_string()).or_default().clone();
        *cell
            .get_or_init(|| async {
                self.counters.fetch.fetch_add(1, Ordering::Relaxed);
                let mut client = AgentGatewayClient::new(self.channel(i));
                let Ok(stream) = client.fetch_patch(FetchPatchRequest { patch_id: patch_id.to_string() }).await else {
                    return false;
                };
                let mut stream = stream.into_inner();
                let mut total = 0usize;
                while let Some(chunk) = stream.next().await {
                    match chunk {
                        Ok(c) => total += c.data.len(),
                        Err(_) => return false,
                    }
                }
                total > 0
            })
            .await
    }

    /// Keeps node `i` attached, answering the calls that come down its stream.
    async fn attach_node(self: Arc<Self>, i: usize, retry: Duration) {
        let mut client = AgentGatewayClient::new(self.channel(i));
        let mut extensions = Extensions::new();
        extensions.insert(SimIndex(i));
        loop {
            let (answers, outgoing) = attach::opening(&node_id(i));
            if let Ok(calls) = client.attach(outgoing).await {
                let _ = attach::answer_calls(calls.into_inner(), self.clone(), answers, extensions.clone()).await;
            }
            self.counters.detached.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(hotfleet_proto::pushback::jittered(retry)).await;
        }
    }

    /// Attaches node `i` on its shared connection's relayed stream, opening
    /// that stream with the first node on it.
    fn attach_relayed(self: &Arc<Self>, i: usize, retry: Duration) {
        let k = i % self.relayed.len();
        let mut state = lock(&self.relayed[k].state);
        state.nodes.push(i);
        if let Some(up) = &state.up {
            let _ = up.send(relayed_hello(i));
        }
        if !std::mem::replace(&mut state.opened, true) {
            tokio::spawn(self.clone().keep_relayed(k, retry));
        }
    }

    /// Keeps shared connection `k`'s relayed stream open, answering each
    /// call that comes down it for the node it names.
    async fn keep_relayed(self: Arc<Self>, k: usize, retry: Duration) {
        let mut client = AgentGatewayClient::new(self.coordinator[k].clone());
        loop {
            let (up, outgoing) = tokio::sync::mpsc::unbounded_channel();
            {
                let mut state = lock(&self.relayed[k].state);
                for &i in &state.nodes {
                    let _ = up.send(relayed_hello(i));
                }
                state.up = Some(up.clone());
            }
            if let Ok(calls) =
                client.attach_relayed(tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing)).await
            {
                let mut calls = calls.into_inner();
                while let Ok(Some(relayed)) = calls.message().await {
                    let Some(i) = index_of(&relayed.node_id).filter(|&i| i < self.nodes.len()) else { continue };
                    if let Some(call) = relayed.call {
                        let (fleet, up) = (self.clone(), up.clone());
                        tokio::spawn(async move {
                            let mut extensions = Extensions::new();
                            extensions.insert(SimIndex(i));
                            let answer = attach::answer(&*fleet, call, &extensions).await;
                            let _ = up.send(RelayedAnswer {
                                node_id: node_id(i),
                                answer: Some(answer),
                                agent_cert: Vec::new(),
                                detached: false,
                            });
                        });
                    } else if relayed.ended.is_some() {
                        // Attach it again on this stream, as a relay's agent would.
                        self.counters.detached.fetch_add(1, Ordering::Relaxed);
                        let _ = up.send(relayed_hello(i));
                    }
                }
            }
            let attached = {
                let mut state = lock(&self.relayed[k].state);
                state.up = None;
                state.nodes.len()
            };
            self.counters.detached.fetch_add(attached as u64, Ordering::Relaxed);
            tokio::time::sleep(hotfleet_proto::pushback::jittered(retry)).await;
        }
    }

    /// Registers node `i` (then attaches it, as the agent does), then
    /// heartbeats every `interval` until the process ends.
    pub async fn run_node(self: Arc<Self>, i: usize, interval: Duration) {
        let mut attach = self.attach != Attach::Dial;
        let mut client = AgentGatewayClient::new(self.channel(i));
        let mut registered = false;
        // As a real agent: digests the leader holds are left out, others
        // named by fingerprint (coordinator_link.rs).
        let protocol = *lock(&self.digest_protocol);
        let mut held = match protocol {
            DigestProtocol::Fingerprints => HeldDigests::default(),
            DigestProtocol::WholeMaps | DigestProtocol::Full => HeldDigests::without_fingerprints(),
        };
        let mut next = tokio::time::Instant::now() + interval;
        loop {
            let mut status = self.status_of(i);
            if !registered || protocol == DigestProtocol::Full {
                held.forget();
            }
            let sent = held.strip("coordinator", &mut status);
            let answer = if registered {
                self.counters.heartbeat.fetch_add(1, Ordering::Relaxed);
                let mut request = Request::new(HeartbeatRequest { node: Some(status) });
                request.set_timeout(Duration::from_secs(5));
                client.heartbeat(request).await.map(|r| {
                    let r = r.get_ref();
                    (r.known, r.epoch, r.send_digests || !r.known)
                })
            } else {
                self.counters.register.fetch_add(1, Ordering::Relaxed);
                let mut request = Request::new(RegisterRequest { node: Some(status) });
                request.set_timeout(Duration::from_secs(30));
                client.register(request).await.map(|r| (true, r.get_ref().epoch, r.get_ref().send_digests))
            };
            let node = &self.nodes[i];
            match answer {
                Ok((known, epoch, send_digests)) => {
                    // As the agent: a map named that the leader lacks goes whole at once.
                    let again = send_digests && sent.named();
                    held.answered(sent, epoch, send_digests);
                    let mut state = lock(&node.state);
                    state.known = known;
                    state.highest_epoch = state.highest_epoch.max(epoch);
                    registered = known;
                    if std::mem::take(&mut attach) {
                        match self.attach {
                            Attach::Relayed => self.attach_relayed(i, interval),
                            _ => drop(tokio::spawn(self.clone().attach_node(i, interval))),
                        }
                    }
                    if send_digests {
                        self.counters.digests_asked.fetch_add(1, Ordering::Relaxed);
                    }
                    if again {
                        continue;
                    }
                }
                Err(status) => {
                    // Told to come back later (admission control): as the
                    // real agent does, wait that long, jittered, and ask again.
                    if let Some(wait) = hotfleet_proto::pushback::wait_of(&status) {
                        self.counters.pushbacks.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(hotfleet_proto::pushback::jittered(wait)).await;
                        continue;
                    }
                    let errors = self.counters.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
                    // The first few say why, for a reader chasing a lost node.
                    if errors < 10 {
                        eprintln!(
                            "  heartbeat error at {:.1} s, {}: {:?} {}",
                            self.started.elapsed().as_secs_f64(),
                            node.id,
                            status.code(),
                            status.message()
                        );
                    }
                    lock(&node.state).known = false;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next.max(tokio::time::Instant::now())) => next += interval,
                _ = node.changed.notified() => {}
            }
        }
    }

    /// Serves every node's Agent service on `listener` until the process ends.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        Server::builder().tcp_nodelay(true).add_service(AgentServer::from_arc(self)).serve_with_incoming(incoming).await
    }

    fn admit(&self, node: &SimNode, header: &Option<CommandHeader>) -> CommandHeader {
        let header = header.clone().unwrap_or_default();
        let mut state = lock(&node.state);
        state.highest_epoch = state.highest_epoch.max(header.epoch);
        header
    }

    fn outcome(&self, node: &SimNode, ok: bool, error: &str) -> Vec<ProcessOutcome> {
        vec![ProcessOutcome {
            process_id: node.process_id(),
            pid: node.pid,
            ok,
            error: error.to_string(),
            pause_ms: 0.0,
            prepare_ms: 0.0,
            detail_json: String::new(),
        }]
    }
}

#[tonic::async_trait]
impl Agent for Fleet {
    async fn prepare(&self, request: Request<PrepareRequest>) -> Result<Response<PrepareResponse>, Status> {
        self.counters.prepare.fetch_add(1, Ordering::Relaxed);
        let (i, node) = self.node_for(&request)?;
        let header = self.admit(&node, &request.get_ref().header);
        if !self.fetch(i, &header.patch_id).await {
            let reason = format!("cannot fetch patch {}", header.patch_id);
            return Ok(Response::new(PrepareResponse {
                vote_yes: false,
                processes: self.outcome(&node, false, &reason),
                reason,
            }));
        }
        {
            let mut state = lock(&node.state);
            if !state.prepared.iter().any(|p| p.rollout_id == header.rollout_id && p.patch_id == header.patch_id) {
                state.prepared.push(PreparedPatch {
                    rollout_id: header.rollout_id.clone(),
                    patch_id: header.patch_id.clone(),
                    expires_at_ms: 0,
                });
            }
        }
        Ok(Response::new(PrepareResponse {
            vote_yes: true,
            reason: String::new(),
            processes: self.outcome(&node, true, ""),
        }))
    }

    async fn commit(&self, request: Request<CommitRequest>) -> Result<Response<CommitResponse>, Status> {
        self.counters.commit.fetch_add(1, Ordering::Relaxed);
        let (i, node) = self.node_for(&request)?;
        let header = self.admit(&node, &request.get_ref().header);
        let injected = lock(&self.faults).fail_commit.as_ref().is_some_and(|(n, p)| *n == i && *p == header.patch_id);
        if injected {
            let reason = "injected commit failure".to_string();
            return Ok(Response::new(CommitResponse {
                ok: false,
                processes: self.outcome(&node, false, &reason),
                reason,
            }));
        }
        let mut state = lock(&node.state);
        state.prepared.retain(|p| p.patch_id != header.patch_id);
        if !state.stack.contains(&header.patch_id) {
            state.stack.push(header.patch_id.clone());
        }
        drop(state);
        node.changed.notify_one();
        Ok(Response::new(CommitResponse { ok: true, reason: String::new(), processes: self.outcome(&node, true, "") }))
    }

    async fn abort(&self, request: Request<AbortRequest>) -> Result<Response<AbortResponse>, Status> {
        self.counters.abort.fetch_add(1, Ordering::Relaxed);
        let (_, node) = self.node_for(&request)?;
        let header = self.admit(&node, &request.get_ref().header);
        lock(&node.state).prepared.retain(|p| p.patch_id != header.patch_id);
        Ok(Response::new(AbortResponse { ok: true, reason: String::new(), processes: self.outcome(&node, true, "") }))
    }

    async fn rollback(&self, request: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        self.counters.rollback.fetch_add(1, Ordering::Relaxed);
        let (_, node) = self.node_for(&request)?;
        let header = self.admit(&node, &request.get_ref().header);
        let mut state = lock(&node.state);
        if state.stack.last() == Some(&header.patch_id) {
            state.stack.pop();
        }
        // As the agent: a rollback also drops the patch where it is only prepared.
        state.prepared.retain(|p| p.patch_id != header.patch_id);
        drop(state);
        Ok(Response::new(RollbackResponse {
            ok: true,
            reason: String::new(),
            processes: self.outcome(&node, true, ""),
        }))
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.counters.status.fetch_add(1, Ordering::Relaxed);
        let (i, _) = self.node_for(&request)?;
        Ok(Response::new(StatusResponse { node: Some(self.status_of(i)) }))
    }

    async fn health(&self, request: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        self.counters.health.fetch_add(1, Ordering::Relaxed);
        let (i, node) = self.node_for(&request)?;
        let since = request.get_ref().since.get(&node.process_id()).copied().unwrap_or(0);
        let health = self.health_of(i, &node, since);
        let healthy = health.exceptions_since == 0;
        Ok(Response::new(HealthResponse {
            node_id: node.id.clone(),
            processes: vec![ProcessHealthReport {
                process_id: node.process_id(),
                pid: node.pid,
                reachable: true,
                health: Some(health),
                error: String::new(),
            }],
            healthy,
            summary: if healthy { "1 processes healthy".into() } else { "1 new unhandled exception".into() },
        }))
    }
}

/// Which node a call down an attached stream is for.
#[derive(Debug, Clone, Copy)]
struct SimIndex(usize);

/// The index of a node id of the fleet.
fn index_of(node_id: &str) -> Option<usize> {
    node_id.strip_prefix("sim-")?.parse().ok()
}

/// Node ids of the fleet, by index (the coordinator orders targets by id,
/// so the last index is in the last wave).
pub fn node_id(i: usize) -> String {
    format!("sim-{i:05}")
}

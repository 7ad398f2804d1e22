//! How the coordinator talks to agents.
//!
//! [`AgentClient`] is the seam between the rollout engine and the network:
//! the engine only sees domain answers ([`Outcome`], health
//! [`Sample`]s), so it is tested with an in-memory double. [`GrpcAgents`] is
//! the real thing: an attached agent is asked down the stream it opened
//! (`agent_links.rs`); any other over a lazily connected tonic channel, open
//! while it is used (`agent_channels.rs` closes idle ones, and the least
//! recently used beyond an optional cap). Every call is under a deadline that starts when the call is sent (sent as
//! `grpc-timeout` *and* enforced here, so a silent agent costs at most its
//! deadline; waiting for a slot does not count, or a healthy node at the back
//! of a long queue would "time out" before it was asked) and a global bound
//! on calls in flight (a semaphore) that grows with the fleet, so a rollout
//! over thousands of nodes never opens thousands of requests at once nor
//! queues them behind a bound sized for a few dozen.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

pub use crate::agent_channels::AgentChannels;
pub use crate::agent_links::AgentLinks;

use async_trait::async_trait;
use hotfleet_obs::grpc::{record_call, Grpc, GrpcLayer, Side};
use hotfleet_proto::v1::{
    agent_answer::Answer, agent_call::Call, agent_client::AgentClient as ProtoAgentClient, AbortRequest, CommandHeader,
    CommitRequest, HealthRequest, PrepareRequest, RollbackRequest,
};
use hotfleet_proto::{attach::method_of, tls::Transport};
use tokio::sync::Semaphore;
use tonic::transport::Channel;
use tower::Layer as _;

use crate::{
    agent_links::{Link, LinkError},
    rollout::{health::Sample, RolloutKind},
};

/// Which two-phase-commit command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// Stage the patch and vote; the agent keeps it prepared for
    /// `ttl_seconds` (0: the agent's own default).
    Prepare {
        ttl_seconds: u32,
    },
    Commit,
    Abort,
    Rollback,
}

impl CommandKind {
    pub fn name(self) -> &'static str {
        match self {
            CommandKind::Prepare { .. } => "prepare",
            CommandKind::Commit => "commit",
            CommandKind::Abort => "abort",
            CommandKind::Rollback => "rollback",
        }
    }
}

/// One command: agents key idempotency on (rollout, patch, kind) and refuse
/// an epoch older than the newest they have seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub kind: CommandKind,
    pub rollout_id: String,
    pub patch_id: String,
    pub epoch: u64,
    /// Prepare only: just this process prepares (a plan); empty: every
    /// process of the patch's build on the node.
    pub process_id: String,
    /// What the command's rollout does with the patch.
    pub rollout_kind: RolloutKind,
}

impl Command {
    /// The same command identity, another kind (a plan prepares, then aborts).
    pub fn with_kind(&self, kind: CommandKind) -> Self {
        Self { kind, ..self.clone() }
    }
}

/// Where an agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub node_id: String,
    pub addr: String,
}

/// A prepare vote, or a commit/abort/rollback outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub ok: bool,
    /// Why not (agent's reason plus failing processes).
    pub reason: String,
    /// Each process's answer (a prepare's carries the runtime's plan).
    pub processes: Vec<ProcessReply>,
}

/// One game process's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessReply {
    pub process_id: String,
    pub pid: u32,
    pub ok: bool,
    pub error: String,
    /// The runtime's JSON: a prepare's plan, a commit's or rollback's report.
    pub detail_json: String,
}

/// The agent could not be asked (network, deadline, refusal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent {node} unreachable at {addr}: {reason}")]
    Unreachable { node: String, addr: String, reason: String },
    #[error("agent {node} did not answer within {ms} ms")]
    Deadline { node: String, ms: u64 },
    #[error("agent {node} refused: {reason}")]
    Refused { node: String, reason: String },
}

/// Commands and queries the engine sends to agents.
#[async_trait]
pub trait AgentClient: Send + Sync + 'static {
    /// Sends one command (any kind) and returns the agent's answer: a
    /// prepare vote, or a commit/abort/rollback outcome.
    async fn send(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError>;
    /// Health of every process, counted from the given per-process marks
    /// (empty map: since ever; the answer carries the current marks).
    async fn health(
        &self,
        to: &Target,
        since: &BTreeMap<String, u64>,
        deadline: Duration,
    ) -> Result<Vec<HealthSample>, AgentError>;

    /// How many calls to `agents` agents this client runs at once; a
    /// fan-out keeps no more than this waiting at a time (each waiting call
    /// holds its request and state machine: ~10 KB, times the whole fleet
    /// when every call was started at once). Default: all of them.
    fn width(&self, agents: usize) -> usize {
        agents.max(1)
    }

    /// Where agents that attach (`AgentGateway.Attach`) leave their links
    /// for this client to send down; `None`: this client only dials.
    fn links(&self) -> Option<AgentLinks> {
        None
    }
}

/// A health sample plus what a baseline needs from it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HealthSample {
    pub sample: Sample,
    pub mark: u64,
}

/// Agents per call slot once the fleet outgrows the configured bound.
const AGENTS_PER_SLOT: usize = 4;
/// The most calls in flight the fleet's size alone can ask for: beyond this
/// a 2-core coordinator gains nothing but memory and contention.
const MAX_SCALED_IN_FLIGHT: usize = 1024;

/// Calls allowed in flight for `agents` known agents: at least the
/// configured `floor`, one per [`AGENTS_PER_SLOT`] agents above it, capped at
/// [`MAX_SCALED_IN_FLIGHT`] (a floor set above the cap is kept).
pub fn in_flight_limit(floor: usize, agents: usize) -> usize {
    floor.max(1).max((agents / AGENTS_PER_SLOT).min(MAX_SCALED_IN_FLIGHT))
}

/// The real [`AgentClient`] over gRPC.
pub struct GrpcAgents {
    channels: AgentChannels,
    /// Channels kept open at most (0: one per agent; idle ones close anyway).
    channel_cap: usize,
    bound: Mutex<Bound>,
    call_timeout: Duration,
    in_flight: Arc<Semaphore>,
    /// With TLS, each agent must present the certificate of the node it
    /// registered as, and sees ours (the coordinator's) in return.
    transport: Transport,
    /// Attached agents: asked down their own connection, not dialled.
    links: AgentLinks,
}

/// The configured floor and the call bound the fleet has grown the semaphore to.
struct Bound {
    floor: usize,
    limit: usize,
}

impl GrpcAgents {
    /// `min_in_flight`: the bound on calls in flight for a small fleet; it
    /// grows with the number of agents (see [`in_flight_limit`]).
    pub fn new(call_timeout: Duration, min_in_flight: usize, transport: Transport) -> Self {
        let limit = in_flight_limit(min_in_flight, 0);
        Self {
            channels: AgentChannels::new(),
            channel_cap: 0,
            bound: Mutex::new(Bound { floor: min_in_flight, limit }),
            call_timeout,
            in_flight: Arc::new(Semaphore::new(limit)),
            transport,
            links: AgentLinks::new(),
        }
    }

    /// At most `cap` channels open (0: no cap); see `agent_channels.rs`.
    pub fn with_channel_cap(mut self, cap: usize) -> Self {
        self.channel_cap = cap;
        self
    }

    /// Calls allowed in flight now.
    pub fn in_flight_bound(&self) -> usize {
        self.bound.lock().unwrap_or_else(|e| e.into_inner()).limit
    }

    /// The bound these agents will have grown the semaphore to (a fan-out
    /// over the fleet's first rollout asks before any channel is open).
    fn fan_out_width(&self, agents: usize) -> usize {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        bound.limit.max(in_flight_limit(bound.floor, agents))
    }

    /// Channels open now.
    pub fn open_channels(&self) -> usize {
        self.channels.open_count()
    }

    fn channel(&self, to: &Target) -> Result<Channel, AgentError> {
        // Keyed by node too: the TLS server name is the node id.
        let key = (to.node_id.clone(), to.addr.clone());
        let max_open = if self.channel_cap == 0 { usize::MAX } else { self.channel_cap };
        self.channels.get_or_open(&key, max_open, || {
            // The server name verified is the node id: an address that now
            // answers with another node's certificate is not this node.
            let endpoint = self.transport.endpoint(&to.addr, &to.node_id).map_err(|e| AgentError::Unreachable {
                node: to.node_id.clone(),
                addr: to.addr.clone(),
                reason: format!("bad advertise_addr: {e}"),
            })?;
            Ok(endpoint
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .connect_lazy())
        })
    }

    /// Counts `to` among the agents asked, growing the bound on calls in
    /// flight with the fleet (attached or dialled alike).
    fn grow_bound(&self, to: &Target) {
        let agents = self.channels.note(&(to.node_id.clone(), to.addr.clone()));
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = in_flight_limit(bound.floor, agents);
        if wanted > bound.limit {
            self.in_flight.add_permits(wanted - bound.limit);
            bound.limit = wanted;
        }
    }

    /// Asks `to` one call under the concurrency bound and the deadline:
    /// down its attached stream if it has one, else over a dialled channel.
    async fn ask(&self, to: &Target, deadline: Duration, call: Call) -> Result<Answer, AgentError> {
        let deadline = deadline.min(self.call_timeout).max(Duration::from_millis(1));
        self.grow_bound(to);
        // The deadline starts once a slot is ours and the call goes out: the
        // wait before is the coordinator's backlog, not the agent's silence.
        // (A step's own deadline still bounds the whole step, queue included.)
        let _permit = self.in_flight.acquire().await.map_err(|_| AgentError::Unreachable {
            node: to.node_id.clone(),
            addr: to.addr.clone(),
            reason: "coordinator shutting down".into(),
        })?;
        let answer = match self.links.get(&to.node_id) {
            Some(link) => down_link(to, &link, call, deadline).await?,
            None => {
                // The channel only once the slot is ours: a queued call holding one
                // would keep it (and its buffers) open past the pool's bound.
                let client = ProtoAgentClient::new(GrpcLayer::client().layer(self.channel(to)?));
                match tokio::time::timeout(deadline, dial(client, call, deadline)).await {
                    Ok(result) => result.map_err(|status| status_error(to, deadline, status))?,
                    Err(_) => return Err(deadline_error(to, deadline)),
                }
            }
        };
        match answer {
            // A call the attached agent failed is judged as the same status on a unary call.
            Answer::Failed(failed) => {
                Err(status_error(to, deadline, tonic::Status::new(tonic::Code::from(failed.code), failed.message)))
            }
            answer => Ok(answer),
        }
    }
}

/// One call down an attached agent's link, counted in the gRPC metrics as
/// the dialled call it stands for would be.
async fn down_link(to: &Target, link: &Arc<Link>, call: Call, deadline: Duration) -> Result<Answer, AgentError> {
    let (method, started) = (method_of(&call), std::time::Instant::now());
    let answered = tokio::time::timeout(deadline, link.call(call, deadline)).await;
    let code = match &answered {
        Ok(Ok(Answer::Failed(failed))) => tonic::Code::from(failed.code),
        Ok(Ok(_)) => tonic::Code::Ok,
        Ok(Err(LinkError::Closed)) => tonic::Code::Unavailable,
        Err(_) => tonic::Code::DeadlineExceeded,
    };
    record_call(Side::Client, method, code, started);
    match answered {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(closed)) => {
            Err(AgentError::Unreachable { node: to.node_id.clone(), addr: to.addr.clone(), reason: closed.to_string() })
        }
        Err(_) => Err(deadline_error(to, deadline)),
    }
}

fn deadline_error(to: &Target, deadline: Duration) -> AgentError {
    AgentError::Deadline { node: to.node_id.clone(), ms: deadline.as_millis() as u64 }
}

/// One call as a unary RPC to a dialled agent.
async fn dial(
    mut client: ProtoAgentClient<Grpc<Channel>>,
    call: Call,
    deadline: Duration,
) -> Result<Answer, tonic::Status> {
    let d = deadline;
    Ok(match call {
        Call::Prepare(r) => Answer::Prepare(client.prepare(with_deadline(r, d)).await?.into_inner()),
        Call::Commit(r) => Answer::Commit(client.commit(with_deadline(r, d)).await?.into_inner()),
        Call::Abort(r) => Answer::Abort(client.abort(with_deadline(r, d)).await?.into_inner()),
        Call::Rollback(r) => Answer::Rollback(client.rollback(with_deadline(r, d)).await?.into_inner()),
        Call::Health(r) => Answer::Health(client.health(with_deadline(r, d)).await?.into_inner()),
    })
}

/// What an answer answers, for the error when it is not what was asked.
fn answer_name(answer: &Answer) -> &'static str {
    match answer {
        Answer::Hello(_) => "a hello",
        Answer::Prepare(_) => "a prepare answer",
        Answer::Commit(_) => "a commit answer",
        Answer::Abort(_) => "an abort answer",
        Answer::Rollback(_) => "a rollback answer",
        Answer::Health(_) => "a health answer",
        Answer::Failed(_) => "a failure",
    }
}

fn mismatched(to: &Target, asked: &str, answer: &Answer) -> AgentError {
    AgentError::Refused {
        node: to.node_id.clone(),
        reason: format!("asked {asked}, answered with {}", answer_name(answer)),
    }
}

fn status_error(to: &Target, deadline: Duration, status: tonic::Status) -> AgentError {
    use tonic::Code;
    match status.code() {
        // tonic's client enforces the grpc-timeout it sends and reports it so.
        Code::Cancelled if status.message().contains("Timeout expired") => deadline_error(to, deadline),
        Code::Unavailable | Code::Unknown | Code::Cancelled => AgentError::Unreachable {
            node: to.node_id.clone(),
            addr: to.addr.clone(),
            reason: status.message().to_string(),
        },
        Code::DeadlineExceeded => deadline_error(to, deadline),
        code => AgentError::Refused { node: to.node_id.clone(), reason: format!("{code:?}: {}", status.message()) },
    }
}

fn header(cmd: &Command) -> Option<CommandHeader> {
    let kind = match cmd.rollout_kind {
        RolloutKind::Apply => hotfleet_proto::v1::RolloutKind::Apply,
        RolloutKind::Revert => hotfleet_proto::v1::RolloutKind::Revert,
        RolloutKind::Rebase => hotfleet_proto::v1::RolloutKind::Rebase,
    };
    Some(CommandHeader {
        rollout_id: cmd.rollout_id.clone(),
        patch_id: cmd.patch_id.clone(),
        epoch: cmd.epoch,
        kind: kind.into(),
    })
}

fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// The agent's reason plus each failing process's error, in one line.
fn outcome(ok: bool, reason: String, processes: &[hotfleet_proto::v1::ProcessOutcome]) -> Outcome {
    let mut parts = Vec::new();
    if !reason.is_empty() {
        parts.push(reason);
    }
    for p in processes.iter().filter(|p| !p.ok) {
        parts.push(format!("process {} (pid {}): {}", p.process_id, p.pid, p.error));
    }
    let processes = processes
        .iter()
        .map(|p| ProcessReply {
            process_id: p.process_id.clone(),
            pid: p.pid,
            ok: p.ok,
            error: p.error.clone(),
            detail_json: p.detail_json.clone(),
        })
        .collect();
    Outcome { ok, reason: parts.join("; "), processes }
}

#[async_trait]
impl AgentClient for GrpcAgents {
    async fn send(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError> {
        let header = header(cmd);
        let call = match cmd.kind {
            CommandKind::Prepare { ttl_seconds } => {
                Call::Prepare(PrepareRequest { header, ttl_seconds, process_id: cmd.process_id.clone() })
            }
            CommandKind::Commit => Call::Commit(CommitRequest { header }),
            CommandKind::Abort => Call::Abort(AbortRequest { header }),
            CommandKind::Rollback => Call::Rollback(RollbackRequest { header }),
        };
        // Each kind answers ok-or-not, a reason and per-process outcomes.
        match (cmd.kind, self.ask(to, deadline, call).await?) {
            (CommandKind::Prepare { .. }, Answer::Prepare(r)) => Ok(outcome(r.vote_yes, r.reason, &r.processes)),
            (CommandKind::Commit, Answer::Commit(r)) => Ok(outcome(r.ok, r.reason, &r.processes)),
            (CommandKind::Abort, Answer::Abort(r)) => Ok(outcome(r.ok, r.reason, &r.processes)),
            (CommandKind::Rollback, Answer::Rollback(r)) => Ok(outcome(r.ok, r.reason, &r.processes)),
            (kind, other) => Err(mismatched(to, kind.name(), &other)),
        }
    }

    fn width(&self, agents: usize) -> usize {
        self.fan_out_width(agents)
    }

    fn links(&self) -> Option<AgentLinks> {
        Some(self.links.clone())
    }

    async fn health(
        &self,
        to: &Target,
        since: &BTreeMap<String, u64>,
        deadline: Duration,
    ) -> Result<Vec<HealthSample>, AgentError> {
        let since: HashMap<String, u64> = since.iter().map(|(k, v)| (k.clone(), *v)).collect();
        let r = match self.ask(to, deadline, Call::Health(HealthRequest { since })).await? {
            Answer::Health(r) => r,
            other => return Err(mismatched(to, "health", &other)),
        };
        Ok(r.processes
            .into_iter()
            .map(|p| {
                let h = p.health.unwrap_or_default();
                HealthSample {
                    mark: h.mark,
                    sample: Sample {
                        process_id: p.process_id,
                        pid: p.pid,
                        reachable: p.reachable,
                        alive: h.alive,
                        ticks_since: h.ticks_since,
                        tick_p99_ms: h.tick_p99_ms,
                        exceptions_since: h.exceptions_since,
                        game_ok: h.game_ok,
                        game_detail: h.game_detail,
                        error: p.error,
                    },
                }
            })
            .collect())
    }
}

#[cfg(test)]
#[path = "agents_tests.rs"]
mod tests;

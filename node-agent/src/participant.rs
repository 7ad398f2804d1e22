//! The agent's side of the two-phase commit.
//!
//! Commands are serialised per node (one at a time, in arrival order), fenced
//! by the coordinator epoch ([`EpochFence`]) and idempotent: the first answer
//! to (rollout, patch, command) is remembered and repeated, so a coordinator
//! that retries after a lost reply or a fail-over never applies anything twice.
//! A prepared patch waits at most its TTL for commit or abort; then the agent
//! presumes abort and tells every runtime to drop it.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::future::join_all;
use hotfleet_patch::Bundle;
use hotfleet_proto::v1::{
    runtime_frame::Body, CommandHeader, HealthQuery, PreparedPatch, ProcessHealthReport, ProcessOutcome, ProcessStatus,
    RuntimeAbort, RuntimeCommit, RuntimePrepare, RuntimeResult, RuntimeRollback, StackPatch, StackReply, StatusQuery,
};
use tokio::sync::Mutex;

use crate::{
    epoch::{EpochError, EpochFence},
    patches::{FetchError, PatchSource},
    sessions::{Session, SessionError, Sessions, StackProvider},
};

/// How many answers are remembered for idempotent replay.
const REMEMBERED_ANSWERS: usize = 1024;
/// Status and health queries must not hang a heartbeat.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error(transparent)]
    Epoch(#[from] EpochError),
    #[error("command has no header (rollout id, patch id, epoch)")]
    MissingHeader,
    #[error("rollout id must not be empty")]
    MissingRollout,
    #[error("patch id {0:?} is not a patch id (64 hex digits)")]
    BadPatchId(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Prepare,
    Commit,
    Abort,
    Rollback,
}

/// A node's answer to one command.
#[derive(Debug, Clone, Default)]
pub struct Answer {
    pub ok: bool,
    pub reason: String,
    pub processes: Vec<ProcessOutcome>,
}

#[derive(Debug, Clone)]
struct Prepared {
    rollout_id: String,
    patch_id: String,
    processes: Vec<String>,
    expires_at: SystemTime,
}

struct State {
    fence: EpochFence,
    /// Commands admitted / refused for a stale epoch (reported in NodeStatus).
    admitted: u64,
    refused_stale: u64,
    prepared: Vec<Prepared>,
    answers: HashMap<(String, String, Kind), Answer>,
    answer_order: VecDeque<(String, String, Kind)>,
}

impl State {
    fn remember(&mut self, key: (String, String, Kind), answer: Answer) {
        if self.answers.insert(key.clone(), answer).is_none() {
            self.answer_order.push_back(key);
        }
        while self.answer_order.len() > REMEMBERED_ANSWERS {
            if let Some(old) = self.answer_order.pop_front() {
                self.answers.remove(&old);
            }
        }
    }
}

/// The two-phase-commit participant of one node.
pub struct Participant {
    node_id: String,
    sessions: Sessions,
    patches: PatchSource,
    state: Mutex<State>,
    runtime_timeout: Duration,
    default_ttl: Duration,
}

impl Participant {
    pub fn new(
        node_id: String,
        sessions: Sessions,
        patches: PatchSource,
        fence: EpochFence,
        runtime_timeout: Duration,
        default_ttl: Duration,
    ) -> Self {
        let state = State {
            fence,
            admitted: 0,
            refused_stale: 0,
            prepared: Vec::new(),
            answers: HashMap::new(),
            answer_order: VecDeque::new(),
        };
        Self { node_id, sessions, patches, state: Mutex::new(state), runtime_timeout, default_ttl }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    pub async fn highest_epoch(&self) -> u64 {
        self.state.lock().await.fence.highest()
    }

    /// (admitted, refused for a stale epoch) commands since start.
    pub async fn command_counts(&self) -> (u64, u64) {
        let state = self.state.lock().await;
        (state.admitted, state.refused_stale)
    }

    /// The leader announced its epoch (heartbeat answer): from now on older
    /// epochs are refused, before that leader's first command arrives.
    pub async fn observe_epoch(&self, epoch: u64) -> Result<(), EpochError> {
        let mut state = self.state.lock().await;
        let before = state.fence.highest();
        if state.fence.raise(epoch)? {
            tracing::info!(epoch, previous = before, "new coordinator epoch: older epochs are refused from now on");
        }
        Ok(())
    }

    /// Phase 1: fetch and verify the patch, have every runtime of its target
    /// build prepare it, vote yes only if all did.
    pub async fn prepare(&self, header: Option<CommandHeader>, ttl: Duration) -> Result<Answer, ParticipantError> {
        let mut state = self.state.lock().await;
        let header = admit(&mut state, header)?;
        let key = (header.rollout_id.clone(), header.patch_id.clone(), Kind::Prepare);
        if let Some(answer) = state.answers.get(&key) {
            return Ok(answer.clone());
        }
        let ttl = if ttl.is_zero() { self.default_ttl } else { ttl };
        let answer = self.prepare_fresh(&mut state, &header, ttl).await;
        tracing::info!(rollout = %header.rollout_id, patch = %short(&header.patch_id), vote_yes = answer.ok, reason = %answer.reason, "prepare");
        state.remember(key, answer.clone());
        Ok(answer)
    }

    async fn prepare_fresh(&self, state: &mut State, header: &CommandHeader, ttl: Duration) -> Answer {
        let bundle = match self.patches.get(&header.patch_id).await {
            Ok(bundle) => bundle,
            Err(err) => return refused(&err),
        };
        let build = bundle.manifest.target_build.clone();
        let targets: Vec<Session> = self.sessions.list().into_iter().filter(|s| s.build() == build).collect();
        if targets.is_empty() {
            return Answer {
                ok: false,
                reason: format!("no process on node {} runs target build {build:?}", self.node_id),
                processes: vec![],
            };
        }
        let modules = bundle.modules.iter().cloned().collect();
        let body = Body::Prepare(RuntimePrepare { patch_id: header.patch_id.clone(), modules });
        let outcomes = self.ask_all(&targets, body, "prepare").await;
        let ok = outcomes.iter().all(|o| o.ok);
        if ok {
            state.prepared.retain(|p| !(p.rollout_id == header.rollout_id && p.patch_id == header.patch_id));
            state.prepared.push(Prepared {
                rollout_id: header.rollout_id.clone(),
                patch_id: header.patch_id.clone(),
                processes: targets.iter().map(|s| s.process_id.clone()).collect(),
                expires_at: SystemTime::now() + ttl,
            });
            Answer { ok, reason: String::new(), processes: outcomes }
        } else {
            // Drop what did prepare right away; the coordinator's abort will find nothing left.
            let prepared: Vec<Session> = targets
                .iter()
                .filter(|s| outcomes.iter().any(|o| o.ok && o.process_id == s.process_id))
                .cloned()
                .collect();
            self.ask_all(&prepared, Body::Abort(RuntimeAbort { patch_id: header.patch_id.clone() }), "abort").await;
            Answer { ok, reason: failure_summary(&outcomes), processes: outcomes }
        }
    }

    /// Phase 2: every process that prepared applies the patch at its safe point.
    pub async fn commit(&self, header: Option<CommandHeader>) -> Result<Answer, ParticipantError> {
        let mut state = self.state.lock().await;
        let header = admit(&mut state, header)?;
        let key = (header.rollout_id.clone(), header.patch_id.clone(), Kind::Commit);
        if let Some(answer) = state.answers.get(&key) {
            return Ok(answer.clone());
        }
        let position =
            state.prepared.iter().position(|p| p.rollout_id == header.rollout_id && p.patch_id == header.patch_id);
        let answer = match position.map(|i| state.prepared.remove(i)) {
            None => Answer {
                ok: false,
                reason: format!(
                    "patch {} is not prepared on node {} for rollout {} (never prepared, aborted, or expired: presumed abort)",
                    short(&header.patch_id),
                    self.node_id,
                    header.rollout_id
                ),
                processes: vec![],
            },
            Some(prepared) => {
                let mut outcomes = Vec::new();
                let mut live = Vec::new();
                for process_id in &prepared.processes {
                    match self.sessions.get(process_id) {
                        Some(session) => live.push(session),
                        None => outcomes.push(ProcessOutcome {
                            process_id: process_id.clone(),
                            ok: false,
                            error: format!("process {process_id} disconnected after prepare"),
                            ..Default::default()
                        }),
                    }
                }
                let body = Body::Commit(RuntimeCommit { patch_id: header.patch_id.clone() });
                outcomes.extend(self.ask_all(&live, body, "commit").await);
                let ok = outcomes.iter().all(|o| o.ok);
                let reason = if ok { String::new() } else { failure_summary(&outcomes) };
                Answer { ok, reason, processes: outcomes }
            }
        };
        tracing::info!(rollout = %header.rollout_id, patch = %short(&header.patch_id), ok = answer.ok, reason = %answer.reason, "commit");
        state.remember(key, answer.clone());
        Ok(answer)
    }

    /// Drops a prepared patch everywhere on this node (nothing live changes).
    pub async fn abort(&self, header: Option<CommandHeader>) -> Result<Answer, ParticipantError> {
        let mut state = self.state.lock().await;
        let header = admit(&mut state, header)?;
        let key = (header.rollout_id.clone(), header.patch_id.clone(), Kind::Abort);
        if let Some(answer) = state.answers.get(&key) {
            return Ok(answer.clone());
        }
        let mut dropped = Vec::new();
        state.prepared.retain(|p| {
            let hit = p.rollout_id == header.rollout_id && p.patch_id == header.patch_id;
            if hit {
                dropped.push(p.clone());
            }
            !hit
        });
        let sessions: Vec<Session> =
            dropped.iter().flat_map(|p| p.processes.iter()).filter_map(|id| self.sessions.get(id)).collect();
        let outcomes =
            self.ask_all(&sessions, Body::Abort(RuntimeAbort { patch_id: header.patch_id.clone() }), "abort").await;
        // A process that vanished holds nothing prepared any more: abort is satisfied.
        let answer = Answer { ok: true, reason: String::new(), processes: outcomes };
        tracing::info!(rollout = %header.rollout_id, patch = %short(&header.patch_id), "abort");
        state.remember(key, answer.clone());
        Ok(answer)
    }

    /// Undoes the patch on every process that runs it on top of its stack.
    pub async fn rollback(&self, header: Option<CommandHeader>) -> Result<Answer, ParticipantError> {
        let mut state = self.state.lock().await;
        let header = admit(&mut state, header)?;
        let key = (header.rollout_id.clone(), header.patch_id.clone(), Kind::Rollback);
        if let Some(answer) = state.answers.get(&key) {
            return Ok(answer.clone());
        }
        // A rollback also cancels a prepare still waiting on this node.
        state.prepared.retain(|p| !(p.rollout_id == header.rollout_id && p.patch_id == header.patch_id));
        let mut outcomes = Vec::new();
        let mut targets = Vec::new();
        for session in self.sessions.list() {
            let stack = session.info().patch_stack;
            match stack.iter().position(|id| *id == header.patch_id) {
                None => {}
                Some(pos) if pos + 1 == stack.len() => targets.push(session),
                Some(_) => outcomes.push(ProcessOutcome {
                    process_id: session.process_id.clone(),
                    pid: session.pid(),
                    ok: false,
                    error: format!(
                        "patch {} is not on top of process {}'s stack (later patches must be rolled back first)",
                        short(&header.patch_id),
                        session.process_id
                    ),
                    ..Default::default()
                }),
            }
        }
        let body = Body::Rollback(RuntimeRollback { patch_id: header.patch_id.clone() });
        outcomes.extend(self.ask_all(&targets, body, "rollback").await);
        let ok = outcomes.iter().all(|o| o.ok);
        let answer =
            Answer { ok, reason: if ok { String::new() } else { failure_summary(&outcomes) }, processes: outcomes };
        tracing::info!(rollout = %header.rollout_id, patch = %short(&header.patch_id), ok = answer.ok, "rollback");
        state.remember(key, answer.clone());
        Ok(answer)
    }

    /// Presumed abort: drops prepared patches whose TTL ran out.
    pub async fn expire_prepared(&self) {
        let mut state = self.state.lock().await;
        let now = SystemTime::now();
        let (expired, kept): (Vec<_>, Vec<_>) = state.prepared.drain(..).partition(|p| p.expires_at <= now);
        state.prepared = kept;
        drop(state);
        for prepared in expired {
            tracing::warn!(rollout = %prepared.rollout_id, patch = %short(&prepared.patch_id), "prepared patch expired without commit or abort; presuming abort");
            let sessions: Vec<Session> = prepared.processes.iter().filter_map(|id| self.sessions.get(id)).collect();
            self.ask_all(&sessions, Body::Abort(RuntimeAbort { patch_id: prepared.patch_id.clone() }), "abort").await;
        }
    }

    pub async fn prepared(&self) -> Vec<PreparedPatch> {
        let state = self.state.lock().await;
        state
            .prepared
            .iter()
            .map(|p| PreparedPatch {
                rollout_id: p.rollout_id.clone(),
                patch_id: p.patch_id.clone(),
                expires_at_ms: p.expires_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            })
            .collect()
    }

    /// What every connected process runs, asked live.
    pub async fn process_statuses(&self) -> Vec<ProcessStatus> {
        let sessions = self.sessions.list();
        join_all(sessions.iter().map(|session| async move {
            let info = session.info();
            let mut status = ProcessStatus {
                process_id: session.process_id.clone(),
                pid: info.hello.pid,
                build: info.hello.build.clone(),
                patch_stack: info.patch_stack.clone(),
                runtime_version: info.hello.runtime_version.clone(),
                python_version: info.hello.python_version.clone(),
                ..Default::default()
            };
            if let Ok(Body::Status(reply)) = session.request(Body::StatusQuery(StatusQuery {}), QUERY_TIMEOUT).await {
                session.set_patch_stack(reply.patch_stack.clone());
                status.patch_stack = reply.patch_stack;
                status.live_digests = reply.live_digests;
            }
            if let Ok(Body::Health(health)) =
                session.request(Body::HealthQuery(HealthQuery { since: 0 }), QUERY_TIMEOUT).await
            {
                status.health = Some(health);
            }
            status
        }))
        .await
    }

    /// Per-process health since the given marks.
    pub async fn health(&self, since: &HashMap<String, u64>) -> Vec<ProcessHealthReport> {
        let sessions = self.sessions.list();
        join_all(sessions.iter().map(|session| async move {
            let mark = since.get(&session.process_id).copied().unwrap_or(0);
            let mut report = ProcessHealthReport {
                process_id: session.process_id.clone(),
                pid: session.pid(),
                ..Default::default()
            };
            match session.request(Body::HealthQuery(HealthQuery { since: mark }), QUERY_TIMEOUT).await {
                Ok(Body::Health(health)) => {
                    report.reachable = true;
                    report.health = Some(health);
                }
                Ok(_) => report.error = "runtime answered a health query with something else".into(),
                Err(err) => report.error = err.to_string(),
            }
            report
        }))
        .await
    }

    /// Sends one command to several runtimes at once and gathers their outcomes.
    async fn ask_all(&self, sessions: &[Session], body: Body, what: &str) -> Vec<ProcessOutcome> {
        join_all(sessions.iter().map(|session| {
            let body = body.clone();
            async move {
                let mut outcome = ProcessOutcome {
                    process_id: session.process_id.clone(),
                    pid: session.pid(),
                    ..Default::default()
                };
                match session.request(body, self.runtime_timeout).await {
                    Ok(
                        Body::PrepareResult(result)
                        | Body::CommitResult(result)
                        | Body::AbortResult(result)
                        | Body::RollbackResult(result),
                    ) => fill_outcome(&mut outcome, session, result, what),
                    Ok(_) => outcome.error = format!("runtime answered {what} with an unexpected message"),
                    Err(err @ SessionError::Disconnected(_)) => {
                        outcome.error = format!("{err} during {what}");
                    }
                    Err(err) => outcome.error = err.to_string(),
                }
                if !outcome.ok {
                    tracing::warn!(process = %outcome.process_id, pid = outcome.pid, error = %outcome.error, "{what} failed");
                }
                outcome
            }
        }))
        .await
    }
}

fn fill_outcome(outcome: &mut ProcessOutcome, session: &Session, result: RuntimeResult, what: &str) {
    outcome.ok = result.ok;
    outcome.error = match (result.ok, result.error.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{what} failed ({})", result.error_kind),
        // The runtime's message names the module, object and line already.
        (false, false) => result.error,
    };
    outcome.pause_ms = result.pause_ms;
    if what == "prepare" {
        outcome.prepare_ms = result.elapsed_ms;
    }
    outcome.detail_json = result.detail_json;
    if what == "commit" || what == "rollback" {
        session.set_patch_stack(result.patch_stack);
    }
}

fn admit(state: &mut State, header: Option<CommandHeader>) -> Result<CommandHeader, ParticipantError> {
    let header = header.ok_or(ParticipantError::MissingHeader)?;
    if header.rollout_id.is_empty() {
        return Err(ParticipantError::MissingRollout);
    }
    if !hotfleet_patch::is_patch_id(&header.patch_id) {
        return Err(ParticipantError::BadPatchId(header.patch_id));
    }
    match state.fence.admit(header.epoch) {
        Ok(()) => state.admitted += 1,
        Err(err @ EpochError::Stale { .. }) => {
            state.refused_stale += 1;
            tracing::warn!(rollout = %header.rollout_id, epoch = header.epoch, highest = state.fence.highest(), "command refused: stale epoch from a deposed coordinator");
            return Err(err.into());
        }
        Err(err) => return Err(err.into()),
    }
    Ok(header)
}

fn refused(err: &FetchError) -> Answer {
    tracing::warn!(error = %err, "patch refused before any runtime saw it");
    Answer { ok: false, reason: err.to_string(), processes: vec![] }
}

/// A one-line summary; each failing process's own error travels in its outcome.
fn failure_summary(outcomes: &[ProcessOutcome]) -> String {
    let failed = outcomes.iter().filter(|o| !o.ok).count();
    format!("{failed} of {} process(es) failed", outcomes.len())
}

/// First 12 hex digits of a patch id, for logs.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Answers a late-starting runtime's `stack_query` from the coordinator's
/// fleet patch stack, every bundle verified like a prepare.
pub struct CoordinatorStacks {
    pub patches: PatchSource,
}

impl StackProvider for CoordinatorStacks {
    fn stack_for(&self, build: String) -> futures::future::BoxFuture<'static, Body> {
        let patches = self.patches.clone();
        Box::pin(async move {
            match patches.stack(&build).await {
                Ok(stack) => Body::StackReply(StackReply {
                    patches: stack
                        .into_iter()
                        .map(|(patch, bundle): (_, Bundle)| StackPatch {
                            patch_id: patch.patch_id,
                            modules: bundle.modules.into_iter().collect(),
                        })
                        .collect(),
                }),
                Err(err) => {
                    tracing::warn!(build = %build, error = %err, "cannot serve a runtime's patch stack");
                    Body::Error(hotfleet_proto::v1::ProtocolError {
                        message: format!("patch stack unavailable: {err}"),
                        code: "unavailable".into(),
                    })
                }
            }
        })
    }
}

/// Shared handle used by the gRPC service and background tasks.
pub type SharedParticipant = Arc<Participant>;

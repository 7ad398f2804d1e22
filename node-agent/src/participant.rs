//! The agent's side of the two-phase commit.
//!
//! Every command takes one path ([`Participant::handle`]), in a task of its
//! own so it outlives a caller that hangs up: learn the epoch if the command
//! names a newer one (an immediate heartbeat, bounded wait) → wait for its
//! turn (one at a time, in arrival order) → admit its epoch ([`EpochFence`]:
//! only the epoch the agent's own coordinator announced) → refuse a Prepare
//! or Commit of a pair already aborted or rolled back ([`Finished`]) →
//! repeat the remembered answer if it ran before → refuse one already
//! committed whose answer is forgotten → run its kind → remember the answer.
//! So a coordinator that retries after a lost reply or a fail-over never
//! applies anything twice, and an old command played again applies nothing.
//! A prepare goes only on top of the stack its manifest names as parent. A prepared patch waits at most its
//! TTL for commit or abort, renewed by every command naming its rollout; then
//! the agent presumes abort, tells every runtime to drop it, reports the
//! change at once and remembers the expiry, so a late commit is told why.
//!
//! The participant sees the runtimes and the patch source through the
//! [`Runtimes`] and [`Patches`] traits, and takes and returns domain values
//! ([`Command`], [`Answer`]): the proto mapping is the gRPC adapter's.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};
use tracing::Instrument;

use futures::future::join_all;

use crate::{
    answers::Answers,
    command::{Answer, Command, Kind, ParticipantError, ProcessOutcome, RolloutKind},
    epoch::{EpochError, EpochFence},
    finished::{Ending, Finished},
    lock,
    patches::Patches,
    prepared::{Expired, Prepared, PreparedTable},
    runtimes::{self, Process, Runtimes, Step, StepReply},
    sessions::SessionError,
    stack_rules::{self, Above},
};

mod admission;
#[cfg(test)]
mod revert_tests;
#[cfg(test)]
mod tests;

pub use admission::EPOCH_LEARN_WAIT;

/// How long a process may take to drop a prepare the agent has no record of
/// (a cleanup after a restart; a live runtime answers at once).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(2);

/// What the participant keeps between commands. Only ever locked for plain
/// reads and updates, never across a runtime call, so status reads and
/// heartbeats never wait for a command in progress.
struct State {
    fence: EpochFence,
    /// Commands admitted / refused for a stale epoch (reported in NodeStatus).
    admitted: u64,
    refused_stale: u64,
    prepared: PreparedTable,
    answers: Answers,
    finished: Finished,
    /// When an unknown epoch last asked for a heartbeat.
    refresh_asked: Option<Instant>,
}

/// The two-phase-commit participant of one node.
pub struct Participant {
    node_id: String,
    runtimes: Arc<dyn Runtimes>,
    patches: Arc<dyn Patches>,
    state: Mutex<State>,
    /// Commands run one at a time; tokio's mutex queues waiters in order.
    turn: tokio::sync::Mutex<()>,
    /// Signalled when something the node reports changed on its own (a
    /// prepare expired), so the next heartbeat need not wait its interval.
    changed: tokio::sync::Notify,
    /// The learned epoch, for commands waiting to see a newer one learned.
    learned: tokio::sync::watch::Sender<u64>,
    epoch_wait: Duration,
    runtime_timeout: Duration,
    default_ttl: Duration,
}

impl Participant {
    pub fn new(
        node_id: String,
        runtimes: Arc<dyn Runtimes>,
        patches: Arc<dyn Patches>,
        fence: EpochFence,
        finished: Finished,
        runtime_timeout: Duration,
        default_ttl: Duration,
    ) -> Self {
        let learned = tokio::sync::watch::Sender::new(fence.highest());
        let state = State {
            fence,
            admitted: 0,
            refused_stale: 0,
            prepared: PreparedTable::default(),
            answers: Answers::default(),
            finished,
            refresh_asked: None,
        };
        Self {
            node_id,
            runtimes,
            patches,
            state: Mutex::new(state),
            turn: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            learned,
            epoch_wait: EPOCH_LEARN_WAIT,
            runtime_timeout,
            default_ttl,
        }
    }

    /// How long a command above the learned epoch waits for it to be learned
    /// (default [`EPOCH_LEARN_WAIT`]).
    pub fn with_epoch_wait(mut self, wait: Duration) -> Self {
        self.epoch_wait = wait;
        self
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn runtimes(&self) -> &Arc<dyn Runtimes> {
        &self.runtimes
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn highest_epoch(&self) -> u64 {
        self.state().fence.highest()
    }

    /// (admitted, refused for a stale epoch) commands since start.
    pub fn command_counts(&self) -> (u64, u64) {
        let state = self.state();
        (state.admitted, state.refused_stale)
    }

    /// The leader announced its epoch over the agent's own link (its
    /// Register/Heartbeat answer): the only way the epoch rises. From now on
    /// older epochs are refused, and this one's commands admitted.
    pub fn observe_epoch(&self, epoch: u64) -> Result<(), EpochError> {
        let mut state = self.state();
        let before = state.fence.highest();
        if state.fence.raise(epoch)? {
            tracing::info!(epoch, previous = before, "new coordinator epoch: older epochs are refused from now on");
            self.learned.send_replace(epoch);
        }
        Ok(())
    }

    /// Patches prepared and waiting for commit or abort.
    pub fn prepared(&self) -> Vec<Prepared> {
        self.state().prepared.waiting().to_vec()
    }

    /// Prepares that expired (presumed abort), newest last.
    pub fn recently_expired(&self) -> Vec<Expired> {
        self.state().prepared.expired().cloned().collect()
    }

    /// Completes once something the node reports changed on its own, or a
    /// command named an epoch the agent has not learned yet (or at once if
    /// either happened since the last call): the heartbeat goes now.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// The coordinator still drives `rollout_id`: its prepares wait another
    /// full TTL (see [`PreparedTable::renew`]).
    pub fn renew(&self, rollout_id: &str) {
        self.state().prepared.renew(rollout_id, SystemTime::now());
    }

    /// Runs one command: turn → admit → replay → run → remember.
    ///
    /// The command runs in a task of its own: a caller that vanishes (its
    /// connection dropped, its leader killed) does not cancel a commit the
    /// runtimes may already have applied, and its outcome is remembered. The
    /// same command re-sent meanwhile waits its turn behind it and then gets
    /// that outcome.
    pub async fn handle(self: &Arc<Self>, cmd: Command) -> Result<Answer, ParticipantError> {
        let (kind, rollout_id) = (cmd.kind, cmd.rollout_id.clone());
        let this = Arc::clone(self);
        // Every line logged for this command names its rollout and node.
        let trace_id = hotfleet_obs::traces::rollout_trace_id(&rollout_id);
        let span =
            tracing::info_span!("command", rollout = %rollout_id, node = %self.node_id, %kind, trace_id = %trace_id);
        let started = std::time::Instant::now();
        let result = tokio::spawn(async move { this.run(cmd).await }.instrument(span)).await.unwrap_or_else(|err| {
            tracing::error!(%kind, rollout = %rollout_id, error = %err, "command task failed");
            Err(ParticipantError::Internal { kind, rollout_id, reason: err.to_string() })
        });
        let outcome = match &result {
            Ok(answer) if answer.ok => "ok",
            Ok(_) => "refused",
            Err(_) => "error",
        };
        crate::telemetry::command_took(&kind.to_string(), outcome, started.elapsed());
        result
    }

    async fn run(&self, cmd: Command) -> Result<Answer, ParticipantError> {
        cmd.validate()?;
        // Before its turn: a wait here holds up no other command.
        self.learn_epoch(cmd.epoch).await;
        let _turn = self.turn.lock().await;
        // A late commit must find its prepare expired, not apply it.
        self.expire_due().await;
        self.admit(&cmd)?;
        self.renew(&cmd.rollout_id);
        let ending = self.refuse_retired(&cmd)?;
        let key = cmd.key();
        if let Some(answer) = self.state().answers.get(&key) {
            return Ok(answer);
        }
        self.refuse_committed(&cmd, ending)?;
        if matches!(cmd.kind, Kind::Abort | Kind::Rollback) {
            self.retire(&cmd);
        }
        let answer = match cmd.kind {
            Kind::Prepare => self.prepare(&cmd).await,
            Kind::Commit => self.commit(&cmd).await,
            Kind::Abort => self.abort(&cmd).await,
            Kind::Rollback => self.rollback(&cmd).await?,
        };
        tracing::info!(rollout = %cmd.rollout_id, patch = %short(&cmd.patch_id), ok = answer.ok, reason = %answer.reason, "{}", cmd.kind);
        self.state().answers.remember(key, answer.clone());
        Ok(answer)
    }

    /// Phase 1: fetch and verify the patch, have every runtime of its target
    /// build prepare it, vote yes only if all did.
    async fn prepare(&self, cmd: &Command) -> Answer {
        let bundle = match self.patches.fetch(&cmd.patch_id).await {
            Ok(bundle) => bundle,
            Err(err) => {
                tracing::warn!(error = %err, "patch refused before any runtime saw it");
                return Answer::refused(err.to_string());
            }
        };
        let build = bundle.manifest.target_build.clone();
        let only = &cmd.process_id;
        let targets: Vec<Process> = self
            .runtimes
            .processes()
            .into_iter()
            .filter(|p| p.build == build && (only.is_empty() || p.process_id == *only))
            .collect();
        if targets.is_empty() && !only.is_empty() {
            return Answer::refused(format!(
                "no process {only:?} on node {} runs target build {build:?}",
                self.node_id
            ));
        }
        if targets.is_empty() {
            return Answer::refused(format!("no process on node {} runs target build {build:?}", self.node_id));
        }
        let kind = cmd.rollout_kind;
        let modules: Vec<String> = bundle.modules.iter().map(|(name, _)| name.clone()).collect();
        let (targets, misfits) =
            self.fitting(kind, &targets, &cmd.patch_id, bundle.manifest.parent.as_deref(), &modules).await;
        if !misfits.is_empty() {
            let why = match kind {
                RolloutKind::Apply => "its manifest's parent is not the top of their patch stack",
                RolloutKind::Rebase => "patches above its parent touch its modules, or the parent is missing",
                RolloutKind::Revert => "patches above it touch its modules",
            };
            let what = if kind == RolloutKind::Revert { "the revert of patch" } else { "patch" };
            let reason = format!(
                "{} process(es) cannot take {what} {}: {why} (nothing was prepared)",
                misfits.len(),
                short(&cmd.patch_id)
            );
            return Answer { ok: false, reason, processes: misfits };
        }
        let step = match kind {
            // The runtime stages the sources beneath the patch itself: no code travels.
            RolloutKind::Revert => Step::Prepare { patch_id: cmd.patch_id.clone(), modules: Vec::new() }.of(kind),
            _ => Step::Prepare { patch_id: cmd.patch_id.clone(), modules: bundle.modules },
        };
        let outcomes = self.ask_all(&targets, step).await;
        let answer = Answer::from_outcomes(outcomes);
        let ttl = if cmd.ttl.is_zero() { self.default_ttl } else { cmd.ttl };
        if answer.ok {
            self.state().prepared.insert(Prepared {
                rollout_id: cmd.rollout_id.clone(),
                patch_id: cmd.patch_id.clone(),
                processes: targets.iter().map(|p| p.process_id.clone()).collect(),
                ttl,
                expires_at: SystemTime::now() + ttl,
                rollout_kind: kind,
            });
        } else {
            // Drop what did prepare right away; the coordinator's abort will find nothing left.
            let prepared: Vec<Process> = targets
                .into_iter()
                .filter(|t| answer.processes.iter().any(|o| o.ok && o.process_id == t.process_id))
                .collect();
            self.ask_all(&prepared, Step::Abort { patch_id: cmd.patch_id.clone() }.of(kind)).await;
        }
        answer
    }

    /// The targets the change goes on, and those it does not fit (each
    /// asked live for its stack: the one known from its last reply may be
    /// older than a sync of its own; one that cannot say is a misfit). A
    /// revert goes only on processes that run the patch (the others have
    /// nothing to do); a deeper revert or a rebase only where the patches
    /// above touch none of `modules` ([`stack_rules`]).
    async fn fitting(
        &self,
        kind: RolloutKind,
        targets: &[Process],
        patch_id: &str,
        parent: Option<&str>,
        modules: &[String],
    ) -> (Vec<Process>, Vec<ProcessOutcome>) {
        let stacks = join_all(targets.iter().map(|p| self.runtimes.status(&p.process_id, self.runtime_timeout))).await;
        let (mut fit, mut misfits) = (Vec::new(), Vec::new());
        for (process, stack) in targets.iter().zip(stacks) {
            let verdict = match stack {
                Ok(live) => self.fits(kind, &live.patch_stack, patch_id, parent, modules).await,
                Err(err) => {
                    Err(format!("cannot read process {}'s patch stack before prepare: {err}", process.process_id))
                }
            };
            match verdict {
                Ok(true) => fit.push(process.clone()),
                Ok(false) => {}
                Err(why) => misfits.push(ProcessOutcome {
                    process_id: process.process_id.clone(),
                    pid: process.pid,
                    error: format!("process {}: {why}", process.process_id),
                    ..Default::default()
                }),
            }
        }
        (fit, misfits)
    }

    /// Whether the change goes on `stack` (`Ok(false)`: nothing to do there), or why not.
    async fn fits(
        &self,
        kind: RolloutKind,
        stack: &[String],
        patch_id: &str,
        parent: Option<&str>,
        modules: &[String],
    ) -> Result<bool, String> {
        let above = match kind {
            RolloutKind::Apply => return runtimes::misfit(stack, patch_id, parent).map_or(Ok(true), Err),
            RolloutKind::Rebase => match stack_rules::above_parent(stack, patch_id, parent)? {
                Some(above) => above,
                None => return Ok(true),
            },
            RolloutKind::Revert => match stack_rules::above_reverted(stack, patch_id) {
                Some(above) => above,
                None => return Ok(false),
            },
        };
        let mut touched = Vec::with_capacity(above.len());
        for id in above {
            let bundle = self
                .patches
                .fetch(id)
                .await
                .map_err(|err| format!("cannot read the modules of patch {}: {err}", short(id)))?;
            touched.push(Above {
                patch_id: id.clone(),
                modules: bundle.modules.into_iter().map(|(name, _)| name).collect(),
            });
        }
        let blocking = stack_rules::in_the_way(modules, &touched);
        if blocking.is_empty() {
            return Ok(true);
        }
        let what = if kind == RolloutKind::Revert { "revert" } else { "rebase" };
        Err(stack_rules::refusal(what, patch_id, &blocking))
    }

    /// Phase 2: every process that prepared applies the patch at its safe point.
    async fn commit(&self, cmd: &Command) -> Answer {
        let taken = self.state().prepared.remove(&cmd.rollout_id, &cmd.patch_id);
        let Some(prepared) = taken else {
            let expired = self.state().prepared.expiry_of(&cmd.rollout_id, &cmd.patch_id).cloned();
            if let Some(e) = expired {
                return Answer::refused(format!(
                    "patch {} expired on node {} for rollout {} {} ago: its prepared TTL of {:?} ran out without commit or abort (presumed abort)",
                    short(&cmd.patch_id),
                    self.node_id,
                    cmd.rollout_id,
                    humantime_secs(e.expired_at),
                    e.ttl
                ));
            }
            return Answer::refused(format!(
                "patch {} is not prepared on node {} for rollout {} (never prepared, aborted, or expired: presumed abort)",
                short(&cmd.patch_id),
                self.node_id,
                cmd.rollout_id
            ));
        };
        let connected = self.runtimes.processes();
        let mut outcomes = Vec::new();
        let mut live = Vec::new();
        for process_id in &prepared.processes {
            match connected.iter().find(|p| p.process_id == *process_id) {
                Some(process) => live.push(process.clone()),
                None => outcomes.push(ProcessOutcome {
                    process_id: process_id.clone(),
                    error: format!("process {process_id} disconnected after prepare"),
                    ..Default::default()
                }),
            }
        }
        let step = Step::Commit { patch_id: cmd.patch_id.clone() }.of(prepared.rollout_kind);
        outcomes.extend(self.ask_all(&live, step).await);
        if let Err(err) = self.state().finished.record(&cmd.rollout_id, &cmd.patch_id, Ending::Committed) {
            // The commit happened: its answer must still reach the coordinator.
            tracing::error!(error = %err, rollout = %cmd.rollout_id, "commit not recorded durably: a replay after a restart would not be recognised");
        }
        // The stack changed: heartbeat now, so the coordinator judges this
        // node's later health from the pushed report instead of polling it.
        self.changed.notify_one();
        Answer::from_outcomes(outcomes)
    }

    /// Drops a prepared patch everywhere on this node (nothing live changes).
    async fn abort(&self, cmd: &Command) -> Answer {
        let dropped = self.state().prepared.remove(&cmd.rollout_id, &cmd.patch_id);
        let connected = self.runtimes.processes();
        let holders: Vec<Process> = match &dropped {
            Some(prepared) => prepared
                .processes
                .iter()
                .filter_map(|id| connected.iter().find(|p| p.process_id == *id).cloned())
                .collect(),
            // No record: this agent may have restarted since the prepare while
            // its processes kept it. A runtime drops what it holds and takes
            // an abort of what it does not hold as done.
            None => self.orphan_holders(cmd, connected),
        };
        let kind = dropped.as_ref().map_or(cmd.rollout_kind, |p| p.rollout_kind);
        // A cleanup is quick for a live runtime (no safe point to wait for):
        // a stuck process must not hold the answer for a runtime timeout.
        let timeout = if dropped.is_some() { self.runtime_timeout } else { CLEANUP_TIMEOUT };
        let step = Step::Abort { patch_id: cmd.patch_id.clone() }.of(kind);
        let outcomes = self.ask_all_within(&holders, step, timeout).await;
        // A process that vanished holds nothing prepared any more: abort is satisfied.
        Answer { ok: true, reason: String::new(), processes: outcomes }
    }

    /// Undoes the patch on every process that runs it on top of its stack.
    ///
    /// Until a process has connected since the agent started, "nobody here
    /// runs it" may only mean "nobody has reconnected yet": that is answered
    /// as unknown (retry), never as a rollback done, and not remembered.
    async fn rollback(&self, cmd: &Command) -> Result<Answer, ParticipantError> {
        if !self.runtimes.any_connected_since_start() {
            tracing::warn!(rollout = %cmd.rollout_id, patch = %short(&cmd.patch_id), "rollback before any game process reconnected: answered unknown");
            return Err(ParticipantError::Unknown(format!(
                "node {}: no game process has connected since the agent started, so whether patch {} runs here is unknown; retry once the processes have reconnected",
                self.node_id,
                short(&cmd.patch_id)
            )));
        }
        // A rollback also cancels a prepare still waiting on this node (its
        // commit never arrived): the processes holding it are told below.
        let holders = self.state().prepared.remove(&cmd.rollout_id, &cmd.patch_id).map(|p| p.processes);
        let holds = |process_id: &str| holders.as_ref().is_some_and(|h| h.iter().any(|id| id == process_id));
        if cmd.rollout_kind == RolloutKind::Revert {
            // Undo the revert wherever it is in force: each runtime knows
            // whether it is (and drops a revert still prepared); the others answer done.
            let targets = self.runtimes.processes();
            let step = Step::Rollback { patch_id: cmd.patch_id.clone() }.of(RolloutKind::Revert);
            return Ok(Answer::from_outcomes(self.ask_all(&targets, step).await));
        }
        let mut outcomes = Vec::new();
        let mut targets = Vec::new();
        // Processes that neither run the patch nor, by the agent's record, hold it.
        let mut others = Vec::new();
        for process in self.runtimes.processes() {
            match process.patch_stack.iter().position(|id| *id == cmd.patch_id) {
                // Not committed here but prepared: the runtime's rollback of a
                // patch it does not run drops its prepared copy and undoes nothing.
                None if holds(&process.process_id) => targets.push(process),
                None => others.push(process),
                Some(pos) if pos + 1 == process.patch_stack.len() => targets.push(process),
                Some(_) => outcomes.push(ProcessOutcome {
                    error: format!(
                        "patch {} is not on top of process {}'s stack (later patches must be rolled back first)",
                        short(&cmd.patch_id),
                        process.process_id
                    ),
                    process_id: process.process_id,
                    pid: process.pid,
                    ..Default::default()
                }),
            }
        }
        outcomes.extend(self.ask_all(&targets, Step::Rollback { patch_id: cmd.patch_id.clone() }).await);
        if holders.is_none() {
            // Best effort: the answers are logged, not part of the rollback's.
            let orphans = self.orphan_holders(cmd, others);
            self.ask_all_within(&orphans, Step::Rollback { patch_id: cmd.patch_id.clone() }, CLEANUP_TIMEOUT).await;
        }
        Ok(Answer::from_outcomes(outcomes))
    }

    /// A prepare the agent has no waiting record of: of `candidates`, the
    /// processes to ask to drop it. None when the agent remembers answering
    /// it (it knows where it went); otherwise the agent never saw it or
    /// restarted since, and its processes may still hold it, except those a
    /// waiting prepare of the patch under another rollout accounts for.
    fn orphan_holders(&self, cmd: &Command, candidates: Vec<Process>) -> Vec<Process> {
        let state = self.state();
        let key = (cmd.rollout_id.clone(), cmd.patch_id.clone(), Kind::Prepare);
        if state.answers.get(&key).is_some() {
            return Vec::new();
        }
        let held: Vec<&String> = state
            .prepared
            .waiting()
            .iter()
            .filter(|p| p.patch_id == cmd.patch_id)
            .flat_map(|p| p.processes.iter())
            .collect();
        candidates.into_iter().filter(|p| !held.contains(&&p.process_id)).collect()
    }

    /// Presumed abort: drops prepared patches whose TTL ran out (between
    /// commands, never during one).
    pub async fn expire_prepared(&self) {
        let _turn = self.turn.lock().await;
        self.expire_due().await;
    }

    async fn expire_due(&self) {
        let expired = self.state().prepared.take_due(SystemTime::now());
        if expired.is_empty() {
            return;
        }
        // Report it now, not an interval later.
        self.changed.notify_one();
        let connected = self.runtimes.processes();
        for prepared in expired {
            tracing::warn!(rollout = %prepared.rollout_id, patch = %short(&prepared.patch_id), ttl = ?prepared.ttl, "prepared patch expired without commit or abort; presuming abort");
            let holders: Vec<Process> =
                connected.iter().filter(|p| prepared.processes.contains(&p.process_id)).cloned().collect();
            self.ask_all(&holders, Step::Abort { patch_id: prepared.patch_id.clone() }.of(prepared.rollout_kind)).await;
        }
    }

    /// Sends one step to several runtimes at once and gathers their outcomes.
    async fn ask_all(&self, processes: &[Process], step: Step) -> Vec<ProcessOutcome> {
        self.ask_all_within(processes, step, self.runtime_timeout).await
    }

    async fn ask_all_within(&self, processes: &[Process], step: Step, timeout: Duration) -> Vec<ProcessOutcome> {
        let what = step.name();
        join_all(processes.iter().map(|process| {
            let step = step.clone();
            async move {
                let mut outcome =
                    ProcessOutcome { process_id: process.process_id.clone(), pid: process.pid, ..Default::default() };
                let span = tracing::info_span!("runtime", process = %process.process_id, step = what);
                let reply = self.runtimes.step(&process.process_id, step, timeout).instrument(span.clone()).await;
                match reply {
                    Ok(reply) => {
                        span.in_scope(|| crate::telemetry::runtime_step(what, &reply));
                        fill_outcome(&mut outcome, reply, what)
                    }
                    Err(err @ SessionError::Disconnected(_)) => outcome.error = format!("{err} during {what}"),
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

fn fill_outcome(outcome: &mut ProcessOutcome, reply: StepReply, what: &str) {
    outcome.ok = reply.ok;
    outcome.error = match (reply.ok, reply.error.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{what} failed ({})", reply.error_kind),
        // The runtime's message names the module, object and line already.
        (false, false) => reply.error,
    };
    outcome.pause_ms = reply.pause_ms;
    if what == "prepare" {
        outcome.prepare_ms = reply.elapsed_ms;
    }
    outcome.detail_json = reply.detail_json;
}

/// Whole seconds since `at`, for messages ("3s").
fn humantime_secs(at: SystemTime) -> String {
    format!("{}s", SystemTime::now().duration_since(at).unwrap_or_default().as_secs())
}

/// First 12 hex digits of a patch id, for logs.
pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Shared handle used by the gRPC service and background tasks.
pub type SharedParticipant = Arc<Participant>;

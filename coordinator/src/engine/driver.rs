//! The driver of one rollout: the reconcile loop (read the persisted state →
//! [`RolloutState::next_action`] → act → record the outcome) and each
//! action's talk with the agents: prepare, baselines, commit, health windows,
//! holds and reverts. Every outcome is recorded through [`Engine::transact`].
//!
//! Shutdown: once the engine's token is cancelled the driver starts nothing
//! new and records no judgement of what it observes (a coordinator stopping
//! stops hearing heartbeats; that is not the fleet's fault), but the outcome
//! of a command already sent is still recorded.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::{stream, FutureExt, StreamExt};
use tracing::Instrument;

use super::{
    lock,
    pushed::{self, Pushed},
    Engine, Handle,
};
use crate::{
    agents::{AgentClient, AgentError, Command, CommandKind, HealthSample, Target},
    clock::now_ms,
    error::{Error, Result},
    rollout::{
        health::{self, Baseline, Check, GateConfig, Verdict},
        Action, NodeResult, Observed, Phase, ProcessMap, RolloutState,
    },
    store::StoreError,
    telemetry,
};

/// Sends `cmd` to `to`; `Err` carries the agent's reason (or why it could not be asked).
///
/// An agent that answers "unavailable" (restarting, or its game processes
/// not reconnected yet: "unknown, retry") is asked again with a growing
/// pause for up to `retry_for`, and never past `deadline`: the runtime
/// reconnects within its own backoff, and a command that gives up sooner
/// turns a passing restart into a failed commit or revert.
async fn send(
    agents: &dyn AgentClient,
    to: &Target,
    cmd: &Command,
    deadline: Duration,
    retry_for: Duration,
) -> Result<(), String> {
    let started = tokio::time::Instant::now();
    let result = send_until(agents, to, cmd, deadline, retry_for, started).await;
    let outcome = match &result {
        Ok(()) => "ok",
        Err(_) => "failed",
    };
    hotfleet_obs::metrics().observe_duration(&telemetry::AGENT_COMMAND, &[cmd.kind.name(), outcome], started.elapsed());
    result
}

async fn send_until(
    agents: &dyn AgentClient,
    to: &Target,
    cmd: &Command,
    deadline: Duration,
    retry_for: Duration,
    started: tokio::time::Instant,
) -> Result<(), String> {
    let budget = retry_for.min(deadline);
    let mut pause = Duration::from_millis(100);
    loop {
        let left = deadline.saturating_sub(started.elapsed()).max(Duration::from_millis(1));
        match agents.send(to, cmd, left).await {
            Ok(o) if o.ok => return Ok(()),
            Ok(o) if o.reason.is_empty() => return Err(format!("{} refused (no reason given)", cmd.kind.name())),
            Ok(o) => return Err(o.reason),
            Err(e @ AgentError::Unreachable { .. }) if started.elapsed() + pause < budget => {
                tracing::debug!(node = %to.node_id, command = cmd.kind.name(), error = %e, ?pause, "agent unavailable; asking again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The driver step an action is timed as (`hotfleet_rollout_step_duration_seconds`).
fn step_name(action: &Action) -> &'static str {
    match action {
        Action::Finished | Action::BeginPrepare => "record",
        Action::Prepare(_) => "prepare",
        Action::BeginStep(_) => "baseline",
        Action::Commit { .. } => "commit",
        Action::Watch { .. } => "watch",
        Action::Hold(_) | Action::StartAt(_) => "hold",
        Action::Revert { .. } => "revert",
    }
}

impl Engine {
    pub(super) async fn drive(&self, id: &str, handle: Arc<Handle>) {
        let mut revert_attempt = 0u32;
        loop {
            if self.inner.cancel.is_cancelled() {
                tracing::info!(rollout = %id, "driver stopping for shutdown; the rollout resumes on restart");
                return;
            }
            let (action, state) = {
                let s = handle.state.lock().await;
                (s.next_action_at(self.frozen(), now_ms()), s.clone())
            };
            if !matches!(action, Action::Revert { .. }) {
                revert_attempt = 0;
            }
            let abort_pending = handle.abort.is_cancelled()
                && !state.rollout.phase.is_terminal()
                && !matches!(state.rollout.phase, Phase::RollingBack { .. });
            if matches!(action, Action::Finished) {
                break;
            }
            let name = if abort_pending { "record" } else { step_name(&action) };
            let started = std::time::Instant::now();
            let wave = match &action {
                Action::BeginStep(i) | Action::Commit { step: i, .. } | Action::Watch { step: i, .. } => {
                    state.rollout.steps.get(*i).map(|s| s.name.as_str())
                }
                _ => None,
            };
            // `wave`: the rollout step acted on (canary, wave-1, ...), where there is one.
            let span = tracing::info_span!("step", step = name, phase = state.rollout.phase.name(), wave = wave);
            let step = async {
                match action {
                    Action::Finished => Ok(()),
                    // An abort was requested but its write did not land: record
                    // it before anything else (no prepare/commit is sent meanwhile).
                    _ if abort_pending => {
                        let (actor, note) =
                            lock(&handle.abort_by).clone().unwrap_or_else(|| ("operator".to_string(), String::new()));
                        self.transact(&handle, Vec::new(), |s| Ok(((), s.abort(&actor, &note, now_ms())?))).await
                    }
                    Action::BeginPrepare => {
                        self.transact(&handle, Vec::new(), |s| Ok(((), s.begin_prepare(now_ms())))).await
                    }
                    Action::Prepare(nodes) => self.prepare(&handle, &state, nodes).await,
                    Action::BeginStep(step) => self.begin_step(&handle, &state, step).await,
                    Action::Commit { step, nodes } => self.commit(&handle, &state, step, nodes).await,
                    Action::Watch { step, ends_at_ms } => self.watch(&handle, step, ends_at_ms).await,
                    Action::Hold(_) => self.hold(&handle, &state).await,
                    Action::StartAt(at_ms) => self.start_at(&handle, at_ms).await,
                    Action::Revert { rollback, abort } => {
                        revert_attempt += 1;
                        self.revert(&handle, &state, rollback, abort, revert_attempt).await
                    }
                }
            }
            .instrument(span)
            .await;
            telemetry::step_took(name, started.elapsed());
            match step {
                Ok(()) => {}
                Err(Error::Store(StoreError::Fenced { ours, current })) => {
                    tracing::error!(rollout = %id, ours, current, "fenced by a newer coordinator; this one stops driving");
                    return;
                }
                Err(Error::Store(StoreError::NotLeading { epoch, reason })) => {
                    tracing::warn!(rollout = %id, epoch, %reason, "no longer leading; this driver stops (the leader resumes the rollout)");
                    return;
                }
                Err(Error::Store(err)) => {
                    // The store is unreachable: hold still. Nothing is re-sent
                    // until the store answers again, so no command goes out
                    // whose outcome could not be recorded.
                    tracing::warn!(rollout = %id, error = %err, "state store unavailable; holding still until it answers");
                    if !self.wait_for_store().await {
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(rollout = %id, error = %err, "rollout step failed; retrying");
                    tokio::select! {
                        _ = self.inner.cancel.cancelled() => return,
                        _ = tokio::time::sleep(self.inner.config.store_retry) => {}
                    }
                }
            }
        }
        let outcome = handle.snapshot.borrow().rollout.phase.name();
        tracing::info!(rollout = %id, outcome, "rollout finished");
        hotfleet_obs::metrics().inc(&telemetry::ROLLOUTS, &[outcome]);
        lock(&self.inner.rollouts).remove(id);
    }

    /// Shutdown began: act on nothing observed from now on.
    fn stopping(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Waits until a store read succeeds; `false` if shut down meanwhile.
    async fn wait_for_store(&self) -> bool {
        let mut logged = false;
        loop {
            tokio::select! {
                _ = self.inner.cancel.cancelled() => return false,
                _ = tokio::time::sleep(self.inner.config.store_retry) => {}
            }
            match self.inner.store.freeze().await {
                Ok(_) => {
                    if logged {
                        tracing::info!("state store answers again; resuming");
                    }
                    return true;
                }
                Err(err) if !logged => {
                    tracing::warn!(error = %err, "state store still unavailable");
                    logged = true;
                }
                Err(_) => {}
            }
        }
    }

    fn command(&self, state: &RolloutState, kind: CommandKind) -> Command {
        Command {
            kind,
            rollout_id: state.rollout.id.clone(),
            patch_id: state.rollout.patch_id.clone(),
            epoch: self.inner.fence.epoch,
            process_id: String::new(),
            rollout_kind: state.rollout.spec.kind,
        }
    }

    fn target(&self, node_id: &str) -> Result<Target, String> {
        match self.inner.registry.get(node_id) {
            Some(view) => Ok(Target { node_id: node_id.to_string(), addr: view.status.advertise_addr }),
            None => Err(format!("node {node_id} is not registered")),
        }
    }

    fn step_deadline(state: &RolloutState) -> Duration {
        Duration::from_millis(state.rollout.spec.step_deadline_ms.max(1))
    }

    /// Sends one command per node concurrently, each under the step deadline
    /// (counted from the fan-out's start, queue included); no more calls are
    /// started at once than the agent client runs (see [`AgentClient::width`]).
    /// With `abortable`, nothing is sent once the abort token is cancelled and
    /// calls in flight are dropped (their nodes are reverted anyway, since
    /// desired was recorded first). Returns `None` if aborted.
    async fn fan_out<F, Fut>(
        &self,
        handle: &Handle,
        nodes: &[String],
        deadline: Duration,
        abortable: bool,
        call: F,
    ) -> Option<Vec<NodeResult>>
    where
        F: Fn(Target) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let step_end = tokio::time::Instant::now() + deadline;
        let all = bounded(nodes.iter(), self.inner.agents.width(nodes.len()), |node| {
            let target = self.target(node);
            let fut = async {
                let target = target?;
                if abortable && handle.abort.is_cancelled() {
                    return Err("aborted before send".to_string());
                }
                match tokio::time::timeout_at(step_end, call(target)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within the step deadline ({} ms)", deadline.as_millis())),
                }
            };
            let span = tracing::info_span!("node", node = %node);
            async move { (node.clone(), fut.await) }.instrument(span)
        });
        if abortable {
            tokio::select! {
                biased;
                _ = handle.abort.cancelled() => None,
                results = all => Some(results),
            }
        } else {
            Some(all.await)
        }
    }

    async fn prepare(&self, handle: &Handle, state: &RolloutState, nodes: Vec<String>) -> Result<()> {
        let ttl_seconds = state.rollout.spec.prepare_ttl_seconds;
        let cmd = self.command(state, CommandKind::Prepare { ttl_seconds });
        let deadline = Self::step_deadline(state);
        let agents = self.inner.agents.clone();
        let retry_for = self.inner.config.unavailable_retry_for;
        let results = self
            .fan_out(handle, &nodes, deadline, true, |t| {
                let (agents, cmd) = (agents.clone(), cmd.clone());
                async move { send(agents.as_ref(), &t, &cmd, deadline, retry_for).await }
            })
            .await;
        let Some(results) = results else { return Ok(()) };
        self.transact(handle, Vec::new(), |s| Ok(((), s.record_prepare(results, now_ms())))).await
    }

    /// Takes the pre-commit baseline of every process of the step's nodes,
    /// then records Committing (desired = committed, baselines) before any
    /// commit is sent.
    async fn begin_step(&self, handle: &Handle, state: &RolloutState, step: usize) -> Result<()> {
        let nodes: Vec<String> = state
            .rollout
            .steps
            .get(step)
            .map(|s| {
                s.nodes
                    .iter()
                    .filter(|n| state.nodes.get(*n).is_some_and(|ns| ns.observed == Observed::Prepared))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let samples = self.sample(state, &nodes, false).await;
        if self.stopping() {
            return Ok(());
        }
        let mut baselines = BTreeMap::new();
        let mut failures = Vec::new();
        for (node, result) in samples {
            match result {
                Ok(list) => {
                    let mut per_process = ProcessMap::new();
                    for h in list {
                        if !h.sample.reachable {
                            failures.push((
                                node.clone(),
                                format!(
                                    "process {} unreachable before commit: {}",
                                    h.sample.process_id, h.sample.error
                                ),
                            ));
                            continue;
                        }
                        per_process.insert(
                            h.sample.process_id.clone(),
                            Baseline {
                                pid: h.sample.pid,
                                mark: h.mark,
                                tick_p99_ms: h.sample.tick_p99_ms,
                                game_ok: h.sample.game_ok,
                                // Asked with no marks: counted from the process's start.
                                exceptions_total: h.sample.exceptions_since,
                                ticks_total: Some(h.sample.ticks_since),
                            },
                        );
                    }
                    baselines.insert(node, per_process);
                }
                Err(err) => failures.push((node, err)),
            }
        }
        if !failures.is_empty() {
            let faulty: Vec<String> = failures.iter().map(|(n, _)| n.clone()).collect();
            let detail: Vec<String> = failures.iter().map(|(n, e)| format!("{n}: {e}")).collect();
            let reason = format!("could not take a health baseline before commit: {}", detail.join("; "));
            return self.transact(handle, Vec::new(), |s| Ok(((), s.fail(reason, faulty, now_ms())))).await;
        }
        self.transact(handle, Vec::new(), |s| Ok(((), s.begin_step(step, baselines, now_ms())))).await
    }

    async fn commit(&self, handle: &Handle, state: &RolloutState, step: usize, nodes: Vec<String>) -> Result<()> {
        let cmd = self.command(state, CommandKind::Commit);
        let deadline = Self::step_deadline(state);
        let agents = self.inner.agents.clone();
        let retry_for = self.inner.config.unavailable_retry_for;
        let results = self
            .fan_out(handle, &nodes, deadline, true, |t| {
                let (agents, cmd) = (agents.clone(), cmd.clone());
                async move {
                    send(agents.as_ref(), &t, &cmd, deadline, retry_for)
                        .await
                        .map_err(|e| format!("commit failed: {e}"))
                }
            })
            .await;
        let Some(results) = results else { return Ok(()) };
        // Window start: where each watched process's tick count stands now,
        // so the final check can tell "ticked during the window" apart.
        // Earlier steps' nodes judged from pushed reports need no start; a
        // committed node whose agent already pushed a report with the patch
        // takes it from there (the agent heartbeats as soon as its stack
        // changes); the rest are polled.
        let mut watch: BTreeSet<String> = state
            .watched_nodes()
            .into_iter()
            .filter(|n| self.pushed_samples(state, n, Some(step), Check::Interim).is_none())
            .collect();
        watch.extend(results.iter().filter(|(_, r)| r.is_ok()).map(|(n, _)| n.clone()));
        let mut window_start = BTreeMap::new();
        let mut poll = Vec::new();
        for node in watch {
            let from_report = state.nodes.get(&node).filter(|ns| ns.step == step).and_then(|ns| {
                let samples = self.pushed_samples(state, &node, Some(step), Check::Interim)?;
                pushed::window_start(&samples, &ns.baselines)
            });
            match from_report {
                Some(ticks) => {
                    window_start.insert(node, ticks);
                }
                None => poll.push(node),
            }
        }
        for (node, result) in self.sample(state, &poll, true).await {
            if let Ok(list) = result {
                window_start
                    .insert(node, list.into_iter().map(|h| (h.sample.process_id, h.sample.ticks_since)).collect());
            }
        }
        self.transact(handle, Vec::new(), |s| Ok(((), s.record_commit(step, results, window_start, now_ms())))).await
    }

    /// Health of `nodes`, counted from each node's baseline marks (or from
    /// now, with `from_baseline` false), under the health poll deadline.
    async fn sample(
        &self,
        state: &RolloutState,
        nodes: &[String],
        from_baseline: bool,
    ) -> Vec<(String, Result<Vec<HealthSample>, String>)> {
        let deadline = Self::step_deadline(state).min(Duration::from_secs(10));
        // One deadline for the whole poll, as when every call started at once.
        let poll_end = tokio::time::Instant::now() + deadline;
        bounded(nodes.iter(), self.inner.agents.width(nodes.len()), |node| {
            let since: BTreeMap<String, u64> = if from_baseline {
                state
                    .nodes
                    .get(node)
                    .map(|n| n.baselines.iter().map(|(p, b)| (p.clone(), b.mark)).collect())
                    .unwrap_or_default()
            } else {
                BTreeMap::new()
            };
            let target = self.target(node);
            let agents = self.inner.agents.clone();
            let span = tracing::info_span!("node", node = %node);
            async move {
                let result = match target {
                    Ok(t) => match tokio::time::timeout_at(poll_end, agents.health(&t, &since, deadline)).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("health query timed out after {} ms", deadline.as_millis())),
                    },
                    Err(e) => Err(e),
                };
                (node.clone(), result)
            }
            .instrument(span)
        })
        .await
    }

    /// Samples for `node` from its agent's last pushed report, when that can
    /// stand in for a poll (see [`pushed`]): for a node committed in an
    /// earlier step than `current` (the step being committed or watched; none
    /// while held between steps), and for one of `current` itself until its
    /// window's final check, which polls (it counts the ticks since the
    /// window's start, and a report may be up to a heartbeat old).
    fn pushed_samples(
        &self,
        state: &RolloutState,
        node: &str,
        current: Option<usize>,
        check: Check,
    ) -> Option<Vec<health::Sample>> {
        let ns = state.nodes.get(node)?;
        if current.is_some_and(|step| ns.step > step || (ns.step == step && check == Check::Final)) {
            return None;
        }
        // Two heartbeats missed: a report that old is no news.
        let fresh_ms = 2 * self.inner.registry.heartbeat_interval().as_millis() as u64 + 1_000;
        self.reported(state, node, fresh_ms)
    }

    /// Samples from `node`'s last pushed report if it was heard within
    /// `fresh_ms` and shows this rollout's patch ([`pushed::samples`]).
    fn reported(&self, state: &RolloutState, node: &str, fresh_ms: u64) -> Option<Vec<health::Sample>> {
        let ns = state.nodes.get(node)?;
        let now = now_ms();
        self.inner
            .registry
            .with_status(node, |status, heard_at_ms| {
                let report = Pushed { status, heard_at_ms };
                pushed::samples(report, &ns.baselines, &state.rollout.patch_id, state.rollout.spec.kind, now, fresh_ms)
            })
            .flatten()
    }

    /// The final check of a node of the step being watched, from its agent's
    /// pushed report instead of a poll: only from a report heard within the
    /// window's last quarter and last heartbeat (plus a second), so it saw
    /// nearly all of the window, and that shows every process ticked since
    /// the window's start ([`pushed::final_samples`]). Anything else is
    /// polled: "no tick in the window" (a stuck loop, or a report from too
    /// early) is always the agent's answer, never a report's. So a window of
    /// minutes costs no final poll, and one shorter than a heartbeat still
    /// polls.
    fn final_from_report(&self, state: &RolloutState, node: &str, step: usize) -> Option<Vec<health::Sample>> {
        let ns = state.nodes.get(node).filter(|ns| ns.step == step)?;
        let last_heartbeat_ms = self.inner.registry.heartbeat_interval().as_millis() as u64 + 1_000;
        let recent_ms = last_heartbeat_ms.min(state.rollout.spec.health_window_ms / 4);
        let samples = self.reported(state, node, recent_ms)?;
        pushed::final_samples(samples, &ns.baselines, &ns.window_start)
    }

    /// One health check of every watched node; records verdicts (which may
    /// roll the rollout back). Nodes of earlier steps are judged from their
    /// pushed reports when fresh ones are there (hard failures only: their
    /// own window has passed), and so are the step's own nodes between the
    /// first report after their commit and their window's final check (a
    /// window of minutes polled every second was most of a rollout's calls);
    /// the rest are polled.
    async fn check_health(&self, handle: &Handle, check: Check) -> Result<()> {
        let expired = self.expired_prepares(&handle.state.lock().await.clone());
        if !expired.is_empty() {
            self.transact(handle, Vec::new(), |s| Ok(((), s.record_expired(expired, now_ms())))).await?;
        }
        let state = handle.state.lock().await.clone();
        if matches!(state.rollout.phase, Phase::RollingBack { .. }) {
            return Ok(());
        }
        let watched = state.watched_nodes();
        if watched.is_empty() {
            return Ok(());
        }
        let gate: GateConfig = state.rollout.spec.gate;
        let mut verdicts = Vec::new();
        let mut lost = Vec::new();
        let current = match state.rollout.phase {
            Phase::Watching { step, .. } | Phase::Committing { step } => Some(step),
            _ => None,
        };
        // A pushed report changes once per heartbeat: while a window runs,
        // earlier steps' nodes are judged at its end (or while held), not
        // at every poll of the step's own nodes.
        let judge_pushed = check == Check::Final || current.is_none();
        let mut polled = Vec::new();
        for node in watched {
            if self.inner.registry.is_lost(&node) {
                lost.push(node);
                continue;
            }
            // A report that stands for the final check is judged as one; any
            // other usable report, as an interim check.
            let report = match (check, current) {
                (Check::Final, Some(step)) => self.final_from_report(&state, &node, step).map(|s| (s, Check::Final)),
                _ => None,
            }
            .or_else(|| self.pushed_samples(&state, &node, current, check).map(|s| (s, Check::Interim)));
            match (report, state.nodes.get(&node)) {
                (Some((_, Check::Interim)), Some(ns))
                    if !judge_pushed && current.is_some_and(|step| ns.step < step) => {}
                (Some((samples, as_check)), Some(ns)) => {
                    let verdict = health::evaluate(&gate, &ns.baselines, &ns.window_start, &samples, as_check);
                    verdicts.push((node, verdict));
                }
                _ => polled.push(node),
            }
        }
        let samples = self.sample(&state, &polled, true).await;
        if self.stopping() {
            // Whatever was observed may be the shutdown itself.
            return Ok(());
        }
        for (node, result) in samples {
            if self.inner.registry.is_lost(&node) {
                lost.push(node);
                continue;
            }
            let Some(ns) = state.nodes.get(&node) else { continue };
            match result {
                Ok(list) => {
                    let samples: Vec<_> = list.into_iter().map(|h| h.sample).collect();
                    verdicts.push((node, health::evaluate(&gate, &ns.baselines, &ns.window_start, &samples, check)));
                }
                // Honest gate: at the end of a window, no answer is a failure.
                Err(err) if check == Check::Final => {
                    verdicts.push((node, Verdict { problems: vec![format!("no health data: {err}")] }));
                }
                Err(err) => tracing::debug!(%node, error = %err, "health poll failed; judged at the window's end"),
            }
        }
        self.transact(handle, Vec::new(), |s| Ok(((), s.record_health(verdicts, lost, now_ms())))).await
    }

    /// Nodes holding this rollout's patch prepared whose agent reported that
    /// prepare expired (from the registry's latest heartbeat: no agent call).
    fn expired_prepares(&self, state: &RolloutState) -> Vec<(String, String)> {
        let ttl = match state.rollout.spec.prepare_ttl_seconds {
            0 => "the agent's default TTL".to_string(),
            s => format!("its TTL of {s}s"),
        };
        state
            .nodes
            .values()
            .filter(|n| n.observed == Observed::Prepared)
            .filter(|n| {
                // Read in place: thousands of nodes wait prepared in a big rollout.
                self.inner.registry.with_status(&n.node_id, |status, _| {
                    status.expired.iter().any(|e| e.rollout_id == state.rollout.id && e.patch_id == state.rollout.patch_id)
                }) == Some(true)
            })
            .map(|n| {
                let detail = format!(
                    "prepare expired on the agent: no word from the leader for {ttl} (presumed abort; the patch was dropped there)"
                );
                (n.node_id.clone(), detail)
            })
            .collect()
    }

    fn poll_interval(&self, window_ms: u64) -> Duration {
        Duration::from_millis(window_ms / 4).clamp(Duration::from_millis(50), self.inner.config.max_poll_interval)
    }

    async fn watch(&self, handle: &Handle, step: usize, ends_at_ms: u64) -> Result<()> {
        let window_ms = handle.state.lock().await.rollout.spec.health_window_ms;
        let poll = self.poll_interval(window_ms);
        loop {
            let now = now_ms();
            if now >= ends_at_ms {
                self.check_health(handle, Check::Final).await?;
                if self.stopping() {
                    // Not judged here: the next leader makes the final check.
                    return Ok(());
                }
                return self
                    .transact(handle, Vec::new(), |s| {
                        Ok(((), {
                            s.window_passed(step, now_ms());
                            Vec::new()
                        }))
                    })
                    .await;
            }
            let wait = Duration::from_millis(ends_at_ms - now).min(poll);
            tokio::select! {
                _ = handle.abort.cancelled() => return Ok(()),
                _ = self.inner.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            if now_ms() < ends_at_ms {
                self.check_health(handle, Check::Interim).await?;
                if !matches!(handle.state.lock().await.rollout.phase, Phase::Watching { .. }) {
                    return Ok(());
                }
            }
        }
    }

    /// Held at a gate, a pause or a freeze: wait for a change, and keep an
    /// eye on nodes already committed (a canary can go bad while we wait).
    /// A scheduled rollout: sleeps until its start time (an abort, a freeze
    /// or shutdown wakes it earlier), then records Staged. The time is kept
    /// in the store, so a restarted or new leader waits for the same instant.
    async fn start_at(&self, handle: &Handle, at_ms: u64) -> Result<()> {
        let wait = Duration::from_millis(at_ms.saturating_sub(now_ms()));
        if !wait.is_zero() {
            tokio::select! {
                _ = handle.wake.notified() => return Ok(()),
                _ = handle.abort.cancelled() => return Ok(()),
                _ = self.inner.cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Re-read under the lock: a freeze that came meanwhile holds it.
        if self.frozen() {
            return Ok(());
        }
        self.transact(handle, Vec::new(), |s| Ok(((), s.begin_scheduled(now_ms())))).await
    }

    async fn hold(&self, handle: &Handle, state: &RolloutState) -> Result<()> {
        let poll = self.poll_interval(state.rollout.spec.health_window_ms);
        tokio::select! {
            _ = handle.wake.notified() => return Ok(()),
            _ = handle.abort.cancelled() => return Ok(()),
            _ = self.inner.cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(poll) => {}
        }
        self.check_health(handle, Check::Interim).await
    }

    async fn revert(
        &self,
        handle: &Handle,
        state: &RolloutState,
        rollback: Vec<String>,
        abort: Vec<String>,
        attempt: u32,
    ) -> Result<()> {
        let rollback_cmd = self.command(state, CommandKind::Rollback);
        let abort_cmd = self.command(state, CommandKind::Abort);
        let deadline = Self::step_deadline(state);
        let agents = self.inner.agents.clone();
        // The first attempt waits out an agent that is restarting; later
        // ones are quick, so a node that is gone for good costs the budget once.
        let retry_for = if attempt <= 1 { self.inner.config.unavailable_retry_for } else { Duration::ZERO };
        // One command per node: an agent's rollback also drops the patch
        // where it is only prepared (a node whose commit never landed).
        let rollback_results = self.fan_out(handle, &rollback, deadline, false, |t| {
            let (agents, rollback_cmd) = (agents.clone(), rollback_cmd.clone());
            async move {
                send(agents.as_ref(), &t, &rollback_cmd, deadline, retry_for)
                    .await
                    .map_err(|e| format!("rollback failed: {e}"))
            }
        });
        let abort_results = self.fan_out(handle, &abort, deadline, false, |t| {
            let (agents, abort_cmd) = (agents.clone(), abort_cmd.clone());
            async move {
                send(agents.as_ref(), &t, &abort_cmd, deadline, retry_for)
                    .await
                    .map_err(|e| format!("abort failed: {e}"))
            }
        });
        let (a, b) = tokio::join!(rollback_results, abort_results);
        let mut results = a.unwrap_or_default();
        results.extend(b.unwrap_or_default());
        // A shutdown is no reason to give up on a node: the next leader retries.
        let last = attempt >= self.inner.config.revert_attempts && !self.stopping();
        self.transact(handle, Vec::new(), |s| Ok(((), s.record_revert(results, last, now_ms())))).await?;
        if !handle.state.lock().await.rollout.phase.is_terminal() {
            let backoff = Duration::from_millis(250 * u64::from(attempt));
            tokio::select! {
                _ = self.inner.cancel.cancelled() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        Ok(())
    }
}

/// Starts `start(input)` for each of `inputs`, at most `width` at once;
/// answers in input order. A call is built only when a slot frees: an
/// unstarted future is as large as its largest await (~2 KB here), so
/// building one per node up front cost ~20 MB at 10,000 nodes. Unordered
/// underneath: ordered buffering counts calls that finished behind a slow
/// one as still running, so one slow node would hold back the rest.
async fn bounded<I, Fut>(inputs: I, width: usize, mut start: impl FnMut(I::Item) -> Fut) -> Vec<Fut::Output>
where
    I: IntoIterator,
    Fut: std::future::Future,
{
    let numbered = inputs.into_iter().enumerate().map(|(i, input)| start(input).map(move |answer| (i, answer)));
    let mut done: Vec<(usize, Fut::Output)> = stream::iter(numbered).buffer_unordered(width.max(1)).collect().await;
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, answer)| answer).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::bounded;

    #[tokio::test]
    async fn a_fan_out_builds_no_more_calls_than_it_runs_at_once() {
        // Each built call is as large as its largest await: built up front,
        // 10,000 of them were ~20 MB held for the whole fan-out.
        let built = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let answers = bounded(0..100, 4, |i| {
            let now = built.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let built = built.clone();
            async move {
                // Later calls finish first: answers still come in input order.
                tokio::time::sleep(std::time::Duration::from_millis(((100 - i) % 7) as u64)).await;
                built.fetch_sub(1, Ordering::SeqCst);
                i * 2
            }
        })
        .await;
        assert_eq!(answers, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(most.load(Ordering::SeqCst), 4, "never more calls built than running");
    }
}

//! The rollout engine: drives every active rollout through the state machine
//! of [`crate::rollout`], talking to agents through [`AgentClient`].
//!
//! One task per active rollout runs a reconcile loop: read the persisted
//! state → [`RolloutState::next_action`] → act → record the outcome. Every
//! transition is written to the store *before* the commands it implies are
//! sent (desired first, observed after), one batch per step, so a coordinator
//! killed anywhere resumes from the store (see [`Engine::resume`]).
//!
//! Operator commands (abort, pause, resume, promote, freeze) go through the
//! same per-rollout lock and the same store writes. Abort wins: it cancels
//! the rollout's abort token first, which drops in-flight prepare/commit
//! calls and stops any new one from being sent, then records RollingBack;
//! rollback skips every remaining window and gate.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};

use futures::future::join_all;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentClient, Command, CommandKind, HealthSample, Target},
    clock::now_ms,
    error::{Error, Result},
    patches::audit,
    planner,
    registry::Registry,
    rollout::{
        health::{self, Baseline, Check, GateConfig, Verdict},
        Action, Changed, NodeResult, OperatorAction, ParseSpec, Phase, RolloutState,
    },
    store::{AuditEntry, Batch, Fence, FreezeRecord, StackEntry, Store, StoreError, Write},
};

/// Tunables of the driver (not of a rollout: those are in the spec).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Longest pause between health polls inside a window.
    pub max_poll_interval: Duration,
    /// Attempts to revert a node before giving up on it.
    pub revert_attempts: u32,
    /// Back-off after a failed store write before retrying.
    pub store_retry: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_poll_interval: Duration::from_secs(1), revert_attempts: 3, store_retry: Duration::from_millis(500) }
    }
}

/// One active rollout: its state behind a lock, the latest persisted
/// snapshot for readers, and the signals the driver waits on.
struct Handle {
    state: tokio::sync::Mutex<RolloutState>,
    snapshot: watch::Sender<RolloutState>,
    /// Cancelled when an abort is accepted: prepare/commit stop at once.
    abort: CancellationToken,
    /// Who asked for the abort and why, set before `abort` is cancelled (the
    /// driver records the abort itself if the operator's write failed).
    abort_by: Mutex<Option<(String, String)>>,
    /// Pause/resume/promote/freeze changed something the driver waits on.
    wake: Notify,
}

struct Inner {
    store: Arc<dyn Store>,
    fence: Fence,
    registry: Registry,
    agents: Arc<dyn AgentClient>,
    config: EngineConfig,
    rollouts: Mutex<HashMap<String, Arc<Handle>>>,
    freeze: RwLock<Option<FreezeRecord>>,
    /// Serialises rollout starts so the blast-radius check cannot race.
    start_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    cancel: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single insert/remove/clone: a panic in one
    // cannot leave the data half-updated, so a poisoned lock stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends `cmd` to `to`; `Err` carries the agent's reason (or why it could not be asked).
async fn send(agents: &dyn AgentClient, to: &Target, cmd: &Command, deadline: Duration) -> Result<(), String> {
    match agents.send(to, cmd, deadline).await {
        Ok(o) if o.ok => Ok(()),
        Ok(o) if o.reason.is_empty() => Err(format!("{} refused (no reason given)", cmd.kind.name())),
        Ok(o) => Err(o.reason),
        Err(e) => Err(e.to_string()),
    }
}

impl Engine {
    pub fn new(
        store: Arc<dyn Store>,
        fence: Fence,
        registry: Registry,
        agents: Arc<dyn AgentClient>,
        config: EngineConfig,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                fence,
                registry,
                agents,
                config,
                rollouts: Mutex::new(HashMap::new()),
                freeze: RwLock::new(None),
                start_lock: tokio::sync::Mutex::new(()),
                next_id: AtomicU64::new(1),
                cancel,
                tasks: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Loads the freeze flag and restarts a driver for every unfinished
    /// rollout in the store. Returns how many were resumed.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let freeze = self.inner.store.freeze().await?;
        *self.inner.freeze.write().unwrap_or_else(|e| e.into_inner()) = freeze;
        let mut resumed = 0;
        for rollout in self.inner.store.rollouts().await? {
            if rollout.phase.is_terminal() {
                continue;
            }
            let nodes = self.inner.store.rollout_nodes(&rollout.id).await?;
            tracing::info!(rollout = %rollout.id, phase = rollout.phase.name(), "resuming rollout from the store");
            self.spawn(RolloutState { rollout, nodes });
            resumed += 1;
        }
        Ok(resumed)
    }

    fn spawn(&self, state: RolloutState) -> Arc<Handle> {
        let id = state.rollout.id.clone();
        let (snapshot, _) = watch::channel(state.clone());
        let handle = Arc::new(Handle {
            state: tokio::sync::Mutex::new(state),
            snapshot,
            abort: CancellationToken::new(),
            abort_by: Mutex::new(None),
            wake: Notify::new(),
        });
        lock(&self.inner.rollouts).insert(id.clone(), handle.clone());
        let engine = self.clone();
        let driver_handle = handle.clone();
        let task = tokio::spawn(async move {
            engine.drive(&id, driver_handle).await;
        });
        let mut tasks = lock(&self.inner.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        handle
    }

    /// Waits for every driver to stop (after the shutdown token is cancelled).
    pub async fn join(&self) {
        let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut *lock(&self.inner.tasks));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Stops every driver now (crash simulation in tests).
    pub fn abort_all(&self) {
        for task in lock(&self.inner.tasks).iter() {
            task.abort();
        }
    }

    pub fn epoch(&self) -> u64 {
        self.inner.fence.epoch
    }

    fn frozen(&self) -> bool {
        self.inner.freeze.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    pub fn freeze_status(&self) -> Option<FreezeRecord> {
        self.inner.freeze.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn handle(&self, id: &str) -> Option<Arc<Handle>> {
        lock(&self.inner.rollouts).get(id).cloned()
    }

    fn handles(&self) -> Vec<Arc<Handle>> {
        lock(&self.inner.rollouts).values().cloned().collect()
    }

    /// Applies `f` to a copy of the rollout's state and, if anything changed,
    /// persists the rollout record, the changed nodes and `extra` in one
    /// batch; only then does the in-memory state move. A refused write leaves
    /// memory as the store has it.
    async fn transact<R>(
        &self,
        handle: &Handle,
        extra: Vec<Write>,
        f: impl FnOnce(&mut RolloutState) -> std::result::Result<(R, Changed), Error>,
    ) -> Result<R> {
        let mut guard = handle.state.lock().await;
        let mut next = guard.clone();
        let (value, changed) = f(&mut next)?;
        if next == *guard && extra.is_empty() {
            return Ok(value);
        }
        next.rollout.generation += 1;
        next.rollout.epoch = self.inner.fence.epoch;
        let nodes = changed.iter().filter_map(|id| next.nodes.get(id).cloned()).collect();
        let mut batch = Batch::rollout(&next.rollout, nodes);
        for write in extra {
            batch.push(write);
        }
        if next.rollout.phase == Phase::Completed && guard.rollout.phase != Phase::Completed {
            // The patch joins the fleet's stack in the same transaction that
            // completes the rollout: late-starting processes never miss it.
            let patch = self.inner.store.patch(&next.rollout.patch_id).await?;
            batch.push(Write::PushStack(StackEntry {
                patch_id: next.rollout.patch_id.clone(),
                target_build: next.rollout.target_build.clone(),
                parent_patch_id: patch.as_ref().map(|p| p.parent_patch_id.clone()).unwrap_or_default(),
                description: patch.map(|p| p.description).unwrap_or_default(),
                rollout_id: next.rollout.id.clone(),
                committed_at_ms: now_ms(),
            }));
        }
        self.inner.store.write(self.inner.fence, batch).await?;
        if next.rollout.phase != guard.rollout.phase {
            tracing::info!(rollout = %next.rollout.id, from = guard.rollout.phase.name(), to = next.rollout.phase.name(), generation = next.rollout.generation, "rollout transition");
        }
        *guard = next;
        handle.snapshot.send_replace(guard.clone());
        Ok(value)
    }

    // ---- the driver ---------------------------------------------------------

    async fn drive(&self, id: &str, handle: Arc<Handle>) {
        let mut revert_attempt = 0u32;
        loop {
            if self.inner.cancel.is_cancelled() {
                tracing::info!(rollout = %id, "driver stopping for shutdown; the rollout resumes on restart");
                return;
            }
            let (action, state) = {
                let s = handle.state.lock().await;
                (s.next_action(self.frozen()), s.clone())
            };
            if !matches!(action, Action::Revert { .. }) {
                revert_attempt = 0;
            }
            let abort_pending = handle.abort.is_cancelled()
                && !state.rollout.phase.is_terminal()
                && !matches!(state.rollout.phase, Phase::RollingBack { .. });
            let step = match action {
                Action::Finished => break,
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
                Action::Revert { rollback, abort } => {
                    revert_attempt += 1;
                    self.revert(&handle, &state, rollback, abort, revert_attempt).await
                }
            };
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
        tracing::info!(rollout = %id, outcome = handle.snapshot.borrow().rollout.phase.name(), "rollout finished");
        lock(&self.inner.rollouts).remove(id);
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

    /// Sends one command per node concurrently, each under the step deadline.
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
        let calls = nodes.iter().map(|node| {
            let target = self.target(node);
            let fut = async {
                let target = target?;
                if abortable && handle.abort.is_cancelled() {
                    return Err("aborted before send".to_string());
                }
                match tokio::time::timeout(deadline, call(target)).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within the step deadline ({} ms)", deadline.as_millis())),
                }
            };
            async move { (node.clone(), fut.await) }
        });
        let all = join_all(calls);
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
        let results = self
            .fan_out(handle, &nodes, deadline, true, |t| {
                let (agents, cmd) = (agents.clone(), cmd.clone());
                async move { send(agents.as_ref(), &t, &cmd, deadline).await }
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
                    .filter(|n| state.nodes.get(*n).is_some_and(|ns| ns.observed == crate::rollout::Observed::Prepared))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let samples = self.sample(state, &nodes, false).await;
        let mut baselines = BTreeMap::new();
        let mut failures = Vec::new();
        for (node, result) in samples {
            match result {
                Ok(list) => {
                    let mut per_process = BTreeMap::new();
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
        let results = self
            .fan_out(handle, &nodes, deadline, true, |t| {
                let (agents, cmd) = (agents.clone(), cmd.clone());
                async move { send(agents.as_ref(), &t, &cmd, deadline).await.map_err(|e| format!("commit failed: {e}")) }
            })
            .await;
        let Some(results) = results else { return Ok(()) };
        // Window start: where each watched process's tick count stands now,
        // so the final check can tell "ticked during the window" apart.
        let mut watch: BTreeSet<String> = state.watched_nodes().into_iter().collect();
        watch.extend(results.iter().filter(|(_, r)| r.is_ok()).map(|(n, _)| n.clone()));
        let watch: Vec<String> = watch.into_iter().collect();
        let mut window_start = BTreeMap::new();
        for (node, result) in self.sample(state, &watch, true).await {
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
        let calls = nodes.iter().map(|node| {
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
            async move {
                let result = match target {
                    Ok(t) => match tokio::time::timeout(deadline, agents.health(&t, &since, deadline)).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("health query timed out after {} ms", deadline.as_millis())),
                    },
                    Err(e) => Err(e),
                };
                (node.clone(), result)
            }
        });
        join_all(calls).await
    }

    /// One health check of every watched node; records verdicts (which may
    /// roll the rollout back).
    async fn check_health(&self, handle: &Handle, check: Check) -> Result<()> {
        let state = handle.state.lock().await.clone();
        let watched = state.watched_nodes();
        if watched.is_empty() {
            return Ok(());
        }
        let gate: GateConfig = state.rollout.spec.gate;
        let mut verdicts = Vec::new();
        let mut lost = Vec::new();
        for (node, result) in self.sample(&state, &watched, true).await {
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
        let rollback_results = self.fan_out(handle, &rollback, deadline, false, |t| {
            let (agents, rollback_cmd, abort_cmd) = (agents.clone(), rollback_cmd.clone(), abort_cmd.clone());
            async move {
                let result = send(agents.as_ref(), &t, &rollback_cmd, deadline).await;
                // Also drop any prepared copy: a node whose commit never
                // landed holds the patch prepared, not committed.
                let _ = agents.send(&t, &abort_cmd, deadline).await;
                result.map_err(|e| format!("rollback failed: {e}"))
            }
        });
        let abort_results =
            self.fan_out(handle, &abort, deadline, false, |t| {
                let (agents, abort_cmd) = (agents.clone(), abort_cmd.clone());
                async move {
                    send(agents.as_ref(), &t, &abort_cmd, deadline).await.map_err(|e| format!("abort failed: {e}"))
                }
            });
        let (a, b) = tokio::join!(rollback_results, abort_results);
        let mut results = a.unwrap_or_default();
        results.extend(b.unwrap_or_default());
        let last = attempt >= self.inner.config.revert_attempts;
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

    // ---- operator API ---------------------------------------------------------

    async fn audit_refusal(&self, actor: &str, action: &str, target: &str, err: &Error) {
        let entry = audit(actor, action, target, format!("refused: {err}"), false);
        if let Err(e) = self.inner.store.write(self.inner.fence, Batch::new().with(Write::Audit(entry))).await {
            tracing::warn!(error = %e, "could not audit a refused action");
        }
    }

    /// Plans and (unless `dry_run`) starts a rollout. The spec is parsed
    /// here, after the patch checks (see [`ParseSpec`]); every refusal of a
    /// real start is audited.
    pub async fn start(&self, spec: impl ParseSpec, actor: &str, dry_run: bool) -> Result<RolloutState> {
        let patch_id = spec.patch_id().to_string();
        let result = self.start_inner(spec, actor, dry_run).await;
        if let Err(err) = &result {
            if !dry_run {
                self.audit_refusal(actor, "rollout.start", &patch_id, err).await;
            }
        }
        result
    }

    async fn start_inner(&self, spec: impl ParseSpec, actor: &str, dry_run: bool) -> Result<RolloutState> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let patch_id = spec.patch_id();
        if !hotfleet_patch::is_patch_id(patch_id) {
            return Err(Error::InvalidArgument(format!("{patch_id:?} is not a patch id (64 lowercase hex digits)")));
        }
        let patch = self
            .inner
            .store
            .patch(patch_id)
            .await?
            .ok_or_else(|| Error::NotFound { what: "patch", id: patch_id.to_string() })?;
        let spec = spec.parse()?;
        let candidates: Vec<_> = self.inner.registry.list().iter().map(|n| n.candidate()).collect();
        let plan = planner::plan(&candidates, &spec, &patch.target_build)?;
        let _start = self.inner.start_lock.lock().await;
        if !dry_run {
            if let Some(freeze) = self.freeze_status() {
                return Err(Error::Frozen { by: freeze.by, reason: freeze.reason });
            }
        }
        let targets: BTreeSet<&String> = plan.targets().collect();
        for other in self.handles() {
            let snapshot = other.snapshot.borrow().clone();
            if snapshot.rollout.phase.is_terminal() {
                continue;
            }
            let overlap: Vec<String> = snapshot.nodes.keys().filter(|n| targets.contains(n)).cloned().collect();
            if !overlap.is_empty() {
                return Err(Error::Conflict { rollout: snapshot.rollout.id.clone(), nodes: overlap.join(",") });
            }
        }
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let id = format!("ro-{}-{n}", self.inner.fence.epoch);
        let state = RolloutState::new(
            id.clone(),
            spec,
            patch.target_build.clone(),
            plan,
            actor.to_string(),
            self.inner.fence.epoch,
            now_ms(),
        );
        if dry_run {
            return Ok(state);
        }
        let nodes: Vec<_> = state.nodes.values().cloned().collect();
        let detail = format!("patch {} on {} node(s)", state.rollout.patch_id, nodes.len());
        let batch =
            Batch::rollout(&state.rollout, nodes).with(Write::Audit(audit(actor, "rollout.start", &id, detail, true)));
        self.inner.store.write(self.inner.fence, batch).await?;
        tracing::info!(rollout = %id, patch = %state.rollout.patch_id, %actor, "rollout started");
        self.spawn(state.clone());
        Ok(state)
    }

    /// Current state: live for active rollouts, from the store otherwise.
    pub async fn get(&self, id: &str) -> Result<RolloutState> {
        match self.snapshot(id) {
            Some(state) => Ok(state),
            None => crate::reads::stored_rollout(self.inner.store.as_ref(), id).await,
        }
    }

    /// The latest state of an active rollout; `None` if it is not active.
    pub fn snapshot(&self, id: &str) -> Option<RolloutState> {
        self.handle(id).map(|h| h.snapshot.borrow().clone())
    }

    /// A receiver of snapshots for an active rollout; `None` if it is not active.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<RolloutState>> {
        self.handle(id).map(|h| h.snapshot.subscribe())
    }

    /// The active rollout holding `node_id`, if any.
    pub fn active_rollout_of(&self, node_id: &str) -> Option<String> {
        self.handles().into_iter().find_map(|h| {
            let s = h.snapshot.borrow();
            (!s.rollout.phase.is_terminal() && s.nodes.contains_key(node_id)).then(|| s.rollout.id.clone())
        })
    }

    /// An operator's action on an active rollout, audited either way (a
    /// refusal too). Abort wins over everything in flight: see the module docs.
    pub async fn act(&self, id: &str, action: OperatorAction, actor: &str, note: &str) -> Result<RolloutState> {
        let result = async {
            let Some(handle) = self.handle(id) else {
                // Not active: either finished (say so) or unknown.
                let state = self.get(id).await?;
                return Err(Error::Transition(crate::rollout::TransitionError::Finished {
                    id: id.to_string(),
                    outcome: state.rollout.phase.name().to_string(),
                }));
            };
            if action == OperatorAction::Abort {
                // Before anything else: no prepare or commit leaves after this.
                *lock(&handle.abort_by) = Some((actor.to_string(), note.to_string()));
                handle.abort.cancel();
            }
            let entry: AuditEntry = audit(actor, action.audit_name(), id, note, true);
            self.transact(&handle, vec![Write::Audit(entry)], |s| Ok(((), s.apply(action, actor, note, now_ms())?)))
                .await?;
            handle.wake.notify_one();
            let snapshot = handle.snapshot.borrow().clone();
            Ok(snapshot)
        }
        .await;
        if let Err(err) = &result {
            self.audit_refusal(actor, action.audit_name(), id, err).await;
        }
        result
    }

    /// Freezes (`Some(reason)`) or unfreezes (`None`) the fleet.
    /// A freeze without a reason is recorded as "no reason given".
    pub async fn set_freeze(&self, reason: Option<String>, actor: &str) -> Result<Option<FreezeRecord>> {
        let reason = reason.map(|r| if r.trim().is_empty() { "no reason given".to_string() } else { r });
        let record = reason.map(|reason| FreezeRecord { reason, by: actor.to_string(), since_ms: now_ms() });
        let (action, detail) = match &record {
            Some(r) => ("fleet.freeze", r.reason.clone()),
            None => ("fleet.unfreeze", String::new()),
        };
        let batch = Batch::new()
            .with(Write::SetFreeze(record.clone()))
            .with(Write::Audit(audit(actor, action, "fleet", detail, true)));
        self.inner.store.write(self.inner.fence, batch).await?;
        *self.inner.freeze.write().unwrap_or_else(|e| e.into_inner()) = record.clone();
        tracing::info!(frozen = record.is_some(), %actor, "fleet freeze changed");
        for h in self.handles() {
            h.wake.notify_one();
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests;

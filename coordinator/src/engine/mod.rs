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
    collections::{BTreeSet, HashMap},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::Duration,
};
use tracing::Instrument;

use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::AgentClient,
    clock::now_ms,
    error::{Error, Result},
    patches::audit,
    planner,
    registry::Registry,
    rollout::{Changed, NodeState, OperatorAction, ParseSpec, Phase, RolloutKind, RolloutState},
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
    /// How long a command answered "unavailable" is asked again (within its
    /// step deadline): longer than the runtime's reconnect backoff (5 s), so
    /// an agent restarting mid-revert is waited for, not given up on.
    pub unavailable_retry_for: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_poll_interval: Duration::from_secs(1),
            revert_attempts: 3,
            store_retry: Duration::from_millis(500),
            unavailable_retry_for: Duration::from_secs(8),
        }
    }
}

/// One active rollout: its state behind a lock, the latest persisted
/// snapshot for readers, and the signals the driver waits on.
struct Handle {
    /// Shared with `snapshot` and with the driver's reads: at 10,000 nodes a
    /// copy of the state is megabytes, so only a transition makes one.
    state: tokio::sync::Mutex<Arc<RolloutState>>,
    snapshot: watch::Sender<Arc<RolloutState>>,
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
            self.spawn(RolloutState::from_store(rollout, nodes));
            resumed += 1;
        }
        Ok(resumed)
    }

    fn spawn(&self, state: RolloutState) -> Arc<Handle> {
        let id = state.rollout.id.clone();
        let state = Arc::new(state);
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
        // Every line the driver logs names its rollout (text and JSON).
        let trace_id = hotfleet_obs::traces::rollout_trace_id(&id);
        let span = tracing::info_span!("rollout", rollout = %id, trace_id = %trace_id);
        hotfleet_obs::traces::join_rollout_trace(&span, &id);
        let task = tokio::spawn(
            async move {
                engine.drive(&id, driver_handle).await;
            }
            .instrument(span),
        );
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
        let mut next = RolloutState::clone(&guard);
        let (value, changed) = f(&mut next)?;
        if next == **guard && extra.is_empty() {
            return Ok(value);
        }
        next.rollout.generation += 1;
        next.rollout.epoch = self.inner.fence.epoch;
        let nodes = changed.iter().filter_map(|id| next.nodes.get(id).map(|n| NodeState::clone(n))).collect();
        let mut batch = Batch::rollout(&next.rollout, nodes);
        for write in extra {
            batch.push(write);
        }
        let completed_now = next.rollout.phase == Phase::Completed && guard.rollout.phase != Phase::Completed;
        if completed_now && next.rollout.spec.kind == RolloutKind::Revert {
            // A completed revert leaves the stack in the same transaction:
            // processes that start later get the stack without it.
            batch.push(Write::DropStack {
                target_build: next.rollout.target_build.clone(),
                patch_id: next.rollout.patch_id.clone(),
            });
        } else if completed_now {
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
        *guard = Arc::new(next);
        handle.snapshot.send_replace(guard.clone());
        Ok(value)
    }

    // ---- operator API (the driver is in driver.rs) ------------------------------

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
        let result = self.start_inner(spec, actor, dry_run, None).await;
        if let Err(err) = &result {
            if !dry_run {
                self.audit_refusal(actor, "rollout.start", &patch_id, err).await;
            }
        }
        result
    }

    /// A dry run of a bundle this coordinator may not hold (the operator's
    /// local file): a stored patch plans with its own build, an unstored one
    /// with `target_build`, read from the bundle by the caller. Nothing is
    /// stored or audited, as for any dry run.
    pub async fn dry_run_unstored(
        &self,
        spec: impl ParseSpec,
        actor: &str,
        target_build: &str,
    ) -> Result<RolloutState> {
        self.start_inner(spec, actor, true, Some(target_build)).await
    }

    async fn start_inner(
        &self,
        spec: impl ParseSpec,
        actor: &str,
        dry_run: bool,
        unstored_build: Option<&str>,
    ) -> Result<RolloutState> {
        if self.inner.cancel.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let patch_id = spec.patch_id();
        if !hotfleet_patch::is_patch_id(patch_id) {
            return Err(Error::InvalidArgument(format!(
                "{} is not a patch id (64 lowercase hex digits)",
                crate::input::excerpt(patch_id)
            )));
        }
        let stored = self.inner.store.patch(patch_id).await?;
        let target_build = match (&stored, unstored_build) {
            (Some(patch), _) => patch.target_build.clone(),
            (None, Some(build)) if dry_run => build.to_string(),
            (None, _) => return Err(Error::NotFound { what: "patch", id: patch_id.to_string() }),
        };
        let spec = spec.parse()?;
        // An unstored bundle's parent is not known here (its dry run plans the waves only).
        if let Some(patch) = &stored {
            crate::stack::check_start(self.inner.store.as_ref(), patch, spec.kind).await?;
        }
        spec.check_prepare_ttl(self.inner.registry.heartbeat_interval())?;
        spec.check_start_at(now_ms())?;
        let candidates: Vec<_> = self.inner.registry.list().iter().map(|n| n.candidate()).collect();
        let plan = planner::plan(&candidates, &spec, &target_build)?;
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
        // A dry run takes no id: it names no rollout that will ever exist.
        let id = if dry_run {
            String::new()
        } else {
            let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
            format!("ro-{}-{n}", self.inner.fence.epoch)
        };
        let state = RolloutState::new(
            id.clone(),
            spec,
            target_build,
            plan,
            actor.to_string(),
            self.inner.fence.epoch,
            now_ms(),
        );
        if dry_run {
            return Ok(state);
        }
        let what = match state.rollout.spec.kind {
            RolloutKind::Apply => "patch",
            RolloutKind::Revert => "revert of patch",
            RolloutKind::Rebase => "rebased patch",
        };
        let detail = format!("{what} {} on {} node(s)", state.rollout.patch_id, state.nodes.len());
        // No node state is written: each follows from the plan until the
        // first step moves it (`RolloutState::from_store`).
        let batch = Batch::rollout(&state.rollout, Vec::new()).with(Write::Audit(audit(
            actor,
            "rollout.start",
            &id,
            detail,
            true,
        )));
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
        self.handle(id).map(|h| RolloutState::clone(&h.snapshot.borrow()))
    }

    /// A receiver of snapshots for an active rollout; `None` if it is not active.
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Arc<RolloutState>>> {
        self.handle(id).map(|h| h.snapshot.subscribe())
    }

    /// The active rollout holding `node_id`, if any.
    pub fn active_rollout_of(&self, node_id: &str) -> Option<String> {
        self.handles().into_iter().find_map(|h| {
            let s = h.snapshot.borrow();
            (!s.rollout.phase.is_terminal() && s.nodes.contains_key(node_id)).then(|| s.rollout.id.clone())
        })
    }

    /// Every unfinished rollout this engine drives that includes `node_id`:
    /// the agent renews their prepares on each heartbeat answer. From memory
    /// only, so a heartbeat costs no store read.
    pub fn live_rollouts_of(&self, node_id: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .handles()
            .into_iter()
            .filter_map(|h| {
                let s = h.snapshot.borrow();
                (!s.rollout.phase.is_terminal() && s.nodes.contains_key(node_id)).then(|| s.rollout.id.clone())
            })
            .collect();
        ids.sort();
        ids
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
            let snapshot = RolloutState::clone(&handle.snapshot.borrow());
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

mod driver;
pub mod pushed;
#[cfg(test)]
mod tests;

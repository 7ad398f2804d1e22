//! The rollout domain (pure: no gRPC, no store, no clock): the spec, the
//! persisted records and the state machine of DESIGN.md "Rollout lifecycle".
//!
//! ```text
//!   Staged ──► Preparing ──all yes──► Waiting(0) ──► Committing(0) ──ok──► Watching(0) ──pass──► Waiting(1) ─► … ─► Completed
//!     │            │ any no/timeout        ▲ held by gate,      │ any failure          │ gate failed beyond
//!     │            │                       │ pause or freeze    │                      │ policy / node lost
//!     ▼            ▼                                            ▼                      ▼
//!   (abort in any non-terminal state) ─────────────────────► RollingBack ─all reverted/attempted─► RolledBack{reason, faulty}
//! ```
//!
//! Step 0 is the canary when the plan has one. Each node carries **desired**
//! (what the coordinator wants it to hold) and **observed** (what it last
//! answered). Desired is written before the command is sent, so after a crash
//! the store always over-approximates what any node may hold: resuming
//! re-sends the (idempotent) command of the current phase, and a rollback
//! reverts every node whose desired state ever went past `None`.

pub mod health;
mod operator;
mod process_map;
mod spec;
pub mod window;

pub use process_map::ProcessMap;

pub use operator::OperatorAction;
pub use spec::{ParseSpec, RolloutKind, RolloutSpec};

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::planner::Plan;
use health::{Baseline, Verdict};

/// Events kept per rollout (oldest dropped first).
const MAX_EVENTS: usize = 256;

/// One step of a rollout: the canary or a wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub name: String,
    pub nodes: Vec<String>,
    /// Manual gate: hold before this step until promoted.
    pub pause_before: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub node_id: String,
    pub reason: String,
}

/// Prefix of the events saying how the plan merged the requested waves
/// (shown by `rollout start` and its dry run).
pub const MERGED_EVENT: &str = "waves merged: ";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_ms: u64,
    pub message: String,
}

/// Where a rollout is. Serialized into the store as-is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Stored with a start time (`rollout start --at`): nothing is sent
    /// until then; becomes Staged at `start_at_ms` unless a freeze holds it.
    Scheduled {
        start_at_ms: u64,
    },
    Staged,
    Preparing,
    /// Between steps: `next_step` starts unless a gate, pause or freeze holds it.
    Waiting {
        next_step: usize,
    },
    Committing {
        step: usize,
    },
    Watching {
        step: usize,
        started_at_ms: u64,
        ends_at_ms: u64,
    },
    Completed,
    RollingBack {
        reason: String,
        faulty: Vec<String>,
    },
    RolledBack {
        reason: String,
        faulty: Vec<String>,
    },
}

impl Phase {
    pub fn is_terminal(&self) -> bool {
        matches!(self, Phase::Completed | Phase::RolledBack { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Scheduled { .. } => "scheduled",
            Phase::Staged => "staged",
            Phase::Preparing => "preparing",
            Phase::Waiting { .. } => "waiting",
            Phase::Committing { .. } => "committing",
            Phase::Watching { .. } => "watching",
            Phase::Completed => "completed",
            Phase::RollingBack { .. } => "rolling-back",
            Phase::RolledBack { .. } => "rolled-back",
        }
    }
}

/// What the coordinator wants a node to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Desired {
    None,
    Prepared,
    Committed,
    /// Rolled back (if a commit was ever sent) and aborted.
    Reverted,
}

/// What a node last answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Observed {
    Pending,
    Prepared,
    PrepareFailed,
    Committed,
    CommitFailed,
    Unhealthy,
    Lost,
    /// The agent presumed abort: its prepare's TTL ran out without word
    /// from the leader. It cannot be committed any more.
    Expired,
    Aborted,
    RolledBack,
    RevertFailed,
}

impl Desired {
    pub fn name(self) -> &'static str {
        match self {
            Desired::None => "none",
            Desired::Prepared => "prepared",
            Desired::Committed => "committed",
            Desired::Reverted => "reverted",
        }
    }
}

impl Observed {
    pub fn name(self) -> &'static str {
        match self {
            Observed::Pending => "pending",
            Observed::Prepared => "prepared",
            Observed::PrepareFailed => "prepare-failed",
            Observed::Committed => "committed",
            Observed::CommitFailed => "commit-failed",
            Observed::Unhealthy => "unhealthy",
            Observed::Lost => "lost",
            Observed::Expired => "expired",
            Observed::Aborted => "aborted",
            Observed::RolledBack => "rolled-back",
            Observed::RevertFailed => "revert-failed",
        }
    }
}

/// Per-node state of one rollout (stored under the rollout, one key per node).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    pub node_id: String,
    pub step: usize,
    pub desired: Desired,
    pub observed: Observed,
    /// True once a commit may have been sent: reverting then needs a rollback,
    /// not only an abort.
    #[serde(default)]
    pub commit_sent: bool,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub health: String,
    /// Per process, taken just before commit.
    #[serde(default)]
    pub baselines: ProcessMap<Baseline>,
    /// Per process `ticks_since` (from the baseline mark) at the start of the
    /// running health window.
    #[serde(default)]
    pub window_start: ProcessMap<u64>,
    pub updated_at_ms: u64,
}

impl NodeState {
    /// A node of step `step` before anything was sent to it.
    pub fn planned(node_id: &str, step: usize, now_ms: u64) -> NodeState {
        NodeState {
            node_id: node_id.to_string(),
            step,
            desired: Desired::None,
            observed: Observed::Pending,
            commit_sent: false,
            error: String::new(),
            health: String::new(),
            baselines: ProcessMap::new(),
            window_start: ProcessMap::new(),
            updated_at_ms: now_ms,
        }
    }

    /// This planned node as `rollout`'s record says it is while nothing of
    /// the node's own is stored ([`RolloutState::from_store`]).
    fn unwritten(self, rollout: &Rollout) -> NodeState {
        match (rollout.prepare_begun, rollout.all_prepared_at_ms) {
            (false, _) => self,
            (true, 0) => NodeState { desired: Desired::Prepared, ..self },
            (true, at) => {
                NodeState { desired: Desired::Prepared, observed: Observed::Prepared, updated_at_ms: at, ..self }
            }
        }
    }

    /// What a finished rollout keeps of this node ([`crate::store::Store::compact_rollout`]):
    /// everything shown about it, without the per-process health baselines
    /// and window marks only a running health gate needs.
    pub fn summary(&self) -> NodeState {
        NodeState { baselines: ProcessMap::new(), window_start: ProcessMap::new(), ..self.clone() }
    }
}

/// The persisted rollout record (node states live beside it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub patch_id: String,
    pub target_build: String,
    pub spec: RolloutSpec,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    pub phase: Phase,
    #[serde(default)]
    pub paused: bool,
    /// Steps whose manual gate an operator opened.
    #[serde(default)]
    pub promoted: Vec<usize>,
    pub created_by: String,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// Epoch of the coordinator that last wrote this record.
    pub epoch: u64,
    /// Bumped on every stored change.
    pub generation: u64,
    /// True once the prepare began (a prepare may have reached any node):
    /// with the phase, it says what every node is desired to be until the
    /// node's own answer is stored ([`RolloutState::from_store`]).
    #[serde(default)]
    pub prepare_begun: bool,
    /// When every target voted yes (0 until then): a node with no state
    /// stored since is prepared, as of then ([`RolloutState::from_store`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub all_prepared_at_ms: u64,
    #[serde(default)]
    pub events: Vec<Event>,
}

fn is_zero(ms: &u64) -> bool {
    *ms == 0
}

impl Rollout {
    pub fn all_nodes(&self) -> impl Iterator<Item = &String> {
        self.steps.iter().flat_map(|s| s.nodes.iter())
    }

    /// The step in progress, or next to start (for display).
    pub fn current_step(&self) -> usize {
        match &self.phase {
            Phase::Scheduled { .. } | Phase::Staged | Phase::Preparing => 0,
            Phase::Waiting { next_step } => *next_step,
            Phase::Committing { step } | Phase::Watching { step, .. } => *step,
            Phase::Completed => self.steps.len().saturating_sub(1),
            Phase::RollingBack { .. } | Phase::RolledBack { .. } => 0,
        }
    }

    fn event(&mut self, now_ms: u64, message: impl Into<String>) {
        self.events.push(Event { at_ms: now_ms, message: message.into() });
        if self.events.len() > MAX_EVENTS {
            let excess = self.events.len() - MAX_EVENTS;
            self.events.drain(..excess);
        }
    }
}

/// Nodes a step's line in the "staged by" event names one by one.
const EVENT_NODES: usize = 10;

/// A step as the "staged by" event shows it: its nodes by name while they
/// are few, else their count and the first and last. The event is part of
/// the rollout record, rewritten on every transition; the full plan is in
/// the steps (stored once).
fn step_text(step: &Step) -> String {
    match step.nodes.as_slice() {
        [first, .., last] if step.nodes.len() > EVENT_NODES => {
            format!("{}: {} nodes ({first} … {last})", step.name, step.nodes.len())
        }
        nodes => format!("{}: {}", step.name, nodes.join(",")),
    }
}

/// What the driver should do next (see [`RolloutState::next_action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Staged and free to go: record Preparing, then prepare every target.
    BeginPrepare,
    /// (Re-)send prepare to these nodes.
    Prepare(Vec<String>),
    /// Waiting and free to go: take baselines, record Committing, commit.
    BeginStep(usize),
    /// (Re-)send commit to these nodes of `step`.
    Commit { step: usize, nodes: Vec<String> },
    /// Run or continue the health window of `step`.
    Watch { step: usize, ends_at_ms: u64 },
    /// Held: by a manual gate, a pause or the fleet freeze.
    Hold(String),
    /// Scheduled: wait until this time (Unix ms), then record Staged.
    StartAt(u64),
    /// Roll back `rollback` (and abort them after), abort `abort`.
    Revert { rollback: Vec<String>, abort: Vec<String> },
    /// Terminal.
    Finished,
}

/// An operator command the rollout's state refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("rollout {id} already finished ({outcome}); start a new rollout instead")]
    Finished { id: String, outcome: String },
    #[error("rollout {id} has no manual gate left to promote (it is {phase})")]
    NoGate { id: String, phase: String },
    #[error("rollout {id} is rolling back; only abort is accepted now")]
    RollingBack { id: String },
}

/// Outcome of one command to one node: `Err` carries the agent's reason.
pub type NodeResult = (String, Result<(), String>);

/// A rollout with its node states: the unit every transition works on.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutState {
    pub rollout: Rollout,
    pub nodes: BTreeMap<String, Arc<NodeState>>,
}

/// Node states held behind an `Arc` each: a transition copies the map (to
/// persist before it moves) but shares every node it did not change, where a
/// whole copy was ~1.2 KB per node per transition at peak.
pub fn shared(nodes: BTreeMap<String, NodeState>) -> BTreeMap<String, Arc<NodeState>> {
    nodes.into_iter().map(|(id, n)| (id, Arc::new(n))).collect()
}

/// The node ids a transition changed (the driver persists exactly those).
pub type Changed = Vec<String>;

#[allow(clippy::too_many_arguments)]
impl RolloutState {
    /// A rollout as the store holds it: its record (with its plan) and the
    /// node states written since it started. Transitions write what a node
    /// answered, not what it is desired to be when the record says so for
    /// every node at once: nothing at start (the plan), nothing when the
    /// prepare begins (desired prepared), no vote when every vote was yes
    /// (the record's `all_prepared_at_ms`), nothing when a rollback begins
    /// (desired reverted, for every node anything was meant for). So a
    /// planned node with no stored state is desired prepared once the
    /// prepare began, and prepared once every target was; in a rollback
    /// every node is desired reverted but those nothing was ever meant for
    /// (a schedule cancelled before its time); once rolled back, every such
    /// node not stored as failed was reverted.
    pub fn from_store(rollout: Rollout, mut nodes: BTreeMap<String, NodeState>) -> Self {
        for (i, step) in rollout.steps.iter().enumerate() {
            for node in &step.nodes {
                if !nodes.contains_key(node) {
                    let planned = NodeState::planned(node, i, rollout.created_at_ms);
                    nodes.insert(node.clone(), planned.unwritten(&rollout));
                }
            }
        }
        let rolled_back = matches!(rollout.phase, Phase::RolledBack { .. });
        if rolled_back || matches!(rollout.phase, Phase::RollingBack { .. }) {
            for n in nodes.values_mut().filter(|n| n.desired != Desired::None) {
                n.desired = Desired::Reverted;
                // The pass that ended the rollback wrote only the nodes it
                // could not revert: every other one was.
                let done = matches!(n.observed, Observed::RolledBack | Observed::Aborted | Observed::RevertFailed);
                if rolled_back && !done {
                    n.observed = if n.commit_sent { Observed::RolledBack } else { Observed::Aborted };
                }
            }
        }
        RolloutState { rollout, nodes: shared(nodes) }
    }

    /// A new, staged rollout of `spec` from its plan ([`crate::planner::plan`]).
    pub fn new(
        id: String,
        spec: RolloutSpec,
        target_build: String,
        plan: Plan,
        created_by: String,
        epoch: u64,
        now_ms: u64,
    ) -> Self {
        let steps = plan.steps;
        let phase = match spec.start_at_ms {
            0 => Phase::Staged,
            start_at_ms => Phase::Scheduled { start_at_ms },
        };
        let mut nodes = BTreeMap::new();
        for (i, step) in steps.iter().enumerate() {
            for node in &step.nodes {
                nodes.insert(node.clone(), Arc::new(NodeState::planned(node, i, now_ms)));
            }
        }
        let mut rollout = Rollout {
            id,
            patch_id: spec.patch_id.clone(),
            target_build,
            steps,
            skipped: plan.skipped,
            spec,
            phase,
            paused: false,
            promoted: Vec::new(),
            created_by: created_by.clone(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
            epoch,
            generation: 0,
            prepare_begun: false,
            all_prepared_at_ms: 0,
            events: Vec::new(),
        };
        let plan_text: Vec<String> = rollout.steps.iter().map(step_text).collect();
        rollout.event(now_ms, format!("staged by {created_by}: {}", plan_text.join(" | ")));
        for merged in plan.merged {
            rollout.event(now_ms, format!("{MERGED_EVENT}{merged}"));
        }
        if let Phase::Scheduled { start_at_ms } = rollout.phase {
            rollout.event(now_ms, format!("scheduled to start at {}", spec::rfc3339(start_at_ms)));
        }
        Self { rollout, nodes }
    }

    pub fn id(&self) -> &str {
        &self.rollout.id
    }

    pub fn phase(&self) -> &Phase {
        &self.rollout.phase
    }

    fn set_phase(&mut self, phase: Phase, now_ms: u64, message: impl Into<String>) {
        self.rollout.phase = phase;
        self.rollout.updated_at_ms = now_ms;
        self.rollout.event(now_ms, message);
    }

    fn step_nodes(&self, step: usize) -> Vec<String> {
        self.rollout.steps.get(step).map(|s| s.nodes.clone()).unwrap_or_default()
    }

    fn held(&self, next_step: Option<usize>, frozen: bool) -> Option<String> {
        if frozen {
            return Some("fleet is frozen (hotfleet unfreeze)".into());
        }
        if self.rollout.paused {
            return Some("paused by an operator (hotfleet rollout resume)".into());
        }
        if let Some(step) = next_step {
            if let Some(s) = self.rollout.steps.get(step) {
                if s.pause_before && !self.rollout.promoted.contains(&step) {
                    return Some(format!("manual gate before {} (hotfleet rollout promote)", s.name));
                }
            }
        }
        None
    }

    /// [`Self::next_action`] at `now_ms`: a new step (or the prepare) outside
    /// the spec's windows is held until the next one opens, so a window that
    /// closes mid-rollout pauses it (nothing fails) and the next resumes it.
    pub fn next_action_at(&self, frozen: bool, now_ms: u64) -> Action {
        let action = self.next_action(frozen);
        if !matches!(action, Action::BeginPrepare | Action::BeginStep(_)) {
            return action;
        }
        match self.rollout.spec.windows.state(now_ms) {
            window::WindowState::Open => action,
            window::WindowState::Closed { next_open_ms } => Action::Hold(format!(
                "outside its window ({}); the next opens at {}",
                self.rollout.spec.windows,
                spec::rfc3339(next_open_ms)
            )),
        }
    }

    /// Why the rollout is held, if it is (its windows judged on the clock now).
    pub fn waiting_reason(&self, frozen: bool) -> Option<String> {
        match self.next_action_at(frozen, crate::clock::now_ms()) {
            Action::Hold(reason) => Some(reason),
            _ => None,
        }
    }

    /// The next thing to do, from the persisted state alone (this is also how
    /// a restarted coordinator resumes).
    pub fn next_action(&self, frozen: bool) -> Action {
        match &self.rollout.phase {
            Phase::Scheduled { start_at_ms } => match self.held(None, frozen) {
                Some(reason) => Action::Hold(format!("scheduled start blocked: {reason}")),
                None => Action::StartAt(*start_at_ms),
            },
            Phase::Staged => match self.held(None, frozen) {
                Some(reason) => Action::Hold(reason),
                None => Action::BeginPrepare,
            },
            Phase::Preparing => Action::Prepare(
                self.nodes
                    .values()
                    .filter(|n| n.desired == Desired::Prepared && n.observed == Observed::Pending)
                    .map(|n| n.node_id.clone())
                    .collect(),
            ),
            Phase::Waiting { next_step } => match self.held(Some(*next_step), frozen) {
                Some(reason) => Action::Hold(reason),
                None => Action::BeginStep(*next_step),
            },
            Phase::Committing { step } => Action::Commit {
                step: *step,
                nodes: self
                    .step_nodes(*step)
                    .into_iter()
                    .filter(|id| self.nodes.get(id).is_some_and(|n| n.observed == Observed::Prepared))
                    .collect(),
            },
            Phase::Watching { step, ends_at_ms, .. } => Action::Watch { step: *step, ends_at_ms: *ends_at_ms },
            Phase::RollingBack { .. } => {
                let mut rollback = Vec::new();
                let mut abort = Vec::new();
                for n in self.nodes.values() {
                    if n.desired != Desired::Reverted || matches!(n.observed, Observed::RolledBack | Observed::Aborted)
                    {
                        continue;
                    }
                    if n.commit_sent {
                        rollback.push(n.node_id.clone());
                    } else {
                        abort.push(n.node_id.clone());
                    }
                }
                Action::Revert { rollback, abort }
            }
            Phase::Completed | Phase::RolledBack { .. } => Action::Finished,
        }
    }

    /// Scheduled -> Staged, once its start time has come.
    pub fn begin_scheduled(&mut self, now_ms: u64) -> Changed {
        if let Phase::Scheduled { start_at_ms } = self.rollout.phase {
            if now_ms >= start_at_ms {
                let late = now_ms - start_at_ms;
                self.set_phase(Phase::Staged, now_ms, format!("scheduled start reached ({late} ms after its time)"));
            }
        }
        Vec::new()
    }

    /// Staged -> Preparing: every target's desired becomes Prepared. Only
    /// the rollout record is written: the phase says it for every node
    /// ([`Self::from_store`]), so the first write of a node is its vote
    /// (a node-state write per target fewer, before any prepare is sent).
    pub fn begin_prepare(&mut self, now_ms: u64) -> Changed {
        if self.rollout.phase != Phase::Staged {
            return Vec::new();
        }
        for n in self.nodes.values_mut().map(Arc::make_mut) {
            n.desired = Desired::Prepared;
        }
        self.rollout.prepare_begun = true;
        let count = self.nodes.len();
        self.set_phase(Phase::Preparing, now_ms, format!("preparing on {count} node(s)"));
        Vec::new()
    }

    /// Records the answers of one phase's command on nodes that still want
    /// `desired` (an abort may have overtaken an answer: a reverted node keeps
    /// its revert state). Returns the nodes changed and "node: error" for
    /// each failure.
    fn record_results(
        &mut self,
        results: Vec<NodeResult>,
        desired: Desired,
        ok: Observed,
        failed_as: Observed,
        now_ms: u64,
    ) -> (Changed, Vec<String>) {
        let mut changed = Vec::new();
        let mut failed = Vec::new();
        for (id, result) in results {
            // Checked on the shared node: only a node that changes is copied.
            let Some(shared) = self.nodes.get_mut(&id) else { continue };
            if shared.desired != desired {
                continue;
            }
            let n = Arc::make_mut(shared);
            match result {
                Ok(()) => {
                    n.observed = ok;
                    n.error.clear();
                }
                Err(err) => {
                    n.observed = failed_as;
                    failed.push(format!("{id}: {err}"));
                    n.error = err;
                }
            }
            n.updated_at_ms = now_ms;
            changed.push(id);
        }
        (changed, failed)
    }

    /// Prepare votes. Any no (or timeout): roll back; all yes: wait for step 0.
    /// All yes writes only the record (`all_prepared_at_ms`) and the nodes
    /// that had a state of their own stored before their vote: the record
    /// says every other node is prepared ([`Self::from_store`]), a
    /// node-state write per target fewer.
    pub fn record_prepare(&mut self, results: Vec<NodeResult>, now_ms: u64) -> Changed {
        let untouched: BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| {
                let planned = NodeState::planned(&n.node_id, n.step, self.rollout.created_at_ms);
                ***n == planned.unwritten(&self.rollout)
            })
            .map(|n| n.node_id.clone())
            .collect();
        let (mut changed, mut failed) =
            self.record_results(results, Desired::Prepared, Observed::Prepared, Observed::PrepareFailed, now_ms);
        if self.rollout.phase != Phase::Preparing {
            return changed;
        }
        let faulty: Vec<String> =
            self.nodes.values().filter(|n| n.observed == Observed::PrepareFailed).map(|n| n.node_id.clone()).collect();
        if !faulty.is_empty() {
            failed.sort();
            let reason = format!("prepare failed on {}", failed.join("; "));
            changed.extend(self.start_revert(reason, faulty, now_ms));
        } else if self.nodes.values().all(|n| n.observed == Observed::Prepared) {
            self.rollout.all_prepared_at_ms = now_ms;
            self.set_phase(Phase::Waiting { next_step: 0 }, now_ms, "every target prepared (phase 1 complete)");
            changed.retain(|id| !untouched.contains(id));
        }
        dedup(changed)
    }

    /// Waiting -> Committing(step) with the baselines taken just before.
    pub fn begin_step(
        &mut self,
        step: usize,
        baselines: BTreeMap<String, ProcessMap<Baseline>>,
        now_ms: u64,
    ) -> Changed {
        if self.rollout.phase != (Phase::Waiting { next_step: step }) {
            return Vec::new();
        }
        let nodes = self.step_nodes(step);
        for id in &nodes {
            if let Some(n) = self.nodes.get_mut(id).map(Arc::make_mut) {
                n.desired = Desired::Committed;
                n.commit_sent = true;
                n.baselines = baselines.get(id).cloned().unwrap_or_default();
                n.updated_at_ms = now_ms;
            }
        }
        let name = self.rollout.steps.get(step).map(|s| s.name.clone()).unwrap_or_default();
        self.set_phase(Phase::Committing { step }, now_ms, format!("{name}: committing on {} node(s)", nodes.len()));
        nodes
    }

    /// Commit outcomes of `step`. Any failure rolls back; else the window opens.
    pub fn record_commit(
        &mut self,
        step: usize,
        results: Vec<NodeResult>,
        window_start: BTreeMap<String, ProcessMap<u64>>,
        now_ms: u64,
    ) -> Changed {
        let (mut changed, mut failed) =
            self.record_results(results, Desired::Committed, Observed::Committed, Observed::CommitFailed, now_ms);
        for (id, ticks) in window_start {
            if let Some(n) = self.nodes.get_mut(&id).map(Arc::make_mut) {
                n.window_start = ticks;
                changed.push(id);
            }
        }
        if self.rollout.phase != (Phase::Committing { step }) {
            return dedup(changed);
        }
        let faulty: Vec<String> = self
            .step_nodes(step)
            .into_iter()
            .filter(|id| self.nodes.get(id).is_some_and(|n| n.observed == Observed::CommitFailed))
            .collect();
        if !faulty.is_empty() {
            failed.sort();
            let name = self.rollout.steps.get(step).map(|s| s.name.clone()).unwrap_or_default();
            let reason = format!("{name}: commit failed on {}", failed.join("; "));
            changed.extend(self.start_revert(reason, faulty, now_ms));
        } else if self
            .step_nodes(step)
            .iter()
            // Lost (tolerated) nodes were not sent a commit; the step is done
            // when no node still waits for one.
            .all(|id| self.nodes.get(id).is_some_and(|n| n.observed != Observed::Prepared))
        {
            let ends = now_ms.saturating_add(self.rollout.spec.health_window_ms);
            let name = self.rollout.steps.get(step).map(|s| s.name.clone()).unwrap_or_default();
            self.set_phase(
                Phase::Watching { step, started_at_ms: now_ms, ends_at_ms: ends },
                now_ms,
                format!(
                    "{name}: committed; health window {}",
                    hotfleet_proto::duration::format_duration_ms(self.rollout.spec.health_window_ms)
                ),
            );
        }
        dedup(changed)
    }

    /// Nodes a health window watches: every node committed so far that is not
    /// already counted unhealthy or lost.
    pub fn watched_nodes(&self) -> Vec<String> {
        self.nodes.values().filter(|n| n.observed == Observed::Committed).map(|n| n.node_id.clone()).collect()
    }

    /// Health verdicts (and nodes the registry reports lost). Beyond the
    /// failure policy: roll back.
    pub fn record_health(&mut self, verdicts: Vec<(String, Verdict)>, lost: Vec<String>, now_ms: u64) -> Changed {
        let mut changed = Vec::new();
        for (id, verdict) in verdicts {
            let Some(shared) = self.nodes.get_mut(&id) else { continue };
            if shared.observed != Observed::Committed {
                continue;
            }
            let summary = verdict.summary();
            // Most checks change nothing: the node is copied only when they do.
            if shared.health == summary && verdict.healthy() {
                continue;
            }
            let n = Arc::make_mut(shared);
            if n.health != summary {
                n.health = summary;
                n.updated_at_ms = now_ms;
                changed.push(id.clone());
            }
            if !verdict.healthy() {
                n.observed = Observed::Unhealthy;
                n.error = n.health.clone();
                changed.push(id);
            }
        }
        for id in lost {
            let Some(shared) = self.nodes.get_mut(&id) else { continue };
            if matches!(shared.observed, Observed::Committed | Observed::Prepared | Observed::Pending)
                && shared.desired != Desired::Reverted
            {
                let n = Arc::make_mut(shared);
                n.observed = Observed::Lost;
                n.error = "node lost (missed heartbeats)".into();
                n.updated_at_ms = now_ms;
                changed.push(id);
            }
        }
        self.apply_policy(changed, now_ms)
    }

    /// Prepares the agents report expired (presumed abort), with the agent's
    /// detail: those nodes can no longer be committed. Counted like lost
    /// nodes against the failure policy, so beyond it the rollout rolls back
    /// now, naming the expiry, rather than at the commit that would fail.
    pub fn record_expired(&mut self, expired: Vec<(String, String)>, now_ms: u64) -> Changed {
        let mut changed = Vec::new();
        for (id, detail) in expired {
            let Some(shared) = self.nodes.get_mut(&id) else { continue };
            if shared.desired == Desired::Prepared && shared.observed == Observed::Prepared {
                let n = Arc::make_mut(shared);
                n.observed = Observed::Expired;
                n.error = detail;
                n.updated_at_ms = now_ms;
                changed.push(id);
            }
        }
        self.apply_policy(changed, now_ms)
    }

    /// The failure policy over every node counted bad (unhealthy, lost or
    /// with an expired prepare): beyond `max_unhealthy`, roll back.
    fn apply_policy(&mut self, mut changed: Changed, now_ms: u64) -> Changed {
        if self.rollout.phase.is_terminal() || matches!(self.rollout.phase, Phase::RollingBack { .. }) {
            return dedup(changed);
        }
        let bad: Vec<&NodeState> = self
            .nodes
            .values()
            .filter(|n| matches!(n.observed, Observed::Unhealthy | Observed::Lost | Observed::Expired))
            .map(Arc::as_ref)
            .collect();
        if bad.len() > self.rollout.spec.max_unhealthy as usize {
            let faulty: Vec<String> = bad.iter().map(|n| n.node_id.clone()).collect();
            let detail: Vec<String> = bad.iter().map(|n| format!("{}: {}", n.node_id, n.error)).collect();
            let what = if bad.iter().any(|n| n.observed == Observed::Expired) {
                "prepare expired on the agent, presumed abort"
            } else {
                "health gate failed"
            };
            let reason = format!(
                "{what} ({} unhealthy, lost or expired, policy allows {}): {}",
                bad.len(),
                self.rollout.spec.max_unhealthy,
                detail.join("; ")
            );
            changed.extend(self.start_revert(reason, faulty, now_ms));
        } else if !changed.is_empty() && !bad.is_empty() {
            let names: Vec<String> = bad.iter().map(|n| n.node_id.clone()).collect();
            self.rollout.event(
                now_ms,
                format!(
                    "tolerating unhealthy/lost/expired node(s) {} (max-unhealthy {})",
                    names.join(","),
                    self.rollout.spec.max_unhealthy
                ),
            );
        }
        dedup(changed)
    }

    /// The window of `step` passed: next step, or complete.
    pub fn window_passed(&mut self, step: usize, now_ms: u64) -> bool {
        if !matches!(self.rollout.phase, Phase::Watching { step: s, .. } if s == step) {
            return false;
        }
        let name = self.rollout.steps.get(step).map(|s| s.name.clone()).unwrap_or_default();
        if step + 1 < self.rollout.steps.len() {
            self.set_phase(Phase::Waiting { next_step: step + 1 }, now_ms, format!("{name}: health window passed"));
        } else {
            self.set_phase(Phase::Completed, now_ms, format!("{name}: health window passed; rollout completed"));
        }
        true
    }

    /// Any failure the driver detects itself (baseline unavailable, deadline).
    pub fn fail(&mut self, reason: String, faulty: Vec<String>, now_ms: u64) -> Changed {
        if self.rollout.phase.is_terminal() || matches!(self.rollout.phase, Phase::RollingBack { .. }) {
            return Vec::new();
        }
        self.start_revert(reason, faulty, now_ms)
    }

    /// Every node anything was meant for is desired reverted. Only the
    /// record is written: its phase says so for every node at once
    /// ([`Self::from_store`]), so the first rollback goes out without a
    /// write of the whole fleet before it.
    fn start_revert(&mut self, reason: String, faulty: Vec<String>, now_ms: u64) -> Changed {
        for n in self.nodes.values_mut().filter(|n| n.desired != Desired::None).map(Arc::make_mut) {
            n.desired = Desired::Reverted;
        }
        let message = format!("rolling back: {reason}");
        self.set_phase(Phase::RollingBack { reason, faulty }, now_ms, message);
        Vec::new()
    }

    /// Revert outcomes. `last_attempt`: nodes still failing are given up on
    /// (recorded revert-failed) and the rollout ends. The pass that ends the
    /// rollback writes only the nodes whose outcome is not "reverted" (and
    /// those stored as failed by an earlier pass): a rolled-back record says
    /// every other node was reverted ([`Self::from_store`]), so a rollback
    /// that succeeds at once writes no node state at all.
    pub fn record_revert(&mut self, results: Vec<NodeResult>, last_attempt: bool, now_ms: u64) -> Changed {
        let mut answered = Vec::new();
        let mut failed_before = Vec::new();
        for (id, result) in results {
            let Some(n) = self.nodes.get_mut(&id).map(Arc::make_mut) else { continue };
            if n.observed == Observed::RevertFailed {
                failed_before.push(id.clone());
            }
            match result {
                Ok(()) => {
                    n.observed = if n.commit_sent { Observed::RolledBack } else { Observed::Aborted };
                }
                Err(err) => {
                    n.observed = Observed::RevertFailed;
                    n.error = err;
                }
            }
            answered.push(id);
        }
        let mut changed = answered.clone();
        if let Phase::RollingBack { reason, faulty } = self.rollout.phase.clone() {
            let pending: Vec<String> = self
                .nodes
                .values()
                .filter(|n| {
                    n.desired == Desired::Reverted && !matches!(n.observed, Observed::RolledBack | Observed::Aborted)
                })
                .map(|n| n.node_id.clone())
                .collect();
            if pending.is_empty() || last_attempt {
                for id in &pending {
                    if let Some(n) = self.nodes.get_mut(id).map(Arc::make_mut) {
                        if n.observed != Observed::RevertFailed {
                            n.observed = Observed::RevertFailed;
                            n.error = "no answer to the rollback".into();
                        }
                    }
                }
                changed = pending.iter().chain(&failed_before).cloned().collect();
            }
            if pending.is_empty() {
                self.set_phase(
                    Phase::RolledBack { reason: reason.clone(), faulty: faulty.clone() },
                    now_ms,
                    format!("rolled back: {reason}"),
                );
            } else if last_attempt {
                let message = format!("rolled back, but {} could not be reverted (their prepared patch expires by TTL; committed code stays until they are reachable and rolled back)", pending.join(","));
                self.set_phase(Phase::RolledBack { reason, faulty }, now_ms, message);
            }
        }
        let changed = dedup(changed);
        for id in &changed {
            if let Some(n) = self.nodes.get_mut(id).map(Arc::make_mut) {
                n.updated_at_ms = now_ms;
            }
        }
        changed
    }
}

fn dedup(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests;

//! Everything the coordinator persists, behind one trait.
//!
//! The [`Store`] trait has two backends: the embedded redb file
//! ([`embedded::EmbeddedStore`], the default: one coordinator) and etcd
//! ([`etcd::EtcdStore`]: several coordinators, one leader). That shapes three
//! rules every caller follows:
//!
//! - **All writes are batches.** [`Store::write`] applies a [`Batch`] atomically
//!   (one redb transaction, one etcd `Txn`). The engine writes one batch per
//!   transition of a rollout step, never one per node, and a batch carries
//!   only the node states the transition changed. One exception, on etcd
//!   only: per-node records (rollout node states, node records) too many
//!   for one etcd transaction land first, in fenced transactions of their
//!   own, and the rest of the batch (the rollout record, node removals,
//!   audit) last. A failure in between is reported like any failed
//!   write; the node states already written are ahead of their rollout
//!   record, which resuming treats as it treats any desired state (an
//!   over-approximation: see `crate::rollout`). So a batch is never refused
//!   for the number of nodes it moves.
//! - **Finished rollouts are compacted.** [`Store::compact_rollout`] folds a
//!   finished rollout's node states into a summary (each node's final state
//!   without its health baselines); the leader's sweeper runs it.
//! - **All writes are fenced.** A writer holds a [`Fence`] (its epoch); every
//!   batch carries it and the store refuses it ([`StoreError::Fenced`]) once a
//!   newer writer exists. For the embedded store the epoch is a counter in the
//!   same file, bumped by every coordinator start
//!   ([`embedded::EmbeddedStore::acquire_epoch`]); for etcd it is the create
//!   revision of the leader key (see `crate::leadership`), compared inside the
//!   same transaction, so a deposed leader's write lands nothing.
//! - **Values are self-describing JSON** of the record types below, so a
//!   backend only moves bytes under keys and the records can grow fields
//!   (`#[serde(default)]`) without a migration.

pub mod embedded;
pub mod etcd;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{
    node::NodeStatus,
    rollout::{NodeState, Rollout, Skipped, Step},
};

/// Proof of write authority: the epoch this writer acquired.
///
/// Agents receive the same number in every command's `CommandHeader` and
/// refuse commands from an older epoch, so a deposed coordinator can neither
/// write state nor move nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Fence {
    pub epoch: u64,
}

/// What can go wrong talking to the store. Every variant names the store and,
/// where it helps, what to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("state store is fenced: this coordinator holds epoch {ours} but epoch {current} now owns the store (another coordinator took over; this one must stop writing)")]
    Fenced { ours: u64, current: u64 },
    #[error("state store at {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("state store I/O failed: {0}")]
    Backend(String),
    #[error("state store holds a record it cannot read ({key}): {reason}")]
    Corrupt { key: String, reason: String },
    /// Refused before it reached the store: this coordinator gave up (or lost)
    /// leadership, so nothing it still has in flight may be recorded.
    #[error("not written: this coordinator no longer leads (epoch {epoch}: {reason}); the current leader carries on")]
    NotLeading { epoch: u64, reason: String },
    /// A batch too big for one etcd transaction (request bytes or operations).
    #[error("state store refused a batch: {0}")]
    TooLarge(String),
}

/// A registered node as persisted: its last reported status (labels, address,
/// processes) and when it registered. Liveness is not persisted: a restarted
/// coordinator gives every known node a fresh grace period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub status: NodeStatus,
    pub registered_at_ms: u64,
    #[serde(default)]
    pub last_heartbeat_ms: u64,
}

impl NodeRecord {
    pub fn node_id(&self) -> &str {
        &self.status.node_id
    }
}

/// A stored patch's metadata (the bundle bytes are stored beside it, by id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    pub patch_id: String,
    pub target_build: String,
    #[serde(default)]
    pub parent_patch_id: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub created_at: String,
    #[serde(default)]
    pub modules: Vec<String>,
    pub size_bytes: u64,
    #[serde(default)]
    pub signer_key_id: String,
    #[serde(default)]
    pub pushed_by: String,
    pub pushed_at_ms: u64,
}

/// One committed patch on a fleet's patch stack (per target build).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackEntry {
    pub patch_id: String,
    pub target_build: String,
    #[serde(default)]
    pub parent_patch_id: String,
    #[serde(default)]
    pub description: String,
    /// The rollout that completed it.
    #[serde(default)]
    pub rollout_id: String,
    pub committed_at_ms: u64,
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Assigned by the store when the batch commits (0 before that).
    #[serde(default)]
    pub seq: u64,
    pub at_ms: u64,
    pub actor: String,
    pub action: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub detail: String,
    pub ok: bool,
}

/// How much of the audit log is kept: the newest `keep` entries, and none
/// older than `max_age` (zero: no age limit). The leader's sweeper enforces
/// it ([`Store::trim_audit`]) on either store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    pub keep: u64,
    pub max_age: std::time::Duration,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self { keep: 100_000, max_age: std::time::Duration::from_secs(90 * 24 * 3600) }
    }
}

impl AuditRetention {
    /// Whether entry `seq`, written at `at_ms`, goes: `last` is the newest
    /// sequence number, `now_ms` the time now.
    pub fn expired(&self, seq: u64, at_ms: u64, last: u64, now_ms: u64) -> bool {
        let max_age_ms = self.max_age.as_millis() as u64;
        seq.saturating_add(self.keep) <= last || (max_age_ms > 0 && at_ms.saturating_add(max_age_ms) < now_ms)
    }
}

/// Most audit entries one [`Store::trim_audit`] removes: a long backlog goes
/// over several sweeps, each a bounded transaction.
pub const AUDIT_TRIM_BATCH: usize = 500;

/// The fleet-wide freeze flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeRecord {
    pub reason: String,
    pub by: String,
    pub since_ms: u64,
}

/// A rollout's plan (its steps, which name every node, and the nodes it
/// skipped), stored apart from the rollout record: the plan is fixed at the
/// start while the record is rewritten on every transition, so keeping them
/// together rewrote every node id on every step. Both backends store a
/// [`Write::PutRollout`] as the record without its plan plus this, written
/// only when it differs from what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RolloutPlan {
    pub steps: Vec<Step>,
    #[serde(default)]
    pub skipped: Vec<Skipped>,
}

impl RolloutPlan {
    /// The record as stored (plan left out) and its plan.
    pub fn split(rollout: &Rollout) -> (Rollout, RolloutPlan) {
        let plan = RolloutPlan { steps: rollout.steps.clone(), skipped: rollout.skipped.clone() };
        let record = Rollout { steps: Vec::new(), skipped: Vec::new(), ..rollout.clone() };
        (record, plan)
    }

    /// A stored record with its plan put back. A record without a stored
    /// plan was written before plans were stored apart and carries its own.
    pub fn join(mut record: Rollout, plan: Option<RolloutPlan>) -> Rollout {
        if let Some(plan) = plan {
            record.steps = plan.steps;
            record.skipped = plan.skipped;
        }
        record
    }
}

/// One write inside a [`Batch`].
#[derive(Debug, Clone)]
pub enum Write {
    PutNode(NodeRecord),
    RemoveNode(String),
    /// Stores a patch and its bundle. Put-if-absent: a patch id is a content
    /// digest, so an existing record is already the same patch and is kept.
    PutPatch {
        record: PatchRecord,
        bundle: Vec<u8>,
    },
    PutRollout(Box<Rollout>),
    /// Per-node state of one rollout; only the nodes listed are replaced
    /// (one key per node: what a step did not change is not rewritten).
    PutRolloutNodes {
        rollout_id: String,
        nodes: Vec<NodeState>,
    },
    /// Appends to the build's patch stack unless the patch is already on it
    /// (so a resumed completion cannot push twice).
    PushStack(StackEntry),
    /// Takes a patch off the build's stack (a completed revert); a patch not
    /// on it leaves the stack as it is (so a resumed completion changes nothing).
    DropStack {
        target_build: String,
        patch_id: String,
    },
    /// Appended with the next sequence number.
    Audit(AuditEntry),
    /// `None` unfreezes.
    SetFreeze(Option<FreezeRecord>),
}

impl Write {
    /// What kind of record this write puts (or removes), and how many: the
    /// `record` label of `hotfleet_store_records_written_total`.
    pub fn records(&self) -> (&'static str, usize) {
        match self {
            Write::PutNode(_) => ("node", 1),
            Write::RemoveNode(_) => ("node_removal", 1),
            Write::PutPatch { .. } => ("patch", 1),
            Write::PutRollout(_) => ("rollout", 1),
            Write::PutRolloutNodes { nodes, .. } => ("node_state", nodes.len()),
            Write::PushStack(_) | Write::DropStack { .. } => ("stack", 1),
            Write::Audit(_) => ("audit", 1),
            Write::SetFreeze(_) => ("freeze", 1),
        }
    }
}

/// Writes applied atomically, all or nothing.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub writes: Vec<Write>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, write: Write) -> Self {
        self.writes.push(write);
        self
    }

    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Records by kind, summed over the batch's writes (see [`Write::records`]).
    pub fn records(&self) -> Vec<(&'static str, usize)> {
        let mut by_kind: Vec<(&'static str, usize)> = Vec::new();
        for (kind, count) in self.writes.iter().map(Write::records) {
            match by_kind.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, total)) => *total += count,
                None => by_kind.push((kind, count)),
            }
        }
        by_kind
    }

    /// The rollout record and the given node states, as one batch.
    pub fn rollout(rollout: &Rollout, nodes: Vec<NodeState>) -> Self {
        let mut batch = Self::new().with(Write::PutRollout(Box::new(rollout.clone())));
        if !nodes.is_empty() {
            batch.push(Write::PutRolloutNodes { rollout_id: rollout.id.clone(), nodes });
        }
        batch
    }
}

/// Persistent state of the coordinator. Implementations are cheap to share
/// (`Arc<dyn Store>`) and safe to call concurrently.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs ("embedded", "etcd").
    fn backend(&self) -> &'static str;

    /// Applies every write of `batch` atomically, if `fence` still owns the
    /// store. Returns the sequence numbers given to the batch's audit entries.
    async fn write(&self, fence: Fence, batch: Batch) -> Result<Vec<u64>, StoreError>;

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;

    async fn patch(&self, patch_id: &str) -> Result<Option<PatchRecord>, StoreError>;
    async fn patch_bundle(&self, patch_id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn patches(&self) -> Result<Vec<PatchRecord>, StoreError>;

    async fn rollout(&self, rollout_id: &str) -> Result<Option<Rollout>, StoreError>;
    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError>;
    /// Node states of one rollout, keyed by node id.
    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError>;

    /// The build's committed patch stack, oldest first.
    async fn patch_stack(&self, target_build: &str) -> Result<Vec<StackEntry>, StoreError>;

    /// Newest first, at most `limit`, only entries older than `before` (a
    /// sequence number) when given: one page of the log.
    async fn audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>, StoreError>;

    /// Deletes the oldest entries `retention` no longer keeps, at most
    /// [`AUDIT_TRIM_BATCH`] of them, if `fence` still owns the store.
    /// Returns how many went.
    async fn trim_audit(&self, fence: Fence, retention: AuditRetention, now_ms: u64) -> Result<u64, StoreError>;

    async fn freeze(&self) -> Result<Option<FreezeRecord>, StoreError>;

    /// Folds the node states of a finished rollout into its compact summary
    /// ([`NodeState::summary`]: the final state without health baselines),
    /// if `fence` still owns the store. An unfinished, unknown or already
    /// compacted rollout is left alone. Returns whether anything changed;
    /// [`Store::rollout_nodes`] then answers the summary.
    async fn compact_rollout(&self, fence: Fence, rollout_id: &str) -> Result<bool, StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_counts_its_records_by_kind() {
        let node = |id: &str| NodeState::planned(id, 0, 0);
        let batch = Batch::new()
            .with(Write::PutRolloutNodes { rollout_id: "r".into(), nodes: vec![node("a"), node("b"), node("c")] })
            .with(Write::Audit(AuditEntry {
                seq: 0,
                at_ms: 0,
                actor: "alice".into(),
                action: "rollout.start".into(),
                target: "r".into(),
                detail: String::new(),
                ok: true,
            }))
            .with(Write::PutRolloutNodes { rollout_id: "r".into(), nodes: vec![node("d"), node("e")] })
            .with(Write::DropStack { target_build: "b".into(), patch_id: "p".into() })
            .with(Write::RemoveNode("x".into()));
        assert_eq!(batch.records(), [("node_state", 5), ("audit", 1), ("stack", 1), ("node_removal", 1)]);
        assert!(Batch::new().records().is_empty());
    }
}

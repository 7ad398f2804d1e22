//! The guards around one term's agents and store: [`GuardedAgents`] sends
//! no command once the lease is expired or lost, [`TermStore`] records no
//! write once the term is lost and ends the term on a fenced write.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_trait::async_trait;

use super::LeaseGuard;
use crate::{
    agents::{AgentClient, AgentError, Command, HealthSample, Outcome, Target},
    rollout::{NodeState, Rollout},
    store::{
        AuditEntry, AuditRetention, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, StackEntry, Store, StoreError,
    },
};

/// The engine's agent client for one term: no command leaves once the lease
/// is expired or lost. Health queries pass: they change nothing, and an
/// expired lease stops the term anyway.
pub struct GuardedAgents {
    inner: Arc<dyn AgentClient>,
    guard: LeaseGuard,
}

impl GuardedAgents {
    pub fn new(inner: Arc<dyn AgentClient>, guard: LeaseGuard) -> Self {
        Self { inner, guard }
    }

    fn admit(&self, to: &Target, what: &str) -> Result<(), AgentError> {
        self.guard.check().map_err(|reason| {
            tracing::warn!(node = %to.node_id, command = what, epoch = self.guard.epoch(), %reason, "command not sent: this coordinator no longer leads");
            AgentError::Refused { node: to.node_id.clone(), reason: format!("not sent: no longer leading ({reason})") }
        })
    }
}

#[async_trait]
impl AgentClient for GuardedAgents {
    async fn send(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError> {
        self.admit(to, cmd.kind.name())?;
        self.inner.send(to, cmd, deadline).await
    }

    async fn health(
        &self,
        to: &Target,
        since: &BTreeMap<String, u64>,
        deadline: Duration,
    ) -> Result<Vec<HealthSample>, AgentError> {
        self.inner.health(to, since, deadline).await
    }

    // The inner client's bound, or a fan-out would start every call at once
    // and hold each waiting one's state (~10 KB a node).
    fn width(&self, agents: usize) -> usize {
        self.inner.width(agents)
    }

    fn links(&self) -> Option<crate::agents::AgentLinks> {
        self.inner.links()
    }
}

/// The store as one term sees it: refuses every write once the term is lost
/// (nothing still in flight gets recorded, e.g. the failures of commands the
/// guard refused), and a fenced write ends the term at once. Whether the
/// lease still holds is decided by the store itself (etcd's transaction
/// compare), not by this process's clock.
pub struct TermStore {
    inner: Arc<dyn Store>,
    guard: LeaseGuard,
}

impl TermStore {
    pub fn new(inner: Arc<dyn Store>, guard: LeaseGuard) -> Self {
        Self { inner, guard }
    }

    /// Refused before it reaches the store once the lease is gone.
    fn check(&self, fence: Fence) -> Result<(), StoreError> {
        match self.guard.lost_reason() {
            Some(reason) => Err(StoreError::NotLeading { epoch: fence.epoch, reason }),
            None => Ok(()),
        }
    }

    /// A write the store fenced ends the term at once.
    fn fenced<T>(&self, result: &Result<T, StoreError>) {
        if let Err(StoreError::Fenced { ours, current }) = result {
            tracing::error!(
                ours,
                current,
                "write refused by the store: fenced by a newer leader (transaction compare failed)"
            );
            self.guard.lose(format!("fenced: epoch {current} now owns the store"));
        }
    }
}

#[async_trait]
impl Store for TermStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn write(&self, fence: Fence, batch: Batch) -> Result<Vec<u64>, StoreError> {
        self.check(fence)?;
        let started = std::time::Instant::now();
        let records = batch.records();
        let result = self.inner.write(fence, batch).await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        let backend = self.inner.backend();
        if result.is_ok() {
            crate::telemetry::store_took(backend, &records);
        }
        hotfleet_obs::metrics().observe_duration(
            &crate::telemetry::STORE_WRITE,
            &[backend, outcome],
            started.elapsed(),
        );
        self.fenced(&result);
        result
    }

    async fn trim_audit(&self, fence: Fence, retention: AuditRetention, now_ms: u64) -> Result<u64, StoreError> {
        self.check(fence)?;
        let result = self.inner.trim_audit(fence, retention, now_ms).await;
        self.fenced(&result);
        result
    }

    async fn compact_rollout(&self, fence: Fence, rollout_id: &str) -> Result<bool, StoreError> {
        self.check(fence)?;
        let result = self.inner.compact_rollout(fence, rollout_id).await;
        self.fenced(&result);
        result
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes().await
    }

    async fn patch(&self, patch_id: &str) -> Result<Option<PatchRecord>, StoreError> {
        self.inner.patch(patch_id).await
    }

    async fn patch_bundle(&self, patch_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.patch_bundle(patch_id).await
    }

    async fn patches(&self) -> Result<Vec<PatchRecord>, StoreError> {
        self.inner.patches().await
    }

    async fn rollout(&self, rollout_id: &str) -> Result<Option<Rollout>, StoreError> {
        self.inner.rollout(rollout_id).await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.inner.rollouts().await
    }

    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError> {
        self.inner.rollout_nodes(rollout_id).await
    }

    async fn patch_stack(&self, target_build: &str) -> Result<Vec<StackEntry>, StoreError> {
        self.inner.patch_stack(target_build).await
    }

    async fn audit(&self, limit: usize, before: Option<u64>) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(limit, before).await
    }

    async fn freeze(&self) -> Result<Option<FreezeRecord>, StoreError> {
        self.inner.freeze().await
    }
}

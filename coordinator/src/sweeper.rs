//! The leader's housekeeping, one task per term: silent nodes are marked
//! lost (the registry judges), nodes lost for longer than `--node-expiry` are
//! forgotten, the audit log is trimmed to its retention and finished
//! rollouts' node states are compacted (on either store).
//!
//! Why here: each of these is a periodic judgement of stored state that only
//! the leader may write, so it runs with the term, behind the term's fenced
//! store, and stops with it. A node a live rollout holds is never expired:
//! the rollout judges a lost node itself, and a record the driver still
//! needs must not vanish under it.

use std::{collections::HashSet, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    clock::now_ms,
    engine::Engine,
    patches::audit,
    registry::Registry,
    store::{AuditRetention, Fence, Store},
};

/// The audit log is trimmed every this many sweeps (and on the first).
const TRIM_EVERY: u64 = 60;

/// What the sweeper works with (built by the term).
pub struct Sweeper {
    pub registry: Registry,
    pub engine: Engine,
    pub store: Arc<dyn Store>,
    pub fence: Fence,
    /// Silence after which a lost node is forgotten.
    pub node_expiry: Duration,
    pub audit: AuditRetention,
}

impl Sweeper {
    /// Forgets every node silent for longer than the node expiry that no
    /// live rollout holds; returns their ids. Each removal is audited.
    pub async fn expire_nodes(&self) -> Vec<String> {
        let mut expired = Vec::new();
        for id in self.registry.expired(self.node_expiry) {
            if !self.engine.live_rollouts_of(&id).is_empty() {
                continue;
            }
            let detail = format!("expired: no heartbeat for more than {:?} (--node-expiry)", self.node_expiry);
            match self.registry.remove(&id, audit("hotfleet", "node.expire", &id, detail, true)).await {
                Ok(Some(_)) => {
                    tracing::info!(node = %id, after = ?self.node_expiry, "lost node expired: record removed");
                    expired.push(id);
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(node = %id, error = %err, "could not expire a lost node; retrying later"),
            }
        }
        expired
    }

    /// Trims the audit log to its retention (a bounded batch per call).
    pub async fn trim_audit(&self) -> u64 {
        match self.store.trim_audit(self.fence, self.audit, now_ms()).await {
            Ok(0) => 0,
            Ok(n) => {
                tracing::info!(removed = n, keep = self.audit.keep, max_age = ?self.audit.max_age, "audit log trimmed");
                n
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not trim the audit log; retrying later");
                0
            }
        }
    }

    /// Folds the node states of every finished rollout not in `done` into
    /// their summary ([`Store::compact_rollout`]) and adds it to `done`, so a
    /// term reads each finished rollout once. Returns how many were folded.
    pub async fn compact_finished(&self, done: &mut HashSet<String>) -> usize {
        let rollouts = match self.store.rollouts().await {
            Ok(rollouts) => rollouts,
            Err(err) => {
                tracing::warn!(error = %err, "could not list rollouts to compact; retrying later");
                return 0;
            }
        };
        let mut folded = 0;
        for rollout in rollouts {
            if !rollout.phase.is_terminal() || done.contains(&rollout.id) {
                continue;
            }
            match self.store.compact_rollout(self.fence, &rollout.id).await {
                Ok(changed) => {
                    if changed {
                        tracing::info!(rollout = %rollout.id, "finished rollout's node states compacted");
                        folded += 1;
                    }
                    done.insert(rollout.id);
                }
                Err(err) => {
                    tracing::warn!(rollout = %rollout.id, error = %err, "could not compact a finished rollout; retrying later");
                    break;
                }
            }
        }
        folded
    }

    /// Sweeps every [`Registry::sweep_interval`] until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.registry.sweep_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeps = 0u64;
        let mut compacted = HashSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.registry.sweep();
            self.expire_nodes().await;
            if sweeps.is_multiple_of(TRIM_EVERY) {
                self.trim_audit().await;
                self.compact_finished(&mut compacted).await;
            }
            sweeps += 1;
        }
    }
}

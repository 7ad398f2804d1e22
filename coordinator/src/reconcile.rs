//! Drift repair: desired vs observed, outside rollouts.
//!
//! The store says which patch stack each build runs. A process can end up
//! running more than that: its agent was unreachable while a rollout rolled
//! back (killed, partitioned), so the revert never reached it. Once the node
//! heartbeats again and no rollout owns it, the reconciler rolls the extra
//! patches back, newest first, and records it in the audit log. Rollback is
//! idempotent on the agent (a patch not on top of a stack is left alone), so a
//! repeated attempt after a lost answer changes nothing twice.
//!
//! A process running *fewer* patches than its build's stack is only
//! reported: processes fetch the stack themselves when they start.
//!
//! Heartbeats lag what the agents did: a node reverted a moment ago may still
//! report the patch. So drift counts only when two heartbeats received after
//! this coordinator started, one after the other, both show it, and no
//! rollout owns the node; a coordinator that just started (and is resuming
//! rollouts from the store) waits one interval before its first look.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentClient, Command, CommandKind, Target},
    engine::Engine,
    patches::audit,
    registry::{Liveness, Registry},
    store::{Batch, Fence, Store, Write},
};

/// Patches on `running` beyond what `desired` holds, newest first.
///
/// Only a common prefix counts as agreement: `[A, C]` against `[A, B]`
/// yields `[C]` (roll back C; B is missing and left to the process's own sync).
pub fn excess(desired: &[String], running: &[String]) -> Vec<String> {
    let common = desired.iter().zip(running).take_while(|(d, r)| d == r).count();
    running[common..].iter().rev().cloned().collect()
}

/// How long to wait before trying the same repair again.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// What the reconciler remembers between passes.
#[derive(Default)]
struct Memory {
    started_ms: u64,
    /// (node, patch) -> heartbeat time the drift was first seen at.
    suspects: HashMap<(String, String), u64>,
    /// (node, patch) -> when a repair was last sent.
    attempts: HashMap<(String, String), Instant>,
}

pub struct Reconciler {
    pub store: Arc<dyn Store>,
    pub fence: Fence,
    pub registry: Registry,
    pub engine: Engine,
    pub agents: Arc<dyn AgentClient>,
    pub deadline: Duration,
}

impl Reconciler {
    /// Checks every alive node not owned by a rollout, every heartbeat interval.
    pub async fn run(self, cancel: CancellationToken) {
        let mut memory = Memory { started_ms: crate::clock::now_ms(), ..Memory::default() };
        let interval = self.registry.heartbeat_interval();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => self.pass(&mut memory).await,
            }
        }
    }

    async fn pass(&self, memory: &mut Memory) {
        memory.attempts.retain(|_, at| at.elapsed() < RETRY_AFTER);
        let mut seen_now = HashMap::new();
        for node in self.registry.list() {
            let node_id = node.status.node_id.clone();
            if node.liveness != Liveness::Alive
                || node.last_heartbeat_ms < memory.started_ms
                || self.engine.active_rollout_of(&node_id).is_some()
            {
                continue;
            }
            for process in &node.status.processes {
                let desired: Vec<String> = match self.store.patch_stack(&process.build).await {
                    Ok(stack) => stack.into_iter().map(|e| e.patch_id).collect(),
                    Err(err) => {
                        tracing::warn!(error = %err, "reconcile: cannot read the patch stack; will retry");
                        return;
                    }
                };
                // Newest first: only the top of a stack can be rolled back.
                let Some(patch) = excess(&desired, &process.patch_stack).into_iter().next() else { continue };
                let key = (node_id.clone(), patch.clone());
                seen_now.insert(key.clone(), node.last_heartbeat_ms);
                let confirmed = memory.suspects.get(&key).is_some_and(|first| *first < node.last_heartbeat_ms);
                if !confirmed || memory.attempts.contains_key(&key) {
                    continue;
                }
                memory.attempts.insert(key, Instant::now());
                self.revert(&node_id, &node.status.advertise_addr, process.pid, &patch).await;
            }
        }
        // Keep the first sighting of drift that persists; forget drift that went away.
        memory.suspects =
            seen_now.into_iter().map(|(k, ts)| (k.clone(), memory.suspects.get(&k).copied().unwrap_or(ts))).collect();
    }

    async fn revert(&self, node_id: &str, addr: &str, pid: u32, patch: &str) {
        tracing::warn!(node = %node_id, pid, patch = %patch, "process runs a patch the store does not record; rolling it back");
        let target = Target { node_id: node_id.to_string(), addr: addr.to_string() };
        let cmd = Command {
            kind: CommandKind::Rollback,
            rollout_id: format!("reconcile-{}-{}", self.fence.epoch, crate::clock::now_ms()),
            patch_id: patch.to_string(),
            epoch: self.fence.epoch,
        };
        let (ok, detail) = match self.agents.send(&target, &cmd, self.deadline).await {
            Ok(outcome) if outcome.ok => (true, format!("rolled back on pid {pid}: not on the store's patch stack")),
            Ok(outcome) => (false, format!("rollback on pid {pid} failed: {}", outcome.reason)),
            Err(err) => (false, format!("rollback on pid {pid} failed: {err}")),
        };
        if ok {
            tracing::info!(node = %node_id, patch = %patch, "drift repaired");
        } else {
            tracing::warn!(node = %node_id, patch = %patch, %detail, "drift repair failed; will retry");
        }
        let entry = audit("coordinator", "reconcile.rollback", patch, format!("{node_id}: {detail}"), ok);
        if let Err(err) = self.store.write(self.fence, Batch::new().with(Write::Audit(entry))).await {
            tracing::warn!(error = %err, "reconcile: audit write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn extra_patches_are_found_newest_first() {
        assert!(excess(&ids(&["a"]), &ids(&["a"])).is_empty());
        assert!(excess(&ids(&["a", "b"]), &ids(&["a"])).is_empty(), "missing patches are not rolled back");
        assert_eq!(excess(&ids(&["a"]), &ids(&["a", "b", "c"])), ids(&["c", "b"]));
        assert_eq!(excess(&ids(&[]), &ids(&["x"])), ids(&["x"]));
        assert_eq!(excess(&ids(&["a", "b"]), &ids(&["a", "c"])), ids(&["c"]));
    }
}
